//! Hyperfleet: the daemon (REST API, orchestration, runtimes, proxy) and the CLI built on the SDK.

pub mod store;
