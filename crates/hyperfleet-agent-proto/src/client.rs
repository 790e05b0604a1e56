//! The host side of the protocol: reaching an agent (unix socket, or Firecracker's vsock unix socket with its
//! `CONNECT` handshake), checking its version, and one method per operation. Large transfers are streamed
//! chunk by chunk through [`FileWriter`] / [`FileReader`] / [`ExecSession`].
//!
//! The agent runs inside the guest, so the host treats whatever it sends as hostile input:
//! - every frame is bounded by [`crate::MAX_FRAME`] and [`crate::FRAME_TIMEOUT`] (see the crate docs);
//! - [`AgentClient::exec_collect`] keeps at most `max_output` bytes of each stream, whatever the agent sends
//!   or claims, so a flooding agent cannot grow the host's memory;
//! - a file read yields no more than the size the agent announced (and no more than `max_size`);
//! - operations that the agent answers at once (connect and hello, ping, stat, delete, shutdown, the header of
//!   a file read, each chunk of a file transfer, the answer to a finished upload) are bounded in time:
//!   `connect_timeout` for connect + hello and for ping, [`AgentClient::reply_timeout`] for the others. A
//!   running command may be silent for as long as its own timeout allows, so [`ExecSession::next_event`] has
//!   no such bound: the caller bounds the whole command (the agent enforces `timeout_ms`; a hostile one may
//!   not);
//! - error messages from the agent are clipped to [`MAX_ERROR_MESSAGE`] bytes before they reach logs and
//!   API answers.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::UnixStream;

use crate::{
    DirEntry, ErrorKind, ExecSpec, FileStat, Frame, FrameKind, Hello, MAX_LIST_PAGE, PROTOCOL_VERSION, ProtoError,
    PtyControl, PtySpec, Request, Response, read_frame, read_json, write_frame, write_json,
};

/// Where an agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket the agent itself listens on (container runtime).
    Unix(PathBuf),
    /// Firecracker's host-side vsock socket; `port` is the guest port (52).
    FirecrackerVsock { uds: PathBuf, port: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers yet (guest still booting, agent not running, machine gone).
    #[error("cannot reach the guest agent: {0}")]
    Unreachable(String),
    #[error("guest agent speaks protocol version {agent}, this host speaks {ours}; update the guest image")]
    Version { agent: u32, ours: u32 },
    /// The agent refused or failed the operation.
    #[error("{message}")]
    Agent { kind: ErrorKind, message: String },
    #[error("guest agent protocol error: {0}")]
    Proto(#[from] ProtoError),
}

/// The cap on each output stream of [`AgentClient::exec_collect`] that the daemon uses: the same 10 MiB the
/// agent is asked to apply.
pub const DEFAULT_MAX_OUTPUT: u64 = 10 << 20;
/// Longest error message from the agent that is kept (longer ones are cut at a character boundary).
pub const MAX_ERROR_MESSAGE: usize = 4096;
/// Default bound on an answer the agent gives at once; see [`AgentClient::with_reply_timeout`].
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct AgentClient {
    endpoint: Endpoint,
    connect_timeout: Duration,
    reply_timeout: Duration,
}

/// One connection after the hello, ready for a request.
struct Conn {
    r: ReadHalf<UnixStream>,
    w: WriteHalf<UnixStream>,
}

fn agent_error(resp: Response) -> ClientError {
    match resp {
        Response::Error { kind, message } => ClientError::Agent { kind, message: clip(message) },
        other => ClientError::Proto(ProtoError::UnexpectedResponse(clip(format!("{other:?}")))),
    }
}

/// Cuts `s` to at most [`MAX_ERROR_MESSAGE`] bytes, at a character boundary.
fn clip(mut s: String) -> String {
    if s.len() > MAX_ERROR_MESSAGE {
        let mut end = MAX_ERROR_MESSAGE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// `fut`, or `Unreachable` when the agent does not answer within `limit` (a guest that hangs looks like one
/// that is gone, and callers that wait for an agent retry it).
async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| {
        Err(ClientError::Unreachable(format!("the agent did not answer {what} within {}s", limit.as_secs())))
    })
}

/// An output stream kept up to a cap; what arrives past it is dropped and remembered as truncation.
#[derive(Debug)]
struct Capped {
    data: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl Capped {
    fn new(cap: u64) -> Self {
        // A cap past the address space cannot be reached anyway.
        Self { data: Vec::new(), cap: usize::try_from(cap).unwrap_or(usize::MAX), truncated: false }
    }

    /// Keeps what fits of `chunk`, if `grant` allows that many more bytes; once refused, keeps nothing more.
    fn push(&mut self, chunk: &[u8], grant: &mut (dyn FnMut(usize) -> bool + Send)) {
        let mut keep = self.cap.saturating_sub(self.data.len()).min(chunk.len());
        if keep > 0 && !grant(keep) {
            self.cap = self.data.len();
            keep = 0;
        }
        if keep < chunk.len() {
            self.truncated = true;
        }
        let need = self.data.len() + keep;
        if need > self.data.capacity() {
            // Grow as a Vec would (doubling), but never past the cap: the cap is the memory bound.
            let want = need.max(self.data.capacity().saturating_mul(2)).min(self.cap);
            self.data.reserve_exact(want - self.data.len());
        }
        self.data.extend_from_slice(&chunk[..keep]);
    }
}

impl AgentClient {
    pub fn new(endpoint: Endpoint) -> Self {
        Self { endpoint, connect_timeout: Duration::from_secs(3), reply_timeout: DEFAULT_REPLY_TIMEOUT }
    }

    /// Bounds each answer the agent gives at once (stat, delete, shutdown, a file read's header, each chunk
    /// of a file transfer, the answer to a finished upload, which includes the guest's fsync); default
    /// [`DEFAULT_REPLY_TIMEOUT`].
    #[must_use]
    pub fn with_reply_timeout(mut self, limit: Duration) -> Self {
        self.reply_timeout = limit;
        self
    }

    pub fn reply_timeout(&self) -> Duration {
        self.reply_timeout
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    async fn connect(&self) -> Result<Conn, ClientError> {
        tokio::time::timeout(self.connect_timeout, self.connect_inner())
            .await
            .map_err(|_| ClientError::Unreachable("timed out connecting".into()))?
    }

    async fn connect_inner(&self) -> Result<Conn, ClientError> {
        let unreachable = |what: &str, e: std::io::Error| ClientError::Unreachable(format!("{what}: {e}"));
        let stream = match &self.endpoint {
            Endpoint::Unix(path) => {
                UnixStream::connect(path).await.map_err(|e| unreachable(&path.display().to_string(), e))?
            }
            Endpoint::FirecrackerVsock { uds, port } => {
                let mut s = UnixStream::connect(uds).await.map_err(|e| unreachable(&uds.display().to_string(), e))?;
                s.write_all(crate::vsock_connect_line(*port).as_bytes())
                    .await
                    .map_err(|e| unreachable("vsock handshake", e))?;
                // Byte by byte: the agent's hello may follow the OK line in the same segment.
                let mut line = Vec::with_capacity(32);
                loop {
                    let mut b = [0u8; 1];
                    match s.read(&mut b).await {
                        Ok(0) => {
                            return Err(ClientError::Unreachable(format!(
                                "nothing listens on vsock port {port} in the guest (yet)"
                            )));
                        }
                        Ok(_) if b[0] == b'\n' => break,
                        Ok(_) if line.len() < 64 => line.push(b[0]),
                        Ok(_) => {
                            return Err(ClientError::Unreachable("malformed vsock handshake reply".into()));
                        }
                        Err(e) => return Err(unreachable("vsock handshake", e)),
                    }
                }
                let text = String::from_utf8_lossy(&line);
                if crate::parse_vsock_ack(&text).is_none() {
                    return Err(ClientError::Unreachable(format!("vsock handshake refused: {text}")));
                }
                s
            }
        };
        let (mut r, w) = tokio::io::split(stream);
        let hello: Hello = read_json(&mut r, "the agent's hello").await.map_err(|e| match e {
            ProtoError::Closed | ProtoError::Io(_) => {
                ClientError::Unreachable(format!("agent closed the connection: {e}"))
            }
            e => ClientError::Proto(e),
        })?;
        if hello.protocol != PROTOCOL_VERSION {
            return Err(ClientError::Version { agent: hello.protocol, ours: PROTOCOL_VERSION });
        }
        Ok(Conn { r, w })
    }

    /// Connects and checks the version; the cheapest way to know the agent is up. The answer is bounded by
    /// the connect timeout: an agent that does not answer a ping at once is not up.
    pub async fn ping(&self) -> Result<(), ClientError> {
        let mut c = self.connect().await?;
        within(self.connect_timeout, "a ping", async {
            write_json(&mut c.w, &Request::Ping).await?;
            match read_json(&mut c.r, "a response").await? {
                Response::Ok => Ok(()),
                other => Err(agent_error(other)),
            }
        })
        .await
    }

    /// Starts a command; feed stdin with [`ExecSession::send_stdin`], then read events.
    pub async fn exec(&self, spec: ExecSpec) -> Result<ExecSession, ClientError> {
        let mut c = self.connect().await?;
        write_json(&mut c.w, &Request::Exec(spec)).await?;
        Ok(ExecSession { conn: c, stdin_open: true })
    }

    /// Runs a command to completion and collects its output, keeping at most `max_output` bytes of each
    /// stream ([`DEFAULT_MAX_OUTPUT`] is the daemon's cap).
    ///
    /// The cap is enforced here, on the host, whatever the agent does: bytes past it are read and dropped,
    /// and the stream's `*_truncated` flag in the result is then `true` even if the agent says otherwise. The
    /// agent is asked for no more than that either: `spec.max_output` is lowered to `max_output` (it is
    /// `Some` afterwards). Not bounded in time: the agent enforces `spec.timeout_ms`, and a caller that does
    /// not trust the guest wraps the call in its own timeout.
    pub async fn exec_collect(&self, spec: ExecSpec, stdin: &[u8], max_output: u64) -> Result<ExecOutput, ClientError> {
        self.exec_collect_within(spec, stdin, max_output, &mut |_| true).await
    }

    /// [`Self::exec_collect`], asking `grant` before keeping each piece of output (its length in bytes): a
    /// caller bounding the memory of many commands at once refuses when its budget is spent, and the rest of
    /// that stream is then dropped and flagged as truncated, as past the cap.
    pub async fn exec_collect_within(
        &self,
        mut spec: ExecSpec,
        stdin: &[u8],
        max_output: u64,
        grant: &mut (dyn FnMut(usize) -> bool + Send),
    ) -> Result<ExecOutput, ClientError> {
        spec.max_output = Some(spec.max_output.map_or(max_output, |m| m.min(max_output)));
        let mut s = self.exec(spec).await?;
        s.stdin_open = false;
        let Conn { r, w } = &mut s.conn;
        // Stdin is sent while the output is read: a command that answers as it reads (`cat`) would otherwise
        // fill both directions' socket buffers and leave each side waiting for the other.
        let feed = async {
            for chunk in stdin.chunks(crate::CHUNK) {
                write_frame(w, FrameKind::Data, chunk).await?;
            }
            write_frame(w, FrameKind::End, b"").await?;
            w.flush().await.map_err(ProtoError::from)?;
            Ok::<(), ClientError>(())
        };
        let collect = async {
            let (mut stdout, mut stderr) = (Capped::new(max_output), Capped::new(max_output));
            loop {
                match read_exec_event(r).await? {
                    ExecEvent::Stdout(b) => stdout.push(&b, grant),
                    ExecEvent::Stderr(b) => stderr.push(&b, grant),
                    ExecEvent::Exited(mut exit) => {
                        exit.stdout_truncated |= stdout.truncated;
                        exit.stderr_truncated |= stderr.truncated;
                        return Ok::<_, ClientError>(ExecOutput { exit, stdout: stdout.data, stderr: stderr.data });
                    }
                }
            }
        };
        // A command may end before taking all its stdin: then its exit, not the broken pipe, is the answer.
        let (_fed, collected) = tokio::join!(feed, collect);
        collected
    }

    pub async fn write_file(
        &self,
        path: &str,
        mode: Option<u32>,
        max_size: Option<u64>,
    ) -> Result<FileWriter, ClientError> {
        let mut c = self.connect().await?;
        within(self.reply_timeout, "a file upload", async {
            write_json(&mut c.w, &Request::WriteFile { path: path.to_string(), mode, max_size }).await?;
            Ok(())
        })
        .await?;
        Ok(FileWriter { conn: c, sent: 0, reply_timeout: self.reply_timeout })
    }

    /// Opens a file for reading. The agent refuses files over `max_size`; one that announces more anyway is
    /// a protocol violation, and [`FileReader`] never yields more than the size announced.
    pub async fn read_file(&self, path: &str, max_size: Option<u64>) -> Result<FileReader, ClientError> {
        let mut c = self.connect().await?;
        let (size, mode) = within(self.reply_timeout, "a file read", async {
            write_json(&mut c.w, &Request::ReadFile { path: path.to_string(), max_size }).await?;
            match read_json(&mut c.r, "a response").await? {
                Response::File { size, mode } => Ok((size, mode)),
                other => Err(agent_error(other)),
            }
        })
        .await?;
        if let Some(max) = max_size.filter(|max| size > *max) {
            return Err(ProtoError::Violation(format!(
                "the agent announced a {size}-byte file after being asked for at most {max} bytes"
            ))
            .into());
        }
        Ok(FileReader {
            conn: c,
            size,
            mode,
            received: 0,
            done: false,
            failed: false,
            reply_timeout: self.reply_timeout,
        })
    }

    pub async fn stat(&self, path: &str) -> Result<FileStat, ClientError> {
        match self.simple(Request::Stat { path: path.to_string() }).await? {
            Response::Stat(s) => Ok(s),
            other => Err(agent_error(other)),
        }
    }

    pub async fn delete(&self, path: &str, recursive: bool) -> Result<(), ClientError> {
        match self.simple(Request::Delete { path: path.to_string(), recursive }).await? {
            Response::Ok => Ok(()),
            other => Err(agent_error(other)),
        }
    }

    /// One page of a directory listing: at most `limit` entries (capped at [`MAX_LIST_PAGE`]) after `after`.
    /// An agent that answers with more than it was asked for, or out of order, breaks the protocol.
    pub async fn list_dir(
        &self,
        path: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<DirEntry>, bool), ClientError> {
        let limit = limit.clamp(1, MAX_LIST_PAGE);
        let req = Request::ListDir { path: path.to_string(), after: after.map(str::to_string), limit };
        match self.simple(req).await? {
            Response::Entries { entries, more } => {
                let in_order = entries.windows(2).all(|w| w[0].name < w[1].name)
                    && after.is_none_or(|a| entries.first().is_none_or(|e| e.name.as_str() > a));
                if entries.len() > usize::try_from(limit).unwrap_or(usize::MAX) || !in_order {
                    return Err(ProtoError::Violation(format!(
                        "a listing of {} entries, asked for at most {limit} in name order",
                        entries.len()
                    ))
                    .into());
                }
                Ok((entries, more))
            }
            other => Err(agent_error(other)),
        }
    }

    pub async fn mkdir(&self, path: &str, parents: bool, mode: Option<u32>) -> Result<FileStat, ClientError> {
        match self.simple(Request::Mkdir { path: path.to_string(), parents, mode }).await? {
            Response::Stat(s) => Ok(s),
            other => Err(agent_error(other)),
        }
    }

    /// Asks the guest to power off; returns once the agent accepted.
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        match self.simple(Request::Shutdown).await? {
            Response::Ok => Ok(()),
            other => Err(agent_error(other)),
        }
    }

    /// Starts a command on a pseudo-terminal in the guest. Returns once the agent has started it (its
    /// answer is bounded by the reply timeout); a command that cannot be started is the agent's error.
    pub async fn pty(&self, spec: PtySpec) -> Result<(PtyInput, PtyOutput), ClientError> {
        let mut c = self.connect().await?;
        within(self.reply_timeout, "a terminal request", async {
            write_json(&mut c.w, &Request::Pty(spec)).await?;
            match read_json(&mut c.r, "a response").await? {
                Response::Ok => Ok(()),
                other => Err(agent_error(other)),
            }
        })
        .await?;
        Ok((PtyInput { w: c.w }, PtyOutput { r: c.r, done: false }))
    }

    async fn simple(&self, req: Request) -> Result<Response, ClientError> {
        let mut c = self.connect().await?;
        within(self.reply_timeout, "a request", async {
            write_json(&mut c.w, &req).await?;
            Ok(read_json(&mut c.r, "a response").await?)
        })
        .await
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub exit_code: i32,
    pub timed_out: bool,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    Exited(Exit),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit: Exit,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

pub struct ExecSession {
    conn: Conn,
    stdin_open: bool,
}

impl ExecSession {
    pub async fn send_stdin(&mut self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(crate::CHUNK) {
            write_frame(&mut self.conn.w, FrameKind::Data, chunk).await?;
        }
        Ok(())
    }

    pub async fn close_stdin(&mut self) -> Result<(), ClientError> {
        if self.stdin_open {
            self.stdin_open = false;
            write_frame(&mut self.conn.w, FrameKind::End, b"").await?;
            self.conn.w.flush().await.map_err(ProtoError::from)?;
        }
        Ok(())
    }

    /// The next piece of output, or the exit. Call [`Self::close_stdin`] first if the command reads stdin.
    pub async fn next_event(&mut self) -> Result<ExecEvent, ClientError> {
        read_exec_event(&mut self.conn.r).await
    }
}

/// The next piece of a command's output, or its exit.
async fn read_exec_event(r: &mut ReadHalf<UnixStream>) -> Result<ExecEvent, ClientError> {
    match read_frame(r).await? {
        Some(Frame { kind: FrameKind::Stdout, payload }) => Ok(ExecEvent::Stdout(payload)),
        Some(Frame { kind: FrameKind::Stderr, payload }) => Ok(ExecEvent::Stderr(payload)),
        Some(Frame { kind: FrameKind::Json, payload }) => {
            match serde_json::from_slice(&payload).map_err(ProtoError::from)? {
                Response::Exited { exit_code, timed_out, stdout_truncated, stderr_truncated, duration_ms } => {
                    Ok(ExecEvent::Exited(Exit {
                        exit_code,
                        timed_out,
                        stdout_truncated,
                        stderr_truncated,
                        duration_ms,
                    }))
                }
                other => Err(agent_error(other)),
            }
        }
        Some(f) => Err(ProtoError::Unexpected { expected: "command output", got: f.kind }.into()),
        None => Err(ClientError::Unreachable("the agent closed the connection while the command ran".into())),
    }
}

pub struct FileWriter {
    conn: Conn,
    sent: u64,
    reply_timeout: Duration,
}

impl FileWriter {
    /// Sends `data`; each chunk must be taken by the agent within the reply timeout.
    pub async fn send(&mut self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(crate::CHUNK) {
            within(self.reply_timeout, "a file chunk", async {
                Ok(write_frame(&mut self.conn.w, FrameKind::Data, chunk).await?)
            })
            .await?;
        }
        self.sent = self.sent.saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
        Ok(())
    }

    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Ends the upload and returns the size the agent wrote.
    pub async fn finish(mut self) -> Result<u64, ClientError> {
        within(self.reply_timeout, "the end of an upload", async {
            write_frame(&mut self.conn.w, FrameKind::End, b"").await?;
            self.conn.w.flush().await.map_err(ProtoError::from)?;
            match read_json(&mut self.conn.r, "a response").await? {
                Response::Written { size } => Ok(size),
                other => Err(agent_error(other)),
            }
        })
        .await
    }
}

pub struct FileReader {
    conn: Conn,
    /// The size the agent announced; no more is ever yielded.
    pub size: u64,
    pub mode: u32,
    received: u64,
    done: bool,
    /// An earlier call failed: the stream is no longer in step with the protocol.
    failed: bool,
    reply_timeout: Duration,
}

impl FileReader {
    /// The next chunk of the file, `None` at its end. Fails if the agent sends more or less than the size
    /// it announced (a file that changed while it was read, or a lying agent), or does not send the next
    /// chunk within the reply timeout.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, ClientError> {
        if self.failed {
            return Err(ProtoError::Violation("the file read already failed".into()).into());
        }
        if self.done {
            return Ok(None);
        }
        let limit = self.reply_timeout;
        let res = within(limit, "with the next file chunk", self.next_chunk_inner()).await;
        self.failed = res.is_err();
        res
    }

    async fn next_chunk_inner(&mut self) -> Result<Option<Bytes>, ClientError> {
        match read_frame(&mut self.conn.r).await? {
            Some(Frame { kind: FrameKind::Data, payload }) => {
                let len = u64::try_from(payload.len()).unwrap_or(u64::MAX);
                self.received = self.received.saturating_add(len);
                if self.received > self.size {
                    self.done = true;
                    return Err(ProtoError::Violation(format!(
                        "the agent sent more than the {} bytes it announced for the file",
                        self.size
                    ))
                    .into());
                }
                Ok(Some(payload))
            }
            Some(Frame { kind: FrameKind::End, .. }) => {
                self.done = true;
                if self.received != self.size {
                    return Err(ProtoError::Violation(format!(
                        "the file ended after {} of the {} bytes announced",
                        self.received, self.size
                    ))
                    .into());
                }
                match read_json(&mut self.conn.r, "a response").await? {
                    Response::Ok => Ok(None),
                    other => Err(agent_error(other)),
                }
            }
            Some(Frame { kind: FrameKind::Json, payload }) => {
                self.done = true;
                Err(agent_error(serde_json::from_slice(&payload).map_err(ProtoError::from)?))
            }
            Some(f) => Err(ProtoError::Unexpected { expected: "file data", got: f.kind }.into()),
            None => Err(ClientError::Unreachable("the agent closed the connection mid-file".into())),
        }
    }
}

/// The host's end of a terminal: keystrokes, resizes, hang-up.
pub struct PtyInput {
    w: WriteHalf<UnixStream>,
}

impl PtyInput {
    pub async fn send(&mut self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(crate::CHUNK) {
            write_frame(&mut self.w, FrameKind::Data, chunk).await?;
        }
        self.w.flush().await.map_err(ProtoError::from)?;
        Ok(())
    }

    pub async fn resize(&mut self, cols: u16, rows: u16) -> Result<(), ClientError> {
        Ok(write_json(&mut self.w, &PtyControl::Resize { cols, rows }).await?)
    }

    /// Hangs up: the agent sends SIGHUP to the session (SIGKILL shortly after) and answers with the exit.
    pub async fn hang_up(&mut self) -> Result<(), ClientError> {
        write_frame(&mut self.w, FrameKind::End, b"").await?;
        self.w.flush().await.map_err(ProtoError::from)?;
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyEvent {
    /// Bytes the terminal printed (at most [`crate::MAX_FRAME`] per event).
    Output(Bytes),
    Exited {
        exit_code: i32,
    },
}

/// The terminal's output as the agent sends it. After [`PtyEvent::Exited`] or an error, nothing more.
pub struct PtyOutput {
    r: ReadHalf<UnixStream>,
    done: bool,
}

impl PtyOutput {
    /// The next piece of output, or the exit. Not bounded in time: a terminal may be silent for hours; the
    /// caller bounds the session.
    pub async fn next_event(&mut self) -> Result<PtyEvent, ClientError> {
        if self.done {
            return Err(ProtoError::Violation("the terminal session is over".into()).into());
        }
        let ev = match read_frame(&mut self.r).await {
            Ok(Some(Frame { kind: FrameKind::Stdout, payload })) => return Ok(PtyEvent::Output(payload)),
            Ok(Some(Frame { kind: FrameKind::Json, payload })) => {
                match serde_json::from_slice(&payload).map_err(ProtoError::from) {
                    Ok(Response::Exited { exit_code, .. }) => Ok(PtyEvent::Exited { exit_code }),
                    Ok(other) => Err(agent_error(other)),
                    Err(e) => Err(e.into()),
                }
            }
            Ok(Some(f)) => Err(ProtoError::Unexpected { expected: "terminal output", got: f.kind }.into()),
            Ok(None) => Err(ClientError::Unreachable("the agent closed the terminal session".into())),
            Err(e) => Err(e.into()),
        };
        self.done = true;
        ev
    }
}
