//! The `proxy` benchmark: the agent's reverse proxy against Debian's nginx configured as the
//! same TLS reverse proxy (HTTP/1.1 and HTTP/2 by ALPN, pooled keep-alive HTTP/1.1 upstream)
//! in front of the same app, on the same machine, in the same run, interleaved (ours, nginx,
//! ours, nginx, …) so that machine noise hits both.
//!
//! The app is installed like any other (its own address, veth, firewall, `[https] port =
//! 8080`), but what answers on its port is a second nginx serving a small page with
//! keep-alive, started in the app's network namespace: the busybox httpd of the test images
//! forks per connection, has no keep-alive and a listen backlog of 9, so behind either proxy
//! it tops out near 3,400 requests/s with one-second SYN retransmits, and both proxies measure
//! the same busybox. A keep-alive origin leaves the proxies as what is measured.
//!
//! Loads, each bounded in time:
//! 1. HTTP/1.1 keep-alive requests/s: `wrk -t2 -c64`.
//! 2. HTTP/2 requests/s: `h2load -c16 -m4`.
//! 3. New TLS handshakes/s: a client of our own (rustls, session resumption off, 16 at a
//!    time): TCP connect, full handshake, close. wrk with `Connection: close` could resume
//!    sessions (nothing on its command line turns that off) and would wait on the app for
//!    every handshake.
//! 4. p50/p99 latency at 2,000 requests/s: an open-loop client of our own (a request held up
//!    behind a slow one is timed from when it was due, so a stall is not hidden by the client
//!    waiting).
//! 5. Resident memory with 1,000 open client connections (half HTTP/1.1, half HTTP/2, each
//!    after one request), from four loopback addresses: the proxy admits at most 256
//!    connections per client address.
//!
//! Both sides write one access-log line per request: the agent into the app's log through a
//! writer thread of its own, nginx (in the same format) unbuffered, its default. Neither
//! side's client checks certificates.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use homeport::api::types::{AgentInfo, AppSummary, RunState};
use homeport_testkit::{AgentOpts, AgentProcess, BusyboxOpts, Registry};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Rounds per load and side, interleaved.
const ROUNDS: usize = 3;
/// Seconds per round.
const SECS: u64 = 5;
/// Connections of the fixed-rate latency load, and its rate.
const LATENCY_CONNS: usize = 16;
const LATENCY_RATE: u64 = 2000;
/// Concurrent handshakes of the handshake load.
const HANDSHAKE_CONCURRENCY: usize = 16;
/// Open connections of the memory load, spread over this many client addresses.
const OPEN_CONNS: usize = 1000;
const CLIENT_ADDRS: u8 = 4;
/// What the app serves: a small page.
const PAGE: &str = "<!doctype html><title>homeport</title><p>hello from the benchmark app</p>\n";

/// One of the two proxies under load: where it listens and its processes.
#[derive(Clone)]
struct Side {
    name: &'static str,
    port: u16,
    pids: Vec<u32>,
}

impl Side {
    fn v6(&self) -> SocketAddr {
        SocketAddr::from((Ipv6Addr::LOCALHOST, self.port))
    }
}

pub async fn proxy(bins: &Path) -> Result<()> {
    let reg = Registry::start()?;
    homeport_testkit::push_busybox(&reg, "bench/web", "1", &BusyboxOpts::default())?;
    let agent = AgentProcess::start(
        &bins.join("homeportd"),
        AgentOpts {
            insecure_registries: vec![reg.host()],
            stop_grace_secs: 1,
            // What a device runs with; the harness's default adds debug logging.
            env: vec![("HOMEPORT_LOG".into(), "info".into())],
            // Every address, so that clients on 127.0.0.x reach it too.
            proxy_https: "[::]:0".into(),
            ..Default::default()
        },
    )?;
    let c = agent.client();
    // The container only holds the app's place; the origin below answers on its port.
    let m = format!(
        "name = \"web\"\nimage = \"{}/bench/web:1\"\ncommand = [\"/bin/sleep\", \"1000000\"]\n[https]\nport = 8080\n",
        reg.host()
    );
    let app: AppSummary = c.install(&m, |_| {}).await?;
    let info: AgentInfo = c.get("/v1/info").await?;
    let https: SocketAddr = info
        .proxy_https
        .as_deref()
        .context("the agent has no https listener")?
        .parse()
        .context("proxy_https")?;
    let host = format!("web-{}.local", info.device_name);
    let upstream: Ipv6Addr = app.address.parse().context("app address")?;
    ensure!(
        app.url.as_deref().is_some_and(|u| u.contains(&host)),
        "app url {:?} is not under {host}",
        app.url
    );
    wait_running(&c).await?;
    let origin = Nginx::origin(&agent.data_dir().join("apps/web/netns"), upstream)?;

    let nginx = Nginx::proxy(&host, upstream)?;
    let ours = Side {
        name: "homeport",
        port: https.port(),
        pids: vec![info.pid],
    };
    let theirs = Side {
        name: "nginx",
        port: nginx.port,
        pids: nginx.pids(),
    };
    let sides = [&ours, &theirs];
    for s in sides {
        wait_serving(s, &host).await.with_context(|| s.name)?;
    }
    let (ours_idle_kib, _) = memory(&ours.pids)?;
    let (nginx_idle_kib, _) = memory(&theirs.pids)?;

    let direct = upstream_direct(upstream)?;
    let origin_version = origin.version.clone();
    let h1 = interleave(sides, |s| wrk(s, &host))?;
    let h2 = interleave(sides, |s| h2load(s, &host))?;
    let hs = interleave_async(sides, |s| handshakes(s, &host)).await?;
    let lat = interleave_async(sides, |s| latency(s, &host)).await?;
    // The agent's own counters, to see whether it dropped access-log lines under load.
    let traffic: Option<Value> = c.get("/v1/apps/web/traffic").await.ok();
    let mem_ours = open_connections(&ours, &host).await?;
    let mem_nginx = open_connections(&theirs, &host).await?;

    let cpu_each = |runs: &[Value]| -> f64 {
        crate::median(
            runs.iter()
                .filter_map(|r| r["cpu_us_each"].as_f64())
                .collect(),
        )
    };
    let idle = |runs: &[Value]| -> f64 {
        crate::median(
            runs.iter()
                .filter_map(|r| r["machine_idle_pct"].as_f64())
                .collect(),
        )
    };
    let rate = |runs: &[Vec<Value>; 2], target: f64| -> Value {
        let per_s =
            |i: usize| -> Vec<f64> { runs[i].iter().filter_map(|r| r["per_s"].as_f64()).collect() };
        let (o, t) = (crate::median(per_s(0)), crate::median(per_s(1)));
        let (co, ct) = (cpu_each(&runs[0]), cpu_each(&runs[1]));
        json!({
            "homeport_per_s": o, "nginx_per_s": t, "ratio_vs_nginx": o / t,
            "target_ratio_min": target,
            "homeport_cpu_us_each": co, "nginx_cpu_us_each": ct, "cpu_ratio_vs_nginx": co / ct,
            "homeport_machine_idle_pct": idle(&runs[0]), "nginx_machine_idle_pct": idle(&runs[1]),
            "homeport_runs": runs[0], "nginx_runs": runs[1],
        })
    };
    let pooled = |runs: &[Value]| -> Vec<f64> {
        runs.iter()
            .flat_map(|r| r["latencies_ms"].as_array().cloned().unwrap_or_default())
            .filter_map(|v| v.as_f64())
            .collect()
    };
    let (mut lo, mut lt) = (pooled(&lat[0]), pooled(&lat[1]));
    let (o50, o99, t50, t99) = (
        percentile(&mut lo, 50.0),
        percentile(&mut lo, 99.0),
        percentile(&mut lt, 50.0),
        percentile(&mut lt, 99.0),
    );
    let strip = |runs: &[Value]| -> Vec<Value> {
        runs.iter()
            .map(|r| {
                let mut r = r.clone();
                if let Some(o) = r.as_object_mut() {
                    o.remove("latencies_ms");
                }
                r
            })
            .collect()
    };
    let mib = |kib: u64| kib as f64 / 1024.0;
    crate::report(
        "proxy",
        json!({
            "what": "the agent's HTTPS reverse proxy against nginx as the same TLS reverse proxy in front of the same app, same machine, interleaved rounds; medians of the rounds",
            "setup": {
                "rounds": ROUNDS, "seconds_each": SECS, "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
                "host": host, "upstream": format!("[{upstream}]:8080"),
                "nginx": nginx.version.clone(),
                "tls": { "homeport": hs[0].first().map(|r| r["tls"].clone()), "nginx": hs[1].first().map(|r| r["tls"].clone()) },
                "origin": format!("{origin_version}, one worker, keep-alive, in the app's network namespace, serving a {}-byte page", PAGE.len()),
                "origin_direct_plain_http_keepalive_per_s": direct,
                "homeport_traffic_after_rate_loads": traffic,
                "notes": "load generators and the origin run on the same cores; both proxies write an access-log line per request; wrk connects to [::1] with the Host header (its SNI is then the IP literal: the agent answers with the device's own certificate and routes by Host)",
            },
            "h1_keepalive_requests": rate(&h1, 1.0),
            "h2_requests": rate(&h2, 1.0),
            "new_tls_handshakes": rate(&hs, 1.0),
            "latency_at_fixed_rate": {
                "rate_per_s": LATENCY_RATE, "connections": LATENCY_CONNS, "protocol": "HTTP/1.1 keep-alive",
                "homeport_p50_ms": o50, "homeport_p99_ms": o99,
                "nginx_p50_ms": t50, "nginx_p99_ms": t99,
                "ratio_p99_vs_nginx": o99 / t99, "target_ratio_p99_max": 1.0,
                "homeport_cpu_us_each": cpu_each(&lat[0]), "nginx_cpu_us_each": cpu_each(&lat[1]),
                "homeport_runs": strip(&lat[0]), "nginx_runs": strip(&lat[1]),
            },
            "memory_open_connections": {
                "connections": OPEN_CONNS, "mix": "half HTTP/1.1, half HTTP/2, one request each, then idle",
                "homeport_rss_mib": mib(mem_ours.0), "homeport_pss_mib": mib(mem_ours.1),
                "homeport_idle_rss_mib": mib(ours_idle_kib), "homeport_after_close_rss_mib": mib(mem_ours.2),
                "nginx_rss_mib": mib(mem_nginx.0), "nginx_pss_mib": mib(mem_nginx.1),
                "nginx_idle_rss_mib": mib(nginx_idle_kib), "nginx_after_close_rss_mib": mib(mem_nginx.2),
                "nginx_processes": theirs.pids.len(),
                "target_homeport_rss_mib_max": 64.0,
                "note": "homeport: the whole agent process (the proxy lives in homeportd); nginx: the sum over master and workers (RSS counts pages they share once per process, PSS splits them)",
            },
        }),
    )
}

/// Runs `f` for each side in turn, `ROUNDS` times: `[ours, theirs]`. Adds to each run the CPU
/// time the side's processes spent during it, in all and per unit of work (`count`).
fn interleave(
    sides: [&Side; 2],
    mut f: impl FnMut(&Side) -> Result<Value>,
) -> Result<[Vec<Value>; 2]> {
    let mut out = [Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        for (i, s) in sides.iter().enumerate() {
            let (cpu, machine) = (cpu_secs(&s.pids)?, machine_ticks()?);
            let r = f(s).with_context(|| s.name)?;
            out[i].push(with_cpu(r, cpu_secs(&s.pids)? - cpu, machine)?);
        }
    }
    Ok(out)
}

/// [`interleave`] for loads of our own client.
async fn interleave_async<F, Fut>(sides: [&Side; 2], mut f: F) -> Result<[Vec<Value>; 2]>
where
    F: FnMut(Side) -> Fut,
    Fut: std::future::Future<Output = Result<Value>>,
{
    let mut out = [Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        for (i, s) in sides.iter().enumerate() {
            let (cpu, machine) = (cpu_secs(&s.pids)?, machine_ticks()?);
            let r = f((*s).clone()).await.with_context(|| s.name)?;
            out[i].push(with_cpu(r, cpu_secs(&s.pids)? - cpu, machine)?);
        }
    }
    Ok(out)
}

/// Adds to a run's figures the CPU time of the proxy's processes (`cpu_s`, and per unit of
/// work: `count`) and how idle the machine was since `machine` ([`machine_ticks`] before it).
fn with_cpu(mut r: Value, cpu_s: f64, machine: (u64, u64)) -> Result<Value> {
    let count = r["count"].as_f64().unwrap_or(0.0);
    let now = machine_ticks()?;
    let (idle, total) = (now.0 - machine.0, now.1 - machine.1);
    r["cpu_s"] = json!(cpu_s);
    r["cpu_us_each"] = json!(cpu_s * 1e6 / count.max(1.0));
    r["machine_idle_pct"] = json!(100.0 * idle as f64 / total.max(1) as f64);
    Ok(r)
}

/// The machine's idle and total CPU ticks so far (the `cpu` line of /proc/stat).
fn machine_ticks() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    ensure!(ticks.len() >= 5, "/proc/stat: no cpu line");
    // user nice system idle iowait irq softirq steal …: idle and iowait are idle.
    Ok((ticks[3] + ticks[4], ticks.iter().take(8).sum()))
}

/// CPU time (user and system) `pids` have used so far, in seconds.
fn cpu_secs(pids: &[u32]) -> Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut ticks = 0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // The command name may hold spaces and parentheses: fields count from after its ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // Fields 14 and 15 of stat (utime, stime); `fields` starts at field 3.
        for i in [11, 12] {
            ticks += fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .with_context(|| format!("/proc/{pid}/stat: {stat}"))?;
        }
    }
    Ok(ticks as f64 / ticks_per_s)
}

async fn wait_running(c: &homeport::api::client::Client) -> Result<()> {
    let t = Instant::now();
    loop {
        let d: homeport::api::types::AppDetail = c.get("/v1/apps/web").await?;
        if let RunState::Running { .. } = d.summary.run {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the app did not start: {:?}", d.summary.run);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `side` serves the app's page over HTTPS.
async fn wait_serving(side: &Side, host: &str) -> Result<()> {
    let t = Instant::now();
    loop {
        let r = async {
            let tls = connect(side.v6(), None, host, &tls_config(&[b"http/1.1"])).await?;
            let mut h = H1::new(tls).await?;
            h.get(host).await
        }
        .await;
        match r {
            Ok(body) if body == PAGE.as_bytes() => return Ok(()),
            Ok(body) => {
                if t.elapsed() > Duration::from_secs(20) {
                    bail!("not the app's page: {}", String::from_utf8_lossy(&body));
                }
            }
            Err(e) if t.elapsed() > Duration::from_secs(20) => return Err(e),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// nginx

struct Nginx {
    dir: tempfile::TempDir,
    child: Child,
    port: u16,
    version: String,
}

impl Nginx {
    /// nginx as a TLS reverse proxy for `host` in front of `[upstream]:8080`, configured like
    /// the agent's proxy: TLS 1.2 and 1.3, ECDSA P-256 certificate, HTTP/2 by ALPN, pooled
    /// keep-alive HTTP/1.1 upstream, the same forwarding headers, an access log in the agent's
    /// format.
    fn proxy(host: &str, upstream: Ipv6Addr) -> Result<Nginx> {
        let dir = tempfile::Builder::new()
            .prefix("homeport-bench-nginx-")
            .tempdir()?;
        let d = dir.path();
        crate::run(
            Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec"])
                .args(["-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
                .args(["-days", "7", "-subj"])
                .arg(format!("/CN={host}"))
                .arg("-addext")
                .arg(format!("subjectAltName=DNS:{host}"))
                .arg("-keyout")
                .arg(d.join("key.pem"))
                .arg("-out")
                .arg(d.join("cert.pem")),
        )?;
        let port = free_port()?;
        let d = d.display();
        let conf = format!(
            r#"daemon off;
master_process on;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
    log_format homeport '$time_iso8601 proxy $remote_addr "$request" $status ${{request_time}}ms $host';
    access_log {d}/access.log homeport;
    # The agent's proxy has no cap on requests per connection; nginx's default (1000) would
    # close client and upstream connections under load (h2load does not reconnect).
    keepalive_requests 1000000;
    upstream app {{
        server [{upstream}]:8080;
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen [::1]:{port} ssl http2;
        listen 127.0.0.1:{port} ssl http2;
        server_name {host};
        ssl_certificate {d}/cert.pem;
        ssl_certificate_key {d}/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header Forwarded "for=\"[$remote_addr]\";proto=https;host=\"$host\"";
        }}
    }}
}}
"#
        );
        Self::spawn(dir, &conf, None, (Ipv6Addr::LOCALHOST, port).into())
    }

    /// The app: nginx serving `PAGE` on port 8080 with keep-alive, one worker, inside the
    /// app's network namespace `netns` (so on the app's address, behind its firewall).
    fn origin(netns: &Path, address: Ipv6Addr) -> Result<Nginx> {
        let dir = tempfile::Builder::new()
            .prefix("homeport-bench-origin-")
            .tempdir()?;
        let www = dir.path().join("www");
        std::fs::create_dir(&www)?;
        std::fs::write(www.join("index.html"), PAGE)?;
        // The workers run as nobody and read the page.
        use std::os::unix::fs::PermissionsExt;
        for p in [dir.path(), &www] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
        }
        let d = dir.path().display();
        let conf = format!(
            r#"daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    open_file_cache max=16;
    default_type text/html;
    server {{
        listen [::]:8080;
        root {d}/www;
    }}
}}
"#
        );
        Self::spawn(dir, &conf, Some(netns), (address, 8080).into())
    }

    /// Starts nginx on `conf` (in `netns`, when given) and waits until `probe` accepts.
    fn spawn(
        dir: tempfile::TempDir,
        conf: &str,
        netns: Option<&Path>,
        probe: SocketAddr,
    ) -> Result<Nginx> {
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let version = Command::new("nginx")
            .arg("-v")
            .output()
            .context("run nginx (apt install nginx)")?;
        let version = String::from_utf8_lossy(&version.stderr)
            .trim()
            .trim_start_matches("nginx version: ")
            .to_string();
        let log = std::fs::File::create(dir.path().join("stderr.log"))?;
        let mut cmd = match netns {
            // nsenter execs nginx: the child is nginx's master.
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg("nginx");
                c
            }
            None => Command::new("nginx"),
        };
        let child = cmd
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start nginx")?;
        let mut n = Nginx {
            dir,
            child,
            port: probe.port(),
            version,
        };
        let t = Instant::now();
        while std::net::TcpStream::connect_timeout(&probe, Duration::from_secs(1)).is_err() {
            if n.child.try_wait()?.is_some() || t.elapsed() > Duration::from_secs(10) {
                let err = std::fs::read_to_string(n.dir.path().join("error.log"))
                    .unwrap_or_default()
                    + &std::fs::read_to_string(n.dir.path().join("stderr.log")).unwrap_or_default();
                bail!("nginx did not start: {err}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(n)
    }

    /// The master and its workers.
    fn pids(&self) -> Vec<u32> {
        let master = self.child.id();
        let mut pids = vec![master];
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let ppid = std::fs::read_to_string(e.path().join("status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("PPid:"))
                        .and_then(|v| v.trim().parse::<u32>().ok())
                });
            if ppid == Some(master) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master: a fast shutdown that takes the workers down too (SIGKILL
        // would leave them running).
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill has no memory preconditions; pid is our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free on both loopback addresses (any address, dual stack), for nginx.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0))?;
    Ok(l.local_addr()?.port())
}

/// VmRSS and Pss (KiB) summed over `pids`.
fn memory(pids: &[u32]) -> Result<(u64, u64)> {
    let mut rss = 0;
    let mut pss = 0;
    for &pid in pids {
        rss += crate::rss_kib(pid)?;
        pss += crate::proc_kib(pid, "smaps_rollup", "Pss")?;
    }
    Ok((rss, pss))
}

// ---------------------------------------------------------------------------------------------
// Loads through wrk and h2load

/// The app's own capacity: plain HTTP with keep-alive straight to it, as the proxies reach it.
fn upstream_direct(upstream: Ipv6Addr) -> Result<f64> {
    let out = output(
        Command::new("wrk")
            .args(["-t2", "-c64", "-d3s"])
            .arg(format!("http://[{upstream}]:8080/")),
    )?;
    let r = parse_wrk(&out)?;
    r["per_s"].as_f64().context("wrk: no rate")
}

/// HTTP/1.1 keep-alive: `wrk -t2 -c64`.
fn wrk(side: &Side, host: &str) -> Result<Value> {
    let out = output(
        Command::new("wrk")
            .args(["-t2", "-c64", &format!("-d{SECS}s"), "-H"])
            .arg(format!("Host: {host}"))
            .arg(format!("https://[::1]:{}/", side.port)),
    )?;
    parse_wrk(&out)
}

fn parse_wrk(out: &str) -> Result<Value> {
    let field = |prefix: &str| -> Option<&str> {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(str::trim)
    };
    let per_s: f64 = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("wrk printed no rate: {out}"))?;
    let requests: u64 = out
        .lines()
        .find_map(|l| {
            let (n, rest) = l.trim().split_once(' ')?;
            rest.starts_with("requests in").then(|| n.parse().ok())?
        })
        .with_context(|| format!("wrk printed no request count: {out}"))?;
    let non_2xx: u64 = field("Non-2xx or 3xx responses:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let socket_errors = field("Socket errors:").unwrap_or("none").to_string();
    ensure!(
        non_2xx * 2 < requests.max(1),
        "most requests failed ({non_2xx} of {requests} not 2xx): {out}"
    );
    Ok(json!({
        "per_s": per_s, "count": requests - non_2xx.min(requests),
        "requests": requests, "non_2xx": non_2xx, "socket_errors": socket_errors,
    }))
}

/// HTTP/2: `h2load -c16 -m4`, one client thread, SNI and `:authority` the app's name. 64
/// streams in flight, like wrk's 64 connections and both proxies' 64 pooled upstream
/// connections: with more (`-m10`), both proxies open and close upstream connections for the
/// excess, and the TIME_WAITs they leave use up the ephemeral ports within a few rounds.
fn h2load(side: &Side, host: &str) -> Result<Value> {
    let out = output(
        Command::new("h2load")
            .args(["-c16", "-m4", "-t1", "-D"])
            .arg(SECS.to_string())
            .arg(format!("--connect-to=[::1]:{}", side.port))
            .arg(format!("https://{host}:{}/", side.port)),
    )?;
    // finished in 5.00s, 1234.50 req/s, 1.2MB/s
    // requests: 6172 total, 6172 started, 6172 done, 6172 succeeded, 0 failed, 0 errored, 0 timeout
    // status codes: 6172 2xx, 0 3xx, 0 4xx, 0 5xx
    let per_s: f64 = out
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix("finished in ")?;
            rest.split(", ")
                .nth(1)?
                .strip_suffix(" req/s")?
                .parse()
                .ok()
        })
        .with_context(|| format!("h2load printed no rate: {out}"))?;
    let count = |line: &str, what: &str| -> Option<u64> {
        let l = out.lines().find_map(|l| l.strip_prefix(line))?;
        l.split(", ").find_map(|p| {
            let (n, w) = p.trim().split_once(' ')?;
            (w == what).then(|| n.parse().ok())?
        })
    };
    let ok = count("status codes:", "2xx").unwrap_or(0);
    let done = count("requests:", "done").unwrap_or(0);
    let failed = count("requests:", "failed").unwrap_or(0);
    ensure!(
        ok * 2 > done,
        "most requests failed ({ok} of {done} 2xx): {out}"
    );
    // h2load's rate counts every finished request; count only 2xx.
    let per_s = if done > 0 {
        per_s * ok as f64 / done as f64
    } else {
        0.0
    };
    Ok(json!({ "per_s": per_s, "count": ok, "requests": done, "ok_2xx": ok, "failed": failed }))
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| {
        format!(
            "run {:?} (apt install wrk nghttp2-client)",
            cmd.get_program()
        )
    })?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

// ---------------------------------------------------------------------------------------------
// Loads through our own client

/// Accepts any certificate, as wrk and h2load do: the benchmark measures the servers.
#[derive(Debug)]
struct NoVerify(Vec<rustls::SignatureScheme>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.clone()
    }
}

/// A client that offers `alpn`, checks no certificate and never resumes a session: every
/// connection is a full handshake.
fn tls_config(alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let schemes = provider
        .signature_verification_algorithms
        .supported_schemes();
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .unwrap_or_else(|_| unreachable!("ring supports TLS 1.2 and 1.3"))
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(schemes)))
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    c.resumption = rustls::client::Resumption::disabled();
    Arc::new(c)
}

/// A TLS connection to `to` (from `from`, when given) with SNI `host`.
async fn connect(
    to: SocketAddr,
    from: Option<IpAddr>,
    host: &str,
    config: &Arc<rustls::ClientConfig>,
) -> Result<TlsStream<TcpStream>> {
    let tcp = match from {
        Some(ip) => {
            let s = match ip {
                IpAddr::V4(_) => TcpSocket::new_v4()?,
                IpAddr::V6(_) => TcpSocket::new_v6()?,
            };
            s.bind(SocketAddr::new(ip, 0))?;
            s.connect(to).await?
        }
        None => TcpStream::connect(to).await?,
    };
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(host.to_string())?;
    Ok(TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await?)
}

/// An HTTP/1.1 keep-alive connection.
struct H1 {
    send: http1::SendRequest<Empty<Bytes>>,
    conn: tokio::task::JoinHandle<()>,
}

impl H1 {
    async fn new(tls: TlsStream<TcpStream>) -> Result<H1> {
        let (send, conn) = http1::handshake(TokioIo::new(tls)).await?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(H1 { send, conn })
    }

    /// GET / and the whole body; fails unless 200.
    async fn get(&mut self, host: &str) -> Result<Bytes> {
        self.send.ready().await?;
        let req = Request::get("/")
            .header(hyper::header::HOST, host)
            .body(Empty::new())?;
        let resp = self.send.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        ensure!(status == 200, "status {status}");
        Ok(body)
    }
}

impl Drop for H1 {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// New TLS handshakes per second: `HANDSHAKE_CONCURRENCY` loops of connect, full handshake
/// (TLS 1.3, no resumption, ALPN h2 and http/1.1 like a browser), close. On a runtime of two
/// threads of its own, as the proxies have two cores.
async fn handshakes(side: Side, host: &str) -> Result<Value> {
    let to = side.v6();
    let host = host.to_string();
    let (done, failed, tls) = std::thread::scope(|s| {
        s.spawn(|| -> Result<(u64, u64, String)> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async {
                let config = tls_config(&[b"h2", b"http/1.1"]);
                let done = Arc::new(AtomicU64::new(0));
                let failed = Arc::new(AtomicU64::new(0));
                let until = Instant::now() + Duration::from_secs(SECS);
                let mut tasks = Vec::new();
                for _ in 0..HANDSHAKE_CONCURRENCY {
                    let (config, host) = (config.clone(), host.clone());
                    let (done, failed) = (done.clone(), failed.clone());
                    tasks.push(tokio::spawn(async move {
                        while Instant::now() < until {
                            match connect(to, None, &host, &config).await {
                                Ok(mut tls) => {
                                    done.fetch_add(1, Ordering::Relaxed);
                                    use tokio::io::AsyncWriteExt;
                                    let _ = tls.shutdown().await;
                                }
                                Err(_) => {
                                    failed.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    }));
                }
                for t in tasks {
                    t.await?;
                }
                // What was negotiated, for the record.
                let tls = connect(to, None, &host, &config).await?;
                let c = tls.get_ref().1;
                let desc = format!(
                    "{:?} {:?} {:?}",
                    c.protocol_version(),
                    c.negotiated_cipher_suite().map(|s| s.suite()),
                    c.negotiated_key_exchange_group().map(|g| g.name()),
                );
                Ok((
                    done.load(Ordering::Relaxed),
                    failed.load(Ordering::Relaxed),
                    desc,
                ))
            })
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("handshake client panicked")))
    })?;
    ensure!(
        done > failed,
        "most handshakes failed ({failed} of {})",
        done + failed
    );
    Ok(json!({
        "per_s": done as f64 / SECS as f64, "count": done, "failed": failed, "tls": tls,
    }))
}

/// Latency at a fixed rate over `LATENCY_CONNS` HTTP/1.1 keep-alive connections. Request `i`
/// is due at `i / LATENCY_RATE` s and goes on connection `i % LATENCY_CONNS`; a request held
/// up behind a slow one on its connection is timed from when it was due (open loop: a stall is
/// not hidden by the client waiting), others from when they were sent.
async fn latency(side: Side, host: &str) -> Result<Value> {
    let config = tls_config(&[b"http/1.1"]);
    let mut conns = Vec::new();
    for _ in 0..LATENCY_CONNS {
        let mut h = H1::new(connect(side.v6(), None, host, &config).await?).await?;
        h.get(host).await?; // warm: connection and upstream pool
        conns.push(h);
    }
    let total = LATENCY_RATE * SECS;
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::new();
    for (k, mut h) in conns.into_iter().enumerate() {
        let host = host.to_string();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut failed = 0u64;
            let mut i = k as u64;
            let mut prev_done = start;
            while i < total {
                let due = start + Duration::from_nanos(i * 1_000_000_000 / LATENCY_RATE);
                tokio::time::sleep_until(due).await;
                // Behind schedule because the previous response came late: that wait counts.
                // Otherwise the request is timed from now, not charged the timer's lateness.
                let from = if prev_done > due {
                    due
                } else {
                    tokio::time::Instant::now()
                };
                match h.get(&host).await {
                    Ok(_) => lat.push(from.elapsed().as_secs_f64() * 1000.0),
                    Err(_) => failed += 1,
                }
                prev_done = tokio::time::Instant::now();
                i += LATENCY_CONNS as u64;
            }
            (lat, failed)
        }));
    }
    let mut all = Vec::new();
    let mut failed = 0;
    for t in tasks {
        let (l, f) = t.await?;
        all.extend(l);
        failed += f;
    }
    ensure!(
        failed * 2 < total,
        "most requests failed ({failed} of {total})"
    );
    let mut sorted = all.clone();
    Ok(json!({
        "p50_ms": percentile(&mut sorted, 50.0), "p99_ms": percentile(&mut sorted, 99.0),
        "max_ms": sorted.last().copied().unwrap_or(0.0),
        "requests": total, "count": total - failed, "failed": failed, "latencies_ms": all,
    }))
}

/// Nearest-rank percentile.
fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Opens `OPEN_CONNS` connections to `side` (half HTTP/1.1, half HTTP/2, one request each)
/// from 127.0.0.2… and measures its memory (RSS, PSS) while they are all open, and its RSS
/// a second after they closed.
async fn open_connections(side: &Side, host: &str) -> Result<(u64, u64, u64)> {
    enum Open {
        H1(H1),
        H2(
            http2::SendRequest<Empty<Bytes>>,
            tokio::task::JoinHandle<()>,
        ),
    }
    let to = SocketAddr::from((Ipv4Addr::LOCALHOST, side.port));
    let h1 = tls_config(&[b"http/1.1"]);
    let h2 = tls_config(&[b"h2"]);
    let mut open = Vec::new();
    for batch in (0..OPEN_CONNS).collect::<Vec<_>>().chunks(50) {
        let mut pending = Vec::new();
        for &i in batch {
            let from = IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                0,
                2 + (i % CLIENT_ADDRS as usize) as u8,
            ));
            let (h1, h2, host) = (h1.clone(), h2.clone(), host.to_string());
            pending.push(tokio::spawn(async move {
                if i % 2 == 0 {
                    let mut h = H1::new(connect(to, Some(from), &host, &h1).await?).await?;
                    h.get(&host).await?;
                    Ok::<_, anyhow::Error>(Open::H1(h))
                } else {
                    let tls = connect(to, Some(from), &host, &h2).await?;
                    ensure!(
                        tls.get_ref().1.alpn_protocol() == Some(b"h2"),
                        "no h2 negotiated"
                    );
                    let (mut send, conn) =
                        http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
                    let conn = tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    send.ready().await?;
                    let req =
                        Request::get(format!("https://{host}/")).body(Empty::<Bytes>::new())?;
                    let resp = send.send_request(req).await?;
                    let status = resp.status();
                    resp.into_body().collect().await?;
                    ensure!(status == 200, "status {status}");
                    Ok(Open::H2(send, conn))
                }
            }));
        }
        for p in pending {
            open.push(
                p.await?
                    .with_context(|| format!("open connection {}", open.len()))?,
            );
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss, pss) = memory(&side.pids)?;
    for o in open {
        match o {
            Open::H1(h) => drop(h),
            Open::H2(send, conn) => {
                drop(send);
                conn.abort();
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok((rss, pss, memory(&side.pids)?.0))
}
