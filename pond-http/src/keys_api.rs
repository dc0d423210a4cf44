//! What a reader needs to check what pond serves without trusting it further: the control
//! plane's signing keys (`GET /v1/keys`), for one run the keys of every node and worker that ran
//! an attempt of it (`GET /v1/runs/{id}/keys`), and the transparency log: signed tree heads
//! (`GET /v1/log/tree-head`), consistency proofs (`GET /v1/log/consistency`) and a run's leaves
//! with their audit paths (`GET /v1/runs/{id}/log`).

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;

/// The public keys that sign what pond serves.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct KeysDocument {
    /// The control plane's own key (base64 Ed25519, the same on every node, from the server
    /// key): it endorses node and worker keys and signs tree heads.
    pub control_plane_key: String,
    /// Control-plane nodes' log-signing keys (they sign the key headers of local stages' logs),
    /// each with the control plane's endorsement.
    pub control_plane: Vec<pond_core::engine::LogSigner>,
}

/// A worker's pinned public keys.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct WorkerKeys {
    /// Its id (the owner of the attempts it ran).
    pub id: String,
    /// Its pool.
    pub pool: String,
    /// Ed25519 (base64): signs its results and its log key headers.
    pub signing_key: Option<String>,
    /// X25519 (base64): what its inputs and credentials are sealed to.
    pub sealing_key: Option<String>,
    /// `SHA256:…` of the signing key.
    pub signing_fingerprint: Option<String>,
    /// The control plane's endorsement of the signing key (`kind` `worker`, the worker's id).
    pub endorsement: Option<String>,
}

/// Who signed a run's streams and results.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct RunKeys {
    /// Nodes that ran local attempts of the run.
    pub control_plane: Vec<pond_core::engine::LogSigner>,
    /// Workers that ran pooled attempts of the run.
    pub workers: Vec<WorkerKeys>,
}

/// A consistency proof between two tree sizes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ConsistencyProof {
    /// The older tree's size.
    pub first: u64,
    /// The newer tree's size.
    pub second: u64,
    /// Base64 hashes (RFC 9162 §2.1.4).
    pub proof: Vec<String>,
}

/// A run's leaves in the tree of `tree_size` leaves.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct RunLog {
    /// The size of the tree the audit paths lead to.
    pub tree_size: u64,
    /// The run's leaves, in log order.
    pub entries: Vec<pond_core::transparency::LoggedLeaf>,
}

/// `/v1/keys`, `/v1/runs/{id}/keys`, `/v1/log/…` and `/v1/runs/{id}/log`.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(keys))
        .routes(routes!(run_keys))
        .routes(routes!(tree_head))
        .routes(routes!(consistency))
        .routes(routes!(run_log))
}

#[utoipa::path(get, path = "/log/tree-head", summary = "The transparency log's signed tree head", tag = "verify", security(("bearer" = [])),
    responses(
        (status = 200, description = "The transparency log's signed tree head.", body = pond_core::transparency::TreeHead),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn tree_head(
    State(state): State<AppState>,
    _who: Principal,
) -> Result<Json<pond_core::transparency::TreeHead>, ApiError> {
    Ok(Json(state.engine.tree_head().await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsistencyQuery {
    first: String,
    second: String,
}

fn size(field: &str, text: &str) -> Result<u64, ApiError> {
    text.parse().map_err(|_| ApiError::invalid(format!("query.{field}"), format!("`{text}` is not a tree size")))
}

#[utoipa::path(get, path = "/log/consistency", summary = "A consistency proof of the transparency log", tag = "verify", security(("bearer" = [])),
    params(
        ("first" = u64, Query, description = "The older tree's size."),
        ("second" = u64, Query, description = "The newer tree's size."),
    ),
    responses(
        (status = 200, description = "A consistency proof between two tree sizes (RFC 9162).", body = ConsistencyProof),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn consistency(
    State(state): State<AppState>,
    _who: Principal,
    uri: axum::http::Uri,
) -> Result<Json<ConsistencyProof>, ApiError> {
    let q: ConsistencyQuery = crate::boundary::parse_query(uri.query())?;
    let (first, second) = (size("first", &q.first)?, size("second", &q.second)?);
    let proof = state.engine.log_consistency(first, second).await?;
    Ok(Json(ConsistencyProof { first, second, proof: pond_core::transparency::encode_hashes(&proof) }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunLogQuery {
    tree_size: String,
}

#[utoipa::path(get, path = "/runs/{id}/log", summary = "A run's transparency-log leaves with audit paths", tag = "verify", security(("bearer" = [])),
    params(("id" = String, Path, description = "The run's id."),
        ("tree_size" = u64, Query, description = "The size of the tree the audit paths lead to.")),
    responses(
        (status = 200, description = "The run's leaves with their audit paths.", body = RunLog),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn run_log(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    uri: axum::http::Uri,
) -> Result<Json<RunLog>, ApiError> {
    let run = crate::api::visible_run(&state, &who, &id).await?;
    let q: RunLogQuery = crate::boundary::parse_query(uri.query())?;
    let tree_size = size("tree_size", &q.tree_size)?;
    let entries = state.engine.run_log(run.run.id, tree_size).await?;
    Ok(Json(RunLog { tree_size, entries }))
}

#[utoipa::path(get, path = "/keys", summary = "The control plane's signing keys", tag = "verify", security(("bearer" = [])),
    responses(
        (status = 200, description = "The control plane's signing keys.", body = KeysDocument),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn keys(State(state): State<AppState>, _who: Principal) -> Result<Json<KeysDocument>, ApiError> {
    Ok(Json(KeysDocument {
        control_plane_key: base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            state.engine.control_plane_key(),
        ),
        control_plane: state.engine.log_signers().await?,
    }))
}

#[utoipa::path(get, path = "/runs/{id}/keys", summary = "Who signed a run's output", tag = "verify", security(("bearer" = [])),
    params(("id" = String, Path, description = "The run's id.")),
    responses(
        (status = 200, description = "The keys of every node and worker that ran an attempt of the run.", body = RunKeys),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn run_keys(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<RunKeys>, ApiError> {
    let run = crate::api::visible_run(&state, &who, &id).await?;
    let mut owners: Vec<&str> = run.attempts.iter().map(|a| a.owner.as_str()).collect();
    owners.sort_unstable();
    owners.dedup();
    let nodes = state.engine.log_signers().await?;
    let mut keys = RunKeys { control_plane: Vec::new(), workers: Vec::new() };
    for owner in owners {
        if let Some(node) = nodes.iter().find(|n| n.node_id == owner) {
            keys.control_plane.push(node.clone());
        } else if let Some(member) = state.pools.member(owner).await? {
            keys.workers.push(WorkerKeys {
                id: member.id.clone(),
                pool: member.pool.clone(),
                signing_fingerprint: member.signing_key_bytes().map(|k| pond_core::attest::fingerprint(&k)),
                signing_key: member.signing_key,
                sealing_key: member.sealing_key,
                endorsement: member.endorsement,
            });
        }
    }
    Ok(Json(keys))
}
