//! `pond events` (follow state changes) and `pond webhooks` (subscriptions, their deliveries).

use std::io::Write;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use pond_http::client::Client;
use pond_http::events_client::EventFilter;
use pond_http::webhooks::{CreateWebhook, WebhookView};

/// `pond events`.
#[derive(Args)]
pub struct EventsArgs {
    /// Only this project (default: every project the token may use).
    #[arg(long)]
    project: Option<String>,
    /// Only these event types (`run.succeeded`, `stage.*`, …; repeatable or comma-separated).
    #[arg(long = "type", value_name = "TYPE", value_delimiter = ',')]
    types: Vec<String>,
    /// Start after this event position (default: print what happens from now on; with
    /// --no-follow, from the first event).
    #[arg(long)]
    after: Option<i64>,
    /// Print the events stored so far and stop instead of following.
    #[arg(long)]
    no_follow: bool,
    /// Print JSON lines.
    #[arg(long)]
    json: bool,
}

/// `pond webhooks`.
#[derive(Subcommand)]
pub enum WebhooksCommand {
    /// Subscribe a URL to a project's events. Prints the signing secret (`whsec_…`) once:
    /// receivers check each delivery's `webhook-signature` with it (Standard Webhooks).
    Add {
        /// The receiver (`https://…`).
        url: String,
        /// The project (default: the context's project).
        #[arg(long)]
        project: Option<String>,
        /// Only these event types (repeatable or comma-separated; default all).
        #[arg(long = "type", value_name = "TYPE", value_delimiter = ',')]
        types: Vec<String>,
        /// A label.
        #[arg(long)]
        description: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The webhooks of the projects this token may use.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One webhook, with where its delivery stands.
    Show {
        /// The webhook id (`wh_…`).
        id: String,
    },
    /// Remove a webhook (nothing more is sent to it).
    Rm {
        /// The webhook id.
        id: String,
    },
    /// Make a new signing secret (printed once); the old one keeps signing beside it for the
    /// overlap, so receivers can switch without missing a delivery.
    RotateSecret {
        /// The webhook id.
        id: String,
        /// How long the old secret still signs (default 24h; at most 7 days).
        #[arg(long, value_parser = humantime::parse_duration)]
        overlap: Option<std::time::Duration>,
    },
    /// The last deliveries (newest first): event, attempt, HTTP status, outcome.
    Deliveries {
        /// The webhook id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send one event again (its `webhook-id` is unchanged, so receivers can tell).
    Redeliver {
        /// The webhook id.
        id: String,
        /// The event's position (`pond webhooks deliveries` shows it).
        #[arg(long)]
        event: i64,
    },
}

fn event_line(e: &pond_core::events::Event) -> String {
    let stage = match (&e.event.stage, e.event.attempt) {
        (Some(s), Some(a)) => format!(" {s}#{a}"),
        (Some(s), None) => format!(" {s}"),
        _ => String::new(),
    };
    format!("{:>8} {} {:<16} {}{stage}", e.seq, e.event.at, e.event.kind, e.event.run_id)
}

/// Prints events: a page, or followed until interrupted.
pub fn events(client: &Client, args: EventsArgs) -> Result<i32> {
    let filter = EventFilter { project: args.project, types: args.types };
    let mut out = std::io::stdout().lock();
    let mut print = |e: &pond_core::events::Event| -> bool {
        let line = if args.json { serde_json::to_string(e).unwrap_or_default() } else { event_line(e) };
        // A closed stdout (`| head`) ends the command quietly.
        writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
    };
    if args.no_follow {
        let mut after = args.after.unwrap_or(0);
        loop {
            let page = client.events(&filter, after, 1000)?;
            for e in &page.events {
                if !print(e) {
                    return Ok(0);
                }
            }
            if page.next_cursor == after {
                return Ok(0);
            }
            after = page.next_cursor;
        }
    }
    client.follow_events(&filter, args.after, &mut print)?;
    Ok(0)
}

fn print_view(view: &WebhookView) {
    let types = if view.types.is_empty() { "*".to_string() } else { view.types.join(",") };
    say!("{}  {}  {}  types={types}", view.id, view.project_id, view.url);
    let state = match (view.failures, view.retry_at) {
        (0, _) => "ok".to_string(),
        (n, Some(at)) => format!("{n} failed attempt(s), next at {at}"),
        (n, None) => format!("{n} failed attempt(s)"),
    };
    say!("  delivered through event {}; {state}", view.delivered_through);
}

/// Runs a `pond webhooks` command.
pub fn webhooks(client: &Client, default_project: Option<String>, command: WebhooksCommand) -> Result<i32> {
    match command {
        WebhooksCommand::Add { url, project, types, description, json } => {
            let Some(project_id) = project.or(default_project) else {
                bail!("no project: pass --project or set one in the context (`pond context add … --project`)");
            };
            let view = client.create_webhook(&CreateWebhook { project_id, url, types, description })?;
            if json {
                say!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print_view(&view);
                if let Some(secret) = &view.secret {
                    say!("signing secret (shown once; keep it with the receiver): {secret}");
                }
            }
        }
        WebhooksCommand::Ls { json } => {
            let list = client.webhooks()?;
            if json {
                say!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.webhooks.is_empty() {
                say!("no webhooks");
            } else {
                list.webhooks.iter().for_each(print_view);
            }
        }
        WebhooksCommand::Show { id } => say!("{}", serde_json::to_string_pretty(&client.webhook(&id)?)?),
        WebhooksCommand::Rm { id } => {
            client.remove_webhook(&id)?;
            say!("removed {id}");
        }
        WebhooksCommand::RotateSecret { id, overlap } => {
            let view = client.rotate_webhook_secret(&id, overlap.map(|d| d.as_secs()))?;
            if let Some(secret) = &view.secret {
                say!("new signing secret (shown once): {secret}");
            }
            for s in &view.secrets {
                match s.expires_at {
                    Some(until) => say!("  old secret made {} signs until {until}", s.created_at),
                    None => say!("  current secret made {}", s.created_at),
                }
            }
        }
        WebhooksCommand::Deliveries { id, json } => {
            let log = client.webhook_deliveries(&id)?;
            if json {
                say!("{}", serde_json::to_string_pretty(&log)?);
                return Ok(0);
            }
            say!("{:<24} {:>8} {:<16} {:>7} {:>6} {:>7}  OUTCOME", "AT", "EVENT", "TYPE", "ATTEMPT", "STATUS", "MS");
            for d in &log.deliveries {
                let status = d.status.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
                let why = d.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default();
                say!(
                    "{:<24} {:>8} {:<16} {:>7} {:>6} {:>7}  {}{why}",
                    d.at.to_string(),
                    d.event,
                    d.kind,
                    d.attempt,
                    status,
                    d.duration_ms,
                    d.outcome
                );
            }
        }
        WebhooksCommand::Redeliver { id, event } => {
            client.redeliver_webhook(&id, event)?;
            say!("event {event} queued for redelivery to {id}");
        }
    }
    Ok(0)
}
