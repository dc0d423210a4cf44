//! Worker pools as pond records them: one-time enrollment codes, the orchestrators and workers
//! that redeemed them (with the tags the operator pinned and the keys pinned at that moment),
//! and job ids. Everything is kept through [`Store`] records, so any API node can serve any
//! orchestrator.
//!
//! Trust rules enforced here: a code is used at most once and only before it expires; a worker
//! code with an expected fingerprint admits only the keys that produce it; a worker's tags are
//! the code's tags (it may ask for fewer, never for others); an orchestrator only speaks for
//! workers of its own pool.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::definition::{valid_capability, valid_tag};
use crate::error::StoreError;
use crate::ids::RunId;
use crate::keys::check_x25519_public;
use crate::routing::WorkerOffer;
use crate::store::Store;
use crate::time::{Clock, Millis, Timestamp};

const CODE: &str = "enroll_code";
const MEMBER: &str = "pool_member";
/// The record kind of pool members: a store that relays changes between nodes announces
/// writes of it, and nodes then drop their cached credentials ([`Pools::forget_credentials`]).
pub const MEMBER_RECORD: &str = MEMBER;
const TOKEN: &str = "pool_token";
const SEEN: &str = "pool_seen";
const VERSION: &str = "pool_version";

/// A version a pond process reports of itself (`pond/<version>` in its `User-Agent`, or an
/// orchestrator's report of a worker's), or `None` when the text is not one: at most 32
/// letters, digits, `.`, `+` or `-`. What a member reports is shown, not trusted.
pub fn reported_version(text: &str) -> Option<&str> {
    let version = text.trim();
    let valid = !version.is_empty()
        && version.len() <= 32
        && version.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '-'));
    valid.then_some(version)
}

/// Longest an enrollment code may live.
pub const MAX_CODE_TTL: Millis = Millis::from_secs(30 * 24 * 3600);

/// What redeems a code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum MemberKind {
    /// The one process per pool that polls pond for its workers.
    Orchestrator,
    /// A process that runs jobs, enrolled through its orchestrator.
    Worker,
}

impl MemberKind {
    /// The name as shown.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberKind::Orchestrator => "orchestrator",
            MemberKind::Worker => "worker",
        }
    }
}

/// What an enrollment code lets its worker be: the tags pinned on it (all, or the subset it
/// asks for) and the capability patterns its declared capabilities must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grants {
    /// Tags.
    pub tags: Vec<String>,
    /// Capability patterns.
    pub capabilities: Vec<String>,
}

/// A one-time enrollment code, as stored (the code itself only as its SHA-256).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollCode {
    /// The pool it enrolls into.
    pub pool: String,
    /// Who may redeem it.
    pub role: MemberKind,
    /// Tags pinned on the worker that redeems it.
    pub tags: Vec<String>,
    /// Capability patterns (`harness.*`, `sandbox.oci`) the redeeming worker may declare; it
    /// is refused if it declares one no pattern matches. Codes made before this field grant none.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// The worker fingerprint (see [`worker_fingerprint`]) its keys must produce, if set.
    pub fingerprint: Option<String>,
    /// When it was made.
    pub created_at: Timestamp,
    /// When it stops working.
    pub expires_at: Timestamp,
    /// When it was last redeemed.
    pub used_at: Option<Timestamp>,
    /// Who redeemed it last.
    pub used_by: Option<String>,
    /// How many hosts may redeem it (1 unless made with `uses`, e.g. for the replicas of a
    /// Kubernetes StatefulSet that share one Secret).
    #[serde(default = "one_use")]
    pub uses: u32,
    /// How many have.
    #[serde(default)]
    pub redeemed: u32,
    /// The worker fingerprints that redeemed a multi-use code: each host enrolls once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redeemed_by: Vec<String>,
}

fn one_use() -> u32 {
    1
}

/// The most hosts one enrollment code may enroll.
pub const MAX_CODE_USES: u32 = 1000;

impl EnrollCode {
    /// Redemptions so far (a code stored before `redeemed` existed counts its one use).
    pub fn redemptions(&self) -> u32 {
        self.redeemed.max(self.used_at.is_some() as u32)
    }
}

/// An enrolled orchestrator or worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PoolMember {
    /// `orch-…` or `wrk-…`.
    pub id: String,
    /// Orchestrator or worker.
    pub kind: MemberKind,
    /// Its pool.
    pub pool: String,
    /// A label (host name, by default).
    pub name: String,
    /// For a worker: the orchestrator it enrolled through.
    pub orchestrator: Option<String>,
    /// Tags, pinned at enrollment.
    pub tags: Vec<String>,
    /// Capabilities, pinned at enrollment.
    pub capabilities: Vec<String>,
    /// For a worker: its X25519 public key (base64), what secrets are sealed to.
    pub sealing_key: Option<String>,
    /// For a worker: its Ed25519 public key (base64), what its results are verified with.
    pub signing_key: Option<String>,
    /// For a worker: [`worker_fingerprint`] of its two keys.
    pub fingerprint: Option<String>,
    /// When it enrolled.
    pub enrolled_at: Timestamp,
    /// When the operator revoked it: its credential no longer authenticates (every call it or
    /// its orchestrator makes for it is refused) and it takes no work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<Timestamp>,
    /// For a worker: the control plane's endorsement of its signing key (readers accept the
    /// worker's signatures only with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endorsement: Option<String>,
    /// Takes no new jobs.
    pub draining: bool,
}

/// What a pooled stage waits for, in words, given the pool members enrolled now: `None` when an
/// enrolled, non-draining worker could take it (it waits only for one to be free), else what no
/// worker offers and how to fix it.
pub fn waiting_for(
    required: &crate::routing::Requirements,
    project_id: &str,
    members: &[PoolMember],
) -> Option<String> {
    let workers: Vec<&PoolMember> = members.iter().filter(|m| m.kind == MemberKind::Worker).collect();
    let able: Vec<&&PoolMember> =
        workers.iter().filter(|m| crate::routing::admits(required, project_id, &m.offer())).collect();
    if able.iter().any(|m| !m.draining && m.revoked_at.is_none()) {
        return None;
    }
    let tags: Vec<&str> = required.tags.iter().map(String::as_str).collect();
    let wants = format!(
        "a worker with tags [{}]{}",
        tags.join(", "),
        if required.capabilities.is_empty() {
            String::new()
        } else {
            format!(" and capabilities [{}]", required.capabilities.join(", "))
        }
    );
    Some(if able.is_empty() {
        format!(
            "{wants}; no enrolled worker offers that: enroll one (`pond admin enroll create --worker --tags … --capabilities …`) or change the stage's tier, tags or executor"
        )
    } else {
        format!("{wants}; the enrolled workers that offer it are draining or revoked")
    })
}

impl PoolMember {
    /// What it offers to placement.
    pub fn offer(&self) -> WorkerOffer {
        WorkerOffer { tags: self.tags.iter().cloned().collect(), capabilities: self.capabilities.clone() }
    }

    /// The pinned Ed25519 key.
    pub fn signing_key_bytes(&self) -> Option<[u8; 32]> {
        decode_key(self.signing_key.as_deref()?).ok()
    }
}

/// A worker's two public keys, as relayed by its orchestrator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerKeys {
    /// X25519 (sealing).
    pub sealing: [u8; 32],
    /// Ed25519 (signing).
    pub signing: [u8; 32],
}

/// The fingerprint that pins both of a worker's keys at once: `SHA256:` and unpadded base64 of
/// SHA-256(`pond.worker.v1\0` ‖ X25519 key ‖ Ed25519 key). `pond fingerprint` prints it; an
/// operator puts it on a worker's enrollment code.
pub fn worker_fingerprint(keys: &WorkerKeys) -> String {
    let mut hash = Sha256::new();
    hash.update(b"pond.worker.v1\0");
    hash.update(keys.sealing);
    hash.update(keys.signing);
    format!("SHA256:{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(hash.finalize()))
}

/// Decodes a base64 32-byte public key.
pub fn decode_key(text: &str) -> Result<[u8; 32], String> {
    let text = text.trim();
    // `pond keys show` prints the same key as an age recipient too; take it in that form.
    if text.starts_with("age1") {
        return crate::keys::from_age_recipient(text);
    }
    let bytes =
        base64::engine::general_purpose::STANDARD.decode(text).map_err(|_| "is not valid base64".to_string())?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| format!("is {} bytes long; a public key is 32", bytes.len()))
}

/// SHA-256 of a secret, hex: how codes and tokens are looked up without storing them.
pub fn secret_digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Why an enrollment or a pool call was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// No such code (or a mistyped one).
    #[error("unknown enrollment code")]
    CodeUnknown,
    /// The code was redeemed before.
    #[error("enrollment code already used (codes are one-time; ask the operator for a new one)")]
    CodeUsed,
    /// The code expired.
    #[error("enrollment code expired at {0}")]
    CodeExpired(Timestamp),
    /// A worker code given to an orchestrator, or the reverse.
    #[error("this code enrolls a {expected}, not a {got}")]
    WrongRole {
        /// What the code is for.
        expected: &'static str,
        /// Who tried it.
        got: &'static str,
    },
    /// The code is for another pool than the orchestrator relaying it.
    #[error("this code enrolls into pool `{code}`, but the orchestrator serves pool `{orchestrator}`")]
    WrongPool {
        /// The code's pool.
        code: String,
        /// The orchestrator's pool.
        orchestrator: String,
    },
    /// The worker's keys do not produce the fingerprint on the code.
    #[error("worker key fingerprint {got} does not match the fingerprint {expected} pinned on the enrollment code")]
    FingerprintMismatch {
        /// On the code.
        expected: String,
        /// Of the presented keys.
        got: String,
    },
    /// The worker asked for a tag the code does not grant.
    #[error("tag `{0}` is not granted by the enrollment code (tags are pinned by the operator)")]
    TagNotGranted(String),
    /// The worker declared a capability the code does not grant.
    #[error("capability `{0}` is not granted by the enrollment code (capabilities are pinned by the operator: `pond admin enroll create --worker --capabilities …`)")]
    CapabilityNotGranted(String),
    /// A malformed field.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: String,
        /// Why.
        reason: String,
    },
    /// No orchestrator or worker by that name or id.
    #[error("no pool member `{0}`")]
    NoMember(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(field: &str, reason: impl Into<String>) -> PoolError {
    PoolError::Invalid { field: field.to_string(), reason: reason.into() }
}

/// A job: one attempt of one pooled stage, named `<run>.<stage>.<attempt>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct JobId {
    /// The run.
    pub run: RunId,
    /// The stage key.
    pub stage: String,
    /// The attempt number.
    pub attempt: u32,
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.run, self.stage, self.attempt)
    }
}

impl FromStr for JobId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a job id (<run>.<stage>.<attempt>)");
        let (rest, attempt) = s.rsplit_once('.').ok_or_else(bad)?;
        let (run, stage) = rest.split_once('.').ok_or_else(bad)?;
        Ok(JobId {
            run: run.parse().map_err(|_| bad())?,
            stage: stage.to_string(),
            attempt: attempt.parse().map_err(|_| bad())?,
        })
    }
}

/// A job as a worker receives it.
#[derive(Clone, Debug)]
pub struct Job {
    /// Its id.
    pub id: JobId,
    /// The run (definition and sources).
    pub run: crate::run::Run,
    /// How long the lease lasts without a heartbeat.
    pub lease: Millis,
    /// SHA-256 (hex) of the input bundle pond issued.
    pub input_sha256: String,
    /// The stage's credentials sealed to this worker for this job (format (c)), if it has any.
    /// For an agent stage, the model's key is the entry named [`MODEL_KEY`].
    pub credentials: Option<String>,
    /// For an agent stage: its harness and model as registered (nothing secret).
    pub agent: Option<JobAgent>,
    /// For a `foreach` stage: its items.
    pub items: Option<Vec<String>>,
}

/// The name under which an agent stage's model key travels in its sealed credentials.
pub const MODEL_KEY: &str = "model";

/// An agent stage's harness and model, resolved by pond for the worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobAgent {
    /// The harness.
    pub harness: crate::agents::Harness,
    /// The model.
    pub model: Option<crate::agents::Model>,
    /// The run's and project's budgets with what they had spent at the claim.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub budgets: Vec<crate::agents::BudgetCap>,
}

/// Why a worker's call to its orchestrator failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerCallError {
    /// The orchestrator (or pond behind it) cannot be reached right now: retry.
    #[error("unreachable: {0}")]
    Unavailable(String),
    /// The job's lease is gone (expired, or another attempt took over): stop, report nothing.
    #[error("lease lost: {0}")]
    LeaseLost(String),
    /// Refused (bad credential, bad request): retrying will not help.
    #[error("refused: {0}")]
    Refused(String),
}

/// What a worker needs from its orchestrator: the worker loop (`pond_exec::Worker`) is
/// written against this, and `pond-http` implements it over HTTP.
#[async_trait::async_trait]
pub trait WorkerClient: Send + Sync {
    /// Waits up to `wait` for a job.
    async fn claim(&self, wait: Millis) -> Result<Option<Job>, WorkerCallError>;
    /// The job's input bundle, encrypted to this worker (format (b)): the bytes and the sidecar.
    async fn input(&self, job: &JobId) -> Result<(Vec<u8>, Option<String>), WorkerCallError>;
    /// Extends the lease; returns whether a cancel is pending.
    async fn heartbeat(&self, job: &JobId) -> Result<bool, WorkerCallError>;
    /// Appends output lines (their `line_seq` makes a re-sent batch harmless; stage, attempt
    /// and time are pond's to set).
    async fn logs(&self, job: &JobId, lines: Vec<crate::store::NewLogLine>) -> Result<(), WorkerCallError>;
    /// Uploads an artifact.
    async fn artifact(&self, job: &JobId, name: &str, data: Vec<u8>) -> Result<(), WorkerCallError>;
    /// Reports the signed result; returns whether pond verified it, and its note.
    async fn result(&self, job: &JobId, report: &crate::engine::JobReport) -> Result<(bool, String), WorkerCallError>;
    /// Gives the job back (this worker is stopping).
    async fn release(&self, job: &JobId) -> Result<(), WorkerCallError>;
}

/// The output digest a worker attests: SHA-256 over its artifacts in name order, each as
/// `name` NUL `sha256-hex` LF. Pond keeps each artifact's SHA-256, so anyone can recompute it.
pub fn output_digest(artifacts: &std::collections::BTreeMap<String, String>) -> [u8; 32] {
    let mut hash = Sha256::new();
    for (name, sha) in artifacts {
        hash.update(name.as_bytes());
        hash.update([0]);
        hash.update(sha.as_bytes());
        hash.update(b"\n");
    }
    hash.finalize().into()
}

/// The Ed25519 seed pond signs job tickets with, derived from the identity root (so every node
/// sharing a database signs with the same key, and workers pin one public key).
pub fn ticket_seed(identity_root: &[u8; 32]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(b"pond.ticket.v1\0");
    hash.update(identity_root);
    hash.finalize().into()
}

/// The public key of [`ticket_seed`], base64: what a worker pins at enrollment.
pub fn ticket_public(identity_root: &[u8; 32]) -> String {
    let key = ed25519_dalek::SigningKey::from_bytes(&ticket_seed(identity_root)).verifying_key();
    base64::engine::general_purpose::STANDARD.encode(key.to_bytes())
}

/// Signs a ticket's canonical bytes.
pub fn sign_ticket(identity_root: &[u8; 32], bytes: &[u8]) -> String {
    use ed25519_dalek::Signer as _;
    let mut message = b"pond.ticket.v1\0".to_vec();
    message.extend_from_slice(bytes);
    let sig = ed25519_dalek::SigningKey::from_bytes(&ticket_seed(identity_root)).sign(&message);
    base64::engine::general_purpose::STANDARD.encode(sig.to_bytes())
}

/// Verifies a ticket's signature under the pinned pond key.
pub fn verify_ticket(pond_key: &[u8; 32], bytes: &[u8], signature: &str) -> bool {
    let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(signature) else { return false };
    let Ok(sig) = ed25519_dalek::Signature::from_slice(&sig) else { return false };
    let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(pond_key) else { return false };
    let mut message = b"pond.ticket.v1\0".to_vec();
    message.extend_from_slice(bytes);
    key.verify_strict(&message, &sig).is_ok()
}

/// Pool membership over a [`Store`].
pub struct Pools {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    credentials: CredentialCache,
}

/// Members recently read: by their credential's digest (every relayed call presents two
/// credentials, the orchestrator's and the worker's, each two record reads), by id (a claim
/// re-reads its worker for a drain), and the list of every member. Emptied when a member
/// changes or enrolls here ([`Pools::update_member`]) or, told by the store's relay, on another
/// node ([`Pools::forget_credentials`]); an entry older than [`CredentialCache::TTL`] is read
/// again anyway, in case such a notice was lost.
#[derive(Default)]
struct CredentialCache {
    entries: std::sync::Mutex<CachedCredentials>,
}

#[derive(Default)]
struct CachedCredentials {
    /// By `token:<credential digest>` and by `id:<member id>`.
    by_key: std::collections::HashMap<String, (PoolMember, std::time::Instant)>,
    /// Every member (see [`Pools::members`]).
    all: Option<(Vec<PoolMember>, std::time::Instant)>,
    /// Moves on every emptying: a read that began before one must not refill the cache with
    /// what it read (the member may have been revoked in between).
    generation: u64,
}

impl CredentialCache {
    const TTL: std::time::Duration = std::time::Duration::from_secs(5);
    const MAX_ENTRIES: usize = 100_000;

    fn lock(&self) -> std::sync::MutexGuard<'_, CachedCredentials> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, key: &str) -> Result<PoolMember, u64> {
        let cached = self.lock();
        match cached.by_key.get(key) {
            Some((member, at)) if at.elapsed() < Self::TTL => Ok(member.clone()),
            _ => Err(cached.generation),
        }
    }

    fn put(&self, key: String, member: PoolMember, read_in: u64) {
        let mut cached = self.lock();
        if cached.generation != read_in {
            return;
        }
        if cached.by_key.len() >= Self::MAX_ENTRIES {
            cached.by_key.retain(|_, (_, at)| at.elapsed() < Self::TTL);
            if cached.by_key.len() >= Self::MAX_ENTRIES {
                cached.by_key.clear();
            }
        }
        cached.by_key.insert(key, (member, std::time::Instant::now()));
    }

    fn all(&self) -> Result<Vec<PoolMember>, u64> {
        let cached = self.lock();
        match &cached.all {
            Some((all, at)) if at.elapsed() < Self::TTL => Ok(all.clone()),
            _ => Err(cached.generation),
        }
    }

    fn put_all(&self, all: Vec<PoolMember>, read_in: u64) {
        let mut cached = self.lock();
        if cached.generation == read_in {
            cached.all = Some((all, std::time::Instant::now()));
        }
    }

    fn clear(&self) {
        let mut cached = self.lock();
        cached.by_key.clear();
        cached.all = None;
        cached.generation = cached.generation.wrapping_add(1);
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<String, PoolError> {
    serde_json::to_string(value).map_err(|e| PoolError::Store(StoreError::Corrupt(e.to_string())))
}

fn from_json<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, PoolError> {
    serde_json::from_str(text).map_err(|e| PoolError::Store(StoreError::Corrupt(e.to_string())))
}

fn check_tags(field: &str, tags: &[String]) -> Result<(), PoolError> {
    for tag in tags {
        if !valid_tag(tag) {
            return Err(invalid(field, format!("`{tag}` is not a valid tag (letters, digits, `._-/:`)")));
        }
    }
    Ok(())
}

impl Pools {
    /// Pools over `store`.
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        Pools { store, clock, credentials: CredentialCache::default() }
    }

    /// Records a new one-time code whose secret is `secret` (the caller makes it random).
    pub async fn create_code(
        &self,
        secret: &str,
        pool: &str,
        role: MemberKind,
        grants: Grants,
        fingerprint: Option<String>,
        ttl: Millis,
    ) -> Result<EnrollCode, PoolError> {
        self.create_code_for(secret, pool, role, grants, fingerprint, ttl, 1).await
    }

    /// Records a new code that `uses` hosts may redeem, each once, until it expires.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_code_for(
        &self,
        secret: &str,
        pool: &str,
        role: MemberKind,
        grants: Grants,
        fingerprint: Option<String>,
        ttl: Millis,
        uses: u32,
    ) -> Result<EnrollCode, PoolError> {
        let Grants { tags, capabilities } = grants;
        if uses == 0 || uses > MAX_CODE_USES {
            return Err(invalid("uses", format!("must be from 1 to {MAX_CODE_USES}")));
        }
        if uses > 1 && fingerprint.is_some() {
            return Err(invalid(
                "uses",
                "a code pinned to one worker's fingerprint enrolls that worker only: leave `uses` at 1",
            ));
        }
        if !valid_tag(pool) || pool.contains(':') {
            return Err(invalid("pool", format!("`{pool}` is not a valid pool name (letters, digits, `._-`)")));
        }
        check_tags("tags", &tags)?;
        for (i, pattern) in capabilities.iter().enumerate() {
            if !crate::definition::valid_capability_pattern(pattern) {
                return Err(invalid(
                    &format!("capabilities[{i}]"),
                    format!("`{pattern}` is not a valid capability pattern (letters, digits, `._-`, `*`, `?`)"),
                ));
            }
        }
        if role == MemberKind::Orchestrator && (!tags.is_empty() || !capabilities.is_empty() || fingerprint.is_some()) {
            return Err(invalid("role", "tags, capabilities and fingerprints belong on worker codes"));
        }
        if let Some(fp) = &fingerprint {
            if !fp.starts_with("SHA256:") || fp.len() != 50 {
                return Err(invalid(
                    "fingerprint",
                    "expected `SHA256:` and 43 base64 characters (from `pond fingerprint`)",
                ));
            }
        }
        if ttl.0 == 0 || ttl > MAX_CODE_TTL {
            return Err(invalid("ttl", format!("must be more than 0 and at most {MAX_CODE_TTL}")));
        }
        let now = self.clock.now();
        let code = EnrollCode {
            pool: pool.to_string(),
            role,
            tags,
            capabilities,
            fingerprint,
            created_at: now,
            expires_at: now.plus(ttl),
            used_at: None,
            used_by: None,
            uses,
            redeemed: 0,
            redeemed_by: Vec::new(),
        };
        self.store.swap_record(CODE, &secret_digest(secret), None, &to_json(&code)?).await?;
        Ok(code)
    }

    /// Marks the code used by `member`, atomically: of two redeemers one wins. The checks that
    /// may refuse without using the code run before, in `check`.
    async fn redeem(
        &self,
        secret: &str,
        role: MemberKind,
        check: impl Fn(&EnrollCode) -> Result<(), PoolError>,
        member: &PoolMember,
    ) -> Result<EnrollCode, PoolError> {
        let key = secret_digest(secret);
        // Compare-and-swap on the record as read: of redeemers racing for the last use, one
        // wins; a code with uses left that changed under us is read (and checked) again.
        loop {
            let stored = self.store.get_record(CODE, &key).await?.ok_or(PoolError::CodeUnknown)?;
            let code: EnrollCode = from_json(&stored)?;
            let now = self.clock.now();
            if code.redemptions() >= code.uses {
                return Err(PoolError::CodeUsed);
            }
            if code.expires_at <= now {
                return Err(PoolError::CodeExpired(code.expires_at));
            }
            if code.role != role {
                return Err(PoolError::WrongRole { expected: code.role.as_str(), got: role.as_str() });
            }
            check(&code)?;
            // A multi-use code enrolls each set of keys once: the same host enrolling again
            // would take a use meant for another replica.
            let fingerprint = member.fingerprint.clone().filter(|_| code.uses > 1);
            if fingerprint.as_ref().is_some_and(|f| code.redeemed_by.contains(f)) {
                return Err(PoolError::CodeUsed);
            }
            let mut redeemed_by = code.redeemed_by.clone();
            redeemed_by.extend(fingerprint);
            let used = EnrollCode {
                used_at: Some(now),
                used_by: Some(member.id.clone()),
                redeemed: code.redemptions() + 1,
                redeemed_by,
                ..code.clone()
            };
            if self.store.swap_record(CODE, &key, Some(&stored), &to_json(&used)?).await? {
                return Ok(code);
            }
            if code.uses == 1 {
                return Err(PoolError::CodeUsed);
            }
        }
    }

    async fn save_member(&self, member: &PoolMember, token: &str) -> Result<(), PoolError> {
        self.store.put_record(MEMBER, &member.id, &to_json(member)?).await?;
        self.store.put_record(TOKEN, &secret_digest(token), &member.id).await?;
        self.credentials.clear();
        Ok(())
    }

    /// An orchestrator redeems `code`; `token` becomes its credential.
    pub async fn enroll_orchestrator(
        &self,
        code: &str,
        id: String,
        name: &str,
        token: &str,
    ) -> Result<PoolMember, PoolError> {
        let mut member = PoolMember {
            id,
            kind: MemberKind::Orchestrator,
            pool: String::new(),
            name: label(name),
            orchestrator: None,
            tags: Vec::new(),
            capabilities: Vec::new(),
            sealing_key: None,
            signing_key: None,
            fingerprint: None,
            enrolled_at: self.clock.now(),
            draining: false,
            endorsement: None,
            revoked_at: None,
        };
        let code = self.redeem(code, MemberKind::Orchestrator, |_| Ok(()), &member).await?;
        member.pool = code.pool;
        self.save_member(&member, token).await?;
        Ok(member)
    }

    /// A worker redeems `code` through `orchestrator`. Its keys are checked (lengths, a
    /// low-order X25519 key is refused) and, when the code carries a fingerprint, must produce
    /// it; both keys are pinned. Its tags are the code's, or the subset it asks for.
    #[allow(clippy::too_many_arguments)]
    pub async fn enroll_worker(
        &self,
        orchestrator: &PoolMember,
        code: &str,
        id: String,
        name: &str,
        keys: WorkerKeys,
        tags: Option<Vec<String>>,
        capabilities: Vec<String>,
        token: &str,
    ) -> Result<PoolMember, PoolError> {
        check_x25519_public(&keys.sealing).map_err(|e| invalid("sealing_key", e.to_string()))?;
        ed25519_dalek::VerifyingKey::from_bytes(&keys.signing)
            .map_err(|_| invalid("signing_key", "not a valid Ed25519 public key"))?;
        if let Some(tags) = &tags {
            check_tags("tags", tags)?;
        }
        for cap in &capabilities {
            if !valid_capability(cap) {
                return Err(invalid(
                    "capabilities",
                    format!("`{cap}` is not a valid capability (letters, digits, `._-`)"),
                ));
            }
        }
        let fingerprint = worker_fingerprint(&keys);
        let b64 = |k: &[u8; 32]| base64::engine::general_purpose::STANDARD.encode(k);
        let mut member = PoolMember {
            id,
            kind: MemberKind::Worker,
            pool: orchestrator.pool.clone(),
            name: label(name),
            orchestrator: Some(orchestrator.id.clone()),
            tags: Vec::new(),
            capabilities,
            sealing_key: Some(b64(&keys.sealing)),
            signing_key: Some(b64(&keys.signing)),
            fingerprint: Some(fingerprint.clone()),
            enrolled_at: self.clock.now(),
            draining: false,
            endorsement: None,
            revoked_at: None,
        };
        let requested = tags.clone();
        let declared = member.capabilities.clone();
        let check = |code: &EnrollCode| {
            if code.pool != orchestrator.pool {
                return Err(PoolError::WrongPool { code: code.pool.clone(), orchestrator: orchestrator.pool.clone() });
            }
            if let Some(expected) = &code.fingerprint {
                if expected != &fingerprint {
                    return Err(PoolError::FingerprintMismatch {
                        expected: expected.clone(),
                        got: fingerprint.clone(),
                    });
                }
            }
            for tag in requested.iter().flatten() {
                if !code.tags.contains(tag) {
                    return Err(PoolError::TagNotGranted(tag.clone()));
                }
            }
            for cap in &declared {
                if !code.capabilities.iter().any(|pattern| crate::routing::glob_match(pattern, cap)) {
                    return Err(PoolError::CapabilityNotGranted(cap.clone()));
                }
            }
            Ok(())
        };
        let code = self.redeem(code, MemberKind::Worker, check, &member).await?;
        let mut pinned = tags.unwrap_or(code.tags);
        pinned.sort();
        pinned.dedup();
        member.tags = pinned;
        member.capabilities.sort();
        member.capabilities.dedup();
        self.save_member(&member, token).await?;
        Ok(member)
    }

    /// The member whose credential is `token` (none for a revoked member).
    pub async fn authenticate(&self, token: &str) -> Result<Option<PoolMember>, PoolError> {
        let key = format!("token:{}", secret_digest(token));
        let generation = match self.credentials.get(&key) {
            Ok(member) => return Ok(Some(member).filter(|m| m.revoked_at.is_none())),
            Err(generation) => generation,
        };
        let Some(id) = self.store.get_record(TOKEN, &key["token:".len()..]).await? else {
            return Ok(None);
        };
        // From the store, not from the cache by id: the entry made here is dated now, so what
        // it holds must be as fresh (a cached one could be up to a TTL old already).
        let member: Option<PoolMember> = match self.store.get_record(MEMBER, &id).await? {
            Some(text) => Some(from_json(&text)?),
            None => None,
        };
        if let Some(member) = &member {
            self.credentials.put(key, member.clone(), generation);
        }
        Ok(member.filter(|m| m.revoked_at.is_none()))
    }

    /// Drops every cached credential: a member changed on another node (the store's relay
    /// says so), so the next call of each reads its member again.
    pub fn forget_credentials(&self) {
        self.credentials.clear();
    }

    /// Revokes a member (a worker or an orchestrator, by id or name) for good: its credential
    /// stops authenticating at once, on every node, and a worker takes no more work (a job it
    /// holds is lost with its lease and runs again elsewhere).
    pub async fn revoke(&self, id_or_name: &str) -> Result<PoolMember, PoolError> {
        let now = self.clock.now();
        self.update_member(id_or_name, |m| {
            m.revoked_at.get_or_insert(now);
            m.draining = true;
            Ok(())
        })
        .await
    }

    /// Changes a member (by id or name) atomically: read, `change`, written back unless another
    /// write came between (then again).
    async fn update_member(
        &self,
        id_or_name: &str,
        mut change: impl FnMut(&mut PoolMember) -> Result<(), PoolError>,
    ) -> Result<PoolMember, PoolError> {
        loop {
            let member = self.find(id_or_name).await?;
            let before = self
                .store
                .get_record(MEMBER, &member.id)
                .await?
                .ok_or_else(|| PoolError::NoMember(member.id.clone()))?;
            let mut changed: PoolMember = from_json(&before)?;
            change(&mut changed)?;
            // Emptied once the write is done (or failed): a read that began before it does not
            // refill the cache (see `CredentialCache::put`), so the change holds on this node
            // when this returns.
            let swapped = self.store.swap_record(MEMBER, &member.id, Some(&before), &to_json(&changed)?).await;
            self.credentials.clear();
            if swapped? {
                return Ok(changed);
            }
        }
    }

    /// A member by id (from the cache of members, see [`Pools::forget_credentials`]).
    pub async fn member(&self, id: &str) -> Result<Option<PoolMember>, PoolError> {
        let key = format!("id:{id}");
        let generation = match self.credentials.get(&key) {
            Ok(member) => return Ok(Some(member)),
            Err(generation) => generation,
        };
        match self.store.get_record(MEMBER, id).await? {
            Some(text) => {
                let member: PoolMember = from_json(&text)?;
                self.credentials.put(key, member.clone(), generation);
                Ok(Some(member))
            }
            None => Ok(None),
        }
    }

    /// Every member, orchestrators first, then by pool and name. Read at most once every 5 s
    /// between member changes (each submit of a pooled run and each read of a waiting one
    /// explains from it why the stage waits).
    pub async fn members(&self) -> Result<Vec<PoolMember>, PoolError> {
        let generation = match self.credentials.all() {
            Ok(all) => return Ok(all),
            Err(generation) => generation,
        };
        let all = self.read_members().await?;
        self.credentials.put_all(all.clone(), generation);
        Ok(all)
    }

    /// Every member, read from the store.
    async fn read_members(&self) -> Result<Vec<PoolMember>, PoolError> {
        let mut all: Vec<PoolMember> = Vec::new();
        for (_, text) in self.store.list_records(MEMBER).await? {
            all.push(from_json(&text)?);
        }
        all.sort_by(|a, b| {
            (a.kind != MemberKind::Orchestrator, &a.pool, &a.name, &a.id).cmp(&(
                b.kind != MemberKind::Orchestrator,
                &b.pool,
                &b.name,
                &b.id,
            ))
        });
        Ok(all)
    }

    /// Finds a member by id or by name (a name must be unambiguous).
    pub async fn find(&self, id_or_name: &str) -> Result<PoolMember, PoolError> {
        if let Some(m) = self.member(id_or_name).await? {
            return Ok(m);
        }
        // Names are resolved against the store itself: a member enrolled on another node a
        // moment ago makes a name ambiguous at once.
        let mut named: Vec<PoolMember> =
            self.read_members().await?.into_iter().filter(|m| m.name == id_or_name).collect();
        match named.len() {
            1 => Ok(named.remove(0)),
            0 => Err(PoolError::NoMember(id_or_name.to_string())),
            n => Err(invalid("worker", format!("{n} members are named `{id_or_name}`; use the id"))),
        }
    }

    /// Records the control plane's endorsement of a worker's signing key.
    pub async fn set_endorsement(&self, id: &str, endorsement: String) -> Result<PoolMember, PoolError> {
        self.update_member(id, |m| {
            m.endorsement = Some(endorsement.clone());
            Ok(())
        })
        .await
    }

    /// Sets or clears `draining` (a draining worker finishes its job and takes no more).
    pub async fn set_draining(&self, id_or_name: &str, draining: bool) -> Result<PoolMember, PoolError> {
        self.update_member(id_or_name, |m| {
            if m.revoked_at.is_some() && !draining {
                return Err(invalid("worker", format!("`{}` is revoked; enroll the host again with a new code", m.id)));
            }
            m.draining = draining;
            Ok(())
        })
        .await
    }

    /// Notes that members were heard from now, with the job each holds (`None`: idle).
    pub async fn touch(&self, seen: &[(&str, Option<&str>)]) -> Result<(), PoolError> {
        let now = self.clock.now();
        for (id, job) in seen {
            let body = to_json(&Seen { at: now, job: job.map(str::to_string) })?;
            self.store.put_record(SEEN, id, &body).await?;
        }
        Ok(())
    }

    /// Notes the versions members reported (id, version).
    pub async fn note_versions(&self, versions: &[(&str, &str)]) -> Result<(), PoolError> {
        for (id, version) in versions {
            self.store.put_record(VERSION, id, version).await?;
        }
        Ok(())
    }

    /// The version each member last reported.
    pub async fn versions(&self) -> Result<HashMap<String, String>, PoolError> {
        Ok(self.store.list_records(VERSION).await?.into_iter().collect())
    }

    /// When each member was last heard from, and the job it held then.
    pub async fn last_seen(&self) -> Result<HashMap<String, (Timestamp, Option<String>)>, PoolError> {
        let mut seen = HashMap::new();
        for (id, body) in self.store.list_records(SEEN).await? {
            if let Ok(s) = serde_json::from_str::<Seen>(&body) {
                seen.insert(id, (s.at, s.job));
            }
        }
        Ok(seen)
    }
}

#[derive(Serialize, Deserialize)]
struct Seen {
    at: Timestamp,
    job: Option<String>,
}

fn label(name: &str) -> String {
    let name: String = name.chars().filter(|c| !c.is_control()).take(64).collect();
    if name.is_empty() {
        "unnamed".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_round_trip() {
        let run = RunId::generate(Timestamp::from_millis(1));
        let id = JobId { run, stage: "lint-2".into(), attempt: 3 };
        assert_eq!(id.to_string().parse::<JobId>(), Ok(id));
        assert!("nope".parse::<JobId>().is_err());
        assert!(format!("{run}.a.x").parse::<JobId>().is_err());
    }

    #[test]
    fn the_worker_fingerprint_binds_both_keys() {
        let keys = WorkerKeys { sealing: [1; 32], signing: [2; 32] };
        let fp = worker_fingerprint(&keys);
        assert_eq!(fp.len(), 50);
        assert_ne!(fp, worker_fingerprint(&WorkerKeys { sealing: [3; 32], ..keys }));
        assert_ne!(fp, worker_fingerprint(&WorkerKeys { signing: [3; 32], ..keys }));
    }
}
