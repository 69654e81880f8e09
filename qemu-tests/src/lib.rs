//! Boots Homeport's disk image under QEMU (TCG: KVM is not usable on our machines) and talks
//! to the agent inside from the host.
//!
//! - [`Image`]: the built image of a board (`target/image/<board>/`), built first through
//!   `scripts/image.sh` when missing or stale.
//! - [`GuestBuilder`] / [`Guest`]: one VM on a copy-on-write overlay of the image (the image
//!   itself is never written, guests run side by side), its own copy of the UEFI variables,
//!   user-mode networking with the agent's ports forwarded to free host ports, the serial
//!   console captured line by line with the time each line arrived. QEMU is killed and the
//!   files removed on drop.
//! - [`Owner`]: the owner's API client: token and CA fingerprint read from the console, the
//!   CA fetched and pinned, requests to `homeport.local` sent to the forwarded port.
//!
//! - [`update`]: OS update fixtures (later releases, a served TUF repository, a device).
//!
//! Readiness is signalled on the serial console (`homeport: ready version=… slot=…`); every
//! assertion runs from the host, through the agent's API or what the console shows.

mod guest;
mod image;
mod owner;
pub mod update;

pub use guest::{free_port, Arch, Guest, GuestBuilder, Line, BOOT_TIMEOUT, GUEST_IPV4};
pub use image::{build_release, repo_root, Image, Partition};
pub use owner::Owner;

/// Fails unless every step shows on the console, in this order.
pub fn assert_in_order(console: &str, steps: &[&str]) {
    let mut from = 0;
    for step in steps {
        match console[from..].find(step) {
            Some(i) => from += i + step.len(),
            None => {
                panic!("the console does not show {step:?} (after the steps before it):\n{console}")
            }
        }
    }
}

/// What every first boot to ready shows, checked: the ready line (returned) exactly once,
/// for `slot=a` and the image's version; the UKI's stub on the console; no complaint of
/// homeport-init (at `loglevel=4` only its errors reach the console). Then the owner's API
/// through the forwarded port: the token from the console works, nothing but the CA
/// answers without it, and no app is installed yet.
pub fn check_first_boot(guest: &mut Guest, timeout: std::time::Duration) -> anyhow::Result<Owner> {
    use homeport::api::types::{AgentInfo, AppSummary};
    const READY: &str = "homeport: ready ";
    let ready = guest.wait_for_console(READY, timeout)?;
    let version = guest.image().version.clone();
    assert_eq!(ready, format!("homeport: ready version={version} slot=a"));
    let console = guest.console();
    assert!(
        console.contains("EFI stub: Loaded initrd"),
        "booted through the UKI:\n{console}"
    );
    assert_eq!(
        console.matches(READY).count(),
        1,
        "exactly one ready line:\n{console}"
    );
    assert!(
        !console.contains("homeport-init:"),
        "homeport-init complained:\n{console}"
    );
    // The console says where the device is: DHCPv4's address and SLAAC's, the EUI-64 of
    // QEMU's default MAC (52:54:00:12:34:56) in the fec0::/64 QEMU advertises, so the same
    // after every boot; on the one wired interface.
    let slaac = "fec0::5054:ff:fe12:3456";
    let network = guest.wait_for_network(timeout, "DHCPv4's and SLAAC's addresses", |a| {
        a == [GUEST_IPV4, slaac]
    })?;
    assert!(network.starts_with("homeport: network en"), "{network}");
    let owner = Owner::from_console(guest)?;
    assert_eq!(owner.token.len(), 64);
    let info: AgentInfo = owner.get_json("/v1/info")?;
    assert_eq!(info.data_dir, "/data/homeport");
    assert_eq!(info.device_name, "homeport");
    assert_eq!(owner.get_anonymous("/v1/apps")?, 401);
    let apps: Vec<AppSummary> = owner.get_json("/v1/apps")?;
    assert!(apps.is_empty());
    Ok(owner)
}

/// Fails unless the guest wrote something, and only inside the image's data partition (not
/// the GPT, the ESP or either root slot): the root is read-only.
pub fn assert_only_data_written(guest: &Guest) -> anyhow::Result<()> {
    let data = guest.image().partition("homeport-data")?;
    let written = guest.written_ranges()?;
    assert!(!written.is_empty(), "the agent wrote its state");
    for w in &written {
        assert!(
            w.start >= data.start && w.start + w.len <= data.start + data.len,
            "a write at {}+{} is outside the data partition ({}+{})",
            w.start,
            w.len,
            data.start,
            data.len
        );
    }
    Ok(())
}
