//! Machine events: every change (created, each status, updated, deleted) and what happens inside a machine
//! (exec started/finished, file written, proxy wake). Each is stored in the events backlog in the transaction
//! of the change it reports, and broadcast when that commits, in commit order. Listeners: long-polls
//! (`wait`), the proxy's target cache, and `GET /events`, which resumes from the stored backlog with
//! `Last-Event-ID`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hyperfleet_types::{Event, EventKind, Machine, MachineStatus};
use tokio::sync::{Notify, broadcast};

use super::{Error, Host, Result, Service};
use crate::store::events as stored;
pub(crate) use crate::store::events::{EventFilter, EventPage};
use crate::store::machines::MachineRecord;
use crate::store::{Conn, StoreResult, Write, machines as records};

/// The most stored events one backlog read looks at; a resuming reader reads again for more.
const BACKLOG_PAGE: u32 = 500;

#[derive(Clone)]
pub(super) struct Events {
    tx: broadcast::Sender<Arc<Event>>,
    /// How many stored events to keep.
    keep: u64,
    /// Told when deliveries were queued (the webhook worker waits on it).
    pub(super) deliveries: Arc<Notify>,
}

/// An event about `m`, not stored yet (its id is 0).
pub(super) fn draft(kind: EventKind, m: &MachineRecord) -> Event {
    Event {
        id: 0,
        kind,
        machine_id: m.id.clone(),
        machine_name: m.spec.name.clone(),
        status: (kind != EventKind::Deleted).then_some(m.status),
        at: hyperfleet_types::timestamp::now(),
        reason: if kind == EventKind::Failed { m.error_message.clone() } else { None },
        program: None,
        exit_code: None,
        duration_ms: None,
        path: None,
        port: None,
    }
}

impl Events {
    pub(super) fn new(keep: u64) -> Self {
        Self { tx: broadcast::channel(1024).0, keep: keep.max(1), deliveries: Arc::new(Notify::new()) }
    }

    /// [`Self::append_for`] with the labels the machine has in the store (none once it is deleted).
    pub(super) async fn append(&self, tx: &mut Write, event: Event) {
        let labels = match records::get(tx, &event.machine_id).await {
            Ok(m) => m.map(|m| m.spec.labels).unwrap_or_default(),
            Err(e) => {
                tracing::warn!(machine = %event.machine_id, error = %e, "could not read a machine's labels");
                BTreeMap::new()
            }
        };
        self.append_for(tx, event, &labels).await;
    }

    /// Stores `event`, with a delivery for each webhook it matches (the machine has `labels`), in the write
    /// transaction `tx` (in a savepoint of it), and broadcasts it once `tx` commits: so the order of ids is
    /// the order of broadcast, and a listener that reads the machine on an event sees the change. A failure
    /// to store is logged: the change it reports happens regardless.
    pub(super) async fn append_for(&self, tx: &mut Write, event: Event, labels: &BTreeMap<String, String>) {
        let stored = match tx.savepoint().await {
            Ok(mut sp) => match self.store(&mut sp, &event, labels).await {
                Ok(done) => sp.commit().await.map(|()| done).map_err(Into::into),
                Err(e) => {
                    let _ = sp.rollback().await;
                    Err(e)
                }
            },
            Err(e) => Err(e),
        };
        match stored {
            Ok((e, queued)) => {
                let (tx_events, deliveries) = (self.tx.clone(), self.deliveries.clone());
                tx.after_commit(move || {
                    if queued > 0 {
                        deliveries.notify_one();
                    }
                    // Sending fails only when nobody listens, which is the normal case between requests.
                    if tx_events.receiver_count() > 0 {
                        let _ignored_when_no_listener = tx_events.send(Arc::new(e));
                    }
                });
            }
            Err(e) => {
                tracing::warn!(machine = %event.machine_id, kind = %event.kind, error = %e, "could not store an event")
            }
        }
    }

    async fn store(
        &self,
        c: &mut Conn,
        event: &Event,
        labels: &BTreeMap<String, String>,
    ) -> StoreResult<(Event, usize)> {
        let e = stored::append(c, event, self.keep).await?;
        let queued = super::webhooks::enqueue_matching(c, &e, labels).await?;
        Ok((e, queued))
    }

    pub(super) fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }
}

impl<H: Host> Service<H> {
    /// Every event as it happens, for long-polls, the proxy's cache and `GET /events`.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    /// Stores and broadcasts an event that is not a state change (those go with their compare-and-set).
    pub(super) async fn emit(&self, event: Event) {
        let stored = async {
            let mut tx = self.store.write().await?;
            self.events.append(&mut tx, event).await;
            tx.commit().await
        };
        if let Err(e) = stored.await {
            tracing::warn!(error = %e, "could not store an event");
        }
    }

    /// Stored events after `after` that pass `filter`, oldest first, looking at [`BACKLOG_PAGE`] at most.
    pub(crate) async fn events_after(&self, after: u64, filter: EventFilter) -> Result<EventPage> {
        Ok(stored::after(&mut *self.store.read().await?, after, &filter, BACKLOG_PAGE).await?)
    }

    /// The id of the newest stored event.
    pub(crate) async fn last_event_id(&self) -> Result<u64> {
        Ok(stored::last_id(&mut *self.store.read().await?).await?)
    }

    /// A proxied request for `port` woke machine `id` (started or resumed it): a `proxy.wake` event.
    pub(super) async fn proxy_woke(&self, id: &str, port: u16) -> Result<()> {
        let rec = self.record(id).await?;
        self.emit(Event { port: Some(port), ..draft(EventKind::ProxyWake, &rec) }).await;
        Ok(())
    }

    /// Long-polls until the machine reaches `want`, it fails instead, or `timeout` passes.
    pub(crate) async fn wait(&self, id: &str, want: MachineStatus, timeout: Duration) -> Result<Machine> {
        let mut events = self.events.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let rec = self.record(id).await?;
            if rec.status == want {
                return Ok(self.to_wire(&rec));
            }
            if rec.status == MachineStatus::Failed {
                return Err(Error::WaitFailed {
                    id: rec.id,
                    want,
                    reason: rec.error_message.unwrap_or_else(|| "no error message".into()),
                });
            }
            loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Ok(ev) if ev.machine_id != rec.id => continue,
                        // This machine changed, or events were missed (lagged): look again.
                        _ => break,
                    },
                    _ = tokio::time::sleep_until(deadline) => {
                        return Err(Error::WaitTimedOut { id: rec.id, want });
                    }
                }
            }
        }
    }
}
