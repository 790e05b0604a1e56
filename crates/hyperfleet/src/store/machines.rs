//! The `machines` table. State changes are compare-and-set (read the status, change it only if it is one of
//! those expected, under the write lock of [`super::Store::write`]), so two requests for one machine can
//! never both act.

use hyperfleet_types::{MachineSpec, MachineStatus, RuntimeKind, timestamp};
use sqlx::any::AnyRow;
use time::OffsetDateTime;

use super::dialect::{self, Backend};
use super::leases::{self, LeaseError};
use super::{Conn, StoreError, StoreResult, col, int, now, opt_time_col, time_col};

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
    /// The fleet node that owns the machine: the only one that acts on it.
    pub node: String,
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
     m.updated_at, m.expires_at, m.idle_since, m.node, l.block FROM machines m JOIN leases l ON l.machine_id = m.id";

const BY_ID: &str = "SELECT m.id, m.spec, m.status, m.socket_path, m.pid, m.error_message, m.created_at, \
     m.updated_at, m.expires_at, m.idle_since, m.node, l.block FROM machines m JOIN leases l ON l.machine_id = m.id \
     WHERE m.id = $1";

/// By id, or else by name (an id match first, should a name ever equal another machine's id).
const BY_ID_OR_NAME: &str = "SELECT m.id, m.spec, m.status, m.socket_path, m.pid, m.error_message, m.created_at, \
     m.updated_at, m.expires_at, m.idle_since, m.node, l.block FROM machines m JOIN leases l ON l.machine_id = m.id \
     WHERE m.id = $1 OR m.name = $1 ORDER BY CASE WHEN m.id = $1 THEN 0 ELSE 1 END LIMIT 1";

fn opt_time(t: Option<OffsetDateTime>) -> Option<String> {
    t.map(timestamp::format)
}

pub(super) fn from_row(row: &AnyRow) -> StoreResult<MachineRecord> {
    let spec: String = col(row, "spec")?;
    let status: String = col(row, "status")?;
    let pid: Option<i64> = col(row, "pid")?;
    Ok(MachineRecord {
        id: col(row, "id")?,
        spec: serde_json::from_str(&spec).map_err(|e| StoreError::Corrupt(format!("column spec: {e}")))?,
        status: MachineStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("column status: unknown status '{status}'")))?,
        socket_path: col(row, "socket_path")?,
        pid: pid.map(|p| int("pid", p)).transpose()?,
        error_message: col(row, "error_message")?,
        created_at: time_col(row, "created_at")?,
        updated_at: time_col(row, "updated_at")?,
        block: int("block", col::<i64>(row, "block")?)?,
        expires_at: opt_time_col(row, "expires_at")?,
        idle_since: opt_time_col(row, "idle_since")?,
        node: col(row, "node")?,
    })
}

fn spec_json(spec: &MachineSpec) -> StoreResult<String> {
    serde_json::to_string(spec).map_err(|e| StoreError::Corrupt(format!("machine spec: {e}")))
}

async fn by_id(c: &mut Conn, id: &str) -> StoreResult<Option<MachineRecord>> {
    sqlx::query(BY_ID).bind(id).fetch_optional(c).await?.as_ref().map(from_row).transpose()
}

async fn all(c: &mut Conn, sql: String, args: Vec<String>) -> StoreResult<Vec<MachineRecord>> {
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for a in args {
        q = q.bind(a);
    }
    q.fetch_all(c).await?.iter().map(from_row).collect()
}

/// `$from, $from+1, …` for `n` values.
fn marks(from: usize, n: usize) -> String {
    (from..from + n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

/// Inserts the machine, owned by `node`, and leases it the lowest free block of that node (in the caller's
/// write transaction).
pub async fn insert(
    c: &mut Conn,
    node: &str,
    id: &str,
    spec: &MachineSpec,
    block_count: u32,
) -> Result<MachineRecord, InsertError> {
    let ts = now();
    let json = spec_json(spec)?;
    // A taken name inserts nothing (rather than failing: on PostgreSQL a failed statement aborts the whole
    // transaction). The write lock makes this check-and-insert one step; the UNIQUE constraint decides.
    let inserted = sqlx::query(
        "INSERT INTO machines (id, name, status, spec, created_at, updated_at, node, vcpus, mem_mib) \
         VALUES ($1, $2, 'pending', $3, $4, $4, $5, $6, $7) ON CONFLICT (name) DO NOTHING",
    )
    .bind(id)
    .bind(&spec.name)
    .bind(&json)
    .bind(&ts)
    .bind(node)
    .bind(i64::from(spec.vcpu_count))
    .bind(i64::from(spec.mem_size_mib))
    .execute(&mut *c)
    .await
    .map_err(StoreError::from)?;
    if inserted.rows_affected() == 0 {
        return Err(InsertError::NameTaken(spec.name.clone()));
    }
    let block = leases::allocate(c, node, id, block_count).await?;
    // The record as a read would return it (the spec from the JSON just stored), without reading it back.
    let created_at = timestamp::parse(&ts).ok_or_else(|| StoreError::Corrupt(format!("time '{ts}'")))?;
    Ok(MachineRecord {
        id: id.to_string(),
        spec: serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(format!("machine spec: {e}")))?,
        status: MachineStatus::Pending,
        socket_path: None,
        pid: None,
        error_message: None,
        created_at,
        updated_at: created_at,
        block,
        expires_at: None,
        idle_since: None,
        node: node.to_string(),
    })
}

/// Looks a machine up by id, or else by name. (Names shaped like ids are refused at create, so the two
/// cannot name different machines.)
pub async fn get(c: &mut Conn, id_or_name: &str) -> StoreResult<Option<MachineRecord>> {
    sqlx::query(BY_ID_OR_NAME).bind(id_or_name).fetch_optional(c).await?.as_ref().map(from_row).transpose()
}

/// A page of machines (oldest first) and the number matching the filter.
pub async fn list(
    c: &mut Conn,
    status: Option<MachineStatus>,
    limit: u32,
    offset: u64,
) -> StoreResult<(Vec<MachineRecord>, u64)> {
    let (filter, args): (&str, Vec<String>) = match status {
        Some(s) => ("WHERE m.status = $1", vec![s.as_str().to_string()]),
        None => ("", vec![]),
    };
    let mut count =
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM machines m {filter}")));
    for a in &args {
        count = count.bind(a.clone());
    }
    let total = int("count", count.fetch_one(&mut *c).await?)?;
    let rows =
        all(c, format!("{SELECT} {filter} ORDER BY m.created_at, m.id LIMIT {limit} OFFSET {offset}"), args).await?;
    Ok((rows, total))
}

/// Every machine id.
pub async fn ids(c: &mut Conn) -> StoreResult<Vec<String>> {
    Ok(sqlx::query_scalar("SELECT id FROM machines").fetch_all(c).await?)
}

/// How many machines there are of each status and runtime.
pub(crate) async fn counts(c: &mut Conn) -> StoreResult<Vec<(MachineStatus, RuntimeKind, u64)>> {
    let sql = format!(
        "SELECT status, {} AS runtime, COUNT(*) AS n FROM machines GROUP BY 1, 2",
        dialect::runtime_of_spec(Backend::of(c))
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(c).await?;
    let mut out = Vec::new();
    for row in rows {
        let status: String = col(&row, "status")?;
        let runtime: Option<String> = col(&row, "runtime")?;
        let n: i64 = col(&row, "n")?;
        let status = MachineStatus::parse(&status).ok_or_else(|| StoreError::Corrupt(format!("status '{status}'")))?;
        let runtime = runtime
            .as_deref()
            .and_then(RuntimeKind::parse)
            .ok_or_else(|| StoreError::Corrupt(format!("runtime {runtime:?}")))?;
        out.push((status, runtime, u64::try_from(n).unwrap_or(0)));
    }
    Ok(out)
}

/// Machines of `node` in any of `statuses`.
pub async fn with_status(c: &mut Conn, node: &str, statuses: &[MachineStatus]) -> StoreResult<Vec<MachineRecord>> {
    let sql = format!("{SELECT} WHERE m.node = $1 AND m.status IN ({}) ORDER BY l.block", marks(2, statuses.len()));
    let mut args = vec![node.to_string()];
    args.extend(statuses.iter().map(|s| s.as_str().to_string()));
    all(c, sql, args).await
}

/// A bound value of [`transition`]'s dynamic UPDATE.
enum Arg {
    Text(Option<String>),
    Int(Option<i64>),
}

/// Moves machine `id` to `to` if its status is one of `from`, applying `changes` in the same statement (in
/// the caller's write transaction). A start that a volume refuses changes nothing.
pub async fn transition(
    c: &mut Conn,
    id: &str,
    from: &[MachineStatus],
    to: MachineStatus,
    changes: &Changes,
) -> StoreResult<Cas> {
    let Some(before) = by_id(c, id).await? else {
        return Ok(Cas::Missing);
    };
    if !from.contains(&before.status) {
        return Ok(Cas::WrongState(before));
    }
    // Taking a volume is part of the same transaction as becoming `starting`: two starts cannot both take it.
    if to == MachineStatus::Starting
        && let Err(busy) = super::volumes::check_free(c, &before).await?
    {
        return Ok(Cas::VolumeBusy(busy));
    }
    let mut sets = vec!["status = $1".to_string(), "updated_at = $2".to_string()];
    let mut args: Vec<Arg> = vec![Arg::Text(Some(to.as_str().to_string())), Arg::Text(Some(now()))];
    let mut push = |col: &str, v: Arg| {
        args.push(v);
        sets.push(format!("{col} = ${}", args.len()));
    };
    if let Some(pid) = changes.pid {
        push("pid", Arg::Int(pid.map(i64::from)));
    }
    if let Some(sock) = &changes.socket_path {
        push("socket_path", Arg::Text(sock.clone()));
    }
    if let Some(t) = changes.expires_at {
        push("expires_at", Arg::Text(opt_time(t)));
    }
    if let Some(t) = changes.idle_since {
        push("idle_since", Arg::Text(opt_time(t)));
    }
    if let Some(msg) = &changes.error_message {
        push("error_message", Arg::Text(msg.clone()));
    } else if to != MachineStatus::Failed {
        // A machine that leaves `failed` no longer carries the old error.
        sets.push("error_message = NULL".into());
    }
    args.push(Arg::Text(Some(id.to_string())));
    let sql = format!("UPDATE machines SET {} WHERE id = ${}", sets.join(", "), args.len());
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for a in args {
        q = match a {
            Arg::Text(t) => q.bind(t),
            Arg::Int(i) => q.bind(i),
        };
    }
    q.execute(&mut *c).await?;
    let rec = by_id(c, id).await?.ok_or_else(|| StoreError::Corrupt(format!("machine {id} vanished")))?;
    Ok(Cas::Done(rec))
}

/// Deletes machine `id` and frees its block if its status is one of `from` (in the caller's write transaction).
pub async fn delete(c: &mut Conn, id: &str, from: &[MachineStatus]) -> StoreResult<Cas> {
    let Some(rec) = by_id(c, id).await? else {
        return Ok(Cas::Missing);
    };
    if !from.contains(&rec.status) {
        return Ok(Cas::WrongState(rec));
    }
    leases::release(c, id).await?;
    sqlx::query("DELETE FROM machine_secrets WHERE machine_id = $1").bind(id).execute(&mut *c).await?;
    sqlx::query("DELETE FROM machines WHERE id = $1").bind(id).execute(&mut *c).await?;
    Ok(Cas::Done(rec))
}

/// Result of [`modify_spec`].
#[derive(Debug)]
pub enum Modify<E> {
    Done(Box<MachineRecord>),
    Missing,
    Refused(E),
}

/// Reads the machine's spec and status, lets `f` change the spec (or refuse), and writes it back, in the
/// caller's write transaction: no other change to the machine can land in between.
pub async fn modify_spec<E>(
    c: &mut Conn,
    id: &str,
    f: impl FnOnce(&mut MachineSpec, MachineStatus) -> Result<(), E>,
) -> StoreResult<Modify<E>> {
    let Some(mut rec) = by_id(c, id).await? else {
        return Ok(Modify::Missing);
    };
    if let Err(e) = f(&mut rec.spec, rec.status) {
        return Ok(Modify::Refused(e));
    }
    sqlx::query("UPDATE machines SET spec = $1, updated_at = $2, vcpus = $3, mem_mib = $4 WHERE id = $5")
        .bind(spec_json(&rec.spec)?)
        .bind(now())
        .bind(i64::from(rec.spec.vcpu_count))
        .bind(i64::from(rec.spec.mem_size_mib))
        .bind(id)
        .execute(&mut *c)
        .await?;
    let rec = by_id(c, id).await?.ok_or_else(|| StoreError::Corrupt(format!("machine {id} vanished")))?;
    Ok(Modify::Done(Box::new(rec)))
}

/// Sets a machine's deadlines if it is in one of `statuses` (a keepalive or a policy change must not give
/// a stopped machine a deadline); `None` if it is gone or in another state.
pub async fn set_deadlines(
    c: &mut Conn,
    id: &str,
    statuses: &[MachineStatus],
    expires_at: Option<OffsetDateTime>,
    idle_since: Option<OffsetDateTime>,
) -> StoreResult<Option<MachineRecord>> {
    let sql = format!(
        "UPDATE machines SET expires_at = $1, idle_since = $2 WHERE id = $3 AND status IN ({})",
        marks(4, statuses.len())
    );
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(opt_time(expires_at)).bind(opt_time(idle_since)).bind(id);
    for s in statuses {
        q = q.bind(s.as_str());
    }
    if q.execute(&mut *c).await?.rows_affected() == 0 {
        return Ok(None);
    }
    by_id(c, id).await
}

/// Records activity: moves `idle_since` forward on a running machine that has one.
pub async fn touch(c: &mut Conn, id: &str, at: OffsetDateTime) -> StoreResult<()> {
    sqlx::query(
        "UPDATE machines SET idle_since = $1 WHERE id = $2 AND status = 'running' AND idle_since IS NOT NULL \
         AND idle_since < $1",
    )
    .bind(timestamp::format(at))
    .bind(id)
    .execute(c)
    .await?;
    Ok(())
}

/// Machines of `node` with a deadline: the timer's work list after a restart.
pub async fn with_deadlines(c: &mut Conn, node: &str) -> StoreResult<Vec<MachineRecord>> {
    let sql = format!("{SELECT} WHERE m.node = $1 AND (m.expires_at IS NOT NULL OR m.idle_since IS NOT NULL)");
    all(c, sql, vec![node.to_string()]).await
}

/// Replaces a machine's secrets (in the caller's write transaction).
pub async fn set_secrets(
    c: &mut Conn,
    id: &str,
    secrets: &std::collections::BTreeMap<String, String>,
) -> StoreResult<()> {
    sqlx::query("DELETE FROM machine_secrets WHERE machine_id = $1").bind(id).execute(&mut *c).await?;
    for (k, v) in secrets {
        sqlx::query("INSERT INTO machine_secrets (machine_id, name, value) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(k)
            .bind(v.as_bytes().to_vec())
            .execute(&mut *c)
            .await?;
    }
    Ok(())
}

/// A machine's secrets, to put in a command's environment.
pub async fn secrets(c: &mut Conn, id: &str) -> StoreResult<std::collections::BTreeMap<String, String>> {
    let rows =
        sqlx::query("SELECT name, value FROM machine_secrets WHERE machine_id = $1").bind(id).fetch_all(c).await?;
    rows.iter()
        .map(|r| {
            let v: Vec<u8> = col(r, "value")?;
            Ok((col::<String>(r, "name")?, String::from_utf8_lossy(&v).into_owned()))
        })
        .collect()
}

/// A small valid spec (a container, 1 vCPU, 128 MiB) for store tests and the store benchmarks.
pub fn example_spec(name: &str) -> MachineSpec {
    MachineSpec {
        name: name.into(),
        runtime: hyperfleet_types::RuntimeKind::Container,
        vcpu_count: 1,
        mem_size_mib: 128,
        kernel_image_path: "k".into(),
        kernel_args: "a".into(),
        rootfs_path: "r".into(),
        exposed_ports: vec![80],
        network: hyperfleet_types::MachineNetwork {
            prefix_len: None,
            gateway: None,
            dns: vec![std::net::Ipv4Addr::new(10, 0, 0, 1)],
            egress: hyperfleet_types::EgressPolicy::Deny,
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::Location;
    use crate::store::testing::backend_tests;
    use MachineStatus::*;
    use hyperfleet_types::{EgressPolicy, RuntimeKind};

    pub(crate) use super::example_spec as spec;

    async fn commit<T>(store: &crate::store::Store, f: impl AsyncFnOnce(&mut crate::store::Conn) -> T) -> T {
        let mut tx = store.write().await.unwrap();
        let out = f(&mut tx).await;
        tx.commit().await.unwrap();
        out
    }

    backend_tests! {
        async fn text_the_database_cannot_hold_is_the_requests_fault(store, db) {
            // SQLite holds a NUL byte in text; PostgreSQL refuses it, which the API answers as a 400.
            let mut r = store.read().await.unwrap();
            match get(&mut r, "a\0b").await {
                Ok(found) => assert!(matches!(db.location, Location::Sqlite(_)) && found.is_none()),
                Err(e) => assert!(matches!(db.location, Location::Postgres(_)) && e.is_bad_input() && !e.is_unavailable(), "{e}"),
            }
        }

        async fn insert_get_list_delete(store, _db) {
            let a = commit(&store, async |c| insert(c, "n1", "ida", &spec("alpha"), 10).await.unwrap()).await;
            assert_eq!((a.block, a.status, a.spec.network.egress.clone()), (0, Pending, EgressPolicy::Deny));
            assert_eq!(a.spec, spec("alpha"), "the spec round-trips");
            let taken = commit(&store, async |c| insert(c, "n1", "idb", &spec("alpha"), 10).await).await;
            assert!(matches!(taken, Err(InsertError::NameTaken(_))));
            let b = commit(&store, async |c| insert(c, "n1", "idb", &spec("beta"), 10).await.unwrap()).await;
            assert_eq!(b.block, 1, "the failed insert leased nothing");
            let mut r = store.read().await.unwrap();
            assert_eq!(get(&mut r, "beta").await.unwrap().unwrap().id, "idb");
            assert_eq!(get(&mut r, "ida").await.unwrap().unwrap(), a);
            let (page, total) = list(&mut r, None, 1, 1).await.unwrap();
            assert_eq!((page.len(), page[0].id.as_str(), total), (1, "idb", 2));
            let (page, total) = list(&mut r, Some(Running), 50, 0).await.unwrap();
            assert_eq!((page.len(), total), (0, 0));
            let counts = counts(&mut r).await.unwrap();
            assert_eq!(counts, vec![(Pending, RuntimeKind::Container, 2)]);
            drop(r);
            assert!(matches!(commit(&store, async |c| delete(c, "ida", &[Pending]).await.unwrap()).await, Cas::Done(_)));
            assert!(matches!(commit(&store, async |c| delete(c, "ida", &[Pending]).await.unwrap()).await, Cas::Missing));
        }

        async fn transition_is_compare_and_set(store, _db) {
            commit(&store, async |c| insert(c, "n1", "id1", &spec("m1"), 10).await.unwrap()).await;
            let ch = Changes { pid: Some(Some(42)), ..Default::default() };
            let mut c = store.write().await.unwrap();
            let Cas::Done(r) = transition(&mut c, "id1", &[Pending, Stopped], Starting, &ch).await.unwrap() else { panic!() };
            assert_eq!((r.status, r.pid), (Starting, Some(42)));
            // A second start finds it no longer pending.
            let Cas::WrongState(r) = transition(&mut c, "id1", &[Pending, Stopped], Starting, &ch).await.unwrap() else { panic!() };
            assert_eq!(r.status, Starting);
            let failed = Changes { error_message: Some(Some("boom".into())), ..Changes::process_gone() };
            let Cas::Done(r) = transition(&mut c, "id1", &[Starting], Failed, &failed).await.unwrap() else { panic!() };
            assert_eq!((r.pid, r.error_message.as_deref()), (None, Some("boom")));
            let Cas::Done(r) = transition(&mut c, "id1", &[Failed], Starting, &Changes::default()).await.unwrap() else { panic!() };
            assert_eq!(r.error_message, None);
            assert!(matches!(transition(&mut c, "nope", &[Pending], Starting, &ch).await.unwrap(), Cas::Missing));
            c.commit().await.unwrap();
            let r = get(&mut store.read().await.unwrap(), "m1").await.unwrap().unwrap();
            assert_eq!(r.status, Starting, "committed");
        }

        async fn secrets_and_deadlines_round_trip(store, _db) {
            commit(&store, async |c| insert(c, "n1", "id1", &spec("m1"), 10).await.unwrap()).await;
            let secrets: std::collections::BTreeMap<String, String> = [("TOKEN".to_string(), "s3cret".to_string())].into();
            commit(&store, async |c| set_secrets(c, "id1", &secrets).await.unwrap()).await;
            assert_eq!(super::secrets(&mut store.read().await.unwrap(), "id1").await.unwrap(), secrets);
            let at = timestamp::parse("2030-01-01T00:00:00.000Z").unwrap();
            let none = commit(&store, async |c| set_deadlines(c, "id1", &[Running], Some(at), None).await.unwrap()).await;
            assert!(none.is_none(), "a pending machine gets no deadline");
            let set = commit(&store, async |c| set_deadlines(c, "id1", &[Pending], Some(at), Some(at)).await.unwrap()).await;
            assert_eq!(set.unwrap().expires_at, Some(at));
            let listed = with_deadlines(&mut store.read().await.unwrap(), "n1").await.unwrap();
            assert_eq!(listed.len(), 1);
        }

        async fn concurrent_creates_never_share_a_name_or_a_block(store, db) {
            // Two handles on one database (two daemons on PostgreSQL), 8 creates each, 3 names, 2 blocks.
            let other = db.reopen().await;
            let tasks = (0..16).map(|i| {
                let s = if i % 2 == 0 { store.clone() } else { other.clone() };
                tokio::spawn(async move {
                    let mut tx = s.write().await.unwrap();
                    let r = insert(&mut tx, "n1", &format!("id{i}"), &spec(&format!("n{}", i % 3)), 2).await;
                    if r.is_ok() {
                        tx.commit().await.unwrap();
                    }
                    r
                })
            });
            let results = futures::future::join_all(tasks).await;
            let (mut made, mut exhausted, mut taken) = (vec![], 0, 0);
            for r in results {
                match r.unwrap() {
                    Ok(m) => made.push(m),
                    Err(InsertError::Lease(LeaseError::Exhausted(2))) => exhausted += 1,
                    Err(InsertError::NameTaken(_)) => taken += 1,
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!(made.len(), 2, "one per name while blocks last");
            assert!(exhausted >= 1 && exhausted + taken == 14, "{exhausted} exhausted, {taken} taken");
            let mut blocks: Vec<u32> = made.iter().map(|m| m.block).collect();
            blocks.sort();
            assert_eq!(blocks, [0, 1]);
            let (all, total) = list(&mut store.read().await.unwrap(), None, 100, 0).await.unwrap();
            assert_eq!((all.len(), total), (2, 2));
            other.close().await;
        }
    }
}
