//! The [`Engine`]: submits runs and moves their stages through the state machine over a
//! [`Store`], running claimed stages with the [`Executor`] of their kind.
//!
//! The engine decides; it does not loop or sleep. A driver (in `pond-exec`) calls
//! [`Engine::claim`], runs each claim with [`Engine::execute`] while renewing its lease with
//! [`Engine::renew`], and reports with [`Engine::complete`]. Time comes from the injected
//! [`Clock`], so tests step a fake clock through leases and backoff.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::definition::POOL_KIND;
use crate::definition::{Capabilities, Definition, SandboxProfile};
use crate::error::{CoreError, FieldError, StoreError};
use crate::exec::{ExecContext, Executor, OutputSink, StopReason, StopSignal, Workspace, Workspaces};
use crate::ids::RunId;
use crate::pool::{JobId, PoolMember};
use crate::run::{AttestationRecord, Run, RunSnapshot, RunState, StageOutcome, MAX_LOST_LEASES};
use crate::source::{SourceInput, SourcePolicy, SourceSpec};
use crate::store::{Artifact, Claim, ClaimQuery, LeaseStatus, LogStream, NewLogLine, Store};
use crate::time::{Clock, Millis, Timestamp};

/// Most sources a run may have.
pub const MAX_SOURCES: usize = 16;

/// Executor kinds a pool worker runs (`executor.placement: pool`).
pub const POOL_EXECUTOR_KINDS: [&str; 3] = ["noop", "shell", "swarm"];

/// Settings of an engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// This node's name in leases and attempt history.
    pub node_id: String,
    /// How long a claim holds a stage without renewal.
    pub lease: Millis,
    /// Rules for sources.
    pub source_policy: SourcePolicy,
    /// Ed25519 seed that signs the log key headers of confidential runs run here.
    pub signing_seed: [u8; 32],
    /// The server key: what pond keeps at rest that is not already encrypted to a consumer
    /// (pooled jobs' inputs, credentials) is sealed under it. The same on every node.
    pub at_rest_key: [u8; 32],
    /// Server keys still accepted for opening while a rotation re-seals what they sealed (see
    /// [`crate::server_keys`]).
    pub previous_keys: Vec<[u8; 32]>,
    /// Server keys accepted for opening only (a rotation under way on other nodes).
    pub next_keys: Vec<[u8; 32]>,
    /// The root of the control plane's signing identity (endorsements, transparency heads, job
    /// tickets), kept in the store sealed under the server key so a rotation leaves it as it is.
    pub identity_key: [u8; 32],
    /// Tag prefixes the operator reserves beyond `pool:` and `tenant:` (consumers cannot use
    /// them in a stage's tags).
    pub reserved_tag_prefixes: Vec<String>,
    /// What a pooled result that fails verification does when its stage does not say.
    pub attestation_default: crate::definition::AttestationPolicy,
    /// Most bytes of output kept per stage attempt; more is dropped after a truncation note.
    pub max_log_bytes: u64,
    /// How long output is retried while the store is away before the stage fails for it.
    pub delivery_budget: Millis,
    /// Origins a model's `base_url` may point at besides the providers' own APIs.
    pub model_origins: Vec<String>,
    /// Most bytes all of a run's artifacts may take together.
    pub max_run_artifact_bytes: u64,
    /// Most bytes of uploaded bundles no run uses yet a project may hold (see
    /// [`crate::bundles`]).
    pub max_pending_bundle_bytes: u64,
    /// How long an uploaded bundle no run uses is kept.
    pub bundle_ttl: Millis,
}

/// The per-run artifact cap unless the operator sets one: 4 GiB.
pub const DEFAULT_MAX_RUN_ARTIFACT_BYTES: u64 = 4 * 1024 * 1024 * 1024;

/// What a project may hold of uploaded bundles no run uses, unless the operator sets it: 1 GiB.
pub const DEFAULT_MAX_PENDING_BUNDLE_BYTES: u64 = 1024 * 1024 * 1024;

/// The per-stage log cap unless the operator sets one: 64 MiB.
pub const DEFAULT_MAX_LOG_BYTES: u64 = 64 * 1024 * 1024;

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            node_id: "node".into(),
            lease: Millis::from_secs(30),
            source_policy: SourcePolicy::default(),
            signing_seed: crate::seal::random_key(),
            at_rest_key: crate::seal::random_key(),
            previous_keys: Vec::new(),
            next_keys: Vec::new(),
            identity_key: crate::seal::random_key(),
            reserved_tag_prefixes: Vec::new(),
            attestation_default: crate::definition::AttestationPolicy::Required,
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
            delivery_budget: Millis::from_secs(300),
            model_origins: Vec::new(),
            max_run_artifact_bytes: DEFAULT_MAX_RUN_ARTIFACT_BYTES,
            max_pending_bundle_bytes: DEFAULT_MAX_PENDING_BUNDLE_BYTES,
            bundle_ttl: Millis::from_secs(3600),
        }
    }
}

/// A run submission, after the transport decoded it.
#[derive(Clone, Debug)]
pub struct SubmitRequest {
    /// The consumer's project.
    pub project_id: String,
    /// The workflow.
    pub definition: Definition,
    /// Sources to check out.
    pub sources: Vec<SourceInput>,
    /// Retried submits with the same key return the first run.
    pub idempotency_key: Option<String>,
    /// Encrypt the run's output to these X25519 public keys (base64); empty: not encrypted.
    pub recipients: Vec<String>,
    /// The consumer's signature over the request, required when `recipients` is not empty: it
    /// must cover the project and every recipient (see [`crate::signed_request`]).
    pub signed: Option<crate::signed_request::SignedRequest>,
}

/// SHA-256 (hex) of what a submit asks for — project, definition, sources, recipients — as
/// submitted, not its key. Decoded and re-encoded through `serde_json::Value`, whose maps are
/// ordered, so key order and spacing in the request do not matter.
fn request_digest(request: &SubmitRequest, project: &str) -> Result<String, CoreError> {
    #[derive(serde::Serialize)]
    struct Asked<'a> {
        project_id: &'a str,
        definition: &'a Definition,
        sources: &'a [SourceInput],
        recipients: &'a [String],
    }
    let asked = Asked {
        project_id: project,
        definition: &request.definition,
        sources: &request.sources,
        recipients: &request.recipients,
    };
    let value = serde_json::to_value(&asked)
        .map_err(|e| CoreError::Store(StoreError::Backend(format!("encoding the request's digest: {e}"))))?;
    Ok(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(value.to_string().as_bytes())))
}

/// Counts an attempt's end and its duration, by executor and outcome.
fn record_finish(snapshot: &RunSnapshot, key: &str, attempt: u32, now: Timestamp) {
    let Some(done) = snapshot.attempts.iter().find(|a| a.stage_key == key && a.number == attempt) else { return };
    let executor = snapshot
        .run
        .definition
        .stages
        .iter()
        .find(|d| d.key == key)
        .map(|d| d.executor.kind().to_string())
        .unwrap_or_default();
    let outcome = done.outcome.map(|o| format!("{o:?}").to_ascii_lowercase()).unwrap_or_else(|| "unknown".into());
    let seconds = (now.as_millis() - done.started_at.as_millis()).max(0) as f64 / 1000.0;
    metrics::histogram!("pond_stage_duration_seconds", "executor" => executor.clone()).record(seconds);
    metrics::counter!("pond_stages_finished_total", "executor" => executor, "outcome" => outcome).increment(1);
}

/// Record kind of a used consumer signature (base64), holding the id of its run.
const REQUEST_SIGNATURE: &str = "request_signature";

/// Record kind of a control-plane node's log-signing key, keyed by node id.
pub(crate) const LOG_SIGNER: &str = "log_signer";

/// A control-plane node's log-signing key.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogSigner {
    /// The node (the owner of the local attempts it runs).
    pub node_id: String,
    /// Base64 Ed25519 public key.
    pub signing_key: String,
    /// `SHA256:…` of it.
    pub fingerprint: String,
    /// The control plane's endorsement of the key for this node ([`crate::keys::endorse`]).
    #[serde(default)]
    pub endorsement: String,
}

/// The most recipients a confidential run may have: every log stream header and artifact
/// sidecar carries one sealed key per recipient.
pub const MAX_RECIPIENTS: usize = 16;

/// The consumer's signed request of a confidential submit, checked: it verifies, and it was
/// signed for this project and these recipients (as decoded keys; the same set).
fn check_signed(
    signed: Option<&crate::signed_request::SignedRequest>,
    project: &str,
    recipients: &[String],
) -> Result<crate::signed_request::SignedRequest, CoreError> {
    let field = "consumer_signature";
    let signed = signed.ok_or_else(|| {
        FieldError::new(
            field,
            "is required for an encrypted run: the consumer's Ed25519 signature over the request \
             (definition, project_id, recipient_pubkeys, sources; FORMATS.md \"Signed requests\"); \
             the CLI signs with its context's key",
        )
    })?;
    let body = signed.verify().map_err(|e| FieldError::new(field, e.to_string()))?;
    if body.project_id != project {
        return Err(
            FieldError::new(field, format!("was made for project `{}`, not `{project}`", body.project_id)).into()
        );
    }
    let keys: Vec<[u8; 32]> = recipients.iter().filter_map(|r| crate::pool::decode_key(r).ok()).collect();
    if keys.iter().any(|k| !body.recipients.contains(k)) || body.recipients.iter().any(|k| !keys.contains(k)) {
        return Err(FieldError::new(field, "covers other recipients than `recipient_pubkeys`").into());
    }
    Ok(signed.clone())
}

/// The result of a submit.
#[derive(Clone, Debug)]
pub struct Submitted {
    /// The run.
    pub snapshot: RunSnapshot,
    /// False when an earlier submit with the same idempotency key made it.
    pub created: bool,
}

/// Drives runs through their stages.
pub struct Engine {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    pause: Arc<dyn crate::time::Pause>,
    executors: HashMap<&'static str, Arc<dyn Executor>>,
    workspaces: Arc<dyn Workspaces>,
    sandbox_profiles: Vec<SandboxProfile>,
    config: EngineConfig,
    /// The transparency log's tree as this node has read it (see [`Engine::with_log_tree`]).
    log_tree: std::sync::Mutex<crate::merkle::Tree>,
    /// Inputs this node issued to pooled jobs, by run: a run's input never changes once
    /// issued, and its result, usually posted to the node that issued it, checks against it
    /// without reading it back (a miss reads the store, as on any other node).
    issued_inputs: std::sync::Mutex<HashMap<RunId, JobInput>>,
}

/// How many runs' issued inputs a node keeps in memory (then it starts again empty).
const ISSUED_INPUTS_KEPT: usize = 10_000;

impl Engine {
    /// An engine with no executors; add them with [`Engine::with_executor`].
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        workspaces: Arc<dyn Workspaces>,
        config: EngineConfig,
    ) -> Self {
        Engine {
            store,
            clock,
            pause: Arc::new(crate::time::NoPause),
            executors: HashMap::new(),
            workspaces,
            sandbox_profiles: vec![SandboxProfile::None],
            config,
            log_tree: std::sync::Mutex::default(),
            issued_inputs: std::sync::Mutex::default(),
        }
    }

    fn remember_issued_input(&self, run: RunId, input: &JobInput) {
        let mut kept = self.issued_inputs.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() >= ISSUED_INPUTS_KEPT {
            kept.clear();
        }
        kept.insert(run, input.clone());
    }

    /// How the engine waits between retries of a write the store refused for being away (the
    /// caller's runtime's sleep).
    pub fn with_pause(mut self, pause: Arc<dyn crate::time::Pause>) -> Self {
        self.pause = pause;
        self
    }

    /// Registers an executor for its kind.
    pub fn with_executor(mut self, executor: Arc<dyn Executor>) -> Self {
        self.executors.insert(executor.kind(), executor);
        self
    }

    /// Sets the sandbox profiles stages may ask for (what the sandbox backend enforces).
    pub fn with_sandbox_profiles(mut self, profiles: Vec<SandboxProfile>) -> Self {
        self.sandbox_profiles = profiles;
        self
    }

    /// How it waits between retries.
    pub fn pause(&self) -> &Arc<dyn crate::time::Pause> {
        &self.pause
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The settings.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Agent stages name a registered harness and model: an unknown one is a 422 at submit,
    /// not a failed run later.
    async fn check_agents(&self, definition: &mut Definition, project: &str) -> Result<(), CoreError> {
        let registry = self.registry();
        let store_err = |e: crate::agents::RegistryError| match e {
            crate::agents::RegistryError::Store(s) => CoreError::Store(s),
            other => CoreError::Store(StoreError::Backend(other.to_string())),
        };
        for (i, stage) in definition.stages.iter_mut().enumerate() {
            let crate::definition::ExecutorSpec::Swarm(swarm) = &mut stage.executor else { continue };
            let at = format!("definition.stages[{i}].executor");
            let Some(harness) = registry.harness(&swarm.harness).await.map_err(store_err)? else {
                return Err(FieldError::new(
                    format!("{at}.harness"),
                    format!("no harness `{}` is registered (`pond admin harnesses from-preset codex`)", swarm.harness),
                )
                .into());
            };
            // A pool worker must have the harness installed: its capability is required.
            if !swarm.capabilities.contains(&harness.capability) {
                swarm.capabilities.push(harness.capability.clone());
            }
            if let Some(model) = &swarm.model_ref {
                let Some(found) = registry.model(model).await.map_err(store_err)? else {
                    return Err(FieldError::new(
                        format!("{at}.model_ref"),
                        format!("no model `{model}` is registered (`pond admin models add`)"),
                    )
                    .into());
                };
                // The model's key is a credential: the project must be allowed to use it.
                if let Err(e) = self.credentials().check(&found.credential_name, project).await {
                    return Err(FieldError::new(format!("{at}.model_ref"), format!("model `{model}`: {e}")).into());
                }
            }
        }
        Ok(())
    }

    /// Publishes this node's log-signing key (what signs the `ENC1K:` headers of the local
    /// stages it runs) under its node id, so readers can check those headers.
    pub async fn publish_log_signer(&self) -> Result<(), CoreError> {
        let key = crate::keys::ed25519_public(&self.config.signing_seed);
        let signer = LogSigner {
            node_id: self.config.node_id.clone(),
            signing_key: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, key),
            fingerprint: crate::attest::fingerprint(&key),
            endorsement: crate::keys::endorse(&self.config.identity_key, "node", &self.config.node_id, &key),
        };
        let body = serde_json::to_string(&signer)
            .map_err(|e| CoreError::Store(StoreError::Backend(format!("encoding the log signer: {e}"))))?;
        self.store.put_record(LOG_SIGNER, &signer.node_id, &body).await?;
        // This node's earlier starts (other node ids, the same key, which only this node's data
        // directory holds) wrote records before endorsements existed: endorse those, so the
        // streams of older runs stay readable. Records of other keys are left as they are.
        for (id, text) in self.store.list_records(LOG_SIGNER).await? {
            let Ok(mut old) = serde_json::from_str::<LogSigner>(&text) else { continue };
            if old.signing_key == signer.signing_key && old.endorsement.is_empty() {
                old.endorsement = crate::keys::endorse(&self.config.identity_key, "node", &old.node_id, &key);
                if let Ok(body) = serde_json::to_string(&old) {
                    self.store.put_record(LOG_SIGNER, &id, &body).await?;
                }
            }
        }
        Ok(())
    }

    /// The log-signing keys control-plane nodes published, by node id.
    pub async fn log_signers(&self) -> Result<Vec<LogSigner>, CoreError> {
        let mut all = Vec::new();
        for (_, body) in self.store.list_records(LOG_SIGNER).await? {
            // A record that does not parse is no signer anyone can check against.
            if let Ok(signer) = serde_json::from_str::<LogSigner>(&body) {
                all.push(signer);
            }
        }
        Ok(all)
    }

    /// Appends a leaf about `run` to the transparency log.
    pub async fn log_leaf(&self, run: RunId, leaf: &str) -> Result<u64, CoreError> {
        let hash = crate::merkle::leaf_hash(leaf.as_bytes());
        Ok(self.store.append_leaf(run, leaf, &hash, self.clock.now()).await?)
    }

    /// Calls `f` with the log's tree as this node knows it, brought up to date with the leaves
    /// appended since (by any node). Kept in memory: the log only grows, so what was read once
    /// stays true — and a leaf rewritten in the database afterwards is not what this node signs
    /// heads over. Reading the new leaves is the only cost that grows with the log.
    async fn with_log_tree<R>(&self, f: impl FnOnce(&crate::merkle::Tree) -> R) -> Result<R, CoreError> {
        let known = self.log_tree.lock().unwrap_or_else(|p| p.into_inner()).len() as u64;
        let new = self.store.leaf_hashes(known, None).await?;
        let mut tree = self.log_tree.lock().unwrap_or_else(|p| p.into_inner());
        // Another call may have added some of them meanwhile: take only what follows.
        let skip = (tree.len() as u64).saturating_sub(known) as usize;
        for leaf in new.into_iter().skip(skip) {
            tree.push(leaf);
        }
        Ok(f(&tree))
    }

    /// The transparency log's current tree head, signed by this node.
    pub async fn tree_head(&self) -> Result<crate::transparency::TreeHead, CoreError> {
        let (size, root) = self.with_log_tree(|tree| (tree.len(), tree.root(tree.len()))).await?;
        Ok(crate::transparency::TreeHead::sign(
            size as u64,
            &root,
            self.clock.now().as_millis(),
            &self.config.node_id,
            &crate::keys::control_plane_seed(&self.config.identity_key),
        ))
    }

    /// The control plane's public key (the same on every node; see
    /// [`crate::keys::control_plane_seed`]).
    pub fn control_plane_key(&self) -> [u8; 32] {
        crate::keys::ed25519_public(&crate::keys::control_plane_seed(&self.config.identity_key))
    }

    /// The control plane's endorsement of a worker's signing key (made when it enrolls).
    pub fn endorse_worker(&self, id: &str, key: &[u8; 32]) -> String {
        crate::keys::endorse(&self.config.identity_key, "worker", id, key)
    }

    /// The consistency proof from the tree of `first` leaves to the tree of `second`, or why
    /// not (a size of 0, out of order, or larger than the log).
    pub async fn log_consistency(&self, first: u64, second: u64) -> Result<Vec<crate::merkle::Hash>, CoreError> {
        let (size, proof) = self
            .with_log_tree(|tree| (tree.len() as u64, tree.consistency_proof(first as usize, second as usize)))
            .await?;
        proof.filter(|_| first > 0 && first <= second && second <= size).ok_or_else(|| {
            FieldError::new(
                "query",
                format!("`first` must be from 1 to `second`, and `second` at most the log's size ({size})"),
            )
            .into()
        })
    }

    /// A run's leaves with their audit paths in the tree of `size` leaves (the size of a tree
    /// head the reader holds).
    pub async fn run_log(&self, run: RunId, size: u64) -> Result<Vec<crate::transparency::LoggedLeaf>, CoreError> {
        let leaves = self.store.run_leaves(run).await?;
        let (known, proofs) = self
            .with_log_tree(|tree| {
                let proofs: Vec<Option<Vec<crate::merkle::Hash>>> =
                    leaves.iter().map(|(index, _)| tree.inclusion_proof(*index as usize, size as usize)).collect();
                (tree.len(), proofs)
            })
            .await?;
        if size > known as u64 {
            return Err(FieldError::new("query.tree_size", format!("must be at most the log's size ({known})")).into());
        }
        // The empty tree (a log nothing was appended to yet) holds none of the run's leaves.
        let mut out = Vec::new();
        for ((index, leaf), proof) in leaves.into_iter().zip(proofs) {
            if let Some(proof) = proof {
                out.push(crate::transparency::LoggedLeaf {
                    index,
                    leaf,
                    proof: crate::transparency::encode_hashes(&proof),
                });
            }
        }
        Ok(out)
    }

    /// Why a run must not run, judged against the transparency log: a run whose consumer's
    /// signed request was logged at submit is confidential, so one shown without encryption was
    /// stripped where it is kept; and its request must be the first one logged for it, not one
    /// re-signed since. (Whoever can rewrite the log's own rows in place is caught by readers
    /// holding earlier tree heads, not here.)
    fn check_logged_request(run: &crate::run::Run, leaves: &[&str]) -> Result<(), String> {
        let first = leaves
            .iter()
            .find(|leaf| serde_json::from_str::<serde_json::Value>(leaf).is_ok_and(|v| v["kind"] == "request"));
        let Some(first) = first else { return Ok(()) };
        match crate::transparency::request_leaf(run) {
            None => {
                Err("the run's signed request is in the transparency log, but the run shows no encryption: it was \
                 stripped where the run is kept; refusing to run it in clear"
                    .into())
            }
            Some(mine) if mine == *first => Ok(()),
            Some(_) => {
                Err("the run's signed request is not the one logged when it was submitted: it was replaced where \
                 the run is kept; nothing is sealed"
                    .into())
            }
        }
    }

    /// Logs a confidential run's signed request unless it already is (a retried submit logs it
    /// if the first try stopped between storing the run and logging it).
    async fn log_request(&self, run: &crate::run::Run) -> Result<(), CoreError> {
        let Some(leaf) = crate::transparency::request_leaf(run) else { return Ok(()) };
        if !self.store.run_leaves(run.id).await?.iter().any(|(_, l)| *l == leaf) {
            self.log_leaf(run.id, &leaf).await?;
        }
        Ok(())
    }

    /// Registered models and harnesses.
    pub fn registry(&self) -> crate::agents::Registry {
        crate::agents::Registry::new(self.store.clone()).with_model_origins(self.config.model_origins.clone())
    }

    /// Registered credentials, sealed under the server key.
    pub fn credentials(&self) -> crate::credentials::Credentials {
        crate::credentials::Credentials::new(self.store.clone(), self.clock.clone(), self.at_rest_keys())
    }

    /// What stages may ask for here.
    pub fn capabilities(&self) -> Capabilities {
        let mut kinds: Vec<String> = self.executors.keys().map(|k| k.to_string()).collect();
        kinds.sort();
        Capabilities {
            executor_kinds: kinds,
            sandbox_profiles: self.sandbox_profiles.clone(),
            pool_kinds: POOL_EXECUTOR_KINDS.iter().map(|k| k.to_string()).collect(),
            // A confined pooled stage requires `sandbox.oci` (routing), which a worker advertises
            // only when its OCI backend passed its self-check: it waits for such a worker.
            pool_sandbox_profiles: vec![
                SandboxProfile::None,
                SandboxProfile::UntrustedCodeRead,
                SandboxProfile::UntrustedCodeWrite,
            ],
            reserved_tag_prefixes: self.config.reserved_tag_prefixes.clone(),
        }
    }

    /// Validates and stores a run.
    pub async fn submit(&self, request: SubmitRequest) -> Result<Submitted, CoreError> {
        let project = request.project_id.trim();
        check_project_id("project_id", project)?;
        if let Some(key) = &request.idempotency_key {
            if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(FieldError::new("Idempotency-Key", "must be 1 to 255 visible ASCII characters").into());
            }
        }
        let digest = request_digest(&request, project)?;
        let mut definition = request.definition.clone();
        self.check_agents(&mut definition, project).await?;
        definition.validate("definition", &self.capabilities())?;
        if request.sources.len() > MAX_SOURCES {
            return Err(FieldError::new("sources", format!("at most {MAX_SOURCES} sources are allowed")).into());
        }
        let mut sources = Vec::with_capacity(request.sources.len());
        for (i, input) in request.sources.into_iter().enumerate() {
            let field = format!("sources[{i}]");
            let source = input.validate(&field, &self.config.source_policy)?;
            if sources.iter().any(|s: &crate::source::Source| s.label == source.label) {
                return Err(
                    FieldError::new(format!("{field}.label"), format!("duplicate label `{}`", source.label)).into()
                );
            }
            if let SourceSpec::Bundle { bundle_id } = &source.spec {
                match self.store.blob_meta(*bundle_id).await? {
                    Some(meta) if meta.project_id == project => {}
                    _ => {
                        return Err(FieldError::new(
                            format!("{field}.config.bundle_id"),
                            format!("no bundle `{bundle_id}` in project `{project}`"),
                        )
                        .into())
                    }
                }
            }
            sources.push(source);
        }
        let credentials = self.credentials();
        for (i, stage) in definition.stages.iter().enumerate() {
            for (j, name) in stage.executor.credentials().iter().enumerate() {
                let field = format!("definition.stages[{i}].executor.credentials[{j}]");
                match credentials.check(name, project).await {
                    Ok(()) => {}
                    Err(crate::credentials::CredentialError::Unknown(_)) => {
                        return Err(FieldError::new(
                            field,
                            format!("no credential `{name}` is registered (`pond admin credentials add`)"),
                        )
                        .into())
                    }
                    Err(e @ crate::credentials::CredentialError::NotAllowed { .. }) => {
                        return Err(FieldError::new(field, e.to_string()).into())
                    }
                    Err(crate::credentials::CredentialError::Store(s)) => return Err(CoreError::Store(s)),
                    Err(other) => return Err(CoreError::Store(StoreError::Backend(other.to_string()))),
                }
            }
        }
        let mut recipients = Vec::with_capacity(request.recipients.len());
        for (i, text) in request.recipients.iter().enumerate() {
            let field = format!("recipient_pubkeys[{i}]");
            let key = crate::pool::decode_key(text).map_err(|e| FieldError::new(field.clone(), e))?;
            crate::keys::check_x25519_public(&key).map_err(|e| FieldError::new(field, e.to_string()))?;
            let canonical = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, key);
            if !recipients.contains(&canonical) {
                recipients.push(canonical);
            }
        }
        if recipients.len() > MAX_RECIPIENTS {
            return Err(FieldError::new(
                "recipient_pubkeys",
                format!("at most {MAX_RECIPIENTS} recipients (each sealed log stream and artifact carries a sealed key per recipient)"),
            )
            .into());
        }
        let signed = if recipients.is_empty() {
            None
        } else {
            Some(check_signed(request.signed.as_ref(), project, &recipients)?)
        };
        let now = self.clock.now();
        let mut snapshot = RunSnapshot::new(
            RunId::generate(now),
            project.to_string(),
            definition,
            sources,
            request.idempotency_key,
            now,
        );
        // A signed request makes one run: the same signature again (a replay by anyone who
        // saw it) is refused, unless it is a retry of the same submit (same idempotency key).
        if let Some(request) = &signed {
            if let Some(owner) = self.store.get_record(REQUEST_SIGNATURE, &request.signature).await? {
                let retry =
                    match (&snapshot.run.idempotency_key, owner.parse::<RunId>()) {
                        (Some(key), Ok(id)) => self.store.get_run(id).await?.is_some_and(|r| {
                            r.run.idempotency_key.as_ref() == Some(key) && r.run.project_id == project
                        }),
                        _ => false,
                    };
                if !retry {
                    return Err(FieldError::new(
                        "consumer_signature",
                        format!("this signed request was already used for run {owner}; sign a new one (with a fresh `nonce`)"),
                    )
                    .into());
                }
            }
        }
        if !recipients.is_empty() {
            snapshot.run.encryption = Some(crate::run::Encryption { recipients, request: signed });
        }
        snapshot.run.request_digest = Some(digest.clone());
        // Its bundles are the run's from here (or, if the run is not stored, pending again).
        let mut claimed = Vec::new();
        let mut counted = Vec::new();
        for (i, source) in snapshot.run.sources.iter().enumerate() {
            if let SourceSpec::Bundle { bundle_id } = &source.spec {
                // A run counts once on a bundle however many of its sources name it.
                if counted.contains(bundle_id) {
                    continue;
                }
                counted.push(*bundle_id);
                let field = format!("sources[{i}].config.bundle_id");
                match self.claim_bundle(&field, project, *bundle_id).await {
                    Ok(c) => claimed.extend(c),
                    Err(e) => {
                        self.settle_bundles(claimed, crate::bundles::Outcome::NotStored).await;
                        return Err(e);
                    }
                }
            }
        }
        let inserted = self.store.insert_run(&snapshot).await;
        let outcome = match &inserted {
            Ok(crate::store::InsertOutcome::Created) => crate::bundles::Outcome::Stored,
            Ok(_) | Err(StoreError::Conflict(_) | StoreError::NotFound(_) | StoreError::Rejected(_)) => {
                crate::bundles::Outcome::NotStored
            }
            // The write may have committed before the error: keep the claims.
            Err(_) => crate::bundles::Outcome::Unknown,
        };
        self.settle_bundles(claimed, outcome).await;
        match inserted? {
            crate::store::InsertOutcome::Created => {
                let encrypted = if snapshot.run.encryption.is_some() { "yes" } else { "no" };
                metrics::counter!("pond_runs_submitted_total", "encrypted" => encrypted).increment(1);
                if let Some(request) = snapshot.run.encryption.as_ref().and_then(|e| e.request.as_ref()) {
                    let id = snapshot.run.id.to_string();
                    self.store.swap_record(REQUEST_SIGNATURE, &request.signature, None, &id).await?;
                }
                self.log_request(&snapshot.run).await?;
                Ok(Submitted { snapshot, created: true })
            }
            crate::store::InsertOutcome::Existing(existing) => {
                // A retry returns the first run; another request under the same key is refused
                // rather than answered with a run it did not ask for. (A run stored before
                // digests were kept has none and is taken as a retry, as before.)
                if existing.run.request_digest.as_ref().is_some_and(|d| *d != digest) {
                    let key = existing.run.idempotency_key.as_deref().unwrap_or_default();
                    return Err(FieldError::new(
                        "Idempotency-Key",
                        format!(
                            "`{key}` was already used for a different request (run {}); send a new key with a new request",
                            existing.run.id
                        ),
                    )
                    .into());
                }
                self.log_request(&existing.run).await?;
                Ok(Submitted { snapshot: *existing, created: false })
            }
        }
    }

    /// A run by id.
    pub async fn get(&self, id: RunId) -> Result<RunSnapshot, CoreError> {
        self.store.get_run(id).await?.ok_or(CoreError::RunNotFound(id))
    }

    /// Cancels a run (see [`RunSnapshot::cancel`]).
    pub async fn cancel(&self, id: RunId, reason: &str) -> Result<RunSnapshot, CoreError> {
        let now = self.clock.now();
        let snapshot = self
            .store
            .update_run(id, &mut |s| {
                if s.run.state.is_terminal() {
                    return Ok(Vec::new());
                }
                s.cancel(reason, now);
                let mut lines = vec![self.system(None, 0, format!("run cancel requested: {reason}"))];
                lines.extend(self.run_ended(s, now));
                Ok(lines)
            })
            .await
            .map_err(|e| not_found_as(e, id))?;
        self.release_if_ended(&snapshot, now).await;
        Ok(snapshot)
    }

    /// Claims up to `limit` ready stages this node can run.
    pub async fn claim(&self, limit: u32) -> Result<Vec<Claim>, CoreError> {
        let now = self.clock.now();
        let query = ClaimQuery {
            owner: self.config.node_id.clone(),
            kinds: self.executors.keys().map(|k| k.to_string()).collect(),
            now,
            lease_until: now.plus(self.config.lease),
            limit,
            offer: None,
        };
        self.claim_with(&query, &self.config.node_id).await
    }

    /// Claims up to `limit` pooled stages that `worker` may run (its pinned tags and
    /// capabilities meet their requirements); the lease is held in the worker's name.
    pub async fn claim_for_worker(&self, worker: &PoolMember, limit: u32) -> Result<Vec<Claim>, CoreError> {
        let now = self.clock.now();
        let query = ClaimQuery {
            owner: worker.id.clone(),
            kinds: vec![POOL_KIND.to_string()],
            now,
            lease_until: now.plus(self.config.lease),
            limit,
            offer: Some(worker.offer()),
        };
        let holder = format!("worker {} ({}, pool {})", worker.id, worker.name, worker.pool);
        self.claim_with(&query, &holder).await
    }

    async fn claim_with(&self, query: &ClaimQuery, holder: &str) -> Result<Vec<Claim>, CoreError> {
        let now = query.now;
        // Each stage's "started" line is written with the claim itself (one commit). A stage
        // past its lost-lease limit is failed below instead, with a line saying so.
        let started = |claim: &Claim| -> Option<NewLogLine> {
            let stage = &claim.stage;
            if stage.lost_leases > MAX_LOST_LEASES {
                return None;
            }
            let mut text = format!("stage `{}` attempt {} started on {holder}", stage.key, stage.attempt);
            if stage.lost_leases > 0 && stage.attempt > 1 {
                text.push_str(" (an earlier attempt's node stopped renewing its lease)");
            }
            Some(self.system(Some(&stage.key), stage.attempt, text))
        };
        let claims = self.store.claim_stages_logged(query, &started).await?;
        if claims.is_empty() {
            return Ok(claims);
        }
        // The batch's transparency-log leaves in one read, tried again after a moment when the
        // store stumbles: if it still fails, every claimed stage fails the check below (never run
        // unchecked).
        let ids: Vec<RunId> = claims.iter().map(|c| c.run.id).collect();
        let mut leaves = self.store.leaves_of_runs(&ids).await;
        for _ in 0..2 {
            if leaves.is_ok() {
                break;
            }
            self.pause.pause(Millis(100)).await;
            leaves = self.store.leaves_of_runs(&ids).await;
        }
        let leaves = leaves.map_err(|e| format!("could not check the run against the transparency log: {e}"));
        let mut runnable = Vec::with_capacity(claims.len());
        for claim in claims {
            let (run, stage) = (claim.run.id, &claim.stage);
            if stage.lost_leases > MAX_LOST_LEASES {
                let text = format!("stage `{}` failed: lost its lease {} times", stage.key, stage.lost_leases);
                let mut reap = |s: &mut RunSnapshot| {
                    s.reap(now);
                    let mut lines = vec![self.system(Some(&stage.key), stage.attempt, text.clone())];
                    lines.extend(self.run_ended(s, now));
                    Ok(lines)
                };
                if let Ok(snapshot) = self.store.update_run(run, &mut reap).await {
                    self.release_if_ended(&snapshot, now).await;
                }
                continue;
            }
            // Before anything of it runs or is sealed, here or on a worker: is the run's
            // encryption the one its consumer's signed request put in the log at submit?
            let checked = leaves.as_ref().map_err(Clone::clone).and_then(|all| {
                let mine: Vec<&str> = all.iter().filter(|(r, _, _)| *r == run).map(|(_, _, l)| l.as_str()).collect();
                Self::check_logged_request(&claim.run, &mine)
            });
            if let Err(why) = checked {
                let failed = StageOutcome::Failed { error: why.clone(), exit_code: None };
                let mut refuse = |s: &mut RunSnapshot| {
                    s.complete_attempt(&stage.key, stage.attempt, &failed, now)?;
                    let mut lines = vec![self.system(Some(&stage.key), stage.attempt, why.clone())];
                    lines.extend(self.run_ended(s, now));
                    Ok(lines)
                };
                if let Ok(snapshot) = self.store.update_run(run, &mut refuse).await {
                    self.release_if_ended(&snapshot, now).await;
                }
                continue;
            }
            let placement = if query.kinds.iter().any(|k| k == POOL_KIND) { "pool" } else { "local" };
            metrics::counter!("pond_stages_claimed_total", "placement" => placement).increment(1);
            if stage.lost_leases > 0 && stage.attempt > 1 {
                metrics::counter!("pond_lease_expiries_total").increment(1);
            }
            runnable.push(claim);
        }
        Ok(runnable)
    }

    /// Extends a claim's lease.
    pub async fn renew(&self, claim: &Claim) -> Result<LeaseStatus, CoreError> {
        let now = self.clock.now();
        Ok(self
            .store
            .renew_lease(
                claim.run.id,
                &claim.stage.key,
                claim.stage.attempt,
                &self.config.node_id,
                now.plus(self.config.lease),
            )
            .await?)
    }

    /// Runs one claimed attempt: prepares the checkout, records what the sources resolved to,
    /// and calls the stage's executor. Does not record the outcome; see [`Engine::complete`].
    pub async fn execute(&self, claim: &Claim, stop: &dyn StopSignal) -> StageOutcome {
        let run = &claim.run;
        let Some(def) = run.definition.stages.get(claim.stage.position as usize) else {
            return StageOutcome::Failed { error: "stage missing from the definition".into(), exit_code: None };
        };
        let Some(executor) = self.executors.get(def.executor.kind()) else {
            return StageOutcome::Failed {
                error: format!("no `{}` executor on this node", def.executor.kind()),
                exit_code: None,
            };
        };
        let sealer = match crate::seal::OutputSealer::for_run(
            run,
            &claim.stage.key,
            claim.stage.attempt,
            self.config.signing_seed,
        ) {
            Ok(sealer) => sealer,
            Err(error) => return StageOutcome::Failed { error, exit_code: None },
        };
        let workspace = if !executor.needs_workspace() && run.sources.is_empty() {
            Workspace { cwd: std::path::PathBuf::new(), sources: Vec::new(), resolved: Vec::new() }
        } else {
            let workspace = match self.workspaces.prepare(run).await {
                Ok(w) => w,
                Err(e) => {
                    return StageOutcome::Failed { error: format!("fetching sources failed: {e}"), exit_code: None }
                }
            };
            if let Err(e) = self.record_resolved(run, &workspace, &claim.stage.key, claim.stage.attempt).await {
                return StageOutcome::Failed {
                    error: format!("recording the fetched sources failed: {e}"),
                    exit_code: None,
                };
            }
            workspace
        };
        let sink = StoreSink {
            engine: self,
            run: run.id,
            project: &run.project_id,
            stage: &claim.stage.key,
            attempt: claim.stage.attempt,
            holder: claim.stage.lease_owner.as_deref().unwrap_or_default(),
            sealer,
            budget: crate::exec::LogBudget::new(self.config.max_log_bytes),
            delivery: std::sync::Mutex::new(Delivery::default()),
        };
        let items = match self.foreach_items(run, def).await {
            Ok(items) => items,
            Err(error) => {
                let _ = self.finish_sink(&sink, run, claim).await;
                return StageOutcome::Failed { error, exit_code: None };
            }
        };
        let ctx = ExecContext {
            run,
            stage: def,
            attempt: claim.stage.attempt,
            workspace: &workspace,
            output: &sink,
            stop,
            items: items.as_deref(),
        };
        let outcome = executor.execute(ctx).await;
        // Output that never reached the store fails the stage, whatever the process did: a
        // run must not read `succeeded` with a hole in its log.
        let outcome = match (self.finish_sink(&sink, run, claim).await, outcome) {
            (Err(why), StageOutcome::Succeeded | StageOutcome::Failed { .. }) => {
                StageOutcome::Failed { error: why, exit_code: None }
            }
            (_, outcome) => outcome,
        };
        match (outcome, stop.reason()) {
            (StageOutcome::Cancelled, Some(StopReason::TimedOut))
            | (StageOutcome::Failed { .. }, Some(StopReason::TimedOut)) => {
                StageOutcome::Failed { error: format!("timed out after {}", def.effective_timeout()), exit_code: None }
            }
            (outcome, _) => outcome,
        }
    }

    /// Ends an attempt's output: the sink delivers what it holds (a confidential stream its final
    /// record), and for a confidential run the attempt's end is logged, so a reader requires
    /// that stream whole whatever the attempt is labelled later where the run is kept.
    async fn finish_sink(&self, sink: &StoreSink<'_>, run: &Run, claim: &Claim) -> Result<(), String> {
        sink.finish().await?;
        if sink.sealer.is_some() {
            let leaf =
                crate::transparency::attempt_leaf(&run.id.to_string(), &claim.stage.key, claim.stage.attempt, "ended");
            self.log_leaf(run.id, &leaf).await.map_err(|e| format!("logging the attempt's end failed: {e}"))?;
        }
        Ok(())
    }

    /// The items of a swarm stage's `foreach`: the lines of the named artifact of this run.
    pub async fn foreach_items(
        &self,
        run: &Run,
        def: &crate::definition::StageDef,
    ) -> Result<Option<Vec<String>>, String> {
        let crate::definition::ExecutorSpec::Swarm(swarm) = &def.executor else { return Ok(None) };
        let Some(value) = &swarm.foreach else { return Ok(None) };
        let foreach = crate::agents::Foreach::parse(value, "foreach").map_err(|e| e.to_string())?;
        if run.encryption.is_some() {
            // The artifact is sealed to the consumer; pond cannot read its items.
            return Err(
                "`foreach` cannot read the items of a confidential run (its artifacts are sealed to the consumer)"
                    .into(),
            );
        }
        let artifact =
            self.store.get_artifact(run.id, &foreach.artifact).await.map_err(|e| e.to_string())?.ok_or_else(|| {
                format!("no artifact `{}` to fan out over (does an earlier stage write it?)", foreach.artifact)
            })?;
        let meta = self
            .store
            .blob_meta(artifact.blob_id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("artifact `{}` has no data", foreach.artifact))?;
        let data = crate::store::read_blob(self.store.as_ref(), &meta).await.map_err(|e| e.to_string())?;
        crate::agents::foreach_items(&data).map(Some)
    }

    /// Records what fetching the run's sources found, once per run.
    async fn record_resolved(
        &self,
        run: &Run,
        workspace: &Workspace,
        key: &str,
        attempt: u32,
    ) -> Result<(), StoreError> {
        if run.sources.iter().all(|s| s.resolved.is_some()) {
            return Ok(());
        }
        let resolved = workspace.resolved.clone();
        self.store
            .update_run(run.id, &mut |s| {
                // Stages fetching in parallel each try; only the one that records a source says so.
                let mut lines = Vec::new();
                for (source, found) in s.run.sources.iter_mut().zip(&resolved) {
                    if source.resolved.is_none() {
                        source.resolved = Some(found.clone());
                        let commit = found.commit.as_deref().map(|c| format!(" at commit {c}")).unwrap_or_default();
                        let text = format!("source `{}` fetched{commit}, input_sha {}", source.label, found.input_sha);
                        lines.push(self.system(Some(key), attempt, text));
                    }
                }
                Ok(lines)
            })
            .await
            .map(|_| ())
    }

    /// The input bundle of a pooled job's run: its checkout packed as tar.zst, made once per run
    /// and kept as a blob, so every attempt (and every API node) issues the same bytes and a
    /// worker's attested `input_sha256` can be checked against it.
    pub async fn job_input(&self, claim: &Claim) -> Result<JobInput, CoreError> {
        let input = self.make_job_input(claim).await?;
        self.remember_issued_input(claim.run.id, &input);
        Ok(input)
    }

    async fn make_job_input(&self, claim: &Claim) -> Result<JobInput, CoreError> {
        let run = &claim.run;
        if run.sources.is_empty() {
            return Ok(JobInput::empty());
        }
        let key = run.id.to_string();
        if let Some(text) = self.store.get_record(JOB_INPUT, &key).await? {
            return serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(e.to_string()).into());
        }
        let workspace = self.workspaces.prepare(run).await.map_err(CoreError::Workspace)?;
        self.record_resolved(run, &workspace, &claim.stage.key, claim.stage.attempt).await?;
        let bytes = self.workspaces.pack(run).await.map_err(CoreError::Workspace)?;
        let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        let size = bytes.len() as u64;
        // At rest under the server key; a worker gets it sealed to its own key.
        let sealed = self.at_rest_keys().seal(&bytes);
        let blob = self.store.put_blob(&run.project_id, &sealed, self.clock.now()).await?;
        let input = JobInput { blob_id: Some(blob.id), sha256, size };
        let text = serde_json::to_string(&input).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if self.store.swap_record(JOB_INPUT, &key, None, &text).await? {
            return Ok(input);
        }
        // Another node packed it first: issue theirs, and this copy (which nothing names) goes.
        let _ = self.store.delete_blob(blob.id).await;
        let text = self.store.get_record(JOB_INPUT, &key).await?.ok_or_else(|| StoreError::NotFound(key.clone()))?;
        serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(e.to_string()).into())
    }

    /// The input bundle issued for a run's pooled jobs, if one was (a run without sources has
    /// the empty input, [`JobInput::empty`]).
    pub async fn issued_input(&self, run: RunId) -> Result<Option<JobInput>, CoreError> {
        if let Some(input) = self.issued_inputs.lock().unwrap_or_else(|p| p.into_inner()).get(&run) {
            return Ok(Some(input.clone()));
        }
        let input = match self.store.get_record(JOB_INPUT, &run.to_string()).await? {
            Some(text) => serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            None => match self.store.get_run(run).await? {
                Some(s) if s.run.sources.is_empty() => JobInput::empty(),
                _ => return Ok(None),
            },
        };
        self.remember_issued_input(run, &input);
        Ok(Some(input))
    }

    /// Extends the lease of `job`, held by `worker`. Also the check that `worker` still holds it
    /// before its logs or artifacts are accepted.
    pub async fn renew_job(&self, job: &JobId, worker: &PoolMember) -> Result<LeaseStatus, CoreError> {
        let now = self.clock.now();
        Ok(self.store.renew_lease(job.run, &job.stage, job.attempt, &worker.id, now.plus(self.config.lease)).await?)
    }

    /// Appends a pooled job's output lines to its run's log. Lines carry the worker's
    /// `line_seq`, so a batch delivered again (a retry after a lost answer) is stored once.
    pub async fn job_logs(&self, job: &JobId, lines: Vec<NewLogLine>) -> Result<(), CoreError> {
        let at = self.clock.now();
        let lines: Vec<NewLogLine> = lines
            .into_iter()
            .map(|line| NewLogLine { stage: Some(job.stage.clone()), attempt: job.attempt, at, ..line })
            .collect();
        let bytes: usize = lines.iter().map(|l| l.text.len()).sum();
        metrics::counter!("pond_log_bytes_total", "placement" => "pool").increment(bytes as u64);
        Ok(self.store.append_logs(job.run, &lines).await?)
    }

    /// Stores an artifact a pooled job uploaded (for a confidential run, the worker uploads the
    /// ciphertext and its `.pondkey` sidecar).
    pub async fn job_artifact(
        &self,
        job: &JobId,
        worker: &PoolMember,
        run: &Run,
        name: &str,
        data: &[u8],
    ) -> Result<Artifact, CoreError> {
        let project = run.project_id.as_str();
        let sidecar_of = name.strip_suffix(crate::seal::SIDECAR_SUFFIX).filter(|_| run.encryption.is_some());
        let valid = match sidecar_of {
            Some(base) => valid_artifact_name(base),
            None => valid_artifact_name(name),
        };
        if !valid {
            return Err(FieldError::new("name", format!("`{name}` is not a valid artifact name")).into());
        }
        if let Err(why) = self.artifact_room(job.run, name, data.len() as u64).await? {
            return Err(FieldError::new("artifact", why).into());
        }
        let now = self.clock.now();
        let blob = self.store.put_blob(project, data, now).await?;
        let artifact = Artifact {
            run_id: job.run,
            name: name.to_string(),
            stage: job.stage.clone(),
            attempt: job.attempt,
            blob_id: blob.id,
            size: blob.size,
            sha256: blob.sha256,
            created_at: now,
        };
        // Refused unless the attempt is still running under this worker's lease and its result
        // has not been reported: a relay that finishes an upload late changes nothing. A refusal
        // (nothing written) takes the blob back; any other error may have committed, so the
        // blob stays.
        if let Err(e) = self.store.put_artifact(&artifact, &worker.id, self.config.max_run_artifact_bytes).await {
            if matches!(e, StoreError::Conflict(_)) {
                let _ = self.store.delete_blob(blob.id).await;
            }
            return Err(e.into());
        }
        metrics::counter!("pond_artifact_bytes_total", "placement" => "pool").increment(artifact.size);
        Ok(artifact)
    }

    /// Whether a run has room for an artifact `name` of `size` bytes under the per-run cap
    /// (an artifact replaced by name no longer counts). `Ok(Err(why))` when it has not.
    async fn artifact_room(&self, run: RunId, name: &str, size: u64) -> Result<Result<(), String>, CoreError> {
        let others: u64 = self.store.list_artifacts(run).await?.iter().filter(|a| a.name != name).map(|a| a.size).sum();
        let cap = self.config.max_run_artifact_bytes;
        if others.saturating_add(size) > cap {
            return Ok(Err(format!(
                "`{name}` ({size} bytes) would bring the run's artifacts to {} bytes, above this server's per-run cap of {cap} bytes",
                others.saturating_add(size)
            )));
        }
        Ok(Ok(()))
    }

    /// Records a pooled job's result. The signature is checked against the worker's pinned
    /// Ed25519 key and `input_sha256` against the bundle pond issued; the outcome is applied
    /// either way, with `attestation.verified` saying whether it can be trusted. A result from an
    /// attempt that no longer holds the stage is refused ([`CoreError::StaleAttempt`]).
    pub async fn complete_job(
        &self,
        job: &JobId,
        worker: &PoolMember,
        report: &JobReport,
    ) -> Result<RunSnapshot, CoreError> {
        let issued = self.issued_input(job.run).await?.map(|i| i.sha256);
        let (key, attempt) = (job.stage.as_str(), job.attempt);
        // The attempt takes no more output from here on, so what is compared with the signed
        // manifest below is what stays stored.
        if !self.store.close_output(job.run, key, attempt, &worker.id).await? {
            let snapshot = self.store.get_run(job.run).await?.ok_or(CoreError::RunNotFound(job.run))?;
            let current = snapshot.stage(key).map(|st| st.attempt).unwrap_or(0);
            let state = snapshot.stage(key).map(|st| st.state).unwrap_or(crate::run::StageState::Queued);
            return Err(CoreError::StaleAttempt { stage: key.to_string(), attempt, current, state });
        }
        let stored = self.stored_outputs(job).await?;
        let attestation = verify_report(job, worker, report, issued.as_deref(), &stored);
        // Logged before it is recorded: every attestation a run shows is in the log (a retried
        // result may log the same leaf twice, which changes nothing a reader checks).
        let leaf = crate::transparency::attestation_leaf(&job.run.to_string(), key, attempt, &attestation);
        self.log_leaf(job.run, &leaf).await?;
        let verified = if attestation.verified { "yes" } else { "no" };
        metrics::counter!("pond_attestations_total", "verified" => verified).increment(1);
        let now = self.clock.now();
        let default_policy = self.config.attestation_default;
        let snapshot = self
            .store
            .update_run(job.run, &mut |s| {
                let owner = s.stage(key).and_then(|st| st.lease_owner.clone());
                if owner.as_deref() != Some(worker.id.as_str()) {
                    let current = s.stage(key).map(|st| st.attempt).unwrap_or(0);
                    let state = s.stage(key).map(|st| st.state).unwrap_or(crate::run::StageState::Queued);
                    return Err(CoreError::StaleAttempt { stage: key.to_string(), attempt, current, state });
                }
                let policy = s
                    .run
                    .definition
                    .stages
                    .iter()
                    .find(|d| d.key == key)
                    .and_then(|d| d.attestation)
                    .unwrap_or(default_policy);
                let outcome = match (&report.outcome, attestation.verified, policy) {
                    (_, true, _) | (_, false, crate::definition::AttestationPolicy::Record) => report.outcome.clone(),
                    (reported, false, crate::definition::AttestationPolicy::Required) => {
                        // What the worker said stays visible, marked as its unverified word.
                        let (said, exit_code) = match reported {
                            StageOutcome::Failed { error, exit_code } => {
                                (format!("; the worker reported: {error}"), *exit_code)
                            }
                            _ => (String::new(), None),
                        };
                        StageOutcome::Failed {
                            error: format!(
                                "the worker's result is not verified ({}); failed under attestation policy `required` (a stage may opt out with \"attestation\": \"record\"){said}",
                                attestation.detail
                            ),
                            exit_code,
                        }
                    }
                };
                s.complete_attempt(key, attempt, &outcome, now)?;
                s.record_attestation(key, attempt, attestation.clone());
                let verdict = if attestation.verified {
                    format!("attestation verified ({})", attestation.detail)
                } else {
                    format!("attestation NOT verified: {}", attestation.detail)
                };
                let mut lines = vec![
                    self.system(Some(key), attempt, verdict),
                    self.system(Some(key), attempt, describe_completion(s, key, attempt, &outcome, now)),
                ];
                lines.extend(self.run_ended(s, now));
                Ok(lines)
            })
            .await
            .map_err(|e| not_found_as(e, job.run))?;
        self.release_if_ended(&snapshot, now).await;
        record_finish(&snapshot, key, attempt, now);
        Ok(snapshot)
    }

    /// What pond stored for a job's attempt (name → SHA-256 hex of the stored bytes), what the
    /// worker's signed manifest must equal. Artifacts carry their attempt, so an earlier
    /// attempt's leftovers never count, whatever the clocks said.
    async fn stored_outputs(&self, job: &JobId) -> Result<std::collections::BTreeMap<String, String>, CoreError> {
        let artifacts = self.store.list_artifacts(job.run).await?;
        Ok(artifacts
            .into_iter()
            .filter(|a| a.stage == job.stage && a.attempt == job.attempt)
            .map(|a| (a.name, a.sha256))
            .collect())
    }

    /// Gives a pooled job back (its worker is stopping, or never got it): queued again at once.
    pub async fn release_job(&self, job: &JobId, worker: &PoolMember, why: &str) -> Result<RunSnapshot, CoreError> {
        let now = self.clock.now();
        let (key, attempt) = (job.stage.as_str(), job.attempt);
        let snapshot = self
            .store
            .update_run(job.run, &mut |s| {
                if s.stage(key).and_then(|st| st.lease_owner.as_deref()) != Some(worker.id.as_str()) {
                    let current = s.stage(key).map(|st| st.attempt).unwrap_or(0);
                    let state = s.stage(key).map(|st| st.state).unwrap_or(crate::run::StageState::Queued);
                    return Err(CoreError::StaleAttempt { stage: key.to_string(), attempt, current, state });
                }
                s.hand_back(key, attempt, now)?;
                let text = format!("stage `{key}` attempt {attempt} handed back by worker {}: {why}", worker.id);
                let mut lines = vec![self.system(Some(key), attempt, text)];
                lines.extend(self.run_ended(s, now));
                Ok(lines)
            })
            .await
            .map_err(|e| not_found_as(e, job.run))?;
        self.release_if_ended(&snapshot, now).await;
        Ok(snapshot)
    }

    /// Records an attempt's outcome. A stale attempt (lease lost, stage ended) is refused with
    /// [`CoreError::StaleAttempt`] and changes nothing.
    pub async fn complete(&self, claim: &Claim, outcome: StageOutcome) -> Result<RunSnapshot, CoreError> {
        let mut results = self.complete_many(&[(claim, &outcome)]).await;
        results.pop().unwrap_or_else(|| Err(CoreError::Store(StoreError::Backend("no completion was recorded".into()))))
    }

    /// Records several attempts' outcomes, as [`Engine::complete`] would each, in one store
    /// write (see [`Store::update_runs`]): a driver finishing many short stages at once commits
    /// them together. Results in the order given.
    pub async fn complete_many(&self, items: &[(&Claim, &StageOutcome)]) -> Vec<Result<RunSnapshot, CoreError>> {
        let now = self.clock.now();
        // The progress lines are written in the same transaction as the change they describe,
        // so a follower that sees the run ended has also seen how.
        let mut mutations: Vec<_> = items
            .iter()
            .map(|(claim, outcome)| {
                let (key, attempt) = (claim.stage.key.as_str(), claim.stage.attempt);
                move |s: &mut RunSnapshot| -> Result<Vec<NewLogLine>, CoreError> {
                    s.complete_attempt(key, attempt, outcome, now)?;
                    let mut lines =
                        vec![self.system(Some(key), attempt, describe_completion(s, key, attempt, outcome, now))];
                    lines.extend(self.run_ended(s, now));
                    Ok(lines)
                }
            })
            .collect();
        let mut changes: Vec<(RunId, crate::store::RunMutation<'_>)> = items
            .iter()
            .zip(mutations.iter_mut())
            .map(|((claim, _), mutate)| (claim.run.id, mutate as crate::store::RunMutation<'_>))
            .collect();
        let results = self.store.update_runs(&mut changes).await;
        drop(changes);
        let mut out = Vec::with_capacity(results.len());
        for ((claim, _), result) in items.iter().zip(results) {
            match result {
                Ok(snapshot) => {
                    self.release_if_ended(&snapshot, now).await;
                    record_finish(&snapshot, &claim.stage.key, claim.stage.attempt, now);
                    out.push(Ok(snapshot));
                }
                Err(e) => out.push(Err(unwrap_rejected(e))),
            }
        }
        out
    }

    /// Gives a claimed stage back because this node is stopping (see [`RunSnapshot::hand_back`]).
    pub async fn hand_back(&self, claim: &Claim) -> Result<RunSnapshot, CoreError> {
        let now = self.clock.now();
        let (run, key, attempt) = (claim.run.id, claim.stage.key.as_str(), claim.stage.attempt);
        let node = &self.config.node_id;
        let snapshot = self
            .store
            .update_run(run, &mut |s| {
                s.hand_back(key, attempt, now)?;
                let text = format!("stage `{key}` attempt {attempt} handed back: {node} is shutting down");
                let mut lines = vec![self.system(Some(key), attempt, text)];
                lines.extend(self.run_ended(s, now));
                Ok(lines)
            })
            .await
            .map_err(unwrap_rejected)?;
        self.release_if_ended(&snapshot, now).await;
        Ok(snapshot)
    }

    /// Ends stages whose holder vanished while a cancel was pending. Returns how many runs
    /// changed.
    pub async fn sweep(&self) -> Result<usize, CoreError> {
        let now = self.clock.now();
        let mut changed = 0;
        for id in self.store.runs_to_reap(now, 100).await? {
            let snapshot = self
                .store
                .update_run(id, &mut |s| {
                    s.reap(now);
                    Ok(self.run_ended(s, now).into_iter().collect())
                })
                .await?;
            changed += 1;
            self.release_if_ended(&snapshot, now).await;
        }
        Ok(changed)
    }

    /// The closing log line of a run, when the change made at `now` ended it.
    fn run_ended(&self, snapshot: &RunSnapshot, now: Timestamp) -> Option<NewLogLine> {
        let run = &snapshot.run;
        if !(run.state.is_terminal() && run.finished_at == Some(now)) {
            return None;
        }
        let tail = match (&run.state, &run.error) {
            (RunState::Succeeded, _) | (_, None) => String::new(),
            (_, Some(e)) => format!(": {e}"),
        };
        Some(self.system(None, 0, format!("run {}{tail}", run.state)))
    }

    /// Retention: deletes up to `limit` runs that ended before `before`, each with its pooled
    /// input bundle and usage record (first: deleting them again is harmless, so a failure
    /// midway leaves nothing unreachable), then its logs, artifacts and blobs
    /// ([`Store::delete_finished_run`]) and any checkout of it on this node, and then lowers the
    /// count of the uploaded bundles it used (the last run of one takes it along; a failure
    /// before that keeps the bundle, never deletes one a run holds). Returns how many went. The
    /// record of which signed requests were accepted stays, so an old request cannot be replayed
    /// once its run is gone.
    pub async fn retire_finished(&self, before: Timestamp, limit: u32) -> Result<usize, CoreError> {
        let mut gone = 0;
        for run in self.store.finished_runs(before, limit).await? {
            let key = run.to_string();
            let (project, mut bundles) = match self.store.get_run(run).await? {
                Some(s) => (
                    s.run.project_id.clone(),
                    s.run
                        .sources
                        .iter()
                        .filter_map(|source| match &source.spec {
                            SourceSpec::Bundle { bundle_id } => Some(*bundle_id),
                            _ => None,
                        })
                        .collect::<Vec<_>>(),
                ),
                None => (String::new(), Vec::new()),
            };
            bundles.sort();
            bundles.dedup();
            if let Some(text) = self.store.get_record(JOB_INPUT, &key).await? {
                if let Ok(JobInput { blob_id: Some(blob), .. }) = serde_json::from_str::<JobInput>(&text) {
                    self.store.delete_blob(blob).await?;
                }
                self.store.delete_record(JOB_INPUT, &key).await?;
            }
            self.store.delete_record(crate::usage::RUN_KIND, &key).await?;
            if self.store.delete_finished_run(run, before).await?.is_some() {
                gone += 1;
                self.release_bundles(&project, &bundles).await?;
            }
            self.workspaces.release(run).await;
        }
        Ok(gone)
    }

    /// Removes the run's checkout on this node, when the change made at `now` ended the run.
    async fn release_if_ended(&self, snapshot: &RunSnapshot, now: Timestamp) {
        if snapshot.run.state.is_terminal() && snapshot.run.finished_at == Some(now) {
            self.workspaces.release(snapshot.run.id).await;
        }
    }

    fn system(&self, stage: Option<&str>, attempt: u32, text: String) -> NewLogLine {
        NewLogLine::text(stage.map(str::to_string), attempt, LogStream::System, self.clock.now(), text)
    }
}

/// A project id is 1 to 128 letters, digits, `-`, `_`, `.` or `:`.
pub fn check_project_id(field: &str, project: &str) -> Result<(), FieldError> {
    let ok = !project.is_empty()
        && project.len() <= 128
        && project.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(field, "must be 1 to 128 letters, digits, `-`, `_`, `.` or `:`"))
    }
}

/// The progress line for an attempt that just ended (after `complete_attempt`).
fn describe_completion(s: &RunSnapshot, key: &str, attempt: u32, outcome: &StageOutcome, now: Timestamp) -> String {
    let stage = s.stage(key);
    let took = s
        .attempts
        .iter()
        .rev()
        .find(|a| a.stage_key == key && a.number == attempt)
        .map(|a| now.since(a.started_at))
        .unwrap_or_default();
    match (outcome, stage) {
        (StageOutcome::Succeeded, _) => format!("stage `{key}` succeeded in {took}"),
        (StageOutcome::Cancelled, _) => format!("stage `{key}` cancelled after {took}"),
        (StageOutcome::Failed { error, .. }, Some(st)) if st.state == crate::run::StageState::Queued => {
            let wait = st.ready_at.map(|t| t.since(now)).unwrap_or_default();
            format!("stage `{key}` attempt {attempt} failed: {error}; retrying in {wait}")
        }
        (StageOutcome::Failed { error, .. }, _) => format!("stage `{key}` failed after {took}: {error}"),
    }
}

/// Record kind of a run's pooled input bundle.
const JOB_INPUT: &str = "job_input";

/// The input bundle issued to a pooled job.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobInput {
    /// The blob holding the tar.zst bytes, sealed under the server key; `None` for the empty
    /// input of a run without sources (zero bytes: nothing to store, pack or unpack).
    pub blob_id: Option<crate::ids::BlobId>,
    /// SHA-256 of the tar.zst bytes, hex: the `input_sha256` a worker must attest.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

impl JobInput {
    /// The input of a run without sources: zero bytes.
    pub fn empty() -> Self {
        use sha2::Digest;
        JobInput { blob_id: None, sha256: hex::encode(sha2::Sha256::digest([])), size: 0 }
    }
}

/// What a worker reports at the end of a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobReport {
    /// How it ended.
    pub outcome: StageOutcome,
    /// SHA-256 of the input bundle it received.
    pub input_sha256: [u8; 32],
    /// SHA-256 of what it produced (see `pond_exec::worker::output_digest`).
    pub output_sha256: [u8; 32],
    /// Ed25519 signature over the attestation (format (d)).
    pub signature: [u8; 64],
    /// What an agent stage's model calls spent, as the worker metered them.
    pub usage: Option<crate::usage::TokenUsage>,
}

impl JobReport {
    /// The exit code signed in the attestation: the process's, else 0 for success, -1 otherwise.
    pub fn rc(outcome: &StageOutcome) -> i64 {
        match outcome {
            StageOutcome::Succeeded => 0,
            StageOutcome::Failed { exit_code: Some(c), .. } => *c as i64,
            StageOutcome::Failed { .. } | StageOutcome::Cancelled => -1,
        }
    }
}

/// Checks a report's signature under the worker's pinned key and its input digest against the
/// one issued.
/// Checks a pooled result: the signature under the worker's pinned key, the input digest
/// against the bundle pond issued, and the signed output digest against the artifacts pond
/// stored for the attempt (names and SHA-256, nothing missing, nothing extra).
fn verify_report(
    job: &JobId,
    worker: &PoolMember,
    report: &JobReport,
    issued: Option<&str>,
    stored: &std::collections::BTreeMap<String, String>,
) -> AttestationRecord {
    let fingerprint =
        worker.signing_key_bytes().map(|k| crate::attest::fingerprint(&k)).unwrap_or_else(|| "none".into());
    let record = |verified: bool, detail: String| AttestationRecord {
        verified,
        worker: worker.id.clone(),
        signing_fingerprint: fingerprint.clone(),
        signing_key: worker.signing_key.clone(),
        detail,
        output_sha256: Some(hex::encode(report.output_sha256)),
        job_id: job.to_string(),
        input_sha256: hex::encode(report.input_sha256),
        rc: JobReport::rc(&report.outcome),
        signature: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, report.signature),
    };
    let Some(key) = worker.signing_key_bytes() else {
        return record(false, "the worker has no pinned signing key".into());
    };
    let attestation = crate::attest::Attestation {
        job_id: job.to_string(),
        input_sha256: report.input_sha256,
        output_sha256: report.output_sha256,
        rc: JobReport::rc(&report.outcome),
    };
    if let Err(e) = attestation.verify(&key, &report.signature) {
        return record(false, e.to_string());
    }
    let sha = match issued {
        Some(sha) if sha == hex::encode(report.input_sha256) => sha,
        Some(sha) => {
            return record(
                false,
                format!("input_sha256 {} is not the bundle pond issued ({sha})", hex::encode(report.input_sha256)),
            )
        }
        None => return record(false, "pond issued no input bundle for this run".into()),
    };
    if crate::pool::output_digest(stored) != report.output_sha256 {
        let names: Vec<&str> = stored.keys().map(String::as_str).collect();
        return record(
            false,
            format!(
                "the signed output manifest does not match the {} artifact(s) pond stored for this attempt ({}): an output was changed, added or lost on the way",
                stored.len(),
                names.join(", ")
            ),
        );
    }
    record(true, format!("signed by {fingerprint}, input {}, {} output(s) as stored", &sha[..12], stored.len()))
}

fn unwrap_rejected(e: StoreError) -> CoreError {
    match e {
        StoreError::Rejected(inner) => *inner,
        other => CoreError::Store(other),
    }
}

fn not_found_as(e: StoreError, id: RunId) -> CoreError {
    match e {
        StoreError::NotFound(_) => CoreError::RunNotFound(id),
        other => unwrap_rejected(other),
    }
}

/// An artifact name a stage's process may use, or why not (both output sinks, local and
/// pooled, check it alike before anything is stored or uploaded).
pub fn check_artifact_name(name: &str) -> Result<(), String> {
    if name.ends_with(crate::seal::SIDECAR_SUFFIX) {
        return Err(format!(
            "`{name}` is not a valid artifact name: names ending in `.pondkey` are kept for the key sidecars of encrypted artifacts"
        ));
    }
    if !valid_artifact_name(name) {
        return Err(format!(
            "`{name}` is not a valid artifact name (a relative path of plain components, at most 255 bytes, no control characters or `\\`)"
        ));
    }
    Ok(())
}

/// Checks an artifact name: a relative path of plain components.
pub fn valid_artifact_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('/')
        && !name.ends_with(".pondkey")
        && name.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
        && !name.chars().any(|c| c.is_control() || c == '\\')
}

struct StoreSink<'a> {
    engine: &'a Engine,
    run: RunId,
    project: &'a str,
    stage: &'a str,
    attempt: u32,
    /// Who holds the attempt's lease (this node): artifacts are stored only while it does.
    holder: &'a str,
    /// For a confidential run: output is sealed before it is stored; pond keeps no key.
    sealer: Option<crate::seal::OutputSealer>,
    budget: crate::exec::LogBudget,
    delivery: std::sync::Mutex<Delivery>,
}

/// Where a sink's delivery stands: the next line number, and the first failure.
#[derive(Default)]
struct Delivery {
    next_seq: u64,
    failed: Option<String>,
}

impl StoreSink<'_> {
    fn delivery(&self) -> std::sync::MutexGuard<'_, Delivery> {
        self.delivery.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `write` until it succeeds, retrying with backoff while the store is away, up to the
    /// engine's delivery budget. A failure is remembered: it fails the stage at the end.
    async fn deliver<'f, F, Fut>(&self, what: &str, write: F) -> Result<(), String>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), StoreError>> + 'f,
    {
        let engine = self.engine;
        let started = engine.clock.now();
        let mut backoff = crate::time::Backoff::new(Millis(100), Millis::from_secs(5));
        loop {
            let error = match write().await {
                Ok(()) => return Ok(()),
                Err(StoreError::Unavailable(e)) => e,
                Err(other) => return Err(self.failed(format!("{what} could not be stored: {other}"))),
            };
            let waited = Millis(engine.clock.now().as_millis().saturating_sub(started.as_millis()).max(0) as u64);
            if waited >= engine.config.delivery_budget {
                return Err(self
                    .failed(format!("{what} could not be stored: the store was unavailable for {waited} ({error})")));
            }
            let random = u16::from_le_bytes(crate::seal::random_bytes::<2>());
            engine.pause.pause(backoff.next(random)).await;
        }
    }

    fn failed(&self, why: String) -> String {
        self.delivery().failed.get_or_insert(why).clone()
    }

    async fn store_artifact(&self, name: &str, data: &[u8]) -> Result<(), String> {
        let now = self.engine.clock.now();
        let store = &self.engine.store;
        let what = format!("artifact `{name}`");
        match self.engine.artifact_room(self.run, name, data.len() as u64).await {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return Err(why),
            Err(e) => return Err(self.failed(format!("{what} could not be stored: {e}"))),
        }
        // Blob then record, each retried: a blob stored twice is garbage, never a wrong answer.
        let blob = std::sync::Mutex::new(None);
        self.deliver(&what, || async {
            let meta = store.put_blob(self.project, data, now).await?;
            *blob.lock().unwrap_or_else(|p| p.into_inner()) = Some(meta);
            Ok(())
        })
        .await?;
        let Some(blob) = blob.into_inner().unwrap_or_else(|p| p.into_inner()) else {
            return Err(self.failed(format!("{what} could not be stored")));
        };
        let artifact = Artifact {
            run_id: self.run,
            name: name.to_string(),
            stage: self.stage.to_string(),
            attempt: self.attempt,
            blob_id: blob.id,
            size: blob.size,
            sha256: blob.sha256,
            created_at: now,
        };
        let cap = self.engine.config.max_run_artifact_bytes;
        // Refused on the first try, nothing was written: the blob goes with the refusal. After a
        // try whose outcome is unknown (the store was away), a refusal may follow a write that
        // did commit, so the blob stays.
        let tries = std::sync::atomic::AtomicU32::new(0);
        let refused_outright = std::sync::atomic::AtomicBool::new(false);
        let stored = self
            .deliver(&what, || async {
                let first = tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0;
                let result = store.put_artifact(&artifact, self.holder, cap).await;
                if first && matches!(result, Err(StoreError::Conflict(_))) {
                    refused_outright.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                result
            })
            .await;
        if let Err(why) = stored {
            if refused_outright.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = store.delete_blob(blob.id).await;
            }
            return Err(why);
        }
        metrics::counter!("pond_artifact_bytes_total", "placement" => "local").increment(artifact.size);
        Ok(())
    }

    /// Stores lines as they are (admitted and sealed), numbered in order.
    async fn store_lines(&self, lines: Vec<crate::exec::OutputLine>) {
        if lines.is_empty() {
            return;
        }
        let at = self.engine.clock.now();
        let first = {
            let mut delivery = self.delivery();
            let first = delivery.next_seq;
            delivery.next_seq += lines.len() as u64;
            first
        };
        let records: Vec<NewLogLine> = lines
            .iter()
            .enumerate()
            .map(|(i, line)| NewLogLine::output(self.stage, self.attempt, at, line, first + i as u64))
            .collect();
        let bytes: usize = lines.iter().map(|l| l.bytes.len()).sum();
        metrics::counter!("pond_log_bytes_total", "placement" => "local").increment(bytes as u64);
        let store = &self.engine.store;
        let _ = self.deliver("the stage's output", || store.append_logs(self.run, &records)).await;
    }
}

#[async_trait]
impl OutputSink for StoreSink<'_> {
    async fn lines(&self, lines: Vec<crate::exec::OutputLine>) {
        if self.delivery().failed.is_some() {
            return;
        }
        let lines = self.budget.admit_sealed(lines, self.sealer.as_ref());
        self.store_lines(lines).await;
    }

    async fn finish(&self) -> Result<(), String> {
        // A confidential stream ends with its signed final record, so a reader can tell it
        // whole from one cut short.
        if let Some(sealer) = &self.sealer {
            if self.delivery().failed.is_none() {
                self.store_lines(sealer.finish()).await;
            }
        }
        match &self.delivery().failed {
            Some(why) => Err(why.clone()),
            None => Ok(()),
        }
    }

    async fn artifact(&self, name: &str, data: Vec<u8>) -> Result<(), String> {
        check_artifact_name(name)?;
        match &self.sealer {
            Some(sealer) => {
                for (stored_name, bytes) in sealer.artifact(name, &data) {
                    self.store_artifact(&stored_name, &bytes).await?;
                }
                Ok(())
            }
            None => self.store_artifact(name, &data).await,
        }
    }
}
