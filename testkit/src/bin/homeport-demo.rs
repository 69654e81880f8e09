//! `homeport-demo`: Homeport's main job in host mode, for the README's quick start.
//!
//! There is no internet here, so the demo brings its own registry: it starts a real
//! `docker-registry` on loopback, pushes a small busybox web server image to it, starts
//! `homeportd` with its state in a data directory, installs the app through the API, shows
//! that it serves, and prints how to reach it. Ctrl-C removes the app and stops everything.

use std::path::PathBuf;

use anyhow::{Context, Result};
use homeport_testkit::{AgentOpts, AgentProcess, BusyboxOpts, Registry};

const PAGE: &str = "<h1>Hello from an app run by Homeport</h1>\n";

fn main() -> Result<()> {
    let mut bin_dir = PathBuf::from("target/release");
    let mut data_dir = PathBuf::from("/var/lib/homeport-demo");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bin-dir" => bin_dir = args.next().context("--bin-dir needs a path")?.into(),
            "--data-dir" => data_dir = args.next().context("--data-dir needs a path")?.into(),
            other => {
                anyhow::bail!("unknown argument {other:?} (use --bin-dir DIR, --data-dir DIR)")
            }
        }
    }
    let bin_dir = std::fs::canonicalize(&bin_dir)
        .with_context(|| format!("{} (build first)", bin_dir.display()))?;
    let homeportd = bin_dir.join("homeportd");
    let homeport = bin_dir.join("homeport");

    println!("starting a local OCI registry and pushing the sample image …");
    let registry = Registry::start()?;
    homeport_testkit::push_busybox(
        &registry,
        "samples/hello",
        "1",
        &BusyboxOpts {
            index_html: PAGE.into(),
            ..Default::default()
        },
    )?;

    println!(
        "starting homeportd (host mode, state in {}) …",
        data_dir.display()
    );
    let agent = AgentProcess::start_in(
        &homeportd,
        &data_dir,
        "homeport-demo",
        AgentOpts {
            insecure_registries: vec![registry.host()],
            stop_grace_secs: 5,
            ..Default::default()
        },
    )?;
    let manifest = format!(
        "name = \"hello\"\nimage = \"{}/samples/hello:1\"\n\n[https]\nport = 8080\n\n[[volume]]\nname = \"data\"\npath = \"/data\"\n",
        registry.host()
    );
    let manifest_file = data_dir.join("hello.toml");
    std::fs::write(&manifest_file, &manifest)?;
    let socket = agent.socket();
    let cli = |args: &[&str]| -> Result<std::process::Output> { agent.cli(&homeport, args) };
    // A demo that was killed hard leaves its app behind in the state it kept: start afresh.
    let _ = cli(&["rm", "hello", "--purge-data"]);
    let out = cli(&["install", manifest_file.to_str().unwrap_or_default()])?;
    print!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(
        out.status.success(),
        "install failed; agent log:\n{}",
        agent.log()
    );

    // Wait until it answers, then show the page it serves.
    let mut page = String::new();
    for _ in 0..100 {
        let o = cli(&[
            "exec",
            "hello",
            "--",
            "wget",
            "-qO-",
            "http://127.0.0.1:8080/",
        ])?;
        if o.status.success() {
            page = String::from_utf8_lossy(&o.stdout).into_owned();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let hp = format!("{} --socket {}", homeport.display(), socket.display());
    if page.is_empty() {
        let o = cli(&["inspect", "hello"])?;
        anyhow::bail!(
            "the app does not serve:\n{}\nagent log:\n{}",
            String::from_utf8_lossy(&o.stdout),
            agent.log()
        );
    }
    println!();
    println!(
        "The app \"hello\" is running and serves:\n  {}",
        page.trim()
    );
    println!();
    let (address, url) = {
        let o = cli(&["--json", "inspect", "hello"])?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        (
            v["address"].as_str().unwrap_or_default().to_string(),
            v["url"].as_str().unwrap_or_default().to_string(),
        )
    };
    // The proxy's name for the app; the demo has no mDNS, so curl is told where it lives.
    let (host, port) = url
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .rsplit_once(':')
        .map(|(h, p)| (h.to_string(), p.to_string()))
        .unwrap_or_default();
    let ca = data_dir.join("ca").join("ca.crt");
    println!("Reach it through the device's HTTPS proxy, by name, trusting the device CA:");
    println!(
        "  curl --cacert {} --resolve {host}:{port}:127.0.0.1 {url}",
        ca.display()
    );
    println!("Or at its own IPv6 address (every app gets one, so every app keeps its port):");
    println!("  curl http://[{address}]:8080/");
    println!("  {hp} exec hello -- wget -qO- http://127.0.0.1:8080/");
    println!();
    println!("Look around:");
    for c in [
        "ls",
        "inspect hello",
        "logs hello",
        "history hello",
        "images",
        "debug hello",
        "stop hello",
    ] {
        println!("  {hp} {c}");
    }
    println!();
    println!(
        "Ctrl-C (or SIGTERM) ends the demo (removes the app, stops the agent and the registry)."
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    })?;
    println!("\ncleaning up …");
    drop(agent);
    drop(registry);
    Ok(())
}
