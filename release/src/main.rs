//! `homeport-release`: keys, repository and releases of Homeport OS updates (docs/releases.md).

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use homeport_release::{Expires, Expiry, InitOptions, RefreshOptions};

#[derive(Parser)]
#[command(
    name = "homeport-release",
    version,
    about = "Sign Homeport OS updates (TUF)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make one Ed25519 key per role (root, targets, snapshot, timestamp) in DIR
    Keygen {
        #[arg(long, value_name = "DIR")]
        keys: PathBuf,
    },
    /// Write a new repository: root version 1 and empty targets
    Init {
        #[arg(long, value_name = "DIR")]
        keys: PathBuf,
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        #[arg(long, default_value = "365d")]
        root_expires: Expires,
        #[command(flatten)]
        expiry: ExpiryArgs,
    },
    /// Publish an image build's update artifacts (the build's <name>.update.json)
    Publish {
        #[arg(long, value_name = "DIR")]
        keys: PathBuf,
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        #[arg(long, value_name = "PATH")]
        update_json: PathBuf,
        #[command(flatten)]
        expiry: ExpiryArgs,
    },
    /// Sign a new timestamp (and snapshot when it expires soon): for a server's cron
    Refresh {
        #[arg(long, value_name = "DIR")]
        keys: PathBuf,
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        #[arg(long, default_value = "1d")]
        timestamp_expires: Expires,
        #[arg(long, default_value = "7d")]
        snapshot_expires: Expires,
    },
    /// Move the repository to the keys in NEW, the new root signed by the old root key too
    RotateRoot {
        /// The current keys (only the root key is used)
        #[arg(long, value_name = "OLD")]
        keys: PathBuf,
        /// The new keys, all four (make them with keygen)
        #[arg(long, value_name = "NEW")]
        new_keys: PathBuf,
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        #[arg(long, default_value = "365d")]
        root_expires: Expires,
        #[command(flatten)]
        expiry: ExpiryArgs,
    },
    /// Keep the newest N releases of each board; delete what no device can still need
    Prune {
        #[arg(long, value_name = "DIR")]
        keys: PathBuf,
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        #[arg(long, value_name = "N")]
        keep: NonZeroUsize,
        #[command(flatten)]
        expiry: ExpiryArgs,
    },
}

/// Lifetimes (`30d`, `12h`, `90m`) or times (`2030-01-01T00:00:00Z`).
#[derive(Args)]
struct ExpiryArgs {
    #[arg(long, default_value = "30d")]
    targets_expires: Expires,
    #[arg(long, default_value = "7d")]
    snapshot_expires: Expires,
    #[arg(long, default_value = "1d")]
    timestamp_expires: Expires,
}

impl From<ExpiryArgs> for Expiry {
    fn from(a: ExpiryArgs) -> Self {
        Expiry {
            targets: a.targets_expires,
            snapshot: a.snapshot_expires,
            timestamp: a.timestamp_expires,
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keygen { keys } => {
            for path in homeport_release::keygen(&keys)? {
                println!("wrote {}", path.display());
            }
        }
        Command::Init {
            keys,
            repo,
            root_expires,
            expiry,
        } => {
            let opts = InitOptions {
                root_expires,
                expiry: expiry.into(),
            };
            homeport_release::init(&keys, &repo, &opts).await?;
            println!(
                "initialised {} (root version 1: {})",
                repo.display(),
                repo.join("1.root.json").display()
            );
        }
        Command::Publish {
            keys,
            repo,
            update_json,
            expiry,
        } => {
            let p = homeport_release::publish(&keys, &repo, &update_json, &expiry.into()).await?;
            for t in &p.targets {
                println!("{}  {} bytes  sha256 {}", t.name, t.length, t.sha256);
            }
            println!(
                "published {} {}: targets v{}, snapshot v{}, timestamp v{} (expires {})",
                p.board,
                p.version,
                p.targets_version,
                p.snapshot_version,
                p.timestamp_version,
                p.timestamp_expires
            );
        }
        Command::Refresh {
            keys,
            repo,
            timestamp_expires,
            snapshot_expires,
        } => {
            let opts = RefreshOptions {
                timestamp: timestamp_expires,
                snapshot: snapshot_expires,
            };
            let r = homeport_release::refresh(&keys, &repo, &opts).await?;
            if let Some((version, expires)) = r.snapshot {
                println!("snapshot v{version} (expires {expires})");
            }
            println!(
                "timestamp v{} (expires {})",
                r.timestamp_version, r.timestamp_expires
            );
            let left = r.targets_expires.duration_since(jiff::Timestamp::now());
            if left < jiff::SignedDuration::from_hours(7 * 24) {
                eprintln!(
                    "warning: targets metadata expires at {}: publish again (targets key)",
                    r.targets_expires
                );
            }
        }
        Command::RotateRoot {
            keys,
            new_keys,
            repo,
            root_expires,
            expiry,
        } => {
            let opts = InitOptions {
                root_expires,
                expiry: expiry.into(),
            };
            let r = homeport_release::rotate_root(&keys, &new_keys, &repo, &opts).await?;
            println!(
                "root v{} (expires {}), targets v{}, snapshot v{}, timestamp v{}",
                r.root_version,
                r.root_expires,
                r.targets_version,
                r.snapshot_version,
                r.timestamp_version
            );
        }
        Command::Prune {
            keys,
            repo,
            keep,
            expiry,
        } => {
            let p = homeport_release::prune(&keys, &repo, keep, &expiry.into()).await?;
            for (board, version) in &p.releases {
                println!("dropped {board} {version}");
            }
            if let Some((t, s, ts)) = p.versions {
                println!("targets v{t}, snapshot v{s}, timestamp v{ts}");
            }
            println!("deleted {} files", p.files.len());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("homeport-release: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("homeport-release: {e:#}");
            ExitCode::FAILURE
        }
    }
}
