//! Sandboxes people live in, end to end on the real daemon (container runtime): a terminal over WebSocket and
//! the CLI's `shell` in a real terminal (tmux); lifecycle policies (ttl, idle with each kind of activity,
//! timers across a kill -9); wake on request; labels; env and write-only secrets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Daemon, Options, machine, running, serve_testd, sh, start_testd};
use futures::{SinkExt, StreamExt};
use hyperfleet_client::types::*;
use hyperfleet_client::{ListOptions, PtyMessage, PtyOptions, PtyStream};

/// Reads terminal output until `want` appears; panics on exit or after 15 s. Returns everything read.
async fn read_until(ws: &mut PtyStream, want: &str) -> String {
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !seen.contains(want) {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {want:?} in time; saw {seen:?}"))
            .expect("the terminal closed")
            .unwrap();
        match msg {
            PtyMessage::Binary(b) => seen.push_str(&String::from_utf8_lossy(&b)),
            PtyMessage::Text(t) => panic!("control message {t} before {want:?}; saw {seen:?}"),
            _ => {}
        }
    }
    seen
}

/// Reads until the exit message; returns the exit code.
async fn exit_code(ws: &mut PtyStream) -> i64 {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(15), ws.next()).await.unwrap().unwrap().unwrap();
        if let PtyMessage::Text(t) = msg {
            let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
            assert_eq!(v["type"], "exit", "{v}");
            return v["exit_code"].as_i64().unwrap();
        }
    }
}

async fn send(ws: &mut PtyStream, text: &str) {
    ws.send(PtyMessage::Binary(text.as_bytes().to_vec().into())).await.unwrap();
}

async fn resize(ws: &mut PtyStream, cols: u16, rows: u16) {
    let msg = serde_json::json!({"type": "resize", "cols": cols, "rows": rows}).to_string();
    ws.send(PtyMessage::Text(msg.into())).await.unwrap();
}

#[ignore = "needs root: runc container, veth and nftables"]
#[tokio::test]
async fn a_terminal_session_end_to_end() {
    let d = Daemon::start(Options::default()).await;
    let req =
        CreateMachine { env: Some([("GREETING".to_string(), "hello-env".to_string())].into()), ..machine("term") };
    let m = running(&d, req).await;
    let opts = PtyOptions { cols: 100, rows: 30, ..Default::default() };
    let mut ws = d.client.pty(&m.id, &opts).await.unwrap();
    // Quotes split the markers, so that the terminal's echo of the command line does not match them.
    send(&mut ws, "stty size; tty; echo \"T\"\"ERM=$TERM $GREETING\"\n").await;
    let seen = read_until(&mut ws, "TERM=xterm-256color hello-env").await;
    assert!(seen.contains("30 100"), "{seen:?}");
    assert!(seen.contains("/dev/pts/"), "{seen:?}");
    resize(&mut ws, 120, 40).await;
    send(&mut ws, "stty size\n").await;
    read_until(&mut ws, "40 120").await;

    // A second session at the same time, with its own command.
    let two = PtyOptions { command: vec!["sh".into(), "-c".into(), "echo second-$((6*7)); exit 4".into()], ..opts };
    let mut other = d.client.pty(&m.id, &two).await.unwrap();
    read_until(&mut other, "second-42").await;
    assert_eq!(exit_code(&mut other).await, 4);

    send(&mut ws, "exit 3\n").await;
    assert_eq!(exit_code(&mut ws).await, 3);

    // Errors are answered before the upgrade, with the envelope.
    let e = d.client.pty(&m.id, &PtyOptions { cols: 0, ..Default::default() }).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(400), Some("VALIDATION_ERROR")), "{e}");
    let e = d.client.pty("nope-nope", &PtyOptions::default()).await.unwrap_err();
    assert_eq!(e.status(), Some(404));
    let bad = PtyOptions { command: vec!["/no/such/program".into()], ..Default::default() };
    assert_eq!(d.client.pty(&m.id, &bad).await.unwrap_err().status(), Some(400));
    let plain = d.client.raw(hyperfleet_client::HttpMethod::GET, &format!("/machines/{}/pty", m.id)).send().await;
    let plain = plain.unwrap();
    assert_eq!(plain.status(), 400);
    assert!(plain.text().await.unwrap().contains("\"code\":\"BAD_REQUEST\""));
}

#[ignore = "needs root: runc container, veth and nftables"]
#[tokio::test]
async fn a_terminal_whose_client_vanishes_is_hung_up() {
    let opts = Options { env: vec![("HYPERFLEET_PTY_CLIENT_TIMEOUT".into(), "2".into())], ..Options::default() };
    let d = Daemon::start(opts).await;
    let m = running(&d, machine("vanish")).await;
    let mut ws = d.client.pty(&m.id, &PtyOptions::default()).await.unwrap();
    send(&mut ws, "sleep 1000 & echo \"P\"\"ID=$!;\"\n").await;
    let seen = read_until(&mut ws, ";\r\n").await;
    let pid = seen.split("PID=").nth(1).and_then(|t| t.split(';').next()).unwrap().to_string();
    // The client stops reading and answering (its TCP connection stays open): forgotten, not closed.
    let _stuck = ws.into_inner();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, _, _) = sh(&d, &m.id, &format!("kill -0 {pid}")).await;
        if code != 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the session of a vanished client was never hung up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(d.logs().contains("terminal client stopped answering"), "{}", d.logs());
}

fn tmux(socket: &str, args: &[&str]) -> String {
    let out = Command::new("tmux").arg("-L").arg(socket).args(args).output().expect("tmux (apt-get install tmux)");
    assert!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the pane shows `want`; returns the pane.
fn pane_until(socket: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pane = tmux(socket, &["capture-pane", "-p", "-t", "t"]);
        if pane.contains(want) {
            return pane;
        }
        assert!(Instant::now() < deadline, "the pane never showed {want:?}:\n{pane}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Ends the test's tmux server (only ours: its own socket name).
struct TmuxServer(String);

impl Drop for TmuxServer {
    fn drop(&mut self) {
        // Dropped: the server may be gone already.
        let _ = Command::new("tmux").args(["-L", &self.0, "kill-server"]).output();
    }
}

#[ignore = "needs root: runc container, veth and nftables"]
#[tokio::test]
async fn the_cli_shell_in_a_real_terminal() {
    let d = Daemon::start(Options::default()).await;
    let m = running(&d, machine("cli-shell")).await;
    let socket = format!("hf-test-{}", std::process::id());
    let _server = TmuxServer(socket.clone());
    let dir = d.dir.path();
    let (before, after) = (dir.join("stty-before"), dir.join("stty-after"));
    // The local terminal's settings before and after, to check the shell restores them.
    let script = format!(
        "stty -g > {before}; HYPERFLEET_URL={url} HYPERFLEET_API_KEY={key} {bin} machines shell {name}; \
         echo SHELL-EXIT=$?; stty -g > {after}; sleep 120",
        before = before.display(),
        after = after.display(),
        url = d.url(),
        key = d.key,
        bin = common::bin(),
        name = m.spec.name,
    );
    tmux(&socket, &["new-session", "-d", "-s", "t", "-x", "100", "-y", "30", "sh", "-c", &script]);
    tmux(&socket, &["send-keys", "-t", "t", "stty size; echo \"T\"\"ERM=$TERM\"", "Enter"]);
    let pane = pane_until(&socket, "TERM=xterm-256color");
    assert!(pane.contains("30 100"), "{pane}");
    // A window size change reaches the remote terminal (SIGWINCH → resize).
    tmux(&socket, &["resize-window", "-t", "t", "-x", "120", "-y", "40"]);
    std::thread::sleep(Duration::from_millis(500));
    tmux(&socket, &["send-keys", "-t", "t", "clear; stty size", "Enter"]);
    pane_until(&socket, "40 120");
    // Raw mode: Ctrl-C goes to the remote command, not to the local CLI.
    tmux(&socket, &["send-keys", "-t", "t", "sleep 100", "Enter"]);
    std::thread::sleep(Duration::from_millis(500));
    tmux(&socket, &["send-keys", "-t", "t", "C-c"]);
    tmux(&socket, &["send-keys", "-t", "t", "echo still-\"here\"", "Enter"]);
    pane_until(&socket, "still-here");
    tmux(&socket, &["send-keys", "-t", "t", "exit 5", "Enter"]);
    pane_until(&socket, "SHELL-EXIT=5");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !after.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(100));
    let (b, a) = (std::fs::read_to_string(&before).unwrap(), std::fs::read_to_string(&after).unwrap());
    assert_eq!(b, a, "the local terminal's settings were not restored");
}

async fn wait_status(d: &Daemon, id: &str, want: MachineStatus, within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        match d.client.get_machine(id).await {
            Ok(m) if m.status == want => return Instant::now(),
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < deadline, "{id} did not become {want} within {within:?}:\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_gone(d: &Daemon, id: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while d.client.get_machine(id).await.is_ok() {
        assert!(Instant::now() < deadline, "{id} was not deleted within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[ignore = "needs root: runc containers, veth and nftables"]
#[tokio::test]
async fn ttl_stops_or_deletes_a_machine() {
    let d = Daemon::start(Options::default()).await;
    let stop = running(&d, CreateMachine { ttl_seconds: Some(2), ..machine("ttl-stop") }).await;
    let delete =
        running(&d, CreateMachine { ttl_seconds: Some(2), on_ttl: Some(TtlAction::Delete), ..machine("ttl-del") })
            .await;
    let expires = stop.expires_at.expect("a running machine with a ttl shows when it expires");
    assert!(
        expires > stop.updated_at - time::Duration::seconds(1)
            && expires <= stop.updated_at + time::Duration::seconds(3)
    );
    // Activity does not matter to a ttl.
    sh(&d, &stop.id, "true").await;
    wait_status(&d, &stop.id, MachineStatus::Stopped, Duration::from_secs(10)).await;
    assert!(hyperfleet_types::timestamp::now() >= expires, "stopped before it expired");
    assert_eq!(d.client.get_machine(&stop.id).await.unwrap().expires_at, None);
    wait_gone(&d, &delete.id, Duration::from_secs(10)).await;
    // A keepalive pushes the expiry out.
    let kept = running(&d, CreateMachine { ttl_seconds: Some(3), ..machine("ttl-kept") }).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let k = d.client.keepalive(&kept.id).await.unwrap();
    assert!(k.expires_at.unwrap() > kept.expires_at.unwrap());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(d.client.get_machine(&kept.id).await.unwrap().status, MachineStatus::Running);
    wait_status(&d, &kept.id, MachineStatus::Stopped, Duration::from_secs(10)).await;
}

#[ignore = "needs root: runc container, veth and nftables"]
#[tokio::test]
async fn idle_machines_stop_and_every_kind_of_activity_resets_the_clock() {
    let d = Daemon::start(Options::default()).await;
    let req = CreateMachine {
        exposed_ports: Some(vec![8080]),
        idle_timeout_seconds: Some(3),
        idle_max_connection_seconds: Some(2),
        ..machine("idler")
    };
    let m = running(&d, req).await;
    start_testd(&d, &m.id, 8080).await;
    assert!(d.client.get_machine(&m.id).await.unwrap().idle_since.is_some());
    let url = format!("{}/proxy/{}/8080/headers", d.proxy_url(), m.id);
    let http = reqwest::Client::new();
    // Each kind of activity, 2 s apart (the timeout is 3 s): 10 s in all, and the machine keeps running.
    for round in 0..5 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        match round % 4 {
            0 => assert_eq!(sh(&d, &m.id, "true").await.0, 0),
            1 => {
                d.client.stat_file(&m.id, "/etc/passwd").await.unwrap();
            }
            2 => assert_eq!(http.get(&url).send().await.unwrap().status(), 200),
            _ => {
                let opts = PtyOptions { command: vec!["sh".into()], ..Default::default() };
                let mut ws = d.client.pty(&m.id, &opts).await.unwrap();
                send(&mut ws, "echo \"k\"\"eystroke\"; exit\n").await;
                read_until(&mut ws, "keystroke").await;
            }
        }
        let now = d.client.get_machine(&m.id).await.unwrap();
        assert_eq!(now.status, MachineStatus::Running, "stopped despite activity (round {round})");
    }
    // A command that runs longer than the timeout, silently, is activity all along.
    assert_eq!(sh(&d, &m.id, "sleep 5").await.0, 0);
    assert_eq!(d.client.get_machine(&m.id).await.unwrap().status, MachineStatus::Running);
    // A proxied WebSocket left open and silent counts for 2 s only: the machine stops 2 + 3 s later.
    let ws_url = format!("ws://127.0.0.1:{}/proxy/{}/8080/ws", d.proxy_port, m.id);
    let (mut tunnel, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    tunnel.send(tokio_tungstenite::tungstenite::Message::Text("ping".into())).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(5), tunnel.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(echo.into_text().unwrap().as_str(), "ping");
    let opened = Instant::now();
    let stopped = wait_status(&d, &m.id, MachineStatus::Stopped, Duration::from_secs(20)).await;
    let after = stopped - opened;
    assert!(after >= Duration::from_secs(4), "stopped {after:?} after the last byte: the connection did not count");
    assert!(d.logs().contains("idle_timeout_seconds without activity"), "{}", d.logs());
}

#[ignore = "needs root: runc containers, veth and nftables"]
#[tokio::test]
async fn timers_survive_a_kill_9_of_the_daemon() {
    let mut d = Daemon::start(Options::default()).await;
    let ttl = running(&d, CreateMachine { ttl_seconds: Some(6), ..machine("ttl-crash") }).await;
    let idle = running(&d, CreateMachine { idle_timeout_seconds: Some(6), ..machine("idle-crash") }).await;
    d.kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    d.spawn().await;
    let back = d.client.get_machine(&ttl.id).await.unwrap();
    assert_eq!(back.status, MachineStatus::Running, "reconcile adopted the machine");
    assert_eq!(back.expires_at, ttl.expires_at, "the deadline is the stored one");
    let idle_back = d.client.get_machine(&idle.id).await.unwrap();
    assert_eq!(idle_back.idle_since, idle.idle_since, "the idle clock is the stored one");
    wait_status(&d, &ttl.id, MachineStatus::Stopped, Duration::from_secs(15)).await;
    assert!(hyperfleet_types::timestamp::now() >= ttl.expires_at.unwrap());
    wait_status(&d, &idle.id, MachineStatus::Stopped, Duration::from_secs(15)).await;
}

/// Fires `n` GETs at once; returns their status codes and bodies.
async fn many_gets(url: &str, n: usize) -> Vec<(u16, String)> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let gets = (0..n).map(|_| {
        let http = http.clone();
        let url = url.to_string();
        async move {
            let r = http.get(&url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    });
    futures::future::join_all(gets).await
}

#[ignore = "needs root: runc container, veth and nftables"]
#[tokio::test]
async fn wake_on_request_from_stopped_and_from_paused() {
    let opts = Options { env: vec![("PROXY_WAKE_TIMEOUT".into(), "30".into())], ..Options::default() };
    let d = Daemon::start(opts).await;
    let req = CreateMachine { exposed_ports: Some(vec![8080]), auto_start: Some(true), ..machine("sleeper") };
    let m = running(&d, req).await;
    start_testd(&d, &m.id, 8080).await;
    let url = format!("{}/proxy/{}/8080/headers", d.proxy_url(), m.id);

    // Paused: 50 requests at once resume it once and are all served.
    d.client.pause_machine(&m.id).await.unwrap();
    let answers = many_gets(&url, 50).await;
    assert!(answers.iter().all(|(s, _)| *s == 200), "{answers:?}");
    assert_eq!(d.logs().matches("resuming the machine for a proxied request").count(), 1, "{}", d.logs());

    // Stopped: 50 requests at once start it once; they are held until the port answers. (This image has no
    // main process, so the test starts the server once the machine runs; the requests wait for it.)
    d.client.stop_machine(&m.id).await.unwrap();
    let runs_before = d.logs().matches("machine running").count();
    let gets = tokio::spawn({
        let url = url.clone();
        async move { many_gets(&url, 50).await }
    });
    wait_status(&d, &m.id, MachineStatus::Running, Duration::from_secs(30)).await;
    serve_testd(&d, &m.id, 8080).await;
    let answers = gets.await.unwrap();
    assert!(answers.iter().all(|(s, _)| *s == 200), "{answers:?}");
    assert_eq!(d.logs().matches("starting the machine for a proxied request").count(), 1, "{}", d.logs());
    assert_eq!(d.logs().matches("machine running").count(), runs_before + 1, "exactly one start");

    // Without auto_start, a stopped machine is simply unavailable.
    let plain = running(&d, CreateMachine { exposed_ports: Some(vec![8080]), ..machine("plain") }).await;
    d.client.stop_machine(&plain.id).await.unwrap();
    let r = reqwest::get(format!("{}/proxy/{}/8080/", d.proxy_url(), plain.id)).await.unwrap();
    assert_eq!(r.status(), 503);
}

#[ignore = "needs root: the daemon's nftables table"]
#[tokio::test]
async fn label_selectors() {
    let d = Daemon::start(Options::default()).await;
    let with = |name: &str, labels: &[(&str, &str)]| CreateMachine {
        labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        ..machine(name)
    };
    d.client.create_machine(&with("a", &[("team", "ml"), ("env", "prod")])).await.unwrap();
    d.client.create_machine(&with("b", &[("team", "ml"), ("env", "dev"), ("gpu", "")])).await.unwrap();
    d.client.create_machine(&with("c", &[("team", "web")])).await.unwrap();
    let names = |sel: &str| {
        let c = d.client.clone();
        let sel = sel.to_string();
        async move {
            let list = c.list_machines(&ListOptions { label: Some(sel), ..Default::default() }).await.unwrap();
            let mut n: Vec<String> = list.machines.iter().map(|m| m.spec.name.clone()).collect();
            n.sort();
            assert_eq!(list.total, n.len() as u64);
            n
        }
    };
    assert_eq!(names("team=ml").await, ["a", "b"]);
    assert_eq!(names("team=ml,env!=prod").await, ["b"]);
    assert_eq!(names("gpu").await, ["b"]);
    assert_eq!(names("!gpu").await, ["a", "c"]);
    assert_eq!(names("env!=prod").await, ["b", "c"]);
    let e = d.client.list_machines(&ListOptions { label: Some("bad key=1".into()), ..Default::default() }).await;
    assert_eq!(e.unwrap_err().status(), Some(400));
    // PATCH replaces the labels; the CLI lists them.
    let patch = UpdateMachine { labels: Some([("team".to_string(), "web".to_string())].into()), ..Default::default() };
    d.client.update_machine("a", &patch).await.unwrap();
    assert_eq!(names("team=web").await, ["a", "c"]);
    let out = d
        .command()
        .args(["machines", "list", "--label", "team=web"])
        .env("HYPERFLEET_URL", d.url())
        .env("HYPERFLEET_API_KEY", &d.key)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("LABELS") && text.contains("team=web") && !text.contains(" b "), "{text}");
}

#[ignore = "needs root: runc container, veth and nftables"]
#[tokio::test]
async fn env_and_secrets_reach_commands_and_secret_values_never_leave() {
    let d = Daemon::start(Options::default()).await;
    const SECRET: &str = "s3cr3t-Value-9f8e7d";
    const SECRET2: &str = "an0ther-S3cret-1a2b3c";
    let req = CreateMachine {
        env: Some([("PLAIN".to_string(), "visible".to_string())].into()),
        secrets: Some([("TOKEN".to_string(), SECRET.to_string())].into()),
        ..machine("vault")
    };
    let raw_create = d.client.raw(hyperfleet_client::HttpMethod::POST, "/machines").json(&req).send().await.unwrap();
    assert_eq!(raw_create.status(), 201);
    let created: serde_json::Value = raw_create.json().await.unwrap();
    assert!(!created.to_string().contains(SECRET));
    assert_eq!(created["secret_names"], serde_json::json!(["TOKEN"]));
    let id = created["id"].as_str().unwrap().to_string();
    d.client.start_machine(&id).await.unwrap();
    let (code, out, _) = sh(&d, &id, "echo \"$PLAIN $TOKEN\"").await;
    assert_eq!((code, out.as_str()), (0, format!("visible {SECRET}\n").as_str()));
    // The terminal gets them too.
    let mut ws = d.client.pty(&id, &PtyOptions::default()).await.unwrap();
    send(&mut ws, "echo \"X=$TOKEN\"\n").await;
    read_until(&mut ws, &format!("X={SECRET}")).await;
    drop(ws);
    // A new value through PATCH; the answer shows only the name.
    let patch =
        UpdateMachine { secrets: Some([("TOKEN".to_string(), SECRET2.to_string())].into()), ..Default::default() };
    let patched =
        d.client.raw(hyperfleet_client::HttpMethod::PATCH, &format!("/machines/{id}")).json(&patch).send().await;
    let patched = patched.unwrap().text().await.unwrap();
    assert!(!patched.contains(SECRET2) && patched.contains("\"secret_names\":[\"TOKEN\"]"), "{patched}");
    assert_eq!(sh(&d, &id, "echo $TOKEN").await.1, format!("{SECRET2}\n"));
    // No response and no log line carries a value.
    let get = d.client.raw(hyperfleet_client::HttpMethod::GET, &format!("/machines/{id}")).send().await.unwrap();
    let list = d.client.raw(hyperfleet_client::HttpMethod::GET, "/machines").send().await.unwrap();
    for body in [get.text().await.unwrap(), list.text().await.unwrap()] {
        assert!(!body.contains(SECRET) && !body.contains(SECRET2), "{body}");
        assert!(body.contains("TOKEN"));
    }
    let logs = d.logs();
    assert!(!logs.contains(SECRET) && !logs.contains(SECRET2), "a secret value is in the daemon's log");
    // The database is readable by its owner only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.dir.path().join("hyperfleet.db")).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "the database is readable by others: {mode:o}");
    // A bad secret name is refused without echoing the value.
    let bad = CreateMachine { secrets: Some([("BAD NAME".to_string(), SECRET.to_string())].into()), ..machine("bad") };
    let e = d.client.create_machine(&bad).await.unwrap_err();
    assert!(e.status() == Some(400) && !e.to_string().contains(SECRET), "{e}");
}
