//! [`Wiring`] through rtnetlink. Each call runs on a short-lived thread of its own with a
//! small current-thread runtime: work inside an app's namespace needs `setns`, which changes
//! only the calling thread, and such a thread must never go back to a shared pool.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use futures_util::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth};
use netlink_packet_route::route::RouteMessage;
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};

use super::{AppWire, AppsNet4, Wiring};

fn nl(context: &str, e: rtnetlink::Error) -> io::Error {
    match &e {
        rtnetlink::Error::NetlinkError(m) => match m.code {
            Some(c) => io::Error::new(
                io::Error::from_raw_os_error(-c.get()).kind(),
                format!("{context}: {}", io::Error::from_raw_os_error(-c.get())),
            ),
            None => io::Error::other(format!("{context}: {e}")),
        },
        _ => io::Error::other(format!("{context}: {e}")),
    }
}

fn exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.code.is_some_and(|c| -c.get() == libc::EEXIST))
}

/// Runs `f` on a new thread with a small runtime of its own: the thread may `setns` (see
/// [`enter`]) and is gone afterwards.
fn on_thread<T, F, Fut>(f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<T>>,
{
    std::thread::spawn(move || -> io::Result<T> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        rt.block_on(f())
    })
    .join()
    .map_err(|_| io::Error::other("netlink thread panicked"))?
}

/// A netlink connection in the calling thread's network namespace.
fn connect() -> io::Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Moves the calling thread (only it) into the namespace `ns`.
fn enter(ns: &std::fs::File, what: &Path) -> io::Result<()> {
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| io::Error::other(format!("enter {}: {e}", what.display())))
}

async fn index(h: &Handle, name: &str) -> io::Result<u32> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(l.header.index),
        Ok(None) => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no link {name}"),
        )),
        Err(e) => Err(nl(&format!("find link {name}"), e)),
    }
}

/// Adds `addr`/`len`; IPv6 without duplicate address detection (it would hold connections
/// for ~2 s).
async fn add_address(h: &Handle, index: u32, addr: IpAddr, len: u8) -> io::Result<()> {
    let mut req = h.address().add(index, addr, len);
    if addr.is_ipv6() {
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    match req.execute().await {
        Ok(()) => Ok(()),
        Err(e) if exists(&e) => Ok(()),
        Err(e) => Err(nl(&format!("add address {addr}"), e)),
    }
}

async fn add_route(h: &Handle, route: RouteMessage, what: &str) -> io::Result<()> {
    match h.route().add(route).execute().await {
        Ok(()) => Ok(()),
        Err(e) if exists(&e) => Ok(()),
        Err(e) => Err(nl(what, e)),
    }
}

/// Writes a sysctl file unless it already holds `value`.
fn sysctl(path: &Path, value: &str) -> io::Result<()> {
    match std::fs::read_to_string(path) {
        Ok(v) if v.trim() == value => Ok(()),
        _ => std::fs::write(path, value)
            .map_err(|e| io::Error::new(e.kind(), format!("set {}: {e}", path.display()))),
    }
}

/// The MTU of the bridge and the apps' links: the largest there is. Traffic between the device
/// (its proxy) and an app never leaves the machine, and TCP over a 64 KiB MTU costs a fraction
/// of the per-segment work of 1500 bytes (iperf3 here: 35 vs 20 Gbit/s on a bare veth pair).
/// Forwarded TCP has its MSS clamped to the route's MTU by the firewall, and other traffic gets
/// the usual fragmentation or Packet Too Big from the device.
const APP_LINK_MTU: u32 = 65535;

/// The kernel: links and addresses through rtnetlink, rules through libnftables.
#[derive(Default)]
pub struct Kernel {
    nft: super::nft::Nft,
}

impl Wiring for Kernel {
    fn link_exists(&self, name: &str) -> bool {
        // In the calling thread's namespace (sysfs would show the one it was mounted in).
        nix::net::if_::if_nametoindex(name).is_ok()
    }

    fn ensure_bridge(&self, bridge: &str, gateway: Ipv6Addr, gateway4: Ipv4Addr) -> io::Result<()> {
        let bridge = bridge.to_string();
        on_thread(move || async move {
            let h = connect()?;
            match h
                .link()
                .add(LinkBridge::new(&bridge).mtu(APP_LINK_MTU).build())
                .execute()
                .await
            {
                Ok(()) => {}
                Err(e) if exists(&e) => {}
                Err(e) => return Err(nl(&format!("create bridge {bridge}"), e)),
            }
            let idx = index(&h, &bridge).await?;
            add_address(&h, idx, IpAddr::V6(gateway), 64).await?;
            add_address(&h, idx, IpAddr::V4(gateway4), AppsNet4::PREFIX_LEN).await?;
            h.link()
                .set(
                    LinkUnspec::new_with_index(idx)
                        .mtu(APP_LINK_MTU)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| nl("bridge up", e))
        })
    }

    fn enable_forwarding(&self) -> io::Result<()> {
        let v6 = Path::new("/proc/sys/net/ipv6/conf");
        if v6.exists() {
            // With forwarding on, accept_ra=1 means "ignore router advertisements"; 2 keeps
            // accepting them, so the uplink keeps its SLAAC address and default route.
            for e in std::fs::read_dir(v6)?.flatten() {
                let ra = e.path().join("accept_ra");
                // An interface may go away meanwhile (another app's link being deleted).
                let Ok(value) = std::fs::read_to_string(&ra) else {
                    continue;
                };
                if e.file_name() != "all" && value.trim() == "1" {
                    if let Err(err) = sysctl(&ra, "2") {
                        if ra.exists() {
                            return Err(err);
                        }
                    }
                }
            }
            sysctl(&v6.join("all/forwarding"), "1")?;
        }
        sysctl(Path::new("/proc/sys/net/ipv4/ip_forward"), "1")
    }

    fn wire(&self, w: &AppWire) -> io::Result<()> {
        let (host, bridge) = (w.host_if.clone(), w.bridge.to_string());
        let (address, gateway, address4, gateway4) = (w.address, w.gateway, w.address4, w.gateway4);
        let ns_path = w.netns.to_path_buf();
        let netns = std::fs::File::open(w.netns)?;
        on_thread(move || async move {
            let h = connect()?;
            let bridge_idx = index(&h, &bridge).await?;
            // One message: the host end on the bridge and up, the peer made right inside the
            // app's namespace as eth0. (Moving a device between namespaces afterwards costs
            // ~20 ms: the kernel waits for RCU readers. The peer cannot be set up in the same
            // message: the kernel answers ENOTCONN; it is set up from inside below.)
            let peer = LinkUnspec::new_with_name("eth0")
                .setns_by_fd(netns.as_raw_fd())
                .mtu(APP_LINK_MTU)
                .build();
            let pair = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
                .name(host.clone())
                .mtu(APP_LINK_MTU)
                .controller(bridge_idx)
                .up()
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                .build();
            match h.link().add(pair).execute().await {
                Ok(()) => {}
                // Wired before (a restart): the rest is made sure of below.
                Err(e) if exists(&e) => {}
                Err(e) => return Err(nl("create the veth pair", e)),
            }
            let host_idx = index(&h, &host).await?;
            // An isolated port talks to the bridge (the host) but never to another isolated
            // port: no app reaches another app, whatever its firewall does.
            h.link()
                .set_port(LinkBridgePort::new(host_idx).isolated(true).build())
                .execute()
                .await
                .map_err(|e| nl("isolate the bridge port", e))?;

            // Inside the app's namespace, with a connection opened there.
            enter(&netns, &ns_path)?;
            let h = connect()?;
            let idx = index(&h, "eth0").await?;
            h.link()
                .set(LinkUnspec::new_with_index(idx).up().build())
                .execute()
                .await
                .map_err(|e| nl("eth0 up", e))?;
            add_address(&h, idx, IpAddr::V6(address), 64).await?;
            add_address(&h, idx, IpAddr::V4(address4), AppsNet4::PREFIX_LEN).await?;
            let route6 = RouteMessageBuilder::<Ipv6Addr>::new()
                .gateway(gateway)
                .output_interface(idx)
                .build();
            add_route(&h, route6, "add the IPv6 default route").await?;
            let route4 = RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(gateway4)
                .output_interface(idx)
                .build();
            add_route(&h, route4, "add the IPv4 default route").await
        })
    }

    fn unwire(&self, host_if: &str) -> io::Result<()> {
        let name = host_if.to_string();
        on_thread(move || async move {
            let h = connect()?;
            let idx = match index(&h, &name).await {
                Ok(i) => i,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            h.link()
                .del(idx)
                .execute()
                .await
                .map_err(|e| nl(&format!("delete {name}"), e))
        })
    }

    fn apply_rules(&self, batch: &str) -> io::Result<()> {
        self.nft.run(batch).map(|_| ())
    }
}
