//! Image references (`redis`, `ghcr.io/user/app:1.2`, `name@sha256:…`),
//! parsed and normalised the way Docker does it (distribution/reference's
//! `ParseNormalizedNamed`).
//!
//! Grammar, from distribution/reference:
//! ```text
//! reference  := name [ ":" tag ] [ "@" digest ]
//! name       := [domain "/"] path-component ["/" path-component]*
//! domain     := (domain-name | "[" ipv6 "]") [":" port]
//! path-component := [a-z0-9]+ (([._] | "__" | "-"+) [a-z0-9]+)*
//! tag        := [\w][\w.-]{0,127}
//! ```
//! The first component is a registry host iff it contains `.` or `:` or is
//! `localhost`; otherwise the image is on Docker Hub, and a single-component
//! name gets the `library/` prefix. Without tag and digest the tag is `latest`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::digest::{Digest, DigestError};

const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_LEGACY: &str = "index.docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";
const DEFAULT_TAG: &str = "latest";
const NAME_TOTAL_LENGTH_MAX: usize = 255;
const TAG_LENGTH_MAX: usize = 128;

/// A fully normalised image reference: registry, repository, and a tag, a
/// digest or both.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageRef {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("invalid image reference {input:?}: empty")]
    Empty { input: String },
    #[error("invalid image reference {input:?}: missing repository name")]
    MissingName { input: String },
    #[error("invalid image reference {input:?}: repository name must be lower-case")]
    Uppercase { input: String },
    #[error("invalid image reference {input:?}: invalid registry host {host:?}")]
    InvalidHost { input: String, host: String },
    #[error("invalid image reference {input:?}: invalid path component {component:?}")]
    InvalidComponent { input: String, component: String },
    #[error("invalid image reference {input:?}: invalid tag {tag:?}")]
    InvalidTag { input: String, tag: String },
    #[error("invalid image reference {input:?}")]
    InvalidDigest {
        input: String,
        #[source]
        source: DigestError,
    },
    #[error(
        "invalid image reference {input:?}: name is longer than {NAME_TOTAL_LENGTH_MAX} characters"
    )]
    TooLong { input: String },
    #[error("invalid image reference {input:?}: a 64-digit hexadecimal string is an image id, not a reference")]
    ImageId { input: String },
}

impl ImageRef {
    /// The normalised registry host, e.g. `docker.io` or `127.0.0.1:5000`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path, e.g. `library/redis`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// The host to talk the distribution API to (`docker.io` is served by
    /// `registry-1.docker.io`).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// What to ask the registry for: the digest if there is one, else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            // Parsing always sets a tag or a digest.
            (None, None) => DEFAULT_TAG.to_owned(),
        }
    }

    /// The pinned form: same name and tag, plus `digest`.
    pub fn with_digest(&self, digest: Digest) -> ImageRef {
        ImageRef {
            digest: Some(digest),
            ..self.clone()
        }
    }
}

/// `[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*`
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    loop {
        // One or more alphanumerics.
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        // A separator: ".", "_", "__" or one or more "-".
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

/// `[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]`
fn valid_domain_component(c: &str) -> bool {
    let b = c.as_bytes();
    match (b.first(), b.last()) {
        (Some(first), Some(last)) => {
            first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && b.iter().all(|x| x.is_ascii_alphanumeric() || *x == b'-')
        }
        _ => false,
    }
}

/// `(domain-name | "[" [a-fA-F0-9:]+ "]") [":" [0-9]+]`
fn valid_host(host: &str) -> bool {
    let (name, port) = if host.starts_with('[') {
        match host.find(']') {
            Some(end) => host.split_at(end + 1),
            None => return false,
        }
    } else {
        match host.find(':') {
            Some(colon) => host.split_at(colon),
            None => (host, ""),
        }
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let name_ok = match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(ip) => !ip.is_empty() && ip.bytes().all(|b| b.is_ascii_hexdigit() || b == b':'),
        None => name.split('.').all(valid_domain_component),
    };
    name_ok && port_ok
}

/// A registry host as the owner names it (`nas.local:5000`, `10.0.2.2:5000`, `[fd00::1]:5000`),
/// normalised like the host of an [`ImageRef`] (`index.docker.io` is `docker.io`) and
/// lower-cased; `None` when it is not a host with an optional port.
pub fn registry_host(host: &str) -> Option<String> {
    let host = host.to_ascii_lowercase();
    if host.is_empty() || host.len() > 255 || !valid_host(&host) {
        return None;
    }
    Some(if host == DOCKER_HUB_LEGACY {
        DOCKER_HUB.to_owned()
    } else {
        host
    })
}

/// `[\w][\w.-]{0,127}`
fn valid_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let b = tag.as_bytes();
    match b.first() {
        Some(&first) => {
            b.len() <= TAG_LENGTH_MAX
                && word(first)
                && b[1..].iter().all(|&x| word(x) || x == b'.' || x == b'-')
        }
        None => false,
    }
}

fn is_image_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl FromStr for ImageRef {
    type Err = ReferenceError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let owned = || input.to_owned();
        if input.is_empty() {
            return Err(ReferenceError::Empty { input: owned() });
        }
        if is_image_id(input) {
            return Err(ReferenceError::ImageId { input: owned() });
        }

        // Neither the name nor the tag may contain "@", so the first one
        // starts the digest.
        let (rest, digest) = match input.split_once('@') {
            Some((rest, d)) => {
                let digest =
                    d.parse::<Digest>()
                        .map_err(|source| ReferenceError::InvalidDigest {
                            input: owned(),
                            source,
                        })?;
                (rest, Some(digest))
            }
            None => (input, None),
        };

        // A ":" after the last "/" starts the tag ("host:5000/x" has its
        // colon before the slash).
        let last_slash = rest.rfind('/');
        let (name, tag) = match rest.rfind(':') {
            Some(colon) if last_slash.is_none_or(|slash| colon > slash) => {
                (&rest[..colon], Some(&rest[colon + 1..]))
            }
            _ => (rest, None),
        };
        if let Some(tag) = tag {
            if !valid_tag(tag) {
                return Err(ReferenceError::InvalidTag {
                    input: owned(),
                    tag: tag.to_owned(),
                });
            }
        }
        if name.is_empty() {
            return Err(ReferenceError::MissingName { input: owned() });
        }

        let (registry, path) = match name.split_once('/') {
            Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => {
                (first, path)
            }
            _ => (DOCKER_HUB, name),
        };
        let registry = if registry == DOCKER_HUB_LEGACY {
            DOCKER_HUB
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_owned()
        };

        if repository.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(ReferenceError::Uppercase { input: owned() });
        }
        if !valid_host(registry) {
            return Err(ReferenceError::InvalidHost {
                input: owned(),
                host: registry.to_owned(),
            });
        }
        if let Some(component) = repository.split('/').find(|c| !valid_path_component(c)) {
            return Err(ReferenceError::InvalidComponent {
                input: owned(),
                component: component.to_owned(),
            });
        }
        if registry.len() + 1 + repository.len() > NAME_TOTAL_LENGTH_MAX {
            return Err(ReferenceError::TooLong { input: owned() });
        }

        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_owned()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_owned()),
        };
        Ok(ImageRef {
            registry: registry.to_owned(),
            repository,
            tag,
            digest,
        })
    }
}

impl TryFrom<&str> for ImageRef {
    type Error = ReferenceError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl TryFrom<String> for ImageRef {
    type Error = ReferenceError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ImageRef> for String {
    fn from(r: ImageRef) -> String {
        r.to_string()
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageRef({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";

    /// The error and its sources, joined the way the agent prints them.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut source = e.source();
        while let Some(inner) = source {
            s.push_str(": ");
            s.push_str(&inner.to_string());
            source = inner.source();
        }
        s
    }

    /// `expected` is the normalised form, or the error message chain.
    #[test]
    fn registry_hosts() {
        assert_eq!(
            registry_host("10.0.2.2:5000").as_deref(),
            Some("10.0.2.2:5000")
        );
        assert_eq!(
            registry_host("NAS.local:5000").as_deref(),
            Some("nas.local:5000")
        );
        assert_eq!(
            registry_host("[fd00::1]:5000").as_deref(),
            Some("[fd00::1]:5000")
        );
        assert_eq!(
            registry_host("index.docker.io").as_deref(),
            Some("docker.io")
        );
        for bad in [
            "",
            "nas.local:",
            "a/b",
            "http://nas",
            "nas..local",
            "-nas",
            "[fd00::1",
        ] {
            assert_eq!(registry_host(bad), None, "{bad:?}");
        }
    }

    fn check(input: &str, expected: Result<&str, &str>) {
        match (input.parse::<ImageRef>(), expected) {
            (Ok(r), Ok(want)) => {
                assert_eq!(r.to_string(), want, "input {input:?}");
                // The normalised form parses to itself.
                let again: ImageRef = want.parse().expect("normalised form parses");
                assert_eq!(again, r, "input {input:?}");
            }
            (Err(e), Err(want)) => assert_eq!(chain(&e), want, "input {input:?}"),
            (Ok(r), Err(want)) => panic!("input {input:?}: got {r}, want error {want:?}"),
            (Err(e), Ok(want)) => panic!("input {input:?}: got error {:?}, want {want}", chain(&e)),
        }
    }

    #[test]
    fn valid() {
        let cases: &[(&str, &str)] = &[
            ("redis", "docker.io/library/redis:latest"),
            ("redis:7", "docker.io/library/redis:7"),
            ("library/redis", "docker.io/library/redis:latest"),
            ("docker.io/redis", "docker.io/library/redis:latest"),
            ("docker.io/library/redis:latest", "docker.io/library/redis:latest"),
            ("index.docker.io/redis", "docker.io/library/redis:latest"),
            ("index.docker.io/fooo/bar", "docker.io/fooo/bar:latest"),
            ("user/app", "docker.io/user/app:latest"),
            ("docker.io/library/foo/bar", "docker.io/library/foo/bar:latest"),
            ("store/foo/bar", "docker.io/store/foo/bar:latest"),
            ("test_com/foo", "docker.io/test_com/foo:latest"),
            ("test_com", "docker.io/library/test_com:latest"),
            ("test.com:tag", "docker.io/library/test.com:tag"),
            ("test.com:5000", "docker.io/library/test.com:5000"),
            ("test.com/repo:tag", "test.com/repo:tag"),
            ("test:5000/repo", "test:5000/repo:latest"),
            ("host:5000/path/x:tag", "host:5000/path/x:tag"),
            ("test-com:8080/foo", "test-com:8080/foo:latest"),
            ("xn--n3h.com:18080/foo", "xn--n3h.com:18080/foo:latest"),
            ("localhost/x", "localhost/x:latest"),
            ("localhost:5000/x", "localhost:5000/x:latest"),
            ("127.0.0.1:5000/debian", "127.0.0.1:5000/debian:latest"),
            ("192.168.1.1:5000/repo:5050", "192.168.1.1:5000/repo:5050"),
            ("192.168.1.1", "docker.io/library/192.168.1.1:latest"),
            ("[2001:db8::1]/repo", "[2001:db8::1]/repo:latest"),
            ("[::1]:5000/repo", "[::1]:5000/repo:latest"),
            ("lowercase:Uppercase", "docker.io/library/lowercase:Uppercase"),
            ("sub-dom1.foo.com/bar/baz/quux:some-long-tag", "sub-dom1.foo.com/bar/baz/quux:some-long-tag"),
            ("b.gcr.io/test.example.com/my-app:test.example.com", "b.gcr.io/test.example.com/my-app:test.example.com"),
            ("docker-rules/docker", "docker.io/docker-rules/docker:latest"),
            ("docker---rules/docker", "docker.io/docker---rules/docker:latest"),
            ("dock__er/docker", "docker.io/dock__er/docker:latest"),
            ("d/docker", "docker.io/d/docker:latest"),
            ("jess/t", "docker.io/jess/t:latest"),
            ("ubuntu-12.04-base", "docker.io/library/ubuntu-12.04-base:latest"),
            // 63 hex digits is a name, not an image id.
            (
                "dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9",
                "docker.io/library/dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9:latest",
            ),
            // With a registry a 64-digit hex name is unambiguous.
            (
                "docker.io/1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a",
                "docker.io/library/1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a:latest",
            ),
        ];
        for (input, want) in cases {
            check(input, Ok(want));
        }
        check(
            &format!("redis@{D}"),
            Ok(&format!("docker.io/library/redis@{D}")),
        );
        check(
            &format!("busybox:latest@{D}"),
            Ok(&format!("docker.io/library/busybox:latest@{D}")),
        );
        check(
            &format!("test:5000/repo:tag@{D}"),
            Ok(&format!("test:5000/repo:tag@{D}")),
        );
        check(
            &format!("[2001:db8::1]:5000/repo@{D}"),
            Ok(&format!("[2001:db8::1]:5000/repo@{D}")),
        );
        // 127 × "a/" + "a" with the "docker.io/" prefix is 265 characters.
        check(
            &format!("example.com/{}a:tag", "a/".repeat(121)),
            Ok(&format!("example.com/{}a:tag", "a/".repeat(121))),
        );
        let tag128 = format!("t{}", "x".repeat(127));
        check(
            &format!("redis:{tag128}"),
            Ok(&format!("docker.io/library/redis:{tag128}")),
        );
    }

    #[test]
    fn invalid() {
        let cases: &[(&str, &str)] = &[
            ("", "invalid image reference \"\": empty"),
            ("Redis", "invalid image reference \"Redis\": repository name must be lower-case"),
            ("Uppercase:tag", "invalid image reference \"Uppercase:tag\": repository name must be lower-case"),
            ("docker/Docker", "invalid image reference \"docker/Docker\": repository name must be lower-case"),
            // Docker takes "Docker" for a registry host here; we do not.
            ("Docker/docker", "invalid image reference \"Docker/docker\": repository name must be lower-case"),
            (
                "test:5000/Uppercase/lowercase:tag",
                "invalid image reference \"test:5000/Uppercase/lowercase:tag\": repository name must be lower-case",
            ),
            (":justtag", "invalid image reference \":justtag\": missing repository name"),
            ("redis:", "invalid image reference \"redis:\": invalid tag \"\""),
            ("redis:-x", "invalid image reference \"redis:-x\": invalid tag \"-x\""),
            ("redis:a/b", "invalid image reference \"redis:a/b\": invalid registry host \"redis:a\""),
            ("redis:.x", "invalid image reference \"redis:.x\": invalid tag \".x\""),
            ("-docker", "invalid image reference \"-docker\": invalid path component \"-docker\""),
            ("-docker/docker", "invalid image reference \"-docker/docker\": invalid path component \"-docker\""),
            ("docker-/docker", "invalid image reference \"docker-/docker\": invalid path component \"docker-\""),
            ("____/____", "invalid image reference \"____/____\": invalid path component \"____\""),
            ("_docker/_docker", "invalid image reference \"_docker/_docker\": invalid path component \"_docker\""),
            ("dock..er/docker", "invalid image reference \"dock..er/docker\": invalid registry host \"dock..er\""),
            ("dock_.er/docker", "invalid image reference \"dock_.er/docker\": invalid registry host \"dock_.er\""),
            ("dock-.er/docker", "invalid image reference \"dock-.er/docker\": invalid registry host \"dock-.er\""),
            ("dock___er/docker", "invalid image reference \"dock___er/docker\": invalid path component \"dock___er\""),
            ("docker/", "invalid image reference \"docker/\": invalid path component \"\""),
            ("docker///docker", "invalid image reference \"docker///docker\": invalid path component \"\""),
            ("aa/asdf$$^/aa", "invalid image reference \"aa/asdf$$^/aa\": invalid path component \"asdf$$^\""),
            ("-docker.io/docker/docker", "invalid image reference \"-docker.io/docker/docker\": invalid registry host \"-docker.io\""),
            ("foo_bar.com:8080/x", "invalid image reference \"foo_bar.com:8080/x\": invalid registry host \"foo_bar.com:8080\""),
            ("host:port/x", "invalid image reference \"host:port/x\": invalid registry host \"host:port\""),
            ("host:/x", "invalid image reference \"host:/x\": invalid registry host \"host:\""),
            ("https://github.com/docker/docker", "invalid image reference \"https://github.com/docker/docker\": invalid registry host \"https:\""),
            ("fc00::1:5000/debian", "invalid image reference \"fc00::1:5000/debian\": invalid registry host \"fc00::1:5000\""),
            ("[fe80::1%eth0]:5000/repo", "invalid image reference \"[fe80::1%eth0]:5000/repo\": invalid registry host \"[fe80::1%eth0]:5000\""),
            ("[2001:db8::1]", "invalid image reference \"[2001:db8::1]\": invalid tag \"1]\""),
            ("[2001:db8::1]:5000", "invalid image reference \"[2001:db8::1]:5000\": invalid path component \"[2001:db8::1]\""),
            (
                "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a",
                "invalid image reference \"1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a\": a 64-digit hexadecimal string is an image id, not a reference",
            ),
            (
                "repo@sha256:ffffffffffffffffffffffffffffffffff",
                "invalid image reference \"repo@sha256:ffffffffffffffffffffffffffffffffff\": invalid digest \"sha256:ffffffffffffffffffffffffffffffffff\": expected 64 lower-case hex digits after \"sha256:\"",
            ),
            ("repo@latest", "invalid image reference \"repo@latest\": invalid digest \"latest\": expected <algorithm>:<hex>"),
        ];
        for (input, want) in cases {
            check(input, Err(want));
        }
        let f = "f".repeat(64);
        check(
            &format!("@sha256:{f}"),
            Err(&format!(
                "invalid image reference \"@sha256:{f}\": missing repository name"
            )),
        );
        let f128 = "f".repeat(128);
        check(
            &format!("redis@sha512:{f128}"),
            Err(&format!(
                "invalid image reference \"redis@sha512:{f128}\": unsupported digest algorithm sha512"
            )),
        );
        let long = format!("{}a:tag", "a/".repeat(128));
        check(
            &long,
            Err(&format!(
                "invalid image reference \"{long}\": name is longer than 255 characters"
            )),
        );
        let tag129 = format!("t{}", "x".repeat(128));
        check(
            &format!("redis:{tag129}"),
            Err(&format!(
                "invalid image reference \"redis:{tag129}\": invalid tag \"{tag129}\""
            )),
        );
    }

    #[test]
    fn accessors() {
        let r: ImageRef = "redis".parse().expect("valid");
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.repository(), "library/redis");
        assert_eq!(r.tag(), Some("latest"));
        assert_eq!(r.digest(), None);
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.name(), "docker.io/library/redis");
        assert_eq!(r.manifest_reference(), "latest");

        let d: Digest = D.parse().expect("valid digest");
        let pinned = r.with_digest(d.clone());
        assert_eq!(
            pinned.to_string(),
            format!("docker.io/library/redis:latest@{D}")
        );
        assert_eq!(pinned.manifest_reference(), D);
        assert_eq!(pinned.tag(), Some("latest"));
        assert_eq!(pinned.digest(), Some(&d));

        let local: ImageRef = format!("127.0.0.1:5000/app@{D}").parse().expect("valid");
        assert_eq!(local.api_host(), "127.0.0.1:5000");
        assert_eq!(local.tag(), None);
        assert_eq!(local.manifest_reference(), D);
    }

    #[test]
    fn serde_as_string() {
        let r: ImageRef = "user/app:1".parse().expect("valid");
        let json = serde_json::to_string(&r).expect("serialize");
        assert_eq!(json, "\"docker.io/user/app:1\"");
        let back: ImageRef = serde_json::from_str("\"user/app:1\"").expect("deserialize");
        assert_eq!(back, r);
        assert!(serde_json::from_str::<ImageRef>("\"User/app\"").is_err());
    }
}
