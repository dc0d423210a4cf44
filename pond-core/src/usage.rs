//! What agent stages spend on model calls, booked per project, day and model and per run, and
//! the budgets it is held to: a run's own (`definition.budget`) and a project's per calendar
//! month (UTC). Brokers book each call as it ends and read what is left before the next one, so
//! a budget holds across a run's stages and a project's runs, on every node that shares the
//! store. Kept in the store's records (compare-and-swap), so every backend has it.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::agents::{BudgetCap, Model};
use crate::definition::Budget;
use crate::error::StoreError;
use crate::ids::RunId;
use crate::store::Store;
use crate::time::Timestamp;

/// The most a worker may report for one job (beyond it the report is refused, not booked).
pub const MAX_REPORTED_TOKENS: u64 = 10_000_000_000;
/// The most calls a worker may report for one job.
pub const MAX_REPORTED_REQUESTS: u64 = 1_000_000;

/// Tokens counted by a broker (what a worker reports at the end of a pooled job).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenUsage {
    /// Model calls relayed.
    pub requests: u64,
    /// Input tokens (cache reads and writes included).
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
}

/// Tokens and what they cost at the model's registered prices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Spend {
    /// Model calls.
    pub requests: u64,
    /// Input tokens (cache included).
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// US dollars (0 for a model without prices).
    pub cost_usd: f64,
}

impl Spend {
    /// `usage` priced at `model`'s prices.
    pub fn priced(usage: TokenUsage, model: Option<&Model>) -> Spend {
        let (input_price, output_price) = model
            .map(|m| (m.input_usd_per_mtok.unwrap_or(0.0), m.output_usd_per_mtok.unwrap_or(0.0)))
            .unwrap_or((0.0, 0.0));
        Spend {
            requests: usage.requests,
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
            cost_usd: usage.input_tokens as f64 / 1e6 * input_price + usage.output_tokens as f64 / 1e6 * output_price,
        }
    }

    /// Input and output tokens together.
    pub fn tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }

    /// Adds `other` (saturating: books never wrap).
    pub fn add(&mut self, other: &Spend) {
        self.requests = self.requests.saturating_add(other.requests);
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.cost_usd += other.cost_usd;
    }

    fn minus(&self, other: &Spend) -> Spend {
        Spend {
            requests: self.requests.saturating_sub(other.requests),
            input_tokens: self.input_tokens.saturating_sub(other.input_tokens),
            output_tokens: self.output_tokens.saturating_sub(other.output_tokens),
            cost_usd: (self.cost_usd - other.cost_usd).max(0.0),
        }
    }
}

/// One day's spend of a project on one model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageRow {
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    /// The model's registered key (`-` for calls without one).
    pub model: String,
    /// What was spent.
    #[serde(flatten)]
    pub spend: Spend,
}

/// A run's spend, per stage attempt (`<stage>#<attempt>`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunUsage {
    /// All of it.
    pub total: Spend,
    /// Per `<stage>#<attempt>`.
    pub attempts: BTreeMap<String, Spend>,
}

/// Record kind of a run's usage (key: the run id).
pub const RUN_KIND: &str = "run-usage";
const BUDGET_KIND: &str = "project-budget";
const CAS_TRIES: usize = 64;

fn project_kind(project: &str) -> String {
    format!("usage:{project}")
}

/// `YYYY-MM-DD` of a time (UTC).
pub fn day_of(at: Timestamp) -> String {
    at.to_rfc3339().chars().take(10).collect()
}

/// The books: spend and budgets over a store.
#[derive(Clone)]
pub struct Ledger {
    store: Arc<dyn Store>,
}

/// How a booking counts toward an attempt: added to what it has (a local broker's calls, one by
/// one) or as its whole total (a worker's report, which it may send again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Booking {
    /// Adds to the attempt's spend.
    Add,
    /// Is the attempt's whole spend.
    Total,
}

impl Ledger {
    /// The books kept in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Ledger { store }
    }

    /// Books `spend` of one stage attempt of a run of `project` on `model`, on `at`'s day. The
    /// run's record is the one of truth for an attempt (so a repeated [`Booking::Total`] books
    /// nothing twice); the project's day is moved by what the attempt's spend changed, which is
    /// returned.
    #[allow(clippy::too_many_arguments)]
    pub async fn book(
        &self,
        project: &str,
        run: RunId,
        stage: &str,
        attempt: u32,
        model: Option<&str>,
        spend: Spend,
        booking: Booking,
        at: Timestamp,
    ) -> Result<Spend, StoreError> {
        let run_key = run.to_string();
        let attempt_key = format!("{stage}#{attempt}");
        let mut delta = Spend::default();
        let mut booked = false;
        for _ in 0..CAS_TRIES {
            // The run's record holds each attempt's spend; its total is summed when read.
            let current = self.store.get_record(RUN_KIND, &run_key).await?;
            let mut attempts: BTreeMap<String, Spend> =
                current.as_deref().and_then(|b| serde_json::from_str(b).ok()).unwrap_or_default();
            let before = attempts.get(&attempt_key).copied().unwrap_or_default();
            let after = match booking {
                Booking::Add => {
                    let mut after = before;
                    after.add(&spend);
                    after
                }
                Booking::Total => spend,
            };
            delta = after.minus(&before);
            attempts.insert(attempt_key.clone(), after);
            let body = serde_json::to_string(&attempts).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if self.store.swap_record(RUN_KIND, &run_key, current.as_deref(), &body).await? {
                booked = true;
                break;
            }
        }
        if !booked {
            return Err(StoreError::Conflict(format!("the usage of run {run} kept changing; not booked")));
        }
        if delta == Spend::default() {
            return Ok(delta);
        }
        self.add_to_day(project, &format!("{}/{}", day_of(at), model.unwrap_or("-")), &delta).await?;
        Ok(delta)
    }

    async fn add_to_day(&self, project: &str, key: &str, delta: &Spend) -> Result<(), StoreError> {
        let kind = project_kind(project);
        for _ in 0..CAS_TRIES {
            let current = self.store.get_record(&kind, key).await?;
            let mut spend: Spend = current.as_deref().and_then(|b| serde_json::from_str(b).ok()).unwrap_or_default();
            spend.add(delta);
            let body = serde_json::to_string(&spend).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if self.store.swap_record(&kind, key, current.as_deref(), &body).await? {
                return Ok(());
            }
        }
        Err(StoreError::Conflict(format!("the usage of project {project} kept changing; not booked")))
    }

    /// A run's spend.
    pub async fn run(&self, run: RunId) -> Result<RunUsage, StoreError> {
        let body = self.store.get_record(RUN_KIND, &run.to_string()).await?;
        let attempts: BTreeMap<String, Spend> =
            body.as_deref().and_then(|b| serde_json::from_str(b).ok()).unwrap_or_default();
        let mut total = Spend::default();
        for spend in attempts.values() {
            total.add(spend);
        }
        Ok(RunUsage { total, attempts })
    }

    /// A project's spend per day and model with `from <= day <= to` (`YYYY-MM-DD`), by day.
    pub async fn rows(&self, project: &str, from: &str, to: &str) -> Result<Vec<UsageRow>, StoreError> {
        let mut rows: Vec<UsageRow> = self
            .store
            .list_records(&project_kind(project))
            .await?
            .into_iter()
            .filter_map(|(key, body)| {
                let (day, model) = key.split_once('/')?;
                let spend = serde_json::from_str(&body).ok()?;
                (day >= from && day <= to).then(|| UsageRow { day: day.into(), model: model.into(), spend })
            })
            .collect();
        rows.sort_by(|a, b| (&a.day, &a.model).cmp(&(&b.day, &b.model)));
        Ok(rows)
    }

    /// What a project spent in `at`'s calendar month (UTC).
    pub async fn month(&self, project: &str, at: Timestamp) -> Result<Spend, StoreError> {
        let month: String = day_of(at).chars().take(7).collect();
        let mut total = Spend::default();
        for row in self.rows(project, &format!("{month}-01"), &format!("{month}-31")).await? {
            total.add(&row.spend);
        }
        Ok(total)
    }

    /// A project's monthly budget, if it has one.
    pub async fn budget(&self, project: &str) -> Result<Option<Budget>, StoreError> {
        let body = self.store.get_record(BUDGET_KIND, project).await?;
        Ok(body
            .as_deref()
            .and_then(|b| serde_json::from_str(b).ok())
            .filter(|b: &Budget| b.usd.is_some() || b.tokens.is_some()))
    }

    /// Sets (or with `None`, removes) a project's monthly budget.
    pub async fn set_budget(&self, project: &str, budget: Option<Budget>) -> Result<(), StoreError> {
        let body =
            serde_json::to_string(&budget.unwrap_or_default()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.store.put_record(BUDGET_KIND, project, &body).await
    }

    /// Every project with a budget.
    pub async fn budgets(&self) -> Result<Vec<(String, Budget)>, StoreError> {
        Ok(self
            .store
            .list_records(BUDGET_KIND)
            .await?
            .into_iter()
            .filter_map(|(project, body)| Some((project, serde_json::from_str::<Budget>(&body).ok()?)))
            .filter(|(_, b)| b.usd.is_some() || b.tokens.is_some())
            .collect())
    }

    /// The budgets a run's model calls count against now — the run's own and its project's
    /// this month — each with what it has spent so far.
    pub async fn caps(
        &self,
        project: &str,
        run: RunId,
        run_budget: Option<Budget>,
        now: Timestamp,
    ) -> Result<Vec<BudgetCap>, StoreError> {
        let mut caps = Vec::new();
        if let Some(budget) = run_budget {
            caps.push(BudgetCap { scope: "run".into(), budget, spent: self.run(run).await?.total });
        }
        if let Some(budget) = self.budget(project).await? {
            let month: String = day_of(now).chars().take(7).collect();
            caps.push(BudgetCap {
                scope: format!("project {project} in {month}"),
                budget,
                spent: self.month(project, now).await?,
            });
        }
        Ok(caps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn books_never_wrap() {
        let mut spend = Spend { requests: u64::MAX, input_tokens: u64::MAX - 1, output_tokens: 5, cost_usd: 1.0 };
        spend.add(&Spend { requests: 1, input_tokens: 10, output_tokens: u64::MAX, cost_usd: 1.0 });
        assert_eq!((spend.requests, spend.input_tokens, spend.output_tokens), (u64::MAX, u64::MAX, u64::MAX));
        assert_eq!(spend.tokens(), u64::MAX);
        let cap = BudgetCap { scope: "run".into(), budget: Budget { usd: None, tokens: Some(10) }, spent: spend };
        assert!(cap.passed(u64::MAX, 0.0).is_some());
    }
}
