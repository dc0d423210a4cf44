//! The OpenAPI documents: the checked-in files are what the code generates, the processes serve
//! them (and the docs page, with nothing loaded from elsewhere), and Schemathesis finds no
//! answer of a live server that breaks them — on SQLite and on PostgreSQL.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Server, POND};

fn checked_in(name: &str) -> PathBuf {
    common::root().join("docs").join(name)
}

fn pond_openapi(args: &[&str]) -> String {
    let out = Command::new(POND).arg("openapi").args(args).output().expect("run pond openapi");
    assert!(out.status.success(), "pond openapi {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("the document is UTF-8")
}

#[test]
fn the_checked_in_documents_are_what_the_code_generates() {
    for (args, file) in [(&[][..], "openapi.json"), (&["--orchestrator"][..], "openapi-orchestrator.json")] {
        let generated = pond_openapi(args);
        let on_disk = std::fs::read_to_string(checked_in(file)).unwrap_or_default();
        let command = format!("pond openapi {}> docs/{file}", args.iter().map(|a| format!("{a} ")).collect::<String>());
        assert!(
            generated == on_disk,
            "docs/{file} is stale: the API changed. Regenerate it with `{command}` \
             (`cargo run -p pond -- openapi {}> docs/{file}`) and commit it",
            args.iter().map(|a| format!("{a} ")).collect::<String>()
        );
        let document: serde_json::Value = serde_json::from_str(&generated).unwrap();
        assert_eq!(document["openapi"], "3.1.0");
    }
}

#[test]
fn the_server_serves_its_document_and_a_docs_page_that_loads_nothing_from_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let agent = ureq::AgentBuilder::new().build();
    // No token: the document and the docs are public.
    let served = agent.get(&format!("{}/v1/openapi.json", server.url)).call().unwrap();
    assert_eq!(served.content_type(), "application/json");
    assert_eq!(served.into_string().unwrap(), std::fs::read_to_string(checked_in("openapi.json")).unwrap());

    let page = agent.get(&format!("{}/docs", server.url)).call().unwrap();
    assert_eq!(page.content_type(), "text/html");
    let csp = page.header("content-security-policy").unwrap_or_default().to_string();
    let html = page.into_string().unwrap();
    assert!(!html.contains("http://") && !html.contains("https://"), "the page names another origin:\n{html}");
    let references = local_references(&html);
    assert!(references.contains(&"/v1/openapi.json".to_string()), "{references:?}");
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
    for reference in &references {
        assert!(reference.starts_with('/') && !reference.starts_with("//"), "`{reference}` is not a local URL");
        let answer = agent.get(&format!("{}{reference}", server.url)).call().unwrap();
        assert_eq!(answer.status(), 200, "{reference}");
        if reference.ends_with(".js") {
            assert_eq!(answer.content_type(), "text/javascript");
            let script = answer.into_string().unwrap();
            assert!(script.len() > 500_000 && script.contains("Redoc"), "the script is not Redoc's bundle");
            assert!(!script.contains("cdn.redoc.ly"), "the script loads Redocly's CDN logo");
        }
    }
    assert!(references.iter().any(|r| r.ends_with(".js")), "the page loads no script: {references:?}");
}

/// Every `src`, `href` and `spec-url` attribute of `html`.
fn local_references(html: &str) -> Vec<String> {
    let mut found = Vec::new();
    for attribute in ["src=\"", "href=\"", "spec-url=\""] {
        let mut rest = html;
        while let Some(at) = rest.find(attribute) {
            let value = &rest[at + attribute.len()..];
            let end = value.find('"').unwrap_or(value.len());
            found.push(value[..end].to_string());
            rest = &value[end..];
        }
    }
    found
}

#[test]
fn the_orchestrator_serves_its_workers_document() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &[]);
    let code = common::enroll_code(&server.admin(), "docs", None, None);
    let orchestrator = common::Orchestrator::start(&server.url, &dir.path().join("orch"), "127.0.0.1:0", Some(&code));
    let served = ureq::get(&format!("{}/v1/openapi.json", orchestrator.url)).call().unwrap();
    assert_eq!(served.content_type(), "application/json");
    let text = served.into_string().unwrap();
    assert_eq!(text, std::fs::read_to_string(checked_in("openapi-orchestrator.json")).unwrap());
    let document: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(document["paths"]["/v1/worker/claim"]["post"].is_object(), "{document}");
}

/// The seed and examples per operation README.md ("HTTP API") names.
const SEED: &str = "20261203";
const EXAMPLES: &str = "100";

/// The Schemathesis command of README.md ("HTTP API") against `server`'s document, as `token`,
/// narrowed by `filters`: every check must pass.
fn schemathesis(python: &str, server: &Server, token: &str, filters: &[&str]) {
    schemathesis_with(python, server, token, filters, "");
}

/// [`schemathesis`] with `extra` appended to the settings file (fixed parameter values).
fn schemathesis_with(python: &str, server: &Server, token: &str, filters: &[&str], extra: &str) {
    schemathesis_at(python, &server.url, token, filters, extra);
}

/// Schemathesis against the document `url` serves at `/v1/openapi.json`.
fn schemathesis_at(python: &str, url: &str, token: &str, filters: &[&str], extra: &str) {
    let program = Path::new(python).with_file_name("schemathesis");
    let reports = tempfile::tempdir().unwrap();
    let settings = std::fs::read_to_string(common::root().join("bins/tests/schemathesis/schemathesis.toml")).unwrap();
    let config = reports.path().join("schemathesis.toml");
    std::fs::write(&config, format!("{settings}\n{extra}")).unwrap();
    let out = Command::new(&program)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{url}/v1/openapi.json"))
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--checks", "all", "--max-examples", EXAMPLES, "--seed", SEED])
        // The token is set above; generated ones would only be refused.
        .args(["--generation-with-security-parameters", "false", "--generation-database", "none"])
        // One worker: Hypothesis describes strategies with `ast.parse`, which CPython 3.11 cannot
        // run on two threads at once ("AST constructor recursion depth mismatch", KeyErrors in
        // its lambda cache) — failures of the tool, not of pond. On 2 cores one is as fast.
        .args(["--no-color", "--workers", "1", "--request-timeout", "10"])
        .arg("--report-dir")
        .arg(reports.path())
        .args(filters)
        .current_dir(reports.path())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "schemathesis {filters:?} found failures:\n{text}");
    assert!(text.contains(" passed"), "schemathesis ran nothing:\n{text}");
}

/// A server whose runs cannot start a program: its shell stages look programs up in an empty
/// `PATH`, so what the fuzzer submits fails at once instead of running.
fn fuzz_server(dir: &Path, extra: &[&str]) -> Server {
    let empty = dir.join("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    Server::start_with_env(&dir.join("server"), extra, &[("PATH", empty.to_str().unwrap())])
}

/// The server process's resident memory, MiB (`VmRSS` in `/proc/<pid>/status`).
fn rss_mib(server: &Server) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

fn fuzz(extra: &[&str], dir: &Path) {
    let Some(python) = std::env::var("POND_TEST_PYTHON").ok().filter(|p| !p.is_empty()) else {
        pond_store::missing_prerequisite("POND_TEST_PYTHON is not set (a python with schemathesis; .ci/run sets it)");
        return;
    };
    let server = fuzz_server(dir, extra);
    let mut rss = vec![rss_mib(&server)];
    // First the orchestrators' routes (the admin run may revoke the pool's worker), with an
    // orchestrator's credential and a worker's beside it. Not the claim long poll: each call
    // waits its full `wait_ms` (up to 30 s) for work that never comes, which would be the whole
    // time budget; the pool tests exercise it.
    let (orchestrator, worker, worker_id) = enrolled_pool(&server);
    let pool_ops =
        ["--include-tag", "orch", "--exclude-path", "/v1/orch/claim", "--phases", "examples,coverage,fuzzing"];
    let worker_header = format!("{}: {worker}", pond_http::pool_wire::WORKER_TOKEN_HEADER);
    let pool_filters = [&pool_ops[..], &["--header", &worker_header]].concat();
    schemathesis(&python, &server, &orchestrator, &pool_filters);
    rss.push(rss_mib(&server));
    // Again on a job the worker holds, so the job calls reach the engine (its logs, artifacts,
    // result) rather than stopping at an unknown job id.
    let job = held_job(&server, &orchestrator, &worker_id);
    let enrollment = ["--exclude-path", "/v1/orch/enroll", "--exclude-path", "/v1/orch/workers/enroll"];
    let job_param = format!("[parameters]\n\"path.job\" = \"{job}\"\n");
    schemathesis_with(&python, &server, &orchestrator, &[&pool_filters[..], &enrollment[..]].concat(), &job_param);
    // Every operation with the admin token, but rotating it (which would end the run's token)
    // and the event stream, which never ends by itself: its pages are fuzzed next.
    let never_ending = ["--exclude-path", "/v1/keys/rotate", "--exclude-path", "/v1/events"];
    schemathesis(&python, &server, &server.token, &never_ending);
    rss.push(rss_mib(&server));
    let pages = "[parameters]\n\"query.follow\" = \"0\"\n";
    // (No stateful phase: no link leads to or from it.)
    let events = ["--include-path", "/v1/events", "--phases", "examples,coverage,fuzzing"];
    schemathesis_with(&python, &server, &server.token, &events, pages);
    // The consumer's operations with a consumer key: its own project, others refused.
    let consumer = server.admin().create_key(&["acme".to_string()], Some("fuzz")).unwrap().token.unwrap();
    let consumer_ops =
        ["--include-tag", "runs", "--include-tag", "verify", "--include-tag", "usage", "--include-tag", "webhooks"];
    schemathesis(&python, &server, &consumer, &[&consumer_ops[..], &never_ending[..]].concat());
    schemathesis_with(&python, &server, &consumer, &events, pages);
    rss.push(rss_mib(&server));
    // Rotating a key last, with a key of its own (after the first call it is revoked: 401).
    let rotated = server.admin().create_key(&["acme".to_string()], Some("rotate")).unwrap().token.unwrap();
    // (No stateful phase: no link leads from it.)
    let filters = ["--include-path", "/v1/keys/rotate", "--phases", "examples,coverage,fuzzing"];
    schemathesis(&python, &server, &rotated, &filters);
    rss.push(rss_mib(&server));
    // Bounded memory under the fuzzer (what it stored — runs, keys, webhooks — stays in the
    // database, not in the process).
    eprintln!("server RSS (MiB) at start and after each fuzz phase: {rss:.1?}");
    let peak = rss.iter().cloned().fold(0.0, f64::max);
    assert!(peak < 256.0, "the server grew to {peak:.0} MiB under the fuzzer: {rss:.1?}");
}

/// An orchestrator enrolled with `server` and a worker enrolled through it (fresh keys): their
/// credentials and the worker's id.
fn enrolled_pool(server: &Server) -> (String, String, String) {
    let admin = server.admin();
    let orchestrator =
        admin.enroll_orchestrator(&common::enroll_code(&admin, "fuzz", None, None), "fuzz").unwrap().token;
    let enrolled = enroll_worker(server, &format!("{}/v1/orch/workers/enroll", server.url), Some(&orchestrator));
    let token = enrolled["token"].as_str().unwrap().to_string();
    (orchestrator, token, enrolled["member"]["id"].as_str().unwrap().to_string())
}

/// Enrolls a worker (fixed keys, a fresh code) at `url`: pond's relayed route with the
/// orchestrator's credential, or an orchestrator's `/v1/worker/enroll`.
fn enroll_worker(server: &Server, url: &str, orchestrator: Option<&str>) -> serde_json::Value {
    let admin = server.admin();
    // Fixed keys: each test has a server of its own.
    let identity = pond_core::keys::WorkerIdentity::from_secrets([7; 32], [9; 32]);
    let b64 = |key: [u8; 32]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, key);
    let body = serde_json::json!({
        "code": common::enroll_code(&admin, "fuzz", Some(&["gpu"]), None),
        "sealing_key": b64(identity.sealing_public()),
        "signing_key": b64(identity.signing_public()),
    });
    let mut request = ureq::post(url);
    if let Some(orchestrator) = orchestrator {
        request = request.set("Authorization", &format!("Bearer {orchestrator}"));
    }
    request.send_json(body).unwrap().into_json().unwrap()
}

/// A pooled stage submitted and claimed for `worker`: its job id.
fn held_job(server: &Server, orchestrator: &str, worker: &str) -> String {
    let stages = serde_json::json!({"stages": [{"key": "p", "executor": {"kind": "noop", "placement": "pool", "tags": ["gpu"]}}]});
    server.admin().submit(&common::run_json(stages), None).unwrap();
    let claimed: serde_json::Value = ureq::post(&format!("{}/v1/orch/claim", server.url))
        .set("Authorization", &format!("Bearer {orchestrator}"))
        .send_json(serde_json::json!({"workers": [worker], "wait_ms": 10000}))
        .unwrap()
        .into_json()
        .unwrap();
    claimed["jobs"][0]["job_id"].as_str().unwrap_or_else(|| panic!("no job claimed: {claimed}")).to_string()
}

#[test]
fn schemathesis_finds_no_failure_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    fuzz(&[], dir.path());
}

#[test]
fn schemathesis_finds_no_failure_on_postgresql() {
    let Some(pg) = Server::database_server() else { return };
    let db = common::scratch_database(&pg, "openapi");
    let dir = tempfile::tempdir().unwrap();
    fuzz(&["--database-url", db.url.as_str()], dir.path());
}

/// A client generated from docs/openapi.json (openapi-python-client, into a temporary
/// directory) drives a run and a confidential run, whose output it opens with PyNaCl.
#[test]
fn a_client_generated_from_the_document_runs_and_reads_a_confidential_run() {
    let Some(python) = std::env::var("POND_TEST_PYTHON").ok().filter(|p| !p.is_empty()) else {
        pond_store::missing_prerequisite(
            "POND_TEST_PYTHON is not set (a python with openapi-python-client and PyNaCl; .ci/run sets it)",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let generator = Path::new(&python).with_file_name("openapi-python-client");
    let out = Command::new(&generator)
        .args(["generate", "--meta", "none", "--path"])
        .arg(checked_in("openapi.json"))
        .arg("--output-path")
        .arg(dir.path().join("pond_client"))
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", generator.display()));
    assert!(out.status.success(), "generating the client: {}", String::from_utf8_lossy(&out.stderr));

    let server = Server::start(&dir.path().join("server"), &[]);
    let consumer = server.admin().create_key(&["acme".to_string()], Some("generated")).unwrap().token.unwrap();
    let secret = hex::encode(pond_exec::load_or_create_key(&dir.path().join("consumer.x25519")).unwrap());
    let out = Command::new(&python)
        .arg(common::root().join("testdata/interop/generated_client.py"))
        .arg(dir.path())
        .args([server.url.as_str(), &consumer, "acme", &secret])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected_plain = serde_json::json!({
        "state": "succeeded",
        "lines": ["hello from the generated client"],
        "artifacts": ["out.txt"],
        "artifact": "artifact ✓",
    });
    assert_eq!(got["plain"], expected_plain);
    let confidential = &got["confidential"];
    assert_eq!(confidential["state"], "succeeded", "{got}");
    assert_eq!(confidential["lines"], serde_json::json!(["hello from the generated client"]), "{got}");
    assert_eq!(confidential["artifact"], "artifact ✓", "{got}");
    assert_eq!(confidential["sealed_on_the_wire"], true, "pond served a confidential run's output in clear: {got}");
}

/// Found by Schemathesis: a `Last-Event-ID` that is not an event id was read as "from the
/// start" (the whole log again) and an unknown `follow` as "no"; both are refused naming them.
#[test]
fn a_log_resume_or_follow_flag_that_means_nothing_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let stages = serde_json::json!({"stages": [{"key": "a", "executor": {"kind": "noop"}}]});
    let run = server.admin().submit(&common::run_json(stages), None).unwrap();
    let logs = format!("{}/v1/runs/{}/logs", server.url, run.id);
    let auth = format!("Bearer {}", server.token);
    let refused = |request: ureq::Request| match request.set("Authorization", &auth).call() {
        Err(ureq::Error::Status(status, answer)) => (status, answer.into_json::<serde_json::Value>().unwrap()),
        other => panic!("expected a refusal, got {other:?}"),
    };
    let (status, body) = refused(ureq::get(&format!("{logs}?follow=1")).set("Last-Event-ID", "/,"));
    assert_eq!((status, body["error"]["field"].as_str()), (422, Some("Last-Event-ID")), "{body}");
    let (status, body) = refused(ureq::get(&format!("{logs}?follow=maybe")));
    assert_eq!((status, body["error"]["field"].as_str()), (422, Some("query.follow")), "{body}");
    // What a browser's EventSource sends on reconnecting, and the page forms, still work.
    common::wait_done(&server.admin(), &run.id.to_string(), std::time::Duration::from_secs(30));
    for query in ["follow=1", "follow=", "follow=0", "follow=false"] {
        let answer = ureq::get(&format!("{logs}?{query}")).set("Authorization", &auth).set("Last-Event-ID", "1").call();
        assert_eq!(answer.map(|a| a.status()).unwrap_or(0), 200, "{query}");
    }
}

/// The routes an orchestrator serves its workers, fuzzed with an enrolled worker's credential
/// (its answers relayed from pond included). Not the claim long poll (every call waits out its
/// `wait_ms`) nor enrollment (each call would need a fresh code).
#[test]
fn schemathesis_finds_no_failure_in_the_orchestrator_s_worker_routes() {
    let Some(python) = std::env::var("POND_TEST_PYTHON").ok().filter(|p| !p.is_empty()) else {
        pond_store::missing_prerequisite("POND_TEST_PYTHON is not set (a python with schemathesis; .ci/run sets it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = fuzz_server(dir.path(), &[]);
    let code = common::enroll_code(&server.admin(), "fuzz", None, None);
    let orchestrator = common::Orchestrator::start(&server.url, &dir.path().join("orch"), "127.0.0.1:0", Some(&code));
    let worker = enroll_worker(&server, &format!("{}/v1/worker/enroll", orchestrator.url), None);
    let filters = ["--exclude-path", "/v1/worker/claim", "--exclude-path", "/v1/worker/enroll"];
    let filters = [&filters[..], &["--phases", "examples,coverage,fuzzing"]].concat();
    schemathesis_at(&python, &orchestrator.url, worker["token"].as_str().unwrap(), &filters, "");
}

/// The headers the document gives pond's 401 (and 503) reach a worker through its orchestrator:
/// a worker revoked while the orchestrator still trusts its credential is refused by pond, and
/// the refusal arrives whole.
#[test]
fn a_refusal_relayed_by_the_orchestrator_keeps_its_documented_headers() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &[]);
    let code = common::enroll_code(&server.admin(), "fuzz", None, None);
    let orchestrator = common::Orchestrator::start(&server.url, &dir.path().join("orch"), "127.0.0.1:0", Some(&code));
    let worker = enroll_worker(&server, &format!("{}/v1/worker/enroll", orchestrator.url), None);
    let token = format!("Bearer {}", worker["token"].as_str().unwrap());
    // The orchestrator learns the credential, then pond revokes its worker.
    ureq::get(&format!("{}/v1/worker/me", orchestrator.url)).set("Authorization", &token).call().unwrap();
    let id = worker["member"]["id"].as_str().unwrap();
    ureq::post(&format!("{}/v1/admin/pools/members/{id}/revoke", server.url))
        .set("Authorization", &format!("Bearer {}", server.token))
        .call()
        .unwrap();
    let job = format!("{}.a.1", pond_core::ids::RunId::generate(pond_core::time::Timestamp::from_millis(0)));
    let heartbeat = format!("{}/v1/worker/jobs/{job}/heartbeat", orchestrator.url);
    match ureq::post(&heartbeat).set("Authorization", &token).call() {
        Err(ureq::Error::Status(401, answer)) => {
            assert_eq!(answer.header("www-authenticate"), Some("Bearer"));
            let body: serde_json::Value = answer.into_json().unwrap();
            assert_eq!(body["error"]["code"], "unauthorized", "{body}");
        }
        other => panic!("expected pond's 401 relayed, got {other:?}"),
    }
}
