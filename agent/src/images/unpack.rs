//! Unpacking one OCI image layer into its own overlayfs lower directory.
//!
//! Layers are shared between images: each one is unpacked on its own into an empty
//! directory, and the layers of an image are stacked later by a read-only overlay mount
//! (`lowerdir=L3:L2:L1`). OCI whiteouts are therefore *converted* to their overlayfs form
//! instead of being applied: `dir/.wh.name` becomes a 0:0 character device `dir/name`, and
//! `dir/.wh..wh..opq` becomes the xattr `trusted.overlay.opaque=y` on `dir`.
//!
//! The blob is read once: its compressed bytes are hashed and checked against the layer
//! digest, the decompressed tar against the diff ID. On any error the caller deletes the
//! destination.
//!
//! Security: entry names and hard-link targets must be relative and free of `..`. Every
//! parent directory is opened from a descriptor of the destination with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`, so a symlink leading outside stops the
//! entry with [`UnpackError::Escape`], and the final component is created with `*at` calls
//! that never follow a symlink (an existing symlink is replaced, never written through).
//!
//! Speed: one reused 1 MiB copy buffer, a small cache of open parent directories, no
//! per-file fsync (the caller calls [`sync_dir`] once), and directory metadata applied once
//! at the end, deepest first, so that read-only directories don't block their children.
//!
//! Invariant: nothing outside `dest` is created, changed or followed.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use flate2::bufread::MultiGzDecoder;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags};

use super::digest::{Digest, Hasher};

/// Size of the buffer file contents are copied through.
const COPY_BUFFER: usize = 1 << 20;
/// Size of the read buffers in front of the decompressor and the tar parser.
const READ_BUFFER: usize = 256 << 10;
/// How many open parent directories are kept between entries.
const PARENT_CACHE: usize = 8;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const OPAQUE_XATTR: &CStr = c"trusted.overlay.opaque";
const PAX_XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";
/// Xattrs that steer overlayfs: only whiteout conversion may create them.
const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";

/// One layer blob to unpack, as described by the image manifest and config.
#[derive(Debug, Clone, Copy)]
pub struct LayerInput<'a> {
    /// OCI or Docker layer media type (tar, tar+gzip).
    pub media_type: &'a str,
    /// Digest of the blob as transferred (compressed).
    pub digest: &'a Digest,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids`), when known.
    pub diff_id: Option<&'a Digest>,
}

/// What [`unpack_layer`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Sum of the sizes of the regular files written.
    pub bytes: u64,
    /// Number of archive entries processed (whiteouts and links included).
    pub entries: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer media type {media_type:?} is not supported yet")]
    UnsupportedMediaType { media_type: String },
    #[error("unknown layer media type {media_type:?}")]
    UnknownMediaType { media_type: String },
    #[error("cannot open unpack destination {path}")]
    OpenDest {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read layer blob")]
    ReadBlob {
        #[source]
        source: io::Error,
    },
    #[error("layer archive is malformed")]
    Archive {
        #[source]
        source: io::Error,
    },
    #[error("cannot read layer entry {entry:?}")]
    ReadEntry {
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("layer entry {entry:?} has an absolute path")]
    AbsolutePath { entry: String },
    #[error("layer entry {entry:?} has a \"..\" path component")]
    ParentDirComponent { entry: String },
    #[error("layer entry {entry:?} leads outside the rootfs")]
    Escape { entry: String, dest: PathBuf },
    #[error("hard link {entry:?} has target {target:?} outside the layer")]
    UnsafeHardLinkTarget { entry: String, target: String },
    #[error("hard link {entry:?} points to {target:?}, which is not earlier in the layer")]
    MissingHardLinkTarget { entry: String, target: String },
    #[error("layer entry {entry:?} is invalid: {reason}")]
    InvalidEntry { entry: String, reason: &'static str },
    #[error("layer entry {entry:?} has unsupported type {kind:?}")]
    UnsupportedEntryType { entry: String, kind: char },
    #[error("cannot {action} layer entry {entry:?} under {dest}")]
    Write {
        entry: String,
        dest: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("layer digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
}

/// Unpacks one layer blob read from `reader` into the empty directory `dest`, as its own
/// overlayfs lower layer, and verifies the blob digest and diff ID.
///
/// The reader is read to its end. Directory metadata is applied at the end, to `dest` too:
/// the layer's `./` entry, or mode 0755 when it has none (the topmost layer's root is the
/// root of the merged overlay). Nothing is synced: call [`sync_dir`].
/// On error `dest` holds a partial layer and must be deleted.
pub fn unpack_layer(
    reader: impl Read,
    dest: &Path,
    layer: &LayerInput,
) -> Result<UnpackStats, UnpackError> {
    let compression = Compression::from_media_type(layer.media_type)?;
    let mut unpacker = Unpacker::new(dest)?;
    let stream = Stream::new(reader, compression);
    let mut archive = tar::Archive::new(BufReader::with_capacity(READ_BUFFER, stream));
    let result = unpacker.unpack_entries(&mut archive);
    let mut stream = archive.into_inner().into_inner();

    if let Err(err) = result {
        return Err(explain(stream, &mut unpacker.buf, layer.digest, err));
    }
    // Read past the end-of-archive blocks so that both digests cover everything.
    let drained = stream
        .drain_tar(&mut unpacker.buf)
        .and_then(|()| stream.drain_blob(&mut unpacker.buf));
    if let Err(source) = drained {
        let err = UnpackError::Archive { source };
        return Err(explain(stream, &mut unpacker.buf, layer.digest, err));
    }
    let (blob, diff) = stream.digests();
    verify(layer.digest, blob)?;
    if let Some(diff_id) = layer.diff_id {
        verify(diff_id, diff)?;
    }

    unpacker.finish_dirs()?;
    tracing::debug!(
        dest = %dest.display(),
        digest = %layer.digest,
        entries = unpacker.stats.entries,
        bytes = unpacker.stats.bytes,
        "layer unpacked"
    );
    Ok(unpacker.stats)
}

/// Flushes the filesystem holding `dest` to disk (`syncfs`), once after unpacking.
pub fn sync_dir(dest: &Path) -> io::Result<()> {
    let dir = File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dest)?;
    nix::unistd::syncfs(dir.as_raw_fd())?;
    Ok(())
}

/// Explains a failure to read the archive: a failing reader is reported as such; otherwise
/// the rest of the blob is hashed, and a digest mismatch (a corrupted download) is reported
/// rather than the format error it caused.
fn explain<R: Read>(
    mut stream: Stream<R>,
    buf: &mut [u8],
    digest: &Digest,
    err: UnpackError,
) -> UnpackError {
    if !matches!(
        err,
        UnpackError::Archive { .. } | UnpackError::ReadEntry { .. }
    ) {
        return err;
    }
    if stream.blob_failed() {
        return match err {
            UnpackError::Archive { source } | UnpackError::ReadEntry { source, .. } => {
                UnpackError::ReadBlob { source }
            }
            other => other,
        };
    }
    if stream.drain_blob(buf).is_ok() {
        let (blob, _) = stream.digests();
        if let Err(mismatch) = verify(digest, blob) {
            return mismatch;
        }
    }
    err
}

fn verify(expected: &Digest, actual: Digest) -> Result<(), UnpackError> {
    if *expected == actual {
        Ok(())
    } else {
        Err(UnpackError::DigestMismatch {
            expected: expected.clone(),
            actual,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
}

impl Compression {
    fn from_media_type(media_type: &str) -> Result<Compression, UnpackError> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Err(UnpackError::UnsupportedMediaType {
                    media_type: media_type.to_owned(),
                })
            }
            _ => Err(UnpackError::UnknownMediaType {
                media_type: media_type.to_owned(),
            }),
        }
    }
}

/// Passes bytes through and hashes them.
struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
    failed: bool,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Hasher::new(),
            failed: false,
        }
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                let Some(read) = buf.get(..n) else {
                    self.failed = true;
                    return Err(io::Error::other(
                        "reader returned more bytes than asked for",
                    ));
                };
                self.hasher.update(read);
                Ok(n)
            }
            Err(err) => {
                if err.kind() != io::ErrorKind::Interrupted {
                    self.failed = true;
                }
                Err(err)
            }
        }
    }
}

type GzipStream<R> = HashingReader<MultiGzDecoder<BufReader<HashingReader<R>>>>;

/// The blob, decompressed, with a hash of the blob and one of the tar.
enum Stream<R> {
    /// Uncompressed: the blob is the tar, one hash serves both.
    Plain(HashingReader<R>),
    Gzip(Box<GzipStream<R>>),
}

impl<R: Read> Stream<R> {
    fn new(reader: R, compression: Compression) -> Self {
        let blob = HashingReader::new(reader);
        match compression {
            Compression::None => Stream::Plain(blob),
            Compression::Gzip => Stream::Gzip(Box::new(HashingReader::new(MultiGzDecoder::new(
                BufReader::with_capacity(READ_BUFFER, blob),
            )))),
        }
    }

    fn blob(&mut self) -> &mut HashingReader<R> {
        match self {
            Stream::Plain(blob) => blob,
            Stream::Gzip(tar) => tar.inner.get_mut().get_mut(),
        }
    }

    fn blob_failed(&mut self) -> bool {
        self.blob().failed
    }

    /// Reads the tar to its end (what the tar parser left, the padding after the archive).
    fn drain_tar(&mut self, buf: &mut [u8]) -> io::Result<()> {
        drain(self, buf)
    }

    /// Reads the blob to its end; bytes still buffered above it were hashed already.
    fn drain_blob(&mut self, buf: &mut [u8]) -> io::Result<()> {
        drain(self.blob(), buf)
    }

    /// (blob digest, tar digest).
    fn digests(self) -> (Digest, Digest) {
        match self {
            Stream::Plain(blob) => {
                let digest = blob.hasher.finish();
                (digest.clone(), digest)
            }
            Stream::Gzip(tar) => {
                let tar = *tar;
                let diff = tar.hasher.finish();
                let blob = tar.inner.into_inner().into_inner().hasher.finish();
                (blob, diff)
            }
        }
    }
}

impl<R: Read> Read for Stream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(blob) => blob.read(buf),
            Stream::Gzip(tar) => tar.read(buf),
        }
    }
}

fn drain(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<()> {
    loop {
        match reader.read(buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
}

/// Ownership, mode, times and xattrs of an entry.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    /// `None` for directories missing from the archive: their time is left alone.
    mtime: Option<TimeSpec>,
    xattrs: Vec<(CString, Vec<u8>)>,
}

impl Meta {
    /// A parent directory the archive does not list.
    fn implicit_dir(uid: u32, gid: u32) -> Meta {
        Meta {
            mode: 0o755,
            uid,
            gid,
            mtime: None,
            xattrs: Vec::new(),
        }
    }
}

/// The entry being unpacked: its name as in the archive and its normalized path.
struct Item {
    raw: Vec<u8>,
    /// Components joined by `/`, without `.`, empty for the layer root.
    path: Vec<u8>,
}

impl Item {
    fn name(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }

    /// (parent path, final component).
    fn split(&self) -> (&[u8], &[u8]) {
        split_last(&self.path)
    }
}

fn split_last(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathProblem {
    Absolute,
    ParentDir,
    Nul,
}

/// Drops `.` and empty components; refuses absolute paths, `..` and NUL bytes.
fn normalize(raw: &[u8]) -> Result<Vec<u8>, PathProblem> {
    if raw.first() == Some(&b'/') {
        return Err(PathProblem::Absolute);
    }
    if raw.contains(&0) {
        return Err(PathProblem::Nul);
    }
    let mut path = Vec::with_capacity(raw.len());
    for component in raw.split(|&b| b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err(PathProblem::ParentDir),
            _ => {
                if !path.is_empty() {
                    path.push(b'/');
                }
                path.extend_from_slice(component);
            }
        }
    }
    Ok(path)
}

/// Parses a PAX time, `[-]seconds[.fraction]`.
fn parse_pax_time(value: &[u8]) -> Option<TimeSpec> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (secs, fraction) = text.split_once('.').unwrap_or((text, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    for i in 0..9 {
        let digit = fraction
            .as_bytes()
            .get(i)
            .map_or(0, |b| i64::from(b - b'0'));
        nanos = nanos * 10 + digit;
    }
    if negative {
        secs = -secs;
        if nanos > 0 {
            secs -= 1;
            nanos = 1_000_000_000 - nanos;
        }
    }
    Some(TimeSpec::new(secs, nanos))
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: callers pass a descriptor they just obtained and that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Opens `path` (non-empty) below `root`, refusing any resolution that leaves it.
fn open_beneath(root: BorrowedFd, path: &[u8], flags: OFlag) -> nix::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    loop {
        // openat2 returns EAGAIN when a concurrent rename may have raced the lookup.
        match nix::fcntl::openat2(root.as_raw_fd(), path, how) {
            Err(Errno::EAGAIN | Errno::EINTR) => continue,
            result => return result.map(owned),
        }
    }
}

fn open_dir_at(parent: BorrowedFd, name: &[u8]) -> nix::Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    nix::fcntl::openat(Some(parent.as_raw_fd()), name, flags, Mode::empty()).map(owned)
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY.union(OFlag::O_DIRECTORY);

fn stat_at(parent: BorrowedFd, name: &[u8]) -> nix::Result<FileStat> {
    nix::sys::stat::fstatat(Some(parent.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW)
}

fn is_dir(stat: &FileStat) -> bool {
    stat.st_mode & libc::S_IFMT == libc::S_IFDIR
}

fn is_whiteout(stat: &FileStat) -> bool {
    stat.st_mode & libc::S_IFMT == libc::S_IFCHR && stat.st_rdev == 0
}

fn fsetxattr(fd: BorrowedFd, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: `fd` is open for the whole call, `name` is NUL-terminated and `value` points to
    // `value.len()` readable bytes; the kernel only reads them.
    let rc = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets an xattr on `name` in `parent` without following it if it is a symlink. There is no
/// `setxattrat` in libc, so the parent is named through its `/proc/self/fd` entry.
fn lsetxattr_at(parent: BorrowedFd, name: &[u8], xattr: &CStr, value: &[u8]) -> io::Result<()> {
    let mut path = format!("/proc/self/fd/{}/", parent.as_raw_fd()).into_bytes();
    path.extend_from_slice(name);
    let path = CString::new(path).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `path` and `xattr` are NUL-terminated and `value` points to `value.len()`
    // readable bytes; the kernel only reads them.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            xattr.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes `name` in `parent`, recursively if it is a directory, never following symlinks.
fn remove_all_at(parent: BorrowedFd, name: &[u8]) -> io::Result<()> {
    let parent_fd = Some(parent.as_raw_fd());
    match nix::unistd::unlinkat(parent_fd, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) => return Ok(()),
        Err(Errno::EISDIR) => {}
        Err(err) => return Err(err.into()),
    }
    let dir = open_dir_at(parent, name)?;
    for child in dir_names(dir.as_fd())? {
        remove_all_at(dir.as_fd(), &child)?;
    }
    nix::unistd::unlinkat(parent_fd, name, UnlinkatFlags::RemoveDir)?;
    Ok(())
}

/// Names in a directory, without `.` and `..`.
fn dir_names(dir: BorrowedFd) -> io::Result<Vec<Vec<u8>>> {
    let fd = dir.try_clone_to_owned()?.into_raw_fd();
    // SAFETY: `fd` is an open directory descriptor we own; on success the DIR stream owns it.
    let stream = unsafe { libc::fdopendir(fd) };
    if stream.is_null() {
        let err = io::Error::last_os_error();
        drop(owned(fd));
        return Err(err);
    }
    let mut names = Vec::new();
    let result = loop {
        Errno::clear();
        // SAFETY: `stream` is a valid DIR stream used by this thread only.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            break match Errno::last_raw() {
                0 => Ok(()),
                errno => Err(io::Error::from_raw_os_error(errno)),
            };
        }
        // SAFETY: readdir returned a valid entry whose `d_name` is NUL-terminated; it stays
        // valid until the next readdir on `stream`, and the bytes are copied before that.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    };
    // SAFETY: `stream` is valid and not used after this; closedir also closes `fd`.
    unsafe { libc::closedir(stream) };
    result.map(|()| names)
}

/// Recently used parent directories, by normalized path.
struct ParentCache {
    slots: Vec<(Vec<u8>, OwnedFd)>,
}

impl ParentCache {
    fn take(&mut self, path: &[u8]) -> Option<(Vec<u8>, OwnedFd)> {
        let i = self.slots.iter().rposition(|(p, _)| p == path)?;
        Some(self.slots.remove(i))
    }

    fn put(&mut self, path: Vec<u8>, fd: OwnedFd) {
        if self.slots.len() >= PARENT_CACHE {
            self.slots.remove(0);
        }
        self.slots.push((path, fd));
    }

    /// Forgets everything: after a removal, a cached path may name another directory.
    fn clear(&mut self) {
        self.slots.clear();
    }
}

struct Unpacker<'d> {
    dest: &'d Path,
    root: OwnedFd,
    euid: u32,
    egid: u32,
    /// A setgid `dest` makes new entries inherit its group: chown everything then.
    always_chown: bool,
    buf: Vec<u8>,
    parents: ParentCache,
    /// Directories to finish at the end, by normalized path.
    dirs: BTreeMap<Vec<u8>, Meta>,
    stats: UnpackStats,
}

impl<'d> Unpacker<'d> {
    fn new(dest: &'d Path) -> Result<Self, UnpackError> {
        let open_dest = |source| UnpackError::OpenDest {
            path: dest.to_owned(),
            source,
        };
        let root: OwnedFd = File::options()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(dest)
            .map_err(open_dest)?
            .into();
        let stat = nix::sys::stat::fstat(root.as_raw_fd()).map_err(|e| open_dest(e.into()))?;
        Ok(Unpacker {
            dest,
            root,
            euid: nix::unistd::geteuid().as_raw(),
            egid: nix::unistd::getegid().as_raw(),
            always_chown: stat.st_mode & libc::S_ISGID != 0,
            buf: vec![0; COPY_BUFFER],
            parents: ParentCache { slots: Vec::new() },
            dirs: BTreeMap::new(),
            stats: UnpackStats::default(),
        })
    }

    fn write_err(
        &self,
        item: &Item,
        action: &'static str,
        source: impl Into<io::Error>,
    ) -> UnpackError {
        UnpackError::Write {
            entry: item.name(),
            dest: self.dest.to_owned(),
            action,
            source: source.into(),
        }
    }

    fn escape(&self, item: &Item) -> UnpackError {
        UnpackError::Escape {
            entry: item.name(),
            dest: self.dest.to_owned(),
        }
    }

    fn invalid(item: &Item, reason: &'static str) -> UnpackError {
        UnpackError::InvalidEntry {
            entry: item.name(),
            reason,
        }
    }

    fn read_err(item: &Item, source: io::Error) -> UnpackError {
        UnpackError::ReadEntry {
            entry: item.name(),
            source,
        }
    }

    fn needs_chown(&self, meta: &Meta) -> bool {
        self.always_chown || meta.uid != self.euid || meta.gid != self.egid
    }

    fn unpack_entries<R: Read>(
        &mut self,
        archive: &mut tar::Archive<R>,
    ) -> Result<(), UnpackError> {
        let entries = archive
            .entries()
            .map_err(|source| UnpackError::Archive { source })?;
        for entry in entries {
            let mut entry = entry.map_err(|source| UnpackError::Archive { source })?;
            self.entry(&mut entry)?;
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        let raw = entry.path_bytes().into_owned();
        let path = match normalize(&raw) {
            Ok(path) => path,
            Err(problem) => {
                let entry = String::from_utf8_lossy(&raw).into_owned();
                return Err(match problem {
                    PathProblem::Absolute => UnpackError::AbsolutePath { entry },
                    PathProblem::ParentDir => UnpackError::ParentDirComponent { entry },
                    PathProblem::Nul => UnpackError::InvalidEntry {
                        entry,
                        reason: "its name contains a NUL byte",
                    },
                });
            }
        };
        let item = Item { raw, path };
        self.stats.entries += 1;

        let (parent_path, base) = item.split();
        if base.starts_with(WHITEOUT_PREFIX) {
            let (key, parent) = self.parent(&item, parent_path)?;
            let result = self.whiteout(&item, parent.as_fd(), base);
            self.parents.put(key, parent);
            return result;
        }

        let meta = self.meta(entry, &item)?;
        let is_dir = kind.is_dir() || (kind.is_file() && item.raw.ends_with(b"/"));
        if item.path.is_empty() {
            if !is_dir {
                return Err(Self::invalid(&item, "the layer root must be a directory"));
            }
            self.dirs.insert(Vec::new(), meta);
            return Ok(());
        }

        let (key, parent) = self.parent(&item, parent_path)?;
        let parent_fd = parent.as_fd();
        let result = if is_dir {
            self.directory(&item, parent_fd, base, meta)
        } else if kind.is_file() || kind.is_contiguous() || kind.is_gnu_sparse() {
            self.regular(entry, &item, parent_fd, base, &meta)
        } else if kind.is_symlink() {
            match entry.link_name_bytes() {
                Some(target) if !target.is_empty() => {
                    let target = target.into_owned();
                    self.symlink(&item, parent_fd, base, &target, &meta)
                }
                _ => Err(Self::invalid(&item, "symlink without a target")),
            }
        } else if kind.is_hard_link() {
            match entry.link_name_bytes() {
                Some(target) if !target.is_empty() => {
                    let target = target.into_owned();
                    self.hard_link(&item, parent_fd, base, &target)
                }
                _ => Err(Self::invalid(&item, "hard link without a target")),
            }
        } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            self.special(entry, &item, parent_fd, base, &meta)
        } else {
            Err(UnpackError::UnsupportedEntryType {
                entry: item.name(),
                kind: char::from(kind.as_byte()),
            })
        };
        self.parents.put(key, parent);
        result
    }

    fn meta<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        item: &Item,
    ) -> Result<Meta, UnpackError> {
        let header = entry.header();
        let mode = header.mode().map_err(|e| Self::read_err(item, e))? & 0o7777;
        let uid = header.uid().map_err(|e| Self::read_err(item, e))?;
        let gid = header.gid().map_err(|e| Self::read_err(item, e))?;
        let mtime = header.mtime().map_err(|e| Self::read_err(item, e))?;
        let uid = u32::try_from(uid)
            .map_err(|_| Self::invalid(item, "its uid does not fit in 32 bits"))?;
        let gid = u32::try_from(gid)
            .map_err(|_| Self::invalid(item, "its gid does not fit in 32 bits"))?;
        let mtime =
            i64::try_from(mtime).map_err(|_| Self::invalid(item, "its mtime is out of range"))?;
        let mut meta = Meta {
            mode,
            uid,
            gid,
            mtime: Some(TimeSpec::new(mtime, 0)),
            xattrs: Vec::new(),
        };
        let Some(extensions) = entry
            .pax_extensions()
            .map_err(|e| Self::read_err(item, e))?
        else {
            return Ok(meta);
        };
        for extension in extensions {
            let extension = extension.map_err(|e| Self::read_err(item, e))?;
            let key = extension.key_bytes();
            if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                if name.starts_with(OVERLAY_XATTR_PREFIX) {
                    tracing::warn!(
                        entry = %item.name(),
                        xattr = %String::from_utf8_lossy(name),
                        "ignoring overlayfs xattr in layer"
                    );
                    continue;
                }
                let name = CString::new(name)
                    .map_err(|_| Self::invalid(item, "an xattr name contains a NUL byte"))?;
                meta.xattrs.push((name, extension.value_bytes().to_vec()));
            } else if key == b"mtime" {
                let mtime = parse_pax_time(extension.value_bytes())
                    .ok_or_else(|| Self::invalid(item, "its PAX mtime is malformed"))?;
                meta.mtime = Some(mtime);
            }
        }
        Ok(meta)
    }

    /// Opens the parent directory of an entry below `dest`, creating missing directories.
    /// Returns the cache key with the descriptor; put both back into the cache when done.
    fn parent(&mut self, item: &Item, path: &[u8]) -> Result<(Vec<u8>, OwnedFd), UnpackError> {
        if let Some(hit) = self.parents.take(path) {
            return Ok(hit);
        }
        let fd = if path.is_empty() {
            self.root
                .try_clone()
                .map_err(|e| self.write_err(item, "open parent directory of", e))?
        } else {
            match open_beneath(self.root.as_fd(), path, DIR_FLAGS) {
                Ok(fd) => fd,
                Err(Errno::ENOENT | Errno::ENOTDIR) => self.make_parents(item, path)?,
                Err(Errno::EXDEV) => return Err(self.escape(item)),
                Err(err) => return Err(self.write_err(item, "open parent directory of", err)),
            }
        };
        Ok((path.to_vec(), fd))
    }

    /// Slow path of [`Self::parent`]: walks `path` one component at a time, each resolved from
    /// `dest`, and creates what is missing. A whiteout in the way becomes an opaque directory.
    fn make_parents(&mut self, item: &Item, path: &[u8]) -> Result<OwnedFd, UnpackError> {
        const ACTION: &str = "create parent directory of";
        let mut current = self
            .root
            .try_clone()
            .map_err(|e| self.write_err(item, ACTION, e))?;
        let mut start = 0;
        let ends = path
            .iter()
            .enumerate()
            .filter(|(_, &b)| b == b'/')
            .map(|(i, _)| i)
            .chain(std::iter::once(path.len()));
        for end in ends {
            let prefix = &path[..end];
            let name = &path[start..end];
            start = end + 1;
            current = match open_beneath(self.root.as_fd(), prefix, DIR_FLAGS) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => {
                    match nix::sys::stat::mkdirat(
                        Some(current.as_raw_fd()),
                        name,
                        Mode::from_bits_truncate(0o755),
                    ) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(err) => return Err(self.write_err(item, ACTION, err)),
                    }
                    self.dirs
                        .entry(prefix.to_vec())
                        .or_insert_with(|| Meta::implicit_dir(self.euid, self.egid));
                    open_dir_at(current.as_fd(), name)
                        .map_err(|e| self.write_err(item, ACTION, e))?
                }
                Err(Errno::ENOTDIR)
                    if stat_at(current.as_fd(), name).is_ok_and(|stat| is_whiteout(&stat)) =>
                {
                    let parent = current.as_fd();
                    self.remove(item, prefix, parent, name)?;
                    nix::sys::stat::mkdirat(
                        Some(parent.as_raw_fd()),
                        name,
                        Mode::from_bits_truncate(0o755),
                    )
                    .map_err(|e| self.write_err(item, ACTION, e))?;
                    self.dirs
                        .entry(prefix.to_vec())
                        .or_insert_with(|| Meta::implicit_dir(self.euid, self.egid));
                    let dir =
                        open_dir_at(parent, name).map_err(|e| self.write_err(item, ACTION, e))?;
                    fsetxattr(dir.as_fd(), OPAQUE_XATTR, b"y")
                        .map_err(|e| self.write_err(item, ACTION, e))?;
                    dir
                }
                Err(Errno::EXDEV) => return Err(self.escape(item)),
                Err(err) => return Err(self.write_err(item, ACTION, err)),
            };
        }
        Ok(current)
    }

    /// Removes what is at `name` (normalized path `path`) to make room for a new entry.
    fn remove(
        &mut self,
        item: &Item,
        path: &[u8],
        parent: BorrowedFd,
        name: &[u8],
    ) -> Result<(), UnpackError> {
        self.parents.clear();
        // Forget the metadata of directories that go away with it.
        let stale: Vec<Vec<u8>> = self
            .dirs
            .range(path.to_vec()..)
            .map(|(key, _)| key)
            .take_while(|key| key.starts_with(path))
            .filter(|key| key.len() == path.len() || key.get(path.len()) == Some(&b'/'))
            .cloned()
            .collect();
        for key in stale {
            self.dirs.remove(&key);
        }
        remove_all_at(parent, name).map_err(|e| self.write_err(item, "replace", e))
    }

    /// Runs `create`; if the name is taken, removes what is there and runs it again.
    fn create<T>(
        &mut self,
        item: &Item,
        parent: BorrowedFd,
        name: &[u8],
        mut create: impl FnMut() -> nix::Result<T>,
    ) -> Result<nix::Result<T>, UnpackError> {
        match create() {
            Err(Errno::EEXIST) => {
                self.remove(item, &item.path, parent, name)?;
                Ok(create())
            }
            result => Ok(result),
        }
    }

    fn whiteout(
        &mut self,
        item: &Item,
        parent: BorrowedFd,
        base: &[u8],
    ) -> Result<(), UnpackError> {
        if base == OPAQUE_MARKER {
            return fsetxattr(parent, OPAQUE_XATTR, b"y")
                .map_err(|e| self.write_err(item, "convert whiteout", e));
        }
        if base.starts_with(WHITEOUT_META_PREFIX) {
            tracing::debug!(entry = %item.name(), "skipping aufs metadata entry");
            return Ok(());
        }
        let name = &base[WHITEOUT_PREFIX.len()..];
        if name.is_empty() || name == b"." || name == b".." {
            return Err(Self::invalid(item, "whiteout without a valid name"));
        }
        let device = nix::sys::stat::mknodat(
            Some(parent.as_raw_fd()),
            name,
            SFlag::S_IFCHR,
            Mode::empty(),
            0,
        );
        match device {
            Ok(()) => Ok(()),
            // The name is in this layer already: it hides the lower layers by itself, but a
            // directory must also hide their contents (the whiteout applies to lower layers).
            Err(Errno::EEXIST) => {
                let stat = stat_at(parent, name)
                    .map_err(|e| self.write_err(item, "convert whiteout", e))?;
                if is_dir(&stat) {
                    open_dir_at(parent, name)
                        .map_err(io::Error::from)
                        .and_then(|dir| fsetxattr(dir.as_fd(), OPAQUE_XATTR, b"y"))
                        .map_err(|e| self.write_err(item, "convert whiteout", e))?;
                }
                Ok(())
            }
            Err(err) => Err(self.write_err(item, "convert whiteout", err)),
        }
    }

    fn directory(
        &mut self,
        item: &Item,
        parent: BorrowedFd,
        base: &[u8],
        meta: Meta,
    ) -> Result<(), UnpackError> {
        let mkdir = || {
            nix::sys::stat::mkdirat(
                Some(parent.as_raw_fd()),
                base,
                Mode::from_bits_truncate(0o755),
            )
        };
        match mkdir() {
            Ok(()) => {}
            Err(Errno::EEXIST) => {
                let stat = stat_at(parent, base).map_err(|e| self.write_err(item, "create", e))?;
                // A directory over a directory keeps its contents; anything else is replaced.
                if !is_dir(&stat) {
                    self.remove(item, &item.path, parent, base)?;
                    mkdir().map_err(|e| self.write_err(item, "create", e))?;
                    if is_whiteout(&stat) {
                        // Whiteout then directory in one layer: only this layer's contents show.
                        open_dir_at(parent, base)
                            .map_err(io::Error::from)
                            .and_then(|dir| fsetxattr(dir.as_fd(), OPAQUE_XATTR, b"y"))
                            .map_err(|e| self.write_err(item, "create", e))?;
                    }
                }
            }
            Err(err) => return Err(self.write_err(item, "create", err)),
        }
        self.dirs.insert(item.path.clone(), meta);
        Ok(())
    }

    fn regular<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        item: &Item,
        parent: BorrowedFd,
        base: &[u8],
        meta: &Meta,
    ) -> Result<(), UnpackError> {
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let open = || {
            nix::fcntl::openat(
                Some(parent.as_raw_fd()),
                base,
                flags,
                Mode::from_bits_truncate(0o600),
            )
            .map(owned)
        };
        let fd = self
            .create(item, parent, base, open)?
            .map_err(|e| self.write_err(item, "create", e))?;
        let mut file = File::from(fd);

        let size = entry.size();
        let mut written: u64 = 0;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(Self::read_err(item, err)),
            };
            let chunk = self.buf.get(..n).unwrap_or_default();
            if let Err(err) = file.write_all(chunk) {
                return Err(self.write_err(item, "write", err));
            }
            written += n as u64;
        }
        if written != size {
            let err = io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ends inside the entry",
            );
            return Err(Self::read_err(item, err));
        }
        self.finish_fd(item, file.as_fd(), meta)?;
        self.stats.bytes += written;
        Ok(())
    }

    /// Applies owner, mode, xattrs and times through a descriptor, in the order that keeps
    /// them all: chown clears setuid bits and `security.capability`, writes change mtime.
    fn finish_fd(&self, item: &Item, fd: BorrowedFd, meta: &Meta) -> Result<(), UnpackError> {
        let raw = fd.as_raw_fd();
        if self.needs_chown(meta) {
            nix::unistd::fchown(
                raw,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
            )
            .map_err(|e| self.write_err(item, "change owner of", e))?;
        }
        nix::sys::stat::fchmod(raw, Mode::from_bits_truncate(meta.mode))
            .map_err(|e| self.write_err(item, "change mode of", e))?;
        for (name, value) in &meta.xattrs {
            fsetxattr(fd, name, value).map_err(|e| self.write_err(item, "set xattrs of", e))?;
        }
        if let Some(mtime) = meta.mtime {
            nix::sys::stat::futimens(raw, &mtime, &mtime)
                .map_err(|e| self.write_err(item, "set times of", e))?;
        }
        Ok(())
    }

    /// Applies metadata by name, never following a symlink (for symlinks and special files).
    fn finish_at(
        &self,
        item: &Item,
        parent: BorrowedFd,
        base: &[u8],
        meta: &Meta,
        chmod: bool,
    ) -> Result<(), UnpackError> {
        let parent_fd = Some(parent.as_raw_fd());
        if self.needs_chown(meta) {
            nix::unistd::fchownat(
                parent_fd,
                base,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| self.write_err(item, "change owner of", e))?;
        }
        if chmod {
            // Just created by us as a device or fifo: there is no symlink to follow.
            nix::sys::stat::fchmodat(
                parent_fd,
                base,
                Mode::from_bits_truncate(meta.mode),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .map_err(|e| self.write_err(item, "change mode of", e))?;
        }
        for (name, value) in &meta.xattrs {
            lsetxattr_at(parent, base, name, value)
                .map_err(|e| self.write_err(item, "set xattrs of", e))?;
        }
        if let Some(mtime) = meta.mtime {
            nix::sys::stat::utimensat(
                parent_fd,
                base,
                &mtime,
                &mtime,
                UtimensatFlags::NoFollowSymlink,
            )
            .map_err(|e| self.write_err(item, "set times of", e))?;
        }
        Ok(())
    }

    fn symlink(
        &mut self,
        item: &Item,
        parent: BorrowedFd,
        base: &[u8],
        target: &[u8],
        meta: &Meta,
    ) -> Result<(), UnpackError> {
        // The target may be absolute or contain "..": it is only refused if written through.
        self.create(item, parent, base, || {
            nix::unistd::symlinkat(target, Some(parent.as_raw_fd()), base)
        })?
        .map_err(|e| self.write_err(item, "create", e))?;
        self.finish_at(item, parent, base, meta, false)
    }

    fn hard_link(
        &mut self,
        item: &Item,
        parent: BorrowedFd,
        base: &[u8],
        raw_target: &[u8],
    ) -> Result<(), UnpackError> {
        let target_name = || String::from_utf8_lossy(raw_target).into_owned();
        let target = normalize(raw_target).map_err(|_| UnpackError::UnsafeHardLinkTarget {
            entry: item.name(),
            target: target_name(),
        })?;
        if target.is_empty() {
            return Err(Self::invalid(item, "hard link to the layer root"));
        }
        if target == item.path {
            return Ok(());
        }
        let missing = || UnpackError::MissingHardLinkTarget {
            entry: item.name(),
            target: target_name(),
        };
        let (target_parent, target_base) = split_last(&target);
        let target_dir = if target_parent.is_empty() {
            None
        } else {
            match open_beneath(self.root.as_fd(), target_parent, DIR_FLAGS) {
                Ok(fd) => Some(fd),
                Err(Errno::ENOENT | Errno::ENOTDIR) => return Err(missing()),
                Err(Errno::EXDEV) => return Err(self.escape(item)),
                Err(err) => return Err(self.write_err(item, "resolve the target of", err)),
            }
        };
        let target_dir = target_dir
            .as_ref()
            .map_or(self.root.as_raw_fd(), |fd| fd.as_raw_fd());
        let link = || {
            // Flags 0: a symlink target is linked itself, never followed.
            nix::unistd::linkat(
                Some(target_dir),
                target_base,
                Some(parent.as_raw_fd()),
                base,
                AtFlags::empty(),
            )
        };
        match self.create(item, parent, base, link)? {
            Ok(()) => Ok(()),
            Err(Errno::ENOENT) => Err(missing()),
            Err(err) => Err(self.write_err(item, "create", err)),
        }
    }

    fn special<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        item: &Item,
        parent: BorrowedFd,
        base: &[u8],
        meta: &Meta,
    ) -> Result<(), UnpackError> {
        let header = entry.header();
        let kind = header.entry_type();
        let (sflag, dev) = if kind.is_fifo() {
            (SFlag::S_IFIFO, 0)
        } else {
            let major = header.device_major().map_err(|e| Self::read_err(item, e))?;
            let minor = header.device_minor().map_err(|e| Self::read_err(item, e))?;
            let (Some(major), Some(minor)) = (major, minor) else {
                return Err(Self::invalid(item, "device numbers are missing"));
            };
            let sflag = if kind.is_character_special() {
                SFlag::S_IFCHR
            } else {
                SFlag::S_IFBLK
            };
            (sflag, nix::sys::stat::makedev(major.into(), minor.into()))
        };
        self.create(item, parent, base, || {
            nix::sys::stat::mknodat(
                Some(parent.as_raw_fd()),
                base,
                sflag,
                Mode::from_bits_truncate(0o600),
                dev,
            )
        })?
        .map_err(|e| self.write_err(item, "create", e))?;
        self.finish_at(item, parent, base, meta, true)
    }

    /// Applies directory metadata, deepest first, never following symlinks.
    fn finish_dirs(&mut self) -> Result<(), UnpackError> {
        self.parents.clear();
        let (euid, egid) = (self.euid, self.egid);
        self.dirs
            .entry(Vec::new())
            .or_insert_with(|| Meta::implicit_dir(euid, egid));
        let mut dirs: Vec<(Vec<u8>, Meta)> = std::mem::take(&mut self.dirs).into_iter().collect();
        let depth = |path: &[u8]| {
            if path.is_empty() {
                0
            } else {
                1 + path.iter().filter(|&&b| b == b'/').count()
            }
        };
        dirs.sort_by_key(|(path, _)| std::cmp::Reverse(depth(path)));
        for (path, meta) in dirs {
            let item = Item {
                raw: path.clone(),
                path,
            };
            let fd = if item.path.is_empty() {
                self.root
                    .try_clone()
                    .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
            } else {
                open_beneath(self.root.as_fd(), &item.path, DIR_FLAGS | OFlag::O_NOFOLLOW)
            };
            match fd {
                Ok(fd) => self.finish_fd(&item, fd.as_fd(), &meta)?,
                // Replaced by a later entry in a way the bookkeeping did not see (through a
                // symlink): nothing of this directory is left to finish.
                Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => {
                    tracing::debug!(entry = %item.name(), "directory replaced, metadata skipped");
                }
                Err(Errno::EXDEV) => return Err(self.escape(&item)),
                Err(err) => return Err(self.write_err(&item, "set metadata of", err)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use tar::{EntryType, Header};

    const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    const MTIME: u64 = 1_600_000_000;

    /// Almost everything here needs root: chown, mknod, trusted xattrs, mounts.
    fn skip_unless_root() -> bool {
        let root = nix::unistd::geteuid().is_root();
        if !root {
            eprintln!("skipped: needs root");
        }
        !root
    }

    /// Builds a layer tar entry by entry.
    struct Layer {
        builder: tar::Builder<Vec<u8>>,
    }

    impl Layer {
        fn new() -> Layer {
            Layer {
                builder: tar::Builder::new(Vec::new()),
            }
        }

        fn header(kind: EntryType, mode: u32, size: usize) -> Header {
            let mut header = Header::new_gnu();
            header.set_entry_type(kind);
            header.set_mode(mode);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(MTIME);
            header.set_size(size as u64);
            header
        }

        /// Any entry; `tweak` adjusts the header (owner, times, devices).
        fn entry(
            mut self,
            kind: EntryType,
            path: &str,
            mode: u32,
            link: Option<&str>,
            content: &[u8],
            tweak: impl FnOnce(&mut Header),
        ) -> Layer {
            let mut header = Layer::header(kind, mode, content.len());
            tweak(&mut header);
            let result = match link {
                Some(target) => self.builder.append_link(&mut header, path, target),
                None => self.builder.append_data(&mut header, path, content),
            };
            result.expect("append entry");
            self
        }

        fn file(self, path: &str, mode: u32, content: &[u8]) -> Layer {
            self.entry(EntryType::Regular, path, mode, None, content, |_| {})
        }

        fn owned_file(self, path: &str, mode: u32, uid: u64, gid: u64, content: &[u8]) -> Layer {
            self.entry(EntryType::Regular, path, mode, None, content, |h| {
                h.set_uid(uid);
                h.set_gid(gid);
            })
        }

        fn dir(self, path: &str, mode: u32) -> Layer {
            self.entry(EntryType::Directory, path, mode, None, b"", |_| {})
        }

        fn symlink(self, path: &str, target: &str) -> Layer {
            self.entry(EntryType::Symlink, path, 0o777, Some(target), b"", |_| {})
        }

        fn hardlink(self, path: &str, target: &str) -> Layer {
            self.entry(EntryType::Link, path, 0o644, Some(target), b"", |_| {})
        }

        fn device(self, kind: EntryType, path: &str, mode: u32, major: u32, minor: u32) -> Layer {
            self.entry(kind, path, mode, None, b"", |h| {
                h.set_device_major(major).expect("major");
                h.set_device_minor(minor).expect("minor");
            })
        }

        /// An entry whose name and link bytes are written verbatim (`set_path` refuses `..`).
        fn raw(mut self, kind: EntryType, name: &[u8], link: &[u8], content: &[u8]) -> Layer {
            let mut header = Layer::header(kind, 0o644, content.len());
            header.as_old_mut().name[..name.len()].copy_from_slice(name);
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
            header.set_cksum();
            self.builder
                .append(&header, content)
                .expect("append raw entry");
            self
        }

        /// PAX records for the next entry.
        fn pax(mut self, records: &[(&str, &[u8])]) -> Layer {
            self.builder
                .append_pax_extensions(records.iter().copied())
                .expect("append pax");
            self
        }

        fn tar(self) -> Vec<u8> {
            self.builder.into_inner().expect("finish tar")
        }
    }

    fn gzip(tar: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(tar).expect("gzip");
        encoder.finish().expect("gzip")
    }

    /// Gzips `tar` and unpacks it with correct digests.
    fn unpack(tar: &[u8], dest: &Path) -> Result<UnpackStats, UnpackError> {
        let blob = gzip(tar);
        let digest = Digest::of_bytes(&blob);
        let diff_id = Digest::of_bytes(tar);
        let layer = LayerInput {
            media_type: GZIP,
            digest: &digest,
            diff_id: Some(&diff_id),
        };
        unpack_layer(&blob[..], dest, &layer)
    }

    fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    fn meta(path: &Path) -> fs::Metadata {
        fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn mode(path: &Path) -> u32 {
        meta(path).mode() & 0o7777
    }

    fn lgetxattr(path: &Path, name: &CStr) -> Option<Vec<u8>> {
        let path = CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
        let mut value = vec![0u8; 256];
        // SAFETY: both strings are NUL-terminated and `value` has `value.len()` writable bytes.
        let n = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        let n = usize::try_from(n).ok()?;
        value.truncate(n);
        Some(value)
    }

    fn is_whiteout_at(path: &Path) -> bool {
        let meta = meta(path);
        meta.file_type().is_char_device() && meta.rdev() == 0
    }

    fn error_chain(err: &dyn std::error::Error) -> String {
        let mut text = err.to_string();
        let mut source = err.source();
        while let Some(err) = source {
            text.push_str(": ");
            text.push_str(&err.to_string());
            source = err.source();
        }
        text
    }

    /// Unmounts on drop, even when the test fails.
    struct MountGuard(PathBuf);

    impl Drop for MountGuard {
        fn drop(&mut self) {
            if let Err(err) = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("cannot unmount {}: {err}", self.0.display());
            }
        }
    }

    #[test]
    fn media_types() {
        fn check(media_type: &str, expected: Result<Compression, &str>) {
            let actual = Compression::from_media_type(media_type).map_err(|e| e.to_string());
            assert_eq!(actual, expected.map_err(str::to_owned), "{media_type}");
        }
        check(
            "application/vnd.oci.image.layer.v1.tar",
            Ok(Compression::None),
        );
        check(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            Ok(Compression::Gzip),
        );
        check(
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            Ok(Compression::Gzip),
        );
        check(
            "application/vnd.oci.image.layer.v1.tar+zstd",
            Err("layer media type \"application/vnd.oci.image.layer.v1.tar+zstd\" is not supported yet"),
        );
        check("text/plain", Err("unknown layer media type \"text/plain\""));
    }

    #[test]
    fn normalizes_names() {
        fn check(raw: &str, expected: Result<&str, PathProblem>) {
            let actual = normalize(raw.as_bytes());
            assert_eq!(actual, expected.map(|p| p.as_bytes().to_vec()), "{raw:?}");
        }
        check("usr/bin/x", Ok("usr/bin/x"));
        check("./usr/bin/", Ok("usr/bin"));
        check("./", Ok(""));
        check(".", Ok(""));
        check("a//b/./c", Ok("a/b/c"));
        check("..a/b..", Ok("..a/b.."));
        check("/etc/x", Err(PathProblem::Absolute));
        check("../x", Err(PathProblem::ParentDir));
        check("./../x", Err(PathProblem::ParentDir));
        check("a/../../x", Err(PathProblem::ParentDir));
        check("a/..", Err(PathProblem::ParentDir));
        check("a\0b", Err(PathProblem::Nul));
    }

    #[test]
    fn parses_pax_times() {
        fn check(value: &str, expected: Option<(i64, i64)>) {
            let actual = parse_pax_time(value.as_bytes()).map(|t| (t.tv_sec(), t.tv_nsec()));
            assert_eq!(actual, expected, "{value:?}");
        }
        check("1600000000", Some((1_600_000_000, 0)));
        check("1600000000.5", Some((1_600_000_000, 500_000_000)));
        check("1.123456789123", Some((1, 123_456_789)));
        check("-1.25", Some((-2, 750_000_000)));
        check("-3", Some((-3, 0)));
        check("", None);
        check("1.2x", None);
        check("+1", None);
        check("abc", None);
    }

    #[test]
    fn unpacks_files_dirs_links_and_metadata() {
        if skip_unless_root() {
            return;
        }
        let tmp = tempdir();
        let dest = tmp.path();
        let tar = Layer::new()
            .dir("./", 0o750)
            .dir("usr/", 0o755)
            .dir("usr/bin/", 0o755)
            .file("usr/bin/su", 0o4755, b"setuid binary")
            .owned_file("usr/bin/tool", 0o2711, 1234, 5678, b"setgid binary")
            .dir("tmp/", 0o1777)
            .file("./etc/missing/parent/file", 0o640, b"deep")
            .entry(
                EntryType::Symlink,
                "bin",
                0o777,
                Some("usr/bin"),
                b"",
                |h| {
                    h.set_uid(42);
                    h.set_gid(43);
                    h.set_mtime(1_500_000_000);
                },
            )
            .symlink("fd", "/proc/self/fd")
            .symlink("up", "../../..")
            .hardlink("usr/bin/su-again", "usr/bin/su")
            .hardlink("./bin-again", "./bin")
            .file("empty", 0o600, b"")
            .tar();
        let stats = unpack(&tar, dest).expect("unpack");
        assert_eq!(
            stats,
            UnpackStats {
                bytes: 30,
                entries: 13
            }
        );

        assert_eq!(mode(dest), 0o750);
        let su = dest.join("usr/bin/su");
        assert_eq!(fs::read(&su).expect("read"), b"setuid binary");
        assert_eq!(mode(&su), 0o4755);
        assert_eq!(meta(&su).mtime(), MTIME as i64);
        let tool = meta(&dest.join("usr/bin/tool"));
        assert_eq!(
            (tool.mode() & 0o7777, tool.uid(), tool.gid()),
            (0o2711, 1234, 5678)
        );
        assert_eq!(mode(&dest.join("tmp")), 0o1777);

        assert_eq!(
            fs::read(dest.join("etc/missing/parent/file")).expect("read"),
            b"deep"
        );
        for implicit in ["etc", "etc/missing", "etc/missing/parent"] {
            let meta = meta(&dest.join(implicit));
            assert!(meta.is_dir(), "{implicit}");
            assert_eq!(
                (meta.mode() & 0o7777, meta.uid(), meta.gid()),
                (0o755, 0, 0),
                "{implicit}"
            );
        }

        let bin = meta(&dest.join("bin"));
        assert!(bin.file_type().is_symlink());
        assert_eq!((bin.uid(), bin.gid(), bin.mtime()), (42, 43, 1_500_000_000));
        assert_eq!(
            fs::read_link(dest.join("bin")).expect("link"),
            Path::new("usr/bin")
        );
        assert_eq!(
            fs::read_link(dest.join("fd")).expect("link"),
            Path::new("/proc/self/fd")
        );
        assert_eq!(
            fs::read_link(dest.join("up")).expect("link"),
            Path::new("../../..")
        );

        let again = meta(&dest.join("usr/bin/su-again"));
        assert_eq!(again.ino(), meta(&su).ino());
        assert_eq!(again.nlink(), 2);
        // A hard link to a symlink links the symlink itself.
        let bin_again = meta(&dest.join("bin-again"));
        assert!(bin_again.file_type().is_symlink());
        assert_eq!(bin_again.ino(), bin.ino());

        assert_eq!(meta(&dest.join("empty")).len(), 0);
    }

    #[test]
    fn unpacks_devices_and_fifos() {
        if skip_unless_root() {
            return;
        }
        let tmp = tempdir();
        let dest = tmp.path();
        let tar = Layer::new()
            .device(EntryType::Char, "dev/null", 0o666, 1, 3)
            .device(EntryType::Block, "dev/loop7", 0o660, 7, 7)
            .device(EntryType::Char, "dev/big", 0o600, 4095, 1 << 19)
            .entry(EntryType::Fifo, "run/fifo", 0o620, None, b"", |h| {
                h.set_uid(7);
                h.set_gid(8);
            })
            .tar();
        unpack(&tar, dest).expect("unpack");

        let check = |path: &str, char_device: bool, mode: u32, major: u64, minor: u64| {
            let meta = meta(&dest.join(path));
            let file_type = meta.file_type();
            assert!(
                if char_device {
                    file_type.is_char_device()
                } else {
                    file_type.is_block_device()
                },
                "{path}"
            );
            assert_eq!(meta.mode() & 0o7777, mode, "{path}");
            let rdev = meta.rdev();
            assert_eq!(
                (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev)),
                (major, minor),
                "{path}"
            );
        };
        check("dev/null", true, 0o666, 1, 3);
        check("dev/loop7", false, 0o660, 7, 7);
        check("dev/big", true, 0o600, 4095, 1 << 19);
        let fifo = meta(&dest.join("run/fifo"));
        assert!(fifo.file_type().is_fifo());
        assert_eq!(
            (fifo.mode() & 0o7777, fifo.uid(), fifo.gid()),
            (0o620, 7, 8)
        );
        assert_eq!(fifo.mtime(), MTIME as i64);
    }

    #[test]
    fn sets_pax_xattrs_after_chown() {
        if skip_unless_root() {
            return;
        }
        let tmp = tempdir();
        let dest = tmp.path();
        // VFS_CAP_REVISION_2 | effective, permitted = CAP_NET_RAW (13).
        let mut capability = Vec::new();
        for word in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
            capability.extend_from_slice(&word.to_le_bytes());
        }
        let tar = Layer::new()
            .pax(&[
                ("SCHILY.xattr.security.capability", &capability),
                ("SCHILY.xattr.user.note", b"hello"),
            ])
            .owned_file("bin/ping", 0o755, 1000, 1000, b"ping")
            .pax(&[
                ("SCHILY.xattr.user.dir", b"d"),
                ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
            ])
            .dir("etc/", 0o755)
            .pax(&[("SCHILY.xattr.trusted.note", b"t")])
            .symlink("link", "bin/ping")
            .tar();
        unpack(&tar, dest).expect("unpack");

        let ping = dest.join("bin/ping");
        assert_eq!(meta(&ping).uid(), 1000);
        assert_eq!(lgetxattr(&ping, c"security.capability"), Some(capability));
        assert_eq!(
            lgetxattr(&ping, c"user.note").as_deref(),
            Some(&b"hello"[..])
        );
        let etc = dest.join("etc");
        assert_eq!(lgetxattr(&etc, c"user.dir").as_deref(), Some(&b"d"[..]));
        // Only whiteout conversion may steer overlayfs.
        assert_eq!(lgetxattr(&etc, OPAQUE_XATTR), None);
        assert_eq!(
            lgetxattr(&dest.join("link"), c"trusted.note").as_deref(),
            Some(&b"t"[..])
        );
    }

    #[test]
    fn converts_whiteouts_for_overlayfs() {
        if skip_unless_root() {
            return;
        }
        let tmp = tempdir();
        let dest = tmp.path();
        let tar = Layer::new()
            .dir("a/", 0o755)
            .file("a/keep", 0o644, b"k")
            .file(".wh.gone", 0o644, b"")
            .file("a/.wh.old", 0o644, b"")
            .file("b/.wh..wh..opq", 0o644, b"")
            .file("b/new", 0o644, b"n")
            .file("c/.wh..wh.plnk", 0o644, b"")
            .dir("d/", 0o755)
            .file("d/x", 0o644, b"x")
            .file(".wh.d", 0o644, b"")
            .file(".wh.e", 0o644, b"")
            .dir("e/", 0o755)
            .file("f/.wh.g", 0o644, b"")
            .file(".wh.h", 0o644, b"")
            .file("h/i", 0o644, b"i")
            .file("j", 0o644, b"j")
            .file(".wh.j", 0o644, b"")
            .tar();
        let stats = unpack(&tar, dest).expect("unpack");
        assert_eq!(stats.entries, 17);
        // No "./" entry: the root is 0755 whatever the caller created (tempdir makes 0700).
        assert_eq!(mode(dest), 0o755);

        for whiteout in ["gone", "a/old", "f/g"] {
            assert!(is_whiteout_at(&dest.join(whiteout)), "{whiteout}");
            assert_eq!(mode(&dest.join(whiteout)), 0, "{whiteout}");
        }
        let opaque = |path: &str| lgetxattr(&dest.join(path), OPAQUE_XATTR);
        assert_eq!(opaque("b").as_deref(), Some(&b"y"[..]));
        assert_eq!(opaque("a"), None);
        assert_eq!(fs::read(dest.join("b/new")).expect("read"), b"n");
        assert!(!dest.join("b/.wh..wh..opq").exists());
        assert!(!dest.join("c/.wh..wh.plnk").exists());
        // Same-layer content stays; a whiteout for it hides the lower layers' contents.
        assert_eq!(fs::read(dest.join("d/x")).expect("read"), b"x");
        assert_eq!(opaque("d").as_deref(), Some(&b"y"[..]));
        assert!(meta(&dest.join("e")).is_dir());
        assert_eq!(opaque("e").as_deref(), Some(&b"y"[..]));
        assert_eq!(fs::read(dest.join("h/i")).expect("read"), b"i");
        assert_eq!(opaque("h").as_deref(), Some(&b"y"[..]));
        assert_eq!(fs::read(dest.join("j")).expect("read"), b"j");
        assert!(!dest.join(".wh.gone").exists());
    }

    #[derive(Debug, PartialEq)]
    enum Node {
        File(Vec<u8>),
        Dir,
        Symlink(PathBuf),
        Missing,
    }

    fn file(content: &[u8]) -> Node {
        Node::File(content.to_vec())
    }

    fn node(path: &Path) -> Node {
        let Ok(meta) = fs::symlink_metadata(path) else {
            return Node::Missing;
        };
        if meta.is_dir() {
            Node::Dir
        } else if meta.file_type().is_symlink() {
            Node::Symlink(fs::read_link(path).expect("link"))
        } else {
            Node::File(fs::read(path).expect("read"))
        }
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        if skip_unless_root() {
            return;
        }
        fn check(layer: Layer, expected: &[(&str, Node)]) {
            let tmp = tempdir();
            unpack(&layer.tar(), tmp.path()).expect("unpack");
            for (path, node_expected) in expected {
                assert_eq!(&node(&tmp.path().join(path)), node_expected, "{path}");
            }
        }
        check(
            Layer::new().file("x", 0o644, b"1").file("x", 0o644, b"2"),
            &[("x", file(b"2"))],
        );
        check(
            Layer::new()
                .file("x", 0o644, b"1")
                .dir("x/", 0o755)
                .file("x/y", 0o644, b"y"),
            &[("x", Node::Dir), ("x/y", file(b"y"))],
        );
        check(
            Layer::new()
                .dir("x/", 0o500)
                .dir("x/sub/", 0o500)
                .file("x/sub/y", 0o644, b"y")
                .file("x", 0o644, b"f"),
            &[("x", file(b"f"))],
        );
        check(
            Layer::new()
                .dir("x/", 0o755)
                .file("x/y", 0o644, b"y")
                .dir("x/", 0o700)
                .file("x/z", 0o644, b"z"),
            &[("x/y", file(b"y")), ("x/z", file(b"z"))],
        );
        check(
            Layer::new().symlink("x", "target").file("x", 0o644, b"f"),
            &[("x", file(b"f")), ("target", Node::Missing)],
        );
        check(
            Layer::new().file("x", 0o644, b"f").symlink("x", "t"),
            &[("x", Node::Symlink("t".into()))],
        );
        check(
            Layer::new()
                .dir("t/", 0o755)
                .symlink("x", "t")
                .dir("x/", 0o700),
            &[("x", Node::Dir), ("t", Node::Dir)],
        );
        check(
            Layer::new().file("x", 0o644, b"f").hardlink("x", "x"),
            &[("x", file(b"f"))],
        );
        check(
            Layer::new()
                .file("a", 0o644, b"a")
                .file("b", 0o644, b"b")
                .hardlink("b", "a"),
            &[("a", file(b"a")), ("b", file(b"a"))],
        );

        // The mode of a directory given twice is the last one.
        let tmp = tempdir();
        let tar = Layer::new()
            .dir("x/", 0o755)
            .file("x/y", 0o644, b"y")
            .dir("x/", 0o700)
            .tar();
        unpack(&tar, tmp.path()).expect("unpack");
        assert_eq!(mode(&tmp.path().join("x")), 0o700);
    }

    #[test]
    fn applies_directory_metadata_last() {
        if skip_unless_root() {
            return;
        }
        let tmp = tempdir();
        let dest = tmp.path();
        let tar = Layer::new()
            .entry(EntryType::Directory, "ro/", 0o555, None, b"", |h| {
                h.set_mtime(1_000_000_000)
            })
            .entry(EntryType::Directory, "ro/sub/", 0o500, None, b"", |h| {
                h.set_mtime(1_100_000_000);
                h.set_uid(99);
            })
            .file("ro/sub/file", 0o444, b"data")
            .file("ro/other", 0o644, b"data")
            .tar();
        unpack(&tar, dest).expect("unpack");
        let ro = meta(&dest.join("ro"));
        assert_eq!((ro.mode() & 0o7777, ro.mtime()), (0o555, 1_000_000_000));
        let sub = meta(&dest.join("ro/sub"));
        assert_eq!(
            (sub.mode() & 0o7777, sub.mtime(), sub.uid()),
            (0o500, 1_100_000_000, 99)
        );
        assert_eq!(fs::read(dest.join("ro/sub/file")).expect("read"), b"data");
    }

    #[test]
    fn handles_long_names_and_pax_paths() {
        if skip_unless_root() {
            return;
        }
        let tmp = tempdir();
        let dest = tmp.path();
        let long_dir = format!("long/{}", "d".repeat(120));
        let long_file = format!("{long_dir}/{}", "f".repeat(150));
        let long_target = format!("/{}", "t".repeat(200));
        let tar = Layer::new()
            .file(&long_file, 0o644, b"long")
            .symlink("long-link", &long_target)
            .hardlink("hard-to-long", &long_file)
            .pax(&[("path", b"pax/from/header"), ("mtime", b"1600000000.25")])
            .file("short-name", 0o644, b"pax")
            .pax(&[("linkpath", b"pax/from/header")])
            .raw(EntryType::Link, b"pax-link", b"ignored", b"")
            .tar();
        unpack(&tar, dest).expect("unpack");
        assert_eq!(fs::read(dest.join(&long_file)).expect("read"), b"long");
        assert_eq!(
            fs::read_link(dest.join("long-link")).expect("link"),
            Path::new(&long_target)
        );
        assert_eq!(
            meta(&dest.join("hard-to-long")).ino(),
            meta(&dest.join(&long_file)).ino()
        );
        let pax = meta(&dest.join("pax/from/header"));
        assert_eq!(
            (pax.mtime(), pax.mtime_nsec()),
            (1_600_000_000, 250_000_000)
        );
        assert!(!dest.join("short-name").exists());
        assert_eq!(meta(&dest.join("pax-link")).ino(), pax.ino());
    }

    #[test]
    fn verifies_digests() {
        if skip_unless_root() {
            return;
        }
        let content: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let tar = Layer::new().file("data", 0o644, &content).tar();
        let blob = gzip(&tar);
        let digest = Digest::of_bytes(&blob);
        let diff_id = Digest::of_bytes(&tar);
        let run = |blob: &[u8], media_type: &str, digest: &Digest, diff_id: Option<&Digest>| {
            let tmp = tempdir();
            let layer = LayerInput {
                media_type,
                digest,
                diff_id,
            };
            unpack_layer(blob, tmp.path(), &layer)
        };

        run(&blob, GZIP, &digest, Some(&diff_id)).expect("intact gzip layer");
        run(&tar, TAR, &diff_id, Some(&diff_id)).expect("intact tar layer");

        // A corrupted gzip blob: the digest mismatch is reported, not the inflate error.
        let mut corrupted = blob.clone();
        let middle = corrupted.len() / 2;
        corrupted[middle] ^= 0x55;
        match run(&corrupted, GZIP, &digest, Some(&diff_id)) {
            Err(UnpackError::DigestMismatch { expected, actual }) => {
                assert_eq!(expected, digest);
                assert_eq!(actual, Digest::of_bytes(&corrupted));
            }
            other => panic!("expected a digest mismatch, got {other:?}"),
        }

        // A corrupted plain tar unpacks but fails verification.
        let mut corrupted = tar.clone();
        corrupted[512 + 1000] ^= 0x55;
        let err = run(&corrupted, TAR, &diff_id, None).expect_err("corrupted tar");
        assert!(
            matches!(&err, UnpackError::DigestMismatch { expected, .. } if *expected == diff_id),
            "{err:?}"
        );

        let wrong = Digest::of_bytes(b"something else");
        match run(&blob, GZIP, &digest, Some(&wrong)) {
            Err(UnpackError::DigestMismatch { expected, actual }) => {
                assert_eq!((expected, actual), (wrong.clone(), diff_id.clone()));
            }
            other => panic!("expected a diff ID mismatch, got {other:?}"),
        }
        let err = run(&blob, GZIP, &wrong, None).expect_err("wrong digest");
        assert_eq!(
            err.to_string(),
            format!("layer digest mismatch: expected {wrong}, got {digest}")
        );
    }

    /// Counts what was read, to prove the whole blob is consumed.
    struct Counting<'a> {
        inner: &'a [u8],
        read: usize,
        fail_after: Option<usize>,
    }

    impl Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.fail_after.is_some_and(|limit| self.read >= limit) {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "connection reset",
                ));
            }
            let n = self.inner.read(buf)?;
            self.read += n;
            Ok(n)
        }
    }

    #[test]
    fn reads_the_whole_blob() {
        if skip_unless_root() {
            return;
        }
        // Padding after the end-of-archive blocks is part of both digests.
        let mut tar = Layer::new().file("a", 0o644, b"a").tar();
        tar.extend_from_slice(&[0; 8192]);
        for (media_type, blob) in [(TAR, tar.clone()), (GZIP, gzip(&tar))] {
            let tmp = tempdir();
            let digest = Digest::of_bytes(&blob);
            let diff_id = Digest::of_bytes(&tar);
            let layer = LayerInput {
                media_type,
                digest: &digest,
                diff_id: Some(&diff_id),
            };
            let mut reader = Counting {
                inner: &blob,
                read: 0,
                fail_after: None,
            };
            unpack_layer(&mut reader, tmp.path(), &layer).expect(media_type);
            assert_eq!(reader.read, blob.len(), "{media_type}");
        }

        let tar = Layer::new().file("big", 0o644, &vec![7; 3 << 20]).tar();
        let blob = gzip(&tar);
        let digest = Digest::of_bytes(&blob);
        let layer = LayerInput {
            media_type: GZIP,
            digest: &digest,
            diff_id: None,
        };
        let tmp = tempdir();
        let reader = Counting {
            inner: &blob,
            read: 0,
            fail_after: Some(blob.len() / 2),
        };
        let err = unpack_layer(reader, tmp.path(), &layer).expect_err("failing reader");
        assert!(matches!(err, UnpackError::ReadBlob { .. }), "{err:?}");
        assert_eq!(
            error_chain(&err),
            "cannot read layer blob: connection reset"
        );
    }

    #[test]
    fn refuses_hard_link_to_missing_target() {
        if skip_unless_root() {
            return;
        }
        let tmp = tempdir();
        let tar = Layer::new()
            .hardlink("h", "not/there")
            .file("late", 0o644, b"")
            .tar();
        let err = unpack(&tar, tmp.path()).expect_err("missing target");
        assert_eq!(
            err.to_string(),
            "hard link \"h\" points to \"not/there\", which is not earlier in the layer"
        );
    }

    #[test]
    fn refuses_non_directory_root() {
        if skip_unless_root() {
            return;
        }
        let tmp = tempdir();
        let tar = Layer::new().raw(EntryType::Regular, b".", b"", b"").tar();
        let err = unpack(&tar, tmp.path()).expect_err("file as root");
        assert_eq!(
            err.to_string(),
            "layer entry \".\" is invalid: the layer root must be a directory"
        );
    }

    /// Everything under `root` except `dest`, to prove a layer changed nothing outside.
    fn snapshot(root: &Path) -> Vec<String> {
        fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
            let mut names: Vec<_> = fs::read_dir(dir)
                .expect("read_dir")
                .map(|e| e.expect("entry").path())
                .collect();
            names.sort();
            for path in names {
                let rel = path
                    .strip_prefix(root)
                    .expect("prefix")
                    .display()
                    .to_string();
                if rel == "dest" {
                    continue;
                }
                let meta = meta(&path);
                let extra = if meta.is_dir() {
                    String::new()
                } else if meta.file_type().is_symlink() {
                    fs::read_link(&path).expect("link").display().to_string()
                } else if meta.is_file() {
                    String::from_utf8_lossy(&fs::read(&path).expect("read")).into_owned()
                } else {
                    format!("special {}", meta.rdev())
                };
                out.push(format!(
                    "{rel} mode={:o} owner={}:{} nlink={} mtime={}.{} opaque={:?} {extra}",
                    meta.mode(),
                    meta.uid(),
                    meta.gid(),
                    meta.nlink(),
                    meta.mtime(),
                    meta.mtime_nsec(),
                    lgetxattr(&path, OPAQUE_XATTR),
                ));
                if meta.is_dir() {
                    walk(&path, root, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(root, root, &mut out);
        out
    }

    #[test]
    fn stays_inside_the_destination() {
        if skip_unless_root() {
            return;
        }
        /// `layer` gets the absolute path of a sentinel directory next to `dest`, holding
        /// `victim` (a file) and `sub/` (a directory).
        fn check(layer: impl FnOnce(&str) -> Layer, expected: Result<(), &str>) {
            let tmp = tempdir();
            let root = tmp.path();
            let dest = root.join("dest");
            let sentinel = root.join("sentinel");
            fs::create_dir(&dest).expect("dest");
            fs::create_dir_all(sentinel.join("sub")).expect("sentinel");
            fs::write(sentinel.join("victim"), b"original").expect("victim");
            let before = snapshot(root);

            let tar = layer(sentinel.to_str().expect("utf-8")).tar();
            let result = unpack(&tar, &dest).map(drop).map_err(|e| e.to_string());
            match expected {
                Ok(()) => assert_eq!(result, Ok(())),
                Err(message) => {
                    let err = result.expect_err(message);
                    assert!(
                        err.contains(message),
                        "{err:?} does not contain {message:?}"
                    );
                }
            }
            assert_eq!(snapshot(root), before, "something outside dest changed");
        }
        let escape = |entry: &str| format!("layer entry \"{entry}\" leads outside the rootfs");

        check(
            |_| Layer::new().raw(EntryType::Regular, b"/etc/x", b"", b"x"),
            Err("layer entry \"/etc/x\" has an absolute path"),
        );
        for name in ["../x", "./../x", "a/../../x", "../sentinel/victim"] {
            let expected = format!("layer entry \"{name}\" has a \"..\" path component");
            check(
                |_| Layer::new().raw(EntryType::Regular, name.as_bytes(), b"", b"x"),
                Err(&expected),
            );
        }
        for target in ["SENTINEL", "../sentinel", "../../../../../../../.."] {
            let link = |s: &str| target.replace("SENTINEL", s);
            check(
                |s| {
                    Layer::new()
                        .symlink("link", &link(s))
                        .file("link/pwned", 0o644, b"x")
                },
                Err(&escape("link/pwned")),
            );
            check(
                |s| {
                    Layer::new().symlink("link", &link(s)).file(
                        "link/new/deeper/pwned",
                        0o644,
                        b"x",
                    )
                },
                Err(&escape("link/new/deeper/pwned")),
            );
            check(
                |s| {
                    Layer::new()
                        .symlink("link", &link(s))
                        .file("link/victim", 0o644, b"x")
                },
                Err(&escape("link/victim")),
            );
            check(
                |s| {
                    Layer::new()
                        .symlink("link", &link(s))
                        .dir("link/sub/", 0o700)
                },
                Err(&escape("link/sub/")),
            );
            check(
                |s| {
                    Layer::new()
                        .symlink("link", &link(s))
                        .file("link/.wh.victim", 0o644, b"")
                },
                Err(&escape("link/.wh.victim")),
            );
            check(
                |s| {
                    Layer::new()
                        .symlink("link", &link(s))
                        .file("link/.wh..wh..opq", 0o644, b"")
                },
                Err(&escape("link/.wh..wh..opq")),
            );
            check(
                |s| {
                    Layer::new()
                        .symlink("link", &link(s))
                        .hardlink("h", "link/victim")
                },
                Err(&escape("h")),
            );
            check(
                |s| {
                    Layer::new()
                        .symlink("link", &link(s))
                        .symlink("link/evil", "x")
                },
                Err(&escape("link/evil")),
            );
            check(
                |s| {
                    Layer::new().symlink("link", &link(s)).device(
                        EntryType::Fifo,
                        "link/fifo",
                        0o644,
                        0,
                        0,
                    )
                },
                Err(&escape("link/fifo")),
            );
            check(
                |s| {
                    Layer::new()
                        .symlink("a", "b")
                        .symlink("b", &link(s))
                        .file("a/pwned", 0o644, b"x")
                },
                Err(&escape("a/pwned")),
            );
            // The final component is replaced, never followed.
            check(
                |s| {
                    Layer::new()
                        .symlink("f", &format!("{}/victim", link(s)))
                        .file("f", 0o644, b"x")
                },
                Ok(()),
            );
            check(
                |s| Layer::new().symlink("d", &link(s)).dir("d/", 0o700),
                Ok(()),
            );
            check(
                |s| {
                    Layer::new()
                        .symlink("s", &format!("{}/victim", link(s)))
                        .file(".wh.s", 0o644, b"")
                },
                Ok(()),
            );
            check(
                |s| {
                    Layer::new()
                        .symlink("s", &format!("{}/victim", link(s)))
                        .hardlink("h", "s")
                },
                Ok(()),
            );
            check(
                |s| {
                    Layer::new()
                        .symlink("s", &format!("{}/victim", link(s)))
                        .device(EntryType::Char, "s", 0o600, 1, 3)
                },
                Ok(()),
            );
        }
        check(
            |s| Layer::new().hardlink("h", &format!("{s}/victim")),
            Err("has target \"/"),
        );
        check(
            |_| Layer::new().hardlink("h", "../sentinel/victim"),
            Err("hard link \"h\" has target \"../sentinel/victim\" outside the layer"),
        );
        check(
            |_| Layer::new().raw(EntryType::Link, b"h", b"./../sentinel/victim", b""),
            Err("hard link \"h\" has target \"./../sentinel/victim\" outside the layer"),
        );
    }

    #[test]
    fn stacks_as_overlay_lower_layers() {
        if skip_unless_root() {
            return;
        }
        let tmp = tempdir();
        let (lower, upper, target) = (
            tmp.path().join("lower"),
            tmp.path().join("upper"),
            tmp.path().join("target"),
        );
        for dir in [&lower, &upper, &target] {
            fs::create_dir(dir).expect("mkdir");
        }
        let lower_tar = Layer::new()
            .dir("./", 0o755)
            .file("keep", 0o644, b"keep")
            .file("gone", 0o644, b"gone")
            .dir("dir/", 0o755)
            .file("dir/old", 0o644, b"old")
            .dir("opq/", 0o755)
            .file("opq/old", 0o644, b"old")
            .tar();
        let upper_tar = Layer::new()
            .dir("./", 0o755)
            .file(".wh.gone", 0o644, b"")
            .file("dir/.wh.old", 0o644, b"")
            .file("dir/new", 0o644, b"new")
            .file("opq/.wh..wh..opq", 0o644, b"")
            .file("opq/new", 0o644, b"new")
            .tar();
        unpack(&lower_tar, &lower).expect("lower");
        unpack(&upper_tar, &upper).expect("upper");

        let options = format!("lowerdir={}:{}", upper.display(), lower.display());
        nix::mount::mount(
            Some("overlay"),
            &target,
            Some("overlay"),
            nix::mount::MsFlags::MS_RDONLY,
            Some(options.as_str()),
        )
        .expect("mount overlay");
        let _guard = MountGuard(target.clone());

        let names = |dir: &Path| {
            let mut names: Vec<String> = fs::read_dir(dir)
                .expect("read_dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        assert_eq!(names(&target), ["dir", "keep", "opq"]);
        assert_eq!(names(&target.join("dir")), ["new"]);
        assert_eq!(names(&target.join("opq")), ["new"]);
        assert_eq!(fs::read(target.join("keep")).expect("read"), b"keep");
        assert!(!target.join("gone").exists());
        assert!(!target.join("opq/old").exists());
    }

    #[test]
    fn reports_a_full_disk() {
        if skip_unless_root() {
            return;
        }
        let tmp = tempdir();
        nix::mount::mount(
            Some("tmpfs"),
            tmp.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=256k"),
        )
        .expect("mount tmpfs");
        let _guard = MountGuard(tmp.path().to_owned());
        let tar = Layer::new().file("big", 0o644, &vec![1; 1 << 20]).tar();
        let err = unpack(&tar, tmp.path()).expect_err("disk full");
        let UnpackError::Write { source, .. } = &err else {
            panic!("expected a write error, got {err:?}");
        };
        assert_eq!(source.raw_os_error(), Some(libc::ENOSPC));
        assert!(
            error_chain(&err).starts_with("cannot write layer entry \"big\" under "),
            "{err}"
        );
        assert!(
            error_chain(&err).contains("No space left on device"),
            "{err}"
        );
    }

    #[test]
    fn syncs_a_directory() {
        let tmp = tempdir();
        sync_dir(tmp.path()).expect("syncfs");
        assert!(sync_dir(&tmp.path().join("missing")).is_err());
    }
}
