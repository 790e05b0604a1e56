//! Host interfaces, addresses and routes over rtnetlink (no `ip` subprocesses). Every interface Hyperfleet
//! creates carries the alias `hyperfleet:<machine-id>`, which is how cleanup tells ours from the user's.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, BorrowedFd};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlag, LinkInfo, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType};
use rtnetlink::{Handle, IpVersion};

use crate::NetError;

/// Prefix of the alias that marks an interface as created by Hyperfleet.
pub const ALIAS_PREFIX: &str = "hyperfleet:";

pub fn alias_for(machine_id: &str) -> String {
    format!("{ALIAS_PREFIX}{machine_id}")
}

/// What the kernel says about one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub name: String,
    pub alias: Option<String>,
    /// Administratively up (IFF_UP); a TAP without a reader has no carrier but is still up.
    pub up: bool,
    pub kind: Option<String>,
}

impl LinkState {
    /// The machine id in our alias, if this interface is ours.
    pub fn owner(&self) -> Option<&str> {
        self.alias.as_deref()?.strip_prefix(ALIAS_PREFIX)
    }

    fn from_message(m: &LinkMessage) -> Self {
        let mut s = LinkState {
            index: m.header.index,
            name: String::new(),
            alias: None,
            up: m.header.flags.contains(&LinkFlag::Up),
            kind: None,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => s.name = n.clone(),
                LinkAttribute::IfAlias(al) if !al.is_empty() => s.alias = Some(al.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            s.kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        s
    }
}

/// A netlink connection in the network namespace of the thread that opened it.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

fn nl(op: &str, e: rtnetlink::Error) -> NetError {
    NetError::Netlink(format!("{op}: {e}"))
}

impl Netlink {
    /// Opens a connection; must be called inside a tokio runtime (the connection runs as a task on it).
    pub fn connect() -> Result<Self, NetError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| NetError::Netlink(format!("open netlink socket: {e}")))?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub async fn links(&self) -> Result<Vec<LinkState>, NetError> {
        let mut out = Vec::new();
        let mut stream = self.handle.link().get().execute();
        while let Some(m) = stream.try_next().await.map_err(|e| nl("list links", e))? {
            out.push(LinkState::from_message(&m));
        }
        Ok(out)
    }

    pub async fn link(&self, name: &str) -> Result<Option<LinkState>, NetError> {
        let mut stream = self.handle.link().get().match_name(name.to_string()).execute();
        match stream.try_next().await {
            Ok(m) => Ok(m.as_ref().map(LinkState::from_message)),
            // ENODEV: no such interface.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(nl(&format!("look up {name}"), e)),
        }
    }

    async fn require(&self, name: &str) -> Result<LinkState, NetError> {
        self.link(name).await?.ok_or_else(|| NetError::Netlink(format!("interface {name} vanished")))
    }

    /// Creates a persistent TAP device (Firecracker opens it by name), marks it ours, gives it `addr` and
    /// brings it up.
    pub async fn create_tap(&self, name: &str, owner: &str, addr: Ipv4Net) -> Result<LinkState, NetError> {
        crate::tap::create_persistent(name).await?;
        let link = self.require(name).await?;
        self.finish_host_end(link, owner, addr).await
    }

    /// Creates a veth pair whose host end is `host_name` and whose other end is created directly inside the
    /// network namespace `netns` as `inner_name`.
    pub async fn create_veth_into(
        &self,
        host_name: &str,
        owner: &str,
        addr: Ipv4Net,
        inner_name: &str,
        netns: BorrowedFd<'_>,
    ) -> Result<LinkState, NetError> {
        let mut peer = LinkMessage::default();
        peer.attributes.push(LinkAttribute::IfName(inner_name.to_string()));
        peer.attributes.push(LinkAttribute::NetNsFd(netns.as_raw_fd()));
        let mut req = self.handle.link().add();
        let msg = req.message_mut();
        msg.attributes.push(LinkAttribute::IfName(host_name.to_string()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        req.execute().await.map_err(|e| nl(&format!("create veth {host_name}"), e))?;
        let link = self.require(host_name).await?;
        self.finish_host_end(link, owner, addr).await
    }

    async fn finish_host_end(&self, link: LinkState, owner: &str, addr: Ipv4Net) -> Result<LinkState, NetError> {
        let index = link.index;
        let result = async {
            let mut set = self.handle.link().set(index);
            set.message_mut().attributes.push(LinkAttribute::IfAlias(alias_for(owner)));
            set.execute().await.map_err(|e| nl(&format!("set alias of {}", link.name), e))?;
            self.add_address(index, addr).await?;
            self.set_up(index).await?;
            self.require(&link.name).await
        }
        .await;
        if let Err(failed) = &result
            && let Err(e) = self.delete(index).await
        {
            tracing::warn!(iface = %link.name, error = %e, cause = %failed, "could not remove a half-configured interface");
        }
        result
    }

    pub async fn add_address(&self, index: u32, addr: Ipv4Net) -> Result<(), NetError> {
        self.handle
            .address()
            .add(index, IpAddr::V4(addr.addr()), addr.prefix_len())
            .replace()
            .execute()
            .await
            .map_err(|e| nl(&format!("add {addr}"), e))
    }

    pub async fn set_mac(&self, index: u32, mac: [u8; 6]) -> Result<(), NetError> {
        self.handle.link().set(index).address(mac.to_vec()).execute().await.map_err(|e| nl("set MAC address", e))
    }

    /// Inside a guest's namespace: gives `name` its MAC and address, brings it and `lo` up and routes
    /// everything via `gateway` — what the guest kernel's `ip=` does in a Firecracker guest.
    pub async fn configure_guest_side(
        &self,
        name: &str,
        mac: [u8; 6],
        addr: Ipv4Net,
        gateway: Ipv4Addr,
    ) -> Result<(), NetError> {
        let eth = self.require(name).await?;
        self.set_mac(eth.index, mac).await?;
        self.add_address(eth.index, addr).await?;
        self.set_up(eth.index).await?;
        if let Some(lo) = self.link("lo").await? {
            self.set_up(lo.index).await?;
        }
        self.add_default_route(gateway).await
    }

    pub async fn set_up(&self, index: u32) -> Result<(), NetError> {
        self.handle.link().set(index).up().execute().await.map_err(|e| nl("set link up", e))
    }

    pub async fn delete(&self, index: u32) -> Result<(), NetError> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
            Err(e) => Err(nl("delete link", e)),
        }
    }

    /// Deletes the interface `name` if it exists and carries our alias for `owner`. Returns whether it did.
    pub async fn delete_owned(&self, name: &str, owner: &str) -> Result<bool, NetError> {
        match self.link(name).await? {
            Some(l) if l.owner() == Some(owner) => self.delete(l.index).await.map(|_| true),
            _ => Ok(false),
        }
    }

    /// IPv4 addresses on an interface.
    pub async fn addresses(&self, index: u32) -> Result<Vec<Ipv4Net>, NetError> {
        let mut out = Vec::new();
        let mut stream = self.handle.address().get().set_link_index_filter(index).execute();
        while let Some(m) = stream.try_next().await.map_err(|e| nl("list addresses", e))? {
            for a in &m.attributes {
                if let AddressAttribute::Address(IpAddr::V4(ip)) = a
                    && let Ok(net) = Ipv4Net::new(*ip, m.header.prefix_len)
                {
                    out.push(net);
                }
            }
        }
        Ok(out)
    }

    /// Adds (or replaces) an `unreachable` route for `net` in the main table: more specific routes of live
    /// machines win, and traffic to any other address of the subnet is refused on the host instead of
    /// following the default route out.
    pub async fn ensure_unreachable_route(&self, net: Ipv4Net) -> Result<(), NetError> {
        self.handle
            .route()
            .add()
            .v4()
            .destination_prefix(net.network(), net.prefix_len())
            .kind(RouteType::Unreachable)
            .scope(RouteScope::Universe)
            .protocol(RouteProtocol::Static)
            .replace()
            .execute()
            .await
            .map_err(|e| nl(&format!("add unreachable route {net}"), e))
    }

    pub async fn remove_unreachable_route(&self, net: Ipv4Net) -> Result<(), NetError> {
        for r in self.routes_v4().await? {
            if r.header.kind == RouteType::Unreachable && route_destination(&r) == Some(net) {
                self.handle.route().del(r).execute().await.map_err(|e| nl("delete route", e))?;
            }
        }
        Ok(())
    }

    pub async fn has_unreachable_route(&self, net: Ipv4Net) -> Result<bool, NetError> {
        Ok(self
            .routes_v4()
            .await?
            .iter()
            .any(|r| r.header.kind == RouteType::Unreachable && route_destination(r) == Some(net)))
    }

    async fn routes_v4(&self) -> Result<Vec<RouteMessage>, NetError> {
        self.handle.route().get(IpVersion::V4).execute().try_collect().await.map_err(|e| nl("list routes", e))
    }

    /// Adds a default route via `gateway` (used inside a container's namespace).
    pub async fn add_default_route(&self, gateway: Ipv4Addr) -> Result<(), NetError> {
        self.handle
            .route()
            .add()
            .v4()
            .gateway(gateway)
            .replace()
            .execute()
            .await
            .map_err(|e| nl(&format!("add default route via {gateway}"), e))
    }
}

fn route_destination(r: &RouteMessage) -> Option<Ipv4Net> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
            Ipv4Net::new(*ip, r.header.destination_prefix_length).ok()
        }
        _ => None,
    })
}
