//! End to end: a real `pond server` process, the real `pond` CLI and HTTP on 127.0.0.1.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use pond_core::run::{AttemptOutcome, RunState, StageState};
use serde_json::json;

#[test]
fn the_example_workflow_runs_from_the_cli_and_its_artifacts_download() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let out = server.cli(&[
        "run",
        "submit",
        "-f",
        "examples/workflows/review.json",
        "--source",
        "examples/repo",
        "--project",
        "demo",
        "--wait",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\n{stdout}\n{stderr}", out.status.code());
    assert!(stdout.contains("[todos] todo_scan: 5 markers"), "{stdout}");
    assert!(stdout.contains("[summary] todo markers: 5"), "{stdout}");
    assert!(stdout.contains("-- stage `summary` succeeded"), "live progress shows transitions: {stdout}");
    let id = submitted_id(&out.stderr);
    assert!(stderr.contains("packed examples/repo: "), "{stderr}");

    let status = server.cli(&["run", "status", &id, "--json"]);
    let run: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(run["state"], "succeeded");
    assert_eq!(run["sources"][0]["kind"], "bundle");
    assert_eq!(run["sources"][0]["resolved"]["input_sha"].as_str().unwrap().len(), 64);

    let file = dir.path().join("todos.jsonl");
    let dl = server.cli(&["run", "artifacts", &id, "todos.jsonl", "-o", file.to_str().unwrap()]);
    assert!(dl.status.success(), "{}", String::from_utf8_lossy(&dl.stderr));
    let todos = std::fs::read_to_string(&file).unwrap();
    assert_eq!(todos.lines().count(), 5);
    assert!(todos.contains("\"path\":\"src/parser/mod.rs\",\"line\":4,\"kind\":\"TODO\""), "{todos}");

    let listed = server.cli(&["run", "artifacts", &id]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    for name in ["areas.jsonl", "files.txt", "inventory.jsonl", "todos.jsonl"] {
        assert!(listed.contains(name), "{listed}");
    }
    let list = server.cli(&["run", "list", "--json"]);
    let page: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(page["runs"][0]["id"], id.as_str());
    // Search: a stage key of the workflow finds the run, other text finds nothing.
    let found = server.cli(&["run", "list", "--json", "--text", "TODOS"]);
    let found: serde_json::Value = serde_json::from_slice(&found.stdout).unwrap();
    assert_eq!(found["runs"][0]["id"], id.as_str(), "{found}");
    let none = server.cli(&["run", "list", "--json", "--text", "no-such-text-9q"]);
    let none: serde_json::Value = serde_json::from_slice(&none.stdout).unwrap();
    assert_eq!(none["runs"], serde_json::json!([]), "{none}");
    let logs = server.cli(&["run", "logs", &id]);
    assert!(String::from_utf8_lossy(&logs.stdout).contains("-- run succeeded"));
    assert!(!dir.path().join("checkouts").join(&id).exists(), "the checkout is removed when the run ends");
}

#[test]
fn a_failing_stage_is_retried_recorded_and_fails_the_cli_wait() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let wf = dir.path().join("wf.json");
    std::fs::write(
        &wf,
        json!({"stages":[
            {"key":"flaky","executor":{"kind":"shell","argv":["sh","-c","echo try $POND_ATTEMPT; exit 3"]},"max_attempts":2,"backoff":0.2},
            {"key":"never","executor":{"kind":"noop"}}
        ]})
        .to_string(),
    )
    .unwrap();
    let out = server.cli(&["run", "submit", "-f", wf.to_str().unwrap(), "--project", "acme", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "a failed run exits 1");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("[flaky] try 1") && stdout.contains("[flaky] try 2"), "{stdout}");
    assert!(stdout.contains("attempt 1 failed: exited with code 3; retrying in 200ms"), "{stdout}");
    let id = submitted_id(&out.stderr);
    let run = server.admin().get_run(&id).unwrap();
    assert_eq!(run.state, RunState::Failed);
    let flaky = &run.stages[0];
    assert_eq!((flaky.state, flaky.attempt, flaky.exit_code), (StageState::Failed, 2, Some(3)));
    assert_eq!(flaky.attempts.iter().map(|a| a.outcome).collect::<Vec<_>>(), vec![Some(AttemptOutcome::Failed); 2]);
    assert_eq!(run.stages[1].state, StageState::Cancelled);
    assert_eq!(run.error.as_deref(), Some("stage `flaky` failed: exited with code 3"));
}

#[test]
fn shell_output_streams_live_and_a_timeout_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let admin = server.admin();
    let marker = format!("3{}", std::process::id());
    let script = format!("echo started; sleep {marker} & echo child-forked; sleep 600");
    let run = admin
        .submit(
            &run_json(
                json!({"stages":[{"key":"slow","timeout":"2s","executor":{"kind":"shell","argv":["sh","-c",script]}}]}),
            ),
            None,
        )
        .unwrap();
    let id = run.id.to_string();
    let mut seen_live = None;
    let end = admin
        .follow_logs(&id, 0, &mut |line| {
            if line.line.text == "child-forked" && seen_live.is_none() {
                seen_live = Some(admin.get_run(&id).unwrap().state);
            }
        })
        .unwrap();
    assert_eq!(seen_live, Some(RunState::Running), "the line arrived while the stage was still running");
    assert_eq!(end.state, RunState::Failed);
    let run = admin.get_run(&id).unwrap();
    assert_eq!(run.stages[0].error.as_deref(), Some("timed out after 2s"));
    eventually("the grandchild to die with its group", Duration::from_secs(5), || {
        !process_running(&format!("sleep {marker}"))
    });
}

#[test]
fn cancel_sends_sigterm_to_running_stages_and_cancels_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let admin = server.admin();
    let script = "trap 'echo got-term; exit 143' TERM; echo ready; while true; do sleep 0.1; done";
    let run = admin
        .submit(
            &run_json(json!({"stages":[
                {"key":"loop","executor":{"kind":"shell","argv":["sh","-c",script]}},
                {"key":"after","executor":{"kind":"noop"}}
            ]})),
            None,
        )
        .unwrap();
    let id = run.id.to_string();
    eventually("the stage to print ready", Duration::from_secs(20), || {
        log_text(&admin, &id).iter().any(|l| l == "ready")
    });
    let out = server.cli(&["run", "cancel", &id]);
    assert!(out.status.success());
    let done = wait_done(&admin, &id, Duration::from_secs(20));
    assert_eq!(done.state, RunState::Cancelled);
    assert_eq!(done.stages[0].state, StageState::Cancelled);
    assert_eq!(done.stages[1].state, StageState::Cancelled);
    let text = log_text(&admin, &id);
    assert!(text.iter().any(|l| l == "got-term"), "the stage got SIGTERM first: {text:?}");
    let wait = server.cli(&["run", "logs", &id, "--follow"]);
    assert_eq!(wait.status.code(), Some(3), "following a cancelled run exits 3");
}

#[test]
fn a_stage_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--kill-grace", "1s"]);
    let admin = server.admin();
    let marker = format!("5{}", std::process::id());
    let script = format!("trap '' TERM; echo stubborn; sleep {marker}; echo never");
    let run = admin
        .submit(
            &run_json(json!({"stages":[{"key":"stubborn","executor":{"kind":"shell","argv":["sh","-c",script]}}]})),
            None,
        )
        .unwrap();
    let id = run.id.to_string();
    eventually("the stage to start", Duration::from_secs(20), || log_text(&admin, &id).iter().any(|l| l == "stubborn"));
    let asked = std::time::Instant::now();
    admin.cancel(&id).unwrap();
    let done = wait_done(&admin, &id, Duration::from_secs(20));
    assert_eq!(done.state, RunState::Cancelled);
    assert!(asked.elapsed() >= Duration::from_millis(900), "SIGKILL waited for the grace period");
    assert!(!process_running(&format!("sleep {marker}")), "the whole group was killed");
    assert!(!log_text(&admin, &id).iter().any(|l| l == "never"));
}

#[test]
fn kill_dash_nine_mid_run_loses_nothing_and_the_stage_is_retried_as_a_new_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--lease", "2s"]);
    let admin = server.admin();
    let before: Vec<String> = (0..5)
        .map(|_| {
            admin
                .submit(&run_json(json!({"stages":[{"key":"a","executor":{"kind":"noop"}}]})), None)
                .unwrap()
                .id
                .to_string()
        })
        .collect();
    let orphan_marker = format!("4{}", std::process::id());
    let long_script = format!(
        "echo attempt $POND_ATTEMPT; sleep {orphan_marker}$POND_ATTEMPT & sleep 3; echo finished $POND_ATTEMPT"
    );
    let run = admin
        .submit(
            &run_json(json!({"stages":[
                {"key":"first","executor":{"kind":"noop"}},
                {"key":"long","executor":{"kind":"shell","argv":["sh","-c",long_script]}},
                {"key":"last","executor":{"kind":"noop"}}
            ]})),
            None,
        )
        .unwrap();
    let id = run.id.to_string();
    eventually("the long stage to start", Duration::from_secs(20), || {
        log_text(&admin, &id).iter().any(|l| l == "attempt 1")
    });
    server.kill9();
    assert!(process_running(&format!("sleep {orphan_marker}1")), "kill -9 left the stage's processes behind");

    let server = Server::start(dir.path(), &["--lease", "2s"]);
    eventually("the restart to kill the orphaned attempt", Duration::from_secs(5), || {
        !process_running(&format!("sleep {orphan_marker}1"))
    });
    let admin = server.admin();
    let done = wait_done(&admin, &id, Duration::from_secs(30));
    assert_eq!(done.state, RunState::Succeeded);
    let long = &done.stages[1];
    assert_eq!(long.attempt, 2);
    let outcomes: Vec<_> = long.attempts.iter().map(|a| a.outcome).collect();
    assert_eq!(outcomes, vec![Some(AttemptOutcome::LeaseExpired), Some(AttemptOutcome::Succeeded)]);
    let text = log_text(&admin, &id);
    assert!(text.contains(&"finished 2".to_string()) && !text.contains(&"finished 1".to_string()), "{text:?}");
    for id in before {
        assert_eq!(
            wait_done(&admin, &id, Duration::from_secs(20)).state,
            RunState::Succeeded,
            "submitted before the crash"
        );
    }
}

#[test]
fn fingerprint_prints_stable_keys_that_match_their_fingerprints() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let run = || {
        let out =
            std::process::Command::new(POND).args(["fingerprint", "--json", "--key-dir"]).arg(&keys).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let (first, second) = (run(), run());
    assert_eq!(first, second, "the same keys on every call");
    for key in ["sealing", "signing"] {
        let pk: [u8; 32] = base64::engine::general_purpose::STANDARD
            .decode(first[key]["public_key"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        assert_eq!(first[key]["fingerprint"], pond_core::attest::fingerprint(&pk).as_str(), "{key}");
    }
    assert_ne!(first["sealing"]["public_key"], first["signing"]["public_key"]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(keys.join("signing.key")).unwrap().permissions().mode() & 0o777, 0o600);
}

#[test]
fn bulk_cancel_stops_one_projects_runs_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--slots", "2"]);
    let admin = server.admin();
    let slow = |project: &str| json!({"project_id": project, "definition": {"stages":[{"key":"wait","executor":{"kind":"noop","delay":"60s"}}]}});
    let a: Vec<String> = (0..5).map(|_| admin.submit(&slow("proj-a"), None).unwrap().id.to_string()).collect();
    let b: Vec<String> = (0..2).map(|_| admin.submit(&slow("proj-b"), None).unwrap().id.to_string()).collect();
    let key_b = admin.create_key(&["proj-b".into()], None).unwrap();
    let err = server.client(key_b.token.as_deref().unwrap()).cancel_many("proj-a", None).unwrap_err();
    assert_eq!(err.status(), Some(403), "a key for b cannot cancel a's runs");

    let out = server.cli(&["run", "cancel", "--project", "proj-a", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["cancelled"].as_array().unwrap().len(), 5, "{done}");
    for id in &a {
        assert_eq!(wait_done(&admin, id, Duration::from_secs(20)).state, RunState::Cancelled);
    }
    for id in &b {
        assert!(!admin.get_run(id).unwrap().state.is_terminal(), "the other project is untouched");
    }
    let again = admin.cancel_many("proj-a", None).unwrap();
    assert!(again.cancelled.is_empty() && again.failed.is_empty(), "a second call finds nothing to do");
    let bad = admin.cancel_many("proj-b", Some("succeeded")).unwrap_err();
    assert_eq!(bad.status(), Some(422));
    let queued_only = admin.cancel_many("proj-b", Some("queued")).unwrap();
    assert!(queued_only.cancelled.iter().all(|id| b.contains(&id.to_string())));
}

#[test]
fn sigterm_hands_running_stages_back_instead_of_leaving_them_to_their_lease() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--drain", "500ms", "--kill-grace", "1s", "--lease", "1h"]);
    let admin = server.admin();
    let body = run_json(
        json!({"stages":[{"key":"long","executor":{"kind":"shell","argv":["sh","-c","echo attempt $POND_ATTEMPT; sleep 2"]}}]}),
    );
    let id = admin.submit(&body, None).unwrap().id.to_string();
    eventually("the stage to start", Duration::from_secs(20), || {
        log_text(&admin, &id).iter().any(|l| l == "attempt 1")
    });
    let pid = server.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let exited = std::time::Instant::now();
    while server.child.try_wait().unwrap().is_none() {
        assert!(exited.elapsed() < Duration::from_secs(15), "the server did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let server = Server::start(dir.path(), &["--lease", "1h"]);
    let admin = server.admin();
    let done = wait_done(&admin, &id, Duration::from_secs(30));
    assert_eq!(done.state, RunState::Succeeded);
    let outcomes: Vec<_> = done.stages[0].attempts.iter().map(|a| a.outcome).collect();
    assert_eq!(outcomes, vec![Some(AttemptOutcome::HandedBack), Some(AttemptOutcome::Succeeded)]);
    assert!(log_text(&admin, &id).iter().any(|l| l.contains("handed back")));
}

#[test]
fn keys_are_made_once_per_context_and_replaced_only_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    let pond = |args: &[&str]| {
        std::process::Command::new(POND)
            .args(args)
            .env("POND_CONFIG", &config)
            .env_remove("POND_CONTEXT")
            .output()
            .unwrap()
    };
    let show = || serde_json::from_slice::<serde_json::Value>(&pond(&["keys", "show", "--json"]).stdout).unwrap();
    let first = show();
    assert_eq!(first, show(), "the same key on every call");
    assert!(first["age_recipient"].as_str().unwrap().starts_with("age1"));
    let path = String::from_utf8(pond(&["keys", "path"]).stdout).unwrap();
    assert_eq!(path.trim(), first["path"].as_str().unwrap());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(path.trim()).unwrap().permissions().mode() & 0o777, 0o600);
    let refused = pond(&["keys", "gen"]);
    assert_eq!(refused.status.code(), Some(2), "an existing key is not replaced without --force");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--force"));
    assert!(pond(&["keys", "gen", "--force"]).status.success());
    assert_ne!(show()["public_key"], first["public_key"]);
    let other = pond(&["--context", "other", "keys", "path"]);
    assert!(String::from_utf8_lossy(&other.stdout).trim().ends_with("keys/other.x25519"), "one key per context");
}

/// `pond demo` clears only what an earlier demo made: pointed at another directory (a server's
/// data directory, say) it refuses and leaves it as it was.
#[test]
fn demo_never_deletes_a_directory_it_did_not_make() {
    let dir = tempfile::tempdir().unwrap();
    let foreign = dir.path().join("server-data");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("admin.token"), "keep me").unwrap();
    let demo = |data: &std::path::Path| {
        std::process::Command::new(common::POND)
            .current_dir(common::root())
            .args(["demo", "--data-dir"])
            .arg(data)
            .output()
            .unwrap()
    };
    let out = demo(&foreign);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("was not made by `pond demo`"));
    assert_eq!(std::fs::read_to_string(foreign.join("admin.token")).unwrap(), "keep me");
    // Its own directory it clears and runs again.
    let own = dir.path().join("demo");
    for _ in 0..2 {
        let out = demo(&own);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// What a stage starts in a session of its own (as codex does with its tools) is outside the
/// stage's process group, but not outside the stage: on cancel, and when the stage's command
/// ends, nothing of it survives (checked in /proc), and the stage does not wait on the pipes
/// such a process holds.
#[test]
fn processes_a_stage_started_in_new_sessions_do_not_survive_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--kill-grace", "1s"]);
    let admin = server.admin();
    let pid = std::process::id();
    // `env -i` also drops the attempt's environment mark: as root the stage's own cgroup still
    // holds it.
    let root = unsafe { libc::geteuid() } == 0;
    let cases: &[(&str, &str, &str)] = &[
        ("cancel", "sleep 600", ""),
        ("exit", "true", ""),
        ("bare-cancel", "sleep 600", "env -i /usr/bin/setsid"),
        ("bare-exit", "true", "env -i /usr/bin/setsid"),
    ];
    for &(case, then, escape) in cases {
        if case.starts_with("bare") && !root {
            continue;
        }
        let marker = format!("pond-escapee-{case}-{pid}");
        let escape = if escape.is_empty() { "setsid" } else { escape };
        let script = format!("{escape} /bin/bash -c 'exec -a {marker} sleep 600' & sleep 0.5; echo started; {then}");
        let body =
            run_json(json!({"stages": [{"key": "s", "executor": {"kind": "shell", "argv": ["bash", "-c", script]}}]}));
        let id = admin.submit(&body, None).unwrap().id.to_string();
        eventually("the escapee", Duration::from_secs(20), || common::process_named(&marker));
        if case.ends_with("cancel") {
            admin.cancel(&id).unwrap();
        }
        let run = wait_done(&admin, &id, Duration::from_secs(20));
        let want = if case.ends_with("cancel") { RunState::Cancelled } else { RunState::Succeeded };
        assert_eq!(run.state, want, "{case}: {run:?}");
        eventually("the escapee's end", Duration::from_secs(5), || !common::process_named(&marker));
    }
}

/// `--check` on `pond server`, `pond orchestrator` and `pond worker` checks that role's set-up
/// with its own flags, without starting: beside a running server its database, schema and key
/// pass and a foreign key, unusable TLS files and an unreachable database fail naming their fix;
/// an orchestrator and a worker without enrollment fail, enrolled pass, and a revoked worker's
/// saved credential fails at once; a promised agent CLI that is missing fails.
#[test]
fn server_orchestrator_and_worker_check_their_set_up_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &[]);
    let data = server.data_dir.to_str().unwrap().to_string();
    let listen = server.url.trim_start_matches("http://").to_string();
    let check = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(POND)
            .args(args)
            .env("POND_SERVER_KEY", "cG9uZC10ZXN0LXNlcnZlci1rZXktMzItYnl0ZXMhISE=")
            .env("POND_CONFIG", dir.path().join("cli.json"))
            .env("POND_SANDBOX", "host")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let server_check = ["server", "--check", "--data-dir", &data, "--listen", &listen];
    let (code, text) = check(&server_check, &[]);
    assert_eq!(code, Some(0), "{text}");
    for line in [
        "ok    data dir:",
        "ok    listen: ",
        "served by a running pond",
        "ok    database: SQLite answers; its schema is this build's",
        "opens this database's sealed identity",
    ] {
        assert!(text.contains(line), "{line}: {text}");
    }
    let foreign = [("POND_SERVER_KEY", "b3RoZXItZGVwbG95bWVudC1zZXJ2ZXIta2V5LTMyISE=")];
    let (code, text) = check(&server_check, &foreign);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("FAIL  server key:") && text.contains("does not open this database's sealed identity"),
        "{text}"
    );
    let missing = dir.path().join("missing.pem");
    let missing = missing.to_str().unwrap();
    let mut with_tls = server_check.to_vec();
    with_tls.extend(["--tls-cert", missing, "--tls-key", missing]);
    let (code, text) = check(&with_tls, &[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("FAIL  tls:") && text.contains("missing.pem"), "{text}");
    let (code, text) = check(
        &["server", "--check", "--data-dir", &data, "--database-url", "postgres://pond@127.0.0.1:9/none", "--json"],
        &[],
    );
    assert_eq!(code, Some(1), "{text}");
    let checks: serde_json::Value = serde_json::from_str(&text).unwrap();
    let database = checks.as_array().unwrap().iter().find(|c| c["name"] == "database").expect("a database check");
    assert_eq!(database["ok"], false, "{checks}");
    assert!(database["fix"].as_str().unwrap().contains("POND_DATABASE_URL"), "{checks}");

    // An orchestrator: not enrolled, then enrolled (and its state directory private).
    let admin = server.admin();
    let state = dir.path().join("orch");
    let orch_check = ["orchestrator", "--check", "--server", &server.url, "--state-dir", state.to_str().unwrap()];
    let (code, text) = check(&orch_check, &[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("FAIL  credential: not enrolled") && text.contains("pond admin enroll create"), "{text}");
    let orch =
        Orchestrator::start(&server.url, &state, "127.0.0.1:0", Some(&enroll_code(&admin, "checks", None, None)));
    let mode = std::fs::metadata(&state).unwrap().permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o700, "the orchestrator's state directory");
    let (code, text) = check(&orch_check, &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("ok    enrollment: accepted: orchestrator"), "{text}");

    // A worker: enrolled and accepted; a promised CLI missing; revoked.
    let keys = dir.path().join("worker");
    let worker = Worker::start(&orch.url, &keys, &enroll_code(&admin, "checks", Some(&["pool:checks"]), None), &[]);
    let worker_check = ["worker", "--check", "--orchestrator", &orch.url, "--key-dir", keys.to_str().unwrap()];
    let (code, text) = check(&worker_check, &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(&format!("ok    enrollment: accepted: worker `{}`", worker.id)), "{text}");
    let mut promising = worker_check.to_vec();
    promising.extend(["--capabilities", "harness.codex"]);
    let (code, text) = check(&promising, &[("PATH", "/usr/bin:/bin")]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("FAIL  codex: not on PATH, but this worker declares harness.codex"), "{text}");
    admin.revoke_member(&worker.id).unwrap();
    let (code, text) = check(&worker_check, &[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("FAIL  enrollment: the saved credential is refused"), "{text}");
}

/// `pond doctor` checks the set-up and names the fix of what fails: a good set-up passes; a
/// wrong token, a data directory open to others, and a server that does not answer each fail
/// with exit code 1.
#[test]
fn doctor_names_what_is_wrong_and_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &[]);
    let data = server.data_dir.to_str().unwrap().to_string();
    let out = server.cli(&["doctor", "--data-dir", &data]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for check in [
        "ok    server:",
        "ok    version:",
        "ok    clock:",
        "ok    token: accepted",
        "ok    transparency log:",
        "ok    data dir:",
    ] {
        assert!(text.contains(check), "{check}: {text}");
    }
    let wrong = Command::new(POND)
        .args(["doctor"])
        .env("POND_SERVER", &server.url)
        .env("POND_TOKEN", "pond_wrong")
        .env("POND_CONFIG", dir.path().join("other.json"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&wrong.stdout);
    assert_eq!(wrong.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL  token: refused") && text.contains("pond admin keys create"), "{text}");
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = server.cli(&["doctor", "--data-dir", open.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL  data dir:") && text.contains("chmod 700"), "{text}");
    let away = Command::new(POND)
        .args(["doctor", "--json"])
        .env("POND_SERVER", "http://127.0.0.1:9")
        .env("POND_TOKEN", "x")
        .env("POND_CONFIG", dir.path().join("other.json"))
        .output()
        .unwrap();
    assert_eq!(away.status.code(), Some(1));
    let checks: serde_json::Value = serde_json::from_slice(&away.stdout).unwrap();
    assert_eq!(checks[0]["name"], "server");
    assert_eq!(checks[0]["ok"], false);
    assert!(checks[0]["fix"].as_str().unwrap().contains("pond server"), "{checks}");
}

/// `--source DIR` leaves out what `.gitignore` and `.pondignore` list, and a source too large for
/// the server is refused before it is uploaded, saying how to fix it.
#[test]
fn a_source_directory_honours_its_ignore_files_and_its_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &["--max-bundle-bytes", "200000"]);
    let src = dir.path().join("src");
    for (path, text) in [
        (".gitignore", "target/\n*.log\n"),
        (".pondignore", ".env\n"),
        ("lib.rs", "pub fn f() {}"),
        ("target/debug/big.bin", "built"),
        ("build.log", "noise"),
        (".env", "API_KEY=sk-live"),
    ] {
        let path = src.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let workflow = dir.path().join("wf.json");
    std::fs::write(
        &workflow,
        json!({"stages": [{"key": "ls", "executor": {"kind": "shell", "argv": ["sh", "-c", "find . -type f | sort"]}}]}).to_string(),
    )
    .unwrap();
    let args =
        ["run", "submit", "-f", workflow.to_str().unwrap(), "--source", src.to_str().unwrap(), "--project", "acme"];
    let out = server.cli(&[&args[..], &["--wait", "--no-encrypt"]].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    for kept in ["./lib.rs", "./.gitignore", "./.pondignore"] {
        assert!(stdout.contains(kept), "{kept}: {stdout}");
    }
    for left in ["big.bin", "build.log", "./.env"] {
        assert!(!stdout.lines().any(|l| l.ends_with(left)), "{left}: {stdout}");
    }
    // Hash output does not compress: 320 kB of it pass the 200 kB limit.
    let noise: Vec<u8> =
        (0..10_000u32).flat_map(|i| <sha2::Sha256 as sha2::Digest>::digest(i.to_be_bytes()).to_vec()).collect();
    std::fs::write(src.join("data.bin"), noise).unwrap();
    let out = server.cli(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("above the server's bundle limit of 200000 bytes") && stderr.contains(".pondignore"),
        "{stderr}"
    );
}

/// Shell completions that bash loads, and man pages for every command, from the CLI's own
/// definitions.
#[test]
fn completions_and_man_pages_come_from_the_cli_itself() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("pond.bash");
    let out = Command::new(POND).args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success());
    std::fs::write(&script, &out.stdout).unwrap();
    let loaded = Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p pond", script.display()))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&loaded.stdout).contains("-F _pond pond"), "{loaded:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("verify"), "every command is completed");
    let man = dir.path().join("man");
    let out = Command::new(POND).args(["man", "--dir"]).arg(&man).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for page in ["pond.1", "pond-run-submit.1", "pond-verify.1", "pond-doctor.1"] {
        let text = std::fs::read_to_string(man.join(page)).unwrap_or_default();
        assert!(text.contains(".TH"), "{page}: {text}");
    }
}
