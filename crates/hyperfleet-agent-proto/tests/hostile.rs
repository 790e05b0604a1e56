//! The host against a hostile guest: arbitrary, mutated and truncated byte streams fed to the frame and
//! message decoders and to the host-side client (through a fake agent on a unix socket), and round trips
//! of every message type. Each case runs under a tokio timeout, so a hang fails the test instead of
//! stalling it; memory is measured by a counting allocator (per thread; every case runs on a
//! current-thread runtime, so the decoder and the fake agent allocate on the measured thread).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use hyperfleet_agent_proto::client::{AgentClient, ClientError, Endpoint};
use hyperfleet_agent_proto::{
    CHUNK, DirEntry, EntryKind, ErrorKind, ExecSpec, FRAME_TIMEOUT, FileStat, FrameKind, Hello, MAX_FRAME,
    PROTOCOL_VERSION, ProtoError, PtyControl, PtySpec, Request, Response, read_frame, read_frame_within, read_json,
    write_frame, write_json,
};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

// ---------------------------------------------------------------------------------------------------------
// Memory: live bytes allocated by the current thread, and their peak since the last reset.

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    // `try_with`: the thread-locals may already be gone while a thread exits.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn size(layout: Layout) -> isize {
    isize::try_from(layout.size()).unwrap_or(isize::MAX)
}

// SAFETY: every method forwards to the system allocator unchanged; the counting touches only const-initialised
// thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        track(size(layout));
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        track(-size(layout));
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        track(size(layout));
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        track(isize::try_from(new_size).unwrap_or(isize::MAX) - size(layout));
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `fut` on a fresh current-thread runtime and returns its output with the peak of bytes allocated
/// (and still live) on this thread meanwhile, above what was live when it started.
fn measured<T>(paused: bool, fut: impl Future<Output = T>) -> (T, usize) {
    let mut b = tokio::runtime::Builder::new_current_thread();
    b.enable_all().start_paused(paused);
    let rt = b.build().unwrap();
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = rt.block_on(fut);
    let peak = PEAK.with(Cell::get) - base;
    drop(rt);
    (out, usize::try_from(peak).unwrap_or(0))
}

fn run<T>(fut: impl Future<Output = T>) -> T {
    measured(false, fut).0
}

/// Frame buffer plus what decoding its JSON may hold beside it (the host's messages are strings and
/// numbers: never more than the payload), plus the runtime's own bookkeeping.
const DECODE_BUDGET: usize = 2 * MAX_FRAME + (256 << 10);

// ---------------------------------------------------------------------------------------------------------
// Strategies: every message type.

fn text() -> impl Strategy<Value = String> {
    prop_oneof![".{0,40}", "/[a-z0-9/._-]{0,60}", Just(String::new())]
}

fn error_kind() -> impl Strategy<Value = ErrorKind> {
    prop_oneof![
        Just(ErrorKind::NotFound),
        Just(ErrorKind::InvalidPath),
        Just(ErrorKind::PermissionDenied),
        Just(ErrorKind::TooLarge),
        Just(ErrorKind::SpawnFailed),
        Just(ErrorKind::BadRequest),
        Just(ErrorKind::Io),
    ]
}

fn exec_spec() -> impl Strategy<Value = ExecSpec> {
    (
        prop::collection::vec(text(), 0..6),
        prop::collection::btree_map("[A-Z_]{1,12}", text(), 0..5),
        prop::option::of(text()),
        any::<u64>(),
        prop::option::of(any::<u64>()),
    )
        .prop_map(|(argv, env, cwd, timeout_ms, max_output)| ExecSpec { argv, env, cwd, timeout_ms, max_output })
}

fn pty_spec() -> impl Strategy<Value = PtySpec> {
    (
        prop::option::of(prop::collection::vec(text(), 0..4)),
        prop::collection::btree_map("[A-Z_]{1,12}", text(), 0..5),
        prop::option::of(text()),
        any::<u16>(),
        any::<u16>(),
    )
        .prop_map(|(argv, env, cwd, cols, rows)| PtySpec { argv, env, cwd, cols, rows })
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::Ping),
        exec_spec().prop_map(Request::Exec),
        (text(), prop::option::of(any::<u32>()), prop::option::of(any::<u64>()))
            .prop_map(|(path, mode, max_size)| Request::WriteFile { path, mode, max_size }),
        (text(), prop::option::of(any::<u64>())).prop_map(|(path, max_size)| Request::ReadFile { path, max_size }),
        text().prop_map(|path| Request::Stat { path }),
        (text(), any::<bool>()).prop_map(|(path, recursive)| Request::Delete { path, recursive }),
        (text(), prop::option::of(text()), any::<u32>()).prop_map(|(path, after, limit)| Request::ListDir {
            path,
            after,
            limit
        }),
        (text(), any::<bool>(), prop::option::of(any::<u32>())).prop_map(|(path, parents, mode)| Request::Mkdir {
            path,
            parents,
            mode
        }),
        Just(Request::Shutdown),
        pty_spec().prop_map(Request::Pty),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        Just(Response::Ok),
        (any::<i32>(), any::<bool>(), any::<bool>(), any::<bool>(), any::<u64>()).prop_map(
            |(exit_code, timed_out, stdout_truncated, stderr_truncated, duration_ms)| Response::Exited {
                exit_code,
                timed_out,
                stdout_truncated,
                stderr_truncated,
                duration_ms,
            }
        ),
        (any::<u64>(), any::<u32>()).prop_map(|(size, mode)| Response::File { size, mode }),
        any::<u64>().prop_map(|size| Response::Written { size }),
        (any::<u64>(), any::<u32>(), any::<bool>(), any::<i64>()).prop_map(|(size, mode, is_dir, modified_unix)| {
            Response::Stat(FileStat { size, mode, is_dir, modified_unix })
        }),
        (prop::collection::vec(dir_entry(), 0..4), any::<bool>())
            .prop_map(|(entries, more)| Response::Entries { entries, more }),
        (error_kind(), text()).prop_map(|(kind, message)| Response::Error { kind, message }),
    ]
}

fn dir_entry() -> impl Strategy<Value = DirEntry> {
    let kind =
        prop_oneof![Just(EntryKind::File), Just(EntryKind::Dir), Just(EntryKind::Symlink), Just(EntryKind::Other)];
    (text(), kind, any::<u64>(), any::<u32>(), any::<i64>())
        .prop_map(|(name, kind, size, mode, modified_unix)| DirEntry { name, kind, size, mode, modified_unix })
}

fn hello() -> impl Strategy<Value = Hello> {
    (any::<u32>(), text()).prop_map(|(protocol, agent_version)| Hello { protocol, agent_version })
}

fn frame_kind() -> impl Strategy<Value = FrameKind> {
    prop_oneof![
        Just(FrameKind::Json),
        Just(FrameKind::Data),
        Just(FrameKind::Stdout),
        Just(FrameKind::Stderr),
        Just(FrameKind::End),
    ]
}

/// One frame as the wire carries it.
fn encode(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
    let mut out = u32::try_from(payload.len() + 1).unwrap().to_be_bytes().to_vec();
    out.push(kind as u8);
    out.extend_from_slice(payload);
    out
}

/// A plausible conversation: JSON messages and data frames, encoded.
fn valid_stream() -> impl Strategy<Value = Vec<u8>> {
    let frame = prop_oneof![
        response().prop_map(|r| encode(FrameKind::Json, &serde_json::to_vec(&r).unwrap())),
        request().prop_map(|r| encode(FrameKind::Json, &serde_json::to_vec(&r).unwrap())),
        (frame_kind(), prop::collection::vec(any::<u8>(), 0..300)).prop_map(|(k, p)| encode(k, &p)),
    ];
    prop::collection::vec(frame, 0..8).prop_map(|frames| frames.concat())
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        bits: u8,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Delete {
        at: usize,
        len: usize,
    },
    /// A length prefix at `at` claiming `len` (huge lengths included).
    Length {
        at: usize,
        len: u32,
    },
    Truncate {
        at: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, bits)| Mutation::Flip { at, bits }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1..32usize).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), any::<u32>()).prop_map(|(at, len)| Mutation::Length { at, len }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let n = bytes.len();
        match m {
            Mutation::Flip { at, bits } if n > 0 => bytes[at % n] ^= bits,
            Mutation::Insert { at, bytes: b } => {
                let at = at % (n + 1);
                bytes.splice(at..at, b.iter().copied());
            }
            Mutation::Delete { at, len } if n > 0 => {
                let at = at % n;
                bytes.drain(at..(at + len).min(n));
            }
            Mutation::Length { at, len } => {
                let at = at % (n + 1);
                bytes.splice(at..at, len.to_be_bytes());
            }
            Mutation::Truncate { at } => bytes.truncate(at % (n + 1)),
            _ => {}
        }
    }
    bytes
}

/// Decodes frames (and their JSON, as both sides would) until the stream ends or breaks. Returns the
/// number of frames read; panics if a frame exceeds the limit or decoding does not end in time.
async fn decode_all(bytes: Vec<u8>) -> usize {
    let (mut a, mut b) = tokio::io::duplex(1 << 16);
    let writer = tokio::spawn(async move {
        // The reader may stop at the first error, which closes its end: nothing to report then.
        let _ = a.write_all(&bytes).await;
    });
    let mut frames = 0;
    let decoding = async {
        // Until a clean end or the first error.
        while let Ok(Some(f)) = read_frame(&mut b).await {
            assert!(f.payload.len() <= MAX_FRAME, "frame of {} bytes", f.payload.len());
            if f.kind == FrameKind::Json {
                // Either side may receive any of these; none may panic or allocate out of bounds.
                let _ = serde_json::from_slice::<Response>(&f.payload);
                let _ = serde_json::from_slice::<Request>(&f.payload);
                let _ = serde_json::from_slice::<Hello>(&f.payload);
            }
            frames += 1;
        }
    };
    // The writer closes its end when done, so every stream ends; FRAME_TIMEOUT is virtual (paused time).
    tokio::time::timeout(FRAME_TIMEOUT * 2, decoding).await.expect("decoding a closed stream must end");
    writer.await.unwrap();
    frames
}

// ---------------------------------------------------------------------------------------------------------
// Decoders.

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_nor_overallocate(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let (_, peak) = measured(true, decode_all(bytes));
        prop_assert!(peak <= DECODE_BUDGET, "peak {peak} bytes");
    }

    #[test]
    fn mutated_conversations_never_panic_nor_overallocate(
        stream in valid_stream(),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let (_, peak) = measured(true, decode_all(mutate(stream, &mutations)));
        prop_assert!(peak <= DECODE_BUDGET, "peak {peak} bytes");
    }

    #[test]
    fn valid_conversations_decode_frame_by_frame(frames in prop::collection::vec(
        (frame_kind(), prop::collection::vec(any::<u8>(), 0..2000)), 0..10)
    ) {
        let bytes: Vec<u8> = frames.iter().map(|(k, p)| encode(*k, p)).collect::<Vec<_>>().concat();
        let got = run(async move {
            let (mut a, mut b) = tokio::io::duplex(1 << 20);
            a.write_all(&bytes).await.unwrap();
            drop(a);
            let mut got = Vec::new();
            while let Some(f) = read_frame(&mut b).await.unwrap() {
                got.push((f.kind, f.payload.to_vec()));
            }
            got
        });
        prop_assert_eq!(got, frames);
    }

    /// A peer that stops mid-frame and keeps the connection open: the reader gets `Timeout` after
    /// FRAME_TIMEOUT (virtual time), having allocated no more than what arrived (plus a chunk).
    #[test]
    fn a_peer_stalling_mid_frame_times_out(
        kind in frame_kind(),
        announced in 1..=MAX_FRAME,
        sent_permille in 0..1000usize,
        head_bytes in 1..=8usize,
    ) {
        let (res, peak) = measured(true, async move {
            let (mut a, mut b) = tokio::io::duplex(1 << 16);
            // Part of the head only, or the head and part of the payload; never the whole frame.
            let body = announced / 1000 * sent_permille;
            let sent = if head_bytes < 5 { head_bytes } else { 5 + body.min(announced - 1) };
            let mut frame = u32::try_from(announced + 1).unwrap().to_be_bytes().to_vec();
            frame.push(kind as u8);
            frame.resize(sent, 0xAB);
            let writer = tokio::spawn(async move {
                a.write_all(&frame).await.unwrap();
                // Hold the connection open, silent.
                tokio::time::sleep(FRAME_TIMEOUT * 10).await;
                drop(a);
            });
            let started = tokio::time::Instant::now();
            let res = read_frame(&mut b).await;
            let waited = started.elapsed();
            writer.abort();
            (res, waited, sent)
        });
        let (res, waited, sent) = res;
        prop_assert!(matches!(res, Err(ProtoError::Timeout(_))), "{res:?}");
        prop_assert!(waited >= FRAME_TIMEOUT && waited < FRAME_TIMEOUT + Duration::from_secs(1), "{waited:?}");
        // What was sent is held three times at most (our copy, the duplex's buffer, the reader's); a reader
        // that trusted the announced length would hold up to MAX_FRAME.
        prop_assert!(peak <= 3 * sent + CHUNK + (256 << 10), "peak {peak} for {sent} bytes sent");
    }

    #[test]
    fn every_request_round_trips(req in request()) {
        let got: Request = run(round_trip(req.clone()));
        prop_assert_eq!(got, req);
    }

    #[test]
    fn every_response_round_trips(resp in response()) {
        let got: Response = run(round_trip(resp.clone()));
        prop_assert_eq!(got, resp);
    }

    #[test]
    fn terminal_controls_round_trip(cols in any::<u16>(), rows in any::<u16>()) {
        let c = PtyControl::Resize { cols, rows };
        prop_assert_eq!(run(round_trip(c)), c);
    }

    #[test]
    fn hello_and_exec_spec_round_trip(h in hello(), spec in exec_spec()) {
        let got: Hello = run(round_trip(h.clone()));
        prop_assert_eq!(got, h);
        let got: ExecSpec = run(round_trip(spec.clone()));
        prop_assert_eq!(got, spec);
    }

    #[test]
    fn data_frames_round_trip(kind in frame_kind(), payload in prop::collection::vec(any::<u8>(), 0..5000)) {
        let got = run(async {
            let (mut a, mut b) = tokio::io::duplex(1 << 16);
            write_frame(&mut a, kind, &payload).await.unwrap();
            read_frame(&mut b).await.unwrap().unwrap()
        });
        prop_assert_eq!((got.kind, &got.payload[..]), (kind, &payload[..]));
    }
}

async fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(msg: T) -> T {
    let (mut a, mut b) = tokio::io::duplex(1 << 16);
    write_json(&mut a, &msg).await.unwrap();
    read_json(&mut b, "a message").await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_frame_at_the_limit_passes_and_one_past_it_is_refused_before_allocating() {
    let (mut a, mut b) = tokio::io::duplex(1 << 16);
    let payload = vec![7u8; MAX_FRAME];
    let w = tokio::spawn(async move {
        write_frame(&mut a, FrameKind::Data, &payload).await.unwrap();
        a
    });
    assert_eq!(read_frame(&mut b).await.unwrap().unwrap().payload.len(), MAX_FRAME);
    let mut a = w.await.unwrap();
    for len in [MAX_FRAME + 2, usize::try_from(u32::MAX).unwrap()] {
        a.write_all(&u32::try_from(len).unwrap().to_be_bytes()).await.unwrap();
        assert!(matches!(read_frame(&mut b).await, Err(ProtoError::TooLarge(n)) if n == len - 1));
    }
}

#[tokio::test(start_paused = true)]
async fn silence_between_frames_is_not_a_timeout() {
    let (mut a, mut b) = tokio::io::duplex(64);
    let w = tokio::spawn(async move {
        tokio::time::sleep(FRAME_TIMEOUT * 4).await;
        write_frame(&mut a, FrameKind::End, b"").await.unwrap();
    });
    assert_eq!(read_frame(&mut b).await.unwrap().unwrap().kind, FrameKind::End);
    w.await.unwrap();
    // And the bound is the caller's to choose.
    let (mut a, mut b) = tokio::io::duplex(64);
    a.write_all(&[0, 0]).await.unwrap();
    let limit = Duration::from_millis(10);
    assert!(matches!(read_frame_within(&mut b, limit).await, Err(ProtoError::Timeout(l)) if l == limit));
}

// ---------------------------------------------------------------------------------------------------------
// The host client against a fake agent on a unix socket.

/// A listening socket in a temporary directory and a client for it.
struct Fake {
    _dir: tempfile::TempDir,
    listener: UnixListener,
    path: PathBuf,
}

impl Fake {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        Self { _dir: dir, listener, path }
    }

    fn client(&self) -> AgentClient {
        AgentClient::new(Endpoint::Unix(self.path.clone())).with_reply_timeout(Duration::from_millis(300))
    }

    async fn accept(&self) -> UnixStream {
        let (mut s, _) = self.listener.accept().await.unwrap();
        let hello = Hello { protocol: PROTOCOL_VERSION, agent_version: "fake".into() };
        write_json(&mut s, &hello).await.unwrap();
        s
    }
}

/// Reads the request and, for an exec, its stdin up to `End`.
async fn read_request(s: &mut UnixStream) -> Request {
    let req: Request = read_json(s, "a request").await.unwrap();
    if matches!(req, Request::Exec(_)) {
        loop {
            match read_frame(s).await.unwrap() {
                Some(f) if f.kind == FrameKind::End => break,
                Some(_) => {}
                None => panic!("stdin never ended"),
            }
        }
    }
    req
}

fn exec_spec_for_test(max_output: Option<u64>) -> ExecSpec {
    ExecSpec { argv: vec!["flood".into()], env: BTreeMap::new(), cwd: None, timeout_ms: 1000, max_output }
}

/// Sends `total` bytes of `kind` in CHUNK frames.
async fn flood(s: &mut UnixStream, kind: FrameKind, total: usize, byte: u8) {
    let chunk = vec![byte; CHUNK];
    let mut left = total;
    while left > 0 {
        let n = left.min(CHUNK);
        write_frame(s, kind, &chunk[..n]).await.unwrap();
        left -= n;
    }
}

const LIAR: Response = Response::Exited {
    exit_code: 0,
    timed_out: false,
    stdout_truncated: false,
    stderr_truncated: false,
    duration_ms: 1,
};

#[test]
fn exec_collect_caps_a_flooding_agent_and_flags_truncation() {
    const CAP: u64 = 10 << 20;
    let ((out, req), peak) = measured(false, async {
        let fake = Fake::new();
        let client = fake.client();
        let agent = async {
            let mut s = fake.accept().await;
            let req = read_request(&mut s).await;
            // 50 MB on stdout, 12 MiB on stderr, interleaved; then an exit that claims nothing was cut.
            flood(&mut s, FrameKind::Stderr, 2 << 20, b'e').await;
            flood(&mut s, FrameKind::Stdout, 50_000_000, b'o').await;
            flood(&mut s, FrameKind::Stderr, 10 << 20, b'e').await;
            write_json(&mut s, &LIAR).await.unwrap();
            req
        };
        let collect = client.exec_collect(exec_spec_for_test(None), b"stdin", CAP);
        let (out, req) = tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(collect, agent) })
            .await
            .expect("exec_collect against a flooding agent must finish");
        (out.unwrap(), req)
    });
    let cap = usize::try_from(CAP).unwrap();
    assert_eq!(out.stdout.len(), cap);
    assert!(out.stdout.iter().all(|b| *b == b'o'));
    assert_eq!(out.stderr.len(), cap);
    assert!(out.exit.stdout_truncated && out.exit.stderr_truncated, "{:?}", out.exit);
    // The agent was asked for no more than the cap.
    assert!(matches!(req, Request::Exec(ExecSpec { max_output: Some(CAP), .. })), "{req:?}");
    // Two capped streams, one frame in flight, the agent's chunk, the runtime: not 60 MB.
    assert!(peak < 2 * cap + 4 * MAX_FRAME, "peak {peak} bytes");
}

#[test]
fn exec_collect_keeps_output_under_the_cap_and_the_agents_own_flags() {
    let out = run(async {
        let fake = Fake::new();
        let client = fake.client();
        let agent = async {
            let mut s = fake.accept().await;
            let req = read_request(&mut s).await;
            // A spec cap below the host's stays.
            assert!(matches!(req, Request::Exec(ExecSpec { max_output: Some(100), .. })), "{req:?}");
            flood(&mut s, FrameKind::Stdout, 100, b'o').await;
            flood(&mut s, FrameKind::Stderr, 5, b'e').await;
            let exit = Response::Exited {
                exit_code: 3,
                timed_out: false,
                stdout_truncated: true,
                stderr_truncated: false,
                duration_ms: 1,
            };
            write_json(&mut s, &exit).await.unwrap();
        };
        let (out, ()) = tokio::join!(client.exec_collect(exec_spec_for_test(Some(100)), b"", 1000), agent);
        out.unwrap()
    });
    assert_eq!((out.stdout.len(), out.stderr.len(), out.exit.exit_code), (100, 5, 3));
    // Exactly at the cap is not truncated by the host, but the agent's own word is kept.
    assert!(out.exit.stdout_truncated && !out.exit.stderr_truncated);
}

#[test]
fn exec_collect_with_a_zero_cap_keeps_nothing() {
    let out = run(async {
        let fake = Fake::new();
        let client = fake.client();
        let agent = async {
            let mut s = fake.accept().await;
            read_request(&mut s).await;
            flood(&mut s, FrameKind::Stdout, 1, b'o').await;
            write_json(&mut s, &LIAR).await.unwrap();
        };
        let (out, ()) = tokio::join!(client.exec_collect(exec_spec_for_test(None), b"", 0), agent);
        out.unwrap()
    });
    assert!(out.stdout.is_empty() && out.exit.stdout_truncated && !out.exit.stderr_truncated);
}

#[test]
fn a_file_longer_than_announced_or_over_the_limit_is_refused() {
    run(async {
        let fake = Fake::new();
        let client = fake.client();
        // Announces 10 bytes, sends 20.
        let agent = async {
            let mut s = fake.accept().await;
            read_request(&mut s).await;
            write_json(&mut s, &Response::File { size: 10, mode: 0o644 }).await.unwrap();
            write_frame(&mut s, FrameKind::Data, &[1; 20]).await.unwrap();
            write_frame(&mut s, FrameKind::End, b"").await.unwrap();
            write_json(&mut s, &Response::Ok).await.unwrap();
            s
        };
        let reading = async {
            let mut r = client.read_file("/f", Some(100)).await.unwrap();
            let first = r.next_chunk().await;
            let again = r.next_chunk().await;
            (first, again)
        };
        let ((first, again), _s) = tokio::join!(reading, agent);
        assert!(matches!(first, Err(ClientError::Proto(ProtoError::Violation(_)))), "{first:?}");
        assert!(again.is_err(), "a failed read stays failed: {again:?}");

        // Announces more than it was asked for.
        let agent = async {
            let mut s = fake.accept().await;
            read_request(&mut s).await;
            write_json(&mut s, &Response::File { size: 101, mode: 0o644 }).await.unwrap();
            s
        };
        let (res, _s) = tokio::join!(client.read_file("/f", Some(100)), agent);
        assert!(matches!(res, Err(ClientError::Proto(ProtoError::Violation(_)))));

        // Sends less than announced.
        let agent = async {
            let mut s = fake.accept().await;
            read_request(&mut s).await;
            write_json(&mut s, &Response::File { size: 10, mode: 0o644 }).await.unwrap();
            write_frame(&mut s, FrameKind::Data, &[1; 4]).await.unwrap();
            write_frame(&mut s, FrameKind::End, b"").await.unwrap();
            s
        };
        let reading = async {
            let mut r = client.read_file("/f", None).await.unwrap();
            assert_eq!(r.next_chunk().await.unwrap().unwrap().len(), 4);
            r.next_chunk().await
        };
        let (res, _s) = tokio::join!(reading, agent);
        assert!(matches!(res, Err(ClientError::Proto(ProtoError::Violation(_)))), "{res:?}");
    });
}

#[test]
fn a_listing_longer_than_asked_or_out_of_order_breaks_the_protocol() {
    let entry = |name: &str| DirEntry { name: name.into(), kind: EntryKind::File, size: 0, mode: 0, modified_unix: 0 };
    let answers = [
        // Three entries when two were asked for.
        vec![entry("a"), entry("b"), entry("c")],
        // Out of name order.
        vec![entry("b"), entry("a")],
        // Not after the cursor.
        vec![entry("0")],
    ];
    for entries in answers {
        run(async {
            let fake = Fake::new();
            let client = fake.client();
            let agent = async {
                let mut s = fake.accept().await;
                read_request(&mut s).await;
                write_json(&mut s, &Response::Entries { entries: entries.clone(), more: false }).await.unwrap();
                s
            };
            let (res, _s) = tokio::join!(client.list_dir("/d", Some("0"), 2), agent);
            assert!(matches!(res, Err(ClientError::Proto(ProtoError::Violation(_)))), "{entries:?}: {res:?}");
        });
    }
}

#[test]
fn a_huge_error_message_is_clipped() {
    let err = run(async {
        let fake = Fake::new();
        let client = fake.client();
        let agent = async {
            let mut s = fake.accept().await;
            read_request(&mut s).await;
            let message = "é".repeat(MAX_FRAME / 4);
            write_json(&mut s, &Response::Error { kind: ErrorKind::Io, message }).await.unwrap();
        };
        let (res, ()) = tokio::join!(client.stat("/x"), agent);
        res.unwrap_err()
    });
    match err {
        ClientError::Agent { message, .. } => {
            assert!(message.len() <= hyperfleet_agent_proto::client::MAX_ERROR_MESSAGE + '…'.len_utf8())
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_agent_that_does_not_answer_is_unreachable_not_a_hang() {
    run(async {
        let fake = Fake::new();
        let client = fake.client();
        let agent = async {
            let mut s = fake.accept().await;
            read_request(&mut s).await;
            // Silent, connection open, until the client gives up and hangs up.
            let mut buf = [0u8; 1];
            let _ = s.read(&mut buf).await;
        };
        let (res, ()) = tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(client.stat("/x"), agent) })
            .await
            .expect("bounded by the reply timeout");
        assert!(matches!(res, Err(ClientError::Unreachable(_))), "{res:?}");
    });
}

/// What the hostile agent does after its hello and after reading the request.
#[derive(Debug, Clone, Copy)]
enum Then {
    Close,
    HangOpen,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// A hostile agent answers every operation with arbitrary (or mutated valid) bytes, then either hangs up
    /// or goes silent: each client operation ends with a result (mostly an error) and never hangs. Exec is
    /// only tried with agents that hang up, as silence during a command is legitimate and the caller bounds
    /// it.
    #[test]
    fn the_client_survives_a_hostile_agent(
        garbage in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..600),
            (valid_stream(), prop::collection::vec(mutation(), 0..4)).prop_map(|(s, m)| mutate(s, &m)),
        ],
        op in 0..7u8,
        hang in any::<bool>(),
    ) {
        // Silence is legitimate during a command and in a terminal: those callers bound it themselves.
        let then = if hang && op != 0 && op != 6 { Then::HangOpen } else { Then::Close };
        let (res, peak) = measured(false, async move {
            let fake = Fake::new();
            let client = fake.client();
            let agent = async {
                let mut s = fake.accept().await;
                // The request itself is ours and well-formed; stdin may or may not be read.
                let _: Request = read_json(&mut s, "a request").await.unwrap();
                // The client may hang up first (it found an error): that ends the agent's turn too.
                let _ = s.write_all(&garbage).await;
                if let Then::HangOpen = then {
                    let mut buf = [0u8; 1024];
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                }
            };
            let operation = async {
                match op {
                    0 => client.exec_collect(exec_spec_for_test(None), b"in", 1 << 20).await.map(|o| format!("{o:?}")),
                    1 => client.stat("/x").await.map(|s| format!("{s:?}")),
                    2 => client.delete("/x", true).await.map(|()| "deleted".into()),
                    3 => client.ping().await.map(|()| "pong".into()),
                    4 => client.list_dir("/x", None, 10).await.map(|(e, more)| format!("{} {more}", e.len())),
                    6 => {
                        let spec = PtySpec { argv: None, env: BTreeMap::new(), cwd: None, cols: 80, rows: 24 };
                        let (mut input, mut output) = client.pty(spec).await?;
                        // Keystrokes to an agent that is gone fail or vanish; neither may hang.
                        let _ = input.send(b"ls\n").await;
                        let mut n = 0;
                        loop {
                            match output.next_event().await? {
                                hyperfleet_agent_proto::client::PtyEvent::Output(b) => n += b.len(),
                                hyperfleet_agent_proto::client::PtyEvent::Exited { exit_code } => {
                                    break Ok(format!("{n} bytes, exit {exit_code}"));
                                }
                            }
                        }
                    }
                    _ => {
                        let mut r = client.read_file("/x", Some(1000)).await?;
                        let mut n = 0;
                        while let Some(c) = r.next_chunk().await? {
                            n += c.len();
                            assert!(n <= 1000);
                        }
                        Ok::<_, ClientError>(format!("{n} bytes"))
                    }
                }
            };
            let bound = Duration::from_secs(5);
            let both = async {
                let (res, ()) = tokio::join!(operation, agent);
                res
            };
            tokio::time::timeout(bound, both).await
        });
        prop_assert!(res.is_ok(), "op {op} hung against {then:?}");
        prop_assert!(peak <= DECODE_BUDGET + (1 << 20), "peak {peak} bytes");
    }
}
