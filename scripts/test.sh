#!/usr/bin/env bash
# Runs every test: unit tests, the agent against its real binary, and the end-to-end tests that start the
# real daemon (root, real netlink/nftables/runc; real firecracker, which needs /dev/kvm). Those are
# `#[ignore]`d so that a plain non-root `cargo test` lists them as skipped; here they all run.
set -euo pipefail
cd "$(dirname "$0")/.."
export HYPERFLEET_TEST_ASSETS=${HYPERFLEET_TEST_ASSETS:-$(pwd)/.hyperfleet}
cargo test --workspace --locked --release -- --include-ignored --nocapture 2>&1
