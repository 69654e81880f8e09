#!/usr/bin/env bash
# Builds Homeport's disk image for one board, with no mounts and no loop devices:
#
#   image-build/build.sh BOARD
#
# Stage 1 (slow, cached): the Debian root filesystem with mmdebstrap, kernel and initramfs
# included, as a tarball under $HOMEPORT_IMAGE_CACHE (default /var/cache/homeport-test),
# keyed by everything that goes into it (package lists, hooks, initramfs scripts, apt sources
# and indexes). Stage 2 (fast): our binaries and rootfs-overlay/ laid over it, the erofs root,
# one UKI per slot, the ESP, the GPT disk, and the compressed image plus update artifacts, in
# target/image/BOARD/. Nothing is rebuilt when no input changed (inputs.sha256).
#
# Binaries (build them first; scripts/image.sh does):
#   HOMEPORT_INIT_BIN   default target/x86_64-unknown-linux-musl/release/homeport-init (static)
#   HOMEPORT_AGENT_BIN  default target/release/homeportd
#   HOMEPORT_CLI_BIN    default target/release/homeport
# A board of another architecture than the host's (arm64-uefi on amd64) is built the same way:
# its root through qemu-user (registered with binfmt_misc here when missing), its UKI with
# that architecture's binutils (scripts/deps.sh installs both; scripts/image.sh cross-builds
# the binaries).
# Output: HOMEPORT_IMAGE_OUT (default target/image/<board>). HOMEPORT_CMDLINE_EXTRA is
# appended to the kernel command line (the VM tests build a release that fails its health
# check with homeport.fault=os-health).
# Update trust: HOMEPORT_UPDATE_ROOT, a TUF root.json (homeport-release init), becomes
# /usr/share/homeport/update/root.json, the root the device's updates are checked against;
# unset, the image has none and refuses updates (scripts/image.sh sets development keys).
# Version: SOURCE_DATE_EPOCH (default: the commit time of HEAD, or now when the work tree has
# changes) and IMAGE_VERSION = <workspace version>.<SOURCE_DATE_EPOCH>, or HOMEPORT_IMAGE_VERSION.
# See image-build/README.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
board=${1:?usage: image-build/build.sh BOARD}
conf=$repo/board-support/$board/board.conf
[ -f "$conf" ] || { echo "build: no board $board ($conf)" >&2; exit 2; }
# shellcheck source=../board-support/qemu-x86_64/board.conf
source "$conf"

cache=${HOMEPORT_IMAGE_CACHE:-/var/cache/homeport-test}
out=${HOMEPORT_IMAGE_OUT:-$repo/target/image/$board}
sources=${HOMEPORT_APT_SOURCES:-/etc/apt/sources.list.d/debian.sources}
init_bin=${HOMEPORT_INIT_BIN:-$repo/target/x86_64-unknown-linux-musl/release/homeport-init}
agent_bin=${HOMEPORT_AGENT_BIN:-$repo/target/release/homeportd}
cli_bin=${HOMEPORT_CLI_BIN:-$repo/target/release/homeport}
update_root=${HOMEPORT_UPDATE_ROOT:-}

# Packages of every image (the board adds KERNEL_PACKAGE and EXTRA_PACKAGES), and those
# purged before the package manifest is written: what only the build needs, and dependencies
# the device does not use (PostgreSQL's JIT: LLVM and Z3, 130 MB; Perl, used only by
# postgresql-common's wrapper scripts; locale sources: initdb uses the built-in C.UTF-8).
RUNTIME_PACKAGES="kmod libseccomp2 libnftables1 postgresql-15 redis-server btrfs-progs
  dhcpcd-base chrony ca-certificates dbus avahi-daemon busybox-static"
BUILD_ONLY_PACKAGES="initramfs-tools initramfs-tools-core klibc-utils libklibc cpio logsave
  udev zstd fdisk"
UNUSED_PACKAGES="libllvm14 libz3-4 perl perl-modules-5.36 libperl5.36 locales libc-l10n"

say() { printf 'build: %s\n' "$*" >&2; }
trap 'say "failed (status $?) at line $LINENO: $BASH_COMMAND"' ERR
die() { say "$*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
# A stable UUID from a name (reproducible images: same inputs, same UUIDs).
uuid_of() {
	local h
	h=$(printf '%s' "$1" | sha256sum | cut -c1-32)
	printf '%s-%s-4%s-a%s-%s\n' "${h:0:8}" "${h:8:4}" "${h:13:3}" "${h:17:3}" "${h:20:12}"
}
# Hash of a folder's files (names, modes and contents), independent of mtimes.
tree_hash() {
	(cd "$1" && find . \( -type f -o -type l \) -print0 | sort -z |
		xargs -0r sh -c 'for f; do
			if [ -L "$f" ]; then echo "$f -> $(readlink "$f")";
			else echo "$f $(stat -c %a "$f") $(sha256sum <"$f" | cut -c1-64)"; fi
		done' sh) | sha256sum | cut -c1-64
}

# A foreign ARCH (arm64 on an amd64 host): mmdebstrap runs the root's maintainer scripts
# through qemu-user, which the kernel must know as the interpreter of $ARCH's programs
# (binfmt_misc, flag F: the interpreter is opened when registered, so it works inside the
# chroot without a copy there). Registered here from qemu-user-static's binfmt.d file when
# missing (no systemd-binfmt or binfmt-support on build machines).
binfmt_foreign() { # QEMU_ARCH
	local name=qemu-$1 conf=/usr/lib/binfmt.d/qemu-$1.conf dir=/proc/sys/fs/binfmt_misc line
	[ -f "$conf" ] || die "board $board is $ARCH: building it on $host_arch needs qemu-user-static" \
		"($conf missing; scripts/deps.sh installs it)"
	command -v arch-test >/dev/null || die "arch-test is missing (mmdebstrap needs it for a foreign root; scripts/deps.sh)"
	if [ ! -f "$dir/status" ]; then
		mount -t binfmt_misc binfmt_misc "$dir" ||
			die "cannot mount binfmt_misc on $dir (a container without it cannot build $ARCH)"
	fi
	if [ ! -f "$dir/$name" ]; then
		line=$(grep -v '^#' "$conf" | head -n 1)
		case ${line##*:} in *F*) ;; *) line=${line}F ;; esac
		say "registering $name with binfmt_misc (from $conf)"
		printf '%s' "$line" >"$dir/register" || die "cannot register $name with binfmt_misc ($dir/register)"
	fi
	grep -qx enabled "$dir/status" || die "binfmt_misc is disabled ($dir/status)"
	grep -qx enabled "$dir/$name" || die "$dir/$name is disabled"
	grep -q '^flags:.*F' "$dir/$name" ||
		die "$name is registered without flag F (the chroot has no interpreter): unregister it" \
			"(echo -1 >$dir/$name) and build again"
	arch-test "$ARCH" >/dev/null || die "arch-test $ARCH fails although $name is registered"
}

host_arch=$(dpkg --print-architecture)
case $ARCH in
amd64) gnu_arch=x86_64 ;;
arm64) gnu_arch=aarch64 ;;
*) die "no toolchain for ARCH=$ARCH" ;;
esac
[ "$BOOTLOADER" = systemd-boot ] || die "bootloader $BOOTLOADER is not built yet (board-support/$board/README.md)"
# systemd-boot and the UKI stub: the host's systemd-boot-efi for the host's architecture;
# for a foreign one, the package is installed into the root, its files copied out by a
# customize hook into the cached stage (efi/) and purged with the other build-only packages.
# Binutils for the board's PE and ELF files: the host's objcopy does not know pei-aarch64.
if [ "$ARCH" = "$host_arch" ]; then
	binutils=""
	efi_dir=/usr/lib/systemd/boot/efi
	boot_packages=""
else
	binutils=$gnu_arch-linux-gnu-
	efi_dir=""
	boot_packages=systemd-boot-efi
fi
objcopy=${binutils}objcopy objdump=${binutils}objdump strip=${binutils}strip
for t in mmdebstrap mkfs.erofs mkfs.vfat mcopy sfdisk mkfs.btrfs "$objcopy" "$objdump" "$strip" zstd flock; do
	command -v "$t" >/dev/null || die "$t is missing (scripts/deps.sh installs the build tools)"
done
if [ -n "$efi_dir" ]; then
	[ -f "$efi_dir/linux${EFI_ARCH}.efi.stub" ] && [ -f "$efi_dir/systemd-boot${EFI_ARCH}.efi" ] ||
		die "$efi_dir/linux${EFI_ARCH}.efi.stub missing (package systemd-boot-efi)"
fi
for b in "$init_bin" "$agent_bin" "$cli_bin"; do
	[ -x "$b" ] || die "$b missing: build it first (scripts/image.sh does)"
done
file -L "$init_bin" | grep -q 'static' || die "$init_bin is not statically linked"
if [ -n "$update_root" ]; then
	[ -f "$update_root" ] || die "HOMEPORT_UPDATE_ROOT=$update_root: no such file"
	grep -q '"_type": *"root"' "$update_root" ||
		die "HOMEPORT_UPDATE_ROOT=$update_root is not TUF root metadata (homeport-release init writes one)"
fi

mkdir -p "$out" "$cache"
exec 9>"$out/.lock"
flock 9

# ---- Version -------------------------------------------------------------------------------
version_id=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$repo/Cargo.toml")
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
	SOURCE_DATE_EPOCH=$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)
	if [ -n "$(git -C "$repo" status --porcelain 2>/dev/null)" ]; then
		SOURCE_DATE_EPOCH=$(date +%s)
	fi
	sde_given=""
else
	sde_given=$SOURCE_DATE_EPOCH
fi
export SOURCE_DATE_EPOCH
image_version=${HOMEPORT_IMAGE_VERSION:-$version_id.$SOURCE_DATE_EPOCH}

# ---- Stage 1: the Debian root (cached) -----------------------------------------------------
packages="$KERNEL_PACKAGE $RUNTIME_PACKAGES $EXTRA_PACKAGES $BUILD_ONLY_PACKAGES $boot_packages"
# A foreign root's systemd-boot files, copied out before customize.sh purges the package
# (expanded by mmdebstrap's shell: $1 is the root).
# shellcheck disable=SC2016
efi_hook='mkdir -p "$HOMEPORT_STAGE_OUT/efi" && cp "$1"/usr/lib/systemd/boot/efi/*.efi* "$HOMEPORT_STAGE_OUT/efi/"'
hooks=()
[ -z "$boot_packages" ] || hooks+=(--customize-hook="$efi_hook")
rootfs_key=$({
	echo "arch=$ARCH packages=$(echo $packages) exclude=$(echo $MODULES_EXCLUDE)"
	echo "initramfs=$(echo $INITRAMFS_MODULES) preload=$(echo $INITRAMFS_PRELOAD) purge=$(echo $BUILD_ONLY_PACKAGES $UNUSED_PACKAGES $boot_packages)"
	[ -z "$boot_packages" ] || echo "efi_hook=$efi_hook"
	mmdebstrap --version
	cat "$sources"
	echo "${HOMEPORT_ROOTFS_SERIAL:-}"
	tree_hash "$here/hooks"
	tree_hash "$here/initramfs"
} | sha256sum | cut -c1-16)
stage=$cache/rootfs/$ARCH-$rootfs_key

t_total=$(now)
rootfs_cached=true
if [ ! -f "$stage/rootfs.tar" ]; then
	rootfs_cached=false
	[ "$ARCH" = "$host_arch" ] || binfmt_foreign "$gnu_arch"
	say "stage 1: Debian root with mmdebstrap ($stage)"
	t=$(now)
	rm -rf "$stage.tmp" && mkdir -p "$stage.tmp"
	export HOMEPORT_IMAGE_BUILD=$here HOMEPORT_STAGE_OUT=$stage.tmp
	export HOMEPORT_INITRAMFS_MODULES=$INITRAMFS_MODULES HOMEPORT_MODULES_EXCLUDE=$MODULES_EXCLUDE
	export HOMEPORT_INITRAMFS_PRELOAD=$INITRAMFS_PRELOAD
	export HOMEPORT_PURGE="$BUILD_ONLY_PACKAGES $UNUSED_PACKAGES $boot_packages"
	# The root's mtimes do not matter (the erofs gets SOURCE_DATE_EPOCH); without it the
	# cached root is the same for every commit.
	env -u SOURCE_DATE_EPOCH mmdebstrap --variant=essential --mode=root --format=tar \
		--architectures="$ARCH" \
		--aptopt='Acquire::Check-Valid-Until "false"' \
		--skip=cleanup/apt --skip=cleanup/mmdebstrap \
		--include="$(echo $packages | tr ' ' ',')" \
		--essential-hook="$here/hooks/essential.sh \"\$1\"" \
		"${hooks[@]}" --customize-hook="$here/hooks/customize.sh \"\$1\"" \
		bookworm "$stage.tmp/rootfs.tar" "$sources" >"$stage.tmp/mmdebstrap.log" 2>&1 ||
		{ tail -n 40 "$stage.tmp/mmdebstrap.log" >&2; die "mmdebstrap failed ($stage.tmp/mmdebstrap.log)"; }
	echo "$(since "$t")" >"$stage.tmp/seconds"
	rm -rf "$stage" && mv "$stage.tmp" "$stage"
	# Keep the three newest roots of each architecture.
	ls -1dt "$cache/rootfs/$ARCH-"*/ 2>/dev/null | tail -n +4 | xargs -r rm -rf
	say "stage 1 took $(cat "$stage/seconds") s"
fi
rootfs_seconds=$(cat "$stage/seconds")
efi_dir=${efi_dir:-$stage/efi}
stub=$efi_dir/linux${EFI_ARCH}.efi.stub
sdboot=$efi_dir/systemd-boot${EFI_ARCH}.efi
[ -f "$stub" ] && [ -f "$sdboot" ] || die "$stub or $sdboot missing"

# ---- Up to date? ---------------------------------------------------------------------------
inputs=$({
	echo "board=$board rootfs=$rootfs_key sde=$sde_given version=${HOMEPORT_IMAGE_VERSION:-}"
	cat "$conf"
	sha "$init_bin"; sha "$agent_bin"; sha "$cli_bin"
	echo "update_root=${update_root:+$(sha "$update_root")} cmdline_extra=${HOMEPORT_CMDLINE_EXTRA:-}"
	sha "$0"
	tree_hash "$repo/rootfs-overlay"
} | sha256sum | cut -c1-64)
if [ -z "${HOMEPORT_IMAGE_FORCE:-}" ] && [ -f "$out/inputs.sha256" ] && [ "$(cat "$out/inputs.sha256")" = "$inputs" ] &&
	[ -f "$out/image.json" ]; then
	say "up to date: $(sed -n 's/.*"image": "\([^"]*\)".*/\1/p' "$out/image.json")"
	exit 0
fi

# ---- Stage 2: assembly ---------------------------------------------------------------------
t_asm=$(now)
work=$out/work
root=$work/rootfs
rm -rf "$work" "${out:?}"/homeport-* "${out:?}/inputs.sha256" "${out:?}/boot"
mkdir -p "$root"
tar -C "$root" --numeric-owner --xattrs --xattrs-include='*' -xpf "$stage/rootfs.tar"

kver=$(ls "$root/lib/modules" | sort -V | tail -n 1)
mv "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
mv "$root/boot/initrd.img-$kver" "$work/initrd"
rm -rf "${root:?}/boot/"* "${root:?}/dev/"* "$root/vmlinuz"* "$root/initrd.img"*
# The stub hands .linux to the firmware as a PE image. Debian's arm64 vmlinuz is the plain
# Image (a PE: its EFI stub); a gzipped one (other arm64 kernels) goes in uncompressed.
if [ "$(head -c 2 "$work/vmlinuz" | od -An -tx1 | tr -d ' ')" = 1f8b ]; then
	gzip -dc "$work/vmlinuz" >"$work/vmlinuz.image" && mv "$work/vmlinuz.image" "$work/vmlinuz"
fi
[ "$(head -c 2 "$work/vmlinuz")" = MZ ] || die "the kernel is not an EFI (PE) image: $(file -b "$work/vmlinuz")"

# Mount points and runtime-only folders on the read-only root.
mkdir -p "$root"/{proc,sys,dev,run,tmp,data}
chmod 1777 "$root/tmp"
rm -rf "$root/var/tmp" && ln -s /tmp "$root/var/tmp"
# dhcpcd's state (leases, DUID) goes to /run: see rootfs-overlay/etc/dhcpcd.conf.
rm -rf "$root/var/lib/dhcpcd" && ln -s /run/dhcpcd "$root/var/lib/dhcpcd"
# What mmdebstrap's skipped cleanup would have removed, and the package manager's state.
rm -rf "$root/etc/apt" "$root/var/lib/apt" "$root/var/cache/apt" "$root/var/lib/dpkg" \
	"$root/etc/dpkg" "$root/var/log/"*

# Our files: the overlay (os-release with the version filled in, resolv.conf -> /run), the
# binaries (debug info stripped; symbols kept for backtraces), busybox for `homeport debug`.
tar -C "$repo/rootfs-overlay" --exclude=./README.md --owner=0 --group=0 -cf - . |
	tar -C "$root" --no-overwrite-dir -xf -
sed -i -e "s/@IMAGE_VERSION@/$image_version/g" -e "s/@VERSION_ID@/$version_id/g" \
	-e "s/@BOARD@/$board/g" "$root/usr/lib/os-release"
install -D -m 0755 "$init_bin" "$root/usr/lib/homeport/homeport-init"
install -m 0755 "$agent_bin" "$root/usr/bin/homeportd"
install -m 0755 "$cli_bin" "$root/usr/bin/homeport"
"$strip" --strip-debug "$root/usr/lib/homeport/homeport-init" "$root/usr/bin/homeportd" \
	"$root/usr/bin/homeport"
ln -sfn ../lib/homeport/homeport-init "$root/usr/sbin/init"
# The TUF root updates are checked against (docs/releases.md).
if [ -n "$update_root" ]; then
	install -D -m 0644 "$update_root" "$root/usr/share/homeport/update/root.json"
fi
ln -f "$root/usr/bin/busybox" "$root/usr/lib/homeport/busybox"

# The root filesystem image (lz4hc at its default level 9 with 64 KiB physical clusters: 10 %
# smaller than 4 KiB clusters, and 3 times faster to make than level 12 for 1 % more; every
# mtime SOURCE_DATE_EPOCH).
t=$(now)
mkfs.erofs --quiet -zlz4hc -C65536 -T"$SOURCE_DATE_EPOCH" \
	-U"$(uuid_of "root $image_version $board")" "$work/root.erofs" "$root"
erofs_seconds=$(since "$t")
root_size=$(stat -c %s "$work/root.erofs")
[ "$root_size" -le $((ROOT_SIZE_MIB * 1024 * 1024)) ] ||
	die "root filesystem ($((root_size >> 20)) MiB) is larger than ROOT_SIZE_MIB=$ROOT_SIZE_MIB"
# Slot b starts as a valid, empty erofs: nothing boots it until an update writes a root and
# its UKI (a copy of slot a would double the compressed image).
mkdir -p "$work/empty"
mkfs.erofs --quiet -T"$SOURCE_DATE_EPOCH" -U"$(uuid_of "root-b $board")" \
	"$work/root-b.erofs" "$work/empty"

# One UKI per slot: the systemd stub with os-release, command line, initramfs and kernel.
# Sections follow the stub, each at the next 4 KiB boundary, .linux last (the kernel may
# grow in place).
make_uki() { # SLOT OUT
	local slot=$1 uki=$2 cmdline="$work/cmdline-$1" offs align sec size
	# softlockup_panic: a kernel stuck on a CPU panics, and the board's panic=N reboots it
	# (on a slot on trial, that boot counts as a failed try) instead of hanging for good.
	echo -n "root=PARTLABEL=root-$slot ro rootfstype=erofs fsck.mode=skip homeport.slot=$slot" \
		"softlockup_panic=1 init=/usr/lib/homeport/homeport-init $KERNEL_CMDLINE${HOMEPORT_CMDLINE_EXTRA:+ $HOMEPORT_CMDLINE_EXTRA}" >"$cmdline"
	align=4096
	offs=0
	while read -r idx _ size vma _; do
		[[ $idx =~ ^[0-9]+$ ]] || continue
		if ((16#$vma + 16#$size > offs)); then offs=$((16#$vma + 16#$size)); fi
	done < <("$objdump" -h "$stub")
	local args=()
	for sec in osrel:"$root/usr/lib/os-release" cmdline:"$cmdline" initrd:"$work/initrd" \
		linux:"$work/vmlinuz"; do
		offs=$(((offs + align - 1) / align * align))
		args+=(--add-section ".${sec%%:*}=${sec#*:}" --change-section-vma ".${sec%%:*}=$(printf 0x%x "$offs")")
		size=$(stat -L -c %s "${sec#*:}")
		offs=$((offs + size))
	done
	"$objcopy" "${args[@]}" "$stub" "$uki"
	# objcopy stamps the PE header with the current time: SOURCE_DATE_EPOCH instead (COFF
	# header TimeDateStamp, 8 bytes after the "PE\0\0" signature at e_lfanew), and the
	# checksum it computed over that time is zeroed (firmware does not check it; signing
	# tools compute their own).
	local pe t=$SOURCE_DATE_EPOCH
	pe=$(od -An -tu4 -j60 -N4 "$uki" | tr -d ' ')
	printf "$(printf '\\%03o\\%03o\\%03o\\%03o' $((t & 255)) $((t >> 8 & 255)) \
		$((t >> 16 & 255)) $((t >> 24 & 255)))" |
		dd of="$uki" bs=1 seek=$((pe + 8)) conv=notrunc status=none
	dd if=/dev/zero of="$uki" bs=1 count=4 seek=$((pe + 88)) conv=notrunc status=none
}
t=$(now)
make_uki a "$work/homeport-a.efi"
make_uki b "$work/homeport-b.efi"

# The EFI system partition: systemd-boot as the removable-media loader, slot a's UKI.
esp_bytes=$((ESP_SIZE_MIB * 1024 * 1024))
cat >"$work/loader.conf" <<EOF
timeout 0
editor no
auto-entries no
auto-firmware no
console-mode keep
EOF
cp "$sdboot" "$work/systemd-boot.efi"
touch -d "@$SOURCE_DATE_EPOCH" "$work/loader.conf" "$work/homeport-a.efi" "$work/systemd-boot.efi"
mkfs.vfat -C -F 32 -n HOMEPORT -i "$(uuid_of "esp $board" | cut -c1-8)" --invariant \
	"$work/esp.img" $((esp_bytes / 1024)) >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$work/esp.img" ::/EFI ::/EFI/BOOT ::/EFI/Linux ::/loader ::/loader/entries
mcopy -m -i "$work/esp.img" "$work/systemd-boot.efi" "::/EFI/BOOT/BOOT${EFI_ARCH^^}.EFI"
mcopy -m -i "$work/esp.img" "$work/loader.conf" ::/loader/loader.conf
mcopy -m -i "$work/esp.img" "$work/homeport-a.efi" ::/EFI/Linux/homeport-a.efi
uki_seconds=$(since "$t")

# The data partition: an empty btrfs, grown to the disk at first boot (initramfs: the
# partition; homeport-init: the filesystem).
data_bytes=$((DATA_SIZE_MIB * 1024 * 1024))
rm -f "$work/data.img" && truncate -s "$data_bytes" "$work/data.img"
mkfs.btrfs -q -L homeport-data -U "$(uuid_of "data $board")" "$work/data.img" >/dev/null

# The disk: GPT, 1 MiB aligned; data last so it can grow.
root_bytes=$((ROOT_SIZE_MIB * 1024 * 1024))
mib=$((1024 * 1024))
esp_start=$mib
roota_start=$((esp_start + esp_bytes))
rootb_start=$((roota_start + root_bytes))
data_start=$((rootb_start + root_bytes))
disk_bytes=$((data_start + data_bytes + mib))
case $ARCH in
amd64) root_type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709 ;;
arm64) root_type=B921B045-1DF0-41C3-AF44-4C6F280D3FAE ;;
*) die "no root partition type for $ARCH" ;;
esac
name=homeport-$board-$image_version
img=$out/$name.img
rm -f "$img" && truncate -s "$disk_bytes" "$img"
sfdisk --quiet "$img" <<EOF
label: gpt
label-id: $(uuid_of "disk $board")
unit: sectors
first-lba: 2048
start=$((esp_start / 512)), size=$((esp_bytes / 512)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="esp", uuid=$(uuid_of "esp-part $board")
start=$((roota_start / 512)), size=$((root_bytes / 512)), type=$root_type, name="root-a", uuid=$(uuid_of "root-a-part $board")
start=$((rootb_start / 512)), size=$((root_bytes / 512)), type=$root_type, name="root-b", uuid=$(uuid_of "root-b-part $board")
start=$((data_start / 512)), size=$((data_bytes / 512)), type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="homeport-data", uuid=$(uuid_of "data-part $board")
EOF
put() { dd if="$1" of="$img" bs=1M conv=notrunc,sparse oflag=seek_bytes seek="$2" status=none; }
put "$work/esp.img" $esp_start
put "$work/root.erofs" $roota_start
put "$work/root-b.erofs" $rootb_start
put "$work/data.img" $data_start

# Compressed image and update artifacts.
t=$(now)
zstd -q -T0 -10 --sparse -f "$img" -o "$img.zst"
zstd -q -T0 -10 -f "$work/root.erofs" -o "$out/$name.root.erofs.zst"
zstd -q -T0 -10 -f "$work/homeport-a.efi" -o "$out/$name.uki-a.efi.zst"
zstd -q -T0 -10 -f "$work/homeport-b.efi" -o "$out/$name.uki-b.efi.zst"
zstd_seconds=$(since "$t")
cp "$stage/packages.tsv" "$out/$name.packages.tsv"

# Size report: what takes the space.
{
	echo "# Homeport $image_version ($board): what takes the space"
	echo
	echo "root filesystem: $((root_size / 1024)) KiB as erofs (lz4hc), $(du -sk --apparent-size "$root" | cut -f1) KiB of files"
	echo "initramfs: $(($(stat -c %s "$work/initrd") / 1024)) KiB; kernel: $(($(stat -c %s "$work/vmlinuz") / 1024)) KiB; UKI: $(($(stat -c %s "$work/homeport-a.efi") / 1024)) KiB"
	echo
	echo "## Largest folders (KiB, uncompressed)"
	du -k --apparent-size --max-depth=4 "$root" | sort -rn | sed -n 1,40p | sed "s|$root||"
	echo
	echo "## Largest packages (KiB, Installed-Size; before docs and translations were removed)"
	sort -t "$(printf '\t')" -k3,3rn "$stage/packages.tsv" | sed -n 1,30p | awk -F'\t' '{ printf "%8d  %s %s\n", $3, $1, $2 }'
	echo
	echo "## Our binaries (bytes, stripped of debug info)"
	ls -l "$root/usr/lib/homeport/homeport-init" "$root/usr/bin/homeportd" "$root/usr/bin/homeport" |
		awk -v r="$root" '{ sub(r, "", $9); printf "%10d  %s\n", $5, $9 }'
} >"$out/$name.size-report.txt"

# Manifests: the update artifacts (for the OS-update issue) and the whole build.
artifact() { # NAME FILE(uncompressed) FILE.zst
	printf '    "%s": {"file": "%s", "size": %d, "sha256": "%s", "compressed_size": %d, "compressed_sha256": "%s"}' \
		"$1" "$(basename "$3")" "$(stat -c %s "$2")" "$(sha "$2")" "$(stat -c %s "$3")" "$(sha "$3")"
}
cat >"$out/$name.update.json" <<EOF
{
  "image_id": "homeport",
  "board": "$board",
  "version": "$image_version",
  "version_id": "$version_id",
  "kernel": "$kver",
  "source_date_epoch": $SOURCE_DATE_EPOCH,
  "artifacts": {
$(artifact root "$work/root.erofs" "$out/$name.root.erofs.zst"),
$(artifact uki-a "$work/homeport-a.efi" "$out/$name.uki-a.efi.zst"),
$(artifact uki-b "$work/homeport-b.efi" "$out/$name.uki-b.efi.zst")
  }
}
EOF
asm_seconds=$(since "$t_asm")
cat >"$out/image.json" <<EOF
{
  "board": "$board",
  "arch": "$ARCH",
  "version": "$image_version",
  "kernel": "$kver",
  "image": "$name.img",
  "image_zst": "$name.img.zst",
  "update_manifest": "$name.update.json",
  "packages": "$name.packages.tsv",
  "size_report": "$name.size-report.txt",
  "bytes": {
    "image": $disk_bytes,
    "image_zst": $(stat -c %s "$img.zst"),
    "esp_partition": $esp_bytes,
    "root_partition": $root_bytes,
    "root_erofs": $root_size,
    "root_files": $(($(du -sk --apparent-size "$root" | cut -f1) * 1024)),
    "root_b_erofs": $(stat -c %s "$work/root-b.erofs"),
    "data_partition": $data_bytes,
    "uki": $(stat -c %s "$work/homeport-a.efi"),
    "kernel": $(stat -c %s "$work/vmlinuz"),
    "initramfs": $(stat -c %s "$work/initrd"),
    "homeportd": $(stat -c %s "$root/usr/bin/homeportd"),
    "homeport_init": $(stat -c %s "$root/usr/lib/homeport/homeport-init")
  },
  "partitions": {"esp": [$esp_start, $esp_bytes], "root-a": [$roota_start, $root_bytes], "root-b": [$rootb_start, $root_bytes], "homeport-data": [$data_start, $data_bytes]},
  "seconds": {
    "rootfs_stage_built_in": $rootfs_seconds,
    "rootfs_cached": $rootfs_cached,
    "erofs": $erofs_seconds,
    "uki_esp": $uki_seconds,
    "compress": $zstd_seconds,
    "assembly": $asm_seconds,
    "total": $(since "$t_total")
  }
}
EOF
# Kept for direct kernel boots (qemu-tests boots a kernel command line of its own this way).
mkdir -p "$out/boot"
mv "$work/vmlinuz" "$work/initrd" "$work/cmdline-a" "$work/cmdline-b" "$out/boot/"
rm -rf "$work"
echo "$inputs" >"$out/inputs.sha256"
say "$img ($image_version): $(($(stat -c %s "$img.zst") >> 20)) MiB compressed, assembly ${asm_seconds} s"
