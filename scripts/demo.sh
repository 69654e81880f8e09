#!/usr/bin/env bash
# Homeport's main job, for now: the agent in host mode with a sample app installed.
# Starts a local registry holding a sample image, homeportd with its state in
# /var/lib/homeport-demo, installs the app, prints how to reach it, and waits for Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo: run as root" >&2; exit 1; }
./scripts/deps.sh
cargo build --release --locked -p homeport-agent -p homeport-testkit
exec ./target/release/homeport-demo --bin-dir ./target/release "$@"
