//! The keys a reader needs to check what pond serves without trusting it further: the
//! control plane's log-signing keys (`GET /v1/keys`) and, for one run, the keys of every node and
//! worker that ran an attempt of it (`GET /v1/runs/{id}/keys`).

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;

/// The public keys that sign what pond serves.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeysDocument {
    /// Control-plane nodes' log-signing keys (they sign the key headers of local stages' logs).
    pub control_plane: Vec<pond_core::engine::LogSigner>,
}

/// A worker's pinned public keys.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
}

/// Who signed a run's streams and results.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunKeys {
    /// Nodes that ran local attempts of the run.
    pub control_plane: Vec<pond_core::engine::LogSigner>,
    /// Workers that ran pooled attempts of the run.
    pub workers: Vec<WorkerKeys>,
}

/// `/v1/keys` and `/v1/runs/{id}/keys`.
pub fn routes() -> Router<AppState> {
    Router::new().route("/keys", get(keys)).route("/runs/{id}/keys", get(run_keys))
}

async fn keys(State(state): State<AppState>, _who: Principal) -> Result<Json<KeysDocument>, ApiError> {
    Ok(Json(KeysDocument { control_plane: state.engine.log_signers().await? }))
}

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
            });
        }
    }
    Ok(Json(keys))
}
