//! JSON bodies of the HTTP API, shared by the agent, the CLI and the tests.

use serde::{Deserialize, Serialize};

pub use crate::images::{Progress, PruneReport};
pub use crate::manifest::Problem;
pub use crate::store::{Desired, Event, HistoryEntry};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ManifestBody {
    /// The manifest's TOML text.
    pub manifest: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpdateBody {
    /// A new manifest (same app name); without one the image's tag is resolved afresh.
    #[serde(default)]
    pub manifest: Option<String>,
}

/// What the app's `[health]` check last said.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// No check has passed yet since the app started.
    Starting,
    Healthy,
    Unhealthy,
}

/// What an app is doing right now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RunState {
    Stopped,
    Starting,
    Running {
        pid: i32,
        since: i64,
    },
    /// Crashed (or failed to start) and waiting to be restarted.
    Restarting {
        at: i64,
        reason: String,
    },
}

impl RunState {
    pub fn label(&self) -> &'static str {
        match self {
            RunState::Stopped => "stopped",
            RunState::Starting => "starting",
            RunState::Running { .. } => "running",
            RunState::Restarting { .. } => "restarting",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AppSummary {
    pub name: String,
    /// `reference@digest` the app is pinned to.
    pub image: String,
    /// The app's own IPv6 address (the same across restarts, updates and reinstalls).
    pub address: String,
    /// The app's address in the device's internal IPv4 net (NATed; kept while installed).
    pub ipv4: String,
    /// Where the device's proxy serves the app (apps with `[https]`).
    pub url: Option<String>,
    pub desired: Desired,
    pub run: RunState,
    /// Restarts after crashes since the agent started.
    pub restarts: u32,
    /// What its `[health]` check says while it runs (`None`: it has none, or does not run).
    #[serde(default)]
    pub health: Option<HealthState>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VolumeInfo {
    pub name: String,
    pub path: String,
    pub host_path: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AppDetail {
    #[serde(flatten)]
    pub summary: AppSummary,
    pub manifest: String,
    pub image_digest: String,
    pub image_bytes: u64,
    pub command: Vec<String>,
    pub volumes: Vec<VolumeInfo>,
    /// Its database on the shared server (`[database]`).
    #[serde(default)]
    pub database: Option<DatabaseInfo>,
    /// Its cache (`[cache]`).
    #[serde(default)]
    pub cache: Option<CacheInfo>,
    pub rootfs: String,
    pub log_file: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DatabaseInfo {
    pub name: String,
    pub user: String,
    /// Where the app reaches it (`host:port`).
    pub address: String,
    /// On disk; `None` while the server does not answer.
    pub bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CacheInfo {
    /// Inside the app.
    pub address: String,
    pub max_memory: u64,
    /// Memory of its own (private), while it runs.
    pub memory_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageInfo {
    pub references: Vec<String>,
    pub digest: String,
    pub layers: usize,
    /// Unpacked size of all its layers.
    pub bytes: u64,
    /// Of `bytes`, what other images share.
    pub shared_bytes: u64,
    pub apps: Vec<String>,
    pub created_at: i64,
}

/// One line of the NDJSON stream `POST /v1/apps` answers with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum InstallLine {
    Progress(Progress),
    Done(AppSummary),
    Error(ApiError),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// Manifest problems, when the manifest was the cause.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ValidateReply {
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentInfo {
    pub version: String,
    pub pid: u32,
    pub zygote_pid: u32,
    pub data_dir: String,
    /// The /64 apps get their addresses from, and the bridge that holds its gateway.
    pub apps_prefix: String,
    pub bridge: String,
    /// The internal IPv4 net apps get addresses from (NATed to the outside).
    pub apps_net4: String,
    /// The nftables table (family `inet`) holding the device's firewall.
    pub firewall_table: String,
    /// The device's name, in every app's hostname (`<app>-<device>.local`).
    pub device_name: String,
    /// Where the reverse proxy listens (plain HTTP, which redirects, and HTTPS).
    pub proxy_http: Option<String>,
    pub proxy_https: Option<String>,
}

/// The owner's settings for one registry (`PUT /v1/registries/{host}`), kept in the store.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegistrySettings {
    /// Reach it over plain HTTP instead of HTTPS (a registry on the LAN without TLS).
    #[serde(default)]
    pub insecure: bool,
}

/// A registry the agent has settings for (`GET /v1/registries`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegistryInfo {
    /// `host[:port]` as in image references.
    pub host: String,
    /// Spoken to over plain HTTP.
    pub insecure: bool,
    /// Credentials are configured for it (`registries.json`, `--registry-auth`).
    pub credentials: bool,
    /// The owner's settings (through the API), which `DELETE` removes; `None` when all it
    /// has comes from the agent's command line or `registries.json`.
    pub owner: Option<RegistrySettings>,
}

/// Sent in the `Homeport-Exec` header (hex of this JSON) of an exec/debug upgrade.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub args: Vec<String>,
}

/// Sent by the agent on the upgraded stream when the process ends: `exit <code>\n`.
pub fn exit_line(code: i32) -> String {
    format!("exit {code}\n")
}

/// `POST /v1/os/update`: look for an update now and stage it; with `now`, reboot into it
/// as soon as it is staged instead of in the maintenance window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OsUpdateRequest {
    #[serde(default)]
    pub now: bool,
}
