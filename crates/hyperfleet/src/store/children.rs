//! Child machines in the store: a child's insert with its parent's quota checked in the same write
//! transaction, a machine's children, and child tokens (`hfc_` + 32 alphanumerics from the OS CSPRNG; only
//! the SHA-256 is stored, at most one per parent, deleted with it by a foreign key).

use hyperfleet_types::{MachineSpec, MachineStatus};
use rand::Rng;
use rand::distributions::Alphanumeric;

use super::dialect::{self, Backend};
use super::machines::{InsertError, MachineRecord, SELECT, from_row, insert};
use super::{Conn, StoreError, StoreResult, col, int, now};

pub(crate) const TOKEN_PREFIX: &str = "hfc_";
const TOKEN_LEN: usize = 32;

/// Why a child was not inserted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChildInsertError {
    #[error("Machine with id '{0}' not found")]
    ParentGone(String),
    /// Children are made only while their parent runs (its token is valid only then anyway).
    #[error("machine {id} is {status}: children are created only while their parent runs")]
    ParentNotRunning { id: String, status: MachineStatus },
    /// Past one of the parent's `spawn` quotas; the message says which.
    #[error("{0}")]
    Quota(String),
    #[error(transparent)]
    Insert(#[from] InsertError),
}

impl From<StoreError> for ChildInsertError {
    fn from(e: StoreError) -> Self {
        Self::Insert(InsertError::Store(e))
    }
}

/// What a parent's children take together, against its quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Usage {
    pub children: u64,
    pub vcpu: u64,
    pub mem_mib: u64,
}

/// What the children of `parent` take (every child counts until it is deleted).
pub(crate) async fn usage(c: &mut Conn, parent: &str) -> StoreResult<Usage> {
    let b = Backend::of(c);
    let sql = format!(
        // SUM of BIGINT is NUMERIC on PostgreSQL: cast back so both backends answer an i64.
        "SELECT COUNT(*) AS n, CAST(COALESCE(SUM({}), 0) AS BIGINT) AS vcpu, \
         CAST(COALESCE(SUM({}), 0) AS BIGINT) AS mem FROM machines m WHERE {} = $1",
        dialect::int_of_spec(b, "vcpu_count"),
        dialect::int_of_spec(b, "mem_size_mib"),
        dialect::parent_of_spec(b)
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(parent).fetch_one(c).await?;
    Ok(Usage {
        children: int("count", col::<i64>(&row, "n")?)?,
        vcpu: int("vcpu", col::<i64>(&row, "vcpu")?)?,
        mem_mib: int("mem", col::<i64>(&row, "mem")?)?,
    })
}

/// Inserts the child `spec` (its `parent_id` set) if its parent runs and has room for it in every quota,
/// in the caller's write transaction: the write lock makes the check and the insert one step, so two
/// concurrent creates cannot both take the last place.
pub(crate) async fn insert_child(
    c: &mut Conn,
    node: &str,
    id: &str,
    spec: &MachineSpec,
    block_count: u32,
) -> Result<MachineRecord, ChildInsertError> {
    let parent_id = spec.parent_id.clone().ok_or_else(|| ChildInsertError::Quota("a child needs a parent".into()))?;
    let parent = super::machines::get(c, &parent_id)
        .await?
        .filter(|p| p.id == parent_id)
        .ok_or_else(|| ChildInsertError::ParentGone(parent_id.clone()))?;
    if parent.status != MachineStatus::Running {
        return Err(ChildInsertError::ParentNotRunning { id: parent_id, status: parent.status });
    }
    let limits = parent
        .spec
        .spawn
        .ok_or_else(|| ChildInsertError::Quota(format!("machine {parent_id} may not create machines (no spawn)")))?;
    let used = usage(c, &parent_id).await?;
    if used.children + 1 > u64::from(limits.max_children) {
        return Err(ChildInsertError::Quota(format!(
            "quota exceeded: machine {parent_id} already has {} of its {} children (spawn.max_children)",
            used.children, limits.max_children
        )));
    }
    if used.vcpu + u64::from(spec.vcpu_count) > u64::from(limits.max_vcpu) {
        return Err(ChildInsertError::Quota(format!(
            "quota exceeded: {} more vCPUs would make {} for the children of {parent_id}; spawn.max_vcpu is {}",
            spec.vcpu_count,
            used.vcpu + u64::from(spec.vcpu_count),
            limits.max_vcpu
        )));
    }
    if used.mem_mib + u64::from(spec.mem_size_mib) > u64::from(limits.max_mem_mib) {
        return Err(ChildInsertError::Quota(format!(
            "quota exceeded: {} MiB more would make {} MiB for the children of {parent_id}; spawn.max_mem_mib is {}",
            spec.mem_size_mib,
            used.mem_mib + u64::from(spec.mem_size_mib),
            limits.max_mem_mib
        )));
    }
    Ok(insert(c, node, id, spec, block_count).await?)
}

/// The children of `parent`, oldest first.
pub(crate) async fn children(c: &mut Conn, parent: &str) -> StoreResult<Vec<MachineRecord>> {
    let sql = format!("{SELECT} WHERE {} = $1 ORDER BY m.created_at, m.id", dialect::parent_of_spec(Backend::of(c)));
    sqlx::query(sqlx::AssertSqlSafe(sql)).bind(parent).fetch_all(c).await?.iter().map(from_row).collect()
}

/// A new child token (the secret; [`set_token`] stores its hash).
pub(crate) fn generate_token() -> String {
    let body: String = rand::rngs::OsRng.sample_iter(&Alphanumeric).take(TOKEN_LEN).map(char::from).collect();
    format!("{TOKEN_PREFIX}{body}")
}

/// Whether `s` has the shape of a child token, before any lookup.
pub(crate) fn token_well_formed(s: &str) -> bool {
    s.len() == TOKEN_PREFIX.len() + TOKEN_LEN
        && s.starts_with(TOKEN_PREFIX)
        && s[TOKEN_PREFIX.len()..].bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Makes `secret` the machine's one token (replacing any older one), if the machine still exists.
pub(crate) async fn set_token(c: &mut Conn, machine_id: &str, secret: &str) -> StoreResult<bool> {
    let exists: Option<String> =
        sqlx::query_scalar("SELECT id FROM machines WHERE id = $1").bind(machine_id).fetch_optional(&mut *c).await?;
    if exists.is_none() {
        return Ok(false);
    }
    let hash = super::api_keys::hash(secret);
    sqlx::query(
        "INSERT INTO child_tokens (machine_id, token_hash, created_at) VALUES ($1, $2, $3) \
         ON CONFLICT (machine_id) DO UPDATE SET token_hash = excluded.token_hash, created_at = excluded.created_at",
    )
    .bind(machine_id)
    .bind(hash.to_vec())
    .bind(now())
    .execute(c)
    .await?;
    Ok(true)
}

/// Revokes the machine's token (none: nothing to do).
pub(crate) async fn revoke_token(c: &mut Conn, machine_id: &str) -> StoreResult<()> {
    sqlx::query("DELETE FROM child_tokens WHERE machine_id = $1").bind(machine_id).execute(c).await?;
    Ok(())
}

/// The machine whose token `secret` is. The lookup is by the whole hash (a unique index), so no secret
/// byte is ever compared.
pub(crate) async fn token_owner(c: &mut Conn, secret: &str) -> StoreResult<Option<String>> {
    if !token_well_formed(secret) {
        return Ok(None);
    }
    let hash = super::api_keys::hash(secret);
    Ok(sqlx::query_scalar("SELECT machine_id FROM child_tokens WHERE token_hash = $1")
        .bind(hash.to_vec())
        .fetch_optional(c)
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::store::machines::{self as records, Changes};
    use crate::store::testing::backend_tests;
    use hyperfleet_types::SpawnLimits;

    fn parent_spec() -> MachineSpec {
        MachineSpec {
            spawn: Some(SpawnLimits { max_children: 2, max_vcpu: 3, max_mem_mib: 512 }),
            ..records::tests::spec("parent")
        }
    }

    fn child(name: &str, vcpu: u32, mem: u32) -> MachineSpec {
        MachineSpec { vcpu_count: vcpu, mem_size_mib: mem, parent_id: Some("p".into()), ..records::tests::spec(name) }
    }

    async fn try_child(store: &Store, name: &str, vcpu: u32, mem: u32) -> Result<MachineRecord, ChildInsertError> {
        let mut tx = store.write().await.unwrap();
        let r = insert_child(&mut tx, "n1", name, &child(name, vcpu, mem), 1024).await;
        if r.is_ok() {
            tx.commit().await.unwrap();
        }
        r
    }

    async fn move_to(store: &Store, id: &str, path: &[MachineStatus]) {
        let mut tx = store.write().await.unwrap();
        for w in path.windows(2) {
            records::transition(&mut tx, id, &[w[0]], w[1], &Changes::default()).await.unwrap();
        }
        tx.commit().await.unwrap();
    }

    async fn running_parent(store: &Store) {
        let mut tx = store.write().await.unwrap();
        records::insert(&mut tx, "n1", "p", &parent_spec(), 1024).await.unwrap();
        tx.commit().await.unwrap();
        use MachineStatus::*;
        move_to(store, "p", &[Pending, Starting, Running]).await;
    }

    backend_tests! {
        async fn quotas_are_checked_in_the_insert(store, _db) {
            let e = try_child(&store, "c0", 1, 64).await.unwrap_err();
            assert!(matches!(e, ChildInsertError::ParentGone(_)), "{e}");
            let mut tx = store.write().await.unwrap();
            records::insert(&mut tx, "n1", "p", &parent_spec(), 1024).await.unwrap();
            tx.commit().await.unwrap();
            let e = try_child(&store, "c0", 1, 64).await.unwrap_err();
            assert!(matches!(e, ChildInsertError::ParentNotRunning { .. }), "{e}");
            use MachineStatus::*;
            move_to(&store, "p", &[Pending, Starting, Running]).await;

            try_child(&store, "c1", 1, 128).await.unwrap();
            let e = try_child(&store, "c2", 3, 128).await.unwrap_err().to_string();
            assert!(e.contains("spawn.max_vcpu is 3"), "{e}");
            let e = try_child(&store, "c2", 1, 512).await.unwrap_err().to_string();
            assert!(e.contains("640 MiB") && e.contains("spawn.max_mem_mib is 512"), "{e}");
            try_child(&store, "c2", 2, 384).await.unwrap();
            let e = try_child(&store, "c3", 1, 4).await.unwrap_err().to_string();
            assert!(e.contains("already has 2 of its 2 children"), "{e}");
            let mut r = store.read().await.unwrap();
            assert_eq!(usage(&mut r, "p").await.unwrap(), Usage { children: 2, vcpu: 3, mem_mib: 512 });
            let names: Vec<String> = children(&mut r, "p").await.unwrap().into_iter().map(|m| m.spec.name).collect();
            assert_eq!(names, ["c1", "c2"]);
            assert!(children(&mut r, "c1").await.unwrap().is_empty());
            drop(r);

            // A deleted child gives its place back.
            let mut tx = store.write().await.unwrap();
            records::delete(&mut tx, "c1", &[Pending]).await.unwrap();
            tx.commit().await.unwrap();
            try_child(&store, "c3", 1, 128).await.unwrap();
        }

        async fn concurrent_creates_never_pass_max_children(store, db) {
            running_parent(&store).await;
            // Each create on its own store handle (as another daemon would be): only the write lock keeps
            // them apart.
            let mut tasks = Vec::new();
            for i in 0..8 {
                let other = db.reopen().await;
                tasks.push(tokio::spawn(async move {
                    let name = format!("k{i}");
                    try_child(&other, &name, 1, 64).await.is_ok()
                }));
            }
            let mut ok = 0;
            for t in tasks {
                ok += usize::from(t.await.unwrap());
            }
            assert_eq!(ok, 2, "max_children is 2");
            assert_eq!(usage(&mut store.read().await.unwrap(), "p").await.unwrap().children, 2);
        }

        async fn tokens_are_hashed_replaced_and_go_with_their_machine(store, _db) {
            let t = generate_token();
            assert!(token_well_formed(&t) && !crate::store::api_keys::well_formed(&t), "{t}");
            let mut tx = store.write().await.unwrap();
            assert!(!set_token(&mut tx, "p", &t).await.unwrap(), "no machine, no token");
            drop(tx);
            running_parent(&store).await;
            let mut tx = store.write().await.unwrap();
            assert!(set_token(&mut tx, "p", &t).await.unwrap());
            tx.commit().await.unwrap();
            assert_eq!(token_owner(&mut store.read().await.unwrap(), &t).await.unwrap().as_deref(), Some("p"));
            let stored: Vec<u8> = sqlx::query_scalar("SELECT token_hash FROM child_tokens")
                .fetch_one(&mut *store.read().await.unwrap())
                .await
                .unwrap();
            assert_eq!(stored, crate::store::api_keys::hash(&t).to_vec(), "only the hash is stored");
            let newer = generate_token();
            let mut tx = store.write().await.unwrap();
            set_token(&mut tx, "p", &newer).await.unwrap();
            tx.commit().await.unwrap();
            let mut r = store.read().await.unwrap();
            assert_eq!(token_owner(&mut r, &t).await.unwrap(), None, "rotated: the old token is gone");
            assert_eq!(token_owner(&mut r, &newer).await.unwrap().as_deref(), Some("p"));
            assert_eq!(token_owner(&mut r, "hf_notachildtoken").await.unwrap(), None);
            drop(r);
            let mut tx = store.write().await.unwrap();
            revoke_token(&mut tx, "p").await.unwrap();
            tx.commit().await.unwrap();
            assert_eq!(token_owner(&mut store.read().await.unwrap(), &newer).await.unwrap(), None);
            let mut tx = store.write().await.unwrap();
            set_token(&mut tx, "p", &newer).await.unwrap();
            tx.commit().await.unwrap();
            use MachineStatus::*;
            move_to(&store, "p", &[Running, Stopping, Stopped]).await;
            let mut tx = store.write().await.unwrap();
            records::delete(&mut tx, "p", &[Stopped]).await.unwrap();
            tx.commit().await.unwrap();
            assert_eq!(token_owner(&mut store.read().await.unwrap(), &newer).await.unwrap(), None, "deleted with its machine");
        }
    }
}
