//! docker-compose import: a compose file in, a manifest draft out (`homeport import`).
//!
//! Compose describes containers and how they are wired; a manifest describes one app and what
//! it needs. The importer maps one onto the other:
//! - database and cache services (postgres, mariadb, redis, valkey, memcached, …, recognised by
//!   the last path component of their image) become `[database]` / `[cache]`. Homeport provides
//!   them, so their volumes, environment and ports are dropped, each with a warning, and the
//!   app's references to them (host names, users, passwords, database names, URLs) become
//!   `{{database.*}}` / `{{cache.*}}` templates;
//! - the web service (`--service`, else the only service publishing ports, else the only one
//!   left) becomes the app: image, command, `[https]` port, raw `[[port]]`s, volumes,
//!   environment, resources and health check;
//! - the other services (workers, cron) become `[[container]]`s of the same app.
//!
//! Whatever cannot be translated is a warning naming the service, the key and the line;
//! nothing is dropped silently. Things that need no action (restart policies, logging) are
//! notes. Both also head the draft as TOML comments.
//!
//! Invariant: like the rest of `manifest/`, this module does no I/O. The variables a compose
//! file interpolates (`${VAR}`) are never read from the environment or an `.env` file:
//! defaults are kept, the rest reported.
//!
//! YAML comes from `saphyr` (and its `saphyr-parser`), the maintained YAML 1.2 successor of
//! `yaml-rust2`: `serde_yaml` is deprecated and unmaintained, and `serde_yml` is now only a
//! deprecated shim. A tree suits compose better than serde: its keys are loosely typed (a list or
//! a map for `environment`, a string or a list for `command`, an int or a string for a port),
//! and we want the line of every node and each scalar as written (`1.10` must not become
//! `1.1`). saphyr also rejects duplicate keys and bounds alias expansion ("billion laughs").
//! Merge keys (`<<: *defaults`), common in compose files, are resolved here.

use std::collections::BTreeSet;
use std::fmt;
use std::fmt::Write as _;

use saphyr::{MarkedYaml, ScalarStyle, YamlData, YamlLoader};
use saphyr_parser::Parser;
use serde::Serialize;

use super::AppName;
use crate::images::reference::ImageRef;

/// A manifest draft and what the user must know about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Draft {
    /// The manifest, warnings and notes first as comments.
    pub toml: String,
    /// What was not translated or needs checking: `services.web.cap_add: … (line 12)`.
    pub warnings: Vec<String>,
    /// What was left out because Homeport does it anyway (restart policies, logging).
    pub notes: Vec<String>,
}

/// Why a compose file gives no draft at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    #[error("malformed yaml at line {line}, column {column}: {message}")]
    Yaml {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("line {line}: {key}: {message}")]
    Shape {
        line: usize,
        key: String,
        message: String,
    },
    #[error("the compose file has no services")]
    NoServices,
    #[error("no service {name:?} in the compose file (it has {available})")]
    UnknownService { name: String, available: String },
    #[error("service {service:?} is {what}, which Homeport provides itself: import the service that uses it")]
    NotAnApp { service: String, what: String },
    #[error("no app to import: Homeport provides every service in the file itself ({services})")]
    NoApp { services: String },
    #[error(
        "several services could be the app's web service ({candidates}): choose one with --service"
    )]
    Ambiguous { candidates: String },
    #[error("service {service:?} (line {line}) has no image: Homeport runs published images, so build and push it, then set image")]
    NoImage { service: String, line: usize },
}

/// Reads a compose file and drafts a manifest for its web service (`service`, or the one the
/// file makes obvious).
pub fn import(yaml: &str, service: Option<&str>) -> Result<Draft, ImportError> {
    let root = parse_yaml(yaml)?;
    let top = match &root.kind {
        Kind::Map(m) => m,
        Kind::Null => return Err(ImportError::NoServices),
        _ => {
            return Err(shape(
                &root,
                "compose file",
                "must be a mapping with a services key",
            ))
        }
    };
    let mut cx = Cx::default();
    let mut services_node = None;
    for (key, node) in top {
        match key.as_str() {
            "services" => services_node = Some(node),
            "volumes" => match &node.kind {
                Kind::Map(m) => cx.volume_decls = m.clone(),
                Kind::Null => {}
                _ => cx.warn("volumes", node, "is not a mapping of volume names; ignored"),
            },
            "version" => {}
            "name" => cx.note(
                "name",
                node,
                "the compose project's name is not used: the app is named after its web service",
            ),
            "networks" => cx.note(
                "networks",
                node,
                "not needed: an app's containers share one network namespace and address",
            ),
            "secrets" | "configs" => cx.warn(
                key,
                node,
                "not imported: put the files in a [[volume]] or the values in [env]",
            ),
            "include" => cx.warn(
                key,
                node,
                "included compose files are not read: import them separately",
            ),
            k if k.starts_with("x-") => {}
            _ => cx.warn(key, node, "unknown top-level key; ignored"),
        }
    }
    let services = match services_node.map(|n| (n, &n.kind)) {
        Some((_, Kind::Map(m))) if !m.is_empty() => m,
        None | Some((_, Kind::Null)) | Some((_, Kind::Map(_))) => {
            return Err(ImportError::NoServices)
        }
        Some((n, _)) => {
            return Err(shape(
                n,
                "services",
                "must be a mapping of service names to services",
            ))
        }
    };

    let mut list = Vec::new();
    for (name, node) in services {
        if !matches!(node.kind, Kind::Map(_)) {
            return Err(shape(
                node,
                &format!("services.{name}"),
                "must be a mapping (image, ports, …)",
            ));
        }
        let image = node
            .get("image")
            .and_then(Node::scalar)
            .map(|raw| interpolate(raw).value);
        let role = image.as_deref().map_or(Role::App, classify);
        list.push(Service {
            name: name.clone(),
            node,
            role,
            image,
        });
    }

    let web = match service {
        Some(want) => {
            let s = list.iter().find(|s| s.name == want).ok_or_else(|| {
                ImportError::UnknownService {
                    name: want.to_string(),
                    available: names(list.iter()),
                }
            })?;
            if s.role != Role::App {
                return Err(ImportError::NotAnApp {
                    service: s.name.clone(),
                    what: s.role.what().to_string(),
                });
            }
            s
        }
        None => choose_web(&list)?,
    };
    let Some(web_image) = web.image.clone() else {
        return Err(ImportError::NoImage {
            service: web.name.clone(),
            line: web.node.line,
        });
    };

    // The shared services the app gets, and how the compose file names them.
    let db = list
        .iter()
        .find(|s| matches!(s.role, Role::Database(_)))
        .map(|s| Backing::new(s, &list));
    let cache = list
        .iter()
        .find(|s| matches!(s.role, Role::Cache(_)))
        .map(|s| Backing::new(s, &list));
    cx.db = db;
    cx.cache = cache;
    // The web service first.
    cx.app_services = std::iter::once(web.name.clone())
        .chain(
            list.iter()
                .filter(|s| s.role == Role::App && s.name != web.name)
                .map(|s| s.name.clone()),
        )
        .collect();

    let mut out = Out {
        database: list.iter().find_map(|s| match s.role {
            Role::Database(d) => Some(d.variant()),
            _ => None,
        }),
        cache: list.iter().any(|s| matches!(s.role, Role::Cache(_))),
        ..Out::default()
    };
    cx.web_service(web, &web_image, &mut out);
    for s in &list {
        if s.name == web.name {
            continue;
        }
        match s.role {
            Role::App => cx.container_service(s, &mut out),
            Role::Database(d) => cx.backing_service(s, Role::Database(d)),
            Role::Cache(c) => cx.backing_service(s, Role::Cache(c)),
            Role::Infra(why) => cx.warn(
                &format!("services.{}", s.name),
                s.node,
                format!("dropped: {why}"),
            ),
        }
    }
    cx.finish();

    let toml = render(&out, &web.name, &cx.warnings, &cx.notes);
    Ok(Draft {
        toml,
        warnings: cx.warnings,
        notes: cx.notes,
    })
}

// ---------------------------------------------------------------------------------------------
// The YAML tree

/// A YAML node as compose needs it: scalars as written, keys as strings, merge keys resolved,
/// each with its line.
#[derive(Debug, Clone)]
struct Node {
    line: usize,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    Null,
    Scalar(String),
    Seq(Vec<Node>),
    Map(Vec<(String, Node)>),
}

impl Node {
    fn get(&self, key: &str) -> Option<&Node> {
        self.map()?.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn map(&self) -> Option<&[(String, Node)]> {
        match &self.kind {
            Kind::Map(m) => Some(m),
            _ => None,
        }
    }

    fn scalar(&self) -> Option<&str> {
        match &self.kind {
            Kind::Scalar(s) => Some(s),
            _ => None,
        }
    }

    fn is_true(&self) -> bool {
        self.scalar()
            .is_some_and(|s| matches!(s, "true" | "True" | "TRUE" | "yes"))
    }

    /// The node's items: a sequence's, or a single scalar as one item.
    fn items(&self) -> Vec<&Node> {
        match &self.kind {
            Kind::Seq(v) => v.iter().collect(),
            Kind::Null => Vec::new(),
            _ => vec![self],
        }
    }
}

/// Nesting deeper than this is not a compose file (and would only exhaust the stack).
const MAX_DEPTH: usize = 64;

fn parse_yaml(text: &str) -> Result<Node, ImportError> {
    let mut loader: YamlLoader<MarkedYaml> = YamlLoader::default();
    loader.early_parse(false);
    let mut parser = Parser::new_from_str(text);
    let yaml_error = |e: &saphyr::ScanError| ImportError::Yaml {
        line: e.marker().line(),
        column: e.marker().col() + 1,
        message: e.info().to_string(),
    };
    parser
        .load(&mut loader, false)
        .map_err(|e| yaml_error(&e))?;
    if let Some(e) = loader.error() {
        return Err(yaml_error(e));
    }
    match loader.into_documents().into_iter().next() {
        Some(doc) => convert(doc, "", 0),
        None => Ok(Node {
            line: 1,
            kind: Kind::Null,
        }),
    }
}

fn convert(y: MarkedYaml<'_>, path: &str, depth: usize) -> Result<Node, ImportError> {
    let line = y.span.start.line();
    if depth > MAX_DEPTH {
        return Err(ImportError::Shape {
            line,
            key: path.to_string(),
            message: format!("nested deeper than {MAX_DEPTH} levels"),
        });
    }
    let kind = match y.data {
        YamlData::Representation(text, style, _) => {
            if style == ScalarStyle::Plain && matches!(&*text, "" | "~" | "null" | "Null" | "NULL")
            {
                Kind::Null
            } else {
                Kind::Scalar(text.into_owned())
            }
        }
        YamlData::Value(v) => match v {
            saphyr::Scalar::Null => Kind::Null,
            saphyr::Scalar::Boolean(b) => Kind::Scalar(b.to_string()),
            saphyr::Scalar::Integer(i) => Kind::Scalar(i.to_string()),
            saphyr::Scalar::FloatingPoint(f) => Kind::Scalar(f.to_string()),
            saphyr::Scalar::String(s) => Kind::Scalar(s.into_owned()),
        },
        YamlData::Sequence(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                out.push(convert(item, &format!("{path}[{i}]"), depth + 1)?);
            }
            Kind::Seq(out)
        }
        YamlData::Mapping(m) => {
            let mut entries: Vec<(String, Node)> = Vec::new();
            let mut merges = Vec::new();
            for (k, v) in m {
                let key_line = k.span.start.line();
                let key = match k.data {
                    YamlData::Representation(t, _, _) => t.into_owned(),
                    YamlData::Value(s) => match s {
                        saphyr::Scalar::String(s) => s.into_owned(),
                        saphyr::Scalar::Integer(i) => i.to_string(),
                        saphyr::Scalar::Boolean(b) => b.to_string(),
                        other => format!("{other:?}"),
                    },
                    _ => {
                        return Err(ImportError::Shape {
                            line: key_line,
                            key: path.to_string(),
                            message: "keys must be plain strings".into(),
                        })
                    }
                };
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                if key == "<<" {
                    merges.push(convert(v, &child, depth + 1)?);
                    continue;
                }
                if entries.iter().any(|(e, _)| *e == key) {
                    return Err(ImportError::Shape {
                        line: key_line,
                        key: child,
                        message: "duplicated key".into(),
                    });
                }
                entries.push((key, convert(v, &child, depth + 1)?));
            }
            // Merge keys: explicit keys win, then earlier merged mappings over later ones.
            for m in merges {
                let sources: Vec<Node> = match m.kind {
                    Kind::Seq(v) => v,
                    _ => vec![m],
                };
                for s in sources {
                    let Kind::Map(es) = s.kind else {
                        return Err(ImportError::Shape {
                            line: s.line,
                            key: format!("{path}.<<"),
                            message: "a merge key must refer to a mapping".into(),
                        });
                    };
                    for (k, v) in es {
                        if !entries.iter().any(|(e, _)| *e == k) {
                            entries.push((k, v));
                        }
                    }
                }
            }
            Kind::Map(entries)
        }
        YamlData::Tagged(_, inner) => return convert(*inner, path, depth + 1),
        YamlData::Alias(_) | YamlData::BadValue => Kind::Null,
    };
    Ok(Node { line, kind })
}

fn shape(node: &Node, key: &str, message: &str) -> ImportError {
    ImportError::Shape {
        line: node.line,
        key: key.to_string(),
        message: message.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Interpolation

/// A scalar after compose's `${VAR}` interpolation, with no variable set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Interpolated {
    value: String,
    /// Variables without a default: kept as `${VAR}` in the value.
    unresolved: Vec<String>,
    /// Variables whose default (`${VAR:-default}`) was used.
    defaulted: Vec<String>,
}

fn interpolate(raw: &str) -> Interpolated {
    let mut out = Interpolated::default();
    let mut rest = raw;
    while let Some(i) = rest.find('$') {
        out.value.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.value.push('$');
            rest = r;
        } else if let Some(body) = after.strip_prefix('{') {
            // The matching brace, allowing `${A:-${B}}`.
            let mut depth = 1;
            let mut close = None;
            for (j, c) in body.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            close = Some(j);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let Some(close) = close else {
                out.value.push_str(&rest[i..]);
                return out;
            };
            let inner = &body[..close];
            rest = &body[close + 1..];
            let name_end = inner
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(inner.len());
            let (name, op) = inner.split_at(name_end);
            let (kind, arg) = [":-", "-", ":?", "?", ":+", "+"]
                .iter()
                .find_map(|p| op.strip_prefix(p).map(|a| (*p, a)))
                .unwrap_or(("", op));
            match kind {
                ":-" | "-" => {
                    let d = interpolate(arg);
                    out.value.push_str(&d.value);
                    out.unresolved.extend(d.unresolved);
                    out.defaulted.extend(d.defaulted);
                    out.defaulted.push(name.to_string());
                }
                // The variable is unset, so the alternative is not used.
                ":+" | "+" => out.defaulted.push(name.to_string()),
                _ => {
                    out.value.push_str("${");
                    out.value.push_str(name);
                    out.value.push('}');
                    out.unresolved.push(name.to_string());
                }
            }
        } else if after.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            let name = &after[..end];
            out.value.push_str("${");
            out.value.push_str(name);
            out.value.push('}');
            out.unresolved.push(name.to_string());
            rest = &after[end..];
        } else {
            out.value.push('$');
            rest = after;
        }
    }
    out.value.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------------
// Services and their roles

struct Service<'a> {
    name: String,
    node: &'a Node,
    role: Role,
    /// The image, interpolated.
    image: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Database(DbImage),
    Cache(CacheKind),
    /// A reverse proxy or updater: the device does its job.
    Infra(&'static str),
    App,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DbImage {
    Postgres,
    /// A PostgreSQL image with an extension the app relies on.
    PostgresWith(&'static str),
    MariaDb,
    MySql,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CacheKind {
    Redis,
    Memcached,
}

impl DbImage {
    fn variant(self) -> &'static str {
        match self {
            DbImage::Postgres | DbImage::PostgresWith(_) => "postgres",
            DbImage::MariaDb | DbImage::MySql => "sql",
        }
    }

    fn port(self) -> u16 {
        match self {
            DbImage::Postgres | DbImage::PostgresWith(_) => 5432,
            DbImage::MariaDb | DbImage::MySql => 3306,
        }
    }
}

impl Role {
    fn what(self) -> &'static str {
        match self {
            Role::Database(DbImage::MariaDb) => "a MariaDB database",
            Role::Database(DbImage::MySql) => "a MySQL database",
            Role::Database(_) => "a PostgreSQL database",
            Role::Cache(CacheKind::Memcached) => "a memcached cache",
            Role::Cache(CacheKind::Redis) => "a Redis cache",
            Role::Infra(_) => "a reverse proxy or updater",
            Role::App => "an app",
        }
    }
}

/// The last path component of an image's repository, lower case: `docker.io/bitnami/redis:7`
/// → `redis`.
fn image_component(image: &str) -> String {
    let repo = match image.parse::<ImageRef>() {
        Ok(r) => r.repository().to_string(),
        Err(_) => {
            let no_digest = image.split('@').next().unwrap_or(image);
            let last_slash = no_digest.rfind('/').map_or(0, |i| i + 1);
            match no_digest[last_slash..].find(':') {
                Some(c) => no_digest[..last_slash + c].to_string(),
                None => no_digest.to_string(),
            }
        }
    };
    repo.rsplit('/').next().unwrap_or("").to_ascii_lowercase()
}

fn classify(image: &str) -> Role {
    match image_component(image).as_str() {
        "postgres" | "postgresql" => Role::Database(DbImage::Postgres),
        "postgis" => Role::Database(DbImage::PostgresWith("postgis")),
        "pgvector" | "pgvecto-rs" => Role::Database(DbImage::PostgresWith("vector")),
        "mariadb" => Role::Database(DbImage::MariaDb),
        "mysql" | "mysql-server" | "percona-server" => Role::Database(DbImage::MySql),
        "redis" | "valkey" | "keydb" | "redis-stack-server" => Role::Cache(CacheKind::Redis),
        "memcached" => Role::Cache(CacheKind::Memcached),
        "traefik" | "nginx-proxy" | "acme-companion" | "docker-gen" | "swag"
        | "nginx-proxy-manager" | "caddy-docker-proxy" => Role::Infra(
            "a reverse proxy: the device's HTTPS proxy serves the app at https://<app>-<device>.local/",
        ),
        "watchtower" => Role::Infra("an image updater: `homeport update` moves an app to a new image"),
        _ => Role::App,
    }
}

fn names<'s, 'a: 's>(services: impl Iterator<Item = &'s Service<'a>>) -> String {
    services
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The web service when the file makes it obvious: the only app service publishing ports, else
/// the only one exposing ports, else the only one.
fn choose_web<'a, 'b>(list: &'b [Service<'a>]) -> Result<&'b Service<'a>, ImportError> {
    let apps: Vec<&Service> = list
        .iter()
        .filter(|s| s.role == Role::App && s.node.get("profiles").is_none())
        .collect();
    if apps.is_empty() {
        return Err(ImportError::NoApp {
            services: names(list.iter()),
        });
    }
    let has = |s: &Service, key: &str| s.node.get(key).is_some_and(|n| !n.items().is_empty());
    let tiers: [Vec<&Service>; 3] = [
        apps.iter().copied().filter(|s| has(s, "ports")).collect(),
        apps.iter()
            .copied()
            .filter(|s| has(s, "expose") || traefik_port(s.node).is_some())
            .collect(),
        apps.clone(),
    ];
    let Some(tier) = tiers.into_iter().find(|t| !t.is_empty()) else {
        return Err(ImportError::NoApp {
            services: names(list.iter()),
        });
    };
    match tier.as_slice() {
        [one] => Ok(one),
        _ => Err(ImportError::Ambiguous {
            candidates: tier
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// `traefik.http.services.*.loadbalancer.server.port` from a service's labels.
fn traefik_port(node: &Node) -> Option<u16> {
    let labels = node.get("labels")?;
    let pairs: Vec<(String, String)> = match &labels.kind {
        Kind::Map(m) => m
            .iter()
            .map(|(k, v)| (k.clone(), v.scalar().unwrap_or("").to_string()))
            .collect(),
        Kind::Seq(v) => v
            .iter()
            .filter_map(|n| n.scalar())
            .filter_map(|s| s.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        _ => return None,
    };
    pairs
        .iter()
        .find(|(k, _)| k.starts_with("traefik.") && k.ends_with(".loadbalancer.server.port"))
        .and_then(|(_, v)| v.trim().parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Database and cache: how the compose file names them

/// A database or cache service, and the values by which the app's environment refers to it.
#[derive(Debug, Default)]
struct Backing {
    service: String,
    /// Host names it answers to: service name, `hostname`, `container_name`, aliases, links.
    hosts: BTreeSet<String>,
    /// Its port in the compose file (5432, 3306, 6379, 11211).
    port: u16,
    users: BTreeSet<String>,
    passwords: BTreeSet<String>,
    names: BTreeSet<String>,
}

impl Backing {
    fn new(s: &Service, all: &[Service]) -> Backing {
        let mut b = Backing {
            service: s.name.clone(),
            port: match s.role {
                Role::Database(d) => d.port(),
                Role::Cache(CacheKind::Memcached) => 11211,
                _ => 6379,
            },
            ..Backing::default()
        };
        b.hosts.insert(s.name.to_ascii_lowercase());
        for key in ["hostname", "container_name"] {
            if let Some(h) = s.node.get(key).and_then(Node::scalar) {
                b.hosts.insert(h.to_ascii_lowercase());
            }
        }
        if let Some(Kind::Map(nets)) = s.node.get("networks").map(|n| &n.kind) {
            for (_, net) in nets {
                for a in net.get("aliases").map(Node::items).unwrap_or_default() {
                    if let Some(a) = a.scalar() {
                        b.hosts.insert(a.to_ascii_lowercase());
                    }
                }
            }
        }
        for other in all {
            for l in other.node.get("links").map(Node::items).unwrap_or_default() {
                if let Some((svc, alias)) = l.scalar().and_then(|l| l.split_once(':')) {
                    if svc == s.name {
                        b.hosts.insert(alias.to_ascii_lowercase());
                    }
                }
            }
        }
        // The values the service's own environment sets.
        let add = |set: &mut BTreeSet<String>, raw: &str| {
            if raw.is_empty() {
                return;
            }
            set.insert(raw.to_string());
            let i = interpolate(raw);
            if !i.value.is_empty() {
                set.insert(i.value);
            }
        };
        let env = env_pairs(s.node);
        let mut root_password = false;
        for (name, raw) in &env {
            let Some(raw) = raw else { continue };
            let n = name.to_ascii_uppercase();
            if n.ends_with("_FILE") {
                continue;
            }
            if n.contains("PASSWORD") || n.ends_with("_PASS") {
                add(&mut b.passwords, raw);
                root_password |= n.contains("ROOT");
            } else if n.ends_with("USER") || n.ends_with("USERNAME") {
                add(&mut b.users, raw);
            } else if n.ends_with("_DB") || n.ends_with("DATABASE") || n.ends_with("DBNAME") {
                add(&mut b.names, raw);
            }
        }
        if let Some(cmd) = s.node.get("command") {
            let words: Vec<String> = match &cmd.kind {
                Kind::Scalar(s) => shell_split(s).unwrap_or_default(),
                Kind::Seq(v) => v
                    .iter()
                    .filter_map(|n| n.scalar().map(str::to_string))
                    .collect(),
                _ => Vec::new(),
            };
            if let Some(p) = words.windows(2).find(|w| w[0] == "--requirepass") {
                add(&mut b.passwords, &p[1]);
            }
        }
        match s.role {
            Role::Database(DbImage::Postgres | DbImage::PostgresWith(_)) => {
                if b.users.is_empty() {
                    b.users.insert("postgres".into());
                }
                if b.names.is_empty() {
                    b.names = b.users.clone();
                }
            }
            Role::Database(_) if root_password && b.users.is_empty() => {
                b.users.insert("root".into());
            }
            _ => {}
        }
        b
    }

    fn has_host(&self, h: &str) -> bool {
        self.hosts.contains(&h.to_ascii_lowercase())
    }
}

/// An environment's entries as written: `(name, raw value)`; `None` takes the value from the
/// host's environment.
fn env_pairs(node: &Node) -> Vec<(String, Option<String>)> {
    let Some(env) = node.get("environment") else {
        return Vec::new();
    };
    let mut out: Vec<(String, Option<String>)> = Vec::new();
    let mut put = |k: String, v: Option<String>| {
        if let Some(e) = out.iter_mut().find(|(n, _)| *n == k) {
            e.1 = v;
        } else {
            out.push((k, v));
        }
    };
    match &env.kind {
        Kind::Map(m) => {
            for (k, v) in m {
                put(k.clone(), v.scalar().map(str::to_string));
            }
        }
        Kind::Seq(items) => {
            for item in items {
                if let Some(s) = item.scalar() {
                    match s.split_once('=') {
                        Some((k, v)) => put(k.to_string(), Some(v.to_string())),
                        None => put(s.to_string(), None),
                    }
                }
            }
        }
        _ => {}
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The draft

#[derive(Debug, Default)]
struct Out {
    name: String,
    image: String,
    command: Option<Vec<String>>,
    https: Option<u16>,
    database: Option<&'static str>,
    cache: bool,
    volumes: Vec<(String, String)>,
    env: Vec<(String, String)>,
    memory: Option<String>,
    cpus: Option<f64>,
    pids: Option<u32>,
    ports: Vec<PortOut>,
    health: Option<HealthOut>,
    containers: Vec<ContainerOut>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PortOut {
    port: u16,
    udp: bool,
    public: bool,
}

#[derive(Debug)]
struct HealthOut {
    path: Option<String>,
    command: Option<Vec<String>>,
    interval: Option<String>,
}

#[derive(Debug)]
struct ContainerOut {
    name: String,
    image: Option<String>,
    command: Option<Vec<String>>,
    env: Vec<(String, String)>,
}

/// The importer's state: what it found out, and what it has to say.
#[derive(Default)]
struct Cx {
    warnings: Vec<String>,
    notes: Vec<String>,
    volume_decls: Vec<(String, Node)>,
    db: Option<Backing>,
    cache: Option<Backing>,
    /// The app's services, the web service first: they share one address.
    app_services: Vec<String>,
    /// The service being imported.
    current: String,
    /// The web service's environment as written: containers inherit it.
    web_env: Vec<(String, Option<String>)>,
    /// Variables whose default was used.
    defaulted: BTreeSet<String>,
    /// Services whose restart policy was dropped.
    restart: Vec<String>,
}

/// The HTTP ports tried first for `[https]`, in the container.
const HTTP_PORTS: [u16; 6] = [80, 8080, 3000, 8000, 5000, 443];
/// Published host ports that suggest the container port behind them is HTTP.
const HTTP_HOST_PORTS: [u16; 8] = [80, 443, 8080, 8000, 3000, 5000, 8443, 8888];

/// Keys handled on their own; [`Cx::common_keys`] reports the rest of an app service's.
const HANDLED: &[&str] = &[
    "image",
    "command",
    "entrypoint",
    "environment",
    "env_file",
    "ports",
    "expose",
    "volumes",
    "tmpfs",
    "healthcheck",
    "deploy",
    "mem_limit",
    "cpus",
    "pids_limit",
    "labels",
    "depends_on",
    "networks",
    "links",
    "restart",
    "network_mode",
];

impl Cx {
    fn warn(&mut self, path: &str, node: &Node, msg: impl fmt::Display) {
        self.warn_line(path, node.line, msg);
    }

    fn warn_line(&mut self, path: &str, line: usize, msg: impl fmt::Display) {
        self.warnings.push(located(path, line, msg));
    }

    fn note(&mut self, path: &str, node: &Node, msg: impl fmt::Display) {
        self.note_line(path, node.line, msg);
    }

    fn note_line(&mut self, path: &str, line: usize, msg: impl fmt::Display) {
        self.notes.push(located(path, line, msg));
    }

    /// A scalar, interpolated; unresolved variables are reported.
    fn text(&mut self, path: &str, node: &Node) -> Option<String> {
        let raw = node.scalar()?;
        Some(self.interp(path, node, raw))
    }

    fn interp(&mut self, path: &str, node: &Node, raw: &str) -> String {
        let i = interpolate(raw);
        self.defaulted.extend(i.defaulted);
        if !i.unresolved.is_empty() {
            self.warn(
                path,
                node,
                format!(
                    "{} not set (compose would read it from the environment or .env); kept as written: fill it in",
                    i.unresolved
                        .iter()
                        .map(|v| format!("${{{v}}}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        i.value
    }

    /// A command: a string split like a shell, or a list as is.
    fn words(&mut self, path: &str, node: &Node) -> Option<Vec<String>> {
        match &node.kind {
            Kind::Scalar(s) => {
                let s = self.interp(path, node, s);
                match shell_split(&s) {
                    Ok(w) => Some(w),
                    Err(why) => {
                        self.warn(path, node, format!("cannot split {s:?}: {why}; dropped"));
                        None
                    }
                }
            }
            Kind::Seq(items) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match self.text(&format!("{path}[{i}]"), item) {
                        Some(w) => out.push(w),
                        None => {
                            self.warn(path, item, "not a list of strings; dropped");
                            return None;
                        }
                    }
                }
                Some(out)
            }
            Kind::Null => None,
            Kind::Map(_) => {
                self.warn(path, node, "not a string or a list; dropped");
                None
            }
        }
    }

    // -- the web service ----------------------------------------------------------------------

    fn web_service(&mut self, s: &Service, image: &str, out: &mut Out) {
        let base = format!("services.{}", s.name);
        let node = s.node;
        self.current = s.name.clone();
        self.web_env = env_pairs(node);

        out.name = app_name(&s.name);
        if out.name != s.name {
            self.warn(
                &base,
                node,
                format!(
                    "the app is named {:?}: app names are lower-case letters, digits and single dashes, starting with a letter, at most 32 characters",
                    out.name
                ),
            );
        }
        out.image = self.image(&base, node, image);
        out.command = self.command(&base, node);
        self.https_and_ports(&base, node, out);

        let env = self.environment(&base, node, out.https.is_some());
        out.env = env;
        for m in self.mounts(&base, node) {
            self.add_volume(m, out, true);
        }
        self.resources(&base, node, out, true);
        out.health = self.healthcheck(&base, node, out.https);
        self.common_keys(&base, node, true);
    }

    fn image(&mut self, base: &str, node: &Node, image: &str) -> String {
        let path = format!("{base}.image");
        let at = node.get("image").unwrap_or(node);
        if let Some(raw) = at.scalar() {
            // Reports unresolved variables; `image` is already interpolated.
            self.interp(&path, at, raw);
        }
        match image.parse::<ImageRef>() {
            Ok(r) => r.to_string(),
            Err(e) => {
                self.warn(&path, at, format!("{e}; kept as written"));
                image.to_string()
            }
        }
    }

    /// `command`, with an `entrypoint` in front of it: the manifest cannot replace the image's
    /// entrypoint, so the draft passes the compose one as the first arguments.
    fn command(&mut self, base: &str, node: &Node) -> Option<Vec<String>> {
        let cmd = node
            .get("command")
            .and_then(|c| self.words(&format!("{base}.command"), c));
        let cmd = match cmd {
            Some(c) if c.is_empty() => {
                let at = node.get("command").unwrap_or(node);
                self.note(&format!("{base}.command"), at, "empty: the image's is used");
                None
            }
            other => other,
        };
        let Some(ep_node) = node.get("entrypoint") else {
            return cmd;
        };
        let ep = self.words(&format!("{base}.entrypoint"), ep_node);
        match ep {
            Some(ep) if !ep.is_empty() => {
                self.warn(
                    &format!("{base}.entrypoint"),
                    ep_node,
                    "a manifest cannot replace the image's entrypoint: the draft passes it at the front of command, so the image's own entrypoint runs first with it as arguments; check the image's entrypoint runs its arguments (exec \"$@\")",
                );
                let mut all = ep;
                all.extend(cmd.unwrap_or_default());
                Some(all)
            }
            _ => {
                self.warn(
                    &format!("{base}.entrypoint"),
                    ep_node,
                    "clearing the image's entrypoint is not supported; ignored",
                );
                cmd
            }
        }
    }

    fn https_and_ports(&mut self, base: &str, node: &Node, out: &mut Out) {
        let ports_path = format!("{base}.ports");
        let published = match node.get("ports") {
            Some(p) => self.ports(&ports_path, p),
            None => Vec::new(),
        };
        let tcp: Vec<&Published> = published.iter().filter(|p| !p.udp).collect();

        let pick = pick_http_port(&tcp);
        let ports_node = node.get("ports").unwrap_or(node);
        match pick {
            Some((port, guess)) => {
                out.https = Some(port);
                if let Some(why) = guess {
                    self.warn(
                        &ports_path,
                        ports_node,
                        format!("took {port} as the app's HTTP port ({why}): check it serves plain HTTP"),
                    );
                }
            }
            None if tcp.is_empty() => {
                // Behind a reverse proxy compose files only expose the port.
                let exposed = node
                    .get("expose")
                    .map(|e| self.expose_ports(&format!("{base}.expose"), e))
                    .unwrap_or_default();
                if let Some(p) = exposed
                    .iter()
                    .find(|p| HTTP_PORTS.contains(p))
                    .or(exposed.first())
                {
                    out.https = Some(*p);
                    self.note(
                        &format!("{base}.expose"),
                        node.get("expose").unwrap_or(node),
                        format!("no published port: took the exposed port {p} as the app's HTTP port"),
                    );
                } else if let Some(p) = traefik_port(node) {
                    out.https = Some(p);
                    self.note(
                        &format!("{base}.labels"),
                        node.get("labels").unwrap_or(node),
                        format!("took {p} from the traefik labels as the app's HTTP port"),
                    );
                } else {
                    self.warn(
                        base,
                        node,
                        "no HTTP port found: add [https] port = <the port the app serves HTTP on> if it has a web interface",
                    );
                }
            }
            None => self.warn(
                &ports_path,
                ports_node,
                "none of the published ports looks like HTTP: add [https] port = <the port the app serves HTTP on> if it has a web interface",
            ),
        }
        if out.https == Some(443) {
            self.warn(
                &ports_path,
                ports_node,
                "the app's web port is 443, likely TLS inside the app: the device's proxy talks plain HTTP to apps, so use the app's plain HTTP port",
            );
        }

        // The rest: raw ports, on the device's addresses under the container's number.
        for p in &published {
            if !p.udp && Some(p.container) == out.https {
                continue;
            }
            let proto = if p.udp { "udp" } else { "tcp" };
            let public = !p.loopback();
            if public
                && ((!p.udp && (p.container == 80 || p.container == 443))
                    || (p.udp && p.container == 5353))
            {
                self.warn(
                    &ports_path,
                    ports_node,
                    format!(
                        "{}/{proto} dropped: it cannot be public, the device's {} owns it",
                        p.container,
                        if p.udp {
                            "mDNS responder"
                        } else {
                            "HTTPS proxy"
                        }
                    ),
                );
                continue;
            }
            if let Some(h) = p.host.filter(|h| *h != p.container) {
                self.warn(
                    &ports_path,
                    ports_node,
                    format!(
                        "published on host port {h}: Homeport publishes the container port {}/{proto} under its own number",
                        p.container
                    ),
                );
            }
            let port = PortOut {
                port: p.container,
                udp: p.udp,
                public,
            };
            match out
                .ports
                .iter_mut()
                .find(|o| o.port == port.port && o.udp == port.udp)
            {
                Some(o) => o.public |= port.public,
                None => out.ports.push(port),
            }
        }

        if let Some(e) = node.get("expose") {
            let extra: Vec<String> = self
                .expose_ports(&format!("{base}.expose"), e)
                .into_iter()
                .filter(|p| Some(*p) != out.https && !out.ports.iter().any(|o| o.port == *p))
                .map(|p| p.to_string())
                .collect();
            if !extra.is_empty() {
                self.warn(
                    &format!("{base}.expose"),
                    e,
                    format!(
                        "{} not imported: the app's containers share one address and reach each other on localhost; add a [[port]] with access = \"internal\" if the device itself must reach it",
                        extra.join(", ")
                    ),
                );
            }
        }
    }

    fn ports(&mut self, path: &str, node: &Node) -> Vec<Published> {
        let mut out = Vec::new();
        for (i, item) in node.items().into_iter().enumerate() {
            let at = format!("{path}[{i}]");
            let parsed = match &item.kind {
                Kind::Scalar(_) => match self.text(&at, item) {
                    Some(s) => parse_port(&s),
                    None => continue,
                },
                Kind::Map(_) => self.long_port(&at, item),
                _ => Err("not a port mapping".to_string()),
            };
            match parsed {
                Ok(p) => out.extend(p),
                Err(why) => self.warn(&at, item, format!("{why}; dropped")),
            }
        }
        out
    }

    fn long_port(&mut self, path: &str, node: &Node) -> Result<Vec<Published>, String> {
        let target = node
            .get("target")
            .and_then(|t| self.text(&format!("{path}.target"), t))
            .ok_or("no target port")?;
        let container = port_range(&target)?;
        let host = match node
            .get("published")
            .and_then(|p| self.text(&format!("{path}.published"), p))
        {
            Some(h) if !h.is_empty() => Some(port_range(&h)?),
            _ => None,
        };
        let udp = match node.get("protocol").and_then(Node::scalar) {
            None | Some("tcp") => false,
            Some("udp") => true,
            Some(other) => return Err(format!("protocol {other:?} is not supported")),
        };
        let host_ip = node
            .get("host_ip")
            .and_then(Node::scalar)
            .map(str::to_string);
        expand(host_ip, host, container, udp)
    }

    fn expose_ports(&mut self, path: &str, node: &Node) -> Vec<u16> {
        let mut out = Vec::new();
        for item in node.items() {
            let Some(s) = item.scalar() else { continue };
            let s = interpolate(s).value;
            let s = s.split('/').next().unwrap_or("");
            match port_range(s) {
                Ok((a, b)) => out.extend(a..=b.min(a.saturating_add(MAX_RANGE))),
                Err(why) => self.warn(path, item, format!("{why}; ignored")),
            }
        }
        out
    }

    // -- environment ------------------------------------------------------------------------

    fn environment(&mut self, base: &str, node: &Node, has_https: bool) -> Vec<(String, String)> {
        if let Some(f) = node.get("env_file") {
            let files: Vec<&str> = f
                .items()
                .into_iter()
                .filter_map(|i| i.scalar().or_else(|| i.get("path").and_then(Node::scalar)))
                .collect();
            self.warn(
                &format!("{base}.env_file"),
                f,
                format!(
                    "{} not read: copy its variables into [env]",
                    if files.is_empty() {
                        "the file is".to_string()
                    } else {
                        files.join(", ")
                    }
                ),
            );
        }
        let Some(env_node) = node.get("environment") else {
            return Vec::new();
        };
        if !matches!(env_node.kind, Kind::Map(_) | Kind::Seq(_) | Kind::Null) {
            self.warn(
                &format!("{base}.environment"),
                env_node,
                "not a mapping or a list; ignored",
            );
            return Vec::new();
        }
        let mut out: Vec<(String, String)> = Vec::new();
        let inherited = if self.app_services.first() == Some(&self.current) {
            Vec::new()
        } else {
            self.web_env.clone()
        };
        for (name, raw) in env_pairs(node) {
            if inherited.contains(&(name.clone(), raw.clone())) {
                continue; // The app's own, reported there.
            }
            let path = format!("{base}.environment.{name}");
            let at = match &env_node.kind {
                Kind::Map(m) => m
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map_or(env_node, |(_, v)| v),
                _ => env_node,
            };
            if !valid_env_name(&name) {
                self.warn(
                    &path,
                    at,
                    "not a valid variable name for a manifest (letters, digits and _, not starting with a digit); dropped",
                );
                continue;
            }
            let Some(raw) = raw else {
                self.warn(
                    &path,
                    at,
                    "takes its value from the host's environment; not imported: set it in [env]",
                );
                continue;
            };
            let value = match self.template(&path, at, &name, &raw) {
                Some(t) => t,
                None => {
                    let v = self.literal(&path, at, &name, &raw, has_https);
                    if let Some(t) = template_shaped(&v) {
                        self.warn(
                            &path,
                            at,
                            format!(
                                "{t} would be read as a Homeport template; dropped: set it by hand"
                            ),
                        );
                        continue;
                    }
                    v
                }
            };
            if let Some((_, meaning)) = STANDARD_ENV.iter().find(|(n, _)| *n == name) {
                if value == *meaning {
                    self.note(
                        &path,
                        at,
                        format!("left out: Homeport sets {name} to {meaning} itself"),
                    );
                    continue;
                }
            }
            match out.iter_mut().find(|(n, _)| *n == name) {
                Some(e) => e.1 = value,
                None => out.push((name, value)),
            }
        }
        out
    }

    /// A template for a value that refers to the database or the cache, if it does.
    fn template(&mut self, path: &str, at: &Node, name: &str, raw: &str) -> Option<String> {
        let i = interpolate(raw);
        let resolved = i.unresolved.is_empty();
        let value = i.value.as_str();
        let matches =
            |set: &BTreeSet<String>| set.contains(raw) || (resolved && set.contains(value));
        let upper = name.to_ascii_uppercase();
        let host_hint = ["HOST", "SERVER", "ADDR"].iter().any(|h| upper.contains(h));
        let port_hint = upper.contains("PORT");
        let pass_hint = ["PASS", "PWD", "SECRET"].iter().any(|h| upper.contains(h));
        let user_hint = upper.contains("USER") || upper.contains("LOGIN");
        let db_word = ["DB", "DATABASE", "POSTGRES", "MYSQL", "MARIADB", "SQL"]
            .iter()
            .any(|w| upper.contains(w))
            || upper.split('_').any(|t| t.starts_with("PG"));
        let cache_word = ["REDIS", "CACHE", "VALKEY", "KEYDB", "BROKER", "MEMCACHE"]
            .iter()
            .any(|w| upper.contains(w));

        for (prefix, b) in [("database", &self.db), ("cache", &self.cache)] {
            let Some(b) = b else { continue };
            let is_db = prefix == "database";
            // A URL naming the service.
            if let Some(u) = Url::parse(value) {
                if b.has_host(u.host) {
                    let t = if is_db { db_url(&u) } else { cache_url(&u) };
                    if is_db && (u.scheme.contains("mysql") || u.scheme.contains("maria")) {
                        self.warnings.push(located(
                            path,
                            at.line,
                            "a MySQL URL: Homeport provides PostgreSQL, change the scheme to the one the app uses for PostgreSQL",
                        ));
                    }
                    return Some(t);
                }
            }
            // `db`, `db:5432`.
            if b.has_host(value) && host_hint {
                return Some(format!("{{{{{prefix}.host}}}}"));
            }
            if let Some((h, p)) = value.rsplit_once(':') {
                if b.has_host(h) && p.parse::<u16>().is_ok_and(|p| host_hint || p == b.port) {
                    return Some(format!("{{{{{prefix}.host}}}}:{{{{{prefix}.port}}}}"));
                }
            }
            if port_hint && value == b.port.to_string() {
                return Some(format!("{{{{{prefix}.port}}}}"));
            }
            let word = if is_db { db_word } else { cache_word };
            if matches(&b.passwords) && pass_hint && word {
                return Some(format!("{{{{{prefix}.password}}}}"));
            }
            if is_db && matches(&b.users) && user_hint && db_word {
                return Some("{{database.user}}".into());
            }
            if is_db
                && matches(&b.names)
                && db_word
                && !user_hint
                && !pass_hint
                && !host_hint
                && !port_hint
            {
                return Some("{{database.name}}".into());
            }
        }
        None
    }

    /// A value copied as written, with a warning when it still seems to mean a service.
    fn literal(&mut self, path: &str, at: &Node, name: &str, raw: &str, has_https: bool) -> String {
        let i = interpolate(raw);
        let value = self.interp(path, at, raw);
        let resolved = i.unresolved.is_empty();
        let matches =
            |set: &BTreeSet<String>| set.contains(raw) || (resolved && set.contains(&value));
        let mut said = false;
        for (prefix, b) in [("database", &self.db), ("cache", &self.cache)] {
            let Some(b) = b else { continue };
            let what = if prefix == "database" {
                "the database's"
            } else {
                "the cache's"
            };
            let hit = if matches(&b.passwords) {
                Some(("password", "password"))
            } else if prefix == "database" && matches(&b.users) {
                Some(("user", "user"))
            } else if prefix == "database" && matches(&b.names) {
                Some(("database name", "name"))
            } else {
                None
            };
            if let Some((label, var)) = hit {
                self.warnings.push(located(
                    path,
                    at.line,
                    format!(
                        "equals {what} {label} in services.{}; kept as written: if it is that, use \"{{{{{prefix}.{var}}}}}\"",
                        b.service
                    ),
                ));
                said = true;
            }
        }
        // Words naming another service: the database or cache (now Homeport's), or a container
        // of the same app (now on the same address).
        for word in value
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.'))
            .filter(|w| !w.is_empty())
        {
            if said {
                break;
            }
            let lower = word.to_ascii_lowercase();
            for (prefix, b) in [("database", &self.db), ("cache", &self.cache)] {
                let Some(b) = b else { continue };
                // `CACHE_DRIVER=redis` names a kind of service, not the host.
                if b.has_host(&lower)
                    && !matches!(
                        lower.as_str(),
                        "redis" | "postgres" | "postgresql" | "mysql" | "mariadb" | "memcached"
                    )
                {
                    self.warnings.push(located(
                        path,
                        at.line,
                        format!(
                            "{word:?} names services.{}, which Homeport replaces; kept as written: use \"{{{{{prefix}.host}}}}\" if it is its address",
                            b.service
                        ),
                    ));
                    said = true;
                    break;
                }
            }
            if !said
                && !word.eq_ignore_ascii_case(&self.current)
                && self
                    .app_services
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(word))
            {
                self.warnings.push(located(
                    path,
                    at.line,
                    format!(
                        "{word:?} names another service of the app; its containers share one address, so use localhost"
                    ),
                ));
                said = true;
            }
        }
        let upper = name.to_ascii_uppercase();
        if has_https
            && !said
            && (upper.contains("URL") || upper.contains("DOMAIN") || upper.contains("HOST"))
            && (value.starts_with("http://") || value.starts_with("https://"))
        {
            self.note(
                path,
                at,
                "if this is the app's own address, use \"{{https.url}}\" (or \"{{https.hostname}}\" for the host name)",
            );
        }
        value
    }

    // -- volumes ----------------------------------------------------------------------------

    fn mounts(&mut self, base: &str, node: &Node) -> Vec<Mount> {
        let mut out = Vec::new();
        if let Some(t) = node.get("tmpfs") {
            for item in t.items() {
                if let Some(s) = self.text(&format!("{base}.tmpfs"), item) {
                    let path = s.split(':').next().unwrap_or("").to_string();
                    self.tmpfs(&format!("{base}.tmpfs"), item, &path);
                }
            }
        }
        let Some(vols) = node.get("volumes") else {
            return out;
        };
        for (i, item) in vols.items().into_iter().enumerate() {
            let path = format!("{base}.volumes[{i}]");
            let parsed = match &item.kind {
                Kind::Scalar(_) => match self.text(&path, item) {
                    Some(s) => parse_volume(&s),
                    None => continue,
                },
                Kind::Map(_) => self.long_volume(&path, item),
                _ => Err("not a volume".to_string()),
            };
            let m = match parsed {
                Ok(m) => m,
                Err(why) => {
                    self.warn(&path, item, format!("{why}; dropped"));
                    continue;
                }
            };
            if let Err(why) = check_target(&m.target) {
                self.warn(&path, item, format!("{why}; dropped"));
                continue;
            }
            let name = match &m.source {
                Source::Tmpfs => {
                    self.tmpfs(&path, item, &m.target);
                    continue;
                }
                Source::Named(v) => {
                    if let Some((_, decl)) = self.volume_decls.iter().find(|(n, _)| n == v) {
                        let decl = decl.clone();
                        if decl.get("external").is_some_and(Node::is_true) {
                            self.warn(
                                &path,
                                item,
                                format!("volume {v:?} is external: its content is not imported"),
                            );
                        }
                        if decl.get("driver").is_some() || decl.get("driver_opts").is_some() {
                            self.warn(
                                &path,
                                item,
                                format!("volume {v:?} has a driver or driver_opts: Homeport volumes are directories on the device, its content is not imported"),
                            );
                        }
                    }
                    Some(volume_name(v))
                }
                Source::Bind(host) => {
                    if host.ends_with("docker.sock") {
                        self.warn(
                            &path,
                            item,
                            "the Docker socket is not available on Homeport; dropped",
                        );
                        continue;
                    }
                    if m.target == "/etc/localtime" || m.target == "/etc/timezone" {
                        self.warn(
                            &path,
                            item,
                            "the host's time zone is not mounted; dropped: set TZ in [env] instead",
                        );
                        continue;
                    }
                    if looks_like_file(&m.target) {
                        self.warn(
                            &path,
                            item,
                            format!("bind mount of the file {host}: volumes are directories; dropped: put the file into a volume or the image"),
                        );
                        continue;
                    }
                    self.warn(
                        &path,
                        item,
                        format!("bind mount of {host}: becomes an empty volume; the host directory's content is not imported"),
                    );
                    None
                }
                Source::Anonymous => {
                    self.note(
                        &path,
                        item,
                        "anonymous volume: becomes a named volume, kept across restarts and updates",
                    );
                    None
                }
            };
            if m.read_only {
                self.warn(
                    &path,
                    item,
                    "read-only mounts are not supported: the volume is writable",
                );
            }
            if !m.options.is_empty() {
                self.note(
                    &path,
                    item,
                    format!("mount options {} ignored", m.options.join(",")),
                );
            }
            out.push(Mount {
                name,
                target: m.target,
                path,
                line: item.line,
            });
        }
        out
    }

    fn long_volume(&mut self, path: &str, node: &Node) -> Result<MountSpec, String> {
        let ty = node.get("type").and_then(Node::scalar).unwrap_or("volume");
        let target = node
            .get("target")
            .and_then(|t| self.text(&format!("{path}.target"), t))
            .ok_or("no target")?;
        let source = node
            .get("source")
            .and_then(|s| self.text(&format!("{path}.source"), s))
            .filter(|s| !s.is_empty());
        let source = match (ty, source) {
            ("volume", Some(s)) => Source::Named(s),
            ("volume", None) => Source::Anonymous,
            ("bind", Some(s)) => Source::Bind(s),
            ("bind", None) => return Err("a bind mount without a source".into()),
            ("tmpfs", _) => Source::Tmpfs,
            (other, _) => return Err(format!("mounts of type {other:?} are not supported")),
        };
        let mut options = Vec::new();
        for k in ["bind", "volume", "consistency"] {
            if node.get(k).is_some() {
                options.push(k.to_string());
            }
        }
        Ok(MountSpec {
            source,
            target,
            read_only: node.get("read_only").is_some_and(Node::is_true),
            options,
        })
    }

    fn tmpfs(&mut self, path: &str, at: &Node, target: &str) {
        if ["/tmp", "/run"]
            .iter()
            .any(|t| target == *t || target.starts_with(&format!("{t}/")))
        {
            self.note(
                path,
                at,
                format!("{target}: not needed: /tmp and /run are always writable tmpfs"),
            );
        } else {
            self.warn(
                path,
                at,
                format!(
                    "tmpfs at {target} is not supported (only /tmp and /run are tmpfs); dropped"
                ),
            );
        }
    }

    /// Adds a mount to the app's volumes, which every container of the app shares.
    fn add_volume(&mut self, m: Mount, out: &mut Out, web: bool) {
        let (p, line) = (m.path.clone(), m.line);
        if let Some((n, _)) = out.volumes.iter().find(|(_, t)| *t == m.target) {
            if m.name.as_ref().is_none_or(|want| want == n) {
                return; // The same volume, mounted by another container too.
            }
            self.warn_line(
                &p,
                line,
                format!(
                    "{} is already the volume {n:?}: containers share the app's volumes at the same paths; dropped",
                    m.target
                ),
            );
            return;
        }
        let name = match m.name {
            Some(n) => {
                if let Some((_, t)) = out.volumes.iter().find(|(v, _)| *v == n) {
                    self.warn_line(
                        &p,
                        line,
                        format!(
                            "volume {n:?} is mounted at {t} by the app: containers share the app's volumes at the app's paths; dropped"
                        ),
                    );
                    return;
                }
                n
            }
            None => derived_volume_name(&m.target, &out.volumes),
        };
        if !web {
            self.note_line(
                &p,
                line,
                format!(
                    "volume {name:?} is mounted at {} in every container of the app",
                    m.target
                ),
            );
        }
        out.volumes.push((name, m.target));
    }

    // -- resources and health ---------------------------------------------------------------

    fn resources(&mut self, base: &str, node: &Node, out: &mut Out, web: bool) {
        let mut found: Vec<(String, &Node, String)> = Vec::new();
        if let Some(deploy) = node.get("deploy") {
            for (k, v) in deploy.map().unwrap_or(&[]) {
                let path = format!("{base}.deploy.{k}");
                match k.as_str() {
                    "resources" => {
                        for (rk, rv) in rv_map(v) {
                            let rpath = format!("{path}.{rk}");
                            match rk.as_str() {
                                "limits" => {
                                    for (lk, lv) in rv_map(rv) {
                                        found.push((lk.clone(), lv, format!("{rpath}.{lk}")));
                                    }
                                }
                                "reservations" => self.note(
                                    &rpath,
                                    rv,
                                    "not needed: [resources] sets limits; Homeport reserves nothing",
                                ),
                                _ => self.warn(&rpath, rv, "not supported; ignored"),
                            }
                        }
                    }
                    "restart_policy" => self.restart.push(format!("{base} (line {})", v.line)),
                    "replicas" | "mode" => self.warn(
                        &path,
                        v,
                        "an app runs one instance of each container; ignored",
                    ),
                    "labels" => self.note(&path, v, "ignored"),
                    _ => self.warn(&path, v, "not supported (swarm deployment); ignored"),
                }
            }
        }
        for (k, name) in [
            ("mem_limit", "memory"),
            ("cpus", "cpus"),
            ("pids_limit", "pids"),
        ] {
            if let Some(v) = node.get(k) {
                found.push((name.to_string(), v, format!("{base}.{k}")));
            }
        }
        for (key, v, path) in found {
            let Some(text) = self.text(&path, v) else {
                continue;
            };
            if !web {
                self.warn(
                    &path,
                    v,
                    "limits apply to the whole app, set in its [resources]; ignored for this container",
                );
                continue;
            }
            match key.as_str() {
                "memory" => match compose_size(&text) {
                    Some(b) if b >= 4 << 20 => out.memory = Some(size_text(b)),
                    Some(_) => self.warn(&path, v, "below the 4M minimum; ignored"),
                    None => self.warn(&path, v, format!("{text:?} is not a size; ignored")),
                },
                "cpus" => match text.trim().parse::<f64>() {
                    Ok(c) if c > 0.0 && c <= 1024.0 => out.cpus = Some(c),
                    _ => self.warn(
                        &path,
                        v,
                        format!("{text:?} is not a number of cores; ignored"),
                    ),
                },
                "pids" => match text.trim().parse::<i64>() {
                    Ok(n) if n >= 8 => out.pids = u32::try_from(n).ok(),
                    Ok(n) if n <= 0 => self.warn(
                        &path,
                        v,
                        "unlimited is not supported: Homeport's default of 512 applies",
                    ),
                    _ => self.warn(
                        &path,
                        v,
                        format!("{text:?} is not a limit of at least 8; ignored"),
                    ),
                },
                other => self.warn(
                    &path,
                    v,
                    format!("{other} limits are not supported; ignored"),
                ),
            }
        }
    }

    fn healthcheck(&mut self, base: &str, node: &Node, https: Option<u16>) -> Option<HealthOut> {
        let h = node.get("healthcheck")?;
        let path = format!("{base}.healthcheck");
        if h.get("disable").is_some_and(Node::is_true) {
            self.note(&path, h, "disabled; none imported");
            return None;
        }
        let Some(test) = h.get("test") else {
            self.warn(&path, h, "no test; ignored");
            return None;
        };
        let test_path = format!("{path}.test");
        // ["CMD", …], ["CMD-SHELL", "…"] or a string (CMD-SHELL).
        let (shell, argv): (Option<String>, Vec<String>) = match &test.kind {
            Kind::Scalar(_) => (self.text(&test_path, test), Vec::new()),
            Kind::Seq(_) => {
                let w = self.words(&test_path, test).unwrap_or_default();
                match w.split_first() {
                    Some((k, rest)) if k == "CMD" => (None, rest.to_vec()),
                    Some((k, rest)) if k == "CMD-SHELL" => (Some(rest.join(" ")), Vec::new()),
                    Some((k, _)) if k == "NONE" => {
                        self.note(&test_path, test, "NONE: no health check imported");
                        return None;
                    }
                    _ => {
                        self.warn(&test_path, test, "not a CMD or CMD-SHELL test; ignored");
                        return None;
                    }
                }
            }
            _ => {
                self.warn(&test_path, test, "not a test; ignored");
                return None;
            }
        };
        // A shell line that is only one plain command runs as that command.
        let argv = match &shell {
            Some(line) => {
                let line = strip_exit_suffix(line);
                if line.contains(|c: char| "|&;<>$`()\n".contains(c)) {
                    Vec::new()
                } else {
                    shell_split(line).unwrap_or_default()
                }
            }
            None => argv,
        };
        let mut out = HealthOut {
            path: None,
            command: None,
            interval: None,
        };
        if let Some(p) = http_probe(&argv, https) {
            out.path = Some(p);
        } else if let Some(line) = shell {
            out.command = Some(vec!["sh".into(), "-c".into(), line]);
        } else if !argv.is_empty() {
            out.command = Some(argv);
        } else {
            self.warn(&test_path, test, "empty test; ignored");
            return None;
        }
        if let Some(i) = h.get("interval") {
            let ipath = format!("{path}.interval");
            match self.text(&ipath, i).as_deref().and_then(compose_duration) {
                Some(d) => out.interval = Some(d),
                None => self.warn(&ipath, i, "not a duration; Homeport's default applies"),
            }
        }
        let rest: Vec<&str> = h
            .map()
            .unwrap_or(&[])
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| !matches!(*k, "test" | "interval" | "disable"))
            .collect();
        if !rest.is_empty() {
            self.note(
                &path,
                h,
                format!(
                    "{} not imported: Homeport's defaults apply",
                    rest.join(", ")
                ),
            );
        }
        Some(out)
    }

    // -- the keys every app service shares ----------------------------------------------------

    fn common_keys(&mut self, base: &str, node: &Node, web: bool) {
        let Some(map) = node.map() else { return };
        for (key, v) in map {
            let path = format!("{base}.{key}");
            match key.as_str() {
                "restart" => self.restart.push(format!("{base} (line {})", v.line)),
                "depends_on" => self.depends_on(&path, v),
                "networks" | "links" => self.note(
                    &path,
                    v,
                    "not needed: an app's containers share one address; the database and cache have theirs",
                ),
                "labels" => {
                    let keys: Vec<String> = match &v.kind {
                        Kind::Map(m) => m.iter().map(|(k, _)| k.clone()).collect(),
                        Kind::Seq(s) => s
                            .iter()
                            .filter_map(Node::scalar)
                            .map(|s| s.split('=').next().unwrap_or(s).to_string())
                            .collect(),
                        _ => Vec::new(),
                    };
                    if keys.iter().all(|k| k.starts_with("traefik.")) {
                        self.note(
                            &path,
                            v,
                            "traefik labels not needed: the device's proxy serves the app at https://<app>-<device>.local/",
                        );
                    } else {
                        self.warn(&path, v, format!("{} not imported", keys.join(", ")));
                    }
                }
                "network_mode" if !web => {} // containers: handled before
                "network_mode" => self.warn(
                    &path,
                    v,
                    "not supported: every app has its own network namespace and addresses; ignored",
                ),
                k if HANDLED.contains(&k) => {}
                "build" => self.note(
                    &path,
                    v,
                    "not used: Homeport runs the published image",
                ),
                "container_name" | "hostname" => self.note(
                    &path,
                    v,
                    "not needed: Homeport names the app and its host",
                ),
                "logging" => self.note(
                    &path,
                    v,
                    "not needed: Homeport keeps the app's output (homeport logs)",
                ),
                "read_only" => self.note(
                    &path,
                    v,
                    "Homeport always runs apps on a read-only root filesystem: only volumes, /tmp and /run are writable",
                ),
                "stdin_open" | "tty" => self.note(
                    &path,
                    v,
                    "not needed: homeport exec and homeport debug give a terminal",
                ),
                "pull_policy" => self.note(
                    &path,
                    v,
                    "not needed: Homeport pulls at install and pins the image's digest",
                ),
                "platform" => self.note(
                    &path,
                    v,
                    "not needed: Homeport pulls the image for the device's architecture",
                ),
                "cap_drop" => self.note(
                    &path,
                    v,
                    "not needed: Homeport runs apps with a reduced capability set",
                ),
                "cap_add" => {
                    let caps: Vec<&str> = v.items().into_iter().filter_map(Node::scalar).collect();
                    self.warn(
                        &path,
                        v,
                        format!(
                            "{} not granted: Homeport runs apps with a fixed, reduced capability set",
                            caps.join(", ")
                        ),
                    );
                }
                "privileged" if !v.is_true() => {}
                "privileged" => self.warn(&path, v, "privileged containers are not supported"),
                "devices" => self.warn(&path, v, "device access is not supported; ignored"),
                "user" => self.warn(
                    &path,
                    v,
                    "not supported: the app runs as the image's user",
                ),
                "working_dir" => self.warn(
                    &path,
                    v,
                    "not supported: the image's working directory is used",
                ),
                "init" => self.warn(&path, v, "not supported: the command runs as PID 1"),
                "secrets" | "configs" => self.warn(
                    &path,
                    v,
                    "not imported: put the files in a [[volume]] or the values in [env]",
                ),
                "profiles" => {}
                k if k.starts_with("x-") => {}
                "extra_hosts" | "dns" | "dns_search" | "dns_opt" | "domainname"
                | "mac_address" | "external_links" => self.warn(
                    &path,
                    v,
                    "not supported: Homeport sets the app's network names and resolvers; ignored",
                ),
                "mem_reservation" | "memswap_limit" | "mem_swappiness" | "cpu_shares"
                | "cpu_quota" | "cpu_period" | "cpuset" | "cpu_count" | "cpu_percent"
                | "cpu_rt_runtime" | "cpu_rt_period" | "oom_kill_disable" | "oom_score_adj"
                | "blkio_config" | "shm_size" | "ulimits" | "storage_opt" => self.warn(
                    &path,
                    v,
                    "not supported: [resources] has memory, cpus and pids; ignored",
                ),
                "security_opt" | "sysctls" | "ipc" | "pid" | "userns_mode" | "cgroup"
                | "cgroup_parent" | "group_add" | "volumes_from" | "stop_signal"
                | "stop_grace_period" | "isolation" | "runtime" | "scale" | "gpus"
                | "device_cgroup_rules" | "annotations" | "post_start" | "pre_stop"
                | "extends" | "develop" | "attach" | "use_api_socket" | "label_file"
                | "credential_spec" | "uts" | "provider" | "models" => {
                    self.warn(&path, v, "not supported; ignored")
                }
                _ => self.warn(&path, v, "unknown key; ignored"),
            }
        }
    }

    fn depends_on(&mut self, path: &str, v: &Node) {
        let deps: Vec<(String, bool)> = match &v.kind {
            Kind::Seq(s) => s
                .iter()
                .filter_map(Node::scalar)
                .map(|d| (d.to_string(), false))
                .collect(),
            Kind::Map(m) => m
                .iter()
                .map(|(k, c)| (k.clone(), c.get("condition").is_some()))
                .collect(),
            _ => Vec::new(),
        };
        let backing: Vec<&str> = [&self.db, &self.cache]
            .into_iter()
            .flatten()
            .map(|b| b.service.as_str())
            .collect();
        let (shared, others): (Vec<_>, Vec<_>) = deps
            .iter()
            .partition(|(d, _)| backing.contains(&d.as_str()));
        if !shared.is_empty() {
            self.note(
                path,
                v,
                "Homeport has the database and the cache running before the app starts",
            );
        }
        let ordered: Vec<&str> = others
            .iter()
            .filter(|(d, _)| self.app_services.contains(d) && **d != self.current)
            .map(|(d, _)| d.as_str())
            .collect();
        if !ordered.is_empty() {
            let conditions = others.iter().any(|(_, c)| *c);
            self.warn(
                path,
                v,
                format!(
                    "{}{}: an app's containers start together, in no particular order",
                    ordered.join(", "),
                    if conditions { " (with conditions)" } else { "" }
                ),
            );
        }
    }

    // -- other services ---------------------------------------------------------------------

    fn container_service(&mut self, s: &Service, out: &mut Out) {
        let base = format!("services.{}", s.name);
        let node = s.node;
        self.current = s.name.clone();
        if let Some(p) = node.get("profiles") {
            self.warn(
                &base,
                p,
                "has profiles (compose starts it only on request); not imported",
            );
            return;
        }
        if node.get("ports").is_some_and(|p| !p.items().is_empty()) {
            self.warn(
                &base,
                node.get("ports").unwrap_or(node),
                format!(
                    "publishes ports of its own, so it is not a container of this app: import it as an app of its own (homeport import --service {})",
                    s.name
                ),
            );
            return;
        }
        if let Some(m) = node.get("network_mode") {
            let mode = m.scalar().unwrap_or("");
            if !mode.starts_with("service:") {
                self.warn(
                    &base,
                    m,
                    format!("network_mode {mode:?}: not supported; not imported"),
                );
                return;
            }
            self.note(
                &format!("{base}.network_mode"),
                m,
                "not needed: an app's containers share one network namespace",
            );
        }
        let Some(image) = s.image.clone() else {
            self.warn(
                &base,
                node,
                "has no image (only build); not imported: build and push it, then add it as a [[container]]",
            );
            return;
        };
        let mut name = app_name(&s.name);
        let mut n = 2;
        while out.containers.iter().any(|c| c.name == name) || name == out.name {
            name = format!("{}-{n}", app_name(&s.name));
            n += 1;
        }
        if name != s.name {
            self.warn(
                &base,
                node,
                format!("the container is named {name:?} (lower-case letters, digits and dashes)"),
            );
        }
        let image = self.image(&base, node, &image);
        let command = self.command(&base, node);
        let env: Vec<(String, String)> = self
            .environment(&base, node, out.https.is_some())
            .into_iter()
            .filter(|e| !out.env.contains(e))
            .collect();
        for m in self.mounts(&base, node) {
            self.add_volume(m, out, false);
        }
        self.resources(&base, node, out, false);
        if let Some(h) = node.get("healthcheck") {
            self.warn(
                &format!("{base}.healthcheck"),
                h,
                "only the app as a whole has a health check; ignored",
            );
        }
        if let Some(e) = node.get("expose") {
            self.note(
                &format!("{base}.expose"),
                e,
                "not needed: the app's containers reach each other on localhost",
            );
        }
        self.common_keys(&base, node, false);
        out.containers.push(ContainerOut {
            name,
            image: (image != out.image).then_some(image),
            command,
            env,
        });
    }

    fn backing_service(&mut self, s: &Service, role: Role) {
        let base = format!("services.{}", s.name);
        let (chosen, shared) = match role {
            Role::Database(_) => (
                self.db.as_ref().map(|b| b.service.clone()),
                "the device's shared PostgreSQL",
            ),
            _ => (
                self.cache.as_ref().map(|b| b.service.clone()),
                "the app's Redis-compatible cache",
            ),
        };
        if chosen.as_deref() != Some(s.name.as_str()) {
            self.warn(
                &base,
                s.node,
                format!(
                    "dropped: an app gets one {}, and services.{} is it",
                    if matches!(role, Role::Database(_)) {
                        "database"
                    } else {
                        "cache"
                    },
                    chosen.unwrap_or_default()
                ),
            );
            return;
        }
        let image_at = s.node.get("image").unwrap_or(s.node);
        match role {
            Role::Database(DbImage::MariaDb | DbImage::MySql) => self.warn(
                &format!("{base}.image"),
                image_at,
                format!(
                    "{}: Homeport provides PostgreSQL ([database] variant \"sql\"): check that the app supports PostgreSQL and configure it for it",
                    role.what()
                ),
            ),
            Role::Database(DbImage::PostgresWith(ext)) => self.warn(
                &format!("{base}.image"),
                image_at,
                format!("the app may rely on the {ext} extension: check that the device's PostgreSQL has it"),
            ),
            Role::Cache(CacheKind::Memcached) => self.warn(
                &format!("{base}.image"),
                image_at,
                "memcached: Homeport provides a Redis-compatible cache, not the memcached protocol: check that the app can use Redis",
            ),
            _ => {}
        }
        let mut ignored = Vec::new();
        for (key, v) in s.node.map().unwrap_or(&[]) {
            let path = format!("{base}.{key}");
            match key.as_str() {
                "image" => {}
                "environment" => self.warn(
                    &path,
                    v,
                    "dropped: Homeport creates the database, its user and password; the app's references to them become templates",
                ),
                "env_file" => self.warn(&path, v, "not read; dropped"),
                "volumes" => self.warn(
                    &path,
                    v,
                    format!("dropped: the data lives in {shared}; existing data is not imported"),
                ),
                "ports" | "expose" => self.warn(
                    &path,
                    v,
                    format!("dropped: {shared} is reachable only by the app"),
                ),
                "command" | "entrypoint" => self.warn(
                    &path,
                    v,
                    format!("dropped: Homeport configures {shared}"),
                ),
                k if k.starts_with("x-") => {}
                other => ignored.push(other.to_string()),
            }
        }
        if !ignored.is_empty() {
            self.note(
                &base,
                s.node,
                format!(
                    "{} ignored: Homeport runs {shared} itself",
                    ignored.join(", ")
                ),
            );
        }
    }

    fn finish(&mut self) {
        if !self.restart.is_empty() {
            self.notes.push(one_line(format!(
                "restart policies not needed: Homeport always restarts an app's containers ({})",
                self.restart.join(", ")
            )));
        }
        if !self.defaulted.is_empty() {
            self.notes.push(format!(
                "variables not set, their defaults used: {}",
                self.defaulted
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
}

fn rv_map(n: &Node) -> impl Iterator<Item = (&String, &Node)> {
    n.map().unwrap_or(&[]).iter().map(|(k, v)| (k, v))
}

/// `services.web.cap_add: not granted (line 12)`, on one line.
fn located(path: &str, line: usize, msg: impl fmt::Display) -> String {
    one_line(format!("{path}: {msg} (line {line})"))
}

fn one_line(s: String) -> String {
    if s.contains('\n') {
        s.replace('\n', " ")
    } else {
        s
    }
}

/// Environment names the runtime sets for every app with a database or cache.
const STANDARD_ENV: [(&str, &str); 7] = [
    ("DATABASE_URL", "{{database.url}}"),
    ("PGHOST", "{{database.host}}"),
    ("PGPORT", "{{database.port}}"),
    ("PGUSER", "{{database.user}}"),
    ("PGPASSWORD", "{{database.password}}"),
    ("PGDATABASE", "{{database.name}}"),
    ("REDIS_URL", "{{cache.url}}"),
];

/// The first `{{word.word}}` in a text: Homeport fills those in (other `{{…}}` it leaves).
fn template_shaped(text: &str) -> Option<&str> {
    let mut from = 0;
    while let Some(i) = text[from..].find("{{") {
        let start = from + i;
        let end = start + 2 + text[start + 2..].find("}}")?;
        let mut parts = text[start + 2..end].trim().split('.');
        let word = |w: Option<&str>| {
            w.is_some_and(|w| {
                !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            })
        };
        if word(parts.next()) && word(parts.next()) && parts.next().is_none() {
            return Some(&text[start..end + 2]);
        }
        from = start + 2;
    }
    None
}

fn valid_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

// ---------------------------------------------------------------------------------------------
// URLs

#[derive(Debug, PartialEq, Eq)]
struct Url<'a> {
    scheme: &'a str,
    host: &'a str,
    /// The path, with its leading `/`, or empty.
    path: &'a str,
    /// The query, with its leading `?`, or empty.
    query: &'a str,
}

impl<'a> Url<'a> {
    fn parse(s: &'a str) -> Option<Url<'a>> {
        let (scheme, rest) = s.split_once("://")?;
        if scheme.is_empty()
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.:".contains(c))
        {
            return None;
        }
        let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (auth, tail) = rest.split_at(auth_end);
        let hostport = auth.rsplit_once('@').map_or(auth, |(_, h)| h);
        let host = match hostport.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => h,
            _ => hostport,
        };
        let (path, query) = match tail.find('?') {
            Some(q) => tail.split_at(q),
            None => (tail, ""),
        };
        Some(Url {
            scheme,
            host,
            path,
            query,
        })
    }
}

fn db_url(u: &Url) -> String {
    let scheme = u.scheme;
    if matches!(scheme, "postgres" | "postgresql") && u.query.is_empty() {
        return "{{database.url}}".into();
    }
    if scheme.starts_with("jdbc:") {
        // JDBC URLs carry no user information.
        return format!(
            "{scheme}://{{{{database.host}}}}:{{{{database.port}}}}/{{{{database.name}}}}{}",
            u.query
        );
    }
    format!(
        "{scheme}://{{{{database.user}}}}:{{{{database.password}}}}@{{{{database.host}}}}:{{{{database.port}}}}/{{{{database.name}}}}{}",
        u.query
    )
}

fn cache_url(u: &Url) -> String {
    if u.scheme == "redis" && matches!(u.path, "" | "/" | "/0") && u.query.is_empty() {
        return "{{cache.url}}".into();
    }
    let path = if u.path.is_empty() { "/0" } else { u.path };
    format!(
        "{}://:{{{{cache.password}}}}@{{{{cache.host}}}}:{{{{cache.port}}}}{path}{}",
        u.scheme, u.query
    )
}

// ---------------------------------------------------------------------------------------------
// Ports

/// The `[https]` port among published TCP ports: a container port that looks like HTTP (443
/// only as a last resort), else one published on a usual HTTP host port, else the only one;
/// with why, when it is a guess.
fn pick_http_port(tcp: &[&Published]) -> Option<(u16, Option<&'static str>)> {
    if let Some(p) = tcp
        .iter()
        .find(|p| HTTP_PORTS.contains(&p.container) && p.container != 443)
        .or_else(|| tcp.iter().find(|p| p.container == 443))
    {
        return Some((p.container, None));
    }
    if let Some(p) = tcp
        .iter()
        .find(|p| p.host.is_some_and(|h| HTTP_HOST_PORTS.contains(&h)))
    {
        return Some((p.container, Some("published on a usual HTTP port")));
    }
    match tcp {
        [only] => Some((only.container, Some("the only TCP port published"))),
        _ => None,
    }
}

/// A published port, expanded from a range.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Published {
    host_ip: Option<String>,
    host: Option<u16>,
    container: u16,
    udp: bool,
}

impl Published {
    /// Published on the host's loopback only: no LAN client reaches it.
    fn loopback(&self) -> bool {
        self.host_ip
            .as_deref()
            .is_some_and(|ip| ip.starts_with("127.") || ip == "::1" || ip == "localhost")
    }
}

/// The most ports a range may expand to.
const MAX_RANGE: u16 = 64;

/// `[IP:][HOST:]CONTAINER[/PROTOCOL]`, each port possibly a range.
fn parse_port(s: &str) -> Result<Vec<Published>, String> {
    let s = s.trim();
    let (s, udp) = match s.rsplit_once('/') {
        Some((p, "tcp")) => (p, false),
        Some((p, "udp")) => (p, true),
        Some((_, other)) => return Err(format!("protocol {other:?} is not supported")),
        None => (s, false),
    };
    let (ip, rest) = if let Some(r) = s.strip_prefix('[') {
        let (ip, r) = r
            .split_once("]:")
            .ok_or_else(|| format!("{s:?} is not a port mapping"))?;
        (Some(ip), r)
    } else {
        match s.matches(':').count() {
            0 | 1 => (None, s),
            2 => match s.split_once(':') {
                Some((ip, r)) => (Some(ip), r),
                None => (None, s),
            },
            _ => return Err(format!("{s:?} is not a port mapping")),
        }
    };
    let (host, container) = match rest.split_once(':') {
        Some((h, c)) => (Some(h).filter(|h| !h.is_empty()), c),
        None => (None, rest),
    };
    let container = port_range(container)?;
    let host = host.map(port_range).transpose()?;
    expand(
        ip.filter(|i| !i.is_empty()).map(str::to_string),
        host,
        container,
        udp,
    )
}

fn expand(
    host_ip: Option<String>,
    host: Option<(u16, u16)>,
    container: (u16, u16),
    udp: bool,
) -> Result<Vec<Published>, String> {
    let n = container.1 - container.0;
    if n >= MAX_RANGE {
        return Err(format!("a range of {} ports is too many", u32::from(n) + 1));
    }
    // A host range for one container port: compose takes a free one of them.
    if let Some(h) = host {
        if h.1 - h.0 != n && n != 0 {
            return Err("host and container ranges differ in length".into());
        }
    }
    Ok((0..=n)
        .map(|i| Published {
            host_ip: host_ip.clone(),
            host: host.map(|h| h.0 + i),
            container: container.0 + i,
            udp,
        })
        .collect())
}

/// `8080` or `8000-8010`.
fn port_range(s: &str) -> Result<(u16, u16), String> {
    let one = |p: &str| match p.trim().parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{p:?} is not a port")),
    };
    match s.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (one(a)?, one(b)?);
            if a > b {
                return Err(format!("{s:?} is not a port range"));
            }
            Ok((a, b))
        }
        None => one(s).map(|p| (p, p)),
    }
}

// ---------------------------------------------------------------------------------------------
// Volumes

#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Named(String),
    Bind(String),
    Anonymous,
    Tmpfs,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct MountSpec {
    source: Source,
    target: String,
    read_only: bool,
    options: Vec<String>,
}

/// A mount that becomes one of the app's volumes: its name, if the compose file names it.
#[derive(Debug)]
struct Mount {
    name: Option<String>,
    target: String,
    /// Where the compose file mounts it (`services.web.volumes[0]`, line).
    path: String,
    line: usize,
}

/// `[SOURCE:]TARGET[:MODE]`.
fn parse_volume(s: &str) -> Result<MountSpec, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let (source, target, mode) = match parts.as_slice() {
        [t] => (None, *t, None),
        [s, t] => (Some(*s), *t, None),
        [s, t, m] => (Some(*s), *t, Some(*m)),
        _ => return Err(format!("{s:?} is not SOURCE:TARGET[:MODE]")),
    };
    let source = match source.filter(|s| !s.is_empty()) {
        None => Source::Anonymous,
        Some(s) if s.starts_with(['/', '.', '~']) || s.starts_with("${") => {
            Source::Bind(s.to_string())
        }
        Some(s) => Source::Named(s.to_string()),
    };
    let mut read_only = false;
    let mut options = Vec::new();
    for o in mode.unwrap_or("").split(',').filter(|o| !o.is_empty()) {
        match o {
            "ro" => read_only = true,
            "rw" => {}
            other => options.push(other.to_string()),
        }
    }
    Ok(MountSpec {
        source,
        target: target.to_string(),
        read_only,
        options,
    })
}

/// Where a volume may not go: what the manifest refuses.
fn check_target(path: &str) -> Result<(), String> {
    super::check_container_path(path)
}

/// A path that names a file rather than a directory, by its extension.
fn looks_like_file(path: &str) -> bool {
    const EXT: [&str; 24] = [
        "conf",
        "cfg",
        "ini",
        "json",
        "yml",
        "yaml",
        "toml",
        "php",
        "js",
        "env",
        "xml",
        "txt",
        "sh",
        "py",
        "pem",
        "crt",
        "key",
        "sock",
        "db",
        "sqlite",
        "lua",
        "properties",
        "htpasswd",
        "list",
    ];
    let last = path.rsplit('/').next().unwrap_or("");
    match last.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => EXT.contains(&ext.to_ascii_lowercase().as_str()),
        _ => false,
    }
}

/// A compose volume name as a manifest volume name: lower-case letters, digits, `-` and `_`.
fn volume_name(s: &str) -> String {
    let mut out: String = s
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    let out: String = out.trim_matches('-').chars().take(64).collect();
    if out.is_empty() {
        "data".into()
    } else {
        out
    }
}

/// A name for a volume the compose file does not name, from its path in the container:
/// `/etc/pihole` → `pihole`, then `etc-pihole`, then `pihole-2`.
fn derived_volume_name(target: &str, taken: &[(String, String)]) -> String {
    let parts: Vec<&str> = target.split('/').filter(|p| !p.is_empty()).collect();
    let last = volume_name(parts.last().copied().unwrap_or("data"));
    let is_free = |n: &str| !taken.iter().any(|(t, _)| t == n);
    if is_free(&last) {
        return last;
    }
    if parts.len() >= 2 {
        let two = volume_name(&parts[parts.len() - 2..].join("-"));
        if is_free(&two) {
            return two;
        }
    }
    let mut n = 2;
    loop {
        let c = format!("{last}-{n}");
        if is_free(&c) {
            return c;
        }
        n += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Names, sizes, durations, words

/// A service name as an app name: lower-case letters, digits and single dashes, starting with
/// a letter, at most 32 characters.
fn app_name(service: &str) -> String {
    let mut out = String::new();
    for c in service.to_ascii_lowercase().chars() {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if c == '-' && (out.is_empty() || out.ends_with('-')) {
            continue;
        }
        if out.is_empty() && !c.is_ascii_lowercase() {
            continue;
        }
        out.push(c);
    }
    let mut out: String = out.chars().take(super::name::MAX_LEN).collect();
    while out.ends_with('-') {
        out.pop();
    }
    if AppName::try_from(out.as_str()).is_ok() {
        out
    } else {
        "app".into()
    }
}

/// A compose size (`512m`, `1.5G`, `1073741824`) in bytes.
fn compose_size(s: &str) -> Option<u64> {
    let s = s.trim().to_ascii_lowercase();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let mult: u64 = match unit.trim() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return None,
    };
    let n: f64 = num.parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let bytes = n * mult as f64;
    (bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// Bytes as the manifest writes sizes: the largest unit that divides them.
fn size_text(b: u64) -> String {
    if b % (1 << 30) == 0 {
        format!("{}G", b >> 30)
    } else if b % (1 << 20) == 0 {
        format!("{}M", b >> 20)
    } else if b % (1 << 10) == 0 {
        format!("{}K", b >> 10)
    } else {
        b.to_string()
    }
}

const MONTH_MS: f64 = 31.0 * 24.0 * 3_600_000.0;

/// A compose duration (`1m30s`, `30s`, `500ms`) as the manifest writes it (`90s`, `500ms`).
fn compose_duration(s: &str) -> Option<String> {
    let s = s.trim();
    let mut total_ms: u64 = 0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(split);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let n: f64 = num.parse().ok()?;
        let ms = match unit {
            "h" => 3_600_000.0,
            "m" => 60_000.0,
            "s" => 1000.0,
            "ms" => 1.0,
            "us" | "µs" => 0.001,
            "ns" => 0.000_001,
            _ => return None,
        };
        let part = (n * ms).ceil();
        // Beyond a month is no health check interval (and beyond u64 no number).
        if !(0.0..=MONTH_MS).contains(&part) {
            return None;
        }
        total_ms = total_ms
            .checked_add(part as u64)
            .filter(|t| *t as f64 <= MONTH_MS)?;
        rest = next;
    }
    if total_ms == 0 {
        return None;
    }
    Some(if total_ms % 1000 == 0 {
        format!("{}s", total_ms / 1000)
    } else {
        format!("{total_ms}ms")
    })
}

/// Splits a command line as a POSIX shell would, without expanding anything.
fn shell_split(s: &str) -> Result<Vec<String>, &'static str> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err("unterminated single quote"),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => cur.push(c),
                            Some('\n') => {}
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => return Err("unterminated double quote"),
                        },
                        Some(c) => cur.push(c),
                        None => return Err("unterminated double quote"),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some('\n') => {}
                    Some(c) => cur.push(c),
                    None => cur.push('\\'),
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// `curl -f http://localhost:8000/health || exit 1` → `curl -f http://localhost:8000/health`.
fn strip_exit_suffix(line: &str) -> &str {
    let t = line.trim();
    for suffix in ["|| exit 1", "||exit 1", "|| exit", "|| false"] {
        if let Some(s) = t.strip_suffix(suffix) {
            return s.trim_end();
        }
    }
    t
}

/// The path of a health check that is only `curl`/`wget` of a local URL on the `[https]` port.
fn http_probe(argv: &[String], https: Option<u16>) -> Option<String> {
    let https = https?;
    let prog = argv.first()?;
    if !matches!(prog.rsplit('/').next(), Some("curl" | "wget")) {
        return None;
    }
    let mut url = None;
    let mut i = 1;
    while i < argv.len() {
        let a = argv[i].as_str();
        if a.starts_with("http://") {
            if url.is_some() {
                return None;
            }
            url = Some(a);
        } else if matches!(a, "-o" | "-O" | "--output" | "--output-document") {
            i += 1; // its argument (/dev/null, -)
        } else if !a.starts_with('-') {
            return None;
        }
        i += 1;
    }
    let rest = url?.strip_prefix("http://")?;
    let (hostport, path) = match rest.find('/') {
        Some(p) => rest.split_at(p),
        None => (rest, "/"),
    };
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        let (h, p) = h.split_once(']')?;
        (h, p.strip_prefix(':'))
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if !matches!(host, "localhost" | "127.0.0.1" | "0.0.0.0" | "::1") {
        return None;
    }
    let port = match port {
        Some(p) => p.parse::<u16>().ok()?,
        None => 80,
    };
    (port == https).then(|| path.to_string())
}

// ---------------------------------------------------------------------------------------------
// TOML

fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn list(v: &[String]) -> String {
    format!(
        "[{}]",
        v.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ")
    )
}

fn render(out: &Out, service: &str, warnings: &[String], notes: &[String]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# Homeport manifest draft, imported from the docker-compose service {}.",
        q(service)
    );
    let _ = writeln!(
        t,
        "# Review the warnings, then check it with `homeport validate`."
    );
    if !warnings.is_empty() || !notes.is_empty() {
        t.push_str("#\n");
    }
    for w in warnings {
        let _ = writeln!(t, "# warning: {w}");
    }
    for n in notes {
        let _ = writeln!(t, "# note: {n}");
    }
    t.push('\n');
    let _ = writeln!(t, "name = {}", q(&out.name));
    let _ = writeln!(t, "image = {}", q(&out.image));
    if let Some(c) = &out.command {
        let _ = writeln!(t, "command = {}", list(c));
    }
    if let Some(p) = out.https {
        let _ = writeln!(t, "\n[https]\nport = {p}");
    }
    if let Some(v) = out.database {
        let _ = writeln!(
            t,
            "\n[database]\nvariant = {}\npermissions = \"full\"",
            q(v)
        );
    }
    if out.cache {
        let _ = writeln!(t, "\n[cache]\nvariant = \"redis\"");
    }
    for (name, path) in &out.volumes {
        let _ = writeln!(t, "\n[[volume]]\nname = {}\npath = {}", q(name), q(path));
    }
    if !out.env.is_empty() {
        t.push_str("\n[env]\n");
        for (k, v) in &out.env {
            let _ = writeln!(t, "{k} = {}", q(v));
        }
    }
    if out.memory.is_some() || out.cpus.is_some() || out.pids.is_some() {
        t.push_str("\n[resources]\n");
        if let Some(m) = &out.memory {
            let _ = writeln!(t, "memory = {}", q(m));
        }
        if let Some(c) = out.cpus {
            let _ = writeln!(t, "cpus = {c:?}");
        }
        if let Some(p) = out.pids {
            let _ = writeln!(t, "pids = {p}");
        }
    }
    for p in &out.ports {
        let _ = writeln!(
            t,
            "\n[[port]]\nport = {}\nprotocol = \"{}\"\naccess = \"{}\"",
            p.port,
            if p.udp { "udp" } else { "tcp" },
            if p.public { "public" } else { "internal" }
        );
    }
    if let Some(h) = &out.health {
        t.push_str("\n[health]\n");
        if let Some(p) = &h.path {
            let _ = writeln!(t, "path = {}", q(p));
        }
        if let Some(c) = &h.command {
            let _ = writeln!(t, "command = {}", list(c));
        }
        if let Some(i) = &h.interval {
            let _ = writeln!(t, "interval = {}", q(i));
        }
    }
    for c in &out.containers {
        let _ = writeln!(t, "\n[[container]]\nname = {}", q(&c.name));
        if let Some(i) = &c.image {
            let _ = writeln!(t, "image = {}", q(i));
        }
        if let Some(cmd) = &c.command {
            let _ = writeln!(t, "command = {}", list(cmd));
        }
        if !c.env.is_empty() {
            t.push_str("\n[container.env]\n");
            for (k, v) in &c.env {
                let _ = writeln!(t, "{k} = {}", q(v));
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    // -- the schema a draft targets, strictly: an unknown key or a wrong type fails ----------

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Schema {
        name: String,
        image: String,
        #[allow(dead_code)]
        command: Option<Vec<String>>,
        https: Option<SHttps>,
        database: Option<SDatabase>,
        cache: Option<SCache>,
        #[serde(default)]
        volume: Vec<SVolume>,
        #[serde(default)]
        env: BTreeMap<String, String>,
        resources: Option<SResources>,
        #[serde(default)]
        port: Vec<SPort>,
        health: Option<SHealth>,
        #[serde(default)]
        container: Vec<SContainer>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct SHttps {
        port: u16,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct SDatabase {
        variant: String,
        permissions: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct SCache {
        variant: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct SVolume {
        name: String,
        path: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct SResources {
        memory: Option<String>,
        cpus: Option<f64>,
        pids: Option<u32>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct SPort {
        port: u16,
        protocol: String,
        access: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct SHealth {
        path: Option<String>,
        command: Option<Vec<String>>,
        interval: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct SContainer {
        name: String,
        image: Option<String>,
        command: Option<Vec<String>>,
        #[serde(default)]
        env: BTreeMap<String, String>,
    }

    const VARIABLES: [&str; 15] = [
        "app.name",
        "app.address",
        "app.ipv4",
        "https.url",
        "https.hostname",
        "database.host",
        "database.port",
        "database.name",
        "database.user",
        "database.password",
        "database.url",
        "cache.host",
        "cache.port",
        "cache.password",
        "cache.url",
    ];

    /// Parses a draft as the manifest schema and checks what the manifest parser will check.
    fn schema(toml_text: &str) -> Schema {
        let s: Schema = toml::from_str(toml_text)
            .unwrap_or_else(|e| panic!("draft is not a manifest: {e}\n{toml_text}"));
        AppName::try_from(s.name.as_str()).unwrap();
        s.image.parse::<ImageRef>().unwrap();
        for v in &s.volume {
            assert!(
                !v.name.is_empty()
                    && v.name.len() <= 64
                    && v.name.chars().all(|c| c.is_ascii_lowercase()
                        || c.is_ascii_digit()
                        || c == '-'
                        || c == '_'),
                "volume name {:?}",
                v.name
            );
            check_target(&v.path).unwrap();
        }
        if let Some(d) = &s.database {
            assert!(["postgres", "sql"].contains(&d.variant.as_str()));
            assert_eq!(d.permissions, "full");
        }
        if let Some(c) = &s.cache {
            assert_eq!(c.variant, "redis");
        }
        for p in &s.port {
            assert!(["tcp", "udp"].contains(&p.protocol.as_str()));
            assert!(["public", "internal"].contains(&p.access.as_str()));
            if p.access == "public" {
                assert!(!(p.protocol == "tcp" && [80, 443].contains(&p.port)));
            }
            assert!(!(p.protocol == "tcp" && s.https.as_ref().is_some_and(|h| h.port == p.port)));
        }
        if let Some(r) = &s.resources {
            if let Some(m) = &r.memory {
                assert!(
                    super::super::parse_size(m).is_some_and(|b| b >= 4 << 20),
                    "{m}"
                );
            }
            assert!(r.cpus.is_none_or(|c| c > 0.0));
            assert!(r.pids.is_none_or(|p| p >= 8));
        }
        if let Some(h) = &s.health {
            assert!(h.path.is_some() != h.command.is_some());
            assert!(h.path.is_none() || s.https.is_some());
            if let Some(i) = &h.interval {
                let unit = i.trim_start_matches(|c: char| c.is_ascii_digit());
                assert!(unit.len() < i.len() && ["ms", "s"].contains(&unit), "{i}");
            }
        }
        let envs = s
            .env
            .iter()
            .chain(s.container.iter().flat_map(|c| c.env.iter()));
        for (k, v) in envs {
            assert!(valid_env_name(k), "{k}");
            // As the manifest reads them: `{{word.word}}` is a template, other braces are text.
            let mut rest = v.as_str();
            while let Some(t) = template_shaped(rest) {
                let var = t[2..t.len() - 2].trim();
                assert!(VARIABLES.contains(&var), "{k} = {v}");
                let section = var.split('.').next().unwrap_or("");
                let present = match section {
                    "https" => s.https.is_some(),
                    "database" => s.database.is_some(),
                    "cache" => s.cache.is_some(),
                    _ => true,
                };
                assert!(present, "{k} = {v} needs [{section}]");
                rest = rest.split_once(t).map_or("", |(_, r)| r);
            }
        }
        for c in &s.container {
            AppName::try_from(c.name.as_str()).unwrap();
            if let Some(i) = &c.image {
                i.parse::<ImageRef>().unwrap();
            }
            assert!(c.command.as_ref().is_none_or(|c| !c.is_empty()));
        }
        s
    }

    fn draft(yaml: &str) -> (Draft, Schema) {
        draft_for(yaml, None)
    }

    fn draft_for(yaml: &str, service: Option<&str>) -> (Draft, Schema) {
        let d = import(yaml, service).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        // Every warning and note heads the draft too.
        for w in &d.warnings {
            assert!(d.toml.contains(&format!("# warning: {w}\n")), "{w}");
        }
        for n in &d.notes {
            assert!(d.toml.contains(&format!("# note: {n}\n")), "{n}");
        }
        let s = schema(&d.toml);
        // And the manifest parser itself takes it.
        if let Err(e) = super::super::Manifest::parse(&d.toml) {
            panic!("{e}\n{}", d.toml);
        }
        (d, s)
    }

    fn has(list: &[String], needle: &str) -> bool {
        list.iter().any(|w| w.contains(needle))
    }

    #[track_caller]
    fn warned(d: &Draft, needle: &str) {
        assert!(
            has(&d.warnings, needle),
            "no warning with {needle:?} in\n{}",
            d.warnings.join("\n")
        );
    }

    #[track_caller]
    fn noted(d: &Draft, needle: &str) {
        assert!(
            has(&d.notes, needle),
            "no note with {needle:?} in\n{}",
            d.notes.join("\n")
        );
    }

    // -- the fixtures -----------------------------------------------------------------------

    #[test]
    fn fixtures_give_valid_drafts() {
        for (file, yaml) in [
            ("cloud", include_str!("../../tests/compose/cloud.yml")),
            ("docs", include_str!("../../tests/compose/docs.yml")),
            ("dns", include_str!("../../tests/compose/dns.yml")),
            ("blog", include_str!("../../tests/compose/blog.yml")),
        ] {
            let (d, _) = draft(yaml);
            assert!(d.toml.starts_with("# Homeport manifest draft"), "{file}");
            // The draft is stable: the same file gives the same text.
            assert_eq!(import(yaml, None).unwrap(), d, "{file}");
        }
        let e = import(include_str!("../../tests/compose/malformed.yml"), None).unwrap_err();
        assert!(matches!(e, ImportError::Yaml { line: 5, .. }), "{e}");
    }

    // -- YAML -------------------------------------------------------------------------------

    #[test]
    fn yaml_errors_are_located() {
        let e = import("services:\n  web:\n    image: a\n     ports: []\n", None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("malformed yaml at line 4, column"),
            "{e}"
        );
        let e = import("services:\n  web:\n    image: a\n    image: b\n", None).unwrap_err();
        assert!(e.to_string().contains("line 4"), "{e}");
        assert!(e.to_string().contains("duplicated key"), "{e}");
        let e = import("services:\n  web: nginx\n", None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2: services.web: must be a mapping (image, ports, …)"
        );
        let e = import("- a\n- b\n", None).unwrap_err();
        assert!(
            e.to_string()
                .contains("must be a mapping with a services key"),
            "{e}"
        );
        let e = import("services: [a]\n", None).unwrap_err();
        assert!(e.to_string().contains("services: must be a mapping"), "{e}");
        let deep = format!("services: {}{}", "[".repeat(100), "]".repeat(100));
        assert!(import(&deep, None)
            .unwrap_err()
            .to_string()
            .contains("nested deeper"));
        let bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n";
        assert!(matches!(import(bomb, None), Err(ImportError::Yaml { .. })));
    }

    #[test]
    fn no_services() {
        for yaml in [
            "",
            "# nothing\n",
            "services: {}\n",
            "version: '3'\n",
            "services:\n",
        ] {
            assert_eq!(import(yaml, None), Err(ImportError::NoServices), "{yaml:?}");
        }
    }

    #[test]
    fn merge_keys_and_anchors() {
        let (_, s) = draft(
            "x-env: &env\n  A: from-anchor\n  B: from-anchor\nx-more: &more\n  B: second\n  C: second\nservices:\n  web:\n    image: app:1\n    ports: ['80:80']\n    environment:\n      <<: [*env, *more]\n      A: own\n",
        );
        assert_eq!(s.env["A"], "own", "explicit keys win");
        assert_eq!(s.env["B"], "from-anchor", "earlier merges win");
        assert_eq!(s.env["C"], "second");
    }

    // -- interpolation ------------------------------------------------------------------------

    #[test]
    fn interpolation() {
        for (raw, value, unresolved, defaulted) in [
            ("plain", "plain", &[][..], &[][..]),
            ("${A}", "${A}", &["A"][..], &[][..]),
            ("$A/x", "${A}/x", &["A"], &[]),
            ("${A:-def}", "def", &[], &["A"]),
            ("${A-def}", "def", &[], &["A"]),
            ("x${A:-${B:-in}}y", "xiny", &[], &["B", "A"]),
            ("${A:-${B}}", "${B}", &["B"], &["A"]),
            ("${A:?must be set}", "${A}", &["A"], &[]),
            ("${A?err}", "${A}", &["A"], &[]),
            ("${A:+alt}", "", &[], &["A"]),
            ("$$HOME and $$", "$HOME and $", &[], &[]),
            ("costs $5", "costs $5", &[], &[]),
            ("${open", "${open", &[], &[]),
        ] {
            let i = interpolate(raw);
            assert_eq!(i.value, value, "{raw}");
            assert_eq!(i.unresolved, unresolved, "{raw}");
            assert_eq!(i.defaulted, defaulted, "{raw}");
        }
    }

    #[test]
    fn unresolved_variables_are_reported_and_defaults_noted() {
        let (d, s) = draft(
            "services:\n  web:\n    image: app:${TAG:-1.2}\n    ports: ['${PORT:-8080}:80']\n    environment:\n      SECRET: ${SECRET}\n      LEVEL: ${LEVEL:-info}\n",
        );
        assert_eq!(s.image, "docker.io/library/app:1.2");
        assert_eq!(s.https.unwrap().port, 80);
        assert_eq!(s.env["SECRET"], "${SECRET}");
        assert_eq!(s.env["LEVEL"], "info");
        warned(&d, "services.web.environment.SECRET: ${SECRET} not set");
        noted(&d, "defaults used: LEVEL, PORT, TAG");

        // An image that stays invalid is kept as written, with a warning.
        let d = import(
            "services:\n  web:\n    image: app:${TAG}\n    ports: ['80:80']\n",
            None,
        )
        .unwrap();
        warned(&d, "services.web.image: ${TAG} not set");
        warned(&d, "invalid image reference");
    }

    // -- environment ------------------------------------------------------------------------

    const BACKING: &str = "services:
  db:
    image: postgres:16
    hostname: pg
    networks:
      back:
        aliases: [database]
    environment:
      POSTGRES_USER: app
      POSTGRES_PASSWORD: pw
      POSTGRES_DB: appdb
  cache:
    image: valkey/valkey:8
    command: [valkey-server, --requirepass, cachepw]
  web:
    image: app:1
    ports: ['8080:8080']
    links: ['db:legacy-db']
    environment:
";

    /// The env value a draft gets for `name: value` in the web service next to [`BACKING`].
    fn env(name: &str, value: &str) -> (Option<String>, Draft) {
        let yaml = format!("{BACKING}      {name}: {value}\n");
        let (d, s) = draft(&yaml);
        (s.env.get(name).cloned(), d)
    }

    #[test]
    fn env_values_naming_the_database_or_cache_become_templates() {
        for (name, value, expected) in [
            ("DB_HOST", "db", "{{database.host}}"),
            ("DB_HOST", "DB", "{{database.host}}"),
            ("DB_HOST", "pg", "{{database.host}}"),
            ("DB_HOST", "database", "{{database.host}}"),
            ("DB_HOST", "legacy-db", "{{database.host}}"),
            ("DB_HOST", "${DB_HOST:-db}", "{{database.host}}"),
            ("DB_SERVER", "db:5432", "{{database.host}}:{{database.port}}"),
            ("DB_PORT", "'5432'", "{{database.port}}"),
            ("DB_USER", "app", "{{database.user}}"),
            ("POSTGRES_USERNAME", "app", "{{database.user}}"),
            ("DB_PASSWORD", "pw", "{{database.password}}"),
            ("DB_PASS", "pw", "{{database.password}}"),
            ("DB_NAME", "appdb", "{{database.name}}"),
            ("POSTGRES_DB", "appdb", "{{database.name}}"),
            ("DB_URL", "postgres://app:pw@db:5432/appdb", "{{database.url}}"),
            ("DB_URL", "postgresql://db/appdb", "{{database.url}}"),
            (
                "DB_URL",
                "postgresql://app:pw@db:5432/appdb?sslmode=disable",
                "postgresql://{{database.user}}:{{database.password}}@{{database.host}}:{{database.port}}/{{database.name}}?sslmode=disable",
            ),
            (
                "SQLALCHEMY_URL",
                "postgresql+psycopg2://app:pw@db/appdb",
                "postgresql+psycopg2://{{database.user}}:{{database.password}}@{{database.host}}:{{database.port}}/{{database.name}}",
            ),
            (
                "JDBC_URL",
                "jdbc:postgresql://db:5432/appdb",
                "jdbc:postgresql://{{database.host}}:{{database.port}}/{{database.name}}",
            ),
            ("REDIS_HOST", "cache", "{{cache.host}}"),
            ("REDIS_PORT", "6379", "{{cache.port}}"),
            ("REDIS_PASSWORD", "cachepw", "{{cache.password}}"),
            ("CACHE_ADDR", "cache:6379", "{{cache.host}}:{{cache.port}}"),
            ("UPSTREAM", "db:5432", "{{database.host}}:{{database.port}}"),
            ("BROKER", "redis://:cachepw@cache:6379/0", "{{cache.url}}"),
            ("BROKER", "redis://cache", "{{cache.url}}"),
            (
                "BROKER",
                "redis://cache:6379/2",
                "redis://:{{cache.password}}@{{cache.host}}:{{cache.port}}/2",
            ),
            (
                "BROKER",
                "rediss://cache:6379",
                "rediss://:{{cache.password}}@{{cache.host}}:{{cache.port}}/0",
            ),
        ] {
            let (got, d) = env(name, value);
            assert_eq!(got.as_deref(), Some(expected), "{name}: {value}\n{:?}", d.warnings);
        }
    }

    #[test]
    fn env_values_that_merely_look_alike_are_kept_with_a_warning() {
        for (name, value, warning) in [
            // Same value, but nothing says it means the database.
            ("APP_NAME", "appdb", "equals the database's database name"),
            ("ADMIN_USER", "app", "equals the database's user"),
            ("ADMIN_PASSWORD", "pw", "equals the database's password"),
            ("SESSION_KEY", "cachepw", "equals the cache's password"),
            // A host name without a host-like variable name.
            ("UPSTREAM", "db", "\"db\" names services.db"),
            ("DSN", "host=db port=5432", "\"db\" names services.db"),
            // An image name, not an address: the port is not the database's.
            ("SIDECAR_IMAGE", "db:16", "\"db\" names services.db"),
        ] {
            let (got, d) = env(name, value);
            assert_eq!(got.as_deref(), Some(value), "{name}");
            warned(&d, &format!("services.web.environment.{name}: "));
            warned(&d, warning);
        }
        // Literal values are copied.
        for (name, value) in [
            ("TZ", "Europe/Berlin"),
            ("DEBUG", "'false'"),
            ("RATIO", "1.10"),
            ("EMPTY", "''"),
            ("PORT", "5433"),
        ] {
            let (got, d) = env(name, value);
            let want = value.trim_matches('\'');
            assert_eq!(got.as_deref(), Some(want), "{name}");
            assert!(
                !has(&d.warnings, &format!("environment.{name}")),
                "{:?}",
                d.warnings
            );
        }
    }

    #[test]
    fn env_templating_follows_interpolated_references() {
        // Both sides read the same variable: the app's value is the database's.
        let (d, s) = draft(
            "services:\n  db:\n    image: mariadb:11\n    environment:\n      MARIADB_USER: ${DB_USER}\n      MARIADB_PASSWORD: ${DB_PASSWORD}\n      MARIADB_DATABASE: ${DB_NAME:-shop}\n  shop:\n    image: shop:2\n    ports: ['80:80']\n    environment:\n      - SHOP_DB_USER=${DB_USER}\n      - SHOP_DB_PASSWORD=${DB_PASSWORD}\n      - SHOP_DB_NAME=shop\n      - SHOP_DB_HOST=db:3306\n      - SHOP_DB_PORT=3306\n      - SHOP_DSN=mysql://u:p@db:3306/shop\n",
        );
        assert_eq!(s.env["SHOP_DB_USER"], "{{database.user}}");
        assert_eq!(s.env["SHOP_DB_PASSWORD"], "{{database.password}}");
        assert_eq!(s.env["SHOP_DB_NAME"], "{{database.name}}");
        assert_eq!(s.env["SHOP_DB_HOST"], "{{database.host}}:{{database.port}}");
        assert_eq!(s.env["SHOP_DB_PORT"], "{{database.port}}");
        assert_eq!(
            s.env["SHOP_DSN"],
            "mysql://{{database.user}}:{{database.password}}@{{database.host}}:{{database.port}}/{{database.name}}"
        );
        assert!(!has(&d.warnings, "not set"), "{:?}", d.warnings);
        warned(&d, "SHOP_DSN: a MySQL URL");
        assert_eq!(s.database.unwrap().variant, "sql");
        warned(
            &d,
            "services.db.image: a MariaDB database: Homeport provides PostgreSQL",
        );
    }

    #[test]
    fn standard_env_is_left_to_the_runtime() {
        let (got, d) = env("DATABASE_URL", "postgres://app:pw@db:5432/appdb");
        assert_eq!(got, None);
        noted(&d, "Homeport sets DATABASE_URL to {{database.url}} itself");
        let (got, _) = env("PGHOST", "db");
        assert_eq!(got, None);
        let (got, _) = env("REDIS_URL", "redis://:cachepw@cache:6379");
        assert_eq!(got, None);
        // A value of the user's own stays.
        let (got, _) = env("PGHOST", "elsewhere.example.org");
        assert_eq!(got.as_deref(), Some("elsewhere.example.org"));
    }

    #[test]
    fn cache_named_after_its_kind() {
        // `CACHE_DRIVER=redis` names a driver, not the host `redis`.
        let (d, s) = draft(
            "services:\n  redis:\n    image: redis:7\n  web:\n    image: app:1\n    ports: ['8000:8000']\n    environment:\n      CACHE_DRIVER: redis\n      REDIS_HOST: redis\n",
        );
        assert_eq!(s.env["CACHE_DRIVER"], "redis");
        assert_eq!(s.env["REDIS_HOST"], "{{cache.host}}");
        assert!(!has(&d.warnings, "CACHE_DRIVER"), "{:?}", d.warnings);
    }

    #[test]
    fn env_forms_and_odd_entries() {
        let (d, s) = draft(
            "services:\n  web:\n    image: app:1\n    ports: ['80:80']\n    env_file: [.env, {path: extra.env}]\n    environment:\n      - A=1\n      - B\n      - C=x=y\n      - A=2\n      - bad-name=1\n      - T={{.Name}} {{ app.x }}\n      - GO={{.Name}}\n      - PEER=http://worker:9000\n  worker:\n    image: app:1\n",
        );
        assert_eq!(s.env["A"], "2", "the last one wins, as in compose");
        assert_eq!(s.env["C"], "x=y");
        assert!(!s.env.contains_key("B") && !s.env.contains_key("bad-name"));
        warned(&d, "services.web.env_file: .env, extra.env not read");
        warned(
            &d,
            "environment.B: takes its value from the host's environment",
        );
        warned(&d, "environment.bad-name: not a valid variable name");
        assert!(!s.env.contains_key("T"));
        warned(
            &d,
            "environment.T: {{ app.x }} would be read as a Homeport template; dropped",
        );
        assert_eq!(s.env["GO"], "{{.Name}}", "not a template's shape: kept");
        warned(
            &d,
            "environment.PEER: \"worker\" names another service of the app",
        );
    }

    #[test]
    fn app_address_gets_a_hint() {
        let (d, s) = draft(
            "services:\n  web:\n    image: app:1\n    ports: ['80:80']\n    environment:\n      BASE_URL: https://app.example.com\n",
        );
        assert_eq!(s.env["BASE_URL"], "https://app.example.com");
        noted(
            &d,
            "environment.BASE_URL: if this is the app's own address, use \"{{https.url}}\"",
        );
    }

    // -- ports ------------------------------------------------------------------------------

    #[test]
    fn port_syntax() {
        let p = |host_ip: Option<&str>, host: Option<u16>, container: u16, udp: bool| Published {
            host_ip: host_ip.map(str::to_string),
            host,
            container,
            udp,
        };
        for (input, expected) in [
            ("80", vec![p(None, None, 80, false)]),
            ("8080:80", vec![p(None, Some(8080), 80, false)]),
            (
                "127.0.0.1:8080:80/tcp",
                vec![p(Some("127.0.0.1"), Some(8080), 80, false)],
            ),
            ("[::1]:8080:80", vec![p(Some("::1"), Some(8080), 80, false)]),
            ("0.0.0.0::80", vec![p(Some("0.0.0.0"), None, 80, false)]),
            ("53:53/udp", vec![p(None, Some(53), 53, true)]),
            (
                "6000-6001:7000-7001",
                vec![
                    p(None, Some(6000), 7000, false),
                    p(None, Some(6001), 7001, false),
                ],
            ),
            ("9000-9010:80", vec![p(None, Some(9000), 80, false)]),
        ] {
            assert_eq!(parse_port(input), Ok(expected), "{input}");
        }
        for bad in [
            "80/sctp", "1:2:3:4", "70000", "http", "8080:0", "81-80", "1-1000", "80:80-81",
        ] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
    }

    /// The `[https]` port and `[[port]]`s a web service with these `ports` gets.
    fn ports(ports: &str, extra: &str) -> (Option<u16>, Vec<(u16, String, String)>, Draft) {
        let (d, s) = draft(&format!(
            "services:\n  web:\n    image: app:1\n    ports: {ports}\n{extra}"
        ));
        let raw = s
            .port
            .into_iter()
            .map(|p| (p.port, p.protocol, p.access))
            .collect();
        (s.https.map(|h| h.port), raw, d)
    }

    #[test]
    fn the_https_port_is_the_first_that_looks_like_http() {
        for (list, https) in [
            ("['9000:9000', '8080:80']", Some(80)),
            ("['8081:8080', '3000:3000']", Some(8080)),
            ("['443:443', '80:80']", Some(80)),
            ("[{target: 5000, published: 5000}]", Some(5000)),
        ] {
            let (got, _, d) = ports(list, "");
            assert_eq!(got, https, "{list}");
            assert!(!has(&d.warnings, "took"), "{list}: {:?}", d.warnings);
        }
        // Guesses say so.
        let (got, _, d) = ports("['2283:2283']", "");
        assert_eq!(got, Some(2283));
        warned(
            &d,
            "took 2283 as the app's HTTP port (the only TCP port published)",
        );
        let (got, _, d) = ports("['80:8096', '1900:1900/udp', '7359:7359/udp']", "");
        assert_eq!(got, Some(8096));
        warned(&d, "published on a usual HTTP port");
        // TLS inside.
        let (got, _, d) = ports("['8443:443']", "");
        assert_eq!(got, Some(443));
        warned(&d, "likely TLS inside the app");
        // Nothing HTTP-like.
        let (got, raw, d) = ports("['9000:9000', '9001:9001']", "");
        assert_eq!(got, None);
        assert_eq!(raw.len(), 2);
        warned(&d, "none of the published ports looks like HTTP");
    }

    #[test]
    fn without_published_ports_expose_or_traefik_names_the_web_port() {
        let (got, _, d) = ports("[]", "    expose: ['9000', '3000']\n");
        assert_eq!(got, Some(3000));
        noted(&d, "took the exposed port 3000");
        warned(&d, "services.web.expose: 9000 not imported");
        let (got, _, d) = ports(
            "[]",
            "    labels:\n      - traefik.enable=true\n      - traefik.http.services.web.loadbalancer.server.port=8123\n",
        );
        assert_eq!(got, Some(8123));
        noted(&d, "from the traefik labels");
        noted(&d, "traefik labels not needed");
        let (got, _, d) = ports("[]", "");
        assert_eq!(got, None);
        warned(&d, "no HTTP port found");
    }

    #[test]
    fn raw_ports_keep_their_number_and_the_device_ports_stay_the_devices() {
        let (https, raw, d) = ports(
            "['80:80', '8443:443', '5353:5353/udp', '127.0.0.1:9100:9100', '2222:22', '53:53/udp', '53:53/udp']",
            "",
        );
        assert_eq!(https, Some(80));
        assert_eq!(
            raw,
            [
                (9100, "tcp".to_string(), "internal".to_string()),
                (22, "tcp".into(), "public".into()),
                (53, "udp".into(), "public".into()),
            ]
        );
        warned(
            &d,
            "443/tcp dropped: it cannot be public, the device's HTTPS proxy owns it",
        );
        warned(
            &d,
            "5353/udp dropped: it cannot be public, the device's mDNS responder owns it",
        );
        warned(
            &d,
            "published on host port 2222: Homeport publishes the container port 22/tcp",
        );
        let (_, _, d) = ports("['80:80', 'x:y', '1-2000:1-2000']", "");
        warned(&d, "services.web.ports[1]: \"y\" is not a port; dropped");
        warned(
            &d,
            "services.web.ports[2]: a range of 2000 ports is too many; dropped",
        );
    }

    // -- choosing the web service -----------------------------------------------------------

    #[test]
    fn choosing_the_web_service() {
        let two = "services:\n  a:\n    image: a:1\n    ports: ['80:80']\n  b:\n    image: b:1\n    ports: ['8080:8080']\n  db:\n    image: postgres\n";
        assert_eq!(
            import(two, None),
            Err(ImportError::Ambiguous {
                candidates: "a, b".into()
            })
        );
        assert_eq!(
            import(two, None).unwrap_err().to_string(),
            "several services could be the app's web service (a, b): choose one with --service"
        );
        let (d, s) = draft_for(two, Some("b"));
        assert_eq!(s.name, "b");
        assert!(s.container.is_empty());
        warned(&d, "services.a: publishes ports of its own");
        assert_eq!(
            import(two, Some("c")).unwrap_err().to_string(),
            "no service \"c\" in the compose file (it has a, b, db)"
        );
        assert_eq!(
            import(two, Some("db")).unwrap_err().to_string(),
            "service \"db\" is a PostgreSQL database, which Homeport provides itself: import the service that uses it"
        );
        assert!(matches!(
            import(
                "services:\n  db:\n    image: postgres\n  cache:\n    image: redis\n",
                None
            ),
            Err(ImportError::NoApp { .. })
        ));
        // Several services without ports: ambiguous; one without ports next to the web one: a
        // container.
        assert!(matches!(
            import("services:\n  a:\n    image: a\n  b:\n    image: b\n", None),
            Err(ImportError::Ambiguous { .. })
        ));
        let (_, s) = draft("services:\n  only:\n    image: a\n");
        assert_eq!(s.name, "only");
        // A reverse proxy is not the app.
        let (d, s) = draft(
            "services:\n  proxy:\n    image: traefik:v3\n    ports: ['80:80', '443:443']\n  app:\n    image: app:1\n    expose: ['8000']\n",
        );
        assert_eq!(s.name, "app");
        assert_eq!(s.https.unwrap().port, 8000);
        warned(&d, "services.proxy: dropped: a reverse proxy");
        // The web service must have an image.
        assert_eq!(
            import(
                "services:\n  web:\n    build: .\n    ports: ['80:80']\n",
                None
            ),
            Err(ImportError::NoImage {
                service: "web".into(),
                line: 3
            })
        );
    }

    #[test]
    fn app_names_are_sanitized() {
        for (service, name) in [
            ("web", "web"),
            ("My_App.Web", "my-app-web"),
            ("9lives", "lives"),
            ("a--b", "a-b"),
            ("___", "app"),
            (
                "a-really-long-service-name-that-goes-on-and-on",
                "a-really-long-service-name-that",
            ),
        ] {
            assert_eq!(app_name(service), name, "{service}");
        }
        let (d, s) = draft("services:\n  My_Wiki:\n    image: wiki:1\n    ports: ['80:80']\n");
        assert_eq!(s.name, "my-wiki");
        warned(&d, "the app is named \"my-wiki\"");
    }

    // -- database and cache services ----------------------------------------------------------

    #[test]
    fn database_and_cache_services_are_replaced_with_warnings_for_what_they_drop() {
        let (d, s) = draft(
            "services:\n  pg:\n    image: postgis/postgis:16-3.4\n    ports: ['5432:5432']\n    volumes: [pg:/var/lib/postgresql/data]\n    environment: {POSTGRES_PASSWORD: x}\n    env_file: db.env\n    command: postgres -c max_connections=200\n    restart: always\n    healthcheck: {test: pg_isready}\n    x-note: ignored silently\n  mc:\n    image: memcached:1.6\n  old:\n    image: mysql:8\n  web:\n    image: app:1\n    ports: ['80:80']\n",
        );
        assert_eq!(s.database.unwrap().variant, "postgres");
        assert_eq!(s.cache.unwrap().variant, "redis");
        for w in [
            "services.pg.image: the app may rely on the postgis extension",
            "services.pg.ports: dropped",
            "services.pg.volumes: dropped: the data lives in the device's shared PostgreSQL",
            "services.pg.environment: dropped",
            "services.pg.env_file: not read",
            "services.pg.command: dropped",
            "services.mc.image: memcached: Homeport provides a Redis-compatible cache",
            "services.old: dropped: an app gets one database, and services.pg is it",
        ] {
            warned(&d, w);
        }
        noted(&d, "services.pg: restart, healthcheck ignored");
        // MySQL alone: variant sql.
        let (d, s) = draft("services:\n  db:\n    image: docker.io/library/mysql:8.4\n  web:\n    image: app:1\n    ports: ['80:80']\n");
        assert_eq!(s.database.unwrap().variant, "sql");
        warned(&d, "a MySQL database: Homeport provides PostgreSQL");
    }

    #[test]
    fn images_are_recognised_by_their_last_path_component() {
        for (image, role) in [
            ("postgres", Role::Database(DbImage::Postgres)),
            ("docker.io/library/postgres:16-alpine", Role::Database(DbImage::Postgres)),
            ("bitnami/postgresql:16", Role::Database(DbImage::Postgres)),
            ("registry.example.com:5000/mirror/mariadb:11@sha256:0000000000000000000000000000000000000000000000000000000000000000", Role::Database(DbImage::MariaDb)),
            ("ghcr.io/valkey-io/valkey:8", Role::Cache(CacheKind::Redis)),
            ("eqalpha/keydb", Role::Cache(CacheKind::Redis)),
            ("memcached:alpine", Role::Cache(CacheKind::Memcached)),
            ("redis-commander", Role::App),
            ("postgres-exporter", Role::App),
            ("nextcloud:29", Role::App),
            ("${IMAGE}", Role::App),
        ] {
            assert_eq!(classify(image), role, "{image}");
        }
    }

    // -- keys that do not translate ---------------------------------------------------------

    #[test]
    fn every_untranslated_key_is_a_warning_or_a_note() {
        let (d, s) = draft(
            "services:
  web:
    image: app:1
    build: .
    container_name: the-app
    hostname: app
    user: '1000:1000'
    working_dir: /srv
    entrypoint: [/docker-entrypoint.sh, --verbose]
    command: serve
    ports: ['80:80']
    cap_add: [NET_ADMIN, SYS_TIME]
    cap_drop: [ALL]
    privileged: true
    devices: ['/dev/ttyUSB0:/dev/ttyUSB0']
    network_mode: host
    networks: [front]
    tmpfs: [/tmp, /cache]
    read_only: true
    restart: unless-stopped
    labels: {com.example.team: web}
    logging: {driver: json-file}
    secrets: [key]
    sysctls: {net.core.somaxconn: 1024}
    security_opt: ['no-new-privileges:true']
    ulimits: {nofile: 65536}
    extra_hosts: ['host.docker.internal:host-gateway']
    shm_size: 1gb
    init: true
    stdin_open: true
    tty: true
    stop_grace_period: 1m
    pull_policy: always
    platform: linux/arm64
    frobnicate: yes
    x-custom: fine
    deploy:
      replicas: 2
      restart_policy: {condition: on-failure}
      placement: {constraints: [node.role == manager]}
      resources:
        limits: {memory: 256M, pids: 64}
        reservations: {memory: 128M}
    healthcheck:
      test: curl -f http://localhost/ready && test -f /ok
      interval: 1m30s
      start_period: 10s
",
        );
        assert_eq!(
            d.toml.lines().find(|l| l.starts_with("command")),
            Some("command = [\"/docker-entrypoint.sh\", \"--verbose\", \"serve\"]")
        );
        let r = s.resources.unwrap();
        assert_eq!((r.memory.as_deref(), r.pids), (Some("256M"), Some(64)));
        let h = s.health.unwrap();
        assert_eq!(
            h.command.unwrap(),
            ["sh", "-c", "curl -f http://localhost/ready && test -f /ok"]
        );
        assert_eq!(h.interval.as_deref(), Some("90s"));
        for w in [
            "services.web.user: not supported",
            "services.web.working_dir: not supported",
            "services.web.entrypoint: a manifest cannot replace the image's entrypoint",
            "services.web.cap_add: NET_ADMIN, SYS_TIME not granted",
            "services.web.privileged: privileged containers are not supported",
            "services.web.devices: device access is not supported",
            "services.web.network_mode: not supported",
            "services.web.tmpfs: tmpfs at /cache is not supported",
            "services.web.labels: com.example.team not imported",
            "services.web.secrets: not imported",
            "services.web.sysctls: not supported",
            "services.web.security_opt: not supported",
            "services.web.ulimits: not supported",
            "services.web.extra_hosts: not supported",
            "services.web.shm_size: not supported",
            "services.web.init: not supported",
            "services.web.stop_grace_period: not supported",
            "services.web.frobnicate: unknown key",
            "services.web.deploy.replicas: an app runs one instance",
            "services.web.deploy.placement: not supported",
        ] {
            warned(&d, w);
        }
        for n in [
            "services.web.build: not used",
            "services.web.container_name: not needed",
            "services.web.hostname: not needed",
            "services.web.cap_drop: not needed",
            "services.web.networks: not needed",
            "services.web.tmpfs: /tmp: not needed",
            "services.web.read_only: Homeport always runs apps on a read-only root filesystem",
            "services.web.logging: not needed",
            "services.web.stdin_open: not needed",
            "services.web.tty: not needed",
            "services.web.pull_policy: not needed",
            "services.web.platform: not needed",
            "services.web.deploy.resources.reservations: not needed",
            "services.web.healthcheck: start_period not imported",
            "restart policies not needed: Homeport always restarts an app's containers (services.web (line 39), services.web (line 20))",
        ] {
            noted(&d, n);
        }
        assert!(!has(&d.warnings, "x-custom") && !has(&d.notes, "x-custom"));
        // Lines point at the key.
        warned(&d, "services.web.cap_add: NET_ADMIN, SYS_TIME not granted: Homeport runs apps with a fixed, reduced capability set (line 12)");
    }

    #[test]
    fn top_level_keys() {
        let (d, _) = draft(
            "version: '3.9'\nname: proj\nservices:\n  web:\n    image: a\n    ports: ['80:80']\nnetworks: {front: {}}\nsecrets: {key: {file: ./key}}\nconfigs: {}\ninclude: [other.yml]\nx-anchors: {}\nbogus: 1\n",
        );
        noted(&d, "name: the compose project's name is not used");
        noted(&d, "networks: not needed");
        warned(&d, "secrets: not imported");
        warned(&d, "configs: not imported");
        warned(&d, "include: included compose files are not read");
        warned(&d, "bogus: unknown top-level key");
        assert!(!has(&d.warnings, "version") && !has(&d.notes, "version"));
    }

    // -- volumes ----------------------------------------------------------------------------

    #[test]
    fn volumes() {
        let (d, s) = draft(
            "services:
  web:
    image: app:1
    ports: ['80:80']
    volumes:
      - app_data:/var/lib/app
      - ./config:/etc/app/config
      - /srv/backup/config:/backup/config
      - /var/cache/app
      - uploads:/uploads:ro,z
      - type: volume
        source: Media.Files
        target: /media
      - type: bind
        source: ./nginx.conf
        target: /etc/nginx/nginx.conf
      - /var/run/docker.sock:/var/run/docker.sock
      - /etc/localtime:/etc/localtime:ro
      - ext:/ext
      - relative:data
      - proc:/proc/sys
      - type: tmpfs
        target: /run/cache
      - type: npipe
        source: x
        target: /y
volumes:
  app_data:
  uploads:
  Media.Files:
  ext:
    external: true
",
        );
        let vols: Vec<(&str, &str)> = s
            .volume
            .iter()
            .map(|v| (v.name.as_str(), v.path.as_str()))
            .collect();
        assert_eq!(
            vols,
            [
                ("app_data", "/var/lib/app"),
                ("config", "/etc/app/config"),
                ("backup-config", "/backup/config"),
                ("app", "/var/cache/app"),
                ("uploads", "/uploads"),
                ("media-files", "/media"),
                ("ext", "/ext"),
            ]
        );
        for w in [
            "volumes[1]: bind mount of ./config: becomes an empty volume",
            "volumes[4]: read-only mounts are not supported",
            "volumes[6]: bind mount of the file ./nginx.conf",
            "volumes[7]: the Docker socket is not available",
            "volumes[8]: the host's time zone is not mounted",
            "volumes[9]: volume \"ext\" is external",
            "volumes[10]: \"data\" must be an absolute path inside the container",
            "volumes[11]: \"/proc/sys\" is reserved for the runtime",
            "volumes[13]: mounts of type \"npipe\" are not supported",
        ] {
            warned(&d, w);
        }
        noted(&d, "volumes[3]: anonymous volume");
        noted(&d, "volumes[4]: mount options z ignored");
        noted(&d, "volumes[12]: /run/cache: not needed");
        // Read-only is not reported for a mount that is dropped anyway.
        assert!(!has(&d.warnings, "volumes[8]: read-only"));
    }

    #[test]
    fn containers_share_the_apps_volumes() {
        let (d, s) = draft(
            "services:\n  web:\n    image: app:1\n    ports: ['80:80']\n    volumes: [data:/data, ./logs:/logs]\n  worker:\n    image: app:1\n    command: work\n    volumes: [data:/data, ./logs:/logs, spool:/spool, data2:/data, data:/elsewhere]\n",
        );
        let vols: Vec<&str> = s.volume.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(vols, ["data", "logs", "spool"]);
        noted(
            &d,
            "services.worker.volumes[2]: volume \"spool\" is mounted at /spool in every container",
        );
        warned(
            &d,
            "services.worker.volumes[3]: /data is already the volume \"data\"",
        );
        warned(
            &d,
            "services.worker.volumes[4]: volume \"data\" is mounted at /data by the app",
        );
    }

    #[test]
    fn volume_names() {
        for (input, name) in [
            ("data", "data"),
            ("Media.Files", "media-files"),
            ("a b/c", "a-b-c"),
            ("--", "data"),
            ("db_data", "db_data"),
        ] {
            assert_eq!(volume_name(input), name, "{input}");
        }
        let taken = vec![("config".to_string(), "/a/config".to_string())];
        assert_eq!(derived_volume_name("/b/config", &taken), "b-config");
        let taken = vec![
            ("config".to_string(), "/a/config".to_string()),
            ("b-config".to_string(), "/x".to_string()),
        ];
        assert_eq!(derived_volume_name("/b/config", &taken), "config-2");
        assert_eq!(derived_volume_name("/etc/dnsmasq.d", &[]), "dnsmasq-d");
        for (path, file) in [
            ("/etc/nginx/nginx.conf", true),
            ("/app/config.php", true),
            ("/etc/dnsmasq.d", false),
            ("/srv/.config", false),
            ("/var/lib/app", false),
        ] {
            assert_eq!(looks_like_file(path), file, "{path}");
        }
    }

    // -- containers -------------------------------------------------------------------------

    #[test]
    fn other_services_become_containers() {
        let (d, s) = draft_for(
            "services:
  web:
    image: app:1
    ports: ['80:80']
    environment: {SHARED: same, MODE: web, SECRET: '${S}'}
  worker:
    image: docker.io/library/app:1
    command: [work, --queue, default]
    environment: {SHARED: same, MODE: worker, SECRET: '${S}'}
    depends_on:
      web: {condition: service_healthy}
    healthcheck: {test: [CMD, true]}
    mem_limit: 1g
  Cron_Job:
    image: cron:2
    entrypoint: /cron.sh
  admin:
    image: adminer
    ports: ['8081:8080']
  host:
    image: monitor
    network_mode: host
  sidecar:
    image: helper
    network_mode: service:web
  dev:
    build: ./dev
  debug:
    image: busybox
    profiles: [debug]
",
            Some("web"),
        );
        let c: Vec<(&str, Option<&str>, String)> = s
            .container
            .iter()
            .map(|c| {
                let cmd = c.command.as_ref().map(|c| c.join(" ")).unwrap_or_default();
                (c.name.as_str(), c.image.as_deref(), cmd)
            })
            .collect();
        assert_eq!(
            c,
            [
                ("worker", None, "work --queue default".into()),
                (
                    "cron-job",
                    Some("docker.io/library/cron:2"),
                    "/cron.sh".into()
                ),
                (
                    "sidecar",
                    Some("docker.io/library/helper:latest"),
                    String::new()
                ),
            ]
        );
        // Only what differs from the app's environment.
        assert_eq!(
            s.container[0].env,
            BTreeMap::from([("MODE".to_string(), "worker".to_string())])
        );
        // The shared unresolved variable is reported once, for the app.
        assert_eq!(
            d.warnings
                .iter()
                .filter(|w| w.contains("${S} not set"))
                .count(),
            1,
            "{:?}",
            d.warnings
        );
        for w in [
            "services.worker.depends_on: web (with conditions): an app's containers start together",
            "services.worker.healthcheck: only the app as a whole has a health check",
            "services.worker.mem_limit: limits apply to the whole app",
            "services.Cron_Job: the container is named \"cron-job\"",
            "services.Cron_Job.entrypoint: a manifest cannot replace",
            "services.admin: publishes ports of its own",
            "services.host: network_mode \"host\": not supported",
            "services.dev: has no image",
            "services.debug: has profiles",
        ] {
            warned(&d, w);
        }
        noted(&d, "services.sidecar.network_mode: not needed");
    }

    // -- health checks ----------------------------------------------------------------------

    #[test]
    fn health_checks() {
        let check = |test: &str, port: u16| -> (Option<SHealth>, Draft) {
            let (d, s) = draft(&format!(
                "services:\n  web:\n    image: app:1\n    ports: ['{port}:{port}']\n    healthcheck:\n      test: {test}\n"
            ));
            (s.health, d)
        };
        for (test, port, path) in [
            ("[CMD, curl, -f, 'http://localhost/']", 80, "/"),
            (
                "[CMD, curl, -fsS, 'http://localhost:8080/health']",
                8080,
                "/health",
            ),
            (
                "[CMD, curl, --fail, -o, /dev/null, 'http://127.0.0.1:3000']",
                3000,
                "/",
            ),
            (
                "[CMD, wget, -q, --spider, 'http://localhost:8000/ping?x=1']",
                8000,
                "/ping?x=1",
            ),
            (
                "[CMD-SHELL, 'curl -f http://localhost:5000/ || exit 1']",
                5000,
                "/",
            ),
            (
                "'wget -qO- http://[::1]:8080/status || exit 1'",
                8080,
                "/status",
            ),
        ] {
            let (h, d) = check(test, port);
            let h = h.unwrap_or_else(|| panic!("{test}: {:?}", d.warnings));
            assert_eq!(h.path.as_deref(), Some(path), "{test}");
        }
        for (test, port, command) in [
            ("[CMD, pg_isready]", 80, vec!["pg_isready"]),
            // Another port than the app's web port: run the command itself.
            (
                "[CMD, curl, -f, 'http://localhost:9000/']",
                80,
                vec!["curl", "-f", "http://localhost:9000/"],
            ),
            (
                "[CMD, curl, -H, 'Host: x', 'http://localhost/']",
                80,
                vec!["curl", "-H", "Host: x", "http://localhost/"],
            ),
            (
                "[CMD-SHELL, 'test -f /ready || exit 1']",
                80,
                vec!["sh", "-c", "test -f /ready || exit 1"],
            ),
        ] {
            let (h, _) = check(test, port);
            assert_eq!(
                h.and_then(|h| h.command),
                Some(command.iter().map(|s| s.to_string()).collect()),
                "{test}"
            );
        }
        let (h, d) = check("[NONE]", 80);
        assert!(h.is_none());
        noted(&d, "NONE: no health check imported");
        let (h, d) = check("[FOO, x]", 80);
        assert!(h.is_none());
        warned(&d, "not a CMD or CMD-SHELL test");
        let (d, s) = draft("services:\n  web:\n    image: app:1\n    ports: ['80:80']\n    healthcheck:\n      disable: true\n");
        assert!(s.health.is_none());
        noted(&d, "healthcheck: disabled");
        let (d, s) = draft("services:\n  web:\n    image: app:1\n    ports: ['80:80']\n    healthcheck:\n      test: [CMD, 'true']\n      interval: soon\n");
        assert!(s.health.unwrap().interval.is_none());
        warned(&d, "healthcheck.interval: not a duration");
    }

    // -- resources --------------------------------------------------------------------------

    #[test]
    fn resources() {
        let res = |keys: &str| {
            let (d, s) = draft(&format!(
                "services:\n  web:\n    image: app:1\n    ports: ['80:80']\n{keys}"
            ));
            let r = s.resources.map(|r| (r.memory, r.cpus, r.pids));
            (r, d)
        };
        let (r, _) = res("    deploy:\n      resources:\n        limits:\n          memory: 1.5G\n          cpus: '0.75'\n");
        assert_eq!(r, Some((Some("1536M".into()), Some(0.75), None)));
        let (r, _) = res("    mem_limit: 268435456\n    cpus: 2\n    pids_limit: 100\n");
        assert_eq!(r, Some((Some("256M".into()), Some(2.0), Some(100))));
        let (r, d) = res("    mem_limit: 1m\n    cpus: lots\n    pids_limit: -1\n");
        assert_eq!(r, None);
        warned(&d, "mem_limit: below the 4M minimum");
        warned(&d, "cpus: \"lots\" is not a number of cores");
        warned(&d, "pids_limit: unlimited is not supported");
        for (input, bytes) in [
            ("512m", Some(512 << 20)),
            ("1g", Some(1 << 30)),
            ("1.5GB", Some(3 << 29)),
            ("100000", Some(100_000)),
            ("64 MiB", Some(64 << 20)),
            ("lots", None),
            ("-1m", None),
        ] {
            assert_eq!(compose_size(input), bytes, "{input}");
        }
        for (b, text) in [
            (1 << 30, "1G"),
            (1536 << 20, "1536M"),
            (6 << 10, "6K"),
            (100_000, "100000"),
        ] {
            assert_eq!(size_text(b), text);
        }
        for (input, out) in [
            ("30s", Some("30s")),
            ("1m30s", Some("90s")),
            ("1h", Some("3600s")),
            ("500ms", Some("500ms")),
            ("1.5s", Some("1500ms")),
            ("0s", None),
            ("", None),
            ("10x", None),
            ("99999999999999999999999h", None),
        ] {
            assert_eq!(compose_duration(input).as_deref(), out, "{input}");
        }
    }

    // -- small parsers ------------------------------------------------------------------------

    #[test]
    fn shell_words() {
        for (line, words) in [
            ("a b  c", &["a", "b", "c"][..]),
            (
                "sh -c 'echo hi && exit 1'",
                &["sh", "-c", "echo hi && exit 1"],
            ),
            (r#"say "a \"b\" c" d\ e"#, &["say", "a \"b\" c", "d e"]),
            ("empty '' \"\"", &["empty", "", ""]),
            ("", &[]),
        ] {
            assert_eq!(shell_split(line).unwrap(), words, "{line}");
        }
        assert!(shell_split("it's").is_err());
        assert!(shell_split("\"open").is_err());
        let (d, s) = draft(
            "services:\n  web:\n    image: app:1\n    ports: ['80:80']\n    command: echo 'oops\n",
        );
        assert!(d.toml.lines().all(|l| !l.starts_with("command")), "{s:?}");
        warned(&d, "services.web.command: cannot split");
        let (d, s) =
            draft("services:\n  web:\n    image: app:1\n    ports: ['80:80']\n    command: []\n");
        assert!(d.toml.lines().all(|l| !l.starts_with("command")), "{s:?}");
        noted(&d, "services.web.command: empty: the image's is used");
    }

    #[test]
    fn urls() {
        let u = Url::parse("postgresql+asyncpg://u:p@db:5432/name?ssl=false").unwrap();
        assert_eq!(
            (u.scheme, u.host, u.path, u.query),
            ("postgresql+asyncpg", "db", "/name", "?ssl=false")
        );
        let u = Url::parse("redis://cache").unwrap();
        assert_eq!((u.host, u.path, u.query), ("cache", "", ""));
        assert!(Url::parse("db:5432").is_none());
        assert!(Url::parse("://x").is_none());
    }
}
