//! The REST API end to end against the real daemon (container runtime): every endpoint, the error codes,
//! pagination and filters, the auth matrix, concurrent starts, and a daemon restart keeping machines and keys.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Daemon, Options, machine, running};
use hyperfleet_client::types::*;
use hyperfleet_client::{Client, HttpMethod as Method, HttpStatus, ListOptions};
use serde_json::json;

async fn raw(c: &Client, method: Method, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
    let mut rb = c.raw(method, path);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

fn err(v: &serde_json::Value) -> (&str, &str) {
    (v["error"]["code"].as_str().unwrap_or("?"), v["error"]["message"].as_str().unwrap_or("?"))
}

#[ignore = "needs root: the daemon's nftables table and runc containers on veths"]
#[tokio::test]
async fn machine_crud_errors_and_pagination() {
    let d = Daemon::start(Options::default()).await;
    let c = &d.client;

    // Health and docs are public.
    let anon = Client::new(&d.url(), None);
    let h = anon.health().await.unwrap();
    assert_eq!((h.status.as_str(), h.database.as_str(), h.default_runtime), ("ok", "ok", RuntimeKind::Container));
    let (s, doc) = raw(&anon, Method::GET, "/docs/json", None).await;
    assert_eq!(s, 200);
    assert!(doc["paths"]["/machines/{id}/exec"]["post"].is_object());
    let page = anon.raw(Method::GET, "/docs/").send().await.unwrap();
    assert_eq!(page.status(), HttpStatus::OK);
    assert!(page.text().await.unwrap().contains("swagger"), "the reference page is served");

    // Create: 201 with network fields from the first block.
    let (s, m) = raw(
        c,
        Method::POST,
        "/machines",
        Some(json!({"name": "alpha", "vcpu_count": 1, "mem_size_mib": 64, "exposed_ports": [80]})),
    )
    .await;
    assert_eq!(s, 201, "{m}");
    assert_eq!(m["status"], "pending");
    assert_eq!(m["tap_device"], format!("{}0", d.tap_prefix));
    let net: ipnet::Ipv4Net = d.subnet.parse().unwrap();
    let base = u32::from(net.network());
    assert_eq!(m["tap_ip"], std::net::Ipv4Addr::from(base + 1).to_string());
    assert_eq!(m["guest_ip"], std::net::Ipv4Addr::from(base + 2).to_string());
    assert_eq!(m["guest_mac"], "AA:FC:00:00:00:01");
    assert_eq!(m["network"]["gateway"], m["tap_ip"]);
    assert_eq!(m["network"]["dns"], json!(["10.200.255.53"]));
    assert_eq!(m["network"]["egress"], "allow");
    assert!(m["created_at"].as_str().unwrap().ends_with('Z'));
    let alpha = m["id"].as_str().unwrap().to_string();

    // Validation, with the documented messages and the field named.
    for (body, code, needle) in [
        (json!({"vcpu_count": 1, "mem_size_mib": 64}), "VALIDATION_ERROR", "name is required"),
        (
            json!({"name": "b", "vcpu_count": 0, "mem_size_mib": 64}),
            "VALIDATION_ERROR",
            "vcpu_count must be at least 1",
        ),
        (json!({"name": "b", "vcpu_count": 1}), "VALIDATION_ERROR", "mem_size_mib is required"),
        (json!({"name": "b", "vcpu_count": "one", "mem_size_mib": 64}), "VALIDATION_ERROR", "vcpu_count: invalid type"),
        (
            json!({"name": "b", "vcpu_count": 1, "mem_size_mib": 64, "colour": "red"}),
            "VALIDATION_ERROR",
            "unknown field `colour`",
        ),
        (
            json!({"name": "b", "vcpu_count": 1, "mem_size_mib": 64, "exposed_ports": [0]}),
            "VALIDATION_ERROR",
            "0 is not a port",
        ),
        (
            json!({"name": "b", "vcpu_count": 1, "mem_size_mib": 64, "kernel_image_path": "/etc/passwd"}),
            "VALIDATION_ERROR",
            "inside the assets directory",
        ),
        (
            json!({"name": "b", "vcpu_count": 1, "mem_size_mib": 64, "rootfs_path": "/nonexistent.ext4"}),
            "VALIDATION_ERROR",
            "rootfs_path does not exist",
        ),
        (json!({"name": "B B", "vcpu_count": 1, "mem_size_mib": 64}), "VALIDATION_ERROR", "name 'B B' is invalid"),
        (
            json!({"name": "b", "vcpu_count": 1, "mem_size_mib": 64, "network": {"egress": "sometimes"}}),
            "VALIDATION_ERROR",
            "network.egress",
        ),
        (json!({"name": "alpha", "vcpu_count": 1, "mem_size_mib": 64}), "CONFLICT", "already exists"),
    ] {
        let (s, e) = raw(c, Method::POST, "/machines", Some(body.clone())).await;
        let (ecode, msg) = err(&e);
        assert_eq!(ecode, code, "{body} -> {e}");
        assert_eq!(s, if code == "CONFLICT" { 409 } else { 400 });
        assert!(msg.contains(needle), "{body}: '{msg}' lacks '{needle}'");
    }
    let resp = c.raw(Method::POST, "/machines").body("{not json").send().await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(err(&resp.json().await.unwrap()).0, "VALIDATION_ERROR");

    // Get by id or name; unknown: 404 with the documented message.
    assert_eq!(c.get_machine("alpha").await.unwrap().id, alpha);
    let (s, e) = raw(c, Method::GET, "/machines/nope", None).await;
    assert_eq!((s, err(&e)), (404, ("NOT_FOUND", "Machine with id 'nope' not found")));
    // Unknown route and wrong method keep the envelope.
    let (s, e) = raw(c, Method::GET, "/nowhere", None).await;
    assert_eq!((s, err(&e).0), (404, "NOT_FOUND"));
    let (s, e) = raw(c, Method::PUT, "/machines", None).await;
    assert_eq!((s, err(&e).0), (405, "METHOD_NOT_ALLOWED"));

    // Pagination and filter.
    for i in 0..5 {
        c.create_machine(&machine(&format!("page-{i}"))).await.unwrap();
    }
    let all = c.list_machines(&ListOptions::default()).await.unwrap();
    assert_eq!((all.total, all.machines.len()), (6, 6));
    let p1 = c.list_machines(&ListOptions { limit: Some(4), ..Default::default() }).await.unwrap();
    let p2 = c.list_machines(&ListOptions { limit: Some(4), offset: Some(4), ..Default::default() }).await.unwrap();
    assert_eq!((p1.machines.len(), p2.machines.len(), p1.total, p2.total), (4, 2, 6, 6));
    let ids: HashSet<_> = p1.machines.iter().chain(&p2.machines).map(|m| m.id.clone()).collect();
    assert_eq!(ids.len(), 6, "pages do not overlap");
    let (s, e) = raw(c, Method::GET, "/machines?limit=501", None).await;
    assert_eq!((s, err(&e).0), (400, "VALIDATION_ERROR"));
    assert!(err(&e).1.contains("limit"));
    let (s, e) = raw(c, Method::GET, "/machines?status=sleeping", None).await;
    assert_eq!((s, err(&e).0), (400, "VALIDATION_ERROR"));

    // State machine through the API.
    let (s, e) = raw(c, Method::POST, &format!("/machines/{alpha}/stop"), None).await;
    assert_eq!((s, err(&e)), (400, ("BAD_REQUEST", "Cannot stop machine in 'pending' state")));
    let m = c.start_machine(&alpha).await.unwrap();
    assert_eq!(m.status, MachineStatus::Running);
    assert!(m.pid.is_some());
    let (s, e) = raw(c, Method::POST, &format!("/machines/{alpha}/start"), None).await;
    assert_eq!((s, err(&e)), (400, ("BAD_REQUEST", "Cannot start machine in 'running' state")));
    let running =
        c.list_machines(&ListOptions { status: Some(MachineStatus::Running), ..Default::default() }).await.unwrap();
    assert_eq!((running.total, running.machines[0].id.as_str()), (1, alpha.as_str()));
    let (s, e) = raw(c, Method::DELETE, &format!("/machines/{alpha}"), None).await;
    assert_eq!((s, err(&e).0), (400, "BAD_REQUEST"));
    assert!(err(&e).1.contains("stop the machine first"), "{e}");
    let r = c.restart_machine(&alpha).await.unwrap();
    assert_eq!(r.status, MachineStatus::Running);
    assert_ne!(r.pid, m.pid, "restart runs a new process");
    let logs = c.machine_logs(&alpha, 50).await.unwrap();
    assert!(logs.lines.iter().any(|l| l.contains("hyperfleet-agent")), "{:?}", logs.lines);

    // PATCH exposed ports on a running machine.
    let p = c
        .update_machine(&alpha, &UpdateMachine { exposed_ports: Some(vec![8080, 80]), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(p.spec.exposed_ports, vec![8080, 80]);
    let (s, e) = raw(c, Method::PATCH, &format!("/machines/{alpha}"), Some(json!({"exposed_ports": [65536]}))).await;
    assert_eq!((s, err(&e).0), (400, "VALIDATION_ERROR"));

    // Wait: immediate when already there; 504 when it never comes.
    assert_eq!(c.wait_machine(&alpha, MachineStatus::Running, 1).await.unwrap().id, alpha);
    let t = Instant::now();
    let e = c.wait_machine("page-0", MachineStatus::Running, 1).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(504), Some("TIMEOUT")));
    assert!(e.to_string().contains("Timed out waiting for machine"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3));

    // Delete with force stops first; the block is then free again and the lowest one is reused.
    c.delete_machine(&alpha, true).await.unwrap();
    assert_eq!(c.get_machine(&alpha).await.unwrap_err().code(), Some("NOT_FOUND"));
    let again = c.create_machine(&machine("reuse")).await.unwrap();
    assert_eq!(again.tap_device, format!("{}0", d.tap_prefix));
    assert!(d.host_links().is_empty(), "no interface left: {:?}", d.host_links());
}

#[ignore = "needs root: the daemon starts a runc container on a veth"]
#[tokio::test]
async fn wait_returns_when_the_machine_starts() {
    let d = Daemon::start(Options::default()).await;
    let m = d.client.create_machine(&machine("waiter")).await.unwrap();
    let c2 = d.client.clone();
    let id = m.id.clone();
    let waiter = tokio::spawn(async move { c2.wait_machine(&id, MachineStatus::Running, 30).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "wait is a long poll");
    d.client.start_machine(&m.id).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap().unwrap();
    assert_eq!(got.status, MachineStatus::Running);
}

#[ignore = "needs root: the daemon starts a runc container on a veth"]
#[tokio::test]
async fn concurrent_starts_of_one_machine_have_exactly_one_winner() {
    let d = Daemon::start(Options::default()).await;
    let m = d.client.create_machine(&machine("contended")).await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let c = d.client.clone();
            let id = m.id.clone();
            tokio::spawn(async move { c.start_machine(&id).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(m) => {
                assert_eq!(m.status, MachineStatus::Running);
                ok += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Some("BAD_REQUEST"), "{e}");
                assert!(e.to_string().contains("Cannot start machine in"), "{e}");
            }
        }
    }
    assert_eq!(ok, 1, "exactly one start acts");
    assert_eq!(d.host_links().len(), 1, "one interface, not several: {:?}", d.host_links());
    // Same for stop.
    let stops: Vec<_> = (0..4)
        .map(|_| {
            let c = d.client.clone();
            let id = m.id.clone();
            tokio::spawn(async move { c.stop_machine(&id).await })
        })
        .collect();
    let mut stopped = 0;
    for t in stops {
        if t.await.unwrap().is_ok() {
            stopped += 1;
        }
    }
    assert_eq!(stopped, 1);
    assert!(d.host_links().is_empty());
}

#[ignore = "needs root: the daemon's nftables table and a runc container on a veth"]
#[tokio::test]
async fn auth_matrix() {
    let d = Daemon::start(Options::default()).await;
    let admin = &d.client;
    let m = running(&d, machine("authz")).await;
    let id = m.id.clone();

    let mut keys = Vec::new();
    for scope in
        [Scope::MachinesRead, Scope::MachinesWrite, Scope::MachinesExec, Scope::KeysAdmin, Scope::WebhooksAdmin]
    {
        let k = admin
            .create_api_key(&CreateApiKey { name: format!("{scope}"), scopes: vec![scope], expires_at: None })
            .await
            .unwrap();
        assert!(k.key.starts_with("hf_") && k.key.len() == 35);
        assert_eq!(k.api_key.key_prefix, &k.key[..11]);
        keys.push((scope, k.key));
    }
    // Each route needs one scope; a key with another scope gets 403, never 401 or success.
    let routes: Vec<(Method, String, Option<serde_json::Value>, Scope)> = vec![
        (Method::GET, "/machines".into(), None, Scope::MachinesRead),
        (Method::GET, format!("/machines/{id}"), None, Scope::MachinesRead),
        (Method::GET, format!("/machines/{id}/wait?timeout=0"), None, Scope::MachinesRead),
        (Method::GET, format!("/machines/{id}/logs"), None, Scope::MachinesRead),
        (Method::POST, "/machines".into(), Some(json!({})), Scope::MachinesWrite),
        (Method::PATCH, format!("/machines/{id}"), Some(json!({})), Scope::MachinesWrite),
        (Method::POST, "/machines/nope/start".into(), None, Scope::MachinesWrite),
        (Method::POST, "/machines/nope/stop".into(), None, Scope::MachinesWrite),
        (Method::POST, "/machines/nope/restart".into(), None, Scope::MachinesWrite),
        (Method::DELETE, "/machines/nope".into(), None, Scope::MachinesWrite),
        (Method::POST, format!("/machines/{id}/exec"), Some(json!({"command": ["true"]})), Scope::MachinesExec),
        (Method::GET, format!("/machines/{id}/files/stat?path=/"), None, Scope::MachinesExec),
        (Method::GET, format!("/machines/{id}/files?path=/etc/hostname"), None, Scope::MachinesExec),
        (Method::GET, "/api-keys".into(), None, Scope::KeysAdmin),
        (Method::GET, "/webhooks".into(), None, Scope::WebhooksAdmin),
        (Method::POST, "/webhooks".into(), Some(json!({})), Scope::WebhooksAdmin),
        (Method::GET, "/webhooks/nope/deliveries".into(), None, Scope::WebhooksAdmin),
    ];
    for (method, path, body, needed) in &routes {
        for (scope, key) in &keys {
            let (s, e) = raw(&d.client_with(key), method.clone(), path, body.clone()).await;
            if scope == needed {
                assert!(s != 401 && s != 403, "{method} {path} with {scope}: {s} {e}");
            } else {
                assert_eq!(
                    (s, err(&e)),
                    (403, ("FORBIDDEN", "Insufficient permissions for this action")),
                    "{method} {path} with {scope}"
                );
            }
        }
    }
    // The wildcard scope can do everything.
    let (s, _) = raw(admin, Method::GET, "/api-keys", None).await;
    assert_eq!(s, 200);

    // 401s with the documented messages.
    let base = d.url();
    let http = reqwest::Client::new();
    let get = |h: Option<&'static str>| {
        let mut r = http.get(format!("{base}/machines"));
        if let Some(h) = h {
            r = r.header("authorization", h);
        }
        r
    };
    for (header, msg) in [
        (None, "Authorization header is required"),
        (Some("Basic dXNlcjpwYXNz"), "Invalid API key"),
        (Some("Bearer hf_short"), "Invalid API key"),
        (Some("Bearer hf_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"), "Invalid API key"),
    ] {
        let resp = get(header).send().await.unwrap();
        assert_eq!(resp.status(), 401);
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(err(&v), ("UNAUTHORIZED", msg), "{header:?}");
    }
    // Revoked.
    let (read_scope, read_key) = keys[0].clone();
    assert_eq!(read_scope, Scope::MachinesRead);
    let listed = admin.list_api_keys().await.unwrap();
    let rid = listed.api_keys.iter().find(|k| k.key_prefix == read_key[..11]).unwrap().id.clone();
    admin.revoke_api_key(&rid).await.unwrap();
    let e = d.client_with(&read_key).list_machines(&ListOptions::default()).await.unwrap_err();
    assert_eq!((e.status(), e.to_string().contains("API key has been revoked")), (Some(401), true), "{e}");
    assert_eq!(admin.revoke_api_key("key_nope").await.unwrap_err().code(), Some("NOT_FOUND"));
    // Expired.
    let soon = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let expiring = admin
        .create_api_key(&CreateApiKey { name: "short".into(), scopes: vec![Scope::All], expires_at: Some(soon) })
        .await
        .unwrap();
    d.client_with(&expiring.key).list_machines(&ListOptions::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let e = d.client_with(&expiring.key).list_machines(&ListOptions::default()).await.unwrap_err();
    assert!(e.to_string().contains("API key has expired"), "{e}");
    // Keys created with a past expiry, no scopes: refused.
    let e =
        admin.create_api_key(&CreateApiKey { name: "x".into(), scopes: vec![], expires_at: None }).await.unwrap_err();
    assert_eq!(e.code(), Some("VALIDATION_ERROR"));
    // last_used_at is recorded.
    let listed = admin.list_api_keys().await.unwrap();
    assert!(listed.api_keys.iter().any(|k| k.name == "test-admin" && k.last_used_at.is_some()));
}

#[ignore = "needs root: the daemon creates its nftables table at start"]
#[tokio::test]
async fn keys_cannot_grant_more_than_they_have() {
    let d = Daemon::start(Options::default()).await;
    let fmt = hyperfleet_client::types::timestamp::format;
    let now = time::OffsetDateTime::now_utc();
    let limit = now + time::Duration::hours(1);
    let delegate = d
        .client
        .create_api_key(&CreateApiKey {
            name: "delegate".into(),
            scopes: vec![Scope::KeysAdmin, Scope::MachinesRead],
            expires_at: Some(limit),
        })
        .await
        .unwrap();
    let limit = delegate.api_key.expires_at.unwrap();
    let c = d.client_with(&delegate.key);
    let before = d.client.list_api_keys().await.unwrap().api_keys.len();
    for (body, needle) in [
        (
            json!({"name": "w", "scopes": ["machines:read", "machines:write"], "expires_at": fmt(limit)}),
            "machines:write",
        ),
        (json!({"name": "all", "scopes": ["*"], "expires_at": fmt(limit)}), "scope *"),
        (json!({"name": "forever", "scopes": ["machines:read"]}), "never expires"),
        (
            json!({"name": "later", "scopes": ["machines:read"], "expires_at": fmt(limit + time::Duration::seconds(1))}),
            "this key expires at",
        ),
    ] {
        let (s, e) = raw(&c, Method::POST, "/api-keys", Some(body.clone())).await;
        assert_eq!((s, err(&e).0), (403, "FORBIDDEN"), "{body}: {e}");
        assert!(err(&e).1.contains(needle), "{body}: {e}");
    }
    // Bad input is still a 400, before any grant check.
    let (s, e) = raw(&c, Method::POST, "/api-keys", Some(json!({"name": "x", "scopes": []}))).await;
    assert_eq!((s, err(&e).0), (400, "VALIDATION_ERROR"), "{e}");
    assert_eq!(d.client.list_api_keys().await.unwrap().api_keys.len(), before, "nothing was created");

    // Within its own scopes and lifetime: allowed, and the new key has exactly what was asked.
    let (s, made) = raw(
        &c,
        Method::POST,
        "/api-keys",
        Some(json!({"name": "reader", "scopes": ["machines:read"], "expires_at": fmt(now + time::Duration::minutes(30))})),
    )
    .await;
    assert_eq!(s, 201, "{made}");
    let reader = d.client_with(made["key"].as_str().unwrap());
    reader.list_machines(&ListOptions::default()).await.unwrap();
    let (s, _) = raw(&reader, Method::POST, "/machines", Some(json!({}))).await;
    assert_eq!(s, 403);
    let (s, made) = raw(
        &c,
        Method::POST,
        "/api-keys",
        Some(json!({"name": "peer", "scopes": ["keys:admin", "machines:read"], "expires_at": fmt(limit)})),
    )
    .await;
    assert_eq!(s, 201, "{made}");
    assert_eq!(made["api_key"]["expires_at"], fmt(limit));
    // The wildcard key is not limited.
    let (s, made) = raw(&d.client, Method::POST, "/api-keys", Some(json!({"name": "root2", "scopes": ["*"]}))).await;
    assert_eq!(s, 201, "{made}");
}

#[tokio::test]
async fn correlation_ids_are_echoed_and_logged() {
    let d = Daemon::start(Options::default()).await;
    let resp = d.client.raw(Method::GET, "/machines").header("x-correlation-id", "trace-abc-123").send().await.unwrap();
    assert_eq!(resp.headers()["x-correlation-id"], "trace-abc-123");
    let resp = d.client.raw(Method::GET, "/machines/missing").send().await.unwrap();
    let generated = resp.headers()["x-correlation-id"].to_str().unwrap().to_string();
    assert!(generated.starts_with("req_") && generated.len() > 8, "{generated}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let logs = d.logs();
    assert!(logs.lines().any(|l| l.contains("trace-abc-123") && l.contains("request done")), "{logs}");
    assert!(logs.contains(&generated));
}

#[ignore = "needs root: a runc container that outlives a daemon restart"]
#[tokio::test]
async fn daemon_restart_keeps_machines_and_keys() {
    let mut d = Daemon::start(Options::default()).await;
    let m = running(&d, machine("survivor")).await;
    let idle = d.client.create_machine(&machine("idle")).await.unwrap();
    let reader = d
        .client
        .create_api_key(&CreateApiKey { name: "reader".into(), scopes: vec![Scope::MachinesRead], expires_at: None })
        .await
        .unwrap();
    d.restart_after_crash().await;
    let after = d.client_with(&reader.key).get_machine(&m.id).await.unwrap();
    assert_eq!((after.status, after.pid), (MachineStatus::Running, m.pid), "adopted, same process");
    assert_eq!(d.client.get_machine(&idle.id).await.unwrap().status, MachineStatus::Pending);
    let out = d.client.exec(&m.id, &["echo", "still here"]).await.unwrap_or_else(|e| panic!("exec after restart: {e}"));
    assert_eq!(out.stdout, "still here\n");
    assert!(d.logs().contains("adopted running machine"));
    // A graceful daemon stop leaves machines running too.
    d.stop();
    d.spawn().await;
    assert_eq!(d.client.get_machine(&m.id).await.unwrap().pid, m.pid);
}

#[tokio::test]
async fn bad_configuration_stops_the_daemon_with_a_message() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("x.db").display().to_string();
    for (var, val, needle) in [
        ("PORT", "70000", "--port"),
        ("PORT", "0", "--port"),
        ("DATABASE_PATH", "/no/such/dir/h.db", "DATABASE_PATH"),
        ("PROXY_EXPOSED_PORT_POLL_INTERVAL_MS", "0", "PROXY_EXPOSED_PORT_POLL_INTERVAL_MS"),
        ("HYPERFLEET_SUBNET", "10.0.0.0/31", "HYPERFLEET_SUBNET"),
        ("HYPERFLEET_SUBNET", "not-a-cidr", "HYPERFLEET_SUBNET"),
        ("HYPERFLEET_DNS", "8.8.8", "HYPERFLEET_DNS"),
        ("HYPERFLEET_RUNTIME", "qemu", "HYPERFLEET_RUNTIME"),
    ] {
        let out = std::process::Command::new(common::bin())
            .arg("serve")
            .env("DATABASE_PATH", &db)
            .env(var, val)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{var}={val} accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{var}={val}: {stderr}");
    }
}

#[ignore = "needs root: the daemon creates its nftables table at start"]
#[tokio::test]
async fn address_pool_is_unique_under_concurrency_and_reports_exhaustion() {
    // A /22 has 256 blocks: 200 concurrent creates must get 200 distinct ones.
    let d = Daemon::start(Options { prefix_len: 22, ..Default::default() }).await;
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let c = d.client.clone();
            tokio::spawn(async move { c.create_machine(&machine(&format!("m{i}"))).await.unwrap() })
        })
        .collect();
    let mut guest_ips = HashSet::new();
    let mut taps = HashSet::new();
    for t in tasks {
        let m = t.await.unwrap();
        assert!(guest_ips.insert(m.guest_ip), "duplicate {}", m.guest_ip);
        assert!(taps.insert(m.tap_device.clone()));
    }
    let expected: HashSet<String> = (0..200).map(|i| format!("{}{i}", d.tap_prefix)).collect();
    assert_eq!(taps, expected, "the lowest 200 blocks");
    // Fill the pool, then one more: 503 IP_POOL_EXHAUSTED, and nothing half-created.
    for i in 200..256 {
        d.client.create_machine(&machine(&format!("m{i}"))).await.unwrap();
    }
    let e = d.client.create_machine(&machine("one-too-many")).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(503), Some("IP_POOL_EXHAUSTED")), "{e}");
    assert!(e.to_string().contains("256"), "{e}");
    assert_eq!(d.client.list_machines(&ListOptions::default()).await.unwrap().total, 256);
    // Freed blocks are reused, lowest first.
    let victim = d.client.get_machine("m7").await.unwrap();
    d.client.delete_machine(&victim.id, false).await.unwrap();
    let reused = d.client.create_machine(&machine("reused")).await.unwrap();
    assert_eq!(reused.guest_ip, victim.guest_ip);
}

#[ignore = "needs root: the daemon creates its nftables table at start"]
#[tokio::test]
async fn changing_the_subnet_under_leases_is_refused() {
    let mut d = Daemon::start(Options::default()).await;
    d.client.create_machine(&machine("holder")).await.unwrap();
    d.stop();
    let out = d.command().arg("serve").env("HYPERFLEET_SUBNET", "10.250.0.0/24").output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("HYPERFLEET_SUBNET") && stderr.contains(&d.subnet), "{stderr}");
}
