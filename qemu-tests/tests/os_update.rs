//! Signed A/B OS updates under QEMU (TCG), with real firmware, systemd-boot's boot counting
//! and reboots: the device runs the test image (version N, slot a); a later build of the same
//! tree (N+1) is published with `homeport-release` into a copy of the development TUF
//! repository (whose root the image trusts) and served from the host over HTTP (10.0.2.2).
//!
//! 1. A good update: staged, rebooted into, health-checked, committed; the app serves again.
//! 2. A bad update (N+1 built with `homeport.fault=os-health`, so its health check fails):
//!    the device reboots until the loader gives up on slot b, comes back on N by itself,
//!    records the failure and refuses that version.
//! 3. Power cuts while slot b is written and right after its boot entry is written: the
//!    device boots and serves both times.
//!
//! The attacks against the client (expired, forged, rolled-back metadata, altered targets)
//! are host-side tests: `agent/tests/os_update.rs`.

use anyhow::{Context, Result};
use homeport_qemu_tests::update::{release, Device, Repo};
use homeport_qemu_tests::Image;
use homeport_qemu_tests::BOOT_TIMEOUT;
use std::time::{Duration, Instant};

/// N → N+1: downloaded, written into slot b, rebooted into, committed after the health
/// check; the app serves again and its install is remembered.
#[test]
fn a_good_update_is_committed_and_apps_come_back() -> Result<()> {
    let next = release("good")?;
    let repo = Repo::with(next)?;
    let mut dev = Device::start(&repo)?;
    let st = dev.status()?;
    assert!(st.appliance && !st.on_trial);
    assert_eq!(st.other.as_ref().map(|o| o.state.as_str()), Some("empty"));

    dev.guest.mark();
    dev.update_now()?;
    let writing = dev
        .guest
        .wait_for_console("homeport: os-update writing slot=b", BOOT_TIMEOUT)?;
    assert!(
        writing.ends_with(&format!("version={}", next.version)),
        "{writing}"
    );
    let t_write = dev.guest.find("os-update writing").context("writing")?.at;
    dev.guest
        .wait_for_console("homeport: os-update staged slot=b", BOOT_TIMEOUT)?;
    let t_staged = dev.guest.find("os-update staged").context("staged")?.at;
    dev.guest
        .wait_for_console("homeport: os-update rebooting into slot=b", BOOT_TIMEOUT)?;
    let asked = Instant::now();
    dev.guest
        .wait_for_console("homeport-init: reboot now", BOOT_TIMEOUT)?;
    dev.guest.mark();
    dev.wait_ready(&next.version, "b")?;
    dev.guest
        .wait_for_console("homeport: os-update committed slot=b", BOOT_TIMEOUT)?;
    dev.reconnect()?;
    dev.served()?;
    let downtime = asked.elapsed();
    let st = dev.status()?;
    assert_eq!(st.slot.map(|s| s.to_string()).as_deref(), Some("b"));
    assert_eq!(st.version.as_deref(), Some(next.version.as_str()));
    assert!(!st.on_trial && st.pending.is_none(), "{st:?}");
    let other = st.other.context("other slot")?;
    assert_eq!(
        (other.version.as_deref(), other.state.as_str()),
        (Some(Image::qemu()?.version.as_str()), "committed"),
        "slot a keeps N"
    );
    assert!(st
        .last_check
        .is_some_and(|l| l.ok && l.message.contains("committed")));
    eprintln!(
        "os-update: slot written in {:.1} s, reboot to app serving {:.1} s (TCG)",
        (t_staged - t_write).as_secs_f64(),
        downtime.as_secs_f64()
    );

    // A power cut now: the committed slot b boots again (the counter is gone).
    dev.guest.kill();
    dev.guest.restart()?;
    dev.wait_ready(&next.version, "b")?;
    dev.reconnect()?;
    dev.served()?;
    Ok(())
}

/// N → N+1 whose health check fails: three boots of slot b, each ending in a reboot, then
/// the loader boots slot a, whose agent records the failure and refuses the version.
#[test]
fn a_bad_update_rolls_back_by_itself() -> Result<()> {
    let bad = release("bad")?;
    let repo = Repo::with(bad)?;
    let mut dev = Device::start(&repo)?;
    let n = Image::qemu()?.version.clone();
    dev.guest.mark();
    dev.update_now()?;
    dev.guest
        .wait_for_console("homeport: os-update rebooting into slot=b", BOOT_TIMEOUT)?;
    for attempt in 1..=3 {
        let ready = dev
            .guest
            .wait_for_console("homeport: ready ", BOOT_TIMEOUT)
            .with_context(|| format!("boot {attempt} of slot b"))?;
        assert_eq!(
            ready,
            format!("homeport: ready version={} slot=b", bad.version)
        );
        let failed = dev.guest.wait_for_console(
            "homeport: os-update health check failed slot=b",
            BOOT_TIMEOUT,
        )?;
        assert!(failed.contains("homeport.fault=os-health"), "{failed}");
        dev.guest
            .wait_for_console("homeport-init: reboot now", BOOT_TIMEOUT)?;
        dev.guest.mark();
    }
    let ready = dev
        .guest
        .wait_for_console("homeport: ready ", BOOT_TIMEOUT)?;
    assert_eq!(
        ready,
        format!("homeport: ready version={n} slot=a"),
        "back on N"
    );
    dev.guest
        .wait_for_console("homeport: os-update rolled back to slot=a", BOOT_TIMEOUT)?;
    dev.reconnect()?;
    dev.served()?;
    let st = dev.status()?;
    assert_eq!(st.version.as_deref(), Some(n.as_str()));
    assert!(st.pending.is_none(), "{st:?}");
    assert_eq!(st.other.as_ref().map(|o| o.state.as_str()), Some("empty"));
    let refused: Vec<_> = st.refused.iter().map(|r| r.version.to_string()).collect();
    assert_eq!(refused, [bad.version.as_str()]);
    assert!(
        st.refused[0].reason.contains("homeport.fault=os-health"),
        "{}",
        st.refused[0].reason
    );
    assert!(st
        .last_check
        .is_some_and(|l| !l.ok && l.message.contains("rolled back")));

    // Asked again, it does not take that version.
    dev.guest.mark();
    dev.update_now()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = dev.status()?;
        if st.activity == "idle"
            && st
                .last_check
                .as_ref()
                .is_some_and(|l| l.message == "up to date")
        {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "no answer: {st:?}");
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(dev.guest.find("os-update writing").is_none());
    Ok(())
}

/// Power cuts: while slot b is written (the device boots N: b has no entry yet), and right
/// after b's entry is written (the device boots N+1 on trial, commits it, serves).
#[test]
fn power_cuts_during_an_update_leave_a_device_that_boots() -> Result<()> {
    let next = release("good")?;
    let repo = Repo::with(next)?;
    let mut dev = Device::start(&repo)?;
    let n = Image::qemu()?.version.clone();

    dev.guest.mark();
    dev.update_now()?;
    dev.guest
        .wait_for_console("homeport: os-update writing slot=b", BOOT_TIMEOUT)?;
    // Let the writer get going, then cut the power.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        dev.guest.find("os-update staged").is_none(),
        "cut before the end"
    );
    dev.guest.kill();
    dev.guest.restart()?;
    dev.wait_ready(&n, "a")?;
    dev.reconnect()?;
    dev.served()?;
    let st = dev.status()?;
    assert_eq!(st.other.as_ref().map(|o| o.state.as_str()), Some("empty"));
    assert!(st.pending.is_none(), "{st:?}");

    // Again, cut right after the boot entry is written.
    dev.guest.mark();
    dev.update_now()?;
    dev.guest
        .wait_for_console("homeport: os-update staged slot=b", BOOT_TIMEOUT)?;
    dev.guest.kill();
    dev.guest.restart()?;
    dev.wait_ready(&next.version, "b")?;
    dev.guest
        .wait_for_console("homeport: os-update committed slot=b", BOOT_TIMEOUT)?;
    dev.reconnect()?;
    dev.served()?;
    Ok(())
}
