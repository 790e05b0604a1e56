//! Hyperfleet: the daemon (REST API, orchestration, runtimes, proxy) and the CLI built on the SDK.
//!
//! The library exists for the `hyperfleet` binary ([`Cli`], [`run`]) and, through [`testing`], for the
//! end-to-end tests and benchmarks; everything else is `pub(crate)` (enforced by `unreachable_pub`).

#![warn(unreachable_pub)]

mod api;
mod cmd;
mod config;
mod doctor;
mod keys;
mod listener;
mod machines;
mod metrics;
mod nodes;
mod oci;
mod proxy;
mod runtime;
mod store;

pub use cmd::{Cli, run};

/// What the end-to-end tests and the benchmarks use below the CLI: host facts and the pieces they build
/// fixtures and baselines from. Not an API for anyone else.
pub mod testing {
    pub use crate::api::openapi_json;
    pub use crate::config::{DEFAULT_CONTAINER_UID_BASE, DEFAULT_JAILER_UID_BASE, DEFAULT_KERNEL_ARGS};
    pub use crate::nodes::placement::bench as placement;
    pub use crate::runtime::cgroups;
    pub use crate::runtime::disk::sparse_copy;
    pub use crate::runtime::firecracker::{FirecrackerApi, jail};
    pub use crate::runtime::host::{KvmKind, find_on_path};
    pub use crate::runtime::{MachineFiles, ROOTS_DIR, process};
    pub use crate::store::machines as machine_rows;
    pub use crate::store::pg_cluster::{Durability, PgCluster};
    pub use crate::store::{Backend, Location, Store, now};
}
