//! Addressing: the device's ULA /48, the apps' /64 and each app's address and interface
//! names. Pure: no I/O, so it is tested by itself.

use std::fmt;
use std::net::Ipv6Addr;

use sha2::{Digest as _, Sha256};

use crate::manifest::AppName;

/// The device's unique local prefix (RFC 4193): `fd` + a random 40-bit global ID, /48.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ula48 {
    global_id: [u8; 5],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a ULA /48 (expected fdXX:XXXX:XXXX::/48)")]
pub struct UlaError(pub String);

impl Ula48 {
    /// A new random prefix, as RFC 4193 asks (a random global ID, not a derived one).
    pub fn random() -> Ula48 {
        Ula48 {
            global_id: rand::random(),
        }
    }

    pub fn global_id_hex(&self) -> String {
        hex::encode(self.global_id)
    }

    fn segment(&self, i: usize) -> u16 {
        let b = [
            0xfd,
            self.global_id[0],
            self.global_id[1],
            self.global_id[2],
            self.global_id[3],
            self.global_id[4],
        ];
        u16::from_be_bytes([b[2 * i], b[2 * i + 1]])
    }

    /// The /64 apps live in (subnet 1; others are kept for later uses).
    pub fn apps_net(&self) -> AppsNet {
        AppsNet {
            prefix: [self.segment(0), self.segment(1), self.segment(2), 1],
        }
    }
}

impl fmt::Display for Ula48 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:x}:{:x}:{:x}::/48",
            self.segment(0),
            self.segment(1),
            self.segment(2)
        )
    }
}

impl std::str::FromStr for Ula48 {
    type Err = UlaError;
    fn from_str(s: &str) -> Result<Ula48, UlaError> {
        let err = || UlaError(s.to_string());
        let addr = s.strip_suffix("/48").ok_or_else(err)?;
        let ip: Ipv6Addr = addr.parse().map_err(|_| err())?;
        let o = ip.octets();
        if o[0] != 0xfd || o[6..].iter().any(|&b| b != 0) {
            return Err(err());
        }
        Ok(Ula48 {
            global_id: [o[1], o[2], o[3], o[4], o[5]],
        })
    }
}

/// The apps' /64; the bridge holds `::1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppsNet {
    prefix: [u16; 4],
}

/// Interface IDs below this are kept for the device's own services.
const RESERVED_IIDS: u64 = 0x1_0000;

impl AppsNet {
    fn addr(&self, iid: u64) -> Ipv6Addr {
        let p = self.prefix;
        Ipv6Addr::new(
            p[0],
            p[1],
            p[2],
            p[3],
            (iid >> 48) as u16,
            (iid >> 32) as u16,
            (iid >> 16) as u16,
            iid as u16,
        )
    }

    pub fn gateway(&self) -> Ipv6Addr {
        self.addr(1)
    }

    /// An app's address: its interface ID is derived from its name, so it is the same across
    /// restarts, updates, agent restarts and reinstalls, with nothing to allocate or store.
    pub fn app_address(&self, app: &AppName) -> Ipv6Addr {
        let h = Sha256::digest(app.as_str().as_bytes());
        let mut iid = u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
        if iid < RESERVED_IIDS {
            iid |= 1 << 63;
        }
        self.addr(iid)
    }
}

impl fmt::Display for AppsNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.prefix;
        write!(f, "{:x}:{:x}:{:x}:{:x}::/64", p[0], p[1], p[2], p[3])
    }
}

/// Interface names (at most 15 bytes), unique per device and app.
pub fn bridge_name(ula: &Ula48) -> String {
    format!("hpbr{}", &ula.global_id_hex()[..10])
}

fn app_tag(ula: &Ula48, app: &AppName) -> String {
    let h = Sha256::digest(format!("{}/{}", ula.global_id_hex(), app).as_bytes());
    hex::encode(&h[..6])
}

/// The host end of the app's veth pair.
pub fn host_if(ula: &Ula48, app: &AppName) -> String {
    format!("hp{}", app_tag(ula, app))
}

/// The app's end before it is moved into the app's namespace and renamed `eth0`.
pub fn peer_if(ula: &Ula48, app: &AppName) -> String {
    format!("hpp{}", app_tag(ula, app))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(s: &str) -> AppName {
        AppName::try_from(s).unwrap()
    }

    #[test]
    fn ula_round_trips_and_is_random() {
        let u = Ula48::random();
        let s = u.to_string();
        assert!(s.starts_with("fd") && s.ends_with("::/48"), "{s}");
        assert_eq!(s.parse::<Ula48>(), Ok(u));
        assert_ne!(Ula48::random(), Ula48::random());
        for bad in [
            "fd00::/64",
            "fe80::/48",
            "fd12:3456:789a:1::/48",
            "nonsense",
            "fd12:3456:789a::",
        ] {
            assert!(bad.parse::<Ula48>().is_err(), "{bad}");
        }
    }

    #[test]
    fn app_addresses_are_stable_distinct_and_inside_the_apps_net() {
        let u: Ula48 = "fd12:3456:789a::/48".parse().unwrap();
        let net = u.apps_net();
        assert_eq!(net.to_string(), "fd12:3456:789a:1::/64");
        assert_eq!(
            net.gateway(),
            "fd12:3456:789a:1::1".parse::<Ipv6Addr>().unwrap()
        );
        let a = net.app_address(&app("wiki"));
        assert_eq!(a, net.app_address(&app("wiki")), "stable");
        assert_ne!(a, net.app_address(&app("wikis")));
        assert_eq!(a.segments()[..4], [0xfd12, 0x3456, 0x789a, 1]);
        let mut seen = std::collections::HashSet::new();
        for i in 0..5000 {
            let addr = net.app_address(&app(&format!("app{i}")));
            let iid = u128::from(addr) as u64;
            assert!(iid >= RESERVED_IIDS, "reserved range avoided");
            assert!(seen.insert(addr), "distinct");
        }
    }

    #[test]
    fn interface_names_fit_and_differ() {
        let u: Ula48 = "fd12:3456:789a::/48".parse().unwrap();
        let other: Ula48 = "fdaa:bbbb:cccc::/48".parse().unwrap();
        assert_eq!(bridge_name(&u), "hpbr123456789a");
        for name in [
            bridge_name(&u),
            host_if(&u, &app("wiki")),
            peer_if(&u, &app(&"a".repeat(32))),
        ] {
            assert!(name.len() <= 15, "{name}");
        }
        assert_ne!(host_if(&u, &app("wiki")), host_if(&u, &app("blog")));
        assert_ne!(
            host_if(&u, &app("wiki")),
            host_if(&other, &app("wiki")),
            "two devices on one host"
        );
        assert_ne!(host_if(&u, &app("wiki")), peer_if(&u, &app("wiki")));
    }
}
