//! Wake on request: a proxied request for a stopped (or paused) machine with `auto_start` starts (or
//! resumes) it. However many requests arrive at once, one flight per machine does the work and every
//! request waits for its outcome.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyperfleet_types::{Machine, MachineStatus};
use tokio::sync::watch;
use tracing::info;

use super::{Error, Host, Result, Service};

/// The outcome of a flight: `None` while it is under way.
type Outcome = Option<Result<(), String>>;

/// Wake-ups under way, by machine id.
#[derive(Default)]
pub(super) struct Wakes(Mutex<HashMap<String, watch::Receiver<Outcome>>>);

impl<H: Host> Service<H> {
    /// Brings an `auto_start` machine to `running` for a request, waiting at most `patience`; a running
    /// machine is returned at once.
    pub(crate) async fn wake(self: &Arc<Self>, id: &str, port: u16, patience: Duration) -> Result<Machine> {
        let rec = self.record(id).await?;
        if rec.status == MachineStatus::Running {
            return Ok(self.to_wire(&rec));
        }
        if !rec.spec.auto_start {
            return Err(Error::Asleep { id: rec.id, status: rec.status });
        }
        let mut outcome = {
            let mut flights = self.wakes.0.lock().unwrap_or_else(|e| e.into_inner());
            match flights.get(&rec.id) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    flights.insert(rec.id.clone(), rx.clone());
                    let svc = self.clone();
                    let mid = rec.id.clone();
                    // Its own task: the flight finishes even if every waiting client hangs up.
                    tokio::spawn(async move {
                        let res = svc.wake_flight(&mid, port, patience).await.map_err(|e| e.to_string());
                        svc.wakes.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&mid);
                        // Fails only when no request waits any more.
                        let _ = tx.send(Some(res));
                    });
                    rx
                }
            }
        };
        // The borrow of the outcome is let go of at once (it holds a lock), before any further await.
        let waited = tokio::time::timeout(patience, async {
            outcome.wait_for(Option::is_some).await.map(|v| v.clone()).ok().flatten()
        })
        .await;
        let res = match waited {
            Ok(Some(v)) => v,
            Ok(None) => Err("the wake-up ended without an outcome".into()),
            Err(_) => Err(format!("not running after {} s", patience.as_secs())),
        };
        res.map_err(|reason| Error::WakeFailed { id: rec.id.clone(), reason })?;
        self.get(&rec.id).await
    }

    /// The one start or resume of a wake-up.
    async fn wake_flight(self: &Arc<Self>, id: &str, port: u16, patience: Duration) -> Result<()> {
        let rec = self.record(id).await?;
        match rec.status {
            MachineStatus::Running => return Ok(()),
            MachineStatus::Paused => {
                info!(machine = %id, "resuming the machine for a proxied request");
                self.resume(id).await?;
            }
            MachineStatus::Stopped | MachineStatus::Pending | MachineStatus::Failed => {
                info!(machine = %id, "starting the machine for a proxied request");
                self.start(id).await?;
            }
            // Someone else is starting it: wait for that.
            MachineStatus::Starting => {
                self.wait(id, MachineStatus::Running, patience).await?;
            }
            // A stop under way (its idle timeout, say): let it finish, then start again.
            MachineStatus::Stopping => {
                self.wait(id, MachineStatus::Stopped, patience).await?;
                info!(machine = %id, "starting the machine for a proxied request");
                self.start(id).await?;
            }
        }
        self.proxy_woke(id, port).await
    }
}
