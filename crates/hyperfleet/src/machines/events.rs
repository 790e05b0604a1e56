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
use crate::store::{Backend, Conn, StoreError, StoreResult, Write, machines as records};

/// The most stored events one backlog read looks at; a resuming reader reads again for more.
const BACKLOG_PAGE: u32 = 500;

#[derive(Clone)]
pub(super) struct Events {
    tx: broadcast::Sender<Arc<Event>>,
    /// How many stored events to keep.
    keep: u64,
    /// Told when deliveries were queued (the webhook worker waits on it).
    pub(super) deliveries: Arc<Notify>,
    /// This daemon's token in the announcements of events on PostgreSQL (see [`Service::relay_events`]).
    origin: Arc<str>,
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
        parent_id: m.spec.parent_id.clone(),
    }
}

impl Events {
    pub(super) fn new(keep: u64) -> Self {
        Self {
            tx: broadcast::channel(1024).0,
            keep: keep.max(1),
            deliveries: Arc::new(Notify::new()),
            origin: crate::store::random_id().into(),
        }
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
    /// to store is logged: the change it reports happens regardless, unless the database connection was lost
    /// (then `tx` cannot commit: see [`Write::lost`]).
    pub(super) async fn append_for(&self, tx: &mut Write, event: Event, labels: &BTreeMap<String, String>) {
        let stored = self.store(tx, &event, labels).await;
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
                tracing::warn!(machine = %event.machine_id, kind = %event.kind, error = %e, "could not store an event");
                // The change itself cannot be committed either: its connection is gone.
                if e.is_unavailable() {
                    tx.lost(&e);
                }
            }
        }
    }

    /// Stores `event` and a delivery for each webhook it matches, all or nothing, in `tx`, which stays usable
    /// either way. On PostgreSQL all in a savepoint (a failed statement aborts the whole transaction). On
    /// SQLite a failed statement changes nothing and the transaction goes on, so the event's insert (one
    /// statement) needs no savepoint: the usual change (no webhook) saves two round trips. What follows it,
    /// if anything, runs in a savepoint, and if that fails the event is taken out again.
    async fn store(
        &self,
        tx: &mut Write,
        event: &Event,
        labels: &BTreeMap<String, String>,
    ) -> StoreResult<(Event, usize)> {
        if Backend::of(tx) == Backend::Postgres {
            let mut sp = tx.savepoint().await?;
            let done = async {
                let (e, any_webhook) = stored::insert(&mut sp, event).await?;
                stored::announce(&mut sp, &self.origin, &e).await?;
                let queued = self.after_insert(&mut sp, &e, any_webhook, labels).await?;
                Ok::<_, StoreError>((e, queued))
            }
            .await;
            return match done {
                Ok(done) => sp.commit().await.map(|()| done).map_err(Into::into),
                Err(e) => {
                    let _ = sp.rollback().await;
                    Err(e)
                }
            };
        }
        let (e, any_webhook) = stored::insert(tx, event).await?;
        if !any_webhook && !stored::trim_due(e.id, self.keep) {
            return Ok((e, 0));
        }
        let rest = async {
            let mut sp = tx.savepoint().await?;
            match self.after_insert(&mut sp, &e, any_webhook, labels).await {
                Ok(queued) => Ok(sp.commit().await.map(|()| queued)?),
                Err(err) => {
                    let _ = sp.rollback().await;
                    Err(err)
                }
            }
        }
        .await;
        match rest {
            Ok(queued) => Ok((e, queued)),
            Err(err) => {
                stored::remove(tx, e.id).await?;
                Err(err)
            }
        }
    }

    /// What follows an event's insert: the backlog's trim, and its deliveries if any webhook exists.
    async fn after_insert(
        &self,
        c: &mut Conn,
        e: &Event,
        any_webhook: bool,
        labels: &BTreeMap<String, String>,
    ) -> StoreResult<usize> {
        stored::trim(c, e.id, self.keep).await?;
        if any_webhook { super::webhooks::enqueue_matching(c, e, labels).await } else { Ok(0) }
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

    /// On PostgreSQL, passes on the events that the other daemons sharing the database store (announced with
    /// NOTIFY when they commit, in commit order) to this daemon's listeners: `GET /events`, long-polls and the
    /// proxy's cache then see the whole fleet's changes, not only this node's, without polling. Runs until
    /// the daemon stops; a lost connection is re-established (events announced meanwhile are in the stored
    /// backlog, where `GET /events` resumes from).
    pub(crate) async fn relay_events(self: Arc<Self>) {
        let mut listener = match self.store.listen(stored::CHANNEL).await {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for other nodes' events: this node sees only its own");
                return;
            }
        };
        loop {
            let note = match listener.try_recv().await {
                Ok(Some(note)) => note,
                Ok(None) => {
                    tracing::warn!("lost the database connection that relays other nodes' events; reconnecting");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot hear other nodes' events; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let a: stored::Announcement = match serde_json::from_str(note.payload()) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "ignored an unreadable event announcement");
                    continue;
                }
            };
            if *a.origin == *self.events.origin || self.events.tx.receiver_count() == 0 {
                continue;
            }
            let event = match a.event {
                Some(e) => Some(e),
                None => match self.store.read().await {
                    Ok(mut c) => stored::get(&mut c, a.id).await.unwrap_or_else(|e| {
                        tracing::warn!(event = a.id, error = %e, "could not read an announced event");
                        None
                    }),
                    Err(e) => {
                        tracing::warn!(event = a.id, error = %e, "could not read an announced event");
                        None
                    }
                },
            };
            if let Some(e) = event {
                let _ignored_when_no_listener = self.events.tx.send(Arc::new(e));
            }
        }
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
