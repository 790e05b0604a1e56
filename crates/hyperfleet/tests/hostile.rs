//! Attacks a guest or a client can try, each asserted to fail against the real daemon: reaching the cloud
//! metadata address, exposing every port, running unboundedly many commands at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Daemon, Options, TestNet, machine, running, sh};
use hyperfleet_client::types::*;

/// An HTTP GET from the guest with busybox nc.
async fn reaches(d: &Daemon, id: &str, host: &str, port: u16) -> bool {
    let (_, out, _) = sh(d, id, &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {host} {port}")).await;
    out.contains("hello from the internet")
}

#[ignore = "needs root: a test host in a namespace at the metadata address, nftables, runc"]
#[tokio::test]
async fn the_metadata_address_is_out_of_reach_by_default() {
    // A test host standing in for a cloud's metadata service (never the real one).
    let metadata = TestNet::with_addresses(31, "169.254.169.1", "169.254.169.254");
    let _seen = metadata.serve(80);
    // The host itself reaches it: the test host works, so only the firewall can stop the guest.
    let direct = std::net::TcpStream::connect_timeout(&"169.254.169.254:80".parse().unwrap(), Duration::from_secs(2));
    assert!(direct.is_ok(), "the host cannot reach the test host: {direct:?}");

    let d = Daemon::start(Options::default()).await;
    let m = running(&d, machine("curious")).await;
    assert!(!reaches(&d, &m.id, "169.254.169.254", 80).await, "a guest reached the metadata address");
    // Even a machine whose own policy allows exactly that address is denied: the host-wide list wins.
    let listed = CreateMachine {
        network: Some(serde_json::from_str(r#"{"egress": ["169.254.169.254/32"]}"#).unwrap()),
        ..machine("listed")
    };
    let l = running(&d, listed).await;
    assert!(!reaches(&d, &l.id, "169.254.169.254", 80).await, "a machine's egress list overrode the deny list");
    drop(d);

    // With the deny list emptied by the operator, the same guest gets through: the rule is what stopped it.
    let open =
        Daemon::start(Options { env: vec![("HYPERFLEET_EGRESS_DENY".into(), "none".into())], ..Default::default() })
            .await;
    let m = running(&open, machine("allowed")).await;
    assert!(reaches(&open, &m.id, "169.254.169.254", 80).await, "with no deny list the test host is reachable");
}

#[ignore = "needs root: the daemon sets up host networking"]
#[tokio::test]
async fn a_machine_cannot_expose_every_port() {
    let d = Daemon::start(Options::default()).await;
    let all: Vec<i64> = (1..=65535).collect();
    let req = CreateMachine { exposed_ports: Some(all), ..machine("greedy") };
    let e = d.client.create_machine(&req).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(400), Some("VALIDATION_ERROR")), "{e}");
    assert!(e.to_string().contains("at most 64"), "{e}");
    // PATCH is held to the same limit.
    let m = d.client.create_machine(&machine("modest")).await.unwrap();
    let update = UpdateMachine { exposed_ports: Some((1..=65).collect()) };
    let e = d.client.update_machine(&m.id, &update).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    let update = UpdateMachine { exposed_ports: Some((1..=64).collect()) };
    assert_eq!(d.client.update_machine(&m.id, &update).await.unwrap().spec.exposed_ports.len(), 64);
}

#[ignore = "needs root: runc container guest"]
#[tokio::test]
async fn concurrent_commands_per_machine_are_bounded() {
    let d = Daemon::start(Options {
        env: vec![("HYPERFLEET_EXEC_MAX_CONCURRENT".into(), "2".into())],
        ..Default::default()
    })
    .await;
    let m = running(&d, machine("busy")).await;
    let slow = || ExecRequest {
        command: CommandArgs(vec!["sleep".into(), "3".into()]),
        timeout: Some(10),
        env: None,
        cwd: None,
        stdin: None,
    };
    let (c1, c2) = (d.client.clone(), d.client.clone());
    let (id1, id2) = (m.id.clone(), m.id.clone());
    let (r1, r2) = (slow(), slow());
    let first = tokio::spawn(async move { c1.exec_with(&id1, &r1).await });
    let second = tokio::spawn(async move { c2.exec_with(&id2, &r2).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let e = d.client.exec_with(&m.id, &slow()).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(429), Some("TOO_MANY_REQUESTS")), "{e}");
    assert_eq!(first.await.unwrap().unwrap().exit_code, 0);
    assert_eq!(second.await.unwrap().unwrap().exit_code, 0);
    // Once they finish, commands run again.
    assert_eq!(sh(&d, &m.id, "echo again").await.1.trim(), "again");
}

#[ignore = "needs root: runc container guest"]
#[tokio::test]
async fn a_guest_cannot_fill_the_disk_through_its_console() {
    let d = Daemon::start(Options {
        env: vec![("HYPERFLEET_CONSOLE_LOG_MAX_SIZE".into(), "1MiB".into())],
        ..Default::default()
    })
    .await;
    let m = running(&d, machine("chatty")).await;
    // The init's standard output is the console log on the host.
    let (code, _, err) = sh(&d, &m.id, "head -c 30000000 /dev/zero >> /proc/1/fd/1; echo done >> /proc/1/fd/1").await;
    assert_eq!(code, 0, "{err}");
    let dir = d.dir.path().join("machines").join(&m.id);
    let size = |name: &str| std::fs::metadata(dir.join(name)).map(|m| m.len()).unwrap_or(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while size("console.log") + size("console.log.1") > 2 << 20 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let total = size("console.log") + size("console.log.1");
    assert!(total <= 2 << 20, "30 MB written, {total} bytes kept");
    assert!(size("console.log.1") > 0, "the log was rotated, not deleted");
    // The machine's log stays readable through the API.
    let logs = d.client.machine_logs(&m.id, 5).await.unwrap();
    assert!(!logs.lines.is_empty());
}
