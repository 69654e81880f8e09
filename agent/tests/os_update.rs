//! The device's OS update client against real TUF repositories made by the release tool
//! (`homeport-release`) and served over HTTP by a real static file server (Python's
//! `http.server`, as any static host would): good releases are staged into the inactive
//! slot and blessed after a health check; attacks and failures are refused with their reason
//! and leave the slot, the boot entries and the running system as they were.
//!
//! The slots are files and the ESP a folder here; the QEMU tests (`qemu-tests/tests/
//! os_update.rs`) do the same with real partitions, firmware and reboots.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use homeport::os::boot::{Esp, Slot};
use homeport::os::{Health, OsConfig, OsError, Platform, Updater};
use homeport::store::Store;
use homeport_release::{Expires, Expiry, InitOptions};

const BOARD: &str = "qemu-x86_64";
const RUNNING: &str = "0.1.0.100";
/// What the inactive slot holds before an update: must survive every refused one.
const OLD_SLOT: u8 = 0x5a;
const SLOT_BYTES: usize = 8 << 20;

/// A release side (keys, repository, its server) and a device (slots, ESP, state).
struct Bench {
    dir: tempfile::TempDir,
    server: homeport_testkit::StaticServer,
}

impl Bench {
    async fn new() -> Result<Bench> {
        let dir = tempfile::tempdir()?;
        let keys = dir.path().join("keys");
        let repo = dir.path().join("repo");
        homeport_release::keygen(&keys)?;
        homeport_release::init(&keys, &repo, &InitOptions::default()).await?;
        let server = homeport_testkit::StaticServer::start(&repo)?;
        Ok(Bench { dir, server })
    }
    fn keys(&self) -> PathBuf {
        self.dir.path().join("keys")
    }
    fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    /// Publishes `version` with distinct contents; returns (root, uki-b) contents.
    async fn publish(&self, version: &str, expiry: &Expiry) -> Result<(Vec<u8>, Vec<u8>)> {
        let root = content(version, "root", 3 << 20);
        let uki_a = content(version, "uki-a", 64 << 10);
        let uki_b = content(version, "uki-b", 64 << 10);
        let out = self.dir.path().join("builds").join(version);
        let json =
            homeport_release::testing::fake_update(&out, BOARD, version, &root, &uki_a, &uki_b)?;
        homeport_release::publish(&self.keys(), &self.repo(), &json, expiry).await?;
        Ok((root, uki_b))
    }

    /// A device running `version` in `slot`, with its data under `name`.
    fn device(&self, name: &str, slot: Slot, version: &str) -> Result<Device> {
        let d = self.dir.path().join(name);
        let esp = d.join("esp");
        std::fs::create_dir_all(esp.join("EFI/Linux"))?;
        if !d.join("root-b").exists() {
            std::fs::write(d.join("root-a"), vec![0u8; SLOT_BYTES])?;
            std::fs::write(d.join("root-b"), vec![OLD_SLOT; SLOT_BYTES])?;
            std::fs::write(esp.join("EFI/Linux/homeport-a.efi"), b"slot a's UKI")?;
        }
        let root_json = self.repo().join("1.root.json");
        let reboots = Arc::new(AtomicU32::new(0));
        let r = reboots.clone();
        let platform = Platform {
            board: BOARD.into(),
            version: version.parse()?,
            slot,
            esp: esp.clone(),
            esp_remount: false,
            root_a: d.join("root-a"),
            root_b: d.join("root-b"),
            trusted_root: root_json,
            reboot: Arc::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            }),
            fail_health: false,
        };
        let store = Arc::new(Store::open(&d.join("state.db"))?);
        let updater = Updater::new(Some(platform), store, &d);
        updater.set_config(&OsConfig {
            repository: Some(self.server.url()),
            commit_timeout_secs: 10,
            ..OsConfig::default()
        })?;
        Ok(Device {
            dir: d,
            esp: Esp::new(&esp),
            updater,
            reboots,
        })
    }
}

struct Device {
    dir: PathBuf,
    esp: Esp,
    updater: Updater,
    reboots: Arc<AtomicU32>,
}

impl Device {
    fn slot_b(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("root-b")).unwrap_or_default()
    }
    fn entries(&self) -> Vec<String> {
        self.esp
            .entries()
            .unwrap_or_default()
            .iter()
            .map(|e| {
                e.path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }
    /// Nothing changed: slot b as before, slot a's entry alone, no spool left.
    fn assert_untouched(&self) {
        let b = self.slot_b();
        assert_eq!(b.len(), SLOT_BYTES);
        assert!(b.iter().all(|&x| x == OLD_SLOT), "slot b was written");
        assert_eq!(self.entries(), ["homeport-a.efi"]);
        assert!(
            !self.dir.join("os-update/spool").exists(),
            "spool left behind"
        );
        assert_eq!(self.reboots.load(Ordering::SeqCst), 0);
    }
}

fn content(version: &str, what: &str, len: usize) -> Vec<u8> {
    let seed = format!("{what} of {version} ");
    seed.bytes().cycle().take(len).collect()
}

fn week() -> Expiry {
    Expiry {
        targets: Expires::days(7),
        snapshot: Expires::days(7),
        timestamp: Expires::days(7),
    }
}

struct Healthy(bool);

#[tough::async_trait]
impl Health for Healthy {
    async fn check(&self, apps: &[String]) -> Result<(), String> {
        assert_eq!(apps, ["wiki"], "the apps that ran before the reboot");
        if self.0 {
            Ok(())
        } else {
            Err("app wiki does not run (Restarting)".into())
        }
    }
}

fn failure(e: OsError) -> String {
    e.to_string()
}

/// A good update: staged into slot b with a boot counter, rebooted into, health-checked and
/// blessed. A failed one: rebooted until the loader gives up, then recorded on slot a and
/// never tried again.
#[tokio::test]
async fn updates_stage_commit_and_roll_back() -> Result<()> {
    let bench = Bench::new().await?;
    let (root, uki_b) = bench.publish("0.1.0.200", &week()).await?;
    let dev = bench.device("dev", Slot::A, RUNNING)?;

    let staged = dev.updater.check_and_stage().await?;
    assert_eq!(staged.map(|v| v.to_string()).as_deref(), Some("0.1.0.200"));
    let b = dev.slot_b();
    assert_eq!(&b[..root.len()], &root[..], "slot b holds the new root");
    assert_eq!(dev.entries(), ["homeport-a.efi", "homeport-b+3.efi"]);
    assert_eq!(std::fs::read(dev.esp.entry(Slot::B)?.unwrap().path)?, uki_b);
    let st = dev.updater.status()?;
    let pending = st.pending.context("pending")?;
    assert_eq!(
        (pending.version.to_string(), pending.slot),
        ("0.1.0.200".into(), Slot::B)
    );
    assert!(st
        .last_check
        .is_some_and(|l| l.ok && l.message.contains("staged")));
    assert_eq!(st.other.unwrap().state, "on-trial");
    // Checking again finds nothing newer and keeps what is staged.
    assert_eq!(
        dev.updater
            .check_and_stage()
            .await?
            .map(|v| v.to_string())
            .as_deref(),
        Some("0.1.0.200")
    );

    // The reboot (the apps that run are recorded), and the loader's rename on boot.
    set_pending_apps(&dev, &["wiki"])?;
    let boot_b = |name: &str| -> Result<()> {
        let e = dev.esp.entry(Slot::B)?.context("slot b's entry")?;
        std::fs::rename(&e.path, e.path.with_file_name(name))?;
        Ok(())
    };
    boot_b("homeport-b+2-1.efi")?;

    // On slot b, unhealthy: recorded, and a reboot asked for.
    let on_b = bench.device("dev", Slot::B, "0.1.0.200")?;
    on_b.updater.settle_boot(&Healthy(false)).await?;
    assert_eq!(on_b.reboots.load(Ordering::SeqCst), 1);
    let st = on_b.updater.status()?;
    assert!(st.on_trial);
    assert_eq!(
        st.pending.as_ref().and_then(|p| p.last_failure.as_deref()),
        Some("app wiki does not run (Restarting)")
    );
    assert!(st
        .last_check
        .is_some_and(|l| !l.ok && l.message.contains("failed its health check")));

    // Healthy on the next boot: blessed.
    boot_b("homeport-b+1-2.efi")?;
    on_b.updater.settle_boot(&Healthy(true)).await?;
    assert_eq!(on_b.reboots.load(Ordering::SeqCst), 1, "no further reboot");
    assert_eq!(on_b.entries(), ["homeport-a.efi", "homeport-b.efi"]);
    let st = on_b.updater.status()?;
    assert!(!st.on_trial && st.pending.is_none());
    assert!(st
        .last_check
        .is_some_and(|l| l.ok && l.message.contains("committed")));
    Ok(())
}

/// The loader gave up on slot b (`+0`): slot a's agent records why, refuses the version and
/// removes the bad entry; the next check does not stage it again.
#[tokio::test]
async fn a_failed_slot_is_recorded_and_refused() -> Result<()> {
    let bench = Bench::new().await?;
    bench.publish("0.1.0.200", &week()).await?;
    let dev = bench.device("dev", Slot::A, RUNNING)?;
    dev.updater.check_and_stage().await?;
    set_pending_apps(&dev, &["wiki"])?;
    let e = dev.esp.entry(Slot::B)?.context("entry")?;
    std::fs::rename(&e.path, e.path.with_file_name("homeport-b+1-2.efi"))?;
    let on_b = bench.device("dev", Slot::B, "0.1.0.200")?;
    on_b.updater.settle_boot(&Healthy(false)).await?;
    let e = dev.esp.entry(Slot::B)?.context("entry")?;
    std::fs::rename(&e.path, e.path.with_file_name("homeport-b+0-3.efi"))?;

    let back = bench.device("dev", Slot::A, RUNNING)?;
    back.updater.settle_boot(&Healthy(true)).await?;
    let st = back.updater.status()?;
    assert_eq!(back.entries(), ["homeport-a.efi"]);
    assert!(st.pending.is_none());
    assert_eq!(st.refused.len(), 1);
    assert_eq!(st.refused[0].version.to_string(), "0.1.0.200");
    assert!(
        st.refused[0].reason.contains("app wiki does not run"),
        "{}",
        st.refused[0].reason
    );
    assert!(st
        .last_check
        .is_some_and(|l| !l.ok && l.message.contains("rolled back")));
    assert_eq!(
        back.updater.check_and_stage().await?,
        None,
        "not tried again"
    );
    assert!(back
        .updater
        .status()?
        .last_check
        .is_some_and(|l| l.ok && l.message == "up to date"));
    Ok(())
}

fn set_pending_apps(dev: &Device, apps: &[&str]) -> Result<()> {
    let store = Store::open(&dev.dir.join("state.db"))?;
    let text = store.setting("os.pending")?.context("os.pending")?;
    let mut v: serde_json::Value = serde_json::from_str(&text)?;
    v["apps"] = serde_json::json!(apps);
    store.set_setting("os.pending", &v.to_string())?;
    Ok(())
}

/// Attacks and failures: each refused with its reason; slot b, the boot entries and the
/// running system stay as they were.
#[tokio::test]
async fn attacks_and_failures_leave_the_device_untouched() -> Result<()> {
    // Expired timestamp (a freeze attack: old metadata served past its expiry).
    let bench = Bench::new().await?;
    let past = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1);
    bench
        .publish(
            "0.1.0.200",
            &Expiry {
                timestamp: Expires::At(past),
                ..week()
            },
        )
        .await?;
    let dev = bench.device("expired", Slot::A, RUNNING)?;
    let e = failure(dev.updater.check_and_stage().await.unwrap_err());
    assert!(e.starts_with("expired metadata: timestamp"), "{e}");
    dev.assert_untouched();
    let st = dev.updater.status()?;
    assert!(st.last_check.is_some_and(|l| !l.ok && l.message == e));

    // Wrong signature: the timestamp's signed part altered after signing.
    let bench = Bench::new().await?;
    bench.publish("0.1.0.200", &week()).await?;
    let ts = bench.repo().join("timestamp.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&ts)?)?;
    v["signed"]["expires"] = serde_json::json!("2099-01-01T00:00:00Z");
    std::fs::write(&ts, serde_json::to_vec(&v)?)?;
    let dev = bench.device("forged", Slot::A, RUNNING)?;
    let e = failure(dev.updater.check_and_stage().await.unwrap_err());
    assert!(e.starts_with("bad signature: "), "{e}");
    dev.assert_untouched();

    // Rollback: after the device saw the newest metadata, the server serves an older,
    // validly signed copy of the repository.
    let bench = Bench::new().await?;
    bench.publish("0.1.0.50", &week()).await?;
    let old = bench.dir.path().join("repo-old");
    homeport_testkit::copy_dir(&bench.repo(), &old)?;
    bench.publish("0.1.0.60", &week()).await?;
    let dev = bench.device("rollback", Slot::A, RUNNING)?;
    // Both releases are older than what runs: nothing to do, but the metadata is trusted.
    assert_eq!(dev.updater.check_and_stage().await?, None);
    dev.assert_untouched();
    std::fs::remove_dir_all(bench.repo())?;
    std::fs::rename(&old, bench.repo())?;
    let e = failure(dev.updater.check_and_stage().await.unwrap_err());
    assert!(e.starts_with("rollback attempt: "), "{e}");
    dev.assert_untouched();

    // A target whose bytes do not match its signed hash (same length).
    let bench = Bench::new().await?;
    bench.publish("0.1.0.200", &week()).await?;
    let target = find_file(&bench.repo().join("targets"), "root.erofs.zst")?;
    let mut bytes = std::fs::read(&target)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&target, &bytes)?;
    let dev = bench.device("tampered", Slot::A, RUNNING)?;
    let e = failure(dev.updater.check_and_stage().await.unwrap_err());
    assert!(e.starts_with("hash mismatch: "), "{e}");
    dev.assert_untouched();

    // The slot is too small for the release.
    let bench = Bench::new().await?;
    bench.publish("0.1.0.200", &week()).await?;
    let dev = bench.device("small", Slot::A, RUNNING)?;
    std::fs::write(dev.dir.join("root-b"), vec![OLD_SLOT; 1 << 20])?;
    let e = failure(dev.updater.check_and_stage().await.unwrap_err());
    assert!(e.starts_with("disk too small: slot b"), "{e}");
    assert!(dev.slot_b().iter().all(|&x| x == OLD_SLOT) && dev.slot_b().len() == 1 << 20);
    assert_eq!(dev.entries(), ["homeport-a.efi"]);

    // The server is down.
    let dev = bench.device("offline", Slot::A, RUNNING)?;
    drop(bench.server);
    let e = failure(dev.updater.check_and_stage().await.unwrap_err());
    assert!(e.starts_with("repository unreachable: "), "{e}");
    dev.assert_untouched();
    Ok(())
}

/// Settings are validated and kept; the API-level errors name what is missing.
#[tokio::test]
async fn settings_and_missing_pieces_have_clear_errors() -> Result<()> {
    let bench = Bench::new().await?;
    let dev = bench.device("cfg", Slot::A, RUNNING)?;
    let bad = OsConfig {
        window: "3-5".into(),
        ..OsConfig::default()
    };
    let e = dev.updater.set_config(&bad).unwrap_err().to_string();
    assert!(e.contains("window \"3-5\""), "{e}");
    assert_eq!(
        dev.updater.config()?.repository.as_deref(),
        Some(bench.server.url().as_str()),
        "the old settings stay"
    );
    dev.updater.set_config(&OsConfig::default())?;
    let e = dev.updater.check_and_stage().await.unwrap_err().to_string();
    assert!(e.contains("no update repository is configured"), "{e}");

    let host = Updater::new(
        None,
        Arc::new(Store::open(&bench.dir.path().join("h.db"))?),
        bench.dir.path(),
    );
    let e = host.check_and_stage().await.unwrap_err().to_string();
    assert_eq!(e, "OS updates are only possible on the appliance");
    assert!(!host.status()?.appliance);
    Ok(())
}

fn find_file(dir: &Path, suffix: &str) -> Result<PathBuf> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            if let Ok(p) = find_file(&e.path(), suffix) {
                return Ok(p);
            }
        } else if e.file_name().to_string_lossy().ends_with(suffix) {
            return Ok(e.path());
        }
    }
    anyhow::bail!("no file ending in {suffix} under {}", dir.display())
}
