//! The real agent binary on the host, driven through the real host-side client: over its unix socket, and
//! through a stand-in for Firecracker's vsock unix socket that implements its `CONNECT` handshake exactly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use hyperfleet_agent_proto::client::{AgentClient, ClientError, DEFAULT_MAX_OUTPUT as MAX_OUT, Endpoint, ExecEvent};
use hyperfleet_agent_proto::{ErrorKind, ExecSpec};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Agent {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_hyperfleet-agent"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .spawn()
            .expect("spawn agent");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "agent socket never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        Agent { child, dir, socket }
    }

    fn client(&self) -> AgentClient {
        AgentClient::new(Endpoint::Unix(self.socket.clone()))
    }

    fn path(&self, rel: &str) -> String {
        self.dir.path().join(rel).display().to_string()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Both fail only if the agent exited already (a test that shut it down): nothing left to stop.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spec(argv: &[&str]) -> ExecSpec {
    ExecSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: Default::default(),
        cwd: None,
        timeout_ms: 10_000,
        max_output: Some(1 << 20),
    }
}

fn alive(pid: i32) -> bool {
    // A zombie counts as gone: it no longer runs.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
        .unwrap_or(false)
}

#[tokio::test]
async fn exec_returns_exit_code_and_both_streams() {
    let agent = Agent::start();
    let c = agent.client();
    c.ping().await.unwrap();
    let out = c.exec_collect(spec(&["sh", "-c", "echo out; echo err >&2; exit 3"]), b"", MAX_OUT).await.unwrap();
    assert_eq!(out.exit.exit_code, 3);
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert!(!out.exit.timed_out);

    let mut s = spec(&["sh", "-c", "pwd; echo $GREETING; cat"]);
    s.cwd = Some(agent.dir.path().display().to_string());
    s.env.insert("GREETING".into(), "hello".into());
    let out = c.exec_collect(s, b"from stdin", MAX_OUT).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{}\nhello\nfrom stdin", agent.dir.path().display()));
    assert_eq!(out.exit.exit_code, 0);
}

#[tokio::test]
async fn exec_of_a_missing_program_or_cwd_is_a_clear_error() {
    let agent = Agent::start();
    let c = agent.client();
    match c.exec_collect(spec(&["/no/such/program"]), b"", MAX_OUT).await {
        Err(ClientError::Agent { kind: ErrorKind::SpawnFailed, message }) => {
            assert!(message.contains("/no/such/program"))
        }
        other => panic!("{other:?}"),
    }
    let mut s = spec(&["true"]);
    s.cwd = Some("/no/such/dir".into());
    assert!(matches!(
        c.exec_collect(s, b"", MAX_OUT).await,
        Err(ClientError::Agent { kind: ErrorKind::InvalidPath, .. })
    ));
}

#[tokio::test]
async fn timeout_kills_the_whole_process_group() {
    let agent = Agent::start();
    let pidfile = agent.path("grandchild.pid");
    let mut s = spec(&["sh", "-c", &format!("sleep 300 & echo $! > {pidfile}; sleep 300")]);
    s.timeout_ms = 500;
    let t = Instant::now();
    let out = agent.client().exec_collect(s, b"", MAX_OUT).await.unwrap();
    assert!(out.exit.timed_out);
    assert_eq!(out.exit.exit_code, 137, "killed by SIGKILL");
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    let grandchild: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while alive(grandchild) {
        assert!(Instant::now() < deadline, "grandchild {grandchild} survived the timeout");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn background_children_do_not_hold_exec_open() {
    let agent = Agent::start();
    let pidfile = agent.path("bg.pid");
    let t = Instant::now();
    let out = agent
        .client()
        .exec_collect(spec(&["sh", "-c", &format!("sleep 30 & echo $! > {pidfile}; echo started")]), b"", MAX_OUT)
        .await
        .unwrap();
    assert_eq!(out.stdout, b"started\n");
    assert!(t.elapsed() < Duration::from_secs(3), "exec waited for its background child: {:?}", t.elapsed());
    let bg: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    assert!(alive(bg), "a finished command's background child keeps running (servers started by exec)");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(bg), nix::sys::signal::Signal::SIGKILL).unwrap();
}

#[tokio::test]
async fn output_over_the_cap_is_truncated_and_flagged() {
    let agent = Agent::start();
    let mut s = spec(&["sh", "-c", "head -c 300000 /dev/zero"]);
    s.max_output = Some(1000);
    let out = agent.client().exec_collect(s, b"", MAX_OUT).await.unwrap();
    assert_eq!(out.stdout.len(), 1000);
    assert!(out.exit.stdout_truncated);
    assert!(!out.exit.stderr_truncated);
    assert_eq!(out.exit.exit_code, 0);
}

#[tokio::test]
async fn streamed_exec_delivers_output_before_exit() {
    let agent = Agent::start();
    let mut s = spec(&["sh", "-c", "echo first; sleep 1; echo second"]);
    s.max_output = None;
    let mut session = agent.client().exec(s).await.unwrap();
    session.close_stdin().await.unwrap();
    let t = Instant::now();
    match session.next_event().await.unwrap() {
        ExecEvent::Stdout(b) => assert_eq!(&b[..], b"first\n"),
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_millis(800), "first line was not streamed");
    let mut rest = Vec::new();
    loop {
        match session.next_event().await.unwrap() {
            ExecEvent::Stdout(b) => rest.extend_from_slice(&b),
            ExecEvent::Stderr(_) => {}
            ExecEvent::Exited(e) => {
                assert_eq!(e.exit_code, 0);
                break;
            }
        }
    }
    assert_eq!(rest, b"second\n");
}

async fn upload(c: &AgentClient, path: &str, data: &[u8], mode: Option<u32>) -> Result<u64, ClientError> {
    let mut w = c.write_file(path, mode, Some(100 << 20)).await?;
    for chunk in data.chunks(300_000) {
        w.send(chunk).await?;
    }
    w.finish().await
}

async fn download(c: &AgentClient, path: &str) -> Result<Vec<u8>, ClientError> {
    let mut r = c.read_file(path, None).await?;
    let mut out = Vec::new();
    while let Some(chunk) = r.next_chunk().await? {
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

#[tokio::test]
async fn large_files_round_trip_byte_exact() {
    let agent = Agent::start();
    let c = agent.client();
    let data: Vec<u8> = (0..20u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0]).collect();
    let path = agent.path("deep/nested/dir/big.bin");
    assert_eq!(upload(&c, &path, &data, Some(0o600)).await.unwrap(), data.len() as u64);
    let st = c.stat(&path).await.unwrap();
    assert_eq!((st.size, st.mode, st.is_dir), (data.len() as u64, 0o600, false));
    assert!(download(&c, &path).await.unwrap() == data, "downloaded bytes differ");
    // Overwrite is atomic and leaves no temporary files behind.
    upload(&c, &path, b"small", None).await.unwrap();
    assert_eq!(download(&c, &path).await.unwrap(), b"small");
    let names: Vec<_> =
        std::fs::read_dir(Path::new(&path).parent().unwrap()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
    c.delete(&path, false).await.unwrap();
    assert!(matches!(c.stat(&path).await, Err(ClientError::Agent { kind: ErrorKind::NotFound, .. })));
}

fn kind<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ErrorKind {
    match r {
        Err(ClientError::Agent { kind, .. }) => kind,
        other => panic!("expected an agent error, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_paths_are_refused_with_the_right_kind() {
    let agent = Agent::start();
    let c = agent.client();
    assert_eq!(kind(c.stat("relative/path").await), ErrorKind::InvalidPath);
    assert_eq!(kind(c.stat(&agent.path("missing")).await), ErrorKind::NotFound);
    assert_eq!(kind(download(&c, &agent.path("missing")).await), ErrorKind::NotFound);
    assert_eq!(kind(download(&c, &agent.path("")).await), ErrorKind::InvalidPath);
    assert_eq!(kind(c.delete(&agent.path("missing"), false).await), ErrorKind::NotFound);
    assert_eq!(kind(upload(&c, "no/slash", b"x", None).await), ErrorKind::InvalidPath);
    assert_eq!(kind(upload(&c, &agent.path(""), b"x", None).await), ErrorKind::InvalidPath);
    // A name past NAME_MAX is the caller's bad path (ENAMETOOLONG), not an I/O failure of the guest.
    let long = agent.path(&"n".repeat(256));
    assert_eq!(kind(c.stat(&long).await), ErrorKind::InvalidPath);
    assert_eq!(kind(download(&c, &long).await), ErrorKind::InvalidPath);
    assert_eq!(kind(upload(&c, &long, b"x", None).await), ErrorKind::InvalidPath);
    // A name of NAME_MAX bytes is a valid one: its upload's temporary name must not be longer.
    let longest = agent.path(&"n".repeat(255));
    upload(&c, &longest, b"x", None).await.unwrap();
    assert_eq!(download(&c, &longest).await.unwrap(), b"x");
    c.delete(&longest, false).await.unwrap();
    // A file where a directory must be (EEXIST/ENOTDIR), a FIFO nobody writes (would block), a device: the
    // caller's bad path, answered at once.
    std::fs::write(agent.path("plain"), b"x").unwrap();
    assert_eq!(kind(upload(&c, &agent.path("plain/below/f"), b"x", None).await), ErrorKind::InvalidPath);
    nix::unistd::mkfifo(agent.path("fifo").as_str(), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let fifo = tokio::time::timeout(Duration::from_secs(5), download(&c, &agent.path("fifo"))).await;
    assert_eq!(kind(fifo.expect("a FIFO download answers at once")), ErrorKind::InvalidPath);
    assert_eq!(kind(download(&c, "/dev/null").await), ErrorKind::InvalidPath);
    std::fs::remove_file(agent.path("fifo")).unwrap();
    std::fs::remove_file(agent.path("plain")).unwrap();

    std::fs::create_dir(agent.path("full")).unwrap();
    std::fs::write(agent.path("full/f"), b"x").unwrap();
    assert_eq!(kind(c.delete(&agent.path("full"), false).await), ErrorKind::InvalidPath);
    c.delete(&agent.path("full"), true).await.unwrap();
    assert!(!Path::new(&agent.path("full")).exists());
    // Over the size limit the upload fails and nothing is left behind.
    let mut w = c.write_file(&agent.path("toolarge"), None, Some(10)).await.unwrap();
    w.send(&[0u8; 11]).await.unwrap();
    assert_eq!(kind(w.finish().await), ErrorKind::TooLarge);
    assert!(!Path::new(&agent.path("toolarge")).exists());
    assert_eq!(std::fs::read_dir(agent.dir.path()).unwrap().count(), 1, "only the socket remains");
}

#[tokio::test]
async fn concurrent_requests_are_served_independently() {
    let agent = Agent::start();
    let c = agent.client();
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let c = c.clone();
            let path = agent.path(&format!("f{i}"));
            tokio::spawn(async move {
                let out =
                    c.exec_collect(spec(&["sh", "-c", &format!("sleep 0.2; echo {i}")]), b"", MAX_OUT).await.unwrap();
                assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{i}\n"));
                upload(&c, &path, format!("content {i}").as_bytes(), None).await.unwrap();
                assert_eq!(download(&c, &path).await.unwrap(), format!("content {i}").as_bytes());
            })
        })
        .collect();
    let t = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    // 32 commands sleeping 0.2 s each: served in parallel, not one after another (6.4 s).
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

/// Firecracker's host-side vsock socket: reads `CONNECT <port>\n`; for a port with a listener in the guest
/// it answers `OK <host port>\n` and splices the stream; otherwise the guest resets the connection and
/// Firecracker closes it without a reply.
async fn fake_firecracker_vsock(uds: PathBuf, guest_port: u32, guest: PathBuf) {
    let listener = UnixListener::bind(&uds).unwrap();
    let mut next_host_port = 1_073_741_824u32;
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        next_host_port += 1;
        let guest = guest.clone();
        let host_port = next_host_port;
        tokio::spawn(async move {
            let mut stream = BufReader::new(stream);
            let mut line = String::new();
            if stream.read_line(&mut line).await.is_err() {
                return;
            }
            let port: Option<u32> = line.strip_prefix("CONNECT ").and_then(|p| p.trim_end().parse().ok());
            if port != Some(guest_port) || !line.ends_with('\n') {
                return;
            }
            let Ok(mut upstream) = UnixStream::connect(&guest).await else {
                return;
            };
            let mut stream = stream.into_inner();
            stream.write_all(format!("OK {host_port}\n").as_bytes()).await.unwrap();
            // Ends with an error when either side hangs up, which is how every connection ends here.
            let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
        });
    }
}

#[tokio::test]
async fn through_firecrackers_vsock_handshake() {
    let agent = Agent::start();
    let uds = agent.dir.path().join("v.sock");
    let mux = tokio::spawn(fake_firecracker_vsock(uds.clone(), 52, agent.socket.clone()));
    while !uds.exists() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let c = AgentClient::new(Endpoint::FirecrackerVsock { uds: uds.clone(), port: 52 });
    let out = c.exec_collect(spec(&["echo", "over vsock"]), b"", MAX_OUT).await.unwrap();
    assert_eq!(out.stdout, b"over vsock\n");

    // A port nothing listens on in the guest: Firecracker closes the connection.
    let refused = AgentClient::new(Endpoint::FirecrackerVsock { uds: uds.clone(), port: 53 });
    match refused.ping().await {
        Err(ClientError::Unreachable(m)) => assert!(m.contains("vsock port 53"), "{m}"),
        other => panic!("{other:?}"),
    }

    // A dead guest: Firecracker gone, its socket file left behind.
    mux.abort();
    // A JoinError saying "cancelled" is what aborting it means.
    let _ = mux.await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(matches!(c.ping().await, Err(ClientError::Unreachable(_))));
    std::fs::remove_file(&uds).unwrap();
    assert!(matches!(c.ping().await, Err(ClientError::Unreachable(_))));
}

#[tokio::test]
async fn an_agent_of_another_protocol_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let hello = hyperfleet_agent_proto::Hello { protocol: 99, agent_version: "9.9.9".into() };
        hyperfleet_agent_proto::write_json(&mut s, &hello).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    match AgentClient::new(Endpoint::Unix(path)).ping().await {
        Err(e @ ClientError::Version { agent: 99, .. }) => {
            assert!(e.to_string().contains("update the guest image"))
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn stdin_frames_survive_output_arriving_mid_frame() {
    // `cat` answers while stdin is still streaming in: a stdin frame half-read when output arrives must not
    // be lost (the agent keeps its read across select iterations).
    let agent = Agent::start();
    let data: Vec<u8> = (0..768u32 << 10).map(|i| (i.wrapping_mul(2_654_435_761) >> 11).to_le_bytes()[0]).collect();
    let out = agent.client().exec_collect(spec(&["cat"]), &data, MAX_OUT).await.unwrap();
    assert_eq!(out.exit.exit_code, 0, "{:?}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout == data, "stdout differs ({} of {} bytes)", out.stdout.len(), data.len());
}

/// Reads terminal output until `want` has appeared (or the session ends); returns all of it.
async fn read_until(out: &mut hyperfleet_agent_proto::client::PtyOutput, want: &str) -> String {
    use hyperfleet_agent_proto::client::PtyEvent;
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.contains(want) {
        match tokio::time::timeout_at(deadline, out.next_event()).await.expect("terminal output in time").unwrap() {
            PtyEvent::Output(b) => seen.push_str(&String::from_utf8_lossy(&b)),
            PtyEvent::Exited { exit_code } => panic!("exited ({exit_code}) before {want:?}; saw {seen:?}"),
        }
    }
    seen
}

#[tokio::test]
async fn a_terminal_has_its_size_a_tty_and_ends_with_the_exit_code() {
    use hyperfleet_agent_proto::PtySpec;
    use hyperfleet_agent_proto::client::PtyEvent;
    let agent = Agent::start();
    let spec = PtySpec {
        argv: Some(vec!["sh".into()]),
        env: [("GREETING".to_string(), "hi-there".to_string())].into(),
        cwd: Some("/tmp".into()),
        cols: 100,
        rows: 30,
    };
    let (mut input, mut output) = agent.client().pty(spec).await.unwrap();
    input.send(b"stty size; tty; echo \"$TERM $GREETING $(pwd)\"\n").await.unwrap();
    let seen = read_until(&mut output, "xterm-256color hi-there /tmp").await;
    assert!(seen.contains("30 100"), "{seen:?}");
    assert!(seen.contains("/dev/pts/"), "{seen:?}");
    input.resize(120, 40).await.unwrap();
    input.send(b"stty size\n").await.unwrap();
    read_until(&mut output, "40 120").await;
    input.send(b"exit 7\n").await.unwrap();
    let code = loop {
        match output.next_event().await.unwrap() {
            PtyEvent::Output(_) => {}
            PtyEvent::Exited { exit_code } => break exit_code,
        }
    };
    assert_eq!(code, 7);
}

#[tokio::test]
async fn hanging_up_a_terminal_ends_its_session() {
    use hyperfleet_agent_proto::PtySpec;
    use hyperfleet_agent_proto::client::PtyEvent;
    let agent = Agent::start();
    let spec = PtySpec { argv: Some(vec!["sh".into()]), env: Default::default(), cwd: None, cols: 80, rows: 24 };
    let (mut input, mut output) = agent.client().pty(spec).await.unwrap();
    // Quoted so that the terminal's echo of the command line does not contain the marker.
    input.send(b"sleep 1000 & echo \"P\"\"ID=$!;\"\n").await.unwrap();
    let mut seen = read_until(&mut output, "PID=").await;
    while !seen.split("PID=").nth(1).is_some_and(|t| t.contains(';')) {
        seen.push_str(&read_until(&mut output, ";").await);
    }
    let pid: i32 = seen.split("PID=").nth(1).and_then(|t| t.split(';').next()).unwrap().parse().unwrap();
    input.hang_up().await.unwrap();
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), output.next_event()).await.unwrap().unwrap() {
            PtyEvent::Output(_) => {}
            PtyEvent::Exited { exit_code } => break exit_code,
        }
    };
    assert_eq!(code, 128 + 1, "the shell ends on SIGHUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(Instant::now() < deadline, "the session's background job {pid} survived the hang-up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A program that cannot be started is the agent's error, before any session exists.
    let bad =
        PtySpec { argv: Some(vec!["/no/such/program".into()]), env: Default::default(), cwd: None, cols: 80, rows: 24 };
    let e = agent.client().pty(bad).await.err().unwrap();
    assert!(matches!(e, ClientError::Agent { kind: ErrorKind::SpawnFailed, .. }), "{e}");
}

#[tokio::test]
async fn directories_are_listed_in_pages_and_made() {
    let a = Agent::start();
    let c = a.client();
    let dir = a.path("big");
    // mkdir: parents, an existing directory with and without `parents`, a file in the way.
    let st = c.mkdir(&format!("{dir}/x/y"), true, Some(0o700)).await.unwrap();
    assert!(st.is_dir);
    assert_eq!(st.mode, 0o700);
    assert!(c.mkdir(&format!("{dir}/x/y"), true, None).await.is_ok());
    assert_eq!(kind(c.mkdir(&format!("{dir}/x/y"), false, None).await), ErrorKind::InvalidPath);
    assert_eq!(kind(c.mkdir(&a.path("no/parent"), false, None).await), ErrorKind::NotFound);
    upload(&c, &format!("{dir}/file"), b"12345", None).await.unwrap();
    assert_eq!(kind(c.mkdir(&format!("{dir}/file"), true, None).await), ErrorKind::InvalidPath);
    assert_eq!(kind(c.mkdir("relative", true, None).await), ErrorKind::InvalidPath);

    // 2,000 more files, listed in pages of 500: every name once, in order, and the kinds and sizes right.
    for i in 0..2000 {
        std::fs::write(format!("{dir}/f{i:05}"), b"").unwrap();
    }
    std::os::unix::fs::symlink("/nowhere", format!("{dir}/link")).unwrap();
    let (mut seen, mut after) = (Vec::new(), None::<String>);
    loop {
        let (page, more) = c.list_dir(&dir, after.as_deref(), 500).await.unwrap();
        assert!(page.len() <= 500);
        after = page.last().map(|e| e.name.clone());
        seen.extend(page);
        if !more {
            break;
        }
    }
    assert_eq!(seen.len(), 2003);
    assert!(seen.windows(2).all(|w| w[0].name < w[1].name));
    let find = |n: &str| seen.iter().find(|e| e.name == n).unwrap();
    assert_eq!((find("file").kind, find("file").size), (hyperfleet_agent_proto::EntryKind::File, 5));
    assert_eq!(find("x").kind, hyperfleet_agent_proto::EntryKind::Dir);
    assert_eq!(find("link").kind, hyperfleet_agent_proto::EntryKind::Symlink);
    // A limit over the page size is capped; listing a file or a missing path is refused.
    let (page, more) = c.list_dir(&dir, None, 100_000).await.unwrap();
    assert_eq!((page.len(), more), (500, true));
    assert_eq!(kind(c.list_dir(&format!("{dir}/file"), None, 10).await), ErrorKind::InvalidPath);
    assert_eq!(kind(c.list_dir(&a.path("missing"), None, 10).await), ErrorKind::NotFound);
}

#[tokio::test]
async fn a_command_echoing_a_large_stdin_does_not_deadlock() {
    // 8 MiB through `cat`: far more than both directions' socket buffers, so stdin must be sent while the
    // output is read. Bounded, so a regression fails instead of hanging.
    let agent = Agent::start();
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0]).collect();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        agent.client().exec_collect(ExecSpec { max_output: Some(MAX_OUT), ..spec(&["cat"]) }, &data, MAX_OUT),
    )
    .await
    .expect("stdin and output flow at once")
    .unwrap();
    assert_eq!(out.exit.exit_code, 0);
    assert!(out.stdout == data, "stdout differs ({} of {} bytes)", out.stdout.len(), data.len());
}
