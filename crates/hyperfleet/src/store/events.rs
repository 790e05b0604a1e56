//! The `events` table: the stored backlog of machine events that `GET /events` resumes from. Ids only grow
//! (AUTOINCREMENT / an identity column, so never reused after a trim or a restart); the table keeps about the last `keep` events.

use super::{Conn, StoreError, StoreResult, col, int};
use hyperfleet_types::{Event, EventKind};

/// Which events a reader wants: one machine (by id or name) and some kinds; `None` is any.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct EventFilter {
    pub machine: Option<String>,
    pub kinds: Option<Vec<EventKind>>,
}

impl EventFilter {
    pub(crate) fn matches(&self, e: &Event) -> bool {
        self.machine.as_ref().is_none_or(|m| *m == e.machine_id || *m == e.machine_name)
            && self.kinds.as_ref().is_none_or(|k| k.contains(&e.kind))
    }
}

/// Stores `event` (its `id` is ignored) and returns it with the id it got, in the caller's write transaction
/// (whose lock makes ids commit in order). Every `TRIM_EVERY` events, those older than the last `keep` are
/// deleted. (The daemon stores with [`insert`] and [`trim`], which it sequences itself.)
#[cfg(test)]
pub(crate) async fn append(c: &mut Conn, event: &Event, keep: u64) -> StoreResult<Event> {
    let (e, _) = insert(c, event).await?;
    trim(c, e.id, keep).await?;
    Ok(e)
}

/// Stores `event` (its `id` is ignored) and returns it with the id it got, and whether any webhook exists
/// (learnt in the same statement: a caller queues deliveries only if one does, and needs no second round
/// trip to learn that there is none). One statement; [`trim`] goes with it.
pub(crate) async fn insert(c: &mut Conn, event: &Event) -> StoreResult<(Event, bool)> {
    let body = serde_json::to_string(event).map_err(|e| StoreError::Corrupt(format!("event: {e}")))?;
    let (id, webhooks): (i64, i64) = sqlx::query_as(
        "INSERT INTO events (machine_id, machine_name, type, body) VALUES ($1, $2, $3, $4) \
         RETURNING id, (SELECT COUNT(*) FROM webhooks) AS webhooks",
    )
    .bind(&event.machine_id)
    .bind(&event.machine_name)
    .bind(event.kind.as_str())
    .bind(body)
    .fetch_one(&mut *c)
    .await?;
    Ok((Event { id: int("event id", id)?, ..event.clone() }, webhooks > 0))
}

const TRIM_EVERY: u64 = 64;

/// Whether [`trim`] after event `id` has anything to do.
pub(crate) fn trim_due(id: u64, keep: u64) -> bool {
    id.is_multiple_of(TRIM_EVERY) && id > keep
}

/// After event `id`, every `TRIM_EVERY` events, deletes those older than the last `keep`.
pub(crate) async fn trim(c: &mut Conn, id: u64, keep: u64) -> StoreResult<()> {
    if trim_due(id, keep) {
        let oldest_kept = i64::try_from(id - keep).unwrap_or(i64::MAX);
        sqlx::query("DELETE FROM events WHERE id <= $1").bind(oldest_kept).execute(c).await?;
    }
    Ok(())
}

/// Takes back event `id` and its deliveries (an event whose deliveries could not all be stored).
pub(crate) async fn remove(c: &mut Conn, id: u64) -> StoreResult<()> {
    let id = i64::try_from(id).unwrap_or(i64::MAX);
    sqlx::query("DELETE FROM events WHERE id = $1").bind(id).execute(&mut *c).await?;
    sqlx::query("DELETE FROM webhook_deliveries WHERE event_id = $1").bind(id).execute(c).await?;
    Ok(())
}

/// One read of the backlog.
#[derive(Debug, Default)]
pub(crate) struct EventPage {
    /// The events that pass the filter, oldest first.
    pub events: Vec<Event>,
    /// The id of the last event looked at (passed or not); the next page starts after it.
    pub scanned_to: u64,
    /// Whether the backlog may hold more after `scanned_to`.
    pub more: bool,
}

/// The stored events after `after` that pass `filter`, looking at `limit` of them at most.
pub(crate) async fn after(c: &mut Conn, after: u64, filter: &EventFilter, limit: u32) -> StoreResult<EventPage> {
    let after = i64::try_from(after).unwrap_or(i64::MAX);
    let rows = sqlx::query(
        "SELECT id, body FROM events WHERE id > $1 AND ($2 IS NULL OR machine_id = $2 OR machine_name = $2) \
         ORDER BY id LIMIT $3",
    )
    .bind(after)
    .bind(filter.machine.clone())
    .bind(i64::from(limit))
    .fetch_all(c)
    .await?;
    let mut page = EventPage { scanned_to: u64::try_from(after).unwrap_or(0), ..EventPage::default() };
    let mut looked = 0;
    for row in rows {
        let id: i64 = col(&row, "id")?;
        let body: String = col(&row, "body")?;
        let mut e: Event = serde_json::from_str(&body).map_err(|e| StoreError::Corrupt(format!("event {id}: {e}")))?;
        e.id = int("event id", id)?;
        page.scanned_to = e.id;
        looked += 1;
        if filter.matches(&e) {
            page.events.push(e);
        }
    }
    page.more = looked >= limit;
    Ok(page)
}

/// The PostgreSQL channel on which every daemon sharing the database announces the events it stores.
pub(crate) const CHANNEL: &str = "hyperfleet_events";

/// The largest announcement that carries its event; a longer one (a long failure reason) carries the id,
/// and its listeners read the event from the backlog. PostgreSQL's own limit is 8000 bytes.
const MAX_INLINE: usize = 7000;

/// What [`announce`] sends on [`CHANNEL`]: who stored the event (so its own listener skips it), and the
/// event, or its id when the event is too long to carry.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Announcement {
    pub origin: String,
    pub id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<Event>,
}

/// Announces the stored `event` (it has its id) to every daemon listening on the database, on PostgreSQL
/// (NOTIFY is delivered when the caller's transaction commits, in commit order, and not at all if it rolls
/// back). `origin` is this daemon's token.
pub(crate) async fn announce(c: &mut Conn, origin: &str, event: &Event) -> StoreResult<()> {
    let mut a = Announcement { origin: origin.to_owned(), id: event.id, event: Some(event.clone()) };
    let mut payload = serde_json::to_string(&a).map_err(|e| StoreError::Corrupt(format!("event: {e}")))?;
    if payload.len() > MAX_INLINE {
        a.event = None;
        payload = serde_json::to_string(&a).map_err(|e| StoreError::Corrupt(format!("event: {e}")))?;
    }
    sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL).bind(payload).execute(c).await?;
    Ok(())
}

/// The stored event `id`, if the backlog still has it.
pub(crate) async fn get(c: &mut Conn, id: u64) -> StoreResult<Option<Event>> {
    let before = id.saturating_sub(1);
    Ok(after(c, before, &EventFilter::default(), 1).await?.events.into_iter().find(|e| e.id == id))
}

/// The id of the newest event stored (0 when there is none).
pub(crate) async fn last_id(c: &mut Conn) -> StoreResult<u64> {
    int("event id", sqlx::query_scalar::<_, i64>("SELECT COALESCE(MAX(id), 0) FROM events").fetch_one(c).await?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::testing::backend_tests;

    /// An event of `kind` for machine `machine` (named `{machine}-name`), stamped now.
    pub(crate) fn ev(machine: &str, kind: EventKind) -> Event {
        Event {
            id: 0,
            kind,
            machine_id: machine.into(),
            machine_name: format!("{machine}-name"),
            status: None,
            at: hyperfleet_types::timestamp::now(),
            reason: None,
            program: None,
            exit_code: None,
            duration_ms: None,
            path: None,
            port: None,
            parent_id: None,
        }
    }

    #[tokio::test]
    #[ignore = "needs postgresql: starts a throwaway cluster with Debian's postgresql package"]
    async fn announcements_reach_the_other_daemons_when_the_change_commits() {
        let db = crate::store::testing::TestDb::postgres().await;
        let mut listener = db.store.listen(CHANNEL).await.unwrap().expect("PostgreSQL listens");
        let other = db.reopen().await;
        // Rolled back: never heard.
        let mut w = other.write().await.unwrap();
        let (gone, _) = insert(&mut w, &ev("a", EventKind::Running)).await.unwrap();
        announce(&mut w, "node-b", &gone).await.unwrap();
        drop(w);
        // Committed: heard, with the event; one too long to carry is heard by id and read from the backlog.
        let mut w = other.write().await.unwrap();
        let (kept, _) = insert(&mut w, &ev("a", EventKind::Stopped)).await.unwrap();
        announce(&mut w, "node-b", &kept).await.unwrap();
        let failed = Event { reason: Some("x".repeat(10_000)), ..ev("b", EventKind::Failed) };
        let (long, _) = insert(&mut w, &failed).await.unwrap();
        announce(&mut w, "node-b", &long).await.unwrap();
        w.commit().await.unwrap();
        let mut heard = Vec::new();
        for _ in 0..2 {
            let note =
                tokio::time::timeout(std::time::Duration::from_secs(10), listener.recv()).await.unwrap().unwrap();
            heard.push(serde_json::from_str::<Announcement>(note.payload()).unwrap());
        }
        assert_eq!(
            heard.iter().map(|a| (a.origin.as_str(), a.id)).collect::<Vec<_>>(),
            [("node-b", kept.id), ("node-b", long.id)]
        );
        assert_eq!(heard[0].event.as_ref().map(|e| e.kind), Some(EventKind::Stopped));
        assert!(heard[1].event.is_none(), "too long to carry");
        let read = get(&mut db.store.read().await.unwrap(), long.id).await.unwrap().unwrap();
        assert_eq!(read.reason.map(|r| r.len()), Some(10_000));
        assert!(get(&mut db.store.read().await.unwrap(), gone.id).await.unwrap().is_none());
        other.close().await;
    }

    backend_tests! {
        async fn the_backlog_is_bounded_ids_keep_growing_and_filters_apply(store, _db) {
            let mut ids = Vec::new();
            for i in 0..300 {
                let m = if i % 2 == 0 { "a" } else { "b" };
                let k = if i % 3 == 0 { EventKind::Running } else { EventKind::Stopped };
                let mut tx = store.write().await.unwrap();
                ids.push(append(&mut tx, &ev(m, k), 100).await.unwrap().id);
                tx.commit().await.unwrap();
            }
            assert_eq!(ids, (1..=300).collect::<Vec<_>>());
            let mut c = store.read().await.unwrap();
            let all = after(&mut c, 0, &EventFilter::default(), 1000).await.unwrap().events;
            assert!(all.len() >= 100 && all.len() < 100 + 64, "kept {}", all.len());
            assert_eq!(all.last().unwrap().id, 300);
            let since = after(&mut c, 295, &EventFilter::default(), 1000).await.unwrap().events;
            assert_eq!(since.iter().map(|e| e.id).collect::<Vec<_>>(), [296, 297, 298, 299, 300]);
            let by_name = EventFilter { machine: Some("a-name".into()), kinds: Some(vec![EventKind::Running]) };
            let some = after(&mut c, 280, &by_name, 1000).await.unwrap();
            assert_eq!(some.events.iter().map(|e| e.id).collect::<Vec<_>>(), [283, 289, 295]);
            assert_eq!((some.scanned_to, some.more), (299, false), "300 is machine b's");
            let first = after(&mut c, 280, &by_name, 5).await.unwrap();
            // Five of machine a's events looked at (281..=289), two of them `running`.
            assert_eq!(first.events.iter().map(|e| e.id).collect::<Vec<_>>(), [283, 289]);
            assert_eq!((first.scanned_to, first.more), (289, true));
            assert_eq!(last_id(&mut c).await.unwrap(), 300);
        }
    }
}
