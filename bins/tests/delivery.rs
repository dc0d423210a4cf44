//! Nothing lost, nothing unbounded: a stage's output arrives whole and byte-exact, locally and
//! from pool workers, on SQLite and PostgreSQL, across an orchestrator restart, and what a
//! stage writes never costs pond more than its caps.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{enroll_code, wait_done, Orchestrator, Server, Worker, POND};
use serde_json::json;

/// A stage's stdout as bytes: its records' bytes, pieces joined, lines ended by `\n`.
fn stdout_bytes(lines: &[pond_core::store::LogLine], stage: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines.iter().filter(|l| l.line.stage.as_deref() == Some(stage)) {
        if l.line.stream != pond_core::store::LogStream::Stdout {
            continue;
        }
        out.extend(l.line.bytes().unwrap());
        if !l.line.continued {
            out.push(b'\n');
        }
    }
    out
}

/// What the test stages print: NUL, invalid UTF-8, CR, a 40 KiB line, an empty line, text.
const SCRIPT: &str = r#"printf 'a\000b\n'; printf '\377\376 not utf-8\n'; printf 'cr\r\n'; head -c 40960 /dev/zero | tr '\0' 'x'; printf '\n\n'; printf 'ünïcödé ✓\n'"#;

fn expected_output() -> Vec<u8> {
    let mut want = Vec::new();
    want.extend(b"a\0b\n");
    want.extend(b"\xff\xfe not utf-8\n");
    want.extend(b"cr\r\n");
    want.extend(vec![b'x'; 40960]);
    want.extend(b"\n\n");
    want.extend("ünïcödé ✓\n".as_bytes());
    want
}

fn pool(dir: &Path, extra: &[&str]) -> (Server, Orchestrator, Worker) {
    let server = Server::start(&dir.join("server"), extra);
    let admin = server.admin();
    let code = enroll_code(&admin, "p", None, None);
    let orch = Orchestrator::start(&server.url, &dir.join("orch"), "127.0.0.1:0", Some(&code));
    let code = enroll_code(&admin, "p", Some(&["pool:trusted"]), None);
    let worker = Worker::start(&orch.url, &dir.join("worker"), &code, &[]);
    (server, orch, worker)
}

fn byte_exact_on(pg: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let db = pg.map(|url| common::scratch_database(url, "delivery"));
    let mut args = vec![];
    if let Some(db) = &db {
        args.extend(["--database-url", db.url.as_str()]);
    }
    let (server, _orch, _worker) = pool(dir.path(), &args);
    let admin = server.admin();
    let body = json!({"project_id": "acme", "definition": {"stages": [
        {"key": "local", "executor": {"kind": "shell", "argv": ["sh", "-c", SCRIPT]}},
        {"key": "pooled", "executor": {"kind": "shell", "argv": ["sh", "-c", SCRIPT], "placement": "pool",
            "sandbox": {"tier": "trusted"}}}
    ]}});
    let id = admin.submit(&body, None).unwrap().id.to_string();
    let run = wait_done(&admin, &id, Duration::from_secs(60));
    assert_eq!(run.state.as_str(), "succeeded", "{run:?}");
    let lines = common::log_records(&admin, &id);
    for stage in ["local", "pooled"] {
        assert_eq!(stdout_bytes(&lines, stage), expected_output(), "{stage}");
    }
    // The 40 KiB line came as continued pieces of at most 16 KiB.
    let pieces: Vec<usize> = lines
        .iter()
        .filter(|l| l.line.stage.as_deref() == Some("local") && l.line.continued)
        .map(|l| l.line.bytes().unwrap().len())
        .collect();
    assert_eq!(pieces, vec![16384, 16384], "{pieces:?}");
    // The CLI writes the bytes exactly (the long line whole).
    let out = server.cli(&["run", "logs", &id]);
    assert!(out.status.success());
    let mut want = b"[local] a\0b\n".to_vec();
    want.extend(b"[local] \xff\xfe not utf-8\n");
    assert!(out.stdout.windows(want.len()).any(|w| w == want.as_slice()), "{}", String::from_utf8_lossy(&out.stdout));
    let long = format!("[pooled] {}\n", "x".repeat(40960));
    assert!(out.stdout.windows(long.len()).any(|w| w == long.as_bytes()));
}

#[test]
fn output_is_byte_exact_locally_and_from_workers_on_sqlite() {
    byte_exact_on(None);
}

#[test]
fn output_is_byte_exact_locally_and_from_workers_on_postgres() {
    let Some(pg) = Server::database_server() else { return };
    byte_exact_on(Some(&pg));
}

/// The outside check's case: a confidential pooled stage printing 600 lines of 7,000 bytes
/// (4 MiB of plaintext, more as base64 ciphertext) — every line decrypts, none is lost.
#[test]
fn a_large_encrypted_pooled_output_arrives_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _orch, _worker) = pool(dir.path(), &[]);
    let config = dir.path().join("consumer");
    let consumer = |args: &[&str]| {
        Command::new(POND)
            .args(args)
            .env("POND_SERVER", &server.url)
            .env("POND_TOKEN", &server.token)
            .env("POND_CONFIG", config.join("config.json"))
            .output()
            .unwrap()
    };
    let workflow = dir.path().join("big.json");
    std::fs::write(
        &workflow,
        json!({"stages": [{"key": "big", "executor": {"kind": "shell", "placement": "pool", "sandbox": {"tier": "trusted"},
            "argv": ["sh", "-c", "for i in $(seq 1 600); do printf 'line-%04d ' $i; head -c 6990 /dev/zero | tr '\\0' 'y'; echo; done"]}}]})
        .to_string(),
    )
    .unwrap();
    let out = consumer(&["run", "submit", "-f", workflow.to_str().unwrap(), "--project", "acme", "--wait"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{}", stdout.len(), String::from_utf8_lossy(&out.stderr));
    let got: Vec<&str> = stdout.lines().filter(|l| l.starts_with("[big] line-")).collect();
    assert_eq!(got.len(), 600, "lines decrypted: {}", got.len());
    for (i, line) in got.iter().enumerate() {
        assert!(line.starts_with(&format!("[big] line-{:04} ", i + 1)) && line.len() == 6 + 10 + 6990, "{i}");
    }
}

/// The orchestrator dies while a pooled stage prints, and comes back: the worker keeps the
/// lines on disk meanwhile and delivers every one, in order, once.
#[test]
fn an_orchestrator_restart_loses_no_line_of_a_running_job() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut orch, _worker) = pool(dir.path(), &["--lease", "30s"]);
    let admin = server.admin();
    let body = json!({"project_id": "acme", "definition": {"stages": [{"key": "s", "executor": {"kind": "shell",
        "placement": "pool", "sandbox": {"tier": "trusted"},
        "argv": ["sh", "-c", "echo begin; for i in $(seq 1 60); do echo line-$i; sleep 0.1; done; printf 'x' > \"$POND_OUTPUT_DIR/out.txt\""]}}]}});
    let id = admin.submit(&body, None).unwrap().id.to_string();
    common::eventually("the stage to begin", Duration::from_secs(30), || {
        common::log_text(&admin, &id).iter().any(|l| l == "begin")
    });
    orch.kill9();
    std::thread::sleep(Duration::from_secs(3));
    orch.restart();
    let run = wait_done(&admin, &id, Duration::from_secs(90));
    assert_eq!(run.state.as_str(), "succeeded", "{run:?}");
    let lines: Vec<String> = common::log_text(&admin, &id).into_iter().filter(|l| l.starts_with("line-")).collect();
    assert_eq!(lines, (1..=60).map(|i| format!("line-{i}")).collect::<Vec<_>>());
    assert_eq!(run.stages[0].attempts.len(), 1, "{run:?}");
}

/// A stage writing 200 MB without a newline costs the server a bounded amount of memory: the
/// line is read in 16 KiB pieces, the log is cut at the per-stage cap with a note, and the
/// stage still ends.
#[test]
fn an_endless_line_costs_the_server_its_caps_not_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--max-log-bytes", "4194304"]);
    let admin = server.admin();
    let body = common::run_json(json!({"stages": [{"key": "flood", "executor": {"kind": "shell",
        "argv": ["sh", "-c", "head -c 200000000 /dev/zero | tr '\\0' 'z'; echo; echo after"]}}]}));
    let id = admin.submit(&body, None).unwrap().id.to_string();
    let run = wait_done(&admin, &id, Duration::from_secs(120));
    assert_eq!(run.state.as_str(), "succeeded", "{run:?}");
    let lines = common::log_records(&admin, &id);
    let kept: usize = lines.iter().filter_map(|l| l.line.bytes().ok()).map(|b| b.len()).sum();
    assert!(kept < 5 * 1024 * 1024, "kept {kept} bytes of log");
    assert!(
        lines.iter().any(|l| l.line.text.starts_with("log truncated at ")),
        "{:?}",
        lines.iter().map(|l| &l.line.text).filter(|t| t.len() < 200).collect::<Vec<_>>()
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let peak_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    eprintln!("server peak RSS {} MiB after a 200 MB line", peak_kb / 1024);
    assert!(peak_kb < 150 * 1024, "server peak RSS {peak_kb} kB");
}

/// A run's artifacts together are capped: the stage that would go past the cap fails, naming
/// it, locally and on a pool worker.
#[test]
fn a_run_s_artifacts_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _orch, _worker) = pool(dir.path(), &["--max-run-artifact-bytes", "3000000"]);
    let admin = server.admin();
    let write = "head -c 1000000 /dev/zero > \"$POND_OUTPUT_DIR/a.bin\"; head -c 1000000 /dev/zero > \"$POND_OUTPUT_DIR/b.bin\"";
    let body = json!({"project_id": "acme", "definition": {"stages": [
        {"key": "first", "executor": {"kind": "shell", "argv": ["sh", "-c", write]}},
        {"key": "local", "executor": {"kind": "shell", "argv": ["sh", "-c", write.replace(".bin", "2.bin")]}, "continue_on_error": true},
        {"key": "pooled", "executor": {"kind": "shell", "argv": ["sh", "-c", write.replace(".bin", "3.bin")],
            "placement": "pool", "sandbox": {"tier": "trusted"}}}
    ]}});
    let id = admin.submit(&body, None).unwrap().id.to_string();
    let run = wait_done(&admin, &id, Duration::from_secs(60));
    assert_eq!(run.stages[0].state.as_str(), "succeeded", "{run:?}");
    for stage in &run.stages[1..] {
        let error = stage.error.clone().unwrap_or_default();
        assert_eq!(stage.state.as_str(), "failed", "{run:?}");
        assert!(error.contains("per-run cap of 3000000 bytes"), "{}: {error}", stage.key);
    }
    let total: u64 = admin.artifacts(&id).unwrap().artifacts.iter().map(|a| a.size).sum();
    assert!(total <= 3_000_000, "{total}");
}

/// A process that writes an output named like a key sidecar gets the same clear failure on the
/// control plane and on a worker, in clear and confidential runs alike.
#[test]
fn a_pondkey_output_name_fails_the_stage_alike_locally_and_on_a_worker() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _orch, _worker) = pool(dir.path(), &[]);
    let admin = server.admin();
    let write = "printf x > \"$POND_OUTPUT_DIR/notes.pondkey\"";
    for encrypt in [false, true] {
        let mut body = json!({"project_id": "acme", "definition": {"stages": [
            {"key": "local", "continue_on_error": true, "executor": {"kind": "shell", "argv": ["sh", "-c", write]}},
            {"key": "pooled", "executor": {"kind": "shell", "argv": ["sh", "-c", write], "placement": "pool",
                "sandbox": {"tier": "trusted"}}}
        ]}});
        if encrypt {
            let secret = [3u8; 32];
            let key = base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                pond_core::keys::x25519_public(&secret),
            );
            body["recipient_pubkeys"] = json!([key]);
            common::sign_request(&mut body, &secret);
        }
        let id = admin.submit(&body, None).unwrap().id.to_string();
        let run = wait_done(&admin, &id, Duration::from_secs(60));
        for stage in &run.stages {
            let error = stage.error.clone().unwrap_or_default();
            assert!(
                error.contains("`notes.pondkey` is not a valid artifact name: names ending in `.pondkey` are kept"),
                "encrypt {encrypt}, {}: {error}",
                stage.key
            );
        }
        assert!(admin.artifacts(&id).unwrap().artifacts.is_empty());
    }
}
