//! The `machines` table. State changes are compare-and-set (`UPDATE … WHERE status IN (…)`), so two requests
//! for one machine can never both act.

use hyperfleet_types::{MachineSpec, MachineStatus, RuntimeKind, timestamp};
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params, params_from_iter};
use time::OffsetDateTime;

use super::leases::{self, LeaseError};
use super::{StoreError, StoreResult, now};

/// A machine as persisted: what was asked for (`spec`), what it is doing, and its address block.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineRecord {
    pub id: String,
    pub spec: MachineSpec,
    pub status: MachineStatus,
    pub socket_path: Option<String>,
    pub pid: Option<u32>,
    pub error_message: Option<String>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    pub block: u32,
    /// When `ttl_seconds` runs out (set at start).
    pub expires_at: Option<OffsetDateTime>,
    /// The last activity recorded for the idle timeout (set at start and resume, moved by activity).
    pub idle_since: Option<OffsetDateTime>,
}

#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    #[error("a machine named '{0}' already exists")]
    NameTaken(String),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Result of a compare-and-set.
#[derive(Debug)]
pub enum Cas {
    Done(MachineRecord),
    /// The machine exists but was not in one of the expected states.
    WrongState(MachineRecord),
    Missing,
    /// A start refused because a volume it names is held by another machine (the message says which).
    VolumeBusy(String),
}

/// Fields a transition may set along with the status.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    pub pid: Option<Option<u32>>,
    pub socket_path: Option<Option<String>>,
    pub error_message: Option<Option<String>>,
    pub expires_at: Option<Option<OffsetDateTime>>,
    pub idle_since: Option<Option<OffsetDateTime>>,
}

impl Changes {
    /// Clears what only a live process has (its deadlines too).
    pub fn process_gone() -> Self {
        Self {
            pid: Some(None),
            socket_path: Some(None),
            error_message: None,
            expires_at: Some(None),
            idle_since: Some(None),
        }
    }

    /// The process is gone and the machine failed for `why`.
    pub fn failed(why: impl Into<String>) -> Self {
        Self { error_message: Some(Some(why.into())), ..Self::process_gone() }
    }
}

pub(super) const SELECT: &str = "SELECT m.id, m.spec, m.status, m.socket_path, m.pid, m.error_message, m.created_at, \
     m.updated_at, m.expires_at, m.idle_since, l.block FROM machines m JOIN leases l ON l.machine_id = m.id";

fn conversion_error(col: &str, e: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, format!("column {col}: {e}").into())
}

pub(super) fn time_col(row: &Row, col: &str) -> rusqlite::Result<OffsetDateTime> {
    let text: String = row.get(col)?;
    timestamp::parse(&text).ok_or_else(|| conversion_error(col, format!("'{text}' is not an RFC 3339 time")))
}

fn opt_time_col(row: &Row, col: &str) -> rusqlite::Result<Option<OffsetDateTime>> {
    let text: Option<String> = row.get(col)?;
    text.map(|t| timestamp::parse(&t).ok_or_else(|| conversion_error(col, format!("'{t}' is not an RFC 3339 time"))))
        .transpose()
}

fn opt_time(t: Option<OffsetDateTime>) -> rusqlite::types::Value {
    t.map(timestamp::format).into()
}

pub(super) fn from_row(row: &Row) -> rusqlite::Result<MachineRecord> {
    let spec: String = row.get("spec")?;
    let status: String = row.get("status")?;
    Ok(MachineRecord {
        id: row.get("id")?,
        spec: serde_json::from_str(&spec).map_err(|e| conversion_error("spec", e))?,
        status: MachineStatus::parse(&status)
            .ok_or_else(|| conversion_error("status", format!("unknown status '{status}'")))?,
        socket_path: row.get("socket_path")?,
        pid: row.get("pid")?,
        error_message: row.get("error_message")?,
        created_at: time_col(row, "created_at")?,
        updated_at: time_col(row, "updated_at")?,
        block: row.get("block")?,
        expires_at: opt_time_col(row, "expires_at")?,
        idle_since: opt_time_col(row, "idle_since")?,
    })
}

fn spec_json(spec: &MachineSpec) -> StoreResult<String> {
    serde_json::to_string(spec).map_err(|e| StoreError::Corrupt(format!("machine spec: {e}")))
}

/// Inserts the machine and leases it the lowest free block, in one transaction.
pub fn insert(
    conn: &mut Connection,
    id: &str,
    spec: &MachineSpec,
    block_count: u32,
) -> Result<MachineRecord, InsertError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(StoreError::from)?;
    let rec = insert_in(&tx, id, spec, block_count)?;
    tx.commit().map_err(StoreError::from)?;
    Ok(rec)
}

/// [`insert`] inside the caller's transaction (a child's quota check is part of the same one).
pub(super) fn insert_in(
    tx: &rusqlite::Transaction<'_>,
    id: &str,
    spec: &MachineSpec,
    block_count: u32,
) -> Result<MachineRecord, InsertError> {
    let ts = now();
    let inserted = tx.execute(
        "INSERT INTO machines (id, name, status, spec, created_at, updated_at) VALUES (?1, ?2, 'pending', ?3, ?4, ?4)",
        params![id, spec.name, spec_json(spec)?, ts],
    );
    match inserted {
        Err(rusqlite::Error::SqliteFailure(e, Some(msg)))
            if e.code == rusqlite::ErrorCode::ConstraintViolation && msg.contains("machines.name") =>
        {
            return Err(InsertError::NameTaken(spec.name.clone()));
        }
        other => {
            other.map_err(StoreError::from)?;
        }
    }
    leases::allocate(tx, id, block_count)?;
    Ok(tx.query_row(&format!("{SELECT} WHERE m.id = ?1"), [id], from_row).map_err(StoreError::from)?)
}

/// Looks a machine up by id, or else by name. (Names shaped like ids are refused at create, so the two
/// cannot name different machines.)
pub fn get(conn: &Connection, id_or_name: &str) -> StoreResult<Option<MachineRecord>> {
    // Prepared once per connection: this runs on every request that names a machine.
    let by_id =
        conn.prepare_cached(&format!("{SELECT} WHERE m.id = ?1"))?.query_row([id_or_name], from_row).optional()?;
    if by_id.is_some() {
        return Ok(by_id);
    }
    Ok(conn.prepare_cached(&format!("{SELECT} WHERE m.name = ?1"))?.query_row([id_or_name], from_row).optional()?)
}

/// A page of machines (oldest first) and the number matching the filter.
pub fn list(
    conn: &Connection,
    status: Option<MachineStatus>,
    limit: u32,
    offset: u64,
) -> StoreResult<(Vec<MachineRecord>, u64)> {
    let (filter, args): (&str, Vec<String>) = match status {
        Some(s) => ("WHERE m.status = ?1", vec![s.as_str().to_string()]),
        None => ("", vec![]),
    };
    let total: u64 =
        conn.query_row(&format!("SELECT COUNT(*) FROM machines m {filter}"), params_from_iter(args.iter()), |r| {
            r.get(0)
        })?;
    let sql = format!("{SELECT} {filter} ORDER BY m.created_at, m.id LIMIT {limit} OFFSET {offset}");
    let rows =
        conn.prepare(&sql)?.query_map(params_from_iter(args.iter()), from_row)?.collect::<Result<Vec<_>, _>>()?;
    Ok((rows, total))
}

/// Every machine id.
pub fn ids(conn: &Connection) -> StoreResult<Vec<String>> {
    Ok(conn.prepare("SELECT id FROM machines")?.query_map([], |r| r.get(0))?.collect::<Result<Vec<_>, _>>()?)
}

/// How many machines there are of each status and runtime.
pub(crate) fn counts(conn: &Connection) -> StoreResult<Vec<(MachineStatus, RuntimeKind, u64)>> {
    let mut stmt =
        conn.prepare_cached("SELECT status, json_extract(spec, '$.runtime'), COUNT(*) FROM machines GROUP BY 1, 2")?;
    let rows =
        stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, i64>(2)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (status, runtime, n) = row?;
        let status = MachineStatus::parse(&status).ok_or_else(|| StoreError::Corrupt(format!("status '{status}'")))?;
        let runtime = runtime
            .as_deref()
            .and_then(RuntimeKind::parse)
            .ok_or_else(|| StoreError::Corrupt(format!("runtime {runtime:?}")))?;
        out.push((status, runtime, u64::try_from(n).unwrap_or(0)));
    }
    Ok(out)
}

/// Machines in any of `statuses`.
pub fn with_status(conn: &Connection, statuses: &[MachineStatus]) -> StoreResult<Vec<MachineRecord>> {
    let marks = vec!["?"; statuses.len()].join(", ");
    let sql = format!("{SELECT} WHERE m.status IN ({marks}) ORDER BY l.block");
    Ok(conn
        .prepare(&sql)?
        .query_map(params_from_iter(statuses.iter().map(|s| s.as_str())), from_row)?
        .collect::<Result<Vec<_>, _>>()?)
}

/// Moves machine `id` to `to` if its status is one of `from`, applying `changes` in the same statement.
pub fn transition(
    conn: &mut Connection,
    id: &str,
    from: &[MachineStatus],
    to: MachineStatus,
    changes: &Changes,
) -> StoreResult<Cas> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut sets = vec!["status = ?1".to_string(), "updated_at = ?2".to_string()];
    let mut args: Vec<rusqlite::types::Value> = vec![to.as_str().to_string().into(), now().into()];
    let mut push = |col: &str, v: rusqlite::types::Value| {
        args.push(v);
        sets.push(format!("{col} = ?{}", args.len()));
    };
    if let Some(pid) = changes.pid {
        push("pid", pid.map(i64::from).into());
    }
    if let Some(sock) = &changes.socket_path {
        push("socket_path", sock.clone().into());
    }
    if let Some(t) = changes.expires_at {
        push("expires_at", opt_time(t));
    }
    if let Some(t) = changes.idle_since {
        push("idle_since", opt_time(t));
    }
    if let Some(msg) = &changes.error_message {
        push("error_message", msg.clone().into());
    } else if to != MachineStatus::Failed {
        // A machine that leaves `failed` no longer carries the old error.
        sets.push("error_message = NULL".into());
    }
    args.push(id.to_string().into());
    let id_arg = args.len();
    let marks: Vec<String> = from
        .iter()
        .map(|s| {
            args.push(s.as_str().to_string().into());
            format!("?{}", args.len())
        })
        .collect();
    let sql =
        format!("UPDATE machines SET {} WHERE id = ?{id_arg} AND status IN ({})", sets.join(", "), marks.join(", "));
    let changed = tx.execute(&sql, params_from_iter(args))?;
    let rec = tx.query_row(&format!("{SELECT} WHERE m.id = ?1"), [id], from_row).optional()?;
    // Taking a volume is part of the same transaction as becoming `starting`: two starts cannot both take it.
    if changed > 0
        && to == MachineStatus::Starting
        && let Some(r) = &rec
        && let Err(busy) = super::volumes::check_free(&tx, r)?
    {
        return Ok(Cas::VolumeBusy(busy));
    }
    tx.commit()?;
    Ok(match (changed, rec) {
        (_, None) => Cas::Missing,
        (0, Some(r)) => Cas::WrongState(r),
        (_, Some(r)) => Cas::Done(r),
    })
}

/// Deletes machine `id` and frees its block if its status is one of `from`.
pub fn delete(conn: &mut Connection, id: &str, from: &[MachineStatus]) -> StoreResult<Cas> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let Some(rec) = tx.query_row(&format!("{SELECT} WHERE m.id = ?1"), [id], from_row).optional()? else {
        return Ok(Cas::Missing);
    };
    if !from.contains(&rec.status) {
        return Ok(Cas::WrongState(rec));
    }
    leases::release(&tx, id)?;
    tx.execute("DELETE FROM machine_secrets WHERE machine_id = ?1", [id])?;
    tx.execute("DELETE FROM machines WHERE id = ?1", [id])?;
    tx.commit()?;
    Ok(Cas::Done(rec))
}

/// Result of [`modify_spec`].
#[derive(Debug)]
pub enum Modify<E> {
    Done(Box<MachineRecord>),
    Missing,
    Refused(E),
}

/// Reads the machine's spec and status, lets `f` change the spec (or refuse), and writes it back, in one
/// transaction: no other change to the machine can land in between.
pub fn modify_spec<E>(
    conn: &mut Connection,
    id: &str,
    f: impl FnOnce(&mut MachineSpec, MachineStatus) -> Result<(), E>,
) -> StoreResult<Modify<E>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let Some(mut rec) = tx.query_row(&format!("{SELECT} WHERE m.id = ?1"), [id], from_row).optional()? else {
        return Ok(Modify::Missing);
    };
    if let Err(e) = f(&mut rec.spec, rec.status) {
        return Ok(Modify::Refused(e));
    }
    tx.execute(
        "UPDATE machines SET spec = ?1, updated_at = ?2 WHERE id = ?3",
        params![spec_json(&rec.spec)?, now(), id],
    )?;
    let rec = tx.query_row(&format!("{SELECT} WHERE m.id = ?1"), [id], from_row)?;
    tx.commit()?;
    Ok(Modify::Done(Box::new(rec)))
}

/// Sets a machine's deadlines if it is in one of `statuses` (a keepalive or a policy change must not give
/// a stopped machine a deadline); `None` if it is gone or in another state.
pub fn set_deadlines(
    conn: &mut Connection,
    id: &str,
    statuses: &[MachineStatus],
    expires_at: Option<OffsetDateTime>,
    idle_since: Option<OffsetDateTime>,
) -> StoreResult<Option<MachineRecord>> {
    let marks = vec!["?"; statuses.len()].join(", ");
    let mut args: Vec<rusqlite::types::Value> = vec![opt_time(expires_at), opt_time(idle_since), id.to_string().into()];
    args.extend(statuses.iter().map(|s| rusqlite::types::Value::from(s.as_str().to_string())));
    let n = conn.execute(
        &format!("UPDATE machines SET expires_at = ?, idle_since = ? WHERE id = ? AND status IN ({marks})"),
        params_from_iter(args),
    )?;
    if n == 0 {
        return Ok(None);
    }
    Ok(conn.query_row(&format!("{SELECT} WHERE m.id = ?1"), [id], from_row).optional()?)
}

/// Records activity: moves `idle_since` forward on a running machine that has one.
pub fn touch(conn: &mut Connection, id: &str, at: OffsetDateTime) -> StoreResult<()> {
    conn.execute(
        "UPDATE machines SET idle_since = ?1 WHERE id = ?2 AND status = 'running' AND idle_since IS NOT NULL \
         AND idle_since < ?1",
        params![timestamp::format(at), id],
    )?;
    Ok(())
}

/// Machines with a deadline: the timer's work list after a restart.
pub fn with_deadlines(conn: &Connection) -> StoreResult<Vec<MachineRecord>> {
    let sql = format!("{SELECT} WHERE m.expires_at IS NOT NULL OR m.idle_since IS NOT NULL");
    Ok(conn.prepare(&sql)?.query_map([], from_row)?.collect::<Result<Vec<_>, _>>()?)
}

/// Replaces a machine's secrets.
pub fn set_secrets(
    conn: &mut Connection,
    id: &str,
    secrets: &std::collections::BTreeMap<String, String>,
) -> StoreResult<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute("DELETE FROM machine_secrets WHERE machine_id = ?1", [id])?;
    for (k, v) in secrets {
        tx.execute(
            "INSERT INTO machine_secrets (machine_id, name, value) VALUES (?1, ?2, ?3)",
            params![id, k, v.as_bytes()],
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// A machine's secrets, to put in a command's environment.
pub fn secrets(conn: &Connection, id: &str) -> StoreResult<std::collections::BTreeMap<String, String>> {
    let mut stmt = conn.prepare_cached("SELECT name, value FROM machine_secrets WHERE machine_id = ?1")?;
    let rows = stmt.query_map([id], |r| {
        let v: Vec<u8> = r.get(1)?;
        Ok((r.get::<_, String>(0)?, String::from_utf8_lossy(&v).into_owned()))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::temp_store;
    use MachineStatus::*;
    use hyperfleet_types::{EgressPolicy, MachineNetwork, RuntimeKind};
    use std::net::Ipv4Addr;

    pub(crate) fn spec(name: &str) -> MachineSpec {
        MachineSpec {
            name: name.into(),
            runtime: RuntimeKind::Container,
            vcpu_count: 1,
            mem_size_mib: 128,
            kernel_image_path: "k".into(),
            kernel_args: "a".into(),
            rootfs_path: "r".into(),
            exposed_ports: vec![80],
            network: MachineNetwork {
                prefix_len: None,
                gateway: None,
                dns: vec![Ipv4Addr::new(10, 0, 0, 1)],
                egress: EgressPolicy::Deny,
            },
            env: Default::default(),
            image: None,
            image_digest: None,
            image_size_mib: None,
            entrypoint: None,
            cmd: None,
            restart_policy: Default::default(),
            volumes: vec![],
            disk_size_mib: 0,
            secret_names: vec![],
            labels: Default::default(),
            ttl_seconds: None,
            on_ttl: Default::default(),
            idle_timeout_seconds: None,
            idle_max_connection_seconds: None,
            auto_start: false,
            spawn: None,
            parent_id: None,
        }
    }

    #[test]
    fn insert_get_list_delete() {
        let (_d, store) = temp_store();
        store
            .call_blocking(|c| {
                let a = insert(c, "ida", &spec("alpha"), 10).unwrap();
                assert_eq!((a.block, a.status, a.spec.network.egress.clone()), (0, Pending, EgressPolicy::Deny));
                assert_eq!(a.spec, spec("alpha"), "the spec round-trips");
                assert!(matches!(insert(c, "idb", &spec("alpha"), 10), Err(InsertError::NameTaken(_))));
                let b = insert(c, "idb", &spec("beta"), 10).unwrap();
                assert_eq!(b.block, 1, "the failed insert leased nothing");
                assert_eq!(get(c, "beta")?.unwrap().id, "idb");
                assert_eq!(get(c, "ida")?.unwrap(), a);
                let (page, total) = list(c, None, 1, 1)?;
                assert_eq!((page.len(), page[0].id.as_str(), total), (1, "idb", 2));
                let (page, total) = list(c, Some(Running), 50, 0)?;
                assert_eq!((page.len(), total), (0, 0));
                assert!(matches!(delete(c, "ida", &[Pending])?, Cas::Done(_)));
                assert!(matches!(delete(c, "ida", &[Pending])?, Cas::Missing));
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn transition_is_compare_and_set() {
        let (_d, store) = temp_store();
        store
            .call_blocking(|c| {
                insert(c, "id1", &spec("m1"), 10).unwrap();
                let ch = Changes { pid: Some(Some(42)), ..Default::default() };
                let Cas::Done(r) = transition(c, "id1", &[Pending, Stopped], Starting, &ch)? else { panic!() };
                assert_eq!((r.status, r.pid), (Starting, Some(42)));
                // A second start finds it no longer pending.
                let Cas::WrongState(r) = transition(c, "id1", &[Pending, Stopped], Starting, &ch)? else { panic!() };
                assert_eq!(r.status, Starting);
                let failed = Changes { error_message: Some(Some("boom".into())), ..Changes::process_gone() };
                let Cas::Done(r) = transition(c, "id1", &[Starting], Failed, &failed)? else { panic!() };
                assert_eq!((r.pid, r.error_message.as_deref()), (None, Some("boom")));
                let Cas::Done(r) = transition(c, "id1", &[Failed], Starting, &Changes::default())? else { panic!() };
                assert_eq!(r.error_message, None);
                assert!(matches!(transition(c, "nope", &[Pending], Starting, &ch)?, Cas::Missing));
                Ok(())
            })
            .unwrap();
    }
}
