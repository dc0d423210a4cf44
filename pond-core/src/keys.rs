//! A worker's identity: an X25519 key that secrets and bundles are sealed to, and a separate
//! Ed25519 key that signs its results. Operators compare the fingerprints out of band
//! (`pond fingerprint`) and pin them at enrollment. Key material comes in as bytes: generating
//! and storing it is the caller's IO.

use ed25519_dalek::SigningKey;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::attest::fingerprint;

/// Why a public key was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// A low-order X25519 point: anything sealed to it could be opened by anyone.
    #[error("X25519 public key is a low-order point (non-contributory); refused")]
    LowOrder,
}

/// The two key pairs of a worker.
pub struct WorkerIdentity {
    sealing: StaticSecret,
    signing: SigningKey,
}

impl WorkerIdentity {
    /// The identity with these secrets: an X25519 secret scalar and an Ed25519 seed.
    pub fn from_secrets(sealing_secret: [u8; 32], signing_seed: [u8; 32]) -> Self {
        WorkerIdentity { sealing: StaticSecret::from(sealing_secret), signing: SigningKey::from_bytes(&signing_seed) }
    }

    /// The X25519 public key (what credentials and bundles are sealed to).
    pub fn sealing_public(&self) -> [u8; 32] {
        PublicKey::from(&self.sealing).to_bytes()
    }

    /// The Ed25519 public key (what results are verified with).
    pub fn signing_public(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// The X25519 secret, for opening what was sealed to this worker.
    pub fn sealing_secret(&self) -> [u8; 32] {
        self.sealing.to_bytes()
    }

    /// The Ed25519 seed, for signing attestations.
    pub fn signing_seed(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }

    /// `SHA256:…` fingerprints of the sealing and the signing public keys.
    pub fn fingerprints(&self) -> (String, String) {
        (fingerprint(&self.sealing_public()), fingerprint(&self.signing_public()))
    }
}

/// The age recipient (`age1…`, bech32) of an X25519 public key: the same key, in the form age
/// and other tools accept.
pub fn age_recipient(public: &[u8; 32]) -> String {
    let hrp = bech32::Hrp::parse_unchecked("age");
    // 32 bytes under a 3-letter prefix stay far below bech32's length limit, so this cannot fail.
    bech32::encode::<bech32::Bech32>(hrp, public).unwrap_or_default()
}

/// The X25519 public key in an age recipient (`age1…`).
pub fn from_age_recipient(text: &str) -> Result<[u8; 32], String> {
    let (hrp, data) = bech32::decode(text).map_err(|e| format!("is not a valid age recipient ({e})"))?;
    if hrp.as_str() != "age" {
        return Err(format!("is not an age recipient (prefix `{hrp}`, expected `age`)"));
    }
    <[u8; 32]>::try_from(data.as_slice()).map_err(|_| format!("holds {} bytes; an age recipient holds 32", data.len()))
}

/// The control plane's own Ed25519 seed, the same on every node: derived from the identity root
/// (see [`crate::server_keys::identity_root`]), which the database holds only sealed under the
/// server key, and the server key lives in the nodes' configuration. It endorses each node's
/// log-signing key and each worker's signing key, and signs the transparency log's tree heads,
/// so whoever holds only the database cannot add a key readers would accept.
pub fn control_plane_seed(identity_root: &[u8; 32]) -> [u8; 32] {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    hash.update(b"pond.control-plane.v1\0");
    hash.update(identity_root);
    hash.finalize().into()
}

/// What an endorsement signs: `pond.endorse.v1\0 ‖ kind ‖ 0x00 ‖ id ‖ 0x00 ‖ key` (kind `node`
/// or `worker`, the id of the node or worker, its Ed25519 signing key).
pub fn endorsement_message(kind: &str, id: &str, key: &[u8; 32]) -> Vec<u8> {
    [b"pond.endorse.v1\0".as_slice(), kind.as_bytes(), &[0], id.as_bytes(), &[0], key].concat()
}

/// The control plane's endorsement (base64 signature) of `key` as the signing key of `kind` `id`.
pub fn endorse(identity_root: &[u8; 32], kind: &str, id: &str, key: &[u8; 32]) -> String {
    use base64::Engine as _;
    use ed25519_dalek::Signer as _;
    let signature =
        SigningKey::from_bytes(&control_plane_seed(identity_root)).sign(&endorsement_message(kind, id, key));
    base64::engine::general_purpose::STANDARD.encode(signature.to_bytes())
}

/// Whether `endorsement` is the control plane's (public key `control_plane`) over `key` as
/// the signing key of `kind` `id`.
pub fn endorsed(control_plane: &[u8; 32], kind: &str, id: &str, key: &[u8; 32], endorsement: &str) -> bool {
    use base64::Engine as _;
    let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(endorsement.trim()) else { return false };
    let Ok(sig) = ed25519_dalek::Signature::from_slice(&sig) else { return false };
    ed25519_dalek::VerifyingKey::from_bytes(control_plane)
        .is_ok_and(|k| k.verify_strict(&endorsement_message(kind, id, key), &sig).is_ok())
}

/// The Ed25519 public key of a seed.
pub fn ed25519_public(seed: &[u8; 32]) -> [u8; 32] {
    SigningKey::from_bytes(seed).verifying_key().to_bytes()
}

/// The X25519 public key of a secret scalar.
pub fn x25519_public(secret: &[u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(*secret)).to_bytes()
}

/// Refuses an X25519 public key of low order: Diffie-Hellman with it gives all zeros whatever
/// the secret, so a box sealed to it protects nothing. libsodium refuses these too.
pub fn check_x25519_public(public: &[u8; 32]) -> Result<(), KeyError> {
    // Any scalar shows it: for a low-order point the shared secret is zero for every
    // (clamped) scalar.
    let probe = StaticSecret::from([0x42u8; 32]);
    if probe.diffie_hellman(&PublicKey::from(*public)).was_contributory() {
        Ok(())
    } else {
        Err(KeyError::LowOrder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_order_keys_are_refused() {
        let zero = [0u8; 32];
        let mut one = [0u8; 32];
        one[0] = 1;
        let order8 = hex::decode("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800").unwrap();
        for bad in [zero, one, order8.try_into().unwrap()] {
            assert_eq!(check_x25519_public(&bad), Err(KeyError::LowOrder), "{}", hex::encode(bad));
        }
        let good = WorkerIdentity::from_secrets([3; 32], [4; 32]).sealing_public();
        assert_eq!(check_x25519_public(&good), Ok(()));
    }

    #[test]
    fn the_two_keys_are_separate() {
        let id = WorkerIdentity::from_secrets([5; 32], [5; 32]);
        assert_ne!(id.sealing_public(), id.signing_public());
        let (seal, sign) = id.fingerprints();
        assert!(seal.starts_with("SHA256:") && sign.starts_with("SHA256:") && seal != sign);
    }
}
