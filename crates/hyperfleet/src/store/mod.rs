//! SQLite persistence: one file, WAL mode, migrations by `user_version`. One connection behind a mutex,
//! used from blocking threads; every multi-step change is one `BEGIN IMMEDIATE` transaction, so uniqueness
//! (names, address blocks) and compare-and-set state changes are enforced by the database.

pub mod api_keys;
pub mod leases;
pub mod machines;

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database: {0}")]
    Corrupt(String),
    #[error("database task failed: {0}")]
    Task(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

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
];

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl Store {
    /// Opens (creating if needed) the database and brings its schema up to date.
    pub fn open(path: &Path) -> StoreResult<Self> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        Ok(Self { conn: Arc::new(Mutex::new(conn)) })
    }

    /// Runs `f` with the connection on a blocking thread.
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

pub fn meta_get(conn: &Connection, key: &str) -> StoreResult<Option<String>> {
    Ok(conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()?)
}

pub fn meta_set(conn: &Connection, key: &str, value: &str) -> StoreResult<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [key, value],
    )?;
    Ok(())
}

/// 16 random lowercase letters and digits from the OS CSPRNG: machine ids, and the body of key and
/// request ids. Lowercase so an id can appear in a host name (`{id}-{port}.suffix` proxy routing).
pub fn random_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rngs::OsRng;
    (0..16).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char).collect()
}

/// Current time as stored and shown: RFC 3339, UTC, milliseconds.
pub fn now() -> String {
    format_time(time::OffsetDateTime::now_utc())
}

pub fn format_time(t: time::OffsetDateTime) -> String {
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    t.to_offset(time::UtcOffset::UTC).format(&fmt).unwrap_or_default()
}

pub fn parse_time(s: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

#[cfg(test)]
pub(crate) fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("test.db")).unwrap();
    (dir, store)
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
