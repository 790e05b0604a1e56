//! A stored machine as the API shows it: its spec, its addresses from its block, and the last probe of its
//! exposed ports (kept in memory, filled by the proxy's poller).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::RwLock;

use hyperfleet_types::{ExposedPortStatus, Machine};

use super::network::Addressing;
use super::{Host, Service};
use crate::store::machines::MachineRecord;

/// The latest probe of each machine's exposed ports.
#[derive(Default)]
pub(super) struct PortStatus(RwLock<HashMap<String, HashMap<u16, ExposedPortStatus>>>);

impl PortStatus {
    fn of(&self, m: &MachineRecord) -> Vec<ExposedPortStatus> {
        let all = self.0.read().unwrap_or_else(|e| e.into_inner());
        let probed = all.get(&m.id);
        m.spec
            .exposed_ports
            .iter()
            .map(|p| {
                probed.and_then(|s| s.get(p).cloned()).unwrap_or(ExposedPortStatus {
                    port: *p,
                    listening: false,
                    checked_at: None,
                })
            })
            .collect()
    }

    fn set(&self, id: &str, status: Vec<ExposedPortStatus>) {
        let by_port = status.into_iter().map(|s| (s.port, s)).collect();
        self.0.write().unwrap_or_else(|e| e.into_inner()).insert(id.to_string(), by_port);
    }

    pub(super) fn forget(&self, id: &str) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

impl<H: Host> Service<H> {
    pub(super) fn to_wire(&self, m: &MachineRecord) -> Machine {
        let addressing = self.owner_addressing(m).map_or(Cow::Borrowed(&self.addressing), Cow::Owned);
        let b = addressing.block(m);
        let mut spec = m.spec.clone();
        spec.network = addressing.wire(m);
        Machine {
            id: m.id.clone(),
            spec,
            status: m.status,
            socket_path: m.socket_path.clone(),
            pid: m.pid,
            exposed_ports_status: self.ports.of(m),
            image_status: self.images.status(&m.id, m.spec.image_digest.as_deref()),
            tap_device: addressing.iface(m),
            tap_ip: b.tap_ip(),
            guest_ip: b.guest_ip(),
            guest_mac: b.guest_mac().to_string(),
            error_message: m.error_message.clone(),
            expires_at: m.expires_at,
            // The live clock (activity since the last write to the store counts too).
            idle_since: match m.status {
                hyperfleet_types::MachineStatus::Running => {
                    self.effective_idle_since(m, super::activity::now_ms()).map(super::activity::from_ms)
                }
                _ => m.idle_since,
            },
            created_at: m.created_at,
            updated_at: m.updated_at,
            node: m.node.clone(),
            node_status: self.nodes.status(&m.node),
        }
    }

    /// How another node addresses `m`, when another node owns it (its block is cut from that node's subnet);
    /// `None` for this node's machines, and for a node not seen yet (then this node's addressing stands in).
    fn owner_addressing(&self, m: &MachineRecord) -> Option<Addressing> {
        if self.nodes.alone() || m.node == self.nodes.name() {
            return None;
        }
        self.nodes.addressing_of(&m.node).map(|(subnet, naming)| Addressing { subnet, naming })
    }

    /// Records the latest probe of a machine's exposed ports (the proxy's poller).
    pub(crate) fn set_port_status(&self, id: &str, status: Vec<ExposedPortStatus>) {
        self.ports.set(id, status);
    }
}
