//! Any node serves any machine: a request for a machine another node owns is authorized here with the
//! user's key, then forwarded to the owner with the cluster secret, which the owner checks instead of a key
//! (and refuses when wrong or missing). Bodies stream both ways and WebSocket upgrades are spliced, so exec
//! streams, file transfers and terminals behave as on the owner. The owner serves the request as its own
//! and never forwards it again.

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyperfleet_types::NodeStatus;
use tracing::debug;

use super::AppState;
use super::error::ApiError;
// Headers that describe one hop, never forwarded (`upgrade` is put back for a WebSocket).
use crate::nodes::{FORWARDED_BY_HEADER, SECRET_HEADER};
use crate::proxy::HOP_BY_HOP;

/// Set on a request that came from another node with the right cluster secret: the node that sent it.
#[derive(Debug, Clone)]
pub(crate) struct FromNode(pub String);

/// The HTTP client to the other nodes (connections kept alive).
#[derive(Clone)]
pub(crate) struct Forwarder {
    client: Client<HttpConnector, Body>,
}

impl Default for Forwarder {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
        Self { client: Client::builder(TokioExecutor::new()).build(connector) }
    }
}

fn unavailable(message: String) -> Response {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "NODE_UNAVAILABLE", message).into_response()
}

/// Sends `req` to `base` (another node's URL) as `from`, streaming both ways; a WebSocket upgrade is
/// spliced once both sides switch.
pub(crate) async fn send(state: &AppState, mut req: Request, base: &str, node: &str) -> Response {
    let from = state.service.nodes().name().to_string();
    let Some(secret) = state.service.nodes().cluster_secret().map(str::to_string) else {
        return unavailable(format!(
            "node '{node}' owns this; forwarding to it needs HYPERFLEET_CLUSTER_SECRET on this node"
        ));
    };
    let path = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    let Ok(uri) = format!("{base}{path}").parse::<Uri>() else {
        return unavailable(format!("node '{node}' has an unusable URL '{base}'"));
    };
    let upgrade = req.headers().get(header::UPGRADE).cloned();
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    for h in HOP_BY_HOP {
        parts.headers.remove(h);
    }
    parts.headers.remove(header::AUTHORIZATION);
    parts.headers.remove(header::HOST);
    if let Some(up) = upgrade {
        parts.headers.insert(header::UPGRADE, up);
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let (Ok(secret), Ok(from)) = (HeaderValue::from_str(&secret), HeaderValue::from_str(&from)) else {
        return unavailable("the cluster secret or node name is not a valid header value".into());
    };
    parts.headers.insert(SECRET_HEADER, secret);
    parts.headers.insert(FORWARDED_BY_HEADER, from);
    if let Some(authority) = uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
        parts.headers.insert(header::HOST, authority);
    }
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    parts.extensions = Default::default();
    let mut resp = match state.forwarder.client.request(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => return unavailable(format!("node '{node}' could not be reached at {base}: {e}")),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let upstream = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match (client_upgrade.await, upstream.await) {
                (Ok(c), Ok(u)) => {
                    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                    // Dropped: either side hanging up ends the tunnel, which is all there is to do.
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                }
                (c, u) => debug!(client = c.is_ok(), upstream = u.is_ok(), "forwarded upgrade failed"),
            }
        });
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    let (mut parts, body) = resp.into_parts();
    for h in HOP_BY_HOP {
        parts.headers.remove(h);
    }
    Response::from_parts(parts, Body::new(body))
}

/// Route layer (after the key check): a request for a machine this node does not own goes to its owner.
/// A machine's own record is still answered here when its owner is down (it then shows `node_status:
/// "down"`); anything else for it is refused with 503 rather than acted on by a node that does not own it.
pub(crate) async fn to_owner(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.service.nodes().alone() {
        return next.run(req).await;
    }
    let Some(template) = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string()) else {
        return next.run(req).await;
    };
    if !template.starts_with("/machines/{id}") {
        return next.run(req).await;
    }
    let Some(id) = req.uri().path().split('/').nth(2).map(str::to_string) else {
        return next.run(req).await;
    };
    let owner = match state.service.owner_of(&id).await {
        Ok(Some(node)) if node != state.service.nodes().name() => node,
        // Ours, or no such machine (the handler answers 404), or the store failed (the handler reports it).
        _ => return next.run(req).await,
    };
    if let Some(FromNode(from)) = req.extensions().get::<FromNode>() {
        return ApiError::new(
            StatusCode::CONFLICT,
            "CONFLICT",
            format!("Machine {id} is owned by node '{owner}', not this one (forwarded by '{from}')"),
        )
        .into_response();
    }
    let read_of_record = req.method() == Method::GET && template == "/machines/{id}";
    let peer = match state.service.nodes().peer(&owner).await {
        Ok(p) => p,
        Err(e) => return ApiError::from(e).into_response(),
    };
    match peer {
        Some(p) if p.status != NodeStatus::Down && p.url.is_some() => {
            let url = p.url.unwrap_or_default();
            debug!(machine = %id, node = %owner, "forwarding to the owner");
            send(&state, req, &url, &owner).await
        }
        _ if read_of_record => next.run(req).await,
        Some(p) if p.url.is_none() => {
            unavailable(format!("Machine {id} is on node '{owner}', which has no HYPERFLEET_NODE_URL to reach it by"))
        }
        _ => unavailable(format!(
            "Machine {id} is on node '{owner}', which is down (no heartbeat); only that node can act on it"
        )),
    }
}
