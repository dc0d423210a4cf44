//! Helpers for end-to-end tests: a real `pond server` process on 127.0.0.1 with its own data
//! directory, killed when the test ends.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pond_http::client::Client;
use pond_http::wire::RunView;

pub const POND: &str = env!("CARGO_BIN_EXE_pond");

/// The workspace root (examples live there).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub struct Server {
    pub child: Child,
    pub url: String,
    pub data_dir: PathBuf,
    pub token: String,
    pub extra: Vec<String>,
}

impl Server {
    /// Starts `pond server` on a free port with `extra` flags.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Server::start_with_env(data_dir, extra, &[])
    }

    /// [`Server::start`] with extra environment variables.
    pub fn start_with_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut command = Command::new(POND);
        // One server key for every node of a test (nodes sharing a database need the same),
        // unless the test gives its own — an empty one: the data directory's `server.key`.
        match env.iter().find(|(k, _)| *k == "POND_SERVER_KEY") {
            None => command.env("POND_SERVER_KEY", "cG9uZC10ZXN0LXNlcnZlci1rZXktMzItYnl0ZXMhISE="),
            Some((_, "")) => command.env_remove("POND_SERVER_KEY"),
            Some(_) => &mut command,
        };
        let env: Vec<(&str, &str)> =
            env.iter().copied().filter(|(k, v)| !(*k == "POND_SERVER_KEY" && v.is_empty())).collect();
        let mut child = command
            .envs(env.iter().copied())
            .arg("server")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .args(&extra)
            .env("POND_LOG", "warn")
            // The host backend unless a test asks for `--sandbox oci` (the sandbox tests).
            .env("POND_SANDBOX", "host")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn pond server");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().expect("server printed nothing").unwrap();
        let url = first
            .strip_prefix("pond server listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {first}"))
            .to_string();
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        // Of several nodes sharing a database only the first writes the admin token.
        let token =
            std::fs::read_to_string(data_dir.join("admin.token")).map(|t| t.trim().to_string()).unwrap_or_default();
        Server { child, url, data_dir: data_dir.to_path_buf(), token, extra }
    }

    /// The test's PostgreSQL server URL, or `None` after printing why the test is skipped.
    pub fn database_server() -> Option<String> {
        match std::env::var("POND_TEST_DATABASE_URL") {
            Ok(url) if !url.is_empty() => Some(url),
            _ => {
                pond_store::missing_prerequisite(
                    "POND_TEST_DATABASE_URL is not set (a PostgreSQL server URL; .ci/run sets it)",
                );
                None
            }
        }
    }

    pub fn admin(&self) -> Client {
        Client::new(&self.url, Some(self.token.clone()))
    }

    pub fn client(&self, token: &str) -> Client {
        Client::new(&self.url, Some(token.to_string()))
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Runs the `pond` CLI against this server with the admin token.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_env(args, &[])
    }

    /// [`Server::cli`] with extra environment variables.
    pub fn cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new(POND)
            .args(args)
            .envs(env.iter().copied())
            .env("POND_SERVER", &self.url)
            .env("POND_TOKEN", &self.token)
            .env("POND_CONFIG", self.data_dir.join("cli-config.json"))
            .env_remove("POND_PROJECT")
            .current_dir(root())
            .output()
            .expect("run pond cli")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        // A server started with `--sandbox oci` keeps warm cgroups for its sandboxes; the
        // test's data directory is about to go, so they go too.
        let _ = pond_sandbox::oci::collect_garbage(&self.data_dir.join("sandbox"));
    }
}

/// Polls until the run ends (or panics after `limit`).
pub fn wait_done(client: &Client, id: &str, limit: Duration) -> RunView {
    let start = Instant::now();
    loop {
        let run = client.get_run(id).expect("get run");
        if run.state.is_terminal() {
            return run;
        }
        assert!(start.elapsed() < limit, "run {id} still {} after {limit:?}", run.state);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls until `pred` holds (or panics after `limit`).
pub fn eventually(what: &str, limit: Duration, mut pred: impl FnMut() -> bool) {
    let start = Instant::now();
    while !pred() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every log record of a run, in order.
pub fn log_records(client: &Client, id: &str) -> Vec<pond_core::store::LogLine> {
    let mut after = 0;
    let mut out = Vec::new();
    loop {
        let page = client.logs(id, after, 1000).unwrap();
        if page.lines.is_empty() {
            return out;
        }
        after = page.next_cursor;
        out.extend(page.lines);
    }
}

/// All log text of a run.
pub fn log_text(client: &Client, id: &str) -> Vec<String> {
    log_records(client, id).into_iter().map(|l| l.line.text).collect()
}

/// Whether any process on the host has `needle` in its command line.
pub fn process_running(needle: &str) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else { return false };
    entries.flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(needle))
            .unwrap_or(false)
    })
}

/// Whether a process whose argv[0] is exactly `name` runs (`exec -a name …`): unlike
/// [`process_running`], a parent whose command line merely mentions the name does not count.
pub fn process_named(name: &str) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else { return false };
    entries.flatten().any(|e| {
        std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c.split(|&b| b == 0).next() == Some(name.as_bytes()))
    })
}

/// A throwaway database on the test's PostgreSQL server.
pub fn scratch_database(server: &str, prefix: &str) -> pond_store::ScratchDatabase {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(pond_store::ScratchDatabase::create(server, prefix)).expect("create a scratch database")
}

pub fn run_json(def: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"project_id": "acme", "definition": def})
}

/// Spawns `pond <args>` and returns it with its first stdout line (the rest is drained).
fn spawn_reporting(args: &[String], env: &[(&str, &str)]) -> (Child, String) {
    spawn_reporting_as(args, env, None)
}

/// Spawns pond (as user `uid` when given) and reads its first line.
fn spawn_reporting_as(args: &[String], env: &[(&str, &str)], uid: Option<u32>) -> (Child, String) {
    let mut cmd = Command::new(POND);
    if let Some(uid) = uid {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(uid);
    }
    cmd.args(args).env("POND_LOG", "warn").env("POND_SANDBOX", "host").stdout(Stdio::piped()).stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn pond");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let first = match lines.next() {
        Some(Ok(line)) => line,
        _ => {
            let status = child.wait().ok();
            panic!("pond {args:?} printed nothing (exit {status:?})");
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, first)
}

/// A `pond orchestrator` process.
pub struct Orchestrator {
    pub child: Child,
    pub url: String,
    pub state_dir: PathBuf,
    pub server: String,
}

impl Orchestrator {
    /// Starts an orchestrator for `server` on `listen` (e.g. `127.0.0.1:0`), enrolling with
    /// `code` when given.
    pub fn start(server: &str, state_dir: &Path, listen: &str, code: Option<&str>) -> Orchestrator {
        Orchestrator::start_with(server, state_dir, listen, code, &[])
    }

    /// [`Orchestrator::start`] with extra environment variables.
    pub fn start_with(
        server: &str,
        state_dir: &Path,
        listen: &str,
        code: Option<&str>,
        env: &[(&str, &str)],
    ) -> Orchestrator {
        let mut args: Vec<String> = ["orchestrator", "--server", server, "--listen", listen, "--state-dir"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(state_dir.display().to_string());
        if let Some(code) = code {
            args.extend(["--enroll".to_string(), code.to_string()]);
        }
        let (child, first) = spawn_reporting(&args, env);
        let url = first
            .strip_prefix("pond orchestrator listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {first}"))
            .to_string();
        Orchestrator { child, url, state_dir: state_dir.to_path_buf(), server: server.to_string() }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills it and starts it again on the same address with the saved credential.
    pub fn restart(&mut self) {
        self.kill9();
        let listen = self.url.trim_start_matches("http://").to_string();
        let again = Orchestrator::start(&self.server, &self.state_dir, &listen, None);
        drop(std::mem::replace(self, again));
    }
}

impl Drop for Orchestrator {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A `pond worker` process.
pub struct Worker {
    pub child: Child,
    pub id: String,
    pub key_dir: PathBuf,
}

impl Worker {
    /// Starts a worker through `orchestrator`, enrolling with `code`, with extra flags.
    pub fn start(orchestrator: &str, key_dir: &Path, code: &str, extra: &[&str]) -> Worker {
        Worker::start_as(orchestrator, key_dir, code, extra, None)
    }

    /// [`Worker::start`] as user `uid` (root only).
    pub fn start_as(orchestrator: &str, key_dir: &Path, code: &str, extra: &[&str], uid: Option<u32>) -> Worker {
        let mut args: Vec<String> = vec![
            "worker".into(),
            "--orchestrator".into(),
            orchestrator.into(),
            "--key-dir".into(),
            key_dir.display().to_string(),
            "--enroll".into(),
            code.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let (child, first) = spawn_reporting_as(&args, &[], uid);
        let id = first
            .strip_prefix("pond worker ")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line: {first}"))
            .to_string();
        Worker { child, id, key_dir: key_dir.to_path_buf() }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill9();
        let _ = pond_sandbox::oci::collect_garbage(&self.key_dir.join("sandbox"));
    }
}

/// Starts `pond server` on `data_dir` with `extra` flags and `env` (the host sandbox) expecting
/// it to refuse: asserts exit code 2 and returns what it said on stderr.
pub fn refused_start(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(POND)
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .env_remove("POND_SERVER_KEY")
        .env("POND_SANDBOX", "host")
        .envs(env.iter().copied())
        .output()
        .expect("run pond server");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    stderr
}

/// Registers credential `openai` (provider openai, project acme) holding `value`, through the
/// CLI as an operator would (the value from an environment variable, never argv).
pub fn add_openai_credential(server: &Server, value: &str) {
    let out = server.cli_env(
        &[
            "admin",
            "credentials",
            "add",
            "openai",
            "--provider",
            "openai",
            "--project",
            "acme",
            "--value-env",
            "THE_KEY",
        ],
        &[("THE_KEY", value)],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Mints an enrollment code through the admin API. A worker code grants every capability
/// (`*`): tests of the capability pin mint their own with [`enroll_code_granting`].
pub fn enroll_code(admin: &Client, pool: &str, worker_tags: Option<&[&str]>, fingerprint: Option<&str>) -> String {
    let capabilities: &[&str] = if worker_tags.is_some() { &["*"] } else { &[] };
    enroll_code_granting(admin, pool, worker_tags, capabilities, fingerprint)
}

/// Mints an enrollment code granting exactly `capabilities` (patterns) to its worker.
pub fn enroll_code_granting(
    admin: &Client,
    pool: &str,
    worker_tags: Option<&[&str]>,
    capabilities: &[&str],
    fingerprint: Option<&str>,
) -> String {
    let request = pond_http::pool_wire::CreateCode {
        pool: pool.into(),
        role: Some(if worker_tags.is_some() { "worker" } else { "orchestrator" }.into()),
        tags: worker_tags.unwrap_or_default().iter().map(|t| t.to_string()).collect(),
        capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
        fingerprint: fingerprint.map(str::to_string),
        ttl: None,
        uses: None,
    };
    admin.create_enroll_code(&request).expect("create an enrollment code").code
}

/// Signs a confidential run request (`consumer_signature`) as the consumer whose X25519 secret
/// is `secret`, as the CLI does with its context's key.
pub fn sign_request(body: &mut serde_json::Value, secret: &[u8; 32]) {
    use pond_core::signed_request::{consumer_signing_seed, signed_fields, SignedRequest};
    let project = body["project_id"].as_str().unwrap_or_default().to_string();
    body["nonce"] = serde_json::Value::String(hex::encode(pond_core::seal::random_bytes::<16>()));
    let signed = SignedRequest::sign(&consumer_signing_seed(secret), &signed_fields(body, &project));
    body["consumer_signature"] = serde_json::to_value(signed.consumer_signature()).unwrap();
}

/// Runs one SQL statement on the PostgreSQL database at `url` with `psql`, as someone holding
/// the database would.
pub fn psql(url: &str, statement: &str) {
    let out =
        std::process::Command::new("psql").args([url, "-v", "ON_ERROR_STOP=1", "-c", statement]).output().unwrap();
    assert!(out.status.success(), "psql: {}", String::from_utf8_lossy(&out.stderr));
}

/// The run id in the CLI's `submitted run <id> (…)` line.
pub fn submitted_id(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    text.lines()
        .find_map(|l| l.strip_prefix("submitted run "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no `submitted run` line in: {text}"))
        .to_string()
}
