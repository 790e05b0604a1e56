//! The few kernel switches the host networking needs, read and written through /proc/sys.

use crate::NetError;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

pub async fn ip_forward_enabled() -> bool {
    tokio::fs::read_to_string(IP_FORWARD).await.is_ok_and(|s| s.trim() == "1")
}

/// Turns on IPv4 forwarding so guests' packets can be routed and masqueraded.
pub async fn enable_ip_forward() -> Result<(), NetError> {
    if ip_forward_enabled().await {
        return Ok(());
    }
    tokio::fs::write(IP_FORWARD, "1").await.map_err(|e| NetError::Sysctl(format!("write 1 to {IP_FORWARD}: {e}")))
}
