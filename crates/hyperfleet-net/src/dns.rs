//! Picks the resolvers guests use by default: the host's own upstream servers, never a loopback stub that a
//! guest could not reach (systemd-resolved's 127.0.0.53 is replaced by the servers behind it).

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

/// Files that can hold the host's upstream resolvers, in order of preference.
const RESOLV_FILES: [&str; 2] = ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"];

/// IPv4 `nameserver` entries of a resolv.conf text, loopback ones skipped.
pub fn parse_resolv_conf(text: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            match words.next()?.parse::<IpAddr>().ok()? {
                IpAddr::V4(ip) if !ip.is_loopback() && !ip.is_unspecified() => Some(ip),
                _ => None,
            }
        })
        .collect()
}

/// The host's non-loopback resolvers, or `None` when there are none usable by a guest.
pub async fn host_resolvers() -> Option<Vec<Ipv4Addr>> {
    for file in RESOLV_FILES {
        // A missing or unreadable file is the normal case for one of the two; the other may have servers.
        let Ok(text) = tokio::fs::read_to_string(Path::new(file)).await else {
            continue;
        };
        let servers = parse_resolv_conf(&text);
        if !servers.is_empty() {
            return Some(servers);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_loopback_stubs_and_ipv6() {
        let t = "# generated\nnameserver 127.0.0.53\nnameserver 10.1.2.3\nnameserver ::1\nnameserver fd00::1\n\
                 search example\nnameserver 9.9.9.9 # trailing\n";
        assert_eq!(parse_resolv_conf(t), vec![Ipv4Addr::new(10, 1, 2, 3), Ipv4Addr::new(9, 9, 9, 9)]);
        assert!(parse_resolv_conf("nameserver 127.0.0.53\noptions edns0\n").is_empty());
    }
}
