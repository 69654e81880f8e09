//! A client of the agent's API over its unix socket; used by the CLI and the tests.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use super::types::{
    ApiError, AppSummary, ExecRequest, InstallLine, ManifestBody, Progress, RegistryInfo,
    RegistrySettings, UpdateBody,
};
use super::{EXEC_HEADER, UPGRADE_PROTOCOL};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {socket} (is homeportd running?)")]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the agent")]
    Http(#[from] hyper::Error),
    #[error("{}", display_api(.0))]
    Api(ApiError),
    #[error("the agent answered something unexpected: {0}")]
    Decode(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// `/v1/registries/<host>`, with an IPv6 literal's brackets escaped.
fn registry_path(host: &str) -> String {
    format!(
        "/v1/registries/{}",
        host.replace('[', "%5B").replace(']', "%5D")
    )
}

fn display_api(e: &ApiError) -> String {
    let mut s = e.message.clone();
    if !e.problems.is_empty() {
        s = "invalid manifest".into();
        for p in &e.problems {
            s.push_str(&format!("\n  {p}"));
        }
    }
    s
}

impl ClientError {
    /// The HTTP status when the agent answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api(e) => Some(e.status),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn connect(&self) -> Result<UnixStream> {
        UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                socket: self.socket.clone(),
                source,
            })
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Result<Response<Incoming>> {
        let io = TokioIo::new(self.connect().await?);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender.send_request(req).await?)
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response<Incoming>> {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "homeport")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        let resp = self.send(req).await?;
        if resp.status().is_client_error() || resp.status().is_server_error() {
            return Err(error_of(resp).await);
        }
        Ok(resp)
    }

    /// A body as text (for routes that do not answer JSON).
    pub async fn text(&self, path: &str) -> Result<String> {
        let resp = self.request(Method::GET, path, None).await?;
        let body = resp.into_body().collect().await?.to_bytes();
        String::from_utf8(body.to_vec()).map_err(|e| ClientError::Decode(e.to_string()))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        decode(self.request(Method::GET, path, None).await?).await
    }

    pub async fn post<T: DeserializeOwned, B: Serialize>(&self, path: &str, body: &B) -> Result<T> {
        let b = serde_json::to_vec(body).map_err(|e| ClientError::Decode(e.to_string()))?;
        decode(self.request(Method::POST, path, Some(b)).await?).await
    }

    pub async fn put<T: DeserializeOwned, B: Serialize>(&self, path: &str, body: &B) -> Result<T> {
        let b = serde_json::to_vec(body).map_err(|e| ClientError::Decode(e.to_string()))?;
        decode(self.request(Method::PUT, path, Some(b)).await?).await
    }

    pub async fn delete(&self, path: &str) -> Result<()> {
        self.request(Method::DELETE, path, None).await?;
        Ok(())
    }

    /// Asks the appliance to power off or reboot; `Ok` once the agent accepted (it goes
    /// down a moment later). Refused (409) outside the appliance.
    pub async fn shutdown(&self, kind: crate::appliance::ShutdownKind) -> Result<()> {
        let path = format!("/v1/system/{}", kind.name());
        self.request(Method::POST, &path, None).await?;
        Ok(())
    }

    /// The registries the agent has settings for.
    pub async fn registries(&self) -> Result<Vec<RegistryInfo>> {
        self.get("/v1/registries").await
    }

    /// Sets the owner's settings for a registry (`host[:port]`).
    pub async fn set_registry(
        &self,
        host: &str,
        settings: &RegistrySettings,
    ) -> Result<RegistryInfo> {
        self.put(&registry_path(host), settings).await
    }

    /// Removes the owner's settings for a registry.
    pub async fn remove_registry(&self, host: &str) -> Result<()> {
        self.delete(&registry_path(host)).await
    }

    /// Installs an app, calling `progress` for each pull event.
    pub async fn install(
        &self,
        manifest: &str,
        progress: impl FnMut(&Progress),
    ) -> Result<AppSummary> {
        let body = serde_json::to_vec(&ManifestBody {
            manifest: manifest.to_string(),
        })
        .map_err(|e| ClientError::Decode(e.to_string()))?;
        self.streamed("/v1/apps", body, progress).await
    }

    /// Moves an app to a new digest (its tag resolved afresh, or `manifest`).
    pub async fn update(
        &self,
        app: &str,
        manifest: Option<&str>,
        progress: impl FnMut(&Progress),
    ) -> Result<AppSummary> {
        let body = serde_json::to_vec(&UpdateBody {
            manifest: manifest.map(str::to_string),
        })
        .map_err(|e| ClientError::Decode(e.to_string()))?;
        self.streamed(&format!("/v1/apps/{app}/update"), body, progress)
            .await
    }

    async fn streamed(
        &self,
        path: &str,
        body: Vec<u8>,
        mut progress: impl FnMut(&Progress),
    ) -> Result<AppSummary> {
        let mut resp = self.request(Method::POST, path, Some(body)).await?;
        let mut buf = Vec::new();
        while let Some(frame) = resp.body_mut().frame().await {
            if let Ok(data) = frame?.into_data() {
                buf.extend_from_slice(&data);
            }
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                match serde_json::from_slice::<InstallLine>(&line) {
                    Ok(InstallLine::Progress(p)) => progress(&p),
                    Ok(InstallLine::Done(s)) => return Ok(s),
                    Ok(InstallLine::Error(e)) => return Err(ClientError::Api(e)),
                    Err(e) => return Err(ClientError::Decode(e.to_string())),
                }
            }
        }
        Err(ClientError::Decode(
            "the answer stream ended without a result".into(),
        ))
    }

    /// Streams an app's log into `out` (until the agent ends it, with `follow`).
    pub async fn logs(
        &self,
        app: &str,
        tail: Option<usize>,
        follow: bool,
        mut out: impl FnMut(&[u8]),
    ) -> Result<()> {
        let tail = tail.map_or("all".to_string(), |n| n.to_string());
        let path = format!("/v1/apps/{app}/logs?tail={tail}&follow={follow}");
        let mut resp = self.request(Method::GET, &path, None).await?;
        while let Some(frame) = resp.body_mut().frame().await {
            if let Ok(data) = frame?.into_data() {
                out(&data);
            }
        }
        Ok(())
    }

    /// Runs a command in an app (`debug`: a shell in a debug container) on the given stdin,
    /// stdout and stderr; returns its exit code.
    pub async fn exec(
        &self,
        app: &str,
        args: &[String],
        fds: [RawFd; 3],
        debug: bool,
    ) -> Result<i32> {
        use tokio::io::AsyncReadExt;
        let (path, header) = if debug {
            (format!("/v1/apps/{app}/debug"), String::new())
        } else {
            let json = serde_json::to_vec(&ExecRequest {
                args: args.to_vec(),
            })
            .map_err(|e| ClientError::Decode(e.to_string()))?;
            (format!("/v1/apps/{app}/exec"), hex::encode(json))
        };
        let req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header("host", "homeport")
            .header(hyper::header::CONNECTION, "upgrade")
            .header(hyper::header::UPGRADE, UPGRADE_PROTOCOL)
            .header(EXEC_HEADER, header)
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        let resp = self.send(req).await?;
        if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
            return Err(error_of(resp).await);
        }
        let upgraded = hyper::upgrade::on(resp).await?;
        let parts = upgraded
            .downcast::<TokioIo<UnixStream>>()
            .map_err(|_| ClientError::Decode("upgraded connection is not a unix socket".into()))?;
        let mut stream = parts.io.into_inner();
        send_fds(&stream, fds).await?;
        let mut answer = String::new();
        let mut buf = [0u8; 256];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            answer.push_str(&String::from_utf8_lossy(&buf[..n]));
            if answer.ends_with('\n') {
                break;
            }
        }
        let answer = answer.trim_end();
        if let Some(code) = answer.strip_prefix("exit ") {
            return code
                .parse()
                .map_err(|_| ClientError::Decode(answer.to_string()));
        }
        if let Some(msg) = answer.strip_prefix("error ") {
            return Err(ClientError::Api(ApiError {
                status: 500,
                message: msg.to_string(),
                problems: Vec::new(),
            }));
        }
        Err(ClientError::Decode(format!(
            "the agent ended the session without an exit code: {answer:?}"
        )))
    }
}

async fn send_fds(stream: &UnixStream, fds: [RawFd; 3]) -> Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    loop {
        stream.writable().await?;
        let r = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let cmsg = [ControlMessage::ScmRights(&fds)];
            sendmsg::<()>(
                stream.as_raw_fd(),
                &[std::io::IoSlice::new(b"f")],
                &cmsg,
                MsgFlags::empty(),
                None,
            )
            .map_err(std::io::Error::from)
        });
        match r {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

async fn decode<T: DeserializeOwned>(resp: Response<Incoming>) -> Result<T> {
    let body = resp.into_body().collect().await?.to_bytes();
    let body = if body.is_empty() {
        Bytes::from_static(b"null")
    } else {
        body
    };
    serde_json::from_slice(&body).map_err(|e| ClientError::Decode(e.to_string()))
}

async fn error_of(resp: Response<Incoming>) -> ClientError {
    let status = resp.status().as_u16();
    match resp.into_body().collect().await {
        Ok(b) => match serde_json::from_slice::<ApiError>(&b.to_bytes()) {
            Ok(e) => ClientError::Api(e),
            Err(_) => ClientError::Api(ApiError {
                status,
                message: format!("HTTP {status}"),
                problems: Vec::new(),
            }),
        },
        Err(e) => ClientError::Http(e),
    }
}
