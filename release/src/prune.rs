//! Dropping old releases: their targets, their files, and metadata no device can still need.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashSet};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use tough::editor::RepositoryEditor;
use tough::TargetName;

use crate::error::{Error, Result};
use crate::keys::{self, Role};
use crate::store::{self, Staging, TARGETS_DIR};
use crate::{load_for_edit, next, sign_roles, Expiry, Versions};

/// What [`prune`] removed.
#[derive(Debug, Clone, Default)]
pub struct Pruned {
    /// The releases dropped from the targets, `(board, version)`.
    pub releases: Vec<(String, String)>,
    /// Files deleted: target files no target names, old metadata, leftovers of crashes.
    pub files: Vec<PathBuf>,
    /// The versions signed, when releases were dropped.
    pub versions: Option<(u64, u64, u64)>,
}

/// Keeps the `keep` newest releases of each board (versions compared part by part, numbers as
/// numbers: `0.1.0.999` < `0.1.0.1000`) and drops the others from the targets, signing new
/// targets, snapshot and timestamp with the keys in `keys`. Then deletes the files in
/// `targets/` that no target names, `N.targets.json` and `N.snapshot.json` older than the
/// previous ones (a device that read the previous timestamp may still fetch those), and
/// staging folders left by a crash. Roots are always kept. Targets not named
/// `<board>/<version>/<file>` are left alone.
pub async fn prune(
    keys: &Path,
    repo: &Path,
    keep: NonZeroUsize,
    expiry: &Expiry,
) -> Result<Pruned> {
    let repo = crate::canonical_repo(repo)?;
    let _lock = store::lock(&repo)?;
    let (current, root_path) = load_for_edit(&repo).await?;

    let mut releases: BTreeMap<(String, String), Vec<TargetName>> = BTreeMap::new();
    for name in current.targets().signed.targets.keys() {
        let parts: Vec<&str> = name.raw().split('/').collect();
        if let [board, version, _] = parts[..] {
            releases
                .entry((board.to_owned(), version.to_owned()))
                .or_default()
                .push(name.clone());
        }
    }
    let mut by_board: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (board, version) in releases.keys() {
        by_board.entry(board).or_default().push(version);
    }
    let mut dropped = Vec::new();
    for (board, mut versions) in by_board {
        versions.sort_by(|a, b| version_cmp(b, a));
        for version in versions.into_iter().skip(keep.get()) {
            dropped.push((board.to_owned(), version.to_owned()));
        }
    }

    let mut pruned = Pruned::default();
    let mut targets_version = current.targets().signed.version;
    let mut snapshot_version = current.snapshot().signed.version;
    let mut remaining: Vec<(String, Vec<u8>)> = current
        .targets()
        .signed
        .targets
        .iter()
        .map(|(n, t)| (n.raw().to_owned(), t.hashes.sha256.to_vec()))
        .collect();
    if !dropped.is_empty() {
        let signers = keys::load_checked(
            keys,
            &[Role::Targets, Role::Snapshot, Role::Timestamp],
            &current.root().signed,
        )?;
        let versions = Versions {
            targets: next(current.targets().signed.version),
            snapshot: next(current.snapshot().signed.version),
            timestamp: next(current.timestamp().signed.version),
        };
        let gone: HashSet<&TargetName> = dropped
            .iter()
            .flat_map(|release| releases.get(release).into_iter().flatten())
            .collect();
        remaining.retain(|(name, _)| !gone.iter().any(|g| g.raw() == name));
        let mut editor = RepositoryEditor::from_repo(&root_path, current)
            .await
            .map_err(Error::tuf("read the repository for editing"))?;
        for name in &gone {
            editor
                .remove_target(name)
                .map_err(Error::tuf(format!("remove target {}", name.raw())))?;
        }
        let staging = Staging::new(&repo)?;
        let (names, _) = sign_roles(editor, &versions, expiry, &signers, &staging).await?;
        staging.install(&names)?;
        targets_version = versions.targets;
        snapshot_version = versions.snapshot;
        pruned.versions = Some((
            versions.targets.get(),
            versions.snapshot.get(),
            versions.timestamp.get(),
        ));
        pruned.releases = dropped;
    }

    // Files: only after the metadata that stopped naming them is in place.
    let keep_files: HashSet<PathBuf> = remaining
        .iter()
        .map(|(name, sha)| store::target_path(&repo, name, sha))
        .collect();
    remove_unlisted(&repo.join(TARGETS_DIR), &keep_files, &mut pruned.files)?;
    for entry in std::fs::read_dir(&repo).map_err(Error::io("list", &repo))? {
        let entry = entry.map_err(Error::io("list", &repo))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let stale = match name.split_once('.') {
            Some((v, "targets.json")) => v
                .parse::<u64>()
                .is_ok_and(|v| v.saturating_add(1) < targets_version.get()),
            Some((v, "snapshot.json")) => v
                .parse::<u64>()
                .is_ok_and(|v| v.saturating_add(1) < snapshot_version.get()),
            _ => false,
        };
        if stale {
            std::fs::remove_file(&path).map_err(Error::io("remove", &path))?;
            pruned.files.push(path);
        } else if name.starts_with(".staging-") && path.is_dir() {
            // Ours hold the lock; this one was left by a crash.
            std::fs::remove_dir_all(&path).map_err(Error::io("remove", &path))?;
            pruned.files.push(path);
        }
    }
    Ok(pruned)
}

/// Deletes every file under `dir` not in `keep`, and the folders this leaves empty.
fn remove_unlisted(dir: &Path, keep: &HashSet<PathBuf>, removed: &mut Vec<PathBuf>) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("list", dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(Error::io("list", dir))?.path();
        let meta = path
            .symlink_metadata()
            .map_err(Error::io("inspect", &path))?;
        if meta.is_dir() {
            remove_unlisted(&path, keep, removed)?;
            if std::fs::read_dir(&path)
                .map_err(Error::io("list", &path))?
                .next()
                .is_none()
            {
                std::fs::remove_dir(&path).map_err(Error::io("remove", &path))?;
            }
        } else if !keep.contains(&path) {
            std::fs::remove_file(&path).map_err(Error::io("remove", &path))?;
            removed.push(path);
        }
    }
    Ok(())
}

/// Compares versions part by part (parts split at `.`, `-`, `+`, `~`), numbers as numbers.
fn version_cmp(a: &str, b: &str) -> Ordering {
    let parts =
        |s: &str| -> Vec<String> { s.split(['.', '-', '+', '~']).map(str::to_owned).collect() };
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(&pb) {
        let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let ord = if numeric(x) && numeric(y) {
            let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
            x.len().cmp(&y.len()).then_with(|| x.cmp(y))
        } else {
            x.cmp(y)
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    pa.len().cmp(&pb.len()).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numbers_as_numbers() {
        let mut v = vec![
            "0.1.0.1000",
            "0.1.0.999",
            "0.2.0.1",
            "0.1.0.1000-rc1",
            "0.10.0.1",
            "0.1.0.01000",
        ];
        v.sort_by(|a, b| version_cmp(a, b));
        assert_eq!(
            v,
            [
                "0.1.0.999",
                "0.1.0.01000",
                "0.1.0.1000",
                "0.1.0.1000-rc1",
                "0.2.0.1",
                "0.10.0.1"
            ]
        );
    }
}
