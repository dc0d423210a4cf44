//! Wire shapes of the pool protocol: `/v1/orch/*` (orchestrator → pond), `/v1/worker/*`
//! (worker → orchestrator, the same job calls relayed) and the admin pool routes.

use pond_core::pool::PoolMember;
use pond_core::run::Run;
use pond_core::store::LogStream;
use serde::{Deserialize, Serialize};

/// Header carrying the `.pondkey` sidecar of a job's input, encrypted to the claiming worker.
pub const INPUT_SIDECAR_HEADER: &str = "pond-input-sidecar";
/// On `POST /v1/orch/claim`: the versions of the claim's workers, as they reported them to
/// their orchestrator (`<worker id>=<version>`, comma-separated; only changes need be sent).
/// A header, so a pond that predates it ignores it.
pub const WORKER_VERSIONS_HEADER: &str = "pond-worker-versions";

/// The version in a `User-Agent` of pond's own clients (`pond/<version>`).
pub fn agent_version(user_agent: Option<&str>) -> Option<String> {
    let rest = user_agent?.strip_prefix("pond/")?;
    pond_core::pool::reported_version(rest.split_whitespace().next()?).map(str::to_string)
}

/// Header carrying a worker's own credential on job calls relayed by its orchestrator.
pub const WORKER_TOKEN_HEADER: &str = "pond-worker-token";

/// `POST /v1/admin/enroll`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCode {
    /// The pool.
    pub pool: String,
    /// `orchestrator` (default) or `worker`.
    #[serde(default)]
    pub role: Option<String>,
    /// Tags pinned on the worker that redeems it.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Capability patterns the worker may declare (`harness.*`, `sandbox.oci`); a worker
    /// declaring one no pattern matches is refused (403).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Expected worker fingerprint (`pond fingerprint`).
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Lifetime (`1h`, `30m`, seconds); default 1 h.
    #[serde(default)]
    pub ttl: Option<pond_core::time::Millis>,
    /// How many hosts may enroll with it, each once (default 1, at most 1000): one code in a
    /// Secret for every replica of a worker StatefulSet.
    #[serde(default)]
    pub uses: Option<u32>,
}

/// A new code (shown once).
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CodeCreated {
    /// The secret code.
    pub code: String,
    /// The pool.
    pub pool: String,
    /// Who may redeem it.
    pub role: String,
    /// Pinned tags.
    pub tags: Vec<String>,
    /// Granted capability patterns.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Expected fingerprint.
    pub fingerprint: Option<String>,
    /// Expiry (RFC 3339).
    pub expires_at: String,
    /// How many hosts may enroll with it.
    #[serde(default = "one")]
    pub uses: u32,
}

fn one() -> u32 {
    1
}

/// `POST /v1/orch/enroll`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollOrchestrator {
    /// The code.
    pub code: String,
    /// A label.
    #[serde(default)]
    pub name: Option<String>,
}

/// `POST /v1/worker/enroll` (relayed as `POST /v1/orch/workers/enroll`).
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollWorker {
    /// The code.
    pub code: String,
    /// A label.
    #[serde(default)]
    pub name: Option<String>,
    /// X25519 public key, base64.
    pub sealing_key: String,
    /// Ed25519 public key, base64.
    pub signing_key: String,
    /// Tags asked for (a subset of the code's); absent: all of the code's.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    /// Capabilities of this host.
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// What enrollment returns: the member's id, pool, pinned tags and its credential (shown once).
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Enrolled {
    /// The member.
    pub member: PoolMember,
    /// Its bearer token.
    pub token: String,
    /// Pond's ticket-signing public key (base64): a worker pins it and refuses any job ticket
    /// it did not sign, so an orchestrator cannot alter what a worker runs.
    #[serde(default)]
    pub pond_key: Option<String>,
}

/// `POST /v1/orch/claim`: a long poll for jobs for idle workers.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// Ids of idle workers of this orchestrator's pool.
    pub workers: Vec<String>,
    /// Longest wait in milliseconds (at most 30 s).
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

/// A job handed to a worker.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobTicket {
    /// `<run>.<stage>.<attempt>`.
    pub job_id: String,
    /// The worker it is for.
    pub worker_id: String,
    /// The run (definition and sources).
    pub run: Run,
    /// The stage key.
    pub stage: String,
    /// The attempt.
    pub attempt: u32,
    /// Lease length: heartbeat well within it.
    pub lease_ms: u64,
    /// SHA-256 (hex) of the input bundle (`GET …/input`).
    pub input_sha256: String,
    /// Its size.
    pub input_size: u64,
    /// The stage's credentials sealed to this worker for this job (format (c)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<String>,
    /// For an agent stage: its harness and model (nothing secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<pond_core::pool::JobAgent>,
    /// For a `foreach` stage: its items.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<String>>,
    /// Pond's Ed25519 signature (base64) over the ticket's JSON without this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl JobTicket {
    /// The bytes the signature covers: the ticket's JSON with no signature.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut unsigned = self.clone();
        unsigned.signature = None;
        serde_json::to_vec(&unsigned).unwrap_or_default()
    }
}

/// `POST /v1/orch/claim` response.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClaimResponse {
    /// Jobs claimed, at most one per worker.
    pub jobs: Vec<JobTicket>,
    /// Requested workers pond will not serve (unknown, other pool, draining).
    #[serde(default)]
    pub refused: Vec<String>,
}

/// `POST /v1/worker/claim`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkerClaim {
    /// Longest wait in milliseconds.
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

/// Heartbeat answer.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Heartbeat {
    /// Stop: the run was cancelled.
    pub cancel_requested: bool,
}

/// A log line from a worker.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobLine {
    /// `stdout` or `stderr` (`system` for the key header of an encrypted stream).
    pub stream: LogStream,
    /// The line's bytes, as `encoding` says.
    pub text: String,
    /// `utf8` (default) or `base64`.
    #[serde(default)]
    pub encoding: pond_core::store::LineEncoding,
    /// The line goes on in the next record.
    #[serde(default)]
    pub continued: bool,
    /// The worker's number for the line within the job (0, 1, 2, …): a batch sent again after
    /// a lost answer is stored once.
    #[serde(default)]
    #[schema(maximum = 9_223_372_036_854_775_807_i64)]
    pub line_seq: Option<u64>,
}

impl JobLine {
    /// The wire form of a line.
    pub fn from_line(line: pond_core::store::NewLogLine) -> JobLine {
        JobLine {
            stream: line.stream,
            text: line.text,
            encoding: line.encoding,
            continued: line.continued,
            line_seq: line.line_seq,
        }
    }

    /// The line as pond stores it (stage, attempt and time are set by the engine), refused if
    /// larger than one record may be or if its base64 does not decode.
    pub fn into_line(self, index: usize) -> Result<pond_core::store::NewLogLine, pond_core::FieldError> {
        // A record holds at most MAX_LINE_BYTES of the line; sealing and base64 add at most
        // a third plus a few hundred bytes.
        let most = pond_core::exec::MAX_LINE_BYTES * 4 / 3 + 512;
        if self.text.len() > most {
            return Err(pond_core::FieldError::new(
                format!("lines[{index}].text"),
                format!("is {} bytes; a record holds at most {most}", self.text.len()),
            ));
        }
        let line = pond_core::store::NewLogLine {
            stage: None,
            attempt: 0,
            stream: self.stream,
            at: pond_core::time::Timestamp::from_millis(0),
            text: self.text,
            encoding: self.encoding,
            continued: self.continued,
            line_seq: self.line_seq,
        };
        line.bytes().map_err(|e| pond_core::FieldError::new(format!("lines[{index}].text"), e))?;
        // The stores keep it as a signed 64-bit integer (BIGINT), as the document says.
        if line.line_seq.is_some_and(|n| n > i64::MAX as u64) {
            return Err(pond_core::FieldError::new(
                format!("lines[{index}].line_seq"),
                format!("must be at most {}", i64::MAX),
            ));
        }
        Ok(line)
    }
}

/// `POST …/logs`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobLines {
    /// The lines, in order.
    pub lines: Vec<JobLine>,
}

/// `POST …/result`: the outcome with the signed attestation (format (d)).
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobResult {
    /// `succeeded`, `failed` or `cancelled`.
    pub outcome: String,
    /// Failure text.
    #[serde(default)]
    pub error: Option<String>,
    /// Process exit code.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// SHA-256 of the input bundle received, hex.
    pub input_sha256: String,
    /// SHA-256 of the output manifest, hex.
    pub output_sha256: String,
    /// Ed25519 signature, base64.
    pub signature: String,
    /// What the job's model calls spent, as the worker's broker metered them (agent stages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<pond_core::usage::TokenUsage>,
}

/// `POST …/result` response.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ResultAck {
    /// Whether pond verified the attestation.
    pub attestation_verified: bool,
    /// Why not, or what was verified.
    pub detail: String,
}

/// One member in `GET /v1/admin/pools`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MemberView {
    /// The member.
    #[serde(flatten)]
    pub member: PoolMember,
    /// Last heard from (RFC 3339).
    pub last_seen: Option<String>,
    /// The job it holds, if any.
    pub current_job: Option<String>,
    /// The pond version it last reported (an orchestrator its own, a worker through its
    /// orchestrator); absent for a member that never did (older releases).
    #[serde(default)]
    pub version: Option<String>,
}

/// `GET /v1/admin/pools`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolList {
    /// Orchestrators.
    pub orchestrators: Vec<MemberView>,
    /// Workers.
    pub workers: Vec<MemberView>,
}

/// `POST /v1/admin/credentials`: the value is accepted here and never returned.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutCredential {
    /// Name stages refer to.
    pub name: String,
    /// Provider (`openai`, `anthropic`, …).
    pub provider: String,
    /// Environment variable it fills (default: the name in upper case).
    #[serde(default)]
    pub env: Option<String>,
    /// The secret.
    pub value: String,
    /// The projects whose runs may use it (`*`: any).
    pub projects: Vec<String>,
}

/// `GET /v1/admin/credentials`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CredentialList {
    /// Name, provider, variable and key fingerprint of each; never a value.
    pub credentials: Vec<pond_core::credentials::CredentialView>,
}

/// `POST /v1/admin/pools/workers/{id}/drain`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Drain {
    /// `false` to take work again.
    #[serde(default)]
    pub draining: Option<bool>,
}
