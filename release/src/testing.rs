//! Fake releases for tests (this crate's, and the device update client's in the agent): what
//! image-build/build.sh writes, from any bytes, without an image build.

use std::io;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::store::sha256;

/// Writes `dir/homeport-<board>-<version>.update.json` and its three zstd-compressed
/// artifacts (`.root.erofs.zst`, `.uki-a.efi.zst`, `.uki-b.efi.zst`) the way the image build
/// does, from the given uncompressed contents. Returns the update.json's path.
pub fn fake_update(
    dir: &Path,
    board: &str,
    version: &str,
    root: &[u8],
    uki_a: &[u8],
    uki_b: &[u8],
) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let name = format!("homeport-{board}-{version}");
    let mut artifacts = serde_json::Map::new();
    for (key, suffix, content) in [
        ("root", "root.erofs.zst", root),
        ("uki-a", "uki-a.efi.zst", uki_a),
        ("uki-b", "uki-b.efi.zst", uki_b),
    ] {
        let file = format!("{name}.{suffix}");
        let compressed = zstd::encode_all(content, 3)?;
        std::fs::write(dir.join(&file), &compressed)?;
        artifacts.insert(
            key.to_owned(),
            json!({
                "file": file,
                "size": content.len(),
                "sha256": hex::encode(sha256(content)),
                "compressed_size": compressed.len(),
                "compressed_sha256": hex::encode(sha256(&compressed)),
            }),
        );
    }
    let manifest = json!({
        "image_id": "homeport",
        "board": board,
        "version": version,
        "version_id": version.split('.').take(3).collect::<Vec<_>>().join("."),
        "kernel": "6.1.0-fake-amd64",
        "source_date_epoch": 0,
        "artifacts": artifacts,
    });
    let path = dir.join(format!("{name}.update.json"));
    let mut text = serde_json::to_vec_pretty(&manifest).map_err(io::Error::other)?;
    text.push(b'\n');
    std::fs::write(&path, text)?;
    Ok(path)
}
