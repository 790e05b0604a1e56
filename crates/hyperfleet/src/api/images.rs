//! Image cache endpoints: list, pre-pull, delete. Reading the cache needs `machines:read`; pulling and
//! deleting change what machines can boot from, so they need `machines:write`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use hyperfleet_types::{ErrorBody, ImageList, PullImage};

use super::AppState;
use super::error::ApiError;
use super::extract::JsonBody;

#[utoipa::path(get, path = "/images", tag = "images",
    responses((status = 200, body = ImageList)),
    security(("bearer" = ["machines:read"])))]
pub(crate) async fn list(State(s): State<AppState>) -> Result<Json<ImageList>, ApiError> {
    Ok(Json(ImageList { images: s.service.list_images().await? }))
}

#[utoipa::path(post, path = "/images/pull", tag = "images", request_body = PullImage,
    responses((status = 200, description = "the image is cached", body = hyperfleet_types::ImageInfo),
              (status = 400, description = "VALIDATION_ERROR: not an image reference, or registry_auth is malformed", body = ErrorBody),
              (status = 403, description = "REGISTRY_UNAUTHORIZED: the registry refused the credentials (or their absence)", body = ErrorBody),
              (status = 404, description = "NOT_FOUND: the registry has no such image", body = ErrorBody),
              (status = 500, description = "IMAGE_ERROR: the image could not be unpacked or converted (a refused layer)", body = ErrorBody),
              (status = 502, description = "REGISTRY_ERROR: the registry could not be reached or answered an error", body = ErrorBody),
              (status = 507, description = "INSUFFICIENT_STORAGE: the images directory's filesystem is full; nothing of the pull was kept", body = ErrorBody)),
    security(("bearer" = ["machines:write"])))]
pub(crate) async fn pull(
    State(s): State<AppState>,
    JsonBody(req): JsonBody<PullImage>,
) -> Result<Json<hyperfleet_types::ImageInfo>, ApiError> {
    Ok(Json(s.service.pull_image(req).await?))
}

#[utoipa::path(delete, path = "/images/{digest}", tag = "images",
    params(("digest" = String, Path, description = "manifest digest, sha256:…")),
    responses((status = 204, description = "removed from the cache"),
              (status = 404, description = "NOT_FOUND: no cached image has this digest", body = ErrorBody),
              (status = 409, description = "CONFLICT: machines were created from this image", body = ErrorBody)),
    security(("bearer" = ["machines:write"])))]
pub(crate) async fn delete(State(s): State<AppState>, Path(digest): Path<String>) -> Result<StatusCode, ApiError> {
    s.service.delete_image(&digest).await?;
    Ok(StatusCode::NO_CONTENT)
}
