//! Host networking for Hyperfleet machines: address blocks (pure math), TAP and veth devices, addresses and
//! routes over rtnetlink, named network namespaces, the nftables table, and the host's resolvers.

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
