//! Child machines against the real daemon (container runtime): a script inside a parent machine, using only
//! `HYPERFLEET_URL` and the token file (busybox `nc`), creates, starts, execs in and deletes children; quotas
//! and everything outside its tree are 403; the token is worth nothing outside its machine; only spawn
//! machines reach the child API port, and only on their own gateway; a child's end fires the parent's
//! webhook; parent stop and delete take the children along and leak nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use common::{Daemon, Options, machine, running, sh};
use hyperfleet_client::types::*;
use hyperfleet_client::{Client, ListOptions};
use serde_json::{Value, json};

/// The guest side: one HTTP/1.0 request with busybox nc, to `$HYPERFLEET_URL`, with the token from
/// `$HYPERFLEET_TOKEN_FILE`. Prints the raw response.
const API: &str = r#"api() {
  tok=$(cat "$HYPERFLEET_TOKEN_FILE") || exit 90
  hp=${HYPERFLEET_URL#http://}
  body=$3
  printf '%s %s HTTP/1.0\r\nHost: %s\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %s\r\n\r\n%s' \
    "$1" "$2" "$hp" "$tok" "${#body}" "$body" | nc -w 20 "${hp%:*}" "${hp#*:}"
}
"#;

/// Status and JSON body of a raw HTTP response.
fn parse(raw: &str) -> (u16, Value) {
    let status = raw.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// One API request made from inside machine `via` with its own token.
async fn call(d: &Daemon, via: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    assert!(!body.contains('\''), "bodies are single-quoted for the guest shell");
    let (code, out, err) = sh(d, via, &format!("{API}api {method} '{path}' '{body}'")).await;
    assert_eq!(code, 0, "{method} {path} from {via}: exit {code}, {err}\n{out}");
    let (status, json) = parse(&out);
    assert_ne!(status, 0, "{method} {path} from {via}: no HTTP response: {out:?} {err}");
    (status, json)
}

fn kid(name: &str, vcpu: i64, mem: i64) -> Value {
    json!({"name": name, "vcpu_count": vcpu, "mem_size_mib": mem})
}

fn spawning(name: &str, children: i64, vcpu: i64, mem: i64) -> CreateMachine {
    CreateMachine {
        spawn: Some(SpawnRequest { max_children: Some(children), max_vcpu: Some(vcpu), max_mem_mib: Some(mem) }),
        ..machine(name)
    }
}

async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A webhook receiver on loopback: keeps every body it is sent.
async fn receiver() -> (String, Arc<Mutex<Vec<WebhookPayload>>>) {
    let got: Arc<Mutex<Vec<WebhookPayload>>> = Arc::default();
    async fn receive(State(got): State<Arc<Mutex<Vec<WebhookPayload>>>>, body: Bytes) -> &'static str {
        got.lock().unwrap().push(serde_json::from_slice(&body).unwrap());
        "ok"
    }
    let app = axum::Router::new().fallback(receive).with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), got)
}

async fn connects(d: &Daemon, id: &str, host: &str, port: u16) -> bool {
    sh(d, id, &format!("nc -w 3 {host} {port} </dev/null")).await.0 == 0
}

/// The `api_gateways` set of the daemon's table, as nft lists it.
fn api_gateways(d: &Daemon) -> String {
    let out = Command::new("nft").args(["list", "set", "inet", &d.table, "api_gateways"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn runc_containers() -> BTreeSet<String> {
    let runc = Command::new("runc").args(["--root", "/run/hyperfleet/runc", "list", "-q"]).output().unwrap();
    String::from_utf8_lossy(&runc.stdout).lines().map(str::to_string).collect()
}

#[ignore = "needs root: runc container machines, nftables, TAP/veth"]
#[tokio::test]
async fn a_machine_drives_its_own_children_and_nothing_else() {
    let d = Daemon::start(Options::default()).await;
    let (hook_url, deliveries) = receiver().await;

    let mut parent_req = spawning("parent", 3, 3, 256);
    parent_req.env = Some(BTreeMap::from([("FOO".to_string(), "from-parent".to_string())]));
    let parent = running(&d, parent_req).await;
    let spawn = parent.spec.spawn.expect("spawn is shown");
    assert_eq!((spawn.max_children, spawn.max_vcpu, spawn.max_mem_mib), (3, 3, 256));
    let hook = d
        .client
        .create_webhook(&CreateWebhook {
            url: Some(hook_url),
            events: Some(vec!["machine.stopped".into()]),
            label_selector: Some(format!("hyperfleet.dev/parent={}", parent.id)),
            secret: None,
        })
        .await
        .unwrap();

    // What the guest is given: the URL of its gateway and a root-only token file.
    let (_, env_out, _) = sh(&d, &parent.id, "echo $HYPERFLEET_URL $HYPERFLEET_TOKEN_FILE").await;
    assert_eq!(
        env_out.trim(),
        format!("http://{}:{} /run/hyperfleet/token", parent.tap_ip, d.child_port),
        "the child API on the machine's own gateway"
    );
    let st = d.client.stat_file(&parent.id, "/run/hyperfleet/token").await.unwrap();
    assert_eq!(st.mode & 0o777, 0o600, "the token file is root's only");
    let dir = d.client.stat_file(&parent.id, "/run/hyperfleet").await.unwrap();
    assert_eq!(dir.mode & 0o777, 0o700);

    // One script: create, start, exec in and delete a child, with only the URL and the token.
    let script = format!(
        "{API}api POST /machines '{}' | head -1\napi POST /machines/kid-a/start '' | head -1\n\
         api POST /machines/kid-a/exec '{}' | tail -1; echo\napi DELETE '/machines/kid-a?force=true' '' | head -1",
        kid("kid-a", 1, 64),
        json!({"command": ["sh", "-c", "echo hello from $FOO in $(hostname)"]}),
    );
    let (code, out, err) = sh(&d, &parent.id, &script).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert!(lines[0].starts_with("HTTP/1.0 201"), "create: {out}");
    assert!(lines[1].starts_with("HTTP/1.0 200"), "start: {out}");
    let exec: Value = serde_json::from_str(lines[2]).unwrap_or_else(|e| panic!("exec: {e}: {out}"));
    assert_eq!(exec["stdout"], "hello from from-parent in kid-a\n", "the parent's env is inherited: {out}");
    assert!(lines[3].starts_with("HTTP/1.0 204"), "delete: {out}");
    assert!(matches!(d.client.get_machine("kid-a").await, Err(e) if e.status() == Some(404)));

    // Children, their parent_id and the quotas (3 children, 3 vCPUs, 256 MiB; every child counts).
    let (s, c1) = call(&d, &parent.id, "POST", "/machines", Some(kid("kid-1", 1, 64))).await;
    assert_eq!(s, 201, "{c1}");
    assert_eq!(c1["parent_id"], parent.id.as_str());
    assert_eq!(c1["labels"]["hyperfleet.dev/parent"], parent.id.as_str());
    let mut own = kid("kid-2", 1, 64);
    own["inherit_env"] = json!(false);
    own["env"] = json!({"BAR": "own"});
    assert_eq!(call(&d, &parent.id, "POST", "/machines", Some(own)).await.0, 201);
    let (s, e) = call(&d, &parent.id, "POST", "/machines", Some(kid("kid-3", 2, 64))).await;
    assert_eq!((s, e["error"]["code"].as_str()), (403, Some("FORBIDDEN")), "vCPU quota: {e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("spawn.max_vcpu"), "{e}");
    let (s, e) = call(&d, &parent.id, "POST", "/machines", Some(kid("kid-3", 1, 200))).await;
    assert_eq!(s, 403, "memory quota: {e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("spawn.max_mem_mib"), "{e}");
    assert_eq!(call(&d, &parent.id, "POST", "/machines", Some(kid("kid-3", 1, 64))).await.0, 201);
    let (s, e) = call(&d, &parent.id, "POST", "/machines", Some(kid("kid-4", 1, 4))).await;
    assert_eq!(s, 403, "children quota: {e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("spawn.max_children"), "{e}");

    for k in ["kid-1", "kid-2"] {
        assert_eq!(call(&d, &parent.id, "POST", &format!("/machines/{k}/start"), None).await.0, 200);
    }
    let cmd = json!({"command": ["sh", "-c", "echo [$FOO][$BAR]"]});
    let (s, r) = call(&d, &parent.id, "POST", "/machines/kid-2/exec", Some(cmd)).await;
    assert_eq!((s, r["stdout"].as_str()), (200, Some("[][own]\n")), "inherit_env false: {r}");
    let (s, r) = call(&d, &parent.id, "GET", &format!("/machines/{}/children", parent.id), None).await;
    assert_eq!(s, 200);
    let names: Vec<&str> = r["machines"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["kid-1", "kid-2", "kid-3"]);
    let (s, w) = call(&d, &parent.id, "GET", "/machines/kid-1/wait?status=running&timeout=5", None).await;
    assert_eq!((s, w["status"].as_str()), (200, Some("running")));
    let up = json!({"path": "/root/note", "content": "aGk="});
    assert_eq!(call(&d, &parent.id, "POST", "/machines/kid-1/files", Some(up)).await.0, 201);
    assert_eq!(call(&d, &parent.id, "GET", "/machines/kid-1/files/stat?path=/root/note", None).await.0, 200);
    // The host sees the same tree.
    let listed = d.client.machine_children(&parent.id).await.unwrap();
    assert_eq!(listed.total, 3);

    // Everything outside the tree: other machines (a plain sibling, another tree and its child, the parent
    // itself), keys, volumes, webhooks, images, events, the machine list; spawn and volumes in a create.
    let sibling = running(&d, machine("sibling")).await;
    let other = running(&d, spawning("other", 1, 1, 128)).await;
    let (s, oc) = call(&d, &other.id, "POST", "/machines", Some(kid("other-kid", 1, 64))).await;
    assert_eq!(s, 201, "{oc}");
    assert_eq!(call(&d, &other.id, "POST", "/machines/other-kid/start", None).await.0, 200);
    d.client.create_volume(&CreateVolume { name: Some("vol".into()), size_mib: Some(16) }).await.unwrap();
    let exec = Some(json!({"command": ["true"]}));
    for (method, path, body) in [
        ("GET", "/machines".to_string(), None),
        ("GET", format!("/machines/{}", parent.id), None),
        ("POST", format!("/machines/{}/stop", parent.id), None),
        ("GET", format!("/machines/{}", sibling.id), None),
        ("POST", "/machines/sibling/exec".to_string(), exec.clone()),
        ("DELETE", "/machines/sibling?force=true".to_string(), None),
        ("GET", "/machines/other".to_string(), None),
        ("GET", "/machines/other/children".to_string(), None),
        ("GET", "/machines/other-kid".to_string(), None),
        ("POST", "/machines/other-kid/stop".to_string(), None),
        ("POST", "/machines/other-kid/exec".to_string(), exec.clone()),
        ("GET", "/machines/no-such-machine".to_string(), None),
        ("PATCH", "/machines/kid-1".to_string(), Some(json!({"labels": {}}))),
        ("POST", "/machines/kid-1/restart".to_string(), None),
        ("GET", "/machines/kid-1/logs".to_string(), None),
        ("GET", "/api-keys".to_string(), None),
        ("POST", "/api-keys".to_string(), Some(json!({"name": "x", "scopes": ["*"]}))),
        ("GET", "/volumes".to_string(), None),
        ("DELETE", "/volumes/vol".to_string(), None),
        ("GET", "/webhooks".to_string(), None),
        ("GET", "/images".to_string(), None),
        ("GET", "/events".to_string(), None),
        ("GET", "/metrics".to_string(), None),
        (
            "POST",
            "/machines".to_string(),
            Some(json!({"name": "g", "vcpu_count": 1, "mem_size_mib": 64,
            "spawn": {"max_children": 1, "max_vcpu": 1, "max_mem_mib": 64}})),
        ),
        (
            "POST",
            "/machines".to_string(),
            Some(json!({"name": "v", "vcpu_count": 1, "mem_size_mib": 64,
            "volumes": [{"volume": "vol", "mount_path": "/data"}]})),
        ),
    ] {
        let (s, e) = call(&d, &parent.id, method, &path, body).await;
        assert_eq!((s, e["error"]["code"].as_str()), (403, Some("FORBIDDEN")), "{method} {path}: {e}");
    }
    // The other tree is untouched; a child (no spawn) has no token and reaches nothing.
    let still = d.client.get_machine("other-kid").await.unwrap();
    assert_eq!(still.status, MachineStatus::Running);
    assert!(d.client.get_volume("vol").await.is_ok());
    let (_, kid_env, _) = sh(&d, "kid-1", "echo [$HYPERFLEET_URL]; ls /run/hyperfleet 2>&1").await;
    assert!(kid_env.starts_with("[]"), "{kid_env}");

    // The token is bound to its machine: from the host (child port or main API) it is refused.
    let token = String::from_utf8(d.client.download_file(&parent.id, "/run/hyperfleet/token").await.unwrap().to_vec())
        .unwrap()
        .trim()
        .to_string();
    assert!(token.starts_with("hfc_"), "{token}");
    for url in [format!("http://127.0.0.1:{}", d.child_port), d.url()] {
        let e = Client::new(&url, Some(token.clone())).get_machine("kid-1").await.unwrap_err();
        assert_eq!(e.status(), Some(401), "{url}: {e}");
    }
    // An API key is refused on the child port, whatever its scopes (and works on the API as ever).
    let k = d.client.get_machine("kid-1").await.unwrap();
    assert_eq!(k.spec.parent_id.as_deref(), Some(parent.id.as_str()));
    let e = Client::new(&format!("http://127.0.0.1:{}", d.child_port), Some(d.key.clone()))
        .get_machine("kid-1")
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");

    // Network: the child port only for spawn machines, only on their own gateway; nothing else opens.
    let opened = api_gateways(&d);
    assert!(opened.contains(&format!("\"{}\"", parent.tap_device)), "{opened}");
    assert!(opened.contains(&format!("\"{}\"", other.tap_device)), "{opened}");
    assert!(!opened.contains(&format!("\"{}\"", sibling.tap_device)), "{opened}");
    let elsewhere = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let other_port = elsewhere.local_addr().unwrap().port();
    assert!(connects(&d, &parent.id, &parent.tap_ip.to_string(), d.child_port).await);
    assert!(!connects(&d, &sibling.id, &sibling.tap_ip.to_string(), d.child_port).await, "no spawn, no opening");
    let kid1 = d.client.get_machine("kid-1").await.unwrap();
    assert!(!connects(&d, &kid1.id, &kid1.tap_ip.to_string(), d.child_port).await, "a child has no spawn");
    assert!(!connects(&d, &parent.id, &parent.tap_ip.to_string(), other_port).await, "another host port");
    assert!(!connects(&d, &parent.id, &sibling.tap_ip.to_string(), d.child_port).await, "another gateway");
    drop(elsewhere);

    // A child's end fires the parent's webhook (its events carry parent_id and the parent label).
    assert_eq!(call(&d, &parent.id, "POST", "/machines/kid-2/stop", None).await.0, 200);
    let got = eventually("the child's machine.stopped delivery", || {
        let got = deliveries.lock().unwrap().clone();
        async move { got.into_iter().find(|p| p.event.machine_name == "kid-2") }
    })
    .await;
    assert_eq!((got.webhook_id.as_str(), got.event_type.as_str()), (hook.id.as_str(), "machine.stopped"));
    assert_eq!(got.event.parent_id.as_deref(), Some(parent.id.as_str()));

    // Parent stop → its running children stop; the old token is revoked, a restart gives a new one.
    d.client.stop_machine(&other.id).await.unwrap();
    eventually("other-kid stopped with its parent", || async {
        let m = d.client.get_machine("other-kid").await.unwrap();
        (m.status == MachineStatus::Stopped).then_some(())
    })
    .await;

    // Parent delete → children deleted, nothing left on the host.
    let kid_ids: Vec<String> =
        d.client.machine_children(&parent.id).await.unwrap().machines.into_iter().map(|m| m.id).collect();
    d.client.delete_machine(&parent.id, true).await.unwrap();
    for id in kid_ids.iter().chain([&parent.id]) {
        let e = d.client.get_machine(id).await.unwrap_err();
        assert_eq!(e.status(), Some(404), "{id}");
        assert!(!runc_containers().contains(&format!("hf-{id}")), "container of {id}");
        assert!(!std::path::Path::new(&format!("/run/netns/hf-{id}")).exists(), "netns of {id}");
        assert!(!d.dir.path().join("machines").join(id).exists(), "data directory of {id}");
    }
    let left = d.client.list_machines(&ListOptions::default()).await.unwrap().machines;
    let mut taps: Vec<String> =
        left.iter().filter(|m| m.status == MachineStatus::Running).map(|m| m.tap_device.clone()).collect();
    taps.sort();
    let mut links = d.host_links();
    links.sort();
    assert_eq!(links, taps, "interfaces on the host: only the other machines'");
    assert_eq!(d.firewall_ifaces(), taps, "firewall");
    assert!(!api_gateways(&d).contains("\" . "), "the spawn machines are gone or stopped: {}", api_gateways(&d));
    let db = hyperfleet::testing::Store::open_file(&d.dir.path().join("hyperfleet.db")).await.unwrap();
    let count = |sql: &'static str| {
        let db = db.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&mut *db.read().await.unwrap()).await.unwrap() }
    };
    assert_eq!(
        count("SELECT COUNT(*) FROM leases").await,
        i64::try_from(left.len()).unwrap(),
        "leases: one per machine left"
    );
    assert_eq!(count("SELECT COUNT(*) FROM child_tokens").await, 0, "no token outlives its running parent");
}
