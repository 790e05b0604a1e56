//! This daemon as a node of a fleet: its row in the `nodes` table (registered at start, heartbeat moved on
//! a timer), every node's status as the API shows it, and placement of new machines ([`placement`]).
//! A fleet is rows, not messages: the database is the only thing the nodes share.

pub(crate) mod placement;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyperfleet_net::{Subnet, TapNaming};
use hyperfleet_types::{Node, NodeStatus};
use tracing::{info, warn};

use crate::store::nodes::{self as rows, NodeRow, Registration};
use crate::store::{Conn, Store, StoreResult};
pub(crate) use placement::{Demand, NoRoom};

/// Where another node is and whether it answers: what forwarding needs (kept from the last read).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Peer {
    pub status: NodeStatus,
    pub url: Option<String>,
    pub proxy_url: Option<String>,
    /// Where its machines' addresses and interface names come from (`None`: registered by a release that
    /// did not say).
    pub addressing: Option<(Subnet, TapNaming)>,
}

impl Peer {
    fn of(status: NodeStatus, reg: &Registration) -> Self {
        let addressing = reg.subnet.parse::<Subnet>().ok().zip(TapNaming::new(&reg.iface_prefix).ok());
        Self { status, url: reg.url.clone(), proxy_url: reg.proxy_url.clone(), addressing }
    }
}

/// The cluster secret, on a node-to-node call (to the API or to the proxy).
pub(crate) const SECRET_HEADER: &str = "x-hyperfleet-cluster-secret";
/// The node that sent a node-to-node call (set with the secret; a call naming a node without it is refused).
pub(crate) const FORWARDED_BY_HEADER: &str = "x-hyperfleet-forwarded-by";

/// Who sent a request, as far as the fleet is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Caller {
    /// Not another node (a user, or the internet): it claims nothing.
    Outside,
    /// Node `0`, proven by the cluster secret.
    Node(String),
    /// It claims to be a node without this node's cluster secret.
    Forged,
}

pub(crate) struct Nodes {
    store: Store,
    local: Registration,
    heartbeat: Duration,
    down_after: Duration,
    cluster_secret: Option<String>,
    /// Every node's status and URL as of the last heartbeat (or the last read that missed).
    peers: RwLock<HashMap<String, Peer>>,
}

impl std::fmt::Debug for Nodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nodes").field("local", &self.local.name).finish_non_exhaustive()
    }
}

impl Nodes {
    pub(crate) fn new(
        store: Store,
        local: Registration,
        heartbeat: Duration,
        down_after: Duration,
        cluster_secret: Option<String>,
    ) -> Arc<Self> {
        Arc::new(Self { store, local, heartbeat, down_after, cluster_secret, peers: RwLock::default() })
    }

    /// This node's name.
    pub(crate) fn name(&self) -> &str {
        &self.local.name
    }

    /// Whether this node is the fleet's only one: on SQLite, whose file one daemon uses and which adopts every
    /// machine at start. Then every machine is this node's, and nothing needs to ask who owns one.
    pub(crate) fn alone(&self) -> bool {
        self.store.backend() == crate::store::Backend::Sqlite
    }

    pub(crate) fn heartbeat_interval(&self) -> Duration {
        self.heartbeat
    }

    pub(crate) fn cluster_secret(&self) -> Option<&str> {
        self.cluster_secret.as_deref()
    }

    /// Who sent a request with `headers`: a call that names a node or carries a secret must carry this node's
    /// cluster secret (compared in constant time), or it is forged.
    pub(crate) fn caller(&self, headers: &http::HeaderMap) -> Caller {
        use subtle::ConstantTimeEq;
        if !headers.contains_key(SECRET_HEADER) && !headers.contains_key(FORWARDED_BY_HEADER) {
            return Caller::Outside;
        }
        let proven = match (self.cluster_secret(), headers.get(SECRET_HEADER)) {
            (Some(mine), Some(given)) => bool::from(given.as_bytes().ct_eq(mine.as_bytes())),
            _ => false,
        };
        if !proven {
            return Caller::Forged;
        }
        let from = headers.get(FORWARDED_BY_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("unknown");
        Caller::Node(from.to_string())
    }

    /// The addresses the other nodes' URLs name (host names resolved now): where their forwarded calls come
    /// from, given that a node reaches the others from the address it is reached at.
    pub(crate) async fn peer_addresses(&self) -> std::collections::HashSet<std::net::IpAddr> {
        let urls: Vec<String> = {
            let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
            peers
                .iter()
                .filter(|(name, _)| **name != self.local.name)
                .flat_map(|(_, p)| p.url.iter().chain(p.proxy_url.iter()).cloned())
                .collect()
        };
        let mut out = std::collections::HashSet::new();
        for url in urls {
            out.extend(addresses_of(&url, 80).await);
        }
        out
    }

    /// Node `name` as of the last heartbeat (the proxy's view: a request each is too many database reads).
    pub(crate) fn cached_peer(&self, name: &str) -> Option<Peer> {
        self.peers.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }

    fn down_after_ms(&self) -> i64 {
        i64::try_from(self.down_after.as_millis()).unwrap_or(i64::MAX)
    }

    fn status_of(&self, n: &NodeRow) -> NodeStatus {
        if n.heartbeat_age_ms > self.down_after_ms() {
            NodeStatus::Down
        } else if n.drained {
            NodeStatus::Drained
        } else {
            NodeStatus::Up
        }
    }

    /// Registers this node (heartbeat now) and adopts the machines of a database made before fleets, in one
    /// write transaction; returns how many it adopted.
    pub(crate) async fn register(&self) -> StoreResult<u64> {
        let mut tx = self.store.write().await?;
        rows::register(&mut tx, &self.local).await?;
        let adopted = rows::adopt(&mut tx, &self.local.name).await?;
        tx.commit().await?;
        self.refresh().await?;
        Ok(adopted)
    }

    /// Moves this node's heartbeat every interval (registering again if its row went missing) and
    /// refreshes the view of the other nodes. A failure is logged; the next beat tries again.
    pub(crate) async fn run_heartbeats(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let beat = async {
                let mut tx = self.store.write().await?;
                if !rows::heartbeat(&mut tx, &self.local.name).await? {
                    warn!(node = %self.local.name, "this node's row was gone; registering again");
                    rows::register(&mut tx, &self.local).await?;
                }
                tx.commit().await?;
                self.refresh().await
            };
            if let Err(e) = beat.await {
                warn!(node = %self.local.name, error = %e, "heartbeat failed");
            }
        }
    }

    /// Reads every node and keeps what the others need of it (status, URLs, addressing) for
    /// [`Self::status`], [`Self::cached_peer`], [`Self::addressing_of`] and [`Self::peer_addresses`].
    pub(crate) async fn refresh(&self) -> StoreResult<Vec<NodeRow>> {
        let all = rows::list(&mut *self.store.read().await?).await?;
        let view = all.iter().map(|n| (n.reg.name.clone(), Peer::of(self.status_of(n), &n.reg))).collect();
        *self.peers.write().unwrap_or_else(|e| e.into_inner()) = view;
        Ok(all)
    }

    /// A node's status as of the last heartbeat; this node is up while it serves. A node never seen is down.
    pub(crate) fn status(&self, name: &str) -> NodeStatus {
        let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
        match peers.get(name) {
            Some(p) if name == self.local.name && p.status == NodeStatus::Down => NodeStatus::Up,
            Some(p) => p.status,
            None if name == self.local.name => NodeStatus::Up,
            None => NodeStatus::Down,
        }
    }

    /// Where node `name` is, read from the database now (forwarding must not go by a stale view).
    pub(crate) async fn peer(&self, name: &str) -> StoreResult<Option<Peer>> {
        let row = rows::get(&mut *self.store.read().await?, name).await?;
        Ok(row.map(|n| Peer::of(self.status_of(&n), &n.reg)))
    }

    /// The subnet and interface naming of node `name`'s machines as of the last heartbeat; `None` for a node
    /// not seen yet or registered without them.
    pub(crate) fn addressing_of(&self, name: &str) -> Option<(Subnet, TapNaming)> {
        self.peers.read().unwrap_or_else(|e| e.into_inner()).get(name).and_then(|p| p.addressing.clone())
    }

    fn to_wire(&self, n: NodeRow) -> Node {
        Node {
            status: self.status_of(&n),
            name: n.reg.name,
            url: n.reg.url,
            proxy_url: n.reg.proxy_url,
            subnet: Some(n.reg.subnet).filter(|s| !s.is_empty()),
            drained: n.drained,
            vcpus: n.reg.vcpus,
            mem_size_mib: n.reg.mem_mib,
            overcommit: n.reg.overcommit,
            runtimes: n.reg.runtimes,
            labels: n.reg.labels,
            machines: n.machines,
            used_vcpus: n.used_vcpus,
            used_mem_size_mib: n.used_mem_mib,
            heartbeat_age_ms: u64::try_from(n.heartbeat_age_ms).unwrap_or(0),
            started_at: n.started_at,
        }
    }

    pub(crate) async fn list(&self) -> StoreResult<Vec<Node>> {
        Ok(self.refresh().await?.into_iter().map(|n| self.to_wire(n)).collect())
    }

    pub(crate) async fn get(&self, name: &str) -> StoreResult<Option<Node>> {
        Ok(rows::get(&mut *self.store.read().await?, name).await?.map(|n| self.to_wire(n)))
    }

    /// Drains (`true`) or undrains node `name`: a drained node keeps its machines and serves them, but
    /// placement gives it no new ones. `None` if there is no such node.
    pub(crate) async fn set_drained(&self, name: &str, drained: bool) -> StoreResult<Option<Node>> {
        let mut tx = self.store.write().await?;
        let found = rows::set_drained(&mut tx, name, drained).await?;
        tx.commit().await?;
        if found {
            info!(node = %name, drained, "node drain flag changed");
            self.refresh().await?;
            self.get(name).await
        } else {
            Ok(None)
        }
    }

    /// Chooses the node for `demand` from the node rows as `c` sees them (in a create's write transaction,
    /// the decision holds until it commits).
    pub(crate) async fn place(&self, c: &mut Conn, demand: &Demand<'_>) -> StoreResult<Result<String, NoRoom>> {
        let all = rows::list(c).await?;
        Ok(placement::choose(&all, demand, self.down_after_ms()))
    }
}

/// The addresses of `url`'s host (resolved now when it is a name; `default_port` for the lookup when the URL
/// names none). Nothing for a URL that does not parse or a name that does not resolve (logged).
pub(crate) async fn addresses_of(url: &str, default_port: u16) -> Vec<std::net::IpAddr> {
    let Ok(url) = reqwest::Url::parse(url) else {
        return vec![];
    };
    let host = url.host_str().unwrap_or("localhost").trim_start_matches('[').trim_end_matches(']').to_string();
    if let Ok(ip) = host.parse() {
        return vec![ip];
    }
    match tokio::net::lookup_host((host.as_str(), url.port_or_known_default().unwrap_or(default_port))).await {
        Ok(addrs) => addrs.map(|a| a.ip()).collect(),
        Err(e) => {
            warn!(%host, error = %e, "could not resolve a host of the fleet");
            vec![]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::TestDb;

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        pairs.iter().map(|(k, v)| (http::HeaderName::from_static(k), v.parse().unwrap())).collect()
    }

    #[tokio::test]
    async fn a_call_claiming_to_be_a_node_needs_the_cluster_secret() {
        let db = TestDb::sqlite().await;
        let reg = crate::machines::NodePolicy::single("a").registration;
        let secret = "the-cluster-secret-0123".to_string();
        let nodes =
            Nodes::new(db.store.clone(), reg.clone(), Duration::from_secs(1), Duration::from_secs(2), Some(secret));
        assert_eq!(nodes.caller(&headers(&[("authorization", "Bearer hf_x")])), Caller::Outside);
        let proven = headers(&[(SECRET_HEADER, "the-cluster-secret-0123"), (FORWARDED_BY_HEADER, "b")]);
        assert_eq!(nodes.caller(&proven), Caller::Node("b".into()));
        for forged in [
            headers(&[(FORWARDED_BY_HEADER, "b")]),
            headers(&[(SECRET_HEADER, "the-cluster-secret-0124"), (FORWARDED_BY_HEADER, "b")]),
            headers(&[(SECRET_HEADER, "the-cluster-secret")]),
        ] {
            assert_eq!(nodes.caller(&forged), Caller::Forged, "{forged:?}");
        }
        // A node without a secret of its own trusts no caller that claims to be a node.
        let open = Nodes::new(db.store.clone(), reg, Duration::from_secs(1), Duration::from_secs(2), None);
        assert_eq!(open.caller(&proven), Caller::Forged);
    }

    #[tokio::test]
    async fn the_other_nodes_addresses_and_addressing_come_from_their_rows() {
        let db = TestDb::sqlite().await;
        let mut me = crate::machines::NodePolicy::single("a").registration;
        me.url = Some("http://10.0.0.1:3000".into());
        let nodes = Nodes::new(db.store.clone(), me.clone(), Duration::from_secs(1), Duration::from_secs(60), None);
        nodes.register().await.unwrap();
        let other = Registration {
            name: "b".into(),
            url: Some("http://10.0.0.2:3000".into()),
            proxy_url: Some("http://10.0.0.3:4000".into()),
            subnet: "10.9.1.0/24".into(),
            iface_prefix: "tb".into(),
            ..me
        };
        let mut tx = db.store.write().await.unwrap();
        rows::register(&mut tx, &other).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(nodes.addressing_of("b"), None, "not seen before the next refresh");
        nodes.refresh().await.unwrap();
        let ips = nodes.peer_addresses().await;
        let want: std::collections::HashSet<std::net::IpAddr> =
            ["10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap()].into();
        assert_eq!(ips, want, "the other node's API and proxy hosts, not this node's own");
        let (subnet, naming) = nodes.addressing_of("b").unwrap();
        assert_eq!((subnet.to_string().as_str(), naming.name(3).as_str()), ("10.9.1.0/24", "tb3"));
        assert_eq!(nodes.cached_peer("b").unwrap().proxy_url.as_deref(), Some("http://10.0.0.3:4000"));
    }
}
