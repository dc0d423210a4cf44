//! `GET /v1/events`: run and stage state changes of the caller's projects, in commit order
//! across every node — a page of JSON, or a server-sent event stream (`follow=1` or
//! `Accept: text/event-stream`) resumable with `Last-Event-ID`.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use pond_core::events::{type_matches, valid_type_pattern, Event};
use pond_core::store::Store;
use serde::{Deserialize, Serialize};

use crate::auth::Principal;
use crate::boundary::parse_query;
use crate::error::ApiError;
use crate::state::AppState;

/// The routes (under `/v1`).
pub fn routes() -> utoipa_axum::router::OpenApiRouter<AppState> {
    utoipa_axum::router::OpenApiRouter::new().routes(utoipa_axum::routes!(events))
}

/// One server-sent event of `GET /v1/events` followed.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Documents the stream's events; the stream writes them with axum's `Event`.
pub struct EventStreamEvent {
    /// `ready` first (the stream starts after `id`), then the event's type (`run.succeeded`, …),
    /// or `error` (the stream ends: the token was revoked).
    event: String,
    /// The position: `Last-Event-ID` resumes after it.
    id: Option<String>,
    /// JSON: an `Event` (`{"after": n}` for `ready`); text for `error`.
    data: String,
}

/// A page of events.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventPage {
    /// Events after the cursor, oldest first.
    pub events: Vec<Event>,
    /// Where the next page starts (`after`): the last event read, matching or not.
    pub next_cursor: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventQuery {
    project: Option<String>,
    /// Comma-separated event types or `run.*`, `stage.*`, `*`.
    types: Option<String>,
    after: Option<String>,
    limit: Option<String>,
    follow: Option<String>,
}

/// What a caller asked to see.
struct Selection {
    projects: Option<Vec<String>>,
    types: Vec<String>,
}

impl Selection {
    fn wants(&self, event: &Event) -> bool {
        self.types.is_empty() || self.types.iter().any(|t| type_matches(t, &event.event.kind))
    }
}

/// Reads a comma-separated list of event type patterns, naming the first that is not one.
pub(crate) fn parse_types(field: &str, text: Option<&str>) -> Result<Vec<String>, ApiError> {
    let mut types = Vec::new();
    for t in text.unwrap_or("").split(',').map(str::trim).filter(|t| !t.is_empty()) {
        if !valid_type_pattern(t) {
            return Err(ApiError::invalid(
                field,
                format!(
                    "`{t}` is not an event type; use one of {} or run.*, stage.*, *",
                    pond_core::events::EVENT_TYPES.join(", ")
                ),
            ));
        }
        types.push(t.to_string());
    }
    Ok(types)
}

#[utoipa::path(get, path = "/events", summary = "Read or follow run and stage state changes", tag = "events",
    security(("bearer" = [])),
    description = "Run and stage state changes of the caller's projects (`run.queued` … `stage.cancelled`), \
        numbered in the order they became visible across every node. Without `follow`: a page of events after \
        `after` as JSON. With `follow` (or `Accept: text/event-stream`): server-sent events — `ready` (id: where \
        the stream starts), then one per event named by its type (data: an `Event`, id: its `seq`); resume with \
        `Last-Event-ID`. A stream with no cursor starts at the newest event. Events carry states and names only, \
        never output.",
    params(
        ("project" = Option<String>, Query, description = "Only this project (default: every project the token may use; another project answers 404)."),
        ("types" = Option<String>, Query, description = "Comma-separated event types or `run.*`, `stage.*`, `*` (default: all)."),
        ("after" = Option<i64>, Query, description = "Events after this position (a page: default 0; a stream: default the newest)."),
        ("limit" = Option<i64>, Query, minimum = 0, maximum = 4294967295_i64, description = "Page size (default 500; cut to the server's page limit)."),
        ("follow" = Option<String>, Query, pattern = "^(1|true|yes|0|false|no)?$",
            description = "`1`, `true`, `yes` or empty: stream server-sent events; `0`, `false`, `no`: a page."),
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this position (takes precedence over `after`)."),
    ),
    responses(
        (status = 200, description = "A page of events, or (with `follow`) the stream of them.",
            content(
                (EventPage = "application/json"),
                (EventStreamEvent = "text/event-stream"),
            )),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 422, response = crate::openapi::Invalid),
        (status = 429, response = crate::openapi::TooManyRequests),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn events(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    let q: EventQuery = parse_query(uri.query())?;
    let projects = match q.project.as_deref() {
        // Another tenant's project answers like one that does not exist.
        Some(p) if !who.can_use(p) => return Err(ApiError::NotFound(format!("project {p} not found"))),
        Some(p) => Some(vec![p.to_string()]),
        None => who.visible_projects(),
    };
    let selection = Selection { projects, types: parse_types("query.types", q.types.as_deref())? };
    let resume = match headers.get("last-event-id") {
        Some(v) => {
            Some(v.to_str().ok().and_then(|v| v.trim().parse::<i64>().ok()).filter(|n| *n >= 0).ok_or_else(|| {
                ApiError::invalid("header.last-event-id", "must be an event position (a whole number)")
            })?)
        }
        None => None,
    };
    let after = resume.or(crate::api::number::<i64>("after", q.after.as_deref())?.map(|n| n.max(0)));
    let limit = crate::api::number::<u32>("limit", q.limit.as_deref())?.unwrap_or(500).clamp(1, state.limits.max_page);
    let streamed = match q.follow.as_deref() {
        Some("1" | "true" | "yes" | "") => true,
        Some("0" | "false" | "no") => false,
        Some(other) => return Err(ApiError::invalid("query.follow", format!("`{other}` is not true or false"))),
        None => {
            headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("text/event-stream"))
        }
    };
    if streamed {
        let slot = StreamSlot::take(&who.secret_sha256).ok_or_else(|| ApiError::Status {
            status: axum::http::StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "this key already holds {MAX_STREAMS_PER_KEY} event streams on this node; close one, or read pages"
            ),
        })?;
        // A stream without a cursor starts at what happens next.
        let after = match after {
            Some(a) => a,
            None => state.store.last_event_seq().await?,
        };
        return Ok(follow(state, selection, after, who.secret_sha256, slot).into_response());
    }
    let after = after.unwrap_or(0);
    let read = state.store.read_events(after, selection.projects.as_deref(), limit).await?;
    let next_cursor = read.last().map(|e| e.seq).unwrap_or(after);
    let events = read.into_iter().filter(|e| selection.wants(e)).collect();
    Ok(Json(EventPage { events, next_cursor }).into_response())
}

/// Open event streams one key may hold at once on a node: each wakes on every change and reads
/// the store, so a key opening thousands would multiply that load.
pub const MAX_STREAMS_PER_KEY: usize = 16;

/// Open streams by key (SHA-256 of the token).
static OPEN_STREAMS: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<String, usize>>> =
    std::sync::LazyLock::new(Default::default);

/// One of a key's stream slots, given back when the stream ends (dropped with it).
struct StreamSlot(String);

impl StreamSlot {
    fn take(key: &str) -> Option<StreamSlot> {
        let mut open = OPEN_STREAMS.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(key.to_string()).or_default();
        if *count >= MAX_STREAMS_PER_KEY {
            return None;
        }
        *count += 1;
        Some(StreamSlot(key.to_string()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = OPEN_STREAMS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.0) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.0);
            }
        }
    }
}

/// How often an open stream re-checks its token (a revoked key's streams end within seconds).
const TOKEN_RECHECK: Duration = Duration::from_secs(1);

struct Stream {
    state: AppState,
    selection: Selection,
    cursor: i64,
    pending: std::collections::VecDeque<SseEvent>,
    done: bool,
    changes: tokio::sync::watch::Receiver<u64>,
    token: String,
    checked: std::time::Instant,
    _slot: StreamSlot,
}

fn sse_event(event: &Event) -> SseEvent {
    let data = serde_json::to_string(event).unwrap_or_else(|_| "{}".into());
    SseEvent::default().event(event.event.kind.clone()).id(event.seq.to_string()).data(data)
}

/// Server-sent events: first `ready` (id = the position the stream starts after), then events
/// named by their type (`run.succeeded`, …), id = position, until the client leaves. Wakes on store changes (this node's, and other nodes' through the store's
/// notifications), with a 1 s fallback poll.
fn follow(
    state: AppState,
    selection: Selection,
    after: i64,
    token: String,
    slot: StreamSlot,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let changes = state.store.runs_changed();
    // The first event names where the stream starts, so a client that started "from now" and
    // lost the connection before any event can resume from there (`Last-Event-ID`).
    let ready = SseEvent::default().event("ready").id(after.to_string()).data(format!("{{\"after\":{after}}}"));
    let start = Stream {
        state,
        selection,
        cursor: after,
        pending: std::collections::VecDeque::from([ready]),
        done: false,
        changes,
        token,
        checked: std::time::Instant::now(),
        _slot: slot,
    };
    let stream = futures_util::stream::unfold(start, |mut s| async move {
        loop {
            if !s.done && s.checked.elapsed() >= TOKEN_RECHECK {
                s.checked = std::time::Instant::now();
                match crate::auth::still_valid(&s.state, &s.token).await {
                    Ok(true) => {}
                    Ok(false) => {
                        s.done = true;
                        s.pending.clear();
                        return Some((Ok(SseEvent::default().event("error").data("the token was revoked")), s));
                    }
                    Err(e) => tracing::warn!(error = %e, "events: re-checking the token failed"),
                }
            }
            if let Some(event) = s.pending.pop_front() {
                return Some((Ok(event), s));
            }
            if s.done {
                return None;
            }
            s.changes.borrow_and_update();
            match s.state.store.read_events(s.cursor, s.selection.projects.as_deref(), 500).await {
                Ok(read) if !read.is_empty() => {
                    s.cursor = read.last().map(|e| e.seq).unwrap_or(s.cursor);
                    let wanted = read.iter().filter(|e| s.selection.wants(e)).map(sse_event);
                    s.pending.extend(wanted);
                    continue;
                }
                Ok(_) => {}
                // The database is away: keep the stream and look again (the cursor holds).
                Err(e) => tracing::warn!(error = %e, "events: reading failed"),
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), s.changes.changed()).await;
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
