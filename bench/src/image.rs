//! `homeport-bench image`: the appliance image's sizes (compressed, per partition), build
//! times (cold: Debian root and all; warm: assembly only) and boot times under TCG, split by
//! what the console shows:
//!
//! - firmware: QEMU started → `EFI stub: Loaded initrd` (OVMF, systemd-boot, the UKI's stub);
//! - kernel: → `Loading, please wait...` (the kernel up to the initramfs' first words);
//! - initramfs: → `Begin: Running /scripts/init-bottom ... done.` (modules, root mounted, the
//!   data partition grown if needed; run-init then starts homeport-init);
//! - init to agent: → the agent's first log line (init's mounts, /data, the agent's exec);
//! - agent to ready: → `homeport: ready` (the agent's own start).
//!
//! Times are host-side arrival times of console lines (10 ms polling). The first boot is on a
//! fresh disk (the agent makes its CA, token and database); the others boot the same disk
//! again after a clean shutdown (Ctrl-Alt-Del: homeport-init stops the agent, unmounts
//! `/data` and reboots; QEMU runs with `-no-reboot`), whose length is measured too: killing
//! QEMU instead would lose what the data partition had not committed yet. Writes `target/bench/image.json`. Not part of `all`: it builds the image from
//! scratch and boots QEMU (~5 minutes; `--no-cold` ~2).
//!
//!   homeport-bench image [--boots N] [--no-build] [--no-cold] [--image-dir DIR]
//!
//! `--image-dir` boots an image built elsewhere (`HOMEPORT_IMAGE_OUT`, e.g. with
//! `HOMEPORT_CMDLINE_EXTRA=RUST_LOG=info,homeport=debug` for the agent's start timings) and
//! builds nothing.

use anyhow::{bail, Context, Result};
use homeport_qemu_tests::{repo_root, Guest, GuestBuilder, Image, BOOT_TIMEOUT};
use serde_json::{json, Value};
use std::process::Command;
use std::time::Instant;

const BOARD: &str = "qemu-x86_64";
/// Targets from the issue: the compressed image, and init → agent ready.
const IMAGE_ZST_MAX: u64 = 200_000_000;
const INIT_TO_READY_MAX: f64 = 1.0;

const MARKS: [(&str, &str); 5] = [
    ("firmware", "EFI stub: Loaded initrd"),
    ("kernel", "Loading, please wait..."),
    ("initramfs", "Begin: Running /scripts/init-bottom ... done."),
    ("init_to_agent", "running as the appliance"),
    ("agent_to_ready", "homeport: ready "),
];

/// What `homeport-bench image` was asked for.
#[derive(Debug, Clone)]
pub struct Opts {
    pub boots: usize,
    /// Build the image (forced) and time it; else take the last one built.
    pub build: bool,
    /// Also build once from an empty package cache.
    pub cold: bool,
    /// Boot this built image instead (builds nothing).
    pub image_dir: Option<std::path::PathBuf>,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            boots: 3,
            build: true,
            cold: true,
            image_dir: None,
        }
    }
}

pub fn image(opts: &Opts) -> Result<()> {
    let mut builds = serde_json::Map::new();
    let build = opts.build && opts.image_dir.is_none();
    if build && opts.cold {
        // A fresh package cache folder: mmdebstrap, kernel, initramfs, everything.
        let cache = tempfile::Builder::new()
            .prefix("homeport-image-cold-")
            .tempdir_in("/var/tmp")?;
        let dir = cache.path().to_str().context("a UTF-8 temp path")?;
        let s = timed_build(&[("HOMEPORT_IMAGE_CACHE", dir)])?;
        builds.insert("cold".into(), json!(s));
    }
    if build {
        let s = timed_build(&[])?;
        builds.insert("warm".into(), json!(s));
    }
    let dir = match &opts.image_dir {
        Some(d) => d.clone(),
        None => repo_root().join("target/image").join(BOARD),
    };
    let image = Image::load(&dir)?;
    builds.insert("last_build_steps".into(), image.json["seconds"].clone());

    let mut runs = Vec::new();
    let mut shutdowns = Vec::new();
    let mut guest = GuestBuilder::new(&image).no_reboot(true).start()?;
    for i in 0..opts.boots.max(1) {
        if i > 0 {
            let t = Instant::now();
            guest.ctrl_alt_del()?;
            guest.wait_for_exit(BOOT_TIMEOUT)?;
            shutdowns.push(round(t.elapsed().as_secs_f64()));
            guest.restart()?;
        }
        guest.wait_for_console("homeport: ready ", BOOT_TIMEOUT)?;
        let split = split(&guest)?;
        eprintln!("boot {}: {split}", i + 1);
        runs.push(split);
    }
    drop(guest);
    let warm: Vec<&Value> = runs.iter().skip(1).collect();
    let median_of = |key: &str| -> Option<f64> {
        let v: Vec<f64> = warm.iter().filter_map(|r| r[key].as_f64()).collect();
        (!v.is_empty()).then(|| crate::median(v))
    };
    let mut warm_median = serde_json::Map::new();
    for key in MARKS
        .iter()
        .map(|(k, _)| *k)
        .chain(["init_to_ready", "total"])
    {
        if let Some(m) = median_of(key) {
            warm_median.insert(key.into(), json!(round(m)));
        }
    }
    let b = &image.json["bytes"];
    let image_zst = b["image_zst"].as_u64().unwrap_or(u64::MAX);
    let init_to_ready = warm_median
        .get("init_to_ready")
        .and_then(Value::as_f64)
        .or_else(|| runs.first().and_then(|r| r["init_to_ready"].as_f64()))
        .unwrap_or(f64::MAX);
    crate::report(
        "image",
        json!({
            "board": BOARD,
            "version": image.version,
            "kernel": image.json["kernel"],
            "bytes": b,
            "build_seconds": builds,
            "boot_seconds": {
                "accel": "tcg",
                "machine": "q35, -cpu max, 2 vCPUs, 1 GiB",
                "first_boot": runs.first(),
                "warm_median": warm_median,
                "runs": runs,
                "clean_shutdowns": shutdowns,
            },
            "targets": {
                "image_zst_max_bytes": IMAGE_ZST_MAX,
                "image_zst_met": image_zst <= IMAGE_ZST_MAX,
                "init_to_ready_max_seconds": INIT_TO_READY_MAX,
                "init_to_ready_met": init_to_ready <= INIT_TO_READY_MAX,
            },
        }),
    )
}

/// `scripts/image.sh` with the build forced to run (the binaries are built when stale).
fn timed_build(env: &[(&str, &str)]) -> Result<f64> {
    let start = Instant::now();
    let mut cmd = Command::new(repo_root().join("scripts/image.sh"));
    // Under `cargo run`, cargo's variables would make the script's own cargo builds see a
    // changed environment and rebuild from scratch.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO_") && k != "CARGO_HOME" {
            cmd.env_remove(&key);
        }
    }
    let status = cmd
        .arg(BOARD)
        .current_dir(repo_root())
        .env("HOMEPORT_IMAGE_FORCE", "1")
        .envs(env.iter().copied())
        .status()
        .context("run scripts/image.sh")?;
    if !status.success() {
        bail!("scripts/image.sh {BOARD}: {status}");
    }
    Ok(round(start.elapsed().as_secs_f64()))
}

/// Seconds of each phase of one boot, from the console lines' arrival times.
fn split(guest: &Guest) -> Result<Value> {
    let mut out = serde_json::Map::new();
    let mut prev = 0.0;
    let mut at = Vec::new();
    for (name, pattern) in MARKS {
        let line = guest
            .find(pattern)
            .with_context(|| format!("the console shows no {pattern:?}"))?;
        let t = line.at.as_secs_f64();
        out.insert(name.into(), json!(round(t - prev)));
        at.push(t);
        prev = t;
    }
    out.insert("init_to_ready".into(), json!(round(at[4] - at[2])));
    out.insert("total".into(), json!(round(at[4])));
    Ok(Value::Object(out))
}

fn round(s: f64) -> f64 {
    (s * 1000.0).round() / 1000.0
}
