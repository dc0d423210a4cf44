//! Nothing lost, nothing unbounded: what every request crosses at the HTTP boundary of a real
//! `pond server` and `pond orchestrator` — body limits before authentication (and memory that
//! stays small), JSON for every error, NUL refused alike on SQLite and PostgreSQL, idempotency
//! conflicts, the orchestrator passing pond's answers through, and log follows of revoked keys.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Peak resident memory of a process, in KiB (`VmHWM`).
fn peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc/<pid>/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn host(url: &str) -> &str {
    url.trim_start_matches("http://")
}

/// Sends a request over a plain socket: `head` (request line and headers, without the blank
/// line), then `len` bytes of body in 1 MiB pieces — as `Content-Length` or, with `chunked`,
/// as chunked transfer coding — stopping early if the peer stops taking it, then reads the
/// answer. Returns its status and body.
fn send(addr: &str, head: &str, len: usize, chunked: bool) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let framing = if chunked { "Transfer-Encoding: chunked".to_string() } else { format!("Content-Length: {len}") };
    write!(stream, "{head}\r\nHost: {addr}\r\nConnection: close\r\n{framing}\r\n\r\n").unwrap();
    let piece = vec![b'a'; 1024 * 1024];
    let mut sent = 0;
    while sent < len {
        let n = piece.len().min(len - sent);
        let ok = if chunked {
            write!(stream, "{n:x}\r\n")
                .and_then(|_| stream.write_all(&piece[..n]))
                .and_then(|_| stream.write_all(b"\r\n"))
        } else {
            stream.write_all(&piece[..n])
        };
        if ok.is_err() {
            break;
        }
        sent += n;
    }
    if chunked && sent == len {
        let _ = stream.write_all(b"0\r\n\r\n");
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        panic!("no answer to {head} after {sent} of {len} bytes: {text:?}");
    });
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// The error body's code, asserting the `{"error":{"code","message"}}` shape.
fn error_code(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"));
    assert!(v["error"]["message"].is_string(), "{body}");
    v["error"]["code"].as_str().unwrap_or_else(|| panic!("no error code: {body}")).to_string()
}

/// A request with an optional bearer token and JSON body; any status is returned, not raised.
fn call(method: &str, url: &str, token: Option<&str>, body: Option<&str>) -> (u16, String) {
    let mut req = ureq::request(method, url);
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let result = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    };
    match result {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap_or_default()),
        Err(e) => panic!("{method} {url}: {e}"),
    }
}

const BIG: usize = 256 * 1024 * 1024;
/// What the processes may grow by while bodies of `BIG` bytes go by.
const GROWTH_KIB: u64 = 48 * 1024;
const MAX_PEAK_KIB: u64 = 100 * 1000;

#[test]
fn oversized_and_unauthenticated_bodies_are_refused_before_they_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &[]);
    let code = enroll_code(&server.admin(), "p", None, None);
    let orch = Orchestrator::start(&server.url, &dir.path().join("orch"), "127.0.0.1:0", Some(&code));
    let (pond, orchestrator) = (server.child.id(), orch.child.id());
    let before = (peak_kib(pond), peak_kib(orchestrator));

    // Pond: a declared 256 MiB on a JSON route is a 413 before the credential is looked at.
    let (status, body) =
        send(host(&server.url), "POST /v1/runs HTTP/1.1\r\nContent-Type: application/json", BIG, false);
    assert_eq!((status, error_code(&body).as_str()), (413, "payload_too_large"), "{body}");
    assert!(body.contains("4194304 bytes"), "the limit is named: {body}");
    // Within the limit but without a credential: 401, and the body is never read.
    let (status, body) = send(
        host(&server.url),
        "POST /v1/bundles?project=p HTTP/1.1\r\nContent-Type: application/zstd",
        50 << 20,
        false,
    );
    assert_eq!((status, error_code(&body).as_str()), (401, "unauthorized"), "{body}");
    // Undeclared length: no credential, no read; with one, the read stops at the limit.
    let (status, body) = send(host(&server.url), "POST /v1/admin/keys HTTP/1.1", BIG, true);
    assert_eq!((status, error_code(&body).as_str()), (401, "unauthorized"), "{body}");
    let head = format!(
        "POST /v1/admin/keys HTTP/1.1\r\nAuthorization: Bearer {}\r\nContent-Type: application/json",
        server.token
    );
    let (status, body) = send(host(&server.url), &head, BIG, true);
    assert_eq!((status, error_code(&body).as_str()), (413, "payload_too_large"), "{body}");
    assert!(body.contains("1048576 bytes"), "{body}");

    // The orchestrator: the same, on its small routes and its artifact route.
    let (status, body) = send(host(&orch.url), "POST /v1/worker/claim HTTP/1.1", BIG, false);
    assert_eq!((status, error_code(&body).as_str()), (413, "payload_too_large"), "{body}");
    let artifact = "PUT /v1/worker/jobs/00000000-0000-7000-8000-000000000000.a.1/artifacts/out.bin HTTP/1.1";
    let (status, body) = send(host(&orch.url), artifact, BIG, false);
    assert_eq!((status, error_code(&body).as_str()), (401, "unauthorized"), "{body}");
    let (status, body) = send(host(&orch.url), artifact, BIG, true);
    assert_eq!((status, error_code(&body).as_str()), (401, "unauthorized"), "{body}");
    let (status, body) = send(host(&orch.url), "POST /v1/worker/enroll HTTP/1.1", BIG, true);
    assert_eq!((status, error_code(&body).as_str()), (413, "payload_too_large"), "{body}");

    let after = (peak_kib(pond), peak_kib(orchestrator));
    for (what, before, after) in [("pond", before.0, after.0), ("orchestrator", before.1, after.1)] {
        eprintln!("{what}: peak resident memory {before} KiB before, {after} KiB after");
        assert!(after - before < GROWTH_KIB, "{what} grew from {before} KiB to {after} KiB");
        assert!(after < MAX_PEAK_KIB, "{what} peaked at {after} KiB");
    }
}

#[test]
fn every_error_answer_is_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &[]);
    let code = enroll_code(&server.admin(), "p", None, None);
    let orch = Orchestrator::start(&server.url, &dir.path().join("orch"), "127.0.0.1:0", Some(&code));
    let token = Some(server.token.as_str());
    let s = |path: &str| format!("{}{path}", server.url);
    let o = |path: &str| format!("{}{path}", orch.url);
    let cases: Vec<(&str, String, Option<&str>, Option<&str>, u16, &str)> = vec![
        ("GET", s("/nope"), None, None, 404, "not_found"),
        ("GET", s("/v1/nope"), token, None, 404, "not_found"),
        ("POST", s("/v1/runs/x/artifacts"), token, Some("{}"), 405, "method_not_allowed"),
        ("PATCH", s("/healthz"), None, None, 405, "method_not_allowed"),
        ("GET", s("/v1/runs"), Some("wrong"), None, 401, "unauthorized"),
        ("POST", s("/v1/admin/keys"), token, Some("{"), 400, "bad_request"),
        ("POST", s("/v1/admin/keys"), token, Some(r#"{"projects":"p"}"#), 422, "validation_failed"),
        ("GET", s("/v1/runs?limit=x"), token, None, 422, "validation_failed"),
        ("GET", s("/v1/runs?colour=red"), token, None, 422, "validation_failed"),
        ("GET", s("/v1/runs/%FF"), token, None, 400, "bad_request"),
        ("GET", o("/nope"), None, None, 404, "not_found"),
        ("DELETE", o("/v1/worker/claim"), None, None, 405, "method_not_allowed"),
        ("GET", o("/v1/worker/me"), None, None, 401, "unauthorized"),
        ("POST", o("/v1/worker/enroll"), None, Some("{"), 400, "bad_request"),
    ];
    for (method, url, token, body, status, code) in cases {
        let (got, answer) = call(method, &url, token, body);
        assert_eq!((got, error_code(&answer).as_str()), (status, code), "{method} {url}: {answer}");
    }
    // 415 for a body that is not JSON.
    let answer = ureq::post(&s("/v1/admin/keys"))
        .set("Authorization", &format!("Bearer {}", server.token))
        .set("Content-Type", "text/plain")
        .send_string("{}");
    match answer {
        Err(ureq::Error::Status(415, r)) => assert_eq!(error_code(&r.into_string().unwrap()), "unsupported_media_type"),
        other => panic!("expected a JSON 415, got {other:?}"),
    }

    // An error never repeats a large input: a 2 MB unknown field name costs a short answer.
    let name = "x".repeat(2_000_000);
    let body = format!(r#"{{"definition":{{"stages":[]}},"project_id":"p","{name}":1}}"#);
    let (status, answer) = call("POST", &s("/v1/runs"), token, Some(&body));
    assert_eq!(status, 422, "{}", &answer[..answer.len().min(300)]);
    assert!(answer.len() < 4096, "a {}-byte answer to a {}-byte request", answer.len(), body.len());
    let value = format!(r#"{{"stages":[{{"key":"a","executor":{{"kind":"{name}"}}}}]}}"#);
    let body = format!(r#"{{"project_id":"p","definition":{value}}}"#);
    let (status, answer) = call("POST", &s("/v1/runs"), token, Some(&body));
    assert_eq!(status, 422);
    assert!(answer.len() < 4096, "a {}-byte answer", answer.len());
    assert!(answer.contains(&format!("{}…", "x".repeat(100))), "the input is shown clipped: {answer}");
}

/// Each route and field a NUL once made PostgreSQL answer 500 (and more): all answer 422
/// naming the field, on either store.
fn nul_is_refused_naming_the_field(server: &Server) {
    let token = Some(server.token.as_str());
    let u = |path: &str| format!("{}{path}", server.url);
    let run = |def: Value| json!({"project_id": "p", "definition": def}).to_string();
    let cases: Vec<(&str, String, Option<&str>, Option<String>, &str)> = vec![
        ("POST", u("/v1/admin/keys"), token, Some(r#"{"name":"a\u0000b","projects":["p"]}"#.into()), "name"),
        ("POST", u("/v1/admin/keys"), token, Some(r#"{"projects":["p\u0000"]}"#.into()), "projects[0]"),
        ("DELETE", u("/v1/admin/keys/%00"), token, None, "path.id"),
        ("DELETE", u("/v1/admin/models/%00"), token, None, "path.key"),
        ("DELETE", u("/v1/admin/harnesses/a%00b"), token, None, "path.key"),
        ("DELETE", u("/v1/admin/credentials/%00"), token, None, "path.name"),
        ("POST", u("/v1/admin/harnesses/x%00/dry-run"), token, Some("{}".into()), "path.key"),
        (
            "POST",
            u("/v1/admin/models"),
            token,
            Some(
                r#"{"key":"m\u0000","provider":"openai","model_id":"x","credential_name":"c","capability":"c"}"#.into(),
            ),
            "key",
        ),
        (
            "POST",
            u("/v1/admin/credentials"),
            token,
            Some(r#"{"name":"c","provider":"openai","value":"s\u0000","projects":["p"]}"#.into()),
            "value",
        ),
        (
            "POST",
            u("/v1/admin/harnesses/from-preset"),
            token,
            Some(r#"{"preset":"codex","key":"k\u0000"}"#.into()),
            "key",
        ),
        ("POST", u("/v1/admin/enroll"), token, Some(r#"{"pool":"p\u0000"}"#.into()), "pool"),
        ("POST", u("/v1/admin/pools/workers/w%00/drain"), token, None, "path.id"),
        ("POST", u("/v1/orch/enroll"), None, Some(r#"{"code":"\u0000"}"#.into()), "code"),
        (
            "POST",
            u("/v1/runs"),
            token,
            Some(r#"{"project_id":"p\u0000","definition":{"stages":[]}}"#.into()),
            "project_id",
        ),
        (
            "POST",
            u("/v1/runs"),
            token,
            Some(run(json!({"stages":[{"key":"a\u{0}","executor":{"kind":"noop"}}]}))),
            "definition.stages[0].key",
        ),
        (
            "POST",
            u("/v1/runs"),
            token,
            Some(run(json!({"stages":[{"key":"a","executor":{"kind":"shell","argv":["echo"],"env":{"A\u{0}":"1"}}}]}))),
            "definition.stages[0].executor.env.A\\0",
        ),
        ("POST", u("/v1/runs/cancel"), token, Some(r#"{"project":"p\u0000"}"#.into()), "project"),
        ("GET", u("/v1/runs?project=p%00"), token, None, "query.project"),
        ("GET", u("/v1/runs/%00"), token, None, "path.id"),
        ("GET", u("/v1/runs/x/artifacts/a%00"), token, None, "path.name"),
        ("POST", u("/v1/bundles?project=%00"), token, None, "query.project"),
    ];
    for (method, url, token, body, field) in cases {
        let (status, answer) = call(method, &url, token, body.as_deref());
        assert_eq!(status, 422, "{method} {url}: {answer}");
        let v: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(v["error"]["field"], field, "{method} {url}: {answer}");
        assert!(v["error"]["reason"].as_str().unwrap().contains("NUL"), "{answer}");
    }
}

#[test]
fn nul_in_any_text_is_a_422_on_sqlite_and_on_postgresql() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Server::start(&dir.path().join("sqlite"), &[]);
    nul_is_refused_naming_the_field(&sqlite);
    let Some(pg) = Server::database_server() else { return };
    let db = scratch_database(&pg, "nul");
    let postgres = Server::start(&dir.path().join("pg"), &["--database-url", &db.url]);
    nul_is_refused_naming_the_field(&postgres);
}

#[test]
fn an_idempotency_key_reused_for_another_request_is_a_422() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let admin = server.admin();
    let first = run_json(json!({"stages":[{"key":"a","executor":{"kind":"noop"}}]}));
    let other = run_json(json!({"stages":[{"key":"b","executor":{"kind":"noop"}}]}));
    let made = admin.submit(&first, Some("order-7")).unwrap();
    // The same request again (keys in another order, too) is a retry: the first run, 200.
    let reordered: Value = serde_json::from_str(&format!(
        r#"{{"definition":{},"project_id":"acme"}}"#,
        serde_json::to_string(&first["definition"]).unwrap()
    ))
    .unwrap();
    for body in [&first, &reordered] {
        let req = ureq::post(&format!("{}/v1/runs", server.url))
            .set("Authorization", &format!("Bearer {}", server.token))
            .set("Idempotency-Key", "order-7");
        let answer = req.send_json(body.clone()).unwrap();
        assert_eq!(answer.status(), 200);
        let run: Value = answer.into_json().unwrap();
        assert_eq!(run["id"], made.id.to_string());
    }
    match admin.submit(&other, Some("order-7")).unwrap_err() {
        pond_http::client::ClientError::Api { status, body } => {
            assert_eq!(status, 422);
            assert_eq!(body.error.field.as_deref(), Some("Idempotency-Key"));
            assert!(body.error.message.contains("different request"), "{}", body.error.message);
            assert!(body.error.message.contains(&made.id.to_string()), "names the first run: {}", body.error.message);
        }
        other => panic!("expected a 422, got {other}"),
    }
    let runs = admin.list_runs(Some("acme"), None, None, None).unwrap().runs;
    assert_eq!(runs.len(), 1, "the conflicting request made no run");
}

/// Pond's answers to relayed job calls, early ones included (pond answers before reading a
/// body it will not take), reach the worker unchanged — never a 503 for a pond that answered.
#[test]
fn the_orchestrator_passes_ponds_answers_through() {
    use pond_http::pool_client::{enroll_request, HttpWorkerClient};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &["--max-bundle-bytes", "1048576"]);
    let admin = server.admin();
    let code = enroll_code(&admin, "p", None, None);
    let mut orch = Orchestrator::start(&server.url, &dir.path().join("orch"), "127.0.0.1:0", Some(&code));
    let worker_code = enroll_code(&admin, "p", Some(&["pool:p"]), None);
    let identity = pond_core::keys::WorkerIdentity::from_secrets([7; 32], [57; 32]);
    let worker =
        HttpWorkerClient::enroll(&orch.url, &enroll_request(&worker_code, "w", &identity, None, vec![])).unwrap();
    // A job this worker does not hold.
    let job = format!("{}.a.1", pond_core::ids::RunId::generate(pond_core::time::Timestamp::from_millis(0)));
    let token = format!("Bearer {}", worker.token);

    // 20 MiB over pond's artifact limit: pond's 413, not a 503 for a reset connection.
    let head = format!("PUT /v1/worker/jobs/{job}/artifacts/big.bin HTTP/1.1\r\nAuthorization: {token}");
    let (status, body) = send(host(&orch.url), &head, 20 << 20, false);
    assert_eq!((status, error_code(&body).as_str()), (413, "payload_too_large"), "{body}");
    assert!(body.contains("bytes, this route's limit"), "pond's own answer: {body}");
    // Within the limit, for a job it does not hold: pond's 409.
    let (status, body) = send(host(&orch.url), &head, 1_000_000, false);
    assert_eq!((status, error_code(&body).as_str()), (409, "conflict"), "{body}");
    assert!(body.contains("lease lost"), "{body}");
    // A 20 MiB log batch for that job: pond answers 409 before reading it.
    let line = "x".repeat(16 * 1024);
    let lines: Vec<Value> = (0..1200).map(|_| json!({"stream": "stdout", "text": line})).collect();
    let batch = json!({ "lines": lines }).to_string();
    let (status, body) = call_raw(&format!("{}/v1/worker/jobs/{job}/logs", orch.url), &worker.token, batch.as_bytes());
    assert_eq!((status, error_code(&body).as_str()), (409, "conflict"), "{body}");
    // A validation error of pond's passes through as is.
    let (status, body) =
        call("POST", &format!("{}/v1/worker/jobs/{job}/result", orch.url), Some(&worker.token), Some("{}"));
    assert_eq!((status, error_code(&body).as_str()), (422, "validation_failed"), "{body}");

    // Pond's answer about a worker credential: only its 401/404 is "unknown credential";
    // anything else (its database away) is passed on, and the credential is not forgotten.
    let mode = Arc::new(AtomicU16::new(503));
    let fake = fake_pond(mode.clone());
    orch.kill9();
    let path = orch.state_dir.join("orchestrator.json");
    let mut saved: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    saved["server"] = fake.clone().into();
    std::fs::write(&path, serde_json::to_vec(&saved).unwrap()).unwrap();
    orch.restart();
    let me = format!("{}/v1/worker/me", orch.url);
    let (status, body) = call("GET", &me, Some(&worker.token), None);
    assert_eq!((status, error_code(&body).as_str()), (503, "unavailable"), "{body}");
    assert!(body.contains("fake pond: the database is unavailable"), "pond's body, unchanged: {body}");
    mode.store(401, Ordering::SeqCst);
    let (status, body) = call("GET", &me, Some(&worker.token), None);
    assert_eq!((status, error_code(&body).as_str()), (401, "unauthorized"), "{body}");
}

fn call_raw(url: &str, token: &str, body: &[u8]) -> (u16, String) {
    let req = ureq::post(url).set("Authorization", &format!("Bearer {token}")).set("Content-Type", "application/json");
    match req.send_bytes(body) {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap_or_default()),
        Err(e) => panic!("POST {url}: {e}"),
    }
}

/// A stand-in for pond that answers every request with the status in `mode` and an error body.
fn fake_pond(mode: Arc<AtomicU16>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let mode = mode.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut length = 0usize;
                let mut line = String::new();
                while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) && line != "\r\n" {
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    line.clear();
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                let status = mode.load(Ordering::SeqCst);
                let (reason, code) = if status == 401 {
                    ("Unauthorized", "unauthorized")
                } else {
                    ("Service Unavailable", "unavailable")
                };
                let answer =
                    json!({"error": {"code": code, "message": "fake pond: the database is unavailable"}}).to_string();
                let mut stream = stream;
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                    answer.len()
                );
            });
        }
    });
    url
}

/// Follows a run's log as `token`; returns a receiver of the stream's lines that disconnects
/// when the stream ends.
fn follow(url: &str, run: &str, token: &str) -> std::sync::mpsc::Receiver<String> {
    let answer = ureq::get(&format!("{url}/v1/runs/{run}/logs?follow=1"))
        .set("Authorization", &format!("Bearer {token}"))
        .timeout(Duration::from_secs(120))
        .call()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(answer.into_reader()).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits for the stream behind `lines` to end; returns how long that took and what it said.
fn ended_within(lines: &std::sync::mpsc::Receiver<String>, limit: Duration) -> (Duration, Vec<String>) {
    let start = Instant::now();
    let mut seen = Vec::new();
    loop {
        let left = limit.saturating_sub(start.elapsed());
        match lines.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return (start.elapsed(), seen),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("the stream is still open after {limit:?}: {seen:?}")
            }
        }
    }
}

#[test]
fn a_revoked_keys_log_follow_ends_within_5_s() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("a"), &[]);
    let admin = server.admin();
    let key = admin.create_key(&["acme".into()], Some("follower")).unwrap();
    let long = run_json(json!({"stages":[{"key":"s","executor":{"kind":"noop","delay":"120s"}}]}));
    let run = admin.submit(&long, None).unwrap().id.to_string();
    let lines = follow(&server.url, &run, key.token.as_deref().unwrap());
    std::thread::sleep(Duration::from_millis(1500));
    admin.revoke_key(&key.id.to_string()).unwrap();
    let (took, said) = ended_within(&lines, Duration::from_secs(5));
    eprintln!("the follow ended {took:?} after the revocation");
    assert!(said.iter().any(|l| l.contains("the token was revoked")), "{took:?}: {said:?}");

    // On PostgreSQL, revoked through another node: its token cache does not keep the stream open.
    let Some(pg) = Server::database_server() else { return };
    let db = scratch_database(&pg, "revoke");
    let a = Server::start(&dir.path().join("pg-a"), &["--database-url", &db.url]);
    let b = Server::start(&dir.path().join("pg-b"), &["--database-url", &db.url]);
    let token = [&a.token, &b.token].into_iter().find(|t| !t.is_empty()).unwrap().clone();
    let key = a.client(&token).create_key(&["acme".into()], None).unwrap();
    let run = a.client(&token).submit(&long, None).unwrap().id.to_string();
    let lines = follow(&b.url, &run, key.token.as_deref().unwrap());
    std::thread::sleep(Duration::from_millis(500));
    a.client(&token).revoke_key(&key.id.to_string()).unwrap();
    let (took, said) = ended_within(&lines, Duration::from_secs(5));
    eprintln!("the follow ended {took:?} after the revocation");
    assert!(said.iter().any(|l| l.contains("the token was revoked")), "{took:?}: {said:?}");
}
