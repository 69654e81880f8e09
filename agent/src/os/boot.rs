//! The boot side of A/B updates: the slots' partitions and their boot entries on the EFI
//! system partition.
//!
//! Each slot has one unified kernel image on the ESP, `EFI/Linux/homeport-<slot>.efi`.
//! systemd-boot counts boots the way it documents (Boot Loader Specification, "boot
//! counting"): an entry named `homeport-b+3.efi` has three tries left; before booting it
//! the loader renames it `homeport-b+2-1.efi`, and so on. An entry at `+0` is "bad" and
//! sorted last, so the firmware boots the other slot. Blessing an entry is renaming the
//! counter away. Among good entries the loader boots the highest `IMAGE_VERSION` (from
//! each UKI's `.osrel` section), which is why an update must carry a higher version.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// A boot slot: `a` or `b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn parse(s: &str) -> Option<Slot> {
        match s {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A slot's boot entry as found on the ESP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub slot: Slot,
    pub path: PathBuf,
    /// `None`: blessed (no counter). `Some((left, done))` while on trial.
    pub counter: Option<(u32, u32)>,
}

impl Entry {
    /// On trial: booted (or to be booted) with a counter that has not been blessed away.
    pub fn on_trial(&self) -> bool {
        self.counter.is_some()
    }
    /// The loader has given up on it.
    pub fn is_bad(&self) -> bool {
        matches!(self.counter, Some((0, _)))
    }
}

/// Parses `homeport-<slot>[+<left>[-<done>]].efi`.
pub fn parse_entry_name(name: &str) -> Option<(Slot, Option<(u32, u32)>)> {
    let stem = name.strip_prefix("homeport-")?.strip_suffix(".efi")?;
    let (slot, counter) = match stem.split_once('+') {
        None => (stem, None),
        Some((slot, c)) => {
            let (left, done) = match c.split_once('-') {
                Some((l, d)) => (l.parse().ok()?, d.parse().ok()?),
                None => (c.parse().ok()?, 0),
            };
            (slot, Some((left, done)))
        }
    };
    Some((Slot::parse(slot)?, counter))
}

/// The ESP's `EFI/Linux` folder, holding the slots' entries.
#[derive(Debug, Clone)]
pub struct Esp {
    dir: PathBuf,
}

impl Esp {
    /// `root` is where the ESP is mounted.
    pub fn new(root: &Path) -> Esp {
        Esp {
            dir: root.join("EFI").join("Linux"),
        }
    }

    pub fn entries(&self) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let e = e?;
            let name = e.file_name();
            if let Some((slot, counter)) = name.to_str().and_then(parse_entry_name) {
                out.push(Entry {
                    slot,
                    path: e.path(),
                    counter,
                });
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    pub fn entry(&self, slot: Slot) -> io::Result<Option<Entry>> {
        Ok(self.entries()?.into_iter().find(|e| e.slot == slot))
    }

    /// Removes every entry of `slot` (and leftovers of an interrupted install), so the
    /// loader cannot boot it while its partition is rewritten.
    pub fn remove(&self, slot: Slot) -> io::Result<()> {
        for e in self.entries()?.into_iter().filter(|e| e.slot == slot) {
            fs::remove_file(&e.path)?;
        }
        let tmp = self.tmp_path(slot);
        if tmp.exists() {
            fs::remove_file(&tmp)?;
        }
        sync_dir(&self.dir)
    }

    fn tmp_path(&self, slot: Slot) -> PathBuf {
        self.dir.join(format!(".homeport-{slot}.new"))
    }

    /// Installs `uki` as `slot`'s entry with `tries` boots on trial: written under a
    /// temporary name, flushed, then renamed into place (the rename is the one step that
    /// makes the slot bootable).
    pub fn install(&self, slot: Slot, uki: &mut dyn Read, tries: u32) -> io::Result<PathBuf> {
        self.remove(slot)?;
        let tmp = self.tmp_path(slot);
        let mut f = fs::File::create(&tmp)?;
        io::copy(uki, &mut f)?;
        f.flush()?;
        f.sync_all()?;
        drop(f);
        let path = self.dir.join(format!("homeport-{slot}+{tries}.efi"));
        fs::rename(&tmp, &path)?;
        sync_dir(&self.dir)?;
        Ok(path)
    }

    /// Blesses `slot`'s entry: the counter is renamed away. Returns whether it had one.
    pub fn bless(&self, slot: Slot) -> io::Result<bool> {
        let Some(e) = self.entry(slot)? else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("slot {slot} has no boot entry in {}", self.dir.display()),
            ));
        };
        if !e.on_trial() {
            return Ok(false);
        }
        fs::rename(&e.path, self.dir.join(format!("homeport-{slot}.efi")))?;
        sync_dir(&self.dir)?;
        Ok(true)
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// `IMAGE_VERSION` from a unified kernel image's `.osrel` section.
pub fn uki_image_version(path: &Path) -> io::Result<Option<String>> {
    let mut f = fs::File::open(path)?;
    let Some(osrel) = pe_section(&mut f, ".osrel")? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&osrel);
    Ok(text.lines().find_map(|l| {
        let v = l.trim().strip_prefix("IMAGE_VERSION=")?;
        Some(v.trim_matches('"').to_string())
    }))
}

/// The bytes of a PE file's section by name (at most 64 KiB: `.osrel` is small).
fn pe_section(f: &mut fs::File, want: &str) -> io::Result<Option<Vec<u8>>> {
    let bad =
        |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("not a PE file: {what}"));
    let u32_at = |f: &mut fs::File, off: u64| -> io::Result<u32> {
        let mut b = [0u8; 4];
        f.seek(SeekFrom::Start(off))?;
        f.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    };
    let pe = u64::from(u32_at(f, 0x3c)?);
    if u32_at(f, pe)? != 0x0000_4550 {
        return Err(bad("no PE signature"));
    }
    let mut coff = [0u8; 20];
    f.seek(SeekFrom::Start(pe + 4))?;
    f.read_exact(&mut coff)?;
    let sections = u16::from_le_bytes([coff[2], coff[3]]);
    let opt_size = u64::from(u16::from_le_bytes([coff[16], coff[17]]));
    let table = pe + 24 + opt_size;
    for i in 0..u64::from(sections.min(96)) {
        let mut h = [0u8; 40];
        f.seek(SeekFrom::Start(table + i * 40))?;
        f.read_exact(&mut h)?;
        let name_len = h[..8].iter().position(|&b| b == 0).unwrap_or(8);
        if &h[..name_len] != want.as_bytes() {
            continue;
        }
        let virt = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        let raw = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
        let at = u32::from_le_bytes([h[20], h[21], h[22], h[23]]);
        let len = virt.min(raw).min(64 * 1024) as usize;
        let mut out = vec![0u8; len];
        f.seek(SeekFrom::Start(u64::from(at)))?;
        f.read_exact(&mut out)?;
        return Ok(Some(out));
    }
    Ok(None)
}

/// The block device of the partition whose GPT name is `label` (from sysfs: the device has
/// no udev, so no `/dev/disk/by-partlabel`).
pub fn partition_by_label(sys_class_block: &Path, label: &str) -> io::Result<Option<PathBuf>> {
    for e in fs::read_dir(sys_class_block)? {
        let e = e?;
        let Ok(uevent) = fs::read_to_string(e.path().join("uevent")) else {
            continue;
        };
        let field = |k: &str| {
            uevent
                .lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
        };
        if field("PARTNAME") == Some(label) {
            if let Some(dev) = field("DEVNAME") {
                return Ok(Some(Path::new("/dev").join(dev)));
            }
        }
    }
    Ok(None)
}

/// Size in bytes of a file or block device.
pub fn device_size(path: &Path) -> io::Result<u64> {
    let mut f = fs::File::open(path)?;
    f.seek(SeekFrom::End(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_carry_slot_and_counter() {
        assert_eq!(parse_entry_name("homeport-a.efi"), Some((Slot::A, None)));
        assert_eq!(
            parse_entry_name("homeport-b+3.efi"),
            Some((Slot::B, Some((3, 0))))
        );
        assert_eq!(
            parse_entry_name("homeport-b+2-1.efi"),
            Some((Slot::B, Some((2, 1))))
        );
        assert_eq!(
            parse_entry_name("homeport-b+0-3.efi"),
            Some((Slot::B, Some((0, 3))))
        );
        for bad in [
            "homeport-c.efi",
            "homeport-a.EFI",
            "homeport-a+x.efi",
            "other-a.efi",
            ".homeport-a.new",
            "homeport-a+1-.efi",
        ] {
            assert_eq!(parse_entry_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn install_bless_and_remove_entries() {
        let dir = tempfile::tempdir().unwrap();
        let esp = Esp::new(dir.path());
        fs::create_dir_all(dir.path().join("EFI/Linux")).unwrap();
        fs::write(dir.path().join("EFI/Linux/homeport-a.efi"), b"A").unwrap();
        fs::write(dir.path().join("EFI/Linux/homeport-b+0-3.efi"), b"old b").unwrap();
        let p = esp.install(Slot::B, &mut &b"new b"[..], 3).unwrap();
        assert_eq!(p.file_name().unwrap(), "homeport-b+3.efi");
        let names: Vec<_> = esp
            .entries()
            .unwrap()
            .iter()
            .map(|e| e.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["homeport-a.efi", "homeport-b+3.efi"]);
        let b = esp.entry(Slot::B).unwrap().unwrap();
        assert!(b.on_trial() && !b.is_bad());
        // The loader's own rename, then ours.
        fs::rename(&b.path, dir.path().join("EFI/Linux/homeport-b+2-1.efi")).unwrap();
        assert!(esp.bless(Slot::B).unwrap());
        assert!(!esp.bless(Slot::B).unwrap(), "blessed once");
        assert_eq!(
            fs::read(dir.path().join("EFI/Linux/homeport-b.efi")).unwrap(),
            b"new b"
        );
        esp.remove(Slot::A).unwrap();
        assert_eq!(esp.entry(Slot::A).unwrap(), None);
        assert!(esp
            .bless(Slot::A)
            .unwrap_err()
            .to_string()
            .contains("no boot entry"));
    }

    #[test]
    fn partitions_are_found_by_gpt_name() {
        let dir = tempfile::tempdir().unwrap();
        for (dev, uevent) in [
            ("vda", "MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n"),
            (
                "vda3",
                "MAJOR=254\nMINOR=3\nDEVNAME=vda3\nDEVTYPE=partition\nPARTN=3\nPARTNAME=root-b\n",
            ),
        ] {
            fs::create_dir(dir.path().join(dev)).unwrap();
            fs::write(dir.path().join(dev).join("uevent"), uevent).unwrap();
        }
        assert_eq!(
            partition_by_label(dir.path(), "root-b").unwrap(),
            Some(PathBuf::from("/dev/vda3"))
        );
        assert_eq!(partition_by_label(dir.path(), "root-c").unwrap(), None);
    }
}
