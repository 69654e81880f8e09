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
//! - It tells the console when it serves: `homeport: ready version=… slot=…`, and where it
//!   can be reached whenever that changes: `homeport: network IFACE ADDR…`
//!   ([`announce_addresses`]).
//! - It asks `homeport-init` to power off or reboot ([`request_shutdown`]), and when init
//!   then stops it (SIGTERM), it stops the apps and services before exiting, since
//!   everything still running afterwards is killed.

use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;
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

/// Where the device can be reached, by wired interface: its usable addresses (sorted).
type Reachable = BTreeMap<String, Vec<IpAddr>>;

/// Tells the console where the device can be reached: `homeport: network IFACE ADDR…`
/// each time the usable addresses of a wired interface change (a DHCP lease, SLAAC, a lost
/// lease), `homeport: network IFACE no address` when it has none left. Whoever looks at
/// the screen learns what to type; whoever waits for the device (the VM tests) learns when
/// it is reachable, which can be well after `ready` (DHCP under emulation takes 10 s and
/// more). Follows the kernel's address notifications; runs for the agent's lifetime.
pub async fn announce_addresses() {
    let wired = || wired_interfaces(Path::new("/sys/class/net"));
    if let Err(e) = follow_addresses(wired, |line| println!("{line}")).await {
        tracing::warn!(error = %e, "cannot follow the network's addresses");
    }
}

/// Calls `show` with the [`address_changes`] of `interfaces()` (asked anew each time):
/// once at the start, then after each burst of the kernel's address notifications.
async fn follow_addresses(
    interfaces: impl Fn() -> Vec<String>,
    mut show: impl FnMut(String),
) -> io::Result<()> {
    use futures_util::StreamExt;
    use rtnetlink::MulticastGroup;
    // Subscribed before the first listing, so no change falls in between.
    let (conn, handle, mut events) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
    ])?;
    tokio::spawn(conn);
    let mut shown = Reachable::new();
    loop {
        let now = reachable(&handle, &interfaces()).await?;
        for line in address_changes(&shown, &now) {
            show(line);
        }
        shown = now;
        if events.next().await.is_none() {
            return Err(io::Error::other("the kernel's address notifications ended"));
        }
        // Changes come in bursts (both families, DAD finishing): one listing for a burst.
        tokio::time::sleep(Duration::from_millis(200)).await;
        while events.try_recv().is_ok() {}
    }
}

/// The usable addresses of `interfaces`: neither loopback nor link-local, nor still being
/// checked for duplicates (tentative) or found duplicate.
async fn reachable(h: &rtnetlink::Handle, interfaces: &[String]) -> io::Result<Reachable> {
    use futures_util::TryStreamExt;
    use netlink_packet_route::address::{AddressAttribute, AddressFlags};
    let by_index: BTreeMap<u32, &String> = interfaces
        .iter()
        .filter_map(|n| Some((nix::net::if_::if_nametoindex(n.as_str()).ok()?, n)))
        .collect();
    let mut out: Reachable = by_index.values().map(|n| ((*n).clone(), vec![])).collect();
    let mut all = h.address().get().execute();
    while let Some(m) = all
        .try_next()
        .await
        .map_err(|e| io::Error::other(format!("list addresses: {e}")))?
    {
        let Some(name) = by_index.get(&m.header.index) else {
            continue;
        };
        let mut local = None;
        let mut address = None;
        let mut flags = AddressFlags::from_bits_retain(u32::from(m.header.flags.bits()));
        for a in &m.attributes {
            match a {
                AddressAttribute::Local(ip) => local = Some(*ip),
                AddressAttribute::Address(ip) => address = Some(*ip),
                AddressAttribute::Flags(f) => flags |= *f,
                _ => {}
            }
        }
        let unusable = AddressFlags::Tentative | AddressFlags::Dadfailed;
        if flags.intersects(unusable) {
            continue;
        }
        // IFA_LOCAL is the interface's own address (IFA_ADDRESS the peer's, on
        // point-to-point links); IPv6 sends only IFA_ADDRESS.
        if let Some(ip) = local.or(address).filter(|ip| usable(*ip)) {
            if let Some(list) = out.get_mut(*name) {
                list.push(ip);
            }
        }
    }
    for list in out.values_mut() {
        list.sort();
        list.dedup();
    }
    Ok(out)
}

/// Whether an address can reach the device from elsewhere on the network.
fn usable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_loopback() || v4.is_link_local() || v4.is_unspecified()),
        IpAddr::V6(v6) => {
            !(v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// The console lines for what changed from `shown` to `now`: the interfaces whose
/// addresses differ (one that vanished counts as having none).
fn address_changes(shown: &Reachable, now: &Reachable) -> Vec<String> {
    let none = Vec::new();
    let names: std::collections::BTreeSet<&String> = shown.keys().chain(now.keys()).collect();
    names
        .into_iter()
        .filter_map(|name| {
            let before = shown.get(name).unwrap_or(&none);
            let after = now.get(name).unwrap_or(&none);
            if before == after {
                return None;
            }
            Some(if after.is_empty() {
                format!("homeport: network {name} no address")
            } else {
                let list: Vec<String> = after.iter().map(IpAddr::to_string).collect();
                format!("homeport: network {name} {}", list.join(" "))
            })
        })
        .collect()
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
    fn only_addresses_reachable_from_the_network_are_shown() {
        for (ip, want) in [
            ("10.0.2.15", true),
            ("192.168.1.20", true),
            ("2001:db8::5", true),
            ("fd00::1", true),
            ("fec0::5054:ff:fe12:3456", true),
            ("127.0.0.1", false),
            ("169.254.3.4", false),
            ("::1", false),
            ("fe80::5054:ff:fe12:3456", false),
            ("febf::1", false),
            ("0.0.0.0", false),
        ] {
            assert_eq!(usable(ip.parse().unwrap()), want, "{ip}");
        }
    }

    /// The kernel's notifications, followed in a network namespace of the test's own: a
    /// veth pair (`hpwire0` followed, its peer not) gains and loses addresses.
    #[test]
    fn follows_the_kernels_address_changes() {
        let run = std::thread::spawn(|| {
            // The namespace is this thread's only; `ip` started from it inherits it.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            let ip = |args: &str| {
                let st = std::process::Command::new("ip")
                    .args(args.split_whitespace())
                    .status()
                    .expect("run ip");
                assert!(st.success(), "ip {args}: {st}");
            };
            ip("link add hpwire0 type veth peer name hpwire1");
            ip("link set hpwire0 up");
            ip("link set hpwire1 up");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let follow = tokio::spawn(follow_addresses(
                    || vec!["hpwire0".to_string()],
                    move |l| {
                        let _ = tx.send(l);
                    },
                ));
                async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
                    tokio::time::timeout(Duration::from_secs(15), rx.recv())
                        .await
                        .expect("a line within 15 s")
                        .expect("the follower went on")
                }
                // Only link-local so far (IPv6's own, an IPv4LL one): nothing to show.
                ip("addr add 169.254.7.7/16 dev hpwire0");
                ip("addr add 192.168.200.9/24 dev hpwire1");
                ip("addr add 192.168.200.5/24 dev hpwire0");
                assert_eq!(
                    next(&mut rx).await,
                    "homeport: network hpwire0 192.168.200.5"
                );
                // Duplicate address detection: an address the peer has too fails it and
                // is never shown; one that passes is, once it has.
                ip("addr add 2001:db8::5/64 dev hpwire1 nodad");
                ip("addr add 2001:db8::5/64 dev hpwire0");
                ip("addr add 2001:db8::6/64 dev hpwire0");
                assert_eq!(
                    next(&mut rx).await,
                    "homeport: network hpwire0 192.168.200.5 2001:db8::6"
                );
                ip("addr flush dev hpwire0");
                assert_eq!(next(&mut rx).await, "homeport: network hpwire0 no address");
                assert!(rx.try_recv().is_err(), "one line per change");
                follow.abort();
            });
        });
        run.join().expect("the namespace thread");
    }

    #[test]
    fn address_lines_name_what_changed_and_nothing_else() {
        let at = |pairs: &[(&str, &[&str])]| -> Reachable {
            pairs
                .iter()
                .map(|(n, ips)| {
                    (
                        n.to_string(),
                        ips.iter().map(|i| i.parse().unwrap()).collect(),
                    )
                })
                .collect()
        };
        let boot = at(&[("enp1s0", &[]), ("enp2s0", &[])]);
        assert!(
            address_changes(&Reachable::new(), &boot).is_empty(),
            "nothing yet"
        );
        let leased = at(&[("enp1s0", &["10.0.2.15", "fec0::1"]), ("enp2s0", &[])]);
        assert_eq!(
            address_changes(&boot, &leased),
            ["homeport: network enp1s0 10.0.2.15 fec0::1"]
        );
        assert!(address_changes(&leased, &leased).is_empty(), "a renewal");
        let both = at(&[
            ("enp1s0", &["10.0.2.15", "fec0::1"]),
            ("enp2s0", &["10.0.3.7"]),
        ]);
        assert_eq!(
            address_changes(&leased, &both),
            ["homeport: network enp2s0 10.0.3.7"]
        );
        let lost = at(&[("enp2s0", &["10.0.3.7"])]);
        assert_eq!(
            address_changes(&both, &lost),
            ["homeport: network enp1s0 no address"]
        );
    }

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
