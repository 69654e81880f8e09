//! Ready-made images, pushed into a [`Registry`] with real skopeo.

use crate::image::{
    push_layout, Format, ImageConfig, Layer, LayerBuilder, OciLayout, Platform, PushOpts,
    MEDIA_TYPE_OCI_CONFIG,
};
use crate::registry::Registry;
use crate::{run, sha256_digest, unique};
use anyhow::{bail, ensure, Context, Result};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The static busybox of Debian's busybox-static, copied into images as `/bin/busybox`.
const HOST_BUSYBOX: &str = "/bin/busybox";

/// Applets linked to `/bin/busybox` in the busybox images.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh",
    "httpd",
    "wget",
    "sleep",
    "cat",
    "echo",
    "ls",
    "id",
    "env",
    "touch",
    "mkdir",
    "rm",
    "ps",
    "kill",
    "true",
    "false",
    "date",
    "seq",
    "head",
    "tail",
    "grep",
    "mount",
    "hostname",
    "nslookup",
    "timeout",
    "wc",
    "nc",
    "tr",
    "chmod",
    "ssl_client",
];

/// Default command of the busybox images: a web server on port 8080 serving `/www`.
pub const BUSYBOX_CMD: &[&str] = &["/bin/httpd", "-f", "-v", "-p", "8080", "-h", "/www"];

const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nwww:x:33:33:www:/www:/bin/false\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nwww:x:33:\nnobody:x:65534:\n";

/// Options of [`push_busybox`].
#[derive(Clone, Debug)]
pub struct BusyboxOpts {
    pub format: Format,
    /// Config `User` (e.g. `www` or `33:33`); none means root.
    pub user: Option<String>,
    /// Extra `KEY=value` entries after `PATH`.
    pub env: Vec<String>,
    /// Content of `/www/index.html`: put a marker here to recognise the image over HTTP.
    pub index_html: String,
}

impl Default for BusyboxOpts {
    fn default() -> Self {
        BusyboxOpts {
            format: Format::Oci,
            user: None,
            env: Vec::new(),
            index_html: "homeport-testkit busybox\n".into(),
        }
    }
}

/// Layer 1 of the busybox images: root directories, `/bin/busybox` and applet symlinks.
/// Built once per process (gzip of 2 MB is slow in debug builds).
pub fn busybox_layer() -> Result<Layer> {
    static LAYER: OnceLock<Layer> = OnceLock::new();
    if let Some(layer) = LAYER.get() {
        return Ok(layer.clone());
    }
    let busybox = fs::read(HOST_BUSYBOX)
        .with_context(|| format!("reading {HOST_BUSYBOX} (install busybox-static)"))?;
    let mut b = LayerBuilder::new();
    for (dir, mode) in [
        ("bin", 0o755),
        ("dev", 0o755),
        ("proc", 0o555),
        ("root", 0o700),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("var", 0o755),
    ] {
        b.dir(dir, mode)?;
    }
    b.file("bin/busybox", 0o755, &busybox)?;
    for applet in BUSYBOX_APPLETS {
        b.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    let layer = b.into_layer()?;
    Ok(LAYER.get_or_init(|| layer).clone())
}

/// Layer 2: `/etc/passwd` and `/etc/group` with root, `www` (33) and nobody.
fn etc_layer() -> Result<Layer> {
    let mut b = LayerBuilder::new();
    b.dir("etc", 0o755)?
        .file("etc/passwd", 0o644, PASSWD.as_bytes())?
        .file("etc/group", 0o644, GROUP.as_bytes())?;
    b.into_layer()
}

/// Layer 3: `/www/index.html`.
fn www_layer(index_html: &str) -> Result<Layer> {
    let mut b = LayerBuilder::new();
    b.dir("www", 0o755)?
        .file("www/index.html", 0o644, index_html.as_bytes())?;
    b.into_layer()
}

fn busybox_layers(index_html: &str) -> Result<Vec<Layer>> {
    Ok(vec![busybox_layer()?, etc_layer()?, www_layer(index_html)?])
}

fn busybox_config(user: Option<&str>, extra_env: &[String]) -> ImageConfig {
    let mut env = vec![PATH_ENV.to_owned()];
    env.extend(extra_env.iter().cloned());
    ImageConfig {
        cmd: Some(BUSYBOX_CMD.iter().map(|s| s.to_string()).collect()),
        env,
        working_dir: Some("/".into()),
        user: user.map(str::to_owned),
        exposed_ports: vec!["8080/tcp".into()],
        ..ImageConfig::default()
    }
}

/// Builds `layers` + `config` into a fresh layout and pushes it exactly as written.
fn push_single(
    reg: &Registry,
    name: &str,
    tag: &str,
    layers: &[Layer],
    config: &ImageConfig,
) -> Result<String> {
    let mut layout = OciLayout::new()?;
    let manifest = layout.add_image(layers, config)?;
    layout.tag(tag, &manifest)?;
    push_layout(reg, layout.path(), name, tag, &PushOpts::default())
}

/// Fails unless the registry stores `layer` byte for byte.
fn ensure_stored_as_is(reg: &Registry, layer: &Layer) -> Result<()> {
    let stored = fs::read(reg.blob_path(&layer.digest)?)
        .with_context(|| format!("layer {} not in the registry's storage", layer.digest))?;
    ensure!(
        stored == *layer.blob,
        "the registry stores layer {} differently than built",
        layer.digest
    );
    Ok(())
}

/// A three-layer busybox image (busybox + applets; /etc/passwd and group; /www/index.html)
/// whose command serves /www on port 8080. Returns the pushed manifest's digest.
pub fn push_busybox(reg: &Registry, name: &str, tag: &str, opts: &BusyboxOpts) -> Result<String> {
    let layers = busybox_layers(&opts.index_html)?;
    let config = busybox_config(opts.user.as_deref(), &opts.env);
    let mut layout = OciLayout::new()?;
    let manifest = layout.add_image(&layers, &config)?;
    layout.tag(tag, &manifest)?;
    let format = match opts.format {
        Format::Oci => None,
        Format::DockerV2S2 => Some(Format::DockerV2S2),
    };
    push_layout(
        reg,
        layout.path(),
        name,
        tag,
        &PushOpts { format, all: false },
    )
}

/// The same content as [`push_busybox`] with default options, built by real umoci
/// (`init`, `new`, `unpack`, three `repack`s, `config`). Returns the pushed manifest's digest.
pub fn push_busybox_umoci(reg: &Registry, name: &str, tag: &str) -> Result<String> {
    let tmp = tempfile::Builder::new()
        .prefix("homeport-umoci-")
        .tempdir()?;
    let layout = tmp.path().join("layout");
    let bundle = tmp.path().join("bundle");
    let image = format!("{}:{tag}", layout.display());
    let umoci = |args: &[&str]| -> Result<()> { run(Command::new("umoci").args(args)).map(drop) };
    umoci(&["init", "--layout", &layout.to_string_lossy()])?;
    umoci(&["new", "--image", &image])?;
    let mut unpack = vec!["unpack"];
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        unpack.push("--rootless");
    }
    unpack.extend(["--image", &image]);
    let bundle_arg = bundle.to_string_lossy().into_owned();
    unpack.push(&bundle_arg);
    umoci(&unpack)?;
    let rootfs = bundle.join("rootfs");

    for (dir, mode) in [
        ("bin", 0o755),
        ("dev", 0o755),
        ("proc", 0o555),
        ("root", 0o700),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("var", 0o755),
    ] {
        let path = rootfs.join(dir);
        fs::create_dir_all(&path)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    }
    fs::copy(HOST_BUSYBOX, rootfs.join("bin/busybox"))
        .with_context(|| format!("copying {HOST_BUSYBOX} (install busybox-static)"))?;
    fs::set_permissions(
        rootfs.join("bin/busybox"),
        fs::Permissions::from_mode(0o755),
    )?;
    for applet in BUSYBOX_APPLETS {
        let link = rootfs.join("bin").join(applet);
        if fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink("busybox", link)?;
        }
    }
    umoci(&["repack", "--refresh-bundle", "--image", &image, &bundle_arg])?;

    fs::create_dir_all(rootfs.join("etc"))?;
    fs::write(rootfs.join("etc/passwd"), PASSWD)?;
    fs::write(rootfs.join("etc/group"), GROUP)?;
    umoci(&["repack", "--refresh-bundle", "--image", &image, &bundle_arg])?;

    fs::create_dir_all(rootfs.join("www"))?;
    fs::write(
        rootfs.join("www/index.html"),
        BusyboxOpts::default().index_html,
    )?;
    umoci(&["repack", "--image", &image, &bundle_arg])?;

    let mut config = vec!["config", "--image", &image];
    for arg in BUSYBOX_CMD {
        config.extend(["--config.cmd", arg]);
    }
    config.extend([
        "--config.env",
        PATH_ENV,
        "--config.workingdir",
        "/",
        "--config.exposedports",
        "8080/tcp",
    ]);
    umoci(&config)?;
    push_layout(reg, &layout, name, tag, &PushOpts::default())
}

/// An image index with linux/amd64 and linux/arm64/v8 busybox images (`/arch` holds `amd64`
/// or `arm64`) and a buildx-style attestation manifest for `unknown/unknown`, pushed with
/// `--all`. Returns the index's digest.
pub fn push_multiarch(reg: &Registry, name: &str, tag: &str) -> Result<String> {
    let mut layout = OciLayout::new()?;
    let mut manifests = Vec::new();
    for (arch, variant) in [("amd64", None), ("arm64", Some("v8"))] {
        let mut layers = busybox_layers(&format!("homeport-testkit multiarch {arch}\n"))?;
        let mut b = LayerBuilder::new();
        b.file("arch", 0o644, arch.as_bytes())?;
        layers.push(b.into_layer()?);
        let config = ImageConfig {
            architecture: arch.into(),
            variant: variant.map(str::to_owned),
            ..busybox_config(None, &[])
        };
        manifests.push(layout.add_image(&layers, &config)?);
    }

    let subject = manifests[0].digest.clone();
    let statement = serde_json::json!({
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": "https://spdx.dev/Document",
        "subject": [{
            "name": format!("pkg:docker/{name}@{tag}?platform=linux%2Famd64"),
            "digest": {"sha256": subject.trim_start_matches("sha256:")},
        }],
        "predicate": {"spdxVersion": "SPDX-2.3"},
    });
    let layer = Layer::other(
        serde_json::to_vec(&statement)?,
        "application/vnd.in-toto+json",
    );
    let config = serde_json::json!({
        "architecture": "unknown",
        "os": "unknown",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
    });
    let mut attestation = layout.add_manifest_with(
        &serde_json::to_vec(&config)?,
        MEDIA_TYPE_OCI_CONFIG,
        &[layer],
    )?;
    attestation.platform = Some(Platform {
        architecture: "unknown".into(),
        os: "unknown".into(),
        variant: None,
    });
    attestation.annotations = vec![
        ("vnd.docker.reference.digest".into(), subject),
        (
            "vnd.docker.reference.type".into(),
            "attestation-manifest".into(),
        ),
    ];
    manifests.push(attestation);

    let index = layout.add_index(&manifests)?;
    layout.tag(tag, &index)?;
    push_layout(
        reg,
        layout.path(),
        name,
        tag,
        &PushOpts {
            format: None,
            all: true,
        },
    )
}

/// Busybox, then a layer with `/data/{keep,gone}` and `/opq/{old1,sub/old2}`, then a layer
/// deleting `/data/gone` (`.wh.gone`), making `/opq` opaque (`.wh..wh..opq`) and adding
/// `/opq/new`. After extraction: `/data/keep` and `/opq/new` only. Returns the manifest digest.
pub fn push_whiteouts(reg: &Registry, name: &str, tag: &str) -> Result<String> {
    let mut layers = busybox_layers("homeport-testkit whiteouts\n")?;
    let mut lower = LayerBuilder::new();
    lower
        .dir("data", 0o755)?
        .file("data/keep", 0o644, b"keep\n")?
        .file("data/gone", 0o644, b"gone\n")?
        .dir("opq", 0o755)?
        .file("opq/old1", 0o644, b"old1\n")?
        .dir("opq/sub", 0o755)?
        .file("opq/sub/old2", 0o644, b"old2\n")?;
    layers.push(lower.into_layer()?);
    let mut upper = LayerBuilder::new();
    upper
        .dir("data", 0o755)?
        .whiteout("data/gone")?
        .dir("opq", 0o755)?
        .opaque("opq")?
        .file("opq/new", 0o644, b"new\n")?;
    layers.push(upper.into_layer()?);
    push_single(reg, name, tag, &layers, &busybox_config(None, &[]))
}

/// Path-traversal attacks in a layer tar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malicious {
    /// Regular files `../escape-U` and `../../…(16×)/tmp/escape-U`.
    DotDot,
    /// Regular file `/tmp/abs-U`.
    Absolute,
    /// Symlink `link` -> an absolute host temp dir, then regular file `link/pwned`.
    SymlinkEscape,
    /// Symlink `up` -> `../../…(16×)/tmp`, then regular file `up/pwned-U`.
    SymlinkDotDot,
    /// Hard link `h` -> `../../…(16×)/<host temp dir>/victim`, then regular file `h` with
    /// other content (a writer that opens the existing `h` overwrites the host file).
    HardlinkEscape,
}

/// A pushed malicious image and what on the host must stay untouched.
#[derive(Debug)]
pub struct MaliciousImage {
    pub kind: Malicious,
    /// Digest of the pushed manifest.
    pub digest: String,
    /// Digest of the malicious layer (the top one; below it is [`busybox_layer`]).
    pub layer_digest: String,
    /// Host path the attack creates (for `HardlinkEscape`: an existing file it would link to
    /// and overwrite).
    pub victim: PathBuf,
    /// For `DotDot`: the name `../NAME` creates in the parent of the extraction root.
    pub escape_name: Option<String>,
    victim_content: Option<Vec<u8>>,
    /// Holds the host directory of `SymlinkEscape`/`HardlinkEscape`; removed on drop.
    _victim_dir: Option<tempfile::TempDir>,
}

impl MaliciousImage {
    /// Fails if the attack left a trace on the host. `extraction_root`, when known, is where
    /// the client extracted the layer (its parent is checked for `escape_name`).
    pub fn check_not_escaped(&self, extraction_root: Option<&Path>) -> Result<()> {
        if let Some(original) = &self.victim_content {
            let meta = fs::metadata(&self.victim)
                .with_context(|| format!("victim {} is gone", self.victim.display()))?;
            ensure!(
                meta.nlink() == 1,
                "{} gained a hard link (nlink {})",
                self.victim.display(),
                meta.nlink()
            );
            ensure!(
                fs::read(&self.victim)? == *original,
                "{} was overwritten",
                self.victim.display()
            );
        } else if fs::symlink_metadata(&self.victim).is_ok() {
            bail!("{} was created outside the rootfs", self.victim.display());
        }
        if let (Some(name), Some(root)) = (&self.escape_name, extraction_root) {
            if let Some(parent) = root.parent() {
                let path = parent.join(name);
                ensure!(
                    fs::symlink_metadata(&path).is_err(),
                    "{} was created outside the rootfs",
                    path.display()
                );
            }
        }
        Ok(())
    }
}

impl Drop for MaliciousImage {
    fn drop(&mut self) {
        // Clean up after a successful attack; the victim names are unique to this image.
        if self.victim_content.is_none() {
            let _ = fs::remove_file(&self.victim);
        }
    }
}

/// Enough `../` to reach `/` from any extraction root up to 16 levels deep.
fn to_root() -> String {
    "../".repeat(16)
}

/// Pushes a busybox layer plus a layer carrying the `kind` attack, exactly as built (checked
/// against the registry's storage).
pub fn push_malicious(
    reg: &Registry,
    name: &str,
    tag: &str,
    kind: Malicious,
) -> Result<MaliciousImage> {
    use tar::EntryType::{Link, Regular, Symlink};
    let u = unique();
    let mut b = LayerBuilder::new();
    let mut escape_name = None;
    let mut victim_content = None;
    let mut victim_dir = None;
    let victim = match kind {
        Malicious::DotDot => {
            let name = format!("escape-{u}");
            b.raw(
                format!("../{name}").as_bytes(),
                Regular,
                b"",
                0o644,
                b"pwned\n",
            )?;
            b.raw(
                format!("{}tmp/{name}", to_root()).as_bytes(),
                Regular,
                b"",
                0o644,
                b"pwned\n",
            )?;
            escape_name = Some(name.clone());
            PathBuf::from("/tmp").join(name)
        }
        Malicious::Absolute => {
            let path = format!("/tmp/abs-{u}");
            b.raw(path.as_bytes(), Regular, b"", 0o644, b"pwned\n")?;
            PathBuf::from(path)
        }
        Malicious::SymlinkEscape => {
            let dir = tempfile::Builder::new()
                .prefix("homeport-victim-")
                .tempdir_in("/tmp")?;
            let target = dir.path().to_string_lossy().into_owned();
            b.raw(b"link", Symlink, target.as_bytes(), 0o777, b"")?;
            b.raw(b"link/pwned", Regular, b"", 0o644, b"pwned\n")?;
            let victim = dir.path().join("pwned");
            victim_dir = Some(dir);
            victim
        }
        Malicious::SymlinkDotDot => {
            let target = format!("{}tmp", to_root());
            let name = format!("pwned-{u}");
            b.raw(b"up", Symlink, target.as_bytes(), 0o777, b"")?;
            b.raw(
                format!("up/{name}").as_bytes(),
                Regular,
                b"",
                0o644,
                b"pwned\n",
            )?;
            PathBuf::from("/tmp").join(name)
        }
        Malicious::HardlinkEscape => {
            let dir = tempfile::Builder::new()
                .prefix("homeport-victim-")
                .tempdir_in("/tmp")?;
            let victim = dir.path().join("victim");
            let original = b"original content\n".to_vec();
            fs::write(&victim, &original)?;
            let relative = victim.to_string_lossy().trim_start_matches('/').to_owned();
            let target = format!("{}{relative}", to_root());
            b.raw(b"h", Link, target.as_bytes(), 0o644, b"")?;
            b.raw(b"h", Regular, b"", 0o644, b"pwned\n")?;
            victim_content = Some(original);
            victim_dir = Some(dir);
            victim
        }
    };
    let layer = b.into_layer()?;
    let layers = [busybox_layer()?, layer.clone()];
    let config = ImageConfig {
        cmd: Some(vec!["/bin/true".into()]),
        ..ImageConfig::default()
    };
    let digest = push_single(reg, name, tag, &layers, &config)?;
    ensure_stored_as_is(reg, &layer)?;
    Ok(MaliciousImage {
        kind,
        digest,
        layer_digest: layer.digest,
        victim,
        escape_name,
        victim_content,
        _victim_dir: victim_dir,
    })
}

/// An image whose top layer's content in the registry no longer matches its digest.
#[derive(Clone, Debug)]
pub struct CorruptImage {
    /// Digest of the pushed manifest (intact).
    pub digest: String,
    /// Digest the corrupted layer claims (and no longer has).
    pub layer_digest: String,
}

/// Pushes busybox plus a small layer, then overwrites that layer's bytes in the registry's
/// storage (same length): a client sees a digest mismatch on download.
pub fn push_corrupt_blob(reg: &Registry, name: &str, tag: &str) -> Result<CorruptImage> {
    let seed = unique();
    let payload: Vec<u8> = (0..256u32)
        .flat_map(|i| {
            let digest = sha256_digest(format!("{seed}/{i}").as_bytes());
            digest.into_bytes()
        })
        .collect();
    let mut b = LayerBuilder::new();
    b.dir("data", 0o755)?
        .file("data/payload", 0o644, &payload)?;
    let layer = b.into_layer()?;
    let mut layers = busybox_layers("homeport-testkit corrupt\n")?;
    layers.push(layer.clone());
    let digest = push_single(reg, name, tag, &layers, &busybox_config(None, &[]))?;
    ensure_stored_as_is(reg, &layer)?;

    let path = reg.blob_path(&layer.digest)?;
    let mut bytes = fs::read(&path)?;
    let middle = bytes.len() / 2;
    for byte in &mut bytes[middle..middle + 16] {
        *byte ^= 0xff;
    }
    fs::write(&path, &bytes)?;
    ensure!(
        sha256_digest(&bytes) != layer.digest,
        "corruption had no effect"
    );
    Ok(CorruptImage {
        digest,
        layer_digest: layer.digest,
    })
}
