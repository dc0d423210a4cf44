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
    use metrics::{describe_counter, describe_histogram, Unit};
    describe_counter!("pond_http_requests_total", "HTTP requests answered, by method, route template and status");
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

/// `GET /metrics`: the Prometheus text format, for an admin token.
pub async fn render(State(_state): State<AppState>, who: Principal) -> Result<Response, ApiError> {
    if who.visible_projects().is_some() {
        return Err(ApiError::Forbidden("metrics are for an admin token".into()));
    }
    let Some(handle) = handle() else {
        return Err(ApiError::NotFound("this process records metrics elsewhere (its own recorder)".into()));
    };
    handle.run_upkeep();
    Ok(([("content-type", "text/plain; version=0.0.4")], handle.render()).into_response())
}
