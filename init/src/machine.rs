//! The supervisor's decisions as a pure state machine.
//!
//! [`step`] takes the current [`State`] and one [`Event`] and returns the next state and the
//! [`Action`]s to carry out, in order. It does no I/O and reads no clock: time arrives inside
//! events. The runner in `lib.rs` turns signals, child exits and timeouts into events and
//! actions into system calls.
//!
//! Invariant: at most one agent runs at a time; it is spawned only from `Starting` or at the
//! end of a backoff, and never again once a shutdown has been requested.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

/// First restart delay after the agent dies.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The restart delay doubles up to this.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// An agent that ran this long is considered healthy: the next delay starts over.
pub const HEALTHY_UPTIME: Duration = Duration::from_secs(60);
/// How long the agent gets to stop after SIGTERM before everything is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// What the device does once everything is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownKind {
    Poweroff,
    Reboot,
}

/// How the agent process ended, as far as the machine cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(Signal),
    /// It could not even be started (missing binary, exec error).
    SpawnFailed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Nothing started yet; the first event starts the agent.
    Starting,
    /// The agent runs since `since`; if it dies soon, the next backoff is `next_delay`.
    Running {
        since: Instant,
        next_delay: Duration,
    },
    /// The agent is dead; it is started again at `until`.
    Backoff { until: Instant, delay: Duration },
    /// The agent was asked to stop; everything is killed at `deadline` at the latest.
    ShuttingDown {
        kind: ShutdownKind,
        deadline: Instant,
    },
    /// Final actions were issued; nothing more happens.
    Halted { kind: ShutdownKind },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The agent process ended (other children are reaped without an event).
    AgentExited { status: Exit, at: Instant },
    /// Time passed; sent after every wake-up.
    Tick { now: Instant },
    /// Someone asked for a poweroff or reboot (see [`request_for`]).
    Request { kind: ShutdownKind, at: Instant },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    SpawnAgent,
    /// Send a signal to the agent (and its process group).
    SignalAgent(Signal),
    /// Send a signal to every process but ourselves.
    KillAll(Signal),
    Sync,
    UnmountData,
    Reboot(ShutdownKind),
    Log(Level, String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    /// A step of a shutdown: shown on the console too (like warnings), which otherwise shows
    /// only errors (`loglevel=4`), so whoever watches it sees the device go down in order.
    Notice,
    Warn,
    Error,
}

/// The signals PID 1 obeys.
///
/// SIGUSR1 (the agent's poweroff request) and SIGPWR (power failure) mean poweroff; SIGUSR2
/// (the agent's reboot request), SIGINT (Ctrl-Alt-Del, once the kernel is told to send it)
/// and SIGTERM (busybox init's convention) mean reboot. Anything else is ignored.
pub fn request_for(signal: Signal) -> Option<ShutdownKind> {
    match signal {
        Signal::SIGUSR1 | Signal::SIGPWR => Some(ShutdownKind::Poweroff),
        Signal::SIGUSR2 | Signal::SIGINT | Signal::SIGTERM => Some(ShutdownKind::Reboot),
        _ => None,
    }
}

impl State {
    /// When the machine wants a `Tick` at the latest, if it waits for a time at all.
    pub fn deadline(&self) -> Option<Instant> {
        match *self {
            State::Backoff { until, .. } => Some(until),
            State::ShuttingDown { deadline, .. } => Some(deadline),
            State::Starting | State::Running { .. } | State::Halted { .. } => None,
        }
    }
}

/// The transition function: the next state and what to do, in order.
pub fn step(state: State, event: Event) -> (State, Vec<Action>) {
    use Action::*;
    match (state, event) {
        (State::Halted { .. }, _) => (state, vec![]),

        (State::Starting, Event::Tick { now }) => (
            State::Running {
                since: now,
                next_delay: BACKOFF_MIN,
            },
            vec![SpawnAgent],
        ),
        (State::Starting | State::Backoff { .. }, Event::Request { kind, .. }) => {
            finish(kind, vec![])
        }
        (State::Starting | State::Backoff { .. }, Event::AgentExited { .. }) => (state, vec![]),

        (State::Running { since, next_delay }, Event::AgentExited { status, at }) => {
            let uptime = at.saturating_duration_since(since);
            let delay = if uptime >= HEALTHY_UPTIME {
                BACKOFF_MIN
            } else {
                next_delay
            };
            let log = Log(
                Level::Warn,
                format!(
                    "agent {} after {:.1}s, restarting in {}s",
                    describe(status),
                    uptime.as_secs_f64(),
                    delay.as_secs()
                ),
            );
            (
                State::Backoff {
                    until: later(at, delay),
                    delay,
                },
                vec![log],
            )
        }
        (State::Running { .. }, Event::Tick { .. }) => (state, vec![]),
        (State::Running { .. }, Event::Request { kind, at }) => (
            State::ShuttingDown {
                kind,
                deadline: later(at, STOP_TIMEOUT),
            },
            vec![
                Log(
                    Level::Notice,
                    format!("{} requested, stopping the agent", name(kind)),
                ),
                SignalAgent(Signal::SIGTERM),
            ],
        ),

        (State::Backoff { until, delay }, Event::Tick { now }) if now >= until => (
            State::Running {
                since: now,
                next_delay: delay.saturating_mul(2).min(BACKOFF_MAX),
            },
            vec![SpawnAgent],
        ),
        (State::Backoff { .. }, Event::Tick { .. }) => (state, vec![]),

        (State::ShuttingDown { kind, .. }, Event::AgentExited { status, .. }) => finish(
            kind,
            vec![Log(Level::Notice, format!("agent {}", describe(status)))],
        ),
        (State::ShuttingDown { kind, deadline }, Event::Tick { now }) if now >= deadline => finish(
            kind,
            vec![Log(
                Level::Warn,
                format!("agent did not stop within {}s", STOP_TIMEOUT.as_secs()),
            )],
        ),
        (State::ShuttingDown { .. }, Event::Tick { .. }) => (state, vec![]),
        (State::ShuttingDown { kind, .. }, Event::Request { kind: again, .. }) => (
            state,
            vec![Log(
                Level::Info,
                format!(
                    "{} requested, already shutting down for {}",
                    name(again),
                    name(kind)
                ),
            )],
        ),
    }
}

/// The end of every shutdown: kill what is left, flush, unmount, and go.
fn finish(kind: ShutdownKind, mut actions: Vec<Action>) -> (State, Vec<Action>) {
    actions.extend([
        Action::KillAll(Signal::SIGKILL),
        Action::Sync,
        Action::UnmountData,
        Action::Log(Level::Notice, format!("{} now", name(kind))),
        Action::Reboot(kind),
    ]);
    (State::Halted { kind }, actions)
}

/// `t + d` without the panic on overflow (which no real clock reaches).
fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).unwrap_or(t)
}

fn name(kind: ShutdownKind) -> &'static str {
    match kind {
        ShutdownKind::Poweroff => "poweroff",
        ShutdownKind::Reboot => "reboot",
    }
}

fn describe(status: Exit) -> String {
    match status {
        Exit::Code(code) => format!("exited with code {code}"),
        Exit::Signal(signal) => format!("was killed by {signal}"),
        Exit::SpawnFailed => "could not be started".to_owned(),
    }
}

/// Where the clock must be at least at boot: the latest of the marks (the image's build
/// time, the last time the device was up). `Some(floor)` when the clock is behind it.
///
/// Decision: a device without a hardware clock (a Raspberry Pi) starts in 1970 or at the
/// kernel's build time. Certificates made then would not be valid yet or soon expired, and
/// signed metadata would look wrong; the build time or the last shutdown is much closer to
/// the truth, and NTP (chrony, in the agent) corrects the rest once the network is up.
pub fn clock_floor(
    now: std::time::SystemTime,
    marks: &[Option<std::time::SystemTime>],
) -> Option<std::time::SystemTime> {
    let floor = marks.iter().flatten().max().copied()?;
    (now < floor).then_some(floor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_never_starts_before_the_build_or_the_last_boot() {
        use std::time::{SystemTime, UNIX_EPOCH};
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        let build = Some(at(1_790_000_000));
        let last_up = Some(at(1_800_000_000));
        // A Pi without a hardware clock: 1970.
        assert_eq!(clock_floor(at(5), &[build, last_up]), last_up);
        assert_eq!(clock_floor(at(5), &[build, None]), build);
        // Between the build and the last boot: to the last boot.
        assert_eq!(clock_floor(at(1_795_000_000), &[build, last_up]), last_up);
        // A clock that is right (ahead of both) is left alone.
        assert_eq!(clock_floor(at(1_810_000_000), &[build, last_up]), None);
        assert_eq!(clock_floor(SystemTime::now(), &[None, None]), None);
        assert_eq!(clock_floor(at(5), &[]), None);
    }

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    /// Feeds events in order and returns the final state and every action (logs dropped).
    fn run(mut state: State, events: &[Event]) -> (State, Vec<Action>) {
        let mut all = vec![];
        for &event in events {
            let (next, actions) = step(state, event);
            state = next;
            all.extend(
                actions
                    .into_iter()
                    .filter(|a| !matches!(a, Action::Log(..))),
            );
        }
        (state, all)
    }

    fn final_actions(kind: ShutdownKind) -> Vec<Action> {
        vec![
            Action::KillAll(Signal::SIGKILL),
            Action::Sync,
            Action::UnmountData,
            Action::Reboot(kind),
        ]
    }

    #[test]
    fn first_tick_spawns_the_agent() {
        let t0 = Instant::now();
        let (state, actions) = step(State::Starting, Event::Tick { now: t0 });
        assert_eq!(
            state,
            State::Running {
                since: t0,
                next_delay: BACKOFF_MIN
            }
        );
        assert_eq!(actions, vec![Action::SpawnAgent]);
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let t0 = Instant::now();
        let mut state = step(State::Starting, Event::Tick { now: t0 }).0;
        let mut now = t0;
        let mut delays = vec![];
        for _ in 0..7 {
            let exited = Event::AgentExited {
                status: Exit::Code(1),
                at: now,
            };
            state = step(state, exited).0;
            let State::Backoff { until, delay } = state else {
                panic!("{state:?}")
            };
            delays.push(delay.as_secs());
            // Nothing happens before the deadline.
            assert_eq!(
                step(
                    state,
                    Event::Tick {
                        now: until - Duration::from_millis(1)
                    }
                )
                .1,
                vec![]
            );
            let (next, actions) = step(state, Event::Tick { now: until });
            assert_eq!(actions, vec![Action::SpawnAgent]);
            (state, now) = (next, until);
        }
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 30, 30]);
    }

    #[test]
    fn backoff_starts_over_after_a_healthy_run() {
        let t0 = Instant::now();
        let state = State::Running {
            since: t0,
            next_delay: BACKOFF_MAX,
        };
        let short = step(
            state,
            Event::AgentExited {
                status: Exit::Code(1),
                at: secs(t0, 59),
            },
        )
        .0;
        assert_eq!(
            short,
            State::Backoff {
                until: secs(t0, 89),
                delay: BACKOFF_MAX
            }
        );
        let long = step(
            state,
            Event::AgentExited {
                status: Exit::Code(1),
                at: secs(t0, 60),
            },
        )
        .0;
        assert_eq!(
            long,
            State::Backoff {
                until: secs(t0, 61),
                delay: BACKOFF_MIN
            }
        );
    }

    #[test]
    fn a_spawn_failure_backs_off_like_an_exit() {
        let t0 = Instant::now();
        let state = State::Running {
            since: t0,
            next_delay: BACKOFF_MIN,
        };
        let (state, _) = step(
            state,
            Event::AgentExited {
                status: Exit::SpawnFailed,
                at: t0,
            },
        );
        assert_eq!(
            state,
            State::Backoff {
                until: secs(t0, 1),
                delay: BACKOFF_MIN
            }
        );
    }

    #[test]
    fn poweroff_stops_the_agent_then_halts_when_it_exits() {
        let t0 = Instant::now();
        let (state, actions) = run(
            State::Starting,
            &[
                Event::Tick { now: t0 },
                Event::Request {
                    kind: ShutdownKind::Poweroff,
                    at: secs(t0, 5),
                },
            ],
        );
        assert_eq!(
            state,
            State::ShuttingDown {
                kind: ShutdownKind::Poweroff,
                deadline: secs(t0, 25)
            }
        );
        assert_eq!(
            actions,
            vec![Action::SpawnAgent, Action::SignalAgent(Signal::SIGTERM)]
        );

        let (state, actions) = run(
            state,
            &[
                Event::Tick { now: secs(t0, 6) },
                Event::AgentExited {
                    status: Exit::Code(0),
                    at: secs(t0, 7),
                },
            ],
        );
        assert_eq!(
            state,
            State::Halted {
                kind: ShutdownKind::Poweroff
            }
        );
        assert_eq!(actions, final_actions(ShutdownKind::Poweroff));
    }

    #[test]
    fn an_agent_that_ignores_sigterm_is_killed_at_the_deadline() {
        let t0 = Instant::now();
        let state = State::ShuttingDown {
            kind: ShutdownKind::Reboot,
            deadline: secs(t0, 20),
        };
        assert_eq!(
            step(state, Event::Tick { now: secs(t0, 19) }),
            (state, vec![])
        );
        let (state, actions) = run(state, &[Event::Tick { now: secs(t0, 20) }]);
        assert_eq!(
            state,
            State::Halted {
                kind: ShutdownKind::Reboot
            }
        );
        assert_eq!(actions, final_actions(ShutdownKind::Reboot));
    }

    #[test]
    fn a_request_without_a_running_agent_halts_at_once() {
        let t0 = Instant::now();
        let backoff = State::Backoff {
            until: secs(t0, 4),
            delay: Duration::from_secs(4),
        };
        for state in [State::Starting, backoff] {
            let (state, actions) = run(
                state,
                &[Event::Request {
                    kind: ShutdownKind::Reboot,
                    at: t0,
                }],
            );
            assert_eq!(
                state,
                State::Halted {
                    kind: ShutdownKind::Reboot
                }
            );
            assert_eq!(actions, final_actions(ShutdownKind::Reboot));
        }
    }

    #[test]
    fn nothing_happens_after_the_first_request() {
        let t0 = Instant::now();
        let shutting = State::ShuttingDown {
            kind: ShutdownKind::Poweroff,
            deadline: secs(t0, 20),
        };
        let again = Event::Request {
            kind: ShutdownKind::Reboot,
            at: t0,
        };
        assert_eq!(run(shutting, &[again]), (shutting, vec![]));

        let halted = State::Halted {
            kind: ShutdownKind::Poweroff,
        };
        let events = [
            again,
            Event::Tick { now: secs(t0, 100) },
            Event::AgentExited {
                status: Exit::Code(0),
                at: t0,
            },
        ];
        assert_eq!(run(halted, &events), (halted, vec![]));
    }

    #[test]
    fn signals_map_to_requests() {
        let check = |signal, expected| assert_eq!(request_for(signal), expected, "{signal}");
        check(Signal::SIGUSR1, Some(ShutdownKind::Poweroff));
        check(Signal::SIGPWR, Some(ShutdownKind::Poweroff));
        check(Signal::SIGUSR2, Some(ShutdownKind::Reboot));
        check(Signal::SIGINT, Some(ShutdownKind::Reboot));
        check(Signal::SIGTERM, Some(ShutdownKind::Reboot));
        check(Signal::SIGHUP, None);
        check(Signal::SIGCHLD, None);
    }

    #[test]
    fn deadlines() {
        let t0 = Instant::now();
        assert_eq!(State::Starting.deadline(), None);
        assert_eq!(
            State::Running {
                since: t0,
                next_delay: BACKOFF_MIN
            }
            .deadline(),
            None
        );
        assert_eq!(
            State::Backoff {
                until: t0,
                delay: BACKOFF_MIN
            }
            .deadline(),
            Some(t0)
        );
        let shutting = State::ShuttingDown {
            kind: ShutdownKind::Reboot,
            deadline: t0,
        };
        assert_eq!(shutting.deadline(), Some(t0));
    }
}
