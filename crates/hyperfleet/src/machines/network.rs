//! The host side of machine networking: [`Addressing`] (pure: a machine's addresses and interface name
//! from its block) and [`HostNetwork`] (what changes the host: attaching and detaching a machine's
//! interface — a TAP for Firecracker, a veth into its namespace for containers — the firewall, and the
//! host-wide route).

use std::collections::HashSet;
use std::net::Ipv4Addr;

use hyperfleet_net::ipam::BLOCK_PREFIX;
use hyperfleet_net::link::ALIAS_PREFIX;
use hyperfleet_net::{Block, Egress, Firewall, FirewallEntry, NetError, Netlink, Subnet, TapNaming, netns};
use hyperfleet_types::{EgressPolicy, MachineNetwork};
use ipnet::Ipv4Net;

use crate::config::NetworkSettings;
use crate::runtime::GuestNetwork;
use crate::store::machines::MachineRecord;

/// Where a machine's addresses and interface name come from: its block of the subnet.
#[derive(Debug, Clone)]
pub(crate) struct Addressing {
    pub subnet: Subnet,
    pub naming: TapNaming,
}

impl Addressing {
    /// The machine's block. Leases are cut from this subnet (checked against the database at daemon start),
    /// so a block outside it means a corrupt database; the subnet's first block stands in rather than panicking.
    pub(crate) fn block(&self, m: &MachineRecord) -> Block {
        self.subnet
            .block(m.block)
            .or_else(|| self.subnet.block(0))
            .unwrap_or_else(|| unreachable!("a subnet has at least one block (checked when the setting is parsed)"))
    }

    pub(crate) fn iface(&self, m: &MachineRecord) -> String {
        self.naming.name(m.block)
    }

    /// The machine's network as responses show it: the spec's options plus gateway and prefix.
    pub(crate) fn wire(&self, m: &MachineRecord) -> MachineNetwork {
        MachineNetwork {
            prefix_len: Some(BLOCK_PREFIX),
            gateway: Some(self.block(m).tap_ip()),
            ..m.spec.network.clone()
        }
    }

    pub(crate) fn guest(&self, m: &MachineRecord) -> GuestNetwork {
        let b = self.block(m);
        GuestNetwork {
            iface: self.iface(m),
            tap_ip: b.tap_ip(),
            guest_ip: b.guest_ip(),
            netmask: b.netmask(),
            prefix_len: BLOCK_PREFIX,
            mac: b.guest_mac().to_string(),
            dns: m.spec.network.dns.clone(),
            hostname: m.spec.name.clone(),
        }
    }

    /// The firewall's view of one machine.
    pub(crate) fn firewall_entry(&self, m: &MachineRecord) -> FirewallEntry {
        let b = self.block(m);
        FirewallEntry {
            iface: self.iface(m),
            tap_ip: b.tap_ip(),
            guest_ip: b.guest_ip(),
            egress: match &m.spec.network.egress {
                EgressPolicy::Allow => Egress::Allow,
                EgressPolicy::Deny => Egress::Deny,
                EgressPolicy::Cidrs(c) => Egress::Only(c.clone()),
            },
            api: m.spec.spawn.is_some(),
        }
    }
}

fn net_of(addr: Ipv4Addr) -> Ipv4Net {
    Ipv4Net::new(addr, BLOCK_PREFIX).unwrap_or_else(|_| unreachable!("{BLOCK_PREFIX} is a valid IPv4 prefix"))
}

pub(crate) struct HostNetwork {
    pub addressing: Addressing,
    pub firewall: Firewall,
    netlink: Netlink,
}

impl HostNetwork {
    /// Opens the child API's port to machines with `spawn` (see [`Firewall::with_child_api_port`]).
    pub(crate) fn with_child_api_port(mut self, port: Option<u16>) -> Self {
        self.firewall = self.firewall.with_child_api_port(port);
        self
    }

    pub(crate) fn new(settings: &NetworkSettings) -> Result<Self, NetError> {
        let subnet = settings.subnet;
        Ok(Self {
            addressing: Addressing { subnet, naming: settings.tap_naming.clone() },
            firewall: Firewall::new(&settings.nft_table, subnet.net()).with_egress_deny(settings.egress_deny.clone()),
            netlink: Netlink::connect()?,
        })
    }

    /// Host-wide set-up at daemon start: forwarding on, and the subnet's unreachable route so traffic for
    /// addresses without a running machine never leaves the host.
    pub(crate) async fn init(&self) -> Result<(), NetError> {
        hyperfleet_net::sysctl::enable_ip_forward().await?;
        self.netlink.ensure_unreachable_route(self.addressing.subnet.net()).await
    }

    /// Creates the machine's host interface with tap_ip/30, up. With `netns` it is a veth pair whose other
    /// end becomes eth0 (guest_ip, MAC, default route) in that namespace; otherwise a TAP for Firecracker.
    pub(crate) async fn attach(&self, m: &MachineRecord, netns_name: Option<&str>) -> Result<(), NetError> {
        let name = self.addressing.iface(m);
        let b = self.addressing.block(m);
        let host_addr = net_of(b.tap_ip());
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
                let (mac, guest, gw) = (b.guest_mac().0, net_of(b.guest_ip()), b.tap_ip());
                let inner =
                    netns::run_in(ns, move |nl| async move { nl.configure_guest_side("eth0", mac, guest, gw).await })
                        .await;
                if let Err(e) = inner {
                    if let Err(undo) = self.netlink.delete_owned(&name, &m.id).await {
                        tracing::warn!(interface = %name, error = %undo, "could not remove a half-made veth");
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Removes the machine's host interface, if it exists and is ours.
    pub(crate) async fn detach(&self, m: &MachineRecord) -> Result<(), NetError> {
        self.netlink.delete_owned(&self.addressing.iface(m), &m.id).await.map(|_| ())
    }

    /// Rebuilds the firewall table for exactly these machines.
    pub(crate) async fn apply_firewall(&self, machines: &[MachineRecord]) -> Result<(), NetError> {
        let entries: Vec<FirewallEntry> = machines.iter().map(|m| self.addressing.firewall_entry(m)).collect();
        self.firewall.apply(&entries).await
    }

    /// Deletes interfaces of ours (our prefix and alias) that belong to no machine in `live`. Returns their names.
    pub(crate) async fn remove_stray_links(&self, live: &HashSet<String>) -> Result<Vec<String>, NetError> {
        let mut removed = Vec::new();
        for l in self.netlink.links().await? {
            let ours = self.addressing.naming.block_of(&l.name).is_some()
                && l.alias.as_deref().is_some_and(|a| a.starts_with(ALIAS_PREFIX));
            if ours && !l.owner().is_some_and(|o| live.contains(o)) {
                self.netlink.delete(l.index).await?;
                removed.push(l.name);
            }
        }
        Ok(removed)
    }

    pub(crate) async fn remove_route(&self) -> Result<(), NetError> {
        self.netlink.remove_unreachable_route(self.addressing.subnet.net()).await
    }

    pub(crate) async fn dns_default(configured: Option<&Vec<Ipv4Addr>>) -> Result<Vec<Ipv4Addr>, String> {
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
