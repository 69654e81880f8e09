//! OCI image layouts written directly (no tool in between), and pushing them with skopeo.

use crate::registry::Registry;
use crate::{run, sha256_digest};
use anyhow::{bail, Context, Result};
use flate2::write::GzEncoder;
use serde_json::{json, Map, Value};
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const MEDIA_TYPE_OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// Modification time of every tar entry: layers are reproducible.
const MTIME: u64 = 1_700_000_000;

/// Builds a layer tar in memory. Paths are relative (`bin/sh`); directories need no slash.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    pub fn new() -> Self {
        let mut tar = tar::Builder::new(Vec::new());
        tar.mode(tar::HeaderMode::Deterministic);
        LayerBuilder { tar }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(MTIME);
        header.set_size(size);
        header
    }

    /// A directory owned by root.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self> {
        let mut header = Self::header(tar::EntryType::Directory, mode, 0);
        let path = format!("{}/", path.trim_end_matches('/'));
        self.tar
            .append_data(&mut header, &path, std::io::empty())
            .with_context(|| format!("tar entry {path}"))?;
        Ok(self)
    }

    /// A regular file owned by root.
    pub fn file(&mut self, path: &str, mode: u32, contents: &[u8]) -> Result<&mut Self> {
        self.file_owned(path, mode, 0, 0, contents)
    }

    /// A regular file with an owner.
    pub fn file_owned(
        &mut self,
        path: &str,
        mode: u32,
        uid: u64,
        gid: u64,
        contents: &[u8],
    ) -> Result<&mut Self> {
        let mut header = Self::header(tar::EntryType::Regular, mode, contents.len() as u64);
        header.set_uid(uid);
        header.set_gid(gid);
        self.tar
            .append_data(&mut header, path, contents)
            .with_context(|| format!("tar entry {path}"))?;
        Ok(self)
    }

    /// A symbolic link `path` -> `target` (any target, `..` and absolute included).
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self> {
        let mut header = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.tar
            .append_link(&mut header, path, target)
            .with_context(|| format!("tar entry {path}"))?;
        Ok(self)
    }

    /// A hard link `path` -> `target` (a path inside the archive, or anything else).
    pub fn hardlink(&mut self, path: &str, target: &str) -> Result<&mut Self> {
        let mut header = Self::header(tar::EntryType::Link, 0o644, 0);
        self.tar
            .append_link(&mut header, path, target)
            .with_context(|| format!("tar entry {path}"))?;
        Ok(self)
    }

    /// A whiteout deleting `path` of lower layers: the empty file `dir/.wh.NAME`.
    pub fn whiteout(&mut self, path: &str) -> Result<&mut Self> {
        let path = path.trim_end_matches('/');
        let whiteout = match path.rsplit_once('/') {
            Some((dir, name)) => format!("{dir}/.wh.{name}"),
            None => format!(".wh.{path}"),
        };
        self.file(&whiteout, 0o644, b"")
    }

    /// An opaque-directory marker: `dir/.wh..wh..opq` hides everything lower layers put in `dir`.
    pub fn opaque(&mut self, dir: &str) -> Result<&mut Self> {
        self.file(
            &format!("{}/.wh..wh..opq", dir.trim_end_matches('/')),
            0o644,
            b"",
        )
    }

    /// An entry whose name and link name are written as raw bytes into the header (at most 100
    /// bytes each), with no check at all: for `..` and absolute names, which `set_path` refuses.
    pub fn raw(
        &mut self,
        name: &[u8],
        kind: tar::EntryType,
        link_name: &[u8],
        mode: u32,
        contents: &[u8],
    ) -> Result<&mut Self> {
        let mut header = Self::header(kind, mode, contents.len() as u64);
        let old = header.as_old_mut();
        if name.len() > old.name.len() || link_name.len() > old.linkname.len() {
            bail!("raw tar names are limited to 100 bytes");
        }
        old.name[..name.len()].copy_from_slice(name);
        old.linkname[..link_name.len()].copy_from_slice(link_name);
        header.set_cksum();
        self.tar.append(&header, contents)?;
        Ok(self)
    }

    /// The finished tar archive.
    pub fn into_tar(self) -> Result<Vec<u8>> {
        Ok(self.tar.into_inner()?)
    }

    /// The finished archive as a gzip layer.
    pub fn into_layer(self) -> Result<Layer> {
        Layer::gzip(&self.into_tar()?)
    }
}

/// A layer blob with what a manifest and a config need to know about it.
#[derive(Clone, Debug)]
pub struct Layer {
    /// The blob as stored in the registry (compressed for gzip layers).
    pub blob: Arc<[u8]>,
    /// `sha256:…` of `blob`.
    pub digest: String,
    /// `sha256:…` of the uncompressed tar (`rootfs.diff_ids` in the config).
    pub diff_id: String,
    pub media_type: String,
}

impl Layer {
    /// Gzips a tar (gzip header without name or time: reproducible).
    pub fn gzip(tar: &[u8]) -> Result<Layer> {
        let mut encoder = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(tar)?;
        let blob = encoder.finish()?;
        Ok(Layer {
            digest: sha256_digest(&blob),
            diff_id: sha256_digest(tar),
            blob: blob.into(),
            media_type: MEDIA_TYPE_OCI_LAYER_GZIP.into(),
        })
    }

    /// An uncompressed tar layer (`application/vnd.oci.image.layer.v1.tar`).
    pub fn uncompressed(tar: Vec<u8>) -> Layer {
        let digest = sha256_digest(&tar);
        Layer {
            diff_id: digest.clone(),
            digest,
            blob: tar.into(),
            media_type: MEDIA_TYPE_OCI_LAYER.into(),
        }
    }

    /// Any blob with any media type (for attestations and other non-filesystem layers).
    pub fn other(blob: Vec<u8>, media_type: &str) -> Layer {
        Layer::uncompressed(blob).with_media_type(media_type)
    }

    fn with_media_type(mut self, media_type: &str) -> Layer {
        self.media_type = media_type.into();
        self
    }
}

/// The parts of an image config a test cares about.
#[derive(Clone, Debug)]
pub struct ImageConfig {
    /// GOARCH spelling: `amd64`, `arm64`, …
    pub architecture: String,
    pub os: String,
    pub variant: Option<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    /// `KEY=value`
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    /// `8080/tcp`
    pub exposed_ports: Vec<String>,
    pub labels: Vec<(String, String)>,
}

impl Default for ImageConfig {
    /// The host's architecture, Linux, a standard `PATH` and nothing else.
    fn default() -> Self {
        ImageConfig {
            architecture: host_architecture().into(),
            os: "linux".into(),
            variant: None,
            entrypoint: None,
            cmd: None,
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            working_dir: None,
            user: None,
            exposed_ports: Vec::new(),
            labels: Vec::new(),
        }
    }
}

/// The host's architecture in GOARCH spelling.
fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

impl ImageConfig {
    /// The config blob (OCI image config) for these layers.
    pub fn to_json(&self, layers: &[Layer]) -> Value {
        let mut config = Map::new();
        if let Some(user) = &self.user {
            config.insert("User".into(), json!(user));
        }
        if !self.exposed_ports.is_empty() {
            let ports: Map<String, Value> = self
                .exposed_ports
                .iter()
                .map(|p| (p.clone(), json!({})))
                .collect();
            config.insert("ExposedPorts".into(), Value::Object(ports));
        }
        config.insert("Env".into(), json!(self.env));
        if let Some(entrypoint) = &self.entrypoint {
            config.insert("Entrypoint".into(), json!(entrypoint));
        }
        if let Some(cmd) = &self.cmd {
            config.insert("Cmd".into(), json!(cmd));
        }
        if let Some(dir) = &self.working_dir {
            config.insert("WorkingDir".into(), json!(dir));
        }
        if !self.labels.is_empty() {
            let labels: Map<String, Value> = self
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            config.insert("Labels".into(), Value::Object(labels));
        }
        let mut image = json!({
            "created": "2023-11-14T22:13:20Z",
            "architecture": self.architecture,
            "os": self.os,
            "config": config,
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
            },
            "history": layers.iter().map(|_| json!({
                "created": "2023-11-14T22:13:20Z",
                "created_by": "homeport-testkit",
            })).collect::<Vec<_>>(),
        });
        if let Some(variant) = &self.variant {
            image["variant"] = json!(variant);
        }
        image
    }

    fn platform(&self) -> Platform {
        Platform {
            architecture: self.architecture.clone(),
            os: self.os.clone(),
            variant: self.variant.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    pub variant: Option<String>,
}

/// An OCI content descriptor.
#[derive(Clone, Debug)]
pub struct Descriptor {
    pub media_type: String,
    /// `sha256:…`
    pub digest: String,
    pub size: u64,
    pub platform: Option<Platform>,
    pub annotations: Vec<(String, String)>,
}

impl Descriptor {
    pub fn to_json(&self) -> Value {
        let mut d = json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        });
        if let Some(p) = &self.platform {
            d["platform"] = json!({"architecture": p.architecture, "os": p.os});
            if let Some(variant) = &p.variant {
                d["platform"]["variant"] = json!(variant);
            }
        }
        if !self.annotations.is_empty() {
            let annotations: Map<String, Value> = self
                .annotations
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            d["annotations"] = Value::Object(annotations);
        }
        d
    }
}

/// An OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/…`) in a temp dir,
/// written directly. Manifests and indexes are written without a top-level `mediaType`, as umoci
/// does; [`OciLayout::write_manifest`] takes any bytes for other flavours.
pub struct OciLayout {
    dir: tempfile::TempDir,
    tags: Vec<Value>,
}

impl OciLayout {
    pub fn new() -> Result<OciLayout> {
        let dir = tempfile::Builder::new()
            .prefix("homeport-oci-")
            .tempdir()
            .context("creating an OCI layout temp dir")?;
        fs::create_dir_all(dir.path().join("blobs/sha256"))?;
        fs::write(
            dir.path().join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        let layout = OciLayout {
            dir,
            tags: Vec::new(),
        };
        layout.write_index_json()?;
        Ok(layout)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Stores a blob; returns its descriptor.
    pub fn write_blob(&self, bytes: &[u8], media_type: &str) -> Result<Descriptor> {
        let digest = sha256_digest(bytes);
        let path = self
            .dir
            .path()
            .join("blobs/sha256")
            .join(&digest["sha256:".len()..]);
        fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        Ok(Descriptor {
            media_type: media_type.into(),
            digest,
            size: bytes.len() as u64,
            platform: None,
            annotations: Vec::new(),
        })
    }

    /// Stores a manifest (or index) given as bytes, as-is.
    pub fn write_manifest(&mut self, bytes: &[u8], media_type: &str) -> Result<Descriptor> {
        self.write_blob(bytes, media_type)
    }

    /// Stores the layers, the config and an OCI manifest without top-level `mediaType`.
    /// The descriptor carries the platform, ready for an index.
    pub fn add_image(&mut self, layers: &[Layer], config: &ImageConfig) -> Result<Descriptor> {
        let config_json = serde_json::to_vec(&config.to_json(layers))?;
        let mut descriptor = self.add_manifest_with(&config_json, MEDIA_TYPE_OCI_CONFIG, layers)?;
        descriptor.platform = Some(config.platform());
        Ok(descriptor)
    }

    /// Like [`OciLayout::add_image`] with any config blob and config media type.
    pub fn add_manifest_with(
        &mut self,
        config_blob: &[u8],
        config_media_type: &str,
        layers: &[Layer],
    ) -> Result<Descriptor> {
        let config = self.write_blob(config_blob, config_media_type)?;
        let mut layer_descriptors = Vec::new();
        for layer in layers {
            layer_descriptors.push(self.write_blob(&layer.blob, &layer.media_type)?.to_json());
        }
        let manifest = json!({
            "schemaVersion": 2,
            "config": config.to_json(),
            "layers": layer_descriptors,
        });
        self.write_manifest(&serde_json::to_vec(&manifest)?, MEDIA_TYPE_OCI_MANIFEST)
    }

    /// Stores an image index without top-level `mediaType` over these manifests.
    pub fn add_index(&mut self, manifests: &[Descriptor]) -> Result<Descriptor> {
        let index = json!({
            "schemaVersion": 2,
            "manifests": manifests.iter().map(Descriptor::to_json).collect::<Vec<_>>(),
        });
        self.write_manifest(&serde_json::to_vec(&index)?, MEDIA_TYPE_OCI_INDEX)
    }

    /// Names `descriptor` `tag` in `index.json` (`org.opencontainers.image.ref.name`).
    pub fn tag(&mut self, tag: &str, descriptor: &Descriptor) -> Result<()> {
        const REF_NAME: &str = "org.opencontainers.image.ref.name";
        self.tags
            .retain(|d| d["annotations"][REF_NAME].as_str() != Some(tag));
        let mut entry = descriptor.clone();
        entry.platform = None;
        entry.annotations.push((REF_NAME.into(), tag.into()));
        self.tags.push(entry.to_json());
        self.write_index_json()
    }

    fn write_index_json(&self) -> Result<()> {
        let index = json!({"schemaVersion": 2, "manifests": self.tags});
        fs::write(
            self.dir.path().join("index.json"),
            serde_json::to_vec(&index)?,
        )?;
        Ok(())
    }
}

/// Manifest format of a push.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// OCI image manifest (and index), as written.
    #[default]
    Oci,
    /// Docker image manifest v2 schema 2 (skopeo converts with `--format v2s2`).
    DockerV2S2,
}

/// How [`push_layout`] runs skopeo.
#[derive(Clone, Copy, Debug, Default)]
pub struct PushOpts {
    /// `None`: copy manifests and blobs exactly as they are (`--preserve-digests`).
    pub format: Option<Format>,
    /// `--all`: push every image of an index, not just the host's.
    pub all: bool,
}

/// Pushes `layout_dir:tag` to `reg` as `name:tag` with `skopeo copy`; returns the digest of the
/// pushed manifest (or index).
pub fn push_layout(
    reg: &Registry,
    layout_dir: &Path,
    name: &str,
    tag: &str,
    opts: &PushOpts,
) -> Result<String> {
    let scratch = tempfile::tempdir()?;
    let digest_file = scratch.path().join("digest");
    let mut cmd = skopeo(scratch.path());
    cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
    match reg.credentials() {
        Some((user, pass)) => cmd.arg("--dest-creds").arg(format!("{user}:{pass}")),
        None => cmd.arg("--dest-no-creds"),
    };
    match opts.format {
        None => cmd.arg("--preserve-digests"),
        Some(Format::Oci) => cmd.args(["--format", "oci"]),
        Some(Format::DockerV2S2) => cmd.args(["--format", "v2s2"]),
    };
    if opts.all {
        cmd.arg("--all");
    }
    cmd.arg("--digestfile")
        .arg(&digest_file)
        .arg(format!("oci:{}:{tag}", layout_dir.display()))
        .arg(format!("docker://{}/{name}:{tag}", reg.host()));
    run(&mut cmd).with_context(|| format!("pushing {name}:{tag} to {}", reg.host()))?;
    let digest = fs::read_to_string(&digest_file).context("reading skopeo's digest file")?;
    Ok(digest.trim().to_owned())
}

/// `skopeo inspect --tls-verify=false [--creds …] EXTRA… docker://HOST/REFERENCE`;
/// returns stdout (JSON, or the raw manifest with `--raw`).
pub fn skopeo_inspect(reg: &Registry, reference: &str, extra_args: &[&str]) -> Result<Vec<u8>> {
    let scratch = tempfile::tempdir()?;
    let mut cmd = skopeo(scratch.path());
    cmd.args(["inspect", "--tls-verify=false"]);
    match reg.credentials() {
        Some((user, pass)) => cmd.arg("--creds").arg(format!("{user}:{pass}")),
        None => cmd.arg("--no-creds"),
    };
    cmd.args(extra_args)
        .arg(format!("docker://{}/{reference}", reg.host()));
    run(&mut cmd).with_context(|| format!("inspecting {reference} on {}", reg.host()))
}

/// Pulls `docker://HOST/REFERENCE` into the OCI layout `layout_dir` as `tag` with skopeo.
pub fn skopeo_pull(reg: &Registry, reference: &str, layout_dir: &Path, tag: &str) -> Result<()> {
    let scratch = tempfile::tempdir()?;
    let mut cmd = skopeo(scratch.path());
    cmd.args(["copy", "--quiet", "--src-tls-verify=false"]);
    match reg.credentials() {
        Some((user, pass)) => cmd.arg("--src-creds").arg(format!("{user}:{pass}")),
        None => cmd.arg("--src-no-creds"),
    };
    cmd.arg(format!("docker://{}/{reference}", reg.host()))
        .arg(format!("oci:{}:{tag}", layout_dir.display()));
    run(&mut cmd).with_context(|| format!("pulling {reference} from {}", reg.host()))?;
    Ok(())
}

/// skopeo isolated from the machine's auth files and signature policy.
fn skopeo(scratch: &Path) -> Command {
    let mut cmd = Command::new("skopeo");
    cmd.arg("--insecure-policy")
        .env("REGISTRY_AUTH_FILE", scratch.join("auth.json"))
        .env("TMPDIR", scratch);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_entries_keep_their_names() -> Result<()> {
        let mut b = LayerBuilder::new();
        b.raw(b"../x", tar::EntryType::Regular, b"", 0o644, b"hi")?
            .raw(
                b"/abs",
                tar::EntryType::Link,
                b"../../etc/passwd",
                0o644,
                b"",
            )?;
        let tar = b.into_tar()?;
        let mut archive = tar::Archive::new(tar.as_slice());
        let mut names = Vec::new();
        for entry in archive.entries()? {
            let entry = entry?;
            names.push((
                entry.path_bytes().into_owned(),
                entry.link_name_bytes().map(|l| l.into_owned()),
            ));
        }
        assert_eq!(
            names,
            vec![
                (b"../x".to_vec(), None),
                (b"/abs".to_vec(), Some(b"../../etc/passwd".to_vec())),
            ]
        );
        Ok(())
    }

    #[test]
    fn whiteout_names() -> Result<()> {
        let mut b = LayerBuilder::new();
        b.whiteout("data/gone")?.whiteout("top")?.opaque("opq/")?;
        let tar = b.into_tar()?;
        let mut archive = tar::Archive::new(tar.as_slice());
        let names: Vec<String> = archive
            .entries()?
            .map(|e| Ok(e?.path()?.to_string_lossy().into_owned()))
            .collect::<Result<_>>()?;
        assert_eq!(names, ["data/.wh.gone", ".wh.top", "opq/.wh..wh..opq"]);
        Ok(())
    }

    #[test]
    fn layer_digests() -> Result<()> {
        let layer = Layer::gzip(b"not really a tar")?;
        assert_eq!(layer.digest, sha256_digest(&layer.blob));
        assert_eq!(layer.diff_id, sha256_digest(b"not really a tar"));
        assert_eq!(Layer::gzip(b"not really a tar")?.digest, layer.digest);
        Ok(())
    }
}
