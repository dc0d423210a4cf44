//! Prometheus metrics: the process's recorder (the `metrics` facade, rendered by
//! `metrics-exporter-prometheus`), the HTTP layer that counts every request by route template
//! and status, and the `/metrics` route (admin token required: counts of runs and requests are
//! the operator's, not a consumer's).
//!
//! What is recorded, and where: `pond_http_requests_total` / `pond_http_request_duration_seconds`
//! (here), `pond_runs_submitted_total`, `pond_stages_claimed_total`, `pond_stage_duration_seconds`,
//! `pond_stages_finished_total`, `pond_lease_expiries_total`, `pond_attestations_total`,
//! `pond_log_bytes_total`, `pond_artifact_bytes_total` (the engine and the driver),
//! `pond_broker_tokens_total` (the credential broker), `pond_store_errors_total` (API errors from
//! the store). One recorder per process: servers embedded in one process share it.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process's recorder on first use; `None` if another recorder was installed first
/// (an embedding program's own).
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            // Durations from a millisecond to ten minutes.
            let buckets = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0];
            let handle = PrometheusBuilder::new().set_buckets(&buckets).ok()?.install_recorder().ok()?;
            describe();
            Some(handle)
        })
        .as_ref()
}

/// The help text of every series (Prometheus shows it; `promtool check metrics` requires it).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("pond_http_requests_total", "HTTP requests answered, by method, route template and status");
    describe_counter!(
        "pond_webhook_deliveries_total",
        "Webhook delivery attempts, by outcome (delivered, retrying, gave_up, failed redelivery)"
    );
    describe_histogram!(
        "pond_http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request, by route template"
    );
    describe_counter!("pond_runs_submitted_total", "Runs created by submits, by whether they are encrypted");
    describe_counter!(
        "pond_stages_claimed_total",
        "Stage attempts claimed, by placement (local: this node; pool: a worker)"
    );
    describe_counter!("pond_stages_finished_total", "Stage attempts ended, by executor and outcome");
    describe_histogram!("pond_stage_duration_seconds", Unit::Seconds, "Stage attempt durations, by executor");
    describe_counter!("pond_lease_expiries_total", "Stages claimed again after a holder stopped renewing its lease");
    describe_counter!("pond_attestations_total", "Pooled results checked, by whether their attestation verified");
    describe_counter!("pond_log_bytes_total", Unit::Bytes, "Output bytes stored, by placement");
    describe_counter!("pond_artifact_bytes_total", Unit::Bytes, "Artifact bytes stored, by placement");
    describe_counter!(
        "pond_broker_tokens_total",
        "Model tokens metered by the credential broker, by provider and kind"
    );
    describe_counter!(
        "pond_store_errors_total",
        "API answers that failed for a store error (unavailable, backend, corrupt)"
    );
    describe_counter!("pond_model_requests_total", "Model calls booked, by project and model");
    describe_counter!(
        "pond_model_input_tokens_total",
        "Model input tokens booked (cache included), by project and model"
    );
    describe_counter!("pond_model_output_tokens_total", "Model output tokens booked, by project and model");
    describe_counter!(
        "pond_model_cost_microusd_total",
        "Model spend booked at the registered prices, in millionths of a US dollar, by project and model"
    );
    describe_counter!(
        "pond_sandboxes_total",
        "OCI sandboxes ended, by outcome (exited, oom_killed, timed_out, sandbox_error)"
    );
    describe_counter!("pond_sandbox_egress_refusals_total", "Connections the sandboxes' egress proxy refused");
    describe_gauge!(
        "pond_stages_queued",
        "Queued stages of unfinished runs, by placement and whether they may start now"
    );
    describe_gauge!("pond_stages_running", "Stages whose attempt holds a lease, by placement");
    describe_gauge!("pond_orchestrator_waiting_workers", "Workers holding a claim long poll on this orchestrator");
    describe_counter!("pond_orchestrator_jobs_handed_total", "Jobs this orchestrator handed to its workers");
    describe_counter!(
        "pond_worker_jobs_total",
        "Jobs this worker ended, by how (succeeded, failed, cancelled, handed_back, lost)"
    );
}

/// Serves `GET /metrics` without a token on `addr`, for an orchestrator or a worker (which have
/// no admin token to check): bind it where only the scraper reaches (loopback, a private
/// network). Returns the bound address.
pub async fn serve_unauthenticated(addr: std::net::SocketAddr) -> std::io::Result<std::net::SocketAddr> {
    let _ = handle();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            match handle() {
                Some(h) => {
                    h.run_upkeep();
                    ([("content-type", "text/plain; version=0.0.4")], h.render()).into_response()
                }
                None => (axum::http::StatusCode::NOT_FOUND, "this process records metrics elsewhere").into_response(),
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(bound)
}

/// Sets the queue-depth gauges from the store (at each scrape: every node reports the whole
/// store's figures, so a dashboard takes one node's or the max, not the sum).
async fn queue_depth(state: &AppState) -> Result<(), ApiError> {
    let counts = pond_core::store::Store::stage_counts(&*state.store, state.engine.clock().now()).await?;
    for pooled in [false, true] {
        let placement = if pooled { "pool" } else { "local" };
        let sum = |running: bool, ready: bool| {
            counts
                .iter()
                .filter(|c| c.pooled == pooled && (c.state == pond_core::run::StageState::Running) == running)
                .filter(|c| running || c.ready == ready)
                .map(|c| c.count)
                .sum::<u64>() as f64
        };
        metrics::gauge!("pond_stages_queued", "placement" => placement, "ready" => "true").set(sum(false, true));
        metrics::gauge!("pond_stages_queued", "placement" => placement, "ready" => "false").set(sum(false, false));
        metrics::gauge!("pond_stages_running", "placement" => placement).set(sum(true, false));
    }
    Ok(())
}

/// Counts and times every request by method, route template (never the raw path: ids would
/// make a series each) and status.
pub async fn count_requests(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("pond_http_requests_total", "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("pond_http_request_duration_seconds", "route" => route).record(started.elapsed().as_secs_f64());
    response
}

/// The header that carries a request's id, both ways.
pub const REQUEST_ID: &str = "x-request-id";

/// The access log and request ids, around everything the server answers (unrouted requests and
/// preflights included): a request keeps the `x-request-id` it came with (1 to 64 letters,
/// digits, `-`, `_`, `.`) or gets a new one; the answer carries it back; one `pond_access`
/// line per request (at `info`) says method, path (no query), status, duration and the id.
pub async fn access_log(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let given = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
        .map(str::to_string);
    let id = given.unwrap_or_else(|| {
        use rand::RngCore as _;
        let mut raw = [0u8; 8];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        hex::encode(raw)
    });
    if let Ok(value) = axum::http::HeaderValue::from_str(&id) {
        request.headers_mut().insert(REQUEST_ID, value);
    }
    let method = request.method().to_string();
    let path: String = request.uri().path().chars().take(256).collect();
    let mut response = next.run(request).await;
    if let Ok(value) = axum::http::HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    tracing::info!(
        target: "pond_access",
        method = %method,
        path = %path,
        status = response.status().as_u16(),
        duration_ms = (started.elapsed().as_secs_f64() * 1000.0 * 100.0).round() / 100.0,
        request_id = %id,
        "{method} {path} {}",
        response.status().as_u16()
    );
    response
}

/// `GET /metrics`: the Prometheus text format, for an admin token.
#[utoipa::path(get, path = "/metrics", tag = "meta", security(("bearer" = [])),
    responses(
        (status = 200, description = "Prometheus text exposition (admin token).", content_type = "text/plain", body = String),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 404, response = crate::openapi::NotFound),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
pub async fn render(State(state): State<AppState>, who: Principal) -> Result<Response, ApiError> {
    if who.visible_projects().is_some() {
        return Err(ApiError::Forbidden("metrics are for an admin token".into()));
    }
    queue_depth(&state).await?;
    let Some(handle) = handle() else {
        return Err(ApiError::NotFound("this process records metrics elsewhere (its own recorder)".into()));
    };
    handle.run_upkeep();
    Ok(([("content-type", "text/plain; version=0.0.4")], handle.render()).into_response())
}

/// Counts one webhook delivery attempt by how it ended.
pub fn webhook_delivery(outcome: &str) {
    metrics::counter!("pond_webhook_deliveries_total", "outcome" => outcome.to_string()).increment(1);
}
