//! Placement: which node of the fleet gets a new machine. Pure: it is given the node rows read in the
//! create's write transaction (which holds the database's write lock), so the decision and the insert it
//! leads to are one step for the whole fleet and two nodes placing at once never overcommit one.
//!
//! Least-loaded rather than best-of-K: every create already reads every node row in its transaction (a fleet
//! has tens of nodes, not thousands), so the exact least-loaded node costs nothing more than sampling K, and
//! it spreads deterministically, which is what an operator reading `GET /nodes` expects.

use std::collections::BTreeMap;

use hyperfleet_types::RuntimeKind;

use crate::store::nodes::NodeRow;

/// What a new machine needs from its node.
#[derive(Debug, Clone)]
pub(crate) struct Demand<'a> {
    pub vcpus: u32,
    pub mem_mib: u64,
    /// The runtime the request names; `None`: whatever the node defaults to.
    pub runtime: Option<RuntimeKind>,
    /// `node`: only this one.
    pub pin: Option<&'a str>,
    /// `node_selector`: only nodes carrying all these labels.
    pub selector: &'a BTreeMap<String, String>,
    /// The node deciding: a candidate even without a URL (nothing has to be forwarded to it).
    pub local: &'a str,
}

/// Why no node was chosen; the message is the API's.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum NoRoom {
    #[error("node '{0}' is not a node of this fleet")]
    UnknownNode(String),
    #[error("node '{node}' cannot take the machine: {why}")]
    Unavailable { node: String, why: String },
    #[error("no node has room for {vcpus} vCPU / {mem_mib} MiB{detail}")]
    Full { vcpus: u32, mem_mib: u64, detail: String },
}

/// How full a node would be with the demand added: the larger of its vCPU and memory fractions.
fn load_after(n: &NodeRow, d: &Demand) -> f64 {
    let cap = |c: f64| c * n.reg.overcommit.unwrap_or(1.0);
    let v = (n.used_vcpus + u64::from(d.vcpus)) as f64 / cap(f64::from(n.reg.vcpus.max(1)));
    let m = (n.used_mem_mib + d.mem_mib) as f64 / cap(n.reg.mem_mib.max(1) as f64);
    v.max(m)
}

/// Why `n` cannot take `d` (`None`: it can).
fn unfit(n: &NodeRow, d: &Demand, down_after_ms: i64) -> Option<String> {
    // The deciding node is alive whatever its row says (its heartbeat may lag after a database outage).
    if n.reg.name != d.local && n.heartbeat_age_ms > down_after_ms {
        return Some(format!("it is down (no heartbeat for {} s)", n.heartbeat_age_ms / 1000));
    }
    if n.drained {
        return Some("it is drained".into());
    }
    if n.reg.name != d.local && n.reg.url.is_none() {
        return Some("it has no HYPERFLEET_NODE_URL, so no other node can reach it".into());
    }
    if let Some(r) = d.runtime
        && !n.reg.runtimes.contains(&r)
    {
        return Some(format!("it cannot run the {r} runtime"));
    }
    if let Some((k, v)) = d.selector.iter().find(|(k, v)| n.reg.labels.get(*k) != Some(*v)) {
        return Some(format!("it does not have the label {k}={v}"));
    }
    if let Some(o) = n.reg.overcommit {
        let vcpu_cap = (f64::from(n.reg.vcpus) * o).floor();
        let mem_cap = (n.reg.mem_mib as f64 * o).floor();
        if (n.used_vcpus + u64::from(d.vcpus)) as f64 > vcpu_cap || (n.used_mem_mib + d.mem_mib) as f64 > mem_cap {
            return Some(format!(
                "it has no room ({} of {vcpu_cap:.0} vCPU and {} of {mem_cap:.0} MiB reserved)",
                n.used_vcpus, n.used_mem_mib
            ));
        }
    }
    None
}

/// The node for `d`: among those that fit, the least loaded after placing it (then fewer machines, then
/// name, so equal nodes fill in turn).
pub(crate) fn choose(nodes: &[NodeRow], d: &Demand, down_after_ms: i64) -> Result<String, NoRoom> {
    if let Some(pin) = d.pin {
        let n = nodes.iter().find(|n| n.reg.name == pin).ok_or_else(|| NoRoom::UnknownNode(pin.to_string()))?;
        return match unfit(n, d, down_after_ms) {
            None => Ok(n.reg.name.clone()),
            Some(why) => Err(NoRoom::Unavailable { node: pin.to_string(), why }),
        };
    }
    let best = nodes.iter().filter(|n| unfit(n, d, down_after_ms).is_none()).min_by(|a, b| {
        load_after(a, d)
            .total_cmp(&load_after(b, d))
            .then(a.machines.cmp(&b.machines))
            .then(a.reg.name.cmp(&b.reg.name))
    });
    match best {
        Some(n) => Ok(n.reg.name.clone()),
        None => {
            let detail = if d.selector.is_empty() && d.runtime.is_none() {
                String::new()
            } else {
                let mut wants = Vec::new();
                if let Some(r) = d.runtime {
                    wants.push(format!("runtime {r}"));
                }
                wants.extend(d.selector.iter().map(|(k, v)| format!("{k}={v}")));
                format!(" ({})", wants.join(", "))
            };
            Err(NoRoom::Full { vcpus: d.vcpus, mem_mib: d.mem_mib, detail })
        }
    }
}

/// For the benchmarks (`hyperfleet::testing::placement`): what placement costs with a fleet of a given size.
pub mod bench {
    use std::collections::BTreeMap;

    use super::{Demand, choose};
    use crate::store::Store;
    use crate::store::nodes::{self as rows, Registration};

    /// Registers `n` nodes named `node-0000`… (room for 10,000 machines each: 10,000 vCPU, 64 TiB,
    /// overcommit 4; heartbeat now).
    pub async fn register_nodes(store: &Store, n: usize) -> Result<(), String> {
        let mut tx = store.write().await.map_err(|e| e.to_string())?;
        for i in 0..n {
            let reg = Registration {
                name: format!("node-{i:04}"),
                url: Some(format!("http://10.0.0.{}:3000", i % 250)),
                vcpus: 10_000,
                mem_mib: 64 << 20,
                overcommit: Some(4.0),
                runtimes: vec![hyperfleet_types::RuntimeKind::Container],
                labels: BTreeMap::from([("zone".into(), format!("z{}", i % 3))]),
                proxy_url: None,
                subnet: "172.16.0.0/16".into(),
                iface_prefix: "tap".into(),
            };
            rows::register(&mut tx, &reg).await.map_err(|e| e.to_string())?;
        }
        tx.commit().await.map_err(|e| e.to_string())
    }

    /// One decision as a create makes it: in a write transaction, every node row with its machines' sums,
    /// then the least-loaded choice. Returns the chosen node's name.
    pub async fn decide(store: &Store, vcpus: u32, mem_mib: u64) -> Result<String, String> {
        let mut tx = store.write().await.map_err(|e| e.to_string())?;
        let nodes = rows::list(&mut tx).await.map_err(|e| e.to_string())?;
        let selector = BTreeMap::new();
        let d = Demand { vcpus, mem_mib, runtime: None, pin: None, selector: &selector, local: "" };
        choose(&nodes, &d, i64::MAX).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::nodes::Registration;

    fn node(name: &str, used_vcpus: u64, labels: &[(&str, &str)]) -> NodeRow {
        NodeRow {
            reg: Registration {
                name: name.into(),
                url: Some(format!("http://{name}")),
                vcpus: 4,
                mem_mib: 4096,
                overcommit: Some(1.0),
                runtimes: vec![RuntimeKind::Container],
                labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                proxy_url: None,
                subnet: "172.16.0.0/16".into(),
                iface_prefix: "tap".into(),
            },
            drained: false,
            heartbeat_age_ms: 100,
            started_at: time::OffsetDateTime::UNIX_EPOCH,
            machines: used_vcpus,
            used_vcpus,
            used_mem_mib: used_vcpus * 256,
        }
    }

    fn demand<'a>(sel: &'a BTreeMap<String, String>) -> Demand<'a> {
        Demand { vcpus: 1, mem_mib: 256, runtime: None, pin: None, selector: sel, local: "a" }
    }

    #[test]
    fn the_least_loaded_node_that_fits_wins() {
        let none = BTreeMap::new();
        let nodes = [node("a", 2, &[]), node("b", 1, &[]), node("c", 3, &[])];
        assert_eq!(choose(&nodes, &demand(&none), 10_000).unwrap(), "b");
        // Equal load: fewer machines, then the name.
        let nodes = [node("b", 0, &[]), node("a", 0, &[])];
        assert_eq!(choose(&nodes, &demand(&none), 10_000).unwrap(), "a");
    }

    #[test]
    fn down_drained_and_full_nodes_are_skipped() {
        let none = BTreeMap::new();
        let mut down = node("a", 0, &[]);
        down.heartbeat_age_ms = 20_000;
        let mut drained = node("b", 0, &[]);
        drained.drained = true;
        let full = node("c", 4, &[]);
        let d = Demand { local: "d", ..demand(&none) };
        let e = choose(&[down.clone(), drained.clone(), full.clone()], &d, 10_000).unwrap_err();
        assert_eq!(e.to_string(), "no node has room for 1 vCPU / 256 MiB");
        assert_eq!(choose(&[down.clone(), drained, full, node("d", 3, &[])], &d, 10_000).unwrap(), "d");
        // The deciding node is never down to itself: its heartbeat may lag behind a database outage.
        assert_eq!(choose(&[down], &demand(&none), 10_000).unwrap(), "a");
    }

    #[test]
    fn pins_selectors_and_runtimes_are_honoured() {
        let none = BTreeMap::new();
        let nodes = [node("a", 0, &[("zone", "x")]), node("b", 3, &[("zone", "y")])];
        let pinned = Demand { pin: Some("b"), ..demand(&none) };
        assert_eq!(choose(&nodes, &pinned, 10_000).unwrap(), "b");
        let ghost = Demand { pin: Some("z"), ..demand(&none) };
        assert_eq!(choose(&nodes, &ghost, 10_000), Err(NoRoom::UnknownNode("z".into())));
        let sel: BTreeMap<String, String> = [("zone".to_string(), "y".to_string())].into();
        assert_eq!(choose(&nodes, &demand(&sel), 10_000).unwrap(), "b");
        let big = Demand { vcpus: 2, ..demand(&sel) };
        assert_eq!(
            choose(&nodes, &big, 10_000).unwrap_err().to_string(),
            "no node has room for 2 vCPU / 256 MiB (zone=y)"
        );
        let fc = Demand { runtime: Some(RuntimeKind::Firecracker), ..demand(&none) };
        assert!(matches!(choose(&nodes, &fc, 10_000), Err(NoRoom::Full { .. })));
    }

    #[test]
    fn without_overcommit_capacity_is_not_enforced() {
        let none = BTreeMap::new();
        let mut n = node("a", 100, &[]);
        n.reg.overcommit = None;
        assert_eq!(choose(&[n], &demand(&none), 10_000).unwrap(), "a");
    }
}
