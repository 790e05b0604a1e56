//! The `nodes` table: each daemon of a fleet registers one row (capacity, runtimes, labels, URL) and moves
//! its heartbeat, in milliseconds by the database's clock; what a node's machines reserve is summed from
//! their specs when the rows are read, so it can never drift from the machines table.

use std::collections::BTreeMap;

use hyperfleet_types::RuntimeKind;
use time::OffsetDateTime;

use super::dialect::{self, Backend};
use super::{Conn, StoreError, StoreResult, col, int, now, time_col};

/// What a daemon registers about itself.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Registration {
    pub name: String,
    pub url: Option<String>,
    pub vcpus: u32,
    pub mem_mib: u64,
    /// Placement's capacity multiplier; `None`: capacity is not enforced on this node.
    pub overcommit: Option<f64>,
    pub runtimes: Vec<RuntimeKind>,
    pub labels: BTreeMap<String, String>,
    /// How the other nodes' proxies reach this node's proxy; `None`: it has none, or no URL to reach it by.
    pub proxy_url: Option<String>,
    /// The subnet its machines' address blocks are cut from, and the prefix of their interfaces' names:
    /// what another node needs to show this node's machines' addresses.
    pub subnet: String,
    pub iface_prefix: String,
}

/// A node as read back: its registration, drain flag, heartbeat age and its machines' reservations.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NodeRow {
    pub reg: Registration,
    pub drained: bool,
    /// Milliseconds since the last heartbeat, by the database's clock.
    pub heartbeat_age_ms: i64,
    pub started_at: OffsetDateTime,
    pub machines: u64,
    pub used_vcpus: u64,
    pub used_mem_mib: u64,
}

fn json<T: serde::Serialize>(what: &str, v: &T) -> StoreResult<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// Registers (or re-registers, after a restart) node `reg.name`, heartbeat now; a drain flag is kept.
pub(crate) async fn register(c: &mut Conn, reg: &Registration) -> StoreResult<()> {
    let sql = format!(
        "INSERT INTO nodes (name, url, vcpus, mem_mib, overcommit, runtimes, labels, drained, heartbeat_ms, \
         started_at, proxy_url, subnet, iface_prefix) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, 0, {now}, $8, $9, $10, $11) ON CONFLICT (name) DO UPDATE SET \
         url = excluded.url, vcpus = excluded.vcpus, mem_mib = excluded.mem_mib, overcommit = excluded.overcommit, \
         runtimes = excluded.runtimes, labels = excluded.labels, heartbeat_ms = excluded.heartbeat_ms, \
         started_at = excluded.started_at, proxy_url = excluded.proxy_url, subnet = excluded.subnet, \
         iface_prefix = excluded.iface_prefix",
        now = dialect::now_ms(Backend::of(c))
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&reg.name)
        .bind(&reg.url)
        .bind(i64::from(reg.vcpus))
        .bind(i64::try_from(reg.mem_mib).unwrap_or(i64::MAX))
        .bind(reg.overcommit.map(|o| o.to_string()))
        .bind(json("runtimes", &reg.runtimes)?)
        .bind(json("labels", &reg.labels)?)
        .bind(now())
        .bind(&reg.proxy_url)
        .bind(&reg.subnet)
        .bind(&reg.iface_prefix)
        .execute(c)
        .await?;
    Ok(())
}

/// Moves node `name`'s heartbeat to the database's now; `false` if it has no row (then it registers again).
pub(crate) async fn heartbeat(c: &mut Conn, name: &str) -> StoreResult<bool> {
    let sql = format!("UPDATE nodes SET heartbeat_ms = {} WHERE name = $1", dialect::now_ms(Backend::of(c)));
    Ok(sqlx::query(sqlx::AssertSqlSafe(sql)).bind(name).execute(c).await?.rows_affected() > 0)
}

fn select(backend: Backend) -> String {
    format!(
        "SELECT n.name, n.url, n.vcpus, n.mem_mib, n.overcommit, n.runtimes, n.labels, n.drained, n.started_at, \
         n.proxy_url, n.subnet, n.iface_prefix, \
         {now} - n.heartbeat_ms AS age_ms, \
         CAST(COALESCE(r.machines, 0) AS BIGINT) AS machines, \
         CAST(COALESCE(r.used_vcpus, 0) AS BIGINT) AS used_vcpus, \
         CAST(COALESCE(r.used_mem, 0) AS BIGINT) AS used_mem \
         FROM nodes n LEFT JOIN (SELECT node, COUNT(*) AS machines, SUM(vcpus) AS used_vcpus, \
         SUM(mem_mib) AS used_mem FROM machines GROUP BY node) r ON r.node = n.name",
        now = dialect::now_ms(backend),
    )
}

fn from_row(row: &sqlx::any::AnyRow) -> StoreResult<NodeRow> {
    let runtimes: String = col(row, "runtimes")?;
    let labels: String = col(row, "labels")?;
    let overcommit: Option<String> = col(row, "overcommit")?;
    Ok(NodeRow {
        reg: Registration {
            name: col(row, "name")?,
            url: col(row, "url")?,
            vcpus: int("vcpus", col::<i64>(row, "vcpus")?)?,
            mem_mib: int("mem_mib", col::<i64>(row, "mem_mib")?)?,
            overcommit: overcommit.and_then(|o| o.parse().ok()),
            runtimes: serde_json::from_str(&runtimes)
                .map_err(|e| StoreError::Corrupt(format!("column runtimes: {e}")))?,
            labels: serde_json::from_str(&labels).map_err(|e| StoreError::Corrupt(format!("column labels: {e}")))?,
            proxy_url: col(row, "proxy_url")?,
            subnet: col(row, "subnet")?,
            iface_prefix: col(row, "iface_prefix")?,
        },
        drained: col::<i64>(row, "drained")? != 0,
        heartbeat_age_ms: col(row, "age_ms")?,
        started_at: time_col(row, "started_at")?,
        machines: int("machines", col::<i64>(row, "machines")?)?,
        used_vcpus: int("used_vcpus", col::<i64>(row, "used_vcpus")?)?,
        used_mem_mib: int("used_mem", col::<i64>(row, "used_mem")?)?,
    })
}

/// Every node, by name.
pub(crate) async fn list(c: &mut Conn) -> StoreResult<Vec<NodeRow>> {
    let sql = format!("{} ORDER BY n.name", select(Backend::of(c)));
    sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(c).await?.iter().map(from_row).collect()
}

pub(crate) async fn get(c: &mut Conn, name: &str) -> StoreResult<Option<NodeRow>> {
    let sql = format!("{} WHERE n.name = $1", select(Backend::of(c)));
    sqlx::query(sqlx::AssertSqlSafe(sql)).bind(name).fetch_optional(c).await?.as_ref().map(from_row).transpose()
}

/// Sets node `name`'s drain flag; `false` if there is no such node.
pub(crate) async fn set_drained(c: &mut Conn, name: &str, drained: bool) -> StoreResult<bool> {
    let done = sqlx::query("UPDATE nodes SET drained = $1 WHERE name = $2")
        .bind(i64::from(drained))
        .bind(name)
        .execute(c)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Gives node `name` the machines (and their leases) that have no owner yet: those of a database made
/// before fleets. On SQLite, one host by definition, every machine is this host's, so renaming it keeps
/// them. Returns how many machines changed hands.
pub(crate) async fn adopt(c: &mut Conn, name: &str) -> StoreResult<u64> {
    let backend = Backend::of(c);
    let whose = match backend {
        Backend::Sqlite => "node <> $1",
        Backend::Postgres => "node = ''",
    };
    let moved = sqlx::query(sqlx::AssertSqlSafe(format!("UPDATE machines SET node = $1 WHERE {whose}")))
        .bind(name)
        .execute(&mut *c)
        .await?
        .rows_affected();
    sqlx::query(sqlx::AssertSqlSafe(format!("UPDATE leases SET node = $1 WHERE {whose}")))
        .bind(name)
        .execute(&mut *c)
        .await?;
    // Free-block rows are only a shortcut to the lowest free block: those of another owner are dropped
    // rather than merged (a block below the highest lease that is free is then simply found again later).
    sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM free_blocks WHERE {whose}"))).bind(name).execute(c).await?;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::store::testing::backend_tests;

    fn reg(name: &str) -> Registration {
        Registration {
            name: name.into(),
            url: Some(format!("http://{name}:3000")),
            vcpus: 8,
            mem_mib: 16384,
            overcommit: Some(1.5),
            runtimes: vec![RuntimeKind::Container],
            labels: [("zone".to_string(), "a".to_string())].into(),
            proxy_url: Some(format!("http://{name}:4000")),
            subnet: "10.1.0.0/24".into(),
            iface_prefix: "tp".into(),
        }
    }

    async fn write<T>(store: &Store, f: impl AsyncFnOnce(&mut Conn) -> T) -> T {
        let mut tx = store.write().await.unwrap();
        let out = f(&mut tx).await;
        tx.commit().await.unwrap();
        out
    }

    backend_tests! {
        async fn nodes_register_heartbeat_drain_and_sum_their_machines(store, _db) {
            write(&store, async |c| register(c, &reg("b")).await.unwrap()).await;
            write(&store, async |c| register(c, &reg("a")).await.unwrap()).await;
            let spec = crate::store::machines::tests::spec("m1");
            write(&store, async |c| crate::store::machines::insert(c, "a", "id1", &spec, 10).await.unwrap()).await;
            let nodes = list(&mut store.read().await.unwrap()).await.unwrap();
            assert_eq!(nodes.iter().map(|n| n.reg.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
            assert_eq!(nodes[0].reg, reg("a"), "the registration round-trips");
            assert_eq!((nodes[0].machines, nodes[0].used_vcpus, nodes[0].used_mem_mib), (1, 1, 128));
            assert_eq!((nodes[1].machines, nodes[1].used_vcpus), (0, 0));
            assert!(nodes[0].heartbeat_age_ms >= 0 && nodes[0].heartbeat_age_ms < 60_000, "{}", nodes[0].heartbeat_age_ms);
            assert!(write(&store, async |c| set_drained(c, "a", true).await.unwrap()).await);
            assert!(!write(&store, async |c| set_drained(c, "nope", true).await.unwrap()).await);
            // A restart registers again: the drain flag stays.
            write(&store, async |c| register(c, &reg("a")).await.unwrap()).await;
            assert!(get(&mut store.read().await.unwrap(), "a").await.unwrap().unwrap().drained);
            assert!(write(&store, async |c| heartbeat(c, "a").await.unwrap()).await);
            assert!(!write(&store, async |c| heartbeat(c, "ghost").await.unwrap()).await);
        }

        async fn blocks_are_unique_per_node_and_reused_per_node(store, _db) {
            let spec = |n: &str| crate::store::machines::tests::spec(n);
            let a0 = write(&store, async |c| crate::store::machines::insert(c, "a", "ia0", &spec("a0"), 10).await.unwrap()).await;
            let b0 = write(&store, async |c| crate::store::machines::insert(c, "b", "ib0", &spec("b0"), 10).await.unwrap()).await;
            let a1 = write(&store, async |c| crate::store::machines::insert(c, "a", "ia1", &spec("a1"), 10).await.unwrap()).await;
            assert_eq!((a0.block, b0.block, a1.block), (0, 0, 1), "each node has its own pool");
            use hyperfleet_types::MachineStatus::Pending;
            write(&store, async |c| crate::store::machines::delete(c, "ia0", &[Pending]).await.unwrap()).await;
            let b1 = write(&store, async |c| crate::store::machines::insert(c, "b", "ib1", &spec("b1"), 10).await.unwrap()).await;
            let a2 = write(&store, async |c| crate::store::machines::insert(c, "a", "ia2", &spec("a2"), 10).await.unwrap()).await;
            assert_eq!((b1.block, a2.block), (1, 0), "a freed block is reused on its own node only");
        }

        async fn unowned_machines_are_adopted(store, _db) {
            let spec = crate::store::machines::tests::spec("old");
            write(&store, async |c| crate::store::machines::insert(c, "", "id1", &spec, 10).await.unwrap()).await;
            assert_eq!(write(&store, async |c| adopt(c, "host1").await.unwrap()).await, 1);
            let m = crate::store::machines::get(&mut store.read().await.unwrap(), "old").await.unwrap().unwrap();
            assert_eq!((m.node.as_str(), m.block), ("host1", 0));
            let n = write(&store, async |c| crate::store::leases::count(c, "host1").await.unwrap()).await;
            assert_eq!(n, 1, "its lease moved with it");
        }
    }
}
