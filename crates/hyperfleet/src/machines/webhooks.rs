//! Webhooks: machine events POSTed to users' own services. Each event's deliveries are rows inserted with the
//! event itself (see `events.rs`), so none is lost across a crash; one worker task ([`Service::run_webhooks`])
//! sends what is due with bounded concurrency and a per-request timeout, apart from every machine flow, and
//! records each attempt. A failed attempt is retried after [`backoff`] until `max_attempts`.
//!
//! Event names are `machine.<type>` for each event type ([`event_names`]). A body is signed with
//! HMAC-SHA256 of its exact bytes under the webhook's secret: `X-Hyperfleet-Signature: sha256=<hex>`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use hyperfleet_types::{CreateWebhook, Event, EventKind, Webhook, WebhookDeliveryList, WebhookList, WebhookPayload};
use sha2::Sha256;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use super::selector::Selector;
use super::{Error, Host, Result, Service};
use crate::store::webhooks::{self as records, DueDelivery, Outcome, WebhookRecord};
use crate::store::{Conn, StoreResult};

const MAX_URL_LEN: usize = 2048;
const MAX_EVENTS: usize = 32;
const MAX_SELECTOR_LEN: usize = 1024;
const MAX_SECRET_LEN: usize = 256;
/// Most deliveries in flight at once, over all webhooks.
const CONCURRENCY: usize = 8;
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(15 * 60);
/// The longest the worker sleeps without looking at the store.
const IDLE_WAIT: Duration = Duration::from_secs(60);
/// Most deliveries one page of `GET /webhooks/{id}/deliveries` holds.
pub(crate) const MAX_PAGE: u32 = 100;

/// How deliveries are retried and timed out.
#[derive(Debug, Clone)]
pub(crate) struct WebhookPolicy {
    /// The wait after the first failed attempt; doubled after each further one, up to 15 minutes.
    pub retry_base: Duration,
    /// Attempts per delivery, the first included.
    pub max_attempts: u32,
    /// One attempt's time limit (connect, send, response head).
    pub timeout: Duration,
}

/// The wait after failed attempt number `attempt` (1-based): `base * 2^(attempt-1)`, at most [`MAX_BACKOFF`].
pub(crate) fn backoff(base: Duration, attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
    base.checked_mul(factor).unwrap_or(MAX_BACKOFF).min(MAX_BACKOFF)
}

/// `sha256=<hex>`: HMAC-SHA256 of `body` under `secret`.
pub(crate) fn signature(secret: &[u8], body: &[u8]) -> String {
    use std::fmt::Write;
    // HMAC takes keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable_hmac());
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        let _infallible = write!(out, "{b:02x}");
    }
    out
}

#[cold]
fn unreachable_hmac() -> Hmac<Sha256> {
    // `new_from_slice` fails only for fixed-size-key MACs; HMAC accepts every length.
    panic!("HMAC rejected a key")
}

/// Every event name a webhook can ask for: `machine.<type>`.
pub(crate) fn event_names() -> impl Iterator<Item = String> {
    EventKind::ALL.into_iter().map(event_name)
}

fn event_name(kind: EventKind) -> String {
    format!("machine.{}", kind.as_str())
}

/// Queues a delivery of the stored event `e` (of a machine with `labels`) for each webhook that wants it.
/// Called in the transaction that stores the event. Returns how many were queued.
pub(super) async fn enqueue_matching(c: &mut Conn, e: &Event, labels: &BTreeMap<String, String>) -> StoreResult<usize> {
    let name = event_name(e.kind);
    let mut queued = 0;
    for hook in records::list(c).await? {
        if !hook.events.contains(&name) {
            continue;
        }
        let selected = match hook.label_selector.as_deref().map(Selector::parse) {
            None => true,
            Some(Ok(s)) => s.matches(labels),
            // Validated at creation; a selector that no longer parses selects nothing.
            Some(Err(_)) => false,
        };
        if selected {
            records::enqueue(c, &hook.id, &name, e).await?;
            queued += 1;
        }
    }
    Ok(queued)
}

fn validate(req: CreateWebhook) -> Result<WebhookRecord> {
    let url = req.url.ok_or_else(|| Error::Invalid("url is required".into()))?;
    if url.len() > MAX_URL_LEN {
        return Err(Error::Invalid(format!("url: at most {MAX_URL_LEN} characters")));
    }
    let parsed = reqwest::Url::parse(&url).map_err(|e| Error::Invalid(format!("url: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none_or(str::is_empty) {
        return Err(Error::Invalid("url: must be an http or https URL with a host".into()));
    }
    let wanted = req.events.ok_or_else(|| Error::Invalid("events is required".into()))?;
    if wanted.is_empty() || wanted.len() > MAX_EVENTS {
        return Err(Error::Invalid(format!("events: 1 to {MAX_EVENTS} event names")));
    }
    let known: Vec<String> = event_names().collect();
    let mut events: Vec<String> = Vec::with_capacity(wanted.len());
    for name in wanted {
        if !known.contains(&name) {
            return Err(Error::Invalid(format!("events: '{name}' is not one of {}", known.join(", "))));
        }
        if !events.contains(&name) {
            events.push(name);
        }
    }
    let label_selector = match req.label_selector.filter(|s| !s.trim().is_empty()) {
        Some(s) if s.len() > MAX_SELECTOR_LEN => {
            return Err(Error::Invalid(format!("label_selector: at most {MAX_SELECTOR_LEN} characters")));
        }
        Some(s) => {
            Selector::parse(&s).map_err(|e| Error::Invalid(format!("label_selector: {e}")))?;
            Some(s)
        }
        None => None,
    };
    let secret = match req.secret {
        Some(s) if s.is_empty() || s.len() > MAX_SECRET_LEN => {
            return Err(Error::Invalid(format!("secret: 1 to {MAX_SECRET_LEN} bytes")));
        }
        s => s.map(String::into_bytes),
    };
    Ok(WebhookRecord {
        id: crate::store::random_id(),
        url: parsed.to_string(),
        events,
        label_selector,
        secret,
        created_at: hyperfleet_types::timestamp::now(),
    })
}

impl<H: Host> Service<H> {
    pub(crate) async fn create_webhook(&self, req: CreateWebhook) -> Result<Webhook> {
        let rec = validate(req)?;
        let mut tx = self.store.write().await?;
        let stored = records::insert(&mut tx, &rec).await?;
        tx.commit().await?;
        info!(webhook = %stored.id, url = %stored.url, events = ?stored.events, "webhook created");
        Ok(stored.to_wire())
    }

    pub(crate) async fn list_webhooks(&self) -> Result<WebhookList> {
        let all = records::list(&mut *self.store.read().await?).await?;
        Ok(WebhookList { webhooks: all.iter().map(WebhookRecord::to_wire).collect() })
    }

    pub(crate) async fn get_webhook(&self, id: &str) -> Result<Webhook> {
        let rec = records::get(&mut *self.store.read().await?, id).await?;
        rec.map(|r| r.to_wire()).ok_or_else(|| Error::WebhookNotFound(id.to_string()))
    }

    /// Deletes a webhook with its deliveries (pending ones are not sent).
    pub(crate) async fn delete_webhook(&self, id: &str) -> Result<()> {
        let mut tx = self.store.write().await?;
        let deleted = records::delete(&mut tx, id).await?;
        tx.commit().await?;
        if deleted {
            info!(webhook = %id, "webhook deleted");
            Ok(())
        } else {
            Err(Error::WebhookNotFound(id.to_string()))
        }
    }

    /// A page of a webhook's deliveries, most recent first: those with ids below `before`, `limit` at most.
    pub(crate) async fn webhook_deliveries(
        &self,
        id: &str,
        before: Option<u64>,
        limit: Option<u32>,
    ) -> Result<WebhookDeliveryList> {
        let limit = limit.unwrap_or(50);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(Error::Invalid(format!("limit: 1 to {MAX_PAGE}")));
        }
        let mut c = self.store.read().await?;
        if records::get(&mut c, id).await?.is_none() {
            return Err(Error::WebhookNotFound(id.to_string()));
        }
        // One more than asked, to know whether an older page exists.
        let page = records::deliveries(&mut c, id, before, limit + 1).await?;
        drop(c);
        let mut deliveries = page;
        let more = deliveries.len() > usize::try_from(limit).unwrap_or(usize::MAX);
        deliveries.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let next_before = if more { deliveries.last().map(|d| d.id) } else { None };
        Ok(WebhookDeliveryList { deliveries, next_before })
    }

    /// The delivery worker: runs for the daemon's life. Sends what is due (pending deliveries left by an
    /// earlier run included), at most [`CONCURRENCY`] at once, and sleeps until the next is due or an event
    /// queues more.
    pub(crate) async fn run_webhooks(self: Arc<Self>) {
        let policy = self.policy.webhooks.clone();
        let client = match reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(policy.timeout)
            .user_agent(concat!("hyperfleet-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "webhooks: no HTTP client; deliveries stay pending");
                return;
            }
        };
        let slots = Arc::new(Semaphore::new(CONCURRENCY));
        let wake = self.events.deliveries.clone();
        // A claimed delivery is not taken again until this long after its attempt began (a daemon killed
        // mid-attempt sends it again once this runs out).
        let lease_ms = i64::try_from(policy.timeout.as_millis()).unwrap_or(i64::MAX).saturating_add(5_000);
        loop {
            let free = slots.available_permits();
            let mut failed = false;
            if free > 0 {
                let now = records::now_ms();
                let claimed = async {
                    let mut tx = self.store.write().await?;
                    let due = records::claim_due(&mut tx, now, now.saturating_add(lease_ms), free).await?;
                    tx.commit().await?;
                    Ok::<_, crate::store::StoreError>(due)
                };
                match claimed.await {
                    Ok(due) => {
                        for d in due {
                            let Ok(permit) = slots.clone().acquire_owned().await else { return };
                            let (svc, client, policy, wake) =
                                (self.clone(), client.clone(), policy.clone(), wake.clone());
                            tokio::spawn(async move {
                                svc.deliver(&client, &policy, d).await;
                                drop(permit);
                                wake.notify_one();
                            });
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "webhooks: could not read due deliveries");
                        failed = true;
                    }
                }
            }
            let wait = if failed {
                Duration::from_secs(1)
            } else if slots.available_permits() == 0 {
                // A finishing delivery wakes this.
                IDLE_WAIT
            } else {
                let next = async { records::next_due(&mut *self.store.read().await?).await };
                match next.await {
                    Ok(Some(at)) => {
                        Duration::from_millis(u64::try_from(at.saturating_sub(records::now_ms())).unwrap_or(0))
                    }
                    Ok(None) => IDLE_WAIT,
                    Err(e) => {
                        warn!(error = %e, "webhooks: could not read the next due delivery");
                        Duration::from_secs(1)
                    }
                }
            };
            if wait.is_zero() {
                continue;
            }
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(wait.min(IDLE_WAIT)) => {}
            }
        }
    }

    /// One attempt of `d`, recorded.
    async fn deliver(&self, client: &reqwest::Client, policy: &WebhookPolicy, d: DueDelivery) {
        let attempt = d.attempts.saturating_add(1);
        let payload = WebhookPayload {
            webhook_id: d.webhook_id.clone(),
            delivery_id: d.id,
            attempt,
            event_type: event_name(d.event.kind),
            event: d.event,
        };
        let outcome = match serde_json::to_vec(&payload) {
            Err(e) => Outcome::Failed { status_code: None, error: format!("encoding the event: {e}") },
            Ok(body) => {
                let mut req = client
                    .post(&d.url)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .header("X-Hyperfleet-Delivery", d.id.to_string())
                    .header("X-Hyperfleet-Event", payload.event_type.as_str());
                if let Some(secret) = &d.secret {
                    req = req.header("X-Hyperfleet-Signature", signature(secret, &body));
                }
                let (code, error) = match req.body(body).send().await {
                    Ok(resp) if resp.status().is_success() => (Some(resp.status().as_u16()), None),
                    Ok(resp) => {
                        (Some(resp.status().as_u16()), Some(format!("the receiver answered {}", resp.status())))
                    }
                    Err(e) => (None, Some(describe(&e))),
                };
                match (code, error) {
                    (Some(status_code), None) => Outcome::Delivered { status_code },
                    (status_code, Some(error)) if attempt < policy.max_attempts => {
                        let wait = i64::try_from(backoff(policy.retry_base, attempt).as_millis()).unwrap_or(i64::MAX);
                        Outcome::Retry { status_code, error, next_ms: records::now_ms().saturating_add(wait) }
                    }
                    (status_code, error) => {
                        Outcome::Failed { status_code, error: error.unwrap_or_else(|| "no answer".into()) }
                    }
                }
            }
        };
        match &outcome {
            Outcome::Delivered { .. } => {
                tracing::debug!(delivery = d.id, webhook = %d.webhook_id, attempt, "webhook delivered")
            }
            Outcome::Retry { error, .. } => {
                info!(delivery = d.id, webhook = %d.webhook_id, attempt, %error, "webhook delivery failed; will retry")
            }
            Outcome::Failed { error, .. } => {
                warn!(delivery = d.id, webhook = %d.webhook_id, attempt, %error, "webhook delivery failed for good")
            }
        }
        let id = d.id;
        let recorded = async {
            let mut tx = self.store.write().await?;
            records::record_attempt(&mut tx, id, attempt, &outcome).await?;
            tx.commit().await
        };
        if let Err(e) = recorded.await {
            warn!(delivery = id, error = %e, "webhooks: could not record an attempt");
        }
    }
}

/// A send error in a few words (without the URL, which the delivery's webhook shows).
fn describe(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_redirect() {
        "redirected (redirects are not followed)"
    } else {
        "request failed"
    };
    let mut cause = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    if cause.is_empty() { what.to_string() } else { format!("{what}: {cause}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_in_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_ne!(
            signature(b"Jefe", b"what do ya want for nothing!"),
            signature(b"Jefe", b"what do ya want for nothing?")
        );
    }

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        let s = Duration::from_secs;
        assert_eq!((1..=5).map(|a| backoff(s(1), a)).collect::<Vec<_>>(), [s(1), s(2), s(4), s(8), s(16)]);
        assert_eq!(backoff(s(1), 11), MAX_BACKOFF);
        assert_eq!(backoff(s(1), 400), MAX_BACKOFF);
        assert_eq!(backoff(Duration::from_millis(50), 3), Duration::from_millis(200));
        // The defaults (1 s, 13 attempts) give up after about 47 minutes.
        let total: Duration = (1..13).map(|a| backoff(s(1), a)).sum();
        assert!(total > s(40 * 60) && total < s(60 * 60), "{total:?}");
    }

    fn req(url: &str, events: &[&str]) -> CreateWebhook {
        CreateWebhook {
            url: Some(url.into()),
            events: Some(events.iter().map(|e| (*e).to_string()).collect()),
            label_selector: None,
            secret: None,
        }
    }

    #[test]
    fn requests_are_validated() {
        let ok = validate(req("http://127.0.0.1:8080/hook", &["machine.running", "machine.running"])).unwrap();
        assert_eq!(ok.events, ["machine.running"]);
        assert!(event_names().any(|n| n == "machine.exec.finished"));
        let bad = |r: CreateWebhook| match validate(r) {
            Err(Error::Invalid(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(bad(req("ftp://x/y", &["machine.running"])).contains("http or https"));
        assert!(bad(req("not a url", &["machine.running"])).starts_with("url:"));
        assert!(bad(req(&format!("http://x/{}", "a".repeat(3000)), &["machine.running"])).contains("2048"));
        assert!(bad(req("http://x/", &[])).starts_with("events"));
        assert!(bad(req("http://x/", &["running"])).contains("'running'"));
        let mut r = req("http://x/", &["machine.failed"]);
        r.label_selector = Some("bad key=1".into());
        assert!(bad(r).starts_with("label_selector"));
        let mut r = req("http://x/", &["machine.failed"]);
        r.secret = Some(String::new());
        assert!(bad(r).starts_with("secret"));
        let CreateWebhook { url, events, .. } = req("http://x/", &["machine.failed"]);
        assert!(bad(CreateWebhook { url: None, events, label_selector: None, secret: None }).contains("url"));
        assert!(bad(CreateWebhook { url, events: None, label_selector: None, secret: None }).contains("events"));
    }
}
