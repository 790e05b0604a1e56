//! The daemon on PostgreSQL (`DATABASE_URL`), end to end: a throwaway cluster of Debian's `postgresql`
//! started by the test, the real daemon and CLI on it, container runtime. Uniqueness under concurrent
//! creates, a machine's lifecycle with its events, a restart after a crash re-adopting the running machine,
//! keys made by the CLI, and `doctor` naming the backend.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;

use common::{Daemon, Options, machine, running};
use hyperfleet::testing::{Durability, PgCluster};
use hyperfleet_client::ListOptions;
use hyperfleet_client::types::*;

#[ignore = "needs root and postgresql: a throwaway PostgreSQL cluster, the daemon's nftables table and runc"]
#[tokio::test]
async fn the_daemon_runs_on_postgresql() {
    let pg_dir = tempfile::tempdir().unwrap();
    let pg = PgCluster::start(pg_dir.path(), Durability::None).unwrap();
    let url = pg.url("postgres");
    // Declared after the cluster, so dropped (stopped, purged) before it.
    let mut d = Daemon::start(Options {
        prefix_len: 26,
        env: vec![("DATABASE_URL".into(), url.clone()), ("DATABASE_PATH".into(), "/nonexistent/unused.db".into())],
        ..Default::default()
    })
    .await;
    assert!(!d.dir.path().join("hyperfleet.db").exists(), "no SQLite file when DATABASE_URL is set");
    assert_eq!(d.client.health().await.unwrap().database, "ok");

    // A /26 has 16 blocks: 24 concurrent creates over 12 names get 12 distinct machines, then 4 more fill
    // the pool and one past it is refused.
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let c = d.client.clone();
            tokio::spawn(async move { c.create_machine(&machine(&format!("m{}", i % 12))).await })
        })
        .collect();
    let (mut made, mut taken) = (Vec::new(), 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(m) => made.push(m),
            Err(e) => {
                assert_eq!(e.code(), Some("CONFLICT"), "{e}");
                taken += 1;
            }
        }
    }
    assert_eq!((made.len(), taken), (12, 12), "one machine per name");
    let ips: HashSet<_> = made.iter().map(|m| m.guest_ip).collect();
    assert_eq!(ips.len(), 12, "distinct addresses");
    for i in 12..16 {
        d.client.create_machine(&machine(&format!("m{i}"))).await.unwrap();
    }
    let e = d.client.create_machine(&machine("one-too-many")).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(503), Some("IP_POOL_EXHAUSTED")), "{e}");
    assert_eq!(d.client.list_machines(&ListOptions::default()).await.unwrap().total, 16);
    for i in 1..16 {
        d.client.delete_machine(&format!("m{i}"), false).await.unwrap();
    }

    // A lifecycle, with its events stored in PostgreSQL.
    let m = running(&d, machine("web")).await;
    let out = d.client.exec(&m.id, &["echo", "on postgres"]).await.unwrap();
    assert_eq!(out.stdout, "on postgres\n");
    let stored = d.client.raw(hyperfleet_client::HttpMethod::GET, "/events?follow=false&machine=web").send();
    let body = stored.await.unwrap().text().await.unwrap();
    let kinds: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(kinds, ["created", "starting", "running", "exec.started", "exec.finished"], "{body}");

    // PostgreSQL cannot hold a NUL byte in text (SQLite can): wherever a request carries one, in a path, a query
    // or a body, the answer is the caller's 400, never a database error.
    use hyperfleet_client::HttpMethod as M;
    let selector =
        serde_json::json!({"url": "http://127.0.0.1:9/", "events": ["machine.running"], "label_selector": "app=a\0b"});
    for (method, path, body, says) in [
        (M::GET, "/machines/we%00b", None, "NUL"),
        (M::POST, "/machines/we%00b/start", None, "NUL"),
        (M::GET, "/volumes/v%00", None, "NUL"),
        (M::GET, "/nodes/n%00", None, "NUL"),
        (M::GET, "/events?follow=false&machine=w%00", None, "NUL"),
        (M::GET, "/machines?label=team%3Dm%00l", None, "NUL"),
        (M::POST, "/api-keys", Some(serde_json::json!({"name": "c\0i", "scopes": ["machines:read"]})), "control"),
        (M::POST, "/webhooks", Some(selector), "not a label value"),
    ] {
        let mut req = d.client.raw(method.clone(), path);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        assert_eq!(status, 400, "{method:?} {path}: {text}");
        assert!(text.contains("VALIDATION_ERROR") && text.contains(says), "{method:?} {path}: {text}");
    }

    // kill -9 and start again on the same database: the running machine is adopted, keys still work.
    d.restart_after_crash().await;
    let after = d.client.get_machine(&m.id).await.unwrap();
    assert_eq!((after.status, after.pid), (MachineStatus::Running, m.pid), "adopted, same process");
    assert!(d.logs().contains("adopted running machine"));
    assert!(d.logs().contains("postgresql postgres://hyperfleet@127.0.0.1"), "the log names the database");

    // The CLI's key commands work on the same database.
    let out = d.cli(&["keys", "list"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("test-admin"));

    let doctor = d.cli(&["doctor"]);
    let report = String::from_utf8_lossy(&doctor.stdout);
    assert!(report.contains("ok   database: postgresql backend"), "{report}");

    d.client.stop_machine(&m.id).await.unwrap();
    d.client.delete_machine(&m.id, false).await.unwrap();
    assert_eq!(d.client.list_machines(&ListOptions::default()).await.unwrap().total, 1);
    drop(d);
    drop(pg);
}

/// PostgreSQL stopped until this is dropped: a test failing during the outage still brings it back before the
/// daemon's drop purges its machines through it.
struct Outage<'a>(&'a PgCluster);

impl<'a> Outage<'a> {
    fn begin(pg: &'a PgCluster) -> Self {
        pg.stop().unwrap();
        Self(pg)
    }
}

impl Drop for Outage<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.resume() {
            eprintln!("PostgreSQL did not come back after the outage: {e}");
        }
    }
}

#[ignore = "needs root and postgresql: a throwaway PostgreSQL cluster, the daemon's nftables table and runc"]
#[tokio::test]
async fn postgresql_outages_are_clear_503s_and_a_restart_during_a_create_storm_loses_nothing() {
    let pg_dir = tempfile::tempdir().unwrap();
    let pg = std::sync::Arc::new(PgCluster::start(pg_dir.path(), Durability::None).unwrap());
    let d = Daemon::start(Options {
        prefix_len: 24,
        env: vec![("DATABASE_URL".into(), pg.url("postgres"))],
        ..Default::default()
    })
    .await;
    let c = d.client.clone();
    let before = running(&d, machine("before")).await;

    // The database down: every request that needs it is a 503 with the documented envelope, the daemon
    // stays up, and it serves again as soon as the database is back.
    let outage = Outage::begin(&pg);
    let e = c.list_machines(&ListOptions::default()).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(503), Some("DATABASE_UNAVAILABLE")), "{e}");
    assert!(e.to_string().contains("the database is unavailable, retry later"), "{e}");
    let e = c.create_machine(&machine("while-down")).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(503), Some("DATABASE_UNAVAILABLE")), "{e}");
    drop(outage);
    assert_eq!(c.get_machine(&before.id).await.unwrap().status, MachineStatus::Running);
    assert!(c.get_machine("while-down").await.is_err(), "a refused create made nothing");

    // A storm of creates and starts while PostgreSQL restarts (fast shutdown: connections are cut).
    let storm: Vec<_> = (0..40)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(25 * i)).await;
                let m = c.create_machine(&machine(&format!("s{i}"))).await?;
                c.start_machine(&m.id).await
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let restarter = pg.clone();
    tokio::task::spawn_blocking(move || restarter.restart().unwrap()).await.unwrap();
    let (mut started, mut refused) = (Vec::new(), 0);
    for t in storm {
        match t.await.unwrap() {
            Ok(m) => started.push(m.id),
            Err(e) => {
                // Each failure is the clear one, never an internal error.
                assert_eq!((e.status(), e.code()), (Some(503), Some("DATABASE_UNAVAILABLE")), "{e}\n{}", d.logs());
                refused += 1;
            }
        }
    }
    eprintln!("storm: {} started, {refused} refused", started.len());

    // Afterwards the database and the host agree: every machine has settled (none left starting), each
    // running one answers and has its interface on the host, no interface belongs to no running machine,
    // and addresses are unique.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let machines = loop {
        let list = c.list_machines(&ListOptions::default()).await.unwrap().machines;
        if list.iter().all(|m| !matches!(m.status, MachineStatus::Starting | MachineStatus::Stopping)) {
            break list;
        }
        assert!(std::time::Instant::now() < deadline, "machines never settled: {list:?}\n{}", d.logs());
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    for id in &started {
        let m = machines.iter().find(|m| m.id == *id).expect("a started machine is listed");
        assert_eq!(m.status, MachineStatus::Running, "{m:?}");
    }
    let running: Vec<_> = machines.iter().filter(|m| m.status == MachineStatus::Running).collect();
    for m in &running {
        let out = c.exec(&m.id, &["echo", "ok"]).await.unwrap_or_else(|e| panic!("{}: {e}", m.spec.name));
        assert_eq!(out.stdout, "ok\n");
    }
    let mut links = d.host_links();
    links.sort();
    let mut expected: Vec<String> = running.iter().map(|m| m.tap_device.clone()).collect();
    expected.sort();
    assert_eq!(links, expected, "host interfaces are the running machines' ones");
    let ips: HashSet<_> = machines.iter().map(|m| m.guest_ip).collect();
    assert_eq!(ips.len(), machines.len(), "distinct addresses");
    // A create refused during the restart can be made again (or exists, if its commit went through).
    for i in 0..40 {
        let name = format!("s{i}");
        if machines.iter().all(|m| m.spec.name != name) {
            c.create_machine(&machine(&name)).await.unwrap();
        }
    }
    drop(d);
}
