//! `hyperfleet machines shell NAME [-- CMD…]`: the local terminal, in raw mode, joined to a terminal in the
//! machine (`GET /machines/{id}/pty`). Window size changes (SIGWINCH) are forwarded; the terminal's mode is
//! restored when the session ends, whether it ends well or not.

use std::io::Write;
use std::os::fd::AsFd;

use futures::{SinkExt, StreamExt};
use hyperfleet_client::{Client, PtyMessage, PtyOptions};
use nix::sys::termios::{self, SetArg, Termios};
use tokio::io::AsyncReadExt;
use tokio::signal::unix::{SignalKind, signal};

/// The local terminal in raw mode until dropped.
struct RawMode(Option<Termios>);

impl RawMode {
    fn enter() -> anyhow::Result<Self> {
        let stdin = std::io::stdin();
        let Ok(saved) = termios::tcgetattr(stdin.as_fd()) else {
            // Not a terminal (a pipe): bytes pass as they are.
            return Ok(Self(None));
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)?;
        Ok(Self(Some(saved)))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0
            && let Err(e) = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, saved)
        {
            eprintln!("hyperfleet: could not restore the terminal ({e}); run `reset`");
        }
    }
}

/// The local terminal's size (columns, rows), if stdout is a terminal.
fn window_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which points to a live value we own.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &raw mut ws) };
    (rc == 0 && ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

fn resize_message(cols: u16, rows: u16) -> PtyMessage {
    PtyMessage::Text(serde_json::json!({"type": "resize", "cols": cols, "rows": rows}).to_string().into())
}

/// Runs the session; returns the remote command's exit code.
pub(crate) async fn run(hf: &Client, id: &str, command: Vec<String>) -> anyhow::Result<i32> {
    let (cols, rows) = window_size().unwrap_or((80, 24));
    let ws = hf.pty(id, &PtyOptions { command, cols, rows, cwd: None }).await?;
    let mut winch = signal(SignalKind::window_change())?;
    let raw = RawMode::enter()?;
    let code = session(ws, &mut winch).await;
    drop(raw);
    code
}

async fn session(ws: hyperfleet_client::PtyStream, winch: &mut tokio::signal::unix::Signal) -> anyhow::Result<i32> {
    let (mut sink, mut stream) = ws.split();
    let mut stdin = tokio::io::stdin();
    let mut stdout = std::io::stdout();
    let mut buf = vec![0u8; 16 * 1024];
    let mut stdin_open = true;
    loop {
        tokio::select! {
            n = stdin.read(&mut buf), if stdin_open => match n? {
                0 => stdin_open = false,
                n => sink.send(PtyMessage::Binary(buf[..n].to_vec().into())).await?,
            },
            _ = winch.recv() => {
                if let Some((cols, rows)) = window_size() {
                    sink.send(resize_message(cols, rows)).await?;
                }
            }
            msg = stream.next() => match msg {
                Some(Ok(PtyMessage::Binary(b))) => {
                    stdout.write_all(&b)?;
                    stdout.flush()?;
                }
                Some(Ok(PtyMessage::Text(t))) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    match v["type"].as_str() {
                        Some("exit") => {
                            let code = v["exit_code"].as_i64().and_then(|c| i32::try_from(c).ok()).unwrap_or(1);
                            return Ok(code);
                        }
                        Some("error") => anyhow::bail!("{}: {}", v["code"].as_str().unwrap_or("ERROR"), v["message"].as_str().unwrap_or("")),
                        _ => {}
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => anyhow::bail!("terminal connection: {e}"),
                None => anyhow::bail!("the terminal connection closed without an exit code"),
            },
        }
    }
}
