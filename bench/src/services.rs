//! `services`: memory of the services that five apps needing a SQL database and a cache
//! each cost, Homeport's way (one shared PostgreSQL server with a database per app, one small
//! `redis-server` per app in the app's namespace) against the docker-compose way (every app
//! bundles its own PostgreSQL and Redis), on the same machine in the same run.
//!
//! Both sides run the same binaries with the same settings that matter for memory (the
//! agent's `shared_buffers` and `max_connections`; Redis with no persistence and the same
//! `maxmemory`), get the same small workload per app (a table with a few hundred rows, an
//! index and queries; a few hundred keys) and are measured the same way, at one app and at
//! five, then again with one idle connection per app held open.
//!
//! The figure compared (`total_bytes`) is the sum of PSS over every process of the services,
//! which splits pages that processes share (the binaries and libraries) between them, except
//! that each PostgreSQL server's shared memory segment counts at its resident size, once.
//! PSS alone misses most of that segment: a page of it counts only while a live process has
//! it mapped, and the pages that backends touched (a `CREATE DATABASE` copies its template
//! through the shared buffers) stay resident after the backends exit, mapped by nobody. PSS
//! alone is reported beside it (`total_pss_bytes`, `ratio_pss`), and so are the cgroups'
//! figures (usage, anon, shmem): their shmem agrees with the resident segments; their usage
//! includes page cache charged to whichever cgroup touched a file first, so it is not
//! compared. The sides run one after the other, never together, so neither shares pages with
//! the other. Not counted on either side: the agent itself (see the `memory` benchmark) and
//! Docker's daemons and per-container shims.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::{AsRawFd as _, RawFd};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use homeport::api::types::{AppDetail, RunState};
use homeport_testkit::{AgentProcess, BusyboxOpts, Registry};
use serde_json::json;

use super::report;

const APPS: usize = 5;
/// The whole benchmark stops with an error past this.
const TIME_LIMIT: Duration = Duration::from_secs(150);
/// As the agent's `homeport.conf` (`services/postgres.rs`).
const SHARED_BUFFERS: &str = "16MB";
const MAX_CONNECTIONS: u32 = 100;
/// The manifest's default `[cache] memory`, given explicitly to both sides.
const CACHE_MEMORY: u64 = 64 << 20;
/// Rows each app inserts into its table.
const ROWS: usize = 500;
/// Keys each app sets (plus hashes and a list, see [`redis_workload`]).
const KEYS: usize = 300;
/// Time given to servers to settle before the workload and before measuring.
const SETTLE: Duration = Duration::from_secs(3);
/// Samples per measurement, [`SAMPLE_GAP`] apart; the one with the median total is kept.
const SAMPLES: usize = 3;
const SAMPLE_GAP: Duration = Duration::from_secs(1);

pub async fn services(bins: &Path) -> Result<()> {
    let deadline = Deadline(Instant::now() + TIME_LIMIT);
    let pg_bin = postgres_bin_dir()?;
    let ours = homeport_side(bins, &deadline)
        .await
        .context("homeport's side")?;
    let theirs = compose_side(&pg_bin, &deadline).context("the compose side")?;

    let per_app = |at_1: &Snapshot, at_all: &Snapshot, f: fn(&Snapshot) -> u64| {
        (f(at_all) as f64 - f(at_1) as f64) / (APPS - 1) as f64
    };
    let ratio = |f: fn(&Snapshot) -> u64, h: &Snapshot, c: &Snapshot| f(c) as f64 / f(h) as f64;
    let (h, c) = (&ours.at_all, &theirs.at_all);
    let (hc, cc) = (&ours.connected, &theirs.connected);
    let mib = |b: f64| b / f64::from(1 << 20);
    println!(
        "services: {APPS} apps: homeport {:.1} MiB (postgres {:.1}, caches {:.1}; {} processes) \
         vs compose {:.1} MiB (postgres {:.1}, redis {:.1}; {} processes): {:.2}x \
         (PSS alone {:.1} vs {:.1} MiB: {:.2}x); each further app +{:.1} vs +{:.1} MiB; \
         with a connection per app held open {:.1} vs {:.1} MiB: {:.2}x",
        mib(h.total() as f64),
        mib(h.postgres.resident() as f64),
        mib(h.cache.resident() as f64),
        h.processes(),
        mib(c.total() as f64),
        mib(c.postgres.resident() as f64),
        mib(c.cache.resident() as f64),
        c.processes(),
        ratio(Snapshot::total, h, c),
        mib(h.total_pss() as f64),
        mib(c.total_pss() as f64),
        ratio(Snapshot::total_pss, h, c),
        mib(per_app(&ours.at_1, h, Snapshot::total)),
        mib(per_app(&theirs.at_1, c, Snapshot::total)),
        mib(hc.total() as f64),
        mib(cc.total() as f64),
        ratio(Snapshot::total, hc, cc),
    );
    report(
        "services",
        json!({
            "what": "memory of the services of apps that each need a SQL database and a cache: \
                     homeport (one shared postgresql, a redis-server per app) vs the compose way \
                     (a postgresql and a redis per app), after a small workload per app; \
                     total_bytes = PSS of the services' processes with each postgresql's shared \
                     memory segment counted at its resident size",
            "apps": APPS,
            "workload": format!(
                "per app: a table with {ROWS} rows, an index, ANALYZE and two queries (psql, \
                 connection closed after; *_with_connections: then one idle psql connection \
                 per app held open); {KEYS} SETs of 200-byte values with expiry, GETs, \
                 50 hashes, a 50-element list, INCR (redis-cli)"
            ),
            "settings": {
                "postgres": format!(
                    "{}, shared_buffers {SHARED_BUFFERS}, max_connections {MAX_CONNECTIONS}",
                    pg_bin.display()
                ),
                "redis": format!("maxmemory {CACHE_MEMORY} allkeys-lru, save \"\", appendonly no"),
            },
            "homeport": h.json("caches"),
            "homeport_at_1_app": ours.at_1.json("caches"),
            "homeport_with_connections": hc.json("caches"),
            "compose": c.json("redis"),
            "compose_at_1_app": theirs.at_1.json("redis"),
            "compose_with_connections": cc.json("redis"),
            "ratio": ratio(Snapshot::total, h, c),
            "ratio_uses": "total_bytes, compose / homeport, 5 apps: PSS, except that each \
                           postgresql's shared memory segment counts at its resident size (PSS \
                           misses the pages of it that exited backends touched)",
            "ratio_pss": ratio(Snapshot::total_pss, h, c),
            "ratio_with_connections": ratio(Snapshot::total, hc, cc),
            "ratio_pss_with_connections": ratio(Snapshot::total_pss, hc, cc),
            "per_additional_app_bytes": {
                "homeport": per_app(&ours.at_1, h, Snapshot::total),
                "compose": per_app(&theirs.at_1, c, Snapshot::total),
                "how": "(total_bytes at 5 apps - total_bytes at 1 app) / 4",
            },
            "per_additional_app_pss_bytes": {
                "homeport": per_app(&ours.at_1, h, Snapshot::total_pss),
                "compose": per_app(&theirs.at_1, c, Snapshot::total_pss),
                "how": "(total_pss_bytes at 5 apps - total_pss_bytes at 1 app) / 4",
            },
        }),
    )
}

/// Fails once the benchmark has run out of time.
struct Deadline(Instant);

impl Deadline {
    /// The time left, at most `cap`; an error naming `what` if none is.
    fn left(&self, what: &str, cap: Duration) -> Result<Duration> {
        match self.0.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Ok(left.min(cap)),
            _ => bail!("out of time ({TIME_LIMIT:?}) before {what}"),
        }
    }
}

/// Memory of a set of processes, from `/proc/PID/smaps_rollup`, in bytes.
#[derive(Debug, Default, Clone, Copy)]
struct Mem {
    processes: usize,
    rss: u64,
    pss: u64,
    /// PSS of anonymous memory, of files (the binaries and libraries), of shared memory
    /// (PostgreSQL's shared buffers and WAL buffers, as far as processes have them mapped).
    pss_anon: u64,
    pss_file: u64,
    pss_shmem: u64,
    /// Resident pages of the shared memory segments of the PostgreSQL servers among them,
    /// each segment counted whole and once (see [`shared_segments_resident`]).
    shmem_resident: u64,
    /// Private clean + private dirty: what stopping them would give back.
    private: u64,
}

impl Mem {
    fn add(&mut self, pid: u32) -> Result<()> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
        let field = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .map_or(0, |kib| kib * 1024)
        };
        self.processes += 1;
        self.rss += field("Rss");
        self.pss += field("Pss");
        self.pss_anon += field("Pss_Anon");
        self.pss_file += field("Pss_File");
        self.pss_shmem += field("Pss_Shmem");
        self.private += field("Private_Clean") + field("Private_Dirty");
        Ok(())
    }

    /// `root` and every descendant of it. Only the root must exist: a child may exit
    /// (a backend, an autovacuum worker) between the listing and the reading.
    fn of_tree(root: u32) -> Result<Mem> {
        let mut m = Mem::default();
        m.add(root)
            .with_context(|| format!("read the memory of process {root}"))?;
        for pid in descendants(root) {
            let _ = m.add(pid);
        }
        Ok(m)
    }

    /// What the processes keep in memory: PSS of their own and file pages, plus their
    /// shared memory segments' resident pages. PSS alone sees a segment's page only while a
    /// live process has it mapped: pages that exited backends touched stay resident in the
    /// segment but show in no process's PSS.
    fn resident(&self) -> u64 {
        self.pss.saturating_sub(self.pss_shmem) + self.shmem_resident
    }

    fn plus(self, o: Mem) -> Mem {
        Mem {
            processes: self.processes + o.processes,
            rss: self.rss + o.rss,
            pss: self.pss + o.pss,
            pss_anon: self.pss_anon + o.pss_anon,
            pss_file: self.pss_file + o.pss_file,
            pss_shmem: self.pss_shmem + o.pss_shmem,
            shmem_resident: self.shmem_resident + o.shmem_resident,
            private: self.private + o.private,
        }
    }
}

/// Every process below `root` (children, their children, ...), from the parents in /proc.
fn descendants(root: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
            let ppid = std::fs::read_to_string(e.path().join("stat"))
                .ok()
                .and_then(|s| {
                    let (_, rest) = s.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                });
            if let Some(ppid) = ppid {
                parents.push((pid, ppid));
            }
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

/// Resident size of the shared memory segments process `pid` maps (PostgreSQL's main
/// segment, an anonymous shared mapping, and its small System V and POSIX ones): every page
/// of a segment that is in memory, whether or not a live process has it mapped. Measured
/// with `fincore` (util-linux) through `/proc/PID/map_files`, which needs root.
fn shared_segments_resident(pid: u32) -> Result<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    for line in maps.lines() {
        // `start-end perms offset dev inode path`
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(range), Some(perms), Some(dev), Some(inode)) =
            (f.first(), f.get(1), f.get(3), f.get(4))
        else {
            continue;
        };
        let path = f.get(5..).map(|p| p.join(" ")).unwrap_or_default();
        let shmem = ["/dev/zero", "/SYSV", "/dev/shm/"]
            .iter()
            .any(|p| path.starts_with(p));
        if !perms.ends_with('s') || !shmem || !seen.insert((*dev, *inode)) {
            continue;
        }
        let out = output_within(
            Command::new("fincore")
                .args(["--bytes", "--noheadings", "--output", "RES"])
                .arg(format!("/proc/{pid}/map_files/{range}")),
            b"",
            Duration::from_secs(10),
        )?;
        total += out
            .trim()
            .parse::<u64>()
            .with_context(|| format!("fincore of {path} in process {pid}: {out:?}"))?;
    }
    Ok(total)
}

/// Memory of a group of cgroups (cgroup v1's memory hierarchy, or v2), summed.
#[derive(Debug, Default, Clone, Copy)]
struct CgroupMem {
    usage: u64,
    anon: u64,
    shmem: u64,
}

/// The memory hierarchy's root and whether it is v2.
fn memory_hierarchy() -> Option<(PathBuf, bool)> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        Some((root.to_path_buf(), true))
    } else if root.join("memory/memory.usage_in_bytes").exists() {
        Some((root.join("memory"), false))
    } else {
        None
    }
}

/// Sums the memory of the cgroups at `paths` (relative to the hierarchy's root); `None`
/// when there is no memory hierarchy or a cgroup lacks the figures.
fn cgroup_memory(paths: &[String]) -> Option<CgroupMem> {
    let (root, v2) = memory_hierarchy()?;
    let read = |p: &Path| std::fs::read_to_string(p).ok();
    let mut sum = CgroupMem::default();
    for p in paths {
        let dir = root.join(p);
        let usage = if v2 {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        let stat = read(&dir.join("memory.stat"))?;
        let field = |name: &str| -> Option<u64> {
            stat.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        };
        sum.usage += read(&dir.join(usage))?.trim().parse::<u64>().ok()?;
        sum.anon += field(if v2 { "anon" } else { "total_rss" })?;
        sum.shmem += field(if v2 { "shmem" } else { "total_shmem" })?;
    }
    Some(sum)
}

/// One measurement of one side.
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    postgres: Mem,
    cache: Mem,
    cgroups: Option<CgroupMem>,
}

impl Snapshot {
    fn total_pss(&self) -> u64 {
        self.postgres.pss + self.cache.pss
    }

    /// The figure compared: see [`Mem::resident`].
    fn total(&self) -> u64 {
        self.postgres.resident() + self.cache.resident()
    }

    fn processes(&self) -> usize {
        self.postgres.processes + self.cache.processes
    }

    fn json(&self, cache_name: &str) -> serde_json::Value {
        let total = self.postgres.plus(self.cache);
        let mut v = json!({
            "total_bytes": self.total(),
            "postgres_bytes": self.postgres.resident(),
            format!("{cache_name}_bytes"): self.cache.resident(),
            "postgres_shared_memory_resident_bytes": self.postgres.shmem_resident,
            "postgres_pss_bytes": self.postgres.pss,
            format!("{cache_name}_pss_bytes"): self.cache.pss,
            "total_pss_bytes": total.pss,
            "processes": total.processes,
            "postgres_processes": self.postgres.processes,
            format!("{cache_name}_processes"): self.cache.processes,
            "postgres_private_bytes": self.postgres.private,
            format!("{cache_name}_private_bytes"): self.cache.private,
            "total_private_bytes": total.private,
            "postgres_pss_anon_file_shmem_bytes": [self.postgres.pss_anon, self.postgres.pss_file, self.postgres.pss_shmem],
            format!("{cache_name}_pss_anon_file_shmem_bytes"): [self.cache.pss_anon, self.cache.pss_file, self.cache.pss_shmem],
            "total_rss_bytes": total.rss,
        });
        if let Some(c) = self.cgroups {
            v["cgroups"] = json!({
                "usage_bytes": c.usage,
                "anon_bytes": c.anon,
                "shmem_bytes": c.shmem,
                "note": "memory.usage_in_bytes (v2: memory.current) and memory.stat's rss and \
                         shmem, summed over the services' cgroups; includes page cache, charged \
                         to the cgroup that first touched a page",
            });
        }
        v
    }
}

/// Takes [`SAMPLES`] snapshots and keeps the one with the median total (a backend or an
/// autovacuum worker may come and go). `postmasters` are the roots of the PostgreSQL trees,
/// `caches` the cache servers' pids.
fn measure(
    postmasters: &dyn Fn() -> Result<Vec<u32>>,
    caches: &dyn Fn() -> Result<Vec<u32>>,
    cgroups: &[String],
) -> Result<Snapshot> {
    let mut snaps = Vec::new();
    for i in 0..SAMPLES {
        if i > 0 {
            std::thread::sleep(SAMPLE_GAP);
        }
        let (mut postgres, mut cache) = (Mem::default(), Mem::default());
        for pid in postmasters()? {
            let mut tree = Mem::of_tree(pid)?;
            tree.shmem_resident = shared_segments_resident(pid)
                .with_context(|| format!("shared memory of postgresql {pid}"))?;
            postgres = postgres.plus(tree);
        }
        for pid in caches()? {
            cache = cache.plus(Mem::of_tree(pid)?);
        }
        snaps.push(Snapshot {
            postgres,
            cache,
            cgroups: cgroup_memory(cgroups),
        });
    }
    snaps.sort_by_key(Snapshot::total);
    snaps.get(SAMPLES / 2).copied().context("no memory samples")
}

/// The first line of a pidfile as a pid.
fn read_pid(path: &Path) -> Result<u32> {
    std::fs::read_to_string(path)
        .with_context(|| format!("read {}", path.display()))?
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("no pid in {}", path.display()))
}

/// Runs a command with `stdin` as its input, killing it after `limit`; returns its stdout.
fn output_within(cmd: &mut Command, stdin: &[u8], limit: Duration) -> Result<String> {
    use std::io::{Read as _, Seek as _};
    let mut input = tempfile::tempfile()?;
    input.write_all(stdin)?;
    input.rewind()?;
    let mut out = tempfile::tempfile()?;
    let mut err = tempfile::tempfile()?;
    let mut child = cmd
        .stdin(input)
        .stdout(out.try_clone()?)
        .stderr(err.try_clone()?)
        .spawn()
        .with_context(|| format!("run {:?}", cmd.get_program()))?;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (mut o, mut e) = (String::new(), String::new());
    out.rewind()?;
    out.read_to_string(&mut o)?;
    err.rewind()?;
    err.read_to_string(&mut e)?;
    if !status.success() {
        bail!("{cmd:?} failed ({status}): {}", e.trim());
    }
    Ok(o)
}

/// A command run in the network namespace at `netns` (an app's), or as it is.
fn command_in(netns: Option<&Path>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.display())).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// What an app does with its database: a table, rows, an index, statistics, two queries.
fn sql_workload(netns: Option<&Path>, url: &str, deadline: &Deadline) -> Result<()> {
    let psql = |sql: &str| -> Result<String> {
        let limit = deadline.left("the sql workload", Duration::from_secs(30))?;
        let out = output_within(
            command_in(netns, "psql")
                .args([
                    "-X",
                    "-q",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    url,
                    "-c",
                    sql,
                ])
                .env("PGCONNECT_TIMEOUT", "5"),
            b"",
            limit,
        )?;
        Ok(out.trim().to_string())
    };
    let count = psql(&format!(
        "CREATE TABLE IF NOT EXISTS items (id serial PRIMARY KEY, name text NOT NULL, \
         body text, created timestamptz NOT NULL DEFAULT now()); \
         INSERT INTO items (name, body) SELECT 'item ' || g, repeat(md5(g::text), 6) \
         FROM generate_series(1, {ROWS}) g; \
         CREATE INDEX IF NOT EXISTS items_name ON items (name); \
         ANALYZE items; \
         SELECT count(*) FROM items"
    ))?;
    if count != ROWS.to_string() {
        bail!("the table holds {count:?} rows, not {ROWS}");
    }
    let rows = psql(
        "SELECT a.name, length(a.body) FROM items a JOIN items b ON b.id = a.id + 1 \
         WHERE a.name LIKE 'item 4%' ORDER BY a.created DESC, a.name LIMIT 20",
    )?;
    if rows.lines().count() != 20 {
        bail!("the query returned {rows:?}");
    }
    Ok(())
}

/// The commands an app sends its cache, and the `DBSIZE` they leave.
fn redis_workload() -> (String, usize) {
    let mut s = String::new();
    for k in 0..KEYS {
        let value = format!("v{k:05}-").repeat(25);
        s.push_str(&format!("SET session:{k} {value} EX 3600\n"));
    }
    for k in (0..KEYS).step_by(3) {
        s.push_str(&format!("GET session:{k}\n"));
    }
    for k in 0..50 {
        s.push_str(&format!(
            "HSET user:{k} name user{k} email user{k}@example.com visits {k}\n"
        ));
        s.push_str(&format!("LPUSH queue job{k}\n"));
        s.push_str("INCR hits\n");
    }
    s.push_str("DBSIZE\n");
    (s, KEYS + 50 + 2)
}

/// Runs [`redis_workload`] with redis-cli against `127.0.0.1:port` (in `netns` if given).
fn cache_workload(
    netns: Option<&Path>,
    port: u16,
    password: &str,
    deadline: &Deadline,
) -> Result<()> {
    let (commands, keys) = redis_workload();
    let limit = deadline.left("the cache workload", Duration::from_secs(30))?;
    let out = output_within(
        command_in(netns, "redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .env("REDISCLI_AUTH", password),
        commands.as_bytes(),
        limit,
    )?;
    if let Some(e) = out.lines().find(|l| {
        ["ERR", "NOAUTH", "WRONGPASS", "(error)"]
            .iter()
            .any(|p| l.starts_with(p))
    }) {
        bail!("redis answered {e:?}");
    }
    let size = out.lines().last().unwrap_or_default().trim();
    if size != keys.to_string() {
        bail!("the cache holds {size:?} keys, not {keys}");
    }
    Ok(())
}

/// The measurements of one side: with one app, with all of them, and with all of them each
/// holding one idle connection to its database.
struct Side {
    at_1: Snapshot,
    at_all: Snapshot,
    connected: Snapshot,
}

/// Idle database connections, one per app, as a running app keeps its pool open; closed on
/// drop (psql exits at the end of its input).
#[derive(Default)]
struct Held(Vec<(Child, Option<std::process::ChildStdin>)>);

impl Held {
    fn open(&mut self, netns: Option<&Path>, url: &str) -> Result<()> {
        let mut child = command_in(netns, "psql")
            .args(["-X", "-q", "-A", "-t", url])
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("run psql")?;
        let stdin = child.stdin.take();
        self.0.push((child, None));
        let mut stdin = stdin.context("psql's stdin")?;
        stdin.write_all(b"SELECT count(*) FROM items;\n")?;
        if let Some(last) = self.0.last_mut() {
            last.1 = Some(stdin);
        }
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        for (_, stdin) in &mut self.0 {
            drop(stdin.take());
        }
        for (child, _) in &mut self.0 {
            let start = Instant::now();
            while matches!(child.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Checks that the connections of `held` show as backends: `connected` has a PostgreSQL
/// process per app more than `idle`.
fn check_connected(idle: &Snapshot, connected: &Snapshot) -> Result<()> {
    if connected.postgres.processes < idle.postgres.processes + APPS {
        bail!(
            "{} postgresql processes with a connection per app open, {} without",
            connected.postgres.processes,
            idle.postgres.processes
        );
    }
    Ok(())
}

/// Homeport: a real agent, apps installed through its API with `[database]` and `[cache]`.
async fn homeport_side(bins: &Path, deadline: &Deadline) -> Result<Side> {
    let apps = |n: usize| (0..n).map(|i| format!("app{i}")).collect::<Vec<_>>();
    let reg = Registry::start()?;
    homeport_testkit::push_busybox(&reg, "bench", "1", &BusyboxOpts::default())?;
    let agent = Agent {
        agent: Some(super::agent(bins, &reg)?),
        cgroups: std::iter::once("postgres".to_string())
            .chain(apps(APPS).iter().map(|app| format!("{app}--cache")))
            .collect(),
    };
    let a = agent.agent.as_ref().context("no agent")?;
    let data = a.data_dir().to_path_buf();
    let pidfile = data.join("services/postgres/data/postmaster.pid");
    let postmaster = || Ok(vec![read_pid(&pidfile)?]);
    let measure_apps = |n: usize| {
        let caches = || {
            apps(n)
                .iter()
                .map(|app| read_pid(&data.join("apps").join(app).join("cache/cache.pid")))
                .collect()
        };
        let mut cgroups = vec![format!("{}/postgres", a.cgroup_parent())];
        cgroups.extend(
            apps(n)
                .iter()
                .map(|app| format!("{}/{app}--cache", a.cgroup_parent())),
        );
        measure(&postmaster, &caches, &cgroups)
    };

    let mut at_1 = None;
    for (i, app) in apps(APPS).iter().enumerate() {
        install(a, &reg, app, deadline)
            .await
            .with_context(|| format!("install {app}\n{}", log_tail(a)))?;
        if i == 0 {
            tokio::time::sleep(SETTLE).await;
            use_app(a, app, deadline)?;
            tokio::time::sleep(SETTLE).await;
            at_1 = Some(measure_apps(1)?);
        }
    }
    tokio::time::sleep(SETTLE).await;
    for app in &apps(APPS)[1..] {
        use_app(a, app, deadline)?;
    }
    tokio::time::sleep(SETTLE).await;
    let at_all = measure_apps(APPS)?;
    // Dropped before the agent, which cannot drop a database with connections.
    let mut held = Held::default();
    for app in &apps(APPS) {
        let c = credentials(a, app)?;
        held.open(Some(&c.netns), &c.db_url)?;
    }
    tokio::time::sleep(SETTLE).await;
    let connected = measure_apps(APPS)?;
    check_connected(&at_all, &connected)?;
    drop(held);
    Ok(Side {
        at_1: at_1.context("no measurement at one app")?,
        at_all,
        connected,
    })
}

/// The agent under test, and the cgroups it makes for its services (`<parent>/postgres`,
/// `<parent>/<app>--cache`, by name under its cgroup parent). Dropping the agent's handle
/// removes its apps and kills the services, but leaves these cgroups (it removes only the
/// parent, which fails while they exist): they are removed here, after the agent.
struct Agent {
    agent: Option<AgentProcess>,
    cgroups: Vec<String>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let Some(agent) = self.agent.take() else {
            return;
        };
        let parent = agent.cgroup_parent().to_string();
        drop(agent);
        let root = Path::new("/sys/fs/cgroup");
        for ctrl in homeport_testkit::cgroup_controllers() {
            let parent = root.join(ctrl).join(&parent);
            // A killed server may take a moment to leave its cgroup.
            for _ in 0..50 {
                if !parent.exists() {
                    break;
                }
                for n in &self.cgroups {
                    let _ = std::fs::remove_dir(parent.join(n));
                }
                if std::fs::remove_dir(&parent).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn log_tail(a: &AgentProcess) -> String {
    let log = a.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Installs `app` and waits until it runs and its cache has a pidfile.
async fn install(a: &AgentProcess, reg: &Registry, app: &str, deadline: &Deadline) -> Result<()> {
    let c = a.client();
    let m = format!(
        "name = \"{app}\"\nimage = \"{}/bench:1\"\n\n[database]\nvariant = \"postgres\"\n\n\
         [cache]\nmemory = \"{}M\"\n",
        reg.host(),
        CACHE_MEMORY >> 20
    );
    let limit = deadline.left("an install", Duration::from_secs(60))?;
    tokio::time::timeout(limit, c.install(&m, |_| {}))
        .await
        .context("install timed out")??;
    let cache_pid = a.data_dir().join("apps").join(app).join("cache/cache.pid");
    loop {
        let d: AppDetail = c.get(&format!("/v1/apps/{app}")).await?;
        if matches!(d.summary.run, RunState::Running { .. }) && cache_pid.exists() {
            return Ok(());
        }
        deadline.left(&format!("{app} ran ({:?})", d.summary.run), Duration::MAX)?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the agent gave an app: its database URL and cache password (from its environment
/// in the runtime bundle), and its network namespace.
struct Credentials {
    db_url: String,
    cache_password: String,
    netns: PathBuf,
}

fn credentials(a: &AgentProcess, app: &str) -> Result<Credentials> {
    let dir = a.data_dir().join("apps").join(app);
    let config = dir.join("bundle/config.json");
    let spec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&config).with_context(|| format!("read {}", config.display()))?,
    )?;
    let env = |key: &str| -> Result<String> {
        spec["process"]["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e.as_str()?.strip_prefix(key)?.strip_prefix('='))
            .next()
            .map(str::to_string)
            .with_context(|| format!("no {key} in the environment of {app}"))
    };
    let db_url = env("DATABASE_URL")?;
    let redis_url = env("REDIS_URL")?;
    let password = redis_url
        .strip_prefix("redis://:")
        .and_then(|r| r.split_once('@'))
        .map(|(pw, _)| pw.to_string())
        .context("no password in REDIS_URL")?;
    Ok(Credentials {
        db_url,
        cache_password: password,
        netns: dir.join("netns"),
    })
}

/// Runs the workload from inside the app's network namespace with the app's credentials.
fn use_app(a: &AgentProcess, app: &str, deadline: &Deadline) -> Result<()> {
    let c = credentials(a, app)?;
    sql_workload(Some(&c.netns), &c.db_url, deadline)
        .with_context(|| format!("{app}'s database"))?;
    cache_workload(
        Some(&c.netns),
        homeport::services::cache::PORT,
        &c.cache_password,
        deadline,
    )
    .with_context(|| format!("{app}'s cache"))
}

/// The `bin` directory of the highest PostgreSQL under `/usr/lib/postgresql` (what the agent
/// picks for a new cluster).
fn postgres_bin_dir() -> Result<PathBuf> {
    std::fs::read_dir("/usr/lib/postgresql")
        .context("/usr/lib/postgresql (apt install postgresql)")?
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((v, bin))
        })
        .max_by_key(|(v, _)| *v)
        .map(|(_, bin)| bin)
        .context("no postgresql in /usr/lib/postgresql/*/bin")
}

/// uid and gid of an OS user, from /etc/passwd.
fn os_user(name: &str) -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&name))
        .and_then(|f| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))
        .with_context(|| format!("no os user {name}"))
}

/// A port free on 127.0.0.1 right now.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One app's own PostgreSQL and Redis, as its compose file would run them.
struct ComposeApp {
    postgres: Child,
    redis: Option<Child>,
    pg_port: u16,
    redis_port: u16,
    password: String,
}

/// The compose way's servers, their directories and cgroups; all stopped and removed on drop.
struct Compose {
    apps: Vec<ComposeApp>,
    /// cgroups (relative to the memory hierarchy), made by us, children before parents.
    cgroups: Vec<String>,
    base_cgroup: String,
    bin: PathBuf,
    pg_user: (u32, u32),
    redis_user: (u32, u32),
    work: tempfile::TempDir,
}

impl Compose {
    fn new(bin: &Path) -> Result<Compose> {
        let work = tempfile::Builder::new()
            .prefix("homeport-bench-services")
            .tempdir()?;
        // The servers run as their own users and must pass through.
        std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o711))?;
        Ok(Compose {
            apps: Vec::new(),
            cgroups: Vec::new(),
            base_cgroup: format!("homeport-bench-services-{}", std::process::id()),
            bin: bin.to_path_buf(),
            pg_user: os_user("postgres")?,
            redis_user: os_user("redis").or_else(|_| os_user("nobody"))?,
            work,
        })
    }

    /// Makes the cgroup `<base>/<name>` and opens its `cgroup.procs` (a container's cgroup).
    fn cgroup(&mut self, name: &str) -> Result<Option<File>> {
        let Some((root, _)) = memory_hierarchy() else {
            return Ok(None);
        };
        let path = format!("{}/{name}", self.base_cgroup);
        std::fs::create_dir_all(root.join(&path))?;
        self.cgroups.push(path.clone());
        let procs = root.join(&path).join("cgroup.procs");
        Ok(Some(std::fs::OpenOptions::new().write(true).open(&procs)?))
    }

    /// Starts app `i`'s PostgreSQL (initdb, a database for the app as the official image's
    /// `POSTGRES_USER`/`POSTGRES_DB`/`POSTGRES_PASSWORD` would make) and Redis.
    fn start_app(&mut self, i: usize, deadline: &Deadline) -> Result<()> {
        let dir = self.work.path().join(format!("app{i}"));
        std::fs::create_dir(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
        let data = dir.join("data");
        let (uid, gid) = self.pg_user;
        std::fs::create_dir(&data)?;
        std::os::unix::fs::chown(&data, Some(uid), Some(gid))?;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))?;
        let password = homeport::services::postgres::random_password();
        let pwfile = dir.join("pw");
        std::fs::write(&pwfile, &password)?;
        std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid))?;
        std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o600))?;
        output_within(
            Command::new(self.bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "--username=app",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ])
                .arg(format!("--pwfile={}", pwfile.display()))
                .env_clear()
                .env("PATH", "/usr/bin:/bin")
                .current_dir("/")
                .uid(uid)
                .gid(gid),
            b"",
            deadline.left("initdb", Duration::from_secs(60))?,
        )?;
        std::fs::remove_file(&pwfile)?;
        let pg_port = free_port()?;
        let conf = data.join("postgresql.conf");
        let mut f = std::fs::OpenOptions::new().append(true).open(&conf)?;
        write!(
            f,
            "\n# homeport-bench: as the agent's homeport.conf\n\
             listen_addresses = '127.0.0.1'\n\
             port = {pg_port}\n\
             unix_socket_directories = '{}'\n\
             unix_socket_permissions = 0700\n\
             password_encryption = 'scram-sha-256'\n\
             ssl = off\n\
             shared_buffers = {SHARED_BUFFERS}\n\
             max_connections = {MAX_CONNECTIONS}\n\
             logging_collector = off\n",
            data.display()
        )?;
        drop(f);

        let log = File::create(dir.join("postgres.log"))?;
        let procs = self.cgroup(&format!("app{i}-postgres"))?;
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let postgres = spawn_as(&mut cmd, self.pg_user, procs.as_ref())?;
        // Registered at once: from here on, drop stops it.
        self.apps.push(ComposeApp {
            postgres,
            redis: None,
            pg_port,
            redis_port: 0,
            password: password.clone(),
        });
        let app = self.apps.len() - 1;
        loop {
            if let Some(s) = self.apps[app].postgres.try_wait()? {
                let log = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
                bail!("postgres exited ({s}): {log}");
            }
            let ready = Command::new("pg_isready")
                .args(["-q", "-h", "127.0.0.1", "-p", &pg_port.to_string()])
                .status()
                .context("run pg_isready")?;
            if ready.success() {
                break;
            }
            deadline.left("postgres became ready", Duration::MAX)?;
            std::thread::sleep(Duration::from_millis(50));
        }
        output_within(
            Command::new("psql")
                .args(["-X", "-q", "-U", "app", "-d", "postgres", "-h"])
                .arg(&data)
                .args(["-p", &pg_port.to_string(), "-c", "CREATE DATABASE app"]),
            b"",
            deadline.left("the app's database", Duration::from_secs(30))?,
        )?;

        let redis_port = free_port()?;
        let procs = self.cgroup(&format!("app{i}-redis"))?;
        let mut cmd = Command::new("redis-server");
        cmd.arg("-")
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(File::create(dir.join("redis.log"))?);
        let mut redis = spawn_as(&mut cmd, self.redis_user, procs.as_ref())?;
        let config = format!(
            "port {redis_port}\n\
             bind 127.0.0.1\n\
             protected-mode yes\n\
             requirepass \"{password}\"\n\
             save \"\"\n\
             appendonly no\n\
             maxmemory {CACHE_MEMORY}\n\
             maxmemory-policy allkeys-lru\n\
             daemonize no\n\
             supervised no\n\
             logfile \"\"\n\
             databases 16\n"
        );
        let written = redis
            .stdin
            .take()
            .context("redis-server's stdin")
            .and_then(|mut stdin| Ok(stdin.write_all(config.as_bytes())?));
        self.apps[app].redis = Some(redis);
        self.apps[app].redis_port = redis_port;
        written?;
        loop {
            let pong = output_within(
                Command::new("redis-cli")
                    .args(["-h", "127.0.0.1", "-p", &redis_port.to_string(), "PING"])
                    .env("REDISCLI_AUTH", &password),
                b"",
                Duration::from_secs(5),
            );
            if pong.is_ok_and(|p| p.trim() == "PONG") {
                return Ok(());
            }
            if let Some(r) = self.apps[app].redis.as_mut() {
                if let Some(s) = r.try_wait()? {
                    let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
                    bail!("redis-server exited ({s}): {log}");
                }
            }
            deadline.left("redis became ready", Duration::MAX)?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn db_url(&self, i: usize) -> Result<String> {
        let app = self.apps.get(i).context("no such compose app")?;
        Ok(format!(
            "postgresql://app:{}@127.0.0.1:{}/app",
            app.password, app.pg_port
        ))
    }

    fn use_app(&self, i: usize, deadline: &Deadline) -> Result<()> {
        let app = self.apps.get(i).context("no such compose app")?;
        let url = self.db_url(i)?;
        sql_workload(None, &url, deadline).with_context(|| format!("app{i}'s postgres"))?;
        cache_workload(None, app.redis_port, &app.password, deadline)
            .with_context(|| format!("app{i}'s redis"))
    }

    fn measure(&self, n: usize) -> Result<Snapshot> {
        let apps = &self.apps[..n.min(self.apps.len())];
        let mut cgroups = Vec::new();
        for i in 0..apps.len() {
            cgroups.push(format!("{}/app{i}-postgres", self.base_cgroup));
            cgroups.push(format!("{}/app{i}-redis", self.base_cgroup));
        }
        let postmasters = || Ok(apps.iter().map(|a| a.postgres.id()).collect());
        let caches = || {
            Ok(apps
                .iter()
                .filter_map(|a| a.redis.as_ref())
                .map(Child::id)
                .collect())
        };
        measure(&postmasters, &caches, &cgroups)
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        for app in &mut self.apps {
            stop(&mut app.postgres, libc::SIGINT, true);
            if let Some(r) = app.redis.as_mut() {
                stop(r, libc::SIGTERM, false);
            }
        }
        if let Some((root, _)) = memory_hierarchy() {
            for c in self.cgroups.iter().rev() {
                let _ = std::fs::remove_dir(root.join(c));
            }
            let _ = std::fs::remove_dir(root.join(&self.base_cgroup));
        }
    }
}

/// Sends `sig`, waits up to 10 s, then kills (with `tree`, every descendant too).
fn stop(child: &mut Child, sig: libc::c_int, tree: bool) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    let Ok(pid) = i32::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) on our own unreaped child, so the pid cannot have been reused.
    unsafe { libc::kill(pid, sig) };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if tree {
        for p in descendants(child.id()) {
            if let Ok(p) = i32::try_from(p) {
                // SAFETY: kill(2) on a child of our unreaped child, listed just now.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Spawns `cmd` as `user` in the cgroup whose `cgroup.procs` is `procs` (joined before the
/// server can fork, as a container's processes are).
fn spawn_as(cmd: &mut Command, user: (u32, u32), procs: Option<&File>) -> Result<Child> {
    let procs: Option<RawFd> = procs.map(|f| f.as_raw_fd());
    let (uid, gid) = user;
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (write, setgroups, setgid, setuid) on a descriptor that
    // stays open until `spawn` returns; it allocates nothing. The cgroup is joined while
    // still root (writing "0" moves the writer).
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = procs {
                if libc::write(fd, b"0".as_ptr().cast(), 1) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setgroups(0, std::ptr::null()) < 0
                || libc::setgid(gid) < 0
                || libc::setuid(uid) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("start {:?}", cmd.get_program()))
}

/// The compose way: per app, its own PostgreSQL cluster and its own Redis.
fn compose_side(bin: &Path, deadline: &Deadline) -> Result<Side> {
    let mut c = Compose::new(bin)?;
    c.start_app(0, deadline)?;
    std::thread::sleep(SETTLE);
    c.use_app(0, deadline)?;
    std::thread::sleep(SETTLE);
    let at_1 = c.measure(1)?;
    for i in 1..APPS {
        c.start_app(i, deadline)?;
    }
    std::thread::sleep(SETTLE);
    for i in 1..APPS {
        c.use_app(i, deadline)?;
    }
    std::thread::sleep(SETTLE);
    let at_all = c.measure(APPS)?;
    // Dropped before `c`: connections close before their servers stop.
    let mut held = Held::default();
    for i in 0..APPS {
        held.open(None, &c.db_url(i)?)?;
    }
    std::thread::sleep(SETTLE);
    let connected = c.measure(APPS)?;
    check_connected(&at_all, &connected)?;
    drop(held);
    Ok(Side {
        at_1,
        at_all,
        connected,
    })
}
