//! The OCI sandbox, end to end: a real `pond server --sandbox oci` runs shell stages in each
//! profile; escape probes run as the attacker inside; limits are reported as such; a worker
//! without the backend never runs confined work; a killed helper's sandbox is cleaned up.
//! These tests need root (namespaces, mounts, cgroups); `.ci/run` runs the suite as root.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::path::Path;
use std::time::Duration;

use common::{log_text, wait_done, Server, POND};
use pond_core::run::RunState;
use pond_http::wire::RunView;
use pond_sandbox::oci::{leftovers, HelperSpec};
use serde_json::{json, Value};

/// Whether this test can run: the OCI sandbox needs root (namespaces, mounts, cgroups).
/// Says plainly when it skips; CI runs as root and skips nothing.
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        pond_store::missing_prerequisite(
            "the OCI sandbox tests need root (namespaces, mounts, cgroups); .ci/run runs as root",
        );
    }
    root
}

/// The host's own address on its network (not loopback).
fn lan_ip() -> String {
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    socket.connect("192.0.2.254:9").or_else(|_| socket.connect("203.0.113.1:9")).unwrap();
    socket.local_addr().unwrap().ip().to_string()
}

/// A tiny HTTP server on every address of the host: answers 200 `lan-ok`.
fn lan_service() -> String {
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let mut buf = [0u8; 4096];
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nlan-ok");
        }
    });
    format!("{}:{port}", lan_ip())
}

struct Probes {
    dir: tempfile::TempDir,
    server: Server,
    secret_file: std::path::PathBuf,
    secret: String,
    marker: String,
    lan: String,
    checkout: std::path::PathBuf,
}

impl Drop for Probes {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.secret_file);
    }
}

/// A server with the OCI backend, a secret under /root, a marker in the server's environment
/// (as a model key would be) and an HTTP service on the host's network address, allowed
/// through the egress proxy when `allow_lan`.
fn probe_server(allow_lan: bool) -> Probes {
    let dir = tempfile::tempdir().unwrap();
    let secret = format!("secret-{}", std::process::id());
    let secret_file = Path::new("/root").join(format!(".pond-probe-{}-{}", std::process::id(), allow_lan));
    std::fs::write(&secret_file, &secret).unwrap();
    let marker = format!("sk-real-model-key-{}", std::process::id());
    let lan = lan_service();
    let checkout = dir.path().join("src");
    std::fs::create_dir_all(&checkout).unwrap();
    std::fs::copy(common::root().join("testdata/sandbox/probes.sh"), checkout.join("probes.sh")).unwrap();
    let data = dir.path().join("data");
    let mut extra = vec!["--sandbox", "oci", "--allow-local-source"];
    let root = dir.path().to_str().unwrap().to_string();
    extra.push(&root);
    if allow_lan {
        extra.extend(["--egress-allow", lan.as_str()]);
    }
    let server = server_with_env(&data, &extra, &[("OPENAI_API_KEY", &marker)]);
    Probes { dir, server, secret_file, secret, marker, lan, checkout }
}

fn server_with_env(data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
    // Server::start with a few more environment variables for the server process.
    for (k, v) in env {
        std::env::set_var(k, v);
    }
    let server = Server::start(data, extra);
    for (k, _) in env {
        std::env::remove_var(k);
    }
    server
}

impl Probes {
    /// Runs the probes under `profile`; returns each door's state and the run.
    fn run(&self, profile: &str, outside: &Path) -> (BTreeMap<String, String>, RunView, Vec<String>) {
        let port = self.server.url.rsplit(':').next().unwrap().to_string();
        let env = json!({
            "PROBE_SECRET_FILE": self.secret_file, "PROBE_SECRET": self.secret,
            "PROBE_KEY_FILE": self.server.data_dir.join("admin.token"),
            "PROBE_MARKER": self.marker, "PROBE_HOST_PORT": port, "PROBE_LAN": self.lan,
            "PROBE_OUTSIDE": outside,
        });
        let body = json!({"project_id": "acme",
            "sources": [{"kind": "local", "config": {"path": self.checkout}}],
            "definition": {"stages": [{"key": "probe", "timeout": "2m", "executor": {"kind": "shell",
                "argv": ["bash", "probes.sh"], "env": env,
                "sandbox": {"profile": profile, "limits": {"pids": 64}}}}]}});
        let admin = self.server.admin();
        let run = admin.submit(&body, None).expect("submit the probes");
        let run = wait_done(&admin, &run.id.to_string(), Duration::from_secs(120));
        let lines = log_text(&admin, &run.id.to_string());
        let doors = lines
            .iter()
            .filter_map(|l| l.strip_prefix("door "))
            .filter_map(|l| l.split_once(' '))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        (doors, run, lines)
    }
}

const DOORS: &[&str] = &[
    "read_root",
    "read_key_file",
    "host_environ",
    "write_system",
    "host_loopback",
    "lan_direct",
    "lan_http",
    "dns",
    "unshare_user",
    "vsock",
    "packet_socket",
    "mount",
    "ptrace",
    "fork_bomb",
];

#[test]
fn escape_probes_find_every_door_shut_in_confined_profiles_and_open_in_none() {
    if !is_root() {
        return;
    }
    let probes = probe_server(false);
    let outside = |name: &str| probes.dir.path().join(format!("outside-{name}"));

    // `none`: the probes can succeed, so a shut door below is the sandbox's doing.
    let (open, run, lines) = probes.run("none", &outside("none"));
    assert_eq!(run.state, RunState::Succeeded, "{lines:?}");
    for door in DOORS {
        assert_eq!(open.get(*door).map(String::as_str), Some("open"), "door {door} under none: {lines:?}");
    }
    assert!(outside("none").exists(), "none writes outside its workspace");

    for profile in ["untrusted-code-read", "untrusted-code-write"] {
        let (doors, run, lines) = probes.run(profile, &outside(profile));
        assert_eq!(run.state, RunState::Succeeded, "{profile}: {lines:?}");
        for door in DOORS {
            assert_eq!(doors.get(*door).map(String::as_str), Some("shut"), "door {door} under {profile}: {lines:?}");
        }
        assert!(!outside(profile).exists(), "{profile} wrote outside its workspace");
        let forks: u32 = lines.iter().find_map(|l| l.strip_prefix("forks ")).unwrap().parse().unwrap();
        assert!(forks < 64, "{profile}: the pids limit of 64 let {forks} forks through");
    }
}

#[test]
fn the_egress_proxy_lets_through_only_the_allowlist_and_logs_refusals() {
    if !is_root() {
        return;
    }
    let probes = probe_server(true);
    // The LAN service is on the allowlist: reachable through the proxy under -write only,
    // and never directly.
    let (doors, _, lines) = probes.run("untrusted-code-write", &probes.dir.path().join("o1"));
    assert_eq!(doors.get("lan_http").map(String::as_str), Some("open"), "{lines:?}");
    assert_eq!(doors.get("lan_direct").map(String::as_str), Some("shut"), "{lines:?}");
    let (doors, _, lines) = probes.run("untrusted-code-read", &probes.dir.path().join("o2"));
    assert_eq!(doors.get("lan_http").map(String::as_str), Some("shut"), "{lines:?}");

    // A host not on the allowlist: refused by the proxy, and the refusal is in the run's log.
    let body = json!({"project_id": "acme", "definition": {"stages": [{"key": "fetch", "executor": {"kind": "shell",
        "argv": ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "http://example.invalid/"],
        "sandbox": {"profile": "untrusted-code-write"}}}]}});
    let admin = probes.server.admin();
    let run = admin.submit(&body, None).unwrap();
    let run = wait_done(&admin, &run.id.to_string(), Duration::from_secs(60));
    let lines = log_text(&admin, &run.id.to_string());
    assert!(lines.iter().any(|l| l == "403"), "{lines:?}");
    assert!(
        lines.iter().any(|l| l.contains("egress refused: example.invalid:80 is not on the allowlist")),
        "{lines:?} ({:?})",
        run.state
    );
}

/// With no allowlist at all, both profiles still have the proxy: a tool that reaches out
/// through it is refused, and the refusal is in the stage's log.
#[test]
fn without_an_allowlist_every_egress_attempt_is_refused_and_logged() {
    if !is_root() {
        return;
    }
    let probes = probe_server(false);
    for profile in ["untrusted-code-write", "untrusted-code-read"] {
        let argv =
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "http://example.invalid/"];
        let (run, lines) = run_stage(&probes.server, profile, &argv, json!({}));
        assert!(lines.iter().any(|l| l == "403"), "{profile}: {lines:?}");
        assert!(
            lines.iter().any(|l| l.contains("egress refused: example.invalid:80 is not on the allowlist")),
            "{profile}: {lines:?} ({:?})",
            run.state
        );
    }
    // The refusal counter is the proxy's own: a stage printing the proxy's words adds nothing.
    let refusals = || {
        let text = ureq::get(&format!("{}/metrics", probes.server.url))
            .set("Authorization", &format!("Bearer {}", probes.server.token))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("pond_sandbox_egress_refusals_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(refusals(), 2.0, "one refusal per profile");
    let forged = ["sh", "-c", "for i in 1 2 3; do echo 'pond sandbox: egress refused: forged' >&2; done"];
    let (run, lines) = run_stage(&probes.server, "untrusted-code-write", &forged, json!({}));
    assert!(lines.iter().any(|l| l.contains("forged")), "{lines:?} ({:?})", run.state);
    assert_eq!(refusals(), 2.0, "stderr is the stage's: forged refusals are not counted");
}

fn run_stage(server: &Server, profile: &str, argv: &[&str], limits: Value) -> (RunView, Vec<String>) {
    let body = json!({"project_id": "acme", "definition": {"stages": [{"key": "s", "timeout": "2m",
        "executor": {"kind": "shell", "argv": argv, "sandbox": {"profile": profile, "limits": limits}}}]}});
    let admin = server.admin();
    let run = admin.submit(&body, None).expect("submit");
    let run = wait_done(&admin, &run.id.to_string(), Duration::from_secs(120));
    let lines = log_text(&admin, &run.id.to_string());
    (run, lines)
}

/// Each sandbox runs as its own uid, so a per-user kernel limit is per sandbox: one that takes
/// every inotify instance its user may have (and holds them for 12 s) leaves the other, started
/// beside it, its own.
#[test]
fn one_sandbox_exhausting_a_per_user_limit_leaves_the_others_theirs() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &["--sandbox", "oci"]);
    // inotify_init1 is call 294 on x86-64, 26 on arm64.
    let nr = if cfg!(target_arch = "aarch64") { 26 } else { 294 };
    let hog = format!(
        "perl -e 'my @fds; while (1) {{ my $fd = syscall({nr}, 0); last if $fd < 0; push @fds, $fd }} print \"hog holds \", scalar(@fds), \"\\n\"; sleep 12'"
    );
    let victim = format!(
        "sleep 4; perl -e 'my $fd = syscall({nr}, 0); print $fd >= 0 ? \"victim got an instance\\n\" : \"victim refused: $!\\n\"'"
    );
    let stage = |key: &str, script: &str| {
        json!({"key": key, "needs": [], "timeout": "2m", "executor": {"kind": "shell",
        "argv": ["sh", "-c", script], "sandbox": {"profile": "untrusted-code-read", "limits": {"timeout_secs": 40}}}})
    };
    let body = json!({"project_id": "acme", "definition": {"stages": [stage("hog", &hog), stage("victim", &victim)]}});
    let admin = server.admin();
    let run = admin.submit(&body, None).unwrap();
    let run = wait_done(&admin, &run.id.to_string(), Duration::from_secs(120));
    let lines = log_text(&admin, &run.id.to_string());
    assert_eq!(run.state, RunState::Succeeded, "{lines:?}");
    let limit = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances").unwrap();
    assert!(lines.iter().any(|l| l.contains(&format!("hog holds {}", limit.trim()))), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("victim got an instance")), "{lines:?}");
}

#[test]
fn limits_are_enforced_and_an_oom_kill_or_timeout_is_reported_as_such() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server =
        Server::start(&dir.path().join("data"), &["--sandbox", "oci", "--sandbox-ceilings", "memory_mib=1024"]);
    let hog = ["perl", "-e", "my $x = 'a' x (200 * 1024 * 1024); print qq(allocated\\n)"];

    let (run, lines) = run_stage(&server, "untrusted-code-write", &hog, json!({"memory_mib": 128}));
    assert_eq!(run.state, RunState::Failed, "{lines:?}");
    assert_eq!(
        run.stages[0].error.as_deref(),
        Some("out of memory: killed at the sandbox's 128 MiB memory limit"),
        "{lines:?}"
    );
    // The same program with room succeeds, and so it does unconfined: the limit killed it.
    let (run, lines) = run_stage(&server, "untrusted-code-write", &hog, json!({"memory_mib": 768}));
    assert_eq!(run.state, RunState::Succeeded, "{lines:?}");
    let (run, lines) = run_stage(&server, "none", &hog, json!({}));
    assert_eq!(run.state, RunState::Succeeded, "{lines:?}");

    // CPU: a 2 s busy loop at a quarter of a core gets at most ~0.5 s of CPU (2 s unconfined).
    let busy =
        ["perl", "-e", "my $t = time; 1 while time - $t < 2; my @t = times; printf qq(cpu %.2f\\n), $t[0] + $t[1]"];
    let (run, lines) = run_stage(&server, "untrusted-code-write", &busy, json!({"cpus": 0.25}));
    assert_eq!(run.state, RunState::Succeeded, "{lines:?}");
    let cpu: f64 = lines.iter().find_map(|l| l.strip_prefix("cpu ")).unwrap().parse().unwrap();
    assert!(cpu < 1.2, "a 0.25-core quota let the loop use {cpu} s of CPU in 2 s");

    let (run, _) = run_stage(&server, "untrusted-code-read", &["sleep", "60"], json!({"timeout_secs": 2}));
    assert_eq!(run.stages[0].error.as_deref(), Some("timed out: killed after the sandbox's 2 s wall-clock limit"));

    // Filling the disk stops at the sandbox's size; the host's disk is not touched.
    let fill = ["sh", "-c", "dd if=/dev/zero of=fill bs=1M count=64 2>&1"];
    let (run, lines) = run_stage(&server, "untrusted-code-write", &fill, json!({"disk_mib": 16}));
    assert_eq!(run.state, RunState::Failed, "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("No space left on device")), "{lines:?}");
    let (run, lines) = run_stage(&server, "none", &fill, json!({}));
    assert_eq!(run.state, RunState::Succeeded, "unconfined, the same write fits: {lines:?}");

    // Above the operator's ceiling: refused with the field named, never silently lowered.
    let (run, _) = run_stage(&server, "untrusted-code-write", &["true"], json!({"memory_mib": 4096}));
    assert_eq!(
        run.stages[0].error.as_deref(),
        Some("sandbox.limits.memory_mib: 4096 is above this host's ceiling of 1024")
    );
    // A malformed limit is refused at submit.
    let body = json!({"project_id": "acme", "definition": {"stages": [{"key": "s", "executor": {"kind": "shell",
        "argv": ["true"], "sandbox": {"profile": "untrusted-code-write", "limits": {"pids": 0}}}}]}});
    let err = server.admin().submit(&body, None).unwrap_err().to_string();
    assert!(err.contains("definition.stages[0].executor.sandbox.limits.pids: must be at least 1"), "{err}");
}

#[test]
fn the_checkout_is_read_only_or_a_throwaway_copy_and_outputs_come_back() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let checkout = dir.path().join("src");
    std::fs::create_dir_all(&checkout).unwrap();
    std::fs::write(checkout.join("README"), "original\n").unwrap();
    let root = dir.path().to_str().unwrap();
    let server = Server::start(&dir.path().join("data"), &["--sandbox", "oci", "--allow-local-source", root]);
    let script = "echo changed > README; cat README; id -un; echo result > \"$POND_OUTPUT_DIR/out.txt\"";
    let body = |profile: &str| {
        json!({"project_id": "acme", "sources": [{"kind": "local", "config": {"path": checkout}}],
            "definition": {"stages": [{"key": "s", "executor": {"kind": "shell", "argv": ["sh", "-c", script],
                "sandbox": {"profile": profile}}}]}})
    };
    let admin = server.admin();
    let run = admin.submit(&body("untrusted-code-write"), None).unwrap();
    let run = wait_done(&admin, &run.id.to_string(), Duration::from_secs(60));
    let lines = log_text(&admin, &run.id.to_string());
    assert_eq!(run.state, RunState::Succeeded, "{lines:?}");
    assert!(lines.contains(&"changed".to_string()) && lines.contains(&"sandbox".to_string()), "{lines:?}");
    let mut out = Vec::new();
    admin.download_artifact(&run.id.to_string(), "out.txt", &mut out).unwrap();
    assert_eq!(out, b"result\n");

    let run = admin.submit(&body("untrusted-code-read"), None).unwrap();
    let run = wait_done(&admin, &run.id.to_string(), Duration::from_secs(60));
    let lines = log_text(&admin, &run.id.to_string());
    assert!(lines.iter().any(|l| l.contains("Read-only file system")), "{lines:?}");
    assert_eq!(std::fs::read_to_string(checkout.join("README")).unwrap(), "original\n");
}

/// A worker or server that is pid 1 (a container's init) starts sandboxes: the helper checks
/// its parent against the pid the spec names, not against "anyone but init".
#[test]
fn pond_as_pid_1_starts_sandboxes() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child", "--", POND, "sandbox", "check", "--sandbox", "oci"])
        .arg("--sandbox-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pond as pid 1: {stderr}");
    assert!(!stderr.contains("is gone"), "{stderr}");
}

#[test]
fn a_killed_helper_s_sandbox_is_cleaned_up_at_the_next_start_and_runs_leave_nothing() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let check = |state: &Path| {
        let out =
            std::process::Command::new(POND).args(["sandbox", "check", "--sandbox-dir"]).arg(state).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    check(&state);

    // A sandbox whose helper is killed -9 while its command runs.
    let scratch = dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let marker = format!("pond-orphan-{}", std::process::id());
    let command = format!("echo secret > /tmp/left-by-the-dead && exec -a {marker} sleep 600");
    let spec = HelperSpec::plain("orphan", &state, &["bash", "-c", &command], scratch.join("report.json"));
    std::fs::write(scratch.join("spec.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
    let mut helper =
        std::process::Command::new(POND).args(["sandbox", "run"]).arg(scratch.join("spec.json")).spawn().unwrap();
    common::eventually("the sandboxed process", Duration::from_secs(30), || common::process_running(&marker));
    // While its helper lives the sandbox is not garbage: collection (`pond sandbox gc`, another
    // process starting on the same directory) refuses and kills nothing.
    let gc = std::process::Command::new(POND).args(["sandbox", "gc", "--dir"]).arg(&state).output().unwrap();
    assert!(!gc.status.success(), "gc beside a live sandbox must refuse");
    assert!(String::from_utf8_lossy(&gc.stderr).contains("are running"), "{}", String::from_utf8_lossy(&gc.stderr));
    check(&state);
    std::thread::sleep(Duration::from_millis(300));
    assert!(common::process_running(&marker), "the live sandbox was killed");
    assert_eq!(helper.try_wait().unwrap(), None, "the live helper was killed");
    helper.kill().unwrap();
    helper.wait().unwrap();
    // The container dies with its helper (its init has the parent-death signal); what the
    // helper could not remove (the bundle's tmpfs, its directory) stays for the next start.
    let killed = std::time::Instant::now();
    common::eventually("the container's end", Duration::from_secs(5), || !common::process_running(&marker));
    eprintln!("the container was gone {:?} after its helper was killed", killed.elapsed());
    common::eventually("empty cgroups", Duration::from_secs(5), || no_process_in_slots(&state));
    assert!(!leftovers(&state).is_empty());

    // The next sandbox on the directory takes the dead one's slot (no garbage collection: a
    // helper does none): it sees nothing the dead one wrote, and leaves nothing of either.
    let spec = HelperSpec::plain(
        "after",
        &state,
        &["sh", "-c", "test ! -e /tmp/left-by-the-dead && echo clean"],
        scratch.join("after.json"),
    );
    std::fs::write(scratch.join("after-spec.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
    let out = std::process::Command::new(POND)
        .args(["sandbox", "run"])
        .arg(scratch.join("after-spec.json"))
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&std::fs::read(scratch.join("after.json")).unwrap()).unwrap();
    assert!(out.status.success(), "{report} {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(report["exit_code"], 0, "the next sandbox saw the dead one's files: {report}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "clean");
    assert_eq!(leftovers(&state), Vec::<String>::new());

    // A start (the self-check collects garbage first) removes it all.
    check(&state);
    assert!(!common::process_running(&marker), "the orphaned sandbox still runs");
    assert_eq!(leftovers(&state), Vec::<String>::new());
    pond_sandbox::oci::collect_garbage(&state).unwrap();
}

/// Whether every cgroup of the state directory's sandboxes is empty.
fn no_process_in_slots(state: &Path) -> bool {
    leftovers(state).iter().all(|l| !l.starts_with("cgroup "))
}

/// kill -9 of the node running a confined stage: the sandbox's processes are gone at once (the
/// helper watches its parent; the container's init dies with the helper), so the stage's
/// wall-clock limit never needs a living helper to hold.
#[test]
fn a_confined_stage_dies_with_its_node() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start(&data, &["--sandbox", "oci"]);
    let marker = format!("pond-node-death-{}", std::process::id());
    let body = json!({"project_id": "acme", "definition": {"stages": [{"key": "s", "executor": {"kind": "shell",
        "argv": ["bash", "-c", format!("exec -a {marker} sleep 600")],
        "sandbox": {"profile": "untrusted-code-read", "limits": {"timeout_secs": 3600}}}}]}});
    server.admin().submit(&body, None).unwrap();
    common::eventually("the sandboxed process", Duration::from_secs(30), || common::process_running(&marker));
    server.kill9();
    let killed = std::time::Instant::now();
    common::eventually("the sandbox's end", Duration::from_secs(5), || !common::process_running(&marker));
    eprintln!("the sandboxed process was gone {:?} after its server was killed", killed.elapsed());
    common::eventually("empty cgroups", Duration::from_secs(5), || no_process_in_slots(&data.join("sandbox")));
}

#[test]
fn a_thousand_sandboxes_leave_no_containers_cgroups_mounts_or_processes() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let runs = 1000;
    let mut failures = 0;
    for i in 0..runs {
        let scratch = dir.path().join("scratch");
        std::fs::create_dir_all(&scratch).unwrap();
        let spec = HelperSpec::plain(&format!("n{i}"), &state, &["/bin/true"], scratch.join("report.json"));
        std::fs::write(scratch.join("spec.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
        let status =
            std::process::Command::new(POND).args(["sandbox", "run"]).arg(scratch.join("spec.json")).status().unwrap();
        let report: Value = serde_json::from_slice(&std::fs::read(scratch.join("report.json")).unwrap()).unwrap();
        if !status.success() || report["exit_code"] != 0 {
            failures += 1;
            eprintln!("run {i}: {report}");
        }
        std::fs::remove_dir_all(&scratch).unwrap();
    }
    assert_eq!(failures, 0);
    assert_eq!(leftovers(&state), Vec::<String>::new());
    // One at a time: one warm cgroup slot, reused by every run.
    assert_eq!(pond_sandbox::oci::warm_slots(&state), 1);
    pond_sandbox::oci::collect_garbage(&state).unwrap();
    assert_eq!(pond_sandbox::oci::warm_slots(&state), 0);
}

#[test]
fn a_confined_pooled_stage_waits_for_a_worker_whose_sandbox_passed_its_self_check() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &[]);
    let admin = server.admin();
    let code = common::enroll_code(&admin, "p", None, None);
    let orch = common::Orchestrator::start(&server.url, &dir.path().join("orch"), "127.0.0.1:0", Some(&code));

    // Claiming a capability the host cannot back is refused outright.
    let code = common::enroll_code(&admin, "p", Some(&["pool:trusted"]), None);
    let out = std::process::Command::new(POND)
        .args([
            "worker",
            "--orchestrator",
            &orch.url,
            "--enroll",
            &code,
            "--sandbox",
            "host",
            "--capabilities",
            "sandbox.oci",
        ])
        .arg("--key-dir")
        .arg(dir.path().join("liar"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no OCI sandbox"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A trusted worker without the backend never takes the confined stage (confined profiles
    // default to the trusted tier).
    let code = common::enroll_code(&admin, "p", Some(&["pool:trusted"]), None);
    let _host = common::Worker::start(&orch.url, &dir.path().join("host"), &code, &["--sandbox", "host"]);
    // The stage also tries the worker's signing key: a confined job must not read it.
    let key_file = dir.path().join("oci/signing.key");
    let script =
        format!("id -un; if cat {} >/dev/null 2>&1; then echo key-read; else echo key-shut; fi", key_file.display());
    let body = json!({"project_id": "acme", "definition": {"stages": [{"key": "s", "executor": {"kind": "shell",
        "placement": "pool", "argv": ["sh", "-c", script], "sandbox": {"profile": "untrusted-code-write"}}}]}});
    let run = admin.submit(&body, None).unwrap();
    let id = run.id.to_string();
    std::thread::sleep(Duration::from_secs(2));
    assert!(!admin.get_run(&id).unwrap().state.is_terminal(), "the stage waits");
    assert!(admin.get_run(&id).unwrap().stages[0].attempts.is_empty(), "no worker took it");

    // One whose self-check passes advertises sandbox.oci and runs it confined.
    let code = common::enroll_code(&admin, "p", Some(&["pool:trusted"]), None);
    let oci = common::Worker::start(&orch.url, &dir.path().join("oci"), &code, &["--sandbox", "oci"]);
    let done = wait_done(&admin, &id, Duration::from_secs(60));
    let lines = log_text(&admin, &id);
    assert_eq!(done.state, RunState::Succeeded, "{lines:?}");
    assert_eq!(done.stages[0].attempts.last().unwrap().owner, oci.id);
    assert!(lines.contains(&"sandbox".to_string()), "ran as the sandbox's user: {lines:?}");
    assert!(key_file.exists() && lines.contains(&"key-shut".to_string()), "{lines:?}");
}

#[test]
fn a_cancelled_confined_stage_is_killed_and_its_sandbox_removed() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--sandbox", "oci"]);
    let marker = format!("pond-cancel-{}", std::process::id());
    let body = json!({"project_id": "acme", "definition": {"stages": [{"key": "s", "executor": {"kind": "shell",
        "argv": ["bash", "-c", format!("exec -a {marker} sleep 600")], "sandbox": {"profile": "untrusted-code-write"}}}]}});
    let admin = server.admin();
    let id = admin.submit(&body, None).unwrap().id.to_string();
    common::eventually("the sandboxed process", Duration::from_secs(30), || common::process_running(&marker));
    admin.cancel(&id).unwrap();
    let done = wait_done(&admin, &id, Duration::from_secs(30));
    assert_eq!(done.state, RunState::Cancelled);
    common::eventually("the sandbox's removal", Duration::from_secs(15), || {
        !common::process_running(&marker) && leftovers(&data.join("sandbox")).is_empty()
    });
}

#[test]
fn a_server_on_a_relative_data_directory_runs_confined_stages() {
    if !is_root() {
        return;
    }
    // The quickstart's way: `pond server` in a directory, data in ./.pond.
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(POND)
        .args(["server", "--listen", "127.0.0.1:0", "--sandbox", "oci"])
        .current_dir(dir.path())
        .env("POND_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut first).unwrap();
    let url = first.trim().strip_prefix("pond server listening on ").unwrap().to_string();
    let token = std::fs::read_to_string(dir.path().join(".pond/admin.token")).unwrap();
    let admin = pond_http::client::Client::new(&url, Some(token.trim().to_string()));
    let body = json!({"project_id": "acme", "definition": {"stages": [{"key": "s", "executor": {"kind": "shell",
        "argv": ["sh", "-c", "echo made > \"$POND_OUTPUT_DIR/out.txt\""], "sandbox": {"profile": "untrusted-code-write"}}}]}});
    let id = admin.submit(&body, None).unwrap().id.to_string();
    let done = wait_done(&admin, &id, Duration::from_secs(60));
    let lines = log_text(&admin, &id);
    let mut out = Vec::new();
    let downloaded = admin.download_artifact(&id, "out.txt", &mut out);
    let _ = child.kill();
    let _ = child.wait();
    let _ = pond_sandbox::oci::collect_garbage(&dir.path().join(".pond/sandbox"));
    assert_eq!(done.state, RunState::Succeeded, "{lines:?}");
    downloaded.unwrap();
    assert_eq!(out, b"made\n");
    // The data directory is private even though the sandbox's state was made in it first.
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir.path().join(".pond")).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");
}

/// The helper mounts, unmounts and runs bundles under the state directory as root: one another
/// user could write in (a shared temporary directory, a loose mode) is refused by the backend
/// and by `pond sandbox gc`, naming why; `pond sandbox check` without a directory makes a
/// private one of its own (a name someone else took first is passed over).
#[test]
fn a_state_directory_others_could_write_in_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out =
        std::process::Command::new(POND).args(["sandbox", "check", "--sandbox-dir"]).arg(&state).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("writable by other users"), "{stderr}");
    let out = std::process::Command::new(POND).args(["sandbox", "gc", "--dir"]).arg(&state).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("writable by other users"), "{stderr}");
    // Another owner.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&state, Some(65534), None).unwrap();
    let out =
        std::process::Command::new(POND).args(["sandbox", "check", "--sandbox-dir"]).arg(&state).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("belongs to uid 65534"), "{stderr}");

    // The throwaway directory of a bare `pond sandbox check` cannot be planted: a link to a
    // directory of this test's takes the first name it tries (the shell's pid is pond's after
    // `exec`); it is passed over.
    let out = std::process::Command::new("sh")
        .args(["-c", "ln -s \"$1\" \"$TMPDIR/pond-sandbox-check-$$-0\" && exec \"$2\" sandbox check", "sh"])
        .arg(&state)
        .arg(POND)
        .env("TMPDIR", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let planted: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with("-0") && e.path().is_symlink())
        .collect();
    assert_eq!(planted.len(), 1, "the link was planted");
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0, "nothing was made in the planted directory");
}
