//! Child machines in the store: a child's insert with its parent's quota checked in the same transaction,
//! a machine's children, and child tokens (`hfc_` + 32 alphanumerics from the OS CSPRNG; only the SHA-256 is
//! stored, at most one per parent, deleted with it).

use hyperfleet_types::{MachineSpec, MachineStatus};
use rand::Rng;
use rand::distributions::Alphanumeric;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::machines::{InsertError, MachineRecord, SELECT, from_row, insert_in};
use super::{StoreError, StoreResult, now};

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

impl From<rusqlite::Error> for ChildInsertError {
    fn from(e: rusqlite::Error) -> Self {
        Self::from(StoreError::from(e))
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
pub(crate) fn usage(conn: &Connection, parent: &str) -> StoreResult<Usage> {
    Ok(conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(json_extract(spec, '$.vcpu_count')), 0), \
         COALESCE(SUM(json_extract(spec, '$.mem_size_mib')), 0) FROM machines \
         WHERE json_extract(spec, '$.parent_id') = ?1",
        [parent],
        |r| {
            let n = |i| r.get::<_, i64>(i).map(|v| u64::try_from(v).unwrap_or(0));
            Ok(Usage { children: n(0)?, vcpu: n(1)?, mem_mib: n(2)? })
        },
    )?)
}

/// Inserts the child `spec` (its `parent_id` set) if its parent runs and has room for it in every quota,
/// all in one transaction: two concurrent creates cannot both take the last place.
pub(crate) fn insert_child(
    conn: &mut Connection,
    id: &str,
    spec: &MachineSpec,
    block_count: u32,
) -> Result<MachineRecord, ChildInsertError> {
    let parent_id = spec.parent_id.clone().ok_or_else(|| ChildInsertError::Quota("a child needs a parent".into()))?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let parent = tx
        .query_row(&format!("{SELECT} WHERE m.id = ?1"), [&parent_id], from_row)
        .optional()?
        .ok_or_else(|| ChildInsertError::ParentGone(parent_id.clone()))?;
    if parent.status != MachineStatus::Running {
        return Err(ChildInsertError::ParentNotRunning { id: parent_id, status: parent.status });
    }
    let limits = parent
        .spec
        .spawn
        .ok_or_else(|| ChildInsertError::Quota(format!("machine {parent_id} may not create machines (no spawn)")))?;
    let used = usage(&tx, &parent_id)?;
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
    let rec = insert_in(&tx, id, spec, block_count)?;
    tx.commit()?;
    Ok(rec)
}

/// The children of `parent`, oldest first.
pub(crate) fn children(conn: &Connection, parent: &str) -> StoreResult<Vec<MachineRecord>> {
    let sql = format!("{SELECT} WHERE json_extract(m.spec, '$.parent_id') = ?1 ORDER BY m.created_at, m.id");
    Ok(conn.prepare_cached(&sql)?.query_map([parent], from_row)?.collect::<Result<Vec<_>, _>>()?)
}

/// A new child token (the secret; store its [`super::api_keys::hash`] with [`set_token`]).
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
pub(crate) fn set_token(conn: &Connection, machine_id: &str, secret: &str) -> StoreResult<bool> {
    let hash = super::api_keys::hash(secret);
    let n = conn.execute(
        "INSERT INTO child_tokens (machine_id, token_hash, created_at) SELECT ?1, ?2, ?3 \
         WHERE EXISTS (SELECT 1 FROM machines WHERE id = ?1) \
         ON CONFLICT (machine_id) DO UPDATE SET token_hash = excluded.token_hash, created_at = excluded.created_at",
        params![machine_id, &hash[..], now()],
    )?;
    Ok(n > 0)
}

/// Revokes the machine's token (none: nothing to do).
pub(crate) fn revoke_token(conn: &Connection, machine_id: &str) -> StoreResult<()> {
    conn.execute("DELETE FROM child_tokens WHERE machine_id = ?1", [machine_id])?;
    Ok(())
}

/// The machine whose token `secret` is. The lookup is by the whole hash (a unique index), so no secret
/// byte is ever compared.
pub(crate) fn token_owner(conn: &Connection, secret: &str) -> StoreResult<Option<String>> {
    if !token_well_formed(secret) {
        return Ok(None);
    }
    let hash = super::api_keys::hash(secret);
    Ok(conn
        .prepare_cached("SELECT machine_id FROM child_tokens WHERE token_hash = ?1")?
        .query_row([&hash[..]], |r| r.get(0))
        .optional()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::machines::{self as records, Changes};
    use crate::store::temp_store;
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

    fn running_parent(c: &mut Connection) {
        records::insert(c, "p", &parent_spec(), 1024).unwrap();
        for to in [MachineStatus::Starting, MachineStatus::Running] {
            let from = [MachineStatus::Pending, MachineStatus::Starting];
            records::transition(c, "p", &from, to, &Changes::default()).unwrap();
        }
    }

    #[test]
    fn quotas_are_checked_in_the_insert() {
        let (_d, store) = temp_store();
        store
            .call_blocking(|c| {
                let e = insert_child(c, "c0", &child("c0", 1, 64), 1024).unwrap_err();
                assert!(matches!(e, ChildInsertError::ParentGone(_)), "{e}");
                records::insert(c, "p", &parent_spec(), 1024).unwrap();
                let e = insert_child(c, "c0", &child("c0", 1, 64), 1024).unwrap_err();
                assert!(matches!(e, ChildInsertError::ParentNotRunning { .. }), "{e}");
                records::delete(c, "p", &[MachineStatus::Pending])?;
                running_parent(c);

                insert_child(c, "c1", &child("c1", 1, 128), 1024).unwrap();
                let e = insert_child(c, "c2", &child("c2", 3, 128), 1024).unwrap_err().to_string();
                assert!(e.contains("spawn.max_vcpu is 3"), "{e}");
                let e = insert_child(c, "c2", &child("c2", 1, 512), 1024).unwrap_err().to_string();
                assert!(e.contains("640 MiB") && e.contains("spawn.max_mem_mib is 512"), "{e}");
                insert_child(c, "c2", &child("c2", 2, 384), 1024).unwrap();
                let e = insert_child(c, "c3", &child("c3", 1, 4), 1024).unwrap_err().to_string();
                assert!(e.contains("already has 2 of its 2 children"), "{e}");
                assert_eq!(usage(c, "p")?, Usage { children: 2, vcpu: 3, mem_mib: 512 });
                let names: Vec<String> = children(c, "p")?.into_iter().map(|m| m.spec.name).collect();
                assert_eq!(names, ["c1", "c2"]);
                assert!(children(c, "c1")?.is_empty());

                // A deleted child gives its place back.
                records::delete(c, "c1", &[MachineStatus::Pending])?;
                insert_child(c, "c3", &child("c3", 1, 128), 1024).unwrap();
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn concurrent_creates_never_pass_max_children() {
        let (dir, store) = temp_store();
        store
            .call_blocking(|c| {
                running_parent(c);
                Ok(())
            })
            .unwrap();
        // Each thread on its own connection to the same file: nothing but the transaction keeps them apart.
        let path = dir.path().join("test.db");
        let ok: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let path = path.clone();
                    s.spawn(move || {
                        let mut c = Connection::open(&path).unwrap();
                        c.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
                        let name = format!("k{i}");
                        usize::from(insert_child(&mut c, &name, &child(&name, 1, 64), 1024).is_ok())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(ok, 2, "max_children is 2");
        let n = store.call_blocking(|c| Ok(usage(c, "p")?.children)).unwrap();
        assert_eq!(n, 2);
    }

    #[test]
    fn tokens_are_hashed_replaced_and_go_with_their_machine() {
        let (_d, store) = temp_store();
        store
            .call_blocking(|c| {
                let t = generate_token();
                assert!(token_well_formed(&t) && !super::super::api_keys::well_formed(&t), "{t}");
                assert!(!set_token(c, "p", &t)?, "no machine, no token");
                running_parent(c);
                assert!(set_token(c, "p", &t)?);
                assert_eq!(token_owner(c, &t)?.as_deref(), Some("p"));
                let raw: i64 = c.query_row(
                    "SELECT COUNT(*) FROM child_tokens WHERE token_hash = ?1 OR CAST(token_hash AS TEXT) = ?1",
                    [&t],
                    |r| r.get(0),
                )?;
                assert_eq!(raw, 0, "the secret itself is never stored");
                let newer = generate_token();
                set_token(c, "p", &newer)?;
                assert_eq!(token_owner(c, &t)?, None, "rotated: the old token is gone");
                assert_eq!(token_owner(c, &newer)?.as_deref(), Some("p"));
                assert_eq!(token_owner(c, "hf_notachildtoken")?, None);
                revoke_token(c, "p")?;
                assert_eq!(token_owner(c, &newer)?, None);
                set_token(c, "p", &newer)?;
                for to in [MachineStatus::Stopping, MachineStatus::Stopped] {
                    let from = [MachineStatus::Running, MachineStatus::Stopping];
                    records::transition(c, "p", &from, to, &Changes::default())?;
                }
                records::delete(c, "p", &[MachineStatus::Stopped])?;
                assert_eq!(token_owner(c, &newer)?, None, "deleted with its machine");
                Ok(())
            })
            .unwrap();
    }
}
