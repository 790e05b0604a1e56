//! Create, read and update machines, and the flows that change what runs: start, stop, pause, resume,
//! restart, delete. Every state change is a compare-and-set in the store, so two requests for one machine
//! never both act; every flow runs in a task of its own, so a client that hangs up cannot leave it half done.
//! A start records each host change as it makes it and, if a later step fails, undoes them in reverse.

use std::sync::Arc;
use std::time::Duration;

use hyperfleet_types::{
    CreateMachine, EventKind, Machine, MachineList, MachineLogs, MachineSpec, MachineStatus, UpdateMachine,
};
use tracing::{info, warn};

use super::selector::Selector;
use super::{Action, Error, Host, Result, Service, events, validate};
use crate::metrics::Operation;
use crate::runtime::{Booted, Instance};
use crate::store::leases::LeaseError;
use crate::store::machines::{self as records, Cas, Changes, InsertError, MachineRecord, Modify};

use MachineStatus::*;

/// Statuses in which a machine has (or is getting, or is losing) a process and a host interface.
pub(super) const ACTIVE: [MachineStatus; 4] = [Starting, Running, Paused, Stopping];

/// A host change made by a start, undone in reverse order when a later step fails.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// Disk copied; a container's root mounted and its namespace made.
    Prepared,
    /// Host interface created.
    Attached,
    /// Firewall entries added.
    Filtered,
    /// The machine's process runs.
    Booted(u32),
}

/// Runs a flow in a task of its own: a client that hangs up drops this future, not the flow.
async fn detached<T: Send + 'static>(
    what: &'static str,
    flow: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(flow).await.map_err(|e| Error::Task { what, message: e.to_string() })?
}

/// A PATCH applied to the stored spec of a machine in `status`: each field validated, volumes only at rest.
fn apply_update(
    spec: &mut MachineSpec,
    status: MachineStatus,
    req: &UpdateMachine,
    ports: Option<Vec<u16>>,
    volumes: Option<Vec<hyperfleet_types::VolumeMount>>,
) -> Result<()> {
    if let Some(v) = volumes {
        if !MachineStatus::AT_REST.contains(&status) {
            return Err(Error::InvalidState { action: Action::ChangeVolumes, status });
        }
        spec.volumes = v;
    }
    if let Some(p) = ports {
        spec.exposed_ports = p;
    }
    if let Some(env) = &req.env {
        validate::env("env", env).map_err(Error::Invalid)?;
        spec.env = env.clone();
    }
    if let Some(secrets) = &req.secrets {
        spec.secret_names = validate::secrets(secrets, &spec.env).map_err(Error::Invalid)?;
    } else if let Some(both) = spec.secret_names.iter().find(|k| spec.env.contains_key(*k)) {
        return Err(Error::Invalid(format!("env.{both} is also a secret; set it in one of them")));
    }
    if let Some(labels) = &req.labels {
        validate::labels("labels", labels).map_err(Error::Invalid)?;
        spec.labels = labels.clone();
    }
    if req.ttl_seconds.is_some() {
        spec.ttl_seconds = validate::timer("ttl_seconds", req.ttl_seconds).map_err(Error::Invalid)?;
    }
    if let Some(a) = req.on_ttl {
        spec.on_ttl = a;
    }
    if req.idle_timeout_seconds.is_some() {
        spec.idle_timeout_seconds =
            validate::timer("idle_timeout_seconds", req.idle_timeout_seconds).map_err(Error::Invalid)?;
    }
    if req.idle_max_connection_seconds.is_some() {
        spec.idle_max_connection_seconds =
            validate::timer("idle_max_connection_seconds", req.idle_max_connection_seconds).map_err(Error::Invalid)?;
    }
    if let Some(a) = req.auto_start {
        spec.auto_start = a;
    }
    Ok(())
}

pub(super) fn instance(m: &MachineRecord) -> Instance {
    Instance { id: m.id.clone(), runtime: m.spec.runtime, pid: m.pid }
}

impl<H: Host> Service<H> {
    /// The node that owns machine `id` (by id or name); `None` if there is no such machine.
    pub(crate) async fn owner_of(&self, id: &str) -> Result<Option<String>> {
        Ok(records::get(&mut *self.store.read().await?, id).await?.map(|m| m.node))
    }

    pub(super) async fn record(&self, id: &str) -> Result<MachineRecord> {
        let key = id.to_string();
        records::get(&mut *self.store.read().await?, &key).await?.ok_or_else(|| Error::NotFound(id.to_string()))
    }

    /// Compare-and-set on the status (from the statuses `action` allows); publishes the change.
    pub(super) async fn transition(
        &self,
        id: &str,
        action: Action,
        to: MachineStatus,
        changes: Changes,
    ) -> Result<MachineRecord> {
        // The transition table of MachineStatus decides; staying in the same state (adoption) is always allowed.
        let from: Vec<MachineStatus> =
            action.from(to).iter().copied().filter(|f| *f == to || f.can_become(to)).collect();
        debug_assert_eq!(from.len(), action.from(to).len(), "the state table forbids {action} -> {to}");
        let key = id.to_string();
        let events = self.events.clone();
        let mut tx = self.store.write().await?;
        // A node acts only on the machines it owns (the API forwards the rest to their owner). Alone, it
        // owns them all: no read needed.
        if !self.nodes.alone()
            && let Some(owner) = records::get(&mut tx, &key).await?.map(|m| m.node).filter(|n| n != self.node())
        {
            return Err(Error::Conflict(format!("Machine {id} is owned by node '{owner}'; only that node acts on it")));
        }
        let cas = records::transition(&mut tx, &key, &from, to, &changes).await?;
        if let Cas::Done(m) = &cas {
            events.append_for(&mut tx, events::draft(EventKind::of_status(m.status), m), &m.spec.labels).await;
            tx.commit().await?;
        }
        match cas {
            Cas::Done(m) => Ok(m),
            Cas::WrongState(m) => Err(Error::InvalidState { action, status: m.status }),
            Cas::Missing => Err(Error::NotFound(id.to_string())),
            Cas::VolumeBusy(why) => Err(Error::Conflict(why)),
        }
    }

    /// Like [`Self::transition`] for a flow that must not stop on a failure: logs it and goes on.
    pub(super) async fn transition_logged(&self, id: &str, action: Action, to: MachineStatus, changes: Changes) {
        if let Err(e) = self.transition(id, action, to, changes).await {
            warn!(machine = %id, %action, to = %to, error = %e, "could not record the machine's new state");
        }
    }

    /// `Ok` if placement chose this node; else the error that sends the create to the chosen node (the API
    /// forwards it there, pinned) or says why no node can take it.
    fn placed_here(&self, chosen: std::result::Result<String, crate::nodes::NoRoom>) -> Result<()> {
        match chosen {
            Ok(n) if n == self.node() => Ok(()),
            Ok(node) => Err(Error::PlacedElsewhere { node }),
            Err(e @ crate::nodes::NoRoom::UnknownNode(_)) => Err(Error::Invalid(e.to_string())),
            Err(e) => Err(Error::Conflict(e.to_string())),
        }
    }

    pub(crate) async fn create(self: &Arc<Self>, req: CreateMachine) -> Result<Machine> {
        self.create_as(req, None).await
    }

    /// Creates a machine; a child (`parent` set) is inserted within its parent's quotas.
    pub(super) async fn create_as(self: &Arc<Self>, req: CreateMachine, parent: Option<String>) -> Result<Machine> {
        if parent.is_none() && req.inherit_env.is_some() {
            return Err(Error::Invalid(
                "inherit_env applies to child machines (created with a machine's token)".into(),
            ));
        }
        if req.spawn.is_some() && self.policy.child_api_port.is_none() {
            return Err(Error::Invalid("spawn needs the child API, which is off (HYPERFLEET_CHILD_API_PORT=0)".into()));
        }
        let policy = self.policy.clone();
        let auth = req.registry_auth.clone();
        let checked = req.clone();
        let spec = tokio::task::spawn_blocking(move || validate::create(&checked, &policy))
            .await
            .map_err(|e| Error::Task { what: "validate", message: e.to_string() })?
            .map_err(Error::Invalid)?;
        let mut spec = spec;
        // A child runs beside its parent; any other machine goes where placement says. Decided here from
        // what this node reads (so a machine for another node is forwarded before anything is resolved),
        // and decided again, finally, in the insert's write transaction.
        let selector = req.node_selector.clone().unwrap_or_default();
        let demand = crate::nodes::Demand {
            vcpus: spec.vcpu_count,
            mem_mib: u64::from(spec.mem_size_mib),
            runtime: req.runtime,
            pin: req.node.as_deref(),
            selector: &selector,
            local: self.node(),
        };
        if parent.is_none() {
            let chosen = self.nodes.place(&mut *self.store.read().await?, &demand).await?;
            self.placed_here(chosen)?;
        }
        spec.parent_id = parent;
        spec.volumes = self.resolve_volumes(spec.volumes).await?;
        if let Some(why) = self.host.unavailable(spec.runtime) {
            return Err(Error::RuntimeUnavailable { runtime: spec.runtime, why });
        }
        let creds = self.resolve_image(&mut spec, auth.as_ref()).await?;
        let blocks = self.addressing.subnet.block_count();
        let id = crate::store::random_id();
        let secrets = req.secrets.unwrap_or_default();
        let events = self.events.clone();
        let mut tx = self.store.write().await?;
        let node = self.node().to_string();
        let mut inserted = if spec.parent_id.is_some() {
            match crate::store::children::insert_child(&mut tx, &node, &id, &spec, blocks).await {
                Ok(rec) => Ok(rec),
                Err(e) => Err(super::children::child_insert_error(e)?),
            }
        } else {
            // Under the write lock: no other node's create can land between this check and the insert.
            let chosen = self.nodes.place(&mut tx, &demand).await?;
            self.placed_here(chosen)?;
            records::insert(&mut tx, &node, &id, &spec, blocks).await
        };
        if let Ok(rec) = &inserted
            && !secrets.is_empty()
            && let Err(e) = records::set_secrets(&mut tx, &rec.id, &secrets).await
        {
            inserted = Err(e.into());
        }
        if let Ok(m) = &inserted {
            events.append_for(&mut tx, events::draft(EventKind::Created, m), &m.spec.labels).await;
            tx.commit().await?;
        } else {
            drop(tx);
        }
        let rec = inserted.map_err(|e| match e {
            InsertError::NameTaken(n) => Error::NameTaken(n),
            InsertError::Lease(LeaseError::Exhausted(blocks)) => {
                Error::PoolExhausted { subnet: self.addressing.subnet.to_string(), blocks }
            }
            InsertError::Lease(LeaseError::Store(e)) | InsertError::Store(e) => Error::Store(e),
        })?;
        info!(machine = %rec.id, name = %rec.spec.name, runtime = %rec.spec.runtime, tap = %self.addressing.iface(&rec), "machine created");
        self.pull_in_background(&rec, creds);
        Ok(self.to_wire(&rec))
    }

    pub(crate) async fn get(&self, id: &str) -> Result<Machine> {
        let rec = self.record(id).await?;
        if rec.node != self.node() {
            // Another node's machine, answered here because its node is down: its status read now.
            self.nodes.refresh().await?;
        }
        Ok(self.to_wire(&rec))
    }

    pub(crate) async fn list(
        &self,
        status: Option<MachineStatus>,
        labels: &Selector,
        limit: u32,
        offset: u64,
    ) -> Result<MachineList> {
        if labels.is_empty() {
            let (rows, total) = records::list(&mut *self.store.read().await?, status, limit, offset).await?;
            return Ok(MachineList { machines: rows.iter().map(|m| self.to_wire(m)).collect(), total });
        }
        // Labels live in the spec's JSON: filter here, then page. A host runs at most a few thousand machines.
        let (rows, _) = records::list(&mut *self.store.read().await?, status, u32::MAX, 0).await?;
        let matching: Vec<&MachineRecord> = rows.iter().filter(|m| labels.matches(&m.spec.labels)).collect();
        let total = matching.len() as u64;
        let machines = matching
            .into_iter()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .map(|m| self.to_wire(m))
            .collect();
        Ok(MachineList { machines, total })
    }

    /// Every machine in one of `statuses`.
    pub(crate) async fn with_status(&self, statuses: &'static [MachineStatus]) -> Result<Vec<Machine>> {
        let rows = records::with_status(&mut *self.store.read().await?, self.node(), statuses).await?;
        Ok(rows.iter().map(|m| self.to_wire(m)).collect())
    }

    pub(crate) async fn update(&self, id: &str, req: UpdateMachine) -> Result<Machine> {
        let rec = self.record(id).await?;
        let ports = match &req.exposed_ports {
            Some(p) => Some(validate::ports("exposed_ports", p).map_err(Error::Invalid)?),
            None => None,
        };
        let volumes = match req.volumes.clone() {
            Some(v) => {
                validate::volumes(&v).map_err(Error::Invalid)?;
                Some(self.resolve_volumes(v).await?)
            }
            None => None,
        };
        let ttl_changed = req.ttl_seconds.is_some();
        let idle_changed = req.idle_timeout_seconds.is_some();
        let rid = rec.id.clone();
        // Read, checked and written in one transaction: a start in between cannot take the old volumes, and
        // two PATCHes of different fields cannot undo each other.
        let mut tx = self.store.write().await?;
        let modified =
            records::modify_spec(&mut tx, &rid, |spec, status| apply_update(spec, status, &req, ports, volumes))
                .await?;
        if let Modify::Done(m) = &modified {
            if let Some(secrets) = &req.secrets {
                records::set_secrets(&mut tx, &rid, secrets).await?;
            }
            self.events.append_for(&mut tx, events::draft(EventKind::Updated, m), &m.spec.labels).await;
            tx.commit().await?;
        }
        let mut updated = match modified {
            Modify::Done(m) => *m,
            Modify::Missing => return Err(Error::NotFound(id.to_string())),
            Modify::Refused(e) => return Err(e),
        };
        if (ttl_changed || idle_changed) && matches!(updated.status, Running | Paused) {
            // A new ttl counts from now; a new idle timeout keeps the idle clock (or starts it now).
            let now = hyperfleet_types::timestamp::now();
            let expires_at = match updated.spec.ttl_seconds {
                Some(t) if ttl_changed => Some(now + Duration::from_secs(t)),
                Some(_) => updated.expires_at,
                None => None,
            };
            let idle_since = updated.spec.idle_timeout_seconds.map(|_| updated.idle_since.unwrap_or(now));
            updated = self.set_deadlines(&updated.id, expires_at, idle_since).await?.unwrap_or(updated);
        }
        self.recheck(&updated.id);
        Ok(self.to_wire(&updated))
    }

    async fn set_deadlines(
        &self,
        id: &str,
        expires_at: Option<time::OffsetDateTime>,
        idle_since: Option<time::OffsetDateTime>,
    ) -> Result<Option<MachineRecord>> {
        let mut tx = self.store.write().await?;
        let set = records::set_deadlines(&mut tx, id, &[Running, Paused], expires_at, idle_since).await?;
        tx.commit().await?;
        Ok(set)
    }

    /// `POST /machines/{id}/keepalive`: activity now, and a machine with `ttl_seconds` expires that long
    /// from now (never sooner than it would have).
    pub(crate) async fn keepalive(&self, id: &str) -> Result<Machine> {
        let rec = self.record(id).await?;
        if !matches!(rec.status, Running | Paused) {
            return Err(Error::NotRunning { what: "keep it alive", status: rec.status });
        }
        self.activity.note(&rec.id);
        let now = hyperfleet_types::timestamp::now();
        let expires_at = rec.spec.ttl_seconds.map(|t| {
            let extended = now + Duration::from_secs(t);
            rec.expires_at.map_or(extended, |e| e.max(extended))
        });
        let idle_since = rec.spec.idle_timeout_seconds.map(|_| now);
        let updated = self.set_deadlines(&rec.id, expires_at, idle_since).await?.unwrap_or(rec);
        self.emit(events::draft(EventKind::Updated, &updated)).await;
        self.recheck(&updated.id);
        Ok(self.to_wire(&updated))
    }

    /// A machine's secrets, for a command's environment.
    pub(super) async fn secrets(&self, id: &str) -> Result<std::collections::BTreeMap<String, String>> {
        Ok(records::secrets(&mut *self.store.read().await?, id).await?)
    }

    /// Rebuilds the firewall from the machines that currently have a host interface.
    pub(super) async fn firewall_rebuild(&self) -> Result<()> {
        let _order = self.firewall_order.lock().await;
        let active = records::with_status(&mut *self.store.read().await?, self.node(), &ACTIVE).await?;
        self.host.firewall_rebuild(&active).await
    }

    /// Adds (`true`) or removes one machine's firewall entries. The fast path edits set elements; if that
    /// fails (table missing, entries not as expected after a crash) the table is rebuilt from the database,
    /// which is always right. Removal is called once the machine's new status is stored, so a rebuild leaves
    /// it out.
    pub(super) async fn firewall_change(&self, m: &MachineRecord, add: bool) -> Result<()> {
        let _order = self.firewall_order.lock().await;
        if let Err(e) = self.host.firewall_edit(m, add).await {
            tracing::debug!(machine = %m.id, error = %e, "incremental firewall update failed; rebuilding the table");
            let active = records::with_status(&mut *self.store.read().await?, self.node(), &ACTIVE).await?;
            self.host.firewall_rebuild(&active).await?;
        }
        Ok(())
    }

    /// Stops the machine's process (if any) and removes its host interface. Idempotent; failures are logged
    /// (reconcile retries what is left). The caller updates the firewall once the new status is stored.
    pub(super) async fn release_host(&self, m: &MachineRecord) {
        self.host.stop(&instance(m)).await;
        if let Err(e) = self.host.detach(m).await {
            warn!(machine = %m.id, error = %e, "could not remove the host interface");
        }
    }

    /// Starts a machine: pending|stopped|failed → starting → running, or failed with everything undone.
    pub(crate) async fn start(self: &Arc<Self>, id: &str) -> Result<Machine> {
        let rec = self.record(id).await?;
        if Action::Start.allowed_in(rec.status) {
            self.image_ready(&rec).await?;
        }
        let started = std::time::Instant::now();
        let done = detached("start", self.clone().start_flow(rec)).await;
        self.metrics.operation(Operation::Start, done.is_ok(), started.elapsed());
        done
    }

    async fn start_flow(self: Arc<Self>, rec: MachineRecord) -> Result<Machine> {
        let mut took = crate::runtime::StepTimes::new();
        let rec = if rec.spec.volumes.is_empty() {
            self.transition(&rec.id, Action::Start, Starting, Changes::default()).await?
        } else {
            // Volume resizes and clones hold this lock while they work on a detached volume.
            let _volumes = self.volume_ops.lock().await;
            self.transition(&rec.id, Action::Start, Starting, Changes::default()).await?
        };
        took.lap("claim");
        let mut done = Vec::new();
        match self.start_steps(&rec, &mut done, &mut took).await {
            Ok(booted) => {
                let now = hyperfleet_types::timestamp::now();
                let changes = Changes {
                    pid: Some(Some(booted.pid)),
                    socket_path: Some(booted.socket_path.clone()),
                    error_message: None,
                    expires_at: Some(rec.spec.ttl_seconds.map(|t| now + Duration::from_secs(t))),
                    idle_since: Some(rec.spec.idle_timeout_seconds.map(|_| now)),
                };
                match self.transition(&rec.id, Action::Start, Running, changes).await {
                    Ok(running) => {
                        took.lap("record");
                        info!(machine = %rec.id, pid = booted.pid, took = %took, "machine running");
                        self.monitor(running.id.clone(), booted.pid);
                        self.issue_token(&running).await;
                        self.activity.reset(&running.id);
                        self.recheck(&running.id);
                        Ok(self.to_wire(&running))
                    }
                    // Deleted or changed under us (only reconcile touches a starting machine): undo.
                    Err(e) => Err(self.undo_start(&rec, done, e).await),
                }
            }
            Err(e) => Err(self.undo_start(&rec, done, e).await),
        }
    }

    /// The host side of a start, each step recorded in `done` once it has changed the host.
    async fn start_steps(
        &self,
        rec: &MachineRecord,
        done: &mut Vec<Step>,
        took: &mut crate::runtime::StepTimes,
    ) -> Result<Booted> {
        let netns = self.host.prepare(rec).await?;
        done.push(Step::Prepared);
        took.lap("prepare");
        self.host.attach(rec, netns.as_deref()).await?;
        done.push(Step::Attached);
        took.lap("attach");
        self.firewall_change(rec, true).await?;
        done.push(Step::Filtered);
        took.lap("firewall");
        let booted = self.host.boot(rec, netns.as_deref()).await?;
        done.push(Step::Booted(booted.pid));
        took.lap("boot");
        Ok(booted)
    }

    /// Records `to` for a flow whose host side is done but whose last write found the database unavailable
    /// (down, restarting): retried in the background with backoff until it lands or the machine has moved on,
    /// so that after an outage no machine stays `starting` or `stopping` with nothing behind it on the host.
    fn settle_later(self: &Arc<Self>, id: &str, action: Action, to: MachineStatus, changes: Changes) {
        let (service, id) = (self.clone(), id.to_string());
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(250);
            loop {
                tokio::time::sleep(delay).await;
                match service.transition(&id, action, to, changes.clone()).await {
                    Err(Error::Store(e)) if e.is_unavailable() => delay = (delay * 2).min(Duration::from_secs(5)),
                    Ok(_) => {
                        info!(machine = %id, status = %to, "recorded after the database came back");
                        return;
                    }
                    // Deleted or changed by someone else meanwhile: nothing left to settle.
                    Err(e) => {
                        warn!(machine = %id, error = %e, "gave up recording {to} after the database came back");
                        return;
                    }
                }
            }
        });
    }

    /// Undoes a failed start in reverse order, marks the machine failed with the cause, and returns the
    /// error to answer with (the cause, plus every undo step that failed).
    async fn undo_start(self: &Arc<Self>, rec: &MachineRecord, done: Vec<Step>, cause: Error) -> Error {
        warn!(machine = %rec.id, error = %cause, "start failed; undoing");
        let mut failures = Vec::new();
        let mut firewall_pending = false;
        for step in done.into_iter().rev() {
            match step {
                Step::Booted(pid) => self.host.stop(&Instance { pid: Some(pid), ..instance(rec) }).await,
                // Removed after the status change below, so that a rebuild leaves the machine out.
                Step::Filtered => firewall_pending = true,
                Step::Attached => {
                    if let Err(e) = self.host.detach(rec).await {
                        failures.push(format!("remove the host interface: {e}"));
                    }
                }
                Step::Prepared => self.host.stop(&Instance { pid: None, ..instance(rec) }).await,
            }
        }
        let failed = Changes::failed(cause.to_string());
        match self.transition(&rec.id, Action::Start, Failed, failed.clone()).await {
            Err(Error::Store(e)) if e.is_unavailable() => self.settle_later(&rec.id, Action::Start, Failed, failed),
            Err(e) => failures.push(format!("record the failure: {e}")),
            Ok(_) => {}
        }
        if firewall_pending && let Err(e) = self.firewall_change(rec, false).await {
            failures.push(format!("remove the firewall entries: {e}"));
        }
        for f in &failures {
            warn!(machine = %rec.id, "undoing the start: could not {f}");
        }
        if failures.is_empty() { cause } else { Error::UndoFailed { cause: Box::new(cause), undo: failures } }
    }

    /// Stops a machine: running|paused → stopping → stopped.
    pub(crate) async fn stop(self: &Arc<Self>, id: &str) -> Result<Machine> {
        let rec = self.record(id).await?;
        let started = std::time::Instant::now();
        let done = detached("stop", self.clone().stop_flow(rec)).await;
        self.metrics.operation(Operation::Stop, done.is_ok(), started.elapsed());
        done
    }

    async fn stop_flow(self: Arc<Self>, rec: MachineRecord) -> Result<Machine> {
        let rec = self.transition(&rec.id, Action::Stop, Stopping, Changes::default()).await?;
        self.release_host(&rec).await;
        let stopped = match self.transition(&rec.id, Action::Stop, Stopped, Changes::process_gone()).await {
            Err(Error::Store(e)) if e.is_unavailable() => {
                self.settle_later(&rec.id, Action::Stop, Stopped, Changes::process_gone());
                return Err(Error::Store(e));
            }
            done => done?,
        };
        self.parent_ended(&stopped);
        self.activity.reset(&rec.id);
        if let Err(e) = self.firewall_change(&rec, false).await {
            warn!(machine = %rec.id, error = %e, "could not remove the machine from the firewall");
        }
        info!(machine = %rec.id, "machine stopped");
        Ok(self.to_wire(&stopped))
    }

    /// Suspends the machine's vCPUs (firecracker) or freezes its processes (container): running → paused.
    pub(crate) async fn pause(&self, id: &str) -> Result<Machine> {
        self.suspend_or_resume(id, Action::Pause).await
    }

    /// paused → running.
    pub(crate) async fn resume(&self, id: &str) -> Result<Machine> {
        self.suspend_or_resume(id, Action::Resume).await
    }

    async fn suspend_or_resume(&self, id: &str, action: Action) -> Result<Machine> {
        let rec = self.record(id).await?;
        let (pause, to, back) = match action {
            Action::Pause => (true, Paused, Running),
            _ => (false, Running, Paused),
        };
        // The state changes first, so two requests cannot both act; a refusal by the runtime puts it back.
        // A resumed machine's idle clock starts again.
        let changes = match (action, rec.spec.idle_timeout_seconds) {
            (Action::Resume, Some(_)) => {
                Changes { idle_since: Some(Some(hyperfleet_types::timestamp::now())), ..Changes::default() }
            }
            _ => Changes::default(),
        };
        let changed = self.transition(&rec.id, action, to, changes).await?;
        if let Err(e) = self.host.set_paused(&instance(&changed), pause).await {
            let undo = if pause { Action::Resume } else { Action::Pause };
            self.transition_logged(&rec.id, undo, back, Changes::default()).await;
            return Err(e);
        }
        info!(machine = %rec.id, "machine {action}d");
        self.recheck(&rec.id);
        Ok(self.to_wire(&changed))
    }

    pub(crate) async fn restart(self: &Arc<Self>, id: &str) -> Result<Machine> {
        let rec = self.record(id).await?;
        if !Action::Restart.allowed_in(rec.status) {
            return Err(Error::InvalidState { action: Action::Restart, status: rec.status });
        }
        self.stop(&rec.id).await?;
        self.start(&rec.id).await
    }

    /// Deletes a machine at rest (or, with `force`, stops it first), its disk, logs and lease.
    pub(crate) async fn delete(self: &Arc<Self>, id: &str, force: bool) -> Result<()> {
        let rec = self.record(id).await?;
        if force && Action::Stop.allowed_in(rec.status) {
            match self.stop(&rec.id).await {
                Ok(_) | Err(Error::InvalidState { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        // At rest (or refused below), the parent takes no new children: its children go first.
        if rec.spec.spawn.is_some() && (force || MachineStatus::AT_REST.contains(&rec.status)) {
            self.delete_children(&rec.id).await?;
        }
        let rid = rec.id.clone();
        let events = self.events.clone();
        let mut tx = self.store.write().await?;
        let deleted = records::delete(&mut tx, &rid, &MachineStatus::AT_REST).await?;
        if let Cas::Done(m) = &deleted {
            events.append_for(&mut tx, events::draft(EventKind::Deleted, m), &m.spec.labels).await;
            tx.commit().await?;
        }
        match deleted {
            Cas::Done(m) => {
                // Defensive: a machine at rest has no process, interface or firewall entries; a start the
                // daemon did not finish is cleaned by reconcile.
                self.release_host(&m).await;
                if let Err(e) = self.host.destroy(&instance(&m)).await {
                    warn!(machine = %m.id, error = %e, "could not remove the machine's files");
                }
                self.ports.forget(&m.id);
                self.images.forget_machine(&m.id);
                self.activity.reset(&m.id);
                self.cpu_readings.forget(&m.id);
                info!(machine = %m.id, "machine deleted");
                Ok(())
            }
            Cas::WrongState(m) => Err(Error::InvalidState { action: Action::Delete, status: m.status }),
            Cas::Missing => Err(Error::NotFound(id.to_string())),
            Cas::VolumeBusy(why) => Err(Error::Conflict(why)),
        }
    }

    pub(crate) async fn logs(&self, id: &str, lines: usize) -> Result<MachineLogs> {
        let rec = self.record(id).await?;
        let lines = self.host.console_tail(&rec.id, lines).await;
        Ok(MachineLogs { machine_id: rec.id, lines })
    }
}
