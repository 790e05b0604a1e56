//! Webhook endpoints: create, list, get, delete, and a webhook's deliveries. All need `webhooks:admin`: a
//! webhook makes the daemon POST to the URL it names.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use hyperfleet_types::{CreateWebhook, ErrorBody, Webhook, WebhookDeliveryList, WebhookList};

use super::AppState;
use super::error::ApiError;
use super::extract::{JsonBody, QueryMap};
use crate::machines::webhooks::MAX_PAGE;

const WEBHOOK_NOT_FOUND: &str = "NOT_FOUND: no webhook has this id";
const MAX_DELIVERY_ID: u64 = 9_223_372_036_854_775_807;

#[utoipa::path(post, path = "/webhooks", tag = "webhooks", request_body = CreateWebhook,
    responses((status = 201, description = "created; the secret is never shown again (`has_secret`)", body = Webhook),
              (status = 400, description = "VALIDATION_ERROR: url (http or https, at most 2048 characters), events (`machine.<type>`), label_selector or secret is wrong; the message names it", body = ErrorBody)),
    security(("bearer" = ["webhooks:admin"])))]
pub(crate) async fn create(
    State(s): State<AppState>,
    JsonBody(req): JsonBody<CreateWebhook>,
) -> Result<(StatusCode, Json<Webhook>), ApiError> {
    Ok((StatusCode::CREATED, Json(s.service.create_webhook(req).await?)))
}

#[utoipa::path(get, path = "/webhooks", tag = "webhooks",
    responses((status = 200, body = WebhookList)), security(("bearer" = ["webhooks:admin"])))]
pub(crate) async fn list(State(s): State<AppState>) -> Result<Json<WebhookList>, ApiError> {
    Ok(Json(s.service.list_webhooks().await?))
}

#[utoipa::path(get, path = "/webhooks/{id}", tag = "webhooks",
    params(("id" = String, Path, description = "webhook id")),
    responses((status = 200, body = Webhook), (status = 404, description = WEBHOOK_NOT_FOUND, body = ErrorBody)),
    security(("bearer" = ["webhooks:admin"])))]
pub(crate) async fn get(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Webhook>, ApiError> {
    Ok(Json(s.service.get_webhook(&id).await?))
}

#[utoipa::path(delete, path = "/webhooks/{id}", tag = "webhooks",
    params(("id" = String, Path, description = "webhook id")),
    responses((status = 204, description = "deleted, with its deliveries (pending ones are not sent)"),
              (status = 404, description = WEBHOOK_NOT_FOUND, body = ErrorBody)),
    security(("bearer" = ["webhooks:admin"])))]
pub(crate) async fn delete(State(s): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    s.service.delete_webhook(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/webhooks/{id}/deliveries", tag = "webhooks",
    params(("id" = String, Path, description = "webhook id"),
           ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "deliveries per page (default 50, at most 100)"),
           ("before" = Option<u64>, Query, minimum = 1, maximum = 9_223_372_036_854_775_807_u64, description = "only deliveries with a smaller id: the `next_before` of the previous page")),
    responses((status = 200, description = "most recent first", body = WebhookDeliveryList),
              (status = 400, description = "VALIDATION_ERROR: limit or before out of range", body = ErrorBody),
              (status = 404, description = WEBHOOK_NOT_FOUND, body = ErrorBody)),
    security(("bearer" = ["webhooks:admin"])))]
pub(crate) async fn deliveries(
    State(s): State<AppState>,
    Path(id): Path<String>,
    q: QueryMap,
) -> Result<Json<WebhookDeliveryList>, ApiError> {
    let limit = q.int("limit", 1..=MAX_PAGE)?;
    let before = q.int("before", 1..=MAX_DELIVERY_ID)?;
    Ok(Json(s.service.webhook_deliveries(&id, before, limit).await?))
}
