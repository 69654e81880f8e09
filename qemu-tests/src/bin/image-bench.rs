//! The appliance image's benchmark: sizes, build times (cold: Debian root and all; warm:
//! assembly only) and boot times under TCG, split by what the console shows:
//!
//! - firmware: QEMU started → `EFI stub: Loaded initrd` (OVMF, systemd-boot, the UKI's stub);
//! - kernel: → `Loading, please wait...` (the kernel up to the initramfs' first words);
//! - initramfs: → `Begin: Running /scripts/init-bottom ... done.` (modules, root mounted, the
//!   data partition grown if needed; run-init then starts homeport-init);
//! - init to agent: → the agent's first log line (init's mounts, /data, the agent's exec);
//! - agent to ready: → `homeport: ready` (the agent's own start).
//!
//! Times are host-side arrival times of console lines (10 ms polling).
//! Writes `target/bench/image.json` and prints it.
//!
//!   homeport-image-bench [--boots N] [--no-build] [--no-cold]

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

fn main() {
    if let Err(e) = run() {
        eprintln!("image-bench: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut boots = 3usize;
    let mut build = true;
    let mut cold = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--boots" => boots = args.next().context("--boots N")?.parse()?,
            "--no-build" => build = false,
            "--no-cold" => cold = false,
            other => bail!("unknown argument {other} (--boots N, --no-build, --no-cold)"),
        }
    }
    let mut builds = serde_json::Map::new();
    if build && cold {
        // A fresh package cache folder: mmdebstrap, kernel, initramfs, everything.
        let cache = tempfile::Builder::new()
            .prefix("homeport-image-cold-")
            .tempdir_in("/var/tmp")?;
        let s = timed_build(&[("HOMEPORT_IMAGE_CACHE", cache.path().to_str().unwrap_or(""))])?;
        builds.insert("cold".into(), json!(s));
    }
    if build {
        let s = timed_build(&[])?;
        builds.insert("warm".into(), json!(s));
    }
    let image = Image::load(&repo_root().join("target/image").join(BOARD))?;
    builds.insert("last_build_steps".into(), image.json["seconds"].clone());

    // First boot on a fresh disk (the agent makes its CA, token and database), then warm
    // boots of the same disk.
    let mut runs = Vec::new();
    let mut guest = GuestBuilder::new(&image).no_reboot(true).start()?;
    for i in 0..boots.max(1) {
        if i > 0 {
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
        let mut v: Vec<f64> = warm.iter().filter_map(|r| r[key].as_f64()).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
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
    let report = json!({
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
        },
        "targets": {
            "image_zst_max_bytes": IMAGE_ZST_MAX,
            "image_zst_met": image_zst <= IMAGE_ZST_MAX,
            "init_to_ready_max_seconds": INIT_TO_READY_MAX,
            "init_to_ready_met": init_to_ready <= INIT_TO_READY_MAX,
        },
    });
    let dir = repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(dir.join("image.json"), format!("{text}\n"))?;
    println!("{text}");
    eprintln!("written to {}", dir.join("image.json").display());
    Ok(())
}

/// `scripts/image.sh` with the build forced to run (the binaries are built when stale).
fn timed_build(env: &[(&str, &str)]) -> Result<f64> {
    let start = Instant::now();
    let status = Command::new(repo_root().join("scripts/image.sh"))
        .arg(BOARD)
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
