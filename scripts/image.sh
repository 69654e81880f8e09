#!/usr/bin/env bash
# Builds the appliance's disk image for a board (default qemu-x86_64) into target/image/BOARD/:
# installs the build tools (scripts/deps.sh), builds homeport-init (static, musl) and the agent
# (release), then runs image-build/build.sh, which does nothing when no input changed.
#   scripts/image.sh [BOARD]
# Updates: the image trusts HOMEPORT_UPDATE_ROOT (a TUF root.json); unset, a development key set
# in target/homeport-keys/ and its repository target/homeport-repo/ are made on first use and
# the image trusts target/homeport-repo/1.root.json (docs/releases.md).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "image: run as root (mmdebstrap, file ownership in the image)" >&2; exit 1; }
board=${1:-qemu-x86_64}
# SOURCE_DATE_EPOCH dates the image, not the binaries: C build scripts (ring, zstd, sqlite)
# rebuild when it changes, and a later release of the same tree must carry the same agent.
cargo() { env -u SOURCE_DATE_EPOCH cargo "$@"; }
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
if [ -z "${HOMEPORT_UPDATE_ROOT:-}" ]; then
	keys=target/homeport-keys
	repo=target/homeport-repo
	release=(cargo run --quiet --release --locked -p homeport-release --)
	if [ ! -f "$repo/1.root.json" ]; then
		# keygen refuses to overwrite any key: a partial key folder stops here.
		[ -f "$keys/root.pk8" ] || "${release[@]}" keygen --keys "$keys" >/dev/null
		"${release[@]}" init --keys "$keys" --repo "$repo" >/dev/null
	fi
	export HOMEPORT_UPDATE_ROOT=$PWD/$repo/1.root.json
	echo "image: updates signed with DEVELOPMENT keys ($keys, repository $repo): not for devices you ship" >&2
fi
exec ./image-build/build.sh "$board"
