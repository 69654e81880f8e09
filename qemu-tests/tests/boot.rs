//! Real boots of the appliance image under QEMU (TCG), checked from the host: the console,
//! the agent's API through the forwarded port, the apps through the proxy. Each boot takes
//! 15–60 s, so there are few tests, each checking several things. The image is built first
//! when missing or stale (`scripts/image.sh qemu-x86_64`).

use anyhow::{ensure, Context, Result};
use homeport::api::types::{AgentInfo, AppSummary, RegistryInfo};
use homeport::clock::TimeStatus;
use homeport_qemu_tests::{
    assert_in_order, assert_only_data_written, check_first_boot, Guest, GuestBuilder, Image, Owner,
    BOOT_TIMEOUT,
};
use homeport_testkit::NtpServer;
use std::time::{Duration, Instant};

const READY: &str = "homeport: ready ";

/// How long a clean poweroff or reboot may take until QEMU exits: homeport-init gives the
/// agent 20 s, then kills, syncs and unmounts; TCG on a shared machine is slow.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(120);

fn ready_line(image: &Image) -> String {
    format!("homeport: ready version={} slot=a", image.version)
}

/// UEFI → systemd-boot → slot a's UKI → initramfs → erofs root → homeport-init → the agent,
/// which serves its API over TLS for the owner's token; Ctrl-Alt-Del shuts it down cleanly;
/// nothing but the data partition is ever written.
#[test]
fn boots_into_the_agent_from_a_read_only_root() -> Result<()> {
    let image = Image::qemu()?;
    // The hardware clock is years behind, as on a device that lost it (a Raspberry Pi has
    // none at all).
    let mut guest = GuestBuilder::new(image)
        .no_reboot(true)
        .rtc_base("2020-01-01")
        .start()?;
    let owner = check_first_boot(&mut guest, BOOT_TIMEOUT)?;
    check_the_clock(image, &owner)?;

    // Ctrl-Alt-Del: the kernel sends homeport-init SIGINT, which reboots cleanly (QEMU
    // exits under -no-reboot).
    guest.ctrl_alt_del()?;
    let status = guest.wait_for_exit(SHUTDOWN_TIMEOUT)?;
    assert!(status.success(), "QEMU: {status}");
    assert_in_order(
        &guest.console(),
        &[
            "homeport-init: reboot requested, stopping the agent",
            "homeport-init: agent exited with code 0",
            "homeport-init: reboot now",
            "reboot: Restarting system",
        ],
    );

    // Read-only root: after a boot, the agent's first start (CA, token, database) and a
    // shutdown, the guest wrote to the data partition only (not the GPT, the ESP or either
    // root slot).
    assert_only_data_written(&guest)?;
    Ok(())
}

/// The clock of a guest whose hardware clock says 2020: homeport-init moved it to the
/// image's build time before anything started; chrony then follows the NTP server the owner
/// names (chronyd on the host, reached through QEMU's user networking).
fn check_the_clock(image: &Image, owner: &Owner) -> Result<()> {
    let seconds = |status: &TimeStatus| -> Result<i64> {
        let t: jiff::Timestamp = status.now.parse().context("the time's format")?;
        Ok(t.as_second())
    };
    let built: i64 = image
        .version
        .rsplit('.')
        .next()
        .and_then(|s| s.parse().ok())
        .context("the image version ends in its build time")?;
    let status: TimeStatus = owner.get_json("/v1/system/time")?;
    assert_eq!(status.servers.len(), 1, "{status:?}");
    let now = seconds(&status)?;
    ensure!(
        now >= built,
        "the clock ({}) is before the image's build time ({built})",
        status.now
    );

    // Bad settings are refused, with what was wrong, and change nothing.
    let (code, body) = owner.put_json(
        "/v1/system/time",
        &serde_json::json!({ "servers": ["pool.ntp.org\nrtcsync"] }),
    )?;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("is not an NTP server"), "{body}");

    let ntp = NtpServer::start()?;
    let server = format!("10.0.2.2:{}", ntp.port());
    let (code, body) = owner.put_json(
        "/v1/system/time",
        &serde_json::json!({ "servers": [server] }),
    )?;
    assert_eq!(code, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(180);
    let synced = loop {
        let status: TimeStatus = owner.get_json("/v1/system/time")?;
        if status.synchronized {
            break status;
        }
        ensure!(
            Instant::now() < deadline,
            "not synchronized to {server} after 180 s: {status:?}"
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    assert_eq!(synced.source.as_deref(), Some("10.0.2.2"), "{synced:?}");
    assert_eq!(synced.servers.len(), 1);
    assert_eq!(synced.servers[0].to_string(), server);
    // Within a few seconds of the host (the answer crossed emulation and the API).
    let host = jiff::Timestamp::now().as_second();
    let guest = seconds(&synced)?;
    ensure!(
        (host - guest).abs() <= 5,
        "the guest's clock ({}) is {} s from the host's",
        synced.now,
        host - guest
    );
    Ok(())
}

/// An app installed from the host's registry (through QEMU's user networking, 10.0.2.2, a
/// plain-HTTP registry the owner allows through the API) is served by the proxy under its
/// name; a poweroff through the API stops it cleanly and QEMU exits by itself; the app, the
/// registry setting, the owner's token and the device CA survive it and a power cut.
#[test]
fn apps_and_data_survive_poweroff_and_power_cuts() -> Result<()> {
    let image = Image::qemu()?;
    let registry = homeport_testkit::Registry::start()?;
    let page = "hello from an app on the appliance";
    homeport_testkit::push_busybox(
        &registry,
        "hello",
        "1",
        &homeport_testkit::BusyboxOpts {
            index_html: page.to_string(),
            ..Default::default()
        },
    )?;
    let port = registry
        .host()
        .rsplit_once(':')
        .map(|(_, p)| p.to_string())
        .context("registry host:port")?;
    let guest_registry = format!("10.0.2.2:{port}");
    let mut guest = GuestBuilder::new(image).start()?;
    assert_eq!(
        guest.wait_for_console(READY, BOOT_TIMEOUT)?,
        ready_line(image)
    );
    let owner = Owner::from_console(&guest)?;

    // The test registry speaks plain HTTP: pulls fail until the owner allows it.
    let manifest =
        format!("name = \"hello\"\nimage = \"{guest_registry}/hello:1\"\n[https]\nport = 8080\n");
    let refused = owner.install(&manifest).expect_err("HTTPS only by default");
    assert!(refused.to_string().contains("502"), "{refused:#}");
    let (status, body) = owner.put_json(
        &format!("/v1/registries/{guest_registry}"),
        &serde_json::json!({ "insecure": true }),
    )?;
    assert_eq!(status, 200, "{body}");
    owner
        .install(&manifest)
        .context("install from the host's registry")?;
    let host = "hello-homeport.local";
    let served = |guest: &Guest, owner: &Owner| -> Result<()> {
        // The app may take a moment to listen after (re)start.
        let mut last = (0, String::new());
        for _ in 0..120 {
            last = owner.app_get(guest, host, "/")?;
            if last.0 == 200 && last.1.contains(page) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        anyhow::bail!("https://{host}/ answers {} {}", last.0, last.1)
    };
    served(&guest, &owner)?;
    let (status, location) = owner.app_get_plain(&guest, host, "/")?;
    assert_eq!(status, 308, "plain HTTP redirects");
    assert!(
        location
            .as_deref()
            .is_some_and(|l| l.starts_with("https://hello-homeport.local")),
        "{location:?}"
    );

    // Poweroff through the API: homeport-init stops the agent, which stops the app, then
    // everything else is killed, /data unmounted and the machine powered off.
    let asked = Instant::now();
    owner.shutdown("poweroff")?;
    let status = guest.wait_for_exit(SHUTDOWN_TIMEOUT)?;
    eprintln!(
        "poweroff: QEMU exited {:.1} s after the request",
        asked.elapsed().as_secs_f64()
    );
    assert!(status.success(), "QEMU: {status}");
    let console = guest.console();
    assert_in_order(
        &console,
        &[
            "homeport-init: poweroff requested, stopping the agent",
            "stopping every app: the device is going down",
            "app stopped app=hello",
            "homeportd stopped with every app",
            "homeport-init: agent exited with code 0",
            "homeport-init: poweroff now",
            "reboot: Power down",
        ],
    );
    assert!(!console.contains("did not stop within"), "{console}");

    // The next boot of the same disk: same token and CA, the app and the setting are there.
    guest.restart()?;
    assert_eq!(
        guest.wait_for_console(READY, BOOT_TIMEOUT)?,
        ready_line(image)
    );
    let second = guest.console();
    assert!(
        !second.contains("homeport: owner token="),
        "the token is kept, not made again:\n{second}"
    );
    assert!(second.contains(&format!("homeport: device ca sha256={}", owner.fingerprint)));
    let owner = Owner::connect(&guest, &owner.token, &owner.fingerprint)?;
    let apps: Vec<AppSummary> = owner.get_json("/v1/apps")?;
    assert_eq!(
        apps.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
        ["hello"]
    );
    let registries: Vec<RegistryInfo> = owner.get_json("/v1/registries")?;
    assert!(
        registries
            .iter()
            .any(|r| r.host == guest_registry && r.insecure),
        "{registries:?}"
    );
    served(&guest, &owner)?;

    // A power cut: QEMU killed, started again on the same disk.
    guest.kill();
    guest.restart()?;
    assert_eq!(
        guest.wait_for_console(READY, BOOT_TIMEOUT)?,
        ready_line(image)
    );
    assert!(guest.find("homeport: owner token=").is_none());
    let owner = Owner::connect(&guest, &owner.token, &owner.fingerprint)?;
    served(&guest, &owner)?;
    Ok(())
}

/// On a disk larger than the image, the first boot grows the data partition to the end
/// (initramfs) and only the first; a reboot through the API goes down cleanly (QEMU exits
/// under -no-reboot); the next boot comes up with its data.
#[test]
fn grows_the_data_partition_once_and_reboots_cleanly() -> Result<()> {
    let image = Image::qemu()?;
    let extra = 1 << 30;
    let mut guest = GuestBuilder::new(image)
        .no_reboot(true)
        .grow_disk(extra)
        .start()?;
    let grown = guest.wait_for_console("homeport-grow: /dev/", BOOT_TIMEOUT)?;
    let data = image.partition("homeport-data")?;
    let want_mib = (data.len + extra) >> 20;
    // "… is now N MiB": all of the extra space but alignment and the backup GPT.
    let now_mib: u64 = guest
        .wait_for_console(" is now ", BOOT_TIMEOUT)?
        .split(" is now ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no size in {grown:?}"))?;
    ensure!(
        now_mib + 2 >= want_mib && now_mib <= want_mib,
        "data partition is {now_mib} MiB, expected about {want_mib}"
    );
    assert_eq!(
        guest.wait_for_console(READY, BOOT_TIMEOUT)?,
        ready_line(image)
    );
    let owner = Owner::from_console(&guest)?;

    owner.shutdown("reboot")?;
    let status = guest.wait_for_exit(SHUTDOWN_TIMEOUT)?;
    assert!(status.success(), "QEMU: {status}");
    assert_in_order(
        &guest.console(),
        &[
            "homeport-init: reboot requested, stopping the agent",
            "homeportd stopped with every app",
            "homeport-init: agent exited with code 0",
            "homeport-init: reboot now",
            "reboot: Restarting system",
        ],
    );

    guest.restart()?;
    assert_eq!(
        guest.wait_for_console(READY, BOOT_TIMEOUT)?,
        ready_line(image)
    );
    let console = guest.console();
    assert!(
        !console.contains("homeport-grow"),
        "grown once only:\n{console}"
    );
    assert!(!console.contains("homeport: owner token="), "{console}");
    let owner = Owner::connect(&guest, &owner.token, &owner.fingerprint)?;
    let info: AgentInfo = owner.get_json("/v1/info")?;
    assert_eq!(info.data_dir, "/data/homeport");
    Ok(())
}
