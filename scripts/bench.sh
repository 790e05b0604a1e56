#!/usr/bin/env bash
# Runs the system benchmarks (real daemons, runc, firecracker, wrk) and rewrites BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export HYPERFLEET_TEST_ASSETS=${HYPERFLEET_TEST_ASSETS:-$(pwd)/.hyperfleet}
cargo bench --locked -p hyperfleet --bench system
