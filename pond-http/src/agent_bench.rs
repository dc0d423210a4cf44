//! What pond adds to an agent CLI's own time: the same codex task run raw (the CLI straight at a
//! local fake model API), as a local agent stage of a `pond server`, and as a pooled stage on a
//! `pond worker` behind a `pond orchestrator` (all child processes, SQLite). A run's time is the
//! server's own, submit to finished; the raw CLI's is its process's wall time.

use std::fmt;
use std::time::{Duration, Instant};

use crate::bench::Child;
use crate::client::ClientError;

/// The figures.
#[derive(Debug, Clone)]
pub struct AgentBenchReport {
    /// Samples per way.
    pub samples: usize,
    /// The raw CLI, p50 / p90, ms.
    pub raw_ms: (f64, f64),
    /// A local agent stage's run, p50 / p90, ms.
    pub local_ms: (f64, f64),
    /// A pooled agent stage's run, p50 / p90, ms.
    pub pooled_ms: (f64, f64),
}

impl fmt::Display for AgentBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "codex against a local fake model API, {} runs each (p50 / p90)", self.samples)?;
        writeln!(f, "raw CLI:            {:>7.1} / {:>7.1} ms", self.raw_ms.0, self.raw_ms.1)?;
        writeln!(
            f,
            "local agent stage:  {:>7.1} / {:>7.1} ms  (+{:.1} ms at p50)",
            self.local_ms.0,
            self.local_ms.1,
            self.local_ms.0 - self.raw_ms.0
        )?;
        write!(
            f,
            "pooled agent stage: {:>7.1} / {:>7.1} ms  (+{:.1} ms at p50)",
            self.pooled_ms.0,
            self.pooled_ms.1,
            self.pooled_ms.0 - self.raw_ms.0
        )
    }
}

fn p50_p90(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| samples.get(((samples.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0);
    (at(0.5), at(0.9))
}

/// A fake OpenAI Responses API answering every call with one short message and its usage.
async fn fake_model() -> std::io::Result<String> {
    // It reads the whole request first, as a provider does (answering before would break the
    // sender's pipe).
    async fn answer(_request: axum::body::Bytes) -> axum::response::Response {
        let events = [
            serde_json::json!({"type": "response.created", "response": {"id": "resp_b"}}),
            serde_json::json!({"type": "response.output_item.done", "output_index": 0, "item": {
                "type": "message", "id": "msg_b", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": "Done.", "annotations": []}]}}),
            serde_json::json!({"type": "response.completed", "response": {"id": "resp_b",
                "usage": {"input_tokens": 100, "output_tokens": 5, "total_tokens": 105,
                    "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}}}),
        ];
        let mut body = String::new();
        for event in events {
            body.push_str(&format!("event: {}\ndata: {event}\n\n", event["type"].as_str().unwrap_or("")));
        }
        axum::response::Response::builder()
            .header("content-type", "text/event-stream")
            .body(axum::body::Body::from(body))
            .unwrap_or_default()
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, axum::Router::new().fallback(answer)).await });
    Ok(format!("http://{addr}"))
}

fn failed(what: &str, detail: impl fmt::Display) -> ClientError {
    ClientError::Decode(format!("{what}: {detail}"))
}

/// Runs the comparison: `codex` is the CLI's path, `exe` the `pond` binary, `dir` a scratch
/// directory (removed first).
pub fn run(
    exe: &std::path::Path,
    codex: &std::path::Path,
    dir: &std::path::Path,
    samples: usize,
) -> Result<AgentBenchReport, ClientError> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let upstream = rt.block_on(fake_model())?;
    let mut harness = pond_core::agents::presets()
        .into_iter()
        .find(|h| h.key == "codex")
        .ok_or_else(|| failed("presets", "no codex preset"))?;
    harness.command_template[0] = codex.display().to_string();
    let prompt = "Say done.";

    // Raw: the preset's own argv, at the fake model directly, from a fresh home each time.
    let checkout = dir.join("checkout");
    std::fs::create_dir_all(&checkout)?;
    let mut raw = Vec::new();
    for i in 0..samples + 1 {
        let home = dir.join(format!("raw-home-{i}"));
        std::fs::create_dir_all(&home)?;
        let values = std::collections::BTreeMap::from([
            ("model", "gpt-5.5".to_string()),
            ("prompt", prompt.to_string()),
            ("prompt_file", home.join("prompt.txt").display().to_string()),
            ("broker_url", upstream.clone()),
            ("dummy_key", "sk-bench".to_string()),
            ("home", home.display().to_string()),
        ]);
        let (argv, env) = harness.render(&values);
        let stdin = harness.render_stdin(&values).unwrap_or_default();
        std::fs::write(home.join("stdin.txt"), stdin)?;
        let started = Instant::now();
        let out = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .current_dir(&checkout)
            .stdin(std::fs::File::open(home.join("stdin.txt"))?)
            .output()?;
        let took = started.elapsed();
        if !out.status.success() {
            return Err(failed("the raw CLI", String::from_utf8_lossy(&out.stderr)));
        }
        // The first run warms the page cache; it is not counted.
        if i > 0 {
            raw.push(took.as_secs_f64() * 1000.0);
        }
    }

    // Through pond: a server with the model and harness, and a pool with one codex worker.
    let (_server, admin, orch) = crate::bench::server_and_orchestrator(exe, dir, &["--model-origin", &upstream])?;
    admin.admin_json(
        "POST",
        "/v1/admin/credentials",
        Some(serde_json::json!({"name": "openai", "provider": "openai", "value": "sk-bench-real", "projects": ["bench"]})),
    )?;
    admin.admin_json(
        "POST",
        "/v1/admin/models",
        Some(
            serde_json::json!({"key": "fast", "provider": "openai", "model_id": "gpt-5.5", "credential_name": "openai",
            "capability": "harness.codex", "base_url": upstream}),
        ),
    )?;
    admin.admin_json(
        "POST",
        "/v1/admin/harnesses",
        Some(serde_json::to_value(&harness).map_err(|e| failed("harness", e))?),
    )?;
    let code = admin
        .create_enroll_code(&crate::pool_wire::CreateCode {
            pool: "bench".into(),
            role: Some("worker".into()),
            tags: Vec::new(),
            capabilities: vec!["harness.codex".into()],
            fingerprint: None,
            ttl: None,
            uses: None,
        })?
        .code;
    let _worker =
        Child::spawn_worker(exe, &orch.url, &dir.join("worker"), &code, &["--capabilities", "harness.codex"])?;
    let timed = |placement: &str| -> Result<Vec<f64>, ClientError> {
        let body = serde_json::json!({"project_id": "bench", "definition": {"stages": [{"key": "agent",
            "executor": {"kind": "swarm", "placement": placement, "harness": "codex", "model_ref": "fast",
                "prompt": prompt, "sandbox": {"tier": "any"}}}]}});
        let mut times = Vec::new();
        for i in 0..samples + 1 {
            let id = admin.submit(&body, None)?.id.to_string();
            let deadline = Instant::now() + Duration::from_secs(120);
            let run = loop {
                let run = admin.get_run(&id)?;
                if run.state.is_terminal() {
                    break run;
                }
                if Instant::now() > deadline {
                    return Err(failed("a run", format!("{id} did not finish in 2 minutes")));
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            if run.state.as_str() != "succeeded" {
                return Err(failed("a run", format!("{id} {}: {:?}", run.state.as_str(), run.stages[0].error)));
            }
            let finished = run.finished_at.ok_or_else(|| failed("a run", "no finished_at"))?;
            if i > 0 {
                times.push(finished.since(run.created_at).0 as f64);
            }
        }
        Ok(times)
    };
    let local = timed("local")?;
    let pooled = timed("pool")?;
    Ok(AgentBenchReport { samples, raw_ms: p50_p90(raw), local_ms: p50_p90(local), pooled_ms: p50_p90(pooled) })
}
