//! The HTTP+JSON API on a unix socket (0600, root only). Handlers only translate requests
//! into [`Command`]s (or the streaming calls of [`Agent`]) and errors into status codes.
//!
//! `docs/api.md` documents every route in [`ROUTES`]; a test keeps the two in step.

pub mod client;
pub mod types;

use std::convert::Infallible;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};

use crate::daemon::{Actor, Agent, AgentError, Command, Response as Reply};
use crate::images::registry::RegistryError;
use crate::images::ImageError;
use crate::manifest::{AppName, Manifest};
use crate::runtime::ExitStatus;
use types::{ApiError, InstallLine, ManifestBody};

pub type Body = BoxBody<Bytes, std::io::Error>;

/// What a route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Info,
    ListApps,
    Install,
    Validate,
    Inspect,
    Remove,
    Start,
    Stop,
    Restart,
    Update,
    History,
    Logs,
    Exec,
    Debug,
    ListImages,
    Ca,
    GetDomain,
    SetDomain,
    ClearDomain,
    Certificates,
    Traffic,
    PruneImages,
    Poweroff,
    Reboot,
    Registries,
    SetRegistry,
    RemoveRegistry,
    OsStatus,
    OsConfig,
    OsUpdate,
    Time,
    SetTime,
}

pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub op: Op,
}

macro_rules! routes {
    ($($method:ident $path:literal => $op:ident,)*) => {
        &[$(Route { method: Method::$method, path: $path, op: Op::$op },)*]
    };
}

pub const ROUTES: &[Route] = routes! {
    GET "/v1/info" => Info,
    GET "/v1/apps" => ListApps,
    POST "/v1/apps" => Install,
    POST "/v1/manifests/validate" => Validate,
    GET "/v1/apps/{name}" => Inspect,
    DELETE "/v1/apps/{name}" => Remove,
    POST "/v1/apps/{name}/start" => Start,
    POST "/v1/apps/{name}/stop" => Stop,
    POST "/v1/apps/{name}/restart" => Restart,
    POST "/v1/apps/{name}/update" => Update,
    GET "/v1/apps/{name}/history" => History,
    GET "/v1/apps/{name}/logs" => Logs,
    POST "/v1/apps/{name}/exec" => Exec,
    POST "/v1/apps/{name}/debug" => Debug,
    GET "/v1/images" => ListImages,
    POST "/v1/images/prune" => PruneImages,
    GET "/v1/ca.crt" => Ca,
    GET "/v1/domain" => GetDomain,
    PUT "/v1/domain" => SetDomain,
    DELETE "/v1/domain" => ClearDomain,
    GET "/v1/certificates" => Certificates,
    GET "/v1/apps/{name}/traffic" => Traffic,
    POST "/v1/system/poweroff" => Poweroff,
    POST "/v1/system/reboot" => Reboot,
    GET "/v1/system/time" => Time,
    PUT "/v1/system/time" => SetTime,
    GET "/v1/registries" => Registries,
    PUT "/v1/registries/{host}" => SetRegistry,
    DELETE "/v1/registries/{host}" => RemoveRegistry,
    GET "/v1/os" => OsStatus,
    PUT "/v1/os/config" => OsConfig,
    POST "/v1/os/update" => OsUpdate,
};

/// Matches a request path against the table; returns the op and the `{name}` (or `{host}`)
/// segment.
fn route<'a>(method: &Method, path: &'a str) -> Option<(Op, Option<&'a str>)> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    ROUTES.iter().find_map(|r| {
        if r.method != method {
            return None;
        }
        let pat: Vec<&str> = r.path.split('/').collect();
        if pat.len() != segs.len() {
            return None;
        }
        let mut name = None;
        for (p, s) in pat.iter().zip(&segs) {
            if p.starts_with('{') {
                name = Some(*s);
            } else if p != s {
                return None;
            }
        }
        Some((r.op, name))
    })
}

/// Largest JSON request body.
const MAX_BODY: usize = 1 << 20;
pub const UPGRADE_PROTOCOL: &str = "homeport-stdio";
pub const EXEC_HEADER: &str = "homeport-exec";

/// Serves the API until `shutdown` resolves.
pub async fn serve(
    agent: Arc<Agent>,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "api accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Some(actor) = actor_of(&stream) else { continue };
                let agent = agent.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (agent, actor) = (agent.clone(), actor.clone());
                        async move { Ok::<_, Infallible>(handle(agent, actor, req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades();
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "api connection ended");
                    }
                });
            }
            _ = &mut shutdown => return,
        }
    }
}

/// Serves the API over TCP with TLS (the appliance's API on the network) until `shutdown`
/// resolves. Every request but `GET /v1/ca.crt` (public, so a client can pin it) needs
/// `Authorization: Bearer <token>`.
pub async fn serve_tls(
    agent: Arc<Agent>,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    token: Arc<str>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "api accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (agent, acceptor, token) = (agent.clone(), acceptor.clone(), token.clone());
                tokio::spawn(async move {
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    let actor = Actor(format!("owner from {}", peer.ip()));
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (agent, actor, token) = (agent.clone(), actor.clone(), token.clone());
                        async move {
                            let public = req.method() == Method::GET && req.uri().path() == "/v1/ca.crt";
                            if !public && !bearer_matches(&req, &token) {
                                return Ok::<_, Infallible>(json_status(
                                    StatusCode::UNAUTHORIZED,
                                    &ApiError {
                                        status: 401,
                                        message: "this needs the owner's token: Authorization: Bearer <token>".into(),
                                        problems: Vec::new(),
                                    },
                                ));
                            }
                            Ok(handle(agent, actor, req).await)
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .header_read_timeout(Duration::from_secs(10))
                        .timer(hyper_util::rt::TokioTimer::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades();
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "api connection ended");
                    }
                });
            }
            _ = &mut shutdown => return,
        }
    }
}

/// Whether the request carries the token, compared in constant time.
fn bearer_matches(req: &Request<Incoming>, token: &str) -> bool {
    let Some(given) = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Only root (or the agent's own user) may talk to the agent; the socket mode says so too.
fn actor_of(stream: &UnixStream) -> Option<Actor> {
    let cred = stream.peer_cred().ok()?;
    let uid = cred.uid();
    if uid != 0 && uid != nix::unistd::geteuid().as_raw() {
        tracing::warn!(uid, "api connection from a non-root user refused");
        return None;
    }
    let user = nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map_or_else(|| format!("uid {uid}"), |u| u.name);
    Some(Actor(format!("{user} (uid {uid})")))
}

async fn handle(agent: Arc<Agent>, actor: Actor, req: Request<Incoming>) -> Response<Body> {
    match dispatch(agent, actor, req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

fn app_name(name: Option<&str>) -> Result<AppName, AgentError> {
    let s = name.unwrap_or_default();
    AppName::try_from(s).map_err(|e| AgentError::BadRequest(e.to_string()))
}

async fn dispatch(
    agent: Arc<Agent>,
    actor: Actor,
    req: Request<Incoming>,
) -> Result<Response<Body>, AgentError> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let Some((op, name)) = route(req.method(), &path) else {
        let known = ROUTES
            .iter()
            .any(|r| route(&r.method, &path).is_some() || r.path == path);
        let msg = format!("no route for {} {path}", req.method());
        return Ok(json_status(
            if known {
                StatusCode::METHOD_NOT_ALLOWED
            } else {
                StatusCode::NOT_FOUND
            },
            &ApiError {
                status: if known { 405 } else { 404 },
                message: msg,
                problems: Vec::new(),
            },
        ));
    };
    let cmd = match op {
        Op::GetDomain => return Ok(json(&agent.domain())),
        Op::SetDomain => {
            let cfg = read_json::<crate::proxy::acme::AcmeConfig>(req).await?;
            agent.set_domain(Some(cfg), &actor)?;
            return Ok(json(&agent.domain()));
        }
        Op::ClearDomain => {
            agent.set_domain(None, &actor)?;
            return Ok(json(&agent.domain()));
        }
        Op::Certificates => return Ok(json(&agent.certificates())),
        Op::Registries => return Ok(json(&agent.registries()?)),
        Op::SetRegistry => {
            let host = percent_decoded(name.unwrap_or_default());
            let settings = read_json::<types::RegistrySettings>(req).await?;
            return Ok(json(&agent.set_registry(&host, settings, &actor)?));
        }
        Op::RemoveRegistry => {
            agent.remove_registry(&percent_decoded(name.unwrap_or_default()), &actor)?;
            return Ok(Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(empty())
                .unwrap_or_else(|_| Response::new(empty())));
        }
        Op::OsStatus | Op::OsConfig | Op::OsUpdate => {
            let os = agent
                .os()
                .cloned()
                .ok_or(crate::os::OsError::NotAppliance)?;
            if op == Op::OsConfig {
                let config = read_json::<crate::os::OsConfig>(req).await?;
                os.set_config(&config)?;
                tracing::info!(actor = %actor.0, ?config, "OS update settings changed");
            } else if op == Op::OsUpdate {
                let body = read_json::<types::OsUpdateRequest>(req).await?;
                os.request_update(body.now)?;
                return Ok(json_status(StatusCode::ACCEPTED, &os.status()?));
            }
            return Ok(json(&os.status()?));
        }
        Op::Poweroff | Op::Reboot => {
            use crate::appliance::ShutdownKind;
            let kind = if op == Op::Poweroff {
                ShutdownKind::Poweroff
            } else {
                ShutdownKind::Reboot
            };
            agent.shutdown(kind, &actor)?;
            return Ok(Response::builder()
                .status(StatusCode::ACCEPTED)
                .body(empty())
                .unwrap_or_else(|_| Response::new(empty())));
        }
        Op::Time => return Ok(json(&agent.time_status().await)),
        Op::SetTime => {
            let settings = read_json::<crate::clock::TimeSettings>(req).await?;
            agent.set_time(&settings, &actor)?;
            return Ok(json(&agent.time_status().await));
        }
        Op::Traffic => return Ok(json(&agent.traffic(&app_name(name)?)?)),
        Op::Ca => {
            return Ok(Response::builder()
                .header("content-type", "application/x-pem-file")
                .body(
                    Full::new(Bytes::from(agent.ca_pem()))
                        .map_err(|never| match never {})
                        .boxed(),
                )
                .unwrap_or_else(|_| Response::new(empty())))
        }
        Op::Info => Command::Info,
        Op::ListApps => Command::List,
        Op::Inspect => Command::Inspect(app_name(name)?),
        Op::Remove => Command::Remove {
            name: app_name(name)?,
            purge_data: query_flag(&query, "purge_data")?,
            actor,
        },
        Op::Start => Command::Start(app_name(name)?, actor),
        Op::Stop => Command::Stop(app_name(name)?, actor),
        Op::Restart => Command::Restart(app_name(name)?, actor),
        Op::History => Command::History(app_name(name)?),
        Op::ListImages => Command::Images,
        Op::PruneImages => Command::PruneImages,
        Op::Validate => Command::Validate(read_json::<ManifestBody>(req).await?.manifest),
        Op::Install => {
            return install(agent, actor, read_json::<ManifestBody>(req).await?.manifest).await
        }
        Op::Update => {
            let name = app_name(name)?;
            let body = read_json::<types::UpdateBody>(req).await?;
            return update(agent, actor, name, body.manifest).await;
        }
        Op::Logs => return logs(agent, app_name(name)?, &query).await,
        Op::Exec | Op::Debug => return upgrade(agent, app_name(name)?, op == Op::Debug, req).await,
    };
    Ok(match agent.handle(cmd).await? {
        Reply::Apps(v) => json(&v),
        Reply::App(v) => json(&v),
        Reply::Summary(v) => json(&v),
        Reply::History(v) => json(&v),
        Reply::Images(v) => json(&v),
        Reply::Pruned(v) => json(&v),
        Reply::Problems(problems) => json(&types::ValidateReply { problems }),
        Reply::Info(v) => json(&v),
        Reply::Done => Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(empty())
            .unwrap_or_else(|_| Response::new(empty())),
    })
}

/// A path segment with `%XX` escapes decoded (a registry host may be `%5Bfd00::1%5D:5000`);
/// a malformed escape stays as it is.
fn percent_decoded(segment: &str) -> String {
    let b = segment.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

fn query_flag(query: &str, key: &str) -> Result<bool, AgentError> {
    match query_param(query, key) {
        None | Some("false") | Some("0") => Ok(false),
        Some("") | Some("true") | Some("1") => Ok(true),
        Some(v) => Err(AgentError::BadRequest(format!(
            "query parameter {key}={v}: use true or false"
        ))),
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<T, AgentError> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| AgentError::BadRequest(format!("request body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| {
        AgentError::BadRequest(format!("request body is not valid JSON for this call: {e}"))
    })
}

async fn install(
    agent: Arc<Agent>,
    actor: Actor,
    manifest: String,
) -> Result<Response<Body>, AgentError> {
    // Problems a caller can fix are answered right away, with a status code.
    Manifest::parse(&manifest)?;
    Ok(streamed(move |progress| async move {
        agent.install(&manifest, &actor, &progress).await
    }))
}

async fn update(
    agent: Arc<Agent>,
    actor: Actor,
    name: AppName,
    manifest: Option<String>,
) -> Result<Response<Body>, AgentError> {
    if let Some(m) = &manifest {
        Manifest::parse(m)?;
    }
    // An unknown app is a 404 right away, not a line in the stream.
    agent.run_state(&name)?;
    Ok(streamed(move |progress| async move {
        agent
            .update(&name, manifest.as_deref(), &actor, &progress)
            .await
    }))
}

type ProgressFn = Box<dyn Fn(types::Progress) + Send + Sync>;

/// Runs `work` to its end in a task of its own (also if the client goes away) and answers an
/// NDJSON stream: its progress lines, then `done` or `error`.
fn streamed<Fut>(work: impl FnOnce(ProgressFn) -> Fut + Send + 'static) -> Response<Body>
where
    Fut: std::future::Future<Output = Result<types::AppSummary, AgentError>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<InstallLine>(64);
    let progress_tx = tx.clone();
    let progress: ProgressFn = Box::new(move |p| {
        let _ = progress_tx.try_send(InstallLine::Progress(p));
    });
    tokio::spawn(async move {
        let line = match work(progress).await {
            Ok(summary) => InstallLine::Done(summary),
            Err(e) => {
                tracing::warn!(error = %chain(&e), "operation failed");
                InstallLine::Error(api_error(&e))
            }
        };
        let _ = tx.send(line).await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let line = rx.recv().await?;
        let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
        bytes.push(b'\n');
        Some((Ok::<_, std::io::Error>(Frame::data(Bytes::from(bytes))), rx))
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap_or_else(|_| Response::new(empty()))
}

async fn logs(agent: Arc<Agent>, name: AppName, query: &str) -> Result<Response<Body>, AgentError> {
    use crate::runtime::logs;
    let path = agent.log_file(&name)?;
    let tail = match query_param(query, "tail") {
        None | Some("") => 100,
        Some("all") => usize::MAX,
        Some(n) => n.parse().map_err(|_| {
            AgentError::BadRequest(format!("tail={n}: use a number of lines or all"))
        })?,
    };
    let follow = query_flag(query, "follow")?;
    let p = path.clone();
    let (head, offset) = tokio::task::spawn_blocking(move || {
        let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        (logs::tail(&p, tail).unwrap_or_default(), len)
    })
    .await
    .unwrap_or_default();
    if !follow {
        return Ok(Response::builder()
            .header("content-type", "text/plain")
            .body(full(head))
            .unwrap_or_else(|_| Response::new(empty())));
    }
    let state = (Some(head), path, offset);
    let stream = futures_util::stream::unfold(state, |(head, path, mut offset)| async move {
        if let Some(h) = head {
            return Some((Ok(Frame::data(Bytes::from(h))), (None, path, offset)));
        }
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if !path.parent().is_some_and(|p| p.exists()) {
                return None; // the app was removed
            }
            let p = path.clone();
            let (chunk, off) = tokio::task::spawn_blocking(move || {
                let chunk = logs::read_from(&p, &mut offset).unwrap_or_default();
                (chunk, offset)
            })
            .await
            .ok()?;
            offset = off;
            if !chunk.is_empty() {
                return Some((
                    Ok::<_, std::io::Error>(Frame::data(Bytes::from(chunk))),
                    (None, path, offset),
                ));
            }
        }
    });
    Ok(Response::builder()
        .header("content-type", "text/plain")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap_or_else(|_| Response::new(empty())))
}

/// `exec` and `debug`: the connection is upgraded; the client then sends its stdin, stdout
/// and stderr descriptors with SCM_RIGHTS, the process runs on them, and the agent answers
/// `exit <code>` when it ends. A client that hangs up kills the process.
async fn upgrade(
    agent: Arc<Agent>,
    name: AppName,
    debug: bool,
    req: Request<Incoming>,
) -> Result<Response<Body>, AgentError> {
    let wants = req
        .headers()
        .get(hyper::header::UPGRADE)
        .and_then(|v| v.to_str().ok());
    if wants != Some(UPGRADE_PROTOCOL) {
        return Err(AgentError::BadRequest(format!(
            "this call needs `Upgrade: {UPGRADE_PROTOCOL}`"
        )));
    }
    let args = if debug {
        Vec::new()
    } else {
        let raw = req
            .headers()
            .get(EXEC_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let bytes = hex::decode(raw)
            .map_err(|_| AgentError::BadRequest(format!("{EXEC_HEADER} header must be hex")))?;
        let r: types::ExecRequest = serde_json::from_slice(&bytes)
            .map_err(|e| AgentError::BadRequest(format!("{EXEC_HEADER} header: {e}")))?;
        if r.args.is_empty() {
            return Err(AgentError::BadRequest("exec needs a command".into()));
        }
        r.args
    };
    // Refuse before upgrading when the app is unknown (or, for exec, not running).
    let state = agent.run_state(&name)?;
    if !debug && !matches!(state, types::RunState::Running { .. }) {
        return Err(AgentError::NotRunning(name.to_string()));
    }
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => return tracing::warn!(app = %name, error = %e, "upgrade failed"),
        };
        let stream = match upgraded.downcast::<TokioIo<UnixStream>>() {
            Ok(parts) => parts.io.into_inner(),
            Err(_) => {
                return tracing::warn!(app = %name, "upgraded connection is not a unix socket")
            }
        };
        if let Err(e) = run_attached(&agent, &name, args, debug, stream).await {
            tracing::warn!(app = %name, error = %e, "exec failed");
        }
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(hyper::header::CONNECTION, "upgrade")
        .header(hyper::header::UPGRADE, UPGRADE_PROTOCOL)
        .body(empty())
        .unwrap_or_else(|_| Response::new(empty())))
}

async fn run_attached(
    agent: &Agent,
    name: &AppName,
    args: Vec<String>,
    debug: bool,
    stream: UnixStream,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let fds = recv_fds(&stream).await?;
    let raw: [RawFd; 3] = [fds[0].as_raw_fd(), fds[1].as_raw_fd(), fds[2].as_raw_fd()];
    let started = if debug {
        agent
            .debug(name, raw)
            .await
            .map(|(id, pid)| (Some(id), pid))
    } else {
        agent.exec(name, args, raw).await.map(|pid| (None, pid))
    };
    drop(fds);
    let mut stream = stream;
    let (debug_id, pid) = match started {
        Ok(v) => v,
        Err(e) => {
            let msg = format!("error {}\n", chain(&e).replace('\n', " "));
            stream.write_all(msg.as_bytes()).await?;
            return Ok(());
        }
    };
    let status = tokio::select! {
        s = agent.wait(pid) => Some(s),
        _ = hangup(&stream) => None,
    };
    let status = match status {
        Some(s) => s,
        None => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            agent.wait(pid).await
        }
    };
    if let Some(id) = debug_id {
        agent.remove_debug(name, &id).await;
    }
    let code = match status {
        ExitStatus::Code(c) => c,
        ExitStatus::Signal(s) => 128 + s,
        ExitStatus::Unknown => 255,
    };
    let _ = stream.write_all(types::exit_line(code).as_bytes()).await;
    Ok(())
}

async fn hangup(stream: &UnixStream) {
    let mut buf = [0u8; 64];
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
    }
}

async fn recv_fds(stream: &UnixStream) -> std::io::Result<Vec<OwnedFd>> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let fut = async {
        loop {
            stream.readable().await?;
            let got = stream.try_io(tokio::io::Interest::READABLE, || {
                let mut byte = [0u8; 1];
                let mut iov = [std::io::IoSliceMut::new(&mut byte)];
                let mut space = nix::cmsg_space!([RawFd; 3]);
                let msg = recvmsg::<()>(
                    stream.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(std::io::Error::from)?;
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(std::io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(v) = c {
                        // SAFETY: SCM_RIGHTS installed these descriptors for us; we own them.
                        fds.extend(v.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                    }
                }
                Ok(fds)
            });
            match got {
                Ok(fds) if fds.len() == 3 => return Ok(fds),
                Ok(_) => {
                    return Err(std::io::Error::other(
                        "the client must send exactly three descriptors",
                    ))
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| std::io::Error::other("the client sent no descriptors"))?
}

// ---- responses and errors ----

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

fn full(b: Vec<u8>) -> Body {
    Full::new(Bytes::from(b))
        .map_err(|never| match never {})
        .boxed()
}

fn json<T: serde::Serialize>(v: &T) -> Response<Body> {
    json_status(StatusCode::OK, v)
}

fn json_status<T: serde::Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(body))
        .unwrap_or_else(|_| Response::new(empty()))
}

/// The error and its sources, joined the way people read them.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

fn is_disk_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(libc::ENOSPC) {
                return true;
            }
        }
        cur = c.source();
    }
    chain(e).contains("No space left on device")
}

/// The one place errors become status codes.
pub fn status_of(e: &AgentError) -> StatusCode {
    if is_disk_full(e) {
        return StatusCode::INSUFFICIENT_STORAGE;
    }
    match e {
        AgentError::NoSuchApp(_) | AgentError::NoSuchRegistry(_) => StatusCode::NOT_FOUND,
        AgentError::AlreadyInstalled(_)
        | AgentError::InstallInProgress(_)
        | AgentError::PortTaken { .. }
        | AgentError::NotRunning(_) => StatusCode::CONFLICT,
        AgentError::Manifest(_) | AgentError::BadRequest(_) => StatusCode::BAD_REQUEST,
        AgentError::Image(ImageError::Registry(r)) => match r {
            RegistryError::NotFound { .. } | RegistryError::NoMatchingPlatform { .. } => {
                StatusCode::NOT_FOUND
            }
            RegistryError::Unauthorized { .. } | RegistryError::CredentialsRequired { .. } => {
                StatusCode::UNAUTHORIZED
            }
            RegistryError::Denied { .. } => StatusCode::FORBIDDEN,
            _ => StatusCode::BAD_GATEWAY,
        },
        AgentError::Image(ImageError::Unpack { .. })
        | AgentError::Image(ImageError::Invalid { .. })
        | AgentError::HookFailed { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        AgentError::Postgres(_) | AgentError::Cache { .. } => StatusCode::SERVICE_UNAVAILABLE,
        AgentError::Shutdown(crate::appliance::ShutdownError::NotAppliance(_)) => {
            StatusCode::CONFLICT
        }
        AgentError::Shutdown(crate::appliance::ShutdownError::Signal { .. }) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        AgentError::Os(o) => {
            use crate::os::OsError as O;
            match o {
                O::NotAppliance | O::NoRepository | O::Busy | O::NoTrustedRoot { .. } => {
                    StatusCode::CONFLICT
                }
                O::Config(_) => StatusCode::BAD_REQUEST,
                O::Repository { .. } | O::Release(_) => StatusCode::BAD_GATEWAY,
                O::DiskTooSmall { .. } => StatusCode::INSUFFICIENT_STORAGE,
                O::Io(_) | O::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            }
        }
        AgentError::Clock(c) => {
            use crate::clock::ClockError as C;
            match c {
                C::NotAppliance => StatusCode::CONFLICT,
                C::Write { .. } => StatusCode::INTERNAL_SERVER_ERROR,
                C::BadServer(_) | C::NoServers | C::TooManyServers | C::Duplicate(_) => {
                    StatusCode::BAD_REQUEST
                }
            }
        }
        AgentError::Image(_)
        | AgentError::Runtime(_)
        | AgentError::Store(_)
        | AgentError::Firewall(_)
        | AgentError::Io { .. }
        | AgentError::SupervisorGone(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

pub fn api_error(e: &AgentError) -> ApiError {
    ApiError {
        status: status_of(e).as_u16(),
        message: chain(e),
        problems: match e {
            AgentError::Manifest(m) => m.problems.clone(),
            _ => Vec::new(),
        },
    }
}

fn error_response(e: &AgentError) -> Response<Body> {
    let status = status_of(e);
    if status.is_server_error() {
        tracing::warn!(error = %chain(e), "api call failed");
    }
    json_status(status, &api_error(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match() {
        assert_eq!(route(&Method::GET, "/v1/apps"), Some((Op::ListApps, None)));
        assert_eq!(route(&Method::GET, "/v1/apps/"), Some((Op::ListApps, None)));
        assert_eq!(
            route(&Method::POST, "/v1/apps/wiki/stop"),
            Some((Op::Stop, Some("wiki")))
        );
        assert_eq!(
            route(&Method::DELETE, "/v1/apps/wiki"),
            Some((Op::Remove, Some("wiki")))
        );
        assert_eq!(route(&Method::PUT, "/v1/apps/wiki"), None);
        assert_eq!(route(&Method::GET, "/v1/apps/wiki/nope"), None);
    }

    #[test]
    fn registry_routes_take_a_host() {
        assert_eq!(
            route(&Method::PUT, "/v1/registries/10.0.2.2:5000"),
            Some((Op::SetRegistry, Some("10.0.2.2:5000")))
        );
        assert_eq!(percent_decoded("%5Bfd00::1%5D:5000"), "[fd00::1]:5000");
        assert_eq!(percent_decoded("nas%3a5000"), "nas:5000");
        assert_eq!(percent_decoded("100%"), "100%");
        assert_eq!(percent_decoded("%zz%4"), "%zz%4");
    }

    #[test]
    fn query_flags() {
        assert!(query_flag("purge_data=true", "purge_data").unwrap());
        assert!(query_flag("a=1&purge_data", "purge_data").unwrap());
        assert!(!query_flag("", "purge_data").unwrap());
        assert!(query_flag("purge_data=maybe", "purge_data").is_err());
    }

    /// docs/api.md lists exactly the routes the agent serves.
    #[test]
    fn api_doc_is_in_sync() {
        let doc = include_str!("../../../docs/api.md");
        let documented: Vec<String> = doc
            .lines()
            .filter_map(|l| l.strip_prefix("### `"))
            .filter_map(|l| l.split('`').next())
            .map(str::to_string)
            .collect();
        let served: Vec<String> = ROUTES
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect();
        for s in &served {
            assert!(documented.contains(s), "docs/api.md does not document {s}");
        }
        for d in &documented {
            assert!(
                served.contains(d),
                "docs/api.md documents {d}, which the agent does not serve"
            );
        }
    }
}
