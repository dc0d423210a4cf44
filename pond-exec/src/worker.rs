//! The pool worker's loop: claim a job from the orchestrator → fetch and check its input bundle
//! → unpack → run the stage's executor while heartbeating → sign (job, input, output, rc) with
//! the worker's Ed25519 key → report. Written against [`WorkerClient`], so it runs the same over
//! HTTP (`pond worker`) or in-process in a test.
//!
//! A job whose lease is lost (heartbeats refused) is stopped and its result dropped; on
//! shutdown the current job gets `drain` to finish, then is stopped and handed back.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pond_core::attest::Attestation;
use pond_core::engine::JobReport;
use pond_core::exec::{ExecContext, Executor, OutputSink, StopReason, StopSignal, Workspace};
use pond_core::pool::{output_digest, Job, WorkerCallError, WorkerClient};
use pond_core::run::StageOutcome;
use pond_core::time::Millis;
use pond_core::usage::TokenUsage;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::stop::StopHandle;

/// Settings of a worker.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Where job checkouts are unpacked (one directory per job, removed after).
    pub scratch: PathBuf,
    /// Take one job, then stop.
    pub once: bool,
    /// Longest claim long poll.
    pub claim_wait: Duration,
    /// On shutdown, how long the current job may run on before it is stopped and handed back.
    pub drain: Duration,
    /// Largest input bundle, and the most it may unpack to.
    pub max_input_bytes: u64,
    /// The tags and capabilities the operator pinned this worker to at enrollment. The worker
    /// checks every job against them (the same rule pond's claim applies) before it runs
    /// anything, so a job that should never have reached it — another tenant's — is refused here
    /// too.
    pub pinned: pond_core::routing::WorkerOffer,
    /// Most bytes of output kept per job; more is dropped after a truncation note.
    pub max_log_bytes: u64,
    /// Run `none`-profile stages (a host process of this worker's user) even on a
    /// bring-your-own host. Off by default there: such a stage could read what this worker's
    /// user can. (The operator's `--allow-unconfined`.)
    pub allow_unconfined: bool,
}

impl WorkerConfig {
    /// Why this worker will not run `stage` of a run of `project_id`, if it will not.
    pub fn refusal(&self, project_id: &str, stage: &pond_core::definition::StageDef) -> Option<String> {
        use pond_core::routing;
        let required = routing::stage_requirements(project_id, &stage.executor)?;
        if !routing::admits(&required, project_id, &self.pinned) {
            return Some(format!(
                "refused by the worker: a job of project `{project_id}` needing tags {:?} and capabilities {:?} is not for a worker pinned to {:?}",
                required.tags, required.capabilities, self.pinned.tags
            ));
        }
        let unconfined =
            stage.executor.sandbox().is_none_or(|s| s.profile == pond_core::definition::SandboxProfile::None);
        if unconfined && self.pinned.tags.contains(routing::BYO_TAG) && !self.allow_unconfined {
            return Some(
                "refused by the worker: a bring-your-own host runs only sandboxed stages (`executor.sandbox.profile`: `untrusted-code-read` or `untrusted-code-write`) unless its operator starts it with --allow-unconfined"
                    .into(),
            );
        }
        None
    }
}

/// What a worker did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerSummary {
    /// Jobs whose result was reported.
    pub reported: u64,
    /// Jobs handed back (shutdown).
    pub handed_back: u64,
    /// Jobs dropped because their lease was lost.
    pub lost: u64,
}

/// A pool worker.
pub struct Worker {
    client: Arc<dyn WorkerClient>,
    executors: HashMap<&'static str, Arc<dyn Executor>>,
    /// For agent stages: how to start a broker, and the shell executor agents run through.
    agents: Option<(Arc<dyn pond_core::agents::KeyBroker>, Arc<crate::ShellExecutor>)>,
    signing_seed: [u8; 32],
    sealing: ([u8; 32], [u8; 32]),
    config: WorkerConfig,
}

impl Worker {
    /// A worker with its identity (both keys pinned at enrollment): it opens inputs sealed to
    /// its X25519 key and signs results with its Ed25519 key.
    pub fn new(client: Arc<dyn WorkerClient>, identity: pond_core::keys::WorkerIdentity, config: WorkerConfig) -> Self {
        Worker {
            client,
            executors: HashMap::new(),
            agents: None,
            signing_seed: identity.signing_seed(),
            sealing: (identity.sealing_public(), identity.sealing_secret()),
            config,
        }
    }

    /// Lets the worker run agent (`swarm`) stages: brokers from `broker`, processes through
    /// `shell`.
    pub fn with_agents(
        mut self,
        broker: Arc<dyn pond_core::agents::KeyBroker>,
        shell: Arc<crate::ShellExecutor>,
    ) -> Self {
        self.agents = Some((broker, shell));
        self
    }

    /// Adds an executor for its kind.
    pub fn with_executor(mut self, executor: Arc<dyn Executor>) -> Self {
        self.executors.insert(executor.kind(), executor);
        self
    }

    /// Claims and runs jobs until `shutdown` turns true (or after one job with `once`).
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) -> WorkerSummary {
        let mut summary = WorkerSummary::default();
        let mut backoff = Duration::from_millis(100);
        loop {
            if *shutdown.borrow() {
                break;
            }
            // The claim runs as a task of its own: a long poll cut short by shutdown is not
            // cancelled by dropping it (the request may already be on its way back with a job),
            // so whatever it still brings is handed back rather than left on a lease nobody
            // renews until it expires.
            let client = self.client.clone();
            let wait = Millis(self.config.claim_wait.as_millis() as u64);
            let mut pending = tokio::spawn(async move { client.claim(wait).await });
            let claim = tokio::select! {
                c = &mut pending => c.unwrap_or_else(|e| Err(WorkerCallError::Unavailable(format!("claim task: {e}")))),
                _ = shutdown.changed() => {
                    let client = self.client.clone();
                    tokio::spawn(async move {
                        if let Ok(Ok(Some(job))) = pending.await {
                            match client.release(&job.id).await {
                                Ok(()) => tracing::info!(job = %job.id, "handed back a job that came after shutdown"),
                                Err(e) => tracing::warn!(job = %job.id, error = %e, "could not hand back a job that came after shutdown; its lease will expire instead"),
                            }
                        }
                    });
                    continue;
                }
            };
            match claim {
                Ok(Some(job)) => {
                    backoff = Duration::from_millis(100);
                    match self.run_job(job, shutdown.clone()).await {
                        Ended::Reported => summary.reported += 1,
                        Ended::HandedBack => {
                            metrics::counter!("pond_worker_jobs_total", "outcome" => "handed_back").increment(1);
                            summary.handed_back += 1
                        }
                        Ended::Lost => {
                            metrics::counter!("pond_worker_jobs_total", "outcome" => "lost").increment(1);
                            summary.lost += 1
                        }
                    }
                    if self.config.once {
                        break;
                    }
                }
                Ok(None) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "claim failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        summary
    }

    async fn run_job(&self, job: Job, shutdown: watch::Receiver<bool>) -> Ended {
        let id = job.id.clone();
        tracing::info!(job = %id, "job started");
        let dir = self.config.scratch.join(id.to_string());
        let stop = StopHandle::new();
        // A confidential run's output is sealed only to the recipients its consumer signed;
        // when that does not hold the job fails without running.
        let (sealer, refused) =
            match pond_core::seal::OutputSealer::for_run(&job.run, &job.id.stage, job.id.attempt, self.signing_seed) {
                Ok(sealer) => (sealer, None),
                Err(why) => (None, Some(why)),
            };
        let sink = crate::delivery::ClientSink::new(
            self.client.clone(),
            id.clone(),
            sealer,
            self.config.scratch.join(format!("{id}.spool")),
            self.config.max_log_bytes,
            job.lease.to_std().max(Duration::from_secs(30)),
        );
        // What the job's model calls spend, booked by its broker as each call ends.
        let spent: Arc<Mutex<Option<TokenUsage>>> = Arc::default();
        let (mut outcome, input_sha) = {
            let work = self.execute(&job, &dir, &sink, &stop, refused, &spent);
            tokio::pin!(work);
            let lease = job.lease.to_std();
            let beat_every = (lease / 3).clamp(Duration::from_millis(50), Duration::from_secs(10));
            let mut ticker = tokio::time::interval(beat_every);
            ticker.tick().await;
            let mut last_heard = tokio::time::Instant::now();
            let timeout = job
                .run
                .definition
                .stages
                .iter()
                .find(|s| s.key == id.stage)
                .map(|s| s.effective_timeout().to_std())
                .unwrap_or(lease);
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut shutdown = shutdown;
            let drained = tokio::time::sleep(Duration::MAX / 4);
            tokio::pin!(drained);
            loop {
                tokio::select! {
                    out = &mut work => break out,
                    _ = &mut deadline, if stop.reason().is_none() => stop.fire(StopReason::TimedOut),
                    // Bounded, so a hung orchestrator cannot keep this loop from the deadline,
                    // the work's end or a lease that ran out meanwhile.
                    _ = ticker.tick() => match tokio::time::timeout(beat_every, self.client.heartbeat(&id))
                        .await
                        .unwrap_or_else(|_| Err(WorkerCallError::Unavailable("heartbeat timed out".into())))
                    {
                        Ok(cancel) => {
                            last_heard = tokio::time::Instant::now();
                            if cancel && stop.reason().is_none() {
                                stop.fire(StopReason::Cancelled);
                            }
                        }
                        Err(WorkerCallError::LeaseLost(_)) => stop.fire(StopReason::LeaseLost),
                        // Unreachable for longer than the lease: another worker has it by now.
                        Err(_) if last_heard.elapsed() > lease => stop.fire(StopReason::LeaseLost),
                        Err(e) => tracing::warn!(job = %id, error = %e, "heartbeat failed; retrying"),
                    },
                    _ = shutdown.changed(), if !*shutdown.borrow() => {
                        drained.as_mut().reset(tokio::time::Instant::now() + self.config.drain);
                    }
                    _ = &mut drained, if stop.reason().is_none() => stop.fire(StopReason::Shutdown),
                }
            }
        };
        let _ = tokio::fs::remove_dir_all(&dir).await;
        if !matches!(stop.reason(), Some(StopReason::LeaseLost | StopReason::Shutdown)) {
            // Every attempt that reports has its output ended — a confidential stream its final
            // record — early failures included (a second finish adds nothing). Output that could
            // not be delivered fails the attempt, as it does after a run.
            if let Err(why) = sink.finish().await {
                if matches!(outcome, StageOutcome::Succeeded) {
                    outcome = StageOutcome::Failed { error: why, exit_code: None };
                }
            }
        }
        match stop.reason() {
            Some(StopReason::LeaseLost) => {
                tracing::warn!(job = %id, "lease lost; result dropped");
                return Ended::Lost;
            }
            Some(StopReason::Shutdown) => {
                if let Err(e) = self.client.release(&id).await {
                    tracing::warn!(job = %id, error = %e, "could not hand the job back; its lease will expire instead");
                }
                return Ended::HandedBack;
            }
            _ => {}
        }
        let artifacts = sink.artifacts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let output_sha256 = output_digest(&artifacts);
        let attestation =
            Attestation { job_id: id.to_string(), input_sha256: input_sha, output_sha256, rc: JobReport::rc(&outcome) };
        let signature = match attestation.sign(&self.signing_seed) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(job = %id, error = %e, "signing failed");
                [0; 64]
            }
        };
        let ended = match &outcome {
            StageOutcome::Succeeded => "succeeded",
            StageOutcome::Failed { .. } => "failed",
            StageOutcome::Cancelled => "cancelled",
        };
        metrics::counter!("pond_worker_jobs_total", "outcome" => ended).increment(1);
        let usage = *spent.lock().unwrap_or_else(|p| p.into_inner());
        let report = JobReport { outcome, input_sha256: input_sha, output_sha256, signature, usage };
        let mut delay = Duration::from_millis(100);
        let giving_up = tokio::time::Instant::now() + job.lease.to_std();
        loop {
            match self.client.result(&id, &report).await {
                Ok((verified, detail)) => {
                    tracing::info!(job = %id, verified, %detail, "result reported");
                    return Ended::Reported;
                }
                Err(WorkerCallError::Unavailable(e)) if tokio::time::Instant::now() < giving_up => {
                    tracing::warn!(job = %id, error = %e, "reporting the result failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    tracing::warn!(job = %id, error = %e, "result not accepted");
                    return Ended::Lost;
                }
            }
        }
    }

    /// Fetches, checks and unpacks the input, then runs the stage. Returns the outcome and the
    /// SHA-256 of the input bytes actually received (what the attestation signs).
    async fn execute(
        &self,
        job: &Job,
        dir: &std::path::Path,
        sink: &crate::delivery::ClientSink,
        stop: &StopHandle,
        refused: Option<String>,
        spent: &Arc<Mutex<Option<TokenUsage>>>,
    ) -> (StageOutcome, [u8; 32]) {
        let failed = |error: String| StageOutcome::Failed { error, exit_code: None };
        if let Some(why) = refused {
            tracing::warn!(job = %job.id, "{why}");
            return (failed(why), [0; 32]);
        }
        // Before anything of the job is fetched or run: is it for this worker at all?
        if let Some(stage) = job.run.definition.stages.iter().find(|s| s.key == job.id.stage) {
            if let Some(why) = self.config.refusal(&job.run.project_id, stage) {
                tracing::warn!(job = %job.id, "{why}");
                return (failed(why), [0; 32]);
            }
        }
        // A run without sources has the empty input, and its digest in the ticket (which pond
        // signs) says so: there is nothing to fetch, so no round trip through the orchestrator
        // for it. What the attestation signs is the same either way.
        let input = if job.input_sha256 == pond_core::engine::JobInput::empty().sha256 {
            Vec::new()
        } else {
            match self.client.input(&job.id).await {
                // Sealed to this worker (format (b)): open it; refuse an input that came in clear.
                Ok((sealed, Some(sidecar))) => {
                    match pond_core::seal::open_artifact(&sealed, &sidecar, &self.sealing.0, &self.sealing.1) {
                        Ok(bytes) => bytes,
                        Err(e) => return (failed(format!("opening the input bundle failed: {e}")), [0; 32]),
                    }
                }
                Ok((_, None)) => return (failed("the input bundle came unencrypted; refused".into()), [0; 32]),
                Err(e) => return (failed(format!("fetching the input bundle failed: {e}")), [0; 32]),
            }
        };
        let input_sha: [u8; 32] = Sha256::digest(&input).into();
        if hex::encode(input_sha) != job.input_sha256 {
            let error =
                format!("input bundle digest {} is not the one issued ({})", hex::encode(input_sha), job.input_sha256);
            return (failed(error), input_sha);
        }
        let (unpack_to, max) = (dir.to_path_buf(), self.config.max_input_bytes);
        let unpacked = tokio::task::spawn_blocking(move || {
            if input.is_empty() {
                // A run without sources.
                return std::fs::create_dir_all(&unpack_to).map_err(|e| e.to_string());
            }
            crate::unpack_bundle(&input, &unpack_to, max, 1_000_000)
        })
        .await;
        match unpacked {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return (failed(format!("unpacking the input bundle failed: {e}")), input_sha),
            Err(e) => return (failed(format!("unpacking the input bundle failed: {e}")), input_sha),
        }
        let sources: Vec<(String, PathBuf)> =
            job.run.sources.iter().map(|s| (s.label.clone(), dir.join(&s.label))).collect();
        let cwd = match sources.first() {
            Some((_, path)) => path.clone(),
            None => dir.join("_empty"),
        };
        if let Err(e) = tokio::fs::create_dir_all(&cwd).await {
            return (failed(format!("preparing the checkout: {e}")), input_sha);
        }
        let resolved = job.run.sources.iter().filter_map(|s| s.resolved.clone()).collect();
        let workspace = Workspace { cwd, sources, resolved };
        let Some(stage) = job.run.definition.stages.iter().find(|s| s.key == job.id.stage) else {
            return (failed(format!("the run has no stage `{}`", job.id.stage)), input_sha);
        };

        // Credentials: opened only if sealed to this worker, for this job, and not expired;
        // they reach the process as environment variables and nothing else.
        let mut stage = stage.clone();
        if !stage.executor.credentials().is_empty() {
            let Some(sealed) = &job.credentials else {
                return (failed("the stage needs credentials and none came with the job".into()), input_sha);
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            let job_id = job.id.to_string();
            match pond_core::credentials::open_credentials(sealed, &self.sealing.0, &self.sealing.1, &job_id, now) {
                Ok(creds) => {
                    if let pond_core::definition::ExecutorSpec::Shell(shell) = &mut stage.executor {
                        shell.env.extend(creds);
                    }
                }
                Err(e) => return (failed(format!("credentials refused: {e}")), input_sha),
            }
        }
        let stage = &stage;
        // An agent stage: the harness and model came with the job; the model key comes sealed
        // to this worker and goes only into this worker's broker.
        let agent_executor: Option<Arc<dyn Executor>> = match (&stage.executor, &self.agents) {
            (pond_core::definition::ExecutorSpec::Swarm(_), None) => {
                return (failed("this worker cannot run agent stages".into()), input_sha)
            }
            (pond_core::definition::ExecutorSpec::Swarm(_), Some((broker, shell))) => {
                let Some(agent) = job.agent.clone() else {
                    return (failed("the agent stage came without its harness".into()), input_sha);
                };
                let real_key = match &job.credentials {
                    Some(sealed) => {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs() as i64)
                            .unwrap_or(0);
                        let job_id = job.id.to_string();
                        match pond_core::credentials::open_credentials(
                            sealed,
                            &self.sealing.0,
                            &self.sealing.1,
                            &job_id,
                            now,
                        ) {
                            Ok(mut creds) => creds.remove(pond_core::pool::MODEL_KEY),
                            Err(e) => return (failed(format!("credentials refused: {e}")), input_sha),
                        }
                    }
                    None => None,
                };
                let account = TicketAccount {
                    budgets: agent.budgets.clone(),
                    prices: agent
                        .model
                        .as_ref()
                        .map(|m| (m.input_usd_per_mtok.unwrap_or(0.0), m.output_usd_per_mtok.unwrap_or(0.0)))
                        .unwrap_or((0.0, 0.0)),
                    spent: spent.clone(),
                };
                let resolver = Arc::new(TicketAgent(
                    Mutex::new(Some(pond_core::agents::ResolvedAgent {
                        harness: agent.harness,
                        model: agent.model,
                        real_key,
                    })),
                    Arc::new(account),
                ));
                Some(Arc::new(crate::SwarmExecutor::new(
                    resolver,
                    broker.clone(),
                    shell.clone(),
                    self.config.scratch.clone(),
                )))
            }
            _ => None,
        };
        let Some(executor) = agent_executor.as_ref().or_else(|| self.executors.get(stage.executor.kind())) else {
            return (failed(format!("this worker has no `{}` executor", stage.executor.kind())), input_sha);
        };
        let ctx = ExecContext {
            run: &job.run,
            stage,
            attempt: job.id.attempt,
            workspace: &workspace,
            output: sink,
            stop,
            items: job.items.as_deref(),
        };
        let outcome = executor.execute(ctx).await;
        // Output that never reached pond fails the stage, whatever the process did.
        let outcome = match (sink.finish().await, outcome) {
            (Err(why), StageOutcome::Succeeded | StageOutcome::Failed { .. }) => failed(why),
            (_, outcome) => outcome,
        };
        let outcome = match (outcome, stop.reason()) {
            (StageOutcome::Cancelled | StageOutcome::Failed { .. }, Some(StopReason::TimedOut)) => {
                failed(format!("timed out after {}", stage.effective_timeout()))
            }
            (outcome, _) => outcome,
        };
        (outcome, input_sha)
    }
}

/// Resolves an agent stage from what came with the job.
struct TicketAgent(Mutex<Option<pond_core::agents::ResolvedAgent>>, Arc<TicketAccount>);

/// A pooled job's account: the budgets as pond read them at the claim, less what this job's
/// calls spend since; the total goes back to pond with the result.
struct TicketAccount {
    budgets: Vec<pond_core::agents::BudgetCap>,
    prices: (f64, f64),
    spent: Arc<Mutex<Option<TokenUsage>>>,
}

#[async_trait]
impl pond_core::agents::SpendAccount for TicketAccount {
    async fn caps(&self) -> Result<Vec<pond_core::agents::BudgetCap>, String> {
        let spent = self.spent.lock().unwrap_or_else(|p| p.into_inner()).unwrap_or_default();
        let cost = spent.input_tokens as f64 / 1e6 * self.prices.0 + spent.output_tokens as f64 / 1e6 * self.prices.1;
        Ok(self
            .budgets
            .iter()
            .map(|cap| {
                let mut cap = cap.clone();
                cap.spent.add(&pond_core::usage::Spend {
                    requests: spent.requests,
                    input_tokens: spent.input_tokens,
                    output_tokens: spent.output_tokens,
                    cost_usd: cost,
                });
                cap
            })
            .collect())
    }

    async fn book(&self, usage: TokenUsage) -> Result<(), String> {
        let mut spent = self.spent.lock().unwrap_or_else(|p| p.into_inner());
        let total = spent.get_or_insert_with(TokenUsage::default);
        total.requests = total.requests.saturating_add(usage.requests);
        total.input_tokens = total.input_tokens.saturating_add(usage.input_tokens);
        total.output_tokens = total.output_tokens.saturating_add(usage.output_tokens);
        Ok(())
    }

    fn prices(&self) -> (f64, f64) {
        self.prices
    }
}

#[async_trait]
impl pond_core::agents::AgentResolver for TicketAgent {
    async fn resolve(
        &self,
        _harness: &str,
        _model: Option<&str>,
        _project: &str,
    ) -> Result<pond_core::agents::ResolvedAgent, String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take().ok_or_else(|| "the agent was already used".to_string())
    }

    fn account(
        &self,
        _run: &pond_core::run::Run,
        _stage: &str,
        _attempt: u32,
        _model: Option<&pond_core::agents::Model>,
    ) -> Option<Arc<dyn pond_core::agents::SpendAccount>> {
        Some(self.1.clone())
    }
}

enum Ended {
    Reported,
    HandedBack,
    Lost,
}

#[cfg(test)]
mod tests {
    use super::*;
    use pond_core::ids::RunId;
    use pond_core::pool::JobId;
    use pond_core::time::Timestamp;

    /// An orchestrator whose long poll answers with a job only after `delay`, and that records
    /// the jobs handed back.
    struct SlowPoll {
        delay: Duration,
        run: pond_core::run::Run,
        released: std::sync::mpsc::Sender<String>,
    }

    #[async_trait]
    impl WorkerClient for SlowPoll {
        async fn claim(&self, _wait: Millis) -> Result<Option<Job>, WorkerCallError> {
            tokio::time::sleep(self.delay).await;
            Ok(Some(Job {
                id: JobId { run: self.run.id, stage: "noop".into(), attempt: 1 },
                run: self.run.clone(),
                lease: Millis(60_000),
                input_sha256: String::new(),
                credentials: None,
                agent: None,
                items: None,
            }))
        }
        async fn input(&self, _: &JobId) -> Result<(Vec<u8>, Option<String>), WorkerCallError> {
            Err(WorkerCallError::Unavailable("not in this test".into()))
        }
        async fn heartbeat(&self, _: &JobId) -> Result<bool, WorkerCallError> {
            Ok(false)
        }
        async fn logs(&self, _: &JobId, _: Vec<pond_core::store::NewLogLine>) -> Result<(), WorkerCallError> {
            Ok(())
        }
        async fn artifact(&self, _: &JobId, _: &str, _: Vec<u8>) -> Result<(), WorkerCallError> {
            Ok(())
        }
        async fn result(&self, _: &JobId, _: &JobReport) -> Result<(bool, String), WorkerCallError> {
            Err(WorkerCallError::Refused("no job should run in this test".into()))
        }
        async fn release(&self, job: &JobId) -> Result<(), WorkerCallError> {
            let _ = self.released.send(job.to_string());
            Ok(())
        }
    }

    /// A worker told to stop while its long poll is out does not drop the job that poll then
    /// brings (its lease would hold it from every other worker until it expired): it hands it
    /// back, and runs nothing.
    #[tokio::test]
    async fn a_job_arriving_after_shutdown_is_handed_back() {
        let run: pond_core::run::Run = serde_json::from_value(serde_json::json!({
            "id": RunId::generate(Timestamp::from_millis(0)),
            "project_id": "p",
            "state": "running",
            "definition": {"stages": [{"key": "noop", "executor": {"kind": "noop", "placement": "pool"}}]},
            "sources": [],
            "idempotency_key": null,
            "cancel_requested": false,
            "error": null,
            "created_at": "2026-01-01T00:00:00Z",
            "started_at": null,
            "finished_at": null
        }))
        .expect("a run");
        let (released, handed_back) = std::sync::mpsc::channel();
        let client = Arc::new(SlowPoll { delay: Duration::from_millis(300), run: run.clone(), released });
        let scratch = tempfile::tempdir().expect("scratch");
        let config = WorkerConfig {
            scratch: scratch.path().to_path_buf(),
            once: false,
            claim_wait: Duration::from_secs(20),
            drain: Duration::from_secs(1),
            max_input_bytes: 1 << 20,
            pinned: pond_core::routing::WorkerOffer::default(),
            max_log_bytes: 1 << 20,
            allow_unconfined: false,
        };
        let identity = pond_core::keys::WorkerIdentity::from_secrets([7; 32], [9; 32]);
        let worker = Worker::new(client, identity, config).with_executor(Arc::new(crate::NoopExecutor));
        let (stop, stopped) = watch::channel(false);
        let running = tokio::spawn(async move { worker.run(stopped).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.send(true).expect("the worker listens");
        let summary = tokio::time::timeout(Duration::from_secs(5), running).await.expect("stops").expect("joins");
        assert_eq!(summary, WorkerSummary::default(), "nothing ran");
        let job = tokio::task::spawn_blocking(move || handed_back.recv_timeout(Duration::from_secs(5)))
            .await
            .expect("joins")
            .expect("the job that came after shutdown was handed back");
        assert_eq!(job, format!("{}.noop.1", run.id));
    }
}
