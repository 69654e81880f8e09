//! A real app no one here wrote, end to end: Debian's MediaWiki 1.39 as an OCI image from the
//! test registry, installed from a manifest. Its database is provisioned on the shared
//! PostgreSQL, its installer runs as an install hook, it is served through the proxy at its
//! HTTPS name with `$wgServer` from the template, and a page created through its web API
//! survives an app restart and an agent restart (kill -9).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use common::*;
use homeport::api::types::AgentInfo;

fn wiki_manifest(image: &str) -> String {
    format!(
        r#"
name = "wiki"
image = "{image}"

[https]
port = 8080

[database]
variant = "postgres"

[[volume]]
name = "data"
path = "/var/lib/mediawiki-data"

[env]
MEDIAWIKI_SERVER = "{{{{https.url}}}}"

[resources]
memory = "512M"

[health]
path = "/api.php?action=query&meta=siteinfo&format=json"
interval = "10s"
start_period = "60s"

[[hook]]
when = "install"
command = ["env", "MW_CONFIG_FILE=/var/lib/mediawiki-data/LocalSettings.php",
  "php", "/usr/share/mediawiki/maintenance/install.php",
  "--dbtype", "postgres", "--dbserver", "{{{{database.host}}}}", "--dbport", "{{{{database.port}}}}",
  "--dbname", "{{{{database.name}}}}", "--dbuser", "{{{{database.user}}}}",
  "--dbpass", "{{{{database.password}}}}", "--server", "{{{{https.url}}}}", "--scriptpath", "",
  "--confpath", "/var/lib/mediawiki-data", "--pass", "correct-horse-battery", "Homeport Wiki", "admin"]
"#
    )
}

/// The wiki through the proxy: a client that trusts only the device CA and resolves the
/// wiki's name to the proxy.
struct Wiki {
    http: reqwest::Client,
    base: String,
}

impl Wiki {
    /// The wiki at `https://host:port`, reached through the proxy on `[::1]:port`, trusting
    /// only the device CA, following no redirects.
    fn at(ca: &str, host: &str, port: u16) -> Result<Wiki> {
        Ok(Wiki {
            http: reqwest::Client::builder()
                .tls_built_in_root_certs(false)
                .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes())?)
                .resolve(
                    host,
                    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
                )
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(60))
                .build()?,
            base: format!("https://{host}:{port}"),
        })
    }

    async fn get(&self, path: &str) -> Result<(u16, reqwest::header::HeaderMap, String)> {
        let r = self.http.get(format!("{}{path}", self.base)).send().await?;
        let (status, headers) = (r.status().as_u16(), r.headers().clone());
        Ok((status, headers, r.text().await?))
    }

    async fn api(&self, form: &[(&str, &str)]) -> Result<serde_json::Value> {
        let r = self
            .http
            .post(format!("{}/api.php", self.base))
            .form(form)
            .send()
            .await?;
        let status = r.status();
        let text = r.text().await?;
        if !status.is_success() {
            bail!("api.php answered {status}: {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("api.php answered {text}"))
    }

    /// The rendered text of a page, read through the API.
    async fn page(&self, title: &str) -> Result<String> {
        let (status, _, body) = self
            .get(&format!(
                "/api.php?action=parse&page={title}&format=json&prop=text"
            ))
            .await?;
        if status != 200 {
            bail!("parse {title}: {status} {body}");
        }
        let v: serde_json::Value = serde_json::from_str(&body)?;
        v["parse"]["text"]["*"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no page {title}: {body}"))
    }
}

/// The port the agent's proxy takes HTTPS on.
fn https_port(info: &AgentInfo) -> Result<u16> {
    Ok(info
        .proxy_https
        .as_deref()
        .context("no https listener")?
        .parse::<SocketAddr>()?
        .port())
}

#[tokio::test]
async fn mediawiki_installs_serves_and_keeps_its_pages() -> Result<()> {
    let w = World::new()?;
    let image = homeport_testkit::mediawiki::push_mediawiki(&w.registry)?;
    let c = w.client();
    let info: AgentInfo = c.get("/v1/info").await?;
    let port = https_port(&info)?;
    let ca = c.text("/v1/ca.crt").await?;
    let host = format!("wiki-{}.local", info.device_name);

    let installed = context(
        c.install(&wiki_manifest(&image), |_| {})
            .await
            .map_err(Into::into),
        &w.agent,
    )?;
    let url = installed.url.clone().context("the wiki has a URL")?;
    assert_eq!(url, format!("https://{host}:{port}/"));
    wait_running(&c, "wiki").await?;

    let wiki = Wiki::at(&ca, &host, port)?;
    wait_for("the main page", Duration::from_secs(60), || async {
        Ok(wiki
            .get("/index.php?title=Main_Page")
            .await
            .is_ok_and(|(s, _, body)| s == 200 && body.contains("Homeport Wiki")))
    })
    .await?;
    // $wgServer is the HTTPS name the template gave: the wiki redirects there.
    let (status, headers, _) = wiki.get("/").await?;
    assert_eq!(status, 301);
    let location = headers
        .get("location")
        .and_then(|l| l.to_str().ok())
        .unwrap_or_default();
    assert!(
        location.starts_with(&format!("https://{host}:{port}/index.php")),
        "{location}"
    );

    // A page, created through the web API (an anonymous edit with the anonymous token).
    let text = "Written through the proxy by the Homeport test.";
    let edit = wiki
        .api(&[
            ("action", "edit"),
            ("title", "Homeport_Test"),
            ("text", text),
            ("summary", "test"),
            ("token", "+\\"),
            ("format", "json"),
        ])
        .await?;
    assert_eq!(edit["edit"]["result"], "Success", "{edit}");
    assert!(wiki.page("Homeport_Test").await?.contains(text));
    // Its rows are in the app's own database on the shared server.
    let data = std::fs::read_to_string(
        w.agent
            .data_dir()
            .join("volumes/wiki/data/LocalSettings.php"),
    )?;
    assert!(
        data.contains("app_wiki"),
        "LocalSettings names the database"
    );

    // An app restart.
    c.post::<serde_json::Value, _>("/v1/apps/wiki/restart", &serde_json::json!({}))
        .await?;
    wait_running(&c, "wiki").await?;
    wait_for(
        "the page after a restart",
        Duration::from_secs(60),
        || async {
            Ok(wiki
                .page("Homeport_Test")
                .await
                .is_ok_and(|p| p.contains(text)))
        },
    )
    .await?;

    // An agent restart: kill -9, start again; the app and the database server are adopted.
    let mut agent = w.agent;
    agent.kill9();
    agent.spawn()?;
    let c = agent.client();
    wait_running(&c, "wiki").await?;
    // This test's proxy listens on a port chosen at each start.
    let port = https_port(&c.get("/v1/info").await?)?;
    let wiki = Wiki::at(&ca, &host, port)?;
    assert!(wiki.page("Homeport_Test").await?.contains(text));
    let health = summary(&c, "wiki").await?.health;
    assert!(
        health.is_some(),
        "the health check is watched after the restart"
    );
    Ok(())
}
