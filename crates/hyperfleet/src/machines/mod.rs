//! The orchestration service: the machine state machine and the start, stop and delete flows over the
//! store, the host network and the runtimes; reconciliation with the host at daemon start; long-polling.
//! Every flow runs in a task of its own, so a client that hangs up mid-request cannot leave it half done.

pub mod guest;
pub mod network;
pub mod validate;

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyperfleet_agent_proto::client::ClientError;
use hyperfleet_types::{
    CreateMachine, ExposedPortStatus, Machine, MachineList, MachineLogs, MachineStatus, NetworkReport, RuntimeKind,
    UpdateMachine,
};
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::config::Settings;
use crate::runtime::{MachineFiles, RuntimeError, Runtimes, process};
use crate::store::machines::{self as records, Cas, Changes, InsertError, MachineRecord};
use crate::store::{Store, StoreError, leases::LeaseError};
use network::HostNetwork;

use MachineStatus::*;

/// Statuses in which a machine has (or is getting, or is losing) a process and a host interface.
const ACTIVE: [MachineStatus; 4] = [Starting, Running, Paused, Stopping];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Machine with id '{0}' not found")]
    NotFound(String),
    #[error("Cannot {action} machine in '{status}' state{hint}")]
    InvalidState { action: &'static str, status: MachineStatus, hint: &'static str },
    #[error("{0}")]
    Validation(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error(
        "no free address block: all {blocks} /30 blocks of {subnet} are leased; delete machines or use a larger HYPERFLEET_SUBNET"
    )]
    PoolExhausted { subnet: String, blocks: u32 },
    #[error("{0}")]
    Timeout(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("host network: {0}")]
    Network(#[from] hyperfleet_net::NetError),
    #[error("Failed to communicate with VM: {0}")]
    Agent(ClientError),
    #[error("{0}")]
    FileNotFound(String),
    #[error("{0}")]
    TooLarge(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A status change, published to long-polling waiters.
#[derive(Debug, Clone)]
pub struct MachineEvent {
    pub id: String,
    pub status: MachineStatus,
}

pub struct Service {
    pub store: Store,
    pub settings: Arc<Settings>,
    pub runtimes: Runtimes,
    pub net: HostNetwork,
    pub default_runtime: RuntimeKind,
    pub default_dns: Vec<Ipv4Addr>,
    host_cpus: u32,
    host_mem_mib: u64,
    events: broadcast::Sender<MachineEvent>,
    /// Serialises "read the running machines, rebuild the table", so an older view never wins.
    firewall_lock: tokio::sync::Mutex<()>,
    /// Latest probe of each machine's exposed ports (filled by the proxy's poller).
    port_status: RwLock<HashMap<String, Vec<ExposedPortStatus>>>,
}

/// Runs a flow in a task of its own: a client that hangs up drops this future, not the flow, so a start or
/// stop is never left half done.
async fn detached<T: Send + 'static>(what: &str, flow: impl Future<Output = Result<T>> + Send + 'static) -> Result<T> {
    tokio::spawn(flow).await.map_err(|e| Error::Runtime(RuntimeError::Failed(format!("{what} task: {e}"))))?
}

fn host_mem_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(1024)
}

impl Service {
    pub fn new(
        store: Store,
        settings: Arc<Settings>,
        runtimes: Runtimes,
        net: HostNetwork,
        default_runtime: RuntimeKind,
        default_dns: Vec<Ipv4Addr>,
    ) -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(Self {
            store,
            settings,
            runtimes,
            net,
            default_runtime,
            default_dns,
            host_cpus: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
            host_mem_mib: host_mem_mib(),
            events,
            firewall_lock: tokio::sync::Mutex::new(()),
            port_status: RwLock::new(HashMap::new()),
        })
    }

    pub fn files(&self, id: &str) -> MachineFiles {
        MachineFiles::new(&self.settings.runtime.data_dir, &self.settings.runtime.socket_dir, id)
    }

    pub fn to_wire(&self, m: &MachineRecord) -> Machine {
        let b = self.net.block(m);
        let status = self.port_status.read().unwrap_or_else(|e| e.into_inner()).get(&m.id).cloned();
        let exposed_ports_status =
            m.exposed_ports
                .iter()
                .map(|p| {
                    status
                        .as_ref()
                        .and_then(|s| s.iter().find(|x| x.port == *p).cloned())
                        .unwrap_or(ExposedPortStatus { port: *p, listening: false, checked_at: None })
                })
                .collect();
        Machine {
            id: m.id.clone(),
            name: m.name.clone(),
            status: m.status,
            runtime: m.runtime,
            vcpu_count: m.vcpu_count,
            mem_size_mib: m.mem_size_mib,
            kernel_image_path: m.kernel_image_path.clone(),
            kernel_args: m.kernel_args.clone(),
            rootfs_path: m.rootfs_path.clone(),
            socket_path: m.socket_path.clone(),
            pid: m.pid,
            exposed_ports: m.exposed_ports.clone(),
            exposed_ports_status,
            tap_device: self.net.iface(m),
            tap_ip: b.tap_ip(),
            guest_ip: b.guest_ip(),
            guest_mac: b.guest_mac().to_string(),
            network: self.net.wire(m),
            error_message: m.error_message.clone(),
            created_at: m.created_at.clone(),
            updated_at: m.updated_at.clone(),
        }
    }

    pub fn set_port_status(&self, id: &str, status: Vec<ExposedPortStatus>) {
        self.port_status.write().unwrap_or_else(|e| e.into_inner()).insert(id.to_string(), status);
    }

    fn publish(&self, m: &MachineRecord) {
        let _ = self.events.send(MachineEvent { id: m.id.clone(), status: m.status });
    }

    /// Every change to a machine (status, exposed ports, deletion), for long-polls and the proxy's cache.
    pub fn subscribe(&self) -> broadcast::Receiver<MachineEvent> {
        self.events.subscribe()
    }

    pub async fn record(&self, id: &str) -> Result<MachineRecord> {
        let key = id.to_string();
        self.store.call(move |c| records::get(c, &key)).await?.ok_or_else(|| Error::NotFound(id.to_string()))
    }

    /// Compare-and-set on the status; publishes the change.
    async fn transition(
        &self,
        id: &str,
        action: &'static str,
        from: &[MachineStatus],
        to: MachineStatus,
        changes: Changes,
    ) -> Result<MachineRecord> {
        // The transition table of MachineStatus decides; staying in the same state (adoption) is always allowed.
        let allowed: Vec<MachineStatus> = from.iter().copied().filter(|f| *f == to || f.can_become(to)).collect();
        debug_assert_eq!(allowed.len(), from.len(), "the transition table forbids {from:?} -> {to}");
        let key = id.to_string();
        match self.store.call(move |c| records::transition(c, &key, &allowed, to, &changes)).await? {
            Cas::Done(m) => {
                self.publish(&m);
                Ok(m)
            }
            Cas::WrongState(m) => Err(Error::InvalidState { action, status: m.status, hint: "" }),
            Cas::Missing => Err(Error::NotFound(id.to_string())),
        }
    }

    pub async fn create(&self, req: CreateMachine) -> Result<Machine> {
        let limits = validate::Limits {
            host_cpus: self.host_cpus,
            host_mem_mib: self.host_mem_mib,
            assets_dir: &self.settings.runtime.assets_dir,
            default_kernel: &self.settings.runtime.kernel_image_path,
            default_rootfs: &self.settings.runtime.rootfs_path,
            default_kernel_args: &self.settings.runtime.kernel_args,
            default_runtime: self.default_runtime,
            default_dns: &self.default_dns,
        };
        let new = validate::create(&req, crate::store::random_id(), &limits).map_err(Error::Validation)?;
        if let Some(why) = self.runtimes.unavailable(new.runtime) {
            return Err(Error::Validation(format!("runtime '{}' cannot run on this host: {why}", new.runtime)));
        }
        let blocks = self.net.subnet.block_count();
        let rec = self.store.call(move |c| Ok(records::insert(c, &new, blocks))).await?.map_err(|e| match e {
            InsertError::NameTaken(n) => Error::Conflict(format!("A machine named '{n}' already exists")),
            InsertError::Lease(LeaseError::Exhausted(blocks)) => {
                Error::PoolExhausted { subnet: self.net.subnet.to_string(), blocks }
            }
            InsertError::Lease(LeaseError::Store(e)) | InsertError::Store(e) => Error::Store(e),
        })?;
        info!(machine = %rec.id, name = %rec.name, runtime = %rec.runtime, tap = %self.net.iface(&rec), "machine created");
        self.publish(&rec);
        Ok(self.to_wire(&rec))
    }

    pub async fn get(&self, id: &str) -> Result<Machine> {
        Ok(self.to_wire(&self.record(id).await?))
    }

    pub async fn list(&self, status: Option<MachineStatus>, limit: u32, offset: u64) -> Result<MachineList> {
        let (rows, total) = self.store.call(move |c| records::list(c, status, limit, offset)).await?;
        Ok(MachineList { machines: rows.iter().map(|m| self.to_wire(m)).collect(), total })
    }

    pub async fn update(&self, id: &str, req: UpdateMachine) -> Result<Machine> {
        let rec = self.record(id).await?;
        let Some(ports) = req.exposed_ports else {
            return Ok(self.to_wire(&rec));
        };
        let ports = validate::ports("exposed_ports", &ports).map_err(Error::Validation)?;
        let rid = rec.id.clone();
        let updated = self
            .store
            .call(move |c| records::set_exposed_ports(c, &rid, &ports))
            .await?
            .ok_or_else(|| Error::NotFound(id.to_string()))?;
        self.publish(&updated);
        Ok(self.to_wire(&updated))
    }

    /// Rebuilds the firewall from the machines that currently have a host interface.
    pub async fn refresh_firewall(&self) -> Result<()> {
        let _guard = self.firewall_lock.lock().await;
        self.rebuild_firewall_locked().await
    }

    async fn rebuild_firewall_locked(&self) -> Result<()> {
        let active = self.store.call(|c| records::with_status(c, &ACTIVE)).await?;
        self.net.apply_firewall(&active).await?;
        Ok(())
    }

    /// Adds (`true`) or removes one machine's firewall entries. The fast path edits set elements; if that
    /// fails (table missing, entries not as expected after a crash) the table is rebuilt from the database,
    /// which is always right.
    async fn firewall_update(&self, m: &MachineRecord, add: bool) -> Result<()> {
        let _guard = self.firewall_lock.lock().await;
        let entry = self.net.firewall_entry(m);
        let fast = if add { self.net.firewall.add(&entry).await } else { self.net.firewall.delete(&entry).await };
        if let Err(e) = fast {
            tracing::debug!(machine = %m.id, error = %e, "incremental firewall update failed; rebuilding the table");
            self.rebuild_firewall_locked().await?;
        }
        Ok(())
    }

    /// Removes a machine that no longer has an interface from the firewall, logging (not failing) on error.
    async fn firewall_forget(&self, m: &MachineRecord) {
        if let Err(e) = self.firewall_update(m, false).await {
            warn!(machine = %m.id, error = %e, "could not update the firewall");
        }
    }

    /// Starts a machine: pending|stopped|failed → starting → running, or failed with everything undone.
    pub async fn start(self: &Arc<Self>, id: &str) -> Result<Machine> {
        let rec = self.record(id).await?;
        detached("start", self.clone().start_flow(rec)).await
    }

    async fn start_flow(self: Arc<Self>, rec: MachineRecord) -> Result<Machine> {
        let rec = self.transition(&rec.id, "start", &[Pending, Stopped, Failed], Starting, Changes::default()).await?;
        let files = self.files(&rec.id);
        let net = self.net.guest(&rec);
        let mut pid_if_booted = None;
        let outcome: Result<_> = async {
            let netns = self.runtimes.prepare(&rec, &files).await?;
            self.net.attach(&rec, netns.as_deref()).await?;
            self.firewall_update(&rec, true).await?;
            let booted = self.runtimes.boot(&rec, &files, &net, netns.as_deref()).await?;
            pid_if_booted = Some(booted.pid);
            Ok(booted)
        }
        .await;
        match outcome {
            Ok(booted) => {
                let changes = Changes {
                    pid: Some(Some(booted.pid)),
                    socket_path: Some(booted.socket_path.clone()),
                    error_message: None,
                };
                let running = self.transition(&rec.id, "start", &[Starting], Running, changes).await?;
                info!(machine = %rec.id, pid = booted.pid, "machine running");
                self.monitor(running.id.clone(), booted.pid);
                Ok(self.to_wire(&running))
            }
            Err(e) => {
                warn!(machine = %rec.id, error = %e, "start failed; undoing");
                let with_pid = MachineRecord { pid: pid_if_booted, ..rec.clone() };
                self.release_host(&with_pid, &files).await;
                let changes = Changes { error_message: Some(Some(e.to_string())), ..Changes::process_gone() };
                let _ = self.transition(&rec.id, "start", &[Starting], Failed, changes).await;
                self.firewall_forget(&rec).await;
                Err(e)
            }
        }
    }

    /// Stops the process (if any) and removes the host interface. Idempotent. The caller updates the
    /// firewall once the machine's new status is stored (a `stopping` machine still counts as active, so its
    /// interface stays filtered until it is gone).
    async fn release_host(&self, m: &MachineRecord, files: &MachineFiles) {
        self.runtimes.stop(m, files).await;
        if let Err(e) = self.net.detach(m).await {
            warn!(machine = %m.id, error = %e, "could not remove the host interface");
        }
    }

    /// Stops a machine: running|paused → stopping → stopped.
    pub async fn stop(self: &Arc<Self>, id: &str) -> Result<Machine> {
        let rec = self.record(id).await?;
        detached("stop", self.clone().stop_flow(rec)).await
    }

    async fn stop_flow(self: Arc<Self>, rec: MachineRecord) -> Result<Machine> {
        let rec = self.transition(&rec.id, "stop", &[Running, Paused], Stopping, Changes::default()).await?;
        let files = self.files(&rec.id);
        self.release_host(&rec, &files).await;
        let stopped = self.transition(&rec.id, "stop", &[Stopping], Stopped, Changes::process_gone()).await?;
        self.firewall_forget(&rec).await;
        info!(machine = %rec.id, "machine stopped");
        Ok(self.to_wire(&stopped))
    }

    /// Suspends the machine's vCPUs (firecracker) or freezes its processes (container): running → paused.
    pub async fn pause(&self, id: &str) -> Result<Machine> {
        self.suspend_or_resume(id, true).await
    }

    /// paused → running.
    pub async fn resume(&self, id: &str) -> Result<Machine> {
        self.suspend_or_resume(id, false).await
    }

    async fn suspend_or_resume(&self, id: &str, pause: bool) -> Result<Machine> {
        let rec = self.record(id).await?;
        let (action, from, to): (&'static str, &'static [MachineStatus], _) =
            if pause { ("pause", &[Running], Paused) } else { ("resume", &[Paused], Running) };
        // The state changes first, so two requests cannot both act; a refusal by the runtime puts it back.
        let changed = self.transition(&rec.id, action, from, to, Changes::default()).await?;
        let files = self.files(&rec.id);
        if let Err(e) = self.runtimes.set_paused(&changed, &files, pause).await {
            let _ = self.transition(&rec.id, action, &[Running, Paused], from[0], Changes::default()).await;
            return Err(e.into());
        }
        info!(machine = %rec.id, "machine {action}d");
        Ok(self.to_wire(&changed))
    }

    pub async fn restart(self: &Arc<Self>, id: &str) -> Result<Machine> {
        let rec = self.record(id).await?;
        if !matches!(rec.status, Running | Paused) {
            return Err(Error::InvalidState { action: "restart", status: rec.status, hint: "" });
        }
        self.stop(&rec.id).await?;
        self.start(&rec.id).await
    }

    /// Deletes a machine at rest (or, with `force`, stops it first), its disk, logs and lease.
    pub async fn delete(self: &Arc<Self>, id: &str, force: bool) -> Result<()> {
        let rec = self.record(id).await?;
        if force && matches!(rec.status, Running | Paused) {
            match self.stop(&rec.id).await {
                Ok(_) | Err(Error::InvalidState { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let rid = rec.id.clone();
        match self.store.call(move |c| records::delete(c, &rid, &MachineStatus::AT_REST)).await? {
            Cas::Done(m) => {
                self.publish(&m);
                let files = self.files(&m.id);
                // Defensive: a machine at rest has no process, interface or firewall entries; a start the
                // daemon did not finish is cleaned by reconcile.
                self.release_host(&m, &files).await;
                self.runtimes.destroy(&m, &files).await;
                self.port_status.write().unwrap_or_else(|e| e.into_inner()).remove(&m.id);
                info!(machine = %m.id, "machine deleted");
                Ok(())
            }
            Cas::WrongState(m) => Err(Error::InvalidState {
                action: "delete",
                status: m.status,
                hint: "; stop the machine first (or pass ?force=true)",
            }),
            Cas::Missing => Err(Error::NotFound(id.to_string())),
        }
    }

    /// Long-polls until the machine reaches `want`, it fails instead, or `timeout` passes.
    pub async fn wait(&self, id: &str, want: MachineStatus, timeout: Duration) -> Result<Machine> {
        let mut events = self.events.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let rec = self.record(id).await?;
            if rec.status == want {
                return Ok(self.to_wire(&rec));
            }
            if rec.status == Failed {
                return Err(Error::BadRequest(format!(
                    "Machine {} failed instead of reaching status {want}: {}",
                    rec.id,
                    rec.error_message.as_deref().unwrap_or("no error message")
                )));
            }
            loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Ok(ev) if ev.id != rec.id => continue,
                        _ => break,
                    },
                    _ = tokio::time::sleep_until(deadline) => {
                        return Err(Error::Timeout(format!("Timed out waiting for machine {} to reach status {want}", rec.id)));
                    }
                }
            }
        }
    }

    pub async fn logs(&self, id: &str, lines: usize) -> Result<MachineLogs> {
        let rec = self.record(id).await?;
        let path = self.files(&rec.id).console_log;
        let lines = tokio::task::spawn_blocking(move || process::tail(&path, lines)).await.unwrap_or_default();
        Ok(MachineLogs { machine_id: rec.id, lines })
    }

    pub async fn network_report(&self, id: &str) -> Result<NetworkReport> {
        let rec = self.record(id).await?;
        if rec.status != Running {
            return Err(Error::BadRequest(format!(
                "Machine must be running to check its network (it is '{}')",
                rec.status
            )));
        }
        let table = self.net.firewall.current().await.ok().flatten();
        let mut checks = self.net.checks(&rec, table.as_deref()).await;
        checks.insert(0, crate::doctor::ip_forward_check().await);
        checks.insert(1, crate::doctor::route_check(self.net.has_unreachable_route().await, &self.net.subnet));
        Ok(NetworkReport { machine_id: rec.id, ok: checks.iter().all(|c| c.ok), checks })
    }

    /// Watches the machine's process; if it ends while the machine is meant to run, the machine becomes
    /// `failed` with the last console lines, and its host resources are released.
    fn monitor(self: &Arc<Self>, id: String, pid: u32) {
        let this = self.clone();
        tokio::spawn(async move {
            process::exited(pid).await;
            let Ok(rec) = this.record(&id).await else {
                return;
            };
            if rec.pid != Some(pid) || !matches!(rec.status, Running | Paused) {
                return; // stopped on purpose, or restarted with another process
            }
            let files = this.files(&id);
            let last = process::tail(&files.console_log, 5).join(" | ");
            let what = match rec.runtime {
                RuntimeKind::Firecracker => "firecracker",
                RuntimeKind::Container => "the container's init",
            };
            let msg = format!("{what} (pid {pid}) exited unexpectedly; last console lines: {last}");
            let changes = Changes { error_message: Some(Some(msg.clone())), ..Changes::process_gone() };
            if let Ok(failed) = this.transition(&id, "fail", &[Running, Paused], Failed, changes).await {
                warn!(machine = %id, "{msg}");
                this.release_host(&MachineRecord { pid: None, ..failed.clone() }, &files).await;
                this.firewall_forget(&failed).await;
            }
        });
    }

    /// Brings the host in line with the database after a daemon (re)start: live processes are adopted, dead
    /// ones' leftovers removed, interrupted flows finished, stray interfaces and namespaces deleted, the
    /// firewall rebuilt and orphaned leases freed.
    pub async fn reconcile(self: &Arc<Self>) -> Result<()> {
        let active = self.store.call(|c| records::with_status(c, &ACTIVE)).await?;
        let mut live = HashSet::new();
        for rec in active {
            let files = self.files(&rec.id);
            let pid = self.runtimes.live_pid(&rec, &files).await;
            match (rec.status, pid) {
                (Running | Paused, Some(pid)) => {
                    info!(machine = %rec.id, pid, "adopted running machine");
                    if rec.pid != Some(pid) {
                        let ch = Changes { pid: Some(Some(pid)), ..Default::default() };
                        let _ = self.transition(&rec.id, "adopt", &[Running, Paused], rec.status, ch).await;
                    }
                    live.insert(rec.id.clone());
                    self.monitor(rec.id.clone(), pid);
                }
                (status, pid) => {
                    // Dead while running, or a start/stop the daemon did not finish.
                    let m = MachineRecord { pid, ..rec.clone() };
                    self.runtimes.stop(&m, &files).await;
                    let _ = self.net.detach(&m).await;
                    let (to, msg) = match status {
                        Starting => (Failed, Some("the daemon stopped while the machine was starting".to_string())),
                        _ => (Stopped, None),
                    };
                    info!(machine = %rec.id, from = %status, to = %to, "cleaned up a machine whose process is gone");
                    let changes = Changes { error_message: msg.map(Some), ..Changes::process_gone() };
                    let _ = self.transition(&rec.id, "reconcile", &ACTIVE, to, changes).await;
                }
            }
        }
        for name in self.net.remove_stray_links(&live).await? {
            info!(interface = %name, "removed a stray interface");
        }
        self.remove_stray_machine_state(&live).await?;
        self.refresh_firewall().await?;
        let freed = self.store.call(crate::store::leases::free_orphans).await?;
        if freed > 0 {
            info!(count = freed, "freed leases of machines that no longer exist");
        }
        Ok(())
    }

    /// Stops every machine and removes everything Hyperfleet made on the host: interfaces, namespaces,
    /// containers, mounts, the firewall table and the subnet route. Records, disks and leases stay, so the
    /// machines can be started again. Returns the ids of the machines it stopped.
    pub async fn purge_host(self: &Arc<Self>) -> Result<Vec<String>> {
        let active = self.store.call(|c| records::with_status(c, &ACTIVE)).await?;
        let mut stopped = Vec::new();
        for rec in active {
            let files = self.files(&rec.id);
            let pid = self.runtimes.live_pid(&rec, &files).await;
            let m = MachineRecord { pid, ..rec.clone() };
            self.runtimes.stop(&m, &files).await;
            let _ = self.net.detach(&m).await;
            let _ = self.transition(&rec.id, "stop", &ACTIVE, Stopped, Changes::process_gone()).await;
            stopped.push(rec.id);
        }
        self.net.remove_stray_links(&HashSet::new()).await?;
        self.remove_stray_machine_state(&HashSet::new()).await?;
        self.net.firewall.remove().await?;
        self.net.remove_route().await?;
        Ok(stopped)
    }

    /// Namespaces, containers and data directories of machines that are not running (or no longer exist).
    async fn remove_stray_machine_state(&self, live: &HashSet<String>) -> Result<()> {
        let known: HashSet<String> =
            self.store.call(|c| Ok(records::list(c, None, u32::MAX, 0)?.0.into_iter().map(|m| m.id).collect())).await?;
        let on_disk: Vec<String> = std::fs::read_dir(&self.settings.runtime.data_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        for id in known.iter().chain(on_disk.iter()) {
            if live.contains(id) {
                continue;
            }
            let files = self.files(id);
            let ns = crate::runtime::container::netns_name(id);
            if hyperfleet_net::netns::exists(&ns).await || files.bundle.join("rootfs").exists() {
                crate::runtime::Container::unmount_root(&files).await;
                let _ = hyperfleet_net::netns::delete(&ns).await;
            }
            crate::runtime::Firecracker::remove_sockets(&files);
            if !known.contains(id) {
                info!(dir = %files.dir.display(), "removed the data of a machine that no longer exists");
                let _ = tokio::fs::remove_dir_all(&files.dir).await;
            }
        }
        Ok(())
    }
}
