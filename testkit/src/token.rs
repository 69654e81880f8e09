//! A tiny Docker token server (distribution's `auth: token:` scheme) on loopback.
//!
//! It checks HTTP Basic credentials and answers `{"token": JWT, "access_token": JWT}`. The JWT
//! is RS256-signed with a key made by the `openssl` CLI; its header carries the self-signed
//! certificate in `x5c`, and the registry trusts that certificate through `rootcertbundle`.
//! distribution 2.8 checks: `iss` among trusted issuers, `aud` equal to its service, `exp`/`nbf`
//! within 60 s of leeway, the `x5c` chain up to a root of the bundle, the signature with `alg`,
//! and then that `access` grants the requested actions on the repository.

use crate::{base64_decode, base64_std, base64_url, run, unique};
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Value of the registry's `auth.token.service` and of the tokens' `aud`.
pub(crate) const SERVICE: &str = "homeport-test-registry";
/// Value of the registry's `auth.token.issuer` and of the tokens' `iss`.
pub(crate) const ISSUER: &str = "homeport-testkit-token-server";
/// Lifetime of a token, in seconds.
const TOKEN_LIFETIME: u64 = 300;

struct Config {
    user: String,
    pass: String,
    key_pem: PathBuf,
    cert_der_b64: String,
    requests: AtomicUsize,
}

/// The running token server; stops on drop.
pub(crate) struct TokenServer {
    addr: SocketAddr,
    config: Arc<Config>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TokenServer {
    /// Makes a key and certificate in `dir` and starts serving. Returns the server and the PEM
    /// certificate to put in the registry's `rootcertbundle`.
    pub(crate) fn start(dir: &Path, user: &str, pass: &str) -> Result<(Self, PathBuf)> {
        let key_pem = dir.join("token-key.pem");
        let cert_pem = dir.join("token-cert.pem");
        run(Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
            ])
            .arg("-subj")
            .arg(format!("/CN={ISSUER}"))
            .arg("-keyout")
            .arg(&key_pem)
            .arg("-out")
            .arg(&cert_pem))
        .context("making the token signing certificate")?;
        let der = run(Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert_pem))?;

        let listener = TcpListener::bind("127.0.0.1:0").context("binding the token server")?;
        let addr = listener.local_addr()?;
        let config = Arc::new(Config {
            user: user.to_owned(),
            pass: pass.to_owned(),
            key_pem,
            cert_der_b64: base64_std(&der),
            requests: AtomicUsize::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let config = Arc::clone(&config);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("testkit-token-server".into())
                .spawn(move || accept_loop(listener, config, stop))?
        };
        Ok((
            TokenServer {
                addr,
                config,
                stop,
                thread: Some(thread),
            },
            cert_pem,
        ))
    }

    /// `http://127.0.0.1:PORT/token`
    pub(crate) fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// Token requests answered so far (successful or not).
    pub(crate) fn requests(&self) -> usize {
        self.config.requests.load(Ordering::Relaxed)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept().
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: TcpListener, config: Arc<Config>, stop: Arc<AtomicBool>) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        let config = Arc::clone(&config);
        // One thread per connection: an idle keep-alive connection must not block others.
        let _ = std::thread::Builder::new()
            .name("testkit-token-conn".into())
            .spawn(move || {
                let _ = serve_connection(stream, &config);
            });
    }
}

struct Request {
    method: String,
    target: String,
    authorization: Option<String>,
    body: Vec<u8>,
}

fn read_request(stream: &mut TcpStream) -> Result<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        if buf.len() > 64 * 1024 {
            bail!("request head too large");
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed before the request head ended");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default().to_owned();
    let target = request_line.next().unwrap_or_default().to_owned();
    let mut authorization = None;
    let mut content_length = 0usize;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("authorization") {
            authorization = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("content-length") {
            content_length = value.parse().context("bad content-length")?;
        }
    }
    if content_length > 64 * 1024 {
        bail!("request body too large");
    }
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < content_length {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed before the body ended");
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(content_length);
    Ok(Request {
        method,
        target,
        authorization,
        body,
    })
}

fn serve_connection(mut stream: TcpStream, config: &Config) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let request = read_request(&mut stream)?;
    config.requests.fetch_add(1, Ordering::Relaxed);
    let (status, extra_headers, body) = match answer(&request, config) {
        Ok(answer) => answer,
        Err(e) => (
            "500 Internal Server Error",
            String::new(),
            serde_json::json!({"errors": [{"code": "UNKNOWN", "message": format!("{e:#}")}]})
                .to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n{extra_headers}\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.flush()?;
    Ok(())
}

type Answer = (&'static str, String, String);

fn answer(request: &Request, config: &Config) -> Result<Answer> {
    let (path, query) = request
        .target
        .split_once('?')
        .unwrap_or((request.target.as_str(), ""));
    if path != "/token" {
        return Ok(("404 Not Found", String::new(), "{}".into()));
    }
    let mut params = parse_form(query);
    // OAuth2 password grant (POST form), in case a client prefers it.
    let mut form_credentials = None;
    if request.method == "POST" {
        let form = parse_form(&String::from_utf8_lossy(&request.body));
        let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        if get("grant_type").as_deref() == Some("password") {
            form_credentials = get("username").zip(get("password"));
        }
        params.extend(form);
    }
    let credentials = form_credentials.or_else(|| {
        let value = request.authorization.as_deref()?;
        let (scheme, encoded) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = String::from_utf8(base64_decode(encoded.trim())?).ok()?;
        let (user, pass) = decoded.split_once(':')?;
        Some((user.to_owned(), pass.to_owned()))
    });
    match credentials {
        Some((user, pass)) if user == config.user && pass == config.pass => {}
        _ => {
            let body = serde_json::json!({"errors": [{
                "code": "UNAUTHORIZED",
                "message": "authentication required: wrong or missing credentials",
            }]});
            return Ok((
                "401 Unauthorized",
                "WWW-Authenticate: Basic realm=\"homeport-testkit-token\"\r\n".into(),
                body.to_string(),
            ));
        }
    }

    let access: Vec<_> = params
        .iter()
        .filter(|(name, _)| name == "scope")
        .flat_map(|(_, scope)| scope.split(' ').filter_map(grant).collect::<Vec<_>>())
        .collect();
    let token = sign_token(config, &access)?;
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": TOKEN_LIFETIME,
    });
    Ok(("200 OK", String::new(), body.to_string()))
}

/// What we grant for one requested scope `type:name:actions` (name may contain `:`).
fn grant(scope: &str) -> Option<serde_json::Value> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    let allowed: &[&str] = match kind {
        "repository" => &["pull", "push"],
        "registry" if name == "catalog" => &["*"],
        _ => return None,
    };
    let actions: Vec<&str> = actions.split(',').filter(|a| allowed.contains(a)).collect();
    Some(serde_json::json!({"type": kind, "name": name, "actions": actions}))
}

fn sign_token(config: &Config, access: &[serde_json::Value]) -> Result<String> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let header = serde_json::json!({
        "typ": "JWT",
        "alg": "RS256",
        "x5c": [config.cert_der_b64],
    });
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": config.user,
        "aud": SERVICE,
        "exp": now + TOKEN_LIFETIME,
        "nbf": now,
        "iat": now,
        "jti": unique(),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        base64_url(header.to_string().as_bytes()),
        base64_url(claims.to_string().as_bytes())
    );
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(&config.key_pem)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run openssl dgst")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(signing_input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() || out.stdout.is_empty() {
        bail!(
            "openssl dgst -sign failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(format!("{signing_input}.{}", base64_url(&out.stdout)))
}

/// Parses `a=b&c=d` with percent-decoding and `+` as space.
fn parse_form(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(b) => {
                    out.push(b);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding() {
        assert_eq!(
            parse_form("scope=repository%3Afoo%2Fbar%3Apull%2Cpush&service=a+b&x"),
            vec![
                ("scope".into(), "repository:foo/bar:pull,push".into()),
                ("service".into(), "a b".into()),
                ("x".into(), String::new()),
            ]
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn grants() {
        let check = |scope: &str, expected: Option<serde_json::Value>| {
            assert_eq!(grant(scope), expected, "{scope}");
        };
        check(
            "repository:a/b:pull,push",
            Some(
                serde_json::json!({"type": "repository", "name": "a/b", "actions": ["pull", "push"]}),
            ),
        );
        check(
            "repository:127.0.0.1:5000/x:pull,delete",
            Some(
                serde_json::json!({"type": "repository", "name": "127.0.0.1:5000/x", "actions": ["pull"]}),
            ),
        );
        check(
            "registry:catalog:*",
            Some(serde_json::json!({"type": "registry", "name": "catalog", "actions": ["*"]})),
        );
        check("bogus", None);
    }
}
