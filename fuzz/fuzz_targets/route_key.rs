//! Host routing: any string as a `Host`/`:authority`/SNI value through `route_key`, the table
//! lookup and the forwarded headers the proxy would add for it.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use homeport_fuzz::{checked_forward_headers, checked_lookup, checked_route_key};
use hyper::header::HeaderMap;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(host) = std::str::from_utf8(data) else {
        return;
    };
    let key = checked_route_key(host);
    checked_lookup(host, key.as_deref());
    if let Some(key) = key {
        let client = match data.len() % 3 {
            0 => IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            1 => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7)),
            _ => IpAddr::V6(Ipv4Addr::new(198, 51, 100, 2).to_ipv6_mapped()),
        };
        checked_forward_headers(&HeaderMap::new(), client, &key);
    }
});
