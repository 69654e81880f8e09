//! What the proxy saw of each app: counters for the API and one access-log line per request,
//! appended to the app's own log (so `homeport logs` shows both).
//!
//! Serving never waits for the log: lines go through a bounded queue to one writer thread; a
//! full queue drops the line and counts it.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Upper bounds (ms) of the latency buckets; one more bucket holds the rest.
pub const LATENCY_BUCKETS_MS: [f64; 7] = [1.0, 5.0, 25.0, 100.0, 500.0, 2500.0, 10_000.0];

/// Counters of one app, updated lock-free.
#[derive(Default)]
pub struct Traffic {
    requests: AtomicU64,
    classes: [AtomicU64; 5],
    buckets: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    latency_us: AtomicU64,
    log_dropped: AtomicU64,
}

/// The counters as the API shows them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrafficStats {
    pub requests: u64,
    /// Responses by status class: `1xx` … `5xx`.
    pub status: HashMap<String, u64>,
    /// Time to the response head, in ms: `[upper bound, count]`, the last bound `null` (more).
    pub latency_ms: Vec<(Option<f64>, u64)>,
    pub latency_ms_total: f64,
    /// Access-log lines dropped because the writer fell behind.
    pub log_dropped: u64,
}

impl Traffic {
    pub fn record(&self, status: u16, took: Duration) {
        self.requests.fetch_add(1, Relaxed);
        if let Some(c) = self.classes.get(usize::from(status / 100).wrapping_sub(1)) {
            c.fetch_add(1, Relaxed);
        }
        let ms = took.as_secs_f64() * 1000.0;
        let i = LATENCY_BUCKETS_MS
            .iter()
            .position(|&b| ms <= b)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Relaxed);
        }
        self.latency_us
            .fetch_add(took.as_micros().min(u128::from(u64::MAX)) as u64, Relaxed);
    }

    pub fn stats(&self) -> TrafficStats {
        TrafficStats {
            requests: self.requests.load(Relaxed),
            status: (1..=5)
                .zip(&self.classes)
                .map(|(c, n)| (format!("{c}xx"), n.load(Relaxed)))
                .collect(),
            latency_ms: LATENCY_BUCKETS_MS
                .iter()
                .map(|&b| Some(b))
                .chain([None])
                .zip(&self.buckets)
                .map(|(b, n)| (b, n.load(Relaxed)))
                .collect(),
            latency_ms_total: self.latency_us.load(Relaxed) as f64 / 1000.0,
            log_dropped: self.log_dropped.load(Relaxed),
        }
    }
}

/// How long the writer waits between batches: lines reach the file at most this late.
const BATCH_PAUSE: Duration = Duration::from_millis(20);

/// Appends access-log lines to app log files from a thread of its own.
pub struct AccessLog {
    tx: SyncSender<(PathBuf, String)>,
}

impl AccessLog {
    pub fn start() -> std::io::Result<AccessLog> {
        let (tx, rx) = sync_channel::<(PathBuf, String)>(4096);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                // The files stay open: the agent rotates logs by copy and truncate, so an
                // O_APPEND descriptor keeps writing to the live file.
                let mut files: HashMap<PathBuf, File> = HashMap::new();
                while let Ok(first) = rx.recv() {
                    // Take what has gathered, one write per file; then pause, so that under
                    // load senders rarely have to wake this thread (a wake-up per line cost
                    // more than the rest of the logging together).
                    let mut batch: HashMap<PathBuf, String> = HashMap::new();
                    for (path, line) in std::iter::once(first).chain(rx.try_iter()) {
                        batch.entry(path).or_default().push_str(&line);
                    }
                    for (path, text) in batch {
                        if !files.contains_key(&path) {
                            match OpenOptions::new().create(true).append(true).open(&path) {
                                Ok(f) => {
                                    files.insert(path.clone(), f);
                                }
                                Err(e) => {
                                    tracing::debug!(path = %path.display(), error = %e, "access log");
                                    continue;
                                }
                            }
                        }
                        let ok = files
                            .get_mut(&path)
                            .is_some_and(|f| f.write_all(text.as_bytes()).is_ok());
                        if !ok {
                            // Removed app or replaced file: open afresh next time.
                            files.remove(&path);
                        }
                    }
                    std::thread::sleep(BATCH_PAUSE);
                }
            })?;
        Ok(AccessLog { tx })
    }

    /// Queues a line (with its newline); `false` when it had to be dropped.
    pub fn write(&self, path: PathBuf, line: String) -> bool {
        !matches!(
            self.tx.try_send((path, line)),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_))
        )
    }

    pub fn dropped(traffic: &Traffic) {
        traffic.log_dropped.fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_sort_statuses_and_latencies() {
        let t = Traffic::default();
        t.record(200, Duration::from_micros(500));
        t.record(204, Duration::from_millis(30));
        t.record(404, Duration::from_millis(3));
        t.record(502, Duration::from_secs(20));
        let s = t.stats();
        assert_eq!(s.requests, 4);
        assert_eq!(s.status["2xx"], 2);
        assert_eq!(s.status["4xx"], 1);
        assert_eq!(s.status["5xx"], 1);
        assert_eq!(s.status["1xx"], 0);
        assert_eq!(s.latency_ms[0], (Some(1.0), 1));
        assert_eq!(s.latency_ms[1], (Some(5.0), 1));
        assert_eq!(s.latency_ms[3], (Some(100.0), 1));
        assert_eq!(s.latency_ms[7], (None, 1));
        assert!(
            (s.latency_ms_total - 20_033.5).abs() < 0.01,
            "{}",
            s.latency_ms_total
        );
    }

    #[test]
    fn lines_are_appended_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("current.log");
        std::fs::write(&path, "app line\n").unwrap();
        let log = AccessLog::start().unwrap();
        assert!(log.write(path.clone(), "proxy line\n".into()));
        for _ in 0..100 {
            if std::fs::read_to_string(&path)
                .unwrap()
                .contains("proxy line")
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "app line\nproxy line\n"
        );
    }
}
