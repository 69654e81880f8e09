#!/usr/bin/env bash
# The full test suite: formatting, lints, unit and integration tests (as root, against a real
# docker-registry and real containers).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "test: run as root (containers, mounts, cgroups)" >&2; exit 1; }
./scripts/deps.sh
# A one-off build: incremental artefacts would only take disk space (tens of GiB here).
export CARGO_INCREMENTAL=0
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
./scripts/fuzz.sh
