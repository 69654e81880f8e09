//! Shared by the integration tests: a real registry with images, a real agent, helpers.
#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use homeport::api::client::Client;
use homeport::api::types::{AppDetail, AppSummary, RunState};
use homeport_testkit::{AgentOpts, AgentProcess, BusyboxOpts, Registry};

pub const HOMEPORTD: &str = env!("CARGO_BIN_EXE_homeportd");
pub const HOMEPORT: &str = env!("CARGO_BIN_EXE_homeport");

/// Options for an agent that may pull from `registry` (host:port) over plain HTTP.
pub fn opts_for(registry: &str) -> AgentOpts {
    AgentOpts {
        insecure_registries: vec![registry.to_string()],
        ..Default::default()
    }
}

/// Starts the `homeportd` under test.
pub fn start_agent(opts: AgentOpts) -> Result<AgentProcess> {
    AgentProcess::start(Path::new(HOMEPORTD), opts)
}

pub struct World {
    pub registry: Registry,
    pub agent: AgentProcess,
}

/// The page the test busybox image serves.
pub fn marker(tag: &str) -> String {
    format!("hello from homeport test image {tag}")
}

impl World {
    /// A registry holding `hello:1` (busybox httpd serving `marker("1")`) and an agent that
    /// may pull from it over plain HTTP.
    pub fn new() -> Result<World> {
        let registry = Registry::start()?;
        push_hello(&registry, "hello", "1")?;
        let agent = start_agent(opts_for(&registry.host()))?;
        Ok(World { registry, agent })
    }

    pub fn client(&self) -> Client {
        self.agent.client()
    }

    pub fn image(&self, name_tag: &str) -> String {
        format!("{}/{name_tag}", self.registry.host())
    }

    /// A manifest for `name` running `image` (name:tag in the test registry), plus `extra` TOML.
    pub fn manifest(&self, name: &str, image: &str, extra: &str) -> String {
        format!(
            "name = \"{name}\"\nimage = \"{}\"\n{extra}",
            self.image(image)
        )
    }
}

pub fn push_hello(reg: &Registry, name: &str, tag: &str) -> Result<String> {
    push_page(reg, name, tag, &marker(tag))
}

/// Pushes the busybox web server image serving `page` as `name:tag`.
pub fn push_page(reg: &Registry, name: &str, tag: &str, page: &str) -> Result<String> {
    let opts = BusyboxOpts {
        index_html: page.to_string(),
        ..Default::default()
    };
    homeport_testkit::push_busybox(reg, name, tag, &opts)
}

pub async fn inspect(c: &Client, app: &str) -> Result<AppDetail> {
    Ok(c.get(&format!("/v1/apps/{app}")).await?)
}

pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let start = Instant::now();
    loop {
        if f().await? {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the app runs; returns its pid.
pub async fn wait_running(c: &Client, app: &str) -> Result<i32> {
    let start = Instant::now();
    loop {
        let d = inspect(c, app).await?;
        if let RunState::Running { pid, .. } = d.summary.run {
            return Ok(pid);
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!(
                "timed out waiting for {app} to run: {:?}, events {:?}",
                d.summary.run,
                d.events
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn summary(c: &Client, app: &str) -> Result<AppSummary> {
    Ok(inspect(c, app).await?.summary)
}

/// Runs a command in the app; returns (exit code, stdout + stderr).
pub async fn exec(c: &Client, app: &str, args: &[&str]) -> Result<(i32, String)> {
    exec_with_stdin(c, app, args, b"", false).await
}

/// Runs a command (or, with `debug`, the debug shell) with `stdin` as its input.
pub async fn exec_with_stdin(
    c: &Client,
    app: &str,
    args: &[&str],
    stdin: &[u8],
    debug: bool,
) -> Result<(i32, String)> {
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("in");
    std::fs::write(&input, stdin)?;
    let input = std::fs::File::open(&input)?;
    let out_path = dir.path().join("out");
    let out = std::fs::File::create(&out_path)?;
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let code = c
        .exec(
            app,
            &args,
            [input.as_raw_fd(), out.as_raw_fd(), out.as_raw_fd()],
            debug,
        )
        .await?;
    Ok((code, std::fs::read_to_string(&out_path)?))
}

/// Mount points below `dir`.
pub fn mounts_below(dir: &Path) -> Vec<String> {
    let root = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&root))
        .map(str::to_string)
        .collect()
}

/// cgroup directories of an app (one per v1 controller, or the v2 one) that exist.
pub fn cgroup_dirs(agent: &AgentProcess, app: &str) -> Vec<PathBuf> {
    homeport_testkit::cgroup_controllers_for(agent.cgroup_parent(), app)
        .into_iter()
        .filter(|p| p.exists())
        .collect()
}

/// Whether a process exists and is not a zombie (an orphaned app that was killed stays a
/// zombie until the host's init reaps it).
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Entries of a directory (names), empty if it does not exist.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

pub fn context<T>(r: Result<T>, agent: &AgentProcess) -> Result<T> {
    r.with_context(|| format!("agent log:\n{}", agent.log()))
}
