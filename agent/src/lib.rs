//! Homeport: the agent (`homeportd`) and the library the CLI (`homeport`) shares with it.
//!
//! See ARCHITECTURE.md at the repository root for the code map and invariants.

pub mod api;
pub mod appliance;
pub mod clock;
pub mod daemon;
pub mod files;
pub mod images;
pub mod manifest;
pub mod net;
pub mod os;
pub mod paths;
pub mod proxy;
pub mod runtime;
pub mod services;
pub mod store;

/// Fault injection for the crash-safety tests: when `HOMEPORT_CRASHPOINT` names this point,
/// the agent SIGKILLs itself here, exactly as `kill -9` would. Costs one comparison otherwise.
pub fn crashpoint(name: &str) {
    static POINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if POINT
        .get_or_init(|| std::env::var("HOMEPORT_CRASHPOINT").ok())
        .as_deref()
        == Some(name)
    {
        tracing::warn!(point = name, "crash point reached; killing the agent");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
