//! OS update fixtures shared by the VM tests (`tests/os_update.rs`) and the benchmark
//! (`homeport-bench os-update`): later releases of this tree, a TUF repository holding one,
//! served over HTTP, and a device on version N serving an app, pointed at it.

use crate::{build_release, repo_root, Guest, GuestBuilder, Image, Owner, BOOT_TIMEOUT};
use anyhow::{Context, Result};
use homeport::os::OsStatus;
use homeport_testkit::StaticServer;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

pub const BOARD: &str = "qemu-x86_64";
pub const PAGE: &str = "hello from an app that outlives OS updates";
pub const HOST: &str = "hello-homeport.local";

/// A release of this tree with a later version, built once per process: `good`, or `bad`
/// (its health check fails: `homeport.fault=os-health`).
pub fn release(kind: &str) -> Result<&'static Image> {
    static GOOD: OnceLock<Image> = OnceLock::new();
    static BAD: OnceLock<Image> = OnceLock::new();
    static BUILDING: Mutex<()> = Mutex::new(());
    let (cell, bump, extra) = match kind {
        "good" => (&GOOD, 100, None),
        _ => (&BAD, 200, Some("homeport.fault=os-health")),
    };
    if let Some(i) = cell.get() {
        return Ok(i);
    }
    let _g = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = cell.get() {
        return Ok(i);
    }
    let base = Image::qemu()?;
    let sde = update_manifest(base)?["source_date_epoch"]
        .as_u64()
        .context("source_date_epoch")?;
    let mut env = vec![("SOURCE_DATE_EPOCH", (sde + bump).to_string())];
    if let Some(e) = extra {
        env.push(("HOMEPORT_CMDLINE_EXTRA", e.to_string()));
    }
    let out = repo_root()
        .join("target/image")
        .join(format!("{BOARD}-update-{kind}"));
    let image = build_release(BOARD, &out, &env)?;
    Ok(cell.get_or_init(|| image))
}

/// The image's `update.json` (what an update downloads).
pub fn update_manifest(image: &Image) -> Result<serde_json::Value> {
    let name = image.json["update_manifest"]
        .as_str()
        .context("image.json has no update_manifest")?;
    Ok(serde_json::from_slice(&std::fs::read(
        image.dir.join(name),
    )?)?)
}

/// A copy of the development repository (`target/homeport-repo`, made by scripts/image.sh,
/// whose 1.root.json the image trusts) with `release` published into it, served over HTTP.
pub struct Repo {
    _dir: tempfile::TempDir,
    server: StaticServer,
}

impl Repo {
    pub fn with(release: &Image) -> Result<Repo> {
        let dir = tempfile::tempdir()?;
        let repo = dir.path().join("repo");
        homeport_testkit::copy_dir(&repo_root().join("target/homeport-repo"), &repo)?;
        let manifest = release.dir.join(
            release.json["update_manifest"]
                .as_str()
                .context("update_manifest")?,
        );
        let keys = repo_root().join("target/homeport-keys");
        let expiry = homeport_release::Expiry::default();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(homeport_release::publish(&keys, &repo, &manifest, &expiry))
            .context("publish the release")?;
        let server = StaticServer::start(&repo)?;
        Ok(Repo { _dir: dir, server })
    }

    /// The repository's URL as the guest sees the host.
    pub fn guest_url(&self) -> String {
        format!("http://10.0.2.2:{}/", self.server.port())
    }
}

/// A device on version N serving an app from the host's registry, updates pointed at `repo`
/// (automatic checks off: the tests ask).
pub struct Device {
    pub guest: Guest,
    pub owner: Owner,
    _registry: homeport_testkit::Registry,
}

impl Device {
    pub fn start(repo: &Repo) -> Result<Device> {
        let image = Image::qemu()?;
        let registry = homeport_testkit::Registry::start()?;
        homeport_testkit::push_busybox(
            &registry,
            "hello",
            "1",
            &homeport_testkit::BusyboxOpts {
                index_html: PAGE.to_string(),
                ..Default::default()
            },
        )?;
        let port = registry
            .host()
            .rsplit_once(':')
            .map(|(_, p)| p.to_string())
            .context("registry host:port")?;
        let guest_registry = format!("10.0.2.2:{port}");
        // Room for the download spool beside the data.
        let mut guest = GuestBuilder::new(image).grow_disk(1 << 30).start()?;
        let ready = guest.wait_for_console("homeport: ready ", BOOT_TIMEOUT)?;
        assert_eq!(
            ready,
            format!("homeport: ready version={} slot=a", image.version)
        );
        let owner = Owner::from_console(&guest)?;
        let (status, body) = owner.put_json(
            &format!("/v1/registries/{guest_registry}"),
            &serde_json::json!({ "insecure": true }),
        )?;
        anyhow::ensure!(status == 200, "allow the test registry: {status} {body}");
        owner.install(&format!(
            "name = \"hello\"\nimage = \"{guest_registry}/hello:1\"\n[https]\nport = 8080\n"
        ))?;
        let (status, body) = owner.put_json(
            "/v1/os/config",
            &serde_json::json!({ "repository": repo.guest_url(), "automatic": false }),
        )?;
        anyhow::ensure!(status == 200, "configure updates: {status} {body}");
        let dev = Device {
            guest,
            owner,
            _registry: registry,
        };
        dev.served()?;
        Ok(dev)
    }

    /// Waits for the ready line of the next boot and checks it names `version` and `slot`.
    pub fn wait_ready(&mut self, version: &str, slot: &str) -> Result<()> {
        let ready = self
            .guest
            .wait_for_console("homeport: ready ", BOOT_TIMEOUT)?;
        assert_eq!(
            ready,
            format!("homeport: ready version={version} slot={slot}")
        );
        Ok(())
    }

    pub fn served(&self) -> Result<()> {
        let mut last = (0, String::new());
        for _ in 0..240 {
            if let Ok(r) = self.owner.app_get(&self.guest, HOST, "/") {
                if r.0 == 200 && r.1.contains(PAGE) {
                    return Ok(());
                }
                last = r;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let app = self
            .owner
            .get("/v1/apps/hello")
            .map_or_else(|e| format!("{e:#}"), |(s, b)| format!("{s} {b}"));
        anyhow::bail!(
            "https://{HOST}/ answers {} {}\nthe app: {app}\n--- console (last 60 lines) ---\n{}",
            last.0,
            last.1,
            self.guest.tail(60)
        )
    }

    pub fn status(&self) -> Result<OsStatus> {
        self.owner.get_json("/v1/os")
    }

    pub fn update_now(&self) -> Result<()> {
        let (status, body) = self
            .owner
            .post_json("/v1/os/update", &serde_json::json!({ "now": true }))?;
        anyhow::ensure!(status == 202, "POST /v1/os/update: {status} {body}");
        Ok(())
    }

    /// After a reboot inside QEMU or a restart: the owner's client again.
    pub fn reconnect(&mut self) -> Result<()> {
        self.owner = Owner::connect(&self.guest, &self.owner.token, &self.owner.fingerprint)?;
        Ok(())
    }
}
