#!/usr/bin/env bash
# The arm64-uefi board's VM test, which the default suite (scripts/test.sh) leaves out for
# time: it cross-builds the binaries, builds the arm64 root under qemu-user (~14 min cold on
# 2 cores), assembles the image and boots it under qemu-system-aarch64 (TCG). As root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "test-arm64: run as root (mmdebstrap, binfmt_misc)" >&2; exit 1; }
./scripts/deps.sh
exec cargo test --locked -p homeport-qemu-tests --test arm64 -- --ignored --nocapture
