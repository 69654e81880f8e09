//! A real ACME server for tests: Debian's `pebble` with `pebble-challtestsrv` as its DNS,
//! which answers every name with 127.0.0.1 (so validations reach the agent's proxy on this
//! machine). Pebble validates for real (no always-valid shortcut) and keeps its default 5 %
//! nonce rejection, so clients must retry.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::registry::free_port;

pub struct Pebble {
    pebble: Child,
    dns: Child,
    dir: tempfile::TempDir,
    port: u16,
    management: u16,
    dns_management: u16,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("run openssl")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn curl(args: &[&str]) -> Result<String> {
    let out = Command::new("curl")
        .args(["-sS", "--fail"])
        .args(args)
        .output()
        .context("run curl")?;
    if !out.status.success() {
        bail!("curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_listening(port: u16, child: &mut Child, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited early ({status})");
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on port {port} in time");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Pebble {
    /// Starts pebble, validating HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port` of
    /// 127.0.0.1 (where the agent's proxy listens).
    pub fn start(http_port: u16, tls_port: u16) -> Result<Pebble> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        // Pebble's own HTTPS endpoint needs a certificate; the package ships none.
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=pebble test CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
            ],
        )?;
        std::fs::write(
            d.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
        )?;
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                "/CN=localhost",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
            ],
        )?;
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
                "-out",
                "server.crt",
            ],
        )?;
        let (port, management, dns_port, dns_management) =
            (free_port()?, free_port()?, free_port()?, free_port()?);
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": d.join("server.crt"),
            "privateKey": d.join("server.key"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        std::fs::write(d.join("pebble.json"), config.to_string())?;
        let log = |name: &str| -> Result<Stdio> { Ok(std::fs::File::create(d.join(name))?.into()) };
        let mut dns = Command::new("pebble-challtestsrv")
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{dns_management}")])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(log("challtestsrv.log")?)
            .stderr(log("challtestsrv.err")?)
            .spawn()
            .context("start pebble-challtestsrv (apt install pebble)")?;
        if let Err(e) = wait_listening(dns_management, &mut dns, "pebble-challtestsrv") {
            let _ = dns.kill();
            let _ = dns.wait();
            return Err(e);
        }
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(d.join("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}"), "-strict"])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .stdout(log("pebble.log")?)
            .stderr(log("pebble.err")?)
            .spawn();
        let pebble = match pebble {
            Ok(p) => p,
            Err(e) => {
                let _ = dns.kill();
                let _ = dns.wait();
                return Err(anyhow::Error::from(e).context("start pebble (apt install pebble)"));
            }
        };
        let mut p = Pebble {
            pebble,
            dns,
            dir,
            port,
            management,
            dns_management,
        };
        wait_listening(port, &mut p.pebble, "pebble")?;
        Ok(p)
    }

    /// The ACME directory URL.
    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    /// The CA pebble's own HTTPS endpoint chains to (what the ACME client must trust).
    pub fn api_root(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The root that certificates pebble issues chain to (what TLS clients must trust).
    pub fn issuing_root(&self) -> Result<String> {
        let url = format!("https://127.0.0.1:{}/roots/0", self.management);
        curl(&["--cacert", &self.api_root().display().to_string(), &url])
    }

    /// Makes DNS lookups of `host` fail (SERVFAIL), so validations of it fail.
    pub fn break_dns(&self, host: &str) -> Result<()> {
        let body = serde_json::json!({"host": format!("{}.", host.trim_end_matches('.'))});
        let url = format!("http://127.0.0.1:{}/set-servfail", self.dns_management);
        curl(&["-X", "POST", "--data", &body.to_string(), &url]).map(|_| ())
    }

    /// Pebble's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in [&mut self.pebble, &mut self.dns] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
