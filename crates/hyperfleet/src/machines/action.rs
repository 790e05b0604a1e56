//! What a client (or the daemon itself) asks of a machine, named for messages and for the state table.

use std::fmt;

use hyperfleet_types::MachineStatus::{self, *};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Start,
    Stop,
    Restart,
    Pause,
    Resume,
    Delete,
    /// The machine's process died on its own.
    Fail,
    /// A live process found at daemon start is taken over.
    Adopt,
    /// A machine whose process is gone at daemon start is brought to rest.
    Reconcile,
    /// PATCH of the volumes, which a machine holds while it may have a process.
    ChangeVolumes,
}

impl Action {
    /// The statuses from which this action may move a machine to `to`: the first step of a flow starts from
    /// where a client may ask for it, its later steps from the flow's own intermediate state.
    pub(crate) fn from(self, to: MachineStatus) -> &'static [MachineStatus] {
        match (self, to) {
            (Self::Start, Starting) => &[Pending, Stopped, Failed],
            (Self::Start, _) => &[Starting],
            (Self::Stop | Self::Restart, Stopping) => &[Running, Paused],
            (Self::Stop | Self::Restart, _) => &[Stopping],
            (Self::Pause, _) => &[Running],
            (Self::Resume, _) => &[Paused],
            (Self::Delete | Self::ChangeVolumes, _) => &MachineStatus::AT_REST,
            // `Fail` to `stopped`: the main process ended with code 0.
            (Self::Fail | Self::Adopt, _) => &[Running, Paused],
            (Self::Reconcile, _) => &[Starting, Running, Paused, Stopping],
        }
    }

    /// Whether a client may ask for this action of a machine in `status`.
    pub(crate) fn allowed_in(self, status: MachineStatus) -> bool {
        let first = match self {
            Self::Start => Starting,
            Self::Stop | Self::Restart => Stopping,
            _ => status,
        };
        self.from(first).contains(&status)
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Restart => "restart",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Delete => "delete",
            Self::Fail => "fail",
            Self::Adopt => "adopt",
            Self::Reconcile => "reconcile",
            Self::ChangeVolumes => "change the volumes of",
        }
    }

    /// What to add to a refusal, when there is a way forward.
    pub(crate) fn hint(self) -> &'static str {
        match self {
            Self::Delete => "; stop the machine first (or pass ?force=true)",
            Self::ChangeVolumes => "; stop the machine first",
            _ => "",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_is_in_the_state_table() {
        let steps = [
            (Action::Start, Starting),
            (Action::Start, Running),
            (Action::Start, Failed),
            (Action::Stop, Stopping),
            (Action::Stop, Stopped),
            (Action::Pause, Paused),
            (Action::Resume, Running),
            (Action::Fail, Failed),
            (Action::Reconcile, Stopped),
            (Action::Reconcile, Failed),
        ];
        for (action, to) in steps {
            for from in action.from(to) {
                assert!(from.can_become(to), "{action}: {from} -> {to} is not in the state table");
            }
        }
        for to in [Running, Paused] {
            assert!(Action::Adopt.from(to).iter().all(|f| *f == to || f.can_become(to)));
        }
    }

    #[test]
    fn what_a_client_may_ask() {
        assert!(Action::Start.allowed_in(Stopped) && Action::Start.allowed_in(Failed));
        assert!(!Action::Start.allowed_in(Running));
        assert!(Action::Restart.allowed_in(Paused) && !Action::Restart.allowed_in(Stopped));
        assert!(Action::Delete.allowed_in(Pending) && !Action::Delete.allowed_in(Running));
    }
}
