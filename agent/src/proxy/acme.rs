//! Certificates for the owner's public domain through ACME (RFC 8555: Let's Encrypt, or any
//! server the owner names), one per app name `<app>.<domain>`, answered by HTTP-01 or
//! TLS-ALPN-01 through the proxy itself. Account and certificates are kept in
//! `DATA/acme/` (keys 0600); a certificate is renewed when a third of its lifetime is left.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};

/// How the ACME server checks that the device answers for a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Challenge {
    /// A token over plain HTTP on port 80.
    #[serde(rename = "http-01")]
    Http01,
    /// A special certificate over TLS on port 443 (for when port 80 is closed).
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
}

/// The owner's public domain and where certificates for it come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    pub domain: String,
    /// The ACME directory URL; Let's Encrypt's by default.
    #[serde(default = "lets_encrypt")]
    pub directory: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default = "http01")]
    pub challenge: Challenge,
}

fn lets_encrypt() -> String {
    "https://acme-v02.api.letsencrypt.org/directory".into()
}

fn http01() -> Challenge {
    Challenge::Http01
}

impl AcmeConfig {
    /// Refuses what cannot work, naming the problem.
    pub fn check(&self) -> Result<(), String> {
        let d = self.domain.trim_end_matches('.');
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if d.len() > 200 || !d.contains('.') || !d.split('.').all(label_ok) {
            return Err(format!(
                "domain {:?} is not a DNS name like example.org",
                self.domain
            ));
        }
        if d != d.to_ascii_lowercase() {
            return Err(format!("domain {:?}: use lower case", self.domain));
        }
        if d.ends_with(".local") || d.ends_with(".home.arpa") {
            return Err(format!(
                "domain {:?} is a LAN name: the device CA covers those",
                self.domain
            ));
        }
        if !self.directory.starts_with("https://") {
            return Err(format!(
                "directory {:?} must be an https:// URL",
                self.directory
            ));
        }
        if let Some(e) = &self.email {
            if !e.contains('@') || e.contains(char::is_whitespace) {
                return Err(format!("email {e:?} is not an e-mail address"));
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("ACME: {0}")]
    Acme(#[from] instant_acme::Error),
    #[error("ACME: {0}")]
    Refused(String),
    #[error("ACME state in {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ACME: the certificate cannot be used: {0}")]
    Cert(String),
}

/// What the proxy answers ACME servers' challenges with.
#[derive(Default)]
pub struct Challenges {
    http: RwLock<HashMap<String, String>>,
    alpn: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl Challenges {
    /// The key authorization for an HTTP-01 token.
    pub fn http01(&self, token: &str) -> Option<String> {
        self.http
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .cloned()
    }

    /// The TLS-ALPN-01 certificate for a name.
    pub fn tls_alpn01(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.alpn
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }
}

/// A certificate for a public name, and when it expires.
#[derive(Clone)]
pub struct Issued {
    pub key: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Issued {
    /// Due for renewal: less than a third of its lifetime left.
    pub fn due(&self, now: SystemTime) -> bool {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        now + life / 3 >= self.not_after
    }
}

pub struct Acme {
    dir: PathBuf,
    /// An extra root the ACME directory's TLS certificate chains to (test servers).
    root: Option<PathBuf>,
    pub challenges: Arc<Challenges>,
    account: tokio::sync::Mutex<Option<(String, Account)>>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AcmeError + '_ {
    move |source| AcmeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), AcmeError> {
    crate::files::replace(path, data, 0o600).map_err(io(path))
}

/// A certificate chain and key (PEM) as something rustls serves, with its validity.
pub fn load_issued(chain_pem: &str, key_pem: &str) -> Result<Issued, AcmeError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| AcmeError::Cert(format!("chain: {e}")))?;
    let leaf = chain
        .first()
        .ok_or_else(|| AcmeError::Cert("an empty chain".into()))?;
    let (not_before, not_after) = validity(leaf)
        .ok_or_else(|| AcmeError::Cert("the certificate's validity cannot be read".into()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| AcmeError::Cert(format!("key: {e}")))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| AcmeError::Cert(format!("key: {e}")))?;
    Ok(Issued {
        key: Arc::new(CertifiedKey::new(chain, signer)),
        not_before,
        not_after,
    })
}

impl Acme {
    pub fn new(dir: PathBuf, root: Option<PathBuf>) -> Acme {
        Acme {
            dir,
            root,
            challenges: Arc::new(Challenges::default()),
            account: tokio::sync::Mutex::new(None),
        }
    }

    fn cert_paths(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        )
    }

    /// The certificates kept from earlier runs.
    pub fn load(&self) -> HashMap<String, Issued> {
        let mut out = HashMap::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_suffix(".crt") else {
                continue;
            };
            let (crt, key) = self.cert_paths(name);
            let loaded = std::fs::read_to_string(&crt)
                .and_then(|c| Ok((c, std::fs::read_to_string(&key)?)))
                .map_err(|e| AcmeError::Io {
                    path: crt.clone(),
                    source: e,
                })
                .and_then(|(c, k)| load_issued(&c, &k));
            match loaded {
                Ok(i) => {
                    out.insert(name.to_string(), i);
                }
                Err(e) => tracing::warn!(name, error = %e, "ignoring a kept certificate"),
            }
        }
        out
    }

    async fn account(&self, cfg: &AcmeConfig) -> Result<Account, AcmeError> {
        let mut slot = self.account.lock().await;
        if let Some((dir, acc)) = slot.as_ref() {
            if dir == &cfg.directory {
                return Ok(acc.clone());
            }
        }
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let builder = || match &self.root {
            Some(r) => Account::builder_with_root(r),
            None => Account::builder(),
        };
        let file = self.dir.join("account.json");
        let kept: Option<(String, AccountCredentials)> = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let acc = match kept {
            Some((dir, creds)) if dir == cfg.directory => {
                builder()?.from_credentials(creds).await?
            }
            _ => {
                let contact = cfg.email.as_ref().map(|e| format!("mailto:{e}"));
                let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
                let (acc, creds) = builder()?
                    .create(
                        &NewAccount {
                            contact: &contacts,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        cfg.directory.clone(),
                        None,
                    )
                    .await?;
                let text = serde_json::to_vec(&(&cfg.directory, &creds))
                    .map_err(|e| AcmeError::Refused(format!("keep the account: {e}")))?;
                write_private(&file, &text)?;
                tracing::info!(directory = %cfg.directory, "ACME account created");
                acc
            }
        };
        *slot = Some((cfg.directory.clone(), acc.clone()));
        Ok(acc)
    }

    /// Orders a certificate for `name`, answers the challenge, and keeps the result.
    pub async fn obtain(&self, cfg: &AcmeConfig, name: &str) -> Result<Issued, AcmeError> {
        let account = self.account(cfg).await?;
        let ids = [Identifier::Dns(name.to_string())];
        let mut order = account.new_order(&NewOrder::new(&ids)).await?;
        let mut answered = Vec::new();
        let result = async {
            let mut authzs = order.authorizations();
            while let Some(a) = authzs.next().await {
                let mut a = a?;
                match a.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    other => {
                        return Err(AcmeError::Refused(format!(
                            "authorization for {name} is {other:?}"
                        )))
                    }
                }
                let kind = match cfg.challenge {
                    Challenge::Http01 => ChallengeType::Http01,
                    Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
                };
                let wanted = format!("{kind:?}");
                let mut ch = a.challenge(kind).ok_or_else(|| {
                    AcmeError::Refused(format!("the server offers no {wanted} challenge"))
                })?;
                let auth = ch.key_authorization();
                match cfg.challenge {
                    Challenge::Http01 => {
                        let token = ch.token.clone();
                        self.challenges
                            .http
                            .write()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(token.clone(), auth.as_str().to_string());
                        answered.push((Some(token), None));
                    }
                    Challenge::TlsAlpn01 => {
                        let cert = alpn_certificate(name, auth.digest().as_ref())?;
                        self.challenges
                            .alpn
                            .write()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(name.to_string(), cert);
                        answered.push((None, Some(name.to_string())));
                    }
                }
                ch.set_ready().await?;
            }
            let policy = RetryPolicy::new()
                .initial_delay(Duration::from_millis(250))
                .timeout(Duration::from_secs(60));
            let status = order.poll_ready(&policy).await?;
            if status != OrderStatus::Ready {
                return Err(AcmeError::Refused(format!(
                    "the order for {name} ended {status:?}{}",
                    problem_of(&mut order).await
                )));
            }
            let key_pem = order.finalize().await?;
            let chain_pem = order.poll_certificate(&policy).await?;
            Ok((chain_pem, key_pem))
        }
        .await;
        for (token, alpn) in answered {
            if let Some(t) = token {
                self.challenges
                    .http
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&t);
            }
            if let Some(n) = alpn {
                self.challenges
                    .alpn
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&n);
            }
        }
        let (chain_pem, key_pem) = match result {
            Ok(v) => v,
            Err(AcmeError::Acme(e)) => {
                // The server's reason is often in the challenge rather than the response.
                let e = e.to_string();
                let more = problem_of(&mut order).await;
                return Err(AcmeError::Refused(
                    if e.contains(more.trim_start_matches(": ")) {
                        e
                    } else {
                        format!("{e}{more}")
                    },
                ));
            }
            Err(e) => return Err(e),
        };
        let issued = load_issued(&chain_pem, &key_pem)?;
        let (crt, key) = self.cert_paths(name);
        write_private(&key, key_pem.as_bytes())?;
        write_private(&crt, chain_pem.as_bytes())?;
        tracing::info!(name, "certificate obtained through ACME");
        Ok(issued)
    }
}

/// The server's reason an order failed, from its authorizations' challenges.
async fn problem_of(order: &mut instant_acme::Order) -> String {
    let mut reasons = Vec::new();
    let mut authzs = order.authorizations();
    while let Some(Ok(mut a)) = authzs.next().await {
        let _ = a.refresh().await;
        for c in &a.challenges {
            if let Some(e) = &c.error {
                reasons.push(e.to_string());
            }
        }
    }
    if reasons.is_empty() {
        String::new()
    } else {
        format!(": {}", reasons.join("; "))
    }
}

/// The self-signed certificate TLS-ALPN-01 asks for (RFC 8737): the name, and the digest of
/// the key authorization in a critical acmeIdentifier extension.
fn alpn_certificate(name: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, AcmeError> {
    let key = rcgen::KeyPair::generate().map_err(|e| AcmeError::Cert(e.to_string()))?;
    let mut p = rcgen::CertificateParams::new(vec![name.to_string()])
        .map_err(|e| AcmeError::Cert(e.to_string()))?;
    p.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = p
        .self_signed(&key)
        .map_err(|e| AcmeError::Cert(e.to_string()))?;
    let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signer = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| AcmeError::Cert(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signer,
    )))
}

/// One DER element: (tag, contents, rest).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&len0, rest) = rest.split_first()?;
    let (len, rest) = if len0 < 0x80 {
        (len0 as usize, rest)
    } else {
        let n = (len0 & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn der_time(tag: u8, body: &[u8]) -> Option<SystemTime> {
    let s = std::str::from_utf8(body).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 => {
            let y: i64 = s.get(..2)?.parse().ok()?;
            (if y < 50 { 2000 + y } else { 1900 + y }, s.get(2..)?)
        }
        0x18 => (s.get(..4)?.parse().ok()?, s.get(4..)?),
        _ => return None,
    };
    let num = |r: std::ops::Range<usize>| -> Option<i64> { rest.get(r)?.parse().ok() };
    let (mo, d, h, mi, se) = (num(0..2)?, num(2..4)?, num(4..6)?, num(6..8)?, num(8..10)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + se;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// A certificate's notBefore and notAfter.
pub fn validity(cert: &[u8]) -> Option<(SystemTime, SystemTime)> {
    let (_, cert, _) = der(cert)?; // Certificate
    let (_, tbs, _) = der(cert)?; // TBSCertificate
    let mut rest = tbs;
    let (tag, _, r) = der(rest)?;
    if tag == 0xa0 {
        rest = r; // [0] version
    }
    for _ in 0..3 {
        rest = der(rest)?.2; // serial, signature, issuer
    }
    let (_, validity, _) = der(rest)?;
    let (t1, b1, r) = der(validity)?;
    let (t2, b2, _) = der(r)?;
    Some((der_time(t1, b1)?, der_time(t2, b2)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_is_read_from_certificates() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["a.example.org".into()]).unwrap();
        p.not_before = rcgen::date_time_ymd(2026, 1, 2);
        p.not_after = rcgen::date_time_ymd(2051, 3, 4); // GeneralizedTime after 2049
        let cert = p.self_signed(&key).unwrap();
        let (from, until) = validity(cert.der()).unwrap();
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs(from), 1_767_312_000); // 2026-01-02T00:00:00Z
        assert_eq!(secs(until), 2_561_500_800); // 2051-03-04T00:00:00Z
        assert_eq!(validity(b"\x30\x05junk"), None);
    }

    #[test]
    fn issued_certificates_load_and_know_when_to_renew() {
        let key = rcgen::KeyPair::generate().unwrap();
        let p = rcgen::CertificateParams::new(vec!["a.example.org".into()]).unwrap();
        let cert = p.self_signed(&key).unwrap();
        let issued = load_issued(&cert.pem(), &key.serialize_pem()).unwrap();
        assert!(!issued.due(issued.not_before));
        let life = issued.not_after.duration_since(issued.not_before).unwrap();
        assert!(issued.due(issued.not_before + life * 2 / 3 + Duration::from_secs(1)));
        assert!(load_issued("nonsense", &key.serialize_pem()).is_err());
    }

    #[test]
    fn configs_are_checked() {
        let ok = AcmeConfig {
            domain: "example.org".into(),
            directory: lets_encrypt(),
            email: Some("me@example.org".into()),
            challenge: Challenge::Http01,
        };
        assert_eq!(ok.check(), Ok(()));
        for (domain, dir, needle) in [
            ("example", "https://x/", "not a DNS name"),
            ("bad_name.org", "https://x/", "not a DNS name"),
            ("Example.org", "https://x/", "lower case"),
            ("myhome.local", "https://x/", "LAN name"),
            ("example.org", "http://x/", "https://"),
        ] {
            let c = AcmeConfig {
                domain: domain.into(),
                directory: dir.into(),
                ..ok.clone()
            };
            let e = c.check().unwrap_err();
            assert!(e.contains(needle), "{domain}: {e}");
        }
        let parsed: AcmeConfig = serde_json::from_str(r#"{"domain": "example.org"}"#).unwrap();
        assert_eq!(parsed.challenge, Challenge::Http01);
        assert!(serde_json::from_str::<AcmeConfig>(r#"{"domain": "x.org", "bogus": 1}"#).is_err());
    }
}
