//! Result attestation (wire format (d) of `shared/notes/crypto-formats.md`): a worker signs
//! (job_id, input_sha256, output_sha256, rc) with its pinned Ed25519 key; pond verifies with
//! `verify_strict` and that `input_sha256` is what it issued. Also key fingerprints.

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// Domain separation prefix of the signed message.
pub const ATTEST_PREFIX: &[u8; 15] = b"pond.attest.v1\0";

/// What a worker attests about one job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attestation {
    /// The job.
    pub job_id: String,
    /// SHA-256 of the input the worker received.
    pub input_sha256: [u8; 32],
    /// SHA-256 of the output it produced.
    pub output_sha256: [u8; 32],
    /// The exit code.
    pub rc: i64,
}

/// Why an attestation was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttestError {
    /// The public key is not a valid Ed25519 point.
    #[error("not a valid Ed25519 public key")]
    BadKey,
    /// The signature does not verify under the pinned key.
    #[error("signature does not verify under the worker's pinned key")]
    BadSignature,
    /// The job id is longer than the format allows.
    #[error("job id longer than 2^32 bytes")]
    JobIdTooLong,
}

impl Attestation {
    /// The canonical signed message: prefix ‖ u32be(len(job_id)) ‖ job_id ‖ input ‖ output ‖
    /// i64be(rc).
    pub fn message(&self) -> Result<Vec<u8>, AttestError> {
        let len = u32::try_from(self.job_id.len()).map_err(|_| AttestError::JobIdTooLong)?;
        let mut msg = Vec::with_capacity(15 + 4 + self.job_id.len() + 64 + 8);
        msg.extend_from_slice(ATTEST_PREFIX);
        msg.extend_from_slice(&len.to_be_bytes());
        msg.extend_from_slice(self.job_id.as_bytes());
        msg.extend_from_slice(&self.input_sha256);
        msg.extend_from_slice(&self.output_sha256);
        msg.extend_from_slice(&self.rc.to_be_bytes());
        Ok(msg)
    }

    /// Signs with a worker's Ed25519 seed (deterministic).
    pub fn sign(&self, seed: &[u8; 32]) -> Result<[u8; 64], AttestError> {
        Ok(SigningKey::from_bytes(seed).sign(&self.message()?).to_bytes())
    }

    /// Verifies a signature under the worker's pinned public key (`verify_strict`: no
    /// malleable or small-order signatures).
    pub fn verify(&self, public_key: &[u8; 32], signature: &[u8; 64]) -> Result<(), AttestError> {
        let key = VerifyingKey::from_bytes(public_key).map_err(|_| AttestError::BadKey)?;
        key.verify_strict(&self.message()?, &Signature::from_bytes(signature)).map_err(|_| AttestError::BadSignature)
    }
}

/// A key fingerprint: `SHA256:` + unpadded base64 of SHA-256 of the raw 32-byte public key.
pub fn fingerprint(public_key: &[u8; 32]) -> String {
    format!("SHA256:{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(public_key)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_covers_every_field() {
        let seed = [7u8; 32];
        let public = SigningKey::from_bytes(&seed).verifying_key().to_bytes();
        let a = Attestation { job_id: "job-1".into(), input_sha256: [1; 32], output_sha256: [2; 32], rc: 0 };
        let sig = a.sign(&seed).unwrap();
        assert_eq!(a.verify(&public, &sig), Ok(()));
        let tampered = [
            Attestation { job_id: "job-2".into(), ..a.clone() },
            Attestation { input_sha256: [9; 32], ..a.clone() },
            Attestation { output_sha256: [9; 32], ..a.clone() },
            Attestation { rc: 1, ..a.clone() },
        ];
        for t in tampered {
            assert_eq!(t.verify(&public, &sig), Err(AttestError::BadSignature), "{t:?}");
        }
        let other = SigningKey::from_bytes(&[8u8; 32]).verifying_key().to_bytes();
        assert_eq!(a.verify(&other, &sig), Err(AttestError::BadSignature), "wrong key");
    }
}
