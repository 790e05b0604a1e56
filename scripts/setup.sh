#!/usr/bin/env bash
# One-time (and idempotent) set-up of a Debian bookworm host for Hyperfleet, run as root:
# installs host packages, builds the daemon, the static guest agent and test fixture, installs firecracker,
# builds the guest kernel (cached under /var/cache/hyperfleet) and the guest root filesystem.
# Everything the daemon needs ends up under .hyperfleet/ of this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
assets=$root/.hyperfleet
export HYPERFLEET_CACHE=${HYPERFLEET_CACHE:-/var/cache/hyperfleet}
log() { printf '\n==> %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { echo "error: run as root (TAP devices, nftables and runc need it)" >&2; exit 1; }

packages=(nftables runc busybox-static iproute2 e2fsprogs util-linux wrk curl ca-certificates python3-pip
          python3-venv build-essential bc bison flex libelf-dev libssl-dev dwarves xz-utils patch tmux
          chromium chromium-driver docker-registry apache2-utils skopeo umoci openssl eatmydata
          dropbear-bin openssh-client postgresql)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
# The store tests start throwaway PostgreSQL clusters of their own: the package need not make and start a
# system-wide one (an existing installation keeps its clusters; this only applies to clusters made from now on).
if ! dpkg -s postgresql >/dev/null 2>&1; then
  mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/hyperfleet-no-main.conf
fi
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${missing[@]}" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
fi

log "building hyperfleet (release)"
cargo build --release --locked -p hyperfleet

log "building the static guest agent and test fixture"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked \
  --target x86_64-unknown-linux-gnu --target-dir target/guest -p hyperfleet-agent -p hyperfleet-testd
mkdir -p "$assets/bin"
for b in hyperfleet-agent hyperfleet-testd; do
  install -m 0755 "target/guest/x86_64-unknown-linux-gnu/release/$b" "$assets/bin/$b"
done

log "installing firecracker"
scripts/install-firecracker.sh "$assets/bin"

log "guest kernel"
guest/build-kernel.sh "$assets/vmlinux" >/dev/null

log "guest root filesystem"
guest/build-rootfs.sh "$assets/bin/hyperfleet-agent" "$assets/rootfs.ext4" >/dev/null

log "ready: $assets/{vmlinux,rootfs.ext4,bin/firecracker}"
