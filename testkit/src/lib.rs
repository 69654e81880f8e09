//! Test harness for Homeport: real peers started on loopback, stopped on drop.
//!
//! - [`Registry`]: a real `docker-registry` (distribution 2.8), anonymous, htpasswd or token
//!   auth (with a small token server of our own).
//! - [`OciLayout`], [`LayerBuilder`]: write OCI image layouts directly; [`push_layout`] pushes
//!   them with real `skopeo`.
//! - Ready-made images: [`push_busybox`], [`push_busybox_umoci`], [`push_multiarch`],
//!   [`push_whiteouts`], [`push_malicious`], [`push_corrupt_blob`].
//!
//! - [`AgentProcess`]: a `homeportd` under test with its own data directory and cgroup parent.
//! - [`StaticServer`]: a folder served over HTTP (`python3 -m http.server`).
//! - [`NtpServer`]: a real NTP server (chronyd serving the host's time).
//! - [`Pebble`]: a real ACME server (pebble with its DNS test server).
//! - [`NetWorld`]: device, LAN router and internet as three network namespaces, with small
//!   HTTP and DNS [`Server`]s inside them.
//!
//! Everything is sync: the peers are separate processes or threads, so calling these functions
//! from an async test only blocks the calling thread for a moment.
//!
//! Invariant: every process a test starts is killed and reaped on drop, and every temporary
//! directory is removed, also when the test panics.

mod agent;
mod image;
mod images;
pub mod mediawiki;
mod networld;
mod ntp;
mod pebble;
mod registry;
mod static_server;
mod token;

pub use agent::{cgroup_controllers, cgroup_controllers_for, AgentOpts, AgentProcess};
pub use image::{
    push_layout, skopeo_inspect, skopeo_pull, Descriptor, Format, ImageConfig, Layer, LayerBuilder,
    OciLayout, Platform, PushOpts, MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_LAYER_GZIP, MEDIA_TYPE_OCI_MANIFEST,
};
pub use images::{
    busybox_layer, push_busybox, push_busybox_umoci, push_corrupt_blob, push_malicious,
    push_multiarch, push_whiteouts, BusyboxOpts, CorruptImage, Malicious, MaliciousImage,
    BUSYBOX_APPLETS, BUSYBOX_CMD,
};
pub use networld::{NetWorld, Server};
pub use ntp::NtpServer;
pub use pebble::Pebble;
pub use registry::Registry;
pub use static_server::{copy_dir, StaticServer};

use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

/// Runs `cmd` to completion; an error carries the exit status and stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// A string unique within this machine for a while: pid, a counter and the clock.
pub(crate) fn unique() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{n}-{nanos:x}", std::process::id())
}

const B64_STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const B64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn base64_with(alphabet: &[u8; 64], data: &[u8], pad: bool) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..4 {
            if i < chars {
                out.push(char::from(alphabet[((n >> (18 - 6 * i)) & 63) as usize]));
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64 with padding (RFC 4648 §4).
pub(crate) fn base64_std(data: &[u8]) -> String {
    base64_with(B64_STD, data, true)
}

/// URL-safe base64 without padding, as JOSE wants it.
pub(crate) fn base64_url(data: &[u8]) -> String {
    base64_with(B64_URL, data, false)
}

/// Decodes standard or URL-safe base64, padding optional.
pub(crate) fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// `sha256:HEX` of `data`.
pub(crate) fn sha256_digest(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for (input, std, url) in [
            ("", "", ""),
            ("f", "Zg==", "Zg"),
            ("fo", "Zm8=", "Zm8"),
            ("foo", "Zm9v", "Zm9v"),
            ("foob", "Zm9vYg==", "Zm9vYg"),
            ("\u{ff}\u{fe}?", "w7/Dvj8=", "w7_Dvj8"),
        ] {
            assert_eq!(base64_std(input.as_bytes()), std, "{input:?}");
            assert_eq!(base64_url(input.as_bytes()), url, "{input:?}");
            assert_eq!(base64_decode(std).as_deref(), Some(input.as_bytes()));
            assert_eq!(base64_decode(url).as_deref(), Some(input.as_bytes()));
        }
        assert_eq!(base64_decode("a b"), None);
    }

    #[test]
    fn unique_differs() {
        assert_ne!(unique(), unique());
    }
}
