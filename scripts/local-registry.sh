#!/usr/bin/env bash
# A local registry to try images with: Debian's docker-registry on 127.0.0.1:5000 (plain HTTP, loopback
# only), holding hyperfleet/busybox:latest (Debian's static busybox serving /www with httpd on port 8080),
# built with umoci and pushed with skopeo. `start` (the default) is idempotent and prints the image's
# reference; `stop` ends the registry this script started. Packages: make setup installs them.
set -euo pipefail
addr=${HYPERFLEET_LOCAL_REGISTRY:-127.0.0.1:5000}
state=${HYPERFLEET_LOCAL_REGISTRY_DIR:-/var/lib/hyperfleet/registry}
image=hyperfleet/busybox
case ${1:-start} in
  stop)
    if [ -f "$state/pid" ]; then kill "$(cat "$state/pid")" 2>/dev/null || true; rm -f "$state/pid"; fi
    exit 0 ;;
  start) ;;
  *) echo "usage: $0 [start|stop]" >&2; exit 2 ;;
esac
up() { curl -sf -o /dev/null "http://$addr/v2/"; }
mkdir -p "$state"
if ! up; then
  cat > "$state/config.yml" <<CONF
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $state/data}, delete: {enabled: true}}
http: {addr: $addr}
CONF
  nohup docker-registry serve "$state/config.yml" > "$state/registry.log" 2>&1 &
  echo $! > "$state/pid"
  for _ in $(seq 100); do up && break; sleep 0.1; done
  up || { echo "error: docker-registry did not start; see $state/registry.log" >&2; exit 1; }
fi
accept='application/vnd.oci.image.manifest.v1+json'
if ! curl -sf -o /dev/null -H "Accept: $accept" "http://$addr/v2/$image/manifests/latest"; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  umoci init --layout "$work/layout"
  umoci new --image "$work/layout:latest"
  umoci unpack --image "$work/layout:latest" "$work/bundle" >/dev/null
  root=$work/bundle/rootfs
  mkdir -p "$root/bin" "$root/www" "$root/tmp"
  chmod 1777 "$root/tmp"
  cp /bin/busybox "$root/bin/busybox"
  for a in sh ls cat echo env id ps httpd sleep hostname ip nc; do ln -s busybox "$root/bin/$a"; done
  printf '<h1>Hello from an OCI image</h1>\n' > "$root/www/index.html"
  umoci repack --image "$work/layout:latest" "$work/bundle" >/dev/null
  umoci config --image "$work/layout:latest" --config.entrypoint /bin/busybox \
    --config.cmd httpd --config.cmd -f --config.cmd -p --config.cmd 8080 --config.cmd -h --config.cmd /www \
    --config.env PATH=/bin --config.workingdir /www
  skopeo copy -q --dest-tls-verify=false "oci:$work/layout:latest" "docker://$addr/$image:latest"
fi
echo "$addr/$image:latest"
