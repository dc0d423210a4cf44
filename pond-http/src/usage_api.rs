//! What agent stages spent on model calls and the budgets that hold them: a project's spend per
//! day and model (`GET /v1/usage?project=`), a run's per stage attempt (`GET /v1/runs/{id}/usage`),
//! and projects' monthly budgets (`/v1/admin/budgets`, admin).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use pond_core::definition::Budget;
use pond_core::usage::{day_of, Ledger, RunUsage, Spend, UsageRow};
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Principal;
use crate::boundary::{ApiJson, ApiPath as Path};
use crate::error::ApiError;
use crate::state::AppState;

/// `GET /v1/usage` answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ProjectUsage {
    /// The project.
    pub project: String,
    /// First day counted (`YYYY-MM-DD`, UTC).
    pub from: String,
    /// Last day counted.
    pub to: String,
    /// Per day and model, by day.
    pub rows: Vec<UsageRow>,
    /// The rows together.
    pub total: Spend,
    /// The current calendar month (`YYYY-MM`).
    pub month: String,
    /// Spent this month.
    pub month_spent: Spend,
    /// The project's monthly budget, if it has one.
    pub budget: Option<Budget>,
}

/// One project's budget in `GET /v1/admin/budgets`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProjectBudget {
    /// The project.
    pub project: String,
    /// Its monthly limits.
    #[serde(flatten)]
    pub budget: Budget,
}

// The budget's fields sit beside `project` (flattened): its schema is the budget's with
// `project` added, rather than an `allOf` whose budget half would refuse `project`.
impl utoipa::PartialSchema for ProjectBudget {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let project = utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some("The project."));
        crate::openapi::with_property::<Budget>("project", project.into(), "One project's monthly budget.")
    }
}

impl utoipa::ToSchema for ProjectBudget {
    fn schemas(schemas: &mut Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)>) {
        <Budget as utoipa::ToSchema>::schemas(schemas);
    }
}

/// `/v1/usage`, `/v1/runs/{id}/usage`, `/v1/admin/budgets…`.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(project_usage))
        .routes(routes!(run_usage))
        .routes(routes!(list_budgets))
        .routes(routes!(set_budget, clear_budget))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    project: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

fn day(field: &str, text: &str) -> Result<String, ApiError> {
    let ok = text.len() == 10
        && pond_core::time::Timestamp::parse_rfc3339(&format!("{text}T00:00:00Z")).is_some_and(|t| day_of(t) == text);
    if ok {
        Ok(text.to_string())
    } else {
        Err(ApiError::invalid(format!("query.{field}"), format!("`{text}` is not a day (YYYY-MM-DD)")))
    }
}

#[utoipa::path(get, path = "/usage", summary = "A project's model spend", tag = "usage", security(("bearer" = [])),
    params(
        ("project" = String, Query, description = "The project."),
        ("from" = Option<String>, Query, format = Date, description = "First day (`YYYY-MM-DD`, UTC; default: the month's first)."),
        ("to" = Option<String>, Query, format = Date, description = "Last day (default: today)."),
    ),
    responses(
        (status = 200, description = "The project's spend per day and model, the month's and its budget.", body = ProjectUsage),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn project_usage(
    State(state): State<AppState>,
    who: Principal,
    uri: axum::http::Uri,
) -> Result<Json<ProjectUsage>, ApiError> {
    let q: UsageQuery = crate::boundary::parse_query(uri.query())?;
    let project = q.project.ok_or_else(|| ApiError::invalid("query.project", "is required"))?;
    if !who.can_use(&project) {
        return Err(ApiError::Forbidden(format!("this token may not use project `{project}`")));
    }
    let now = state.engine.clock().now();
    let today = day_of(now);
    let month: String = today.chars().take(7).collect();
    let from = match &q.from {
        Some(text) => day("from", text)?,
        None => format!("{month}-01"),
    };
    let to = match &q.to {
        Some(text) => day("to", text)?,
        None => today,
    };
    if from > to {
        return Err(ApiError::invalid("query.from", format!("{from} is after `to` ({to})")));
    }
    let ledger = Ledger::new(state.store_dyn());
    let rows = ledger.rows(&project, &from, &to).await?;
    let mut total = Spend::default();
    for row in &rows {
        total.add(&row.spend);
    }
    let month_spent = ledger.month(&project, now).await?;
    let budget = ledger.budget(&project).await?;
    Ok(Json(ProjectUsage { project, from, to, rows, total, month, month_spent, budget }))
}

#[utoipa::path(get, path = "/runs/{id}/usage", summary = "What a run's agent stages spent", tag = "usage", security(("bearer" = [])),
    params(("id" = String, Path, description = "The run's id.")),
    responses(
        (status = 200, description = "What the run's agent stages spent, per attempt.", body = RunUsage),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn run_usage(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<RunUsage>, ApiError> {
    let run = crate::api::visible_run(&state, &who, &id).await?;
    Ok(Json(Ledger::new(state.store_dyn()).run(run.run.id).await?))
}

#[utoipa::path(get, path = "/admin/budgets", summary = "List projects' monthly budgets", tag = "usage", security(("bearer" = [])),
    responses(
        (status = 200, description = "Every project's monthly budget.", body = Vec<ProjectBudget>),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn list_budgets(State(state): State<AppState>, who: Principal) -> Result<Json<Vec<ProjectBudget>>, ApiError> {
    who.require_admin()?;
    let budgets = Ledger::new(state.store_dyn()).budgets().await?;
    Ok(Json(budgets.into_iter().map(|(project, budget)| ProjectBudget { project, budget }).collect()))
}

#[utoipa::path(put, path = "/admin/budgets/{project}", summary = "Set a project's monthly budget", tag = "usage", security(("bearer" = [])),
    params(("project" = String, Path, description = "The project.")),
    request_body(content = Budget, content_type = "application/json"),
    responses(
        (status = 200, description = "The project's budget now.", body = ProjectBudget,
            links(
                ("clear" = (operation_id = "clear_budget", parameters(("project" = "$response.body#/project")), description = "Remove it.")),
            )),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn set_budget(
    State(state): State<AppState>,
    who: Principal,
    Path(project): Path<String>,
    ApiJson(budget): ApiJson<Budget>,
) -> Result<Json<ProjectBudget>, ApiError> {
    who.require_admin()?;
    if project.is_empty() || project.len() > 128 {
        return Err(ApiError::invalid("project", "must be 1 to 128 characters"));
    }
    budget.validate("budget").map_err(ApiError::Invalid)?;
    Ledger::new(state.store_dyn()).set_budget(&project, Some(budget)).await?;
    Ok(Json(ProjectBudget { project, budget }))
}

#[utoipa::path(delete, path = "/admin/budgets/{project}", summary = "Remove a project's budget", tag = "usage", security(("bearer" = [])),
    params(("project" = String, Path, description = "The project.")),
    responses(
        (status = 204, description = "The project has no budget now."),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn clear_budget(
    State(state): State<AppState>,
    who: Principal,
    Path(project): Path<String>,
) -> Result<StatusCode, ApiError> {
    who.require_admin()?;
    Ledger::new(state.store_dyn()).set_budget(&project, None).await?;
    Ok(StatusCode::NO_CONTENT)
}
