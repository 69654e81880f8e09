//! A real `docker-registry` (distribution 2.8) on 127.0.0.1, storage in a temp dir.

use crate::run;
use crate::token::{self, TokenServer};
use anyhow::{bail, Context, Result};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a registry may take to answer `GET /v2/`.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Attempts when another process grabs the port we picked.
const PORT_ATTEMPTS: usize = 5;

enum Auth {
    Anonymous,
    Basic,
    Token,
}

/// A running `docker-registry serve`; killed, reaped and its storage removed on drop.
pub struct Registry {
    child: Child,
    host: String,
    credentials: Option<(String, String)>,
    // Dropped after the registry process is killed (see `Drop`), before `dir`.
    token_server: Option<TokenServer>,
    dir: tempfile::TempDir,
}

impl Registry {
    /// An anonymous registry: anyone may push and pull.
    pub fn start() -> Result<Registry> {
        Self::launch(Auth::Anonymous, None)
    }

    /// A registry with htpasswd (bcrypt) auth: answers 401 with `Www-Authenticate: Basic`.
    pub fn start_basic_auth(user: &str, pass: &str) -> Result<Registry> {
        Self::launch(Auth::Basic, Some((user.to_owned(), pass.to_owned())))
    }

    /// A registry with `auth: token:` and our own token server, which requires `user`/`pass`
    /// (HTTP Basic) and grants pull and push on any repository.
    pub fn start_token_auth(user: &str, pass: &str) -> Result<Registry> {
        Self::launch(Auth::Token, Some((user.to_owned(), pass.to_owned())))
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        self.host.clone()
    }

    /// The user and password the registry requires, if any.
    pub fn credentials(&self) -> Option<(String, String)> {
        self.credentials.clone()
    }

    /// `storage.filesystem.rootdirectory`
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the registry keeps the content of blob `sha256:HEX`.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .with_context(|| format!("not a sha256 digest: {digest}"))?;
        Ok(self
            .storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data"))
    }

    /// The registry's log (stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// The token server's URL, for a token-auth registry.
    pub fn token_realm(&self) -> Option<String> {
        self.token_server.as_ref().map(TokenServer::realm)
    }

    /// Requests the token server has answered, for a token-auth registry.
    pub fn token_requests(&self) -> usize {
        self.token_server.as_ref().map_or(0, TokenServer::requests)
    }

    fn launch(auth: Auth, credentials: Option<(String, String)>) -> Result<Registry> {
        let dir = tempfile::Builder::new()
            .prefix("homeport-registry-")
            .tempdir()
            .context("creating the registry's temp dir")?;
        let storage = dir.path().join("storage");
        fs::create_dir(&storage)?;
        let log_path = dir.path().join("registry.log");

        let mut token_server = None;
        let auth_config = match (&auth, &credentials) {
            (Auth::Anonymous, _) => None,
            (Auth::Basic, Some((user, pass))) => {
                let line = run(Command::new("htpasswd").args(["-Bbn", user, pass]))
                    .context("hashing the password with htpasswd")?;
                let path = dir.path().join("htpasswd");
                fs::write(&path, line)?;
                Some(serde_json::json!({
                    "htpasswd": {"realm": "homeport-test-registry", "path": path}
                }))
            }
            (Auth::Token, Some((user, pass))) => {
                let (server, cert) = TokenServer::start(dir.path(), user, pass)?;
                let config = serde_json::json!({"token": {
                    "realm": server.realm(),
                    "service": token::SERVICE,
                    "issuer": token::ISSUER,
                    "rootcertbundle": cert,
                }});
                token_server = Some(server);
                Some(config)
            }
            (_, None) => bail!("credentials missing"),
        };

        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let mut config = serde_json::json!({
                "version": "0.1",
                "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": false}},
                "storage": {
                    "filesystem": {"rootdirectory": storage},
                    "delete": {"enabled": true},
                    "redirect": {"disable": true},
                    "maintenance": {"uploadpurging": {"enabled": false}},
                },
                "http": {
                    "addr": addr.to_string(),
                    "secret": crate::unique(),
                    "headers": {"X-Content-Type-Options": ["nosniff"]},
                },
                "health": {"storagedriver": {"enabled": false}},
            });
            if let Some(auth_config) = &auth_config {
                config["auth"] = auth_config.clone();
            }
            // JSON is YAML: no quoting surprises.
            let config_path = dir.path().join("config.yml");
            fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;

            let mut log = File::options().create(true).append(true).open(&log_path)?;
            writeln!(log, "--- testkit: starting docker-registry on {addr}")?;
            let mut cmd = Command::new("docker-registry");
            cmd.arg("serve")
                .arg(&config_path)
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            // The registry lets REGISTRY_* variables override its configuration.
            for (name, _) in std::env::vars_os() {
                if name.to_string_lossy().starts_with("REGISTRY_") {
                    cmd.env_remove(name);
                }
            }
            let mut child = cmd.spawn().context("cannot run docker-registry")?;
            match wait_ready(&mut child, addr) {
                Ok(()) => {
                    return Ok(Registry {
                        child,
                        host: addr.to_string(),
                        credentials,
                        token_server,
                        dir,
                    })
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = tail(&log_path, 4096);
                    let retry = log.contains("address already in use");
                    last_error = Some(e.context(format!("registry log:\n{log}")));
                    if !retry {
                        break;
                    }
                }
            }
        }
        Err(last_error
            .unwrap_or_else(|| anyhow::anyhow!("no attempt made"))
            .context("starting docker-registry"))
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
        // Then `token_server` stops and `dir` is removed, in field order.
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("host", &self.host)
            .field("pid", &self.child.id())
            .field("dir", &self.dir.path())
            .field("token_realm", &self.token_realm())
            .finish()
    }
}

fn wait_ready(child: &mut Child, addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("docker-registry exited early ({status})");
        }
        match http_status(addr, "/v2/") {
            Ok(200 | 401) => return Ok(()),
            Ok(other) => bail!("GET /v2/ answered {other}"),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.context("docker-registry did not answer in time")),
        }
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub(crate) fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Status code of a plain HTTP/1.0 GET.
fn http_status(addr: SocketAddr, path: &str) -> Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = Vec::new();
    let mut buf = [0u8; 256];
    while !response.contains(&b'\n') {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&response);
    line.split(' ')
        .nth(1)
        .and_then(|code| code.trim().parse().ok())
        .with_context(|| format!("bad HTTP response: {line:?}"))
}

/// The last `max` bytes of a file, for error messages.
fn tail(path: &Path, max: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::from("(no log)");
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut text = Vec::new();
    let _ = file.read_to_end(&mut text);
    String::from_utf8_lossy(&text).into_owned()
}
