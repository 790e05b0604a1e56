//! API key management over HTTP (scope `keys:admin`); `hyperfleet keys …` does the same on the database.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use hyperfleet_types::{ApiKey, ApiKeyList, CreateApiKey, CreatedApiKey, ErrorBody};

use super::AppState;
use super::error::ApiError;
use super::extract::JsonBody;
use crate::keys::Grantor;

#[utoipa::path(post, path = "/api-keys", tag = "api-keys", request_body = CreateApiKey,
    responses((status = 201, description = "the key; its secret is shown only here", body = CreatedApiKey),
              (status = 400, description = "VALIDATION_ERROR: the name, a scope or expires_at is wrong", body = ErrorBody)),
    security(("bearer" = ["keys:admin"])))]
pub(crate) async fn create(
    State(s): State<AppState>,
    creator: Option<Extension<Arc<ApiKey>>>,
    JsonBody(req): JsonBody<CreateApiKey>,
) -> Result<(StatusCode, Json<CreatedApiKey>), ApiError> {
    // No key in the request only when auth is disabled: whoever runs the daemon that way is the host's admin.
    let by = match &creator {
        Some(Extension(key)) => Grantor::Key(key),
        None => Grantor::Host,
    };
    let made = s.auth.keys.create(req, by).await?;
    Ok((StatusCode::CREATED, Json(CreatedApiKey { key: made.secret, api_key: made.key })))
}

#[utoipa::path(get, path = "/api-keys", tag = "api-keys", responses((status = 200, body = ApiKeyList)), security(("bearer" = ["keys:admin"])))]
pub(crate) async fn list(State(s): State<AppState>) -> Result<Json<ApiKeyList>, ApiError> {
    Ok(Json(ApiKeyList { api_keys: s.auth.keys.list().await? }))
}

#[utoipa::path(delete, path = "/api-keys/{id}", tag = "api-keys", params(("id" = String, Path, description = "key id")),
    responses((status = 204, description = "revoked"), (status = 404, description = "NOT_FOUND: no key has this id", body = ErrorBody)),
    security(("bearer" = ["keys:admin"])))]
pub(crate) async fn revoke(State(s): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    s.auth.keys.revoke(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
