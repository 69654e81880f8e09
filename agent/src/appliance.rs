//! The agent as the appliance's one service: what it does only when it runs on Homeport's
//! own OS image (under `homeport-init`), not in host mode on someone's Linux machine.
//!
//! - It knows it is the appliance from `/etc/os-release` (`ID=homeport`), and its boot slot
//!   from the kernel command line (`homeport.slot=a`).
//! - It brings up the wired network: `dhcpcd` for DHCPv4 and router solicitation/SLAAC on
//!   every wired interface, supervised (restarted with backoff). dhcpcd rather than a client
//!   of our own: it is small, maintained, does both families, renews and rebinds leases,
//!   handles link changes, and Debian ships it without systemd (`dhcpcd-base`). It writes
//!   the resolvers into `/etc/resolv.conf`, a symlink into `/run` on the read-only root.
//! - It serves its API on the network too, over TLS with the device CA's certificate, for
//!   the owner's token (`DATA/owner-token`, made at first start and printed once on the
//!   console until pairing replaces it).
//! - It tells the console when it serves: `homeport: ready version=… slot=…`.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What the agent knows of the appliance it runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appliance {
    /// `IMAGE_VERSION` of the running OS image.
    pub version: String,
    /// The boot slot (`a` or `b`), if the kernel command line names one.
    pub slot: Option<String>,
}

impl Appliance {
    /// The appliance this runs on, or `None` in host mode.
    pub fn detect() -> Option<Appliance> {
        let os = std::fs::read_to_string("/etc/os-release")
            .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
            .ok()?;
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        Appliance::from_texts(&os, &cmdline)
    }

    pub fn from_texts(os_release: &str, cmdline: &str) -> Option<Appliance> {
        let field = |key: &str| {
            os_release.lines().find_map(|l| {
                let v = l.trim().strip_prefix(key)?.strip_prefix('=')?;
                Some(v.trim().trim_matches('"').to_string())
            })
        };
        if field("ID").as_deref() != Some("homeport") {
            return None;
        }
        let slot = cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix("homeport.slot="))
            .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric()))
            .map(str::to_string);
        Some(Appliance {
            version: field("IMAGE_VERSION")
                .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string()),
            slot,
        })
    }

    /// The line the console shows when the agent serves.
    pub fn ready_line(&self) -> String {
        format!(
            "homeport: ready version={} slot={}",
            self.version,
            self.slot.as_deref().unwrap_or("unknown")
        )
    }
}

/// Wired interfaces: Ethernet (`type` 1) backed by a device (not our bridge, veths or
/// other virtual links), not wireless.
pub fn wired_interfaces(sys_class_net: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(sys_class_net)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    let p = e.path();
                    std::fs::read_to_string(p.join("type")).is_ok_and(|t| t.trim() == "1")
                        && p.join("device").exists()
                        && !p.join("wireless").exists()
                })
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Starts `dhcpcd` for the wired interfaces on a thread of its own, restarting it with
/// backoff (1 s doubling to 60 s) whenever it ends.
pub fn start_network() {
    let interfaces = wired_interfaces(Path::new("/sys/class/net"));
    let Some(dhcpcd) = ["/usr/sbin/dhcpcd", "/sbin/dhcpcd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    else {
        tracing::error!("dhcpcd is missing: the network stays unconfigured");
        return;
    };
    if interfaces.is_empty() {
        tracing::warn!("no wired network interface found");
        return;
    }
    tracing::info!(?interfaces, "bringing up the wired network");
    let spawned = std::thread::Builder::new()
        .name("dhcpcd".into())
        .spawn(move || {
            let mut delay = Duration::from_secs(1);
            loop {
                let started = std::time::Instant::now();
                let status = std::process::Command::new(&dhcpcd)
                    .arg("--nobackground")
                    .arg("--quiet")
                    .args(&interfaces)
                    .stdin(std::process::Stdio::null())
                    .status();
                match status {
                    Ok(s) => tracing::warn!(status = %s, "dhcpcd ended; restarting it"),
                    Err(e) => tracing::error!(error = %e, "cannot start dhcpcd"),
                }
                if started.elapsed() > Duration::from_secs(60) {
                    delay = Duration::from_secs(1);
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the network thread");
    }
}

/// The owner's API token: read, or made (32 random bytes, hex, mode 0600) on first start.
/// Returns it and whether it was made now.
pub fn owner_token(data: &Path) -> io::Result<(String, bool)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data.join("owner-token");
    match std::fs::read_to_string(&path) {
        Ok(t) if t.trim().len() == 64 => return Ok((t.trim().to_string(), false)),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    let tmp = data.join("owner-token.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok((token, true))
}

/// SHA-256 of the certificate's DER, hex: what the console shows so a client can pin the
/// device CA it fetched.
pub fn ca_fingerprint(pem: &str) -> Option<String> {
    use rustls::pki_types::pem::PemObject;
    use sha2::Digest;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    Some(hex::encode(sha2::Sha256::digest(der.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_the_appliance_and_its_slot() {
        let os = "NAME=Homeport\nID=homeport\nIMAGE_VERSION=\"0.1.0.7\"\n";
        let a =
            Appliance::from_texts(os, "root=PARTLABEL=root-b ro homeport.slot=b quiet").unwrap();
        assert_eq!(a.version, "0.1.0.7");
        assert_eq!(a.slot.as_deref(), Some("b"));
        assert_eq!(a.ready_line(), "homeport: ready version=0.1.0.7 slot=b");
        assert_eq!(
            Appliance::from_texts("ID=debian\nVERSION_ID=12\n", "homeport.slot=a"),
            None
        );
        let a = Appliance::from_texts("ID=homeport\n", "homeport.slot=../x").unwrap();
        assert_eq!(a.slot, None, "a slot name is a plain word");
    }

    #[test]
    fn owner_token_is_made_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (t, made) = owner_token(dir.path()).unwrap();
        assert!(made && t.len() == 64);
        let mode = std::fs::metadata(dir.path().join("owner-token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(owner_token(dir.path()).unwrap(), (t, false));
    }

    #[test]
    fn wired_interfaces_are_ethernet_devices() {
        let dir = tempfile::tempdir().unwrap();
        let add = |name: &str, ty: &str, device: bool, wireless: bool| {
            let p = dir.path().join(name);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("type"), format!("{ty}\n")).unwrap();
            if device {
                std::fs::create_dir(p.join("device")).unwrap();
            }
            if wireless {
                std::fs::create_dir(p.join("wireless")).unwrap();
            }
        };
        add("enp0s2", "1", true, false);
        add("eth1", "1", true, false);
        add("lo", "772", false, false);
        add("hpbr123", "1", false, false);
        add("wlan0", "1", true, true);
        assert_eq!(wired_interfaces(dir.path()), ["enp0s2", "eth1"]);
    }
}
