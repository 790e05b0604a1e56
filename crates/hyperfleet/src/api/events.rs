//! `GET /events`: machine events as Server-Sent Events, filtered by machine and type, resumable with
//! `Last-Event-ID` from the stored backlog; and `GET /metrics`, the Prometheus exposition.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use hyperfleet_types::{ErrorBody, Event, EventKind};
use tokio::sync::broadcast::{self, error::RecvError};

use super::AppState;
use super::error::ApiError;
use super::extract::QueryMap;
use crate::machines::{EventFilter, Service};

/// A `type` query parameter: event types, comma-separated.
pub(crate) struct EventTypes;

impl utoipa::PartialSchema for EventTypes {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(format!(
                "comma-separated event types: {}",
                EventKind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
            )))
            .into()
    }
}
impl utoipa::ToSchema for EventTypes {}

fn filter(q: &QueryMap) -> Result<EventFilter, ApiError> {
    let machine = q.get("machine").filter(|m| !m.is_empty()).map(str::to_string);
    let kinds = match q.get("type").filter(|t| !t.is_empty()) {
        None => None,
        Some(list) => Some(
            list.split(',')
                .map(|t| {
                    EventKind::parse(t.trim()).ok_or_else(|| {
                        let all: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
                        ApiError::validation(format!("type: '{t}' is not one of {}", all.join(", ")))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok(EventFilter { machine, kinds })
}

/// Where to resume: the `Last-Event-ID` header (what EventSource sends on reconnecting), else `?last_event_id=`.
fn resume_from(headers: &HeaderMap, q: &QueryMap) -> Result<Option<u64>, ApiError> {
    // Both are checked when both are given (a wrong one is a 400 even when the other would win); the header
    // wins. Present means an id: an empty value is as wrong as any other non-number (the document says integer).
    let header = match headers.get("last-event-id") {
        Some(v) => Some(event_id(v.to_str().map_err(|_| ApiError::validation("Last-Event-ID must be an event id"))?)?),
        None => None,
    };
    let query = q.get("last_event_id").map(event_id).transpose()?;
    Ok(header.or(query))
}

/// An event id: a SQLite integer, 0..=i64::MAX, as the OpenAPI document says.
fn event_id(v: &str) -> Result<u64, ApiError> {
    v.trim()
        .parse::<i64>()
        .ok()
        .and_then(|id| u64::try_from(id).ok())
        .ok_or_else(|| ApiError::validation(format!("Last-Event-ID: '{v}' is not an event id")))
}

/// One reader's place in the events: what it has been sent, what it still has to read from the backlog.
struct Cursor {
    service: Arc<Service>,
    live: broadcast::Receiver<Arc<Event>>,
    filter: EventFilter,
    /// The id of the last event passed (sent, or filtered out).
    last: u64,
    pending: VecDeque<Event>,
    /// Where the last backlog read stopped looking: `last` once `pending` is sent.
    scanned_to: u64,
    /// The backlog may hold more after `last` than `pending` has: read it before the live events.
    behind: bool,
    /// A backlog read failed: the stream ends (the client resumes with `Last-Event-ID`).
    failed: bool,
    /// `?follow=false`: end once the stored backlog has been sent.
    follow: bool,
}

impl Cursor {
    async fn next(&mut self) -> Option<Result<Event, String>> {
        if self.failed {
            return None;
        }
        loop {
            if let Some(e) = self.pending.pop_front() {
                self.last = e.id;
                return Some(Ok(e));
            }
            self.last = self.last.max(self.scanned_to);
            if self.behind {
                let page = match self.service.events_after(self.last, self.filter.clone()).await {
                    Ok(page) => page,
                    Err(e) => {
                        self.failed = true;
                        return Some(Err(e.to_string()));
                    }
                };
                (self.behind, self.scanned_to) = (page.more, page.scanned_to);
                self.pending.extend(page.events);
                continue;
            }
            if !self.follow {
                return None;
            }
            match self.live.recv().await {
                Ok(e) if e.id <= self.last => {}
                Ok(e) if self.filter.matches(&e) => {
                    self.last = e.id;
                    return Some(Ok((*e).clone()));
                }
                Ok(e) => self.last = e.id,
                // Too slow for the live channel: catch up from the backlog.
                Err(RecvError::Lagged(_)) => self.behind = true,
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

/// One Server-Sent Event of `GET /events` as a client parses it: `id`, `event` (the type), and `data`, the
/// [`Event`] as JSON (`contentMediaType` + `contentSchema`, so schema checkers validate the payload too).
pub(crate) struct SseEvent;

impl utoipa::PartialSchema for SseEvent {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::extensions::Extensions;
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        let text = || ObjectBuilder::new().schema_type(Type::String);
        let mut data = text().content_media_type("application/json").description(Some("the Event, as JSON")).build();
        // utoipa has no builder for `contentSchema` (JSON Schema 2020-12); its extensions serialize verbatim.
        data.extensions =
            Some(Extensions::from_iter([("contentSchema", serde_json::json!({"$ref": "#/components/schemas/Event"}))]));
        ObjectBuilder::new()
            .property("id", text().description(Some("the event's id, for Last-Event-ID")))
            .property("event", text().description(Some("the event's type")))
            .property("data", data)
            .required("data")
            .into()
    }
}
impl utoipa::ToSchema for SseEvent {}

#[utoipa::path(get, path = "/events", tag = "events",
    params(("machine" = Option<String>, Query, description = "only this machine's events (id or name)"),
           ("type" = Option<EventTypes>, Query, description = "only these event types, comma-separated"),
           ("last_event_id" = Option<u64>, Query, description = "resume after this event (the Last-Event-ID header wins)"),
           ("follow" = Option<super::machines::Flag>, Query, description = "false: send the stored events (after Last-Event-ID, else all) and end instead of following"),
           ("Last-Event-ID" = Option<u64>, Header, description = "resume after this event: the stored events since are sent first")),
    responses((status = 200, description = "a text/event-stream: each event's SSE id is its id, its SSE event its type, its data the Event as JSON", content_type = "text/event-stream", body = SseEvent),
              (status = 400, description = "VALIDATION_ERROR: an unknown type, or a Last-Event-ID that is not an event id", body = ErrorBody)),
    security(("bearer" = ["machines:read"])))]
pub(crate) async fn stream(State(s): State<AppState>, headers: HeaderMap, q: QueryMap) -> Result<Response, ApiError> {
    let filter = filter(&q)?;
    let resume = resume_from(&headers, &q)?;
    let follow = q.get("follow").is_none() || q.bool("follow")?;
    // Subscribed before reading where the backlog ends, so nothing falls between the two.
    let live = s.service.subscribe();
    let (last, behind) = match resume {
        Some(after) => (after, true),
        None if !follow => (0, true),
        None => (s.service.last_event_id().await?, false),
    };
    let cursor = Cursor {
        service: s.service.clone(),
        live,
        filter,
        last,
        pending: VecDeque::new(),
        scanned_to: 0,
        behind,
        failed: false,
        follow,
    };
    let events = futures::stream::unfold(cursor, |mut c| async move {
        let sse = match c.next().await? {
            Ok(e) => sse::Event::default()
                .id(e.id.to_string())
                .event(e.kind.as_str())
                .data(serde_json::to_string(&e).unwrap_or_default()),
            Err(message) => {
                tracing::warn!(error = %message, "events: could not read the backlog");
                sse::Event::default().event("error").data(message)
            }
        };
        Some((Ok::<_, Infallible>(sse), c))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}

#[utoipa::path(get, path = "/metrics", tag = "events",
    responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String),
        (status = 404, description = "NOT_FOUND: metrics are off (`HYPERFLEET_METRICS=false`)", body = ErrorBody)),
    security(("bearer" = ["metrics:read"])))]
pub(crate) async fn metrics(State(s): State<AppState>) -> Result<Response, ApiError> {
    if !s.service.metrics().enabled() {
        return Err(ApiError::not_found("metrics are off (HYPERFLEET_METRICS=false)"));
    }
    let mut snap = s.service.metrics_snapshot().await?;
    snap.api = s.listeners.api();
    snap.proxy = s.listeners.proxy();
    let text = s.service.metrics().render(&snap).map_err(|e| ApiError::internal(format!("metrics: {e}")))?;
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}
