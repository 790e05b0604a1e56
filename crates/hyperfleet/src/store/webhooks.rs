//! The `webhooks` and `webhook_deliveries` tables. A delivery row is the durable to-do of one event for one
//! webhook: it is inserted in the transaction that stores the event (see `machines/events.rs`), so an event
//! that happened has its deliveries, across any crash. The delivery worker claims due rows by pushing their
//! `next_attempt_at` past the request's timeout (a lease: a daemon killed mid-request sends again once it
//! runs out), then records each attempt's outcome. Times the worker compares are unix milliseconds.

use hyperfleet_types::{DeliveryStatus, Event, Webhook, WebhookDelivery};
use sqlx::any::AnyRow;
use time::OffsetDateTime;

use super::{Conn, StoreError, StoreResult, col, int, now, time_col};

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

fn webhook_row(row: &AnyRow) -> StoreResult<WebhookRecord> {
    let events: String = col(row, "events")?;
    Ok(WebhookRecord {
        id: col(row, "id")?,
        url: col(row, "url")?,
        events: serde_json::from_str(&events).map_err(|e| StoreError::Corrupt(format!("column events: {e}")))?,
        label_selector: col(row, "label_selector")?,
        secret: col(row, "secret")?,
        created_at: time_col(row, "created_at")?,
    })
}

pub(crate) async fn insert(c: &mut Conn, rec: &WebhookRecord) -> StoreResult<WebhookRecord> {
    let events = serde_json::to_string(&rec.events).map_err(|e| StoreError::Corrupt(format!("events: {e}")))?;
    sqlx::query(
        "INSERT INTO webhooks (id, url, events, label_selector, secret, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&rec.id)
    .bind(&rec.url)
    .bind(events)
    .bind(rec.label_selector.clone())
    .bind(rec.secret.clone())
    .bind(hyperfleet_types::timestamp::format(rec.created_at))
    .execute(&mut *c)
    .await?;
    get(c, &rec.id).await?.ok_or_else(|| StoreError::Corrupt(format!("webhook {} vanished", rec.id)))
}

pub(crate) async fn get(c: &mut Conn, id: &str) -> StoreResult<Option<WebhookRecord>> {
    sqlx::query("SELECT id, url, events, label_selector, secret, created_at FROM webhooks WHERE id = $1")
        .bind(id)
        .fetch_optional(c)
        .await?
        .as_ref()
        .map(webhook_row)
        .transpose()
}

/// Every webhook, oldest first.
pub(crate) async fn list(c: &mut Conn) -> StoreResult<Vec<WebhookRecord>> {
    sqlx::query("SELECT id, url, events, label_selector, secret, created_at FROM webhooks ORDER BY created_at, id")
        .fetch_all(c)
        .await?
        .iter()
        .map(webhook_row)
        .collect()
}

/// Deletes a webhook and its deliveries; false when there was none.
pub(crate) async fn delete(c: &mut Conn, id: &str) -> StoreResult<bool> {
    Ok(sqlx::query("DELETE FROM webhooks WHERE id = $1").bind(id).execute(c).await?.rows_affected() > 0)
}

/// A pending delivery of `event` (stored with its id) to `webhook_id`, due at once.
pub(crate) async fn enqueue(c: &mut Conn, webhook_id: &str, event_type: &str, event: &Event) -> StoreResult<u64> {
    let body = serde_json::to_string(event).map_err(|e| StoreError::Corrupt(format!("event: {e}")))?;
    let t = now();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO webhook_deliveries (webhook_id, event_id, event_type, machine_id, event, status, attempts, \
         next_attempt_at, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'pending', 0, $6, $7, $7) RETURNING id",
    )
    .bind(webhook_id)
    .bind(i64::try_from(event.id).unwrap_or(i64::MAX))
    .bind(event_type)
    .bind(&event.machine_id)
    .bind(body)
    .bind(now_ms())
    .bind(t)
    .fetch_one(&mut *c)
    .await?;
    if id % 64 == 0 {
        sqlx::query(
            "DELETE FROM webhook_deliveries WHERE webhook_id = $1 AND status != 'pending' AND id <= \
             (SELECT id FROM webhook_deliveries WHERE webhook_id = $1 ORDER BY id DESC LIMIT 1 OFFSET $2)",
        )
        .bind(webhook_id)
        .bind(KEEP_PER_WEBHOOK)
        .execute(c)
        .await?;
    }
    int("delivery id", id)
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

/// Claims up to `limit` pending deliveries due at `now_ms` (in the caller's write transaction): their
/// `next_attempt_at` moves to `lease_until`, so another pass does not take them while they are in flight.
pub(crate) async fn claim_due(
    c: &mut Conn,
    now_ms: i64,
    lease_until: i64,
    limit: usize,
) -> StoreResult<Vec<DueDelivery>> {
    let rows = sqlx::query(
        "SELECT d.id, d.webhook_id, w.url, w.secret, d.event, d.attempts FROM webhook_deliveries d \
         JOIN webhooks w ON w.id = d.webhook_id WHERE d.status = 'pending' AND d.next_attempt_at <= $1 \
         ORDER BY d.next_attempt_at, d.id LIMIT $2",
    )
    .bind(now_ms)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(&mut *c)
    .await?;
    let mut due = Vec::new();
    for r in rows {
        let id: i64 = col(&r, "id")?;
        let body: String = col(&r, "event")?;
        let event: Event =
            serde_json::from_str(&body).map_err(|e| StoreError::Corrupt(format!("delivery {id}: {e}")))?;
        due.push(DueDelivery {
            id: int("delivery id", id)?,
            webhook_id: col(&r, "webhook_id")?,
            url: col(&r, "url")?,
            secret: col(&r, "secret")?,
            event,
            attempts: int("attempts", col::<i64>(&r, "attempts")?)?,
        });
    }
    for d in &due {
        sqlx::query("UPDATE webhook_deliveries SET next_attempt_at = $1 WHERE id = $2")
            .bind(lease_until)
            .bind(i64::try_from(d.id).unwrap_or(i64::MAX))
            .execute(&mut *c)
            .await?;
    }
    Ok(due)
}

/// When the next pending delivery is due (unix ms), if any is pending.
pub(crate) async fn next_due(c: &mut Conn) -> StoreResult<Option<i64>> {
    Ok(sqlx::query_scalar("SELECT MIN(next_attempt_at) FROM webhook_deliveries WHERE status = 'pending'")
        .fetch_one(c)
        .await?)
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
pub(crate) async fn record_attempt(c: &mut Conn, id: u64, attempt: u32, outcome: &Outcome) -> StoreResult<()> {
    let (status, code, error, next) = match outcome {
        Outcome::Delivered { status_code } => ("delivered", Some(*status_code), None, None),
        Outcome::Retry { status_code, error, next_ms } => {
            ("pending", *status_code, Some(error.as_str()), Some(*next_ms))
        }
        Outcome::Failed { status_code, error } => ("failed", *status_code, Some(error.as_str()), None),
    };
    sqlx::query(
        "UPDATE webhook_deliveries SET status = $1, attempts = $2, last_status_code = $3, last_error = $4, \
         next_attempt_at = $5, updated_at = $6 WHERE id = $7",
    )
    .bind(status)
    .bind(i64::from(attempt))
    .bind(code.map(i64::from))
    .bind(error)
    .bind(next)
    .bind(now())
    .bind(i64::try_from(id).unwrap_or(i64::MAX))
    .execute(c)
    .await?;
    Ok(())
}

fn delivery_row(row: &AnyRow) -> StoreResult<WebhookDelivery> {
    let status: String = col(row, "status")?;
    let next: Option<i64> = col(row, "next_attempt_at")?;
    let code: Option<i64> = col(row, "last_status_code")?;
    Ok(WebhookDelivery {
        id: int("delivery id", col::<i64>(row, "id")?)?,
        webhook_id: col(row, "webhook_id")?,
        event_id: int("event id", col::<i64>(row, "event_id")?)?,
        event: col(row, "event_type")?,
        machine_id: col(row, "machine_id")?,
        status: match status.as_str() {
            "delivered" => DeliveryStatus::Delivered,
            "failed" => DeliveryStatus::Failed,
            _ => DeliveryStatus::Pending,
        },
        attempts: int("attempts", col::<i64>(row, "attempts")?)?,
        last_status_code: code.map(|c| int("status code", c)).transpose()?,
        last_error: col(row, "last_error")?,
        next_attempt_at: if status == "pending" { next.and_then(from_ms) } else { None },
        created_at: time_col(row, "created_at")?,
        updated_at: time_col(row, "updated_at")?,
    })
}

/// A webhook's deliveries, most recent first, with ids below `before` (all when `None`), `limit` at most.
pub(crate) async fn deliveries(
    c: &mut Conn,
    webhook_id: &str,
    before: Option<u64>,
    limit: u32,
) -> StoreResult<Vec<WebhookDelivery>> {
    let before = before.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
    sqlx::query(
        "SELECT id, webhook_id, event_id, event_type, machine_id, status, attempts, last_status_code, \
         last_error, next_attempt_at, created_at, updated_at FROM webhook_deliveries \
         WHERE webhook_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
    )
    .bind(webhook_id)
    .bind(before)
    .bind(i64::from(limit))
    .fetch_all(c)
    .await?
    .iter()
    .map(delivery_row)
    .collect()
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
    use crate::store::testing::backend_tests;
    use hyperfleet_types::EventKind;

    fn ev(id: u64) -> Event {
        Event { id, ..crate::store::events::tests::ev("m1", EventKind::Running) }
    }

    backend_tests! {
        async fn deliveries_are_claimed_once_recorded_and_go_with_their_webhook(store, _db) {
            let hook = WebhookRecord {
                id: "w1".into(),
                url: "http://127.0.0.1:9/h".into(),
                events: vec!["machine.running".into()],
                label_selector: None,
                secret: Some(b"s".to_vec()),
                created_at: hyperfleet_types::timestamp::now(),
            };
            let mut tx = store.write().await.unwrap();
            let stored = insert(&mut tx, &hook).await.unwrap();
            assert!(stored.to_wire().has_secret);
            let mut ids = Vec::new();
            for i in 1..=3 {
                ids.push(enqueue(&mut tx, "w1", "machine.running", &ev(i)).await.unwrap());
            }
            let now = now_ms();
            let claimed = claim_due(&mut tx, now, now + 60_000, 2).await.unwrap();
            assert_eq!(claimed.iter().map(|d| d.id).collect::<Vec<_>>(), ids[..2]);
            assert_eq!(claimed[0].event.id, 1);
            let again = claim_due(&mut tx, now, now + 60_000, 10).await.unwrap();
            assert_eq!(again.iter().map(|d| d.id).collect::<Vec<_>>(), ids[2..], "claimed ones are leased");
            record_attempt(&mut tx, ids[0], 1, &Outcome::Delivered { status_code: 204 }).await.unwrap();
            let retry = Outcome::Retry { status_code: Some(500), error: "HTTP 500".into(), next_ms: now - 1 };
            record_attempt(&mut tx, ids[1], 1, &retry).await.unwrap();
            let due = claim_due(&mut tx, now, now + 60_000, 10).await.unwrap();
            assert_eq!((due.len(), due[0].id, due[0].attempts), (1, ids[1], 1));
            tx.commit().await.unwrap();
            let mut r = store.read().await.unwrap();
            let page = deliveries(&mut r, "w1", None, 2).await.unwrap();
            assert_eq!(page.iter().map(|d| d.id).collect::<Vec<_>>(), [ids[2], ids[1]], "most recent first");
            let older = deliveries(&mut r, "w1", Some(ids[1]), 2).await.unwrap();
            assert_eq!(older[0].status, DeliveryStatus::Delivered);
            assert_eq!(older[0].last_status_code, Some(204));
            drop(r);
            let mut tx = store.write().await.unwrap();
            assert!(delete(&mut tx, "w1").await.unwrap());
            tx.commit().await.unwrap();
            let mut r = store.read().await.unwrap();
            assert!(deliveries(&mut r, "w1", None, 10).await.unwrap().is_empty());
            assert_eq!(next_due(&mut r).await.unwrap(), None);
        }
    }
}
