//! The /v1 API from a client's side: auth and tenancy, bad input, idempotency, paging, and
//! every source kind, against a real server process.

mod common;

use std::time::Duration;

use common::*;
use pond_core::run::RunState;
use pond_http::client::{Client, ClientError};
use serde_json::json;

fn api_error(e: ClientError) -> (u16, String, Option<String>) {
    match e {
        ClientError::Api { status, body } => (status, body.error.message, body.error.field),
        other => panic!("expected an API error, got {other}"),
    }
}

#[test]
fn tokens_scope_runs_to_projects_and_never_leak_other_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let admin = server.admin();
    let key_a = admin.create_key(&["tenant-a".into()], Some("a")).unwrap();
    let key_b = admin.create_key(&["tenant-b".into()], None).unwrap();
    let a = server.client(key_a.token.as_deref().unwrap());
    let b = server.client(key_b.token.as_deref().unwrap());
    let def = json!({"stages":[{"key":"s","executor":{"kind":"noop","delay":"30s"}}]});
    let run_a = a.submit(&json!({"project_id":"tenant-a","definition":def}), None).unwrap();
    let id = run_a.id.to_string();

    for (what, result) in [
        ("read", b.get_run(&id).map(|_| ())),
        ("cancel", b.cancel(&id).map(|_| ())),
        ("logs", b.logs(&id, 0, 10).map(|_| ())),
        ("artifacts", b.artifacts(&id).map(|_| ())),
    ] {
        let (status, message, _) = api_error(result.unwrap_err());
        assert_eq!(status, 404, "{what} of another tenant's run");
        assert_eq!(message, format!("run {id} not found"), "{what}: same answer as a missing run");
    }
    let missing = pond_core::ids::RunId::generate(pond_core::time::Timestamp::from_millis(0)).to_string();
    assert_eq!(api_error(b.get_run(&missing).unwrap_err()).0, 404);
    assert!(b.list_runs(None, None, None, None).unwrap().runs.is_empty(), "b lists none of a's runs");
    assert!(b.list_runs(Some("tenant-a"), None, None, None).unwrap().runs.is_empty());
    assert_eq!(a.list_runs(None, None, None, None).unwrap().runs.len(), 1);
    let (status, _, _) = api_error(b.submit(&json!({"project_id":"tenant-a","definition":def}), None).unwrap_err());
    assert_eq!(status, 403, "b may not submit into a's project");
    assert_eq!(api_error(a.list_keys().unwrap_err()).0, 403, "consumer keys are not admins");
    assert_eq!(api_error(a.create_key(&["x".into()], None).unwrap_err()).0, 403);
    // Spend is scoped like runs: a's own, not b's; budgets are for admins.
    assert_eq!(a.usage("tenant-a", None, None).unwrap().total.requests, 0);
    assert_eq!(a.run_usage(&id).unwrap().total.requests, 0);
    assert_eq!(api_error(b.usage("tenant-a", None, None).unwrap_err()).0, 403);
    assert_eq!(api_error(b.run_usage(&id).unwrap_err()).0, 404);
    let budget = pond_core::definition::Budget { usd: Some(5.0), tokens: None };
    assert_eq!(api_error(a.set_budget("tenant-a", &budget).unwrap_err()).0, 403);
    let (status, _, field) = api_error(a.usage("tenant-a", Some("2026-13-01"), None).unwrap_err());
    assert_eq!((status, field.as_deref()), (422, Some("query.from")));
    let (status, _, field) = api_error(a.usage("tenant-a", Some("2026-12-05"), Some("2026-12-01")).unwrap_err());
    assert_eq!((status, field.as_deref()), (422, Some("query.from")));
    let bad = pond_core::definition::Budget { usd: Some(-1.0), tokens: None };
    let (status, _, field) = api_error(admin.set_budget("tenant-a", &bad).unwrap_err());
    assert_eq!((status, field.as_deref()), (422, Some("budget.usd")));
    admin.set_budget("tenant-a", &budget).unwrap();
    assert_eq!(a.usage("tenant-a", None, None).unwrap().budget, Some(budget), "a consumer sees its project's budget");

    let nobody = Client::new(&server.url, None);
    assert_eq!(api_error(nobody.get_run(&id).unwrap_err()).0, 401);
    let forged = server.client("pond_key_0000000000000000000000000000000000000000000000000000000000000000");
    assert_eq!(api_error(forged.get_run(&id).unwrap_err()).0, 401);

    admin.revoke_key(&key_a.id.to_string()).unwrap();
    assert_eq!(api_error(a.get_run(&id).unwrap_err()).0, 401, "a revoked key stops working");
    assert_eq!(admin.cancel(&id).unwrap().id, run_a.id, "admins see every project");

    let db = std::fs::read(dir.path().join("pond.db")).unwrap();
    let wal = std::fs::read(dir.path().join("pond.db-wal")).unwrap_or_default();
    for secret in [&server.token, key_a.token.as_ref().unwrap(), key_b.token.as_ref().unwrap()] {
        let needle = secret.as_bytes();
        assert!(!db.windows(needle.len()).any(|w| w == needle), "token stored in clear");
        assert!(!wal.windows(needle.len()).any(|w| w == needle), "token stored in clear in the WAL");
    }
    use std::os::unix::fs::PermissionsExt;
    // (The tests give the server its key through POND_SERVER_KEY, so there is no server.key.)
    for file in ["admin.token", "pond.db", "pond.db-wal", "signing.ed25519"] {
        let mode = std::fs::metadata(dir.path().join(file)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
}

#[test]
fn bad_input_gets_a_4xx_naming_the_field_never_a_500() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--max-bundle-bytes", "2000"]);
    let admin = server.admin();
    let noop = json!({"key":"a","executor":{"kind":"noop"}});
    let cases = [
        (
            json!({"project_id":"p","definition":{"stages":[{"key":"a","executor":{"kind":"warp"}}]}}),
            422,
            "definition.stages[0].executor.kind",
        ),
        (json!({"project_id":"p","definition":{"stages":[noop, noop]}}), 422, "definition.stages[1].key"),
        (
            json!({"project_id":"p","definition":{"stages":[{"key":"a","executor":{"kind":"noop"},"needs":["b"]},{"key":"b","executor":{"kind":"noop"},"needs":["a"]}]}}),
            422,
            "definition.stages[0].needs",
        ),
        (json!({"definition":{"stages":[noop]}}), 422, "project_id"),
        (json!({"project_id":"p"}), 422, "definition"),
        (
            json!({"project_id":"p","definition":{"stages":[noop]},"sources":[{"kind":"git_https","config":{"url":"ftp://example.com/x"}}]}),
            422,
            "sources[0].config.url",
        ),
        (
            json!({"project_id":"p","definition":{"stages":[noop]},"sources":[{"kind":"local","config":{"path":"/etc"}}]}),
            422,
            "sources[0].config.path",
        ),
        (json!({"project_id":"p","definition":{"stages":[noop]},"encrypt":true}), 422, "recipient_pubkeys"),
        (
            json!({"project_id":"p","definition":{"stages":[{"key":"a","executor":{"kind":"shell","argv":["x"]},"timeout":"whenever"}]}}),
            422,
            "definition.stages[0].timeout",
        ),
        (json!({"project_id":"p","definition":{"stages":[noop]},"colour":"red"}), 422, "colour"),
    ];
    for (body, status, field) in cases {
        let (got, message, got_field) = api_error(admin.submit(&body, None).unwrap_err());
        assert_eq!((got, got_field.as_deref()), (status, Some(field)), "{body} -> {message}");
        assert!(message.starts_with(field), "message names the field: {message}");
    }
    #[allow(clippy::result_large_err)]
    let raw = |ct: &str, body: &[u8]| {
        ureq::post(&format!("{}/v1/runs", server.url))
            .set("Authorization", &format!("Bearer {}", server.token))
            .set("Content-Type", ct)
            .send_bytes(body)
    };
    for (ct, body, status) in [
        ("application/json", &b"{not json"[..], 400),
        ("text/plain", &b"{}"[..], 415),
        ("application/json", &b"[1,2]"[..], 422),
    ] {
        match raw(ct, body) {
            Err(ureq::Error::Status(code, resp)) => {
                assert_eq!(code, status, "{}", String::from_utf8_lossy(body));
                let err: serde_json::Value = resp.into_json().unwrap();
                assert!(err["error"]["message"].is_string());
            }
            other => panic!("expected {status}, got {other:?}"),
        }
    }
    let huge = vec![b' '; 5 * 1024 * 1024];
    match raw("application/json", &huge) {
        Err(ureq::Error::Status(code, _)) => assert_eq!(code, 413),
        Err(ureq::Error::Transport(_)) => {} // the server may close the connection while we still send
        Ok(r) => panic!("oversize body accepted: {}", r.status()),
    }
    let big_bundle = pond_exec::pack_dir(&root().join("examples/repo")).unwrap();
    let mut padded = big_bundle.clone();
    padded.extend(vec![0u8; 4000]);
    assert_eq!(api_error(admin.upload_bundle("p", &padded).unwrap_err()).0, 413);
    let (status, _, field) = api_error(admin.upload_bundle("p", b"plain text, not zstd").unwrap_err());
    assert_eq!((status, field.as_deref()), (422, Some("body")));
    let (status, _, field) = api_error(admin.list_runs(None, Some("sleeping"), None, None).unwrap_err());
    assert_eq!((status, field.as_deref()), (422, Some("query.state")));
    assert_eq!(api_error(admin.get_run("not-a-uuid").unwrap_err()).0, 404);
    match ureq::delete(&format!("{}/v1/runs", server.url))
        .set("Authorization", &format!("Bearer {}", server.token))
        .call()
    {
        Err(ureq::Error::Status(405, resp)) => {
            let err: serde_json::Value = resp.into_json().unwrap();
            assert_eq!(err["error"]["code"], "method_not_allowed");
        }
        other => panic!("expected a JSON 405, got {other:?}"),
    }
}

#[test]
fn idempotency_keys_return_the_same_run_and_lists_page_by_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let admin = server.admin();
    let body = run_json(json!({"stages":[{"key":"a","executor":{"kind":"noop"}}]}));
    let first = admin.submit(&body, Some("order-42")).unwrap();
    let retry = admin.submit(&body, Some("order-42")).unwrap();
    assert_eq!(first.id, retry.id);
    let other = admin.submit(&body, Some("order-43")).unwrap();
    assert_ne!(first.id, other.id);
    for _ in 0..3 {
        admin.submit(&body, None).unwrap();
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = admin.list_runs(Some("acme"), None, Some(2), cursor.as_deref()).unwrap();
        seen.extend(page.runs.iter().map(|r| r.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5, "five distinct runs across pages");
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.reverse();
    assert_eq!(seen, sorted, "newest first");
    eventually("all runs to finish", Duration::from_secs(20), || {
        admin.list_runs(None, Some("succeeded"), Some(100), None).unwrap().runs.len() == 5
    });
}

/// Serves a directory over plain HTTP (git's "dumb" protocol needs nothing more).
fn serve_dir(dir: std::path::PathBuf) -> (String, std::sync::mpsc::Sender<()>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || loop {
        if stopped.try_recv().is_ok() {
            return;
        }
        let Ok((stream, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        stream.set_nonblocking(false).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request = String::new();
        reader.read_line(&mut request).unwrap_or(0);
        let mut header = String::new();
        while reader.read_line(&mut header).map(|n| n > 2).unwrap_or(false) {
            header.clear();
        }
        let path = request.split_whitespace().nth(1).unwrap_or("/").split('?').next().unwrap_or("/").to_string();
        let file = dir.join(path.trim_start_matches('/'));
        let mut stream = stream;
        match std::fs::read(&file) {
            Ok(data) if !path.contains("..") => {
                let _ = write!(stream, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", data.len());
                let _ = stream.write_all(&data);
            }
            _ => {
                let _ = write!(stream, "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            }
        }
    });
    (format!("http://{addr}"), stop)
}

fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git is installed (the project's .ci/run installs it)");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn git_https_sources_clone_at_a_ref_and_record_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q"]);
    std::fs::write(work.join("a.rs"), "// TODO: v1\n").unwrap();
    git(&work, &["add", "."]);
    git(&work, &["commit", "-qm", "v1"]);
    git(&work, &["tag", "v1"]);
    let v1 = git(&work, &["rev-parse", "HEAD"]);
    std::fs::write(work.join("b.rs"), "// FIXME: v2\n").unwrap();
    git(&work, &["add", "."]);
    git(&work, &["commit", "-qm", "v2"]);
    let v2 = git(&work, &["rev-parse", "HEAD"]);
    let served = dir.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    git(dir.path(), &["clone", "-q", "--bare", work.to_str().unwrap(), served.join("repo.git").to_str().unwrap()]);
    git(&served.join("repo.git"), &["update-server-info"]);
    let (base, stop) = serve_dir(served);
    let url = format!("{base}/repo.git");

    let data = dir.path().join("data");
    let strict = Server::start(&data, &[]);
    let (status, message, _) = api_error(
        strict
            .admin()
            .submit(&json!({"project_id":"p","definition":{"stages":[{"key":"a","executor":{"kind":"noop"}}]},"sources":[{"kind":"git_https","config":{"url":url}}]}), None)
            .unwrap_err(),
    );
    assert_eq!(status, 422, "plain http is refused unless the operator allows it: {message}");
    drop(strict);

    // The remote is on loopback: refused before anything connects, unless the operator allows
    // internal git hosts (a test setup, a private network).
    let def = json!({"stages":[{"key":"todos","executor":{"kind":"builtin","name":"todo_scan"}}]});
    let public_only = Server::start(&data, &["--allow-http-git"]);
    let admin = public_only.admin();
    let run = admin.submit(&json!({"project_id":"p","definition":def,"sources":[{"label":"code","kind":"git_https","config":{"url": url}}]}), None).unwrap();
    let done = wait_done(&admin, &run.id.to_string(), Duration::from_secs(60));
    let error = done.stages[0].error.clone().unwrap_or_default();
    assert!(error.contains("git remote 127.0.0.1 refused: 127.0.0.1 is loopback"), "{error}");
    drop(public_only);

    let server = Server::start(&data, &["--allow-http-git", "--allow-internal-git"]);
    let admin = server.admin();
    let mut results = Vec::new();
    for git_ref in [Some("v1"), None] {
        let mut config = json!({"url": url});
        if let Some(r) = git_ref {
            config["ref"] = r.into();
        }
        let run = admin.submit(&json!({"project_id":"p","definition":def,"sources":[{"label":"code","kind":"git_https","config":config}]}), None).unwrap();
        let done = wait_done(&admin, &run.id.to_string(), Duration::from_secs(60));
        assert_eq!(done.state, RunState::Succeeded, "{:?}", log_text(&admin, &run.id.to_string()));
        let mut todos = Vec::new();
        admin.download_artifact(&run.id.to_string(), "todos.jsonl", &mut todos).unwrap();
        results.push((done.sources[0].resolved.clone().unwrap(), String::from_utf8(todos).unwrap()));
    }
    assert_eq!(results[0].0.commit.as_deref(), Some(v1.as_str()), "tag v1 resolved to its commit");
    assert_eq!(results[0].1.lines().count(), 1);
    assert_eq!(results[1].0.commit.as_deref(), Some(v2.as_str()), "default branch head");
    assert_eq!(results[1].1.lines().count(), 2);
    assert_ne!(results[0].0.input_sha, results[1].0.input_sha);

    let bad = admin
        .submit(&json!({"project_id":"p","definition":def,"sources":[{"kind":"git_https","config":{"url":format!("{base}/missing.git")}}]}), None)
        .unwrap();
    let done = wait_done(&admin, &bad.id.to_string(), Duration::from_secs(60));
    assert_eq!(done.state, RunState::Failed);
    assert!(
        done.stages[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("fetching sources failed: source `repo`: git clone failed"),
        "{:?}",
        done.stages[0].error
    );
    // A source is no port scanner: a closed port, a plain HTTP server that is no git server,
    // and a missing repository read the same.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut errors = Vec::new();
    for remote in [format!("http://127.0.0.1:{closed}/x.git"), format!("{base}/missing.git")] {
        let run = admin
            .submit(
                &json!({"project_id":"p","definition":def,"sources":[{"kind":"git_https","config":{"url":remote}}]}),
                None,
            )
            .unwrap();
        let done = wait_done(&admin, &run.id.to_string(), Duration::from_secs(60));
        errors.push(done.stages[0].error.clone().unwrap_or_default().replace(&remote, "URL"));
    }
    assert_eq!(errors[0], errors[1], "the error tells port states apart");
    let _ = stop.send(());
}

#[test]
fn local_sources_need_an_operator_allowlist_and_checkouts_are_throwaway() {
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("repos");
    std::fs::create_dir_all(allowed.join("proj/src")).unwrap();
    std::fs::write(allowed.join("proj/src/main.rs"), "fn main() {} // TODO\n").unwrap();
    let server = Server::start(&dir.path().join("data"), &["--allow-local-source", allowed.to_str().unwrap()]);
    let admin = server.admin();
    let def = json!({"stages":[{"key":"touch","executor":{"kind":"shell","argv":["sh","-c","pwd; echo changed > src/main.rs; ls"]}}]});
    let body =
        json!({"project_id":"p","definition":def,"sources":[{"kind":"local","config":{"path": allowed.join("proj")}}]});
    let run = admin.submit(&body, None).unwrap();
    let done = wait_done(&admin, &run.id.to_string(), Duration::from_secs(30));
    assert_eq!(done.state, RunState::Succeeded);
    let text = log_text(&admin, &run.id.to_string());
    let cwd = text.iter().find(|l| l.contains("/checkouts/")).expect("pwd printed");
    assert!(cwd.ends_with(&format!("{}/repo", run.id)), "{cwd}");
    assert_eq!(
        std::fs::read_to_string(allowed.join("proj/src/main.rs")).unwrap(),
        "fn main() {} // TODO\n",
        "the original is untouched"
    );
    assert!(!std::path::Path::new(cwd).exists(), "the checkout is removed when the run ends");
    let outside = json!({"project_id":"p","definition":def,"sources":[{"kind":"local","config":{"path": dir.path().join("data")}}]});
    let (status, _, field) = api_error(admin.submit(&outside, None).unwrap_err());
    assert_eq!((status, field.as_deref()), (422, Some("sources[0].config.path")));

    // Links under the allowed directory that lead out of it: the path is resolved, not read as
    // text, so each is refused and nothing of the target is copied or published.
    let secret = dir.path().join("secret");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("key.txt"), "TODO: secret-4b1d\n").unwrap();
    std::os::unix::fs::symlink(&secret, allowed.join("lnk")).unwrap();
    std::os::unix::fs::symlink("/", allowed.join("root")).unwrap();
    std::fs::create_dir_all(allowed.join("a")).unwrap();
    std::os::unix::fs::symlink(allowed.join("lnk"), allowed.join("a/nested")).unwrap();
    let scan = json!({"stages":[{"key":"todos","executor":{"kind":"builtin","name":"todo_scan"}}]});
    for path in ["lnk", "lnk/", "lnk/.", "a/nested", "a/nested/.", "root", "root/etc"] {
        let body = json!({"project_id":"p","definition":scan,
            "sources":[{"kind":"local","config":{"path": format!("{}/{path}", allowed.display())}}]});
        let run = admin.submit(&body, None).unwrap();
        let done = wait_done(&admin, &run.id.to_string(), Duration::from_secs(30));
        assert_eq!(done.state, RunState::Failed, "{path}");
        let error = done.stages[0].error.clone().unwrap_or_default();
        assert!(error.contains("outside the directories the operator allowed"), "{path}: {error}");
        let listed = admin.artifacts(&run.id.to_string()).unwrap();
        assert!(listed.artifacts.is_empty(), "{path}: {:?}", listed.artifacts);
    }
}

#[test]
fn shell_stages_get_only_allowlisted_environment_and_output_files_become_artifacts() {
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("POND_TEST_SECRET_VAR", "do-not-leak");
    let server = Server::start(dir.path(), &[]);
    let admin = server.admin();
    let script = "env | sort > $POND_OUTPUT_DIR/env.txt; mkdir -p $POND_OUTPUT_DIR/reports; echo '{\"ok\":true}' > $POND_OUTPUT_DIR/reports/r.json";
    let run = admin
        .submit(&run_json(json!({"stages":[{"key":"env","executor":{"kind":"shell","argv":["sh","-c",script],"env":{"GREETING":"hi"}}}]})), None)
        .unwrap();
    let id = run.id.to_string();
    assert_eq!(wait_done(&admin, &id, Duration::from_secs(30)).state, RunState::Succeeded);
    let mut env = Vec::new();
    admin.download_artifact(&id, "env.txt", &mut env).unwrap();
    let env = String::from_utf8(env).unwrap();
    assert!(env.contains("GREETING=hi") && env.contains(&format!("POND_RUN_ID={id}")), "{env}");
    assert!(!env.contains("do-not-leak") && !env.contains("POND_TEST_SECRET_VAR"), "host environment leaked: {env}");
    let mut report = Vec::new();
    admin.download_artifact(&id, "reports/r.json", &mut report).unwrap();
    assert_eq!(String::from_utf8(report).unwrap().trim(), "{\"ok\":true}");
}

/// `GET /metrics` (admin token) serves Prometheus text that `promtool check metrics` accepts,
/// with the requests, runs and stages the server just handled.
#[test]
fn metrics_are_prometheus_text_for_an_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let admin = server.admin();
    let ok = admin.submit(&run_json(json!({"stages": [{"key": "n", "executor": {"kind": "noop"}}]})), None).unwrap();
    let bad = admin
        .submit(&run_json(json!({"stages": [{"key": "f", "executor": {"kind": "shell", "argv": ["false"]}}]})), None)
        .unwrap();
    wait_done(&admin, &ok.id.to_string(), Duration::from_secs(20));
    wait_done(&admin, &bad.id.to_string(), Duration::from_secs(20));
    let get = |token: Option<&str>| {
        let mut req = ureq::get(&format!("{}/metrics", server.url));
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        match req.call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(get(None).0, 401);
    let consumer = admin.create_key(&["acme".into()], None).unwrap();
    assert_eq!(get(consumer.token.as_deref()).0, 403, "a consumer's token reads no operator figures");
    let (status, text) = get(Some(&server.token));
    assert_eq!(status, 200, "{text}");
    let line = |needles: &[&str]| text.lines().any(|l| !l.starts_with('#') && needles.iter().all(|n| l.contains(n)));
    assert!(line(&["pond_http_requests_total", "route=\"/v1/runs\"", "status=\"201\""]), "{text}");
    assert!(line(&["pond_runs_submitted_total", "encrypted=\"no\"", " 2"]), "{text}");
    assert!(line(&["pond_stages_finished_total", "executor=\"noop\"", "outcome=\"succeeded\""]), "{text}");
    assert!(line(&["pond_stages_finished_total", "executor=\"shell\"", "outcome=\"failed\""]), "{text}");
    assert!(line(&["pond_stage_duration_seconds_bucket", "executor=\"noop\""]), "{text}");
    assert!(line(&["pond_stages_claimed_total", "placement=\"local\""]), "{text}");
    // What Prometheus's own checker says of it.
    if std::process::Command::new("promtool").arg("--version").output().is_err() {
        pond_store::missing_prerequisite("promtool is not installed (Debian `prometheus`; .ci/run installs it)");
        return;
    }
    let scraped = dir.path().join("metrics.txt");
    std::fs::write(&scraped, &text).unwrap();
    let check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&scraped).unwrap())
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
    assert!(check.status.success(), "promtool check metrics: {said}");
}

/// A web origin the operator allowed may call the API from a browser (CORS preflight answered,
/// the answer carries the origin); any other origin gets no CORS headers.
#[test]
fn cors_lets_only_the_allowed_origins_call_from_a_browser() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--cors-origin", "https://app.example.com"]);
    let preflight = |origin: &str| {
        let r = ureq::request("OPTIONS", &format!("{}/v1/runs", server.url))
            .set("Origin", origin)
            .set("Access-Control-Request-Method", "POST")
            .set("Access-Control-Request-Headers", "authorization,content-type,idempotency-key")
            .call();
        match r {
            Ok(r) => (r.status(), r.header("access-control-allow-origin").map(str::to_string)),
            Err(ureq::Error::Status(code, r)) => (code, r.header("access-control-allow-origin").map(str::to_string)),
            Err(e) => panic!("{e}"),
        }
    };
    let (status, allowed) = preflight("https://app.example.com");
    assert!(status < 300, "{status}");
    assert_eq!(allowed.as_deref(), Some("https://app.example.com"));
    assert_eq!(preflight("https://evil.example").1, None);
    let page = ureq::get(&format!("{}/v1/runs", server.url))
        .set("Origin", "https://app.example.com")
        .set("Authorization", &format!("Bearer {}", server.token))
        .call()
        .unwrap();
    assert_eq!(page.header("access-control-allow-origin"), Some("https://app.example.com"));
    // A bad origin is refused at start, naming the flag.
    let out = std::process::Command::new(POND)
        .args(["server", "--data-dir"])
        .arg(dir.path().join("other"))
        .args(["--listen", "127.0.0.1:0", "--cors-origin", "app.example.com/x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cors-origin"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// An operator's own first admin token (`POND_ADMIN_TOKEN`, one Secret for every node): stored
/// hashed, it works at once; a later start with another changes nothing; a malformed one stops
/// the server with the reason, before it listens.
#[test]
fn the_first_admin_token_can_be_the_operator_s_own() {
    let dir = tempfile::tempdir().unwrap();
    let chosen = format!("pond_admin_{}", "7".repeat(64));
    let server = Server::start(dir.path(), &["--admin-token", &chosen]);
    let admin = server.client(&chosen);
    admin.create_key(&["acme".into()], Some("from the operator's token")).unwrap();
    let keys = admin.list_keys().unwrap();
    assert!(keys.keys.iter().any(|k| k.name == "admin (POND_ADMIN_TOKEN)"), "{keys:?}");
    let db = std::fs::read(dir.path().join("pond.db")).unwrap();
    assert!(!db.windows(chosen.len()).any(|w| w == chosen.as_bytes()), "stored in clear");
    drop(server);

    // Restarted with another token: an admin exists, so it is not added.
    let other = format!("pond_admin_{}", "8".repeat(64));
    let server = Server::start(dir.path(), &["--admin-token", &other]);
    assert_eq!(api_error(server.client(&other).list_keys().unwrap_err()).0, 401);
    assert!(server.client(&chosen).list_keys().is_ok());
    drop(server);

    for bad in ["secret", "pond_admin_short"] {
        let out = std::process::Command::new(common::POND)
            .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(["--admin-token", bad])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("the admin token"), "{err}");
    }
}

/// A real Prometheus (Debian's `prometheus`) scrapes the server with a bearer token file and
/// answers a query for a series pond exports: `up` is 1, and the queue-depth gauge counts the
/// pooled stage that no worker has taken.
#[test]
fn a_real_prometheus_scrapes_the_server_and_sees_the_queue() {
    if std::process::Command::new("prometheus").arg("--version").output().is_err() {
        pond_store::missing_prerequisite("prometheus is not installed (Debian `prometheus`; .ci/run installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let admin = server.admin();
    let pooled = json!({"stages": [{"key": "p", "executor": {"kind": "noop", "placement": "pool"}}]});
    admin.submit(&run_json(pooled), None).unwrap();
    let token_file = dir.path().join("scrape.token");
    std::fs::write(&token_file, &server.token).unwrap();
    let target = server.url.trim_start_matches("http://").to_string();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: pond\n    authorization:\n      credentials_file: {}\n    static_configs:\n      - targets: ['{target}']\n",
            token_file.display()
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let prometheus = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _prometheus = Kill(prometheus);
    let query = |q: &str| -> Option<f64> {
        let encoded: String = q
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() || b == b'_' { (b as char).to_string() } else { format!("%{b:02X}") })
            .collect();
        let url = format!("http://127.0.0.1:{port}/api/v1/query?query={encoded}");
        let answer: serde_json::Value = ureq::get(&url).call().ok()?.into_json().ok()?;
        answer["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    let started = std::time::Instant::now();
    loop {
        let up = query("up{job=\"pond\"}");
        let queued = query("pond_stages_queued{placement=\"pool\",ready=\"true\"}");
        if up == Some(1.0) && queued == Some(1.0) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "prometheus never saw pond: up {up:?}, queued {queued:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `--log-format json` writes one JSON object per line and no colour codes; every request gets
/// an access-log line with its request id — the one it came with (echoed back), or a new one.
#[test]
fn json_logs_carry_an_access_line_with_the_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let mut child = std::process::Command::new(common::POND)
        .args(["server", "--listen", "127.0.0.1:0", "--log-format", "json", "--data-dir"])
        .arg(dir.path().join("data"))
        .env_remove("POND_LOG")
        .env("POND_SANDBOX", "host")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    // Keep reading what it prints after (a closed pipe would fail its next line).
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let url = first.trim().strip_prefix("pond server listening on ").unwrap().to_string();
    let given = ureq::get(&format!("{url}/healthz")).set("x-request-id", "trace-42").call().unwrap();
    assert_eq!(given.header("x-request-id"), Some("trace-42"));
    let missing = ureq::get(&format!("{url}/no/such/route")).call().unwrap_err();
    let ureq::Error::Status(404, missing) = missing else { panic!("{missing}") };
    let made = missing.header("x-request-id").unwrap().to_string();
    assert_eq!(made.len(), 16, "{made}");
    let mut lines = Vec::new();
    let started = std::time::Instant::now();
    while lines.len() < 2 && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!text.contains('\u{1b}'), "colour codes in a file: {text}");
        // Whole lines only: the server may be writing the next one.
        let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        lines = whole
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .filter(|l| l["target"] == "pond_access")
            .collect();
    }
    let _ = child.kill();
    let _ = child.wait();
    let by_id = |id: &str| lines.iter().find(|l| l["request_id"] == id).cloned();
    let health = by_id("trace-42").unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(
        (health["method"].as_str(), health["path"].as_str(), health["status"].as_u64()),
        (Some("GET"), Some("/healthz"), Some(200))
    );
    let unknown = by_id(&made).unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(unknown["status"], 404);
    assert!(unknown["duration_ms"].as_f64().is_some());
}

/// `pond context rotate-token` on the built-in context: the admin token in the data directory is
/// replaced, the old one stops working at once, the new one works; `/v1/version` needs no token.
/// A lost admin token is recovered from the database (`pond admin token recover`).
#[test]
fn the_admin_token_rotates_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let old = server.token.clone();
    let pond = |args: &[&str]| {
        let out = std::process::Command::new(common::POND)
            .args(args)
            .env("POND_SERVER", &server.url)
            .env("POND_DATA_DIR", dir.path())
            .env("POND_CONFIG", dir.path().join("cli.json"))
            .env_remove("POND_TOKEN")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    // Who each context's token is, to its server.
    let admin_key = server.client(&old).list_keys().unwrap().keys[0].id;
    let me = pond(&["context", "whoami"]);
    assert_eq!(me.trim(), format!("context `local` on {}: key {admin_key} (admin), every project", server.url));
    let tenant = server.client(&old).create_key(&["acme".into(), "blue".into()], Some("ci")).unwrap();
    let tenant_token = tenant.token.clone().unwrap();
    pond(&["context", "add", "ci", "--server", &server.url, "--token", &tenant_token, "--use"]);
    let me: serde_json::Value = serde_json::from_str(&pond(&["context", "whoami", "--json"])).unwrap();
    assert_eq!(me["key_id"], tenant.id.to_string());
    assert_eq!(me["role"], "consumer");
    assert_eq!(me["projects"], serde_json::json!(["acme", "blue"]));
    pond(&["context", "use", "local"]);
    pond(&["context", "rotate-token"]);
    let new = std::fs::read_to_string(dir.path().join("admin.token")).unwrap().trim().to_string();
    assert_ne!(new, old);
    assert!(new.starts_with("pond_admin_"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(dir.path().join("admin.token")).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(api_error(server.client(&old).list_keys().unwrap_err()).0, 401, "the old token is dead");
    assert!(server.client(&new).list_keys().is_ok());
    let version: serde_json::Value =
        ureq::get(&format!("{}/v1/version", server.url)).call().unwrap().into_json().unwrap();
    assert_eq!(version["version"], env!("CARGO_PKG_VERSION"));

    // Every admin token lost (the file gone, say): the operator on the server's host recovers
    // one from the database beside the running server, and may revoke the others; `pond admin
    // token rotate` is `pond context rotate-token`.
    std::fs::remove_file(dir.path().join("admin.token")).unwrap();
    // A link planted where the new token is staged is replaced, not written through.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "untouched").unwrap();
    std::os::unix::fs::symlink(&victim, dir.path().join("admin.token.new")).unwrap();
    let out = pond(&["admin", "token", "recover", "--revoke-others"]);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
    assert!(out.contains("1 other admin token(s) revoked"), "{out}");
    let recovered = std::fs::read_to_string(dir.path().join("admin.token")).unwrap().trim().to_string();
    assert_eq!(std::fs::metadata(dir.path().join("admin.token")).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(server.client(&recovered).list_keys().is_ok(), "the recovered token works");
    eventually("the revoked admin token to stop working", Duration::from_secs(10), || {
        server.client(&new).list_keys().is_err()
    });
    assert!(server.client(&tenant_token).list_runs(None, None, Some(1), None).is_ok(), "consumer keys stay");
    pond(&["admin", "token", "rotate"]);
    let rotated = std::fs::read_to_string(dir.path().join("admin.token")).unwrap().trim().to_string();
    assert_ne!(rotated, recovered);
    assert!(server.client(&rotated).list_keys().is_ok());
}

/// One TOML file configures the server: its settings apply where no flag or environment
/// variable says otherwise, `--print-config` shows each setting with where it came from (secrets
/// hidden), an unknown key is refused naming it, and a server starts from the file.
#[test]
fn a_config_file_sets_what_flags_and_env_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pond.toml");
    let data = dir.path().join("from-file");
    std::fs::write(
        &file,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata-dir = \"{}\"\nslots = 3\nlease = \"45s\"\nmodel-origin = [\"https://a.example\", \"https://b.example\"]\nallow-http-git = true\nadmin-token = \"pond_admin_{}\"\n[worker]\norchestrator = \"http://o:8430\"\n",
            data.display(),
            "5".repeat(64)
        ),
    )
    .unwrap();
    let pond = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(common::POND);
        cmd.args(args).env_remove("POND_SLOTS").env_remove("POND_LEASE").env_remove("POND_LISTEN");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let file_arg = file.display().to_string();
    // Global flags before the command (their values are not commands).
    let out = pond(
        &["--log-format", "json", "--config-file", &file_arg, "server", "--print-config", "--lease", "10s"],
        &[("POND_SLOTS", "5")],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "listen = \"127.0.0.1:0\"  # file",
        "slots = \"5\"  # env",
        "lease = \"10s\"  # flag",
        "model-origin = [\"https://a.example\", \"https://b.example\"]  # file",
        "allow-http-git = \"true\"  # file",
        "admin-token = \"<hidden>\"  # file",
        "database-pool = \"16\"  # default",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
    }
    assert!(!text.contains(&"5".repeat(64)), "a secret printed");

    std::fs::write(dir.path().join("bad.toml"), "[server]\nlisen = \"x\"\n").unwrap();
    let bad = dir.path().join("bad.toml").display().to_string();
    let out = pond(&["server", "--config-file", &bad, "--print-config"], &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("[server] has no setting `lisen`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A server from the file alone (POND_CONFIG_FILE): listening, its data where the file says.
    let mut child = std::process::Command::new(common::POND)
        .arg("server")
        .env("POND_CONFIG_FILE", &file)
        .env("POND_SANDBOX", "host")
        .env_remove("POND_LISTEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    // Keep reading what it prints after (a closed pipe would fail its next line).
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let _ = child.kill();
    let _ = child.wait();
    assert!(first.starts_with("pond server listening on http://127.0.0.1:"), "{first}");
    assert!(data.join("admin.token").is_file(), "the data directory is the file's");
}

/// `pond backup` copies a running SQLite server's data directory (a consistent database copy
/// and the keys beside it); a server started on the copy serves the same runs, logs and
/// artifacts with the same admin token.
#[test]
fn a_backup_taken_while_the_server_runs_restores_whole() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &[]);
    let admin = server.admin();
    let body = run_json(json!({"stages": [{"key": "s", "executor": {"kind": "shell",
        "argv": ["sh", "-c", "echo backed-up-line; echo payload > $POND_OUTPUT_DIR/out.txt"]}}]}));
    let run = admin.submit(&body, None).unwrap();
    let id = run.id.to_string();
    assert_eq!(wait_done(&admin, &id, Duration::from_secs(20)).state.as_str(), "succeeded");
    let copy = dir.path().join("copy");
    let out = server.cli(&["backup", "--data-dir", &data.display().to_string(), "--to", &copy.display().to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Into an existing directory: refused.
    let again = server.cli(&["backup", "--data-dir", &data.display().to_string(), "--to", &copy.display().to_string()]);
    assert!(!again.status.success());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777, 0o700);
    drop(server);

    let restored = Server::start(&copy, &[]);
    let admin = restored.admin();
    assert_eq!(admin.get_run(&id).unwrap().state.as_str(), "succeeded");
    assert!(log_text(&admin, &id).iter().any(|l| l == "backed-up-line"));
    let mut artifact = Vec::new();
    admin.download_artifact(&id, "out.txt", &mut artifact).unwrap();
    assert_eq!(artifact, b"payload\n");
}

#[test]
fn a_server_whose_stdout_reader_went_away_keeps_serving() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(POND)
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("POND_SANDBOX", "host")
        .env("POND_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Like `pond server | head -1`: read the first line, then close the pipe.
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    let url = first.trim().strip_prefix("pond server listening on ").unwrap().to_string();
    std::thread::sleep(Duration::from_millis(500));
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let client = Client::new(&url, Some(token.trim().to_string()));
    let run = client.submit(&run_json(json!({"stages":[{"key":"a","executor":{"kind":"noop"}}]})), None).unwrap();
    assert_eq!(wait_done(&client, &run.id.to_string(), Duration::from_secs(30)).state, RunState::Succeeded);
    assert!(child.try_wait().unwrap().is_none(), "the server is still up");
    // Its goodbye line goes nowhere, and the stop is still clean.
    std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "a clean stop, not a panic on the closed pipe: {status}");
}

#[test]
fn runs_past_the_retention_go_with_their_output_and_unfinished_ones_stay() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--retain-finished", "2s"]);
    let admin = server.admin();
    let done = admin
        .submit(
            &run_json(json!({"stages":[{"key":"a","executor":{"kind":"shell","argv":["sh","-c",
                "echo kept-for-now; echo data > \"$POND_OUTPUT_DIR/out.txt\""]}}]})),
            None,
        )
        .unwrap()
        .id
        .to_string();
    assert_eq!(wait_done(&admin, &done, Duration::from_secs(30)).state, RunState::Succeeded);
    assert_eq!(admin.artifacts(&done).unwrap().artifacts.len(), 1);
    let waiting = admin
        .submit(&run_json(json!({"stages":[{"key":"a","executor":{"kind":"noop","delay":"60s"}}]})), None)
        .unwrap()
        .id
        .to_string();
    eventually("the ended run deleted", Duration::from_secs(30), || {
        matches!(admin.get_run(&done), Err(ClientError::Api { status: 404, .. }))
    });
    assert_eq!(admin.artifacts(&done).unwrap_err().status(), Some(404));
    assert!(!admin.get_run(&waiting).unwrap().state.is_terminal(), "a run still going stays");
}

/// A bundle runs used is counted, not kept forever: retention deleting one of its runs keeps it
/// for the others (one run naming it twice counts once), deleting the last takes it along, and
/// a submit naming it then hears why.
#[test]
fn a_bundle_goes_with_the_last_run_that_used_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--retain-finished", "2s"]);
    let admin = server.admin();
    let bundle = pond_exec::pack_dir(&root().join("examples/repo")).unwrap();
    let id = admin.upload_bundle("acme", &bundle).unwrap().bundle_id.to_string();
    let run_with = |labels: &[&str], delay: &str| {
        let sources: Vec<serde_json::Value> =
            labels.iter().map(|l| json!({"label": l, "kind": "bundle", "config": {"bundle_id": &id}})).collect();
        admin.submit(
            &json!({
                "project_id": "acme",
                "definition": {"stages": [{"key": "a", "executor": {"kind": "noop", "delay": delay}}]},
                "sources": sources,
            }),
            None,
        )
    };
    let blob_kept = || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            use pond_core::store::Store;
            let store = pond_store::SqliteStore::open(&dir.path().join("pond.db")).await.unwrap();
            store.blob_meta(id.parse().unwrap()).await.unwrap().is_some()
        })
    };
    let first = run_with(&["src", "again"], "0s").unwrap().id.to_string();
    assert_eq!(wait_done(&admin, &first, Duration::from_secs(30)).state, RunState::Succeeded);
    let second = run_with(&["src"], "5s").unwrap().id.to_string();
    eventually("the first run deleted", Duration::from_secs(30), || {
        matches!(admin.get_run(&first), Err(ClientError::Api { status: 404, .. }))
    });
    assert!(blob_kept(), "the bundle went while a run still holds it");
    assert_eq!(wait_done(&admin, &second, Duration::from_secs(30)).state, RunState::Succeeded);
    eventually("the last run deleted, and its bundle with it", Duration::from_secs(30), || {
        matches!(admin.get_run(&second), Err(ClientError::Api { status: 404, .. })) && !blob_kept()
    });
    let (status, message, field) = api_error(run_with(&["src"], "0s").unwrap_err());
    assert_eq!((status, field.as_deref()), (422, Some("sources[0].config.bundle_id")), "{message}");
}

/// Uploading bundles without ever submitting cannot fill the server's disk: a project holds at
/// most `--max-pending-bundle-bytes` of bundles no run uses (past it, 429 naming the limit and
/// what frees room), a run that uses one frees its room and keeps it, and one unused for
/// `--bundle-ttl` after its upload is deleted (a submit naming it then hears why).
#[test]
fn unused_bundles_are_bounded_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = pond_exec::pack_dir(&root().join("examples/repo")).unwrap();
    // Room for two of them (sealed, each is a little larger than packed), not three.
    let limit = (bundle.len() * 5 / 2).to_string();
    let server = Server::start(dir.path(), &["--max-pending-bundle-bytes", &limit, "--bundle-ttl", "3s"]);
    let admin = server.client(&server.token);
    let run_with = |bundle_id: &str| {
        admin.submit(
            &serde_json::json!({
                "project_id": "acme",
                "definition": {"stages": [{"key": "a", "executor": {"kind": "noop"}}]},
                "sources": [{"label": "src", "kind": "bundle", "config": {"bundle_id": bundle_id}}],
            }),
            None,
        )
    };
    let first = admin.upload_bundle("acme", &bundle).unwrap().bundle_id.to_string();
    let second = admin.upload_bundle("acme", &bundle).unwrap().bundle_id.to_string();
    let (status, message, _) = api_error(admin.upload_bundle("acme", &bundle).unwrap_err());
    assert_eq!(status, 429, "{message}");
    assert!(message.contains("--max-pending-bundle-bytes") && message.contains("project `acme`"), "{message}");
    // Another project's room is its own.
    admin.upload_bundle("other", &bundle).unwrap();
    // A run that uses a bundle takes it out of the pending ones: room for another upload.
    let run = run_with(&first).unwrap();
    let third = admin.upload_bundle("acme", &bundle).unwrap().bundle_id.to_string();
    // Past the TTL, the unused ones are gone; the used one stays with its run.
    std::thread::sleep(Duration::from_secs(6));
    for unused in [&second, &third] {
        let (status, message, field) = api_error(run_with(unused).unwrap_err());
        assert_eq!((status, field.as_deref()), (422, Some("sources[0].config.bundle_id")), "{message}");
    }
    let again = run_with(&first).expect("a bundle a run used is kept");
    assert_ne!(again.id, run.id);
    // And the room they held is free again.
    admin.upload_bundle("acme", &bundle).unwrap();
    admin.upload_bundle("acme", &bundle).unwrap();
}

/// `pond admin server-key rotate` on a SQLite data directory, then a restart: everything the old
/// key sealed (a credential, a webhook secret, uploaded bundles, the identity root) is sealed
/// under the new one — checked in the database file with both keys —, still works, the
/// control plane's identity is unchanged, the previous key file goes when the sweep is done,
/// and a node given only the old key (or another key) is refused at start.
#[test]
fn the_server_key_rotates_and_what_it_sealed_follows() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let own_key = [("POND_SERVER_KEY", "")];
    let mut server = Server::start_with_env(&data, &[], &own_key);
    let admin = server.admin();
    let old_key = pond_core::pool::decode_key(&std::fs::read_to_string(data.join("server.key")).unwrap()).unwrap();
    let control_plane = admin.keys().unwrap().control_plane_key;

    // Sealed under the old key: a credential, a webhook secret, a used and an unused bundle.
    add_openai_credential(&server, "sk-rotate-me");
    let out = server.cli(&["webhooks", "add", "https://receiver.example/hook", "--project", "acme"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bundle = pond_exec::pack_dir(&root().join("examples/repo")).unwrap();
    let used = admin.upload_bundle("acme", &bundle).unwrap().bundle_id.to_string();
    let unused = admin.upload_bundle("acme", &bundle).unwrap().bundle_id.to_string();
    let run_with = |client: &Client, bundle_id: &str| {
        let body = json!({
            "project_id": "acme",
            "definition": {"stages": [{"key": "a", "executor": {"kind": "shell", "argv": ["sh", "-c", "ls src >/dev/null"]}}]},
            "sources": [{"label": "src", "kind": "bundle", "config": {"bundle_id": bundle_id}}],
        });
        let id = client.submit(&body, None).unwrap().id.to_string();
        wait_done(client, &id, Duration::from_secs(30))
    };
    assert_eq!(run_with(&admin, &used).state, RunState::Succeeded);

    // Not beside the running server (its sweep would remove the previous-keys file under it).
    let out = std::process::Command::new(POND)
        .args(["admin", "server-key", "rotate", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stop it first"), "{out:?}");
    // Rotate (the server stopped), restart.
    server.kill9();
    let out = std::process::Command::new(POND)
        .args(["admin", "server-key", "rotate", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let new_key = pond_core::pool::decode_key(&std::fs::read_to_string(data.join("server.key")).unwrap()).unwrap();
    assert_ne!(new_key, old_key);
    let previous = data.join("server.key.previous");
    assert!(std::fs::read_to_string(&previous).unwrap().contains(&b64.encode(old_key)));
    let server = Server::start_with_env(&data, &[], &own_key);
    let admin = server.admin();
    eventually("the re-seal to finish and remove server.key.previous", Duration::from_secs(30), || !previous.exists());

    // Holding the database file and the old key opens nothing any more; the new key opens it all.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        use pond_core::store::Store;
        let store = pond_store::SqliteStore::open(&data.join("pond.db")).await.unwrap();
        let mut sealed_values = Vec::new();
        for kind in ["credential", "webhook", "server-identity"] {
            for (_, body) in store.list_records(kind).await.unwrap() {
                // The identity record is the sealed value itself; the others hold them in JSON.
                match serde_json::from_str::<serde_json::Value>(&body) {
                    Ok(value) => collect_sealed(&value, &mut sealed_values),
                    Err(_) => sealed_values.push(body),
                }
            }
        }
        assert!(sealed_values.len() >= 3, "credential, webhook secret, identity: {sealed_values:?}");
        for text in &sealed_values {
            let sealed = b64.decode(text).unwrap();
            assert!(pond_core::seal::open_at_rest(&old_key, &sealed).is_err(), "still opens under the old key");
            assert!(pond_core::seal::open_at_rest(&new_key, &sealed).is_ok(), "does not open under the new key");
        }
        let blobs = store.list_blobs(None, 1000).await.unwrap();
        for id in [&used, &unused] {
            let meta = blobs.iter().find(|b| b.id.to_string() == *id).expect("bundle kept");
            let data = pond_core::store::read_blob(&store, meta).await.unwrap();
            assert!(pond_core::seal::open_at_rest(&old_key, &data).is_err(), "bundle {id} still under the old key");
            assert!(pond_core::seal::open_at_rest(&new_key, &data).is_ok(), "bundle {id} not under the new key");
        }
    });

    // Still works: both bundles run, the credential's fingerprint is the new key's, the
    // identity consumers pinned is the same.
    assert_eq!(run_with(&admin, &used).state, RunState::Succeeded);
    assert_eq!(run_with(&admin, &unused).state, RunState::Succeeded);
    assert_eq!(admin.keys().unwrap().control_plane_key, control_plane);
    let listed = server.cli(&["admin", "credentials", "list", "--json"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains(&pond_core::credentials::server_key_fingerprint(&new_key)), "{text}");

    // A node given only the old key, or a stranger's, is refused at start by name.
    drop(server);
    for key in [old_key, [9u8; 32]] {
        let stderr = refused_start(&data, &[], &[("POND_SERVER_KEY", &b64.encode(key))]);
        assert!(stderr.contains("does not open this database's sealed identity"), "{stderr}");
    }
}

/// Someone holding the database deletes its sealed identity and the nodes' endorsements (so a
/// restart would make a new identity nobody pinned): the node refuses to start, naming the
/// control-plane key its data directory pinned.
#[test]
fn a_node_refuses_a_database_whose_identity_was_swapped() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start_with_env(&data, &[], &[("POND_SERVER_KEY", "")]);
    let control_plane = server.admin().keys().unwrap().control_plane_key;
    server.kill9();
    let pinned = std::fs::read_to_string(data.join("control-plane.pub")).unwrap();
    assert_eq!(pinned.trim(), control_plane);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        use pond_core::store::Store;
        let store = pond_store::SqliteStore::open(&data.join("pond.db")).await.unwrap();
        store.delete_record("server-identity", "root").await.unwrap();
        for (id, _) in store.list_records("log_signer").await.unwrap() {
            store.delete_record("log_signer", &id).await.unwrap();
        }
    });
    let stderr = refused_start(&data, &[], &[]);
    assert!(stderr.contains("is not the one this node served before") && stderr.contains(&control_plane), "{stderr}");
    // The refused node stored no new identity for other nodes to serve.
    rt.block_on(async {
        use pond_core::store::Store;
        let store = pond_store::SqliteStore::open(&data.join("pond.db")).await.unwrap();
        assert!(store.get_record("server-identity", "root").await.unwrap().is_none());
    });
}

/// Every string under a `sealed` key, nested anywhere.
fn collect_sealed(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("sealed", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_sealed(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_sealed(v, out)),
        _ => {}
    }
}
