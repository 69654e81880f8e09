//! The repository on disk: its lock, staged metadata renamed into place, target files.
//!
//! Layout: metadata at the top (`N.root.json`, `root.json`, `N.targets.json`,
//! `N.snapshot.json`, `timestamp.json`), target files under `targets/` named the way tough's
//! consistent snapshots fetch them: `<sha256>.<target name>`. Every file is written under
//! another name and renamed into place, `timestamp.json` last: a client sees the old
//! repository or the new one.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use aws_lc_rs::digest::{Context, SHA256};
use nix::fcntl::{Flock, FlockArg};
use tempfile::TempDir;

use crate::error::{Error, Result};
use crate::manifest::TargetFile;

/// Where target files live inside a repository.
pub const TARGETS_DIR: &str = "targets";

pub(crate) fn sha256(bytes: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&SHA256, bytes).as_ref().to_vec()
}

/// Reads `src` to its end, writing it to `dst` if given; returns its length and sha256.
fn hash_copy(src: &mut File, mut dst: Option<&mut File>) -> std::io::Result<(u64, Vec<u8>)> {
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0; 1 << 20];
    let mut len = 0u64;
    loop {
        match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                ctx.update(&buf[..n]);
                if let Some(dst) = dst.as_mut() {
                    dst.write_all(&buf[..n])?;
                }
                len += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((len, ctx.finish().as_ref().to_vec()))
}

fn sha256_file_blocking(path: &Path) -> Result<(u64, Vec<u8>)> {
    File::open(path)
        .and_then(|mut f| hash_copy(&mut f, None))
        .map_err(Error::io("read", path))
}

/// Length and sha256 of a file, read on a blocking thread.
pub(crate) async fn sha256_file(path: &Path) -> Result<(u64, Vec<u8>)> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || sha256_file_blocking(&owned))
        .await
        .map_err(|e| Error::io("read", path)(e.into()))?
}

/// An exclusive lock on the repository folder, held until dropped: two publishes, or a
/// publish and a cron refresh, do not interleave.
pub(crate) struct Lock(#[allow(dead_code, reason = "held for its Drop")] Flock<File>);

pub(crate) fn lock(repo: &Path) -> Result<Lock> {
    let dir = File::open(repo).map_err(Error::io("open", repo))?;
    Flock::lock(dir, FlockArg::LockExclusive)
        .map(Lock)
        .map_err(|(_, errno)| Error::io("lock", repo)(errno.into()))
}

/// A private folder inside the repository where metadata is written before it is renamed
/// into place; removed when dropped.
pub(crate) struct Staging {
    dir: TempDir,
    repo: PathBuf,
}

impl Staging {
    pub fn new(repo: &Path) -> Result<Staging> {
        let dir = tempfile::Builder::new()
            .prefix(".staging-")
            .tempdir_in(repo)
            .map_err(Error::io("create a staging folder in", repo))?;
        Ok(Staging {
            dir,
            repo: repo.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Flushes the staged `names` and renames them into the repository, in this order.
    pub fn install<S: AsRef<str>>(&self, names: &[S]) -> Result<()> {
        for name in names {
            let from = self.path().join(name.as_ref());
            File::open(&from)
                .and_then(|f| f.sync_all())
                .map_err(Error::io("flush", &from))?;
        }
        for name in names {
            let from = self.path().join(name.as_ref());
            let to = self.repo.join(name.as_ref());
            std::fs::rename(&from, &to).map_err(Error::io("rename into place", &to))?;
        }
        sync_dir(&self.repo)
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io("flush", dir))
}

/// Where tough's client fetches a target from when the repository uses consistent snapshots.
pub(crate) fn target_path(repo: &Path, name: &str, sha256: &[u8]) -> PathBuf {
    repo.join(TARGETS_DIR)
        .join(format!("{}.{name}", hex::encode(sha256)))
}

/// Copies a checked file into the repository's targets (a file with that name and content
/// already there is kept). Returns where it is.
pub(crate) async fn copy_target(repo: &Path, file: &TargetFile) -> Result<PathBuf> {
    let repo = repo.to_owned();
    let file = file.clone();
    let path = file.path.clone();
    tokio::task::spawn_blocking(move || copy_target_blocking(&repo, &file))
        .await
        .map_err(|e| Error::io("copy", path)(e.into()))?
}

fn copy_target_blocking(repo: &Path, file: &TargetFile) -> Result<PathBuf> {
    let dest = target_path(repo, &file.name, &file.sha256);
    if dest.is_file() && sha256_file_blocking(&dest)? == (file.length, file.sha256.clone()) {
        return Ok(dest);
    }
    let parent = dest.parent().unwrap_or(repo);
    std::fs::create_dir_all(parent).map_err(Error::io("create", parent))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".copy-")
        .tempfile_in(parent)
        .map_err(Error::io("create a file in", parent))?;
    let (length, sha256) = File::open(&file.path)
        .and_then(|mut src| hash_copy(&mut src, Some(tmp.as_file_mut())))
        .map_err(Error::io("copy", &file.path))?;
    tmp.as_file()
        .sync_all()
        .map_err(Error::io("flush", tmp.path()))?;
    // What was copied is what was checked: the source could have changed since.
    if (length, &sha256) != (file.length, &file.sha256) {
        return Err(Error::ArtifactHash {
            path: file.path.clone(),
            expected: hex::encode(&file.sha256),
            actual: hex::encode(sha256),
        });
    }
    let mode = std::os::unix::fs::PermissionsExt::from_mode(0o644);
    std::fs::set_permissions(tmp.path(), mode).map_err(Error::io("chmod", tmp.path()))?;
    tmp.persist(&dest)
        .map_err(|e| Error::io("rename into place", &dest)(e.error))?;
    sync_dir(parent)?;
    Ok(dest)
}
