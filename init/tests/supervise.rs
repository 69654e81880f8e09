//! Runs the real `homeport-init` binary in supervisor mode (not PID 1) with small shell
//! scripts as the agent.

#![allow(clippy::unwrap_used)] // tests may unwrap what they just built

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const EXIT_POWEROFF: i32 = 10;
const EXIT_REBOOT: i32 = 11;

/// A running init; stopped (politely, then not) when dropped, even if the test failed.
struct Init {
    child: Child,
}

impl Init {
    /// Starts init with `script` as the agent, given `arg` as its only argument.
    fn start(dir: &Path, script: &str, arg: &Path) -> Init {
        let path = dir.join("agent.sh");
        fs::write(&path, script).unwrap();
        Self::start_command(&format!("/bin/sh {} {}", path.display(), arg.display()))
    }

    fn start_command(agent: &str) -> Init {
        let child = Command::new(env!("CARGO_BIN_EXE_homeport-init"))
            .env("HOMEPORT_INIT_AGENT", agent)
            .spawn()
            .unwrap();
        Init { child }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).unwrap();
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Init {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = kill(self.pid(), Signal::SIGUSR1);
            if self.wait_exit(Duration::from_secs(5)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout`.
fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = f() {
            return value;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        sleep(Duration::from_millis(10));
    }
}

/// (state, parent pid) from /proc/<pid>/stat, or None once the process is gone.
fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ...": comm may contain anything, so split after the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

fn zombie_children(parent: Pid) -> Vec<i32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| proc_stat(pid) == Some(('Z', parent.as_raw())))
        .collect()
}

fn lines(path: &PathBuf) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn restarts_with_growing_delays_then_powers_off_on_sigusr1() {
    let dir = tempfile::tempdir().unwrap();
    let starts = dir.path().join("starts");
    // Exits at once three times, then waits to be stopped.
    let script = r#"
f="$1"
date +%s.%N >> "$f"
[ "$(wc -l < "$f")" -lt 4 ] && exit 1
trap 'echo term > "$f.term"; exit 0' TERM
sleep 30 &
echo $! > "$f.sleep"
wait
"#;
    let mut init = Init::start(dir.path(), script, &starts);

    let sleeper: i32 = eventually(Duration::from_secs(30), "the fourth start", || {
        fs::read_to_string(dir.path().join("starts.sleep"))
            .ok()?
            .trim()
            .parse()
            .ok()
    });
    let times: Vec<f64> = lines(&starts).iter().map(|l| l.parse().unwrap()).collect();
    let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(gaps.len(), 3, "{times:?}");
    // Lower bounds only: a slow machine makes gaps longer, never shorter.
    for (gap, delay) in gaps.iter().zip([1.0, 2.0, 4.0]) {
        assert!(
            *gap >= delay - 0.05,
            "gaps {gaps:?}, expected 1 s, 2 s, 4 s"
        );
    }

    init.signal(Signal::SIGUSR1);
    let status = init
        .wait_exit(Duration::from_secs(10))
        .expect("init did not exit");
    assert_eq!(status.code(), Some(EXIT_POWEROFF));
    assert_eq!(
        lines(&dir.path().join("starts.term")),
        vec!["term"],
        "the agent got no SIGTERM"
    );
    // The agent's own child was killed with the rest of its process group.
    eventually(
        Duration::from_secs(2),
        "the agent's child to be gone",
        || matches!(proc_stat(sleeper), None | Some(('Z', _))).then_some(()),
    );
    assert_eq!(
        lines(&starts).len(),
        4,
        "the agent was started again after the request"
    );
}

#[test]
fn reaps_orphaned_grandchildren() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let script = r#"
sleep 1 &
echo $! >> "$1"
exit 0
"#;
    let mut init = Init::start(dir.path(), script, &pids);
    let init_pid = init.pid();

    let orphan: i32 = eventually(Duration::from_secs(10), "the first orphan", || {
        lines(&pids).first()?.parse().ok()
    });
    // Its parent exits at once; as a subreaper, init adopts it.
    eventually(
        Duration::from_millis(900),
        "init to adopt the orphan",
        || (proc_stat(orphan)?.1 == init_pid.as_raw()).then_some(()),
    );
    // When it exits it is reaped, not left a zombie.
    eventually(Duration::from_secs(5), "the orphan to be reaped", || {
        proc_stat(orphan).is_none().then_some(())
    });
    eventually(Duration::from_secs(2), "no zombie child of init", || {
        zombie_children(init_pid).is_empty().then_some(())
    });

    init.signal(Signal::SIGUSR2);
    let status = init
        .wait_exit(Duration::from_secs(10))
        .expect("init did not exit");
    assert_eq!(status.code(), Some(EXIT_REBOOT));
}

#[test]
fn an_agent_that_cannot_start_is_retried_and_sigterm_still_stops_init() {
    let mut init = Init::start_command("/nonexistent/homeportd --data-dir /nonexistent");
    sleep(Duration::from_millis(300));
    assert!(
        init.child.try_wait().unwrap().is_none(),
        "init gave up on a missing agent"
    );
    init.signal(Signal::SIGTERM);
    let status = init
        .wait_exit(Duration::from_secs(5))
        .expect("init did not exit");
    assert_eq!(status.code(), Some(EXIT_REBOOT));
}

#[test]
fn the_agent_starts_with_no_signal_blocked() {
    // Init blocks the signals it waits for; the agent must not inherit that, or the SIGTERM
    // asking it to stop would stay pending until init kills it.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let child = Command::new(env!("CARGO_BIN_EXE_homeport-init"))
        .env(
            "HOMEPORT_INIT_AGENT",
            "/bin/grep -h SigBlk /proc/self/status",
        )
        .stdout(fs::File::create(&out).unwrap())
        .spawn()
        .unwrap();
    let mut init = Init { child };
    let line = eventually(Duration::from_secs(10), "the agent's output", || {
        lines(&out).into_iter().next()
    });
    assert_eq!(line, "SigBlk:\t0000000000000000");
    init.signal(Signal::SIGUSR1);
    init.wait_exit(Duration::from_secs(10))
        .expect("init did not exit");
}
