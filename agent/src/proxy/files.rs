//! Static assets served by the proxy itself, from files taken out of an app's image, for the
//! paths its manifest lists: the app need not run a static file server.
//!
//! - Content types come from a built-in extension table (text types with `charset=utf-8`),
//!   always with `X-Content-Type-Options: nosniff`.
//! - Validators: a strong `ETag` from inode, size and mtime (ns) and `Last-Modified`;
//!   `If-None-Match` (weak comparison) and `If-Modified-Since` (only when there is no
//!   `If-None-Match`) give 304. `Cache-Control: public, max-age=0, must-revalidate`: clients
//!   always revalidate, which costs one 304 thanks to the validators, and a new image is
//!   never hidden behind a stale cache.
//! - One `bytes=` range gives 206; several give the whole file (RFC 9110 allows ignoring
//!   Range); `If-Range` takes an ETag (a date there makes the whole file served).
//! - `file.br` / `file.gz` next to `file` are served when Accept-Encoding allows them, with
//!   their own ETag and `Vary: Accept-Encoding`. A request with a Range header always gets
//!   the identity file, so ranges never refer to compressed bytes. A variant whose original
//!   is missing is not served.
//! - A directory serves its `index.html`; asked for without the trailing slash it gets a 301
//!   to `dir/`, so relative links in the page resolve.
//! - Bodies stream from the file in 64 KiB chunks. A read error mid-body cannot be reported as
//!   a `hyper::Error`, so it is logged and ends the body early; as the response carries a
//!   Content-Length, hyper then aborts the connection and the client sees a truncated
//!   response, never a silently short one.
//!
//! Invariant: nothing outside `root` is ever opened. Paths are resolved component by
//! component the way `openat2(RESOLVE_IN_ROOT)` does (absolute symlink targets are taken
//! relative to `root`, `..` stops at `root`) and the result is opened with `O_NOFOLLOW`.
//! Checking first and opening after is sound because `root` is the app's read-only root
//! filesystem. (`nix::fcntl::openat2` itself returns a raw descriptor, which would need
//! `unsafe` to own.) Only regular files are opened (never FIFOs or devices).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use bytes::{Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

type Body = BoxBody<Bytes, hyper::Error>;

const CHUNK: usize = 64 * 1024;
/// As many symlinks as the kernel follows in one lookup.
const MAX_SYMLINKS: u32 = 40;
const CACHE_CONTROL: &str = "public, max-age=0, must-revalidate";
/// Precompressed variants in order of preference at equal q: (coding, file suffix).
const VARIANTS: [(&str, &str); 2] = [("br", ".br"), ("gzip", ".gz")];

/// Serves `path` (the request path, already known to lie under one of the app's static
/// prefixes; percent-encoded as it came) from the directory `root` (the app's read-only root
/// filesystem as the host sees it). Answers GET and HEAD; other methods get 405 with `Allow:
/// GET, HEAD`. Never reads outside `root`: `..` segments, percent-encoded slashes or dots that
/// would escape, NUL bytes, and symlinks leading outside `root` (resolve with openat2
/// RESOLVE_IN_ROOT, or canonicalize and check the prefix) are refused with 404/400. A
/// directory serves its `index.html` if present, else 404 (no listings).
pub async fn serve(
    root: &Path,
    path: &str,
    method: &Method,
    headers: &HeaderMap,
) -> Response<BoxBody<Bytes, hyper::Error>> {
    let head = match *method {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            let mut resp = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return resp;
        }
    };
    let Some(request) = decode(path) else {
        return plain(StatusCode::BAD_REQUEST, "bad request\n");
    };
    // Ranges are served from the identity file only.
    let codings = if headers.contains_key(header::RANGE) {
        Vec::new()
    } else {
        accepted_codings(headers)
    };
    let root_dir = root.to_path_buf();
    let found = tokio::task::spawn_blocking(move || lookup(&root_dir, request, &codings)).await;
    match found {
        Ok(Ok(Target::File(selected))) => respond(selected, head, headers).await,
        Ok(Ok(Target::Directory(location))) => {
            let mut resp = plain(StatusCode::MOVED_PERMANENTLY, "moved permanently\n");
            set(resp.headers_mut(), header::LOCATION, location);
            resp
        }
        Ok(Ok(Target::NotFound)) => plain(StatusCode::NOT_FOUND, "not found\n"),
        Ok(Err(e)) => match e.raw_os_error() {
            Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::ENAMETOOLONG) => {
                plain(StatusCode::NOT_FOUND, "not found\n")
            }
            Some(libc::EACCES | libc::EPERM) => plain(StatusCode::FORBIDDEN, "forbidden\n"),
            _ => {
                tracing::warn!(root = %root.display(), path, error = %e, "cannot open static file");
                plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n")
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "static file lookup failed");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n")
        }
    }
}

/// A request path split into decoded segments.
struct Request {
    segments: Vec<OsString>,
    /// The still-encoded segments, to build a redirect from.
    raw: Vec<String>,
    trailing_slash: bool,
}

/// Splits and percent-decodes `path`; `None` for bad escapes and for segments that decode to
/// `.`, `..`, or contain `/` or NUL.
fn decode(path: &str) -> Option<Request> {
    let path = path.split('?').next().unwrap_or_default();
    let mut request = Request {
        segments: Vec::new(),
        raw: Vec::new(),
        trailing_slash: path.ends_with('/'),
    };
    for raw in path.split('/').filter(|s| !s.is_empty()) {
        let mut bytes = Vec::with_capacity(raw.len());
        let mut rest = raw.as_bytes();
        while let Some((&b, tail)) = rest.split_first() {
            if b == b'%' {
                let hex = tail
                    .get(..2)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))?;
                bytes.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                rest = &tail[2..];
            } else {
                bytes.push(b);
                rest = tail;
            }
        }
        if bytes == b"." || bytes == b".." || bytes.contains(&b'/') || bytes.contains(&0) {
            return None;
        }
        request.segments.push(OsString::from_vec(bytes));
        request.raw.push(raw.to_string());
    }
    Some(request)
}

/// The precompressed codings Accept-Encoding allows, best first (br before gzip at equal q).
fn accepted_codings(headers: &HeaderMap) -> Vec<&'static str> {
    let mut q = [None::<f32>; 2];
    let mut star = None::<f32>;
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
            let weight = parts
                .filter_map(|p| p.trim().strip_prefix("q=").or(p.trim().strip_prefix("Q=")))
                .map(|w| w.trim().parse::<f32>().unwrap_or(0.0))
                .next()
                .unwrap_or(1.0);
            match coding.as_str() {
                "br" => q[0] = Some(weight),
                "gzip" | "x-gzip" => q[1] = Some(weight),
                "*" => star = Some(weight),
                _ => {}
            }
        }
    }
    let mut accepted: Vec<_> = VARIANTS
        .iter()
        .zip(q)
        .filter_map(|(&(coding, _), q)| q.or(star).filter(|&q| q > 0.0).map(|q| (coding, q)))
        .collect();
    accepted.sort_by(|a, b| b.1.total_cmp(&a.1)); // stable: br stays first on ties
    accepted.into_iter().map(|(v, _)| v).collect()
}

enum Target {
    File(Selected),
    /// A directory named without its trailing slash: redirect here so relative links work.
    Directory(String),
    NotFound,
}

struct Selected {
    file: File,
    meta: Metadata,
    content_type: &'static str,
    /// `Content-Encoding` of a precompressed variant, `None` for the file itself.
    encoding: Option<&'static str>,
    has_variants: bool,
}

/// Finds and opens what `request` names under `root` (blocking). Variants are looked for
/// next to the requested name (before symlinks are resolved), as nginx's `gzip_static` does.
fn lookup(root: &Path, request: Request, codings: &[&str]) -> io::Result<Target> {
    let mut requested = request.segments;
    if resolve_in_root(root, requested.clone())?.1.is_dir() {
        if !request.trailing_slash && !request.raw.is_empty() {
            return Ok(Target::Directory(format!("/{}/", request.raw.join("/"))));
        }
        requested.push("index.html".into());
    }
    let mut variants = Vec::new();
    for (coding, suffix) in VARIANTS {
        let mut name = requested.clone();
        if let Some(last) = name.last_mut() {
            last.push(suffix);
        }
        if let Ok((resolved, meta)) = resolve_in_root(root, name) {
            if meta.is_file() {
                variants.push((coding, resolved));
            }
        }
    }
    let chosen = codings
        .iter()
        .find_map(|c| variants.iter().find(|(v, _)| v == c).cloned());
    let content_type = content_type(Path::new(
        requested
            .last()
            .map(OsString::as_os_str)
            .unwrap_or_default(),
    ));
    let (encoding, resolved) = match chosen {
        Some((coding, resolved)) => (Some(coding), resolved),
        None => match resolve_in_root(root, requested)? {
            (resolved, meta) if meta.is_file() => (None, resolved),
            _ => return Ok(Target::NotFound), // never open FIFOs, sockets or devices
        },
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(join(root, &resolved))?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(Target::NotFound);
    }
    Ok(Target::File(Selected {
        file,
        meta,
        content_type,
        encoding,
        has_variants: !variants.is_empty(),
    }))
}

fn join(root: &Path, components: &[OsString]) -> PathBuf {
    let mut path = root.to_path_buf();
    path.extend(components);
    path
}

/// Resolves `segments` under `root` as `openat2(RESOLVE_IN_ROOT)` would: symlinks are
/// followed with `root` as `/` and `..` never climbs above it. Returns symlink-free
/// components and the metadata of what they name.
fn resolve_in_root(root: &Path, segments: Vec<OsString>) -> io::Result<(Vec<OsString>, Metadata)> {
    let mut pending: VecDeque<OsString> = segments.into();
    let mut resolved: Vec<OsString> = Vec::new();
    let mut symlinks = 0;
    while let Some(name) = pending.pop_front() {
        if name.as_bytes() == b".." {
            resolved.pop();
            continue;
        }
        if name.is_empty() || name.as_bytes() == b"." {
            continue;
        }
        resolved.push(name);
        let path = join(root, &resolved);
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.file_type().is_symlink() {
            symlinks += 1;
            if symlinks > MAX_SYMLINKS {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            let target = std::fs::read_link(&path)?;
            resolved.pop();
            if target.is_absolute() {
                resolved.clear();
            }
            for c in target.components().rev() {
                match c {
                    Component::Normal(n) => pending.push_front(n.to_os_string()),
                    Component::ParentDir => pending.push_front("..".into()),
                    Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
                }
            }
        } else if !meta.is_dir() && !pending.is_empty() {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
    }
    let meta = std::fs::metadata(join(root, &resolved))?;
    Ok((resolved, meta))
}

fn content_type(name: &Path) -> &'static str {
    let ext = name
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    match ext.as_deref().unwrap_or_default() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" | "map" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        "xml" => "text/xml; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "md" => "text/markdown; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "otf" => "font/otf",
        "wasm" => "application/wasm",
        "pdf" => "application/pdf",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "ogg" => "audio/ogg",
        "wav" => "audio/wav",
        _ => "application/octet-stream",
    }
}

async fn respond(selected: Selected, head: bool, req: &HeaderMap) -> Response<Body> {
    let Selected {
        file,
        meta,
        content_type,
        encoding,
        has_variants,
    } = selected;
    let len = meta.len();
    let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
    let suffix = match encoding {
        Some("br") => "-br",
        Some(_) => "-gz",
        None => "",
    };
    let etag = format!("\"{:x}-{len:x}-{mtime_ns:x}{suffix}\"", meta.ino());

    let mut h = HeaderMap::new();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(CACHE_CONTROL),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if has_variants {
        h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    set(&mut h, header::ETAG, etag.clone());
    if let Some(date) = http_date(meta.mtime()) {
        set(&mut h, header::LAST_MODIFIED, date);
    }
    if not_modified(req, &etag, meta.mtime()) {
        return response(StatusCode::NOT_MODIFIED, h, empty());
    }
    let (status, start, count) = match range(req, len, &etag) {
        Range::Whole => (StatusCode::OK, 0, len),
        Range::Partial(start, end) => {
            set(
                &mut h,
                header::CONTENT_RANGE,
                format!("bytes {start}-{end}/{len}"),
            );
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        Range::Unsatisfiable => {
            set(&mut h, header::CONTENT_RANGE, format!("bytes */{len}"));
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(0u64));
            return response(StatusCode::RANGE_NOT_SATISFIABLE, h, empty());
        }
    };
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(coding) = encoding {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(coding));
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    if head || count == 0 {
        return response(status, h, empty());
    }
    let mut file = tokio::fs::File::from_std(file);
    if start > 0 {
        if let Err(e) = file.seek(io::SeekFrom::Start(start)).await {
            tracing::warn!(error = %e, "cannot seek in static file");
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n");
        }
    }
    response(status, h, stream(file, count))
}

fn response(status: StatusCode, headers: HeaderMap, body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// `If-None-Match` (weak comparison), else `If-Modified-Since`.
fn not_modified(req: &HeaderMap, etag: &str, mtime: i64) -> bool {
    let mut inm = req.get_all(header::IF_NONE_MATCH).iter().peekable();
    if inm.peek().is_some() {
        return inm
            .filter_map(|v| v.to_str().ok())
            .any(|list| list.trim() == "*" || etags(list).any(|tag| tag == etag));
    }
    req.get(header::IF_MODIFIED_SINCE)
        .and_then(|v| parse_http_date(v.to_str().ok()?))
        .is_some_and(|since| mtime <= since)
}

/// The entity tags in a list without their weakness indicator `W/` (so compared weakly);
/// stops at the first malformed one.
fn etags(list: &str) -> impl Iterator<Item = &str> {
    let mut rest = list;
    std::iter::from_fn(move || {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        let tail = rest.strip_prefix("W/").unwrap_or(rest);
        let end = tail.strip_prefix('"')?.find('"')? + 2;
        let tag = &tail[..end];
        rest = &tail[end..];
        Some(tag)
    })
}

enum Range {
    Whole,
    /// First and last byte, inclusive.
    Partial(u64, u64),
    Unsatisfiable,
}

/// Evaluates a single `bytes=` range; anything else (several ranges, another unit, bad
/// syntax, an `If-Range` that does not match strongly) means the whole file.
fn range(req: &HeaderMap, len: u64, etag: &str) -> Range {
    let Some(spec) = req.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Range::Whole;
    };
    if let Some(if_range) = req.get(header::IF_RANGE) {
        let strong_match = if_range
            .to_str()
            .is_ok_and(|v| !v.trim().starts_with("W/") && v.trim() == etag);
        if !strong_match {
            return Range::Whole;
        }
    }
    let Some((unit, set)) = spec.split_once('=') else {
        return Range::Whole;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return Range::Whole;
    }
    let mut specs = set.split(',').map(str::trim).filter(|s| !s.is_empty());
    let (Some(one), None) = (specs.next(), specs.next()) else {
        return Range::Whole;
    };
    let Some((first, last)) = one.split_once('-') else {
        return Range::Whole;
    };
    let number = |s: &str| -> Option<u64> {
        let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        digits.then(|| s.parse().ok()).flatten()
    };
    let (first, last) = (first.trim(), last.trim());
    let (start, end) = if first.is_empty() {
        // -n: the last n bytes.
        let Some(n) = number(last) else {
            return Range::Whole;
        };
        if n == 0 || len == 0 {
            return Range::Unsatisfiable;
        }
        (len.saturating_sub(n), len - 1)
    } else {
        // a- and a-b.
        let Some(a) = number(first) else {
            return Range::Whole;
        };
        let b = match number(last) {
            None if last.is_empty() => u64::MAX,
            Some(b) if b >= a => b,
            _ => return Range::Whole,
        };
        if a >= len {
            return Range::Unsatisfiable;
        }
        (a, b.min(len - 1))
    };
    Range::Partial(start, end)
}

const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
fn http_date(unix: i64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(unix).ok()?;
    Some(format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
        DAYS[usize::from(t.weekday().number_days_from_monday())],
        t.day(),
        MONTHS[usize::from(u8::from(t.month()) - 1)],
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    ))
}

/// Parses IMF-fixdate only; the obsolete formats make a condition that is ignored (the
/// response is then a full 200, which is always correct).
fn parse_http_date(s: &str) -> Option<i64> {
    let mut f = s.trim().split([' ', ':']);
    let (_weekday, day, month, year) = (f.next()?, f.next()?, f.next()?, f.next()?);
    let (hour, minute, second, zone) = (f.next()?, f.next()?, f.next()?, f.next()?);
    if zone != "GMT" || f.next().is_some() {
        return None;
    }
    let month = MONTHS.iter().position(|m| *m == month)?;
    let month = time::Month::try_from(u8::try_from(month + 1).ok()?).ok()?;
    let date = time::Date::from_calendar_date(year.parse().ok()?, month, day.parse().ok()?).ok()?;
    let time = time::Time::from_hms(
        hour.parse().ok()?,
        minute.parse().ok()?,
        second.parse().ok()?,
    )
    .ok()?;
    Some(
        time::PrimitiveDateTime::new(date, time)
            .assume_utc()
            .unix_timestamp(),
    )
}

/// `count` bytes from the file's current position, read 64 KiB at a time.
fn stream(file: tokio::fs::File, count: u64) -> Body {
    let chunks = futures_util::stream::unfold(file.take(count), |mut reader| async move {
        let mut buf = BytesMut::with_capacity(CHUNK);
        match reader.read_buf(&mut buf).await {
            Ok(0) => {
                if reader.limit() > 0 {
                    tracing::warn!(missing = reader.limit(), "static file shrank while served");
                }
                None
            }
            Ok(_) => Some((Ok(Frame::data(buf.freeze())), reader)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read static file; ending the body early");
                None
            }
        }
    });
    BoxBody::new(StreamBody::new(chunks))
}

fn set(headers: &mut HeaderMap, name: HeaderName, value: String) {
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert(name, value);
    }
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let body = Full::new(Bytes::from_static(text.as_bytes()));
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response(
        status,
        headers,
        body.map_err(|never| match never {}).boxed(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Reply {
        status: StatusCode,
        headers: HeaderMap,
        body: Vec<u8>,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.get(name).map(|v| v.to_str().unwrap())
        }
    }

    async fn request(root: &Path, method: Method, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let (parts, body) = serve(root, path, &method, &map).await.into_parts();
        let body = body.collect().await.unwrap().to_bytes().to_vec();
        let (status, headers) = (parts.status, parts.headers);
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn get(root: &Path, path: &str, headers: &[(&str, &str)]) -> Reply {
        request(root, Method::GET, path, headers).await
    }

    fn site() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("docs/empty")).unwrap();
        for (name, content) in [
            ("index.html", "<h1>home</h1>"),
            ("docs/index.html", "<h1>docs</h1>"),
            ("digits.txt", "0123456789"),
            ("app.js", "plain"),
            ("app.js.br", "brotli"),
            ("app.js.gz", "gzipped"),
            ("style.css", "body{}"),
            ("style.css.gz", "gz-css"),
        ] {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        dir
    }

    #[tokio::test]
    async fn content_types_from_extension() {
        let dir = tempfile::tempdir().unwrap();
        for (name, expected) in [
            ("a.html", "text/html; charset=utf-8"),
            ("a.CSS", "text/css; charset=utf-8"),
            ("a.mjs", "text/javascript; charset=utf-8"),
            ("a.json", "application/json"),
            ("a.svg", "image/svg+xml"),
            ("a.woff2", "font/woff2"),
            ("a.wasm", "application/wasm"),
            ("a.md", "text/markdown; charset=utf-8"),
            ("a.tar", "application/octet-stream"),
            ("noext", "application/octet-stream"),
        ] {
            std::fs::write(dir.path().join(name), "x").unwrap();
            let r = get(dir.path(), &format!("/{name}"), &[]).await;
            assert_eq!(r.status, StatusCode::OK, "{name}");
            assert_eq!(r.header("content-type"), Some(expected), "{name}");
            assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
            assert_eq!(r.header("cache-control"), Some(CACHE_CONTROL));
            assert_eq!(r.header("accept-ranges"), Some("bytes"));
            assert_eq!(r.header("vary"), None);
        }
    }

    #[tokio::test]
    async fn etag_and_if_none_match() {
        let dir = site();
        let r = get(dir.path(), "/digits.txt", &[]).await;
        assert_eq!(
            (r.status, r.body.as_slice()),
            (StatusCode::OK, &b"0123456789"[..])
        );
        assert_eq!(r.header("content-length"), Some("10"));
        let etag = r.header("etag").unwrap().to_string();
        assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");

        let (weak, listed) = (format!("W/{etag}"), format!("\"other\", {etag}"));
        for inm in [etag.as_str(), &weak, &listed, "*"] {
            let r = get(dir.path(), "/digits.txt", &[("if-none-match", inm)]).await;
            assert_eq!(r.status, StatusCode::NOT_MODIFIED, "{inm}");
            assert_eq!(r.header("etag"), Some(etag.as_str()));
            assert_eq!((r.body.len(), r.header("content-length")), (0, None));
        }
        let r = get(dir.path(), "/digits.txt", &[("if-none-match", "\"other\"")]).await;
        assert_eq!(r.status, StatusCode::OK);

        // A change to the file changes the ETag.
        std::fs::write(dir.path().join("digits.txt"), "01234567890").unwrap();
        let r = get(dir.path(), "/digits.txt", &[("if-none-match", &etag)]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_ne!(r.header("etag"), Some(etag.as_str()));
    }

    #[tokio::test]
    async fn if_modified_since() {
        let dir = site();
        let r = get(dir.path(), "/digits.txt", &[]).await;
        let last_modified = r.header("last-modified").unwrap().to_string();
        for (since, status) in [
            (last_modified.as_str(), StatusCode::NOT_MODIFIED),
            ("Thu, 01 Jan 1970 00:00:00 GMT", StatusCode::OK),
            ("yesterday", StatusCode::OK),
        ] {
            let r = get(dir.path(), "/digits.txt", &[("if-modified-since", since)]).await;
            assert_eq!(r.status, status, "{since}");
        }
        // If-None-Match wins.
        let both = [
            ("if-none-match", "\"other\""),
            ("if-modified-since", &last_modified),
        ];
        assert_eq!(
            get(dir.path(), "/digits.txt", &both).await.status,
            StatusCode::OK
        );

        assert_eq!(
            http_date(784_111_777).unwrap(),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
    }

    #[tokio::test]
    async fn ranges() {
        let dir = site();
        let (partial, bad) = (
            StatusCode::PARTIAL_CONTENT,
            StatusCode::RANGE_NOT_SATISFIABLE,
        );
        let all = &b"0123456789"[..];
        for (range, status, content_range, body) in [
            ("bytes=2-4", partial, Some("bytes 2-4/10"), &b"234"[..]),
            ("bytes=7-", partial, Some("bytes 7-9/10"), b"789"),
            ("bytes=-3", partial, Some("bytes 7-9/10"), b"789"),
            ("bytes=-30", partial, Some("bytes 0-9/10"), all),
            ("bytes=8-100", partial, Some("bytes 8-9/10"), b"89"),
            ("bytes=10-", bad, Some("bytes */10"), b""),
            ("bytes=20-30", bad, Some("bytes */10"), b""),
            ("bytes=-0", bad, Some("bytes */10"), b""),
            // Several ranges, bad syntax, other units: the whole file.
            ("bytes=0-1, 4-5", StatusCode::OK, None, all),
            ("bytes=5-2", StatusCode::OK, None, all),
            ("bytes=a-b", StatusCode::OK, None, all),
            ("items=0-1", StatusCode::OK, None, all),
        ] {
            let r = get(dir.path(), "/digits.txt", &[("range", range)]).await;
            assert_eq!(r.status, status, "{range}");
            assert_eq!(r.header("content-range"), content_range, "{range}");
            assert_eq!(r.body, body, "{range}");
            let len = body.len().to_string();
            assert_eq!(r.header("content-length"), Some(len.as_str()), "{range}");
        }

        let etag = get(dir.path(), "/digits.txt", &[])
            .await
            .header("etag")
            .unwrap()
            .to_string();
        let weak = format!("W/{etag}");
        for (if_range, status) in [
            (etag.as_str(), partial),
            ("\"old\"", StatusCode::OK),
            (&weak, StatusCode::OK),
        ] {
            let headers = [("range", "bytes=0-0"), ("if-range", if_range)];
            assert_eq!(
                get(dir.path(), "/digits.txt", &headers).await.status,
                status,
                "{if_range}"
            );
        }
    }

    #[tokio::test]
    async fn precompressed_variants() {
        let dir = site();
        let mut etags = Vec::new();
        for (path, accept, encoding, body) in [
            ("/app.js", "", None, "plain"),
            ("/app.js", "gzip, deflate, br", Some("br"), "brotli"),
            ("/app.js", "gzip", Some("gzip"), "gzipped"),
            ("/app.js", "br;q=0, gzip", Some("gzip"), "gzipped"),
            ("/app.js", "br;q=0.5, gzip;q=0.8", Some("gzip"), "gzipped"),
            ("/app.js", "*", Some("br"), "brotli"),
            ("/app.js", "*;q=0", None, "plain"),
            ("/app.js", "br;q=0, gzip;q=0", None, "plain"),
            ("/app.js", "deflate", None, "plain"),
            ("/style.css", "br, gzip", Some("gzip"), "gz-css"),
            ("/style.css", "br", None, "body{}"),
        ] {
            let r = get(dir.path(), path, &[("accept-encoding", accept)]).await;
            assert_eq!(r.status, StatusCode::OK, "{accept}");
            assert_eq!(r.header("content-encoding"), encoding, "{accept}");
            assert_eq!(String::from_utf8_lossy(&r.body), body, "{accept}");
            let len = body.len().to_string();
            assert_eq!(r.header("content-length"), Some(len.as_str()));
            assert_eq!(r.header("vary"), Some("accept-encoding"));
            assert_eq!(
                r.header("content-type"),
                Some(content_type(Path::new(path)))
            );
            etags.push(r.header("etag").unwrap().to_string());
        }
        // Each representation has its own ETag, which revalidates it.
        assert!(etags[0] != etags[1] && etags[1] != etags[2] && etags[2] != etags[0]);
        let r = get(
            dir.path(),
            "/app.js",
            &[("accept-encoding", "br"), ("if-none-match", &etags[1])],
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_MODIFIED);
        assert_eq!(r.header("vary"), Some("accept-encoding"));
        // Ranges come from the identity file.
        let r = get(
            dir.path(),
            "/app.js",
            &[("accept-encoding", "br"), ("range", "bytes=0-1")],
        )
        .await;
        assert_eq!(
            (r.status, r.header("content-encoding")),
            (StatusCode::PARTIAL_CONTENT, None)
        );
        assert_eq!(r.body, b"pl");
    }

    #[tokio::test]
    async fn head_and_other_methods() {
        let dir = site();
        for (range, status, len) in [
            ("", StatusCode::OK, "10"),
            ("bytes=1-2", StatusCode::PARTIAL_CONTENT, "2"),
        ] {
            let r = request(dir.path(), Method::HEAD, "/digits.txt", &[("range", range)]).await;
            assert_eq!((r.status, r.header("content-length")), (status, Some(len)));
            assert!(r.header("etag").is_some() && r.body.is_empty());
        }
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS] {
            let r = request(dir.path(), method.clone(), "/digits.txt", &[]).await;
            assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
            assert_eq!(r.header("allow"), Some("GET, HEAD"));
        }
    }

    #[tokio::test]
    async fn directories_serve_their_index() {
        let dir = site();
        std::fs::write(dir.path().join("a b.txt"), "space").unwrap();
        for (path, status, body) in [
            ("/", StatusCode::OK, "<h1>home</h1>"),
            ("/docs/", StatusCode::OK, "<h1>docs</h1>"),
            ("/docs/empty/", StatusCode::NOT_FOUND, "not found\n"),
            ("/missing.txt", StatusCode::NOT_FOUND, "not found\n"),
            ("/digits.txt/x", StatusCode::NOT_FOUND, "not found\n"),
            ("/a%20b.txt", StatusCode::OK, "space"),
        ] {
            let r = get(dir.path(), path, &[]).await;
            assert_eq!(
                (r.status, String::from_utf8_lossy(&r.body).as_ref()),
                (status, body),
                "{path}"
            );
        }
        let r = get(dir.path(), "/", &[]).await;
        assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
        let r = get(dir.path(), "//docs", &[]).await;
        assert_eq!(
            (r.status, r.header("location")),
            (StatusCode::MOVED_PERMANENTLY, Some("/docs/"))
        );
    }

    #[tokio::test]
    async fn never_serves_outside_root() {
        let outer = tempfile::tempdir().unwrap();
        let secret = outer.path().join("secret");
        std::fs::write(&secret, "SECRET").unwrap();
        let root = outer.path().join("root");
        std::fs::create_dir_all(root.join("a")).unwrap();
        symlink(&secret, root.join("abs-link")).unwrap();
        symlink("../secret", root.join("rel-link")).unwrap();
        symlink("../../../../../../../../secret", root.join("a/deep-link")).unwrap();
        symlink("/etc/passwd", root.join("passwd")).unwrap();
        symlink("/", root.join("slash")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        std::os::unix::net::UnixListener::bind(root.join("socket")).unwrap();

        let (bad, missing) = (StatusCode::BAD_REQUEST, StatusCode::NOT_FOUND);
        let via_slash = format!("/slash{}", secret.display());
        for (path, status) in [
            ("/../secret", bad),
            ("/a/../../secret", bad),
            ("/%2e%2e/secret", bad),
            ("/%2E%2E/secret", bad),
            ("/a%2f..%2f..%2fsecret", bad),
            ("/..%2fsecret", bad),
            ("/a%00b", bad),
            ("/a%zz", bad),
            ("/a%+1", bad),
            ("/a%2", bad),
            ("/abs-link", missing),
            ("/rel-link", missing),
            ("/a/deep-link", missing),
            ("/passwd", missing),
            ("/slash/etc/passwd", missing),
            (&via_slash, missing),
            ("/loop", missing),
            ("/socket", missing),
        ] {
            let r = get(&root, path, &[]).await;
            assert_eq!(r.status, status, "{path}");
            assert!(
                !r.body.starts_with(b"SECRET") && !r.body.starts_with(b"root:"),
                "{path}"
            );
        }

        // Symlinks resolve inside root, as in the container: the image's own /etc/passwd.
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/passwd"), "image passwd").unwrap();
        std::fs::write(root.join("secret"), "root's own").unwrap();
        for (path, body) in [
            ("/passwd", &b"image passwd"[..]),
            ("/slash/etc/passwd", b"image passwd"),
            ("/rel-link", b"root's own"),
            ("/a/deep-link", b"root's own"),
        ] {
            assert_eq!(get(&root, path, &[]).await.body, body, "{path}");
        }
    }

    #[tokio::test]
    async fn large_file_streams() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3 * 1024 * 1024 + 12345u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(dir.path().join("big.bin"), &data).unwrap();
        let r = get(dir.path(), "/big.bin", &[]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.header("content-length"),
            Some(data.len().to_string().as_str())
        );
        assert!(r.body == data);

        let resp = serve(dir.path(), "/big.bin", &Method::GET, &HeaderMap::new()).await;
        let mut body = resp.into_body();
        let mut frames = 0;
        while let Some(frame) = body.frame().await {
            assert!(frame.unwrap().data_ref().unwrap().len() <= CHUNK);
            frames += 1;
        }
        assert!(frames >= data.len() / CHUNK);

        let r = get(
            dir.path(),
            "/big.bin",
            &[("range", "bytes=1000000-2999999")],
        )
        .await;
        assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
        assert!(r.body == data[1_000_000..3_000_000]);
    }
}
