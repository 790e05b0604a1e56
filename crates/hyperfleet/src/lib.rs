//! Hyperfleet: the daemon (REST API, orchestration, runtimes, proxy) and the CLI built on the SDK.

pub mod api;
pub mod cmd;
pub mod config;
pub mod doctor;
pub mod keys;
pub mod listener;
pub mod machines;
pub mod proxy;
pub mod runtime;
pub mod store;
