//! Host networking end to end, through real exec in container-runtime guests (same IPAM, TAP-named host
//! interface, firewall and NAT as Firecracker guests): NAT to a test "internet" in a namespace made here,
//! isolation between machines and from the host, egress policies, the unreachable route, the firewall
//! tracking exactly the running machines, and crash recovery leaking nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::{Daemon, Options, TestNet, machine, running, sh};
use hyperfleet_client::ListOptions;
use hyperfleet_client::types::*;

fn egress(m: CreateMachine, e: &str) -> CreateMachine {
    CreateMachine { network: Some(serde_json::from_str(&format!(r#"{{"egress": {e}}}"#)).unwrap()), ..m }
}

/// An HTTP GET from the guest with busybox nc (Debian's static busybox wget crashes on name lookup).
async fn reaches(d: &Daemon, id: &str, host: &str, port: u16) -> bool {
    let (_, out, _) = sh(d, id, &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {host} {port}")).await;
    out.contains("hello from the internet")
}

async fn connects(d: &Daemon, id: &str, host: &str, port: u16) -> bool {
    sh(d, id, &format!("nc -w 3 {host} {port} </dev/null")).await.0 == 0
}

async fn pings(d: &Daemon, id: &str, ip: &str) -> bool {
    sh(d, id, &format!("ping -c 1 -W 2 {ip}")).await.0 == 0
}

#[ignore = "needs root: veths, netns test hosts, nftables NAT and raw ICMP"]
#[tokio::test]
async fn nat_isolation_and_egress_policy() {
    let inet1 = TestNet::new(11);
    let inet2 = TestNet::new(12);
    let seen1 = inet1.serve(8080);
    let _seen2 = inet2.serve(8080);
    let d = Daemon::start(Options { dns: inet1.peer_ip.clone(), ..Default::default() }).await;
    let a = running(&d, machine("allow")).await;
    let b = running(&d, egress(machine("deny"), r#""deny""#)).await;
    let c = running(&d, egress(machine("only-one"), &format!(r#"["{}/24"]"#, inet1.peer_ip))).await;
    let (host1, host2) = (inet1.peer_ip.as_str(), inet2.peer_ip.as_str());

    // The guest's own view: eth0 with guest_ip/30, default route via the gateway, the configured DNS.
    let (_, addr, _) = sh(&d, &a.id, "ip addr show eth0").await;
    assert!(addr.contains(&format!("inet {}/30", a.guest_ip)), "{addr}");
    let (_, route, _) = sh(&d, &a.id, "ip route").await;
    assert!(route.contains(&format!("default via {}", a.tap_ip)), "{route}");
    let (_, resolv, _) = sh(&d, &a.id, "cat /etc/resolv.conf").await;
    assert_eq!(resolv.trim(), format!("nameserver {}", inet1.peer_ip));

    // Guest -> gateway, and out through NAT: the internet host sees the host's address, not the guest's.
    assert!(pings(&d, &a.id, &a.tap_ip.to_string()).await, "guest cannot ping its gateway");
    assert!(reaches(&d, &a.id, host1, 8080).await, "guest cannot reach the test internet host");
    let peer = seen1.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(peer.ip().to_string(), inet1.host_ip, "source was not masqueraded");
    assert!(reaches(&d, &a.id, host2, 8080).await);

    // Isolation: no machine-to-machine traffic, no other host address, not the daemon's own API.
    assert!(!pings(&d, &a.id, &b.guest_ip.to_string()).await, "VM -> VM must be blocked");
    assert!(!pings(&d, &b.id, &a.guest_ip.to_string()).await, "VM -> VM must be blocked");
    assert!(
        !pings(&d, &a.id, &b.tap_ip.to_string()).await,
        "another machine's gateway is a host address outside the block"
    );
    assert!(!pings(&d, &a.id, &inet1.host_ip).await, "host addresses are not reachable from guests");
    // A service listening on all host addresses: the test internet reaches it, a guest must not.
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || for _ in listener.incoming() {});
    let control = Command::new("ip")
        .args(["netns", "exec", &inet1.ns, "busybox", "nc", "-w", "3", &inet1.host_ip, &host_port.to_string()])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(control.status.success(), "control: the host service is reachable from outside");
    assert!(
        !connects(&d, &a.id, &a.tap_ip.to_string(), host_port).await,
        "host services must not be reachable from a guest"
    );
    // ...while the host still reaches guests (the proxy and the health checks need it).
    assert!(hyperfleet_net::icmp::ping(a.guest_ip, Duration::from_secs(2)).await.unwrap().is_some());

    // Egress policies.
    assert!(pings(&d, &b.id, &b.tap_ip.to_string()).await, "deny still allows the gateway");
    assert!(!reaches(&d, &b.id, host1, 8080).await, "egress deny must block the internet");
    assert!(reaches(&d, &c.id, host1, 8080).await, "listed CIDR must be allowed");
    assert!(!reaches(&d, &c.id, host2, 8080).await, "unlisted destination must be blocked");

    // A stopped machine's address is unreachable on the host: it never follows the default route out.
    d.client.stop_machine(&a.id).await.unwrap();
    let out = Command::new("ip").args(["route", "get", &a.guest_ip.to_string()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("unreachable") || text.contains("No route"), "route for a stopped machine: {text}");
    assert!(!text.contains("dev eth0"), "{text}");
    assert_eq!(hyperfleet_net::icmp::ping(a.guest_ip, Duration::from_millis(500)).await.unwrap(), None);
}

#[ignore = "needs root: nftables sets and runc containers on veths"]
#[tokio::test]
async fn firewall_tracks_exactly_the_running_machines() {
    let d = Daemon::start(Options::default()).await;
    let mut machines = Vec::new();
    for (i, e) in [r#""allow""#, r#""deny""#, r#"["10.0.0.0/8"]"#, r#""allow""#].into_iter().enumerate() {
        machines.push(d.client.create_machine(&egress(machine(&format!("fw{i}")), e)).await.unwrap());
    }
    let restricted: BTreeSet<String> = [&machines[1], &machines[2]].iter().map(|m| m.tap_device.clone()).collect();
    assert!(d.table_exists(), "the table exists from daemon start");
    assert!(d.firewall_ifaces().is_empty());
    let mut running = BTreeSet::new();
    // A fixed sequence of starts and stops; after each step the table and the host match the database.
    for (step, i) in [0, 1, 2, 1, 3, 0, 1, 2, 3, 1].into_iter().enumerate() {
        let m = &machines[i];
        if running.contains(&m.tap_device) {
            d.client.stop_machine(&m.id).await.unwrap();
            running.remove(&m.tap_device);
        } else {
            d.client.start_machine(&m.id).await.unwrap();
            running.insert(m.tap_device.clone());
        }
        let want: Vec<String> = running.iter().cloned().collect();
        assert_eq!(d.firewall_ifaces(), want, "step {step}: nft set");
        let want_restricted: Vec<String> = running.intersection(&restricted).cloned().collect();
        assert_eq!(d.firewall_set("egress_restricted"), want_restricted, "step {step}: egress restrictions");
        let mut links = d.host_links();
        links.sort();
        assert_eq!(links, want, "step {step}: host interfaces");
    }
    let list = Command::new("nft").args(["list", "table", "inet", &d.table]).output().unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    for m in &machines {
        let listed = text.contains(&format!("\"{}\" . {}", m.tap_device, m.guest_ip));
        assert_eq!(listed, running.contains(&m.tap_device), "{} in the anti-spoofing set", m.tap_device);
        let allowed = text.contains(&format!("\"{}\" . 10.0.0.0/8", m.tap_device));
        assert_eq!(allowed, m.spec.name == "fw2" && running.contains(&m.tap_device), "{} egress list", m.tap_device);
    }
}

/// Kills the daemon with SIGKILL while starts and stops are in flight; after a restart every machine is in a
/// resting state, and the host holds exactly the running machines' interfaces, namespaces and rules.
#[ignore = "needs root: veths, netns, nftables and runc containers across daemon crashes"]
#[tokio::test]
async fn crash_during_starts_and_stops_leaks_nothing() {
    let mut d = Daemon::start(Options::default()).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(d.client.create_machine(&machine(&format!("crash{i}"))).await.unwrap().id);
    }
    for id in &ids[..3] {
        d.client.start_machine(id).await.unwrap();
    }
    for (round, delay_ms) in [40u64, 120, 250].into_iter().enumerate() {
        let list = d.client.list_machines(&ListOptions::default()).await.unwrap();
        let tasks: Vec<_> = list
            .machines
            .iter()
            .map(|m| {
                let c = d.client.clone();
                let (id, status) = (m.id.clone(), m.status);
                tokio::spawn(async move {
                    match status {
                        MachineStatus::Running => c.stop_machine(&id).await.map(|_| ()),
                        _ => c.start_machine(&id).await.map(|_| ()),
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        d.kill9();
        for t in tasks {
            // Dropped: the daemon was killed under these requests, so failing is among their expected outcomes.
            let _ = t.await;
        }
        d.spawn().await;

        let list = d.client.list_machines(&ListOptions::default()).await.unwrap();
        let mut running_taps = Vec::new();
        for m in &list.machines {
            assert!(
                matches!(
                    m.status,
                    MachineStatus::Running | MachineStatus::Stopped | MachineStatus::Failed | MachineStatus::Pending
                ),
                "round {round}: {} left in {}",
                m.spec.name,
                m.status
            );
            let ns_exists = std::path::Path::new(&format!("/run/netns/hf-{}", m.id)).exists();
            assert_eq!(
                ns_exists,
                m.status == MachineStatus::Running,
                "round {round}: namespace of {} ({})",
                m.spec.name,
                m.status
            );
            if m.status == MachineStatus::Running {
                running_taps.push(m.tap_device.clone());
                let r = d
                    .client
                    .exec(&m.id, &["true"])
                    .await
                    .unwrap_or_else(|e| panic!("round {round}: exec in {}: {e}", m.spec.name));
                assert_eq!(r.exit_code, 0);
            }
        }
        running_taps.sort();
        let mut links = d.host_links();
        links.sort();
        assert_eq!(links, running_taps, "round {round}: interfaces on the host");
        assert_eq!(d.firewall_ifaces(), running_taps, "round {round}: firewall");
        let runc = Command::new("runc").args(["--root", "/run/hyperfleet/runc", "list", "-q"]).output().unwrap();
        let containers: BTreeSet<String> = String::from_utf8_lossy(&runc.stdout).lines().map(str::to_string).collect();
        for m in &list.machines {
            let listed = containers.contains(&format!("hf-{}", m.id));
            assert_eq!(
                listed,
                m.status == MachineStatus::Running,
                "round {round}: container of {} ({})",
                m.spec.name,
                m.status
            );
        }
    }
}
