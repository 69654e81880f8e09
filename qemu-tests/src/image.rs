//! The built disk image of a board, as `image-build/build.sh` describes it in
//! `target/image/<board>/image.json`.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// The workspace's root folder.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// A partition of the image: where it starts and how long it is, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub start: u64,
    pub len: u64,
}

#[derive(Debug, Clone)]
pub struct Image {
    pub board: String,
    /// Debian's name of the image's architecture (`amd64`, `arm64`): which QEMU boots it.
    pub arch: String,
    /// `target/image/<board>/`
    pub dir: PathBuf,
    /// The raw disk image (never written by a guest: each boots an overlay of it).
    pub path: PathBuf,
    /// `IMAGE_VERSION` of the image (what the agent's ready line shows).
    pub version: String,
    /// By GPT label: `esp`, `root-a`, `root-b`, `homeport-data`.
    pub partitions: HashMap<String, Partition>,
    /// `image.json` as written by the build (sizes, timings).
    pub json: serde_json::Value,
}

impl Image {
    /// The `qemu-x86_64` image, built (once per process) by `scripts/image.sh` unless
    /// `HOMEPORT_QEMU_NO_BUILD=1`, which takes whatever was built last.
    pub fn qemu() -> Result<&'static Image> {
        static IMAGE: OnceLock<Image> = OnceLock::new();
        Image::built_once(&IMAGE, "qemu-x86_64")
    }

    /// The `arm64-uefi` image, the same way (`scripts/image.sh arm64-uefi` cross-builds the
    /// binaries and builds the arm64 root through qemu-user on an amd64 host).
    pub fn arm64() -> Result<&'static Image> {
        static IMAGE: OnceLock<Image> = OnceLock::new();
        Image::built_once(&IMAGE, "arm64-uefi")
    }

    fn built_once(image: &'static OnceLock<Image>, board: &str) -> Result<&'static Image> {
        // One build at a time: builds of different boards share the binaries' target folder.
        static BUILDING: Mutex<()> = Mutex::new(());
        if let Some(i) = image.get() {
            return Ok(i);
        }
        let _guard = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = image.get() {
            return Ok(i);
        }
        if std::env::var_os("HOMEPORT_QEMU_NO_BUILD").is_none() {
            build(board)?;
        }
        let loaded = Image::load(&repo_root().join("target/image").join(board))?;
        Ok(image.get_or_init(|| loaded))
    }

    /// Reads a built image's `image.json`.
    pub fn load(dir: &Path) -> Result<Image> {
        let file = dir.join("image.json");
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("read {} (build the image first)", file.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parse {}", file.display()))?;
        let field = |k: &str| {
            json[k]
                .as_str()
                .map(str::to_string)
                .with_context(|| format!("{} has no {k}", file.display()))
        };
        let mut partitions = HashMap::new();
        if let Some(parts) = json["partitions"].as_object() {
            for (name, v) in parts {
                let (Some(start), Some(len)) = (v[0].as_u64(), v[1].as_u64()) else {
                    bail!("{}: bad partition {name}", file.display());
                };
                partitions.insert(name.clone(), Partition { start, len });
            }
        }
        Ok(Image {
            board: field("board")?,
            // Images built before image.json named it were all amd64.
            arch: field("arch").unwrap_or_else(|_| "amd64".to_string()),
            path: dir.join(field("image")?),
            version: field("version")?,
            dir: dir.to_path_buf(),
            partitions,
            json,
        })
    }

    pub fn partition(&self, label: &str) -> Result<Partition> {
        self.partitions
            .get(label)
            .copied()
            .with_context(|| format!("the image has no partition {label}"))
    }
}

/// Runs `scripts/image.sh BOARD`: builds the binaries, then the image if any input changed.
pub fn build(board: &str) -> Result<()> {
    build_with(board, &[])
}

/// Builds another image of `board` from the same tree into `out` (`HOMEPORT_IMAGE_OUT`),
/// with more of image-build/build.sh's settings in `env` (`SOURCE_DATE_EPOCH` for a later
/// version, `HOMEPORT_CMDLINE_EXTRA`): the releases the OS update tests serve.
pub fn build_release(board: &str, out: &Path, env: &[(&str, String)]) -> Result<Image> {
    let mut all = vec![("HOMEPORT_IMAGE_OUT", out.display().to_string())];
    all.extend(env.iter().cloned());
    build_with(board, &all)?;
    Image::load(out)
}

fn build_with(board: &str, env: &[(&str, String)]) -> Result<()> {
    let script = repo_root().join("scripts/image.sh");
    let mut cmd = Command::new(&script);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    // What `cargo test` sets for the test process (CARGO_*, the dynamic library path) would
    // make the script's own `cargo build --release` see a changed environment and rebuild
    // the agent from scratch every other time.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if (k.starts_with("CARGO_") && k != "CARGO_HOME")
            || k == "LD_LIBRARY_PATH"
            || k == "OUT_DIR"
        {
            cmd.env_remove(&key);
        }
    }
    let status = cmd
        .arg(board)
        .current_dir(repo_root())
        .status()
        .with_context(|| format!("run {}", script.display()))?;
    if !status.success() {
        bail!("{} {board} failed: {status}", script.display());
    }
    Ok(())
}
