//! Per-app IPv6: the device's ULA prefix, a bridge holding the gateway address, and a veth
//! pair per app whose peer is `eth0` in the app's network namespace.
//!
//! Invariant: only this module talks netlink, and only through the narrow [`Wiring`] trait, so
//! the planning here is tested with a fake and the kernel side by the integration tests.

pub mod addr;
pub mod firewall;
mod netlink;
mod nft;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use crate::manifest::{AppName, Protocol};
pub use addr::{AppsNet, AppsNet4, Ula48};
pub use firewall::AppRules;

/// What one app's wiring consists of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppWire<'a> {
    pub host_if: String,
    pub bridge: &'a str,
    pub netns: &'a Path,
    pub address: Ipv6Addr,
    pub gateway: Ipv6Addr,
    pub address4: Ipv4Addr,
    pub gateway4: Ipv4Addr,
}

/// The kernel operations the network needs; blocking calls.
pub trait Wiring: Send + Sync {
    fn link_exists(&self, name: &str) -> bool;
    /// Creates the bridge if it is missing, with both gateway addresses on it, up.
    fn ensure_bridge(&self, bridge: &str, gateway: Ipv6Addr, gateway4: Ipv4Addr) -> io::Result<()>;
    /// Turns on IPv4 and IPv6 forwarding (keeping router advertisements accepted where they
    /// were: forwarding alone would turn SLAAC off on the uplink).
    fn enable_forwarding(&self) -> io::Result<()>;
    /// A veth pair: the host end up on the bridge as an isolated port (apps never reach each
    /// other, only the host), the peer `eth0` in the app's namespace, up, with the addresses
    /// (no DAD) and default routes via the gateways. Idempotent: what exists is kept.
    fn wire(&self, w: &AppWire) -> io::Result<()>;
    /// Deletes the host end (the kernel deletes its peer with it).
    fn unwire(&self, host_if: &str) -> io::Result<()>;
    /// Applies one nftables JSON batch, atomically.
    fn apply_rules(&self, batch: &str) -> io::Result<()>;
}

pub struct Network {
    ula: Ula48,
    net: AppsNet,
    net4: AppsNet4,
    bridge: String,
    table: firewall::Table,
    resolv_conf: PathBuf,
    /// Ports of the device's services apps may reach on the gateway (the proxy's, later the
    /// shared database's and cache's).
    services: Vec<(Protocol, u16)>,
    wiring: Box<dyn Wiring>,
    /// Names every app's `/etc/hosts` maps to the device (the proxy's names of all apps).
    shared_names: std::sync::RwLock<Vec<String>>,
    /// What the firewall's sets hold, as of the last successful update (`None`: unknown).
    applied: std::sync::Mutex<Option<Vec<AppRules>>>,
}

impl Network {
    /// The network of a device whose prefixes are `ula` and `net4`, through the kernel.
    /// Apps' DNS resolvers are taken from `resolv_conf` (the device's own).
    pub fn new(
        ula: Ula48,
        net4: AppsNet4,
        resolv_conf: PathBuf,
        services: Vec<(Protocol, u16)>,
    ) -> Network {
        let mut n =
            Network::with_wiring(ula, net4, resolv_conf, Box::new(netlink::Kernel::default()));
        n.services = services;
        n
    }

    pub fn with_wiring(
        ula: Ula48,
        net4: AppsNet4,
        resolv_conf: PathBuf,
        wiring: Box<dyn Wiring>,
    ) -> Network {
        let bridge = addr::bridge_name(&ula);
        Network {
            net: ula.apps_net(),
            table: firewall::Table {
                name: format!("homeport_{}", &ula.global_id_hex()[..10]),
                bridge: bridge.clone(),
                gateway4: net4.gateway(),
                gateway6: ula.apps_net().gateway(),
            },
            bridge,
            net4,
            ula,
            resolv_conf,
            services: Vec::new(),
            shared_names: std::sync::RwLock::new(Vec::new()),
            wiring,
            applied: std::sync::Mutex::new(None),
        }
    }

    /// An internal IPv4 net that no route of the device's overlaps, for a first start.
    pub fn choose_net4(ula: &Ula48) -> io::Result<AppsNet4> {
        let routes = addr::parse_proc_route(&std::fs::read_to_string("/proc/net/route")?);
        AppsNet4::choose(ula, &routes).ok_or_else(|| {
            io::Error::other("every /20 of 10.128.0.0/9 overlaps a route of this device")
        })
    }

    pub fn ula(&self) -> Ula48 {
        self.ula
    }

    pub fn apps_net(&self) -> AppsNet {
        self.net
    }

    pub fn apps_net4(&self) -> AppsNet4 {
        self.net4
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The nftables table holding the device's firewall (family `inet`).
    pub fn table(&self) -> &str {
        &self.table.name
    }

    /// At agent start: the bridge, forwarding, and the firewall made anew from `apps` (the
    /// store's view), so it matches the store whatever the kernel held before. Idempotent.
    pub fn up(&self, apps: &[AppRules]) -> io::Result<()> {
        let t = std::time::Instant::now();
        self.wiring
            .ensure_bridge(&self.bridge, self.net.gateway(), self.net4.gateway())?;
        let bridge = t.elapsed();
        self.wiring.enable_forwarding()?;
        let forwarding = t.elapsed();
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        *applied = None;
        self.wiring
            .apply_rules(&self.table.rebuild(apps, &self.services).to_string())?;
        *applied = Some(apps.to_vec());
        tracing::debug!(?bridge, ?forwarding, total = ?t.elapsed(), "app network timing");
        Ok(())
    }

    /// After a change of the apps: the elements that changed since the last update, deleted
    /// and added in one transaction (the sets refilled when nothing was applied yet by this
    /// agent; the table made anew if that fails, e.g. because someone deleted it).
    pub fn update_rules(&self, apps: &[AppRules]) -> io::Result<()> {
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        let batch = match applied.as_deref() {
            Some(old) => match self.table.diff(old, apps) {
                Some(b) => b,
                None => return Ok(()),
            },
            None => self.table.refill(apps, &self.services),
        };
        *applied = None;
        if let Err(e) = self.wiring.apply_rules(&batch.to_string()) {
            tracing::warn!(error = %e, "updating the firewall failed; making it anew");
            self.wiring
                .apply_rules(&self.table.rebuild(apps, &self.services).to_string())?;
        }
        *applied = Some(apps.to_vec());
        Ok(())
    }

    pub fn app_address(&self, app: &AppName) -> Ipv6Addr {
        self.net.app_address(app)
    }

    pub fn app_ipv4(&self, host: u32) -> Ipv4Addr {
        self.net4.host(host)
    }

    /// Wires the app's namespace; every start calls it, and it completes a wiring that an
    /// interrupted start left half made.
    pub fn wire_app(&self, app: &AppName, ipv4_host: u32, netns: &Path) -> io::Result<()> {
        self.wiring.wire(&AppWire {
            host_if: addr::host_if(&self.ula, app),
            bridge: &self.bridge,
            netns,
            address: self.app_address(app),
            gateway: self.net.gateway(),
            address4: self.app_ipv4(ipv4_host),
            gateway4: self.net4.gateway(),
        })
    }

    pub fn unwire_app(&self, app: &AppName) -> io::Result<()> {
        let name = addr::host_if(&self.ula, app);
        if self.wiring.link_exists(&name) {
            self.wiring.unwire(&name)?;
        }
        Ok(())
    }

    /// Sets the names every app's `/etc/hosts` maps to the device.
    pub fn set_shared_names(&self, names: Vec<String>) {
        *self.shared_names.write().unwrap_or_else(|e| e.into_inner()) = names;
    }

    /// The app's `/etc/hosts`: its own name on its addresses, and the names the device's
    /// proxy serves (other apps, by their HTTPS names) on the gateway.
    pub fn hosts_file(&self, app: &AppName, ipv4_host: u32) -> String {
        let mut out = format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{app}\n{}\t{app}\n",
            self.app_address(app),
            self.app_ipv4(ipv4_host)
        );
        let names = self.shared_names.read().unwrap_or_else(|e| e.into_inner());
        if !names.is_empty() {
            let names = names.join(" ");
            out.push_str(&format!("{}\t{names}\n", self.net.gateway()));
            out.push_str(&format!("{}\t{names}\n", self.net4.gateway()));
        }
        out
    }

    /// The app's `/etc/resolv.conf`: the device's resolvers that an app can reach (not the
    /// device's loopback stubs: inside the app, loopback is the app's own).
    pub fn resolv_conf(&self) -> String {
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .ok()
                .and_then(|t| app_resolv_conf(&t))
        };
        read(&self.resolv_conf)
            // systemd-resolved's stub points at 127.0.0.53; the upstreams are here.
            .or_else(|| read(Path::new("/run/systemd/resolve/resolv.conf")))
            .unwrap_or_else(|| {
                tracing::debug!(source = %self.resolv_conf.display(), "the device has no DNS resolver apps can reach");
                "# the device has no DNS resolver apps can reach\n".to_string()
            })
    }
}

/// Rewrites a resolv.conf for an app: nameservers that are not loopback (an app's loopback
/// is its own), with the search domains and options kept. `None` when no nameserver is left.
pub fn app_resolv_conf(text: &str) -> Option<String> {
    let mut out = String::new();
    let mut servers = 0;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                let Some(ip) = words.next().and_then(|a| a.parse::<IpAddr>().ok()) else {
                    continue;
                };
                if !ip.is_loopback() && !ip.is_unspecified() && servers < 3 {
                    out.push_str(&format!("nameserver {ip}\n"));
                    servers += 1;
                }
            }
            Some("search" | "domain" | "options") => {
                out.push_str(line.trim());
                out.push('\n');
            }
            _ => {}
        }
    }
    (servers > 0).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Links as a set of names; records calls; rule batches fail while `refuse` is set.
    #[derive(Default, Clone)]
    struct Fake {
        links: Arc<Mutex<Vec<String>>>,
        calls: Arc<Mutex<Vec<String>>>,
        refuse_flush: Arc<Mutex<bool>>,
    }

    impl Wiring for Fake {
        fn link_exists(&self, name: &str) -> bool {
            self.links.lock().unwrap().iter().any(|l| l == name)
        }
        fn ensure_bridge(&self, bridge: &str, gw: Ipv6Addr, gw4: Ipv4Addr) -> io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("bridge {bridge} {gw} {gw4}"));
            Ok(())
        }
        fn enable_forwarding(&self) -> io::Result<()> {
            self.calls.lock().unwrap().push("forwarding".into());
            Ok(())
        }
        fn wire(&self, w: &AppWire) -> io::Result<()> {
            self.calls.lock().unwrap().push(format!(
                "wire {} {} via {} {} via {}",
                w.host_if, w.address, w.gateway, w.address4, w.gateway4
            ));
            self.links.lock().unwrap().push(w.host_if.clone());
            Ok(())
        }
        fn unwire(&self, host_if: &str) -> io::Result<()> {
            self.calls.lock().unwrap().push(format!("unwire {host_if}"));
            self.links.lock().unwrap().retain(|l| l != host_if);
            Ok(())
        }
        fn apply_rules(&self, batch: &str) -> io::Result<()> {
            let kind = if batch.contains("\"chain\"") {
                "rebuild"
            } else if batch.contains("\"flush\"") {
                "refill"
            } else {
                "diff"
            };
            self.calls.lock().unwrap().push(format!("rules {kind}"));
            if kind != "rebuild" && *self.refuse_flush.lock().unwrap() {
                return Err(io::Error::other("no such table"));
            }
            Ok(())
        }
    }

    fn network(fake: &Fake) -> Network {
        let ula: Ula48 = "fd12:3456:789a::/48".parse().unwrap();
        let net4: AppsNet4 = "10.200.16.0/20".parse().unwrap();
        Network::with_wiring(ula, net4, "/nonexistent".into(), Box::new(fake.clone()))
    }

    #[test]
    fn up_brings_bridge_forwarding_and_rules_and_every_start_wires() {
        let fake = Fake::default();
        let net = network(&fake);
        let app = AppName::try_from("wiki").unwrap();
        net.up(&[]).unwrap();
        net.wire_app(&app, 2, Path::new("/ns")).unwrap();
        // Again (a restart): wired again, so a half-made wiring gets completed.
        net.wire_app(&app, 2, Path::new("/ns")).unwrap();
        let calls = fake.calls.lock().unwrap().clone();
        assert_eq!(
            calls[..3],
            [
                "bridge hpbr123456789a fd12:3456:789a:1::1 10.200.16.1",
                "forwarding",
                "rules rebuild"
            ]
        );
        assert_eq!(calls.len(), 5, "{calls:?}");
        assert!(
            calls[3].starts_with("wire hp")
                && calls[3].contains("via fd12:3456:789a:1::1 10.200.16.2 via 10.200.16.1"),
            "{calls:?}"
        );
        assert_eq!(calls[3], calls[4]);
        net.unwire_app(&app).unwrap();
        net.unwire_app(&app).unwrap();
        assert!(fake.links.lock().unwrap().is_empty());
        let unwires = fake
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.starts_with("unwire"))
            .count();
        assert_eq!(unwires, 1, "a link that is gone is not deleted again");
    }

    #[test]
    fn rule_updates_send_changes_and_rebuild_when_the_table_is_gone() {
        let fake = Fake::default();
        let net = network(&fake);
        let app = AppRules {
            v6: "fd12:3456:789a:1::aa".parse().unwrap(),
            v4: "10.200.16.2".parse().unwrap(),
            https: Some(80),
            ports: Vec::new(),
        };
        net.update_rules(&[]).unwrap(); // nothing known yet: a refill
        net.update_rules(&[]).unwrap(); // no change: nothing sent
        net.update_rules(std::slice::from_ref(&app)).unwrap(); // a diff
        *fake.refuse_flush.lock().unwrap() = true;
        net.update_rules(&[]).unwrap(); // the diff fails: made anew
        assert_eq!(
            *fake.calls.lock().unwrap(),
            ["rules refill", "rules diff", "rules diff", "rules rebuild"]
        );
    }

    #[test]
    fn apps_get_reachable_resolvers_only() {
        let text = "# generated\nnameserver 127.0.0.53\nnameserver 192.168.1.1\nnameserver fe80::1%eth0\nnameserver 2001:db8::53\nsearch lan\noptions edns0\n";
        assert_eq!(
            app_resolv_conf(text).unwrap(),
            "nameserver 192.168.1.1\nnameserver 2001:db8::53\nsearch lan\noptions edns0\n"
        );
        assert_eq!(
            app_resolv_conf("nameserver 127.0.0.53\nnameserver ::1\n"),
            None
        );
    }
}
