//! `GET /machines/{id}/pty`: a terminal in the machine over a WebSocket. Binary frames carry the bytes both
//! ways; the client sends `{"type":"resize","cols":C,"rows":R}` as a text frame; the server ends with
//! `{"type":"exit","exit_code":N}` (or `{"type":"error","code","message"}`) and a close. A client that
//! stops answering pings for HYPERFLEET_PTY_CLIENT_TIMEOUT is gone: its session is hung up.

use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use hyperfleet_agent_proto::client::PtyEvent;
use hyperfleet_types::ErrorBody;
use serde::Deserialize;
use tokio::time::Instant;

use super::AppState;
use super::error::ApiError;
use super::machines::NOT_FOUND;
use crate::machines::{Error as MachineError, PtyRequest, PtySession};

/// Default terminal size when the query gives none.
const DEFAULT_COLS: u16 = 80;
const DEFAULT_ROWS: u16 = 24;
/// Largest message a client may send (keystrokes, a paste).
const MAX_CLIENT_MESSAGE: usize = 1 << 20;

/// A text frame from the client.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientControl {
    Resize { cols: u16, rows: u16 },
}

fn parse_query(raw: Option<&str>) -> Result<PtyRequest, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|e| ApiError::validation(format!("invalid query string: {e}")))?;
    let mut req = PtyRequest { command: None, cwd: None, cols: DEFAULT_COLS, rows: DEFAULT_ROWS };
    let side = |k: &str, v: &str| {
        v.parse::<u16>().map_err(|_| ApiError::validation(format!("{k} must be a number between 1 and 1000")))
    };
    for (k, v) in pairs {
        match k.as_str() {
            // Repeated: one argument each (`?command=sh&command=-c&command=top`).
            "command" => req.command.get_or_insert_with(Vec::new).push(v),
            "cwd" => req.cwd = Some(v),
            "cols" => req.cols = side("cols", &v)?,
            "rows" => req.rows = side("rows", &v)?,
            other => return Err(ApiError::validation(format!("unknown query parameter '{other}'"))),
        }
    }
    req.check()?;
    Ok(req)
}

#[utoipa::path(get, path = "/machines/{id}/pty", tag = "exec",
    params(("id" = String, Path, description = "machine id or name"),
           ("command" = Option<Vec<String>>, Query, description = "the command, one argument per repetition (default: the image's shell, or /bin/sh)"),
           ("cwd" = Option<String>, Query, description = "absolute directory to start in (default /root, or /)"),
           ("cols" = Option<u16>, Query, description = "terminal width, 1-1000 (default 80)"),
           ("rows" = Option<u16>, Query, description = "terminal height, 1-1000 (default 24)")),
    responses((status = 101, description = "WebSocket: binary frames are the terminal's bytes both ways; the client sends \
                `{\"type\":\"resize\",\"cols\":C,\"rows\":R}` text frames; the server ends with `{\"type\":\"exit\",\"exit_code\":N}`"),
              (status = 400, description = "VALIDATION_ERROR: a query parameter is wrong; BAD_REQUEST: not a WebSocket upgrade, the machine is not running, or the command cannot be started", body = ErrorBody),
              (status = 404, description = NOT_FOUND, body = ErrorBody),
              (status = 429, description = "TOO_MANY_REQUESTS: the machine already runs HYPERFLEET_EXEC_MAX_CONCURRENT commands and terminals", body = ErrorBody),
              (status = 502, description = "VSOCK_ERROR: the guest agent cannot be reached", body = ErrorBody)),
    security(("bearer" = ["machines:exec"])))]
pub(crate) async fn pty(
    State(s): State<AppState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let req = parse_query(query.as_deref())?;
    let machine = s.service.get(&id).await?;
    let ws = ws.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            format!("this endpoint is a WebSocket: {}", e.body_text()),
        )
    })?;
    let session = s.service.pty(&machine.id, req).await?;
    let client_timeout = s.pty_client_timeout;
    Ok(ws.max_message_size(MAX_CLIENT_MESSAGE).on_upgrade(move |socket| bridge(socket, session, client_timeout)))
}

fn control(json: serde_json::Value) -> Message {
    Message::Text(json.to_string().into())
}

/// Moves bytes between the WebSocket and the terminal until the command exits or the client goes.
async fn bridge(socket: WebSocket, session: PtySession, client_timeout: Duration) {
    let PtySession { machine_id, mut input, mut output, hold, .. } = session;
    let (mut sink, mut stream) = socket.split();
    // Reading a frame from the agent is not cancel-safe: it gets a task of its own.
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let reader = tokio::spawn(async move {
        loop {
            let ev = output.next_event().await;
            let last = !matches!(ev, Ok(PtyEvent::Output(_)));
            if tx.send(ev).await.is_err() || last {
                return;
            }
        }
    });
    let mut ping = tokio::time::interval((client_timeout / 3).max(Duration::from_millis(100)));
    let mut last_seen = Instant::now();
    let end: Option<Message> = loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(Ok(PtyEvent::Output(bytes))) => {
                    hold.touch();
                    if sink.send(Message::Binary(bytes)).await.is_err() {
                        break None;
                    }
                }
                Some(Ok(PtyEvent::Exited { exit_code })) => {
                    break Some(control(serde_json::json!({"type": "exit", "exit_code": exit_code})));
                }
                Some(Err(e)) => {
                    let api = ApiError::from(MachineError::Agent(e));
                    break Some(control(serde_json::json!({"type": "error", "code": api.code, "message": api.message})));
                }
                None => break None,
            },
            msg = stream.next() => {
                last_seen = Instant::now();
                match msg {
                    Some(Ok(Message::Binary(b))) => {
                        hold.touch();
                        if input.send(&b).await.is_err() {
                            // The agent is gone; its error (or the exit) arrives through the reader.
                            continue;
                        }
                    }
                    Some(Ok(Message::Text(t))) => match serde_json::from_str::<ClientControl>(t.as_str()) {
                        Ok(ClientControl::Resize { cols, rows }) if (1..=1000).contains(&cols) && (1..=1000).contains(&rows) => {
                            hold.touch();
                            // As above: a failure shows through the reader.
                            let _ = input.resize(cols, rows).await;
                        }
                        _ => {
                            let msg = serde_json::json!({"type": "error", "code": "VALIDATION_ERROR",
                                "message": "text frames must be {\"type\":\"resize\",\"cols\":1-1000,\"rows\":1-1000}"});
                            if sink.send(control(msg)).await.is_err() {
                                break None;
                            }
                        }
                    },
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                        tracing::debug!(machine = %machine_id, "terminal client left; hanging up");
                        break None;
                    }
                }
            }
            _ = ping.tick() => {
                if last_seen.elapsed() > client_timeout {
                    tracing::info!(machine = %machine_id, secs = client_timeout.as_secs(), "terminal client stopped answering; hanging up");
                    break None;
                }
                if sink.send(Message::Ping(bytes::Bytes::new())).await.is_err() {
                    break None;
                }
            }
        }
    };
    match end {
        Some(last) => {
            // The client may be gone already; nothing more to tell it then.
            let _ = sink.send(last).await;
            let _ = sink.send(Message::Close(Some(CloseFrame { code: 1000, reason: "".into() }))).await;
        }
        None => {
            // Hang-up: the agent sends SIGHUP to the session (and kills it shortly after). If the agent is
            // gone, dropping the connection below is all there is to do.
            let _ = input.hang_up().await;
        }
    }
    drop(input);
    reader.abort();
    drop(hold);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters() {
        let r = parse_query(Some("command=sh&command=-c&command=echo%20hi&cols=100&rows=30&cwd=/tmp")).unwrap();
        assert_eq!(r.command.unwrap(), ["sh", "-c", "echo hi"]);
        assert_eq!((r.cols, r.rows, r.cwd.as_deref()), (100, 30, Some("/tmp")));
        let r = parse_query(None).unwrap();
        assert_eq!((r.command, r.cols, r.rows), (None, 80, 24));
        for bad in ["cols=0", "rows=1001", "cols=x", "cwd=rel", "command=", "other=1"] {
            assert_eq!(parse_query(Some(bad)).err().map(|e| e.status), Some(StatusCode::BAD_REQUEST), "{bad}");
        }
    }
}
