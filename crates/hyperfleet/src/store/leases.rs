//! Address-block leases, per node (guest addresses are NAT'd per host, so two nodes may use the same
//! block). The lowest free block is found in O(log n): every free block below the node's highest leased
//! one is kept in `free_blocks`, so the answer is the smaller of MIN(free_blocks) and MAX(block)+1. The
//! `(node, block)` primary key is what guarantees that no block is ever handed out twice on a node.

use super::{Conn, StoreError, StoreResult, int, meta_get, meta_set, now};

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("all {0} address blocks of the subnet are leased")]
    Exhausted(u32),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for LeaseError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(e.into())
    }
}

/// Leases the lowest free block of `node`'s pool of `block_count` blocks to `machine_id` (in the caller's
/// write transaction).
pub(crate) async fn allocate(c: &mut Conn, node: &str, machine_id: &str, block_count: u32) -> Result<u32, LeaseError> {
    // Both candidates in one statement (each statement is a round trip to the database).
    let (lowest_free, next_fresh): (Option<i64>, i64) = sqlx::query_as(
        "SELECT (SELECT MIN(block) FROM free_blocks WHERE node = $1), \
         (SELECT COALESCE(MAX(block) + 1, 0) FROM leases WHERE node = $1)",
    )
    .bind(node)
    .fetch_one(&mut *c)
    .await?;
    let block = lowest_free.map_or(next_fresh, |f| f.min(next_fresh));
    if block >= i64::from(block_count) {
        return Err(LeaseError::Exhausted(block_count));
    }
    if lowest_free == Some(block) {
        sqlx::query("DELETE FROM free_blocks WHERE node = $1 AND block = $2")
            .bind(node)
            .bind(block)
            .execute(&mut *c)
            .await?;
    }
    sqlx::query("INSERT INTO leases (node, block, machine_id, created_at) VALUES ($1, $2, $3, $4)")
        .bind(node)
        .bind(block)
        .bind(machine_id)
        .bind(now())
        .execute(&mut *c)
        .await?;
    Ok(int("block", block)?)
}

/// Frees the block of `machine_id`, if it has one (in the caller's write transaction).
pub(crate) async fn release(c: &mut Conn, machine_id: &str) -> StoreResult<Option<u32>> {
    let lease: Option<(String, i64)> = sqlx::query_as("SELECT node, block FROM leases WHERE machine_id = $1")
        .bind(machine_id)
        .fetch_optional(&mut *c)
        .await?;
    if let Some((node, b)) = &lease {
        sqlx::query("DELETE FROM leases WHERE machine_id = $1").bind(machine_id).execute(&mut *c).await?;
        sqlx::query("INSERT INTO free_blocks (node, block) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(node)
            .bind(b)
            .execute(&mut *c)
            .await?;
        trim_free_blocks(c, node).await?;
    }
    lease.map(|(_, b)| int("block", b)).transpose()
}

/// Free blocks at or above the node's highest lease are implied by MAX(block)+1 and need no row.
async fn trim_free_blocks(c: &mut Conn, node: &str) -> StoreResult<()> {
    sqlx::query(
        "DELETE FROM free_blocks WHERE node = $1 AND block > \
         (SELECT COALESCE(MAX(block), -1) FROM leases WHERE node = $1)",
    )
    .bind(node)
    .execute(c)
    .await?;
    Ok(())
}

/// Frees leases whose machine no longer exists (possible only if rows were removed by hand).
pub(crate) async fn free_orphans(c: &mut Conn) -> StoreResult<usize> {
    let orphans: Vec<String> =
        sqlx::query_scalar("SELECT machine_id FROM leases WHERE machine_id NOT IN (SELECT id FROM machines)")
            .fetch_all(&mut *c)
            .await?;
    for id in &orphans {
        release(c, id).await?;
    }
    Ok(orphans.len())
}

/// Blocks leased on `node`.
pub(crate) async fn count(c: &mut Conn, node: &str) -> StoreResult<u64> {
    int(
        "count",
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM leases WHERE node = $1").bind(node).fetch_one(c).await?,
    )
}

/// The `meta` key of a node's subnet. SQLite is one host: its key names no node, so renaming the host
/// keeps it.
fn subnet_key(c: &Conn, node: &str) -> String {
    match super::Backend::of(c) {
        super::Backend::Sqlite => "subnet".into(),
        super::Backend::Postgres => format!("subnet:{node}"),
    }
}

/// Records the subnet `node`'s leases are cut from (in the caller's write transaction). Changing it while
/// leases exist is refused: those machines' addresses would silently stop matching their blocks.
pub(crate) async fn bind_subnet(c: &mut Conn, node: &str, subnet: &str) -> StoreResult<Result<(), String>> {
    let key = subnet_key(c, node);
    let stored = meta_get(c, &key).await?;
    let outstanding = count(c, node).await?;
    match stored {
        Some(old) if old != subnet && outstanding > 0 => {
            return Ok(Err(format!(
                "HYPERFLEET_SUBNET is {subnet} but {outstanding} machine(s) hold addresses in {old}; \
                 delete them first or keep HYPERFLEET_SUBNET={old}"
            )));
        }
        Some(old) if old == subnet => {}
        _ => {
            sqlx::query("DELETE FROM free_blocks WHERE node = $1").bind(node).execute(&mut *c).await?;
            meta_set(c, &key, subnet).await?;
        }
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::store::testing::backend_tests;

    async fn lease(store: &Store, id: &str, count: u32) -> Result<u32, LeaseError> {
        let mut tx = store.write().await.unwrap();
        sqlx::query(
            "INSERT INTO machines (id, name, status, spec, created_at, updated_at) \
             VALUES ($1, $1, 'pending', '{}', 'now', 'now')",
        )
        .bind(id)
        .execute(&mut *tx)
        .await
        .unwrap();
        let r = allocate(&mut tx, "n1", id, count).await;
        if r.is_ok() {
            tx.commit().await.unwrap();
        }
        r
    }

    async fn free(store: &Store, id: &str) -> Option<u32> {
        let mut tx = store.write().await.unwrap();
        let b = release(&mut tx, id).await.unwrap();
        sqlx::query("DELETE FROM machines WHERE id = $1").bind(id).execute(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
        b
    }

    async fn bind(store: &Store, subnet: &str) -> Result<(), String> {
        let mut tx = store.write().await.unwrap();
        let r = bind_subnet(&mut tx, "n1", subnet).await.unwrap();
        tx.commit().await.unwrap();
        r
    }

    backend_tests! {
        async fn lowest_free_block_is_reused(store, _db) {
            for i in 0..5 {
                assert_eq!(lease(&store, &format!("m{i}"), 100).await.unwrap(), i);
            }
            assert_eq!(free(&store, "m1").await, Some(1));
            assert_eq!(free(&store, "m3").await, Some(3));
            assert_eq!(lease(&store, "a", 100).await.unwrap(), 1);
            assert_eq!(lease(&store, "b", 100).await.unwrap(), 3);
            assert_eq!(lease(&store, "c", 100).await.unwrap(), 5);
            // Freeing the top block and the ones below it shrinks back down.
            for id in ["c", "m4", "b"] {
                free(&store, id).await;
            }
            assert_eq!(lease(&store, "d", 100).await.unwrap(), 3);
            let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM free_blocks")
                .fetch_one(&mut *store.read().await.unwrap())
                .await
                .unwrap();
            assert_eq!(rows, 0);
        }

        async fn exhaustion_is_an_error_not_a_duplicate(store, _db) {
            assert_eq!(lease(&store, "a", 2).await.unwrap(), 0);
            assert_eq!(lease(&store, "b", 2).await.unwrap(), 1);
            assert!(matches!(lease(&store, "c", 2).await, Err(LeaseError::Exhausted(2))));
            free(&store, "a").await;
            assert_eq!(lease(&store, "d", 2).await.unwrap(), 0);
        }

        async fn leases_survive_reopening_the_database(store, db) {
            for i in 0..3 {
                lease(&store, &format!("m{i}"), 10).await.unwrap();
            }
            free(&store, "m1").await;
            store.close().await;
            let store = db.reopen().await;
            assert_eq!(lease(&store, "x", 10).await.unwrap(), 1);
            assert_eq!(lease(&store, "y", 10).await.unwrap(), 3);
            store.close().await;
        }

        async fn subnet_cannot_change_under_outstanding_leases(store, _db) {
            bind(&store, "172.16.0.0/16").await.unwrap();
            lease(&store, "a", 10).await.unwrap();
            let err = bind(&store, "10.0.0.0/16").await.unwrap_err();
            assert!(err.contains("172.16.0.0/16") && err.contains("1 machine"), "{err}");
            free(&store, "a").await;
            bind(&store, "10.0.0.0/16").await.unwrap();
        }

        async fn orphaned_leases_are_freed(store, db) {
            lease(&store, "a", 10).await.unwrap();
            lease(&store, "b", 10).await.unwrap();
            // Remove a machine behind the foreign key's back, as a hand edit would.
            match &db.location {
                crate::store::Location::Sqlite(path) => {
                    // Outside a transaction: SQLite ignores this pragma inside one.
                    let url = crate::store::sqlite_url(path, "rw");
                    let mut c = <sqlx::AnyConnection as sqlx::Connection>::connect(&url).await.unwrap();
                    sqlx::raw_sql("PRAGMA foreign_keys = OFF; DELETE FROM machines WHERE id = 'a'")
                        .execute(&mut c)
                        .await
                        .unwrap();
                }
                crate::store::Location::Postgres(_) => {
                    let mut tx = store.write().await.unwrap();
                    sqlx::raw_sql("SET LOCAL session_replication_role = replica; DELETE FROM machines WHERE id = 'a'")
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                }
            }
            let mut tx = store.write().await.unwrap();
            assert_eq!(free_orphans(&mut tx).await.unwrap(), 1);
            tx.commit().await.unwrap();
            assert_eq!(lease(&store, "c", 10).await.unwrap(), 0);
        }
    }
}
