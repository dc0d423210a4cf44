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
