//! Credentials: registered by an admin, kept sealed under the server key, never returned by any
//! API after creation (only name, provider, the variable they fill and the server key's
//! fingerprint), and delivered only to the worker that claimed a job — sealed to its pinned
//! X25519 key and bound to the job id, the worker's fingerprint and an expiry (format (c)). The
//! worker refuses a payload for another job, another worker, or past its expiry.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::attest::fingerprint;
use crate::definition::valid_env_name;
use crate::error::{FieldError, StoreError};
use crate::seal::{open_sealed, seal, SealError};
use crate::store::Store;
use crate::time::{Clock, Timestamp};

const CREDENTIAL: &str = "credential";

/// A credential as stored: the value only sealed under the server key.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Stored {
    view: CredentialView,
    sealed: String,
}

/// What anyone may see of a credential.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CredentialView {
    /// Its name (what stages list in `executor.credentials`).
    pub name: String,
    /// The provider it is for (`openai`, `anthropic`, …).
    pub provider: String,
    /// The environment variable it fills on the worker.
    pub env: String,
    /// Fingerprint of the server key it is sealed under.
    pub key_fingerprint: String,
    /// The projects whose runs may use it (`*`: any).
    #[serde(default)]
    pub projects: Vec<String>,
    /// When it was registered.
    pub created_at: Timestamp,
}

/// Why a credential call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// A malformed field.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// No credential by that name.
    #[error("no credential `{0}`")]
    Unknown(String),
    /// The stored value does not open with this server's key.
    #[error("credential `{0}` does not open with this server's key (was POND_SERVER_KEY changed?)")]
    WrongKey(String),
    /// The credential exists but this project may not use it.
    #[error("credential `{name}` may not be used by project `{project}`")]
    NotAllowed {
        /// The credential.
        name: String,
        /// The project that asked.
        project: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Credentials over a [`Store`], sealed under the server key.
pub struct Credentials {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    keys: crate::server_keys::AtRestKeys,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The fingerprint of a server key (of a value derived from it, never the key).
pub fn server_key_fingerprint(key: &[u8; 32]) -> String {
    let mut tagged = b"pond.serverkey.v1\0".to_vec();
    tagged.extend_from_slice(key);
    let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&tagged).into();
    fingerprint(&digest)
}

impl Credentials {
    /// Credentials sealed under `key`.
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, keys: crate::server_keys::AtRestKeys) -> Self {
        Credentials { store, clock, keys }
    }

    /// Registers (or replaces) a credential.
    pub async fn put(
        &self,
        name: &str,
        provider: &str,
        env: Option<&str>,
        value: &str,
        projects: &[String],
    ) -> Result<CredentialView, CredentialError> {
        if projects.is_empty() {
            return Err(FieldError::new("projects", "name the projects that may use it (`*` for any)").into());
        }
        for (i, p) in projects.iter().enumerate() {
            let ok = p == "*"
                || (!p.is_empty()
                    && p.len() <= 128
                    && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)));
            if !ok {
                return Err(FieldError::new(format!("projects[{i}]"), "a project id or `*`").into());
            }
        }
        if !valid_name(name) {
            return Err(FieldError::new("name", "use 1 to 64 letters, digits, `-`, `_` or `.`").into());
        }
        if !valid_name(provider) {
            return Err(FieldError::new("provider", "use 1 to 64 letters, digits, `-`, `_` or `.`").into());
        }
        let env = match env {
            Some(e) => e.to_string(),
            None => name.to_ascii_uppercase().replace(['-', '.'], "_"),
        };
        if !valid_env_name(&env) || env.starts_with("POND_") {
            return Err(
                FieldError::new("env", format!("`{env}` is not a valid variable name (`POND_` is reserved)")).into()
            );
        }
        if value.is_empty() || value.len() > 64 * 1024 || value.contains('\0') {
            return Err(FieldError::new("value", "must be 1 byte to 64 KiB, without NUL").into());
        }
        let view = CredentialView {
            name: name.to_string(),
            provider: provider.to_string(),
            env,
            key_fingerprint: server_key_fingerprint(self.keys.current()),
            created_at: self.clock.now(),
            projects: projects.to_vec(),
        };
        let stored = Stored { view: view.clone(), sealed: B64.encode(self.keys.seal(value.as_bytes())) };
        let body = serde_json::to_string(&stored).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.store.put_record(CREDENTIAL, name, &body).await?;
        Ok(view)
    }

    async fn stored(&self, name: &str) -> Result<Option<Stored>, CredentialError> {
        match self.store.get_record(CREDENTIAL, name).await? {
            Some(text) if text != "{}" => {
                Ok(Some(serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(e.to_string()))?))
            }
            _ => Ok(None),
        }
    }

    /// Every credential (never their values).
    pub async fn list(&self) -> Result<Vec<CredentialView>, CredentialError> {
        let mut out = Vec::new();
        for (_, text) in self.store.list_records(CREDENTIAL).await? {
            if text != "{}" {
                let stored: Stored = serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                out.push(stored.view);
            }
        }
        Ok(out)
    }

    /// Whether a credential exists.
    pub async fn exists(&self, name: &str) -> Result<bool, CredentialError> {
        Ok(self.stored(name).await?.is_some())
    }

    /// Checks that `project` may use credential `name`.
    pub async fn check(&self, name: &str, project: &str) -> Result<(), CredentialError> {
        let stored = self.stored(name).await?.ok_or_else(|| CredentialError::Unknown(name.to_string()))?;
        if stored.view.projects.iter().any(|p| p == "*" || p == project) {
            Ok(())
        } else {
            Err(CredentialError::NotAllowed { name: name.to_string(), project: project.to_string() })
        }
    }

    /// Removes a credential; false when there is none.
    pub async fn remove(&self, name: &str) -> Result<bool, CredentialError> {
        if self.stored(name).await?.is_none() {
            return Ok(false);
        }
        // A tombstone: the value is gone from the record.
        self.store.put_record(CREDENTIAL, name, "{}").await?;
        Ok(true)
    }

    /// The values of `names` for a run of `project`, by the variable each fills (for sealing to
    /// a worker). A credential the project may not use is refused.
    pub async fn values(&self, names: &[String], project: &str) -> Result<BTreeMap<String, String>, CredentialError> {
        let mut out = BTreeMap::new();
        for name in names {
            self.check(name, project).await?;
            let stored = self.stored(name).await?.ok_or_else(|| CredentialError::Unknown(name.clone()))?;
            let sealed = B64.decode(&stored.sealed).map_err(|_| CredentialError::WrongKey(name.clone()))?;
            let value = self.keys.open(&sealed).map_err(|_| CredentialError::WrongKey(name.clone()))?;
            out.insert(stored.view.env, String::from_utf8(value).map_err(|_| CredentialError::WrongKey(name.clone()))?);
        }
        Ok(out)
    }
}

/// The payload of format (c).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialPayload {
    /// Version (1).
    pub v: u32,
    /// The job it is for.
    pub job_id: String,
    /// `SHA256:` fingerprint of the worker's X25519 key it is sealed to.
    pub worker_fp: String,
    /// Unix seconds after which the worker refuses it.
    pub not_after: i64,
    /// Variable → value.
    pub creds: BTreeMap<String, String>,
}

/// Seals credentials to one worker for one job (format (c)): base64 of a sealed box.
pub fn seal_credentials(
    worker_x25519: &[u8; 32],
    job_id: &str,
    not_after: i64,
    creds: BTreeMap<String, String>,
) -> String {
    let payload =
        CredentialPayload { v: 1, job_id: job_id.into(), worker_fp: fingerprint(worker_x25519), not_after, creds };
    B64.encode(seal(worker_x25519, serde_json::to_string(&payload).unwrap_or_default().as_bytes()))
}

/// Why a worker refused a credential payload.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PayloadError {
    /// It does not open with this worker's key.
    #[error("does not open with this worker's key: {0}")]
    Seal(#[from] SealError),
    /// Not the expected shape.
    #[error("malformed credential payload")]
    Malformed,
    /// Made for another job.
    #[error("made for job {0}, not this one")]
    OtherJob(String),
    /// Made for another worker.
    #[error("made for worker key {0}, not this worker's")]
    OtherWorker(String),
    /// Past its expiry.
    #[error("expired at {0} (unix seconds)")]
    Expired(i64),
}

/// Opens and checks a credential payload on the worker: it must be for `job_id`, for this
/// worker's key, and not expired at `now_unix`.
pub fn open_credentials(
    sealed_b64: &str,
    public: &[u8; 32],
    secret: &[u8; 32],
    job_id: &str,
    now_unix: i64,
) -> Result<BTreeMap<String, String>, PayloadError> {
    let sealed = B64.decode(sealed_b64).map_err(|_| PayloadError::Malformed)?;
    let json = open_sealed(public, secret, &sealed)?;
    let payload: CredentialPayload = serde_json::from_slice(&json).map_err(|_| PayloadError::Malformed)?;
    if payload.v != 1 {
        return Err(PayloadError::Malformed);
    }
    if payload.job_id != job_id {
        return Err(PayloadError::OtherJob(payload.job_id));
    }
    if payload.worker_fp != fingerprint(public) {
        return Err(PayloadError::OtherWorker(payload.worker_fp));
    }
    if payload.not_after < now_unix {
        return Err(PayloadError::Expired(payload.not_after));
    }
    Ok(payload.creds)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::seal::tests::pair;

    #[test]
    fn a_worker_refuses_payloads_for_another_job_worker_or_time() {
        let (me, my_secret) = pair(1);
        let (other, other_secret) = pair(2);
        let creds = BTreeMap::from([("API_KEY".to_string(), "sk-1".to_string())]);
        let sealed = seal_credentials(&me, "job-1", 1000, creds.clone());
        assert_eq!(open_credentials(&sealed, &me, &my_secret, "job-1", 999), Ok(creds.clone()));
        assert!(matches!(open_credentials(&sealed, &me, &my_secret, "job-2", 999), Err(PayloadError::OtherJob(_))));
        assert_eq!(open_credentials(&sealed, &me, &my_secret, "job-1", 1001), Err(PayloadError::Expired(1000)));
        assert!(matches!(open_credentials(&sealed, &other, &other_secret, "job-1", 999), Err(PayloadError::Seal(_))));
        // Sealed to this worker's key but naming another worker (a relay swapping payloads).
        let payload =
            CredentialPayload { v: 1, job_id: "job-1".into(), worker_fp: fingerprint(&other), not_after: 1000, creds };
        let swapped = B64.encode(seal(&me, serde_json::to_string(&payload).unwrap().as_bytes()));
        assert!(matches!(open_credentials(&swapped, &me, &my_secret, "job-1", 999), Err(PayloadError::OtherWorker(_))));
    }
}
