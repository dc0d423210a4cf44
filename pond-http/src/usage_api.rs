//! What agent stages spent on model calls and the budgets that hold them: a project's spend per
//! day and model (`GET /v1/usage?project=`), a run's per stage attempt (`GET /v1/runs/{id}/usage`),
//! and projects' monthly budgets (`/v1/admin/budgets`, admin).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::{Json, Router};
use pond_core::definition::Budget;
use pond_core::usage::{day_of, Ledger, RunUsage, Spend, UsageRow};
use serde::{Deserialize, Serialize};

use crate::auth::Principal;
use crate::boundary::{ApiJson, ApiPath as Path};
use crate::error::ApiError;
use crate::state::AppState;

/// `GET /v1/usage` answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
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

/// `/v1/usage`, `/v1/runs/{id}/usage`, `/v1/admin/budgets…`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/usage", get(project_usage))
        .route("/runs/{id}/usage", get(run_usage))
        .route("/admin/budgets", get(list_budgets))
        .route("/admin/budgets/{project}", put(set_budget).delete(clear_budget))
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

async fn run_usage(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<RunUsage>, ApiError> {
    let run = crate::api::visible_run(&state, &who, &id).await?;
    Ok(Json(Ledger::new(state.store_dyn()).run(run.run.id).await?))
}

async fn list_budgets(State(state): State<AppState>, who: Principal) -> Result<Json<Vec<ProjectBudget>>, ApiError> {
    who.require_admin()?;
    let budgets = Ledger::new(state.store_dyn()).budgets().await?;
    Ok(Json(budgets.into_iter().map(|(project, budget)| ProjectBudget { project, budget }).collect()))
}

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

async fn clear_budget(
    State(state): State<AppState>,
    who: Principal,
    Path(project): Path<String>,
) -> Result<StatusCode, ApiError> {
    who.require_admin()?;
    Ledger::new(state.store_dyn()).set_budget(&project, None).await?;
    Ok(StatusCode::NO_CONTENT)
}
