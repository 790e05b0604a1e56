//! API keys as a small service below the HTTP layer: checking and creating keys (a key never grants more than
//! it has), listing, revoking, and resolving a secret to its key through a short-lived cache.
//! Used by the API (`api/auth.rs`, `api/keys.rs`) and by the offline CLI (`hyperfleet keys`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyperfleet_types::{ApiKey, CreateApiKey, Scope, timestamp};
use time::OffsetDateTime;

use crate::store::api_keys::{self, NewKey};
use crate::store::{Store, StoreError};

/// How long a resolved key is reused without reading the database. A revoke through the API takes effect at
/// once (it clears the entry); one written to the database by `hyperfleet keys revoke` takes effect within
/// this time. Expiry is checked on every request.
pub(crate) const CACHE_TTL: Duration = Duration::from_secs(5);

/// Resolved keys kept at most; past this, stale entries are dropped, then all if every one is fresh.
const CACHE_MAX: usize = 1024;

/// How often a key's `last_used_at` is written at most (a write per request would cost throughput).
const TOUCH_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyError {
    /// The request is malformed (400).
    #[error("{0}")]
    Invalid(String),
    /// The request asks for more than the creating key has (403).
    #[error("{0}")]
    Escalation(String),
    #[error("API key with id '{0}' not found")]
    NotFound(String),
    #[error("Invalid API key")]
    Unknown,
    #[error("API key has been revoked")]
    Revoked,
    #[error("API key has expired")]
    Expired,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Who asks for a new key: the host's administrator (offline CLI, or a daemon with auth disabled) may create
/// any key; a key may create only keys within its own scopes and lifetime.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Grantor<'a> {
    Host,
    Key(&'a ApiKey),
}

/// A key request that passed [`validate`]: trimmed name, at least one scope, a future expiry in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyRequest {
    pub name: String,
    pub scopes: Vec<Scope>,
    pub expires_at: Option<OffsetDateTime>,
}

/// Checks a key request against the clock `now`.
pub(crate) fn validate(req: CreateApiKey, now: OffsetDateTime) -> Result<KeyRequest, KeyError> {
    let name = req.name.trim();
    if name.is_empty() || req.name.len() > 100 {
        return Err(KeyError::Invalid("name must be 1-100 characters".into()));
    }
    if name.chars().any(char::is_control) {
        return Err(KeyError::Invalid("name must not contain control characters (NUL, newline, ...)".into()));
    }
    if req.scopes.is_empty() {
        return Err(KeyError::Invalid(
            "scopes must list at least one scope (machines:read, machines:write, machines:exec, keys:admin, *)".into(),
        ));
    }
    // Kept as stored and shown (milliseconds), so the expiry compared here is the one a later request sees.
    let expires_at = req.expires_at.map(|t| t.replace_millisecond(t.millisecond()).unwrap_or(t));
    if expires_at.is_some_and(|t| t <= now) {
        return Err(KeyError::Invalid("expires_at must be in the future".into()));
    }
    Ok(KeyRequest { name: name.to_string(), scopes: req.scopes, expires_at })
}

/// The no-escalation rule: a key grants only scopes it has itself (`*` only if it has `*`) and no longer
/// lifetime than its own.
pub(crate) fn check_grant(by: Grantor<'_>, req: &KeyRequest) -> Result<(), KeyError> {
    let Grantor::Key(creator) = by else {
        return Ok(());
    };
    let has_all = creator.scopes.contains(&Scope::All);
    for scope in &req.scopes {
        if *scope == Scope::All && !has_all {
            return Err(KeyError::Escalation("cannot grant scope *: only a key with scope * can".into()));
        }
        if !has_all && !creator.scopes.contains(scope) {
            let own: Vec<&str> = creator.scopes.iter().map(|s| s.as_str()).collect();
            return Err(KeyError::Escalation(format!(
                "cannot grant scope {scope}: this key has only {}",
                own.join(", ")
            )));
        }
    }
    if let Some(limit) = creator.expires_at {
        match req.expires_at {
            None => {
                return Err(KeyError::Escalation(format!(
                    "cannot create a key that never expires: this key expires at {}; set expires_at no later",
                    timestamp::format(limit)
                )));
            }
            Some(t) if t > limit => {
                return Err(KeyError::Escalation(format!(
                    "cannot grant expires_at {}: this key expires at {}",
                    timestamp::format(t),
                    timestamp::format(limit)
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Whether `key` may be used at `now`.
fn usable(key: &ApiKey, now: OffsetDateTime) -> Result<(), KeyError> {
    if key.revoked_at.is_some() {
        return Err(KeyError::Revoked);
    }
    if key.expires_at.is_some_and(|t| t <= now) {
        return Err(KeyError::Expired);
    }
    Ok(())
}

pub(crate) struct Keys {
    store: Store,
    cache: Mutex<Cache>,
    touched: Mutex<HashMap<String, Instant>>,
}

#[derive(Default)]
struct Cache {
    entries: HashMap<[u8; 32], Cached>,
    /// Bumped by every revoke, so a lookup that read the row before the revoke does not cache it after.
    generation: u64,
}

struct Cached {
    key: Arc<ApiKey>,
    loaded: Instant,
}

impl Keys {
    pub(crate) fn new(store: Store) -> Self {
        Self { store, cache: Mutex::default(), touched: Mutex::default() }
    }

    /// Resolves a secret (`hf_…`) to a usable key; records its use at most every [`TOUCH_EVERY`].
    pub(crate) async fn authenticate(&self, secret: &str) -> Result<Arc<ApiKey>, KeyError> {
        if !api_keys::well_formed(secret) {
            return Err(KeyError::Unknown);
        }
        let hash = api_keys::hash(secret);
        let (hit, generation) = {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            let hit = cache.entries.get(&hash).filter(|c| c.loaded.elapsed() < CACHE_TTL).map(|c| c.key.clone());
            (hit, cache.generation)
        };
        let key = match hit {
            Some(key) => key,
            None => {
                let found = api_keys::find(&mut *self.store.read().await?, secret).await?;
                let key = Arc::new(found.ok_or(KeyError::Unknown)?);
                self.remember(hash, key.clone(), generation);
                key
            }
        };
        usable(&key, OffsetDateTime::now_utc())?;
        self.touch(&key.id);
        Ok(key)
    }

    fn remember(&self, hash: [u8; 32], key: Arc<ApiKey>, generation: u64) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.generation != generation {
            return;
        }
        if cache.entries.len() >= CACHE_MAX {
            cache.entries.retain(|_, c| c.loaded.elapsed() < CACHE_TTL);
            if cache.entries.len() >= CACHE_MAX {
                cache.entries.clear();
            }
        }
        cache.entries.insert(hash, Cached { key, loaded: Instant::now() });
    }

    fn forget(&self, id: &str) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.generation += 1;
        cache.entries.retain(|_, c| c.key.id != id);
    }

    fn touch(&self, id: &str) {
        let now = Instant::now();
        let mut touched = self.touched.lock().unwrap_or_else(|e| e.into_inner());
        if touched.get(id).is_some_and(|t| now.duration_since(*t) < TOUCH_EVERY) {
            return;
        }
        touched.insert(id.to_string(), now);
        let (store, id) = (self.store.clone(), id.to_string());
        tokio::spawn(async move {
            let touched = async {
                let mut tx = store.write().await?;
                api_keys::touch(&mut tx, &id).await?;
                tx.commit().await
            };
            if let Err(e) = touched.await {
                tracing::warn!("record API key use: {e}");
            }
        });
    }

    /// Creates a key for `by`, within what `by` may grant; the secret is in the result, and only there.
    pub(crate) async fn create(&self, req: CreateApiKey, by: Grantor<'_>) -> Result<NewKey, KeyError> {
        let req = validate(req, OffsetDateTime::now_utc())?;
        check_grant(by, &req)?;
        let mut tx = self.store.write().await?;
        let made = api_keys::create(&mut tx, &req.name, &req.scopes, req.expires_at).await?;
        tx.commit().await?;
        Ok(made)
    }

    pub(crate) async fn list(&self) -> Result<Vec<ApiKey>, KeyError> {
        Ok(api_keys::list(&mut *self.store.read().await?).await?)
    }

    /// Revokes a key; requests with it fail from now on (in this process; see [`CACHE_TTL`] for others).
    pub(crate) async fn revoke(&self, id: &str) -> Result<ApiKey, KeyError> {
        let mut tx = self.store.write().await?;
        let revoked = api_keys::revoke(&mut tx, id).await?;
        tx.commit().await?;
        self.forget(id);
        revoked.ok_or_else(|| KeyError::NotFound(id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::TestDb;

    fn at(s: &str) -> OffsetDateTime {
        timestamp::parse(s).unwrap()
    }

    fn key(scopes: &[Scope], expires_at: Option<&str>) -> ApiKey {
        ApiKey {
            id: "key_creator".into(),
            name: "creator".into(),
            key_prefix: "hf_AbCdEfGh".into(),
            scopes: scopes.to_vec(),
            expires_at: expires_at.map(at),
            last_used_at: None,
            created_at: at("2026-01-01T00:00:00Z"),
            revoked_at: None,
        }
    }

    fn request(scopes: &[Scope], expires_at: Option<&str>) -> KeyRequest {
        KeyRequest { name: "new".into(), scopes: scopes.to_vec(), expires_at: expires_at.map(at) }
    }

    #[test]
    fn a_key_grants_only_what_it_has() {
        use Scope::*;
        let admin_reader = key(&[KeysAdmin, MachinesRead], None);
        let by = Grantor::Key(&admin_reader);
        assert!(check_grant(by, &request(&[MachinesRead], None)).is_ok());
        assert!(check_grant(by, &request(&[KeysAdmin, MachinesRead], None)).is_ok());
        let e = check_grant(by, &request(&[MachinesRead, MachinesExec], None)).unwrap_err().to_string();
        assert_eq!(e, "cannot grant scope machines:exec: this key has only keys:admin, machines:read");
        let e = check_grant(by, &request(&[All], None)).unwrap_err().to_string();
        assert_eq!(e, "cannot grant scope *: only a key with scope * can");

        let root = key(&[All], None);
        assert!(check_grant(Grantor::Key(&root), &request(&[All], None)).is_ok());
        assert!(check_grant(Grantor::Key(&root), &request(&[MachinesExec, KeysAdmin], None)).is_ok());
        assert!(check_grant(Grantor::Host, &request(&[All], None)).is_ok());
    }

    #[test]
    fn a_key_grants_no_longer_life_than_its_own() {
        let expiring = key(&[Scope::All], Some("2030-01-01T00:00:00.000Z"));
        let by = Grantor::Key(&expiring);
        assert!(check_grant(by, &request(&[Scope::All], Some("2029-12-31T23:59:59Z"))).is_ok());
        assert!(check_grant(by, &request(&[Scope::All], Some("2030-01-01T00:00:00Z"))).is_ok(), "same instant");
        let e = check_grant(by, &request(&[Scope::MachinesRead], Some("2030-01-01T00:00:00.001Z"))).unwrap_err();
        assert!(matches!(e, KeyError::Escalation(_)));
        assert_eq!(
            e.to_string(),
            "cannot grant expires_at 2030-01-01T00:00:00.001Z: this key expires at 2030-01-01T00:00:00.000Z"
        );
        let e = check_grant(by, &request(&[Scope::MachinesRead], None)).unwrap_err().to_string();
        assert!(e.contains("never expires") && e.contains("2030-01-01T00:00:00.000Z"), "{e}");
        assert!(check_grant(Grantor::Host, &request(&[Scope::MachinesRead], None)).is_ok());
    }

    #[test]
    fn requests_are_validated() {
        let now = at("2026-06-01T00:00:00Z");
        let req = |name: &str, scopes: Vec<Scope>, exp: Option<&str>| CreateApiKey {
            name: name.into(),
            scopes,
            expires_at: exp.map(at),
        };
        let ok =
            validate(req("  ci ", vec![Scope::MachinesRead], Some("2026-06-02T00:00:00.123456+02:00")), now).unwrap();
        assert_eq!(ok.name, "ci");
        assert_eq!(ok.expires_at.map(timestamp::format).as_deref(), Some("2026-06-01T22:00:00.123Z"));
        assert_eq!(ok.expires_at.unwrap().nanosecond(), 123_000_000, "truncated to what is stored");
        for (r, msg) in [
            (req(" ", vec![Scope::MachinesRead], None), "name must be 1-100 characters"),
            (req(&"x".repeat(101), vec![Scope::MachinesRead], None), "name must be 1-100 characters"),
            (req("c\0i", vec![Scope::MachinesRead], None), "name must not contain control characters"),
            (req("ci", vec![], None), "scopes must list at least one scope"),
            (req("ci", vec![Scope::MachinesRead], Some("2026-05-31T23:59:59Z")), "expires_at must be in the future"),
        ] {
            let e = validate(r, now).unwrap_err();
            assert!(matches!(&e, KeyError::Invalid(m) if m.starts_with(msg)), "{e}");
        }
    }

    #[tokio::test]
    async fn the_cache_serves_steady_clients_and_forgets_revoked_keys() {
        let db = TestDb::sqlite().await;
        let store = db.store.clone();
        let keys = Keys::new(store.clone());
        let made = keys
            .create(
                CreateApiKey { name: "ci".into(), scopes: vec![Scope::MachinesRead], expires_at: None },
                Grantor::Host,
            )
            .await
            .unwrap();
        assert_eq!(keys.authenticate(&made.secret).await.unwrap().id, made.key.id);

        // A revoke written behind the service's back (the offline CLI) is not seen while the entry is fresh...
        let mut tx = store.write().await.unwrap();
        api_keys::revoke(&mut tx, &made.key.id).await.unwrap();
        tx.commit().await.unwrap();
        assert!(keys.authenticate(&made.secret).await.is_ok(), "served from the cache");
        // ...until it is stale.
        keys.cache.lock().unwrap().entries.values_mut().for_each(|c| c.loaded -= CACHE_TTL);
        assert!(matches!(keys.authenticate(&made.secret).await, Err(KeyError::Revoked)));

        // A revoke through the service takes effect at once.
        let other = keys
            .create(
                CreateApiKey { name: "b".into(), scopes: vec![Scope::MachinesRead], expires_at: None },
                Grantor::Host,
            )
            .await
            .unwrap();
        keys.authenticate(&other.secret).await.unwrap();
        keys.revoke(&other.key.id).await.unwrap();
        assert!(matches!(keys.authenticate(&other.secret).await, Err(KeyError::Revoked)));
        assert!(matches!(keys.revoke("key_missing").await, Err(KeyError::NotFound(_))));
        assert!(matches!(keys.authenticate("hf_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").await, Err(KeyError::Unknown)));
    }

    #[tokio::test]
    async fn use_is_recorded_at_most_every_touch_interval() {
        let db = TestDb::sqlite().await;
        let keys = Keys::new(db.store.clone());
        let made = keys
            .create(CreateApiKey { name: "t".into(), scopes: vec![Scope::All], expires_at: None }, Grantor::Host)
            .await
            .unwrap();
        let last_used = || async { keys.list().await.unwrap()[0].last_used_at };
        assert_eq!(last_used().await, None);
        keys.authenticate(&made.secret).await.unwrap();
        let mut first = None;
        for _ in 0..100 {
            first = last_used().await;
            if first.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(first.is_some(), "the first use is recorded");
        tokio::time::sleep(Duration::from_millis(5)).await;
        keys.authenticate(&made.secret).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(last_used().await, first, "not rewritten within {TOUCH_EVERY:?}");
    }

    #[tokio::test]
    async fn expiry_is_checked_on_every_cached_hit() {
        let db = TestDb::sqlite().await;
        let keys = Keys::new(db.store.clone());
        let soon = OffsetDateTime::now_utc() + time::Duration::milliseconds(300);
        let made = keys
            .create(CreateApiKey { name: "s".into(), scopes: vec![Scope::All], expires_at: Some(soon) }, Grantor::Host)
            .await
            .unwrap();
        keys.authenticate(&made.secret).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(matches!(keys.authenticate(&made.secret).await, Err(KeyError::Expired)));
    }
}
