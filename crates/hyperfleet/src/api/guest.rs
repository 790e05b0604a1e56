//! Exec and file endpoints. Large bodies are streamed both ways: an upload goes to the agent chunk by
//! chunk, a download is answered as the agent reads the file.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use hyperfleet_agent_proto::client::ExecEvent as AgentEvent;
use hyperfleet_types::{
    DirListing, ErrorBody, ExecEvent, ExecRequest, ExecResult, FileStat, FileUpload, FileWritten, MakeDir,
};

use super::AppState;
use super::error::ApiError;
use super::extract::{JsonBody, QueryMap, parse_json};
use super::machines::NOT_FOUND;
use crate::machines::Error as MachineError;

/// Descriptions of the error responses several operations share.
const VSOCK_ERROR: &str = "VSOCK_ERROR: the guest agent cannot be reached";
const EXEC_BAD_REQUEST: &str = "VALIDATION_ERROR: the request is wrong (e.g. an empty command, a timeout out of range); BAD_REQUEST: the machine is not running";
const TOO_MANY_EXECS: &str = "TOO_MANY_REQUESTS: the machine already runs HYPERFLEET_EXEC_MAX_CONCURRENT commands";
const FILES_BAD_REQUEST: &str = "VALIDATION_ERROR: the path is missing, not absolute or too long, or mode is not octal; \
    BAD_REQUEST: the machine is not running, or the guest refused (e.g. a directory where a file was expected)";
const FILES_FORBIDDEN: &str = "FORBIDDEN: the key lacks machines:exec, or the guest denied the access \
    (a read-only mount, a file of /proc or /sys)";
const FILE_NOT_FOUND: &str = "NOT_FOUND: no machine has this id or name, or the file does not exist";
const TOO_LARGE: &str = "PAYLOAD_TOO_LARGE: the file is larger than HYPERFLEET_FILE_MAX_SIZE";
const GUEST_DISK_FULL: &str = "INSUFFICIENT_STORAGE: the machine's disk (or quota) is full";
const TRANSFER_TIMEOUT: &str = "TIMEOUT: the transfer took longer than HYPERFLEET_FILE_TRANSFER_TIMEOUT";

/// Raw file bytes, as an `application/octet-stream` body.
struct RawBytes;

impl utoipa::PartialSchema for RawBytes {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .into()
    }
}
impl utoipa::ToSchema for RawBytes {}

#[utoipa::path(post, path = "/machines/{id}/exec", tag = "exec", request_body = ExecRequest,
    params(("id" = String, Path, description = "machine id or name")),
    responses((status = 200, description = "the command ran (any exit code; 127 if it could not be started)", body = ExecResult),
              (status = 400, description = EXEC_BAD_REQUEST, body = ErrorBody), (status = 404, description = NOT_FOUND, body = ErrorBody),
              (status = 429, description = TOO_MANY_EXECS, body = ErrorBody),
              (status = 502, description = VSOCK_ERROR, body = ErrorBody),
              (status = 504, description = "TIMEOUT: the command ran out of time and was killed", body = ErrorBody)),
    security(("bearer" = ["machines:exec"])))]
pub(crate) async fn exec(
    State(s): State<AppState>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<ExecRequest>,
) -> Result<Response, ApiError> {
    let (result, lease) = s.service.exec(&id, req).await?;
    // Serialized while the output's share of the budget is still held.
    let response = Json(result).into_response();
    drop(lease);
    Ok(response)
}

fn ndjson(ev: &ExecEvent) -> std::io::Result<Bytes> {
    let mut line = serde_json::to_vec(ev)?;
    line.push(b'\n');
    Ok(Bytes::from(line))
}

#[utoipa::path(post, path = "/machines/{id}/exec/stream", tag = "exec", request_body = ExecRequest,
    params(("id" = String, Path, description = "machine id or name")),
    responses((status = 200, description = "NDJSON: one ExecEvent per line (stdout/stderr chunks as they come, then exit or error)",
               content_type = "application/x-ndjson", body = ExecEvent),
              (status = 400, description = EXEC_BAD_REQUEST, body = ErrorBody), (status = 404, description = NOT_FOUND, body = ErrorBody),
              (status = 429, description = TOO_MANY_EXECS, body = ErrorBody),
              (status = 502, description = VSOCK_ERROR, body = ErrorBody)),
    security(("bearer" = ["machines:exec"])))]
pub(crate) async fn exec_stream(
    State(s): State<AppState>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<ExecRequest>,
) -> Result<Response, ApiError> {
    let (session, plan) = s.service.exec_stream(&id, req).await?;
    let deadline = tokio::time::Instant::now() + plan.timeout + std::time::Duration::from_secs(5);
    let timeout_msg = plan.timeout_error().to_string();
    // The plan holds the machine's exec slot: it lives as long as the stream.
    let plan = std::sync::Arc::new(plan);
    let service = s.service.clone();
    // State: the session until the exit or an error has been sent.
    let stream = futures::stream::unfold(Some(session), move |state| {
        let (plan, service) = (plan.clone(), service.clone());
        let timeout_msg = timeout_msg.clone();
        async move {
            let mut session = state?;
            let ev = match tokio::time::timeout_at(deadline, session.next_event()).await {
                Ok(Ok(AgentEvent::Stdout(b))) => {
                    return Some((
                        ndjson(&ExecEvent::Stdout { data: String::from_utf8_lossy(&b).into_owned() }),
                        Some(session),
                    ));
                }
                Ok(Ok(AgentEvent::Stderr(b))) => {
                    return Some((
                        ndjson(&ExecEvent::Stderr { data: String::from_utf8_lossy(&b).into_owned() }),
                        Some(session),
                    ));
                }
                Ok(Ok(AgentEvent::Exited(e))) if e.timed_out => {
                    ExecEvent::Error { code: "TIMEOUT".into(), message: timeout_msg }
                }
                Ok(Ok(AgentEvent::Exited(e))) => ExecEvent::Exit { exit_code: e.exit_code, duration_ms: e.duration_ms },
                Ok(Err(e)) => {
                    let api: ApiError = crate::machines::command_error(e).into();
                    ExecEvent::Error { code: api.code.into(), message: api.message }
                }
                Err(_) => ExecEvent::Error { code: "TIMEOUT".into(), message: timeout_msg },
            };
            let exit_code = match &ev {
                ExecEvent::Exit { exit_code, .. } => Some(*exit_code),
                _ => None,
            };
            service.exec_finished(&plan, exit_code).await;
            Some((ndjson(&ev), None))
        }
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response())
}

fn path_param(q: &QueryMap) -> Result<String, ApiError> {
    q.get("path").map(str::to_string).ok_or_else(|| ApiError::validation("path is required (?path=/absolute/path)"))
}

#[utoipa::path(post, path = "/machines/{id}/files", tag = "files",
    request_body(description = "JSON with base64 content, or the raw bytes (then `path` and `mode` come from the query)",
        content((FileUpload = "application/json"), (RawBytes = "application/octet-stream"))),
    params(("id" = String, Path, description = "machine id or name"),
           ("path" = Option<String>, Query, description = "absolute guest path; required for a raw upload, ignored for JSON"),
           ("mode" = Option<String>, Query, description = "octal permission bits for a raw upload, e.g. 755; ignored for JSON")),
    responses((status = 201, body = FileWritten), (status = 400, description = FILES_BAD_REQUEST, body = ErrorBody), (status = 403, description = FILES_FORBIDDEN, body = ErrorBody),
              (status = 404, description = NOT_FOUND, body = ErrorBody), (status = 413, description = TOO_LARGE, body = ErrorBody),
              (status = 502, description = VSOCK_ERROR, body = ErrorBody), (status = 504, description = TRANSFER_TIMEOUT, body = ErrorBody),
              (status = 507, description = GUEST_DISK_FULL, body = ErrorBody)),
    security(("bearer" = ["machines:exec"])))]
pub(crate) async fn upload(
    State(s): State<AppState>,
    Path(id): Path<String>,
    q: QueryMap,
    req: Request,
) -> Result<(StatusCode, Json<FileWritten>), ApiError> {
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    let max = s.service.file_max_size();
    let too_large = || MachineError::FileTooLarge { size: None, max };
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let mut body = req.into_body().into_data_stream();
    // An unknown or stopped machine is refused before the body is buffered (only drained, so the client
    // reads the answer instead of a reset connection).
    if let Err(e) = s.service.accepts_files(&id).await {
        drain(&mut body, max).await;
        return Err(e.into());
    }
    if is_json {
        // Base64 makes the body 4/3 of the file, plus a little JSON.
        let limit = max / 3 * 4 + 64 * 1024;
        let mut buf = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| ApiError::validation(format!("reading the request body: {e}")))?;
            if (buf.len() + chunk.len()) as u64 > limit {
                drain(&mut body, max).await;
                return Err(too_large().into());
            }
            buf.extend_from_slice(&chunk);
        }
        let up: FileUpload = parse_json(&buf)?;
        let written = s.service.write_file_base64(&id, &up.path, &up.content, up.mode).await?;
        return Ok((StatusCode::CREATED, Json(written)));
    }
    let checked = async {
        let path = path_param(&q)?;
        let mode = q
            .get("mode")
            .map(|m| {
                u32::from_str_radix(m, 8).map_err(|_| {
                    ApiError::validation(format!("mode must be octal permission bits such as 644, got '{m}'"))
                })
            })
            .transpose()?;
        if declared.is_some_and(|len| len > max) {
            return Err(ApiError::from(too_large()));
        }
        Ok((path, mode))
    }
    .await;
    let (path, mode) = match checked {
        Ok(x) => x,
        Err(e) => {
            drain(&mut body, max).await;
            return Err(e);
        }
    };
    // The body goes to the agent through a channel, so that if the upload fails part-way we still own
    // the rest of it and can drain it before answering.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, MachineError>>(4);
    let chunks = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let feed = async {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| MachineError::UploadBroken(e.to_string()));
            if tx.send(chunk).await.is_err() {
                break;
            }
        }
        drop(tx);
    };
    let (written, ()) = tokio::join!(s.service.write_file_stream(&id, &path, mode, chunks), feed);
    if written.is_err() {
        drain(&mut body, max).await;
    }
    Ok((StatusCode::CREATED, Json(written?)))
}

/// Reads and drops what is left of a request body (at most a few times the file limit), so a client that
/// sends its whole body before reading gets our error response rather than a connection reset.
async fn drain(body: &mut axum::body::BodyDataStream, max: u64) {
    let cap = max.saturating_mul(4).max(16 << 20);
    let mut seen = 0u64;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while seen < cap {
        match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(Ok(chunk))) => seen += chunk.len() as u64,
            _ => return,
        }
    }
}

#[utoipa::path(get, path = "/machines/{id}/files", tag = "files",
    params(("id" = String, Path, description = "machine id or name"), ("path" = String, Query, description = "absolute guest path")),
    responses((status = 200, description = "the file's bytes", content_type = "application/octet-stream", body = RawBytes),
              (status = 400, description = FILES_BAD_REQUEST, body = ErrorBody), (status = 403, description = FILES_FORBIDDEN, body = ErrorBody),
              (status = 404, description = FILE_NOT_FOUND, body = ErrorBody),
              (status = 413, description = TOO_LARGE, body = ErrorBody), (status = 502, description = VSOCK_ERROR, body = ErrorBody),
              (status = 504, description = TRANSFER_TIMEOUT, body = ErrorBody)),
    security(("bearer" = ["machines:exec"])))]
pub(crate) async fn download(
    State(s): State<AppState>,
    Path(id): Path<String>,
    q: QueryMap,
) -> Result<Response, ApiError> {
    let path = path_param(&q)?;
    let reader = s.service.read_file(&id, &path).await?;
    let size = reader.size;
    let stream = futures::stream::unfold(Some(reader), |state| async move {
        let mut r = state?;
        match r.next_chunk().await {
            Ok(Some(chunk)) => Some((Ok(chunk), Some(r))),
            Ok(None) => None,
            // The status line is gone already: end the body early so the client sees a short read.
            Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream".to_string()), (header::CONTENT_LENGTH, size.to_string())],
        Body::from_stream(stream),
    )
        .into_response())
}

#[utoipa::path(get, path = "/machines/{id}/files/stat", tag = "files",
    params(("id" = String, Path, description = "machine id or name"), ("path" = String, Query, description = "absolute guest path")),
    responses((status = 200, body = FileStat), (status = 400, description = FILES_BAD_REQUEST, body = ErrorBody), (status = 403, description = FILES_FORBIDDEN, body = ErrorBody),
              (status = 404, description = FILE_NOT_FOUND, body = ErrorBody), (status = 502, description = VSOCK_ERROR, body = ErrorBody),
              (status = 504, description = TRANSFER_TIMEOUT, body = ErrorBody)),
    security(("bearer" = ["machines:exec"])))]
pub(crate) async fn stat(
    State(s): State<AppState>,
    Path(id): Path<String>,
    q: QueryMap,
) -> Result<Json<FileStat>, ApiError> {
    Ok(Json(s.service.stat_file(&id, &path_param(&q)?).await?))
}

#[utoipa::path(get, path = "/machines/{id}/files/list", tag = "files",
    params(("id" = String, Path, description = "machine id or name"), ("path" = String, Query, description = "absolute guest path of a directory"),
           ("after" = Option<String>, Query, description = "the `next_after` of the previous page"),
           ("limit" = Option<u32>, Query, minimum = 1, maximum = 500, description = "entries per page (default 100, at most 500)")),
    responses((status = 200, body = DirListing), (status = 400, description = FILES_BAD_REQUEST, body = ErrorBody), (status = 403, description = FILES_FORBIDDEN, body = ErrorBody),
              (status = 404, description = FILE_NOT_FOUND, body = ErrorBody), (status = 502, description = VSOCK_ERROR, body = ErrorBody),
              (status = 504, description = TRANSFER_TIMEOUT, body = ErrorBody)),
    security(("bearer" = ["machines:exec"])))]
pub(crate) async fn list(
    State(s): State<AppState>,
    Path(id): Path<String>,
    q: QueryMap,
) -> Result<Json<DirListing>, ApiError> {
    let limit = q.int("limit", 1..=hyperfleet_agent_proto::MAX_LIST_PAGE)?.unwrap_or(DEFAULT_LIST_PAGE);
    Ok(Json(s.service.list_dir(&id, &path_param(&q)?, q.get("after"), limit).await?))
}

/// Entries in a listing page unless `limit` says otherwise.
const DEFAULT_LIST_PAGE: u32 = 100;

#[utoipa::path(post, path = "/machines/{id}/files/mkdir", tag = "files", request_body = MakeDir,
    params(("id" = String, Path, description = "machine id or name")),
    responses((status = 201, description = "the directory (also when `parents` and it existed)", body = FileStat),
              (status = 400, description = FILES_BAD_REQUEST, body = ErrorBody), (status = 403, description = FILES_FORBIDDEN, body = ErrorBody),
              (status = 404, description = FILE_NOT_FOUND, body = ErrorBody), (status = 502, description = VSOCK_ERROR, body = ErrorBody),
              (status = 504, description = TRANSFER_TIMEOUT, body = ErrorBody), (status = 507, description = GUEST_DISK_FULL, body = ErrorBody)),
    security(("bearer" = ["machines:exec"])))]
pub(crate) async fn mkdir(
    State(s): State<AppState>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<MakeDir>,
) -> Result<(StatusCode, Json<FileStat>), ApiError> {
    Ok((StatusCode::CREATED, Json(s.service.make_dir(&id, &req).await?)))
}

#[utoipa::path(delete, path = "/machines/{id}/files", tag = "files",
    params(("id" = String, Path, description = "machine id or name"), ("path" = String, Query, description = "absolute guest path"),
           ("recursive" = Option<super::machines::Flag>, Query, description = "delete a non-empty directory (`?recursive` alone means true)")),
    responses((status = 204, description = "deleted"), (status = 400, description = FILES_BAD_REQUEST, body = ErrorBody), (status = 403, description = FILES_FORBIDDEN, body = ErrorBody),
              (status = 404, description = FILE_NOT_FOUND, body = ErrorBody), (status = 502, description = VSOCK_ERROR, body = ErrorBody),
              (status = 504, description = TRANSFER_TIMEOUT, body = ErrorBody)),
    security(("bearer" = ["machines:exec"])))]
pub(crate) async fn delete(
    State(s): State<AppState>,
    Path(id): Path<String>,
    q: QueryMap,
) -> Result<StatusCode, ApiError> {
    s.service.delete_file(&id, &path_param(&q)?, q.bool("recursive")?).await?;
    Ok(StatusCode::NO_CONTENT)
}
