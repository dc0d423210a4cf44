//! `pond usage` (what agent stages spent on model calls) and `pond admin budgets` (projects'
//! monthly budgets).

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use pond_core::usage::Spend;
use pond_http::client::Client;

/// `pond usage`.
#[derive(Args)]
pub struct UsageArgs {
    /// The project (default: the context's project).
    #[arg(long)]
    project: Option<String>,
    /// First day (YYYY-MM-DD, UTC); default the first of this month.
    #[arg(long)]
    from: Option<String>,
    /// Last day (YYYY-MM-DD, UTC); default today.
    #[arg(long)]
    to: Option<String>,
    /// One run's spend per stage attempt instead of a project's.
    #[arg(long, conflicts_with_all = ["project", "from", "to"])]
    run: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `pond admin budgets`.
#[derive(Subcommand)]
pub enum BudgetsCommand {
    /// Set a project's monthly budget (calendar month, UTC): its agent stages' model calls stop
    /// with `budget exhausted (project …)` once it is spent.
    Set {
        /// The project.
        project: String,
        /// US dollars, at the models' registered prices.
        #[arg(long)]
        usd: Option<f64>,
        /// Tokens, input (cache included) and output together.
        #[arg(long)]
        tokens: Option<u64>,
    },
    /// Remove a project's budget.
    Clear {
        /// The project.
        project: String,
    },
    /// Every project's budget.
    List,
}

fn spend_line(spend: &Spend) -> String {
    format!("{:>8} {:>12} {:>12}  ${:.6}", spend.requests, spend.input_tokens, spend.output_tokens, spend.cost_usd)
}

fn budget_text(budget: &pond_core::definition::Budget) -> String {
    let mut parts = Vec::new();
    if let Some(usd) = budget.usd {
        parts.push(format!("${usd:.2}"));
    }
    if let Some(tokens) = budget.tokens {
        parts.push(format!("{tokens} tokens"));
    }
    parts.join(" and ")
}

/// Prints a project's or a run's spend.
pub fn usage(client: &Client, default_project: Option<String>, args: UsageArgs) -> Result<i32> {
    if let Some(run) = &args.run {
        let usage = client.run_usage(run)?;
        if args.json {
            say!("{}", serde_json::to_string_pretty(&usage)?);
            return Ok(0);
        }
        say!("{:<32} {:>8} {:>12} {:>12}  COST", "STAGE#ATTEMPT", "REQUESTS", "INPUT", "OUTPUT");
        for (attempt, spend) in &usage.attempts {
            say!("{attempt:<32} {}", spend_line(spend));
        }
        say!("{:<32} {}", "total", spend_line(&usage.total));
        return Ok(0);
    }
    let Some(project) = args.project.or(default_project) else {
        bail!("no project: pass --project or set one in the context (pond context add … --project)");
    };
    let usage = client.usage(&project, args.from.as_deref(), args.to.as_deref())?;
    if args.json {
        say!("{}", serde_json::to_string_pretty(&usage)?);
        return Ok(0);
    }
    say!("project {}, {} to {}", usage.project, usage.from, usage.to);
    say!("{:<10}  {:<20} {:>8} {:>12} {:>12}  COST", "DAY", "MODEL", "REQUESTS", "INPUT", "OUTPUT");
    for row in &usage.rows {
        say!("{:<10}  {:<20} {}", row.day, row.model, spend_line(&row.spend));
    }
    say!("{:<10}  {:<20} {}", "total", "", spend_line(&usage.total));
    let month = &usage.month_spent;
    let budget = usage.budget.as_ref().map(|b| format!(" of a budget of {}", budget_text(b))).unwrap_or_default();
    say!("{}: {} tokens, ${:.6}{budget}", usage.month, month.tokens(), month.cost_usd);
    Ok(0)
}

/// Sets, clears or lists projects' budgets.
pub fn budgets(client: &Client, command: BudgetsCommand) -> Result<i32> {
    match command {
        BudgetsCommand::Set { project, usd, tokens } => {
            let set = client.set_budget(&project, &pond_core::definition::Budget { usd, tokens })?;
            say!("project {}: {} a month", set.project, budget_text(&set.budget));
        }
        BudgetsCommand::Clear { project } => {
            client.clear_budget(&project)?;
            say!("project {project}: no budget");
        }
        BudgetsCommand::List => {
            for b in client.budgets()? {
                say!("{:<24} {} a month", b.project, budget_text(&b.budget));
            }
        }
    }
    Ok(0)
}
