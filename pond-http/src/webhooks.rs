//! Webhooks: per-project subscriptions (`/v1/webhooks`) and the sender that delivers every
//! event to them, at least once, in order, from whichever node holds the subscription.
//!
//! The outbox is the event table itself (written with each state change, see
//! [`pond_core::events`]); each subscription keeps a cursor record. A node delivers a
//! subscription only while it holds the cursor's lease (a compare-and-swap on the record), so
//! one node sends each event in the normal course; a node that dies mid-send leaves the lease
//! to lapse and another sends the event again with the same `webhook-id`. A failed event is
//! retried on [`pond_core::webhooks::RETRY_SCHEDULE`] (about 27 h) before it is given up and
//! logged as such; the events behind it wait, so a receiver that was down gets them all, in
//! order, once it is back.
//!
//! The sender dials only addresses the egress policy allows: a name resolving to an internal
//! address (loopback, private, link-local, metadata…) is refused unless the operator allowed
//! that address (`pond server --webhook-allow-ip`).

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use pond_core::events::Event;
use pond_core::store::Store;
use pond_core::time::Timestamp;
use pond_core::webhooks::{
    payload, retry_delay, secret_text, signature, webhook_id, Cursor, Delivery, StoredSecret, Subscription,
    CURSOR_RECORD, LOG_KEEP, LOG_RECORD, REDELIVER_RECORD, SUBSCRIPTION_RECORD,
};
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Principal;
use crate::boundary::ApiPath as Path;
use crate::error::ApiError;
use crate::state::AppState;

/// How long a node holds a subscription without renewing.
const LEASE: Duration = Duration::from_secs(30);
/// How long one delivery may take, connection included.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long resolving a receiver's name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Receiver answers kept in the log (bytes of its body are not kept).
const MAX_URL_BYTES: usize = 2048;
/// Subscriptions per project.
const MAX_PER_PROJECT: usize = 50;

/// What the webhook routes and the sender need.
#[derive(Clone)]
pub struct WebhookConfig {
    /// The server keys: secrets are kept sealed under the current one.
    pub keys: pond_core::server_keys::AtRestKeys,
    /// Internal addresses the operator allowed as receivers.
    pub allow_ips: Vec<IpAddr>,
}

/// The routes (under `/v1`).
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(show, remove))
        .routes(routes!(rotate_secret))
        .routes(routes!(deliveries))
        .routes(routes!(redeliver))
}

/// A subscription as shown (never its secrets).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookView {
    /// Its id.
    pub id: String,
    /// Whose events.
    pub project_id: String,
    /// Where they go.
    pub url: String,
    /// Event type patterns (empty: all).
    pub types: Vec<String>,
    /// A label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// When it was made.
    pub created_at: Timestamp,
    /// Live secrets: when each was made and, for a retired one, until when it still signs.
    pub secrets: Vec<SecretView>,
    /// Every event up to this position was delivered or given up.
    pub delivered_through: i64,
    /// Failed attempts at the next event.
    pub failures: u32,
    /// When the next attempt is due, after a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<Timestamp>,
    /// The signing secret (`whsec_…`): in the answer that made it only, never again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// A secret's dates.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SecretView {
    /// When it was made.
    pub created_at: Timestamp,
    /// When it stops signing (a rotated-out secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
}

/// `POST /v1/webhooks`.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    /// Whose events (a project the caller may use).
    #[schema(example = "acme", pattern = "^[A-Za-z0-9._:-]{1,128}$")]
    pub project_id: String,
    /// The receiver: an `https://` (or `http://`) URL.
    #[schema(example = "https://hooks.example.com/pond", max_length = 2048)]
    pub url: String,
    /// Event types or `run.*`, `stage.*`, `*` (absent or empty: all).
    #[serde(default)]
    pub types: Vec<String>,
    /// A label.
    #[serde(default)]
    pub description: Option<String>,
}

/// `POST /v1/webhooks/{id}/rotate-secret`.
#[derive(Debug, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateSecret {
    /// Seconds the old secret keeps signing beside the new one (default a day, at most 7 days).
    #[serde(default)]
    pub overlap_seconds: Option<u64>,
}

/// `POST /v1/webhooks/{id}/redeliver`.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Redeliver {
    /// The event's position (its `webhook-id` is `evt_<position>`).
    pub event: i64,
}

/// `GET /v1/webhooks`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookList {
    /// The caller's subscriptions.
    pub webhooks: Vec<WebhookView>,
}

/// `GET /v1/webhooks/{id}/deliveries`: newest first.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryLog {
    /// The last deliveries (at most 100).
    pub deliveries: Vec<Delivery>,
}

fn now(state: &AppState) -> Timestamp {
    state.engine.clock().now()
}

async fn load(state: &AppState, who: &Principal, id: &str) -> Result<(Subscription, String), ApiError> {
    let missing = || ApiError::NotFound(format!("webhook {id} not found"));
    // A removed subscription is an empty record.
    let body = state.store.get_record(SUBSCRIPTION_RECORD, id).await?.filter(|b| !b.is_empty()).ok_or_else(missing)?;
    let sub: Subscription =
        serde_json::from_str(&body).map_err(|e| ApiError::Internal(format!("webhook {id}: {e}")))?;
    // Another tenant's subscription answers like a missing one.
    if !who.can_use(&sub.project_id) {
        return Err(missing());
    }
    Ok((sub, body))
}

async fn cursor_of(store: &dyn Store, id: &str) -> Result<(Cursor, Option<String>), ApiError> {
    let body = store.get_record(CURSOR_RECORD, id).await?;
    let cursor = match &body {
        Some(b) => serde_json::from_str(b).map_err(|e| ApiError::Internal(format!("webhook cursor {id}: {e}")))?,
        None => Cursor::default(),
    };
    Ok((cursor, body))
}

fn view(sub: &Subscription, cursor: &Cursor, now: Timestamp) -> WebhookView {
    WebhookView {
        id: sub.id.clone(),
        project_id: sub.project_id.clone(),
        url: sub.url.clone(),
        types: sub.types.clone(),
        description: sub.description.clone(),
        created_at: sub.created_at,
        secrets: sub
            .secrets
            .iter()
            .filter(|s| s.expires_at.is_none_or(|t| t > now))
            .map(|s| SecretView { created_at: s.created_at, expires_at: s.expires_at })
            .collect(),
        delivered_through: cursor.after,
        failures: cursor.failures,
        retry_at: cursor.retry_at,
        secret: None,
    }
}

/// Checks a receiver URL: http(s), a host, no credentials, and — when the host is an address —
/// one the policy allows. (A name is checked at each delivery, against what it resolves to.)
fn check_url(url: &str, allow: &[IpAddr]) -> Result<(), ApiError> {
    let bad = |why: &str| ApiError::invalid("url", why.to_string());
    if url.len() > MAX_URL_BYTES {
        return Err(bad("is longer than 2048 bytes"));
    }
    let parsed = url::Url::parse(url).map_err(|e| bad(&format!("is not a URL ({e})")))?;
    if !matches!(parsed.scheme(), "https" | "http") {
        return Err(bad("must be an https:// or http:// URL"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad("must not carry a user name or password (sign with the webhook secret instead)"));
    }
    match parsed.host() {
        None => return Err(bad("has no host")),
        Some(url::Host::Ipv4(ip)) => refuse_internal(IpAddr::V4(ip), allow).map_err(|e| bad(&e))?,
        Some(url::Host::Ipv6(ip)) => refuse_internal(IpAddr::V6(ip), allow).map_err(|e| bad(&e))?,
        Some(url::Host::Domain(_)) => {}
    }
    Ok(())
}

fn refuse_internal(ip: IpAddr, allow: &[IpAddr]) -> Result<(), String> {
    match pond_core::net::special_purpose(ip) {
        Some(range) if !allow.contains(&ip) => Err(format!(
            "{ip} is an internal address ({range}); the server refuses to send webhooks there unless its operator allows it (--webhook-allow-ip)"
        )),
        _ => Ok(()),
    }
}

/// A new secret for subscription `id`: sealed together with the id, so a sealed secret moved to
/// another subscription's record (by someone writing the database) opens to nothing there.
fn new_secret(keys: &pond_core::server_keys::AtRestKeys, id: &str, now: Timestamp) -> (String, StoredSecret) {
    let bytes: [u8; 32] = rand::random();
    let mut bound = bound_prefix(id);
    bound.extend_from_slice(&bytes);
    let sealed = B64.encode(keys.seal(&bound));
    (secret_text(&bytes), StoredSecret { sealed, created_at: now, expires_at: None })
}

/// What a sealed secret starts with: its subscription's id and a NUL.
fn bound_prefix(id: &str) -> Vec<u8> {
    let mut prefix = id.as_bytes().to_vec();
    prefix.push(0);
    prefix
}

#[utoipa::path(post, path = "/webhooks", operation_id = "create_webhook", summary = "Subscribe a URL to a project's events", tag = "webhooks",
    security(("bearer" = [])),
    description = "Events of the project (all, or those `types` select) are POSTed to `url` as Standard Webhooks \
        deliveries (`webhook-id`, `webhook-timestamp`, `webhook-signature`), in order, at least once, retried for \
        about 27 h. The answer carries the signing secret (`whsec_…`) once. A URL whose host is an internal address \
        is refused unless the server allows it (`--webhook-allow-ip`); a name is checked at each delivery.",
    request_body(content = CreateWebhook, content_type = "application/json"),
    responses(
        (status = 201, description = "The webhook, with its signing secret (shown once).", body = WebhookView,
            links(
                ("get" = (operation_id = "show_webhook", parameters(("id" = "$response.body#/id")), description = "The webhook.")),
                ("deliveries" = (operation_id = "webhook_deliveries", parameters(("id" = "$response.body#/id")), description = "Its delivery log.")),
                ("rotate" = (operation_id = "rotate_webhook_secret", parameters(("id" = "$response.body#/id")), description = "A new secret.")),
                ("remove" = (operation_id = "remove_webhook", parameters(("id" = "$response.body#/id")), description = "Remove it.")),
            )),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 409, response = crate::openapi::Conflict),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn create(
    State(state): State<AppState>,
    who: Principal,
    crate::boundary::ApiJson(body): crate::boundary::ApiJson<CreateWebhook>,
) -> Result<Response, ApiError> {
    if !who.can_use(&body.project_id) {
        return Err(ApiError::NotFound(format!("project {} not found", body.project_id)));
    }
    let project_ok = !body.project_id.is_empty()
        && body.project_id.len() <= 128
        && body.project_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if !project_ok {
        return Err(ApiError::invalid("project_id", "must be 1 to 128 letters, digits, `-`, `_`, `.` or `:`"));
    }
    check_url(&body.url, &state.webhooks.allow_ips)?;
    if body.types.len() > 32 {
        return Err(ApiError::invalid("types", "lists more than 32 patterns (use `run.*`, `stage.*` or `*`)"));
    }
    let mut types = Vec::new();
    for (i, t) in body.types.iter().enumerate() {
        if t.contains(',') {
            return Err(ApiError::invalid(format!("types[{i}]"), "is one type per entry"));
        }
        match crate::events_api::parse_types(&format!("types[{i}]"), Some(t))?.pop() {
            Some(t) if !types.contains(&t) => types.push(t),
            Some(_) => {}
            None => return Err(ApiError::invalid(format!("types[{i}]"), "is empty")),
        }
    }
    if body.description.as_ref().is_some_and(|d| d.len() > 512) {
        return Err(ApiError::invalid("description", "is longer than 512 bytes"));
    }
    let existing = subscriptions(&*state.store).await?;
    if existing.iter().filter(|s| s.project_id == body.project_id).count() >= MAX_PER_PROJECT {
        return Err(ApiError::Conflict(format!(
            "project {} already has {MAX_PER_PROJECT} webhooks; remove one first",
            body.project_id
        )));
    }
    let now = now(&state);
    let id = format!("wh_{}", uuid::Uuid::now_v7().simple());
    let (secret, stored) = new_secret(&state.webhooks.keys, &id, now);
    let sub = Subscription {
        id: id.clone(),
        project_id: body.project_id,
        url: body.url,
        types,
        description: body.description,
        secrets: vec![stored],
        created_at: now,
    };
    // A new subscription gets what happens from now on.
    let cursor = Cursor { after: state.store.last_event_seq().await?, ..Cursor::default() };
    let cursor_body = serde_json::to_string(&cursor).map_err(|e| ApiError::Internal(e.to_string()))?;
    state.store.put_record(CURSOR_RECORD, &id, &cursor_body).await?;
    let body = serde_json::to_string(&sub).map_err(|e| ApiError::Internal(e.to_string()))?;
    state.store.put_record(SUBSCRIPTION_RECORD, &id, &body).await?;
    let mut shown = view(&sub, &cursor, now);
    shown.secret = Some(secret);
    Ok((StatusCode::CREATED, Json(shown)).into_response())
}

async fn subscriptions(store: &dyn Store) -> Result<Vec<Subscription>, pond_core::StoreError> {
    let mut out = Vec::new();
    for (key, body) in store.list_records(SUBSCRIPTION_RECORD).await? {
        if body.is_empty() {
            continue;
        }
        match serde_json::from_str::<Subscription>(&body) {
            Ok(sub) => out.push(sub),
            Err(e) => tracing::warn!(webhook = %key, error = %e, "skipping an unreadable webhook record"),
        }
    }
    Ok(out)
}

#[utoipa::path(get, path = "/webhooks", operation_id = "list_webhooks", summary = "List webhooks", tag = "webhooks",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The webhooks of the projects this token may use (never a secret).", body = WebhookList),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn list(State(state): State<AppState>, who: Principal) -> Result<Json<WebhookList>, ApiError> {
    let now = now(&state);
    let mut webhooks = Vec::new();
    for sub in subscriptions(&*state.store).await?.into_iter().filter(|s| who.can_use(&s.project_id)) {
        let (cursor, _) = cursor_of(&*state.store, &sub.id).await?;
        webhooks.push(view(&sub, &cursor, now));
    }
    Ok(Json(WebhookList { webhooks }))
}

#[utoipa::path(get, path = "/webhooks/{id}", operation_id = "show_webhook", summary = "A webhook and where its delivery stands", tag = "webhooks",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The webhook's id (`wh_…`).")),
    responses(
        (status = 200, description = "The webhook (never a secret).", body = WebhookView),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn show(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<WebhookView>, ApiError> {
    let (sub, _) = load(&state, &who, &id).await?;
    let (cursor, _) = cursor_of(&*state.store, &id).await?;
    Ok(Json(view(&sub, &cursor, now(&state))))
}

#[utoipa::path(delete, path = "/webhooks/{id}", operation_id = "remove_webhook", summary = "Remove a webhook", tag = "webhooks",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The webhook's id.")),
    responses(
        (status = 204, description = "Removed: nothing more is sent to it (a delivery in progress stops at its next step)."),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 409, response = crate::openapi::Conflict),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn remove(State(state): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let (_, body) = load(&state, &who, &id).await?;
    // Emptied first (a drain in progress stops at its next write), then removed with its cursor,
    // log and redelivery queue.
    if !state.store.swap_record(SUBSCRIPTION_RECORD, &id, Some(&body), "").await? {
        return Err(ApiError::Conflict(format!("webhook {id} changed meanwhile; try again")));
    }
    for kind in [CURSOR_RECORD, LOG_RECORD, REDELIVER_RECORD, SUBSCRIPTION_RECORD] {
        state.store.delete_record(kind, &id).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/webhooks/{id}/rotate-secret", operation_id = "rotate_webhook_secret", summary = "Make a new signing secret", tag = "webhooks",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The webhook's id.")),
    request_body(content = Option<RotateSecret>, content_type = "application/json",
        description = "Optional: how long the old secret keeps signing beside the new one (default a day)."),
    responses(
        (status = 200, description = "The webhook with its new secret (shown once); deliveries carry a signature per live secret.", body = WebhookView),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 409, response = crate::openapi::Conflict),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn rotate_secret(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    body: Option<crate::boundary::ApiJson<RotateSecret>>,
) -> Result<Json<WebhookView>, ApiError> {
    let overlap = body.and_then(|b| b.0.overlap_seconds).unwrap_or(24 * 3600);
    if overlap > 7 * 24 * 3600 {
        return Err(ApiError::invalid("overlap_seconds", "must be at most 604800 (7 days)"));
    }
    let (mut sub, old_body) = load(&state, &who, &id).await?;
    let now = now(&state);
    let until = now.plus(pond_core::time::Millis(overlap * 1000));
    // The current secret signs on until the overlap ends; older retired ones keep their end.
    sub.secrets.retain(|s| s.expires_at.is_none_or(|t| t > now));
    for s in sub.secrets.iter_mut().filter(|s| s.expires_at.is_none()) {
        s.expires_at = Some(until);
    }
    let (secret, stored) = new_secret(&state.webhooks.keys, &id, now);
    sub.secrets.push(stored);
    let body = serde_json::to_string(&sub).map_err(|e| ApiError::Internal(e.to_string()))?;
    if !state.store.swap_record(SUBSCRIPTION_RECORD, &id, Some(&old_body), &body).await? {
        return Err(ApiError::Conflict(format!("webhook {id} changed meanwhile; try again")));
    }
    let (cursor, _) = cursor_of(&*state.store, &id).await?;
    let mut shown = view(&sub, &cursor, now);
    shown.secret = Some(secret);
    Ok(Json(shown))
}

#[utoipa::path(get, path = "/webhooks/{id}/deliveries", operation_id = "webhook_deliveries", summary = "A webhook's delivery log", tag = "webhooks",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The webhook's id.")),
    responses(
        (status = 200, description = "The last 100 deliveries, newest first.", body = DeliveryLog),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn deliveries(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<DeliveryLog>, ApiError> {
    load(&state, &who, &id).await?;
    let mut deliveries: Vec<Delivery> = match state.store.get_record(LOG_RECORD, &id).await? {
        Some(body) => serde_json::from_str(&body).map_err(|e| ApiError::Internal(format!("webhook log {id}: {e}")))?,
        None => Vec::new(),
    };
    deliveries.reverse();
    Ok(Json(DeliveryLog { deliveries }))
}

#[utoipa::path(post, path = "/webhooks/{id}/redeliver", operation_id = "redeliver_webhook", summary = "Send one event again", tag = "webhooks",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The webhook's id.")),
    request_body(content = Redeliver, content_type = "application/json"),
    responses(
        (status = 202, description = "Queued: the node delivering the webhook sends it next, with the same `webhook-id`."),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 409, response = crate::openapi::Conflict),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn redeliver(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    crate::boundary::ApiJson(body): crate::boundary::ApiJson<Redeliver>,
) -> Result<StatusCode, ApiError> {
    let (sub, _) = load(&state, &who, &id).await?;
    if body.event < 1 {
        return Err(ApiError::invalid("event", "must be an event position (1 or more)"));
    }
    let event = state
        .store
        .read_events(body.event - 1, Some(std::slice::from_ref(&sub.project_id)), 1)
        .await?
        .into_iter()
        .find(|e| e.seq == body.event)
        .ok_or_else(|| ApiError::invalid("event", format!("no event {} of project {}", body.event, sub.project_id)))?;
    if !sub.wants(&event) {
        return Err(ApiError::invalid(
            "event",
            format!("event {} ({}) is not one this webhook takes", event.seq, event.event.kind),
        ));
    }
    // Queued beside the cursor; the node holding the subscription sends it next.
    for _ in 0..20 {
        let old = state.store.get_record(REDELIVER_RECORD, &id).await?;
        let mut queue: Vec<i64> = old.as_deref().and_then(|b| serde_json::from_str(b).ok()).unwrap_or_default();
        if queue.len() >= 100 {
            return Err(ApiError::Conflict("100 redeliveries are already queued for this webhook".into()));
        }
        if !queue.contains(&event.seq) {
            queue.push(event.seq);
        }
        let new = serde_json::to_string(&queue).map_err(|e| ApiError::Internal(e.to_string()))?;
        if state.store.swap_record(REDELIVER_RECORD, &id, old.as_deref(), &new).await? {
            return Ok(StatusCode::ACCEPTED);
        }
    }
    Err(ApiError::Unavailable("the webhook's redelivery queue is busy; try again".into()))
}

/// The first event some webhook has yet to deliver (`i64::MAX` when none waits): retention
/// keeps it and everything after it.
pub async fn first_undelivered(store: &dyn Store) -> Result<i64, pond_core::StoreError> {
    let mut first = i64::MAX;
    for sub in subscriptions(store).await? {
        if let Some(body) = store.get_record(CURSOR_RECORD, &sub.id).await? {
            if let Ok(cursor) = serde_json::from_str::<Cursor>(&body) {
                first = first.min(cursor.after.saturating_add(1));
            }
        }
    }
    Ok(first)
}

// ---------------------------------------------------------------------------------------------
// The sender.

/// Runs until `stop`: delivers every subscription this node can hold, waking on state changes
/// (this node's and other nodes') and at least once a second.
///
/// `node` names this node in the cursors' leases: a node restarted under the same id (its
/// `--node-id`) takes its subscriptions back at once. `exclusive`: this process owns the store
/// alone (SQLite), so any lease in it is a dead process's.
pub async fn dispatch(state: AppState, mut stop: tokio::sync::watch::Receiver<bool>, node: String, exclusive: bool) {
    let busy: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
    let mut changes = state.store.runs_changed();
    loop {
        if *stop.borrow() {
            return;
        }
        changes.borrow_and_update();
        match subscriptions(&*state.store).await {
            Ok(subs) => {
                for sub in subs {
                    if !busy.lock().unwrap_or_else(|p| p.into_inner()).insert(sub.id.clone()) {
                        continue;
                    }
                    let (state, node) = (state.clone(), node.clone());
                    // Freed however the drain ends (a panic included), so the subscription is
                    // looked at again on the next tick.
                    let guard = Busy { set: busy.clone(), id: sub.id.clone() };
                    tokio::spawn(async move {
                        let _guard = guard;
                        let id = sub.id.clone();
                        if let Err(e) = drain(&state, &node, exclusive, sub).await {
                            tracing::warn!(webhook = %id, error = %e, "webhook delivery stopped; will retry");
                        }
                    });
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing webhooks failed"),
        }
        // At most ten looks a second however busy the store is.
        tokio::time::sleep(Duration::from_millis(100)).await;
        tokio::select! {
            _ = stop.changed() => {}
            _ = changes.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// A subscription being drained on this node; dropping it frees the subscription.
struct Busy {
    set: Arc<Mutex<std::collections::HashSet<String>>>,
    id: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

/// How often a draining node writes its progress (cursor, lease, log) while it sends.
const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// ... or after this many deliveries.
const FLUSH_AFTER: usize = 50;

/// A subscription held by this node while it drains: its cursor as last written, and the
/// deliveries not yet logged.
struct Holding<'a> {
    store: &'a dyn Store,
    id: String,
    node: String,
    /// The subscription's record as this drain read it: a removal or a change (a rotated
    /// secret, a new URL) stops the drain at its next write.
    subscription: String,
    written: String,
    cursor: Cursor,
    log: Vec<Delivery>,
    flushed: Instant,
}

impl Holding<'_> {
    /// Writes the cursor (renewing the lease) and the log entries; false when another node
    /// took the subscription meanwhile (its lease lapsed), which then resends from its cursor.
    async fn flush(&mut self, now: Timestamp) -> Result<bool, pond_core::StoreError> {
        let current = self.store.get_record(SUBSCRIPTION_RECORD, &self.id).await?;
        let unchanged = current.as_deref() == Some(self.subscription.as_str());
        self.cursor.holder = Some(self.node.clone());
        self.cursor.lease_until = Some(now.plus(millis(LEASE)));
        let body = serde_json::to_string(&self.cursor).map_err(|e| pond_core::StoreError::Corrupt(e.to_string()))?;
        if !self.store.swap_record(CURSOR_RECORD, &self.id, Some(&self.written), &body).await? {
            return Ok(false);
        }
        self.written = body;
        self.flushed = Instant::now();
        let entries = std::mem::take(&mut self.log);
        log_deliveries(self.store, &self.id, entries).await?;
        Ok(unchanged)
    }
}

/// Delivers a subscription's pending events while this node holds it, until none are left,
/// one fails, or the lease is lost. Progress is written every [`FLUSH_EVERY`] or
/// [`FLUSH_AFTER`] deliveries: a node that dies sends at most that many events twice (same
/// `webhook-id`), never fewer than once.
async fn drain(state: &AppState, node: &str, exclusive: bool, sub: Subscription) -> Result<(), pond_core::StoreError> {
    let store: &dyn Store = &*state.store;
    let now = now(state);
    let Some(body) = store.get_record(CURSOR_RECORD, &sub.id).await? else { return Ok(()) };
    let Ok(cursor) = serde_json::from_str::<Cursor>(&body) else { return Ok(()) };
    if !exclusive && !cursor.free_for(node, now) {
        return Ok(());
    }
    // The subscription may have been removed or changed (a rotation) since it was listed.
    let Some(current) = store.get_record(SUBSCRIPTION_RECORD, &sub.id).await? else { return Ok(()) };
    let sub = match serde_json::from_str::<Subscription>(&current) {
        Ok(sub) => sub,
        Err(e) => {
            tracing::warn!(webhook = %sub.id, error = %e, "skipping an unreadable webhook record");
            return Ok(());
        }
    };
    if live_secrets(state, &sub, now).is_empty() {
        // A configuration fault of this node (another server key), not the receiver's: no
        // attempt is spent on it; another node with the right key delivers.
        tracing::warn!(webhook = %sub.id, "no secret of this webhook opens under this server's key; not sending");
        return Ok(());
    }
    let mut held = Holding {
        store,
        id: sub.id.clone(),
        node: node.to_string(),
        subscription: current,
        written: body,
        cursor,
        log: Vec::new(),
        flushed: Instant::now(),
    };
    let agent = sender(&state.webhooks.allow_ips);

    // Redeliveries asked for: each sent once, whatever the stream's state.
    let asked = redeliveries(store, &sub.id).await?;
    if !asked.is_empty() {
        if !held.flush(now).await? {
            return Ok(());
        }
        for seq in &asked {
            let now = state.engine.clock().now();
            if held.cursor.lease_until.is_none_or(|t| t <= now.plus(millis(LEASE / 2))) && !held.flush(now).await? {
                return Ok(());
            }
            let found = store.read_events(seq - 1, Some(std::slice::from_ref(&sub.project_id)), 1).await?.pop();
            if let Some(event) = found.filter(|e| e.seq == *seq) {
                let sent = send(state, &agent, &sub, &event).await;
                let mut entry = delivery(&event, 1, now, sent);
                if entry.status.is_none_or(|s| !(200..300).contains(&s)) {
                    entry.outcome = "failed".into();
                }
                crate::metrics::webhook_delivery(&entry.outcome);
                held.log.push(entry);
            }
        }
        take_redeliveries(store, &sub.id, &asked).await?;
    }

    if held.cursor.retry_at.is_some_and(|t| t > now) {
        if !held.log.is_empty() {
            held.flush(now).await?;
        }
        return Ok(());
    }
    let start = held.cursor.after;
    loop {
        let page = store.read_events(held.cursor.after, Some(std::slice::from_ref(&sub.project_id)), 100).await?;
        if page.is_empty() {
            break;
        }
        for event in page {
            if !sub.wants(&event) {
                held.cursor.after = event.seq;
                continue;
            }
            let now = state.engine.clock().now();
            // Hold the lease before sending (first event, or one about to lapse).
            let lapsing = held.cursor.lease_until.is_none_or(|t| t <= now.plus(millis(LEASE / 2)));
            if (lapsing || held.cursor.holder.as_deref() != Some(node)) && !held.flush(now).await? {
                return Ok(());
            }
            let attempt = held.cursor.failures.saturating_add(1);
            let sent = send(state, &agent, &sub, &event).await;
            let mut entry = delivery(&event, attempt, now, sent);
            let delivered = entry.status.is_some_and(|s| (200..300).contains(&s));
            if delivered {
                held.cursor.after = event.seq;
                held.cursor.failures = 0;
                held.cursor.retry_at = None;
            } else {
                held.cursor.failures = held.cursor.failures.saturating_add(1);
                match retry_delay(held.cursor.failures, rand::random::<f64>() * 2.0 - 1.0) {
                    Some(wait) => {
                        let due = now.plus(millis(wait));
                        held.cursor.retry_at = Some(due);
                        entry.outcome = "retrying".into();
                        entry.retry_at = Some(due);
                    }
                    None => {
                        // The schedule is spent: give this event up and go on with the next.
                        held.cursor.after = event.seq;
                        held.cursor.failures = 0;
                        held.cursor.retry_at = None;
                        entry.outcome = "gave_up".into();
                    }
                }
            }
            crate::metrics::webhook_delivery(&entry.outcome);
            held.log.push(entry);
            if held.cursor.retry_at.is_some() {
                held.flush(now).await?;
                return Ok(());
            }
            if (held.log.len() >= FLUSH_AFTER || held.flushed.elapsed() >= FLUSH_EVERY) && !held.flush(now).await? {
                return Ok(());
            }
        }
    }
    // Written only when something moved: an idle subscription costs each node a read a tick.
    if held.cursor.after != start || !held.log.is_empty() {
        held.flush(now).await?;
    }
    Ok(())
}

fn delivery(event: &Event, attempt: u32, at: Timestamp, sent: Sent) -> Delivery {
    Delivery {
        event: event.seq,
        webhook_id: webhook_id(event),
        kind: event.event.kind.clone(),
        attempt,
        at,
        status: sent.status,
        error: sent.error,
        duration_ms: sent.took.as_millis() as u64,
        outcome: "delivered".into(),
        retry_at: None,
    }
}

fn millis(d: Duration) -> pond_core::time::Millis {
    pond_core::time::Millis(d.as_millis() as u64)
}

/// Events asked for again (`POST …/redeliver`), oldest first.
async fn redeliveries(store: &dyn Store, id: &str) -> Result<Vec<i64>, pond_core::StoreError> {
    let body = store.get_record(REDELIVER_RECORD, id).await?;
    Ok(body.as_deref().and_then(|b| serde_json::from_str(b).ok()).unwrap_or_default())
}

/// Removes `sent` from the redelivery queue (others may have been added meanwhile).
async fn take_redeliveries(store: &dyn Store, id: &str, sent: &[i64]) -> Result<(), pond_core::StoreError> {
    for _ in 0..20 {
        let old = store.get_record(REDELIVER_RECORD, id).await?;
        let mut queue: Vec<i64> = old.as_deref().and_then(|b| serde_json::from_str(b).ok()).unwrap_or_default();
        queue.retain(|s| !sent.contains(s));
        let body = serde_json::to_string(&queue).map_err(|e| pond_core::StoreError::Corrupt(e.to_string()))?;
        if store.swap_record(REDELIVER_RECORD, id, old.as_deref(), &body).await? {
            return Ok(());
        }
    }
    Ok(())
}

async fn log_deliveries(store: &dyn Store, id: &str, entries: Vec<Delivery>) -> Result<(), pond_core::StoreError> {
    if entries.is_empty() {
        return Ok(());
    }
    for _ in 0..20 {
        let old = store.get_record(LOG_RECORD, id).await?;
        let mut log: Vec<Delivery> = old.as_deref().and_then(|b| serde_json::from_str(b).ok()).unwrap_or_default();
        log.extend(entries.iter().cloned());
        if log.len() > LOG_KEEP {
            let excess = log.len() - LOG_KEEP;
            log.drain(..excess);
        }
        let body = serde_json::to_string(&log).map_err(|e| pond_core::StoreError::Corrupt(e.to_string()))?;
        if store.swap_record(LOG_RECORD, id, old.as_deref(), &body).await? {
            return Ok(());
        }
    }
    tracing::warn!(webhook = %id, "the delivery log stayed busy; entries were not logged");
    Ok(())
}

/// How one POST went.
struct Sent {
    status: Option<u16>,
    error: Option<String>,
    took: Duration,
}

/// An HTTP agent for one drain: connections kept alive between its deliveries, no redirects,
/// names resolved through the address policy.
fn sender(allow: &[IpAddr]) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(SEND_TIMEOUT)
        .redirects(0)
        .resolver(PolicyResolver { allow: allow.to_vec() })
        .user_agent(concat!("pond-webhooks/", env!("CARGO_PKG_VERSION")))
        .tls_config(crate::tls::client_config())
        .build()
}

async fn send(state: &AppState, agent: &ureq::Agent, sub: &Subscription, event: &Event) -> Sent {
    let now = now(state);
    let secrets = live_secrets(state, sub, now);
    if secrets.is_empty() {
        return Sent {
            status: None,
            error: Some("no secret of this webhook opens under this server's key".into()),
            took: Duration::ZERO,
        };
    }
    let id = webhook_id(event);
    let body = payload(event);
    let timestamp = now.as_millis() / 1000;
    let signed = signature(&secrets, &id, timestamp, &body);
    let (url, agent) = (sub.url.clone(), agent.clone());
    let started = Instant::now();
    // Everything that touches the socket — the answer's body too — stays on the blocking pool,
    // so a receiver that stalls holds one of its threads, never the runtime's.
    let result = tokio::task::spawn_blocking(move || {
        let response = agent
            .post(&url)
            .set("content-type", "application/json")
            .set("webhook-id", &id)
            .set("webhook-timestamp", &timestamp.to_string())
            .set("webhook-signature", &signed)
            .send_string(&body)?;
        let status = response.status();
        // A short answer is read so the connection can be kept; a long one is dropped with it.
        let _ = std::io::copy(&mut std::io::Read::take(response.into_reader(), 16 * 1024), &mut std::io::sink());
        Ok::<u16, ureq::Error>(status)
    })
    .await;
    let took = started.elapsed();
    match result {
        Ok(Ok(status)) => Sent { status: Some(status), error: None, took },
        Ok(Err(ureq::Error::Status(code, _))) => {
            Sent { status: Some(code), error: Some(format!("the receiver answered {code}")), took }
        }
        Ok(Err(ureq::Error::Transport(t))) => Sent { status: None, error: Some(t.to_string()), took },
        Err(e) => Sent { status: None, error: Some(format!("the send task failed: {e}")), took },
    }
}

/// The secrets that sign now, opened.
fn live_secrets(state: &AppState, sub: &Subscription, now: Timestamp) -> Vec<Vec<u8>> {
    sub.secrets
        .iter()
        .filter(|s| s.expires_at.is_none_or(|t| t > now))
        .filter_map(|s| open_secret(&state.webhooks.keys, &sub.id, s))
        .collect()
}

/// A stored secret's bytes, if it opens under `keys` and was sealed for subscription `id`.
fn open_secret(keys: &pond_core::server_keys::AtRestKeys, id: &str, stored: &StoredSecret) -> Option<Vec<u8>> {
    let sealed = B64.decode(&stored.sealed).ok()?;
    let opened = keys.open(&sealed).ok()?;
    opened.strip_prefix(bound_prefix(id).as_slice()).map(<[u8]>::to_vec)
}

/// Resolves a receiver's name and keeps only the addresses the policy lets pond dial, so a name
/// pointing inside (or re-pointed there later) is refused at connect time.
struct PolicyResolver {
    allow: Vec<IpAddr>,
}

impl ureq::Resolver for PolicyResolver {
    fn resolve(&self, netloc: &str) -> std::io::Result<Vec<SocketAddr>> {
        // Resolution bounded like the rest of a delivery: a slow name server does not hold the
        // subscription past its lease (the lookup thread is left to finish on its own).
        let (tx, rx) = std::sync::mpsc::channel();
        let name = netloc.to_string();
        std::thread::spawn(move || {
            let _ = tx.send(name.to_socket_addrs().map(|a| a.collect::<Vec<SocketAddr>>()));
        });
        let all = rx.recv_timeout(RESOLVE_TIMEOUT).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "the receiver's name did not resolve within 5 s")
        })??;
        let allowed: Vec<SocketAddr> =
            all.iter().copied().filter(|a| refuse_internal(a.ip(), &self.allow).is_ok()).collect();
        if allowed.is_empty() {
            // The tenant sees that it was refused, not which internal address its name led to.
            let why = if all.is_empty() {
                "the receiver's name resolves to no address".to_string()
            } else {
                tracing::warn!(receiver = %netloc, addresses = ?all, "webhook refused: internal address");
                "refused: the receiver's name resolves to an internal address (the server's operator may allow it with --webhook-allow-ip)".to_string()
            };
            return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, why));
        }
        Ok(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_for_its_own_subscription_and_key() {
        let key = pond_core::server_keys::AtRestKeys::new([7u8; 32], &[]);
        let (shown, stored) = new_secret(&key, "wh_a", Timestamp::from_millis(0));
        let bytes = open_secret(&key, "wh_a", &stored).expect("opens for its subscription");
        assert_eq!(secret_text(&bytes), shown);
        // Moved into another subscription's record, or read under another server key: nothing.
        assert_eq!(open_secret(&key, "wh_b", &stored), None);
        assert_eq!(open_secret(&key, "wh_", &stored), None);
        let other = pond_core::server_keys::AtRestKeys::new([8u8; 32], &[]);
        assert_eq!(open_secret(&other, "wh_a", &stored), None);
        // During a rotation, the new key opens it with the old one as previous.
        let rotated = pond_core::server_keys::AtRestKeys::new([8u8; 32], &[[7u8; 32]]);
        assert_eq!(open_secret(&rotated, "wh_a", &stored).as_deref(), Some(&bytes[..]));
    }
}
