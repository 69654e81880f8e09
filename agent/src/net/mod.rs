//! Per-app IPv6: the device's ULA prefix, a bridge holding the gateway address, and a veth
//! pair per app whose peer is `eth0` in the app's network namespace.
//!
//! Invariant: only this module talks netlink, and only through the narrow [`Wiring`] trait, so
//! the planning here is tested with a fake and the kernel side by the integration tests.

pub mod addr;
mod netlink;

use std::io;
use std::net::Ipv6Addr;
use std::path::Path;

use crate::manifest::AppName;
pub use addr::{AppsNet, Ula48};

/// What one app's wiring consists of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppWire<'a> {
    pub host_if: String,
    pub peer_if: String,
    pub bridge: &'a str,
    pub netns: &'a Path,
    pub address: Ipv6Addr,
    pub gateway: Ipv6Addr,
}

/// The kernel operations the network needs; blocking calls.
pub trait Wiring: Send + Sync {
    fn link_exists(&self, name: &str) -> bool;
    /// Creates the bridge if it is missing, with `gateway`/64 on it, up.
    fn ensure_bridge(&self, bridge: &str, gateway: Ipv6Addr) -> io::Result<()>;
    /// A veth pair: the host end up on the bridge as an isolated port (apps never reach each
    /// other, only the host), the peer moved into the app's namespace as `eth0`, up, with the
    /// address (no DAD) and a default route via the gateway.
    fn wire(&self, w: &AppWire) -> io::Result<()>;
    /// Deletes the host end (the kernel deletes its peer with it).
    fn unwire(&self, host_if: &str) -> io::Result<()>;
}

pub struct Network {
    ula: Ula48,
    net: AppsNet,
    bridge: String,
    wiring: Box<dyn Wiring>,
}

impl Network {
    /// The network of a device whose prefix is `ula`, through the kernel.
    pub fn new(ula: Ula48) -> Network {
        Network::with_wiring(ula, Box::new(netlink::Rtnetlink))
    }

    pub fn with_wiring(ula: Ula48, wiring: Box<dyn Wiring>) -> Network {
        Network {
            net: ula.apps_net(),
            bridge: addr::bridge_name(&ula),
            ula,
            wiring,
        }
    }

    pub fn ula(&self) -> Ula48 {
        self.ula
    }

    pub fn apps_net(&self) -> AppsNet {
        self.net
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// Brings up the bridge (at agent start; idempotent).
    pub fn up(&self) -> io::Result<()> {
        self.wiring.ensure_bridge(&self.bridge, self.net.gateway())
    }

    pub fn app_address(&self, app: &AppName) -> Ipv6Addr {
        self.net.app_address(app)
    }

    /// Wires the app's namespace unless it already is (idempotent: every start calls it).
    pub fn wire_app(&self, app: &AppName, netns: &Path) -> io::Result<()> {
        let host_if = addr::host_if(&self.ula, app);
        if self.wiring.link_exists(&host_if) {
            return Ok(());
        }
        // A half-made pair from an interrupted wiring would block the new one.
        let peer_if = addr::peer_if(&self.ula, app);
        if self.wiring.link_exists(&peer_if) {
            self.wiring.unwire(&peer_if)?;
        }
        self.wiring.wire(&AppWire {
            host_if,
            peer_if,
            bridge: &self.bridge,
            netns,
            address: self.app_address(app),
            gateway: self.net.gateway(),
        })
    }

    pub fn unwire_app(&self, app: &AppName) -> io::Result<()> {
        for name in [addr::host_if(&self.ula, app), addr::peer_if(&self.ula, app)] {
            if self.wiring.link_exists(&name) {
                self.wiring.unwire(&name)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Links as a set of names; records calls.
    #[derive(Default, Clone)]
    struct Fake {
        links: Arc<Mutex<Vec<String>>>,
        calls: Arc<Mutex<Vec<String>>>,
    }

    impl Wiring for Fake {
        fn link_exists(&self, name: &str) -> bool {
            self.links.lock().unwrap().iter().any(|l| l == name)
        }
        fn ensure_bridge(&self, bridge: &str, gateway: Ipv6Addr) -> io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("bridge {bridge} {gateway}"));
            Ok(())
        }
        fn wire(&self, w: &AppWire) -> io::Result<()> {
            self.calls.lock().unwrap().push(format!(
                "wire {} {} via {}",
                w.host_if, w.address, w.gateway
            ));
            self.links.lock().unwrap().push(w.host_if.clone());
            Ok(())
        }
        fn unwire(&self, host_if: &str) -> io::Result<()> {
            self.calls.lock().unwrap().push(format!("unwire {host_if}"));
            self.links.lock().unwrap().retain(|l| l != host_if);
            Ok(())
        }
    }

    #[test]
    fn wiring_is_idempotent_and_cleans_half_made_pairs() {
        let fake = Fake::default();
        let ula: Ula48 = "fd12:3456:789a::/48".parse().unwrap();
        let net = Network::with_wiring(ula, Box::new(fake.clone()));
        let app = AppName::try_from("wiki").unwrap();
        net.up().unwrap();
        net.wire_app(&app, Path::new("/ns")).unwrap();
        net.wire_app(&app, Path::new("/ns")).unwrap();
        let calls = fake.calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_eq!(calls[0], "bridge hpbr123456789a fd12:3456:789a:1::1");
        assert!(
            calls[1].starts_with("wire hp") && calls[1].contains("via fd12:3456:789a:1::1"),
            "{calls:?}"
        );

        // A peer left by an interrupted wiring is removed before wiring again.
        net.unwire_app(&app).unwrap();
        fake.links.lock().unwrap().push(addr::peer_if(&ula, &app));
        net.wire_app(&app, Path::new("/ns")).unwrap();
        let calls = fake.calls.lock().unwrap().clone();
        assert!(
            calls[calls.len() - 2].starts_with("unwire hpp"),
            "{calls:?}"
        );
        net.unwire_app(&app).unwrap();
        assert!(fake.links.lock().unwrap().is_empty());
    }
}
