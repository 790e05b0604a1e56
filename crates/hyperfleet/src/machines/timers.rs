//! Lifecycle policies: `ttl_seconds` (stop or delete that long after a start) and `idle_timeout_seconds`
//! (stop after that long without activity). The deadlines live in the store (`expires_at`, `idle_since`),
//! so they survive a restart; one task keeps a min-heap of the next deadline of each machine and sleeps
//! until the earliest. At a deadline it reads the machine again and acts, or finds that activity moved the
//! deadline and waits for the new one; activity itself never touches the heap.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use hyperfleet_types::{MachineStatus, TtlAction};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::activity::{from_ms, now_ms, to_ms};
use super::{Error, Host, Service};
use crate::store::machines::{self as records, MachineRecord};

/// What the timer task is told.
pub(crate) enum TimerMsg {
    /// Something about this machine's deadlines may have changed: look at it again.
    Check(String),
}

/// The channels of the timer task, made with the service and taken by [`Service::run_timers`].
pub(crate) struct TimerInbox {
    pub(super) checks: mpsc::UnboundedReceiver<TimerMsg>,
    pub(super) touches: mpsc::UnboundedReceiver<(String, i64)>,
}

/// What a machine's policy asks for at `now`.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Expire(TtlAction),
    IdleStop,
    /// Nothing yet; look again at this time (ms).
    WaitUntil(i64),
    Nothing,
}

/// How long a silent connection still counts as activity.
pub(super) fn max_connection_ms(rec: &MachineRecord) -> i64 {
    let secs = rec.spec.idle_max_connection_seconds.or(rec.spec.idle_timeout_seconds).unwrap_or(0);
    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

fn secs_ms(secs: u64) -> i64 {
    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// The pure decision, given the machine's effective idle start (`idle_since`, ms).
fn verdict(rec: &MachineRecord, idle_since: Option<i64>, now: i64) -> Verdict {
    if !matches!(rec.status, MachineStatus::Running | MachineStatus::Paused) {
        return Verdict::Nothing;
    }
    let expires = rec.expires_at.map(to_ms);
    if let Some(e) = expires
        && e <= now
    {
        return Verdict::Expire(rec.spec.on_ttl);
    }
    let idle_deadline = match (rec.status, rec.spec.idle_timeout_seconds, idle_since) {
        (MachineStatus::Running, Some(t), Some(since)) => Some(since.saturating_add(secs_ms(t))),
        _ => None,
    };
    if let Some(d) = idle_deadline
        && d <= now
    {
        return Verdict::IdleStop;
    }
    match (expires, idle_deadline) {
        (Some(a), Some(b)) => Verdict::WaitUntil(a.min(b)),
        (Some(a), None) | (None, Some(a)) => Verdict::WaitUntil(a),
        (None, None) => Verdict::Nothing,
    }
}

impl<H: Host> Service<H> {
    /// Asks the timer task to look at `id` again (after a start, a resume, a policy change, a keepalive).
    pub(super) fn recheck(&self, id: &str) {
        // Fails only when the timer task is gone (the daemon is stopping).
        let _ = self.timer_tx.send(TimerMsg::Check(id.to_string()));
    }

    /// The effective idle start of a running machine with an idle timeout, in ms.
    pub(super) fn effective_idle_since(&self, rec: &MachineRecord, now: i64) -> Option<i64> {
        let stored = rec.idle_since.map(to_ms)?;
        Some(self.activity.idle_since(&rec.id, Some(stored), max_connection_ms(rec), now))
    }

    /// The timer task: runs until the daemon stops. Starts from the deadlines in the store.
    pub(crate) async fn run_timers(self: Arc<Self>) {
        let Some(TimerInbox { mut checks, mut touches }) =
            self.timer_inbox.lock().unwrap_or_else(|e| e.into_inner()).take()
        else {
            warn!("the lifecycle timer task was started twice");
            return;
        };
        let mut heap: BinaryHeap<Reverse<(i64, String)>> = BinaryHeap::new();
        // The one live deadline of each machine; heap entries that differ are stale and skipped.
        let mut next: HashMap<String, i64> = HashMap::new();
        match async { records::with_deadlines(&mut *self.store.read().await?, self.node()).await }.await {
            Ok(rows) => {
                for rec in rows {
                    self.evaluate(rec, &mut heap, &mut next).await;
                }
            }
            Err(e) => warn!(error = %e, "could not read the machines' deadlines; timers start empty"),
        }
        loop {
            let sleep = match heap.peek() {
                Some(Reverse((at, _))) => Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0)),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                msg = checks.recv() => match msg {
                    Some(TimerMsg::Check(id)) => {
                        if let Ok(rec) = self.record(&id).await {
                            self.evaluate(rec, &mut heap, &mut next).await;
                        }
                    }
                    None => return,
                },
                Some((id, at)) = touches.recv() => {
                    let touched = async {
                        let mut tx = self.store.write().await?;
                        records::touch(&mut tx, &id, from_ms(at)).await?;
                        tx.commit().await
                    };
                    if let Err(e) = touched.await {
                        warn!(machine = %id, error = %e, "could not record the machine's activity");
                    }
                }
                () = tokio::time::sleep(sleep) => {
                    let now = now_ms();
                    while let Some(Reverse((at, id))) = heap.peek().cloned() {
                        if at > now {
                            break;
                        }
                        heap.pop();
                        if next.get(&id) != Some(&at) {
                            continue;
                        }
                        next.remove(&id);
                        match self.record(&id).await {
                            Ok(rec) => self.evaluate(rec, &mut heap, &mut next).await,
                            Err(Error::NotFound(_)) => {}
                            Err(e) => warn!(machine = %id, error = %e, "lifecycle timer: could not read the machine"),
                        }
                    }
                }
            }
        }
    }

    /// Acts on a machine whose deadline has come, or schedules its next one.
    async fn evaluate(
        self: &Arc<Self>,
        rec: MachineRecord,
        heap: &mut BinaryHeap<Reverse<(i64, String)>>,
        next: &mut HashMap<String, i64>,
    ) {
        let now = now_ms();
        let idle_since = self.effective_idle_since(&rec, now);
        match verdict(&rec, idle_since, now) {
            Verdict::WaitUntil(at) => {
                if next.get(&rec.id).is_none_or(|cur| *cur != at) {
                    next.insert(rec.id.clone(), at);
                    heap.push(Reverse((at, rec.id)));
                }
            }
            Verdict::Nothing => {
                next.remove(&rec.id);
            }
            v @ (Verdict::Expire(_) | Verdict::IdleStop) => {
                next.remove(&rec.id);
                // In a task of its own: a stop takes seconds, and the other machines' deadlines must not wait.
                let svc = self.clone();
                tokio::spawn(async move {
                    let id = rec.id.clone();
                    let res = match v {
                        Verdict::Expire(TtlAction::Delete) => {
                            info!(machine = %id, "ttl_seconds ran out: deleting the machine");
                            svc.delete(&id, true).await
                        }
                        Verdict::Expire(TtlAction::Stop) => {
                            info!(machine = %id, "ttl_seconds ran out: stopping the machine");
                            svc.stop(&id).await.map(|_| ())
                        }
                        _ => {
                            info!(machine = %id, "idle_timeout_seconds without activity: stopping the machine");
                            svc.stop(&id).await.map(|_| ())
                        }
                    };
                    match res {
                        // Stopped or deleted meanwhile by someone else: the policy is satisfied.
                        Ok(()) | Err(Error::InvalidState { .. } | Error::NotFound(_)) => {}
                        Err(e) => {
                            warn!(machine = %id, error = %e, "lifecycle policy: the machine could not be stopped")
                        }
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::machines::MachineRecord;

    fn rec(status: MachineStatus, ttl: Option<u64>, idle: Option<u64>, expires: Option<i64>) -> MachineRecord {
        let mut spec: hyperfleet_types::MachineSpec = serde_json::from_value(serde_json::json!({
            "name": "m", "runtime": "container", "vcpu_count": 1, "mem_size_mib": 64, "kernel_image_path": "k",
            "kernel_args": "", "rootfs_path": "r", "exposed_ports": [], "network": {"dns": [], "egress": "allow"}
        }))
        .unwrap();
        spec.ttl_seconds = ttl;
        spec.idle_timeout_seconds = idle;
        MachineRecord {
            id: "id".into(),
            spec,
            status,
            socket_path: None,
            pid: None,
            error_message: None,
            created_at: from_ms(0),
            updated_at: from_ms(0),
            block: 0,
            expires_at: expires.map(from_ms),
            idle_since: Some(from_ms(0)),
            node: "local".into(),
        }
    }

    #[test]
    fn verdicts() {
        use MachineStatus::*;
        assert_eq!(verdict(&rec(Running, Some(10), None, Some(10_000)), None, 9_999), Verdict::WaitUntil(10_000));
        assert_eq!(
            verdict(&rec(Running, Some(10), None, Some(10_000)), None, 10_000),
            Verdict::Expire(TtlAction::Stop)
        );
        assert_eq!(verdict(&rec(Paused, Some(10), None, Some(10_000)), None, 10_000), Verdict::Expire(TtlAction::Stop));
        assert_eq!(verdict(&rec(Stopped, Some(10), None, Some(10_000)), None, 20_000), Verdict::Nothing);
        assert_eq!(verdict(&rec(Running, None, Some(5), None), Some(1_000), 5_999), Verdict::WaitUntil(6_000));
        assert_eq!(verdict(&rec(Running, None, Some(5), None), Some(1_000), 6_000), Verdict::IdleStop);
        // A paused machine is not stopped for being idle: nothing runs in it.
        assert_eq!(verdict(&rec(Paused, None, Some(5), None), Some(1_000), 60_000), Verdict::Nothing);
        // The earlier of the two deadlines.
        assert_eq!(verdict(&rec(Running, Some(10), Some(5), Some(10_000)), Some(0), 1), Verdict::WaitUntil(5_000));
    }
}
