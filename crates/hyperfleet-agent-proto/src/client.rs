//! The host side of the protocol: reaching an agent (unix socket, or Firecracker's vsock unix socket with its
//! `CONNECT` handshake), checking its version, and one method per operation. Large transfers are streamed
//! chunk by chunk through [`FileWriter`] / [`FileReader`] / [`ExecSession`].

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::UnixStream;

use crate::{
    ErrorKind, ExecSpec, FileStat, Frame, FrameKind, Hello, PROTOCOL_VERSION, ProtoError, Request, Response,
    read_frame, read_json, write_frame, write_json,
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

#[derive(Debug, Clone)]
pub struct AgentClient {
    endpoint: Endpoint,
    connect_timeout: Duration,
}

/// One connection after the hello, ready for a request.
struct Conn {
    r: ReadHalf<UnixStream>,
    w: WriteHalf<UnixStream>,
}

fn agent_error(resp: Response) -> ClientError {
    match resp {
        Response::Error { kind, message } => ClientError::Agent { kind, message },
        other => ClientError::Proto(ProtoError::UnexpectedResponse(format!("{other:?}"))),
    }
}

impl AgentClient {
    pub fn new(endpoint: Endpoint) -> Self {
        Self { endpoint, connect_timeout: Duration::from_secs(3) }
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

    /// Connects and checks the version; the cheapest way to know the agent is up.
    pub async fn ping(&self) -> Result<(), ClientError> {
        let mut c = self.connect().await?;
        write_json(&mut c.w, &Request::Ping).await?;
        match read_json(&mut c.r, "a response").await? {
            Response::Ok => Ok(()),
            other => Err(agent_error(other)),
        }
    }

    /// Starts a command; feed stdin with [`ExecSession::send_stdin`], then read events.
    pub async fn exec(&self, spec: ExecSpec) -> Result<ExecSession, ClientError> {
        let mut c = self.connect().await?;
        write_json(&mut c.w, &Request::Exec(spec)).await?;
        Ok(ExecSession { conn: c, stdin_open: true })
    }

    /// Runs a command to completion and collects its output (as capped by `spec.max_output`).
    pub async fn exec_collect(&self, spec: ExecSpec, stdin: &[u8]) -> Result<ExecOutput, ClientError> {
        let mut s = self.exec(spec).await?;
        s.send_stdin(stdin).await?;
        s.close_stdin().await?;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            match s.next_event().await? {
                ExecEvent::Stdout(b) => stdout.extend_from_slice(&b),
                ExecEvent::Stderr(b) => stderr.extend_from_slice(&b),
                ExecEvent::Exited(exit) => {
                    return Ok(ExecOutput { exit, stdout, stderr });
                }
            }
        }
    }

    pub async fn write_file(
        &self,
        path: &str,
        mode: Option<u32>,
        max_size: Option<u64>,
    ) -> Result<FileWriter, ClientError> {
        let mut c = self.connect().await?;
        write_json(&mut c.w, &Request::WriteFile { path: path.to_string(), mode, max_size }).await?;
        Ok(FileWriter { conn: c, sent: 0 })
    }

    pub async fn read_file(&self, path: &str, max_size: Option<u64>) -> Result<FileReader, ClientError> {
        let mut c = self.connect().await?;
        write_json(&mut c.w, &Request::ReadFile { path: path.to_string(), max_size }).await?;
        match read_json(&mut c.r, "a response").await? {
            Response::File { size, mode } => Ok(FileReader { conn: c, size, mode, done: false }),
            other => Err(agent_error(other)),
        }
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

    /// Asks the guest to power off; returns once the agent accepted.
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        match self.simple(Request::Shutdown).await? {
            Response::Ok => Ok(()),
            other => Err(agent_error(other)),
        }
    }

    async fn simple(&self, req: Request) -> Result<Response, ClientError> {
        let mut c = self.connect().await?;
        write_json(&mut c.w, &req).await?;
        Ok(read_json(&mut c.r, "a response").await?)
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
        match read_frame(&mut self.conn.r).await? {
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
}

pub struct FileWriter {
    conn: Conn,
    sent: u64,
}

impl FileWriter {
    pub async fn send(&mut self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(crate::CHUNK) {
            write_frame(&mut self.conn.w, FrameKind::Data, chunk).await?;
        }
        self.sent += data.len() as u64;
        Ok(())
    }

    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Ends the upload and returns the size the agent wrote.
    pub async fn finish(mut self) -> Result<u64, ClientError> {
        write_frame(&mut self.conn.w, FrameKind::End, b"").await?;
        self.conn.w.flush().await.map_err(ProtoError::from)?;
        match read_json(&mut self.conn.r, "a response").await? {
            Response::Written { size } => Ok(size),
            other => Err(agent_error(other)),
        }
    }
}

pub struct FileReader {
    conn: Conn,
    pub size: u64,
    pub mode: u32,
    done: bool,
}

impl FileReader {
    /// The next chunk of the file, `None` at its end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, ClientError> {
        if self.done {
            return Ok(None);
        }
        match read_frame(&mut self.conn.r).await? {
            Some(Frame { kind: FrameKind::Data, payload }) => Ok(Some(payload)),
            Some(Frame { kind: FrameKind::End, .. }) => {
                self.done = true;
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
