//! The reverse proxy on the real network, with real clients (reqwest with rustls, over
//! HTTP/2 and HTTP/1.1, and curl) trusting only the device CA fetched from the API.

#![allow(clippy::unwrap_used)] // tests may unwrap what they just built

mod common;

use std::net::SocketAddr;

use anyhow::{Context, Result};
use common::*;
use homeport::api::types::AgentInfo;

fn client(ca_pem: &str, names: &[&str], https: SocketAddr) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes())?)
        .redirect(reqwest::redirect::Policy::none());
    for n in names {
        b = b.resolve(n, https);
    }
    Ok(b.build()?)
}

fn local(addr: &str) -> Result<SocketAddr> {
    let a: SocketAddr = addr.parse().context("proxy address")?;
    Ok(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port())))
}

/// The agent's client and info, where its proxy takes HTTPS (on ::1), and the device CA.
async fn proxy_of(
    w: &World,
) -> Result<(homeport::api::client::Client, AgentInfo, SocketAddr, String)> {
    let c = w.client();
    let info: AgentInfo = c.get("/v1/info").await?;
    let https = local(info.proxy_https.as_deref().context("no https listener")?)?;
    let ca = c.text("/v1/ca.crt").await?;
    Ok((c, info, https, ca))
}

#[tokio::test]
async fn apps_are_served_over_https_by_name_with_the_device_ca() -> Result<()> {
    let w = World::new()?;
    push_hello(&w.registry, "hello", "2")?;
    let (c, info, https, ca) = proxy_of(&w).await?;
    let http = local(info.proxy_http.as_deref().context("no http listener")?)?;
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");

    let http_port = "[https]\nport = 8080\n";
    let one = c
        .install(&w.manifest("one", "hello:1", http_port), |_| {})
        .await?;
    c.install(&w.manifest("two", "hello:2", http_port), |_| {})
        .await?;
    wait_running(&c, "one").await?;
    wait_running(&c, "two").await?;
    let device = &info.device_name;
    let (one_host, two_host) = (format!("one-{device}.local"), format!("two-{device}.local"));
    assert_eq!(
        one.url.as_deref(),
        Some(format!("https://{one_host}:{}/", https.port()).as_str())
    );
    let names = [one_host.as_str(), two_host.as_str(), "nope-homeport.local"];
    let h2 = client(&ca, &names, https)?;
    let url = |host: &str, path: &str| format!("https://{host}:{}{path}", https.port());

    // The apps' servers may need a moment after their containers started.
    for host in [&one_host, &two_host] {
        wait_for(
            "the apps behind the proxy",
            std::time::Duration::from_secs(10),
            || async {
                let r = h2.get(url(host, "/")).send().await;
                Ok(r.is_ok_and(|r| r.status() == 200))
            },
        )
        .await?;
    }

    // By name, each app its own page; HTTP/2 by ALPN, HTTP/1.1 for clients that want it.
    let r = h2.get(url(&one_host, "/")).send().await?;
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.text().await?.trim(), marker("1"));
    let r = h2.get(url(&two_host, "/")).send().await?;
    assert_eq!(r.text().await?.trim(), marker("2"));
    let h1 = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes())?)
        .resolve(&one_host, https)
        .http1_only()
        .build()?;
    let r = h1.get(url(&one_host, "/")).send().await?;
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.text().await?.trim(), marker("1"));
    // The home.arpa name too.
    let arpa = format!("one.{device}.home.arpa");
    let r = client(&ca, &[&arpa], https)?
        .get(url(&arpa, "/"))
        .send()
        .await?;
    assert_eq!(r.text().await?.trim(), marker("1"));

    // curl, a client of its own, trusting the device CA and nothing else.
    let ca_file = tempfile::NamedTempFile::new()?;
    std::fs::write(ca_file.path(), &ca)?;
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail", "--http2", "--cacert"])
        .arg(ca_file.path())
        .args([
            "--resolve",
            &format!("{one_host}:{}:[::1]", https.port()),
            &url(&one_host, "/"),
        ])
        .output()?;
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), marker("1"));

    // An unknown name gets the device's own certificate and a 404, never an app.
    let lax = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .resolve("nope-homeport.local", https)
        .resolve(&two_host, https)
        .build()?;
    let r = lax.get(url("nope-homeport.local", "/")).send().await?;
    assert_eq!(r.status(), 404);
    assert!(!r.text().await?.contains("hello from"));
    // And a client that checks certificates does not accept it for that name.
    assert!(h2
        .get(url("nope-homeport.local", "/"))
        .send()
        .await
        .is_err());

    // Plain HTTP is redirected to the same place over HTTPS.
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .resolve(&one_host, http)
        .build()?;
    let r = plain
        .get(format!("http://{one_host}:{}/a/b?c=d", http.port()))
        .send()
        .await?;
    assert_eq!(r.status(), 308);
    assert_eq!(r.headers()["location"], url(&one_host, "/a/b?c=d").as_str());
    // A client that closes its sending side after the request (as `nc` does at the end of
    // its input) still gets the whole answer, also when the request and the FIN come in one
    // segment (MSG_MORE holds the data back until the shutdown).
    for _ in 0..20 {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(http)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        let request = format!("GET /x HTTP/1.0\r\nHost: {one_host}\r\n\r\n");
        let sent = nix::sys::socket::send(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            request.as_bytes(),
            nix::sys::socket::MsgFlags::from_bits_retain(libc::MSG_MORE),
        )?;
        assert_eq!(sent, request.len());
        s.shutdown(std::net::Shutdown::Write)?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        assert!(answer.starts_with("HTTP/1.0 308"), "{answer:?}");
    }

    // The proxy counted the app's requests and logged them into the app's log.
    let t: homeport::proxy::traffic::TrafficStats = c.get("/v1/apps/one/traffic").await?;
    assert!(t.requests >= 5 && t.status["2xx"] >= 5, "{t:?}");
    assert_eq!(
        t.latency_ms.iter().map(|(_, n)| n).sum::<u64>(),
        t.requests,
        "every request in a latency bucket"
    );
    let log_file = inspect(&c, "one").await?.log_file;
    let mut log = String::new();
    for _ in 0..50 {
        log = std::fs::read_to_string(&log_file)?;
        if log.contains("\"GET / HTTP/2.0\" 200") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(log.contains("\"GET / HTTP/2.0\" 200"), "{log}");
    assert!(log.contains("\"GET / HTTP/1.1\" 200"), "{log}");
    assert!(log.contains(&one_host), "{log}");

    // Apps reach each other by name through the proxy (the hosts file points the names at the
    // device; the firewall lets apps reach the proxy's ports and nothing else of the device).
    let (_, hosts) = exec(&c, "one", &["cat", "/etc/hosts"]).await?;
    assert!(hosts.contains(&two_host), "{hosts}");
    // (Over the proxy's plain-HTTP port: busybox's TLS client offers only suites the proxy
    // refuses, so the HTTPS leg is shown by the clients above.)
    let cmd = format!(
        "printf 'GET /x HTTP/1.0\\r\\nHost: {two_host}\\r\\n\\r\\n' | timeout 10 nc {two_host} {}",
        http.port()
    );
    let (code, out) = exec(&c, "one", &["sh", "-c", &cmd]).await?;
    assert!(
        code == 0
            && out.starts_with("HTTP/1.0 308")
            && out.contains(&format!("location: https://{two_host}:{}/x", https.port())),
        "{code} {out}"
    );

    // Apps trust the device: its CA is in their trust bundle, after the image's own.
    let (_, bundle) = exec(&c, "one", &["cat", "/etc/ssl/certs/ca-certificates.crt"]).await?;
    assert!(bundle.contains(ca.trim()), "{bundle}");

    // Removing an app takes its route away at once; the other app keeps being served.
    c.delete("/v1/apps/two").await?;
    let r = lax.get(url(&two_host, "/")).send().await?;
    assert_eq!(r.status(), 404);
    let r = h2.get(url(&one_host, "/")).send().await?;
    assert_eq!(r.text().await?.trim(), marker("1"));
    Ok(())
}

/// A manifest for an app whose server on 8080 is `script`, run by busybox `nc` for every
/// connection with the connection as its stdin and stdout.
fn scripted(w: &World, name: &str, script: &str, https_extra: &str) -> String {
    w.manifest(
        name,
        "hello:1",
        &format!(
            "command = [\"sh\", \"-c\", \"echo \\\"$SCRIPT\\\" > /tmp/s.sh && chmod +x /tmp/s.sh && exec nc -ll -p 8080 -e /tmp/s.sh\"]\n[env]\nSCRIPT = '''{script}'''\n[https]\nport = 8080\n{https_extra}"
        ),
    )
}

/// Reads the request head; then answers 101 with `Upgrade: echo` and echoes what comes.
const ECHO_UPGRADE: &str = r#"#!/bin/sh
while read -r l; do l=$(printf %s "$l" | tr -d '\r'); [ -z "$l" ] && break; done
printf 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n'
exec cat
"#;

/// Answers with the request head it received, as the body.
const ECHO_HEAD: &str = r#"#!/bin/sh
h=""
while read -r l; do l=$(printf %s "$l" | tr -d '\r'); [ -z "$l" ] && break; h="$h$l
"; done
printf 'HTTP/1.1 200 OK\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' "${#h}" "$h"
"#;

/// Reads the request head and never answers; notes when the proxy hangs up on it.
const HOLD: &str = r#"#!/bin/sh
while read -r l; do l=$(printf %s "$l" | tr -d '\r'); [ -z "$l" ] && break; done
cat > /dev/null
: > /tmp/hung-up
"#;

/// Reads a request with a Content-Length, swallows the body, answers how much it got.
const SINK: &str = r#"#!/bin/sh
n=0
while read -r l; do
  l=$(printf %s "$l" | tr -d '\r'); [ -z "$l" ] && break
  case "$l" in [Cc]ontent-[Ll]ength:*) n=${l#*: };; esac
done
head -c "$n" > /dev/null
b="got $n"
printf 'HTTP/1.1 200 OK\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' "${#b}" "$b"
"#;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn upgrades_and_large_uploads_stream_through() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = World::new()?;
    let (c, info, https, ca) = proxy_of(&w).await?;
    c.install(&scripted(&w, "echo", ECHO_UPGRADE, ""), |_| {})
        .await?;
    c.install(&scripted(&w, "sink", SINK, ""), |_| {}).await?;
    c.install(&scripted(&w, "head", ECHO_HEAD, ""), |_| {})
        .await?;
    c.install(&scripted(&w, "hold", HOLD, ""), |_| {}).await?;
    c.install(
        &scripted(&w, "small", SINK, "body_limit = \"1M\"\n"),
        |_| {},
    )
    .await?;
    for app in ["echo", "sink", "small", "head", "hold"] {
        wait_running(&c, app).await?;
    }
    let host = |app: &str| format!("{app}-{}.local", info.device_name);
    let url = |app: &str| format!("https://{}:{}/", host(app), https.port());
    let (echo, sink, small, head) = (host("echo"), host("sink"), host("small"), host("head"));
    let h1 = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes())?)
        .resolve(&echo, https)
        .resolve(&sink, https)
        .resolve(&small, https)
        .resolve(&head, https)
        .http1_only()
        .build()?;
    // The app's server may need a moment after the container starts.
    wait_for(
        "the echo app",
        std::time::Duration::from_secs(10),
        || async {
            Ok(h1
                .get(url("echo"))
                .header("connection", "upgrade")
                .header("upgrade", "echo")
                .send()
                .await
                .is_ok_and(|r| r.status() == 101))
        },
    )
    .await?;

    wait_for(
        "the header-echo app",
        std::time::Duration::from_secs(10),
        || async {
            Ok(h1
                .get(url("head"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200))
        },
    )
    .await?;
    // What the app is told: who asked and how, the original Host, and none of the headers
    // that belong to the client's connection.
    let r = h1
        .get(url("head"))
        .header("x-forwarded-for", "198.51.100.7")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .header("keep-alive", "timeout=5")
        .header("x-app-header", "kept")
        .send()
        .await?;
    let seen = r.text().await?.to_ascii_lowercase();
    for line in [
        format!("host: {head}:{}", https.port()),
        "x-forwarded-for: 198.51.100.7, ::1".to_string(),
        "x-forwarded-proto: https".to_string(),
        format!("x-forwarded-host: {head}"),
        format!("forwarded: for=\"[::1]\";proto=https;host=\"{head}\""),
        "x-app-header: kept".to_string(),
    ] {
        assert!(seen.contains(&line), "missing {line:?} in\n{seen}");
    }
    for gone in ["x-hop", "keep-alive: timeout"] {
        assert!(!seen.contains(gone), "{gone:?} reached the app:\n{seen}");
    }

    // An upgrade (what WebSockets use) becomes a two-way byte stream to the app.
    let r = h1
        .get(url("echo"))
        .header("connection", "upgrade")
        .header("upgrade", "echo")
        .send()
        .await?;
    assert_eq!(r.status(), 101);
    let mut io = r.upgrade().await?;
    io.write_all(b"ping through the proxy\n").await?;
    let mut got = vec![0u8; 23];
    tokio::time::timeout(std::time::Duration::from_secs(5), io.read_exact(&mut got)).await??;
    assert_eq!(got, b"ping through the proxy\n");
    // Routes change (an app installed, another removed) while the connection is open: it
    // carries on.
    c.install(
        &w.manifest("late", "hello:1", "[https]\nport = 8080\n"),
        |_| {},
    )
    .await?;
    c.delete("/v1/apps/late").await?;
    io.write_all(b"still here after a route change\n").await?;
    let mut got = vec![0u8; 32];
    tokio::time::timeout(std::time::Duration::from_secs(5), io.read_exact(&mut got)).await??;
    assert_eq!(got, b"still here after a route change\n");
    drop(io);

    // A client that gives up on a request the app holds: the proxy hangs up on the app too,
    // so an abandoned long poll does not hold the app's connection.
    let hold = host("hold");
    let impatient = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes())?)
        .resolve(&hold, https)
        .http1_only()
        .timeout(std::time::Duration::from_secs(1))
        .build()?;
    wait_for(
        "a request the hold app holds",
        std::time::Duration::from_secs(10),
        || async {
            let r = impatient.get(url("hold")).send().await;
            Ok(r.is_err_and(|e| e.is_timeout()))
        },
    )
    .await?;
    wait_for(
        "the proxy to hang up on the app",
        std::time::Duration::from_secs(10),
        || async { Ok(exec(&c, "hold", &["cat", "/tmp/hung-up"]).await?.0 == 0) },
    )
    .await?;

    // 1 GiB upload, streamed: the proxy's memory stays flat.
    const SIZE: u64 = 1 << 30;
    let before = rss_kib(info.pid);
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampler = {
        let peak = peak.clone();
        let pid = info.pid;
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
    };
    let chunk = bytes::Bytes::from(vec![b'x'; 1 << 20]);
    let stream = futures_util::stream::iter(
        (0..SIZE >> 20).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    );
    let r = h1
        .post(url("sink"))
        .header("content-length", SIZE)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await?;
    sampler.abort();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await?, format!("got {SIZE}"));
    let grew_mib = (peak.load(std::sync::atomic::Ordering::Relaxed) - before) / 1024;
    assert!(
        grew_mib < 32,
        "the proxy grew by {grew_mib} MiB for a 1 GiB upload"
    );

    // An app's body limit: a larger declared body is refused before anything reaches it;
    // one within passes.
    let r = h1
        .post(url("small"))
        .body(vec![b'x'; 2 << 20])
        .send()
        .await?;
    assert_eq!(r.status(), 413);
    let r = h1.post(url("small")).body(vec![b'x'; 1000]).send().await?;
    assert_eq!(r.text().await?, "got 1000");
    Ok(())
}

/// A TLS connection to the proxy for `name`, trusting only the device CA, offering `alpn`.
async fn tls(
    ca_pem: &str,
    https: SocketAddr,
    name: &str,
    alpn: &[u8],
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes())?)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(https).await?;
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(ServerName::try_from(name.to_string())?, tcp)
        .await?)
}

/// Sends `request` on a new HTTP/1.1 connection; what comes back until the proxy closes it
/// (or 15 s pass).
async fn raw_exchange(ca: &str, https: SocketAddr, name: &str, request: &[u8]) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tls(ca, https, name, b"http/1.1").await?;
    s.write_all(request).await?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(15), s.read_to_end(&mut out)).await;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test]
async fn abusive_clients_are_cut_off_while_others_are_served() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = World::new()?;
    let (c, info, https, ca) = proxy_of(&w).await?;
    c.install(
        &w.manifest("one", "hello:1", "[https]\nport = 8080\n"),
        |_| {},
    )
    .await?;
    wait_running(&c, "one").await?;
    let name = format!("one-{}.local", info.device_name);
    let good = client(&ca, &[&name], https)?;
    let page = format!("https://{name}:{}/", https.port());
    let served = || async {
        let r = good.get(&page).send().await?;
        anyhow::Ok(r.text().await?.trim() == marker("1"))
    };
    // The app's server may need a moment after its container started.
    wait_for(
        "the app behind the proxy",
        std::time::Duration::from_secs(10),
        || async { Ok(served().await.unwrap_or(false)) },
    )
    .await?;

    // A request head over the limit: 431, the connection closed.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: {name}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let out = raw_exchange(&ca, https, &name, big.as_bytes()).await?;
    assert!(out.starts_with("HTTP/1.1 431"), "{out:.200}");
    // A malformed request: 400.
    let out = raw_exchange(&ca, https, &name, b"THIS IS NOT HTTP\r\n\r\n").await?;
    assert!(out.starts_with("HTTP/1.1 400"), "{out:.200}");
    // A request for no host at all: 400, never an app.
    let out = raw_exchange(&ca, https, &name, b"GET / HTTP/1.1\r\n\r\n").await?;
    assert!(out.starts_with("HTTP/1.1 400"), "{out:.200}");
    assert!(!out.contains("hello from"), "{out:.200}");

    // Slowloris: a head that never ends is cut off after the header timeout; meanwhile
    // others are served.
    let mut slow = tls(&ca, https, &name, b"http/1.1").await?;
    slow.write_all(format!("GET / HTTP/1.1\r\nHost: {name}\r\n").as_bytes())
        .await?;
    let started = std::time::Instant::now();
    let cut = tokio::spawn(async move {
        let mut buf = Vec::new();
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            slow.read_to_end(&mut buf),
        )
        .await;
        (r.is_ok(), started.elapsed())
    });
    assert!(served().await?, "served while a slow client dawdles");
    let (ended, after) = cut.await?;
    assert!(ended, "the slow client was never cut off");
    assert!(
        after >= std::time::Duration::from_secs(9) && after < std::time::Duration::from_secs(25),
        "{after:?}"
    );

    // An idle keep-alive connection is closed after the header timeout too.
    let mut idle = tls(&ca, https, &name, b"http/1.1").await?;
    idle.write_all(format!("GET / HTTP/1.1\r\nHost: {name}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = vec![0u8; 4096];
    let n = idle.read(&mut buf).await?;
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        idle.read_to_end(&mut rest),
    )
    .await;
    assert!(closed.is_ok(), "an idle connection stayed open");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );

    // Connection cap per client address: the 257th connection from ::1 is closed at once,
    // while another address (127.0.0.1) is served.
    let mut held = Vec::new();
    for _ in 0..256 {
        held.push(tokio::net::TcpStream::connect(https).await?);
    }
    let mut extra = tokio::net::TcpStream::connect(https).await?;
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), extra.read(&mut byte))
        .await
        .context("the connection over the cap was left open")?;
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let v4 = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, https.port()));
    let other = client(&ca, &[&name], v4)?;
    let r = other.get(&page).send().await?;
    assert_eq!(r.text().await?.trim(), marker("1"));
    drop(held);

    // HTTP/2 rapid reset: streams opened and cancelled as fast as possible get the
    // connection closed, and others keep being served. (The proxy notices the held
    // connections closing a moment later: until then a new one from ::1 is still over the
    // cap, and closed during its handshake.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let io = loop {
        match tls(&ca, https, &name, b"h2").await {
            Ok(io) => break io,
            Err(e) if std::time::Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    };
    let (mut h2c, conn) = h2::client::handshake(io).await?;
    let driver = tokio::spawn(conn);
    let mut refused = false;
    for _ in 0..10_000 {
        let req = hyper::Request::get(page.as_str()).body(())?;
        match h2c.send_request(req, true) {
            Ok((_, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
            Err(_) => {
                refused = true;
                break;
            }
        }
        if futures_util::future::poll_fn(|cx| h2c.poll_ready(cx))
            .await
            .is_err()
        {
            refused = true;
            break;
        }
    }
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), driver).await;
    assert!(
        refused || matches!(ended, Ok(Ok(Err(_)))),
        "the flooding connection was not closed: {ended:?}"
    );
    assert!(served().await?, "served after the flood");
    Ok(())
}

#[tokio::test]
async fn static_paths_are_served_from_the_image_even_when_the_app_is_stopped() -> Result<()> {
    let w = World::new()?;
    let (c, info, https, ca) = proxy_of(&w).await?;
    c.install(
        &w.manifest(
            "site",
            "hello:1",
            "[https]\nport = 8080\nstatic = [\"/www\"]\n",
        ),
        |_| {},
    )
    .await?;
    wait_running(&c, "site").await?;
    let name = format!("site-{}.local", info.device_name);
    let h = client(&ca, &[&name], https)?;
    let url = |path: &str| format!("https://{name}:{}{path}", https.port());

    let r = h.get(url("/www/index.html")).send().await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    let etag = r.headers()["etag"].clone();
    assert_eq!(r.text().await?.trim(), marker("1"));
    let r = h
        .get(url("/www/index.html"))
        .header("if-none-match", etag.clone())
        .send()
        .await?;
    assert_eq!(r.status(), 304);
    let r = h
        .get(url("/www/index.html"))
        .header("range", "bytes=0-4")
        .send()
        .await?;
    assert_eq!(r.status(), 206);
    assert_eq!(r.text().await?, "hello");

    // The proxy serves them, not the app: with the app stopped they are still there, while
    // everything else gets 502.
    c.post::<serde_json::Value, _>("/v1/apps/site/stop", &())
        .await?;
    let r = h.get(url("/www/index.html")).send().await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], etag);
    assert_eq!(h.get(url("/")).send().await?.status(), 502);
    // Nothing outside the image's static path, however the path is spelled.
    for target in [
        "/www/%2e%2e/etc/passwd",
        "/www/..%2fetc/passwd",
        "/www/../etc/passwd",
    ] {
        let out = raw_exchange(
            &ca,
            https,
            &name,
            format!("GET {target} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        assert!(!out.contains("root:"), "{target}: {out:.300}");
        assert!(!out.starts_with("HTTP/1.1 200"), "{target}: {out:.300}");
    }
    Ok(())
}
