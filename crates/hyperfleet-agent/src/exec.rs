//! Runs one command for the host: its own session and process group, stdin from `Data` frames, stdout and
//! stderr streamed back as frames (capped when the host asks), and on timeout the whole group is killed.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyperfleet_agent_proto::{self as proto, ErrorKind, ExecSpec, Frame, FrameKind, Response};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

use crate::files::fail;
use crate::reaper::Reaper;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// After the command exits, how long output still held open by its background children is waited for.
const DRAIN_GRACE: Duration = Duration::from_millis(250);

struct Output {
    kind: FrameKind,
    data: Bytes,
}

pub async fn run<R, W>(reaper: &Reaper, r: &mut R, w: &mut W, spec: ExecSpec) -> Result<(), proto::ProtoError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let started = Instant::now();
    let (child, exited) = match spawn(reaper, &spec) {
        Ok(x) => x,
        Err(resp) => {
            drain_stdin(r).await;
            return proto::write_json(w, &resp).await;
        }
    };
    let pgid = child.pgid;
    let (tx, mut rx) = mpsc::channel::<Output>(16);
    let cap = spec.max_output;
    let out_task = tokio::spawn(pump(child.stdout, FrameKind::Stdout, cap, tx.clone()));
    let err_task = tokio::spawn(pump(child.stderr, FrameKind::Stderr, cap, tx));

    let deadline = tokio::time::sleep(Duration::from_millis(spec.timeout_ms.max(1)));
    tokio::pin!(deadline, exited);
    // `reading_stdin`: frames still come from the host, and `stdin_read` is the read under way (it lives
    // across iterations: dropping a half-read frame would put the stream out of step); `stdin`: the pipe,
    // closed at End or on error.
    let mut reading_stdin = true;
    let mut stdin_read = std::pin::pin!(next_frame(r));
    // The pipe is written by its own task: a command that answers as it reads (`cat`) blocks on its output
    // while we write its input, so writing here would stop the output from being forwarded. `pending` is a
    // chunk read from the host and not yet taken by the writer: while there is one, no more is read (the
    // host's stdin waits in the socket), and output keeps flowing.
    let (stdin_tx, stdin_writer) = stdin_writer(child.stdin);
    let mut stdin = Some(stdin_tx);
    let mut pending: Option<Bytes> = None;
    let mut timed_out = false;
    let mut exit_code = None;
    let mut link_broken = false;
    // Forward stdin and output until the process exits (or is killed at the deadline).
    while exit_code.is_none() {
        // Room for `pending` in the writer's queue (an owned permit: the sender stays free to be dropped).
        let reserve = stdin.clone().filter(|_| pending.is_some()).map(mpsc::Sender::reserve_owned);
        tokio::select! {
            code = &mut exited => exit_code = Some(code.unwrap_or(-1)),
            _ = &mut deadline, if !timed_out => {
                timed_out = true;
                kill_group(pgid);
            }
            permit = async { reserve?.await.ok() }, if pending.is_some() => match permit {
                Some(permit) => { permit.send(pending.take().unwrap_or_default()); }
                // The writer is gone (the command closed its stdin): the rest is read and dropped.
                None => { pending = None; stdin = None; }
            },
            (frame, r) = &mut stdin_read, if reading_stdin && pending.is_none() => match frame {
                Ok(Some(f)) if f.kind == FrameKind::Data => {
                    stdin_read.set(next_frame(r));
                    if stdin.is_some() {
                        pending = Some(f.payload);
                    }
                }
                // End of stdin: dropping the pipe closes it.
                Ok(Some(_)) => { reading_stdin = false; stdin = None; }
                Ok(None) | Err(_) => {
                    reading_stdin = false;
                    stdin = None;
                    link_broken = true;
                    kill_group(pgid);
                }
            },
            Some(o) = rx.recv() => {
                if proto::write_frame(w, o.kind, &o.data).await.is_err() {
                    // Nobody is listening any more: do not leave the command running unobserved.
                    link_broken = true;
                    kill_group(pgid);
                }
            }
        }
    }
    drop(stdin);
    // A pipe still held open by a background child that does not read it must not keep the writer forever.
    stdin_writer.abort();
    if reading_stdin && !link_broken {
        // The host may still be sending stdin (or its End): consume it, so closing the connection does not
        // turn into a reset that loses our answer. A host still sending after the grace period is answered
        // all the same.
        let drain = async {
            if let (Ok(Some(f)), r) = (&mut stdin_read).await
                && f.kind == FrameKind::Data
            {
                drain_stdin(r).await;
            }
        };
        if tokio::time::timeout(DRAIN_GRACE, drain).await.is_err() {
            eprintln!("hyperfleet-agent: the host was still sending stdin after the command ended");
        }
    }
    // Output still buffered or held open by background children: forward it for a short grace period.
    let grace = tokio::time::sleep(DRAIN_GRACE);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            o = rx.recv() => match o {
                Some(o) => { if !link_broken && proto::write_frame(w, o.kind, &o.data).await.is_err() { link_broken = true; } }
                None => break,
            },
            _ = &mut grace => break,
        }
    }
    if timed_out {
        // A timed-out command leaves nothing behind in its group.
        kill_group(pgid);
    }
    let (stdout_truncated, stderr_truncated) = (
        out_task.is_finished() && out_task.await.unwrap_or(false),
        err_task.is_finished() && err_task.await.unwrap_or(false),
    );
    if link_broken {
        return Err(proto::ProtoError::Closed);
    }
    proto::write_json(
        w,
        &Response::Exited {
            exit_code: exit_code.unwrap_or(-1),
            timed_out,
            stdout_truncated,
            stderr_truncated,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        },
    )
    .await
}

/// Reads the next frame and hands `r` back with it, so that the read can be kept (pinned) across `select!`
/// iterations and re-armed with the same reader.
/// A task that writes what it is sent into the command's stdin, and closes it when the sender is dropped.
/// After a write fails (the command closed its stdin), what it is sent is dropped.
fn stdin_writer(mut pipe: pipe::Sender) -> (mpsc::Sender<Bytes>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    let task = tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            if pipe.write_all(&chunk).await.is_err() {
                break;
            }
        }
        drop(pipe);
        while rx.recv().await.is_some() {}
    });
    (tx, task)
}

async fn next_frame<R: AsyncRead + Unpin>(r: &mut R) -> (Result<Option<Frame>, proto::ProtoError>, &mut R) {
    let frame = proto::read_frame(r).await;
    (frame, r)
}

/// SIGKILL to the command's process group. ESRCH (the group is gone already) is the expected failure.
fn kill_group(pgid: Pid) {
    match killpg(pgid, Signal::SIGKILL) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => eprintln!("hyperfleet-agent: kill process group {pgid}: {e}"),
    }
}

struct Spawned {
    /// The command's process group (it is its session leader, so the group id is its pid).
    pgid: Pid,
    stdin: pipe::Sender,
    stdout: pipe::Receiver,
    stderr: pipe::Receiver,
}

fn spawn(reaper: &Reaper, spec: &ExecSpec) -> Result<(Spawned, tokio::sync::oneshot::Receiver<i32>), Response> {
    let Some(program) = spec.argv.first() else {
        return Err(fail(ErrorKind::BadRequest, "command must not be empty"));
    };
    let cwd = spec.cwd.as_deref().unwrap_or("/");
    if !cwd.starts_with('/') {
        return Err(fail(ErrorKind::InvalidPath, format!("cwd must be absolute, got '{cwd}'")));
    }
    let mut cmd = Command::new(program);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", "/root")
        .env("TERM", "xterm")
        .envs(&spec.env)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setsid() is async-signal-safe; it makes the child the leader of a new session and process
    // group, so a timeout can kill everything the command started.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
    let (mut child, exited) = reaper.spawn(&mut cmd).map_err(|e| {
        if !std::path::Path::new(cwd).is_dir() {
            fail(ErrorKind::InvalidPath, format!("cwd {cwd} is not a directory"))
        } else {
            fail(ErrorKind::SpawnFailed, format!("cannot run '{program}': {e}"))
        }
    })?;
    let io_err = |e: std::io::Error| fail(ErrorKind::Io, format!("command pipes: {e}"));
    let take = |fd: Option<OwnedFd>| fd.ok_or_else(|| fail(ErrorKind::Io, "command pipe missing"));
    let stdin = pipe::Sender::from_file(File::from(take(child.stdin.take().map(OwnedFd::from))?)).map_err(io_err)?;
    let stdout =
        pipe::Receiver::from_file(File::from(take(child.stdout.take().map(OwnedFd::from))?)).map_err(io_err)?;
    let stderr =
        pipe::Receiver::from_file(File::from(take(child.stderr.take().map(OwnedFd::from))?)).map_err(io_err)?;
    // pid_t is an i32 that std hands out as u32: reinterpreting the bits gives it back exactly.
    let pgid = Pid::from_raw(child.id().cast_signed());
    Ok((Spawned { pgid, stdin, stdout, stderr }, exited))
}

/// Reads one output pipe to its end; returns whether anything was dropped over the cap.
async fn pump(mut pipe: pipe::Receiver, kind: FrameKind, cap: Option<u64>, tx: mpsc::Sender<Output>) -> bool {
    let mut buf = vec![0u8; proto::CHUNK];
    let mut sent = 0u64;
    let mut truncated = false;
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return truncated,
            Ok(n) => n,
        };
        let keep = match cap {
            // Room left under the cap; one past the address space is as good as unlimited.
            Some(c) => usize::try_from(c.saturating_sub(sent)).unwrap_or(usize::MAX).min(n),
            None => n,
        };
        if keep < n {
            truncated = true;
        }
        if keep > 0 {
            sent = sent.saturating_add(u64::try_from(keep).unwrap_or(u64::MAX));
            if tx.send(Output { kind, data: Bytes::copy_from_slice(&buf[..keep]) }).await.is_err() {
                return truncated;
            }
        }
    }
}

async fn drain_stdin<R: AsyncRead + Unpin>(r: &mut R) {
    while let Ok(Some(f)) = proto::read_frame(r).await {
        if f.kind == FrameKind::End {
            return;
        }
    }
}
