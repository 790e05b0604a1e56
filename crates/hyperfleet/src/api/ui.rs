//! The web dashboard at `/ui`: a few static files compiled into the binary (no CDN, no build step), served
//! with a strict Content-Security-Policy. It signs in with an API key kept in the tab's sessionStorage and
//! calls the same API as everyone else, reading `/events` with fetch() so the key travels in a header,
//! never in a URL.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use super::AppState;
use super::error::ApiError;

/// What the dashboard needs to know about the daemon to make proxy links.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct UiConfig {
    /// `None` when the proxy is off.
    pub proxy_port: Option<u16>,
    pub proxy_prefix: String,
    pub proxy_host_suffix: Option<String>,
}

const FILES: &[(&str, &str, &str)] = &[
    ("index.html", "text/html; charset=utf-8", include_str!("../../ui/index.html")),
    ("app.js", "text/javascript; charset=utf-8", include_str!("../../ui/app.js")),
    ("style.css", "text/css; charset=utf-8", include_str!("../../ui/style.css")),
];

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn file(name: &str) -> Response {
    match FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, mime, body)) => (
            [
                (header::CONTENT_TYPE, *mime),
                (header::CONTENT_SECURITY_POLICY, CSP),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                (header::REFERRER_POLICY, "no-referrer"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *body,
        )
            .into_response(),
        None => ApiError::not_found(format!("No dashboard file '{name}'")).into_response(),
    }
}

async fn index() -> Response {
    file("index.html")
}

async fn static_file(Path(name): Path<String>) -> Response {
    file(&name)
}

async fn config(State(s): State<AppState>) -> Response {
    (StatusCode::OK, axum::Json(s.ui.as_ref().clone())).into_response()
}

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(index))
        .route("/ui/config.json", get(config))
        .route("/ui/{file}", get(static_file))
}
