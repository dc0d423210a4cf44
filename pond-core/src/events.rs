//! Run and stage state changes as events: what `GET /v1/events` streams and webhooks deliver.
//!
//! Every store writes a change's events in the same transaction as the change (the outbox), at
//! the next positions of one global sequence taken in commit order, so a reader that has seen
//! position `n` has seen every change committed before it, whichever node made it. An event
//! carries states and names only, never a stage's output or error text: a confidential run's
//! events say no more than its public state does.

use serde::{Deserialize, Serialize};

use crate::ids::RunId;
use crate::run::{Run, RunSnapshot, Stage};
use crate::time::Timestamp;

/// An event to store with the change that caused it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NewEvent {
    /// `run.<state>` or `stage.<state>` (the state entered), e.g. `run.succeeded`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The run's project.
    pub project_id: String,
    /// The run.
    pub run_id: RunId,
    /// The stage, for stage events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// The stage's attempt number when it changed (stage events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// The state entered.
    pub state: String,
    /// The state left (absent for a new run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_state: Option<String>,
    /// When the change was committed.
    pub at: Timestamp,
}

/// A stored event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Event {
    /// Position in the global sequence: strictly increasing in commit order, the cursor for
    /// reads (`Last-Event-ID`).
    pub seq: i64,
    /// The event.
    #[serde(flatten)]
    pub event: NewEvent,
}

/// Every event type, for filters and documentation.
pub const EVENT_TYPES: &[&str] = &[
    "run.queued",
    "run.running",
    "run.succeeded",
    "run.failed",
    "run.cancelled",
    "stage.queued",
    "stage.running",
    "stage.succeeded",
    "stage.failed",
    "stage.cancelled",
];

/// Whether `pattern` (an event type, `run.*`, `stage.*` or `*`) selects `kind`.
pub fn type_matches(pattern: &str, kind: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => kind.starts_with(prefix),
        None => pattern == kind,
    }
}

/// Checks an event filter pattern: a known type, `run.*`, `stage.*` or `*`.
pub fn valid_type_pattern(pattern: &str) -> bool {
    matches!(pattern, "*" | "run.*" | "stage.*") || EVENT_TYPES.contains(&pattern)
}

/// The events of a change from `before` (`None`: a new run) to `after`: the run's own change
/// first (last when the run ended), its stages' in position order.
pub fn changes(before: Option<&RunSnapshot>, after: &RunSnapshot, at: Timestamp) -> Vec<NewEvent> {
    let run = &after.run;
    let mut out = Vec::new();
    let previous = before.map(|b| b.run.state);
    let run_changed =
        (previous != Some(run.state)).then(|| run_event(run, previous.map(|s| s.as_str().to_string()), at));
    // A run starts before its stages and ends after them.
    let run_ends = run.state.is_terminal();
    if !run_ends {
        out.extend(run_changed.clone());
    }
    for stage in &after.stages {
        let old = before.and_then(|b| b.stages.iter().find(|s| s.key == stage.key));
        match old {
            // A new run's stages start queued: the run event says so.
            None if before.is_none() => {}
            Some(old) if old.state == stage.state && old.attempt == stage.attempt => {}
            old => out.push(stage_event(run, stage, old.map(|o| o.state.as_str().to_string()), at)),
        }
    }
    if run_ends {
        out.extend(run_changed);
    }
    out
}

/// The events of a claim: the stage entered `running` with a new attempt (from `queued`, or
/// from `running` when an expired lease was taken over), and the run too if it was queued.
pub fn claimed(run: &Run, stage: &Stage, run_was_queued: bool, stage_was: &str, at: Timestamp) -> Vec<NewEvent> {
    let mut out = Vec::new();
    if run_was_queued {
        out.push(run_event(run, Some("queued".into()), at));
    }
    out.push(stage_event(run, stage, Some(stage_was.to_string()), at));
    out
}

fn run_event(run: &Run, previous_state: Option<String>, at: Timestamp) -> NewEvent {
    NewEvent {
        kind: format!("run.{}", run.state.as_str()),
        project_id: run.project_id.clone(),
        run_id: run.id,
        stage: None,
        attempt: None,
        state: run.state.as_str().to_string(),
        previous_state,
        at,
    }
}

fn stage_event(run: &Run, stage: &Stage, previous_state: Option<String>, at: Timestamp) -> NewEvent {
    NewEvent {
        kind: format!("stage.{}", stage.state.as_str()),
        project_id: run.project_id.clone(),
        run_id: run.id,
        stage: Some(stage.key.clone()),
        attempt: Some(stage.attempt),
        state: stage.state.as_str().to_string(),
        previous_state,
        at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_select_types() {
        assert!(type_matches("run.*", "run.failed"));
        assert!(!type_matches("run.*", "stage.failed"));
        assert!(type_matches("*", "stage.queued"));
        assert!(type_matches("run.succeeded", "run.succeeded"));
        assert!(!type_matches("run.succeeded", "run.succeeded.x"));
        assert!(valid_type_pattern("stage.*"));
        assert!(!valid_type_pattern("run.done"));
        assert!(!valid_type_pattern("ru*"));
    }
}
