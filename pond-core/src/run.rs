//! Runs and stages as stored, and the run/stage state machine.
//!
//! Every transition is a pure function over a [`RunSnapshot`] with `now` passed in. Stores apply
//! them atomically (`Store::update_run`), so two nodes finishing two stages of one run at the
//! same moment cannot both miss that the run is done.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::definition::Definition;
use crate::error::CoreError;
use crate::ids::RunId;
use crate::source::Source;
use crate::time::Timestamp;

/// How many times a stage may lose its lease (its node died) before it is failed rather than
/// retried: a stage that crashes every node that runs it must not crash them forever.
pub const MAX_LOST_LEASES: u32 = 5;

/// The state of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum RunState {
    /// Submitted; no stage has started.
    Queued,
    /// At least one stage has started and the run is not finished.
    Running,
    /// Every stage succeeded (or failed with `continue_on_error`).
    Succeeded,
    /// A stage failed.
    Failed,
    /// Cancelled by a caller.
    Cancelled,
}

/// The state of a stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum StageState {
    /// Waiting for its needs, its backoff, or a free slot.
    Queued,
    /// An attempt holds the stage's lease.
    Running,
    /// Done.
    Succeeded,
    /// Failed after its last attempt.
    Failed,
    /// Cancelled, or skipped because a stage it needs did not succeed.
    Cancelled,
}

macro_rules! state_text {
    ($ty:ty { $($variant:ident => $text:literal),* $(,)? }) => {
        impl $ty {
            /// The state's name as stored and shown.
            pub fn as_str(self) -> &'static str {
                match self { $(<$ty>::$variant => $text),* }
            }
            /// Parses a stored or user-given name.
            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some(<$ty>::$variant),)* _ => None }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

state_text!(RunState { Queued => "queued", Running => "running", Succeeded => "succeeded", Failed => "failed", Cancelled => "cancelled" });
state_text!(StageState { Queued => "queued", Running => "running", Succeeded => "succeeded", Failed => "failed", Cancelled => "cancelled" });

impl RunState {
    /// Whether the run has ended.
    pub fn is_terminal(self) -> bool {
        matches!(self, RunState::Succeeded | RunState::Failed | RunState::Cancelled)
    }
}

impl StageState {
    /// Whether the stage has ended.
    pub fn is_terminal(self) -> bool {
        matches!(self, StageState::Succeeded | StageState::Failed | StageState::Cancelled)
    }
}

/// A run: one execution of the workflow snapshot it carries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Run {
    /// Its id.
    pub id: RunId,
    /// The consumer's project (tenant).
    pub project_id: String,
    /// Current state.
    pub state: RunState,
    /// The workflow, as submitted.
    pub definition: Definition,
    /// Sources checked out for the stages.
    pub sources: Vec<Source>,
    /// The submit's `Idempotency-Key`, if any.
    pub idempotency_key: Option<String>,
    /// SHA-256 (hex) of what the submit asked for (see `Engine::submit`): a later submit with
    /// the same key is a retry only if it asked for the same. `None` for runs stored before it
    /// was kept. Pond's own bookkeeping, kept by the stores: never serialized, so job tickets
    /// (signed over the serialized run) read the same to workers of any version.
    #[serde(skip)]
    pub request_digest: Option<String>,
    /// A caller asked to cancel.
    pub cancel_requested: bool,
    /// Why the run failed or was cancelled.
    pub error: Option<String>,
    /// When it was submitted.
    pub created_at: Timestamp,
    /// When its first stage started.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub finished_at: Option<Timestamp>,
    /// For a confidential run: who its output is encrypted to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

/// A confidential run's recipients: its log lines and artifacts are encrypted to these X25519
/// keys as they are produced (see [`crate::seal`]); pond keeps only ciphertext.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Encryption {
    /// X25519 public keys, base64, each checked (32 bytes, not low-order) at submit.
    pub recipients: Vec<String>,
    /// The consumer's signed request, which must cover every recipient: sealers check it
    /// before sealing anything (runs stored without one get no more output sealed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<crate::signed_request::SignedRequest>,
}

impl Encryption {
    /// The keys output of this run may be sealed to: every recipient, each covered by the
    /// consumer's valid signature over a request to `project`. Otherwise why not: a recipient
    /// added where the run is kept (the database) gets nothing sealed to it.
    pub fn sealing_keys(&self, project: &str) -> Result<Vec<[u8; 32]>, String> {
        let refused = |why: String| format!("not sealing this run's output: {why}");
        let request = self.request.as_ref().ok_or_else(|| {
            refused(
                "its recipients are covered by no consumer signature (no signed request is kept with the run)".into(),
            )
        })?;
        let signed = request.verify().map_err(|e| refused(format!("its signed request does not verify: {e}")))?;
        if signed.project_id != project {
            return Err(refused(format!(
                "its request was signed for project `{}`, not `{project}`",
                signed.project_id
            )));
        }
        let mut keys = Vec::with_capacity(self.recipients.len());
        for text in &self.recipients {
            let key = crate::pool::decode_key(text).map_err(|e| refused(format!("recipient `{text}` {e}")))?;
            if !signed.recipients.contains(&key) {
                return Err(refused(format!(
                    "recipient {} is not among the recipients the consumer signed",
                    crate::attest::fingerprint(&key)
                )));
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(refused("it has no recipients".into()));
        }
        Ok(keys)
    }
}

/// A stage of a run as it executes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    /// Its key in the definition.
    pub key: String,
    /// Its position in the definition.
    pub position: u32,
    /// The claim kind: the executor kind, or `pool` for a stage that runs on a worker pool
    /// (kept beside the definition so stores can filter claims on it).
    pub executor_kind: String,
    /// For a pooled stage, what its worker must offer (kept so stores can match claims).
    pub requirements: Option<crate::routing::Requirements>,
    /// Current state.
    pub state: StageState,
    /// When a queued stage may be claimed; `None` while it waits for its needs.
    pub ready_at: Option<Timestamp>,
    /// Attempts started so far (the current attempt's number while running).
    pub attempt: u32,
    /// Attempts that ended in failure.
    pub failures: u32,
    /// Attempts whose holder vanished (lease expired).
    pub lost_leases: u32,
    /// Who holds the lease while running.
    pub lease_owner: Option<String>,
    /// When the lease runs out unless renewed.
    pub lease_expires_at: Option<Timestamp>,
    /// A cancel is pending for the running attempt.
    pub cancel_requested: bool,
    /// First start.
    pub started_at: Option<Timestamp>,
    /// End.
    pub finished_at: Option<Timestamp>,
    /// Last error.
    pub error: Option<String>,
    /// Exit code of the last attempt, where the executor ran a process.
    pub exit_code: Option<i32>,
}

/// One attempt at a stage, kept as history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Attempt {
    /// The stage key.
    pub stage_key: String,
    /// 1-based attempt number.
    pub number: u32,
    /// Who ran it.
    pub owner: String,
    /// When it started.
    pub started_at: Timestamp,
    /// When it ended; `None` while running or when its holder vanished.
    pub finished_at: Option<Timestamp>,
    /// How it ended.
    pub outcome: Option<AttemptOutcome>,
    /// Error text for failures.
    pub error: Option<String>,
    /// For an attempt run by a pool worker: whether its signed result verified.
    pub attestation: Option<AttestationRecord>,
}

/// What pond found when it checked a pool worker's signed result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AttestationRecord {
    /// The signature verified under the worker's pinned key and the input was the one issued.
    pub verified: bool,
    /// The worker that reported.
    pub worker: String,
    /// Fingerprint of the signing key the result was checked against.
    pub signing_fingerprint: String,
    /// That key (base64 Ed25519), so a reader can check the signature and the worker's log key
    /// headers itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<String>,
    /// Why it did not verify (or what was verified).
    pub detail: String,
    /// SHA-256 (hex) of the output the worker attested.
    pub output_sha256: Option<String>,
    /// What was signed, so anyone can check it again (format (d)): the job id,
    #[serde(default)]
    pub job_id: String,
    /// the input's SHA-256 (hex),
    #[serde(default)]
    pub input_sha256: String,
    /// the exit code,
    #[serde(default)]
    pub rc: i64,
    /// and the Ed25519 signature (base64).
    #[serde(default)]
    pub signature: String,
}

/// How an attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum AttemptOutcome {
    /// It succeeded.
    Succeeded,
    /// It failed.
    Failed,
    /// It was cancelled.
    Cancelled,
    /// Its holder stopped renewing the lease (crash, network loss); the stage was re-queued.
    LeaseExpired,
    /// Its node shut down before it finished and gave the stage back to be run elsewhere.
    HandedBack,
}

impl AttemptOutcome {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Succeeded => "succeeded",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::Cancelled => "cancelled",
            AttemptOutcome::LeaseExpired => "lease_expired",
            AttemptOutcome::HandedBack => "handed_back",
        }
    }
    /// Parses a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "succeeded" => AttemptOutcome::Succeeded,
            "failed" => AttemptOutcome::Failed,
            "cancelled" => AttemptOutcome::Cancelled,
            "lease_expired" => AttemptOutcome::LeaseExpired,
            "handed_back" => AttemptOutcome::HandedBack,
            _ => return None,
        })
    }
}

/// What an executor reports for one attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum StageOutcome {
    /// The stage did its work.
    Succeeded,
    /// The stage failed; it may be retried.
    Failed {
        /// Why.
        error: String,
        /// The process exit code, if a process ran.
        exit_code: Option<i32>,
    },
    /// The stage stopped because it was cancelled.
    Cancelled,
}

/// A run with its stages and attempt history: the unit the state machine works on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSnapshot {
    /// The run.
    pub run: Run,
    /// Its stages, in definition order.
    pub stages: Vec<Stage>,
    /// Every attempt so far, oldest first.
    pub attempts: Vec<Attempt>,
}

impl RunSnapshot {
    /// A new run with its stages; the stages that need nothing are ready at once.
    pub fn new(
        id: RunId,
        project_id: String,
        definition: Definition,
        sources: Vec<Source>,
        idempotency_key: Option<String>,
        now: Timestamp,
    ) -> Self {
        let stages = definition
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| Stage {
                key: s.key.clone(),
                position: i as u32,
                executor_kind: s.executor.claim_kind().to_string(),
                requirements: crate::routing::stage_requirements(&project_id, &s.executor),
                state: StageState::Queued,
                ready_at: None,
                attempt: 0,
                failures: 0,
                lost_leases: 0,
                lease_owner: None,
                lease_expires_at: None,
                cancel_requested: false,
                started_at: None,
                finished_at: None,
                error: None,
                exit_code: None,
            })
            .collect();
        let run = Run {
            id,
            project_id,
            state: RunState::Queued,
            definition,
            sources,
            idempotency_key,
            request_digest: None,
            cancel_requested: false,
            error: None,
            created_at: now,
            started_at: None,
            finished_at: None,
            encryption: None,
        };
        let mut snapshot = RunSnapshot { run, stages, attempts: Vec::new() };
        snapshot.settle(now);
        snapshot
    }

    /// The stage with `key`.
    pub fn stage(&self, key: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.key == key)
    }

    fn stage_index(&self, key: &str) -> Result<usize, CoreError> {
        self.stages
            .iter()
            .position(|s| s.key == key)
            .ok_or_else(|| CoreError::StageNotFound { run: self.run.id, stage: key.to_string() })
    }

    /// The index of stage `key` if attempt `attempt` still holds it (running, not superseded);
    /// otherwise [`CoreError::StaleAttempt`], so a late report changes nothing.
    fn held_stage(&self, key: &str, attempt: u32) -> Result<usize, CoreError> {
        let i = self.stage_index(key)?;
        let stage = &self.stages[i];
        if stage.state != StageState::Running || stage.attempt != attempt {
            return Err(CoreError::StaleAttempt {
                stage: key.to_string(),
                attempt,
                current: stage.attempt,
                state: stage.state,
            });
        }
        Ok(i)
    }

    /// Records the end of attempt `attempt` of stage `key`. Refuses a result from an attempt
    /// that no longer holds the stage (its lease expired and another attempt took over, or the
    /// stage already ended): a late result is never applied twice.
    pub fn complete_attempt(
        &mut self,
        key: &str,
        attempt: u32,
        outcome: &StageOutcome,
        now: Timestamp,
    ) -> Result<(), CoreError> {
        let i = self.held_stage(key, attempt)?;
        let stage = &self.stages[i];
        let def = &self.run.definition.stages[stage.position as usize];
        let max_attempts = def.effective_max_attempts();
        let (attempt_outcome, error) = match outcome {
            StageOutcome::Succeeded => (AttemptOutcome::Succeeded, None),
            StageOutcome::Failed { error, .. } => (AttemptOutcome::Failed, Some(error.clone())),
            StageOutcome::Cancelled => (AttemptOutcome::Cancelled, Some("cancelled".to_string())),
        };
        let retry_at = {
            let stage = &self.stages[i];
            let failures = stage.failures + 1;
            // A spent budget is not retried: the next attempt would spend it again.
            let spent = matches!(outcome, StageOutcome::Failed { error, .. } if error.starts_with(crate::agents::BUDGET_EXHAUSTED));
            let may_retry = matches!(outcome, StageOutcome::Failed { .. })
                && !spent
                && failures < max_attempts
                && !stage.cancel_requested
                && !self.run.cancel_requested;
            may_retry.then(|| now.plus(def.backoff_after(failures)))
        };
        let stage = &mut self.stages[i];
        stage.lease_owner = None;
        stage.lease_expires_at = None;
        stage.error = error.clone();
        stage.exit_code = match outcome {
            StageOutcome::Failed { exit_code, .. } => *exit_code,
            _ => None,
        };
        match outcome {
            StageOutcome::Succeeded => {
                stage.state = StageState::Succeeded;
                stage.finished_at = Some(now);
            }
            StageOutcome::Failed { .. } => {
                stage.failures += 1;
                if let Some(at) = retry_at {
                    stage.state = StageState::Queued;
                    stage.ready_at = Some(at);
                } else {
                    stage.state = StageState::Failed;
                    stage.finished_at = Some(now);
                }
            }
            StageOutcome::Cancelled => {
                stage.state = StageState::Cancelled;
                stage.finished_at = Some(now);
            }
        }
        if let Some(a) = self.attempts.iter_mut().find(|a| a.stage_key == key && a.number == attempt) {
            a.finished_at = Some(now);
            a.outcome = Some(attempt_outcome);
            a.error = error;
        }
        self.settle(now);
        Ok(())
    }

    /// Gives a running attempt's stage back (its node is shutting down): the stage is queued
    /// again at once, without counting a failure, so another node takes it without waiting for
    /// the lease to expire. A stage whose cancel is pending ends as cancelled instead.
    pub fn hand_back(&mut self, key: &str, attempt: u32, now: Timestamp) -> Result<(), CoreError> {
        let i = self.held_stage(key, attempt)?;
        let stage = &self.stages[i];
        let cancelled = stage.cancel_requested || self.run.cancel_requested;
        let stage = &mut self.stages[i];
        stage.lease_owner = None;
        stage.lease_expires_at = None;
        if cancelled {
            stage.state = StageState::Cancelled;
            stage.finished_at = Some(now);
        } else {
            stage.state = StageState::Queued;
            stage.ready_at = Some(now);
        }
        if let Some(a) = self.attempts.iter_mut().find(|a| a.stage_key == key && a.number == attempt) {
            a.finished_at = Some(now);
            a.outcome = Some(if cancelled { AttemptOutcome::Cancelled } else { AttemptOutcome::HandedBack });
        }
        self.settle(now);
        Ok(())
    }

    /// Attaches what pond found checking a pool worker's signed result to the attempt.
    pub fn record_attestation(&mut self, key: &str, attempt: u32, record: AttestationRecord) {
        if let Some(a) = self.attempts.iter_mut().find(|a| a.stage_key == key && a.number == attempt) {
            a.attestation = Some(record);
        }
    }

    /// Marks attempts whose holder vanished: the stage was re-claimed (attempt number moved on)
    /// while an older attempt has no outcome. Called by stores inside a claim.
    pub fn record_lost_attempts(&mut self, now: Timestamp) {
        for a in self.attempts.iter_mut().filter(|a| a.outcome.is_none()) {
            if let Some(stage) = self.stages.iter().find(|s| s.key == a.stage_key) {
                if stage.attempt > a.number {
                    a.outcome = Some(AttemptOutcome::LeaseExpired);
                    a.finished_at = Some(now);
                    a.error = Some("lease expired: the node running this attempt stopped renewing it".into());
                }
            }
        }
    }

    /// Cancels the run: queued stages end as cancelled at once; running ones are asked to stop
    /// and end when their executor reports back (or their lease expires).
    pub fn cancel(&mut self, reason: &str, now: Timestamp) {
        if self.run.state.is_terminal() {
            return;
        }
        self.run.cancel_requested = true;
        if self.run.error.is_none() {
            self.run.error = Some(reason.to_string());
        }
        self.stop_unfinished(now, "cancelled");
        self.settle(now);
    }

    fn stop_unfinished(&mut self, now: Timestamp, why: &str) {
        for stage in &mut self.stages {
            match stage.state {
                StageState::Queued => {
                    stage.state = StageState::Cancelled;
                    stage.finished_at = Some(now);
                    stage.error = Some(why.to_string());
                }
                StageState::Running => stage.cancel_requested = true,
                _ => {}
            }
        }
    }

    /// Ends running stages whose cancel is pending but whose holder vanished, and stages that
    /// lost their lease too often. Returns whether anything changed.
    pub fn reap(&mut self, now: Timestamp) -> bool {
        let mut changed = false;
        for stage in &mut self.stages {
            let expired = stage.state == StageState::Running && stage.lease_expires_at.is_some_and(|t| t <= now);
            if expired && stage.cancel_requested {
                stage.state = StageState::Cancelled;
                stage.finished_at = Some(now);
                stage.lease_owner = None;
                stage.lease_expires_at = None;
                changed = true;
            } else if stage.state == StageState::Running && stage.lost_leases > MAX_LOST_LEASES {
                stage.state = StageState::Failed;
                stage.finished_at = Some(now);
                stage.error =
                    Some(format!("lost its lease {} times: the nodes running it kept stopping", stage.lost_leases));
                stage.lease_owner = None;
                stage.lease_expires_at = None;
                changed = true;
            }
        }
        if changed {
            self.record_lost_attempts(now);
            for a in self.attempts.iter_mut().filter(|a| a.outcome.is_none()) {
                if let Some(stage) = self.stages.iter().find(|s| s.key == a.stage_key && s.state.is_terminal()) {
                    a.outcome = Some(AttemptOutcome::LeaseExpired);
                    a.finished_at = Some(now);
                    a.error = stage.error.clone();
                }
            }
            self.settle(now);
        }
        changed
    }

    /// Brings the run to a consistent state after a change: releases stages whose needs are
    /// met, skips those whose needs failed, fails the run on a failed stage, and derives the
    /// run's state.
    pub fn settle(&mut self, now: Timestamp) {
        if self.run.state.is_terminal() {
            return;
        }
        let failed_stage = self.stages.iter().find(|s| {
            s.state == StageState::Failed && !self.run.definition.stages[s.position as usize].continue_on_error
        });
        if let Some(failed) = failed_stage {
            if !self.run.cancel_requested && self.run.error.is_none() {
                let why = failed.error.clone().unwrap_or_default();
                self.run.error = Some(format!("stage `{}` failed: {why}", failed.key));
            }
            let key = failed.key.clone();
            self.stop_unfinished(now, &format!("run stopped: stage `{key}` failed"));
        }
        let needs = self.run.definition.resolved_needs();
        // Needs point at earlier or later stages in any order, so iterate until nothing moves.
        loop {
            let mut moved = false;
            #[allow(clippy::needless_range_loop)] // the body mutates self.stages[i] while reading others
            for i in 0..self.stages.len() {
                if self.stages[i].state != StageState::Queued || self.stages[i].ready_at.is_some() {
                    continue;
                }
                let mut all_met = true;
                let mut blocked_by = None;
                for need in &needs[i] {
                    let Some(dep) = self.stages.iter().find(|s| &s.key == need) else { continue };
                    let dep_def = &self.run.definition.stages[dep.position as usize];
                    match dep.state {
                        StageState::Succeeded => {}
                        StageState::Failed if dep_def.continue_on_error => {}
                        StageState::Failed | StageState::Cancelled => blocked_by = Some(dep.key.clone()),
                        _ => all_met = false,
                    }
                }
                let stage = &mut self.stages[i];
                if let Some(dep) = blocked_by {
                    stage.state = StageState::Cancelled;
                    stage.finished_at = Some(now);
                    stage.error = Some(format!("skipped: stage `{dep}` did not succeed"));
                    moved = true;
                } else if all_met {
                    stage.ready_at = Some(now);
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }
        if self.stages.iter().all(|s| s.state.is_terminal()) {
            let failed = self.stages.iter().any(|s| {
                s.state == StageState::Failed && !self.run.definition.stages[s.position as usize].continue_on_error
            });
            self.run.state = if self.run.cancel_requested {
                RunState::Cancelled
            } else if failed {
                RunState::Failed
            } else if self.stages.iter().any(|s| s.state == StageState::Cancelled) {
                // Only reachable when a needed stage was cancelled without a run cancel.
                RunState::Failed
            } else {
                RunState::Succeeded
            };
            self.run.finished_at = Some(now);
        } else if self.stages.iter().any(|s| s.attempt > 0) {
            self.run.state = RunState::Running;
        }
        if self.run.state != RunState::Queued && self.run.started_at.is_none() {
            self.run.started_at = self.stages.iter().filter_map(|s| s.started_at).min().or(Some(now));
        }
    }

    /// Applies a claim to stage `key` at `now` (what stores do in their claim statement, for
    /// stores that work on whole snapshots).
    pub fn claim_stage(
        &mut self,
        key: &str,
        owner: &str,
        now: Timestamp,
        lease_until: Timestamp,
    ) -> Result<u32, CoreError> {
        let i = self.stage_index(key)?;
        let stage = &mut self.stages[i];
        if stage.state == StageState::Running {
            stage.lost_leases += 1;
        }
        stage.state = StageState::Running;
        stage.attempt += 1;
        stage.lease_owner = Some(owner.to_string());
        stage.lease_expires_at = Some(lease_until);
        stage.started_at.get_or_insert(now);
        let number = stage.attempt;
        self.attempts.push(Attempt {
            stage_key: key.to_string(),
            number,
            owner: owner.to_string(),
            started_at: now,
            finished_at: None,
            outcome: None,
            error: None,
            attestation: None,
        });
        self.record_lost_attempts(now);
        self.settle(now);
        Ok(number)
    }
}

impl Stage {
    /// Whether a claim at `now` may take this stage: ready and queued, or running with an
    /// expired lease and no pending cancel.
    pub fn claimable(&self, now: Timestamp) -> bool {
        match self.state {
            StageState::Queued => self.ready_at.is_some_and(|t| t <= now),
            StageState::Running => !self.cancel_requested && self.lease_expires_at.is_some_and(|t| t <= now),
            _ => false,
        }
    }
}
