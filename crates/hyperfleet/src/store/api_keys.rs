//! The `api_keys` table and the key format: `hf_` + 32 alphanumerics from the OS CSPRNG. Only the SHA-256 of
//! a key is stored; lookups go by its 11-character prefix and the hash is compared in constant time.

use hyperfleet_types::{ApiKey, Scope, timestamp};
use rand::Rng;
use rand::distributions::Alphanumeric;
use rusqlite::types::Type;
use rusqlite::{Connection, OptionalExtension, Row, params};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

use super::StoreResult;

pub(crate) const KEY_PREFIX: &str = "hf_";
const SECRET_LEN: usize = 32;
const SHOWN_PREFIX_LEN: usize = 11;

/// A freshly made key: the secret (shown once) and the row stored for it.
pub(crate) struct NewKey {
    pub secret: String,
    pub key: ApiKey,
}

pub(crate) fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Whether `s` has the shape of a key, before any lookup.
pub(crate) fn well_formed(s: &str) -> bool {
    s.len() == KEY_PREFIX.len() + SECRET_LEN
        && s.starts_with(KEY_PREFIX)
        && s[KEY_PREFIX.len()..].bytes().all(|b| b.is_ascii_alphanumeric())
}

pub(crate) fn generate_secret() -> String {
    let body: String = rand::rngs::OsRng.sample_iter(&Alphanumeric).take(SECRET_LEN).map(char::from).collect();
    format!("{KEY_PREFIX}{body}")
}

fn scopes_to_text(scopes: &[Scope]) -> String {
    // Scopes are plain strings: the JSON array is written by hand rather than through a fallible serializer.
    let quoted: Vec<String> = scopes.iter().map(|s| format!("\"{}\"", s.as_str())).collect();
    format!("[{}]", quoted.join(","))
}

/// A stored time column (RFC 3339 text, as [`timestamp::format`] writes it).
fn time_at(row: &Row, idx: usize) -> rusqlite::Result<Option<OffsetDateTime>> {
    match row.get::<_, Option<String>>(idx)? {
        None => Ok(None),
        Some(text) => timestamp::parse(&text).map(Some).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                idx,
                Type::Text,
                format!("'{text}' is not an RFC 3339 time").into(),
            )
        }),
    }
}

fn from_row(row: &Row) -> rusqlite::Result<ApiKey> {
    let scopes: String = row.get(3)?;
    Ok(ApiKey {
        id: row.get(0)?,
        name: row.get(1)?,
        key_prefix: row.get(2)?,
        scopes: serde_json::from_str(&scopes).unwrap_or_default(),
        expires_at: time_at(row, 4)?,
        last_used_at: time_at(row, 5)?,
        created_at: time_at(row, 6)?.ok_or(rusqlite::Error::InvalidColumnType(6, "created_at".into(), Type::Null))?,
        revoked_at: time_at(row, 7)?,
    })
}

const COLUMNS: &str = "id, name, key_prefix, scopes, expires_at, last_used_at, created_at, revoked_at";

pub(crate) fn create(
    conn: &Connection,
    name: &str,
    scopes: &[Scope],
    expires_at: Option<OffsetDateTime>,
) -> StoreResult<NewKey> {
    let secret = generate_secret();
    let key = ApiKey {
        id: format!("key_{}", super::random_id()),
        name: name.to_string(),
        key_prefix: secret[..SHOWN_PREFIX_LEN].to_string(),
        scopes: scopes.to_vec(),
        expires_at,
        last_used_at: None,
        created_at: timestamp::now(),
        revoked_at: None,
    };
    conn.execute(
        "INSERT INTO api_keys (id, name, key_prefix, key_hash, scopes, expires_at, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            key.id,
            key.name,
            key.key_prefix,
            &hash(&secret)[..],
            scopes_to_text(scopes),
            key.expires_at.map(timestamp::format),
            timestamp::format(key.created_at)
        ],
    )?;
    Ok(NewKey { secret, key })
}

pub(crate) fn list(conn: &Connection) -> StoreResult<Vec<ApiKey>> {
    Ok(conn
        .prepare(&format!("SELECT {COLUMNS} FROM api_keys ORDER BY created_at, id"))?
        .query_map([], from_row)?
        .collect::<Result<_, _>>()?)
}

pub(crate) fn count(conn: &Connection) -> StoreResult<u64> {
    Ok(conn.query_row("SELECT COUNT(*) FROM api_keys", [], |r| r.get(0))?)
}

pub(crate) fn get(conn: &Connection, id: &str) -> StoreResult<Option<ApiKey>> {
    Ok(conn.query_row(&format!("SELECT {COLUMNS} FROM api_keys WHERE id = ?1"), [id], from_row).optional()?)
}

/// Marks the key revoked; returns it, or `None` when there is no such key. Revoking twice keeps the first time.
pub(crate) fn revoke(conn: &Connection, id: &str) -> StoreResult<Option<ApiKey>> {
    conn.execute(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?1) WHERE id = ?2",
        params![timestamp::format(timestamp::now()), id],
    )?;
    get(conn, id)
}

/// The stored key matching `secret`, compared by hash in constant time.
pub(crate) fn find(conn: &Connection, secret: &str) -> StoreResult<Option<ApiKey>> {
    if !well_formed(secret) {
        return Ok(None);
    }
    let wanted = hash(secret);
    let mut stmt = conn.prepare(&format!("SELECT {COLUMNS}, key_hash FROM api_keys WHERE key_prefix = ?1"))?;
    let mut rows = stmt.query([&secret[..SHOWN_PREFIX_LEN]])?;
    let mut found = None;
    while let Some(row) = rows.next()? {
        let stored: Vec<u8> = row.get(8)?;
        if bool::from(stored.ct_eq(&wanted)) {
            found = Some(from_row(row)?);
        }
    }
    Ok(found)
}

pub(crate) fn touch(conn: &Connection, id: &str) -> StoreResult<()> {
    conn.execute(
        "UPDATE api_keys SET last_used_at = ?1 WHERE id = ?2",
        params![timestamp::format(timestamp::now()), id],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::temp_store;

    #[test]
    fn keys_are_hashed_found_and_revoked() {
        let (_d, store) = temp_store();
        store
            .call_blocking(|c| {
                let k = create(c, "ci", &[Scope::MachinesRead], None)?;
                assert!(well_formed(&k.secret), "{}", k.secret);
                assert_eq!(k.key.key_prefix, &k.secret[..11]);
                let stored: Vec<u8> = c.query_row("SELECT key_hash FROM api_keys", [], |r| r.get(0))?;
                assert_eq!(stored, hash(&k.secret).to_vec());
                let raw: i64 = c.query_row(
                    "SELECT COUNT(*) FROM api_keys WHERE key_hash = ?1 OR key_prefix = ?1",
                    [&k.secret],
                    |r| r.get(0),
                )?;
                assert_eq!(raw, 0, "the secret itself is never stored");
                assert_eq!(find(c, &k.secret)?.unwrap().id, k.key.id);
                let mut wrong = k.secret.clone();
                wrong.replace_range(20..21, if &wrong[20..21] == "a" { "b" } else { "a" });
                assert!(find(c, &wrong)?.is_none());
                assert!(find(c, "hf_short")?.is_none());
                let r = revoke(c, &k.key.id)?.unwrap();
                assert!(r.revoked_at.is_some());
                assert!(revoke(c, "key_missing")?.is_none());
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn generated_keys_differ_and_have_the_documented_shape() {
        let a = generate_secret();
        let b = generate_secret();
        assert_ne!(a, b);
        assert_eq!(a.len(), 35);
        assert!(well_formed(&a));
        assert!(!well_formed("hf_0123456789012345678901234567890!"));
        assert!(!well_formed("xx_01234567890123456789012345678901"));
    }
}
