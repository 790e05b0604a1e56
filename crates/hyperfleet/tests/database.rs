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
