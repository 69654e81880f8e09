//! Every ready-made image pushes, and what arrives in the registry is what was meant.

#![allow(clippy::unwrap_used)] // tests may unwrap what they just built

mod common;

use anyhow::{ensure, Context, Result};
use common::{inspect_config, inspect_raw, json, skopeo, stored_layer_entries};
use homeport_testkit::{
    push_busybox, push_busybox_umoci, push_corrupt_blob, push_layout, push_malicious,
    push_multiarch, push_whiteouts, skopeo_inspect, BusyboxOpts, Format, ImageConfig, LayerBuilder,
    Malicious, OciLayout, PushOpts, Registry, BUSYBOX_CMD,
};
use serde_json::Value;

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

fn names(entries: &[(Vec<u8>, Vec<u8>)]) -> Vec<String> {
    entries
        .iter()
        .map(|(name, _)| String::from_utf8_lossy(name).into_owned())
        .collect()
}

fn layer_digests(manifest: &Value) -> Vec<String> {
    manifest["layers"]
        .as_array()
        .map(|layers| {
            layers
                .iter()
                .filter_map(|l| l["digest"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn busybox_oci() -> Result<()> {
    let reg = Registry::start()?;
    let opts = BusyboxOpts {
        index_html: "marker-1234\n".into(),
        ..BusyboxOpts::default()
    };
    let digest = push_busybox(&reg, "busybox", "oci", &opts)?;
    let raw = inspect_raw(&reg, "busybox:oci")?;
    assert_eq!(sha256(&raw), digest);
    let manifest = json(&raw)?;
    assert_eq!(
        manifest.get("mediaType"),
        None,
        "umoci-style: no top-level mediaType"
    );
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let layers = layer_digests(&manifest);
    assert_eq!(layers.len(), 3);
    for layer in &manifest["layers"].as_array().context("layers")?.clone() {
        assert_eq!(
            layer["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
    }

    let config = inspect_config(&reg, "busybox:oci", &[])?;
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["config"]["Cmd"], serde_json::json!(BUSYBOX_CMD));
    assert_eq!(
        config["config"]["ExposedPorts"],
        serde_json::json!({"8080/tcp": {}})
    );
    assert_eq!(config["config"]["WorkingDir"], "/");
    assert_eq!(config["config"].get("User"), None);
    assert_eq!(
        config["rootfs"]["diff_ids"].as_array().map(Vec::len),
        Some(3)
    );

    // skopeo's own summary agrees.
    let summary = json(&skopeo_inspect(&reg, "busybox:oci", &[])?)?;
    assert_eq!(summary["Architecture"], "amd64");
    assert_eq!(summary["Digest"], digest.as_str());

    // The layers hold what they should.
    let bin = names(&stored_layer_entries(&reg, &layers[0])?);
    for name in ["bin/busybox", "bin/sh", "bin/httpd", "bin/hostname", "tmp/"] {
        assert!(bin.iter().any(|n| n == name), "{name} missing from {bin:?}");
    }
    let etc = names(&stored_layer_entries(&reg, &layers[1])?);
    assert_eq!(etc, ["etc/", "etc/passwd", "etc/group"]);
    let www = names(&stored_layer_entries(&reg, &layers[2])?);
    assert_eq!(www, ["www/", "www/index.html"]);
    Ok(())
}

#[test]
fn busybox_docker_v2s2_with_user_and_env() -> Result<()> {
    let reg = Registry::start_basic_auth("u", "p")?;
    let opts = BusyboxOpts {
        format: Format::DockerV2S2,
        user: Some("www".into()),
        env: vec!["GREETING=hello world".into()],
        ..BusyboxOpts::default()
    };
    let digest = push_busybox(&reg, "busybox", "docker", &opts)?;
    let raw = inspect_raw(&reg, "busybox:docker")?;
    assert_eq!(sha256(&raw), digest);
    let manifest = json(&raw)?;
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.docker.container.image.v1+json"
    );
    assert_eq!(
        manifest["layers"][0]["mediaType"],
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    let config = inspect_config(&reg, "busybox:docker", &[])?;
    assert_eq!(config["config"]["User"], "www");
    assert_eq!(config["config"]["Env"][1], "GREETING=hello world");
    Ok(())
}

#[test]
fn busybox_umoci() -> Result<()> {
    let reg = Registry::start()?;
    let digest = push_busybox_umoci(&reg, "umoci", "v1")?;
    let raw = inspect_raw(&reg, "umoci:v1")?;
    assert_eq!(sha256(&raw), digest);
    let manifest = json(&raw)?;
    assert_eq!(
        manifest.get("mediaType"),
        None,
        "umoci writes no top-level mediaType"
    );
    let layers = layer_digests(&manifest);
    assert_eq!(layers.len(), 3);
    let config = inspect_config(&reg, "umoci:v1", &[])?;
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["config"]["Cmd"], serde_json::json!(BUSYBOX_CMD));
    assert!(config["config"]["ExposedPorts"].get("8080/tcp").is_some());
    let www = names(&stored_layer_entries(&reg, &layers[2])?);
    assert!(www.iter().any(|n| n.ends_with("www/index.html")), "{www:?}");
    Ok(())
}

#[test]
fn multiarch() -> Result<()> {
    let reg = Registry::start_token_auth("u", "p")?;
    let digest = push_multiarch(&reg, "multi", "v1")?;
    let raw = inspect_raw(&reg, "multi:v1")?;
    assert_eq!(sha256(&raw), digest);
    let index = json(&raw)?;
    let manifests = index["manifests"].as_array().context("manifests")?;
    let platforms: Vec<_> = manifests
        .iter()
        .map(|m| {
            (
                m["platform"]["architecture"].as_str().unwrap_or_default(),
                m["platform"]["variant"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        platforms,
        [("amd64", None), ("arm64", Some("v8")), ("unknown", None)]
    );
    assert_eq!(
        manifests[2]["annotations"]["vnd.docker.reference.digest"],
        manifests[0]["digest"]
    );

    // Each instance was pushed (--all): fetch the arm64 one by platform.
    let reference = format!("docker://{}/multi:v1", reg.host());
    let out = skopeo(&[
        "--override-arch",
        "arm64",
        "--override-variant",
        "v8",
        "inspect",
        "--tls-verify=false",
        "--creds",
        "u:p",
        "--config",
        "--raw",
        &reference,
    ])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = json(&out.stdout)?;
    assert_eq!(config["architecture"], "arm64");
    assert_eq!(config["variant"], "v8");
    let amd64 = inspect_config(&reg, "multi:v1", &[])?;
    assert_eq!(amd64["architecture"], "amd64");

    let attestation = json(&inspect_raw(
        &reg,
        &format!(
            "multi@{}",
            manifests[2]["digest"].as_str().unwrap_or_default()
        ),
    )?)?;
    assert_eq!(
        attestation["layers"][0]["mediaType"],
        "application/vnd.in-toto+json"
    );
    Ok(())
}

#[test]
fn whiteouts() -> Result<()> {
    let reg = Registry::start()?;
    push_whiteouts(&reg, "wh", "v1")?;
    let manifest = json(&inspect_raw(&reg, "wh:v1")?)?;
    let layers = layer_digests(&manifest);
    assert_eq!(layers.len(), 5);
    assert_eq!(
        names(&stored_layer_entries(&reg, &layers[3])?),
        [
            "data/",
            "data/keep",
            "data/gone",
            "opq/",
            "opq/old1",
            "opq/sub/",
            "opq/sub/old2"
        ]
    );
    assert_eq!(
        names(&stored_layer_entries(&reg, &layers[4])?),
        [
            "data/",
            "data/.wh.gone",
            "opq/",
            "opq/.wh..wh..opq",
            "opq/new"
        ]
    );
    Ok(())
}

#[test]
fn malicious() -> Result<()> {
    let reg = Registry::start()?;
    let up = "../".repeat(16);
    for kind in [
        Malicious::DotDot,
        Malicious::Absolute,
        Malicious::SymlinkEscape,
        Malicious::SymlinkDotDot,
        Malicious::HardlinkEscape,
    ] {
        let tag = format!("{kind:?}").to_lowercase();
        let image = push_malicious(&reg, "evil", &tag, kind)?;
        let raw = inspect_raw(&reg, &format!("evil:{tag}"))?;
        assert_eq!(sha256(&raw), image.digest);
        let manifest = json(&raw)?;
        assert_eq!(layer_digests(&manifest)[1], image.layer_digest);
        let entries = stored_layer_entries(&reg, &image.layer_digest)?;
        let victim = image.victim.to_string_lossy().into_owned();
        let text: Vec<(String, String)> = entries
            .iter()
            .map(|(n, l)| {
                (
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(l).into_owned(),
                )
            })
            .collect();
        match kind {
            Malicious::DotDot => {
                let name = image.escape_name.clone().unwrap_or_default();
                assert_eq!(text[0].0, format!("../{name}"));
                assert_eq!(text[1].0, format!("{up}tmp/{name}"));
                assert_eq!(victim, format!("/tmp/{name}"));
            }
            Malicious::Absolute => assert_eq!(text[0].0, victim),
            Malicious::SymlinkEscape => {
                assert_eq!(
                    text[0],
                    ("link".into(), victim.trim_end_matches("/pwned").into())
                );
                assert_eq!(text[1].0, "link/pwned");
            }
            Malicious::SymlinkDotDot => {
                assert_eq!(text[0], ("up".into(), format!("{up}tmp")));
                assert_eq!(format!("/tmp/{}", &text[1].0["up/".len()..]), victim);
            }
            Malicious::HardlinkEscape => {
                assert_eq!(text[0], ("h".into(), format!("{up}{}", &victim[1..])));
                assert_eq!(text[1].0, "h");
                assert!(image.victim.exists());
            }
        }
        // Nothing extracted it, so nothing escaped.
        image.check_not_escaped(None)?;
    }
    Ok(())
}

#[test]
fn corrupt_blob() -> Result<()> {
    let reg = Registry::start()?;
    let image = push_corrupt_blob(&reg, "corrupt", "v1")?;
    let stored = std::fs::read(reg.blob_path(&image.layer_digest)?)?;
    assert_ne!(sha256(&stored), image.layer_digest);
    // The manifest is intact; pulling the image fails on the layer.
    let manifest = inspect_raw(&reg, "corrupt:v1")?;
    assert_eq!(sha256(&manifest), image.digest);
    let dest = tempfile::tempdir()?;
    let err = homeport_testkit::skopeo_pull(&reg, "corrupt:v1", dest.path(), "v1")
        .err()
        .context("pulling a corrupt image succeeded")?;
    let message = format!("{err:#}");
    assert!(message.contains("Digest did not match"), "{message}");
    Ok(())
}

#[test]
fn generic_layout() -> Result<()> {
    let reg = Registry::start()?;
    let mut layer = LayerBuilder::new();
    layer
        .dir("app", 0o755)?
        .file("app/hello", 0o755, b"#!/bin/sh\necho hi\n")?;
    let layer = layer.into_layer()?;
    let config = ImageConfig {
        entrypoint: Some(vec!["/app/hello".into()]),
        labels: vec![("org.example".into(), "yes".into())],
        ..ImageConfig::default()
    };
    let mut layout = OciLayout::new()?;
    let manifest = layout.add_image(std::slice::from_ref(&layer), &config)?;
    layout.tag("one", &manifest)?;
    let digest = push_layout(&reg, layout.path(), "generic", "one", &PushOpts::default())?;
    assert_eq!(digest, manifest.digest, "pushed byte for byte");
    let pushed = json(&inspect_raw(&reg, "generic:one")?)?;
    assert_eq!(layer_digests(&pushed), [layer.digest]);
    let config = inspect_config(&reg, "generic:one", &[])?;
    assert_eq!(config["config"]["Entrypoint"][0], "/app/hello");
    assert_eq!(config["config"]["Labels"]["org.example"], "yes");
    Ok(())
}
