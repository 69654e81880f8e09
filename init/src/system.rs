//! What only PID 1 does to the system: the API filesystems, the data partition, the hostname
//! and loopback at boot, and unmounting the data partition at shutdown.
//!
//! Every step logs its failure and the boot goes on: a device with a broken data partition
//! still starts the agent (see [`mount_data`]) so it can say what is wrong.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, umount, umount2, MntFlags, MsFlags};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use crate::machine::Level;
use crate::os::{self, log};

/// The GPT partition label of the data partition.
pub const DATA_LABEL: &str = "homeport-data";
pub const DATA_DIR: &str = "/data";
/// Its mtime is the last time the device was up (set at boot and at shutdown).
const CLOCK_MARK: &str = "/data/.homeport-clock";
/// Its mtime is the image's build time (`SOURCE_DATE_EPOCH`: the erofs root's every mtime).
const BUILD_MARK: &str = "/usr/lib/os-release";
/// Present once the data filesystem was grown to fill its partition.
const GROWN_MARKER: &str = "/data/.homeport-grown";
/// How long to wait for the data partition's device node to appear.
const DEVICE_WAIT: Duration = Duration::from_secs(5);
const DEFAULT_HOSTNAME: &str = "homeport";

struct Mount {
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NODEV_NOEXEC: MsFlags = NOSUID_NODEV.union(MsFlags::MS_NOEXEC);

/// The API filesystems, in mount order. A target that is already a mount point (the
/// initramfs moves /dev, /proc, /sys and /run over) is left alone.
const MOUNTS: &[Mount] = &[
    Mount {
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    Mount {
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("gid=5,mode=0620,ptmxmode=0666"),
    },
    Mount {
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
    Mount {
        target: "/run",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=0755"),
    },
    Mount {
        target: "/tmp",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
    Mount {
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("nsdelegate"),
    },
];

/// What the boot found, for the agent.
pub struct Booted {
    /// The data partition could not be mounted; /data is a tmpfs.
    pub data_degraded: bool,
}

pub fn setup() -> Booted {
    for m in MOUNTS {
        mount_api(m);
        if m.target == "/dev" {
            os::log_to_kmsg();
        }
    }
    if let Err(e) = loopback_up() {
        log(Level::Error, &format!("cannot bring up lo: {e}"));
    }
    // Loaded while the data partition mounts and the agent starts, which needs them.
    load_modules();
    let data_degraded = !mount_data();
    restore_clock();
    set_hostname();
    Booted { data_degraded }
}

fn mount_api(m: &Mount) {
    if is_mountpoint(Path::new(m.target)) {
        return;
    }
    // On the read-only root the folder must already exist; under /dev it usually does not.
    let _ = fs::create_dir_all(m.target);
    if let Err(e) = mount(Some(m.fstype), m.target, Some(m.fstype), m.flags, m.data) {
        log(
            Level::Error,
            &format!("cannot mount {} on {}: {e}", m.fstype, m.target),
        );
    }
}

/// A path is a mount point when it lives on another device than its parent (or is `/`).
fn is_mountpoint(path: &Path) -> bool {
    match (fs::metadata(path), fs::metadata(path.join(".."))) {
        (Ok(me), Ok(parent)) => me.dev() != parent.dev() || me.ino() == parent.ino(),
        _ => false,
    }
}

/// Mounts the data partition on /data and grows it on first boot; returns false when the
/// device is degraded.
///
/// Decision: when the partition is missing or does not mount even with `usebackuproot`, a
/// tmpfs goes on /data and the agent is started with `HOMEPORT_DATA_DEGRADED=1`. The agent
/// can then report the problem on the console and the API instead of the device looking
/// dead; it must treat everything it writes as lost at the next boot.
fn mount_data() -> bool {
    let data = Path::new(DATA_DIR);
    if is_mountpoint(data) {
        return true;
    }
    let _ = fs::create_dir_all(data);
    let mounted = match wait_for_data_device() {
        None => {
            log(Level::Error, &format!("no partition labelled {DATA_LABEL}"));
            false
        }
        Some(device) => mount_btrfs(&device),
    };
    if mounted {
        grow_once();
        return true;
    }
    log(
        Level::Error,
        "continuing without the data partition: /data is a tmpfs",
    );
    if let Err(e) = mount(
        Some("tmpfs"),
        data,
        Some("tmpfs"),
        NOSUID_NODEV,
        Some("mode=0755"),
    ) {
        log(
            Level::Error,
            &format!("cannot mount a tmpfs on {DATA_DIR}: {e}"),
        );
    }
    false
}

fn mount_btrfs(device: &Path) -> bool {
    let shown = device.display();
    let first = match mount(
        Some(device),
        DATA_DIR,
        Some("btrfs"),
        MsFlags::MS_NOATIME,
        None::<&str>,
    ) {
        Ok(()) => return true,
        Err(e) => e,
    };
    log(
        Level::Error,
        &format!("cannot mount {shown} on {DATA_DIR}: {first}"),
    );
    let device_arg = device.to_string_lossy();
    match os::run_logged("btrfs", &["check", "--readonly", &device_arg]) {
        Ok(status) => log(
            Level::Info,
            &format!("btrfs check --readonly {shown}: {status}"),
        ),
        Err(e) => log(Level::Warn, &format!("cannot run btrfs check: {e}")),
    }
    let retry = mount(
        Some(device),
        DATA_DIR,
        Some("btrfs"),
        MsFlags::MS_NOATIME,
        Some("usebackuproot"),
    );
    match retry {
        Ok(()) => {
            log(Level::Warn, &format!("mounted {shown} with usebackuproot"));
            true
        }
        Err(e) => {
            log(
                Level::Error,
                &format!("cannot mount {shown} with usebackuproot either: {e}"),
            );
            false
        }
    }
}

fn wait_for_data_device() -> Option<PathBuf> {
    let start = Instant::now();
    loop {
        if let Some(device) = find_data_device() {
            return Some(device);
        }
        if start.elapsed() >= DEVICE_WAIT {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The udev symlink if there is one, else the partition whose uevent names our label.
fn find_data_device() -> Option<PathBuf> {
    let by_label = Path::new("/dev/disk/by-partlabel").join(DATA_LABEL);
    if by_label.exists() {
        return Some(by_label);
    }
    let entries = fs::read_dir("/sys/class/block").ok()?;
    entries.flatten().find_map(|entry| {
        let uevent = fs::read_to_string(entry.path().join("uevent")).ok()?;
        let device = Path::new("/dev").join(devname_for_label(&uevent, DATA_LABEL)?);
        device.exists().then_some(device)
    })
}

/// The `DEVNAME` of a block device's uevent text if its `PARTNAME` is `label`.
fn devname_for_label<'a>(uevent: &'a str, label: &str) -> Option<&'a str> {
    let mut devname = None;
    let mut matches = false;
    for line in uevent.lines() {
        if let Some(name) = line.strip_prefix("DEVNAME=") {
            devname = Some(name).filter(|n| !n.is_empty() && !n.contains(".."));
        } else if line.strip_prefix("PARTNAME=") == Some(label) {
            matches = true;
        }
    }
    devname.filter(|_| matches)
}

/// Grows the data filesystem to its partition once (the partition itself is grown by the
/// image's first boot in the initramfs). Without the `btrfs` tool, it is retried next boot.
fn grow_once() {
    if Path::new(GROWN_MARKER).exists() {
        return;
    }
    match os::run_logged("btrfs", &["filesystem", "resize", "max", DATA_DIR]) {
        Ok(status) if status.success() => {
            log(
                Level::Info,
                &format!("grew {DATA_DIR} to fill its partition"),
            );
            if let Err(e) = fs::write(GROWN_MARKER, b"") {
                log(Level::Warn, &format!("cannot write {GROWN_MARKER}: {e}"));
            }
        }
        Ok(status) => log(Level::Warn, &format!("btrfs filesystem resize: {status}")),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            log(Level::Warn, &format!("no btrfs tool, {DATA_DIR} not grown"));
        }
        Err(e) => log(
            Level::Warn,
            &format!("cannot run btrfs filesystem resize: {e}"),
        ),
    }
}

/// Where the modules to load at boot are named (the modules-load.d format).
const MODULES_LOAD_DIRS: [&str; 2] = ["/usr/lib/modules-load.d", "/etc/modules-load.d"];
/// The modules are loaded by this many `modprobe`s side by side.
const MODPROBES: usize = 2;

/// Starts `modprobe` for the modules named in modules-load.d and does not wait: the reaper
/// collects them. Their failures are modprobe's to report (the kernel loads what a rule
/// needs anyway, only later).
fn load_modules() {
    let mut names = Vec::new();
    for dir in MODULES_LOAD_DIRS {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "conf"))
            .collect();
        files.sort();
        for f in files {
            names.extend(module_names(&fs::read_to_string(&f).unwrap_or_default()));
        }
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    if names.is_empty() {
        return;
    }
    // Every other module to each modprobe: dependencies are shared, the kernel lets the
    // second loader of a module wait for the first.
    for part in 0..MODPROBES.min(names.len()) {
        let mine: Vec<&str> = names
            .iter()
            .skip(part)
            .step_by(MODPROBES)
            .map(String::as_str)
            .collect();
        let spawned = std::process::Command::new("modprobe")
            .args(["-a", "-q"])
            .args(&mine)
            .env_clear()
            .env("PATH", os::PATH)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn();
        if let Err(e) = spawned {
            log(Level::Warn, &format!("cannot run modprobe: {e}"));
            return;
        }
    }
    log(Level::Info, &format!("loading {}", names.join(" ")));
}

/// Module names in a modules-load.d file: one per line; `#` and `;` start comments.
fn module_names(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter(|l| {
            l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
        .map(str::to_owned)
        .collect()
}

/// Moves the clock forward to the image's build time or the last time the device was up,
/// whichever is later, if it is behind both ([`crate::machine::clock_floor`]); then marks
/// now as the last time up.
fn restore_clock() {
    let mtime = |p: &str| fs::metadata(p).and_then(|m| m.modified()).ok();
    let now = std::time::SystemTime::now();
    if let Some(floor) = crate::machine::clock_floor(now, &[mtime(BUILD_MARK), mtime(CLOCK_MARK)]) {
        let secs = floor
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let ts = nix::sys::time::TimeSpec::new(secs as libc::time_t, 0);
        match nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts) {
            Ok(()) => log(
                Level::Info,
                &format!("clock was behind; set to {secs} (build time or last boot)"),
            ),
            Err(e) => log(Level::Warn, &format!("cannot set the clock: {e}")),
        }
    }
    mark_clock();
}

/// Records now as the last time the device was up.
pub fn mark_clock() {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(CLOCK_MARK);
    if let Err(e) = file.and_then(|f| f.set_modified(std::time::SystemTime::now())) {
        log(Level::Warn, &format!("cannot write {CLOCK_MARK}: {e}"));
    }
}

fn set_hostname() {
    let configured = fs::read_to_string(Path::new(DATA_DIR).join("hostname")).unwrap_or_default();
    let name = valid_hostname(configured.trim()).unwrap_or(DEFAULT_HOSTNAME);
    if let Err(e) = nix::unistd::sethostname(name) {
        log(
            Level::Error,
            &format!("cannot set the hostname to {name}: {e}"),
        );
    }
}

/// A single DNS label: 1 to 63 letters, digits and inner dashes.
fn valid_hostname(name: &str) -> Option<&str> {
    let ok = (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    ok.then_some(name)
}

fn loopback_up() -> nix::Result<()> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain old data for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo") {
        *dst = *src as libc::c_char;
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    // SAFETY: fd is an open socket and req a live ifreq, which SIOCGIFFLAGS fills in.
    Errno::result(unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS as libc::Ioctl, &mut req) })?;
    // SAFETY: SIOCGIFFLAGS just initialised the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: fd is an open socket and req a live ifreq, which SIOCSIFFLAGS only reads.
    Errno::result(unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS as libc::Ioctl, &req) })?;
    Ok(())
}

/// Flushes and detaches the data partition: read-only first, so that even a lazy unmount
/// leaves a clean filesystem behind.
pub fn unmount_data() {
    if !is_mountpoint(Path::new(DATA_DIR)) {
        return;
    }
    mark_clock();
    let remount = MsFlags::MS_REMOUNT.union(MsFlags::MS_RDONLY);
    if let Err(e) = mount(None::<&str>, DATA_DIR, None::<&str>, remount, None::<&str>) {
        log(
            Level::Warn,
            &format!("cannot remount {DATA_DIR} read-only: {e}"),
        );
    }
    match umount(DATA_DIR) {
        Ok(()) => {}
        Err(Errno::EBUSY) => {
            log(Level::Warn, &format!("{DATA_DIR} is busy, detaching it"));
            if let Err(e) = umount2(DATA_DIR, MntFlags::MNT_DETACH) {
                log(Level::Error, &format!("cannot detach {DATA_DIR}: {e}"));
            }
        }
        Err(e) => log(Level::Error, &format!("cannot unmount {DATA_DIR}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_partition_by_label() {
        let ours = "MAJOR=259\nMINOR=3\nDEVNAME=nvme0n1p4\nDEVTYPE=partition\nPARTN=4\nPARTNAME=homeport-data\n";
        assert_eq!(devname_for_label(ours, DATA_LABEL), Some("nvme0n1p4"));
        let other = "MAJOR=8\nMINOR=2\nDEVNAME=sda2\nDEVTYPE=partition\nPARTNAME=root-a\n";
        assert_eq!(devname_for_label(other, DATA_LABEL), None);
        let prefix = "DEVNAME=sda5\nPARTNAME=homeport-data-old\n";
        assert_eq!(devname_for_label(prefix, DATA_LABEL), None);
        let disk = "MAJOR=8\nMINOR=0\nDEVNAME=sda\nDEVTYPE=disk\n";
        assert_eq!(devname_for_label(disk, DATA_LABEL), None);
        assert_eq!(
            devname_for_label("PARTNAME=homeport-data\n", DATA_LABEL),
            None
        );
        assert_eq!(
            devname_for_label("DEVNAME=../sda\nPARTNAME=homeport-data\n", DATA_LABEL),
            None
        );
    }

    #[test]
    fn modules_load_files() {
        let text = "# comment\n; also\n\nnf_tables\n  bridge  \nveth\nbad name\n../x\n";
        assert_eq!(module_names(text), ["nf_tables", "bridge", "veth"]);
        let ours = include_str!("../../rootfs-overlay/usr/lib/modules-load.d/homeport.conf");
        assert!(module_names(ours).contains(&"nf_tables".to_string()));
    }

    #[test]
    fn hostnames() {
        let check =
            |name: &str, ok: bool| assert_eq!(valid_hostname(name).is_some(), ok, "{name:?}");
        check("homeport", true);
        check("homeport-4f2a", true);
        check("Kitchen-Pi2", true);
        check("", false);
        check("-x", false);
        check("x-", false);
        check("a.b", false);
        check("with space", false);
        check(&"a".repeat(63), true);
        check(&"a".repeat(64), false);
    }

    #[test]
    fn root_and_proc_are_mount_points() {
        assert!(is_mountpoint(Path::new("/")));
        assert!(is_mountpoint(Path::new("/proc")));
        assert!(!is_mountpoint(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
        ));
        assert!(!is_mountpoint(Path::new("/nonexistent-homeport-path")));
    }
}
