#!/bin/sh
# mmdebstrap --customize-hook: runs once every package is installed. Prunes kernel modules,
# builds the initramfs, writes the package manifest, then removes what only building needed
# (initramfs-tools, udev, ...) and finally dpkg, apt's and dpkg's state, documentation and
# translations: the device has no package manager.
# $1 = the root being built. Environment: HOMEPORT_MODULES_EXCLUDE, HOMEPORT_PURGE
# (packages to purge), HOMEPORT_STAGE_OUT (a host folder for packages.tsv).
set -eu
root=$1
say() { echo "customize: $*" >&2; }

kver=$(ls "$root/lib/modules" | sort -V | tail -n 1)
[ -n "$kver" ] || { say "no kernel in the root"; exit 1; }
say "kernel $kver"

# Kernel modules an appliance does not use (GPUs, sound, cameras, ...).
mods=$root/lib/modules/$kver/kernel
for d in $HOMEPORT_MODULES_EXCLUDE; do
	rm -rf "${mods:?}/$d"
done
chroot "$root" depmod -a "$kver"

# The initramfs, with our conf.d, hook and scripts (installed by essential.sh), without
# btrfs-progs' scripts: the root is erofs; /data is mounted by homeport-init from the root.
rm -f "$root/usr/share/initramfs-tools/hooks/btrfs" \
	"$root/usr/share/initramfs-tools/scripts/local-premount/btrfs"
chroot "$root" update-initramfs -c -k "$kver" >/dev/null
ls -l "$root/boot" >&2

# Build-only and unused packages out, before the manifest is written so that it lists what
# ships. PostgreSQL without LLVM simply has no JIT (jit_provider fails to load: JIT off).
# shellcheck disable=SC2086
chroot "$root" dpkg --purge --force-depends $HOMEPORT_PURGE >/dev/null 2>&1
rm -rf "$root"/usr/lib/postgresql/*/lib/llvmjit* "$root"/usr/lib/postgresql/*/lib/bitcode
chroot "$root" dpkg-query -W \
	-f='${binary:Package}\t${Version}\t${Installed-Size}\t${source:Package}\n' |
	sort >"$root/usr/lib/homeport-packages.tsv"
mkdir -p "$root/usr/lib/homeport"
mv "$root/usr/lib/homeport-packages.tsv" "$root/usr/lib/homeport/packages.tsv"
cp "$root/usr/lib/homeport/packages.tsv" "$HOMEPORT_STAGE_OUT/packages.tsv"
say "$(wc -l <"$HOMEPORT_STAGE_OUT/packages.tsv") packages"

# No package manager on the device: dpkg's own files, then every package database and apt's
# configuration (mmdebstrap's own cleanup of these is skipped: they are gone).
chroot "$root" dpkg-query -L dpkg | while read -r f; do
	# Files only: /lib and /sbin are the merged-/usr symlinks.
	if [ ! -d "$root$f" ] && { [ -f "$root$f" ] || [ -L "$root$f" ]; }; then rm -f "$root$f"; fi
done
rm -rf "$root/var/lib/dpkg" "$root/etc/dpkg" "$root/var/lib/apt" "$root/var/cache/apt" \
	"$root/etc/apt" "$root/var/cache/debconf" "$root/var/log"/* "$root/var/cache/ldconfig"
# Documentation, manuals, translations; the packages' copyright files and
# /usr/share/common-licenses stay (licences), and so does C.utf8 in /usr/lib/locale (initdb).
find "$root/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root/usr/share/man" "$root/usr/share/info" "$root/usr/share/locale" \
	"$root/usr/share/lintian" "$root/usr/share/bug" "$root/usr/share/doc-base" \
	"$root/usr/share/bash-completion" "$root/usr/share/zsh" "$root/usr/share/i18n"
# dhcpcd's hooks: only resolv.conf (the hostname is homeport-init's, there is no NTP client
# to configure, 01-test only prints).
find "$root/usr/lib/dhcpcd/dhcpcd-hooks" -type f ! -name 20-resolv.conf -delete

# Per-device secrets and identity made by maintainer scripts must not be baked in.
rm -f "$root/etc/machine-id" "$root/var/lib/dbus/machine-id" \
	"$root/etc/ssl/private/ssl-cert-snakeoil.key" "$root/etc/ssl/certs/ssl-cert-snakeoil.pem" \
	"$root/etc/hostname" "$root/etc/resolv.conf"
rm -rf "$root/tmp/"* "$root/var/tmp/"* "$root/root/.cache" 2>/dev/null || true
