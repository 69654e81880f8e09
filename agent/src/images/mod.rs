//! OCI images: references, registry pulls, and the content-addressed layer store.
//!
//! A layer is downloaded and unpacked in one pass (the compressed digest and the diff_id are
//! checked while streaming) into `tmp/`, then renamed to `layers/<id>` and marked ready.
//! Layers are shared by every image that lists them and stacked as overlayfs lower dirs.
//! An image row is written only once all its layers are ready, so a crash never leaves a
//! half image: what a crash leaves (tmp dirs, layers no image lists) is removed at start.

pub mod digest;
pub mod reference;
pub mod registry;
pub mod unpack;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::paths::Paths;
use crate::store::{Store, StoreError};
use digest::Digest;
use reference::ImageRef;
use registry::{Descriptor, Platform, Registry, RegistryConfig, RegistryError};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("layer {layer} of {image}")]
    Unpack {
        image: String,
        layer: Digest,
        source: unpack::UnpackError,
    },
    #[error("image {image}: {message}")]
    Invalid { image: String, message: String },
    #[error("{what}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

type Result<T> = std::result::Result<T, ImageError>;

/// Pull progress, streamed to the CLI.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Progress {
    Resolved {
        reference: String,
        digest: String,
        layers: usize,
        bytes: u64,
    },
    Layer {
        digest: String,
        done: u64,
        total: u64,
    },
    LayerDone {
        digest: String,
        cached: bool,
        bytes: u64,
    },
}

pub struct Pulled {
    pub image_id: i64,
    /// What the reference resolved to (the app is pinned to it).
    pub resolved: Digest,
}

pub struct Images {
    store: Arc<Store>,
    paths: Paths,
    registry: Registry,
    platform: Platform,
    /// One pull at a time: two pulls never race for the same layer.
    pull_lock: tokio::sync::Mutex<()>,
}

/// Layers downloaded at once within one pull.
const PARALLEL_LAYERS: usize = 3;

impl Images {
    pub fn new(store: Arc<Store>, paths: Paths, config: RegistryConfig) -> Result<Images> {
        Ok(Images {
            store,
            paths,
            registry: Registry::new(config)?,
            platform: Platform::host(),
            pull_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The registry client (its settings can change at run time).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Removes what an interrupted pull left: the tmp dir, layers no image lists, and layer
    /// directories without a row.
    pub fn recover(&self) -> Result<()> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| ImageError::Io { what, source }
        };
        let tmp = self.paths.tmp();
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io("clean tmp dir"))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io("create tmp dir"))?;
        std::fs::create_dir_all(self.paths.empty_layer()).map_err(io("create layers dir"))?;
        for id in self.store.orphan_layers()? {
            remove_dir(&self.paths.layer(id)).map_err(io("remove orphan layer"))?;
            self.store.delete_layer(id)?;
            tracing::info!(layer = id, "removed a layer left by an interrupted pull");
        }
        let known: HashSet<String> = self
            .store
            .layer_ids()?
            .iter()
            .map(|i| i.to_string())
            .collect();
        for e in std::fs::read_dir(self.paths.layers())
            .map_err(io("read layers dir"))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name != "empty" && !known.contains(&name) {
                remove_dir(&e.path()).map_err(io("remove stray layer dir"))?;
            }
        }
        Ok(())
    }

    /// Resolves `r`, downloads and unpacks what is missing, and records the image.
    pub async fn pull(&self, r: &ImageRef, progress: &(dyn Fn(Progress) + Sync)) -> Result<Pulled> {
        let _one = self.pull_lock.lock().await;
        let resolved = self.registry.resolve(r, &self.platform).await?;
        let total: u64 = resolved.manifest.layers.iter().map(|l| l.size).sum();
        progress(Progress::Resolved {
            reference: r.to_string(),
            digest: resolved.digest.to_string(),
            layers: resolved.manifest.layers.len(),
            bytes: total,
        });
        let name = r.to_string();
        if let Some(img) = self.store.image_by_digest(&resolved.manifest_digest)? {
            let id = self.store.insert_image(
                &img.digest,
                &img.config_digest,
                &img.config,
                &[],
                &name,
                &resolved.digest,
            )?;
            for l in &resolved.manifest.layers {
                progress(Progress::LayerDone {
                    digest: l.digest.to_string(),
                    cached: true,
                    bytes: l.size,
                });
            }
            return Ok(Pulled {
                image_id: id,
                resolved: resolved.digest,
            });
        }
        let (config, config_bytes) = self
            .registry
            .fetch_config(r, &resolved.manifest.config)
            .await?;
        let diff_ids = config.rootfs.diff_ids.clone();
        if diff_ids.len() != resolved.manifest.layers.len() {
            return Err(ImageError::Invalid {
                image: name,
                message: format!(
                    "the manifest lists {} layers but the config {} diff_ids",
                    resolved.manifest.layers.len(),
                    diff_ids.len()
                ),
            });
        }

        let mut created = Vec::new();
        let result = self
            .fetch_layers(
                r,
                &resolved.manifest.layers,
                &diff_ids,
                progress,
                &mut created,
            )
            .await;
        let layer_ids = match result {
            Ok(ids) => ids,
            Err(e) => {
                // Keep nothing from a failed pull.
                for id in created {
                    let _ = remove_dir(&self.paths.layer(id));
                    let _ = self.store.delete_layer(id);
                }
                return Err(e);
            }
        };
        let config_digest = resolved.manifest.config.digest.clone();
        let id = self.store.insert_image(
            &resolved.manifest_digest,
            &config_digest,
            &config_bytes,
            &layer_ids,
            &name,
            &resolved.digest,
        )?;
        tracing::info!(image = %name, digest = %resolved.digest, "image pulled");
        Ok(Pulled {
            image_id: id,
            resolved: resolved.digest,
        })
    }

    async fn fetch_layers(
        &self,
        r: &ImageRef,
        layers: &[Descriptor],
        diff_ids: &[Digest],
        progress: &(dyn Fn(Progress) + Sync),
        created: &mut Vec<i64>,
    ) -> Result<Vec<i64>> {
        use futures_util::stream::{self, StreamExt};
        let mut ids = vec![0i64; layers.len()];
        let mut todo = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            match self.store.layer(&l.digest)? {
                Some(row) if row.ready => {
                    ids[i] = row.id;
                    progress(Progress::LayerDone {
                        digest: l.digest.to_string(),
                        cached: true,
                        bytes: l.size,
                    });
                }
                Some(row) => {
                    // Left unfinished by a crash that recovery has not seen yet.
                    remove_dir(&self.paths.layer(row.id)).map_err(|source| ImageError::Io {
                        what: "remove unfinished layer".into(),
                        source,
                    })?;
                    self.store.delete_layer(row.id)?;
                    todo.push(i);
                }
                None => todo.push(i),
            }
        }
        // Rows first (so a failure can clean up), then parallel downloads.
        let mut jobs = Vec::new();
        for i in todo {
            let l = &layers[i];
            let id =
                self.store
                    .begin_layer(&l.digest, Some(&diff_ids[i]), &l.media_type, l.size)?;
            created.push(id);
            ids[i] = id;
            jobs.push((i, id));
        }
        // Every download runs to its end (each cleans up after itself on failure) before an
        // error is returned, so nothing is still writing into tmp/ when the pull gives up.
        let results: Vec<Result<(i64, u64)>> = stream::iter(jobs)
            .map(|(i, id)| self.fetch_layer(r, &layers[i], &diff_ids[i], id, progress))
            .buffer_unordered(PARALLEL_LAYERS)
            .collect()
            .await;
        let done = results.into_iter().collect::<Result<Vec<_>>>()?;
        for (id, bytes) in done {
            crate::crashpoint("pull:layer-unpacked");
            self.store.finish_layer(id, bytes)?;
        }
        crate::crashpoint("pull:layers-ready");
        Ok(ids)
    }

    async fn fetch_layer(
        &self,
        r: &ImageRef,
        layer: &Descriptor,
        diff_id: &Digest,
        id: i64,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<(i64, u64)> {
        let tmp = self.paths.tmp().join(format!("layer-{id}"));
        let dest = self.paths.layer(id);
        let io = |what: String| move |source| ImageError::Io { what, source };
        std::fs::create_dir_all(&tmp).map_err(io(format!("create {}", tmp.display())))?;

        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(32);
        let (media_type, digest, diff) = (
            layer.media_type.clone(),
            layer.digest.clone(),
            diff_id.clone(),
        );
        let unpack_dir = tmp.clone();
        let image = r.to_string();
        let unpacker = tokio::task::spawn_blocking(move || {
            let input = unpack::LayerInput {
                media_type: &media_type,
                digest: &digest,
                diff_id: Some(&diff),
            };
            let stats = unpack::unpack_layer(ChannelReader::new(rx), &unpack_dir, &input).map_err(
                |source| ImageError::Unpack {
                    image,
                    layer: digest.clone(),
                    source,
                },
            )?;
            unpack::sync_dir(&unpack_dir).map_err(|source| ImageError::Io {
                what: format!("sync {}", unpack_dir.display()),
                source,
            })?;
            Ok::<_, ImageError>(stats)
        });

        let download = async {
            let mut blob = self.registry.blob(r, layer).await?;
            let (mut done, mut last) = (0u64, Instant::now());
            while let Some(chunk) = blob.next_chunk().await? {
                if done == 0 {
                    crate::crashpoint("pull:downloading");
                }
                done += chunk.len() as u64;
                if tx.send(Ok(chunk)).await.is_err() {
                    break; // the unpacker stopped; its error says why
                }
                if last.elapsed() > Duration::from_millis(200) {
                    last = Instant::now();
                    progress(Progress::Layer {
                        digest: layer.digest.to_string(),
                        done,
                        total: layer.size,
                    });
                }
            }
            drop(tx);
            Ok::<u64, ImageError>(done)
        };
        let downloaded = download.await;
        let unpacked = unpacker
            .await
            .unwrap_or_else(|e| panic!("unpack task panicked: {e}"));
        let outcome = match (downloaded, unpacked) {
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
            (Ok(_), Ok(stats)) => Ok(stats),
        };
        let stats = match outcome {
            Ok(s) => s,
            Err(e) => {
                let _ = remove_dir(&tmp);
                return Err(e);
            }
        };
        std::fs::rename(&tmp, &dest).map_err(io(format!("move layer into {}", dest.display())))?;
        progress(Progress::LayerDone {
            digest: layer.digest.to_string(),
            cached: false,
            bytes: layer.size,
        });
        Ok((id, stats.bytes))
    }

    /// Unpacked layer directories of an image, bottom first.
    pub fn layer_dirs(&self, image_id: i64) -> Result<Vec<PathBuf>> {
        Ok(self
            .store
            .layers_of(image_id)?
            .iter()
            .map(|l| self.paths.layer(l.id))
            .collect())
    }

    /// Removes images no app uses and the layers only they used.
    pub fn prune(&self) -> Result<PruneReport> {
        let mut report = PruneReport::default();
        for usage in self.store.images()? {
            if usage.apps.is_empty() && self.store.delete_image_if_unused(usage.image.id)? {
                report.images.push(
                    usage
                        .references
                        .first()
                        .cloned()
                        .unwrap_or_else(|| usage.image.digest.to_string()),
                );
            }
        }
        for id in self.store.orphan_layers()? {
            let dir = self.paths.layer(id);
            report.bytes += crate::runtime::os::disk_usage(&dir);
            remove_dir(&dir).map_err(|source| ImageError::Io {
                what: format!("remove {}", dir.display()),
                source,
            })?;
            self.store.delete_layer(id)?;
            report.layers += 1;
        }
        Ok(report)
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct PruneReport {
    pub images: Vec<String>,
    pub layers: usize,
    pub bytes: u64,
}

fn remove_dir(p: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Turns the chunks of an async download into a blocking `Read` for the unpacker.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    cur: Bytes,
}

impl ChannelReader {
    fn new(rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>) -> Self {
        ChannelReader {
            rx,
            cur: Bytes::new(),
        }
    }
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.cur = chunk?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}
