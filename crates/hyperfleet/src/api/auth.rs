//! API-key authentication and the scope each route needs, in one table ([`required_scope`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyperfleet_types::{ApiKey, Scope};

use super::AppState;
use super::error::ApiError;
use crate::store::{Store, api_keys, parse_time};

/// How often a key's `last_used_at` is written at most (a write per request would cost throughput).
const TOUCH_EVERY: Duration = Duration::from_secs(30);

pub struct Auth {
    pub store: Store,
    pub disabled: bool,
    touched: Mutex<HashMap<String, Instant>>,
}

impl Auth {
    pub fn new(store: Store, disabled: bool) -> Self {
        Self { store, disabled, touched: Mutex::new(HashMap::new()) }
    }

    /// Resolves the `Authorization` header to a usable key, or the documented 401.
    pub async fn authenticate(&self, header: Option<&str>) -> Result<ApiKey, ApiError> {
        let header = header.ok_or_else(|| ApiError::unauthorized("Authorization header is required"))?;
        let secret = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or_else(|| ApiError::unauthorized("Invalid API key"))?;
        if !api_keys::well_formed(secret) {
            return Err(ApiError::unauthorized("Invalid API key"));
        }
        let s = secret.to_string();
        let key = self
            .store
            .call(move |c| api_keys::find(c, &s))
            .await?
            .ok_or_else(|| ApiError::unauthorized("Invalid API key"))?;
        if key.revoked_at.is_some() {
            return Err(ApiError::unauthorized("API key has been revoked"));
        }
        if let Some(exp) = key.expires_at.as_deref().and_then(parse_time)
            && exp <= time::OffsetDateTime::now_utc()
        {
            return Err(ApiError::unauthorized("API key has expired"));
        }
        self.touch(&key.id);
        Ok(key)
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
            let _ = store.call(move |c| api_keys::touch(c, &id)).await;
        });
    }
}

/// The scope a route needs; `None` for the public ones.
pub fn required_scope(method: &Method, path: &str) -> Option<Scope> {
    use Scope::*;
    let p = path.strip_prefix("/machines").unwrap_or(path);
    match (method, path) {
        (_, "/health") => None,
        (_, p) if p == "/docs" || p.starts_with("/docs/") => None,
        (_, p) if p.starts_with("/api-keys") => Some(KeysAdmin),
        _ if p.ends_with("/exec") || p.ends_with("/exec/stream") || p.contains("/files") => Some(MachinesExec),
        (&Method::GET, _) => Some(MachinesRead),
        _ => Some(MachinesWrite),
    }
}

pub fn allows(key: &ApiKey, scope: Scope) -> bool {
    key.scopes.iter().any(|s| *s == scope || *s == Scope::All)
}

/// Middleware: authenticates and checks the route's scope.
pub async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string());
    let scope = match path {
        Some(p) => required_scope(req.method(), &p),
        None => return next.run(req).await, // unmatched: the fallback answers 404
    };
    let Some(scope) = scope else {
        return next.run(req).await;
    };
    if state.auth.disabled {
        return next.run(req).await;
    }
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match state.auth.authenticate(header).await {
        Ok(key) if allows(&key, scope) => {
            tracing::debug!(key = %key.id, scope = %scope, "authorized");
            let mut req = req;
            req.extensions_mut().insert(Arc::new(key));
            next.run(req).await
        }
        Ok(_) => ApiError::forbidden().into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_table() {
        use Scope::*;
        let cases = [
            (Method::GET, "/health", None),
            (Method::GET, "/docs/json", None),
            (Method::GET, "/machines", Some(MachinesRead)),
            (Method::GET, "/machines/{id}", Some(MachinesRead)),
            (Method::GET, "/machines/{id}/wait", Some(MachinesRead)),
            (Method::GET, "/machines/{id}/logs", Some(MachinesRead)),
            (Method::POST, "/machines", Some(MachinesWrite)),
            (Method::POST, "/machines/{id}/start", Some(MachinesWrite)),
            (Method::PATCH, "/machines/{id}", Some(MachinesWrite)),
            (Method::DELETE, "/machines/{id}", Some(MachinesWrite)),
            (Method::POST, "/machines/{id}/exec", Some(MachinesExec)),
            (Method::POST, "/machines/{id}/exec/stream", Some(MachinesExec)),
            (Method::GET, "/machines/{id}/files", Some(MachinesExec)),
            (Method::GET, "/machines/{id}/files/stat", Some(MachinesExec)),
            (Method::GET, "/api-keys", Some(KeysAdmin)),
            (Method::DELETE, "/api-keys/{id}", Some(KeysAdmin)),
        ];
        for (m, p, want) in cases {
            assert_eq!(required_scope(&m, p), want, "{m} {p}");
        }
    }
}
