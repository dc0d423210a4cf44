//! The admin agent registry routes: `/v1/admin/models`, `/v1/admin/harnesses`, the presets,
//! creating a harness from a preset, and dry runs.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use pond_core::agents::{Harness, Model, RegistryError};
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::ApiJson;
use crate::auth::Principal;
use crate::boundary::ApiPath as Path;
use crate::error::ApiError;
use crate::state::AppState;

/// The registry routes (admin only).
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(put_model, list_models))
        .routes(routes!(remove_model))
        .routes(routes!(put_harness, list_harnesses))
        .routes(routes!(remove_harness))
        .routes(routes!(presets))
        .routes(routes!(from_preset))
        .routes(routes!(dry_run))
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
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HarnessSaved {
    /// The harness.
    pub harness: Harness,
    /// The lint's warnings (the harness was saved).
    pub warnings: Vec<String>,
}

/// `GET /v1/admin/models`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelList {
    /// Models.
    pub models: Vec<Model>,
}

/// `GET /v1/admin/harnesses` and `/v1/admin/harness-presets`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HarnessList {
    /// Harnesses.
    pub harnesses: Vec<Harness>,
}

/// `POST /v1/admin/harnesses/from-preset`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FromPreset {
    /// `codex` or `claude`.
    pub preset: String,
    /// Key to save it under (default: the preset's).
    #[serde(default)]
    pub key: Option<String>,
}

/// `POST /v1/admin/harnesses/{key}/dry-run`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
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

#[utoipa::path(post, path = "/admin/models", summary = "Register a model", tag = "agents", security(("bearer" = [])),
    request_body(content = Model, content_type = "application/json"),
    responses(
        (status = 201, description = "Saved (a model of the same key is replaced).", body = Model,
            links(
                ("remove" = (operation_id = "remove_model", parameters(("key" = "$response.body#/key")), description = "Remove it.")),
            )),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
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

#[utoipa::path(get, path = "/admin/models", summary = "List models", tag = "agents", security(("bearer" = [])),
    responses(
        (status = 200, description = "The registered models.", body = ModelList),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn list_models(State(state): State<AppState>, who: Principal) -> Result<Json<ModelList>, ApiError> {
    who.require_admin()?;
    Ok(Json(ModelList { models: state.engine.registry().models().await? }))
}

#[utoipa::path(delete, path = "/admin/models/{key}", summary = "Remove a model", tag = "agents", security(("bearer" = [])),
    params(("key" = String, Path, description = "The model's key.")),
    responses(
        (status = 204, description = "Removed."),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 404, response = crate::openapi::NotFound),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
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

#[utoipa::path(post, path = "/admin/harnesses", summary = "Register a harness", tag = "agents", security(("bearer" = [])),
    request_body(content = Harness, content_type = "application/json"),
    responses(
        (status = 201, description = "Saved, with what the template lint found.", body = HarnessSaved,
            links(
                ("dry_run" = (operation_id = "dry_run", parameters(("key" = "$response.body#/harness/key")), description = "What a task would exec.")),
                ("remove" = (operation_id = "remove_harness", parameters(("key" = "$response.body#/harness/key")), description = "Remove it.")),
            )),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn put_harness(
    State(state): State<AppState>,
    who: Principal,
    ApiJson(harness): ApiJson<Harness>,
) -> Result<(StatusCode, Json<HarnessSaved>), ApiError> {
    who.require_admin()?;
    let warnings = state.engine.registry().put_harness(&harness).await?;
    Ok((StatusCode::CREATED, Json(HarnessSaved { harness, warnings })))
}

#[utoipa::path(get, path = "/admin/harnesses", summary = "List harnesses", tag = "agents", security(("bearer" = [])),
    responses(
        (status = 200, description = "The registered harnesses.", body = HarnessList),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn list_harnesses(State(state): State<AppState>, who: Principal) -> Result<Json<HarnessList>, ApiError> {
    who.require_admin()?;
    Ok(Json(HarnessList { harnesses: state.engine.registry().harnesses().await? }))
}

#[utoipa::path(delete, path = "/admin/harnesses/{key}", summary = "Remove a harness", tag = "agents", security(("bearer" = [])),
    params(("key" = String, Path, description = "The harness's key.")),
    responses(
        (status = 204, description = "Removed."),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 404, response = crate::openapi::NotFound),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
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

#[utoipa::path(get, path = "/admin/harness-presets", summary = "List the harness presets", tag = "agents", security(("bearer" = [])),
    responses(
        (status = 200, description = "The built-in harness presets (`codex`, `claude`).", body = HarnessList),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn presets(who: Principal) -> Result<Json<HarnessList>, ApiError> {
    who.require_admin()?;
    Ok(Json(HarnessList { harnesses: pond_core::agents::presets() }))
}

#[utoipa::path(post, path = "/admin/harnesses/from-preset", summary = "Register a harness from a preset", tag = "agents", security(("bearer" = [])),
    request_body(content = FromPreset, content_type = "application/json"),
    responses(
        (status = 201, description = "Saved, with what the template lint found.", body = HarnessSaved,
            links(
                ("dry_run" = (operation_id = "dry_run", parameters(("key" = "$response.body#/harness/key")), description = "What a task would exec.")),
                ("remove" = (operation_id = "remove_harness", parameters(("key" = "$response.body#/harness/key")), description = "Remove it.")),
            )),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
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

#[utoipa::path(post, path = "/admin/harnesses/{key}/dry-run", summary = "Show what a harness would exec", tag = "agents", security(("bearer" = [])),
    params(("key" = String, Path, description = "The harness's key.")),
    request_body(content = DryRun, content_type = "application/json"),
    responses(
        (status = 200, description = "What a task would exec (no secret value).", body = DryRunResult),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 404, response = crate::openapi::NotFound),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
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
