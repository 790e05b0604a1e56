# The two commands of the README: `make run` (set up this host, then start the daemon) and `make test`.
.PHONY: setup run test bench lint clean-host

setup:
	scripts/setup.sh

run: setup
	./target/release/hyperfleet serve

test: setup
	scripts/test.sh

bench: setup
	scripts/bench.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

# Stop every machine and remove what Hyperfleet made on this host (uses the same env as `serve`).
clean-host:
	./target/release/hyperfleet purge
