//! Terminal sessions in a running machine: the agent runs the command on a pseudo-terminal with the
//! machine's env and secrets; the caller (the API's WebSocket) moves the bytes. A session counts against the
//! machine's command slots and is activity while its bytes flow (see `activity.rs`).

use hyperfleet_agent_proto::PtySpec;
use hyperfleet_agent_proto::client::{PtyInput, PtyOutput};
use tokio::sync::OwnedSemaphorePermit;

use super::guest::{check_guest_path, command_error};
use super::{Error, Hold, HoldKind, Host, Result, Service};

/// Largest terminal accepted, in columns and rows.
pub(crate) const MAX_TERMINAL_SIDE: u16 = 1000;
/// How long a machine that is still booting may take for its agent to answer a terminal request.
const AGENT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// A validated terminal request.
#[derive(Debug, Clone)]
pub(crate) struct PtyRequest {
    /// `None`: the image's shell.
    pub command: Option<Vec<String>>,
    pub cwd: Option<String>,
    pub cols: u16,
    pub rows: u16,
}

impl PtyRequest {
    pub(crate) fn check(&self) -> Result<()> {
        for (name, v) in [("cols", self.cols), ("rows", self.rows)] {
            if !(1..=MAX_TERMINAL_SIDE).contains(&v) {
                return Err(Error::Invalid(format!("{name} must be between 1 and {MAX_TERMINAL_SIDE}")));
            }
        }
        if let Some(cmd) = &self.command {
            if cmd.first().is_none_or(String::is_empty) {
                return Err(Error::Invalid("command[0] must name a program".into()));
            }
            if cmd.iter().any(|a| a.contains('\0')) {
                return Err(Error::Invalid("command must not contain NUL bytes".into()));
            }
        }
        if let Some(cwd) = &self.cwd {
            check_guest_path("cwd", cwd)?;
        }
        Ok(())
    }
}

/// An open terminal: keystrokes and resizes go to `input`, the terminal's output comes from `output`.
pub(crate) struct PtySession {
    pub machine_id: String,
    pub input: PtyInput,
    pub output: PtyOutput,
    /// Activity in the machine while bytes flow (touch it on each one).
    pub hold: Hold,
    _slot: OwnedSemaphorePermit,
}

impl<H: Host> Service<H> {
    pub(crate) async fn pty(&self, id: &str, req: PtyRequest) -> Result<PtySession> {
        req.check()?;
        let rec = self.running(id, "open a terminal").await?;
        let slot = self.execs.acquire(&rec.id, self.policy.max_execs_per_machine)?;
        let mut env = self.machine_env(&rec);
        env.append(&mut self.machine_secrets(&rec).await?);
        let agent = self.ready_agent(&rec, AGENT_PATIENCE).await?;
        let spec = PtySpec { argv: req.command, env, cwd: req.cwd, cols: req.cols, rows: req.rows };
        super::guest::fits_a_frame(&spec)?;
        let (input, output) = agent.pty(spec).await.map_err(command_error)?;
        let hold = self.activity.hold(&rec.id, HoldKind::Connection);
        Ok(PtySession { machine_id: rec.id, input, output, hold, _slot: slot })
    }
}
