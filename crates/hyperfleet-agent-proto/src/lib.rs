//! The protocol between the Hyperfleet host and the guest agent, shared by both sides.
//!
//! Transport: any byte stream. In a Firecracker guest the agent listens on vsock port [`AGENT_PORT`]; the host
//! reaches it through Firecracker's vsock unix socket after the `CONNECT <port>\n` / `OK <n>\n` handshake
//! ([`vsock_connect_line`], [`parse_vsock_ack`]). In the container runtime it listens on a unix socket.
//!
//! One operation per connection:
//! 1. The agent speaks first: a [`Hello`] with its [`PROTOCOL_VERSION`]. The host closes the connection
//!    (and reports a clear error) if it does not speak that version.
//! 2. The host sends one [`Request`], then, for operations that carry data (exec stdin, file write), zero or
//!    more `Data` frames and one `End` frame.
//! 3. The agent answers: `Stdout`/`Stderr` frames while a command runs, `Data` frames + `End` for a file read,
//!    and always exactly one final [`Response`] (unless the connection breaks).
//!
//! A terminal ([`Request::Pty`]) is a conversation: the host sends `Data` frames (keystrokes), `Json`
//! [`PtyControl`] frames (resize) and, to hang up, `End`; the agent sends `Stdout` frames (the terminal's
//! output) and a final [`Response::Exited`] once the command has exited.
//!
//! Framing: `u32` big-endian length of what follows, one kind byte ([`FrameKind`]), then the payload (JSON
//! for `Json`, raw bytes otherwise). Payloads are at most [`MAX_FRAME`] bytes, so neither side ever holds
//! more than one chunk of a large file in memory.
//!
//! Bounds on what a peer can make the reader do (the host treats the guest as hostile):
//! - a frame's length is checked against [`MAX_FRAME`] before anything is allocated for it, and its payload
//!   buffer grows with the bytes that actually arrive, never to more than the announced length;
//! - JSON messages are frames too, so they share that bound; `serde_json`'s recursion limit bounds nesting;
//! - once the first byte of a frame has arrived, the rest must follow within [`FRAME_TIMEOUT`]: a peer that
//!   stops mid-frame gets [`ProtoError::Timeout`], not a reader stuck forever. Silence *between* frames is
//!   not bounded here (a command may print nothing for an hour); callers bound that where the protocol has a
//!   natural limit (see [`client`]).

pub mod client;
pub mod main_process;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Version of this protocol; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;
/// Vsock port the agent listens on inside a Firecracker guest (the port earlier Hyperfleet guest inits used).
pub const AGENT_PORT: u32 = 52;
/// Largest payload of one frame.
pub const MAX_FRAME: usize = 1 << 20;
/// Chunk size used for file data and command output.
pub const CHUNK: usize = 64 * 1024;
/// How long the rest of a frame may take once its first byte has arrived. A full [`MAX_FRAME`] frame at
/// this bound is still ~35 KB/s, far below what a vsock or unix socket does on a live machine.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A [`Hello`], [`Request`] or [`Response`] as JSON.
    Json = 1,
    /// File content or command stdin.
    Data = 2,
    Stdout = 3,
    Stderr = 4,
    /// End of a `Data` stream.
    End = 5,
}

impl FrameKind {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Json,
            2 => Self::Data,
            3 => Self::Stdout,
            4 => Self::Stderr,
            5 => Self::End,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes is larger than the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed message: {0}")]
    BadJson(#[from] serde_json::Error),
    #[error("expected {expected}, got a {got:?} frame")]
    Unexpected { expected: &'static str, got: FrameKind },
    #[error("the peer closed the connection")]
    Closed,
    #[error("unexpected response {0}")]
    UnexpectedResponse(String),
    #[error("the peer stopped in the middle of a frame for {}s", .0.as_secs())]
    Timeout(Duration),
    /// The peer sent something the protocol rules out (more data than it announced, ...).
    #[error("the peer broke the protocol: {0}")]
    Violation(String),
}

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, kind: FrameKind, payload: &[u8]) -> Result<(), ProtoError> {
    if payload.len() > MAX_FRAME {
        return Err(ProtoError::TooLarge(payload.len()));
    }
    // At most MAX_FRAME + 1 (checked above), so it always fits.
    let len = u32::try_from(payload.len() + 1).map_err(|_| ProtoError::TooLarge(payload.len()))?;
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&len.to_be_bytes());
    head[4] = kind as u8;
    w.write_all(&head).await?;
    w.write_all(payload).await?;
    Ok(())
}

pub async fn write_json<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, msg: &T) -> Result<(), ProtoError> {
    write_frame(w, FrameKind::Json, &serde_json::to_vec(msg)?).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames. The rest of a started frame must
/// arrive within [`FRAME_TIMEOUT`].
///
/// Not cancel-safe: a frame partly read when the future is dropped is lost, and the stream with it.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, ProtoError> {
    read_frame_within(r, FRAME_TIMEOUT).await
}

/// [`read_frame`] with another bound on the time from a frame's first byte to its last.
pub async fn read_frame_within<R: AsyncRead + Unpin>(r: &mut R, limit: Duration) -> Result<Option<Frame>, ProtoError> {
    let mut first = [0u8; 1];
    // Waiting for a frame to start is not bounded: silence between frames is normal.
    if r.read(&mut first).await? == 0 {
        return Ok(None);
    }
    match tokio::time::timeout(limit, read_frame_rest(r, first[0])).await {
        Ok(frame) => frame.map(Some),
        Err(_) => Err(ProtoError::Timeout(limit)),
    }
}

async fn read_frame_rest<R: AsyncRead + Unpin>(r: &mut R, first: u8) -> Result<Frame, ProtoError> {
    let mut head = [first, 0, 0, 0, 0];
    // A stream that ends inside a frame is an error (`UnexpectedEof`), never a clean end.
    r.read_exact(&mut head[1..4]).await?;
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let len = usize::try_from(len).map_err(|_| ProtoError::TooLarge(usize::MAX))?;
    let Some(payload_len) = len.checked_sub(1) else {
        // Not even a kind byte.
        return Err(ProtoError::UnknownKind(0));
    };
    if payload_len > MAX_FRAME {
        return Err(ProtoError::TooLarge(payload_len));
    }
    r.read_exact(&mut head[4..5]).await?;
    let kind = FrameKind::from_byte(head[4]).ok_or(ProtoError::UnknownKind(head[4]))?;
    // Grow with what arrives (at most twice what was received, and never past `payload_len`): a peer that
    // announces a megabyte and sends a byte costs a chunk, not a megabyte.
    let mut buf: Vec<u8> = Vec::new();
    while buf.len() < payload_len {
        let have = buf.len();
        let want = payload_len.min(have.saturating_mul(2).max(CHUNK));
        buf.reserve_exact(want - have);
        buf.resize(want, 0);
        r.read_exact(&mut buf[have..]).await?;
    }
    Ok(Frame { kind, payload: Bytes::from(buf) })
}

/// Reads one frame that must be JSON and decodes it.
pub async fn read_json<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    expected: &'static str,
) -> Result<T, ProtoError> {
    match read_frame(r).await? {
        Some(Frame { kind: FrameKind::Json, payload }) => Ok(serde_json::from_slice(&payload)?),
        Some(f) => Err(ProtoError::Unexpected { expected, got: f.kind }),
        None => Err(ProtoError::Closed),
    }
}

/// First message on every connection, from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub agent_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Liveness check; answered with [`Response::Ok`].
    Ping,
    /// Run a command; stdin follows as `Data` frames and an `End` frame.
    Exec(ExecSpec),
    /// Write a file; content follows as `Data` frames and an `End` frame.
    WriteFile {
        path: String,
        mode: Option<u32>,
        max_size: Option<u64>,
    },
    /// Read a file: answered with [`Response::File`], `Data` frames, `End`, then [`Response::Ok`].
    ReadFile {
        path: String,
        max_size: Option<u64>,
    },
    Stat {
        path: String,
    },
    Delete {
        path: String,
        recursive: bool,
    },
    /// List a directory: its entries sorted by name, those after `after`, at most `limit` (capped at
    /// [`MAX_LIST_PAGE`]); answered with [`Response::Entries`].
    ListDir {
        path: String,
        after: Option<String>,
        limit: u32,
    },
    /// Make a directory (with `parents`, its missing parents too, and an existing directory is fine);
    /// answered with [`Response::Stat`] of the directory.
    Mkdir {
        path: String,
        parents: bool,
        mode: Option<u32>,
    },
    /// Power the guest off (or end the container) after answering.
    Shutdown,
    /// Run a command on a new pseudo-terminal; see the crate docs for the conversation that follows.
    Pty(PtySpec),
}

/// A terminal session: the command (`None`: the guest's login shell for root, else `/bin/sh`), its
/// environment and directory, and the terminal's size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySpec {
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub cols: u16,
    pub rows: u16,
}

/// What the host sends during a terminal session besides keystrokes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PtyControl {
    Resize { cols: u16, rows: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// Milliseconds before the command's whole process group is killed.
    pub timeout_ms: u64,
    /// Bytes kept per output stream; the rest is read and dropped (the result says it was truncated).
    /// `None`: everything is forwarded (streaming).
    pub max_output: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Ok,
    Exited {
        exit_code: i32,
        timed_out: bool,
        stdout_truncated: bool,
        stderr_truncated: bool,
        duration_ms: u64,
    },
    /// Precedes the content of a read file.
    File {
        size: u64,
        mode: u32,
    },
    Written {
        size: u64,
    },
    Stat(FileStat),
    /// A page of a directory listing; `more` when entries after the last one exist.
    Entries {
        entries: Vec<DirEntry>,
        more: bool,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub size: u64,
    pub mode: u32,
    pub is_dir: bool,
    /// Seconds since the Unix epoch.
    pub modified_unix: i64,
}

/// Most entries one [`Request::ListDir`] answers with. A name is at most 255 bytes, six times that as escaped
/// JSON, so a full page stays under [`MAX_FRAME`].
pub const MAX_LIST_PAGE: u32 = 500;

/// One entry of a directory listing. Names that are not UTF-8 are shown lossily.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    pub kind: EntryKind,
    /// Of the entry itself: a symlink is not followed.
    pub size: u64,
    pub mode: u32,
    /// Seconds since the Unix epoch.
    pub modified_unix: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    NotFound,
    /// Not absolute, contains NUL, or the wrong kind of file (a directory to read, ...).
    InvalidPath,
    PermissionDenied,
    TooLarge,
    /// The command could not be started (no such program, ...).
    SpawnFailed,
    /// The guest's disk (or quota) is full, or a file would pass the file system's largest size. Added
    /// without a protocol version change: a daemon that knows it still reads agents that never send it.
    NoSpace,
    BadRequest,
    Io,
}

/// The line the host sends on Firecracker's vsock unix socket to reach a guest port.
pub fn vsock_connect_line(port: u32) -> String {
    format!("CONNECT {port}\n")
}

/// Parses Firecracker's answer to [`vsock_connect_line`]: `OK <host-side port>`.
pub fn parse_vsock_ack(line: &str) -> Option<u32> {
    line.trim_end().strip_prefix("OK ")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let req = Request::Exec(ExecSpec {
            argv: vec!["echo".into(), "hi".into()],
            env: BTreeMap::from([("A".into(), "1".into())]),
            cwd: Some("/tmp".into()),
            timeout_ms: 1000,
            max_output: Some(10),
        });
        write_json(&mut a, &req).await.unwrap();
        write_frame(&mut a, FrameKind::Data, b"stdin bytes").await.unwrap();
        write_frame(&mut a, FrameKind::End, b"").await.unwrap();
        drop(a);
        let got: Request = read_json(&mut b, "request").await.unwrap();
        assert_eq!(got, req);
        let f = read_frame(&mut b).await.unwrap().unwrap();
        assert_eq!((f.kind, &f.payload[..]), (FrameKind::Data, &b"stdin bytes"[..]));
        assert_eq!(read_frame(&mut b).await.unwrap().unwrap().kind, FrameKind::End);
        assert!(read_frame(&mut b).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn rejects_oversized_and_unknown_frames() {
        let (mut a, mut b) = tokio::io::duplex(64);
        assert!(matches!(
            write_frame(&mut a, FrameKind::Data, &vec![0; MAX_FRAME + 1]).await,
            Err(ProtoError::TooLarge(_))
        ));
        a.write_all(&[0, 0, 0, 2, 9, 0]).await.unwrap();
        assert!(matches!(read_frame(&mut b).await, Err(ProtoError::UnknownKind(9))));
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&u32::try_from(MAX_FRAME + 2).unwrap().to_be_bytes()).await.unwrap();
        assert!(matches!(read_frame(&mut b).await, Err(ProtoError::TooLarge(_))));
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error_not_a_clean_end() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0, 10, 2, 1, 2]).await.unwrap();
        drop(a);
        assert!(matches!(read_frame(&mut b).await, Err(ProtoError::Io(_))));
    }

    #[test]
    fn vsock_handshake_lines() {
        assert_eq!(vsock_connect_line(52), "CONNECT 52\n");
        assert_eq!(parse_vsock_ack("OK 1073741824\n"), Some(1_073_741_824));
        assert_eq!(parse_vsock_ack("ERR\n"), None);
        assert_eq!(parse_vsock_ack(""), None);
    }

    #[test]
    fn wire_names_are_stable() {
        let j = serde_json::to_string(&Request::Delete { path: "/x".into(), recursive: false }).unwrap();
        assert_eq!(j, r#"{"op":"delete","path":"/x","recursive":false}"#);
        let j = serde_json::to_string(&PtyControl::Resize { cols: 80, rows: 24 }).unwrap();
        assert_eq!(j, r#"{"type":"resize","cols":80,"rows":24}"#);
        let j = serde_json::to_string(&Response::Error { kind: ErrorKind::NotFound, message: "m".into() }).unwrap();
        assert_eq!(j, r#"{"type":"error","kind":"not_found","message":"m"}"#);
    }
}
