//! Running apps: host-side preparation (rootfs, network namespace, bundle) and containers
//! through the zygote.
//!
//! Invariant: only `runtime/zygote.rs` calls libcontainer, and only inside the zygote process.

pub mod idmap;
pub mod logs;
pub mod os;
pub mod spec;
pub mod zygote;

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use crate::manifest::{AppName, Manifest};
use crate::net::Network;
use crate::paths::Paths;
pub use zygote::{ContainerState, ExitStatus};
use zygote::{Op, Reply, Stdio3, Zygote, ZygoteError};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("app {app}: {what}")]
    Io {
        app: AppName,
        what: String,
        source: std::io::Error,
    },
    #[error("app {app}: {message}")]
    Image { app: AppName, message: String },
    #[error("app {app}")]
    Container { app: AppName, source: ZygoteError },
    #[error("app {app} is not running")]
    NotRunning { app: AppName },
}

type Result<T> = std::result::Result<T, RuntimeError>;

/// Everything needed to run an app, from the store, with its templates filled in.
#[derive(Clone)]
pub struct AppPlan {
    pub name: AppName,
    pub manifest: Manifest,
    /// The app's host number in the device's internal IPv4 net.
    pub ipv4_host: u32,
    /// The environment every container of the app gets (standard variables and `[env]`,
    /// rendered), over each image's own.
    pub env: BTreeMap<String, String>,
    /// Where the app's volumes are owned on the host: container id X is host id `base + X`
    /// (`None`: as in the container).
    pub id_base: Option<u32>,
    pub main: ContainerPlan,
    /// `[[container]]`s, in manifest order.
    pub extra: Vec<ContainerPlan>,
}

/// One container of an app.
#[derive(Clone)]
pub struct ContainerPlan {
    /// `None`: the app's main container; else its `[[container]]` name, or `hook`.
    pub name: Option<String>,
    /// Unpacked layers, bottom first.
    pub layers: Vec<PathBuf>,
    pub image: spec::ImageProcess,
    /// Replaces the image's `Cmd` (rendered).
    pub command: Option<Vec<String>>,
    /// Over the app's environment (rendered).
    pub env: BTreeMap<String, String>,
}

impl ContainerPlan {
    /// The container's id: the app's name, or `<app>--<container>`.
    pub fn id(&self, app: &AppName) -> String {
        match &self.name {
            None => app.to_string(),
            Some(n) => format!("{app}--{n}"),
        }
    }

    fn rootfs(&self, paths: &Paths, app: &AppName) -> PathBuf {
        match &self.name {
            None => paths.rootfs(app),
            Some(n) => paths.container(app, n).join("rootfs"),
        }
    }

    fn bundle(&self, paths: &Paths, app: &AppName) -> PathBuf {
        match &self.name {
            None => paths.bundle(app),
            Some(n) => paths.container(app, n).join("bundle"),
        }
    }

    fn dir(&self, paths: &Paths, app: &AppName) -> PathBuf {
        match &self.name {
            None => paths.app(app),
            Some(n) => paths.container(app, n),
        }
    }
}

impl AppPlan {
    pub fn containers(&self) -> impl Iterator<Item = &ContainerPlan> {
        std::iter::once(&self.main).chain(&self.extra)
    }
}

/// What runs of an app: (container id, pid), the main container first.
pub type Running = Vec<(String, i32)>;

pub struct Runtime {
    zygote: Zygote,
    paths: Paths,
    network: Arc<Network>,
    cgroup_parent: String,
    /// A static shell bind-mounted by `debug` into images that have none.
    toolbox: Option<PathBuf>,
    /// The device CA's certificate, added to every app's trust bundle.
    ca_pem: Arc<str>,
}

/// How long an app gets between SIGTERM and SIGKILL, unless configured.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

impl Runtime {
    pub fn new(
        paths: Paths,
        network: Arc<Network>,
        cgroup_parent: String,
        exe: &Path,
        ca_pem: String,
    ) -> std::result::Result<Runtime, ZygoteError> {
        let zygote = Zygote::spawn(exe, &paths.runtime())?;
        let toolbox = ["/usr/lib/homeport/busybox", "/bin/busybox"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists());
        Ok(Runtime {
            zygote,
            paths,
            network,
            cgroup_parent,
            toolbox,
            ca_pem: ca_pem.into(),
        })
    }

    pub fn zygote_pid(&self) -> u32 {
        self.zygote.pid()
    }

    fn cgroups_path(&self, id: &str) -> String {
        format!("/{}/{}", self.cgroup_parent, id)
    }

    /// Mounts the rootfs of each container, creates the network namespace, volumes, hosts
    /// file and bundles. Idempotent: an agent restart or a restart of the app calls it again.
    pub async fn prepare(&self, plan: &AppPlan) -> Result<()> {
        let paths = self.paths.clone();
        let plan = plan.clone();
        let network = self.network.clone();
        let ca_pem = self.ca_pem.clone();
        let parent = self.cgroup_parent.clone();
        tokio::task::spawn_blocking(move || {
            prepare_app(&paths, &network, &plan)?;
            for c in plan.containers() {
                prepare_container(&paths, &plan, c, format!("/{parent}/{}", c.id(&plan.name)))?;
            }
            prepare_files(&paths, &ca_pem, &plan)
        })
        .await
        .unwrap_or_else(|e| panic!("prepare panicked: {e}"))
    }

    /// Creates and starts the app's containers, main first; returns what runs. If one fails,
    /// those started are stopped again.
    pub async fn start(&self, plan: &AppPlan) -> Result<Running> {
        let mut running: Running = Vec::new();
        for c in plan.containers() {
            match self.start_container(plan, c).await {
                Ok(pid) => running.push((c.id(&plan.name), pid)),
                Err(e) => {
                    let _ = self
                        .stop(&plan.name, &running, &[], DEFAULT_STOP_GRACE)
                        .await;
                    return Err(e);
                }
            }
        }
        Ok(running)
    }

    async fn start_container(&self, plan: &AppPlan, c: &ContainerPlan) -> Result<i32> {
        let id = c.id(&plan.name);
        let name = &plan.name;
        // A container left from before (crash, reboot) would make create fail.
        self.call(name, Op::Delete { id: id.clone() }, &[]).await?;
        let reply = self
            .call(
                name,
                Op::Run {
                    id,
                    bundle: c.bundle(&self.paths, name),
                    stdio: Stdio3::Log(self.paths.log(name)),
                },
                &[],
            )
            .await?;
        match reply {
            Reply::Pid(pid) => Ok(pid),
            other => Err(protocol(name, &other)),
        }
    }

    /// Runs `args` to completion in a one-off container (`<app>--hook`) made like `c` (its
    /// image, environment, volumes and the app's network), its output in the app's log.
    /// Gives up (and kills it) after `timeout`.
    pub async fn run_hook(
        &self,
        plan: &AppPlan,
        c: &ContainerPlan,
        args: Vec<String>,
        timeout: Duration,
    ) -> Result<ExitStatus> {
        let hook = ContainerPlan {
            name: Some("hook".into()),
            command: None,
            ..c.clone()
        };
        let name = &plan.name;
        let id = hook.id(name);
        let paths = self.paths.clone();
        let (p, h) = (plan.clone(), hook.clone());
        let cgroups = self.cgroups_path(&id);
        tokio::task::spawn_blocking(move || {
            prepare_container_with(&paths, &p, &h, cgroups, Some(args))
        })
        .await
        .unwrap_or_else(|e| panic!("prepare panicked: {e}"))?;
        let pid = self.start_container(plan, &hook).await?;
        let status = tokio::time::timeout(timeout, self.wait(pid)).await.ok();
        let _ = self
            .call(
                name,
                Op::Kill {
                    id: id.clone(),
                    signal: libc::SIGKILL,
                    all: true,
                },
                &[],
            )
            .await;
        if status.is_none() {
            let _ = self.wait(pid).await;
        }
        self.call(name, Op::Delete { id }, &[]).await?;
        self.remove_container_dir(name, "hook").await?;
        status.ok_or_else(|| RuntimeError::Image {
            app: name.clone(),
            message: format!("the hook did not finish in {}s", timeout.as_secs()),
        })
    }

    /// Unmounts and removes a further container's directory.
    async fn remove_container_dir(&self, name: &AppName, container: &str) -> Result<()> {
        let dir = self.paths.container(name, container);
        let app = name.clone();
        tokio::task::spawn_blocking(move || remove_container_dir(&app, &dir))
            .await
            .unwrap_or_else(|e| panic!("cleanup panicked: {e}"))
    }

    pub async fn wait(&self, pid: i32) -> ExitStatus {
        self.zygote.wait(pid).await
    }

    /// SIGTERM to what runs (further containers first, the main one last), then SIGKILL
    /// after `grace`; then the containers are deleted, also those in `others` (ids of
    /// containers that may exist without running).
    pub async fn stop(
        &self,
        name: &AppName,
        running: &[(String, i32)],
        others: &[String],
        grace: Duration,
    ) -> Result<()> {
        for (id, pid) in running.iter().rev() {
            let term = self
                .call(
                    name,
                    Op::Kill {
                        id: id.clone(),
                        signal: libc::SIGTERM,
                        all: false,
                    },
                    &[],
                )
                .await;
            if term.is_ok() && tokio::time::timeout(grace, self.wait(*pid)).await.is_err() {
                tracing::info!(app = %name, container = %id, "container did not stop in time; killing it");
            }
        }
        let mut ids: Vec<&String> = running.iter().map(|(id, _)| id).collect();
        ids.extend(
            others
                .iter()
                .filter(|o| !running.iter().any(|(id, _)| id == *o)),
        );
        for id in ids {
            self.call(name, Op::Delete { id: id.clone() }, &[]).await?;
        }
        Ok(())
    }

    pub async fn state(&self, name: &AppName) -> Result<Option<ContainerState>> {
        self.container_state(name, name.as_str()).await
    }

    pub async fn container_state(
        &self,
        name: &AppName,
        id: &str,
    ) -> Result<Option<ContainerState>> {
        match self
            .call(name, Op::State { id: id.to_string() }, &[])
            .await?
        {
            Reply::State(s) => Ok(s),
            other => Err(protocol(name, &other)),
        }
    }

    /// Runs `args` inside the running app with the given stdin, stdout and stderr.
    pub async fn exec(&self, name: &AppName, args: Vec<String>, fds: [RawFd; 3]) -> Result<i32> {
        let op = Op::Exec {
            id: name.as_str().to_string(),
            args,
            env: Vec::new(),
            stdio: Stdio3::Passed,
            seccomp: Some(spec::exec_seccomp()),
        };
        match self.call(name, op, &fds).await? {
            Reply::Pid(pid) => Ok(pid),
            other => Err(protocol(name, &other)),
        }
    }

    /// Starts a shell in a new container over the app's filesystem and volumes (for apps that
    /// are stopped or crash-looping). Returns the debug container's id and the shell's pid.
    pub async fn debug(&self, plan: &AppPlan, fds: [RawFd; 3]) -> Result<(String, i32)> {
        self.prepare(plan).await?;
        let name = &plan.name;
        let id = format!("{}--debug-{}", name, rand::random::<u32>());
        let rootfs = self.paths.rootfs(name);
        let mut files = vec![(self.paths.hosts(name), "/etc/hosts".to_string())];
        let args = if rootfs.join("bin/sh").symlink_metadata().is_ok() {
            vec!["/bin/sh".to_string()]
        } else if let Some(tb) = &self.toolbox {
            files.push((tb.clone(), "/.homeport/busybox".into()));
            vec!["/.homeport/busybox".to_string(), "sh".to_string()]
        } else {
            return Err(RuntimeError::Image {
                app: name.clone(),
                message: "the image has no /bin/sh and no debug toolbox is installed".into(),
            });
        };
        let mut input = spec_input(
            &self.paths,
            plan,
            &plan.main,
            self.cgroups_path(&id),
            &rootfs,
        )
        .map_err(|e| RuntimeError::Image {
            app: name.clone(),
            message: e,
        })?;
        input.args = args;
        input.user = spec::User {
            uid: 0,
            gid: 0,
            additional_gids: vec![],
        };
        input.files = files;
        input.netns = None;
        let bundle = self.paths.app(name).join(&id);
        let value = spec::build(&input);
        let io = io_error(name);
        std::fs::create_dir_all(&bundle).map_err(io(format!("create {}", bundle.display())))?;
        std::fs::write(bundle.join("config.json"), value.to_string())
            .map_err(io("write debug bundle".into()))?;
        let reply = self
            .call(
                name,
                Op::Run {
                    id: id.clone(),
                    bundle,
                    stdio: Stdio3::Passed,
                },
                &fds,
            )
            .await?;
        match reply {
            Reply::Pid(pid) => Ok((id, pid)),
            other => Err(protocol(name, &other)),
        }
    }

    pub async fn remove_debug(&self, name: &AppName, id: &str) {
        let _ = self
            .call(name, Op::Delete { id: id.to_string() }, &[])
            .await;
        let _ = std::fs::remove_dir_all(self.paths.app(name).join(id));
    }

    /// Removes everything the runtime made for the app (not its volumes): its containers,
    /// also further ones a later manifest dropped, their rootfs mounts, its network.
    pub async fn teardown(&self, name: &AppName) -> Result<()> {
        let mut ids = vec![name.to_string()];
        if let Ok(entries) = std::fs::read_dir(self.paths.app(name).join("c")) {
            for e in entries.flatten() {
                ids.push(format!("{name}--{}", e.file_name().to_string_lossy()));
            }
        }
        for id in ids {
            self.call(name, Op::Delete { id }, &[]).await?;
        }
        let paths = self.paths.clone();
        let network = self.network.clone();
        let app = name.clone();
        tokio::task::spawn_blocking(move || {
            let io = |what: &str, source| RuntimeError::Io {
                app: app.clone(),
                what: what.into(),
                source,
            };
            network
                .unwire_app(&app)
                .map_err(|e| io("remove the app's network link", e))?;
            if let Ok(entries) = std::fs::read_dir(paths.app(&app).join("c")) {
                for e in entries.flatten() {
                    remove_container_dir(&app, &e.path())?;
                }
            }
            if let Ok(entries) = std::fs::read_dir(paths.app(&app).join("vol")) {
                for e in entries.flatten() {
                    os::unmount(&e.path()).map_err(|e| io("unmount a volume", e))?;
                }
            }
            os::unmount(&paths.rootfs(&app)).map_err(|e| io("unmount rootfs", e))?;
            os::unmount(&paths.netns(&app)).map_err(|e| io("remove network namespace", e))?;
            match std::fs::remove_dir_all(paths.app(&app)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io("remove app directory", e)),
            }
        })
        .await
        .unwrap_or_else(|e| panic!("teardown panicked: {e}"))
    }

    /// Removes further containers the plan no longer has (a manifest update dropped them).
    pub async fn remove_dropped(&self, plan: &AppPlan) -> Result<()> {
        let Ok(entries) = std::fs::read_dir(self.paths.app(&plan.name).join("c")) else {
            return Ok(());
        };
        for e in entries.flatten() {
            let c = e.file_name().to_string_lossy().into_owned();
            if plan
                .extra
                .iter()
                .any(|x| x.name.as_deref() == Some(c.as_str()))
            {
                continue;
            }
            let id = format!("{}--{c}", plan.name);
            self.call(&plan.name, Op::Delete { id }, &[]).await?;
            self.remove_container_dir(&plan.name, &c).await?;
        }
        Ok(())
    }

    async fn call(&self, name: &AppName, op: Op, fds: &[RawFd]) -> Result<Reply> {
        self.zygote
            .call(op, fds)
            .await
            .map_err(|source| RuntimeError::Container {
                app: name.clone(),
                source,
            })
    }
}

fn protocol(name: &AppName, reply: &Reply) -> RuntimeError {
    RuntimeError::Container {
        app: name.clone(),
        source: ZygoteError::Protocol(format!("unexpected reply {reply:?}")),
    }
}

/// Makes `RuntimeError::Io` for the app from what was being done and the error.
fn io_error(
    app: &AppName,
) -> impl Fn(String) -> Box<dyn FnOnce(std::io::Error) -> RuntimeError> + '_ {
    move |what| {
        let app = app.clone();
        Box::new(move |source| RuntimeError::Io { app, what, source })
    }
}

/// What the containers of an app share: its directory, network namespace and wiring, name
/// files.
fn prepare_app(paths: &Paths, network: &Network, plan: &AppPlan) -> Result<()> {
    let name = &plan.name;
    let io = io_error(name);
    let mkdir =
        |p: &Path| std::fs::create_dir_all(p).map_err(io(format!("create {}", p.display())));
    let app_dir = paths.app(name);
    mkdir(&app_dir)?;
    std::fs::set_permissions(&app_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io("chmod app dir".into()))?;
    for d in [paths.logs(name), paths.empty_layer()] {
        mkdir(&d)?;
    }
    mkdir(paths.hosts(name).parent().unwrap_or(&app_dir))?;
    let mounted = os::mount_points().map_err(io("read mountinfo".into()))?;
    let netns = paths.netns(name);
    if !mounted.contains(&netns) {
        os::create_netns(&netns).map_err(io("create network namespace".into()))?;
    }
    network
        .wire_app(name, plan.ipv4_host, &netns)
        .map_err(io("wire the app's network".into()))?;
    std::fs::write(paths.hosts(name), network.hosts_file(name, plan.ipv4_host))
        .map_err(io("write hosts file".into()))?;
    std::fs::write(paths.resolv_conf(name), network.resolv_conf())
        .map_err(io("write resolv.conf".into()))?;
    Ok(())
}

/// What comes from the main container's rootfs: the trust bundle (the image's own plus the
/// device CA) and the owner of new volumes (the user the main container runs as).
fn prepare_files(paths: &Paths, ca_pem: &str, plan: &AppPlan) -> Result<()> {
    let name = &plan.name;
    let io = io_error(name);
    let rootfs = paths.rootfs(name);
    let mut bundle =
        std::fs::read_to_string(rootfs.join(&spec::TRUST_BUNDLE[1..])).unwrap_or_default();
    if !bundle.is_empty() && !bundle.ends_with('\n') {
        bundle.push('\n');
    }
    bundle.push_str(ca_pem);
    std::fs::write(paths.trust_bundle(name), bundle).map_err(io("write trust bundle".into()))?;
    for v in &plan.manifest.volumes {
        let host = paths.volume(name, &v.name);
        let base = plan.id_base.unwrap_or(0);
        if !host.exists() {
            std::fs::create_dir_all(&host).map_err(io(format!("create {}", host.display())))?;
            let user =
                container_user(&rootfs, &plan.main).map_err(|message| RuntimeError::Image {
                    app: name.clone(),
                    message,
                })?;
            chown(host.as_path(), Some(base + user.uid), Some(base + user.gid))
                .map_err(io(format!("chown {}", host.display())))?;
        }
        let Some(base) = plan.id_base else {
            continue;
        };
        // A volume made before it had a range of its own is moved into it.
        let owner = std::fs::metadata(&host)
            .map_err(io(format!("stat {}", host.display())))?
            .uid();
        if owner < idmap::BASE {
            idmap::shift_owner(&host, 0, base).map_err(io(format!(
                "move {} into the app's user id range",
                host.display()
            )))?;
        }
        // The app sees its volume through an idmapped mount: its ids on the inside, the
        // app's own range on the disk.
        let staging = volume_mount(paths, name, &v.name);
        std::fs::create_dir_all(&staging).map_err(io(format!("create {}", staging.display())))?;
        let mounted = idmap::mounted_at(&staging).map_err(io("read mountinfo".into()))?;
        if mounted != idmap::Mounted::Idmapped {
            if mounted == idmap::Mounted::Plain {
                os::unmount(&staging).map_err(io("unmount a volume".into()))?;
            }
            idmap::idmapped_bind(&host, &staging, base, idmap::SLOT_SIZE)
                .map_err(io(format!("mount {} idmapped", host.display())))?;
        }
    }
    Ok(())
}

/// Where an app's volume is mounted idmapped for its containers to bind.
fn volume_mount(paths: &Paths, name: &AppName, volume: &str) -> PathBuf {
    paths.app(name).join("vol").join(volume)
}

/// The kernel's id of the running boot.
pub fn boot_id() -> std::io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_string())
}

/// Removes the container state an earlier boot left in `dir` (libcontainer's root), before
/// anything reads it: it names processes and cgroups that no longer exist, and a power cut
/// can leave its files empty (libcontainer writes them in place), which would make every
/// later operation on that container fail. `dir` is stamped with `boot`; state under a
/// matching stamp is this boot's (an agent restart) and stays. Without a stamp (a runtime
/// made before stamps) nothing is removed. Returns the number of entries removed.
pub fn forget_earlier_boots(dir: &Path, boot: &str) -> std::io::Result<usize> {
    let stamp = dir.join(".boot-id");
    let removed = match std::fs::read_to_string(&stamp) {
        Ok(s) if s.trim() == boot => return Ok(0),
        Ok(_) => {
            let mut n = 0;
            for e in std::fs::read_dir(dir)? {
                let e = e?;
                if e.file_name() == ".boot-id" {
                    continue;
                }
                if e.file_type()?.is_dir() {
                    std::fs::remove_dir_all(e.path())?;
                } else {
                    std::fs::remove_file(e.path())?;
                }
                n += 1;
            }
            n
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    crate::files::replace(&stamp, boot.as_bytes(), 0o644)?;
    Ok(removed)
}

/// Whether this kernel and the data directory's filesystem support idmapped mounts (tried
/// once, at start, in `dir`).
pub fn idmap_supported(dir: &Path) -> bool {
    let (src, dst) = (dir.join("idmap-probe-src"), dir.join("idmap-probe-dst"));
    let ok = std::fs::create_dir_all(&src).is_ok()
        && std::fs::create_dir_all(&dst).is_ok()
        && idmap::idmapped_bind(&src, &dst, idmap::BASE, idmap::SLOT_SIZE).is_ok();
    if ok {
        let _ = os::unmount(&dst);
    }
    let _ = std::fs::remove_dir(&src);
    let _ = std::fs::remove_dir(&dst);
    ok
}

fn prepare_container(
    paths: &Paths,
    plan: &AppPlan,
    c: &ContainerPlan,
    cgroups_path: String,
) -> Result<()> {
    prepare_container_with(paths, plan, c, cgroups_path, None)
}

/// Mounts a container's rootfs (unless it is mounted from the same layers already) and writes
/// its bundle; `args` replaces its command line (hooks).
fn prepare_container_with(
    paths: &Paths,
    plan: &AppPlan,
    c: &ContainerPlan,
    cgroups_path: String,
    args: Option<Vec<String>>,
) -> Result<()> {
    let name = &plan.name;
    let io = io_error(name);
    let mkdir =
        |p: &Path| std::fs::create_dir_all(p).map_err(io(format!("create {}", p.display())));
    let rootfs = c.rootfs(paths, name);
    let bundle = c.bundle(paths, name);
    mkdir(&rootfs)?;
    mkdir(&bundle)?;
    let mounted = os::mount_points().map_err(io("read mountinfo".into()))?;
    // A rootfs mounted for an earlier version of the app (an update, also one interrupted by
    // a crash) is mounted afresh.
    let marker = c.dir(paths, name).join("rootfs.from");
    let identity = rootfs_identity(plan, c);
    let current = mounted.contains(&rootfs)
        && std::fs::read_to_string(&marker).ok().as_deref() == Some(identity.as_str());
    if !current {
        if mounted.contains(&rootfs) {
            os::unmount(&rootfs).map_err(io("unmount the previous rootfs".into()))?;
        }
        // The rootfs is a read-only overlay, so the container runtime cannot create mount
        // points in it: a small top layer of the container's own holds them.
        let points = c.dir(paths, name).join("mountpoints");
        if points.exists() {
            std::fs::remove_dir_all(&points).map_err(io("clear mount points".into()))?;
        }
        os::make_mount_points(&points, &spec::mount_points(&plan.manifest, &c.image))
            .map_err(io("create mount points".into()))?;
        let mut layers = c.layers.clone();
        layers.push(points);
        os::mount_overlay(&layers, &paths.empty_layer(), &rootfs)
            .map_err(io("mount rootfs".into()))?;
        std::fs::write(&marker, identity).map_err(io("record the rootfs".into()))?;
    }
    let mut input = spec_input(paths, plan, c, cgroups_path, &rootfs).map_err(|message| {
        RuntimeError::Image {
            app: name.clone(),
            message,
        }
    })?;
    if let Some(args) = args {
        input.args = args;
    }
    let value = spec::build(&input);
    crate::files::replace(
        &bundle.join("config.json"),
        value.to_string().as_bytes(),
        0o644,
    )
    .map_err(io("write bundle".into()))?;
    Ok(())
}

fn remove_container_dir(app: &AppName, dir: &Path) -> Result<()> {
    let io = |what: &str, source| RuntimeError::Io {
        app: app.clone(),
        what: what.into(),
        source,
    };
    os::unmount(&dir.join("rootfs")).map_err(|e| io("unmount a container's rootfs", e))?;
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove a container's directory", e)),
    }
}

fn container_user(rootfs: &Path, c: &ContainerPlan) -> std::result::Result<spec::User, String> {
    let read = |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap_or_default();
    spec::resolve_user(
        c.image.user.as_deref(),
        &read("etc/passwd"),
        &read("etc/group"),
    )
}

/// The layers and mount points a rootfs is built from, as one comparable string.
fn rootfs_identity(plan: &AppPlan, c: &ContainerPlan) -> String {
    let mut id = String::new();
    for l in &c.layers {
        id.push_str(&format!("layer {}\n", l.display()));
    }
    for (p, file) in spec::mount_points(&plan.manifest, &c.image) {
        id.push_str(&format!("{} {p}\n", if file { "file" } else { "dir" }));
    }
    id
}

/// Whether the app's main rootfs is mounted and was built from `plan`.
pub fn rootfs_is_current(paths: &Paths, plan: &AppPlan) -> bool {
    let marker = paths.app(&plan.name).join("rootfs.from");
    os::mount_points().is_ok_and(|m| m.contains(&paths.rootfs(&plan.name)))
        && std::fs::read_to_string(marker).ok() == Some(rootfs_identity(plan, &plan.main))
}

fn spec_input(
    paths: &Paths,
    plan: &AppPlan,
    c: &ContainerPlan,
    cgroups_path: String,
    rootfs: &Path,
) -> std::result::Result<spec::SpecInput, String> {
    let name = &plan.name;
    let user = container_user(rootfs, c)?;
    let hostname = name.as_str();
    let mut env = plan.env.clone();
    env.extend(c.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(spec::SpecInput {
        hostname: hostname.to_string(),
        rootfs: rootfs.to_path_buf(),
        args: {
            let a = spec::args(&c.image, c.command.as_deref());
            if a.is_empty() {
                return Err(match &c.name {
                    None => "the image has no command and the manifest names none".into(),
                    Some(n) => format!(
                        "container {n}: its image has no command and the manifest names none"
                    ),
                });
            }
            a
        },
        env: spec::env(&c.image, &env, hostname),
        cwd: c
            .image
            .working_dir
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into()),
        user,
        volumes: plan
            .manifest
            .volumes
            .iter()
            .map(|v| {
                let host = match plan.id_base {
                    Some(_) => volume_mount(paths, name, &v.name),
                    None => paths.volume(name, &v.name),
                };
                (host, v.path.clone())
            })
            .collect(),
        files: vec![
            (paths.hosts(name), "/etc/hosts".into()),
            (paths.resolv_conf(name), "/etc/resolv.conf".into()),
            (paths.trust_bundle(name), spec::TRUST_BUNDLE.into()),
        ],
        netns: Some(paths.netns(name)),
        cgroups_path,
        resources: plan.manifest.resources,
        nofile: nofile_limit(),
    })
}

/// Apps get as many open files as the agent may have (its hard limit, at most 1Mi): raising
/// it further needs privileges the agent may not hold.
fn nofile_limit() -> u64 {
    match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        Ok((_, hard)) => hard.min(1 << 20),
        Err(_) => 1024,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_state_of_an_earlier_boot_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let container = |name: &str| {
            std::fs::create_dir_all(root.join(name)).unwrap();
            // What a power cut leaves: libcontainer's files, empty.
            std::fs::write(root.join(name).join("state.json"), "").unwrap();
        };
        container("hello");
        // A runtime from before stamps: nothing is taken away, the stamp is written.
        assert_eq!(forget_earlier_boots(root, "boot-1").unwrap(), 0);
        assert!(root.join("hello/state.json").exists());
        // The same boot (the agent restarted): its containers stay.
        container("web");
        assert_eq!(forget_earlier_boots(root, "boot-1").unwrap(), 0);
        assert!(root.join("hello").exists() && root.join("web").exists());
        // A later boot: every container of the earlier one goes, the stamp moves on.
        std::fs::write(root.join("stray"), "x").unwrap();
        assert_eq!(forget_earlier_boots(root, "boot-2").unwrap(), 3);
        let left: Vec<_> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, [".boot-id"]);
        assert_eq!(
            std::fs::read_to_string(root.join(".boot-id")).unwrap(),
            "boot-2"
        );
        // A stamp a power cut emptied counts as an earlier boot.
        container("hello");
        std::fs::write(root.join(".boot-id"), "").unwrap();
        assert_eq!(forget_earlier_boots(root, "boot-2").unwrap(), 1);
        assert!(!root.join("hello").exists());
    }

    #[test]
    fn the_boot_id_is_the_kernels() {
        let id = boot_id().unwrap();
        assert_eq!(id.len(), 36, "{id}");
        assert_eq!(id, boot_id().unwrap());
    }
}
