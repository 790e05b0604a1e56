//! API key management over HTTP (scope `keys:admin`); `hyperfleet keys …` does the same on the database.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use hyperfleet_types::{ApiKeyList, CreateApiKey, CreatedApiKey, ErrorBody};

use super::AppState;
use super::error::ApiError;
use super::extract::JsonBody;
use crate::store::{api_keys, format_time, parse_time};

/// Checks a key request; returns the normalised expiry.
pub fn validate(req: &CreateApiKey) -> Result<Option<String>, String> {
    if req.name.trim().is_empty() || req.name.len() > 100 {
        return Err("name must be 1-100 characters".into());
    }
    if req.scopes.is_empty() {
        return Err(
            "scopes must list at least one scope (machines:read, machines:write, machines:exec, keys:admin, *)".into(),
        );
    }
    match &req.expires_at {
        None => Ok(None),
        Some(raw) => {
            let t = parse_time(raw).ok_or_else(|| format!("expires_at must be an RFC 3339 time, got '{raw}'"))?;
            if t <= time::OffsetDateTime::now_utc() {
                return Err("expires_at must be in the future".into());
            }
            Ok(Some(format_time(t)))
        }
    }
}

#[utoipa::path(post, path = "/api-keys", tag = "api-keys", request_body = CreateApiKey,
    responses((status = 201, description = "the key; its secret is shown only here", body = CreatedApiKey),
              (status = 400, description = "VALIDATION_ERROR: the name, a scope or expires_at is wrong", body = ErrorBody)),
    security(("bearer" = ["keys:admin"])))]
pub async fn create(
    State(s): State<AppState>,
    JsonBody(req): JsonBody<CreateApiKey>,
) -> Result<(StatusCode, Json<CreatedApiKey>), ApiError> {
    let expires = validate(&req).map_err(ApiError::validation)?;
    let made = s.auth.store.call(move |c| api_keys::create(c, req.name.trim(), &req.scopes, expires)).await?;
    Ok((StatusCode::CREATED, Json(CreatedApiKey { key: made.secret, api_key: made.key })))
}

#[utoipa::path(get, path = "/api-keys", tag = "api-keys", responses((status = 200, body = ApiKeyList)), security(("bearer" = ["keys:admin"])))]
pub async fn list(State(s): State<AppState>) -> Result<Json<ApiKeyList>, ApiError> {
    Ok(Json(ApiKeyList { api_keys: s.auth.store.call(|c| api_keys::list(c)).await? }))
}

#[utoipa::path(delete, path = "/api-keys/{id}", tag = "api-keys", params(("id" = String, Path, description = "key id")),
    responses((status = 204, description = "revoked"), (status = 404, description = "NOT_FOUND: no key has this id", body = ErrorBody)),
    security(("bearer" = ["keys:admin"])))]
pub async fn revoke(State(s): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let key = id.clone();
    match s.auth.store.call(move |c| api_keys::revoke(c, &key)).await? {
        Some(_) => Ok(StatusCode::NO_CONTENT),
        None => Err(ApiError::not_found(format!("API key with id '{id}' not found"))),
    }
}
