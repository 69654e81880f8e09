//! Signs Homeport OS updates into a TUF repository that devices check with `tough`.
//!
//! One Ed25519 key per role ([`keygen`]); [`init`] writes the first root and empty
//! metadata; [`publish`] adds an image build's update artifacts as the targets
//! `<board>/<version>/{update.json, root.erofs.zst, uki-a.efi.zst, uki-b.efi.zst}`;
//! [`refresh`] re-signs the timestamp (a server's cron); [`rotate_root`] moves the repository
//! to new keys; [`prune`] drops old releases. Every change is signed in memory, then written beside the repository and
//! renamed into place, target files first and `timestamp.json` last, under a lock: bad input
//! leaves the repository as it was. `docs/releases.md` is the operator's guide.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};

use aws_lc_rs::rand::SystemRandom;
use jiff::Timestamp;
use tough::editor::signed::SignedRole;
use tough::editor::RepositoryEditor;
use tough::schema::{Hashes, KeyHolder, Metafile, RoleKeys, Root, Target};
use tough::{ExpirationEnforcement, FilesystemTransport, Repository, RepositoryLoader, TargetName};
use url::Url;

mod error;
mod expiry;
mod keys;
mod manifest;
mod prune;
mod store;
pub mod testing;

pub use error::{Error, Result};
pub use expiry::{Expires, Expiry, ExpiryError};
pub use keys::{keygen, Role};
pub use manifest::{target_name, TARGET_FILES};
pub use prune::{prune, Pruned};
pub use store::TARGETS_DIR;

use keys::RoleKey;
use manifest::Release;
use store::Staging;

const SPEC_VERSION: &str = "1.0.0";

/// How long the first root is valid, and the other roles' lifetimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitOptions {
    pub root_expires: Expires,
    pub expiry: Expiry,
}

impl Default for InitOptions {
    /// A root valid for a year; [`Expiry::default`] for the rest.
    fn default() -> Self {
        InitOptions {
            root_expires: Expires::days(365),
            expiry: Expiry::default(),
        }
    }
}

/// What [`publish`] added.
#[derive(Debug, Clone)]
pub struct Published {
    pub board: String,
    pub version: String,
    /// The release's four targets, in the order of [`TARGET_FILES`].
    pub targets: Vec<PublishedTarget>,
    pub targets_version: u64,
    pub snapshot_version: u64,
    pub timestamp_version: u64,
    pub timestamp_expires: Timestamp,
}

/// One published file.
#[derive(Debug, Clone)]
pub struct PublishedTarget {
    /// The target name, e.g. `qemu-x86_64/0.1.0.1712345678/root.erofs.zst`.
    pub name: String,
    /// The file in the repository (tough's consistent-snapshot name: `targets/<sha256>.<name>`).
    pub path: PathBuf,
    pub length: u64,
    /// Hex.
    pub sha256: String,
}

/// What [`refresh`] signed.
#[derive(Debug, Clone)]
pub struct Refreshed {
    pub timestamp_version: u64,
    pub timestamp_expires: Timestamp,
    /// The new snapshot's version and expiry, when it was renewed.
    pub snapshot: Option<(u64, Timestamp)>,
    /// Only a publish renews targets: when this is near, publish again.
    pub targets_expires: Timestamp,
}

/// What [`rotate_root`] signed.
#[derive(Debug, Clone)]
pub struct Rotated {
    pub root_version: u64,
    pub root_expires: Timestamp,
    pub targets_version: u64,
    pub snapshot_version: u64,
    pub timestamp_version: u64,
}

/// The `file://` URLs of a repository's metadata and targets, as a device would be given them
/// over HTTP (`<base>/` and `<base>/targets/`).
pub fn urls(repo: &Path) -> Result<(Url, Url)> {
    let repo = std::fs::canonicalize(repo).map_err(Error::io("open", repo))?;
    let url = |p: &Path| {
        Url::from_directory_path(p).map_err(|()| {
            Error::io("make a URL of", p)(std::io::Error::other("not an absolute path"))
        })
    };
    Ok((url(&repo)?, url(&repo.join(TARGETS_DIR))?))
}

/// Loads and verifies the repository at `repo` the way a device does, starting from
/// `trusted_root` (the contents of a root.json the device holds), over `file://` URLs.
pub async fn load(
    repo: &Path,
    trusted_root: &[u8],
    expiration: ExpirationEnforcement,
) -> Result<Repository> {
    let (metadata, targets) = urls(repo)?;
    RepositoryLoader::new(&trusted_root, metadata, targets)
        .transport(FilesystemTransport)
        .expiration_enforcement(expiration)
        .load()
        .await
        .map_err(|source| Error::Load {
            path: repo.to_owned(),
            source: Box::new(source),
        })
}

/// Loads the repository for an edit, trusting its own newest root and ignoring expiry (the
/// point of a refresh is expired metadata). Returns it and the file of its newest root.
async fn load_for_edit(repo: &Path) -> Result<(Repository, PathBuf)> {
    let root_json = repo.join("root.json");
    let root = std::fs::read(&root_json).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NoRepo {
            path: repo.to_owned(),
        },
        _ => Error::io("read", &root_json)(e),
    })?;
    let loaded = load(repo, &root, ExpirationEnforcement::Unsafe).await?;
    let newest = repo.join(format!("{}.root.json", loaded.root().signed.version));
    Ok((loaded, newest))
}

fn canonical_repo(repo: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(repo).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NoRepo {
            path: repo.to_owned(),
        },
        _ => Error::io("open", repo)(e),
    })
}

fn next(v: NonZeroU64) -> NonZeroU64 {
    v.saturating_add(1)
}

/// A root listing `keys` (one per role, threshold 1), with consistent snapshots.
fn new_root(version: NonZeroU64, keys: &[RoleKey], expires: Timestamp) -> Result<Root> {
    let mut root = Root {
        spec_version: SPEC_VERSION.to_owned(),
        consistent_snapshot: true,
        version,
        expires,
        keys: HashMap::new(),
        roles: HashMap::new(),
        _extra: HashMap::new(),
    };
    for key in keys {
        let id = key.id()?;
        root.keys.insert(id.clone(), key.public.clone());
        root.roles.insert(
            key.role.role_type(),
            RoleKeys {
                keyids: vec![id],
                threshold: NonZeroU64::MIN,
                _extra: HashMap::new(),
            },
        );
    }
    Ok(root)
}

/// Signs `root` with each `(root that lists the key, root key)`, and checks that every one of
/// those roots accepts the result (a rotated root must satisfy the old root and itself).
async fn sign_root(
    root: &Root,
    first: (&Root, &RoleKey),
    more: &[(&Root, &RoleKey)],
) -> Result<SignedRole<Root>> {
    let rng = SystemRandom::new();
    let sign = |(holder, key): (&Root, &RoleKey)| {
        let holder = KeyHolder::Root(holder.clone());
        let source = key.source();
        let path = key.path.clone();
        let rng = &rng;
        async move {
            SignedRole::new(root.clone(), &holder, &[source], rng)
                .await
                .map_err(Error::tuf(format!(
                    "sign root metadata with {}",
                    path.display()
                )))
        }
    };
    let mut signed = sign(first).await?;
    for &signer in more {
        let one = sign(signer).await?;
        signed = signed
            .add_old_signatures(one.signed().signatures.clone())
            .map_err(Error::tuf("combine root signatures"))?;
    }
    let signers = std::iter::once(&first).chain(more);
    for (holder, _) in signers {
        holder
            .verify_role(signed.signed())
            .map_err(|source| Error::RootCheck {
                version: holder.version.get(),
                source: Box::new(source),
            })?;
    }
    Ok(signed)
}

/// Writes a signed root into `staging` as `N.root.json` and `root.json`; returns both names.
async fn stage_root(staging: &Staging, root: &SignedRole<Root>) -> Result<[String; 2]> {
    root.write(staging.path(), true)
        .await
        .map_err(Error::tuf("write root metadata"))?;
    let root_json = staging.path().join("root.json");
    std::fs::write(&root_json, root.buffer()).map_err(Error::io("write", &root_json))?;
    Ok([
        format!("{}.root.json", root.signed().signed.version),
        "root.json".to_owned(),
    ])
}

/// The versions targets, snapshot and timestamp are signed with.
struct Versions {
    targets: NonZeroU64,
    snapshot: NonZeroU64,
    timestamp: NonZeroU64,
}

/// Signs targets, snapshot and timestamp with `editor` into `staging`; returns the file
/// names in the order they must be installed (`timestamp.json` last) and when the timestamp
/// expires.
async fn sign_roles(
    mut editor: RepositoryEditor,
    versions: &Versions,
    expiry: &Expiry,
    keys: &[RoleKey],
    staging: &Staging,
) -> Result<(Vec<String>, Timestamp)> {
    let now = Timestamp::now();
    let timestamp_expires = expiry.timestamp.resolve(now)?;
    editor
        .targets_version(versions.targets)
        .map_err(Error::tuf("set the targets version"))?
        .targets_expires(expiry.targets.resolve(now)?)
        .map_err(Error::tuf("set the targets expiry"))?;
    editor
        .snapshot_version(versions.snapshot)
        .snapshot_expires(expiry.snapshot.resolve(now)?)
        .timestamp_version(versions.timestamp)
        .timestamp_expires(timestamp_expires);
    let signed = editor
        .sign(&keys::sources(keys))
        .await
        .map_err(Error::tuf("sign targets, snapshot and timestamp metadata"))?;
    signed
        .write(staging.path())
        .await
        .map_err(Error::tuf("write metadata"))?;
    let names = vec![
        format!("{}.targets.json", versions.targets),
        format!("{}.snapshot.json", versions.snapshot),
        "timestamp.json".to_owned(),
    ];
    Ok((names, timestamp_expires))
}

/// Writes a new repository into `repo` (created if missing): root version 1 listing the four
/// keys in `keys`, signed by the root key, and empty targets, snapshot and timestamp, all
/// version 1. Refuses a folder that holds a repository already.
pub async fn init(keys: &Path, repo: &Path, opts: &InitOptions) -> Result<()> {
    let all = Role::ALL
        .iter()
        .map(|&role| RoleKey::load(keys, role))
        .collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(repo).map_err(Error::io("create", repo))?;
    let repo = canonical_repo(repo)?;
    let _lock = store::lock(&repo)?;
    for existing in ["root.json", "1.root.json", "timestamp.json"] {
        if repo.join(existing).exists() {
            return Err(Error::RepoExists { path: repo });
        }
    }
    let now = Timestamp::now();
    let root = new_root(NonZeroU64::MIN, &all, opts.root_expires.resolve(now)?)?;
    let signed_root = sign_root(&root, (&root, &all[0]), &[]).await?;

    let targets_dir = repo.join(TARGETS_DIR);
    std::fs::create_dir_all(&targets_dir).map_err(Error::io("create", &targets_dir))?;
    let staging = Staging::new(&repo)?;
    let mut names = stage_root(&staging, &signed_root).await?.to_vec();
    let editor = RepositoryEditor::new(staging.path().join(&names[0]))
        .await
        .map_err(Error::tuf("read the new root metadata"))?;
    let one = NonZeroU64::MIN;
    let versions = Versions {
        targets: one,
        snapshot: one,
        timestamp: one,
    };
    let (more, _) = sign_roles(editor, &versions, &opts.expiry, &all[1..], &staging).await?;
    names.extend(more);
    staging.install(&names)
}

/// Publishes the image build described by `update_json` (its artifacts lie beside it): checks
/// every compressed artifact's size and sha256 against it, adds the four targets
/// `<board>/<version>/…` to those already in `repo`, copies the files into `repo/targets/`, and
/// signs new targets, snapshot and timestamp metadata (each one version up) with the keys in
/// `keys` (targets, snapshot and timestamp; the root key is not needed).
///
/// `expiry` may lie in the past: tests publish expired metadata this way.
pub async fn publish(
    keys: &Path,
    repo: &Path,
    update_json: &Path,
    expiry: &Expiry,
) -> Result<Published> {
    let release = Release::read(update_json).await?;
    let repo = canonical_repo(repo)?;
    let _lock = store::lock(&repo)?;
    let (current, root_path) = load_for_edit(&repo).await?;
    let signers = keys::load_checked(
        keys,
        &[Role::Targets, Role::Snapshot, Role::Timestamp],
        &current.root().signed,
    )?;

    for file in &release.files {
        let name = TargetName::new(file.name.as_str())
            .map_err(Error::tuf(format!("target name {}", file.name)))?;
        if let Some(t) = current.targets().signed.targets.get(&name) {
            if t.length != file.length || t.hashes.sha256.as_ref() != file.sha256.as_slice() {
                return Err(Error::AlreadyPublished {
                    name: file.name.clone(),
                });
            }
        }
    }

    let versions = Versions {
        targets: next(current.targets().signed.version),
        snapshot: next(current.snapshot().signed.version),
        timestamp: next(current.timestamp().signed.version),
    };
    let mut editor = RepositoryEditor::from_repo(&root_path, current)
        .await
        .map_err(Error::tuf("read the repository for editing"))?;
    for file in &release.files {
        let target = Target {
            length: file.length,
            hashes: Hashes {
                sha256: file.sha256.clone().into(),
                _extra: HashMap::new(),
            },
            custom: HashMap::new(),
            _extra: HashMap::new(),
        };
        editor
            .add_target(file.name.as_str(), target)
            .map_err(Error::tuf(format!("add target {}", file.name)))?;
    }
    let staging = Staging::new(&repo)?;
    let (names, timestamp_expires) =
        sign_roles(editor, &versions, expiry, &signers, &staging).await?;

    let mut targets = Vec::new();
    for file in &release.files {
        let path = store::copy_target(&repo, file).await?;
        targets.push(PublishedTarget {
            name: file.name.clone(),
            path,
            length: file.length,
            sha256: hex::encode(&file.sha256),
        });
    }
    staging.install(&names)?;
    Ok(Published {
        board: release.board,
        version: release.version,
        targets,
        targets_version: versions.targets.get(),
        snapshot_version: versions.snapshot.get(),
        timestamp_version: versions.timestamp.get(),
        timestamp_expires,
    })
}

/// What [`refresh`] signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshOptions {
    /// The new timestamp's lifetime.
    pub timestamp: Expires,
    /// The snapshot's lifetime, when it is renewed: when it would expire within two timestamp
    /// lifetimes. Renewing it needs the snapshot key.
    pub snapshot: Expires,
}

impl Default for RefreshOptions {
    fn default() -> Self {
        let e = Expiry::default();
        RefreshOptions {
            timestamp: e.timestamp,
            snapshot: e.snapshot,
        }
    }
}

/// Signs a new timestamp (one version up) with the timestamp key in `keys`, and a new
/// snapshot too when the current one expires within two timestamp lifetimes. Nothing else
/// changes; targets are renewed only by [`publish`].
pub async fn refresh(keys: &Path, repo: &Path, opts: &RefreshOptions) -> Result<Refreshed> {
    let repo = canonical_repo(repo)?;
    let _lock = store::lock(&repo)?;
    let (current, _) = load_for_edit(&repo).await?;
    let root = current.root().signed.clone();
    let holder = KeyHolder::Root(root.clone());
    let ts_key = keys::load_checked(keys, &[Role::Timestamp], &root)?;
    let rng = SystemRandom::new();
    let now = Timestamp::now();
    let ts_expires = opts.timestamp.resolve(now)?;
    let renew_before = ts_expires
        .checked_add(ts_expires.duration_since(now))
        .unwrap_or(ts_expires);

    let staging = Staging::new(&repo)?;
    let mut names = Vec::new();
    let mut timestamp = current.timestamp().signed.clone();
    timestamp.version = next(timestamp.version);
    timestamp.expires = ts_expires;
    let old_snapshot = &current.snapshot().signed;
    let mut renewed = None;
    if old_snapshot.expires <= renew_before {
        let snap_key = keys::load_checked(keys, &[Role::Snapshot], &root).map_err(|e| {
            Error::SnapshotKeyNeeded {
                expires: old_snapshot.expires,
                source: Box::new(e),
            }
        })?;
        let mut snapshot = old_snapshot.clone();
        snapshot.version = next(snapshot.version);
        snapshot.expires = opts.snapshot.resolve(now)?;
        let signed = SignedRole::new(snapshot, &holder, &keys::sources(&snap_key), &rng)
            .await
            .map_err(Error::tuf("sign snapshot metadata"))?;
        signed
            .write(staging.path(), true)
            .await
            .map_err(Error::tuf("write snapshot metadata"))?;
        let s = &signed.signed().signed;
        timestamp.meta.insert(
            "snapshot.json".to_owned(),
            Metafile {
                length: Some(*signed.length()),
                hashes: Some(Hashes {
                    sha256: signed.sha256().to_vec().into(),
                    _extra: HashMap::new(),
                }),
                version: s.version,
                _extra: HashMap::new(),
            },
        );
        names.push(format!("{}.snapshot.json", s.version));
        renewed = Some((s.version.get(), s.expires));
    }
    let version = timestamp.version.get();
    let signed = SignedRole::new(timestamp, &holder, &keys::sources(&ts_key), &rng)
        .await
        .map_err(Error::tuf("sign timestamp metadata"))?;
    signed
        .write(staging.path(), true)
        .await
        .map_err(Error::tuf("write timestamp metadata"))?;
    names.push("timestamp.json".to_owned());
    staging.install(&names)?;
    Ok(Refreshed {
        timestamp_version: version,
        timestamp_expires: ts_expires,
        snapshot: renewed,
        targets_expires: current.targets().signed.expires,
    })
}

/// Moves the repository to the four keys in `new_keys`: writes root version N+1 listing them,
/// signed by the current root key (in `old_keys`) and the new one, then signs targets,
/// snapshot and timestamp with the new keys. A device holding any earlier root follows the
/// chain of `N.root.json` files to the new one.
pub async fn rotate_root(
    old_keys: &Path,
    new_keys: &Path,
    repo: &Path,
    opts: &InitOptions,
) -> Result<Rotated> {
    let new = Role::ALL
        .iter()
        .map(|&role| RoleKey::load(new_keys, role))
        .collect::<Result<Vec<_>>>()?;
    let repo = canonical_repo(repo)?;
    let _lock = store::lock(&repo)?;
    let (current, _) = load_for_edit(&repo).await?;
    let old_root = current.root().signed.clone();
    let old_root_key = keys::load_checked(old_keys, &[Role::Root], &old_root)?;

    let now = Timestamp::now();
    let root_expires = opts.root_expires.resolve(now)?;
    let root = new_root(next(old_root.version), &new, root_expires)?;
    let signed_root = sign_root(&root, (&root, &new[0]), &[(&old_root, &old_root_key[0])]).await?;

    let staging = Staging::new(&repo)?;
    let mut names = stage_root(&staging, &signed_root).await?.to_vec();
    let versions = Versions {
        targets: next(current.targets().signed.version),
        snapshot: next(current.snapshot().signed.version),
        timestamp: next(current.timestamp().signed.version),
    };
    let editor = RepositoryEditor::from_repo(staging.path().join(&names[0]), current)
        .await
        .map_err(Error::tuf("read the repository for editing"))?;
    let (more, _) = sign_roles(editor, &versions, &opts.expiry, &new[1..], &staging).await?;
    names.extend(more);
    staging.install(&names)?;
    Ok(Rotated {
        root_version: root.version.get(),
        root_expires,
        targets_version: versions.targets.get(),
        snapshot_version: versions.snapshot.get(),
        timestamp_version: versions.timestamp.get(),
    })
}
