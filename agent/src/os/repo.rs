//! The update repository: TUF metadata through `tough` (root baked into the image, trusted
//! metadata kept on the data partition for rollback and freeze protection), targets named
//! `<board>/<version>/{update.json,root.erofs.zst,uki-a.efi.zst,uki-b.efi.zst}`.
//!
//! A target is downloaded into a spool file on the data partition while tough checks its
//! length and hash; only a target that passed goes near a slot. The slot is then written by
//! decompressing the spool, checking the uncompressed length and hash from `update.json`
//! (itself a verified target) as it goes.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tough::{RepositoryLoader, TargetName, Transport, TransportError, TransportErrorKind};
use url::Url;

use super::version::ImageVersion;
use super::OsError;

/// Where updates come from and what is trusted.
#[derive(Debug, Clone)]
pub struct Source {
    /// The repository's base URL (metadata at the top, targets under `targets/`).
    pub url: Url,
    /// The root metadata the image trusts.
    pub root: PathBuf,
    /// Trusted metadata seen so far (survives reboots and slot changes).
    pub datastore: PathBuf,
}

/// A release found in the repository, newer than what runs.
pub struct Release {
    pub version: ImageVersion,
    pub manifest: UpdateManifest,
    repo: tough::Repository,
    prefix: String,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct UpdateManifest {
    pub board: String,
    pub version: ImageVersion,
    pub artifacts: HashMap<String, Artifact>,
}

/// One artifact of a release, as the image build describes it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Artifact {
    /// Length and SHA-256 of the uncompressed content (what lands in the slot).
    pub size: u64,
    pub sha256: String,
    pub compressed_size: u64,
}

impl UpdateManifest {
    pub fn artifact(&self, name: &str) -> Result<&Artifact, OsError> {
        self.artifacts
            .get(name)
            .ok_or_else(|| OsError::Release(format!("update.json has no artifact {name:?}")))
    }
}

/// Plain HTTP(S) for TUF: the metadata and targets are verified by signatures and hashes,
/// not by the connection (like Debian's archive), so a LAN mirror over HTTP is fine.
#[derive(Debug, Clone)]
struct HttpTransport {
    client: reqwest::Client,
}

#[tough::async_trait]
impl Transport for HttpTransport {
    async fn fetch(&self, url: Url) -> Result<tough::TransportStream, TransportError> {
        match url.scheme() {
            "http" | "https" => {}
            "file" => return tough::FilesystemTransport.fetch(url).await,
            _ => {
                return Err(TransportError::new(
                    TransportErrorKind::UnsupportedUrlScheme,
                    url,
                ))
            }
        }
        let resp = self.client.get(url.as_str()).send().await.map_err(|e| {
            TransportError::new_with_cause(TransportErrorKind::Other, url.clone(), e)
        })?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::FORBIDDEN {
            return Err(TransportError::new(TransportErrorKind::FileNotFound, url));
        }
        if !status.is_success() {
            return Err(TransportError::new_with_cause(
                TransportErrorKind::Other,
                url,
                std::io::Error::other(format!("HTTP {status}")),
            ));
        }
        // Through a channel: the stream tough wants is Sync, a response body is not.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, TransportError>>(8);
        let mut body = resp.bytes_stream();
        tokio::spawn(async move {
            while let Some(chunk) = body.next().await {
                let item = chunk.map_err(|e| {
                    TransportError::new_with_cause(TransportErrorKind::Other, url.clone(), e)
                });
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(Box::pin(futures_util::stream::poll_fn(move |cx| {
            rx.poll_recv(cx)
        })))
    }
}

/// What a tough failure means, in the words `os status` shows. A hash mismatch found while
/// a target streams arrives wrapped in a transport error: the cause decides.
fn tuf_error(e: tough::error::Error) -> OsError {
    OsError::Repository {
        kind: kind_of(&e).unwrap_or("repository metadata"),
        detail: e.to_string(),
    }
}

fn kind_of(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use tough::error::Error as E;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut transport = false;
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<E>() {
            match t {
                E::ExpiredMetadata { .. } => return Some("expired metadata"),
                E::VerifyMetadata { .. }
                | E::VerifyTrustedMetadata { .. }
                | E::VerifyRoleMetadata { .. } => return Some("bad signature"),
                E::OlderMetadata { .. } => return Some("rollback attempt"),
                E::HashMismatch { .. } | E::MaxSizeExceeded { .. } => return Some("hash mismatch"),
                E::Transport { .. } => transport = true,
                _ => {}
            }
        }
        cur = err.source();
    }
    transport.then_some("repository unreachable")
}

impl Source {
    /// Loads and verifies the repository's metadata, and returns the newest release for
    /// `board` newer than `running` and not in `refused`.
    pub async fn check(
        &self,
        client: &reqwest::Client,
        board: &str,
        running: &ImageVersion,
        refused: &[ImageVersion],
    ) -> Result<Option<Release>, OsError> {
        let root = std::fs::read(&self.root).map_err(|e| OsError::NoTrustedRoot {
            path: self.root.clone(),
            source: e,
        })?;
        std::fs::create_dir_all(&self.datastore).map_err(|e| OsError::io(&self.datastore, e))?;
        let base = with_slash(&self.url);
        let targets = base
            .join("targets/")
            .map_err(|e| OsError::Config(format!("repository URL {base}: {e}")))?;
        let repo = RepositoryLoader::new(&root, base, targets)
            .transport(HttpTransport {
                client: client.clone(),
            })
            .datastore(self.datastore.clone())
            .load()
            .await
            .map_err(tuf_error)?;
        let mut best: Option<ImageVersion> = None;
        for (name, _) in repo.all_targets() {
            let Some(v) = release_version(name.raw(), board) else {
                continue;
            };
            if v > *running && !refused.contains(&v) && best.as_ref().is_none_or(|b| v > *b) {
                best = Some(v);
            }
        }
        let Some(version) = best else {
            return Ok(None);
        };
        let prefix = format!("{board}/{version}/");
        let bytes = read_small(&repo, &format!("{prefix}update.json")).await?;
        let manifest: UpdateManifest = serde_json::from_slice(&bytes)
            .map_err(|e| OsError::Release(format!("{prefix}update.json: {e}")))?;
        if manifest.board != board || manifest.version != version {
            return Err(OsError::Release(format!(
                "{prefix}update.json describes {} {}",
                manifest.board, manifest.version
            )));
        }
        Ok(Some(Release {
            version,
            manifest,
            repo,
            prefix,
        }))
    }
}

fn with_slash(u: &Url) -> Url {
    let mut u = u.clone();
    if !u.path().ends_with('/') {
        let p = format!("{}/", u.path());
        u.set_path(&p);
    }
    u
}

/// `<board>/<version>/update.json` → version.
fn release_version(target: &str, board: &str) -> Option<ImageVersion> {
    let rest = target.strip_prefix(board)?.strip_prefix('/')?;
    rest.strip_suffix("/update.json")?.parse().ok()
}

async fn read_small(repo: &tough::Repository, name: &str) -> Result<Vec<u8>, OsError> {
    use tough::IntoVec;
    let target = TargetName::new(name).map_err(tuf_error)?;
    let stream = repo
        .read_target(&target)
        .await
        .map_err(tuf_error)?
        .ok_or_else(|| OsError::Release(format!("the repository lists no {name}")))?;
    stream.into_vec().await.map_err(tuf_error)
}

impl Release {
    /// Downloads target `file` of this release into `dest`, verified by tough as it is
    /// written. On any failure `dest` is removed.
    pub async fn download(&self, file: &str, dest: &Path) -> Result<u64, OsError> {
        let result = self.download_inner(file, dest).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(dest).await;
        }
        result
    }

    async fn download_inner(&self, file: &str, dest: &Path) -> Result<u64, OsError> {
        use tokio::io::AsyncWriteExt;
        let name = format!("{}{file}", self.prefix);
        let target = TargetName::new(&name).map_err(tuf_error)?;
        let mut stream = self
            .repo
            .read_target(&target)
            .await
            .map_err(tuf_error)?
            .ok_or_else(|| OsError::Release(format!("the repository lists no {name}")))?;
        let mut f = tokio::fs::File::create(dest)
            .await
            .map_err(|e| OsError::io(dest, e))?;
        let mut n = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(tuf_error)?;
            n += chunk.len() as u64;
            f.write_all(&chunk)
                .await
                .map_err(|e| OsError::io(dest, e))?;
        }
        f.sync_all().await.map_err(|e| OsError::io(dest, e))?;
        Ok(n)
    }
}

/// Decompresses a verified spool file into `dest` (a slot's partition, or the ESP's
/// temporary file), checking the uncompressed length against the room there and the
/// content against `artifact`. Blocking.
pub fn write_decompressed(
    spool: &Path,
    dest: &mut dyn Write,
    room: u64,
    artifact: &Artifact,
    what: &str,
) -> Result<u64, OsError> {
    if artifact.size > room {
        return Err(OsError::DiskTooSmall {
            what: what.to_string(),
            need: artifact.size,
            have: room,
        });
    }
    let f = std::fs::File::open(spool).map_err(|e| OsError::io(spool, e))?;
    let mut dec = zstd::stream::read::Decoder::new(f).map_err(|e| OsError::io(spool, e))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let got = dec.read(&mut buf).map_err(|e| {
            OsError::Release(format!("{what}: the download does not decompress: {e}"))
        })?;
        if got == 0 {
            break;
        }
        n += got as u64;
        if n > artifact.size {
            return Err(OsError::Release(format!(
                "{what}: longer than the {} bytes update.json gives",
                artifact.size
            )));
        }
        hash.update(&buf[..got]);
        dest.write_all(&buf[..got])
            .map_err(|e| OsError::Io(format!("write {what}: {e}")))?;
    }
    let got = hex::encode(hash.finalize());
    if n != artifact.size || got != artifact.sha256 {
        return Err(OsError::Repository {
            kind: "hash mismatch",
            detail: format!(
                "{what}: {n} bytes with sha256 {got}, update.json gives {} bytes with {}",
                artifact.size, artifact.sha256
            ),
        });
    }
    dest.flush()
        .map_err(|e| OsError::Io(format!("write {what}: {e}")))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_versions_come_from_update_json_targets() {
        let v = |s: &str| s.parse::<ImageVersion>().unwrap();
        assert_eq!(
            release_version("qemu-x86_64/0.1.0.5/update.json", "qemu-x86_64"),
            Some(v("0.1.0.5"))
        );
        assert_eq!(
            release_version("qemu-x86_64/0.1.0.5/root.erofs.zst", "qemu-x86_64"),
            None
        );
        assert_eq!(
            release_version("rpi4/0.1.0.5/update.json", "qemu-x86_64"),
            None
        );
        assert_eq!(
            release_version("qemu-x86_64-x/0.1.0.5/update.json", "qemu-x86_64"),
            None
        );
        assert_eq!(
            release_version("qemu-x86_64/latest/update.json", "qemu-x86_64"),
            None
        );
    }

    #[test]
    fn decompressed_writes_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let content = b"an erofs image, say".repeat(1000);
        let spool = dir.path().join("root.zst");
        std::fs::write(&spool, zstd::encode_all(&content[..], 3).unwrap()).unwrap();
        let art = Artifact {
            size: content.len() as u64,
            sha256: hex::encode(Sha256::digest(&content)),
            compressed_size: 0,
        };
        let mut out = Vec::new();
        let n = write_decompressed(&spool, &mut out, 1 << 30, &art, "root").unwrap();
        assert_eq!((n, &out), (content.len() as u64, &content));

        let e = write_decompressed(&spool, &mut Vec::new(), 100, &art, "slot b").unwrap_err();
        assert!(matches!(e, OsError::DiskTooSmall { need, have: 100, .. } if need == art.size));
        assert!(e.to_string().contains("slot b"), "{e}");

        let wrong = Artifact {
            sha256: "00".repeat(32),
            ..art.clone()
        };
        let e = write_decompressed(&spool, &mut Vec::new(), 1 << 30, &wrong, "root").unwrap_err();
        assert!(e.to_string().contains("hash mismatch"), "{e}");

        std::fs::write(&spool, b"not zstd").unwrap();
        let e = write_decompressed(&spool, &mut Vec::new(), 1 << 30, &art, "root").unwrap_err();
        assert!(e.to_string().contains("does not decompress"), "{e}");
    }
}
