//! nftables through libnftables, the library behind the `nft` command, loaded when first
//! needed. In-process because the firewall changes on every install and rm: spawning `nft`
//! costs ~10 ms of dynamic loading each time, the library call ~1 ms. It takes the same JSON
//! as `nft -j -f`, and one call is one kernel transaction (all or nothing).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io;
use std::sync::Mutex;

type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type SetFlags = unsafe extern "C" fn(*mut c_void, u32);
type Buffer = unsafe extern "C" fn(*mut c_void) -> c_int;
type GetBuffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type Run = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// `NFT_CTX_OUTPUT_JSON`: JSON output, and JSON input is accepted.
const OUTPUT_JSON: u32 = 1 << 4;

struct Lib {
    ctx: *mut c_void,
    free: CtxFree,
    get_output: GetBuffer,
    get_error: GetBuffer,
    run: Run,
}

// SAFETY: the context is only ever used behind the mutex in `Nft`, one call at a time.
unsafe impl Send for Lib {}

impl Drop for Lib {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from `nft_ctx_new` and is freed once.
        unsafe { (self.free)(self.ctx) }
    }
}

/// A libnftables context; calls are serialised.
pub struct Nft {
    lib: Mutex<Option<Lib>>,
}

fn symbol<T: Copy>(handle: *mut c_void, name: &CStr) -> io::Result<T> {
    // SAFETY: `handle` is a live dlopen handle and `name` is NUL-terminated.
    let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
    if p.is_null() {
        return Err(io::Error::other(format!(
            "libnftables has no {}",
            name.to_string_lossy()
        )));
    }
    // SAFETY: T is the function pointer type libnftables.h declares for `name`.
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
}

fn open() -> io::Result<Lib> {
    // SAFETY: a constant NUL-terminated name; the library stays loaded for the process.
    let handle = unsafe { libc::dlopen(c"libnftables.so.1".as_ptr(), libc::RTLD_NOW) };
    if handle.is_null() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "cannot load libnftables.so.1 (Debian package libnftables1, installed with nftables)",
        ));
    }
    let new: CtxNew = symbol(handle, c"nft_ctx_new")?;
    let set_flags: SetFlags = symbol(handle, c"nft_ctx_output_set_flags")?;
    let buffer_output: Buffer = symbol(handle, c"nft_ctx_buffer_output")?;
    let buffer_error: Buffer = symbol(handle, c"nft_ctx_buffer_error")?;
    let lib = Lib {
        // SAFETY: NFT_CTX_DEFAULT (0) is a valid flag set.
        ctx: unsafe { new(0) },
        free: symbol(handle, c"nft_ctx_free")?,
        get_output: symbol(handle, c"nft_ctx_get_output_buffer")?,
        get_error: symbol(handle, c"nft_ctx_get_error_buffer")?,
        run: symbol(handle, c"nft_run_cmd_from_buffer")?,
    };
    if lib.ctx.is_null() {
        return Err(io::Error::other("nft_ctx_new failed"));
    }
    // SAFETY: `ctx` is live; these only set fields of it.
    unsafe {
        set_flags(lib.ctx, OUTPUT_JSON);
        if buffer_output(lib.ctx) != 0 || buffer_error(lib.ctx) != 0 {
            return Err(io::Error::other("libnftables cannot buffer its output"));
        }
    }
    Ok(lib)
}

impl Default for Nft {
    fn default() -> Self {
        Nft::new()
    }
}

impl Nft {
    pub const fn new() -> Nft {
        Nft {
            lib: Mutex::new(None),
        }
    }

    /// Runs one batch (JSON, as `nft -j -f` takes it, or nft's own syntax); returns what it
    /// printed. A failed batch changes nothing and its error names the failing command.
    pub fn run(&self, batch: &str) -> io::Result<String> {
        let mut guard = self.lib.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            let t = std::time::Instant::now();
            *guard = Some(open()?);
            tracing::debug!(took = ?t.elapsed(), "libnftables loaded");
        }
        let Some(lib) = guard.as_ref() else {
            return Err(io::Error::other("libnftables not loaded"));
        };
        let cmd = CString::new(batch)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "batch contains NUL"))?;
        // SAFETY: `ctx` is live and used by this thread alone (the mutex); the buffers it
        // returns stay valid until the next call, and are copied before the guard drops.
        unsafe {
            let rc = (lib.run)(lib.ctx, cmd.as_ptr());
            let read = |p: *const c_char| {
                if p.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(p).to_string_lossy().trim().to_string()
                }
            };
            let out = read((lib.get_output)(lib.ctx));
            let err = read((lib.get_error)(lib.ctx));
            if rc != 0 {
                return Err(io::Error::other(format!(
                    "nftables refused the batch: {}",
                    if err.is_empty() {
                        "no reason given"
                    } else {
                        &err
                    }
                )));
            }
            Ok(out)
        }
    }
}
