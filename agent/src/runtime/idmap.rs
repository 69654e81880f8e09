//! Idmapped bind mounts for app volumes.
//!
//! Apps run without a user namespace, as whatever uid their image asks for (say 33), yet on
//! the host their volumes belong to a uid/gid range of the app's own that collides with no
//! host user: slot N (0..[`SLOTS`]) owns host ids `BASE + N*65536 ..= BASE + N*65536 + 65535`,
//! and container id X is host id `BASE + N*65536 + X`. The agent bind-mounts each volume
//! through an idmapped mount ([`idmapped_bind`]) that shows on-disk id `base + X` as X, and
//! the container runtime bind-mounts that staging mount into the container (a bind mount of
//! an idmapped mount keeps the idmap). Files the app creates land on disk as `base + X`.
//!
//! Why [`BASE`] = `0x6000_0000` (1610612736), slots up to `0x6FFF_FFFF` (1879048191):
//! - Debian's `/etc/login.defs` gives users 1000..=60000 and allocates `/etc/subuid` and
//!   `/etc/subgid` ranges (rootless podman, docker userns-remap, LXD) from 100000 up to
//!   `SUB_UID_MAX` 600100000 (`0x23C4_CCA0`), far below; LXD's fallback without subuid
//!   entries (1000000, 1000000000 ids) ends at 1001000000 (`0x3BAA_0C40`), also below.
//! - systemd reserves 60001..=60513 (homed), 61184..=65519 (dynamic users), 65534 and 65535.
//!   Its "container UID ranges" pool, 524288..=1879048191 (`0x0008_0000..=0x6FFF_FFFF`),
//!   used by `systemd-nspawn --private-users=pick` and `systemd-nsresourced`, does contain
//!   our range (it ends where ours ends). That only matters on a host that also runs those;
//!   the appliance does not. The range stays below 2^31, which tools that keep uids in a
//!   signed int need, and away from systemd's foreign range `0x7FFE_0000..=0x7FFE_FFFF`.
//!
//! Volumes are single directories: the staging mount is a non-recursive clone of `src`
//! (submounts below it are not carried over). Whether something is already mounted at a
//! destination is [`mounted_at`].

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::AtFlags;
use nix::sys::stat::{fchmodat, fstatat, FchmodatFlags, Mode, SFlag};
use nix::unistd::{fchownat, Gid, Uid};

/// First host id of slot 0.
pub const BASE: u32 = 0x6000_0000;
/// Ids per app slot.
pub const SLOT_SIZE: u32 = 65536;
/// Number of app slots.
pub const SLOTS: u32 = 4096;

/// First host id of app slot `slot`, if there is such a slot.
pub fn slot_base(slot: u32) -> Option<u32> {
    (slot < SLOTS).then(|| BASE + slot * SLOT_SIZE)
}

fn context(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("path {} contains a NUL byte", path.display()),
        )
    })
}

fn check_range(host_base: u32, count: u32) -> io::Result<()> {
    if count == 0 || host_base.checked_add(count - 1).is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad id range: {count} ids from {host_base}"),
        ));
    }
    Ok(())
}

/// Kills and reaps the helper child on every path out of [`userns_fd`].
struct Helper(libc::pid_t);

impl Drop for Helper {
    fn drop(&mut self) {
        // SAFETY: self.0 is our own unreaped child, so the pid cannot have been reused;
        // kill and waitpid take plain integers and a pointer to a local.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
            let mut status = 0;
            while libc::waitpid(self.0, &mut status, 0) < 0
                && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
            {}
        }
    }
}

/// A user namespace whose mapping, used as the idmap of a mount, shows on-disk id
/// `host_base + X` as X (for X < `count`, uids and gids alike); other on-disk ids show as
/// the overflow id 65534 and cannot be written.
///
/// Direction: an idmapped mount reads an on-disk id as an id *inside* the namespace and
/// shows the id it maps to in the parent (initial) namespace, so each map line is
/// `host_base 0 count` ("inside host_base+X is outside X").
///
/// Made by forking a child that `unshare(CLONE_NEWUSER)`s and waits; we write its maps, open
/// `/proc/PID/ns/user` and kill it. The namespace lives as long as the returned fd.
pub fn userns_fd(host_base: u32, count: u32) -> io::Result<OwnedFd> {
    check_range(host_base, count)?;
    let (ready_r, ready_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| context("pipe")(e.into()))?;
    // SAFETY: fork in a possibly multi-threaded process is sound as long as the child makes
    // only async-signal-safe calls: it makes raw system calls (prctl, unshare, write, pause)
    // and never returns, allocates, or takes a lock. io::Error::last_os_error only reads
    // errno.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(context("fork")(io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: see above; every call here is a plain system call on integers and a stack
        // buffer, and the child ends only by the parent's SIGKILL (or its own death signal).
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            let errno = if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                0
            } else {
                io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EINVAL)
            };
            let bytes = errno.to_ne_bytes();
            libc::write(ready_w.as_raw_fd(), bytes.as_ptr().cast(), bytes.len());
            loop {
                libc::pause();
            }
        }
    }
    let helper = Helper(pid);
    drop(ready_w);
    let mut bytes = [0u8; 4];
    File::from(ready_r)
        .read_exact(&mut bytes)
        .map_err(context("user namespace helper died"))?;
    match i32::from_ne_bytes(bytes) {
        0 => {}
        errno => {
            return Err(context("unshare user namespace")(
                io::Error::from_raw_os_error(errno),
            ))
        }
    }
    let line = format!("{host_base} 0 {count}\n");
    for map in ["uid_map", "gid_map"] {
        let path = format!("/proc/{}/{map}", helper.0);
        File::options()
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .map_err(context(format_args!("write {path}")))?;
    }
    let ns = File::open(format!("/proc/{}/ns/user", helper.0))
        .map_err(context("open the user namespace"))?;
    drop(helper);
    Ok(OwnedFd::from(ns))
}

/// Mounts `src` at `dst` (which must exist) with an idmap showing on-disk id
/// `host_base + X` as X: `open_tree(OPEN_TREE_CLONE)`, `mount_setattr(MOUNT_ATTR_IDMAP)`,
/// `move_mount`. Not idempotent: check [`mounted_at`] first.
pub fn idmapped_bind(src: &Path, dst: &Path, host_base: u32, count: u32) -> io::Result<()> {
    let userns = userns_fd(host_base, count)?;
    let src_c = cstring(src)?;
    let dst_c = cstring(dst)?;
    let empty = c"";

    let flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC;
    // SAFETY: open_tree reads a NUL-terminated path that outlives the call; the result is a
    // new descriptor or -1.
    let ret = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, src_c.as_ptr(), flags) };
    let tree = owned_fd(ret).map_err(context(format_args!("open_tree {}", src.display())))?;

    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: u64::try_from(userns.as_raw_fd()).map_err(|_| io::Error::other("bad fd"))?,
    };
    // SAFETY: mount_setattr reads `attr` (of the size passed) and the empty path, both of
    // which outlive the call; `tree` is a detached mount we own.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if ret < 0 {
        let e = io::Error::last_os_error();
        let hint = match e.raw_os_error() {
            Some(libc::EINVAL) => " (does the filesystem support idmapped mounts?)",
            _ => "",
        };
        return Err(context(format_args!(
            "idmap {} to ids from {host_base}{hint}",
            src.display()
        ))(e));
    }

    // SAFETY: move_mount reads two NUL-terminated paths that outlive the call; `tree` is a
    // detached mount we own, attached at `dst` on success.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            dst_c.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if ret < 0 {
        return Err(context(format_args!(
            "mount {} at {}",
            src.display(),
            dst.display()
        ))(io::Error::last_os_error()));
    }
    tracing::debug!(src = %src.display(), dst = %dst.display(), host_base, "idmapped bind mount");
    Ok(())
}

fn owned_fd(ret: libc::c_long) -> io::Result<OwnedFd> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(ret).map_err(|_| io::Error::other("descriptor out of range"))?;
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What the topmost mount at a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mounted {
    No,
    /// A mount with an idmap (ours, or a bind mount of ours).
    Idmapped,
    /// A mount without one.
    Plain,
}

/// What is mounted at `dst`, per /proc/self/mountinfo (`dst` is canonicalized first).
pub fn mounted_at(dst: &Path) -> io::Result<Mounted> {
    let dst = std::fs::canonicalize(dst).map_err(context(dst.display()))?;
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mounted_in(&info, &dst))
}

fn mounted_in(mountinfo: &str, dst: &Path) -> Mounted {
    // (mount id, parent id, per-mount options) of every mount at `dst`.
    let stack: Vec<(&str, &str, &str)> = mountinfo
        .lines()
        .filter_map(|l| {
            let mut fields = l.split(' ');
            let id = fields.next()?;
            let parent = fields.next()?;
            let point = fields.nth(2)?;
            let options = fields.next()?;
            Some((id, parent, point, options))
        })
        .filter(|(.., point, _)| {
            Path::new(OsStr::from_bytes(&super::os::unescape_mountinfo_bytes(
                point,
            ))) == dst
        })
        .map(|(id, parent, _, options)| (id, parent, options))
        .collect();
    // The topmost is the one no other mount at the same place sits on.
    let top = stack
        .iter()
        .find(|(id, ..)| !stack.iter().any(|(_, parent, _)| parent == id));
    match top {
        None => Mounted::No,
        Some((.., options)) if options.split(',').any(|o| o == "idmapped") => Mounted::Idmapped,
        Some(_) => Mounted::Plain,
    }
}

/// Re-owns everything below `dir` (and `dir` itself) whose uid or gid lies in
/// `from_base..from_base + 65536` to the same offset from `to_base`; other ids are left
/// alone. Never follows symlinks (symlinks themselves are re-owned) and does not descend
/// into other mounts. Set-user/group-ID bits, which chown clears, are restored; file
/// capabilities (`security.capability`) are not. Returns how many entries changed.
pub fn shift_owner(dir: &Path, from_base: u32, to_base: u32) -> io::Result<u64> {
    check_range(from_base, SLOT_SIZE)?;
    check_range(to_base, SLOT_SIZE)?;
    if from_base.abs_diff(to_base) < SLOT_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("id ranges from {from_base} and {to_base} overlap"),
        ));
    }
    let shift = |id: u32| match id.checked_sub(from_base) {
        Some(offset) if offset < SLOT_SIZE => to_base + offset,
        _ => id,
    };
    let root = File::open(dir).map_err(context(dir.display()))?;
    let mut changed = 0;
    // Entries are handled relative to their directory's descriptor; directories are opened
    // with openat2 beneath `root`, refusing symlinks and mount crossings, so nothing an app
    // left in its volume can redirect us.
    changed += shift_entry(root.as_raw_fd(), c".", &shift).map_err(context(dir.display()))?;
    let mut pending = vec![PathBuf::from(".")];
    while let Some(rel) = pending.pop() {
        let shown = dir.join(&rel);
        let fd = match open_beneath(&root, &rel) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                tracing::debug!(dir = %shown.display(), "not crossing into another mount");
                continue;
            }
            Err(e) => return Err(context(shown.display())(e)),
        };
        let dfd = fd.as_raw_fd();
        // Listing through the descriptor's magic link lists exactly the directory we opened.
        let mut children = Vec::new();
        for entry in
            std::fs::read_dir(format!("/proc/self/fd/{dfd}")).map_err(context(shown.display()))?
        {
            let entry = entry.map_err(context(shown.display()))?;
            children.push(
                CString::new(entry.file_name().as_bytes())
                    .map_err(|_| io::Error::other("file name with a NUL byte"))?,
            );
        }
        for name in children {
            let is_dir = fstatat(Some(dfd), name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .map(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR)
                .map_err(|e| {
                    context(shown.join(OsStr::from_bytes(name.as_bytes())).display())(e.into())
                })?;
            changed += shift_entry(dfd, &name, &shift).map_err(context(
                shown.join(OsStr::from_bytes(name.as_bytes())).display(),
            ))?;
            if is_dir {
                pending.push(rel.join(OsStr::from_bytes(name.as_bytes())));
            }
        }
    }
    Ok(changed)
}

/// Re-owns `name` in `dirfd` (not following a symlink); 1 if it changed.
fn shift_entry(dirfd: RawFd, name: &CStr, shift: &impl Fn(u32) -> u32) -> io::Result<u64> {
    let st = fstatat(Some(dirfd), name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
    let (uid, gid) = (shift(st.st_uid), shift(st.st_gid));
    if (uid, gid) == (st.st_uid, st.st_gid) {
        return Ok(0);
    }
    fchownat(
        Some(dirfd),
        name,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )?;
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    let special = libc::S_ISUID | libc::S_ISGID;
    if kind != SFlag::S_IFLNK && st.st_mode & special != 0 {
        fchmodat(
            Some(dirfd),
            name,
            Mode::from_bits_truncate(st.st_mode & 0o7777),
            FchmodatFlags::NoFollowSymlink,
        )?;
    }
    Ok(1)
}

/// Opens directory `rel` beneath `root` without following symlinks or crossing mounts.
fn open_beneath(root: &File, rel: &Path) -> io::Result<OwnedFd> {
    let rel = cstring(rel)?;
    // SAFETY: open_how is plain old data; all-zero is valid (and what unset fields must be).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH
        | libc::RESOLVE_NO_SYMLINKS
        | libc::RESOLVE_NO_MAGICLINKS
        | libc::RESOLVE_NO_XDEV;
    // SAFETY: openat2 reads the NUL-terminated path and `how` (of the size passed), both of
    // which outlive the call; the result is a new descriptor or -1.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            rel.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    owned_fd(ret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::process::Command;

    use nix::mount::{mount, umount2, MntFlags, MsFlags};

    #[test]
    fn slots() {
        assert_eq!(slot_base(0), Some(BASE));
        assert_eq!(slot_base(1), Some(0x6001_0000));
        assert_eq!(slot_base(SLOTS - 1), Some(0x6FFF_0000));
        assert_eq!(slot_base(SLOTS), None);
        // The last id stays below 2^31 and inside systemd's documented container pool end.
        assert_eq!(
            slot_base(SLOTS - 1).map(|b| b + (SLOT_SIZE - 1)),
            Some(1_879_048_191)
        );
    }

    #[test]
    fn mountinfo_lookup() {
        // The tmpfs on /srv/c is listed first: stacking is read from parent ids, not order.
        let info = "\
82 81 0:40 / /srv/c rw - tmpfs tmpfs rw
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
80 22 8:1 /data/v /srv/a\\040b rw,relatime,idmapped shared:1 - ext4 /dev/vda rw
81 22 8:1 /data/w /srv/c rw,idmapped - ext4 /dev/vda rw
83 80 8:1 /data/x /srv/a\\040b/y rw,idmapped - ext4 /dev/vda rw";
        check_mounted(info, "/srv/a b", Mounted::Idmapped);
        check_mounted(info, "/srv/c", Mounted::Plain);
        check_mounted(info, "/", Mounted::Plain);
        check_mounted(info, "/srv/a b/y", Mounted::Idmapped);
        check_mounted(info, "/srv", Mounted::No);
    }

    fn check_mounted(info: &str, path: &str, expected: Mounted) {
        assert_eq!(mounted_in(info, Path::new(path)), expected, "{path}");
    }

    #[test]
    fn bad_ranges_are_refused() {
        assert!(userns_fd(BASE, 0).is_err());
        assert!(userns_fd(u32::MAX - 10, 65536).is_err());
        let dir = tempfile::tempdir().unwrap();
        let err = shift_owner(dir.path(), BASE, BASE + 100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    fn skip_unless_root() -> bool {
        let skip = !nix::unistd::geteuid().is_root();
        if skip {
            eprintln!("skipped: needs root");
        }
        skip
    }

    /// Detaches the mounts on drop (last first), whatever happened to the test.
    #[derive(Default)]
    struct Mounts(Vec<PathBuf>);

    impl Drop for Mounts {
        fn drop(&mut self) {
            for m in self.0.iter().rev() {
                let _ = umount2(m, MntFlags::MNT_DETACH);
            }
        }
    }

    fn fs_type(path: &Path) -> String {
        let st = nix::sys::statfs::statfs(path).unwrap();
        match st.filesystem_type() {
            nix::sys::statfs::TMPFS_MAGIC => "tmpfs".into(),
            nix::sys::statfs::EXT4_SUPER_MAGIC => "ext4".into(),
            nix::sys::statfs::BTRFS_SUPER_MAGIC => "btrfs".into(),
            other => format!("{other:?}"),
        }
    }

    fn owner(path: &Path) -> (u32, u32) {
        let md = std::fs::symlink_metadata(path).unwrap();
        (md.uid(), md.gid())
    }

    /// Runs `program args` as uid and gid `id` with no supplementary groups.
    fn run_as(id: u32, program: &str, args: &[&Path]) {
        let status = Command::new(program)
            .args(args)
            .uid(id)
            .gid(id)
            .status()
            .unwrap();
        assert!(status.success(), "{program} {args:?} as {id}: {status}");
    }

    use std::os::unix::process::CommandExt;

    /// The whole story on the filesystem holding `root`.
    fn check_idmapped_bind(root: &Path) {
        let base = slot_base(7).unwrap();
        let (src, dst, inner) = (root.join("src"), root.join("staging"), root.join("inner"));
        for d in [&src, &dst, &inner] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&src, Some(base + 33), Some(base + 33)).unwrap();
        std::fs::write(src.join("a"), "a").unwrap();
        std::os::unix::fs::chown(src.join("a"), Some(base + 33), Some(base + 33)).unwrap();
        std::fs::write(src.join("host-root"), "b").unwrap();

        let mut mounts = Mounts::default();
        idmapped_bind(&src, &dst, base, SLOT_SIZE).unwrap();
        mounts.0.push(dst.clone());
        assert_eq!(mounted_at(&dst).unwrap(), Mounted::Idmapped);
        assert_eq!(mounted_at(&src).unwrap(), Mounted::No);

        // On-disk base+33 shows as 33; an on-disk id outside the range (host root) shows
        // as the overflow id: the mapping goes in the intended direction.
        assert_eq!(owner(&dst.join("a")), (33, 33));
        assert_eq!(owner(&dst), (33, 33));
        assert_eq!(owner(&dst.join("host-root")), (65534, 65534));

        // What uid 33 creates through the mount is base+33 on disk.
        run_as(33, "touch", &[&dst.join("made-by-33")]);
        run_as(33, "mkdir", &[&dst.join("dir-by-33")]);
        assert_eq!(owner(&src.join("made-by-33")), (base + 33, base + 33));
        assert_eq!(owner(&src.join("dir-by-33")), (base + 33, base + 33));
        // Root through the mount is base+0, not host root.
        std::fs::write(dst.join("made-by-root"), "r").unwrap();
        assert_eq!(owner(&src.join("made-by-root")), (base, base));

        // The container runtime bind-mounts the staging mount: the idmap survives.
        mount(
            Some(&dst),
            &inner,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .unwrap();
        mounts.0.push(inner.clone());
        assert_eq!(mounted_at(&inner).unwrap(), Mounted::Idmapped);
        assert_eq!(owner(&inner.join("a")), (33, 33));
        run_as(33, "touch", &[&inner.join("via-inner")]);
        assert_eq!(owner(&src.join("via-inner")), (base + 33, base + 33));
        // A process as some other uid cannot write into 33's directory.
        let denied = Command::new("touch")
            .arg(inner.join("x"))
            .uid(34)
            .gid(34)
            .status()
            .unwrap();
        assert!(!denied.success());
    }

    #[test]
    fn idmapped_bind_on_the_tmp_filesystem() {
        if skip_unless_root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        // Others must be able to reach the test dirs for the uid-33 processes.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        eprintln!("testing on {}", fs_type(tmp.path()));
        check_idmapped_bind(tmp.path());
    }

    #[test]
    fn idmapped_bind_on_tmpfs() {
        if skip_unless_root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut mounts = Mounts::default();
        mount(
            Some("tmpfs"),
            tmp.path(),
            Some("tmpfs"),
            MsFlags::empty(),
            Some("size=4m,mode=0755"),
        )
        .unwrap();
        mounts.0.push(tmp.path().to_path_buf());
        assert_eq!(fs_type(tmp.path()), "tmpfs");
        check_idmapped_bind(tmp.path());
    }

    #[test]
    fn shift_owner_moves_a_tree_between_slots() {
        if skip_unless_root() {
            return;
        }
        let (from, to) = (slot_base(3).unwrap(), slot_base(9).unwrap());
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("vol");
        let deep = root.join("a/b/c");
        std::fs::create_dir_all(&deep).unwrap();
        let chown = |p: &Path, u: u32, g: u32| {
            std::os::unix::fs::lchown(p, Some(u), Some(g)).unwrap();
        };
        for d in [&root, &root.join("a"), &root.join("a/b"), &deep] {
            chown(d, from + 33, from + 33);
        }
        let file = deep.join("f");
        std::fs::write(&file, "x").unwrap();
        chown(&file, from + 1000, from + 65535);
        // Host-owned file: untouched. Mixed: only the in-range id moves.
        let host = root.join("host");
        std::fs::write(&host, "h").unwrap();
        let mixed = root.join("mixed");
        std::fs::write(&mixed, "m").unwrap();
        chown(&mixed, from + 5, 0);
        // A setuid binary keeps its bit.
        let suid = root.join("suid");
        std::fs::write(&suid, "s").unwrap();
        chown(&suid, from + 33, from + 33);
        std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
        // A symlink out of the volume: the link moves, its target does not.
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        chown(&outside, from + 33, from + 33);
        let link = root.join("escape");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        chown(&link, from + 33, from + 33);

        let changed = shift_owner(&root, from, to).unwrap();
        assert_eq!(changed, 8);
        assert_eq!(owner(&root), (to + 33, to + 33));
        assert_eq!(owner(&deep), (to + 33, to + 33));
        assert_eq!(owner(&file), (to + 1000, to + 65535));
        assert_eq!(owner(&host), (0, 0));
        assert_eq!(owner(&mixed), (to + 5, 0));
        assert_eq!(owner(&suid), (to + 33, to + 33));
        assert_eq!(
            std::fs::metadata(&suid).unwrap().permissions().mode() & 0o7777,
            0o4755
        );
        assert_eq!(owner(&link), (to + 33, to + 33));
        assert_eq!(owner(&outside), (from + 33, from + 33));
        // Idempotent.
        assert_eq!(shift_owner(&root, from, to).unwrap(), 0);
    }
}
