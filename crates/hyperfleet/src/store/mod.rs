//! Persistence on one query layer with two backends: SQLite (the default: one file, WAL, embedded) and
//! PostgreSQL (`--database postgres://…`, the shared database of a fleet). The queries are written once, on
//! sqlx's `Any` driver with `$N` placeholders (which both backends accept); what differs between the two
//! dialects (schema DDL, JSON functions, how a writer is serialised) is in [`dialect`].
//!
//! Reads use [`Store::read`] (a connection that cannot write: one of a fixed set opened `mode=ro` on SQLite,
//! a pooled one in read-only transactions on PostgreSQL). Every change goes through [`Store::write`], a
//! transaction that holds the database's one write lock until it commits: `BEGIN IMMEDIATE` on SQLite, a
//! transaction-scoped advisory lock on PostgreSQL. So uniqueness (names, address blocks) and compare-and-set state changes are decided
//! by the database, for every daemon sharing it.

pub(crate) mod api_keys;
pub(crate) mod children;
pub(crate) mod dialect;
pub(crate) mod events;
pub(crate) mod leases;
pub mod machines;
pub(crate) mod nodes;
pub(crate) mod pg_cluster;
#[cfg(test)]
pub(crate) mod testing;
pub(crate) mod volumes;
pub(crate) mod webhooks;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool, Executor, Row};

pub use dialect::Backend;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("database: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether the database could not be reached or could not serve in time (down, restarting, failing over,
    /// every connection busy past the acquire timeout, a lock not granted within the lock timeout), rather
    /// than a statement failing: the caller may retry the same request later.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Sql(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                // SQLSTATE class 08: connection exception; 57P01..03: the server is shutting down or
                // starting; 55P03: lock not available (lock_timeout).
                sqlx::Error::Database(d) => d
                    .code()
                    .is_some_and(|c| c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03" | "55P03")),
                _ => false,
            },
            StoreError::Corrupt(_) => false,
        }
    }

    /// Whether the statement failed on a value the request brought that the database cannot hold (PostgreSQL:
    /// a NUL byte in text, 22021/22P05; a number out of its column's range, 22003): the request is at fault.
    /// The API checks what it stores; this is the backstop for what it missed.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, StoreError::Sql(sqlx::Error::Database(d))
            if d.code().is_some_and(|c| matches!(&*c, "22021" | "22P05" | "22003")))
    }
}

pub(crate) type StoreResult<T> = Result<T, StoreError>;

/// A connection of either backend; store functions take one (a [`Write`] or a [`Store::read`] connection).
pub(crate) type Conn = AnyConnection;

/// A write transaction holding the database's write lock (see [`Store::write`]); store functions take it as
/// a [`Conn`] (it derefs to one). Dropped without [`Write::commit`], it rolls back.
pub struct Write {
    tx: sqlx::Transaction<'static, Any>,
    after_commit: Vec<Box<dyn FnOnce() + Send>>,
    /// Why the transaction cannot be trusted to commit (see [`Write::lost`]).
    lost: Option<String>,
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

impl Write {
    /// Runs `f` once the transaction has committed, before the next writer of this process begins (so
    /// what `f` publishes goes out in commit order). Not run if it rolls back.
    pub(crate) fn after_commit(&mut self, f: impl FnOnce() + Send + 'static) {
        self.after_commit.push(Box::new(f));
    }

    /// Marks the transaction lost: a statement in it met the database unavailable (its connection cut), even
    /// if the caller went on. [`Write::commit`] then fails with that error and rolls back, instead of
    /// reporting a commit that may not have happened.
    pub(crate) fn lost(&mut self, why: &StoreError) {
        self.lost.get_or_insert_with(|| why.to_string());
    }

    pub async fn commit(self) -> StoreResult<()> {
        let Self { tx, after_commit, lost, _turn } = self;
        if let Some(why) = lost {
            let _ = tx.rollback().await;
            return Err(sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, why)).into());
        }
        tx.commit().await?;
        for f in after_commit {
            f();
        }
        Ok(())
    }

    /// A savepoint: a nested transaction that can fail and roll back alone (on PostgreSQL, a failed
    /// statement otherwise aborts the whole transaction).
    pub(crate) async fn savepoint(&mut self) -> StoreResult<sqlx::Transaction<'_, Any>> {
        Ok(sqlx::Connection::begin(&mut *self.tx).await?)
    }
}

impl std::ops::Deref for Write {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for Write {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }
}

/// Where the database is: the SQLite file (the default, in the data dir), or a PostgreSQL URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Location {
    /// `postgres://…` / `postgresql://…` is PostgreSQL; `sqlite://PATH` or a plain path is a SQLite file.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(Self::Postgres(s.to_string()));
        }
        let path = s.strip_prefix("sqlite://").unwrap_or(s);
        if path.is_empty() || path.contains("://") {
            return Err(format!("'{s}' is neither a postgres:// URL nor a SQLite file path"));
        }
        Ok(Self::Sqlite(PathBuf::from(path)))
    }

    pub fn backend(&self) -> Backend {
        match self {
            Self::Sqlite(_) => Backend::Sqlite,
            Self::Postgres(_) => Backend::Postgres,
        }
    }

    /// For logs and `doctor`: the file, or the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            Self::Sqlite(p) => format!("sqlite {}", p.display()),
            Self::Postgres(url) => format!("postgresql {}", redact(url)),
        }
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let Some((auth, host)) = rest.split_once('@') else { return url.to_string() };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// Reader connections kept open. Readers are short point queries; a few are enough for 2-4 cores.
const READERS: u32 = 4;
/// PostgreSQL connections for writers. This process's writers take turns (see [`Store::write`]), so one is
/// busy at a time; the second is there while the first is being re-established after a failure.
const PG_WRITERS: u32 = 2;
/// The longest a PostgreSQL writer waits for the write lock (another daemon's long transaction, or one
/// stuck): it then fails with an error rather than hanging the request.
const PG_LOCK_TIMEOUT: &str = "SET lock_timeout = '10s'";

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for a pooled connection before it fails (a database that is down or saturated).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Store {
    backend: Backend,
    writer: AnyPool,
    reader: Readers,
    location: std::sync::Arc<Location>,
    /// This process's writers take turns here first (FIFO), so the database lock is never contended within
    /// one process and after-commit work runs in commit order.
    turn: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// The read connections. PostgreSQL: a sqlx pool, which tests a connection before handing it out (so a
/// restarted server costs no failed request). SQLite: a fixed set of connections handed out as they are,
/// as the store did before sqlx: a sqlx pool pings its connection's worker thread when it lends it and
/// again when it is returned, two extra round trips per read that a local file does not need.
#[derive(Clone)]
enum Readers {
    Pool(AnyPool),
    Own(Arc<OwnReaders>),
}

struct OwnReaders {
    idle: std::sync::Mutex<Vec<AnyConnection>>,
    /// One permit per idle connection: readers wait here in turn (FIFO) when all are lent.
    free: tokio::sync::Semaphore,
}

/// A read connection (see [`Store::read`]); store functions take it as a [`Conn`] (it derefs to one).
pub struct Read(Lent);

enum Lent {
    Pool(PoolConnection<Any>),
    Own { conn: Option<AnyConnection>, home: Arc<OwnReaders> },
}

impl std::ops::Deref for Read {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        match &self.0 {
            Lent::Pool(c) => c,
            // Some until dropped.
            Lent::Own { conn, .. } => conn.as_ref().unwrap_or_else(|| unreachable!("a read connection is lent")),
        }
    }
}

impl std::ops::DerefMut for Read {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        match &mut self.0 {
            Lent::Pool(c) => c,
            Lent::Own { conn, .. } => conn.as_mut().unwrap_or_else(|| unreachable!("a read connection is lent")),
        }
    }
}

impl Drop for Read {
    /// Back to the idle set. A read cut short (its request dropped) needs nothing more: the connection's
    /// worker finishes or abandons the statement and resets it before it takes the next one.
    fn drop(&mut self) {
        if let Lent::Own { conn, home } = &mut self.0
            && let Some(c) = conn.take()
        {
            home.idle.lock().unwrap_or_else(|e| e.into_inner()).push(c);
            home.free.add_permits(1);
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("location", &self.location.describe()).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the database and brings its schema up to date.
    pub async fn open(location: &Location) -> StoreResult<Self> {
        sqlx::any::install_default_drivers();
        match location {
            Location::Sqlite(path) => Self::open_sqlite(path).await,
            Location::Postgres(url) => Self::open_postgres(url).await,
        }
    }

    /// The SQLite file at `path` (the default backend).
    pub async fn open_file(path: &Path) -> StoreResult<Self> {
        Self::open(&Location::Sqlite(path.to_path_buf())).await
    }

    async fn open_sqlite(path: &Path) -> StoreResult<Self> {
        let url =
            |mode: &str| -> StoreResult<AnyConnectOptions> { Ok(sqlite_url(path, mode).parse::<AnyConnectOptions>()?) };
        // One writer connection: SQLite has one writer at a time anyway, and queueing here costs nothing.
        let writer = AnyPoolOptions::new()
            .max_connections(1)
            // A SQLite connection is a file handle with nothing to lose on the way (unlike PostgreSQL's
            // TCP connections): a test round trip before each use would only cost time.
            .test_before_acquire(false)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .idle_timeout(None)
            .max_lifetime(None)
            .after_connect(|c, _| sqlite_pragmas(c))
            .connect_with(url("rwc")?)
            .await?;
        {
            let mut c = writer.acquire().await?;
            c.execute("PRAGMA journal_mode = WAL").await?;
            migrate(Backend::Sqlite, &mut c).await?;
        }
        restrict_permissions(path);
        // Opened after the writer switched the file to WAL, so readers never block it nor each other.
        let mut readers = Vec::new();
        for _ in 0..READERS {
            let mut c = <AnyConnection as sqlx::Connection>::connect_with(&url("ro")?).await?;
            c.execute(sqlx::AssertSqlSafe(format!("PRAGMA busy_timeout = {}", BUSY_TIMEOUT.as_millis()))).await?;
            readers.push(c);
        }
        let reader = Readers::Own(Arc::new(OwnReaders {
            idle: std::sync::Mutex::new(readers),
            free: tokio::sync::Semaphore::new(READERS as usize),
        }));
        Ok(Self {
            backend: Backend::Sqlite,
            writer,
            reader,
            location: Location::Sqlite(path.into()).into(),
            turn: Default::default(),
        })
    }

    async fn open_postgres(url: &str) -> StoreResult<Self> {
        let opts: AnyConnectOptions = url.parse()?;
        let writer = AnyPoolOptions::new()
            .max_connections(PG_WRITERS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(|c, _| {
                Box::pin(async move {
                    c.execute(PG_LOCK_TIMEOUT).await?;
                    Ok(())
                })
            })
            .connect_with(opts.clone())
            .await?;
        {
            let mut tx = writer.begin().await?;
            dialect::lock_for_write(Backend::Postgres, &mut tx).await?;
            migrate(Backend::Postgres, &mut tx).await?;
            tx.commit().await?;
        }
        let reader = Readers::Pool(
            AnyPoolOptions::new()
                .max_connections(READERS)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .after_connect(|c, _| {
                    Box::pin(async move {
                        c.execute("SET default_transaction_read_only = on").await?;
                        Ok(())
                    })
                })
                .connect_with(opts)
                .await?,
        );
        Ok(Self {
            backend: Backend::Postgres,
            writer,
            reader,
            location: Location::Postgres(url.into()).into(),
            turn: Default::default(),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// A connection for reads. It sees the last committed state and never waits for a writer; a write
    /// through it fails.
    pub async fn read(&self) -> StoreResult<Read> {
        match &self.reader {
            Readers::Pool(pool) => Ok(Read(Lent::Pool(pool.acquire().await?))),
            Readers::Own(own) => {
                let permit = tokio::time::timeout(ACQUIRE_TIMEOUT, own.free.acquire())
                    .await
                    .map_err(|_| sqlx::Error::PoolTimedOut)?
                    .map_err(|_| sqlx::Error::PoolClosed)?;
                permit.forget();
                let conn = own.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
                match conn {
                    Some(conn) => Ok(Read(Lent::Own { conn: Some(conn), home: own.clone() })),
                    None => {
                        // Only after close (which took the idle connections).
                        own.free.add_permits(1);
                        Err(sqlx::Error::PoolClosed.into())
                    }
                }
            }
        }
    }

    /// A write transaction holding the database's one write lock until it commits or rolls back, so writes
    /// are serialised as SQLite serialises them, on both backends: `BEGIN IMMEDIATE` on SQLite; on PostgreSQL
    /// a transaction-scoped advisory lock taken first (every statement after it sees every earlier writer's
    /// commit). Never call this while holding another [`Write`]: it would wait for itself.
    pub async fn write(&self) -> StoreResult<Write> {
        let turn = self.turn.clone().lock_owned().await;
        let mut tx = match self.backend {
            Backend::Sqlite => self.writer.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.writer.begin().await?,
        };
        dialect::lock_for_write(self.backend, &mut tx).await?;
        Ok(Write { tx, after_commit: Vec::new(), lost: None, _turn: turn })
    }

    /// On PostgreSQL, a connection listening on `channel` (NOTIFY is how daemons sharing the database hear
    /// of each other's changes); `None` on SQLite, which only one daemon uses. The listener reconnects by
    /// itself after the server restarts.
    pub async fn listen(&self, channel: &str) -> StoreResult<Option<sqlx::postgres::PgListener>> {
        let Location::Postgres(url) = &*self.location else { return Ok(None) };
        let mut listener = sqlx::postgres::PgListener::connect(url).await?;
        listener.listen(channel).await?;
        Ok(Some(listener))
    }

    pub async fn ping(&self) -> StoreResult<()> {
        let mut c = self.read().await?;
        sqlx::query("SELECT 1").execute(&mut *c).await?;
        Ok(())
    }

    /// Closes the pools (a test dropping its PostgreSQL cluster waits for this).
    pub async fn close(&self) {
        self.writer.close().await;
        match &self.reader {
            Readers::Pool(pool) => pool.close().await,
            Readers::Own(own) => {
                own.free.close();
                let idle = std::mem::take(&mut *own.idle.lock().unwrap_or_else(|e| e.into_inner()));
                for c in idle {
                    let _ = sqlx::Connection::close(c).await;
                }
            }
        }
    }
}

/// Per-connection SQLite settings (the file's WAL mode is persistent and set once at open).
fn sqlite_pragmas(c: &mut AnyConnection) -> futures::future::BoxFuture<'_, Result<(), sqlx::Error>> {
    Box::pin(async move {
        c.execute(sqlx::AssertSqlSafe(format!("PRAGMA busy_timeout = {}", BUSY_TIMEOUT.as_millis()))).await?;
        c.execute("PRAGMA foreign_keys = ON").await?;
        c.execute("PRAGMA synchronous = NORMAL").await?;
        Ok(())
    })
}

/// `sqlite://PATH?mode=MODE`, the path percent-encoded (a `?`, `#` or `%` in it would read as URL syntax).
pub(crate) fn sqlite_url(path: &Path, mode: &str) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut enc = String::new();
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            enc.push(char::from(b));
        } else {
            enc.push_str(&format!("%{b:02X}"));
        }
    }
    format!("sqlite://{enc}?mode={mode}")
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

/// Applies the migrations the database has not seen, each in its own transaction (on PostgreSQL all under
/// the write lock the caller holds, so two daemons starting at once migrate once).
async fn migrate(backend: Backend, c: &mut Conn) -> StoreResult<()> {
    let migrations = dialect::migrations(backend);
    let current = dialect::schema_version(backend, c).await?;
    if current > migrations.len() {
        return Err(StoreError::Corrupt(format!(
            "schema version {current} is newer than this hyperfleet ({}); upgrade hyperfleet",
            migrations.len()
        )));
    }
    for (i, sql) in migrations.iter().enumerate().skip(current) {
        let mut tx = sqlx::Connection::begin(&mut *c).await?;
        if !sql.trim().is_empty() {
            sqlx::raw_sql(sqlx::AssertSqlSafe(*sql)).execute(&mut *tx).await?;
        }
        dialect::set_schema_version(backend, &mut tx, i + 1).await?;
        tx.commit().await?;
    }
    Ok(())
}

pub(crate) async fn meta_get(c: &mut Conn, key: &str) -> StoreResult<Option<String>> {
    Ok(sqlx::query_scalar("SELECT value FROM meta WHERE key = $1").bind(key).fetch_optional(c).await?)
}

pub(crate) async fn meta_set(c: &mut Conn, key: &str, value: &str) -> StoreResult<()> {
    sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
        .bind(key)
        .bind(value)
        .execute(c)
        .await?;
    Ok(())
}

/// A stored integer that must fit `T` (ids, counts, block numbers): a value that does not is corruption.
pub(crate) fn int<T: TryFrom<i64>>(what: &str, v: i64) -> StoreResult<T> {
    T::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what}: {v} is out of range")))
}

/// A column of `row`, named `col`; reports the column on failure.
pub(crate) fn col<'r, T>(row: &'r sqlx::any::AnyRow, col: &str) -> StoreResult<T>
where
    T: sqlx::Decode<'r, Any> + sqlx::Type<Any>,
{
    row.try_get(col).map_err(|e| StoreError::Corrupt(format!("column {col}: {e}")))
}

/// A stored time (RFC 3339 text, as [`now`] writes it).
pub(crate) fn time_col(row: &sqlx::any::AnyRow, name: &str) -> StoreResult<time::OffsetDateTime> {
    let text: String = col(row, name)?;
    hyperfleet_types::timestamp::parse(&text)
        .ok_or_else(|| StoreError::Corrupt(format!("column {name}: '{text}' is not an RFC 3339 time")))
}

pub(crate) fn opt_time_col(row: &sqlx::any::AnyRow, name: &str) -> StoreResult<Option<time::OffsetDateTime>> {
    let text: Option<String> = col(row, name)?;
    text.map(|t| {
        hyperfleet_types::timestamp::parse(&t)
            .ok_or_else(|| StoreError::Corrupt(format!("column {name}: '{t}' is not an RFC 3339 time")))
    })
    .transpose()
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
mod tests {
    use super::testing::backend_tests;
    use super::*;

    backend_tests! {
        async fn readers_see_commits_without_waiting_for_the_writer_and_cannot_write(store, _db) {
            let mut w = store.write().await.unwrap();
            meta_set(&mut w, "k", "committed").await.unwrap();
            w.commit().await.unwrap();
            let mut w = store.write().await.unwrap();
            meta_set(&mut w, "k", "pending").await.unwrap();
            // The writer is held, mid-transaction: readers still answer, with the last committed value.
            let mut held = Vec::new();
            for _ in 0..READERS {
                let mut r = store.read().await.unwrap();
                assert_eq!(meta_get(&mut r, "k").await.unwrap().as_deref(), Some("committed"));
                held.push(r);
            }
            drop(held);
            w.commit().await.unwrap();
            let mut r = store.read().await.unwrap();
            assert_eq!(meta_get(&mut r, "k").await.unwrap().as_deref(), Some("pending"));
            let refused = meta_set(&mut r, "k", "x").await.unwrap_err().to_string();
            assert!(refused.contains("readonly") || refused.contains("read-only"), "{refused}");
        }

        async fn concurrent_reads_use_several_connections(store, _db) {
            // Each reader holds its connection until all have one: this finishes only if READERS run at once.
            let reads = (0..READERS).map(|_| store.read());
            let conns = tokio::time::timeout(Duration::from_secs(10), futures::future::try_join_all(reads))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(conns.len(), READERS as usize);
        }

        async fn writers_take_turns_across_handles(store, db) {
            // Two handles (two daemons, on PostgreSQL): a writer of one waits while the other holds the lock.
            let other = db.reopen().await;
            let mut w = store.write().await.unwrap();
            meta_set(&mut w, "turn", "first").await.unwrap();
            let second = tokio::spawn(async move {
                let mut w2 = other.write().await.unwrap();
                let seen = meta_get(&mut w2, "turn").await.unwrap();
                meta_set(&mut w2, "turn", "second").await.unwrap();
                w2.commit().await.unwrap();
                other.close().await;
                seen
            });
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(!second.is_finished(), "the second writer waits for the first");
            w.commit().await.unwrap();
            assert_eq!(second.await.unwrap().as_deref(), Some("first"), "and then sees its commit");
            assert_eq!(meta_get(&mut store.read().await.unwrap(), "turn").await.unwrap().as_deref(), Some("second"));
        }
    }

    #[tokio::test]
    #[ignore = "needs postgresql: starts a throwaway cluster with Debian's postgresql package"]
    async fn the_store_reconnects_after_postgresql_restarts() {
        let db = testing::TestDb::postgres().await;
        let store = db.store.clone();
        let mut w = store.write().await.unwrap();
        meta_set(&mut w, "k", "before").await.unwrap();
        w.commit().await.unwrap();
        assert_eq!(meta_get(&mut store.read().await.unwrap(), "k").await.unwrap().as_deref(), Some("before"));
        // Every pooled connection is cut by the restart; the pools test a connection before handing it out,
        // so the next read and write get fresh ones instead of an error.
        db.cluster().unwrap().restart().unwrap();
        assert_eq!(meta_get(&mut store.read().await.unwrap(), "k").await.unwrap().as_deref(), Some("before"));
        let mut w = store.write().await.unwrap();
        meta_set(&mut w, "k", "after").await.unwrap();
        w.commit().await.unwrap();
        assert_eq!(meta_get(&mut store.read().await.unwrap(), "k").await.unwrap().as_deref(), Some("after"));
        store.close().await;
    }

    #[test]
    fn locations_parse_and_hide_passwords() {
        assert_eq!(Location::parse("/var/lib/hf/db").unwrap(), Location::Sqlite("/var/lib/hf/db".into()));
        assert_eq!(Location::parse("sqlite:///x/y.db").unwrap(), Location::Sqlite("/x/y.db".into()));
        let pg = Location::parse("postgres://hf:s3cret@db:5432/hyperfleet").unwrap();
        assert_eq!(pg.backend(), Backend::Postgres);
        assert_eq!(pg.describe(), "postgresql postgres://hf:***@db:5432/hyperfleet");
        assert!(Location::parse("mysql://x").is_err());
    }

    #[tokio::test]
    async fn the_sqlite_file_is_private_to_its_owner() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.db");
        let _store = Store::open_file(&path).await.unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}

#[cfg(test)]
mod migration_tests {
    use super::*;

    #[tokio::test]
    async fn machines_of_the_first_schema_keep_their_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            // A database as the first release left it, written by SQLite directly.
            sqlx::any::install_default_drivers();
            let mut conn = <AnyConnection as sqlx::Connection>::connect(&sqlite_url(&path, "rwc")).await.unwrap();
            let mut tx = sqlx::Connection::begin(&mut conn).await.unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(dialect::SQLITE[0])).execute(&mut *tx).await.unwrap();
            sqlx::raw_sql("PRAGMA user_version = 1").execute(&mut *tx).await.unwrap();
            sqlx::raw_sql(
                "INSERT INTO machines (id, name, status, runtime, vcpu_count, mem_size_mib, kernel_image_path, \
                 kernel_args, rootfs_path, exposed_ports, dns, egress, created_at, updated_at) VALUES \
                 ('abc', 'web', 'stopped', 'container', 2, 256, '/k', 'console=ttyS0', '/r', '[80,443]', \
                 '[\"10.0.0.53\"]', '[\"10.1.0.0/16\"]', '2026-11-30T10:00:00.000Z', '2026-11-30T10:00:01.000Z')",
            )
            .execute(&mut *tx)
            .await
            .unwrap();
            sqlx::raw_sql("INSERT INTO leases (block, machine_id, created_at) VALUES (3, 'abc', 'x')")
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
        let store = Store::open_file(&path).await.unwrap();
        let m = machines::get(&mut store.read().await.unwrap(), "web").await.unwrap().unwrap();
        assert_eq!((m.id.as_str(), m.block, m.spec.vcpu_count, m.spec.mem_size_mib), ("abc", 3, 2, 256));
        assert_eq!(m.spec.exposed_ports, vec![80, 443]);
        assert_eq!(m.spec.network.dns, vec![std::net::Ipv4Addr::new(10, 0, 0, 53)]);
        assert_eq!(m.spec.network.egress, hyperfleet_types::EgressPolicy::Cidrs(vec!["10.1.0.0/16".parse().unwrap()]));
        assert_eq!(hyperfleet_types::timestamp::format(m.created_at), "2026-11-30T10:00:00.000Z");
        let version: i64 =
            sqlx::query_scalar("PRAGMA user_version").fetch_one(&mut *store.read().await.unwrap()).await.unwrap();
        assert_eq!(usize::try_from(version).unwrap(), dialect::SQLITE.len());
    }
}
