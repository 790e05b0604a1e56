//! Terminal sessions for the host: a pseudo-terminal pair, the command on its slave side as the leader of a
//! new session (the terminal is its controlling tty), keystrokes and resizes in, the terminal's output out.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use hyperfleet_agent_proto::{self as proto, ErrorKind, Frame, FrameKind, PtyControl, PtySpec, Response};
use nix::pty::{Winsize, openpty};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::files::fail;
use crate::reaper::Reaper;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// After a hang-up, how long the session has to end on SIGHUP before it is killed.
const HANGUP_GRACE: Duration = Duration::from_secs(2);
/// After the command exits, how long its last output may take to be read.
const DRAIN_GRACE: Duration = Duration::from_millis(200);

/// The master side of the terminal, non-blocking, driven by the runtime's reactor.
struct Master(AsyncFd<OwnedFd>);

impl Master {
    fn new(fd: OwnedFd) -> std::io::Result<Self> {
        let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        // SAFETY: `fd` is an open descriptor that the AsyncFd owns from here on: it stays open, and refers
        // to the same terminal, until the AsyncFd is dropped.
        let registered = unsafe { AsyncFd::register(fd) }?;
        Ok(Self(registered))
    }

    /// Reads what the terminal printed; `Ok(0)` once no process holds the slave side any more (EIO).
    async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.as_raw_fd(), buf).map_err(std::io::Error::from)) {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(res) => return res,
                Err(_would_block) => continue,
            }
        }
    }

    async fn write_all(&self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.0.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref().as_fd(), data).map_err(std::io::Error::from)) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    fn resize(&self, cols: u16, rows: u16) -> std::io::Result<()> {
        let ws = winsize(cols, rows);
        // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which points to a live, initialised value;
        // the descriptor is our open pty master.
        let rc = unsafe { libc::ioctl(self.0.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &raw const ws) };
        if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
    }
}

fn winsize(cols: u16, rows: u16) -> Winsize {
    Winsize { ws_row: rows.max(1), ws_col: cols.max(1), ws_xpixel: 0, ws_ypixel: 0 }
}

/// Root's login shell from /etc/passwd when it exists, else /bin/sh.
fn default_shell() -> String {
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| {
            p.lines()
                .find(|l| l.starts_with("root:"))
                .and_then(|l| l.rsplit(':').next())
                .map(str::to_string)
                .filter(|s| s.starts_with('/') && std::path::Path::new(s).is_file())
        })
        .unwrap_or_else(|| "/bin/sh".to_string())
}

fn kill_group(pgid: Pid, sig: Signal) {
    match killpg(pgid, sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => eprintln!("hyperfleet-agent: signal terminal session {pgid}: {e}"),
    }
}

/// Sends `sig` to every process of the session `sid` (the session leader's pid): with job control on, a
/// shell's background jobs are in process groups of their own, and a hang-up must reach them too.
fn signal_session(sid: Pid, sig: Signal) {
    let Ok(dir) = std::fs::read_dir("/proc") else { return };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // Fields after the command name (which is in parentheses and may hold spaces): state ppid pgrp session.
        let session = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(3));
        if session.and_then(|s| s.parse::<i32>().ok()) == Some(sid.as_raw()) {
            match nix::sys::signal::kill(Pid::from_raw(pid), sig) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => eprintln!("hyperfleet-agent: signal {pid} of terminal session {sid}: {e}"),
            }
        }
    }
}

struct Spawned {
    master: Master,
    pgid: Pid,
    exited: tokio::sync::oneshot::Receiver<i32>,
}

fn spawn(reaper: &Reaper, spec: &PtySpec) -> Result<Spawned, Response> {
    let argv = match &spec.argv {
        Some(v) if v.first().is_none_or(String::is_empty) => {
            return Err(fail(ErrorKind::BadRequest, "command must name a program"));
        }
        Some(v) => v.clone(),
        None => vec![default_shell()],
    };
    let cwd = match spec.cwd.as_deref() {
        Some(c) if !c.starts_with('/') => {
            return Err(fail(ErrorKind::InvalidPath, format!("cwd must be absolute, got '{c}'")));
        }
        Some(c) => c.to_string(),
        None if std::path::Path::new("/root").is_dir() => "/root".to_string(),
        None => "/".to_string(),
    };
    let io_err = |what: &str, e: std::io::Error| fail(ErrorKind::Io, format!("{what}: {e}"));
    let pty = openpty(Some(&winsize(spec.cols, spec.rows)), None)
        .map_err(|e| io_err("allocate a terminal", std::io::Error::from(e)))?;
    let slave = |fd: &OwnedFd| fd.try_clone().map(Stdio::from).map_err(|e| io_err("terminal", e));
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", "/root")
        .env("TERM", "xterm-256color")
        .envs(&spec.env)
        .current_dir(&cwd)
        .stdin(slave(&pty.slave)?)
        .stdout(slave(&pty.slave)?)
        .stderr(slave(&pty.slave)?);
    // SAFETY: setsid() and ioctl() are async-signal-safe. The child leads a new session (so the whole
    // session can be signalled as one group) and takes its stdin, the terminal's slave side, as its
    // controlling terminal.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (child, exited) = reaper.spawn(&mut cmd).map_err(|e| {
        if !std::path::Path::new(&cwd).is_dir() {
            fail(ErrorKind::InvalidPath, format!("cwd {cwd} is not a directory"))
        } else {
            fail(ErrorKind::SpawnFailed, format!("cannot run '{}': {e}", argv[0]))
        }
    })?;
    // Our copies of the slave side go now: once the session's processes close theirs, the master reads EIO.
    drop(cmd);
    drop(pty.slave);
    let master = Master::new(pty.master).map_err(|e| io_err("terminal", e))?;
    // pid_t is an i32 that std hands out as u32: reinterpreting the bits gives it back exactly.
    Ok(Spawned { master, pgid: Pid::from_raw(child.id().cast_signed()), exited })
}

/// Reads the next frame and hands `r` back with it (see `exec::next_frame`).
async fn next_frame<R: AsyncRead + Unpin>(r: &mut R) -> (Result<Option<Frame>, proto::ProtoError>, &mut R) {
    let frame = proto::read_frame(r).await;
    (frame, r)
}

pub async fn run<R, W>(reaper: &Reaper, r: &mut R, w: &mut W, spec: PtySpec) -> Result<(), proto::ProtoError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Spawned { master, pgid, exited } = match spawn(reaper, &spec) {
        Ok(s) => s,
        Err(resp) => return proto::write_json(w, &resp).await,
    };
    if let Err(e) = proto::write_json(w, &Response::Ok).await {
        kill_group(pgid, Signal::SIGKILL);
        return Err(e);
    }
    tokio::pin!(exited);
    let mut input = std::pin::pin!(next_frame(r));
    let mut reading_input = true;
    let mut buf = vec![0u8; proto::CHUNK];
    let mut output_open = true;
    let mut link_broken = false;
    // Armed at a hang-up; until then far away (and never polled).
    let kill_at = tokio::time::sleep(Duration::from_secs(86_400));
    tokio::pin!(kill_at);
    let mut hung_up = false;
    let exit_code = loop {
        tokio::select! {
            code = &mut exited => break code.unwrap_or(-1),
            n = master.read(&mut buf), if output_open => match n {
                Ok(0) | Err(_) => output_open = false,
                Ok(n) => {
                    if !link_broken && proto::write_frame(w, FrameKind::Stdout, &buf[..n]).await.is_err() {
                        link_broken = true;
                    }
                    if !link_broken && w.flush().await.is_err() {
                        link_broken = true;
                    }
                    if link_broken && !hung_up {
                        hung_up = true;
                        signal_session(pgid, Signal::SIGHUP);
                        kill_at.as_mut().reset(tokio::time::Instant::now() + HANGUP_GRACE);
                    }
                }
            },
            (frame, r) = &mut input, if reading_input => match frame {
                Ok(Some(Frame { kind: FrameKind::Data, payload })) => {
                    input.set(next_frame(r));
                    // A terminal that no longer takes input (its session is ending) drops the keystrokes.
                    let _ = master.write_all(&payload).await;
                }
                Ok(Some(Frame { kind: FrameKind::Json, payload })) => {
                    input.set(next_frame(r));
                    match serde_json::from_slice::<PtyControl>(&payload) {
                        Ok(PtyControl::Resize { cols, rows }) => {
                            if let Err(e) = master.resize(cols, rows) {
                                eprintln!("hyperfleet-agent: resize terminal: {e}");
                            }
                        }
                        Err(e) => eprintln!("hyperfleet-agent: ignored a malformed terminal control: {e}"),
                    }
                }
                // Hang-up, a broken link or garbage: the session ends as a terminal's does, with SIGHUP.
                other => {
                    reading_input = false;
                    if !matches!(other, Ok(Some(Frame { kind: FrameKind::End, .. }))) {
                        link_broken = true;
                    }
                    if !hung_up {
                        hung_up = true;
                        signal_session(pgid, Signal::SIGHUP);
                        kill_at.as_mut().reset(tokio::time::Instant::now() + HANGUP_GRACE);
                    }
                }
            },
            () = &mut kill_at, if hung_up => kill_group(pgid, Signal::SIGKILL),
        }
    };
    // What the command printed last is still in the terminal: forward it for a short while.
    let drain = async {
        while output_open && !link_broken {
            match master.read(&mut buf).await {
                Ok(0) | Err(_) => output_open = false,
                Ok(n) => {
                    if proto::write_frame(w, FrameKind::Stdout, &buf[..n]).await.is_err() {
                        link_broken = true;
                    }
                }
            }
        }
    };
    // Elapsed: background processes keep the terminal open; they go with the session below.
    let _ = tokio::time::timeout(DRAIN_GRACE, drain).await;
    kill_group(pgid, Signal::SIGHUP);
    if link_broken {
        return Err(proto::ProtoError::Closed);
    }
    proto::write_json(
        w,
        &Response::Exited {
            exit_code,
            timed_out: false,
            stdout_truncated: false,
            stderr_truncated: false,
            duration_ms: 0,
        },
    )
    .await
}
