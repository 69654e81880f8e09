//! The proxy's TLS as testssl.sh sees it: protocols, cipher suites, server preferences and
//! known vulnerabilities, with the device CA trusted. The invocation and the findings it
//! accepts (and why) are in `scripts/testssl.sh`.

#![allow(clippy::unwrap_used)] // tests may unwrap what they just built

mod common;

use anyhow::{Context, Result};
use common::*;
use homeport::api::types::AgentInfo;

#[tokio::test]
async fn testssl_finds_nothing_wrong_with_the_proxy() -> Result<()> {
    let w = World::new()?;
    let c = w.client();
    let info: AgentInfo = c.get("/v1/info").await?;
    let port = info
        .proxy_https
        .as_deref()
        .context("no https listener")?
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    c.install(
        &w.manifest("one", "hello:1", "[https]\nport = 8080\n"),
        |_| {},
    )
    .await?;
    let ca = tempfile::NamedTempFile::new()?;
    std::fs::write(ca.path(), c.text("/v1/ca.crt").await?)?;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/testssl.sh");
    let target = format!("one-{}.local:{port}", info.device_name);
    let ca_path = ca.path().to_path_buf();
    // A minute of scanning: off the test's runtime threads.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(script)
            .arg(target)
            .arg(ca_path)
            .output()
    })
    .await??;
    assert!(
        out.status.success(),
        "testssl.sh findings:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
