//! Worker pools end to end with real processes on 127.0.0.1: a `pond server`, one
//! `pond orchestrator` and `pond worker`s with different pinned tags. Every connection dials
//! inward (workers → orchestrator → pond).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{enroll_code, eventually, wait_done, Orchestrator, Server, Worker};
use pond_http::client::Client;
use pond_http::wire::RunView;
use serde_json::json;

fn pooled(project: &str, tier: &str, script: &str) -> serde_json::Value {
    json!({"project_id": project, "definition": {"stages": [{"key": "job", "executor": {
        "kind": "shell", "argv": ["sh", "-c", script], "placement": "pool", "sandbox": {"tier": tier}
    }}]}})
}

fn submit(client: &Client, body: &serde_json::Value) -> String {
    client.submit(body, None).expect("submit").id.to_string()
}

fn owners(run: &RunView) -> Vec<String> {
    run.stages[0].attempts.iter().map(|a| a.owner.clone()).collect()
}

struct Pool {
    server: Server,
    _db: Option<pond_store::ScratchDatabase>,
    orch: Orchestrator,
    acme: Worker,
    globex: Worker,
    trusted: Worker,
    shared: Worker,
    _dir: tempfile::TempDir,
}

fn pool(lease: &str) -> Pool {
    pool_on(lease, None)
}

/// A pool on SQLite, or on a scratch PostgreSQL database of `pg` (a server URL).
fn pool_on(lease: &str, pg: Option<&str>) -> Pool {
    let dir = tempfile::tempdir().unwrap();
    let db = pg.map(|url| common::scratch_database(url, "pools"));
    let mut args = vec!["--lease", lease];
    if let Some(db) = &db {
        args.extend(["--database-url", db.url.as_str()]);
    }
    let server = Server::start(&dir.path().join("server"), &args);
    let admin = server.admin();
    let code = enroll_code(&admin, "p1", None, None);
    let orch = Orchestrator::start(&server.url, &dir.path().join("orch"), "127.0.0.1:0", Some(&code));
    let worker = |name: &str, tags: &[&str]| {
        let code = enroll_code(&admin, "p1", Some(tags), None);
        // Jobs here run without a sandbox profile, which a byo host does only when its
        // operator says so.
        Worker::start(
            &orch.url,
            &dir.path().join(name),
            &code,
            &["--name", name, "--drain", "0s", "--allow-unconfined"],
        )
    };
    let acme = worker("w-acme", &["pool:byo", "tenant:acme"]);
    let globex = worker("w-globex", &["pool:byo", "tenant:globex"]);
    let trusted = worker("w-trusted", &["pool:trusted"]);
    // General work (tier `any`) goes to general workers, never to a tenant's own host.
    let shared = worker("w-shared", &["pool:shared"]);
    Pool { server, _db: db, orch, acme, globex, trusted, shared, _dir: dir }
}

#[test]
fn two_hundred_pooled_stages_land_only_where_allowed_and_verify() {
    land_only_where_allowed(&pool("5s"), 200);
}

#[test]
fn pooled_stages_land_only_where_allowed_on_postgres() {
    let Some(pg) = Server::database_server() else { return };
    land_only_where_allowed(&pool_on("5s", Some(&pg)), 100);
}

fn land_only_where_allowed(p: &Pool, count: usize) {
    let admin = p.server.admin();
    let mut expected: HashMap<String, String> = HashMap::new();
    for i in 0..count {
        let (project, tier, worker) = match i % 5 {
            0 | 1 => ("acme", "byo", &p.acme.id),
            2 | 3 => ("globex", "byo", &p.globex.id),
            _ => (if i % 2 == 0 { "acme" } else { "globex" }, "trusted", &p.trusted.id),
        };
        let script = format!("echo job {i} on $(hostname); echo {i} > \"$POND_OUTPUT_DIR/out.txt\"");
        expected.insert(submit(&admin, &pooled(project, tier, &script)), worker.clone());
    }
    for (id, worker) in &expected {
        let run = wait_done(&admin, id, Duration::from_secs(120));
        assert_eq!(run.state.as_str(), "succeeded", "{run:?}");
        let stage = &run.stages[0];
        // Every attempt on the allowed worker (an extra attempt is a job handed back because its
        // worker had already got one from an overlapping poll).
        assert!(owners(&run).iter().all(|o| o == worker), "run {id} ran on the wrong worker: {:?}", owners(&run));
        assert_eq!(stage.placement, "pool");
        assert_eq!(stage.attestation_verified, Some(true), "{:?}", stage.attempts);
        let mut out = Vec::new();
        admin.download_artifact(id, "out.txt", &mut out).unwrap();
        assert!(!out.is_empty());
    }
    // `pond run status` shows the verdict; `pond pool ls` shows the pool.
    let some = expected.keys().next().unwrap();
    let status = p.server.cli(&["run", "status", some]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("verified") && text.contains("pool"), "{text}");
    let ls = p.server.cli(&["pool", "ls", "--json"]);
    let list: pond_http::pool_wire::PoolList = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(list.orchestrators.len(), 1);
    assert_eq!(list.workers.len(), 4);
    let acme = list.workers.iter().find(|w| w.member.id == p.acme.id).unwrap();
    assert_eq!(acme.member.tags, vec!["pool:byo".to_string(), "tenant:acme".to_string()]);
    assert!(acme.member.fingerprint.as_deref().unwrap().starts_with("SHA256:"));
    assert!(acme.last_seen.is_some());
}

#[test]
fn a_killed_worker_s_job_completes_elsewhere_and_the_pool_survives_an_orchestrator_restart() {
    let mut p = pool("2s");
    let admin = p.server.admin();
    // A tier-`any` job that any of the three may take; kill whichever takes it.
    let id = submit(&admin, &pooled("acme", "any", "echo started; sleep 3; echo finished"));
    // The worker whose attempt is running the script (an earlier attempt may have been handed
    // back by the orchestrator before it ran).
    let mut first = String::new();
    let mut held = 0;
    eventually("the job to start", Duration::from_secs(20), || {
        let Some(line) = admin.logs(&id, 0, 1000).unwrap().lines.into_iter().find(|l| l.line.text == "started") else {
            return false;
        };
        held = line.line.attempt;
        let run = admin.get_run(&id).unwrap();
        first = run.stages[0].attempts.iter().find(|a| a.number == held).map(|a| a.owner.clone()).unwrap_or_default();
        !first.is_empty()
    });
    let victim =
        [&mut p.acme, &mut p.globex, &mut p.trusted, &mut p.shared].into_iter().find(|w| w.id == first).unwrap();
    victim.kill9();
    let run = wait_done(&admin, &id, Duration::from_secs(60));
    assert_eq!(run.state.as_str(), "succeeded", "{run:?}");
    let attempts = &run.stages[0].attempts;
    let killed = attempts.iter().find(|a| a.number == held).unwrap();
    assert_eq!(killed.outcome.map(|o| o.as_str()), Some("lease_expired"), "{attempts:?}");
    assert_ne!(attempts.last().unwrap().owner, first, "it completed on another worker");
    assert_eq!(run.stages[0].attestation_verified, Some(true));

    // Restart the orchestrator while jobs run; the pool recovers with no operator action.
    let ids: Vec<String> =
        (0..6).map(|i| submit(&admin, &pooled("acme", "any", &format!("sleep 1; echo {i}")))).collect();
    std::thread::sleep(Duration::from_millis(500));
    p.orch.restart();
    for id in &ids {
        let run = wait_done(&admin, id, Duration::from_secs(90));
        assert_eq!(run.state.as_str(), "succeeded", "{run:?}");
    }
    // And new work flows after the restart (tier `any`: the killed worker may be any of them).
    let after = submit(&admin, &pooled("globex", "any", "echo after"));
    assert_eq!(wait_done(&admin, &after, Duration::from_secs(30)).state.as_str(), "succeeded");
}

#[test]
fn drain_once_and_graceful_shutdown() {
    let mut p = pool("5s");
    let admin = p.server.admin();
    // Drained, the acme worker takes no new job; undone, it does.
    let out = p.server.cli(&["pool", "drain", &p.acme.id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = submit(&admin, &pooled("acme", "byo", "echo drained"));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(admin.get_run(&id).unwrap().state.as_str(), "queued");
    let listed = admin.pools().unwrap();
    assert!(listed.workers.iter().any(|w| w.member.id == p.acme.id && w.member.draining));
    assert!(p.server.cli(&["pool", "drain", "--undo", &p.acme.id]).status.success());
    assert_eq!(wait_done(&admin, &id, Duration::from_secs(30)).state.as_str(), "succeeded");
    // Every member reported its version (a worker through its orchestrator); `pond pool ls`
    // shows it.
    let version = env!("CARGO_PKG_VERSION");
    let listed = admin.pools().unwrap();
    for m in listed.orchestrators.iter().chain(&listed.workers).filter(|m| m.member.revoked_at.is_none()) {
        assert_eq!(m.version.as_deref(), Some(version), "{} reported no version", m.member.id);
    }
    let out = p.server.cli(&["pool", "ls"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text.lines().find(|l| l.starts_with(&p.acme.id)).unwrap_or_default();
    assert!(row.contains(version), "{text}");

    // SIGTERM mid-job with --drain 0s: the job is handed back at once, not after the lease.
    let id = submit(&admin, &pooled("globex", "byo", "sleep 30"));
    eventually("the globex job to start", Duration::from_secs(20), || {
        admin.get_run(&id).unwrap().state.as_str() == "running"
    });
    std::thread::sleep(Duration::from_millis(300));
    unsafe { libc_kill(p.globex.child.id() as i32, 15) };
    let status = p.globex.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let run = admin.get_run(&id).unwrap();
    assert_eq!(run.stages[0].attempts[0].outcome.map(|o| o.as_str()), Some("handed_back"), "{run:?}");
    assert_eq!(run.state.as_str(), "running", "queued again for another worker");
    admin.cancel(&id).unwrap();

    // `pond worker --once` takes one job and exits.
    let dir = tempfile::tempdir().unwrap();
    let code = enroll_code(&admin, "p1", Some(&["pool:byo", "tenant:globex"]), None);
    let ids: Vec<String> =
        (0..2).map(|i| submit(&admin, &pooled("globex", "byo", &format!("echo once {i}")))).collect();
    let mut once = Worker::start(&p.orch.url, dir.path(), &code, &["--once", "--allow-unconfined"]);
    let started = Instant::now();
    let exit = loop {
        if let Some(s) = once.child.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "--once worker did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success());
    let done: Vec<bool> = ids.iter().map(|id| admin.get_run(id).unwrap().state.as_str() == "succeeded").collect();
    assert_eq!(done.iter().filter(|d| **d).count(), 1, "exactly one job taken: {done:?}");

    // An idle worker (in its long poll) exits at once on SIGTERM, not when the poll would end.
    std::thread::sleep(Duration::from_secs(1));
    let sent = Instant::now();
    unsafe { libc_kill(p.shared.child.id() as i32, 15) };
    let status = p.shared.child.wait().unwrap();
    eprintln!("an idle worker exited {:?} after SIGTERM", sent.elapsed());
    assert!(status.success(), "{status:?}");
    assert!(sent.elapsed() < Duration::from_secs(5), "an idle worker took {:?} to exit", sent.elapsed());
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

fn identity(n: u8) -> pond_core::keys::WorkerIdentity {
    pond_core::keys::WorkerIdentity::from_secrets([n; 32], [n.wrapping_add(50); 32])
}

fn raw(method: &str, url: &str, token: &str, body: Option<serde_json::Value>) -> (u16, String) {
    let req = ureq::request(method, url).set("Authorization", &format!("Bearer {token}"));
    let result = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    match result {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap_or_default()),
        Err(e) => panic!("{method} {url}: {e}"),
    }
}

#[test]
fn attacks_on_enrollment_claims_and_results_fail() {
    use pond_http::pool_client::{enroll_request, HttpWorkerClient};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &["--lease", "5s"]);
    let admin = server.admin();
    let code = enroll_code(&admin, "byo", None, None);
    let orch = Orchestrator::start(&server.url, &dir.path().join("orch"), "127.0.0.1:0", Some(&code));
    let enroll = |code: &str, n: u8, tags: Option<Vec<String>>| {
        HttpWorkerClient::enroll(&orch.url, &enroll_request(code, "fake", &identity(n), tags, vec![]))
    };

    // Replaying a used orchestrator code fails.
    let replay = Client::new(&server.url, None).enroll_orchestrator(&code, "evil");
    assert_eq!(replay.unwrap_err().status(), Some(401));
    // A code pinned to one worker's fingerprint refuses other keys, and admits the right ones.
    let id1 = identity(1);
    let fp = pond_core::pool::worker_fingerprint(&pond_core::pool::WorkerKeys {
        sealing: id1.sealing_public(),
        signing: id1.signing_public(),
    });
    let pinned = enroll_code(&admin, "byo", Some(&["pool:byo", "tenant:acme"]), Some(&fp));
    let wrong = enroll(&pinned, 2, None).unwrap_err();
    assert_eq!(wrong.status(), Some(403), "{wrong}");
    assert!(wrong.to_string().contains("does not match"), "{wrong}");
    let acme = enroll(&pinned, 1, None).unwrap();
    assert_eq!(acme.member.fingerprint.as_deref(), Some(fp.as_str()));
    assert_eq!(enroll(&pinned, 1, None).unwrap_err().status(), Some(401), "a used code is spent");
    // A globex worker asking for acme's tag at enrollment is refused.
    let globex_code = enroll_code(&admin, "byo", Some(&["pool:byo", "tenant:globex"]), None);
    let greedy = enroll(&globex_code, 3, Some(vec!["pool:byo".into(), "tenant:acme".into()])).unwrap_err();
    assert_eq!(greedy.status(), Some(403), "{greedy}");
    let globex = enroll(&globex_code, 3, None).unwrap();

    // Tenant A's job; tenant B's worker polls and gets nothing, even claiming extra tags.
    let id = submit(&admin, &pooled("acme", "byo", "echo secret-acme-output"));
    let claim_url = format!("{}/v1/worker/claim", orch.url);
    let (status, _) = raw("POST", &claim_url, &globex.token, Some(json!({"wait_ms": 1500})));
    assert_eq!(status, 204, "tenant B's worker got tenant A's job");
    let (status, body) = raw("POST", &claim_url, &globex.token, Some(json!({"wait_ms": 100, "tags": ["tenant:acme"]})));
    assert_eq!(status, 400, "a claim cannot carry tags: {body}");
    // A worker credential is not an orchestrator credential.
    let (status, _) =
        raw("POST", &format!("{}/v1/orch/claim", server.url), &acme.token, Some(json!({"workers": [acme.member.id]})));
    assert_eq!(status, 401);

    // Tenant A's worker gets the job; tenant B's worker cannot act on it.
    let (status, body) = raw("POST", &claim_url, &acme.token, Some(json!({"wait_ms": 5000})));
    assert_eq!(status, 200, "{body}");
    let ticket: pond_http::pool_wire::JobTicket = serde_json::from_str(&body).unwrap();
    assert_eq!(ticket.run.id.to_string(), id);
    // The ticket is signed by pond for this worker: an orchestrator that alters it (another
    // recipient, another command) or hands it to another worker is refused by the worker.
    let pond_key = pond_core::pool::decode_key(acme.pond_key.as_deref().unwrap()).unwrap();
    use pond_http::pool_client::check_ticket;
    assert_eq!(check_ticket(&ticket, &pond_key, &acme.member.id), Ok(()));
    assert!(check_ticket(&ticket, &pond_key, &globex.member.id).is_err(), "another worker");
    let mut altered = ticket.clone();
    altered.run.encryption = Some(pond_core::run::Encryption { recipients: vec!["AAAA".into()], request: None });
    assert!(check_ticket(&altered, &pond_key, &acme.member.id).unwrap_err().contains("did not sign"));
    let mut altered = ticket.clone();
    altered.credentials = Some("swapped".into());
    assert!(check_ticket(&altered, &pond_key, &acme.member.id).is_err());
    let job_url = |tail: &str| format!("{}/v1/worker/jobs/{}/{tail}", orch.url, ticket.job_id);
    for (method, tail, body) in [
        ("POST", "heartbeat", None),
        ("GET", "input", None),
        ("POST", "logs", Some(json!({"lines": [{"stream": "stdout", "text": "injected"}]}))),
        ("POST", "release", None),
    ] {
        let (status, text) = raw(method, &job_url(tail), &globex.token, body);
        assert!(status == 409 || status == 401, "{method} {tail} by another worker: {status} {text}");
    }
    let forged_result = json!({
        "outcome": "succeeded", "input_sha256": ticket.input_sha256, "output_sha256": "00".repeat(32),
        "signature": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 64]),
    });
    let (status, _) = raw("POST", &job_url("result"), &globex.token, Some(forged_result.clone()));
    assert_eq!(status, 409, "another tenant's worker reported a result");
    assert!(!common::log_text(&admin, &id).iter().any(|l| l.contains("injected")));

    // The holder reports a result with a forged signature: recorded, flagged, and the stage
    // fails (attestation `required` by default).
    let (status, body) = raw("POST", &job_url("result"), &acme.token, Some(forged_result.clone()));
    assert_eq!(status, 200, "{body}");
    let ack: pond_http::pool_wire::ResultAck = serde_json::from_str(&body).unwrap();
    assert!(!ack.attestation_verified, "{ack:?}");
    let run = admin.get_run(&id).unwrap();
    assert_eq!(run.stages[0].attestation_verified, Some(false));
    assert_eq!(run.stages[0].state.as_str(), "failed", "{run:?}");
    assert!(run.stages[0].error.as_deref().unwrap_or("").contains("not verified"), "{run:?}");
    let status = server.cli(&["run", "status", &id]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("NOT verified"));
    // Replaying it changes nothing.
    let (status, _) = raw("POST", &job_url("result"), &acme.token, Some(forged_result));
    assert_eq!(status, 409);
}

/// The attack an outside check found: a consumer of project acme names globex's byo host in
/// its stage's tags. Refused at submit, naming the field, in every spelling; acme's byo job
/// reaches only acme's host, and globex's host never sees it.
#[test]
fn a_consumer_cannot_pick_another_tenant_s_host() {
    let p = pool("5s");
    let admin = p.server.admin();
    let key = admin.create_key(&["acme".to_string()], Some("acme-app")).unwrap();
    let acme_app = p.server.client(key.token.as_deref().unwrap());
    for (tier, tags) in [
        (None, json!(["pool:byo", "tenant:globex"])),
        (Some("any"), json!(["pool:byo", "tenant:globex"])),
        (Some("byo"), json!(["tenant:globex"])),
        (Some("trusted"), json!(["pool:trusted"])),
        (None, json!(["repo:web", "tenant:globex"])),
    ] {
        let mut executor = json!({"kind": "shell", "argv": ["sh", "-c", "cat ~/.local/share/pond/worker/worker.json"],
            "placement": "pool", "tags": tags});
        if let Some(tier) = tier {
            executor["sandbox"] = json!({"tier": tier});
        }
        let body = json!({"project_id": "acme", "definition": {"stages": [{"key": "steal", "executor": executor}]}});
        let err = acme_app.submit(&body, None).unwrap_err();
        assert_eq!(err.status(), Some(422), "{tier:?} {tags}: {err}");
        let text = err.to_string();
        assert!(text.contains("definition.stages[0].executor.tags[") && text.contains("only the operator"), "{text}");
    }
    // A byo job of acme lands on acme's host only.
    let id = submit(&acme_app, &pooled("acme", "byo", "echo acme-only"));
    let run = common::wait_done(&admin, &id, Duration::from_secs(60));
    assert_eq!(run.state.as_str(), "succeeded", "{run:?}");
    assert_eq!(owners(&run), vec![p.acme.id.clone()]);
}

/// A byo host runs only sandboxed stages unless its operator opted in; capabilities are
/// pinned by the code, and a worker declaring more is refused at enrollment.
#[test]
fn a_byo_host_refuses_unconfined_stages_and_undeclared_capabilities() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &["--lease", "5s"]);
    let admin = server.admin();
    let code = enroll_code(&admin, "byo", None, None);
    let orch = Orchestrator::start(&server.url, &dir.path().join("orch"), "127.0.0.1:0", Some(&code));
    let code =
        common::enroll_code_granting(&admin, "byo", Some(&["pool:byo", "tenant:acme"]), &["harness.codex"], None);
    let _worker = Worker::start(&orch.url, &dir.path().join("w"), &code, &["--capabilities", "harness.codex"]);
    let id = submit(&admin, &pooled("acme", "byo", "cat worker.json ../../worker.json"));
    let run = common::wait_done(&admin, &id, Duration::from_secs(60));
    assert_eq!(run.state.as_str(), "failed", "{run:?}");
    let error = run.stages[0].error.clone().unwrap_or_default();
    assert!(error.contains("runs only sandboxed stages") && error.contains("--allow-unconfined"), "{error}");

    // A worker declaring a capability its code does not grant is refused (403) and exits.
    let code =
        common::enroll_code_granting(&admin, "byo", Some(&["pool:byo", "tenant:acme"]), &["harness.codex"], None);
    let out = std::process::Command::new(common::POND)
        .args([
            "worker",
            "--orchestrator",
            &orch.url,
            "--enroll",
            &code,
            "--capabilities",
            "harness.codex,harness.claude",
        ])
        .arg("--key-dir")
        .arg(dir.path().join("greedy"))
        .args(["--sandbox", "host"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("capability `harness.claude` is not granted"), "{stderr}");
    let pools = server.cli(&["pool", "ls"]);
    let listing = String::from_utf8_lossy(&pools.stdout);
    assert!(listing.contains("harness.codex") && !listing.contains("harness.claude"), "{listing}");
}

#[test]
fn a_pooled_stage_works_on_the_run_s_checkout_and_attests_its_bundle() {
    let p = pool("5s");
    let admin = p.server.admin();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("marker.txt"), "marker-7f3a\n").unwrap();
    std::fs::create_dir_all(src.path().join("sub")).unwrap();
    std::fs::write(src.path().join("sub/file.rs"), "fn main() {}\n").unwrap();
    let bundle = pond_exec::pack_dir(src.path()).unwrap();
    let uploaded = admin.upload_bundle("acme", &bundle).unwrap();
    let body = json!({"project_id": "acme",
    "sources": [{"label": "repo", "kind": "bundle", "config": {"bundle_id": uploaded.bundle_id}}],
    "definition": {"stages": [
        {"key": "scan", "executor": {"kind": "builtin", "name": "file_inventory"}},
        {"key": "job", "executor": {"kind": "shell", "placement": "pool", "sandbox": {"tier": "byo"},
         "argv": ["sh", "-c", "cat marker.txt && ls sub && cp marker.txt \"$POND_OUTPUT_DIR/seen.txt\""]}}
    ]}});
    let id = submit(&admin, &body);
    let run = wait_done(&admin, &id, Duration::from_secs(60));
    assert_eq!(run.state.as_str(), "succeeded", "{run:?}");
    assert_eq!(run.stages[0].placement, "local");
    let job = &run.stages[1];
    assert_eq!(job.attempts[0].owner, p.acme.id);
    assert_eq!(job.attestation_verified, Some(true), "{:?}", job.attempts);
    let logs = common::log_text(&admin, &id);
    assert!(logs.iter().any(|l| l == "marker-7f3a"), "{logs:?}");
    assert!(logs.iter().any(|l| l == "file.rs"), "{logs:?}");
    let mut seen = Vec::new();
    admin.download_artifact(&id, "seen.txt", &mut seen).unwrap();
    assert_eq!(seen, b"marker-7f3a\n");
    // Both throwaway checkouts are gone: the server's (packed for the worker) and the worker's.
    // (The server removes its checkout just after the run ends, as the engine records the end.)
    let checkout = p.server.data_dir.join("checkouts").join(&id);
    common::eventually("the server's checkout removed", Duration::from_secs(10), || !checkout.exists());
    // (The worker clears its job directory once pond has taken the result, just after the run
    // ended.)
    let jobs_dir = p.acme.key_dir.join("jobs");
    common::eventually("the worker's job directory emptied", Duration::from_secs(10), || {
        std::fs::read_dir(&jobs_dir).unwrap().next().is_none()
    });
}

/// A round-robin TCP load balancer on 127.0.0.1: each new connection goes to the next node.
fn round_robin(nodes: Vec<String>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let targets: Vec<String> = nodes.iter().map(|u| u.trim_start_matches("http://").to_string()).collect();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(client) = conn else { continue };
            let target = targets[n % targets.len()].clone();
            std::thread::spawn(move || {
                let Ok(upstream) = std::net::TcpStream::connect(&target) else { return };
                let (mut a, mut b) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                let (mut c, mut d) = (client, upstream);
                let up = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut a, &mut b);
                    let _ = b.shutdown(std::net::Shutdown::Write);
                });
                let _ = std::io::copy(&mut d, &mut c);
                let _ = c.shutdown(std::net::Shutdown::Write);
                let _ = up.join();
            });
        }
    });
    format!("http://{addr}")
}

/// Behind a load balancer over 3 nodes on one PostgreSQL, an orchestrator's long polls land on
/// different nodes, and an older one may still wait on one node while a newer one claims on
/// another: pond still gives a job only to an idle worker. Measured over 60 pooled jobs
/// (`POND_TEST_LB_JOBS` sets another count, e.g. 1000 for BENCHMARKS): no attempt is handed
/// back, and every job runs once.
#[test]
fn behind_a_load_balancer_jobs_go_only_to_idle_workers() {
    let Some(pg) = Server::database_server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let db = common::scratch_database(&pg, "lb");
    let nodes: Vec<Server> = (0..3)
        .map(|i| {
            Server::start(&dir.path().join(format!("node{i}")), &["--database-url", db.url.as_str(), "--lease", "10s"])
        })
        .collect();
    let balancer = round_robin(nodes.iter().map(|n| n.url.clone()).collect());
    let admin = nodes[0].admin();
    let code = enroll_code(&admin, "p", None, None);
    let orch = Orchestrator::start(&balancer, &dir.path().join("orch"), "127.0.0.1:0", Some(&code));
    let _workers: Vec<Worker> = (0..3)
        .map(|i| {
            let code = enroll_code(&admin, "p", Some(&["pool:trusted"]), None);
            Worker::start(&orch.url, &dir.path().join(format!("w{i}")), &code, &[])
        })
        .collect();
    let jobs: usize = std::env::var("POND_TEST_LB_JOBS").ok().and_then(|n| n.parse().ok()).unwrap_or(60);
    let ids: Vec<String> = (0..jobs)
        .map(|i| {
            let body = json!({"project_id": "acme", "definition": {"stages": [{"key": "job", "executor": {"kind": "shell",
                "argv": ["sh", "-c", format!("echo job {i}")], "placement": "pool", "sandbox": {"tier": "trusted"}}}]}});
            // Only the first node wrote the admin token; every node accepts it.
            submit(&nodes[i % 3].client(&nodes[0].token), &body)
        })
        .collect();
    let mut handed_back = 0;
    let (mut waits, mut runs) = (Vec::new(), Vec::new());
    let ms = |t: pond_core::time::Timestamp| t.as_millis() as i64;
    for id in &ids {
        let run = wait_done(&admin, id, Duration::from_secs(120 + jobs as u64 / 2));
        assert_eq!(run.state.as_str(), "succeeded", "{run:?}");
        handed_back +=
            run.stages[0].attempts.iter().filter(|a| a.outcome.map(|o| o.as_str()) == Some("handed_back")).count();
        assert_eq!(run.stages[0].attempts.len(), 1, "{run:?}");
        let attempt = &run.stages[0].attempts[0];
        waits.push(ms(attempt.started_at) - ms(run.created_at));
        runs.push(attempt.finished_at.map(ms).unwrap_or_default() - ms(attempt.started_at));
    }
    waits.sort();
    runs.sort();
    eprintln!(
        "handed back: {handed_back} of {} jobs; submit → start p50 {} ms, max {} ms; start → end p50 {} ms, max {} ms",
        ids.len(),
        waits[waits.len() / 2],
        waits[waits.len() - 1],
        runs[runs.len() / 2],
        runs[runs.len() - 1]
    );
    assert_eq!(handed_back, 0);
}

/// The orchestrator relays every upload, so the test plays a tampering one against a real
/// server (its own orchestrator credential, a real enrolled worker key): bytes swapped on the
/// way fail verification and the stage; an upload finished after the verified result was
/// relayed is refused, and the verified bytes are what a consumer downloads.
#[test]
fn a_tampering_orchestrator_cannot_change_verified_outputs() {
    use pond_http::pool_client::enroll_request;
    use pond_http::pool_wire::{ClaimResponse, Enrolled, ResultAck, WORKER_TOKEN_HEADER};
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &["--lease", "30s"]);
    let admin = server.admin();
    let orch =
        Client::new(&server.url, None).enroll_orchestrator(&enroll_code(&admin, "p", None, None), "evil").unwrap();
    let call = |method: &str, path: &str, worker: Option<&str>, body: Option<Vec<u8>>| -> (u16, String) {
        let mut req = ureq::request(method, &format!("{}{path}", server.url))
            .set("Authorization", &format!("Bearer {}", orch.token));
        if let Some(w) = worker {
            req = req.set(WORKER_TOKEN_HEADER, w);
        }
        let result = match body {
            Some(b) => req.set("Content-Type", "application/json").send_bytes(&b),
            None => req.call(),
        };
        match result {
            Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap_or_default()),
            Err(e) => panic!("{method} {path}: {e}"),
        }
    };
    let id = identity(7);
    let code = enroll_code(&admin, "p", Some(&["pool:byo", "tenant:acme"]), None);
    let enroll = serde_json::to_vec(&enroll_request(&code, "w", &id, None, vec![])).unwrap();
    let (status, body) = call("POST", "/v1/orch/workers/enroll", None, Some(enroll));
    assert_eq!(status, 201, "{body}");
    let worker: Enrolled = serde_json::from_str(&body).unwrap();

    // One job: the worker's signed result names `out.txt` = PASS; what reaches pond is `relayed`.
    // Returns the run, the job's path and the result body the worker signed.
    let job = |relayed: &[u8]| {
        let run = submit(&admin, &pooled("acme", "byo", "true"));
        let claim = serde_json::to_vec(&json!({"workers": [worker.member.id], "wait_ms": 5000})).unwrap();
        let (status, body) = call("POST", "/v1/orch/claim", None, Some(claim));
        assert_eq!(status, 200, "{body}");
        let ticket = serde_json::from_str::<ClaimResponse>(&body).unwrap().jobs.remove(0);
        let base = format!("/v1/orch/jobs/{}", ticket.job_id);
        let (status, _) = call("GET", &format!("{base}/input"), Some(&worker.token), None);
        assert_eq!(status, 200);
        let (status, body) =
            call("PUT", &format!("{base}/artifacts/out.txt"), Some(&worker.token), Some(relayed.to_vec()));
        assert_eq!(status, 204, "{body}");
        let manifest = [("out.txt".to_string(), hex::encode(Sha256::digest(b"PASS")))].into_iter().collect();
        let output = pond_core::pool::output_digest(&manifest);
        let input: [u8; 32] = hex::decode(&ticket.input_sha256).unwrap().try_into().unwrap();
        let attestation = pond_core::attest::Attestation {
            job_id: ticket.job_id.clone(),
            input_sha256: input,
            output_sha256: output,
            rc: 0,
        };
        let signature = attestation.sign(&id.signing_seed()).unwrap();
        let result = json!({"outcome": "succeeded", "input_sha256": ticket.input_sha256, "output_sha256": hex::encode(output),
            "signature": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, signature)});
        (run, base, serde_json::to_vec(&result).unwrap())
    };
    let report = |base: &str, result: Vec<u8>| -> ResultAck {
        let (status, body) = call("POST", &format!("{base}/result"), Some(&worker.token), Some(result));
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };

    // Swapped on the way: not verified, and the stage fails.
    let (run, base, result) = job(b"FAIL");
    let ack = report(&base, result);
    assert!(!ack.attestation_verified && ack.detail.contains("does not match"), "{ack:?}");
    let view = admin.get_run(&run).unwrap();
    assert_eq!(view.stages[0].state.as_str(), "failed", "{view:?}");

    // Relayed faithfully — but the orchestrator holds back uploads it started while the job
    // ran (a chunked body, one piece sent), relays the verified result, then finishes them.
    let (run, base, result) = job(b"PASS");
    let held_back: Vec<std::net::TcpStream> = ["out.txt", "extra.txt"]
        .iter()
        .map(|name| {
            use std::io::Write;
            let mut conn = std::net::TcpStream::connect(server.url.trim_start_matches("http://")).unwrap();
            write!(
                conn,
                "PUT {base}/artifacts/{name} HTTP/1.1\r\nHost: pond\r\nAuthorization: Bearer {}\r\n{WORKER_TOKEN_HEADER}: {}\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nFA\r\n",
                orch.token, worker.token
            )
            .unwrap();
            conn.flush().unwrap();
            conn
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let ack = report(&base, result);
    assert!(ack.attestation_verified, "{ack:?}");
    for mut conn in held_back {
        use std::io::{Read, Write};
        conn.write_all(b"2\r\nIL\r\n0\r\n\r\n").unwrap();
        let mut answer = Vec::new();
        conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 4096];
        while let Ok(n) = conn.read(&mut buf) {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 409"), "a held-back upload finished after the result: {answer}");
    }
    let names: Vec<String> = admin.artifacts(&run).unwrap().artifacts.into_iter().map(|a| a.name).collect();
    assert_eq!(names, vec!["out.txt".to_string()]);
    let mut out = Vec::new();
    admin.download_artifact(&run, "out.txt", &mut out).unwrap();
    assert_eq!(out, b"PASS");
    assert_eq!(admin.get_run(&run).unwrap().stages[0].state.as_str(), "succeeded");
}

/// What a `none`-profile job on a pool worker can reach of its worker's secrets: nothing. The
/// job plays the attacker — it knows where the key directory is (two levels above its checkout),
/// tries to read it, to uncover it, to reach it through /proc and raw devices, and to read the
/// worker's memory and environment — and prints whatever it finds.
fn a_none_job_finds_none_of_its_worker_s_secrets(uid: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &["--lease", "30s"]);
    let admin = server.admin();
    let orch = Orchestrator::start(
        &server.url,
        &dir.path().join("orch"),
        "127.0.0.1:0",
        Some(&enroll_code(&admin, "p", None, None)),
    );
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    if let Some(uid) = uid {
        std::os::unix::fs::chown(&home, Some(uid), Some(uid)).unwrap();
        // The test's temporary directory is private to root; the worker's user must reach its own.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let key_dir = home.join("worker");
    let code = enroll_code(&admin, "p", Some(&["pool:trusted"]), None);
    let _worker = Worker::start_as(&orch.url, &key_dir, &code, &["--name", "w", "--drain", "0s"], uid);
    // Another worker on this host, in a directory anyone may enter. Two root workers give
    // their jobs two uids, so its secrets are out of reach too; two workers of one unprivileged
    // user share that user's files (README: run each as its own user), so there it is another
    // user's worker.
    let neighbour_dir = home.join("neighbour");
    let neighbour_uid = if uid.is_some() { Some(65533) } else { None };
    if uid.is_some() {
        std::fs::create_dir_all(&neighbour_dir).unwrap();
        std::os::unix::fs::chown(&neighbour_dir, Some(65533), Some(65533)).unwrap();
    }
    let neighbour_code = enroll_code(&admin, "p", Some(&["pool:elsewhere"]), None);
    let _neighbour = Worker::start_as(&orch.url, &neighbour_dir, &neighbour_code, &["--name", "n"], neighbour_uid);
    // The attacker knows where its worker's key directory is.
    let script = r#"
        K="$KEYS"; echo "key dir seen as $K: $(ls -A "$K" | tr '\n' ' ')"
        for f in "$K"/worker.json "$K"/sealing.key "$K"/signing.key; do cat "$f" 2>&1 | head -c 400; echo; done
        umount "$K" 2>&1; umount -l "$K" 2>&1; cat "$K"/worker.json 2>&1
        for p in /proc/[0-9]*; do cat "$p/root$K/worker.json" "$p/environ" 2>/dev/null | tr '\0' '\n' | grep -a 'pond_worker_\|"token"'; done
        grep -a -o 'pond_worker_[0-9a-f]*' /proc/$PPID/mem /proc/$PPID/environ /proc/$PPID/cmdline 2>&1 | head -3
        ls /proc/$PPID/fd/ 2>&1 | head -3; cat /proc/$PPID/fd/* 2>&1 | grep -a -o 'pond_worker_[0-9a-f]*' | head -3
        for d in /dev/vd? /dev/sd? /dev/nvme?n? /dev/xvd?; do [ -e "$d" ] && head -c 512 "$d" >/dev/null 2>&1 && echo "RAW DISK $d READABLE"; done
        head -c 64 /proc/kcore >/dev/null 2>&1 && echo "KCORE READABLE"
        echo '|/bin/sh' > /proc/sys/kernel/core_pattern 2>/dev/null && echo "CORE PATTERN WRITABLE"
        find / -xdev -name signing.key 2>/dev/null | while read f; do echo "found $f"; cat "$f"; done
        cat "$NEIGHBOUR"/*.key "$NEIGHBOUR"/worker.json 2>&1
        echo work > mine.txt && cat mine.txt && mkdir -p "$POND_OUTPUT_DIR" && echo made > "$POND_OUTPUT_DIR/made.txt"
        echo DONE
    "#;
    let script = script
        .replace("$KEYS", &key_dir.display().to_string())
        .replace("$NEIGHBOUR", &neighbour_dir.display().to_string());
    let run = submit(&admin, &pooled("acme", "trusted", &script));
    let view = wait_done(&admin, &run, Duration::from_secs(60));
    let log = common::log_text(&admin, &run).join("\n");
    eprintln!("what the job saw:\n{log}");
    assert!(log.contains("DONE") && log.contains("work"), "the job ran: {log}");
    assert_eq!(view.stages[0].state.as_str(), "succeeded", "{view:?} {log}");
    let mut made = Vec::new();
    admin.download_artifact(&run, "made.txt", &mut made).unwrap();
    assert_eq!(made, b"made\n", "the job's own output dir works");

    let credential: serde_json::Value =
        serde_json::from_slice(&std::fs::read(key_dir.join("worker.json")).unwrap()).unwrap();
    let token = credential["token"].as_str().unwrap().to_string();
    let mut secrets = vec![token.clone(), token["pond_worker_".len()..].to_string()];
    for dir in [&key_dir, &neighbour_dir] {
        for key in ["sealing.key", "signing.key"] {
            secrets.push(std::fs::read_to_string(dir.join(key)).unwrap().trim().to_string());
        }
    }
    let neighbour: serde_json::Value =
        serde_json::from_slice(&std::fs::read(neighbour_dir.join("worker.json")).unwrap()).unwrap();
    secrets.push(neighbour["token"].as_str().unwrap().to_string());
    for secret in &secrets {
        assert!(!log.contains(secret.as_str()), "the job found a secret of its worker:\n{log}");
    }
    for door in ["RAW DISK", "KCORE READABLE", "CORE PATTERN WRITABLE", "found /", "\"token\""] {
        assert!(!log.contains(door), "{door}:\n{log}");
    }
    // The job saw its own directories in the key directory and nothing else.
    let seen = log.lines().find(|l| l.contains("key dir seen as")).unwrap_or_default().to_string();
    assert!(seen.ends_with(": jobs outputs ") || seen.ends_with(": outputs jobs "), "{seen}");
    assert!(log.contains("worker.json: No such file"), "{log}");
}

#[test]
fn a_none_job_of_a_root_worker_finds_none_of_its_secrets() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        pond_store::missing_prerequisite("a worker running as root needs the tests to run as root");
        return;
    }
    a_none_job_finds_none_of_its_worker_s_secrets(None);
}

#[test]
fn a_none_job_of_an_unprivileged_worker_finds_none_of_its_secrets() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Run as the tests' own user: it is the unprivileged worker.
        a_none_job_finds_none_of_its_worker_s_secrets(None);
        return;
    }
    a_none_job_finds_none_of_its_worker_s_secrets(Some(65534));
}

/// A pooled stage no enrolled worker could ever take (a tenant without a host of its own) is
/// named at submit (the answer's warnings, and the CLI's stderr) and in the run's status, with
/// the fix; a stage some worker can take gets no warning.
#[test]
fn a_stage_no_enrolled_worker_could_take_is_named_at_submit_and_in_status() {
    let p = pool("3s");
    let admin = p.server.admin();
    let waiting = admin.submit(&pooled("initech", "byo", "true"), None).unwrap();
    assert_eq!(waiting.warnings.len(), 1, "{:?}", waiting.warnings);
    let warning = &waiting.warnings[0];
    assert!(warning.contains("stage `job` waits for a worker with tags [pool:byo, tenant:initech]"), "{warning}");
    assert!(warning.contains("no enrolled worker offers that: enroll one"), "{warning}");
    let id = waiting.id.to_string();
    let status = p.server.cli(&["run", "status", &id]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("waits for a worker with tags [pool:byo, tenant:initech]"), "{text}");
    // The CLI says it at submit, on stderr.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wf.json");
    std::fs::write(&file, pooled("initech", "byo", "true").to_string()).unwrap();
    let out = p.server.cli(&["run", "submit", "-f", file.to_str().unwrap(), "--no-encrypt"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("warning: stage `job` waits for"), "{stderr}");
    // acme has a host: no warning, and it runs.
    let fine = admin.submit(&pooled("acme", "byo", "true"), None).unwrap();
    assert!(fine.warnings.is_empty(), "{:?}", fine.warnings);
    let done = wait_done(&admin, &fine.id.to_string(), Duration::from_secs(30));
    assert_eq!(done.state.as_str(), "succeeded");
    assert!(admin.get_run(&id).unwrap().stages[0].waiting_for.is_some(), "still waiting, still said");
}

/// A revoked worker (a host lost or compromised) is refused at once: its claims, its job calls
/// and its orchestrator's claims for it; `pond pool ls` shows it revoked. Revoking its
/// orchestrator stops that orchestrator's credential too.
#[test]
fn a_revoked_member_s_credential_stops_working_at_once() {
    use pond_http::pool_client::{enroll_request, HttpWorkerClient};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &[]);
    let admin = server.admin();
    let code = enroll_code(&admin, "p", None, None);
    let orch = Orchestrator::start(&server.url, &dir.path().join("orch"), "127.0.0.1:0", Some(&code));
    let code = enroll_code(&admin, "p", Some(&["pool:trusted"]), None);
    let worker =
        HttpWorkerClient::enroll(&orch.url, &enroll_request(&code, "lost", &identity(9), None, vec![])).unwrap();
    let claim_url = format!("{}/v1/worker/claim", orch.url);
    let (status, _) = raw("POST", &claim_url, &worker.token, Some(json!({"wait_ms": 100})));
    assert_eq!(status, 204, "before: a claim with nothing to do");
    // Endorsing needs the fingerprint the worker's own host shows: a wrong one is refused.
    let out = server.cli(&["pool", "endorse", "lost", "--fingerprint", "SHA256:not-it"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("do not endorse them"));
    let fingerprint = worker.member.fingerprint.clone().unwrap();
    let out = server.cli(&["pool", "endorse", "lost", "--fingerprint", &fingerprint]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = server.cli(&["pool", "revoke", "lost"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A revoked worker is not brought back by undoing a drain.
    let out = server.cli(&["pool", "drain", "lost", "--undo"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("is revoked"));
    // Job calls reach pond, which refuses the credential at once. (The orchestrator keeps a
    // worker's credential for up to 30 s; meanwhile its claims are answered, but with nothing.)
    let job_call = format!("{}/v1/worker/jobs/01a00000-0000-7000-8000-000000000000.s.1/heartbeat", orch.url);
    let (status, _) = raw("POST", &job_call, &worker.token, None);
    assert!(status == 401 || status == 404, "a job call after revocation: {status}");
    let listed = String::from_utf8_lossy(&server.cli(&["pool", "ls"]).stdout).to_string();
    assert!(listed.lines().any(|l| l.starts_with(&worker.member.id) && l.contains("revoked")), "{listed}");
    // A job for the pool waits for another worker; none of it reaches the revoked one.
    let id = submit(&admin, &pooled("acme", "trusted", "true"));
    for _ in 0..3 {
        let (status, body) = raw("POST", &claim_url, &worker.token, Some(json!({"wait_ms": 500})));
        assert!(status == 204 || status == 401, "a revoked worker was given work: {status} {body}");
    }
    assert_eq!(admin.get_run(&id).unwrap().stages[0].attempts.len(), 0);
    // The orchestrator too.
    let orch_id = admin.pools().unwrap().orchestrators[0].member.id.clone();
    let out = server.cli(&["pool", "revoke", &orch_id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let saved = std::fs::read_to_string(dir.path().join("orch").join("orchestrator.json")).unwrap();
    let token = serde_json::from_str::<serde_json::Value>(&saved).unwrap()["token"].as_str().unwrap().to_string();
    let (status, _) = raw("POST", &format!("{}/v1/orch/claim", server.url), &token, Some(json!({"workers": []})));
    assert_eq!(status, 401, "the revoked orchestrator's credential");
}

/// A long poll that was already waiting when its orchestrator was revoked takes no job that
/// arrives after: it ends with 401, and the job waits for another orchestrator.
#[test]
fn a_revoked_orchestrator_s_waiting_poll_takes_no_job() {
    use pond_http::pool_client::enroll_request;
    use pond_http::pool_wire::Enrolled;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &[]);
    let admin = server.admin();
    let orch = Client::new(&server.url, None).enroll_orchestrator(&enroll_code(&admin, "p", None, None), "o").unwrap();
    let code = enroll_code(&admin, "p", Some(&["pool:trusted"]), None);
    let enroll = json!(enroll_request(&code, "w", &identity(12), None, vec![]));
    let (status, body) = raw("POST", &format!("{}/v1/orch/workers/enroll", server.url), &orch.token, Some(enroll));
    assert_eq!(status, 201, "{body}");
    let worker: Enrolled = serde_json::from_str(&body).unwrap();
    let poll = {
        let (url, token, id) = (format!("{}/v1/orch/claim", server.url), orch.token.clone(), worker.member.id.clone());
        std::thread::spawn(move || raw("POST", &url, &token, Some(json!({"workers": [id], "wait_ms": 20000}))))
    };
    std::thread::sleep(Duration::from_millis(500));
    let out = server.cli(&["pool", "revoke", &orch.member.id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = submit(&admin, &pooled("acme", "trusted", "true"));
    let (status, body) = poll.join().unwrap();
    assert_eq!(status, 401, "the revoked orchestrator's waiting poll: {body}");
    assert_eq!(admin.get_run(&id).unwrap().stages[0].attempts.len(), 0);
}

/// On PostgreSQL behind several nodes, each node caches the pool credentials it checked (a
/// relayed call presents two), yet a revocation made on one node holds on another long before
/// that cache would expire on its own (5 s): the store's relay tells the other nodes, which
/// drop what they cached. Both kinds of credential, the worker's and its orchestrator's.
#[test]
fn a_revocation_on_one_node_holds_on_the_others_before_their_credential_cache_expires() {
    use pond_http::pool_client::enroll_request;
    use pond_http::pool_wire::{Enrolled, WORKER_TOKEN_HEADER};
    let Some(pg) = Server::database_server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let db = common::scratch_database(&pg, "revoke");
    let nodes: Vec<Server> = (0..2)
        .map(|i| Server::start(&dir.path().join(format!("node{i}")), &["--database-url", db.url.as_str()]))
        .collect();
    let admin = nodes[0].admin();
    let orch =
        Client::new(&nodes[0].url, None).enroll_orchestrator(&enroll_code(&admin, "p", None, None), "o").unwrap();
    let code = enroll_code(&admin, "p", Some(&["pool:trusted"]), None);
    let enroll = json!(enroll_request(&code, "w", &identity(11), None, vec![]));
    let (status, body) = raw("POST", &format!("{}/v1/orch/workers/enroll", nodes[0].url), &orch.token, Some(enroll));
    assert_eq!(status, 201, "{body}");
    let worker: Enrolled = serde_json::from_str(&body).unwrap();
    // A relayed call for a job nobody holds: refused as such (409) while both credentials stand,
    // 401 once one is revoked.
    let relayed = |node: &Server| -> u16 {
        let url = format!("{}/v1/orch/jobs/01a00000-0000-7000-8000-000000000000.s.1/heartbeat", node.url);
        match ureq::post(&url)
            .set("Authorization", &format!("Bearer {}", orch.token))
            .set(WORKER_TOKEN_HEADER, &worker.token)
            .call()
        {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(s, _)) => s,
            Err(e) => panic!("{e}"),
        }
    };
    let refused_on_node_1_in_time = |what: &str, cached_at: Instant| loop {
        let status = relayed(&nodes[1]);
        if status == 401 {
            eprintln!("{what}: refused on the other node {:?} after it cached the credential", cached_at.elapsed());
            return;
        }
        assert_ne!(status, 200, "{what}");
        assert!(
            cached_at.elapsed() < Duration::from_secs(3),
            "{what}: the other node still accepts the revoked credential ({status}) from its cache"
        );
        std::thread::sleep(Duration::from_millis(20));
    };

    // Node 1 checks (and caches) both credentials; the worker is revoked on node 0.
    let cached_at = Instant::now();
    assert_eq!(relayed(&nodes[1]), 409);
    assert_eq!(relayed(&nodes[1]), 409, "from the cache");
    let out = nodes[0].cli(&["pool", "revoke", &worker.member.id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(relayed(&nodes[0]), 401, "the revoking node refuses at once");
    refused_on_node_1_in_time("the worker", cached_at);

    // The orchestrator's own credential, cached by node 1 through a claim.
    let claim = |node: &Server| {
        raw("POST", &format!("{}/v1/orch/claim", node.url), &orch.token, Some(json!({"workers": [], "wait_ms": 0}))).0
    };
    let cached_at = Instant::now();
    assert!(matches!(claim(&nodes[1]), 200 | 204));
    let out = nodes[0].cli(&["pool", "revoke", &orch.member.id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(claim(&nodes[0]), 401);
    loop {
        let status = claim(&nodes[1]);
        if status == 401 {
            break;
        }
        assert!(cached_at.elapsed() < Duration::from_secs(3), "the revoked orchestrator is still accepted ({status})");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An orchestrator and a worker serve their own Prometheus metrics (`--metrics-listen`): the
/// orchestrator counts the jobs it handed out and the worker requests it answered, the worker
/// the jobs it ended by outcome; both pass `promtool check metrics`.
#[test]
fn orchestrator_and_worker_serve_their_own_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &[]);
    let admin = server.admin();
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (orch_metrics, worker_metrics) = (format!("127.0.0.1:{}", free()), format!("127.0.0.1:{}", free()));
    let code = enroll_code(&admin, "obs", None, None);
    let orch = Orchestrator::start_with(
        &server.url,
        &dir.path().join("orch"),
        "127.0.0.1:0",
        Some(&code),
        &[("POND_METRICS_LISTEN", orch_metrics.as_str())],
    );
    let code = enroll_code(&admin, "obs", Some(&[]), None);
    let _worker = Worker::start(&orch.url, &dir.path().join("worker"), &code, &["--metrics-listen", &worker_metrics]);
    let body = json!({"project_id": "acme", "definition": {"stages": [{"key": "p", "executor": {"kind": "shell",
        "argv": ["true"], "placement": "pool", "sandbox": {"tier": "any"}}}]}});
    let run = admin.submit(&body, None).unwrap();
    assert_eq!(wait_done(&admin, &run.id.to_string(), Duration::from_secs(60)).state.as_str(), "succeeded");
    let scrape = |addr: &str| ureq::get(&format!("http://{addr}/metrics")).call().unwrap().into_string().unwrap();
    let has = |text: &str, needles: &[&str]| {
        text.lines().any(|l| !l.starts_with('#') && needles.iter().all(|n| l.contains(n)))
    };
    let mut texts = Vec::new();
    eventually("both sides counted the job", Duration::from_secs(10), || {
        let (o, w) = (scrape(&orch_metrics), scrape(&worker_metrics));
        let done = has(&o, &["pond_orchestrator_jobs_handed_total", " 1"])
            && has(&o, &["pond_http_requests_total", "route=\"/v1/worker/jobs/{job}/result\"", "status=\"200\""])
            && has(&w, &["pond_worker_jobs_total", "outcome=\"succeeded\"", " 1"]);
        texts = vec![o, w];
        done
    });
    if std::process::Command::new("promtool").arg("--version").output().is_err() {
        pond_store::missing_prerequisite("promtool is not installed (Debian `prometheus`; .ci/run installs it)");
        return;
    }
    for text in texts {
        let file = dir.path().join("m.txt");
        std::fs::write(&file, &text).unwrap();
        let check = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::fs::File::open(&file).unwrap())
            .output()
            .unwrap();
        assert!(check.status.success(), "{}{}", String::from_utf8_lossy(&check.stderr), text);
    }
}
