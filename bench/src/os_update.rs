//! `homeport-bench os-update`: a signed A/B OS update under QEMU (TCG), N → N+1 of this tree
//! (`homeport_qemu_tests::update`): what is downloaded (against reflashing the whole
//! `.img.zst`, what a user of an image-based OS without updates does, and against a
//! `zstd --patch-from` delta of the root between the two builds), how long checking and
//! downloading, writing the slot, and the downtime (the reboot until the app serves again
//! through the proxy) take. Times are host-side arrival times of console lines, except the
//! downtime's end (an HTTPS request through the forwarded port). Writes
//! `target/bench/os-update.json`. Not part of `all` (builds a release, boots QEMU: ~5 min).

use anyhow::{Context, Result};
use homeport_qemu_tests::update::{release, update_manifest, Device, Repo};
use homeport_qemu_tests::{Image, BOOT_TIMEOUT};
use serde_json::json;
use std::process::Command;
use std::time::Instant;

pub fn os_update() -> Result<()> {
    let base = Image::qemu()?;
    let next = release("good")?;
    let manifest = update_manifest(next)?;
    let art = |k: &str, f: &str| manifest["artifacts"][k][f].as_u64().unwrap_or(0);
    let download = art("root", "compressed_size") + art("uki-b", "compressed_size");
    let image_zst = next.json["bytes"]["image_zst"].as_u64().unwrap_or(0);
    let delta = root_delta(base, next).ok();

    let repo = Repo::with(next)?;
    let mut dev = Device::start(&repo)?;
    dev.guest.mark();
    let asked = Instant::now();
    dev.update_now()?;
    let at = |dev: &mut Device, pattern: &str| -> Result<f64> {
        dev.guest.wait_for_console(pattern, BOOT_TIMEOUT)?;
        Ok(asked.elapsed().as_secs_f64())
    };
    let writing = at(&mut dev, "homeport: os-update writing slot=b")?;
    let staged = at(&mut dev, "homeport: os-update staged slot=b")?;
    let rebooting = at(&mut dev, "homeport: os-update rebooting into slot=b")?;
    dev.guest
        .wait_for_console("homeport-init: reboot now", BOOT_TIMEOUT)?;
    dev.guest.mark();
    let ready = at(&mut dev, "homeport: ready ")?;
    dev.reconnect()?;
    dev.served()?;
    let serving = asked.elapsed().as_secs_f64();
    let committed = at(&mut dev, "homeport: os-update committed slot=b")?;
    let st = dev.status()?;
    anyhow::ensure!(
        st.version.as_deref() == Some(next.version.as_str()),
        "the device did not end on N+1: {st:?}"
    );
    let mut out = json!({
        "what": "signed A/B OS update N -> N+1 under QEMU TCG (2 vCPUs on a 2-core host), one app running",
        "from": base.version,
        "to": next.version,
        "download_bytes": download,
        "root_bytes": art("root", "size"),
        "reflash_image_zst_bytes": image_zst,
        "reflash_over_update_download": ratio(image_zst, download),
        "seconds": {
            "check_and_download": writing,
            "write_slot": staged - writing,
            "downtime_reboot_to_app_serving": serving - rebooting,
            "reboot_to_ready": ready - rebooting,
            "reboot_to_committed": committed - rebooting,
        },
    });
    if let Some((bytes, secs)) = delta {
        out["root_delta_patch_from_bytes"] = json!(bytes);
        out["root_delta_seconds"] = json!(secs);
        out["update_download_over_delta"] = json!(ratio(download, bytes));
    }
    crate::report("os-update", out)
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        (a as f64 / b as f64 * 100.0).round() / 100.0
    }
}

/// `zstd -3 --patch-from` of N+1's root against N's (what a delta update would download):
/// bytes and seconds to make it.
fn root_delta(old: &Image, new: &Image) -> Result<(u64, f64)> {
    let (a, b) = (
        old.dir.join("work/root.erofs"),
        new.dir.join("work/root.erofs"),
    );
    anyhow::ensure!(a.exists() && b.exists(), "no uncompressed roots to compare");
    let out = tempfile::NamedTempFile::new()?;
    let t = Instant::now();
    let status = Command::new("zstd")
        .args(["-q", "-f", "-3", "--long=28"])
        .arg(format!("--patch-from={}", a.display()))
        .arg(&b)
        .arg("-o")
        .arg(out.path())
        .status()
        .context("run zstd --patch-from")?;
    anyhow::ensure!(status.success(), "zstd --patch-from: {status}");
    Ok((
        std::fs::metadata(out.path())?.len(),
        t.elapsed().as_secs_f64(),
    ))
}
