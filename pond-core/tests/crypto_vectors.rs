//! Interop: the reference vectors made by PyNaCl (libsodium), copied from the team's
//! shared/testdata/crypto-vectors into testdata/ so a clone needs nothing beside it.

use std::path::PathBuf;

use pond_core::attest::{fingerprint, Attestation};

fn vectors() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/crypto-vectors")
}

fn load(name: &str) -> serde_json::Value {
    let path = vectors().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn bytes<const N: usize>(hex_text: &serde_json::Value) -> [u8; N] {
    hex::decode(hex_text.as_str().unwrap()).unwrap().try_into().unwrap()
}

#[test]
fn the_pynacl_attestation_verifies_and_our_message_and_signature_match_it() {
    let keys = load("pynacl_keys.json");
    let vector = load("pynacl_attestation.json");
    let attestation = Attestation {
        job_id: vector["job_id"].as_str().unwrap().into(),
        input_sha256: bytes(&vector["input_sha256_hex"]),
        output_sha256: bytes(&vector["output_sha256_hex"]),
        rc: vector["rc"].as_i64().unwrap(),
    };
    assert_eq!(hex::encode(attestation.message().unwrap()), vector["message_hex"].as_str().unwrap());
    let public: [u8; 32] = bytes(&keys["worker_ed25519"]["pk_hex"]);
    let signature: [u8; 64] = bytes(&vector["signature_hex"]);
    attestation.verify(&public, &signature).expect("PyNaCl's signature verifies");
    let ours = attestation.sign(&bytes(&keys["worker_ed25519"]["seed_hex"])).unwrap();
    assert_eq!(ours, signature, "Ed25519 is deterministic: the same key signs the same bytes");
    let forged = Attestation { rc: 0, ..attestation };
    assert!(forged.verify(&public, &signature).is_err(), "a changed exit code does not verify");
}

#[test]
fn fingerprints_match_the_reference() {
    let keys = load("pynacl_keys.json");
    for key in ["worker_ed25519", "worker_x25519", "consumer1", "consumer2"] {
        let want = keys[key]["fingerprint"].as_str().expect("every reference key has a fingerprint");
        assert_eq!(fingerprint(&bytes(&keys[key]["pk_hex"])), want, "{key}");
    }
}

#[test]
fn consumer_keys_derive_the_reference_public_keys_and_age_recipients() {
    let keys = load("pynacl_keys.json");
    for key in ["consumer1", "consumer2", "worker_x25519"] {
        let public = pond_core::keys::x25519_public(&bytes(&keys[key]["sk_hex"]));
        assert_eq!(hex::encode(public), keys[key]["pk_hex"].as_str().unwrap(), "{key}");
        assert_eq!(pond_core::keys::age_recipient(&public), keys[key]["age_recipient"].as_str().unwrap(), "{key}");
    }
}
