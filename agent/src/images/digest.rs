//! Content digests (`sha256:<hex>`) as used by OCI images.
//!
//! Only sha256 is accepted: it is the only algorithm registries and image
//! tools use in practice, and accepting others would mean content we cannot
//! verify.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

const SHA256: &str = "sha256";
const SHA256_HEX_LEN: usize = 64;

/// A validated `sha256:<64 lower-case hex digits>` content digest.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("invalid digest {input:?}: expected <algorithm>:<hex>")]
    Format { input: String },
    #[error("unsupported digest algorithm {algorithm}")]
    UnsupportedAlgorithm { algorithm: String },
    #[error("invalid digest {input:?}: expected 64 lower-case hex digits after \"sha256:\"")]
    Encoding { input: String },
}

impl Digest {
    /// The sha256 digest of `bytes`.
    pub fn of_bytes(bytes: &[u8]) -> Digest {
        let mut hasher = Hasher::new();
        hasher.update(bytes);
        hasher.finish()
    }

    /// The algorithm part, always `sha256`.
    pub fn algorithm(&self) -> &str {
        SHA256
    }

    /// The hex-encoded part after `sha256:`.
    pub fn hex(&self) -> &str {
        &self.0[SHA256.len() + 1..]
    }

    /// The full `sha256:<hex>` form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The algorithm grammar of the OCI image spec:
/// `[a-z0-9]+([+._-][a-z0-9]+)*`.
fn valid_algorithm(s: &str) -> bool {
    !s.is_empty()
        && s.split(['+', '.', '_', '-']).all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((algorithm, encoded)) = s.split_once(':') else {
            return Err(DigestError::Format { input: s.into() });
        };
        if !valid_algorithm(algorithm) || encoded.is_empty() {
            return Err(DigestError::Format { input: s.into() });
        }
        if algorithm != SHA256 {
            return Err(DigestError::UnsupportedAlgorithm {
                algorithm: algorithm.into(),
            });
        }
        let lower_hex = encoded
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if encoded.len() != SHA256_HEX_LEN || !lower_hex {
            return Err(DigestError::Encoding { input: s.into() });
        }
        Ok(Digest(s.to_owned()))
    }
}

impl TryFrom<&str> for Digest {
    type Error = DigestError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl TryFrom<String> for Digest {
    type Error = DigestError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.0)
    }
}

/// Incremental sha256 hashing that ends in a [`Digest`].
#[derive(Clone, Default)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn new() -> Hasher {
        Hasher(Sha256::new())
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> Digest {
        Digest(format!("{SHA256}:{}", hex::encode(self.0.finalize())))
    }
}

impl std::io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hasher(sha256)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn check(input: &str, expected: Result<&str, &str>) {
        let got = input.parse::<Digest>();
        match (got, expected) {
            (Ok(d), Ok(want)) => assert_eq!(d.to_string(), want, "input {input:?}"),
            (Err(e), Err(want)) => assert_eq!(e.to_string(), want, "input {input:?}"),
            (got, want) => panic!("input {input:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn parse() {
        let f64 = "f".repeat(64);
        check(EMPTY, Ok(EMPTY));
        check(&format!("sha256:{f64}"), Ok(&format!("sha256:{f64}")));
        check(
            &format!("sha512:{}", "f".repeat(128)),
            Err("unsupported digest algorithm sha512"),
        );
        check(
            &format!("md5:{}", "f".repeat(32)),
            Err("unsupported digest algorithm md5"),
        );
        check("", Err("invalid digest \"\": expected <algorithm>:<hex>"));
        check(
            &f64,
            Err(&format!(
                "invalid digest \"{f64}\": expected <algorithm>:<hex>"
            )),
        );
        check(
            "sha256:",
            Err("invalid digest \"sha256:\": expected <algorithm>:<hex>"),
        );
        check(
            &format!(":{f64}"),
            Err(&format!(
                "invalid digest \":{f64}\": expected <algorithm>:<hex>"
            )),
        );
        check(
            &format!("SHA256:{f64}"),
            Err(&format!(
                "invalid digest \"SHA256:{f64}\": expected <algorithm>:<hex>"
            )),
        );
        check(
            "sha256:abc",
            Err("invalid digest \"sha256:abc\": expected 64 lower-case hex digits after \"sha256:\""),
        );
        let upper = "F".repeat(64);
        check(
            &format!("sha256:{upper}"),
            Err(&format!(
                "invalid digest \"sha256:{upper}\": expected 64 lower-case hex digits after \"sha256:\""
            )),
        );
        let long = "f".repeat(65);
        check(
            &format!("sha256:{long}"),
            Err(&format!(
                "invalid digest \"sha256:{long}\": expected 64 lower-case hex digits after \"sha256:\""
            )),
        );
        let not_hex = format!("{}g", "f".repeat(63));
        check(
            &format!("sha256:{not_hex}"),
            Err(&format!(
                "invalid digest \"sha256:{not_hex}\": expected 64 lower-case hex digits after \"sha256:\""
            )),
        );
    }

    #[test]
    fn accessors() {
        let d: Digest = EMPTY.parse().expect("valid digest");
        assert_eq!(d.algorithm(), "sha256");
        assert_eq!(d.hex(), &EMPTY[7..]);
        assert_eq!(d.as_str(), EMPTY);
    }

    #[test]
    fn hashing() {
        assert_eq!(Digest::of_bytes(b"").to_string(), EMPTY);
        let mut h = Hasher::new();
        h.update(b"hello ");
        h.update(b"world");
        assert_eq!(h.finish(), Digest::of_bytes(b"hello world"));
        assert_eq!(
            Digest::of_bytes(b"hello world").hex(),
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
    }

    #[test]
    fn serde_as_string() {
        let d: Digest = EMPTY.parse().expect("valid digest");
        let json = serde_json::to_string(&d).expect("serialize");
        assert_eq!(json, format!("\"{EMPTY}\""));
        let back: Digest = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, d);
        let err = serde_json::from_str::<Digest>("\"sha512:ff\"").expect_err("sha512");
        assert!(err
            .to_string()
            .contains("unsupported digest algorithm sha512"));
    }
}
