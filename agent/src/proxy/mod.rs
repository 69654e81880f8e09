//! The one reverse proxy in front of every app: HTTPS (HTTP/1.1 and HTTP/2 by ALPN) with
//! certificates from the device CA, routing by `Host` to the app the name belongs to, over
//! pooled keep-alive HTTP/1.1 to the app's own IPv6 address. Plain HTTP redirects to HTTPS.
//!
//! Invariants: an unknown host gets a plain 404, never some app; a route change swaps one
//! `Arc` (connections in flight keep the table they started with); only names the device
//! serves get certificates (a client cannot make the proxy issue for names of its choosing).

pub mod acme;
pub mod ca;
mod files;
pub mod traffic;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};

use crate::manifest::AppName;
pub use ca::{CaError, DeviceCa};

type ProxyBody = BoxBody<Bytes, hyper::Error>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Request bodies on their way to an app: streamed, with the app's size limit applied.
type UpstreamBody = BoxBody<Bytes, BoxError>;

/// Where the proxy listens; `None` turns a listener off.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    /// Where ACME account and certificates are kept.
    pub acme_dir: std::path::PathBuf,
    /// An extra root for the ACME directory's own TLS (test servers such as pebble).
    pub acme_root: Option<std::path::PathBuf>,
}

/// The state of a public name's certificate, for the API.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct CertState {
    pub name: String,
    /// Unix ms; `None` while there is no certificate yet.
    pub not_after: Option<i64>,
    /// The last failure, with the ACME server's reason.
    pub error: Option<String>,
    /// Unix ms of the next attempt after a failure.
    pub retry_at: Option<i64>,
    #[serde(skip)]
    failures: u32,
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Limits that keep one client from starving the others.
const MAX_HEADER_BYTES: usize = 64 * 1024;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS_PER_CLIENT: usize = 256;
const MAX_H2_STREAMS: u32 = 128;

/// One app the proxy serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub app: AppName,
    pub upstream: SocketAddr,
    /// The largest request body passed on (`[https] body_limit`); `None`: no limit.
    pub body_limit: Option<u64>,
    /// Paths served by the proxy itself from `rootfs` (`[https] static`).
    pub static_paths: Vec<String>,
    /// The app's root filesystem as the device sees it (read-only).
    pub rootfs: std::path::PathBuf,
    /// The app's log file, where access-log lines go.
    pub log: std::path::PathBuf,
}

impl Route {
    /// Whether `path` lies under one of the static paths (whole segments only).
    fn serves_static(&self, path: &str) -> bool {
        self.static_paths.iter().any(|p| {
            path.strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    }
}

/// The names an app is served under on the LAN, for a device named `device`: a single-label
/// mDNS name (multi-label `.local` names do not resolve on Windows, Android or Debian's
/// default resolver) and a name under `home.arpa` for LANs with their own DNS.
pub fn hostnames(app: &AppName, device: &str) -> [String; 2] {
    [
        format!("{app}-{device}.local"),
        format!("{app}.{device}.home.arpa"),
    ]
}

/// `Host` (or `:authority`) as a route key: lower case, without port and trailing dot.
pub fn route_key(host: &str) -> Option<String> {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        // An IPv6 literal: never a route, but well-formed only as `[addr]` or `[addr]:port`.
        let (addr, after) = rest.split_once(']')?;
        // The port may be empty (RFC 3986: `port = *DIGIT`).
        let port_ok = after.is_empty()
            || after
                .strip_prefix(':')
                .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()));
        return port_ok
            .then(|| addr.parse::<std::net::Ipv6Addr>().ok())
            .flatten()
            .map(|a| a.to_string());
    }
    let name = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    ok.then(|| name.to_ascii_lowercase())
}

/// The host a request is for: the request target's authority (HTTP/2's `:authority`, or an
/// absolute-form target), else the `Host` header.
pub fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

/// Certificates for the names the device serves, issued by the device CA on first use and
/// again when a third of their lifetime is left.
struct Certs {
    ca: DeviceCa,
    device_names: Vec<String>,
    routes: Arc<RwLock<Arc<HashMap<String, Route>>>>,
    issued: Mutex<HashMap<String, (Arc<CertifiedKey>, SystemTime)>>,
    /// Public names' certificates from ACME.
    public: RwLock<HashMap<String, acme::Issued>>,
    challenges: Arc<acme::Challenges>,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certs").finish_non_exhaustive()
    }
}

impl Certs {
    fn for_name(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((key, at)) = issued.get(name) {
            let age = SystemTime::now().duration_since(*at).unwrap_or_default();
            if age < ca::LEAF_LIFETIME * 2 / 3 {
                return Some(key.clone());
            }
        }
        match self.ca.issue(&[name.to_string()]) {
            Ok(key) => {
                issued.insert(name.to_string(), (key.clone(), SystemTime::now()));
                Some(key)
            }
            Err(e) => {
                tracing::error!(name, error = %e, "cannot issue a certificate");
                None
            }
        }
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let asked = hello.server_name().and_then(route_key);
        let acme_tls = hello
            .alpn()
            .is_some_and(|mut p| p.any(|p| p == ACME_TLS_ALPN));
        if acme_tls {
            // A TLS-ALPN-01 validation: the challenge certificate, or nothing.
            return self.challenges.tls_alpn01(asked.as_deref()?);
        }
        if let Some(name) = &asked {
            let public = self.public.read().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = public.get(name) {
                return Some(i.key.clone());
            }
        }
        let known = asked.filter(|n| {
            self.device_names.contains(n)
                || (n.ends_with(".local") || n.ends_with(".home.arpa"))
                    && read(&self.routes).contains_key(n)
        });
        // Any other name gets the device's own certificate, and then the 404 page.
        let name = known.or_else(|| self.device_names.first().cloned())?;
        self.for_name(&name)
    }
}

fn read<T>(l: &RwLock<Arc<T>>) -> Arc<T> {
    l.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The ALPN protocol of TLS-ALPN-01 validations (RFC 8737).
const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

pub struct Proxy {
    device: String,
    traffic: RwLock<HashMap<AppName, Arc<traffic::Traffic>>>,
    access_log: traffic::AccessLog,
    apps: RwLock<Vec<Route>>,
    acme: acme::Acme,
    acme_config: RwLock<Option<acme::AcmeConfig>>,
    cert_states: Mutex<HashMap<String, CertState>>,
    wake: tokio::sync::Notify,
    routes: Arc<RwLock<Arc<HashMap<String, Route>>>>,
    certs: Arc<Certs>,
    client: Client<HttpConnector, UpstreamBody>,
    https_port: u16,
    per_client: Mutex<HashMap<IpAddr, usize>>,
    bound_http: Option<SocketAddr>,
    bound_https: Option<SocketAddr>,
}

impl Proxy {
    /// Binds the listeners and serves on them until the process ends.
    pub async fn start(
        config: &ProxyConfig,
        device: &str,
        ca: DeviceCa,
    ) -> std::io::Result<Arc<Proxy>> {
        let routes = Arc::new(RwLock::new(Arc::new(HashMap::new())));
        let acme = acme::Acme::new(config.acme_dir.clone(), config.acme_root.clone());
        let certs = Arc::new(Certs {
            ca,
            device_names: vec![format!("{device}.local"), format!("{device}.home.arpa")],
            routes: routes.clone(),
            issued: Mutex::new(HashMap::new()),
            public: RwLock::new(acme.load()),
            challenges: acme.challenges.clone(),
        });
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .pool_timer(TokioTimer::new())
            .build(connector);
        let http = match config.http {
            Some(a) => Some(TcpListener::bind(a).await?),
            None => None,
        };
        let https = match config.https {
            Some(a) => Some(TcpListener::bind(a).await?),
            None => None,
        };
        let bound_https = https.as_ref().map(|l| l.local_addr()).transpose()?;
        let proxy = Arc::new(Proxy {
            device: device.to_string(),
            traffic: RwLock::new(HashMap::new()),
            access_log: traffic::AccessLog::start()?,
            apps: RwLock::new(Vec::new()),
            acme,
            acme_config: RwLock::new(None),
            cert_states: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
            routes,
            certs,
            client,
            https_port: bound_https.map_or(443, |a| a.port()),
            per_client: Mutex::new(HashMap::new()),
            bound_http: http.as_ref().map(|l| l.local_addr()).transpose()?,
            bound_https,
        });
        if let Some(l) = https {
            let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(std::io::Error::other)?
            .with_no_client_auth()
            .with_cert_resolver(proxy.certs.clone());
            // Our order of cipher suites (rustls': AEADs with forward secrecy, strongest first),
            // not whatever the client lists first.
            tls.ignore_client_order = true;
            tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
            tokio::spawn(proxy.clone().accept_loop(l, Some(acceptor)));
        }
        if let Some(l) = http {
            tokio::spawn(proxy.clone().accept_loop(l, None));
        }
        tokio::spawn(proxy.clone().acme_loop());
        tracing::info!(http = ?proxy.bound_http, https = ?proxy.bound_https, device, "proxy listening");
        Ok(proxy)
    }

    pub fn bound(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        (self.bound_http, self.bound_https)
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    /// The device CA's certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        self.certs.ca.cert_pem()
    }

    /// A TLS configuration with the device's own certificates (its names under the device
    /// CA), for the agent's API over TCP: HTTP/1.1 only.
    pub fn api_tls(&self) -> std::io::Result<Arc<rustls::ServerConfig>> {
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(std::io::Error::other)?
        .with_no_client_auth()
        .with_cert_resolver(self.certs.clone());
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(tls))
    }

    /// Replaces the routing table; connections in flight are not disturbed.
    pub fn set_routes(&self, routes: impl IntoIterator<Item = Route>) {
        let routes: Vec<Route> = routes.into_iter().collect();
        {
            let mut t = self.traffic.write().unwrap_or_else(|e| e.into_inner());
            t.retain(|app, _| routes.iter().any(|r| &r.app == app));
            for r in &routes {
                t.entry(r.app.clone()).or_default();
            }
        }
        *self.apps.write().unwrap_or_else(|e| e.into_inner()) = routes;
        self.rebuild_table();
        self.wake.notify_one();
    }

    fn rebuild_table(&self) {
        let domain = self.domain();
        let mut table = HashMap::new();
        for r in self.apps.read().unwrap_or_else(|e| e.into_inner()).iter() {
            for name in hostnames(&r.app, &self.device) {
                table.insert(name, r.clone());
            }
            if let Some(d) = &domain {
                table.insert(format!("{}.{d}", r.app), r.clone());
            }
        }
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
    }

    fn domain(&self) -> Option<String> {
        self.acme_config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.domain.clone())
    }

    /// Sets (or clears) the owner's public domain: apps are served under `<app>.<domain>` too,
    /// with certificates from ACME.
    pub fn set_acme(&self, config: Option<acme::AcmeConfig>) {
        *self.acme_config.write().unwrap_or_else(|e| e.into_inner()) = config;
        self.cert_states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.rebuild_table();
        self.wake.notify_one();
    }

    pub fn acme_config(&self) -> Option<acme::AcmeConfig> {
        self.acme_config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The public names and their certificates' state.
    pub fn certificates(&self) -> Vec<CertState> {
        let mut v: Vec<CertState> = self
            .public_names()
            .into_iter()
            .map(|name| {
                let mut s = self
                    .cert_states
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&name)
                    .cloned()
                    .unwrap_or_default();
                s.not_after = self
                    .certs
                    .public
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&name)
                    .map(|i| unix_ms(i.not_after));
                s.name = name;
                s
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn public_names(&self) -> Vec<String> {
        let Some(domain) = self.domain() else {
            return Vec::new();
        };
        self.apps
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|r| format!("{}.{domain}", r.app))
            .collect()
    }

    /// Obtains and renews the public names' certificates: at once when names or the domain
    /// change, then when a certificate is due, with backoff (1 min doubling to 6 h, ±10 %)
    /// after failures.
    async fn acme_loop(self: Arc<Self>) {
        loop {
            let mut next = Duration::from_secs(3600);
            if let Some(cfg) = self.acme_config() {
                for name in self.public_names() {
                    let now = SystemTime::now();
                    let have = self
                        .certs
                        .public
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&name)
                        .cloned();
                    if have.as_ref().is_some_and(|i| !i.due(now)) {
                        continue;
                    }
                    let retry_at = self
                        .cert_states
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&name)
                        .and_then(|s| s.retry_at);
                    if let Some(at) = retry_at {
                        let wait = at - unix_ms(now);
                        if wait > 0 {
                            next = next.min(Duration::from_millis(wait as u64));
                            continue;
                        }
                    }
                    match self.acme.obtain(&cfg, &name).await {
                        Ok(issued) => {
                            self.certs
                                .public
                                .write()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(name.clone(), issued);
                            self.cert_states
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .remove(&name);
                        }
                        Err(e) => {
                            tracing::warn!(name, error = %e, "no certificate from ACME");
                            let mut states =
                                self.cert_states.lock().unwrap_or_else(|e| e.into_inner());
                            let s = states.entry(name.clone()).or_default();
                            s.failures += 1;
                            let base = 60u64 << s.failures.min(9).saturating_sub(1);
                            let backoff =
                                base.min(6 * 3600) as f64 * (0.9 + 0.2 * rand::random::<f64>());
                            s.error = Some(e.to_string());
                            s.retry_at = Some(unix_ms(now) + (backoff * 1000.0) as i64);
                            next = next.min(Duration::from_secs_f64(backoff));
                        }
                    }
                }
            }
            let _ = tokio::time::timeout(next, self.wake.notified()).await;
        }
    }

    /// Every name the proxy serves an app under.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = read(&self.routes).keys().cloned().collect();
        v.sort();
        v
    }

    /// The proxy's counters for an app (`None`: the proxy does not serve it).
    pub fn traffic(&self, app: &AppName) -> Option<traffic::TrafficStats> {
        self.traffic
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(app)
            .map(|t| t.stats())
    }

    /// The app's URL on the LAN.
    pub fn url(&self, app: &AppName) -> String {
        let [name, _] = hostnames(app, &self.device);
        match self.https_port {
            443 => format!("https://{name}/"),
            p => format!("https://{name}:{p}/"),
        }
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(slot) = self.clone().admit(peer.ip()) else {
                continue; // dropping the stream closes it
            };
            let _ = stream.set_nodelay(true);
            let this = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let _slot = slot;
                this.serve(stream, peer, tls).await;
            });
        }
    }

    /// A connection slot for `ip`, or `None` when it has too many open already.
    fn admit(self: Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut map = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_default();
        if *n >= MAX_CONNECTIONS_PER_CLIENT {
            return None;
        }
        *n += 1;
        drop(map);
        Some(Slot { proxy: self, ip })
    }

    async fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) {
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(MAX_HEADER_BYTES)
            // Plain HTTP only answers at once (redirects, ACME challenges), so a client that
            // closes its sending side after the request (`nc`) still gets the answer. On HTTPS
            // an end of input means the client left: its proxied request is dropped, as
            // nginx does, so an abandoned long poll or event stream does not hold the app.
            .half_close(tls.is_none());
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_H2_STREAMS)
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .keep_alive_interval(Duration::from_secs(30));
        let https = tls.is_some();
        let this = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.handle(req, peer, https).await) }
        });
        let result =
            match tls {
                Some(acceptor) => {
                    let tls_stream =
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(s)) => s,
                            _ => return,
                        };
                    let alpn = tls_stream.get_ref().1.alpn_protocol();
                    if alpn == Some(ACME_TLS_ALPN) {
                        // A TLS-ALPN-01 validation ends with the handshake.
                        return;
                    }
                    let h2 = alpn == Some(b"h2");
                    let io = TokioIo::new(tls_stream);
                    if h2 {
                        builder.serve_connection_with_upgrades(io, service).await
                    } else {
                        builder
                            .http1_only()
                            .serve_connection_with_upgrades(io, service)
                            .await
                    }
                }
                None => {
                    builder
                        .http1_only()
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await
                }
            };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "proxy connection ended");
        }
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        https: bool,
    ) -> Response<ProxyBody> {
        let Some(host) = request_host(&req).and_then(route_key) else {
            return plain(
                StatusCode::BAD_REQUEST,
                "missing or malformed Host header\n",
            );
        };
        if !https {
            return self.redirect(&req, &host);
        }
        let Some(route) = read(&self.routes).get(&host).cloned() else {
            return plain(StatusCode::NOT_FOUND, "no app is served under this name\n");
        };
        let started = std::time::Instant::now();
        let request_line = format!(
            "{} {} {:?}",
            req.method(),
            req.uri().path_and_query().map_or("/", |p| p.as_str()),
            req.version()
        );
        let (app, log) = (route.app.clone(), route.log.clone());
        let resp = self.forward(req, route, &host, peer).await;
        let took = started.elapsed();
        let counters = self
            .traffic
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&app)
            .cloned();
        if let Some(t) = counters {
            t.record(resp.status().as_u16(), took);
            let line = format!(
                "{} proxy {} \"{request_line}\" {} {:.1}ms {host}\n",
                timestamp(),
                peer.ip().to_canonical(),
                resp.status().as_u16(),
                took.as_secs_f64() * 1000.0,
            );
            if !self.access_log.write(log, line) {
                traffic::AccessLog::dropped(&t);
            }
        }
        resp
    }

    /// Plain HTTP goes to HTTPS, except ACME's HTTP-01 challenges (not served yet: 404).
    fn redirect(&self, req: &Request<Incoming>, host: &str) -> Response<ProxyBody> {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        if let Some(token) = path.strip_prefix("/.well-known/acme-challenge/") {
            return match self.acme.challenges.http01(token) {
                Some(auth) => plain(StatusCode::OK, &auth),
                None => plain(StatusCode::NOT_FOUND, "no such challenge\n"),
            };
        }
        let authority = match self.https_port {
            443 => host.to_string(),
            p => format!("{host}:{p}"),
        };
        let mut resp = plain(StatusCode::PERMANENT_REDIRECT, "");
        if let Ok(v) = HeaderValue::from_str(&format!("https://{authority}{path}")) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        resp
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        route: Route,
        host: &str,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        if route.serves_static(req.uri().path()) {
            return files::serve(&route.rootfs, req.uri().path(), req.method(), req.headers())
                .await;
        }
        let upgrade = wants_upgrade(req.headers()).then(|| {
            (
                req.headers().get(header::UPGRADE).cloned(),
                hyper::upgrade::on(&mut req),
            )
        });
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let Ok(uri) = Uri::try_from(format!("http://{}{path}", route.upstream)) else {
            return plain(StatusCode::BAD_REQUEST, "malformed request target\n");
        };
        let original_host = req
            .headers()
            .get(header::HOST)
            .cloned()
            .or_else(|| HeaderValue::from_str(host).ok());
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        if let Some(h) = original_host {
            headers.insert(header::HOST, h);
        }
        forwarded_headers(headers, peer.ip(), host);
        if let Some((Some(proto), _)) = &upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, proto.clone());
        }
        let req = match route.body_limit {
            Some(limit) => {
                let declared = req
                    .headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                if declared.is_some_and(|n| n > limit) {
                    // Read what the client is sending anyway (up to a bound), so that it gets
                    // to see the answer instead of a connection reset.
                    drain(req.into_body()).await;
                    return plain(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        &format!(
                            "the app {} takes bodies of at most {limit} bytes\n",
                            route.app
                        ),
                    );
                }
                // A body without a length is cut off where it passes the limit.
                req.map(|b| {
                    http_body_util::Limited::new(b, usize::try_from(limit).unwrap_or(usize::MAX))
                        .boxed()
                })
            }
            None => req.map(|b| b.map_err(BoxError::from).boxed()),
        };
        let mut resp = match self.client.request(req).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(app = %route.app, error = %e, "upstream request failed");
                return plain(
                    StatusCode::BAD_GATEWAY,
                    &format!("the app {} is not answering\n", route.app),
                );
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some((_, client_side)) = upgrade {
                let app_side = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    if let (Ok(c), Ok(a)) = (client_side.await, app_side.await) {
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(c),
                            &mut TokioIo::new(a),
                        )
                        .await;
                    }
                });
                let (parts, _) = resp.into_parts();
                return Response::from_parts(parts, empty());
            }
        }
        strip_hop_by_hop(resp.headers_mut());
        resp.map(|b| b.boxed())
    }
}

/// One open connection of a client; released on drop.
struct Slot {
    proxy: Arc<Proxy>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self
            .proxy
            .per_client
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Reads and drops a request body: at most `DRAIN_BYTES`, for at most `DRAIN_TIME`.
async fn drain(mut body: Incoming) {
    const DRAIN_BYTES: usize = 16 << 20;
    const DRAIN_TIME: Duration = Duration::from_secs(5);
    let read = async {
        let mut seen = 0;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, Bytes::len);
            if seen > DRAIN_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, read).await;
}

/// Now as `2026-11-23T07:50:01.123Z`.
fn timestamp() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

fn empty() -> ProxyBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

fn plain(status: StatusCode, text: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from(text.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn wants_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Removes the headers that describe one connection, not the message (RFC 9110 7.6.1),
/// including those the `Connection` header names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        h.remove(n);
    }
    for n in ["keep-alive", "proxy-connection"] {
        h.remove(n);
    }
}

/// Tells the app who asked and how: `X-Forwarded-For` (appended to), `-Proto`, `-Host`, and
/// the standard `Forwarded` (RFC 7239).
pub fn forwarded_headers(h: &mut HeaderMap, client: IpAddr, host: &str) {
    let client = match client {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {client}"),
        None => client.to_string(),
    };
    let node = match client {
        IpAddr::V6(a) => format!("\"[{a}]\""),
        IpAddr::V4(a) => a.to_string(),
    };
    let fwd = format!("for={node};proto=https;host=\"{host}\"");
    let fwd = match h.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {fwd}"),
        None => fwd,
    };
    for (name, value) in [
        ("x-forwarded-for", xff),
        ("x-forwarded-proto", "https".to_string()),
        ("x-forwarded-host", host.to_string()),
        ("forwarded", fwd),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_keys_are_normalised_and_malformed_hosts_refused() {
        for (input, key) in [
            ("Wiki-Homeport.local", Some("wiki-homeport.local")),
            ("wiki-homeport.local:8443", Some("wiki-homeport.local")),
            ("wiki.homeport.home.arpa.", Some("wiki.homeport.home.arpa")),
            ("[::1]:443", Some("::1")),
            ("[2001:DB8::1]", Some("2001:db8::1")),
            ("", None),
            ("..", None),
            ("wiki-homeport.local..", None),
            ("a..b", None),
            ("[]", None),
            ("[wiki-homeport.local]:443", None),
            ("[::1]x", None),
            ("[::1]:", Some("::1")),
            ("host:", Some("host")),
            ("bad host", None),
            ("a/b", None),
            ("x:y:z", None),
        ] {
            assert_eq!(route_key(input).as_deref(), key, "{input:?}");
        }
    }

    #[test]
    fn hop_by_hop_headers_go_and_named_ones_too() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::ACCEPT));
    }

    #[test]
    fn forwarded_headers_append_and_quote() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        forwarded_headers(
            &mut h,
            "2001:db8::7".parse().unwrap(),
            "wiki-homeport.local",
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 2001:db8::7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "wiki-homeport.local");
        assert_eq!(
            h["forwarded"],
            "for=\"[2001:db8::7]\";proto=https;host=\"wiki-homeport.local\""
        );
        let mut h = HeaderMap::new();
        forwarded_headers(&mut h, "::ffff:192.0.2.1".parse().unwrap(), "x.local");
        assert_eq!(h["x-forwarded-for"], "192.0.2.1", "v4-mapped shown as IPv4");
    }

    #[test]
    fn apps_get_a_single_label_mdns_name_and_a_home_arpa_one() {
        let app = AppName::try_from("wiki").unwrap();
        assert_eq!(
            hostnames(&app, "homeport"),
            ["wiki-homeport.local", "wiki.homeport.home.arpa"]
        );
    }
}
