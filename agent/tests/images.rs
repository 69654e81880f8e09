//! Pulls from a real `docker-registry`: manifest formats, indexes, auth, whiteouts, hostile
//! and corrupt layers, sharing, pruning and tag pinning. Needs root.

#![allow(clippy::unwrap_used)] // tests may unwrap what they just built

mod common;

use std::path::Path;

use anyhow::Result;
use common::*;
use homeport::api::types::{ImageInfo, PruneReport};
use homeport_testkit::{AgentOpts, AgentProcess, Malicious, Registry};

/// No half-pulled layer, temp file or app dir is left after a failed install.
fn assert_nothing_left(agent: &AgentProcess, app: &str) {
    let data = agent.data_dir();
    assert_eq!(entries(&data.join("layers")), ["empty"], "layers left");
    assert_eq!(
        entries(&data.join("tmp")),
        Vec::<String>::new(),
        "temp files left"
    );
    assert!(!data.join("apps").join(app).exists(), "app dir left");
    assert!(mounts_below(data).is_empty(), "mounts left");
}

#[tokio::test]
async fn docker_v2s2_umoci_and_multiarch_images_run() -> Result<()> {
    let w = World::new()?;
    homeport_testkit::push_busybox(
        &w.registry,
        "docker",
        "v2s2",
        &homeport_testkit::BusyboxOpts {
            format: homeport_testkit::Format::DockerV2S2,
            index_html: marker("v2s2"),
            ..Default::default()
        },
    )?;
    homeport_testkit::push_busybox_umoci(&w.registry, "umoci", "1")?;
    let index = homeport_testkit::push_multiarch(&w.registry, "multi", "1")?;
    let c = w.client();
    for (app, image) in [
        ("docker", "docker:v2s2"),
        ("umoci", "umoci:1"),
        ("multi", "multi:1"),
    ] {
        let m = w.manifest(app, image, "command = [\"/bin/sleep\", \"3600\"]\n");
        context(c.install(&m, |_| {}).await.map_err(Into::into), &w.agent)?;
        wait_running(&c, app).await?;
    }
    let (_, out) = exec(&c, "docker", &["cat", "/www/index.html"]).await?;
    assert_eq!(out.trim(), marker("v2s2"));
    // From the index, the host's platform was picked; the app is pinned to the index digest.
    let (_, arch) = exec(&c, "multi", &["cat", "/arch"]).await?;
    let host = if cfg!(target_arch = "aarch64") {
        "arm64"
    } else {
        "amd64"
    };
    assert_eq!(arch.trim(), host);
    assert!(
        summary(&c, "multi").await?.image.ends_with(&index),
        "pinned to the index digest {index}"
    );
    Ok(())
}

#[tokio::test]
async fn basic_and_token_auth() -> Result<()> {
    for registry in [
        Registry::start_basic_auth("alice", "s3cret")?,
        Registry::start_token_auth("alice", "s3cret")?,
    ] {
        push_hello(&registry, "private", "1")?;
        let host = registry.host();
        let manifest = format!("name = \"private\"\nimage = \"{host}/private:1\"\n");
        // Without credentials: a clear error, nothing installed.
        let anon = start_agent(opts_for(&host))?;
        let err = anon.client().install(&manifest, |_| {}).await.unwrap_err();
        assert_eq!(err.status(), Some(401), "{err}");
        assert!(err.to_string().contains("credentials"), "{err}");
        assert_nothing_left(&anon, "private");
        // Wrong password.
        let wrong = start_agent(AgentOpts {
            registry_auth: vec![format!("{host}=alice:wrong")],
            ..opts_for(&host)
        })?;
        let err = wrong.client().install(&manifest, |_| {}).await.unwrap_err();
        assert!(
            err.status() == Some(401) || err.status() == Some(403),
            "{err}"
        );
        // Right credentials.
        let agent = start_agent(AgentOpts {
            registry_auth: vec![format!("{host}=alice:s3cret")],
            ..opts_for(&host)
        })?;
        let c = agent.client();
        context(
            c.install(&manifest, |_| {}).await.map_err(Into::into),
            &agent,
        )?;
        wait_running(&c, "private").await?;
    }
    Ok(())
}

#[tokio::test]
async fn whiteouts_and_opaque_directories_apply() -> Result<()> {
    let w = World::new()?;
    homeport_testkit::push_whiteouts(&w.registry, "wh", "1")?;
    let c = w.client();
    c.install(
        &w.manifest("wh", "wh:1", "command = [\"/bin/sleep\", \"3600\"]\n"),
        |_| {},
    )
    .await?;
    wait_running(&c, "wh").await?;
    let (_, data) = exec(&c, "wh", &["ls", "/data"]).await?;
    assert_eq!(data.split_whitespace().collect::<Vec<_>>(), ["keep"]);
    let (_, opq) = exec(&c, "wh", &["ls", "-R", "/opq"]).await?;
    assert!(
        opq.contains("new") && !opq.contains("old1") && !opq.contains("old2"),
        "{opq}"
    );
    Ok(())
}

#[tokio::test]
async fn hostile_layers_are_refused_and_nothing_escapes() -> Result<()> {
    let w = World::new()?;
    let c = w.client();
    let kinds = [
        ("dotdot", Malicious::DotDot),
        ("absolute", Malicious::Absolute),
        ("symlink", Malicious::SymlinkEscape),
        ("symlinkdotdot", Malicious::SymlinkDotDot),
        ("hardlink", Malicious::HardlinkEscape),
    ];
    for (name, kind) in kinds {
        let bad = homeport_testkit::push_malicious(&w.registry, name, "1", kind)?;
        let err = c
            .install(&w.manifest(name, &format!("{name}:1"), ""), |_| {})
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(422), "{name}: {err}");
        let msg = err.to_string();
        // The message names the image and the offending entry.
        assert!(
            msg.contains(&format!("{name}:1"))
                && (msg.contains("layer entry") || msg.contains("hard link \"h\"")),
            "{name}: {msg}"
        );
        bad.check_not_escaped(Some(&w.agent.data_dir().join("tmp")))?;
        bad.check_not_escaped(Some(&w.agent.data_dir().join("layers")))?;
        assert_nothing_left(&w.agent, name);
    }
    Ok(())
}

#[tokio::test]
async fn bad_images_and_registries_get_clear_errors_and_leave_nothing() -> Result<()> {
    let w = World::new()?;
    let c = w.client();
    homeport_testkit::push_corrupt_blob(&w.registry, "corrupt", "1")?;
    let err = c
        .install(&w.manifest("corrupt", "corrupt:1", ""), |_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("digest"), "{err}");
    assert_nothing_left(&w.agent, "corrupt");

    let err = c
        .install(&w.manifest("nope", "hello:no-such-tag", ""), |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(404), "{err}");
    assert!(err.to_string().contains("not found"), "{err}");

    let dead = "name = \"dead\"\nimage = \"127.0.0.1:9/hello:1\"\n";
    let err = c.install(dead, |_| {}).await.unwrap_err();
    assert_eq!(err.status(), Some(502), "{err}");
    assert!(err.to_string().contains("unreachable"), "{err}");

    // A registry not marked insecure is only spoken to over HTTPS.
    let other = Registry::start()?;
    push_hello(&other, "hello", "1")?;
    let m = format!("name = \"plain\"\nimage = \"{}/hello:1\"\n", other.host());
    let err = c.install(&m, |_| {}).await.unwrap_err();
    assert_eq!(err.status(), Some(502), "{err}");

    // A second install under a taken name is refused and changes nothing.
    c.install(&w.manifest("hello", "hello:1", ""), |_| {})
        .await?;
    let pid = wait_running(&c, "hello").await?;
    let err = c
        .install(&w.manifest("hello", "hello:1", ""), |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(409));
    assert!(err.to_string().contains("already installed"), "{err}");
    assert_eq!(wait_running(&c, "hello").await?, pid);

    // An invalid manifest: 400 naming the problems.
    let err = c
        .install("name = \"Bad\"\nimgae = \"x\"\n", |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400));
    assert!(err.to_string().contains("imgae"), "{err}");
    Ok(())
}

#[tokio::test]
async fn layers_are_shared_pruned_and_tags_pinned() -> Result<()> {
    let w = World::new()?;
    push_hello(&w.registry, "hello", "2")?; // shares the busybox and /etc layers with hello:1
    let c = w.client();
    for (app, image) in [("a", "hello:1"), ("b", "hello:1"), ("c", "hello:2")] {
        c.install(&w.manifest(app, image, ""), |_| {}).await?;
        wait_running(&c, app).await?;
    }
    let images: Vec<ImageInfo> = c.get("/v1/images").await?;
    assert_eq!(images.len(), 2);
    let one = images
        .iter()
        .find(|i| i.references.iter().any(|r| r.ends_with("hello:1")))
        .expect("hello:1");
    assert_eq!(one.apps, ["a", "b"]);
    assert!(
        one.shared_bytes > 0 && one.shared_bytes < one.bytes,
        "{one:?}"
    );
    // 3 layers each, 2 shared: 4 layer directories (+ the empty one).
    assert_eq!(entries(&w.agent.data_dir().join("layers")).len(), 5);

    // Moving the tag does not move installed apps: restarts keep the pinned digest.
    let pinned = summary(&c, "a").await?.image;
    push_page(&w.registry, "hello", "1", "moved tag")?;
    c.post::<serde_json::Value, _>("/v1/apps/a/restart", &())
        .await?;
    wait_running(&c, "a").await?;
    assert_eq!(summary(&c, "a").await?.image, pinned);
    let (_, out) = exec(&c, "a", &["cat", "/www/index.html"]).await?;
    assert_eq!(out.trim(), marker("1"));
    // A new install resolves the tag afresh.
    c.install(&w.manifest("d", "hello:1", ""), |_| {}).await?;
    wait_running(&c, "d").await?;
    assert_ne!(summary(&c, "d").await?.image, pinned);
    let (_, out) = exec(&c, "d", &["cat", "/www/index.html"]).await?;
    assert_eq!(out.trim(), "moved tag");

    // Prune removes only what no app uses.
    c.delete("/v1/apps/c").await?;
    let r: PruneReport = c.post("/v1/images/prune", &()).await?;
    assert_eq!(r.images.len(), 1, "{r:?}");
    assert_eq!(r.layers, 1, "{r:?}");
    let images: Vec<ImageInfo> = c.get("/v1/images").await?;
    assert!(images.iter().all(|i| !i.apps.is_empty()));
    Ok(())
}

/// A "registry" that answers every request with 200 and a body that is not JSON.
fn garbage_registry() -> Result<(String, std::thread::JoinHandle<()>)> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let handle = std::thread::spawn(move || {
        // Serve a bounded number of connections, then stop.
        for stream in listener.incoming().take(8) {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let body = "<html>surprise</html>";
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok((addr, handle))
}

#[tokio::test]
async fn a_registry_answering_garbage_gets_a_clear_error() -> Result<()> {
    let (addr, _server) = garbage_registry()?;
    let agent = start_agent(opts_for(&addr))?;
    let m = format!("name = \"junk\"\nimage = \"{addr}/junk:1\"\n");
    let err = agent.client().install(&m, |_| {}).await.unwrap_err();
    assert_eq!(err.status(), Some(502), "{err}");
    assert!(err.to_string().contains("invalid manifest"), "{err}");
    assert_nothing_left(&agent, "junk");
    Ok(())
}

#[tokio::test]
async fn a_full_disk_gets_a_clear_error_and_leaves_nothing() -> Result<()> {
    // The data directory on a 6 MiB tmpfs; the image unpacks to more than that.
    let mnt = tempfile::tempdir()?;
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "homeport-test-full"])
        .arg(mnt.path())
        .status()?;
    assert!(status.success(), "mount tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mnt.path().to_path_buf());

    let registry = Registry::start()?;
    let mut layer = homeport_testkit::LayerBuilder::new();
    layer.file("fill/zeros", 0o644, &vec![0u8; 8 << 20])?; // compresses to almost nothing
    let mut layout = homeport_testkit::OciLayout::new()?;
    let config = homeport_testkit::ImageConfig {
        cmd: Some(vec!["/bin/sleep".into(), "3600".into()]),
        ..Default::default()
    };
    let desc = layout.add_image(
        &[homeport_testkit::busybox_layer()?, layer.into_layer()?],
        &config,
    )?;
    layout.tag("1", &desc)?;
    homeport_testkit::push_layout(&registry, layout.path(), "fat", "1", &Default::default())?;

    let agent = AgentProcess::start_in(
        Path::new(HOMEPORTD),
        &mnt.path().join("data"),
        &format!("homeport-test-full-{}", std::process::id()),
        AgentOpts {
            insecure_registries: vec![registry.host()],
            ..Default::default()
        },
    )?;
    let m = format!("name = \"fat\"\nimage = \"{}/fat:1\"\n", registry.host());
    let err = agent.client().install(&m, |_| {}).await.unwrap_err();
    assert_eq!(err.status(), Some(507), "{err}");
    assert!(err.to_string().contains("No space left on device"), "{err}");
    assert_nothing_left(&agent, "fat");
    // The agent still works: a small app installs once space is there.
    push_hello(&registry, "hello", "1")?;
    let m = format!(
        "name = \"hello\"\nimage = \"{}/hello:1\"\n",
        registry.host()
    );
    agent.client().install(&m, |_| {}).await?;
    wait_running(&agent.client(), "hello").await?;
    drop(agent);
    Ok(())
}

/// The owner allows plain HTTP for a registry on the LAN through the API and the CLI (no
/// agent flag, which the appliance has no way to set); the setting is kept across agent
/// restarts and can be taken back.
#[tokio::test]
async fn the_owner_allows_plain_http_for_a_lan_registry() -> Result<()> {
    use homeport::api::types::{RegistryInfo, RegistrySettings};
    let registry = Registry::start()?;
    push_hello(&registry, "hello", "1")?;
    let mut agent = start_agent(AgentOpts::default())?;
    let c = agent.client();
    let host = registry.host();
    let m = format!("name = \"lan\"\nimage = \"{host}/hello:1\"\n");
    let err = c.install(&m, |_| {}).await.unwrap_err();
    assert_eq!(err.status(), Some(502), "HTTPS only until allowed: {err}");
    assert!(c.registries().await?.is_empty());

    let o = agent.cli(Path::new(HOMEPORT), &["registry", "allow-http", &host])?;
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("pulled over plain HTTP"), "{out}");
    c.install(&m, |_| {}).await?;
    wait_running(&c, "lan").await?;

    // Kept in the store: a restarted agent still pulls from it.
    agent.stop();
    agent.spawn()?;
    let allowed = RegistryInfo {
        host: host.clone(),
        insecure: true,
        credentials: false,
        owner: Some(RegistrySettings { insecure: true }),
    };
    assert_eq!(c.registries().await?, [allowed]);
    c.update("lan", None, |_| {}).await?;
    let o = agent.cli(Path::new(HOMEPORT), &["registry", "ls"])?;
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(&host) && out.contains("owner"), "{out}");

    // Taken back: HTTPS again, so re-resolving the tag fails.
    c.remove_registry(&host).await?;
    let err = c.remove_registry(&host).await.unwrap_err();
    assert_eq!(err.status(), Some(404), "{err}");
    let err = c.update("lan", None, |_| {}).await.unwrap_err();
    assert_eq!(err.status(), Some(502), "{err}");

    // Hosts are checked (and IPv6 literals travel escaped in the path); unknown keys refused.
    let yes = RegistrySettings { insecure: true };
    let v6 = c.set_registry("[fd00::1]:5000", &yes).await?;
    assert_eq!(v6.host, "[fd00::1]:5000");
    c.remove_registry("[fd00::1]:5000").await?;
    let err = c.set_registry("http:nas", &yes).await.unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    let err = c
        .put::<RegistryInfo, _>(
            "/v1/registries/nas.local:5000",
            &serde_json::json!({ "insecure": true, "tls": false }),
        )
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    assert!(c.registries().await?.is_empty());
    Ok(())
}
