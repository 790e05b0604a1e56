//! The orchestration's errors, in domain terms. `api/error.rs` maps each to an HTTP status and code, in one
//! place; messages keep the wording the API's users know ("Machine with id 'x' not found").

use hyperfleet_agent_proto::client::ClientError;
use hyperfleet_types::{MachineStatus, RuntimeKind};

use super::Action;
use crate::runtime::RuntimeError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("Machine with id '{0}' not found")]
    NotFound(String),
    /// Placement chose another node for a new machine: the create is to be forwarded there.
    #[error("the machine is placed on node '{node}'")]
    PlacedElsewhere { node: String },
    /// The state table does not allow `action` from `status`.
    #[error("Cannot {action} machine in '{status}' state{}", action.hint())]
    InvalidState { action: Action, status: MachineStatus },
    /// A guest or network operation on a machine that is not running.
    #[error("Machine must be running to {what}")]
    NotRunning { what: &'static str, status: MachineStatus },
    /// A request field is wrong; the message names it.
    #[error("{0}")]
    Invalid(String),
    #[error("runtime '{runtime}' cannot run on this host: {why}")]
    RuntimeUnavailable { runtime: RuntimeKind, why: String },
    #[error("A machine named '{0}' already exists")]
    NameTaken(String),
    #[error("Volume with id '{0}' not found")]
    VolumeNotFound(String),
    #[error("Webhook with id '{0}' not found")]
    WebhookNotFound(String),
    #[error("A volume named '{0}' already exists")]
    VolumeNameTaken(String),
    /// A child token asked for something outside its tree or past its parent's quotas; the message says what.
    #[error("{0}")]
    Forbidden(String),
    /// The request conflicts with the current state of a volume (attached elsewhere, in use).
    #[error("{0}")]
    Conflict(String),
    #[error(
        "no free address block: all {blocks} /30 blocks of {subnet} are leased; delete machines or use a larger HYPERFLEET_SUBNET"
    )]
    PoolExhausted { subnet: String, blocks: u32 },
    #[error("Timed out waiting for machine {id} to reach status {want}")]
    WaitTimedOut { id: String, want: MachineStatus },
    #[error("Machine {id} failed instead of reaching status {want}: {reason}")]
    WaitFailed { id: String, want: MachineStatus, reason: String },
    /// A machine that does not start itself for requests (`auto_start` is off) is not running.
    #[error("Machine {id} is not running (it is '{status}') and does not start on request (auto_start is off)")]
    Asleep { id: String, status: MachineStatus },
    /// Starting or resuming a machine for a request failed.
    #[error("Machine {id} could not be woken for this request: {reason}")]
    WakeFailed { id: String, reason: String },
    /// Too many commands already run in this machine at once.
    #[error("Machine {id} already runs {limit} commands at once; wait for one to finish")]
    TooManyExecs { id: String, limit: usize },
    #[error("Command execution timed out after {secs} seconds")]
    ExecTimedOut { secs: u64 },
    #[error("File transfer timed out after {secs} seconds")]
    TransferTimedOut { secs: u64 },
    #[error("File not found: {path}")]
    FileNotFound { path: String },
    /// A file (or upload body) past `HYPERFLEET_FILE_MAX_SIZE`; `size` when it is known.
    #[error("File is {}larger than HYPERFLEET_FILE_MAX_SIZE ({max} bytes)", size.map(|s| format!("{s} bytes, ")).unwrap_or_default())]
    FileTooLarge { size: Option<u64>, max: u64 },
    /// The guest's disk is full (or its quota, or the file system's largest file).
    #[error("The machine's disk is full: {0}")]
    GuestDiskFull(String),
    /// The guest agent refused a request it found malformed.
    #[error("{0}")]
    GuestRefused(String),
    /// The upload body could not be read from the client.
    #[error("reading the upload: {0}")]
    UploadBroken(String),
    #[error("Failed to communicate with VM: {0}")]
    Agent(ClientError),
    #[error(transparent)]
    Image(#[from] super::images::ImageError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("host network: {0}")]
    Network(#[from] hyperfleet_net::NetError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A flow's task ended abnormally (panicked or was cancelled at shutdown).
    #[error("{what} task: {message}")]
    Task { what: &'static str, message: String },
    /// A flow failed, and undoing what it had done failed too: both are reported.
    #[error("{cause}; undoing it also failed: {}", undo.join("; "))]
    UndoFailed { cause: Box<Error>, undo: Vec<String> },
}

impl Error {
    /// The error a client should be answered with: the original cause of a failed flow.
    pub(crate) fn cause(&self) -> &Error {
        match self {
            Self::UndoFailed { cause, .. } => cause.cause(),
            other => other,
        }
    }
}

pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_keep_the_api_wording() {
        let e = Error::InvalidState { action: Action::Start, status: MachineStatus::Running };
        assert_eq!(e.to_string(), "Cannot start machine in 'running' state");
        let e = Error::InvalidState { action: Action::Delete, status: MachineStatus::Running };
        assert_eq!(
            e.to_string(),
            "Cannot delete machine in 'running' state; stop the machine first (or pass ?force=true)"
        );
        let e = Error::NotRunning { what: "execute commands", status: MachineStatus::Stopped };
        assert_eq!(e.to_string(), "Machine must be running to execute commands");
        assert_eq!(
            Error::FileTooLarge { size: Some(5), max: 4 }.to_string(),
            "File is 5 bytes, larger than HYPERFLEET_FILE_MAX_SIZE (4 bytes)"
        );
        assert_eq!(
            Error::FileTooLarge { size: None, max: 4 }.to_string(),
            "File is larger than HYPERFLEET_FILE_MAX_SIZE (4 bytes)"
        );
        let undo = Error::UndoFailed { cause: Box::new(Error::NotFound("x".into())), undo: vec!["a".into()] };
        assert_eq!(undo.to_string(), "Machine with id 'x' not found; undoing it also failed: a");
        assert!(matches!(undo.cause(), Error::NotFound(_)));
    }
}
