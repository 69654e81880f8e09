//! The API over the network: TLS with the device CA's certificate, the owner's token for
//! everything but the CA certificate itself.

mod common;

use anyhow::{Context, Result};
use common::*;
use homeport::api::types::AppSummary;

#[tokio::test]
async fn the_network_api_needs_the_owners_token_over_tls() -> Result<()> {
    let registry = homeport_testkit::Registry::start()?;
    push_hello(&registry, "hello", "1")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut opts = opts_for(&registry.host());
    opts.env
        .push(("HOMEPORT_API_LISTEN".into(), format!("127.0.0.1:{port}")));
    let agent = start_agent(opts)?;
    let token = std::fs::read_to_string(agent.data_dir().join("owner-token"))?;
    assert_eq!(token.len(), 64);
    let local_ca = agent.client().text("/v1/ca.crt").await?;

    // The CA certificate is public: a client fetches it unverified, then pins it by the
    // fingerprint the console showed.
    let base = format!("https://homeport.local:{port}");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let unverified = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .resolve("homeport.local", addr)
        .build()?;
    let ca = unverified
        .get(format!("{base}/v1/ca.crt"))
        .send()
        .await?
        .text()
        .await?;
    assert_eq!(ca, local_ca);
    let fingerprint = homeport::appliance::ca_fingerprint(&ca).context("a PEM certificate")?;
    assert!(
        agent
            .log()
            .contains(&format!("homeport: device ca sha256={fingerprint}")),
        "the console shows the CA's fingerprint"
    );
    assert!(agent
        .log()
        .contains(&format!("homeport: owner token={token}")));

    let pinned = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes())?)
        .resolve("homeport.local", addr)
        .build()?;
    for auth in [
        None,
        Some("Bearer nope"),
        Some(&*format!("Bearer {token}x")),
    ] {
        let mut r = pinned.get(format!("{base}/v1/apps"));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        assert_eq!(r.send().await?.status(), 401, "{auth:?}");
    }
    let manifest = format!(
        "name = \"remote\"\nimage = \"{}/hello:1\"\n",
        registry.host()
    );
    let installed = pinned
        .post(format!("{base}/v1/apps"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(
            &serde_json::json!({ "manifest": manifest }),
        )?)
        .send()
        .await?;
    assert!(
        installed.status().is_success(),
        "{}",
        installed.text().await?
    );
    let _ = installed.text().await?;
    let apps: Vec<AppSummary> = serde_json::from_str(
        &pinned
            .get(format!("{base}/v1/apps"))
            .bearer_auth(&token)
            .send()
            .await?
            .text()
            .await?,
    )?;
    assert_eq!(apps.len(), 1);
    assert_eq!(apps[0].name, "remote");
    let history = pinned
        .get(format!("{base}/v1/apps/remote/history"))
        .bearer_auth(&token)
        .send()
        .await?
        .text()
        .await?;
    assert!(
        history.to_string().contains("owner from 127.0.0.1"),
        "the history names who: {history}"
    );

    // Poweroff and reboot need the token, and only the appliance's init can carry them out:
    // an agent in host mode refuses (and sends no signal to this machine's PID 1).
    let anonymous = pinned
        .post(format!("{base}/v1/system/poweroff"))
        .send()
        .await?;
    assert_eq!(anonymous.status(), 401);
    for kind in ["poweroff", "reboot"] {
        let r = pinned
            .post(format!("{base}/v1/system/{kind}"))
            .bearer_auth(&token)
            .send()
            .await?;
        assert_eq!(r.status(), 409);
        let body = r.text().await?;
        assert!(
            body.contains(&format!("{kind} is only possible on the appliance")),
            "{body}"
        );
    }
    let refused = agent
        .client()
        .shutdown(homeport::appliance::ShutdownKind::Reboot)
        .await
        .expect_err("refused in host mode");
    assert_eq!(refused.status(), Some(409));

    // The clock: shown in host mode (the host keeps it), its servers set on the appliance
    // only; a malformed server is refused first, naming it.
    let time: homeport::clock::TimeStatus = agent.client().get("/v1/system/time").await?;
    assert!(!time.synchronized && time.servers.is_empty(), "{time:?}");
    assert!(time.problem.as_deref().unwrap_or("").contains("host mode"));
    let shown: jiff::Timestamp = time.now.parse()?;
    assert!((shown.as_second() - jiff::Timestamp::now().as_second()).abs() < 60);
    for (body, status, says) in [
        (
            r#"{"servers": ["10.0.0.1"]}"#,
            409,
            "the clock is the host's in host mode",
        ),
        (
            r#"{"servers": ["a b"]}"#,
            400,
            r#"\"a b\" is not an NTP server"#,
        ),
        (r#"{"servers": []}"#, 409, "host mode"),
        (r#"{"server": ["x"]}"#, 400, "unknown field"),
    ] {
        let r = pinned
            .put(format!("{base}/v1/system/time"))
            .bearer_auth(&token)
            .body(body)
            .send()
            .await?;
        assert_eq!(r.status(), status, "{body}");
        let text = r.text().await?;
        assert!(text.contains(says), "{body}: {text}");
    }
    Ok(())
}
