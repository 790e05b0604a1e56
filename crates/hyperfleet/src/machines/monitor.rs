//! Watches each running machine's process: one that ends while the machine is meant to run makes the machine
//! `failed`, with the last console lines as the reason, and its host resources are released.

use std::sync::Arc;

use hyperfleet_types::{MachineStatus, RuntimeKind};
use tracing::warn;

use hyperfleet_agent_proto::main_process::exit_code;

use super::{Action, Host, Service};
use crate::store::machines::{Changes, MachineRecord};

impl<H: Host> Service<H> {
    pub(super) fn monitor(self: &Arc<Self>, id: String, pid: u32) {
        let this = self.clone();
        tokio::spawn(async move {
            this.host.exited(pid).await;
            let rec = match this.record(&id).await {
                Ok(rec) => rec,
                Err(super::Error::NotFound(_)) => return,
                Err(e) => {
                    warn!(machine = %id, pid, error = %e, "the machine's process ended; could not read the machine");
                    return;
                }
            };
            if rec.pid != Some(pid) || !matches!(rec.status, MachineStatus::Running | MachineStatus::Paused) {
                return; // stopped on purpose, or restarted with another process
            }
            let tail = this.host.console_tail(&id, MAIN_EXIT_LINES).await;
            let (to, changes, msg) = match main_exit(&rec, &tail) {
                // The main process ended and, by its restart policy, so did the machine.
                Some(0) => {
                    (MachineStatus::Stopped, Changes::process_gone(), "main process exited with code 0".to_string())
                }
                Some(code) => {
                    let before: Vec<&String> = tail
                        .iter()
                        .filter(|l| exit_code(l).is_none())
                        .rev()
                        .take(5)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect();
                    let last = before.iter().map(|l| l.as_str()).collect::<Vec<_>>().join(" | ");
                    let msg = format!("main process exited with code {code}; last lines: {last}");
                    (MachineStatus::Failed, Changes::failed(msg.clone()), msg)
                }
                None => {
                    let last = tail.iter().rev().take(5).rev().cloned().collect::<Vec<_>>().join(" | ");
                    let msg =
                        format!("{} (pid {pid}) exited unexpectedly; last console lines: {last}", process_name(&rec));
                    (MachineStatus::Failed, Changes::failed(msg.clone()), msg)
                }
            };
            match this.transition(&id, Action::Fail, to, changes).await {
                Ok(failed) => {
                    if to == MachineStatus::Failed {
                        warn!(machine = %id, "{msg}");
                    } else {
                        tracing::info!(machine = %id, "{msg}; machine stopped");
                    }
                    this.parent_ended(&failed);
                    this.release_host(&MachineRecord { pid: None, ..failed.clone() }).await;
                    if let Err(e) = this.firewall_change(&failed, false).await {
                        warn!(machine = %id, error = %e, "could not remove the machine from the firewall");
                    }
                }
                // A stop got there first: it cleans up.
                Err(e) => tracing::debug!(machine = %id, error = %e, "process ended during a state change"),
            }
        });
    }
}

impl<H: Host> Service<H> {
    /// Keeps every active machine's console log under `max` bytes, checking every `every`; runs until the
    /// service goes away.
    pub(crate) async fn cap_console_logs(self: Arc<Self>, max: u64, every: std::time::Duration) {
        loop {
            tokio::time::sleep(every).await;
            let active = match async {
                crate::store::machines::with_status(
                    &mut *self.store.read().await?,
                    self.node(),
                    &super::lifecycle::ACTIVE,
                )
                .await
            }
            .await
            {
                Ok(active) => active,
                Err(e) => {
                    warn!(error = %e, "console logs: could not list the machines");
                    continue;
                }
            };
            for m in active {
                if let Err(e) = self.host.cap_console(&m.id, max).await {
                    warn!(machine = %m.id, error = %e, "could not rotate the console log");
                }
            }
        }
    }
}

/// Console lines searched for the agent's report of the main process's end.
const MAIN_EXIT_LINES: usize = 40;

/// The main process's exit code, when the machine has one and the agent reported it on the console as the
/// machine ended. A guest could print that line itself: it only decides its own machine's state.
fn main_exit(m: &MachineRecord, tail: &[String]) -> Option<i32> {
    let has_main = m.spec.image.is_some() || m.spec.cmd.is_some() || m.spec.entrypoint.is_some();
    if !has_main {
        return None;
    }
    tail.iter().rev().find_map(|l| exit_code(l))
}

fn process_name(m: &MachineRecord) -> &'static str {
    match m.spec.runtime {
        RuntimeKind::Firecracker => "firecracker",
        RuntimeKind::Container => "the container's init",
    }
}
