//! Running apps: host-side preparation (rootfs, network namespace, bundle) and containers
//! through the zygote.
//!
//! Invariant: only `runtime/zygote.rs` calls libcontainer, and only inside the zygote process.

pub mod idmap;
pub mod logs;
pub mod os;
pub mod spec;
pub mod zygote;

use std::collections::HashSet;
use std::os::fd::RawFd;
use std::os::unix::fs::{chown, PermissionsExt};
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

/// Everything needed to run an app, from the store.
pub struct AppPlan {
    pub name: AppName,
    pub manifest: Manifest,
    /// Unpacked layers, bottom first.
    pub layers: Vec<PathBuf>,
    pub image: spec::ImageProcess,
    /// The app's host number in the device's internal IPv4 net.
    pub ipv4_host: u32,
}

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

    /// Mounts the rootfs, creates the network namespace, volumes, hosts file and bundle.
    /// Idempotent: an agent restart or a restart of the app calls it again.
    pub async fn prepare(&self, plan: &AppPlan) -> Result<()> {
        let paths = self.paths.clone();
        let cgroups_path = self.cgroups_path(plan.name.as_str());
        let plan = AppPlan {
            name: plan.name.clone(),
            manifest: plan.manifest.clone(),
            layers: plan.layers.clone(),
            image: plan.image.clone(),
            ipv4_host: plan.ipv4_host,
        };
        let network = self.network.clone();
        let ca_pem = self.ca_pem.clone();
        tokio::task::spawn_blocking(move || {
            prepare_blocking(&paths, &network, &ca_pem, &plan, cgroups_path)
        })
        .await
        .unwrap_or_else(|e| panic!("prepare panicked: {e}"))
    }

    /// Creates and starts the app's container; returns the pid of its first process.
    pub async fn start(&self, name: &AppName) -> Result<i32> {
        let id = name.as_str().to_string();
        // A container left from before (crash, reboot) would make create fail.
        self.call(name, Op::Delete { id: id.clone() }, &[]).await?;
        let reply = self
            .call(
                name,
                Op::Run {
                    id,
                    bundle: self.paths.bundle(name),
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

    pub async fn wait(&self, pid: i32) -> ExitStatus {
        self.zygote.wait(pid).await
    }

    /// SIGTERM, then SIGKILL after `grace`; then the container is deleted.
    pub async fn stop(&self, name: &AppName, pid: Option<i32>, grace: Duration) -> Result<()> {
        let id = name.as_str().to_string();
        if let Some(pid) = pid {
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
            if term.is_ok() && tokio::time::timeout(grace, self.wait(pid)).await.is_err() {
                tracing::info!(app = %name, "app did not stop in time; killing it");
            }
        }
        self.call(name, Op::Delete { id }, &[]).await?;
        Ok(())
    }

    pub async fn state(&self, name: &AppName) -> Result<Option<ContainerState>> {
        match self
            .call(
                name,
                Op::State {
                    id: name.as_str().to_string(),
                },
                &[],
            )
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
        let mut input =
            spec_input(&self.paths, plan, self.cgroups_path(&id), &rootfs).map_err(|e| {
                RuntimeError::Image {
                    app: name.clone(),
                    message: e,
                }
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
        let io = |what: String| {
            let app = name.clone();
            move |source| RuntimeError::Io { app, what, source }
        };
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

    /// Removes everything the runtime made for the app (not its volumes).
    pub async fn teardown(&self, name: &AppName) -> Result<()> {
        self.call(
            name,
            Op::Delete {
                id: name.as_str().to_string(),
            },
            &[],
        )
        .await?;
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

fn prepare_blocking(
    paths: &Paths,
    network: &Network,
    ca_pem: &str,
    plan: &AppPlan,
    cgroups_path: String,
) -> Result<()> {
    let name = &plan.name;
    let io = |what: String| {
        let app = name.clone();
        move |source| RuntimeError::Io { app, what, source }
    };
    let mkdir =
        |p: &Path| std::fs::create_dir_all(p).map_err(io(format!("create {}", p.display())));
    let app_dir = paths.app(name);
    mkdir(&app_dir)?;
    std::fs::set_permissions(&app_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io("chmod app dir".into()))?;
    for d in [
        paths.rootfs(name),
        paths.bundle(name),
        paths.logs(name),
        paths.empty_layer(),
    ] {
        mkdir(&d)?;
    }
    mkdir(paths.hosts(name).parent().unwrap_or(&app_dir))?;

    let rootfs = paths.rootfs(name);
    let mounted = os::mount_points().map_err(io("read mountinfo".into()))?;
    // A rootfs mounted for an earlier version of the app (an update, also one interrupted by
    // a crash) is mounted afresh.
    if !rootfs_current(paths, plan, &mounted) {
        if mounted.contains(&rootfs) {
            os::unmount(&rootfs).map_err(io("unmount the previous rootfs".into()))?;
        }
        // The rootfs is a read-only overlay, so the container runtime cannot create mount
        // points in it: a small top layer of the app's own holds them.
        let points = paths.app(name).join("mountpoints");
        if points.exists() {
            std::fs::remove_dir_all(&points).map_err(io("clear mount points".into()))?;
        }
        os::make_mount_points(&points, &spec::mount_points(&plan.manifest, &plan.image))
            .map_err(io("create mount points".into()))?;
        let mut layers = plan.layers.clone();
        layers.push(points);
        os::mount_overlay(&layers, &paths.empty_layer(), &rootfs)
            .map_err(io("mount rootfs".into()))?;
        std::fs::write(rootfs_marker(paths, name), rootfs_identity(plan))
            .map_err(io("record the rootfs".into()))?;
    }
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
    // The app trusts what its image trusts, and the device (its proxy, the other apps).
    let mut bundle =
        std::fs::read_to_string(rootfs.join(&spec::TRUST_BUNDLE[1..])).unwrap_or_default();
    if !bundle.is_empty() && !bundle.ends_with('\n') {
        bundle.push('\n');
    }
    bundle.push_str(ca_pem);
    std::fs::write(paths.trust_bundle(name), bundle).map_err(io("write trust bundle".into()))?;

    let input =
        spec_input(paths, plan, cgroups_path, &rootfs).map_err(|message| RuntimeError::Image {
            app: name.clone(),
            message,
        })?;
    for (host, _) in &input.volumes {
        if !host.exists() {
            mkdir(host)?;
            // A new volume belongs to the user the app runs as.
            chown(host, Some(input.user.uid), Some(input.user.gid))
                .map_err(io(format!("chown {}", host.display())))?;
        }
    }
    let value = spec::build(&input);
    let tmp = paths.bundle(name).join("config.json.tmp");
    std::fs::write(&tmp, value.to_string()).map_err(io("write bundle".into()))?;
    std::fs::rename(&tmp, paths.bundle(name).join("config.json"))
        .map_err(io("write bundle".into()))?;
    Ok(())
}

/// The layers and mount points a rootfs is built from, as one comparable string.
fn rootfs_identity(plan: &AppPlan) -> String {
    let mut id = String::new();
    for l in &plan.layers {
        id.push_str(&format!("layer {}\n", l.display()));
    }
    for (p, file) in spec::mount_points(&plan.manifest, &plan.image) {
        id.push_str(&format!("{} {p}\n", if file { "file" } else { "dir" }));
    }
    id
}

/// Beside each mounted rootfs: what it was built from (`rootfs_identity`).
fn rootfs_marker(paths: &Paths, name: &AppName) -> PathBuf {
    paths.app(name).join("rootfs.from")
}

fn rootfs_current(paths: &Paths, plan: &AppPlan, mounted: &HashSet<PathBuf>) -> bool {
    mounted.contains(&paths.rootfs(&plan.name))
        && std::fs::read_to_string(rootfs_marker(paths, &plan.name)).ok()
            == Some(rootfs_identity(plan))
}

/// Whether the app's mounted rootfs was built from `plan` (false also when not mounted).
pub fn rootfs_is_current(paths: &Paths, plan: &AppPlan) -> bool {
    os::mount_points().is_ok_and(|m| rootfs_current(paths, plan, &m))
}

fn spec_input(
    paths: &Paths,
    plan: &AppPlan,
    cgroups_path: String,
    rootfs: &Path,
) -> std::result::Result<spec::SpecInput, String> {
    let name = &plan.name;
    let read = |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap_or_default();
    let user = spec::resolve_user(
        plan.image.user.as_deref(),
        &read("etc/passwd"),
        &read("etc/group"),
    )?;
    let hostname = name.as_str();
    Ok(spec::SpecInput {
        hostname: hostname.to_string(),
        rootfs: rootfs.to_path_buf(),
        args: {
            let a = spec::args(&plan.image, plan.manifest.command.as_deref());
            if a.is_empty() {
                return Err("the image has no command and the manifest names none".into());
            }
            a
        },
        env: spec::env(&plan.image, &plan.manifest.env, hostname),
        cwd: plan
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
            .map(|v| (paths.volume(name, &v.name), v.path.clone()))
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
