#!/usr/bin/env bash
# Benchmarks (not tests): Homeport against crun, skopeo+umoci and nginx on this machine, in one
# run (`proxy` alone takes about three minutes).
# Figures are printed and written to target/bench/NAME.json.
#   scripts/bench.sh [start|pull|memory|network|throughput|proxy|services|all]
#   scripts/bench.sh image [--boots N] [--no-build] [--no-cold]   # the appliance image: sizes,
#     cold and warm build, TCG boot split (~5 min; not part of all)
#   scripts/bench.sh os-update   # an OS update N -> N+1 under QEMU (~5 min; not part of all)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench: run as root" >&2; exit 1; }
./scripts/deps.sh
cargo build --release --locked --workspace
exec ./target/release/homeport-bench "${@:-all}" --bin-dir ./target/release
