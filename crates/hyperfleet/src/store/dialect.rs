//! Everything that differs between the two SQL dialects, in one place. The queries elsewhere are shared:
//! `$N` placeholders, `ON CONFLICT … DO NOTHING/UPDATE`, `RETURNING`, text times, integer columns read as
//! i64. What is not shared:
//! - the schema (AUTOINCREMENT / BLOB on SQLite, identity columns / BYTEA / BIGINT on PostgreSQL), and where
//!   its version is kept (`PRAGMA user_version`, a one-row `schema_version` table);
//! - how a writer is serialised ([`lock_for_write`]);
//! - the JSON functions that look into a machine's spec ([`runtime_of_spec`], [`VOLUME_USERS`]).

use sqlx::Row;

use super::{Conn, StoreResult};

/// SQL for the database's clock in milliseconds since the epoch (heartbeats are judged by one clock, the
/// database's, so nodes whose clocks drift never see each other down or up by mistake).
pub(crate) fn now_ms(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)",
        Backend::Postgres => "CAST(FLOOR(EXTRACT(EPOCH FROM clock_timestamp()) * 1000) AS BIGINT)",
    }
}

/// Which database a [`super::Store`] is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgresql",
        }
    }

    pub(crate) fn of(c: &Conn) -> Self {
        if c.backend_name().eq_ignore_ascii_case("postgresql") { Self::Postgres } else { Self::Sqlite }
    }
}

/// The advisory lock key every PostgreSQL writer takes ("hyperfleet" in ASCII, truncated to 8 bytes).
const PG_WRITE_LOCK: i64 = 0x6879_7065_7266_6c65;

/// Takes the database's write lock in the transaction `tx` has just begun. SQLite: nothing to do, the
/// transaction began with `BEGIN IMMEDIATE`, which took it. PostgreSQL: `pg_advisory_xact_lock`, released
/// when the transaction ends; every multi-step change runs under it, as SQLite runs them, so a check and the
/// write it decides (the lowest free block, a name, a volume holder, a compare-and-set, an event id's order)
/// can never interleave with another daemon's. Chosen over SERIALIZABLE-with-retry: no change has to be
/// written to be re-run, no serialisation failure reaches a user, and event ids are committed in id order
/// (`GET /events` resumes by id). The price, one writer at a time fleet-wide, is measured in BENCHMARKS.md.
pub(crate) async fn lock_for_write(backend: Backend, tx: &mut Conn) -> StoreResult<()> {
    if backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(PG_WRITE_LOCK).execute(tx).await?;
    }
    Ok(())
}

/// SQL for the runtime in a machine's spec (as text).
pub(crate) fn runtime_of_spec(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "json_extract(spec, '$.runtime')",
        Backend::Postgres => "(spec::jsonb ->> 'runtime')",
    }
}

/// The machines naming volume `$1` in their spec: id, status, and whether read-only (1) or not (0).
pub(crate) fn volume_users(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => {
            "SELECT m.id, m.status, CASE WHEN json_extract(v.value, '$.read_only') THEN 1 ELSE 0 END AS read_only \
             FROM machines m, json_each(m.spec, '$.volumes') v \
             WHERE json_extract(v.value, '$.volume') = $1 ORDER BY m.created_at, m.id"
        }
        Backend::Postgres => {
            "SELECT m.id, m.status, CASE WHEN (v.value ->> 'read_only')::boolean THEN 1 ELSE 0 END AS read_only \
             FROM machines m, jsonb_array_elements(COALESCE(m.spec::jsonb -> 'volumes', '[]'::jsonb)) v(value) \
             WHERE v.value ->> 'volume' = $1 ORDER BY m.created_at, m.id"
        }
    }
}

/// SQL for a machine's parent (`parent_id` in its spec, as text; NULL for a machine without one).
pub(crate) fn parent_of_spec(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "json_extract(m.spec, '$.parent_id')",
        Backend::Postgres => "(m.spec::jsonb ->> 'parent_id')",
    }
}

/// SQL for an integer field of a machine's spec (`vcpu_count`, `mem_size_mib`).
pub(crate) fn int_of_spec(backend: Backend, field: &'static str) -> String {
    match backend {
        Backend::Sqlite => format!("json_extract(m.spec, '$.{field}')"),
        Backend::Postgres => format!("(m.spec::jsonb ->> '{field}')::bigint"),
    }
}

pub(super) fn migrations(backend: Backend) -> &'static [&'static str] {
    match backend {
        Backend::Sqlite => SQLITE,
        Backend::Postgres => POSTGRES,
    }
}

pub(super) async fn schema_version(backend: Backend, c: &mut Conn) -> StoreResult<usize> {
    let v: i64 = match backend {
        Backend::Sqlite => sqlx::query_scalar("PRAGMA user_version").fetch_one(c).await?,
        Backend::Postgres => {
            sqlx::query("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)").execute(&mut *c).await?;
            let row = sqlx::query("SELECT version FROM schema_version").fetch_optional(&mut *c).await?;
            match row {
                Some(r) => r.try_get::<i64, _>(0)?,
                None => 0,
            }
        }
    };
    super::int("schema version", v)
}

pub(super) async fn set_schema_version(backend: Backend, c: &mut Conn, v: usize) -> StoreResult<()> {
    let v = i64::try_from(v).map_err(|e| super::StoreError::Corrupt(e.to_string()))?;
    match backend {
        // PRAGMA takes no parameters; `v` is a number this code made.
        Backend::Sqlite => {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("PRAGMA user_version = {v}"))).execute(c).await?;
        }
        Backend::Postgres => {
            sqlx::query("DELETE FROM schema_version").execute(&mut *c).await?;
            sqlx::query("INSERT INTO schema_version (version) VALUES ($1)").bind(v).execute(c).await?;
        }
    }
    Ok(())
}

/// Step 10, the same SQL on both backends: where a node's proxy is, and the subnet and interface prefix of its
/// machines, so any node can route to a machine's guest through its owner and show another node's machine's
/// addresses.
const NODE_ADDRESSING: &str = r#"
    ALTER TABLE nodes ADD COLUMN proxy_url TEXT;
    ALTER TABLE nodes ADD COLUMN subnet TEXT NOT NULL DEFAULT '';
    ALTER TABLE nodes ADD COLUMN iface_prefix TEXT NOT NULL DEFAULT '';
    "#;

/// The SQLite schema, one entry per `user_version` step (databases made by every earlier release open).
pub(super) const SQLITE: &[&str] = &[
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
    // 8: a fleet. Nodes are rows (their heartbeat in ms by the database's clock); a machine names the node
    // that owns it (rows of an older database are adopted by the local node at start); an address block is
    // unique per node, as guest addresses are NAT'd per host.
    r#"
    CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        url TEXT,
        vcpus INTEGER NOT NULL,
        mem_mib INTEGER NOT NULL,
        overcommit TEXT,
        runtimes TEXT NOT NULL,
        labels TEXT NOT NULL,
        drained INTEGER NOT NULL DEFAULT 0,
        heartbeat_ms INTEGER NOT NULL,
        started_at TEXT NOT NULL
    );
    ALTER TABLE machines ADD COLUMN node TEXT NOT NULL DEFAULT '';
    CREATE INDEX machines_by_node ON machines (node, status);
    CREATE TABLE leases_by_node (
        node TEXT NOT NULL,
        block INTEGER NOT NULL,
        machine_id TEXT NOT NULL UNIQUE REFERENCES machines (id) ON DELETE CASCADE,
        created_at TEXT NOT NULL,
        PRIMARY KEY (node, block)
    );
    INSERT INTO leases_by_node (node, block, machine_id, created_at) SELECT '', block, machine_id, created_at FROM leases;
    DROP TABLE leases;
    ALTER TABLE leases_by_node RENAME TO leases;
    CREATE TABLE free_blocks_by_node (node TEXT NOT NULL, block INTEGER NOT NULL, PRIMARY KEY (node, block));
    INSERT INTO free_blocks_by_node (node, block) SELECT '', block FROM free_blocks;
    DROP TABLE free_blocks;
    ALTER TABLE free_blocks_by_node RENAME TO free_blocks;
    "#,
    // 9: what a machine reserves on its node, as columns (copied from its spec when it is written), so
    // placement sums integers from an index instead of parsing every machine's JSON in the create's lock.
    r#"
    ALTER TABLE machines ADD COLUMN vcpus INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE machines ADD COLUMN mem_mib INTEGER NOT NULL DEFAULT 0;
    UPDATE machines SET vcpus = COALESCE(json_extract(spec, '$.vcpu_count'), 0),
        mem_mib = COALESCE(json_extract(spec, '$.mem_size_mib'), 0);
    CREATE INDEX machines_reserved ON machines (node, vcpus, mem_mib);
    "#,
    // 10: see NODE_ADDRESSING.
    NODE_ADDRESSING,
];

/// The PostgreSQL schema, step for step with [`SQLITE`] (a new migration adds an entry to both). No
/// PostgreSQL database predates this backend, so its first step creates schema 6 at once and steps 2-6 are
/// empty. Integers are BIGINT throughout (the query layer reads every integer as i64).
pub(super) const POSTGRES: &[&str] = &[
    r#"
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE machines (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,
        socket_path TEXT,
        pid BIGINT,
        error_message TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        spec TEXT NOT NULL DEFAULT '{}',
        expires_at TEXT,
        idle_since TEXT
    );
    CREATE INDEX machines_by_status ON machines (status, created_at);
    CREATE INDEX machines_by_created ON machines (created_at, id);
    CREATE TABLE leases (
        block BIGINT PRIMARY KEY,
        machine_id TEXT NOT NULL UNIQUE REFERENCES machines (id) ON DELETE CASCADE,
        created_at TEXT NOT NULL
    );
    CREATE TABLE free_blocks (block BIGINT PRIMARY KEY);
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        key_prefix TEXT NOT NULL,
        key_hash BYTEA NOT NULL UNIQUE,
        scopes TEXT NOT NULL,
        expires_at TEXT,
        last_used_at TEXT,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    );
    CREATE INDEX api_keys_by_prefix ON api_keys (key_prefix);
    CREATE TABLE volumes (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        size_mib BIGINT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE machine_secrets (
        machine_id TEXT NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        value BYTEA NOT NULL,
        PRIMARY KEY (machine_id, name)
    );
    CREATE TABLE events (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        machine_id TEXT NOT NULL,
        machine_name TEXT NOT NULL,
        type TEXT NOT NULL,
        body TEXT NOT NULL
    );
    CREATE TABLE webhooks (
        id TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        events TEXT NOT NULL,
        label_selector TEXT,
        secret BYTEA,
        created_at TEXT NOT NULL
    );
    CREATE TABLE webhook_deliveries (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        webhook_id TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
        event_id BIGINT NOT NULL,
        event_type TEXT NOT NULL,
        machine_id TEXT NOT NULL,
        event TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts BIGINT NOT NULL,
        next_attempt_at BIGINT,
        last_status_code BIGINT,
        last_error TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
    CREATE INDEX webhook_deliveries_by_webhook ON webhook_deliveries (webhook_id, id);
    "#,
    "",
    "",
    "",
    "",
    "",
    // 7: child machines (see the SQLite step).
    r#"
    CREATE INDEX machines_by_parent ON machines ((spec::jsonb ->> 'parent_id'))
        WHERE (spec::jsonb ->> 'parent_id') IS NOT NULL;
    CREATE TABLE child_tokens (
        machine_id TEXT PRIMARY KEY REFERENCES machines (id) ON DELETE CASCADE,
        token_hash BYTEA NOT NULL UNIQUE,
        created_at TEXT NOT NULL
    );
    "#,
    // 8: a fleet (see the SQLite step).
    r#"
    CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        url TEXT,
        vcpus BIGINT NOT NULL,
        mem_mib BIGINT NOT NULL,
        overcommit TEXT,
        runtimes TEXT NOT NULL,
        labels TEXT NOT NULL,
        drained BIGINT NOT NULL DEFAULT 0,
        heartbeat_ms BIGINT NOT NULL,
        started_at TEXT NOT NULL
    );
    ALTER TABLE machines ADD COLUMN node TEXT NOT NULL DEFAULT '';
    CREATE INDEX machines_by_node ON machines (node, status);
    ALTER TABLE leases ADD COLUMN node TEXT NOT NULL DEFAULT '';
    ALTER TABLE leases DROP CONSTRAINT leases_pkey;
    ALTER TABLE leases ADD PRIMARY KEY (node, block);
    ALTER TABLE free_blocks ADD COLUMN node TEXT NOT NULL DEFAULT '';
    ALTER TABLE free_blocks DROP CONSTRAINT free_blocks_pkey;
    ALTER TABLE free_blocks ADD PRIMARY KEY (node, block);
    "#,
    // 9: what a machine reserves, as columns (see the SQLite step).
    r#"
    ALTER TABLE machines ADD COLUMN vcpus BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE machines ADD COLUMN mem_mib BIGINT NOT NULL DEFAULT 0;
    UPDATE machines SET vcpus = COALESCE((spec::jsonb ->> 'vcpu_count')::bigint, 0),
        mem_mib = COALESCE((spec::jsonb ->> 'mem_size_mib')::bigint, 0);
    CREATE INDEX machines_reserved ON machines (node, vcpus, mem_mib);
    "#,
    // 10: see NODE_ADDRESSING.
    NODE_ADDRESSING,
];

#[cfg(test)]
mod tests {
    #[test]
    fn both_dialects_have_every_schema_step() {
        assert_eq!(super::SQLITE.len(), super::POSTGRES.len());
    }
}
