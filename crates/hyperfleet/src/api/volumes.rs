//! Volume endpoints: create, list, get, delete, resize, clone. Reading needs `machines:read`, changing
//! `machines:write` (volumes are machine storage).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use hyperfleet_types::{CloneVolume, CreateVolume, ErrorBody, ResizeVolume, Volume, VolumeList};

use super::AppState;
use super::error::ApiError;
use super::extract::JsonBody;

const VOLUME_NOT_FOUND: &str = "NOT_FOUND: no volume has this id or name";
const VOLUME_INVALID: &str = "VALIDATION_ERROR: a field is missing or out of range (the message names it)";

#[utoipa::path(post, path = "/volumes", tag = "volumes", request_body = CreateVolume,
    responses((status = 201, body = Volume), (status = 400, description = VOLUME_INVALID, body = ErrorBody),
              (status = 409, description = "CONFLICT: a volume with this name exists", body = ErrorBody)),
    security(("bearer" = ["machines:write"])))]
pub(crate) async fn create(
    State(s): State<AppState>,
    JsonBody(req): JsonBody<CreateVolume>,
) -> Result<(StatusCode, Json<Volume>), ApiError> {
    Ok((StatusCode::CREATED, Json(s.service.create_volume(req).await?)))
}

#[utoipa::path(get, path = "/volumes", tag = "volumes",
    responses((status = 200, body = VolumeList)), security(("bearer" = ["machines:read"])))]
pub(crate) async fn list(State(s): State<AppState>) -> Result<Json<VolumeList>, ApiError> {
    Ok(Json(s.service.list_volumes().await?))
}

#[utoipa::path(get, path = "/volumes/{id}", tag = "volumes",
    params(("id" = String, Path, description = "volume id or name")),
    responses((status = 200, body = Volume), (status = 404, description = VOLUME_NOT_FOUND, body = ErrorBody)),
    security(("bearer" = ["machines:read"])))]
pub(crate) async fn get(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Volume>, ApiError> {
    Ok(Json(s.service.get_volume(&id).await?))
}

#[utoipa::path(delete, path = "/volumes/{id}", tag = "volumes",
    params(("id" = String, Path, description = "volume id or name")),
    responses((status = 204, description = "deleted, with its data"), (status = 404, description = VOLUME_NOT_FOUND, body = ErrorBody),
              (status = 409, description = "CONFLICT: a machine names the volume (the message says which)", body = ErrorBody)),
    security(("bearer" = ["machines:write"])))]
pub(crate) async fn delete(State(s): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    s.service.delete_volume(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/volumes/{id}/resize", tag = "volumes", request_body = ResizeVolume,
    params(("id" = String, Path, description = "volume id or name")),
    responses((status = 200, body = Volume),
              (status = 400, description = "VALIDATION_ERROR: size_mib missing, out of range or smaller than the volume", body = ErrorBody),
              (status = 404, description = VOLUME_NOT_FOUND, body = ErrorBody),
              (status = 409, description = "CONFLICT: a machine holds the volume; stop it first", body = ErrorBody)),
    security(("bearer" = ["machines:write"])))]
pub(crate) async fn resize(
    State(s): State<AppState>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<ResizeVolume>,
) -> Result<Json<Volume>, ApiError> {
    Ok(Json(s.service.resize_volume(&id, req).await?))
}

#[utoipa::path(post, path = "/volumes/{id}/clone", tag = "volumes", request_body = CloneVolume,
    params(("id" = String, Path, description = "volume id or name")),
    responses((status = 201, description = "the copy", body = Volume), (status = 400, description = VOLUME_INVALID, body = ErrorBody),
              (status = 404, description = VOLUME_NOT_FOUND, body = ErrorBody),
              (status = 409, description = "CONFLICT: the name is taken, or a machine holds the volume read-write", body = ErrorBody)),
    security(("bearer" = ["machines:write"])))]
pub(crate) async fn clone(
    State(s): State<AppState>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<CloneVolume>,
) -> Result<(StatusCode, Json<Volume>), ApiError> {
    Ok((StatusCode::CREATED, Json(s.service.clone_volume(&id, req).await?)))
}
