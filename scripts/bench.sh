#!/usr/bin/env bash
# Runs the system benchmarks (real daemons, runc, firecracker, wrk; nginx as a reference proxy) and rewrites
# BENCHMARKS.md. HYPERFLEET_BENCH_ONLY=start (or api, creates, ipam, network, exec, proxy, volumes, children, …; comma-separated)
# runs only those sections and replaces just them in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export HYPERFLEET_TEST_ASSETS=${HYPERFLEET_TEST_ASSETS:-$(pwd)/.hyperfleet}
if ! command -v nginx >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light >/dev/null
  # The package starts a system nginx on port 80; the benchmark runs its own.
  systemctl stop nginx 2>/dev/null || service nginx stop 2>/dev/null || true
fi
cargo bench --locked -p hyperfleet --bench system
