//! Prometheus metrics (`GET /metrics`, text format 0.0.4, encoded by `prometheus-client`): counters and
//! histograms updated as things happen, plus gauges read at scrape time from a [`Snapshot`]. A leaf like
//! `config.rs`: every layer may record into [`Metrics`]; it imports none of them.
//!
//! Cardinality is bounded: routes are the router's templates (`/machines/:id`, never a raw path; anything
//! unmatched is `unmatched`), statuses and operations are small fixed sets, and per-machine series
//! (`machine_id`, `machine_name`) exist only for the machines that run at scrape time — they are built from
//! the snapshot on every scrape, so a stopped or deleted machine's series are gone at the next one.

use std::fmt::Write;
use std::time::Duration;

use hyperfleet_types::{MachineStatus, RuntimeKind};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

pub(crate) use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A machine operation whose duration is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Operation {
    Start,
    Stop,
    Exec,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Exec => "exec",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StatusClass {
    status: &'static str,
}

fn duration_histogram() -> Histogram {
    // 1 ms .. ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn fast_histogram() -> Histogram {
    // 100 µs .. ~6.5 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// The metrics updated as things happen.
pub(crate) struct Metrics {
    /// `HYPERFLEET_METRICS`: false records nothing (every method returns at once) and `GET /metrics` is 404.
    enabled: bool,
    registry: Registry,
    operations: Family<OperationLabels, Histogram, fn() -> Histogram>,
    requests: Family<RequestLabels, Counter>,
    proxy_requests: Family<StatusClass, Histogram, fn() -> Histogram>,
    agent_failures: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(true)
    }
}

impl Metrics {
    pub(crate) fn new(enabled: bool) -> Self {
        let mut registry = Registry::with_prefix("hyperfleet");
        let operations = Family::<OperationLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        registry.register_with_unit(
            "machine_operation_duration",
            "Duration of machine operations (start, stop, exec) by result",
            Unit::Seconds,
            operations.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "api_requests",
            "API requests by method, route template and response status",
            requests.clone(),
        );
        let proxy_requests = Family::<StatusClass, Histogram, fn() -> Histogram>::new_with_constructor(
            fast_histogram as fn() -> Histogram,
        );
        registry.register_with_unit(
            "proxy_request_duration",
            "Proxied requests until their response headers, by status class",
            Unit::Seconds,
            proxy_requests.clone(),
        );
        let agent_failures = Counter::default();
        registry.register(
            "agent_connection_failures",
            "Times the guest agent of a running machine could not be reached",
            agent_failures.clone(),
        );
        Self { enabled, registry, operations, requests, proxy_requests, agent_failures }
    }

    /// Whether anything is recorded and exposed (`HYPERFLEET_METRICS`).
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    pub(crate) fn operation(&self, op: Operation, ok: bool, took: Duration) {
        if !self.enabled {
            return;
        }
        let labels = OperationLabels { operation: op.as_str(), result: if ok { "ok" } else { "error" } };
        self.operations.get_or_create(&labels).observe(took.as_secs_f64());
    }

    /// One API request; `route` is the router's template (`/machines/{id}`, shown as `/machines/:id`: braces
    /// in label values trip up some text-format parsers), or `None` when no route matched.
    pub(crate) fn request(&self, method: &str, route: Option<&str>, status: u16) {
        if !self.enabled {
            return;
        }
        let route = match route {
            Some(r) => r.chars().filter(|c| *c != '}').map(|c| if c == '{' { ':' } else { c }).collect(),
            None => "unmatched".to_string(),
        };
        let labels = RequestLabels { method: method.to_string(), route, status };
        self.requests.get_or_create(&labels).inc();
    }

    pub(crate) fn proxy_request(&self, status: u16, took: Duration) {
        if !self.enabled {
            return;
        }
        let status = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.proxy_requests.get_or_create(&StatusClass { status }).observe(took.as_secs_f64());
    }

    pub(crate) fn agent_failure(&self) {
        if !self.enabled {
            return;
        }
        self.agent_failures.inc();
    }

    /// The whole exposition: the live metrics, then the gauges of `snap`.
    pub(crate) fn render(&self, snap: &Snapshot) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        prometheus_client::encoding::prometheus_text::encode(&mut out, &snap.registry())?;
        if !out.ends_with('\n') {
            out.write_char('\n')?;
        }
        Ok(out)
    }
}

/// Bytes and connections of one listener.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ListenerStats {
    pub open_connections: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

/// What one running machine uses, as the host sees it.
#[derive(Debug, Clone, Default)]
pub(crate) struct MachineSample {
    pub id: String,
    pub name: String,
    pub cpu_seconds: Option<f64>,
    pub memory_bytes: Option<u64>,
    /// Seen from the guest: what it received and sent.
    pub network_rx_bytes: Option<u64>,
    pub network_tx_bytes: Option<u64>,
}

/// What is read at scrape time.
#[derive(Debug, Clone, Default)]
pub(crate) struct Snapshot {
    pub machines: Vec<(MachineStatus, RuntimeKind, u64)>,
    pub blocks_used: u64,
    pub blocks_total: u64,
    pub api: ListenerStats,
    pub proxy: Option<ListenerStats>,
    pub running: Vec<MachineSample>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MachineCount {
    status: &'static str,
    runtime: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BlockState {
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Listener {
    listener: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ListenerDirection {
    listener: &'static str,
    direction: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MachineLabels {
    machine_id: String,
    machine_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MachineDirection {
    machine_id: String,
    machine_name: String,
    direction: &'static str,
}

fn gauge_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Snapshot {
    fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("hyperfleet");
        let machines = Family::<MachineCount, Gauge>::default();
        // Every status and runtime, zeros included, so a series never vanishes when its last machine leaves.
        for status in MachineStatus::ALL {
            for runtime in [RuntimeKind::Firecracker, RuntimeKind::Container] {
                let n = self.machines.iter().filter(|(s, k, _)| *s == status && *k == runtime).map(|m| m.2).sum();
                let labels = MachineCount { status: status.as_str(), runtime: runtime.as_str() };
                machines.get_or_create(&labels).set(gauge_i64(n));
            }
        }
        r.register("machines", "Machines by status and runtime", machines);
        let blocks = Family::<BlockState, Gauge>::default();
        blocks.get_or_create(&BlockState { state: "used" }).set(gauge_i64(self.blocks_used));
        let free = self.blocks_total.saturating_sub(self.blocks_used);
        blocks.get_or_create(&BlockState { state: "free" }).set(gauge_i64(free));
        r.register("ipam_blocks", "Address blocks (/30) of the machine subnet, used and free", blocks);

        let open = Family::<Listener, Gauge>::default();
        let bytes = Family::<ListenerDirection, Counter<u64>>::default();
        let listeners = [("api", Some(self.api)), ("proxy", self.proxy)];
        for (name, stats) in listeners {
            let Some(s) = stats else { continue };
            open.get_or_create(&Listener { listener: name }).set(gauge_i64(s.open_connections));
            let rx = ListenerDirection { listener: name, direction: "received" };
            bytes.get_or_create(&rx).inc_by(s.bytes_received);
            let tx = ListenerDirection { listener: name, direction: "sent" };
            bytes.get_or_create(&tx).inc_by(s.bytes_sent);
        }
        r.register("open_connections", "Client connections open now, by listener", open);
        r.register_with_unit("listener", "Bytes read from and written to clients, by listener", Unit::Bytes, bytes);

        let cpu = Family::<MachineLabels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        let memory = Family::<MachineLabels, Gauge>::default();
        let network = Family::<MachineDirection, Counter<u64>>::default();
        for m in &self.running {
            let labels = MachineLabels { machine_id: m.id.clone(), machine_name: m.name.clone() };
            if let Some(s) = m.cpu_seconds {
                cpu.get_or_create(&labels).inc_by(s);
            }
            if let Some(b) = m.memory_bytes {
                memory.get_or_create(&labels).set(gauge_i64(b));
            }
            for (direction, v) in [("received", m.network_rx_bytes), ("sent", m.network_tx_bytes)] {
                if let Some(v) = v {
                    let l = MachineDirection { machine_id: m.id.clone(), machine_name: m.name.clone(), direction };
                    network.get_or_create(&l).inc_by(v);
                }
            }
        }
        r.register_with_unit("machine_cpu", "CPU time used by each running machine", Unit::Seconds, cpu);
        r.register_with_unit("machine_memory", "Memory used by each running machine", Unit::Bytes, memory);
        r.register_with_unit(
            "machine_network",
            "Bytes each running machine received and sent (its host interface's counters)",
            Unit::Bytes,
            network,
        );
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_parses_and_carries_what_was_recorded() {
        let m = Metrics::new(true);
        m.operation(Operation::Start, true, Duration::from_millis(120));
        m.request("GET", Some("/machines/{id}"), 200);
        m.request("GET", Some("/machines/{id}"), 200);
        m.request("GET", None, 404);
        m.agent_failure();
        let snap = Snapshot {
            machines: vec![(MachineStatus::Running, RuntimeKind::Container, 2)],
            blocks_used: 3,
            blocks_total: 16384,
            running: vec![MachineSample {
                id: "abc".into(),
                name: "web".into(),
                cpu_seconds: Some(1.5),
                memory_bytes: Some(4096),
                network_rx_bytes: Some(10),
                network_tx_bytes: Some(20),
            }],
            ..Snapshot::default()
        };
        let text = m.render(&snap).unwrap();
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let parsed = prometheus_parse::Scrape::parse(lines).unwrap();
        let value = |name: &str, labels: &[(&str, &str)]| {
            parsed
                .samples
                .iter()
                .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
                .map(|s| match s.value {
                    prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Untyped(v) => v,
                    _ => f64::NAN,
                })
        };
        let route = [("route", "/machines/:id"), ("status", "200"), ("method", "GET")];
        assert_eq!(value("hyperfleet_api_requests_total", &route), Some(2.0), "{text}");
        assert_eq!(value("hyperfleet_api_requests_total", &[("route", "unmatched")]), Some(1.0));
        assert_eq!(value("hyperfleet_machines", &[("status", "running"), ("runtime", "container")]), Some(2.0));
        assert_eq!(value("hyperfleet_machines", &[("status", "stopped"), ("runtime", "container")]), Some(0.0));
        assert_eq!(value("hyperfleet_ipam_blocks", &[("state", "free")]), Some(16381.0));
        assert_eq!(value("hyperfleet_machine_cpu_seconds_total", &[("machine_name", "web")]), Some(1.5));
        assert_eq!(value("hyperfleet_machine_memory_bytes", &[("machine_id", "abc")]), Some(4096.0));
        assert_eq!(value("hyperfleet_machine_network_bytes_total", &[("direction", "sent")]), Some(20.0));
        assert_eq!(value("hyperfleet_agent_connection_failures_total", &[]), Some(1.0));
        assert!(text.contains("hyperfleet_machine_operation_duration_seconds_bucket"), "{text}");
        assert!(!text.contains("# EOF"), "text format 0.0.4, not OpenMetrics");
    }

    #[test]
    fn disabled_metrics_record_nothing() {
        let m = Metrics::new(false);
        m.request("GET", Some("/machines/{id}"), 200);
        m.operation(Operation::Start, true, Duration::from_millis(5));
        m.proxy_request(200, Duration::from_millis(1));
        m.agent_failure();
        assert!(!m.enabled());
        let text = m.render(&Snapshot::default()).unwrap();
        assert!(!text.contains("hyperfleet_api_requests_total{"), "{text}");
        assert!(!text.contains("hyperfleet_proxy_request_duration_seconds_bucket"), "{text}");
        assert!(text.contains("hyperfleet_agent_connection_failures_total 0"), "{text}");
    }
}
