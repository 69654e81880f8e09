//! The agent's core: one [`Command`] type that every front end (HTTP API, CLI through it)
//! translates into, the per-app supervisors, and recovery at start.

use std::collections::HashMap;
use std::future::Future;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::api::types::{
    AgentInfo, AppDetail, AppSummary, HealthState, ImageInfo, Progress, PruneReport, RunState,
    VolumeInfo,
};
use crate::images::{ImageError, Images};
use crate::manifest::{AppName, Manifest, ManifestError};
use crate::paths::Paths;
use crate::runtime::{logs, spec, AppPlan, ExitStatus, Runtime, RuntimeError};
use crate::runtime::{ContainerPlan, Running};
use crate::services::cache::{Cache, CacheConfig};
use crate::services::postgres::{DbGrant, Postgres, PostgresConfig};
use crate::store::{
    now_ms, AppData, AppRow, ContainerImage, Desired, HistoryEntry, Phase, Store, StoreError,
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no app named {0} is installed")]
    NoSuchApp(String),
    #[error("an app named {0} is already installed")]
    AlreadyInstalled(String),
    #[error("an install of {0} is already under way")]
    InstallInProgress(String),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{0}")]
    BadRequest(String),
    #[error("app {0} is not running")]
    NotRunning(String),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("app {0}: its supervisor stopped")]
    SupervisorGone(String),
    #[error("port {port}/{protocol} is already published by app {app}")]
    PortTaken {
        port: u16,
        protocol: crate::manifest::Protocol,
        app: String,
    },
    #[error("the firewall: {0}")]
    Firewall(std::io::Error),
    #[error("{what}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("the shared database")]
    Postgres(#[from] crate::services::postgres::PostgresError),
    #[error("app {app}: its cache")]
    Cache {
        app: String,
        source: crate::services::cache::CacheError,
    },
    #[error("app {app}: its {when} hook {command:?} {status}; its output is in the app's log")]
    HookFailed {
        app: String,
        when: &'static str,
        command: String,
        status: String,
    },
    #[error(transparent)]
    Shutdown(#[from] crate::appliance::ShutdownError),
    #[error("the owner has no settings for registry {0}")]
    NoSuchRegistry(String),
    #[error(transparent)]
    Os(#[from] crate::os::OsError),
    #[error(transparent)]
    Clock(#[from] crate::clock::ClockError),
}

pub type Result<T> = std::result::Result<T, AgentError>;

/// The device's name until the owner picks one: `<app>-homeport.local`.
pub const DEFAULT_DEVICE_NAME: &str = "homeport";

/// Where apps reach the shared PostgreSQL server, on the gateway's addresses.
pub const POSTGRES_PORT: u16 = 5432;

/// Slots of host user ids for volumes (`runtime::idmap`).
const ID_SLOTS: u32 = crate::runtime::idmap::SLOTS;

/// Who asked for a change; recorded in the history.
#[derive(Debug, Clone)]
pub struct Actor(pub String);

/// Everything the agent can be asked to do that answers with one value.
#[derive(Debug)]
pub enum Command {
    List,
    Inspect(AppName),
    Start(AppName, Actor),
    Stop(AppName, Actor),
    Restart(AppName, Actor),
    Remove {
        name: AppName,
        purge_data: bool,
        actor: Actor,
    },
    History(AppName),
    Images,
    PruneImages,
    Validate(String),
    Info,
}

#[derive(Debug)]
pub enum Response {
    Apps(Vec<AppSummary>),
    App(Box<AppDetail>),
    Summary(AppSummary),
    History(Vec<HistoryEntry>),
    Images(Vec<ImageInfo>),
    Pruned(PruneReport),
    Problems(Vec<crate::manifest::Problem>),
    Info(AgentInfo),
    Done,
}

pub struct Config {
    pub paths: Paths,
    pub cgroup_parent: String,
    pub registries: crate::images::registry::RegistryConfig,
    pub log_cap: u64,
    /// Time between SIGTERM and SIGKILL when an app is stopped.
    pub stop_grace: Duration,
    /// Where the device's DNS resolvers are read from for the apps' resolv.conf.
    pub resolv_conf: std::path::PathBuf,
    /// Where the reverse proxy listens.
    pub proxy: crate::proxy::ProxyConfig,
    /// PostgreSQL's programs (`None`: the newest under /usr/lib/postgresql).
    pub postgres_bin: Option<std::path::PathBuf>,
}

pub struct Agent {
    inner: Arc<Inner>,
    /// OS updates (set once by [`Agent::attach_os`]).
    os: std::sync::OnceLock<Arc<crate::os::Updater>>,
    /// The clock's keeper on the appliance (set once by [`Agent::attach_time`]).
    time: std::sync::OnceLock<Arc<crate::clock::TimeSync>>,
}

struct Inner {
    store: Arc<Store>,
    images: Images,
    runtime: Runtime,
    network: Arc<crate::net::Network>,
    proxy: Arc<crate::proxy::Proxy>,
    paths: Paths,
    log_cap: u64,
    stop_grace: Duration,
    apps: Mutex<HashMap<AppName, Handle>>,
    installing: Mutex<std::collections::HashSet<AppName>>,
    /// Held from reading the apps' ports to recording the change that made the firewall
    /// differ, so two changes never apply sets computed from the same old state.
    rules: tokio::sync::Mutex<()>,
    cgroup_parent: String,
    /// The shared PostgreSQL server, started when the first app needs a database.
    postgres: tokio::sync::OnceCell<Arc<Postgres>>,
    postgres_bin: Option<std::path::PathBuf>,
    /// The apps' cache servers, while their apps run.
    caches: Mutex<HashMap<AppName, Arc<Cache>>>,
    /// Volumes are mounted idmapped, owned on disk by each app's own id range.
    idmap: bool,
    /// Held while the owner's registry settings are read, changed and written.
    registries: Mutex<()>,
}

struct Handle {
    ctl: mpsc::Sender<Ctl>,
    state: watch::Receiver<Status>,
}

#[derive(Debug, Clone, PartialEq)]
struct Status {
    run: RunState,
    restarts: u32,
    /// `None`: the app has no `[health]` check or does not run.
    health: Option<HealthState>,
}

enum Ctl {
    Start(oneshot::Sender<Result<()>>),
    Stop(oneshot::Sender<Result<()>>),
    Restart(oneshot::Sender<Result<()>>),
    /// Stop and end the supervisor (for `rm`).
    Shutdown(oneshot::Sender<Result<()>>),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Agent {
    /// Opens the state, recovers from whatever a crash left, and re-adopts or restarts apps.
    pub async fn start(config: Config) -> anyhow::Result<Agent> {
        use anyhow::Context;
        let t0 = std::time::Instant::now();
        let step = |what: &str| tracing::debug!(elapsed = ?t0.elapsed(), "start: {what}");
        let paths = config.paths;
        for d in [
            paths.data().to_path_buf(),
            paths.layers(),
            paths.apps(),
            paths.runtime(),
        ] {
            std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
        }
        let forgotten = crate::runtime::boot_id()
            .and_then(|boot| crate::runtime::forget_earlier_boots(&paths.runtime(), &boot))
            .with_context(|| {
                format!(
                    "clear the container state of earlier boots in {}",
                    paths.runtime().display()
                )
            })?;
        if forgotten > 0 {
            tracing::info!(
                containers = forgotten,
                "forgot the container state of an earlier boot"
            );
        }
        let store = Arc::new(Store::open(&paths.db())?);
        step("store open");
        let images = Images::new(store.clone(), paths.clone(), config.registries)?;
        images
            .registry()
            .set_plain_http(plain_http_hosts(&owner_registries(&store)?));
        let exe = std::env::current_exe().context("find the agent's own executable")?;
        // The device's ULA prefix: made once, kept forever (apps' addresses derive from it).
        let ula: crate::net::Ula48 = store
            .setting_or_insert("ula", &crate::net::Ula48::random().to_string())?
            .parse()
            .context("the stored ULA prefix")?;
        // Its internal IPv4 net: chosen once, away from the routes the device has then.
        let net4: crate::net::AppsNet4 = match store.setting("ipv4")? {
            Some(v) => v.parse().context("the stored IPv4 net")?,
            None => {
                let chosen = crate::net::Network::choose_net4(&ula)
                    .context("choose an internal IPv4 net")?;
                store
                    .setting_or_insert("ipv4", &chosen.to_string())?
                    .parse()
                    .context("the stored IPv4 net")?
            }
        };
        // The device CA and the proxy: apps' trust bundles and routes depend on them.
        let device_id = &ula.global_id_hex()[..10];
        step("addresses");
        let ca = crate::proxy::DeviceCa::load_or_create(&paths.ca(), device_id)?;
        step("device CA");
        let device = store.setting_or_insert("device_name", DEFAULT_DEVICE_NAME)?;
        let proxy = crate::proxy::Proxy::start(&config.proxy, &device, ca)
            .await
            .context("start the reverse proxy")?;
        if let Some(text) = store.setting("acme")?.filter(|t| !t.is_empty()) {
            let cfg: crate::proxy::acme::AcmeConfig =
                serde_json::from_str(&text).context("the stored domain settings")?;
            proxy.set_acme(Some(cfg));
        }
        // Apps may reach the proxy on the device (to reach each other by name, over HTTPS).
        // And the shared database, on the gateway's addresses.
        let services: Vec<(crate::manifest::Protocol, u16)> = [proxy.bound().0, proxy.bound().1]
            .into_iter()
            .flatten()
            .map(|a| (crate::manifest::Protocol::Tcp, a.port()))
            .chain([(crate::manifest::Protocol::Tcp, POSTGRES_PORT)])
            .collect();
        let network = Arc::new(crate::net::Network::new(
            ula,
            net4,
            config.resolv_conf,
            services,
        ));
        // The firewall is made anew from the store: whatever the kernel held, it matches.
        let rules = app_rules(&store, &network, None)?;
        let net = network.clone();
        tokio::task::spawn_blocking(move || net.up(&rules))
            .await
            .context("bring up the app network")?
            .with_context(|| format!("bring up the app network on {}", network.bridge()))?;
        tracing::info!(prefix = %network.apps_net(), ipv4 = %network.apps_net4(), bridge = network.bridge(), "app network up");
        let runtime = Runtime::new(
            paths.clone(),
            network.clone(),
            config.cgroup_parent.clone(),
            &exe,
            proxy.ca_pem().to_string(),
        )?;
        let probe = paths.tmp();
        let idmap = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&probe).is_ok() && crate::runtime::idmap_supported(&probe)
        })
        .await
        .unwrap_or(false);
        if !idmap {
            tracing::warn!("idmapped mounts do not work here: volumes are owned by the apps' users as they are inside");
        }
        let inner = Arc::new(Inner {
            store,
            images,
            network,
            proxy,
            runtime,
            paths,
            log_cap: config.log_cap,
            stop_grace: config.stop_grace,
            apps: Mutex::default(),
            installing: Mutex::default(),
            rules: tokio::sync::Mutex::new(()),
            cgroup_parent: config.cgroup_parent,
            postgres: tokio::sync::OnceCell::new(),
            postgres_bin: config.postgres_bin,
            caches: Mutex::default(),
            idmap,
            registries: Mutex::default(),
        });
        step("runtime");
        inner.images.recover()?;
        inner.recover().await?;
        inner.refresh_routes()?;
        step("apps recovered");
        tokio::spawn(watch_resolvers(Arc::downgrade(&inner)));
        let released = inner.store.release_unowned_ipv4()?;
        if released > 0 {
            tracing::info!(released, "released IPv4 addresses of unfinished installs");
        }
        Ok(Agent {
            inner,
            os: std::sync::OnceLock::new(),
            time: std::sync::OnceLock::new(),
        })
    }

    /// What an installed app is doing (cheap: no disk walks).
    pub fn run_state(&self, name: &AppName) -> Result<RunState> {
        self.inner.installed(name)?;
        Ok(self
            .inner
            .handle_state(name)
            .map_or(RunState::Stopped, |s| s.run))
    }

    pub async fn handle(&self, cmd: Command) -> Result<Response> {
        let i = &self.inner;
        Ok(match cmd {
            Command::List => {
                let mut out = Vec::new();
                for row in i.store.apps()? {
                    if row.phase == Phase::Installed {
                        out.push(i.summary(&row));
                    }
                }
                Response::Apps(out)
            }
            Command::Inspect(name) => Response::App(Box::new(i.inspect(&name).await?)),
            Command::Start(name, actor) => {
                i.installed(&name)?;
                i.store.set_desired(&name, Desired::Running, &actor.0)?;
                i.control(&name, Ctl::Start).await?;
                Response::Summary(i.summary(&i.installed(&name)?))
            }
            Command::Stop(name, actor) => {
                i.installed(&name)?;
                i.store.set_desired(&name, Desired::Stopped, &actor.0)?;
                i.control(&name, Ctl::Stop).await?;
                Response::Summary(i.summary(&i.installed(&name)?))
            }
            Command::Restart(name, actor) => {
                i.installed(&name)?;
                i.store.set_desired(&name, Desired::Running, &actor.0)?;
                i.store
                    .record(&name, &actor.0, "restart", "restart requested")?;
                i.control(&name, Ctl::Restart).await?;
                Response::Summary(i.summary(&i.installed(&name)?))
            }
            Command::Remove {
                name,
                purge_data,
                actor,
            } => {
                i.installed(&name)?;
                let detail = if purge_data {
                    "removed with its data"
                } else {
                    "removed; volumes kept"
                };
                i.store.mark_removing(&name, &actor.0, detail)?;
                crate::crashpoint("rm:marked");
                i.remove(&name, purge_data).await?;
                Response::Done
            }
            Command::History(name) => {
                let h = i.store.history(&name)?;
                if h.is_empty() {
                    return Err(AgentError::NoSuchApp(name.to_string()));
                }
                Response::History(h)
            }
            Command::Images => Response::Images(i.images()?),
            Command::PruneImages => {
                let report = i.images.prune()?;
                tracing::info!(
                    images = report.images.len(),
                    layers = report.layers,
                    "images pruned"
                );
                Response::Pruned(report)
            }
            Command::Validate(text) => Response::Problems(match Manifest::parse(&text) {
                Ok(_) => Vec::new(),
                Err(e) => e.problems,
            }),
            Command::Info => Response::Info(AgentInfo {
                version: env!("CARGO_PKG_VERSION").to_string(),
                pid: std::process::id(),
                zygote_pid: i.runtime.zygote_pid(),
                data_dir: i.paths.data().display().to_string(),
                apps_prefix: i.network.apps_net().to_string(),
                bridge: i.network.bridge().to_string(),
                apps_net4: i.network.apps_net4().to_string(),
                firewall_table: i.network.table().to_string(),
                device_name: i.proxy.device().to_string(),
                proxy_http: i.proxy.bound().0.map(|a| a.to_string()),
                proxy_https: i.proxy.bound().1.map(|a| a.to_string()),
            }),
        })
    }

    /// Installs an app: validate, pull (pinning the tag to a digest), prepare, record, start.
    /// Either the app is installed and recorded, or nothing of it is left.
    pub async fn install(
        &self,
        text: &str,
        actor: &Actor,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<AppSummary> {
        let i = &self.inner;
        let manifest = Manifest::parse(text)?;
        let name = manifest.name.clone();
        if i.store.app(&name)?.is_some() {
            return Err(AgentError::AlreadyInstalled(name.to_string()));
        }
        // Early, so a clash is reported before a long pull (and again when recording).
        port_conflict(&i.store, &manifest)?;
        if !lock(&i.installing).insert(name.clone()) {
            return Err(AgentError::InstallInProgress(name.to_string()));
        }
        let result = i.install(manifest, text, actor, progress).await;
        lock(&i.installing).remove(&name);
        result
    }

    /// Moves an app to a new digest: its tag resolved afresh, or a new manifest (same name).
    /// The app is pinned to the new digest in one transaction with its history entry, then
    /// recreated; a crash before that record leaves the old app, after it the new one.
    pub async fn update(
        &self,
        name: &AppName,
        new_manifest: Option<&str>,
        actor: &Actor,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<AppSummary> {
        let i = &self.inner;
        let row = i.installed(name)?;
        let text = new_manifest.unwrap_or(&row.manifest).to_string();
        let manifest = Manifest::parse(&text)?;
        if &manifest.name != name {
            return Err(AgentError::BadRequest(format!(
                "the manifest is for {}, not {name}; an update keeps the app's name",
                manifest.name
            )));
        }
        // Resolve the tag again (a pinned manifest from an earlier install names no digest).
        let pulled = i.images.pull(&manifest.image, progress).await?;
        let pinned = manifest
            .image
            .with_digest(pulled.resolved.clone())
            .to_string();
        let containers = i.pull_containers(&manifest, progress).await?;
        if pinned == row.pinned && text == row.manifest && containers == row.containers {
            return Ok(i.summary(&row));
        }
        // Refuse, before recording anything, an image whose config cannot be read.
        let new_row = AppRow {
            manifest: text.clone(),
            image_id: pulled.image_id,
            pinned: pinned.clone(),
            containers,
            ..row.clone()
        };
        let plan = i.plan(&new_row)?;
        crate::crashpoint("update:pulled");
        if manifest.database.is_some() {
            i.provision_database(&manifest).await?;
        }
        // Upgrade hooks (migrations) run against the new version with the old one stopped;
        // if one fails, the old version starts again and nothing is recorded.
        let hooks = manifest
            .hooks_for(crate::manifest::HookWhen::Upgrade)
            .next()
            .is_some();
        let was_running = row.desired == Desired::Running;
        if hooks {
            if was_running {
                i.control(name, Ctl::Stop).await?;
            }
            let ran = async {
                i.runtime.prepare(&plan).await?;
                i.start_cache(&plan).await?;
                i.run_hooks(&plan, crate::manifest::HookWhen::Upgrade).await
            }
            .await;
            i.stop_cache(name).await;
            if let Err(e) = ran {
                if was_running {
                    let _ = i.control(name, Ctl::Start).await;
                }
                return Err(e);
            }
        }
        // The firewall follows the new manifest's ports before the record: a crash between
        // the two is repaired at start, when the firewall is made anew from the store.
        let rules = i.rules.lock().await;
        port_conflict(&i.store, &manifest)?;
        i.apply_rules(Some(&manifest)).await?;
        let mut detail = if pinned == row.pinned {
            "image unchanged".to_string()
        } else {
            format!("{} -> {pinned}", row.pinned)
        };
        if text != row.manifest {
            detail.push_str("; manifest changed");
        }
        if let Err(e) = i.store.update_app(&new_row, &actor.0, &detail) {
            let _ = i.apply_rules(None).await;
            return Err(e.into());
        }
        drop(rules);
        i.refresh_routes()?;
        if i.postgres.initialized() {
            // A database the new version no longer declares is kept, without access.
            i.postgres().await?.set_access(&i.db_grants(None)?).await?;
        }
        tracing::info!(app = %name, %detail, "updated");
        crate::crashpoint("update:recorded");
        if was_running {
            i.control(name, Ctl::Restart).await?;
        }
        Ok(i.summary(&i.installed(name)?))
    }

    /// Starts `args` in the running app with the caller's stdio; returns the pid.
    pub async fn exec(&self, name: &AppName, args: Vec<String>, fds: [RawFd; 3]) -> Result<i32> {
        let i = &self.inner;
        i.installed(name)?;
        let running = i
            .handle_state(name)
            .is_some_and(|s| matches!(s.run, RunState::Running { .. }));
        if !running {
            return Err(AgentError::NotRunning(name.to_string()));
        }
        if args.is_empty() {
            return Err(AgentError::BadRequest("exec needs a command".into()));
        }
        Ok(i.runtime.exec(name, args, fds).await?)
    }

    /// Starts a shell over the app's filesystem in a container of its own.
    pub async fn debug(&self, name: &AppName, fds: [RawFd; 3]) -> Result<(String, i32)> {
        let i = &self.inner;
        let row = i.installed(name)?;
        let plan = i.plan(&row)?;
        Ok(i.runtime.debug(&plan, fds).await?)
    }

    pub async fn remove_debug(&self, name: &AppName, id: &str) {
        self.inner.runtime.remove_debug(name, id).await
    }

    pub async fn wait(&self, pid: i32) -> ExitStatus {
        self.inner.runtime.wait(pid).await
    }

    pub fn log_file(&self, name: &AppName) -> Result<std::path::PathBuf> {
        self.inner.installed(name)?;
        Ok(self.inner.paths.log(name))
    }

    /// The owner's public domain and its ACME settings, if set.
    pub fn domain(&self) -> Option<crate::proxy::acme::AcmeConfig> {
        self.inner.proxy.acme_config()
    }

    /// Sets or clears the public domain; apps get `<app>.<domain>` names with certificates
    /// from ACME.
    pub fn set_domain(
        &self,
        config: Option<crate::proxy::acme::AcmeConfig>,
        actor: &Actor,
    ) -> Result<()> {
        if let Some(c) = &config {
            c.check().map_err(AgentError::BadRequest)?;
        }
        let text = match &config {
            Some(c) => serde_json::to_string(c)
                .map_err(|e| AgentError::BadRequest(format!("domain settings: {e}")))?,
            None => String::new(),
        };
        self.inner.store.set_setting("acme", &text)?;
        tracing::info!(actor = %actor.0, domain = ?config.as_ref().map(|c| &c.domain), "public domain set");
        self.inner.proxy.set_acme(config);
        // The public names go into the apps' hosts files too.
        self.inner.refresh_routes()
    }

    /// What the proxy counted for an app (zeros for an app it does not serve).
    pub fn traffic(&self, name: &AppName) -> Result<crate::proxy::traffic::TrafficStats> {
        self.inner.installed(name)?;
        Ok(self.inner.proxy.traffic(name).unwrap_or_default())
    }

    /// The public names' certificates.
    pub fn certificates(&self) -> Vec<crate::proxy::CertState> {
        self.inner.proxy.certificates()
    }

    /// The device CA's certificate (PEM), for owners to install.
    pub fn ca_pem(&self) -> String {
        self.inner.proxy.ca_pem().to_string()
    }

    /// TLS with the device's certificate, for the API over the network.
    pub fn api_tls(&self) -> std::io::Result<Arc<rustls::ServerConfig>> {
        self.inner.proxy.api_tls()
    }

    /// The agent's part of an OS update's health check: every app in `apps` runs and is
    /// not unhealthy, PostgreSQL answers when an installed app has a database, every
    /// running app's cache answers, and the proxy serves HTTPS with the device certificate.
    /// The error says the first thing that is wrong.
    pub async fn check_health(&self, apps: &[String]) -> std::result::Result<(), String> {
        let i = &self.inner;
        for a in apps {
            let name = AppName::try_from(a.as_str()).map_err(|e| format!("app {a}: {e}"))?;
            match i.handle_state(&name) {
                Some(s) if matches!(s.run, RunState::Running { .. }) => {
                    if s.health == Some(HealthState::Unhealthy) {
                        return Err(format!("app {a} runs but is unhealthy"));
                    }
                }
                Some(s) => return Err(format!("app {a} does not run ({:?})", s.run)),
                None => return Err(format!("app {a} is not installed")),
            }
        }
        let rows = i.store.apps().map_err(|e| e.to_string())?;
        let needs_db = rows.iter().any(|r| {
            r.phase == Phase::Installed
                && Manifest::parse(&r.manifest).is_ok_and(|m| m.database.is_some())
        });
        if needs_db {
            let pg = i.postgres().await.map_err(|e| format!("PostgreSQL: {e}"))?;
            pg.ping()
                .await
                .map_err(|e| format!("PostgreSQL does not answer: {e}"))?;
        }
        let caches: Vec<AppName> = lock(&i.caches).keys().cloned().collect();
        for name in caches {
            let data = i
                .store
                .app_data(&name)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("app {name} has a cache but no service data"))?;
            crate::services::cache::ping_in(&i.paths.netns(&name), &data.cache_password)
                .await
                .map_err(|e| format!("the cache of {name} does not answer: {e}"))?;
        }
        let Some(https) = i.proxy.bound().1 else {
            return Ok(());
        };
        let host = format!("{}.local", i.proxy.device());
        let ca = reqwest::Certificate::from_pem(i.proxy.ca_pem().as_bytes())
            .map_err(|e| format!("the device CA: {e}"))?;
        let ip = if https.ip().is_unspecified() {
            std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST)
        } else {
            https.ip()
        };
        let addr = std::net::SocketAddr::from((ip, https.port()));
        let client = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .resolve(&host, addr)
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("an HTTPS client: {e}"))?;
        client
            .get(format!("https://{host}:{}/", https.port()))
            .send()
            .await
            .map_err(|e| format!("the proxy does not serve https://{host}/: {e}"))?;
        Ok(())
    }

    /// Makes the OS updater (`platform` is `None` in host mode, where the API says updates
    /// are for the appliance). Once; later calls return the first.
    pub fn attach_os(&self, platform: Option<crate::os::Platform>) -> Arc<crate::os::Updater> {
        self.os
            .get_or_init(|| {
                Arc::new(crate::os::Updater::new(
                    platform,
                    self.inner.store.clone(),
                    self.inner.paths.data(),
                ))
            })
            .clone()
    }

    pub fn os(&self) -> Option<&Arc<crate::os::Updater>> {
        self.os.get()
    }

    /// Work the start leaves for later, done in the background once the agent serves: the
    /// registry client (its root certificates).
    pub fn warm_up(&self) {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.images.registry().warm());
    }

    /// Starts keeping the clock with chrony (the appliance only).
    pub fn attach_time(&self) {
        if let Some(t) =
            crate::clock::TimeSync::start(self.inner.store.clone(), self.inner.paths.data())
        {
            let _ = self.time.set(t);
        }
    }

    /// The clock and, on the appliance, how it is kept.
    pub async fn time_status(&self) -> crate::clock::TimeStatus {
        match self.time.get().cloned() {
            Some(t) => tokio::task::spawn_blocking(move || t.status())
                .await
                .unwrap_or_else(|_| crate::clock::host_status()),
            None => crate::clock::host_status(),
        }
    }

    /// New time servers (the appliance only).
    pub fn set_time(&self, settings: &crate::clock::TimeSettings, actor: &Actor) -> Result<()> {
        let time = self
            .time
            .get()
            .ok_or(crate::clock::ClockError::NotAppliance)?;
        time.set(settings)?;
        tracing::info!(actor = %actor.0, servers = ?settings.servers, "time servers changed");
        Ok(())
    }

    /// Stops supervising (apps keep running; a new agent re-adopts them).
    pub fn detach(&self) {
        lock(&self.inner.apps).clear();
    }

    /// The registries the agent has settings for: the owner's (through the API) and what it
    /// was started with (`--insecure-registry`, `--registry-auth`, `registries.json`).
    pub fn registries(&self) -> Result<Vec<crate::api::types::RegistryInfo>> {
        let owner = owner_registries(&self.inner.store)?;
        let (insecure, credentials) = self.inner.images.registry().configured();
        let mut hosts: std::collections::BTreeSet<&String> = owner.keys().collect();
        hosts.extend(insecure.iter().chain(&credentials));
        Ok(hosts
            .into_iter()
            .map(|host| {
                let mine = owner.get(host).cloned();
                crate::api::types::RegistryInfo {
                    host: host.clone(),
                    insecure: insecure.contains(host) || mine.as_ref().is_some_and(|s| s.insecure),
                    credentials: credentials.contains(host),
                    owner: mine,
                }
            })
            .collect())
    }

    /// Sets the owner's settings for a registry (kept across restarts; pulls from then on
    /// follow them) and answers what is now in force for it.
    pub fn set_registry(
        &self,
        host: &str,
        settings: crate::api::types::RegistrySettings,
        actor: &Actor,
    ) -> Result<crate::api::types::RegistryInfo> {
        let host = crate::images::reference::registry_host(host).ok_or_else(|| {
            AgentError::BadRequest(format!(
                "{host:?} is not a registry host (like nas.local:5000 or 192.168.1.10:5000)"
            ))
        })?;
        {
            let _guard = lock(&self.inner.registries);
            let mut all = owner_registries(&self.inner.store)?;
            all.insert(host.clone(), settings.clone());
            self.save_registries(&all)?;
        }
        tracing::info!(actor = %actor.0, registry = %host, insecure = settings.insecure, "registry settings changed");
        self.registries()?
            .into_iter()
            .find(|r| r.host == host)
            .ok_or(AgentError::NoSuchRegistry(host))
    }

    /// Removes the owner's settings for a registry (it is then reached over HTTPS, unless the
    /// agent's command line says otherwise).
    pub fn remove_registry(&self, host: &str, actor: &Actor) -> Result<()> {
        let key = crate::images::reference::registry_host(host)
            .ok_or_else(|| AgentError::NoSuchRegistry(host.to_string()))?;
        let _guard = lock(&self.inner.registries);
        let mut all = owner_registries(&self.inner.store)?;
        if all.remove(&key).is_none() {
            return Err(AgentError::NoSuchRegistry(key));
        }
        self.save_registries(&all)?;
        tracing::info!(actor = %actor.0, registry = %key, "registry settings removed");
        Ok(())
    }

    fn save_registries(
        &self,
        all: &std::collections::BTreeMap<String, crate::api::types::RegistrySettings>,
    ) -> Result<()> {
        let text = serde_json::to_string(all)
            .map_err(|e| AgentError::BadRequest(format!("registry settings: {e}")))?;
        self.inner.store.set_setting("registries", &text)?;
        self.inner
            .images
            .registry()
            .set_plain_http(plain_http_hosts(all));
        Ok(())
    }

    /// Powers the device off or reboots it (on the appliance only). Answers at once;
    /// homeport-init is asked [`SHUTDOWN_DELAY`] later, so the caller's answer goes out
    /// first. Init then stops the agent, which stops the apps ([`Agent::stop_all`]).
    pub fn shutdown(&self, kind: crate::appliance::ShutdownKind, actor: &Actor) -> Result<()> {
        if !crate::appliance::can_shutdown() {
            return Err(crate::appliance::ShutdownError::NotAppliance(kind).into());
        }
        tracing::info!(actor = %actor.0, %kind, "shutdown requested");
        tokio::spawn(async move {
            tokio::time::sleep(SHUTDOWN_DELAY).await;
            if let Err(e) = crate::appliance::request_shutdown(kind) {
                tracing::error!(error = %crate::api::chain(&e), "shutdown failed");
            }
        });
        Ok(())
    }

    /// Stops every app (containers and cache) and then the shared database, for the device
    /// going down: what still runs after the agent exits is killed by homeport-init. Desired
    /// states stay as they are, so the next start brings the same apps back.
    pub async fn stop_all(&self) {
        let apps: Vec<(AppName, mpsc::Sender<Ctl>)> = lock(&self.inner.apps)
            .drain()
            .map(|(name, h)| (name, h.ctl))
            .collect();
        tracing::info!(
            apps = apps.len(),
            "stopping every app: the device is going down"
        );
        let stops = apps.into_iter().map(|(name, ctl)| async move {
            let (tx, rx) = oneshot::channel();
            if ctl.send(Ctl::Shutdown(tx)).await.is_ok() {
                if let Ok(Err(e)) = rx.await {
                    tracing::warn!(app = %name, error = %crate::api::chain(&e), "app did not stop cleanly");
                }
            }
        });
        // Each stop is bounded by the grace time; the database is stopped either way.
        let bound = self.inner.stop_grace + Duration::from_secs(5);
        if tokio::time::timeout(bound, futures_util::future::join_all(stops))
            .await
            .is_err()
        {
            tracing::warn!(after = ?bound, "apps still stopping; stopping the database anyway");
        }
        if let Some(pg) = self.inner.postgres.get() {
            pg.stop().await;
        }
    }
}

/// The owner's registry settings by host (the `registries` setting: JSON).
fn owner_registries(
    store: &Store,
) -> Result<std::collections::BTreeMap<String, crate::api::types::RegistrySettings>> {
    match store.setting("registries")?.filter(|t| !t.is_empty()) {
        None => Ok(Default::default()),
        Some(text) => serde_json::from_str(&text).map_err(|e| AgentError::Io {
            what: "the stored registry settings".into(),
            source: e.into(),
        }),
    }
}

fn plain_http_hosts(
    settings: &std::collections::BTreeMap<String, crate::api::types::RegistrySettings>,
) -> Vec<String> {
    settings
        .iter()
        .filter(|(_, s)| s.insecure)
        .map(|(h, _)| h.clone())
        .collect()
}

/// Between answering a poweroff or reboot request and asking homeport-init for it.
pub const SHUTDOWN_DELAY: Duration = Duration::from_millis(500);

/// The firewall's view of the installed apps, `changed` (an app being installed or updated)
/// in place of what the store holds for it.
fn app_rules(
    store: &Store,
    network: &crate::net::Network,
    changed: Option<&Manifest>,
) -> Result<Vec<crate::net::AppRules>> {
    let mut manifests: Vec<Manifest> = Vec::new();
    for row in store.apps()? {
        if row.phase != Phase::Installed || changed.is_some_and(|m| m.name == row.name) {
            continue;
        }
        manifests.push(Manifest::parse(&row.manifest)?);
    }
    manifests.extend(changed.cloned());
    manifests
        .into_iter()
        .map(|m| {
            let host = store.allocate_ipv4(&m.name, crate::net::AppsNet4::hosts())?;
            Ok(crate::net::AppRules {
                v6: network.app_address(&m.name),
                v4: network.app_ipv4(host),
                https: m.https.map(|h| h.port),
                ports: m.ports,
            })
        })
        .collect()
}

/// Refuses a manifest whose public ports another installed app publishes already: they are
/// the device's ports, so one app each.
fn port_conflict(store: &Store, manifest: &Manifest) -> Result<()> {
    for row in store.apps()? {
        if row.name == manifest.name || row.phase != Phase::Installed {
            continue;
        }
        let other = Manifest::parse(&row.manifest)?;
        if let Some((protocol, port)) = manifest
            .public_ports()
            .find(|p| other.public_ports().any(|o| o == *p))
        {
            return Err(AgentError::PortTaken {
                port,
                protocol,
                app: row.name.to_string(),
            });
        }
    }
    Ok(())
}

impl Inner {
    fn installed(&self, name: &AppName) -> Result<AppRow> {
        match self.store.app(name)? {
            Some(row) if row.phase == Phase::Installed => Ok(row),
            _ => Err(AgentError::NoSuchApp(name.to_string())),
        }
    }

    fn handle_state(&self, name: &AppName) -> Option<Status> {
        lock(&self.apps).get(name).map(|h| h.state.borrow().clone())
    }

    fn summary(&self, row: &AppRow) -> AppSummary {
        let status = self.handle_state(&row.name).unwrap_or(Status {
            run: RunState::Stopped,
            restarts: 0,
            health: None,
        });
        AppSummary {
            name: row.name.to_string(),
            image: row.pinned.clone(),
            address: self.network.app_address(&row.name).to_string(),
            ipv4: match self.store.ipv4_host(&row.name) {
                Ok(Some(h)) => self.network.app_ipv4(h).to_string(),
                _ => String::new(),
            },
            url: Manifest::parse(&row.manifest)
                .ok()
                .and_then(|m| m.https)
                .map(|_| self.proxy.url(&row.name)),
            desired: row.desired,
            run: status.run,
            restarts: status.restarts,
            health: status.health,
        }
    }

    fn plan(&self, row: &AppRow) -> Result<AppPlan> {
        let manifest = Manifest::parse(&row.manifest)?;
        let name = &row.name;
        let process = |image_id: i64| -> Result<spec::ImageProcess> {
            let image = self.store.image(image_id)?.ok_or_else(|| {
                AgentError::BadRequest(format!("app {name}: its image is missing from the store"))
            })?;
            spec::ImageProcess::from_image_config(&image.config).map_err(|e| {
                AgentError::BadRequest(format!("app {name}: the image config cannot be read: {e}"))
            })
        };
        // Taken at install; an app recorded before there were IPv4 nets gets one here.
        let ipv4_host = self
            .store
            .allocate_ipv4(name, crate::net::AppsNet4::hosts())?;
        let data = self.app_data(name)?;
        let values = self.template_values(&manifest, ipv4_host, &data);
        let render = |t: &String| crate::manifest::template::render(t, &values);
        let render_all =
            |v: &Option<Vec<String>>| v.as_ref().map(|v| v.iter().map(render).collect());
        let mut env = standard_env(&values);
        env.extend(manifest.env.iter().map(|(k, v)| (k.clone(), render(v))));
        let main = ContainerPlan {
            name: None,
            layers: self.images.layer_dirs(row.image_id)?,
            image: process(row.image_id)?,
            command: render_all(&manifest.command),
            env: Default::default(),
        };
        let mut extra = Vec::new();
        for c in &manifest.containers {
            let image_id = row
                .containers
                .iter()
                .find(|i| i.container == c.name)
                .map_or(row.image_id, |i| i.image_id);
            extra.push(ContainerPlan {
                name: Some(c.name.clone()),
                layers: self.images.layer_dirs(image_id)?,
                image: process(image_id)?,
                command: render_all(&c.command),
                env: c.env.iter().map(|(k, v)| (k.clone(), render(v))).collect(),
            });
        }
        Ok(AppPlan {
            name: name.clone(),
            ipv4_host,
            env,
            id_base: if self.idmap {
                crate::runtime::idmap::slot_base(data.id_slot)
            } else {
                None
            },
            main,
            extra,
            manifest,
        })
    }

    /// The app's passwords and id slot, made at its first install.
    fn app_data(&self, name: &AppName) -> Result<AppData> {
        Ok(self.store.app_data_or_insert(
            name,
            ID_SLOTS,
            crate::services::postgres::random_password,
        )?)
    }

    /// The values of the manifest's template variables for this app.
    fn template_values(
        &self,
        m: &Manifest,
        ipv4_host: u32,
        data: &AppData,
    ) -> std::collections::BTreeMap<&'static str, String> {
        let name = &m.name;
        let mut v = std::collections::BTreeMap::from([
            ("app.name", name.to_string()),
            ("app.address", self.network.app_address(name).to_string()),
            ("app.ipv4", self.network.app_ipv4(ipv4_host).to_string()),
        ]);
        if m.https.is_some() {
            let url = match self.proxy.acme_config() {
                Some(c) => format!("https://{name}.{}", c.domain),
                None => self.proxy.url(name).trim_end_matches('/').to_string(),
            };
            let host = url
                .trim_start_matches("https://")
                .split(['/', ':'])
                .next()
                .unwrap_or_default()
                .to_string();
            v.insert("https.url", url);
            v.insert("https.hostname", host);
        }
        if m.database.is_some() {
            let host = self.network.apps_net4().gateway().to_string();
            let db = db_ident(name);
            v.insert(
                "database.url",
                format!(
                    "postgresql://{db}:{}@{host}:{POSTGRES_PORT}/{db}",
                    data.db_password
                ),
            );
            v.insert("database.host", host);
            v.insert("database.port", POSTGRES_PORT.to_string());
            v.insert("database.name", db.clone());
            v.insert("database.user", db);
            v.insert("database.password", data.db_password.clone());
        }
        if m.cache.is_some() {
            let port = crate::services::cache::PORT;
            v.insert("cache.host", "127.0.0.1".into());
            v.insert("cache.port", port.to_string());
            v.insert("cache.password", data.cache_password.clone());
            v.insert(
                "cache.url",
                format!("redis://:{}@127.0.0.1:{port}/0", data.cache_password),
            );
        }
        v
    }

    /// Access to the shared database for every installed app that has one, and `extra` (an
    /// app being installed).
    fn db_grants(&self, extra: Option<&Manifest>) -> Result<Vec<DbGrant>> {
        let mut manifests = Vec::new();
        for row in self.store.apps()? {
            if row.phase != Phase::Installed || extra.is_some_and(|m| m.name == row.name) {
                continue;
            }
            manifests.push(Manifest::parse(&row.manifest)?);
        }
        manifests.extend(extra.cloned());
        let mut grants = Vec::new();
        for m in manifests.iter().filter(|m| m.database.is_some()) {
            let data = self.app_data(&m.name)?;
            let host = self
                .store
                .allocate_ipv4(&m.name, crate::net::AppsNet4::hosts())?;
            grants.push(DbGrant {
                database: db_ident(&m.name),
                role: db_ident(&m.name),
                password: data.db_password,
                addresses: vec![
                    self.network.app_ipv4(host).into(),
                    self.network.app_address(&m.name).into(),
                ],
            });
        }
        Ok(grants)
    }

    /// The shared PostgreSQL server, started (or adopted) on first use.
    async fn postgres(&self) -> Result<Arc<Postgres>> {
        let pg = self
            .postgres
            .get_or_try_init(|| async {
                // The server runs as its own user: it must pass through the data directory
                // (to its own, which it alone may read).
                for d in [self.paths.data().to_path_buf(), self.paths.services()] {
                    use std::os::unix::fs::PermissionsExt;
                    let io = |source| AgentError::Io {
                        what: format!("make {} passable for the database server", d.display()),
                        source,
                    };
                    std::fs::create_dir_all(&d).map_err(io)?;
                    let mode = std::fs::metadata(&d).map_err(io)?.permissions().mode();
                    if mode & 0o001 == 0 {
                        std::fs::set_permissions(
                            &d,
                            std::fs::Permissions::from_mode((mode & 0o7770) | 0o001),
                        )
                        .map_err(io)?;
                    }
                }
                let grants = self.db_grants(None)?;
                let config = PostgresConfig {
                    dir: self.paths.services().join("postgres"),
                    bin_dir: self.postgres_bin.clone(),
                    listen: vec![
                        self.network.apps_net4().gateway().into(),
                        self.network.apps_net().gateway().into(),
                    ],
                    port: POSTGRES_PORT,
                    cgroup_parent: Some(self.cgroup_parent.clone()),
                };
                Ok::<_, AgentError>(Postgres::start(config, &grants).await?)
            })
            .await?;
        Ok(pg.clone())
    }

    /// Gives the app its database (idempotent) and lets exactly the apps with one in.
    async fn provision_database(&self, manifest: &Manifest) -> Result<()> {
        let pg = self.postgres().await?;
        let grants = self.db_grants(Some(manifest))?;
        if let Some(g) = grants.iter().find(|g| g.role == db_ident(&manifest.name)) {
            pg.provision(g).await?;
        }
        pg.set_access(&grants).await?;
        Ok(())
    }

    /// Starts (or adopts) the app's cache server inside its network namespace.
    async fn start_cache(&self, plan: &AppPlan) -> Result<()> {
        let Some(cache) = plan.manifest.cache else {
            return Ok(());
        };
        let name = &plan.name;
        if lock(&self.caches).contains_key(name) {
            return Ok(());
        }
        let data = self.app_data(name)?;
        let dir = self.paths.cache(name);
        std::fs::create_dir_all(&dir).map_err(|source| AgentError::Io {
            what: format!("create {}", dir.display()),
            source,
        })?;
        let config = CacheConfig {
            app: name.to_string(),
            netns: self.paths.netns(name),
            dir: self.paths.cache(name),
            password: data.cache_password,
            max_memory: cache.memory_bytes,
            cgroup: Some((self.cgroup_parent.clone(), format!("{name}--cache"))),
        };
        let c = Cache::start(config)
            .await
            .map_err(|source| AgentError::Cache {
                app: name.to_string(),
                source,
            })?;
        // Its memory is the app's to account for, beside the app's own cgroups.
        if let Err(e) = crate::services::postgres::place_in_cgroup(
            &self.cgroup_parent,
            &format!("{name}--cache"),
            c.pid(),
        ) {
            tracing::warn!(app = %name, error = %e, "cannot put the cache into its cgroup");
        }
        lock(&self.caches).insert(name.clone(), Arc::new(c));
        Ok(())
    }

    async fn stop_cache(&self, name: &AppName) {
        let c = lock(&self.caches).remove(name);
        if let Some(c) = c {
            if let Err(e) = c.stop().await {
                tracing::warn!(app = %name, error = %e, "cannot stop the app's cache");
            }
        }
    }

    /// Runs the manifest's hooks for `when`, in order; the first that fails ends the run.
    async fn run_hooks(&self, plan: &AppPlan, when: crate::manifest::HookWhen) -> Result<()> {
        let values =
            self.template_values(&plan.manifest, plan.ipv4_host, &self.app_data(&plan.name)?);
        for hook in plan.manifest.hooks_for(when) {
            let c = match &hook.container {
                None => &plan.main,
                Some(n) => plan
                    .extra
                    .iter()
                    .find(|c| c.name.as_deref() == Some(n.as_str()))
                    .unwrap_or(&plan.main),
            };
            let args: Vec<String> = hook
                .command
                .iter()
                .map(|a| crate::manifest::template::render(a, &values))
                .collect();
            tracing::info!(app = %plan.name, when = when.as_str(), command = ?hook.command, "running hook");
            let _ = self.store.add_event(
                &plan.name,
                "hook",
                &format!("{} hook {:?} started", when.as_str(), hook.command),
            );
            let status = self.runtime.run_hook(plan, c, args, hook.timeout).await?;
            if status != ExitStatus::Code(0) {
                let _ = self.store.add_event(
                    &plan.name,
                    "hook",
                    &format!("{} hook {:?} {status}", when.as_str(), hook.command),
                );
                return Err(AgentError::HookFailed {
                    app: plan.name.to_string(),
                    when: when.as_str(),
                    command: hook.command.join(" "),
                    status: status.to_string(),
                });
            }
            let _ = self.store.add_event(
                &plan.name,
                "hook",
                &format!("{} hook {:?} succeeded", when.as_str(), hook.command),
            );
        }
        Ok(())
    }

    /// Points the proxy at the installed apps that serve HTTP.
    fn refresh_routes(&self) -> Result<()> {
        let mut routes = Vec::new();
        for row in self.store.apps()? {
            if row.phase != Phase::Installed {
                continue;
            }
            if let Some(h) = Manifest::parse(&row.manifest)?.https {
                // IPv4: many apps listen on 0.0.0.0 only, and those on [::] take IPv4 too.
                let host = self
                    .store
                    .allocate_ipv4(&row.name, crate::net::AppsNet4::hosts())?;
                let ip = self.network.app_ipv4(host);
                routes.push(crate::proxy::Route {
                    upstream: std::net::SocketAddr::from((ip, h.port)),
                    body_limit: h.body_limit,
                    static_paths: h.static_paths,
                    rootfs: self.paths.rootfs(&row.name),
                    log: self.paths.log(&row.name),
                    app: row.name,
                });
            }
        }
        self.proxy.set_routes(routes);
        // Every app reaches the others by their HTTPS names, through the proxy.
        self.network.set_shared_names(self.proxy.names());
        for row in self.store.apps()? {
            let hosts = self.paths.hosts(&row.name);
            if row.phase != Phase::Installed || !hosts.exists() {
                continue;
            }
            if let Some(h) = self.store.ipv4_host(&row.name)? {
                // Rewritten in place: the file is bind-mounted into the running app.
                if let Err(e) = std::fs::write(&hosts, self.network.hosts_file(&row.name, h)) {
                    tracing::warn!(app = %row.name, error = %e, "cannot update the hosts file");
                }
            }
        }
        Ok(())
    }

    /// Applies the firewall's sets for the installed apps, with `changed` (an app being
    /// installed or updated) in place of what the store holds for it. Callers hold `rules`.
    async fn apply_rules(&self, changed: Option<&Manifest>) -> Result<()> {
        let rules = app_rules(&self.store, &self.network, changed)?;
        let network = self.network.clone();
        tokio::task::spawn_blocking(move || network.update_rules(&rules))
            .await
            .unwrap_or_else(|e| panic!("firewall update panicked: {e}"))
            .map_err(AgentError::Firewall)
    }

    async fn install(
        self: &Arc<Self>,
        manifest: Manifest,
        text: &str,
        actor: &Actor,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<AppSummary> {
        let name = manifest.name.clone();
        tracing::info!(app = %name, image = %manifest.image, "installing");
        let pulled = self.images.pull(&manifest.image, progress).await?;
        let pinned = manifest.image.with_digest(pulled.resolved.clone());
        let row = AppRow {
            name: name.clone(),
            manifest: text.to_string(),
            image_id: pulled.image_id,
            pinned: pinned.to_string(),
            phase: Phase::Installed,
            desired: Desired::Running,
            created_at: now_ms(),
            updated_at: now_ms(),
            containers: self.pull_containers(&manifest, progress).await?,
        };
        // Data kept from an earlier install of this name is taken over, and kept on failure.
        let fresh = self.store.app_data(&name)?.is_none_or(|d| !d.kept);
        let plan = self.plan(&row)?;
        let result = self.install_steps(&manifest, &plan, &row, actor).await;
        if let Err(e) = result {
            tracing::warn!(app = %name, error = %crate::api::chain(&e), "install failed; undoing it");
            self.stop_cache(&name).await;
            let _ = self.runtime.teardown(&name).await;
            if let Err(e) = self.forget_data(&manifest, fresh).await {
                tracing::warn!(app = %name, error = %crate::api::chain(&e), "cannot remove the data of the failed install");
            }
            return Err(e);
        }
        self.refresh_routes()?;
        tracing::info!(app = %name, pinned = %pinned, "installed");
        crate::crashpoint("install:recorded");
        // The cache started for the install hooks is the app's from now on.
        let handle = self.spawn_supervisor(name.clone(), Vec::new());
        let (tx, rx) = oneshot::channel();
        if handle.send(Ctl::Start(tx)).await.is_ok() {
            // A failed first start is visible as state and events; the app is installed.
            let _ = rx.await;
        }
        Ok(self.summary(&row))
    }

    /// The steps of an install after the pull; on error the caller undoes what they did.
    async fn install_steps(
        self: &Arc<Self>,
        manifest: &Manifest,
        plan: &AppPlan,
        row: &AppRow,
        actor: &Actor,
    ) -> Result<()> {
        self.runtime.prepare(plan).await?;
        crate::crashpoint("install:prepared");
        if manifest.database.is_some() {
            self.provision_database(manifest).await?;
        }
        crate::crashpoint("install:provisioned");
        if manifest
            .hooks_for(crate::manifest::HookWhen::Install)
            .next()
            .is_some()
        {
            self.start_cache(plan).await?;
            self.run_hooks(plan, crate::manifest::HookWhen::Install)
                .await?;
            crate::crashpoint("install:hooked");
        }
        let detail = format!("installed {} pinned to {}", manifest.image, row.pinned);
        // The firewall lets the app be reached before it is recorded; a crash in between is
        // repaired at start (the firewall is made anew from the store).
        let rules = self.rules.lock().await;
        let recorded = match port_conflict(&self.store, manifest) {
            Ok(()) => match self.apply_rules(Some(manifest)).await {
                Ok(()) => {
                    crate::crashpoint("install:allowed");
                    self.store
                        .insert_app(row, &actor.0, &detail)
                        .map_err(AgentError::from)
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if recorded.is_err() {
            let _ = self.apply_rules(None).await;
        }
        drop(rules);
        recorded
    }

    /// Pulls the images of the manifest's containers that name one.
    async fn pull_containers(
        &self,
        manifest: &Manifest,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<Vec<ContainerImage>> {
        let mut out = Vec::new();
        for c in &manifest.containers {
            if let Some(image) = &c.image {
                let pulled = self.images.pull(image, progress).await?;
                out.push(ContainerImage {
                    container: c.name.clone(),
                    image_id: pulled.image_id,
                    pinned: image.with_digest(pulled.resolved).to_string(),
                });
            }
        }
        Ok(out)
    }

    /// Drops what an app's data outside its volumes is (its database and role, its data
    /// record) unless `drop` is false, in which case it is only left out of access.
    async fn forget_data(&self, manifest: &Manifest, drop: bool) -> Result<()> {
        let name = &manifest.name;
        if manifest.database.is_some() || self.postgres.initialized() {
            let pg = self.postgres().await?;
            if drop {
                pg.drop_database(&db_ident(name), &db_ident(name)).await?;
            }
            pg.set_access(&self.db_grants(None)?).await?;
        }
        if drop {
            self.store.delete_app_data(name)?;
        }
        Ok(())
    }

    async fn control(
        &self,
        name: &AppName,
        make: fn(oneshot::Sender<Result<()>>) -> Ctl,
    ) -> Result<()> {
        let ctl = lock(&self.apps).get(name).map(|h| h.ctl.clone());
        let ctl = ctl.ok_or_else(|| AgentError::SupervisorGone(name.to_string()))?;
        let (tx, rx) = oneshot::channel();
        ctl.send(make(tx))
            .await
            .map_err(|_| AgentError::SupervisorGone(name.to_string()))?;
        rx.await
            .map_err(|_| AgentError::SupervisorGone(name.to_string()))?
    }

    async fn remove(&self, name: &AppName, purge_data: bool) -> Result<()> {
        let manifest = self
            .store
            .app(name)?
            .map(|r| Manifest::parse(&r.manifest))
            .transpose()?;
        if lock(&self.apps).contains_key(name) {
            let _ = self.control(name, Ctl::Shutdown).await;
            lock(&self.apps).remove(name);
        }
        self.stop_cache(name).await;
        kill_stale_cache(&self.paths.cache(name));
        self.runtime.teardown(name).await?;
        {
            // The app is marked as being removed, so its rules are left out.
            let _rules = self.rules.lock().await;
            self.apply_rules(None).await?;
        }
        crate::crashpoint("rm:torn-down");
        if purge_data {
            let dir = self.paths.app_volumes(name);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(RuntimeError::Io {
                        app: name.clone(),
                        what: "remove volumes".into(),
                        source: e,
                    }
                    .into());
                }
            }
        } else {
            self.store.set_data_kept(name, true)?;
        }
        if let Some(m) = &manifest {
            // The app is marked as being removed: its access is gone with this.
            self.forget_data(m, purge_data).await?;
        }
        self.store.delete_app(name)?;
        self.refresh_routes()?;
        tracing::info!(app = %name, purge_data, "removed");
        Ok(())
    }

    async fn inspect(&self, name: &AppName) -> Result<AppDetail> {
        let row = self.installed(name)?;
        let plan = self.plan(&row)?;
        let image = self.store.image(row.image_id)?;
        let image_bytes = self
            .store
            .layers_of(row.image_id)?
            .iter()
            .map(|l| l.unpacked_bytes)
            .sum();
        let volumes = plan
            .manifest
            .volumes
            .iter()
            .map(|v| {
                let host = self.paths.volume(name, &v.name);
                VolumeInfo {
                    name: v.name.clone(),
                    path: v.path.clone(),
                    bytes: crate::runtime::os::disk_usage(&host),
                    host_path: host.display().to_string(),
                }
            })
            .collect();
        let database = match plan.manifest.database {
            None => None,
            Some(_) => {
                let db = db_ident(name);
                let bytes = match self.postgres.get() {
                    Some(pg) => pg.database_bytes(&db).await.ok(),
                    None => None,
                };
                Some(crate::api::types::DatabaseInfo {
                    address: format!("{}:{POSTGRES_PORT}", self.network.apps_net4().gateway()),
                    name: db.clone(),
                    user: db,
                    bytes,
                })
            }
        };
        let cache = plan.manifest.cache.map(|c| {
            let running = lock(&self.caches).get(name).cloned();
            crate::api::types::CacheInfo {
                address: format!("127.0.0.1:{}", crate::services::cache::PORT),
                max_memory: c.memory_bytes,
                memory_bytes: running.and_then(|r| r.memory().ok()).map(|m| m.private),
            }
        });
        Ok(AppDetail {
            database,
            cache,
            summary: self.summary(&row),
            command: spec::args(&plan.main.image, plan.main.command.as_deref()),
            manifest: row.manifest.clone(),
            image_digest: image.map(|i| i.digest.to_string()).unwrap_or_default(),
            image_bytes,
            volumes,
            rootfs: self.paths.rootfs(name).display().to_string(),
            log_file: self.paths.log(name).display().to_string(),
            created_at: row.created_at,
            updated_at: row.updated_at,
            events: self.store.events(name, 20)?,
        })
    }

    fn images(&self) -> Result<Vec<ImageInfo>> {
        let usage = self.store.images()?;
        let mut layer_users: HashMap<i64, usize> = HashMap::new();
        for u in &usage {
            for l in &u.layer_ids {
                *layer_users.entry(*l).or_default() += 1;
            }
        }
        let mut out = Vec::new();
        for u in usage {
            let layers = self.store.layers_of(u.image.id)?;
            let bytes = layers.iter().map(|l| l.unpacked_bytes).sum();
            let shared_bytes = layers
                .iter()
                .filter(|l| layer_users.get(&l.id).copied().unwrap_or(0) > 1)
                .map(|l| l.unpacked_bytes)
                .sum();
            out.push(ImageInfo {
                references: u.references,
                digest: u.image.digest.to_string(),
                layers: layers.len(),
                bytes,
                shared_bytes,
                apps: u.apps,
                created_at: u.image.created_at,
            });
        }
        Ok(out)
    }

    /// At start: finish interrupted removals, drop app dirs no row owns (an install killed
    /// half way) with the data that install made, then re-adopt running apps or start those
    /// that should run.
    async fn recover(self: &Arc<Self>) -> Result<()> {
        let rows = self.store.apps()?;
        let known: std::collections::HashSet<String> =
            rows.iter().map(|r| r.name.to_string()).collect();
        if let Ok(entries) = std::fs::read_dir(self.paths.apps()) {
            for e in entries.flatten() {
                let dir = e.file_name().to_string_lossy().into_owned();
                if known.contains(&dir) {
                    continue;
                }
                if let Ok(name) = AppName::try_from(dir.as_str()) {
                    tracing::info!(app = %name, "removing what an interrupted install left");
                    kill_stale_cache(&self.paths.cache(&name));
                    self.runtime.teardown(&name).await?;
                    // Volume dirs made by that install are empty; data of earlier apps is not.
                    let vols = self.paths.app_volumes(&name);
                    if let Ok(vs) = std::fs::read_dir(&vols) {
                        for v in vs.flatten() {
                            let _ = std::fs::remove_dir(v.path());
                        }
                    }
                    let _ = std::fs::remove_dir(&vols);
                }
            }
        }
        // Databases of installs that did not finish (their data records say so).
        let unowned = self.store.unowned_app_data()?;
        if !unowned.is_empty() && self.paths.services().join("postgres").exists() {
            let pg = self.postgres().await?;
            for app in &unowned {
                if let Ok(name) = AppName::try_from(app.as_str()) {
                    tracing::info!(app = %name, "dropping the database of an interrupted install");
                    pg.drop_database(&db_ident(&name), &db_ident(&name)).await?;
                }
            }
            pg.set_access(&self.db_grants(None)?).await?;
        }
        for app in &unowned {
            if let Ok(name) = AppName::try_from(app.as_str()) {
                self.store.delete_app_data(&name)?;
            }
        }
        // Apps with a database need the server before they start.
        let needs_db = rows.iter().any(|r| {
            r.phase == Phase::Installed
                && Manifest::parse(&r.manifest).is_ok_and(|m| m.database.is_some())
        });
        if needs_db {
            let pg = self.postgres().await?;
            pg.set_access(&self.db_grants(None)?).await?;
        }
        for row in rows {
            let name = row.name.clone();
            if row.phase == Phase::Removing {
                tracing::info!(app = %name, "finishing an interrupted removal");
                self.remove(&name, false).await?;
                continue;
            }
            let plan = self.plan(&row);
            let mut running: Running = Vec::new();
            let mut complete = true;
            let ids: Vec<String> = match &plan {
                Ok(p) => p.containers().map(|c| c.id(&name)).collect(),
                Err(_) => vec![name.to_string()],
            };
            for id in ids {
                let state = self.runtime.container_state(&name, &id).await?;
                match state.and_then(|s| s.pid.filter(|_| s.status == "running")) {
                    Some(pid) => running.push((id, pid)),
                    None => complete = false,
                }
            }
            match (row.desired, running.is_empty()) {
                (Desired::Running, false) => {
                    // Running on a rootfs the app has moved on from (an update cut short
                    // between its record and the restart), or only in part: restart it, and
                    // say "starting" until then.
                    let current = plan
                        .as_ref()
                        .is_ok_and(|p| crate::runtime::rootfs_is_current(&self.paths, p));
                    if let Ok(p) = &plan {
                        if let Err(e) = self.start_cache(p).await {
                            tracing::warn!(app = %name, error = %crate::api::chain(&e), "cannot adopt the app's cache");
                            complete = false;
                        }
                    }
                    if current && complete {
                        tracing::info!(app = %name, ?running, "re-adopted running app");
                        self.spawn_supervisor(name, running);
                    } else {
                        tracing::info!(app = %name, "re-adopted app runs an older version or in part; restarting it");
                        let ctl = self.spawn_supervisor_in(name, running, RunState::Starting);
                        let (tx, _rx) = oneshot::channel();
                        let _ = ctl.send(Ctl::Restart(tx)).await;
                    }
                }
                (Desired::Running, true) => {
                    let ctl = self.spawn_supervisor(name, Vec::new());
                    let (tx, _rx) = oneshot::channel();
                    let _ = ctl.send(Ctl::Start(tx)).await;
                }
                (Desired::Stopped, false) => {
                    // Stopped by its owner while the agent was down mid-stop: finish the stop.
                    self.runtime
                        .stop(&name, &running, &[], self.stop_grace)
                        .await?;
                    kill_stale_cache(&self.paths.cache(&name));
                    self.spawn_supervisor(name, Vec::new());
                }
                (Desired::Stopped, true) => {
                    kill_stale_cache(&self.paths.cache(&name));
                    self.spawn_supervisor(name, Vec::new());
                }
            }
        }
        Ok(())
    }

    fn spawn_supervisor(self: &Arc<Self>, name: AppName, adopted: Running) -> mpsc::Sender<Ctl> {
        let initial = match adopted.first() {
            Some((_, pid)) => RunState::Running {
                pid: *pid,
                since: now_ms(),
            },
            None => RunState::Stopped,
        };
        self.spawn_supervisor_in(name, adopted, initial)
    }

    fn spawn_supervisor_in(
        self: &Arc<Self>,
        name: AppName,
        adopted: Running,
        initial: RunState,
    ) -> mpsc::Sender<Ctl> {
        let (ctl_tx, ctl_rx) = mpsc::channel(8);
        let (state_tx, state_rx) = watch::channel(Status {
            run: initial,
            restarts: 0,
            health: None,
        });
        lock(&self.apps).insert(
            name.clone(),
            Handle {
                ctl: ctl_tx.clone(),
                state: state_rx,
            },
        );
        let sup = Supervisor {
            inner: self.clone(),
            name,
            state: state_tx,
            running: adopted,
            restarts: 0,
            streak: 0,
            health: None,
            failures: 0,
        };
        tokio::spawn(sup.run(ctl_rx));
        ctl_tx
    }
}

/// Follows the device's resolvers: when they change (a DHCP lease, typically just after a
/// boot, when apps already run), every app's resolv.conf is rewritten in place (it is
/// bind-mounted into the running app).
async fn watch_resolvers(inner: std::sync::Weak<Inner>) {
    let mut last: Option<String> = None;
    loop {
        let Some(i) = inner.upgrade() else { return };
        let now = i.network.resolv_conf();
        if last.as_ref().is_some_and(|l| *l != now) {
            tracing::info!("the device's resolvers changed; updating the apps'");
            if let Ok(rows) = i.store.apps() {
                for row in rows {
                    let path = i.paths.resolv_conf(&row.name);
                    if path.exists() {
                        if let Err(e) = std::fs::write(&path, &now) {
                            tracing::warn!(app = %row.name, error = %e, "cannot update resolv.conf");
                        }
                    }
                }
            }
        }
        last = Some(now);
        drop(i);
        tokio::time::sleep(RESOLVERS_CHECK).await;
    }
}

const RESOLVERS_CHECK: Duration = Duration::from_secs(5);

/// Kills an app's cache server left running without its app (its pidfile in `dir` names a
/// live `redis-server`).
fn kill_stale_cache(dir: &std::path::Path) {
    let Ok(text) = std::fs::read_to_string(dir.join(crate::services::cache::PIDFILE)) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return;
    };
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim().starts_with("redis-server") || comm.trim().starts_with("valkey-server") {
        tracing::info!(pid, "stopping a cache server left without its app");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = std::fs::remove_file(dir.join(crate::services::cache::PIDFILE));
}

/// The app's database and role in the shared server: `app_<name>` (dashes become `_`), so no
/// app name can be `postgres` or another built-in role.
pub fn db_ident(name: &AppName) -> String {
    format!("app_{}", name.as_str().replace('-', "_"))
}

/// Variables every app gets, from the template values of its sections.
fn standard_env(
    values: &std::collections::BTreeMap<&'static str, String>,
) -> std::collections::BTreeMap<String, String> {
    let mut env = std::collections::BTreeMap::new();
    for (var, key) in [
        ("HOMEPORT_APP", "app.name"),
        ("HOMEPORT_URL", "https.url"),
        ("HOMEPORT_HOSTNAME", "https.hostname"),
        ("DATABASE_URL", "database.url"),
        ("PGHOST", "database.host"),
        ("PGPORT", "database.port"),
        ("PGUSER", "database.user"),
        ("PGPASSWORD", "database.password"),
        ("PGDATABASE", "database.name"),
        ("REDIS_URL", "cache.url"),
    ] {
        if let Some(v) = values.get(key) {
            env.insert(var.to_string(), v.clone());
        }
    }
    env
}

/// Delay before restart number `streak` (0-based) of a crashing app: 1 s doubling to 60 s.
pub fn backoff(streak: u32) -> Duration {
    Duration::from_secs(1u64 << streak.min(6)).min(Duration::from_secs(60))
}

/// An app that ran at least this long before crashing starts again with the shortest delay.
const HEALTHY_RUN: Duration = Duration::from_secs(30);
const LOG_CHECK: Duration = Duration::from_secs(5);

/// Which container (or `cache`) ended, and how.
type ExitFuture = Pin<Box<dyn Future<Output = (String, ExitStatus)> + Send>>;

struct Supervisor {
    inner: Arc<Inner>,
    name: AppName,
    state: watch::Sender<Status>,
    /// What runs of the app, main container first (empty: nothing runs).
    running: Running,
    restarts: u32,
    /// Consecutive quick crashes; sets the backoff.
    streak: u32,
    /// The `[health]` check of the version that runs, and its state.
    health: Option<(crate::manifest::Health, tokio::time::Instant)>,
    /// Consecutive failed health checks.
    failures: u32,
}

impl Supervisor {
    fn set(&self, run: RunState) {
        let health = match (&run, &self.health) {
            (RunState::Running { .. }, Some(_)) => Some(if self.failures > 0 {
                HealthState::Unhealthy
            } else {
                self.state.borrow().health.unwrap_or(HealthState::Starting)
            }),
            _ => None,
        };
        self.state.send_replace(Status {
            run,
            restarts: self.restarts,
            health,
        });
    }

    fn set_health(&self, health: HealthState) {
        self.state.send_modify(|s| s.health = Some(health));
    }

    fn event(&self, kind: &str, message: &str) {
        if let Err(e) = self.inner.store.add_event(&self.name, kind, message) {
            tracing::warn!(app = %self.name, error = %e, "cannot record event");
        }
    }

    fn exit_future(&self) -> Option<ExitFuture> {
        if self.running.is_empty() {
            return None;
        }
        let waits: Vec<ExitFuture> = self
            .running
            .iter()
            .map(|(id, pid)| {
                let (inner, id, pid) = (self.inner.clone(), id.clone(), *pid);
                Box::pin(async move { (id, inner.runtime.wait(pid).await) }) as _
            })
            .collect();
        let cache = lock(&self.inner.caches).get(&self.name).cloned();
        Some(Box::pin(async move {
            let cache_exit = async move {
                match cache {
                    Some(c) => {
                        let st = c.wait().await;
                        let st = match st {
                            Some(s) => match s.code() {
                                Some(c) => ExitStatus::Code(c),
                                None => ExitStatus::Unknown,
                            },
                            None => ExitStatus::Unknown,
                        };
                        ("cache".to_string(), st)
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ((id, st), _, _) = futures_util::future::select_all(waits) => (id, st),
                r = cache_exit => r,
            }
        }))
    }

    fn main_pid(&self) -> Option<i32> {
        self.running.first().map(|(_, pid)| *pid)
    }

    async fn run(mut self, mut ctl: mpsc::Receiver<Ctl>) {
        let mut exit = self.exit_future();
        let mut started_at = tokio::time::Instant::now();
        let mut restart_at: Option<tokio::time::Instant> = None;
        let mut log_tick = tokio::time::interval(LOG_CHECK);
        if !self.running.is_empty() {
            // Adopted: its health check applies from now.
            if let Ok(row) = self.inner.installed(&self.name) {
                if let Ok(m) = Manifest::parse(&row.manifest) {
                    self.health = m.health.map(|h| (h, tokio::time::Instant::now()));
                    if self.health.is_some() {
                        self.set_health(HealthState::Starting);
                    }
                }
            }
        }
        let mut health_at = self.next_health_check();
        loop {
            tokio::select! {
                msg = ctl.recv() => {
                    let Some(msg) = msg else { return };
                    match msg {
                        Ctl::Start(reply) => {
                            restart_at = None;
                            let r = if self.running.is_empty() { self.start().await } else { Ok(()) };
                            exit = self.exit_future();
                            started_at = tokio::time::Instant::now();
                            if let Err(e) = &r {
                                restart_at = Some(self.crashed(&format!("start failed: {}", crate::api::chain(&e))).await);
                            }
                            let _ = reply.send(r);
                        }
                        Ctl::Stop(reply) => {
                            restart_at = None;
                            exit = None;
                            let _ = reply.send(self.stop().await);
                        }
                        Ctl::Restart(reply) => {
                            restart_at = None;
                            drop(exit.take());
                            let mut r = self.stop().await;
                            if r.is_ok() {
                                self.streak = 0;
                                r = self.start().await;
                            }
                            exit = self.exit_future();
                            started_at = tokio::time::Instant::now();
                            let _ = reply.send(r);
                        }
                        Ctl::Shutdown(reply) => {
                            let _ = reply.send(self.stop().await);
                            return;
                        }
                    }
                    health_at = self.next_health_check();
                }
                (id, status) = async { exit.as_mut().expect("guarded").await }, if exit.is_some() => {
                    exit = None;
                    if started_at.elapsed() >= HEALTHY_RUN {
                        self.streak = 0;
                    }
                    tracing::warn!(app = %self.name, container = %id, %status, "app exited");
                    // The app runs as one: what is left of it stops, then all of it restarts.
                    let _ = self.stop().await;
                    let what = if id == self.name.as_str() {
                        status.to_string()
                    } else {
                        format!("{id} {status}")
                    };
                    restart_at = Some(self.crashed(&what).await);
                    health_at = None;
                }
                _ = async { tokio::time::sleep_until(restart_at.expect("guarded")).await }, if restart_at.is_some() => {
                    restart_at = None;
                    self.restarts += 1;
                    let r = self.start().await;
                    exit = self.exit_future();
                    started_at = tokio::time::Instant::now();
                    if let Err(e) = r {
                        restart_at = Some(self.crashed(&format!("start failed: {}", crate::api::chain(&e))).await);
                    }
                    health_at = self.next_health_check();
                }
                _ = async { tokio::time::sleep_until(health_at.expect("guarded")).await }, if health_at.is_some() => {
                    let restart = self.check_health().await;
                    health_at = self.next_health_check();
                    if restart {
                        drop(exit.take());
                        let _ = self.stop().await;
                        restart_at = Some(self.crashed("unhealthy").await);
                        health_at = None;
                    }
                }
                _ = log_tick.tick() => {
                    let log = self.inner.paths.log(&self.name);
                    let cap = self.inner.log_cap;
                    if let Err(e) = tokio::task::spawn_blocking(move || logs::rotate_if_needed(&log, cap)).await.unwrap_or(Ok(false)) {
                        tracing::warn!(app = %self.name, error = %e, "log rotation failed");
                    }
                }
            }
        }
    }

    /// When the next health check is due (`None`: no check, or nothing runs).
    fn next_health_check(&self) -> Option<tokio::time::Instant> {
        let (h, _) = self.health.as_ref()?;
        if self.running.is_empty() {
            return None;
        }
        Some(tokio::time::Instant::now() + h.interval)
    }

    /// Runs the health check once; true when the app is to be restarted.
    async fn check_health(&mut self) -> bool {
        let Some((h, since)) = self.health.clone() else {
            return false;
        };
        let result = tokio::time::timeout(h.timeout, self.probe(&h.check)).await;
        let failure = match result {
            Ok(Ok(())) => None,
            Ok(Err(why)) => Some(why),
            Err(_) => Some(format!("no answer in {}s", h.timeout.as_secs())),
        };
        match failure {
            None => {
                if self.failures > 0 || self.state.borrow().health != Some(HealthState::Healthy) {
                    self.event("health", "healthy");
                }
                self.failures = 0;
                self.set_health(HealthState::Healthy);
                false
            }
            // Failures while the app starts up do not count.
            Some(_)
                if since.elapsed() < h.start_period
                    && self.state.borrow().health != Some(HealthState::Healthy) =>
            {
                false
            }
            Some(why) => {
                self.failures += 1;
                self.set_health(HealthState::Unhealthy);
                self.event(
                    "health",
                    &format!(
                        "health check failed ({}/{}): {why}",
                        self.failures, h.retries
                    ),
                );
                tracing::warn!(app = %self.name, failures = self.failures, %why, "health check failed");
                self.failures >= h.retries
            }
        }
    }

    async fn probe(&self, check: &crate::manifest::HealthCheck) -> std::result::Result<(), String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        match check {
            crate::manifest::HealthCheck::Http { path } => {
                let row = self
                    .inner
                    .installed(&self.name)
                    .map_err(|e| e.to_string())?;
                let port = Manifest::parse(&row.manifest)
                    .ok()
                    .and_then(|m| m.https)
                    .map(|h| h.port)
                    .ok_or("no [https] port")?;
                let addr =
                    std::net::SocketAddr::from((self.inner.network.app_address(&self.name), port));
                let mut stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| format!("connect to port {port}: {e}"))?;
                let host = self.inner.proxy.url(&self.name);
                let host = host.trim_start_matches("https://").trim_end_matches('/');
                stream
                    .write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: homeport-health\r\nConnection: close\r\n\r\n").as_bytes())
                    .await
                    .map_err(|e| format!("send the request: {e}"))?;
                let mut head = [0u8; 64];
                let n = stream
                    .read(&mut head)
                    .await
                    .map_err(|e| format!("read the answer: {e}"))?;
                let line = String::from_utf8_lossy(&head[..n]);
                let code: u16 = line
                    .split(' ')
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| {
                        format!(
                            "not an HTTP answer: {:?}",
                            line.lines().next().unwrap_or("")
                        )
                    })?;
                if (200..400).contains(&code) {
                    Ok(())
                } else {
                    Err(format!("GET {path} answered {code}"))
                }
            }
            crate::manifest::HealthCheck::Command { args } => {
                use std::os::fd::AsRawFd;
                let null = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
                    .map_err(|e| e.to_string())?;
                let fd = null.as_raw_fd();
                let pid = self
                    .inner
                    .runtime
                    .exec(&self.name, args.clone(), [fd, fd, fd])
                    .await
                    .map_err(|e| crate::api::chain(&e))?;
                drop(null);
                match self.inner.runtime.wait(pid).await {
                    ExitStatus::Code(0) => Ok(()),
                    other => Err(format!("{args:?} {other}")),
                }
            }
        }
    }

    /// Records a crash and returns when to restart.
    async fn crashed(&mut self, reason: &str) -> tokio::time::Instant {
        let delay = backoff(self.streak);
        self.streak = self.streak.saturating_add(1);
        self.event(
            "crash",
            &format!("{reason}; restarting in {}s", delay.as_secs()),
        );
        self.set(RunState::Restarting {
            at: now_ms() + delay.as_millis() as i64,
            reason: reason.to_string(),
        });
        tokio::time::Instant::now() + delay
    }

    async fn start(&mut self) -> Result<()> {
        self.set(RunState::Starting);
        let t0 = std::time::Instant::now();
        let row = self.inner.installed(&self.name)?;
        let plan = self.inner.plan(&row)?;
        self.inner.runtime.prepare(&plan).await?;
        self.inner.runtime.remove_dropped(&plan).await?;
        if plan.manifest.database.is_some() {
            // Supervised on its own; here only made sure of (started after a first install).
            self.inner.postgres().await?;
        }
        self.inner.start_cache(&plan).await?;
        self.inner
            .run_hooks(&plan, crate::manifest::HookWhen::Start)
            .await?;
        let prepared = t0.elapsed();
        self.running = self.inner.runtime.start(&plan).await?;
        tracing::debug!(app = %self.name, ?prepared, total = ?t0.elapsed(), "start timing");
        self.health = plan
            .manifest
            .health
            .clone()
            .map(|h| (h, tokio::time::Instant::now()));
        self.failures = 0;
        self.state.send_modify(|s| s.health = None);
        let pid = self.main_pid().unwrap_or_default();
        self.set(RunState::Running {
            pid,
            since: now_ms(),
        });
        self.event("start", &format!("started (pid {pid})"));
        tracing::info!(app = %self.name, pid, containers = self.running.len(), "app started");
        Ok(())
    }

    async fn stop(&mut self) -> Result<()> {
        let running = std::mem::take(&mut self.running);
        let others: Vec<String> = match self
            .inner
            .installed(&self.name)
            .and_then(|r| self.inner.plan(&r))
        {
            Ok(plan) => plan.containers().map(|c| c.id(&self.name)).collect(),
            Err(_) => vec![self.name.to_string()],
        };
        self.inner
            .runtime
            .stop(&self.name, &running, &others, self.inner.stop_grace)
            .await?;
        self.inner.stop_cache(&self.name).await;
        if !running.is_empty() {
            self.event("stop", "stopped");
            tracing::info!(app = %self.name, "app stopped");
        }
        self.set(RunState::Stopped);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_minute() {
        let secs: Vec<u64> = (0..9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
