//! The `pond` binary: argument parsing and wiring only. Every command calls a library
//! function (`pond_http::server`, `pond_http::cli`, `pond_http::bench`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// `println!` that does not panic when stdout is closed (`pond server | head -1`, a reader that
/// went away): what cannot be written is dropped and the command goes on.
macro_rules! say {
    () => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout());
    }};
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `print!` likewise.
macro_rules! say_part {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

mod doctor;
mod settings;
mod usage;
mod webhooks;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use pond_http::cli::{self, CliConfig, Context, SubmitOptions, TargetOverrides};
use pond_http::client::Client;

#[derive(Parser)]
#[command(
    name = "pond",
    version,
    about = "Pond: a control plane and engine for running AI coding agents on code, safely"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// Server URL (default: the current context, else http://127.0.0.1:8420).
    #[arg(long, global = true, env = "POND_SERVER")]
    server: Option<String>,
    /// API token (default: the current context, else ./.pond/admin.token).
    #[arg(long, global = true, env = "POND_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Use this context instead of the current one.
    #[arg(long, global = true, env = "POND_CONTEXT")]
    context: Option<String>,
    /// CLI configuration file (default: ~/.config/pond/config.json).
    #[arg(long, global = true, env = "POND_CONFIG")]
    config: Option<PathBuf>,
    /// Log lines on stderr: `text` (colours only on a terminal) or `json` (one object per line).
    /// What is logged: `POND_LOG` (e.g. `info`, `warn,pond_access=info`).
    #[arg(long, global = true, env = "POND_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Settings for `server`, `orchestrator` and `worker` from a TOML file (a `[server]`,
    /// `[orchestrator]` or `[worker]` table of their long flags); flags and environment
    /// variables win over it.
    #[arg(long, global = true, env = "POND_CONFIG_FILE")]
    config_file: Option<PathBuf>,
    /// Also trust the certificate authorities in this PEM file for HTTPS (the system's and the
    /// bundled public ones are always trusted); default: the context's `--ca-cert`.
    #[arg(long, global = true, env = "POND_CA_CERT", value_name = "FILE")]
    ca_cert: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane: HTTP API, engine and local executors, on SQLite or PostgreSQL.
    Server(ServerArgs),
    /// Submit runs and read their status, logs and artifacts.
    Run {
        #[command(subcommand)]
        command: RunCommand,
    },
    /// Administer the server (API keys).
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Manage named server + token pairs.
    Context {
        #[command(subcommand)]
        command: ContextCommand,
    },
    /// Start a throwaway server and run the bundled example workflow on the bundled example repository.
    Demo(DemoArgs),
    /// Measure submit throughput and end-to-end run throughput; prints figures.
    Bench(BenchArgs),
    /// This CLI context's encryption key (X25519): shown, its path, or a new one.
    Keys {
        #[command(subcommand)]
        command: KeysCliCommand,
    },
    /// Run a pool's orchestrator: it polls pond (--server) for its workers and serves them.
    Orchestrator(OrchestratorArgs),
    /// Run a pool worker: takes jobs from its orchestrator, runs them, signs the results.
    Worker(WorkerArgs),
    /// Worker pools: list orchestrators and workers, drain a worker.
    Pool {
        #[command(subcommand)]
        command: PoolCommand,
    },
    /// The OCI sandbox: check that this host can enforce the confined profiles.
    Sandbox {
        #[command(subcommand)]
        command: SandboxCommand,
    },
    /// Check a run end to end as its consumer, trusting the server for nothing: the transparency
    /// log's signed tree head and its consistency with the last one this CLI saw, the run's
    /// signed request (your key) and attestations in the log, every stream and artifact signed
    /// and in place.
    Verify {
        /// The run id.
        id: String,
        /// Print the checks as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Back up a SQLite server's data directory while it runs: the database (a consistent copy)
    /// and the keys beside it (`server.key` seals what is at rest), into a new directory.
    /// Restore by starting `pond server --data-dir` on it. (PostgreSQL: `pg_dump` the database
    /// and keep the server key.)
    Backup {
        /// The server's data directory.
        #[arg(long, env = "POND_DATA_DIR", default_value = ".pond")]
        data_dir: PathBuf,
        /// Where the backup goes (must not exist).
        #[arg(long)]
        to: PathBuf,
    },
    /// What agent stages spent on model calls: a project's per day and model (with its monthly
    /// budget), or one run's per stage attempt.
    Usage(usage::UsageArgs),
    /// Run and stage state changes of your projects, in commit order: followed live (resuming
    /// where it left off after a dropped connection), or a page with --no-follow.
    Events(webhooks::EventsArgs),
    /// Webhooks: a project's events POSTed to your URL, signed (Standard Webhooks), retried for
    /// over a day, with a delivery log.
    Webhooks {
        #[command(subcommand)]
        command: webhooks::WebhooksCommand,
    },
    /// Check this CLI's set-up against its server (reachable, version, clock, token, keys, the
    /// transparency log) and, with --data-dir or --sandbox, this host's; each failure names its
    /// fix. Exits 1 when a check fails.
    Doctor {
        /// Also check a server's or worker's data directory on this host (private, writable,
        /// free space).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Also run the OCI sandbox's self-check here (needs root).
        #[arg(long)]
        sandbox: bool,
        /// Print the checks as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print shell completions (`pond completions bash > /etc/bash_completion.d/pond`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write man pages (pond.1 and one per command) into a directory.
    Man {
        /// Where to write them.
        #[arg(long, default_value = "man")]
        dir: PathBuf,
    },
    /// Print the OpenAPI 3.1 document of `pond server`'s HTTP API (docs/openapi.json), or with
    /// --orchestrator the one of the routes `pond orchestrator` serves its workers.
    Openapi {
        /// The orchestrator's document (docs/openapi-orchestrator.json).
        #[arg(long)]
        orchestrator: bool,
    },
    /// Print this worker's key fingerprints (making its keys on first use), to pin at enrollment.
    Fingerprint {
        /// Worker key directory (default: $POND_WORKER_KEY_DIR, else ~/.local/share/pond/worker).
        #[arg(long)]
        key_dir: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum SandboxCommand {
    /// Run the self-check (a probe sandbox) and print the profiles this host can enforce.
    Check {
        #[command(flatten)]
        sandbox: SandboxArgs,
    },
    /// Remove what sandboxes of a state directory left behind (containers, cgroups, mounts).
    Gc {
        /// The sandbox state directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// The helper process of one sandbox (used by pond itself).
    #[command(hide = true)]
    Run {
        /// The sandbox's spec file.
        spec: PathBuf,
    },
}

/// How stages are contained on this host.
#[derive(Args, Clone)]
struct SandboxArgs {
    /// Sandbox backend: `oci` (libcontainer; confined profiles; needs root), `host` (the
    /// `none` profile only), or `auto` (oci when its self-check passes here, else host).
    #[arg(long = "sandbox", env = "POND_SANDBOX", default_value = "auto", value_parser = ["auto", "oci", "host"])]
    backend: String,
    /// Sandbox state directory (default: `sandbox` in the data or key directory).
    #[arg(long = "sandbox-dir", env = "POND_SANDBOX_DIR")]
    dir: Option<PathBuf>,
    /// A host `untrusted-code-write` stages may reach through the egress proxy (repeatable):
    /// `registry.npmjs.org`, `*.pypi.org`, `10.0.0.5:3128`.
    #[arg(long = "egress-allow", value_name = "HOST")]
    egress_allow: Vec<String>,
    /// Limits of a stage that sets none, e.g. `memory_mib=2048,pids=512,cpus=2,timeout_secs=3600,disk_mib=2048`.
    #[arg(long = "sandbox-defaults", value_parser = parse_limits_defaults)]
    defaults: Option<pond_sandbox::oci::Limits>,
    /// The most a stage may ask for (same keys as --sandbox-defaults).
    #[arg(long = "sandbox-ceilings", value_parser = parse_limits_ceilings)]
    ceilings: Option<pond_sandbox::oci::Limits>,
}

fn parse_limits(text: &str, base: pond_sandbox::oci::Limits) -> std::result::Result<pond_sandbox::oci::Limits, String> {
    let mut limits = base;
    for pair in text.split(',').filter(|p| !p.trim().is_empty()) {
        let (key, value) = pair.split_once('=').ok_or_else(|| format!("`{pair}` is not KEY=VALUE"))?;
        let int = || {
            value
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| format!("{key}: `{value}` is not a positive integer"))
        };
        match key.trim() {
            "memory_mib" => limits.memory_mib = int()?,
            "pids" => limits.pids = int()?,
            "timeout_secs" => limits.timeout_secs = int()?,
            "disk_mib" => limits.disk_mib = int()?,
            "cpus" => {
                limits.cpus = value
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|c| c.is_finite() && *c > 0.0)
                    .ok_or_else(|| format!("cpus: `{value}` is not a positive number"))?
            }
            other => return Err(format!("unknown limit `{other}` (memory_mib, pids, cpus, timeout_secs, disk_mib)")),
        }
    }
    Ok(limits)
}

fn parse_limits_defaults(text: &str) -> std::result::Result<pond_sandbox::oci::Limits, String> {
    parse_limits(text, pond_sandbox::oci::Limits::DEFAULTS)
}

fn parse_limits_ceilings(text: &str) -> std::result::Result<pond_sandbox::oci::Limits, String> {
    parse_limits(text, pond_sandbox::oci::Limits::CEILINGS)
}

/// The sandbox backend `args` ask for, and whether it is the OCI one. `auto` falls back to
/// the host backend (saying why); `oci` fails when the self-check does.
fn sandbox_backend(
    args: &SandboxArgs,
    default_dir: PathBuf,
) -> Result<(Arc<dyn pond_core::sandbox::SandboxBackend>, bool)> {
    if args.backend == "host" {
        return Ok((Arc::new(pond_sandbox::HostBackend), false));
    }
    for (i, host) in args.egress_allow.iter().enumerate() {
        if let Err(e) = pond_sandbox::egress::Rule::parse(host) {
            bail!("--egress-allow[{i}]: {e}");
        }
    }
    let config = pond_sandbox::oci::OciConfig {
        helper: pond_sandbox::oci::helper_command(&std::env::current_exe().context("finding the pond executable")?),
        state_dir: args.dir.clone().unwrap_or(default_dir),
        defaults: args.defaults.unwrap_or(pond_sandbox::oci::Limits::DEFAULTS),
        ceilings: args.ceilings.unwrap_or(pond_sandbox::oci::Limits::CEILINGS),
        egress_allow: args.egress_allow.clone(),
    };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let result = if root {
        pond_sandbox::oci::OciBackend::new(config).map_err(|e| e.to_string())
    } else {
        Err("it needs root (mounts, namespaces, cgroups)".to_string())
    };
    match result {
        Ok(backend) => {
            eprintln!(
                "pond: OCI sandbox ready in {} (untrusted-code-read and untrusted-code-write enforced)",
                backend.config().state_dir.display()
            );
            Ok((Arc::new(backend), true))
        }
        Err(why) if args.backend == "auto" => {
            eprintln!("pond: the OCI sandbox is off ({why}); only the `none` profile runs here");
            Ok((Arc::new(pond_sandbox::HostBackend), false))
        }
        Err(why) => bail!("the OCI sandbox cannot run here: {why}"),
    }
}

#[derive(Args)]
struct ServerArgs {
    /// Address to listen on.
    #[arg(long, env = "POND_LISTEN", default_value = "127.0.0.1:8420")]
    listen: SocketAddr,
    /// Data directory (SQLite database, admin token, checkouts).
    #[arg(long, env = "POND_DATA_DIR", default_value = ".pond")]
    data_dir: PathBuf,
    #[command(flatten)]
    tls: TlsArgs,
    /// PostgreSQL URL: use PostgreSQL instead of SQLite; any number of servers may share it.
    #[arg(long, env = "POND_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Connections to PostgreSQL per server.
    #[arg(long, env = "POND_DATABASE_POOL", default_value_t = 16)]
    database_pool: u32,
    /// Lease of a running stage; a stage whose node stops renewing it is retried after this.
    #[arg(long, env = "POND_LEASE", default_value = "30s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// Stages run at once by this server.
    #[arg(long, env = "POND_SLOTS", default_value_t = 16)]
    slots: usize,
    /// Allow `local` sources under this directory (repeatable).
    #[arg(long = "allow-local-source", value_name = "DIR")]
    allow_local_sources: Vec<PathBuf>,
    /// Allow plain `http://` git remotes (test setups, private networks).
    #[arg(long)]
    allow_http_git: bool,
    /// What a pool worker's result that fails verification (signature, input, outputs) does
    /// for stages that do not say: `required` fails the stage, `record` keeps it flagged.
    #[arg(long, default_value = "required", value_parser = parse_attestation)]
    attestation: pond_core::definition::AttestationPolicy,
    /// Most bytes of output kept per stage attempt; later output is read but not kept, after a
    /// `log truncated` note.
    #[arg(long, env = "POND_MAX_LOG_BYTES", default_value_t = pond_core::engine::DEFAULT_MAX_LOG_BYTES)]
    max_log_bytes: u64,
    /// An origin (`https://llm.internal:8443`) a model's base URL may point at, besides
    /// api.openai.com and api.anthropic.com (repeatable): the broker sends the model key there.
    #[arg(long = "model-origin", value_name = "URL")]
    model_origins: Vec<String>,
    /// Most bytes all of a run's artifacts may take together; a stage storing more fails.
    #[arg(long, env = "POND_MAX_RUN_ARTIFACT_BYTES", default_value_t = pond_core::engine::DEFAULT_MAX_RUN_ARTIFACT_BYTES)]
    max_run_artifact_bytes: u64,
    /// Most bytes of uploaded bundles no run uses yet that one project may hold; an upload past
    /// it is refused (429) naming what frees room.
    #[arg(long, env = "POND_MAX_PENDING_BUNDLE_BYTES", default_value_t = pond_core::engine::DEFAULT_MAX_PENDING_BUNDLE_BYTES)]
    max_pending_bundle_bytes: u64,
    /// How long an uploaded bundle no run uses is kept before it is deleted (e.g. `1h`).
    #[arg(long, env = "POND_BUNDLE_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    bundle_ttl: Duration,
    /// Allow git remotes on loopback, private, link-local and other special-purpose addresses
    /// (test setups, private networks). Off: such remotes are refused before any connection.
    #[arg(long)]
    allow_internal_git: bool,
    /// Reserve a tag prefix for the operator, beyond `pool:` and `tenant:` (repeatable): a
    /// stage that names such a tag is refused (e.g. `site:`).
    #[arg(long = "reserved-tag-prefix", value_name = "PREFIX")]
    reserved_tag_prefixes: Vec<String>,
    /// Largest uploaded bundle and artifact, in bytes.
    #[arg(long, default_value_t = 100 * 1024 * 1024)]
    max_bundle_bytes: usize,
    /// A web origin whose pages may call the API from a browser (CORS), e.g.
    /// `https://app.example.com` (repeatable; none by default).
    #[arg(long = "cors-origin", value_name = "ORIGIN", env = "POND_CORS_ORIGINS", value_delimiter = ',')]
    cors_origins: Vec<String>,
    /// An internal address (loopback, private, link-local…) webhooks may be sent to anyway, e.g.
    /// a receiver on this host or network (repeatable; others are refused, like the egress proxy).
    #[arg(long = "webhook-allow-ip", value_name = "IP", env = "POND_WEBHOOK_ALLOW_IPS", value_delimiter = ',')]
    webhook_allow_ips: Vec<std::net::IpAddr>,
    /// How long run and stage events are kept (`/v1/events`, webhooks); at least 2 days, so a
    /// webhook's retries (about 27 h) never outlive the events they send.
    #[arg(long, default_value = "30days", value_parser = humantime::parse_duration)]
    event_retention: Duration,
    /// Delete runs that ended longer ago than this, with their logs, artifacts and blobs (e.g.
    /// `30d`; checked every tenth of it, at most every ten minutes). Default: keep them.
    #[arg(long, value_parser = humantime::parse_duration)]
    retain_finished: Option<Duration>,
    /// Pass this host environment variable to shell stages (repeatable).
    #[arg(long = "shell-env-allow", value_name = "NAME")]
    shell_env_allow: Vec<String>,
    /// Wait between SIGTERM and SIGKILL when a stage is stopped.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    kill_grace: Duration,
    /// On SIGTERM, how long running stages may finish before they are stopped and handed back.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// Name of this node in leases and attempt history (default: random).
    #[arg(long, env = "POND_NODE_ID")]
    node_id: Option<String>,
    /// The server key, base64 of 32 bytes (default: `server.key` in the data directory, made on
    /// first use). Every node sharing a PostgreSQL database needs the same one.
    #[arg(long, env = "POND_SERVER_KEY", hide_env_values = true, value_parser = parse_server_key)]
    server_key: Option<ServerKey>,
    /// A server key a rotation replaced (repeatable; the variable takes a comma-separated list):
    /// still accepted for opening while this node re-seals what it sealed under --server-key.
    #[arg(long = "previous-server-key", env = "POND_PREVIOUS_SERVER_KEYS", hide_env_values = true,
          value_delimiter = ',', value_parser = parse_server_key)]
    previous_server_keys: Vec<ServerKey>,
    /// A server key other nodes are moving to (repeatable; the variable takes a comma-separated
    /// list): accepted for opening only — the first step of rolling a rotation over several
    /// nodes (README "Operating Pond").
    #[arg(long = "next-server-key", env = "POND_NEXT_SERVER_KEYS", hide_env_values = true,
          value_delimiter = ',', value_parser = parse_server_key)]
    next_server_keys: Vec<ServerKey>,
    /// The first admin token (`pond_admin_` and at least 32 letters or digits), stored hashed
    /// while the store has no admin token; every node given the same agrees on it (one Secret
    /// for a whole deployment). Without it, the first node to start mints one into admin.token.
    #[arg(long, env = "POND_ADMIN_TOKEN", hide_env_values = true, value_parser = parse_admin_token)]
    admin_token: Option<String>,
    /// Print every setting (flags, environment, config file, defaults) as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Check this set-up (the same flags, environment and config file) without starting: one
    /// line per check with the fix of what fails; exit 1 when one does.
    #[arg(long)]
    check: bool,
    /// With --check: print the checks as JSON.
    #[arg(long, requires = "check")]
    json: bool,
    /// Encrypt a run that names recipients but does not say `encrypt` (false: only on `encrypt: true`).
    #[arg(long, env = "POND_ENCRYPTION_DEFAULT", default_value_t = true, action = clap::ArgAction::Set)]
    encryption_default: bool,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

#[derive(Subcommand)]
enum RunCommand {
    /// Submit a run from a workflow file.
    Submit {
        /// Workflow file: a definition ({"stages": …}) or a whole request body.
        #[arg(short = 'f', long)]
        file: PathBuf,
        /// Project (default: from the file, POND_PROJECT or the context).
        #[arg(long, env = "POND_PROJECT")]
        project: Option<String>,
        /// A directory (packed and uploaded) or an https git URL (repeatable).
        #[arg(long)]
        source: Vec<String>,
        /// Branch, tag or commit for git sources.
        #[arg(long = "ref")]
        git_ref: Option<String>,
        /// Retried submits with the same key return the same run.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Stream the logs until the run ends; exit 0 succeeded, 1 failed, 3 cancelled.
        #[arg(long)]
        wait: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Also encrypt to this X25519 public key (base64; repeatable).
        #[arg(long = "recipient")]
        recipients: Vec<String>,
        /// Do not encrypt (by default the run's logs and artifacts are encrypted to this
        /// context's key, `pond keys show`; POND_ENCRYPTION_DEFAULT=false turns that off).
        #[arg(long)]
        no_encrypt: bool,
    },
    /// Show a run and its stages.
    Status {
        /// Run id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List runs, newest first.
    List {
        /// Only this project.
        #[arg(long)]
        project: Option<String>,
        /// Only runs in this state (queued, running, succeeded, failed, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// Only runs whose id, idempotency key, error or definition (stage keys, names,
        /// commands) contains this text (ASCII letters in either case).
        #[arg(long)]
        text: Option<String>,
        /// Page size.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Continue after this cursor (printed at the end of a page).
        #[arg(long)]
        cursor: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a run's log.
    Logs {
        /// Run id.
        id: String,
        /// Keep streaming until the run ends.
        #[arg(long)]
        follow: bool,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a run, or every queued/running run of a project: running stages are stopped
    /// (SIGTERM, then SIGKILL), the rest cancelled.
    Cancel {
        /// Run id (or select runs with --project).
        #[arg(required_unless_present = "project", conflicts_with = "project")]
        id: Option<String>,
        /// Cancel the queued and running runs of this project.
        #[arg(long)]
        project: Option<String>,
        /// With --project: only runs in this state (queued or running).
        #[arg(long, alias = "state", requires = "project")]
        status: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a run's agent results, decrypted locally for a confidential run: one
    /// `{"stage", "result"}` line per result of every agent stage, or with --stage that stage's
    /// results alone (one JSON value per line).
    Results {
        /// Run id.
        id: String,
        /// Only this stage's results, as plain JSON values.
        #[arg(long)]
        stage: Option<String>,
        /// A results artifact a stage named itself (its `parse.artifact`), printed as plain values.
        #[arg(long, conflicts_with = "stage")]
        artifact: Option<String>,
    },
    /// List a run's artifacts, or download one.
    Artifacts {
        /// Run id.
        id: String,
        /// Artifact to download (to stdout unless -o).
        name: Option<String>,
        /// Write the artifact to this file.
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KeysCliCommand {
    /// Show the public key (base64 and age recipient) and fingerprint, making the key on first use.
    Show {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print where the private key is (back it up: results encrypted to it need it).
    Path,
    /// Make a key; replacing an existing one needs --force.
    Gen {
        /// Replace the existing key (what was encrypted to it can then no longer be read here).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// API keys for consumers, scoped to projects.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// One-time enrollment codes for orchestrators and workers.
    Enroll {
        #[command(subcommand)]
        command: EnrollCommand,
    },
    /// Models agent stages may use (`model_ref`), each bound to a registered credential.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Harnesses: how to run an agent CLI (argv template and environment); presets for codex and claude.
    Harnesses {
        #[command(subcommand)]
        command: HarnessesCommand,
    },
    /// Credentials for pooled stages: sealed at rest, never shown again, delivered sealed to
    /// the worker that claims a job.
    Credentials {
        #[command(subcommand)]
        command: CredentialsCommand,
    },
    /// Projects' monthly budgets for agent stages' model calls.
    Budgets {
        #[command(subcommand)]
        command: usage::BudgetsCommand,
    },
    /// The server key that seals what pond keeps at rest: rotate it.
    ServerKey {
        #[command(subcommand)]
        command: ServerKeyCommand,
    },
    /// Admin tokens: rotate this context's, or recover when every admin token is lost.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Replace this context's token (the same as `pond context rotate-token`).
    Rotate,
    /// Mint a new admin token straight into the database (on the server's host: it needs the
    /// data directory or the database URL) into `admin.token`, for when every admin token is lost.
    Recover {
        /// The server's data directory (SQLite's pond.db; admin.token is written here).
        #[arg(long, env = "POND_DATA_DIR", default_value = ".pond")]
        data_dir: PathBuf,
        /// PostgreSQL instead of the data directory's SQLite.
        #[arg(long, env = "POND_DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
        /// Also revoke every other admin token (a leaked one stops working).
        #[arg(long)]
        revoke_others: bool,
    },
}

#[derive(Subcommand)]
enum ServerKeyCommand {
    /// Put a new key in a data directory's `server.key`, keeping the old one in
    /// `server.key.previous`; restart the server: it opens with both, re-seals everything under
    /// the new one and then removes `server.key.previous`.
    Rotate {
        /// The server's data directory.
        #[arg(long, env = "POND_DATA_DIR", default_value = ".pond")]
        data_dir: PathBuf,
    },
    /// Print a new random key (base64) for `POND_SERVER_KEY` (PostgreSQL deployments; see
    /// README "Operating Pond").
    New,
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Register (or replace) a model.
    Add {
        /// Key stages use as `model_ref`.
        key: String,
        /// `openai` or `anthropic`.
        #[arg(long)]
        provider: String,
        /// The provider's model name.
        #[arg(long)]
        model_id: String,
        /// The registered credential that pays for it.
        #[arg(long)]
        credential: String,
        /// The capability a worker needs (e.g. `harness.codex`).
        #[arg(long)]
        capability: String,
        /// The provider's API base URL.
        #[arg(long)]
        base_url: Option<String>,
        /// Price of a million input tokens, USD (the broker reports each stage's cost with it).
        #[arg(long, value_name = "USD", allow_negative_numbers = true)]
        input_price: Option<f64>,
        /// Price of a million output tokens, USD.
        #[arg(long, value_name = "USD", allow_negative_numbers = true)]
        output_price: Option<f64>,
    },
    /// List models.
    List,
    /// Remove a model.
    Remove {
        /// Its key.
        key: String,
    },
}

#[derive(Subcommand)]
enum HarnessesCommand {
    /// Register (or replace) a harness from a JSON file `{key, capability, command_template, env}`;
    /// prints the lint's warnings.
    Add {
        /// The JSON file.
        #[arg(long)]
        file: PathBuf,
    },
    /// Register a preset (`codex` or `claude`), optionally under another key.
    FromPreset {
        /// The preset.
        preset: String,
        /// Key to save it under.
        #[arg(long)]
        key: Option<String>,
    },
    /// Show the presets.
    Presets,
    /// List harnesses.
    List,
    /// Remove a harness.
    Remove {
        /// Its key.
        key: String,
    },
    /// The exact argv and the environment variable names a task would run with (never values).
    DryRun {
        /// The harness.
        key: String,
        /// A registered model.
        #[arg(long)]
        model: Option<String>,
        /// The prompt.
        #[arg(long)]
        prompt: Option<String>,
    },
}

#[derive(Subcommand)]
enum CredentialsCommand {
    /// Register (or replace) a credential. The value is read from an environment variable, a
    /// file or standard input, never from the command line.
    Add {
        /// Name stages list in `executor.credentials`.
        name: String,
        /// Provider (`openai`, `anthropic`, …).
        #[arg(long)]
        provider: String,
        /// Environment variable it fills on the worker (default: the name in upper case).
        #[arg(long)]
        env: Option<String>,
        /// Read the value from this environment variable.
        #[arg(long, conflicts_with = "value_file")]
        value_env: Option<String>,
        /// Read the value from this file (else standard input).
        #[arg(long)]
        value_file: Option<PathBuf>,
        /// A project whose runs may use it (repeatable; `*` for any).
        #[arg(long = "project", required = true)]
        projects: Vec<String>,
    },
    /// List credentials: name, provider, variable, key fingerprint (never a value).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a credential.
    Remove {
        /// Its name.
        name: String,
    },
}

#[derive(Subcommand)]
enum EnrollCommand {
    /// Mint a code (printed once). Without --worker it enrolls an orchestrator for the pool.
    Create {
        /// The pool (e.g. `byo-acme`).
        #[arg(long)]
        pool: String,
        /// A code for one worker of the pool (relayed by its orchestrator) instead.
        #[arg(long)]
        worker: bool,
        /// Tags pinned on the worker (comma-separated, e.g. `pool:byo,tenant:acme`); workers only.
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
        /// Capabilities the worker may declare (comma-separated patterns, e.g.
        /// `harness.codex,sandbox.oci` or `harness.*`); a worker declaring others is refused.
        /// Workers only; default none.
        #[arg(long, value_delimiter = ',')]
        capabilities: Vec<String>,
        /// The worker fingerprint its keys must produce (`pond fingerprint` on the worker).
        #[arg(long)]
        fingerprint: Option<String>,
        /// How long the code stays valid.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How many hosts may enroll with it, each once (e.g. the replicas of a worker
        /// StatefulSet sharing one Secret); at most 1000.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PoolCommand {
    /// Orchestrators and workers: pool, tags, capabilities, fingerprint, last seen, current job.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a worker or an orchestrator for good (a host lost or compromised): its credential
    /// stops working at once, on every node; a job it holds runs again elsewhere. Enroll the host
    /// again with a new code to bring it back.
    Revoke {
        /// Member id or name.
        member: String,
    },
    /// Endorse the keys of a worker enrolled before endorsements existed (readers accept its
    /// signatures only then). Compare first: --fingerprint is what `pond fingerprint` prints on
    /// the worker's own host; pond refuses if the keys it holds have another.
    Endorse {
        /// Worker id or name.
        worker: String,
        /// The `worker:` fingerprint `pond fingerprint` prints on the worker's host.
        #[arg(long)]
        fingerprint: String,
    },
    /// Let a worker finish its current job and take no more (--undo: take work again).
    Drain {
        /// Worker id or name.
        worker: String,
        /// Take work again.
        #[arg(long)]
        undo: bool,
    },
}

/// HTTPS on a listener.
#[derive(Args, Clone)]
struct TlsArgs {
    /// Serve HTTPS with this certificate chain (PEM, the listener's own certificate first); a
    /// renewed file is picked up within seconds, without a restart.
    #[arg(long, env = "POND_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "POND_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl TlsArgs {
    fn files(self) -> Option<pond_http::tls::TlsFiles> {
        Some(pond_http::tls::TlsFiles { cert: self.tls_cert?, key: self.tls_key? })
    }
}

#[derive(Args)]
struct OrchestratorArgs {
    /// Enrollment code (first start only; the credential is then kept in --state-dir).
    #[arg(long, env = "POND_ENROLL_CODE", hide_env_values = true)]
    enroll: Option<String>,
    /// Address workers reach this orchestrator on.
    #[arg(long, env = "POND_ORCH_LISTEN", default_value = "127.0.0.1:8430")]
    listen: SocketAddr,
    /// Where the credential is kept.
    #[arg(long, env = "POND_ORCH_STATE_DIR", default_value = ".pond-orchestrator")]
    state_dir: PathBuf,
    #[command(flatten)]
    tls: TlsArgs,
    /// A label shown by `pond pool ls` (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Also serve Prometheus `GET /metrics` here, without a token (bind it where only the
    /// scraper reaches, e.g. 127.0.0.1:9430).
    #[arg(long, env = "POND_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Print every setting (flags, environment, config file, defaults) as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Check this set-up (the same flags, environment and config file) without starting: one
    /// line per check with the fix of what fails; exit 1 when one does.
    #[arg(long)]
    check: bool,
    /// With --check: print the checks as JSON.
    #[arg(long, requires = "check")]
    json: bool,
}

#[derive(Args)]
struct WorkerArgs {
    /// The orchestrator's URL.
    #[arg(long, env = "POND_ORCHESTRATOR")]
    orchestrator: String,
    /// Enrollment code (first start only; the credential is then kept in --key-dir).
    #[arg(long, env = "POND_ENROLL_CODE", hide_env_values = true)]
    enroll: Option<String>,
    /// Tags to enroll with (comma-separated; a subset of the code's; default: all of them).
    #[arg(long, value_delimiter = ',')]
    tags: Option<Vec<String>>,
    /// Capabilities of this host (comma-separated, e.g. `harness.codex`), declared at enrollment.
    #[arg(long, value_delimiter = ',')]
    capabilities: Vec<String>,
    /// Key and credential directory (default: $POND_WORKER_KEY_DIR, else ~/.local/share/pond/worker).
    #[arg(long)]
    key_dir: Option<PathBuf>,
    /// A label shown by `pond pool ls` (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Take one job, then exit.
    #[arg(long)]
    once: bool,
    /// On SIGTERM, how long the current job may run on before it is stopped and handed back.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// Wait between SIGTERM and SIGKILL when a job is stopped.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    kill_grace: Duration,
    /// Host environment variable to pass to shell jobs (repeatable).
    #[arg(long = "shell-env-allow")]
    shell_env_allow: Vec<String>,
    /// On a bring-your-own host (`pool:byo`), also run stages without a sandbox profile (a
    /// host process of this worker's user, which can read what that user can). Off by default.
    #[arg(long, env = "POND_ALLOW_UNCONFINED")]
    allow_unconfined: bool,
    /// Most bytes of output kept per job; later output is read but not kept, after a
    /// `log truncated` note.
    #[arg(long, env = "POND_MAX_LOG_BYTES", default_value_t = pond_core::engine::DEFAULT_MAX_LOG_BYTES)]
    max_log_bytes: u64,
    /// Also serve Prometheus `GET /metrics` here, without a token (jobs by outcome, sandboxes,
    /// egress refusals; bind it where only the scraper reaches, e.g. 127.0.0.1:9431).
    #[arg(long, env = "POND_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Print every setting (flags, environment, config file, defaults) as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Check this set-up (the same flags, environment and config file) without starting: one
    /// line per check with the fix of what fails; exit 1 when one does.
    #[arg(long)]
    check: bool,
    /// With --check: print the checks as JSON.
    #[arg(long, requires = "check")]
    json: bool,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Mint a key; its secret is printed once.
    Create {
        /// Project the key may use (repeatable).
        #[arg(long = "project", required = true)]
        projects: Vec<String>,
        /// A label.
        #[arg(long)]
        name: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List keys (never their secrets).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key.
    Revoke {
        /// Key id.
        id: String,
    },
}

#[derive(Subcommand)]
enum ContextCommand {
    /// Add or replace a context.
    Add {
        /// Context name.
        name: String,
        /// Server URL.
        #[arg(long)]
        server: String,
        /// API token.
        #[arg(long)]
        token: Option<String>,
        /// Read the token from this file.
        #[arg(long, conflicts_with = "token")]
        token_file: Option<PathBuf>,
        /// Default project.
        #[arg(long)]
        project: Option<String>,
        /// Trust the certificate authorities in this PEM file when calling the server (for a
        /// server whose certificate a private CA signed).
        #[arg(long, value_name = "FILE")]
        ca_cert: Option<PathBuf>,
        /// Make it the current context.
        #[arg(long = "use")]
        make_current: bool,
    },
    /// Make a context the current one.
    Use {
        /// Context name.
        name: String,
    },
    /// List contexts.
    List {
        /// Print JSON (tokens hidden).
        #[arg(long)]
        json: bool,
    },
    /// Remove a context.
    Remove {
        /// Context name.
        name: String,
    },
    /// Show who the current context's token is to its server: the key's id, its role, and the
    /// projects a consumer key may use.
    Whoami {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replace the current context's token with a new one (same role and projects); the old
    /// stops working at once. The new token is saved where the old was: in the context, or for
    /// `local` in the data directory's admin.token.
    RotateToken,
}

#[derive(Args)]
struct DemoArgs {
    /// Data directory of the throwaway server (cleared first if an earlier demo made it; any
    /// other non-empty directory is refused).
    #[arg(long, default_value = ".pond-demo")]
    data_dir: PathBuf,
    /// Workflow to run.
    #[arg(long, default_value = "examples/workflows/review.json")]
    workflow: PathBuf,
    /// Repository to run it on.
    #[arg(long, default_value = "examples/repo")]
    source: PathBuf,
}

#[derive(Args)]
struct BenchArgs {
    /// Runs to submit in each phase.
    #[arg(long, default_value_t = 2000)]
    runs: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Stage slots of the in-process server.
    #[arg(long, default_value_t = 64)]
    slots: usize,
    /// Data directory of the in-process server (removed first).
    #[arg(long, default_value = ".pond-bench")]
    data_dir: PathBuf,
    /// Run on PostgreSQL: a server URL; the bench creates and drops a scratch database there.
    #[arg(long, env = "POND_BENCH_DATABASE_URL")]
    database_url: Option<String>,
    /// Servers sharing the database (PostgreSQL only), clients spread over them.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Seed this many runs into the database before the servers start (written straight into
    /// the tables, project `backlog`): rates measured with a million stored or queued runs.
    #[arg(long, default_value_t = 0)]
    backlog: u64,
    /// What the seeded runs are: `finished` (stored, nothing waiting), `pooled` (queued for a
    /// pool worker; no worker takes them during the bench) or `other-pool` (queued for a worker
    /// tagged `gpu`, which no bench worker is).
    #[arg(long, default_value = "finished", value_name = "KIND")]
    backlog_kind: String,
    /// Instead: time claims with this many local, as many pooled and as many stages of another
    /// pool queued (repeatable; SQLite in --data-dir, or PostgreSQL with --database-url).
    #[arg(long = "claim-latency", value_name = "QUEUED")]
    claim_latency: Vec<u64>,
    /// Instead: the pool benchmark (server and orchestrator processes, workers over HTTP; SQLite,
    /// or --database-url): submit → worker start latency, pooled throughput (in-process worker
    /// loops, then `pond worker` processes), memory with idle long-pollers.
    #[arg(long)]
    pool: bool,
    /// Pool benchmark: workers in the latency and throughput phases.
    #[arg(long, default_value_t = 8)]
    pool_workers: usize,
    /// Pool benchmark: runs timed one at a time for the latency phase.
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// Pool benchmark: idle long-polling workers in the memory phase.
    #[arg(long, default_value_t = 1000)]
    idle_workers: usize,
    /// Instead: encryption throughput on one core (log lines sealed/s, artifact GB/s, memcpy).
    #[arg(long)]
    crypto: bool,
    /// Instead: the stress check — this many rounds of 8 runs × 8 stages printing a line every
    /// 2 ms for --stress-seconds, against a `pond server` process (SQLite, or --database-url).
    #[arg(long, value_name = "ROUNDS")]
    stress: Option<usize>,
    /// Stress check: how long each stage prints.
    #[arg(long, default_value_t = 25)]
    stress_seconds: u64,
    /// Instead: the soak check — this many mixed good and bad requests against a `pond server`
    /// process (SQLite, or --database-url), its RSS sampled every tenth, statuses counted.
    #[arg(long, value_name = "REQUESTS")]
    soak: Option<usize>,
    /// Instead: /bin/true create + start + exit in the OCI sandbox beside crun, runc and
    /// bubblewrap (those that are installed) and the fork/exec floor, --samples runs each (root).
    #[arg(long)]
    sandbox: bool,
    /// Instead: what pond adds to an agent CLI — this codex binary run raw against a local fake
    /// model, as a local agent stage and as a pooled one (pond server, orchestrator and worker
    /// processes), --samples runs each.
    #[arg(long, value_name = "CODEX")]
    agent_overhead: Option<PathBuf>,
    /// Instead: how fast state changes reach consumers — --runs noop runs while a webhook
    /// receiver and a /v1/events follower time each event from commit to arrival (SQLite, or
    /// --database-url).
    #[arg(long)]
    events: bool,
    /// Instead: what the console asks of the server — this many finished runs stored, then
    /// each run-list request it makes timed --samples times (SQLite, or --database-url); the
    /// console's file sizes beside.
    #[arg(long, value_name = "RUNS")]
    run_list: Option<usize>,
}

#[derive(Clone, Copy)]
struct ServerKey([u8; 32]);

fn parse_admin_token(text: &str) -> Result<String, String> {
    pond_http::server::check_admin_token(text).map(|()| text.to_string()).map_err(|e| format!("the admin token {e}"))
}

fn parse_server_key(text: &str) -> Result<ServerKey, String> {
    pond_core::pool::decode_key(text).map(ServerKey).map_err(|e| format!("the server key {e}"))
}

/// The process's log: `POND_LOG` says what (default: warnings, and for a server or an
/// orchestrator also its access log), `--log-format` how; colours only on a terminal.
fn init_logging(cli: &Cli) {
    use std::io::IsTerminal as _;
    let serves = matches!(cli.command, Command::Server(_) | Command::Orchestrator(_));
    let default = if serves { "warn,pond_access=info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("POND_LOG").unwrap_or_else(|_| default.into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cli.global.log_format == "json" {
        builder.json().flatten_event(true).with_current_span(false).init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

fn backup(data_dir: &Path, to: &Path) -> Result<()> {
    let db = data_dir.join("pond.db");
    if !db.is_file() {
        bail!(
            "{} has no pond.db: a server on PostgreSQL is backed up with `pg_dump` of its database, plus its server key (POND_SERVER_KEY or server.key)",
            data_dir.display()
        );
    }
    // A new directory of our own (never one that appeared meanwhile), and new files in it.
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(to)
            .with_context(|| format!("creating {} (a backup goes into a new directory)", to.display()))?;
    }
    runtime()?.block_on(pond_store::SqliteStore::backup(&db, &to.join("pond.db")))?;
    let mut copied = vec!["pond.db".to_string()];
    // A rotation under way keeps its previous keys beside server.key: what they still seal
    // opens only with them.
    for file in [
        "server.key",
        pond_http::server::PREVIOUS_KEYS_FILE,
        pond_http::server::PINNED_IDENTITY_FILE,
        "signing.ed25519",
        "admin.token",
    ] {
        let from = data_dir.join(file);
        if from.is_file() {
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut target = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(to.join(file))
                .with_context(|| format!("creating {}", to.join(file).display()))?;
            let mut source = std::fs::File::open(&from).with_context(|| format!("reading {}", from.display()))?;
            std::io::copy(&mut source, &mut target)?;
            target.sync_all()?;
            copied.push(file.to_string());
        }
    }
    std::fs::set_permissions(to.join("pond.db"), std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    say!("backed up {} into {}: {}", data_dir.display(), to.display(), copied.join(", "));
    if !copied.iter().any(|f| f == "server.key") {
        say!("no server.key here: keep the POND_SERVER_KEY this server runs with; without it the sealed credentials and keys cannot be opened");
    }
    Ok(())
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    say!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn main() {
    // The sandbox helper (`pond sandbox run SPEC`), before clap builds its whole command tree
    // (a millisecond on every sandbox's start): no logger and no threads before libcontainer
    // has forked, whose children deadlock on locks other threads hold.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.len() == 4 && args[1] == "sandbox" && args[2] == "run" {
        std::process::exit(pond_sandbox::oci::run_helper(std::path::Path::new(&args[3])));
    }
    let argv: Vec<String> = std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect();
    let (argv, from_file) = match settings::apply::<Cli>(argv) {
        Ok(applied) => applied,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    let matches = <Cli as clap::CommandFactory>::command().get_matches_from(argv);
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let printing = match &cli.command {
        Command::Server(a) => a.print_config.then_some("server"),
        Command::Orchestrator(a) => a.print_config.then_some("orchestrator"),
        Command::Worker(a) => a.print_config.then_some("worker"),
        _ => None,
    };
    if let Some(section) = printing {
        if let Some(sub) = matches.subcommand_matches(section) {
            settings::print(section, sub, &from_file);
        }
        std::process::exit(0);
    }
    init_logging(&cli);
    if let Err(e) = trust_ca(&cli) {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
    match dispatch(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Adds `--ca-cert` (else the context's) to what this process's HTTPS clients trust.
fn trust_ca(cli: &Cli) -> Result<()> {
    let from_context = || {
        // Only commands that call a server through a context read it.
        if matches!(cli.command, Command::Server(_) | Command::Worker(_) | Command::Demo(_) | Command::Bench(_)) {
            return None;
        }
        let path = cli.global.config.clone().unwrap_or_else(CliConfig::default_path);
        let config = CliConfig::load(&path).ok()?;
        let name = cli.global.context.as_ref().or(config.current.as_ref())?;
        config.contexts.get(name)?.ca_cert.clone()
    };
    let Some(path) = cli.global.ca_cert.clone().or_else(from_context) else { return Ok(()) };
    pond_http::tls::trust_also(&path).context("--ca-cert")
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn dispatch(cli: Cli) -> Result<i32> {
    let config_path = cli.global.config.clone().unwrap_or_else(CliConfig::default_path);
    match cli.command {
        Command::Server(args) if args.check => doctor::report(&doctor::server(&args)?, args.json),
        Command::Server(args) => serve(args).map(|()| 0),
        Command::Demo(args) => demo(args),
        Command::Bench(args) => bench(args).map(|()| 0),
        Command::Fingerprint { key_dir, json } => fingerprint(key_dir, json).map(|()| 0),
        Command::Orchestrator(args) => {
            // The server as for every other command: --server, else the context, else local.
            let config = CliConfig::load(&config_path)?;
            let overrides =
                TargetOverrides { server: cli.global.server, token: None, context: cli.global.context, project: None };
            let server = cli::resolve_target(&config, &overrides)?.server;
            if args.check {
                return doctor::report(&doctor::orchestrator(&server, &args), args.json);
            }
            orchestrator(server, args).map(|()| 0)
        }
        Command::Worker(args) if args.check => doctor::report(&doctor::worker(&args), args.json),
        Command::Worker(args) => worker(args),
        Command::Sandbox { command } => sandbox(command),
        Command::Pool { command } => pool(command, &admin_client(&cli.global, &config_path)?).map(|()| 0),
        Command::Admin { command: AdminCommand::Models { command } } => {
            let client = admin_client(&cli.global, &config_path)?;
            let value = match command {
                ModelsCommand::Add {
                    key,
                    provider,
                    model_id,
                    credential,
                    capability,
                    base_url,
                    input_price,
                    output_price,
                } => {
                    let body = serde_json::json!({"key": key, "provider": provider, "model_id": model_id,
                        "credential_name": credential, "capability": capability, "base_url": base_url,
                        "input_usd_per_mtok": input_price, "output_usd_per_mtok": output_price});
                    client.admin_json("POST", "/v1/admin/models", Some(body))?
                }
                ModelsCommand::List => client.admin_json("GET", "/v1/admin/models", None)?,
                ModelsCommand::Remove { key } => {
                    client.admin_json("DELETE", &format!("/v1/admin/models/{key}"), None)?
                }
            };
            if !value.is_null() {
                print_json(&value)?;
            }
            Ok(0)
        }
        Command::Admin { command: AdminCommand::Harnesses { command } } => {
            let client = admin_client(&cli.global, &config_path)?;
            let value = match command {
                HarnessesCommand::Add { file } => {
                    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
                    let body: serde_json::Value =
                        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
                    client.admin_json("POST", "/v1/admin/harnesses", Some(body))?
                }
                HarnessesCommand::FromPreset { preset, key } => client.admin_json(
                    "POST",
                    "/v1/admin/harnesses/from-preset",
                    Some(serde_json::json!({"preset": preset, "key": key})),
                )?,
                HarnessesCommand::Presets => client.admin_json("GET", "/v1/admin/harness-presets", None)?,
                HarnessesCommand::List => client.admin_json("GET", "/v1/admin/harnesses", None)?,
                HarnessesCommand::Remove { key } => {
                    client.admin_json("DELETE", &format!("/v1/admin/harnesses/{key}"), None)?
                }
                HarnessesCommand::DryRun { key, model, prompt } => client.admin_json(
                    "POST",
                    &format!("/v1/admin/harnesses/{key}/dry-run"),
                    Some(serde_json::json!({"model_ref": model, "prompt": prompt})),
                )?,
            };
            if !value.is_null() {
                print_json(&value)?;
            }
            Ok(0)
        }
        Command::Admin { command: AdminCommand::Credentials { command } } => {
            credentials(command, &admin_client(&cli.global, &config_path)?).map(|()| 0)
        }
        Command::Admin { command: AdminCommand::Enroll { command } } => {
            enroll(command, &admin_client(&cli.global, &config_path)?).map(|()| 0)
        }
        Command::Context { command } => context(command, &config_path, cli.global.server.clone()).map(|()| 0),
        Command::Keys { command } => {
            let config = CliConfig::load(&config_path)?;
            let context = cli.global.context.or(config.current);
            let path = cli::consumer_key_path(&config_path, context.as_deref());
            match command {
                KeysCliCommand::Show { json } => {
                    let key = cli::consumer_key(&path, false)?;
                    if json {
                        print_json(&key)?;
                    } else {
                        say!("public key:    {}", key.public_key);
                        say!("age recipient: {}", key.age_recipient);
                        say!("fingerprint:   {}", key.fingerprint);
                        say!("private key:   {} (0600; back it up)", key.path.display());
                    }
                }
                KeysCliCommand::Path => say!("{}", path.display()),
                KeysCliCommand::Gen { force } => {
                    if path.exists() && !force {
                        bail!("a key exists at {}; pass --force to replace it", path.display());
                    }
                    let key = cli::consumer_key(&path, true)?;
                    say!("new key {} at {}", key.fingerprint, key.path.display());
                }
            }
            Ok(0)
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            // Into a buffer first: the generator panics on a write error (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "pond", &mut script);
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
                _ => {}
            }
            Ok(0)
        }
        Command::Openapi { orchestrator } => {
            let document = if orchestrator {
                pond_http::openapi::orchestrator_document()
            } else {
                pond_http::openapi::server_document()
            };
            match std::io::Write::write_all(&mut std::io::stdout(), pond_http::openapi::to_json(document).as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
                _ => {}
            }
            Ok(0)
        }
        Command::Man { dir } => {
            use clap::CommandFactory;
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("writing man pages to {}", dir.display()))?;
            say!("man pages written to {}", dir.display());
            Ok(0)
        }
        Command::Doctor { data_dir, sandbox, json } => {
            let config = CliConfig::load(&config_path)?;
            let context = cli.global.context.clone();
            let overrides = TargetOverrides {
                server: cli.global.server,
                token: cli.global.token,
                context: cli.global.context,
                project: None,
            };
            let key_path = cli::consumer_key_path(&config_path, context.as_deref().or(config.current.as_deref()));
            let target = cli::resolve_target(&config, &overrides)?;
            let client = Client::new(&target.server, target.token.clone());
            let mut checks =
                pond_http::doctor::client_checks(&client, &target.server, target.token.is_some(), &key_path);
            checks.extend(doctor::host_checks(data_dir.as_deref(), sandbox));
            doctor::report(&checks, json)
        }
        Command::Verify { id, json } => {
            let config = CliConfig::load(&config_path)?;
            let context = cli.global.context.clone();
            let overrides = consumer_overrides(&cli.global);
            let key_path = cli::consumer_key_path(&config_path, context.as_deref().or(config.current.as_deref()));
            let target = cli::resolve_target(&config, &overrides)?;
            let client = Client::new(&target.server, target.token.clone());
            let config_dir = config_path.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
            let heads = pond_http::verify::heads_path(&config_dir);
            let verified = pond_http::verify::verify_run(&client, &target.server, &id, &key_path, &heads)?;
            if json {
                print_json(&verified)?;
            } else {
                for check in &verified.checks {
                    say!("ok  {check}");
                }
                say!("run {id} verified");
            }
            Ok(0)
        }
        Command::Backup { data_dir, to } => backup(&data_dir, &to).map(|()| 0),
        Command::Usage(args) => {
            let config = CliConfig::load(&config_path)?;
            let overrides = consumer_overrides(&cli.global);
            let target = cli::resolve_target(&config, &overrides)?;
            let client = Client::new(&target.server, target.token.clone());
            usage::usage(&client, target.project, args)
        }
        Command::Events(args) => {
            let config = CliConfig::load(&config_path)?;
            let target = cli::resolve_target(&config, &consumer_overrides(&cli.global))?;
            webhooks::events(&Client::new(&target.server, target.token.clone()), args)
        }
        Command::Webhooks { command } => {
            let config = CliConfig::load(&config_path)?;
            let target = cli::resolve_target(&config, &consumer_overrides(&cli.global))?;
            webhooks::webhooks(&Client::new(&target.server, target.token.clone()), target.project, command)
        }
        Command::Admin { command: AdminCommand::Budgets { command } } => {
            usage::budgets(&admin_client(&cli.global, &config_path)?, command)
        }
        Command::Run { command } => {
            let config = CliConfig::load(&config_path)?;
            let overrides = consumer_overrides(&cli.global);
            let key_path =
                cli::consumer_key_path(&config_path, overrides.context.as_deref().or(config.current.as_deref()));
            let target = cli::resolve_target(&config, &overrides)?;
            let client = Client::new(&target.server, target.token.clone());
            run_command(command, &client, &target, &key_path)
        }
        Command::Admin { command: AdminCommand::ServerKey { command } } => server_key(command).map(|()| 0),
        Command::Admin { command: AdminCommand::Token { command: TokenCommand::Rotate } } => {
            context(ContextCommand::RotateToken, &config_path, cli.global.server.clone()).map(|()| 0)
        }
        Command::Admin {
            command: AdminCommand::Token { command: TokenCommand::Recover { data_dir, database_url, revoke_others } },
        } => {
            let recovered = runtime()?.block_on(pond_http::server::recover_admin_token(
                &data_dir,
                database_url.as_deref(),
                revoke_others,
            ))?;
            say!("new admin token {} written to {} (mode 0600)", recovered.id, recovered.file.display());
            if revoke_others {
                say!("{} other admin token(s) revoked", recovered.revoked);
            }
            Ok(0)
        }
        Command::Admin { command: AdminCommand::Keys { command } } => {
            keys(command, &admin_client(&cli.global, &config_path)?).map(|()| 0)
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "host".into())
}

fn orchestrator(server: String, args: OrchestratorArgs) -> Result<()> {
    // Calls toward pond block a thread each (ureq); bound them so a burst of workers cannot
    // grow the process to hundreds of threads.
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(128).build()?;
    rt.block_on(async {
        let mut config = pond_http::orchestrator::OrchestratorConfig::new(&server, args.state_dir);
        config.listen = args.listen;
        config.tls = args.tls.files();
        config.enroll_code = args.enroll;
        config.name = args.name.unwrap_or_else(host_name);
        let orch = pond_http::orchestrator::start(config).await?;
        say!("pond orchestrator listening on {}", orch.url());
        if let Some(addr) = args.metrics_listen {
            let bound = pond_http::metrics::serve_unauthenticated(addr).await.context("--metrics-listen")?;
            say!("metrics on http://{bound}/metrics");
        }
        say!("pool: {}; id: {}; pond: {server}", orch.member.pool, orch.member.id);
        std::io::stdout().flush()?;
        shutdown_signal().await;
        orch.shutdown().await;
        Ok(())
    })
}

/// A new directory under the system's temporary directory that only this user can use: made
/// with `mkdir` (which never takes over a path someone else made first, link or directory) and
/// mode 0700.
fn private_temp_dir(prefix: &str) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    for n in 0..1000 {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    bail!("no free name for a temporary directory under {}", std::env::temp_dir().display())
}

fn sandbox(command: SandboxCommand) -> Result<i32> {
    match command {
        SandboxCommand::Check { mut sandbox } => {
            if sandbox.backend == "auto" {
                sandbox.backend = "oci".into();
            }
            let dir = if sandbox.dir.is_none() { private_temp_dir("pond-sandbox-check")? } else { PathBuf::new() };
            let (backend, _) = sandbox_backend(&sandbox, dir.clone())?;
            let profiles: Vec<&str> = backend.profiles().iter().map(|p| p.as_str()).collect();
            say!("sandbox backend {}: self-check passed; profiles: {}", backend.name(), profiles.join(", "));
            if sandbox.dir.is_none() {
                // A throwaway state directory: its warm cgroup goes with it.
                let _ = pond_sandbox::oci::collect_garbage(&dir);
                let _ = std::fs::remove_dir_all(&dir);
            }
            Ok(0)
        }
        SandboxCommand::Gc { dir } => {
            let removed = pond_sandbox::oci::collect_garbage(&dir).map_err(anyhow::Error::msg)?;
            say!("removed {removed} leftover sandbox objects from {}", dir.display());
            Ok(0)
        }
        // Only reached with extra arguments (main runs the helper directly otherwise).
        SandboxCommand::Run { spec } => Ok(pond_sandbox::oci::run_helper(&spec)),
    }
}

fn worker(args: WorkerArgs) -> Result<i32> {
    let key_dir = args.key_dir.unwrap_or_else(pond_exec::default_key_dir);
    let key_dir = std::path::absolute(&key_dir).context("resolving --key-dir")?;
    private_dir(&key_dir)?;
    let (backend, oci) = sandbox_backend(&args.sandbox, key_dir.join("sandbox"))?;
    let mut capabilities = args.capabilities;
    let sandbox_cap = pond_core::routing::SANDBOX_CAPABILITY.to_string();
    let sandbox_cap_added = oci && !capabilities.contains(&sandbox_cap);
    if sandbox_cap_added {
        capabilities.push(sandbox_cap.clone());
    } else if !oci && capabilities.contains(&sandbox_cap) {
        bail!("--capabilities names {sandbox_cap}, but this worker has no OCI sandbox (see `pond sandbox check`)");
    }
    // A root worker's unsandboxed jobs run as a uid of their own, held (by a lock) for as long
    // as this process lives, so no other worker's jobs or sandboxes share it.
    // SAFETY: geteuid has no preconditions.
    let (job_uid, _job_uid_lock) = if unsafe { libc::geteuid() } == 0 {
        let (lock, uid) =
            pond_sandbox::oci::acquire_job_uid().map_err(|e| anyhow::anyhow!("a uid for this worker's jobs: {e}"))?;
        (Some(uid), Some(lock))
    } else {
        (None, None)
    };
    let config = pond_http::worker_process::WorkerProcessConfig {
        job_uid,
        orchestrator: args.orchestrator.trim_end_matches('/').to_string(),
        enroll_code: args.enroll,
        key_dir,
        tags: args.tags,
        capabilities,
        name: args.name.unwrap_or_else(host_name),
        once: args.once,
        drain: args.drain,
        kill_grace: args.kill_grace,
        shell_env_allow: args.shell_env_allow,
        sandbox: backend,
        allow_unconfined: args.allow_unconfined,
        max_log_bytes: args.max_log_bytes,
    };
    let prepared = match pond_http::worker_process::prepare(&config) {
        // The sandbox capability was added because the self-check passed, not asked for: if the
        // code does not grant it, enroll without it (and say so) rather than not at all.
        Err(pond_http::worker_process::WorkerSetupError::Enroll { error, .. })
            if sandbox_cap_added
                && error.status() == Some(403)
                && error.to_string().contains(&format!("capability `{sandbox_cap}`")) =>
        {
            eprintln!(
                "pond worker: the enrollment code does not grant `{sandbox_cap}`; enrolling without it (sandboxed stages will not come here; mint a code with --capabilities {sandbox_cap} to take them)"
            );
            let mut config = config.clone();
            config.capabilities.retain(|c| c != &sandbox_cap);
            pond_http::worker_process::prepare(&config)?
        }
        other => other?,
    };
    let m = &prepared.member;
    let how = if prepared.newly_enrolled { "enrolled" } else { "resuming" };
    say!(
        "pond worker {} {how} in pool {} (tags: {}; capabilities: {}; fingerprint {})",
        m.id,
        m.pool,
        m.tags.join(","),
        m.capabilities.join(","),
        m.fingerprint.as_deref().unwrap_or("-")
    );
    std::io::stdout().flush()?;
    let rt = runtime()?;
    if let Some(addr) = args.metrics_listen {
        let bound = rt.block_on(pond_http::metrics::serve_unauthenticated(addr)).context("--metrics-listen")?;
        say!("metrics on http://{bound}/metrics");
    }
    let summary = rt.block_on(async {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop.send(true);
        });
        prepared.worker.run(stopped).await
    });
    // An idle worker's claim is a blocking long poll on a pool thread; nothing waits for its
    // answer any more, so the process exits now instead of when the poll would have ended.
    rt.shutdown_background();
    say!(
        "pond worker stopped: {} reported, {} handed back, {} lost",
        summary.reported,
        summary.handed_back,
        summary.lost
    );
    Ok(0)
}

fn credentials(command: CredentialsCommand, client: &Client) -> Result<()> {
    match command {
        CredentialsCommand::Add { name, provider, env, value_env, value_file, projects } => {
            let value = match (value_env, value_file) {
                (Some(var), _) => std::env::var(&var).with_context(|| format!("reading ${var}"))?,
                (None, Some(path)) => {
                    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?
                }
                (None, None) => {
                    let mut text = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
                    text
                }
            };
            let value = value.trim_end_matches(['\n', '\r']).to_string();
            let request = pond_http::pool_wire::PutCredential { name, provider, env, value, projects };
            let view = client.put_credential(&request)?;
            say!(
                "credential {} ({}) fills ${} on the worker; sealed under key {}",
                view.name,
                view.provider,
                view.env,
                view.key_fingerprint
            );
        }
        CredentialsCommand::List { json } => {
            let list = client.credentials()?;
            if json {
                return print_json(&list);
            }
            say!("{:<24} {:<12} {:<24} KEY", "NAME", "PROVIDER", "ENV");
            for c in &list.credentials {
                say!("{:<24} {:<12} {:<24} {}", c.name, c.provider, c.env, c.key_fingerprint);
            }
        }
        CredentialsCommand::Remove { name } => {
            client.remove_credential(&name)?;
            say!("removed credential {name}");
        }
    }
    Ok(())
}

fn enroll(command: EnrollCommand, client: &Client) -> Result<()> {
    let EnrollCommand::Create { pool, worker, tags, capabilities, fingerprint, ttl, uses, json } = command;
    let request = pond_http::pool_wire::CreateCode {
        pool,
        role: Some(if worker { "worker" } else { "orchestrator" }.into()),
        tags,
        capabilities,
        fingerprint,
        ttl: Some(pond_core::time::Millis(ttl.as_millis() as u64)),
        uses: Some(uses),
    };
    let code = client.create_enroll_code(&request)?;
    if json {
        return print_json(&code);
    }
    say!("{}", code.code);
    eprintln!(
        "{} {} code for pool {}{}{}{}, valid until {}",
        if code.uses == 1 { "one-time".to_string() } else { format!("{}-use", code.uses) },
        code.role,
        code.pool,
        if code.tags.is_empty() { String::new() } else { format!(", tags {}", code.tags.join(",")) },
        if code.capabilities.is_empty() {
            String::new()
        } else {
            format!(", capabilities {}", code.capabilities.join(","))
        },
        code.fingerprint.as_deref().map(|f| format!(", only for keys {f}")).unwrap_or_default(),
        code.expires_at
    );
    Ok(())
}

fn pool(command: PoolCommand, client: &Client) -> Result<()> {
    match command {
        PoolCommand::Ls { json } => {
            let list = client.pools()?;
            if json {
                return print_json(&list);
            }
            say!(
                "{:<18} {:<14} {:<16} {:<24} {:<20} {:<8} {:<10} JOB",
                "ID",
                "KIND",
                "POOL",
                "TAGS",
                "LAST SEEN",
                "STATE",
                "VERSION"
            );
            for v in list.orchestrators.iter().chain(&list.workers) {
                let m = &v.member;
                let state = if m.revoked_at.is_some() {
                    "revoked"
                } else if m.draining {
                    "draining"
                } else {
                    "active"
                };
                say!(
                    "{:<18} {:<14} {:<16} {:<24} {:<20} {:<8} {:<10} {}",
                    m.id,
                    m.kind.as_str(),
                    m.pool,
                    if m.tags.is_empty() { "-".into() } else { m.tags.join(",") },
                    v.last_seen.as_deref().map(|s| s.get(..19).unwrap_or(s)).unwrap_or("never"),
                    state,
                    v.version.as_deref().unwrap_or("-"),
                    v.current_job.as_deref().unwrap_or("-")
                );
                if m.fingerprint.is_some() || !m.capabilities.is_empty() {
                    say!(
                        "{:<18} name {}, capabilities {}, fingerprint {}",
                        "",
                        m.name,
                        if m.capabilities.is_empty() { "-".into() } else { m.capabilities.join(",") },
                        m.fingerprint.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        PoolCommand::Endorse { worker, fingerprint } => {
            let m = client.endorse_worker(&worker, &fingerprint)?;
            say!("{} is endorsed: readers accept what its keys sign", m.id);
        }
        PoolCommand::Revoke { member } => {
            let m = client.revoke_member(&member)?;
            say!("{} ({}) is revoked: its credential no longer works", m.id, m.kind.as_str());
        }
        PoolCommand::Drain { worker, undo } => {
            let m = client.drain_worker(&worker, !undo)?;
            if m.draining {
                say!("{} is draining: it finishes its current job and takes no more", m.id);
            } else {
                say!("{} takes work again", m.id);
            }
        }
    }
    Ok(())
}

/// A client for commands that act as the operator: --server/--token, else the context, else
/// the local server with its admin token.
/// What the global flags (and `POND_PROJECT`) say of the server, token, context and project.
fn consumer_overrides(global: &Global) -> TargetOverrides {
    TargetOverrides {
        server: global.server.clone(),
        token: global.token.clone(),
        context: global.context.clone(),
        project: std::env::var("POND_PROJECT").ok(),
    }
}

fn server_key(command: ServerKeyCommand) -> Result<()> {
    use base64::Engine as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    match command {
        ServerKeyCommand::New => {
            say!("{}", b64.encode(pond_core::seal::random_key()));
        }
        ServerKeyCommand::Rotate { data_dir } => {
            let current = data_dir.join("server.key");
            let old = std::fs::read_to_string(&current).with_context(|| {
                format!("reading {} (is {} a server's data directory?)", current.display(), data_dir.display())
            })?;
            let old_key = pond_core::pool::decode_key(old.trim())
                .map_err(|e| anyhow::anyhow!("{}: the key {e}", current.display()))?;
            // Never beside a running server: it holds the keys it started with in memory, and
            // its sweep would remove the previous-keys file this writes to.
            let _lock = pond_http::server::lock_data_dir(&data_dir)
                .map_err(|e| anyhow::anyhow!("{e}: stop it first, then rotate and start it again"))?;
            let previous = data_dir.join(pond_http::server::PREVIOUS_KEYS_FILE);
            // The old key is safe on disk before the new one replaces it.
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(&previous)
                .with_context(|| format!("opening {}", previous.display()))?;
            writeln!(file, "{}", old.trim())?;
            file.sync_all()?;
            let key = pond_core::seal::random_key();
            let staged = data_dir.join("server.key.new");
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&staged)
                .with_context(|| format!("writing {}", staged.display()))?;
            writeln!(file, "{}", b64.encode(key))?;
            file.sync_all()?;
            std::fs::rename(&staged, &current).with_context(|| format!("replacing {}", current.display()))?;
            say!(
                "new server key {} in {}; the old one ({}) is kept in {}",
                pond_core::credentials::server_key_fingerprint(&key),
                current.display(),
                pond_core::credentials::server_key_fingerprint(&old_key),
                previous.display()
            );
            say!(
                "restart the server: it opens with both, re-seals everything under the new key, then removes {} \
                 (its log says `server-key rotation done`)",
                previous.display()
            );
        }
    }
    Ok(())
}

fn admin_client(global: &Global, config_path: &std::path::Path) -> Result<Client> {
    let config = CliConfig::load(config_path)?;
    let overrides = TargetOverrides {
        server: global.server.clone(),
        token: global.token.clone(),
        context: global.context.clone(),
        project: None,
    };
    let target = cli::resolve_target(&config, &overrides)?;
    Ok(Client::new(&target.server, target.token))
}

fn parse_attestation(text: &str) -> Result<pond_core::definition::AttestationPolicy, String> {
    match text {
        "required" => Ok(pond_core::definition::AttestationPolicy::Required),
        "record" => Ok(pond_core::definition::AttestationPolicy::Record),
        other => Err(format!("`{other}` is not `required` or `record`")),
    }
}

/// Creates `dir` (and its parents) readable by this user only, if it does not exist yet: a data
/// or key directory, made before anything (the sandbox's state) is put in it.
fn private_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .with_context(|| format!("securing {}", dir.display()))?;
    }
    Ok(())
}

fn server_config(args: ServerArgs) -> Result<pond_http::server::ServerConfig> {
    private_dir(&args.data_dir)?;
    let (backend, _) = sandbox_backend(&args.sandbox, args.data_dir.join("sandbox"))?;
    let mut config = pond_http::server::ServerConfig::new(args.data_dir, backend);
    config.listen = args.listen;
    config.database_url = args.database_url;
    config.database_pool = args.database_pool;
    config.lease = args.lease;
    config.slots = args.slots;
    config.allow_local_sources = args.allow_local_sources;
    config.allow_plain_http_git = args.allow_http_git;
    config.allow_internal_git = args.allow_internal_git;
    config.attestation_default = args.attestation;
    config.max_log_bytes = args.max_log_bytes;
    config.model_origins = args.model_origins;
    config.max_run_artifact_bytes = args.max_run_artifact_bytes;
    config.max_pending_bundle_bytes = args.max_pending_bundle_bytes;
    if args.bundle_ttl.is_zero() {
        bail!("--bundle-ttl must be longer than 0");
    }
    config.bundle_ttl = args.bundle_ttl;
    config.reserved_tag_prefixes = args.reserved_tag_prefixes;
    config.limits.max_bundle_bytes = args.max_bundle_bytes;
    for origin in &args.cors_origins {
        let rest = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://"));
        if rest.is_none_or(|host| host.is_empty() || host.contains('/') || host.contains('*')) {
            bail!(
                "--cors-origin `{origin}`: an origin is `https://host[:port]` (scheme and host, no path, no wildcard)"
            );
        }
    }
    config.limits.cors_origins = args.cors_origins.clone();
    config.shell_env_allow = args.shell_env_allow;
    config.kill_grace = args.kill_grace;
    config.drain = args.drain;
    config.node_id = args.node_id;
    config.limits.encryption_default = args.encryption_default;
    config.server_key = args.server_key.map(|k| k.0);
    config.previous_server_keys = args.previous_server_keys.iter().map(|k| k.0).collect();
    config.next_server_keys = args.next_server_keys.iter().map(|k| k.0).collect();
    config.bootstrap_admin_token = args.admin_token;
    config.webhook_allow_ips = args.webhook_allow_ips;
    if args.event_retention < Duration::from_secs(2 * 24 * 3600) {
        bail!("--event-retention must be at least 2 days: webhook retries run for about 27 hours");
    }
    config.event_retention = args.event_retention;
    if args.retain_finished.is_some_and(|d| d.is_zero()) {
        bail!("--retain-finished must be longer than 0 (omit it to keep runs)");
    }
    if args.retain_finished.is_some_and(|d| d < Duration::from_secs(2 * 24 * 3600)) {
        eprintln!(
            "warning: --retain-finished is shorter than 2 days: a webhook receiver that was down may be told \
             of runs already deleted"
        );
    }
    config.retain_finished = args.retain_finished;
    config.tls = args.tls.files();
    Ok(config)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
    }
}

fn serve(mut args: ServerArgs) -> Result<()> {
    // Absolute from here on: stages get paths under it (checkouts, outputs) and run elsewhere.
    args.data_dir = std::path::absolute(&args.data_dir).context("resolving --data-dir")?;
    let data_dir = args.data_dir.clone();
    let store = if args.database_url.is_some() { "PostgreSQL" } else { "SQLite" };
    let config = server_config(args)?;
    let rt = runtime()?;
    rt.block_on(async {
        let server = pond_http::server::start(config).await?;
        say!("pond server listening on {}", server.url());
        say!("store: {store}; data directory: {}", data_dir.display());
        match &server.new_admin_token {
            Some(_) => say!("admin token created: {} (mode 0600)", server.admin_token_file.display()),
            None => say!("admin token: {}", server.admin_token_file.display()),
        }
        if server.interrupted_stages > 0 {
            say!("{} stage(s) interrupted by the previous stop will be retried", server.interrupted_stages);
        }
        std::io::stdout().flush().ok();
        server.run_until(shutdown_signal()).await;
        say!("pond server stopped");
        Ok::<(), anyhow::Error>(())
    })?;
    // Work still blocked on an absent store is not waited for: its leases cover it.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

fn run_command(command: RunCommand, client: &Client, target: &cli::Target, key_path: &std::path::Path) -> Result<i32> {
    match command {
        RunCommand::Submit { file, project, source, git_ref, idempotency_key, wait, json, recipients, no_encrypt } => {
            let by_default = std::env::var("POND_ENCRYPTION_DEFAULT").map(|v| v != "false" && v != "0").unwrap_or(true);
            // Checked here, so an error names the flag the user gave (the server's index would
            // count this context's own key first).
            for r in &recipients {
                let key = pond_core::pool::decode_key(r).map_err(|e| anyhow::anyhow!("--recipient `{r}` {e}"))?;
                pond_core::keys::check_x25519_public(&key).map_err(|e| anyhow::anyhow!("--recipient `{r}`: {e}"))?;
            }
            let mut to = Vec::new();
            if !no_encrypt && (by_default || !recipients.is_empty()) {
                if by_default {
                    to.push(cli::consumer_key(key_path, false)?.public_key);
                }
                to.extend(recipients);
            }
            let options = SubmitOptions {
                file,
                project,
                sources: source,
                git_ref,
                idempotency_key: idempotency_key.clone(),
                recipients: to,
                signing_key: Some(key_path.to_path_buf()),
            };
            let body = cli::build_submit(client, target, &options)?;
            let run = client.submit(&body, idempotency_key.as_deref())?;
            for warning in &run.warnings {
                eprintln!("warning: {warning}");
            }
            if !wait {
                if json {
                    print_json(&run)?;
                } else {
                    say!("{}", run.id);
                }
                return Ok(0);
            }
            eprintln!("submitted run {} ({} stages)", run.id, run.stages.len());
            let mut out = std::io::stdout().lock();
            let asked = body.get("recipient_pubkeys").is_some();
            let mut decrypt = cli::LogDecryptor::new(key_path, &run.id.to_string())?.verifying(client, asked)?;
            let end = cli::wait(client, &run.id.to_string(), &mut out, json, &mut decrypt)?;
            drop(out);
            let finished = client.get_run(&run.id.to_string())?;
            decrypt.check_whole(&finished)?;
            cli::check_attestations(client, &finished)?;
            if json {
                print_json(&finished)?;
            } else {
                eprintln!("\n{}", cli::format_run(&finished));
            }
            Ok(cli::exit_code(end.state))
        }
        RunCommand::Status { id, json } => {
            let run = client.get_run(&id)?;
            if json {
                print_json(&run)?;
            } else {
                say_part!("{}", cli::format_run(&run));
            }
            Ok(0)
        }
        RunCommand::List { project, state, text, limit, cursor, json } => {
            let page = client.search_runs(
                project.as_deref(),
                state.as_deref(),
                text.as_deref(),
                Some(limit),
                cursor.as_deref(),
            )?;
            if json {
                print_json(&page)?;
            } else {
                say_part!("{}", cli::format_run_page(&page));
            }
            Ok(0)
        }
        RunCommand::Logs { id, follow, json } => {
            let mut out = std::io::stdout().lock();
            let mut decrypt = cli::LogDecryptor::new(key_path, &id)?.verifying(client, false)?;
            if follow {
                let end = cli::wait(client, &id, &mut out, json, &mut decrypt)?;
                decrypt.check_whole(&client.get_run(&id)?)?;
                return Ok(cli::exit_code(end.state));
            }
            let finished_before = Some(client.get_run(&id)?).filter(|r| r.state.is_terminal());
            let mut after = 0;
            let mut printer = cli::LinePrinter::default();
            loop {
                let page = client.logs(&id, after, 1000)?;
                for line in &page.lines {
                    let Some(line) = decrypt.line(line)? else { continue };
                    if json {
                        writeln!(out, "{}", serde_json::to_string(&line)?)?;
                    } else {
                        printer.print(&mut out, &line)?;
                    }
                }
                if page.lines.is_empty() {
                    // Only the streams of a run finished before the log was read must be whole.
                    if let Some(run) = &finished_before {
                        decrypt.check_whole(run)?;
                        cli::check_attestations(client, run)?;
                    }
                    return Ok(0);
                }
                after = page.next_cursor;
            }
        }
        RunCommand::Cancel { id: None, project: Some(project), status, json } => {
            let done = client.cancel_many(&project, status.as_deref())?;
            if json {
                print_json(&done)?;
            } else {
                say!("cancel requested for {} run(s) of project {project}", done.cancelled.len());
                for f in &done.failed {
                    say!("could not cancel {}: {}", f.id, f.error);
                }
            }
            Ok(if done.failed.is_empty() { 0 } else { 1 })
        }
        RunCommand::Cancel { id, json, .. } => {
            let id = id.context("a run id or --project is required")?;
            let run = client.cancel(&id)?;
            if json {
                print_json(&run)?;
            } else {
                say!("cancel requested for run {} (state: {})", run.id, run.state);
            }
            Ok(0)
        }
        RunCommand::Results { id, stage, artifact } => {
            // Each agent stage's results are `results-<stage>.jsonl`, or what its `parse` named:
            // read from the run's own definition, and only those stored.
            let run = client.get_run(&id)?;
            let listed: Vec<String> = client.artifacts(&id)?.artifacts.into_iter().map(|a| a.name).collect();
            let wanted: Vec<(String, String)> = match (&artifact, &stage) {
                (Some(name), _) => vec![(String::new(), name.clone())],
                (None, only) => run
                    .definition
                    .stages
                    .iter()
                    .filter(|d| only.as_ref().is_none_or(|s| *s == d.key))
                    .filter_map(|d| match &d.executor {
                        pond_core::definition::ExecutorSpec::Swarm(swarm) => {
                            let named = swarm.parse.as_ref().and_then(|p| p.get("artifact")).and_then(|a| a.as_str());
                            let name = named.map(str::to_string).unwrap_or_else(|| format!("results-{}.jsonl", d.key));
                            Some((d.key.clone(), name))
                        }
                        _ => None,
                    })
                    .filter(|(_, name)| listed.contains(name))
                    .collect(),
            };
            if wanted.is_empty() {
                bail!(
                    "run {id} has no agent results{}",
                    stage.as_ref().map(|s| format!(" from stage `{s}`")).unwrap_or_default()
                );
            }
            let plain = artifact.is_some() || stage.is_some();
            let mut out = std::io::stdout().lock();
            let mut fetcher = cli::ArtifactFetcher::new(client, &id, key_path)?;
            for (stage_key, name) in wanted {
                let data = fetcher.fetch(&name)?;
                let text = String::from_utf8(data).with_context(|| format!("{name} is not UTF-8"))?;
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    let value: serde_json::Value =
                        serde_json::from_str(line).with_context(|| format!("{name} holds a line that is not JSON"))?;
                    if plain {
                        writeln!(out, "{value}")?;
                    } else {
                        writeln!(out, "{}", serde_json::json!({"stage": stage_key, "result": value}))?;
                    }
                }
            }
            Ok(0)
        }
        RunCommand::Artifacts { id, name, output, json } => match name {
            None => {
                let list = client.artifacts(&id)?;
                if json {
                    print_json(&list)?;
                } else {
                    say!("{:<40} {:<16} {:>10}  SHA256", "NAME", "STAGE", "BYTES");
                    for a in &list.artifacts {
                        say!("{:<40} {:<16} {:>10}  {}", a.name, a.stage, a.size, a.sha256);
                    }
                }
                Ok(0)
            }
            Some(name) => {
                // Decrypted locally when the artifact has a `.pondkey` sidecar.
                let data = cli::fetch_artifact(client, &id, &name, key_path)?;
                match output {
                    Some(path) => {
                        let tmp = path.with_extension("part");
                        std::fs::write(&tmp, &data).with_context(|| format!("writing {}", tmp.display()))?;
                        std::fs::rename(&tmp, &path)?;
                        eprintln!("wrote {} bytes to {}", data.len(), path.display());
                    }
                    None => std::io::stdout().lock().write_all(&data)?,
                }
                Ok(0)
            }
        },
    }
}

fn keys(command: KeysCommand, client: &Client) -> Result<()> {
    match command {
        KeysCommand::Create { projects, name, json } => {
            let key = client.create_key(&projects, name.as_deref())?;
            if json {
                print_json(&key)?;
            } else {
                say!("key {} for project(s) {}", key.id, key.projects.join(", "));
                say!("token (shown once): {}", key.token.unwrap_or_default());
            }
        }
        KeysCommand::List { json } => {
            let list = client.list_keys()?;
            if json {
                print_json(&list)?;
            } else {
                say!("{:<36}  {:<8} {:<24} {:<8} NAME", "ID", "ROLE", "PROJECTS", "REVOKED");
                for k in &list.keys {
                    let role = if k.role == pond_core::store::Role::Admin { "admin" } else { "consumer" };
                    let revoked = if k.revoked_at.is_some() { "yes" } else { "no" };
                    say!("{:<36}  {:<8} {:<24} {:<8} {}", k.id, role, k.projects.join(","), revoked, k.name);
                }
            }
        }
        KeysCommand::Revoke { id } => {
            client.revoke_key(&id)?;
            say!("revoked {id}");
        }
    }
    Ok(())
}

fn context(command: ContextCommand, path: &std::path::Path, server: Option<String>) -> Result<()> {
    let mut config = CliConfig::load(path)?;
    match command {
        ContextCommand::Add { name, server, token, token_file, project, ca_cert, make_current } => {
            let token = match token_file {
                Some(f) => Some(
                    std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?.trim().to_string(),
                ),
                None => token,
            };
            if name == cli::LOCAL_CONTEXT {
                bail!(
                    "`local` is the built-in context (this machine's server and its admin token): choose another name"
                );
            }
            // Kept as an absolute path (a renewed CA file is read again), checked now.
            let ca_cert = match ca_cert {
                Some(path) => {
                    pond_http::tls::read_certificates(&path)?;
                    Some(std::path::absolute(&path).with_context(|| format!("resolving {}", path.display()))?)
                }
                None => None,
            };
            config.contexts.insert(name.clone(), Context { server, token, project, ca_cert });
            // Only `--use` switches: adding a context never changes who later commands act as.
            if make_current {
                config.current = Some(name.clone());
            }
            config.save(path)?;
            let current = config.current.as_deref().unwrap_or(cli::LOCAL_CONTEXT);
            say!("context `{name}` saved in {}; current context: {current}", path.display());
        }
        ContextCommand::Use { name } => {
            if name == cli::LOCAL_CONTEXT && !config.contexts.contains_key(&name) {
                config.current = None;
            } else if !config.contexts.contains_key(&name) {
                bail!("no context named `{name}` (see `pond context list`)");
            } else {
                config.current = Some(name.clone());
            }
            config.save(path)?;
            say!("current context: {name}");
        }
        ContextCommand::List { json } => {
            if json {
                let shown: std::collections::BTreeMap<_, _> = config
                    .contexts
                    .iter()
                    .map(|(n, c)| (n.clone(), serde_json::json!({"server": c.server, "project": c.project, "has_token": c.token.is_some(), "ca_cert": c.ca_cert, "current": config.current.as_deref() == Some(n)})))
                    .collect();
                print_json(&shown)?;
            } else {
                if !config.contexts.contains_key(cli::LOCAL_CONTEXT) {
                    let mark = if config.current.is_none() { "*" } else { " " };
                    let server = cli::DEFAULT_SERVER;
                    say!(
                        "{mark} {:<16} {server:<40} (built in: the admin token of ./.pond or $POND_DATA_DIR)",
                        cli::LOCAL_CONTEXT
                    );
                }
                for (name, c) in &config.contexts {
                    let mark = if config.current.as_deref() == Some(name) { "*" } else { " " };
                    say!("{mark} {name:<16} {:<40} {}", c.server, c.project.clone().unwrap_or_default());
                }
            }
        }
        ContextCommand::Whoami { json } => {
            let current = config.current.clone().filter(|n| config.contexts.contains_key(n));
            let overrides = TargetOverrides { context: current.clone(), server, ..Default::default() };
            let target = cli::resolve_target(&config, &overrides)?;
            let me = Client::new(&target.server, target.token).whoami()?;
            if json {
                say!("{}", serde_json::to_string_pretty(&me)?);
            } else {
                let projects = match (me.role, me.projects.is_empty()) {
                    (pond_core::store::Role::Admin, _) => "every project".to_string(),
                    (_, true) => "no project".to_string(),
                    (_, false) => me.projects.join(", "),
                };
                say!(
                    "context `{}` on {}: key {} ({}), {projects}",
                    current.as_deref().unwrap_or(cli::LOCAL_CONTEXT),
                    target.server,
                    me.key_id,
                    match me.role {
                        pond_core::store::Role::Admin => "admin",
                        pond_core::store::Role::Consumer => "consumer",
                    }
                );
            }
        }
        ContextCommand::RotateToken => {
            let current = config.current.clone().filter(|n| config.contexts.contains_key(n));
            let overrides = TargetOverrides { context: current.clone(), server, ..Default::default() };
            let target = cli::resolve_target(&config, &overrides)?;
            if target.token.is_none() {
                bail!("the current context has no token to rotate");
            }
            let rotated = Client::new(&target.server, target.token).rotate_own_key()?;
            let secret = rotated.token.context("the server returned no token")?;
            match current {
                Some(name) => {
                    if let Some(c) = config.contexts.get_mut(&name) {
                        c.token = Some(secret);
                    }
                    config.save(path)?;
                    say!("context `{name}`: token rotated (key {})", rotated.id);
                }
                None => {
                    let dir =
                        std::env::var_os("POND_DATA_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".pond"));
                    let file = dir.join("admin.token");
                    let pending = dir.join("admin.token.new");
                    {
                        use std::os::unix::fs::OpenOptionsExt as _;
                        let mut f = std::fs::OpenOptions::new()
                            .write(true)
                            .create(true)
                            .truncate(true)
                            .mode(0o600)
                            .open(&pending)?;
                        f.write_all(secret.as_bytes())?;
                        f.sync_all()?;
                    }
                    std::fs::rename(&pending, &file)?;
                    say!("admin token rotated (key {}); the new one is in {}", rotated.id, file.display());
                }
            }
        }
        ContextCommand::Remove { name } => {
            if config.contexts.remove(&name).is_none() {
                bail!("no context named `{name}`");
            }
            if config.current.as_deref() == Some(&name) {
                config.current = None;
            }
            config.save(path)?;
            say!("removed context `{name}`");
        }
    }
    Ok(())
}

fn fingerprint(key_dir: Option<PathBuf>, json: bool) -> Result<()> {
    use base64::Engine as _;
    let dir = key_dir.unwrap_or_else(pond_exec::default_key_dir);
    let identity =
        pond_exec::load_or_create_identity(&dir).with_context(|| format!("worker keys in {}", dir.display()))?;
    let (sealing_fp, signing_fp) = identity.fingerprints();
    let worker_fp = pond_core::pool::worker_fingerprint(&pond_core::pool::WorkerKeys {
        sealing: identity.sealing_public(),
        signing: identity.signing_public(),
    });
    let b64 = |k: [u8; 32]| base64::engine::general_purpose::STANDARD.encode(k);
    let (sealing_pk, signing_pk) = (b64(identity.sealing_public()), b64(identity.signing_public()));
    if json {
        print_json(&serde_json::json!({
            "key_dir": dir,
            "worker": worker_fp,
            "sealing": {"alg": "x25519", "fingerprint": sealing_fp, "public_key": sealing_pk},
            "signing": {"alg": "ed25519", "fingerprint": signing_fp, "public_key": signing_pk},
        }))?;
    } else {
        say!("worker:            {worker_fp}  (pin with `pond admin enroll create --worker --fingerprint …`)");
        say!("sealing (X25519):  {sealing_fp}  {sealing_pk}");
        say!("signing (Ed25519): {signing_fp}  {signing_pk}");
        say!("keys in {} (private, never sent)", dir.display());
    }
    Ok(())
}

fn demo(args: DemoArgs) -> Result<i32> {
    if !args.workflow.is_file() || !args.source.is_dir() {
        bail!(
            "the demo runs {} on {}; run it from the root of a pond checkout or pass --workflow and --source",
            args.workflow.display(),
            args.source.display()
        );
    }
    // Only a directory an earlier demo made (it holds the marker) is cleared: never a server's
    // data directory or anything else a user pointed --data-dir at.
    const MARKER: &str = ".made-by-pond-demo";
    let is_empty = |dir: &Path| std::fs::read_dir(dir).map(|mut d| d.next().is_none()).unwrap_or(false);
    if args.data_dir.exists() {
        if args.data_dir.join(MARKER).is_file() {
            std::fs::remove_dir_all(&args.data_dir).with_context(|| format!("clearing {}", args.data_dir.display()))?;
        } else if !is_empty(&args.data_dir) {
            bail!(
                "{} exists and was not made by `pond demo`; refusing to clear it (pass another --data-dir)",
                args.data_dir.display()
            );
        }
    }
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("creating {}", args.data_dir.display()))?;
    std::fs::write(args.data_dir.join(MARKER), b"pond demo data; removed by the next `pond demo`\n")?;
    let rt = runtime()?;
    let mut config = pond_http::server::ServerConfig::new(args.data_dir.clone(), Arc::new(pond_sandbox::HostBackend));
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let server = rt.block_on(pond_http::server::start(config))?;
    let token = std::fs::read_to_string(&server.admin_token_file)?.trim().to_string();
    say!("demo server on {} (data in {})", server.url(), args.data_dir.display());
    let client = Client::new(&server.url(), Some(token));
    let target = cli::Target { server: server.url(), token: None, project: Some("demo".into()) };
    // Like `pond run submit`, the demo encrypts the run's output to a key of its own and
    // decrypts it here: the server stores only ciphertext.
    let key = args.data_dir.join("demo.x25519");
    let options = SubmitOptions {
        file: args.workflow.clone(),
        sources: vec![args.source.display().to_string()],
        recipients: vec![cli::consumer_key(&key, false)?.public_key],
        signing_key: Some(key.clone()),
        ..Default::default()
    };
    let outcome = (|| -> Result<i32> {
        let body = cli::build_submit(&client, &target, &options)?;
        let run = client.submit(&body, None)?;
        say!("submitted run {} ({}) on {}\n", run.id, args.workflow.display(), args.source.display());
        let mut decrypt = cli::LogDecryptor::new(&key, &run.id.to_string())?.verifying(&client, true)?;
        let end = cli::wait(&client, &run.id.to_string(), &mut std::io::stdout().lock(), false, &mut decrypt)?;
        let finished = client.get_run(&run.id.to_string())?;
        decrypt.check_whole(&finished)?;
        say!("\n{}", cli::format_run(&finished));
        say!("the server holds these encrypted; decrypted here with {}:", key.display());
        let mut fetcher = cli::ArtifactFetcher::new(&client, &run.id.to_string(), &key)?;
        for artifact in client.artifacts(&run.id.to_string())?.artifacts {
            if artifact.name.ends_with(pond_core::seal::SIDECAR_SUFFIX) {
                continue;
            }
            let data = fetcher.fetch(&artifact.name)?;
            let text = String::from_utf8_lossy(&data);
            say!("artifact {} ({} bytes, stage {}):", artifact.name, data.len(), artifact.stage);
            for line in text.lines().take(5) {
                say!("  {line}");
            }
            if text.lines().count() > 5 {
                say!("  …");
            }
        }
        Ok(cli::exit_code(end.state))
    })();
    rt.block_on(server.shutdown());
    outcome
}

fn bench(args: BenchArgs) -> Result<()> {
    if let Some(runs) = args.run_list {
        let rt = runtime()?;
        let db = match &args.database_url {
            Some(server) => Some(rt.block_on(pond_store::ScratchDatabase::create(server, "bench_console"))?),
            None => None,
        };
        let report = rt
            .block_on(pond_http::console_bench::run(
                &args.data_dir,
                Arc::new(pond_sandbox::HostBackend),
                db.as_ref().map(|d| d.url.clone()),
                runs,
                args.samples,
            ))
            .map_err(anyhow::Error::msg)?;
        say!("{report}");
        return Ok(());
    }
    if args.events {
        let rt = runtime()?;
        let db = match &args.database_url {
            Some(server) => Some(rt.block_on(pond_store::ScratchDatabase::create(server, "bench_events"))?),
            None => None,
        };
        let report = rt
            .block_on(pond_http::events_bench::run(
                &args.data_dir,
                Arc::new(pond_sandbox::HostBackend),
                db.as_ref().map(|d| d.url.clone()),
                args.runs,
            ))
            .map_err(anyhow::Error::msg)?;
        say!("{report}");
        return Ok(());
    }
    if let Some(codex) = &args.agent_overhead {
        let work = std::fs::canonicalize(".").context("current directory")?.join(&args.data_dir);
        let report = pond_http::agent_bench::run(&std::env::current_exe()?, codex, &work, args.samples)?;
        say!("{report}");
        let _ = std::fs::remove_dir_all(&work);
        return Ok(());
    }
    if args.sandbox {
        // Before any runtime thread exists: the benchmark changes its mount namespace.
        let work = std::fs::canonicalize(".").context("current directory")?.join(&args.data_dir);
        if work.exists() {
            std::fs::remove_dir_all(&work).with_context(|| format!("clearing {}", work.display()))?;
        }
        let report =
            pond_sandbox::bench::run(&std::env::current_exe()?, &work, args.samples).map_err(anyhow::Error::msg)?;
        say!("{report}");
        let _ = std::fs::remove_dir_all(&work);
        return Ok(());
    }
    let rt = runtime()?;
    if !args.claim_latency.is_empty() {
        let dir = std::path::absolute(&args.data_dir)?;
        for queued in &args.claim_latency {
            say!("{}", rt.block_on(pond_http::bench::claim_latency(args.database_url.as_deref(), &dir, *queued))?);
        }
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }
    if args.crypto {
        say!("{}", pond_http::bench::crypto(1_000_000, 256 << 20));
        return Ok(());
    }
    // A bench against `pond` processes of its own: a fresh data directory, and a scratch
    // PostgreSQL database when one is given (dropped afterwards).
    let process_bench = |name: &str| -> Result<(PathBuf, PathBuf, Option<pond_store::ScratchDatabase>)> {
        if args.data_dir.exists() {
            std::fs::remove_dir_all(&args.data_dir).with_context(|| format!("clearing {}", args.data_dir.display()))?;
        }
        std::fs::create_dir_all(&args.data_dir)?;
        let scratch = match &args.database_url {
            Some(url) => Some(rt.block_on(pond_store::ScratchDatabase::create(url, name))?),
            None => None,
        };
        Ok((std::env::current_exe()?, std::fs::canonicalize(&args.data_dir)?, scratch))
    };
    if let Some(rounds) = args.stress {
        let (exe, dir, scratch) = process_bench("stress")?;
        let url = scratch.as_ref().map(|d| d.url.as_str());
        say!("{}", pond_http::bench::stress(&exe, &dir, url, rounds, args.stress_seconds, 8, 8)?);
        return Ok(());
    }
    if let Some(requests) = args.soak {
        let (exe, dir, scratch) = process_bench("soak")?;
        let url = scratch.as_ref().map(|d| d.url.as_str());
        say!("{}", pond_http::bench::soak(&exe, &dir, url, requests, args.clients)?);
        return Ok(());
    }
    if args.pool {
        let (exe, dir, scratch) = process_bench("pool")?;
        let report = pond_http::bench::pool(
            &exe,
            &dir,
            scratch.as_ref().map(|d| d.url.as_str()),
            args.samples,
            args.pool_workers,
            args.runs,
            args.idle_workers,
        )?;
        say!("{report}");
        return Ok(());
    }
    if args.nodes > 1 && args.database_url.is_none() {
        bail!("--nodes needs --database-url: several servers share one PostgreSQL database");
    }
    if args.data_dir.exists() {
        std::fs::remove_dir_all(&args.data_dir).with_context(|| format!("clearing {}", args.data_dir.display()))?;
    }
    let scratch = match &args.database_url {
        Some(url) => Some(rt.block_on(pond_store::ScratchDatabase::create(url, "bench"))?),
        None => None,
    };
    if args.backlog > 0 {
        let backlog = pond_store::Backlog::parse(&args.backlog_kind)
            .filter(|b| *b != pond_store::Backlog::Local)
            .with_context(|| {
                format!("--backlog-kind `{}`: expected `finished`, `pooled` or `other-pool` (a local backlog would be drained by the bench's own server first)", args.backlog_kind)
            })?;
        let now = pond_core::time::Clock::now(&pond_core::time::SystemClock);
        let seeding = std::time::Instant::now();
        match &scratch {
            Some(db) => rt.block_on(async {
                let store = pond_store::PgStore::connect(&db.url, 2).await?;
                store.seed_runs(args.backlog, backlog, now).await?;
                store.pool().close().await;
                Ok::<_, pond_core::StoreError>(())
            })?,
            None => {
                let node = args.data_dir.join("node-0");
                std::fs::create_dir_all(&node)?;
                rt.block_on(async {
                    let store = pond_store::SqliteStore::open(&node.join("pond.db")).await?;
                    store.seed_runs(args.backlog, backlog, now).await?;
                    store.close().await;
                    Ok::<_, pond_core::StoreError>(())
                })?
            }
        }
        say!("seeded {} {} runs in {:.1} s", args.backlog, backlog.as_str(), seeding.elapsed().as_secs_f64());
    }
    let activity_before = match &scratch {
        Some(db) => Some(rt.block_on(db.activity())?),
        None => None,
    };
    let mut servers = Vec::new();
    // Nodes sharing a database share its server key (as an operator's would).
    let server_key = pond_core::seal::random_key();
    for n in 0..args.nodes.max(1) {
        let mut config = pond_http::server::ServerConfig::new(
            args.data_dir.join(format!("node-{n}")),
            Arc::new(pond_sandbox::HostBackend),
        );
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.slots = args.slots;
        config.database_url = scratch.as_ref().map(|s| s.url.clone());
        config.server_key = Some(server_key);
        servers.push(rt.block_on(pond_http::server::start(config))?);
    }
    let token = std::fs::read_to_string(&servers[0].admin_token_file)?.trim().to_string();
    let clients: Vec<Client> = servers.iter().map(|s| Client::new(&s.url(), Some(token.clone()))).collect();
    let setup = match &scratch {
        Some(_) => format!("PostgreSQL, {} node(s)", servers.len()),
        None => "SQLite".to_string(),
    };
    let report = pond_http::bench::run(&clients, &setup, args.runs, args.clients);
    for server in servers {
        rt.block_on(server.shutdown());
    }
    // Read once the servers' connections have closed (a backend reports its counts as it ends).
    let activity = match (&scratch, activity_before) {
        (Some(db), Some(before)) => Some(rt.block_on(db.activity())?.since(&before)),
        _ => None,
    };
    drop(scratch);
    let report = report?;
    let command: Vec<String> =
        std::env::args().map(|a| if a.contains("://") { "<database-url>".into() } else { a }).collect();
    say!("command: {}", command.join(" "));
    say!("{report}");
    if let Some(a) = activity {
        // Both phases' runs, set-up (migrations, the first admin token) included.
        let runs = (2 * args.runs) as f64;
        let statements = match a.statements {
            Some(n) => format!("{:.2}", n as f64 / runs),
            None => "n/a (pg_stat_statements is not in shared_preload_libraries)".into(),
        };
        say!(
            "PostgreSQL work per run ({} runs): statements {statements}, transactions {:.2}, WAL syncs {:.2}",
            2 * args.runs,
            a.transactions as f64 / runs,
            a.wal_syncs as f64 / runs
        );
    }
    Ok(())
}
