//! One conformance suite for every store: each case is a function over `Arc<dyn Store>`, and
//! `conformance!` generates a `#[tokio::test]` per case for each backend. The memory store
//! runs first as the reference.

use std::any::Any;
use std::collections::HashSet;
use std::sync::Arc;

use pond_core::definition::Definition;
use pond_core::ids::{RunId, TokenId};
use pond_core::run::{AttemptOutcome, RunSnapshot, RunState, StageOutcome, StageState};
use pond_core::store::{
    Artifact, ClaimQuery, InsertOutcome, LeaseStatus, LogStream, NewLogLine, Role, RunQuery, Store, TokenRecord,
    BLOB_CHUNK_BYTES,
};
use pond_core::time::{Millis, Timestamp};
use pond_core::StoreError;
use serde_json::json;

const T0: Timestamp = Timestamp::from_millis(1_800_000_000_000);

fn at(ms: i64) -> Timestamp {
    Timestamp::from_millis(T0.as_millis() + ms)
}

fn definition(value: serde_json::Value) -> Definition {
    serde_json::from_value(value).expect("test definition")
}

fn new_run(project: &str, def: serde_json::Value, key: Option<&str>, now: Timestamp) -> RunSnapshot {
    RunSnapshot::new(RunId::generate(now), project.into(), definition(def), vec![], key.map(str::to_string), now)
}

fn one_noop() -> serde_json::Value {
    json!({"stages":[{"key":"a","executor":{"kind":"noop"}}]})
}

fn claim_query(owner: &str, now: Timestamp, lease: i64, limit: u32) -> ClaimQuery {
    ClaimQuery {
        owner: owner.into(),
        kinds: vec!["noop".into(), "shell".into()],
        now,
        lease_until: now.plus(Millis(lease as u64)),
        limit,
        offer: None,
    }
}

pub async fn runs_round_trip_and_list_newest_first(store: Arc<dyn Store>) {
    let mut ids = Vec::new();
    for i in 0..5 {
        let project = if i % 2 == 0 { "even" } else { "odd" };
        let run = new_run(project, one_noop(), None, at(i));
        assert!(matches!(store.insert_run(&run).await.unwrap(), InsertOutcome::Created));
        assert_eq!(store.get_run(run.run.id).await.unwrap().as_ref(), Some(&run));
        ids.push(run.run.id);
    }
    let all = store.list_runs(&RunQuery { limit: 10, ..Default::default() }).await.unwrap();
    let got: Vec<RunId> = all.iter().map(|r| r.id).collect();
    let mut want = ids.clone();
    want.reverse();
    assert_eq!(got, want, "newest first");

    let page1 = store.list_runs(&RunQuery { limit: 2, ..Default::default() }).await.unwrap();
    let page2 = store.list_runs(&RunQuery { limit: 2, before: Some(page1[1].id), ..Default::default() }).await.unwrap();
    assert_eq!(page2.iter().map(|r| r.id).collect::<Vec<_>>(), want[2..4].to_vec(), "cursor continues");

    let even = store
        .list_runs(&RunQuery { limit: 10, projects: Some(vec!["even".into()]), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(even.len(), 3);
    assert!(even.iter().all(|r| r.project_id == "even"));
    let none = store.list_runs(&RunQuery { limit: 10, projects: Some(vec![]), ..Default::default() }).await.unwrap();
    assert!(none.is_empty(), "an empty project list sees nothing");
    let queued =
        store.list_runs(&RunQuery { limit: 10, state: Some(RunState::Succeeded), ..Default::default() }).await.unwrap();
    assert!(queued.is_empty());
    assert!(store.get_run(RunId::generate(T0)).await.unwrap().is_none());

    // Text search: stage keys and names in the definition, any case; `%`, `_` and `\` are text.
    let named = new_run(
        "odd",
        json!({"stages":[{"key":"lint_zz9","name":"Check 100%","executor":{"kind":"noop"}}]}),
        Some("idem-Q"),
        at(9),
    );
    store.insert_run(&named).await.unwrap();
    let search = |text: &str| {
        let store = store.clone();
        let query = RunQuery { limit: 10, text: Some(text.to_string()), ..Default::default() };
        async move { store.list_runs(&query).await.unwrap().iter().map(|r| r.id).collect::<Vec<_>>() }
    };
    assert_eq!(search("ZZ9").await, vec![named.run.id], "a stage key, in another case");
    assert_eq!(search("check 100%").await, vec![named.run.id], "a name with `%`");
    assert_eq!(search("lint_").await, vec![named.run.id]);
    assert!(search("lintXzz9").await.is_empty(), "`_` matches only itself");
    assert!(search("100%%").await.is_empty(), "`%` matches only itself");
    assert!(search("\\").await.is_empty());
    assert_eq!(search("idem-q").await, vec![named.run.id], "the idempotency key");
    let prefix = &named.run.id.to_string()[..13];
    assert!(search(prefix).await.contains(&named.run.id), "the id");
    assert_eq!(search("\"noop\"").await.len(), 6, "every run's definition");
}

pub async fn idempotency_key_returns_the_first_run(store: Arc<dyn Store>) {
    let mut first = new_run("p", one_noop(), Some("k1"), at(0));
    // The digest of the first request is kept with the run, so the engine can tell a retry
    // from another request reusing the key.
    first.run.request_digest = Some("digest-of-the-first-request".into());
    assert!(matches!(store.insert_run(&first).await.unwrap(), InsertOutcome::Created));
    let stored = store.get_run(first.run.id).await.unwrap().unwrap();
    assert_eq!(stored.run.request_digest.as_deref(), Some("digest-of-the-first-request"));
    let mut retry = new_run("p", one_noop(), Some("k1"), at(1));
    retry.run.request_digest = Some("digest-of-another-request".into());
    match store.insert_run(&retry).await.unwrap() {
        InsertOutcome::Existing(existing) => {
            assert_eq!(existing.run.id, first.run.id);
            assert_eq!(existing.run.request_digest.as_deref(), Some("digest-of-the-first-request"));
        }
        InsertOutcome::Created => panic!("a retried submit created a second run"),
    }
    let other_project = new_run("q", one_noop(), Some("k1"), at(2));
    assert!(matches!(store.insert_run(&other_project).await.unwrap(), InsertOutcome::Created), "keys are per project");
    assert!(store.get_run(retry.run.id).await.unwrap().is_none());
}

pub async fn concurrent_submits_with_one_key_make_one_run(store: Arc<dyn Store>) {
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let key = if i % 2 == 0 { Some("same-key") } else { None };
                let run = new_run("p", one_noop(), key, at(i));
                let id = run.run.id;
                match store.insert_run(&run).await.unwrap() {
                    InsertOutcome::Created => (key.is_some(), id, true),
                    InsertOutcome::Existing(existing) => (key.is_some(), existing.run.id, false),
                }
            })
        })
        .collect();
    let mut keyed = HashSet::new();
    let (mut created_keyed, mut created_plain) = (0, 0);
    for t in tasks {
        let (has_key, id, created) = t.await.unwrap();
        if has_key {
            keyed.insert(id);
            created_keyed += created as usize;
        } else {
            created_plain += created as usize;
        }
    }
    assert_eq!((keyed.len(), created_keyed), (1, 1), "eight racing submits with one key made one run");
    assert_eq!(created_plain, 8, "submits without a key are all created");
    let all = store.list_runs(&RunQuery { limit: 100, ..Default::default() }).await.unwrap();
    assert_eq!(all.len(), 9);
}

pub async fn claims_take_ready_stages_once_in_order(store: Arc<dyn Store>) {
    let def = json!({"stages":[
        {"key":"a","executor":{"kind":"noop"}},
        {"key":"b","executor":{"kind":"noop"}},
        {"key":"c","executor":{"kind":"builtin","name":"repo_map"},"needs":[]}
    ]});
    let run = new_run("p", def, None, at(0));
    store.insert_run(&run).await.unwrap();
    let claims = store.claim_stages(&claim_query("n1", at(1), 1000, 10)).await.unwrap();
    assert_eq!(claims.len(), 1, "b waits for a; c's kind is not offered");
    let claim = &claims[0];
    assert_eq!((claim.stage.key.as_str(), claim.stage.attempt, claim.stage.state), ("a", 1, StageState::Running));
    assert_eq!(claim.run.id, run.run.id);
    assert_eq!(claim.run.state, RunState::Running);
    assert!(store.claim_stages(&claim_query("n2", at(2), 1000, 10)).await.unwrap().is_empty(), "claimed once");

    let snapshot = store.get_run(run.run.id).await.unwrap().unwrap();
    assert_eq!(snapshot.run.state, RunState::Running);
    assert_eq!(snapshot.attempts.len(), 1);
    assert_eq!(snapshot.attempts[0].owner, "n1");

    let done = store
        .update_run(run.run.id, &mut |s| {
            s.complete_attempt("a", 1, &StageOutcome::Succeeded, at(3))?;
            let line = NewLogLine::text(Some("a".into()), 1, LogStream::System, at(3), "a done".into());
            Ok(vec![line])
        })
        .await
        .unwrap();
    assert_eq!(done.stage("b").unwrap().ready_at, Some(at(3)));
    let logged = store.read_logs(run.run.id, 0, 10).await.unwrap();
    assert_eq!(
        logged.iter().map(|l| l.line.text.as_str()).collect::<Vec<_>>(),
        vec!["a done"],
        "lines land with the change"
    );
    let next = store.claim_stages(&claim_query("n2", at(4), 1000, 10)).await.unwrap();
    assert_eq!(next.iter().map(|c| c.stage.key.as_str()).collect::<Vec<_>>(), vec!["b"]);
}

pub async fn concurrent_claims_never_share_a_stage(store: Arc<dyn Store>) {
    let stages: Vec<_> =
        (0..20).map(|i| json!({"key": format!("s{i}"), "executor":{"kind":"noop"}, "needs": []})).collect();
    for i in 0..10 {
        store.insert_run(&new_run("p", json!({"stages": stages}), None, at(i))).await.unwrap();
    }
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let claims = store.claim_stages(&claim_query(&format!("w{worker}"), at(100), 60_000, 3)).await.unwrap();
                if claims.is_empty() {
                    return mine;
                }
                mine.extend(claims.into_iter().map(|c| (c.run.id, c.stage.key)));
                tokio::task::yield_now().await;
            }
        }));
    }
    let mut seen = HashSet::new();
    let mut total = 0;
    for task in tasks {
        for item in task.await.unwrap() {
            total += 1;
            assert!(seen.insert(item.clone()), "stage {item:?} was claimed twice");
        }
    }
    assert_eq!(total, 200, "every stage claimed exactly once");
}

pub async fn expired_leases_are_reclaimed_as_new_attempts(store: Arc<dyn Store>) {
    let run = new_run("p", one_noop(), None, at(0));
    let id = run.run.id;
    store.insert_run(&run).await.unwrap();
    let first = store.claim_stages(&claim_query("dead", at(0), 1000, 1)).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(
        store.renew_lease(id, "a", 1, "dead", at(500).plus(Millis(1000))).await.unwrap(),
        LeaseStatus::Held { cancel_requested: false }
    );
    assert!(store.claim_stages(&claim_query("n2", at(1200), 1000, 1)).await.unwrap().is_empty(), "renewed lease holds");
    let second = store.claim_stages(&claim_query("n2", at(1600), 1000, 1)).await.unwrap();
    assert_eq!(second.len(), 1, "lease expired at 1500");
    assert_eq!((second[0].stage.attempt, second[0].stage.lost_leases), (2, 1));
    assert_eq!(store.renew_lease(id, "a", 1, "dead", at(1700)).await.unwrap(), LeaseStatus::Lost, "old holder lost it");

    let stale = store
        .update_run(id, &mut |s| s.complete_attempt("a", 1, &StageOutcome::Succeeded, at(1800)).map(|()| Vec::new()))
        .await;
    assert!(matches!(stale, Err(StoreError::Rejected(_))), "late result of the lost attempt is refused");
    let snapshot = store.get_run(id).await.unwrap().unwrap();
    assert_eq!(snapshot.stage("a").unwrap().state, StageState::Running, "rejected mutation wrote nothing");
    let outcomes: Vec<_> = snapshot.attempts.iter().map(|a| (a.number, a.owner.clone(), a.outcome)).collect();
    assert_eq!(outcomes, vec![(1, "dead".into(), Some(AttemptOutcome::LeaseExpired)), (2, "n2".into(), None)]);

    let done = store
        .update_run(id, &mut |s| s.complete_attempt("a", 2, &StageOutcome::Succeeded, at(1900)).map(|()| Vec::new()))
        .await
        .unwrap();
    assert_eq!(done.run.state, RunState::Succeeded);
    assert_eq!(store.get_run(id).await.unwrap().unwrap(), done);
}

pub async fn cancelled_stages_of_vanished_holders_are_reaped(store: Arc<dyn Store>) {
    let run = new_run("p", one_noop(), None, at(0));
    let id = run.run.id;
    store.insert_run(&run).await.unwrap();
    store.claim_stages(&claim_query("n1", at(0), 1000, 1)).await.unwrap();
    store
        .update_run(id, &mut |s| {
            s.cancel("by test", at(10));
            Ok(Vec::new())
        })
        .await
        .unwrap();
    assert_eq!(
        store.renew_lease(id, "a", 1, "n1", at(2000)).await.unwrap(),
        LeaseStatus::Held { cancel_requested: true }
    );
    assert!(store.runs_to_reap(at(1500), 10).await.unwrap().is_empty(), "lease still held");
    assert_eq!(store.expire_all_leases(at(1600)).await.unwrap(), 1);
    assert!(
        store.claim_stages(&claim_query("n2", at(1700), 1000, 1)).await.unwrap().is_empty(),
        "a cancelled stage is not re-run"
    );
    assert_eq!(store.runs_to_reap(at(1700), 10).await.unwrap(), vec![id]);
    let reaped = store
        .update_run(id, &mut |s| {
            s.reap(at(1700));
            Ok(Vec::new())
        })
        .await
        .unwrap();
    assert_eq!(reaped.run.state, RunState::Cancelled);
    assert!(store.runs_to_reap(at(1800), 10).await.unwrap().is_empty());
}

pub async fn logs_append_in_order_and_page_by_cursor(store: Arc<dyn Store>) {
    let a = RunId::generate(at(0));
    let b = RunId::generate(at(1));
    let line = |i: usize| NewLogLine::text(Some("s".into()), 1, LogStream::Stdout, at(i as i64), format!("line {i}"));
    let lines: Vec<_> = (0..25).map(line).collect();
    store.append_logs(a, &lines[..10]).await.unwrap();
    store.append_logs(b, &[line(99)]).await.unwrap();
    store.append_logs(a, &lines[10..]).await.unwrap();
    let first = store.read_logs(a, 0, 20).await.unwrap();
    assert_eq!(first.len(), 20);
    let rest = store.read_logs(a, first.last().unwrap().seq, 20).await.unwrap();
    let texts: Vec<_> = first.iter().chain(&rest).map(|l| l.line.text.clone()).collect();
    assert_eq!(texts, (0..25).map(|i| format!("line {i}")).collect::<Vec<_>>());
    assert!(first.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(store.read_logs(b, 0, 10).await.unwrap()[0].line, line(99));
    assert!(store.read_logs(a, rest.last().unwrap().seq, 10).await.unwrap().is_empty());

    let batch = vec![(a, line(100)), (b, line(101)), (a, line(102))];
    store.append_log_batch(&batch).await.unwrap();
    let tail: Vec<_> =
        store.read_logs(a, rest.last().unwrap().seq, 10).await.unwrap().into_iter().map(|l| l.line).collect();
    assert_eq!(tail, vec![line(100), line(102)], "a batch lands in each run's log in order");
    assert_eq!(store.read_logs(b, 0, 10).await.unwrap().len(), 2);
}

/// Any bytes round-trip (NUL, invalid UTF-8, a long line in continued pieces), and a batch
/// delivered twice (a producer's retry) is stored once.
pub async fn log_lines_are_byte_exact_and_idempotent(store: Arc<dyn Store>) {
    use pond_core::exec::OutputLine;
    let run = RunId::generate(at(0));
    let pieces: Vec<Vec<u8>> = vec![
        b"plain text".to_vec(),
        b"nul \0 inside".to_vec(),
        vec![0xff, 0xfe, b'x', 0x80],
        "ünïcödé ✓".as_bytes().to_vec(),
        vec![b'a'; 16 * 1024],
        b"end of the long line".to_vec(),
        Vec::new(),
    ];
    let lines: Vec<NewLogLine> = pieces
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            let out = OutputLine { stream: LogStream::Stdout, bytes: bytes.clone(), continued: i == 4 };
            NewLogLine::output("s", 1, at(1), &out, i as u64)
        })
        .collect();
    store.append_logs(run, &lines[..5]).await.unwrap();
    // The producer did not hear back and sends lines 3.. again.
    store.append_logs(run, &lines[3..]).await.unwrap();
    let stored = store.read_logs(run, 0, 100).await.unwrap();
    assert_eq!(stored.len(), pieces.len(), "every line once: {stored:?}");
    for (line, want) in stored.iter().zip(&pieces) {
        assert_eq!(&line.line.bytes().unwrap(), want);
    }
    assert!(stored[4].line.continued && !stored[5].line.continued);
    // Another attempt's line 0 is another line.
    let again = NewLogLine::output("s", 2, at(2), &OutputLine::text(LogStream::Stdout, "attempt 2"), 0);
    store.append_logs(run, &[again]).await.unwrap();
    assert_eq!(store.read_logs(run, 0, 100).await.unwrap().len(), pieces.len() + 1);
}

pub async fn blobs_and_artifacts_are_chunked_and_written_only_by_their_open_attempt(store: Arc<dyn Store>) {
    let data: Vec<u8> = (0..(BLOB_CHUNK_BYTES * 2 + 12345)).map(|i| (i * 7 % 251) as u8).collect();
    let meta = store.put_blob("p", &data, at(0)).await.unwrap();
    assert_eq!((meta.size, meta.chunk_count()), (data.len() as u64, 3));
    assert_eq!(store.blob_meta(meta.id).await.unwrap(), Some(meta.clone()));
    assert_eq!(pond_core::store::read_blob(&*store, &meta).await.unwrap(), data);
    let empty = store.put_blob("p", b"", at(0)).await.unwrap();
    assert_eq!(pond_core::store::read_blob(&*store, &empty).await.unwrap(), b"");
    assert_eq!(empty.sha256, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    // Listed in id order, a page at a time; replaced in place only while unchanged.
    let mut both = vec![meta.clone(), empty.clone()];
    both.sort_by_key(|m| m.id.to_string());
    assert_eq!(store.list_blobs(None, 10).await.unwrap(), both);
    assert_eq!(store.list_blobs(None, 1).await.unwrap(), both[..1]);
    assert_eq!(store.list_blobs(Some(both[0].id), 10).await.unwrap(), both[1..]);
    assert_eq!(store.list_blobs(Some(both[1].id), 10).await.unwrap(), []);
    let shorter = &data[..BLOB_CHUNK_BYTES + 3];
    assert!(!store.replace_blob(meta.id, &empty.sha256, shorter).await.unwrap(), "a stale hash replaces nothing");
    assert!(store.replace_blob(meta.id, &meta.sha256, shorter).await.unwrap());
    let replaced = store.blob_meta(meta.id).await.unwrap().unwrap();
    assert_eq!((replaced.size, replaced.chunk_count()), (shorter.len() as u64, 2));
    assert_eq!(pond_core::store::read_blob(&*store, &replaced).await.unwrap(), shorter);
    assert!(!store.replace_blob(meta.id, &meta.sha256, &data).await.unwrap(), "replaced already");
    assert!(store.replace_blob(meta.id, &replaced.sha256, &data).await.unwrap());
    assert_eq!(pond_core::store::read_blob(&*store, &meta).await.unwrap(), data);
    // A prefix reads only the start of the first chunk.
    assert_eq!(store.read_blob_prefix(meta.id, 100).await.unwrap(), data[..100]);
    assert_eq!(store.read_blob_prefix(empty.id, 100).await.unwrap(), b"");
    assert!(store.read_blob_prefix(pond_core::ids::BlobId::generate(at(0)), 100).await.is_err());

    // Two stages running in parallel, both held by node n1.
    let snapshot = new_run(
        "p",
        json!({"stages":[{"key":"a","executor":{"kind":"noop"},"needs":[]},{"key":"b","executor":{"kind":"noop"},"needs":[]}]}),
        None,
        at(0),
    );
    let run = snapshot.run.id;
    store.insert_run(&snapshot).await.unwrap();
    assert_eq!(store.claim_stages(&claim_query("n1", at(1), 60_000, 2)).await.unwrap().len(), 2);
    let artifact = |stage: &str, attempt: u32, name: &str, blob: &pond_core::store::BlobMeta| Artifact {
        run_id: run,
        name: name.into(),
        stage: stage.into(),
        attempt,
        blob_id: blob.id,
        size: blob.size,
        sha256: blob.sha256.clone(),
        created_at: at(5),
    };
    store.put_artifact(&artifact("a", 1, "z.txt", &empty), "n1", u64::MAX).await.unwrap();
    store.put_artifact(&artifact("a", 1, "dir/a.bin", &meta), "n1", u64::MAX).await.unwrap();
    store.put_artifact(&artifact("a", 1, "z.txt", &meta), "n1", u64::MAX).await.unwrap();
    let listed = store.list_artifacts(run).await.unwrap();
    assert_eq!(listed.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), vec!["dir/a.bin", "z.txt"]);
    assert!(listed.iter().all(|a| a.stage == "a" && a.attempt == 1), "{listed:?}");
    assert_eq!(store.get_artifact(run, "z.txt").await.unwrap().unwrap().blob_id, meta.id, "replaced");
    assert!(store.get_artifact(run, "nope").await.unwrap().is_none());
    assert!(store.list_artifacts(RunId::generate(at(9))).await.unwrap().is_empty());

    // Only the lease holder's current attempt writes; another stage never takes a name over.
    let refused = |r: Result<(), StoreError>, says: &str| match r {
        Err(StoreError::Conflict(m)) => assert!(m.contains(says), "{m}"),
        other => panic!("expected a conflict saying `{says}`: {other:?}"),
    };
    refused(store.put_artifact(&artifact("a", 1, "x", &meta), "n2", u64::MAX).await, "no longer takes output");
    refused(store.put_artifact(&artifact("a", 2, "x", &meta), "n1", u64::MAX).await, "no longer takes output");
    refused(
        store.put_artifact(&artifact("b", 1, "z.txt", &empty), "n1", u64::MAX).await,
        "stage `a` of this run already stored",
    );
    assert_eq!(store.get_artifact(run, "z.txt").await.unwrap().unwrap().blob_id, meta.id, "a's z.txt kept");
    store.put_artifact(&artifact("b", 1, "b.txt", &empty), "n1", u64::MAX).await.unwrap();

    // The run's cap counts what is stored (a name being replaced is not counted twice), in the
    // write's own atomic step: of eight concurrent writes with room for three, three land.
    let cap = 2 * meta.size;
    refused(store.put_artifact(&artifact("b", 1, "big.bin", &meta), "n1", cap).await, "per-run cap");
    store.put_artifact(&artifact("a", 1, "z.txt", &meta), "n1", cap).await.unwrap();
    let cap = 5 * meta.size;
    let mut writes = tokio::task::JoinSet::new();
    for i in 0..8 {
        let (store, artifact) = (store.clone(), artifact("b", 1, &format!("c{i}.bin"), &meta));
        writes.spawn(async move { store.put_artifact(&artifact, "n1", cap).await });
    }
    let landed = writes.join_all().await.into_iter().filter(|r| r.is_ok()).count();
    assert_eq!(landed, 3);
    let total: u64 = store.list_artifacts(run).await.unwrap().iter().map(|a| a.size).sum();
    assert_eq!(total, cap);

    // Closing a's output (its result arrived): nothing more of a's is stored; b still writes.
    assert!(!store.close_output(run, "a", 1, "n2").await.unwrap(), "n2 does not hold a");
    assert!(store.close_output(run, "a", 1, "n1").await.unwrap());
    assert!(store.close_output(run, "a", 1, "n1").await.unwrap(), "closing twice is fine");
    refused(store.put_artifact(&artifact("a", 1, "z.txt", &empty), "n1", u64::MAX).await, "no longer takes output");
    refused(store.put_artifact(&artifact("a", 1, "late.txt", &empty), "n1", u64::MAX).await, "no longer takes output");
    assert_eq!(store.get_artifact(run, "z.txt").await.unwrap().unwrap().blob_id, meta.id);
    assert!(store.get_artifact(run, "late.txt").await.unwrap().is_none());
    store.put_artifact(&artifact("b", 1, "b2.txt", &empty), "n1", u64::MAX).await.unwrap();
}

pub async fn tokens_are_found_by_hash_and_revoked(store: Arc<dyn Store>) {
    let token = TokenRecord {
        id: TokenId::generate(at(0)),
        name: "ci".into(),
        role: Role::Consumer,
        projects: vec!["a".into(), "b".into()],
        secret_sha256: "ab".repeat(32),
        created_at: at(0),
        revoked_at: None,
    };
    store.insert_token(&token).await.unwrap();
    assert_eq!(store.find_token(&token.secret_sha256).await.unwrap(), Some(token.clone()));
    assert!(store.find_token(&"cd".repeat(32)).await.unwrap().is_none());
    let dup = TokenRecord { id: TokenId::generate(at(1)), ..token.clone() };
    assert!(matches!(store.insert_token(&dup).await, Err(StoreError::Conflict(_))));
    assert!(store.revoke_token(token.id, at(7)).await.unwrap());
    assert_eq!(store.find_token(&token.secret_sha256).await.unwrap().unwrap().revoked_at, Some(at(7)));
    assert!(!store.revoke_token(TokenId::generate(at(2)), at(8)).await.unwrap());
    assert_eq!(store.list_tokens().await.unwrap().len(), 1);

    let admin = |n: i64| TokenRecord {
        id: TokenId::generate(at(n)),
        name: format!("admin {n}"),
        role: Role::Admin,
        projects: vec![],
        secret_sha256: format!("{n:064}"),
        created_at: at(n),
        revoked_at: None,
    };
    let racers: Vec<_> = (10..16)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move { store.insert_first_admin(&admin(n)).await.unwrap() })
        })
        .collect();
    let mut stored = 0;
    for r in racers {
        stored += r.await.unwrap() as usize;
    }
    assert_eq!(stored, 1, "nodes starting together make exactly one admin token");
    assert!(!store.insert_first_admin(&admin(20)).await.unwrap());
}

pub async fn concurrent_updates_of_one_run_are_never_lost(store: Arc<dyn Store>) {
    let stages: Vec<_> =
        (0..10).map(|i| json!({"key": format!("s{i}"), "executor":{"kind":"noop"}, "needs": []})).collect();
    let run = new_run("p", json!({"stages": stages}), None, at(0));
    let id = run.run.id;
    store.insert_run(&run).await.unwrap();
    let claims = store.claim_stages(&claim_query("n", at(1), 60_000, 10)).await.unwrap();
    assert_eq!(claims.len(), 10);
    let tasks: Vec<_> = claims
        .into_iter()
        .map(|c| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .update_run(id, &mut |s| {
                        s.complete_attempt(&c.stage.key, c.stage.attempt, &StageOutcome::Succeeded, at(2))
                            .map(|()| Vec::new())
                    })
                    .await
                    .unwrap();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let done = store.get_run(id).await.unwrap().unwrap();
    assert!(done.stages.iter().all(|s| s.state == StageState::Succeeded), "every completion landed");
    assert_eq!(done.run.state, RunState::Succeeded, "the last completion saw all the others");
}

/// A run read while it changes is never shown ended with a stage still unfinished (what
/// `--wait` and every client polling a run rely on): 300 one-stage runs are claimed and
/// completed while two readers keep reading them.
pub async fn a_run_read_as_it_ends_never_shows_an_unfinished_stage(store: Arc<dyn Store>) {
    let mut ids = Vec::new();
    for _ in 0..300 {
        let run = new_run("p", json!({"stages": [{"key": "s", "executor": {"kind": "noop"}}]}), None, at(0));
        ids.push(run.run.id);
        store.insert_run(&run).await.unwrap();
    }
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (store, ids, done) = (store.clone(), ids.clone(), done.clone());
            tokio::spawn(async move {
                let mut torn = Vec::new();
                let mut reads = 0;
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    for id in &ids {
                        let snapshot = store.get_run(*id).await.unwrap().unwrap();
                        reads += 1;
                        if snapshot.run.state.is_terminal() && snapshot.stages.iter().any(|s| !s.state.is_terminal()) {
                            torn.push(format!("{:?} with {:?}", snapshot.run.state, snapshot.stages[0].state));
                        }
                    }
                }
                (torn, reads)
            })
        })
        .collect();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            loop {
                let claims = store.claim_stages(&claim_query("n", at(1), 60_000, 4)).await.unwrap();
                if claims.is_empty() {
                    return;
                }
                for c in claims {
                    store
                        .update_run(c.run.id, &mut |s| {
                            s.complete_attempt(&c.stage.key, c.stage.attempt, &StageOutcome::Succeeded, at(2))
                                .map(|()| Vec::new())
                        })
                        .await
                        .unwrap();
                }
            }
        })
    };
    writer.await.unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut torn, mut reads) = (Vec::new(), 0);
    for reader in readers {
        let (t, r) = reader.await.unwrap();
        torn.extend(t);
        reads += r;
    }
    assert!(
        torn.is_empty(),
        "{} of {reads} reads showed an ended run with an unfinished stage: {:?}",
        torn.len(),
        &torn[..torn.len().min(3)]
    );
}

fn offer(tags: &[&str], caps: &[&str]) -> pond_core::routing::WorkerOffer {
    pond_core::routing::WorkerOffer {
        tags: tags.iter().map(|t| t.to_string()).collect(),
        capabilities: caps.iter().map(|c| c.to_string()).collect(),
    }
}

fn pool_query(owner: &str, now: Timestamp, offer: pond_core::routing::WorkerOffer) -> ClaimQuery {
    ClaimQuery { kinds: vec!["pool".into()], offer: Some(offer), ..claim_query(owner, now, 60_000, 100) }
}

/// A worker's claim takes, of the work it is admitted to, what is due first — whatever other
/// work (needing tags it lacks) was queued earlier — and a limit smaller than the routes it may
/// take still yields the earliest stages.
pub async fn pool_claims_take_admitted_work_in_due_order_past_work_for_others(store: Arc<dyn Store>) {
    let pooled =
        |tags: &[&str]| json!({"stages":[{"key":"s","executor":{"kind":"noop","placement":"pool","tags":tags}}]});
    let mut ids = std::collections::HashMap::new();
    for (name, tags, t) in [
        ("b-early", &["b"][..], 0),
        ("none-0", &[][..], 1),
        ("a-1", &["a"][..], 2),
        ("b-late", &["b"][..], 3),
        ("none-2", &[][..], 4),
        ("a-3", &["a"][..], 5),
    ] {
        let run = new_run("p", pooled(tags), None, at(t));
        store.insert_run(&run).await.unwrap();
        ids.insert(run.run.id, name);
    }
    let names = |claims: &[pond_core::store::Claim]| -> Vec<&str> { claims.iter().map(|c| ids[&c.run.id]).collect() };
    let sorted = |claims: Vec<pond_core::store::Claim>| {
        let mut n = names(&claims);
        n.sort();
        n
    };
    let first =
        store.claim_stages(&ClaimQuery { limit: 1, ..pool_query("w1", at(10), offer(&["a"], &[])) }).await.unwrap();
    assert_eq!(sorted(first), vec!["none-0"], "the earliest admitted stage, not the earlier one needing `b`");
    let next =
        store.claim_stages(&ClaimQuery { limit: 3, ..pool_query("w2", at(10), offer(&["a"], &[])) }).await.unwrap();
    assert_eq!(sorted(next), vec!["a-1", "a-3", "none-2"]);
    let rest = store.claim_stages(&pool_query("w3", at(10), offer(&["a"], &[]))).await.unwrap();
    assert!(rest.is_empty(), "only `b` work is left: {:?}", sorted(rest));
    let b = store.claim_stages(&pool_query("w4", at(10), offer(&["b"], &[]))).await.unwrap();
    assert_eq!(sorted(b), vec!["b-early", "b-late"]);
}

pub async fn pool_claims_match_pinned_tags_and_capability_globs(store: Arc<dyn Store>) {
    // One run per tenant with a byo stage, a trusted stage needing a harness, and a local stage.
    let mut runs = Vec::new();
    for tenant in ["acme", "globex"] {
        let run = new_run(
            tenant,
            json!({"stages":[
                {"key":"byo","needs":[],"executor":{"kind":"noop","placement":"pool","sandbox":{"tier":"byo"}}},
                {"key":"trusted","needs":[],"executor":{"kind":"shell","argv":["true"],"placement":"pool",
                    "capabilities":["harness.*"],"sandbox":{"tier":"trusted"}}},
                {"key":"local","needs":[],"executor":{"kind":"noop"}}
            ]}),
            None,
            at(0),
        );
        store.insert_run(&run).await.unwrap();
        runs.push(run.run.id);
    }
    let keys = |claims: &[pond_core::store::Claim]| {
        let mut k: Vec<(String, String)> =
            claims.iter().map(|c| (c.run.project_id.clone(), c.stage.key.clone())).collect();
        k.sort();
        k
    };
    // Tenant B's byo worker gets nothing of tenant A's, and never the trusted stages.
    let globex = store
        .claim_stages(&pool_query("w-globex", at(1), offer(&["pool:byo", "tenant:globex"], &["harness.codex"])))
        .await
        .unwrap();
    assert_eq!(keys(&globex), vec![("globex".into(), "byo".into())]);
    // A trusted worker without a matching capability gets nothing.
    let bare =
        store.claim_stages(&pool_query("w-bare", at(1), offer(&["pool:trusted"], &["sandbox.oci"]))).await.unwrap();
    assert!(bare.is_empty(), "{:?}", keys(&bare));
    // With `harness.codex` it matches `harness.*` for both tenants.
    let trusted = store
        .claim_stages(&pool_query("w-trusted", at(1), offer(&["pool:trusted", "extra"], &["harness.codex"])))
        .await
        .unwrap();
    assert_eq!(keys(&trusted), vec![("acme".into(), "trusted".into()), ("globex".into(), "trusted".into())]);
    assert!(trusted.iter().all(|c| c.stage.lease_owner.as_deref() == Some("w-trusted")));
    // The server's own claim (local kinds) never takes a pooled stage, and the pool never a local one.
    let local = store.claim_stages(&claim_query("node", at(1), 60_000, 100)).await.unwrap();
    assert_eq!(keys(&local), vec![("acme".into(), "local".into()), ("globex".into(), "local".into())]);
    // A tenant's own host takes no general (tier `any`) work of anyone.
    let general =
        new_run("globex", json!({"stages":[{"key":"any","executor":{"kind":"noop","placement":"pool"}}]}), None, at(0));
    store.insert_run(&general).await.unwrap();
    let acme =
        store.claim_stages(&pool_query("w-acme", at(1), offer(&["pool:byo", "tenant:acme"], &[]))).await.unwrap();
    assert_eq!(keys(&acme), vec![("acme".into(), "byo".into())]);
    let shared = store.claim_stages(&pool_query("w-shared", at(1), offer(&["pool:shared"], &[]))).await.unwrap();
    assert_eq!(keys(&shared), vec![("globex".into(), "any".into())], "general work goes to a general worker");
    // Requirements and attestations survive a round trip.
    let mut record = None;
    let snapshot = store
        .update_run(runs[0], &mut |s| {
            s.complete_attempt("byo", 1, &StageOutcome::Succeeded, at(2))?;
            let r = pond_core::run::AttestationRecord {
                verified: true,
                worker: "w-acme".into(),
                signing_fingerprint: "SHA256:x".into(),
                signing_key: None,
                detail: "ok".into(),
                output_sha256: None,
                job_id: "j".into(),
                input_sha256: "00".into(),
                rc: 0,
                signature: "c2ln".into(),
            };
            record = Some(r.clone());
            s.record_attestation("byo", 1, r);
            Ok(Vec::new())
        })
        .await
        .unwrap();
    let stored = store.get_run(runs[0]).await.unwrap().unwrap();
    assert_eq!(stored, snapshot);
    assert_eq!(stored.attempts.iter().find(|a| a.stage_key == "byo").unwrap().attestation, record);
    let byo = stored.stage("byo").unwrap().requirements.clone().unwrap();
    assert!(byo.tags.contains("tenant:acme") && byo.tags.contains("pool:byo"));
}

/// The tenant rule holds in the claim statement itself, not only in the requirements stored
/// with a stage: a stage of project acme whose row names another tenant's tags (written before
/// submit refused such tags, or by hand) never reaches that tenant's host.
pub async fn byo_hosts_take_only_their_own_projects_work(store: Arc<dyn Store>) {
    let mut run = new_run(
        "acme",
        json!({"stages":[{"key":"a","needs":[],"executor":{"kind":"noop","placement":"pool","sandbox":{"tier":"byo"}}}]}),
        None,
        at(0),
    );
    let forged: std::collections::BTreeSet<String> =
        ["pool:byo", "tenant:globex"].iter().map(|t| t.to_string()).collect();
    run.stages[0].requirements.as_mut().unwrap().tags = forged;
    store.insert_run(&run).await.unwrap();
    for (who, tags) in
        [("globex", &["pool:byo", "tenant:globex"][..]), ("untenanted", &["pool:byo", "tenant:globex", "pool:trusted"])]
    {
        let got = store.claim_stages(&pool_query(who, at(1), offer(tags, &[]))).await.unwrap();
        assert!(got.is_empty(), "{who} took acme's job: {:?}", got.iter().map(|c| &c.stage.key).collect::<Vec<_>>());
    }
    // A host pinned to both tenants (the operator's choice) may take it.
    let got = store
        .claim_stages(&pool_query("both", at(1), offer(&["pool:byo", "tenant:globex", "tenant:acme"], &[])))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
}

/// A worker runs one job at a time: while it holds a live lease no claim gives it another,
/// however many polls ask (behind a load balancer, an older poll may still wait on another
/// node); once the lease is gone it takes work again.
pub async fn a_busy_worker_is_given_no_second_job(store: Arc<dyn Store>) {
    for _ in 0..3 {
        let run = new_run(
            "acme",
            json!({"stages":[{"key":"a","executor":{"kind":"noop","placement":"pool","sandbox":{"tier":"trusted"}}}]}),
            None,
            at(0),
        );
        store.insert_run(&run).await.unwrap();
    }
    let trusted = || offer(&["pool:trusted"], &[]);
    let first = store.claim_stages(&ClaimQuery { limit: 1, ..pool_query("w1", at(1), trusted()) }).await.unwrap();
    assert_eq!(first.len(), 1);
    let queries: Vec<ClaimQuery> =
        (0..4).map(|_| ClaimQuery { limit: 1, ..pool_query("w1", at(2), trusted()) }).collect();
    let concurrent = futures_util::future::join_all(queries.iter().map(|q| store.claim_stages(q))).await;
    assert!(concurrent.iter().all(|c| c.as_ref().unwrap().is_empty()), "a busy worker got a second job");
    // Another worker is not held up.
    assert_eq!(store.claim_stages(&pool_query("w2", at(2), trusted())).await.unwrap().len(), 2);
    // After w1's lease expired (60 s in pool_query), it takes work again: here, its own
    // stage's next attempt.
    let later = store.claim_stages(&ClaimQuery { limit: 1, ..pool_query("w1", at(61_000), trusted()) }).await.unwrap();
    assert_eq!(later.len(), 1);
}

pub async fn records_swap_atomically(store: Arc<dyn Store>) {
    assert!(store.swap_record("k", "a", None, "1").await.unwrap());
    assert!(!store.swap_record("k", "a", None, "2").await.unwrap(), "create only when absent");
    assert!(!store.swap_record("k", "a", Some("0"), "2").await.unwrap(), "stale expectation");
    assert!(store.swap_record("k", "a", Some("1"), "2").await.unwrap());
    store.put_record("k", "b", "x").await.unwrap();
    store.put_record("other", "a", "y").await.unwrap();
    assert_eq!(store.get_record("k", "a").await.unwrap().as_deref(), Some("2"));
    assert_eq!(store.get_record("k", "zz").await.unwrap(), None);
    assert_eq!(store.list_records("k").await.unwrap(), vec![("a".into(), "2".into()), ("b".into(), "x".into())]);
    // Of 8 concurrent redeemers of one code, exactly one wins.
    store.put_record("code", "c", "unused").await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.swap_record("code", "c", Some("unused"), &format!("used by {i}")).await.unwrap()
        }));
    }
    let mut wins = 0;
    for t in tasks {
        wins += t.await.unwrap() as usize;
    }
    assert_eq!(wins, 1);
}

pub async fn the_transparency_log_appends_in_turn_and_never_forgets(store: Arc<dyn Store>) {
    let (a, b) = (RunId::generate(at(1)), RunId::generate(at(2)));
    let hash = |text: &str| pond_core::merkle::leaf_hash(text.as_bytes());
    assert_eq!(store.append_leaf(a, "a0", &hash("a0"), at(3)).await.unwrap(), 0);
    assert_eq!(store.append_leaf(b, "b1", &hash("b1"), at(4)).await.unwrap(), 1);
    // Sixteen appends at once: sixteen distinct indices right after, none lost.
    let mut appends = tokio::task::JoinSet::new();
    for i in 0..16 {
        let store = store.clone();
        appends.spawn(async move { store.append_leaf(a, &format!("c{i}"), &hash(&format!("c{i}")), at(5)).await });
    }
    let mut indices: Vec<u64> = appends.join_all().await.into_iter().map(|r| r.unwrap()).collect();
    indices.sort_unstable();
    assert_eq!(indices, (2..18).collect::<Vec<u64>>());
    let all = store.leaf_hashes(0, None).await.unwrap();
    assert_eq!(all.len(), 18);
    assert_eq!(&all[..2], &[hash("a0"), hash("b1")]);
    assert_eq!(store.leaf_hashes(0, Some(2)).await.unwrap(), all[..2].to_vec());
    assert_eq!(store.leaf_hashes(0, Some(99)).await.unwrap(), all);
    assert_eq!(store.leaf_hashes(16, None).await.unwrap(), all[16..].to_vec());
    assert_eq!(store.leaf_hashes(5, Some(7)).await.unwrap(), all[5..7].to_vec());
    assert_eq!(store.run_leaves(b).await.unwrap(), vec![(1, "b1".to_string())]);
    let of_a = store.run_leaves(a).await.unwrap();
    assert_eq!(of_a.len(), 17);
    assert_eq!(of_a[0], (0, "a0".to_string()));
    assert!(of_a.iter().all(|(i, leaf)| all[*i as usize] == hash(leaf)), "each leaf at its own index");
}

pub async fn stage_counts_give_queue_depth_by_placement(store: Arc<dyn Store>) {
    use pond_core::run::StageState;
    // Two runs: a local chain (first ready, second waiting for it) and a pooled stage.
    let chain = json!({"stages":[{"key":"a","executor":{"kind":"noop"}},{"key":"b","executor":{"kind":"noop"}}]});
    store.insert_run(&new_run("p", chain, None, at(1))).await.unwrap();
    let pooled = json!({"stages":[{"key":"w","executor":{"kind":"noop","placement":"pool"}}]});
    store.insert_run(&new_run("p", pooled, None, at(2))).await.unwrap();
    let count = |counts: &[pond_core::store::StageCount], state: StageState, pooled: bool, ready: bool| {
        counts
            .iter()
            .filter(|c| c.state == state && c.pooled == pooled && c.ready == ready)
            .map(|c| c.count)
            .sum::<u64>()
    };
    let counts = store.stage_counts(at(10)).await.unwrap();
    assert_eq!(count(&counts, StageState::Queued, false, true), 1, "{counts:?}");
    assert_eq!(count(&counts, StageState::Queued, false, false), 1, "{counts:?}");
    assert_eq!(count(&counts, StageState::Queued, true, true), 1, "{counts:?}");
    // The local one claimed: running, and nothing local is ready.
    assert_eq!(store.claim_stages(&claim_query("n1", at(11), 30_000, 1)).await.unwrap().len(), 1);
    let counts = store.stage_counts(at(12)).await.unwrap();
    assert_eq!(count(&counts, StageState::Running, false, false), 1, "{counts:?}");
    assert_eq!(count(&counts, StageState::Queued, false, true), 0, "{counts:?}");
    assert_eq!(count(&counts, StageState::Queued, true, true), 1, "{counts:?}");
}

pub async fn usage_books_every_call_once(store: Arc<dyn Store>) {
    use pond_core::usage::{Booking, Ledger, Spend};
    let ledger = Ledger::new(store.clone());
    let (run, day) = (RunId::generate(at(1)), Timestamp::parse_rfc3339("2025-12-03T10:00:00Z").unwrap());
    let call = Spend { requests: 1, input_tokens: 100, output_tokens: 10, cost_usd: 0.5 };
    // Sixteen calls of one attempt booked at once: none lost.
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let ledger = ledger.clone();
        calls.spawn(async move { ledger.book("acme", run, "a", 1, Some("fast"), call, Booking::Add, day).await });
    }
    calls
        .join_all()
        .await
        .into_iter()
        .for_each(|r| assert_eq!(r.unwrap(), call, "each call moves the books by itself"));
    // A worker's total, sent twice (a retried result), counts once.
    let total = Spend { requests: 2, input_tokens: 1000, output_tokens: 40, cost_usd: 1.0 };
    for moved in [total, Spend::default()] {
        assert_eq!(ledger.book("acme", run, "p", 1, Some("fast"), total, Booking::Total, day).await.unwrap(), moved);
    }
    let usage = ledger.run(run).await.unwrap();
    assert_eq!(usage.attempts["a#1"].requests, 16);
    assert_eq!(usage.attempts["a#1"].input_tokens, 1600);
    assert_eq!(usage.total.tokens(), 1760 + 1040);
    let rows = ledger.rows("acme", "2025-12-01", "2025-12-31").await.unwrap();
    assert_eq!(rows.len(), 1, "{:?}", store.list_records("usage:acme").await);
    assert_eq!((rows[0].day.as_str(), rows[0].model.as_str()), ("2025-12-03", "fast"));
    assert_eq!(rows[0].spend.requests, 18);
    assert_eq!(rows[0].spend.tokens(), 2800);
    assert!((rows[0].spend.cost_usd - 9.0).abs() < 1e-9);
    assert_eq!(ledger.month("acme", day).await.unwrap().tokens(), 2800);
    assert!(ledger.rows("other", "2025-12-01", "2025-12-31").await.unwrap().is_empty(), "projects apart");
    assert!(ledger.rows("acme", "2025-11-01", "2025-11-30").await.unwrap().is_empty(), "days apart");
    // Budgets: the run's and the project's, each with what it spent.
    let budget = pond_core::definition::Budget { usd: None, tokens: Some(2000) };
    ledger.set_budget("acme", Some(budget)).await.unwrap();
    let caps = ledger.caps("acme", run, Some(budget), day).await.unwrap();
    assert_eq!(caps.len(), 2);
    assert_eq!(caps[1].scope, "project acme in 2025-12");
    assert_eq!(
        caps[1].passed(0, 0.0).as_deref(),
        Some("budget exhausted (project acme in 2025-12): 2800 of 2000 tokens")
    );
    ledger.set_budget("acme", None).await.unwrap();
    assert_eq!(ledger.caps("acme", run, None, day).await.unwrap(), vec![]);
}

/// (type, stage, attempt, previous state) of each event, in order.
fn event_story(
    events: &[pond_core::events::Event],
) -> Vec<(Option<String>, Option<String>, Option<u32>, Option<String>)> {
    events
        .iter()
        .map(|e| (Some(e.event.kind.clone()), e.event.stage.clone(), e.event.attempt, e.event.previous_state.clone()))
        .collect()
}

pub async fn state_changes_are_events_in_commit_order(store: Arc<dyn Store>) {
    let s = |t: &str| Some(t.to_string());
    let run = new_run("p", one_noop(), None, at(0));
    let id = run.run.id;
    store.insert_run(&run).await.unwrap();
    assert_eq!(store.claim_stages(&claim_query("dead", at(10), 1000, 1)).await.unwrap().len(), 1);
    // The holder vanishes; another node takes the stage over as attempt 2, which succeeds.
    let second = store.claim_stages(&claim_query("n2", at(2000), 1000, 1)).await.unwrap();
    assert_eq!((second[0].run.id, second[0].stage.attempt), (id, 2));
    let other = new_run("q", one_noop(), None, at(1));
    store.insert_run(&other).await.unwrap();
    store
        .update_run(id, &mut |s| s.complete_attempt("a", 2, &StageOutcome::Succeeded, at(2100)).map(|()| Vec::new()))
        .await
        .unwrap();
    // A mutation that changes no state writes no event; a rejected one writes nothing.
    store.update_run(id, &mut |_| Ok(Vec::new())).await.unwrap();
    let _ = store
        .update_run(id, &mut |s| {
            s.complete_attempt("a", 1, &StageOutcome::Failed { error: "late".into(), exit_code: None }, at(2200))
                .map(|()| Vec::new())
        })
        .await;

    let all = store.read_events(0, None, 100).await.unwrap();
    let seqs: Vec<i64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=all.len() as i64).collect::<Vec<_>>(), "positions are 1, 2, 3… with no gap");
    assert_eq!(store.last_event_seq().await.unwrap(), all.len() as i64);
    let mine: Vec<_> = all.iter().filter(|e| e.event.run_id == id).cloned().collect();
    assert_eq!(
        event_story(&mine),
        vec![
            (s("run.queued"), None, None, None),
            (s("run.running"), None, None, s("queued")),
            (s("stage.running"), s("a"), Some(1), s("queued")),
            (s("stage.running"), s("a"), Some(2), s("running")),
            (s("stage.succeeded"), s("a"), Some(2), s("running")),
            (s("run.succeeded"), None, None, s("running")),
        ]
    );
    assert!(mine.iter().all(|e| e.event.project_id == "p"));
    let only_q = store.read_events(0, Some(&["q".to_string()]), 100).await.unwrap();
    assert_eq!(event_story(&only_q), vec![(s("run.queued"), None, None, None)]);
    assert!(store.read_events(0, Some(&[]), 100).await.unwrap().is_empty(), "no project sees nothing");
    let tail = store.read_events(all[2].seq, None, 2).await.unwrap();
    assert_eq!(tail, all[3..5].to_vec(), "a cursor and a limit page the sequence");

    // Many writers at once: still one gapless sequence, each run's events in its own order.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let run = new_run("c", one_noop(), None, at(3000 + i));
            store.insert_run(&run).await.unwrap();
            store
                .update_run(run.run.id, &mut |s| {
                    s.cancel("stop", at(3100));
                    Ok(Vec::new())
                })
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let all = store.read_events(0, None, 1000).await.unwrap();
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=all.len() as i64).collect::<Vec<_>>());
    for e in all.iter().filter(|e| e.event.kind == "run.cancelled") {
        let queued = all.iter().position(|q| q.event.run_id == e.event.run_id && q.event.kind == "run.queued");
        let cancelled = all.iter().position(|q| q.seq == e.seq);
        assert!(queued < cancelled, "a run's events keep their order");
    }
    assert_eq!(all.iter().filter(|e| e.event.kind == "run.cancelled").count(), 8);

    // Retention: old events go, positions are never reused.
    let last = store.last_event_seq().await.unwrap();
    let far = Timestamp::from_millis(i64::MAX / 2);
    // Nothing at or above a webhook's cursor goes.
    assert_eq!(store.prune_events(far, 1).await.unwrap(), 0);
    assert!(store.prune_events(far, i64::MAX).await.unwrap() >= all.len() as u64 - 1);
    assert_eq!(store.last_event_seq().await.unwrap(), last);
    let after_prune = new_run("p", one_noop(), None, at(5000));
    store.insert_run(&after_prune).await.unwrap();
    let left = store.read_events(0, None, 100).await.unwrap();
    assert!(left.iter().all(|e| e.seq >= last), "only the newest may stay: {left:?}");
    assert_eq!(left.last().map(|e| (e.seq, e.event.run_id)), Some((last + 1, after_prune.run.id)));
}

pub async fn batched_updates_apply_in_order_and_a_failure_stops_no_other(store: Arc<dyn Store>) {
    let two =
        json!({"stages":[{"key":"x","executor":{"kind":"noop"}},{"key":"y","executor":{"kind":"noop"},"needs":[]}]});
    let a = new_run("p", two, None, at(0));
    let b = new_run("p", one_noop(), None, at(1));
    let c = new_run("p", one_noop(), None, at(2));
    for run in [&a, &b, &c] {
        store.insert_run(run).await.unwrap();
    }
    assert_eq!(store.claim_stages(&claim_query("n", at(10), 60_000, 10)).await.unwrap().len(), 4);
    let (a_id, b_id, c_id, missing) = (a.run.id, b.run.id, c.run.id, RunId::generate(at(3)));
    let line = |text: &str| NewLogLine::text(None, 0, LogStream::System, at(20), text.to_string());
    let mut finish_x = |s: &mut RunSnapshot| {
        s.complete_attempt("x", 1, &StageOutcome::Succeeded, at(20)).map(|()| vec![line("x done")])
    };
    let mut stale_b = |s: &mut RunSnapshot| {
        s.complete_attempt("a", 7, &StageOutcome::Succeeded, at(20)).map(|()| vec![line("never")])
    };
    let mut nothing = |_: &mut RunSnapshot| Ok(vec![line("never")]);
    let mut finish_y = |s: &mut RunSnapshot| {
        // Sees what the first change of the batch did to the same run.
        assert_eq!(s.stage("x").map(|x| x.state), Some(StageState::Succeeded));
        s.complete_attempt("y", 1, &StageOutcome::Succeeded, at(21)).map(|()| vec![line("y done")])
    };
    let mut cancel_c = |s: &mut RunSnapshot| {
        s.cancel("stop", at(22));
        Ok(Vec::new())
    };
    let mut changes: Vec<(RunId, pond_core::store::RunMutation<'_>)> = vec![
        (a_id, &mut finish_x),
        (b_id, &mut stale_b),
        (missing, &mut nothing),
        (a_id, &mut finish_y),
        (c_id, &mut cancel_c),
    ];
    let results = store.update_runs(&mut changes).await;
    drop(changes);
    assert_eq!(results.len(), 5);
    let first = results[0].as_ref().expect("the first change applies");
    assert_eq!((first.run.state, first.stage("y").map(|y| y.state)), (RunState::Running, Some(StageState::Running)));
    assert!(matches!(results[1], Err(StoreError::Rejected(_))), "a stale attempt is refused: {:?}", results[1]);
    assert!(matches!(results[2], Err(StoreError::NotFound(_))), "a missing run: {:?}", results[2]);
    assert_eq!(results[3].as_ref().expect("the second change of a").run.state, RunState::Succeeded);
    assert!(results[4].as_ref().expect("c's change applies").run.cancel_requested);

    let a_now = store.get_run(a_id).await.unwrap().unwrap();
    assert_eq!(a_now.run.state, RunState::Succeeded);
    assert!(a_now.attempts.iter().all(|t| t.outcome == Some(AttemptOutcome::Succeeded)));
    let b_now = store.get_run(b_id).await.unwrap().unwrap();
    assert_eq!((b_now.run.state, b_now.stages[0].state), (RunState::Running, StageState::Running), "b untouched");
    assert!(store.get_run(c_id).await.unwrap().unwrap().run.cancel_requested);
    let logs: Vec<String> = store.read_logs(a_id, 0, 10).await.unwrap().into_iter().map(|l| l.line.text).collect();
    assert_eq!(logs, vec!["x done".to_string(), "y done".to_string()]);
    assert!(store.read_logs(b_id, 0, 10).await.unwrap().is_empty(), "a refused change writes no line");
    let events = store.read_events(0, Some(&["p".to_string()]), 100).await.unwrap();
    let of_a: Vec<_> = events.iter().filter(|e| e.event.run_id == a_id).cloned().collect();
    let story = event_story(&of_a);
    let tail: Vec<_> = story[story.len() - 3..].to_vec();
    let s = |t: &str| Some(t.to_string());
    assert_eq!(
        tail,
        vec![
            (s("stage.succeeded"), s("x"), Some(1), s("running")),
            (s("stage.succeeded"), s("y"), Some(1), s("running")),
            (s("run.succeeded"), None, None, s("running")),
        ],
        "each change's events, in the batch's order"
    );
}

pub async fn a_logged_claim_writes_each_stage_s_line(store: Arc<dyn Store>) {
    let a = new_run("p", one_noop(), None, at(0));
    let b = new_run("p", one_noop(), None, at(1));
    for run in [&a, &b] {
        store.insert_run(run).await.unwrap();
    }
    let line = |c: &pond_core::store::Claim| {
        (c.run.id == a.run.id).then(|| {
            NewLogLine::text(
                Some(c.stage.key.clone()),
                c.stage.attempt,
                LogStream::System,
                at(10),
                format!("stage `{}` attempt {} started", c.stage.key, c.stage.attempt),
            )
        })
    };
    let claims = store.claim_stages_logged(&claim_query("n", at(10), 60_000, 10), &line).await.unwrap();
    assert_eq!(claims.len(), 2);
    let logged: Vec<String> =
        store.read_logs(a.run.id, 0, 10).await.unwrap().into_iter().map(|l| l.line.text).collect();
    assert_eq!(logged, vec!["stage `a` attempt 1 started".to_string()]);
    assert!(store.read_logs(b.run.id, 0, 10).await.unwrap().is_empty(), "no line where it gave none");
    let none = store.claim_stages_logged(&claim_query("n", at(11), 60_000, 10), &line).await.unwrap();
    assert!(none.is_empty());
}

/// Retention as the engine drives it: the candidates, each deleted.
async fn delete_finished(
    store: &Arc<dyn Store>,
    before: Timestamp,
    limit: u32,
) -> Result<Vec<RunSnapshot>, StoreError> {
    let mut gone = Vec::new();
    for run in store.finished_runs(before, limit).await? {
        gone.extend(store.delete_finished_run(run, before).await?);
    }
    Ok(gone)
}

pub async fn retention_deletes_ended_runs_with_their_output(store: Arc<dyn Store>) {
    let run = new_run("p", one_noop(), None, at(0));
    let id = run.run.id;
    store.insert_run(&run).await.unwrap();
    assert_eq!(store.claim_stages(&claim_query("n", at(10), 10_000, 1)).await.unwrap().len(), 1);
    let line = NewLogLine::text(Some("a".into()), 1, LogStream::Stdout, at(11), "hello".into());
    store.append_logs(id, &[line]).await.unwrap();
    let artifact = |blob: &pond_core::store::BlobMeta| Artifact {
        run_id: id,
        name: "out.txt".into(),
        stage: "a".into(),
        attempt: 1,
        blob_id: blob.id,
        size: blob.size,
        sha256: blob.sha256.clone(),
        created_at: at(20),
    };
    let first = store.put_blob("p", b"one", at(20)).await.unwrap();
    store.put_artifact(&artifact(&first), "n", 1 << 20).await.unwrap();
    let second = store.put_blob("p", b"two!", at(21)).await.unwrap();
    store.put_artifact(&artifact(&second), "n", 1 << 20).await.unwrap();
    assert!(store.blob_meta(first.id).await.unwrap().is_none(), "a replaced artifact's blob goes");
    assert!(store.blob_meta(second.id).await.unwrap().is_some());
    store
        .update_run(id, &mut |s| s.complete_attempt("a", 1, &StageOutcome::Succeeded, at(100)).map(|()| Vec::new()))
        .await
        .unwrap();
    let unfinished = new_run("p", one_noop(), None, at(1));
    store.insert_run(&unfinished).await.unwrap();

    assert!(delete_finished(&store, at(100), 10).await.unwrap().is_empty(), "ended at 100: not before 100");
    let gone = delete_finished(&store, at(101), 10).await.unwrap();
    assert_eq!(gone.iter().map(|s| s.run.id).collect::<Vec<_>>(), vec![id]);
    assert!(store.get_run(id).await.unwrap().is_none());
    assert!(store.read_logs(id, 0, 10).await.unwrap().is_empty());
    assert!(store.list_artifacts(id).await.unwrap().is_empty());
    assert!(store.blob_meta(second.id).await.unwrap().is_none(), "its artifacts' blobs go with it");
    assert!(store.get_run(unfinished.run.id).await.unwrap().is_some(), "an unfinished run stays");
    assert!(delete_finished(&store, at(10_000), 10).await.unwrap().is_empty());
    // The idempotency key of a deleted run may be used again.
    let keyed = new_run("p", one_noop(), Some("k"), at(2));
    store.insert_run(&keyed).await.unwrap();
    store
        .update_run(keyed.run.id, &mut |s| {
            s.cancel("stop", at(200));
            Ok(Vec::new())
        })
        .await
        .unwrap();
    assert_eq!(delete_finished(&store, at(300), 10).await.unwrap().len(), 1);
    let again = new_run("p", one_noop(), Some("k"), at(3));
    assert!(matches!(store.insert_run(&again).await.unwrap(), InsertOutcome::Created));
}

macro_rules! conformance {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;

            async fn store() -> Option<(Arc<dyn Store>, Box<dyn Any + Send>)> {
                $make
            }

            conformance!(@cases
                runs_round_trip_and_list_newest_first,
                idempotency_key_returns_the_first_run,
                concurrent_submits_with_one_key_make_one_run,
                claims_take_ready_stages_once_in_order,
                concurrent_claims_never_share_a_stage,
                expired_leases_are_reclaimed_as_new_attempts,
                cancelled_stages_of_vanished_holders_are_reaped,
                logs_append_in_order_and_page_by_cursor,
                log_lines_are_byte_exact_and_idempotent,
                blobs_and_artifacts_are_chunked_and_written_only_by_their_open_attempt,
                tokens_are_found_by_hash_and_revoked,
                concurrent_updates_of_one_run_are_never_lost,
                a_run_read_as_it_ends_never_shows_an_unfinished_stage,
                batched_updates_apply_in_order_and_a_failure_stops_no_other,
                a_logged_claim_writes_each_stage_s_line,
                pool_claims_match_pinned_tags_and_capability_globs,
                pool_claims_take_admitted_work_in_due_order_past_work_for_others,
                byo_hosts_take_only_their_own_projects_work,
                a_busy_worker_is_given_no_second_job,
                records_swap_atomically,
                the_transparency_log_appends_in_turn_and_never_forgets,
                usage_books_every_call_once,
                stage_counts_give_queue_depth_by_placement,
                state_changes_are_events_in_commit_order,
                retention_deletes_ended_runs_with_their_output,
            );
        }
    };
    (@cases $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let Some((store, _keep)) = store().await else { return };
                super::$case(store).await;
            }
        )*
    };
}

conformance!(memory, Some((Arc::new(pond_store::MemoryStore::new()), Box::new(()))));
conformance!(sqlite, {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = pond_store::SqliteStore::open(&dir.path().join("pond.db")).await.expect("open sqlite");
    Some((Arc::new(store), Box::new(dir)))
});
conformance!(postgres, {
    let Ok(server) = std::env::var("POND_TEST_DATABASE_URL") else {
        pond_store::missing_prerequisite(
            "POND_TEST_DATABASE_URL is not set (a PostgreSQL server URL; .ci/run sets it)",
        );
        return None;
    };
    let db = pond_store::ScratchDatabase::create(&server, "conformance").await.expect("create a scratch database");
    let store = pond_store::PgStore::connect(&db.url, 8).await.expect("connect to the scratch database");
    Some((Arc::new(store), Box::new(db)))
});
