//! Apps run for real: install from a real registry, serve, crash and restart, stop, survive
//! agent restarts, exec/debug, and are removed without leftovers. Needs root.

#![allow(clippy::unwrap_used)] // tests may unwrap what they just built

mod common;

use std::time::Duration;

use anyhow::Result;
use common::*;
use homeport::api::types::{Desired, HistoryEntry, RunState};

#[tokio::test]
async fn app_serves_and_is_removed_without_leftovers() -> Result<()> {
    let w = World::new()?;
    let c = w.client();
    let m = w.manifest(
        "hello",
        "hello:1",
        "[env]\nGREETING = \"hi there\"\n[[volume]]\nname = \"data\"\npath = \"/data\"\n[resources]\nmemory = \"64M\"\npids = 64\n",
    );
    let s = context(c.install(&m, |_| {}).await.map_err(Into::into), &w.agent)?;
    assert_eq!(s.name, "hello");
    assert!(
        s.image.contains("@sha256:"),
        "pinned to a digest: {}",
        s.image
    );
    let pid = wait_running(&c, "hello").await?;
    assert!(process_alive(pid));

    // It serves, inside its own network namespace, from the image's Cmd.
    let (code, out) = exec(&c, "hello", &["wget", "-qO-", "http://127.0.0.1:8080/"]).await?;
    assert_eq!((code, out.trim()), (0, marker("1").as_str()));
    // Its own PID namespace: its server is PID 1 there.
    let (_, out) = exec(&c, "hello", &["cat", "/proc/1/cmdline"]).await?;
    assert!(out.starts_with("/bin/httpd"), "{out:?}");
    // Environment from the manifest; hostname is the app name.
    let (_, out) = exec(&c, "hello", &["sh", "-c", "echo $GREETING; hostname"]).await?;
    assert_eq!(out, "hi there\nhello\n");
    // Read-only root filesystem, writable volume.
    let (code, _) = exec(&c, "hello", &["touch", "/bin/new-file"]).await?;
    assert_ne!(code, 0, "the root filesystem must be read-only");
    let (code, _) = exec(&c, "hello", &["sh", "-c", "echo kept > /data/note"]).await?;
    assert_eq!(code, 0);
    // Capabilities reduced: no CAP_SYS_ADMIN (bit 21) in the bounding set; no_new_privs set.
    let (_, status) = exec(&c, "hello", &["cat", "/proc/self/status"]).await?;
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(str::trim)
        .unwrap_or_default();
    let bnd = u64::from_str_radix(bnd, 16)?;
    assert_eq!(bnd & (1 << 21), 0, "CAP_SYS_ADMIN must be dropped: {bnd:x}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    // The app's own processes and those started by `exec` run under the seccomp filter.
    assert!(
        status.contains("Seccomp:\t2"),
        "exec'd processes are filtered: {status}"
    );
    let (_, init_status) = exec(&c, "hello", &["cat", "/proc/1/status"]).await?;
    assert!(
        init_status.contains("Seccomp:\t2"),
        "a seccomp filter must be active: {init_status}"
    );
    assert!(init_status.contains("NoNewPrivs:\t1"));
    // Masked /proc paths.
    // Masked /proc paths (those this kernel has) read as empty.
    for path in ["/proc/kcore", "/proc/keys", "/proc/timer_list"] {
        if std::path::Path::new(path).exists() {
            let (_, n) = exec(&c, "hello", &["sh", "-c", &format!("cat {path} | wc -c")]).await?;
            assert_eq!(n.trim(), "0", "{path} must be masked");
        }
    }
    // cgroup limits from the manifest.
    let dirs = cgroup_dirs(&w.agent, "hello");
    assert!(!dirs.is_empty(), "the app has cgroups");
    let mem = dirs.iter().find_map(|d| {
        std::fs::read_to_string(d.join("memory.limit_in_bytes"))
            .or_else(|_| std::fs::read_to_string(d.join("memory.max")))
            .ok()
    });
    assert_eq!(mem.as_deref().map(str::trim), Some("67108864"));
    let pids = dirs
        .iter()
        .find_map(|d| std::fs::read_to_string(d.join("pids.max")).ok());
    assert_eq!(pids.as_deref().map(str::trim), Some("64"));

    // Logs: httpd -v logs each request (client and status) to stderr.
    let mut log = Vec::new();
    c.logs("hello", None, false, |b| log.extend_from_slice(b))
        .await?;
    let log = String::from_utf8_lossy(&log);
    assert!(
        log.contains("127.0.0.1]:") && log.contains("response:200"),
        "{log}"
    );

    // Inspect knows the image, the volume with its size, and the events.
    let d = inspect(&c, "hello").await?;
    assert_eq!(d.volumes.len(), 1);
    assert!(
        d.volumes[0].bytes >= 5,
        "volume size counted: {:?}",
        d.volumes[0]
    );
    assert!(
        d.image_bytes > 100_000,
        "image size counted: {}",
        d.image_bytes
    );
    assert!(d.events.iter().any(|e| e.kind == "start"));
    assert_eq!(
        d.command,
        ["/bin/httpd", "-f", "-v", "-p", "8080", "-h", "/www"]
    );

    // rm: no container, mounts, cgroups or files are left; the volume is kept.
    c.delete("/v1/apps/hello").await?;
    wait_for(
        "the app's process to end",
        Duration::from_secs(10),
        || async { Ok(!process_alive(pid)) },
    )
    .await?;
    assert!(
        mounts_below(w.agent.data_dir()).is_empty(),
        "mounts left: {:?}",
        mounts_below(w.agent.data_dir())
    );
    assert!(cgroup_dirs(&w.agent, "hello").is_empty(), "cgroups left");
    assert!(
        !w.agent.data_dir().join("apps/hello").exists(),
        "app dir left"
    );
    // Only the runtime's stamp of this boot stays (ARCHITECTURE.md, "libcontainer's state").
    let runtime = w.agent.data_dir().join("runtime");
    assert_eq!(
        std::fs::read_to_string(runtime.join(".boot-id"))?,
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?.trim()
    );
    assert_eq!(entries(&runtime), [".boot-id"], "container state left");
    assert_eq!(
        std::fs::read_to_string(w.agent.data_dir().join("volumes/hello/data/note"))?,
        "kept\n"
    );
    let gone = c
        .get::<serde_json::Value>("/v1/apps/hello")
        .await
        .unwrap_err();
    assert_eq!(gone.status(), Some(404));

    // Reinstalling under the same name finds the data; --purge-data deletes it.
    c.install(&m, |_| {}).await?;
    wait_running(&c, "hello").await?;
    let (_, out) = exec(&c, "hello", &["cat", "/data/note"]).await?;
    assert_eq!(out, "kept\n");
    c.delete("/v1/apps/hello?purge_data=true").await?;
    assert!(!w.agent.data_dir().join("volumes/hello").exists());

    // The history outlives the app and says who did what.
    let h: Vec<HistoryEntry> = c.get("/v1/apps/hello/history").await?;
    let actions: Vec<&str> = h.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["install", "remove", "install", "remove"]);
    assert!(h.iter().all(|e| e.actor.contains("uid 0")), "{h:?}");
    Ok(())
}

#[tokio::test]
async fn crashing_app_is_restarted_with_backoff_and_stop_sticks() -> Result<()> {
    let w = World::new()?;
    let c = w.client();
    let m = w.manifest(
        "crashy",
        "hello:1",
        "command = [\"/bin/sh\", \"-c\", \"echo boom; exit 3\"]\n",
    );
    c.install(&m, |_| {}).await?;
    wait_for("two restarts", Duration::from_secs(20), || async {
        Ok(summary(&c, "crashy").await?.restarts >= 2)
    })
    .await?;
    let d = inspect(&c, "crashy").await?;
    let crashes: Vec<&str> = d
        .events
        .iter()
        .filter(|e| e.kind == "crash")
        .map(|e| e.message.as_str())
        .collect();
    assert!(
        crashes.iter().any(|m| m.contains("exited with code 3")),
        "{crashes:?}"
    );
    // The delay doubles: 1 s, 2 s, 4 s.
    assert!(
        crashes.iter().any(|m| m.contains("restarting in 2s")),
        "{crashes:?}"
    );
    let mut log = Vec::new();
    c.logs("crashy", Some(10), false, |b| log.extend_from_slice(b))
        .await?;
    assert!(String::from_utf8_lossy(&log).matches("boom").count() >= 2);

    // Stopped by its owner: it stays stopped, also across an agent restart.
    let s: homeport::api::types::AppSummary = c.post("/v1/apps/crashy/stop", &()).await?;
    assert_eq!((s.desired, s.run), (Desired::Stopped, RunState::Stopped));
    let restarts = s.restarts;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = summary(&c, "crashy").await?;
    assert_eq!((s.run, s.restarts), (RunState::Stopped, restarts));
    let mut agent = w.agent;
    agent.stop();
    agent.spawn()?;
    let c = agent.client();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(summary(&c, "crashy").await?.run, RunState::Stopped);
    let h: Vec<HistoryEntry> = c.get("/v1/apps/crashy/history").await?;
    assert_eq!(h.last().map(|e| e.action.as_str()), Some("stop"));
    Ok(())
}

#[tokio::test]
async fn apps_survive_agent_restarts_and_are_readopted() -> Result<()> {
    let w = World::new()?;
    let c = w.client();
    c.install(&w.manifest("keep", "hello:1", ""), |_| {})
        .await?;
    let pid = wait_running(&c, "keep").await?;
    let mut agent = w.agent;

    // A clean agent stop and a kill -9: the app keeps running and is re-adopted.
    agent.stop();
    assert!(
        process_alive(pid),
        "apps keep running while the agent is down"
    );
    agent.spawn()?;
    assert_eq!(wait_running(&agent.client(), "keep").await?, pid);
    agent.kill9();
    assert!(process_alive(pid));
    agent.spawn()?;
    let c = agent.client();
    assert_eq!(wait_running(&c, "keep").await?, pid);
    let (code, out) = exec(&c, "keep", &["wget", "-qO-", "http://127.0.0.1:8080/"]).await?;
    assert_eq!((code, out.trim()), (0, marker("1").as_str()));

    // An adopted app that dies is noticed (through its pidfd) and restarted.
    // SAFETY: killing the app's process, which this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for("a restart with a new pid", Duration::from_secs(15), || async {
        Ok(matches!(summary(&c, "keep").await?.run, RunState::Running { pid: p, .. } if p != pid))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn exec_and_debug() -> Result<()> {
    let w = World::new()?;
    let c = w.client();
    c.install(
        &w.manifest(
            "web",
            "hello:1",
            "[[volume]]\nname = \"www\"\npath = \"/srv\"\n",
        ),
        |_| {},
    )
    .await?;
    wait_running(&c, "web").await?;
    // Exit codes come back; stdin reaches the process.
    assert_eq!(exec(&c, "web", &["sh", "-c", "exit 7"]).await?.0, 7);
    let (code, out) = exec_with_stdin(&c, "web", &["cat"], b"piped in\n", false).await?;
    assert_eq!((code, out.as_str()), (0, "piped in\n"));
    exec(&c, "web", &["sh", "-c", "echo from-the-app > /srv/f"]).await?;

    // A crash-looping app cannot be exec'd into, but debug opens its filesystem and volumes.
    c.post::<serde_json::Value, _>("/v1/apps/web/stop", &())
        .await?;
    let err = exec(&c, "web", &["true"]).await.unwrap_err();
    assert!(err.to_string().contains("not running"), "{err}");
    let script = b"cat /www/index.html; cat /srv/f; echo $$; exit 4\n";
    let (code, out) = exec_with_stdin(&c, "web", &[], script, true).await?;
    assert_eq!(code, 4, "{out}");
    assert!(
        out.contains(&marker("1")) && out.contains("from-the-app"),
        "{out}"
    );
    // The debug container is gone afterwards.
    assert!(!entries(&w.agent.data_dir().join("runtime"))
        .iter()
        .any(|e| e.contains("debug")));
    assert!(!entries(&w.agent.data_dir().join("apps/web"))
        .iter()
        .any(|e| e.contains("debug")));
    Ok(())
}

#[tokio::test]
async fn logs_follow_and_rotate() -> Result<()> {
    let registry = homeport_testkit::Registry::start()?;
    push_hello(&registry, "hello", "1")?;
    let agent = start_agent(homeport_testkit::AgentOpts {
        log_cap: Some(4096),
        ..opts_for(&registry.host())
    })?;
    let c = agent.client();
    let m = format!(
        "name = \"chatty\"\nimage = \"{}/hello:1\"\ncommand = [\"/bin/sh\", \"-c\", \"i=0; while true; do echo line $i; i=$((i+1)); sleep 0.02; done\"]\n",
        registry.host()
    );
    c.install(&m, |_| {}).await?;
    wait_running(&c, "chatty").await?;

    // --follow keeps delivering new lines.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let (c2, seen2) = (c.clone(), seen.clone());
    let follow = tokio::spawn(async move {
        let _ = c2
            .logs("chatty", Some(1), true, |b| {
                seen2.lock().unwrap().extend_from_slice(b)
            })
            .await;
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let lines = String::from_utf8_lossy(&seen.lock().unwrap())
        .lines()
        .count();
    assert!(lines > 10, "follow delivered {lines} lines in 1.5 s");

    // The log is rotated at the cap (checked every 5 s): at most two files, each bounded.
    let logs = agent.data_dir().join("apps/chatty/logs");
    wait_for("a rotation", Duration::from_secs(15), || async {
        Ok(logs.join("current.log.1").exists())
    })
    .await?;
    let rotated = std::fs::metadata(logs.join("current.log.1"))?.len();
    assert!(
        rotated > 4096 && rotated < 64 << 10,
        "rotated file is {rotated} bytes"
    );
    assert_eq!(entries(&logs), ["current.log", "current.log.1"]);
    // Following survives the rotation.
    let before = seen.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        seen.lock().unwrap().len() > before,
        "follow continues after rotation"
    );
    follow.abort();
    Ok(())
}
