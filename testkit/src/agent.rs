//! A `homeportd` under test: its own data directory, socket and cgroup parent; killed (or
//! stopped) on drop, with every app removed and every mount under its data dir undone.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use homeport::api::client::Client;

#[derive(Debug, Clone)]
pub struct AgentOpts {
    pub insecure_registries: Vec<String>,
    pub registry_auth: Vec<String>,
    pub stop_grace_secs: u64,
    pub log_cap: Option<u64>,
    /// Extra environment (e.g. HOMEPORT_CRASHPOINT).
    pub env: Vec<(String, String)>,
    /// The network namespace to run the agent in (e.g. [`NetWorld::netns_path`] of
    /// [`NetWorld::dev`]); `None` is the test's own. Only the network namespace changes.
    ///
    /// [`NetWorld::netns_path`]: crate::NetWorld::netns_path
    /// [`NetWorld::dev`]: crate::NetWorld::dev
    pub netns: Option<PathBuf>,
    /// Where the agent's reverse proxy listens (`--proxy-http`, `--proxy-https`); a free port
    /// on every address by default, so agents side by side do not clash.
    pub proxy_http: String,
    pub proxy_https: String,
    /// `--acme-root`: the CA a test ACME server's own HTTPS chains to.
    pub acme_root: Option<PathBuf>,
}

impl Default for AgentOpts {
    fn default() -> Self {
        AgentOpts {
            insecure_registries: Vec::new(),
            registry_auth: Vec::new(),
            stop_grace_secs: 2,
            log_cap: None,
            env: Vec::new(),
            netns: None,
            proxy_http: "[::]:0".into(),
            proxy_https: "[::]:0".into(),
            acme_root: None,
        }
    }
}

enum DataDir {
    Temp(tempfile::TempDir),
    Fixed(PathBuf),
}

impl DataDir {
    fn path(&self) -> &Path {
        match self {
            DataDir::Temp(t) => t.path(),
            DataDir::Fixed(p) => p,
        }
    }
}

pub struct AgentProcess {
    bin: PathBuf,
    data: DataDir,
    cgroup_parent: String,
    opts: AgentOpts,
    child: Option<Child>,
    log: PathBuf,
}

impl AgentProcess {
    /// Starts `bin` (the homeportd binary) and waits until its API answers.
    pub fn start(bin: &Path, opts: AgentOpts) -> Result<AgentProcess> {
        let data = DataDir::Temp(
            tempfile::Builder::new()
                .prefix("homeport-test-")
                .tempdir()?,
        );
        let cgroup_parent = format!("homeport-test-{}-{}", std::process::id(), crate::unique());
        Self::start_with(bin, data, cgroup_parent, opts)
    }

    /// An agent whose state lives in `data_dir` (kept after drop; its apps are removed).
    pub fn start_in(
        bin: &Path,
        data_dir: &Path,
        cgroup_parent: &str,
        opts: AgentOpts,
    ) -> Result<AgentProcess> {
        std::fs::create_dir_all(data_dir)?;
        Self::start_with(
            bin,
            DataDir::Fixed(data_dir.to_path_buf()),
            cgroup_parent.to_string(),
            opts,
        )
    }

    fn start_with(
        bin: &Path,
        data: DataDir,
        cgroup_parent: String,
        opts: AgentOpts,
    ) -> Result<AgentProcess> {
        let log = data.path().join("agent.log");
        let mut a = AgentProcess {
            bin: bin.to_path_buf(),
            data,
            cgroup_parent,
            opts,
            child: None,
            log,
        };
        a.spawn()?;
        Ok(a)
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.data.path().join("agent.sock")
    }

    pub fn client(&self) -> Client {
        Client::new(self.socket())
    }

    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The agent's own log (stderr), for assertions and failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--data-dir")
            .arg(self.data.path())
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent);
        c.arg("--stop-grace")
            .arg(self.opts.stop_grace_secs.to_string());
        c.arg("--proxy-http").arg(&self.opts.proxy_http);
        c.arg("--proxy-https").arg(&self.opts.proxy_https);
        if let Some(root) = &self.opts.acme_root {
            c.arg("--acme-root").arg(root);
        }
        for r in &self.opts.insecure_registries {
            c.arg("--insecure-registry").arg(r);
        }
        for r in &self.opts.registry_auth {
            c.arg("--registry-auth").arg(r);
        }
        if let Some(cap) = self.opts.log_cap {
            c.arg("--log-cap").arg(cap.to_string());
        }
        c.env("HOMEPORT_LOG", "info,homeport=debug");
        for (k, v) in &self.opts.env {
            c.env(k, v);
        }
        c
    }

    /// Starts the agent (again) and waits for its socket to answer.
    pub fn spawn(&mut self) -> Result<()> {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut command = self.command();
        if let Some(ns) = &self.opts.netns {
            in_netns(&mut command, ns)?;
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a signal to the test's or the demo's group must not stop
            // it behind the harness's back (the harness removes its apps, then stops it).
            .process_group(0)
            .spawn()
            .with_context(|| format!("start {}", self.bin.display()))?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(60))
    }

    /// Like [`spawn`](Self::spawn) but with one more environment variable (a crash point).
    pub fn spawn_with_env(&mut self, key: &str, value: &str) -> Result<()> {
        self.opts.env.retain(|(k, _)| k != key);
        self.opts.env.push((key.to_string(), value.to_string()));
        let r = self.spawn();
        self.opts.env.retain(|(k, _)| k != key);
        r
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!(
                        "homeportd exited with {status} before it served; its log:\n{}",
                        self.log()
                    );
                }
            }
            if start.elapsed() > limit {
                bail!(
                    "homeportd did not serve within {limit:?}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9` the agent (its apps keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the agent to exit by itself (e.g. at a crash point); returns its status.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    self.child = None;
                    return Ok(st);
                }
            } else {
                bail!("the agent is not running");
            }
            if start.elapsed() > limit {
                bail!("the agent did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait: a clean agent stop (apps keep running).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: sending a signal to our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    /// Runs the `homeport` CLI binary against this agent.
    pub fn cli(&self, homeport_bin: &Path, args: &[&str]) -> Result<std::process::Output> {
        Ok(Command::new(homeport_bin)
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .stdin(Stdio::null())
            .output()?)
    }

    /// Removes every app (with data) through the API, then stops the agent.
    fn cleanup(&mut self) {
        // An agent that already stopped (a signal to the whole process group) is started
        // again so that it can remove its apps.
        if let Some(c) = self.child.as_mut() {
            if !matches!(c.try_wait(), Ok(None)) {
                self.child = None;
            }
        }
        if self.child.is_none() {
            let _ = self.spawn();
        }
        if self.child.is_some() {
            // On a thread of its own: drop may run inside a test's async runtime.
            let client = self.client();
            let bridge = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                rt.block_on(async {
                    let info: Option<serde_json::Value> = client.get("/v1/info").await.ok();
                    let apps: Vec<serde_json::Value> =
                        client.get("/v1/apps").await.unwrap_or_default();
                    for a in apps {
                        if let Some(name) = a["name"].as_str() {
                            let _ = client
                                .delete(&format!("/v1/apps/{name}?purge_data=true"))
                                .await;
                        }
                    }
                    info.and_then(|i| {
                        Some((
                            i["bridge"].as_str()?.to_string(),
                            i["firewall_table"].as_str().map(str::to_string),
                        ))
                    })
                })
            })
            .join()
            .ok()
            .flatten();
            self.stop();
            // The bridge and the firewall table belong to the device; a test's agent takes
            // its own along. In a namespace that is gone already, they went with it.
            if let Some((bridge, table)) = bridge {
                let mut commands = vec![vec!["ip", "link", "del", bridge.as_str()]];
                if let Some(t) = &table {
                    commands.push(vec!["nft", "delete", "table", "inet", t]);
                }
                for args in commands {
                    let mut del = Command::new(args[0]);
                    del.args(&args[1..]).stderr(std::process::Stdio::null());
                    let entered = match &self.opts.netns {
                        Some(ns) => in_netns(&mut del, ns).is_ok(),
                        None => true,
                    };
                    if entered {
                        let _ = del.status();
                    }
                }
            }
        }
        // The shared database and caches outlive an agent by design; a test's go with it.
        kill_services(self.data.path());
        // Anything still mounted below the data dir (a test that failed half way).
        if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
            let root = self.data.path().to_string_lossy().into_owned();
            let mut points: Vec<&str> = info
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|p| p.starts_with(&root))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                if let Ok(c) = std::ffi::CString::new(p) {
                    // SAFETY: umount2 with a valid C string; failure is harmless here.
                    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                }
            }
        }
        // The parent, after what the agent's services left in it (the shared database's and
        // the caches' cgroups; their processes were killed above and leave them at once, or
        // within a moment).
        for ctrl in cgroup_controllers() {
            let parent = Path::new("/sys/fs/cgroup")
                .join(ctrl)
                .join(&self.cgroup_parent);
            for _ in 0..50 {
                if let Ok(children) = std::fs::read_dir(&parent) {
                    for c in children.flatten() {
                        if c.path().is_dir() {
                            let _ = std::fs::remove_dir(c.path());
                        }
                    }
                }
                if std::fs::remove_dir(&parent).is_ok() || !parent.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Makes `cmd` start in the network namespace at `netns`: the child calls setns before exec.
/// Unlike `ip netns exec`, this leaves the mount namespace (and /sys) alone.
fn in_netns(cmd: &mut Command, netns: &Path) -> Result<()> {
    let ns = File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    // SAFETY: between fork and exec the hook makes only the setns system call (async-signal
    // safe) on a descriptor that it owns, so it stays open as long as `cmd`; it is close-on-
    // exec, so the agent does not inherit it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    Ok(())
}

/// The cgroup hierarchies on this machine (v1 controllers, or "" for a pure v2 mount).
pub fn cgroup_controllers() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().is_dir() && !e.path().is_symlink())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        out = vec![String::new()];
    }
    out
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Kills the PostgreSQL server and cache servers an agent with data dir `data` started.
pub fn kill_services(data: &Path) {
    let mut pids: Vec<i32> = Vec::new();
    let first_line = |p: PathBuf| -> Option<i32> {
        std::fs::read_to_string(p)
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    };
    pids.extend(first_line(
        data.join("services/postgres/data/postmaster.pid"),
    ));
    if let Ok(apps) = std::fs::read_dir(data.join("apps")) {
        for a in apps.flatten() {
            pids.extend(first_line(a.path().join("cache/cache.pid")));
        }
    }
    for pid in pids.into_iter().filter(|p| *p > 1) {
        // SAFETY: kill(2) with a pid read from a pidfile the agent wrote; no memory involved.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// The cgroup directories an app of an agent with `parent` would have.
pub fn cgroup_controllers_for(parent: &str, app: &str) -> Vec<PathBuf> {
    cgroup_controllers()
        .iter()
        .map(|c| Path::new("/sys/fs/cgroup").join(c).join(parent).join(app))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NetWorld;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// A stand-in for homeportd: it records its namespaces, then answers the two requests the
    /// harness's cleanup makes, with a bridge named `tbr0`. perl-base is part of every Debian.
    const FAKE_AGENT: &str = r#"#!/bin/sh
# called as: fake --data-dir DIR ...
readlink /proc/self/ns/net > "$2/netns"
readlink /proc/self/ns/mnt > "$2/mntns"
exec perl -MIO::Socket::UNIX -e '
$SIG{PIPE} = "IGNORE";
my $s = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Local => $ARGV[0], Listen => 5)
    or die "listen: $!";
while (my $c = $s->accept) {
    my $line = <$c> // next;
    while (my $h = <$c>) { last if $h eq "\r\n"; }
    my $body = $line =~ m{^GET /v1/info } ? q({"bridge":"tbr0"}) : "[]";
    print $c "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        . length($body) . "\r\nConnection: close\r\n\r\n" . $body;
    close $c;
}' "$2/agent.sock"
"#;

    #[test]
    fn agent_runs_in_netns_and_takes_its_bridge_along() {
        let world = NetWorld::new().expect("network world");
        let bin_dir = tempfile::tempdir().expect("tempdir");
        let bin = bin_dir.path().join("fake-homeportd");
        std::fs::write(&bin, FAKE_AGENT).expect("write the fake agent");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        world
            .check(
                world.dev(),
                &["ip", "link", "add", "tbr0", "type", "bridge"],
            )
            .expect("bridge");

        let ns = NetWorld::netns_path(world.dev());
        let opts = AgentOpts {
            netns: Some(ns.clone()),
            ..Default::default()
        };
        let agent = AgentProcess::start(&bin, opts).expect("start the fake agent");
        let read = |name: &str| {
            std::fs::read_to_string(agent.data_dir().join(name))
                .expect("namespace record")
                .trim()
                .to_string()
        };
        let ino = std::fs::metadata(&ns).expect("netns file").ino();
        assert_eq!(read("netns"), format!("net:[{ino}]"));
        let own_mnt = std::fs::read_link("/proc/self/ns/mnt").expect("own mount namespace");
        assert_eq!(
            read("mntns"),
            own_mnt.to_string_lossy(),
            "mount namespace changed"
        );

        drop(agent);
        let out = world
            .run(world.dev(), &["ip", "link", "show", "tbr0"])
            .expect("ip link show");
        assert!(!out.status.success(), "the agent's bridge is still there");
    }
}
