//! What the fuzz targets assert about the proxy's host routing and request-head handling,
//! shared by `route_key` (arbitrary host strings) and `request_head` (arbitrary bytes through
//! hyper's HTTP/1.1 server, the way the proxy receives them).
//!
//! A failed assertion is a finding: libFuzzer saves the input under `artifacts/<target>/`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::OnceLock;

use homeport::manifest::AppName;
use homeport::proxy::{forwarded_headers, hostnames, route_key, strip_hop_by_hop};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The device the routing table is built for (as `Proxy::set_routes` does).
pub const DEVICE: &str = "homeport";

/// Headers that must never reach an app (RFC 9110 7.6.1), whatever the client sent.
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
];

/// A small routing table: every name `hostnames()` gives a few apps, to the app.
pub fn table() -> &'static HashMap<String, AppName> {
    static TABLE: OnceLock<HashMap<String, AppName>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = HashMap::new();
        for app in ["wiki", "photos", "a1", "x-y"] {
            let app = AppName::try_from(app).expect("a valid app name");
            for name in hostnames(&app, DEVICE) {
                t.insert(name, app.clone());
            }
        }
        t
    })
}

/// `route_key(host)`, checked: lower case, no trailing dot, no ':' unless `host` was a
/// bracketed IPv6 literal (and then the key is that address).
pub fn checked_route_key(host: &str) -> Option<String> {
    let key = route_key(host)?;
    assert!(!key.is_empty(), "empty key for {host:?}");
    assert!(
        !key.bytes().any(|b| b.is_ascii_uppercase()),
        "key {key:?} for {host:?} is not lower case"
    );
    assert!(
        !key.ends_with('.'),
        "key {key:?} for {host:?} has a trailing dot"
    );
    if host.trim().starts_with('[') {
        assert!(
            key.parse::<Ipv6Addr>().is_ok(),
            "key {key:?} for the bracketed host {host:?} is not an IPv6 address"
        );
    } else {
        assert!(
            !key.contains(':'),
            "key {key:?} for {host:?} has a ':' but the host is no IPv6 literal"
        );
    }
    Some(key)
}

/// A reference spelling check: `host` names `key` if, lower-cased, it is `key` with an
/// optional trailing dot and an optional `:port`. Only DNS names; IPv6 literals never route.
fn spells(host: &str, key: &str) -> bool {
    let host = host.trim().to_ascii_lowercase();
    let name = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host.as_str(),
    };
    name.strip_suffix('.').unwrap_or(name) == key
}

/// Looks `key` (the route key of `host`) up in the table and checks the answer both ways:
/// a hit is a table key that `host` really spells, and a host that spells a table key hits.
pub fn checked_lookup(host: &str, key: Option<&str>) -> Option<&'static AppName> {
    let hit = key.and_then(|k| table().get_key_value(k));
    if let (Some(k), Some((name, _))) = (key, hit) {
        assert_eq!(k, name.as_str());
        assert!(
            spells(host, name),
            "host {host:?} routed to {name:?}, which it does not name"
        );
    }
    for name in table().keys() {
        if spells(host, name) {
            assert_eq!(
                hit.map(|(n, _)| n.as_str()),
                Some(name.as_str()),
                "host {host:?} names {name:?} but does not route there"
            );
        }
    }
    hit.map(|(_, app)| app)
}

/// What `Proxy::forward` does to the request headers, checked: hop-by-hop headers (and the
/// ones `Connection` names) are gone, the rest untouched, and the forwarded headers are there,
/// valid, and say what the proxy knows (not what the client claimed).
pub fn checked_forward_headers(before: &HeaderMap, client: IpAddr, key: &str) -> HeaderMap {
    let mut h = before.clone();
    strip_hop_by_hop(&mut h);
    let named: Vec<HeaderName> = before
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in HOP_BY_HOP.iter().copied().chain(["upgrade"]) {
        assert!(!h.contains_key(n), "{n} left after strip_hop_by_hop: {h:?}");
    }
    for n in &named {
        assert!(
            !h.contains_key(n),
            "{n}, named by Connection, left after strip_hop_by_hop"
        );
    }
    for n in before.keys() {
        if !h.contains_key(n) {
            assert!(
                HOP_BY_HOP.contains(&n.as_str()) || n == header::UPGRADE || named.contains(n),
                "strip_hop_by_hop removed the end-to-end header {n}"
            );
        } else {
            assert!(
                before.get_all(n).iter().eq(h.get_all(n).iter()),
                "strip_hop_by_hop changed {n}"
            );
        }
    }

    forwarded_headers(&mut h, client, key);
    let client = match client {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let one = |name: &str| -> &HeaderValue {
        let mut all = h.get_all(name).iter();
        let v = all
            .next()
            .unwrap_or_else(|| panic!("{name} missing for host {key:?}"));
        assert!(all.next().is_none(), "{name} sent twice");
        assert!(
            v.to_str().is_ok(),
            "{name}: {v:?} is not a visible-ASCII value"
        );
        v
    };
    assert_eq!(one("x-forwarded-proto"), "https");
    assert_eq!(one("x-forwarded-host"), key);
    let xff = one("x-forwarded-for").to_str().unwrap_or_default();
    assert!(
        xff.ends_with(&client.to_string()),
        "x-forwarded-for {xff:?} does not end with the client {client}"
    );
    let node = match client {
        IpAddr::V6(a) => format!("\"[{a}]\""),
        IpAddr::V4(a) => a.to_string(),
    };
    let fwd = one("forwarded").to_str().unwrap_or_default();
    assert!(
        fwd.ends_with(&format!("for={node};proto=https;host=\"{key}\"")),
        "forwarded {fwd:?} does not end with this hop"
    );
    h
}
