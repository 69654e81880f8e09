//! Outbound access, isolation and published ports on the real kernel, in a small world of
//! network namespaces (`NetWorld`): the agent runs in `dev`, behind a LAN router `lan` that
//! is also the LAN client, with an "internet" `inet` that can answer only the device's own
//! addresses. So an app reaching the internet proves the device NATs it; the LAN reaching an
//! app proves the DNAT of a public port; what must not connect is checked against servers
//! that are known to answer otherwise.

#![allow(clippy::unwrap_used)] // tests may unwrap what they just built

mod common;

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};
use common::*;
use homeport::api::types::AgentInfo;
use homeport_testkit::{AgentOpts, NetWorld, Registry};

const INTERNET_PAGE: &str = "hello from the internet";
const DEVICE_PAGE: &str = "a service of the device itself";

/// `wget` of `url` from inside `app` (5 s at most); (exit code, output).
async fn fetch_in_app(c: &homeport::api::client::Client, app: &str, url: &str) -> (i32, String) {
    let cmd = format!("timeout 5 wget -qO- {url}");
    exec(c, app, &["sh", "-c", &cmd])
        .await
        .unwrap_or((-1, String::new()))
}

/// `wget` of `url` from a namespace of the world; the body, or `None` when it failed. (Dropped
/// packets fail by the timeout: 3 s, where a LAN answers in milliseconds.)
fn fetch_in(world: &NetWorld, ns: &str, url: &str) -> Option<String> {
    let out = world
        .run(
            ns,
            &["busybox", "timeout", "3", "busybox", "wget", "-qO-", url],
        )
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// What the device's kernel holds that an app could leave behind: links, addresses, routes
/// (both families) and the firewall's table, as text.
struct Footprint {
    links: usize,
    addresses: usize,
    routes: usize,
    rules: String,
}

fn footprint(world: &NetWorld, table: &str) -> Result<Footprint> {
    let lines =
        |args: &[&str]| -> Result<usize> { Ok(world.check(world.dev(), args)?.lines().count()) };
    Ok(Footprint {
        links: lines(&["ip", "-o", "link"])?,
        addresses: lines(&["ip", "-o", "addr"])?,
        routes: lines(&["ip", "route"])? + lines(&["ip", "-6", "route"])?,
        rules: world.check(world.dev(), &["nft", "list", "table", "inet", table])?,
    })
}

#[tokio::test]
async fn apps_reach_out_stay_apart_and_publish_only_declared_ports() -> Result<()> {
    let world = NetWorld::new()?;
    let registry = Registry::start()?;
    push_hello(&registry, "hello", "1")?;
    push_hello(&registry, "hello", "2")?;
    let port: u16 = registry.host().rsplit(':').next().unwrap().parse()?;
    let _registry_inside = world.forward_loopback(world.dev(), port)?;
    let inet4 = Ipv4Addr::new(203, 0, 113, 2);
    let inet6: Ipv6Addr = "2001:db8:1::2".parse()?;
    let _web = world.serve_http(world.inet(), 80, INTERNET_PAGE)?;
    // A download far larger than one packet: the apps' links have a 64 KiB MTU, the way out
    // 1500 bytes.
    let _big = world.serve_http(world.inet(), 8081, &"x".repeat(1 << 20))?;
    let _dns = world.serve_dns(world.inet(), "internet.test", inet4, inet6)?;
    // Something of the device's own, which the LAN reaches and apps must not.
    let _device_service = world.serve_http(world.dev(), 9999, DEVICE_PAGE)?;
    assert_eq!(
        fetch_in(&world, world.lan(), "http://192.168.77.2:9999/").as_deref(),
        Some(DEVICE_PAGE)
    );

    // The device's resolver, as its DHCP client would have written it; the loopback stub
    // must not reach the apps.
    let resolv = tempfile::NamedTempFile::new()?;
    std::fs::write(
        resolv.path(),
        "nameserver 127.0.0.53\nnameserver 203.0.113.2\nsearch lan\n",
    )?;
    let mut opts = AgentOpts {
        netns: Some(NetWorld::netns_path(world.dev())),
        // Fixed ports (the namespace is the test's own): they are in the rules, which must
        // come out the same after a restart.
        proxy_http: "[::]:18080".into(),
        proxy_https: "[::]:18443".into(),
        ..opts_for(&registry.host())
    };
    opts.env.push((
        "HOMEPORT_RESOLV_CONF".into(),
        resolv.path().display().to_string(),
    ));
    let mut agent = start_agent(opts)?;
    let c = agent.client();
    let info: AgentInfo = c.get("/v1/info").await?;
    let before = footprint(&world, &info.firewall_table)?;

    let image = |tag: &str| format!("{}/hello:{tag}", registry.host());
    // `a` serves its page on 8080 (HTTP, for the proxy), 7000 (published) and 7001 (not
    // declared at all).
    let a = c
        .install(
            &format!(
                "name = \"a\"\nimage = \"{}\"\ncommand = [\"sh\", \"-c\", \"httpd -p 7000 -h /www; httpd -p 7001 -h /www; exec httpd -f -p 8080 -h /www\"]\n[https]\nport = 8080\n[[port]]\nport = 7000\naccess = \"public\"\n",
                image("1")
            ),
            |_| {},
        )
        .await?;
    let b = c
        .install(
            &format!(
                "name = \"b\"\nimage = \"{}\"\n[https]\nport = 8080\n[database]\n",
                image("2")
            ),
            |_| {},
        )
        .await?;
    wait_running(&c, "a").await?;
    wait_running(&c, "b").await?;
    assert!(
        a.ipv4
            .starts_with(info.apps_net4.split('.').next().unwrap())
            && a.ipv4 != b.ipv4,
        "{} {} in {}",
        a.ipv4,
        b.ipv4,
        info.apps_net4
    );
    // Wait until `a` serves on all three ports.
    wait_for(
        "a's servers",
        std::time::Duration::from_secs(10),
        || async { Ok(fetch_in_app(&c, "a", "http://127.0.0.1:7001/").await.0 == 0) },
    )
    .await?;

    // Outbound: the internet over IPv4 and IPv6, and by name through the resolver.
    for url in [
        format!("http://{inet4}/"),
        format!("http://[{inet6}]/"),
        "http://internet.test/".to_string(),
    ] {
        let (code, out) = fetch_in_app(&c, "a", &url).await;
        assert_eq!((code, out.trim()), (0, INTERNET_PAGE), "{url}");
    }
    for url in [
        format!("http://{inet4}:8081/"),
        format!("http://[{inet6}]:8081/"),
    ] {
        let cmd = format!("timeout 10 wget -qO- {url} | wc -c");
        let (code, out) = exec(&c, "a", &["sh", "-c", &cmd]).await?;
        assert_eq!((code, out.trim()), (0, "1048576"), "{url}");
    }
    let (_, resolv_in_app) = exec(&c, "a", &["cat", "/etc/resolv.conf"]).await?;
    assert_eq!(resolv_in_app, "nameserver 203.0.113.2\nsearch lan\n");
    // A new lease changes the device's resolvers: running apps follow.
    std::fs::write(resolv.path(), "nameserver 203.0.113.2\nsearch home\n")?;
    wait_for(
        "the apps' resolvers to follow",
        std::time::Duration::from_secs(20),
        || async {
            Ok(exec(&c, "a", &["cat", "/etc/resolv.conf"]).await?.1
                == "nameserver 203.0.113.2\nsearch home\n")
        },
    )
    .await?;
    let (code, out) = exec(&c, "a", &["nslookup", "internet.test"]).await?;
    assert!(
        code == 0 && out.contains("203.0.113.2") && out.contains("2001:db8:1::2"),
        "{out}"
    );

    // Isolation: not the other app (either family), not the device (gateway or LAN address).
    let gw6 = info.apps_prefix.replace("::/64", "::1");
    let gw4 = {
        let base: Ipv4Addr = info.apps_net4.split('/').next().unwrap().parse()?;
        Ipv4Addr::from(u32::from(base) + 1)
    };
    for url in [
        format!("http://[{}]:8080/", b.address),
        format!("http://{}:8080/", b.ipv4),
        format!("http://[{gw6}]:9999/"),
        format!("http://{gw4}:9999/"),
        "http://192.168.77.2:9999/".to_string(),
        "http://[fd77::2]:9999/".to_string(),
    ] {
        let (code, out) = fetch_in_app(&c, "a", &url).await;
        assert_ne!(code, 0, "app a reached {url}: {out}");
    }
    // The same command reaches the app's own address: the failures above are the firewall.
    let (code, out) = fetch_in_app(&c, "a", &format!("http://[{}]:8080/", a.address)).await;
    assert_eq!((code, out.trim()), (0, marker("1").as_str()));

    // The device (its proxy) reaches the HTTP port and declared ports, nothing else.
    let dev = world.dev();
    assert_eq!(
        fetch_in(&world, dev, &format!("http://[{}]:8080/", a.address)),
        Some(marker("1"))
    );
    assert_eq!(
        fetch_in(&world, dev, &format!("http://{}:8080/", b.ipv4)),
        Some(marker("2"))
    );
    assert_eq!(
        fetch_in(&world, dev, &format!("http://[{}]:7001/", a.address)),
        None
    );

    // The LAN: the published port on the device's addresses, both families; nothing else,
    // also not with a route straight to the apps' nets.
    let lan = world.lan();
    assert_eq!(
        fetch_in(&world, lan, "http://192.168.77.2:7000/"),
        Some(marker("1"))
    );
    assert_eq!(
        fetch_in(&world, lan, "http://[fd77::2]:7000/"),
        Some(marker("1"))
    );
    assert_eq!(fetch_in(&world, lan, "http://192.168.77.2:7001/"), None);
    world.check(
        lan,
        &["ip", "route", "add", &info.apps_net4, "via", "192.168.77.2"],
    )?;
    world.check(
        lan,
        &[
            "ip",
            "-6",
            "route",
            "add",
            &info.apps_prefix,
            "via",
            "fd77::2",
        ],
    )?;
    for url in [
        format!("http://[{}]:8080/", a.address),
        format!("http://{}:8080/", a.ipv4),
        format!("http://[{}]:7001/", a.address),
        format!("http://{}:8080/", b.ipv4),
    ] {
        assert_eq!(fetch_in(&world, lan, &url), None, "the LAN reached {url}");
    }

    // The shared database: app b reaches it on the gateway with its credentials; the LAN
    // reaches it on no address of the device's, not even with routes to the apps' nets.
    let (_, env) = exec(&c, "b", &["env"]).await?;
    let url = env
        .lines()
        .find_map(|l| l.strip_prefix("DATABASE_URL="))
        .context("b's DATABASE_URL")?
        .to_string();
    let b_ns = agent.data_dir().join("apps/b/netns");
    let psql = |ns: &str, url: &str| {
        world.run(
            ns,
            &[
                "env",
                "PGCONNECT_TIMEOUT=3",
                "psql",
                "-X",
                "-A",
                "-t",
                url,
                "-c",
                "SELECT 42",
            ],
        )
    };
    let from_b = std::process::Command::new("nsenter")
        .arg(format!("--net={}", b_ns.display()))
        .args(["psql", "-X", "-A", "-t", &url, "-c", "SELECT 42"])
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&from_b.stdout).trim(),
        "42",
        "{}",
        String::from_utf8_lossy(&from_b.stderr)
    );
    let gateway4 = url
        .split('@')
        .nth(1)
        .and_then(|h| h.split(':').next())
        .context("the database host")?
        .to_string();
    let gateway6 = format!("[{}1]", info.apps_prefix.trim_end_matches("/64"));
    for host in [gateway4.as_str(), &gateway6, "192.168.77.2", "[fd77::2]"] {
        let lan_url = url.replace(&format!("@{gateway4}:"), &format!("@{host}:"));
        let out = psql(lan, &lan_url)?;
        // Not even the server's refusal comes back: no connection at all.
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && (err.contains("timeout expired") || err.contains("Connection refused")),
            "the LAN reached the database at {host}: {} {err}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // A second app cannot publish the same device port.
    let err = c
        .install(
            &format!(
                "name = \"c\"\nimage = \"{}\"\n[[port]]\nport = 7000\naccess = \"public\"\n",
                image("1")
            ),
            |_| {},
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("port 7000/tcp is already published by app a"),
        "{err}"
    );

    // After an agent restart (kill -9), the rules are the same, and still work.
    let rules = world.check(dev, &["nft", "list", "table", "inet", &info.firewall_table])?;
    assert!(
        rules.contains(&a.ipv4) && rules.contains(&b.address),
        "{rules}"
    );
    agent.kill9();
    world.check(
        dev,
        &["nft", "flush", "table", "inet", &info.firewall_table],
    )?; // whatever the kernel holds, the agent makes it match the store
    agent.spawn()?;
    let c = agent.client();
    assert_eq!(
        world.check(dev, &["nft", "list", "table", "inet", &info.firewall_table])?,
        rules
    );
    assert_eq!(
        fetch_in(&world, lan, "http://192.168.77.2:7000/"),
        Some(marker("1"))
    );

    // rm takes everything of the apps along.
    c.delete("/v1/apps/a").await?;
    c.delete("/v1/apps/b").await?;
    let after = footprint(&world, &info.firewall_table)?;
    assert_eq!(after.links, before.links, "links");
    assert_eq!(after.addresses, before.addresses, "addresses");
    assert_eq!(after.routes, before.routes, "routes");
    assert_eq!(after.rules, before.rules, "rules");
    assert_eq!(fetch_in(&world, lan, "http://192.168.77.2:7000/"), None);
    drop(agent);
    Ok(())
}
