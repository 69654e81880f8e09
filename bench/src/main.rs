//! Homeport's benchmarks, each against the tool a user would otherwise use, in the same run.
//! Figures go to `target/bench/NAME.json` and to stdout. Not tests: nothing here fails for
//! being slow.
//!
//! `homeport-bench [start|pull|memory|network|throughput|proxy|services|all] [--bin-dir target/release]`
//!
//! `homeport-bench image [--boots N] [--no-build] [--no-cold]`: the appliance image (sizes,
//! build and TCG boot times); not part of `all`, see [`image`].
//!
//! `homeport-bench os-update`: a signed A/B update under QEMU (download size, slot write,
//! downtime); not part of `all`, see [`os_update`].

mod image;
mod os_update;
mod proxy;
mod services;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use homeport::api::client::Client;
use homeport::api::types::{AppSummary, RunState};
use homeport_testkit::{AgentOpts, AgentProcess, BusyboxOpts, Registry};
use serde_json::json;

fn main() -> Result<()> {
    let mut which = "all".to_string();
    let mut bin_dir = PathBuf::from("target/release");
    let mut image_opts = image::Opts::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bin-dir" => bin_dir = args.next().context("--bin-dir needs a path")?.into(),
            "--boots" => {
                image_opts.boots = args
                    .next()
                    .context("--boots needs a number")?
                    .parse()
                    .context("--boots needs a number")?
            }
            "--no-build" => image_opts.build = false,
            "--no-cold" => image_opts.cold = false,
            "--image-dir" => {
                image_opts.image_dir = Some(args.next().context("--image-dir needs a path")?.into())
            }
            "start" | "pull" | "memory" | "network" | "throughput" | "proxy" | "services"
            | "image" | "os-update" | "all" => which = a,
            other => bail!("unknown argument {other:?}"),
        }
    }
    if which == "os-update" {
        return os_update::os_update();
    }
    if which == "image" {
        // Boots the built image; needs no agent binaries here.
        return image::image(&image_opts);
    }
    let bins = std::fs::canonicalize(&bin_dir)
        .with_context(|| format!("{} (build with --release)", bin_dir.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if which == "start" || which == "all" {
        rt.block_on(start_latency(&bins))?;
    }
    if which == "pull" || which == "all" {
        rt.block_on(pull(&bins))?;
    }
    if which == "memory" || which == "all" {
        rt.block_on(memory(&bins))?;
    }
    if which == "network" || which == "all" {
        network()?;
    }
    if which == "throughput" || which == "all" {
        throughput()?;
    }
    if which == "proxy" || which == "all" {
        rt.block_on(proxy::proxy(&bins))?;
    }
    if which == "services" || which == "all" {
        rt.block_on(services::services(&bins))?;
    }
    Ok(())
}

fn report(name: &str, value: serde_json::Value) -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    let text = serde_json::to_string_pretty(&value)?;
    std::fs::write(dir.join(format!("{name}.json")), &text)?;
    println!("{name}: {text}");
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs a command to completion. Its stdout is discarded and stderr goes to a file, so a
/// detached container that inherits them does not keep us waiting.
fn run(cmd: &mut Command) -> Result<()> {
    let err = tempfile::tempfile()?;
    let status = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(err.try_clone()?)
        .status()
        .with_context(|| format!("run {:?}", cmd.get_program()))?;
    if !status.success() {
        let mut msg = String::new();
        let mut err = err;
        use std::io::{Read, Seek};
        err.rewind()?;
        err.read_to_string(&mut msg)?;
        bail!("{cmd:?} failed: {msg}");
    }
    Ok(())
}

fn agent(bins: &Path, reg: &Registry) -> Result<AgentProcess> {
    AgentProcess::start(
        &bins.join("homeportd"),
        AgentOpts {
            insecure_registries: vec![reg.host()],
            stop_grace_secs: 1,
            ..Default::default()
        },
    )
}

/// Start request → the app's process running, Homeport's API against `crun run --detach`
/// of the same bundle.
async fn start_latency(bins: &Path) -> Result<()> {
    const RUNS: usize = 15;
    let reg = Registry::start()?;
    homeport_testkit::push_busybox(&reg, "bench", "1", &BusyboxOpts::default())?;
    let a = agent(bins, &reg)?;
    let c = a.client();
    let m = format!(
        "name = \"lat\"\nimage = \"{}/bench:1\"\ncommand = [\"/bin/sleep\", \"3600\"]\n",
        reg.host()
    );
    c.install(&m, |_| {}).await?;
    let mut ours = Vec::new();
    for _ in 0..RUNS {
        c.post::<AppSummary, _>("/v1/apps/lat/stop", &()).await?;
        let t = Instant::now();
        let s: AppSummary = c.post("/v1/apps/lat/start", &()).await?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        match s.run {
            RunState::Running { pid, .. } if Path::new(&format!("/proc/{pid}")).exists() => {
                ours.push(ms)
            }
            other => bail!("start did not run the app: {other:?}"),
        }
    }
    c.post::<AppSummary, _>("/v1/apps/lat/stop", &()).await?;

    // crun on the very bundle the agent wrote (own cgroup path and state root).
    let work = tempfile::tempdir()?;
    let bundle = work.path().join("bundle");
    std::fs::create_dir_all(&bundle)?;
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(
        a.data_dir().join("apps/lat/bundle/config.json"),
    )?)?;
    spec["linux"]["cgroupsPath"] = json!("/homeport-bench-crun/lat");
    std::fs::write(bundle.join("config.json"), serde_json::to_vec(&spec)?)?;
    let root = work.path().join("state");
    // crun 1.8 refuses a hybrid cgroup layout whose v2 hierarchy holds controllers (our
    // machines' holds an unused hugetlb): bind those to v1 hierarchies of their own for the run.
    let bound = bind_v2_controllers_to_v1()?;
    let crun_cgroups = "--cgroup-manager=cgroupfs";
    let mut theirs = Vec::new();
    for i in 0..RUNS {
        let id = format!("crun-lat-{i}");
        let t = Instant::now();
        run(Command::new("crun")
            .arg("--root")
            .arg(&root)
            .arg(crun_cgroups)
            .args(["run", "--detach", "--bundle"])
            .arg(&bundle)
            .arg(&id))?;
        theirs.push(t.elapsed().as_secs_f64() * 1000.0);
        run(Command::new("crun")
            .arg("--root")
            .arg(&root)
            .args(["delete", "--force", &id]))?;
    }
    for c in homeport_testkit::cgroup_controllers() {
        let _ = std::fs::remove_dir(
            Path::new("/sys/fs/cgroup")
                .join(c)
                .join("homeport-bench-crun"),
        );
    }
    let (o, t) = (median(ours.clone()), median(theirs.clone()));
    report(
        "start_latency",
        json!({
            "what": "start request -> app process running, median ms",
            "runs": RUNS,
            "homeport_ms": o, "crun_ms": t, "ratio_vs_crun": o / t, "target_ratio": 1.0,
            "homeport_all_ms": ours, "crun_all_ms": theirs,
            "cgroup_setup": if bound.is_empty() { "as found".to_string() } else { format!("bound {} from cgroup2 to v1 for crun", bound.join(",")) },
        }),
    )
}

/// In a hybrid layout, moves controllers the (unused) v2 hierarchy holds to v1 mounts; returns
/// the controllers it moved. The mounts stay: unmounting does not hand a controller back.
fn bind_v2_controllers_to_v1() -> Result<Vec<String>> {
    let Ok(list) = std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers") else {
        return Ok(Vec::new());
    };
    let mut bound = Vec::new();
    for c in list.split_whitespace() {
        let dir = Path::new("/sys/fs/cgroup").join(c);
        std::fs::create_dir_all(&dir)?;
        run(Command::new("mount")
            .args(["-t", "cgroup", "-o", c, "cgroup"])
            .arg(&dir))?;
        bound.push(c.to_string());
    }
    Ok(bound)
}

/// Pull + unpack of a multi-layer image from the local registry: Homeport's image store
/// against `skopeo copy` + `umoci unpack`.
async fn pull(bins: &Path) -> Result<()> {
    const RUNS: usize = 5;
    let reg = Registry::start()?;
    let mut layout = homeport_testkit::OciLayout::new()?;
    let mut layers = vec![homeport_testkit::busybox_layer()?];
    // Four more layers: compressible text and incompressible data, many files, ~60 MiB unpacked.
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for l in 0..4 {
        let mut b = homeport_testkit::LayerBuilder::new();
        for f in 0..400 {
            let mut data = vec![0u8; 32 << 10];
            for (i, byte) in data.iter_mut().enumerate() {
                if f % 2 == 0 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *byte = x as u8;
                } else {
                    *byte = b"homeport benchmark text\n"[i % 24];
                }
            }
            b.file(&format!("data{l}/dir{}/file{f}", f % 20), 0o644, &data)?;
        }
        layers.push(b.into_layer()?);
    }
    let config = homeport_testkit::ImageConfig::default();
    let desc = layout.add_image(&layers, &config)?;
    layout.tag("1", &desc)?;
    homeport_testkit::push_layout(&reg, layout.path(), "bench/big", "1", &Default::default())?;

    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..RUNS {
        // Homeport: a fresh agent each time (empty store); time the install's pull via the API
        // progress: from the request to the last layer done.
        let a = agent(bins, &reg)?;
        let c = a.client();
        let m = format!(
            "name = \"big\"\nimage = \"{}/bench/big:1\"\ncommand = [\"/bin/sleep\", \"1\"]\n",
            reg.host()
        );
        let t = Instant::now();
        let mut pulled = None;
        let mut done = 0;
        c.install(&m, |p| {
            if let homeport::api::types::Progress::LayerDone { .. } = p {
                done += 1;
                if done == layers.len() {
                    pulled = Some(t.elapsed());
                }
            }
        })
        .await?;
        ours.push(pulled.context("no pull progress")?.as_secs_f64() * 1000.0);
        drop(a);

        let work = tempfile::tempdir()?;
        let oci = work.path().join("oci");
        let t = Instant::now();
        run(Command::new("skopeo")
            .args([
                "copy",
                "--insecure-policy",
                "--src-tls-verify=false",
                "--src-no-creds",
            ])
            .arg(format!("docker://{}/bench/big:1", reg.host()))
            .arg(format!("oci:{}:1", oci.display())))?;
        run(Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:1", oci.display()))
            .arg(work.path().join("bundle")))?;
        theirs.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let (o, t) = (median(ours.clone()), median(theirs.clone()));
    report(
        "pull",
        json!({
            "what": "pull + unpack of a 5-layer image (~60 MiB unpacked, 1600 files) from a local registry, median ms",
            "runs": RUNS,
            "homeport_ms": o, "skopeo_umoci_ms": t, "ratio_vs_skopeo_umoci": o / t, "target_ratio": 0.5,
            "homeport_all_ms": ours, "skopeo_umoci_all_ms": theirs,
        }),
    )
}

/// A device network of its own for a benchmark (a random prefix: no clash with agents).
fn device_network() -> Result<homeport::net::Network> {
    use homeport::net::{Network, Ula48};
    let ula = Ula48::random();
    Ok(Network::new(
        ula,
        Network::choose_net4(&ula)?,
        "/etc/resolv.conf".into(),
        Vec::new(),
    ))
}

/// Removes what `device_network` brought up: the bridge and the firewall table.
fn remove_device_network(net: &homeport::net::Network) {
    let _ = Command::new("ip")
        .args(["link", "del", net.bridge()])
        .status();
    let _ = Command::new("nft")
        .args(["delete", "table", "inet", net.table()])
        .status();
}

/// Time to wire an app's network (a new namespace with loopback up, a veth pair on the
/// bridge, eth0 with its addresses, the default routes, and the firewall updated for it), for
/// 100 apps in a row: the median, and the figures at 1, 50 and 100 apps installed (the
/// per-app cost must not grow).
fn network() -> Result<()> {
    use homeport::manifest::{Access, AppName, Port, Protocol};
    use homeport::net::AppRules;
    const APPS: usize = 100;
    let net = device_network()?;
    net.up(&[])?;
    let dir = tempfile::tempdir()?;
    let mut times = Vec::new();
    let mut rules = Vec::new();
    let mut result = Ok(());
    for i in 0..APPS {
        let app = AppName::try_from(format!("bench{i}").as_str())?;
        let ns = dir.path().join(format!("ns{i}"));
        let host = i as u32 + 2;
        rules.push(AppRules {
            v6: net.app_address(&app),
            v4: net.app_ipv4(host),
            https: Some(8080),
            ports: vec![Port {
                port: 10_000 + i as u16,
                protocol: Protocol::Udp,
                access: Access::Public,
            }],
        });
        let t = Instant::now();
        let r = homeport::runtime::os::create_netns(&ns)
            .map_err(anyhow::Error::from)
            .and_then(|()| Ok(net.wire_app(&app, host, &ns)?))
            .and_then(|()| Ok(net.update_rules(&rules)?));
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        if let Err(e) = r {
            result = Err(e);
            break;
        }
    }
    for i in 0..APPS {
        if let Ok(app) = AppName::try_from(format!("bench{i}").as_str()) {
            let _ = net.unwire_app(&app);
        }
        let _ = homeport::runtime::os::unmount(&dir.path().join(format!("ns{i}")));
    }
    remove_device_network(&net);
    result?;
    let at = |n: usize| times[n - 1];
    report(
        "network",
        json!({
            "what": "time to wire one app's network: namespace, veth on the bridge, IPv6 and IPv4 addresses (no DAD), default routes, firewall sets updated; ms",
            "apps": APPS,
            "median_ms": median(times.clone()), "target_ms": 20.0,
            "at_1_app_ms": at(1), "at_50_apps_ms": at(50), "at_100_apps_ms": at(100),
            "median_first_10_ms": median(times[..10].to_vec()), "median_last_10_ms": median(times[APPS - 10..].to_vec()),
            "all_ms": times,
        }),
    )
}

/// TCP throughput from the device (where the proxy runs) to an app over its veth and the
/// bridge, through the firewall, against the same over loopback: iperf3, alternating runs.
fn throughput() -> Result<()> {
    use homeport::manifest::AppName;
    use homeport::net::AppRules;
    const RUNS: usize = 3;
    const SECS: &str = "3";
    let net = device_network()?;
    let app = AppName::try_from("iperf")?;
    let rules = [AppRules {
        v6: net.app_address(&app),
        v4: net.app_ipv4(2),
        https: Some(5201),
        ports: Vec::new(),
    }];
    net.up(&rules)?;
    let dir = tempfile::tempdir()?;
    let ns = dir.path().join("ns");
    let result = (|| -> Result<serde_json::Value> {
        homeport::runtime::os::create_netns(&ns)?;
        net.wire_app(&app, 2, &ns)?;
        let server = |netns: Option<&Path>, port: &str| -> Result<std::process::Child> {
            let mut cmd = match netns {
                Some(p) => {
                    let mut c = Command::new("nsenter");
                    c.arg(format!("--net={}", p.display())).arg("iperf3");
                    c
                }
                None => Command::new("iperf3"),
            };
            let child = cmd
                .args(["-s", "-p", port])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("start iperf3 (apt install iperf3)")?;
            std::thread::sleep(Duration::from_millis(300));
            Ok(child)
        };
        let client = |addr: &str, port: &str| -> Result<f64> {
            let out = Command::new("iperf3")
                .args(["-c", addr, "-p", port, "-t", SECS, "-J"])
                .output()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
                format!("iperf3 to {addr}: {}", String::from_utf8_lossy(&out.stderr))
            })?;
            v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .map(|b| b / 1e9)
                .with_context(|| format!("iperf3 to {addr}: {v}"))
        };
        let mut app_server = server(Some(&ns), "5201")?;
        let mut lo_server = server(None, "5202")?;
        let (mut veth, mut lo) = (Vec::new(), Vec::new());
        let app_addr = net.app_address(&app).to_string();
        let measured = (|| -> Result<()> {
            for _ in 0..RUNS {
                veth.push(client(&app_addr, "5201")?);
                lo.push(client("::1", "5202")?);
            }
            Ok(())
        })();
        for s in [&mut app_server, &mut lo_server] {
            let _ = s.kill();
            let _ = s.wait();
        }
        measured?;
        let (v, l) = (median(veth.clone()), median(lo.clone()));
        Ok(json!({
            "what": "TCP throughput device -> app over veth + bridge + firewall vs loopback, iperf3, median Gbit/s",
            "runs": RUNS, "seconds_each": SECS,
            "veth_gbps": v, "loopback_gbps": l, "ratio_vs_loopback": v / l, "target_ratio": 0.9,
            "veth_all_gbps": veth, "loopback_all_gbps": lo,
        }))
    })();
    let _ = net.unwire_app(&app);
    let _ = homeport::runtime::os::unmount(&ns);
    remove_device_network(&net);
    report("throughput", result?)
}

/// A `kB` field of a /proc file (`VmRSS` in status, `Pss` in smaps_rollup).
fn proc_kib(pid: u32, file: &str, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| {
            v.trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("no {field} in /proc/{pid}/{file}"))
}

fn rss_kib(pid: u32) -> Result<u64> {
    proc_kib(pid, "status", "VmRSS")
}

/// Resident memory of the idle agent with 5 apps installed and running.
async fn memory(bins: &Path) -> Result<()> {
    let reg = Registry::start()?;
    homeport_testkit::push_busybox(&reg, "bench", "1", &BusyboxOpts::default())?;
    let a = agent(bins, &reg)?;
    let c: Client = a.client();
    for i in 0..5 {
        let m = format!("name = \"app{i}\"\nimage = \"{}/bench:1\"\n", reg.host());
        c.install(&m, |_| {}).await?;
    }
    // Let it settle: supervisors idle, log checks ticking.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let info: homeport::api::types::AgentInfo = c.get("/v1/info").await?;
    let agent_kib = rss_kib(info.pid)?;
    let zygote_kib = rss_kib(info.zygote_pid)?;
    // PSS splits pages the two processes share (the same executable) between them.
    let pss = proc_kib(info.pid, "smaps_rollup", "Pss")?
        + proc_kib(info.zygote_pid, "smaps_rollup", "Pss")?;
    report(
        "memory",
        json!({
            "what": "resident memory (VmRSS) of the idle agent with 5 apps installed and running",
            "agent_mib": agent_kib as f64 / 1024.0,
            "zygote_mib": zygote_kib as f64 / 1024.0,
            "total_rss_mib": (agent_kib + zygote_kib) as f64 / 1024.0,
            "total_pss_mib": pss as f64 / 1024.0,
            "target_agent_mib": 20.0,
        }),
    )
}
