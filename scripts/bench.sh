#!/usr/bin/env bash
# Benchmarks (not tests): Homeport against crun, skopeo+umoci and nginx on this machine, in one
# run (`proxy` alone takes about three minutes).
# Figures are printed and written to target/bench/NAME.json.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench: run as root" >&2; exit 1; }
./scripts/deps.sh
cargo build --release --locked --workspace
exec ./target/release/homeport-bench "${1:-all}" --bin-dir ./target/release
