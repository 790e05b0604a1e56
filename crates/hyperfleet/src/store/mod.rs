//! SQLite persistence: one file, WAL mode, migrations by `user_version`. One writer connection behind a mutex
//! ([`Store::call`]) and a few read-only connections ([`Store::read`]) that WAL lets run beside it, all used from
//! blocking threads; every multi-step change is one `BEGIN IMMEDIATE` transaction on the writer, so uniqueness
//! (names, address blocks) and compare-and-set state changes are enforced by the database.

pub(crate) mod api_keys;
pub(crate) mod children;
pub(crate) mod events;
pub(crate) mod leases;
pub mod machines;
pub(crate) mod volumes;
pub(crate) mod webhooks;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database: {0}")]
    Corrupt(String),
    #[error("database task failed: {0}")]
    Task(String),
}

pub(crate) type StoreResult<T> = Result<T, StoreError>;

const MIGRATIONS: &[&str] = &[
    // 1: machines, address leases, API keys.
    r#"
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE machines (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,
        runtime TEXT NOT NULL,
        vcpu_count INTEGER NOT NULL,
        mem_size_mib INTEGER NOT NULL,
        kernel_image_path TEXT NOT NULL,
        kernel_args TEXT NOT NULL,
        rootfs_path TEXT NOT NULL,
        exposed_ports TEXT NOT NULL,
        dns TEXT NOT NULL,
        egress TEXT NOT NULL,
        socket_path TEXT,
        pid INTEGER,
        error_message TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX machines_by_status ON machines (status, created_at);
    CREATE INDEX machines_by_created ON machines (created_at, id);
    CREATE TABLE leases (
        block INTEGER PRIMARY KEY,
        machine_id TEXT NOT NULL UNIQUE REFERENCES machines (id) ON DELETE CASCADE,
        created_at TEXT NOT NULL
    );
    -- Blocks below the highest lease that are free again; see leases.rs.
    CREATE TABLE free_blocks (block INTEGER PRIMARY KEY);
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        key_prefix TEXT NOT NULL,
        key_hash BLOB NOT NULL UNIQUE,
        scopes TEXT NOT NULL,
        expires_at TEXT,
        last_used_at TEXT,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    );
    CREATE INDEX api_keys_by_prefix ON api_keys (key_prefix);
    "#,
    // 2: a machine's configuration is one JSON document (`MachineSpec`); only what queries filter on, or the
    // database must enforce, keeps a column of its own.
    r#"
    ALTER TABLE machines ADD COLUMN spec TEXT NOT NULL DEFAULT '{}';
    UPDATE machines SET spec = json_object(
        'name', name, 'runtime', runtime, 'vcpu_count', vcpu_count, 'mem_size_mib', mem_size_mib,
        'kernel_image_path', kernel_image_path, 'kernel_args', kernel_args, 'rootfs_path', rootfs_path,
        'exposed_ports', json(exposed_ports), 'network', json_object('dns', json(dns), 'egress', json(egress)));
    ALTER TABLE machines DROP COLUMN runtime;
    ALTER TABLE machines DROP COLUMN vcpu_count;
    ALTER TABLE machines DROP COLUMN mem_size_mib;
    ALTER TABLE machines DROP COLUMN kernel_image_path;
    ALTER TABLE machines DROP COLUMN kernel_args;
    ALTER TABLE machines DROP COLUMN rootfs_path;
    ALTER TABLE machines DROP COLUMN exposed_ports;
    ALTER TABLE machines DROP COLUMN dns;
    ALTER TABLE machines DROP COLUMN egress;
    "#,
    // 3: volumes. Which machines use one is in their specs; a machine holds its volumes while its status
    // says it may have a process (see volumes.rs), so there is no attachment state to fall out of step.
    r#"
    CREATE TABLE volumes (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        size_mib INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    "#,
    // 4: lifecycle deadlines (stored so they survive a restart) and write-only secrets.
    r#"
    ALTER TABLE machines ADD COLUMN expires_at TEXT;
    ALTER TABLE machines ADD COLUMN idle_since TEXT;
    CREATE TABLE machine_secrets (
        machine_id TEXT NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        value BLOB NOT NULL,
        PRIMARY KEY (machine_id, name)
    );
    "#,
    // 5: the machine events `GET /events` resumes from (a bounded backlog, trimmed as it grows; see events.rs).
    r#"
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        machine_id TEXT NOT NULL,
        machine_name TEXT NOT NULL,
        type TEXT NOT NULL,
        body TEXT NOT NULL
    );
    "#,
    // 6: webhooks and their deliveries (each a durable to-do, inserted with its event; see webhooks.rs).
    r#"
    CREATE TABLE webhooks (
        id TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        events TEXT NOT NULL,
        label_selector TEXT,
        secret BLOB,
        created_at TEXT NOT NULL
    );
    CREATE TABLE webhook_deliveries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        webhook_id TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
        event_id INTEGER NOT NULL,
        event_type TEXT NOT NULL,
        machine_id TEXT NOT NULL,
        event TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        next_attempt_at INTEGER,
        last_status_code INTEGER,
        last_error TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
    CREATE INDEX webhook_deliveries_by_webhook ON webhook_deliveries (webhook_id, id);
    "#,
    // 7: child machines. A child names its parent in its spec (`parent_id`, indexed for the quota check and
    // `GET /machines/{id}/children`); a machine with `spawn` has at most one child token while it runs,
    // stored as its SHA-256 only (see children.rs).
    r#"
    CREATE INDEX machines_by_parent ON machines (json_extract(spec, '$.parent_id'))
        WHERE json_extract(spec, '$.parent_id') IS NOT NULL;
    CREATE TABLE child_tokens (
        machine_id TEXT PRIMARY KEY REFERENCES machines (id) ON DELETE CASCADE,
        token_hash BLOB NOT NULL UNIQUE,
        created_at TEXT NOT NULL
    );
    "#,
];

/// Read-only connections kept open. Readers are short point queries, and the blocking pool they run on is
/// what really bounds concurrency; a few connections are enough for the 2-4 cores this runs on.
const READERS: usize = 4;

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    readers: Arc<ReadPool>,
}

/// A fixed set of read-only connections; a reader takes the first free one, or waits on one in turn.
struct ReadPool {
    conns: Vec<Mutex<Connection>>,
    next: AtomicUsize,
}

impl ReadPool {
    fn with<T>(&self, f: impl FnOnce(&Connection) -> T) -> T {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.conns.len();
        for i in 0..n {
            match self.conns[(start + i) % n].try_lock() {
                Ok(guard) => return f(&guard),
                Err(TryLockError::Poisoned(e)) => return f(&e.into_inner()),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        let guard = self.conns[start % n].lock().unwrap_or_else(|e| e.into_inner());
        f(&guard)
    }
}

impl Store {
    /// Opens (creating if needed) the database and brings its schema up to date.
    pub fn open(path: &Path) -> StoreResult<Self> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        migrate(&mut conn)?;
        restrict_permissions(path);
        // Opened after the writer switched the file to WAL, so readers never block it nor each other.
        let conns = (0..READERS)
            .map(|_| {
                let c = Connection::open_with_flags(
                    path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
                )?;
                c.busy_timeout(BUSY_TIMEOUT)?;
                Ok(Mutex::new(c))
            })
            .collect::<StoreResult<_>>()?;
        Ok(Self { conn: Arc::new(Mutex::new(conn)), readers: Arc::new(ReadPool { conns, next: AtomicUsize::new(0) }) })
    }

    /// Runs the read-only `f` on one of the read connections, on a blocking thread; it does not wait for
    /// writes in progress (it sees the last committed state). A write through this connection fails.
    pub async fn read<T, F>(&self, f: F) -> StoreResult<T>
    where
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
        T: Send + 'static,
    {
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || readers.with(f)).await.map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Same as [`Self::read`] for code that is not async (the CLI's key commands).
    pub fn read_blocking<T>(&self, f: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T> {
        self.readers.with(f)
    }

    /// Runs `f` with the writer connection on a blocking thread (writes, and reads that must see them in order).
    pub async fn call<T, F>(&self, f: F) -> StoreResult<T>
    where
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
        T: Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Same as [`Self::call`] for code that is not async (the CLI's key commands).
    pub fn call_blocking<T>(&self, f: impl FnOnce(&mut Connection) -> StoreResult<T>) -> StoreResult<T> {
        let mut guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    pub async fn ping(&self) -> StoreResult<()> {
        self.call(|c| Ok(c.query_row("SELECT 1", [], |_| Ok(()))?)).await
    }
}

/// The database holds key hashes and machines' secrets: only its owner may read it (and its WAL files).
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut files = vec![path.to_path_buf()];
    for suffix in ["-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        files.push(p.into());
    }
    for f in files {
        if let Err(e) = std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600))
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(file = %f.display(), error = %e, "could not make the database private to its owner");
        }
    }
}

fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let current: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if current > MIGRATIONS.len() {
        return Err(StoreError::Corrupt(format!(
            "schema version {current} is newer than this hyperfleet ({}); upgrade hyperfleet",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

pub(crate) fn meta_get(conn: &Connection, key: &str) -> StoreResult<Option<String>> {
    Ok(conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()?)
}

pub(crate) fn meta_set(conn: &Connection, key: &str, value: &str) -> StoreResult<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [key, value],
    )?;
    Ok(())
}

/// 16 random lowercase letters and digits: machine ids, and the body of key and request ids. Lowercase so an
/// id can appear in a host name (`{id}-{port}.suffix` proxy routing). From the thread-local CSPRNG (ChaCha,
/// seeded and reseeded from the OS): reading the OS generator per character was a `getrandom` system call
/// each, 16 per request for the correlation id. Ids are not secrets; key secrets come from the OS directly.
pub(crate) fn random_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..16).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char).collect()
}

/// Current time as stored and shown: RFC 3339, UTC, milliseconds (the wire types' one format).
pub fn now() -> String {
    hyperfleet_types::timestamp::format(hyperfleet_types::timestamp::now())
}

#[cfg(test)]
pub(crate) fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("test.db")).unwrap();
    (dir, store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_see_commits_without_waiting_for_the_writer_and_cannot_write() {
        let (_d, store) = temp_store();
        store.call_blocking(|c| meta_set(c, "k", "committed")).unwrap();
        store
            .call_blocking(|w| {
                // The writer is held, mid-transaction: a reader still answers, with the last committed value.
                w.execute_batch("BEGIN IMMEDIATE")?;
                meta_set(w, "k", "pending")?;
                for _ in 0..READERS + 1 {
                    assert_eq!(store.read_blocking(|r| meta_get(r, "k"))?.as_deref(), Some("committed"));
                }
                w.execute_batch("COMMIT")?;
                Ok(())
            })
            .unwrap();
        assert_eq!(store.read_blocking(|r| meta_get(r, "k")).unwrap().as_deref(), Some("pending"));
        let refused = store.read_blocking(|r| meta_set(r, "k", "x")).unwrap_err();
        assert!(refused.to_string().contains("readonly"), "{refused}");
    }

    #[tokio::test]
    async fn concurrent_reads_use_several_connections() {
        let (_d, store) = temp_store();
        store.call(|c| meta_set(c, "k", "v")).await.unwrap();
        let barrier = Arc::new(std::sync::Barrier::new(READERS));
        // Each read waits for all the others: this finishes only if READERS reads run at once.
        let reads: Vec<_> = (0..READERS)
            .map(|_| {
                let b = barrier.clone();
                store.read(move |c| {
                    b.wait();
                    meta_get(c, "k")
                })
            })
            .collect();
        let got = tokio::time::timeout(Duration::from_secs(10), futures::future::try_join_all(reads)).await.unwrap();
        assert!(got.unwrap().iter().all(|v| v.as_deref() == Some("v")));
    }
}

#[cfg(test)]
mod migration_tests {
    use super::*;

    #[test]
    fn machines_of_the_first_schema_keep_their_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            let tx = conn.transaction().unwrap();
            tx.execute_batch(MIGRATIONS[0]).unwrap();
            tx.pragma_update(None, "user_version", 1).unwrap();
            tx.execute(
                "INSERT INTO machines (id, name, status, runtime, vcpu_count, mem_size_mib, kernel_image_path, \
                 kernel_args, rootfs_path, exposed_ports, dns, egress, created_at, updated_at) VALUES \
                 ('abc', 'web', 'stopped', 'container', 2, 256, '/k', 'console=ttyS0', '/r', '[80,443]', \
                 '[\"10.0.0.53\"]', '[\"10.1.0.0/16\"]', '2026-11-30T10:00:00.000Z', '2026-11-30T10:00:01.000Z')",
                [],
            )
            .unwrap();
            tx.execute("INSERT INTO leases (block, machine_id, created_at) VALUES (3, 'abc', 'x')", []).unwrap();
            tx.commit().unwrap();
        }
        let store = Store::open(&path).unwrap();
        let m = store.call_blocking(|c| machines::get(c, "web")).unwrap().unwrap();
        assert_eq!((m.id.as_str(), m.block, m.spec.vcpu_count, m.spec.mem_size_mib), ("abc", 3, 2, 256));
        assert_eq!(m.spec.exposed_ports, vec![80, 443]);
        assert_eq!(m.spec.network.dns, vec![std::net::Ipv4Addr::new(10, 0, 0, 53)]);
        assert_eq!(m.spec.network.egress, hyperfleet_types::EgressPolicy::Cidrs(vec!["10.1.0.0/16".parse().unwrap()]));
        assert_eq!(hyperfleet_types::timestamp::format(m.created_at), "2026-11-30T10:00:00.000Z");
    }
}
