//! Per-app IPv6 addresses on the real kernel: every app its own address on a bridge, so two
//! apps serve the same port; addresses survive restarts; `rm` leaves no links.

#![allow(clippy::unwrap_used)] // tests may unwrap what they just built

mod common;

use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddrV6, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result};
use common::*;
use homeport::api::types::AgentInfo;

/// `GET /` from the host to an app's address; the body.
fn get(addr: &str, port: u16) -> Result<String> {
    let ip: Ipv6Addr = addr.parse()?;
    let mut s = TcpStream::connect_timeout(
        &SocketAddrV6::new(ip, port, 0, 0).into(),
        Duration::from_secs(5),
    )
    .with_context(|| format!("connect to [{addr}]:{port}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: app\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_string())
        .unwrap_or_default())
}

/// Homeport's links on the host other than the bridge (other tests' agents may add theirs
/// meanwhile, so the counts are compared for this test's own apps only).
fn host_links(bridge: &str) -> Vec<String> {
    entries(std::path::Path::new("/sys/class/net"))
        .into_iter()
        .filter(|l| l.starts_with("hp") && l != bridge)
        .collect()
}

#[tokio::test]
async fn every_app_has_its_own_address_and_port() -> Result<()> {
    let w = World::new()?;
    push_hello(&w.registry, "hello", "2")?;
    let c = w.client();
    let info: AgentInfo = c.get("/v1/info").await?;
    assert!(
        info.apps_prefix.starts_with("fd") && info.apps_prefix.ends_with("::/64"),
        "{}",
        info.apps_prefix
    );
    assert!(
        std::path::Path::new("/sys/class/net")
            .join(&info.bridge)
            .exists(),
        "bridge up"
    );
    let links_before = host_links(&info.bridge);

    // Two apps, both on port 8080.
    // The device (its proxy) reaches an app on its declared HTTP port.
    let http = "[https]\nport = 8080\n";
    let one = c
        .install(&w.manifest("one", "hello:1", http), |_| {})
        .await?;
    let two = c
        .install(&w.manifest("two", "hello:2", http), |_| {})
        .await?;
    wait_running(&c, "one").await?;
    wait_running(&c, "two").await?;
    assert_ne!(one.address, two.address);
    let prefix = info.apps_prefix.trim_end_matches("::/64");
    assert!(
        one.address.starts_with(prefix) && two.address.starts_with(prefix),
        "{} {}",
        one.address,
        two.address
    );
    assert_eq!(get(&one.address, 8080)?, marker("1"));
    assert_eq!(get(&two.address, 8080)?, marker("2"));
    assert_eq!(
        host_links(&info.bridge).len(),
        links_before.len() + 2,
        "one veth per app"
    );

    // Apps cannot reach each other (isolated bridge ports); the host reaches both. The same
    // command that fails towards the other app succeeds towards the app's own address.
    // (`timeout`, not `wget -T`: busybox's wget crashes with -T.)
    let fetch = |addr: &str| {
        vec![
            "sh".to_string(),
            "-c".into(),
            format!("timeout 3 wget -qO- http://[{addr}]:8080/"),
        ]
    };
    let own: Vec<String> = fetch(&one.address);
    let own: Vec<&str> = own.iter().map(String::as_str).collect();
    let (code, out) = exec(&c, "one", &own).await?;
    assert_eq!(
        (code, out.trim()),
        (0, marker("1").as_str()),
        "an app reaches itself at its address"
    );
    let other: Vec<String> = fetch(&two.address);
    let other: Vec<&str> = other.iter().map(String::as_str).collect();
    let (code, out) = exec(&c, "one", &other).await?;
    assert_ne!(code, 0, "app one must not reach app two: {out}");
    assert!(!out.contains(&marker("2")), "{out}");

    // Inside: eth0 holds the address; the app's name resolves to it.
    let (_, hosts) = exec(&c, "one", &["cat", "/etc/hosts"]).await?;
    assert!(hosts.contains(&format!("{}\tone", one.address)), "{hosts}");
    let (_, inet6) = exec(&c, "one", &["cat", "/proc/net/if_inet6"]).await?;
    let hex: String = one
        .address
        .parse::<Ipv6Addr>()?
        .octets()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(
        inet6
            .lines()
            .any(|l| l.starts_with(&hex) && l.trim_end().ends_with("eth0")),
        "{inet6}"
    );

    // The same address after a restart, an agent kill -9 and an update.
    c.post::<serde_json::Value, _>("/v1/apps/one/restart", &())
        .await?;
    wait_running(&c, "one").await?;
    assert_eq!(get(&one.address, 8080)?, marker("1"));
    let mut agent = w.agent;
    agent.kill9();
    agent.spawn()?;
    let c = agent.client();
    assert_eq!(summary(&c, "one").await?.address, one.address);
    assert_eq!(get(&one.address, 8080)?, marker("1"));
    c.update(
        "one",
        Some(&format!(
            "name = \"one\"\nimage = \"{}/hello:2\"\n{http}",
            w.registry.host()
        )),
        |_| {},
    )
    .await?;
    wait_running(&c, "one").await?;
    assert_eq!(get(&one.address, 8080)?, marker("2"));

    // rm takes the app's link along; the other app keeps serving.
    c.delete("/v1/apps/one").await?;
    assert_eq!(host_links(&info.bridge).len(), links_before.len() + 1);
    assert!(
        get(&one.address, 8080).is_err(),
        "the removed app's address is gone"
    );
    assert_eq!(get(&two.address, 8080)?, marker("2"));
    c.delete("/v1/apps/two").await?;
    assert_eq!(host_links(&info.bridge), links_before);
    drop(agent);
    Ok(())
}
