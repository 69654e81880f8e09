//! A small network of three namespaces for tests: the device, its LAN router and the internet.
//!
//! ```text
//!  dev                      lan                                inet
//!  up0 192.168.77.2/24 ──── lan0 192.168.77.1/24
//!      fd77::2/64                fd77::1/64
//!                           wan0 203.0.113.1/24     ──── inet0 203.0.113.2/24
//!                                2001:db8:1::1/64              2001:db8:1::2/64
//! ```
//!
//! `dev` routes everything through `lan`, which forwards. `inet` knows the way back to the
//! LAN (192.168.77.0/24, fd77::/64) and nothing else: a packet from any other source (an
//! app's 10.x or ULA address) is answered only if the device translated it first.
//!
//! The setup shells out to `ip`; servers run on threads that moved into a namespace.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddrV6, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn6};

/// How often a server thread looks at its stop flag.
const TICK: Duration = Duration::from_millis(100);
/// How long an HTTP connection may take to send its request head.
const HTTP_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The most of a request head the HTTP server reads.
const HTTP_HEAD_MAX: usize = 8 * 1024;

/// Three network namespaces wired as device, LAN router and internet; deleted on drop.
#[derive(Debug)]
pub struct NetWorld {
    dev: String,
    lan: String,
    inet: String,
}

impl NetWorld {
    /// Creates the namespaces, links, addresses and routes described in the module docs.
    pub fn new() -> Result<NetWorld> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "hpw{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let world = NetWorld {
            dev: format!("{prefix}d"),
            lan: format!("{prefix}l"),
            inet: format!("{prefix}i"),
        };
        // From here on a failure drops `world`, which deletes whatever was created.
        world.setup()?;
        Ok(world)
    }

    /// The device's namespace (where the agent runs).
    pub fn dev(&self) -> &str {
        &self.dev
    }

    /// The LAN router's namespace, which also plays the LAN client.
    pub fn lan(&self) -> &str {
        &self.lan
    }

    /// The internet's namespace.
    pub fn inet(&self) -> &str {
        &self.inet
    }

    /// The file that names the namespace `name`: `/run/netns/NAME`.
    pub fn netns_path(name: &str) -> PathBuf {
        Path::new("/run/netns").join(name)
    }

    /// Runs `args` inside `ns` (through `ip netns exec`); a non-zero exit is not an error.
    pub fn run(&self, ns: &str, args: &[&str]) -> Result<Output> {
        netns_exec(ns, args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run `ip netns exec {ns} {}`", args.join(" ")))
    }

    /// Runs `args` inside `ns` and returns its stdout; a non-zero exit is an error that
    /// carries stderr.
    pub fn check(&self, ns: &str, args: &[&str]) -> Result<String> {
        let out = crate::run(&mut netns_exec(ns, args))?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// A TCP server inside `ns` on `[::]:port`, IPv4 and IPv6, that answers every connection
    /// with `HTTP/1.0 200` and `body`, then closes it. Stops when the guard drops.
    pub fn serve_http(&self, ns: &str, port: u16, body: &str) -> Result<Server> {
        let response = format!(
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        Server::start(
            ns,
            move || {
                let fd = dual_stack_socket(SockType::Stream, port)?;
                socket::listen(&fd, socket::Backlog::new(128)?).context("listen")?;
                Ok(TcpListener::from(fd))
            },
            move |listener, stop| http_loop(&listener, stop, response.as_bytes()),
        )
        .with_context(|| format!("http server on port {port} in {ns}"))
    }

    /// Makes the caller's `127.0.0.1:port` (e.g. the test registry) reachable inside `ns` at
    /// the same address: a listener there whose connections are relayed from the caller's
    /// namespace. Stops when the guard drops.
    pub fn forward_loopback(&self, ns: &str, port: u16) -> Result<Server> {
        // This thread's namespace: where the relayed connections are opened.
        let home = File::open("/proc/thread-self/ns/net").context("open own netns")?;
        Server::start(
            ns,
            move || {
                let l = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
                    .with_context(|| format!("bind 127.0.0.1:{port}"))?;
                l.set_nonblocking(true)?;
                Ok(l)
            },
            move |listener, stop| {
                if setns(&home, CloneFlags::CLONE_NEWNET).is_err() {
                    return;
                }
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((inside, _)) => {
                            let _ = inside.set_nonblocking(false);
                            if let Ok(outside) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
                                relay(inside, outside);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            },
        )
        .with_context(|| format!("forward 127.0.0.1:{port} into {ns}"))
    }

    /// A DNS server inside `ns` on UDP `[::]:53`, IPv4 and IPv6: A and AAAA queries for
    /// `name` get `v4` and `v6`, other types of `name` an empty answer, other names
    /// NXDOMAIN. Malformed packets are ignored. Stops when the guard drops.
    pub fn serve_dns(&self, ns: &str, name: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> Result<Server> {
        let zone = DnsZone {
            name: name.trim_end_matches('.').to_ascii_lowercase(),
            v4,
            v6,
        };
        Server::start(
            ns,
            || {
                let sock = UdpSocket::from(dual_stack_socket(SockType::Datagram, 53)?);
                sock.set_read_timeout(Some(TICK))?;
                Ok(sock)
            },
            move |sock, stop| dns_loop(&sock, stop, &zone),
        )
        .with_context(|| format!("dns server in {ns}"))
    }

    fn setup(&self) -> Result<()> {
        let (dev, lan, inet) = (self.dev(), self.lan(), self.inet());
        for ns in [dev, lan, inet] {
            // Only a namespace of an earlier process with our pid can have this name.
            if Self::netns_path(ns).exists() {
                let _ = ip(&format!("netns del {ns}"));
            }
            ip(&format!("netns add {ns}"))?;
        }
        // Created inside the namespaces, so that the names never meet in the host's.
        ip(&format!(
            "-n {dev} link add up0 type veth peer name lan0 netns {lan}"
        ))?;
        ip(&format!(
            "-n {lan} link add wan0 type veth peer name inet0 netns {inet}"
        ))?;
        self.check(lan, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        self.check(lan, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        for (ns, link, v4, v6) in [
            (dev, "up0", "192.168.77.2/24", "fd77::2/64"),
            (lan, "lan0", "192.168.77.1/24", "fd77::1/64"),
            (lan, "wan0", "203.0.113.1/24", "2001:db8:1::1/64"),
            (inet, "inet0", "203.0.113.2/24", "2001:db8:1::2/64"),
        ] {
            ip(&format!("-n {ns} addr add {v4} dev {link}"))?;
            ip(&format!("-n {ns} addr add {v6} dev {link} nodad"))?;
            ip(&format!("-n {ns} link set {link} up"))?;
        }
        for ns in [dev, lan, inet] {
            ip(&format!("-n {ns} link set lo up"))?;
        }
        ip(&format!("-n {dev} route add default via 192.168.77.1"))?;
        ip(&format!("-n {dev} -6 route add default via fd77::1"))?;
        // The way back to the LAN, and nowhere else.
        ip(&format!(
            "-n {inet} route add 192.168.77.0/24 via 203.0.113.1"
        ))?;
        ip(&format!(
            "-n {inet} -6 route add fd77::/64 via 2001:db8:1::1"
        ))?;
        Ok(())
    }
}

impl Drop for NetWorld {
    fn drop(&mut self) {
        for ns in [&self.dev, &self.lan, &self.inet] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Runs `ip` with `args`, split at spaces.
fn ip(args: &str) -> Result<()> {
    crate::run(Command::new("ip").args(args.split(' '))).map(drop)
}

fn netns_exec(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(args);
    c
}

/// Moves the calling thread into the network namespace at `path`.
fn enter_netns(path: &Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    setns(f, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns {}", path.display()))
}

/// A socket on `[::]:port` that takes IPv4 (as mapped addresses) too.
fn dual_stack_socket(ty: SockType, port: u16) -> Result<std::os::fd::OwnedFd> {
    let fd =
        socket::socket(AddressFamily::Inet6, ty, SockFlag::SOCK_CLOEXEC, None).context("socket")?;
    socket::setsockopt(&fd, sockopt::Ipv6V6Only, &false).context("IPV6_V6ONLY")?;
    if ty == SockType::Stream {
        // Not for UDP, where it would let a second server share the port.
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true).context("SO_REUSEADDR")?;
    }
    let addr = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
    socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)
        .with_context(|| format!("bind [::]:{port}"))?;
    Ok(fd)
}

/// A server thread inside a network namespace; stopped and joined on drop.
#[derive(Debug)]
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Runs `open` on a thread inside `ns`, tells the caller how it went, then runs `serve`
    /// until the stop flag is set.
    fn start<S, O, F>(ns: &str, open: O, serve: F) -> Result<Server>
    where
        O: FnOnce() -> Result<S> + Send + 'static,
        F: FnOnce(S, &AtomicBool) + Send + 'static,
    {
        let path = NetWorld::netns_path(ns);
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::sync_channel(1);
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("networld-{ns}"))
            .spawn(move || {
                let opened = enter_netns(&path).and_then(|()| open());
                match opened {
                    Ok(sock) => {
                        let _ = tx.send(Ok(()));
                        serve(sock, &thread_stop);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
            .context("spawn server thread")?;
        let mut server = Server {
            stop,
            thread: Some(thread),
        };
        match rx.recv() {
            Ok(Ok(())) => Ok(server),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                if let Some(t) = server.thread.take() {
                    let _ = t.join();
                }
                Err(anyhow!("server thread died before it bound"))
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies bytes both ways between two connections until each side is done.
fn relay(a: TcpStream, b: TcpStream) {
    let pump = |mut from: TcpStream, mut to: TcpStream| {
        let _ = std::thread::Builder::new()
            .name("networld-relay".into())
            .spawn(move || {
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(Shutdown::Write);
            });
    };
    if let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) {
        pump(a, b2);
        pump(b, a2);
    }
}

fn http_loop(listener: &TcpListener, stop: &AtomicBool, response: &[u8]) {
    use nix::poll::{poll, PollFd, PollFlags};
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        match poll(
            &mut fds,
            nix::poll::PollTimeout::from(TICK.as_millis() as u16),
        ) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(_) => return,
        }
        if let Ok((conn, _)) = listener.accept() {
            let response = response.to_vec();
            // A slow client must not hold up the next one; the read timeout ends the thread.
            let _ = std::thread::Builder::new()
                .name("networld-http".into())
                .spawn(move || answer_http(conn, &response));
        }
    }
}

fn answer_http(mut conn: TcpStream, response: &[u8]) {
    if conn.set_read_timeout(Some(HTTP_READ_TIMEOUT)).is_err() {
        return;
    }
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while head.len() < HTTP_HEAD_MAX && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    if conn.write_all(response).is_err() {
        return;
    }
    // Close our side, then read what the client still sends: closing with unread data
    // would reset the connection and could take the response with it.
    let _ = conn.shutdown(Shutdown::Write);
    let _ = conn.set_read_timeout(Some(TICK));
    while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
}

/// What the DNS server knows: one name with one address of each family.
#[derive(Debug, Clone)]
struct DnsZone {
    /// Lower case, no trailing dot.
    name: String,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
}

fn dns_loop(sock: &UdpSocket, stop: &AtomicBool, zone: &DnsZone) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, peer)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if let Some(reply) = dns_answer(&buf[..n], zone) {
            let _ = sock.send_to(&reply, peer);
        }
    }
}

const DNS_TYPE_A: u16 = 1;
const DNS_TYPE_AAAA: u16 = 28;
const DNS_CLASS_IN: u16 = 1;
const DNS_CLASS_ANY: u16 = 255;
const DNS_RCODE_NXDOMAIN: u8 = 3;

/// The reply to the DNS query `query`, or `None` if it is not a well-formed standard query
/// with one question.
fn dns_answer(query: &[u8], zone: &DnsZone) -> Option<Vec<u8>> {
    let header = query.get(..12)?;
    let flags_hi = header[2];
    let qr = flags_hi & 0x80 != 0;
    let opcode = (flags_hi >> 3) & 0x0f;
    let qdcount = u16::from_be_bytes([header[4], header[5]]);
    if qr || opcode != 0 || qdcount != 1 {
        return None;
    }
    // The question's name: plain labels only (a pointer in a question is not worth parsing).
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(pos)?);
        pos += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(query.get(pos..pos + len)?);
        pos += len;
    }
    let fixed = query.get(pos..pos + 4)?;
    let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
    let qclass = u16::from_be_bytes([fixed[2], fixed[3]]);
    let question = &query[12..pos + 4];

    let name = labels.join(&b"."[..]).to_ascii_lowercase();
    let ours = name == zone.name.as_bytes();
    let rdata: Option<Vec<u8>> = match (ours, qtype) {
        _ if qclass != DNS_CLASS_IN && qclass != DNS_CLASS_ANY => None,
        (true, DNS_TYPE_A) => Some(zone.v4.octets().to_vec()),
        (true, DNS_TYPE_AAAA) => Some(zone.v6.octets().to_vec()),
        _ => None,
    };

    let mut out = Vec::with_capacity(question.len() + 40);
    out.extend_from_slice(&header[..2]); // id
    out.push(0x80 | 0x04 | (flags_hi & 0x01)); // QR, AA, RD copied
    out.push(0x80 | if ours { 0 } else { DNS_RCODE_NXDOMAIN }); // RA, rcode
    out.extend_from_slice(&1u16.to_be_bytes()); // QDCOUNT
    out.extend_from_slice(&u16::from(rdata.is_some()).to_be_bytes()); // ANCOUNT
    out.extend_from_slice(&[0, 0, 0, 0]); // NSCOUNT, ARCOUNT
    out.extend_from_slice(question);
    if let Some(rdata) = rdata {
        out.extend_from_slice(&[0xc0, 0x0c]); // the name, as a pointer to the question's
        out.extend_from_slice(&qtype.to_be_bytes());
        out.extend_from_slice(&DNS_CLASS_IN.to_be_bytes());
        out.extend_from_slice(&60u32.to_be_bytes()); // TTL
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(&rdata);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INET_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
    const INET_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);

    fn zone() -> DnsZone {
        DnsZone {
            name: "internet.test".into(),
            v4: INET_V4,
            v6: INET_V6,
        }
    }

    /// A query with id 0x1234, RD set, one question.
    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.').filter(|l| !l.is_empty()) {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&DNS_CLASS_IN.to_be_bytes());
        q
    }

    /// `(rcode, ancount, rdata of the answer)` of the reply to `q`.
    fn check(q: &[u8], expected: Option<(u8, u16, &[u8])>) {
        let Some(reply) = dns_answer(q, &zone()) else {
            assert_eq!(expected, None, "no reply to {q:?}");
            return;
        };
        let (rcode, ancount, rdata) = expected.expect("a reply");
        assert_eq!(&reply[..2], &q[..2], "id");
        assert_eq!(reply[2], 0x85, "QR, AA, RD");
        assert_eq!(reply[3], 0x80 | rcode, "RA, rcode");
        assert_eq!(&reply[4..8], &[0, 1, (ancount >> 8) as u8, ancount as u8]);
        assert_eq!(&reply[12..q.len()], &q[12..], "question copied");
        let answer = &reply[q.len()..];
        if ancount == 0 {
            assert!(answer.is_empty());
        } else {
            assert_eq!(&answer[..2], &[0xc0, 0x0c]);
            assert_eq!(&answer[6..10], &60u32.to_be_bytes(), "TTL");
            assert_eq!(&answer[12..], rdata);
        }
    }

    #[test]
    fn dns_answers() {
        let v4 = INET_V4.octets();
        let v6 = INET_V6.octets();
        check(&query("internet.test", DNS_TYPE_A), Some((0, 1, &v4)));
        check(&query("Internet.TEST.", DNS_TYPE_AAAA), Some((0, 1, &v6)));
        check(&query("internet.test", 16), Some((0, 0, &[])));
        check(&query("other.test", DNS_TYPE_A), Some((3, 0, &[])));
        check(&query("www.internet.test", DNS_TYPE_A), Some((3, 0, &[])));
        check(&query("internet.test", DNS_TYPE_A)[..20], None);
        check(&[0; 5], None);
        let mut response = query("internet.test", DNS_TYPE_A);
        response[2] |= 0x80;
        check(&response, None);
        let mut two = query("internet.test", DNS_TYPE_A);
        two[5] = 2;
        check(&two, None);
        let mut pointer = query("internet.test", DNS_TYPE_A);
        pointer[12] = 0xc0;
        check(&pointer, None);
    }

    /// These tests need root, as the whole suite does.
    fn world() -> NetWorld {
        NetWorld::new().expect("create the network world")
    }

    /// `timeout 5 busybox ARGS` inside `ns`, which must succeed; its stdout.
    fn busybox(w: &NetWorld, ns: &str, args: &[&str]) -> String {
        let mut all = vec!["timeout", "5", "busybox"];
        all.extend_from_slice(args);
        w.check(ns, &all).expect("busybox")
    }

    #[test]
    fn world_routes_lan_and_internet() {
        let w = world();
        for addr in ["192.168.77.2", "fd77::2", "203.0.113.2", "2001:db8:1::2"] {
            busybox(&w, w.lan(), &["ping", "-c1", "-W2", addr]);
        }
        // Across the router, both ways.
        busybox(&w, w.dev(), &["ping", "-c1", "-W2", "203.0.113.2"]);
        busybox(&w, w.inet(), &["ping", "-c1", "-W2", "fd77::2"]);

        let _http = w
            .serve_http(w.inet(), 8080, "hello from inet")
            .expect("serve");
        for url in ["http://203.0.113.2:8080/", "http://[2001:db8:1::2]:8080/"] {
            let body = busybox(&w, w.dev(), &["wget", "-qO-", url]);
            assert_eq!(body, "hello from inet", "{url}");
        }
    }

    #[test]
    fn inet_cannot_answer_unrouted_sources() {
        let w = world();
        for addr in ["10.200.0.5", "fd42::5"] {
            let out = w
                .run(w.inet(), &["ip", "route", "get", addr])
                .expect("ip route get");
            assert!(
                !out.status.success(),
                "inet has a route to {addr}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        // The LAN is routed, so the failure above is about the address, not the command.
        w.check(w.inet(), &["ip", "route", "get", "192.168.77.2"])
            .expect("route to the LAN");
        w.check(w.inet(), &["ip", "route", "get", "fd77::2"])
            .expect("route to the LAN");
    }

    #[test]
    fn dns_answers_a_and_aaaa() {
        let w = world();
        let _dns = w
            .serve_dns(w.inet(), "internet.test", INET_V4, INET_V6)
            .expect("serve dns");
        for server in ["203.0.113.2", "2001:db8:1::2"] {
            let a = busybox(
                &w,
                w.dev(),
                &["nslookup", "-type=a", "internet.test", server],
            );
            assert!(a.contains("Address: 203.0.113.2"), "{a}");
            let aaaa = busybox(
                &w,
                w.dev(),
                &["nslookup", "-type=aaaa", "internet.test", server],
            );
            assert!(aaaa.contains("Address: 2001:db8:1::2"), "{aaaa}");
        }
        let out = w
            .run(
                w.dev(),
                &[
                    "timeout",
                    "5",
                    "busybox",
                    "nslookup",
                    "nowhere.test",
                    "203.0.113.2",
                ],
            )
            .expect("nslookup");
        assert!(
            !out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("NXDOMAIN"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    #[test]
    fn servers_report_bind_errors() {
        let w = world();
        let _a = w.serve_http(w.lan(), 8081, "a").expect("first server");
        let err = w
            .serve_http(w.lan(), 8081, "b")
            .expect_err("the port is taken");
        assert!(format!("{err:#}").contains("bind"), "{err:#}");
    }

    #[test]
    fn drop_removes_namespaces() {
        let w = world();
        let paths: Vec<PathBuf> = [w.dev(), w.lan(), w.inet()]
            .into_iter()
            .map(NetWorld::netns_path)
            .collect();
        assert!(paths.iter().all(|p| p.exists()));
        drop(w);
        for p in paths {
            assert!(!p.exists(), "{} is still there", p.display());
        }
    }

    #[test]
    fn worlds_have_distinct_names() {
        let a = world();
        let b = world();
        assert_ne!(a.dev(), b.dev());
    }
}
