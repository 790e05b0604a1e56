//! API-key authentication and the scope each route needs, in one table ([`required_scope`]).

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyperfleet_types::{ApiKey, Scope};

use super::AppState;
use super::error::ApiError;
use crate::keys::Keys;
use crate::machines::children::ChildAccess;
use crate::nodes::Caller;
use crate::store::Store;
use crate::store::machines::MachineRecord;

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
        (&Method::GET, p) if p == "/nodes" || p.starts_with("/nodes/") => Some(MachinesRead),
        (_, p) if p.starts_with("/nodes/") => Some(NodesAdmin),
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

/// Set on every request of the child API listener: the TCP peer, which must be the token's own machine.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChildPeer(pub IpAddr);

/// Set on a request authorized by a child token: the machine whose token it is.
#[derive(Debug, Clone)]
pub(crate) struct ChildOf(pub Arc<MachineRecord>);

/// What a child token may do on a route (by its template), naming the `{id}` of the path; `None`: nothing.
/// Exactly: create, list its own children, and get, delete, start, stop, exec, files and wait of its children.
pub(crate) fn child_access<'a>(method: &Method, template: &str, path: &'a str) -> Option<ChildAccess<'a>> {
    let id = || path.split('/').nth(2).filter(|id| !id.is_empty() && !id.contains('%'));
    match (method, template) {
        (&Method::POST, "/machines") => Some(ChildAccess::Create),
        (&Method::GET, "/machines/{id}/children") => id().map(ChildAccess::ListChildren),
        (&Method::GET | &Method::DELETE, "/machines/{id}")
        | (&Method::POST, "/machines/{id}/start" | "/machines/{id}/stop")
        | (&Method::POST, "/machines/{id}/exec" | "/machines/{id}/exec/stream")
        | (&Method::GET, "/machines/{id}/wait")
        | (&Method::GET | &Method::POST | &Method::DELETE, "/machines/{id}/files")
        | (&Method::GET, "/machines/{id}/files/stat" | "/machines/{id}/files/list")
        | (&Method::POST, "/machines/{id}/files/mkdir") => id().map(ChildAccess::Child),
        _ => None,
    }
}

/// The child API's check: a current child token, presented from its own machine's guest address, for a
/// route and machine its tree allows. Any other request is refused (401 without a usable token, 403 else).
async fn require_child_token(state: &AppState, peer: IpAddr, mut req: Request, next: Next) -> Response {
    let Some(template) = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string()) else {
        return next.run(req).await; // unmatched: the fallback answers 404
    };
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let token = header.and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer "))).map(str::trim);
    let (Some(token), IpAddr::V4(peer)) = (token, peer) else {
        return ApiError::unauthorized("a child token is required (Authorization: Bearer hfc_...)").into_response();
    };
    let parent = match state.service.child_token_parent(token, peer).await {
        Ok(Some(p)) => p,
        Ok(None) => return ApiError::unauthorized("Invalid child token").into_response(),
        Err(e) => return ApiError::from(e).into_response(),
    };
    let path = req.uri().path().to_string();
    let Some(access) = child_access(req.method(), &template, &path) else {
        return ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "FORBIDDEN",
            "a child token may only create, list and drive its machine's own children",
        )
        .into_response();
    };
    if let Err(e) = state.service.check_child_access(&parent.id, access).await {
        return ApiError::from(e).into_response();
    }
    tracing::debug!(parent = %parent.id, "authorized by a child token");
    req.extensions_mut().insert(ChildOf(Arc::new(parent)));
    next.run(req).await
}

/// Middleware: authenticates and checks the route's scope.
pub(crate) async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(ChildPeer(peer)) = req.extensions().get::<ChildPeer>().copied() {
        return require_child_token(&state, peer, req, next).await;
    }
    let path = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string());
    let scope = match path {
        Some(p) => required_scope(req.method(), &p),
        None => return next.run(req).await, // unmatched: the fallback answers 404
    };
    let Some(scope) = scope else {
        return next.run(req).await;
    };
    // A call from another node of the fleet: its cluster secret stands in for the user's key, which that
    // node checked. Claiming to be a node without the secret is refused, whatever else the call carries.
    match state.service.nodes().caller(req.headers()) {
        Caller::Outside => {}
        Caller::Forged => {
            return ApiError::unauthorized("Invalid cluster secret: node-to-node calls need HYPERFLEET_CLUSTER_SECRET")
                .into_response();
        }
        Caller::Node(from) => {
            tracing::debug!(node = %from, "authorized by the cluster secret");
            let mut req = req;
            req.extensions_mut().insert(super::forward::FromNode(from));
            return next.run(req).await;
        }
    }
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
            (Method::GET, "/machines/{id}/children", Some(MachinesRead)),
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
            (Method::GET, "/nodes", Some(MachinesRead)),
            (Method::GET, "/nodes/{name}", Some(MachinesRead)),
            (Method::POST, "/nodes/{name}/drain", Some(NodesAdmin)),
            (Method::POST, "/nodes/{name}/undrain", Some(NodesAdmin)),
        ];
        for (m, p, want) in cases {
            assert_eq!(required_scope(&m, p), want, "{m} {p}");
        }
    }

    #[test]
    fn a_child_token_reaches_exactly_its_tree_routes() {
        use ChildAccess::*;
        let at = |m: Method, t: &str, p: &'static str| child_access(&m, t, p);
        assert_eq!(at(Method::POST, "/machines", "/machines"), Some(Create));
        assert_eq!(at(Method::GET, "/machines/{id}/children", "/machines/p1/children"), Some(ListChildren("p1")));
        for (m, t) in [
            (Method::GET, "/machines/{id}"),
            (Method::DELETE, "/machines/{id}"),
            (Method::POST, "/machines/{id}/start"),
            (Method::POST, "/machines/{id}/stop"),
            (Method::POST, "/machines/{id}/exec"),
            (Method::POST, "/machines/{id}/exec/stream"),
            (Method::GET, "/machines/{id}/wait"),
            (Method::GET, "/machines/{id}/files"),
            (Method::POST, "/machines/{id}/files"),
            (Method::DELETE, "/machines/{id}/files"),
            (Method::GET, "/machines/{id}/files/stat"),
            (Method::GET, "/machines/{id}/files/list"),
            (Method::POST, "/machines/{id}/files/mkdir"),
        ] {
            let path = t.replace("{id}", "kid");
            let path: &'static str = Box::leak(path.into_boxed_str());
            assert_eq!(at(m.clone(), t, path), Some(Child("kid")), "{m} {t}");
        }
        // Everything else: the machine list, keys, volumes, webhooks, images, events, metrics, other verbs.
        for (m, t, p) in [
            (Method::GET, "/machines", "/machines"),
            (Method::PATCH, "/machines/{id}", "/machines/kid"),
            (Method::POST, "/machines/{id}/restart", "/machines/kid/restart"),
            (Method::POST, "/machines/{id}/pause", "/machines/kid/pause"),
            (Method::GET, "/machines/{id}/pty", "/machines/kid/pty"),
            (Method::GET, "/machines/{id}/logs", "/machines/kid/logs"),
            (Method::POST, "/machines/{id}/keepalive", "/machines/kid/keepalive"),
            (Method::GET, "/api-keys", "/api-keys"),
            (Method::POST, "/api-keys", "/api-keys"),
            (Method::GET, "/volumes", "/volumes"),
            (Method::POST, "/volumes", "/volumes"),
            (Method::GET, "/webhooks", "/webhooks"),
            (Method::GET, "/images", "/images"),
            (Method::GET, "/events", "/events"),
            (Method::GET, "/metrics", "/metrics"),
            (Method::GET, "/health", "/health"),
        ] {
            assert_eq!(at(m.clone(), t, p), None, "{m} {t}");
        }
        // An encoded id is never resolved differently from what the handler would see: refused.
        assert_eq!(at(Method::GET, "/machines/{id}", "/machines/k%69d"), None);
    }
}
