//! Certificates for the owner's public domain from a real ACME server (pebble, validating for
//! real, rejecting 5 % of nonces), answered by the agent's proxy over HTTP-01 and TLS-ALPN-01.

#![allow(clippy::unwrap_used)] // tests may unwrap what they just built

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use common::*;
use homeport::proxy::CertState;
use homeport_testkit::{AgentOpts, Pebble, Registry};
use serde_json::json;

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_cert(
    c: &homeport::api::client::Client,
    name: &str,
    pebble: &Pebble,
) -> Result<CertState> {
    let mut last = Vec::new();
    for _ in 0..600 {
        let certs: Vec<CertState> = c.get("/v1/certificates").await?;
        if let Some(s) = certs
            .iter()
            .find(|s| s.name == name && s.not_after.is_some())
        {
            return Ok(s.clone());
        }
        last = certs;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!(
        "no certificate for {name}: {last:?}\npebble log:\n{}",
        pebble.log()
    )
}

#[tokio::test]
async fn public_names_get_certificates_over_http01_and_tls_alpn01() -> Result<()> {
    let registry = Registry::start()?;
    push_hello(&registry, "hello", "1")?;
    let (p80, p443) = (free_port()?, free_port()?);
    let pebble = Pebble::start(p80, p443)?;
    let opts = AgentOpts {
        proxy_http: format!("[::]:{p80}"),
        proxy_https: format!("[::]:{p443}"),
        acme_root: Some(pebble.api_root()),
        ..opts_for(&registry.host())
    };
    let mut agent = start_agent(opts)?;
    let c = agent.client();
    let manifest = |name: &str| {
        format!(
            "name = \"{name}\"\nimage = \"{}/hello:1\"\n[https]\nport = 8080\n",
            registry.host()
        )
    };
    c.install(&manifest("one"), |_| {}).await?;
    wait_running(&c, "one").await?;

    // Bad settings are refused, naming the problem.
    let err = c
        .put::<serde_json::Value, _>("/v1/domain", &json!({"domain": "home.local"}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("LAN name"), "{err}");

    // HTTP-01 through the proxy's port 80.
    let set: serde_json::Value = c
        .put(
            "/v1/domain",
            &json!({"domain": "example.test", "directory": pebble.directory(), "challenge": "http-01"}),
        )
        .await?;
    assert_eq!(set["domain"], "example.test");
    let one = wait_cert(&c, "one.example.test", &pebble).await?;
    assert!(one.error.is_none(), "{one:?}");

    let root = pebble.issuing_root()?;
    let https = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, p443));
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(root.as_bytes())?)
        .resolve("one.example.test", https)
        .resolve("two.example.test", https)
        .build()?;
    let get = |name: &str| {
        let url = format!("https://{name}:{p443}/");
        let client = client.clone();
        async move { client.get(url).send().await?.text().await }
    };
    wait_for(
        "the app behind its public name",
        Duration::from_secs(10),
        || async {
            Ok(get("one.example.test")
                .await
                .is_ok_and(|b| b.trim() == marker("1")))
        },
    )
    .await?;

    // TLS-ALPN-01 through port 443, for an app installed afterwards.
    c.put::<serde_json::Value, _>(
        "/v1/domain",
        &json!({"domain": "example.test", "directory": pebble.directory(), "challenge": "tls-alpn-01"}),
    )
    .await?;
    c.install(&manifest("two"), |_| {}).await?;
    wait_running(&c, "two").await?;
    wait_cert(&c, "two.example.test", &pebble).await?;
    wait_for(
        "the second app behind its public name",
        Duration::from_secs(10),
        || async {
            Ok(get("two.example.test")
                .await
                .is_ok_and(|b| b.trim() == marker("1")))
        },
    )
    .await?;

    // A name the ACME server cannot validate: the failure and its reason are reported, and a
    // retry is scheduled.
    pebble.break_dns("bad.example.test")?;
    c.install(&manifest("bad"), |_| {}).await?;
    let mut bad = None;
    for _ in 0..600 {
        let certs: Vec<CertState> = c.get("/v1/certificates").await?;
        bad = certs.into_iter().find(|s| s.name == "bad.example.test");
        if bad.as_ref().is_some_and(|s| s.error.is_some()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bad = bad.context("bad.example.test is not listed")?;
    let error = bad.error.clone().context("no error reported")?;
    // Pebble's own words for a name it cannot look up.
    assert!(
        error.contains("bad.example.test") && error.contains("resolve"),
        "{error}"
    );
    assert!(bad.not_after.is_none() && bad.retry_at.is_some(), "{bad:?}");

    // Account and certificates are kept: after a restart they are served at once.
    agent.stop();
    agent.spawn()?;
    let c = agent.client();
    let certs: Vec<CertState> = c.get("/v1/certificates").await?;
    let kept = certs
        .iter()
        .find(|s| s.name == "one.example.test")
        .context("one.example.test after a restart")?;
    assert_eq!(kept.not_after, one.not_after, "the same certificate");
    assert_eq!(get("one.example.test").await?.trim(), marker("1"));
    Ok(())
}
