//! The orchestration service: machines' state machine and flows (start, stop, pause, delete) over the
//! store and the host, reconciliation after a restart, events, and guest operations through the agent.
//! Handlers call the [`Service`]; it calls the store and a [`Host`] — nothing below imports anything here.
//!
//! - `lifecycle.rs`: create, read, update, and the start/stop/pause/delete flows with their undo lists
//! - `reconcile.rs`: adoption and cleanup after a daemon restart, and `purge`
//! - `monitor.rs`: a machine whose process dies on its own becomes `failed`
//! - `events.rs`: machine events (stored backlog + broadcast) for `GET /events`, long-polls and the proxy's cache
//! - `stats.rs`: what a machine uses (CPU, memory, disk, network), for `GET /machines/{id}/stats` and metrics
//! - `wire.rs`: a stored machine as the API shows it, with its exposed ports' last probe
//! - `guest.rs`: exec and files through the guest agent
//! - `validate.rs`: a create request into a [`MachineSpec`](hyperfleet_types::MachineSpec)
//! - `activity.rs` / `timers.rs`: what counts as use, and the one task that enforces `ttl_seconds` and
//!   `idle_timeout_seconds` from deadlines kept in the store
//! - `wake.rs`: starting or resuming an `auto_start` machine for a proxied request, once for many requests
//! - `pty.rs`: terminal sessions through the guest agent
//! - `webhooks.rs`: webhooks, and the worker that delivers their events (signed, retried, stored)
//! - `host.rs` / `network.rs`: the host side ([`Host`], [`LinuxHost`], addressing, interfaces, firewall)

mod action;
pub(crate) mod activity;
pub(crate) mod children;
mod error;
mod events;
mod guest;
pub(crate) mod host;
pub(crate) mod images;
mod lifecycle;
mod monitor;
pub(crate) mod network;
mod pty;
mod reconcile;
pub(crate) mod selector;
mod stats;
#[cfg(test)]
mod testing;
mod timers;
mod validate;
mod volumes;
mod wake;
pub(crate) mod webhooks;
mod wire;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use hyperfleet_types::{Health, RuntimeAvailability, RuntimeKind};

pub(crate) use action::Action;
pub(crate) use activity::{Hold, HoldKind};
pub(crate) use error::{Error, Result};
pub(crate) use events::EventFilter;
pub(crate) use guest::command_error;
pub(crate) use host::{Host, LinuxHost};
use network::Addressing;
pub(crate) use pty::{PtyRequest, PtySession};
#[cfg(test)]
pub(crate) use validate::create as validate_create;

use crate::metrics::Metrics;
use crate::runtime::host::HostCapacity;
use crate::store::Store;

/// The defaults and limits the service applies to create requests and guest operations.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    pub assets_dir: std::path::PathBuf,
    pub default_kernel: std::path::PathBuf,
    pub default_rootfs: std::path::PathBuf,
    pub default_kernel_args: String,
    pub default_runtime: RuntimeKind,
    pub default_dns: Vec<Ipv4Addr>,
    pub capacity: HostCapacity,
    pub file_max_size: u64,
    pub file_transfer_timeout: Duration,
    /// Most commands (exec and streamed exec) running in one machine at once.
    pub max_execs_per_machine: usize,
    /// Bytes all buffered commands' output (and its JSON form) may take at once, host-wide.
    pub exec_output_budget: u64,
    /// Machine events kept in the backlog `GET /events` resumes from.
    pub events_backlog: u64,
    /// `HYPERFLEET_METRICS`: record metrics (and serve `GET /metrics`).
    pub metrics: bool,
    /// Webhook deliveries' retries and timeout.
    pub webhooks: webhooks::WebhookPolicy,
    /// `HYPERFLEET_CHILD_API_PORT`: where spawn machines reach the child API on their gateway (`None`: off).
    pub child_api_port: Option<u16>,
    /// This daemon as a fleet node.
    pub node: NodePolicy,
}

/// What this daemon registers as a node, and how it judges the others.
#[derive(Debug, Clone)]
pub(crate) struct NodePolicy {
    pub registration: crate::store::nodes::Registration,
    pub heartbeat: Duration,
    pub down_after: Duration,
    pub cluster_secret: Option<String>,
}

impl NodePolicy {
    /// A node alone (tests): the host's capacity, capacity not enforced.
    #[cfg(test)]
    pub(crate) fn single(name: &str) -> Self {
        Self {
            registration: crate::store::nodes::Registration {
                name: name.into(),
                url: None,
                vcpus: 2,
                mem_mib: 1024,
                overcommit: None,
                runtimes: vec![RuntimeKind::Container, RuntimeKind::Firecracker],
                labels: Default::default(),
                proxy_url: None,
                subnet: "10.9.0.0/24".into(),
                iface_prefix: "tap".into(),
            },
            heartbeat: Duration::from_secs(2),
            down_after: Duration::from_secs(10),
            cluster_secret: None,
        }
    }
}

pub(crate) struct Service<H: Host = LinuxHost> {
    store: Store,
    host: H,
    addressing: Addressing,
    policy: Policy,
    events: events::Events,
    metrics: Arc<Metrics>,
    /// The last CPU reading of each machine whose stats were asked for, for `cpu_percent`.
    cpu_readings: stats::CpuReadings,
    ports: wire::PortStatus,
    execs: guest::ExecSlots,
    images: Arc<images::Images>,
    /// The host-wide budget for buffered command output, in KiB.
    output_budget: Arc<tokio::sync::Semaphore>,
    /// Held across every firewall change, and for a rebuild across the database read it is made from, so an
    /// older view of the machines never replaces a newer one.
    firewall_order: tokio::sync::Mutex<()>,
    /// Held by volume changes (create, resize, clone, delete) and by a start taking volumes.
    volume_ops: tokio::sync::Mutex<()>,
    /// What counts as use of each machine (idle timeouts).
    activity: Arc<activity::ActivityLog>,
    timer_tx: tokio::sync::mpsc::UnboundedSender<timers::TimerMsg>,
    /// Taken by [`Service::run_timers`].
    timer_inbox: std::sync::Mutex<Option<timers::TimerInbox>>,
    /// Wake-ups under way, one per machine however many requests wait for it.
    wakes: wake::Wakes,
    /// This node of the fleet, and what it knows of the others.
    nodes: Arc<crate::nodes::Nodes>,
}

impl<H: Host> Service<H> {
    pub(crate) fn new(
        store: Store,
        host: H,
        addressing: Addressing,
        policy: Policy,
        images: Arc<images::Images>,
    ) -> Arc<Self> {
        let budget_kib = usize::try_from(policy.exec_output_budget / 1024)
            .unwrap_or(usize::MAX)
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        let (timer_tx, checks) = tokio::sync::mpsc::unbounded_channel();
        let (touch_tx, touches) = tokio::sync::mpsc::unbounded_channel();
        let np = &policy.node;
        let nodes = crate::nodes::Nodes::new(
            store.clone(),
            np.registration.clone(),
            np.heartbeat,
            np.down_after,
            np.cluster_secret.clone(),
        );
        Arc::new(Self {
            nodes,
            activity: activity::ActivityLog::new(touch_tx),
            timer_tx,
            timer_inbox: std::sync::Mutex::new(Some(timers::TimerInbox { checks, touches })),
            wakes: wake::Wakes::default(),
            store,
            host,
            addressing,
            events: events::Events::new(policy.events_backlog),
            metrics: Arc::new(Metrics::new(policy.metrics)),
            policy,
            cpu_readings: stats::CpuReadings::default(),
            ports: wire::PortStatus::default(),
            execs: guest::ExecSlots::default(),
            images,
            output_budget: Arc::new(tokio::sync::Semaphore::new(budget_kib)),
            firewall_order: tokio::sync::Mutex::new(()),
            volume_ops: tokio::sync::Mutex::new(()),
        })
    }

    /// A moment of activity in a machine (a proxied request, ...), for its idle timeout.
    pub(crate) fn note_activity(&self, id: &str) {
        self.activity.note(id);
    }

    /// Something open in a machine (a proxied connection, ...): activity while held.
    /// Makes the rest of the fleet (`hosts`: the other nodes, the database) unreachable from every machine of
    /// this node: their services are the control plane's, and a guest's traffic to them would come from
    /// this node's own address. Failures are logged; the caller tries again on its next round.
    pub(crate) async fn fence_fleet(&self, hosts: Vec<std::net::Ipv4Addr>) {
        match self.host.fence(hosts.clone()).await {
            Ok(true) => tracing::info!(?hosts, "the rest of the fleet is fenced off from this node's machines"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "could not fence the rest of the fleet off from the machines"),
        }
    }

    pub(crate) fn hold_activity(&self, id: &str, kind: HoldKind) -> Hold {
        self.activity.hold(id, kind)
    }

    /// The daemon's metrics, recorded into by the service, the API and the proxy.
    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub(crate) fn host(&self) -> &H {
        &self.host
    }

    /// This node of the fleet (the nodes' rows, placement, who owns what).
    pub(crate) fn nodes(&self) -> &Arc<crate::nodes::Nodes> {
        &self.nodes
    }

    /// This node's name: the machines it owns are the only ones it acts on.
    pub(super) fn node(&self) -> &str {
        self.nodes.name()
    }

    /// The largest file the files API accepts or returns.
    pub(crate) fn file_max_size(&self) -> u64 {
        self.policy.file_max_size
    }

    /// What `GET /health` reports: the database and each runtime's availability.
    pub(crate) async fn health(&self) -> Health {
        let database = match self.store.ping().await {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("error: {e}"),
        };
        let runtimes = [RuntimeKind::Firecracker, RuntimeKind::Container]
            .into_iter()
            .map(|r| {
                let why = self.host.unavailable(r);
                RuntimeAvailability {
                    runtime: r,
                    available: why.is_none(),
                    detail: why.unwrap_or_else(|| "available".into()),
                }
            })
            .collect();
        Health {
            status: if database == "ok" { "ok".into() } else { "degraded".into() },
            version: env!("CARGO_PKG_VERSION").to_string(),
            default_runtime: self.policy.default_runtime,
            runtimes,
            database,
        }
    }
}
