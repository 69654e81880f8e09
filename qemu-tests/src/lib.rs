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

pub use guest::{free_port, Arch, Guest, GuestBuilder, Line, BOOT_TIMEOUT};
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
