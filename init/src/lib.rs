//! `homeport-init`: the appliance's PID 1.
//!
//! As PID 1 it mounts the API filesystems and the data partition, sets the hostname, brings
//! up loopback ([`system`]), then supervises the agent: starts it as its only child, restarts
//! it with backoff, reaps orphans, and powers off or reboots when asked by signal.
//!
//! Run by anyone else it is a plain supervisor ("supervisor mode", for tests): no mounts, no
//! hostname, no reboot; it makes itself a child subreaper, supervises the command in
//! `HOMEPORT_INIT_AGENT`, and on a request stops it and exits with [`EXIT_POWEROFF`] or
//! [`EXIT_REBOOT`].
//!
//! Layout: `machine` holds every decision and does no I/O; `os` and `system` hold every
//! system call; this file only connects them. Invariant: nothing here panics or returns
//! in PID 1 mode, because PID 1 exiting panics the kernel.

mod machine;
mod os;
mod system;

use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use machine::{Action, Event, Exit, Level, ShutdownKind, State};

/// The agent started when `HOMEPORT_INIT_AGENT` is not set.
pub const DEFAULT_AGENT: &str = "/usr/bin/homeportd --data-dir /data/homeport";
/// Environment variable overriding the agent: a program and its arguments, split on spaces.
pub const AGENT_ENV: &str = "HOMEPORT_INIT_AGENT";
/// Exit code in supervisor mode after a poweroff request.
pub const EXIT_POWEROFF: u8 = 10;
/// Exit code in supervisor mode after a reboot request.
pub const EXIT_REBOOT: u8 = 11;

/// Longest wait for a signal when no deadline is pending.
const IDLE_WAIT: Duration = Duration::from_secs(60);
/// How long to reap killed processes before syncing and unmounting.
const KILL_REAP_WAIT: Duration = Duration::from_secs(2);

/// Runs init; returns (the exit code) only in supervisor mode.
pub fn run() -> u8 {
    let pid1 = os::is_pid1();
    match panic::catch_unwind(AssertUnwindSafe(|| run_inner(pid1))) {
        Ok(code) => code,
        Err(_) => {
            os::log(Level::Error, "panicked, rebooting");
            if pid1 {
                os::sync();
                halt(ShutdownKind::Reboot)
            }
            1
        }
    }
}

fn run_inner(pid1: bool) -> u8 {
    // Before anything is started, so that no signal or child exit is missed.
    let signals = os::Signals::block();
    let mut data_degraded = false;
    if pid1 {
        data_degraded = system::setup().data_degraded;
        os::disable_ctrl_alt_del();
    } else {
        os::become_subreaper();
    }
    let configured = std::env::var(AGENT_ENV).unwrap_or_default();
    let (program, args) = parse_command(&configured)
        .or_else(|| parse_command(DEFAULT_AGENT))
        .unwrap_or_default();
    let agent = Agent {
        program,
        args,
        env: agent_env(data_degraded, std::env::var("RUST_LOG").ok()),
        console: pid1,
    };
    let kind = supervise(&agent, &signals, pid1);
    if pid1 {
        halt(kind)
    }
    match kind {
        ShutdownKind::Poweroff => EXIT_POWEROFF,
        ShutdownKind::Reboot => EXIT_REBOOT,
    }
}

/// Asks the kernel to power off or reboot and, should it refuse, reaps forever.
fn halt(kind: ShutdownKind) -> ! {
    let e = os::reboot(kind);
    os::log(Level::Error, &format!("reboot system call failed: {e}"));
    loop {
        os::reap();
        std::thread::sleep(IDLE_WAIT);
    }
}

struct Agent {
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    console: bool,
}

/// A program and its arguments from a space-separated command line.
fn parse_command(line: &str) -> Option<(String, Vec<String>)> {
    let mut words = line.split_whitespace().map(str::to_owned);
    Some((words.next()?, words.collect()))
}

/// The agent's whole environment: nothing is inherited but `RUST_LOG` (which the kernel
/// passes to init when it is on the kernel command line).
fn agent_env(data_degraded: bool, rust_log: Option<String>) -> Vec<(String, String)> {
    let mut env = vec![
        ("PATH".to_owned(), os::PATH.to_owned()),
        ("HOME".to_owned(), "/root".to_owned()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
        ("TERM".to_owned(), "linux".to_owned()),
    ];
    if data_degraded {
        env.push(("HOMEPORT_DATA_DEGRADED".to_owned(), "1".to_owned()));
    }
    if let Some(value) = rust_log {
        env.push(("RUST_LOG".to_owned(), value));
    }
    env
}

/// The event loop: feeds signals, child exits and time to the machine and carries out its
/// actions, until it asks for a poweroff or reboot.
fn supervise(agent: &Agent, signals: &os::Signals, pid1: bool) -> ShutdownKind {
    let mut state = State::Starting;
    let mut agent_pid: Option<Pid> = None;
    // The last agent's process group outlives it while its children live.
    let mut agent_group: Option<Pid> = None;
    let mut events = VecDeque::from([Event::Tick {
        now: Instant::now(),
    }]);
    loop {
        while let Some(event) = events.pop_front() {
            let (next, actions) = machine::step(state, event);
            state = next;
            for action in actions {
                match action {
                    Action::SpawnAgent => {
                        match os::spawn(&agent.program, &agent.args, &agent.env, agent.console) {
                            Ok(pid) => {
                                os::log(
                                    Level::Info,
                                    &format!("started {} as {pid}", agent.program),
                                );
                                agent_pid = Some(pid);
                                agent_group = Some(pid);
                            }
                            Err(e) => {
                                os::log(
                                    Level::Error,
                                    &format!("cannot start {}: {e}", agent.program),
                                );
                                let at = Instant::now();
                                events.push_back(Event::AgentExited {
                                    status: Exit::SpawnFailed,
                                    at,
                                });
                            }
                        }
                    }
                    Action::SignalAgent(signal) => {
                        if let Some(pid) = agent_pid {
                            os::signal(pid, signal);
                        }
                    }
                    Action::KillAll(signal) => {
                        kill_all(signal, agent_pid, agent_group, pid1);
                        os::reap_all(KILL_REAP_WAIT);
                    }
                    Action::Sync => os::sync(),
                    Action::UnmountData if pid1 => system::unmount_data(),
                    Action::UnmountData => {}
                    Action::Reboot(kind) => return kind,
                    Action::Log(level, message) => os::log(level, &message),
                }
            }
        }

        let timeout = state.deadline().map_or(IDLE_WAIT, |deadline| {
            deadline.saturating_duration_since(Instant::now())
        });
        let signal = signals.wait(timeout);
        let now = Instant::now();
        match signal {
            None | Some(Signal::SIGCHLD) => {}
            Some(signal) => match machine::request_for(signal) {
                Some(kind) => events.push_back(Event::Request { kind, at: now }),
                None => os::log(Level::Info, &format!("ignoring {signal}")),
            },
        }
        // Reap on every wake-up: SIGCHLDs coalesce, and one may come with another signal.
        for (pid, status) in os::reap().exited {
            if agent_pid == Some(pid) {
                agent_pid = None;
                events.push_back(Event::AgentExited { status, at: now });
            }
        }
        events.push_back(Event::Tick { now });
    }
}

/// As PID 1, everything; in supervisor mode, only the agent and its process group (killing
/// every process of the user running the tests would be a bad surprise).
fn kill_all(signal: Signal, agent_pid: Option<Pid>, agent_group: Option<Pid>, pid1: bool) {
    if pid1 {
        os::signal_everyone(signal);
        return;
    }
    if let Some(pid) = agent_pid {
        os::signal(pid, signal);
    }
    if let Some(group) = agent_group {
        os::signal(Pid::from_raw(-group.as_raw()), signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        let (program, args) = parse_command(DEFAULT_AGENT).unwrap();
        assert_eq!(program, "/usr/bin/homeportd");
        assert_eq!(args, vec!["--data-dir", "/data/homeport"]);
        assert_eq!(
            parse_command("  /bin/sh   x.sh  "),
            Some(("/bin/sh".into(), vec!["x.sh".into()]))
        );
        assert_eq!(parse_command("   "), None);
    }

    #[test]
    fn agent_environment_is_clean() {
        let env = agent_env(false, None);
        let names: Vec<_> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, vec!["PATH", "HOME", "LANG", "TERM"]);
        let env = agent_env(true, Some("debug".into()));
        assert!(env.contains(&("HOMEPORT_DATA_DEGRADED".into(), "1".into())));
        assert!(env.contains(&("RUST_LOG".into(), "debug".into())));
    }
}
