//! A pull-only client for OCI Distribution registries (Docker Hub, GHCR,
//! `docker-registry`, Harbor, …).
//!
//! `resolve` turns an [`ImageRef`] into the digest it points at and the image
//! manifest for one platform; `fetch_config` and `blob` then read the blobs
//! that manifest names. Manifests and configs are verified against their
//! digests here; layer blobs are streamed and verified by the caller while it
//! unpacks them.
//!
//! Authentication follows the registry's `WWW-Authenticate` challenge: an
//! anonymous request first, then a Bearer token from the realm it names (with
//! basic credentials if configured for the registry) or basic credentials
//! directly. Tokens are cached per (registry, repository).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::header::{HeaderMap, ACCEPT, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::{StatusCode, Url};
use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer, Serialize};
use tracing::debug;

use super::digest::Digest;
use super::reference::ImageRef;

pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MEDIA_TYPE_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_TYPE_OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_TYPE_DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_TYPE_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const MEDIA_TYPE_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

const MEDIA_TYPE_DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
const MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// What we ask for when fetching manifests (no schema 1: a registry that
/// only has that answers it anyway, and we report it).
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// containerd refuses manifests larger than this; so do we.
const MANIFEST_SIZE_MAX: u64 = 4 << 20;
const CONFIG_SIZE_MAX: u64 = 16 << 20;
const TOKEN_SIZE_MAX: u64 = 1 << 20;
const ERROR_BODY_SIZE_MAX: u64 = 64 << 10;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Applies to each read: a stalled body fails, a long one does not.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Total time for small requests (manifests, tokens).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
const MAX_REDIRECTS: usize = 10;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Registry hosts (`127.0.0.1:5000`) spoken to over plain HTTP; all
    /// others over HTTPS only.
    pub insecure: Vec<String>,
    /// Credentials by registry host (`docker.io`, `ghcr.io`, `host:5000`).
    pub credentials: HashMap<String, Credentials>,
}

#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// An OS and CPU in the Go names OCI uses (`linux`, `arm64`, `v8`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this agent runs on.
    pub fn host() -> Platform {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "loongarch64" => ("loong64", None),
            other => (other, None),
        };
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: variant.map(Into::into),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A reference to a blob: what it is, its digest and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

/// An OCI image manifest or Docker v2 schema 2 manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// What the reference points at (an index or a manifest): the digest to
    /// pin the app to.
    pub digest: Digest,
    /// The image manifest chosen for the platform (`== digest` without an
    /// index).
    pub manifest_digest: Digest,
    pub manifest: ImageManifest,
    /// The chosen image manifest as the registry sent it.
    pub manifest_bytes: Vec<u8>,
}

/// The parts of an image configuration blob the agent uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub config: ContainerConfig,
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Keys like `8080/tcp`; the values are empty objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<Digest>,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("could not set up the http client")]
    Client(#[source] reqwest::Error),
    #[error("registry {registry} is unreachable")]
    Unreachable {
        registry: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("registry {registry} did not answer in time")]
    Timeout {
        registry: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("request to registry {registry} failed")]
    Transport {
        registry: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("image {image} not found")]
    NotFound { image: String },
    #[error("blob {digest} of image {image} not found")]
    BlobNotFound { image: String, digest: Digest },
    #[error("registry {registry} requires credentials")]
    CredentialsRequired { registry: String },
    #[error("registry {registry} rejected the credentials of user {username:?}")]
    Unauthorized { registry: String, username: String },
    #[error("registry {registry} denied access to {repository}: it does not exist or needs other credentials")]
    Denied {
        registry: String,
        repository: String,
    },
    #[error("registry {registry} sent an unusable authentication challenge {challenge:?}")]
    InvalidChallenge { registry: String, challenge: String },
    #[error("registry {registry} names a token service {realm:?} that is not https")]
    InsecureRealm { registry: String, realm: String },
    #[error("token service {realm} of registry {registry} answered {status}")]
    TokenStatus {
        registry: String,
        realm: String,
        status: StatusCode,
    },
    #[error("token service {realm} of registry {registry} answered no token")]
    InvalidToken {
        registry: String,
        realm: String,
        #[source]
        source: Option<serde_json::Error>,
    },
    #[error("registry {registry} answered {status} for {image}{detail}")]
    Status {
        registry: String,
        image: String,
        status: StatusCode,
        /// The registry's own error text, `": …"`, or empty.
        detail: String,
    },
    #[error("registry answered an invalid manifest for {image}")]
    InvalidManifest {
        image: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "registry answered a document for {image} that is neither an image manifest nor an index"
    )]
    UnknownManifest { image: String },
    #[error("image {image}: schema 1 manifests are not supported")]
    Schema1 { image: String },
    #[error("image {image} has unsupported media type {media_type}")]
    UnsupportedMediaType { image: String, media_type: String },
    #[error("image index {image} points to another index, which is not supported")]
    NestedIndex { image: String },
    #[error("image {image} has no manifest for platform {platform} (available: {available})")]
    NoMatchingPlatform {
        image: String,
        platform: String,
        available: String,
    },
    #[error("{what} of image {image} has digest {actual}, expected {expected}")]
    DigestMismatch {
        image: String,
        what: &'static str,
        expected: Digest,
        actual: Digest,
    },
    #[error("{what} {digest} of image {image} has {actual} bytes, expected {expected}")]
    SizeMismatch {
        image: String,
        what: &'static str,
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("{what} of image {image} is larger than {limit} bytes")]
    TooLarge {
        image: String,
        what: &'static str,
        limit: u64,
    },
    #[error("blob {digest} of image {image} is longer than the {size} bytes its descriptor gives")]
    BlobTooLong {
        image: String,
        digest: Digest,
        size: u64,
    },
    #[error("blob {digest} of image {image} ended after {received} of {size} bytes")]
    BlobTruncated {
        image: String,
        digest: Digest,
        size: u64,
        received: u64,
    },
    #[error("config blob {digest} of image {image} is invalid")]
    InvalidConfig {
        image: String,
        digest: Digest,
        #[source]
        source: serde_json::Error,
    },
}

/// How we authenticate to one (registry, repository).
#[derive(Clone)]
enum Auth {
    Bearer(String),
    Basic(Credentials),
}

pub struct Registry {
    /// Built at first use ([`Registry::http`]): loading the system's root certificates takes
    /// ~1 s under emulation, which the agent's start should not wait for.
    http: std::sync::OnceLock<reqwest::Client>,
    config: RegistryConfig,
    /// Hosts the owner allowed plain HTTP for at run time (lower case), besides
    /// `config.insecure`.
    plain_http: std::sync::RwLock<std::collections::HashSet<String>>,
    auth: Mutex<HashMap<(String, String), Auth>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("insecure", &self.config.insecure)
            .field("credentials_for", &self.config.credentials.keys())
            .finish_non_exhaustive()
    }
}

impl Registry {
    pub fn new(config: RegistryConfig) -> Result<Registry, RegistryError> {
        Ok(Registry {
            http: std::sync::OnceLock::new(),
            config,
            plain_http: Default::default(),
            auth: Mutex::new(HashMap::new()),
        })
    }

    /// The HTTP client, built at the first call (blocks for as long as loading the root
    /// certificates takes: call [`Registry::warm`] off the async workers ahead).
    fn http(&self) -> Result<&reqwest::Client, RegistryError> {
        if let Some(c) = self.http.get() {
            return Ok(c);
        }
        let redirects = reqwest::redirect::Policy::custom(|attempt| {
            let downgrade = attempt.url().scheme() == "http"
                && attempt.previous().iter().any(|u| u.scheme() == "https");
            if attempt.previous().len() > MAX_REDIRECTS {
                attempt.error("too many redirects")
            } else if downgrade {
                attempt.error("refusing a redirect from https to plain http")
            } else {
                // reqwest drops Authorization when the host or port changes.
                attempt.follow()
            }
        });
        let http = reqwest::Client::builder()
            .user_agent(concat!("homeport/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .redirect(redirects)
            .build()
            .map_err(RegistryError::Client)?;
        Ok(self.http.get_or_init(|| http))
    }

    /// Builds the HTTP client now (a blocking call), so that the first pull does not.
    pub fn warm(&self) {
        if let Err(e) = self.http() {
            tracing::warn!(error = %e, "cannot make the registry client");
        }
    }

    /// The hosts (normalised, lower case) reached over plain HTTP besides those of the
    /// configuration: what the owner allowed. Replaces the previous set.
    pub fn set_plain_http(&self, hosts: impl IntoIterator<Item = String>) {
        let mut set = self.plain_http.write().unwrap_or_else(|e| e.into_inner());
        *set = hosts.into_iter().collect();
    }

    /// What the agent was started with: hosts allowed plain HTTP, hosts with credentials.
    pub fn configured(&self) -> (Vec<String>, Vec<String>) {
        let mut creds: Vec<String> = self.config.credentials.keys().cloned().collect();
        creds.sort();
        (self.config.insecure.clone(), creds)
    }

    /// Resolves `r` to the digest it points at and the image manifest for
    /// `platform`, verifying both against their digests.
    pub async fn resolve(
        &self,
        r: &ImageRef,
        platform: &Platform,
    ) -> Result<Resolved, RegistryError> {
        let image = r.to_string();
        let top = self
            .fetch_manifest(r, &r.manifest_reference(), r.digest(), &image)
            .await?;
        debug!(image = %image, digest = %top.digest, kind = ?top.kind, "resolved image reference");
        match top.kind {
            Kind::Manifest => {
                let manifest = parse_manifest(&top.bytes, &image)?;
                Ok(Resolved {
                    manifest_digest: top.digest.clone(),
                    digest: top.digest,
                    manifest,
                    manifest_bytes: top.bytes,
                })
            }
            Kind::Index => {
                let index: Index = serde_json::from_slice(&top.bytes).map_err(|source| {
                    RegistryError::InvalidManifest {
                        image: image.clone(),
                        source,
                    }
                })?;
                let entry = select_platform(&index.manifests, platform).map_err(|available| {
                    RegistryError::NoMatchingPlatform {
                        image: image.clone(),
                        platform: platform.to_string(),
                        available: if available.is_empty() {
                            "none".into()
                        } else {
                            available.join(", ")
                        },
                    }
                })?;
                let child_image = format!("{}@{}", r.name(), entry.digest);
                let child = self
                    .fetch_manifest(r, entry.digest.as_str(), Some(&entry.digest), &child_image)
                    .await?;
                if child.bytes.len() as u64 != entry.size {
                    return Err(RegistryError::SizeMismatch {
                        image: child_image,
                        what: "manifest",
                        digest: entry.digest.clone(),
                        expected: entry.size,
                        actual: child.bytes.len() as u64,
                    });
                }
                if child.kind == Kind::Index {
                    return Err(RegistryError::NestedIndex { image });
                }
                let manifest = parse_manifest(&child.bytes, &child_image)?;
                debug!(image = %image, manifest = %child.digest, platform = %platform, "chose manifest from index");
                Ok(Resolved {
                    digest: top.digest,
                    manifest_digest: child.digest,
                    manifest,
                    manifest_bytes: child.bytes,
                })
            }
        }
    }

    /// Fetches and parses the config blob `d` of `r`, verifying its size
    /// and digest. Returns the raw bytes too.
    pub async fn fetch_config(
        &self,
        r: &ImageRef,
        d: &Descriptor,
    ) -> Result<(ImageConfig, Vec<u8>), RegistryError> {
        let image = r.to_string();
        if d.size > CONFIG_SIZE_MAX {
            return Err(RegistryError::TooLarge {
                image,
                what: "config blob",
                limit: CONFIG_SIZE_MAX,
            });
        }
        let mut stream = self.blob(r, d).await?;
        // The size was checked above, so this fits in memory.
        let mut bytes = Vec::with_capacity(usize::try_from(d.size).unwrap_or(0));
        while let Some(chunk) = stream.next_chunk().await? {
            bytes.extend_from_slice(&chunk);
        }
        let actual = Digest::of_bytes(&bytes);
        if actual != d.digest {
            return Err(RegistryError::DigestMismatch {
                image,
                what: "config blob",
                expected: d.digest.clone(),
                actual,
            });
        }
        let config =
            serde_json::from_slice(&bytes).map_err(|source| RegistryError::InvalidConfig {
                image,
                digest: d.digest.clone(),
                source,
            })?;
        Ok((config, bytes))
    }

    /// Starts downloading blob `d` of `r`. The stream fails if the body is
    /// longer or shorter than `d.size`; the caller verifies the digest.
    pub async fn blob(&self, r: &ImageRef, d: &Descriptor) -> Result<BlobStream, RegistryError> {
        let image = r.to_string();
        let url = format!("{}/blobs/{}", self.base_url(r), d.digest);
        let response = self.get(r, &url, None, None).await?;
        let status = response.status();
        if status == StatusCode::NOT_FOUND {
            return Err(RegistryError::BlobNotFound {
                image,
                digest: d.digest.clone(),
            });
        }
        if !status.is_success() {
            return Err(status_error(r, &image, response).await);
        }
        if let Some(length) = response.content_length() {
            if length != d.size {
                return Err(RegistryError::SizeMismatch {
                    image,
                    what: "blob",
                    digest: d.digest.clone(),
                    expected: d.size,
                    actual: length,
                });
            }
        }
        debug!(image = %image, digest = %d.digest, size = d.size, "downloading blob");
        Ok(BlobStream {
            inner: Box::pin(response.bytes_stream()),
            registry: r.registry().to_owned(),
            image,
            digest: d.digest.clone(),
            size: d.size,
            received: 0,
            done: false,
        })
    }

    /// Fetches one manifest or index, checks its digest, and tells which it is.
    async fn fetch_manifest(
        &self,
        r: &ImageRef,
        reference: &str,
        expected: Option<&Digest>,
        image: &str,
    ) -> Result<Fetched, RegistryError> {
        let url = format!("{}/manifests/{reference}", self.base_url(r));
        let response = self
            .get(r, &url, Some(MANIFEST_ACCEPT), Some(REQUEST_TIMEOUT))
            .await?;
        let status = response.status();
        if status == StatusCode::NOT_FOUND {
            return Err(RegistryError::NotFound {
                image: image.to_owned(),
            });
        }
        if !status.is_success() {
            return Err(status_error(r, image, response).await);
        }
        let headers = response.headers().clone();
        let bytes = read_limited(response, MANIFEST_SIZE_MAX)
            .await
            .map_err(|e| e.into_registry_error(r, image, "manifest"))?;
        let actual = Digest::of_bytes(&bytes);
        let claimed = headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| match v.parse::<Digest>() {
                Ok(d) => Some(d),
                Err(e) => {
                    debug!(image = %image, error = %e, "ignoring docker-content-digest header");
                    None
                }
            });
        if let Some(expected) = expected.or(claimed.as_ref()) {
            if *expected != actual {
                return Err(RegistryError::DigestMismatch {
                    image: image.to_owned(),
                    what: "manifest",
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
        let kind = manifest_kind(content_type, &bytes).map_err(|e| match e {
            KindError::Json(source) => RegistryError::InvalidManifest {
                image: image.to_owned(),
                source,
            },
            KindError::Schema1 => RegistryError::Schema1 {
                image: image.to_owned(),
            },
            KindError::Unsupported(media_type) => RegistryError::UnsupportedMediaType {
                image: image.to_owned(),
                media_type,
            },
            KindError::Unknown => RegistryError::UnknownManifest {
                image: image.to_owned(),
            },
        })?;
        Ok(Fetched {
            kind,
            digest: actual,
            bytes,
        })
    }

    fn is_insecure(&self, r: &ImageRef) -> bool {
        self.config
            .insecure
            .iter()
            .any(|h| h == r.registry() || h == r.api_host())
            || self
                .plain_http
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&r.registry().to_ascii_lowercase())
    }

    fn base_url(&self, r: &ImageRef) -> String {
        let scheme = if self.is_insecure(r) { "http" } else { "https" };
        format!("{scheme}://{}/v2/{}", r.api_host(), r.repository())
    }

    fn credentials(&self, r: &ImageRef) -> Option<&Credentials> {
        let c = &self.config.credentials;
        c.get(r.registry()).or_else(|| c.get(r.api_host()))
    }

    /// GET with authentication: the cached credentials for the repository
    /// (or none), then once more after answering a 401 challenge.
    async fn get(
        &self,
        r: &ImageRef,
        url: &str,
        accept: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, RegistryError> {
        let key = (r.registry().to_owned(), r.repository().to_owned());
        let mut auth = self.lock_auth().get(&key).cloned();
        let mut retried = false;
        loop {
            let mut request = self.http()?.get(url);
            if let Some(accept) = accept {
                request = request.header(ACCEPT, accept);
            }
            if let Some(timeout) = timeout {
                request = request.timeout(timeout);
            }
            request = match &auth {
                Some(Auth::Bearer(token)) => request.bearer_auth(token),
                Some(Auth::Basic(c)) => request.basic_auth(&c.username, Some(&c.password)),
                None => request,
            };
            debug!(url, "registry request");
            let response = request.send().await.map_err(|e| send_error(r, e))?;
            match response.status() {
                StatusCode::UNAUTHORIZED => {}
                StatusCode::FORBIDDEN => {
                    return Err(RegistryError::Denied {
                        registry: r.registry().to_owned(),
                        repository: r.repository().to_owned(),
                    })
                }
                _ => return Ok(response),
            }
            if retried {
                // A fresh answer to the challenge was not enough: basic
                // credentials are wrong, or a token does not grant access.
                self.lock_auth().remove(&key);
                return Err(match &auth {
                    Some(Auth::Basic(c)) => RegistryError::Unauthorized {
                        registry: r.registry().to_owned(),
                        username: c.username.clone(),
                    },
                    _ => RegistryError::Denied {
                        registry: r.registry().to_owned(),
                        repository: r.repository().to_owned(),
                    },
                });
            }
            retried = true;
            let fresh = self.authenticate(r, response.headers()).await?;
            self.lock_auth().insert(key.clone(), fresh.clone());
            auth = Some(fresh);
        }
    }

    fn lock_auth(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Auth>> {
        // The map holds no invariant a panic could break.
        self.auth.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers a 401's challenge: a Bearer token from the realm, or basic
    /// credentials.
    async fn authenticate(&self, r: &ImageRef, headers: &HeaderMap) -> Result<Auth, RegistryError> {
        let raw: Vec<&str> = headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let challenges: Vec<Challenge> = raw.iter().flat_map(|h| parse_challenges(h)).collect();
        let invalid = || RegistryError::InvalidChallenge {
            registry: r.registry().to_owned(),
            challenge: raw.join(", "),
        };
        let find = |scheme: &str| {
            challenges
                .iter()
                .find(|c| c.scheme.eq_ignore_ascii_case(scheme))
        };
        if let Some(bearer) = find("bearer") {
            let realm = bearer.param("realm").ok_or_else(invalid)?;
            let token = self.fetch_token(r, realm, bearer.param("service")).await?;
            return Ok(Auth::Bearer(token));
        }
        if find("basic").is_some() {
            let credentials =
                self.credentials(r)
                    .ok_or_else(|| RegistryError::CredentialsRequired {
                        registry: r.registry().to_owned(),
                    })?;
            debug!(registry = r.registry(), "using basic authentication");
            return Ok(Auth::Basic(credentials.clone()));
        }
        Err(invalid())
    }

    async fn fetch_token(
        &self,
        r: &ImageRef,
        realm: &str,
        service: Option<&str>,
    ) -> Result<String, RegistryError> {
        let registry = || r.registry().to_owned();
        let mut url = Url::parse(realm).map_err(|_| RegistryError::InvalidChallenge {
            registry: registry(),
            challenge: format!("realm={realm:?}"),
        })?;
        match url.scheme() {
            "https" => {}
            "http" if self.is_insecure(r) => {}
            _ => {
                return Err(RegistryError::InsecureRealm {
                    registry: registry(),
                    realm: realm.to_owned(),
                })
            }
        }
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            query.append_pair("scope", &format!("repository:{}:pull", r.repository()));
        }
        let credentials = self.credentials(r);
        let mut request = self.http()?.get(url).timeout(REQUEST_TIMEOUT);
        if let Some(c) = credentials {
            request = request.basic_auth(&c.username, Some(&c.password));
        }
        debug!(
            registry = r.registry(),
            realm,
            authenticated = credentials.is_some(),
            "requesting token"
        );
        let response = request.send().await.map_err(|e| send_error(r, e))?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(match credentials {
                Some(c) => RegistryError::Unauthorized {
                    registry: registry(),
                    username: c.username.clone(),
                },
                None => RegistryError::CredentialsRequired {
                    registry: registry(),
                },
            });
        }
        if !status.is_success() {
            return Err(RegistryError::TokenStatus {
                registry: registry(),
                realm: realm.to_owned(),
                status,
            });
        }
        let image = r.to_string();
        let body = read_limited(response, TOKEN_SIZE_MAX)
            .await
            .map_err(|e| e.into_registry_error(r, &image, "token"))?;
        let invalid = |source| RegistryError::InvalidToken {
            registry: registry(),
            realm: realm.to_owned(),
            source,
        };
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|e| invalid(Some(e)))?;
        answer
            .token
            .or(answer.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| invalid(None))
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    token: Option<String>,
    access_token: Option<String>,
}

fn send_error(r: &ImageRef, source: reqwest::Error) -> RegistryError {
    let registry = r.registry().to_owned();
    if source.is_connect() {
        RegistryError::Unreachable { registry, source }
    } else if source.is_timeout() {
        RegistryError::Timeout { registry, source }
    } else {
        RegistryError::Transport { registry, source }
    }
}

/// A non-success answer, with the registry's own error text if it sent one
/// (`{"errors":[{"code":…,"message":…}]}`).
async fn status_error(r: &ImageRef, image: &str, response: reqwest::Response) -> RegistryError {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(Deserialize)]
    struct ErrorEntry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let status = response.status();
    let detail = match read_limited(response, ERROR_BODY_SIZE_MAX).await {
        Ok(body) => match serde_json::from_slice::<Errors>(&body) {
            Ok(e) => e
                .errors
                .iter()
                .map(|e| match (e.code.is_empty(), e.message.is_empty()) {
                    (false, false) => format!("{}: {}", e.code.to_lowercase(), e.message),
                    (true, false) => e.message.clone(),
                    _ => e.code.to_lowercase(),
                })
                .collect::<Vec<_>>()
                .join("; "),
            Err(_) => String::new(),
        },
        Err(_) => String::new(),
    };
    RegistryError::Status {
        registry: r.registry().to_owned(),
        image: image.to_owned(),
        status,
        detail: if detail.is_empty() {
            detail
        } else {
            format!(" ({detail})")
        },
    }
}

enum ReadError {
    TooLarge(u64),
    Transport(reqwest::Error),
}

impl ReadError {
    fn into_registry_error(self, r: &ImageRef, image: &str, what: &'static str) -> RegistryError {
        match self {
            ReadError::TooLarge(limit) => RegistryError::TooLarge {
                image: image.to_owned(),
                what,
                limit,
            },
            ReadError::Transport(e) => send_error(r, e),
        }
    }
}

/// Reads a whole body, refusing one larger than `limit`.
async fn read_limited(mut response: reqwest::Response, limit: u64) -> Result<Vec<u8>, ReadError> {
    if response.content_length().is_some_and(|l| l > limit) {
        return Err(ReadError::TooLarge(limit));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(ReadError::Transport)? {
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(ReadError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The raw body of a blob as a stream of chunks. Fails if the body is longer
/// or shorter than the descriptor's size; does not verify the digest.
pub struct BlobStream {
    inner: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    registry: String,
    image: String,
    digest: Digest,
    size: u64,
    received: u64,
    done: bool,
}

impl BlobStream {
    /// The next chunk, or `None` at the end of a complete body.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, RegistryError> {
        self.next().await.transpose()
    }

    /// The size the descriptor gives.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    fn on_item(
        &mut self,
        item: Option<reqwest::Result<Bytes>>,
    ) -> Option<Result<Bytes, RegistryError>> {
        let result = match item {
            Some(Ok(chunk)) => {
                self.received += chunk.len() as u64;
                if self.received > self.size {
                    Err(RegistryError::BlobTooLong {
                        image: self.image.clone(),
                        digest: self.digest.clone(),
                        size: self.size,
                    })
                } else {
                    return Some(Ok(chunk));
                }
            }
            Some(Err(source)) => Err(if source.is_timeout() {
                RegistryError::Timeout {
                    registry: self.registry.clone(),
                    source,
                }
            } else {
                RegistryError::Transport {
                    registry: self.registry.clone(),
                    source,
                }
            }),
            None if self.received < self.size => Err(RegistryError::BlobTruncated {
                image: self.image.clone(),
                digest: self.digest.clone(),
                size: self.size,
                received: self.received,
            }),
            None => {
                self.done = true;
                return None;
            }
        };
        self.done = true;
        Some(result)
    }
}

impl Stream for BlobStream {
    type Item = Result<Bytes, RegistryError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.inner.as_mut().poll_next(cx) {
            Poll::Ready(item) => Poll::Ready(self.on_item(item)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobStream")
            .field("image", &self.image)
            .field("digest", &self.digest)
            .field("size", &self.size)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

struct Fetched {
    kind: Kind,
    digest: Digest,
    bytes: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Manifest,
    Index,
}

#[derive(Debug)]
enum KindError {
    Json(serde_json::Error),
    Schema1,
    Unsupported(String),
    Unknown,
}

fn kind_of_media_type(media_type: &str) -> Result<Kind, KindError> {
    match media_type {
        MEDIA_TYPE_OCI_MANIFEST | MEDIA_TYPE_DOCKER_MANIFEST => Ok(Kind::Manifest),
        MEDIA_TYPE_OCI_INDEX | MEDIA_TYPE_DOCKER_MANIFEST_LIST => Ok(Kind::Index),
        MEDIA_TYPE_DOCKER_SCHEMA1 | MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED => Err(KindError::Schema1),
        other => Err(KindError::Unsupported(other.to_owned())),
    }
}

/// Tells an image manifest from an index: by the `Content-Type`, else by
/// the top-level `mediaType`, else (umoci writes neither) by the shape.
fn manifest_kind(content_type: Option<&str>, body: &[u8]) -> Result<Kind, KindError> {
    let content_type = content_type
        .and_then(|c| c.split(';').next())
        .map(|c| c.trim().to_ascii_lowercase())
        .unwrap_or_default();
    // Registries send no type, or text/plain, for manifests without a
    // mediaType field; proxies and broken servers send text/html or JSON.
    let generic = !content_type.starts_with("application/vnd.");
    if !generic {
        return kind_of_media_type(&content_type);
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        schema_version: Option<serde_json::Value>,
        media_type: Option<String>,
        manifests: Option<IgnoredAny>,
        config: Option<IgnoredAny>,
        layers: Option<IgnoredAny>,
    }
    let probe: Probe = serde_json::from_slice(body).map_err(KindError::Json)?;
    if probe.schema_version.and_then(|v| v.as_u64()) == Some(1) {
        return Err(KindError::Schema1);
    }
    match probe.media_type {
        Some(media_type) => kind_of_media_type(&media_type),
        None if probe.manifests.is_some() => Ok(Kind::Index),
        None if probe.config.is_some() && probe.layers.is_some() => Ok(Kind::Manifest),
        None => Err(KindError::Unknown),
    }
}

fn parse_manifest(bytes: &[u8], image: &str) -> Result<ImageManifest, RegistryError> {
    let manifest: ImageManifest =
        serde_json::from_slice(bytes).map_err(|source| RegistryError::InvalidManifest {
            image: image.to_owned(),
            source,
        })?;
    match manifest.config.media_type.as_str() {
        MEDIA_TYPE_OCI_CONFIG | MEDIA_TYPE_DOCKER_CONFIG => Ok(manifest),
        other => Err(RegistryError::UnsupportedMediaType {
            image: image.to_owned(),
            media_type: other.to_owned(),
        }),
    }
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<IndexEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry {
    #[serde(default)]
    media_type: String,
    digest: Digest,
    size: u64,
    platform: Option<IndexPlatform>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct IndexPlatform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    variant: Option<String>,
}

impl IndexEntry {
    /// Attestations and signatures hang in indexes as `unknown/unknown`.
    fn is_attestation(&self) -> bool {
        self.annotations
            .get("vnd.docker.reference.type")
            .is_some_and(|t| t == "attestation-manifest")
            || self
                .platform
                .as_ref()
                .is_some_and(|p| p.os == "unknown" && p.architecture == "unknown")
    }
}

/// The variant a platform means when it names none, the way containerd
/// normalises them: arm64 is v8, arm is v7, amd64 v1 is no variant.
fn normalized_variant<'a>(architecture: &str, variant: Option<&'a str>) -> Option<&'a str> {
    match (architecture, variant) {
        ("arm64", None) => Some("v8"),
        ("arm", None) => Some("v7"),
        ("amd64", Some("v1")) => None,
        (_, v) => v,
    }
}

/// How well an entry fits: `Some(0)` exactly, larger for older arm variants
/// the wanted one also runs, `None` not at all.
fn platform_rank(entry: &IndexPlatform, want: &Platform) -> Option<u32> {
    if entry.os != want.os || entry.architecture != want.architecture {
        return None;
    }
    let have = normalized_variant(&entry.architecture, entry.variant.as_deref());
    let wanted = normalized_variant(&want.architecture, want.variant.as_deref());
    if have == wanted {
        return Some(0);
    }
    // An armv7 runs armv6 and armv5 code.
    let arm_version = |v: Option<&str>| v?.strip_prefix('v')?.parse::<u32>().ok();
    match (
        want.architecture.as_str(),
        arm_version(wanted),
        arm_version(have),
    ) {
        ("arm", Some(w), Some(h)) if h < w => Some(w - h),
        _ => None,
    }
}

/// Picks the index entry for `want`, or lists the platforms on offer.
fn select_platform<'a>(
    entries: &'a [IndexEntry],
    want: &Platform,
) -> Result<&'a IndexEntry, Vec<String>> {
    let candidates: Vec<&IndexEntry> = entries.iter().filter(|e| !e.is_attestation()).collect();
    let best = candidates
        .iter()
        .filter_map(|e| Some((platform_rank(e.platform.as_ref()?, want)?, *e)))
        .min_by_key(|(rank, _)| *rank);
    if let Some((_, entry)) = best {
        return Ok(entry);
    }
    // An index of a single entry without a platform: that is the image.
    if let [only] = candidates.as_slice() {
        if only.platform.is_none() {
            return Ok(only);
        }
    }
    Err(candidates
        .iter()
        .map(|e| match &e.platform {
            Some(p) => match &p.variant {
                Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                None => format!("{}/{}", p.os, p.architecture),
            },
            None => format!("unspecified ({})", e.media_type),
        })
        .collect())
}

/// One challenge of a `WWW-Authenticate` header (RFC 7235): a scheme and
/// its parameters, names lower-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Challenge {
    scheme: String,
    params: Vec<(String, String)>,
}

impl Challenge {
    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a `WWW-Authenticate` value, which may hold several challenges:
/// `Bearer realm="https://auth.docker.io/token",service="registry.docker.io"`,
/// `Basic realm="Registry Realm"`, quoted strings with commas and escapes,
/// unquoted values, spaces around `=` and `,`.
fn parse_challenges(header: &str) -> Vec<Challenge> {
    let s: Vec<char> = header.chars().collect();
    let mut i = 0;
    let mut out: Vec<Challenge> = Vec::new();
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && s[*i].is_whitespace() {
            *i += 1;
        }
    };
    loop {
        while i < s.len() && (s[i].is_whitespace() || s[i] == ',') {
            i += 1;
        }
        if i >= s.len() {
            break;
        }
        let start = i;
        while i < s.len() && !s[i].is_whitespace() && s[i] != ',' && s[i] != '=' {
            i += 1;
        }
        let token: String = s[start..i].iter().collect();
        skip_ws(&mut i);
        let is_param = i < s.len() && s[i] == '=' && !token.is_empty();
        if !is_param {
            if token.is_empty() {
                // A stray "=": skip it.
                i += 1;
            } else {
                out.push(Challenge {
                    scheme: token,
                    params: Vec::new(),
                });
            }
            continue;
        }
        i += 1; // "="
        skip_ws(&mut i);
        let mut value = String::new();
        if i < s.len() && s[i] == '"' {
            i += 1;
            while i < s.len() && s[i] != '"' {
                if s[i] == '\\' && i + 1 < s.len() {
                    i += 1;
                }
                value.push(s[i]);
                i += 1;
            }
            i += 1; // closing quote
        } else {
            while i < s.len() && s[i] != ',' && !s[i].is_whitespace() {
                value.push(s[i]);
                i += 1;
            }
        }
        // token68 ("Basic abc==") or a parameter before any scheme: ignore.
        if let Some(challenge) = out.last_mut() {
            challenge.params.push((token.to_ascii_lowercase(), value));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> Digest {
        format!("sha256:{}", c.to_string().repeat(64))
            .parse()
            .expect("valid digest")
    }

    fn kind(content_type: Option<&str>, body: &str) -> Result<Kind, String> {
        manifest_kind(content_type, body.as_bytes()).map_err(|e| match e {
            KindError::Json(_) => "json".to_owned(),
            KindError::Schema1 => "schema1".to_owned(),
            KindError::Unsupported(t) => format!("unsupported {t}"),
            KindError::Unknown => "unknown".to_owned(),
        })
    }

    #[test]
    fn media_type_detection() {
        let manifest_no_type = r#"{"schemaVersion":2,"config":{},"layers":[]}"#;
        let index_no_type = r#"{"schemaVersion":2,"manifests":[]}"#;
        let oci_manifest = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#;
        let docker_list = r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[]}"#;
        let schema1 = r#"{"schemaVersion":1,"name":"x","tag":"latest","fsLayers":[]}"#;
        let artifact =
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.artifact.manifest.v1+json"}"#;
        let cases: &[(Option<&str>, &str, Result<Kind, &str>)] = &[
            (
                Some(MEDIA_TYPE_OCI_MANIFEST),
                manifest_no_type,
                Ok(Kind::Manifest),
            ),
            (
                Some(MEDIA_TYPE_DOCKER_MANIFEST),
                "not even json",
                Ok(Kind::Manifest),
            ),
            (Some(MEDIA_TYPE_OCI_INDEX), index_no_type, Ok(Kind::Index)),
            (
                Some(MEDIA_TYPE_DOCKER_MANIFEST_LIST),
                docker_list,
                Ok(Kind::Index),
            ),
            (
                Some("application/vnd.oci.image.index.v1+json; charset=utf-8"),
                "{}",
                Ok(Kind::Index),
            ),
            (
                Some("Application/VND.OCI.Image.Manifest.v1+JSON"),
                "{}",
                Ok(Kind::Manifest),
            ),
            // Generic content types: the document decides.
            (None, oci_manifest, Ok(Kind::Manifest)),
            (Some("application/json"), docker_list, Ok(Kind::Index)),
            (
                Some("text/plain; charset=utf-8"),
                manifest_no_type,
                Ok(Kind::Manifest),
            ),
            (None, manifest_no_type, Ok(Kind::Manifest)),
            (
                Some("application/octet-stream"),
                index_no_type,
                Ok(Kind::Index),
            ),
            (None, r#"{"schemaVersion":2,"config":{}}"#, Err("unknown")),
            (None, r#"{"schemaVersion":2}"#, Err("unknown")),
            (None, "<html>", Err("json")),
            (None, "[]", Err("json")),
            (
                Some(MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED),
                schema1,
                Err("schema1"),
            ),
            (Some(MEDIA_TYPE_DOCKER_SCHEMA1), schema1, Err("schema1")),
            (Some("application/json"), schema1, Err("schema1")),
            (
                None,
                artifact,
                Err("unsupported application/vnd.oci.artifact.manifest.v1+json"),
            ),
            (
                Some("application/vnd.oci.artifact.manifest.v1+json"),
                artifact,
                Err("unsupported application/vnd.oci.artifact.manifest.v1+json"),
            ),
        ];
        for (content_type, body, want) in cases {
            let want = want.map_err(str::to_owned);
            assert_eq!(kind(*content_type, body), want, "{content_type:?} {body}");
        }
    }

    #[test]
    fn parses_manifests() {
        let d = digest('a');
        let umoci = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{MEDIA_TYPE_OCI_CONFIG}","digest":"{d}","size":7,"annotations":{{"a":"b"}}}},"layers":[{{"mediaType":"{MEDIA_TYPE_OCI_LAYER_GZIP}","digest":"{d}","size":9}}]}}"#
        );
        let m = parse_manifest(umoci.as_bytes(), "img").expect("valid manifest");
        assert_eq!(m.config.size, 7);
        assert_eq!(m.layers[0].media_type, MEDIA_TYPE_OCI_LAYER_GZIP);

        let helm = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.cncf.helm.config.v1+json","digest":"{d}","size":7}},"layers":[]}}"#
        );
        let err = parse_manifest(helm.as_bytes(), "img").expect_err("not an image");
        assert_eq!(
            err.to_string(),
            "image img has unsupported media type application/vnd.cncf.helm.config.v1+json"
        );
        let err = parse_manifest(br#"{"config":{},"layers":[]}"#, "img").expect_err("bad");
        assert!(
            matches!(err, RegistryError::InvalidManifest { .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "registry answered an invalid manifest for img"
        );
    }

    fn entry(c: char, platform: Option<(&str, &str, Option<&str>)>) -> IndexEntry {
        IndexEntry {
            media_type: MEDIA_TYPE_OCI_MANIFEST.into(),
            digest: digest(c),
            size: 1,
            platform: platform.map(|(os, architecture, variant)| IndexPlatform {
                os: os.into(),
                architecture: architecture.into(),
                variant: variant.map(Into::into),
            }),
            annotations: HashMap::new(),
        }
    }

    fn platform(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
        Platform {
            os: os.into(),
            architecture: architecture.into(),
            variant: variant.map(Into::into),
        }
    }

    /// `expected` is the chosen entry's digest character, or the list of
    /// available platforms.
    fn check(entries: &[IndexEntry], want: Platform, expected: Result<char, &str>) {
        let got = select_platform(entries, &want)
            .map(|e| e.digest.clone())
            .map_err(|available| available.join(", "));
        assert_eq!(
            got,
            expected.map(digest).map_err(str::to_owned),
            "want {want}"
        );
    }

    #[test]
    fn platform_selection() {
        let mut attestation = entry('0', Some(("unknown", "unknown", None)));
        attestation.annotations.insert(
            "vnd.docker.reference.type".into(),
            "attestation-manifest".into(),
        );
        let multi = [
            entry('1', Some(("linux", "amd64", None))),
            attestation,
            entry('2', Some(("linux", "arm64", Some("v8")))),
            entry('3', Some(("linux", "arm", Some("v6")))),
            entry('4', Some(("linux", "arm", Some("v7")))),
            entry('5', Some(("windows", "amd64", None))),
            entry('6', Some(("linux", "amd64", Some("v3")))),
        ];
        let all = "linux/amd64, linux/arm64/v8, linux/arm/v6, linux/arm/v7, windows/amd64, linux/amd64/v3";
        check(&multi, platform("linux", "amd64", None), Ok('1'));
        check(&multi, platform("linux", "amd64", Some("v1")), Ok('1'));
        check(&multi, platform("linux", "amd64", Some("v3")), Ok('6'));
        check(&multi, platform("linux", "arm64", Some("v8")), Ok('2'));
        check(&multi, platform("linux", "arm64", None), Ok('2'));
        check(&multi, platform("linux", "arm", Some("v7")), Ok('4'));
        check(&multi, platform("linux", "arm", None), Ok('4'));
        check(&multi, platform("linux", "arm", Some("v6")), Ok('3'));
        check(&multi, platform("linux", "arm", Some("v5")), Err(all));
        check(&multi, platform("windows", "amd64", None), Ok('5'));
        check(&multi, platform("linux", "riscv64", None), Err(all));
        check(&multi, platform("unknown", "unknown", None), Err(all));

        // arm64 without a variant is v8; an armv7 host runs armv6 images.
        let older = [
            entry('1', Some(("linux", "arm64", None))),
            entry('2', Some(("linux", "arm", Some("v5")))),
            entry('3', Some(("linux", "arm", Some("v6")))),
        ];
        check(&older, platform("linux", "arm64", Some("v8")), Ok('1'));
        check(&older, platform("linux", "arm", Some("v7")), Ok('3'));
        check(
            &older,
            platform("linux", "amd64", None),
            Err("linux/arm64, linux/arm/v5, linux/arm/v6"),
        );

        let single = [entry('7', None)];
        check(&single, platform("linux", "amd64", None), Ok('7'));
        check(&[], platform("linux", "amd64", None), Err(""));
    }

    #[test]
    fn host_platform() {
        let p = Platform::host();
        assert_eq!(p.os, "linux");
        if cfg!(target_arch = "x86_64") {
            assert_eq!(p.to_string(), "linux/amd64");
        }
        if cfg!(target_arch = "aarch64") {
            assert_eq!(p.to_string(), "linux/arm64/v8");
        }
    }

    fn challenge(scheme: &str, params: &[(&str, &str)]) -> Challenge {
        Challenge {
            scheme: scheme.into(),
            params: params
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn www_authenticate() {
        let cases: Vec<(&str, Vec<Challenge>)> = vec![
            // Docker Hub
            (
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/redis:pull""#,
                vec![challenge(
                    "Bearer",
                    &[
                        ("realm", "https://auth.docker.io/token"),
                        ("service", "registry.docker.io"),
                        ("scope", "repository:library/redis:pull"),
                    ],
                )],
            ),
            // Quoted commas and colons in the scope
            (
                r#"Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:user/app:pull,push""#,
                vec![challenge(
                    "Bearer",
                    &[
                        ("realm", "https://ghcr.io/token"),
                        ("service", "ghcr.io"),
                        ("scope", "repository:user/app:pull,push"),
                    ],
                )],
            ),
            // Quay: no scope; spaces after commas
            (
                r#"Bearer realm="https://quay.io/v2/auth", service="quay.io""#,
                vec![challenge(
                    "Bearer",
                    &[("realm", "https://quay.io/v2/auth"), ("service", "quay.io")],
                )],
            ),
            // distribution with htpasswd
            (
                r#"Basic realm="Registry Realm""#,
                vec![challenge("Basic", &[("realm", "Registry Realm")])],
            ),
            // ECR
            (
                r#"Basic realm="https://1234.dkr.ecr.eu-west-1.amazonaws.com/",service="ecr.amazonaws.com""#,
                vec![challenge(
                    "Basic",
                    &[
                        ("realm", "https://1234.dkr.ecr.eu-west-1.amazonaws.com/"),
                        ("service", "ecr.amazonaws.com"),
                    ],
                )],
            ),
            // Unquoted values, odd case, spaces around "="
            (
                "bearer Realm = https://r.example/token?x=1,service=r.example",
                vec![challenge(
                    "bearer",
                    &[
                        ("realm", "https://r.example/token?x=1"),
                        ("service", "r.example"),
                    ],
                )],
            ),
            // Two challenges in one header; escapes in quoted strings
            (
                r#"Basic realm="say \"hi\", please", Bearer realm="https://a/t",service="s""#,
                vec![
                    challenge("Basic", &[("realm", r#"say "hi", please"#)]),
                    challenge("Bearer", &[("realm", "https://a/t"), ("service", "s")]),
                ],
            ),
            // Bare scheme; empty header
            ("Negotiate", vec![challenge("Negotiate", &[])]),
            ("", vec![]),
            // Unterminated quote keeps what there is
            (
                r#"Bearer realm="https://a/t"#,
                vec![challenge("Bearer", &[("realm", "https://a/t")])],
            ),
        ];
        for (header, want) in cases {
            assert_eq!(parse_challenges(header), want, "header {header}");
        }
        let c = &parse_challenges(r#"Bearer realm="https://a/t",service="s""#)[0];
        assert_eq!(c.param("realm"), Some("https://a/t"));
        assert_eq!(c.param("scope"), None);
    }

    #[test]
    fn image_config() {
        let d = digest('d');
        // Docker writes nulls for empty fields; umoci leaves them out.
        let docker = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"User":"","Env":["PATH=/bin"],"Cmd":null,"Entrypoint":["/app"],"WorkingDir":"/srv","ExposedPorts":{{"8080/tcp":{{}}}},"StopSignal":"SIGQUIT","Labels":null,"Healthcheck":{{"Test":["NONE"]}}}},"rootfs":{{"type":"layers","diff_ids":["{d}"]}},"history":[]}}"#
        );
        let c: ImageConfig = serde_json::from_str(&docker).expect("docker config");
        assert_eq!(c.architecture, "amd64");
        assert_eq!(c.config.env.as_deref(), Some(&["PATH=/bin".to_owned()][..]));
        assert_eq!(c.config.cmd, None);
        assert_eq!(
            c.config.entrypoint.as_deref(),
            Some(&["/app".to_owned()][..])
        );
        assert_eq!(c.config.working_dir.as_deref(), Some("/srv"));
        assert_eq!(c.config.stop_signal.as_deref(), Some("SIGQUIT"));
        let ports: Vec<&String> = c
            .config
            .exposed_ports
            .iter()
            .flat_map(|p| p.keys())
            .collect();
        assert_eq!(ports, ["8080/tcp"]);
        assert_eq!(c.rootfs.kind, "layers");
        assert_eq!(c.rootfs.diff_ids, vec![d.clone()]);

        let minimal = r#"{"architecture":"arm64","os":"linux","config":null,"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let c: ImageConfig = serde_json::from_str(minimal).expect("minimal config");
        assert_eq!(c.config, ContainerConfig::default());
        assert!(serde_json::from_str::<ImageConfig>(r#"{"os":"linux"}"#).is_err());
    }

    #[test]
    fn descriptor_serde() {
        let d = Descriptor {
            media_type: MEDIA_TYPE_OCI_LAYER.into(),
            digest: digest('e'),
            size: 3,
        };
        let json = serde_json::to_string(&d).expect("serialize");
        assert_eq!(
            json,
            format!(
                r#"{{"mediaType":"{MEDIA_TYPE_OCI_LAYER}","digest":"{}","size":3}}"#,
                digest('e')
            )
        );
    }

    #[test]
    fn config_from_toml_like_json() {
        let c: RegistryConfig = serde_json::from_str(
            r#"{"insecure":["127.0.0.1:5000"],"credentials":{"ghcr.io":{"username":"u","password":"p"}}}"#,
        )
        .expect("config");
        assert_eq!(c.insecure, ["127.0.0.1:5000"]);
        assert!(!format!("{:?}", c.credentials).contains("\"p\""));
        assert!(serde_json::from_str::<RegistryConfig>(r#"{"insecur":[]}"#).is_err());
    }
}
