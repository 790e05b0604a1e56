//! Exec and file transfer end to end through the daemon and the real agent in container-runtime guests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Daemon, Options, machine, running, sh};
use futures::StreamExt;
use hyperfleet_client::HttpMethod as Method;
use hyperfleet_client::types::*;
use serde_json::json;

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * 2_654_435_761) >> 7).to_le_bytes()[0]).collect()
}

#[ignore = "needs root: runc container with a netns and veth, exec through the agent"]
#[tokio::test]
async fn exec_files_and_cleanup() {
    let d = Daemon::start(Options::default()).await;
    let c = &d.client;
    let env = [("GREETING", "hello"), ("NAME", "machine")].map(|(k, v)| (k.to_string(), v.to_string()));
    let m = running(&d, CreateMachine { env: Some(env.into()), ..machine("worker") }).await;
    assert_eq!(m.spec.env.get("GREETING").map(String::as_str), Some("hello"));

    // The guest's network as configured by the host, and its resolver.
    let (code, out, _) = sh(&d, &m.id, "ip addr show eth0").await;
    assert_eq!(code, 0);
    assert!(out.contains(&format!("inet {}/30", m.guest_ip)), "{out}");
    assert!(out.contains("aa:fc:00:00:00:01"), "{out}");
    assert_eq!(sh(&d, &m.id, "cat /etc/resolv.conf").await.1, "nameserver 10.200.255.53\n");
    assert_eq!(sh(&d, &m.id, "hostname").await.1, "worker\n");

    // Exit codes, stderr, env, cwd, stdin; `cmd` as an alias; a string is refused with a hint.
    let r = c.exec(&m.id, &["sh", "-c", "echo out; echo err >&2; exit 7"]).await.unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str(), r.stderr.as_str()), (7, "out\n", "err\n"));
    let req = ExecRequest {
        command: CommandArgs(vec!["sh".into(), "-c".into(), "pwd; echo $NAME $GREETING; cat".into()]),
        timeout: Some(5),
        env: Some([("NAME".to_string(), "value".to_string())].into()),
        cwd: Some("/tmp".into()),
        stdin: Some("from stdin".into()),
    };
    // The machine's env is under the request's: NAME comes from the request, GREETING from the machine.
    assert_eq!(c.exec_with(&m.id, &req).await.unwrap().stdout, "/tmp\nvalue hello\nfrom stdin");
    let resp = c
        .raw(Method::POST, &format!("/machines/{}/exec", m.id))
        .json(&json!({"cmd": ["echo", "alias"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.json::<ExecResult>().await.unwrap().stdout, "alias\n");
    let resp = c
        .raw(Method::POST, &format!("/machines/{}/exec", m.id))
        .json(&json!({"command": "ls -la /"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let e: ErrorBody = resp.json().await.unwrap();
    assert!(e.error.message.contains("array"), "{}", e.error.message);
    let r = c.exec(&m.id, &["/no/such/program"]).await.unwrap();
    assert_eq!(r.exit_code, 127);
    assert!(r.stderr.contains("/no/such/program"));

    // Timeout: 504, and nothing the command started is left running.
    let t = Instant::now();
    let req = ExecRequest {
        command: CommandArgs(vec!["sh".into(), "-c".into(), "sleep 61 & sleep 62".into()]),
        timeout: Some(1),
        env: None,
        cwd: None,
        stdin: None,
    };
    let e = c.exec_with(&m.id, &req).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(504), Some("TIMEOUT")));
    assert!(e.to_string().contains("Command execution timed out after 1 seconds"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5));
    let (_, ps, _) = sh(&d, &m.id, "ps").await;
    assert!(!ps.contains("sleep 6"), "leftover processes:\n{ps}");

    // Streaming exec: output arrives as it is produced, then the exit code.
    let req = ExecRequest {
        command: CommandArgs(vec!["sh".into(), "-c".into(), "echo one; sleep 1; echo two >&2; exit 3".into()]),
        timeout: Some(10),
        env: None,
        cwd: None,
        stdin: None,
    };
    let t = Instant::now();
    let mut events = Box::pin(c.exec_stream(&m.id, &req).await.unwrap());
    let first = events.next().await.unwrap().unwrap();
    assert_eq!(first, ExecEvent::Stdout { data: "one\n".into() });
    assert!(t.elapsed() < Duration::from_millis(900), "first line was not streamed: {:?}", t.elapsed());
    let rest: Vec<ExecEvent> = events.map(|e| e.unwrap()).collect().await;
    assert_eq!(rest[0], ExecEvent::Stderr { data: "two\n".into() });
    assert!(matches!(rest.last(), Some(ExecEvent::Exit { exit_code: 3, .. })), "{rest:?}");
    // A program that cannot start is the request's fault in a stream too, not the guest's unreachability.
    let missing = ExecRequest { command: CommandArgs(vec!["/no/such/program".into()]), ..req.clone() };
    let events: Vec<ExecEvent> = c.exec_stream(&m.id, &missing).await.unwrap().map(|e| e.unwrap()).collect().await;
    assert!(
        matches!(events.as_slice(), [ExecEvent::Error { code, message }] if code == "BAD_REQUEST" && message.contains("/no/such/program")),
        "{events:?}"
    );

    // What a command is started with is checked: NUL bytes, variable names, and the whole (with the machine's
    // env and secrets) must fit what the guest is sent.
    for (body, says) in [
        (json!({"command": ["echo", "a\0b"]}), "NUL"),
        (json!({"command": ["env"], "env": {"A=B": "x"}}), "not a variable name"),
        (json!({"command": ["env"], "env": {"A": "x\0"}}), "NUL"),
    ] {
        let resp = c.raw(Method::POST, &format!("/machines/{}/exec", m.id)).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        let e: ErrorBody = resp.json().await.unwrap();
        assert!(e.error.message.contains(says), "{body}: {}", e.error.message);
    }
    // Each under the 1 MiB body limit; together over what one frame to the guest holds.
    let big = |field: &str| -> std::collections::BTreeMap<String, String> {
        (0..20).map(|i| (format!("{}{i}", field.to_uppercase()), "v".repeat(30_000))).collect()
    };
    for field in ["env", "secrets"] {
        let body = json!({ field: big(field) });
        let resp = c.raw(Method::PATCH, &format!("/machines/{}", m.id)).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{field}");
    }
    let e = c.exec(&m.id, &["true"]).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(400), Some("VALIDATION_ERROR")), "{e}");
    assert!(e.to_string().contains("can be sent to the guest"), "{e}");
    let restore = json!({"env": {"GREETING": "hello", "NAME": "machine"}, "secrets": {}});
    let resp = c.raw(Method::PATCH, &format!("/machines/{}", m.id)).json(&restore).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    // Files: a 20 MB raw upload, stat, byte-exact download, JSON upload with mode, delete.
    let data = pattern(20 << 20);
    let w = c.upload_stream(&m.id, "/root/data/big.bin", data.clone(), None).await.unwrap();
    assert_eq!(w.size, data.len() as u64);
    let st = c.stat_file(&m.id, "/root/data/big.bin").await.unwrap();
    assert_eq!((st.size, st.is_dir, st.mode), (data.len() as u64, false, 0o644));
    let back = c.download_file(&m.id, "/root/data/big.bin").await.unwrap();
    assert!(back[..] == data[..], "downloaded bytes differ");
    assert_eq!(sh(&d, &m.id, "md5sum /root/data/big.bin | cut -d' ' -f1").await.1.trim(), md5(&data));
    c.upload_file(&m.id, "/usr/local/bin/hello", b"#!/bin/sh\necho hi from a script\n", Some(0o755)).await.unwrap();
    assert_eq!(c.stat_file(&m.id, "/usr/local/bin/hello").await.unwrap().mode, 0o755);
    assert_eq!(c.exec(&m.id, &["hello"]).await.unwrap().stdout, "hi from a script\n");
    assert!(c.stat_file(&m.id, "/root/data").await.unwrap().is_dir);
    c.delete_file(&m.id, "/root/data/big.bin", false).await.unwrap();
    let e = c.stat_file(&m.id, "/root/data/big.bin").await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(404), Some("NOT_FOUND")));
    assert_eq!(c.download_file(&m.id, "/nope").await.unwrap_err().code(), Some("NOT_FOUND"));
    let long_name = format!("/tmp/{}", "é".repeat(128)); // 256 bytes: past the kernel's NAME_MAX
    for bad in ["relative/path", "", &long_name] {
        let e = c.stat_file(&m.id, bad).await.unwrap_err();
        assert_eq!((e.status(), e.code()), (Some(400), Some("VALIDATION_ERROR")), "{bad}: {e}");
    }
    // The guest's own refusal (sysfs is read-only in a machine) is the caller's 403, not a failure to reach it.
    let e = c.upload_file(&m.id, "/sys/hyperfleet-denied", b"x", None).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(403), Some("FORBIDDEN")), "{e}");
    // A full disk is the machine's condition, said as such (507), not a failure to reach the guest.
    let fill = "dd if=/dev/zero of=/root/fill bs=1M 2>/dev/null; sync; true";
    assert_eq!(c.exec(&m.id, &["sh", "-c", fill]).await.unwrap().exit_code, 0);
    let e = c.upload_file(&m.id, "/root/more", &pattern(4 << 20), None).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(507), Some("INSUFFICIENT_STORAGE")), "{e}");
    assert!(e.to_string().contains("disk is full"), "{e}");
    c.delete_file(&m.id, "/root/fill", false).await.unwrap();
    c.upload_file(&m.id, "/root/more", b"fits again", None).await.unwrap();
    let e = c.delete_file(&m.id, "/root", false).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "non-empty directory needs recursive: {e}");

    // Stopped: exec and files refuse with the documented message; then delete leaves nothing on the host.
    c.stop_machine(&m.id).await.unwrap();
    let e = c.exec(&m.id, &["true"]).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(400), Some("BAD_REQUEST")));
    assert!(e.to_string().contains("Machine must be running to execute commands"), "{e}");
    c.delete_machine(&m.id, false).await.unwrap();
    assert!(d.host_links().is_empty());
    assert!(!Path::new(&format!("/run/netns/hf-{}", m.id)).exists());
    assert!(!d.dir.path().join("machines").join(&m.id).exists(), "machine data removed");
    let runc = Command::new("runc").args(["--root", "/run/hyperfleet/runc", "list", "-q"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&runc.stdout).contains(&m.id));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&m.id), "a mount of the machine is left");
}

/// MD5 by the host's md5sum, to compare with the guest's.
fn md5(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

#[ignore = "needs root: runc container with a netns and veth"]
#[tokio::test]
async fn per_machine_dns_overrides_the_default() {
    let d = Daemon::start(Options::default()).await;
    let req = CreateMachine {
        network: Some(NetworkOptions {
            dns: Some(vec!["10.9.8.7".parse().unwrap(), "10.9.8.6".parse().unwrap()]),
            egress: None,
        }),
        ..machine("custom-dns")
    };
    let m = running(&d, req).await;
    assert_eq!(m.spec.network.dns.len(), 2);
    assert_eq!(sh(&d, &m.id, "cat /etc/resolv.conf").await.1, "nameserver 10.9.8.7\nnameserver 10.9.8.6\n");
}

#[ignore = "needs root: runc container with a netns and veth"]
#[tokio::test]
async fn file_size_limit_is_enforced_both_ways() {
    let d =
        Daemon::start(Options { env: vec![("HYPERFLEET_FILE_MAX_SIZE".into(), "1MB".into())], ..Default::default() })
            .await;
    let c = &d.client;
    let m = running(&d, machine("small")).await;
    let big = pattern(2 << 20);
    for e in [
        c.upload_stream(&m.id, "/tmp/big", big.clone(), None).await.unwrap_err(),
        c.upload_file(&m.id, "/tmp/big", &big, None).await.unwrap_err(),
    ] {
        assert_eq!((e.status(), e.code()), (Some(413), Some("PAYLOAD_TOO_LARGE")), "{e}");
    }
    // A chunked upload (no Content-Length) is cut off once it passes the limit.
    let stream =
        futures::stream::iter((0..32).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![1u8; 64 * 1024]))));
    let e = c.upload_stream(&m.id, "/tmp/chunked", reqwest::Body::wrap_stream(stream), None).await.unwrap_err();
    assert_eq!(e.status(), Some(413), "{e}");
    assert_ne!(sh(&d, &m.id, "test -e /tmp/chunked").await.0, 0, "no partial file");
    assert_eq!(sh(&d, &m.id, "head -c 2000000 /dev/zero > /tmp/made-inside").await.0, 0);
    let e = c.download_file(&m.id, "/tmp/made-inside").await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(413), Some("PAYLOAD_TOO_LARGE")), "{e}");
    let ok = c.upload_file(&m.id, "/tmp/fits", &pattern(1 << 19), None).await.unwrap();
    assert_eq!(ok.size, 1 << 19);
}

#[ignore = "needs root: runc container and the cgroup freezer"]
#[tokio::test]
async fn pause_freezes_and_resume_thaws() {
    let d = Daemon::start(Options::default()).await;
    let c = &d.client;
    let m = running(&d, machine("sleepy")).await;
    let p = c.pause_machine(&m.id).await.unwrap();
    assert_eq!(p.status, MachineStatus::Paused);
    let listed = c
        .list_machines(&hyperfleet_client::ListOptions { status: Some(MachineStatus::Paused), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(listed.total, 1);
    // Its processes are frozen by the cgroup freezer.
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", m.pid.unwrap())).unwrap();
    let freezer = cgroups.lines().find_map(|l| l.split_once(":freezer:").map(|(_, p)| p.to_string())).unwrap();
    let state = std::fs::read_to_string(format!("/sys/fs/cgroup/freezer{freezer}/freezer.state")).unwrap();
    assert_eq!(state.trim(), "FROZEN");
    let e = c.exec(&m.id, &["true"]).await.unwrap_err();
    assert!(e.to_string().contains("Machine must be running to execute commands"), "{e}");
    let e = c.pause_machine(&m.id).await.unwrap_err();
    assert!(e.to_string().contains("Cannot pause machine in 'paused' state"), "{e}");
    assert_eq!(c.resume_machine(&m.id).await.unwrap().status, MachineStatus::Running);
    assert_eq!(c.exec(&m.id, &["echo", "awake"]).await.unwrap().stdout, "awake\n");
    // A paused machine stops cleanly.
    c.pause_machine(&m.id).await.unwrap();
    assert_eq!(c.stop_machine(&m.id).await.unwrap().status, MachineStatus::Stopped);
    assert!(d.host_links().is_empty());
    assert!(!common::process_alive(m.pid.unwrap()));
}

#[ignore = "needs root: runc container with a netns and veth, files through the agent"]
#[tokio::test]
async fn directories_are_listed_and_made() {
    let d = Daemon::start(Options::default()).await;
    let c = &d.client;
    let m = running(&d, machine("browser")).await;

    // mkdir: parents and mode; an existing directory is fine with `parents` only; bad paths are 400s.
    let st = c.make_dir(&m.id, &MakeDir { path: "/srv/a/b".into(), parents: true, mode: Some(0o750) }).await.unwrap();
    assert_eq!((st.path.as_str(), st.is_dir, st.mode), ("/srv/a/b", true, 0o750));
    assert_eq!(sh(&d, &m.id, "stat -c %a /srv/a/b").await.1, "750\n");
    c.make_dir(&m.id, &MakeDir { path: "/srv/a/b".into(), parents: true, mode: None }).await.unwrap();
    for (path, parents, status) in
        [("/srv/a/b", false, 400), ("/no/parent/here", false, 404), ("relative", true, 400), ("", true, 400)]
    {
        let e = c.make_dir(&m.id, &MakeDir { path: path.into(), parents, mode: None }).await.unwrap_err();
        assert_eq!(e.status(), Some(status), "{path}: {e}");
    }
    let resp = c
        .raw(Method::POST, &format!("/machines/{}/files/mkdir", m.id))
        .json(&json!({"path": "/srv/x", "mode": 70000}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // A directory of 10,000 entries, made inside the guest, listed page by page through the API: every
    // name exactly once, in order, with the right type and size.
    let (code, _, err) = sh(&d, &m.id, "mkdir -p /srv/many && cd /srv/many && seq -w 1 10000 | xargs touch && echo hello > 00042 && mkdir sub && ln -s /etc link").await;
    assert_eq!(code, 0, "{err}");
    let (mut names, mut after, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let page = c.list_dir(&m.id, "/srv/many", after.as_deref(), Some(500)).await.unwrap();
        assert!(page.entries.len() <= 500);
        pages += 1;
        for e in &page.entries {
            match e.name.as_str() {
                "00042" => assert_eq!((e.kind, e.size), (EntryType::File, 6)),
                "sub" => assert_eq!(e.kind, EntryType::Dir),
                "link" => assert_eq!(e.kind, EntryType::Symlink),
                _ => assert_eq!(e.kind, EntryType::File),
            }
        }
        names.extend(page.entries.into_iter().map(|e| e.name));
        match page.next_after {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(names.len(), 10_002);
    assert_eq!(pages, 21);
    assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates");
    // The default page is 100; a limit past 500 or a file or a missing directory are refused.
    assert_eq!(c.list_dir(&m.id, "/srv/many", None, None).await.unwrap().entries.len(), 100);
    let e = c.list_dir(&m.id, "/srv/many", None, Some(501)).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(400), Some("VALIDATION_ERROR")), "{e}");
    let e = c.list_dir(&m.id, "/srv/many/00042", None, None).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    let e = c.list_dir(&m.id, "/srv/none", None, None).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(404), Some("NOT_FOUND")), "{e}");
    let e = c.list_dir(&m.id, "relative", None, None).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(400), Some("VALIDATION_ERROR")), "{e}");

    // A stopped machine: the documented message.
    c.stop_machine(&m.id).await.unwrap();
    let e = c.list_dir(&m.id, "/", None, None).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(400), Some("BAD_REQUEST")), "{e}");
}
