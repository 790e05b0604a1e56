//! `/nodes`: the fleet's nodes (reading needs `machines:read`; draining and undraining `nodes:admin`).

use axum::Json;
use axum::extract::{Path, State};
use hyperfleet_types::{ErrorBody, Node, NodeList};

use super::AppState;
use super::error::ApiError;

const NODE_NOT_FOUND: &str = "NOT_FOUND: no node has this name";

fn not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("Node '{name}' not found"))
}

#[utoipa::path(get, path = "/nodes", tag = "nodes",
    responses((status = 200, description = "every node of the fleet, by name", body = NodeList)),
    security(("bearer" = ["machines:read"])))]
pub(crate) async fn list(State(s): State<AppState>) -> Result<Json<NodeList>, ApiError> {
    Ok(Json(NodeList { nodes: s.service.nodes().list().await? }))
}

#[utoipa::path(get, path = "/nodes/{name}", tag = "nodes",
    params(("name" = String, Path, description = "node name")),
    responses((status = 200, body = Node), (status = 404, description = NODE_NOT_FOUND, body = ErrorBody)),
    security(("bearer" = ["machines:read"])))]
pub(crate) async fn get(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<Node>, ApiError> {
    s.service.nodes().get(&name).await?.map(Json).ok_or_else(|| not_found(&name))
}

#[utoipa::path(post, path = "/nodes/{name}/drain", tag = "nodes",
    params(("name" = String, Path, description = "node name")),
    responses((status = 200, description = "drained: its machines keep running and are served, placement gives it no new ones", body = Node),
              (status = 404, description = NODE_NOT_FOUND, body = ErrorBody)),
    security(("bearer" = ["nodes:admin"])))]
pub(crate) async fn drain(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<Node>, ApiError> {
    s.service.nodes().set_drained(&name, true).await?.map(Json).ok_or_else(|| not_found(&name))
}

#[utoipa::path(post, path = "/nodes/{name}/undrain", tag = "nodes",
    params(("name" = String, Path, description = "node name")),
    responses((status = 200, description = "placement may choose it again", body = Node),
              (status = 404, description = NODE_NOT_FOUND, body = ErrorBody)),
    security(("bearer" = ["nodes:admin"])))]
pub(crate) async fn undrain(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<Node>, ApiError> {
    s.service.nodes().set_drained(&name, false).await?.map(Json).ok_or_else(|| not_found(&name))
}
