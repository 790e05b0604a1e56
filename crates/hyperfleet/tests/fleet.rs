//! Several daemons on one PostgreSQL database as one fleet, end to end: a throwaway cluster of Debian's
//! `postgresql`, three real daemons as three nodes on this host (each with its own ports, subnet, interface
//! prefix, nftables table and data directory), container runtime. Nodes and heartbeats, drain, placement
//! (spread, pin, selector, no room, concurrent creates on two nodes), every machine operation through one
//! node on a machine of another, live events across nodes, a forged node-to-node call, and a node killed and
//! back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use common::{Daemon, Options, machine, start_testd};
use futures::StreamExt;
use hyperfleet::testing::{Durability, PgCluster};
use hyperfleet_client::types::*;
use hyperfleet_client::{Client, HttpMethod, ListOptions};

const SECRET: &str = "fleet-test-cluster-secret-0123";
/// Per node, as placement counts it (overcommit 1.0, the fleet default).
const NODE_MEM_MIB: u64 = 2048;

async fn node(url: &str, name: &str, labels: &str) -> Daemon {
    node_with(url, name, &[("HYPERFLEET_NODE_LABELS".into(), labels.into())]).await
}

/// A node of the fleet on database `url`, with `extra` settings.
async fn node_with(url: &str, name: &str, extra: &[(String, String)]) -> Daemon {
    let env = [
        ("DATABASE_URL", url),
        ("DATABASE_PATH", "/nonexistent/unused.db"),
        ("HYPERFLEET_NODE_NAME", name),
        ("HYPERFLEET_NODE_URL", "{url}"),
        ("HYPERFLEET_NODE_VCPUS", "64"),
        ("HYPERFLEET_NODE_MEM_MIB", "2048"),
        ("HYPERFLEET_CLUSTER_SECRET", SECRET),
        ("HYPERFLEET_HEARTBEAT_INTERVAL_MS", "300"),
        ("HYPERFLEET_NODE_DOWN_AFTER_MS", "1500"),
    ];
    let mut env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    env.extend(extra.iter().cloned());
    Daemon::start(Options { env, ..Default::default() }).await
}

fn sized(name: &str, mem: i64) -> CreateMachine {
    CreateMachine { mem_size_mib: Some(mem), ..machine(name) }
}

/// How many machines each node owns, as `GET /machines` on `c` shows them.
async fn per_node(c: &Client) -> HashMap<String, usize> {
    let all = c.list_machines(&ListOptions { limit: Some(500), ..Default::default() }).await.unwrap();
    let mut n = HashMap::new();
    for m in all.machines {
        *n.entry(m.node).or_default() += 1;
    }
    n
}

async fn node_status(c: &Client, name: &str) -> NodeStatus {
    c.get_node(name).await.unwrap().status
}

async fn until_status(c: &Client, name: &str, want: NodeStatus) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while node_status(c, name).await != want {
        assert!(Instant::now() < deadline, "node {name} never became {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[ignore = "needs root and postgresql: a throwaway PostgreSQL cluster, three daemons' nftables tables and runc"]
#[tokio::test]
async fn three_daemons_are_one_fleet_on_postgresql() {
    let pg_dir = tempfile::tempdir().unwrap();
    let pg = PgCluster::start(pg_dir.path(), Durability::None).unwrap();
    let url = pg.url("postgres");
    // Declared after the cluster, so dropped (stopped, purged) before it.
    let a = node(&url, "a", "zone=x").await;
    let b = node(&url, "b", "zone=y").await;
    let mut c = node(&url, "c", "zone=y,disk=ssd").await;
    let ca = &a.client;

    // Nodes registered themselves and beat.
    let nodes = ca.list_nodes().await.unwrap().nodes;
    assert_eq!(nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
    for n in &nodes {
        assert_eq!((n.status, n.vcpus, n.mem_size_mib, n.overcommit), (NodeStatus::Up, 64, NODE_MEM_MIB, Some(1.0)));
        assert!(n.url.as_deref().is_some_and(|u| u.starts_with("http://127.0.0.1:")), "{n:?}");
        assert!(n.runtimes.contains(&RuntimeKind::Container));
    }
    assert_eq!(nodes[2].labels, BTreeMap::from([("disk".into(), "ssd".into()), ("zone".into(), "y".into())]));
    let first = ca.get_node("b").await.unwrap().heartbeat_age_ms;
    assert!(first < 1500, "fresh heartbeat: {first} ms");
    let e = ca.get_node("nope").await.unwrap_err();
    assert_eq!(e.status(), Some(404));
    let out = a.cli(&["nodes", "ls", "--url", &a.url(), "--api-key", &a.key]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && listed.contains("zone=y") && listed.lines().count() == 4,
        "{listed}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Live events cross nodes: node a's stream shows a change that node c made (relayed with NOTIFY).
    let mut live = Box::pin(ca.events(Some("live"), &[], None).await.unwrap());
    let on_c = c.client.create_machine(&CreateMachine { node: Some("c".into()), ..machine("live") }).await.unwrap();
    let heard = tokio::time::timeout(Duration::from_secs(10), live.next()).await.expect("node a hears node c's change");
    let heard = heard.unwrap().unwrap();
    assert_eq!((heard.kind, heard.machine_id.as_str()), (EventKind::Created, on_c.id.as_str()));
    c.client.delete_machine(&on_c.id, false).await.unwrap();
    drop(live);

    // Placement spreads 30 machines created on node a over the three nodes, 10 each; each node leases its
    // own blocks.
    let made: Vec<Machine> = {
        let mut v = Vec::new();
        for i in 0..30 {
            v.push(ca.create_machine(&machine(&format!("s{i}"))).await.unwrap());
        }
        v
    };
    assert_eq!(per_node(ca).await, HashMap::from([("a".into(), 10), ("b".into(), 10), ("c".into(), 10)]));
    let mut seen = HashSet::new();
    for m in &made {
        assert!(seen.insert((m.node.clone(), m.guest_ip)), "address {} used twice on node {}", m.guest_ip, m.node);
        assert_eq!(m.node_status, NodeStatus::Up);
    }
    let used = ca.get_node("b").await.unwrap();
    assert_eq!((used.machines, used.used_vcpus, used.used_mem_size_mib), (10, 10, 1280));
    // Deletes through node b reach every owner.
    for m in &made {
        b.client.delete_machine(&m.id, false).await.unwrap();
    }
    assert_eq!(ca.list_machines(&ListOptions::default()).await.unwrap().total, 0);

    // Pin, selector, and what cannot be placed.
    assert_eq!(ca.create_machine(&CreateMachine { node: Some("c".into()), ..machine("pin") }).await.unwrap().node, "c");
    let ssd = BTreeMap::from([("disk".to_string(), "ssd".to_string())]);
    let m = ca.create_machine(&CreateMachine { node_selector: Some(ssd), ..machine("sel") }).await.unwrap();
    assert_eq!(m.node, "c");
    let e = ca.create_machine(&CreateMachine { node: Some("zz".into()), ..machine("ghost") }).await.unwrap_err();
    assert_eq!(e.code(), Some("VALIDATION_ERROR"), "{e}");
    let nowhere = BTreeMap::from([("zone".to_string(), "nowhere".to_string())]);
    let e = ca.create_machine(&CreateMachine { node_selector: Some(nowhere), ..machine("lost") }).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(409), Some("CONFLICT")), "{e}");
    assert!(e.to_string().contains("no node has room for 1 vCPU / 128 MiB (zone=nowhere)"), "{e}");
    let e = ca.create_machine(&sized("huge", 2100)).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(409), Some("CONFLICT")), "{e}");
    assert!(e.to_string().contains("no node has room for 1 vCPU / 2100 MiB"), "{e}");
    for id in ["pin", "sel"] {
        ca.delete_machine(id, false).await.unwrap();
    }

    // Drain: b takes nothing new, keeps serving; undrain.
    assert_eq!(ca.drain_node("b").await.unwrap().status, NodeStatus::Drained);
    let zone_y = BTreeMap::from([("zone".to_string(), "y".to_string())]);
    for i in 0..3 {
        let req = CreateMachine { node_selector: Some(zone_y.clone()), ..machine(&format!("d{i}")) };
        assert_eq!(ca.create_machine(&req).await.unwrap().node, "c", "a drained node gets no machine");
    }
    let e = ca.create_machine(&CreateMachine { node: Some("b".into()), ..machine("d9") }).await.unwrap_err();
    assert!(e.to_string().contains("drained"), "{e}");
    let limited = a.client_with(&{
        let k = ca
            .create_api_key(&CreateApiKey { name: "ro".into(), scopes: vec![Scope::MachinesRead], expires_at: None })
            .await
            .unwrap();
        k.key
    });
    assert_eq!(limited.undrain_node("b").await.unwrap_err().status(), Some(403), "undrain needs nodes:admin");
    assert_eq!(a.cli(&["nodes", "undrain", "b", "--url", &a.url(), "--api-key", &a.key]).status.code(), Some(0));
    assert_eq!(node_status(ca, "b").await, NodeStatus::Up);
    for i in 0..3 {
        ca.delete_machine(&format!("d{i}"), false).await.unwrap();
    }

    // Two nodes creating at once never overcommit a node: 2 × 20 creates of 256 MiB against 3 × 2048 MiB.
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let client = if i % 2 == 0 { a.client.clone() } else { b.client.clone() };
            tokio::spawn(async move { client.create_machine(&sized(&format!("c{i}"), 256)).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code(), Some("CONFLICT"), "{e}"),
        }
    }
    let nodes = ca.list_nodes().await.unwrap().nodes;
    for n in &nodes {
        assert!(n.used_mem_size_mib <= NODE_MEM_MIB, "node {} overcommitted: {n:?}", n.name);
    }
    assert!((20..=24).contains(&ok), "{ok} of 40 placed");
    assert_eq!(nodes.iter().map(|n| n.used_mem_size_mib).sum::<u64>(), ok * 256);
    for i in 0..40 {
        // Dropped: the ones refused above do not exist.
        let _ = ca.delete_machine(&format!("c{i}"), false).await;
    }

    // 300 creates at once through two nodes, over 200 names, against 3 × 64 vCPU (and 3 × 64 address blocks):
    // one machine per name, no address twice on a node, no node past its capacity, every refusal a 409.
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let client = if i % 2 == 0 { a.client.clone() } else { b.client.clone() };
            tokio::spawn(async move { client.create_machine(&sized(&format!("x{}", i % 200), 4)).await })
        })
        .collect();
    let mut placed = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(m) => placed.push(m),
            Err(e) => assert_eq!((e.status(), e.code()), (Some(409), Some("CONFLICT")), "{e}"),
        }
    }
    let listed = ca.list_machines(&ListOptions { limit: Some(500), ..Default::default() }).await.unwrap().machines;
    assert_eq!(listed.len(), placed.len(), "every 201 is a machine, and nothing else is");
    let names: HashSet<_> = listed.iter().map(|m| m.spec.name.clone()).collect();
    assert_eq!(names.len(), listed.len(), "one machine per name");
    let blocks: HashSet<_> = placed.iter().map(|m| (m.node.clone(), m.guest_ip)).collect();
    assert_eq!(blocks.len(), placed.len(), "no address twice on a node");
    for n in ca.list_nodes().await.unwrap().nodes {
        assert!(n.used_vcpus <= 64, "node {} overcommitted: {n:?}", n.name);
    }
    assert!(placed.len() <= 192 && placed.len() >= 150, "{} of 200 names placed", placed.len());
    eprintln!("300 concurrent creates: {} placed, {:?}", placed.len(), per_node(ca).await);
    for m in &placed {
        ca.delete_machine(&m.id, false).await.unwrap();
    }

    // Every operation through node a on a machine of node c.
    let m = ca.create_machine(&CreateMachine { node: Some("c".into()), ..machine("remote") }).await.unwrap();
    let m = ca.start_machine(&m.id).await.unwrap();
    assert_eq!((m.status, m.node.as_str()), (MachineStatus::Running, "c"));
    assert!(common::process_alive(m.pid.unwrap()));
    let m = ca.wait_machine(&m.id, MachineStatus::Running, 5).await.unwrap();
    assert_eq!(ca.exec(&m.id, &["hostname"]).await.unwrap().exit_code, 0);
    let out = ca.exec(&m.id, &["sh", "-c", "echo via a"]).await.unwrap();
    assert_eq!(out.stdout, "via a\n");
    let req = ExecRequest {
        command: CommandArgs(vec!["sh".into(), "-c".into(), "echo one; sleep 1; echo two >&2; exit 3".into()]),
        timeout: Some(10),
        env: None,
        cwd: None,
        stdin: None,
    };
    let events: Vec<ExecEvent> =
        Box::pin(ca.exec_stream(&m.id, &req).await.unwrap()).map(|e| e.unwrap()).collect().await;
    assert_eq!(events[0], ExecEvent::Stdout { data: "one\n".into() });
    assert_eq!(events[1], ExecEvent::Stderr { data: "two\n".into() });
    assert!(matches!(events.last(), Some(ExecEvent::Exit { exit_code: 3, .. })), "{events:?}");
    let data: Vec<u8> = (0..20u32 << 20).map(|i| (i % 251) as u8).collect();
    let w = ca.upload_stream(&m.id, "/root/big.bin", data.clone(), None).await.unwrap();
    assert_eq!(w.size, data.len() as u64);
    let back = ca.download_file(&m.id, "/root/big.bin").await.unwrap();
    assert!(back[..] == data[..], "downloaded bytes differ");
    assert_eq!(ca.stat_file(&m.id, "/root/big.bin").await.unwrap().size, data.len() as u64);
    let labels = BTreeMap::from([("team".to_string(), "fleet".to_string())]);
    let patched =
        ca.update_machine(&m.id, &UpdateMachine { labels: Some(labels.clone()), ..Default::default() }).await.unwrap();
    assert_eq!(patched.spec.labels, labels);
    ca.machine_logs(&m.id, 10).await.unwrap();
    assert_eq!(ca.stop_machine(&m.id).await.unwrap().status, MachineStatus::Stopped);
    let m = ca.start_machine(&m.id).await.unwrap();
    assert_eq!(m.status, MachineStatus::Running);
    // What runs on c was made by c: its process and interface, none on a.
    assert!(a.host_links().is_empty(), "{:?}", a.host_links());
    assert_eq!(c.host_links().len(), 1, "{:?}", c.host_links());

    // A call that claims to come from a node, without the cluster secret or with a wrong one, is refused
    // even with a good user key; with the secret it is served.
    let path = format!("/machines/{}/exec", m.id);
    let body = serde_json::json!({"command": ["true"]});
    let forged = c.client.raw(HttpMethod::POST, &path).header("x-hyperfleet-forwarded-by", "a").json(&body);
    assert_eq!(forged.send().await.unwrap().status().as_u16(), 401);
    let wrong = c.client.raw(HttpMethod::POST, &path).header("x-hyperfleet-cluster-secret", "not-the-secret-at-all");
    let resp = wrong.json(&body).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert!(resp.text().await.unwrap().contains("cluster secret"));
    let no_key = Client::new(&c.url(), None);
    let right = no_key.raw(HttpMethod::POST, &path).header("x-hyperfleet-cluster-secret", SECRET).json(&body);
    assert_eq!(right.send().await.unwrap().status().as_u16(), 200);

    // Node c killed: the others keep serving, c's machine shows its node down and cannot be acted on; c
    // back re-adopts it.
    let other = ca.create_machine(&CreateMachine { node: Some("b".into()), ..machine("on-b") }).await.unwrap();
    c.kill9();
    until_status(ca, "c", NodeStatus::Down).await;
    let seen = ca.get_machine(&m.id).await.unwrap();
    assert_eq!((seen.node_status, seen.status), (NodeStatus::Down, MachineStatus::Running));
    let e = ca.exec(&m.id, &["true"]).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(503), Some("NODE_UNAVAILABLE")), "{e}");
    assert!(e.to_string().contains("down"), "{e}");
    assert_eq!(ca.start_machine(&other.id).await.unwrap().status, MachineStatus::Running, "b still serves");
    let m2 = ca.create_machine(&machine("while-c-down")).await.unwrap();
    assert_ne!(m2.node, "c", "placement skips a down node");
    c.spawn().await;
    until_status(ca, "c", NodeStatus::Up).await;
    let back = ca.get_machine(&m.id).await.unwrap();
    assert_eq!((back.status, back.pid, back.node_status), (MachineStatus::Running, m.pid, NodeStatus::Up));
    assert_eq!(ca.exec(&m.id, &["echo", "back"]).await.unwrap().stdout, "back\n");

    for id in [&m.id, &other.id] {
        ca.stop_machine(id).await.unwrap();
        ca.delete_machine(id, false).await.unwrap();
    }
    ca.delete_machine(&m2.id, false).await.unwrap();
    assert_eq!(ca.list_machines(&ListOptions::default()).await.unwrap().total, 0);
    drop((a, b, c));
    drop(pg);
}

fn error_of(v: &serde_json::Value) -> (String, String) {
    (v["error"]["code"].as_str().unwrap_or("").into(), v["error"]["message"].as_str().unwrap_or("").into())
}

#[ignore = "needs root and postgresql: a throwaway PostgreSQL cluster, two daemons' nftables tables and runc"]
#[tokio::test]
async fn one_nodes_proxy_and_terminal_reach_a_machine_on_another() {
    use futures::SinkExt;
    use hyperfleet_client::{PtyMessage, PtyOptions};
    use tokio_tungstenite::tungstenite::Message;

    let pg_dir = tempfile::tempdir().unwrap();
    let pg = PgCluster::start(pg_dir.path(), Durability::None).unwrap();
    let url = pg.url("postgres");
    let suffix = [("PROXY_HOST_SUFFIX".to_string(), ".vm.test".to_string())];
    let a = node_with(&url, "a", &suffix).await;
    let c = node_with(&url, "c", &suffix).await;
    let ca = &a.client;

    // Each node says where its proxy is and which subnet its machines' addresses come from.
    for n in ca.list_nodes().await.unwrap().nodes {
        let d = if n.name == "a" { &a } else { &c };
        assert_eq!(n.proxy_url.as_deref(), Some(d.proxy_url().as_str()), "{n:?}");
        assert_eq!(n.subnet.as_deref(), Some(d.subnet.as_str()), "{n:?}");
    }

    let req = CreateMachine { node: Some("c".into()), exposed_ports: Some(vec![8080]), ..machine("web") };
    let m = ca.create_machine(&req).await.unwrap();
    let m = ca.start_machine(&m.id).await.unwrap();
    start_testd(&a, &m.id, 8080).await;

    // The list on a shows c's machine with c's addresses (its subnet, its interface names), as c does.
    let on_c = c.client.get_machine(&m.id).await.unwrap();
    let listed = ca.list_machines(&ListOptions::default()).await.unwrap().machines;
    let via_a = listed.iter().find(|x| x.id == m.id).unwrap();
    assert_eq!(
        (via_a.guest_ip, via_a.tap_ip, &via_a.tap_device, &via_a.guest_mac),
        (on_c.guest_ip, on_c.tap_ip, &on_c.tap_device, &on_c.guest_mac)
    );
    assert!(on_c.tap_device.starts_with(&c.tap_prefix), "{}", on_c.tap_device);
    let c_net: ipnet::Ipv4Net = c.subnet.parse().unwrap();
    assert!(c_net.contains(&via_a.guest_ip), "{} is not in node c's {}", via_a.guest_ip, c.subnet);

    // Node a's proxy reaches the guest on c: path and host routing, the forwarding headers as one proxy
    // would set them, and nothing of what the nodes say to each other.
    let http = reqwest::Client::new();
    let proxy = a.proxy_url();
    let resp = http
        .get(format!("{proxy}/proxy/web/8080/headers?x=1"))
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!((v["path"].as_str(), v["query"].as_str()), (Some("/headers"), Some("x=1")));
    let h = &v["headers"];
    assert!(h["x-forwarded-for"].as_str().unwrap().starts_with("203.0.113.9, 127.0.0.1"), "{h}");
    assert_eq!(h["x-forwarded-host"], format!("127.0.0.1:{}", a.proxy_port));
    assert_eq!(h["x-machine-id"], m.id.as_str());
    let names: Vec<&String> = h.as_object().unwrap().keys().collect();
    assert!(!names.iter().any(|k| k.starts_with("x-hyperfleet")), "the guest saw the nodes' headers: {h}");
    let resp = http.get(format!("{proxy}/headers?via=host")).header("host", "web-8080.vm.test").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["query"], "via=host");

    // Bodies stream through both proxies byte-exact, both ways.
    let n = 16 << 20;
    let got = http.get(format!("{proxy}/proxy/web/8080/bytes?n={n}")).send().await.unwrap().bytes().await.unwrap();
    let pattern: Vec<u8> = (0..n).map(|i| u8::try_from(i * 7 % 251).unwrap()).collect();
    assert!(got.len() == n && got[..] == pattern[..], "download differs ({} bytes)", got.len());
    let up = pattern[..8 << 20].to_vec();
    let echoed =
        http.post(format!("{proxy}/proxy/web/8080/echo")).body(up.clone()).send().await.unwrap().bytes().await.unwrap();
    assert!(echoed[..] == up[..], "upload echo differs");

    // A WebSocket through both proxies.
    let (mut ws, resp) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/proxy/web/8080/ws", a.proxy_port)).await.unwrap();
    assert_eq!(resp.status(), 101);
    for msg in ["hello", "from node a to a guest on node c"] {
        ws.send(Message::text(msg)).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(msg));
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255])).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(vec![0u8, 1, 2, 255]));
    ws.close(None).await.unwrap();

    // Refusals come from the owner, in the envelope; calls claiming to be a node are checked.
    let resp = http.get(format!("{proxy}/proxy/web/22/")).send().await.unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(error_of(&resp.json().await.unwrap()).0, "FORBIDDEN");
    let forged = http
        .get(format!("{}/headers", c.proxy_url()))
        .header("x-hyperfleet-forwarded-by", "a")
        .header("x-hyperfleet-proxy-route", format!("{}/8080", m.id))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    assert!(error_of(&forged.json().await.unwrap()).1.contains("cluster secret"));
    // A proved call to a node that does not own the machine is refused, never forwarded again.
    let bounced = http
        .get(format!("{proxy}/headers"))
        .header("x-hyperfleet-cluster-secret", SECRET)
        .header("x-hyperfleet-forwarded-by", "c")
        .header("x-hyperfleet-proxy-route", format!("{}/8080", m.id))
        .send()
        .await
        .unwrap();
    assert_eq!(bounced.status(), 409);
    assert!(error_of(&bounced.json().await.unwrap()).1.contains("owned by node 'c'"));

    // A terminal through node a on c's machine.
    let opts = PtyOptions { cols: 90, rows: 20, ..Default::default() };
    let mut pty = ca.pty(&m.id, &opts).await.unwrap();
    pty.send(PtyMessage::Binary(b"stty size; echo \"on\"\"-$(hostname)\"; exit 5\n".to_vec().into())).await.unwrap();
    let (mut seen, mut code) = (String::new(), None);
    while code.is_none() {
        let msg = tokio::time::timeout(Duration::from_secs(15), pty.next())
            .await
            .unwrap_or_else(|_| panic!("the terminal went quiet; saw {seen:?}"))
            .expect("the terminal closed before its exit")
            .unwrap();
        match msg {
            PtyMessage::Binary(b) => seen.push_str(&String::from_utf8_lossy(&b)),
            PtyMessage::Text(t) => {
                code = serde_json::from_str::<serde_json::Value>(t.as_str()).unwrap()["exit_code"].as_i64()
            }
            _ => {}
        }
    }
    assert_eq!(code, Some(5), "{seen:?}");
    assert!(seen.contains("20 90") && seen.contains("on-web"), "{seen:?}");

    // The owner down: a's proxy says so.
    let mut c = c;
    c.kill9();
    until_status(ca, "c", NodeStatus::Down).await;
    let resp = http.get(format!("{proxy}/proxy/web/8080/headers")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    let (code, msg) = error_of(&resp.json().await.unwrap());
    assert_eq!(code, "NODE_UNAVAILABLE");
    // Down by its heartbeat, or not answering yet before a's view of the heartbeats catches up.
    assert!(msg.contains("node 'c'"), "{msg}");
    c.spawn().await;
    until_status(ca, "c", NodeStatus::Up).await;
    ca.stop_machine(&m.id).await.unwrap();
    ca.delete_machine(&m.id, false).await.unwrap();
    drop((a, c));
    drop(pg);
}

#[ignore = "needs root and postgresql: a throwaway PostgreSQL cluster, three daemons' nftables tables and runc"]
#[tokio::test]
async fn a_node_killed_during_starts_comes_back_and_leaks_nothing() {
    let pg_dir = tempfile::tempdir().unwrap();
    let pg = PgCluster::start(pg_dir.path(), Durability::None).unwrap();
    let url = pg.url("postgres");
    let a = node(&url, "a", "").await;
    let mut b = node(&url, "b", "").await;
    let c = node(&url, "c", "").await;
    let ca = &a.client;
    let on_c = ca.create_machine(&CreateMachine { node: Some("c".into()), ..machine("steady") }).await.unwrap();
    assert_eq!(ca.start_machine(&on_c.id).await.unwrap().status, MachineStatus::Running);
    let mut on_b = Vec::new();
    for i in 0..8 {
        on_b.push(
            ca.create_machine(&CreateMachine { node: Some("b".into()), ..machine(&format!("b{i}")) }).await.unwrap(),
        );
    }

    // Eight starts through node a on node b's machines; b is killed while they run.
    let starts: Vec<_> = on_b
        .iter()
        .map(|m| {
            let (client, id) = (ca.clone(), m.id.clone());
            tokio::spawn(async move { client.start_machine(&id).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !b.logs().contains("machine running") {
        assert!(Instant::now() < deadline, "no start got under way on b:\n{}", b.logs());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    b.kill9();
    let mut refused = 0;
    for s in starts {
        match s.await.unwrap() {
            Ok(m) => assert_eq!(m.status, MachineStatus::Running),
            Err(e) => {
                // Cut off mid-call, or refused once b's death was seen: a clean 503 either way.
                assert_eq!((e.status(), e.code()), (Some(503), Some("NODE_UNAVAILABLE")), "{e}");
                refused += 1;
            }
        }
    }
    eprintln!("{refused} of 8 starts were cut off by the kill");

    // The others keep serving; b's machines show their node down and are not acted on by anyone else.
    assert_eq!(ca.exec(&on_c.id, &["echo", "still here"]).await.unwrap().stdout, "still here\n");
    until_status(ca, "b", NodeStatus::Down).await;
    for m in &on_b {
        let seen = c.client.get_machine(&m.id).await.unwrap();
        assert_eq!((seen.node.as_str(), seen.node_status), ("b", NodeStatus::Down));
    }
    let e = ca.stop_machine(&on_b[0].id).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(503), Some("NODE_UNAVAILABLE")), "{e}");
    assert_ne!(ca.create_machine(&machine("elsewhere")).await.unwrap().node, "b", "placement skips a down node");

    // b back: it reconciles, so every machine of it is settled (running with its process, or not running)
    // and answers; then each starts, and deleting them all leaves nothing of them on the host.
    b.spawn().await;
    until_status(ca, "b", NodeStatus::Up).await;
    for m in &on_b {
        let seen = ca.get_machine(&m.id).await.unwrap();
        match seen.status {
            MachineStatus::Running => {
                assert!(seen.pid.is_some_and(common::process_alive), "{seen:?}");
                assert_eq!(ca.exec(&m.id, &["true"]).await.unwrap().exit_code, 0);
            }
            MachineStatus::Stopped | MachineStatus::Pending | MachineStatus::Failed => {
                assert_eq!(ca.start_machine(&m.id).await.unwrap().status, MachineStatus::Running, "{seen:?}");
            }
            other => panic!("machine {} left {other} after b came back: {seen:?}", m.id),
        }
    }
    assert_eq!(b.host_links().len(), on_b.len(), "one interface per machine: {:?}", b.host_links());
    for m in &on_b {
        ca.delete_machine(&m.id, true).await.unwrap();
    }
    assert!(b.host_links().is_empty(), "{:?}", b.host_links());
    assert!(b.firewall_ifaces().is_empty(), "{:?}", b.firewall_ifaces());
    assert_eq!(ca.get_node("b").await.unwrap().machines, 0);
    for m in ca.list_machines(&ListOptions::default()).await.unwrap().machines {
        ca.delete_machine(&m.id, true).await.unwrap();
    }
    drop((a, b, c));
    drop(pg);
}

/// A WebSocket to the echo server of machine `m` through the proxy on `port`, from local address `src`.
async fn tunnel_from(
    src: &str,
    port: u16,
    m: &str,
) -> Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, String> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
    let stream = sock.connect(format!("127.0.0.1:{port}").parse().unwrap()).await.map_err(|e| e.to_string())?;
    let url = format!("ws://127.0.0.1:{port}/proxy/{m}/8080/ws");
    tokio_tungstenite::client_async(url, stream).await.map(|(ws, _)| ws).map_err(|e| e.to_string())
}

#[ignore = "needs root and postgresql: a throwaway PostgreSQL cluster, two daemons' nftables tables and runc"]
#[tokio::test]
async fn the_per_address_cap_holds_clients_but_not_the_other_nodes() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;

    let pg_dir = tempfile::tempdir().unwrap();
    let pg = PgCluster::start(pg_dir.path(), Durability::None).unwrap();
    let url = pg.url("postgres");
    let cap = [("HYPERFLEET_MAX_CONNECTIONS_PER_IP".to_string(), "4".to_string())];
    let a = node_with(&url, "a", &cap).await;
    let c = node_with(&url, "c", &cap).await;
    let ca = &a.client;
    let req = CreateMachine { node: Some("c".into()), exposed_ports: Some(vec![8080]), ..machine("web") };
    let m = ca.create_machine(&req).await.unwrap();
    ca.start_machine(&m.id).await.unwrap();
    start_testd(&a, &m.id, 8080).await;
    // Each node has seen the other (a heartbeat or two).
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Eight tunnels through node a, four from each of two client addresses: a holds each client to 4, and c
    // takes all eight from a's one address.
    let mut tunnels = Vec::new();
    for src in ["127.0.0.2", "127.0.0.3"] {
        for _ in 0..4 {
            tunnels.push(tunnel_from(src, a.proxy_port, &m.id).await.expect("a tunnel within the client's cap"));
        }
    }
    for (i, ws) in tunnels.iter_mut().enumerate() {
        let msg = format!("tunnel {i}");
        ws.send(Message::text(msg.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(msg), "tunnel {i} through c's proxy");
    }
    let e = tunnel_from("127.0.0.2", a.proxy_port, &m.id).await.expect_err("a fifth from one client is refused");
    assert!(e.contains("503"), "{e}");
    // And c holds an outside client to 4 as well.
    let mut direct = Vec::new();
    for _ in 0..4 {
        direct.push(tunnel_from("127.0.0.4", c.proxy_port, &m.id).await.expect("within the cap"));
    }
    assert!(tunnel_from("127.0.0.4", c.proxy_port, &m.id).await.is_err(), "a fifth from one client, on c");
    drop((tunnels, direct));
    ca.stop_machine(&m.id).await.unwrap();
    ca.delete_machine(&m.id, false).await.unwrap();
    drop((a, c));
    drop(pg);
}

#[ignore = "needs root and postgresql: a throwaway PostgreSQL cluster, two daemons, runc and test hosts in network namespaces"]
#[tokio::test]
async fn guests_cannot_reach_the_other_nodes_of_the_fleet() {
    let pg_dir = tempfile::tempdir().unwrap();
    let pg = PgCluster::start(pg_dir.path(), Durability::None).unwrap();
    let url = pg.url("postgres");
    // Two test hosts: one where another node of the fleet says it is, one that is just the internet.
    let (far, near) = (common::TestNet::new(41), common::TestNet::new(42));
    let _far_seen = far.serve(8000);
    let _near_seen = near.serve(8000);
    let a = node(&url, "a", "").await;
    let far_url = [("HYPERFLEET_NODE_URL".to_string(), format!("http://{}:3000", far.peer_ip))];
    let other = node_with(&url, "far", &far_url).await;
    let m = common::running(&a, CreateMachine { node: Some("a".into()), ..machine("inside") }).await;
    assert_eq!(m.node, "a");

    // Within a heartbeat or two, node a's firewall fences the other node's address off from its machines.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.firewall_set("fenced_hosts").contains(&far.peer_ip) {
        assert!(Instant::now() < deadline, "never fenced: {:?}", a.firewall_set("fenced_hosts"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reach = |host: &str| format!("nc -w 2 {host} 8000 </dev/null");
    let (code, out, _) = common::sh(&a, &m.id, &reach(&near.peer_ip)).await;
    assert_eq!((code, out.as_str()), (0, "HTTP/1.0 200 OK\r\nContent-Length: 24\r\n\r\nhello from the internet\n"));
    let (code, out, _) = common::sh(&a, &m.id, &reach(&far.peer_ip)).await;
    assert_ne!(code, 0, "a guest reached another node of the fleet: {out}");
    assert!(out.is_empty(), "{out}");

    a.client.stop_machine(&m.id).await.unwrap();
    a.client.delete_machine(&m.id, false).await.unwrap();
    drop((a, other));
    drop(pg);
}
