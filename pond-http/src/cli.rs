//! The client-side commands of the `pond` binary: contexts, submitting (with directory
//! sources packed and uploaded as bundles), waiting with live logs, and text output. The
//! binary only parses arguments and calls these.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use pond_core::run::RunState;
use pond_core::store::{LogLine, LogStream};
use serde::{Deserialize, Serialize};

use crate::client::{Client, ClientError};
use crate::wire::{LogEnd, RunPage, RunView};

/// Default server URL when nothing else is configured.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8420";

/// The built-in context: this machine's server (`DEFAULT_SERVER`) with the admin token of the
/// server's data directory (`$POND_DATA_DIR`, else `./.pond`). Current until another is chosen,
/// and `pond context use local` returns to it.
pub const LOCAL_CONTEXT: &str = "local";

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// The API call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The configuration or an input file is wrong.
    #[error("{0}")]
    Input(String),
    /// A local file operation failed.
    #[error("{context}: {error}")]
    Io {
        /// What was being done.
        context: String,
        /// The failure.
        error: std::io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> CliError {
    let context = context.into();
    move |error| CliError::Io { context, error }
}

/// A named server + token (+ default project).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Context {
    /// Base URL.
    pub server: String,
    /// API token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Project used when a command names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// Authorities (PEM file) trusted for this server besides the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
}

/// The CLI configuration file (JSON, mode 0600: it holds tokens).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CliConfig {
    /// The context used when none is named.
    #[serde(default)]
    pub current: Option<String>,
    /// Contexts by name.
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

impl CliConfig {
    /// The config file: `$POND_CONFIG`, else `$XDG_CONFIG_HOME/pond/config.json`, else
    /// `~/.config/pond/config.json`.
    pub fn default_path() -> PathBuf {
        if let Some(p) = std::env::var_os("POND_CONFIG") {
            return PathBuf::from(p);
        }
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .unwrap_or_else(|| PathBuf::from("."));
        base.join("pond").join("config.json")
    }

    /// Reads the file; a missing file is an empty configuration.
    pub fn load(path: &Path) -> Result<Self, CliError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| CliError::Input(format!("{} is not a valid pond config: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CliConfig::default()),
            Err(e) => Err(io_err(format!("reading {}", path.display()))(e)),
        }
    }

    /// Writes the file atomically with mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), CliError> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        }
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(self).map_err(|e| CliError::Input(e.to_string()))?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(format!("writing {}", tmp.display())))?;
        file.write_all(&text).map_err(io_err(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, path).map_err(io_err(format!("replacing {}", path.display())))
    }
}

/// What a command talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Base URL.
    pub server: String,
    /// Token, if any.
    pub token: Option<String>,
    /// Default project.
    pub project: Option<String>,
}

/// Settings given on the command line or in the environment.
#[derive(Debug, Clone, Default)]
pub struct TargetOverrides {
    /// `--server` / `POND_SERVER`.
    pub server: Option<String>,
    /// `--token` / `POND_TOKEN`.
    pub token: Option<String>,
    /// `--context` / `POND_CONTEXT`.
    pub context: Option<String>,
    /// `--project` / `POND_PROJECT`.
    pub project: Option<String>,
}

/// Picks the server and token: explicit flags and environment first, then the named or current
/// context, then a local server at the default address with the admin token of `./.pond` (or
/// `$POND_DATA_DIR`), which is what `pond server` with no flags creates.
pub fn resolve_target(config: &CliConfig, overrides: &TargetOverrides) -> Result<Target, CliError> {
    let context = match overrides.context.as_ref().or(config.current.as_ref()) {
        Some(name) if name == LOCAL_CONTEXT && !config.contexts.contains_key(name) => None,
        Some(name) => Some(
            config
                .contexts
                .get(name)
                .ok_or_else(|| CliError::Input(format!("no context named `{name}` (see `pond context list`)")))?,
        ),
        None => None,
    };
    let server = overrides
        .server
        .clone()
        .or_else(|| context.map(|c| c.server.clone()))
        .unwrap_or_else(|| DEFAULT_SERVER.to_string());
    let token = overrides.token.clone().or_else(|| context.and_then(|c| c.token.clone())).or_else(|| {
        if context.is_some() {
            return None;
        }
        let dir = std::env::var_os("POND_DATA_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".pond"));
        std::fs::read_to_string(dir.join("admin.token")).ok().map(|t| t.trim().to_string())
    });
    let project = overrides.project.clone().or_else(|| context.and_then(|c| c.project.clone()));
    Ok(Target { server, token, project })
}

/// Options of `pond run submit`.
#[derive(Debug, Clone, Default)]
pub struct SubmitOptions {
    /// The workflow file: a definition (`{"stages": …}`) or a whole request body.
    pub file: PathBuf,
    /// Project (overrides the file and the context).
    pub project: Option<String>,
    /// `--source`: a directory (packed and uploaded) or a git URL.
    pub sources: Vec<String>,
    /// `--ref` for git sources.
    pub git_ref: Option<String>,
    /// `Idempotency-Key`.
    pub idempotency_key: Option<String>,
    /// Encrypt the run's output to these X25519 public keys (base64); empty: not encrypted.
    pub recipients: Vec<String>,
    /// The consumer key file (X25519) whose derived Ed25519 key signs an encrypted request.
    pub signing_key: Option<PathBuf>,
}

fn label_for(source: &str, taken: &[String]) -> String {
    let base = source.trim_end_matches('/').rsplit('/').next().unwrap_or("repo").trim_end_matches(".git");
    let mut label: String = base.chars().filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c)).take(48).collect();
    if label.is_empty() || label.starts_with('.') {
        label = "repo".into();
    }
    let mut candidate = label.clone();
    let mut n = 2;
    while taken.contains(&candidate) {
        candidate = format!("{label}-{n}");
        n += 1;
    }
    candidate
}

/// Builds the request body of a submit: reads the file, uploads directory sources as bundles.
pub fn build_submit(client: &Client, target: &Target, options: &SubmitOptions) -> Result<serde_json::Value, CliError> {
    let text = std::fs::read_to_string(&options.file).map_err(io_err(format!("reading {}", options.file.display())))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| CliError::Input(format!("{} is not valid JSON: {e}", options.file.display())))?;
    let mut body = if value.get("definition").is_some() {
        value
    } else if value.get("stages").is_some() {
        serde_json::json!({ "definition": value })
    } else {
        return Err(CliError::Input(format!(
            "{} holds neither a definition (`stages`) nor a request (`definition`)",
            options.file.display()
        )));
    };
    let obj =
        body.as_object_mut().ok_or_else(|| CliError::Input("the workflow file must hold a JSON object".into()))?;
    let file_project =
        obj.get("project_id").or_else(|| obj.get("projectId")).and_then(|v| v.as_str()).map(str::to_string);
    let project = options.project.clone().or(file_project).or_else(|| target.project.clone()).ok_or_else(|| {
        CliError::Input("no project: pass --project, set POND_PROJECT, or set one on the context".into())
    })?;
    obj.remove("projectId");
    obj.insert("project_id".into(), project.clone().into());
    let mut sources: Vec<serde_json::Value> =
        obj.get("sources").and_then(|s| s.as_array()).cloned().unwrap_or_default();
    let mut labels: Vec<String> = sources.iter().filter_map(|s| s.get("label")?.as_str().map(str::to_string)).collect();
    for source in &options.sources {
        let label = label_for(source, &labels);
        labels.push(label.clone());
        if source.starts_with("https://") || source.starts_with("http://") {
            let mut config = serde_json::json!({ "url": source });
            if let Some(r) = &options.git_ref {
                config["ref"] = r.clone().into();
            }
            sources.push(serde_json::json!({"label": label, "kind": "git_https", "config": config}));
        } else {
            let dir = Path::new(source);
            if !dir.is_dir() {
                return Err(CliError::Input(format!("--source {source}: not a directory or an http(s) git URL")));
            }
            // What .gitignore and .pondignore list stays out; a source too large for the server
            // is refused here, before it is uploaded.
            let limit = client.bundle_limit()?;
            let (packed, stats) = pond_exec::pack_source(dir, limit.saturating_mul(10))
                .map_err(|e| CliError::Input(format!("--source {source}: {e}")))?;
            if packed.len() as u64 > limit {
                return Err(CliError::Input(format!(
                    "--source {source}: packs to {} bytes ({} files), above the server's bundle limit of {limit} bytes: leave out what the run does not need with .gitignore or .pondignore",
                    packed.len(),
                    stats.files
                )));
            }
            eprintln!(
                "packed {source}: {} files, {:.1} MiB ({:.1} MiB compressed); uploading",
                stats.files,
                stats.bytes as f64 / 1048576.0,
                packed.len() as f64 / 1048576.0
            );
            let bundle = client.upload_bundle(&project, &packed)?;
            sources
                .push(serde_json::json!({"label": label, "kind": "bundle", "config": {"bundle_id": bundle.bundle_id}}));
        }
    }
    obj.insert("sources".into(), serde_json::Value::Array(sources));
    if !options.recipients.is_empty() {
        obj.insert("encrypt".into(), true.into());
        obj.insert("recipient_pubkeys".into(), options.recipients.clone().into());
        if let Some(key) = &options.signing_key {
            sign_request(&mut body, key)?;
        }
    }
    Ok(body)
}

/// Adds `consumer_signature` to a run request: the signature, with the Ed25519 key derived from
/// the consumer key at `key_path`, over the request's canonical form (what the server keeps and
/// what every sealer checks before sealing to the request's recipients).
pub fn sign_request(body: &mut serde_json::Value, key_path: &Path) -> Result<(), CliError> {
    use pond_core::signed_request::{consumer_signing_seed, signed_fields, SignedRequest};
    let secret = pond_exec::load_or_create_key(key_path).map_err(io_err(format!("key {}", key_path.display())))?;
    if let Some(obj) = body.as_object_mut() {
        // Two identical submits are two requests, each signature good for one run.
        obj.entry("nonce").or_insert_with(|| hex::encode(pond_core::seal::random_bytes::<16>()).into());
    }
    let project = body.get("project_id").or_else(|| body.get("projectId")).and_then(|p| p.as_str()).unwrap_or_default();
    let signed = SignedRequest::sign(&consumer_signing_seed(&secret), &signed_fields(body, project));
    let signature = serde_json::to_value(signed.consumer_signature())
        .map_err(|e| CliError::Input(format!("encoding the signature: {e}")))?;
    if let Some(obj) = body.as_object_mut() {
        obj.insert("consumer_signature".into(), signature);
    }
    Ok(())
}

/// Decrypts a confidential run's log lines with this context's key, stream by stream (one
/// stream per stage attempt: its key header, its lines, its final record), each bound to its
/// place in the run. With [`LogDecryptor::verifying`], every stream's header must be signed by
/// a node or worker that ran the run, and [`LogDecryptor::check_whole`] then checks no stream
/// was cut short or removed.
pub struct LogDecryptor {
    path: PathBuf,
    run: String,
    key: Option<([u8; 32], [u8; 32])>,
    streams: std::collections::HashMap<(Option<String>, u32), pond_core::seal::LogOpener>,
    signers: Option<Signers>,
    policy: Policy,
}

/// What a reader requires of a run's output.
#[derive(Clone, Copy, Debug, Default)]
struct Policy {
    /// Every stdout/stderr record must be sealed (the run is confidential).
    sealed: bool,
    /// Only the current, place-bound formats (ENC2 streams, signed v2 sidecars): the run's
    /// request is signed, so it is not a run from before them.
    current: bool,
}

impl Policy {
    /// The policy for a run as its view shows it, and as this CLI knows it (`asked`: it
    /// submitted the run encrypted itself, whatever the view says now).
    fn of(view: &RunView, asked: bool) -> Policy {
        let signed = view.encryption.as_ref().is_some_and(|e| e.request.is_some());
        Policy { sealed: asked || view.encryption.is_some(), current: asked || signed }
    }
}

/// Where the keys that may sign a run's streams come from, and those fetched so far.
struct Signers {
    client: Client,
    known: Vec<[u8; 32]>,
}

impl Signers {
    /// The run's signing keys, fetched again when none known so far signed `header` (a stream's
    /// worker may have claimed it since).
    fn for_header(
        &mut self,
        run: &str,
        header: &str,
        place: &pond_core::seal::Place,
    ) -> Result<Vec<[u8; 32]>, CliError> {
        if pond_core::seal::header_signer(header, place, &self.known).is_err() {
            self.known = run_signers(&self.client, run)?;
        }
        pond_core::seal::header_signer(header, place, &self.known).map_err(|_| {
            CliError::Input(format!(
                "the log of stage `{}` (attempt {}) is signed by none of this run's nodes or workers \
                 (GET /v1/runs/{run}/keys) for this place: it was not written there by pond; refusing to show it",
                place.stage, place.attempt
            ))
        })?;
        Ok(self.known.clone())
    }
}

/// Checks every attestation a run shows against the pinned key of the worker that made it
/// (`GET /v1/runs/{id}/keys`): the signature over job, input, output manifest and exit code
/// must hold, whatever pond's own verdict says.
pub fn check_attestations(client: &Client, view: &RunView) -> Result<(), CliError> {
    let attested: Vec<_> = view
        .stages
        .iter()
        .flat_map(|s| s.attempts.iter().map(move |a| (s, a)))
        .filter_map(|(s, a)| a.attestation.as_ref().map(|r| (s, a, r)))
        .collect();
    if attested.is_empty() {
        return Ok(());
    }
    let keys = client.run_keys(&view.id.to_string())?;
    let control = control_plane_key(client)?;
    for (stage, attempt, record) in attested {
        let at = format!("the attestation of stage `{}` (attempt {})", stage.key, attempt.number);
        if !record.verified {
            // Pond said so itself; the stage failed under `required`, or it opted into `record`.
            continue;
        }
        let pinned =
            keys.workers.iter().find(|w| w.id == record.worker).and_then(|w| endorsed_worker(&control, w)).ok_or_else(
                || CliError::Input(format!("{at}: worker `{}` has no key the control plane endorsed", record.worker)),
            )?;
        let digest = |h: &str| hex::decode(h).ok().and_then(|b| <[u8; 32]>::try_from(b).ok());
        let signature = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &record.signature)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok());
        let checked = match (digest(&record.input_sha256), record.output_sha256.as_deref().and_then(digest), signature)
        {
            (Some(input_sha256), Some(output_sha256), Some(signature)) => pond_core::attest::Attestation {
                job_id: record.job_id.clone(),
                input_sha256,
                output_sha256,
                rc: record.rc,
            }
            .verify(&pinned, &signature)
            .map_err(|e| e.to_string()),
            _ => Err("malformed".to_string()),
        };
        checked.map_err(|e| {
            CliError::Input(format!("{at} does not verify under worker `{}`'s pinned key: {e}", record.worker))
        })?;
    }
    Ok(())
}

/// The control plane's key, as the server serves it from its configuration (not from the
/// database): what every node and worker key must be endorsed by.
pub fn control_plane_key(client: &Client) -> Result<[u8; 32], CliError> {
    let keys = client.keys()?;
    pond_core::transparency::decode32(&keys.control_plane_key)
        .ok_or_else(|| CliError::Input("the server's control-plane key is not a 32-byte base64 key".into()))
}

/// The Ed25519 keys of the nodes and workers that ran `run`'s attempts, each only if the control
/// plane endorsed it: a key written into the database by someone without the server key is not
/// among them.
fn run_signers(client: &Client, run: &str) -> Result<Vec<[u8; 32]>, CliError> {
    let control = control_plane_key(client)?;
    let keys = client.run_keys(run)?;
    let nodes = keys.control_plane.iter().filter_map(|n| {
        let key = pond_core::transparency::decode32(&n.signing_key)?;
        pond_core::keys::endorsed(&control, "node", &n.node_id, &key, &n.endorsement).then_some(key)
    });
    let workers = keys.workers.iter().filter_map(|w| endorsed_worker(&control, w));
    Ok(nodes.chain(workers).collect())
}

/// A worker's signing key, if the control plane endorsed it.
pub fn endorsed_worker(control: &[u8; 32], worker: &crate::keys_api::WorkerKeys) -> Option<[u8; 32]> {
    let key = pond_core::transparency::decode32(worker.signing_key.as_deref()?)?;
    pond_core::keys::endorsed(control, "worker", &worker.id, &key, worker.endorsement.as_deref()?).then_some(key)
}

impl LogDecryptor {
    /// A decryptor for `run`'s log with the consumer key at `path`, read when the first
    /// encrypted line comes. It does not check who signed the streams; see
    /// [`LogDecryptor::verifying`].
    pub fn new(path: &Path, run: &str) -> Result<Self, CliError> {
        Ok(LogDecryptor {
            path: path.to_path_buf(),
            run: run.to_string(),
            key: None,
            streams: Default::default(),
            signers: None,
            policy: Policy::default(),
        })
    }

    /// Checks every stream's key header and final record against the keys of the nodes and
    /// workers that ran the run (`GET /v1/runs/{id}/keys`) before showing any of its lines, and
    /// holds a confidential run's log to its formats: a clear-text output line, or an older
    /// stream format in a run whose request is signed, is refused. `asked`: this CLI submitted
    /// the run encrypted, so a view that now says otherwise is not believed.
    pub fn verifying(mut self, client: &Client, asked: bool) -> Result<Self, CliError> {
        let view = client.get_run(&self.run)?;
        if asked && view.encryption.is_none() {
            return Err(CliError::Input(format!(
                "run {} was submitted encrypted by this CLI but the server shows it without encryption: refusing to read it",
                self.run
            )));
        }
        self.policy = Policy::of(&view, asked);
        self.signers = Some(Signers { client: client.clone(), known: Vec::new() });
        Ok(self)
    }

    fn key(&mut self) -> Result<([u8; 32], [u8; 32]), CliError> {
        if let Some(key) = self.key {
            return Ok(key);
        }
        if !self.path.exists() {
            return Err(CliError::Input(format!(
                "this run is encrypted and there is no key at {} (the key of this CLI context; `pond keys path`)",
                self.path.display()
            )));
        }
        let secret =
            pond_exec::load_or_create_key(&self.path).map_err(io_err(format!("key {}", self.path.display())))?;
        let key = (pond_core::keys::x25519_public(&secret), secret);
        self.key = Some(key);
        Ok(key)
    }

    /// The line as it should be shown: decrypted, passed through if plaintext, or `None` for a
    /// key header or final record.
    pub fn line(&mut self, line: &LogLine) -> Result<Option<LogLine>, CliError> {
        let l = &line.line;
        let stream = (l.stage.clone(), l.attempt);
        let place = pond_core::seal::Place::new(&self.run, l.stage.as_deref().unwrap_or_default(), l.attempt);
        let problem = |what: &str, e: pond_core::seal::SealError| {
            CliError::Input(format!(
                "the log of stage `{}` (attempt {}) {what}: {e}; refusing to show it",
                place.stage, place.attempt
            ))
        };
        if self.policy.current && l.text.starts_with("ENC1K:") {
            return Err(problem(
                "is in the older ENC1 format (bound to no place), in a run whose request is signed",
                pond_core::seal::SealError::Malformed("stream format"),
            ));
        }
        if l.text.starts_with("ENC2K:") || l.text.starts_with("ENC1K:") {
            let signers = match self.signers.as_mut() {
                Some(signers) => signers.for_header(&self.run, &l.text, &place)?,
                None => Vec::new(),
            };
            let (public, secret) = self.key()?;
            let opener = pond_core::seal::LogOpener::from_header(&l.text, &public, &secret, &place, &signers)
                .map_err(|e| explain(&public, e))?;
            if self.streams.insert(stream, opener).is_some() {
                return Err(problem("has two key headers", pond_core::seal::SealError::Malformed("stream")));
            }
            return Ok(None);
        }
        if l.text.starts_with("ENC2F:") {
            let opener = self.streams.get_mut(&stream).ok_or_else(|| {
                problem("has a final record before its key header", pond_core::seal::SealError::Malformed("stream"))
            })?;
            opener.end(&l.text).map_err(|e| problem("does not end as it was written", e))?;
            return Ok(None);
        }
        if !l.text.starts_with("ENC2:") && !l.text.starts_with("ENC1:") {
            if self.policy.sealed && l.stream != pond_core::store::LogStream::System {
                return Err(CliError::Input(format!(
                    "the log of stage `{}` (attempt {}) has a clear-text {} line in a confidential run: pond did not write it; refusing to show it",
                    place.stage,
                    place.attempt,
                    l.stream.as_str()
                )));
            }
            return Ok(Some(line.clone()));
        }
        let opener = self
            .streams
            .get_mut(&stream)
            .ok_or_else(|| CliError::Input("an encrypted log line came before its key header".into()))?;
        let bytes = match opener.open_line(&l.text, l.stream, l.continued) {
            Ok(bytes) => bytes,
            Err(e @ pond_core::seal::SealError::NotRecipient(_)) => return Err(explain(&self.key()?.0, e)),
            Err(e) => return Err(problem("was altered", e)),
        };
        let mut plain = line.clone();
        (plain.line.text, plain.line.encoding) = pond_core::store::encode_line(&bytes);
        Ok(Some(plain))
    }

    /// Whether the stream of `stage` attempt `attempt` was read whole (its final record checked):
    /// `None` when the log holds no stream of it.
    pub fn stream_whole(&self, stage: &str, attempt: u32) -> Option<bool> {
        self.streams.get(&(Some(stage.to_string()), attempt)).map(|o| o.complete().is_ok())
    }

    /// After the whole log was read: every stream of an attempt that ended (not lost with its
    /// holder) ends with its final record, and every attempt that succeeded has a stream. A
    /// stream cut short, or removed, is an error.
    pub fn check_whole(&self, run: &RunView) -> Result<(), CliError> {
        use pond_core::run::AttemptOutcome;
        if !self.policy.sealed && run.encryption.is_none() {
            return Ok(());
        }
        for stage in &run.stages {
            for attempt in &stage.attempts {
                let ended = matches!(
                    attempt.outcome,
                    Some(AttemptOutcome::Succeeded | AttemptOutcome::Failed | AttemptOutcome::Cancelled)
                );
                let at = format!("stage `{}` (attempt {})", stage.key, attempt.number);
                match self.streams.get(&(Some(stage.key.clone()), attempt.number)) {
                    Some(opener) if ended => {
                        opener.complete().map_err(|e| CliError::Input(format!("the log of {at} is not whole: {e}")))?
                    }
                    None if attempt.outcome == Some(AttemptOutcome::Succeeded) => {
                        return Err(CliError::Input(format!(
                            "the log of {at} is missing: a succeeded attempt always writes one (it was removed)"
                        )))
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Decrypts an output artifact downloaded with its sidecar, checking it belongs to its
    /// place and name (and, with `signers`, who wrote it).
    pub fn artifact(
        &mut self,
        data: &[u8],
        sidecar: &str,
        artifact: &pond_core::store::Artifact,
        signers: &[[u8; 32]],
    ) -> Result<Vec<u8>, CliError> {
        let (public, secret) = self.key()?;
        let place = pond_core::seal::Place::new(&self.run, &artifact.stage, artifact.attempt);
        let minimum = if self.policy.current { 2 } else { 1 };
        pond_core::seal::open_output_artifact(data, sidecar, &public, &secret, &place, &artifact.name, signers, minimum)
            .map_err(|e| match e {
                pond_core::seal::SealError::NotRecipient(_) => explain(&public, e),
                other => CliError::Input(format!(
                    "artifact `{}` of stage `{}` (attempt {}) does not open as written there: {other}",
                    artifact.name, artifact.stage, artifact.attempt
                )),
            })
    }
}

fn explain(public: &[u8; 32], e: pond_core::seal::SealError) -> CliError {
    let fp = pond_core::attest::fingerprint(public);
    match e {
        pond_core::seal::SealError::NotRecipient(_) => CliError::Input(format!(
            "this run is encrypted to other keys: yours ({fp}, `pond keys show`) is not among its recipients"
        )),
        other => CliError::Input(format!("decrypting the log failed: {other}")),
    }
}

/// Downloads an artifact, decrypting it when it has a `.pondkey` sidecar: it must open as
/// the output `name` of the attempt that stored it, with its sidecar signed by a node or worker
/// that ran the run. (Several artifacts of one run: [`ArtifactFetcher`].)
pub fn fetch_artifact(client: &Client, run: &str, name: &str, key: &Path) -> Result<Vec<u8>, CliError> {
    ArtifactFetcher::new(client, run, key)?.fetch(name)
}

/// Downloads and checks a run's artifacts, reading the run, its listing and its signers' keys
/// once for all of them.
pub struct ArtifactFetcher<'a> {
    client: &'a Client,
    run: String,
    key: PathBuf,
    view: RunView,
    listing: Vec<pond_core::store::Artifact>,
    signers: Option<Vec<[u8; 32]>>,
}

impl<'a> ArtifactFetcher<'a> {
    /// A fetcher for `run`'s artifacts, opened with the consumer key at `key`.
    pub fn new(client: &'a Client, run: &str, key: &Path) -> Result<Self, CliError> {
        Ok(ArtifactFetcher {
            client,
            run: run.to_string(),
            key: key.to_path_buf(),
            view: client.get_run(run)?,
            listing: client.artifacts(run)?.artifacts,
            signers: None,
        })
    }

    /// The artifact `name`, decrypted and checked (see [`fetch_artifact`]).
    pub fn fetch(&mut self, name: &str) -> Result<Vec<u8>, CliError> {
        let (client, run) = (self.client, self.run.as_str());
        let mut data = Vec::new();
        client.download_artifact(run, name, &mut data)?;
        if name.ends_with(pond_core::seal::SIDECAR_SUFFIX) {
            return Ok(data);
        }
        let mut sidecar = Vec::new();
        match client.download_artifact(run, &format!("{name}{}", pond_core::seal::SIDECAR_SUFFIX), &mut sidecar) {
            Ok(_) => {
                let sidecar =
                    String::from_utf8(sidecar).map_err(|_| CliError::Input("the sidecar is not UTF-8".into()))?;
                let listed = self
                    .listing
                    .iter()
                    .find(|a| a.name == name)
                    .ok_or_else(|| CliError::Input(format!("artifact `{name}` is not in the run's listing")))?;
                let signers = match &self.signers {
                    Some(signers) => signers,
                    None => self.signers.insert(run_signers(client, run)?),
                };
                let mut reader = LogDecryptor::new(&self.key, run)?;
                reader.policy = Policy::of(&self.view, false);
                reader.artifact(&data, &sidecar, listed, signers)
            }
            // In clear only in a run that is: a confidential run's artifact without its sidecar
            // was not stored by pond.
            Err(e) if e.status() == Some(404) && self.view.encryption.is_none() => Ok(data),
            Err(e) if e.status() == Some(404) => Err(CliError::Input(format!(
                "artifact `{name}` of a confidential run has no key sidecar: pond did not store it so; refusing it"
            ))),
            Err(e) => Err(e.into()),
        }
    }
}

/// Where the consumer key of a context lives: `keys/<context>.x25519` beside the config file
/// (`default` when no context is in use).
pub fn consumer_key_path(config_path: &Path, context: Option<&str>) -> PathBuf {
    let dir = config_path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    // The built-in context's key is the one used before contexts had names.
    let name = match context {
        None => "default",
        Some(LOCAL_CONTEXT) => "default",
        Some(name) => name,
    };
    dir.join("keys").join(format!("{name}.x25519"))
}

/// A consumer's X25519 key as `pond keys show` presents it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConsumerKey {
    /// Base64 of the 32-byte public key (what `recipientPubkeys` takes).
    pub public_key: String,
    /// The same key as an age recipient.
    pub age_recipient: String,
    /// `SHA256:…` of the public key.
    pub fingerprint: String,
    /// The private key file (0600).
    pub path: PathBuf,
}

/// The consumer key at `path`, made on first use; with `replace`, a new key in its place.
pub fn consumer_key(path: &Path, replace: bool) -> Result<ConsumerKey, CliError> {
    use base64::Engine as _;
    if replace && path.exists() {
        std::fs::remove_file(path).map_err(io_err(format!("removing {}", path.display())))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    }
    let secret = pond_exec::load_or_create_key(path).map_err(io_err(format!("key {}", path.display())))?;
    let public = pond_core::keys::x25519_public(&secret);
    Ok(ConsumerKey {
        public_key: base64::engine::general_purpose::STANDARD.encode(public),
        age_recipient: pond_core::keys::age_recipient(&public),
        fingerprint: pond_core::attest::fingerprint(&public),
        path: path.to_path_buf(),
    })
}

/// Writes log lines for a terminal: `-- text` for pond's own lines, `[stage] text` for output
/// (`[stage!]` for stderr), the line's bytes exactly as the process wrote them. Pieces of a
/// long line (`continued`) are written as one line, as they arrive.
#[derive(Default)]
pub struct LinePrinter {
    /// The line being written (stage, attempt, stream), when its last piece has not come yet.
    open: Option<(Option<String>, u32, LogStream)>,
}

impl LinePrinter {
    /// Writes one record.
    pub fn print(&mut self, out: &mut dyn Write, line: &LogLine) -> std::io::Result<()> {
        let l = &line.line;
        let key = (l.stage.clone(), l.attempt, l.stream);
        let bytes = l.bytes().unwrap_or_else(|e| format!("<{e}>").into_bytes());
        if self.open.as_ref() != Some(&key) {
            if self.open.take().is_some() {
                // Another stream spoke while a long line was being written.
                out.write_all(b"\n")?;
            }
            let prefix = match (l.stream, &l.stage) {
                (LogStream::System, _) => "-- ".to_string(),
                (LogStream::Stdout, Some(stage)) => format!("[{stage}] "),
                (LogStream::Stderr, Some(stage)) => format!("[{stage}!] "),
                (_, None) => String::new(),
            };
            out.write_all(prefix.as_bytes())?;
        }
        out.write_all(&bytes)?;
        if l.continued {
            self.open = Some(key);
        } else {
            out.write_all(b"\n")?;
        }
        Ok(())
    }
}

/// Follows a run's log to its end, printing each line (or JSON lines), and returns how it
/// ended.
pub fn wait(
    client: &Client,
    run: &str,
    out: &mut dyn Write,
    json: bool,
    decrypt: &mut LogDecryptor,
) -> Result<LogEnd, CliError> {
    let mut failed: Option<CliError> = None;
    let mut printer = LinePrinter::default();
    let end = client.follow_logs(run, 0, &mut |line| {
        if failed.is_some() {
            return;
        }
        let line = match decrypt.line(line) {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(e) => {
                failed = Some(e);
                return;
            }
        };
        let written = if json {
            writeln!(out, "{}", serde_json::to_string(&line).unwrap_or_default())
        } else {
            printer.print(out, &line)
        };
        if let Err(e) = written {
            failed.get_or_insert(io_err("writing output")(e));
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(end)
}

/// The process exit code for a run's final state: 0 succeeded, 1 failed, 3 cancelled.
pub fn exit_code(state: RunState) -> i32 {
    match state {
        RunState::Succeeded => 0,
        RunState::Failed => 1,
        RunState::Cancelled => 3,
        RunState::Queued | RunState::Running => 4,
    }
}

fn ts(t: Option<pond_core::time::Timestamp>) -> String {
    t.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into())
}

/// A run as text: header, sources and a table of stages.
pub fn format_run(run: &RunView) -> String {
    let mut s = String::new();
    s.push_str(&format!("run      {}\nproject  {}\nstate    {}\n", run.id, run.project_id, run.state));
    s.push_str(&format!("created  {}\nfinished {}\n", run.created_at, ts(run.finished_at)));
    if let Some(e) = &run.error {
        s.push_str(&format!("error    {e}\n"));
    }
    for src in &run.sources {
        let resolved = src
            .resolved
            .as_ref()
            .map(|r| {
                format!(
                    "input_sha {}{}",
                    r.input_sha,
                    r.commit.as_ref().map(|c| format!(" commit {c}")).unwrap_or_default()
                )
            })
            .unwrap_or_else(|| "not fetched yet".into());
        s.push_str(&format!("source   {} ({}): {resolved}\n", src.label, source_kind(&src.spec)));
    }
    s.push_str(&format!(
        "\n{:<20} {:<9} {:<6} {:<10} {:>8}  {:<12} {}\n",
        "STAGE", "EXECUTOR", "WHERE", "STATE", "ATTEMPT", "ATTESTATION", "ERROR"
    ));
    for st in &run.stages {
        let attestation = match st.attestation_verified {
            Some(true) => "verified",
            Some(false) => "NOT verified",
            None => "-",
        };
        s.push_str(&format!(
            "{:<20} {:<9} {:<6} {:<10} {:>8}  {:<12} {}\n",
            st.key,
            st.executor,
            st.placement,
            st.state.as_str(),
            format!("{}/{}", st.attempt, st.max_attempts),
            attestation,
            st.error.clone().unwrap_or_default()
        ));
        if let Some(waiting) = &st.waiting_for {
            s.push_str(&format!("{:<20} waits for {waiting}\n", ""));
        }
    }
    s
}

fn source_kind(spec: &pond_core::source::SourceSpec) -> &'static str {
    match spec {
        pond_core::source::SourceSpec::GitHttps { .. } => "git_https",
        pond_core::source::SourceSpec::Local { .. } => "local",
        pond_core::source::SourceSpec::Bundle { .. } => "bundle",
    }
}

/// A page of runs as a table.
pub fn format_run_page(page: &RunPage) -> String {
    let mut s = format!("{:<36}  {:<16} {:<10} {:>6}  {}\n", "RUN", "PROJECT", "STATE", "STAGES", "CREATED");
    for r in &page.runs {
        s.push_str(&format!(
            "{:<36}  {:<16} {:<10} {:>6}  {}\n",
            r.id,
            r.project_id,
            r.state.as_str(),
            r.stages,
            r.created_at
        ));
    }
    if let Some(c) = page.next_cursor {
        s.push_str(&format!("(more: --cursor {c})\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_resolve_flags_then_context_then_local_default() {
        let mut config = CliConfig::default();
        config.contexts.insert(
            "prod".into(),
            Context {
                server: "https://pond.example".into(),
                token: Some("t1".into()),
                project: Some("acme".into()),
                ca_cert: None,
            },
        );
        config.current = Some("prod".into());
        let t = resolve_target(&config, &TargetOverrides::default()).unwrap();
        assert_eq!(
            (t.server.as_str(), t.token.as_deref(), t.project.as_deref()),
            ("https://pond.example", Some("t1"), Some("acme"))
        );
        let o = TargetOverrides { server: Some("http://other".into()), token: Some("t2".into()), ..Default::default() };
        let t = resolve_target(&config, &o).unwrap();
        assert_eq!((t.server.as_str(), t.token.as_deref()), ("http://other", Some("t2")));
        let missing = TargetOverrides { context: Some("nope".into()), ..Default::default() };
        assert!(resolve_target(&config, &missing).unwrap_err().to_string().contains("no context named `nope`"));
        let t = resolve_target(&CliConfig::default(), &TargetOverrides::default()).unwrap();
        assert_eq!(t.server, DEFAULT_SERVER);
    }

    #[test]
    fn config_round_trips_with_private_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config.json");
        assert_eq!(CliConfig::load(&path).unwrap(), CliConfig::default());
        let mut config = CliConfig::default();
        config.contexts.insert(
            "a".into(),
            Context { server: "http://x".into(), token: Some("secret".into()), project: None, ca_cert: None },
        );
        config.save(&path).unwrap();
        assert_eq!(CliConfig::load(&path).unwrap(), config);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn labels_come_from_source_names_and_stay_unique() {
        assert_eq!(label_for("https://example.com/acme/widgets.git", &[]), "widgets");
        assert_eq!(label_for("./examples/repo/", &[]), "repo");
        assert_eq!(label_for("/tmp/x", &["x".into()]), "x-2");
        assert_eq!(label_for(".", &[]), "repo");
    }
}
