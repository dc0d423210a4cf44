//! The `/v1` consumer and admin routes, plus `/healthz` and `/readyz`.
//!
//! `app(state)` builds the router, so tests can call it with `oneshot` and no socket.

use std::convert::Infallible;
use std::str::FromStr;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use pond_core::definition::Definition;
use pond_core::engine::SubmitRequest;
use pond_core::ids::{RunId, TokenId};
use pond_core::run::{RunSnapshot, RunState};
use pond_core::source::SourceInput;
use pond_core::store::{LogLine, Role, RunQuery, Store};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{mint_token, Principal};
use crate::boundary::{body_limit, json_errors, parse_query, ApiPath as Path, SMALL_BODY_BYTES};
pub use crate::boundary::{read_body, ApiJson};
use crate::error::ApiError;
use crate::state::AppState;
use crate::wire::{
    ArtifactList, BulkCancelled, BulkFailure, BundleCreated, CreateKey, Health, HealthLimits, KeyList, KeyView, LogEnd,
    LogPage, Ready, RunPage, RunSummary, RunView, Version, WhoAmI,
};

/// The whole HTTP API. Every route sits in a group with a body limit fitting what it takes
/// (see [`crate::boundary`]); every error answer, the fallbacks' included, is JSON.
pub fn app(state: AppState) -> Router {
    let limits = state.limits.clone();
    let (routes, _) = routes(&limits).split_for_parts();
    routes
        // Every routed request counted by its route template and status.
        .route_layer(axum::middleware::from_fn(crate::metrics::count_requests))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|method: axum::http::Method, uri: axum::http::Uri| async move {
            ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
        })
        .layer(axum::middleware::from_fn(json_errors))
        .layer(cors(&limits.cors_origins))
        // Outermost: every request gets an id and an access-log line.
        .layer(axum::middleware::from_fn(crate::metrics::access_log))
        .with_state(state)
}

/// The server's OpenAPI document: what [`app`]'s routes say of themselves (body limits do not
/// change it).
pub(crate) fn openapi() -> utoipa::openapi::OpenApi {
    crate::openapi::finish(routes(&crate::state::Limits::default()).into_openapi())
}

/// Every route of the server, each documented by its handler's `#[utoipa::path]`: a route is
/// registered only through `routes!`, so none is served undocumented.
fn routes(limits: &crate::state::Limits) -> OpenApiRouter<AppState> {
    // A run's definition and sources.
    let submit =
        OpenApiRouter::new().routes(routes!(submit_run, list_runs)).route_layer(body_limit(limits.max_json_bytes));
    let bundles = OpenApiRouter::new().routes(routes!(upload_bundle)).route_layer(body_limit(limits.max_bundle_bytes));
    // Small JSON documents, or no body at all.
    let small = OpenApiRouter::new()
        .routes(routes!(get_run))
        .routes(routes!(cancel_run))
        .routes(routes!(cancel_runs))
        .routes(routes!(run_logs))
        .routes(routes!(list_artifacts))
        .routes(routes!(get_artifact))
        .routes(routes!(create_key, list_keys))
        .routes(routes!(revoke_key))
        .routes(routes!(rotate_own_key))
        .routes(routes!(version))
        .routes(routes!(whoami))
        .routes(routes!(crate::openapi::server_openapi_json))
        .merge(crate::agents_api::routes())
        .merge(crate::keys_api::routes())
        .merge(crate::usage_api::routes())
        .merge(crate::events_api::routes())
        .merge(crate::webhooks::routes())
        .route_layer(body_limit(SMALL_BODY_BYTES));
    let v1 = submit.merge(bundles).merge(small).merge(crate::orch::routes(limits));
    let health = OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(ready))
        .routes(routes!(crate::metrics::render))
        .routes(routes!(crate::openapi::docs_page))
        .routes(routes!(crate::openapi::docs_script))
        .routes(routes!(crate::console::console_page))
        .routes(routes!(crate::console::console_asset))
        .route_layer(body_limit(SMALL_BODY_BYTES));
    OpenApiRouter::with_openapi(crate::openapi::server_base()).nest("/v1", v1).merge(health)
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "meta", security(()),
    responses((status = 200, description = "Up: the version and the largest bundle accepted.", body = Health)))]
async fn healthz(State(state): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        limits: HealthLimits { max_bundle_bytes: state.limits.max_bundle_bytes as u64 },
    })
}

/// CORS for the origins the operator allowed (`pond server --cors-origin`): a browser page of
/// one of them may call the API with a bearer token; any other origin gets no CORS headers, so
/// browsers keep its pages out. Preflights are answered before authentication.
fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use axum::http::{header, HeaderName, HeaderValue, Method};
    // Exact origins only (a wildcard would panic in tower-http's list and is refused anyway).
    let allowed: Vec<HeaderValue> = origins
        .iter()
        .filter(|o| (o.starts_with("https://") || o.starts_with("http://")) && !o.contains('*'))
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    tower_http::cors::CorsLayer::new()
        .allow_origin(allowed)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static(crate::metrics::REQUEST_ID),
        ])
        .expose_headers([HeaderName::from_static(crate::metrics::REQUEST_ID)])
        .max_age(std::time::Duration::from_secs(600))
}

pub(crate) fn number<T: FromStr>(field: &str, text: Option<&str>) -> Result<Option<T>, ApiError> {
    text.map(|t| {
        t.parse::<T>()
            .map_err(|_| ApiError::invalid(format!("query.{field}"), format!("`{t}` is not a whole number in range")))
    })
    .transpose()
}

pub(crate) async fn visible_run(state: &AppState, who: &Principal, id: &str) -> Result<RunSnapshot, ApiError> {
    let not_found = || ApiError::NotFound(format!("run {id} not found"));
    let run_id = RunId::from_str(id).map_err(|_| not_found())?;
    // Another project's run answers exactly like a missing one, so ids do not leak.
    state.store.get_run(run_id).await?.filter(|s| who.can_use(&s.run.project_id)).ok_or_else(not_found)
}

/// `POST /v1/runs` body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct SubmitBody {
    /// The project the run belongs to (required; `projectId` is accepted too).
    #[serde(default, alias = "projectId")]
    #[schema(required = true, value_type = String, pattern = "^[A-Za-z0-9._:-]{1,128}$")]
    project_id: Option<String>,
    /// The workflow snapshot.
    definition: Definition,
    /// Where the run's code comes from.
    #[serde(default)]
    sources: Vec<SourceInput>,
    /// Seal logs and artifacts to `recipient_pubkeys`; absent: encrypted when recipients are given
    /// (unless the server's default is off).
    #[serde(default)]
    encrypt: Option<bool>,
    /// X25519 public keys (base64) of who may read a confidential run (`recipientPubkeys` too).
    #[serde(default, alias = "recipientPubkeys")]
    recipient_pubkeys: Option<Vec<String>>,
    /// Makes a signed request unique (signed with it; a signature is accepted for one run).
    #[serde(default)]
    nonce: Option<String>,
    /// The consumer's signature over the request's canonical form (required when encrypted).
    #[serde(default, alias = "consumerSignature")]
    consumer_signature: Option<pond_core::signed_request::ConsumerSignature>,
}

#[utoipa::path(post, path = "/runs", summary = "Submit a run", tag = "runs", security(("bearer" = [])),
    description = "Submits a run: a workflow snapshot (`definition`) and its `sources`. A confidential run \
        (`encrypt`, `recipient_pubkeys`) needs the consumer's `consumer_signature` over the request. \
        An `Idempotency-Key` makes a retried submit answer the run the first one made (200).",
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retried submit return the run the first made (visible ASCII).")),
    request_body(content = SubmitBody, content_type = "application/json"),
    responses(
        (status = 201, description = "The run was made.", body = RunView,
            links(
                ("get" = (operation_id = "get_run", parameters(("id" = "$response.body#/id")), description = "The run's state.")),
                ("logs" = (operation_id = "run_logs", parameters(("id" = "$response.body#/id")), description = "The run's log.")),
                ("artifacts" = (operation_id = "list_artifacts", parameters(("id" = "$response.body#/id")), description = "The run's artifacts.")),
                ("cancel" = (operation_id = "cancel_run", parameters(("id" = "$response.body#/id")), description = "Stop the run.")),
                ("usage" = (operation_id = "run_usage", parameters(("id" = "$response.body#/id")), description = "What the run spent.")),
                ("keys" = (operation_id = "run_keys", parameters(("id" = "$response.body#/id")), description = "Who signed the run's output.")),
            )),

        (status = 200, description = "An earlier submit with this `Idempotency-Key` made this run.", body = RunView,
            links(
                ("get" = (operation_id = "get_run", parameters(("id" = "$response.body#/id")), description = "The run's state.")),
                ("logs" = (operation_id = "run_logs", parameters(("id" = "$response.body#/id")), description = "The run's log.")),
                ("artifacts" = (operation_id = "list_artifacts", parameters(("id" = "$response.body#/id")), description = "The run's artifacts.")),
                ("cancel" = (operation_id = "cancel_run", parameters(("id" = "$response.body#/id")), description = "Stop the run.")),
                ("usage" = (operation_id = "run_usage", parameters(("id" = "$response.body#/id")), description = "What the run spent.")),
                ("keys" = (operation_id = "run_keys", parameters(("id" = "$response.body#/id")), description = "Who signed the run's output.")),
            )),

        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 409, response = crate::openapi::Conflict),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn submit_run(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    ApiJson(raw): ApiJson<serde_json::Value>,
) -> Result<Response, ApiError> {
    // The signature covers the request as sent, so its fields are kept raw beside the decoded
    // body.
    let body: SubmitBody = pond_core::json::from_value_at(raw.clone(), "").map_err(ApiError::Invalid)?;
    if body.nonce.as_ref().is_some_and(|n| n.len() > 128) {
        return Err(ApiError::invalid("nonce", "at most 128 bytes"));
    }
    let project = body.project_id.ok_or_else(|| ApiError::invalid("project_id", "is required"))?;
    if !who.can_use(&project) {
        return Err(ApiError::Forbidden(format!("this token may not use project `{project}`")));
    }
    let recipients = body.recipient_pubkeys.unwrap_or_default();
    // Without `encrypt`, a run with recipients is encrypted unless the server's default is off
    // (POND_ENCRYPTION_DEFAULT=false).
    let encrypt = body.encrypt.unwrap_or(state.limits.encryption_default && !recipients.is_empty());
    if encrypt && recipients.is_empty() {
        return Err(ApiError::invalid("recipient_pubkeys", "`encrypt: true` needs at least one recipient public key"));
    }
    let recipients = if encrypt { recipients } else { Vec::new() };
    let idempotency_key = match headers.get("idempotency-key") {
        Some(v) => {
            Some(v.to_str().map_err(|_| ApiError::invalid("Idempotency-Key", "must be visible ASCII"))?.to_string())
        }
        None => None,
    };
    let signed = body.consumer_signature.as_ref().map(|signature| {
        use pond_core::signed_request::{signed_fields, SignedRequest};
        SignedRequest::from_parts(signature, &signed_fields(&raw, &project))
    });
    let submitted = state
        .engine
        .submit(SubmitRequest {
            project_id: project,
            definition: body.definition,
            sources: body.sources,
            idempotency_key,
            signed,
            recipients,
        })
        .await?;
    let status = if submitted.created { StatusCode::CREATED } else { StatusCode::OK };
    let mut view = RunView::from(submitted.snapshot);
    if view.stages.iter().any(|s| s.requirements.is_some()) {
        // A pooled stage no enrolled worker could take would wait forever: say so now.
        view.explain_waiting(&state.pools.members().await?);
        view.warnings = view
            .stages
            .iter()
            .filter_map(|s| s.waiting_for.as_ref().map(|w| format!("stage `{}` waits for {w}", s.key)))
            .collect();
    }
    Ok((status, Json(view)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    project: Option<String>,
    state: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
    text: Option<String>,
}

/// The longest `text` a run search takes.
const MAX_SEARCH_CHARS: usize = 200;

#[utoipa::path(get, path = "/runs", summary = "List runs", tag = "runs", security(("bearer" = [])),
    description = "The runs visible to the credential, newest first, a page at a time.",
    params(
        ("project" = Option<String>, Query, description = "Only this project's runs."),
        ("state" = Option<RunState>, Query, description = "Only runs in this state."),
        ("limit" = Option<i64>, Query, minimum = 0, maximum = 4294967295_i64, description = "Page size (default 50; 0 counts as 1, larger values are cut to the server's page limit)."),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page."),
        ("text" = Option<String>, Query, max_length = 200, description = "Only runs whose id, idempotency key, error or definition (stage keys, names, commands) contains this text; ASCII letters match in either case."),
    ),
    responses(
        (status = 200, description = "A page of runs.", body = RunPage),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn list_runs(
    State(state): State<AppState>,
    who: Principal,
    uri: axum::http::Uri,
) -> Result<Json<RunPage>, ApiError> {
    let q: ListQuery = parse_query(uri.query())?;
    let limit = number::<u32>("limit", q.limit.as_deref())?.unwrap_or(50).clamp(1, state.limits.max_page);
    let run_state = q
        .state
        .as_deref()
        .map(|s| {
            RunState::parse(s).ok_or_else(|| {
                ApiError::invalid(
                    "query.state",
                    format!("`{s}` is not one of queued, running, succeeded, failed, cancelled"),
                )
            })
        })
        .transpose()?;
    let before = q
        .cursor
        .as_deref()
        .map(|c| RunId::from_str(c).map_err(|_| ApiError::invalid("query.cursor", "not a cursor returned by this API")))
        .transpose()?;
    let projects = match (who.visible_projects(), q.project) {
        (None, None) => None,
        (None, Some(p)) => Some(vec![p]),
        (Some(mine), None) => Some(mine),
        (Some(mine), Some(p)) => Some(mine.into_iter().filter(|m| *m == p).collect()),
    };
    let text = match q.text {
        Some(t) if t.chars().count() > MAX_SEARCH_CHARS => {
            return Err(ApiError::invalid("query.text", format!("longer than {MAX_SEARCH_CHARS} characters")))
        }
        Some(t) if t.contains('\0') => return Err(ApiError::invalid("query.text", "contains a NUL character")),
        Some(t) if !t.is_empty() => Some(t),
        _ => None,
    };
    let query = RunQuery { projects, state: run_state, before, text, limit: limit + 1 };
    let runs = state.store.list_runs(&query).await?;
    let more = runs.len() > limit as usize;
    let runs: Vec<RunSummary> = runs
        .into_iter()
        .take(limit as usize)
        .map(|r| RunSummary {
            id: r.id,
            stages: r.definition.stages.len(),
            project_id: r.project_id,
            state: r.state,
            created_at: r.created_at,
            finished_at: r.finished_at,
            error: r.error,
        })
        .collect();
    let next_cursor = if more { runs.last().map(|r| r.id) } else { None };
    Ok(Json(RunPage { runs, next_cursor }))
}

#[utoipa::path(get, path = "/runs/{id}", summary = "A run with its stages and attempts", tag = "runs", security(("bearer" = [])),
    params(("id" = String, Path, description = "The run's id.")),
    responses(
        (status = 200, description = "The run, its stages and attempts.", body = RunView),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn get_run(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<RunView>, ApiError> {
    let mut view: RunView = visible_run(&state, &who, &id).await?.into();
    if view.stages.iter().any(|s| s.requirements.is_some() && s.state == pond_core::run::StageState::Queued) {
        view.explain_waiting(&state.pools.members().await?);
    }
    Ok(Json(view))
}

#[utoipa::path(post, path = "/runs/{id}/cancel", summary = "Cancel a run", tag = "runs", security(("bearer" = [])),
    description = "Asks a run to stop: queued stages are cancelled, running ones stopped. A run that has ended is answered as it is.",
    params(("id" = String, Path, description = "The run's id.")),
    responses(
        (status = 200, description = "The run after the request.", body = RunView),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn cancel_run(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<RunView>, ApiError> {
    let run = visible_run(&state, &who, &id).await?;
    let snapshot = state.engine.cancel(run.run.id, "cancelled by request").await?;
    if let Some(driver) = &state.driver {
        driver.poke(run.run.id);
    }
    Ok(Json(snapshot.into()))
}

/// `POST /v1/runs/cancel` body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct BulkCancel {
    /// The project whose runs are cancelled.
    project: String,
    /// Only runs in this state (`queued` or `running`); absent: both (`status` is accepted too).
    #[serde(default, alias = "status")]
    state: Option<RunState>,
}

/// Cancels every queued or running run of a project (or only those in `state`). Idempotent:
/// a second call finds nothing new to cancel. One run that cannot be cancelled is reported and
/// the rest go on.
#[utoipa::path(post, path = "/runs/cancel", tag = "runs", security(("bearer" = [])),
    request_body(content = BulkCancel, content_type = "application/json"),
    responses(
        (status = 200, description = "What this call cancelled, and what it could not.", body = BulkCancelled),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn cancel_runs(
    State(state): State<AppState>,
    who: Principal,
    ApiJson(body): ApiJson<BulkCancel>,
) -> Result<Json<BulkCancelled>, ApiError> {
    if !who.can_use(&body.project) {
        return Err(ApiError::Forbidden(format!("this token may not use project `{}`", body.project)));
    }
    let states = match body.state {
        None => vec![RunState::Queued, RunState::Running],
        Some(s @ (RunState::Queued | RunState::Running)) => vec![s],
        Some(other) => {
            return Err(ApiError::invalid(
                "state",
                format!("`{other}` runs have ended; only queued or running runs can be cancelled"),
            ))
        }
    };
    let mut out = BulkCancelled { cancelled: Vec::new(), failed: Vec::new() };
    for run_state in states {
        let mut before = None;
        loop {
            let query = RunQuery {
                projects: Some(vec![body.project.clone()]),
                state: Some(run_state),
                before,
                limit: 500,
                text: None,
            };
            let page = state.store.list_runs(&query).await?;
            let Some(last) = page.last() else { break };
            before = Some(last.id);
            for run in page {
                // Already asked: nothing to do, and not counted again.
                if run.cancel_requested {
                    continue;
                }
                match state.engine.cancel(run.id, "cancelled by request (bulk)").await {
                    Ok(_) => {
                        if let Some(driver) = &state.driver {
                            driver.poke(run.id);
                        }
                        out.cancelled.push(run.id);
                    }
                    Err(e) => out.failed.push(BulkFailure { id: run.id, error: e.to_string() }),
                }
            }
        }
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    after: Option<String>,
    limit: Option<String>,
    follow: Option<String>,
}

#[utoipa::path(get, path = "/runs/{id}/logs", summary = "Read or follow a run's log", tag = "runs", security(("bearer" = [])),
    description = "The run's log. Without `follow`: a page of lines as JSON. With `follow`: server-sent events \
        (`text/event-stream`) — `log` events (data: a `LogLine`, id: its `seq`, for `Last-Event-ID` resumes) until \
        the run ends, then one `end` event (data: a `LogEnd`); an `error` event ends the stream early (the token \
        was revoked). Lines of a confidential run are sealed (`ENC2K:`/`ENC2:`/`ENC2F:`, see docs/FORMATS.md).",
    params(
        ("id" = String, Path, description = "The run's id."),
        ("after" = Option<i64>, Query, description = "Lines after this `seq` (default 0: from the start)."),
        ("limit" = Option<i64>, Query, minimum = 0, maximum = 4294967295_i64, description = "Page size (default 500; 0 counts as 1, larger values are cut to the server's page limit)."),
        ("follow" = Option<String>, Query, pattern = "^(1|true|yes|0|false|no)?$",
            description = "`1`, `true`, `yes` or empty: stream as server-sent events; `0`, `false`, `no`: a page."),
        ("Last-Event-ID" = Option<i64>, Header, description = "With `follow`: resume after this `seq` (takes precedence over `after`)."),
    ),
    responses(
        (status = 200, description = "A page of lines, or (with `follow`) the stream of them.",
            content(
                (LogPage = "application/json"),
                (crate::openapi::LogStreamEvent = "text/event-stream"),
            )),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn run_logs(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    let run = visible_run(&state, &who, &id).await?;
    let q: LogQuery = parse_query(uri.query())?;
    // A resume names a `log` event's id; anything else is refused rather than read as "from the
    // start", which would send the whole log again.
    let resume =
        match headers.get("last-event-id") {
            None => None,
            Some(v) => Some(v.to_str().ok().and_then(|v| v.trim().parse::<i64>().ok()).ok_or_else(|| {
                ApiError::invalid("Last-Event-ID", "must be the `id` of a `log` event (a whole number)")
            })?),
        };
    let after = resume.or(number::<i64>("after", q.after.as_deref())?).unwrap_or(0);
    let limit = number::<u32>("limit", q.limit.as_deref())?.unwrap_or(500).clamp(1, state.limits.max_page);
    let follow = match q.follow.as_deref() {
        None | Some("0" | "false" | "no") => false,
        Some("1" | "true" | "yes" | "") => true,
        Some(other) => {
            return Err(ApiError::invalid("query.follow", format!("`{other}` is not 1, true, yes, 0, false or no")))
        }
    };
    if follow {
        return Ok(follow_logs(state, run.run.id, after, who.secret_sha256).into_response());
    }
    let lines = state.store.read_logs(run.run.id, after, limit).await?;
    let next_cursor = lines.last().map(|l| l.seq).unwrap_or(after);
    Ok(Json(LogPage { lines, next_cursor, run_state: run.run.state }).into_response())
}

struct Follow {
    state: AppState,
    run: RunId,
    cursor: i64,
    pending: std::collections::VecDeque<Event>,
    done: bool,
    changes: tokio::sync::watch::Receiver<u64>,
    /// The follower's token (SHA-256), re-checked while the stream is open.
    token: String,
    checked: std::time::Instant,
}

/// How often an open follow re-checks its token: with the cache's freshness bound
/// (`auth::still_valid`), a revoked key's streams end within about 3 s.
const TOKEN_RECHECK: Duration = Duration::from_secs(1);

fn line_event(line: &LogLine) -> Event {
    let data = serde_json::to_string(line).unwrap_or_else(|_| "{}".into());
    Event::default().event("log").id(line.seq.to_string()).data(data)
}

/// Server-sent events: `log` events (id = seq, for `Last-Event-ID` resumes) until the run
/// ends, then one `end` event with the final state. Waits on store changes, with a 1 s
/// fallback poll. A token revoked meanwhile ends the stream with an `error` event.
fn follow_logs(
    state: AppState,
    run: RunId,
    after: i64,
    token: String,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let changes = state.store.run_changed(run);
    let checked = std::time::Instant::now();
    let start = Follow { state, run, cursor: after, pending: Default::default(), done: false, changes, token, checked };
    let stream = futures_util::stream::unfold(start, |mut f| async move {
        loop {
            if !f.done && f.checked.elapsed() >= TOKEN_RECHECK {
                f.checked = std::time::Instant::now();
                match crate::auth::still_valid(&f.state, &f.token).await {
                    Ok(true) => {}
                    Ok(false) => {
                        f.done = true;
                        f.pending.clear();
                        let event = Event::default().event("error").data("the token was revoked");
                        return Some((Ok(event), f));
                    }
                    // The database is away: the stream waits for it like the reads below do.
                    Err(e) => tracing::warn!(error = %e, "follow: re-checking the token failed"),
                }
            }
            if let Some(event) = f.pending.pop_front() {
                return Some((Ok(event), f));
            }
            if f.done {
                return None;
            }
            f.changes.borrow_and_update();
            let lines = match f.state.store.read_logs(f.run, f.cursor, 500).await {
                Ok(lines) => lines,
                Err(e) => {
                    f.done = true;
                    let event = Event::default().event("error").data(e.to_string());
                    return Some((Ok(event), f));
                }
            };
            if let Some(last) = lines.last() {
                f.cursor = last.seq;
                f.pending.extend(lines.iter().map(line_event));
                continue;
            }
            match f.state.store.get_run(f.run).await {
                Ok(Some(s)) if s.run.state.is_terminal() => {
                    // Lines may have landed between the read above and the state check.
                    match f.state.store.read_logs(f.run, f.cursor, 500).await {
                        Ok(more) if !more.is_empty() => {
                            f.cursor = more.last().map(|l| l.seq).unwrap_or(f.cursor);
                            f.pending.extend(more.iter().map(line_event));
                            continue;
                        }
                        _ => {}
                    }
                    let end = LogEnd { state: s.run.state, error: s.run.error };
                    let data = serde_json::to_string(&end).unwrap_or_else(|_| "{}".into());
                    f.done = true;
                    return Some((Ok(Event::default().event("end").data(data)), f));
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "follow: reading the run failed"),
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), f.changes.changed()).await;
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

#[utoipa::path(get, path = "/runs/{id}/artifacts", summary = "List a run's artifacts", tag = "runs", security(("bearer" = [])),
    params(("id" = String, Path, description = "The run's id.")),
    responses(
        (status = 200, description = "The run's artifacts, by name.", body = ArtifactList),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn list_artifacts(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<ArtifactList>, ApiError> {
    let run = visible_run(&state, &who, &id).await?;
    Ok(Json(ArtifactList { artifacts: state.store.list_artifacts(run.run.id).await? }))
}

#[utoipa::path(get, path = "/runs/{id}/artifacts/{*name}", summary = "Download an artifact", tag = "runs", security(("bearer" = [])),
    description = "An artifact's bytes. A confidential run's artifacts are sealed (secretstream); their keys are \
        in `<name>.pondkey`, sealed to the run's recipients (docs/FORMATS.md).",
    params(("id" = String, Path, description = "The run's id."), ("name" = String, Path, description = "The artifact's name (may hold `/`).")),
    responses(
        (status = 200, description = "The bytes.", content_type = "application/octet-stream", body = crate::openapi::Binary,
            headers(("x-pond-sha256" = String, description = "SHA-256 of the bytes, hex."))),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn get_artifact(
    State(state): State<AppState>,
    who: Principal,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let run = visible_run(&state, &who, &id).await?;
    let artifact = state
        .store
        .get_artifact(run.run.id, &name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("run {id} has no artifact `{name}`")))?;
    let meta = state
        .store
        .blob_meta(artifact.blob_id)
        .await?
        .ok_or_else(|| ApiError::Internal(format!("artifact `{name}` of run {id} has no blob")))?;
    Ok(blob_response(&state, &meta))
}

/// A stored blob as an `application/octet-stream` response, streamed chunk by chunk, with its
/// SHA-256 in `x-pond-sha256`.
pub(crate) fn blob_response(state: &AppState, meta: &pond_core::store::BlobMeta) -> Response {
    let store = state.store_dyn();
    let chunks = meta.chunk_count();
    let blob = meta.id;
    let body = futures_util::stream::unfold(0u64, move |i| {
        let store = store.clone();
        async move {
            if i >= chunks {
                return None;
            }
            let chunk = store.read_blob_chunk(blob, i).await.map(Bytes::from).map_err(std::io::Error::other);
            Some((chunk, i + 1))
        }
    });
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, meta.size.to_string()),
            (header::HeaderName::from_static("x-pond-sha256"), meta.sha256.clone()),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BundleQuery {
    project: Option<String>,
}

#[utoipa::path(post, path = "/bundles", summary = "Upload a source bundle", tag = "runs", security(("bearer" = [])),
    description = "Uploads a source bundle (a zstd-compressed tar archive) for `sources[].config.bundle_id`. It is \
        kept sealed under the server key. A project may hold only so many bytes of bundles no run uses yet \
        (429 beyond it); one unused for the server's bundle TTL (default an hour) after its upload is deleted.",
    params(("project" = String, Query, description = "The project whose runs may use it.")),
    request_body(description = "A `.tar.zst` archive: the bytes must start with zstd's magic number (the content type is not checked).",
        content((crate::openapi::Binary = "application/zstd"), (crate::openapi::Binary = "application/octet-stream"))),
    responses(
        (status = 201, description = "Stored.", body = BundleCreated),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 422, response = crate::openapi::Invalid),
        (status = 429, response = crate::openapi::TooManyRequests),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn upload_bundle(
    State(state): State<AppState>,
    who: Principal,
    uri: axum::http::Uri,
    req: Request,
) -> Result<Response, ApiError> {
    let q: BundleQuery = parse_query(uri.query())?;
    let project = q.project.ok_or_else(|| ApiError::invalid("query.project", "is required"))?;
    if !who.can_use(&project) {
        return Err(ApiError::Forbidden(format!("this token may not use project `{project}`")));
    }
    let data = read_body(req.into_body()).await?;
    if !data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Err(ApiError::invalid("body", "must be a zstd-compressed tar archive (.tar.zst)"));
    }
    // Kept at rest under the server key: a database dump shows no source file.
    let sealed = state.engine.at_rest_keys().seal(&data);
    let meta = state.engine.store_bundle(&project, &sealed).await?;
    let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data));
    let created = BundleCreated { bundle_id: meta.id, size: data.len() as u64, sha256 };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

#[utoipa::path(post, path = "/admin/keys", summary = "Create a consumer API key", tag = "keys", security(("bearer" = [])),
    request_body(content = CreateKey, content_type = "application/json"),
    responses(
        (status = 201, description = "The consumer key, with its secret (shown once).", body = KeyView,
            links(
                ("revoke" = (operation_id = "revoke_key", parameters(("id" = "$response.body#/id")), description = "Revoke it.")),
            )),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn create_key(
    State(state): State<AppState>,
    who: Principal,
    ApiJson(body): ApiJson<CreateKey>,
) -> Result<Response, ApiError> {
    who.require_admin()?;
    if body.projects.is_empty() {
        return Err(ApiError::invalid("projects", "must name at least one project"));
    }
    for (i, p) in body.projects.iter().enumerate() {
        let ok =
            !p.is_empty() && p.len() <= 128 && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        if !ok {
            return Err(ApiError::invalid(
                format!("projects[{i}]"),
                "must be 1 to 128 letters, digits, `-`, `_`, `.` or `:`",
            ));
        }
    }
    let name = body.name.unwrap_or_else(|| format!("key for {}", body.projects.join(",")));
    let (secret, record) = mint_token(Role::Consumer, &name, body.projects, state.engine.clock().now());
    state.store.insert_token(&record).await?;
    let mut view = KeyView::from(record);
    view.token = Some(secret);
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// `POST /v1/keys/rotate`: the caller's token (admin or consumer) is replaced by a new one with
/// the same role, projects and name; the answer carries the new secret (shown once) and the old
/// token stops working at once on this node (within the token cache's few seconds on others).
#[utoipa::path(post, path = "/keys/rotate", tag = "keys", security(("bearer" = [])),
    responses(
        (status = 201, description = "The caller's new key, with its secret (shown once); the old one stopped working.", body = KeyView),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn rotate_own_key(State(state): State<AppState>, who: Principal) -> Result<Response, ApiError> {
    let now = state.engine.clock().now();
    // From the store, not the token cache: a token revoked elsewhere a moment ago (or rotated
    // by a concurrent call) gets no successor.
    let old = state.store.list_tokens().await?.into_iter().find(|t| t.id == who.token_id);
    let Some(old) = old.filter(|t| t.revoked_at.is_none()) else {
        return Err(ApiError::Unauthorized("this token has been revoked".into()));
    };
    let name = old.name;
    let (secret, record) = mint_token(who.role, &name, who.projects.clone(), now);
    // The new one first: a failure between the two leaves both working, never neither.
    state.store.insert_token(&record).await?;
    state.store.revoke_token(who.token_id, now).await?;
    state.tokens.clear();
    let mut view = KeyView::from(record);
    view.token = Some(secret);
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// `GET /v1/whoami`: what the presented key is and may see (the console signs in with it).
#[utoipa::path(get, path = "/whoami", summary = "Describe the calling key", tag = "keys", security(("bearer" = [])),
    responses(
        (status = 200, description = "The key's id, role and projects.", body = WhoAmI),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn whoami(who: Principal) -> Json<WhoAmI> {
    let projects = if who.role == Role::Admin { Vec::new() } else { who.projects };
    Json(WhoAmI { key_id: who.token_id, role: who.role, projects })
}

/// `GET /v1/version` (no token needed): the server's version and API.
#[utoipa::path(get, path = "/version", tag = "meta", security(()),
    responses((status = 200, description = "The server's version and API.", body = Version)))]
async fn version() -> Json<Version> {
    Json(Version { version: env!("CARGO_PKG_VERSION").into(), api: "v1".into() })
}

#[utoipa::path(get, path = "/admin/keys", summary = "List API keys", tag = "keys", security(("bearer" = [])),
    responses(
        (status = 200, description = "Every API key (never a secret).", body = KeyList),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn list_keys(State(state): State<AppState>, who: Principal) -> Result<Json<KeyList>, ApiError> {
    who.require_admin()?;
    let keys = state.store.list_tokens().await?.into_iter().map(KeyView::from).collect();
    Ok(Json(KeyList { keys }))
}

#[utoipa::path(delete, path = "/admin/keys/{id}", summary = "Revoke an API key", tag = "keys", security(("bearer" = [])),
    params(("id" = String, Path, description = "The key's id.")),
    responses(
        (status = 204, description = "Revoked: it stops working at once on this node, within seconds on others."),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 404, response = crate::openapi::NotFound),
        (status = 409, response = crate::openapi::Conflict),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn revoke_key(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    who.require_admin()?;
    let token = TokenId::from_str(&id).map_err(|_| ApiError::NotFound(format!("key {id} not found")))?;
    if token == who.token_id {
        return Err(ApiError::Conflict("a token cannot revoke itself".into()));
    }
    if state.store.revoke_token(token, state.engine.clock().now()).await? {
        state.tokens.clear();
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("key {id} not found")))
    }
}

#[utoipa::path(get, path = "/readyz", summary = "Readiness: the database answers", tag = "meta", security(()),
    responses(
        (status = 200, description = "Ready: the database answers.", body = Ready),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn ready(State(state): State<AppState>) -> Result<Json<Ready>, ApiError> {
    state.store.list_runs(&RunQuery { limit: 1, ..Default::default() }).await?;
    Ok(Json(Ready { status: "ready".into() }))
}
