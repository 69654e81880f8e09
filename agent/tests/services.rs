//! Shared services against the real thing: the agent's PostgreSQL server and per-app Redis
//! caches, reached from inside the apps' network namespaces; hooks, further containers,
//! health checks and volumes owned by the apps' own id ranges.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use common::*;
use homeport::api::types::HealthState;
use homeport::services::cache::command_in;
use homeport_testkit::{push_busybox, BusyboxOpts};

/// The busybox image, running as `www` (uid 33).
fn push_www(w: &World) -> Result<()> {
    let opts = BusyboxOpts {
        user: Some("www".into()),
        ..Default::default()
    };
    push_busybox(&w.registry, "www", "1", &opts)?;
    Ok(())
}

fn netns(w: &World, app: &str) -> PathBuf {
    w.agent.data_dir().join("apps").join(app).join("netns")
}

/// The app's environment, as its main container sees it.
async fn env_of(w: &World, app: &str) -> Result<BTreeMap<String, String>> {
    let (code, out) = exec(&w.client(), app, &["env"]).await?;
    if code != 0 {
        bail!("env in {app}: {out}");
    }
    Ok(out
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// Runs SQL with psql from inside `ns` (an app's network namespace); stdout, or the error.
fn psql_in(ns: &Path, url: &str, sql: &str) -> Result<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args([
            "psql",
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            url,
            "-c",
            sql,
        ])
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .context("run psql")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Runs SQL as the server's superuser over its socket (the agent's own way in).
fn psql_admin(w: &World, sql: &str) -> Result<String> {
    let socket = w.agent.data_dir().join("services/postgres/run");
    let out = Command::new("psql")
        .args(["-X", "-q", "-A", "-t", "-U", "postgres", "-h"])
        .arg(&socket)
        .args(["-d", "postgres", "-c", sql])
        .output()
        .context("run psql")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn manifest_with_services(w: &World, name: &str) -> String {
    w.manifest(
        name,
        "www:1",
        r#"
[https]
port = 8080
[database]
variant = "postgres"
[cache]
memory = "16M"
[[volume]]
name = "data"
path = "/data"
[env]
MY_DB = "{{database.url}}"
WHERE = "{{database.name}} at {{database.host}}:{{database.port}} for {{https.hostname}}"
"#,
    )
}

#[tokio::test]
async fn each_app_gets_its_own_database_cache_and_volume_owner() -> Result<()> {
    let w = World::new()?;
    push_www(&w)?;
    let c = w.client();
    for app in ["one", "two"] {
        context(
            c.install(&manifest_with_services(&w, app), |_| {})
                .await
                .map_err(Into::into),
            &w.agent,
        )?;
        wait_running(&c, app).await?;
    }

    // Standard variables and templates.
    let env = env_of(&w, "one").await?;
    let url = env["DATABASE_URL"].clone();
    assert!(url.starts_with("postgresql://app_one:"), "{url}");
    assert!(url.ends_with(":5432/app_one"), "{url}");
    assert_eq!(env["MY_DB"], url);
    assert_eq!(env["PGDATABASE"], "app_one");
    assert_eq!(env["PGUSER"], "app_one");
    let pg_host = env["PGHOST"].clone();
    assert_eq!(
        env["WHERE"],
        format!("app_one at {pg_host}:5432 for {}", env["HOMEPORT_HOSTNAME"])
    );
    assert!(env["HOMEPORT_URL"].starts_with("https://one-"));
    let redis_url = env["REDIS_URL"].clone();
    let cache_pw = redis_url
        .strip_prefix("redis://:")
        .and_then(|r| r.split_once('@'))
        .map(|(pw, _)| pw.to_string())
        .context("the cache password in REDIS_URL")?;
    let two_url = env_of(&w, "two").await?["DATABASE_URL"].clone();
    assert_ne!(url, two_url);

    // Its own database, from its own address, with its credentials: full rights.
    let (one_ns, two_ns) = (netns(&w, "one"), netns(&w, "two"));
    psql_in(
        &one_ns,
        &url,
        "CREATE TABLE notes (t text); INSERT INTO notes VALUES ('kept')",
    )?;
    assert_eq!(psql_in(&one_ns, &url, "SELECT t FROM notes")?, "kept");
    // Nothing else: A's credentials from B's address, B's role to A's database, B's
    // credentials from A's address, the superuser, a guessed role.
    let two_to_one = two_url.replace("/app_two", "/app_one");
    for (ns, target, what) in [
        (&two_ns, url.clone(), "one's credentials from two's address"),
        (&two_ns, two_to_one.clone(), "two's role to one's database"),
        (
            &one_ns,
            two_url.clone(),
            "two's credentials from one's address",
        ),
        (
            &one_ns,
            format!("postgresql://postgres@{pg_host}:5432/postgres"),
            "the superuser",
        ),
        (
            &one_ns,
            format!("postgresql://app_two:guess@{pg_host}:5432/app_two"),
            "a guessed password",
        ),
    ] {
        match psql_in(ns, &target, "SELECT 1") {
            Ok(out) => bail!("{what} got in: {out}"),
            Err(e) => {
                let e = e.to_string();
                assert!(
                    e.contains("no pg_hba.conf entry")
                        || e.contains("password authentication failed"),
                    "{what}: {e}"
                );
            }
        }
    }

    // The cache: one's server in one's namespace, two's in two's; neither sees the other.
    let ok = command_in(&one_ns, Some(&cache_pw), &["SET", "k", "one's"]).await?;
    assert_eq!(ok, "OK");
    assert_eq!(
        command_in(&one_ns, Some(&cache_pw), &["GET", "k"]).await?,
        "one's"
    );
    let e = command_in(&two_ns, Some(&cache_pw), &["GET", "k"]).await;
    assert!(
        e.as_ref().is_err_and(|e| e.is_auth()),
        "one's password on two's cache: {e:?}"
    );
    let two_pw = env_of(&w, "two").await?["REDIS_URL"]
        .trim_start_matches("redis://:")
        .split('@')
        .next()
        .unwrap_or_default()
        .to_string();
    let nil = command_in(&two_ns, Some(&two_pw), &["GET", "k"]).await?;
    assert_ne!(nil, "one's", "two's cache holds one's key");
    // From the app itself, with busybox nc (the standard place: 127.0.0.1:6379).
    let (code, out) = exec(
        &c,
        "one",
        &[
            "sh",
            "-c",
            &format!("printf 'AUTH {cache_pw}\\r\\nGET k\\r\\nQUIT\\r\\n' | nc 127.0.0.1 6379"),
        ],
    )
    .await?;
    assert!(code == 0 && out.contains("one's"), "nc: {code} {out}");

    // inspect shows both, with their sizes.
    let d = inspect(&c, "one").await?;
    let db = d.database.context("inspect shows the database")?;
    assert_eq!((db.name.as_str(), db.user.as_str()), ("app_one", "app_one"));
    assert!(db.bytes.is_some_and(|b| b > 1 << 20), "{db:?}");
    let cache = d.cache.context("inspect shows the cache")?;
    assert_eq!(cache.max_memory, 16 << 20);
    assert!(
        cache.memory_bytes.is_some_and(|m| m > 0 && m < 5 << 20),
        "a cache costs less than 5 MiB of its own: {cache:?}"
    );

    // The volume: the app's uid inside, its own range outside.
    let host = w.agent.data_dir().join("volumes/one/data");
    let owner = std::fs::metadata(&host)?.uid();
    assert!(owner >= 0x6000_0000, "host owner {owner:#x}");
    assert_eq!(owner % 65536, 33, "www's uid within the range");
    let (_, ls) = exec(&c, "one", &["ls", "-lnd", "/data"]).await?;
    assert!(ls.split_whitespace().nth(2) == Some("33"), "{ls}");
    let (code, out) = exec(&c, "one", &["touch", "/data/made-inside"]).await?;
    assert_eq!(code, 0, "{out}");
    // exec runs as root inside: root of the app's range on the disk, not the host's root.
    assert_eq!(
        std::fs::metadata(host.join("made-inside"))?.uid(),
        owner - 33
    );
    let two_owner = std::fs::metadata(w.agent.data_dir().join("volumes/two/data"))?.uid();
    assert_ne!(owner, two_owner, "two apps share an id range");

    // rm keeps the database (like volumes); a reinstall finds its data again.
    c.delete("/v1/apps/one").await?;
    assert_eq!(
        psql_admin(
            &w,
            "SELECT count(*) FROM pg_database WHERE datname = 'app_one'"
        )?,
        "1"
    );
    c.install(&manifest_with_services(&w, "one"), |_| {})
        .await?;
    wait_running(&c, "one").await?;
    let url = env_of(&w, "one").await?["DATABASE_URL"].clone();
    assert_eq!(
        psql_in(&netns(&w, "one"), &url, "SELECT t FROM notes")?,
        "kept"
    );
    assert_eq!(std::fs::metadata(&host)?.uid(), owner, "same range again");
    // rm --purge-data drops it, and its role.
    c.delete("/v1/apps/one?purge_data=true").await?;
    assert_eq!(
        psql_admin(
            &w,
            "SELECT (SELECT count(*) FROM pg_database WHERE datname = 'app_one') + (SELECT count(*) FROM pg_roles WHERE rolname = 'app_one')"
        )?,
        "0"
    );
    // The cache server went with the app.
    assert!(!w.agent.data_dir().join("apps/one").exists());
    Ok(())
}

#[tokio::test]
async fn install_hooks_run_with_services_and_a_failed_one_undoes_the_install() -> Result<()> {
    let w = World::new()?;
    let c = w.client();
    let m = w.manifest(
        "hooked",
        "hello:1",
        r#"
[database]
[[volume]]
name = "data"
path = "/data"
[[hook]]
when = "install"
command = ["sh", "-c", "echo \"$DATABASE_URL {{database.name}}\" > /data/installed"]
[[hook]]
when = "start"
command = ["sh", "-c", "echo start >> /data/starts"]
"#,
    );
    context(c.install(&m, |_| {}).await.map_err(Into::into), &w.agent)?;
    wait_running(&c, "hooked").await?;
    let vol = w.agent.data_dir().join("volumes/hooked/data");
    let installed = std::fs::read_to_string(vol.join("installed"))?;
    assert!(
        installed.starts_with("postgresql://app_hooked:")
            && installed.trim_end().ends_with(" app_hooked"),
        "{installed}"
    );
    assert_eq!(std::fs::read_to_string(vol.join("starts"))?, "start\n");
    c.post::<serde_json::Value, _>("/v1/apps/hooked/restart", &serde_json::json!({}))
        .await?;
    wait_running(&c, "hooked").await?;
    assert_eq!(
        std::fs::read_to_string(vol.join("starts"))?,
        "start\nstart\n"
    );
    assert_eq!(
        std::fs::read_to_string(vol.join("installed"))?,
        installed,
        "install hooks run once"
    );

    // A failing install hook: the install is refused and nothing of it is left.
    let m = w.manifest(
        "broken",
        "hello:1",
        "[database]\n[[hook]]\nwhen = \"install\"\ncommand = [\"sh\", \"-c\", \"echo failing; exit 3\"]\n",
    );
    let err = c.install(&m, |_| {}).await.expect_err("the hook fails");
    let text = err.to_string();
    assert!(
        text.contains("install hook") && text.contains("exited with code 3"),
        "{text}"
    );
    assert!(c.get::<serde_json::Value>("/v1/apps/broken").await.is_err());
    assert!(!w.agent.data_dir().join("apps/broken").exists());
    assert_eq!(
        psql_admin(
            &w,
            "SELECT count(*) FROM pg_roles WHERE rolname = 'app_broken'"
        )?,
        "0"
    );
    // The name is free again, with a hook that works.
    let m = w.manifest(
        "broken",
        "hello:1",
        "[database]\n[[hook]]\nwhen = \"install\"\ncommand = [\"true\"]\n",
    );
    c.install(&m, |_| {}).await?;
    Ok(())
}

#[tokio::test]
async fn containers_share_address_volumes_and_lifecycle_and_health_is_watched() -> Result<()> {
    let w = World::new()?;
    let c = w.client();
    let m = w.manifest(
        "pair",
        "hello:1",
        r#"
command = ["sh", "-c", "touch /tmp/ok; exec httpd -f -p 8080 -h /www"]
[https]
port = 8080
[[volume]]
name = "shared"
path = "/shared"
[env]
ROLE = "web"
[[container]]
name = "worker"
command = ["sh", "-c", "echo $ROLE-$KIND > /shared/who; wget -q -O /shared/fetched http://127.0.0.1:8080/index.html; exec sleep 1001"]
[container.env]
ROLE = "worker"
KIND = "background"
[health]
command = ["cat", "/tmp/ok"]
interval = "1s"
retries = 2
start_period = "1s"
"#,
    );
    context(c.install(&m, |_| {}).await.map_err(Into::into), &w.agent)?;
    wait_running(&c, "pair").await?;
    let vol = w.agent.data_dir().join("volumes/pair/shared");
    wait_for("the worker's files", Duration::from_secs(20), || async {
        Ok(vol.join("fetched").exists() && vol.join("who").exists())
    })
    .await?;
    // Its own env over the app's; the app's web server over the shared loopback.
    assert_eq!(
        std::fs::read_to_string(vol.join("who"))?,
        "worker-background\n"
    );
    assert!(std::fs::read_to_string(vol.join("fetched"))?.contains(&marker("1")));
    wait_for("healthy", Duration::from_secs(20), || async {
        Ok(summary(&c, "pair").await?.health == Some(HealthState::Healthy))
    })
    .await?;

    // One container ends: the whole app restarts.
    let worker = find_process("sleep 1001").context("the worker's process")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    wait_for("a restart", Duration::from_secs(20), || async {
        Ok(summary(&c, "pair").await?.restarts == 1)
    })
    .await?;
    wait_running(&c, "pair").await?;
    let events = inspect(&c, "pair").await?.events;
    assert!(
        events
            .iter()
            .any(|e| e.kind == "crash" && e.message.contains("pair--worker")),
        "{events:?}"
    );

    // The health check fails twice: restarted, and healthy again.
    wait_for("healthy again", Duration::from_secs(20), || async {
        Ok(summary(&c, "pair").await?.health == Some(HealthState::Healthy))
    })
    .await?;
    let (code, out) = exec(&c, "pair", &["rm", "/tmp/ok"]).await?;
    assert_eq!(code, 0, "{out}");
    wait_for("a restart for health", Duration::from_secs(20), || async {
        Ok(summary(&c, "pair").await?.restarts == 2)
    })
    .await?;
    let events = inspect(&c, "pair").await?.events;
    assert!(
        events
            .iter()
            .any(|e| e.kind == "health" && e.message.contains("failed (2/2)")),
        "{events:?}"
    );
    assert!(events
        .iter()
        .any(|e| e.kind == "crash" && e.message.contains("unhealthy")));
    wait_for(
        "healthy after the restart",
        Duration::from_secs(20),
        || async { Ok(summary(&c, "pair").await?.health == Some(HealthState::Healthy)) },
    )
    .await?;

    // A manifest without the worker: its container goes with the update.
    let m2 = w.manifest("pair", "hello:1", "[https]\nport = 8080\n");
    c.update("pair", Some(&m2), |_| {}).await?;
    wait_running(&c, "pair").await?;
    assert!(
        find_process("sleep 1001").is_none(),
        "the dropped worker still runs"
    );
    assert!(!w.agent.data_dir().join("apps/pair/c/worker").exists());
    Ok(())
}

/// A process whose command line contains `needle`.
fn find_process(needle: &str) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) && process_alive(pid) {
            return Some(pid);
        }
    }
    None
}
