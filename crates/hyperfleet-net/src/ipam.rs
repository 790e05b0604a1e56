//! Address math for machine blocks: the subnet is cut into /30 blocks; block k holds the network 4k, the host
//! side (`tap_ip`) 4k+1, the guest 4k+2 and the broadcast 4k+3. Pure functions; leases live in the database.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;

/// Prefix length of one machine block.
pub const BLOCK_PREFIX: u8 = 30;
/// Linux limits interface names to 15 bytes (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpamError {
    #[error("'{0}' is not an IPv4 CIDR such as 172.16.0.0/16")]
    NotACidr(String),
    #[error("subnet {0} is smaller than one /30 block; use a prefix of /30 or shorter")]
    TooSmall(Ipv4Net),
    #[error("interface prefix '{0}' is invalid: use 1-9 letters, digits, '-' or '_'")]
    BadTapPrefix(String),
}

/// The pool machines take their blocks from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet(Ipv4Net);

impl Subnet {
    pub fn new(net: Ipv4Net) -> Result<Self, IpamError> {
        if net.prefix_len() > BLOCK_PREFIX {
            return Err(IpamError::TooSmall(net));
        }
        Ok(Self(net.trunc()))
    }

    pub fn net(&self) -> Ipv4Net {
        self.0
    }

    /// How many machine blocks fit (16,384 for a /16).
    pub fn block_count(&self) -> u32 {
        1u32 << (BLOCK_PREFIX - self.0.prefix_len())
    }

    pub fn block(&self, index: u32) -> Option<Block> {
        (index < self.block_count())
            .then(|| Block { index, network: Ipv4Addr::from(u32::from(self.0.network()) + index * 4) })
    }

    /// The block an address falls in, if it is inside the subnet.
    pub fn block_of(&self, ip: Ipv4Addr) -> Option<Block> {
        self.0.contains(&ip).then(|| (u32::from(ip) - u32::from(self.0.network())) / 4).and_then(|i| self.block(i))
    }
}

impl FromStr for Subnet {
    type Err = IpamError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let net = s.trim().parse::<Ipv4Net>().map_err(|_| IpamError::NotACidr(s.to_string()))?;
        Self::new(net)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One machine's /30.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub index: u32,
    pub network: Ipv4Addr,
}

impl Block {
    fn at(&self, offset: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + offset)
    }
    #[allow(clippy::expect_used, reason = "BLOCK_PREFIX is the constant 30, a valid IPv4 prefix length (<= 32)")]
    pub fn net(&self) -> Ipv4Net {
        Ipv4Net::new(self.network, BLOCK_PREFIX).expect("30 is a valid prefix")
    }
    /// Host end of the machine's link, the guest's gateway.
    pub fn tap_ip(&self) -> Ipv4Addr {
        self.at(1)
    }
    pub fn guest_ip(&self) -> Ipv4Addr {
        self.at(2)
    }
    pub fn broadcast(&self) -> Ipv4Addr {
        self.at(3)
    }
    pub fn netmask(&self) -> Ipv4Addr {
        self.net().netmask()
    }
    /// Locally administered unicast MAC derived from the block: block 0 is `AA:FC:00:00:00:01`.
    pub fn guest_mac(&self) -> MacAddr {
        let n = (self.index + 1).to_be_bytes();
        MacAddr([0xAA, 0xFC, n[0], n[1], n[2], n[3]])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02X}:{:02X}:{:02X}:{:02X}:{:02X}:{:02X}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

/// Names host interfaces `{prefix}{block}`: `tap0` for block 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapNaming {
    prefix: String,
}

impl TapNaming {
    pub fn new(prefix: &str) -> Result<Self, IpamError> {
        let ok = !prefix.is_empty()
            && prefix.len() <= 9
            && prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !prefix.as_bytes()[prefix.len() - 1].is_ascii_digit();
        if ok { Ok(Self { prefix: prefix.to_string() }) } else { Err(IpamError::BadTapPrefix(prefix.to_string())) }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// With a prefix of at most 9 bytes, any u32 block number fits in IFNAMSIZ.
    pub fn name(&self, block: u32) -> String {
        format!("{}{}", self.prefix, block)
    }

    /// The block number of a name of ours, e.g. `tap12` → 12.
    pub fn block_of(&self, name: &str) -> Option<u32> {
        let digits = name.strip_prefix(&self.prefix)?;
        if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
            return None;
        }
        digits.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn first_block_matches_the_networking_page() {
        let s: Subnet = "172.16.0.0/16".parse().unwrap();
        let b = s.block(0).unwrap();
        assert_eq!(b.tap_ip(), ip("172.16.0.1"));
        assert_eq!(b.guest_ip(), ip("172.16.0.2"));
        assert_eq!(b.broadcast(), ip("172.16.0.3"));
        assert_eq!(b.netmask(), ip("255.255.255.252"));
        assert_eq!(b.guest_mac().to_string(), "AA:FC:00:00:00:01");
        let b1 = s.block(1).unwrap();
        assert_eq!((b1.tap_ip(), b1.guest_ip()), (ip("172.16.0.5"), ip("172.16.0.6")));
    }

    #[test]
    fn subnet_edges() {
        let s: Subnet = "172.16.0.0/16".parse().unwrap();
        assert_eq!(s.block_count(), 16_384);
        let last = s.block(16_383).unwrap();
        assert_eq!(last.network, ip("172.16.255.252"));
        assert_eq!(last.guest_ip(), ip("172.16.255.254"));
        assert_eq!(last.broadcast(), ip("172.16.255.255"));
        assert_eq!(last.guest_mac().to_string(), "AA:FC:00:00:40:00");
        assert!(s.block(16_384).is_none());
        // A /30 is one block; anything smaller is refused.
        assert_eq!("10.0.0.4/30".parse::<Subnet>().unwrap().block_count(), 1);
        assert_eq!("10.0.0.4/31".parse::<Subnet>(), Err(IpamError::TooSmall("10.0.0.4/31".parse().unwrap())));
        assert!(matches!("banana".parse::<Subnet>(), Err(IpamError::NotACidr(_))));
        assert!(matches!("10.0.0.0/33".parse::<Subnet>(), Err(IpamError::NotACidr(_))));
        // Host bits are dropped: 172.16.5.9/16 means 172.16.0.0/16.
        assert_eq!("172.16.5.9/16".parse::<Subnet>().unwrap().net().to_string(), "172.16.0.0/16");
    }

    #[test]
    fn block_of_inverts_block() {
        let s: Subnet = "10.9.0.0/22".parse().unwrap();
        for i in [0, 1, 100, s.block_count() - 1] {
            let b = s.block(i).unwrap();
            for a in [b.network, b.tap_ip(), b.guest_ip(), b.broadcast()] {
                assert_eq!(s.block_of(a), Some(b));
            }
        }
        assert_eq!(s.block_of(ip("10.9.4.0")), None);
    }

    #[test]
    fn tap_names() {
        let n = TapNaming::new("tap").unwrap();
        assert_eq!(n.name(0), "tap0");
        assert_eq!(n.block_of("tap12"), Some(12));
        assert_eq!(n.block_of("tap012"), None);
        assert_eq!(n.block_of("tapx"), None);
        assert_eq!(n.block_of("eth0"), None);
        assert!(n.name(u32::MAX).len() <= MAX_IFNAME_LEN);
        assert!(TapNaming::new("tap1").is_err());
        assert!(TapNaming::new("much-too-long").is_err());
        assert!(TapNaming::new("a b").is_err());
    }
}
