//! The device owner's view of a guest: the agent's API over TLS, and the apps through the
//! proxy, from the host through the forwarded ports.

use crate::guest::{Guest, BOOT_TIMEOUT};
use anyhow::{bail, Context, Result};
use reqwest::blocking::Client;
use std::net::SocketAddr;
use std::time::Duration;

/// The name the API's certificate is for (the device's default name).
pub const DEVICE_NAME: &str = "homeport.local";

pub struct Owner {
    pub token: String,
    /// The device CA's certificate (PEM), as fetched and checked against the console.
    pub ca_pem: String,
    /// SHA-256 of the CA certificate's DER, hex, as the console showed it.
    pub fingerprint: String,
    api: SocketAddr,
    client: Client,
}

impl Owner {
    /// Reads the owner token and the CA fingerprint the agent printed on the console at its
    /// first start, then [`Owner::connect`]s.
    pub fn from_console(guest: &Guest) -> Result<Owner> {
        let console = guest.console();
        let value = |prefix: &str| {
            console
                .lines()
                .find_map(|l| l.split_once(prefix).map(|(_, v)| v.trim().to_string()))
                .with_context(|| format!("the console shows no {prefix:?} line"))
        };
        let token = value("homeport: owner token=")?;
        let fingerprint = value("homeport: device ca sha256=")?;
        Owner::connect(guest, &token, &fingerprint)
    }

    /// Once the console shows the guest reachable ([`Guest::wait_reachable`]): fetches the
    /// CA certificate without verification (it is public), checks it against `fingerprint`
    /// (what the console showed), and makes a client that trusts only it.
    pub fn connect(guest: &Guest, token: &str, fingerprint: &str) -> Result<Owner> {
        guest.wait_reachable(BOOT_TIMEOUT)?;
        let api = guest.api_addr();
        let unverified = Client::builder()
            .danger_accept_invalid_certs(true)
            .resolve(DEVICE_NAME, api)
            .timeout(Duration::from_secs(30))
            .build()?;
        let ca_pem = unverified
            .get(format!("https://{DEVICE_NAME}:{}/v1/ca.crt", api.port()))
            .send()
            .context("fetch the device CA")?
            .error_for_status()?
            .text()?;
        let got = homeport::appliance::ca_fingerprint(&ca_pem)
            .context("the device CA is not a PEM certificate")?;
        if got != fingerprint {
            bail!("the device CA's fingerprint is {got}, the console showed {fingerprint}");
        }
        let client = pinned(&ca_pem, &[(DEVICE_NAME, api)])?;
        Ok(Owner {
            token: token.to_string(),
            ca_pem,
            fingerprint: fingerprint.to_string(),
            api,
            client,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("https://{DEVICE_NAME}:{}{path}", self.api.port())
    }

    /// `GET path` with the owner's token: status and body.
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        let r = self
            .client
            .get(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .with_context(|| format!("GET {path}"))?;
        Ok((r.status().as_u16(), r.text()?))
    }

    /// `GET path` without a token.
    pub fn get_anonymous(&self, path: &str) -> Result<u16> {
        let r = self.client.get(self.url(path)).send()?;
        Ok(r.status().as_u16())
    }

    /// `GET path`, which must answer 200 with JSON of type `T`.
    pub fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let (status, body) = self.get(path)?;
        if status != 200 {
            bail!("GET {path}: {status} {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("GET {path}: {body}"))
    }

    /// `POST path` with a JSON body and the owner's token: status and body (read to the
    /// end: an install answers with a stream of NDJSON lines until it is done).
    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> Result<(u16, String)> {
        let r = self
            .client
            .post(self.url(path))
            .bearer_auth(&self.token)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body)?)
            .timeout(Duration::from_secs(600))
            .send()
            .with_context(|| format!("POST {path}"))?;
        Ok((r.status().as_u16(), r.text()?))
    }

    /// `PUT path` with a JSON body and the owner's token: status and body.
    pub fn put_json(&self, path: &str, body: &serde_json::Value) -> Result<(u16, String)> {
        let r = self
            .client
            .put(self.url(path))
            .bearer_auth(&self.token)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body)?)
            .send()
            .with_context(|| format!("PUT {path}"))?;
        Ok((r.status().as_u16(), r.text()?))
    }

    /// Asks the appliance to power off or reboot (`POST /v1/system/{kind}`); fails unless
    /// the agent accepts (202).
    pub fn shutdown(&self, kind: &str) -> Result<()> {
        let path = format!("/v1/system/{kind}");
        let (status, body) = self.post_json(&path, &serde_json::json!({}))?;
        if status != 202 {
            bail!("POST {path}: {status} {body}");
        }
        Ok(())
    }

    /// Installs an app from its manifest; fails unless the install stream ends with `done`.
    pub fn install(&self, manifest: &str) -> Result<()> {
        let (status, body) =
            self.post_json("/v1/apps", &serde_json::json!({ "manifest": manifest }))?;
        let last = body.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
        let done = serde_json::from_str::<serde_json::Value>(last)
            .ok()
            .is_some_and(|v| v.get("done").is_some());
        if status != 200 || !done {
            bail!("install failed: {status} {body}");
        }
        Ok(())
    }

    /// `GET https://<host><path>` through the proxy's forwarded HTTPS port, trusting only
    /// the device CA: status and body.
    pub fn app_get(&self, guest: &Guest, host: &str, path: &str) -> Result<(u16, String)> {
        let addr = guest.https_addr();
        let client = pinned(&self.ca_pem, &[(host, addr)])?;
        let r = client
            .get(format!("https://{host}:{}{path}", addr.port()))
            .send()
            .with_context(|| format!("GET https://{host}{path}"))?;
        Ok((r.status().as_u16(), r.text()?))
    }

    /// `GET http://<host><path>` through the forwarded plain HTTP port, without following
    /// redirects: status and `Location`.
    pub fn app_get_plain(
        &self,
        guest: &Guest,
        host: &str,
        path: &str,
    ) -> Result<(u16, Option<String>)> {
        let addr = guest.http_addr();
        let client = Client::builder()
            .resolve(host, addr)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()?;
        let r = client
            .get(format!("http://{host}:{}{path}", addr.port()))
            .send()?;
        let location = r
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok((r.status().as_u16(), location))
    }
}

/// A client that trusts only `ca_pem` and sends the given names to the given addresses.
fn pinned(ca_pem: &str, names: &[(&str, SocketAddr)]) -> Result<Client> {
    let mut b = Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes())?)
        .timeout(Duration::from_secs(60));
    for (name, addr) in names {
        b = b.resolve(name, *addr);
    }
    Ok(b.build()?)
}
