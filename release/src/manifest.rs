//! The image build's `<name>.update.json` (image-build/build.sh) and the targets made from it.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::store;

/// The file names under `<board>/<version>/` that a release publishes, in this order. The
/// device's update client fetches exactly these.
pub const TARGET_FILES: [&str; 4] = [
    "update.json",
    "root.erofs.zst",
    "uki-a.efi.zst",
    "uki-b.efi.zst",
];

/// The target name of `file` (one of [`TARGET_FILES`]) of a release.
pub fn target_name(board: &str, version: &str, file: &str) -> String {
    format!("{board}/{version}/{file}")
}

#[derive(Deserialize)]
struct Manifest {
    board: String,
    version: String,
    artifacts: Artifacts,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Artifacts {
    root: Artifact,
    #[serde(rename = "uki-a")]
    uki_a: Artifact,
    #[serde(rename = "uki-b")]
    uki_b: Artifact,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Artifact {
    file: String,
    #[allow(dead_code, reason = "for the device: the tool does not decompress")]
    size: u64,
    #[allow(dead_code, reason = "for the device: the tool does not decompress")]
    sha256: String,
    compressed_size: u64,
    compressed_sha256: String,
}

/// One file to publish, checked against update.json.
#[derive(Debug, Clone)]
pub(crate) struct TargetFile {
    pub name: String,
    pub path: PathBuf,
    pub length: u64,
    pub sha256: Vec<u8>,
}

/// A release read from an update.json, every file checked: update.json first, then the root
/// filesystem and the two UKIs (the order of [`TARGET_FILES`]).
#[derive(Debug)]
pub(crate) struct Release {
    pub board: String,
    pub version: String,
    pub files: Vec<TargetFile>,
}

impl Release {
    /// Reads `update_json` and checks every compressed artifact beside it (size, sha256).
    pub async fn read(update_json: &Path) -> Result<Release> {
        let bytes = std::fs::read(update_json).map_err(Error::io("read", update_json))?;
        let bad = |reason: String| Error::Manifest {
            path: update_json.to_owned(),
            reason,
        };
        let m: Manifest =
            serde_json::from_slice(&bytes).map_err(|source| Error::ManifestParse {
                path: update_json.to_owned(),
                source,
            })?;
        check_component("board", &m.board).map_err(bad)?;
        check_component("version", &m.version).map_err(bad)?;

        let dir = update_json.parent().unwrap_or(Path::new("."));
        let mut files = vec![TargetFile {
            name: target_name(&m.board, &m.version, TARGET_FILES[0]),
            path: update_json.to_owned(),
            length: bytes.len() as u64,
            sha256: store::sha256(&bytes),
        }];
        let artifacts = [
            ("root", &m.artifacts.root, TARGET_FILES[1]),
            ("uki-a", &m.artifacts.uki_a, TARGET_FILES[2]),
            ("uki-b", &m.artifacts.uki_b, TARGET_FILES[3]),
        ];
        for (key, a, target) in artifacts {
            if a.file.is_empty() || a.file.contains('/') || a.file == "." || a.file == ".." {
                return Err(bad(format!(
                    "artifacts.{key}.file {:?} is not a file name",
                    a.file
                )));
            }
            let expected = parse_sha256(&a.compressed_sha256).ok_or_else(|| {
                bad(format!(
                    "artifacts.{key}.compressed_sha256 {:?} is not a sha256",
                    a.compressed_sha256
                ))
            })?;
            let path = dir.join(&a.file);
            let actual_len = std::fs::metadata(&path)
                .map_err(Error::io("read", &path))?
                .len();
            if actual_len != a.compressed_size {
                return Err(Error::ArtifactSize {
                    path,
                    expected: a.compressed_size,
                    actual: actual_len,
                });
            }
            let (length, sha256) = store::sha256_file(&path).await?;
            if sha256 != expected || length != a.compressed_size {
                return Err(Error::ArtifactHash {
                    path,
                    expected: hex::encode(expected),
                    actual: hex::encode(sha256),
                });
            }
            files.push(TargetFile {
                name: target_name(&m.board, &m.version, target),
                path,
                length,
                sha256,
            });
        }
        Ok(Release {
            board: m.board,
            version: m.version,
            files,
        })
    }
}

/// A board or version becomes a path component of target names and of URLs.
fn check_component(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+~-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {s:?} is not a valid name (letters, digits and ._+~- only)"
        ))
    }
}

fn parse_sha256(s: &str) -> Option<Vec<u8>> {
    let bytes = hex::decode(s).ok()?;
    (bytes.len() == 32).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components() {
        for good in ["qemu-x86_64", "0.1.0.1712345678", "1.0+rc1", "a"] {
            assert!(check_component("x", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(check_component("x", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sha256_strings() {
        assert!(parse_sha256(&"ab".repeat(32)).is_some());
        assert!(parse_sha256(&"AB".repeat(32)).is_some());
        assert!(parse_sha256(&"ab".repeat(31)).is_none());
        assert!(parse_sha256(&"zz".repeat(32)).is_none());
    }
}
