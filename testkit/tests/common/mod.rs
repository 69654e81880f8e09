//! Shared by the integration tests (each test file includes it with `mod common;`).
#![allow(dead_code)]

use anyhow::{Context, Result};
use flate2::read::GzDecoder;
use homeport_testkit::Registry;
use serde_json::Value;
use std::io::Read;
use std::process::{Command, Output};

pub fn json(bytes: &[u8]) -> Result<Value> {
    serde_json::from_slice(bytes).context("not JSON")
}

/// `(name, link name)` of every entry of a gzip layer, as raw bytes.
pub fn tar_entries(gzip: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut tar = Vec::new();
    GzDecoder::new(gzip).read_to_end(&mut tar)?;
    let mut archive = tar::Archive::new(tar.as_slice());
    let mut entries = Vec::new();
    for entry in archive.entries()? {
        let entry = entry?;
        let link = entry
            .link_name_bytes()
            .map(|l| l.into_owned())
            .unwrap_or_default();
        entries.push((entry.path_bytes().into_owned(), link));
    }
    Ok(entries)
}

/// The entries of a layer as the registry stores it.
pub fn stored_layer_entries(reg: &Registry, digest: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let blob = std::fs::read(reg.blob_path(digest)?)?;
    tar_entries(&blob)
}

/// skopeo with its own empty auth file, not minding the outcome.
pub fn skopeo(args: &[&str]) -> Result<Output> {
    let scratch = tempfile::tempdir()?;
    Command::new("skopeo")
        .env("REGISTRY_AUTH_FILE", scratch.path().join("auth.json"))
        .args(args)
        .output()
        .context("running skopeo")
}

/// The config blob of `reference` as skopeo sees it.
pub fn inspect_config(reg: &Registry, reference: &str, extra: &[&str]) -> Result<Value> {
    let mut args = vec!["--config", "--raw"];
    args.extend(extra);
    json(&homeport_testkit::skopeo_inspect(reg, reference, &args)?)
}

/// The manifest of `reference`, byte for byte.
pub fn inspect_raw(reg: &Registry, reference: &str) -> Result<Vec<u8>> {
    homeport_testkit::skopeo_inspect(reg, reference, &["--raw"])
}
