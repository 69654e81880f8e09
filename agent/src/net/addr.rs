//! Addressing: the device's ULA /48, the apps' /64 and each app's address and interface
//! names. Pure: no I/O, so it is tested by itself.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

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

/// The apps' internal IPv4 net, a /20 inside 10.128.0.0/9, NATed to the outside. The bridge
/// holds host 1; apps get host numbers from 2, allocated in the store (IPv4 is too small to
/// derive addresses from names without collisions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppsNet4 {
    base: u32,
}

/// Where internal IPv4 nets are taken from: 2048 /20s, away from the 10.0.0.0/16s and
/// 192.168.0.0/16 home routers use and from 100.64.0.0/10, which CGNAT and Tailscale use.
const V4_POOL: (u32, u8) = (0x0a80_0000, 9);
const V4_LEN: u8 = 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an internal IPv4 net (expected a /20 inside 10.128.0.0/9)")]
pub struct Net4Error(pub String);

fn overlaps(a: u32, a_len: u8, b: u32, b_len: u8) -> bool {
    let len = a_len.min(b_len);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    a & mask == b & mask
}

impl AppsNet4 {
    /// A /20 that overlaps none of `taken` (the routes the device has), the search starting
    /// at a place derived from the ULA so that two devices on one host pick different nets.
    pub fn choose(ula: &Ula48, taken: &[(Ipv4Addr, u8)]) -> Option<AppsNet4> {
        let count = 1u32 << (V4_LEN - V4_POOL.1);
        let start = u32::from_be_bytes([0, 0, ula.global_id[3], ula.global_id[4]]) % count;
        (0..count)
            .map(|i| V4_POOL.0 + (((start + i) % count) << (32 - V4_LEN)))
            .find(|&base| {
                !taken
                    .iter()
                    .any(|(a, len)| *len > 0 && overlaps(base, V4_LEN, u32::from(*a), *len))
            })
            .map(|base| AppsNet4 { base })
    }

    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 1)
    }

    /// The host numbers apps may hold (not the network, the gateway or broadcast).
    pub fn hosts() -> std::ops::RangeInclusive<u32> {
        2..=(1 << (32 - V4_LEN)) - 2
    }

    pub fn host(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(self.base + n)
    }

    pub const PREFIX_LEN: u8 = V4_LEN;
}

impl fmt::Display for AppsNet4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{V4_LEN}", Ipv4Addr::from(self.base))
    }
}

impl std::str::FromStr for AppsNet4 {
    type Err = Net4Error;
    fn from_str(s: &str) -> Result<AppsNet4, Net4Error> {
        let err = || Net4Error(s.to_string());
        let addr = s
            .strip_suffix(&format!("/{V4_LEN}"))
            .ok_or_else(err)?
            .parse::<Ipv4Addr>()
            .map_err(|_| err())?;
        let base = u32::from(addr);
        if base & !(u32::MAX << (32 - V4_LEN)) != 0 || !overlaps(base, V4_LEN, V4_POOL.0, V4_POOL.1)
        {
            return Err(err());
        }
        Ok(AppsNet4 { base })
    }
}

/// IPv4 routes from `/proc/net/route` text: destination and prefix length.
pub fn parse_proc_route(text: &str) -> Vec<(Ipv4Addr, u8)> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            // The kernel prints the address's bytes as a little-endian number.
            Some((Ipv4Addr::from(dest.to_le_bytes()), mask.count_ones() as u8))
        })
        .collect()
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
    fn ipv4_nets_avoid_routes_in_use_and_round_trip() {
        let u: Ula48 = "fd12:3456:789a::/48".parse().unwrap();
        let free = AppsNet4::choose(&u, &[]).unwrap();
        assert_eq!(free.to_string().parse::<AppsNet4>(), Ok(free));
        assert_eq!(free.gateway(), free.host(1));
        assert_eq!(AppsNet4::hosts(), 2..=4094);
        let first = u32::from(free.gateway()) - 1;
        assert!(overlaps(first, 20, 0x0a80_0000, 9), "{free}");
        // The same net is taken by a route: the next one is chosen; a default route and a
        // route elsewhere do not matter.
        let taken = [
            (Ipv4Addr::from(first), 20),
            (Ipv4Addr::UNSPECIFIED, 0),
            (Ipv4Addr::new(192, 168, 1, 0), 24),
        ];
        let next = AppsNet4::choose(&u, &taken).unwrap();
        assert_eq!(u32::from(next.gateway()) - 1, first + (1 << 12));
        // A route covering the whole pool leaves nothing.
        assert_eq!(
            AppsNet4::choose(&u, &[(Ipv4Addr::new(10, 0, 0, 0), 8)]),
            None
        );
        // Another device on the same host starts elsewhere.
        let other: Ula48 = "fdaa:bbbb:cccc::/48".parse().unwrap();
        assert_ne!(AppsNet4::choose(&other, &[]), Some(free));
        for bad in ["10.128.0.1/20", "192.168.0.0/20", "10.128.0.0/24", "x"] {
            assert!(bad.parse::<AppsNet4>().is_err(), "{bad}");
        }
    }

    #[test]
    fn proc_net_route_is_read() {
        let text =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(
            parse_proc_route(text),
            vec![
                (Ipv4Addr::UNSPECIFIED, 0),
                (Ipv4Addr::new(192, 168, 0, 0), 24)
            ]
        );
    }

    #[test]
    fn interface_names_fit_and_differ() {
        let u: Ula48 = "fd12:3456:789a::/48".parse().unwrap();
        let other: Ula48 = "fdaa:bbbb:cccc::/48".parse().unwrap();
        assert_eq!(bridge_name(&u), "hpbr123456789a");
        for name in [
            bridge_name(&u),
            host_if(&u, &app("wiki")),
            host_if(&u, &app(&"a".repeat(32))),
        ] {
            assert!(name.len() <= 15, "{name}");
        }
        assert_ne!(host_if(&u, &app("wiki")), host_if(&u, &app("blog")));
        assert_ne!(
            host_if(&u, &app("wiki")),
            host_if(&other, &app("wiki")),
            "two devices on one host"
        );
    }
}
