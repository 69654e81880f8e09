//! `update`: an explicit move to a new digest (a moved tag or a new manifest), recorded in the
//! history; bad updates change nothing.

#![allow(clippy::unwrap_used)] // tests may unwrap what they just built

mod common;

use anyhow::Result;
use common::*;
use homeport::api::types::{Desired, HistoryEntry};

async fn page(c: &homeport::api::client::Client, app: &str) -> Result<String> {
    let (code, out) = exec(c, app, &["wget", "-qO-", "http://127.0.0.1:8080/"]).await?;
    anyhow::ensure!(code == 0, "wget failed: {out}");
    Ok(out.trim().to_string())
}

#[tokio::test]
async fn update_moves_to_the_new_digest_only_when_asked() -> Result<()> {
    let w = World::new()?;
    let c = w.client();
    let m = w.manifest(
        "web",
        "hello:1",
        "[[volume]]\nname = \"data\"\npath = \"/data\"\n",
    );
    c.install(&m, |_| {}).await?;
    wait_running(&c, "web").await?;
    exec(&c, "web", &["sh", "-c", "echo kept > /data/f"]).await?;
    let old = summary(&c, "web").await?.image;

    // Nothing moved: nothing changes, nothing is recorded.
    let s = c.update("web", None, |_| {}).await?;
    assert_eq!(s.image, old);
    let h: Vec<HistoryEntry> = c.get("/v1/apps/web/history").await?;
    assert_eq!(h.len(), 1);

    // The tag moves: a restart keeps the old digest, an update takes the new one.
    push_page(&w.registry, "hello", "1", "version two")?;
    c.post::<serde_json::Value, _>("/v1/apps/web/restart", &())
        .await?;
    wait_running(&c, "web").await?;
    assert_eq!(page(&c, "web").await?, marker("1"));
    let mut pulled = 0;
    let s = c
        .update("web", None, |p| {
            if let homeport::api::types::Progress::LayerDone { cached: false, .. } = p {
                pulled += 1;
            }
        })
        .await?;
    assert_ne!(s.image, old);
    assert_eq!(pulled, 1, "only the changed layer is downloaded");
    wait_running(&c, "web").await?;
    assert_eq!(page(&c, "web").await?, "version two");
    // Data survives the update.
    assert_eq!(exec(&c, "web", &["cat", "/data/f"]).await?.1, "kept\n");
    let h: Vec<HistoryEntry> = c.get("/v1/apps/web/history").await?;
    let last = h.last().unwrap();
    assert_eq!(last.action, "update");
    assert!(
        last.detail.contains(&old) && last.detail.contains(&s.image),
        "{}",
        last.detail
    );

    // A new manifest: new environment, same app.
    let m2 = format!("{m}[env]\nCOLOR = \"blue\"\n");
    c.update("web", Some(&m2), |_| {}).await?;
    wait_running(&c, "web").await?;
    assert_eq!(
        exec(&c, "web", &["sh", "-c", "echo $COLOR"]).await?.1,
        "blue\n"
    );
    assert!(inspect(&c, "web").await?.manifest.contains("COLOR"));

    // A stopped app is updated but stays stopped.
    c.post::<serde_json::Value, _>("/v1/apps/web/stop", &())
        .await?;
    let m3 = format!("{m}[env]\nCOLOR = \"green\"\n");
    let s = c.update("web", Some(&m3), |_| {}).await?;
    assert_eq!(s.desired, Desired::Stopped);
    assert_eq!(s.run, homeport::api::types::RunState::Stopped);
    Ok(())
}

#[tokio::test]
async fn bad_updates_change_nothing() -> Result<()> {
    let w = World::new()?;
    let c = w.client();
    c.install(&w.manifest("web", "hello:1", ""), |_| {}).await?;
    let pid = wait_running(&c, "web").await?;
    let before = summary(&c, "web").await?;

    let err = c
        .update("web", Some(&w.manifest("web", "hello:nope", "")), |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(404), "{err}");
    let err = c
        .update("web", Some(&w.manifest("other", "hello:1", "")), |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    assert!(err.to_string().contains("keeps the app's name"), "{err}");
    let err = c
        .update("web", Some("name = \"web\"\nimgae = \"x\"\n"), |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    let err = c.update("ghost", None, |_| {}).await.unwrap_err();
    assert_eq!(err.status(), Some(404), "{err}");

    assert_eq!(summary(&c, "web").await?.image, before.image);
    assert_eq!(
        wait_running(&c, "web").await?,
        pid,
        "the app was not restarted"
    );
    let h: Vec<HistoryEntry> = c.get("/v1/apps/web/history").await?;
    assert_eq!(h.len(), 1);
    Ok(())
}
