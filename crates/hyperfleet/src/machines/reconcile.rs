//! Bringing the host in line with the database after a daemon (re)start — live processes adopted, dead
//! ones' leftovers removed, interrupted flows finished, stray interfaces, namespaces and directories
//! deleted, the firewall rebuilt, orphaned leases freed — and `purge`, which removes everything instead.

use std::collections::HashSet;
use std::sync::Arc;

use hyperfleet_types::MachineStatus::{self, *};
use tracing::info;

use super::lifecycle::{ACTIVE, instance};
use super::{Action, Host, Result, Service};

use crate::store::machines::{self as records, Changes, MachineRecord};

/// What to do with a machine found active in the database at daemon start.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Its process runs: keep it (recording the PID if it changed).
    Adopt(u32),
    /// Its process is gone (or never started): clean up and bring it to rest.
    Settle { to: MachineStatus, reason: Option<&'static str> },
}

/// Decides a machine's fate from its stored status and whether its process was found.
pub(super) fn verdict(status: MachineStatus, live_pid: Option<u32>) -> Verdict {
    match (status, live_pid) {
        (Running | Paused, Some(pid)) => Verdict::Adopt(pid),
        (Starting, _) => {
            Verdict::Settle { to: Failed, reason: Some("the daemon stopped while the machine was starting") }
        }
        _ => Verdict::Settle { to: Stopped, reason: None },
    }
}

impl<H: Host> Service<H> {
    pub(crate) async fn reconcile(self: &Arc<Self>) -> Result<()> {
        let active = records::with_status(&mut *self.store.read().await?, self.node(), &ACTIVE).await?;
        let mut live = HashSet::new();
        for rec in active {
            let pid = self.host.live_pid(&instance(&rec)).await;
            match verdict(rec.status, pid) {
                Verdict::Adopt(pid) => {
                    info!(machine = %rec.id, pid, "adopted running machine");
                    if rec.pid != Some(pid) {
                        let ch = Changes { pid: Some(Some(pid)), ..Default::default() };
                        self.transition_logged(&rec.id, Action::Adopt, rec.status, ch).await;
                    }
                    live.insert(rec.id.clone());
                    self.monitor(rec.id.clone(), pid);
                }
                Verdict::Settle { to, reason } => {
                    // Dead while running, or a start/stop the daemon did not finish.
                    self.release_host(&MachineRecord { pid, ..rec.clone() }).await;
                    info!(machine = %rec.id, from = %rec.status, to = %to, "cleaned up a machine whose process is gone");
                    let changes =
                        Changes { error_message: reason.map(|r| Some(r.to_string())), ..Changes::process_gone() };
                    self.transition_logged(&rec.id, Action::Reconcile, to, changes).await;
                    // A parent that ended while the daemon was away takes its children and token with it.
                    self.parent_ended(&rec);
                }
            }
        }
        self.remove_strays(&live).await?;
        self.firewall_rebuild().await?;
        let mut tx = self.store.write().await?;
        let freed = crate::store::leases::free_orphans(&mut tx).await?;
        tx.commit().await?;
        if freed > 0 {
            info!(count = freed, "freed leases of machines that no longer exist");
        }
        Ok(())
    }

    /// Stops every machine and removes everything Hyperfleet made on the host: interfaces, namespaces,
    /// containers, mounts, the firewall table and the subnet route. Records, disks and leases stay, so the
    /// machines can be started again. Returns the ids of the machines it stopped.
    pub(crate) async fn purge_host(self: &Arc<Self>) -> Result<Vec<String>> {
        let active = records::with_status(&mut *self.store.read().await?, self.node(), &ACTIVE).await?;
        let mut stopped = Vec::new();
        for rec in active {
            let pid = self.host.live_pid(&instance(&rec)).await;
            self.release_host(&MachineRecord { pid, ..rec.clone() }).await;
            self.transition_logged(&rec.id, Action::Reconcile, Stopped, Changes::process_gone()).await;
            stopped.push(rec.id);
        }
        self.remove_strays(&HashSet::new()).await?;
        self.host.remove_host_wide().await?;
        Ok(stopped)
    }

    async fn remove_strays(&self, live: &HashSet<String>) -> Result<()> {
        let known: HashSet<String> = records::ids(&mut *self.store.read().await?).await?.into_iter().collect();
        for what in self.host.remove_strays(live, &known).await? {
            info!("removed a stray {what}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        assert_eq!(verdict(Running, Some(7)), Verdict::Adopt(7));
        assert_eq!(verdict(Paused, Some(7)), Verdict::Adopt(7));
        assert_eq!(verdict(Running, None), Verdict::Settle { to: Stopped, reason: None });
        assert_eq!(verdict(Stopping, Some(7)), Verdict::Settle { to: Stopped, reason: None });
        assert!(matches!(verdict(Starting, Some(7)), Verdict::Settle { to: Failed, reason: Some(_) }));
    }
}
