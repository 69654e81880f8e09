//! `homeportd`: the Homeport agent.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use homeport::daemon::{Agent, Config};
use homeport::images::registry::{Credentials, RegistryConfig};
use homeport::paths::Paths;

#[derive(Parser)]
#[command(name = "homeportd", version, about = "The Homeport agent")]
struct Args {
    /// Where all state lives.
    #[arg(long, default_value = "/var/lib/homeport", env = "HOMEPORT_DATA_DIR")]
    data_dir: PathBuf,
    /// The API socket (default: DATA_DIR/agent.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// cgroup under which every app's cgroup is made.
    #[arg(long, default_value = "homeport")]
    cgroup_parent: String,
    /// A registry (host[:port]) that may be reached over plain HTTP. Repeatable.
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// Registry credentials as HOST=USER:PASSWORD. Repeatable. (Also read from
    /// DATA_DIR/registries.json: {"HOST": {"username": …, "password": …}}.)
    #[arg(long = "registry-auth")]
    registry_auth: Vec<String>,
    /// Size at which an app's log file is rotated.
    #[arg(long, default_value_t = homeport::runtime::logs::DEFAULT_CAP)]
    log_cap: u64,
    /// Seconds between SIGTERM and SIGKILL when an app is stopped.
    #[arg(long, default_value_t = homeport::runtime::DEFAULT_STOP_GRACE.as_secs())]
    stop_grace: u64,
    /// The device's resolv.conf; apps get its nameservers (loopback ones left out).
    #[arg(long, default_value = "/etc/resolv.conf", env = "HOMEPORT_RESOLV_CONF")]
    resolv_conf: PathBuf,
    /// Where the reverse proxy takes plain HTTP (redirected to HTTPS); `off` for nowhere.
    #[arg(long, default_value = "[::]:80", value_parser = listen_addr)]
    proxy_http: Listen,
    /// Where the reverse proxy takes HTTPS; `off` for nowhere.
    #[arg(long, default_value = "[::]:443", value_parser = listen_addr)]
    proxy_https: Listen,
    /// A CA certificate (PEM) the ACME directory's own TLS chains to, for test ACME servers.
    #[arg(long, env = "HOMEPORT_ACME_ROOT")]
    acme_root: Option<PathBuf>,
    /// PostgreSQL's programs for the shared database (default: the newest version under
    /// /usr/lib/postgresql).
    #[arg(long, env = "HOMEPORT_POSTGRES_BIN")]
    postgres_bin: Option<PathBuf>,
    /// Where the API is also served over TLS for the owner's token; `off` for nowhere
    /// (default: `[::]:8443` on the appliance, off in host mode).
    #[arg(long, env = "HOMEPORT_API_LISTEN", value_parser = listen_addr)]
    api_listen: Option<Listen>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

/// A listening address, or none (`off`).
#[derive(Debug, Clone, Copy)]
struct Listen(Option<std::net::SocketAddr>);

fn listen_addr(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen(None));
    }
    s.parse()
        .map(|a| Listen(Some(a)))
        .map_err(|_| format!("{s:?} is not an address like [::]:443 or 127.0.0.1:8443, nor off"))
}

#[derive(Subcommand)]
enum Cmd {
    /// (internal) the single-threaded runtime helper; started by the agent itself.
    #[command(hide = true)]
    Zygote {
        #[arg(long)]
        root: PathBuf,
    },
}

fn main() {
    let args = Args::parse();
    if let Some(Cmd::Zygote { root }) = &args.cmd {
        // libcgroups warns at every start about controllers this kernel lacks.
        init_tracing("warn,libcgroups=error");
        homeport::runtime::zygote::serve(root);
    }
    init_tracing("info");
    // rustls is built with two providers (ours, ring; and aws-lc-rs, which tough's rustls
    // brings): TLS clients that do not name one (instant-acme's) need a process default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // glibc gives every thread that allocates an arena of its own, and the agent's blocking
    // and netlink threads come and go: two arenas keep its memory ~4 MiB smaller with no
    // contention worth measuring (allocation is not on any hot path here).
    // SAFETY: mallopt only sets an allocator parameter, before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_all()
        .build();
    let result = runtime
        .context("start the async runtime")
        .and_then(|rt| rt.block_on(run(args)));
    if let Err(e) = result {
        eprintln!("homeportd: {e:#}");
        std::process::exit(1);
    }
}

fn init_tracing(default: &str) {
    // RUST_LOG too: on the appliance it comes from the kernel command line through
    // homeport-init.
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOMEPORT_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_env("RUST_LOG"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn registry_config(args: &Args) -> anyhow::Result<RegistryConfig> {
    let mut config = RegistryConfig {
        insecure: args.insecure_registries.clone(),
        ..Default::default()
    };
    let file = args.data_dir.join("registries.json");
    if file.exists() {
        let text = std::fs::read(&file).with_context(|| format!("read {}", file.display()))?;
        let creds: std::collections::HashMap<String, Credentials> =
            serde_json::from_slice(&text)
                .with_context(|| format!("{} is not valid", file.display()))?;
        config.credentials.extend(creds);
    }
    for a in &args.registry_auth {
        let (host, up) = a
            .split_once('=')
            .context("--registry-auth takes HOST=USER:PASSWORD")?;
        let (user, pass) = up
            .split_once(':')
            .context("--registry-auth takes HOST=USER:PASSWORD")?;
        config.credentials.insert(
            host.to_string(),
            Credentials {
                username: user.to_string(),
                password: pass.to_string(),
            },
        );
    }
    Ok(config)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let paths = Paths::new(&args.data_dir);
    let socket = args.socket.clone().unwrap_or_else(|| paths.socket());
    let config = Config {
        registries: registry_config(&args)?,
        paths,
        cgroup_parent: args.cgroup_parent.clone(),
        log_cap: args.log_cap,
        stop_grace: Duration::from_secs(args.stop_grace),
        resolv_conf: args.resolv_conf.clone(),
        proxy: homeport::proxy::ProxyConfig {
            http: args.proxy_http.0,
            https: args.proxy_https.0,
            acme_dir: Paths::new(&args.data_dir).acme(),
            acme_root: args.acme_root.clone(),
        },
        postgres_bin: args.postgres_bin.clone(),
    };
    let appliance = homeport::appliance::Appliance::detect();
    // dhcpcd, supervised for the agent's lifetime.
    let _network = appliance.as_ref().and_then(|a| {
        tracing::info!(version = %a.version, slot = ?a.slot, "running as the appliance");
        homeport::appliance::start_network()
    });
    if appliance.is_some() {
        tokio::spawn(homeport::appliance::announce_addresses());
    }
    // The OS update side of the appliance (slots, the ESP mounted, the trusted root), found
    // while the agent starts: mounting the ESP takes ~0.5 s under emulation. Its crash-loop
    // guard counts this start, so it is waited for even when the start fails.
    let platform = appliance.clone().map(|a| {
        tokio::task::spawn_blocking(move || {
            let p = homeport::os::Platform::detect(&a)
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "OS updates are off");
                    println!("homeport: os-update off: {e}");
                })
                .ok()?;
            homeport::os::guard_crash_loop(&p, std::path::Path::new("/run/homeport/agent-starts"));
            Some(p)
        })
    });
    let started = Agent::start(config).await;
    let platform = match platform {
        Some(task) => task.await.ok().flatten(),
        None => None,
    };
    let agent = Arc::new(started?);
    let updater = agent.attach_os(platform.clone());
    if appliance.is_some() {
        agent.attach_time();
    }
    if platform.is_some() {
        let health = Arc::new(homeport::os::AgentHealth {
            agent: agent.clone(),
            socket: socket.clone(),
        });
        tokio::spawn(updater.run(health));
    }
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let api_listen = match args.api_listen {
        Some(l) => l.0,
        None if appliance.is_some() => Some(std::net::SocketAddr::from((
            std::net::Ipv6Addr::UNSPECIFIED,
            8443,
        ))),
        None => None,
    };
    let mut tcp_api = None;
    if let Some(addr) = api_listen {
        let (token, made) =
            homeport::appliance::owner_token(&args.data_dir).context("the owner's API token")?;
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen for the API on {addr}"))?;
        let tls = agent.api_tls().context("the API's TLS configuration")?;
        if made {
            // Shown once, on the console (physical access): pairing replaces it later.
            println!("homeport: owner token={token}");
        }
        println!(
            "homeport: device ca sha256={}",
            homeport::appliance::ca_fingerprint(&agent.ca_pem()).unwrap_or_default()
        );
        let mut rx = shutdown_rx.clone();
        tcp_api = Some(tokio::spawn(homeport::api::serve_tls(
            agent.clone(),
            tcp,
            tls,
            token.into(),
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        )));
        tracing::info!(%addr, "API served over TLS");
    }
    // Bound last: a client that reaches the socket finds everything in place (the owner's
    // token made, the TLS API listening).
    let listener = bind(&socket)?;
    tracing::info!(socket = %socket.display(), "homeportd ready");
    if let Some(a) = &appliance {
        println!("{}", a.ready_line());
    }
    agent.warm_up();
    let shutdown = async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        let _ = shutdown_tx.send(true);
    };
    homeport::api::serve(agent.clone(), listener, shutdown).await;
    if let Some(t) = tcp_api {
        let _ = t.await;
    }
    let _ = std::fs::remove_file(&socket);
    if appliance.is_some() {
        // On the appliance only homeport-init stops the agent, and only to power off or
        // reboot: whatever still runs afterwards is killed, so the apps and the database
        // are stopped cleanly first.
        agent.stop_all().await;
        tracing::info!("homeportd stopped with every app");
    } else {
        // Apps keep running; the next agent re-adopts them.
        agent.detach();
        tracing::info!("homeportd stopped; apps keep running");
    }
    Ok(())
}

fn bind(socket: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(socket);
    // Bind with a restrictive umask so the socket is never briefly open to others.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = tokio::net::UnixListener::bind(socket);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener.with_context(|| format!("listen on {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", socket.display()))?;
    Ok(listener)
}
