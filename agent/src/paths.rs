//! Where everything lives under the data directory. One place, so nothing guesses a path.
//!
//! ```text
//! DATA/state.db                  SQLite (WAL)
//! DATA/agent.sock                the API socket (0600, root)
//! DATA/layers/<id>/              one unpacked layer (an overlayfs lower dir), shared by images
//! DATA/layers/empty/             an empty lower dir for single-layer images
//! DATA/tmp/                      downloads and unpacks in progress; emptied at start
//! DATA/apps/<app>/rootfs/        the app's read-only overlay mount
//! DATA/apps/<app>/bundle/        OCI bundle (config.json)
//! DATA/apps/<app>/etc/hosts      bind-mounted into the app (and etc/resolv.conf)
//! DATA/apps/<app>/netns          the app's network namespace (a bind mount)
//! DATA/apps/<app>/logs/          current.log and current.log.1
//! DATA/volumes/<app>/<volume>/   app data; survives `rm` unless --purge-data
//! DATA/runtime/                  libcontainer state of running containers
//! ```

use std::path::{Path, PathBuf};

use crate::manifest::AppName;

#[derive(Debug, Clone)]
pub struct Paths {
    data: PathBuf,
}

impl Paths {
    pub fn new(data: impl Into<PathBuf>) -> Paths {
        Paths { data: data.into() }
    }
    pub fn data(&self) -> &Path {
        &self.data
    }
    pub fn db(&self) -> PathBuf {
        self.data.join("state.db")
    }
    pub fn socket(&self) -> PathBuf {
        self.data.join("agent.sock")
    }
    pub fn layers(&self) -> PathBuf {
        self.data.join("layers")
    }
    pub fn layer(&self, id: i64) -> PathBuf {
        self.layers().join(id.to_string())
    }
    pub fn empty_layer(&self) -> PathBuf {
        self.layers().join("empty")
    }
    pub fn tmp(&self) -> PathBuf {
        self.data.join("tmp")
    }
    pub fn apps(&self) -> PathBuf {
        self.data.join("apps")
    }
    pub fn app(&self, name: &AppName) -> PathBuf {
        self.apps().join(name.as_str())
    }
    pub fn rootfs(&self, name: &AppName) -> PathBuf {
        self.app(name).join("rootfs")
    }
    pub fn bundle(&self, name: &AppName) -> PathBuf {
        self.app(name).join("bundle")
    }
    pub fn hosts(&self, name: &AppName) -> PathBuf {
        self.app(name).join("etc").join("hosts")
    }
    /// The trust bundle mounted over the app's `/etc/ssl/certs/ca-certificates.crt`: the
    /// image's own bundle plus the device CA.
    pub fn trust_bundle(&self, name: &AppName) -> PathBuf {
        self.app(name).join("etc").join("ca-certificates.crt")
    }
    /// ACME account and certificates for the public domain.
    pub fn acme(&self) -> PathBuf {
        self.data().join("acme")
    }
    /// The device CA (`ca.key`, `ca.crt`).
    pub fn ca(&self) -> PathBuf {
        self.data().join("ca")
    }
    pub fn resolv_conf(&self, name: &AppName) -> PathBuf {
        self.app(name).join("etc").join("resolv.conf")
    }
    pub fn netns(&self, name: &AppName) -> PathBuf {
        self.app(name).join("netns")
    }
    pub fn logs(&self, name: &AppName) -> PathBuf {
        self.app(name).join("logs")
    }
    pub fn log(&self, name: &AppName) -> PathBuf {
        self.logs(name).join("current.log")
    }
    pub fn app_volumes(&self, name: &AppName) -> PathBuf {
        self.data.join("volumes").join(name.as_str())
    }
    pub fn volume(&self, name: &AppName, volume: &str) -> PathBuf {
        self.app_volumes(name).join(volume)
    }
    /// Where the further containers (`[[container]]`) and hook runs of an app keep their
    /// rootfs and bundle: `apps/<app>/c/<container>/`.
    pub fn container(&self, name: &AppName, container: &str) -> PathBuf {
        self.app(name).join("c").join(container)
    }
    /// The shared services' state (`services/postgres/`).
    pub fn services(&self) -> PathBuf {
        self.data.join("services")
    }
    /// An app's cache server: its pidfile and log.
    pub fn cache(&self, name: &AppName) -> PathBuf {
        self.app(name).join("cache")
    }
    pub fn runtime(&self) -> PathBuf {
        self.data.join("runtime")
    }
}
