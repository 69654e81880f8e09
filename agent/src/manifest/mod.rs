//! The app manifest: what an app asks for, parsed and validated.
//!
//! Invariant: this module does no I/O. It turns TOML text into a [`Manifest`] or a list of
//! [`Problem`]s, each with line, column, key and what is allowed.
//!
//! Sections are separate structs so later capabilities (`[https]`, `[database]`, `[cache]`,
//! `[[port]]`, `[health]`, `[[hook]]`) slot in beside `[env]`, `[[volume]]` and `[resources]`.

pub mod compose;
mod name;
pub mod template;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::images::reference::ImageRef;
pub use name::{AppName, NameError};

/// A validated app manifest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Manifest {
    pub name: AppName,
    pub image: ImageRef,
    /// Replaces the image's `Cmd` (the image's `Entrypoint` is kept, as Docker does).
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub volumes: Vec<Volume>,
    pub resources: Resources,
    /// The port the app serves HTTP on: the device's reverse proxy reaches it there.
    pub https: Option<Https>,
    /// Raw ports besides HTTP (`[[port]]`).
    pub ports: Vec<Port>,
    /// A database of its own on the device's shared PostgreSQL server.
    pub database: Option<Database>,
    /// A Redis-compatible cache of its own.
    pub cache: Option<Cache>,
    pub health: Option<Health>,
    pub hooks: Vec<Hook>,
    /// Further processes of the app (`[[container]]`): they share its address, volumes,
    /// services and lifecycle.
    pub containers: Vec<Container>,
}

/// `[database]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Database {
    pub variant: DbVariant,
    pub permissions: DbPermissions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DbVariant {
    /// Any SQL database will do: the device provides PostgreSQL.
    Sql,
    Postgres,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DbPermissions {
    /// The app's role owns its database: it creates and alters its own tables.
    Full,
}

/// `[cache]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cache {
    /// The most the cache holds before it evicts the least recently used keys.
    pub memory_bytes: u64,
}

/// The cache's size unless the manifest says otherwise.
pub const DEFAULT_CACHE_MEMORY: u64 = 64 << 20;

/// `[health]`: how the agent tells that a running app works.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub check: HealthCheck,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive failures after which the app is restarted.
    pub retries: u32,
    /// Failures in this time after a start do not count.
    pub start_period: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheck {
    /// GET on the `[https]` port; healthy on 2xx and 3xx.
    Http { path: String },
    /// Run in the app's main container; healthy on exit status 0.
    Command { args: Vec<String> },
}

/// `[[hook]]`: a command run to completion in a container of the app's at a lifecycle step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hook {
    pub when: HookWhen,
    pub command: Vec<String>,
    /// Whose image and settings the hook runs with (`None`: the app's main container).
    pub container: Option<String>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookWhen {
    /// Once, when the app is installed: after its services exist, before its first start.
    Install,
    /// When an update moves the app to a new image or manifest, before the new version starts.
    Upgrade,
    /// Before every start of the app.
    Start,
}

impl HookWhen {
    pub fn as_str(self) -> &'static str {
        match self {
            HookWhen::Install => "install",
            HookWhen::Upgrade => "upgrade",
            HookWhen::Start => "start",
        }
    }
}

/// `[[container]]`: one more process of the app.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Container {
    pub name: String,
    /// `None`: the app's image.
    pub image: Option<ImageRef>,
    pub command: Option<Vec<String>>,
    /// Over the app's `[env]`.
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Https {
    pub port: u16,
    /// The largest request body the proxy passes to the app; `None`: no limit.
    pub body_limit: Option<u64>,
    /// Paths the proxy serves itself from the image's files (the app need not run).
    #[serde(default)]
    pub static_paths: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who reaches a raw port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// LAN clients, on the device's own addresses (IPv4 and IPv6) and the same port number.
    Public,
    /// Only the device itself (its proxy, health checks).
    Internal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Port {
    pub port: u16,
    pub protocol: Protocol,
    pub access: Access,
}

impl Manifest {
    /// The raw ports LAN clients reach on the device's addresses.
    pub fn public_ports(&self) -> impl Iterator<Item = (Protocol, u16)> + '_ {
        self.ports
            .iter()
            .filter(|p| p.access == Access::Public)
            .map(|p| (p.protocol, p.port))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    pub path: String,
}

/// cgroup limits; every app gets them, defaults apply where the manifest is silent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    pub memory_bytes: u64,
    /// CPU quota in cores (1.5 = one and a half cores).
    pub cpus: f64,
    pub pids: u32,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            memory_bytes: 512 << 20,
            cpus: 1.0,
            pids: 512,
        }
    }
}

/// One thing wrong with a manifest, located in the source text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}:{}: {}", self.line, self.column, self.message)
        } else {
            write!(
                f,
                "{}:{}: {}: {}",
                self.line, self.column, self.key, self.message
            )
        }
    }
}

/// All problems found in one manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid manifest")?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

// The raw shape of the file. Every field is `Spanned` so a semantic problem can point at it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: Option<Spanned<String>>,
    image: Option<Spanned<String>>,
    command: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, Spanned<String>>,
    #[serde(default)]
    volume: Vec<Spanned<RawVolume>>,
    resources: Option<Spanned<RawResources>>,
    https: Option<Spanned<RawHttps>>,
    #[serde(default)]
    port: Vec<Spanned<RawPort>>,
    database: Option<Spanned<RawDatabase>>,
    cache: Option<Spanned<RawCache>>,
    health: Option<Spanned<RawHealth>>,
    #[serde(default)]
    hook: Vec<Spanned<RawHook>>,
    #[serde(default)]
    container: Vec<Spanned<RawContainer>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    variant: Option<Spanned<String>>,
    permissions: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    variant: Option<Spanned<String>>,
    memory: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    path: Option<Spanned<String>>,
    command: Option<Spanned<Vec<String>>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    retries: Option<Spanned<i64>>,
    start_period: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    when: Spanned<String>,
    command: Spanned<Vec<String>>,
    container: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawContainer {
    name: Spanned<String>,
    image: Option<Spanned<String>>,
    command: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttps {
    port: Spanned<i64>,
    body_limit: Option<Spanned<String>>,
    #[serde(rename = "static", default)]
    static_paths: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    port: Spanned<i64>,
    protocol: Option<Spanned<String>>,
    access: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    name: Spanned<String>,
    path: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResources {
    memory: Option<Spanned<String>>,
    cpus: Option<Spanned<f64>>,
    pids: Option<Spanned<i64>>,
}

/// Keys a manifest may have at the top level; named in the message for an unknown key.
const TOP_LEVEL_KEYS: &str =
    "name, image, command, env, volume, resources, https, port, database, cache, health, hook, container";

impl Manifest {
    /// Parses and validates manifest text. Reports every semantic problem it finds.
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let raw: Raw = toml::from_str(text).map_err(|e| ManifestError {
            problems: vec![syntax_problem(text, &e)],
        })?;
        let mut p = Problems {
            text,
            list: Vec::new(),
        };

        let name = match &raw.name {
            None => {
                p.push(0..0, "name", "missing: every app needs a name".into());
                None
            }
            Some(n) => match AppName::try_from(n.get_ref().as_str()) {
                Ok(name) => Some(name),
                Err(e) => {
                    p.push(n.span(), "name", e.to_string());
                    None
                }
            },
        };
        let image = match &raw.image {
            None => {
                p.push(0..0, "image", "missing: name the OCI image to run".into());
                None
            }
            Some(i) => match i.get_ref().parse::<ImageRef>() {
                Ok(r) => Some(r),
                Err(e) => {
                    p.push(i.span(), "image", e.to_string());
                    None
                }
            },
        };
        let command = raw.command.as_ref().map(|c| {
            if c.get_ref().is_empty() {
                p.push(
                    c.span(),
                    "command",
                    "must not be empty (omit it to use the image's)".into(),
                );
            }
            c.get_ref().clone()
        });

        let env = parse_env(&mut p, &raw.env, "env");

        let mut volumes: Vec<Volume> = Vec::new();
        for (i, v) in raw.volume.iter().enumerate() {
            let v = v.get_ref();
            let key = format!("volume[{i}]");
            let vname = v.name.get_ref();
            if !valid_volume_name(vname) {
                p.push(
                    v.name.span(),
                    &format!("{key}.name"),
                    format!("{vname:?} is not a valid volume name: use lower-case letters, digits, - and _ (at most 64)"),
                );
            }
            let path = v.path.get_ref();
            if let Err(why) = check_container_path(path) {
                p.push(v.path.span(), &format!("{key}.path"), why);
            }
            if volumes.iter().any(|o| &o.name == vname) {
                p.push(
                    v.name.span(),
                    &format!("{key}.name"),
                    format!("volume {vname:?} is declared twice"),
                );
            }
            if volumes.iter().any(|o| &o.path == path) {
                p.push(
                    v.path.span(),
                    &format!("{key}.path"),
                    format!("path {path:?} is used by two volumes"),
                );
            }
            volumes.push(Volume {
                name: vname.clone(),
                path: path.clone(),
            });
        }

        let mut resources = Resources::default();
        if let Some(r) = &raw.resources {
            let r = r.get_ref();
            if let Some(m) = &r.memory {
                match parse_size(m.get_ref()) {
                    Some(b) if b >= 4 << 20 => resources.memory_bytes = b,
                    Some(_) => p.push(m.span(), "resources.memory", "must be at least 4M".into()),
                    None => p.push(
                        m.span(),
                        "resources.memory",
                        format!(
                            "{:?} is not a size: use a number with K, M or G (e.g. \"256M\")",
                            m.get_ref()
                        ),
                    ),
                }
            }
            if let Some(c) = &r.cpus {
                let c_val = *c.get_ref();
                if c_val > 0.0 && c_val <= 1024.0 {
                    resources.cpus = c_val;
                } else {
                    p.push(
                        c.span(),
                        "resources.cpus",
                        "must be a number of cores above 0 (e.g. 0.5 or 2)".into(),
                    );
                }
            }
            if let Some(n) = &r.pids {
                match u32::try_from(*n.get_ref()) {
                    Ok(v) if v >= 8 => resources.pids = v,
                    _ => p.push(
                        n.span(),
                        "resources.pids",
                        "must be a whole number of at least 8".into(),
                    ),
                }
            }
        }

        let https = raw.https.as_ref().and_then(|h| {
            let h = h.get_ref();
            let body_limit = h
                .body_limit
                .as_ref()
                .and_then(|l| match parse_size(l.get_ref()) {
                    Some(b) if b > 0 => Some(b),
                    _ => {
                        p.push(
                            l.span(),
                            "https.body_limit",
                            format!(
                                "{:?} is not a size: use a number with K, M or G (e.g. \"100M\")",
                                l.get_ref()
                            ),
                        );
                        None
                    }
                });
            let mut static_paths: Vec<String> = Vec::new();
            for (i, sp) in h.static_paths.iter().enumerate() {
                let path = sp.get_ref().trim_end_matches('/').to_string();
                let key = format!("https.static[{i}]");
                if path.is_empty() {
                    p.push(
                        sp.span(),
                        &key,
                        "cannot serve the whole image: name a directory or file".into(),
                    );
                } else if let Err(why) = check_container_path(&path) {
                    p.push(sp.span(), &key, why);
                } else if static_paths.contains(&path) {
                    p.push(sp.span(), &key, format!("{path:?} is listed twice"));
                } else {
                    static_paths.push(path);
                }
            }
            port_number(&mut p, &h.port, "https.port").map(|port| Https {
                port,
                body_limit,
                static_paths,
            })
        });
        let ports = parse_ports(&mut p, &raw.port, https.as_ref());
        let database = raw
            .database
            .as_ref()
            .and_then(|d| parse_database(&mut p, d));
        let cache = raw.cache.as_ref().and_then(|c| parse_cache(&mut p, c));
        let health = raw
            .health
            .as_ref()
            .and_then(|h| parse_health(&mut p, h, https.is_some()));
        let containers = parse_containers(&mut p, &raw.container);
        let hooks = parse_hooks(&mut p, &raw.hook, &containers);

        // Templates name only known variables, of sections the manifest has.
        let has = |section: &str| match section {
            "https" => raw.https.is_some(),
            "database" => raw.database.is_some(),
            "cache" => raw.cache.is_some(),
            _ => false,
        };
        let mut texts: Vec<(Range<usize>, String, &str)> = Vec::new();
        for (k, v) in &raw.env {
            texts.push((v.span(), format!("env.{}", k.get_ref()), v.get_ref()));
        }
        if let Some(c) = &raw.command {
            for a in c.get_ref() {
                texts.push((c.span(), "command".into(), a));
            }
        }
        for (i, c) in raw.container.iter().enumerate() {
            let c = c.get_ref();
            for (k, v) in &c.env {
                texts.push((
                    v.span(),
                    format!("container[{i}].env.{}", k.get_ref()),
                    v.get_ref(),
                ));
            }
            if let Some(cmd) = &c.command {
                for a in cmd.get_ref() {
                    texts.push((cmd.span(), format!("container[{i}].command"), a));
                }
            }
        }
        for (i, h) in raw.hook.iter().enumerate() {
            let h = h.get_ref();
            for a in h.command.get_ref() {
                texts.push((h.command.span(), format!("hook[{i}].command"), a));
            }
        }
        for (span, key, text) in texts {
            for u in template::uses(text) {
                if let Some(why) = template::check(&u.variable, has) {
                    p.push(span.clone(), &key, why);
                }
            }
        }

        if !p.list.is_empty() {
            return Err(ManifestError { problems: p.list });
        }
        match (name, image) {
            (Some(name), Some(image)) => Ok(Manifest {
                name,
                image,
                command,
                env,
                volumes,
                resources,
                https,
                ports,
                database,
                cache,
                health,
                hooks,
                containers,
            }),
            _ => Err(ManifestError { problems: p.list }),
        }
    }

    /// Every image the app runs: its own first, then its containers' own images.
    pub fn images(&self) -> Vec<&ImageRef> {
        let mut out = vec![&self.image];
        for c in &self.containers {
            if let Some(i) = &c.image {
                if !out.contains(&i) {
                    out.push(i);
                }
            }
        }
        out
    }

    /// The hooks run at `when`, in manifest order.
    pub fn hooks_for(&self, when: HookWhen) -> impl Iterator<Item = &Hook> {
        self.hooks.iter().filter(move |h| h.when == when)
    }
}

fn parse_env(
    p: &mut Problems,
    raw: &BTreeMap<Spanned<String>, Spanned<String>>,
    prefix: &str,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for (k, v) in raw {
        let key = k.get_ref();
        if !valid_env_name(key) {
            p.push(
                k.span(),
                &format!("{prefix}.{key}"),
                "variable names are letters, digits and _, not starting with a digit".into(),
            );
        }
        if v.get_ref().contains('\0') {
            p.push(
                v.span(),
                &format!("{prefix}.{key}"),
                "value contains a NUL byte".into(),
            );
        }
        env.insert(key.clone(), v.get_ref().clone());
    }
    env
}

fn parse_database(p: &mut Problems, raw: &Spanned<RawDatabase>) -> Option<Database> {
    let d = raw.get_ref();
    let variant = match d.variant.as_ref().map(|v| (v.span(), v.get_ref().as_str())) {
        None | Some((_, "sql")) => Some(DbVariant::Sql),
        Some((_, "postgres" | "postgresql")) => Some(DbVariant::Postgres),
        Some((span, other @ ("mysql" | "mariadb" | "sqlite" | "mongodb"))) => {
            p.push(
                span,
                "database.variant",
                format!("{other:?} is not supported yet: the device provides PostgreSQL; use \"postgres\", or \"sql\" for any SQL database"),
            );
            None
        }
        Some((span, other)) => {
            p.push(
                span,
                "database.variant",
                format!("{other:?} is not a database variant: use \"postgres\" or \"sql\""),
            );
            None
        }
    };
    let permissions = match d
        .permissions
        .as_ref()
        .map(|v| (v.span(), v.get_ref().as_str()))
    {
        None | Some((_, "full")) => Some(DbPermissions::Full),
        Some((span, other @ ("read-only" | "readonly" | "read-write" | "data"))) => {
            p.push(
                span,
                "database.permissions",
                format!("{other:?} is not supported yet: use \"full\" (the app owns its database)"),
            );
            None
        }
        Some((span, other)) => {
            p.push(
                span,
                "database.permissions",
                format!("{other:?} is not a permission: use \"full\" (the app owns its database)"),
            );
            None
        }
    };
    Some(Database {
        variant: variant?,
        permissions: permissions?,
    })
}

fn parse_cache(p: &mut Problems, raw: &Spanned<RawCache>) -> Option<Cache> {
    let c = raw.get_ref();
    let mut ok = true;
    match c.variant.as_ref().map(|v| (v.span(), v.get_ref().as_str())) {
        None | Some((_, "redis" | "valkey")) => {}
        Some((span, "memcached")) => {
            p.push(
                span,
                "cache.variant",
                "\"memcached\" is not supported yet: use \"redis\"".into(),
            );
            ok = false;
        }
        Some((span, other)) => {
            p.push(
                span,
                "cache.variant",
                format!("{other:?} is not a cache variant: use \"redis\""),
            );
            ok = false;
        }
    }
    let mut memory_bytes = DEFAULT_CACHE_MEMORY;
    if let Some(m) = &c.memory {
        match parse_size(m.get_ref()) {
            Some(b) if b >= 1 << 20 => memory_bytes = b,
            _ => {
                p.push(
                    m.span(),
                    "cache.memory",
                    format!(
                        "{:?} is not a size of at least 1M: use a number with K, M or G (e.g. \"64M\")",
                        m.get_ref()
                    ),
                );
                ok = false;
            }
        }
    }
    ok.then_some(Cache { memory_bytes })
}

fn parse_duration_key(
    p: &mut Problems,
    raw: Option<&Spanned<String>>,
    key: &str,
    default: Duration,
) -> Option<Duration> {
    let Some(r) = raw else {
        return Some(default);
    };
    match parse_duration(r.get_ref()) {
        Some(d) if !d.is_zero() => Some(d),
        _ => {
            p.push(
                r.span(),
                key,
                format!(
                    "{:?} is not a duration: use a number with ms, s, m or h (e.g. \"30s\")",
                    r.get_ref()
                ),
            );
            None
        }
    }
}

fn parse_health(p: &mut Problems, raw: &Spanned<RawHealth>, has_https: bool) -> Option<Health> {
    let h = raw.get_ref();
    let check = match (&h.path, &h.command) {
        (Some(path), None) => {
            if !path.get_ref().starts_with('/') {
                p.push(
                    path.span(),
                    "health.path",
                    format!("{:?} must be a URL path starting with /", path.get_ref()),
                );
                None
            } else if !has_https {
                p.push(
                    path.span(),
                    "health.path",
                    "an HTTP check needs an [https] section (or use command)".into(),
                );
                None
            } else {
                Some(HealthCheck::Http {
                    path: path.get_ref().clone(),
                })
            }
        }
        (None, Some(cmd)) if !cmd.get_ref().is_empty() => Some(HealthCheck::Command {
            args: cmd.get_ref().clone(),
        }),
        (None, Some(cmd)) => {
            p.push(cmd.span(), "health.command", "must not be empty".into());
            None
        }
        _ => {
            p.push(
                raw.span(),
                "health",
                "give exactly one of path (an HTTP check) or command".into(),
            );
            None
        }
    };
    let interval = parse_duration_key(
        p,
        h.interval.as_ref(),
        "health.interval",
        Duration::from_secs(30),
    );
    let timeout = parse_duration_key(
        p,
        h.timeout.as_ref(),
        "health.timeout",
        Duration::from_secs(5),
    );
    let start_period = parse_duration_key(
        p,
        h.start_period.as_ref(),
        "health.start_period",
        Duration::from_secs(60),
    );
    let retries = match &h.retries {
        None => Some(3),
        Some(r) => match u32::try_from(*r.get_ref()) {
            Ok(n) if (1..=100).contains(&n) => Some(n),
            _ => {
                p.push(r.span(), "health.retries", "must be 1 to 100".into());
                None
            }
        },
    };
    Some(Health {
        check: check?,
        interval: interval?,
        timeout: timeout?,
        retries: retries?,
        start_period: start_period?,
    })
}

fn parse_containers(p: &mut Problems, raw: &[Spanned<RawContainer>]) -> Vec<Container> {
    let mut out: Vec<Container> = Vec::new();
    for (i, rc) in raw.iter().enumerate() {
        let rc = rc.get_ref();
        let key = format!("container[{i}]");
        let name = rc.name.get_ref();
        if !valid_container_name(name) {
            p.push(
                rc.name.span(),
                &format!("{key}.name"),
                format!("{name:?} is not a valid container name: use lower-case letters and digits, with single dashes inside (at most 16)"),
            );
        } else if name == "hook" || name.starts_with("debug") {
            p.push(
                rc.name.span(),
                &format!("{key}.name"),
                format!("{name:?} is reserved for the runtime (hooks and debug shells)"),
            );
        } else if out.iter().any(|c| &c.name == name) {
            p.push(
                rc.name.span(),
                &format!("{key}.name"),
                format!("container {name:?} is declared twice"),
            );
        }
        let image = rc
            .image
            .as_ref()
            .and_then(|i| match i.get_ref().parse::<ImageRef>() {
                Ok(r) => Some(r),
                Err(e) => {
                    p.push(i.span(), &format!("{key}.image"), e.to_string());
                    None
                }
            });
        if let Some(c) = &rc.command {
            if c.get_ref().is_empty() {
                p.push(
                    c.span(),
                    &format!("{key}.command"),
                    "must not be empty (omit it to use the image's)".into(),
                );
            }
        }
        let env = parse_env(p, &rc.env, &format!("{key}.env"));
        out.push(Container {
            name: name.clone(),
            image,
            command: rc.command.as_ref().map(|c| c.get_ref().clone()),
            env,
        });
    }
    out
}

fn parse_hooks(p: &mut Problems, raw: &[Spanned<RawHook>], containers: &[Container]) -> Vec<Hook> {
    let mut out = Vec::new();
    for (i, rh) in raw.iter().enumerate() {
        let rh = rh.get_ref();
        let key = format!("hook[{i}]");
        let when = match rh.when.get_ref().as_str() {
            "install" => Some(HookWhen::Install),
            "upgrade" => Some(HookWhen::Upgrade),
            "start" => Some(HookWhen::Start),
            other => {
                p.push(
                    rh.when.span(),
                    &format!("{key}.when"),
                    format!("{other:?} is not a lifecycle step: use \"install\", \"upgrade\" or \"start\""),
                );
                None
            }
        };
        if rh.command.get_ref().is_empty() {
            p.push(
                rh.command.span(),
                &format!("{key}.command"),
                "must not be empty".into(),
            );
        }
        let container = rh.container.as_ref().map(|c| c.get_ref().clone());
        if let Some(c) = &rh.container {
            if !containers.iter().any(|o| &o.name == c.get_ref()) {
                p.push(
                    c.span(),
                    &format!("{key}.container"),
                    format!(
                        "no [[container]] is named {:?} (omit it to use the app's own)",
                        c.get_ref()
                    ),
                );
            }
        }
        let timeout = parse_duration_key(
            p,
            rh.timeout.as_ref(),
            &format!("{key}.timeout"),
            Duration::from_secs(600),
        );
        if let (Some(when), Some(timeout)) = (when, timeout) {
            out.push(Hook {
                when,
                command: rh.command.get_ref().clone(),
                container,
                timeout,
            });
        }
    }
    out
}

fn port_number(p: &mut Problems, n: &Spanned<i64>, key: &str) -> Option<u16> {
    match u16::try_from(*n.get_ref()) {
        Ok(v) if v > 0 => Some(v),
        _ => {
            p.push(
                n.span(),
                key,
                format!("{} is not a port: use 1 to 65535", n.get_ref()),
            );
            None
        }
    }
}

/// Ports the device keeps for itself: LAN clients reaching them must get the device.
const DEVICE_PORTS: [(Protocol, u16, &str); 3] = [
    (
        Protocol::Tcp,
        80,
        "the device's HTTPS proxy (declare [https] instead)",
    ),
    (
        Protocol::Tcp,
        443,
        "the device's HTTPS proxy (declare [https] instead)",
    ),
    (Protocol::Udp, 5353, "the device's mDNS responder"),
];

fn parse_ports(p: &mut Problems, raw: &[Spanned<RawPort>], https: Option<&Https>) -> Vec<Port> {
    let mut ports: Vec<Port> = Vec::new();
    for (i, rp) in raw.iter().enumerate() {
        let rp = rp.get_ref();
        let key = format!("port[{i}]");
        let number = port_number(p, &rp.port, &format!("{key}.port"));
        let protocol = match &rp.protocol {
            None => Some(Protocol::Tcp),
            Some(s) => match s.get_ref().as_str() {
                "tcp" => Some(Protocol::Tcp),
                "udp" => Some(Protocol::Udp),
                other => {
                    p.push(
                        s.span(),
                        &format!("{key}.protocol"),
                        format!("{other:?} is not supported: use \"tcp\" or \"udp\""),
                    );
                    None
                }
            },
        };
        let access = match &rp.access {
            None => Some(Access::Internal),
            Some(s) => match s.get_ref().as_str() {
                "public" => Some(Access::Public),
                "internal" => Some(Access::Internal),
                other => {
                    p.push(
                        s.span(),
                        &format!("{key}.access"),
                        format!("{other:?} is not an access: use \"public\" (LAN clients) or \"internal\" (the device only)"),
                    );
                    None
                }
            },
        };
        let (Some(port), Some(protocol), Some(access)) = (number, protocol, access) else {
            continue;
        };
        let span = rp.port.span();
        if ports
            .iter()
            .any(|o| o.port == port && o.protocol == protocol)
        {
            p.push(
                span,
                &format!("{key}.port"),
                format!("{port}/{protocol} is declared twice"),
            );
        } else if protocol == Protocol::Tcp && https.is_some_and(|h| h.port == port) {
            p.push(
                span,
                &format!("{key}.port"),
                format!("{port}/tcp is already the [https] port"),
            );
        } else if let Some((_, _, owner)) = DEVICE_PORTS
            .iter()
            .find(|(pr, n, _)| access == Access::Public && *pr == protocol && *n == port)
        {
            p.push(
                span,
                &format!("{key}.port"),
                format!("{port}/{protocol} cannot be public: it belongs to {owner}"),
            );
        }
        ports.push(Port {
            port,
            protocol,
            access,
        });
    }
    ports
}

struct Problems<'a> {
    text: &'a str,
    list: Vec<Problem>,
}

impl Problems<'_> {
    fn push(&mut self, span: Range<usize>, key: &str, message: String) {
        let (line, column) = line_col(self.text, span.start);
        self.list.push(Problem {
            line,
            column,
            key: key.to_string(),
            message,
        });
    }
}

fn syntax_problem(text: &str, e: &toml::de::Error) -> Problem {
    let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
    let mut message = e.message().to_string();
    // serde names the unknown field and the expected ones; say where the allowed keys are.
    if message.starts_with("unknown field") && !message.contains("expected") {
        message.push_str(&format!(", expected one of {TOP_LEVEL_KEYS}"));
    }
    let key = text
        .get(e.span().unwrap_or(0..0))
        .map(|s| {
            s.trim_matches(|c: char| c == '"' || c.is_whitespace())
                .to_string()
        })
        .filter(|s| s.len() < 64 && !s.contains('\n'))
        .unwrap_or_default();
    Problem {
        line,
        column,
        key,
        message,
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn valid_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Container names become part of a container id (`<app>--<name>`): a DNS-label-like word.
fn valid_container_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 16
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && !s.ends_with('-')
        && !s.contains("--")
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// "30s", "5m", "1h", "250ms" → a duration.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let n: u64 = s[..split].parse().ok()?;
    let ms = match s[split..].trim() {
        "ms" => n,
        "s" => n.checked_mul(1000)?,
        "m" | "min" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

fn valid_volume_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// A path inside the container where something is mounted.
pub(crate) fn check_container_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!(
            "{path:?} must be an absolute path inside the container"
        ));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(format!("{path:?} must not contain \"..\""));
    }
    if path == "/" {
        return Err("cannot mount a volume over the root directory".into());
    }
    const RESERVED: [&str; 6] = [
        "/proc",
        "/sys",
        "/dev",
        "/etc/hosts",
        "/etc/resolv.conf",
        crate::runtime::spec::TRUST_BUNDLE,
    ];
    if RESERVED
        .iter()
        .any(|r| path == *r || path.starts_with(&format!("{r}/")))
    {
        return Err(format!("{path:?} is reserved for the runtime"));
    }
    Ok(())
}

/// "256M" → bytes. Units are binary (K = 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let mult = match s[i..].trim().to_ascii_uppercase().as_str() {
                "K" | "KB" | "KIB" => 1 << 10,
                "M" | "MB" | "MIB" => 1 << 20,
                "G" | "GB" | "GIB" => 1 << 30,
                _ => return None,
            };
            (&s[..i], mult)
        }
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match Manifest::parse(text) {
            Ok(m) => panic!("expected problems, got {m:?}"),
            Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn minimal_manifest_gets_defaults() {
        let m = Manifest::parse("name = \"wiki\"\nimage = \"redis\"\n").unwrap();
        assert_eq!(m.name.as_str(), "wiki");
        assert_eq!(m.image.to_string(), "docker.io/library/redis:latest");
        assert_eq!(m.resources, Resources::default());
        assert!(m.volumes.is_empty() && m.env.is_empty() && m.command.is_none());
    }

    #[test]
    fn full_manifest() {
        let m = Manifest::parse(
            r#"
name = "hello"
image = "127.0.0.1:5000/busybox:1"
command = ["/bin/httpd", "-f"]
[env]
GREETING = "hi"
[[volume]]
name = "data"
path = "/data"
[resources]
memory = "64M"
cpus = 0.5
pids = 64
"#,
        )
        .unwrap();
        assert_eq!(
            m.command.as_deref(),
            Some(&["/bin/httpd".to_string(), "-f".to_string()][..])
        );
        assert_eq!(m.env["GREETING"], "hi");
        assert_eq!(
            m.volumes,
            vec![Volume {
                name: "data".into(),
                path: "/data".into()
            }]
        );
        assert_eq!(
            m.resources,
            Resources {
                memory_bytes: 64 << 20,
                cpus: 0.5,
                pids: 64
            }
        );
    }

    #[test]
    fn unknown_key_is_located_and_names_allowed_keys() {
        let p = problems("name = \"a\"\nimage = \"redis\"\nimgae = \"x\"\n");
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("3:1: imgae: unknown field `imgae`"),
            "{p:?}"
        );
        assert!(p[0].contains("image"), "{p:?}");
    }

    #[test]
    fn every_semantic_problem_is_reported() {
        let p = problems(
            "name = \"Bad_Name\"\nimage = \"Redis\"\ncommand = []\n[env]\n1X = \"v\"\n[[volume]]\nname = \"d\"\npath = \"rel\"\n[[volume]]\nname = \"d\"\npath = \"/proc/x\"\n[resources]\nmemory = \"lots\"\ncpus = 0.0\npids = 2\n",
        );
        let joined = p.join("\n");
        for needle in [
            "1:8: name:",
            "2:9: image:",
            "3:11: command: must not be empty",
            "5:1: env.1X:",
            "8:8: volume[0].path: \"rel\" must be an absolute path",
            "10:8: volume[1].name: volume \"d\" is declared twice",
            "11:8: volume[1].path: \"/proc/x\" is reserved",
            "13:10: resources.memory: \"lots\" is not a size",
            "14:8: resources.cpus:",
            "15:8: resources.pids:",
        ] {
            assert!(joined.contains(needle), "missing {needle:?} in\n{joined}");
        }
    }

    #[test]
    fn missing_name_and_image() {
        let p = problems("command = [\"x\"]\n");
        assert!(p.iter().any(|s| s.contains("name: missing")), "{p:?}");
        assert!(p.iter().any(|s| s.contains("image: missing")), "{p:?}");
    }

    #[test]
    fn syntax_error_is_located() {
        let p = problems("name = \"a\"\nimage = \n");
        assert!(p[0].starts_with("2:"), "{p:?}");
    }

    #[test]
    fn https_and_ports() {
        let m = Manifest::parse(
            "name = \"dns\"\nimage = \"x\"\n[https]\nport = 8080\n[[port]]\nport = 53\nprotocol = \"udp\"\naccess = \"public\"\n[[port]]\nport = 53\naccess = \"public\"\n[[port]]\nport = 9100\n",
        )
        .unwrap();
        assert_eq!(
            m.https,
            Some(Https {
                port: 8080,
                body_limit: None,
                static_paths: Vec::new(),
            })
        );
        assert_eq!(m.ports.len(), 3);
        assert_eq!(m.ports[2].access, Access::Internal, "internal by default");
        assert_eq!(m.ports[2].protocol, Protocol::Tcp, "tcp by default");
        assert_eq!(
            m.public_ports().collect::<Vec<_>>(),
            vec![(Protocol::Udp, 53), (Protocol::Tcp, 53)]
        );
    }

    #[test]
    fn static_paths() {
        let m = Manifest::parse(
            "name = \"a\"\nimage = \"x\"\n[https]\nport = 80\nstatic = [\"/assets/\", \"/favicon.ico\"]\n",
        )
        .unwrap();
        assert_eq!(m.https.unwrap().static_paths, ["/assets", "/favicon.ico"]);
        let p = problems(
            "name = \"a\"\nimage = \"x\"\n[https]\nport = 80\nstatic = [\"rel\", \"/\", \"/a/../b\", \"/x\", \"/x/\"]\n",
        );
        let joined = p.join("\n");
        for needle in [
            "https.static[0]: \"rel\" must be an absolute path",
            "https.static[1]: cannot serve the whole image",
            "https.static[2]:",
            "https.static[4]: \"/x\" is listed twice",
        ] {
            assert!(joined.contains(needle), "missing {needle:?} in\n{joined}");
        }
    }

    #[test]
    fn body_limits() {
        let m = Manifest::parse(
            "name = \"a\"\nimage = \"x\"\n[https]\nport = 80\nbody_limit = \"100M\"\n",
        )
        .unwrap();
        assert_eq!(m.https.unwrap().body_limit, Some(100 << 20));
        let p =
            problems("name = \"a\"\nimage = \"x\"\n[https]\nport = 80\nbody_limit = \"lots\"\n");
        assert!(
            p[0].starts_with("5:14: https.body_limit: \"lots\" is not a size"),
            "{p:?}"
        );
    }

    #[test]
    fn port_problems_are_located_and_explained() {
        let p = problems(
            "name = \"a\"\nimage = \"x\"\n[https]\nport = 0\n[[port]]\nport = 70000\n[[port]]\nport = 53\nprotocol = \"sctp\"\naccess = \"world\"\n[[port]]\nport = 443\naccess = \"public\"\n[[port]]\nport = 5353\nprotocol = \"udp\"\naccess = \"public\"\n[[port]]\nport = 7\n[[port]]\nport = 7\n",
        );
        let joined = p.join("\n");
        for needle in [
            "4:8: https.port: 0 is not a port",
            "6:8: port[0].port: 70000 is not a port",
            "9:12: port[1].protocol: \"sctp\" is not supported",
            "10:10: port[1].access: \"world\" is not an access",
            "12:8: port[2].port: 443/tcp cannot be public: it belongs to the device's HTTPS proxy",
            "15:8: port[3].port: 5353/udp cannot be public",
            "21:8: port[5].port: 7/tcp is declared twice",
        ] {
            assert!(joined.contains(needle), "missing {needle:?} in\n{joined}");
        }
        let p = problems("name = \"a\"\nimage = \"x\"\n[https]\nport = 80\n[[port]]\nport = 80\n");
        assert!(p[0].contains("80/tcp is already the [https] port"), "{p:?}");
        // An internal port may use a number the device keeps for LAN clients.
        Manifest::parse("name = \"a\"\nimage = \"x\"\n[[port]]\nport = 443\n").unwrap();
    }

    #[test]
    fn services_health_hooks_and_containers() {
        let m = Manifest::parse(
            r#"
name = "wiki"
image = "reg/wiki:1"
[https]
port = 8080
[database]
variant = "postgres"
[cache]
memory = "32M"
[env]
WG_SERVER = "{{https.url}}"
DB = "{{ database.url }}"
TPL = "{{.Name}}"
[health]
path = "/health"
interval = "10s"
[[hook]]
when = "install"
command = ["sh", "-c", "install --db {{database.name}}"]
[[hook]]
when = "upgrade"
command = ["migrate"]
container = "worker"
timeout = "5m"
[[container]]
name = "worker"
image = "reg/worker:1"
command = ["work"]
[container.env]
QUEUE = "{{cache.url}}"
"#,
        )
        .unwrap();
        assert_eq!(
            m.database,
            Some(Database {
                variant: DbVariant::Postgres,
                permissions: DbPermissions::Full
            })
        );
        assert_eq!(
            m.cache,
            Some(Cache {
                memory_bytes: 32 << 20
            })
        );
        let h = m.health.as_ref().unwrap();
        assert_eq!(
            h.check,
            HealthCheck::Http {
                path: "/health".into()
            }
        );
        assert_eq!((h.interval.as_secs(), h.retries), (10, 3));
        assert_eq!(m.hooks.len(), 2);
        assert_eq!(m.hooks_for(HookWhen::Install).count(), 1);
        assert_eq!(m.hooks[1].container.as_deref(), Some("worker"));
        assert_eq!(m.hooks[1].timeout.as_secs(), 300);
        assert_eq!(m.containers[0].name, "worker");
        assert_eq!(m.images().len(), 2);
        // Defaults: any SQL database, a 64M cache.
        let m = Manifest::parse("name = \"a\"\nimage = \"x\"\n[database]\n[cache]\n").unwrap();
        assert_eq!(m.database.unwrap().variant, DbVariant::Sql);
        assert_eq!(m.cache.unwrap().memory_bytes, DEFAULT_CACHE_MEMORY);
    }

    #[test]
    fn service_and_template_problems_are_located_and_explained() {
        let p = problems(
            r#"name = "a"
image = "x"
[database]
variant = "mysql"
permissions = "read-only"
[cache]
variant = "memcached"
[env]
A = "{{database.pasword}}"
B = "{{https.url}}"
[health]
path = "/"
command = ["x"]
[[hook]]
when = "later"
command = []
container = "nope"
[[container]]
name = "Worker"
[[container]]
name = "w"
command = ["{{app.nme}}"]
[[container]]
name = "hook"
"#,
        );
        let joined = p.join("\n");
        for needle in [
            "4:11: database.variant: \"mysql\" is not supported yet: the device provides PostgreSQL",
            "5:15: database.permissions: \"read-only\" is not supported yet",
            "7:11: cache.variant: \"memcached\" is not supported yet",
            "9:5: env.A: unknown template variable {{database.pasword}}: use one of",
            "10:5: env.B: {{https.url}} needs a [https] section",
            "health: give exactly one of path",
            "15:8: hook[0].when: \"later\" is not a lifecycle step",
            "16:11: hook[0].command: must not be empty",
            "17:13: hook[0].container: no [[container]] is named \"nope\"",
            "19:8: container[0].name: \"Worker\" is not a valid container name",
            "22:11: container[1].command: unknown template variable {{app.nme}}",
            "24:8: container[2].name: \"hook\" is reserved",
        ] {
            assert!(joined.contains(needle), "missing {needle:?} in\n{joined}");
        }
    }

    #[test]
    fn durations() {
        for (input, ms) in [
            ("30s", Some(30_000)),
            ("250ms", Some(250)),
            ("5m", Some(300_000)),
            ("1h", Some(3_600_000)),
            ("5", None),
            ("s", None),
            ("1d", None),
        ] {
            assert_eq!(
                parse_duration(input).map(|d| d.as_millis() as u64),
                ms,
                "{input}"
            );
        }
    }

    #[test]
    fn sizes() {
        for (input, expected) in [
            ("256M", Some(256 << 20)),
            ("1G", Some(1 << 30)),
            ("1024", Some(1024)),
            ("64 MiB", Some(64 << 20)),
            ("12Q", None),
            ("", None),
            ("M", None),
        ] {
            assert_eq!(parse_size(input), expected, "{input}");
        }
    }
}
