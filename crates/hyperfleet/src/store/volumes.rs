//! The `volumes` table. Which machines use a volume is read from their specs: a machine *holds* the volumes
//! it names while its status is one that may have a process (starting, running, paused, stopping). A start
//! takes its volumes in the same transaction that makes it `starting` ([`check_free`]), so the rule "read-write
//! to one machine, read-only to many" holds under concurrent starts with no attachment state to clean up.

use hyperfleet_types::{MachineStatus, Volume, VolumeUser};
use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};

use super::machines::{MachineRecord, time_col};
use super::{StoreResult, now};

/// Statuses in which a machine holds its volumes.
pub(crate) const HOLDING: [MachineStatus; 4] =
    [MachineStatus::Starting, MachineStatus::Running, MachineStatus::Paused, MachineStatus::Stopping];

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct VolumeRecord {
    pub id: String,
    pub name: String,
    pub size_mib: u32,
    pub created_at: time::OffsetDateTime,
    pub updated_at: time::OffsetDateTime,
}

impl VolumeRecord {
    pub(crate) fn to_wire(&self, machines: Vec<VolumeUser>) -> Volume {
        Volume {
            id: self.id.clone(),
            name: self.name.clone(),
            size_mib: self.size_mib,
            machines,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

fn from_row(row: &Row) -> rusqlite::Result<VolumeRecord> {
    Ok(VolumeRecord {
        id: row.get("id")?,
        name: row.get("name")?,
        size_mib: row.get("size_mib")?,
        created_at: time_col(row, "created_at")?,
        updated_at: time_col(row, "updated_at")?,
    })
}

const SELECT: &str = "SELECT id, name, size_mib, created_at, updated_at FROM volumes";

/// Inserts a volume; `None` when the name is taken.
pub(crate) fn insert(conn: &Connection, id: &str, name: &str, size_mib: u32) -> StoreResult<Option<VolumeRecord>> {
    let t = now();
    let done = conn.execute(
        "INSERT INTO volumes (id, name, size_mib, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?4) \
         ON CONFLICT (name) DO NOTHING",
        params![id, name, size_mib, t],
    )?;
    if done == 0 {
        return Ok(None);
    }
    get(conn, id)
}

/// A volume by id or by name.
pub(crate) fn get(conn: &Connection, id_or_name: &str) -> StoreResult<Option<VolumeRecord>> {
    let by_id =
        conn.prepare_cached(&format!("{SELECT} WHERE id = ?1"))?.query_row([id_or_name], from_row).optional()?;
    if by_id.is_some() {
        return Ok(by_id);
    }
    Ok(conn.prepare_cached(&format!("{SELECT} WHERE name = ?1"))?.query_row([id_or_name], from_row).optional()?)
}

pub(crate) fn list(conn: &Connection) -> StoreResult<Vec<VolumeRecord>> {
    Ok(conn
        .prepare(&format!("{SELECT} ORDER BY created_at, id"))?
        .query_map([], from_row)?
        .collect::<Result<_, _>>()?)
}

/// Every machine that names volume `id`, and whether it holds it now.
pub(crate) fn users(conn: &Connection, id: &str) -> StoreResult<Vec<VolumeUser>> {
    let mut stmt = conn.prepare_cached(
        "SELECT m.id, m.status, json_extract(v.value, '$.read_only') FROM machines m, json_each(m.spec, '$.volumes') v \
         WHERE json_extract(v.value, '$.volume') = ?1 ORDER BY m.created_at, m.id",
    )?;
    let rows = stmt.query_map([id], |r| {
        let status: String = r.get(1)?;
        let read_only: Option<bool> = r.get(2)?;
        Ok(VolumeUser {
            machine_id: r.get(0)?,
            read_only: read_only.unwrap_or(false),
            attached: MachineStatus::parse(&status).is_some_and(|s| HOLDING.contains(&s)),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Whether machine `m` (becoming `starting` in `tx`) may take every volume it names: a read-write use needs
/// no other holder, a read-only use no read-write holder. `Err(message)` names the volume and the holder.
pub(super) fn check_free(tx: &Transaction, m: &MachineRecord) -> StoreResult<Result<(), String>> {
    for want in &m.spec.volumes {
        for other in users(tx, &want.volume)? {
            if other.machine_id == m.id || !other.attached {
                continue;
            }
            if !want.read_only || !other.read_only {
                let name: Option<String> =
                    tx.query_row("SELECT name FROM volumes WHERE id = ?1", [&want.volume], |r| r.get(0)).optional()?;
                let how = if other.read_only { "read-only" } else { "read-write" };
                return Ok(Err(format!(
                    "volume '{}' is attached {how} to machine {}; a volume is attached read-write to one running machine at most",
                    name.unwrap_or_else(|| want.volume.clone()),
                    other.machine_id
                )));
            }
        }
    }
    Ok(Ok(()))
}

/// Why a volume cannot change (be deleted, resized) now, if it cannot: `in_use` when any machine names it
/// (delete), else only when one holds it (resize).
pub(crate) fn busy(conn: &Connection, id: &str, any_use: bool) -> StoreResult<Option<String>> {
    let users = users(conn, id)?;
    let blocking: Vec<&VolumeUser> = users.iter().filter(|u| any_use || u.attached).collect();
    Ok(blocking.first().map(|u| {
        if u.attached {
            format!("volume is attached to machine {}; stop it first", u.machine_id)
        } else {
            format!(
                "volume is used by machine {}; remove it from the machine or delete the machine first",
                u.machine_id
            )
        }
    }))
}

pub(crate) fn set_size(conn: &Connection, id: &str, size_mib: u32) -> StoreResult<()> {
    conn.execute("UPDATE volumes SET size_mib = ?1, updated_at = ?2 WHERE id = ?3", params![size_mib, now(), id])?;
    Ok(())
}

/// Deletes the volume unless a machine names it; `Err(message)` says which one does.
pub(crate) fn delete(conn: &mut Connection, id: &str) -> StoreResult<Result<(), String>> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if let Some(why) = busy(&tx, id, true)? {
        return Ok(Err(why));
    }
    tx.execute("DELETE FROM volumes WHERE id = ?1", [id])?;
    tx.commit()?;
    Ok(Ok(()))
}
