//! `homeport`: the command line for the Homeport agent.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};

use homeport::api::client::Client;
use homeport::api::types::{
    AppDetail, AppSummary, HistoryEntry, ImageInfo, Progress, PruneReport, RunState, ValidateReply,
};
use homeport::appliance::ShutdownKind;
use homeport::manifest::{compose, Manifest};

#[derive(Parser)]
#[command(
    name = "homeport",
    version,
    about = "Run self-hosted apps on a Homeport device"
)]
struct Cli {
    /// The agent's API socket.
    #[arg(
        long,
        global = true,
        env = "HOMEPORT_SOCKET",
        default_value = "/var/lib/homeport/agent.sock"
    )]
    socket: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install an app from a manifest file and start it.
    Install { file: PathBuf },
    /// List installed apps.
    Ls,
    /// Start an app (it then stays running, also across agent restarts).
    Start { app: String },
    /// Stop an app (it then stays stopped, also across agent restarts).
    Stop { app: String },
    /// Restart an app.
    Restart { app: String },
    /// Move an app to a new image digest: its tag resolved afresh, or a new manifest.
    Update {
        app: String,
        /// A new manifest for the app (same name).
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// Show an app's output.
    Logs {
        app: String,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
        /// Lines to show from the end ("all" by default).
        #[arg(long)]
        tail: Option<usize>,
    },
    /// Run a command inside a running app.
    Exec {
        app: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Open a shell in the filesystem of an app, running or not.
    Debug { app: String },
    /// Everything the agent knows about an app.
    Inspect { app: String },
    /// Every configuration change of an app, oldest first.
    History { app: String },
    /// Remove an app (its volumes are kept unless --purge-data).
    Rm {
        app: String,
        #[arg(long)]
        purge_data: bool,
    },
    /// List images, or remove unused ones.
    Images {
        #[command(subcommand)]
        cmd: Option<ImagesCmd>,
    },
    /// Check a manifest file without installing it.
    Validate { file: PathBuf },
    /// Draft a manifest from a docker-compose file (runs here, needs no agent).
    Import {
        /// The compose file (compose.yml, docker-compose.yml).
        file: PathBuf,
        /// The service that is the app's web server, when the file has several candidates.
        #[arg(long)]
        service: Option<String>,
        /// Write the draft to this file instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Print the device CA's certificate (PEM), for phones and laptops to trust.
    Ca,
    /// Stop every app and power the appliance off.
    Poweroff,
    /// Stop every app and restart the appliance.
    Reboot,
    /// Registry settings: list them, allow plain HTTP for a registry on the LAN.
    Registry {
        #[command(subcommand)]
        cmd: RegistryCmd,
    },
    /// The appliance's OS: its slots, and signed updates.
    Os {
        #[command(subcommand)]
        cmd: OsCmd,
    },
    /// The device's clock: whether it is synchronized, and from which NTP servers.
    Time {
        #[command(subcommand)]
        cmd: Option<TimeCmd>,
    },
}

#[derive(Subcommand)]
enum TimeCmd {
    /// The clock, the server followed and the offset (the default).
    Status,
    /// Use these NTP servers (host names or addresses, optionally :PORT), e.g. the
    /// router's; `pool.ntp.org` is the default.
    Servers {
        #[arg(required = true)]
        servers: Vec<String>,
    },
}

#[derive(Subcommand)]
enum RegistryCmd {
    /// The registries with settings.
    Ls,
    /// Pull from HOST (host[:port], e.g. nas.local:5000) over plain HTTP: for a registry on
    /// the LAN without TLS. Anyone on the path can then alter what is pulled by tag.
    AllowHttp { host: String },
    /// Forget the settings made for HOST (it is reached over HTTPS again).
    Rm { host: String },
}

#[derive(Subcommand)]
enum OsCmd {
    /// Running slot and version, the other slot, the last check and what comes next.
    Status,
    /// Look for an update now and stage it in the other slot.
    Update {
        /// Reboot into it as soon as it is staged (else: in the maintenance window).
        #[arg(long)]
        now: bool,
    },
    /// Change the update settings (unnamed ones keep their value).
    Config {
        /// The update repository's URL.
        #[arg(long)]
        repository: Option<String>,
        /// Check and reboot into updates on a schedule: on or off.
        #[arg(long)]
        automatic: Option<OnOff>,
        /// Seconds between checks (a random delay of up to --jitter is added).
        #[arg(long)]
        check_every: Option<u64>,
        #[arg(long)]
        jitter: Option<u64>,
        /// When a staged update may reboot the device: HH:MM-HH:MM, UTC.
        #[arg(long)]
        window: Option<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Subcommand)]
enum ImagesCmd {
    /// Remove images no app uses.
    Prune,
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("homeport: {e}");
            std::process::exit(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("homeport: {e:#}");
            std::process::exit(1);
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<i32> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(0)
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let c = Client::new(&cli.socket);
    let json = cli.json;
    match cli.cmd {
        Cmd::Import {
            file,
            service,
            output,
        } => import(&file, service.as_deref(), output.as_deref(), json),
        Cmd::Validate { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("read {}", file.display()))?;
            let problems = match Manifest::parse(&text) {
                Ok(_) => Vec::new(),
                Err(e) => e.problems,
            };
            if json {
                print_json(&ValidateReply {
                    problems: problems.clone(),
                })?;
            } else if problems.is_empty() {
                println!("{}: ok", file.display());
            } else {
                for p in &problems {
                    eprintln!("{}:{p}", file.display());
                }
            }
            Ok(if problems.is_empty() { 0 } else { 1 })
        }
        Cmd::Install { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("read {}", file.display()))?;
            let mut bar = ProgressBar::new(!json);
            let s = c.install(&text, |p| bar.update(p)).await;
            bar.finish();
            let s = s?;
            if json {
                return print_json(&s);
            }
            println!("installed {} ({}): {}", s.name, s.image, s.run.label());
            Ok(0)
        }
        Cmd::Ls => {
            let apps: Vec<AppSummary> = c.get("/v1/apps").await?;
            if json {
                return print_json(&apps);
            }
            let rows: Vec<Vec<String>> = apps
                .iter()
                .map(|a| {
                    vec![
                        a.name.clone(),
                        a.address.clone(),
                        state_text(&a.run),
                        a.restarts.to_string(),
                        a.image.clone(),
                    ]
                })
                .collect();
            table(&["NAME", "ADDRESS", "STATE", "RESTARTS", "IMAGE"], &rows);
            Ok(0)
        }
        Cmd::Start { app } => lifecycle(&c, &app, "start", json).await,
        Cmd::Stop { app } => lifecycle(&c, &app, "stop", json).await,
        Cmd::Restart { app } => lifecycle(&c, &app, "restart", json).await,
        Cmd::Update { app, manifest } => {
            let text = match &manifest {
                Some(f) => Some(
                    std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?,
                ),
                None => None,
            };
            let before: AppSummary = c.get(&format!("/v1/apps/{app}")).await?;
            let mut bar = ProgressBar::new(!json);
            let s = c.update(&app, text.as_deref(), |p| bar.update(p)).await;
            bar.finish();
            let s = s?;
            if json {
                return print_json(&s);
            }
            if s.image == before.image && text.is_none() {
                println!("{app} is up to date ({})", s.image);
            } else {
                println!(
                    "updated {app}: {} -> {} ({})",
                    before.image,
                    s.image,
                    s.run.label()
                );
            }
            Ok(0)
        }
        Cmd::Logs { app, follow, tail } => {
            let mut out = std::io::stdout();
            c.logs(&app, tail, follow, |b| {
                let _ = out.write_all(b);
                let _ = out.flush();
            })
            .await?;
            Ok(0)
        }
        Cmd::Exec { app, command } => Ok(c.exec(&app, &command, [0, 1, 2], false).await?),
        Cmd::Debug { app } => Ok(c.exec(&app, &[], [0, 1, 2], true).await?),
        Cmd::Inspect { app } => {
            let d: AppDetail = c.get(&format!("/v1/apps/{app}")).await?;
            if json {
                return print_json(&d);
            }
            print_detail(&d);
            Ok(0)
        }
        Cmd::History { app } => {
            let h: Vec<HistoryEntry> = c.get(&format!("/v1/apps/{app}/history")).await?;
            if json {
                return print_json(&h);
            }
            let rows: Vec<Vec<String>> = h
                .iter()
                .map(|e| {
                    vec![
                        time(e.at),
                        e.actor.clone(),
                        e.action.clone(),
                        e.detail.clone(),
                    ]
                })
                .collect();
            table(&["WHEN (UTC)", "WHO", "WHAT", "DETAIL"], &rows);
            Ok(0)
        }
        Cmd::Rm { app, purge_data } => {
            c.delete(&format!("/v1/apps/{app}?purge_data={purge_data}"))
                .await?;
            if !json {
                println!(
                    "removed {app}{}",
                    if purge_data {
                        " and its data"
                    } else {
                        " (volumes kept; --purge-data deletes them)"
                    }
                );
            }
            Ok(0)
        }
        Cmd::Images {
            cmd: Some(ImagesCmd::Prune),
        } => {
            let r: PruneReport = c.post("/v1/images/prune", &()).await?;
            if json {
                return print_json(&r);
            }
            for i in &r.images {
                println!("removed {i}");
            }
            println!(
                "{} images, {} layers, {} freed",
                r.images.len(),
                r.layers,
                size(r.bytes)
            );
            Ok(0)
        }
        Cmd::Ca => {
            print!("{}", c.text("/v1/ca.crt").await?);
            Ok(0)
        }
        Cmd::Os { cmd } => os(&c, cmd, json).await,
        Cmd::Time { cmd } => clock(&c, cmd.unwrap_or(TimeCmd::Status), json).await,
        Cmd::Poweroff => shutdown(&c, ShutdownKind::Poweroff, json).await,
        Cmd::Reboot => shutdown(&c, ShutdownKind::Reboot, json).await,
        Cmd::Registry { cmd } => registry(&c, cmd, json).await,
        Cmd::Images { cmd: None } => {
            let images: Vec<ImageInfo> = c.get("/v1/images").await?;
            if json {
                return print_json(&images);
            }
            let rows: Vec<Vec<String>> = images
                .iter()
                .map(|i| {
                    vec![
                        i.references.join(", "),
                        i.digest.chars().take(19).collect(),
                        size(i.bytes),
                        size(i.shared_bytes),
                        if i.apps.is_empty() {
                            "(unused)".into()
                        } else {
                            i.apps.join(", ")
                        },
                    ]
                })
                .collect();
            table(&["IMAGE", "DIGEST", "SIZE", "SHARED", "APPS"], &rows);
            Ok(0)
        }
    }
}

/// `homeport import`: the draft on stdout (or `-o FILE`), warnings and notes on stderr.
fn import(
    file: &std::path::Path,
    service: Option<&str>,
    output: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    let draft = compose::import(&text, service).with_context(|| file.display().to_string())?;
    for w in &draft.warnings {
        eprintln!("warning: {w}");
    }
    for n in &draft.notes {
        eprintln!("note: {n}");
    }
    match output {
        Some(out) => {
            std::fs::write(out, &draft.toml).with_context(|| format!("write {}", out.display()))?;
            let n = draft.warnings.len();
            eprintln!(
                "wrote {} ({n} warning{}): check it with `homeport validate {}`",
                out.display(),
                if n == 1 { "" } else { "s" },
                out.display()
            );
        }
        None if json => {
            print_json(&draft)?;
        }
        None => print!("{}", draft.toml),
    }
    Ok(0)
}

async fn os(c: &Client, cmd: OsCmd, json: bool) -> anyhow::Result<i32> {
    use homeport::os::{OsConfig, OsStatus};
    let st: OsStatus = match cmd {
        OsCmd::Status => c.get("/v1/os").await?,
        OsCmd::Update { now } => {
            let st: OsStatus = c
                .post(
                    "/v1/os/update",
                    &homeport::api::types::OsUpdateRequest { now },
                )
                .await?;
            if !json {
                println!(
                    "looking for an update{}; `homeport os status` shows how it goes",
                    if now {
                        ", rebooting into it when staged"
                    } else {
                        ""
                    }
                );
            }
            st
        }
        OsCmd::Config {
            repository,
            automatic,
            check_every,
            jitter,
            window,
        } => {
            let st: OsStatus = c.get("/v1/os").await?;
            let mut cfg: OsConfig = st.config;
            if let Some(r) = repository {
                cfg.repository = (!r.is_empty()).then_some(r);
            }
            if let Some(a) = automatic {
                cfg.automatic = matches!(a, OnOff::On);
            }
            cfg.check_every_secs = check_every.unwrap_or(cfg.check_every_secs);
            cfg.jitter_secs = jitter.unwrap_or(cfg.jitter_secs);
            cfg.window = window.unwrap_or(cfg.window);
            c.put("/v1/os/config", &cfg).await?
        }
    };
    if json {
        return print_json(&st);
    }
    if !st.appliance {
        println!("not an appliance: the OS is not Homeport's, so it is not updated by Homeport");
        return Ok(0);
    }
    let opt = |o: Option<String>| o.unwrap_or_else(|| "-".into());
    println!(
        "running:     slot {} version {}{}",
        opt(st.slot.map(|s| s.to_string())),
        opt(st.version.clone()),
        if st.on_trial {
            " (on trial: health check)"
        } else {
            ""
        }
    );
    if let Some(o) = &st.other {
        println!(
            "other slot:  {} {} ({})",
            o.slot,
            opt(o.version.clone()),
            o.state
        );
    }
    println!("activity:    {}", st.activity);
    if let Some(p) = &st.pending {
        println!("staged:      {} in slot {}", p.version, p.slot);
    }
    match &st.last_check {
        Some(l) => println!(
            "last result: {} at {}: {}",
            if l.ok { "ok" } else { "FAILED" },
            time(l.at),
            l.message
        ),
        None => println!("last result: never checked"),
    }
    if let Some(t) = st.next_check {
        println!("next check:  {}", time(t));
    }
    if let Some(t) = st.next_window {
        println!("reboot at:   {} (window {} UTC)", time(t), st.config.window);
    }
    println!(
        "repository:  {}{}",
        opt(st.config.repository.clone()),
        if st.config.automatic {
            ""
        } else {
            " (automatic updates off)"
        }
    );
    for r in &st.refused {
        println!("refused:     {} ({}): {}", r.version, time(r.at), r.reason);
    }
    Ok(0)
}

async fn clock(c: &Client, cmd: TimeCmd, json: bool) -> anyhow::Result<i32> {
    use homeport::clock::{NtpServer, TimeSettings, TimeStatus};
    let st: TimeStatus = match cmd {
        TimeCmd::Status => c.get("/v1/system/time").await?,
        TimeCmd::Servers { servers } => {
            let servers = servers
                .iter()
                .map(|s| s.parse::<NtpServer>())
                .collect::<Result<Vec<_>, _>>()?;
            c.put("/v1/system/time", &TimeSettings { servers }).await?
        }
    };
    if json {
        return print_json(&st);
    }
    println!("time:         {}", st.now);
    let state = match (&st.source, st.offset_seconds) {
        (Some(src), Some(off)) if st.synchronized => {
            format!(
                "yes, to {src} (stratum {}, off by {off:+.6} s)",
                st.stratum.unwrap_or(0)
            )
        }
        _ if st.synchronized => "yes".to_string(),
        _ => "no".to_string(),
    };
    println!("synchronized: {state}");
    if !st.servers.is_empty() {
        let names: Vec<String> = st.servers.iter().map(|s| s.to_string()).collect();
        println!("servers:      {}", names.join(" "));
    }
    if let Some(p) = &st.problem {
        println!("note:         {p}");
    }
    Ok(0)
}

async fn registry(c: &Client, cmd: RegistryCmd, json: bool) -> anyhow::Result<i32> {
    match cmd {
        RegistryCmd::Ls => {
            let all = c.registries().await?;
            if json {
                return print_json(&all);
            }
            let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
            let rows: Vec<Vec<String>> = all
                .iter()
                .map(|r| {
                    vec![
                        r.host.clone(),
                        yes(r.insecure),
                        yes(r.credentials),
                        if r.owner.is_some() {
                            "owner"
                        } else {
                            "agent's configuration"
                        }
                        .to_string(),
                    ]
                })
                .collect();
            table(&["REGISTRY", "PLAIN HTTP", "CREDENTIALS", "SET BY"], &rows);
        }
        RegistryCmd::AllowHttp { host } => {
            let settings = homeport::api::types::RegistrySettings { insecure: true };
            let r = c.set_registry(&host, &settings).await?;
            if json {
                return print_json(&r);
            }
            println!("{}: pulled over plain HTTP from now on", r.host);
        }
        RegistryCmd::Rm { host } => {
            c.remove_registry(&host).await?;
            if !json {
                println!("{host}: settings removed");
            }
        }
    }
    Ok(0)
}

async fn shutdown(c: &Client, kind: ShutdownKind, json: bool) -> anyhow::Result<i32> {
    c.shutdown(kind).await?;
    if json {
        return print_json(&serde_json::json!({ "accepted": kind.name() }));
    }
    println!(
        "{}: the apps are being stopped",
        match kind {
            ShutdownKind::Poweroff => "powering off",
            ShutdownKind::Reboot => "rebooting",
        }
    );
    Ok(0)
}

async fn lifecycle(c: &Client, app: &str, verb: &str, json: bool) -> anyhow::Result<i32> {
    let s: AppSummary = c.post(&format!("/v1/apps/{app}/{verb}"), &()).await?;
    if json {
        return print_json(&s);
    }
    println!("{}: {}", s.name, state_text(&s.run));
    Ok(0)
}

fn state_text(r: &RunState) -> String {
    match r {
        RunState::Running { pid, since } => format!("running (pid {pid}, since {})", time(*since)),
        RunState::Restarting { reason, .. } => format!("restarting ({reason})"),
        other => other.label().to_string(),
    }
}

fn print_detail(d: &AppDetail) {
    let s = &d.summary;
    println!("name:      {}", s.name);
    println!(
        "state:     {} (desired: {:?}, restarts: {})",
        state_text(&s.run),
        s.desired,
        s.restarts
    );
    if let Some(h) = s.health {
        println!("health:    {h:?}");
    }
    println!("address:   {} {}", s.address, s.ipv4);
    if let Some(u) = &s.url {
        println!("url:       {u}");
    }
    println!("image:     {}", s.image);
    println!("size:      {}", size(d.image_bytes));
    println!("command:   {}", d.command.join(" "));
    println!("rootfs:    {}", d.rootfs);
    println!("logs:      {}", d.log_file);
    println!(
        "installed: {}   changed: {}",
        time(d.created_at),
        time(d.updated_at)
    );
    if !d.volumes.is_empty() {
        println!("volumes:");
        for v in &d.volumes {
            println!(
                "  {} -> {} ({}, {})",
                v.name,
                v.path,
                v.host_path,
                size(v.bytes)
            );
        }
    }
    if let Some(db) = &d.database {
        println!(
            "database:  {} (user {}) at {}, {}",
            db.name,
            db.user,
            db.address,
            db.bytes.map_or_else(|| "size unknown".to_string(), size)
        );
    }
    if let Some(c) = &d.cache {
        println!(
            "cache:     {} inside the app, up to {}{}",
            c.address,
            size(c.max_memory),
            c.memory_bytes
                .map(|m| format!(", using {}", size(m)))
                .unwrap_or_default()
        );
    }
    println!("manifest:");
    for l in d.manifest.lines() {
        println!("  {l}");
    }
    if !d.events.is_empty() {
        println!("recent events:");
        for e in &d.events {
            println!("  {}  {:<6} {}", time(e.at), e.kind, e.message);
        }
    }
}

fn table(head: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(head.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn size(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS` (UTC).
fn time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Pull progress: one line rewritten in place on a terminal (layers done, bytes, rate); a line
/// per finished layer otherwise.
struct ProgressBar {
    enabled: bool,
    tty: bool,
    layers: usize,
    total: u64,
    done: std::collections::HashMap<String, u64>,
    finished: usize,
    start: Instant,
    printed: bool,
}

impl ProgressBar {
    fn new(enabled: bool) -> Self {
        use std::io::IsTerminal;
        ProgressBar {
            enabled,
            tty: std::io::stderr().is_terminal(),
            layers: 0,
            total: 0,
            done: Default::default(),
            finished: 0,
            start: Instant::now(),
            printed: false,
        }
    }

    fn update(&mut self, p: &Progress) {
        match p {
            Progress::Resolved {
                reference,
                digest,
                layers,
                bytes,
            } => {
                self.layers = *layers;
                self.total = *bytes;
                if self.enabled {
                    eprintln!("pulling {reference} ({digest})");
                }
                return;
            }
            Progress::Layer { digest, done, .. } => {
                self.done.insert(digest.clone(), *done);
            }
            Progress::LayerDone { digest, bytes, .. } => {
                self.finished += 1;
                self.done.insert(digest.clone(), *bytes);
            }
        }
        if !self.enabled || (!self.tty && !matches!(p, Progress::LayerDone { .. })) {
            return;
        }
        let bytes: u64 = self.done.values().sum();
        let rate = bytes as f64 / self.start.elapsed().as_secs_f64().max(0.001);
        let line = format!(
            "  layers {}/{}  {} / {}  {}/s",
            self.finished,
            self.layers,
            size(bytes),
            size(self.total),
            size(rate as u64)
        );
        if self.tty {
            eprint!("\r{line}   ");
            self.printed = true;
        } else {
            eprintln!("{line}");
        }
    }

    fn finish(&self) {
        if self.printed {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_sizes() {
        assert_eq!(time(0), "1970-01-01 00:00:00");
        assert_eq!(time(1_782_000_000_000), "2026-06-21 00:00:00");
        assert_eq!(size(512), "512 B");
        assert_eq!(size(1536), "1.5 KiB");
    }
}
