//! One QEMU virtual machine booting the image (TCG), and its serial console.

use crate::image::{Image, Partition};
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a boot to the agent may take. A UEFI boot under TCG takes 15–60 s on our machines
/// (shared with other builds); a test must not fail because the machine was slow.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// The address QEMU's user-mode network hands the guest by DHCP; the forwarded host ports
/// lead there.
pub const GUEST_IPV4: &str = "10.0.2.15";

/// The machine QEMU emulates for an image, from its architecture (`image.json`'s `arch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `qemu-system-x86_64 -machine q35 -cpu max`, OVMF (package `ovmf`).
    X86_64,
    /// `qemu-system-aarch64 -machine virt -cpu max`, AAVMF (packages `qemu-system-arm`,
    /// `qemu-efi-aarch64`); the serial console is the PL011, `ttyAMA0`.
    Aarch64,
}

impl Arch {
    /// From Debian's architecture name (`amd64`, `arm64`).
    pub fn from_debian(name: &str) -> Result<Arch> {
        match name {
            "amd64" => Ok(Arch::X86_64),
            "arm64" => Ok(Arch::Aarch64),
            other => bail!("no QEMU machine for architecture {other}"),
        }
    }

    fn qemu(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86_64",
            Arch::Aarch64 => "qemu-system-aarch64",
        }
    }

    fn package(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86",
            Arch::Aarch64 => "qemu-system-arm",
        }
    }

    /// The UEFI firmware's code (read-only) and the variables' template (copied per guest).
    fn firmware(self) -> (&'static str, &'static str) {
        match self {
            Arch::X86_64 => (
                "/usr/share/OVMF/OVMF_CODE_4M.fd",
                "/usr/share/OVMF/OVMF_VARS_4M.fd",
            ),
            // Both padded to the 64 MiB of virt's flash banks, as QEMU wants them.
            Arch::Aarch64 => (
                "/usr/share/AAVMF/AAVMF_CODE.fd",
                "/usr/share/AAVMF/AAVMF_VARS.fd",
            ),
        }
    }

    /// The machine and CPU. arm64: `max` (every feature QEMU emulates) with the cheap
    /// implementation-defined pointer authentication instead of QARMA, which costs TCG much.
    fn machine(self) -> [&'static str; 6] {
        match self {
            Arch::X86_64 => ["-accel", "tcg", "-machine", "q35", "-cpu", "max"],
            Arch::Aarch64 => [
                "-accel",
                "tcg",
                "-machine",
                "virt",
                "-cpu",
                "max,pauth-impdef=on",
            ],
        }
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One console line, with when it arrived (since this boot's QEMU started).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub at: Duration,
    pub text: String,
}

/// How to start a [`Guest`].
#[derive(Debug, Clone)]
pub struct GuestBuilder {
    image: Image,
    memory_mib: u32,
    cpus: u32,
    no_reboot: bool,
    grow_disk: Option<u64>,
    rtc_base: Option<String>,
}

impl GuestBuilder {
    /// `-smp 2 -m 1024`, UEFI, booting the image's disk, on the machine of the image's
    /// architecture ([`Arch`]: q35 and OVMF, or arm64's virt and AAVMF).
    pub fn new(image: &Image) -> GuestBuilder {
        GuestBuilder {
            image: image.clone(),
            memory_mib: 1024,
            cpus: 2,
            no_reboot: false,
            grow_disk: None,
            rtc_base: None,
        }
    }

    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// `-no-reboot`: QEMU exits when the guest reboots (so a reboot ends the guest).
    pub fn no_reboot(mut self, yes: bool) -> Self {
        self.no_reboot = yes;
        self
    }

    /// Starts the guest's hardware clock at this date (QEMU's `-rtc base=`, e.g.
    /// `2020-01-01`) instead of now: a device whose clock is wrong.
    pub fn rtc_base(mut self, date: &str) -> Self {
        self.rtc_base = Some(date.to_string());
        self
    }

    /// Makes the guest's disk larger than the image by `bytes` (as after flashing the image
    /// onto a larger card): the first boot grows the data partition.
    pub fn grow_disk(mut self, bytes: u64) -> Self {
        self.grow_disk = Some(bytes);
        self
    }

    pub fn start(self) -> Result<Guest> {
        Guest::start(self)
    }
}

/// Guests running at once in this process: TCG guests on a 2-core machine slow each other
/// down until boots time out, so by default one per two host cores (`HOMEPORT_QEMU_JOBS`).
struct Slots {
    used: Mutex<usize>,
    freed: Condvar,
}

static SLOTS: Slots = Slots {
    used: Mutex::new(0),
    freed: Condvar::new(),
};

struct Slot;

impl Slot {
    fn take() -> Slot {
        let max = std::env::var("HOMEPORT_QEMU_JOBS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() / 2))
            .max(1);
        let mut used = SLOTS.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used >= max {
            used = SLOTS.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut used = SLOTS.used.lock().unwrap_or_else(|e| e.into_inner());
        *used -= 1;
        SLOTS.freed.notify_one();
    }
}

/// The serial console of one boot, read as QEMU writes it.
struct Console {
    lines: Arc<Mutex<Vec<Line>>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl Console {
    fn follow(path: PathBuf, started: Instant) -> Console {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (lines.clone(), stop.clone());
        let reader = std::thread::spawn(move || read_console(&path, started, &l, &s));
        Console {
            lines,
            stop,
            reader: Some(reader),
        }
    }

    fn lines(&self) -> Vec<Line> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops following once everything written so far was read.
    fn finish(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.finish();
    }
}

fn read_console(path: &Path, started: Instant, lines: &Mutex<Vec<Line>>, stop: &AtomicBool) {
    let mut file = None;
    let mut partial = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        if file.is_none() {
            file = std::fs::File::open(path).ok();
        }
        let mut got = 0;
        if let Some(f) = file.as_mut() {
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got += n;
                partial.extend_from_slice(&buf[..n]);
            }
        }
        if got > 0 {
            let at = started.elapsed();
            let mut out = lines.lock().unwrap_or_else(|e| e.into_inner());
            while let Some(i) = partial.iter().position(|&b| b == b'\n') {
                let raw: Vec<u8> = partial.drain(..=i).collect();
                out.push(Line {
                    at,
                    text: clean(&raw),
                });
            }
        }
        if stopping {
            if !partial.is_empty() {
                let mut out = lines.lock().unwrap_or_else(|e| e.into_inner());
                out.push(Line {
                    at: started.elapsed(),
                    text: clean(&partial),
                });
            }
            return;
        }
        if got == 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A console line as text: ANSI escape sequences (colours, the firmware's screen control)
/// and carriage returns removed.
fn clean(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    // Parameters and intermediates, then one final byte in @..~.
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' | '\n' => {}
            c => out.push(c),
        }
    }
    out.trim_end().to_string()
}

/// A running (or stopped) QEMU guest. Killed, and its files removed, on drop.
pub struct Guest {
    spec: GuestBuilder,
    arch: Arch,
    dir: tempfile::TempDir,
    ports: Ports,
    child: Option<Child>,
    console: Option<Console>,
    started: Instant,
    boots: u32,
    cursor: usize,
    _slot: Slot,
}

#[derive(Debug, Clone, Copy)]
struct Ports {
    api: u16,
    https: u16,
    http: u16,
}

impl Guest {
    fn start(spec: GuestBuilder) -> Result<Guest> {
        let arch = Arch::from_debian(&spec.image.arch)?;
        let slot = Slot::take();
        let dir = tempfile::Builder::new()
            .prefix("homeport-guest-")
            .tempdir()
            .context("make the guest's folder")?;
        let overlay = dir.path().join("disk.qcow2");
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&spec.image.path)
            .arg(&overlay))?;
        if let Some(extra) = spec.grow_disk {
            let size = std::fs::metadata(&spec.image.path)?.len() + extra;
            run(Command::new("qemu-img")
                .args(["resize", "-q"])
                .arg(&overlay)
                .arg(size.to_string()))?;
        }
        let (_, vars) = arch.firmware();
        std::fs::copy(vars, dir.path().join("vars.fd"))
            .with_context(|| format!("copy {vars} (package ovmf or qemu-efi-aarch64)"))?;
        let ports = Ports {
            api: free_port()?,
            https: free_port()?,
            http: free_port()?,
        };
        let mut guest = Guest {
            spec,
            arch,
            dir,
            ports,
            child: None,
            console: None,
            started: Instant::now(),
            boots: 0,
            cursor: 0,
            _slot: slot,
        };
        guest.launch()?;
        Ok(guest)
    }

    fn launch(&mut self) -> Result<()> {
        self.boots += 1;
        let d = self.dir.path();
        let console = d.join(format!("console-{}.log", self.boots));
        let monitor = d.join("monitor.sock");
        let _ = std::fs::remove_file(&monitor);
        let p = self.ports;
        let (code, _) = self.arch.firmware();
        let disk = d.join("disk.qcow2");
        let mut cmd = Command::new(self.arch.qemu());
        cmd.args(self.arch.machine())
            .args(["-smp", &self.spec.cpus.to_string()])
            .args(["-m", &self.spec.memory_mib.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={code}"
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                d.join("vars.fd").display()
            ));
        match self.arch {
            Arch::X86_64 => {
                cmd.arg("-drive")
                    .arg(format!("if=virtio,format=qcow2,file={}", disk.display()));
            }
            // virt's devices on its PCIe bus, as the board's initramfs expects (virtio_pci).
            Arch::Aarch64 => {
                cmd.arg("-drive")
                    .arg(format!(
                        "if=none,id=disk,format=qcow2,file={}",
                        disk.display()
                    ))
                    .args(["-device", "virtio-blk-pci,drive=disk"]);
            }
        }
        cmd.arg("-netdev")
            .arg(format!(
                "user,id=n,hostfwd=tcp:127.0.0.1:{}-:8443,hostfwd=tcp:127.0.0.1:{}-:443,hostfwd=tcp:127.0.0.1:{}-:80",
                p.api, p.https, p.http
            ))
            .args(["-device", "virtio-net-pci,netdev=n"])
            .args(["-device", "virtio-rng-pci"])
            .arg("-chardev")
            .arg(format!("file,id=con,path={}", console.display()))
            .args(["-serial", "chardev:con"])
            .arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", monitor.display()));
        if self.spec.no_reboot {
            cmd.arg("-no-reboot");
        }
        if let Some(base) = &self.spec.rtc_base {
            cmd.args(["-rtc", &format!("base={base}")]);
        }
        let log = std::fs::File::create(d.join(format!("qemu-{}.log", self.boots)))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.started = Instant::now();
        let child = cmd.spawn().with_context(|| {
            format!(
                "start {} (package {})",
                self.arch.qemu(),
                self.arch.package()
            )
        })?;
        self.child = Some(child);
        self.console = Some(Console::follow(console, self.started));
        self.cursor = 0;
        Ok(())
    }

    /// Where the agent's API (guest port 8443) is forwarded on the host.
    pub fn api_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.api))
    }

    /// Where the proxy's HTTPS port (443) is forwarded.
    pub fn https_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.https))
    }

    /// Where the proxy's plain HTTP port (80) is forwarded.
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.http))
    }

    pub fn image(&self) -> &Image {
        &self.spec.image
    }

    /// The emulated machine's architecture (the image's).
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The copy-on-write overlay the guest writes to.
    pub fn overlay(&self) -> PathBuf {
        self.dir.path().join("disk.qcow2")
    }

    /// How many times QEMU was started for this guest.
    pub fn boots(&self) -> u32 {
        self.boots
    }

    /// The console of the current QEMU run, with arrival times.
    pub fn lines(&self) -> Vec<Line> {
        self.console
            .as_ref()
            .map(Console::lines)
            .unwrap_or_default()
    }

    /// The console of the current QEMU run, as text.
    pub fn console(&self) -> String {
        let mut s = String::new();
        for l in self.lines() {
            s.push_str(&l.text);
            s.push('\n');
        }
        s
    }

    /// The console of the current QEMU run since the last [`Guest::mark`].
    pub fn console_since_mark(&self) -> String {
        let mut s = String::new();
        for l in self.lines().iter().skip(self.cursor) {
            s.push_str(&l.text);
            s.push('\n');
        }
        s
    }

    /// From now on, [`Guest::wait_for_console`] and [`Guest::find`] look only at lines that
    /// come after this point (e.g. before a reboot inside the same QEMU run).
    pub fn mark(&mut self) {
        self.cursor = self.lines().len();
    }

    /// The first line since the mark that contains `pattern`, with its arrival time.
    pub fn find(&self, pattern: &str) -> Option<Line> {
        self.lines()
            .into_iter()
            .skip(self.cursor)
            .find(|l| l.text.contains(pattern))
    }

    /// Waits for the agent to show (since the mark) that the guest has the address QEMU's
    /// user network gives it ([`GUEST_IPV4`]), and returns the line: the forwarded ports
    /// reach the guest only from then on, which can be well after `ready` (DHCP).
    pub fn wait_reachable(&self, timeout: Duration) -> Result<String> {
        self.wait_for_network(timeout, &format!("the guest at {GUEST_IPV4}"), |addrs| {
            addrs.contains(&GUEST_IPV4)
        })
    }

    /// Waits for a `homeport: network IFACE ADDR…` line (since the mark) whose addresses
    /// satisfy `want` (`what` says what it waits for in the error) and returns it.
    pub fn wait_for_network(
        &self,
        timeout: Duration,
        what: &str,
        want: impl Fn(&[&str]) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let shown = self.lines().into_iter().skip(self.cursor).find(|l| {
                l.text
                    .split_once("homeport: network ")
                    .and_then(|(_, rest)| rest.split_once(' '))
                    .is_some_and(|(_, addrs)| want(&addrs.split_whitespace().collect::<Vec<_>>()))
            });
            if let Some(l) = shown {
                return Ok(l.text);
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for the console to show {what}\n{}",
                    self.tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a console line (since the mark) containing `pattern` and returns it. Fails
    /// at once, with the end of the console, when QEMU exits first.
    pub fn wait_for_console(&mut self, pattern: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.find(pattern) {
                return Ok(l.text);
            }
            if let Some(status) = self.try_exit_status()? {
                if let Some(c) = self.console.as_mut() {
                    c.finish();
                }
                if let Some(l) = self.find(pattern) {
                    return Ok(l.text);
                }
                bail!(
                    "QEMU exited ({status}) before the console showed {pattern:?}\n{}",
                    self.tail(60)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {pattern:?} on the console\n{}",
                    self.tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last `n` console lines and QEMU's own output, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines();
        let from = lines.len().saturating_sub(n);
        let mut s = format!("--- console (last {n} lines) ---\n");
        for l in &lines[from..] {
            s.push_str(&format!("[{:7.2}] {}\n", l.at.as_secs_f64(), l.text));
        }
        let qemu =
            std::fs::read_to_string(self.dir.path().join(format!("qemu-{}.log", self.boots)))
                .unwrap_or_default();
        if !qemu.trim().is_empty() {
            s.push_str("--- qemu ---\n");
            s.push_str(&qemu);
        }
        s
    }

    fn try_exit_status(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("QEMU is not running"),
        }
    }

    /// Whether QEMU still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.try_exit_status(), Ok(None))
    }

    /// Waits for QEMU to exit by itself (the guest powered off, or rebooted under
    /// `no_reboot`).
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status()? {
                if let Some(c) = self.console.as_mut() {
                    c.finish();
                }
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("QEMU still runs after {timeout:?}\n{}", self.tail(40));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends one command to QEMU's human monitor.
    pub fn monitor(&self, command: &str) -> Result<()> {
        let path = self.dir.path().join("monitor.sock");
        let mut s = UnixStream::connect(&path)
            .with_context(|| format!("connect to QEMU's monitor {}", path.display()))?;
        s.write_all(format!("{command}\n").as_bytes())?;
        // Read until the monitor answers with its next prompt, so the command was run.
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.windows(6).filter(|w| w == b"(qemu)").count() >= 2 {
                break;
            }
        }
        Ok(())
    }

    /// Ctrl-Alt-Del on the guest's keyboard: homeport-init gets SIGINT and reboots cleanly.
    pub fn ctrl_alt_del(&self) -> Result<()> {
        self.monitor("sendkey ctrl-alt-delete")
    }

    /// The ACPI power button.
    pub fn power_button(&self) -> Result<()> {
        self.monitor("system_powerdown")
    }

    /// Cuts the power: QEMU is killed (SIGKILL) and reaped.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            self.child = Some(c);
        }
        if let Some(c) = self.console.as_mut() {
            c.finish();
        }
    }

    /// Starts QEMU again on the same disk overlay, UEFI variables and host ports (after a
    /// power cut, a poweroff or a reboot under `no_reboot`); kills it first if it still runs.
    /// The console starts afresh.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.launch()
    }

    /// Byte ranges of the disk the guest wrote (allocated in its overlay), from
    /// `qemu-img map`. Read while QEMU runs too (`-U`).
    pub fn written_ranges(&self) -> Result<Vec<Partition>> {
        let out = Command::new("qemu-img")
            .args(["map", "-U", "--output=json"])
            .arg(self.overlay())
            .output()
            .context("run qemu-img map")?;
        if !out.status.success() {
            bail!(
                "qemu-img map failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let map: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
        Ok(map
            .iter()
            .filter(|e| e["depth"].as_u64() == Some(0) && e["data"].as_bool() == Some(true))
            .filter_map(|e| {
                Some(Partition {
                    start: e["start"].as_u64()?,
                    len: e["length"].as_u64()?,
                })
            })
            .collect())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
        // HOMEPORT_QEMU_KEEP=1 keeps the overlay, console logs and QEMU's output to look at.
        if std::env::var_os("HOMEPORT_QEMU_KEEP").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("kept the guest's files in {}", self.dir.path().display());
        }
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_lose_escapes_and_carriage_returns() {
        let check = |raw: &str, want: &str| assert_eq!(clean(raw.as_bytes()), want, "{raw:?}");
        check("plain\r\n", "plain");
        check(
            "\x1b[2m2026-11-23T10:40:37Z\x1b[0m \x1b[32m INFO\x1b[0m started\n",
            "2026-11-23T10:40:37Z  INFO started",
        );
        check(
            "\x1b[2J\x1b[01;01H\x1b[=3hBdsDxe: loading\n",
            "BdsDxe: loading",
        );
        check(
            "homeport: ready version=0.1.0.7 slot=a\n",
            "homeport: ready version=0.1.0.7 slot=a",
        );
    }
}
