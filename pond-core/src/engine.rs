//! The [`Engine`]: submits runs and moves their stages through the state machine over a
//! [`Store`], running claimed stages with the [`Executor`] of their kind.
//!
//! The engine decides; it does not loop or sleep. A driver (in `pond-exec`) calls
//! [`Engine::claim`], runs each claim with [`Engine::execute`] while renewing its lease with
//! [`Engine::renew`], and reports with [`Engine::complete`]. Time comes from the injected
//! [`Clock`], so tests step a fake clock through leases and backoff.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::definition::{Capabilities, Definition, SandboxProfile};
use crate::error::{CoreError, FieldError, StoreError};
use crate::exec::{ExecContext, Executor, OutputSink, StopReason, StopSignal, Workspaces};
use crate::ids::RunId;
use crate::run::{RunSnapshot, RunState, StageOutcome, MAX_LOST_LEASES};
use crate::source::{SourceInput, SourcePolicy, SourceSpec};
use crate::store::{Artifact, Claim, ClaimQuery, LeaseStatus, LogStream, NewLogLine, Store};
use crate::time::{Clock, Millis, Timestamp};

/// Most sources a run may have.
pub const MAX_SOURCES: usize = 16;

/// Settings of an engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// This node's name in leases and attempt history.
    pub node_id: String,
    /// How long a claim holds a stage without renewal.
    pub lease: Millis,
    /// Rules for sources.
    pub source_policy: SourcePolicy,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { node_id: "node".into(), lease: Millis::from_secs(30), source_policy: SourcePolicy::default() }
    }
}

/// A run submission, after the transport decoded it.
#[derive(Clone, Debug)]
pub struct SubmitRequest {
    /// The consumer's project.
    pub project_id: String,
    /// The workflow.
    pub definition: Definition,
    /// Sources to check out.
    pub sources: Vec<SourceInput>,
    /// Retried submits with the same key return the first run.
    pub idempotency_key: Option<String>,
}

/// The result of a submit.
#[derive(Clone, Debug)]
pub struct Submitted {
    /// The run.
    pub snapshot: RunSnapshot,
    /// False when an earlier submit with the same idempotency key made it.
    pub created: bool,
}

/// Drives runs through their stages.
pub struct Engine {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    executors: HashMap<&'static str, Arc<dyn Executor>>,
    workspaces: Arc<dyn Workspaces>,
    sandbox_profiles: Vec<SandboxProfile>,
    config: EngineConfig,
}

impl Engine {
    /// An engine with no executors; add them with [`Engine::with_executor`].
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        workspaces: Arc<dyn Workspaces>,
        config: EngineConfig,
    ) -> Self {
        Engine {
            store,
            clock,
            executors: HashMap::new(),
            workspaces,
            sandbox_profiles: vec![SandboxProfile::None],
            config,
        }
    }

    /// Registers an executor for its kind.
    pub fn with_executor(mut self, executor: Arc<dyn Executor>) -> Self {
        self.executors.insert(executor.kind(), executor);
        self
    }

    /// Sets the sandbox profiles stages may ask for (what the sandbox backend enforces).
    pub fn with_sandbox_profiles(mut self, profiles: Vec<SandboxProfile>) -> Self {
        self.sandbox_profiles = profiles;
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The settings.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// What stages may ask for here.
    pub fn capabilities(&self) -> Capabilities {
        let mut kinds: Vec<String> = self.executors.keys().map(|k| k.to_string()).collect();
        kinds.sort();
        Capabilities { executor_kinds: kinds, sandbox_profiles: self.sandbox_profiles.clone() }
    }

    /// Validates and stores a run.
    pub async fn submit(&self, request: SubmitRequest) -> Result<Submitted, CoreError> {
        let project = request.project_id.trim();
        let project_ok = !project.is_empty()
            && project.len() <= 128
            && project.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        if !project_ok {
            return Err(FieldError::new("project_id", "must be 1 to 128 letters, digits, `-`, `_`, `.` or `:`").into());
        }
        if let Some(key) = &request.idempotency_key {
            if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(FieldError::new("Idempotency-Key", "must be 1 to 255 visible ASCII characters").into());
            }
        }
        request.definition.validate("definition", &self.capabilities())?;
        if request.sources.len() > MAX_SOURCES {
            return Err(FieldError::new("sources", format!("at most {MAX_SOURCES} sources are allowed")).into());
        }
        let mut sources = Vec::with_capacity(request.sources.len());
        for (i, input) in request.sources.into_iter().enumerate() {
            let field = format!("sources[{i}]");
            let source = input.validate(&field, &self.config.source_policy)?;
            if sources.iter().any(|s: &crate::source::Source| s.label == source.label) {
                return Err(
                    FieldError::new(format!("{field}.label"), format!("duplicate label `{}`", source.label)).into()
                );
            }
            if let SourceSpec::Bundle { bundle_id } = &source.spec {
                match self.store.blob_meta(*bundle_id).await? {
                    Some(meta) if meta.project_id == project => {}
                    _ => {
                        return Err(FieldError::new(
                            format!("{field}.config.bundle_id"),
                            format!("no bundle `{bundle_id}` in project `{project}`"),
                        )
                        .into())
                    }
                }
            }
            sources.push(source);
        }
        let now = self.clock.now();
        let snapshot = RunSnapshot::new(
            RunId::generate(now),
            project.to_string(),
            request.definition,
            sources,
            request.idempotency_key,
            now,
        );
        match self.store.insert_run(&snapshot).await? {
            crate::store::InsertOutcome::Created => Ok(Submitted { snapshot, created: true }),
            crate::store::InsertOutcome::Existing(existing) => Ok(Submitted { snapshot: *existing, created: false }),
        }
    }

    /// A run by id.
    pub async fn get(&self, id: RunId) -> Result<RunSnapshot, CoreError> {
        self.store.get_run(id).await?.ok_or(CoreError::RunNotFound(id))
    }

    /// Cancels a run (see [`RunSnapshot::cancel`]).
    pub async fn cancel(&self, id: RunId, reason: &str) -> Result<RunSnapshot, CoreError> {
        let now = self.clock.now();
        let snapshot = self
            .store
            .update_run(id, &mut |s| {
                if s.run.state.is_terminal() {
                    return Ok(Vec::new());
                }
                s.cancel(reason, now);
                let mut lines = vec![self.system(None, 0, format!("run cancel requested: {reason}"))];
                lines.extend(self.run_ended(s, now));
                Ok(lines)
            })
            .await
            .map_err(|e| not_found_as(e, id))?;
        self.release_if_ended(&snapshot, now).await;
        Ok(snapshot)
    }

    /// Claims up to `limit` ready stages this node can run.
    pub async fn claim(&self, limit: u32) -> Result<Vec<Claim>, CoreError> {
        let now = self.clock.now();
        let query = ClaimQuery {
            owner: self.config.node_id.clone(),
            kinds: self.executors.keys().map(|k| k.to_string()).collect(),
            now,
            lease_until: now.plus(self.config.lease),
            limit,
        };
        let claims = self.store.claim_stages(&query).await?;
        let mut runnable = Vec::with_capacity(claims.len());
        let mut lines = Vec::with_capacity(claims.len());
        for claim in claims {
            let (run, stage) = (claim.run.id, &claim.stage);
            if stage.lost_leases > MAX_LOST_LEASES {
                let text = format!("stage `{}` failed: lost its lease {} times", stage.key, stage.lost_leases);
                let mut reap = |s: &mut RunSnapshot| {
                    s.reap(now);
                    let mut lines = vec![self.system(Some(&stage.key), stage.attempt, text.clone())];
                    lines.extend(self.run_ended(s, now));
                    Ok(lines)
                };
                if let Ok(snapshot) = self.store.update_run(run, &mut reap).await {
                    self.release_if_ended(&snapshot, now).await;
                }
                continue;
            }
            let mut text =
                format!("stage `{}` attempt {} started on {}", stage.key, stage.attempt, self.config.node_id);
            if stage.lost_leases > 0 && stage.attempt > 1 {
                text.push_str(" (an earlier attempt's node stopped renewing its lease)");
            }
            lines.push((run, self.system(Some(&stage.key), stage.attempt, text)));
            runnable.push(claim);
        }
        // One write for the whole batch's progress lines; a failed log write must not undo
        // claims already made.
        let _ = self.store.append_log_batch(&lines).await;
        Ok(runnable)
    }

    /// Extends a claim's lease.
    pub async fn renew(&self, claim: &Claim) -> Result<LeaseStatus, CoreError> {
        let now = self.clock.now();
        Ok(self
            .store
            .renew_lease(
                claim.run.id,
                &claim.stage.key,
                claim.stage.attempt,
                &self.config.node_id,
                now.plus(self.config.lease),
            )
            .await?)
    }

    /// Runs one claimed attempt: prepares the checkout, records what the sources resolved to,
    /// and calls the stage's executor. Does not record the outcome; see [`Engine::complete`].
    pub async fn execute(&self, claim: &Claim, stop: &dyn StopSignal) -> StageOutcome {
        let run = &claim.run;
        let Some(def) = run.definition.stages.get(claim.stage.position as usize) else {
            return StageOutcome::Failed { error: "stage missing from the definition".into(), exit_code: None };
        };
        let Some(executor) = self.executors.get(def.executor.kind()) else {
            return StageOutcome::Failed {
                error: format!("no `{}` executor on this node", def.executor.kind()),
                exit_code: None,
            };
        };
        let workspace = match self.workspaces.prepare(run).await {
            Ok(w) => w,
            Err(e) => return StageOutcome::Failed { error: format!("fetching sources failed: {e}"), exit_code: None },
        };
        if run.sources.iter().any(|s| s.resolved.is_none()) {
            let resolved = workspace.resolved.clone();
            let (key, attempt) = (&claim.stage.key, claim.stage.attempt);
            let recorded = self
                .store
                .update_run(run.id, &mut |s| {
                    // Stages fetching in parallel each try; only the one that records a source
                    // says so.
                    let mut lines = Vec::new();
                    for (source, found) in s.run.sources.iter_mut().zip(&resolved) {
                        if source.resolved.is_none() {
                            source.resolved = Some(found.clone());
                            let commit = found.commit.as_deref().map(|c| format!(" at commit {c}")).unwrap_or_default();
                            let text =
                                format!("source `{}` fetched{commit}, input_sha {}", source.label, found.input_sha);
                            lines.push(self.system(Some(key), attempt, text));
                        }
                    }
                    Ok(lines)
                })
                .await;
            if let Err(e) = recorded {
                return StageOutcome::Failed {
                    error: format!("recording the fetched sources failed: {e}"),
                    exit_code: None,
                };
            }
        }
        let sink = StoreSink {
            engine: self,
            run: run.id,
            project: &run.project_id,
            stage: &claim.stage.key,
            attempt: claim.stage.attempt,
        };
        let ctx =
            ExecContext { run, stage: def, attempt: claim.stage.attempt, workspace: &workspace, output: &sink, stop };
        let outcome = executor.execute(ctx).await;
        match (outcome, stop.reason()) {
            (StageOutcome::Cancelled, Some(StopReason::TimedOut))
            | (StageOutcome::Failed { .. }, Some(StopReason::TimedOut)) => {
                StageOutcome::Failed { error: format!("timed out after {}", def.effective_timeout()), exit_code: None }
            }
            (outcome, _) => outcome,
        }
    }

    /// Records an attempt's outcome. A stale attempt (lease lost, stage ended) is refused with
    /// [`CoreError::StaleAttempt`] and changes nothing.
    pub async fn complete(&self, claim: &Claim, outcome: StageOutcome) -> Result<RunSnapshot, CoreError> {
        let now = self.clock.now();
        let (run, key, attempt) = (claim.run.id, claim.stage.key.as_str(), claim.stage.attempt);
        // The progress lines are written in the same transaction as the change they describe,
        // so a follower that sees the run ended has also seen how.
        let snapshot = self
            .store
            .update_run(run, &mut |s| {
                s.complete_attempt(key, attempt, &outcome, now)?;
                let mut lines =
                    vec![self.system(Some(key), attempt, describe_completion(s, key, attempt, &outcome, now))];
                lines.extend(self.run_ended(s, now));
                Ok(lines)
            })
            .await
            .map_err(unwrap_rejected)?;
        self.release_if_ended(&snapshot, now).await;
        Ok(snapshot)
    }

    /// Gives a claimed stage back because this node is stopping (see [`RunSnapshot::hand_back`]).
    pub async fn hand_back(&self, claim: &Claim) -> Result<RunSnapshot, CoreError> {
        let now = self.clock.now();
        let (run, key, attempt) = (claim.run.id, claim.stage.key.as_str(), claim.stage.attempt);
        let node = &self.config.node_id;
        let snapshot = self
            .store
            .update_run(run, &mut |s| {
                s.hand_back(key, attempt, now)?;
                let text = format!("stage `{key}` attempt {attempt} handed back: {node} is shutting down");
                let mut lines = vec![self.system(Some(key), attempt, text)];
                lines.extend(self.run_ended(s, now));
                Ok(lines)
            })
            .await
            .map_err(unwrap_rejected)?;
        self.release_if_ended(&snapshot, now).await;
        Ok(snapshot)
    }

    /// Ends stages whose holder vanished while a cancel was pending. Returns how many runs
    /// changed.
    pub async fn sweep(&self) -> Result<usize, CoreError> {
        let now = self.clock.now();
        let mut changed = 0;
        for id in self.store.runs_to_reap(now, 100).await? {
            let snapshot = self
                .store
                .update_run(id, &mut |s| {
                    s.reap(now);
                    Ok(self.run_ended(s, now).into_iter().collect())
                })
                .await?;
            changed += 1;
            self.release_if_ended(&snapshot, now).await;
        }
        Ok(changed)
    }

    /// The closing log line of a run, when the change made at `now` ended it.
    fn run_ended(&self, snapshot: &RunSnapshot, now: Timestamp) -> Option<NewLogLine> {
        let run = &snapshot.run;
        if !(run.state.is_terminal() && run.finished_at == Some(now)) {
            return None;
        }
        let tail = match (&run.state, &run.error) {
            (RunState::Succeeded, _) | (_, None) => String::new(),
            (_, Some(e)) => format!(": {e}"),
        };
        Some(self.system(None, 0, format!("run {}{tail}", run.state)))
    }

    /// Removes the run's checkout on this node, when the change made at `now` ended the run.
    async fn release_if_ended(&self, snapshot: &RunSnapshot, now: Timestamp) {
        if snapshot.run.state.is_terminal() && snapshot.run.finished_at == Some(now) {
            self.workspaces.release(snapshot.run.id).await;
        }
    }

    fn system(&self, stage: Option<&str>, attempt: u32, text: String) -> NewLogLine {
        NewLogLine { stage: stage.map(str::to_string), attempt, stream: LogStream::System, at: self.clock.now(), text }
    }
}

/// The progress line for an attempt that just ended (after `complete_attempt`).
fn describe_completion(s: &RunSnapshot, key: &str, attempt: u32, outcome: &StageOutcome, now: Timestamp) -> String {
    let stage = s.stage(key);
    let took = s
        .attempts
        .iter()
        .rev()
        .find(|a| a.stage_key == key && a.number == attempt)
        .map(|a| now.since(a.started_at))
        .unwrap_or_default();
    match (outcome, stage) {
        (StageOutcome::Succeeded, _) => format!("stage `{key}` succeeded in {took}"),
        (StageOutcome::Cancelled, _) => format!("stage `{key}` cancelled after {took}"),
        (StageOutcome::Failed { error, .. }, Some(st)) if st.state == crate::run::StageState::Queued => {
            let wait = st.ready_at.map(|t| t.since(now)).unwrap_or_default();
            format!("stage `{key}` attempt {attempt} failed: {error}; retrying in {wait}")
        }
        (StageOutcome::Failed { error, .. }, _) => format!("stage `{key}` failed after {took}: {error}"),
    }
}

fn unwrap_rejected(e: StoreError) -> CoreError {
    match e {
        StoreError::Rejected(inner) => *inner,
        other => CoreError::Store(other),
    }
}

fn not_found_as(e: StoreError, id: RunId) -> CoreError {
    match e {
        StoreError::NotFound(_) => CoreError::RunNotFound(id),
        other => unwrap_rejected(other),
    }
}

/// Checks an artifact name: a relative path of plain components.
pub fn valid_artifact_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('/')
        && !name.ends_with(".pondkey")
        && name.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
        && !name.chars().any(|c| c.is_control() || c == '\\')
}

struct StoreSink<'a> {
    engine: &'a Engine,
    run: RunId,
    project: &'a str,
    stage: &'a str,
    attempt: u32,
}

#[async_trait]
impl OutputSink for StoreSink<'_> {
    async fn lines(&self, lines: Vec<(LogStream, String)>) {
        let at = self.engine.clock.now();
        let lines: Vec<NewLogLine> = lines
            .into_iter()
            .map(|(stream, text)| NewLogLine {
                stage: Some(self.stage.to_string()),
                attempt: self.attempt,
                stream,
                at,
                text,
            })
            .collect();
        let _ = self.engine.store.append_logs(self.run, &lines).await;
    }

    async fn artifact(&self, name: &str, data: Vec<u8>) -> Result<(), String> {
        if !valid_artifact_name(name) {
            return Err(format!("`{name}` is not a valid artifact name"));
        }
        let now = self.engine.clock.now();
        let store = &self.engine.store;
        let blob = store.put_blob(self.project, &data, now).await.map_err(|e| e.to_string())?;
        let artifact = Artifact {
            run_id: self.run,
            name: name.to_string(),
            stage: self.stage.to_string(),
            blob_id: blob.id,
            size: blob.size,
            sha256: blob.sha256,
            created_at: now,
        };
        store.put_artifact(&artifact).await.map_err(|e| e.to_string())
    }
}
