//! The `homeport-init` binary; see the library for what it does.

use std::process::ExitCode;

fn main() -> ExitCode {
    ExitCode::from(homeport_init::run())
}
