//! API-key authentication and the scope each route needs, in one table ([`required_scope`]).

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyperfleet_types::{ApiKey, Scope};

use super::AppState;
use super::error::ApiError;
use crate::keys::Keys;
use crate::store::Store;

pub(crate) struct Auth {
    pub keys: Keys,
    pub disabled: bool,
    /// `HYPERFLEET_METRICS_TOKEN`: a bearer token good for `GET /metrics` only (for a Prometheus server).
    pub metrics_token: Option<String>,
}

impl Auth {
    pub(crate) fn new(store: Store, disabled: bool, metrics_token: Option<String>) -> Self {
        Self { keys: Keys::new(store), disabled, metrics_token }
    }

    /// Whether `header` carries the metrics token (compared in constant time).
    fn is_metrics_token(&self, header: Option<&str>) -> bool {
        use subtle::ConstantTimeEq;
        let (Some(token), Some(header)) = (&self.metrics_token, header) else { return false };
        let given = header.strip_prefix("Bearer ").or_else(|| header.strip_prefix("bearer ")).unwrap_or("").trim();
        bool::from(given.as_bytes().ct_eq(token.as_bytes()))
    }

    /// Resolves the `Authorization` header to a usable key, or the documented 401.
    pub(crate) async fn authenticate(&self, header: Option<&str>) -> Result<Arc<ApiKey>, ApiError> {
        let header = header.ok_or_else(|| ApiError::unauthorized("Authorization header is required"))?;
        let secret = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or_else(|| ApiError::unauthorized("Invalid API key"))?;
        Ok(self.keys.authenticate(secret).await?)
    }
}

/// The scope a route needs; `None` for the public ones.
pub(crate) fn required_scope(method: &Method, path: &str) -> Option<Scope> {
    use Scope::*;
    let p = path.strip_prefix("/machines").unwrap_or(path);
    match (method, path) {
        (_, "/health") => None,
        (_, p) if p == "/docs" || p.starts_with("/docs/") => None,
        // The dashboard's static files; it signs in with a key the user types, kept in the browser.
        (_, p) if p == "/ui" || p.starts_with("/ui/") => None,
        (_, "/metrics") => Some(MetricsRead),
        (_, p) if p.starts_with("/api-keys") => Some(KeysAdmin),
        (_, p) if p == "/webhooks" || p.starts_with("/webhooks/") => Some(WebhooksAdmin),
        // The image cache: reading it is reading machines' inputs; pulling and deleting change them.
        (&Method::GET, p) if p.starts_with("/images") => Some(MachinesRead),
        (_, p) if p.starts_with("/images") => Some(MachinesWrite),
        _ if p.ends_with("/exec") || p.ends_with("/exec/stream") || p.ends_with("/pty") || p.contains("/files") => {
            Some(MachinesExec)
        }
        (&Method::GET, _) => Some(MachinesRead),
        _ => Some(MachinesWrite),
    }
}

pub(crate) fn allows(key: &ApiKey, scope: Scope) -> bool {
    key.scopes.iter().any(|s| *s == scope || *s == Scope::All)
}

/// Middleware: authenticates and checks the route's scope.
pub(crate) async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
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
    if scope == Scope::MetricsRead && state.auth.is_metrics_token(header) {
        return next.run(req).await;
    }
    match state.auth.authenticate(header).await {
        Ok(key) if allows(&key, scope) => {
            tracing::debug!(key = %key.id, scope = %scope, "authorized");
            let mut req = req;
            req.extensions_mut().insert(key);
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
            (Method::GET, "/machines/{id}/pty", Some(MachinesExec)),
            (Method::POST, "/machines/{id}/keepalive", Some(MachinesWrite)),
            (Method::GET, "/machines/{id}/files/list", Some(MachinesExec)),
            (Method::POST, "/machines/{id}/files/mkdir", Some(MachinesExec)),
            (Method::GET, "/volumes", Some(MachinesRead)),
            (Method::GET, "/volumes/{id}", Some(MachinesRead)),
            (Method::POST, "/volumes", Some(MachinesWrite)),
            (Method::POST, "/volumes/{id}/clone", Some(MachinesWrite)),
            (Method::DELETE, "/volumes/{id}", Some(MachinesWrite)),
            (Method::GET, "/api-keys", Some(KeysAdmin)),
            (Method::DELETE, "/api-keys/{id}", Some(KeysAdmin)),
            (Method::GET, "/events", Some(MachinesRead)),
            (Method::POST, "/webhooks", Some(WebhooksAdmin)),
            (Method::GET, "/webhooks", Some(WebhooksAdmin)),
            (Method::GET, "/webhooks/{id}", Some(WebhooksAdmin)),
            (Method::DELETE, "/webhooks/{id}", Some(WebhooksAdmin)),
            (Method::GET, "/webhooks/{id}/deliveries", Some(WebhooksAdmin)),
            (Method::GET, "/webhooksx", Some(MachinesRead)),
            (Method::GET, "/machines/{id}/stats", Some(MachinesRead)),
            (Method::GET, "/metrics", Some(MetricsRead)),
            (Method::GET, "/ui", None),
            (Method::GET, "/ui/{file}", None),
        ];
        for (m, p, want) in cases {
            assert_eq!(required_scope(&m, p), want, "{m} {p}");
        }
    }
}
