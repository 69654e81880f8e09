#!/usr/bin/env bash
# The appliance image's benchmark: sizes, cold and warm build times, and boot times under
# TCG split into firmware, kernel, initramfs and init -> agent ready. Writes
# target/bench/image.json and prints it. About 5 minutes (--no-cold: about 2).
#   scripts/bench-image.sh [--boots N] [--no-cold] [--no-build]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench-image: run as root" >&2; exit 1; }
./scripts/image.sh qemu-x86_64
cargo build --locked -p homeport-qemu-tests --bin homeport-image-bench
HOMEPORT_QEMU_NO_BUILD=1 exec ./target/debug/homeport-image-bench "$@"
