//! The firewall, planned as nftables JSON. Pure: the kernel side applies what this builds.
//!
//! One table per device (`inet homeport_<id>`) holds the whole policy. Its chains are fixed;
//! what varies with the installed apps lives in sets and maps. So a change (install, update,
//! rm) is one transaction that flushes the sets and fills them again from the store, with no
//! chain or hook touched; at agent start the whole table is made anew in one transaction
//! (add, delete, add: the same batch works whether or not it exists), so it always matches
//! the store, whatever was there before.
//!
//! Policy, for traffic on the apps' bridge:
//! - app → app: rejected (also routed through the gateway; the bridge ports are isolated too).
//! - app → the device itself (its API, its proxy, anything listening): rejected, except the
//!   shared services' ports (`services`) and ICMP (neighbour discovery needs it).
//! - app → LAN and internet: allowed, masqueraded behind the device's address (IPv4 and the
//!   ULA IPv6 alike), TCP's MSS clamped to the way out (the apps' links have a 64 KiB MTU).
//! - device → app (the reverse proxy, health checks): only the app's `[https]` port and its
//!   declared `[[port]]`s.
//! - LAN → app: only public ports, which are DNATed from the device's own addresses (IPv4 and
//!   IPv6) to the app; everything else towards an app is dropped.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde_json::{json, Value};

use crate::manifest::{Access, Port, Protocol};

/// What the firewall needs to know of one app.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AppRules {
    pub v6: Ipv6Addr,
    pub v4: Ipv4Addr,
    pub https: Option<u16>,
    pub ports: Vec<Port>,
}

impl AppRules {
    /// Every port the device itself may reach on the app.
    fn device_ports(&self) -> impl Iterator<Item = (Protocol, u16)> + '_ {
        self.https
            .map(|p| (Protocol::Tcp, p))
            .into_iter()
            .chain(self.ports.iter().map(|p| (p.protocol, p.port)))
    }

    fn public_ports(&self) -> impl Iterator<Item = (Protocol, u16)> + '_ {
        self.ports
            .iter()
            .filter(|p| p.access == Access::Public)
            .map(|p| (p.protocol, p.port))
    }
}

/// The device's table and the bridge it guards.
#[derive(Debug, Clone)]
pub struct Table {
    pub name: String,
    pub bridge: String,
    /// The device's addresses on the bridge, where its internal services (the shared
    /// database) listen: only apps reach them.
    pub gateway4: Ipv4Addr,
    pub gateway6: Ipv6Addr,
}

const SETS: [(&str, &[&str]); 5] = [
    (
        "device_to_app6",
        &["ipv6_addr", "inet_proto", "inet_service"],
    ),
    (
        "device_to_app4",
        &["ipv4_addr", "inet_proto", "inet_service"],
    ),
    ("public6", &["ipv6_addr", "inet_proto", "inet_service"]),
    ("public4", &["ipv4_addr", "inet_proto", "inet_service"]),
    ("services", &["inet_proto", "inet_service"]),
];
const MAPS: [(&str, &str); 2] = [("dnat6", "ipv6_addr"), ("dnat4", "ipv4_addr")];

fn meta(key: &str) -> Value {
    json!({"meta": {"key": key}})
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}

fn eq(left: Value, right: Value) -> Value {
    json!({"match": {"op": "==", "left": left, "right": right}})
}

fn ne(left: Value, right: Value) -> Value {
    json!({"match": {"op": "!=", "left": left, "right": right}})
}

fn proto_port() -> Vec<Value> {
    vec![meta("l4proto"), payload("th", "dport")]
}

/// `daddr . l4proto . dport` of the given family.
fn addr_proto_port(family: &str) -> Value {
    let mut v = vec![payload(family, "daddr")];
    v.extend(proto_port());
    json!({"concat": v})
}

fn established() -> Value {
    json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}})
}

fn icmp() -> Value {
    eq(meta("l4proto"), json!({"set": ["icmp", "ipv6-icmp"]}))
}

fn reject() -> Value {
    json!({"reject": {"type": "icmpx", "expr": "admin-prohibited"}})
}

impl Table {
    fn id(&self) -> Value {
        json!({"family": "inet", "name": self.name})
    }

    fn of(&self, name: &str) -> Value {
        json!({"family": "inet", "table": self.name, "name": name})
    }

    fn chain(&self, name: &str, kind: &str, hook: &str, prio: i32) -> Value {
        json!({"add": {"chain": {
            "family": "inet", "table": self.name, "name": name,
            "type": kind, "hook": hook, "prio": prio, "policy": "accept",
        }}})
    }

    fn rule(&self, chain: &str, expr: Vec<Value>) -> Value {
        json!({"add": {"rule": {"family": "inet", "table": self.name, "chain": chain, "expr": expr}}})
    }

    /// The whole table, made anew in one transaction, with its sets filled.
    pub fn rebuild(&self, apps: &[AppRules], services: &[(Protocol, u16)]) -> Value {
        let iif = || meta("iifname");
        let oif = || meta("oifname");
        let br = || json!(self.bridge);
        let mut cmds = vec![
            json!({"add": {"table": self.id()}}),
            json!({"delete": {"table": self.id()}}),
            json!({"add": {"table": self.id()}}),
        ];
        for (name, types) in SETS {
            let mut set = self.of(name);
            set["type"] = json!(types);
            cmds.push(json!({"add": {"set": set}}));
        }
        for (name, data) in MAPS {
            let mut map = self.of(name);
            map["type"] = json!(["inet_proto", "inet_service"]);
            map["map"] = json!(data);
            cmds.push(json!({"add": {"map": map}}));
        }
        cmds.extend([
            self.chain("input", "filter", "input", 0),
            self.chain("forward", "filter", "forward", 0),
            self.chain("output", "filter", "output", 0),
            self.chain("prerouting", "nat", "prerouting", -100),
            self.chain("postrouting", "nat", "postrouting", 100),
            // Apps → the device: replies, ICMP and the services' ports; nothing else.
            self.rule(
                "input",
                vec![eq(iif(), br()), established(), json!({"accept": null})],
            ),
            self.rule(
                "input",
                vec![eq(iif(), br()), icmp(), json!({"accept": null})],
            ),
            self.rule(
                "input",
                vec![
                    eq(iif(), br()),
                    eq(json!({"concat": proto_port()}), json!("@services")),
                    json!({"accept": null}),
                ],
            ),
            self.rule("input", vec![eq(iif(), br()), reject()]),
            // The gateway's addresses are for apps: from anywhere else (the LAN routing to
            // them through the device) nothing reaches the services listening there.
            self.rule(
                "input",
                vec![
                    ne(iif(), br()),
                    ne(iif(), json!("lo")),
                    eq(payload("ip", "daddr"), json!(self.gateway4.to_string())),
                    json!({"drop": null}),
                ],
            ),
            self.rule(
                "input",
                vec![
                    ne(iif(), br()),
                    ne(iif(), json!("lo")),
                    eq(payload("ip6", "daddr"), json!(self.gateway6.to_string())),
                    json!({"drop": null}),
                ],
            ),
            // Through the device: never app to app; apps out to anywhere; in to apps only
            // replies and public ports.
            // Apps' links have a 64 KiB MTU; TCP they open (or answer) through the device is
            // told the MTU of the way out.
            self.rule(
                "forward",
                vec![
                    eq(iif(), br()),
                    eq(
                        json!({"&": [payload("tcp", "flags"), ["syn", "rst"]]}),
                        json!("syn"),
                    ),
                    json!({"mangle": {
                        "key": {"tcp option": {"name": "maxseg", "field": "size"}},
                        "value": {"rt": {"key": "mtu"}},
                    }}),
                ],
            ),
            self.rule("forward", vec![eq(iif(), br()), eq(oif(), br()), reject()]),
            self.rule("forward", vec![eq(iif(), br()), json!({"accept": null})]),
            self.rule(
                "forward",
                vec![eq(oif(), br()), established(), json!({"accept": null})],
            ),
            self.rule(
                "forward",
                vec![
                    eq(oif(), br()),
                    eq(addr_proto_port("ip6"), json!("@public6")),
                    json!({"accept": null}),
                ],
            ),
            self.rule(
                "forward",
                vec![
                    eq(oif(), br()),
                    eq(addr_proto_port("ip"), json!("@public4")),
                    json!({"accept": null}),
                ],
            ),
            self.rule("forward", vec![eq(oif(), br()), json!({"drop": null})]),
            // The device → apps: only the ports each app declares.
            self.rule(
                "output",
                vec![eq(oif(), br()), established(), json!({"accept": null})],
            ),
            self.rule(
                "output",
                vec![eq(oif(), br()), icmp(), json!({"accept": null})],
            ),
            self.rule(
                "output",
                vec![
                    eq(oif(), br()),
                    eq(addr_proto_port("ip6"), json!("@device_to_app6")),
                    json!({"accept": null}),
                ],
            ),
            self.rule(
                "output",
                vec![
                    eq(oif(), br()),
                    eq(addr_proto_port("ip"), json!("@device_to_app4")),
                    json!({"accept": null}),
                ],
            ),
            self.rule("output", vec![eq(oif(), br()), reject()]),
        ]);
        // Public ports on the device's own addresses go to the app that declared them.
        for (family, map) in [("ip", "@dnat4"), ("ip6", "@dnat6")] {
            cmds.push(self.rule(
                "prerouting",
                vec![
                    ne(iif(), br()),
                    eq(
                        json!({"fib": {"result": "type", "flags": ["daddr"]}}),
                        json!("local"),
                    ),
                    json!({"dnat": {"family": family, "addr": {"map": {
                        "key": {"concat": proto_port()}, "data": map,
                    }}}}),
                ],
            ));
        }
        cmds.push(self.rule(
            "postrouting",
            vec![
                eq(iif(), br()),
                ne(oif(), br()),
                json!({"masquerade": null}),
            ],
        ));
        cmds.extend(self.elements(apps, services));
        json!({"nftables": cmds})
    }

    /// The sets emptied and filled again, in one transaction.
    pub fn refill(&self, apps: &[AppRules], services: &[(Protocol, u16)]) -> Value {
        let mut cmds = Vec::new();
        for (name, _) in SETS {
            cmds.push(json!({"flush": {"set": self.of(name)}}));
        }
        for (name, _) in MAPS {
            cmds.push(json!({"flush": {"map": self.of(name)}}));
        }
        cmds.extend(self.elements(apps, services));
        json!({"nftables": cmds})
    }

    /// The batch that turns the sets filled for `old` into those for `new`: deletions of
    /// what went, additions of what came, in one transaction; `None` when nothing changes.
    /// Its size and cost follow the change, not the number of apps. (The services' set is
    /// fixed for the agent's lifetime: it is filled when the table is made.)
    pub fn diff(&self, old: &[AppRules], new: &[AppRules]) -> Option<Value> {
        let (was, is): (HashSet<&AppRules>, HashSet<&AppRules>) =
            (old.iter().collect(), new.iter().collect());
        let gone: Vec<AppRules> = old.iter().filter(|a| !is.contains(a)).cloned().collect();
        let came: Vec<AppRules> = new.iter().filter(|a| !was.contains(a)).cloned().collect();
        let (gone, came) = (contents(&gone, &[]), contents(&came, &[]));
        let mut deletes = Vec::new();
        let mut adds = Vec::new();
        for ((name, before), (_, after)) in gone.into_iter().zip(came) {
            // An element an app keeps across its change stays.
            let text =
                |v: &[Value]| -> HashSet<String> { v.iter().map(Value::to_string).collect() };
            let (b, a) = (text(&before), text(&after));
            let dels: Vec<Value> = before
                .into_iter()
                .filter(|e| !a.contains(&e.to_string()))
                // A map element is deleted by its key.
                .map(|e| e.get(0).cloned().unwrap_or(e))
                .collect();
            let adds_here: Vec<Value> = after
                .into_iter()
                .filter(|e| !b.contains(&e.to_string()))
                .collect();
            if !dels.is_empty() {
                deletes.push(self.element("delete", name, dels));
            }
            if !adds_here.is_empty() {
                adds.push(self.element("add", name, adds_here));
            }
        }
        if deletes.is_empty() && adds.is_empty() {
            return None;
        }
        deletes.extend(adds);
        Some(json!({"nftables": deletes}))
    }

    fn element(&self, op: &str, set: &str, elems: Vec<Value>) -> Value {
        let mut el = self.of(set);
        el["elem"] = json!(elems);
        json!({op: {"element": el}})
    }

    fn elements(&self, apps: &[AppRules], services: &[(Protocol, u16)]) -> Vec<Value> {
        contents(apps, services)
            .into_iter()
            .filter(|(_, e)| !e.is_empty())
            .map(|(name, e)| self.element("add", name, e))
            .collect()
    }
}

/// What each set and map holds for `apps`, in a fixed order.
fn contents(apps: &[AppRules], services: &[(Protocol, u16)]) -> [(&'static str, Vec<Value>); 7] {
    let triple = |addr: String, (proto, port): (Protocol, u16)| json!({"concat": [addr, proto.as_str(), port]});
    let mut sets: [(&str, Vec<Value>); 7] = [
        ("device_to_app6", Vec::new()),
        ("device_to_app4", Vec::new()),
        ("public6", Vec::new()),
        ("public4", Vec::new()),
        ("dnat6", Vec::new()),
        ("dnat4", Vec::new()),
        ("services", Vec::new()),
    ];
    for app in apps {
        for pp in app.device_ports() {
            sets[0].1.push(triple(app.v6.to_string(), pp));
            sets[1].1.push(triple(app.v4.to_string(), pp));
        }
        for pp @ (proto, port) in app.public_ports() {
            sets[2].1.push(triple(app.v6.to_string(), pp));
            sets[3].1.push(triple(app.v4.to_string(), pp));
            let key = json!({"concat": [proto.as_str(), port]});
            sets[4].1.push(json!([key, app.v6.to_string()]));
            sets[5].1.push(json!([key, app.v4.to_string()]));
        }
    }
    for (proto, port) in services {
        sets[6].1.push(json!({"concat": [proto.as_str(), port]}));
    }
    sets
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        Table {
            name: "homeport_x".into(),
            bridge: "hpbrx".into(),
            gateway4: Ipv4Addr::new(10, 128, 0, 1),
            gateway6: "fd00:1::1".parse().unwrap(),
        }
    }

    fn dns() -> AppRules {
        AppRules {
            v6: "fd00:1::aa".parse().unwrap(),
            v4: Ipv4Addr::new(10, 128, 0, 2),
            https: Some(8080),
            ports: vec![
                Port {
                    port: 53,
                    protocol: Protocol::Udp,
                    access: Access::Public,
                },
                Port {
                    port: 9100,
                    protocol: Protocol::Tcp,
                    access: Access::Internal,
                },
            ],
        }
    }

    fn commands(v: &Value) -> &Vec<Value> {
        v["nftables"].as_array().unwrap()
    }

    /// The elements added to `set` by a batch.
    fn elements(v: &Value, set: &str) -> Vec<String> {
        commands(v)
            .iter()
            .filter(|c| c["add"]["element"]["name"] == set)
            .flat_map(|c| c["add"]["element"]["elem"].as_array().unwrap().clone())
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn rebuild_replaces_the_table_in_one_batch() {
        let v = table().rebuild(&[dns()], &[]);
        let c = commands(&v);
        assert_eq!(
            c[0],
            json!({"add": {"table": {"family": "inet", "name": "homeport_x"}}})
        );
        assert_eq!(c[1]["delete"]["table"]["name"], "homeport_x");
        assert_eq!(c[2]["add"]["table"]["name"], "homeport_x");
        let hooks: Vec<&str> = c
            .iter()
            .filter_map(|c| c["add"]["chain"]["hook"].as_str())
            .collect();
        assert_eq!(
            hooks,
            ["input", "forward", "output", "prerouting", "postrouting"]
        );
        // TCP out of the apps' 64 KiB-MTU links is clamped to the way out.
        let clamp = r#""mangle":{"key":{"tcp option":{"field":"size","name":"maxseg"}}"#;
        assert!(c
            .iter()
            .any(|c| c["add"]["rule"]["chain"] == "forward" && c.to_string().contains(clamp)));
        // Deterministic: the same store gives the same batch.
        assert_eq!(v, table().rebuild(&[dns()], &[]));
    }

    #[test]
    fn ports_land_in_the_right_sets() {
        let v = table().rebuild(&[dns()], &[(Protocol::Tcp, 5432)]);
        assert_eq!(
            elements(&v, "device_to_app6"),
            [
                r#"{"concat":["fd00:1::aa","tcp",8080]}"#,
                r#"{"concat":["fd00:1::aa","udp",53]}"#,
                r#"{"concat":["fd00:1::aa","tcp",9100]}"#,
            ]
        );
        assert_eq!(elements(&v, "device_to_app4").len(), 3);
        // Only the public port is reachable from the LAN, on both families.
        assert_eq!(
            elements(&v, "public4"),
            [r#"{"concat":["10.128.0.2","udp",53]}"#]
        );
        assert_eq!(
            elements(&v, "public6"),
            [r#"{"concat":["fd00:1::aa","udp",53]}"#]
        );
        assert_eq!(
            elements(&v, "dnat4"),
            [r#"[{"concat":["udp",53]},"10.128.0.2"]"#]
        );
        assert_eq!(
            elements(&v, "dnat6"),
            [r#"[{"concat":["udp",53]},"fd00:1::aa"]"#]
        );
        assert_eq!(elements(&v, "services"), [r#"{"concat":["tcp",5432]}"#]);
    }

    #[test]
    fn refill_touches_only_sets_and_leaves_none_stale() {
        let v = table().refill(&[], &[]);
        for c in commands(&v) {
            let op = c.as_object().unwrap().keys().next().unwrap();
            assert_eq!(op, "flush", "{c}");
        }
        assert_eq!(
            commands(&v).len(),
            SETS.len() + MAPS.len(),
            "every set flushed"
        );
        let v = table().refill(&[dns()], &[]);
        assert!(commands(&v)
            .iter()
            .all(|c| c.get("flush").is_some() || c["add"].get("element").is_some()));
        assert_eq!(elements(&v, "public4").len(), 1);
    }

    #[test]
    fn diff_names_only_what_changed() {
        let t = table();
        let other = AppRules {
            v6: "fd00:1::bb".parse().unwrap(),
            v4: Ipv4Addr::new(10, 128, 0, 3),
            https: Some(80),
            ports: Vec::new(),
        };
        assert_eq!(t.diff(&[dns()], &[dns()]), None, "no change, no batch");
        // Adding an app adds its elements only.
        let v = t.diff(&[dns()], &[dns(), other.clone()]).unwrap();
        assert!(commands(&v).iter().all(|c| c.get("add").is_some()));
        assert_eq!(
            elements(&v, "device_to_app6"),
            [r#"{"concat":["fd00:1::bb","tcp",80]}"#]
        );
        assert!(elements(&v, "public4").is_empty());
        // Removing one deletes its elements; map elements by their key.
        let v = t.diff(&[dns(), other], &[]).unwrap();
        let deleted = |set: &str| -> Vec<String> {
            commands(&v)
                .iter()
                .filter(|c| c["delete"]["element"]["name"] == set)
                .flat_map(|c| c["delete"]["element"]["elem"].as_array().unwrap().clone())
                .map(|e| e.to_string())
                .collect()
        };
        assert_eq!(deleted("device_to_app4").len(), 4);
        assert_eq!(deleted("dnat4"), [r#"{"concat":["udp",53]}"#]);
        assert!(commands(&v).iter().all(|c| c.get("delete").is_some()));
        // A changed port: the old one deleted before the new one is added, in one batch.
        let mut moved = dns();
        moved.ports[0].port = 5353;
        let v = t.diff(&[dns()], &[moved]).unwrap();
        let ops: Vec<&str> = commands(&v)
            .iter()
            .map(|c| c.as_object().unwrap().keys().next().unwrap().as_str())
            .collect();
        let first_add = ops.iter().position(|o| *o == "add").unwrap();
        assert!(ops[..first_add].iter().all(|o| *o == "delete") && first_add > 0);
    }

    #[test]
    fn an_app_without_ports_is_reachable_by_nobody() {
        let quiet = AppRules {
            https: None,
            ports: Vec::new(),
            ..dns()
        };
        let v = table().rebuild(&[quiet], &[]);
        assert!(commands(&v)
            .iter()
            .all(|c| c["add"].get("element").is_none()));
    }
}
