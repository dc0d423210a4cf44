//! Assembly of a `pond worker` process: its keys (made on first use), its enrollment through
//! the orchestrator (once; the credential is kept 0600 beside the keys), and a
//! [`pond_exec::Worker`] with the `noop` and `shell` executors.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pond_core::pool::PoolMember;
use pond_exec::{NoopExecutor, ShellConfig, ShellExecutor, Worker, WorkerConfig};

use crate::client::ClientError;
use crate::orchestrator::write_private;
use crate::pool_client::{enroll_request, HttpWorkerClient};

/// Everything `pond worker` can be told.
#[derive(Clone)]
pub struct WorkerProcessConfig {
    /// The orchestrator's URL.
    pub orchestrator: String,
    /// For a root worker: the unprivileged uid its unsandboxed (`none`) jobs run as, its own
    /// on this host (see `pond_exec::cover`).
    pub job_uid: Option<u32>,
    /// An enrollment code, needed only the first time.
    pub enroll_code: Option<String>,
    /// Keys and credential live here.
    pub key_dir: PathBuf,
    /// Tags to ask for at enrollment (a subset of the code's); `None`: all of the code's.
    pub tags: Option<Vec<String>>,
    /// Capabilities to declare at enrollment.
    pub capabilities: Vec<String>,
    /// A label.
    pub name: String,
    /// Take one job, then exit.
    pub once: bool,
    /// On shutdown, how long the current job may run on.
    pub drain: Duration,
    /// Wait between SIGTERM and SIGKILL when a job is stopped.
    pub kill_grace: Duration,
    /// Host variables passed to `shell` jobs besides the defaults.
    pub shell_env_allow: Vec<String>,
    /// Contains `shell` jobs.
    pub sandbox: Arc<dyn pond_core::sandbox::SandboxBackend>,
    /// Let a bring-your-own host run `none`-profile stages (`--allow-unconfined`).
    pub allow_unconfined: bool,
    /// Most bytes of output kept per job (`--max-log-bytes`).
    pub max_log_bytes: u64,
}

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerSetupError {
    /// No credential and no code.
    #[error("not enrolled: pass --enroll <code> (from `pond admin enroll create --pool … --worker`) the first time")]
    NotEnrolled,
    /// The orchestrator or pond refused, or could not be reached.
    #[error("enrolling through {orchestrator}: {error}")]
    Enroll {
        /// The orchestrator's URL.
        orchestrator: String,
        /// The failure.
        error: Box<ClientError>,
    },
    /// A file failed.
    #[error("{context}: {error}")]
    Io {
        /// What was being done.
        context: String,
        /// The failure.
        error: std::io::Error,
    },
}

/// The credential file (`worker.json` in the key directory).
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct Credential {
    pub(crate) orchestrator: String,
    pub(crate) token: String,
    pub(crate) member: PoolMember,
    /// Pond's ticket key, pinned at enrollment.
    #[serde(default)]
    pub(crate) pond_key: Option<String>,
}

/// The credential file's name in the key directory.
pub(crate) const CREDENTIAL_FILE: &str = "worker.json";

/// A worker ready to run, with what it enrolled as and whether it enrolled just now.
pub struct PreparedWorker {
    /// Its enrollment (pinned tags, capabilities, fingerprint).
    pub member: PoolMember,
    /// Enrolled by this start (else the saved credential was used).
    pub newly_enrolled: bool,
    /// The loop; call [`Worker::run`].
    pub worker: Worker,
}

/// Loads or makes the worker's keys, enrolls if it has no credential yet, and builds the loop.
/// Blocking (enrollment is an HTTP call): call it outside an async context or in
/// `spawn_blocking`.
pub fn prepare(config: &WorkerProcessConfig) -> Result<PreparedWorker, WorkerSetupError> {
    let io = |context: String| move |error| WorkerSetupError::Io { context, error };
    let identity = pond_exec::load_or_create_identity(&config.key_dir)
        .map_err(io(format!("worker keys in {}", config.key_dir.display())))?;
    let path = config.key_dir.join(CREDENTIAL_FILE);
    let (credential, newly_enrolled) = match std::fs::read(&path) {
        Ok(bytes) => {
            let c: Credential = serde_json::from_slice(&bytes)
                .map_err(|e| io(format!("reading {}", path.display()))(std::io::Error::other(e)))?;
            (c, false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let code = config.enroll_code.as_deref().ok_or(WorkerSetupError::NotEnrolled)?;
            let request =
                enroll_request(code, &config.name, &identity, config.tags.clone(), config.capabilities.clone());
            let enrolled = HttpWorkerClient::enroll(&config.orchestrator, &request).map_err(|error| {
                WorkerSetupError::Enroll { orchestrator: config.orchestrator.clone(), error: Box::new(error) }
            })?;
            let c = Credential {
                orchestrator: config.orchestrator.clone(),
                token: enrolled.token,
                member: enrolled.member,
                pond_key: enrolled.pond_key,
            };
            let bytes = serde_json::to_vec_pretty(&c)
                .map_err(|e| io("encoding the credential".into())(std::io::Error::other(e)))?;
            write_private(&path, &bytes).map_err(io(format!("writing {}", path.display())))?;
            (c, true)
        }
        Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
    };
    let scratch = config.key_dir.join("jobs");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(io(format!("creating {}", scratch.display())))?;
    // Stage processes a killed earlier run of this worker left behind die now.
    let groups = config.key_dir.join("process-groups");
    pond_exec::reap_orphans(&groups).map_err(io(format!("cleaning {}", groups.display())))?;
    let outputs = config.key_dir.join("outputs");
    let _ = std::fs::remove_dir_all(&outputs);
    std::fs::create_dir_all(&outputs).map_err(io(format!("creating {}", outputs.display())))?;
    // A `none`-profile job sees the key directory covered, with only these two shown through.
    #[cfg(target_os = "linux")]
    let key_cover =
        pond_exec::cover::KeyCover::new(&config.key_dir, &[scratch.clone(), outputs.clone()], config.job_uid)
            .map_err(io(format!("preparing the cover of {}", config.key_dir.display())))?;
    let mut shell = ShellConfig::new(outputs);
    shell.group_dir = Some(groups);
    #[cfg(target_os = "linux")]
    {
        shell.key_cover = Some(Arc::new(key_cover));
        // Nor can a job of the same user read this process's memory or descriptors.
        pond_exec::cover::make_undumpable();
    }
    shell.kill_grace = config.kill_grace;
    shell.env_allowlist.extend(config.shell_env_allow.iter().cloned());
    let worker_config = WorkerConfig {
        scratch,
        once: config.once,
        claim_wait: Duration::from_secs(20),
        drain: config.drain,
        max_input_bytes: 2 * 1024 * 1024 * 1024,
        pinned: credential.member.offer(),
        max_log_bytes: config.max_log_bytes,
        allow_unconfined: config.allow_unconfined,
    };
    // The orchestrator URL given now wins over the saved one (it may have moved).
    let pond_key = credential.pond_key.as_deref().ok_or_else(|| WorkerSetupError::Io {
        context: format!("{}", path.display()),
        error: std::io::Error::other("no pinned pond key (enrolled by an older pond): enroll again"),
    })?;
    let client = HttpWorkerClient::new(&config.orchestrator, &credential.token)
        .pinned(pond_key, &credential.member.id)
        .map_err(|e| WorkerSetupError::Io {
            context: format!("{}", path.display()),
            error: std::io::Error::other(e),
        })?;
    let client = Arc::new(client);
    let shell = Arc::new(ShellExecutor::new(shell, config.sandbox.clone()));
    let worker = Worker::new(client, identity, worker_config)
        .with_executor(Arc::new(NoopExecutor))
        .with_executor(shell.clone())
        .with_agents(Arc::new(crate::broker::HttpKeyBroker), shell);
    Ok(PreparedWorker { member: credential.member, newly_enrolled, worker })
}
