#!/usr/bin/env bash
# Runs every test: unit tests, the agent against its real binary, and the end-to-end tests that start the
# real daemon (root, real netlink/nftables/runc; real firecracker, which needs /dev/kvm). Those are
# `#[ignore]`d so that a plain non-root `cargo test` lists them as skipped; here they all run.
set -euo pipefail
cd "$(dirname "$0")/.."
export HYPERFLEET_TEST_ASSETS=${HYPERFLEET_TEST_ASSETS:-$(pwd)/.hyperfleet}

# Schemathesis for the contract test (tests/contract.rs), in a virtualenv of Debian's Python.
SCHEMATHESIS_VERSION=4.32.5
export HYPERFLEET_SCHEMATHESIS_VENV=${HYPERFLEET_SCHEMATHESIS_VENV:-$(pwd)/.hyperfleet/venv}
if [ "$("$HYPERFLEET_SCHEMATHESIS_VENV/bin/st" --version 2>/dev/null)" != "st, version $SCHEMATHESIS_VERSION" ]; then
  echo "==> installing schemathesis $SCHEMATHESIS_VERSION into $HYPERFLEET_SCHEMATHESIS_VENV" >&2
  /usr/bin/python3 -m venv "$HYPERFLEET_SCHEMATHESIS_VENV"
  "$HYPERFLEET_SCHEMATHESIS_VENV/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

cargo test --workspace --locked --release -- --include-ignored --nocapture 2>&1
