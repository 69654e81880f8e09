//! Host-side preparation of an app: its overlay rootfs and its network namespace.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Longest overlay option string the kernel takes in one mount call (a page, less slack).
const MAX_MOUNT_OPTIONS: usize = 4000;

/// Every mount point, per /proc/self/mountinfo.
pub fn mount_points() -> io::Result<std::collections::HashSet<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .collect())
}

fn unescape_mountinfo(s: &str) -> String {
    String::from_utf8_lossy(&unescape_mountinfo_bytes(s)).into_owned()
}

/// A path field of mountinfo as bytes: it escapes space, tab, newline and backslash as
/// `\ooo` octal.
pub fn unescape_mountinfo_bytes(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .and_then(|o| std::str::from_utf8(o).ok())
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match (b[i], octal) {
            (b'\\', Some(v)) => {
                out.push(v);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// Mounts a read-only overlay of `lower` (bottom layer first) at `target`.
pub fn mount_overlay(lower: &[PathBuf], empty: &Path, target: &Path) -> io::Result<()> {
    let mut dirs: Vec<&Path> = lower.iter().rev().map(PathBuf::as_path).collect();
    if dirs.len() < 2 {
        // overlayfs without an upper dir needs at least two lower dirs.
        dirs.push(empty);
    }
    let mut opts = String::from("lowerdir=");
    for (i, d) in dirs.iter().enumerate() {
        let s = d
            .to_str()
            .ok_or_else(|| io::Error::other(format!("layer path {} is not UTF-8", d.display())))?;
        if s.contains([':', ',']) {
            return Err(io::Error::other(format!(
                "layer path {s} contains ':' or ','"
            )));
        }
        if i > 0 {
            opts.push(':');
        }
        opts.push_str(s);
    }
    if opts.len() > MAX_MOUNT_OPTIONS {
        return Err(io::Error::other(format!(
            "the image has too many layers ({}) for one overlay mount under this data directory",
            lower.len()
        )));
    }
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .map_err(|e| io::Error::other(format!("mount overlay at {}: {e}", target.display())))
}

pub fn unmount(target: &Path) -> io::Result<()> {
    match umount2(target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => Ok(()),
        Err(e) => Err(io::Error::other(format!(
            "unmount {}: {e}",
            target.display()
        ))),
    }
}

/// Creates `points` (absolute container paths; `true` marks a file) below `dir`, which
/// becomes the app's top overlay layer.
pub fn make_mount_points(dir: &Path, points: &[(String, bool)]) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (p, is_file) in points {
        let rel = p.trim_start_matches('/');
        if rel.is_empty() || rel.split('/').any(|c| c == "..") {
            continue;
        }
        let target = dir.join(rel);
        if *is_file {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::File::create(&target)?;
        } else {
            std::fs::create_dir_all(&target)?;
        }
    }
    Ok(())
}

/// Creates a network namespace with loopback up, kept alive by a bind mount at `path`.
/// Runs on a short-lived thread of its own: `unshare` changes only the calling thread.
pub fn create_netns(path: &Path) -> io::Result<()> {
    std::fs::File::create(path)?;
    let target = path.to_path_buf();
    let joined = std::thread::spawn(move || -> io::Result<()> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        loopback_up()?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| {
            io::Error::other(format!(
                "bind network namespace to {}: {e}",
                target.display()
            ))
        })
    })
    .join();
    match joined {
        Ok(r) => r,
        Err(_) => Err(io::Error::other("network namespace thread panicked")),
    }
}

/// Sets IFF_UP on `lo` in the calling thread's network namespace; true if it was down.
pub fn loopback_up() -> io::Result<bool> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write `req`, which outlives the calls, and
    // ifru_flags is the union member these requests use.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        if req.ifr_ifru.ifru_flags & libc::IFF_UP as libc::c_short != 0 {
            return Ok(false);
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(true)
}

/// Total size of the regular files below `path` (not following symlinks; hard links once).
pub fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() && (md.nlink() == 1 || seen.insert((md.dev(), md.ino()))) {
                total += md.len();
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    #[test]
    fn proc_is_a_mount_point() {
        let points = mount_points().unwrap();
        assert!(points.contains(Path::new("/proc")));
        assert!(!points.contains(Path::new("/proc/self")));
    }
}
