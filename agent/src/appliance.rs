//! The agent as the appliance's one service: what it does only when it runs on Homeport's
//! own OS image (under `homeport-init`), not in host mode on someone's Linux machine.
//!
//! - It knows it is the appliance from `/etc/os-release` (`ID=homeport`), and its boot slot
//!   from the kernel command line (`homeport.slot=a`).
//! - It brings up the wired network: `dhcpcd` for DHCPv4 and router solicitation/SLAAC on
//!   every wired interface, supervised (restarted with backoff). dhcpcd rather than a client
//!   of our own: it is small, maintained, does both families, renews and rebinds leases,
//!   handles link changes, and Debian ships it without systemd (`dhcpcd-base`). It writes
//!   the resolvers into `/etc/resolv.conf`, a symlink into `/run` on the read-only root.
//! - It serves its API on the network too, over TLS with the device CA's certificate, for
//!   the owner's token (`DATA/owner-token`, made at first start and printed once on the
//!   console until pairing replaces it).
//! - (The kernel modules its network needs are loaded by homeport-init ahead, from
//!   `/usr/lib/modules-load.d/homeport.conf`.)
//! - It tells the console when it serves: `homeport: ready version=… slot=…`.
//! - It asks `homeport-init` to power off or reboot ([`request_shutdown`]), and when init
//!   then stops it (SIGTERM), it stops the apps and services before exiting, since
//!   everything still running afterwards is killed.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// What the agent knows of the appliance it runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appliance {
    /// `IMAGE_VERSION` of the running OS image.
    pub version: String,
    /// The boot slot (`a` or `b`), if the kernel command line names one.
    pub slot: Option<String>,
    /// The board the image was built for (`HOMEPORT_BOARD`), which names its OS updates.
    pub board: Option<String>,
}

impl Appliance {
    /// The appliance this runs on, or `None` in host mode.
    pub fn detect() -> Option<Appliance> {
        let os = std::fs::read_to_string("/etc/os-release")
            .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
            .ok()?;
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        Appliance::from_texts(&os, &cmdline)
    }

    pub fn from_texts(os_release: &str, cmdline: &str) -> Option<Appliance> {
        let field = |key: &str| {
            os_release.lines().find_map(|l| {
                let v = l.trim().strip_prefix(key)?.strip_prefix('=')?;
                Some(v.trim().trim_matches('"').to_string())
            })
        };
        if field("ID").as_deref() != Some("homeport") {
            return None;
        }
        let slot = cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix("homeport.slot="))
            .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric()))
            .map(str::to_string);
        Some(Appliance {
            version: field("IMAGE_VERSION")
                .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string()),
            slot,
            board: field("HOMEPORT_BOARD").filter(|b| !b.is_empty()),
        })
    }

    /// The line the console shows when the agent serves.
    pub fn ready_line(&self) -> String {
        format!(
            "homeport: ready version={} slot={}",
            self.version,
            self.slot.as_deref().unwrap_or("unknown")
        )
    }
}

/// Wired interfaces: Ethernet (`type` 1) backed by a device (not our bridge, veths or
/// other virtual links), not wireless.
pub fn wired_interfaces(sys_class_net: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(sys_class_net)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    let p = e.path();
                    std::fs::read_to_string(p.join("type")).is_ok_and(|t| t.trim() == "1")
                        && p.join("device").exists()
                        && !p.join("wireless").exists()
                })
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Starts `dhcpcd` for the wired interfaces, supervised.
pub fn start_network() -> Option<Supervised> {
    let interfaces = wired_interfaces(Path::new("/sys/class/net"));
    let Some(dhcpcd) = ["/usr/sbin/dhcpcd", "/sbin/dhcpcd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    else {
        tracing::error!("dhcpcd is missing: the network stays unconfigured");
        return None;
    };
    if interfaces.is_empty() {
        tracing::warn!("no wired network interface found");
        return None;
    }
    tracing::info!(?interfaces, "bringing up the wired network");
    Some(Supervised::start("dhcpcd", move || {
        let mut c = std::process::Command::new(&dhcpcd);
        c.arg("--nobackground").arg("--quiet").args(&interfaces);
        c
    }))
}

/// A program the agent keeps running on the appliance (dhcpcd, chronyd): started on a
/// thread of its own, restarted with backoff (1 s doubling to 60 s, back to 1 s after a
/// minute of running) whenever it ends, and at once after [`Supervised::restart`].
pub struct Supervised {
    name: &'static str,
    shared: Arc<SupervisedState>,
}

#[derive(Default)]
struct SupervisedState {
    /// The running child's pid (0: none).
    pid: std::sync::atomic::AtomicI32,
    /// Set by `restart`: the next exit is ours, restart without waiting.
    restart: std::sync::atomic::AtomicBool,
    /// Set by `stop`: the next exit is the last.
    stop: std::sync::atomic::AtomicBool,
}

impl Supervised {
    /// Starts supervising; `command` makes the command anew for every start.
    pub fn start<F>(name: &'static str, command: F) -> Supervised
    where
        F: Fn() -> std::process::Command + Send + 'static,
    {
        use std::sync::atomic::Ordering;
        let shared = Arc::new(SupervisedState::default());
        let state = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut delay = Duration::from_secs(1);
                loop {
                    let started = std::time::Instant::now();
                    let child = command()
                        .stdin(std::process::Stdio::null())
                        .spawn();
                    match child {
                        Ok(mut child) => {
                            state.pid.store(child.id() as i32, Ordering::SeqCst);
                            let status = child.wait();
                            state.pid.store(0, Ordering::SeqCst);
                            if state.stop.load(Ordering::SeqCst) {
                                return;
                            }
                            if state.restart.swap(false, Ordering::SeqCst) {
                                tracing::info!(program = name, "restarting with new settings");
                                continue;
                            }
                            match status {
                                Ok(s) => tracing::warn!(program = name, status = %s, "ended; restarting it"),
                                Err(e) => tracing::error!(program = name, error = %e, "cannot wait for it"),
                            }
                        }
                        Err(e) => tracing::error!(program = name, error = %e, "cannot start it"),
                    }
                    if started.elapsed() > Duration::from_secs(60) {
                        delay = Duration::from_secs(1);
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(60));
                }
            });
        if let Err(e) = spawned {
            tracing::error!(program = name, error = %e, "cannot start its supervising thread");
        }
        Supervised { name, shared }
    }

    /// Stops the program (SIGTERM) so that it starts again at once, with whatever its
    /// command now reads (a new configuration file, say).
    pub fn restart(&self) {
        self.shared
            .restart
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.terminate();
    }

    /// Stops the program for good (SIGTERM).
    pub fn stop(&self) {
        self.shared
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.terminate();
    }

    /// The running program's pid.
    pub fn pid(&self) -> Option<u32> {
        let pid = self.shared.pid.load(std::sync::atomic::Ordering::SeqCst);
        u32::try_from(pid).ok().filter(|p| *p > 0)
    }

    fn terminate(&self) {
        let Some(pid) = self.pid() else {
            // Not running: its next start (after the backoff) reads the new settings.
            return;
        };
        // The pid cannot be reused before the supervising thread reaps it, and it clears
        // the pid right after; the window in between is a few instructions wide.
        if let Err(e) = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        ) {
            tracing::warn!(program = self.name, error = %e, "cannot stop it");
        }
    }
}

/// The owner's API token: read, or made (32 random bytes, hex, mode 0600) on first start.
/// Returns it and whether it was made now.
pub fn owner_token(data: &Path) -> io::Result<(String, bool)> {
    let path = data.join("owner-token");
    match std::fs::read_to_string(&path) {
        Ok(t) if t.trim().len() == 64 => return Ok((t.trim().to_string(), false)),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    crate::files::replace(&path, token.as_bytes(), 0o600)?;
    // The token is shown once, now: it must survive a power cut right after (the data
    // partition's own commit would take up to 30 s).
    std::fs::File::open(data)?.sync_all()?;
    Ok((token, true))
}

/// What the device does when it goes down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownKind {
    Poweroff,
    Reboot,
}

impl ShutdownKind {
    pub fn name(self) -> &'static str {
        match self {
            ShutdownKind::Poweroff => "poweroff",
            ShutdownKind::Reboot => "reboot",
        }
    }
}

impl std::fmt::Display for ShutdownKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    #[error("{0} is only possible on the appliance (PID 1 here is not homeport-init)")]
    NotAppliance(ShutdownKind),
    #[error("cannot ask homeport-init for a {kind}")]
    Signal {
        kind: ShutdownKind,
        source: nix::Error,
    },
}

/// Whether PID 1 is `homeport-init` on Homeport's OS: the only init that reads SIGUSR1 and
/// SIGUSR2 as poweroff and reboot (systemd, for one, reads them otherwise).
pub fn can_shutdown() -> bool {
    static ANSWER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ANSWER.get_or_init(|| {
        Appliance::detect().is_some()
            && std::fs::read_to_string("/proc/1/comm").is_ok_and(|c| c.trim() == "homeport-init")
    })
}

/// Asks `homeport-init` to power off (SIGUSR1) or reboot (SIGUSR2). Init then stops the
/// agent (SIGTERM; the agent stops the apps and services and exits), kills what is left,
/// syncs, unmounts the data partition and powers off or reboots. Returns at once, but
/// init stops the agent right away: answer whoever asked first. Refused outside the
/// appliance.
pub fn request_shutdown(kind: ShutdownKind) -> Result<(), ShutdownError> {
    use nix::sys::signal::{kill, Signal};
    if !can_shutdown() {
        return Err(ShutdownError::NotAppliance(kind));
    }
    let signal = match kind {
        ShutdownKind::Poweroff => Signal::SIGUSR1,
        ShutdownKind::Reboot => Signal::SIGUSR2,
    };
    tracing::info!(%kind, "asking homeport-init to shut down");
    kill(nix::unistd::Pid::from_raw(1), signal)
        .map_err(|source| ShutdownError::Signal { kind, source })
}

/// SHA-256 of the certificate's DER, hex: what the console shows so a client can pin the
/// device CA it fetched.
pub fn ca_fingerprint(pem: &str) -> Option<String> {
    use rustls::pki_types::pem::PemObject;
    use sha2::Digest;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    Some(hex::encode(sha2::Sha256::digest(der.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_the_appliance_and_its_slot() {
        let os = "NAME=Homeport\nID=homeport\nIMAGE_VERSION=\"0.1.0.7\"\n";
        let a =
            Appliance::from_texts(os, "root=PARTLABEL=root-b ro homeport.slot=b quiet").unwrap();
        assert_eq!(a.version, "0.1.0.7");
        assert_eq!(a.slot.as_deref(), Some("b"));
        assert_eq!(a.ready_line(), "homeport: ready version=0.1.0.7 slot=b");
        assert_eq!(
            Appliance::from_texts("ID=debian\nVERSION_ID=12\n", "homeport.slot=a"),
            None
        );
        let a = Appliance::from_texts("ID=homeport\n", "homeport.slot=../x").unwrap();
        assert_eq!(a.slot, None, "a slot name is a plain word");
    }

    #[test]
    fn owner_token_is_made_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (t, made) = owner_token(dir.path()).unwrap();
        assert!(made && t.len() == 64);
        let mode = std::fs::metadata(dir.path().join("owner-token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(owner_token(dir.path()).unwrap(), (t, false));
    }

    #[test]
    fn shutdown_is_refused_off_the_appliance() {
        // The development machine's PID 1 is not homeport-init: no signal may reach it.
        assert!(!can_shutdown());
        let e = request_shutdown(ShutdownKind::Poweroff).unwrap_err();
        assert!(matches!(
            e,
            ShutdownError::NotAppliance(ShutdownKind::Poweroff)
        ));
        assert_eq!(
            e.to_string(),
            "poweroff is only possible on the appliance (PID 1 here is not homeport-init)"
        );
    }

    #[test]
    fn supervised_programs_restart() {
        let dir = tempfile::tempdir().unwrap();
        let starts = dir.path().join("starts");
        let file = starts.clone();
        let program = Supervised::start("test-sleeper", move || {
            let mut c = std::process::Command::new("sh");
            c.arg("-c").arg(format!(
                "echo started >> '{}'; exec sleep 60",
                file.display()
            ));
            c
        });
        let count = || {
            std::fs::read_to_string(&starts)
                .map(|t| t.lines().count())
                .unwrap_or(0)
        };
        let wait_for = |n: usize| {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while count() < n || program.pid().is_none() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "not started {n} times"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        wait_for(1);
        let first = program.pid().unwrap();
        // Asked to: it starts again, as a new process.
        program.restart();
        wait_for(2);
        let second = program.pid().unwrap();
        assert_ne!(first, second);
        // Died on its own: it is started again (after the backoff).
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(second as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        wait_for(3);
        // Stopped: it stays stopped.
        let third = program.pid().unwrap();
        program.stop();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while program.pid().is_some() {
            assert!(std::time::Instant::now() < deadline, "still running");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(count(), 3);
        assert!(!Path::new(&format!("/proc/{third}")).exists());
    }

    #[test]
    fn wired_interfaces_are_ethernet_devices() {
        let dir = tempfile::tempdir().unwrap();
        let add = |name: &str, ty: &str, device: bool, wireless: bool| {
            let p = dir.path().join(name);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("type"), format!("{ty}\n")).unwrap();
            if device {
                std::fs::create_dir(p.join("device")).unwrap();
            }
            if wireless {
                std::fs::create_dir(p.join("wireless")).unwrap();
            }
        };
        add("enp0s2", "1", true, false);
        add("eth1", "1", true, false);
        add("lo", "772", false, false);
        add("hpbr123", "1", false, false);
        add("wlan0", "1", true, true);
        assert_eq!(wired_interfaces(dir.path()), ["enp0s2", "eth1"]);
    }
}
