//! The device's clock on the appliance: chrony keeps it right.
//!
//! Decision: chrony (`chronyd`), supervised by the agent like dhcpcd, rather than an SNTP
//! client of our own or busybox's `ntpd`: it is what Debian, Fedora and RHEL run, it is
//! maintained, it filters and combines several servers, steps a clock that is far off at
//! start (`makestep`) and slews afterwards, keeps the drift across reboots and keeps the
//! hardware clock in step (`rtcsync`). A wrong clock breaks what the device checks
//! (certificates, signed OS update metadata and its expiry), and a Raspberry Pi has no
//! hardware clock at all: homeport-init moves the clock forward to the image's build time or
//! the last shutdown before anything starts, and chrony does the rest once the network is up.
//!
//! The servers are the owner's setting ([`SETTING`], `PUT /v1/system/time`); the agent writes
//! chrony's configuration from it into `/run` (the root is read-only) and restarts chronyd
//! when it changes. The status comes from `chronyc -c tracking`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::appliance::Supervised;
use crate::store::Store;

/// The setting holding the servers, as a JSON [`TimeSettings`].
pub const SETTING: &str = "time";
/// The servers of a device whose owner named none.
pub const DEFAULT_SERVERS: [&str; 1] = ["pool.ntp.org"];
/// At most this many servers (chrony asks each; more only adds traffic).
pub const MAX_SERVERS: usize = 8;

const CHRONYD: &str = "/usr/sbin/chronyd";
const CHRONYC: &str = "/usr/bin/chronyc";
const CONF: &str = "/run/homeport/chrony.conf";

#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("{0:?} is not an NTP server: use a host name or an IP address, optionally with :PORT (like pool.ntp.org, 192.168.1.1 or [fd00::1]:123)")]
    BadServer(String),
    #[error("name at least one NTP server")]
    NoServers,
    #[error("at most {MAX_SERVERS} NTP servers")]
    TooManyServers,
    #[error("NTP server {0} is named twice")]
    Duplicate(String),
    #[error("the clock is the host's in host mode: the appliance alone sets its time servers")]
    NotAppliance,
    #[error("write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An NTP server: a host name or an IP address, and a port when it is not 123.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NtpServer {
    host: String,
    port: Option<u16>,
}

impl NtpServer {
    /// Pools (`*pool.ntp.org`) are asked for several addresses; other names are one server.
    fn is_pool(&self) -> bool {
        self.host == "pool.ntp.org" || self.host.ends_with(".pool.ntp.org")
    }
}

impl FromStr for NtpServer {
    type Err = ClockError;

    fn from_str(s: &str) -> Result<Self, ClockError> {
        let bad = || ClockError::BadServer(s.to_string());
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            // [v6] or [v6]:port
            let (addr, after) = rest.split_once(']').ok_or_else(bad)?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(bad)?),
            };
            addr.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
            (addr, port)
        } else if s.parse::<std::net::Ipv6Addr>().is_ok() {
            (s, None)
        } else {
            match s.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        let port = match port {
            None => None,
            Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad)?),
        };
        let ip = host.parse::<std::net::IpAddr>().is_ok();
        if !ip && !is_host_name(host) {
            return Err(bad());
        }
        Ok(NtpServer {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// A DNS name: dot-separated labels of letters, digits and inner dashes, not all digits
/// at the end (that would be a malformed IPv4 address).
fn is_host_name(s: &str) -> bool {
    let labels: Vec<&str> = s.split('.').collect();
    (1..=253).contains(&s.len())
        && labels.iter().all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
        && labels
            .last()
            .is_some_and(|l| !l.bytes().all(|b| b.is_ascii_digit()))
}

impl fmt::Display for NtpServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v6 = self.host.contains(':');
        match (self.port, v6) {
            (None, _) => f.write_str(&self.host),
            (Some(p), true) => write!(f, "[{}]:{p}", self.host),
            (Some(p), false) => write!(f, "{}:{p}", self.host),
        }
    }
}

impl TryFrom<String> for NtpServer {
    type Error = ClockError;
    fn try_from(s: String) -> Result<Self, ClockError> {
        s.parse()
    }
}

impl From<NtpServer> for String {
    fn from(s: NtpServer) -> String {
        s.to_string()
    }
}

/// The owner's time settings (`PUT /v1/system/time`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeSettings {
    pub servers: Vec<NtpServer>,
}

impl Default for TimeSettings {
    fn default() -> Self {
        TimeSettings {
            servers: DEFAULT_SERVERS
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect(),
        }
    }
}

impl TimeSettings {
    pub fn validate(&self) -> Result<(), ClockError> {
        if self.servers.is_empty() {
            return Err(ClockError::NoServers);
        }
        if self.servers.len() > MAX_SERVERS {
            return Err(ClockError::TooManyServers);
        }
        for (i, s) in self.servers.iter().enumerate() {
            if self.servers[..i].contains(s) {
                return Err(ClockError::Duplicate(s.to_string()));
            }
        }
        Ok(())
    }
}

/// chrony's configuration for these servers, keeping its drift in `state`.
pub fn chrony_conf(settings: &TimeSettings, state: &Path) -> String {
    let mut out = String::from(
        "# Written by homeportd from the owner's time settings (homeport time; GET/PUT\n\
         # /v1/system/time). Changes here are lost at the next change or reboot.\n",
    );
    for s in &settings.servers {
        let kind = if s.is_pool() { "pool" } else { "server" };
        out.push_str(&format!("{kind} {}", s.host));
        if let Some(p) = s.port {
            out.push_str(&format!(" port {p}"));
        }
        out.push_str(" iburst\n");
    }
    out.push_str(&format!(
        "driftfile {}\n\
         # Step a clock that is more than 1 s off during the first updates (a device without\n\
         # a hardware clock starts at its last shutdown), slew it afterwards.\n\
         makestep 1 3\n\
         # Keep the hardware clock in step (the kernel's 11-minute mode).\n\
         rtcsync\n\
         # The device serves no time, and chronyc talks through the Unix socket only.\n\
         cmdport 0\n",
        state.join("chrony.drift").display()
    ));
    out
}

/// What `GET /v1/system/time` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimeStatus {
    /// The device's clock (UTC, RFC 3339).
    pub now: String,
    /// Whether chrony has a source it trusts and follows it.
    pub synchronized: bool,
    /// The server followed (its address), when synchronized.
    pub source: Option<String>,
    pub stratum: Option<u8>,
    /// How far the clock is from the source's time (positive: ahead).
    pub offset_seconds: Option<f64>,
    pub servers: Vec<NtpServer>,
    /// Why the status is incomplete (chronyd not running, say).
    pub problem: Option<String>,
}

/// What `chronyc -c tracking` says.
#[derive(Debug, Clone, PartialEq)]
pub struct Tracking {
    pub source: Option<String>,
    pub stratum: u8,
    pub offset_seconds: f64,
    pub synchronized: bool,
}

impl Tracking {
    /// Parses chronyc's CSV tracking line: reference ID, name or address, stratum,
    /// reference time, system time offset (positive: slow), last offset, RMS offset,
    /// frequency, residual frequency, skew, root delay, root dispersion, update interval,
    /// leap status.
    pub fn parse(line: &str) -> Option<Tracking> {
        let fields: Vec<&str> = line.trim().split(',').collect();
        if fields.len() < 14 {
            return None;
        }
        let stratum: u8 = fields[2].parse().ok()?;
        // chrony reports how much the system clock is *behind*: negate for "ahead".
        let slow: f64 = fields[4].parse().ok()?;
        let leap = fields[13];
        let synchronized = stratum > 0 && leap != "Not synchronised";
        Some(Tracking {
            source: Some(fields[1].to_string()).filter(|s| !s.is_empty() && synchronized),
            stratum,
            offset_seconds: -slow,
            synchronized,
        })
    }
}

/// chronyd, supervised, with the owner's servers.
pub struct TimeSync {
    store: Arc<Store>,
    state: PathBuf,
    chronyd: Supervised,
    lock: std::sync::Mutex<()>,
}

impl TimeSync {
    /// Writes chrony's configuration and starts chronyd under supervision; `None` (logged)
    /// when chrony is not installed.
    pub fn start(store: Arc<Store>, data: &Path) -> Option<Arc<TimeSync>> {
        if !Path::new(CHRONYD).exists() {
            tracing::error!("chronyd is missing: the clock is not kept right");
            return None;
        }
        let state = data.join("time");
        let settings = settings(&store);
        if let Err(e) = std::fs::create_dir_all(&state).and_then(|_| write_conf(&settings, &state))
        {
            tracing::error!(error = %e, "cannot write chrony's configuration");
        }
        let chronyd = Supervised::start("chronyd", || {
            let mut c = std::process::Command::new(CHRONYD);
            // -d: in the foreground, logging to stderr (the console); -u: its own user.
            c.args(["-d", "-u", "_chrony", "-f", CONF]);
            c
        });
        tracing::info!(servers = ?settings.servers, "keeping the clock with chrony");
        Some(Arc::new(TimeSync {
            store,
            state,
            chronyd,
            lock: std::sync::Mutex::default(),
        }))
    }

    pub fn settings(&self) -> TimeSettings {
        settings(&self.store)
    }

    /// Validates, stores and applies new settings (chronyd restarts with them). The
    /// configuration is written first (a new file renamed over the old): when either step
    /// fails, the stored settings and chrony's configuration stay as they were.
    pub fn set(&self, new: &TimeSettings) -> Result<(), crate::daemon::AgentError> {
        new.validate()?;
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.settings();
        let write = |s: &TimeSettings| {
            write_conf(s, &self.state).map_err(|source| ClockError::Write {
                path: PathBuf::from(CONF),
                source,
            })
        };
        write(new)?;
        let text = serde_json::to_string(new).unwrap_or_default();
        if let Err(e) = self.store.set_setting(SETTING, &text) {
            if let Err(w) = write(&old) {
                tracing::error!(error = %w, "cannot put chrony's configuration back");
            }
            return Err(e.into());
        }
        self.chronyd.restart();
        Ok(())
    }

    /// The clock and what chrony says of it (runs `chronyc`: call off the async workers).
    pub fn status(&self) -> TimeStatus {
        let mut status = TimeStatus {
            now: now_rfc3339(),
            synchronized: false,
            source: None,
            stratum: None,
            offset_seconds: None,
            servers: self.settings().servers,
            problem: None,
        };
        match tracking() {
            Ok(t) => {
                status.synchronized = t.synchronized;
                status.source = t.source;
                status.stratum = Some(t.stratum).filter(|s| *s > 0);
                status.offset_seconds = Some(t.offset_seconds).filter(|_| t.synchronized);
            }
            Err(problem) => status.problem = Some(problem),
        }
        status
    }
}

/// The clock's status in host mode: its time only (the host keeps it).
pub fn host_status() -> TimeStatus {
    TimeStatus {
        now: now_rfc3339(),
        synchronized: false,
        source: None,
        stratum: None,
        offset_seconds: None,
        servers: Vec::new(),
        problem: Some("host mode: the host keeps the clock".into()),
    }
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map_or_else(|_| jiff::Timestamp::now().to_string(), |t| t.to_string())
}

fn settings(store: &Store) -> TimeSettings {
    store
        .setting(SETTING)
        .ok()
        .flatten()
        .and_then(|t| serde_json::from_str::<TimeSettings>(&t).ok())
        .filter(|s| s.validate().is_ok())
        .unwrap_or_default()
}

fn write_conf(settings: &TimeSettings, state: &Path) -> std::io::Result<()> {
    let conf = Path::new(CONF);
    if let Some(dir) = conf.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::files::replace(conf, chrony_conf(settings, state).as_bytes(), 0o644)?;
    // chronyd drops to its own user after reading the configuration; the drift file is
    // written as that user.
    if let Ok(uid) = user_id("_chrony") {
        let _ = std::os::unix::fs::chown(state, Some(uid), None);
    }
    Ok(())
}

/// A user's id from /etc/passwd (the device has no NSS beyond files).
fn user_id(name: &str) -> std::io::Result<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next()? == name).then(|| f.nth(1)?.parse().ok())?
        })
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such user"))
}

fn tracking() -> Result<Tracking, String> {
    let out = std::process::Command::new(CHRONYC)
        .args(["-c", "-n", "tracking"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run chronyc: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("chronyc: {}", err.trim()));
    }
    Tracking::parse(&text).ok_or_else(|| format!("chronyc said {:?}", text.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers() {
        let check = |s: &str, shown: Option<&str>| {
            let parsed = s.parse::<NtpServer>().ok().map(|p| p.to_string());
            assert_eq!(parsed.as_deref(), shown, "{s:?}");
        };
        check("pool.ntp.org", Some("pool.ntp.org"));
        check("Time.Example.NET", Some("time.example.net"));
        check("ntp", Some("ntp"));
        check("192.168.1.1", Some("192.168.1.1"));
        check("192.168.1.1:1234", Some("192.168.1.1:1234"));
        check("fd00::1", Some("fd00::1"));
        check("[fd00::1]", Some("fd00::1"));
        check("[fd00::1]:123", Some("[fd00::1]:123"));
        check("10.0.2.2:12123", Some("10.0.2.2:12123"));
        check("", None);
        check("a b", None);
        check("pool.ntp.org\nrtcsync", None);
        check("-x.org", None);
        check("x..org", None);
        check("1.2.3.999", None);
        check("host:0", None);
        check("host:65536", None);
        check("host:", None);
        check("[fd00::1]x", None);
        check("[nothost]:1", None);
        check(&format!("{}.org", "a".repeat(64)), None);
    }

    #[test]
    fn settings_are_validated_and_read_as_json() {
        let s: TimeSettings =
            serde_json::from_str(r#"{"servers": ["10.0.2.2:12123", "pool.ntp.org"]}"#).unwrap();
        assert!(s.validate().is_ok());
        let e = serde_json::from_str::<TimeSettings>(r#"{"servers": ["a;b"]}"#).unwrap_err();
        assert!(
            e.to_string().contains("\"a;b\" is not an NTP server"),
            "{e}"
        );
        assert!(serde_json::from_str::<TimeSettings>(r#"{"server": []}"#).is_err());
        let none = TimeSettings { servers: vec![] };
        assert_eq!(
            none.validate().unwrap_err().to_string(),
            "name at least one NTP server"
        );
        let twice = TimeSettings {
            servers: vec!["a.org".parse().unwrap(), "A.org".parse().unwrap()],
        };
        assert_eq!(
            twice.validate().unwrap_err().to_string(),
            "NTP server a.org is named twice"
        );
        let many = TimeSettings {
            servers: (0..9)
                .map(|i| format!("s{i}.org").parse().unwrap())
                .collect(),
        };
        assert!(many.validate().is_err());
        assert_eq!(
            TimeSettings::default().servers[0].to_string(),
            "pool.ntp.org"
        );
    }

    #[test]
    fn chrony_configuration() {
        let s = TimeSettings {
            servers: vec![
                "2.debian.pool.ntp.org".parse().unwrap(),
                "10.0.2.2:12123".parse().unwrap(),
                "[fd00::1]:124".parse().unwrap(),
            ],
        };
        let conf = chrony_conf(&s, Path::new("/data/homeport/time"));
        let lines: Vec<&str> = conf.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "pool 2.debian.pool.ntp.org iburst",
                "server 10.0.2.2 port 12123 iburst",
                "server fd00::1 port 124 iburst",
                "driftfile /data/homeport/time/chrony.drift",
                "makestep 1 3",
                "rtcsync",
                "cmdport 0",
            ]
        );
    }

    #[test]
    fn tracking_lines() {
        let synced = "C0A80001,10.0.2.2,3,1700000000.123456789,-0.000123000,0.000010,0.000020,-12.345,0.001,0.050,0.010000,0.002000,64.5,Normal\n";
        let t = Tracking::parse(synced).unwrap();
        assert!(t.synchronized);
        assert_eq!(t.source.as_deref(), Some("10.0.2.2"));
        assert_eq!(t.stratum, 3);
        assert!((t.offset_seconds - 0.000123).abs() < 1e-9);
        let unsynced = "00000000,,0,0.000000000,0.000000000,0.000000000,0.000000000,0.000,0.000,0.000,1.000000000,1.000000000,0.0,Not synchronised";
        let t = Tracking::parse(unsynced).unwrap();
        assert!(!t.synchronized);
        assert_eq!(t.source, None);
        assert_eq!(Tracking::parse("506 Cannot talk to daemon"), None);
        assert_eq!(Tracking::parse(""), None);
    }
}
