//! The REST API: routes, the auth and correlation-id middleware, the error envelope and the OpenAPI
//! document, which is generated from the same types and handler annotations the server uses.

pub mod auth;
pub mod error;
pub mod extract;
pub mod guest;
pub mod keys;
pub mod machines;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use hyperfleet_types::{Health, RuntimeAvailability, RuntimeKind};
use tracing::Instrument;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_swagger_ui::SwaggerUi;

use crate::machines::Service;
use auth::Auth;
use error::ApiError;

#[derive(Clone)]
pub struct AppState {
    pub service: Arc<Service>,
    pub auth: Arc<Auth>,
}

pub const CORRELATION_HEADER: &str = "x-correlation-id";

#[derive(OpenApi)]
#[openapi(
    info(title = "Hyperfleet API", description = "Firecracker microVM orchestration. Every route but /health and /docs needs \
        `Authorization: Bearer hf_…` with the scope shown. Errors: `{\"error\": {\"code\", \"message\"}}`."),
    paths(
        health,
        machines::create, machines::list, machines::get, machines::update, machines::delete, machines::start,
        machines::stop, machines::restart, machines::pause, machines::resume, machines::wait, machines::logs, machines::network,
        guest::exec, guest::exec_stream, guest::upload, guest::download, guest::stat, guest::delete,
        keys::create, keys::list, keys::revoke,
    ),
    modifiers(&BearerAuth),
    tags((name = "machines"), (name = "exec"), (name = "files"), (name = "api-keys"))
)]
pub struct ApiDoc;

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

#[utoipa::path(get, path = "/health", tag = "machines", responses((status = 200, body = Health)))]
pub async fn health(State(s): State<AppState>) -> Json<Health> {
    let database = match s.service.store.ping().await {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("error: {e}"),
    };
    let runtimes = [RuntimeKind::Firecracker, RuntimeKind::Container]
        .into_iter()
        .map(|r| {
            let why = s.service.runtimes.unavailable(r);
            RuntimeAvailability {
                runtime: r,
                available: why.is_none(),
                detail: why.unwrap_or_else(|| "available".into()),
            }
        })
        .collect();
    Json(Health {
        status: if database == "ok" { "ok".into() } else { "degraded".into() },
        version: env!("CARGO_PKG_VERSION").to_string(),
        default_runtime: s.service.default_runtime,
        runtimes,
        database,
    })
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

/// Echoes `X-Correlation-ID` (made up when absent) and logs the request inside a span carrying it.
async fn correlation(mut req: Request, next: Next) -> Response {
    let id = match req.headers().get(CORRELATION_HEADER) {
        Some(v) if valid_correlation_id(v) => v.clone(),
        _ => {
            let v = HeaderValue::from_str(&format!("req_{}", crate::store::random_id()))
                .expect("alphanumeric id is a valid header");
            req.headers_mut().insert(CORRELATION_HEADER, v.clone());
            v
        }
    };
    let span = tracing::info_span!(
        "request",
        correlation_id = %id.to_str().unwrap_or_default(),
        method = %req.method(),
        path = %req.uri().path()
    );
    let started = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    span.in_scope(|| {
        tracing::info!(status = resp.status().as_u16(), ms = started.elapsed().as_secs_f64() * 1000.0, "request done")
    });
    resp.headers_mut().insert(CORRELATION_HEADER, id);
    resp
}

pub fn router(state: AppState) -> Router {
    let machines = Router::new()
        .route("/machines", post(machines::create).get(machines::list))
        .route("/machines/{id}", get(machines::get).patch(machines::update).delete(machines::delete))
        .route("/machines/{id}/start", post(machines::start))
        .route("/machines/{id}/stop", post(machines::stop))
        .route("/machines/{id}/restart", post(machines::restart))
        .route("/machines/{id}/pause", post(machines::pause))
        .route("/machines/{id}/resume", post(machines::resume))
        .route("/machines/{id}/wait", get(machines::wait))
        .route("/machines/{id}/logs", get(machines::logs))
        .route("/machines/{id}/network", get(machines::network))
        .route("/machines/{id}/exec", post(guest::exec))
        .route("/machines/{id}/exec/stream", post(guest::exec_stream))
        .route("/machines/{id}/files/stat", get(guest::stat))
        .route("/api-keys", post(keys::create).get(keys::list))
        .route("/api-keys/{id}", axum::routing::delete(keys::revoke))
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
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_key))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(correlation))
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
            ("/machines/{id}/wait", &["get"]),
            ("/machines/{id}/logs", &["get"]),
            ("/machines/{id}/network", &["get"]),
            ("/machines/{id}/exec", &["post"]),
            ("/machines/{id}/exec/stream", &["post"]),
            ("/machines/{id}/files", &["get", "post", "delete"]),
            ("/machines/{id}/files/stat", &["get"]),
            ("/api-keys", &["get", "post"]),
            ("/api-keys/{id}", &["delete"]),
        ] {
            for m in methods {
                assert!(paths.get(p).and_then(|v| v.get(*m)).is_some(), "{m} {p} missing from the OpenAPI document");
            }
        }
        assert!(doc["components"]["schemas"]["Machine"]["properties"]["guest_ip"].is_object());
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
        assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
        for field in ["created_at", "expires_at", "last_used_at", "revoked_at"] {
            assert_eq!(doc["components"]["schemas"]["ApiKey"]["properties"][field]["format"], "date-time", "{field}");
        }
    }
}
