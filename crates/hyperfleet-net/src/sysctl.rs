//! The few kernel switches the host networking needs, read and written through /proc/sys.

use crate::NetError;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

pub fn ip_forward_enabled() -> bool {
    std::fs::read_to_string(IP_FORWARD).map(|s| s.trim() == "1").unwrap_or(false)
}

/// Turns on IPv4 forwarding so guests' packets can be routed and masqueraded.
pub fn enable_ip_forward() -> Result<(), NetError> {
    if ip_forward_enabled() {
        return Ok(());
    }
    std::fs::write(IP_FORWARD, "1").map_err(|e| NetError::Sysctl(format!("write 1 to {IP_FORWARD}: {e}")))
}
