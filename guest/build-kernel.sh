#!/usr/bin/env bash
# Builds the Hyperfleet guest kernel (Linux 6.1 from Debian's linux-source-6.1) with the project's own config.
# The result is cached under HYPERFLEET_CACHE (default /var/cache/hyperfleet) keyed by the config and patch, so
# later runs skip the 5-minute build. Usage: guest/build-kernel.sh OUT_PATH
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build-kernel.sh OUT_PATH}
cache=${HYPERFLEET_CACHE:-/var/cache/hyperfleet}
key=$(cat "$here/kernel/config-6.1" "$here/kernel/pvm-compat.patch" | sha256sum | cut -c1-16)
cached="$cache/kernel/vmlinux-6.1-$key"

if [ ! -s "$cached" ]; then
  echo "building guest kernel (cache key $key, ~5 min on 2 cores)…" >&2
  export DEBIAN_FRONTEND=noninteractive
  need="build-essential bc bison flex libelf-dev libssl-dev dwarves xz-utils patch"
  # shellcheck disable=SC2086
  dpkg -s $need >/dev/null 2>&1 || apt-get install -y -q $need >/dev/null
  work="$cache/kbuild"
  mkdir -p "$work" "$cache/kernel"
  cd "$work"
  if [ ! -d linux-source-6.1 ]; then
    rm -rf pkg ./*.deb
    apt-get download -q linux-source-6.1 >/dev/null
    dpkg -x linux-source-6.1_*_all.deb pkg
    tar -xaf pkg/usr/src/linux-source-6.1.tar.xz
    rm -rf pkg ./*.deb
  fi
  cd linux-source-6.1
  # The patch is needed only under PVM (software virtualization) and harmless on real KVM.
  if ! grep -q "kvm-pvm, native mode" arch/x86/kernel/alternative.c; then
    patch -p0 --forward < "$here/kernel/pvm-compat.patch" >/dev/null
  fi
  cp "$here/kernel/config-6.1" .config
  make -s olddefconfig >/dev/null
  make -s -j"$(nproc)" vmlinux >/dev/null
  cp vmlinux "$cached.tmp" && mv "$cached.tmp" "$cached"
fi
mkdir -p "$(dirname "$out")"
cp --reflink=auto "$cached" "$out.tmp" && mv "$out.tmp" "$out"
echo "$out"
