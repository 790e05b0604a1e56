//! The `volumes` table. Which machines use a volume is read from their specs: a machine *holds* the volumes
//! it names while its status is one that may have a process (starting, running, paused, stopping). A start
//! takes its volumes in the same transaction that makes it `starting` ([`check_free`]), so the rule "read-write
//! to one machine, read-only to many" holds under concurrent starts with no attachment state to clean up.

use hyperfleet_types::{MachineStatus, Volume, VolumeUser};
use sqlx::any::AnyRow;

use super::dialect::{self, Backend};
use super::machines::MachineRecord;
use super::{Conn, StoreResult, col, int, now, time_col};

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

fn from_row(row: &AnyRow) -> StoreResult<VolumeRecord> {
    Ok(VolumeRecord {
        id: col(row, "id")?,
        name: col(row, "name")?,
        size_mib: int("size_mib", col::<i64>(row, "size_mib")?)?,
        created_at: time_col(row, "created_at")?,
        updated_at: time_col(row, "updated_at")?,
    })
}

const BY_ID: &str = "SELECT id, name, size_mib, created_at, updated_at FROM volumes WHERE id = $1";
const BY_NAME: &str = "SELECT id, name, size_mib, created_at, updated_at FROM volumes WHERE name = $1";

/// Inserts a volume; `None` when the name is taken.
pub(crate) async fn insert(c: &mut Conn, id: &str, name: &str, size_mib: u32) -> StoreResult<Option<VolumeRecord>> {
    let t = now();
    let done = sqlx::query(
        "INSERT INTO volumes (id, name, size_mib, created_at, updated_at) VALUES ($1, $2, $3, $4, $4) \
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(id)
    .bind(name)
    .bind(i64::from(size_mib))
    .bind(&t)
    .execute(&mut *c)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(None);
    }
    get(c, id).await
}

/// A volume by id or by name.
pub(crate) async fn get(c: &mut Conn, id_or_name: &str) -> StoreResult<Option<VolumeRecord>> {
    if let Some(row) = sqlx::query(BY_ID).bind(id_or_name).fetch_optional(&mut *c).await? {
        return from_row(&row).map(Some);
    }
    sqlx::query(BY_NAME).bind(id_or_name).fetch_optional(c).await?.as_ref().map(from_row).transpose()
}

pub(crate) async fn list(c: &mut Conn) -> StoreResult<Vec<VolumeRecord>> {
    sqlx::query("SELECT id, name, size_mib, created_at, updated_at FROM volumes ORDER BY created_at, id")
        .fetch_all(c)
        .await?
        .iter()
        .map(from_row)
        .collect()
}

/// Every machine that names volume `id`, and whether it holds it now.
pub(crate) async fn users(c: &mut Conn, id: &str) -> StoreResult<Vec<VolumeUser>> {
    let rows = sqlx::query(dialect::volume_users(Backend::of(c))).bind(id).fetch_all(c).await?;
    rows.iter()
        .map(|r| {
            let status: String = col(r, "status")?;
            let read_only: i64 = col(r, "read_only")?;
            Ok(VolumeUser {
                machine_id: col(r, "id")?,
                read_only: read_only != 0,
                attached: MachineStatus::parse(&status).is_some_and(|s| HOLDING.contains(&s)),
            })
        })
        .collect()
}

/// Whether machine `m` (becoming `starting` in the caller's write transaction) may take every volume it
/// names: a read-write use needs no other holder, a read-only use no read-write holder. `Err(message)` names
/// the volume and the holder.
pub(super) async fn check_free(c: &mut Conn, m: &MachineRecord) -> StoreResult<Result<(), String>> {
    for want in &m.spec.volumes {
        for other in users(c, &want.volume).await? {
            if other.machine_id == m.id || !other.attached {
                continue;
            }
            if !want.read_only || !other.read_only {
                let name: Option<String> = sqlx::query_scalar("SELECT name FROM volumes WHERE id = $1")
                    .bind(&want.volume)
                    .fetch_optional(&mut *c)
                    .await?;
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
pub(crate) async fn busy(c: &mut Conn, id: &str, any_use: bool) -> StoreResult<Option<String>> {
    let users = users(c, id).await?;
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

pub(crate) async fn set_size(c: &mut Conn, id: &str, size_mib: u32) -> StoreResult<()> {
    sqlx::query("UPDATE volumes SET size_mib = $1, updated_at = $2 WHERE id = $3")
        .bind(i64::from(size_mib))
        .bind(now())
        .bind(id)
        .execute(c)
        .await?;
    Ok(())
}

/// Deletes the volume unless a machine names it (in the caller's write transaction); `Err(message)` says
/// which one does.
pub(crate) async fn delete(c: &mut Conn, id: &str) -> StoreResult<Result<(), String>> {
    if let Some(why) = busy(c, id, true).await? {
        return Ok(Err(why));
    }
    sqlx::query("DELETE FROM volumes WHERE id = $1").bind(id).execute(c).await?;
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::machines::{self, Cas, Changes};
    use crate::store::testing::backend_tests;
    use hyperfleet_types::VolumeMount;

    backend_tests! {
        async fn a_volume_is_held_read_write_by_one_machine(store, _db) {
            let mut tx = store.write().await.unwrap();
            let v = insert(&mut tx, "v1", "data", 64).await.unwrap().unwrap();
            assert!(insert(&mut tx, "v2", "data", 64).await.unwrap().is_none(), "the name is taken");
            for (id, read_only) in [("a", false), ("b", false), ("c", true)] {
                let mut spec = machines::tests::spec(id);
                spec.volumes = vec![VolumeMount { volume: v.id.clone(), mount_path: "/data".into(), read_only }];
                machines::insert(&mut tx, "n1", id, &spec, 10).await.unwrap();
            }
            tx.commit().await.unwrap();
            let mut tx = store.write().await.unwrap();
            let start = async |tx: &mut crate::store::Conn, id: &str| {
                machines::transition(tx, id, &[MachineStatus::Pending], MachineStatus::Starting, &Changes::default())
                    .await
                    .unwrap()
            };
            assert!(matches!(start(&mut tx, "a").await, Cas::Done(_)));
            let Cas::VolumeBusy(why) = start(&mut tx, "b").await else { panic!("b took a held volume") };
            assert!(why.contains("'data'") && why.contains("machine a"), "{why}");
            assert!(matches!(start(&mut tx, "c").await, Cas::VolumeBusy(_)), "read-only beside read-write");
            tx.commit().await.unwrap();
            let mut r = store.read().await.unwrap();
            let users = users(&mut r, "v1").await.unwrap();
            assert_eq!(
                users.iter().map(|u| (u.machine_id.as_str(), u.read_only, u.attached)).collect::<Vec<_>>(),
                [("a", false, true), ("b", false, false), ("c", true, false)]
            );
            assert!(busy(&mut r, "v1", false).await.unwrap().unwrap().contains("attached to machine a"));
            drop(r);
            let mut tx = store.write().await.unwrap();
            assert!(delete(&mut tx, "v1").await.unwrap().is_err(), "machines name it");
            set_size(&mut tx, "v1", 128).await.unwrap();
            tx.commit().await.unwrap();
            let got = get(&mut store.read().await.unwrap(), "data").await.unwrap().unwrap();
            assert_eq!(got.size_mib, 128);
        }
    }
}
