#!/usr/bin/env bash
# Builds the default guest image: busybox (Debian's busybox-static) for a small userland, plus the
# Hyperfleet agent as /sbin/init, as an ext4 image. Every machine boots its own copy of it.
# Usage: guest/build-rootfs.sh AGENT_BINARY OUT_IMAGE [SIZE_MIB]
set -euo pipefail
agent=${1:?usage: build-rootfs.sh AGENT_BINARY OUT_IMAGE [SIZE_MIB]}
out=${2:?usage: build-rootfs.sh AGENT_BINARY OUT_IMAGE [SIZE_MIB]}
size=${3:-128}
is_static() { ! ldd "$1" 2>&1 | grep -q "=>"; }
busybox=/bin/busybox
{ [ -x "$busybox" ] && is_static "$busybox"; } || { echo "error: install busybox-static (apt-get install busybox-static)" >&2; exit 1; }
is_static "$agent" || { echo "error: $agent must be statically linked" >&2; exit 1; }

tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir -p "$tree"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,root,var/www,home}
chmod 1777 "$tree/tmp"
cp "$busybox" "$tree/bin/busybox"
for applet in $("$busybox" --list-full); do
  [ -e "$tree/$applet" ] || ln -s /bin/busybox "$tree/$applet"
done
install -m 0755 "$agent" "$tree/sbin/hyperfleet-agent"
# For PVM hosts, where no guest userspace can run: an init that makes no system call (see idle.S).
gcc -nostdlib -static -o "$tree/sbin/hyperfleet-idle" "$(dirname "$0")/idle.S"
rm -f "$tree/sbin/init"
ln -s hyperfleet-agent "$tree/sbin/init"
cat > "$tree/etc/passwd" <<'P'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
P
cat > "$tree/etc/group" <<'G'
root:x:0:
tty:x:5:
nogroup:x:65534:
G
printf '127.0.0.1 localhost\n' > "$tree/etc/hosts"
: > "$tree/etc/resolv.conf"
printf 'hyperfleet\n' > "$tree/etc/hostname"
printf '<h1>Hello from a Hyperfleet machine</h1>\n' > "$tree/var/www/index.html"

mkdir -p "$(dirname "$out")"
# 4 KiB blocks and descriptor room to grow in place to 1 TiB (a machine's disk_size_mib grows its copy; see
# growable() in crates/hyperfleet/src/runtime/volume.rs).
mkfs.ext4 -q -F -L hyperfleet-root -b 4096 -E resize=268435456 -d "$tree" "$out.tmp" "${size}M"
mv "$out.tmp" "$out"
echo "$out"
