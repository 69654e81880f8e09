//! `kill -9` of the agent at every step of an install, a pull and a removal leaves a
//! consistent state after restart: the app is either fully there (and runs) or fully gone.

#![allow(clippy::unwrap_used)] // tests may unwrap what they just built

mod common;

use std::time::Duration;

use anyhow::Result;
use common::*;
use homeport::api::types::AppSummary;
use homeport_testkit::AgentProcess;

/// After a restart, an app that is absent has left nothing behind.
fn assert_absent_cleanly(agent: &AgentProcess, app: &str) {
    let data = agent.data_dir();
    assert!(!data.join("apps").join(app).exists(), "app dir left");
    assert_eq!(
        entries(&data.join("tmp")),
        Vec::<String>::new(),
        "temp files left"
    );
    assert!(
        mounts_below(data).is_empty(),
        "mounts left: {:?}",
        mounts_below(data)
    );
    assert!(cgroup_dirs(agent, app).is_empty(), "cgroups left");
}

/// Layer directories on disk are exactly the layers of recorded images.
async fn assert_layers_consistent(agent: &AgentProcess) -> Result<()> {
    let images: Vec<homeport::api::types::ImageInfo> = agent.client().get("/v1/images").await?;
    let expected: usize = images.iter().map(|i| i.layers).sum::<usize>();
    let on_disk = entries(&agent.data_dir().join("layers")).len() - 1; // minus "empty"
    assert!(
        on_disk <= expected,
        "{on_disk} layer dirs for {expected} image layers"
    );
    Ok(())
}

async fn crash_install_at(point: &str, present_after: bool) -> Result<()> {
    let mut w = World::new()?;
    let manifest = w.manifest(
        "hello",
        "hello:1",
        "[[volume]]\nname = \"data\"\npath = \"/data\"\n[https]\nport = 8080\n",
    );
    w.agent.kill9();
    w.agent.spawn_with_env("HOMEPORT_CRASHPOINT", point)?;
    let c = w.client();
    let r = c.install(&manifest, |_| {}).await;
    assert!(
        r.is_err(),
        "{point}: the agent should have died during the install"
    );
    w.agent.wait_exit(Duration::from_secs(10))?;
    w.agent.spawn()?;
    let c = w.client();
    let apps: Vec<AppSummary> = c.get("/v1/apps").await?;
    if present_after {
        assert_eq!(
            apps.len(),
            1,
            "{point}: the install was recorded, so the app is there"
        );
        let pid = context(wait_running(&c, "hello").await, &w.agent)?;
        assert!(process_alive(pid));
    } else {
        assert!(apps.is_empty(), "{point}: {apps:?}");
        assert_absent_cleanly(&w.agent, "hello");
        // The firewall lets nothing through to an app that is not installed.
        let info: homeport::api::types::AgentInfo = c.get("/v1/info").await?;
        let rules = std::process::Command::new("nft")
            .args(["-j", "list", "table", "inet", &info.firewall_table])
            .output()?;
        let rules: serde_json::Value = serde_json::from_slice(&rules.stdout)?;
        let objects = rules["nftables"].as_array().cloned().unwrap_or_default();
        assert!(
            objects.iter().any(|o| o["chain"]["name"] == "forward"),
            "{point}: {rules}"
        );
        // Only the device's own services are listed; no app's address or port.
        for o in &objects {
            let set = o.get("set").or_else(|| o.get("map"));
            if let Some(set) = set.filter(|s| s["name"] != "services") {
                assert!(set.get("elem").is_none(), "{point}: {set}");
            }
        }
        assert_layers_consistent(&w.agent).await?;
        // And installing again just works.
        context(
            c.install(&manifest, |_| {}).await.map_err(Into::into),
            &w.agent,
        )?;
        wait_running(&c, "hello").await?;
    }
    let (code, out) = exec(&c, "hello", &["wget", "-qO-", "http://127.0.0.1:8080/"]).await?;
    assert_eq!((code, out.trim()), (0, marker("1").as_str()), "{point}");
    Ok(())
}

#[tokio::test]
async fn killed_while_downloading() -> Result<()> {
    crash_install_at("pull:downloading", false).await
}

#[tokio::test]
async fn killed_after_a_layer_is_unpacked() -> Result<()> {
    crash_install_at("pull:layer-unpacked", false).await
}

#[tokio::test]
async fn killed_when_all_layers_are_ready() -> Result<()> {
    crash_install_at("pull:layers-ready", false).await
}

#[tokio::test]
async fn killed_after_the_app_is_prepared() -> Result<()> {
    crash_install_at("install:prepared", false).await
}

#[tokio::test]
async fn killed_after_the_firewall_lets_the_app_in() -> Result<()> {
    crash_install_at("install:allowed", false).await
}

#[tokio::test]
async fn killed_after_the_install_is_recorded() -> Result<()> {
    crash_install_at("install:recorded", true).await
}

/// An install with a database, a cache and an install hook, killed after the database was
/// made or after the hook ran: after the restart, nothing of it is left on the shared server
/// and no cache server runs for it, and it installs again.
async fn crash_install_with_services_at(point: &str) -> Result<()> {
    let mut w = World::new()?;
    let manifest = w.manifest(
        "svc",
        "hello:1",
        "[database]\n[cache]\n[[hook]]\nwhen = \"install\"\ncommand = [\"true\"]\n",
    );
    w.agent.kill9();
    w.agent.spawn_with_env("HOMEPORT_CRASHPOINT", point)?;
    let r = w.client().install(&manifest, |_| {}).await;
    assert!(r.is_err(), "{point}: the agent should have died");
    w.agent.wait_exit(Duration::from_secs(10))?;
    w.agent.spawn()?;
    let c = w.client();
    let apps: Vec<AppSummary> = c.get("/v1/apps").await?;
    assert!(apps.is_empty(), "{point}: {apps:?}");
    assert_absent_cleanly(&w.agent, "svc");
    let roles = std::process::Command::new("psql")
        .args(["-X", "-A", "-t", "-U", "postgres", "-d", "postgres", "-h"])
        .arg(w.agent.data_dir().join("services/postgres/run"))
        .args([
            "-c",
            "SELECT count(*) FROM pg_roles WHERE rolname = 'app_svc'",
        ])
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&roles.stdout).trim(),
        "0",
        "{point}: {}",
        String::from_utf8_lossy(&roles.stderr)
    );
    let caches: Vec<String> = std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path().join("cwd")).ok())
        .map(|p| p.display().to_string())
        .filter(|p| {
            p.starts_with(&w.agent.data_dir().display().to_string()) && p.contains("/cache")
        })
        .collect();
    assert!(caches.is_empty(), "{point}: cache servers left: {caches:?}");
    context(
        c.install(&manifest, |_| {}).await.map_err(Into::into),
        &w.agent,
    )?;
    wait_running(&c, "svc").await?;
    Ok(())
}

#[tokio::test]
async fn killed_after_the_database_is_made() -> Result<()> {
    crash_install_with_services_at("install:provisioned").await
}

#[tokio::test]
async fn killed_after_the_install_hooks_ran() -> Result<()> {
    crash_install_with_services_at("install:hooked").await
}

async fn crash_remove_at(point: &str) -> Result<()> {
    let mut w = World::new()?;
    let c = w.client();
    c.install(&w.manifest("hello", "hello:1", ""), |_| {})
        .await?;
    let pid = wait_running(&c, "hello").await?;
    w.agent.kill9();
    w.agent.spawn_with_env("HOMEPORT_CRASHPOINT", point)?;
    assert!(
        w.client().delete("/v1/apps/hello").await.is_err(),
        "{point}: the agent should have died"
    );
    w.agent.wait_exit(Duration::from_secs(10))?;
    w.agent.spawn()?;
    let apps: Vec<AppSummary> = w.client().get("/v1/apps").await?;
    assert!(
        apps.is_empty(),
        "{point}: the removal is finished at start: {apps:?}"
    );
    assert!(!process_alive(pid), "{point}: the app's process is gone");
    assert_absent_cleanly(&w.agent, "hello");
    Ok(())
}

#[tokio::test]
async fn killed_during_removal() -> Result<()> {
    crash_remove_at("rm:marked").await?;
    crash_remove_at("rm:torn-down").await
}

/// Not at a named point: kill -9 at several moments of a real pull of a larger image.
#[tokio::test]
async fn killed_at_random_moments_of_a_large_pull() -> Result<()> {
    let mut w = World::new()?;
    let mut layer = homeport_testkit::LayerBuilder::new();
    // 24 MiB that does not compress, so the pull takes a moment.
    let mut noise = vec![0u8; 24 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    layer.file("big/noise", 0o644, &noise)?;
    let mut layout = homeport_testkit::OciLayout::new()?;
    let base = homeport_testkit::busybox_layer()?;
    let config = homeport_testkit::ImageConfig {
        cmd: Some(vec!["/bin/sleep".into(), "3600".into()]),
        ..Default::default()
    };
    let desc = layout.add_image(&[base, layer.into_layer()?], &config)?;
    layout.tag("1", &desc)?;
    homeport_testkit::push_layout(&w.registry, layout.path(), "big", "1", &Default::default())?;
    let manifest = w.manifest("big", "big:1", "");
    for delay_ms in [30u64, 150, 400] {
        let (c, m) = (w.client(), manifest.clone());
        let install = tokio::spawn(async move { c.install(&m, |_| {}).await });
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        w.agent.kill9();
        let _ = install.await;
        w.agent.spawn()?;
        let c = w.client();
        let apps: Vec<AppSummary> = c.get("/v1/apps").await?;
        if apps.is_empty() {
            assert_absent_cleanly(&w.agent, "big");
        } else {
            wait_running(&c, "big").await?;
            c.delete("/v1/apps/big?purge_data=true").await?;
        }
        assert_layers_consistent(&w.agent).await?;
        assert_eq!(
            entries(&w.agent.data_dir().join("tmp")),
            Vec::<String>::new()
        );
    }
    let c = w.client();
    c.install(&w.manifest("big", "big:1", ""), |_| {}).await?;
    wait_running(&c, "big").await?;
    let (_, size) = exec(&c, "big", &["sh", "-c", "wc -c < /big/noise"]).await?;
    assert_eq!(size.trim(), (24 << 20).to_string());
    Ok(())
}

/// An update killed before its record leaves the old version; after it, the new one.
async fn crash_update_at(point: &str, new_after: bool) -> Result<()> {
    let mut w = World::new()?;
    let c = w.client();
    c.install(&w.manifest("web", "hello:1", ""), |_| {}).await?;
    wait_running(&c, "web").await?;
    let old = summary(&c, "web").await?.image;
    push_page(&w.registry, "hello", "1", "version two")?;
    w.agent.kill9();
    w.agent.spawn_with_env("HOMEPORT_CRASHPOINT", point)?;
    assert!(
        w.client().update("web", None, |_| {}).await.is_err(),
        "{point}: the agent should have died"
    );
    w.agent.wait_exit(Duration::from_secs(10))?;
    w.agent.spawn()?;
    let c = w.client();
    wait_running(&c, "web").await?;
    let now = summary(&c, "web").await?.image;
    let (_, page) = exec(&c, "web", &["wget", "-qO-", "http://127.0.0.1:8080/"]).await?;
    if new_after {
        assert_ne!(now, old, "{point}");
        assert_eq!(
            page.trim(),
            "version two",
            "{point}: the app runs the version it is pinned to"
        );
    } else {
        assert_eq!(now, old, "{point}");
        assert_eq!(page.trim(), marker("1"), "{point}");
    }
    Ok(())
}

#[tokio::test]
async fn killed_during_update() -> Result<()> {
    crash_update_at("update:pulled", false).await?;
    crash_update_at("update:recorded", true).await
}
