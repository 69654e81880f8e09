//! The four role keys: one Ed25519 key per role, each a PKCS#8 (DER) file `<role>.pk8`.

use std::fmt;
use std::fs::{DirBuilder, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::Ed25519KeyPair;
use tough::key_source::{KeySource, LocalKeySource};
use tough::schema::decoded::{Decoded, Hex};
use tough::schema::key::Key;
use tough::schema::{RoleType, Root};
use tough::sign::{parse_keypair, Sign};

use crate::error::{Error, Result};

/// A top-level TUF role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Root,
    Targets,
    Snapshot,
    Timestamp,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Root, Role::Targets, Role::Snapshot, Role::Timestamp];

    pub fn name(self) -> &'static str {
        match self {
            Role::Root => "root",
            Role::Targets => "targets",
            Role::Snapshot => "snapshot",
            Role::Timestamp => "timestamp",
        }
    }

    /// Where this role's key lives in a key folder.
    pub fn key_path(self, keys: &Path) -> PathBuf {
        keys.join(format!("{}.pk8", self.name()))
    }

    pub(crate) fn role_type(self) -> RoleType {
        match self {
            Role::Root => RoleType::Root,
            Role::Targets => RoleType::Targets,
            Role::Snapshot => RoleType::Snapshot,
            Role::Timestamp => RoleType::Timestamp,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Makes one Ed25519 key per role in `dir` (created 0700 if missing), each file 0600.
/// Refuses, writing nothing, when any of the four key files exists. Returns the files written.
pub fn keygen(dir: &Path) -> Result<Vec<PathBuf>> {
    for role in Role::ALL {
        let path = role.key_path(dir);
        if path.symlink_metadata().is_ok() {
            return Err(Error::KeyExists { path });
        }
    }
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(Error::io("create", dir))?;
    let rng = SystemRandom::new();
    let mut written = Vec::new();
    for role in Role::ALL {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| Error::KeyGen { role })?;
        let path = role.key_path(dir);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| match e.kind() {
                ErrorKind::AlreadyExists => Error::KeyExists { path: path.clone() },
                _ => Error::io("create", &path)(e),
            })?;
        file.write_all(pkcs8.as_ref())
            .and_then(|()| file.sync_all())
            .map_err(Error::io("write", &path))?;
        written.push(path);
    }
    Ok(written)
}

/// A role's key, read and parsed: its file and its public half.
#[derive(Debug)]
pub(crate) struct RoleKey {
    pub role: Role,
    pub path: PathBuf,
    pub public: Key,
}

impl RoleKey {
    /// Reads `dir/<role>.pk8`.
    pub fn load(dir: &Path, role: Role) -> Result<RoleKey> {
        let path = role.key_path(dir);
        let der = std::fs::read(&path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => Error::KeyMissing {
                role,
                path: path.clone(),
            },
            _ => Error::io("read", &path)(e),
        })?;
        let public = parse_keypair(&der)
            .map_err(|source| Error::KeyInvalid {
                path: path.clone(),
                source: Box::new(source),
            })?
            .tuf_key();
        Ok(RoleKey { role, path, public })
    }

    /// The key id TUF metadata refers to this key by.
    pub fn id(&self) -> Result<Decoded<Hex>> {
        self.public.key_id().map_err(|source| Error::KeyId {
            path: self.path.clone(),
            source: Box::new(source),
        })
    }

    /// Fails unless `root` lists this key for its role.
    pub fn check(&self, root: &Root) -> Result<()> {
        let id = self.id()?;
        let listed = root
            .roles
            .get(&self.role.role_type())
            .is_some_and(|keys| keys.keyids.contains(&id));
        if listed {
            Ok(())
        } else {
            Err(Error::KeyNotInRoot {
                role: self.role,
                path: self.path.clone(),
                root_version: root.version.get(),
            })
        }
    }

    /// What tough signs with.
    pub fn source(&self) -> Box<dyn KeySource> {
        Box::new(LocalKeySource {
            path: self.path.clone(),
        })
    }
}

/// Loads the keys of `roles` from `dir` and checks each against `root`.
pub(crate) fn load_checked(dir: &Path, roles: &[Role], root: &Root) -> Result<Vec<RoleKey>> {
    roles
        .iter()
        .map(|&role| {
            let key = RoleKey::load(dir, role)?;
            key.check(root)?;
            Ok(key)
        })
        .collect()
}

pub(crate) fn sources(keys: &[RoleKey]) -> Vec<Box<dyn KeySource>> {
    keys.iter().map(RoleKey::source).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keygen_writes_private_keys_once() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let written = keygen(&keys).unwrap();
        assert_eq!(written.len(), 4);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&keys), 0o700);
        let mut ids = Vec::new();
        for role in Role::ALL {
            let path = role.key_path(&keys);
            assert_eq!(mode(&path), 0o600, "{role}");
            ids.push(RoleKey::load(&keys, role).unwrap().id().unwrap());
        }
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 4, "four different keys");

        let before = std::fs::read(Role::Targets.key_path(&keys)).unwrap();
        std::fs::remove_file(Role::Timestamp.key_path(&keys)).unwrap();
        let err = keygen(&keys).unwrap_err();
        assert!(matches!(err, Error::KeyExists { .. }), "{err}");
        assert_eq!(
            std::fs::read(Role::Targets.key_path(&keys)).unwrap(),
            before
        );
        assert!(!Role::Timestamp.key_path(&keys).exists(), "nothing written");
    }

    #[test]
    fn load_names_the_missing_or_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = RoleKey::load(dir.path(), Role::Snapshot).unwrap_err();
        assert!(err.to_string().contains("no snapshot key at"), "{err}");
        std::fs::write(Role::Snapshot.key_path(dir.path()), b"not a key").unwrap();
        let err = RoleKey::load(dir.path(), Role::Snapshot).unwrap_err();
        assert!(err.to_string().contains("snapshot.pk8 is not"), "{err}");
    }
}
