//! The `api_keys` table and the key format: `hf_` + 32 alphanumerics from the OS CSPRNG. Only the SHA-256 of
//! a key is stored; lookups go by its 11-character prefix and the hash is compared in constant time.

use hyperfleet_types::{ApiKey, Scope, timestamp};
use rand::Rng;
use rand::distributions::Alphanumeric;
use sha2::{Digest, Sha256};
use sqlx::any::AnyRow;
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

use super::{Conn, StoreError, StoreResult, col, int, opt_time_col};

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

fn from_row(row: &AnyRow) -> StoreResult<ApiKey> {
    let scopes: String = col(row, "scopes")?;
    Ok(ApiKey {
        id: col(row, "id")?,
        name: col(row, "name")?,
        key_prefix: col(row, "key_prefix")?,
        scopes: serde_json::from_str(&scopes).unwrap_or_default(),
        expires_at: opt_time_col(row, "expires_at")?,
        last_used_at: opt_time_col(row, "last_used_at")?,
        created_at: opt_time_col(row, "created_at")?
            .ok_or_else(|| StoreError::Corrupt("api key without created_at".into()))?,
        revoked_at: opt_time_col(row, "revoked_at")?,
    })
}

const SELECT: &str =
    "SELECT id, name, key_prefix, scopes, expires_at, last_used_at, created_at, revoked_at, key_hash FROM api_keys";

pub(crate) async fn create(
    c: &mut Conn,
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
    sqlx::query(
        "INSERT INTO api_keys (id, name, key_prefix, key_hash, scopes, expires_at, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&key.id)
    .bind(&key.name)
    .bind(&key.key_prefix)
    .bind(hash(&secret).to_vec())
    .bind(scopes_to_text(scopes))
    .bind(key.expires_at.map(timestamp::format))
    .bind(timestamp::format(key.created_at))
    .execute(c)
    .await?;
    Ok(NewKey { secret, key })
}

pub(crate) async fn list(c: &mut Conn) -> StoreResult<Vec<ApiKey>> {
    sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} ORDER BY created_at, id")))
        .fetch_all(c)
        .await?
        .iter()
        .map(from_row)
        .collect()
}

pub(crate) async fn count(c: &mut Conn) -> StoreResult<u64> {
    int("count", sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM api_keys").fetch_one(c).await?)
}

pub(crate) async fn get(c: &mut Conn, id: &str) -> StoreResult<Option<ApiKey>> {
    sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} WHERE id = $1")))
        .bind(id)
        .fetch_optional(c)
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// Marks the key revoked; returns it, or `None` when there is no such key. Revoking twice keeps the first time.
pub(crate) async fn revoke(c: &mut Conn, id: &str) -> StoreResult<Option<ApiKey>> {
    sqlx::query("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2")
        .bind(timestamp::format(timestamp::now()))
        .bind(id)
        .execute(&mut *c)
        .await?;
    get(c, id).await
}

/// The stored key matching `secret`, compared by hash in constant time.
pub(crate) async fn find(c: &mut Conn, secret: &str) -> StoreResult<Option<ApiKey>> {
    if !well_formed(secret) {
        return Ok(None);
    }
    let wanted = hash(secret);
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} WHERE key_prefix = $1")))
        .bind(&secret[..SHOWN_PREFIX_LEN])
        .fetch_all(c)
        .await?;
    let mut found = None;
    for row in &rows {
        let stored: Vec<u8> = col(row, "key_hash")?;
        if bool::from(stored.ct_eq(&wanted)) {
            found = Some(from_row(row)?);
        }
    }
    Ok(found)
}

pub(crate) async fn touch(c: &mut Conn, id: &str) -> StoreResult<()> {
    sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
        .bind(timestamp::format(timestamp::now()))
        .bind(id)
        .execute(c)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::backend_tests;

    backend_tests! {
        async fn keys_are_hashed_found_and_revoked(store, _db) {
            let mut c = store.write().await.unwrap();
            let k = create(&mut c, "ci", &[Scope::MachinesRead], None).await.unwrap();
            assert!(well_formed(&k.secret), "{}", k.secret);
            assert_eq!(k.key.key_prefix, &k.secret[..11]);
            let stored: Vec<u8> = sqlx::query_scalar("SELECT key_hash FROM api_keys").fetch_one(&mut *c).await.unwrap();
            assert_eq!(stored, hash(&k.secret).to_vec());
            let raw: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE key_hash = $1 OR key_prefix = $2")
                .bind(k.secret.as_bytes().to_vec())
                .bind(&k.secret)
                .fetch_one(&mut *c)
                .await
                .unwrap();
            assert_eq!(raw, 0, "the secret itself is never stored");
            assert_eq!(find(&mut c, &k.secret).await.unwrap().unwrap().id, k.key.id);
            let mut wrong = k.secret.clone();
            wrong.replace_range(20..21, if &wrong[20..21] == "a" { "b" } else { "a" });
            assert!(find(&mut c, &wrong).await.unwrap().is_none());
            assert!(find(&mut c, "hf_short").await.unwrap().is_none());
            let r = revoke(&mut c, &k.key.id).await.unwrap().unwrap();
            assert!(r.revoked_at.is_some());
            assert!(revoke(&mut c, "key_missing").await.unwrap().is_none());
            assert_eq!(count(&mut c).await.unwrap(), 1);
            c.commit().await.unwrap();
            assert_eq!(list(&mut store.read().await.unwrap()).await.unwrap().len(), 1);
        }
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
