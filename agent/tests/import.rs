//! `homeport import`: the real binary on the compose files in `tests/compose/`, as a person runs
//! it. It needs no agent: the draft goes to stdout (or `-o FILE`), warnings and notes to stderr.

#![allow(clippy::unwrap_used)] // tests may unwrap what they just built

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::Result;

const HOMEPORT: &str = env!("CARGO_BIN_EXE_homeport");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/compose")
        .join(name)
}

fn homeport(args: &[&str]) -> Result<Output> {
    // No agent socket: import must not try to reach one.
    Ok(Command::new(HOMEPORT)
        .args(args)
        .env("HOMEPORT_SOCKET", "/nonexistent/agent.sock")
        .output()?)
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn import(args: &[&str]) -> Result<Run> {
    let mut all = vec!["import"];
    all.extend_from_slice(args);
    let o = homeport(&all)?;
    Ok(Run {
        code: o.status.code(),
        stdout: String::from_utf8(o.stdout)?,
        stderr: String::from_utf8(o.stderr)?,
    })
}

/// Imports a fixture that must succeed and checks what every draft shares: exit 0, a valid
/// manifest, each stderr line a warning or a note, every warning also a comment in the draft.
fn draft(file: &str, extra: &[&str]) -> Result<Run> {
    let path = fixture(file);
    let mut args = vec![path.to_str().unwrap()];
    args.extend_from_slice(extra);
    let r = import(&args)?;
    assert_eq!(r.code, Some(0), "{file}: {}", r.stderr);
    let table: toml::Table = toml::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("{file}: draft is not TOML: {e}\n{}", r.stdout));
    assert!(table.contains_key("name") && table.contains_key("image"));
    // `homeport validate` takes it as it is.
    let dir = tempfile::tempdir()?;
    let toml = dir.path().join("draft.toml");
    std::fs::write(&toml, &r.stdout)?;
    let v = homeport(&["validate", toml.to_str().unwrap()])?;
    assert!(
        v.status.success(),
        "{file}: {}\n{}",
        String::from_utf8_lossy(&v.stderr),
        r.stdout
    );
    for line in r.stderr.lines() {
        assert!(
            line.starts_with("warning: ") || line.starts_with("note: "),
            "{file}: stray stderr line {line:?}"
        );
        assert!(
            r.stdout.contains(&format!("# {line}\n")),
            "{file}: {line:?} is not in the draft's comments"
        );
    }
    Ok(r)
}

#[track_caller]
fn contains(r: &Run, stdout: &[&str], stderr: &[&str]) {
    for s in stdout {
        assert!(r.stdout.contains(s), "draft lacks {s:?}:\n{}", r.stdout);
    }
    for s in stderr {
        assert!(r.stderr.contains(s), "stderr lacks {s:?}:\n{}", r.stderr);
    }
}

#[test]
fn php_app_with_postgres_redis_and_cron() -> Result<()> {
    let r = draft("cloud.yml", &[])?;
    contains(
        &r,
        &[
            "\nname = \"app\"\nimage = \"docker.io/library/nextcloud:29-apache\"\n",
            "\n[https]\nport = 80\n",
            "\n[database]\nvariant = \"postgres\"\npermissions = \"full\"\n",
            "\n[cache]\nvariant = \"redis\"\n",
            "\n[[volume]]\nname = \"html\"\npath = \"/var/www/html\"\n",
            "\n[[volume]]\nname = \"data\"\npath = \"/var/www/html/data\"\n",
            "POSTGRES_HOST = \"{{database.host}}\"\n",
            "POSTGRES_DB = \"{{database.name}}\"\n",
            "POSTGRES_USER = \"{{database.user}}\"\n",
            "POSTGRES_PASSWORD = \"{{database.password}}\"\n",
            "REDIS_HOST = \"{{cache.host}}\"\n",
            "REDIS_HOST_PASSWORD = \"{{cache.password}}\"\n",
            "NEXTCLOUD_TRUSTED_DOMAINS = \"cloud.example.com\"\n",
            "\n[resources]\nmemory = \"1G\"\ncpus = 2.0\n",
            "\n[health]\npath = \"/status.php\"\ninterval = \"60s\"\n",
            // Same image as the app: not repeated; its env is the app's.
            "\n[[container]]\nname = \"cron\"\ncommand = [\"/cron.sh\"]\n",
        ],
        &[
            "warning: services.app.volumes[1]: bind mount of ./data: becomes an empty volume",
            "warning: services.app.volumes[2]: the host's time zone is not mounted",
            "warning: services.db.volumes: dropped: the data lives in the device's shared PostgreSQL",
            "warning: services.db.environment: dropped",
            "warning: services.redis.command: dropped",
            "warning: services.cron.entrypoint: a manifest cannot replace the image's entrypoint",
            "note: restart policies not needed",
            "note: services.app.healthcheck: timeout not imported",
        ],
    );
    assert!(!r.stdout.contains("[container.env]"), "{}", r.stdout);
    // Passwords that only ever came from the environment are templates, not open questions.
    assert!(!r.stderr.contains("DB_PASSWORD"), "{}", r.stderr);
    Ok(())
}

#[test]
fn python_app_with_worker_and_broker() -> Result<()> {
    let r = draft("docs.yml", &[])?;
    contains(
        &r,
        &[
            "\nname = \"webserver\"\nimage = \"ghcr.io/example/docsarchive:2.7.2\"\ncommand = [\"gunicorn\", \"-c\", \"/usr/src/app/gunicorn.conf.py\", \"docsarchive.asgi:application\"]\n",
            "\n[https]\nport = 8000\n",
            "DOCS_REDIS = \"{{cache.url}}\"\n",
            "DOCS_DBHOST = \"{{database.host}}\"\n",
            "DOCS_DBPORT = \"{{database.port}}\"\n",
            "DOCS_DBNAME = \"{{database.name}}\"\n",
            "DOCS_DBUSER = \"{{database.user}}\"\n",
            "DOCS_DBPASS = \"{{database.password}}\"\n",
            "DOCS_SECRET_KEY = \"${SECRET_KEY}\"\n",
            "DOCS_OCR_DPI = \"1.10\"\n",
            "\n[health]\npath = \"/api/health/\"\ninterval = \"30s\"\n",
            "\n[[container]]\nname = \"worker\"\ncommand = [\"celery\", \"--app\", \"docsarchive\", \"worker\", \"--loglevel\", \"INFO\"]\n",
            // Only what differs from the app's environment.
            "\n[container.env]\nDOCS_REDIS = \"redis://:{{cache.password}}@{{cache.host}}:{{cache.port}}/1\"\nC_FORCE_ROOT = \"true\"\n",
        ],
        &[
            "warning: services.webserver.env_file: docs.env not read",
            "warning: services.webserver.environment.DOCS_SECRET_KEY: ${SECRET_KEY} not set",
            "warning: services.broker.volumes: dropped",
            "warning: services.db.environment: dropped",
            "warning: services.worker.depends_on: webserver (with conditions)",
            "note: services.webserver.environment.DOCS_URL: if this is the app's own address",
        ],
    );
    // The volumes both share are declared once.
    assert_eq!(r.stdout.matches("name = \"data\"").count(), 1);
    Ok(())
}

#[test]
fn dns_filter_with_raw_ports() -> Result<()> {
    let r = draft("dns.yml", &[])?;
    contains(
        &r,
        &[
            "\nname = \"dnsfilter\"\nimage = \"docker.io/pihole/pihole:2024.07.0\"\n",
            "\n[https]\nport = 80\n",
            "\n[[port]]\nport = 53\nprotocol = \"tcp\"\naccess = \"public\"\n",
            "\n[[port]]\nport = 53\nprotocol = \"udp\"\naccess = \"public\"\n",
            "\n[[port]]\nport = 67\nprotocol = \"udp\"\naccess = \"public\"\n",
            "\n[[volume]]\nname = \"pihole\"\npath = \"/etc/pihole\"\n",
            "\n[[volume]]\nname = \"dnsmasq-d\"\npath = \"/etc/dnsmasq.d\"\n",
            "TZ = \"Europe/Berlin\"\n",
        ],
        &[
            "warning: services.dnsfilter.ports: 443/tcp dropped: it cannot be public, the device's HTTPS proxy owns it",
            "warning: services.dnsfilter.cap_add: NET_ADMIN not granted",
            "warning: services.dnsfilter.environment.WEBPASSWORD: ${WEBPASSWORD} not set",
            "warning: services.dnsfilter.volumes[0]: bind mount of ./etc-pihole",
        ],
    );
    assert!(!r.stdout.contains("[database]") && !r.stdout.contains("[cache]"));
    assert!(!r.stdout.contains("port = 443"));
    Ok(())
}

#[test]
fn wordpress_style_app_on_mariadb() -> Result<()> {
    let r = draft("blog.yml", &[])?;
    contains(
        &r,
        &[
            "\nname = \"blog\"\nimage = \"docker.io/library/wordpress:6.5-apache\"\n",
            "\n[database]\nvariant = \"sql\"\npermissions = \"full\"\n",
            "WORDPRESS_DB_HOST = \"{{database.host}}:{{database.port}}\"\n",
            "WORDPRESS_DB_USER = \"{{database.user}}\"\n",
            "WORDPRESS_DB_PASSWORD = \"{{database.password}}\"\n",
            "WORDPRESS_DB_NAME = \"{{database.name}}\"\n",
            "WORDPRESS_TABLE_PREFIX = \"wp_\"\n",
            "\n[resources]\nmemory = \"512M\"\ncpus = 0.5\n",
        ],
        &[
            "warning: services.db.image: a MariaDB database: Homeport provides PostgreSQL ([database] variant \"sql\")",
            "warning: services.db.expose: dropped",
        ],
    );
    assert!(!r.stdout.contains("[cache]"));
    Ok(())
}

#[test]
fn malformed_yaml_is_an_error_with_its_place() -> Result<()> {
    let r = import(&[fixture("malformed.yml").to_str().unwrap()])?;
    assert_eq!(r.code, Some(1));
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    assert!(
        r.stderr.contains(
            "malformed.yml: malformed yaml at line 5, column 11: mapping values are not allowed"
        ),
        "{}",
        r.stderr
    );
    Ok(())
}

#[test]
fn errors_name_the_problem() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let write = |name: &str, text: &str| -> Result<String> {
        let p = dir.path().join(name);
        std::fs::write(&p, text)?;
        Ok(p.to_str().unwrap().to_string())
    };
    let cloud = fixture("cloud.yml");
    let cloud = cloud.to_str().unwrap();
    for (args, message) in [
        (
            vec![write("empty.yml", "services: {}\n")?],
            "empty.yml: the compose file has no services",
        ),
        (
            vec![cloud.to_string(), "--service".into(), "nope".into()],
            "no service \"nope\" in the compose file (it has db, redis, app, cron)",
        ),
        (
            vec![cloud.to_string(), "--service".into(), "db".into()],
            "service \"db\" is a PostgreSQL database, which Homeport provides itself",
        ),
        (
            vec![write(
                "two.yml",
                "services:\n  a:\n    image: a:1\n    ports: ['80:80']\n  b:\n    image: b:1\n    ports: ['8080:8080']\n",
            )?],
            "several services could be the app's web service (a, b): choose one with --service",
        ),
        (
            vec![write("dbonly.yml", "services:\n  db:\n    image: postgres:16\n")?],
            "no app to import",
        ),
        (
            vec![dir.path().join("missing.yml").to_str().unwrap().to_string()],
            "missing.yml: No such file",
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = import(&args)?;
        assert_eq!(r.code, Some(1), "{args:?}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{args:?}: {}", r.stdout);
        assert!(
            r.stderr.starts_with("homeport: ") && r.stderr.contains(message),
            "{args:?}: want {message:?}, got {}",
            r.stderr
        );
    }

    // --service settles the choice; the other service is reported, not silently dropped.
    let two = dir.path().join("two.yml");
    let r = import(&[two.to_str().unwrap(), "--service", "b"])?;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains("\nname = \"b\"\n"), "{}", r.stdout);
    assert!(
        r.stderr
            .contains("warning: services.a: publishes ports of its own"),
        "{}",
        r.stderr
    );
    Ok(())
}

#[test]
fn output_file_and_json() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("dns.toml");
    let dns = fixture("dns.yml");
    let r = import(&[dns.to_str().unwrap(), "-o", out.to_str().unwrap()])?;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    let written = std::fs::read_to_string(&out)?;
    assert!(written.contains("\nname = \"dnsfilter\"\n"), "{written}");
    assert!(
        r.stderr.contains(&format!(
            "wrote {} (5 warnings): check it with `homeport validate",
            out.display()
        )),
        "{}",
        r.stderr
    );
    // The same draft as on stdout.
    assert_eq!(written, draft("dns.yml", &[])?.stdout);

    let r = import(&[dns.to_str().unwrap(), "--json"])?;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout)?;
    assert_eq!(v["toml"].as_str(), Some(written.as_str()));
    assert_eq!(v["warnings"].as_array().map(Vec::len), Some(5));
    assert!(v["notes"].is_array());
    Ok(())
}
