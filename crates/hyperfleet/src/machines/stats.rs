//! What machines use: `GET /machines/{id}/stats` for one, and the scrape-time [`Snapshot`] of `/metrics`
//! (machine counts, address blocks, each running machine's CPU, memory and network).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hyperfleet_types::{MachineStats, MachineStatus};

use super::{Host, Result, Service};
use crate::metrics::{MachineSample, Snapshot};
use crate::runtime::stats::Usage;
use crate::store::machines::{self as records, MachineRecord};

/// Without an earlier reading this recent, a stats request measures CPU over this long.
const CPU_WINDOW: Duration = Duration::from_millis(200);

/// Each machine's last CPU reading (when, CPU seconds), so a stats request gives the CPU share since the last.
#[derive(Default)]
pub(super) struct CpuReadings(Mutex<HashMap<String, (Instant, f64)>>);

impl CpuReadings {
    fn swap(&self, id: &str, now: (Instant, f64)) -> Option<(Instant, f64)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_string(), now)
    }

    pub(super) fn forget(&self, id: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

fn percent(before: (Instant, f64), after: (Instant, f64)) -> Option<f64> {
    let secs = after.0.checked_duration_since(before.0)?.as_secs_f64();
    (secs > 0.0).then(|| ((after.1 - before.1).max(0.0) / secs * 100.0 * 10.0).round() / 10.0)
}

impl<H: Host> Service<H> {
    /// CPU %, memory, disk, network and uptime of one machine (only disk for one that does not run).
    pub(crate) async fn stats(&self, id: &str) -> Result<MachineStats> {
        let rec = self.record(id).await?;
        let mut usage = self.host.usage(&rec).await;
        let mut at = Instant::now();
        let mut cpu_percent = None;
        if let Some(cpu) = usage.cpu_seconds {
            let earlier =
                self.cpu_readings.swap(&rec.id, (at, cpu)).filter(|(t, _)| at.duration_since(*t) >= CPU_WINDOW);
            let earlier = match earlier {
                Some(e) => e,
                None => {
                    tokio::time::sleep(CPU_WINDOW).await;
                    usage = self.host.usage(&rec).await;
                    let before = (at, cpu);
                    at = Instant::now();
                    self.cpu_readings.swap(&rec.id, (at, usage.cpu_seconds.unwrap_or(cpu)));
                    before
                }
            };
            cpu_percent = usage.cpu_seconds.and_then(|now| percent(earlier, (at, now)));
        }
        let running = matches!(rec.status, MachineStatus::Running | MachineStatus::Paused);
        Ok(MachineStats {
            machine_id: rec.id.clone(),
            status: rec.status,
            cpu_percent,
            cpu_seconds: usage.cpu_seconds,
            memory_used_bytes: usage.memory_used,
            memory_limit_bytes: usage.memory_limit.or(running.then(|| u64::from(rec.spec.mem_size_mib) << 20)),
            disk_used_bytes: usage.disk_used,
            disk_size_bytes: usage.disk_size,
            // The host end's counters, turned round: what the host end sends, the guest receives.
            network_rx_bytes: usage.iface_tx,
            network_tx_bytes: usage.iface_rx,
            uptime_seconds: usage.uptime_seconds,
        })
    }

    /// What `/metrics` reads at scrape time (listener figures are the API's to add).
    pub(crate) async fn metrics_snapshot(&self) -> Result<Snapshot> {
        let mut c = self.store.read().await?;
        let active =
            records::with_status(&mut c, self.node(), &[MachineStatus::Running, MachineStatus::Paused]).await?;
        let (machines, blocks_used) =
            (records::counts(&mut c).await?, crate::store::leases::count(&mut c, self.node()).await?);
        drop(c);
        let running = futures::stream::iter(active)
            .map(|m: MachineRecord| async move {
                let u: Usage = self.host.usage(&m).await;
                MachineSample {
                    id: m.id,
                    name: m.spec.name,
                    cpu_seconds: u.cpu_seconds,
                    memory_bytes: u.memory_used,
                    network_rx_bytes: u.iface_tx,
                    network_tx_bytes: u.iface_rx,
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        Ok(Snapshot {
            machines,
            blocks_used,
            blocks_total: u64::from(self.addressing.subnet.block_count()),
            running,
            ..Snapshot::default()
        })
    }
}
