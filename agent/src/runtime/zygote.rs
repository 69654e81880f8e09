//! The zygote: a single-threaded helper process that makes every libcontainer call.
//!
//! libcontainer forks with raw `clone3`, skipping fork-safety hooks; from a multi-threaded
//! tokio process a child could hang on a lock another thread held. So `homeportd` re-executes
//! itself as `homeportd zygote` (a fresh single-threaded process) and sends it requests over a
//! `SOCK_SEQPACKET` socket pair: one JSON message per packet, file descriptors (stdio for
//! `exec`/`debug`) attached with `SCM_RIGHTS`. Container init processes are the zygote's
//! children; it reaps them and reports each exit to the agent.
//!
//! Invariant: only this file calls libcontainer.

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// Largest message either side sends (a request carries a command line and environment).
const MAX_MSG: usize = 256 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Stdio3 {
    /// stdin from /dev/null, stdout and stderr appended to this file.
    Log(PathBuf),
    /// stdin, stdout and stderr are the three descriptors sent with the request.
    Passed,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Op {
    /// Create and start a container from a bundle; replies the init process's pid.
    Run {
        id: String,
        bundle: PathBuf,
        stdio: Stdio3,
    },
    /// Run a process in a running container; replies its pid. libcontainer's tenant path does
    /// not apply the container's seccomp profile, so the zygote loads `seccomp` (an OCI
    /// `linux.seccomp` object) itself before starting the process.
    Exec {
        id: String,
        args: Vec<String>,
        env: Vec<(String, String)>,
        stdio: Stdio3,
        seccomp: Option<serde_json::Value>,
    },
    Kill {
        id: String,
        signal: i32,
        all: bool,
    },
    /// Force-delete: kills what runs, removes the cgroup and the state directory.
    Delete {
        id: String,
    },
    /// Status and pid of a container, if libcontainer knows it.
    State {
        id: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Reply {
    Pid(i32),
    Done,
    State(Option<ContainerState>),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerState {
    pub status: String,
    pub pid: Option<i32>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
    /// The process was not our child (adopted after an agent restart): it is gone, the
    /// status is not known.
    Unknown,
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exited with code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s}"),
            ExitStatus::Unknown => write!(f, "exited"),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    id: u64,
    op: Op,
}

#[derive(Debug, Serialize, Deserialize)]
enum FromZygote {
    Reply {
        id: u64,
        result: Result<Reply, String>,
    },
    Exited {
        pid: i32,
        status: ExitStatus,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    #[error("cannot start the runtime helper process")]
    Spawn(#[source] std::io::Error),
    #[error("runtime helper socket")]
    Socket(#[source] nix::Error),
    #[error("the runtime helper process is gone")]
    Gone,
    #[error("{0}")]
    Runtime(String),
    #[error("runtime helper protocol: {0}")]
    Protocol(String),
}

// ---------------------------------------------------------------------------------------
// Agent side

/// Exit statuses that arrived before anyone waited, and waiters for exits not yet seen.
#[derive(Default)]
struct Exits {
    seen: HashMap<i32, ExitStatus>,
    waiting: HashMap<i32, oneshot::Sender<ExitStatus>>,
    children: std::collections::HashSet<i32>,
}

/// Callers waiting for the reply to their request, by request id.
type Pending = Mutex<HashMap<u64, oneshot::Sender<Result<Reply, String>>>>;

pub struct Zygote {
    sock: Arc<OwnedFd>,
    send_lock: Mutex<()>,
    next_id: AtomicU64,
    pending: Arc<Pending>,
    exits: Arc<Mutex<Exits>>,
    child: Mutex<Child>,
    closing: Arc<std::sync::atomic::AtomicBool>,
}

impl Zygote {
    /// Starts `exe zygote --root ROOT` with one end of a socket pair as its stdin.
    pub fn spawn(exe: &Path, root: &Path) -> Result<Zygote, ZygoteError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(ZygoteError::Socket)?;
        let child = Command::new(exe)
            .arg("zygote")
            .arg("--root")
            .arg(root)
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            // Its own process group: a Ctrl-C or a signal to the agent's group must not kill
            // it (it exits when the agent's end of the socket closes). Ignoring the signals
            // instead would be inherited by every container process.
            .process_group(0)
            .spawn()
            .map_err(ZygoteError::Spawn)?;
        let z = Zygote {
            sock: Arc::new(ours),
            send_lock: Mutex::new(()),
            next_id: AtomicU64::new(1),
            pending: Arc::default(),
            exits: Arc::default(),
            child: Mutex::new(child),
            closing: Arc::default(),
        };
        let (sock, pending, exits, closing) = (
            z.sock.clone(),
            z.pending.clone(),
            z.exits.clone(),
            z.closing.clone(),
        );
        std::thread::Builder::new()
            .name("zygote-reader".into())
            .spawn(move || reader(&sock, &pending, &exits, &closing))
            .map_err(ZygoteError::Spawn)?;
        Ok(z)
    }

    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|e| e.into_inner()).id()
    }

    pub async fn call(&self, op: Op, fds: &[RawFd]) -> Result<Reply, ZygoteError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let msg = serde_json::to_vec(&Request { id, op })
            .map_err(|e| ZygoteError::Protocol(e.to_string()))?;
        {
            let _g = lock(&self.send_lock);
            let cmsg = [ControlMessage::ScmRights(fds)];
            let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
            if let Err(e) = sendmsg::<()>(
                self.sock.as_raw_fd(),
                &[IoSlice::new(&msg)],
                cmsgs,
                MsgFlags::empty(),
                None,
            ) {
                lock(&self.pending).remove(&id);
                return Err(ZygoteError::Socket(e));
            }
        }
        let reply = rx
            .await
            .map_err(|_| ZygoteError::Gone)?
            .map_err(ZygoteError::Runtime)?;
        if let Reply::Pid(pid) = reply {
            lock(&self.exits).children.insert(pid);
        }
        Ok(reply)
    }

    /// Waits for a process to exit. Children of the zygote report their status; other
    /// processes (adopted after an agent restart) are watched through a pidfd.
    pub async fn wait(&self, pid: i32) -> ExitStatus {
        let rx = {
            let mut ex = lock(&self.exits);
            if let Some(st) = ex.seen.remove(&pid) {
                ex.children.remove(&pid);
                return st;
            }
            if ex.children.contains(&pid) {
                let (tx, rx) = oneshot::channel();
                ex.waiting.insert(pid, tx);
                Some(rx)
            } else {
                None
            }
        };
        match rx {
            Some(rx) => rx.await.unwrap_or(ExitStatus::Unknown),
            None => {
                wait_pidfd(pid).await;
                ExitStatus::Unknown
            }
        }
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        // Closing our end makes the zygote exit; containers keep running.
        self.closing.store(true, Ordering::SeqCst);
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let _ = child.wait();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn wait_pidfd(pid: i32) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return; // already gone
    }
    // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // SAFETY: the AsyncFd owns `fd` (an OwnedFd) for its whole life, so the descriptor stays
    // open and refers to the same pidfd until it is dropped.
    match unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    } {
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(e) => tracing::warn!(pid, error = %e, "cannot watch process"),
    }
}

fn reader(
    sock: &OwnedFd,
    pending: &Pending,
    exits: &Mutex<Exits>,
    closing: &std::sync::atomic::AtomicBool,
) {
    let mut buf = vec![0u8; MAX_MSG];
    loop {
        let n = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(sock.as_raw_fd(), &mut iov, None, MsgFlags::empty()) {
                Ok(m) => m.bytes,
                Err(nix::Error::EINTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "runtime helper socket failed");
                    0
                }
            }
        };
        if n == 0 {
            // Fail every caller still waiting; an agent without its zygote cannot manage
            // containers, so it exits and is restarted (it re-adopts running apps).
            lock(pending).clear();
            if !closing.load(Ordering::SeqCst) {
                tracing::error!(
                    "the runtime helper process exited; the agent stops so it can be restarted"
                );
                std::process::exit(70);
            }
            return;
        }
        match serde_json::from_slice::<FromZygote>(&buf[..n]) {
            Ok(FromZygote::Reply { id, result }) => {
                if let Some(tx) = lock(pending).remove(&id) {
                    let _ = tx.send(result);
                }
            }
            Ok(FromZygote::Exited { pid, status }) => {
                let mut ex = lock(exits);
                if let Some(tx) = ex.waiting.remove(&pid) {
                    if let Err(status) = tx.send(status) {
                        // The waiter gave up; keep the status for the next one.
                        ex.seen.insert(pid, status);
                    } else {
                        ex.children.remove(&pid);
                    }
                } else {
                    ex.seen.insert(pid, status);
                }
            }
            Err(e) => tracing::error!(error = %e, "runtime helper sent an invalid message"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Zygote side

/// Entry point of `homeportd zygote`: serves requests on stdin until the agent goes away.
/// Runs single-threaded; never returns.
pub fn serve(root: &Path) -> ! {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};

    // SAFETY: fd 0 was set up by the agent as our end of the socket pair and is owned by
    // nothing else in this process.
    let sock = unsafe { OwnedFd::from_raw_fd(0) };
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    // SIGCHLD is blocked (so signalfd sees it) except around libcontainer calls, so that
    // container processes never inherit a blocked SIGCHLD.
    let _ = chld.thread_block();
    // Processes started by `exec` are orphaned when the short-lived process that built them
    // exits; as a subreaper the zygote still reaps them and reports their exit status.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        eprintln!("homeportd zygote: cannot become a subreaper: {e}");
    }
    let sfd = match SignalFd::with_flags(&chld, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("homeportd zygote: signalfd: {e}");
            std::process::exit(71);
        }
    };
    let mut buf = vec![0u8; MAX_MSG];
    let mut cmsg = nix::cmsg_space!([RawFd; 3]);
    loop {
        let (sock_ready, sig_ready) = {
            let mut fds = [
                PollFd::new(sock.as_fd(), PollFlags::POLLIN),
                PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::Error::EINTR) => continue,
                Err(_) => std::process::exit(72),
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]))
        };
        if sig_ready {
            while let Ok(Some(_)) = sfd.read_signal() {}
        }
        if sock_ready {
            let (n, fds) = {
                let mut iov = [IoSliceMut::new(&mut buf)];
                match recvmsg::<()>(
                    sock.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                ) {
                    Ok(m) => {
                        let mut fds = Vec::new();
                        if let Ok(cmsgs) = m.cmsgs() {
                            for c in cmsgs {
                                if let ControlMessageOwned::ScmRights(v) = c {
                                    // SAFETY: SCM_RIGHTS installed these descriptors in
                                    // this process for us; nothing else owns them.
                                    fds.extend(
                                        v.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                                    );
                                }
                            }
                        }
                        (m.bytes, fds)
                    }
                    Err(nix::Error::EINTR) => continue,
                    Err(_) => std::process::exit(0),
                }
            };
            if n == 0 {
                std::process::exit(0); // the agent is gone; containers keep running
            }
            let msg = match serde_json::from_slice::<Request>(&buf[..n]) {
                Ok(req) => {
                    let _ = chld.thread_unblock();
                    let result = handle(root, req.op, fds);
                    let _ = chld.thread_block();
                    FromZygote::Reply { id: req.id, result }
                }
                Err(e) => FromZygote::Reply {
                    id: 0,
                    result: Err(format!("invalid request: {e}")),
                },
            };
            send(&sock, &msg);
        }
        reap(&sock);
    }
}

fn send(sock: &OwnedFd, msg: &FromZygote) {
    if let Ok(bytes) = serde_json::to_vec(msg) {
        if sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&bytes)],
            &[],
            MsgFlags::empty(),
            None,
        )
        .is_err()
        {
            std::process::exit(0);
        }
    }
}

fn reap(sock: &OwnedFd) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => send(
                sock,
                &FromZygote::Exited {
                    pid: pid.as_raw(),
                    status: ExitStatus::Code(code),
                },
            ),
            Ok(WaitStatus::Signaled(pid, sig, _)) => send(
                sock,
                &FromZygote::Exited {
                    pid: pid.as_raw(),
                    status: ExitStatus::Signal(sig as i32),
                },
            ),
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}

fn handle(root: &Path, op: Op, fds: Vec<OwnedFd>) -> Result<Reply, String> {
    use libcontainer::container::builder::ContainerBuilder;
    use libcontainer::container::Container;
    use libcontainer::syscall::syscall::SyscallType;

    let builder =
        |id: &str, stdio: &Stdio3, fds: Vec<OwnedFd>| -> Result<ContainerBuilder, String> {
            let b = ContainerBuilder::new(id.to_string(), SyscallType::default())
                .with_root_path(root)
                .map_err(|e| e.to_string())?;
            let (i, o, e) = stdio_fds(stdio, fds)?;
            Ok(b.with_stdin(i).with_stdout(o).with_stderr(e))
        };
    let load =
        |id: &str| Container::load(root.join(id)).map_err(|e| format!("container {id}: {e}"));
    match op {
        Op::Run { id, bundle, stdio } => {
            let t0 = std::time::Instant::now();
            let mut c = builder(&id, &stdio, fds)?
                .as_init(&bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .map_err(|e| format!("create container {id}: {e}"))?;
            let t1 = t0.elapsed();
            if let Err(e) = c.start() {
                let _ = c.delete(true);
                return Err(format!("start container {id}: {e}"));
            }
            let pid = c
                .pid()
                .ok_or_else(|| format!("container {id} has no process"))?;
            tracing::debug!(container = %id, create = ?t1, total = ?t0.elapsed(), "container started");
            Ok(Reply::Pid(pid.as_raw()))
        }
        Op::Exec {
            id,
            args,
            env,
            stdio,
            seccomp,
        } => {
            let build = move || -> Result<i32, String> {
                if let Some(profile) = &seccomp {
                    let profile: oci_spec::runtime::LinuxSeccomp =
                        serde_json::from_value(profile.clone())
                            .map_err(|e| format!("seccomp profile: {e}"))?;
                    libcontainer::seccomp::initialize_seccomp(&profile)
                        .map_err(|e| format!("load seccomp profile: {e}"))?;
                }
                let pid = builder(&id, &stdio, fds)?
                    .as_tenant()
                    .with_container_args(args)
                    .with_env(env.into_iter().collect())
                    .with_detach(true)
                    .build()
                    .map_err(|e| format!("exec in container {id}: {e}"))?;
                Ok(pid.as_raw())
            };
            in_child(build).map(Reply::Pid)
        }
        Op::Kill { id, signal, all } => {
            let mut c = load(&id)?;
            let sig = nix::sys::signal::Signal::try_from(signal).map_err(|e| e.to_string())?;
            c.kill(sig, all)
                .map_err(|e| format!("signal container {id}: {e}"))?;
            Ok(Reply::Done)
        }
        Op::Delete { id } => {
            if !root.join(&id).exists() {
                return Ok(Reply::Done);
            }
            let mut c = load(&id)?;
            c.delete(true)
                .map_err(|e| format!("delete container {id}: {e}"))?;
            Ok(Reply::Done)
        }
        Op::State { id } => {
            if !root.join(&id).join("state.json").exists() {
                return Ok(Reply::State(None));
            }
            let mut c = load(&id)?;
            c.refresh_status()
                .map_err(|e| format!("container {id}: {e}"))?;
            Ok(Reply::State(Some(ContainerState {
                status: format!("{:?}", c.status()).to_lowercase(),
                pid: c.pid().map(|p| p.as_raw()),
            })))
        }
    }
}

/// Runs `f` in a forked child (the zygote is single-threaded, so forking is safe) and returns
/// its result: a seccomp filter loaded there binds only that child and what it starts.
fn in_child(f: impl FnOnce() -> Result<i32, String>) -> Result<i32, String> {
    use std::io::{Read, Write};
    let (r, w) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: the zygote is single-threaded, so the child starts with consistent locks; it
    // only runs `f`, writes the result and calls _exit.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(format!("fork: {e}")),
        Ok(nix::unistd::ForkResult::Child) => {
            drop(r);
            let result = f();
            let mut w = std::fs::File::from(w);
            let _ = w.write_all(
                serde_json::to_string(&result)
                    .unwrap_or_default()
                    .as_bytes(),
            );
            drop(w);
            // SAFETY: _exit ends the child without running destructors or atexit handlers
            // that belong to the zygote.
            unsafe { libc::_exit(0) }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(w);
            let mut out = String::new();
            let read = std::fs::File::from(r).read_to_string(&mut out);
            let _ = nix::sys::wait::waitpid(child, None);
            read.map_err(|e| format!("read from the exec helper: {e}"))?;
            serde_json::from_str::<Result<i32, String>>(&out)
                .map_err(|_| "the exec helper died before it answered".to_string())?
        }
    }
}

fn stdio_fds(stdio: &Stdio3, fds: Vec<OwnedFd>) -> Result<(OwnedFd, OwnedFd, OwnedFd), String> {
    match stdio {
        Stdio3::Log(path) => {
            let null = std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("log file {}: {e}", path.display()))?;
            let log2 = log.try_clone().map_err(|e| e.to_string())?;
            Ok((null.into(), log.into(), log2.into()))
        }
        Stdio3::Passed => {
            let mut it = fds.into_iter();
            match (it.next(), it.next(), it.next()) {
                (Some(i), Some(o), Some(e)) => Ok((i, o, e)),
                _ => Err("exec needs three descriptors (stdin, stdout, stderr)".into()),
            }
        }
    }
}
