//! Machine endpoints: create, list, get, update, start, stop, restart, delete, wait, logs, network checks, stats.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use hyperfleet_types::{
    CreateMachine, ErrorBody, Machine, MachineList, MachineLogs, MachineStats, MachineStatus, NetworkReport,
    UpdateMachine,
};

use super::AppState;
use super::error::ApiError;
use super::extract::{JsonBody, QueryMap};
use crate::machines::Error as MachineError;
use crate::machines::selector::Selector;

pub(crate) const MAX_LIST_LIMIT: u32 = 500;
pub(crate) const MAX_WAIT_SECS: u64 = 30;

/// Descriptions of the error responses several operations share.
pub(super) const NOT_FOUND: &str = "NOT_FOUND: no machine has this id or name";
const TRANSITION: &str = "BAD_REQUEST: the state table does not allow this from the machine's state (e.g. \"Cannot start machine in 'running' state\")";
const FIRECRACKER_API_ERROR: &str =
    "FIRECRACKER_API_ERROR: firecracker refused the request (a 400 from firecracker is answered as 400)";

/// A `status` query parameter: a machine status, or empty for none (`?status=&limit=50`).
pub(crate) struct StatusFilter;

impl utoipa::PartialSchema for StatusFilter {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(utoipa::openapi::Ref::from_schema_name("MachineStatus"))
            .item(ObjectBuilder::new().schema_type(Type::String).enum_values(Some([""])))
            .into()
    }
}
impl utoipa::ToSchema for StatusFilter {}

/// A flag in the query: `true`/`false`, `1`/`0`, or present and empty (`?force`, meaning true), as
/// `QueryMap::bool` reads it.
pub(crate) struct Flag;

impl utoipa::PartialSchema for Flag {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        // anyOf, not oneOf: `?force=true` read as a string and as a boolean is one valid value, not two.
        use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, Type};
        AnyOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::Boolean))
            .item(ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["", "1", "0", "true", "false"])))
            .into()
    }
}
impl utoipa::ToSchema for Flag {}

fn status_param(q: &QueryMap, key: &str) -> Result<Option<MachineStatus>, ApiError> {
    q.get(key)
        .filter(|s| !s.is_empty())
        .map(|s| {
            MachineStatus::parse(s).ok_or_else(|| {
                let all: Vec<&str> = MachineStatus::ALL.iter().map(|s| s.as_str()).collect();
                ApiError::validation(format!("{key} must be one of {}, got '{s}'", all.join(", ")))
            })
        })
        .transpose()
}

#[utoipa::path(post, path = "/machines", tag = "machines", request_body = CreateMachine,
    responses((status = 201, body = Machine),
              (status = 400, description = "VALIDATION_ERROR: a field is missing or out of range, an asset path is not allowed, or the runtime cannot run here", body = ErrorBody),
              (status = 409, description = "CONFLICT: the name is taken, or no node has room for the machine (or the pinned `node` cannot take it, or no node matches `node_selector` and the runtime)", body = ErrorBody),
              (status = 403, description = "FORBIDDEN: the key lacks machines:write, or (child API) the parent's spawn quota is used up, or the request asks for spawn or volumes", body = ErrorBody),
              (status = 503, description = "IP_POOL_EXHAUSTED: every address block of the subnet is leased; NODE_UNAVAILABLE: the node placement chose could not be reached", body = ErrorBody)),
    security(("bearer" = ["machines:write"])))]
pub(crate) async fn create(
    State(s): State<AppState>,
    child_of: Option<axum::Extension<super::auth::ChildOf>>,
    from_node: Option<axum::Extension<super::forward::FromNode>>,
    headers: axum::http::HeaderMap,
    JsonBody(req): JsonBody<CreateMachine>,
) -> Result<axum::response::Response, ApiError> {
    let from_node = from_node.is_some();
    let correlation = headers.get(super::CORRELATION_HEADER).cloned();
    if let Some(axum::Extension(parent)) = child_of {
        let made = s.service.create_child(&parent.0, req).await?;
        return Ok((StatusCode::CREATED, Json(made)).into_response());
    }
    // Placement may choose another node: it creates the machine there, pinned, deciding again under the
    // database's write lock. If another create took the room meanwhile, placement runs again (a few times)
    // unless the user pinned the node.
    let mut attempts = 0;
    loop {
        attempts += 1;
        match s.service.create(req.clone()).await {
            Err(MachineError::PlacedElsewhere { node }) if !from_node => {
                let resp = forward_create(&s, req.clone(), &node, correlation.clone()).await;
                if resp.status() == StatusCode::CONFLICT && req.node.is_none() && attempts < 4 {
                    continue;
                }
                return Ok(resp);
            }
            other => return Ok((StatusCode::CREATED, Json(other?)).into_response()),
        }
    }
}

/// Sends a create to node `node`, pinned to it, and answers with what it answered.
async fn forward_create(
    s: &AppState,
    mut req: CreateMachine,
    node: &str,
    correlation: Option<axum::http::HeaderValue>,
) -> axum::response::Response {
    req.node = Some(node.to_string());
    let peer = match s.service.nodes().peer(node).await {
        Ok(Some(p)) => p,
        Ok(None) => {
            return ApiError::from(crate::machines::Error::Conflict(format!("node '{node}' is gone"))).into_response();
        }
        Err(e) => return ApiError::from(e).into_response(),
    };
    let Some(url) = peer.url else {
        return ApiError::from(crate::machines::Error::Conflict(format!("node '{node}' has no URL"))).into_response();
    };
    let body = match serde_json::to_vec(&req) {
        Ok(b) => b,
        Err(e) => return ApiError::internal(e.to_string()).into_response(),
    };
    let mut fwd = axum::http::Request::builder()
        .method(axum::http::Method::POST)
        .uri("/machines")
        .header(axum::http::header::CONTENT_TYPE, "application/json");
    if let Some(c) = correlation {
        fwd = fwd.header(super::CORRELATION_HEADER, c);
    }
    match fwd.body(axum::body::Body::from(body)) {
        Ok(r) => super::forward::send(s, r, &url, node).await,
        Err(e) => ApiError::internal(e.to_string()).into_response(),
    }
}

#[utoipa::path(get, path = "/machines/{id}/children", tag = "machines", params(("id" = String, Path, description = "machine id or name")),
    responses((status = 200, body = MachineList, description = "the machines this one created from inside (with its child token), oldest first"),
              (status = 404, description = NOT_FOUND, body = ErrorBody)),
    security(("bearer" = ["machines:read"])))]
pub(crate) async fn children(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<MachineList>, ApiError> {
    Ok(Json(s.service.children(&id).await?))
}

#[utoipa::path(get, path = "/machines", tag = "machines",
    params(("status" = Option<StatusFilter>, Query, description = "only machines in this state (empty: any)"),
           ("label" = Option<String>, Query, description = "label selector: comma-separated `key=value`, `key!=value`, `key`, `!key`, all of which must hold"),
           ("limit" = Option<u32>, Query, description = "page size, 1-500 (default 50)"),
           ("offset" = Option<u64>, Query, description = "machines to skip (default 0)")),
    responses((status = 200, body = MachineList), (status = 400, description = "VALIDATION_ERROR: a query parameter is wrong", body = ErrorBody)),
    security(("bearer" = ["machines:read"])))]
pub(crate) async fn list(State(s): State<AppState>, q: QueryMap) -> Result<Json<MachineList>, ApiError> {
    let status = status_param(&q, "status")?;
    let limit = q.int("limit", 1..=MAX_LIST_LIMIT)?.unwrap_or(50);
    let offset = q.int("offset", 0..=u64::from(u32::MAX))?.unwrap_or(0);
    let labels = Selector::parse(q.get("label").unwrap_or("")).map_err(ApiError::validation)?;
    Ok(Json(s.service.list(status, &labels, limit, offset).await?))
}

#[utoipa::path(get, path = "/machines/{id}", tag = "machines", params(("id" = String, Path, description = "machine id or name")),
    responses((status = 200, body = Machine), (status = 404, description = NOT_FOUND, body = ErrorBody)),
    security(("bearer" = ["machines:read"])))]
pub(crate) async fn get(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Machine>, ApiError> {
    Ok(Json(s.service.get(&id).await?))
}

#[utoipa::path(patch, path = "/machines/{id}", tag = "machines", request_body = UpdateMachine,
    params(("id" = String, Path, description = "machine id or name")),
    responses((status = 200, body = Machine), (status = 400, description = "VALIDATION_ERROR: a field is wrong (a port out of range or listed twice, a label key, a timer out of range, ...)", body = ErrorBody),
              (status = 404, description = NOT_FOUND, body = ErrorBody)),
    security(("bearer" = ["machines:write"])))]
pub(crate) async fn update(
    State(s): State<AppState>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<UpdateMachine>,
) -> Result<Json<Machine>, ApiError> {
    Ok(Json(s.service.update(&id, req).await?))
}

#[utoipa::path(delete, path = "/machines/{id}", tag = "machines",
    params(("id" = String, Path, description = "machine id or name"), ("force" = Option<Flag>, Query, description = "stop a running machine first (`?force` alone means true)")),
    responses((status = 204, description = "deleted"),
              (status = 400, description = "BAD_REQUEST: the machine is not at rest (stop it first, or pass force); VALIDATION_ERROR: force is not a boolean", body = ErrorBody),
              (status = 404, description = NOT_FOUND, body = ErrorBody)),
    security(("bearer" = ["machines:write"])))]
pub(crate) async fn delete(
    State(s): State<AppState>,
    Path(id): Path<String>,
    q: QueryMap,
) -> Result<StatusCode, ApiError> {
    let force = q.bool("force")?;
    s.service.delete(&id, force).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/machines/{id}/start", tag = "machines", params(("id" = String, Path, description = "machine id or name")),
    responses((status = 200, description = "running", body = Machine), (status = 400, description = TRANSITION, body = ErrorBody),
              (status = 403, description = "REGISTRY_UNAUTHORIZED: the machine's image had to be pulled and the registry refused it", body = ErrorBody),
              (status = 404, description = NOT_FOUND, body = ErrorBody),
              (status = 500, description = "RUNTIME_ERROR: the runtime or the host network failed, and the machine is failed; INTERNAL_ERROR: the database failed; IMAGE_ERROR: the image could not be converted", body = ErrorBody),
              (status = 502, description = "FIRECRACKER_API_ERROR: firecracker refused the request (a 400 from firecracker is answered as 400); REGISTRY_ERROR: the image's registry could not be reached", body = ErrorBody),
              (status = 507, description = "INSUFFICIENT_STORAGE: the image's pull filled the images directory's filesystem (the machine stays pending)", body = ErrorBody)),
    security(("bearer" = ["machines:write"])))]
pub(crate) async fn start(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Machine>, ApiError> {
    Ok(Json(s.service.start(&id).await?))
}

#[utoipa::path(post, path = "/machines/{id}/keepalive", tag = "machines", params(("id" = String, Path, description = "machine id or name")),
    responses((status = 200, description = "the idle clock starts again now, and a machine with ttl_seconds expires that long from now (never sooner)", body = Machine),
              (status = 400, description = "BAD_REQUEST: the machine is not running or paused", body = ErrorBody),
              (status = 404, description = NOT_FOUND, body = ErrorBody)),
    security(("bearer" = ["machines:write"])))]
pub(crate) async fn keepalive(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Machine>, ApiError> {
    Ok(Json(s.service.keepalive(&id).await?))
}

#[utoipa::path(post, path = "/machines/{id}/stop", tag = "machines", params(("id" = String, Path, description = "machine id or name")),
    responses((status = 200, description = "stopped", body = Machine), (status = 400, description = TRANSITION, body = ErrorBody),
              (status = 404, description = NOT_FOUND, body = ErrorBody)),
    security(("bearer" = ["machines:write"])))]
pub(crate) async fn stop(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Machine>, ApiError> {
    Ok(Json(s.service.stop(&id).await?))
}

#[utoipa::path(post, path = "/machines/{id}/restart", tag = "machines", params(("id" = String, Path, description = "machine id or name")),
    responses((status = 200, description = "stopped and started again", body = Machine), (status = 400, description = TRANSITION, body = ErrorBody),
              (status = 404, description = NOT_FOUND, body = ErrorBody),
              (status = 500, description = "RUNTIME_ERROR: the start failed, and the machine is failed; INTERNAL_ERROR: the database failed", body = ErrorBody),
              (status = 502, description = FIRECRACKER_API_ERROR, body = ErrorBody)),
    security(("bearer" = ["machines:write"])))]
pub(crate) async fn restart(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Machine>, ApiError> {
    Ok(Json(s.service.restart(&id).await?))
}

#[utoipa::path(post, path = "/machines/{id}/pause", tag = "machines", params(("id" = String, Path, description = "machine id or name")),
    responses((status = 200, description = "paused: vCPUs suspended (firecracker) or processes frozen (container)", body = Machine),
              (status = 400, description = TRANSITION, body = ErrorBody), (status = 404, description = NOT_FOUND, body = ErrorBody),
              (status = 500, description = "RUNTIME_ERROR: the runtime refused (the machine keeps its state); INTERNAL_ERROR", body = ErrorBody),
              (status = 502, description = FIRECRACKER_API_ERROR, body = ErrorBody)),
    security(("bearer" = ["machines:write"])))]
pub(crate) async fn pause(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Machine>, ApiError> {
    Ok(Json(s.service.pause(&id).await?))
}

#[utoipa::path(post, path = "/machines/{id}/resume", tag = "machines", params(("id" = String, Path, description = "machine id or name")),
    responses((status = 200, description = "running again", body = Machine), (status = 400, description = TRANSITION, body = ErrorBody),
              (status = 404, description = NOT_FOUND, body = ErrorBody),
              (status = 500, description = "RUNTIME_ERROR: the runtime refused (the machine keeps its state); INTERNAL_ERROR", body = ErrorBody),
              (status = 502, description = FIRECRACKER_API_ERROR, body = ErrorBody)),
    security(("bearer" = ["machines:write"])))]
pub(crate) async fn resume(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Machine>, ApiError> {
    Ok(Json(s.service.resume(&id).await?))
}

#[utoipa::path(get, path = "/machines/{id}/wait", tag = "machines",
    params(("id" = String, Path, description = "machine id or name"),
           ("status" = Option<StatusFilter>, Query, description = "state to wait for (default, and when empty: running)"),
           ("timeout" = Option<u64>, Query, description = "seconds, default and maximum 30 (larger values are capped)")),
    responses((status = 200, body = Machine),
              (status = 400, description = "BAD_REQUEST: the machine failed instead; VALIDATION_ERROR: a query parameter is wrong", body = ErrorBody),
              (status = 404, description = NOT_FOUND, body = ErrorBody),
              (status = 504, description = "TIMEOUT: the machine did not reach the state in time", body = ErrorBody)),
    security(("bearer" = ["machines:read"])))]
pub(crate) async fn wait(
    State(s): State<AppState>,
    Path(id): Path<String>,
    q: QueryMap,
) -> Result<Json<Machine>, ApiError> {
    let want = status_param(&q, "status")?.unwrap_or(MachineStatus::Running);
    let secs = q.int("timeout", 0..=u64::MAX)?.unwrap_or(MAX_WAIT_SECS).min(MAX_WAIT_SECS);
    Ok(Json(s.service.wait(&id, want, Duration::from_secs(secs)).await?))
}

#[utoipa::path(get, path = "/machines/{id}/logs", tag = "machines",
    params(("id" = String, Path, description = "machine id or name"), ("lines" = Option<usize>, Query, description = "1-10000, default 100")),
    responses((status = 200, body = MachineLogs), (status = 400, description = "VALIDATION_ERROR: lines is out of range", body = ErrorBody),
              (status = 404, description = NOT_FOUND, body = ErrorBody)),
    security(("bearer" = ["machines:read"])))]
pub(crate) async fn logs(
    State(s): State<AppState>,
    Path(id): Path<String>,
    q: QueryMap,
) -> Result<Json<MachineLogs>, ApiError> {
    let lines = q.int("lines", 1..=10_000usize)?.unwrap_or(100);
    Ok(Json(s.service.logs(&id, lines).await?))
}

#[utoipa::path(get, path = "/machines/{id}/network", tag = "machines", params(("id" = String, Path, description = "machine id or name")),
    responses((status = 200, description = "the doctor's checks for this machine", body = NetworkReport),
              (status = 400, description = "BAD_REQUEST: the machine is not running", body = ErrorBody), (status = 404, description = NOT_FOUND, body = ErrorBody)),
    security(("bearer" = ["machines:read"])))]
pub(crate) async fn network(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<NetworkReport>, ApiError> {
    let machine = s.service.get(&id).await?;
    if machine.status != MachineStatus::Running {
        return Err(MachineError::NotRunning { what: "check its network", status: machine.status }.into());
    }
    Ok(Json(s.doctor.machine_report(&machine).await))
}

#[utoipa::path(get, path = "/machines/{id}/stats", tag = "machines", params(("id" = String, Path, description = "machine id or name")),
    responses((status = 200, body = MachineStats), (status = 404, description = NOT_FOUND, body = ErrorBody)),
    security(("bearer" = ["machines:read"])))]
pub(crate) async fn stats(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<MachineStats>, ApiError> {
    Ok(Json(s.service.stats(&id).await?))
}
