//! What an operator watches: the event stream (lifecycle in order, filters, resume with Last-Event-ID across
//! a daemon restart), Prometheus metrics scraped and parsed after real operations, a running container's
//! stats, and JSON logs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Daemon, Options, machine, running, sh};
use futures::{Stream, StreamExt};
use hyperfleet_client::types::*;

/// The next event of `machine` from `events`, within 30 s.
async fn next_of(events: &mut (impl Stream<Item = hyperfleet_client::Result<Event>> + Unpin), machine: &str) -> Event {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(30), events.next())
            .await
            .expect("no event within 30 s")
            .expect("the stream ended")
            .unwrap();
        if e.machine_id == machine {
            return e;
        }
    }
}

fn kinds(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind.as_str()).collect()
}

#[ignore = "needs root: runc container on a veth, nftables"]
#[tokio::test]
async fn events_follow_a_lifecycle_in_order_filter_and_resume_across_a_restart() {
    let mut d = Daemon::start(Options::default()).await;
    let all = d.client.events(None, &[], None).await.unwrap();
    let mut all = Box::pin(all);
    let only = d.client.events(Some("watched"), &[EventKind::Running, EventKind::Stopped], None).await.unwrap();
    let mut only = Box::pin(only);
    let other = d.client.create_machine(&machine("bystander")).await.unwrap();

    let m = running(&d, machine("watched")).await;
    assert_eq!(sh(&d, &m.id, "true").await.0, 0);
    d.client.upload_file(&m.id, "/root/note.txt", b"hello", None).await.unwrap();
    d.client.stop_machine(&m.id).await.unwrap();

    let mut seen = vec![next_of(&mut all, &m.id).await];
    while seen.last().unwrap().kind != EventKind::Stopped {
        seen.push(next_of(&mut all, &m.id).await);
    }
    assert_eq!(
        kinds(&seen),
        ["created", "starting", "running", "exec.started", "exec.finished", "file.written", "stopping", "stopped"]
    );
    assert!(seen.windows(2).all(|w| w[0].id < w[1].id), "ids grow: {seen:?}");
    assert_eq!(seen[3].program.as_deref(), Some("sh"), "the program, never its arguments");
    assert_eq!((seen[4].exit_code, seen[5].path.as_deref()), (Some(0), Some("/root/note.txt")));
    assert_eq!(seen[2].status, Some(MachineStatus::Running));

    // The filtered stream: only this machine's running and stopped, nothing of the bystander.
    let a = next_of(&mut only, &m.id).await;
    let b = next_of(&mut only, &m.id).await;
    assert_eq!((a.kind, b.kind, a.id, b.id), (EventKind::Running, EventKind::Stopped, seen[2].id, seen[7].id));

    // A client that saw up to `running` comes back after a daemon restart and gets exactly what it missed.
    drop(all);
    drop(only);
    d.stop();
    d.spawn().await;
    let resumed = d.client.events(None, &[], Some(seen[2].id)).await.unwrap();
    let mut resumed = Box::pin(resumed);
    let mut missed = vec![];
    for _ in 0..5 {
        missed.push(next_of(&mut resumed, &m.id).await);
    }
    assert_eq!(missed, seen[3..].to_vec(), "the stored backlog since Last-Event-ID, exactly");
    // And the stream goes on live after the backlog.
    d.client.delete_machine(&m.id, false).await.unwrap();
    let deleted = next_of(&mut resumed, &m.id).await;
    assert_eq!((deleted.kind, deleted.status), (EventKind::Deleted, None));
    assert!(deleted.id > seen[7].id);

    // ?follow=false: the stored events of this machine, then the end of the stream.
    let stored =
        d.client.raw(reqwest::Method::GET, &format!("/events?follow=false&machine={}", m.id)).send().await.unwrap();
    let body = tokio::time::timeout(Duration::from_secs(10), stored.text()).await.expect("a finite stream").unwrap();
    assert_eq!(body.lines().filter(|l| l.starts_with("event:")).count(), 9, "{body}");

    // Bad filters are a 400 with the envelope.
    let bad = d.client.raw(reqwest::Method::GET, "/events?type=exploded").send().await.unwrap();
    assert_eq!(bad.status(), 400);
    let body: ErrorBody = bad.json().await.unwrap();
    assert_eq!(body.error.code, "VALIDATION_ERROR");
    let bad = d.client.raw(reqwest::Method::GET, "/events").header("last-event-id", "x1").send().await.unwrap();
    assert_eq!(bad.status(), 400);
    d.client.delete_machine(&other.id, false).await.unwrap();
}

fn scrape_text(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("the exposition parses")
}

fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples.iter().find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v))).map(|x| {
        match &x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            _ => f64::NAN,
        }
    })
}

async fn scrape(d: &Daemon, bearer: &str) -> (u16, String) {
    let resp = reqwest::Client::new().get(format!("{}/metrics", d.url())).bearer_auth(bearer).send().await.unwrap();
    let status = resp.status().as_u16();
    if status == 200 {
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    }
    (status, resp.text().await.unwrap())
}

#[ignore = "needs root: runc container on a veth, nftables"]
#[tokio::test]
async fn metrics_count_what_happened_and_parse() {
    let token = "scrape-token-for-the-test-0123";
    let opts = Options { env: vec![("HYPERFLEET_METRICS_TOKEN".into(), token.into())], ..Options::default() };
    let d = Daemon::start(opts).await;
    let (status, before) = scrape(&d, token).await;
    assert_eq!(status, 200, "{before}");
    let before = scrape_text(&before);
    let running_containers = [("status", "running"), ("runtime", "container")];
    assert_eq!(value(&before, "hyperfleet_machines", &running_containers), Some(0.0));

    let m = running(&d, machine("measured")).await;
    for _ in 0..3 {
        d.client.get_machine(&m.id).await.unwrap();
    }
    assert_eq!(sh(&d, &m.id, "head -c 20000000 /dev/zero > /tmp/fill; sleep 0.2; echo done").await.0, 0);
    let key_text = {
        // A key with metrics:read works as well as the token; one without it is refused.
        let reader = d
            .client
            .create_api_key(&CreateApiKey { name: "prom".into(), scopes: vec![Scope::MetricsRead], expires_at: None })
            .await
            .unwrap();
        let other = d
            .client
            .create_api_key(&CreateApiKey { name: "ro".into(), scopes: vec![Scope::MachinesRead], expires_at: None })
            .await
            .unwrap();
        assert_eq!(scrape(&d, &other.key).await.0, 403);
        assert_eq!(
            d.client_with(&reader.key).get_machine(&m.id).await.unwrap_err().status(),
            Some(403),
            "metrics:read only"
        );
        let (status, text) = scrape(&d, &reader.key).await;
        assert_eq!(status, 200);
        text
    };
    let after = scrape_text(&key_text);
    assert_eq!(value(&after, "hyperfleet_machines", &running_containers), Some(1.0), "{key_text}");
    assert_eq!(value(&after, "hyperfleet_ipam_blocks", &[("state", "used")]), Some(1.0));
    let gets = [("method", "GET"), ("route", "/machines/:id"), ("status", "200")];
    assert!(value(&after, "hyperfleet_api_requests_total", &gets).unwrap() >= 3.0, "{key_text}");
    let unmatched_before = value(&after, "hyperfleet_api_requests_total", &[("route", "unmatched")]).unwrap_or(0.0);
    let start_ok = [("operation", "start"), ("result", "ok")];
    assert_eq!(value(&after, "hyperfleet_machine_operation_duration_seconds", &start_ok), Some(1.0));
    let exec_ok = [("operation", "exec"), ("result", "ok")];
    assert_eq!(value(&after, "hyperfleet_machine_operation_duration_seconds", &exec_ok), Some(1.0));
    let mine = [("machine_id", m.id.as_str()), ("machine_name", "measured")];
    let memory = value(&after, "hyperfleet_machine_memory_bytes", &mine).expect("the running machine's memory");
    assert!(memory > 1_000_000.0, "a guest that wrote 20 MB to its tmpfs uses memory: {memory}");
    assert!(value(&after, "hyperfleet_machine_cpu_seconds_total", &mine).unwrap() > 0.0);
    assert!(value(&after, "hyperfleet_open_connections", &[("listener", "api")]).unwrap() >= 1.0);

    // A 404 counts as unmatched, not as a new route; a stopped machine's own series are gone.
    let _ = d.client.raw(reqwest::Method::GET, "/no/such/route/123").send().await.unwrap();
    d.client.stop_machine(&m.id).await.unwrap();
    let (_, text) = scrape(&d, token).await;
    let last = scrape_text(&text);
    assert_eq!(value(&last, "hyperfleet_api_requests_total", &[("route", "unmatched")]), Some(unmatched_before + 1.0));
    assert!(!text.contains("/no/such/route"), "raw paths never become labels");
    assert_eq!(value(&last, "hyperfleet_machine_memory_bytes", &mine), None, "{text}");
    assert_eq!(value(&last, "hyperfleet_machines", &[("status", "stopped"), ("runtime", "container")]), Some(1.0));
    let stop_ok = [("operation", "stop"), ("result", "ok")];
    assert_eq!(value(&last, "hyperfleet_machine_operation_duration_seconds", &stop_ok), Some(1.0));
    d.client.delete_machine(&m.id, false).await.unwrap();
}

#[ignore = "needs root: runc container on a veth, nftables"]
#[tokio::test]
async fn stats_show_cpu_memory_and_network_of_a_running_container() {
    let d = Daemon::start(Options::default()).await;
    let m = running(&d, machine("busy")).await;
    let quiet = d.client.machine_stats(&m.id).await.unwrap();
    assert_eq!(quiet.status, MachineStatus::Running);
    assert!(quiet.disk_size_bytes.unwrap() > 0 && quiet.disk_used_bytes.is_some(), "{quiet:?}");
    assert_eq!(quiet.memory_limit_bytes, Some(128 << 20), "the container's cgroup limit");
    assert!(quiet.uptime_seconds.unwrap() >= 0.0);

    // A busy exec and some memory, then the stats show CPU time and a CPU share since the last reading.
    let script = "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; head -c 16000000 /dev/zero > /tmp/m";
    assert_eq!(sh(&d, &m.id, script).await.0, 0);
    let busy = d.client.machine_stats(&m.id).await.unwrap();
    assert!(busy.cpu_seconds.unwrap() > quiet.cpu_seconds.unwrap_or(0.0) + 0.1, "{quiet:?} -> {busy:?}");
    assert!(busy.cpu_percent.unwrap() > 1.0, "{busy:?}");
    assert!(busy.memory_used_bytes.unwrap() > 8_000_000, "{busy:?}");

    // Traffic with the guest: its gateway answers ping, so the guest both sends and receives.
    let gw = m.tap_ip;
    let (code, out, err) = sh(&d, &m.id, &format!("ping -c 5 -i 0.2 -s 1000 {gw}")).await;
    assert_eq!(code, 0, "{out}{err}");
    let after = d.client.machine_stats(&m.id).await.unwrap();
    assert!(after.network_tx_bytes.unwrap() >= busy.network_tx_bytes.unwrap_or(0) + 5000, "{busy:?} -> {after:?}");
    assert!(after.network_rx_bytes.unwrap() >= busy.network_rx_bytes.unwrap_or(0) + 5000, "{busy:?} -> {after:?}");

    d.client.stop_machine(&m.id).await.unwrap();
    let stopped = d.client.machine_stats(&m.id).await.unwrap();
    assert_eq!((stopped.cpu_seconds, stopped.memory_used_bytes), (None, None));
    assert!(stopped.disk_size_bytes.is_some());
    let missing = d.client.machine_stats("nosuchmachine").await.unwrap_err();
    assert_eq!(missing.status(), Some(404));
    d.client.delete_machine(&m.id, false).await.unwrap();
}

#[ignore = "needs root: the daemon prepares host networking at start"]
#[tokio::test]
async fn json_logs_are_one_object_per_line_with_one_line_per_request() {
    let opts = Options { env: vec![("HYPERFLEET_LOG_FORMAT".into(), "json".into())], ..Options::default() };
    let d = Daemon::start(opts).await;
    let m = d.client.create_machine(&machine("logged")).await.unwrap();
    for _ in 0..5 {
        d.client.get_machine(&m.id).await.unwrap();
        d.client.health().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = d.logs();
    let lines: Vec<serde_json::Value> =
        logs.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    let requests: Vec<&serde_json::Value> = lines.iter().filter(|l| l["target"] == "hyperfleet::request").collect();
    let gets = requests.iter().filter(|l| l["path"] == format!("/machines/{}", m.id)).count();
    assert_eq!(gets, 5, "one line per request: {requests:?}");
    assert!(requests.iter().all(|l| l["path"] != "/health"), "health checks log at debug");
    let one = requests.iter().find(|l| l["method"] == "POST").unwrap();
    assert_eq!(one["status"], 201);
    assert!(one["correlation_id"].as_str().unwrap().starts_with("req_"));
    d.client.delete_machine(&m.id, false).await.unwrap();
}
