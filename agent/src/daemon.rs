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
    AgentInfo, AppDetail, AppSummary, ImageInfo, Progress, PruneReport, RunState, VolumeInfo,
};
use crate::images::{ImageError, Images};
use crate::manifest::{AppName, Manifest, ManifestError};
use crate::paths::Paths;
use crate::runtime::{logs, spec, AppPlan, ExitStatus, Runtime, RuntimeError};
use crate::store::{now_ms, AppRow, Desired, HistoryEntry, Phase, Store, StoreError};

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
}

pub type Result<T> = std::result::Result<T, AgentError>;

/// The device's name until the owner picks one: `<app>-homeport.local`.
pub const DEFAULT_DEVICE_NAME: &str = "homeport";

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
}

pub struct Agent {
    inner: Arc<Inner>,
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
}

struct Handle {
    ctl: mpsc::Sender<Ctl>,
    state: watch::Receiver<Status>,
}

#[derive(Debug, Clone, PartialEq)]
struct Status {
    run: RunState,
    restarts: u32,
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
        let paths = config.paths;
        for d in [
            paths.data().to_path_buf(),
            paths.layers(),
            paths.apps(),
            paths.runtime(),
        ] {
            std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
        }
        let store = Arc::new(Store::open(&paths.db())?);
        let images = Images::new(store.clone(), paths.clone(), config.registries)?;
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
        let ca = crate::proxy::DeviceCa::load_or_create(&paths.ca(), device_id)?;
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
        let services: Vec<(crate::manifest::Protocol, u16)> = [proxy.bound().0, proxy.bound().1]
            .into_iter()
            .flatten()
            .map(|a| (crate::manifest::Protocol::Tcp, a.port()))
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
            config.cgroup_parent,
            &exe,
            proxy.ca_pem().to_string(),
        )?;
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
        });
        inner.images.recover()?;
        inner.recover().await?;
        inner.refresh_routes()?;
        let released = inner.store.release_unowned_ipv4()?;
        if released > 0 {
            tracing::info!(released, "released IPv4 addresses of unfinished installs");
        }
        Ok(Agent { inner })
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
            Command::Inspect(name) => Response::App(Box::new(i.inspect(&name)?)),
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
        if pinned == row.pinned && text == row.manifest {
            return Ok(i.summary(&row));
        }
        // Refuse, before recording anything, an image whose config cannot be read.
        let new_row = AppRow {
            manifest: text.clone(),
            image_id: pulled.image_id,
            ..row.clone()
        };
        i.plan(&new_row)?;
        crate::crashpoint("update:pulled");
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
        if let Err(e) = i
            .store
            .update_app(name, &text, pulled.image_id, &pinned, &actor.0, &detail)
        {
            let _ = i.apply_rules(None).await;
            return Err(e.into());
        }
        drop(rules);
        i.refresh_routes()?;
        tracing::info!(app = %name, %detail, "updated");
        crate::crashpoint("update:recorded");
        if row.desired == Desired::Running {
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

    /// Stops supervising (apps keep running; a new agent re-adopts them).
    pub fn detach(&self) {
        lock(&self.inner.apps).clear();
    }
}

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
        }
    }

    fn plan(&self, row: &AppRow) -> Result<AppPlan> {
        let manifest = Manifest::parse(&row.manifest)?;
        let image = self.store.image(row.image_id)?.ok_or_else(|| {
            AgentError::BadRequest(format!(
                "app {}: its image is missing from the store",
                row.name
            ))
        })?;
        let process = spec::ImageProcess::from_image_config(&image.config).map_err(|e| {
            AgentError::BadRequest(format!(
                "app {}: the image config cannot be read: {e}",
                row.name
            ))
        })?;
        Ok(AppPlan {
            name: row.name.clone(),
            manifest,
            layers: self.images.layer_dirs(row.image_id)?,
            image: process,
            // Taken at install; an app recorded before there were IPv4 nets gets one here.
            ipv4_host: self
                .store
                .allocate_ipv4(&row.name, crate::net::AppsNet4::hosts())?,
        })
    }

    /// Points the proxy at the installed apps that serve HTTP.
    fn refresh_routes(&self) -> Result<()> {
        let mut routes = Vec::new();
        for row in self.store.apps()? {
            if row.phase != Phase::Installed {
                continue;
            }
            if let Some(h) = Manifest::parse(&row.manifest)?.https {
                let ip = self.network.app_address(&row.name);
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
        };
        let plan = self.plan(&row)?;
        if let Err(e) = self.runtime.prepare(&plan).await {
            let _ = self.runtime.teardown(&name).await;
            return Err(e.into());
        }
        crate::crashpoint("install:prepared");
        let detail = format!("installed {} pinned to {}", manifest.image, pulled.resolved);
        // The firewall lets the app be reached before it is recorded; a crash in between is
        // repaired at start (the firewall is made anew from the store).
        let rules = self.rules.lock().await;
        let recorded = match port_conflict(&self.store, &manifest) {
            Ok(()) => match self.apply_rules(Some(&manifest)).await {
                Ok(()) => {
                    crate::crashpoint("install:allowed");
                    self.store
                        .insert_app(&row, &actor.0, &detail)
                        .map_err(AgentError::from)
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = recorded {
            let _ = self.apply_rules(None).await;
            drop(rules);
            let _ = self.runtime.teardown(&name).await;
            return Err(e);
        }
        drop(rules);
        self.refresh_routes()?;
        tracing::info!(app = %name, pinned = %pinned, "installed");
        crate::crashpoint("install:recorded");
        let handle = self.spawn_supervisor(name.clone(), None);
        let (tx, rx) = oneshot::channel();
        if handle.send(Ctl::Start(tx)).await.is_ok() {
            // A failed first start is visible as state and events; the app is installed.
            let _ = rx.await;
        }
        Ok(self.summary(&row))
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
        if lock(&self.apps).contains_key(name) {
            let _ = self.control(name, Ctl::Shutdown).await;
            lock(&self.apps).remove(name);
        }
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
        }
        self.store.delete_app(name)?;
        self.refresh_routes()?;
        tracing::info!(app = %name, purge_data, "removed");
        Ok(())
    }

    fn inspect(&self, name: &AppName) -> Result<AppDetail> {
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
        Ok(AppDetail {
            summary: self.summary(&row),
            command: spec::args(&plan.image, plan.manifest.command.as_deref()),
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
    /// half way), then re-adopt running apps or start those that should run.
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
        for row in rows {
            let name = row.name.clone();
            if row.phase == Phase::Removing {
                tracing::info!(app = %name, "finishing an interrupted removal");
                self.remove(&name, false).await?;
                continue;
            }
            let state = self.runtime.state(&name).await?;
            let alive = state
                .as_ref()
                .and_then(|s| s.pid.filter(|_| s.status == "running"));
            match (row.desired, alive) {
                (Desired::Running, Some(pid)) => {
                    // Running on a rootfs the app has moved on from (an update cut short
                    // between its record and the restart): restart it on the new one, and
                    // say "starting" until then.
                    let current = self
                        .plan(&row)
                        .is_ok_and(|p| crate::runtime::rootfs_is_current(&self.paths, &p));
                    if current {
                        tracing::info!(app = %name, pid, "re-adopted running app");
                        self.spawn_supervisor(name, Some(pid));
                    } else {
                        tracing::info!(app = %name, pid, "re-adopted app runs an older version; restarting it");
                        let ctl = self.spawn_supervisor_in(name, Some(pid), RunState::Starting);
                        let (tx, _rx) = oneshot::channel();
                        let _ = ctl.send(Ctl::Restart(tx)).await;
                    }
                }
                (Desired::Running, None) => {
                    let ctl = self.spawn_supervisor(name, None);
                    let (tx, _rx) = oneshot::channel();
                    let _ = ctl.send(Ctl::Start(tx)).await;
                }
                (Desired::Stopped, Some(pid)) => {
                    // Stopped by its owner while the agent was down mid-stop: finish the stop.
                    self.runtime.stop(&name, Some(pid), self.stop_grace).await?;
                    self.spawn_supervisor(name, None);
                }
                (Desired::Stopped, None) => {
                    self.spawn_supervisor(name, None);
                }
            }
        }
        Ok(())
    }

    fn spawn_supervisor(
        self: &Arc<Self>,
        name: AppName,
        adopted: Option<i32>,
    ) -> mpsc::Sender<Ctl> {
        let initial = match adopted {
            Some(pid) => RunState::Running {
                pid,
                since: now_ms(),
            },
            None => RunState::Stopped,
        };
        self.spawn_supervisor_in(name, adopted, initial)
    }

    fn spawn_supervisor_in(
        self: &Arc<Self>,
        name: AppName,
        adopted: Option<i32>,
        initial: RunState,
    ) -> mpsc::Sender<Ctl> {
        let (ctl_tx, ctl_rx) = mpsc::channel(8);
        let (state_tx, state_rx) = watch::channel(Status {
            run: initial,
            restarts: 0,
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
            pid: adopted,
            restarts: 0,
            streak: 0,
        };
        tokio::spawn(sup.run(ctl_rx));
        ctl_tx
    }
}

/// Delay before restart number `streak` (0-based) of a crashing app: 1 s doubling to 60 s.
pub fn backoff(streak: u32) -> Duration {
    Duration::from_secs(1u64 << streak.min(6)).min(Duration::from_secs(60))
}

/// An app that ran at least this long before crashing starts again with the shortest delay.
const HEALTHY_RUN: Duration = Duration::from_secs(30);
const LOG_CHECK: Duration = Duration::from_secs(5);

type ExitFuture = Pin<Box<dyn Future<Output = ExitStatus> + Send>>;

struct Supervisor {
    inner: Arc<Inner>,
    name: AppName,
    state: watch::Sender<Status>,
    pid: Option<i32>,
    restarts: u32,
    /// Consecutive quick crashes; sets the backoff.
    streak: u32,
}

impl Supervisor {
    fn set(&self, run: RunState) {
        self.state.send_replace(Status {
            run,
            restarts: self.restarts,
        });
    }

    fn event(&self, kind: &str, message: &str) {
        if let Err(e) = self.inner.store.add_event(&self.name, kind, message) {
            tracing::warn!(app = %self.name, error = %e, "cannot record event");
        }
    }

    fn exit_future(&self) -> Option<ExitFuture> {
        let pid = self.pid?;
        let inner = self.inner.clone();
        Some(Box::pin(async move { inner.runtime.wait(pid).await }))
    }

    async fn run(mut self, mut ctl: mpsc::Receiver<Ctl>) {
        let mut exit = self.exit_future();
        let mut started_at = tokio::time::Instant::now();
        let mut restart_at: Option<tokio::time::Instant> = None;
        let mut log_tick = tokio::time::interval(LOG_CHECK);
        loop {
            tokio::select! {
                msg = ctl.recv() => {
                    let Some(msg) = msg else { return };
                    match msg {
                        Ctl::Start(reply) => {
                            restart_at = None;
                            let r = if self.pid.is_some() { Ok(()) } else { self.start().await };
                            exit = self.exit_future();
                            started_at = tokio::time::Instant::now();
                            if let Err(e) = &r {
                                restart_at = Some(self.crashed(&format!("start failed: {}", crate::api::chain(&e))));
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
                }
                status = async { exit.as_mut().expect("guarded").await }, if exit.is_some() => {
                    exit = None;
                    self.pid = None;
                    if started_at.elapsed() >= HEALTHY_RUN {
                        self.streak = 0;
                    }
                    tracing::warn!(app = %self.name, %status, "app exited");
                    restart_at = Some(self.crashed(&status.to_string()));
                }
                _ = async { tokio::time::sleep_until(restart_at.expect("guarded")).await }, if restart_at.is_some() => {
                    restart_at = None;
                    self.restarts += 1;
                    let r = self.start().await;
                    exit = self.exit_future();
                    started_at = tokio::time::Instant::now();
                    if let Err(e) = r {
                        restart_at = Some(self.crashed(&format!("start failed: {}", crate::api::chain(&e))));
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

    /// Records a crash and returns when to restart.
    fn crashed(&mut self, reason: &str) -> tokio::time::Instant {
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
        let prepared = t0.elapsed();
        let pid = self.inner.runtime.start(&self.name).await?;
        tracing::debug!(app = %self.name, ?prepared, total = ?t0.elapsed(), "start timing");
        self.pid = Some(pid);
        self.set(RunState::Running {
            pid,
            since: now_ms(),
        });
        self.event("start", &format!("started (pid {pid})"));
        tracing::info!(app = %self.name, pid, "app started");
        Ok(())
    }

    async fn stop(&mut self) -> Result<()> {
        let pid = self.pid.take();
        self.inner
            .runtime
            .stop(&self.name, pid, self.inner.stop_grace)
            .await?;
        if pid.is_some() {
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
