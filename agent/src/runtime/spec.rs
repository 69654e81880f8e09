//! The OCI runtime spec of an app, built from its image config and manifest. Pure: no I/O.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::manifest::Resources;

/// The part of an OCI image config that decides how the process runs.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct ImageProcess {
    #[serde(rename = "User", default)]
    pub user: Option<String>,
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
}

impl ImageProcess {
    /// Reads `config` out of an image config blob.
    pub fn from_image_config(bytes: &[u8]) -> Result<ImageProcess, serde_json::Error> {
        #[derive(Deserialize)]
        struct Outer {
            #[serde(default)]
            config: Option<ImageProcess>,
        }
        Ok(serde_json::from_slice::<Outer>(bytes)?
            .config
            .unwrap_or_default())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

pub struct SpecInput {
    pub hostname: String,
    pub rootfs: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: User,
    /// (host path, container path), mounted read-write.
    pub volumes: Vec<(PathBuf, String)>,
    /// Read-only bind mounts of single files (host path, container path): /etc/hosts, …
    pub files: Vec<(PathBuf, String)>,
    /// A network namespace prepared by the agent (`None`: a fresh, unconnected one).
    pub netns: Option<PathBuf>,
    pub cgroups_path: String,
    pub resources: Resources,
    /// RLIMIT_NOFILE (soft and hard) for the app.
    pub nofile: u64,
}

/// Capabilities every app keeps: enough for ordinary servers to drop privileges, bind low
/// ports and own their files. Left out of Docker's default: NET_RAW, MKNOD, SETFCAP.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_AUDIT_WRITE",
];

const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Syscalls refused with EPERM: the ones Docker's default profile leaves out that an
/// unprivileged app never needs and that widen the kernel's attack surface (module loading,
/// kexec, keyrings, bpf, perf, userfaultfd, handle-based opens, clock and swap changes, …).
/// A deny list rather than Docker's 300-entry allow list: new syscalls keep working, and the
/// dangerous ones are also behind capabilities we drop.
pub const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "syslog",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

const CPU_PERIOD: u64 = 100_000;

/// The only syscall ABI apps may use. A deny list is only as good as its architectures: a
/// syscall through another ABI (32-bit `int 0x80` on x86_64) would miss the rules, so other
/// ABIs are not listed and libseccomp kills such calls (its default for a foreign arch).
#[cfg(target_arch = "x86_64")]
const NATIVE_ARCH: &str = "SCMP_ARCH_X86_64";
#[cfg(target_arch = "aarch64")]
const NATIVE_ARCH: &str = "SCMP_ARCH_AARCH64";
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const NATIVE_ARCH: &str = "SCMP_ARCH_NATIVE";

fn seccomp<'a>(denied: impl Iterator<Item = &'a str>) -> Value {
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": [NATIVE_ARCH],
        "syscalls": [{"names": denied.collect::<Vec<_>>(), "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM}],
    })
}

/// The profile for processes started by `exec`: the app's, except `setns`, which joining the
/// app's namespaces needs (the profile is loaded before that join). Without CAP_SYS_ADMIN the
/// process itself cannot use `setns` anyway.
pub fn exec_seccomp() -> Value {
    seccomp(DENIED_SYSCALLS.iter().copied().filter(|s| *s != "setns"))
}

pub fn build(input: &SpecInput) -> Value {
    let caps: Vec<&str> = DEFAULT_CAPS.to_vec();
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=755", "size=16384k"]}),
    ];
    for (host, dest) in &input.volumes {
        mounts.push(json!({"destination": dest, "type": "bind", "source": host, "options": ["rbind", "rw", "nosuid", "nodev"]}));
    }
    for (host, dest) in &input.files {
        mounts.push(json!({"destination": dest, "type": "bind", "source": host, "options": ["bind", "ro", "nosuid", "nodev", "noexec"]}));
    }
    let mut network = json!({"type": "network"});
    if let Some(ns) = &input.netns {
        network["path"] = json!(ns);
    }
    let r = &input.resources;
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": input.user.uid, "gid": input.user.gid, "additionalGids": input.user.additional_gids},
            "args": input.args,
            "env": input.env,
            "cwd": input.cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": input.nofile, "soft": input.nofile}],
            "noNewPrivileges": true,
        },
        "root": {"path": input.rootfs, "readonly": true},
        "hostname": input.hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, network],
            "cgroupsPath": input.cgroups_path,
            "resources": {
                "devices": [{"allow": false, "access": "rwm"}],
                "memory": {"limit": r.memory_bytes},
                "cpu": {"quota": (r.cpus * CPU_PERIOD as f64) as i64, "period": CPU_PERIOD},
                "pids": {"limit": r.pids},
            },
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
            "seccomp": seccomp(DENIED_SYSCALLS.iter().copied()),
        },
    })
}

/// Where apps find CA certificates (Debian, Ubuntu, Alpine and OpenSSL's default build); the
/// agent mounts the image's bundle plus the device CA there.
pub const TRUST_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Paths the spec mounts something on (or runs in), which must exist in the rootfs: the
/// fixed mounts, volumes, bind-mounted files (`true`: a file) and the working directory.
pub fn mount_points(
    manifest: &crate::manifest::Manifest,
    image: &ImageProcess,
) -> Vec<(String, bool)> {
    let mut v: Vec<(String, bool)> = ["/proc", "/dev", "/sys", "/tmp", "/run"]
        .iter()
        .map(|p| (p.to_string(), false))
        .collect();
    v.extend(manifest.volumes.iter().map(|vol| (vol.path.clone(), false)));
    v.push(("/etc/hosts".into(), true));
    v.push(("/etc/resolv.conf".into(), true));
    v.push((TRUST_BUNDLE.into(), true));
    if let Some(w) = image.working_dir.as_deref().filter(|w| w.starts_with('/')) {
        v.push((w.to_string(), false));
    }
    v
}

/// Command line: the manifest's `command` replaces the image's `Cmd`; `Entrypoint` stays.
pub fn args(image: &ImageProcess, command: Option<&[String]>) -> Vec<String> {
    let mut args = image.entrypoint.clone().unwrap_or_default();
    match command {
        Some(c) => args.extend(c.iter().cloned()),
        None => args.extend(image.cmd.clone().unwrap_or_default()),
    }
    args
}

/// Environment: the image's, then the manifest's (overriding by name); PATH if none.
pub fn env<'a>(
    image: &ImageProcess,
    extra: impl IntoIterator<Item = (&'a String, &'a String)>,
    hostname: &str,
) -> Vec<String> {
    let mut env: Vec<String> = image.env.clone().unwrap_or_default();
    let mut set = |k: &str, v: &str| {
        let prefix = format!("{k}=");
        env.retain(|e| !e.starts_with(&prefix));
        env.push(format!("{k}={v}"));
    };
    for (k, v) in extra {
        set(k, v);
    }
    set("HOSTNAME", hostname);
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    env
}

/// Resolves an image's `User` ("", "uid", "uid:gid", "name", "name:group") against the
/// image's /etc/passwd and /etc/group contents.
pub fn resolve_user(spec: Option<&str>, passwd: &str, group: &str) -> Result<User, String> {
    let spec = spec.unwrap_or("").trim();
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let u = if u.is_empty() { "0" } else { u };
    let passwd_entry = |f: &dyn Fn(&[&str]) -> bool| {
        passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|p| p.len() >= 4 && f(p))
    };
    let (uid, name, primary) = match u.parse::<u32>() {
        Ok(uid) => {
            let e = passwd_entry(&|p| p[2] == u);
            (
                uid,
                e.as_ref().map(|p| p[0].to_string()),
                e.and_then(|p| p[3].parse().ok()),
            )
        }
        Err(_) => {
            let e = passwd_entry(&|p| p[0] == u)
                .ok_or_else(|| format!("user {u:?} is not in the image's /etc/passwd"))?;
            let uid = e[2]
                .parse()
                .map_err(|_| format!("user {u:?} has an invalid uid in /etc/passwd"))?;
            (uid, Some(u.to_string()), e[3].parse().ok())
        }
    };
    let groups: Vec<Vec<&str>> = group
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|g| g.len() >= 3)
        .collect();
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|e| e[0] == g)
                .and_then(|e| e[2].parse().ok())
                .ok_or_else(|| format!("group {g:?} is not in the image's /etc/group"))?,
        },
        None => primary.unwrap_or(0),
    };
    let mut additional_gids = Vec::new();
    if let Some(name) = name {
        for e in &groups {
            if e.len() >= 4 && e[3].split(',').any(|m| m == name) {
                if let Ok(id) = e[2].parse::<u32>() {
                    if id != gid && !additional_gids.contains(&id) {
                        additional_gids.push(id);
                    }
                }
            }
        }
    }
    Ok(User {
        uid,
        gid,
        additional_gids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nwww:x:33:33:www:/var/www:/bin/false\n";
    const GROUP: &str = "root:x:0:\nwww:x:33:\nmedia:x:44:www,root\n";

    #[test]
    fn users() {
        let check = |spec: Option<&str>, expected: Result<(u32, u32, Vec<u32>), &str>| {
            let got = resolve_user(spec, PASSWD, GROUP).map(|u| (u.uid, u.gid, u.additional_gids));
            match expected {
                Ok(e) => assert_eq!(got, Ok(e), "{spec:?}"),
                Err(needle) => assert!(
                    got.as_ref().is_err_and(|m| m.contains(needle)),
                    "{spec:?}: {got:?}"
                ),
            }
        };
        check(None, Ok((0, 0, vec![44])));
        check(Some(""), Ok((0, 0, vec![44])));
        check(Some("www"), Ok((33, 33, vec![44])));
        check(Some("33"), Ok((33, 33, vec![44])));
        check(Some("1000"), Ok((1000, 0, vec![])));
        check(Some("1000:1000"), Ok((1000, 1000, vec![])));
        check(Some("www:media"), Ok((33, 44, vec![])));
        check(
            Some("nobody"),
            Err("\"nobody\" is not in the image's /etc/passwd"),
        );
        check(Some("www:nogroup"), Err("group \"nogroup\""));
    }

    #[test]
    fn args_follow_docker_rules() {
        let img = ImageProcess {
            entrypoint: Some(vec!["/entry".into()]),
            cmd: Some(vec!["serve".into()]),
            ..Default::default()
        };
        assert_eq!(args(&img, None), ["/entry", "serve"]);
        assert_eq!(
            args(&img, Some(&["other".to_string()])),
            ["/entry", "other"]
        );
        let img = ImageProcess {
            cmd: Some(vec!["/bin/httpd".into()]),
            ..Default::default()
        };
        assert_eq!(args(&img, Some(&["/bin/sh".to_string()])), ["/bin/sh"]);
    }

    #[test]
    fn env_overrides_and_defaults_path() {
        let img = ImageProcess {
            env: Some(vec!["A=1".into(), "B=2".into()]),
            ..Default::default()
        };
        let extra = [("B".to_string(), "3".to_string())];
        let e = env(&img, extra.iter().map(|(k, v)| (k, v)), "app");
        assert_eq!(e[0], "A=1");
        assert!(e.contains(&"B=3".to_string()) && !e.contains(&"B=2".to_string()));
        assert!(e.contains(&"HOSTNAME=app".to_string()));
        assert!(e.iter().any(|v| v.starts_with("PATH=")));
    }

    #[test]
    fn spec_is_valid_oci_and_locked_down() {
        let input = SpecInput {
            hostname: "hello".into(),
            rootfs: PathBuf::from("/data/apps/hello/rootfs"),
            args: vec!["/bin/httpd".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            user: User {
                uid: 33,
                gid: 33,
                additional_gids: vec![],
            },
            volumes: vec![(PathBuf::from("/data/volumes/hello/www"), "/www".into())],
            files: vec![],
            netns: Some(PathBuf::from("/data/run/netns/hello")),
            cgroups_path: "/homeport/hello".into(),
            resources: Resources {
                memory_bytes: 64 << 20,
                cpus: 0.5,
                pids: 64,
            },
            nofile: 4096,
        };
        let v = build(&input);
        let spec: oci_spec::runtime::Spec = serde_json::from_value(v.clone()).unwrap();
        let root = spec.root().as_ref().unwrap();
        assert_eq!(root.readonly(), Some(true));
        let process = spec.process().as_ref().unwrap();
        assert_eq!(process.no_new_privileges(), Some(true));
        let bounding = process
            .capabilities()
            .as_ref()
            .unwrap()
            .bounding()
            .as_ref()
            .unwrap();
        assert_eq!(bounding.len(), DEFAULT_CAPS.len());
        assert!(!bounding.contains(&oci_spec::runtime::Capability::SysAdmin));
        let linux = spec.linux().as_ref().unwrap();
        let res = linux.resources().as_ref().unwrap();
        assert_eq!(res.memory().as_ref().unwrap().limit(), Some(64 << 20));
        assert_eq!(res.cpu().as_ref().unwrap().quota(), Some(50_000));
        assert_eq!(res.pids().as_ref().unwrap().limit(), 64);
        let ns: Vec<String> = linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| format!("{:?}", n.typ()))
            .collect();
        for t in ["Pid", "Mount", "Uts", "Ipc", "Network"] {
            assert!(ns.contains(&t.to_string()), "{ns:?}");
        }
        assert!(linux
            .masked_paths()
            .as_ref()
            .unwrap()
            .contains(&"/proc/kcore".to_string()));
        assert!(linux.seccomp().is_some());
        assert!(spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.destination() == std::path::Path::new("/www")));
    }
}
