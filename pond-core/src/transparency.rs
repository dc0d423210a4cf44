//! The transparency log: every consumer-signed request and every pooled result's attestation
//! is appended, as a leaf, to an append-only log whose Merkle tree ([`crate::merkle`]) the
//! control plane publishes in signed tree heads. A consumer keeps the last tree head it saw;
//! later it checks that the new head extends it (consistency proof) and that its run's leaves
//! are in the tree (inclusion proofs), trusting the server for nothing: a leaf changed or
//! removed after the consumer saw a head breaks the proofs. The leaves are canonical JSON
//! (docs/FORMATS.md, "Transparency log").

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::merkle::Hash;
use crate::run::{AttestationRecord, Run};

/// A signed tree head: the log's size and root at a time, signed by a control-plane node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TreeHead {
    /// Leaves in the tree.
    pub tree_size: u64,
    /// Base64 of the Merkle root.
    pub root_hash: String,
    /// When it was signed (ms since the epoch).
    pub timestamp: i64,
    /// The node that signed it.
    pub node_id: String,
    /// Base64 of the node's Ed25519 key (listed in `GET /v1/keys`).
    pub signing_key: String,
    /// Base64 of Ed25519(key, `pond.treehead.v1\0` ‖ size:u64be ‖ root ‖ timestamp:i64be).
    pub signature: String,
}

/// Why a tree head, proof or leaf did not check out.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogError {
    /// Not in the expected shape.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A signature that does not hold under the keys trusted.
    #[error("the tree head's signature does not hold under any control-plane key")]
    BadSignature,
}

impl TreeHead {
    /// Signs the head of a tree of `size` leaves with root `root` with the node's seed.
    pub fn sign(size: u64, root: &Hash, timestamp: i64, node_id: &str, seed: &[u8; 32]) -> TreeHead {
        use ed25519_dalek::Signer;
        let key = ed25519_dalek::SigningKey::from_bytes(seed);
        let signature = key.sign(&crate::merkle::tree_head_message(size, root, timestamp));
        TreeHead {
            tree_size: size,
            root_hash: B64.encode(root),
            timestamp,
            node_id: node_id.to_string(),
            signing_key: B64.encode(key.verifying_key().to_bytes()),
            signature: B64.encode(signature.to_bytes()),
        }
    }

    /// The root, checked to be 32 bytes.
    pub fn root(&self) -> Result<Hash, LogError> {
        decode32(&self.root_hash).ok_or(LogError::Malformed("root_hash"))
    }

    /// Checks the signature under one of `keys` (control-plane keys the reader trusts); the
    /// head's own `signing_key` must be among them.
    pub fn verify(&self, keys: &[[u8; 32]]) -> Result<(), LogError> {
        let key = decode32(&self.signing_key).ok_or(LogError::Malformed("signing_key"))?;
        if !keys.contains(&key) {
            return Err(LogError::BadSignature);
        }
        let sig = B64.decode(&self.signature).map_err(|_| LogError::Malformed("signature"))?;
        let sig = ed25519_dalek::Signature::from_slice(&sig).map_err(|_| LogError::Malformed("signature"))?;
        let verifying = ed25519_dalek::VerifyingKey::from_bytes(&key).map_err(|_| LogError::BadSignature)?;
        verifying
            .verify_strict(&crate::merkle::tree_head_message(self.tree_size, &self.root()?, self.timestamp), &sig)
            .map_err(|_| LogError::BadSignature)
    }
}

/// 32 bytes from base64.
pub fn decode32(text: &str) -> Option<[u8; 32]> {
    B64.decode(text.trim()).ok()?.try_into().ok()
}

/// Hashes as base64, the way proofs travel.
pub fn encode_hashes(hashes: &[Hash]) -> Vec<String> {
    hashes.iter().map(|h| B64.encode(h)).collect()
}

/// Hashes from base64.
pub fn decode_hashes(texts: &[String]) -> Result<Vec<Hash>, LogError> {
    texts.iter().map(|t| decode32(t).ok_or(LogError::Malformed("proof hash"))).collect()
}

/// The leaf of a confidential run's consumer-signed request, if it has one.
pub fn request_leaf(run: &Run) -> Option<String> {
    let request = run.encryption.as_ref()?.request.as_ref()?;
    Some(request_leaf_of(&run.id.to_string(), &run.project_id, request))
}

/// The leaf of run `run`'s signed request.
pub fn request_leaf_of(run: &str, project: &str, request: &crate::signed_request::SignedRequest) -> String {
    crate::signed_request::canonical_json(&json!({
        "kind": "request",
        "run": run,
        "project": project,
        "signing_key": request.signing_key,
        "signature": request.signature,
        "body": request.body,
    }))
}

/// The leaf of a pooled attempt's attestation, as pond recorded it.
pub fn attestation_leaf(run: &str, stage: &str, attempt: u32, record: &AttestationRecord) -> String {
    crate::signed_request::canonical_json(&json!({
        "kind": "attestation",
        "run": run,
        "stage": stage,
        "attempt": attempt,
        "worker": record.worker,
        "signing_key": record.signing_key,
        "job_id": record.job_id,
        "input_sha256": record.input_sha256,
        "output_sha256": record.output_sha256,
        "rc": record.rc,
        "signature": record.signature,
        "verified": record.verified,
    }))
}

/// The leaf of a confidential run's local attempt that ended (a pooled attempt's end is its
/// attestation's leaf): its stream was finished, with its final record, before this was logged,
/// so a reader requires that stream whole whatever the attempt's label says later.
pub fn attempt_leaf(run: &str, stage: &str, attempt: u32, outcome: &str) -> String {
    crate::signed_request::canonical_json(&json!({
        "kind": "attempt",
        "run": run,
        "stage": stage,
        "attempt": attempt,
        "outcome": outcome,
    }))
}

/// A run's leaf with its audit path in a tree of some size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LoggedLeaf {
    /// Its index in the log.
    pub index: u64,
    /// The leaf (canonical JSON).
    pub leaf: String,
    /// The audit path, base64 hashes.
    pub proof: Vec<String>,
}

impl LoggedLeaf {
    /// Whether the leaf is in the tree of `size` leaves with root `root`.
    pub fn included_in(&self, size: u64, root: &Hash) -> bool {
        decode_hashes(&self.proof).is_ok_and(|proof| {
            crate::merkle::verify_inclusion(
                &crate::merkle::leaf_hash(self.leaf.as_bytes()),
                self.index,
                size,
                &proof,
                root,
            )
        })
    }
}
