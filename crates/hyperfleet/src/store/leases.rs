//! Address-block leases. The lowest free block is found in O(log n): every free block below the highest
//! leased one is kept in `free_blocks`, so the answer is the smaller of MIN(free_blocks) and MAX(block)+1.
//! The `leases.block` primary key is what guarantees that no block is ever handed out twice.

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::{StoreError, StoreResult, meta_get, meta_set, now};

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("all {0} address blocks of the subnet are leased")]
    Exhausted(u32),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for LeaseError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Store(e.into())
    }
}

/// Leases the lowest free block of a pool of `block_count` blocks to `machine_id`.
pub(crate) fn allocate(tx: &Transaction, machine_id: &str, block_count: u32) -> Result<u32, LeaseError> {
    let lowest_free: Option<u32> = tx.query_row("SELECT MIN(block) FROM free_blocks", [], |r| r.get(0))?;
    let next_fresh: u32 = tx.query_row("SELECT COALESCE(MAX(block) + 1, 0) FROM leases", [], |r| r.get(0))?;
    let block = lowest_free.map_or(next_fresh, |f| f.min(next_fresh));
    if block >= block_count {
        return Err(LeaseError::Exhausted(block_count));
    }
    tx.execute("DELETE FROM free_blocks WHERE block = ?1", [block])?;
    tx.execute(
        "INSERT INTO leases (block, machine_id, created_at) VALUES (?1, ?2, ?3)",
        params![block, machine_id, now()],
    )?;
    Ok(block)
}

/// Frees the block of `machine_id`, if it has one.
pub(crate) fn release(tx: &Transaction, machine_id: &str) -> StoreResult<Option<u32>> {
    let block: Option<u32> =
        tx.query_row("SELECT block FROM leases WHERE machine_id = ?1", [machine_id], |r| r.get(0)).optional()?;
    if let Some(b) = block {
        tx.execute("DELETE FROM leases WHERE block = ?1", [b])?;
        tx.execute("INSERT OR IGNORE INTO free_blocks (block) VALUES (?1)", [b])?;
        trim_free_blocks(tx)?;
    }
    Ok(block)
}

/// Free blocks at or above the highest lease are implied by MAX(block)+1 and need no row.
fn trim_free_blocks(conn: &Connection) -> StoreResult<()> {
    conn.execute("DELETE FROM free_blocks WHERE block > (SELECT COALESCE(MAX(block), -1) FROM leases)", [])?;
    Ok(())
}

/// Frees leases whose machine no longer exists (possible only if rows were removed by hand).
pub(crate) fn free_orphans(conn: &mut Connection) -> StoreResult<usize> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let orphans: Vec<String> = tx
        .prepare("SELECT machine_id FROM leases WHERE machine_id NOT IN (SELECT id FROM machines)")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in &orphans {
        release(&tx, id)?;
    }
    tx.commit()?;
    Ok(orphans.len())
}

pub(crate) fn count(conn: &Connection) -> StoreResult<u64> {
    Ok(conn.query_row("SELECT COUNT(*) FROM leases", [], |r| r.get(0))?)
}

/// Records the subnet leases are cut from. Changing it while leases exist is refused: those machines'
/// addresses would silently stop matching their blocks.
pub(crate) fn bind_subnet(conn: &mut Connection, subnet: &str) -> StoreResult<Result<(), String>> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let stored = meta_get(&tx, "subnet")?;
    let outstanding = count(&tx)?;
    match stored {
        Some(old) if old != subnet && outstanding > 0 => {
            return Ok(Err(format!(
                "HYPERFLEET_SUBNET is {subnet} but {outstanding} machine(s) hold addresses in {old}; \
                 delete them first or keep HYPERFLEET_SUBNET={old}"
            )));
        }
        Some(old) if old == subnet => {}
        _ => {
            tx.execute("DELETE FROM free_blocks", [])?;
            meta_set(&tx, "subnet", subnet)?;
        }
    }
    tx.commit()?;
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, temp_store};

    fn add_machine(conn: &Connection, id: &str) {
        conn.execute(
            "INSERT INTO machines (id, name, status, spec, created_at, updated_at) \
             VALUES (?1, ?1, 'pending', '{}', 'now', 'now')",
            [id],
        )
        .unwrap();
    }

    fn lease(store: &Store, id: &str, count: u32) -> Result<u32, LeaseError> {
        store
            .call_blocking(|c| {
                add_machine(c, id);
                let tx = c.transaction().unwrap();
                let r = allocate(&tx, id, count);
                tx.commit().unwrap();
                Ok(r)
            })
            .unwrap()
    }

    fn free(store: &Store, id: &str) -> Option<u32> {
        store
            .call_blocking(|c| {
                let tx = c.transaction().unwrap();
                let b = release(&tx, id)?;
                tx.execute("DELETE FROM machines WHERE id = ?1", [id])?;
                tx.commit()?;
                Ok(b)
            })
            .unwrap()
    }

    #[test]
    fn lowest_free_block_is_reused() {
        let (_d, store) = temp_store();
        for i in 0..5 {
            assert_eq!(lease(&store, &format!("m{i}"), 100).unwrap(), i);
        }
        assert_eq!(free(&store, "m1"), Some(1));
        assert_eq!(free(&store, "m3"), Some(3));
        assert_eq!(lease(&store, "a", 100).unwrap(), 1);
        assert_eq!(lease(&store, "b", 100).unwrap(), 3);
        assert_eq!(lease(&store, "c", 100).unwrap(), 5);
        // Freeing the top block and the ones below it shrinks back down.
        for id in ["c", "m4", "b"] {
            free(&store, id);
        }
        assert_eq!(lease(&store, "d", 100).unwrap(), 3);
        assert_eq!(
            store
                .call_blocking(|c| Ok(c.query_row("SELECT COUNT(*) FROM free_blocks", [], |r| r.get::<_, i64>(0))?))
                .unwrap(),
            0
        );
    }

    #[test]
    fn exhaustion_is_an_error_not_a_duplicate() {
        let (_d, store) = temp_store();
        assert_eq!(lease(&store, "a", 2).unwrap(), 0);
        assert_eq!(lease(&store, "b", 2).unwrap(), 1);
        assert!(matches!(lease(&store, "c", 2), Err(LeaseError::Exhausted(2))));
        free(&store, "a");
        assert_eq!(lease(&store, "d", 2).unwrap(), 0);
    }

    #[test]
    fn leases_survive_reopening_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let store = Store::open(&path).unwrap();
            for i in 0..3 {
                lease(&store, &format!("m{i}"), 10).unwrap();
            }
            free(&store, "m1");
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(lease(&store, "x", 10).unwrap(), 1);
        assert_eq!(lease(&store, "y", 10).unwrap(), 3);
    }

    #[test]
    fn subnet_cannot_change_under_outstanding_leases() {
        let (_d, store) = temp_store();
        store.call_blocking(|c| bind_subnet(c, "172.16.0.0/16")).unwrap().unwrap();
        lease(&store, "a", 10).unwrap();
        let err = store.call_blocking(|c| bind_subnet(c, "10.0.0.0/16")).unwrap().unwrap_err();
        assert!(err.contains("172.16.0.0/16") && err.contains("1 machine"), "{err}");
        free(&store, "a");
        store.call_blocking(|c| bind_subnet(c, "10.0.0.0/16")).unwrap().unwrap();
    }

    #[test]
    fn orphaned_leases_are_freed() {
        let (_d, store) = temp_store();
        lease(&store, "a", 10).unwrap();
        lease(&store, "b", 10).unwrap();
        store
            .call_blocking(|c| {
                c.pragma_update(None, "foreign_keys", "OFF")?;
                c.execute("DELETE FROM machines WHERE id = 'a'", [])?;
                c.pragma_update(None, "foreign_keys", "ON")?;
                Ok(())
            })
            .unwrap();
        assert_eq!(store.call_blocking(free_orphans).unwrap(), 1);
        assert_eq!(lease(&store, "c", 10).unwrap(), 0);
    }
}
