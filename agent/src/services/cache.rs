//! A per-app Redis cache.
//!
//! Every app that asks for a cache gets a `redis-server` of its own, running inside the
//! app's network namespace and listening on `127.0.0.1:6379` and `[::1]:6379` with a random
//! password (`requirepass`). Isolation comes from the namespace (no other app can even reach
//! the port) plus the password, so apps need no key prefixes, and `FLUSHALL`, `SELECT` and
//! `KEYS` do what they expect. An idle server costs about 2.7 MB of private memory (PSS
//! 4.4 MB), within the 5 MB-per-app budget (the tests print it: private 2.7-2.9 MiB; PSS
//! 4.7-5.6 MiB, lower the more servers share the binary's pages; the private part is what
//! each app adds). One shared server with an ACL user per app was
//! rejected: ACLs can confine keys to a prefix but not `SELECT`, `FLUSHDB` or `KEYS`, so it
//! would only be safe if every app cooperated with prefixes.
//!
//! The server:
//! - gets its configuration on stdin (`redis-server -`), so the password never shows in
//!   `/proc/PID/cmdline`; nothing is persisted (`save ""`, `appendonly no`) and `maxmemory`
//!   with `allkeys-lru` evicts;
//! - joins the namespace with `setns` between fork and exec, starts a session of its own (the
//!   agent's death does not take it along) and drops to the `redis` user (or `nobody`);
//! - works in `DIR/empty` ([`EMPTY_DIR`]), a root-owned 0711 directory entered before dropping
//!   privileges (`DIR` itself may be 0700). The config sets no `dir`: redis would `chdir`
//!   after the drop. At start redis looks for `dump.rdb` there and finds none (in a dir it
//!   cannot search it would refuse to start); `SAVE`/`BGSAVE` from an app fail instead of
//!   filling the disk, and `CONFIG SET dir` is a protected config;
//! - logs to `DIR/cache.log`; the agent writes `DIR/cache.pid`.
//!
//! [`Cache::start`] adopts a server left running by an earlier agent when the pidfile names
//! a live `redis-server` in the same namespace that answers with the configured password.
//! Processes are watched through pidfds, so a supervisor can await [`Cache::wait`] for both
//! adopted servers and its own children (which it reaps) without racing pid reuse.
//!
//! Not enforced here: an app can `CONFIG SET maxmemory` on its own server; the memory cgroup
//! the integrator puts the server in ([`CacheConfig::cgroup`]) is the hard cap.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The port the cache listens on inside the app's namespace.
pub const PORT: u16 = 6379;
/// Written by the agent in [`CacheConfig::dir`].
pub const PIDFILE: &str = "cache.pid";
/// The server's stdout and stderr, in [`CacheConfig::dir`].
pub const LOGFILE: &str = "cache.log";
/// The server's working directory, in [`CacheConfig::dir`]: root-owned, 0711, empty.
pub const EMPTY_DIR: &str = "empty";

const READY_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_GRACE: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest bulk reply [`command_in`] accepts.
const MAX_BULK: usize = 64 << 20;
const MAX_DEPTH: usize = 8;

/// What the agent asks for when it starts an app's cache.
#[derive(Clone)]
pub struct CacheConfig {
    pub app: String,
    /// A bind-mounted network namespace file, like `/run/netns/x`.
    pub netns: PathBuf,
    /// A per-app dir owned by root, holding the pidfile and the log.
    pub dir: PathBuf,
    pub password: String,
    /// Bytes; `maxmemory` with `allkeys-lru`. 0 means no limit (redis's meaning).
    pub max_memory: u64,
    /// Carried for the integrator, not applied here: it moves [`Cache::pid`] into the cgroup.
    pub cgroup: Option<(String, String)>,
}

impl std::fmt::Debug for CacheConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheConfig")
            .field("app", &self.app)
            .field("netns", &self.netns)
            .field("dir", &self.dir)
            .field("password", &"<redacted>")
            .field("max_memory", &self.max_memory)
            .field("cgroup", &self.cgroup)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache of app {app}: {reason}")]
    Config { app: String, reason: &'static str },
    #[error("cache of app {app}: {what}")]
    Io {
        app: String,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("cache of app {app} exited while starting ({status}); log: {log}")]
    Exited {
        app: String,
        status: String,
        log: String,
    },
    #[error("cache of app {app} did not answer within {secs} s (last: {last}); log: {log}")]
    NotReady {
        app: String,
        secs: u64,
        last: String,
        log: String,
    },
    #[error("cache of app {app} (pid {pid}) did not exit after SIGKILL")]
    Stuck { app: String, pid: u32 },
    #[error("cache in {}: {what}", netns.display())]
    Net {
        netns: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cache in {} refused the command: {message}", netns.display())]
    Reply { netns: PathBuf, message: String },
    #[error("cache in {}: malformed reply: {what}", netns.display())]
    Protocol { netns: PathBuf, what: String },
}

impl CacheError {
    /// The server refused the password (or wanted one).
    pub fn is_auth(&self) -> bool {
        matches!(self, CacheError::Reply { message, .. }
            if message.starts_with("WRONGPASS") || message.starts_with("NOAUTH"))
    }
}

/// Memory of the server process, from `/proc/PID/smaps_rollup`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUse {
    pub rss: u64,
    pub pss: u64,
    /// Private clean + private dirty: what stopping the server gives back.
    pub private: u64,
}

/// A running cache server (started or adopted). Dropping the handle leaves the server
/// running; the next [`Cache::start`] with the same config adopts it.
pub struct Cache {
    app: String,
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
    pidfile: PathBuf,
    cgroup: Option<(String, String)>,
    /// Set once the exit has been seen (and reaped, for our own children). A lock rather
    /// than a OnceLock: reaping and recording must be one step, or a second waiter could
    /// record "unknown" (ECHILD) before the first records the status.
    exit: Mutex<Option<Option<ExitStatus>>>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("app", &self.app)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// Adopts the server named by the pidfile if it is alive, in `cfg.netns` and answers to
    /// `cfg.password`; otherwise starts a new one and waits until it answers `PING`.
    pub async fn start(cfg: CacheConfig) -> Result<Cache, CacheError> {
        if cfg.password.is_empty() {
            return Err(CacheError::Config {
                app: cfg.app,
                reason: "empty password (redis would run without one)",
            });
        }
        let pidfile = cfg.dir.join(PIDFILE);
        if let Some((pid, pidfd)) = find_running(&cfg, &pidfile)? {
            let cache = Cache::new(&cfg, pid, pidfd, pidfile.clone())?;
            match ping_in(&cfg.netns, &cfg.password).await {
                Ok(()) => {
                    tracing::info!(app = %cfg.app, pid, "adopted running cache");
                    return Ok(cache);
                }
                Err(e) => {
                    tracing::warn!(app = %cfg.app, pid, error = %e, "running cache does not answer; replacing it");
                    cache.stop().await?;
                }
            }
        }

        ensure_loopback(&cfg).await?;
        let (pid, pidfd) = spawn(&cfg)?;
        let cache = Cache::new(&cfg, pid, pidfd, pidfile)?;
        let ready = match write_pidfile(&cache.pidfile, pid) {
            Ok(()) => cache.wait_ready(&cfg).await,
            Err(e) => Err(io_err(&cfg.app, "write pidfile", e)),
        };
        if let Err(e) = ready {
            if let Err(stop) = cache.stop().await {
                tracing::warn!(app = %cfg.app, error = %stop, "stopping a cache that failed to start");
            }
            return Err(e);
        }
        tracing::info!(app = %cfg.app, pid, max_memory = cfg.max_memory, "cache started");
        Ok(cache)
    }

    fn new(
        cfg: &CacheConfig,
        pid: u32,
        pidfd: OwnedFd,
        pidfile: PathBuf,
    ) -> Result<Cache, CacheError> {
        // SAFETY: an OwnedFd is a valid open descriptor that stays open, and always returns
        // the same number from as_raw_fd, for as long as the AsyncFd owns it.
        let pidfd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }
            .map_err(|e| io_err(&cfg.app, "watch the server process", e.into()))?;
        Ok(Cache {
            app: cfg.app.clone(),
            pid,
            pidfd,
            pidfile,
            cgroup: cfg.cgroup.clone(),
            exit: Mutex::new(None),
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn app(&self) -> &str {
        &self.app
    }

    /// The cgroup from [`CacheConfig::cgroup`], for the integrator.
    pub fn cgroup(&self) -> Option<&(String, String)> {
        self.cgroup.as_ref()
    }

    /// Resolves when the server has exited. Our own children are reaped and their status
    /// returned; an adopted server's status is not ours to see (`None`). Cancel-safe; any
    /// number of tasks may wait.
    pub async fn wait(&self) -> Option<ExitStatus> {
        loop {
            if let Some(status) = self.check_exit() {
                return status;
            }
            match self.pidfd.readable().await {
                Ok(mut guard) => {
                    if let Some(status) = self.check_exit() {
                        return status;
                    }
                    guard.clear_ready();
                }
                // The reactor is gone; poll slowly rather than spin or hang.
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    }

    /// `Some` once the process has exited (with its status if it was our child).
    fn check_exit(&self) -> Option<Option<ExitStatus>> {
        let mut exit = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(status) = *exit {
            return Some(status);
        }
        if !pidfd_exited(self.pidfd.get_ref().as_fd()) {
            return None;
        }
        let status = match reap(self.pidfd.get_ref().as_fd()) {
            Ok(status) => status,
            Err(e) => {
                // ECHILD: adopted (not our child) or reaped by another waiter.
                if e.raw_os_error() != Some(libc::ECHILD) {
                    tracing::debug!(app = %self.app, error = %e, "waitid on cache");
                }
                None
            }
        };
        *exit = Some(status);
        Some(status)
    }

    /// SIGTERM, up to 5 s, then SIGKILL; removes the pidfile.
    pub async fn stop(&self) -> Result<(), CacheError> {
        tracing::info!(app = %self.app, pid = self.pid, "stopping cache");
        if self.check_exit().is_none() {
            pidfd_signal(self.pidfd.get_ref().as_fd(), libc::SIGTERM)
                .map_err(|e| io_err(&self.app, "send SIGTERM", e))?;
            if tokio::time::timeout(STOP_GRACE, self.wait()).await.is_err() {
                tracing::warn!(app = %self.app, pid = self.pid, "cache ignored SIGTERM; killing it");
                pidfd_signal(self.pidfd.get_ref().as_fd(), libc::SIGKILL)
                    .map_err(|e| io_err(&self.app, "send SIGKILL", e))?;
                if tokio::time::timeout(STOP_GRACE, self.wait()).await.is_err() {
                    return Err(CacheError::Stuck {
                        app: self.app.clone(),
                        pid: self.pid,
                    });
                }
            }
        }
        // Leave a pidfile alone that a newer server has taken over.
        if read_pidfile(&self.pidfile).ok().flatten() == Some(self.pid) {
            match std::fs::remove_file(&self.pidfile) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&self.app, "remove pidfile", e)),
            }
        }
        tracing::info!(app = %self.app, pid = self.pid, "cache stopped");
        Ok(())
    }

    /// Memory of the server process.
    pub fn memory(&self) -> io::Result<MemoryUse> {
        // After the exit the pid may name another process.
        if self.check_exit().is_some() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("cache of app {} has exited", self.app),
            ));
        }
        let text = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", self.pid))?;
        Ok(parse_smaps_rollup(&text))
    }

    async fn wait_ready(&self, cfg: &CacheConfig) -> Result<(), CacheError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.check_exit() {
                return Err(CacheError::Exited {
                    app: cfg.app.clone(),
                    status: status.map_or_else(|| "unknown status".into(), |s| s.to_string()),
                    log: log_tail(&cfg.dir),
                });
            }
            // PING could be answered by another server holding the port; INFO names the pid.
            let last = match command_in(&cfg.netns, Some(&cfg.password), &["INFO", "server"]).await
            {
                Ok(info) if info_pid(&info) == Some(self.pid) => return Ok(()),
                Ok(_) => "another process answers on the port".to_owned(),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(CacheError::NotReady {
                    app: cfg.app.clone(),
                    secs: READY_TIMEOUT.as_secs(),
                    last,
                    log: log_tail(&cfg.dir),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn info_pid(info: &str) -> Option<u32> {
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
}

fn io_err(app: &str, what: &str, source: io::Error) -> CacheError {
    CacheError::Io {
        app: app.to_owned(),
        what: what.to_owned(),
        source,
    }
}

/// The pid of a live `redis-server` in `cfg.netns` named by the pidfile, with a pidfd that
/// pins it (checked after opening the pidfd, so pid reuse cannot fool us).
fn find_running(cfg: &CacheConfig, pidfile: &Path) -> Result<Option<(u32, OwnedFd)>, CacheError> {
    let pid = match read_pidfile(pidfile) {
        Ok(Some(pid)) => pid,
        Ok(None) => return Ok(None),
        Err(e) => return Err(io_err(&cfg.app, "read pidfile", e)),
    };
    let Ok(pidfd) = pidfd_open(pid) else {
        return Ok(None);
    };
    let ns = std::fs::metadata(&cfg.netns)
        .map_err(|e| io_err(&cfg.app, "stat the network namespace", e))?;
    let is_ours = is_redis_server(pid)
        && std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .is_ok_and(|m| (m.dev(), m.ino()) == (ns.dev(), ns.ino()))
        && !pidfd_exited(pidfd.as_fd());
    if !is_ours {
        tracing::debug!(app = %cfg.app, pid, "pidfile names no cache of this app");
    }
    Ok(is_ours.then_some((pid, pidfd)))
}

fn read_pidfile(path: &Path) -> io::Result<Option<u32>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.trim().parse::<u32>().ok().filter(|&p| p > 0)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn write_pidfile(path: &Path, pid: u32) -> io::Result<()> {
    crate::files::replace(path, format!("{pid}\n").as_bytes(), 0o644)
}

/// The process was exec'd as `redis-server` (its comm) from a redis binary (on Debian
/// `redis-server` is a symlink to `redis-check-rdb`, which /proc/PID/exe shows; after a
/// package upgrade the link reads "... (deleted)").
fn is_redis_server(pid: u32) -> bool {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"));
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"));
    comm.is_ok_and(|c| c.trim_end() == "redis-server")
        && exe.is_ok_and(|exe| {
            exe.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("redis-"))
        })
}

/// `redis-server` on the agent's PATH (falling back to the usual places).
fn redis_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file())
}

/// The uid and gid the server runs as: `redis`, else `nobody`.
fn service_user(app: &str) -> Result<(libc::uid_t, libc::gid_t), CacheError> {
    for name in ["redis", "nobody"] {
        if let Ok(Some(u)) = nix::unistd::User::from_name(name) {
            return Ok((u.uid.as_raw(), u.gid.as_raw()));
        }
    }
    Err(CacheError::Config {
        app: app.to_owned(),
        reason: "neither user redis nor nobody exists",
    })
}

/// Quotes `s` for a redis config file (sdssplitargs syntax).
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for b in s.bytes() {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(char::from(b)),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    out.push('"');
    out
}

fn config_text(cfg: &CacheConfig) -> String {
    format!(
        "port {PORT}\n\
         bind 127.0.0.1 -::1\n\
         protected-mode yes\n\
         requirepass {}\n\
         save \"\"\n\
         appendonly no\n\
         maxmemory {}\n\
         maxmemory-policy allkeys-lru\n\
         daemonize no\n\
         supervised no\n\
         logfile \"\"\n\
         databases 16\n",
        quote(&cfg.password),
        cfg.max_memory
    )
}

/// Forks `redis-server -` into the app's namespace as the service user; returns its pid and
/// a pidfd.
fn spawn(cfg: &CacheConfig) -> Result<(u32, OwnedFd), CacheError> {
    let app = cfg.app.as_str();
    let binary = redis_binary().ok_or(CacheError::Config {
        app: app.to_owned(),
        reason: "redis-server not found on PATH",
    })?;
    let (uid, gid) = service_user(app)?;
    let netns = File::open(&cfg.netns).map_err(|e| io_err(app, "open the network namespace", e))?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(cfg.dir.join(LOGFILE))
        .map_err(|e| io_err(app, "open log", e))?;
    let log2 = log.try_clone().map_err(|e| io_err(app, "open log", e))?;

    let cwd = cfg.dir.join(EMPTY_DIR);
    match std::fs::create_dir(&cwd) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(app, "create the working dir", e)),
    }
    std::fs::set_permissions(&cwd, std::fs::Permissions::from_mode(0o711))
        .map_err(|e| io_err(app, "chmod the working dir", e))?;

    let ns_fd = netns.as_raw_fd();
    let mut cmd = Command::new(&binary);
    cmd.arg("-")
        .current_dir(&cwd)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(log)
        .stderr(log2);
    // SAFETY: the closure runs in the forked child before exec and only makes raw system
    // calls (setns, setsid, setgroups, setgid, setuid), which are async-signal-safe; it
    // allocates nothing (io::Error::last_os_error does not allocate). `ns_fd` stays open
    // in the parent (`netns` lives until after spawn) and hence in the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0
                || libc::setsid() < 0
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| io_err(app, &format!("start {}", binary.display()), e))?;
    drop(netns);
    let pid = child.id();
    // Our unreaped child: the pid cannot be reused before we wait, so this pidfd is it.
    let pidfd = pidfd_open(pid).map_err(|e| io_err(app, "open pidfd", e))?;
    let fed = match child.stdin.take() {
        Some(mut stdin) => stdin.write_all(config_text(cfg).as_bytes()),
        None => Err(io::Error::other("no stdin pipe")),
    };
    // `child` is dropped without waiting: the pidfd is the handle from now on.
    if let Err(e) = fed {
        let _ = pidfd_signal(pidfd.as_fd(), libc::SIGKILL);
        let _ = reap_blocking(pidfd.as_fd());
        return Err(io_err(app, "write configuration", e));
    }
    Ok((pid, pidfd))
}

/// Brings `lo` up in the app's namespace if it is down (the app runtime normally has).
async fn ensure_loopback(cfg: &CacheConfig) -> Result<(), CacheError> {
    let raised = in_netns(&cfg.netns, |netns| {
        crate::runtime::os::loopback_up().map_err(|source| CacheError::Net {
            netns: netns.to_path_buf(),
            what: "bring up loopback",
            source,
        })
    })
    .await?;
    if raised {
        tracing::debug!(app = %cfg.app, "brought up loopback in the app's namespace");
    }
    Ok(())
}

/// The last lines of the server's log, for error messages.
fn log_tail(dir: &Path) -> String {
    const TAIL: u64 = 2048;
    let read = || -> io::Result<String> {
        let mut f = File::open(dir.join(LOGFILE))?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(TAIL)))?;
        let mut buf = Vec::new();
        f.take(TAIL).read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = lines[lines.len().saturating_sub(6)..].join(" | ");
            if tail.is_empty() {
                "(empty)".into()
            } else {
                tail
            }
        }
        Err(e) => format!("(unreadable: {e})"),
    }
}

fn parse_smaps_rollup(text: &str) -> MemoryUse {
    let mut m = MemoryUse {
        rss: 0,
        pss: 0,
        private: 0,
    };
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(key), Some(kb)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(kb) = kb.parse::<u64>() else { continue };
        let bytes = kb * 1024;
        match key {
            "Rss:" => m.rss = bytes,
            "Pss:" => m.pss = bytes,
            "Private_Clean:" | "Private_Dirty:" => m.private += bytes,
            _ => {}
        }
    }
    m
}

// ---- pidfds ----

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open(pid, 0) takes plain integers and returns a new descriptor or -1.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(ret).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_signal(fd: BorrowedFd<'_>, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a valid pidfd, a signal number, no siginfo and no flags.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    match ret {
        0 => Ok(()),
        _ => match io::Error::last_os_error() {
            // Already exited.
            e if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            e => Err(e),
        },
    }
}

/// A pidfd polls readable once its process has exited.
fn pidfd_exited(fd: BorrowedFd<'_>) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP) != 0
}

fn waitid_pidfd(fd: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
    // SAFETY: siginfo_t is plain old data; all-zero is valid (and means "no child" below).
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let id = libc::id_t::try_from(fd.as_raw_fd()).map_err(|_| io::Error::other("bad fd"))?;
    // SAFETY: waitid writes only into `info`, which outlives the call.
    if unsafe { libc::waitid(libc::P_PIDFD, id, &mut info, libc::WEXITED | flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid filled `info` for a SIGCHLD (or left it zeroed): the sigchld fields are
    // the ones to read.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    let raw = match info.si_code {
        libc::CLD_EXITED => (status & 0xff) << 8,
        libc::CLD_DUMPED => (status & 0x7f) | 0x80,
        _ => status & 0x7f,
    };
    Ok(Some(ExitStatus::from_raw(raw)))
}

/// Reaps our exited child; ECHILD for processes that are not our children.
fn reap(fd: BorrowedFd<'_>) -> io::Result<Option<ExitStatus>> {
    waitid_pidfd(fd, libc::WNOHANG)
}

fn reap_blocking(fd: BorrowedFd<'_>) -> io::Result<Option<ExitStatus>> {
    waitid_pidfd(fd, 0)
}

// ---- talking RESP inside a namespace ----

/// Runs `f` on a new thread that has joined the network namespace `netns`. The thread is
/// never reused: `setns` changes only the calling thread, which must not go back to a pool.
async fn in_netns<T, F>(netns: &Path, f: F) -> Result<T, CacheError>
where
    T: Send + 'static,
    F: FnOnce(&Path) -> Result<T, CacheError> + Send + 'static,
{
    let net_err = |what, source| CacheError::Net {
        netns: netns.to_path_buf(),
        what,
        source,
    };
    let ns = File::open(netns).map_err(|e| net_err("open the network namespace", e))?;
    let path = netns.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("cache-netns".into())
        .spawn(move || {
            let result = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| CacheError::Net {
                    netns: path.clone(),
                    what: "enter the network namespace",
                    source: e.into(),
                })
                .and_then(|()| f(&path));
            let _ = tx.send(result);
        })
        .map_err(|e| net_err("start a thread", e))?;
    rx.await.unwrap_or_else(|_| {
        Err(net_err(
            "namespace thread",
            io::Error::other("thread panicked"),
        ))
    })
}

/// `AUTH password` + `PING` against the cache in `netns`.
pub async fn ping_in(netns: &Path, password: &str) -> Result<(), CacheError> {
    let reply = command_in(netns, Some(password), &["PING"]).await?;
    if reply == "PONG" {
        Ok(())
    } else {
        Err(CacheError::Protocol {
            netns: netns.to_path_buf(),
            what: format!("PING answered {reply:?}"),
        })
    }
}

/// Sends one command (after `AUTH` if a password is given) to `127.0.0.1:6379` inside
/// `netns` and returns the reply as text: status and bulk strings as they are, integers in
/// decimal, nil as `(nil)`, arrays one element a line. An error reply is
/// [`CacheError::Reply`].
pub async fn command_in(
    netns: &Path,
    password: Option<&str>,
    args: &[&str],
) -> Result<String, CacheError> {
    let password = password.map(str::to_owned);
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    in_netns(netns, move |netns| {
        let net = |what, source| CacheError::Net {
            netns: netns.to_path_buf(),
            what,
            source,
        };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, PORT));
        let stream =
            TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| net("connect", e))?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| net("set timeouts", e))?;
        let mut conn = Resp {
            reader: BufReader::new(&stream),
            writer: &stream,
        };
        if let Some(pw) = &password {
            conn.call(&["AUTH", pw.as_str()])
                .map_err(|e| net("send AUTH", e))?
                .into_text(netns)?;
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        conn.call(&args)
            .map_err(|e| net("send command", e))?
            .into_text(netns)
    })
    .await
}

#[derive(Debug, PartialEq)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    fn into_text(self, netns: &Path) -> Result<String, CacheError> {
        match self {
            Reply::Error(message) => Err(CacheError::Reply {
                netns: netns.to_path_buf(),
                message,
            }),
            other => Ok(other.render()),
        }
    }

    fn render(self) -> String {
        match self {
            Reply::Simple(s) => s,
            Reply::Error(e) => format!("(error) {e}"),
            Reply::Int(i) => i.to_string(),
            Reply::Bulk(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
            Reply::Bulk(None) | Reply::Array(None) => "(nil)".into(),
            Reply::Array(Some(items)) => items
                .into_iter()
                .map(Reply::render)
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

struct Resp<R, W> {
    reader: R,
    writer: W,
}

impl<R: BufRead, W: Write> Resp<R, W> {
    fn call(&mut self, args: &[&str]) -> io::Result<Reply> {
        self.writer.write_all(&encode(args))?;
        self.writer.flush()?;
        read_reply(&mut self.reader, 0)
    }
}

fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    r.by_ref().take(64 * 1024).read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\r\n") {
        return Err(bad("unterminated line"));
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map_err(|_| bad("line is not UTF-8"))
}

fn read_reply(r: &mut impl BufRead, depth: usize) -> io::Result<Reply> {
    if depth > MAX_DEPTH {
        return Err(bad("nested too deeply"));
    }
    let line = read_line(r)?;
    let (kind, rest) = line.split_at_checked(1).ok_or_else(|| bad("empty line"))?;
    let int = || {
        rest.parse::<i64>()
            .map_err(|_| bad(format!("bad integer {rest:?}")))
    };
    match kind {
        "+" => Ok(Reply::Simple(rest.to_owned())),
        "-" => Ok(Reply::Error(rest.to_owned())),
        ":" => Ok(Reply::Int(int()?)),
        "$" => {
            let Ok(len) = usize::try_from(int()?) else {
                return Ok(Reply::Bulk(None));
            };
            if len > MAX_BULK {
                return Err(bad(format!("bulk of {len} bytes")));
            }
            let mut buf = vec![0; len + 2];
            r.read_exact(&mut buf)?;
            if !buf.ends_with(b"\r\n") {
                return Err(bad("unterminated bulk"));
            }
            buf.truncate(len);
            Ok(Reply::Bulk(Some(buf)))
        }
        "*" => {
            let Ok(n) = usize::try_from(int()?) else {
                return Ok(Reply::Array(None));
            };
            let mut items = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                items.push(read_reply(r, depth + 1)?);
            }
            Ok(Reply::Array(Some(items)))
        }
        _ => Err(bad(format!("unknown reply type {kind:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_for_the_config_file() {
        check_quote("abc", r#""abc""#);
        check_quote(r#"a"b\c d"#, r#""a\"b\\c d""#);
        check_quote("a\nb\u{e9}", r#""a\x0ab\xc3\xa9""#);
    }

    fn check_quote(input: &str, expected: &str) {
        assert_eq!(quote(input), expected, "quote({input:?})");
    }

    #[test]
    fn parses_replies() {
        check_reply(b"+OK\r\n", Reply::Simple("OK".into()));
        check_reply(b"-ERR no\r\n", Reply::Error("ERR no".into()));
        check_reply(b":42\r\n", Reply::Int(42));
        check_reply(b"$3\r\na\r\n\r\n", Reply::Bulk(Some(b"a\r\n".to_vec())));
        check_reply(b"$-1\r\n", Reply::Bulk(None));
        check_reply(b"*-1\r\n", Reply::Array(None));
        check_reply(
            b"*2\r\n$1\r\na\r\n:1\r\n",
            Reply::Array(Some(vec![Reply::Bulk(Some(b"a".to_vec())), Reply::Int(1)])),
        );
        for hostile in [
            &b"$5\r\nab\r\n"[..],
            b"?x\r\n",
            b"+no newline",
            b":x\r\n",
            b"$99999999999\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
        ] {
            assert!(read_reply(&mut &hostile[..], 0).is_err(), "{hostile:?}");
        }
        assert_eq!(
            Reply::Array(Some(vec![Reply::Simple("a".into()), Reply::Bulk(None)])).render(),
            "a\n(nil)"
        );
    }

    fn check_reply(input: &[u8], expected: Reply) {
        assert_eq!(read_reply(&mut &input[..], 0).unwrap(), expected);
    }

    #[test]
    fn smaps_rollup() {
        let m = parse_smaps_rollup(
            "55d0-7ffd ---p 00000000 00:00 0   [rollup]\nRss:  7000 kB\nPss:  4400 kB\n\
             Private_Clean: 100 kB\nPrivate_Dirty: 2600 kB\nShared_Clean: 4300 kB\n",
        );
        assert_eq!(
            m,
            MemoryUse {
                rss: 7000 * 1024,
                pss: 4400 * 1024,
                private: 2700 * 1024
            }
        );
    }

    // ---- against a real redis-server (root) ----

    fn skip_unless_root_with_redis() -> bool {
        let skip = !nix::unistd::geteuid().is_root() || redis_binary().is_none();
        if skip {
            eprintln!("skipped: needs root and redis-server");
        }
        skip
    }

    /// A network namespace bound to a file; unmounted and removed on drop.
    struct Netns(PathBuf);

    impl Netns {
        fn new(path: PathBuf) -> Netns {
            crate::runtime::os::create_netns(&path).unwrap();
            Netns(path)
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = crate::runtime::os::unmount(&self.0);
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Kills a server on drop, whatever happened to the test.
    struct Killer(OwnedFd);

    impl Killer {
        fn of(cache: &Cache) -> Killer {
            Killer(pidfd_open(cache.pid()).unwrap())
        }
    }

    impl Drop for Killer {
        fn drop(&mut self) {
            let _ = pidfd_signal(self.0.as_fd(), libc::SIGKILL);
            let _ = reap_blocking(self.0.as_fd());
        }
    }

    /// Waits for a helper process on drop.
    struct Reaper(std::process::Child);

    impl Drop for Reaper {
        fn drop(&mut self) {
            let _ = self.0.wait();
        }
    }

    /// Per-app dirs and namespaces under one tempdir; fields drop in order (namespaces are
    /// unmounted before the tempdir goes).
    struct World {
        apps: Vec<(Netns, PathBuf)>,
        _tmp: tempfile::TempDir,
    }

    impl World {
        fn new(n: usize) -> World {
            let tmp = tempfile::tempdir().unwrap();
            let apps = (0..n)
                .map(|i| {
                    let dir = tmp.path().join(format!("app{i}"));
                    std::fs::create_dir(&dir).unwrap();
                    // Root-owned and closed to others, as the agent makes it.
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
                    (Netns::new(tmp.path().join(format!("ns{i}"))), dir)
                })
                .collect();
            World { apps, _tmp: tmp }
        }

        fn config(&self, i: usize, password: &str) -> CacheConfig {
            CacheConfig {
                app: format!("app{i}"),
                netns: self.apps[i].0 .0.clone(),
                dir: self.apps[i].1.clone(),
                password: password.into(),
                max_memory: 16 << 20,
                cgroup: None,
            }
        }

        fn ns(&self, i: usize) -> &Path {
            &self.apps[i].0 .0
        }
    }

    fn random_password() -> String {
        use rand::distributions::{Alphanumeric, DistString};
        Alphanumeric.sample_string(&mut rand::thread_rng(), 32)
    }

    fn uid_of(pid: u32) -> u32 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[tokio::test]
    async fn caches_are_isolated_adopted_and_stopped() {
        if skip_unless_root_with_redis() {
            return;
        }
        let world = World::new(2);
        // A password that needs quoting in the config file.
        let pw_a = format!("{} \"quoted\\\" x", random_password());
        let pw_b = random_password();
        let (ns_a, ns_b) = (world.ns(0), world.ns(1));

        let t0 = Instant::now();
        let a = Cache::start(world.config(0, &pw_a)).await.unwrap();
        let started_in = t0.elapsed();
        let _kill_a = Killer::of(&a);
        let b = Cache::start(world.config(1, &pw_b)).await.unwrap();
        let _kill_b = Killer::of(&b);
        eprintln!("cache start to first PONG: {started_in:?}");
        assert_ne!(a.pid(), b.pid());
        let redis_uid = nix::unistd::User::from_name("redis")
            .unwrap()
            .map_or(65534, |u| u.uid.as_raw());
        assert_eq!(uid_of(a.pid()), redis_uid);

        let cmd = |ns: &Path, pw: &str, args: &[&str]| {
            let (ns, pw) = (ns.to_path_buf(), pw.to_owned());
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            async move {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                command_in(&ns, Some(&pw), &args).await
            }
        };
        assert_eq!(cmd(ns_a, &pw_a, &["SET", "k", "in a"]).await.unwrap(), "OK");
        assert_eq!(cmd(ns_a, &pw_a, &["GET", "k"]).await.unwrap(), "in a");
        assert_eq!(
            cmd(ns_b, &pw_b, &["SET", "only-b", "1"]).await.unwrap(),
            "OK"
        );
        // A's 127.0.0.1:6379 is A's server: B's key is not there.
        assert_eq!(cmd(ns_a, &pw_a, &["GET", "only-b"]).await.unwrap(), "(nil)");
        assert_eq!(cmd(ns_a, &pw_a, &["DBSIZE"]).await.unwrap(), "1");
        // B's password does not open A, and no password gets nothing.
        let wrong = cmd(ns_a, &pw_b, &["GET", "k"]).await.unwrap_err();
        assert!(
            wrong.is_auth() && wrong.to_string().contains("WRONGPASS"),
            "{wrong}"
        );
        let none = command_in(ns_a, None, &["GET", "k"]).await.unwrap_err();
        assert!(none.is_auth(), "{none}");
        // What apps get without prefixes: FLUSHALL and SELECT, confined to their own server.
        assert_eq!(cmd(ns_b, &pw_b, &["FLUSHALL"]).await.unwrap(), "OK");
        assert_eq!(cmd(ns_a, &pw_a, &["GET", "k"]).await.unwrap(), "in a");
        assert_eq!(cmd(ns_b, &pw_b, &["SELECT", "15"]).await.unwrap(), "OK");
        // Nothing can be written to disk.
        let save = cmd(ns_a, &pw_a, &["SAVE"]).await.unwrap_err();
        eprintln!("SAVE from an app: {save}");
        let dir = cmd(ns_a, &pw_a, &["CONFIG", "SET", "dir", "/tmp"]).await;
        assert!(dir.is_err(), "{dir:?}");

        let mem = a.memory().unwrap();
        eprintln!(
            "idle cache: rss {} KiB, pss {} KiB, private {} KiB",
            mem.rss >> 10,
            mem.pss >> 10,
            mem.private >> 10
        );
        assert!(mem.private < 5 << 20, "{mem:?}");

        // A supervisor sees its child die, with the status.
        let pid_b = b.pid();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid_b as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(5), b.wait())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(!Path::new(&format!("/proc/{pid_b}")).exists(), "reaped");

        // Dropping the handle leaves the server; start adopts it (same pid, same data).
        let pid_a = a.pid();
        drop(a);
        let a = Cache::start(world.config(0, &pw_a)).await.unwrap();
        assert_eq!(a.pid(), pid_a);
        assert_eq!(cmd(ns_a, &pw_a, &["GET", "k"]).await.unwrap(), "in a");
        assert!(
            tokio::time::timeout(Duration::from_millis(100), a.wait())
                .await
                .is_err(),
            "wait() resolves only on exit"
        );

        // A new password: the running server is replaced.
        let pw_a2 = random_password();
        let a2 = Cache::start(world.config(0, &pw_a2)).await.unwrap();
        let _kill_a2 = Killer::of(&a2);
        assert_ne!(a2.pid(), pid_a);
        // The old handle sees the exit too (the status went to whoever reaped it).
        tokio::time::timeout(Duration::from_secs(1), a.wait())
            .await
            .expect("the old server was stopped");
        assert!(!Path::new(&format!("/proc/{pid_a}")).exists());
        assert_eq!(cmd(ns_a, &pw_a2, &["DBSIZE"]).await.unwrap(), "0");

        let t0 = Instant::now();
        a2.stop().await.unwrap();
        eprintln!("stop: {:?}", t0.elapsed());
        assert!(!Path::new(&format!("/proc/{}", a2.pid())).exists());
        assert!(!world.apps[0].1.join(PIDFILE).exists());
        assert!(command_in(ns_a, Some(&pw_a2), &["PING"]).await.is_err());
    }

    #[tokio::test]
    async fn adopts_a_server_that_is_not_our_child() {
        if skip_unless_root_with_redis() {
            return;
        }
        let world = World::new(1);
        let pw = random_password();
        let cfg = world.config(0, &pw);
        // As after an agent restart: started by someone else in the app's namespace. Its
        // parent is a shell that stays to reap it (this sandbox's PID 1 reaps no orphans).
        let work = world.apps[0].1.join("orphan");
        std::fs::create_dir(&work).unwrap();
        let conf = world.apps[0].1.join("orphan.conf");
        let text = format!("{}dir {}\n", config_text(&cfg), work.display());
        std::fs::write(&conf, text).unwrap();
        let mut shell = Command::new("nsenter")
            .arg(format!("--net={}", cfg.netns.display()))
            .args([
                "sh",
                "-c",
                "redis-server \"$0\" >/dev/null 2>&1 & echo $!; exec >&-; wait",
            ])
            .arg(&conf)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(shell.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let _reap_shell = Reaper(shell);
        let pid: u32 = line.trim().parse().unwrap();
        let _kill = Killer(pidfd_open(pid).unwrap());
        let deadline = Instant::now() + Duration::from_secs(5);
        while ping_in(&cfg.netns, &pw).await.is_err() {
            assert!(Instant::now() < deadline, "orphan redis did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        write_pidfile(&cfg.dir.join(PIDFILE), pid).unwrap();

        let cache = Cache::start(cfg).await.unwrap();
        assert_eq!(cache.pid(), pid);
        let waiter = tokio::spawn(async move {
            let status = cache.wait().await;
            (cache, status)
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let (cache, status) = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        // Not our child: the exit is seen, the status belongs to its real parent.
        assert_eq!(status, None);
        cache.stop().await.unwrap();
        assert!(!world.apps[0].1.join(PIDFILE).exists());
    }

    #[tokio::test]
    async fn loopback_is_brought_up() {
        if skip_unless_root_with_redis() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("ns");
        std::fs::File::create(&path).unwrap();
        // A namespace with `lo` still down, as unshare leaves it.
        let target = path.clone();
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .unwrap();
        })
        .join()
        .unwrap();
        let ns = Netns(path);
        let cfg = CacheConfig {
            app: "loopback".into(),
            netns: ns.0.clone(),
            dir: tmp.path().to_path_buf(),
            password: "x".into(),
            max_memory: 0,
            cgroup: None,
        };
        ensure_loopback(&cfg).await.unwrap();
        // Already up now: a second call changes nothing.
        let raised = in_netns(&ns.0, |_| Ok(crate::runtime::os::loopback_up()))
            .await
            .unwrap();
        assert!(!raised.unwrap());
    }

    #[tokio::test]
    async fn failed_start_reports_the_log() {
        if skip_unless_root_with_redis() {
            return;
        }
        let world = World::new(2);
        let pw = random_password();
        let first = Cache::start(world.config(0, &pw)).await.unwrap();
        let _kill = Killer::of(&first);
        // A second server for the same namespace (other dir, so no pidfile): port taken.
        let mut cfg = world.config(1, &random_password());
        cfg.netns = world.ns(0).to_path_buf();
        cfg.app = "second".into();
        let err = Cache::start(cfg).await.unwrap_err();
        let msg = err.to_string();
        eprintln!("{msg}");
        assert!(matches!(err, CacheError::Exited { .. }), "{msg}");
        assert!(
            msg.contains("cache of app second") && msg.contains("in use"),
            "{msg}"
        );
        first.stop().await.unwrap();
        let empty = Cache::start(world.config(0, "")).await.unwrap_err();
        assert!(matches!(empty, CacheError::Config { .. }));
    }
}
