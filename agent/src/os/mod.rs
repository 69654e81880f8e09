//! Signed A/B OS updates of the appliance.
//!
//! 1. **Check** (on a schedule with jitter, or on request): the repository's TUF metadata
//!    is verified against the root baked into the image ([`repo`]); the newest release for
//!    this board, newer than what runs and not refused before, is picked.
//! 2. **Stage**: the inactive slot's boot entry is removed first (the loader can then never
//!    boot a half-written slot); root image and UKI are downloaded into spool files on the
//!    data partition, verified by tough; the root is decompressed into the inactive
//!    partition (length and hash checked again); the UKI is installed as
//!    `homeport-<slot>+3.efi` (three tries). A power cut before the last rename leaves the
//!    running slot the only one; after it, the new slot boots on trial.
//! 3. **Reboot** in the maintenance window (or at once for `update --now`), after
//!    recording which apps run.
//! 4. **Commit** on the new slot: the health check (the API answers, the network has a
//!    default route, PostgreSQL and caches answer, the proxy serves, every app that ran
//!    runs) must pass within the commit timeout; then the entry is blessed. If it fails,
//!    the device reboots; after three tries the loader falls back to the old slot, whose
//!    agent finds the other entry bad, records the failure and refuses that version.
//!
//! Everything is recorded in the state database's settings: `os.config`, `os.pending`,
//! `os.last`, `os.refused`.

pub mod boot;
pub mod repo;
pub mod version;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::Store;
use boot::{Esp, Slot};
use version::ImageVersion;

/// Boots a new slot gets before the loader gives up on it.
pub const TRIES: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum OsError {
    #[error("OS updates are only possible on the appliance")]
    NotAppliance,
    #[error(
        "no trusted root metadata at {path} (the image was built without HOMEPORT_UPDATE_ROOT)"
    )]
    NoTrustedRoot {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no update repository is configured (PUT /v1/os/config with a repository URL)")]
    NoRepository,
    #[error("invalid OS update settings: {0}")]
    Config(String),
    #[error("{kind}: {detail}")]
    Repository { kind: &'static str, detail: String },
    #[error("bad release: {0}")]
    Release(String),
    #[error("disk too small: {what} needs {need} bytes, has {have}")]
    DiskTooSmall { what: String, need: u64, have: u64 },
    #[error("{0}")]
    Io(String),
    #[error("an update is already in progress")]
    Busy,
    #[error("state database: {0}")]
    Store(#[from] crate::store::StoreError),
}

impl OsError {
    fn io(path: &Path, e: std::io::Error) -> OsError {
        OsError::Io(format!("{}: {e}", path.display()))
    }
}

/// What the running device is, as far as updates go.
#[derive(Clone)]
pub struct Platform {
    pub board: String,
    pub version: ImageVersion,
    pub slot: Slot,
    /// Where the EFI system partition is mounted.
    pub esp: PathBuf,
    /// The ESP is a mount of its own, kept read-only but for the moments an entry changes
    /// (a FAT mounted read-write is marked dirty, and a power cut then may corrupt it).
    pub esp_remount: bool,
    /// The slots' partitions (block devices, or files in tests).
    pub root_a: PathBuf,
    pub root_b: PathBuf,
    /// The TUF root metadata the image trusts.
    pub trusted_root: PathBuf,
    /// Carries out a reboot (asks init on the appliance).
    pub reboot: Arc<dyn Fn() + Send + Sync>,
    /// `homeport.fault=os-health` on the kernel command line: the health check fails (to
    /// test rollback with a real boot of a release that is otherwise good).
    pub fail_health: bool,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("board", &self.board)
            .field("version", &self.version)
            .field("slot", &self.slot)
            .field("esp", &self.esp)
            .finish_non_exhaustive()
    }
}

impl Platform {
    pub fn partition(&self, slot: Slot) -> &Path {
        match slot {
            Slot::A => &self.root_a,
            Slot::B => &self.root_b,
        }
    }

    /// The appliance's platform: partitions by GPT name, the ESP mounted at
    /// `/run/homeport/esp`, the root key from the image.
    pub fn detect(a: &crate::appliance::Appliance) -> Result<Platform, OsError> {
        let missing =
            |what: &str| OsError::Config(format!("the appliance does not say its {what}"));
        let board = a
            .board
            .clone()
            .ok_or_else(|| missing("board (HOMEPORT_BOARD)"))?;
        let version: ImageVersion = a
            .version
            .parse()
            .map_err(|e: version::BadVersion| OsError::Config(e.to_string()))?;
        let slot = a
            .slot
            .as_deref()
            .and_then(Slot::parse)
            .ok_or_else(|| missing("boot slot (homeport.slot=)"))?;
        let sys = Path::new("/sys/class/block");
        let part = |label: &str| {
            boot::partition_by_label(sys, label)
                .map_err(|e| OsError::io(sys, e))?
                .ok_or_else(|| OsError::Config(format!("no partition named {label}")))
        };
        let esp_dev = part("esp")?;
        let esp = PathBuf::from("/run/homeport/esp");
        mount_esp(&esp_dev, &esp)?;
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        Ok(Platform {
            board,
            version,
            slot,
            esp,
            esp_remount: true,
            root_a: part("root-a")?,
            root_b: part("root-b")?,
            trusted_root: PathBuf::from("/usr/share/homeport/update/root.json"),
            reboot: Arc::new(|| {
                use crate::appliance::{request_shutdown, ShutdownKind};
                if let Err(e) = request_shutdown(ShutdownKind::Reboot) {
                    tracing::error!(error = %e, "cannot reboot into the other slot");
                }
            }),
            fail_health: cmdline
                .split_whitespace()
                .any(|w| w == "homeport.fault=os-health"),
        })
    }
}

fn mount_esp(dev: &Path, at: &Path) -> Result<(), OsError> {
    use nix::mount::{mount, MsFlags};
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*at.to_string_lossy()));
    if mounted {
        return Ok(());
    }
    std::fs::create_dir_all(at).map_err(|e| OsError::io(at, e))?;
    mount(
        Some(dev),
        at,
        Some("vfat"),
        ESP_FLAGS | MsFlags::MS_RDONLY,
        Some(ESP_OPTIONS),
    )
    .map_err(|e| {
        OsError::Io(format!(
            "mount the ESP {} at {}: {e}",
            dev.display(),
            at.display()
        ))
    })
}

const ESP_FLAGS: nix::mount::MsFlags = nix::mount::MsFlags::MS_NOSUID
    .union(nix::mount::MsFlags::MS_NODEV)
    .union(nix::mount::MsFlags::MS_NOEXEC);
const ESP_OPTIONS: &str = "umask=0077,flush";

impl Platform {
    /// Runs `f` with the ESP writable, and makes it read-only again afterwards.
    pub fn with_esp_writable<T>(
        &self,
        what: &str,
        f: impl FnOnce(&Esp) -> std::io::Result<T>,
    ) -> Result<T, OsError> {
        use nix::mount::{mount, MsFlags};
        let remount = |ro: bool| {
            let flags = ESP_FLAGS
                | MsFlags::MS_REMOUNT
                | if ro {
                    MsFlags::MS_RDONLY
                } else {
                    MsFlags::empty()
                };
            mount(
                None::<&str>,
                &self.esp,
                None::<&str>,
                flags,
                Some(ESP_OPTIONS),
            )
            .map_err(|e| {
                OsError::Io(format!(
                    "remount the ESP {} {}: {e}",
                    self.esp.display(),
                    if ro { "read-only" } else { "read-write" }
                ))
            })
        };
        if self.esp_remount {
            remount(false)?;
        }
        let r = f(&Esp::new(&self.esp)).map_err(|e| OsError::Io(format!("{what}: {e}")));
        if self.esp_remount {
            remount(true)?;
        }
        r
    }
}

/// Starts of the agent on a slot on trial before the device gives up on it: an agent that
/// dies before its health check can run would otherwise keep the device on a broken slot.
pub const MAX_STARTS_ON_TRIAL: u32 = 4;

/// Counts the agent's starts in this boot (`counter` lives on a tmpfs); on a slot on trial
/// that has seen [`MAX_STARTS_ON_TRIAL`] starts, reboots, so the loader's counter runs down.
pub fn guard_crash_loop(p: &Platform, counter: &Path) {
    let starts = std::fs::read_to_string(counter)
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .unwrap_or(0)
        + 1;
    if let Some(dir) = counter.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::write(counter, starts.to_string());
    let on_trial = Esp::new(&p.esp)
        .entry(p.slot)
        .ok()
        .flatten()
        .is_some_and(|e| e.on_trial());
    if on_trial && starts > MAX_STARTS_ON_TRIAL {
        println!(
            "homeport: os-update slot={} on trial and the agent started {starts} times: rebooting",
            p.slot
        );
        (p.reboot)();
    }
}

/// The owner's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OsConfig {
    /// The repository's base URL; no checks without one.
    #[serde(default)]
    pub repository: Option<String>,
    /// Look for updates on a schedule (and reboot into them in the window).
    #[serde(default = "yes")]
    pub automatic: bool,
    /// Seconds between checks, plus a random delay of up to `jitter_secs`.
    #[serde(default = "default_every")]
    pub check_every_secs: u64,
    #[serde(default = "default_jitter")]
    pub jitter_secs: u64,
    /// When a staged update may reboot the device, `HH:MM-HH:MM` in UTC.
    #[serde(default = "default_window")]
    pub window: String,
    /// How long the health check of a new slot may take before it counts as failed.
    #[serde(default = "default_commit_timeout")]
    pub commit_timeout_secs: u64,
}

fn yes() -> bool {
    true
}
fn default_every() -> u64 {
    6 * 3600
}
fn default_jitter() -> u64 {
    3600
}
fn default_window() -> String {
    "03:00-05:00".to_string()
}
fn default_commit_timeout() -> u64 {
    600
}

impl Default for OsConfig {
    fn default() -> Self {
        OsConfig {
            repository: None,
            automatic: true,
            check_every_secs: default_every(),
            jitter_secs: default_jitter(),
            window: default_window(),
            commit_timeout_secs: default_commit_timeout(),
        }
    }
}

impl OsConfig {
    pub fn validate(&self) -> Result<(), OsError> {
        if let Some(r) = &self.repository {
            let u = url::Url::parse(r)
                .map_err(|e| OsError::Config(format!("repository {r:?}: {e}")))?;
            if !matches!(u.scheme(), "http" | "https" | "file") {
                return Err(OsError::Config(format!(
                    "repository {r:?}: only http, https and file URLs"
                )));
            }
        }
        if self.check_every_secs < 60 {
            return Err(OsError::Config("check_every_secs is at least 60".into()));
        }
        if !(10..=86400).contains(&self.commit_timeout_secs) {
            return Err(OsError::Config(
                "commit_timeout_secs is between 10 and 86400".into(),
            ));
        }
        Window::parse(&self.window)?;
        Ok(())
    }
}

/// A daily time window in UTC, in minutes after midnight; may wrap past midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    start: u32,
    end: u32,
}

impl Window {
    pub fn parse(s: &str) -> Result<Window, OsError> {
        let bad = || OsError::Config(format!("window {s:?} is not HH:MM-HH:MM (UTC)"));
        let hm = |t: &str| -> Option<u32> {
            let (h, m) = t.split_once(':')?;
            if h.len() != 2 || m.len() != 2 {
                return None;
            }
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (start, end) = (hm(a).ok_or_else(bad)?, hm(b).ok_or_else(bad)?);
        if start == end {
            return Err(bad());
        }
        Ok(Window { start, end })
    }

    pub fn contains(&self, unix: i64) -> bool {
        let m = (unix.rem_euclid(86400) / 60) as u32;
        if self.start < self.end {
            (self.start..self.end).contains(&m)
        } else {
            m >= self.start || m < self.end
        }
    }

    /// The next time the window opens at or after `unix` (`unix` itself if open).
    pub fn next_open(&self, unix: i64) -> i64 {
        if self.contains(unix) {
            return unix;
        }
        let day = unix - unix.rem_euclid(86400);
        let start = day + i64::from(self.start) * 60;
        if start > unix {
            start
        } else {
            start + 86400
        }
    }
}

/// An update staged in (or booted from) the other slot, not yet committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub version: ImageVersion,
    pub slot: Slot,
    /// Apps running when the device rebooted into it; they must run again.
    #[serde(default)]
    pub apps: Vec<String>,
    pub staged_at: i64,
    /// Set when the device rebooted into it.
    #[serde(default)]
    pub rebooted_at: Option<i64>,
    /// Why the last health check of the new slot failed.
    #[serde(default)]
    pub last_failure: Option<String>,
}

/// The last check's or update's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub at: i64,
    pub ok: bool,
    pub message: String,
}

/// A version that failed on this device and is never tried again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub version: ImageVersion,
    pub at: i64,
    pub reason: String,
}

/// What `GET /v1/os` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OsStatus {
    pub appliance: bool,
    pub board: Option<String>,
    pub slot: Option<Slot>,
    pub version: Option<String>,
    /// What the other slot holds: its version and whether it is `committed`, `on-trial`,
    /// `failed`, or `empty` (no boot entry).
    pub other: Option<SlotInfo>,
    /// The running slot has not been committed yet (health check in progress).
    pub on_trial: bool,
    /// What the updater is doing now: `idle`, `checking`, `downloading`, `writing`,
    /// `staged`, `rebooting`, `committing`.
    pub activity: String,
    pub pending: Option<Pending>,
    pub last_check: Option<Outcome>,
    pub next_check: Option<i64>,
    pub next_window: Option<i64>,
    pub refused: Vec<Refused>,
    pub config: OsConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlotInfo {
    pub slot: Slot,
    pub version: Option<String>,
    pub state: String,
}

struct Live {
    activity: &'static str,
    next_check: Option<i64>,
}

pub struct Updater {
    platform: Option<Platform>,
    store: Arc<Store>,
    /// `DATA/os-update`: the TUF datastore and download spool.
    dir: PathBuf,
    client: reqwest::Client,
    live: Mutex<Live>,
    wake: tokio::sync::Notify,
    busy: tokio::sync::Mutex<()>,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Updater {
    pub fn new(platform: Option<Platform>, store: Arc<Store>, data: &Path) -> Updater {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(20))
            .read_timeout(Duration::from_secs(60))
            .build()
            .unwrap_or_default();
        Updater {
            platform,
            store,
            dir: data.join("os-update"),
            client,
            live: Mutex::new(Live {
                activity: "idle",
                next_check: None,
            }),
            wake: tokio::sync::Notify::new(),
            busy: tokio::sync::Mutex::new(()),
        }
    }

    fn platform(&self) -> Result<&Platform, OsError> {
        self.platform.as_ref().ok_or(OsError::NotAppliance)
    }

    fn get<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, OsError> {
        match self.store.setting(key)? {
            None => Ok(None),
            Some(t) => serde_json::from_str(&t)
                .map(Some)
                .map_err(|e| OsError::Io(format!("the stored {key} is unreadable: {e}"))),
        }
    }

    fn put<T: Serialize>(&self, key: &str, value: Option<&T>) -> Result<(), OsError> {
        let text = match value {
            Some(v) => serde_json::to_string(v).map_err(|e| OsError::Io(e.to_string()))?,
            None => String::new(),
        };
        if text.is_empty() {
            self.store.delete_setting(key)?;
        } else {
            self.store.set_setting(key, &text)?;
        }
        Ok(())
    }

    pub fn config(&self) -> Result<OsConfig, OsError> {
        Ok(self.get("os.config")?.unwrap_or_default())
    }

    pub fn set_config(&self, config: &OsConfig) -> Result<(), OsError> {
        config.validate()?;
        self.put("os.config", Some(config))?;
        lock(&self.live).next_check = None;
        self.wake.notify_one();
        Ok(())
    }

    pub fn pending(&self) -> Result<Option<Pending>, OsError> {
        self.get("os.pending")
    }

    pub fn refused(&self) -> Result<Vec<Refused>, OsError> {
        Ok(self.get("os.refused")?.unwrap_or_default())
    }

    fn refuse(&self, version: &ImageVersion, reason: &str) -> Result<(), OsError> {
        let mut r = self.refused()?;
        if !r.iter().any(|x| &x.version == version) {
            r.push(Refused {
                version: version.clone(),
                at: now(),
                reason: reason.to_string(),
            });
            self.put("os.refused", Some(&r))?;
        }
        Ok(())
    }

    fn record(&self, ok: bool, message: String) -> Result<(), OsError> {
        if ok {
            tracing::info!(%message, "OS update");
        } else {
            tracing::warn!(%message, "OS update");
        }
        self.put(
            "os.last",
            Some(&Outcome {
                at: now(),
                ok,
                message,
            }),
        )
    }

    fn set_activity(&self, a: &'static str) {
        lock(&self.live).activity = a;
    }

    pub fn status(&self) -> Result<OsStatus, OsError> {
        let config = self.config()?;
        let live = lock(&self.live);
        let mut st = OsStatus {
            appliance: self.platform.is_some(),
            board: None,
            slot: None,
            version: None,
            other: None,
            on_trial: false,
            activity: live.activity.to_string(),
            pending: self.pending()?,
            last_check: self.get("os.last")?,
            next_check: live.next_check,
            next_window: None,
            refused: self.refused()?,
            config: config.clone(),
        };
        drop(live);
        if let Some(p) = &self.platform {
            st.board = Some(p.board.clone());
            st.slot = Some(p.slot);
            st.version = Some(p.version.to_string());
            let esp = Esp::new(&p.esp);
            st.on_trial = esp
                .entry(p.slot)
                .ok()
                .flatten()
                .is_some_and(|e| e.on_trial());
            let other = p.slot.other();
            st.other = Some(match esp.entry(other).ok().flatten() {
                None => SlotInfo {
                    slot: other,
                    version: None,
                    state: "empty".into(),
                },
                Some(e) => SlotInfo {
                    slot: other,
                    version: boot::uki_image_version(&e.path).ok().flatten(),
                    state: if e.is_bad() {
                        "failed"
                    } else if e.on_trial() {
                        "on-trial"
                    } else {
                        "committed"
                    }
                    .into(),
                },
            });
            if st.pending.as_ref().is_some_and(|x| x.slot == other) {
                st.next_window = Window::parse(&config.window)
                    .ok()
                    .map(|w| w.next_open(now()));
            }
        }
        Ok(st)
    }

    /// Checks now and stages what it finds; with `now`, reboots into it at once instead of
    /// waiting for the window. Returns the staged version, if any.
    pub async fn update(&self, reboot_now: bool) -> Result<Option<ImageVersion>, OsError> {
        let slot = self.platform()?.slot;
        let staged = self.check_and_stage().await?;
        if reboot_now && self.pending()?.is_some_and(|p| p.slot != slot) {
            self.reboot_into_pending()?;
        }
        Ok(staged)
    }

    /// Starts [`Updater::update`] in the background (the API's `POST /v1/os/update`).
    pub fn request_update(self: &Arc<Self>, reboot_now: bool) -> Result<(), OsError> {
        self.platform()?;
        self.config()?.repository.ok_or(OsError::NoRepository)?;
        if self.busy.try_lock().is_err() {
            return Err(OsError::Busy);
        }
        let me = self.clone();
        tokio::spawn(async move {
            let _ = me.update(reboot_now).await;
        });
        Ok(())
    }

    /// One check; stages a newer release into the other slot. The outcome is recorded.
    pub async fn check_and_stage(&self) -> Result<Option<ImageVersion>, OsError> {
        let _busy = self.busy.try_lock().map_err(|_| OsError::Busy)?;
        let result = self.check_and_stage_inner().await;
        self.set_activity(if self.pending().ok().flatten().is_some() {
            "staged"
        } else {
            "idle"
        });
        match &result {
            Ok(Some(v)) => self.record(true, format!("{v} is staged in the other slot"))?,
            Ok(None) => self.record(true, "up to date".into())?,
            Err(e) => self.record(false, e.to_string())?,
        }
        result
    }

    async fn check_and_stage_inner(&self) -> Result<Option<ImageVersion>, OsError> {
        let p = self.platform()?;
        let config = self.config()?;
        let url = config.repository.ok_or(OsError::NoRepository)?;
        let url = url::Url::parse(&url).map_err(|e| OsError::Config(format!("{url}: {e}")))?;
        self.set_activity("checking");
        let source = repo::Source {
            url,
            root: p.trusted_root.clone(),
            datastore: self.dir.join("tuf"),
        };
        let refused: Vec<ImageVersion> = self.refused()?.into_iter().map(|r| r.version).collect();
        if let Some(pending) = self.pending()? {
            if pending.slot != p.slot {
                // Already staged: only a newer release replaces it.
                let mut also = refused.clone();
                also.push(pending.version.clone());
                let newer = source
                    .check(&self.client, &p.board, &pending.version, &also)
                    .await?;
                return match newer {
                    None => Ok(Some(pending.version)),
                    Some(r) => self.stage(p, r).await.map(Some),
                };
            }
        }
        match source
            .check(&self.client, &p.board, &p.version, &refused)
            .await?
        {
            None => Ok(None),
            Some(r) => self.stage(p, r).await.map(Some),
        }
    }

    async fn stage(&self, p: &Platform, r: repo::Release) -> Result<ImageVersion, OsError> {
        let target = p.slot.other();
        let spool = self.dir.join("spool");
        std::fs::create_dir_all(&spool).map_err(|e| OsError::io(&spool, e))?;
        let root_art = r.manifest.artifact("root")?.clone();
        let uki_name = format!("uki-{target}");
        let uki_art = r.manifest.artifact(&uki_name)?.clone();
        // Room: the spool on the data partition, the slot, the ESP.
        let free = |path: &Path| -> Result<u64, OsError> {
            let s = nix::sys::statvfs::statvfs(path)
                .map_err(|e| OsError::Io(format!("statvfs {}: {e}", path.display())))?;
            Ok(s.blocks_available() as u64 * s.fragment_size() as u64)
        };
        let spool_need = root_art.compressed_size + uki_art.compressed_size + (16 << 20);
        let spool_free = free(&spool)?;
        if spool_need > spool_free {
            return Err(OsError::DiskTooSmall {
                what: "the download spool on the data partition".into(),
                need: spool_need,
                have: spool_free,
            });
        }
        let dev = p.partition(target).to_path_buf();
        let room = boot::device_size(&dev).map_err(|e| OsError::io(&dev, e))?;
        if root_art.size > room {
            return Err(OsError::DiskTooSmall {
                what: format!("slot {target} ({})", dev.display()),
                need: root_art.size,
                have: room,
            });
        }
        let esp = Esp::new(&p.esp);
        let esp_room = free(&p.esp)?
            + esp
                .entry(target)
                .ok()
                .flatten()
                .and_then(|e| std::fs::metadata(&e.path).ok())
                .map_or(0, |m| m.len());
        if uki_art.size > esp_room {
            return Err(OsError::DiskTooSmall {
                what: "the EFI system partition".into(),
                need: uki_art.size,
                have: esp_room,
            });
        }
        self.set_activity("downloading");
        let root_spool = spool.join("root.erofs.zst");
        let uki_spool = spool.join("uki.efi.zst");
        let downloaded = async {
            r.download("root.erofs.zst", &root_spool).await?;
            r.download(&format!("{uki_name}.efi.zst"), &uki_spool).await
        }
        .await;
        if let Err(e) = downloaded {
            let _ = std::fs::remove_dir_all(&spool);
            return Err(e);
        }
        // From here the other slot is rewritten: first make it unbootable, and forget
        // any earlier staging of it.
        self.set_activity("writing");
        self.put::<Pending>("os.pending", None)?;
        p.with_esp_writable(&format!("remove slot {target}'s boot entry"), |esp| {
            esp.remove(target)
        })?;
        tracing::info!(version = %r.version, slot = %target, "os-update: writing slot");
        println!(
            "homeport: os-update writing slot={target} version={}",
            r.version
        );
        let written = {
            let (dev, root_spool, uki_spool) = (dev.clone(), root_spool.clone(), uki_spool.clone());
            let p = p.clone();
            tokio::task::spawn_blocking(move || -> Result<(), OsError> {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&dev)
                    .map_err(|e| OsError::io(&dev, e))?;
                let what = format!("slot {target}");
                repo::write_decompressed(&root_spool, &mut f, room, &root_art, &what)?;
                f.sync_all().map_err(|e| OsError::io(&dev, e))?;
                drop(f);
                // The UKI: decompressed and checked in memory (tens of MiB), then installed.
                let mut uki = Vec::with_capacity(uki_art.size as usize);
                repo::write_decompressed(&uki_spool, &mut uki, uki_art.size, &uki_art, "the UKI")?;
                p.with_esp_writable(&format!("install slot {target}'s boot entry"), |esp| {
                    esp.install(target, &mut &uki[..], TRIES)
                })?;
                Ok(())
            })
            .await
            .map_err(|e| OsError::Io(format!("the writer thread: {e}")))?
        };
        let _ = std::fs::remove_dir_all(&spool);
        written?;
        println!(
            "homeport: os-update staged slot={target} version={}",
            r.version
        );
        self.put(
            "os.pending",
            Some(&Pending {
                version: r.version.clone(),
                slot: target,
                apps: Vec::new(),
                staged_at: now(),
                rebooted_at: None,
                last_failure: None,
            }),
        )?;
        Ok(r.version)
    }

    /// Records the running apps and reboots into the staged slot.
    fn reboot_into_pending(&self) -> Result<(), OsError> {
        let p = self.platform()?;
        let Some(mut pending) = self.pending()? else {
            return Ok(());
        };
        pending.apps = self.running_apps()?;
        pending.rebooted_at = Some(now());
        self.put("os.pending", Some(&pending))?;
        self.set_activity("rebooting");
        println!(
            "homeport: os-update rebooting into slot={} version={}",
            pending.slot, pending.version
        );
        (p.reboot)();
        Ok(())
    }

    fn running_apps(&self) -> Result<Vec<String>, OsError> {
        Ok(self
            .store
            .apps()?
            .into_iter()
            .filter(|r| {
                r.phase == crate::store::Phase::Installed
                    && r.desired == crate::store::Desired::Running
            })
            .map(|r| r.name.to_string())
            .collect())
    }

    /// At start, before anything else of the updater: settles what the last boot left.
    /// On a slot on trial, runs the health check and blesses or reboots; on the old slot
    /// after a fallback, records the failure and refuses the version.
    pub async fn settle_boot(&self, health: &dyn Health) -> Result<(), OsError> {
        let p = self.platform()?;
        let esp = Esp::new(&p.esp);
        let pending = self.pending()?;
        // Downloads a power cut interrupted.
        let _ = std::fs::remove_dir_all(self.dir.join("spool"));
        // The other slot gave up: the firmware fell back to us.
        if let Some(other) = esp
            .entry(p.slot.other())
            .map_err(|e| OsError::io(&p.esp, e))?
        {
            if other.is_bad() {
                let version = pending
                    .as_ref()
                    .filter(|x| x.slot == other.slot)
                    .map(|x| x.version.clone())
                    .or_else(|| {
                        boot::uki_image_version(&other.path)
                            .ok()
                            .flatten()
                            .and_then(|v| v.parse().ok())
                    });
                let why = pending
                    .as_ref()
                    .and_then(|x| x.last_failure.clone())
                    .unwrap_or_else(|| "it did not pass its health check".into());
                let reason = format!(
                    "slot {} failed {TRIES} boots and the device went back to {}: {why}",
                    other.slot, p.version
                );
                if let Some(v) = &version {
                    self.refuse(v, &reason)?;
                }
                self.record(
                    false,
                    format!(
                        "update to {} rolled back: {reason}",
                        version.map_or("an unknown version".to_string(), |v| v.to_string())
                    ),
                )?;
                p.with_esp_writable("remove the failed boot entry", |esp| esp.remove(other.slot))?;
                self.put::<Pending>("os.pending", None)?;
                println!("homeport: os-update rolled back to slot={}", p.slot);
            }
        }
        let Some(mine) = esp.entry(p.slot).map_err(|e| OsError::io(&p.esp, e))? else {
            return Ok(());
        };
        if !mine.on_trial() {
            // Committed (or never on trial); a pending record for us is stale.
            if pending.as_ref().is_some_and(|x| x.slot == p.slot) {
                self.put::<Pending>("os.pending", None)?;
            }
            return Ok(());
        }
        self.set_activity("committing");
        let apps = pending
            .as_ref()
            .filter(|x| x.slot == p.slot)
            .map(|x| x.apps.clone())
            .unwrap_or_default();
        let timeout = Duration::from_secs(self.config()?.commit_timeout_secs);
        let started = tokio::time::Instant::now();
        let verdict = loop {
            if p.fail_health {
                // No point in waiting: the fault does not go away.
                break Err("injected fault (homeport.fault=os-health)".to_string());
            }
            match health.check(&apps).await {
                Ok(()) => break Ok(()),
                Err(e) if started.elapsed() >= timeout => break Err(e),
                Err(_) => tokio::time::sleep(Duration::from_secs(2)).await,
            }
        };
        match verdict {
            Ok(()) => {
                p.with_esp_writable(&format!("bless slot {}", p.slot), |esp| esp.bless(p.slot))?;
                self.put::<Pending>("os.pending", None)?;
                self.set_activity("idle");
                self.record(true, format!("{} committed in slot {}", p.version, p.slot))?;
                println!(
                    "homeport: os-update committed slot={} version={}",
                    p.slot, p.version
                );
                Ok(())
            }
            Err(why) => {
                let mut pend = pending.unwrap_or(Pending {
                    version: p.version.clone(),
                    slot: p.slot,
                    apps,
                    staged_at: now(),
                    rebooted_at: None,
                    last_failure: None,
                });
                pend.last_failure = Some(why.clone());
                self.put("os.pending", Some(&pend))?;
                self.record(
                    false,
                    format!(
                        "{} failed its health check in slot {}: {why}",
                        p.version, p.slot
                    ),
                )?;
                println!(
                    "homeport: os-update health check failed slot={}: {why}",
                    p.slot
                );
                self.set_activity("rebooting");
                (p.reboot)();
                Ok(())
            }
        }
    }

    /// The schedule: settles the boot, then checks every `check_every_secs` (plus jitter)
    /// and reboots into a staged update in the window.
    pub async fn run(self: Arc<Self>, health: Arc<dyn Health>) {
        if let Err(e) = self.settle_boot(health.as_ref()).await {
            tracing::warn!(error = %e, "settling the last OS update failed");
            let _ = self.record(false, e.to_string());
        }
        if lock(&self.live).activity == "rebooting" {
            return;
        }
        loop {
            let config = self.config().unwrap_or_default();
            let t = now();
            let due = {
                let mut live = lock(&self.live);
                let jitter = if config.jitter_secs > 0 {
                    rand::random::<u64>() % config.jitter_secs
                } else {
                    0
                };
                // First check a few minutes after start, spread like the others.
                let first = 120 + jitter.min(600);
                let next = *live.next_check.get_or_insert(t + first as i64);
                if next <= t {
                    live.next_check = Some(t + (config.check_every_secs + jitter) as i64);
                    true
                } else {
                    false
                }
            };
            if due && config.automatic && config.repository.is_some() {
                let _ = self.check_and_stage().await;
            }
            let staged_other = self.pending().ok().flatten().is_some_and(|x| {
                self.platform
                    .as_ref()
                    .is_some_and(|p| x.slot == p.slot.other())
            });
            if staged_other && config.automatic {
                let open = Window::parse(&config.window).is_ok_and(|w| w.contains(now()));
                if open {
                    if let Err(e) = self.reboot_into_pending() {
                        let _ = self.record(false, e.to_string());
                    } else {
                        return;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}

/// The health check of a new slot, asked of the running agent.
#[tough::async_trait]
pub trait Health: Send + Sync {
    async fn check(&self, apps: &[String]) -> Result<(), String>;
}

/// The real health check: the API answers on its socket, the network has a default route,
/// and the agent's services, proxy and apps pass [`crate::daemon::Agent::check_health`].
pub struct AgentHealth {
    pub agent: Arc<crate::daemon::Agent>,
    pub socket: PathBuf,
}

#[tough::async_trait]
impl Health for AgentHealth {
    async fn check(&self, apps: &[String]) -> Result<(), String> {
        crate::api::client::Client::new(&self.socket)
            .text("/v1/info")
            .await
            .map_err(|e| format!("the API does not answer on {}: {e}", self.socket.display()))?;
        if !has_default_route(
            &std::fs::read_to_string("/proc/net/route").unwrap_or_default(),
            &std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default(),
        ) {
            return Err("the network is not up (no default route)".into());
        }
        self.agent.check_health(apps).await
    }
}

/// A default route in `/proc/net/route` (destination 0, flag RTF_UP) or
/// `/proc/net/ipv6_route` (::/0 not through `lo`, which holds the unreachable default).
fn has_default_route(route4: &str, route6: &str) -> bool {
    let v4 = route4.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3
            && f[1] == "00000000"
            && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & 1 != 0)
    });
    let v6 = route6.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() == 10 && f[0].bytes().all(|b| b == b'0') && f[1] == "00" && f[9] != "lo"
    });
    v4 || v6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_daily_and_may_wrap() {
        let w = Window::parse("03:00-05:00").unwrap();
        let day = 20_000 * 86400;
        assert!(!w.contains(day + 2 * 3600 + 59 * 60));
        assert!(w.contains(day + 3 * 3600));
        assert!(w.contains(day + 4 * 3600 + 59 * 60));
        assert!(!w.contains(day + 5 * 3600));
        assert_eq!(w.next_open(day + 6 * 3600), day + 86400 + 3 * 3600);
        assert_eq!(w.next_open(day + 3600), day + 3 * 3600);
        assert_eq!(w.next_open(day + 4 * 3600), day + 4 * 3600);
        let night = Window::parse("23:30-01:00").unwrap();
        assert!(night.contains(day + 23 * 3600 + 45 * 60));
        assert!(night.contains(day + 1800));
        assert!(!night.contains(day + 3600));
        for bad in [
            "3:00-05:00",
            "03:00",
            "03:00-03:00",
            "24:00-01:00",
            "03:60-04:00",
            "x",
        ] {
            let e = Window::parse(bad).unwrap_err();
            assert!(e.to_string().contains("HH:MM-HH:MM"), "{bad}: {e}");
        }
    }

    #[test]
    fn default_routes_are_found() {
        let head = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n";
        let v4 = format!("{head}ens3\t00000000\t0202000A\t0003\t0\t0\t0\t00000000\nens3\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\n");
        let v4_none = format!("{head}ens3\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\n");
        let z = "00000000000000000000000000000000";
        let v6 = format!("{z} 00 {z} 00 fe800000000000000000000000000002 00000400 00000001 00000000 00450003 ens3\n");
        let v6_lo = format!("{z} 00 {z} 00 {z} ffffffff 00000001 00000000 00200200 lo\n");
        assert!(has_default_route(&v4, ""));
        assert!(has_default_route(&v4_none, &v6));
        assert!(!has_default_route(&v4_none, &v6_lo));
        assert!(!has_default_route("", ""));
    }

    #[test]
    fn config_is_validated() {
        let ok = OsConfig {
            repository: Some("http://10.0.2.2:8080/repo".into()),
            ..OsConfig::default()
        };
        ok.validate().unwrap();
        let bad = |c: OsConfig, what: &str| {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        };
        bad(
            OsConfig {
                repository: Some("ftp://x/".into()),
                ..OsConfig::default()
            },
            "only http",
        );
        bad(
            OsConfig {
                repository: Some("not a url".into()),
                ..OsConfig::default()
            },
            "not a url",
        );
        bad(
            OsConfig {
                check_every_secs: 5,
                ..OsConfig::default()
            },
            "check_every_secs",
        );
        bad(
            OsConfig {
                window: "later".into(),
                ..OsConfig::default()
            },
            "window",
        );
        let parsed: Result<OsConfig, _> = serde_json::from_str(r#"{"repositry": "x"}"#);
        assert!(parsed.unwrap_err().to_string().contains("repositry"));
    }
}
