//! The engine, driven step by step with the memory store and a fake clock: no sleeps, no
//! threads racing, every lease and backoff decided by moving the clock.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use pond_core::engine::{Engine, EngineConfig, SubmitRequest};
use pond_core::exec::{BoxFuture, ExecContext, Executor, StopReason, StopSignal, Workspace, Workspaces};
use pond_core::ids::RunId;
use pond_core::run::{AttemptOutcome, Run, RunState, StageOutcome, StageState};
use pond_core::source::{ResolvedSource, SourceInput};
use pond_core::store::{LeaseStatus, LogStream, Store};
use pond_core::time::{Clock, FakeClock, Millis, Timestamp};
use pond_core::CoreError;
use pond_store::MemoryStore;
use serde_json::json;

/// Returns scripted outcomes per stage key (success once the script runs out) and logs a line.
#[derive(Default)]
struct Scripted {
    script: Mutex<HashMap<String, VecDeque<StageOutcome>>>,
}

impl Scripted {
    fn will(&self, key: &str, outcomes: Vec<StageOutcome>) {
        self.script.lock().unwrap().insert(key.into(), outcomes.into());
    }
}

#[async_trait]
impl Executor for Scripted {
    fn kind(&self) -> &'static str {
        "noop"
    }
    async fn execute(&self, ctx: ExecContext<'_>) -> StageOutcome {
        ctx.output
            .lines(vec![pond_core::exec::OutputLine::text(LogStream::Stdout, format!("hello from {}", ctx.stage.key))])
            .await;
        if ctx.stop.reason().is_some() {
            return StageOutcome::Cancelled;
        }
        let next = self.script.lock().unwrap().get_mut(&ctx.stage.key).and_then(|q| q.pop_front());
        next.unwrap_or(StageOutcome::Succeeded)
    }
}

struct NoWorkspaces;

#[async_trait]
impl Workspaces for NoWorkspaces {
    async fn prepare(&self, run: &Run) -> Result<Workspace, String> {
        let resolved = run
            .sources
            .iter()
            .map(|s| ResolvedSource { commit: None, input_sha: format!("sha-of-{}", s.label) })
            .collect();
        Ok(Workspace { cwd: "/nonexistent".into(), sources: vec![], resolved })
    }
    async fn release(&self, _run: RunId) {}
    async fn pack(&self, run: &Run) -> Result<Vec<u8>, String> {
        Ok(format!("bundle of {}", run.id).into_bytes())
    }
}

struct Fired(Option<StopReason>);

impl StopSignal for Fired {
    fn reason(&self) -> Option<StopReason> {
        self.0
    }
    fn stopped(&self) -> BoxFuture<'_, StopReason> {
        Box::pin(std::future::pending())
    }
}

const NOT_STOPPED: Fired = Fired(None);

struct World {
    store: Arc<dyn Store>,
    clock: Arc<FakeClock>,
    exec: Arc<Scripted>,
}

impl World {
    fn new() -> Self {
        World {
            store: Arc::new(MemoryStore::new()),
            clock: Arc::new(FakeClock::new(Timestamp::from_millis(1_800_000_000_000))),
            exec: Arc::new(Scripted::default()),
        }
    }

    fn engine(&self, node: &str) -> Engine {
        let config = EngineConfig { node_id: node.into(), lease: Millis::from_secs(30), ..Default::default() };
        Engine::new(self.store.clone(), self.clock.clone(), Arc::new(NoWorkspaces), config)
            .with_executor(self.exec.clone())
    }

    fn tick(&self, secs: u64) {
        self.clock.advance(Millis::from_secs(secs));
    }
}

fn request(definition: serde_json::Value) -> SubmitRequest {
    SubmitRequest {
        project_id: "acme".into(),
        definition: serde_json::from_value(definition).unwrap(),
        sources: vec![],
        idempotency_key: None,
        recipients: vec![],
        signed: None,
    }
}

/// Submits a definition as project `acme` and returns the run's id.
async fn submit(engine: &Engine, definition: serde_json::Value) -> RunId {
    engine.submit(request(definition)).await.unwrap().snapshot.run.id
}

/// Claims everything claimable and returns the stage keys, sorted.
async fn claim_keys(engine: &Engine) -> (Vec<String>, Vec<pond_core::store::Claim>) {
    let claims = engine.claim(100).await.unwrap();
    let mut keys: Vec<String> = claims.iter().map(|c| c.stage.key.clone()).collect();
    keys.sort();
    (keys, claims)
}

async fn run_claims(engine: &Engine, claims: Vec<pond_core::store::Claim>) {
    for claim in claims {
        let outcome = engine.execute(&claim, &NOT_STOPPED).await;
        engine.complete(&claim, outcome).await.unwrap();
    }
}

#[tokio::test]
async fn stages_without_needs_run_in_order() {
    let w = World::new();
    let engine = w.engine("n1");
    let run = engine
        .submit(request(json!({"stages":[
            {"key":"a","executor":{"kind":"noop"}},
            {"key":"b","executor":{"kind":"noop"}},
            {"key":"c","executor":{"kind":"noop"}}
        ]})))
        .await
        .unwrap()
        .snapshot;
    assert_eq!(run.run.state, RunState::Queued);
    for expected in ["a", "b", "c"] {
        let (keys, claims) = claim_keys(&engine).await;
        assert_eq!(keys, vec![expected]);
        w.tick(1);
        run_claims(&engine, claims).await;
    }
    let done = engine.get(run.run.id).await.unwrap();
    assert_eq!(done.run.state, RunState::Succeeded);
    assert!(done.stages.iter().all(|s| s.state == StageState::Succeeded && s.attempt == 1));
    let logs = w.store.read_logs(run.run.id, 0, 100).await.unwrap();
    let texts: Vec<&str> = logs.iter().map(|l| l.line.text.as_str()).collect();
    assert!(texts.contains(&"hello from b"), "{texts:?}");
    assert!(texts.contains(&"stage `a` succeeded in 1s"), "{texts:?}");
    assert_eq!(*texts.last().unwrap(), "run succeeded");
}

#[tokio::test]
async fn independent_stages_are_claimed_together_and_joins_wait_for_all() {
    let w = World::new();
    let engine = w.engine("n1");
    let id = submit(
        &engine,
        json!({"stages":[
            {"key":"a","executor":{"kind":"noop"}},
            {"key":"b","executor":{"kind":"noop"},"needs":[]},
            {"key":"join","executor":{"kind":"noop"},"needs":["a","b"]}
        ]}),
    )
    .await;
    let (keys, mut claims) = claim_keys(&engine).await;
    assert_eq!(keys, vec!["a", "b"]);
    let b = claims.pop().unwrap();
    run_claims(&engine, claims).await;
    assert!(claim_keys(&engine).await.0.is_empty(), "join waits for b");
    run_claims(&engine, vec![b]).await;
    let (keys, claims) = claim_keys(&engine).await;
    assert_eq!(keys, vec!["join"]);
    run_claims(&engine, claims).await;
    assert_eq!(engine.get(id).await.unwrap().run.state, RunState::Succeeded);
}

#[tokio::test]
async fn failed_attempts_retry_after_backoff_then_succeed() {
    let w = World::new();
    let engine = w.engine("n1");
    let fail = |msg: &str| StageOutcome::Failed { error: msg.into(), exit_code: Some(1) };
    w.exec.will("flaky", vec![fail("first"), fail("second")]);
    let id = engine
        .submit(request(
            json!({"stages":[{"key":"flaky","executor":{"kind":"noop"},"max_attempts":3,"backoff":"10s"}]}),
        ))
        .await
        .unwrap()
        .snapshot
        .run
        .id;
    let (_, claims) = claim_keys(&engine).await;
    run_claims(&engine, claims).await;
    let stage = engine.get(id).await.unwrap().stages[0].clone();
    assert_eq!((stage.state, stage.failures, stage.exit_code), (StageState::Queued, 1, Some(1)));
    w.tick(9);
    assert!(claim_keys(&engine).await.0.is_empty(), "backoff of 10s not over");
    w.tick(1);
    let (_, claims) = claim_keys(&engine).await;
    assert_eq!(claims[0].stage.attempt, 2);
    run_claims(&engine, claims).await;
    w.tick(19);
    assert!(claim_keys(&engine).await.0.is_empty(), "second backoff doubles to 20s");
    w.tick(1);
    let (_, claims) = claim_keys(&engine).await;
    run_claims(&engine, claims).await;
    let done = engine.get(id).await.unwrap();
    assert_eq!(done.run.state, RunState::Succeeded);
    let outcomes: Vec<_> = done.attempts.iter().map(|a| a.outcome.unwrap()).collect();
    assert_eq!(outcomes, vec![AttemptOutcome::Failed, AttemptOutcome::Failed, AttemptOutcome::Succeeded]);
    let logs = w.store.read_logs(id, 0, 100).await.unwrap();
    assert!(logs.iter().any(|l| l.line.text == "stage `flaky` attempt 1 failed: first; retrying in 10s"));
}

#[tokio::test]
async fn a_failed_stage_fails_the_run_unless_it_may_continue() {
    let w = World::new();
    let engine = w.engine("n1");
    w.exec.will("lint", vec![StageOutcome::Failed { error: "bad style".into(), exit_code: Some(2) }]);
    w.exec.will("test", vec![StageOutcome::Failed { error: "red".into(), exit_code: Some(1) }]);
    let lenient = submit(
        &engine,
        json!({"stages":[
            {"key":"lint","executor":{"kind":"noop"},"continue_on_error":true},
            {"key":"after","executor":{"kind":"noop"}}
        ]}),
    )
    .await;
    for _ in 0..2 {
        let (_, claims) = claim_keys(&engine).await;
        run_claims(&engine, claims).await;
    }
    let snap = engine.get(lenient).await.unwrap();
    assert_eq!(snap.run.state, RunState::Succeeded);
    assert_eq!(snap.stages[0].state, StageState::Failed);
    assert_eq!(snap.stages[1].state, StageState::Succeeded);

    let strict = submit(
        &engine,
        json!({"stages":[
            {"key":"test","executor":{"kind":"noop"}},
            {"key":"deploy","executor":{"kind":"noop"}},
            {"key":"other","executor":{"kind":"noop"},"needs":[]}
        ]}),
    )
    .await;
    let (keys, mut claims) = claim_keys(&engine).await;
    assert_eq!(keys, vec!["other", "test"]);
    let test = claims.iter().position(|c| c.stage.key == "test").unwrap();
    let test = claims.remove(test);
    run_claims(&engine, vec![test]).await;
    let snap = engine.get(strict).await.unwrap();
    assert_eq!(snap.run.state, RunState::Running, "waits for the running stage to stop");
    assert_eq!(snap.stage("deploy").unwrap().state, StageState::Cancelled);
    assert!(snap.stage("other").unwrap().cancel_requested);
    assert_eq!(engine.renew(&claims[0]).await.unwrap(), LeaseStatus::Held { cancel_requested: true });
    engine.complete(&claims[0], StageOutcome::Cancelled).await.unwrap();
    let snap = engine.get(strict).await.unwrap();
    assert_eq!(snap.run.state, RunState::Failed);
    assert_eq!(snap.run.error.as_deref(), Some("stage `test` failed: red"));
}

#[tokio::test]
async fn a_lost_lease_is_retried_as_a_new_attempt_and_the_late_result_refused() {
    let w = World::new();
    let crashed = w.engine("crashed-node");
    let survivor = w.engine("survivor");
    let id = submit(&crashed, json!({"stages":[{"key":"work","executor":{"kind":"noop"}}]})).await;
    let (_, lost_claims) = claim_keys(&crashed).await;
    w.tick(29);
    assert!(claim_keys(&survivor).await.0.is_empty(), "lease of 30s still held");
    w.tick(2);
    let (keys, claims) = claim_keys(&survivor).await;
    assert_eq!(keys, vec!["work"]);
    assert_eq!((claims[0].stage.attempt, claims[0].stage.lost_leases), (2, 1));
    assert_eq!(crashed.renew(&lost_claims[0]).await.unwrap(), LeaseStatus::Lost);
    let late = crashed.complete(&lost_claims[0], StageOutcome::Succeeded).await;
    assert!(matches!(late, Err(CoreError::StaleAttempt { attempt: 1, current: 2, .. })), "{late:?}");
    run_claims(&survivor, claims).await;
    let snap = survivor.get(id).await.unwrap();
    assert_eq!(snap.run.state, RunState::Succeeded);
    let history: Vec<_> = snap.attempts.iter().map(|a| (a.number, a.owner.as_str(), a.outcome.unwrap())).collect();
    assert_eq!(
        history,
        vec![(1, "crashed-node", AttemptOutcome::LeaseExpired), (2, "survivor", AttemptOutcome::Succeeded)]
    );
}

#[tokio::test]
async fn cancel_stops_running_stages_and_cancels_the_rest() {
    let w = World::new();
    let engine = w.engine("n1");
    let id = engine
        .submit(request(
            json!({"stages":[{"key":"a","executor":{"kind":"noop"}},{"key":"b","executor":{"kind":"noop"}}]}),
        ))
        .await
        .unwrap()
        .snapshot
        .run
        .id;
    let (_, claims) = claim_keys(&engine).await;
    let snap = engine.cancel(id, "cancelled by test").await.unwrap();
    assert_eq!(snap.run.state, RunState::Running);
    assert_eq!(snap.stages[1].state, StageState::Cancelled);
    assert_eq!(engine.renew(&claims[0]).await.unwrap(), LeaseStatus::Held { cancel_requested: true });
    let outcome = engine.execute(&claims[0], &Fired(Some(StopReason::Cancelled))).await;
    assert_eq!(outcome, StageOutcome::Cancelled);
    engine.complete(&claims[0], outcome).await.unwrap();
    let snap = engine.get(id).await.unwrap();
    assert_eq!(snap.run.state, RunState::Cancelled);
    assert!(snap.run.finished_at.is_some());
    assert!(claim_keys(&engine).await.0.is_empty());
    let again = engine.cancel(id, "twice").await.unwrap();
    assert_eq!(again.run.error.as_deref(), Some("cancelled by test"), "cancelling an ended run changes nothing");
}

#[tokio::test]
async fn a_cancelled_stage_whose_node_died_is_reaped() {
    let w = World::new();
    let engine = w.engine("n1");
    let id = submit(&engine, json!({"stages":[{"key":"a","executor":{"kind":"noop"}}]})).await;
    claim_keys(&engine).await;
    engine.cancel(id, "stop").await.unwrap();
    assert_eq!(engine.sweep().await.unwrap(), 0);
    w.tick(31);
    assert_eq!(engine.sweep().await.unwrap(), 1);
    assert_eq!(engine.get(id).await.unwrap().run.state, RunState::Cancelled);
}

#[tokio::test]
async fn a_timeout_is_a_failure_that_names_the_limit() {
    let w = World::new();
    let engine = w.engine("n1");
    let id = submit(&engine, json!({"stages":[{"key":"slow","executor":{"kind":"noop"},"timeout":"2m"}]})).await;
    let (_, claims) = claim_keys(&engine).await;
    let outcome = engine.execute(&claims[0], &Fired(Some(StopReason::TimedOut))).await;
    assert_eq!(outcome, StageOutcome::Failed { error: "timed out after 2m".into(), exit_code: None });
    engine.complete(&claims[0], outcome).await.unwrap();
    assert_eq!(engine.get(id).await.unwrap().run.state, RunState::Failed);
}

#[tokio::test]
async fn submit_validates_and_honours_idempotency_keys() {
    let w = World::new();
    let engine = w.engine("n1");
    let mut req = request(json!({"stages":[{"key":"a","executor":{"kind":"noop"}}]}));
    req.idempotency_key = Some("retry-1".into());
    let first = engine.submit(req.clone()).await.unwrap();
    let second = engine.submit(req.clone()).await.unwrap();
    assert!(first.created && !second.created);
    assert_eq!(first.snapshot.run.id, second.snapshot.run.id);
    // The same key with another request is refused, naming the key, and makes no run.
    let mut other = req;
    other.definition = request(json!({"stages":[{"key":"b","executor":{"kind":"noop"}}]})).definition;
    match engine.submit(other).await.unwrap_err() {
        pond_core::CoreError::Invalid(f) => {
            assert_eq!(f.field, "Idempotency-Key");
            assert!(f.reason.contains("different request"), "{}", f.reason);
            assert!(f.reason.contains(&first.snapshot.run.id.to_string()), "{}", f.reason);
        }
        other => panic!("expected a field error, got {other}"),
    }

    let bad = |r: SubmitRequest| async { engine.submit(r).await.unwrap_err().to_string() };
    let mut shell = request(json!({"stages":[{"key":"a","executor":{"kind":"shell","argv":["true"]}}]}));
    assert!(bad(shell.clone()).await.contains("definition.stages[0].executor.kind: executor `shell` is not enabled"));
    shell.project_id = " ".into();
    assert!(bad(shell).await.contains("project_id"));
    let mut with_bundle = request(json!({"stages":[{"key":"a","executor":{"kind":"noop"}}]}));
    let foreign = w.store.put_blob("other-project", b"x", w.clock.now()).await.unwrap();
    with_bundle.sources =
        vec![
            serde_json::from_value::<SourceInput>(json!({"kind":"bundle","config":{"bundle_id": foreign.id}})).unwrap()
        ];
    let err = bad(with_bundle).await;
    assert!(err.contains("sources[0].config.bundle_id: no bundle"), "{err}");
}

#[tokio::test]
async fn what_a_source_resolved_to_is_recorded_once() {
    let w = World::new();
    let engine = w.engine("n1");
    let own = w.store.put_blob("acme", b"bytes", w.clock.now()).await.unwrap();
    let mut req = request(json!({"stages":[{"key":"a","executor":{"kind":"noop"}}]}));
    req.sources = vec![serde_json::from_value::<SourceInput>(
        json!({"label":"code","kind":"bundle","config":{"bundle_id": own.id}}),
    )
    .unwrap()];
    let id = engine.submit(req).await.unwrap().snapshot.run.id;
    let (_, claims) = claim_keys(&engine).await;
    run_claims(&engine, claims).await;
    let snap = engine.get(id).await.unwrap();
    assert_eq!(snap.run.sources[0].resolved.as_ref().unwrap().input_sha, "sha-of-code");
}

#[tokio::test]
async fn a_stage_handed_back_at_shutdown_is_taken_at_once_elsewhere() {
    let w = World::new();
    let stopping = w.engine("stopping");
    let other = w.engine("other");
    let id = submit(&stopping, json!({"stages":[{"key":"work","executor":{"kind":"noop"}}]})).await;
    let (_, claims) = claim_keys(&stopping).await;
    stopping.hand_back(&claims[0]).await.unwrap();
    let (keys, claims) = claim_keys(&other).await;
    assert_eq!(keys, vec!["work"], "no lease to wait for");
    run_claims(&other, claims).await;
    let snap = other.get(id).await.unwrap();
    assert_eq!(snap.run.state, RunState::Succeeded);
    let history: Vec<_> = snap.attempts.iter().map(|a| (a.owner.as_str(), a.outcome.unwrap())).collect();
    assert_eq!(history, vec![("stopping", AttemptOutcome::HandedBack), ("other", AttemptOutcome::Succeeded)]);
    assert_eq!(snap.stages[0].failures, 0, "a hand-back is not a failure");

    let cancelled = submit(&stopping, json!({"stages":[{"key":"work","executor":{"kind":"noop"}}]})).await;
    let (_, claims) = claim_keys(&stopping).await;
    stopping.cancel(cancelled, "stop").await.unwrap();
    stopping.hand_back(&claims[0]).await.unwrap();
    assert_eq!(
        stopping.get(cancelled).await.unwrap().run.state,
        RunState::Cancelled,
        "a cancelled stage is not handed on"
    );
}
