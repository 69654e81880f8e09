//! The shared PostgreSQL server: one cluster for every app that asks for a database.
//!
//! The agent (root) owns the cluster's life: `initdb` on first use (into `data.new`, renamed
//! to `data` when complete, so a kill half way leaves nothing half made), the server's
//! configuration, its start, adoption after an agent restart, and restarts with backoff
//! after a crash. The server runs as the `postgres` OS user in a session of its own, so it
//! outlives the agent like the apps do.
//!
//! On disk, under [`PostgresConfig::dir`]:
//! - `data/`: the cluster (owned by `postgres`, 0700). `homeport.conf` (included from
//!   `postgresql.conf`), `pg_hba.conf` and `pg_ident.conf` in it are written by us, whole.
//! - `run/`: the server's unix socket (owned by `postgres`, 0700; root still connects).
//! - `postgres.log` (+ `.1`): the server's stderr, rotated by copy-and-truncate.
//!
//! Access: the superuser `postgres` logs in only over the unix socket, by peer
//! authentication of the OS users `root` (the agent) and `postgres`. Every app's role logs in
//! only to its own database, only from its own addresses, only with its password (SCRAM); no
//! other `host` line exists. The server listens only on the addresses it is given (the apps'
//! gateway addresses), never on every address.

use std::fmt::{self, Write as _};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt,
};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

/// Where Debian's packages put each major version (`<root>/<major>/bin`).
const PACKAGE_ROOT: &str = "/usr/lib/postgresql";
/// The OS user the server runs as.
const OS_USER: &str = "postgres";
/// The superuser the agent connects as.
const SUPERUSER: &str = "postgres";
/// Names apps may not use for a database or a role.
const RESERVED: &[&str] = &[
    "postgres",
    "template0",
    "template1",
    "public",
    "none",
    "current_user",
    "current_role",
    "session_user",
];
/// How long a (re)started or adopted server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fast shutdown may take before it becomes an immediate one.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a configuration reload may take to show.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A server that ran this long before exiting restarts after [`MIN_BACKOFF`] again.
const HEALTHY: Duration = Duration::from_secs(30);
/// The server log is rotated when it grows past this (checked at start and periodically).
const LOG_CAP: u64 = 8 << 20;
const LOG_CHECK: Duration = Duration::from_secs(600);
/// cgroup v1 controllers the server is placed under (when they are mounted).
const V1_CONTROLLERS: &[&str] = &["memory", "pids", "cpu"];
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Where and how the shared server runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// Everything of the server lives under this directory (e.g. `DATA/services/postgres`).
    /// Its ancestors must be traversable by the `postgres` OS user.
    pub dir: PathBuf,
    /// The directory of `initdb` and `postgres`; by default the cluster's own major version
    /// under `/usr/lib/postgresql`, or the highest there for a new cluster.
    pub bin_dir: Option<PathBuf>,
    /// The only addresses the server listens on (the apps' gateway addresses). Empty: the
    /// unix socket only. Unspecified addresses (`0.0.0.0`, `::`) are refused.
    pub listen: Vec<IpAddr>,
    pub port: u16,
    /// When set, the server runs in the cgroup `<parent>/postgres`; see [`place_in_cgroup`].
    pub cgroup_parent: Option<String>,
}

/// One app's database: its role may log in to it, from these addresses, with this password.
#[derive(Clone, PartialEq, Eq)]
pub struct DbGrant {
    pub database: String,
    pub role: String,
    pub password: String,
    pub addresses: Vec<IpAddr>,
}

impl fmt::Debug for DbGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbGrant")
            .field("database", &self.database)
            .field("role", &self.role)
            .field("password", &"<redacted>")
            .field("addresses", &self.addresses)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    #[error("os user postgres does not exist (is postgresql installed?)")]
    NoUser,
    #[error("no postgresql binaries in /usr/lib/postgresql/*/bin")]
    NoBinaries,
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("invalid password for role {role}: {reason}")]
    InvalidPassword { role: String, reason: &'static str },
    #[error("cannot {step} {}", path.display())]
    Io {
        step: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{} is not traversable by the postgres user", path.display())]
    NotTraversable { path: PathBuf },
    #[error("cluster in {} is postgresql {data}, binaries in {} are {bin}", data_dir.display(), bin_dir.display())]
    VersionMismatch {
        data_dir: PathBuf,
        data: String,
        bin_dir: PathBuf,
        bin: String,
    },
    #[error("initdb failed: {output}")]
    Initdb { output: String },
    #[error("postgresql did not become ready ({reason}); its log ends with:\n{log}")]
    NotReady { reason: String, log: String },
    #[error("cannot {step} (database {database})")]
    Sql {
        step: &'static str,
        database: String,
        source: tokio_postgres::Error,
    },
    #[error("postgresql did not apply its new configuration in time")]
    ReloadTimeout,
    #[error("postgresql is stopped")]
    Stopped,
}

type Result<T, E = PostgresError> = std::result::Result<T, E>;

fn io_err<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PostgresError + 'a {
    move |source| PostgresError::Io {
        step,
        path: path.to_path_buf(),
        source,
    }
}

fn sql_err<'a>(
    step: &'static str,
    database: &'a str,
) -> impl FnOnce(tokio_postgres::Error) -> PostgresError + 'a {
    move |source| PostgresError::Sql {
        step,
        database: database.to_string(),
        source,
    }
}

/// A fresh password: 32 characters from `[A-Za-z0-9]` (190 bits).
pub fn random_password() -> String {
    use rand::distributions::{Alphanumeric, DistString as _};
    Alphanumeric.sample_string(&mut rand::thread_rng(), 32)
}

/// Checks a database or role name: lowercase ASCII letters, digits and `_`, not starting
/// with a digit, at most 63 bytes, not reserved.
fn check_ident(what: &'static str, value: &str) -> Result<()> {
    let reason = if value.is_empty() {
        Some("is empty")
    } else if value.len() > 63 {
        Some("is longer than 63 bytes")
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        Some("may only hold a-z, 0-9 and _")
    } else if value.as_bytes()[0].is_ascii_digit() {
        Some("starts with a digit")
    } else if value.starts_with("pg_") || RESERVED.contains(&value) {
        Some("is reserved")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(PostgresError::Invalid {
            what,
            value: value.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Checks a password: 8 to 1024 printable ASCII characters, no quotes or backslashes.
fn check_password(role: &str, password: &str) -> Result<()> {
    let reason = if password.len() < 8 {
        Some("is shorter than 8 characters")
    } else if password.len() > 1024 {
        Some("is longer than 1024 characters")
    } else if !password
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && !matches!(b, b'\'' | b'"' | b'\\'))
    {
        Some("may only hold printable ascii without quotes or backslashes")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(PostgresError::InvalidPassword {
            role: role.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

fn check_grant(grant: &DbGrant) -> Result<()> {
    check_ident("database name", &grant.database)?;
    check_ident("role name", &grant.role)?;
    check_password(&grant.role, &grant.password)
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A string literal (`standard_conforming_strings` is on: only quotes need doubling).
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `pg_hba.conf`: the superuser over the socket, then one line per grant and address.
/// Names are double-quoted so that a database called `all` or `replication` is just a name.
fn hba_conf(grants: &[DbGrant]) -> String {
    let mut s = String::from(
        "# Written by homeport; changes here are lost.\n\
         # TYPE  DATABASE  USER  ADDRESS  METHOD\n\
         local all postgres peer map=homeport\n",
    );
    for g in grants {
        for addr in &g.addresses {
            let addr = addr.to_canonical();
            let bits = if addr.is_ipv4() { 32 } else { 128 };
            let _ = writeln!(
                s,
                "host \"{}\" \"{}\" {addr}/{bits} scram-sha-256",
                g.database, g.role
            );
        }
    }
    s
}

/// `pg_ident.conf`: the OS users that may be the superuser over the socket.
const IDENT_CONF: &str = "# Written by homeport; changes here are lost.\n\
                          # MAPNAME  SYSTEM-USERNAME  PG-USERNAME\n\
                          homeport root postgres\n\
                          homeport postgres postgres\n";

/// The line `postgresql.conf` gets to include ours (last, so ours wins).
const INCLUDE_LINE: &str = "include 'homeport.conf'";

/// `homeport.conf`. `generation` changes with every rewrite: a new connection seeing it
/// proves that the server has reloaded (the postmaster rereads `pg_hba.conf` in the same step).
fn server_conf(listen: &[IpAddr], port: u16, socket_dir: &str, generation: &str) -> String {
    format!(
        "# Written by homeport at every start and access change; changes here are lost.\n\
         listen_addresses = '{}'\n\
         port = {port}\n\
         unix_socket_directories = '{socket_dir}'\n\
         unix_socket_permissions = 0700\n\
         password_encryption = 'scram-sha-256'\n\
         ssl = off\n\
         shared_buffers = 16MB\n\
         max_connections = 100\n\
         logging_collector = off\n\
         log_destination = 'stderr'\n\
         log_line_prefix = '%m [%p] %q%u@%d '\n\
         homeport.generation = '{generation}'\n",
        listen_addresses(listen)
    )
}

fn listen_addresses(listen: &[IpAddr]) -> String {
    listen
        .iter()
        .map(|a| a.to_canonical().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The server's files, all absolute.
#[derive(Debug, Clone)]
struct Layout {
    dir: PathBuf,
    data: PathBuf,
    staging: PathBuf,
    run: PathBuf,
    log: PathBuf,
}

impl Layout {
    fn new(dir: PathBuf) -> Layout {
        Layout {
            data: dir.join("data"),
            staging: dir.join("data.new"),
            run: dir.join("run"),
            log: dir.join("postgres.log"),
            dir,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct OsUser {
    uid: u32,
    gid: u32,
}

fn lookup_user() -> Result<OsUser> {
    match nix::unistd::User::from_name(OS_USER) {
        Ok(Some(u)) => Ok(OsUser {
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        }),
        _ => Err(PostgresError::NoUser),
    }
}

/// The `bin` directory of version `want` under `root` if it has one, else of the highest
/// version there.
fn find_bin_dir(root: &Path, want: Option<&str>) -> Option<PathBuf> {
    if let Some(v) = want {
        let bin = root.join(v).join("bin");
        if bin.join("postgres").is_file() {
            return Some(bin);
        }
    }
    fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((version, bin))
        })
        .max_by_key(|(v, _)| *v)
        .map(|(_, bin)| bin)
}

/// The major version of the binaries in `bin` (`postgres -V`: "postgres (PostgreSQL) 15.8 …").
fn binary_major(bin: &Path) -> Result<String> {
    let exe = bin.join("postgres");
    let out = Command::new(&exe)
        .arg("-V")
        .env_clear()
        .stdin(Stdio::null())
        .output()
        .map_err(io_err("run", &exe))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split_whitespace().nth(2).unwrap_or_default();
    let major = version.split(['.', 'b', 'r']).next().unwrap_or_default();
    if major.is_empty() || !major.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PostgresError::Io {
            step: "read the version of",
            path: exe,
            source: io::Error::new(io::ErrorKind::InvalidData, text.trim().to_string()),
        });
    }
    Ok(major.to_string())
}

/// Refuses paths that the server's configuration could not carry as they are.
fn conf_path(path: &Path) -> Result<&str> {
    path.to_str()
        .filter(|s| {
            !s.chars()
                .any(|c| c.is_control() || matches!(c, '\'' | '"' | ',' | '\\'))
        })
        .ok_or_else(|| PostgresError::Invalid {
            what: "directory",
            value: path.display().to_string(),
            reason: "has characters postgresql's configuration cannot hold",
        })
}

/// Checks that the `postgres` user may traverse `dir` and all its ancestors (going by mode
/// bits, owner and primary group).
fn check_traversable(dir: &Path, user: OsUser) -> Result<()> {
    for a in dir.ancestors() {
        let meta = fs::metadata(a).map_err(io_err("inspect", a))?;
        let mode = meta.mode();
        let bit = if meta.uid() == user.uid {
            0o100
        } else if meta.gid() == user.gid {
            0o010
        } else {
            0o001
        };
        if mode & bit == 0 {
            return Err(PostgresError::NotTraversable {
                path: a.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Makes `path` a directory owned by `user` with mode 0700.
fn own_dir(path: &Path, user: OsUser) -> Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err("create", path)(e)),
    }
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
        .map_err(io_err("chown", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io_err("chmod", path))
}

/// Writes `data` to `path` (owned by `user`, 0600) through a temporary file and a rename.
fn write_owned(path: &Path, data: &str, user: OsUser) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    std::os::unix::fs::fchown(&f, Some(user.uid), Some(user.gid)).map_err(io_err("chown", &tmp))?;
    f.write_all(data.as_bytes())
        .map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("write", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("rename", path))
}

fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", path))
}

/// The last lines (at most 20, from the last 4 KiB) of a log file.
fn log_tail(path: &Path) -> String {
    let read = || -> io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(4096)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Copy-and-truncate rotation (the server keeps its descriptor, opened `O_APPEND`).
fn rotate_log(path: &Path) -> io::Result<()> {
    let len = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if len < LOG_CAP {
        return Ok(());
    }
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    fs::copy(path, PathBuf::from(old))?;
    OpenOptions::new().write(true).open(path)?.set_len(0)
}

/// Makes the cluster if there is none: `initdb` into `data.new`, then a rename.
fn init_cluster(layout: &Layout, bin: &Path, user: OsUser) -> Result<()> {
    if layout.staging.exists() {
        fs::remove_dir_all(&layout.staging).map_err(io_err("remove", &layout.staging))?;
    }
    own_dir(&layout.staging, user)?;
    let initdb = bin.join("initdb");
    let mut last = String::new();
    for locale in ["C.UTF-8", "C"] {
        tracing::info!(dir = %layout.data.display(), locale, "initialising postgresql cluster");
        let out = Command::new(&initdb)
            .arg("-D")
            .arg(&layout.staging)
            .args([
                "--username=postgres",
                "--auth-local=peer",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
            ])
            .arg(format!("--locale={locale}"))
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .current_dir("/")
            .uid(user.uid)
            .gid(user.gid)
            .stdin(Stdio::null())
            .output()
            .map_err(io_err("run", &initdb))?;
        if out.status.success() {
            let conf = layout.staging.join("postgresql.conf");
            let text = fs::read_to_string(&conf).map_err(io_err("read", &conf))?;
            write_owned(&conf, &format!("{text}\n{INCLUDE_LINE}\n"), user)?;
            fs::rename(&layout.staging, &layout.data).map_err(io_err("rename", &layout.data))?;
            return sync_dir(&layout.dir);
        }
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Only a missing locale is worth a second attempt.
        if !last.contains("locale") {
            break;
        }
        fs::remove_dir_all(&layout.staging).map_err(io_err("remove", &layout.staging))?;
        own_dir(&layout.staging, user)?;
    }
    let lines: Vec<&str> = last.trim().lines().collect();
    Err(PostgresError::Initdb {
        output: lines[lines.len().saturating_sub(20)..].join("\n"),
    })
}

/// Everything before the server can start, blocking: directories, the cluster, binaries.
fn prepare(cfg: &PostgresConfig, user: OsUser) -> Result<(Layout, PathBuf)> {
    fs::create_dir_all(&cfg.dir).map_err(io_err("create", &cfg.dir))?;
    let dir = fs::canonicalize(&cfg.dir).map_err(io_err("resolve", &cfg.dir))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o711)).map_err(io_err("chmod", &dir))?;
    check_traversable(&dir, user)?;
    let layout = Layout::new(dir);
    conf_path(&layout.run)?;
    let socket = layout.run.join(format!(".s.PGSQL.{}", cfg.port));
    if socket.as_os_str().len() > 107 {
        return Err(PostgresError::Invalid {
            what: "directory",
            value: layout.dir.display().to_string(),
            reason: "is too long for a unix socket path",
        });
    }
    let version_file = layout.data.join("PG_VERSION");
    let data_version = match fs::read_to_string(&version_file) {
        Ok(v) => Some(v.trim().to_string()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err("read", &version_file)(e)),
    };
    let bin = match &cfg.bin_dir {
        Some(b) => b.clone(),
        None => find_bin_dir(Path::new(PACKAGE_ROOT), data_version.as_deref())
            .ok_or(PostgresError::NoBinaries)?,
    };
    let bin_version = binary_major(&bin)?;
    match data_version {
        Some(v) if v != bin_version => {
            return Err(PostgresError::VersionMismatch {
                data_dir: layout.data.clone(),
                data: v,
                bin_dir: bin,
                bin: bin_version,
            })
        }
        Some(_) => {}
        None if layout.data.exists() => {
            return Err(PostgresError::Invalid {
                what: "data directory",
                value: layout.data.display().to_string(),
                reason: "exists but holds no cluster",
            })
        }
        None => init_cluster(&layout, &bin, user)?,
    }
    own_dir(&layout.run, user)?;
    // A cluster made before the include existed, or edited by hand, gets it back.
    let conf = layout.data.join("postgresql.conf");
    let text = fs::read_to_string(&conf).map_err(io_err("read", &conf))?;
    if !text.lines().any(|l| l.trim() == INCLUDE_LINE) {
        write_owned(&conf, &format!("{text}\n{INCLUDE_LINE}\n"), user)?;
    }
    write_owned(&layout.data.join("pg_ident.conf"), IDENT_CONF, user)?;
    Ok((layout, bin))
}

/// A process watched through a pidfd: readable once the process has exited.
struct PidFd {
    pid: u32,
    fd: AsyncFd<OwnedFd>,
}

impl PidFd {
    fn open(pid: u32) -> io::Result<PidFd> {
        let raw =
            libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        // SAFETY: the AsyncFd owns `fd` (an OwnedFd) for its whole life, so the descriptor
        // stays open and refers to the same pidfd until it is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        Ok(PidFd { pid, fd })
    }

    /// Returns once the process has exited (at once if it has).
    async fn exited(&self) {
        if let Err(e) = self.fd.readable().await {
            tracing::warn!(pid = self.pid, error = %e, "cannot watch postgresql");
            std::future::pending::<()>().await;
        }
    }

    /// Whether the process has exited, without waiting.
    async fn has_exited(&self) -> bool {
        // A timeout polls its future once before looking at the clock.
        tokio::time::timeout(Duration::ZERO, self.exited())
            .await
            .is_ok()
    }

    /// Sends `sig` to the process; a process that has exited is not an error.
    fn signal(&self, sig: libc::c_int) {
        // SAFETY: pidfd_send_signal takes a pidfd we own, a signal number, a null siginfo
        // (meaning: as kill(2) would send it) and flags 0.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.get_ref().as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            tracing::debug!(pid = self.pid, sig, error = %io::Error::last_os_error(), "signal not sent");
        }
    }

    /// Collects the exit status if the process was our child (no-op otherwise).
    fn reap(&self) {
        reap(self.pid);
    }
}

fn reap(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(pid),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
    }
}

/// Stops a server: fast shutdown, then immediate shutdown, then SIGKILL.
async fn terminate(pidfd: &PidFd) {
    pidfd.signal(libc::SIGINT);
    if tokio::time::timeout(STOP_TIMEOUT, pidfd.exited())
        .await
        .is_err()
    {
        tracing::warn!(
            pid = pidfd.pid,
            "postgresql did not stop in time; immediate shutdown"
        );
        pidfd.signal(libc::SIGQUIT);
        if tokio::time::timeout(Duration::from_secs(5), pidfd.exited())
            .await
            .is_err()
        {
            pidfd.signal(libc::SIGKILL);
            let _ = tokio::time::timeout(Duration::from_secs(5), pidfd.exited()).await;
        }
    }
    pidfd.reap();
}

/// Whether `pid` is a server process (postmaster or backend) of the cluster in `data`:
/// run by the `postgres` user from a `postgres` binary, working directory `data`.
fn is_cluster_process(pid: u32, data: &Path, uid: u32) -> bool {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let owner = fs::metadata(&proc).map(|m| m.uid()).ok();
    let exe = fs::read_link(proc.join("exe")).ok();
    let exe_ok = exe
        .as_ref()
        .and_then(|e| e.to_str())
        .map(|e| e.trim_end_matches(" (deleted)").ends_with("/postgres"))
        .unwrap_or(false);
    let cwd = fs::read_link(proc.join("cwd")).ok();
    owner == Some(uid) && exe_ok && cwd.as_deref() == Some(data)
}

fn cluster_processes(data: &Path, uid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| is_cluster_process(pid, data, uid))
        .collect()
}

/// What `postmaster.pid` says about a server (lines 1, 4 and 5).
#[derive(Debug, PartialEq, Eq)]
struct PidFile {
    pid: u32,
    port: Option<u16>,
    socket_dir: Option<String>,
}

fn parse_pid_file(text: &str) -> Option<PidFile> {
    let lines: Vec<&str> = text.lines().collect();
    let pid = lines
        .first()?
        .trim()
        .parse()
        .ok()
        .filter(|&p: &u32| p > 0)?;
    Some(PidFile {
        pid,
        port: lines.get(3).and_then(|l| l.trim().parse().ok()),
        socket_dir: lines.get(4).map(|l| l.trim().to_string()),
    })
}

/// The live postmaster of the cluster in `data`, if there is one.
fn find_postmaster(data: &Path, uid: u32) -> Option<PidFile> {
    let file = parse_pid_file(&fs::read_to_string(data.join("postmaster.pid")).ok()?)?;
    // An exited server that was our own child (a previous handle in this process) is a
    // zombie until reaped: reap it so that it counts as gone.
    reap(file.pid);
    is_cluster_process(file.pid, data, uid).then_some(file)
}

struct State {
    pid: Option<u32>,
    pidfd: Option<Arc<PidFd>>,
    stopping: bool,
}

/// The shared PostgreSQL server, started or adopted, and supervised while this lives.
/// Dropping it stops supervising but leaves the server running (as an agent exit does).
pub struct Postgres {
    cfg: PostgresConfig,
    layout: Layout,
    bin: PathBuf,
    user: OsUser,
    state: Mutex<State>,
    /// Serialises administration (roles, databases, access) and config rewrites.
    ops: tokio::sync::Mutex<()>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Postgres {
    /// Makes the cluster if needed, writes the configuration and access rules for `grants`,
    /// adopts the running server or starts one, waits until it accepts connections, and
    /// supervises it from then on.
    pub async fn start(cfg: PostgresConfig, grants: &[DbGrant]) -> Result<Arc<Postgres>> {
        for g in grants {
            check_grant(g)?;
        }
        if let Some(a) = cfg.listen.iter().find(|a| a.is_unspecified()) {
            return Err(PostgresError::Invalid {
                what: "listen address",
                value: a.to_string(),
                reason: "would listen on every address",
            });
        }
        if cfg.port == 0 {
            return Err(PostgresError::Invalid {
                what: "port",
                value: "0".to_string(),
                reason: "is not a port",
            });
        }
        let user = lookup_user()?;
        let (layout, bin) = {
            let cfg = cfg.clone();
            tokio::task::spawn_blocking(move || prepare(&cfg, user))
                .await
                .map_err(|e| PostgresError::Io {
                    step: "prepare",
                    path: PathBuf::from(PACKAGE_ROOT),
                    source: io::Error::other(e),
                })??
        };
        let pg = Arc::new(Postgres {
            cfg,
            layout,
            bin,
            user,
            state: Mutex::new(State {
                pid: None,
                pidfd: None,
                stopping: false,
            }),
            ops: tokio::sync::Mutex::new(()),
            supervisor: Mutex::new(None),
        });
        let running = {
            let _ops = pg.ops.lock().await;
            let generation = pg.write_access(grants)?;
            let running = pg.launch().await?;
            // An adopted server reads the new files only now.
            pg.reload(&generation).await?;
            running
        };
        pg.harden().await?;
        let handle = tokio::spawn(supervise(Arc::downgrade(&pg), Some(running)));
        *lock(&pg.supervisor) = Some(handle);
        Ok(pg)
    }

    /// Makes `grant` true: its role (a plain login role with the password) and its database
    /// (owned by the role, reachable by no other role). Idempotent; a re-run fixes drift,
    /// e.g. applies a new password.
    pub async fn provision(&self, grant: &DbGrant) -> Result<()> {
        check_grant(grant)?;
        let _ops = self.ops.lock().await;
        let db = grant.database.as_str();
        let client = self
            .admin("postgres")
            .await
            .map_err(sql_err("connect", db))?;
        let role = quote_ident(&grant.role);
        let qdb = quote_ident(db);
        // The server gets a SCRAM verifier, never the password itself.
        let verifier = postgres_protocol::password::scram_sha_256(grant.password.as_bytes());
        let attrs = format!(
            "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT \
             VALID UNTIL 'infinity' PASSWORD {}",
            quote_literal(&verifier)
        );
        let role_exists = client
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&grant.role])
            .await
            .map_err(sql_err("look up role", db))?
            .is_some();
        let stmt = if role_exists {
            format!("ALTER ROLE {role} WITH {attrs}")
        } else {
            format!("CREATE ROLE {role} WITH {attrs}")
        };
        client
            .batch_execute(&stmt)
            .await
            .map_err(sql_err("create or alter role", db))?;
        let db_exists = client
            .query_opt(
                "SELECT 1 FROM pg_database WHERE datname = $1",
                &[&grant.database],
            )
            .await
            .map_err(sql_err("look up database", db))?
            .is_some();
        if db_exists {
            client
                .batch_execute(&format!("ALTER DATABASE {qdb} OWNER TO {role}"))
                .await
                .map_err(sql_err("set owner of database", db))?;
        } else {
            client
                .batch_execute(&format!(
                    "CREATE DATABASE {qdb} OWNER {role} TEMPLATE template0 ENCODING 'UTF8'"
                ))
                .await
                .map_err(sql_err("create database", db))?;
        }
        client
            .batch_execute(&format!(
                "REVOKE CONNECT, TEMPORARY ON DATABASE {qdb} FROM PUBLIC; \
                 GRANT CONNECT, TEMPORARY ON DATABASE {qdb} TO {role}"
            ))
            .await
            .map_err(sql_err("set privileges on database", db))?;
        drop(client);
        let client = self.admin(db).await.map_err(sql_err("connect", db))?;
        let has_public = client
            .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = 'public'", &[])
            .await
            .map_err(sql_err("look up schema public", db))?
            .is_some();
        if has_public {
            client
                .batch_execute(&format!(
                    "ALTER SCHEMA public OWNER TO {role}; REVOKE ALL ON SCHEMA public FROM PUBLIC"
                ))
                .await
                .map_err(sql_err("set privileges on schema public", db))?;
        }
        tracing::info!(database = db, role = %grant.role, created = !db_exists, "postgresql database provisioned");
        Ok(())
    }

    /// Rewrites `pg_hba.conf` for exactly these grants and waits until the server uses it.
    pub async fn set_access(&self, grants: &[DbGrant]) -> Result<()> {
        for g in grants {
            check_grant(g)?;
        }
        let _ops = self.ops.lock().await;
        let generation = self.write_access(grants)?;
        self.reload(&generation).await?;
        tracing::info!(grants = grants.len(), "postgresql access rules updated");
        Ok(())
    }

    /// Drops a database and its role, ending their sessions. Idempotent.
    pub async fn drop_database(&self, database: &str, role: &str) -> Result<()> {
        check_ident("database name", database)?;
        check_ident("role name", role)?;
        let _ops = self.ops.lock().await;
        let client = self
            .admin("postgres")
            .await
            .map_err(sql_err("connect", database))?;
        client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_ident(database)
            ))
            .await
            .map_err(sql_err("drop database", database))?;
        let role_exists = client
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
            .await
            .map_err(sql_err("look up role", database))?
            .is_some();
        if role_exists {
            client
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                    &[&role],
                )
                .await
                .map_err(sql_err("end sessions of role", database))?;
            let role = quote_ident(role);
            client
                .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE IF EXISTS {role}"))
                .await
                .map_err(sql_err("drop role", database))?;
        }
        tracing::info!(database, role, "postgresql database dropped");
        Ok(())
    }

    /// `SELECT 1` over the unix socket.
    pub async fn ping(&self) -> Result<()> {
        let client = self
            .admin("postgres")
            .await
            .map_err(sql_err("connect", "postgres"))?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(sql_err("ping", "postgres"))?;
        Ok(())
    }

    /// The size of a database on disk (`pg_database_size`).
    pub async fn database_bytes(&self, database: &str) -> Result<u64> {
        let client = self
            .admin("postgres")
            .await
            .map_err(sql_err("connect", "postgres"))?;
        let row = client
            .query_one("SELECT pg_database_size($1)::bigint", &[&database])
            .await
            .map_err(sql_err("size", database))?;
        let bytes: i64 = row.get(0);
        Ok(u64::try_from(bytes).unwrap_or(0))
    }

    /// The postmaster's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.state).pid
    }

    /// Where apps reach the server.
    pub fn address(&self) -> (Vec<IpAddr>, u16) {
        (self.cfg.listen.clone(), self.cfg.port)
    }

    /// Stops supervising and shuts the server down (fast shutdown: sessions are ended,
    /// a checkpoint is written).
    pub async fn stop(&self) {
        let pidfd = {
            let mut st = lock(&self.state);
            st.stopping = true;
            st.pid = None;
            st.pidfd.take()
        };
        if let Some(h) = lock(&self.supervisor).take() {
            h.abort();
        }
        if let Some(pidfd) = pidfd {
            terminate(&pidfd).await;
            tracing::info!(pid = pidfd.pid, "postgresql stopped");
        }
    }

    /// A superuser connection over the unix socket.
    async fn admin(&self, dbname: &str) -> Result<Client, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::Config::new()
            .host_path(&self.layout.run)
            .port(self.cfg.port)
            .user(SUPERUSER)
            .dbname(dbname)
            .application_name("homeport")
            .connect_timeout(Duration::from_secs(5))
            .connect(NoTls)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "postgresql admin connection failed");
            }
        });
        Ok(client)
    }

    fn stopping(&self) -> bool {
        lock(&self.state).stopping
    }

    /// Writes `pg_hba.conf`, then `homeport.conf` with a new generation, which it returns.
    fn write_access(&self, grants: &[DbGrant]) -> Result<String> {
        write_owned(
            &self.layout.data.join("pg_hba.conf"),
            &hba_conf(grants),
            self.user,
        )?;
        let generation = format!("{:016x}", rand::random::<u64>());
        let conf = server_conf(
            &self.cfg.listen,
            self.cfg.port,
            conf_path(&self.layout.run)?,
            &generation,
        );
        write_owned(&self.layout.data.join("homeport.conf"), &conf, self.user)?;
        Ok(generation)
    }

    /// Makes the server reread its configuration and waits until new sessions see
    /// `generation`. A server that is not running reads the files when it starts.
    async fn reload(&self, generation: &str) -> Result<()> {
        let pidfd = lock(&self.state).pidfd.clone();
        let Some(pidfd) = pidfd else {
            return Ok(());
        };
        pidfd.signal(libc::SIGHUP);
        let deadline = Instant::now() + RELOAD_TIMEOUT;
        loop {
            if let Ok(client) = self.admin("postgres").await {
                if let Ok(row) = client
                    .query_one("SELECT current_setting('homeport.generation', true)", &[])
                    .await
                {
                    if row
                        .try_get::<_, Option<String>>(0)
                        .ok()
                        .flatten()
                        .as_deref()
                        == Some(generation)
                    {
                        return Ok(());
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(PostgresError::ReloadTimeout);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Defence in depth beside `pg_hba.conf`: no role but the superuser may connect to the
    /// maintenance databases.
    async fn harden(&self) -> Result<()> {
        let client = self
            .admin("postgres")
            .await
            .map_err(sql_err("connect", "postgres"))?;
        client
            .batch_execute(
                "REVOKE CONNECT, TEMPORARY ON DATABASE postgres FROM PUBLIC; \
                 REVOKE CONNECT, TEMPORARY ON DATABASE template1 FROM PUBLIC",
            )
            .await
            .map_err(sql_err("revoke public access", "postgres"))
    }

    /// Records the running server; false (and nothing recorded) once stopping.
    fn record(&self, pidfd: &Arc<PidFd>) -> bool {
        let mut st = lock(&self.state);
        if st.stopping {
            return false;
        }
        st.pid = Some(pidfd.pid);
        st.pidfd = Some(Arc::clone(pidfd));
        true
    }

    fn forget(&self, pid: u32) {
        let mut st = lock(&self.state);
        if st.pid == Some(pid) {
            st.pid = None;
            st.pidfd = None;
        }
    }

    /// Adopts the cluster's running server if it has one that listens where it should,
    /// else starts one; returns once it accepts connections.
    async fn launch(&self) -> Result<Arc<PidFd>> {
        let run = conf_path(&self.layout.run)?.to_string();
        if let Some(found) = find_postmaster(&self.layout.data, self.user.uid) {
            if let Ok(pidfd) = PidFd::open(found.pid) {
                let pidfd = Arc::new(pidfd);
                // Checked again now that the pidfd pins the process.
                if is_cluster_process(found.pid, &self.layout.data, self.user.uid) {
                    if !self.record(&pidfd) {
                        terminate(&pidfd).await;
                        return Err(PostgresError::Stopped);
                    }
                    if found.port == Some(self.cfg.port)
                        && found.socket_dir.as_deref() == Some(&run)
                    {
                        tracing::info!(pid = found.pid, "adopted running postgresql");
                        match self.wait_ready(&pidfd).await {
                            Ok(()) if self.listens_as_configured().await? => return Ok(pidfd),
                            Ok(()) => {}
                            // It was shutting down: start a new one below.
                            Err(_) if pidfd.has_exited().await => {}
                            Err(e) => return Err(e),
                        }
                    }
                    if !pidfd.has_exited().await {
                        tracing::info!(
                            pid = found.pid,
                            "restarting postgresql to listen where configured"
                        );
                    }
                    terminate(&pidfd).await;
                    self.forget(found.pid);
                }
            }
        }
        self.kill_leftovers().await;
        self.remove_stale_pid_file()?;
        let pidfd = Arc::new(self.spawn()?);
        if !self.record(&pidfd) {
            terminate(&pidfd).await;
            return Err(PostgresError::Stopped);
        }
        tracing::info!(pid = pidfd.pid, "postgresql started");
        if let Err(e) = self.wait_ready(&pidfd).await {
            terminate(&pidfd).await;
            self.forget(pidfd.pid);
            return Err(e);
        }
        Ok(pidfd)
    }

    async fn listens_as_configured(&self) -> Result<bool> {
        let client = self
            .admin("postgres")
            .await
            .map_err(sql_err("connect", "postgres"))?;
        let row = client
            .query_one("SELECT current_setting('listen_addresses')", &[])
            .await
            .map_err(sql_err("read listen_addresses", "postgres"))?;
        let current: String = row
            .try_get(0)
            .map_err(sql_err("read listen_addresses", "postgres"))?;
        Ok(current == listen_addresses(&self.cfg.listen))
    }

    /// Kills processes of a previous server of this cluster whose postmaster is gone (they
    /// would keep the new one from starting while attached to the old shared memory).
    async fn kill_leftovers(&self) {
        let (data, uid) = (&self.layout.data, self.user.uid);
        let pids = cluster_processes(data, uid);
        if pids.is_empty() {
            return;
        }
        tracing::warn!(
            count = pids.len(),
            "killing processes of a previous postgresql"
        );
        for pid in pids {
            if let Ok(pidfd) = PidFd::open(pid) {
                if is_cluster_process(pid, data, uid) {
                    pidfd.signal(libc::SIGKILL);
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cluster_processes(data, uid).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A `postmaster.pid` naming a live process that is not ours (its pid was reused after
    /// a reboot) would keep the server from starting. Any other is left to the server.
    fn remove_stale_pid_file(&self) -> Result<()> {
        let path = self.layout.data.join("postmaster.pid");
        let Some(file) = fs::read_to_string(&path)
            .ok()
            .and_then(|t| parse_pid_file(&t))
        else {
            return Ok(());
        };
        let alive = i32::try_from(file.pid)
            .map(|p| nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_ok())
            .unwrap_or(false);
        if alive && !is_cluster_process(file.pid, &self.layout.data, self.user.uid) {
            tracing::info!(pid = file.pid, "removing stale postmaster.pid");
            fs::remove_file(&path).map_err(io_err("remove", &path))?;
        }
        Ok(())
    }

    /// Starts `postgres -D data` as the `postgres` user in a new session (so the agent's
    /// exit does not take it down), in its cgroup if configured, stderr to the log.
    fn spawn(&self) -> Result<PidFd> {
        let log_path = &self.layout.log;
        if let Err(e) = rotate_log(log_path) {
            tracing::warn!(error = %e, "cannot rotate postgresql log");
        }
        let log = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(log_path)
            .map_err(io_err("open", log_path))?;
        let log2 = log.try_clone().map_err(io_err("open", log_path))?;
        let cgroup_files = match &self.cfg.cgroup_parent {
            Some(parent) => open_cgroup_procs(parent, "postgres")
                .map_err(io_err("prepare cgroup", Path::new(parent)))?,
            None => Vec::new(),
        };
        let cgroup_fds: Vec<RawFd> = cgroup_files.iter().map(|f| f.as_raw_fd()).collect();
        let (uid, gid) = (self.user.uid, self.user.gid);
        let exe = self.bin.join("postgres");
        let mut cmd = Command::new(&exe);
        cmd.arg("-D")
            .arg(&self.layout.data)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // SAFETY: the closure runs in the forked child before exec. It only makes
        // async-signal-safe system calls (setsid, write, setgroups, setgid, setuid) and reads
        // memory allocated before the fork; it allocates nothing. The cgroup is joined while
        // still root (writing "0" moves the writer), before the server can fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                for &fd in &cgroup_fds {
                    if libc::write(fd, b"0".as_ptr().cast(), 1) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if libc::setgroups(0, std::ptr::null()) < 0
                    || libc::setgid(gid) < 0
                    || libc::setuid(uid) < 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(io_err("start", &exe))?;
        drop(cgroup_files);
        // The child stays unreaped until we reap it, so its pid cannot be reused before
        // the pidfd is open. The `Child` handle is not needed: exits are seen on the pidfd.
        PidFd::open(child.id()).map_err(io_err("watch", &exe))
    }

    /// Waits until the server accepts connections, fails early when it exits.
    async fn wait_ready(&self, pidfd: &PidFd) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let reason = match self.admin("postgres").await {
                Ok(client) => match client.simple_query("SELECT 1").await {
                    Ok(_) => return Ok(()),
                    Err(e) => e.to_string(),
                },
                Err(e) => {
                    let starting = e.code() == Some(&SqlState::CANNOT_CONNECT_NOW);
                    if e.as_db_error().is_some() && !starting {
                        return Err(PostgresError::NotReady {
                            reason: e.to_string(),
                            log: log_tail(&self.layout.log),
                        });
                    }
                    e.to_string()
                }
            };
            if Instant::now() >= deadline {
                return Err(PostgresError::NotReady {
                    reason: format!("timed out after {}s: {reason}", READY_TIMEOUT.as_secs()),
                    log: log_tail(&self.layout.log),
                });
            }
            tokio::select! {
                _ = pidfd.exited() => {
                    pidfd.reap();
                    return Err(PostgresError::NotReady {
                        reason: "the server exited".to_string(),
                        log: log_tail(&self.layout.log),
                    });
                }
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Only supervision ends; the server keeps running and is adopted by the next start.
        if let Some(h) = lock(&self.supervisor).take() {
            h.abort();
        }
    }
}

/// Restarts the server whenever it exits (1 s doubling to 60 s; back to 1 s after 30 s of
/// running) and rotates its log. Holds only a weak reference while waiting.
async fn supervise(weak: Weak<Postgres>, mut running: Option<Arc<PidFd>>) {
    let mut delay = MIN_BACKOFF;
    let mut log_check = tokio::time::interval(LOG_CHECK);
    loop {
        if let Some(pidfd) = running.take() {
            let since = Instant::now();
            loop {
                tokio::select! {
                    _ = pidfd.exited() => break,
                    _ = log_check.tick() => {
                        let Some(pg) = weak.upgrade() else { return };
                        if let Err(e) = rotate_log(&pg.layout.log) {
                            tracing::warn!(error = %e, "cannot rotate postgresql log");
                        }
                    }
                }
            }
            pidfd.reap();
            let Some(pg) = weak.upgrade() else { return };
            if pg.stopping() {
                return;
            }
            pg.forget(pidfd.pid);
            if since.elapsed() >= HEALTHY {
                delay = MIN_BACKOFF;
            }
            tracing::warn!(pid = pidfd.pid, restart_in = ?delay, "postgresql exited");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_BACKOFF);
        let Some(pg) = weak.upgrade() else { return };
        if pg.stopping() {
            return;
        }
        match pg.launch().await {
            Ok(pidfd) => running = Some(pidfd),
            Err(e) => tracing::error!(error = %e, "cannot restart postgresql"),
        }
    }
}

/// The cgroup directories for `<parent>/<name>`: one on cgroup v2, one per mounted
/// controller of [`V1_CONTROLLERS`] on v1 or hybrid systems.
fn cgroup_dirs(parent: &str, name: &str) -> io::Result<Vec<PathBuf>> {
    let mut rel = PathBuf::new();
    for part in parent.split('/').filter(|p| !p.is_empty()).chain([name]) {
        if part == "." || part == ".." || part.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid cgroup path {parent}/{name}"),
            ));
        }
        rel.push(part);
    }
    if name.is_empty() || name.contains('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid cgroup name {name:?}"),
        ));
    }
    let root = Path::new(CGROUP_ROOT);
    if root.join("cgroup.controllers").exists() {
        return Ok(vec![root.join(rel)]);
    }
    let dirs: Vec<PathBuf> = V1_CONTROLLERS
        .iter()
        .map(|c| root.join(c))
        .filter(|d| d.join("cgroup.procs").exists())
        .map(|d| d.join(&rel))
        .collect();
    if dirs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no cgroup hierarchy under {CGROUP_ROOT}"),
        ));
    }
    Ok(dirs)
}

/// Creates the cgroup `<parent>/<name>` (in every hierarchy) and opens its `cgroup.procs`.
fn open_cgroup_procs(parent: &str, name: &str) -> io::Result<Vec<File>> {
    let with_path =
        |p: &Path, e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", p.display()));
    cgroup_dirs(parent, name)?
        .into_iter()
        .map(|dir| {
            fs::create_dir_all(&dir).map_err(|e| with_path(&dir, e))?;
            let procs = dir.join("cgroup.procs");
            OpenOptions::new()
                .write(true)
                .open(&procs)
                .map_err(|e| with_path(&procs, e))
        })
        .collect()
}

/// Moves process `pid` into the cgroup `<parent>/<name>` (made if missing): on cgroup v2
/// `/sys/fs/cgroup/<parent>/<name>`, on v1 or hybrid systems the same path under each of the
/// memory, pids and cpu hierarchies that is mounted. Limits are the caller's to set.
pub fn place_in_cgroup(parent: &str, name: &str, pid: u32) -> io::Result<()> {
    for mut procs in open_cgroup_procs(parent, name)? {
        procs.write_all(pid.to_string().as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

    use anyhow::Context as _;

    fn check_name(input: &str, ok: bool) {
        assert_eq!(check_ident("database name", input).is_ok(), ok, "{input:?}");
    }

    #[test]
    fn identifiers() {
        check_name("notes", true);
        check_name("notes_2", true);
        check_name("_x", true);
        check_name(&"a".repeat(63), true);
        check_name(&"a".repeat(64), false);
        check_name("", false);
        check_name("2notes", false);
        check_name("Notes", false);
        check_name("no-tes", false);
        check_name("no\"tes", false);
        check_name("nötes", false);
        check_name("postgres", false);
        check_name("template1", false);
        check_name("public", false);
        check_name("pg_notes", false);
        assert!(check_password("r", &random_password()).is_ok());
        for bad in [
            "short",
            "with'quote",
            "with\"quote",
            "back\\slash",
            "tab\there12",
            "ünïcode12",
        ] {
            assert!(check_password("r", bad).is_err(), "{bad:?}");
        }
        let err = check_password("r", "sec'ret12")
            .map(|_| ())
            .err()
            .map(|e| e.to_string());
        assert!(
            !err.unwrap_or_default().contains("sec'ret"),
            "password must not be in messages"
        );
        assert_eq!(quote_literal("a'b"), "'a''b'");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        let p = random_password();
        assert_eq!(p.len(), 32);
        assert!(p.bytes().all(|b| b.is_ascii_alphanumeric()));
    }

    #[test]
    fn access_files() {
        let grants = [
            DbGrant {
                database: "all".to_string(),
                role: "notes".to_string(),
                password: random_password(),
                addresses: vec![
                    IpAddr::V4(Ipv4Addr::new(10, 128, 0, 5)),
                    IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 5)),
                ],
            },
            DbGrant {
                database: "wiki".to_string(),
                role: "wiki".to_string(),
                password: random_password(),
                addresses: vec![],
            },
        ];
        let hba = hba_conf(&grants);
        let rules: Vec<&str> = hba.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            rules,
            [
                "local all postgres peer map=homeport",
                "host \"all\" \"notes\" 10.128.0.5/32 scram-sha-256",
                "host \"all\" \"notes\" fd00:1::5/128 scram-sha-256",
            ]
        );
        assert!(!hba.contains(&grants[0].password));
        let listen = [
            IpAddr::V4(Ipv4Addr::new(10, 128, 0, 1)),
            IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1)),
        ];
        let conf = server_conf(&listen, 5433, "/d/run", "g1");
        assert!(conf.contains("listen_addresses = '10.128.0.1,fd00:1::1'\n"));
        assert!(conf.contains("port = 5433\n"));
        assert!(conf.contains("unix_socket_directories = '/d/run'\n"));
        assert!(server_conf(&[], 5433, "/d/run", "g1").contains("listen_addresses = ''\n"));
        assert!(conf_path(Path::new("/a,b")).is_err());
        assert!(conf_path(Path::new("/a'b")).is_err());
        assert_eq!(
            parse_pid_file(
                "123\n/d/data\n1700000000\n5433\n/d/run\n127.0.0.1\n  1234 5\nready   \n"
            ),
            Some(PidFile {
                pid: 123,
                port: Some(5433),
                socket_dir: Some("/d/run".to_string())
            })
        );
        assert_eq!(parse_pid_file("garbage"), None);
        assert!(cgroup_dirs("../x", "y").is_err());
        assert!(cgroup_dirs("x", "a/b").is_err());
    }

    #[test]
    fn bin_dir_choice() -> anyhow::Result<()> {
        let root = tempfile::tempdir()?;
        for v in ["13", "15", "9", "notaversion"] {
            let bin = root.path().join(v).join("bin");
            fs::create_dir_all(&bin)?;
            fs::write(bin.join("postgres"), "")?;
        }
        fs::create_dir_all(root.path().join("17/bin"))?; // no binary: skipped
        let pick = |want| find_bin_dir(root.path(), want);
        assert_eq!(pick(None), Some(root.path().join("15/bin")));
        assert_eq!(pick(Some("13")), Some(root.path().join("13/bin")));
        assert_eq!(pick(Some("17")), Some(root.path().join("15/bin")));
        Ok(())
    }

    /// Real servers need root (to run as `postgres`) and an installed PostgreSQL.
    fn skip_unless_possible() -> bool {
        let ok = nix::unistd::geteuid().is_root()
            && lookup_user().is_ok()
            && find_bin_dir(Path::new(PACKAGE_ROOT), None).is_some();
        if !ok {
            eprintln!("skipped: needs root and postgresql");
        }
        !ok
    }

    /// Kills every process of the cluster on drop, also when a test fails.
    struct ServerGuard {
        data: PathBuf,
    }

    impl Drop for ServerGuard {
        fn drop(&mut self) {
            let Ok(user) = lookup_user() else { return };
            for pid in cluster_processes(&self.data, user.uid) {
                let Ok(raw) = i32::try_from(pid) else {
                    continue;
                };
                let pid = nix::unistd::Pid::from_raw(raw);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                // Reaps the postmaster when it is this process's child; ECHILD otherwise.
                let _ = nix::sys::wait::waitpid(pid, None);
            }
        }
    }

    struct World {
        pg: Arc<Postgres>,
        cfg: PostgresConfig,
        _guard: ServerGuard,
        _tmp: tempfile::TempDir,
    }

    async fn world(grants: &[DbGrant]) -> anyhow::Result<World> {
        let tmp = tempfile::Builder::new()
            .prefix("homeport-pg")
            .tempdir_in("/tmp")?;
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o711))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = fs::canonicalize(tmp.path())?.join("pg");
        let guard = ServerGuard {
            data: dir.join("data"),
        };
        // What an initdb killed half way leaves: it must not count as a cluster.
        fs::create_dir_all(dir.join("data.new"))?;
        fs::write(dir.join("data.new/PG_VERSION"), "15\n")?;
        let cfg = PostgresConfig {
            dir,
            bin_dir: None,
            listen: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            port,
            cgroup_parent: None,
        };
        let pg = Postgres::start(cfg.clone(), grants).await?;
        anyhow::ensure!(!cfg.dir.join("data.new").exists(), "staging directory left");
        Ok(World {
            pg,
            cfg,
            _guard: guard,
            _tmp: tmp,
        })
    }

    fn grant(name: &str, addr: [u8; 4]) -> DbGrant {
        DbGrant {
            database: format!("{name}_db"),
            role: format!("{name}_user"),
            password: random_password(),
            addresses: vec![IpAddr::V4(Ipv4Addr::from(addr))],
        }
    }

    /// Logs in over TCP from source address `from`, as an app would.
    async fn app_login(
        port: u16,
        from: [u8; 4],
        role: &str,
        password: &str,
        database: &str,
    ) -> anyhow::Result<Result<Client, tokio_postgres::Error>> {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(SocketAddr::from((from, 0)))?;
        let stream = sock
            .connect(SocketAddr::from(([127, 0, 0, 1], port)))
            .await?;
        let mut config = tokio_postgres::Config::new();
        config.user(role).password(password).dbname(database);
        Ok(match config.connect_raw(stream, NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                Ok(client)
            }
            Err(e) => Err(e),
        })
    }

    /// The SQLSTATE a failed login got (None: it succeeded or failed without one).
    fn refusal(r: &Result<Client, tokio_postgres::Error>) -> Option<SqlState> {
        r.as_ref().err().and_then(|e| e.code()).cloned()
    }

    const NO_RULE: SqlState = SqlState::INVALID_AUTHORIZATION_SPECIFICATION;
    const BAD_PASSWORD: SqlState = SqlState::INVALID_PASSWORD;

    #[tokio::test]
    async fn access_is_per_app_and_provisioning_is_idempotent() -> anyhow::Result<()> {
        if skip_unless_possible() {
            return Ok(());
        }
        let mut a = grant("a", [127, 0, 0, 2]);
        let b = grant("b", [127, 0, 0, 3]);
        let w = world(&[]).await?;
        let (pg, port) = (&w.pg, w.cfg.port);
        assert!(pg.pid().is_some());
        assert_eq!(pg.address(), (vec![IpAddr::V4(Ipv4Addr::LOCALHOST)], port));
        pg.ping().await?;
        pg.provision(&a).await?;
        pg.provision(&b).await?;
        pg.set_access(&[a.clone(), b.clone()]).await?;

        let a_from_a = |pw: String, db: String| {
            let role = a.role.clone();
            async move { app_login(port, [127, 0, 0, 2], &role, &pw, &db).await }
        };
        // The right role, address and password: in, and the role owns its database.
        let client = a_from_a(a.password.clone(), a.database.clone())
            .await?
            .context("a logs in")?;
        client
            .batch_execute("CREATE TABLE notes (id int PRIMARY KEY, body text); INSERT INTO notes VALUES (1, 'hi')")
            .await
            .context("a creates a table")?;
        drop(client);
        // A's role to B's database, B's role from A's address, the superuser over TCP,
        // A from an address that is not A's: no rule. A wrong password: refused.
        let r = a_from_a(a.password.clone(), b.database.clone()).await?;
        assert_eq!(refusal(&r), Some(NO_RULE));
        let r = app_login(port, [127, 0, 0, 2], &b.role, &b.password, &b.database).await?;
        assert_eq!(refusal(&r), Some(NO_RULE));
        let r = app_login(port, [127, 0, 0, 3], &b.role, &b.password, &b.database).await?;
        assert!(r.is_ok(), "b logs in from its own address: {:?}", r.err());
        for from in [[127, 0, 0, 1], [127, 0, 0, 2]] {
            let r = app_login(port, from, "postgres", &a.password, "postgres").await?;
            assert_eq!(refusal(&r), Some(NO_RULE));
        }
        let r = app_login(port, [127, 0, 0, 1], &a.role, &a.password, &a.database).await?;
        assert_eq!(refusal(&r), Some(NO_RULE));
        let r = a_from_a(random_password(), a.database.clone()).await?;
        assert_eq!(refusal(&r), Some(BAD_PASSWORD));

        // Provisioning again changes nothing but what differs: the new password.
        let old = std::mem::replace(&mut a.password, random_password());
        pg.provision(&a).await?;
        pg.provision(&a).await?;
        let r = a_from_a(old, a.database.clone()).await?;
        assert_eq!(refusal(&r), Some(BAD_PASSWORD));
        let client = a_from_a(a.password.clone(), a.database.clone())
            .await?
            .context("a logs in with its new password")?;
        let n: i64 = client
            .query_one("SELECT count(*) FROM notes", &[])
            .await?
            .try_get(0)?;
        assert_eq!(n, 1, "data survives provisioning");
        drop(client);

        // Dropping removes database and role, idempotently; A cannot log in any more.
        pg.drop_database(&a.database, &a.role).await?;
        pg.drop_database(&a.database, &a.role).await?;
        let r = a_from_a(a.password.clone(), a.database.clone()).await?;
        assert_eq!(refusal(&r), Some(BAD_PASSWORD), "the role is gone");
        pg.set_access(std::slice::from_ref(&b)).await?;
        let r = a_from_a(a.password.clone(), a.database.clone()).await?;
        assert_eq!(refusal(&r), Some(NO_RULE), "the rule is gone");
        let admin = pg.admin("postgres").await?;
        let left = admin
            .query_one(
                "SELECT (SELECT count(*) FROM pg_database WHERE datname = $1) + \
                        (SELECT count(*) FROM pg_roles WHERE rolname = $2)",
                &[&a.database, &a.role],
            )
            .await?;
        assert_eq!(left.try_get::<_, i64>(0)?, 0);
        let r = app_login(port, [127, 0, 0, 3], &b.role, &b.password, &b.database).await?;
        assert!(r.is_ok(), "b is untouched: {:?}", r.err());

        let pid = pg.pid().context("running")?;
        pg.stop().await;
        assert_eq!(pg.pid(), None);
        assert!(!is_cluster_process(pid, &w.pg.layout.data, w.pg.user.uid));
        Ok(())
    }

    #[tokio::test]
    async fn adopts_after_agent_restart_and_restarts_after_crash() -> anyhow::Result<()> {
        if skip_unless_possible() {
            return Ok(());
        }
        let a = grant("a", [127, 0, 0, 2]);
        let w = world(std::slice::from_ref(&a)).await?;
        let port = w.cfg.port;
        w.pg.provision(&a).await?;
        let client = app_login(port, [127, 0, 0, 2], &a.role, &a.password, &a.database)
            .await?
            .context("a logs in")?;
        client
            .batch_execute("CREATE TABLE t (v text); INSERT INTO t VALUES ('kept')")
            .await?;
        drop(client);
        let first = w.pg.pid().context("running")?;

        // The agent goes away (its handle is dropped, the server keeps running) and comes
        // back: the running server is adopted, not started twice.
        let World {
            pg,
            cfg,
            _tmp,
            _guard,
        } = w;
        drop(pg);
        let pg = Postgres::start(cfg.clone(), std::slice::from_ref(&a)).await?;
        assert_eq!(pg.pid(), Some(first), "adopted");
        let client = app_login(port, [127, 0, 0, 2], &a.role, &a.password, &a.database)
            .await?
            .context("a logs in after adoption")?;
        let v: String = client.query_one("SELECT v FROM t", &[]).await?.try_get(0)?;
        assert_eq!(v, "kept");
        drop(client);

        // The server crashes: the supervisor starts a new one.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(first)?),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let second = loop {
            if let Some(pid) = pg.pid().filter(|&p| p != first) {
                if pg.ping().await.is_ok() {
                    break pid;
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "no restart after a crash");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(is_cluster_process(second, &pg.layout.data, pg.user.uid));
        let client = app_login(port, [127, 0, 0, 2], &a.role, &a.password, &a.database)
            .await?
            .context("a logs in after the restart")?;
        let v: String = client.query_one("SELECT v FROM t", &[]).await?.try_get(0)?;
        assert_eq!(v, "kept");
        drop(client);

        // The agent comes back with another listen address: the server is restarted on it.
        drop(pg);
        let mut cfg = cfg;
        cfg.listen.push(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4)));
        let pg = Postgres::start(cfg.clone(), std::slice::from_ref(&a)).await?;
        let third = pg.pid().context("running")?;
        assert_ne!(third, second, "restarted for the new address");
        assert!(pg.listens_as_configured().await?);
        let stream = tokio::net::TcpStream::connect(("127.0.0.4", port)).await?;
        drop(stream);

        pg.stop().await;
        assert_eq!(pg.pid(), None);
        assert!(cluster_processes(&pg.layout.data, pg.user.uid).is_empty());
        Ok(())
    }

    #[test]
    fn place_in_cgroup_moves_a_process() -> anyhow::Result<()> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return Ok(());
        }
        let parent = format!("homeport-test-{}", std::process::id());
        let mut child = Command::new("sleep").arg("30").spawn()?;
        let placed = place_in_cgroup(&parent, "svc", child.id());
        let membership = fs::read_to_string(format!("/proc/{}/cgroup", child.id()));
        let _ = child.kill();
        let _ = child.wait();
        let dirs = cgroup_dirs(&parent, "svc")?;
        for dir in &dirs {
            let _ = fs::remove_dir(dir);
            if let Some(p) = dir.parent() {
                let _ = fs::remove_dir(p);
            }
        }
        placed?;
        let want = format!("/{parent}/svc");
        let lines: Vec<String> = membership?
            .lines()
            .filter(|l| l.ends_with(&want))
            .map(str::to_string)
            .collect();
        assert_eq!(lines.len(), dirs.len(), "in every hierarchy: {lines:?}");
        Ok(())
    }
}
