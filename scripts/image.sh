#!/usr/bin/env bash
# Builds the appliance's disk image for a board (default qemu-x86_64) into target/image/BOARD/:
# installs the build tools (scripts/deps.sh), builds homeport-init (static, musl) and the agent
# (release), then runs image-build/build.sh, which does nothing when no input changed.
#   scripts/image.sh [BOARD]
# An arm64 board (arm64-uefi) on an amd64 host: the three binaries are cross-built for
# aarch64-unknown-linux-gnu into target/arm64/ (homeport-init linked statically) with Debian's
# rustc and its aarch64 std (HOMEPORT_CROSS_RUSTC, default /usr/bin/rustc: rustup's toolchain
# has no aarch64 std here) and the aarch64 gcc as linker.
# Updates: the image trusts HOMEPORT_UPDATE_ROOT (a TUF root.json); unset, a development key set
# in target/homeport-keys/ and its repository target/homeport-repo/ are made on first use and
# the image trusts target/homeport-repo/1.root.json (docs/releases.md).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "image: run as root (mmdebstrap, file ownership in the image)" >&2; exit 1; }
board=${1:-qemu-x86_64}
conf=board-support/$board/board.conf
[ -f "$conf" ] || { echo "image: no board $board ($conf)" >&2; exit 2; }
arch=$(sed -n 's/^ARCH=//p' "$conf")
# SOURCE_DATE_EPOCH dates the image, not the binaries: C build scripts (ring, zstd, sqlite)
# rebuild when it changes, and a later release of the same tree must carry the same agent.
cargo() { env -u SOURCE_DATE_EPOCH cargo "$@"; }
./scripts/deps.sh
# The cross build's environment (only for the cargo commands below: homeport-release runs
# on the host).
cross() {
	local target=aarch64-unknown-linux-gnu
	env -u SOURCE_DATE_EPOCH RUSTC="${HOMEPORT_CROSS_RUSTC:-/usr/bin/rustc}" CARGO_TARGET_DIR="$PWD/target/arm64" \
		CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
		CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar \
		PKG_CONFIG_ALLOW_CROSS=1 PKG_CONFIG_PATH=/usr/lib/aarch64-linux-gnu/pkgconfig \
		cargo "$1" --release --locked --target "$target" "${@:2}"
}
case $arch in
"$(dpkg --print-architecture)")
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
	;;
arm64)
	# crt-static for homeport-init's link only: `cargo rustc` gives it to the binary, not to
	# its dependencies (RUSTFLAGS would build them all a second time with other flags).
	cross rustc -p homeport-init --bin homeport-init -- -C target-feature=+crt-static
	cross build -p homeport-agent
	out=$PWD/target/arm64/aarch64-unknown-linux-gnu/release
	file -L "$out/homeport-init" | grep -q 'static' ||
		{ echo "image: $out/homeport-init is not statically linked: $(file -L "$out/homeport-init")" >&2; exit 1; }
	export HOMEPORT_INIT_BIN=$out/homeport-init HOMEPORT_AGENT_BIN=$out/homeportd HOMEPORT_CLI_BIN=$out/homeport
	;;
*)
	echo "image: board $board is $arch: no cross build for it on $(dpkg --print-architecture)" >&2
	exit 1
	;;
esac
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
