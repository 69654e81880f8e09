#!/usr/bin/env bash
# Builds the appliance image (scripts/image.sh) and boots it under QEMU with the serial
# console on this terminal. The agent's API and the apps' proxy are forwarded to this
# machine's loopback; the owner token and the device CA's fingerprint appear on the console
# at the first boot. The VM's disk is a copy-on-write overlay of the image kept in
# target/image/BOARD/vm/, so what the appliance stores survives the next `boot.sh`;
# `--fresh` starts from the image again.
#   scripts/boot.sh [--fresh] [BOARD]        (BOARD: qemu-x86_64, the default, or generic-x86_64)
# Ports: HOMEPORT_API_PORT (8443), HOMEPORT_HTTPS_PORT (4443), HOMEPORT_HTTP_PORT (8080).
# Quit with Ctrl-A then X (a power cut); for a clean shutdown, Ctrl-A C (QEMU's monitor),
# then `sendkey ctrl-alt-delete` (homeport-init reboots cleanly; QEMU boots it again).
set -euo pipefail
cd "$(dirname "$0")/.."
fresh=false
if [ "${1:-}" = --fresh ]; then
	fresh=true
	shift
fi
board=${1:-qemu-x86_64}
./scripts/image.sh "$board"
dir=target/image/$board
img=$(sed -n 's/.*"image": "\([^"]*\)".*/\1/p' "$dir/image.json")
version=$(sed -n 's/^  "version": "\([^"]*\)".*/\1/p' "$dir/image.json")
vm=$dir/vm
if $fresh || [ ! -f "$vm/disk.qcow2" ] || [ "$(cat "$vm/image" 2>/dev/null)" != "$img" ]; then
	rm -rf "$vm" && mkdir -p "$vm"
	qemu-img create -q -f qcow2 -F raw -b "$PWD/$dir/$img" "$vm/disk.qcow2"
	cp /usr/share/OVMF/OVMF_VARS_4M.fd "$vm/vars.fd"
	echo "$img" >"$vm/image"
fi
api=${HOMEPORT_API_PORT:-8443}
https=${HOMEPORT_HTTPS_PORT:-4443}
http=${HOMEPORT_HTTP_PORT:-8080}
echo "Booting Homeport $version ($board) under QEMU (TCG: 20-60 s to the agent's ready line)."
echo "  API:  https://homeport.local:$api (curl --resolve homeport.local:$api:127.0.0.1 ...):"
echo "        GET /v1/ca.crt needs nothing; the rest 'Authorization: Bearer <owner token>'"
echo "        (the token is shown on the console at the first boot)"
echo "  Apps: https://<app>-homeport.local:$https, plain HTTP on 127.0.0.1:$http"
echo "  Disk: $vm/disk.qcow2 (over $dir/$img)      Quit: Ctrl-A X"
exec qemu-system-x86_64 -accel tcg -machine q35 -cpu max -smp 2 -m 1024 \
	-nodefaults -no-user-config -display none \
	-drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
	-drive if=pflash,format=raw,unit=1,file="$vm/vars.fd" \
	-drive if=virtio,format=qcow2,file="$vm/disk.qcow2" \
	-netdev "user,id=n,hostfwd=tcp:127.0.0.1:$api-:8443,hostfwd=tcp:127.0.0.1:$https-:443,hostfwd=tcp:127.0.0.1:$http-:80" \
	-device virtio-net-pci,netdev=n -device virtio-rng-pci \
	-serial mon:stdio
