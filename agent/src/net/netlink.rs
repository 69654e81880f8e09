//! [`Wiring`] through rtnetlink. Each call runs on a short-lived thread of its own with a
//! small current-thread runtime: work inside an app's namespace needs `setns`, which changes
//! only the calling thread, and such a thread must never go back to a shared pool.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use futures_util::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::{AppWire, Wiring};

pub struct Rtnetlink;

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

/// Runs `f` with a fresh netlink connection, on a new thread that first enters `netns`.
fn on_thread<T, F, Fut>(netns: Option<&Path>, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<T>>,
{
    let netns = netns.map(Path::to_path_buf);
    std::thread::spawn(move || -> io::Result<T> {
        if let Some(ns) = netns {
            let file = std::fs::File::open(&ns)?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| io::Error::other(format!("enter {}: {e}", ns.display())))?;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        rt.block_on(async move {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            f(handle).await
        })
    })
    .join()
    .map_err(|_| io::Error::other("netlink thread panicked"))?
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

/// Adds `addr`/64 without duplicate address detection (DAD would hold connections ~2 s).
async fn add_address(h: &Handle, index: u32, addr: Ipv6Addr) -> io::Result<()> {
    let mut req = h.address().add(index, IpAddr::V6(addr), 64);
    req.message_mut()
        .attributes
        .push(AddressAttribute::Flags(AddressFlags::Nodad));
    match req.execute().await {
        Ok(()) => Ok(()),
        Err(e) if exists(&e) => Ok(()),
        Err(e) => Err(nl(&format!("add address {addr}"), e)),
    }
}

impl Wiring for Rtnetlink {
    fn link_exists(&self, name: &str) -> bool {
        Path::new("/sys/class/net").join(name).exists()
    }

    fn ensure_bridge(&self, bridge: &str, gateway: Ipv6Addr) -> io::Result<()> {
        let bridge = bridge.to_string();
        on_thread(None, move |h| async move {
            match h
                .link()
                .add(LinkBridge::new(&bridge).build())
                .execute()
                .await
            {
                Ok(()) => {}
                Err(e) if exists(&e) => {}
                Err(e) => return Err(nl(&format!("create bridge {bridge}"), e)),
            }
            let idx = index(&h, &bridge).await?;
            add_address(&h, idx, gateway).await?;
            h.link()
                .set(LinkUnspec::new_with_index(idx).up().build())
                .execute()
                .await
                .map_err(|e| nl("bridge up", e))
        })
    }

    fn wire(&self, w: &AppWire) -> io::Result<()> {
        let (host, peer, bridge) = (w.host_if.clone(), w.peer_if.clone(), w.bridge.to_string());
        let netns = std::fs::File::open(w.netns)?;
        on_thread(None, move |h| async move {
            h.link()
                .add(LinkVeth::new(&host, &peer).build())
                .execute()
                .await
                .map_err(|e| nl("create veth pair", e))?;
            let (host_idx, bridge_idx, peer_idx) = (
                index(&h, &host).await?,
                index(&h, &bridge).await?,
                index(&h, &peer).await?,
            );
            h.link()
                .set(
                    LinkUnspec::new_with_index(host_idx)
                        .controller(bridge_idx)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| nl("attach veth to the bridge", e))?;
            // An isolated port talks to the bridge (the host) but never to another isolated
            // port: no app reaches another app, whatever its firewall does.
            h.link()
                .set_port(LinkBridgePort::new(host_idx).isolated(true).build())
                .execute()
                .await
                .map_err(|e| nl("isolate the bridge port", e))?;
            // Into the app's namespace and renamed, in one message.
            h.link()
                .set(
                    LinkUnspec::new_with_index(peer_idx)
                        .setns_by_fd(netns.as_raw_fd())
                        .name("eth0")
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| nl("move veth into the app's namespace", e))
        })?;
        let (address, gateway) = (w.address, w.gateway);
        on_thread(Some(w.netns), move |h| async move {
            let idx = index(&h, "eth0").await?;
            h.link()
                .set(LinkUnspec::new_with_index(idx).up().build())
                .execute()
                .await
                .map_err(|e| nl("eth0 up", e))?;
            add_address(&h, idx, address).await?;
            let route = RouteMessageBuilder::<Ipv6Addr>::new()
                .gateway(gateway)
                .output_interface(idx)
                .build();
            match h.route().add(route).execute().await {
                Ok(()) => Ok(()),
                Err(e) if exists(&e) => Ok(()),
                Err(e) => Err(nl("add default route", e)),
            }
        })
    }

    fn unwire(&self, host_if: &str) -> io::Result<()> {
        let name = host_if.to_string();
        on_thread(None, move |h| async move {
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
}
