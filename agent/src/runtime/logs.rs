//! Per-app logs: the container's stdout and stderr are appended (O_APPEND) to
//! `logs/current.log`; when it grows past the cap it is copied to `current.log.1` and
//! truncated. The app holds the file itself, so it keeps logging while the agent restarts.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Default cap of one log file; an app keeps at most two (current and .1).
pub const DEFAULT_CAP: u64 = 8 << 20;

pub fn rotated(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// Copies the log to `.1` and truncates it once it is larger than `cap`. Lines written
/// between the copy and the truncation are lost (at most what the app writes in that instant).
pub fn rotate_if_needed(path: &Path, cap: u64) -> io::Result<bool> {
    let size = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if size <= cap {
        return Ok(false);
    }
    let tmp = path.with_extension("log.rotating");
    fs::copy(path, &tmp)?;
    fs::rename(&tmp, rotated(path))?;
    OpenOptions::new().write(true).open(path)?.set_len(0)?;
    Ok(true)
}

/// The last `lines` lines of the app's log (from `.1` too when the current file is short).
pub fn tail(path: &Path, lines: usize) -> io::Result<Vec<u8>> {
    let mut out = read_tail(path, lines)?;
    let have = count_lines(&out);
    if have < lines {
        let mut older = read_tail(&rotated(path), lines - have)?;
        older.extend_from_slice(&out);
        out = older;
    }
    Ok(out)
}

fn count_lines(b: &[u8]) -> usize {
    let n = b.iter().filter(|&&c| c == b'\n').count();
    if b.last().is_some_and(|&c| c != b'\n') {
        n + 1
    } else {
        n
    }
}

fn read_tail(path: &Path, lines: usize) -> io::Result<Vec<u8>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    if lines == 0 {
        return Ok(Vec::new());
    }
    let len = f.metadata()?.len();
    // Read backwards in chunks until enough newlines are seen.
    let mut buf: Vec<u8> = Vec::new();
    let mut pos = len;
    const CHUNK: u64 = 64 * 1024;
    loop {
        let start = pos.saturating_sub(CHUNK);
        let mut chunk = vec![0; (pos - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&buf);
        buf = chunk;
        pos = start;
        // A trailing newline ends the last line; it does not start a new one.
        let body = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let newlines = body.iter().filter(|&&c| c == b'\n').count();
        if newlines >= lines || pos == 0 {
            let body_len = body.len();
            let mut seen = 0;
            let mut cut = 0;
            for (i, &c) in buf[..body_len].iter().enumerate().rev() {
                if c == b'\n' {
                    seen += 1;
                    if seen == lines {
                        cut = i + 1;
                        break;
                    }
                }
            }
            return Ok(buf.split_off(cut));
        }
    }
}

/// Reads what was appended since `offset`; a file that shrank (rotated) is read from 0.
pub fn read_from(path: &Path, offset: &mut u64) -> io::Result<Vec<u8>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    if len < *offset {
        *offset = 0;
    }
    f.seek(SeekFrom::Start(*offset))?;
    let mut out = Vec::new();
    f.take(4 << 20).read_to_end(&mut out)?;
    *offset += out.len() as u64;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn tail_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("current.log");
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        for i in 0..100 {
            writeln!(f, "line {i}").unwrap();
        }
        assert_eq!(tail(&log, 2).unwrap(), b"line 98\nline 99\n");
        assert!(!rotate_if_needed(&log, 1 << 20).unwrap());
        assert!(rotate_if_needed(&log, 100).unwrap());
        assert_eq!(fs::metadata(&log).unwrap().len(), 0);
        // The app's O_APPEND descriptor keeps writing at the new end.
        writeln!(f, "after").unwrap();
        assert_eq!(fs::read(&log).unwrap(), b"after\n");
        // tail reaches into the rotated file for older lines.
        assert_eq!(tail(&log, 3).unwrap(), b"line 98\nline 99\nafter\n");
        assert_eq!(tail(&log, 0).unwrap(), b"");
        let mut off = 0;
        assert_eq!(read_from(&log, &mut off).unwrap(), b"after\n");
        writeln!(f, "more").unwrap();
        assert_eq!(read_from(&log, &mut off).unwrap(), b"more\n");
    }

    #[test]
    fn tail_of_long_file_without_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("current.log");
        let mut content = Vec::new();
        for i in 0..20000 {
            content.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        content.extend_from_slice(b"partial");
        fs::write(&log, &content).unwrap();
        assert_eq!(tail(&log, 2).unwrap(), b"line 19999\npartial");
        assert_eq!(count_lines(&tail(&log, 15000).unwrap()), 15000);
    }
}
