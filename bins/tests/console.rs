//! The console in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright
//! against a real server with real runs — local, pooled (a real orchestrator and worker),
//! confidential, failed, retried, hostile — as `testdata/console/console_check.py` describes.
//! Screenshots of each page are kept under `target/console-shots` (set `POND_CONSOLE_SHOTS` to
//! choose); `POND_UPDATE_README_SHOT=1` also copies two of them to `docs/console-runs.png` and
//! `docs/console-run.png` (the README's).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// What the browser check needs, or `None` after saying what is missing.
fn prerequisites() -> Option<(String, String, PathBuf)> {
    let python = match std::env::var("POND_TEST_PYTHON") {
        Ok(p) if !p.is_empty() => p,
        _ => {
            pond_store::missing_prerequisite("POND_TEST_PYTHON is not set (a venv with playwright; .ci/run makes it)");
            return None;
        }
    };
    if !Command::new(&python).args(["-c", "import playwright.sync_api"]).status().is_ok_and(|s| s.success()) {
        pond_store::missing_prerequisite(&format!("{python} cannot import playwright (.ci/run installs it)"));
        return None;
    }
    let chromium = std::env::var("POND_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        pond_store::missing_prerequisite(&format!("{chromium} is missing (Debian's `chromium`; .ci/run installs it)"));
        return None;
    }
    let axe = std::env::var("POND_TEST_AXE").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("POND_TEST_AGENTS_DIR").unwrap_or_default())
            .join("node_modules/axe-core/axe.min.js")
    });
    if !axe.exists() {
        pond_store::missing_prerequisite(&format!(
            "{} is missing (npm `axe-core`; .ci/run installs it)",
            axe.display()
        ));
        return None;
    }
    Some((python, chromium, axe))
}

fn shell(key: &str, script: &str) -> Value {
    json!({"key": key, "executor": {"kind": "shell", "argv": ["sh", "-c", script]}})
}

fn submit(admin: &pond_http::client::Client, project: &str, stages: Value) -> String {
    admin.submit(&json!({"project_id": project, "definition": {"stages": stages}}), None).unwrap().id.to_string()
}

const PIXEL_PNG: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";

#[test]
fn the_console_in_a_real_browser() {
    let Some((python, chromium, axe)) = prerequisites() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &[]);
    let admin = server.admin();
    let code = enroll_code(&admin, "byo", None, None);
    let orch = Orchestrator::start(&server.url, &dir.path().join("orch"), "127.0.0.1:0", Some(&code));
    let code = enroll_code(&admin, "byo", Some(&["pool:byo", "tenant:web"]), None);
    let worker = Worker::start(&orch.url, &dir.path().join("worker"), &code, &["--allow-unconfined"]);
    let consumer = admin.create_key(&["web".to_string()], Some("web-consumer")).unwrap();

    // The runs the browser looks at.
    let local = submit(
        &admin,
        "web",
        json!([
            shell("first", &format!(
                "echo needle-42; echo to-stderr >&2; \
                 printf '{{\"file\":\"a.rs\",\"score\":3}}\\n{{\"file\":\"b.rs\",\"score\":5}}\\n' > \"$POND_OUTPUT_DIR/report.jsonl\"; \
                 echo {PIXEL_PNG} | base64 -d > \"$POND_OUTPUT_DIR/pixel.png\""
            )),
            shell("second", "echo second-stage-line; printf 'raw-\\377-bytes\\n'"),
        ]),
    );
    let failed = submit(&admin, "web", json!([shell("flaky-zz9", "echo about to fail; exit 3")]));
    let flag = dir.path().join("retry-flag");
    let mut retried_stage = shell(
        "retry",
        &format!(
            "if [ -e {0} ]; then echo second try; else touch {0}; echo first try fails; exit 1; fi",
            flag.display()
        ),
    );
    retried_stage["max_attempts"] = json!(2);
    retried_stage["backoff"] = json!("200ms");
    let retried = submit(&admin, "web", json!([retried_stage]));
    let pooled = submit(
        &admin,
        "web",
        json!([{"key": "remote", "executor": {"kind": "shell", "placement": "pool", "sandbox": {"tier": "byo"},
            "argv": ["sh", "-c", "echo ran on the pool"]}}]),
    );
    let xss = submit(
        &admin,
        "web",
        json!([{"key": "hostile", "name": "<img src=x onerror=\"window.__pwned=1\">", "executor": {"kind": "shell",
            "argv": ["sh", "-c", "echo '<script>window.__pwned=2</script>'; echo '<img src=x onerror=window.__pwned=3>' >&2; \
                echo x > \"$POND_OUTPUT_DIR/<img src=x onerror=window.__pwned=4>.txt\""]}}]),
    );
    let other = submit(&admin, "other", json!([shell("elsewhere", "true")]));
    for _ in 0..60 {
        submit(&admin, "bulk", json!([{"key": "n", "executor": {"kind": "noop"}}]));
    }

    // A confidential run sealed to alice's key (its markers are assembled by the stage, so the
    // definition, which is stored in clear, does not hold them).
    let alice = dir.path().join("alice");
    let out = Command::new(POND)
        .args(["keys", "show", "--json"])
        .env("POND_SERVER", &server.url)
        .env("POND_TOKEN", &server.token)
        .env("POND_CONFIG", alice.join("config.json"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let alice_public: Value = serde_json::from_slice(&out.stdout).unwrap();
    let key_file = alice.join("keys/default.x25519");
    let alice_secret = pond_exec::load_or_create_key(&key_file).unwrap();
    let mut body = json!({"project_id": "web", "encrypt": true, "recipientPubkeys": [alice_public["public_key"]],
    "definition": {"stages": [
        shell("sealed", "printf 'CONSOLE-%s-%s\\n' PLAIN 51x; printf 'ARTIFACT-%s-%s' SECRET 77q > \"$POND_OUTPUT_DIR/secret.txt\""),
        {"key": "sealed-pool", "executor": {"kind": "shell", "placement": "pool", "sandbox": {"tier": "byo"},
            "argv": ["sh", "-c", "printf 'CONSOLE-%s-%s from the pool\\n' PLAIN 51x"]}}
    ]}});
    sign_request(&mut body, &alice_secret);
    let confidential = admin.submit(&body, None).unwrap().id.to_string();

    for id in [&local, &failed, &retried, &pooled, &xss, &other, &confidential] {
        wait_done(&admin, id, Duration::from_secs(90));
    }
    assert_eq!(admin.get_run(&retried).unwrap().state.as_str(), "succeeded");

    // Agents to show: a credential, a model, a harness from a preset.
    let out = Command::new(POND)
        .args(["admin", "credentials", "add", "openai", "--provider", "openai", "--env", "OPENAI_API_KEY"])
        .args(["--project", "*", "--value-env", "THE_KEY"])
        .env("THE_KEY", "sk-never-shown-5521")
        .env("POND_SERVER", &server.url)
        .env("POND_TOKEN", &server.token)
        .env("POND_CONFIG", dir.path().join("admin-config.json"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for args in [
        vec!["admin", "models", "add", "gpt", "--provider", "openai", "--model-id", "gpt-5", "--credential", "openai"]
            .into_iter()
            .chain(["--capability", "harness.codex", "--input-price", "1.25", "--output-price", "10"])
            .collect::<Vec<_>>(),
        vec!["admin", "harnesses", "from-preset", "codex"],
    ] {
        let out = server.cli(&args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    let shots = std::env::var("POND_CONSOLE_SHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| common::root().join("target/console-shots"));
    std::fs::create_dir_all(&shots).unwrap();
    let config = json!({
        "url": server.url, "admin_token": server.token, "consumer_token": consumer.token,
        "consumer_key_id": consumer.id.to_string(), "consumer_key_name": "web-consumer",
        "runs": {"local": local, "failed": failed, "retried": retried, "pooled": pooled, "xss": xss,
                 "other": other, "confidential": confidential},
        "search_text": "zz9", "worker_id": worker.id, "key_file": key_file, "key_b64": std::fs::read_to_string(&key_file).unwrap().trim(),
        "marker": "CONSOLE-PLAIN-51x", "artifact_marker": "ARTIFACT-SECRET-77q",
        "shots": shots, "axe": axe, "chromium": chromium, "db_path": server.data_dir.join("pond.db"),
    });
    let config_path = dir.path().join("console.json");
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    let out = Command::new(&python)
        .arg(common::root().join("testdata/console/console_check.py"))
        .arg(&config_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the browser check failed:\n{stderr}");
    let got: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    eprintln!("what the browser found: {got:#}");
    let list = |v: &Value| -> Vec<String> {
        v.as_array().unwrap().iter().map(|x| x.as_str().unwrap_or_default().to_string()).collect()
    };
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();

    // Sign-in and scope: the consumer sees its project's runs only, and the runs section only;
    // its token is in the tab's session storage, never in a URL or local storage.
    let consumer_runs = list(&got["consumer_runs"]);
    assert!(consumer_runs.contains(&local) && !consumer_runs.contains(&other), "{consumer_runs:?}");
    assert!(!consumer_runs.iter().any(|r| admin.get_run(r).unwrap().project_id != "web"));
    assert_eq!(text(&got["consumer_nav"]).trim(), "Runs");
    assert_eq!(got["token_in_url"], false);
    assert_eq!(got["token_in_local_storage"], false);
    assert_eq!(got["token_in_session_storage"], true);

    // Live: the new run appeared and reached succeeded in the same document.
    let states = list(&got["live_states"]);
    assert_eq!(states.last().map(String::as_str), Some("succeeded"), "{states:?}");
    assert!(states.len() >= 2, "the row changed state in place: {states:?}");
    assert_eq!(got["live_same_document"], true);
    // Filters and paging.
    let failed_rows = list(&got["failed_filter"]);
    assert!(failed_rows.contains(&failed) && !failed_rows.contains(&local), "{failed_rows:?}");
    assert_eq!(list(&got["text_filter"]), vec![failed.clone()]);
    assert_eq!(got["paging"], json!({"first": 50, "second": 10, "overlap": 0}));
    // Keyboard.
    assert_eq!(text(&got["first_tab"]), "Skip to content");
    assert_eq!(got["enter_opens_run"], true);

    // The run page.
    assert_eq!(got["dag_nodes"], 2);
    assert!(got["timeline_bars"].as_u64().unwrap() >= 2);
    let stderr_lines = list(&got["stderr_lines"]);
    assert!(
        stderr_lines.len() == 1 && stderr_lines[0].contains("stderr") && stderr_lines[0].contains("to-stderr"),
        "{stderr_lines:?}"
    );
    let log = text(&got["log_text"]);
    assert!(log.contains("needle-42") && log.contains("second-stage-line"), "{log}");
    // A line that is not UTF-8 (stored byte-exact, as base64) shows with U+FFFD for the byte.
    assert!(log.contains("raw-\u{FFFD}-bytes"), "{log}");
    let second_only = list(&got["stage_filter_visible"]);
    assert!(!second_only.is_empty() && second_only.iter().all(|l| l.starts_with("second#")), "{second_only:?}");
    let hits = list(&got["search_visible"]);
    assert!(hits.len() == 1 && hits[0].contains("needle-42"), "{hits:?}");
    assert_eq!(text(&got["download"]), "{\"file\":\"a.rs\",\"score\":3}\n{\"file\":\"b.rs\",\"score\":5}\n");
    assert_eq!(list(&got["jsonl_headers"])[..2], ["file".to_string(), "score".to_string()]);
    assert_eq!(list(&got["jsonl_cells"]), ["a.rs", "3", "b.rs", "5"]);
    assert_eq!(got["image_loaded"], 1);
    // Retries and pools on the timeline.
    let attempts = list(&got["retried_attempts"]);
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert!(attempts[0].contains("failed") && attempts[1].contains("succeeded"), "{attempts:?}");
    assert_eq!(got["retried_bars"], 2);
    let pooled_attempts = list(&got["pooled_attempts"]);
    assert!(pooled_attempts[0].contains(&worker.id) && pooled_attempts[0].contains("verified"), "{pooled_attempts:?}");

    assert_eq!(got["cancelled_in_api"], "cancelled");

    // Confidential: sealed until the key is loaded; then the lines and the artifact open in the
    // page, every stream checked whole, and nothing the browser sent or received holds the
    // plaintext or the key.
    assert!(got["sealed_before_key"].as_u64().unwrap() >= 2);
    assert_eq!(got["marker_before_key"], false);
    let opened = list(&got["decrypted_lines"]);
    assert!(
        opened.iter().any(|l| l.contains("sealed#1")) && opened.iter().any(|l| l.contains("from the pool")),
        "{opened:?}"
    );
    assert_eq!(list(&got["bad_lines"]), Vec::<String>::new());
    assert_eq!(list(&got["whole_streams"]).len(), 2, "{}", got["whole_streams"]);
    let checks = text(&got["checks"]);
    assert!(
        checks.contains("signed by your key and covers every recipient") && checks.contains("Every stream is whole"),
        "{checks}"
    );
    assert_eq!(text(&got["confidential_download"]), "ARTIFACT-SECRET-77q");
    assert_eq!(text(&got["confidential_preview"]), "ARTIFACT-SECRET-77q");
    assert_eq!(got["key_in_storage"], false);
    assert!(got["responses_checked"].as_u64().unwrap() > 10);
    assert_eq!(list(&got["unread_responses"]), Vec::<String>::new());
    assert_eq!(list(&got["plaintext_in_traffic"]), Vec::<String>::new());
    assert_eq!(list(&got["plaintext_in_requests"]), Vec::<String>::new());
    assert_eq!(list(&got["key_in_requests"]), Vec::<String>::new());
    assert_eq!(got["ciphertext_served"], true);

    // Someone holding the database cut a stream's final record and inserted a clear line
    // claiming it whole: the page says the log is not whole, and marks the line unsigned.
    let tampered = text(&got["tampered_checks"]);
    assert!(
        tampered.contains("not whole") && tampered.contains("stage sealed attempt 1") && tampered.contains("cut short"),
        "{tampered}"
    );
    let class = text(&got["forged_line_class"]);
    assert!(class.contains("sys") && !class.contains(" ok"), "{class}");
    assert!(text(&got["forged_line_text"]).contains("pond note, unsigned"), "{}", got["forged_line_text"]);

    // Hostile text is text.
    assert_eq!(got["xss_fired"], Value::Null);
    assert_eq!(got["xss_injected_elements"], 0);
    let xlog = text(&got["xss_log_text"]);
    assert!(
        xlog.contains("<script>window.__pwned=2</script>") && xlog.contains("<img src=x onerror=window.__pwned=3>"),
        "{xlog}"
    );
    assert!(text(&got["xss_stage_names"]).contains("<img src=x onerror=\"window.__pwned=1\">"));
    assert!(
        text(&got["xss_artifacts"]).contains("<img src=x onerror=window.__pwned=4>.txt"),
        "{}",
        got["xss_artifacts"]
    );

    // Pools, agents, keys.
    let worker_row = text(&got["worker_row"]);
    assert!(worker_row.contains("tenant:web") && worker_row.contains(env!("CARGO_PKG_VERSION")), "{worker_row}");
    assert_eq!(got["drained_in_api"], true);
    assert_eq!(got["undrained_in_api"], true);
    let agents = text(&got["agents_text"]);
    assert!(
        agents.contains("gpt-5") && agents.contains("OPENAI_API_KEY") && !agents.contains("sk-never-shown"),
        "{agents}"
    );
    let dry = text(&got["dry_run"]);
    assert!(dry.contains("argv") && dry.contains("codex"), "{dry}");
    assert_eq!(got["new_token_works"], true);
    assert_eq!(got["token_shown_again"], false);
    assert!(text(&got["revoked_consumer_signed_out"]).contains("Sign in"), "{}", got["revoked_consumer_signed_out"]);
    assert!(admin.list_keys().unwrap().keys.iter().any(|k| k.id == consumer.id && k.revoked_at.is_some()));

    // Accessibility and policy: no serious axe violation on any page; nothing refused by the CSP
    // and no script error.
    for (page, violations) in got["axe"].as_object().unwrap() {
        assert_eq!(violations, &json!([]), "axe on {page}");
    }
    let errors = list(&got["console_errors"]);
    assert!(
        errors.iter().all(|e| e.contains("401") || e.contains("Failed to load resource")),
        "script errors or CSP refusals: {errors:?}"
    );
    assert!(!errors.iter().any(|e| e.contains("Content Security Policy")), "{errors:?}");
    for page in [
        "runs",
        "runs-web",
        "run",
        "run-pooled",
        "run-confidential",
        "run-confidential-tampered",
        "pools",
        "agents",
        "keys",
        "signin",
    ] {
        assert!(shots.join(format!("{page}.png")).exists(), "screenshot {page}");
    }
    if std::env::var("POND_UPDATE_README_SHOT").is_ok_and(|v| v == "1") {
        std::fs::copy(shots.join("runs-web.png"), common::root().join("docs/console-runs.png")).unwrap();
        std::fs::copy(shots.join("run-confidential.png"), common::root().join("docs/console-run.png")).unwrap();
    }
    drop((orch, worker));
}
