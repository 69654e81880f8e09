//! The device-local certificate authority. Made at first start, its key kept in the data
//! directory (0600, in a 0700 directory), it issues the leaf certificates for the LAN names.
//! Owners install its certificate on their phones and laptops, and every app gets it in its
//! trust store.
//!
//! It is name-constrained to `local` and `home.arpa`: whoever trusts it trusts it for the LAN
//! names and nothing else, so even a stolen key cannot vouch for a bank's site.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the device CA in {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the device CA: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("the device CA's key cannot be used for TLS: {0}")]
    Key(rustls::Error),
}

/// How long a leaf certificate is valid; it is issued again when a third of that is left.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(180 * 24 * 3600);
const CA_LIFETIME: Duration = Duration::from_secs(20 * 365 * 24 * 3600);

pub struct DeviceCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
}

/// The CA's parameters. Deterministic but for its validity, so that the issuer reconstructed
/// at every start matches the certificate made at the first (same name, same key).
fn ca_params(device_id: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Homeport device CA");
    dn.push(DnType::OrganizationName, "Homeport");
    dn.push(
        DnType::OrganizationalUnitName,
        format!("device {device_id}"),
    );
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![
            GeneralSubtree::DnsName("local".into()),
            GeneralSubtree::DnsName("home.arpa".into()),
        ],
        excluded_subtrees: Vec::new(),
    });
    p
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn time(t: SystemTime) -> time::OffsetDateTime {
    t.into()
}

impl DeviceCa {
    /// Loads the CA from `dir`, making it first if there is none. `device_id` names the
    /// device in the CA's subject, so two devices' CAs are told apart on a phone.
    pub fn load_or_create(dir: &Path, device_id: &str) -> Result<DeviceCa, CaError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        let (key_path, cert_path) = (dir.join("ca.key"), dir.join("ca.crt"));
        let params = ca_params(device_id);
        if !cert_path.exists() {
            // The key first: a crash between the two leaves a key without a certificate,
            // replaced on the next start; never a certificate without its key.
            let key = KeyPair::generate()?;
            let mut p = params.clone();
            let now = SystemTime::now();
            p.not_before = time(now - Duration::from_secs(24 * 3600));
            p.not_after = time(now + CA_LIFETIME);
            let cert = p.self_signed(&key)?;
            crate::files::replace(&key_path, key.serialize_pem().as_bytes(), 0o600)
                .map_err(io(&key_path))?;
            crate::files::replace(&cert_path, cert.pem().as_bytes(), 0o644)
                .map_err(io(&cert_path))?;
            tracing::info!(path = %cert_path.display(), "device CA created");
        }
        let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let cert_der = pem_to_der(&cert_pem).ok_or_else(|| CaError::Io {
            path: cert_path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not a PEM certificate"),
        })?;
        Ok(DeviceCa {
            issuer: Issuer::new(params, key),
            cert_pem,
            cert_der,
        })
    }

    /// The CA certificate, PEM: what owners install and apps trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A new key and a certificate for `names`, with the CA certificate as its chain.
    pub fn issue(&self, names: &[String]) -> Result<Arc<CertifiedKey>, CaError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        p.not_before = time(now - Duration::from_secs(3600));
        p.not_after = time(now + LEAF_LIFETIME);
        let cert = p.signed_by(&key, &self.issuer)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer = rustls::crypto::ring::sign::any_supported_type(&der).map_err(CaError::Key)?;
        Ok(Arc::new(CertifiedKey::new(
            vec![cert.der().clone(), self.cert_der.clone()],
            signer,
        )))
    }
}

/// The DER of the first certificate in a PEM text.
fn pem_to_der(pem: &str) -> Option<CertificateDer<'static>> {
    use base64_decode as b64;
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    b64(&body).map(CertificateDer::from)
}

/// Standard base64 (as PEM uses), no line breaks.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_values() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGk=").unwrap(), b"hi");
        assert_eq!(base64_decode("YWJj").unwrap(), b"abc");
        assert_eq!(base64_decode("a*b="), None);
    }

    #[test]
    fn ca_is_made_once_kept_private_and_issues_chains() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let ca = DeviceCa::load_or_create(&ca_dir, "123456789a").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ca_dir.join("ca.key")), 0o600);
        assert_eq!(mode(&ca_dir), 0o700);
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        // A second start loads the same CA.
        let again = DeviceCa::load_or_create(&ca_dir, "123456789a").unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        let leaf = again.issue(&["wiki-homeport.local".into()]).unwrap();
        assert_eq!(leaf.cert.len(), 2, "leaf and CA");
        assert_eq!(leaf.cert[1], ca.cert_der);
    }
}
