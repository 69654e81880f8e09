//! Thin wrappers over the system calls the supervisor needs: logging, signals, processes,
//! reboot. Every function here logs or returns its failure; none panics.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::reboot::RebootMode;
use nix::sys::signal::{self, SigSet, Signal};
use nix::sys::time::TimeSpec;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::machine::{Exit, Level, ShutdownKind};

/// The `PATH` given to every program we start.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A kmsg line longer than this is cut (the kernel's limit is about 1 KiB).
const MAX_LOG_LINE: usize = 900;

static KMSG: OnceLock<File> = OnceLock::new();

/// From now on, log to the kernel log (and so to the console) instead of stderr.
pub fn log_to_kmsg() {
    match OpenOptions::new().write(true).open("/dev/kmsg") {
        Ok(file) => {
            let _ = KMSG.set(file);
        }
        Err(e) => log(
            Level::Warn,
            &format!("cannot open /dev/kmsg, logging to stderr: {e}"),
        ),
    }
}

pub fn log(level: Level, message: &str) {
    let mut end = message.len().min(MAX_LOG_LINE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let message = message.get(..end).unwrap_or_default();
    // Nothing sensible is left to do when logging itself fails.
    let _ = match KMSG.get() {
        Some(mut kmsg) => {
            let priority = match level {
                Level::Error => 3,
                Level::Warn => 4,
                Level::Notice => 5,
                Level::Info => 6,
            };
            let shown = matches!(level, Level::Notice | Level::Warn);
            if shown && console_loglevel().is_some_and(|l| l <= priority) {
                // The kernel will not show it: the console gets it from us.
                if let Ok(mut console) = OpenOptions::new().write(true).open("/dev/console") {
                    let _ = console.write_all(format!("homeport-init: {message}\n").as_bytes());
                }
            }
            kmsg.write_all(format!("<{priority}>homeport-init: {message}\n").as_bytes())
        }
        None => writeln!(io::stderr(), "homeport-init: {message}"),
    };
}

/// The kernel's console log level: it shows messages of a lower priority number only.
fn console_loglevel() -> Option<u8> {
    std::fs::read_to_string("/proc/sys/kernel/printk")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn is_pid1() -> bool {
    nix::unistd::getpid() == Pid::from_raw(1)
}

/// The signals we wait for, blocked so that they queue until [`Signals::wait`] takes them.
pub struct Signals(SigSet);

impl Signals {
    pub fn block() -> Signals {
        let set: SigSet = [
            Signal::SIGCHLD,
            Signal::SIGUSR1,
            Signal::SIGUSR2,
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGPWR,
            Signal::SIGHUP,
        ]
        .into_iter()
        .collect();
        if let Err(e) = set.thread_block() {
            log(Level::Error, &format!("cannot block signals: {e}"));
        }
        Signals(set)
    }

    /// Waits up to `timeout` for one of our signals.
    pub fn wait(&self, timeout: Duration) -> Option<Signal> {
        let timeout = TimeSpec::from_duration(timeout);
        // SAFETY: both pointers refer to live, initialised values for the whole call and
        // the kernel keeps neither; a null siginfo pointer is allowed.
        let n =
            unsafe { libc::sigtimedwait(self.0.as_ref(), std::ptr::null_mut(), timeout.as_ref()) };
        // -1 is a timeout (EAGAIN) or an interruption (EINTR): both mean "no signal".
        Signal::try_from(n).ok()
    }
}

/// Prevents orphans from escaping to the real PID 1 when we are not PID 1 ourselves.
pub fn become_subreaper() {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        log(
            Level::Error,
            &format!("cannot become a child subreaper: {e}"),
        );
    }
}

/// Makes Ctrl-Alt-Del send us SIGINT instead of rebooting on the spot.
pub fn disable_ctrl_alt_del() {
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        log(Level::Warn, &format!("cannot disable ctrl-alt-del: {e}"));
    }
}

/// Starts `program` in its own process group with exactly `env`, and does not wait for it.
/// With `console`, its stdio is /dev/console (if that opens); otherwise it inherits ours.
pub fn spawn(
    program: &str,
    args: &[String],
    env: &[(String, String)],
    console: bool,
) -> io::Result<Pid> {
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(env.iter().cloned())
        .process_group(0);
    // We block the signals we wait for, and a blocked mask survives fork and exec: the agent
    // would never see the SIGTERM that asks it to stop.
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // pthread_sigmask, which is async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(|| SigSet::empty().thread_set_mask().map_err(io::Error::from));
    }
    if console {
        match open_console() {
            Ok((stdin, stdout, stderr)) => {
                command.stdin(stdin).stdout(stdout).stderr(stderr);
            }
            Err(e) => log(
                Level::Warn,
                &format!("cannot open /dev/console, the agent inherits our stdio: {e}"),
            ),
        }
    }
    // The Child handle is dropped without waiting: `reap` collects every child.
    let child = command.spawn()?;
    let pid = i32::try_from(child.id()).map_err(|_| io::Error::other("pid out of range"))?;
    Ok(Pid::from_raw(pid))
}

fn open_console() -> io::Result<(File, File, File)> {
    let tty = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/console")?;
    Ok((tty.try_clone()?, tty.try_clone()?, tty))
}

/// Sends `signal` to one process; a process that is already gone is not an error.
pub fn signal(pid: Pid, signal: Signal) {
    match signal::kill(pid, signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => log(Level::Warn, &format!("cannot send {signal} to {pid}: {e}")),
    }
}

/// Sends `signal` to every process except ourselves (only sensible as PID 1).
pub fn signal_everyone(signal: Signal) {
    signal::kill(Pid::from_raw(-1), signal).unwrap_or_else(|e| {
        if e != Errno::ESRCH {
            log(
                Level::Warn,
                &format!("cannot send {signal} to every process: {e}"),
            );
        }
    });
}

/// The children collected by one [`reap`].
pub struct Reaped {
    pub exited: Vec<(Pid, Exit)>,
    /// No child at all is left (ECHILD).
    pub none_left: bool,
}

/// Collects every child that has ended, without blocking.
pub fn reap() -> Reaped {
    let mut exited = vec![];
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => exited.push((pid, Exit::Code(code))),
            Ok(WaitStatus::Signaled(pid, signal, _)) => exited.push((pid, Exit::Signal(signal))),
            Ok(WaitStatus::StillAlive) => {
                return Reaped {
                    exited,
                    none_left: false,
                }
            }
            Ok(_) => {}
            Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => {
                return Reaped {
                    exited,
                    none_left: true,
                }
            }
            Err(e) => {
                log(Level::Error, &format!("waitpid: {e}"));
                return Reaped {
                    exited,
                    none_left: false,
                };
            }
        }
    }
}

/// Reaps until no child is left or `timeout` has passed.
pub fn reap_all(timeout: Duration) {
    let start = Instant::now();
    while !reap().none_left && start.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn sync() {
    nix::unistd::sync();
}

/// Powers off or reboots; returns only if the kernel refused.
pub fn reboot(kind: ShutdownKind) -> Errno {
    let mode = match kind {
        ShutdownKind::Poweroff => RebootMode::RB_POWER_OFF,
        ShutdownKind::Reboot => RebootMode::RB_AUTOBOOT,
    };
    match nix::sys::reboot::reboot(mode) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// Runs a helper program (`btrfs`) to completion with a clean environment and logs its
/// output line by line.
pub fn run_logged(program: &str, args: &[&str]) -> io::Result<ExitStatus> {
    let output = Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", PATH)
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    for line in text.lines().filter(|l| !l.trim().is_empty()).take(100) {
        log(Level::Info, &format!("{program}: {line}"));
    }
    Ok(output.status)
}
