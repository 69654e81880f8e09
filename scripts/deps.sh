#!/usr/bin/env bash
# Installs what building, testing and the demo need on Debian bookworm (as root).
set -euo pipefail
pkgs=(
  gcc g++ pkg-config libseccomp-dev      # build: libcontainer links libseccomp; libFuzzer is C++
  docker-registry skopeo umoci           # tests: a real OCI registry, images built and pushed
  mmdebstrap                             # tests: the MediaWiki image (built once, cached)
  busybox-static apache2-utils openssl   # tests: image contents, htpasswd, token-auth keys
  ca-certificates util-linux iproute2    # mount, ip (the harness builds test networks)
  nftables                               # the agent's firewall (libnftables1) and tests' nft
  pebble curl testssl.sh                 # tests: a real ACME server; HTTPS client; TLS scan
  chrony                                 # tests: a real NTP server for the appliance (replaces systemd-timesyncd)
  crun iperf3                            # benchmarks: what we compare against
  python3                                # tests: a static file server (update repositories)
  nginx wrk nghttp2-client               # benchmarks: the proxy against nginx, wrk, h2load
  postgresql-15 redis-server             # the shared database and the apps' caches
  erofs-utils dosfstools mtools fdisk btrfs-progs systemd-boot-efi zstd file qemu-system-x86 qemu-utils ovmf  # the appliance image and its VM tests
)
# arm64 boards (arm64-uefi) on an amd64 host: the root is built through qemu-user (with
# arch-test, which mmdebstrap asks), the UKI made with aarch64 binutils, our binaries
# cross-built with Debian's rustc and its aarch64 std (rustup's toolchain has none here)
# linked by the aarch64 gcc against arm64 glibc and libseccomp; the VM tests boot it with
# qemu-system-aarch64 and AAVMF. (qemu-system-arm is 7.2, and so replaces a newer qemu-utils.)
if [ "$(dpkg --print-architecture)" = amd64 ]; then
  dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
  pkgs+=(
    qemu-user-static arch-test binutils-aarch64-linux-gnu
    rustc-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross libseccomp-dev:arm64
    qemu-system-arm qemu-efi-aarch64
  )
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  # The agent runs its own PostgreSQL cluster; Debian's default one would only hold port 5432.
  mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/homeport.conf
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The benchmark runs nginx itself; a system nginx that the package started would hold port 80.
  if [[ " ${missing[*]} " == *" nginx "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now nginx >/dev/null 2>&1 || true
  fi
fi
command -v cargo >/dev/null || { echo "deps: cargo is missing (install Rust with rustup)" >&2; exit 1; }
rustup component add rustfmt clippy >/dev/null 2>&1 || true
