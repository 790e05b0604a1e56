//! Webhooks against the real daemon: a receiver started here on 127.0.0.1 (the only address these tests
//! send to) gets signed deliveries of a machine's lifecycle, filtered by event and label; a failing receiver
//! gets retries; a delivery pending when the daemon is killed (-9) is delivered after its restart; bad
//! input is 400 and the `webhooks:admin` scope is enforced.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use common::{Daemon, Options, machine, running};
use hmac::{Hmac, Mac};
use hyperfleet_client::HttpMethod as Method;
use hyperfleet_client::types::*;
use sha2::Sha256;

const SECRET: &str = "receiver-shared-secret";

#[derive(Debug, Clone)]
struct Received {
    path: String,
    signature: Option<String>,
    delivery_header: Option<String>,
    body: Vec<u8>,
    answered: u16,
}

impl Received {
    fn payload(&self) -> WebhookPayload {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A webhook receiver on loopback: records every request; answers 500 while `failures` is above 0
/// (counting it down), else 200.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    failures: Arc<AtomicU32>,
}

impl Receiver {
    async fn start() -> (String, Self) {
        let r = Self::default();
        let app = axum::Router::new().fallback(receive).with_state(r.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}"), r)
    }

    fn at(&self, path: &str) -> Vec<Received> {
        self.got.lock().unwrap().iter().filter(|r| r.path == path).cloned().collect()
    }
}

async fn receive(State(r): State<Receiver>, uri: Uri, headers: HeaderMap, body: Bytes) -> StatusCode {
    let fail = r.failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
    let status = if fail { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::OK };
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_string());
    r.got.lock().unwrap().push(Received {
        path: uri.path().to_string(),
        signature: header("x-hyperfleet-signature"),
        delivery_header: header("x-hyperfleet-delivery"),
        body: body.to_vec(),
        answered: status.as_u16(),
    });
    status
}

/// What a receiver does: HMAC-SHA256 of the exact body under the shared secret, compared in constant time.
fn verifies(secret: &str, body: &[u8], header: &str) -> bool {
    let Some(hex) = header.strip_prefix("sha256=") else { return false };
    let Ok(sig) =
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16)).collect::<Result<Vec<u8>, _>>()
    else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// Polls `f` until it gives a value, for at most 30 s.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn hook(url: String, events: &[&str], selector: Option<&str>, secret: Option<&str>) -> CreateWebhook {
    CreateWebhook {
        url: Some(url),
        events: Some(events.iter().map(|e| (*e).to_string()).collect()),
        label_selector: selector.map(str::to_string),
        secret: secret.map(str::to_string),
    }
}

fn labelled(name: &str, team: &str) -> CreateMachine {
    CreateMachine { labels: Some(BTreeMap::from([("team".to_string(), team.to_string())])), ..machine(name) }
}

#[ignore = "needs root: runc container machines"]
#[tokio::test]
async fn signed_deliveries_of_a_lifecycle_filtered_by_event_and_label() {
    let d = Daemon::start(Options::default()).await;
    let (url, rx) = Receiver::start().await;
    let lifecycle = ["machine.running", "machine.stopped", "machine.deleted"];
    let a =
        d.client.create_webhook(&hook(format!("{url}/a"), &lifecycle, Some("team=ml"), Some(SECRET))).await.unwrap();
    assert!(a.has_secret);
    assert_eq!(a.events, lifecycle);
    let raw = d.client.raw(Method::GET, &format!("/webhooks/{}", a.id)).send().await.unwrap().text().await.unwrap();
    assert!(raw.contains("\"has_secret\":true") && !raw.contains(SECRET), "the secret is write-only: {raw}");
    let b = d.client.create_webhook(&hook(format!("{url}/b"), &["machine.created"], None, None)).await.unwrap();
    assert!(!b.has_secret);
    assert_eq!(d.client.list_webhooks().await.unwrap().webhooks.len(), 2);

    let ml = running(&d, labelled("wh-ml", "ml")).await;
    let web = d.client.create_machine(&labelled("wh-web", "web")).await.unwrap();
    d.client.stop_machine(&ml.id).await.unwrap();
    d.client.delete_machine(&ml.id, false).await.unwrap();
    d.client.delete_machine(&web.id, false).await.unwrap();

    let got_a = eventually("3 deliveries at /a", || async { Some(rx.at("/a")).filter(|g| g.len() >= 3) }).await;
    let got_b = eventually("2 deliveries at /b", || async { Some(rx.at("/b")).filter(|g| g.len() >= 2) }).await;
    // Nothing else is on its way: a machine's events are queued with the event itself.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!((rx.at("/a").len(), rx.at("/b").len()), (3, 2));

    let mut payloads: Vec<WebhookPayload> = got_a
        .iter()
        .map(|r| {
            let sig = r.signature.as_deref().expect("a webhook with a secret signs");
            assert!(verifies(SECRET, &r.body, sig), "signature {sig} does not verify");
            assert!(!verifies("another secret", &r.body, sig));
            let p = r.payload();
            assert_eq!(r.delivery_header.as_deref(), Some(p.delivery_id.to_string().as_str()));
            p
        })
        .collect();
    payloads.sort_by_key(|p| p.event.id);
    assert_eq!(payloads.iter().map(|p| p.event_type.as_str()).collect::<Vec<_>>(), lifecycle);
    for p in &payloads {
        assert_eq!((p.webhook_id.as_str(), p.event.machine_id.as_str(), p.attempt), (a.id.as_str(), ml.id.as_str(), 1));
        assert_eq!(p.event_type, format!("machine.{}", p.event.kind.as_str()));
    }
    assert_eq!(payloads[0].event.status, Some(MachineStatus::Running));

    let mut created: Vec<String> = got_b
        .iter()
        .map(|r| {
            assert_eq!(r.signature, None, "no secret, no signature");
            let p = r.payload();
            assert_eq!(p.event_type, "machine.created");
            p.event.machine_id
        })
        .collect();
    created.sort();
    let mut want = vec![ml.id.clone(), web.id.clone()];
    want.sort();
    assert_eq!(created, want);

    // Every delivery is stored: most recent first, delivered on the first attempt.
    let list = d.client.webhook_deliveries(&a.id, None, None).await.unwrap();
    assert_eq!(list.deliveries.len(), 3);
    assert_eq!(list.next_before, None);
    assert!(list.deliveries.windows(2).all(|w| w[0].id > w[1].id), "most recent first");
    for del in &list.deliveries {
        assert_eq!((del.status, del.attempts, del.last_status_code), (DeliveryStatus::Delivered, 1, Some(200)));
        assert_eq!(del.machine_id, ml.id);
    }
    let first = d.client.webhook_deliveries(&a.id, None, Some(2)).await.unwrap();
    assert_eq!(first.deliveries.len(), 2);
    let rest = d.client.webhook_deliveries(&a.id, first.next_before, Some(2)).await.unwrap();
    assert_eq!(rest.deliveries.iter().map(|x| x.id).collect::<Vec<_>>(), [list.deliveries[2].id]);
    assert_eq!(rest.next_before, None);

    d.client.delete_webhook(&b.id).await.unwrap();
    assert_eq!(d.client.get_webhook(&b.id).await.unwrap_err().status(), Some(404));
    assert_eq!(d.client.list_webhooks().await.unwrap().webhooks.iter().map(|w| &w.id).collect::<Vec<_>>(), [&a.id]);
}

#[ignore = "needs root: runc container machines"]
#[tokio::test]
async fn failed_attempts_are_retried_and_a_pending_delivery_survives_a_kill9() {
    let env = [
        ("HYPERFLEET_WEBHOOK_RETRY_BASE_MS", "300"),
        ("HYPERFLEET_WEBHOOK_MAX_ATTEMPTS", "30"),
        ("HYPERFLEET_WEBHOOK_TIMEOUT", "2"),
    ];
    let mut d = Daemon::start(Options {
        env: env.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect(),
        ..Options::default()
    })
    .await;
    let (url, rx) = Receiver::start().await;
    let h = d.client.create_webhook(&hook(format!("{url}/r"), &["machine.created"], None, Some(SECRET))).await.unwrap();

    // 500, 500, then 200: three attempts of one delivery, each signed, the last one delivered.
    rx.failures.store(2, Ordering::SeqCst);
    let m = d.client.create_machine(&machine("wh-retry")).await.unwrap();
    let del = eventually("the delivery to be delivered", || async {
        let list = d.client.webhook_deliveries(&h.id, None, None).await.unwrap();
        list.deliveries.into_iter().find(|x| x.machine_id == m.id && x.status == DeliveryStatus::Delivered)
    })
    .await;
    assert_eq!((del.attempts, del.last_status_code, del.last_error.as_deref()), (3, Some(200), None));
    let got = rx.at("/r");
    assert_eq!(got.iter().map(|r| r.answered).collect::<Vec<_>>(), [500, 500, 200]);
    for (i, r) in got.iter().enumerate() {
        assert!(verifies(SECRET, &r.body, r.signature.as_deref().unwrap()));
        let p = r.payload();
        assert_eq!(
            (p.delivery_id, p.attempt, p.event.machine_id.as_str()),
            (del.id, u32::try_from(i).unwrap() + 1, m.id.as_str())
        );
    }

    // A receiver that keeps failing: the delivery is pending (retried with backoff) when the daemon dies.
    rx.failures.store(u32::MAX, Ordering::SeqCst);
    let m2 = d.client.create_machine(&machine("wh-crash")).await.unwrap();
    let pending = eventually("a failed attempt", || async {
        let list = d.client.webhook_deliveries(&h.id, None, None).await.unwrap();
        list.deliveries.into_iter().find(|x| x.machine_id == m2.id && x.attempts >= 1)
    })
    .await;
    assert_eq!(pending.status, DeliveryStatus::Pending);
    assert_eq!(pending.last_status_code, Some(500));
    assert!(pending.next_attempt_at.is_some());
    d.kill9();
    rx.failures.store(0, Ordering::SeqCst);
    let before = rx.at("/r").len();
    d.spawn().await;

    let done = eventually("the pending delivery after the restart", || async {
        let list = d.client.webhook_deliveries(&h.id, None, None).await.unwrap();
        list.deliveries.into_iter().find(|x| x.id == pending.id && x.status == DeliveryStatus::Delivered)
    })
    .await;
    assert!(done.attempts > pending.attempts, "{done:?}");
    let after = rx.at("/r");
    let last = after.last().unwrap();
    assert!(after.len() > before);
    assert_eq!(last.answered, 200);
    assert!(verifies(SECRET, &last.body, last.signature.as_deref().unwrap()));
    let p = last.payload();
    assert_eq!((p.delivery_id, p.attempt, p.event.machine_id.as_str()), (pending.id, done.attempts, m2.id.as_str()));
}

#[ignore = "needs root: the daemon's host networking"]
#[tokio::test]
async fn bad_input_is_400_and_webhooks_need_their_scope() {
    let d = Daemon::start(Options::default()).await;
    let ok_url = "http://127.0.0.1:9/hook";
    let cases = [
        (serde_json::json!({"url": "ftp://127.0.0.1/x", "events": ["machine.running"]}), "http or https"),
        (serde_json::json!({"url": "not a url", "events": ["machine.running"]}), "url"),
        (
            serde_json::json!({"url": format!("http://127.0.0.1/{}", "a".repeat(3000)), "events": ["machine.running"]}),
            "2048",
        ),
        (serde_json::json!({"url": ok_url, "events": ["running"]}), "'running'"),
        (serde_json::json!({"url": ok_url, "events": []}), "events"),
        (serde_json::json!({"events": ["machine.running"]}), "url"),
        (serde_json::json!({"url": ok_url}), "events"),
        (
            serde_json::json!({"url": ok_url, "events": ["machine.running"], "label_selector": "bad key=1"}),
            "label_selector",
        ),
        (serde_json::json!({"url": ok_url, "events": ["machine.running"], "secret": ""}), "secret"),
        (serde_json::json!({"url": ok_url, "events": ["machine.running"], "colour": 1}), "colour"),
        (serde_json::json!({"url": 5, "events": ["machine.running"]}), "url"),
    ];
    for (body, needle) in cases {
        let r = d.client.raw(Method::POST, "/webhooks").json(&body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 400, "{body}");
        let e: ErrorBody = r.json().await.unwrap();
        assert!(e.error.message.contains(needle), "{body}: {}", e.error.message);
    }
    assert!(d.client.list_webhooks().await.unwrap().webhooks.is_empty());
    for (m, p) in [
        (Method::GET, "/webhooks/nope"),
        (Method::DELETE, "/webhooks/nope"),
        (Method::GET, "/webhooks/nope/deliveries"),
    ] {
        let r = d.client.raw(m.clone(), p).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 404, "{m} {p}");
        assert_eq!(r.json::<ErrorBody>().await.unwrap().error.code, "NOT_FOUND");
    }
    let h = d.client.create_webhook(&hook(ok_url.into(), &["machine.failed"], None, None)).await.unwrap();
    for q in ["limit=0", "limit=101", "before=abc", "before=0"] {
        let r = d.client.raw(Method::GET, &format!("/webhooks/{}/deliveries?{q}", h.id)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 400, "{q}");
    }

    // Every scope but webhooks:admin: 403 on every webhook route, and it cannot grant webhooks:admin.
    let others = [Scope::MachinesRead, Scope::MachinesWrite, Scope::MachinesExec, Scope::KeysAdmin, Scope::MetricsRead];
    let created = d
        .client
        .create_api_key(&CreateApiKey { name: "ops".into(), scopes: others.to_vec(), expires_at: None })
        .await
        .unwrap();
    let ops = d.client_with(&created.key);
    assert_eq!(ops.list_webhooks().await.unwrap_err().status(), Some(403));
    assert_eq!(ops.get_webhook(&h.id).await.unwrap_err().status(), Some(403));
    assert_eq!(ops.webhook_deliveries(&h.id, None, None).await.unwrap_err().status(), Some(403));
    assert_eq!(ops.delete_webhook(&h.id).await.unwrap_err().status(), Some(403));
    let e = ops.create_webhook(&hook(ok_url.into(), &["machine.failed"], None, None)).await.unwrap_err();
    assert_eq!(e.status(), Some(403));
    let grant = CreateApiKey { name: "hooks".into(), scopes: vec![Scope::WebhooksAdmin], expires_at: None };
    assert_eq!(ops.create_api_key(&grant).await.unwrap_err().status(), Some(403));

    // webhooks:admin alone: the webhook routes and nothing else.
    let hooks = d.client_with(&d.client.create_api_key(&grant).await.unwrap().key);
    assert_eq!(hooks.list_webhooks().await.unwrap().webhooks.len(), 1);
    assert_eq!(hooks.list_machines(&Default::default()).await.unwrap_err().status(), Some(403));
    hooks.delete_webhook(&h.id).await.unwrap();
    assert!(d.client.list_webhooks().await.unwrap().webhooks.is_empty());
}
