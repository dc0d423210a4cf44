//! The Kubernetes manifests as an operator meets them: every overlay renders with
//! `kubectl kustomize` (Debian's kubernetes-client) and validates against the Kubernetes 1.32
//! schemas (`kubernetes-validate --strict`, PyPI); and what they promise holds in the rendered
//! objects — probes on /readyz and /healthz, grace periods that cover the drains, disruption
//! budgets, every Secret key a container reads present, non-root except the sandbox's worker.

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// The overlay rendered, as JSON objects (through the test's Python, which has PyYAML with
/// kubernetes-validate), after `kubernetes-validate --strict` passed on it.
fn render(python: &str, overlay: &str, dir: &Path) -> Vec<Value> {
    let out = Command::new("kubectl")
        .args(["kustomize", &common::root().join("deploy/k8s/overlays").join(overlay).display().to_string()])
        .output()
        .expect("run kubectl (Debian kubernetes-client; .ci/run installs it)");
    assert!(out.status.success(), "{overlay}: {}", String::from_utf8_lossy(&out.stderr));
    let file = dir.join(format!("{overlay}.yaml"));
    std::fs::write(&file, &out.stdout).unwrap();
    let validate = Path::new(python).with_file_name("kubernetes-validate");
    let checked = Command::new(&validate)
        .args(["--strict", "--kubernetes-version", "1.32.0", "--quiet"])
        .arg(&file)
        .output()
        .expect("run kubernetes-validate (.ci/run installs it in its venv)");
    assert!(
        checked.status.success(),
        "{overlay} does not validate:\n{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let json = Command::new(python)
        .args(["-c", "import sys, json, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(json.status.success(), "{}", String::from_utf8_lossy(&json.stderr));
    serde_json::from_slice(&json.stdout).unwrap()
}

fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn container(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]["containers"][0]
}

fn args(workload: &Value) -> Vec<String> {
    container(workload)["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect()
}

/// The seconds after `flag` in the args (`--drain 30s`).
fn seconds_after(args: &[String], flag: &str) -> u64 {
    let at = args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args[at + 1].trim_end_matches('s').parse().unwrap()
}

#[test]
fn every_overlay_renders_validates_and_keeps_its_promises() {
    let Some(python) = std::env::var("POND_TEST_PYTHON").ok().filter(|p| !p.is_empty()) else {
        pond_store::missing_prerequisite(
            "POND_TEST_PYTHON is not set (a venv with kubernetes-validate; .ci/run sets it)",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for overlay in ["production", "agents", "sandbox"] {
        let objects = render(&python, overlay, dir.path());
        let server = object(&objects, "Deployment", "pond-server");
        let orchestrator = object(&objects, "StatefulSet", "pond-orchestrator");
        let worker = object(&objects, "StatefulSet", "pond-worker");
        assert!(objects.iter().all(|o| o["metadata"]["namespace"] == "pond" || o["kind"] == "Namespace"), "{overlay}");
        assert_eq!(server["spec"]["replicas"], 3, "{overlay}: several API nodes on one PostgreSQL");
        assert_eq!(server["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0, "{overlay}");

        // Probes: readiness on /readyz, liveness on /healthz, on the port the server listens on.
        let c = container(server);
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{overlay}");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{overlay}");
        let env = |c: &Value, name: &str| -> Value {
            c["env"].as_array().unwrap().iter().find(|e| e["name"] == name).cloned().unwrap_or(Value::Null)
        };
        assert_eq!(env(c, "POND_LISTEN")["value"], "0.0.0.0:8420");
        assert_eq!(c["ports"][0]["containerPort"], 8420);
        assert_eq!(container(orchestrator)["readinessProbe"]["httpGet"]["path"], "/healthz");

        // Grace periods cover the drain plus the kill grace, so a rolling update hands work back
        // instead of killing it.
        for workload in [server, worker] {
            let a = args(workload);
            let grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64().unwrap();
            assert!(
                grace > seconds_after(&a, "--drain") + seconds_after(&a, "--kill-grace"),
                "{overlay}: grace {grace} s for {a:?}"
            );
        }

        // Disruption budgets for the servers and the workers; requests on every container.
        assert_eq!(object(&objects, "PodDisruptionBudget", "pond-server")["spec"]["minAvailable"], 1);
        assert_eq!(object(&objects, "PodDisruptionBudget", "pond-worker")["spec"]["maxUnavailable"], 1);
        for workload in [server, orchestrator, worker] {
            assert!(container(workload)["resources"]["requests"]["cpu"].is_string(), "{overlay}");
            assert!(container(workload)["resources"]["requests"]["memory"].is_string(), "{overlay}");
        }

        // Every Secret key a container reads is in the Secret.
        let secret = object(&objects, "Secret", "pond");
        for workload in [server, orchestrator, worker] {
            for e in container(workload)["env"].as_array().unwrap() {
                if let Some(key) = e["valueFrom"]["secretKeyRef"]["key"].as_str() {
                    assert_eq!(e["valueFrom"]["secretKeyRef"]["name"], "pond");
                    assert!(secret["data"][key].is_string(), "{overlay}: the Secret has no `{key}`");
                }
            }
        }

        // Non-root, no capabilities — except the sandbox overlay's worker, which is root and
        // privileged and runs the OCI sandbox.
        for workload in [server, orchestrator] {
            assert_eq!(workload["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"], true, "{overlay}");
            assert_eq!(container(workload)["securityContext"]["capabilities"]["drop"][0], "ALL", "{overlay}");
        }
        let worker_args = args(worker);
        if overlay == "sandbox" {
            assert_eq!(container(worker)["securityContext"]["privileged"], true);
            assert!(worker_args.windows(2).any(|w| w == ["--sandbox", "oci"]), "{worker_args:?}");
        } else {
            assert_eq!(worker["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"], true);
            assert!(!worker_args.contains(&"--sandbox".to_string()));
        }
        let image = container(worker)["image"].as_str().unwrap();
        if overlay == "production" {
            assert_eq!(image, "localhost/pond-worker:dev");
        } else {
            assert_eq!(image, "localhost/pond-worker-agents:dev");
            assert!(worker_args.windows(2).any(|w| w == ["--capabilities", "harness.codex,harness.claude"]));
            assert_eq!(
                container(orchestrator)["image"],
                "localhost/pond-worker:dev",
                "the orchestrator needs no agents"
            );
        }
    }
}

/// `podman …` in a mount namespace of its own without the cgroup2 `unified` mount (crun refuses
/// the hybrid layout of hosts like these; elsewhere the unmount does nothing).
fn podman(args: &[&str]) -> std::process::Output {
    Command::new("unshare")
        .args(["-m", "sh", "-c", "umount /sys/fs/cgroup/unified 2>/dev/null; exec podman \"$@\"", "sh"])
        .args(args)
        .output()
        .expect("run podman")
}

/// Containers of one test, removed when it ends.
struct Containers(Vec<String>);

impl Containers {
    fn run(&mut self, name: &str, image: &str, env: &[(&str, &str)], args: &[&str]) {
        let name = format!("pond-e2e-{}-{name}", std::process::id());
        let mut all: Vec<String> = ["run", "-d", "--name", &name, "--network", "host"].map(String::from).to_vec();
        // Limits below this host's own (crun may not raise them here).
        all.extend(["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"].map(String::from));
        for (k, v) in env {
            all.extend(["-e".to_string(), format!("{k}={v}")]);
        }
        all.push(image.to_string());
        all.extend(args.iter().map(|a| a.to_string()));
        let out = podman(&all.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.status.success(), "podman run {name}: {}", String::from_utf8_lossy(&out.stderr));
        self.0.push(name);
    }

    fn kill(&self, name: &str) {
        let name = format!("pond-e2e-{}-{name}", std::process::id());
        assert!(podman(&["kill", &name]).status.success());
    }

    fn logs(&self) -> String {
        self.0.iter().map(|n| format!("--- {n}\n{}", String::from_utf8_lossy(&podman(&["logs", n]).stderr))).collect()
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = podman(&["rm", "-f", name]);
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_ready(url: &str, containers: &Containers) {
    let started = std::time::Instant::now();
    while ureq::get(&format!("{url}/readyz")).call().is_err() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "{url} never got ready:\n{}",
            containers.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A fake OpenAI Responses API that reads each request and answers one short message.
async fn fake_model() -> String {
    async fn answer(_request: axum::body::Bytes) -> axum::response::Response {
        let mut body = String::new();
        for event in [
            serde_json::json!({"type": "response.created", "response": {"id": "r"}}),
            serde_json::json!({"type": "response.output_item.done", "output_index": 0, "item": {"type": "message",
                "id": "m", "role": "assistant", "status": "completed", "content": [{"type": "output_text",
                "text": "Done.\n```result\n{\"ran\": \"in the image\"}\n```", "annotations": []}]}}),
            serde_json::json!({"type": "response.completed", "response": {"id": "r",
                "usage": {"input_tokens": 10, "output_tokens": 2, "total_tokens": 12}}}),
        ] {
            body.push_str(&format!("event: {}\ndata: {event}\n\n", event["type"].as_str().unwrap()));
        }
        axum::response::Response::builder().header("content-type", "text/event-stream").body(body.into()).unwrap()
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, axum::Router::new().fallback(answer)).await });
    format!("http://{addr}")
}

/// The images as a deployment, with podman: two server containers on the host's PostgreSQL, an
/// orchestrator container and a worker container of the agents image. A pooled shell run and a
/// pooled codex run (codex of the image, against a local fake model) succeed with verified
/// attestations; one server container is killed while runs are under way on it, and every run
/// still succeeds on the other.
#[test]
fn the_images_run_pond_as_a_deployment_and_a_killed_server_loses_nothing() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || Command::new("podman").arg("--version").output().is_err() {
        pond_store::missing_prerequisite("the image test needs root and podman (.ci/run installs it)");
        return;
    }
    let Some(database) = common::Server::database_server() else { return };
    // The images, with this build's binaries on the cached Debian bases.
    let bin = Path::new(common::POND).parent().unwrap();
    let built = Command::new("bash")
        .arg(common::root().join("deploy/images/build.sh"))
        .env("POND_IMAGE_TAG", "e2e")
        .env("POND_IMAGE_BIN_DIR", bin)
        .output()
        .unwrap();
    assert!(built.status.success(), "build.sh: {}", String::from_utf8_lossy(&built.stderr));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let scratch = rt.block_on(pond_store::ScratchDatabase::create(&database, "images")).unwrap();
    let upstream = rt.block_on(fake_model());
    let token = format!("pond_admin_{}", "e2e0".repeat(16));
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let (s1, s2) = (format!("http://127.0.0.1:{p1}"), format!("http://127.0.0.1:{p2}"));
    let mut containers = Containers(Vec::new());
    for (name, port) in [("s1", p1), ("s2", p2)] {
        let listen = format!("127.0.0.1:{port}");
        containers.run(
            name,
            "localhost/pond-server:e2e",
            &[
                ("POND_LISTEN", &listen),
                ("POND_NODE_ID", name),
                ("POND_DATABASE_URL", &scratch.url),
                ("POND_SERVER_KEY", "cG9uZC10ZXN0LXNlcnZlci1rZXktMzItYnl0ZXMhISE="),
                ("POND_ADMIN_TOKEN", &token),
                ("POND_LEASE", "3s"),
            ],
            &["server", "--model-origin", &upstream],
        );
    }
    wait_ready(&s1, &containers);
    wait_ready(&s2, &containers);
    let admin = pond_http::client::Client::new(&s1, Some(token.clone()));
    let harness = pond_core::agents::presets().into_iter().find(|h| h.key == "codex").unwrap();
    for (path, body) in [
        (
            "/v1/admin/credentials",
            serde_json::json!({"name": "openai", "provider": "openai", "value": "sk-e2e-real-key", "projects": ["acme"]}),
        ),
        (
            "/v1/admin/models",
            serde_json::json!({"key": "fast", "provider": "openai", "model_id": "gpt-5.5",
            "credential_name": "openai", "capability": "harness.codex", "base_url": upstream}),
        ),
        ("/v1/admin/harnesses", serde_json::to_value(&harness).unwrap()),
    ] {
        admin.admin_json("POST", path, Some(body)).unwrap();
    }
    let orch_code = common::enroll_code_granting(&admin, "k8s", None, &[], None);
    let worker_code = common::enroll_code_granting(&admin, "k8s", Some(&[]), &["harness.*"], None);
    let orch_listen = format!("127.0.0.1:{p3}");
    containers.run(
        "orch",
        "localhost/pond-worker:e2e",
        &[("POND_ENROLL_CODE", &orch_code), ("POND_ORCH_LISTEN", &orch_listen)],
        &["orchestrator", "--server", &s2],
    );
    containers.run(
        "worker",
        "localhost/pond-worker-agents:e2e",
        &[("POND_ENROLL_CODE", &worker_code)],
        &["worker", "--orchestrator", &format!("http://{orch_listen}"), "--capabilities", "harness.codex"],
    );

    // A pooled shell run and a pooled codex run, both on the worker container.
    let shell = admin
        .submit(
            &serde_json::json!({"project_id": "acme", "definition": {"stages": [{"key": "hello", "executor": {
                "kind": "shell", "placement": "pool", "argv": ["sh", "-c", "echo ran as $(id -u); git --version"],
                "sandbox": {"tier": "any"}}}]}}),
            None,
        )
        .unwrap();
    let agent = admin
        .submit(
            &serde_json::json!({"project_id": "acme", "definition": {"stages": [{"key": "agent", "timeout": "2m",
                "executor": {"kind": "swarm", "placement": "pool", "harness": "codex", "model_ref": "fast",
                "prompt": "Say done.", "sandbox": {"tier": "any"}}}]}}),
            None,
        )
        .unwrap();
    for run in [&shell, &agent] {
        let id = run.id.to_string();
        let done = common::wait_done(&admin, &id, std::time::Duration::from_secs(120));
        let logs = common::log_text(&admin, &id);
        assert_eq!(done.state.as_str(), "succeeded", "{logs:#?}\n{}", containers.logs());
        assert_eq!(done.stages[0].attestation_verified, Some(true), "{logs:#?}");
    }
    let logs = common::log_text(&admin, &shell.id.to_string());
    assert!(logs.iter().any(|l| l == "ran as 10001"), "the worker image runs unprivileged: {logs:#?}");
    let mut results = Vec::new();
    admin.download_artifact(&agent.id.to_string(), "results-agent.jsonl", &mut results).unwrap();
    assert_eq!(String::from_utf8(results).unwrap().trim(), r#"{"ran":"in the image"}"#);

    // Runs under way, then s1 is killed: each one still succeeds, on s2.
    let ids: Vec<String> = (0..6)
        .map(|i| {
            let body = serde_json::json!({"project_id": "acme", "definition": {"stages": [
                {"key": "a", "executor": {"kind": "noop", "delay": "1s"}},
                {"key": "b", "executor": {"kind": "noop", "delay": "1s"}}]}});
            admin.submit(&body, Some(&format!("kill-{i}"))).unwrap().id.to_string()
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(700));
    containers.kill("s1");
    let survivor = pond_http::client::Client::new(&s2, Some(token));
    for id in &ids {
        let done = common::wait_done(&survivor, id, std::time::Duration::from_secs(90));
        assert_eq!(done.state.as_str(), "succeeded", "{id}: {:#?}", common::log_text(&survivor, id));
        let states: Vec<(&str, &str)> = done.stages.iter().map(|s| (s.key.as_str(), s.state.as_str())).collect();
        assert!(
            states.iter().all(|(_, s)| *s == "succeeded"),
            "{id}: {states:?} {:#?}",
            common::log_text(&survivor, id)
        );
    }
}
