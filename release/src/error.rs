use std::path::PathBuf;

use crate::expiry::ExpiryError;
use crate::keys::Role;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path} exists already: refusing to overwrite a key")]
    KeyExists { path: PathBuf },
    #[error("generate the {role} key")]
    KeyGen { role: Role },
    #[error("no {role} key at {path}")]
    KeyMissing { role: Role, path: PathBuf },
    #[error("{path} is not a PKCS#8 signing key")]
    KeyInvalid {
        path: PathBuf,
        #[source]
        source: Box<tough::error::Error>,
    },
    #[error("compute the key id of {path}")]
    KeyId {
        path: PathBuf,
        #[source]
        source: Box<tough::schema::Error>,
    },
    #[error("{path} is not the {role} key that root metadata version {root_version} lists")]
    KeyNotInRoot {
        role: Role,
        path: PathBuf,
        root_version: u64,
    },

    #[error("{path} holds a repository already")]
    RepoExists { path: PathBuf },
    #[error("no repository at {path} (root.json missing; run init first)")]
    NoRepo { path: PathBuf },
    #[error("load the repository at {path}")]
    Load {
        path: PathBuf,
        #[source]
        source: Box<tough::error::Error>,
    },
    #[error("{what}")]
    Tuf {
        what: String,
        #[source]
        source: Box<tough::error::Error>,
    },
    #[error("the new root does not satisfy root version {version}")]
    RootCheck {
        version: u64,
        #[source]
        source: Box<tough::schema::Error>,
    },

    #[error("parse {path}")]
    ManifestParse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("{path} is {actual} bytes but update.json says compressed_size {expected}")]
    ArtifactSize {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{path} has sha256 {actual} but update.json says compressed_sha256 {expected}")]
    ArtifactHash {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{name} is published already with other content: give the build a new version")]
    AlreadyPublished { name: String },

    #[error("snapshot metadata expires at {expires}: renewing it needs the snapshot key")]
    SnapshotKeyNeeded {
        expires: jiff::Timestamp,
        #[source]
        source: Box<Error>,
    },
    #[error(transparent)]
    Expiry(#[from] ExpiryError),
}

impl Error {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    }

    pub(crate) fn tuf(what: impl Into<String>) -> impl FnOnce(tough::error::Error) -> Error {
        let what = what.into();
        move |source| Error::Tuf {
            what,
            source: Box::new(source),
        }
    }
}
