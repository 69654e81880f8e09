//! The registries start, take pushes, enforce their auth and go away on drop.

#![allow(clippy::unwrap_used)] // tests may unwrap what they just built

mod common;

use anyhow::{ensure, Result};
use common::{inspect_config, skopeo};
use homeport_testkit::{push_busybox, skopeo_pull, BusyboxOpts, Registry};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;

/// Raw HTTP/1.0 GET; returns the whole response as text.
fn http_get(host: &str, target: &str, headers: &str) -> Result<String> {
    let mut stream = TcpStream::connect(host)?;
    write!(
        stream,
        "GET {target} HTTP/1.0\r\nHost: {host}\r\n{headers}\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// The status code of a raw response.
fn status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

fn push_and_inspect(reg: &Registry) -> Result<()> {
    let digest = push_busybox(reg, "team/busybox", "v1", &BusyboxOpts::default())?;
    ensure!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );
    let config = inspect_config(reg, "team/busybox:v1", &[])?;
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["config"]["Cmd"][0], "/bin/httpd");
    Ok(())
}

fn gone_after_drop(reg: Registry) -> Result<()> {
    let host = reg.host();
    let dir: PathBuf = reg.storage_dir();
    ensure!(dir.exists());
    drop(reg);
    ensure!(
        TcpStream::connect(&host).is_err(),
        "registry still listening on {host}"
    );
    ensure!(!dir.exists(), "{} left behind", dir.display());
    Ok(())
}

#[test]
fn anonymous_registry() -> Result<()> {
    let reg = Registry::start()?;
    assert!(reg.host().starts_with("127.0.0.1:"));
    assert_eq!(reg.credentials(), None);
    assert_eq!(status(&http_get(&reg.host(), "/v2/", "")?), 200);
    push_and_inspect(&reg)?;
    let log = std::fs::read_to_string(reg.log_path())?;
    assert!(
        log.contains(&format!("listening on {}", reg.host())),
        "{log}"
    );
    gone_after_drop(reg)
}

#[test]
fn basic_auth_registry() -> Result<()> {
    let reg = Registry::start_basic_auth("alice", "s3cret pass")?;
    assert_eq!(
        reg.credentials(),
        Some(("alice".to_owned(), "s3cret pass".to_owned()))
    );
    let response = http_get(&reg.host(), "/v2/", "")?;
    assert!(status(&response) == 401, "{response}");
    assert!(response.contains("Www-Authenticate: Basic"), "{response}");
    push_and_inspect(&reg)?;

    let reference = format!("docker://{}/team/busybox:v1", reg.host());
    let out = skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--creds",
        "alice:wrong",
        &reference,
    ])?;
    assert!(!out.status.success(), "wrong password accepted");
    gone_after_drop(reg)
}

#[test]
fn token_auth_registry() -> Result<()> {
    let reg = Registry::start_token_auth("bob", "hunter2")?;
    let realm = reg.token_realm().unwrap_or_default();
    let response = http_get(&reg.host(), "/v2/", "")?;
    assert!(status(&response) == 401, "{response}");
    assert!(
        response.contains(&format!("Www-Authenticate: Bearer realm=\"{realm}\"")),
        "{response}"
    );

    push_and_inspect(&reg)?;
    assert!(reg.token_requests() > 0);

    // A pull through the token server.
    let pulled = tempfile::tempdir()?;
    skopeo_pull(&reg, "team/busybox:v1", pulled.path(), "v1")?;
    assert!(pulled.path().join("index.json").exists());

    // Wrong password: the token server refuses, so does skopeo.
    let reference = format!("docker://{}/team/busybox:v1", reg.host());
    let out = skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--creds",
        "bob:wrong",
        &reference,
    ])?;
    assert!(!out.status.success(), "wrong password accepted");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("401") || stderr.contains("nauthorized"),
        "{stderr}"
    );

    // No credentials at all: refused too.
    let out = skopeo(&["inspect", "--tls-verify=false", "--no-creds", &reference])?;
    assert!(!out.status.success(), "anonymous pull accepted");

    // The token server by hand.
    let token_host = realm
        .trim_start_matches("http://")
        .trim_end_matches("/token")
        .to_owned();
    let scope = "service=homeport-test-registry&scope=repository%3Ateam%2Fbusybox%3Apull";
    let anonymous = http_get(&token_host, &format!("/token?{scope}"), "")?;
    assert!(status(&anonymous) == 401, "{anonymous}");
    // "bob:hunter2"
    let ok = http_get(
        &token_host,
        &format!("/token?{scope}"),
        "Authorization: Basic Ym9iOmh1bnRlcjI=\r\n",
    )?;
    assert!(status(&ok) == 200, "{ok}");
    let body = common::json(ok.split("\r\n\r\n").nth(1).unwrap_or_default().as_bytes())?;
    let token = body["token"].as_str().unwrap_or_default();
    assert_eq!(body["access_token"].as_str(), Some(token));
    assert_eq!(token.split('.').count(), 3);

    // The token opens the registry's API.
    let manifest = http_get(
        &reg.host(),
        "/v2/team/busybox/manifests/v1",
        &format!(
            "Authorization: Bearer {token}\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\n"
        ),
    )?;
    assert!(status(&manifest) == 200, "{manifest}");
    // But only for the repository it names.
    let other = http_get(
        &reg.host(),
        "/v2/other/manifests/v1",
        &format!("Authorization: Bearer {token}\r\n"),
    )?;
    assert!(status(&other) == 401, "{other}");

    gone_after_drop(reg)
}

#[test]
fn drop_during_panic_stops_the_registry() -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let reg = Registry::start_token_auth("u", "p").expect("registry starts");
        let _ = tx.send((reg.host(), reg.token_realm(), reg.storage_dir()));
        panic!("test failure with a registry running");
    })
    .join();
    assert!(result.is_err());
    let (host, realm, dir) = rx.recv()?;
    ensure!(TcpStream::connect(&host).is_err(), "registry still up");
    let token_host = realm
        .unwrap_or_default()
        .replace("http://", "")
        .replace("/token", "");
    ensure!(
        TcpStream::connect(&token_host).is_err(),
        "token server still up"
    );
    ensure!(!dir.exists(), "storage left behind");
    Ok(())
}
