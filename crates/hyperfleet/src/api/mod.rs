//! The REST API: routes, the auth and correlation-id middleware, the error envelope and the OpenAPI
//! document, which is generated from the same types and handler annotations the server uses.

pub(crate) mod auth;
pub(crate) mod error;
pub(crate) mod events;
pub(crate) mod extract;
pub(crate) mod forward;
#[cfg(test)]
mod fuzz;
pub(crate) mod guest;
pub(crate) mod images;
pub(crate) mod keys;
pub(crate) mod machines;
pub(crate) mod nodes;
pub(crate) mod pty;
pub(crate) mod ui;
pub(crate) mod volumes;
pub(crate) mod webhooks;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyperfleet_types::Health;
use tracing::Instrument;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_swagger_ui::SwaggerUi;

use crate::doctor::Doctor;
use crate::machines::Service;
use auth::Auth;
use error::ApiError;

#[derive(Clone)]
pub(crate) struct AppState {
    pub service: Arc<Service>,
    pub auth: Arc<Auth>,
    pub doctor: Arc<Doctor>,
    /// How long a terminal's client may stay silent (pongs included) before its session is hung up.
    pub pty_client_timeout: std::time::Duration,
    pub listeners: Arc<Listeners>,
    /// What the dashboard needs to link to exposed ports.
    pub ui: Arc<ui::UiConfig>,
    /// The client that forwards requests to the node owning a machine.
    pub forwarder: forward::Forwarder,
}

/// The listeners' connection caps, which also count their connections and bytes (for `/metrics`).
pub(crate) struct Listeners {
    pub api: Arc<crate::listener::Limits>,
    pub proxy: Option<Arc<crate::listener::Limits>>,
}

impl Listeners {
    fn api(&self) -> crate::metrics::ListenerStats {
        self.api.stats()
    }

    fn proxy(&self) -> Option<crate::metrics::ListenerStats> {
        self.proxy.as_ref().map(|p| p.stats())
    }
}

pub(crate) const CORRELATION_HEADER: &str = "x-correlation-id";

#[derive(OpenApi)]
#[openapi(
    info(title = "Hyperfleet API", description = "Firecracker microVM orchestration. Every route but /health and /docs needs \
        `Authorization: Bearer hf_…` with the scope shown. Errors: `{\"error\": {\"code\", \"message\"}}`."),
    paths(
        health,
        machines::create, machines::list, machines::get, machines::update, machines::delete, machines::start,
        machines::stop, machines::restart, machines::pause, machines::resume, machines::wait, machines::logs, machines::network,
        machines::keepalive, machines::children, pty::pty,
        machines::stats, events::stream, events::metrics,
        guest::exec, guest::exec_stream, guest::upload, guest::download, guest::stat, guest::delete,
        guest::list, guest::mkdir,
        keys::create, keys::list, keys::revoke,
        images::list, images::pull, images::delete,
        volumes::create, volumes::list, volumes::get, volumes::delete, volumes::resize, volumes::clone,
        webhooks::create, webhooks::list, webhooks::get, webhooks::delete, webhooks::deliveries,
        nodes::list, nodes::get, nodes::drain, nodes::undrain,
    ),
    components(schemas(machines::StatusFilter, machines::Flag, events::EventTypes, hyperfleet_types::Event,
        hyperfleet_types::WebhookPayload)),
    modifiers(&BearerAuth, &CommonResponses),
    tags((name = "machines"), (name = "exec"), (name = "files"), (name = "volumes"), (name = "api-keys"), (name = "events"), (name = "images"),
        (name = "webhooks"), (name = "nodes"))
)]
pub(crate) struct ApiDoc;

struct BearerAuth;
impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("hf_<32 chars>").build(),
            ),
        );
    }
}

/// The responses that come from the layers every operation of a kind goes through, added here once rather
/// than on each handler: the key check (401, 403, and a 500 if the key store fails) on every operation that
/// has a `security` requirement, and the JSON body extractor (400, 413 over the body limit) on every one
/// that takes a JSON body. A handler that documents the same status itself keeps its own description.
struct CommonResponses;

impl CommonResponses {
    /// Every operation with a key reads the database, which may be down (PostgreSQL restarting).
    const DATABASE_UNAVAILABLE: (&str, &str, &str) = (
        "503",
        "DatabaseUnavailable",
        "DATABASE_UNAVAILABLE: the database cannot be reached (PostgreSQL down or restarting); retry later",
    );
    /// Every operation on one machine may be answered by the node that owns it, which may be down.
    const NODE_UNAVAILABLE: (&str, &str, &str) = (
        "503",
        "NodeOrDatabaseUnavailable",
        "NODE_UNAVAILABLE: the machine is on another node of the fleet, which is down or cannot be reached; \
         DATABASE_UNAVAILABLE: the database cannot be reached (PostgreSQL down or restarting); retry later",
    );

    const RESPONSES: [(&str, &str, &str); 5] = [
        (
            "401",
            "Unauthorized",
            "UNAUTHORIZED: the Authorization header is missing, or the key is invalid, expired or revoked",
        ),
        ("403", "Forbidden", "FORBIDDEN: the key does not have the scope this operation needs"),
        ("500", "InternalError", "INTERNAL_ERROR: the daemon's database failed"),
        ("400", "InvalidBody", "VALIDATION_ERROR: the body is not JSON of the documented shape, or a field is wrong"),
        ("413", "BodyTooLarge", "PAYLOAD_TOO_LARGE: the body is larger than the limit (1 MiB for JSON requests)"),
    ];
}

impl utoipa::Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        let components = openapi.components.get_or_insert_with(Default::default);
        let unavailable = [Self::NODE_UNAVAILABLE, Self::DATABASE_UNAVAILABLE];
        for (_, name, description) in Self::RESPONSES.into_iter().chain(unavailable) {
            let content = ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build();
            let response = ResponseBuilder::new().description(description).content("application/json", content);
            components.responses.insert(name.to_string(), RefOr::T(response.build()));
        }
        for (path, item) in openapi.paths.paths.iter_mut() {
            let on_machine = path.starts_with("/machines/{id}");
            let ops = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch];
            for op in ops.into_iter().flatten() {
                let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());
                let json_body = op.request_body.as_ref().is_some_and(|b| b.content.contains_key("application/json"));
                for (status, name, _) in Self::RESPONSES {
                    let applies = match status {
                        "401" | "403" | "500" => secured,
                        _ => json_body,
                    };
                    if applies {
                        op.responses
                            .responses
                            .entry(status.to_string())
                            .or_insert_with(|| RefOr::Ref(Ref::from_response_name(name)));
                    }
                }
                if !secured {
                    continue;
                }
                let (status, name, _) = if on_machine { Self::NODE_UNAVAILABLE } else { Self::DATABASE_UNAVAILABLE };
                match op.responses.responses.get_mut(status) {
                    // The handler's own 503 (an address pool used up, say) gains the database's.
                    Some(RefOr::T(own)) => {
                        let (_, _, database) = Self::DATABASE_UNAVAILABLE;
                        own.description = format!("{}; {database}", own.description);
                    }
                    Some(RefOr::Ref(_)) => {}
                    None => {
                        op.responses.responses.insert(status.to_string(), RefOr::Ref(Ref::from_response_name(name)));
                    }
                }
            }
        }
    }
}

#[utoipa::path(get, path = "/health", tag = "machines", responses((status = 200, body = Health)))]
pub(crate) async fn health(State(s): State<AppState>) -> Json<Health> {
    Json(s.service.health().await)
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("Route {method} {} not found", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        format!("Method {method} is not allowed on {}", uri.path()),
    )
}

fn valid_correlation_id(v: &HeaderValue) -> bool {
    !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
}

/// Echoes `X-Correlation-ID` (made up when absent), runs the request inside a span carrying it (so every line
/// logged for the request names it), counts it in the metrics by route template and status, and logs one
/// compact line for it (target `hyperfleet::request`; health checks and scrapes at debug).
async fn correlation(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let id = match req.headers().get(CORRELATION_HEADER) {
        Some(v) if valid_correlation_id(v) => v.clone(),
        _ => {
            let v = HeaderValue::from_str(&format!("req_{}", crate::store::random_id())).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "made-up correlation id is not a valid header value; using a fixed one");
                HeaderValue::from_static("req_unknown")
            });
            req.headers_mut().insert(CORRELATION_HEADER, v.clone());
            v
        }
    };
    let cid = id.to_str().unwrap_or_default();
    let span = tracing::info_span!("request", correlation_id = %cid);
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let started = Instant::now();
    let mut resp = next.run(req).instrument(span).await;
    let route = resp.extensions().get::<MatchedPath>().map(|m| m.as_str());
    let status = resp.status().as_u16();
    state.service.metrics().request(method.as_str(), route, status);
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if matches!(route, Some("/health" | "/metrics")) {
        tracing::debug!(target: "hyperfleet::request", %method, %path, status, ms, correlation_id = %cid, "request done");
    } else {
        tracing::info!(target: "hyperfleet::request", %method, %path, status, ms, correlation_id = %cid, "request done");
    }
    resp.headers_mut().insert(CORRELATION_HEADER, id);
    resp
}

/// Route layer: hands the matched route template to [`correlation`] on the response.
async fn matched_route(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().cloned();
    let mut resp = next.run(req).await;
    if let Some(route) = route {
        resp.extensions_mut().insert(route);
    }
    resp
}

/// A NUL byte (`%00`) in a path parameter names nothing (PostgreSQL cannot even compare such text): refused
/// before anything looks it up. (A raw NUL never gets this far: it is not valid in a request line.)
async fn no_nul_in_path(req: Request, next: Next) -> Response {
    if req.uri().path().as_bytes().windows(3).any(|w| w.eq_ignore_ascii_case(b"%00")) {
        return ApiError::validation("the path must not contain NUL bytes (%00)").into_response();
    }
    next.run(req).await
}

pub(crate) fn router(state: AppState) -> Router {
    let machines = Router::new()
        .route("/machines", post(machines::create).get(machines::list))
        .route("/machines/{id}", get(machines::get).patch(machines::update).delete(machines::delete))
        .route("/machines/{id}/start", post(machines::start))
        .route("/machines/{id}/stop", post(machines::stop))
        .route("/machines/{id}/restart", post(machines::restart))
        .route("/machines/{id}/pause", post(machines::pause))
        .route("/machines/{id}/resume", post(machines::resume))
        .route("/machines/{id}/keepalive", post(machines::keepalive))
        .route("/machines/{id}/pty", get(pty::pty))
        .route("/machines/{id}/wait", get(machines::wait))
        .route("/machines/{id}/children", get(machines::children))
        .route("/machines/{id}/logs", get(machines::logs))
        .route("/machines/{id}/network", get(machines::network))
        .route("/machines/{id}/stats", get(machines::stats))
        .route("/events", get(events::stream))
        .route("/metrics", get(events::metrics))
        .route("/machines/{id}/exec", post(guest::exec))
        .route("/machines/{id}/exec/stream", post(guest::exec_stream))
        .route("/machines/{id}/files/stat", get(guest::stat))
        .route("/machines/{id}/files/list", get(guest::list))
        .route("/machines/{id}/files/mkdir", post(guest::mkdir))
        .route("/images", get(images::list))
        .route("/images/pull", post(images::pull))
        .route("/images/{digest}", axum::routing::delete(images::delete))
        .route("/volumes", post(volumes::create).get(volumes::list))
        .route("/volumes/{id}", get(volumes::get).delete(volumes::delete))
        .route("/volumes/{id}/resize", post(volumes::resize))
        .route("/volumes/{id}/clone", post(volumes::clone))
        .route("/webhooks", post(webhooks::create).get(webhooks::list))
        .route("/webhooks/{id}", get(webhooks::get).delete(webhooks::delete))
        .route("/webhooks/{id}/deliveries", get(webhooks::deliveries))
        .route("/api-keys", post(keys::create).get(keys::list))
        .route("/api-keys/{id}", axum::routing::delete(keys::revoke))
        .route("/nodes", get(nodes::list))
        .route("/nodes/{name}", get(nodes::get))
        .route("/nodes/{name}/drain", post(nodes::drain))
        .route("/nodes/{name}/undrain", post(nodes::undrain))
        .route("/health", get(health))
        .layer(DefaultBodyLimit::max(1 << 20));
    // Uploads stream (raw) or are bounded by HYPERFLEET_FILE_MAX_SIZE in the handler (JSON).
    let files = Router::new()
        .route("/machines/{id}/files", post(guest::upload).get(guest::download).delete(guest::delete))
        .layer(DefaultBodyLimit::disable());
    Router::new()
        .merge(SwaggerUi::new("/docs").url("/docs/json", ApiDoc::openapi()))
        .merge(machines)
        .merge(files)
        .merge(ui::routes())
        .route_layer(middleware::from_fn_with_state(state.clone(), forward::to_owner))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_key))
        .route_layer(middleware::from_fn(matched_route))
        .route_layer(middleware::from_fn(no_nul_in_path))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), correlation))
        .with_state(state)
}

/// The OpenAPI document as JSON (also served at /docs/json).
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_describes_every_route() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for (p, methods) in [
            ("/health", &["get"][..]),
            ("/machines", &["get", "post"]),
            ("/machines/{id}", &["get", "patch", "delete"]),
            ("/machines/{id}/start", &["post"]),
            ("/machines/{id}/stop", &["post"]),
            ("/machines/{id}/restart", &["post"]),
            ("/machines/{id}/pause", &["post"]),
            ("/machines/{id}/resume", &["post"]),
            ("/machines/{id}/keepalive", &["post"]),
            ("/machines/{id}/pty", &["get"]),
            ("/machines/{id}/wait", &["get"]),
            ("/machines/{id}/children", &["get"]),
            ("/machines/{id}/logs", &["get"]),
            ("/machines/{id}/network", &["get"]),
            ("/machines/{id}/stats", &["get"]),
            ("/events", &["get"]),
            ("/metrics", &["get"]),
            ("/machines/{id}/exec", &["post"]),
            ("/machines/{id}/exec/stream", &["post"]),
            ("/machines/{id}/files", &["get", "post", "delete"]),
            ("/machines/{id}/files/stat", &["get"]),
            ("/machines/{id}/files/list", &["get"]),
            ("/machines/{id}/files/mkdir", &["post"]),
            ("/volumes", &["get", "post"]),
            ("/volumes/{id}", &["delete", "get"]),
            ("/volumes/{id}/resize", &["post"]),
            ("/volumes/{id}/clone", &["post"]),
            ("/api-keys", &["get", "post"]),
            ("/api-keys/{id}", &["delete"]),
            ("/webhooks", &["get", "post"]),
            ("/webhooks/{id}", &["delete", "get"]),
            ("/webhooks/{id}/deliveries", &["get"]),
            ("/nodes", &["get"]),
            ("/nodes/{name}", &["get"]),
            ("/nodes/{name}/drain", &["post"]),
            ("/nodes/{name}/undrain", &["post"]),
        ] {
            for m in methods {
                assert!(paths.get(p).and_then(|v| v.get(*m)).is_some(), "{m} {p} missing from the OpenAPI document");
            }
        }
        // A machine is its spec (flattened) plus what the daemon decided: both parts are in the schema.
        let machine = doc["components"]["schemas"]["Machine"].to_string();
        assert!(machine.contains("guest_ip") && machine.contains("#/components/schemas/MachineSpec"), "{machine}");
        assert!(doc["components"]["schemas"]["MachineSpec"]["properties"]["vcpu_count"].is_object());
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
        assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
        for field in ["created_at", "expires_at", "last_used_at", "revoked_at"] {
            assert_eq!(doc["components"]["schemas"]["ApiKey"]["properties"][field]["format"], "date-time", "{field}");
        }
    }

    /// A response, with a `$ref` to `#/components/responses/...` resolved.
    fn resolve<'a>(doc: &'a serde_json::Value, r: &'a serde_json::Value) -> &'a serde_json::Value {
        match r["$ref"].as_str().and_then(|p| p.strip_prefix("#/components/responses/")) {
            Some(name) => &doc["components"]["responses"][name],
            None => r,
        }
    }

    #[test]
    fn openapi_documents_every_error_with_the_envelope() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
        let mut secured = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let responses = op["responses"].as_object().unwrap();
                let needs_key = op["security"].as_array().is_some_and(|s| !s.is_empty());
                assert_eq!(
                    needs_key,
                    auth::required_scope(&method.to_uppercase().parse().unwrap(), path).is_some(),
                    "{method} {path}: the document and the scope table disagree on whether it needs a key"
                );
                if needs_key {
                    secured += 1;
                    for status in ["401", "403"] {
                        assert!(
                            responses.contains_key(status),
                            "{method} {path} needs a key but does not list {status}"
                        );
                    }
                    let unavailable = responses.get("503").map(|r| resolve(&doc, r)["description"].to_string());
                    assert!(
                        unavailable.as_deref().is_some_and(|d| d.contains("DATABASE_UNAVAILABLE")),
                        "{method} {path} reads the database but does not list DATABASE_UNAVAILABLE: {unavailable:?}"
                    );
                }
                if op["requestBody"]["content"]["application/json"].is_object() {
                    for status in ["400", "413"] {
                        assert!(
                            responses.contains_key(status),
                            "{method} {path} takes JSON but does not list {status}"
                        );
                    }
                }
                if path.contains("{id}") {
                    assert!(responses.contains_key("404"), "{method} {path} does not list 404");
                }
                for (status, r) in responses {
                    let r = resolve(&doc, r);
                    // 2xx, and 101 (a WebSocket upgrade), are not errors.
                    if status.starts_with('2') || status == "101" {
                        continue;
                    }
                    assert_eq!(
                        r["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/ErrorBody",
                        "{method} {path} {status} must have the error envelope as its body"
                    );
                    assert_eq!(r["content"].as_object().unwrap().len(), 1, "{method} {path} {status}: JSON only");
                    let description = r["description"].as_str().unwrap_or_default();
                    assert!(
                        description
                            .split(':')
                            .next()
                            .is_some_and(|c| c.chars().all(|c| c.is_ascii_uppercase() || c == '_')),
                        "{method} {path} {status} must name its error code(s) first, got {description:?}"
                    );
                }
            }
        }
        assert!(secured >= 20, "only {secured} operations need a key");
    }

    #[test]
    fn openapi_references_resolve() {
        fn refs<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
            match v {
                serde_json::Value::Object(m) => {
                    out.extend(m.get("$ref").and_then(|r| r.as_str()));
                    m.values().for_each(|v| refs(v, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
        let mut found = vec![];
        refs(&doc, &mut found);
        assert!(found.len() > 50);
        for r in found {
            assert!(doc.pointer(r.trim_start_matches('#')).is_some_and(|t| t.is_object()), "{r} does not resolve");
        }
    }

    #[test]
    fn openapi_declares_the_media_types_the_handlers_use() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
        let p = &doc["paths"];
        let only = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(
            only(&p["/machines/{id}/exec/stream"]["post"]["responses"]["200"]["content"]),
            ["application/x-ndjson"]
        );
        let download = &p["/machines/{id}/files"]["get"]["responses"]["200"]["content"];
        assert_eq!(only(download), ["application/octet-stream"]);
        let raw = serde_json::json!({"type": "string", "format": "binary"});
        assert_eq!(doc["components"]["schemas"]["RawBytes"], raw);
        let upload = &p["/machines/{id}/files"]["post"]["requestBody"]["content"];
        assert_eq!(only(upload), ["application/json", "application/octet-stream"]);
        assert_eq!(upload["application/json"]["schema"]["$ref"], "#/components/schemas/FileUpload");
        assert_eq!(upload["application/octet-stream"]["schema"]["$ref"], "#/components/schemas/RawBytes");
    }
}
