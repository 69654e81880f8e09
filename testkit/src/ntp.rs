//! A real NTP server: chronyd serving the host's time on loopback (guests under QEMU reach
//! it as 10.0.2.2), without touching the host's clock (`-x`).

use anyhow::{Context, Result};
use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NtpServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl NtpServer {
    /// Serves the host's time on `127.0.0.1` at a free UDP port until dropped.
    pub fn start() -> Result<NtpServer> {
        let port = UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = tempfile::Builder::new()
            .prefix("homeport-ntp-")
            .tempdir()
            .context("make chronyd's folder")?;
        let conf = dir.path().join("chrony.conf");
        // `local`: serve as a stratum 5 source whatever chronyd thinks of its own sources
        // (it has none); no command sockets (a second chronyd may run on the host).
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbindaddress 127.0.0.1\nallow all\nlocal stratum 5\n\
                 cmdport 0\nbindcmdaddress /\npidfile {}\n",
                dir.path().join("chronyd.pid").display()
            ),
        )?;
        let mut child = Command::new("chronyd")
            .args(["-x", "-d", "-u", "root", "-f"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start chronyd (package chrony)")?;
        // Ready when it answers a client request (mode 3, version 4).
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut request = [0u8; 48];
        request[0] = 0x23;
        loop {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("chronyd exited: {status}");
            }
            sock.send_to(&request, ("127.0.0.1", port))?;
            let mut reply = [0u8; 48];
            if matches!(sock.recv(&mut reply), Ok(48)) && reply[0] & 0x07 == 4 {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("chronyd did not answer on 127.0.0.1:{port}");
            }
        }
        Ok(NtpServer {
            child,
            port,
            _dir: dir,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for NtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
