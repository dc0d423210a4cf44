//! The admin agent registry routes: `/v1/admin/models`, `/v1/admin/harnesses`, the presets,
//! creating a harness from a preset, and dry runs.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use pond_core::agents::{Harness, Model, RegistryError};
use serde::{Deserialize, Serialize};

use crate::api::ApiJson;
use crate::auth::Principal;
use crate::boundary::ApiPath as Path;
use crate::error::ApiError;
use crate::state::AppState;

/// The registry routes (admin only).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/models", post(put_model).get(list_models))
        .route("/admin/models/{key}", delete(remove_model))
        .route("/admin/harnesses", post(put_harness).get(list_harnesses))
        .route("/admin/harnesses/{key}", delete(remove_harness))
        .route("/admin/harness-presets", get(presets))
        .route("/admin/harnesses/from-preset", post(from_preset))
        .route("/admin/harnesses/{key}/dry-run", post(dry_run))
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid(f) => ApiError::Invalid(f),
            RegistryError::Unknown { .. } => ApiError::NotFound(e.to_string()),
            RegistryError::Store(s) => s.into(),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// A harness as stored, with what the lint found.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HarnessSaved {
    /// The harness.
    pub harness: Harness,
    /// The lint's warnings (the harness was saved).
    pub warnings: Vec<String>,
}

/// `GET /v1/admin/models`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelList {
    /// Models.
    pub models: Vec<Model>,
}

/// `GET /v1/admin/harnesses` and `/v1/admin/harness-presets`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HarnessList {
    /// Harnesses.
    pub harnesses: Vec<Harness>,
}

/// `POST /v1/admin/harnesses/from-preset`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FromPreset {
    /// `codex` or `claude`.
    pub preset: String,
    /// Key to save it under (default: the preset's).
    #[serde(default)]
    pub key: Option<String>,
}

/// `POST /v1/admin/harnesses/{key}/dry-run`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DryRun {
    /// A registered model.
    #[serde(default)]
    pub model_ref: Option<String>,
    /// The prompt.
    #[serde(default)]
    pub prompt: Option<String>,
}

/// What a task would exec.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DryRunResult {
    /// The exact argv.
    pub argv: Vec<String>,
    /// The names of the environment variables it sets (never their values).
    pub env: Vec<String>,
    /// What it reads on stdin (the prompt, for the presets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// The lint's warnings.
    pub warnings: Vec<String>,
}

async fn put_model(
    State(state): State<AppState>,
    who: Principal,
    ApiJson(model): ApiJson<Model>,
) -> Result<(StatusCode, Json<Model>), ApiError> {
    who.require_admin()?;
    if !state.engine.credentials().exists(&model.credential_name).await? {
        return Err(ApiError::invalid(
            "credential_name",
            format!("no credential `{}` is registered (`pond admin credentials add`)", model.credential_name),
        ));
    }
    state.engine.registry().put_model(&model).await?;
    Ok((StatusCode::CREATED, Json(model)))
}

async fn list_models(State(state): State<AppState>, who: Principal) -> Result<Json<ModelList>, ApiError> {
    who.require_admin()?;
    Ok(Json(ModelList { models: state.engine.registry().models().await? }))
}

async fn remove_model(
    State(state): State<AppState>,
    who: Principal,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    who.require_admin()?;
    match state.engine.registry().remove("model", &key).await? {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(ApiError::NotFound(format!("no model `{key}`"))),
    }
}

async fn put_harness(
    State(state): State<AppState>,
    who: Principal,
    ApiJson(harness): ApiJson<Harness>,
) -> Result<(StatusCode, Json<HarnessSaved>), ApiError> {
    who.require_admin()?;
    let warnings = state.engine.registry().put_harness(&harness).await?;
    Ok((StatusCode::CREATED, Json(HarnessSaved { harness, warnings })))
}

async fn list_harnesses(State(state): State<AppState>, who: Principal) -> Result<Json<HarnessList>, ApiError> {
    who.require_admin()?;
    Ok(Json(HarnessList { harnesses: state.engine.registry().harnesses().await? }))
}

async fn remove_harness(
    State(state): State<AppState>,
    who: Principal,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    who.require_admin()?;
    match state.engine.registry().remove("harness", &key).await? {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(ApiError::NotFound(format!("no harness `{key}`"))),
    }
}

async fn presets(who: Principal) -> Result<Json<HarnessList>, ApiError> {
    who.require_admin()?;
    Ok(Json(HarnessList { harnesses: pond_core::agents::presets() }))
}

async fn from_preset(
    State(state): State<AppState>,
    who: Principal,
    ApiJson(req): ApiJson<FromPreset>,
) -> Result<(StatusCode, Json<HarnessSaved>), ApiError> {
    who.require_admin()?;
    let mut harness = pond_core::agents::presets()
        .into_iter()
        .find(|p| p.key == req.preset)
        .ok_or_else(|| ApiError::invalid("preset", format!("`{}` is not a preset: `codex` or `claude`", req.preset)))?;
    if let Some(key) = req.key {
        harness.key = key;
    }
    let warnings = state.engine.registry().put_harness(&harness).await?;
    Ok((StatusCode::CREATED, Json(HarnessSaved { harness, warnings })))
}

async fn dry_run(
    State(state): State<AppState>,
    who: Principal,
    Path(key): Path<String>,
    ApiJson(req): ApiJson<DryRun>,
) -> Result<Json<DryRunResult>, ApiError> {
    who.require_admin()?;
    let prompt = req.prompt.unwrap_or_else(|| "<prompt>".into());
    let run = state.engine.registry().dry_run(&key, req.model_ref.as_deref(), &prompt).await?;
    Ok(Json(DryRunResult { argv: run.argv, env: run.env, stdin: run.stdin, warnings: run.warnings }))
}
