#!/usr/bin/env bash
# Builds the appliance's disk image for a board (default qemu-x86_64) into target/image/BOARD/:
# installs the build tools (scripts/deps.sh), builds homeport-init (static, musl) and the agent
# (release), then runs image-build/build.sh, which does nothing when no input changed.
#   scripts/image.sh [BOARD]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "image: run as root (mmdebstrap, file ownership in the image)" >&2; exit 1; }
board=${1:-qemu-x86_64}
./scripts/deps.sh
target=x86_64-unknown-linux-musl
if rustup target list --installed 2>/dev/null | grep -qx "$target"; then
	cargo build --release --locked -p homeport-init --target "$target"
	export HOMEPORT_INIT_BIN=$PWD/target/$target/release/homeport-init
else
	# glibc linked statically works too (init/README.md).
	RUSTFLAGS="-C target-feature=+crt-static" \
		cargo build --release --locked -p homeport-init --target x86_64-unknown-linux-gnu
	export HOMEPORT_INIT_BIN=$PWD/target/x86_64-unknown-linux-gnu/release/homeport-init
fi
cargo build --release --locked -p homeport-agent
exec ./image-build/build.sh "$board"
