//! Host networking for Hyperfleet machines: address blocks (pure math), TAP and veth devices, addresses and
//! routes over rtnetlink, named network namespaces, the nftables table, and the host's resolvers.
//!
//! A function here that touches the host is async and does its blocking work (file system, mounts, ioctls,
//! raw sockets, waiting for a thread) off the runtime's workers, so callers may await it anywhere; only pure
//! functions (IPAM math, rendering, parsing, paths) are sync.

pub mod dns;
pub mod firewall;
pub mod icmp;
pub mod ipam;
pub mod link;
pub mod netns;
pub mod sysctl;
pub mod tap;

pub use firewall::{Egress, Firewall, FirewallEntry};
pub use ipam::{Block, MacAddr, Subnet, TapNaming};
pub use link::{LinkState, Netlink};

/// Every way a host networking operation can fail, each naming the thing that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("tap: {0}")]
    Tap(String),
    #[error("network namespace: {0}")]
    Netns(String),
    #[error("nftables: {0}")]
    Nft(String),
    #[error("sysctl: {0}")]
    Sysctl(String),
}

/// Runs blocking host work on tokio's blocking pool and awaits it; a panic in `f` is resumed in the caller.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("blocking host work was cancelled: {e}"),
    }
}
