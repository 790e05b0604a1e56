//! Status changes, published to whoever waits: long-polling clients (`wait`) and the proxy's target cache.

use std::time::Duration;

use hyperfleet_types::{Machine, MachineStatus};
use tokio::sync::broadcast;

use super::{Error, Host, Result, Service};
use crate::store::machines::MachineRecord;

/// A machine's status changed, its exposed ports changed, or it was deleted: listeners look it up again.
#[derive(Debug, Clone)]
pub(crate) struct MachineEvent {
    pub(crate) id: String,
}

pub(super) struct Events {
    tx: broadcast::Sender<MachineEvent>,
}

impl Events {
    pub(super) fn new() -> Self {
        Self { tx: broadcast::channel(1024).0 }
    }

    pub(super) fn publish(&self, m: &MachineRecord) {
        // Sending fails only when nobody listens, which is the normal case between requests.
        if self.tx.receiver_count() > 0 {
            let _ignored_when_no_listener = self.tx.send(MachineEvent { id: m.id.clone() });
        }
    }

    pub(super) fn subscribe(&self) -> broadcast::Receiver<MachineEvent> {
        self.tx.subscribe()
    }
}

impl<H: Host> Service<H> {
    /// Every change to a machine (status, exposed ports, deletion), for long-polls and the proxy's cache.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<MachineEvent> {
        self.events.subscribe()
    }

    /// Long-polls until the machine reaches `want`, it fails instead, or `timeout` passes.
    pub(crate) async fn wait(&self, id: &str, want: MachineStatus, timeout: Duration) -> Result<Machine> {
        let mut events = self.events.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let rec = self.record(id).await?;
            if rec.status == want {
                return Ok(self.to_wire(&rec));
            }
            if rec.status == MachineStatus::Failed {
                return Err(Error::WaitFailed {
                    id: rec.id,
                    want,
                    reason: rec.error_message.unwrap_or_else(|| "no error message".into()),
                });
            }
            loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Ok(ev) if ev.id != rec.id => continue,
                        // This machine changed, or events were missed (lagged): look again.
                        _ => break,
                    },
                    _ = tokio::time::sleep_until(deadline) => {
                        return Err(Error::WaitTimedOut { id: rec.id, want });
                    }
                }
            }
        }
    }
}
