//! The agent registry over real HTTP: presets, template lint, models bound to credentials,
//! dry runs that show the exact argv and never a secret, and agent stages that name an unknown
//! harness or model refused at submit.

mod common;

use common::Server;
use serde_json::{json, Value};

fn call(server: &Server, token: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let req = ureq::request(method, &format!("{}{path}", server.url)).set("Authorization", &format!("Bearer {token}"));
    let result = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {path}: {e}"),
    };
    let status = response.status();
    let text = response.into_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[test]
fn registry_presets_lint_dry_run_and_submit_checks() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let t = server.token.clone();
    let admin = |method: &str, path: &str, body: Option<Value>| call(&server, &t, method, path, body);

    let (status, presets) = admin("GET", "/v1/admin/harness-presets", None);
    assert_eq!(status, 200);
    let keys: Vec<&str> = presets["harnesses"].as_array().unwrap().iter().map(|h| h["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["codex", "claude"]);
    let (status, saved) = admin("POST", "/v1/admin/harnesses/from-preset", Some(json!({"preset": "codex"})));
    assert_eq!(status, 201, "{saved}");
    assert_eq!(saved["warnings"], json!([]));
    let (status, e) = admin("POST", "/v1/admin/harnesses/from-preset", Some(json!({"preset": "gpt-cli"})));
    assert_eq!((status, e["error"]["field"].as_str()), (422, Some("preset")));

    // Lint: `{{…}}` refused naming the element; unknown placeholders and {prompt_file} warned.
    let (status, e) = admin(
        "POST",
        "/v1/admin/harnesses",
        Some(json!({"key": "bad", "capability": "harness.x",
        "command_template": ["tool", "{{prompt}}"]})),
    );
    assert_eq!((status, e["error"]["field"].as_str()), (422, Some("command_template[1]")), "{e}");
    let (status, saved) = admin(
        "POST",
        "/v1/admin/harnesses",
        Some(json!({"key": "mine", "capability": "harness.mine",
        "command_template": ["tool", "--colour={colour}", "--file", "{prompt_file}"], "env": {"TOOL_HOME": "{home}"}})),
    );
    assert_eq!(status, 201, "{saved}");
    let warnings = saved["warnings"].to_string();
    assert!(warnings.contains("{colour}") && warnings.contains("remote pool"), "{warnings}");

    // A model needs a registered credential.
    let model = json!({"key": "fast", "provider": "openai", "model_id": "gpt-5.5", "credential_name": "openai",
        "capability": "harness.codex", "input_usd_per_mtok": 1.25, "output_usd_per_mtok": 10.0});
    let (status, e) = admin("POST", "/v1/admin/models", Some(model.clone()));
    assert_eq!((status, e["error"]["field"].as_str()), (422, Some("credential_name")), "{e}");
    let (status, _) = admin(
        "POST",
        "/v1/admin/credentials",
        Some(json!({"name": "openai", "provider": "openai", "env": "OPENAI_API_KEY", "value": "sk-very-secret-value",
            "projects": ["acme"]})),
    );
    assert_eq!(status, 201);
    // A model's base URL must be a provider's own origin or one the operator allowed: an
    // admin token alone cannot make the broker send the key elsewhere.
    let mut elsewhere = model.clone();
    elsewhere["base_url"] = json!("https://collector.example/v1");
    let (status, e) = admin("POST", "/v1/admin/models", Some(elsewhere));
    assert_eq!((status, e["error"]["field"].as_str()), (422, Some("base_url")), "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("--model-origin"), "{e}");
    let (status, _) = admin("POST", "/v1/admin/models", Some(model));
    assert_eq!(status, 201);

    // The dry run: the exact argv, what the agent reads on stdin (the prompt, verbatim) and
    // env names only.
    let prompt = "fix the bug; rm -rf / \"$(whoami)\"";
    let (status, dry) =
        admin("POST", "/v1/admin/harnesses/codex/dry-run", Some(json!({"model_ref": "fast", "prompt": prompt})));
    assert_eq!(status, 200, "{dry}");
    let argv: Vec<&str> = dry["argv"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(argv[0], "codex");
    assert_eq!(argv.last(), Some(&"-"), "codex reads its prompt from stdin");
    assert_eq!(dry["stdin"], json!(prompt));
    assert!(argv.windows(2).any(|w| w == ["-m", "gpt-5.5"]), "{argv:?}");
    assert!(argv.contains(&"--ephemeral") && argv.contains(&"plugins"), "offline-safe flags: {argv:?}");
    assert_eq!(dry["env"], json!(["CODEX_HOME", "POND_AGENT_KEY"]));
    assert!(!dry.to_string().contains("sk-very-secret-value"));
    let (status, _) = admin("POST", "/v1/admin/harnesses/nope/dry-run", Some(json!({})));
    assert_eq!(status, 404);
    // The same through the CLI.
    let out = server.cli(&["admin", "harnesses", "dry-run", "codex", "--model", "fast", "--prompt", "two words"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli["stdin"], json!("two words"));
    let out = server.cli(&["admin", "models", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("gpt-5.5"));

    // Agent stages: unknown harness or model, or an empty prompt, are 422s at submit.
    let swarm = |harness: &str, model: &str, prompt: &str| {
        json!({"project_id": "acme", "definition": {"stages": [{"key": "agent", "executor": {
            "kind": "swarm", "harness": harness, "model_ref": model, "prompt": prompt}}]}})
    };
    for (body, field) in [
        (swarm("nope", "fast", "hi"), "definition.stages[0].executor.harness"),
        (swarm("codex", "slow", "hi"), "definition.stages[0].executor.model_ref"),
        (swarm("codex", "fast", " "), "definition.stages[0].executor.prompt"),
    ] {
        let (status, e) = admin("POST", "/v1/runs", Some(body));
        assert_eq!((status, e["error"]["field"].as_str()), (422, Some(field)), "{e}");
    }
    // A valid one is queued for a pool worker that has the harness installed.
    let (status, run) = admin("POST", "/v1/runs", Some(swarm("codex", "fast", "hi")));
    assert_eq!(status, 201, "{run}");
    assert_eq!(run["stages"][0]["requirements"]["capabilities"], json!(["harness.codex"]));

    // The model's key belongs to project acme: another project may not use the model.
    let mut other = swarm("codex", "fast", "hi");
    other["project_id"] = json!("globex");
    let (status, e) = admin("POST", "/v1/runs", Some(other));
    assert_eq!((status, e["error"]["field"].as_str()), (422, Some("definition.stages[0].executor.model_ref")), "{e}");
    assert!(e.to_string().contains("may not be used by project `globex`"), "{e}");
    // A credential without projects is refused.
    let (status, e) =
        admin("POST", "/v1/admin/credentials", Some(json!({"name": "x", "provider": "openai", "value": "v"})));
    assert_eq!(status, 422, "{e}");

    // Consumers may not touch the registry.
    let key = server.admin().create_key(&["acme".into()], None).unwrap();
    let (status, _) = call(&server, key.token.as_deref().unwrap(), "GET", "/v1/admin/models", None);
    assert_eq!(status, 403);
}

#[test]
fn a_missing_or_hanging_agent_cli_fails_the_stage_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let t = server.token.clone();
    let admin = |method: &str, path: &str, body: Option<Value>| call(&server, &t, method, path, body);
    for (key, argv) in [
        ("missing", json!(["/nonexistent/agent-cli", "{prompt}"])),
        ("hangs", json!(["sh", "-c", "sleep 600", "{prompt}"])),
    ] {
        let (status, e) = admin(
            "POST",
            "/v1/admin/harnesses",
            Some(json!({"key": key, "capability": "harness.x",
            "command_template": argv})),
        );
        assert_eq!(status, 201, "{e}");
    }
    let submit = |harness: &str| {
        let body = json!({"project_id": "acme", "definition": {"stages": [{"key": "agent", "timeout": "1s",
            "executor": {"kind": "swarm", "placement": "local", "harness": harness, "prompt": "hello"}}]}});
        server.admin().submit(&body, None).unwrap().id.to_string()
    };
    let missing = common::wait_done(&server.admin(), &submit("missing"), std::time::Duration::from_secs(30));
    let error = missing.stages[0].error.clone().unwrap_or_default();
    assert_eq!(missing.state.as_str(), "failed");
    assert!(
        error.contains("/nonexistent/agent-cli"),
        "{error} {:?}",
        common::log_text(&server.admin(), &missing.id.to_string())
    );
    let hangs = common::wait_done(&server.admin(), &submit("hangs"), std::time::Duration::from_secs(30));
    let error = hangs.stages[0].error.clone().unwrap_or_default();
    assert_eq!(hangs.state.as_str(), "failed");
    assert!(error.contains("timed out after 1s"), "{error}");
}

#[test]
fn the_agent_sees_only_the_dummy_key_and_results_decrypt_for_the_consumer() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--model-origin", "http://127.0.0.1:9"]);
    let t = server.token.clone();
    let admin = |method: &str, path: &str, body: Option<Value>| call(&server, &t, method, path, body);
    let real = "sk-real-never-in-the-agent-77";
    admin(
        "POST",
        "/v1/admin/credentials",
        Some(json!({"name": "openai", "provider": "openai", "value": real, "projects": ["acme"]})),
    );
    admin(
        "POST",
        "/v1/admin/models",
        Some(json!({"key": "fast", "provider": "openai", "model_id": "m",
        "credential_name": "openai", "capability": "harness.x", "base_url": "http://127.0.0.1:9"})),
    );
    // An "agent" that shows everything it was given: its environment and every file in its home.
    let script = "env; find \"$HOME\" -type f -exec cat {} +; printf '```result\\n{\"ok\": true}\\n```\\n'";
    let (status, e) = admin(
        "POST",
        "/v1/admin/harnesses",
        Some(json!({"key": "snoop", "capability": "harness.x",
        "command_template": ["sh", "-c", script, "{prompt}"],
        "env": {"OPENAI_BASE_URL": "{broker_url}", "OPENAI_API_KEY": "{dummy_key}", "AGENT_HOME": "{home}"}})),
    );
    assert_eq!(status, 201, "{e}");
    // A confidential run: the CLI encrypts to the context key by default.
    let workflow = dir.path().join("agent.json");
    std::fs::write(
        &workflow,
        json!({"stages": [{"key": "snoop", "executor": {"kind": "swarm", "placement": "local",
        "harness": "snoop", "model_ref": "fast", "prompt": "show me"}},
        {"key": "again", "executor": {"kind": "swarm", "placement": "local",
        "harness": "snoop", "model_ref": "fast", "prompt": "show me again"}}]})
        .to_string(),
    )
    .unwrap();
    let out = server.cli(&["run", "submit", "-f", workflow.to_str().unwrap(), "--project", "acme", "--wait"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("OPENAI_API_KEY=pond-task-"), "the agent got the per-task dummy key: {text}");
    assert!(text.contains("OPENAI_BASE_URL=http://127.0.0.1:"), "{text}");
    assert!(!text.contains(real), "the real key reached the agent: {text}");
    let id = server.admin().list_runs(Some("acme"), None, Some(1), None).unwrap().runs[0].id.to_string();
    // Two agent stages, results of each in definition order: per stage, then one stage's alone.
    let out = server.cli(&["run", "results", &id]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "{\"result\":{\"ok\":true},\"stage\":\"snoop\"}\n{\"result\":{\"ok\":true},\"stage\":\"again\"}",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = server.cli(&["run", "results", &id, "--stage", "snoop"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"ok":true}"#,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn foreach_fans_an_agent_stage_out_over_an_earlier_stage_s_items() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let t = server.token.clone();
    let admin = |method: &str, path: &str, body: Option<Value>| call(&server, &t, method, path, body);
    // An "agent" that answers each item with a result block holding it.
    let (status, e) = admin(
        "POST",
        "/v1/admin/harnesses",
        Some(json!({"key": "echo", "capability": "harness.echo",
        "command_template": ["sh", "-c", "printf '```result\\n%s\\n```\\n' \"$1\"", "agent", "{prompt}"]})),
    );
    assert_eq!(status, 201, "{e}");
    let bundle = server
        .admin()
        .upload_bundle("acme", &pond_exec::pack_dir(&common::root().join("examples/repo")).unwrap())
        .unwrap();
    let body = |encrypt: bool| {
        let mut b = json!({"project_id": "acme",
        "sources": [{"label": "repo", "kind": "bundle", "config": {"bundle_id": bundle.bundle_id}}],
        "definition": {"stages": [
            {"key": "map", "executor": {"kind": "builtin", "name": "repo_map"}},
            {"key": "review", "executor": {"kind": "swarm", "placement": "local", "harness": "echo", "prompt": "{item}",
                "foreach": {"artifact": "areas.jsonl", "max_concurrency": 2}}}
        ]}});
        if encrypt {
            let key = base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                pond_core::keys::x25519_public(&[5; 32]),
            );
            b["encrypt"] = json!(true);
            b["recipient_pubkeys"] = json!([key]);
            common::sign_request(&mut b, &[5; 32]);
        }
        b
    };
    let id = server.admin().submit(&body(false), None).unwrap().id.to_string();
    let done = common::wait_done(&server.admin(), &id, std::time::Duration::from_secs(60));
    assert_eq!(done.state.as_str(), "succeeded", "{:?}", common::log_text(&server.admin(), &id));
    let mut areas = Vec::new();
    server.admin().download_artifact(&id, "areas.jsonl", &mut areas).unwrap();
    let mut results = Vec::new();
    server.admin().download_artifact(&id, "results-review.jsonl", &mut results).unwrap();
    let areas: Vec<Value> =
        String::from_utf8(areas).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let results: Vec<Value> =
        String::from_utf8(results).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(areas.len(), 4);
    assert_eq!(results, areas, "one result per item, in item order");
    let names: Vec<String> = server.admin().artifacts(&id).unwrap().artifacts.into_iter().map(|a| a.name).collect();
    for i in 0..4 {
        assert!(names.contains(&format!("agent-review-{i}.log")), "{names:?}");
    }
    // Bad foreach specs are refused at submit; a confidential run's items cannot be read by pond.
    let mut bad = body(false);
    bad["definition"]["stages"][1]["executor"]["foreach"] = json!({"artifact": "areas.jsonl", "max_concurrency": 99});
    let (status, e) = admin("POST", "/v1/runs", Some(bad));
    assert_eq!(
        (status, e["error"]["field"].as_str()),
        (422, Some("definition.stages[1].executor.foreach.max_concurrency")),
        "{e}"
    );
    let id = server.admin().submit(&body(true), None).unwrap().id.to_string();
    let done = common::wait_done(&server.admin(), &id, std::time::Duration::from_secs(60));
    assert_eq!(done.state.as_str(), "failed");
    assert!(done.stages[1].error.clone().unwrap_or_default().contains("confidential run"), "{:?}", done.stages[1]);
}

/// Model prices are set from the CLI, shown in the listing, and checked (a negative price names
/// the field).
#[test]
fn model_prices_are_set_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::Server::start(dir.path(), &[]);
    let out = server.cli(&[
        "admin",
        "credentials",
        "add",
        "openai",
        "--provider",
        "openai",
        "--env",
        "OPENAI_API_KEY",
        "--project",
        "acme",
        "--value-env",
        "HOME",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let add = |price: &str| {
        server.cli(&[
            "admin",
            "models",
            "add",
            "fast",
            "--provider",
            "openai",
            "--model-id",
            "gpt-5.5",
            "--credential",
            "openai",
            "--capability",
            "harness.codex",
            "--input-price",
            price,
            "--output-price",
            "10",
        ])
    };
    let out = add("1.25");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed = String::from_utf8_lossy(&server.cli(&["admin", "models", "list"]).stdout).to_string();
    assert!(
        listed.contains("\"input_usd_per_mtok\": 1.25") && listed.contains("\"output_usd_per_mtok\": 10.0"),
        "{listed}"
    );
    let out = add("-1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("input_usd_per_mtok"), "{stderr}");
}
