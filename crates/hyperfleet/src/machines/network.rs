//! The host side of machine networking, as the orchestration sees it: a machine's addresses from its block,
//! attaching its interface (TAP for Firecracker, veth into its namespace for containers), detaching it, the
//! firewall rebuilt from the running machines, and host-wide set-up and reconciliation.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use hyperfleet_net::link::ALIAS_PREFIX;
use hyperfleet_net::{Block, Egress, Firewall, FirewallEntry, NetError, Netlink, Subnet, TapNaming, netns};
use hyperfleet_types::{Check, EgressPolicy, MachineNetwork};

use crate::runtime::GuestNetwork;
use crate::store::machines::MachineRecord;

pub struct HostNetwork {
    pub subnet: Subnet,
    pub naming: TapNaming,
    pub firewall: Firewall,
    netlink: Netlink,
}

impl HostNetwork {
    pub fn new(subnet: Subnet, naming: TapNaming, nft_table: &str) -> Result<Self, NetError> {
        Ok(Self { subnet, naming, firewall: Firewall::new(nft_table, subnet.net()), netlink: Netlink::connect()? })
    }

    /// Host-wide set-up at daemon start: forwarding on, and the subnet's unreachable route so traffic for
    /// addresses without a running machine never leaves the host.
    pub async fn init(&self) -> Result<(), NetError> {
        hyperfleet_net::sysctl::enable_ip_forward().await?;
        self.netlink.ensure_unreachable_route(self.subnet.net()).await
    }

    pub fn block(&self, m: &MachineRecord) -> Block {
        self.subnet.block(m.block).expect("leases are cut from this subnet (checked at start-up)")
    }

    pub fn iface(&self, m: &MachineRecord) -> String {
        self.naming.name(m.block)
    }

    pub fn wire(&self, m: &MachineRecord) -> MachineNetwork {
        MachineNetwork {
            prefix_len: hyperfleet_net::ipam::BLOCK_PREFIX,
            gateway: self.block(m).tap_ip(),
            dns: m.dns.clone(),
            egress: m.egress.clone(),
        }
    }

    pub fn guest(&self, m: &MachineRecord) -> GuestNetwork {
        let b = self.block(m);
        GuestNetwork {
            iface: self.iface(m),
            tap_ip: b.tap_ip(),
            guest_ip: b.guest_ip(),
            netmask: b.netmask(),
            prefix_len: hyperfleet_net::ipam::BLOCK_PREFIX,
            mac: b.guest_mac().to_string(),
            dns: m.dns.clone(),
            hostname: m.name.clone(),
        }
    }

    /// Creates the machine's host interface with tap_ip/30, up. With `netns` it is a veth pair whose other
    /// end becomes eth0 (guest_ip, MAC, default route) in that namespace; otherwise a TAP for Firecracker.
    pub async fn attach(&self, m: &MachineRecord, netns_name: Option<&str>) -> Result<(), NetError> {
        let name = self.iface(m);
        let b = self.block(m);
        let host_addr = ipnet::Ipv4Net::new(b.tap_ip(), hyperfleet_net::ipam::BLOCK_PREFIX).expect("valid prefix");
        match self.netlink.link(&name).await? {
            Some(l) if l.owner() == Some(m.id.as_str()) => self.netlink.delete(l.index).await?,
            Some(_) => {
                return Err(NetError::Netlink(format!(
                    "interface {name} already exists and is not managed by hyperfleet; remove it \
                     (ip link del {name}) or choose another HYPERFLEET_TAP_PREFIX"
                )));
            }
            None => {}
        }
        match netns_name {
            None => {
                self.netlink.create_tap(&name, &m.id, host_addr).await?;
            }
            Some(ns) => {
                let ns_file = netns::open(ns).await?;
                self.netlink
                    .create_veth_into(&name, &m.id, host_addr, "eth0", std::os::fd::AsFd::as_fd(&ns_file))
                    .await?;
                let (mac, guest, gw) = (b.guest_mac().0, b.guest_ip(), b.tap_ip());
                let guest_addr = ipnet::Ipv4Net::new(guest, hyperfleet_net::ipam::BLOCK_PREFIX).expect("valid prefix");
                let inner =
                    netns::run_in(
                        ns,
                        move |nl| async move { nl.configure_guest_side("eth0", mac, guest_addr, gw).await },
                    )
                    .await;
                if let Err(e) = inner {
                    let _ = self.netlink.delete_owned(&name, &m.id).await;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Removes the machine's host interface, if it exists and is ours.
    pub async fn detach(&self, m: &MachineRecord) -> Result<(), NetError> {
        self.netlink.delete_owned(&self.iface(m), &m.id).await.map(|_| ())
    }

    /// The firewall's view of one machine.
    pub fn firewall_entry(&self, m: &MachineRecord) -> FirewallEntry {
        let b = self.block(m);
        FirewallEntry {
            iface: self.iface(m),
            tap_ip: b.tap_ip(),
            guest_ip: b.guest_ip(),
            egress: match &m.egress {
                EgressPolicy::Allow => Egress::Allow,
                EgressPolicy::Deny => Egress::Deny,
                EgressPolicy::Cidrs(c) => Egress::Only(c.clone()),
            },
        }
    }

    /// Rebuilds the firewall table for exactly these machines.
    pub async fn apply_firewall(&self, machines: &[MachineRecord]) -> Result<(), NetError> {
        let entries: Vec<FirewallEntry> = machines.iter().map(|m| self.firewall_entry(m)).collect();
        self.firewall.apply(&entries).await
    }

    /// Deletes interfaces of ours (our prefix and alias) that belong to no machine in `live`. Returns their names.
    pub async fn remove_stray_links(&self, live: &HashSet<String>) -> Result<Vec<String>, NetError> {
        let mut removed = Vec::new();
        for l in self.netlink.links().await? {
            let ours = self.naming.block_of(&l.name).is_some()
                && l.alias.as_deref().is_some_and(|a| a.starts_with(ALIAS_PREFIX));
            if ours && !l.owner().is_some_and(|o| live.contains(o)) {
                self.netlink.delete(l.index).await?;
                removed.push(l.name);
            }
        }
        Ok(removed)
    }

    /// The seed's troubleshooting steps for one running machine, as checks.
    pub async fn checks(&self, m: &MachineRecord, table: Option<&str>) -> Vec<Check> {
        let name = self.iface(m);
        let b = self.block(m);
        let mut checks = Vec::new();
        let check = |name: &str, ok: bool, detail: String, fix: Option<String>| Check {
            name: name.to_string(),
            ok,
            detail,
            fix: if ok { None } else { fix },
        };
        let link = self.netlink.link(&name).await.ok().flatten();
        checks.push(check(
            "interface exists",
            link.as_ref().is_some_and(|l| l.owner() == Some(m.id.as_str())),
            match &link {
                Some(l) if l.owner() == Some(m.id.as_str()) => format!("{name} exists"),
                Some(_) => format!("{name} exists but is not this machine's"),
                None => format!("{name} is missing"),
            },
            Some(format!("hyperfleet machines restart {}", m.id)),
        ));
        checks.push(check(
            "interface up",
            link.as_ref().is_some_and(|l| l.up),
            format!("{name} is {}", if link.as_ref().is_some_and(|l| l.up) { "up" } else { "down" }),
            Some(format!("ip link set {name} up")),
        ));
        let addrs = match &link {
            Some(l) => self.netlink.addresses(l.index).await.unwrap_or_default(),
            None => vec![],
        };
        let has_ip =
            addrs.iter().any(|a| a.addr() == b.tap_ip() && a.prefix_len() == hyperfleet_net::ipam::BLOCK_PREFIX);
        checks.push(check(
            "interface address",
            has_ip,
            format!(
                "{name} has {:?}, wants {}/30",
                addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                b.tap_ip()
            ),
            Some(format!("ip addr add {}/30 dev {name}", b.tap_ip())),
        ));
        checks.push(check(
            "firewall entry",
            table.is_some_and(|t| t.contains(&format!("\"{name}\""))),
            format!(
                "nftables table inet {} {} {name}",
                self.firewall.table(),
                if table.is_some() { "lists" } else { "is missing, so not" }
            ),
            Some("restart the hyperfleet daemon (it rebuilds the table)".into()),
        ));
        let guest = b.guest_ip();
        let rtt = hyperfleet_net::icmp::ping(guest, Duration::from_secs(1)).await.ok().flatten();
        checks.push(check(
            "guest reachable",
            rtt.is_some(),
            match rtt {
                Some(t) => format!("{guest} answered ping in {:.2} ms", t.as_secs_f64() * 1000.0),
                None => format!("{guest} did not answer ping within 1 s (a guest still booting does not answer yet)"),
            },
            Some(format!("hyperfleet machines logs {}", m.id)),
        ));
        checks
    }

    pub async fn remove_route(&self) -> Result<(), NetError> {
        self.netlink.remove_unreachable_route(self.subnet.net()).await
    }

    pub async fn has_unreachable_route(&self) -> bool {
        self.netlink.has_unreachable_route(self.subnet.net()).await.unwrap_or(false)
    }

    pub async fn dns_default(configured: Option<&Vec<Ipv4Addr>>) -> Result<Vec<Ipv4Addr>, String> {
        match configured {
            Some(list) => Ok(list.clone()),
            None => hyperfleet_net::dns::host_resolvers().await.ok_or_else(|| {
                "the host has no usable (non-loopback) resolver in /etc/resolv.conf or \
                 /run/systemd/resolve/resolv.conf; set HYPERFLEET_DNS"
                    .to_string()
            }),
        }
    }
}
