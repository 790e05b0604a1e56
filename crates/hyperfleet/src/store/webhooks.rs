//! The `webhooks` and `webhook_deliveries` tables. A delivery row is the durable to-do of one event for one
//! webhook: it is inserted in the transaction that stores the event (see `machines/events.rs`), so an event
//! that happened has its deliveries, across any crash. The delivery worker claims due rows by pushing their
//! `next_attempt_at` past the request's timeout (a lease: a daemon killed mid-request sends again once it
//! runs out), then records each attempt's outcome. Times the worker compares are unix milliseconds.

use hyperfleet_types::{DeliveryStatus, Event, Webhook, WebhookDelivery};
use rusqlite::{Connection, OptionalExtension, Row, params};
use time::OffsetDateTime;

use super::machines::time_col;
use super::{StoreError, StoreResult, now};

/// Delivered or failed deliveries kept per webhook; older ones are trimmed (pending ones never are).
const KEEP_PER_WEBHOOK: i64 = 1000;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WebhookRecord {
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    pub label_selector: Option<String>,
    pub secret: Option<Vec<u8>>,
    pub created_at: OffsetDateTime,
}

impl WebhookRecord {
    pub(crate) fn to_wire(&self) -> Webhook {
        Webhook {
            id: self.id.clone(),
            url: self.url.clone(),
            events: self.events.clone(),
            label_selector: self.label_selector.clone(),
            has_secret: self.secret.is_some(),
            created_at: self.created_at,
        }
    }
}

fn webhook_row(row: &Row) -> rusqlite::Result<WebhookRecord> {
    let events: String = row.get("events")?;
    Ok(WebhookRecord {
        id: row.get("id")?,
        url: row.get("url")?,
        events: serde_json::from_str(&events)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))?,
        label_selector: row.get("label_selector")?,
        secret: row.get("secret")?,
        created_at: time_col(row, "created_at")?,
    })
}

const SELECT_WEBHOOK: &str = "SELECT id, url, events, label_selector, secret, created_at FROM webhooks";

pub(crate) fn insert(conn: &Connection, rec: &WebhookRecord) -> StoreResult<WebhookRecord> {
    let events = serde_json::to_string(&rec.events).map_err(|e| StoreError::Corrupt(format!("events: {e}")))?;
    conn.execute(
        "INSERT INTO webhooks (id, url, events, label_selector, secret, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            rec.id,
            rec.url,
            events,
            rec.label_selector,
            rec.secret,
            hyperfleet_types::timestamp::format(rec.created_at)
        ],
    )?;
    get(conn, &rec.id)?.ok_or_else(|| StoreError::Corrupt(format!("webhook {} vanished", rec.id)))
}

pub(crate) fn get(conn: &Connection, id: &str) -> StoreResult<Option<WebhookRecord>> {
    Ok(conn.prepare_cached(&format!("{SELECT_WEBHOOK} WHERE id = ?1"))?.query_row([id], webhook_row).optional()?)
}

/// Every webhook, oldest first.
pub(crate) fn list(conn: &Connection) -> StoreResult<Vec<WebhookRecord>> {
    Ok(conn
        .prepare_cached(&format!("{SELECT_WEBHOOK} ORDER BY created_at, id"))?
        .query_map([], webhook_row)?
        .collect::<Result<_, _>>()?)
}

/// Deletes a webhook and its deliveries; false when there was none.
pub(crate) fn delete(conn: &Connection, id: &str) -> StoreResult<bool> {
    Ok(conn.execute("DELETE FROM webhooks WHERE id = ?1", [id])? > 0)
}

/// A pending delivery of `event` (stored with its id) to `webhook_id`, due at once.
pub(crate) fn enqueue(conn: &Connection, webhook_id: &str, event_type: &str, event: &Event) -> StoreResult<u64> {
    let body = serde_json::to_string(event).map_err(|e| StoreError::Corrupt(format!("event: {e}")))?;
    let t = now();
    conn.prepare_cached(
        "INSERT INTO webhook_deliveries (webhook_id, event_id, event_type, machine_id, event, status, attempts, \
         next_attempt_at, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, 'pending', 0, ?6, ?7, ?7)",
    )?
    .execute(params![
        webhook_id,
        i64::try_from(event.id).unwrap_or(i64::MAX),
        event_type,
        event.machine_id,
        body,
        now_ms(),
        t
    ])?;
    let id = conn.last_insert_rowid();
    if id % 64 == 0 {
        conn.prepare_cached(
            "DELETE FROM webhook_deliveries WHERE webhook_id = ?1 AND status != 'pending' AND id <= \
             (SELECT id FROM webhook_deliveries WHERE webhook_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
        )?
        .execute(params![webhook_id, KEEP_PER_WEBHOOK])?;
    }
    u64::try_from(id).map_err(|e| StoreError::Corrupt(format!("delivery id: {e}")))
}

/// A delivery the worker is about to attempt, with what it needs to send it.
#[derive(Debug, Clone)]
pub(crate) struct DueDelivery {
    pub id: u64,
    pub webhook_id: String,
    pub url: String,
    pub secret: Option<Vec<u8>>,
    pub event: Event,
    /// Attempts made before this one.
    pub attempts: u32,
}

/// Claims up to `limit` pending deliveries due at `now_ms`: their `next_attempt_at` moves to `lease_until`, so
/// another pass does not take them while they are in flight. One transaction.
pub(crate) fn claim_due(
    conn: &Connection,
    now_ms: i64,
    lease_until: i64,
    limit: usize,
) -> StoreResult<Vec<DueDelivery>> {
    let tx = conn.unchecked_transaction()?;
    let due: Vec<DueDelivery> = {
        let mut stmt = tx.prepare_cached(
            "SELECT d.id, d.webhook_id, w.url, w.secret, d.event, d.attempts FROM webhook_deliveries d \
             JOIN webhooks w ON w.id = d.webhook_id WHERE d.status = 'pending' AND d.next_attempt_at <= ?1 \
             ORDER BY d.next_attempt_at, d.id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![now_ms, i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<Vec<u8>>>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, u32>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, webhook_id, url, secret, body, attempts) = row?;
            let event: Event =
                serde_json::from_str(&body).map_err(|e| StoreError::Corrupt(format!("delivery {id}: {e}")))?;
            let id = u64::try_from(id).map_err(|e| StoreError::Corrupt(format!("delivery id: {e}")))?;
            out.push(DueDelivery { id, webhook_id, url, secret, event, attempts });
        }
        out
    };
    {
        let mut lease = tx.prepare_cached("UPDATE webhook_deliveries SET next_attempt_at = ?1 WHERE id = ?2")?;
        for d in &due {
            lease.execute(params![lease_until, i64::try_from(d.id).unwrap_or(i64::MAX)])?;
        }
    }
    tx.commit()?;
    Ok(due)
}

/// When the next pending delivery is due (unix ms), if any is pending.
pub(crate) fn next_due(conn: &Connection) -> StoreResult<Option<i64>> {
    Ok(conn.query_row("SELECT MIN(next_attempt_at) FROM webhook_deliveries WHERE status = 'pending'", [], |r| {
        r.get::<_, Option<i64>>(0)
    })?)
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    Delivered {
        status_code: u16,
    },
    /// Failed; tried again at `next_ms`.
    Retry {
        status_code: Option<u16>,
        error: String,
        next_ms: i64,
    },
    /// Failed, and it was the last attempt.
    Failed {
        status_code: Option<u16>,
        error: String,
    },
}

/// Records attempt number `attempt` of delivery `id`. A delivery whose webhook was deleted meanwhile is gone.
pub(crate) fn record_attempt(conn: &Connection, id: u64, attempt: u32, outcome: &Outcome) -> StoreResult<()> {
    let (status, code, error, next) = match outcome {
        Outcome::Delivered { status_code } => ("delivered", Some(*status_code), None, None),
        Outcome::Retry { status_code, error, next_ms } => {
            ("pending", *status_code, Some(error.as_str()), Some(*next_ms))
        }
        Outcome::Failed { status_code, error } => ("failed", *status_code, Some(error.as_str()), None),
    };
    conn.prepare_cached(
        "UPDATE webhook_deliveries SET status = ?1, attempts = ?2, last_status_code = ?3, last_error = ?4, \
         next_attempt_at = ?5, updated_at = ?6 WHERE id = ?7",
    )?
    .execute(params![status, attempt, code, error, next, now(), i64::try_from(id).unwrap_or(i64::MAX)])?;
    Ok(())
}

fn delivery_row(row: &Row) -> rusqlite::Result<WebhookDelivery> {
    let status: String = row.get("status")?;
    let next: Option<i64> = row.get("next_attempt_at")?;
    let event_id: i64 = row.get("event_id")?;
    let id: i64 = row.get("id")?;
    Ok(WebhookDelivery {
        id: u64::try_from(id).unwrap_or(0),
        webhook_id: row.get("webhook_id")?,
        event_id: u64::try_from(event_id).unwrap_or(0),
        event: row.get("event_type")?,
        machine_id: row.get("machine_id")?,
        status: match status.as_str() {
            "delivered" => DeliveryStatus::Delivered,
            "failed" => DeliveryStatus::Failed,
            _ => DeliveryStatus::Pending,
        },
        attempts: row.get("attempts")?,
        last_status_code: row.get("last_status_code")?,
        last_error: row.get("last_error")?,
        next_attempt_at: if status == "pending" { next.and_then(from_ms) } else { None },
        created_at: time_col(row, "created_at")?,
        updated_at: time_col(row, "updated_at")?,
    })
}

/// A webhook's deliveries, most recent first, with ids below `before` (all when `None`), `limit` at most.
pub(crate) fn deliveries(
    conn: &Connection,
    webhook_id: &str,
    before: Option<u64>,
    limit: u32,
) -> StoreResult<Vec<WebhookDelivery>> {
    let before = before.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
    Ok(conn
        .prepare_cached(
            "SELECT id, webhook_id, event_id, event_type, machine_id, status, attempts, last_status_code, \
             last_error, next_attempt_at, created_at, updated_at FROM webhook_deliveries \
             WHERE webhook_id = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3",
        )?
        .query_map(params![webhook_id, before, limit], delivery_row)?
        .collect::<Result<_, _>>()?)
}

/// Now, in unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    i64::try_from(nanos).unwrap_or(i64::MAX)
}

fn from_ms(ms: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::temp_store;
    use hyperfleet_types::EventKind;

    fn ev(id: u64) -> Event {
        Event {
            id,
            kind: EventKind::Running,
            machine_id: "m1".into(),
            machine_name: "one".into(),
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

    #[test]
    fn deliveries_are_claimed_once_recorded_and_go_with_their_webhook() {
        let (_d, store) = temp_store();
        let hook = WebhookRecord {
            id: "w1".into(),
            url: "http://127.0.0.1:9/h".into(),
            events: vec!["machine.running".into()],
            label_selector: None,
            secret: Some(b"s".to_vec()),
            created_at: hyperfleet_types::timestamp::now(),
        };
        let stored = store.call_blocking(|c| insert(c, &hook)).unwrap();
        assert!(stored.to_wire().has_secret);
        let ids: Vec<u64> =
            (1..=3).map(|i| store.call_blocking(|c| enqueue(c, "w1", "machine.running", &ev(i))).unwrap()).collect();
        let now = now_ms();
        let claimed = store.call_blocking(|c| claim_due(c, now, now + 60_000, 2)).unwrap();
        assert_eq!(claimed.iter().map(|d| d.id).collect::<Vec<_>>(), ids[..2]);
        assert_eq!(claimed[0].event.id, 1);
        let again = store.call_blocking(|c| claim_due(c, now, now + 60_000, 10)).unwrap();
        assert_eq!(again.iter().map(|d| d.id).collect::<Vec<_>>(), ids[2..], "claimed ones are leased");
        store.call_blocking(|c| record_attempt(c, ids[0], 1, &Outcome::Delivered { status_code: 204 })).unwrap();
        let retry = Outcome::Retry { status_code: Some(500), error: "HTTP 500".into(), next_ms: now - 1 };
        store.call_blocking(|c| record_attempt(c, ids[1], 1, &retry)).unwrap();
        let due = store.call_blocking(|c| claim_due(c, now, now + 60_000, 10)).unwrap();
        assert_eq!((due.len(), due[0].id, due[0].attempts), (1, ids[1], 1));
        let page = store.read_blocking(|c| deliveries(c, "w1", None, 2)).unwrap();
        assert_eq!(page.iter().map(|d| d.id).collect::<Vec<_>>(), [ids[2], ids[1]], "most recent first");
        let older = store.read_blocking(|c| deliveries(c, "w1", Some(ids[1]), 2)).unwrap();
        assert_eq!(older[0].status, DeliveryStatus::Delivered);
        assert_eq!(older[0].last_status_code, Some(204));
        assert!(store.call_blocking(|c| delete(c, "w1")).unwrap());
        assert!(store.read_blocking(|c| deliveries(c, "w1", None, 10)).unwrap().is_empty());
        assert_eq!(store.read_blocking(next_due).unwrap(), None);
    }
}
