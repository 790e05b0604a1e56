//! What counts as a machine being in use, for `idle_timeout_seconds`: a moment of activity (a file
//! operation, a proxied request, a byte through a terminal or a tunnel) or something held open (a running
//! command; an open terminal or proxied connection, which counts only until it has been silent for
//! `idle_max_connection_seconds`). Kept in memory and written through to the store at most once a second
//! per machine, so the idle clock survives a restart without a database write per keystroke.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use time::OffsetDateTime;
use tokio::sync::mpsc;

/// Milliseconds since the Unix epoch: the one clock of lifecycle timers (the store keeps wall-clock times).
pub(crate) fn now_ms() -> i64 {
    to_ms(OffsetDateTime::now_utc())
}

pub(crate) fn to_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

pub(crate) fn from_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// How long between two writes of one machine's `idle_since` to the store.
const PERSIST_EVERY_MS: i64 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HoldKind {
    /// A running command: the machine is busy for as long as it runs.
    Command,
    /// An open terminal or proxied connection: busy while bytes flow, and for `idle_max_connection_seconds`
    /// after the last one.
    Connection,
}

/// Something open in a machine; activity for as long as it is held (see [`HoldKind`]). Dropping it is
/// activity too (a command that just ended was just in use).
pub(crate) struct Hold {
    state: Arc<HoldState>,
    log: Weak<ActivityLog>,
}

struct HoldState {
    machine: String,
    id: u64,
    kind: HoldKind,
    last_byte_ms: AtomicI64,
}

impl Hold {
    /// Bytes went through: the connection is alive.
    pub(crate) fn touch(&self) {
        let now = now_ms();
        self.state.last_byte_ms.store(now, Ordering::Relaxed);
        if let Some(log) = self.log.upgrade() {
            log.note_at(&self.state.machine, now);
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(log) = self.log.upgrade() {
            log.release(&self.state);
        }
    }
}

#[derive(Default)]
struct Machine {
    /// The last moment of activity (0: none seen since the daemon started).
    last_ms: i64,
    /// When `last_ms` was last written to the store.
    persisted_ms: i64,
    holds: HashMap<u64, Arc<HoldState>>,
}

/// Activity of every machine, and the channel that writes it through to the store (the lifecycle timer
/// task reads it).
pub(crate) struct ActivityLog {
    machines: Mutex<HashMap<String, Machine>>,
    next_hold: AtomicU64,
    persist: mpsc::UnboundedSender<(String, i64)>,
}

impl ActivityLog {
    pub(crate) fn new(persist: mpsc::UnboundedSender<(String, i64)>) -> Arc<Self> {
        Arc::new(Self { machines: Mutex::new(HashMap::new()), next_hold: AtomicU64::new(1), persist })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Machine>> {
        self.machines.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A moment of activity in `machine`.
    pub(crate) fn note(&self, machine: &str) {
        self.note_at(machine, now_ms());
    }

    fn note_at(&self, machine: &str, now: i64) {
        let persist = {
            let mut all = self.lock();
            let m = all.entry(machine.to_string()).or_default();
            m.last_ms = m.last_ms.max(now);
            let due = now - m.persisted_ms >= PERSIST_EVERY_MS;
            if due {
                m.persisted_ms = now;
            }
            due
        };
        if persist {
            // Fails only when the timer task is gone (the daemon is stopping): nothing to persist for.
            let _ = self.persist.send((machine.to_string(), now));
        }
    }

    /// Opens a hold on `machine`; activity until dropped (see [`HoldKind`]).
    pub(crate) fn hold(self: &Arc<Self>, machine: &str, kind: HoldKind) -> Hold {
        let now = now_ms();
        let state = Arc::new(HoldState {
            machine: machine.to_string(),
            id: self.next_hold.fetch_add(1, Ordering::Relaxed),
            kind,
            last_byte_ms: AtomicI64::new(now),
        });
        self.lock().entry(machine.to_string()).or_default().holds.insert(state.id, state.clone());
        self.note_at(machine, now);
        Hold { state, log: Arc::downgrade(self) }
    }

    fn release(&self, state: &HoldState) {
        if let Some(m) = self.lock().get_mut(&state.machine) {
            m.holds.remove(&state.id);
        }
        self.note(&state.machine);
    }

    /// The moment from which `machine` counts as idle, as seen at `now`: its last activity, or `now` while
    /// a command runs, or while a connection has been silent for less than `max_connection_ms`. `stored`
    /// is the store's `idle_since` (the last activity before a restart).
    pub(crate) fn idle_since(&self, machine: &str, stored: Option<i64>, max_connection_ms: i64, now: i64) -> i64 {
        let all = self.lock();
        let mut since = stored.unwrap_or(0);
        if let Some(m) = all.get(machine) {
            since = since.max(m.last_ms);
            for h in m.holds.values() {
                let busy_until = match h.kind {
                    HoldKind::Command => now,
                    HoldKind::Connection => h.last_byte_ms.load(Ordering::Relaxed).saturating_add(max_connection_ms),
                };
                since = since.max(busy_until.min(now));
            }
        }
        since
    }

    /// A machine that stopped or went away: its activity no longer matters (holds still open end on their
    /// own).
    pub(crate) fn reset(&self, machine: &str) {
        let mut all = self.lock();
        if let Some(m) = all.get_mut(machine) {
            m.last_ms = 0;
            m.persisted_ms = 0;
            if m.holds.is_empty() {
                all.remove(machine);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_keep_a_machine_busy_and_silent_connections_only_for_a_while() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let log = ActivityLog::new(tx);
        let t0 = now_ms();
        assert_eq!(log.idle_since("m", Some(t0 - 5000), 1000, t0), t0 - 5000, "the stored clock is the start");
        log.note("m");
        assert!(log.idle_since("m", Some(t0 - 5000), 1000, t0 + 10_000) >= t0, "activity moves the clock");
        assert!(rx.try_recv().is_ok(), "the first activity is written through");
        log.note("m");
        assert!(rx.try_recv().is_err(), "a second one within a second is not");
        {
            let _cmd = log.hold("m", HoldKind::Command);
            let later = t0 + 3_600_000;
            assert_eq!(log.idle_since("m", None, 1000, later), later, "a running command is activity");
        }
        let conn = log.hold("m", HoldKind::Connection);
        let opened = now_ms();
        let later = opened + 60_000;
        let since = log.idle_since("m", None, 1000, later);
        assert!((opened + 1000..opened + 2000).contains(&since), "a silent connection counts for 1 s: {since}");
        conn.touch();
        assert!(log.idle_since("m", None, 1000, later) >= opened + 1000);
        drop(conn);
        log.reset("m");
        assert_eq!(log.idle_since("m", None, 1000, later), 0, "a stopped machine has no activity");
    }
}
