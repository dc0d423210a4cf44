//! Real agent CLIs (pinned `@openai/codex`, `@anthropic-ai/claude-code` from npm) run as
//! `swarm` stages through a real `pond server`, against fake model APIs written here that speak
//! the providers' streaming protocols. The broker holds the real key; the agent never sees it.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Router;
use common::{log_text, wait_done, Server};
use serde_json::{json, Value};

const REAL_KEY: &str = "sk-real-upstream-5150";

/// Where `.ci/run` installed the CLIs (`node_modules/.bin` inside), or `None` after saying why
/// the test is skipped.
fn agents_bin() -> Option<PathBuf> {
    match std::env::var("POND_TEST_AGENTS_DIR") {
        Ok(dir) if !dir.is_empty() => Some(PathBuf::from(dir).join("node_modules/.bin")),
        _ => {
            pond_store::missing_prerequisite(
                "POND_TEST_AGENTS_DIR is not set (the pinned agent CLIs; .ci/run installs them)",
            );
            None
        }
    }
}

type Seen = Arc<Mutex<Vec<(HeaderMap, Value)>>>;

fn sse(events: Vec<(&str, Value)>) -> Response {
    let mut body = String::new();
    for (name, data) in events {
        body.push_str(&format!("event: {name}\ndata: {data}\n\n"));
    }
    Response::builder().header("content-type", "text/event-stream").body(Body::from(body)).unwrap()
}

/// A fake OpenAI Responses API: every request is answered with one assistant message holding a
/// result block, then `response.completed` with usage.
async fn fake_openai(seen: Seen) -> String {
    async fn handler(State(seen): State<Seen>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        seen.lock().unwrap().push((headers, request));
        let text =
            "Reviewed the repository.\n```result\n{\"finding\": \"no tests for parser\", \"severity\": \"low\"}\n```";
        sse(vec![
            ("response.created", json!({"type": "response.created", "response": {"id": "resp_1"}})),
            (
                "response.output_item.done",
                json!({"type": "response.output_item.done", "output_index": 0, "item": {
                "type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}}),
            ),
            (
                "response.completed",
                json!({"type": "response.completed", "response": {"id": "resp_1",
                "usage": {"input_tokens": 1200, "output_tokens": 80, "total_tokens": 1280,
                    "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}}}),
            ),
        ])
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, Router::new().fallback(handler).with_state(seen)).await });
    format!("http://{addr}")
}

/// A fake Anthropic Messages API: a streamed text answer with a result block (and the plain
/// JSON form, for a client that asks without streaming).
async fn fake_anthropic(seen: Seen) -> String {
    async fn handler(State(seen): State<Seen>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let stream = request["stream"].as_bool().unwrap_or(false);
        seen.lock().unwrap().push((headers, request));
        let text = "Done.\n```result\n{\"finding\": \"docs are stale\"}\n```";
        if !stream {
            let body = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
                "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 900, "output_tokens": 40}});
            return Response::builder()
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap();
        }
        sse(vec![
            (
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_1", "type": "message",
                "role": "assistant", "model": "claude-test", "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 900, "output_tokens": 1}}}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": text}}),
            ),
            ("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
            (
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                "usage": {"output_tokens": 40}}),
            ),
            ("message_stop", json!({"type": "message_stop"})),
        ])
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, Router::new().fallback(handler).with_state(seen)).await });
    format!("http://{addr}")
}

/// A server with a credential, a model and the `preset` harness (its CLI from `bin`) whose
/// model API is `upstream`: codex → model `fast` (OpenAI, priced), claude → model `smart`.
fn serve_agent(bin: &std::path::Path, preset: &str, upstream: &str) -> (tempfile::TempDir, Server) {
    serve_agent_with(bin, preset, upstream, &[])
}

fn serve_agent_with(
    bin: &std::path::Path,
    preset: &str,
    upstream: &str,
    extra: &[&str],
) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--model-origin", upstream];
    args.extend_from_slice(extra);
    let server = Server::start(&dir.path().join("server"), &args);
    let (provider, key, model_id) =
        if preset == "codex" { ("openai", "fast", "gpt-5.5") } else { ("anthropic", "smart", "claude-test") };
    admin(
        &server,
        "POST",
        "/v1/admin/credentials",
        json!({"name": provider, "provider": provider, "value": REAL_KEY, "projects": ["acme"]}),
    );
    admin(
        &server,
        "POST",
        "/v1/admin/models",
        json!({"key": key, "provider": provider, "model_id": model_id,
        "credential_name": provider, "capability": format!("harness.{preset}"), "base_url": upstream,
        "input_usd_per_mtok": 1.25, "output_usd_per_mtok": 10.0}),
    );
    let mut harness = pond_core::agents::presets().into_iter().find(|h| h.key == preset).unwrap();
    harness.command_template[0] = bin.join(preset).display().to_string();
    admin(&server, "POST", "/v1/admin/harnesses", serde_json::to_value(&harness).unwrap());
    (dir, server)
}

/// An orchestrator and one worker offering `capability`, for `server`.
fn start_pool(server: &Server, dir: &std::path::Path, capability: &str) -> (common::Orchestrator, common::Worker) {
    start_pool_with(server, dir, capability, &[])
}

fn start_pool_with(
    server: &Server,
    dir: &std::path::Path,
    capability: &str,
    flags: &[&str],
) -> (common::Orchestrator, common::Worker) {
    let code = common::enroll_code(&server.admin(), "agents", None, None);
    let orch = common::Orchestrator::start(&server.url, &dir.join("orch"), "127.0.0.1:0", Some(&code));
    let code = common::enroll_code(&server.admin(), "agents", Some(&[]), None);
    let mut args = vec!["--capabilities", capability];
    args.extend_from_slice(flags);
    let worker = common::Worker::start(&orch.url, &dir.join("worker"), &code, &args);
    (orch, worker)
}

fn admin(server: &Server, method: &str, path: &str, body: Value) -> Value {
    let req = ureq::request(method, &format!("{}{path}", server.url))
        .set("Authorization", &format!("Bearer {}", server.token));
    match req.send_json(body) {
        Ok(r) => r.into_json().unwrap(),
        Err(ureq::Error::Status(code, r)) => panic!("{method} {path}: {code} {}", r.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn codex_answers_with_a_result_block_through_the_broker() {
    let Some(bin) = agents_bin() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seen: Seen = Arc::default();
    let upstream = rt.block_on(fake_openai(seen.clone()));
    let (_dir, server) = serve_agent(&bin, "codex", &upstream);

    let run = server
        .admin()
        .submit(
            &json!({"project_id": "acme", "definition": {"stages": [{"key": "review", "timeout": "2m",
            "executor": {"kind": "swarm", "placement": "local", "harness": "codex", "model_ref": "fast",
                "prompt": "--help is not what I ask: review this repository; answer with a result block."}}]}}),
            None,
        )
        .unwrap();
    let id = run.id.to_string();
    let done = wait_done(&server.admin(), &id, Duration::from_secs(120));
    let logs = log_text(&server.admin(), &id);
    assert_eq!(done.state.as_str(), "succeeded", "{logs:#?}");

    let mut results = Vec::new();
    server.admin().download_artifact(&id, &format!("results-{}.jsonl", done.stages[0].key), &mut results).unwrap();
    let results = String::from_utf8(results).unwrap();
    assert_eq!(results.trim(), r#"{"finding":"no tests for parser","severity":"low"}"#);
    assert!(
        logs.iter().any(|l| l.contains("usage: 1 request(s), 1200 input and 80 output tokens, $0.002300")),
        "{logs:#?}"
    );
    // The provider saw the real key; the agent only ever had the dummy one.
    let seen = seen.lock().unwrap();
    assert!(!seen.is_empty());
    // A prompt that starts with `-` reached the model as the prompt, not the CLI as a flag.
    assert!(seen.iter().any(|(_, r)| r.to_string().contains("--help is not what I ask")), "{seen:?}");
    for (headers, _) in seen.iter() {
        assert_eq!(headers.get("authorization").unwrap(), &format!("Bearer {REAL_KEY}"));
    }
    let mut transcript = Vec::new();
    server.admin().download_artifact(&id, "agent-review.log", &mut transcript).unwrap();
    assert!(!String::from_utf8_lossy(&transcript).contains(REAL_KEY));
}

#[test]
fn claude_answers_with_a_result_block_through_the_broker() {
    let Some(bin) = agents_bin() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seen: Seen = Arc::default();
    let upstream = rt.block_on(fake_anthropic(seen.clone()));
    let (dir, server) = serve_agent(&bin, "claude", &upstream);
    // On a pool worker: server + orchestrator + worker processes.
    let (_orch, worker) = start_pool(&server, dir.path(), "harness.claude");

    let run = server
        .admin()
        .submit(
            &json!({"project_id": "acme", "definition": {"stages": [{"key": "review", "timeout": "2m",
            "executor": {"kind": "swarm", "harness": "claude", "model_ref": "smart",
                "prompt": "-p is not a flag here: review the docs; answer with a result block."}}]}}),
            None,
        )
        .unwrap();
    let id = run.id.to_string();
    let done = wait_done(&server.admin(), &id, Duration::from_secs(120));
    let logs = log_text(&server.admin(), &id);
    assert_eq!(done.state.as_str(), "succeeded", "{logs:#?}");
    assert_eq!(done.stages[0].attempts.last().unwrap().owner, worker.id);
    assert_eq!(done.stages[0].attestation_verified, Some(true));
    assert!(logs.iter().any(|l| l.contains("usage: 1 request(s), 900 input and 40 output tokens")), "{logs:#?}");
    let mut results = Vec::new();
    server.admin().download_artifact(&id, &format!("results-{}.jsonl", done.stages[0].key), &mut results).unwrap();
    assert_eq!(String::from_utf8(results).unwrap().trim(), r#"{"finding":"docs are stale"}"#, "{logs:#?}");
    let seen = seen.lock().unwrap();
    let messages: Vec<_> = seen.iter().filter(|(_, r)| r.get("messages").is_some()).collect();
    assert!(!messages.is_empty(), "the CLI called the Messages API");
    assert!(messages.iter().any(|(_, r)| r.to_string().contains("-p is not a flag here")), "the prompt, as a prompt");
    for (headers, _) in seen.iter() {
        assert_eq!(headers.get("x-api-key").unwrap(), REAL_KEY);
    }
}

#[test]
fn codex_runs_on_a_pool_worker_with_the_key_only_in_the_worker_s_broker() {
    let Some(bin) = agents_bin() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seen: Seen = Arc::default();
    let upstream = rt.block_on(fake_openai(seen.clone()));
    let (dir, server) = serve_agent(&bin, "codex", &upstream);
    let code = common::enroll_code(&server.admin(), "agents", None, None);
    let orch = common::Orchestrator::start(&server.url, &dir.path().join("orch"), "127.0.0.1:0", Some(&code));
    // One worker without the harness, one with it: only the second may take the job.
    let bare = common::enroll_code(&server.admin(), "agents", Some(&[]), None);
    let _bare = common::Worker::start(&orch.url, &dir.path().join("bare"), &bare, &[]);
    let code = common::enroll_code(&server.admin(), "agents", Some(&[]), None);
    let worker =
        common::Worker::start(&orch.url, &dir.path().join("worker"), &code, &["--capabilities", "harness.codex"]);

    let run = server
        .admin()
        .submit(
            &json!({"project_id": "acme", "definition": {"stages": [{"key": "review", "timeout": "2m",
            "executor": {"kind": "swarm", "harness": "codex", "model_ref": "fast",
                "prompt": "--help is not what I ask: review this repository; answer with a result block."}}]}}),
            None,
        )
        .unwrap();
    let id = run.id.to_string();
    let done = wait_done(&server.admin(), &id, Duration::from_secs(120));
    let logs = log_text(&server.admin(), &id);
    assert_eq!(done.state.as_str(), "succeeded", "{logs:#?}");
    let stage = &done.stages[0];
    assert_eq!(stage.placement, "pool");
    assert_eq!(stage.attempts.last().unwrap().owner, worker.id, "the worker with the harness ran it");
    assert_eq!(stage.attestation_verified, Some(true), "{:?}", stage.attempts);
    let mut results = Vec::new();
    server.admin().download_artifact(&id, &format!("results-{}.jsonl", done.stages[0].key), &mut results).unwrap();
    assert_eq!(String::from_utf8(results).unwrap().trim(), r#"{"finding":"no tests for parser","severity":"low"}"#);
    for (headers, _) in seen.lock().unwrap().iter() {
        assert_eq!(headers.get("authorization").unwrap(), &format!("Bearer {REAL_KEY}"));
    }
    // The key reached the worker sealed: nothing the orchestrator keeps, no log line, holds it.
    let mut files = Vec::new();
    for entry in walk(&orch.state_dir) {
        files.push(entry);
    }
    for file in files {
        assert!(!std::fs::read(&file).unwrap_or_default().windows(REAL_KEY.len()).any(|w| w == REAL_KEY.as_bytes()));
    }
    assert!(!logs.iter().any(|l| l.contains(REAL_KEY)));
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// A fake model API that refuses every request with `status`.
async fn fake_refusing(status: u16) -> String {
    async fn handler(State(status): State<u16>, _body: axum::body::Bytes) -> Response {
        // (The body is read first, as a provider does: answering mid-upload breaks the pipe.)
        let body = json!({"error": {"message": "refused by the fake", "type": "invalid_request_error", "code": "invalid_api_key"}});
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, Router::new().fallback(handler).with_state(status)).await });
    format!("http://{addr}")
}

#[test]
fn a_model_api_that_refuses_the_key_fails_the_stage_and_says_why() {
    model_api_failure(401, "credential was refused");
}

#[test]
fn a_failing_model_api_fails_the_stage_and_says_why() {
    model_api_failure(500, "the provider failed");
}

fn model_api_failure(status: u16, hint: &str) {
    let Some(bin) = agents_bin() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let upstream = rt.block_on(fake_refusing(status));
    let (_dir, server) = serve_agent(&bin, "codex", &upstream);
    let run = server
        .admin()
        .submit(&json!({"project_id": "acme", "definition": {"stages": [{"key": "review", "timeout": "2m",
            "executor": {"kind": "swarm", "placement": "local", "harness": "codex", "model_ref": "fast", "prompt": "hi"}}]}}), None)
        .unwrap();
    let done = wait_done(&server.admin(), &run.id.to_string(), Duration::from_secs(120));
    assert_eq!(done.state.as_str(), "failed");
    let error = done.stages[0].error.clone().unwrap_or_default();
    let logs = log_text(&server.admin(), &run.id.to_string());
    assert!(error.contains(&format!("HTTP {status}")) && error.contains(hint), "{error} {logs:#?}");
}

/// A fake OpenAI Responses API for a tool turn: first it asks codex to run a shell command
/// that edits a file in the checkout; once the command's output comes back, it answers.
async fn fake_openai_tool(seen: Seen) -> String {
    async fn handler(State(seen): State<Seen>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let has_output = request.to_string().contains("function_call_output");
        seen.lock().unwrap().push((headers, request));
        let usage = json!({"input_tokens": 500, "output_tokens": 20, "total_tokens": 520,
            "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}});
        let item = if has_output {
            json!({"type": "message", "id": "msg_2", "role": "assistant", "status": "completed", "content": [{
                "type": "output_text", "annotations": [],
                "text": "Edited the notes.\n```result\n{\"edited\": \"notes.md\"}\n```"}]})
        } else {
            json!({"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "exec_command", "status": "completed",
                "arguments": json!({"cmd": "printf 'edited-by-%s\\n' agent > notes.md && cat notes.md"}).to_string()})
        };
        sse(vec![
            ("response.created", json!({"type": "response.created", "response": {"id": "resp_t"}})),
            (
                "response.output_item.done",
                json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
            ),
            ("response.completed", json!({"type": "response.completed", "response": {"id": "resp_t", "usage": usage}})),
        ])
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, Router::new().fallback(handler).with_state(seen)).await });
    format!("http://{addr}")
}

#[test]
fn codex_runs_a_shell_command_that_edits_the_checkout_then_answers() {
    tool_turn("codex", Where::ControlPlane);
}

#[test]
fn codex_runs_a_shell_command_on_a_pool_worker_then_answers() {
    tool_turn("codex", Where::Pool);
}

#[test]
fn codex_runs_a_shell_command_inside_untrusted_code_write() {
    tool_turn("codex", Where::Sandboxed);
}

#[test]
fn claude_runs_a_shell_command_inside_untrusted_code_write() {
    tool_turn("claude", Where::Sandboxed);
}

#[test]
fn codex_runs_a_shell_command_inside_untrusted_code_write_on_a_pool_worker() {
    tool_turn("codex", Where::PoolSandboxed);
}

#[derive(Clone, Copy, PartialEq)]
enum Where {
    ControlPlane,
    Pool,
    /// On the control plane, in the OCI sandbox's `untrusted-code-write` profile.
    Sandboxed,
    /// On a pool worker with the OCI backend (`sandbox.oci`), in `untrusted-code-write`.
    PoolSandboxed,
}

/// One agent turn that runs a shell command editing the checkout, then answers: on the control
/// plane (the next stage sees the edit), on a pool worker (the command's output goes back to
/// the model; the result is attested), or confined (the edit stays in the throwaway copy; the
/// CLI reaches the model only through the broker's port forwarded into the sandbox).
/// Whether a string in `value` holds `text`.
fn holds_text(value: &Value, text: &str) -> bool {
    match value {
        Value::String(s) => s.contains(text),
        Value::Array(items) => items.iter().any(|v| holds_text(v, text)),
        Value::Object(map) => map.values().any(|v| holds_text(v, text)),
        _ => false,
    }
}

fn tool_turn(preset: &str, place: Where) {
    let pooled = matches!(place, Where::Pool | Where::PoolSandboxed);
    let confined = matches!(place, Where::Sandboxed | Where::PoolSandboxed);
    // SAFETY: geteuid has no preconditions.
    if confined && unsafe { libc::geteuid() } != 0 {
        pond_store::missing_prerequisite(
            "the OCI sandbox needs root (namespaces, mounts, cgroups); .ci/run runs as root",
        );
        return;
    }
    let Some(bin) = agents_bin() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seen: Seen = Arc::default();
    let (upstream, model, edited) = if preset == "codex" {
        (rt.block_on(fake_openai_tool(seen.clone())), "fast", "edited-by-agent")
    } else {
        (rt.block_on(fake_anthropic_tool(seen.clone())), "smart", "edited-by-claude")
    };
    let extra: &[&str] = if place == Where::Sandboxed { &["--sandbox", "oci"] } else { &[] };
    let (dir, server) = serve_agent_with(&bin, preset, &upstream, extra);
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("notes.md"), "original\n").unwrap();
    let bundle = server.admin().upload_bundle("acme", &pond_exec::pack_dir(src.path()).unwrap()).unwrap();
    let _pool = pooled.then(|| {
        let worker_flags: &[&str] = if confined { &["--sandbox", "oci"] } else { &[] };
        start_pool_with(&server, dir.path(), &format!("harness.{preset}"), worker_flags)
    });
    // A prompt larger than one argument may be (300 KiB), that starts like a flag and holds
    // shell and template syntax: it reaches the model whole, on stdin, wherever the agent runs.
    let mut prompt = String::from("--version Update notes.md.\n");
    let mut i = 0;
    while prompt.len() < 300 * 1024 {
        prompt.push_str(&format!("context {i}: $(whoami) `id` {{model}} \"quoted\" 'single' ; | &\n"));
        i += 1;
    }
    prompt.push_str("End of context.");
    let run = server
        .admin()
        .submit(
            &json!({"project_id": "acme",
            "sources": [{"label": "repo", "kind": "bundle", "config": {"bundle_id": bundle.bundle_id}}],
            "definition": {"stages": [
                {"key": "edit", "timeout": "2m", "executor": {"kind": "swarm", "placement": if pooled { "pool" } else { "local" },
                    "harness": preset, "model_ref": model, "prompt": prompt,
                    // `any` tier: the test's worker is not tagged pool:trusted.
                    "sandbox": {"profile": if confined { "untrusted-code-write" } else { "none" }, "tier": "any"}}},
                {"key": "check", "executor": {"kind": "shell", "argv": ["cat", "notes.md"]}}
            ]}}),
            None,
        )
        .unwrap();
    let id = run.id.to_string();
    let done = wait_done(&server.admin(), &id, Duration::from_secs(120));
    let logs = log_text(&server.admin(), &id);
    assert_eq!(done.state.as_str(), "succeeded", "{logs:#?}");
    if pooled {
        // The edit happened in the worker's throwaway checkout.
        assert_eq!(done.stages[0].attestation_verified, Some(true), "{logs:#?}");
    } else if place == Where::Sandboxed {
        // The edit happened in the sandbox's throwaway copy: the next stage sees the original.
        assert!(logs.iter().any(|l| l == "original"), "{logs:#?}");
    } else {
        // On the control plane the next stage sees the edited checkout.
        assert!(logs.iter().any(|l| l == edited), "{logs:#?}");
    }
    let first = seen.lock().unwrap()[0].1.clone();
    assert!(holds_text(&first, &prompt), "the model never got the whole prompt");
    let mut results = Vec::new();
    server.admin().download_artifact(&id, &format!("results-{}.jsonl", done.stages[0].key), &mut results).unwrap();
    assert_eq!(String::from_utf8(results).unwrap().trim(), r#"{"edited":"notes.md"}"#, "{logs:#?}");
    if preset == "codex" {
        assert!(logs.iter().any(|l| l.contains("usage: 2 request(s), 1000 input and 40 output tokens")), "{logs:#?}");
    }
    // The second request carried the command's output back to the model.
    let seen = seen.lock().unwrap();
    assert!(seen.iter().any(|(_, r)| r.to_string().contains(edited)), "the tool output went back");
}

/// A fake Anthropic Messages API for a tool turn: asks claude to run a Bash command that edits
/// a file, then answers once the tool result comes back.
async fn fake_anthropic_tool(seen: Seen) -> String {
    async fn handler(State(seen): State<Seen>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let has_result = request.to_string().contains("tool_result");
        seen.lock().unwrap().push((headers, request));
        let start = json!({"type": "message_start", "message": {"id": "msg_t", "type": "message", "role": "assistant",
            "model": "claude-test", "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 700, "output_tokens": 1}}});
        if has_result {
            let text = "Edited.\n```result\n{\"edited\": \"notes.md\"}\n```";
            return sse(vec![
                ("message_start", start),
                (
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                ),
                (
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
                ),
                ("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
                (
                    "message_delta",
                    json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 30}}),
                ),
                ("message_stop", json!({"type": "message_stop"})),
            ]);
        }
        let input = json!({"command": "printf 'edited-by-%s\\n' claude > notes.md && cat notes.md", "description": "edit notes"});
        sse(vec![
            ("message_start", start),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {}}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": input.to_string()}}),
            ),
            ("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
            (
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 25}}),
            ),
            ("message_stop", json!({"type": "message_stop"})),
        ])
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, Router::new().fallback(handler).with_state(seen)).await });
    format!("http://{addr}")
}

#[test]
fn claude_runs_a_shell_command_that_edits_the_checkout_then_answers() {
    tool_turn("claude", Where::ControlPlane);
}

#[test]
fn claude_runs_a_shell_command_on_a_pool_worker_then_answers() {
    tool_turn("claude", Where::Pool);
}

/// A fake model API that reads the request and never answers.
async fn fake_silent() -> String {
    async fn handler(_body: axum::body::Bytes) -> Response {
        std::future::pending::<Response>().await
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, Router::new().fallback(handler)).await });
    format!("http://{addr}")
}

#[test]
fn a_model_api_that_never_answers_is_cut_off_by_the_stage_timeout() {
    let Some(bin) = agents_bin() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let upstream = rt.block_on(fake_silent());
    let (_dir, server) = serve_agent(&bin, "codex", &upstream);
    let run = server
        .admin()
        .submit(&json!({"project_id": "acme", "definition": {"stages": [{"key": "review", "timeout": "3s",
            "executor": {"kind": "swarm", "placement": "local", "harness": "codex", "model_ref": "fast", "prompt": "hi"}}]}}), None)
        .unwrap();
    let done = wait_done(&server.admin(), &run.id.to_string(), Duration::from_secs(60));
    assert_eq!(done.state.as_str(), "failed");
    let error = done.stages[0].error.clone().unwrap_or_default();
    assert!(error.contains("timed out after 3s"), "{error}");
}

/// A fake OpenAI Responses API whose first answer asks codex to run a long tool command that
/// also leaves a process in a session of its own with an empty environment (out of the stage's
/// process group and without its environment mark).
async fn fake_openai_long_tool(escapee: String, tool: String) -> String {
    let handler = move |body: axum::body::Bytes| {
        let (escapee, tool) = (escapee.clone(), tool.clone());
        async move {
            let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let item = if request.to_string().contains("function_call_output") {
                json!({"type": "message", "id": "msg_2", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "annotations": [], "text": "done"}]})
            } else {
                let cmd = format!(
                    "/bin/bash -c 'env -i /usr/bin/setsid /bin/bash -c \"exec -a {escapee} sleep 600\" & exec -a {tool} sleep 600'"
                );
                json!({"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "exec_command",
                    "status": "completed", "arguments": json!({"cmd": cmd}).to_string()})
            };
            let usage = json!({"input_tokens": 10, "output_tokens": 2, "total_tokens": 12,
                "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}});
            sse(vec![
                ("response.created", json!({"type": "response.created", "response": {"id": "resp_l"}})),
                (
                    "response.output_item.done",
                    json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
                ),
                (
                    "response.completed",
                    json!({"type": "response.completed", "response": {"id": "resp_l", "usage": usage}}),
                ),
            ])
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, Router::new().fallback(handler)).await });
    format!("http://{addr}")
}

/// Real codex runs a long tool command that also starts a process in a session of its own
/// under `env -i`; the stage is cancelled mid-command, on the control plane and on a pool
/// worker. Nothing of it survives: not the tool, not the escapee, not codex (checked in /proc).
#[test]
fn a_cancelled_codex_stage_leaves_none_of_its_processes_running() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        pond_store::missing_prerequisite("stage cgroups need root; .ci/run runs as root");
        return;
    }
    let Some(bin) = agents_bin() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    for pooled in [false, true] {
        let tag = format!("{}-{}", if pooled { "pool" } else { "local" }, std::process::id());
        let (escapee, tool) = (format!("pond-codex-escapee-{tag}"), format!("pond-codex-tool-{tag}"));
        let upstream = rt.block_on(fake_openai_long_tool(escapee.clone(), tool.clone()));
        let (dir, server) = serve_agent(&bin, "codex", &upstream);
        let _pool = pooled.then(|| start_pool(&server, dir.path(), "harness.codex"));
        let run = server
            .admin()
            .submit(
                &json!({"project_id": "acme", "definition": {"stages": [
                    {"key": "agent", "timeout": "5m", "executor": {"kind": "swarm",
                        "placement": if pooled { "pool" } else { "local" }, "harness": "codex",
                        "model_ref": "fast", "prompt": "Run the long command.", "sandbox": {"tier": "any"}}}
                ]}}),
                None,
            )
            .unwrap();
        let id = run.id.to_string();
        let started = std::time::Instant::now();
        while !(common::process_named(&escapee) && common::process_named(&tool)) {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the tool command never ran: {:#?}",
                log_text(&server.admin(), &id)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server.admin().cancel(&id).unwrap();
        let done = wait_done(&server.admin(), &id, Duration::from_secs(60));
        assert_eq!(done.state.as_str(), "cancelled", "{:#?}", log_text(&server.admin(), &id));
        common::eventually("nothing of the stage left", Duration::from_secs(10), || {
            !common::process_named(&escapee) && !common::process_named(&tool)
        });
        // Nor codex itself: no process runs the CLI from this test's agents directory under
        // the task's home.
        let codex = bin.join("codex").display().to_string();
        let leftover = std::fs::read_dir("/proc").unwrap().flatten().find(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains("codex")
                && String::from_utf8_lossy(&environ).contains(&dir.path().display().to_string())
        });
        assert!(leftover.is_none(), "a codex process of the stage survived: {leftover:?} ({codex})");
    }
}

/// Real codex under a stage budget smaller than its first response: the broker cuts that
/// response off, the stage fails saying the budget ran out and by how much, and the usage line
/// counts what was spent.
#[test]
fn a_stage_budget_stops_codex_when_it_is_spent() {
    let Some(bin) = agents_bin() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seen: Seen = Arc::default();
    let upstream = rt.block_on(fake_openai_tool(seen.clone()));
    let (_dir, server) = serve_agent(&bin, "codex", &upstream);
    let run = server
        .admin()
        .submit(
            &json!({"project_id": "acme", "definition": {"stages": [
                {"key": "agent", "timeout": "2m", "max_attempts": 3, "executor": {"kind": "swarm", "placement": "local", "harness": "codex",
                    "model_ref": "fast", "prompt": "Update notes.md.", "budget": {"tokens": 300},
                    "sandbox": {"profile": "none", "tier": "any"}}}
            ]}}),
            None,
        )
        .unwrap();
    let id = run.id.to_string();
    let done = wait_done(&server.admin(), &id, Duration::from_secs(120));
    let logs = log_text(&server.admin(), &id);
    assert_eq!(done.state.as_str(), "failed", "{logs:#?}");
    let error = done.stages[0].error.clone().unwrap_or_default();
    assert_eq!(error, "budget exhausted: 520 of 300 tokens", "{logs:#?}");
    assert!(logs.iter().any(|l| l.contains("usage: 1 request(s), 500 input and 20 output tokens")), "{logs:#?}");
    assert_eq!(seen.lock().unwrap().len(), 1, "no call went to the provider after the budget ran out");
    assert_eq!(done.stages[0].attempts.len(), 1, "a spent budget is not retried (a new attempt would spend it again)");
}

/// Budgets beyond the stage: a run's budget holds across its stages, a project's monthly
/// budget across its runs — local and on a pool worker — and once spent, no call reaches the
/// provider. Every call is booked: `pond usage` and a run's usage add up to what the fake model
/// reported, priced at the model's registered prices.
#[test]
fn run_and_project_budgets_hold_across_stages_runs_and_workers() {
    let Some(bin) = agents_bin() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seen: Seen = Arc::default();
    // Each codex stage makes two calls (a tool call, then its answer) of 500 input and 20
    // output tokens each.
    let upstream = rt.block_on(fake_openai_tool(seen.clone()));
    let (dir, server) = serve_agent(&bin, "codex", &upstream);
    let _pool = start_pool(&server, dir.path(), "harness.codex");
    let set = server.cli(&["admin", "budgets", "set", "acme", "--tokens", "2500"]);
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    let stage = |key: &str, placement: &str| {
        json!({"key": key, "timeout": "2m", "max_attempts": 2, "executor": {"kind": "swarm", "placement": placement,
            "harness": "codex", "model_ref": "fast", "prompt": "Update notes.md.", "sandbox": {"profile": "none", "tier": "any"}}})
    };
    let submit = |definition: Value| {
        let run = server.admin().submit(&json!({"project_id": "acme", "definition": definition}), None).unwrap();
        let id = run.id.to_string();
        let done = wait_done(&server.admin(), &id, Duration::from_secs(120));
        (id, done)
    };

    // 1. A run of 1500 tokens: its first stage spends 1040, its second passes the rest on its
    //    first call, which is cut off there.
    let (first, done) =
        submit(json!({"budget": {"tokens": 1500}, "stages": [stage("a", "local"), stage("b", "local")]}));
    let logs = log_text(&server.admin(), &first);
    assert_eq!(done.state.as_str(), "failed", "{logs:#?}");
    assert_eq!(done.stages[0].state.as_str(), "succeeded", "{logs:#?}");
    assert_eq!(done.stages[1].error.as_deref(), Some("budget exhausted (run): 1560 of 1500 tokens"), "{logs:#?}");
    assert_eq!(done.stages[1].attempts.len(), 1, "a spent budget is not retried");
    assert_eq!(seen.lock().unwrap().len(), 3);
    let usage = server.admin().run_usage(&first).unwrap();
    assert_eq!((usage.attempts["a#1"].tokens(), usage.attempts["b#1"].tokens()), (1040, 520), "{usage:?}");
    assert_eq!(usage.total.requests, 3);

    // 2. A pooled run: the worker's broker gets what is left of the project's month (940) with
    //    the job and stops on its second call; the worker reports what it spent.
    let (second, done) = submit(json!({"stages": [stage("p", "pool")]}));
    let logs = log_text(&server.admin(), &second);
    let month: String =
        pond_core::time::Clock::now(&pond_core::time::SystemClock).to_rfc3339().chars().take(7).collect();
    assert_eq!(
        done.stages[0].error.as_deref(),
        Some(format!("budget exhausted (project acme in {month}): 2600 of 2500 tokens").as_str()),
        "{logs:#?}"
    );
    assert_eq!(seen.lock().unwrap().len(), 5);
    assert_eq!(server.admin().run_usage(&second).unwrap().total.tokens(), 1040);

    // 3. The month is spent: a new run's first call is refused by the broker, and nothing more
    //    reaches the provider.
    let (third, done) = submit(json!({"stages": [stage("c", "local")]}));
    let logs = log_text(&server.admin(), &third);
    assert_eq!(
        done.stages[0].error.as_deref(),
        Some(format!("budget exhausted (project acme in {month}): 2600 of 2500 tokens").as_str()),
        "{logs:#?}"
    );
    assert_eq!(seen.lock().unwrap().len(), 5, "no call went to the provider once the month was spent");

    // `pond usage`: the project's spend this month, per model, priced (1.25 and 10 USD per
    // million input and output tokens).
    let out = server.cli(&["usage", "--project", "acme", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let usage: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(usage["month_spent"]["input_tokens"], 2500, "{usage:#}");
    assert_eq!(usage["month_spent"]["output_tokens"], 100, "{usage:#}");
    assert_eq!(usage["month_spent"]["requests"], 5, "{usage:#}");
    let cost = usage["month_spent"]["cost_usd"].as_f64().unwrap();
    assert!((cost - (2500.0 * 1.25 + 100.0 * 10.0) / 1e6).abs() < 1e-9, "{usage:#}");
    assert_eq!(usage["rows"][0]["model"], "fast", "{usage:#}");
    assert_eq!(usage["budget"]["tokens"], 2500, "{usage:#}");
    let table = server.cli(&["usage", "--project", "acme"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains(&format!("{month}: 2600 tokens")) && table.contains("of a budget of 2500 tokens"),
        "{table}"
    );
}
