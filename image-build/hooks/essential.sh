#!/bin/sh
# mmdebstrap --essential-hook: runs after the Essential packages are installed and before
# the rest (kernel, PostgreSQL, ...), so that their maintainer scripts see this configuration.
# $1 = the root being built. Environment: HOMEPORT_IMAGE_BUILD (image-build/),
# HOMEPORT_INITRAMFS_MODULES and HOMEPORT_INITRAMFS_PRELOAD (the board's INITRAMFS_MODULES
# and INITRAMFS_PRELOAD).
set -eu
root=$1
src=$HOMEPORT_IMAGE_BUILD/initramfs

# initramfs-tools: our settings, hook and boot scripts, the board's module list. None of
# these paths is a package's conffile, so dpkg leaves them alone.
install -D -m 0644 "$src/homeport.conf" "$root/etc/initramfs-tools/conf.d/homeport.conf"
install -D -m 0755 "$src/hooks/homeport" "$root/etc/initramfs-tools/hooks/homeport"
install -D -m 0755 "$src/scripts/local-premount/homeport-grow" \
	"$root/etc/initramfs-tools/scripts/local-premount/homeport-grow"
install -D -m 0755 "$src/scripts/local-bottom/homeport-coldplug" \
	"$root/etc/initramfs-tools/scripts/local-bottom/homeport-coldplug"
install -D -m 0755 "$src/scripts/init-top/homeport-preload" \
	"$root/etc/initramfs-tools/scripts/init-top/homeport-preload"
install -D -m 0755 "$src/scripts/init-bottom/homeport-preload" \
	"$root/etc/initramfs-tools/scripts/init-bottom/homeport-preload"
install -D -m 0644 "$src/modprobe.conf" "$root/etc/modprobe.d/homeport.conf"
mkdir -p "$root/usr/share/initramfs-tools/modules.d"
printf '%s\n' $HOMEPORT_INITRAMFS_MODULES >"$root/usr/share/initramfs-tools/modules.d/homeport"
printf '%s\n' $HOMEPORT_INITRAMFS_PRELOAD >"$root/usr/share/initramfs-tools/homeport-preload"

# PostgreSQL: the agent runs its own cluster on /data; Debian's default cluster would be
# baked into the read-only root.
mkdir -p "$root/etc/postgresql-common/createcluster.d"
echo "create_main_cluster = false" >"$root/etc/postgresql-common/createcluster.d/homeport.conf"
