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

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * 31 + (i >> 8) * 7 + 13) & 0xff) as u8).collect()
}

fn b64(text: &serde_json::Value) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text.as_str().unwrap()).unwrap()
}

fn keypair(name: &str) -> ([u8; 32], [u8; 32]) {
    let keys = load("pynacl_keys.json");
    (bytes(&keys[name]["pk_hex"]), bytes(&keys[name]["sk_hex"]))
}

#[test]
fn pynacl_sealed_boxes_open() {
    let v = load("pynacl_sealedbox.json");
    let (public, secret) = (bytes(&v["recipient_pk_hex"]), bytes(&v["recipient_sk_hex"]));
    for case in v["cases"].as_array().unwrap() {
        let opened = pond_core::seal::open_sealed(&public, &secret, &b64(&case["sealed_b64"])).unwrap();
        assert_eq!(hex::encode(opened), case["plaintext_hex"].as_str().unwrap());
    }
    // And ours opens with the same key (the other direction is the Python interop test).
    let ours = pond_core::seal::seal(&public, b"pond");
    assert_eq!(pond_core::seal::open_sealed(&public, &secret, &ours).unwrap(), b"pond");
}

#[test]
fn pynacl_secretstreams_open_including_tags_and_associated_data() {
    use dryoc::classic::crypto_secretstream_xchacha20poly1305 as ss;
    let v = load("pynacl_secretstream.json");
    let small = &v["small"];
    let mut state = ss::State::new();
    ss::crypto_secretstream_xchacha20poly1305_init_pull(
        &mut state,
        &bytes(&small["header_hex"]),
        &bytes(&small["key_hex"]),
    );
    for chunk in small["chunks"].as_array().unwrap() {
        let ct = hex::decode(chunk["ciphertext_hex"].as_str().unwrap()).unwrap();
        let ad = hex::decode(chunk["ad_hex"].as_str().unwrap()).unwrap();
        let mut out = vec![0u8; ct.len() - 17];
        let mut tag = 0u8;
        let ad = (!ad.is_empty()).then_some(ad.as_slice());
        ss::crypto_secretstream_xchacha20poly1305_pull(&mut state, &mut out, &mut tag, &ct, ad).unwrap();
        assert_eq!(hex::encode(&out), chunk["plaintext_hex"].as_str().unwrap());
        assert_eq!(tag as u64, chunk["tag"].as_u64().unwrap());
    }
    let big = &v["big"];
    let data = std::fs::read(vectors().join(big["file"].as_str().unwrap())).unwrap();
    let opened = pond_core::seal::open_stream(&data, &bytes(&big["key_hex"]), 65536, None).unwrap();
    assert_eq!(opened, pattern(1 << 20));
}

#[test]
fn pynacl_log_lines_open_for_both_recipients_and_the_header_signature_verifies() {
    let v = load("pynacl_log.json");
    let keys = load("pynacl_keys.json");
    let signer: [u8; 32] = bytes(&keys["worker_ed25519"]["pk_hex"]);
    let lines: Vec<&str> = v["lines"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    let want: Vec<Vec<u8>> =
        v["plaintexts_hex"].as_array().unwrap().iter().map(|p| hex::decode(p.as_str().unwrap()).unwrap()).collect();
    for name in ["consumer1", "consumer2"] {
        let (public, secret) = keypair(name);
        // Version 1 streams (older runs) are bound to no place: any place opens them.
        let place = pond_core::seal::Place::new("any", "any", 1);
        let mut opener =
            pond_core::seal::LogOpener::from_header(lines[0], &public, &secret, &place, &[signer]).unwrap();
        let stdout = pond_core::store::LogStream::Stdout;
        let got: Vec<Vec<u8>> = lines[1..].iter().map(|l| opener.open_line(l, stdout, false).unwrap()).collect();
        assert_eq!(got, want, "{name}");
    }
    let (public, secret) = keypair("worker_x25519");
    let place = pond_core::seal::Place::new("any", "any", 1);
    assert!(
        pond_core::seal::LogOpener::from_header(lines[0], &public, &secret, &place, &[]).is_err(),
        "not a recipient"
    );
}

#[test]
fn pynacl_artifact_opens_for_both_recipients() {
    let data = std::fs::read(vectors().join("pynacl_artifact.bin")).unwrap();
    let sidecar = std::fs::read_to_string(vectors().join("pynacl_artifact.bin.pondkey")).unwrap();
    for name in ["consumer1", "consumer2"] {
        let (public, secret) = keypair(name);
        assert_eq!(pond_core::seal::open_artifact(&data, &sidecar, &public, &secret).unwrap(), pattern(200_000));
    }
}

#[test]
fn pynacl_credentials_open_with_the_worker_key() {
    let v = load("pynacl_creds.json");
    let (public, secret) = keypair("worker_x25519");
    let opened = pond_core::seal::open_sealed(&public, &secret, &b64(&v["sealed_b64"])).unwrap();
    assert_eq!(String::from_utf8(opened).unwrap(), v["plaintext_utf8"].as_str().unwrap());
}
