//! Pools from the attacker's side, on the memory store with a fake clock: enrollment codes are
//! one-time, expiring and bound to the fingerprint the operator pinned; tags are the operator's,
//! not the worker's; results are verified against the worker's pinned key and the input pond
//! issued, and a bad one is kept but flagged; a late result after a lost lease changes nothing.

use std::sync::Arc;

use async_trait::async_trait;
use pond_core::attest::Attestation;
use pond_core::engine::{Engine, EngineConfig, JobReport, SubmitRequest};
use pond_core::exec::{Workspace, Workspaces};
use pond_core::ids::RunId;
use pond_core::pool::{worker_fingerprint, Grants, JobId, MemberKind, PoolError, PoolMember, Pools, WorkerKeys};
use pond_core::run::{Run, StageOutcome, StageState};
use pond_core::store::{Claim, Store};
use pond_core::time::{FakeClock, Millis, Timestamp};
use pond_core::CoreError;
use pond_store::MemoryStore;
use serde_json::json;
use sha2::{Digest, Sha256};

struct Packing;

#[async_trait]
impl Workspaces for Packing {
    async fn prepare(&self, _run: &Run) -> Result<Workspace, String> {
        Ok(Workspace { cwd: "/nonexistent".into(), sources: vec![], resolved: vec![] })
    }
    async fn release(&self, _run: RunId) {}
    async fn pack(&self, run: &Run) -> Result<Vec<u8>, String> {
        Ok(format!("bundle of {}", run.id).into_bytes())
    }
}

struct World {
    store: Arc<dyn Store>,
    clock: Arc<FakeClock>,
    pools: Pools,
    engine: Engine,
}

fn world() -> World {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let clock = Arc::new(FakeClock::new(Timestamp::from_millis(1_800_000_000_000)));
    let config = EngineConfig { node_id: "n1".into(), lease: Millis::from_secs(30), ..Default::default() };
    let engine = Engine::new(store.clone(), clock.clone(), Arc::new(Packing), config);
    World { pools: Pools::new(store.clone(), clock.clone()), store, clock, engine }
}

/// A worker's keys from fixed seeds (X25519 secret, Ed25519 seed).
fn keys(n: u8) -> (WorkerKeys, [u8; 32]) {
    let identity = pond_core::keys::WorkerIdentity::from_secrets([n; 32], [n + 100; 32]);
    (WorkerKeys { sealing: identity.sealing_public(), signing: identity.signing_public() }, identity.signing_seed())
}

const HOUR: Millis = Millis::from_secs(3600);

async fn orchestrator(w: &World, pool: &str) -> PoolMember {
    w.pools.create_code("orch-code", pool, MemberKind::Orchestrator, Grants::default(), None, HOUR).await.unwrap();
    w.pools.enroll_orchestrator("orch-code", "orch-1".into(), "orch", "orch-token").await.unwrap()
}

async fn worker(w: &World, orch: &PoolMember, n: u8, tags: &[&str]) -> (PoolMember, [u8; 32]) {
    let code = format!("code-{n}");
    let tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
    w.pools
        .create_code(&code, &orch.pool, MemberKind::Worker, Grants { tags, capabilities: vec![] }, None, HOUR)
        .await
        .unwrap();
    let (k, seed) = keys(n);
    let m = w
        .pools
        .enroll_worker(orch, &code, format!("wrk-{n}"), "w", k, None, vec![], &format!("token-{n}"))
        .await
        .unwrap();
    (m, seed)
}

/// A code made for several hosts (one Secret for a StatefulSet's replicas) enrolls exactly that
/// many, each once, even when they all redeem it at the same moment; each is still checked
/// against what the code grants; a fingerprint-pinned code cannot be shared.
#[tokio::test]
async fn a_code_for_n_hosts_enrolls_exactly_n_even_at_once() {
    let w = world();
    let orch = orchestrator(&w, "k8s").await;
    let grants = Grants { tags: vec![], capabilities: vec!["harness.*".into()] };
    let ttl = HOUR;
    w.pools.create_code_for("shared", "k8s", MemberKind::Worker, grants.clone(), None, ttl, 3).await.unwrap();
    // A worker asking for more than the code grants is refused and uses nothing.
    let (k, _) = keys(9);
    let greedy =
        w.pools.enroll_worker(&orch, "shared", "wrk-9".into(), "w", k, None, vec!["sandbox.oci".into()], "t9").await;
    assert!(matches!(greedy, Err(PoolError::CapabilityNotGranted(_))), "{greedy:?}");
    let pools = Arc::new(Pools::new(w.store.clone(), w.clock.clone()));
    let mut tasks = tokio::task::JoinSet::new();
    for n in 10..18u8 {
        let (pools, orch) = (pools.clone(), orch.clone());
        tasks.spawn(async move {
            let (k, _) = keys(n);
            pools.enroll_worker(&orch, "shared", format!("wrk-{n}"), "w", k, None, vec![], &format!("t{n}")).await
        });
    }
    let results = tasks.join_all().await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 3, "{results:?}");
    assert!(results.iter().filter(|r| r.is_err()).all(|r| matches!(r, Err(PoolError::CodeUsed))), "{results:?}");
    // The same keys enroll once per code, even while uses remain.
    w.pools.create_code_for("twice", "k8s", MemberKind::Worker, grants.clone(), None, ttl, 5).await.unwrap();
    let (k1, _) = keys(30);
    w.pools.enroll_worker(&orch, "twice", "wrk-30".into(), "w", k1, None, vec![], "t30").await.unwrap();
    let again = w.pools.enroll_worker(&orch, "twice", "wrk-31".into(), "w", k1, None, vec![], "t31").await;
    assert!(matches!(again, Err(PoolError::CodeUsed)), "{again:?}");
    let (k2, _) = keys(32);
    w.pools.enroll_worker(&orch, "twice", "wrk-32".into(), "w", k2, None, vec![], "t32").await.unwrap();
    for (uses, fingerprint, field) in
        [(0, None, "uses"), (1001, None, "uses"), (2, Some(worker_fingerprint(&k)), "uses")]
    {
        let made =
            w.pools.create_code_for("bad", "k8s", MemberKind::Worker, grants.clone(), fingerprint, ttl, uses).await;
        assert!(matches!(made, Err(PoolError::Invalid { field: ref f, .. }) if f == field), "{uses}: {made:?}");
    }
}

#[tokio::test]
async fn codes_are_one_time_expiring_and_bound_to_the_pinned_fingerprint() {
    let w = world();
    let orch = orchestrator(&w, "byo-acme").await;
    assert_eq!(orch.pool, "byo-acme");
    // Replaying the orchestrator's code fails.
    let replay = w.pools.enroll_orchestrator("orch-code", "orch-2".into(), "evil", "t2").await;
    assert!(matches!(replay, Err(PoolError::CodeUsed)), "{replay:?}");

    let (good, _) = keys(1);
    let (other, _) = keys(2);
    let fp = worker_fingerprint(&good);
    let tags = vec!["pool:byo".to_string(), "tenant:acme".to_string()];
    let grants = Grants { tags: tags.clone(), capabilities: vec!["harness.*".into()] };
    w.pools.create_code("w1", "byo-acme", MemberKind::Worker, grants, Some(fp.clone()), HOUR).await.unwrap();
    // The wrong keys are refused, and do not use up the code.
    let wrong = w.pools.enroll_worker(&orch, "w1", "wrk-x".into(), "x", other, None, vec![], "tx").await;
    assert!(matches!(wrong, Err(PoolError::FingerprintMismatch { .. })), "{wrong:?}");
    // Asking for a tag the code does not grant is refused.
    let greedy = Some(vec!["tenant:globex".to_string()]);
    let wider = w.pools.enroll_worker(&orch, "w1", "wrk-x".into(), "x", good, greedy, vec![], "tx").await;
    assert!(matches!(wider, Err(PoolError::TagNotGranted(ref t)) if t == "tenant:globex"), "{wider:?}");
    // Declaring a capability the code does not grant is refused (a worker cannot claim to
    // have a sandbox, or a harness, that its operator did not pin).
    let oci = vec!["harness.codex".to_string(), "sandbox.oci".to_string()];
    let claims_more = w.pools.enroll_worker(&orch, "w1", "wrk-x".into(), "x", good, None, oci, "tx").await;
    assert!(
        matches!(claims_more, Err(PoolError::CapabilityNotGranted(ref c)) if c == "sandbox.oci"),
        "{claims_more:?}"
    );
    // The right keys enroll; both are pinned; the tags are the code's.
    let caps = vec!["harness.codex".to_string()];
    let m = w.pools.enroll_worker(&orch, "w1", "wrk-1".into(), "box", good, None, caps, "t1").await.unwrap();
    assert_eq!(m.fingerprint.as_deref(), Some(fp.as_str()));
    assert_eq!(m.tags, tags);
    assert_eq!(m.capabilities, vec!["harness.codex".to_string()]);
    assert_eq!(m.signing_key_bytes(), Some(good.signing));
    assert_eq!(w.pools.authenticate("t1").await.unwrap().map(|m| m.id), Some("wrk-1".into()));
    assert_eq!(w.pools.authenticate("forged").await.unwrap(), None);
    // A used worker code is spent.
    let again = w.pools.enroll_worker(&orch, "w1", "wrk-y".into(), "y", good, None, vec![], "ty").await;
    assert!(matches!(again, Err(PoolError::CodeUsed)), "{again:?}");

    // Expiry, role and pool are enforced.
    w.pools
        .create_code("late", "byo-acme", MemberKind::Worker, Grants::default(), None, Millis::from_secs(60))
        .await
        .unwrap();
    w.clock.advance(Millis::from_secs(61));
    let late = w.pools.enroll_worker(&orch, "late", "wrk-z".into(), "z", good, None, vec![], "tz").await;
    assert!(matches!(late, Err(PoolError::CodeExpired(_))), "{late:?}");
    w.pools.create_code("for-worker", "byo-acme", MemberKind::Worker, Grants::default(), None, HOUR).await.unwrap();
    let role = w.pools.enroll_orchestrator("for-worker", "orch-3".into(), "o", "to").await;
    assert!(matches!(role, Err(PoolError::WrongRole { .. })), "{role:?}");
    w.pools.create_code("globex", "byo-globex", MemberKind::Worker, Grants::default(), None, HOUR).await.unwrap();
    let pool = w.pools.enroll_worker(&orch, "globex", "wrk-g".into(), "g", good, None, vec![], "tg").await;
    assert!(matches!(pool, Err(PoolError::WrongPool { .. })), "{pool:?}");
    // A low-order X25519 key is refused.
    let low = WorkerKeys { sealing: [0; 32], ..good };
    w.pools.create_code("low", "byo-acme", MemberKind::Worker, Grants::default(), None, HOUR).await.unwrap();
    let refused = w.pools.enroll_worker(&orch, "low", "wrk-l".into(), "l", low, None, vec![], "tl").await;
    assert!(matches!(refused, Err(PoolError::Invalid { ref field, .. }) if field == "sealing_key"), "{refused:?}");
}

async fn submit_pooled(w: &World, project: &str, tier: &str) -> RunId {
    let definition = json!({"stages":[{"key":"job","executor":{"kind":"shell","argv":["true"],"placement":"pool","sandbox":{"tier":tier}}}]});
    let request = SubmitRequest {
        project_id: project.into(),
        definition: serde_json::from_value(definition).unwrap(),
        sources: vec![],
        idempotency_key: None,
        recipients: vec![],
        signed: None,
    };
    w.engine.submit(request).await.unwrap().snapshot.run.id
}

/// A result for `claim` signed with `seed`, claiming no outputs.
fn sign(claim: &Claim, input_sha: [u8; 32], outcome: StageOutcome, seed: &[u8; 32]) -> (JobId, JobReport) {
    sign_outputs(claim, input_sha, outcome, seed, &[])
}

/// A result whose signed manifest lists `outputs` (name, bytes).
fn sign_outputs(
    claim: &Claim,
    input_sha: [u8; 32],
    outcome: StageOutcome,
    seed: &[u8; 32],
    outputs: &[(&str, &[u8])],
) -> (JobId, JobReport) {
    let job = JobId { run: claim.run.id, stage: claim.stage.key.clone(), attempt: claim.stage.attempt };
    let manifest = outputs.iter().map(|(n, b)| (n.to_string(), hex::encode(Sha256::digest(b)))).collect();
    let output = pond_core::pool::output_digest(&manifest);
    let rc = JobReport::rc(&outcome);
    let a = Attestation { job_id: job.to_string(), input_sha256: input_sha, output_sha256: output, rc };
    let signature = a.sign(seed).unwrap();
    (job, JobReport { outcome, input_sha256: input_sha, output_sha256: output, signature, usage: None })
}

#[tokio::test]
async fn tenants_only_see_their_jobs_and_results_are_verified_or_flagged() {
    let w = world();
    let orch = orchestrator(&w, "byo").await;
    let (acme, acme_seed) = worker(&w, &orch, 1, &["pool:byo", "tenant:acme"]).await;
    let (globex, globex_seed) = worker(&w, &orch, 2, &["pool:byo", "tenant:globex"]).await;
    let run = submit_pooled(&w, "acme", "byo").await;
    let trusted_run = submit_pooled(&w, "acme", "trusted").await;

    // Tenant B's worker polling for tenant A's job gets nothing; neither gets the trusted job.
    assert!(w.engine.claim_for_worker(&globex, 10).await.unwrap().is_empty());
    let claims = w.engine.claim_for_worker(&acme, 10).await.unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].run.id, run);
    // The server's own driver never takes a pooled stage.
    assert!(w.engine.claim(10).await.unwrap().is_empty());

    let input = w.engine.job_input(&claims[0]).await.unwrap();
    // A run without sources gets the empty input: nothing stored, packed or unpacked.
    let issued: [u8; 32] = Sha256::digest([]).into();
    assert_eq!(input.sha256, hex::encode(issued));
    assert_eq!(input.blob_id, None);
    // Another tenant's worker cannot report for this job.
    let (job, good) = sign(&claims[0], issued, StageOutcome::Succeeded, &acme_seed);
    let stolen = w.engine.complete_job(&job, &globex, &good).await;
    assert!(matches!(stolen, Err(CoreError::StaleAttempt { .. })), "{stolen:?}");
    // A result signed with another key fails the stage (attestation `required`, the default),
    // and is kept flagged.
    let (_, forged) = sign(&claims[0], issued, StageOutcome::Succeeded, &globex_seed);
    let done = w.engine.complete_job(&job, &acme, &forged).await.unwrap();
    let attempt = done.attempts.iter().find(|a| a.stage_key == "job").unwrap();
    let record = attempt.attestation.clone().unwrap();
    assert!(!record.verified, "{record:?}");
    assert!(record.detail.contains("does not verify"), "{record:?}");
    assert_eq!(done.stage("job").unwrap().state, StageState::Failed);
    let error = done.stage("job").unwrap().error.clone().unwrap_or_default();
    assert!(error.contains("not verified") && error.contains("attestation policy `required`"), "{error}");
    // Replaying the good result now is refused: the attempt no longer holds the stage.
    let replay = w.engine.complete_job(&job, &acme, &good).await;
    assert!(matches!(replay, Err(CoreError::StaleAttempt { .. })), "{replay:?}");

    // A correctly signed result about a different input is flagged too.
    let run2 = submit_pooled(&w, "acme", "byo").await;
    let claims = w.engine.claim_for_worker(&acme, 10).await.unwrap();
    assert_eq!(claims[0].run.id, run2);
    w.engine.job_input(&claims[0]).await.unwrap();
    let (job2, other_input) = sign(&claims[0], [9; 32], StageOutcome::Succeeded, &acme_seed);
    let done = w.engine.complete_job(&job2, &acme, &other_input).await.unwrap();
    let record = done.attempts[0].attestation.clone().unwrap();
    assert!(!record.verified && record.detail.contains("not the bundle pond issued"), "{record:?}");
    assert_eq!(done.stage("job").unwrap().state, StageState::Failed);

    // A good one verifies.
    let run3 = submit_pooled(&w, "acme", "byo").await;
    let claims = w.engine.claim_for_worker(&acme, 10).await.unwrap();
    let input = w.engine.job_input(&claims[0]).await.unwrap();
    let sha: [u8; 32] = hex::decode(&input.sha256).unwrap().try_into().unwrap();
    let (job3, report) =
        sign(&claims[0], sha, StageOutcome::Failed { error: "rc 3".into(), exit_code: Some(3) }, &acme_seed);
    let done = w.engine.complete_job(&job3, &acme, &report).await.unwrap();
    assert_eq!(done.run.id, run3);
    assert!(done.attempts[0].attestation.as_ref().unwrap().verified, "{:?}", done.attempts[0]);
    assert_eq!(done.stage("job").unwrap().exit_code, Some(3));
    let _ = trusted_run;
}

/// The signed manifest must equal what pond stored for the attempt: a changed, extra or
/// missing artifact (an orchestrator relaying uploads swapped one) fails verification.
#[tokio::test]
async fn results_verify_only_if_the_signed_manifest_is_what_was_stored() {
    let w = world();
    let orch = orchestrator(&w, "p").await;
    let (acme, seed) = worker(&w, &orch, 1, &["pool:byo", "tenant:acme"]).await;
    // Each case: what the worker signed, what reached pond's store, whether it verifies.
    let cases: Vec<(&str, Vec<(&str, &[u8])>, Vec<(&str, &[u8])>, bool)> = vec![
        ("as signed", vec![("a.txt", b"PASS")], vec![("a.txt", b"PASS")], true),
        ("swapped bytes", vec![("a.txt", b"PASS")], vec![("a.txt", b"FAIL")], false),
        ("extra artifact", vec![("a.txt", b"PASS")], vec![("a.txt", b"PASS"), ("b.txt", b"x")], false),
        ("missing artifact", vec![("a.txt", b"PASS"), ("b.txt", b"x")], vec![("a.txt", b"PASS")], false),
        ("renamed", vec![("a.txt", b"PASS")], vec![("c.txt", b"PASS")], false),
    ];
    for (what, signed, stored, verifies) in cases {
        submit_pooled(&w, "acme", "byo").await;
        let claim = w.engine.claim_for_worker(&acme, 1).await.unwrap().remove(0);
        let input = w.engine.job_input(&claim).await.unwrap();
        let sha: [u8; 32] = hex::decode(&input.sha256).unwrap().try_into().unwrap();
        let (job, report) = sign_outputs(&claim, sha, StageOutcome::Succeeded, &seed, &signed);
        for (name, bytes) in &stored {
            w.engine.job_artifact(&job, &acme, &claim.run, name, bytes).await.unwrap();
        }
        let done = w.engine.complete_job(&job, &acme, &report).await.unwrap();
        let record = done.attempts[0].attestation.clone().unwrap();
        assert_eq!(record.verified, verifies, "{what}: {record:?}");
        let state = done.stage("job").unwrap().state;
        assert_eq!(state, if verifies { StageState::Succeeded } else { StageState::Failed }, "{what}");
        if !verifies {
            assert!(record.detail.contains("does not match"), "{what}: {record:?}");
        }
    }
}

/// The attack an outside check found: whoever relays uploads (the orchestrator) holds an upload
/// open, relays the worker's verified result, then finishes the upload with other bytes. Once a
/// result is reported its attempt takes no more output, so the verified artifacts stay.
#[tokio::test]
async fn an_upload_finished_after_the_result_changes_nothing() {
    let w = world();
    let orch = orchestrator(&w, "p").await;
    let (acme, seed) = worker(&w, &orch, 1, &["pool:byo", "tenant:acme"]).await;
    let run = submit_pooled(&w, "acme", "byo").await;
    let claim = w.engine.claim_for_worker(&acme, 1).await.unwrap().remove(0);
    let input = w.engine.job_input(&claim).await.unwrap();
    let sha: [u8; 32] = hex::decode(&input.sha256).unwrap().try_into().unwrap();
    let (job, report) = sign_outputs(&claim, sha, StageOutcome::Succeeded, &seed, &[("a.txt", b"PASS")]);
    w.engine.job_artifact(&job, &acme, &claim.run, "a.txt", b"PASS").await.unwrap();
    let done = w.engine.complete_job(&job, &acme, &report).await.unwrap();
    assert!(done.attempts[0].attestation.as_ref().unwrap().verified);
    let blobs = w.store.list_blobs(None, 1000).await.unwrap().len();
    for (name, bytes) in [("a.txt", &b"FAIL"[..]), ("extra.txt", &b"x"[..])] {
        let late = w.engine.job_artifact(&job, &acme, &claim.run, name, bytes).await;
        match late {
            Err(CoreError::Store(pond_core::StoreError::Conflict(m))) => {
                assert!(m.contains("no longer takes output"), "{m}")
            }
            other => panic!("a late upload of {name} was not refused: {other:?}"),
        }
    }
    let stored = w.store.list_artifacts(run).await.unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].sha256, hex::encode(Sha256::digest(b"PASS")));
    // What the refused uploads stored went with the refusal.
    assert_eq!(w.store.list_blobs(None, 1000).await.unwrap().len(), blobs, "a refused upload left its blob");
}

/// Two pooled stages of one run, on two workers at once: the second to use a name is refused
/// (naming the stage that has it), and the first stage's genuine result still verifies.
#[tokio::test]
async fn parallel_stages_cannot_take_each_other_s_artifact_names() {
    let w = world();
    let orch = orchestrator(&w, "p").await;
    let (one, one_seed) = worker(&w, &orch, 1, &["pool:byo", "tenant:acme"]).await;
    let (two, _) = worker(&w, &orch, 2, &["pool:byo", "tenant:acme"]).await;
    let stage = |key: &str| json!({"key":key,"needs":[],"executor":{"kind":"shell","argv":["true"],"placement":"pool","sandbox":{"tier":"byo"}}});
    let request = SubmitRequest {
        project_id: "acme".into(),
        definition: serde_json::from_value(json!({"stages":[stage("left"), stage("right")]})).unwrap(),
        sources: vec![],
        idempotency_key: None,
        recipients: vec![],
        signed: None,
    };
    w.engine.submit(request).await.unwrap();
    let first = w.engine.claim_for_worker(&one, 1).await.unwrap().remove(0);
    let second = w.engine.claim_for_worker(&two, 1).await.unwrap().remove(0);
    let input = w.engine.job_input(&first).await.unwrap();
    let sha: [u8; 32] = hex::decode(&input.sha256).unwrap().try_into().unwrap();
    let (job1, report1) = sign_outputs(&first, sha, StageOutcome::Succeeded, &one_seed, &[("report.txt", b"mine")]);
    let job2 = JobId { run: second.run.id, stage: second.stage.key.clone(), attempt: second.stage.attempt };
    w.engine.job_artifact(&job1, &one, &first.run, "report.txt", b"mine").await.unwrap();
    let taken = w.engine.job_artifact(&job2, &two, &second.run, "report.txt", b"theirs").await;
    match taken {
        Err(CoreError::Store(pond_core::StoreError::Conflict(m))) => {
            assert!(m.contains(&format!("stage `{}`", first.stage.key)), "{m}")
        }
        other => panic!("the second stage took the name: {other:?}"),
    }
    // A worker cannot write into another worker's attempt either.
    assert!(w.engine.job_artifact(&job1, &two, &first.run, "other.txt", b"x").await.is_err());
    let done = w.engine.complete_job(&job1, &one, &report1).await.unwrap();
    let record = done.attempts.iter().find(|a| a.stage_key == first.stage.key).unwrap().attestation.clone().unwrap();
    assert!(record.verified, "{record:?}");
}

/// `"attestation": "record"` keeps an unverified result applied (flagged), as an opt-out.
#[tokio::test]
async fn the_record_policy_applies_an_unverified_result_flagged() {
    let w = world();
    let orch = orchestrator(&w, "p").await;
    let (acme, _) = worker(&w, &orch, 1, &["pool:byo", "tenant:acme"]).await;
    let definition = json!({"stages":[{"key":"job","attestation":"record",
        "executor":{"kind":"shell","argv":["true"],"placement":"pool","sandbox":{"tier":"byo"}}}]});
    let request = SubmitRequest {
        project_id: "acme".into(),
        definition: serde_json::from_value(definition).unwrap(),
        sources: vec![],
        idempotency_key: None,
        recipients: vec![],
        signed: None,
    };
    w.engine.submit(request).await.unwrap();
    let claim = w.engine.claim_for_worker(&acme, 1).await.unwrap().remove(0);
    let input = w.engine.job_input(&claim).await.unwrap();
    let sha: [u8; 32] = hex::decode(&input.sha256).unwrap().try_into().unwrap();
    let (job, forged) = sign(&claim, sha, StageOutcome::Succeeded, &[42; 32]);
    let done = w.engine.complete_job(&job, &acme, &forged).await.unwrap();
    assert!(!done.attempts[0].attestation.as_ref().unwrap().verified);
    assert_eq!(done.stage("job").unwrap().state, StageState::Succeeded);
}

#[tokio::test]
async fn a_silent_worker_loses_its_job_and_its_late_result_is_refused() {
    let w = world();
    let orch = orchestrator(&w, "p").await;
    let (a, a_seed) = worker(&w, &orch, 1, &["pool:byo", "tenant:acme"]).await;
    let (b, _) = worker(&w, &orch, 2, &["pool:byo", "tenant:acme"]).await;
    let run = submit_pooled(&w, "acme", "byo").await;
    let first = w.engine.claim_for_worker(&a, 1).await.unwrap().remove(0);
    let input = w.engine.job_input(&first).await.unwrap();
    let sha: [u8; 32] = hex::decode(&input.sha256).unwrap().try_into().unwrap();
    // Within the lease, nobody else can take it.
    w.clock.advance(Millis::from_secs(20));
    assert!(w.engine.claim_for_worker(&b, 1).await.unwrap().is_empty());
    // Worker `a` stops heartbeating; after the lease, `b` takes it as attempt 2.
    w.clock.advance(Millis::from_secs(11));
    let second = w.engine.claim_for_worker(&b, 1).await.unwrap().remove(0);
    assert_eq!(second.stage.attempt, 2);
    let job1 = JobId { run, stage: "job".into(), attempt: 1 };
    assert_eq!(w.engine.renew_job(&job1, &a).await.unwrap(), pond_core::store::LeaseStatus::Lost);
    let (_, late) = sign(&first, sha, StageOutcome::Succeeded, &a_seed);
    let refused = w.engine.complete_job(&job1, &a, &late).await;
    assert!(matches!(refused, Err(CoreError::StaleAttempt { .. })), "{refused:?}");
    let snapshot = w.store.get_run(run).await.unwrap().unwrap();
    assert_eq!(snapshot.attempts[0].outcome, Some(pond_core::run::AttemptOutcome::LeaseExpired));
    assert_eq!(snapshot.stage("job").unwrap().state, StageState::Running);
}
