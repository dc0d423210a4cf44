//! A consumer's signature over what it asked for. The recipients of a confidential run sit in
//! the database beside the run; whoever can write there could add a key of their own and read
//! every stage sealed afterwards. So the consumer signs its request (definition, project,
//! recipients, sources) with an Ed25519 key, the signed bytes are kept with the run, and every
//! sealer (the server for local stages, the worker for pooled ones) seals only to recipients the
//! signature covers. Anyone can re-check it later from the run view.
//!
//! The signed bytes are the request's canonical JSON (keys sorted, no whitespace; Python's
//! `json.dumps(x, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`), prefixed by
//! [`REQUEST_CONTEXT`]. FORMATS.md describes it for consumers that do not use Pond's code.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// What a request signature signs before the canonical JSON (domain separation).
pub const REQUEST_CONTEXT: &[u8] = b"pond-request-v1\0";

/// What a consumer's signing seed is derived under from its X25519 secret.
pub const SIGNING_KEY_CONTEXT: &[u8] = b"pond consumer signing key v1\0";

/// Why a signed request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestSignatureError {
    /// A field is not well formed (its name and why).
    #[error("{0}")]
    Malformed(String),
    /// The signature does not verify under the signing key.
    #[error("the signature does not verify under `signing_key` over the request's canonical form")]
    BadSignature,
}

/// The consumer's signature as a request carries it (`consumer_signature`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConsumerSignature {
    /// Base64 of the Ed25519 public key.
    pub signing_key: String,
    /// Base64 of the 64-byte signature over [`REQUEST_CONTEXT`] ‖ canonical request.
    pub signature: String,
}

/// A request as the consumer signed it, kept with the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SignedRequest {
    /// Base64 of the consumer's Ed25519 public key.
    pub signing_key: String,
    /// Base64 of the signature.
    pub signature: String,
    /// The canonical JSON that was signed (without the context prefix).
    pub body: String,
}

/// What a verified request says about its encryption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedBody {
    /// The project it was submitted to.
    pub project_id: String,
    /// The recipients it named (raw keys).
    pub recipients: Vec<[u8; 32]>,
}

/// The Ed25519 seed a consumer signs requests with, derived from its X25519 secret (one key file
/// serves both; the hash keeps the two uses apart).
pub fn consumer_signing_seed(x25519_secret: &[u8; 32]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(SIGNING_KEY_CONTEXT);
    hasher.update(x25519_secret);
    hasher.finalize().into()
}

/// Base64 of the consumer's signing public key for this seed.
pub fn signing_public(seed: &[u8; 32]) -> String {
    B64.encode(SigningKey::from_bytes(seed).verifying_key().to_bytes())
}

/// The part of a run request a consumer signs, from the request's JSON: `definition`, `nonce`
/// (`""` when absent), `project_id`, `recipient_pubkeys` (`[]` when absent) and `sources` (`[]`
/// when absent), exactly as sent. `project_id` is the project the run is submitted to. The nonce
/// makes two identical requests two signatures: a signature is accepted for one run only.
pub fn signed_fields(request: &Value, project_id: &str) -> Value {
    let field = |a: &str, b: &str| request.get(a).or_else(|| request.get(b)).cloned();
    let mut map = serde_json::Map::new();
    map.insert("definition".into(), field("definition", "definition").unwrap_or(Value::Null));
    map.insert("nonce".into(), request.get("nonce").cloned().unwrap_or_else(|| Value::String(String::new())));
    map.insert("project_id".into(), Value::String(project_id.to_string()));
    map.insert(
        "recipient_pubkeys".into(),
        field("recipient_pubkeys", "recipientPubkeys").unwrap_or_else(|| Value::Array(Vec::new())),
    );
    map.insert("sources".into(), field("sources", "sources").unwrap_or_else(|| Value::Array(Vec::new())));
    Value::Object(map)
}

/// Canonical JSON: object keys sorted by their UTF-8 bytes, no whitespace, strings escaped as
/// serde_json and Python's `json.dumps(..., ensure_ascii=False)` both escape them, numbers as
/// serde_json writes them.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(key, out);
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::String(s) => write_string(s, out),
        // Null, booleans and numbers have one form in serde_json's output.
        other => out.push_str(&other.to_string()),
    }
}

fn write_string(s: &str, out: &mut String) {
    out.push_str(&Value::String(s.to_string()).to_string());
}

impl SignedRequest {
    /// Signs `fields` (see [`signed_fields`]) with the consumer's seed.
    pub fn sign(seed: &[u8; 32], fields: &Value) -> SignedRequest {
        let body = canonical_json(fields);
        let key = SigningKey::from_bytes(seed);
        let signature = key.sign(&message(&body));
        SignedRequest {
            signing_key: B64.encode(key.verifying_key().to_bytes()),
            signature: B64.encode(signature.to_bytes()),
            body,
        }
    }

    /// The request as kept: `signature` over `fields`.
    pub fn from_parts(signature: &ConsumerSignature, fields: &Value) -> SignedRequest {
        SignedRequest {
            signing_key: signature.signing_key.clone(),
            signature: signature.signature.clone(),
            body: canonical_json(fields),
        }
    }

    /// The signature as a request carries it.
    pub fn consumer_signature(&self) -> ConsumerSignature {
        ConsumerSignature { signing_key: self.signing_key.clone(), signature: self.signature.clone() }
    }

    /// Checks the signature and reads the project and recipients it covers.
    pub fn verify(&self) -> Result<SignedBody, RequestSignatureError> {
        let malformed = |m: &str| RequestSignatureError::Malformed(m.to_string());
        let key_bytes = B64.decode(self.signing_key.trim()).map_err(|_| malformed("signing_key is not base64"))?;
        let key_bytes: [u8; 32] =
            key_bytes.try_into().map_err(|_| malformed("signing_key is not 32 bytes (an Ed25519 public key)"))?;
        let key = VerifyingKey::from_bytes(&key_bytes)
            .map_err(|_| malformed("signing_key is not a valid Ed25519 public key"))?;
        let sig_bytes = B64.decode(self.signature.trim()).map_err(|_| malformed("signature is not base64"))?;
        let sig_bytes: [u8; 64] =
            sig_bytes.try_into().map_err(|_| malformed("signature is not 64 bytes (an Ed25519 signature)"))?;
        key.verify_strict(&message(&self.body), &ed25519_dalek::Signature::from_bytes(&sig_bytes))
            .map_err(|_| RequestSignatureError::BadSignature)?;
        #[derive(Deserialize)]
        struct Body {
            project_id: String,
            #[serde(default)]
            recipient_pubkeys: Vec<String>,
        }
        let body: Body = serde_json::from_str(&self.body)
            .map_err(|e| malformed(&format!("the signed body is not a request: {e}")))?;
        let mut recipients = Vec::with_capacity(body.recipient_pubkeys.len());
        for (i, text) in body.recipient_pubkeys.iter().enumerate() {
            let key =
                crate::pool::decode_key(text).map_err(|e| malformed(&format!("signed recipient_pubkeys[{i}] {e}")))?;
            recipients.push(key);
        }
        Ok(SignedBody { project_id: body.project_id, recipients })
    }
}

fn message(body: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(REQUEST_CONTEXT.len() + body.len());
    m.extend_from_slice(REQUEST_CONTEXT);
    m.extend_from_slice(body.as_bytes());
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_sorts_keys_and_drops_whitespace() {
        let v: Value = serde_json::from_str(r#"{ "b": [1, {"z": "\u0001é\n", "a": null}], "a": true }"#).unwrap();
        assert_eq!(canonical_json(&v), r#"{"a":true,"b":[1,{"a":null,"z":"\u0001é\n"}]}"#);
    }

    #[test]
    fn a_signed_request_verifies_and_any_change_breaks_it() {
        let seed = consumer_signing_seed(&[7; 32]);
        let recipient = B64.encode([9u8; 32]);
        let request = json!({"definition": {"stages": []}, "recipient_pubkeys": [recipient], "encrypt": true});
        let signed = SignedRequest::sign(&seed, &signed_fields(&request, "p1"));
        let body = signed.verify().unwrap();
        assert_eq!(body.project_id, "p1");
        assert_eq!(body.recipients, vec![[9u8; 32]]);
        assert_eq!(signed.signing_key, signing_public(&seed));

        let mut other = signed.clone();
        other.body = other.body.replace("p1", "p2");
        assert_eq!(other.verify(), Err(RequestSignatureError::BadSignature));
        // The same signature presented over another request's fields does not verify.
        let changed = json!({"definition": {"stages": []}, "recipient_pubkeys": [recipient, B64.encode([8u8; 32])]});
        let swapped = SignedRequest::from_parts(&signed.consumer_signature(), &signed_fields(&changed, "p1"));
        assert_eq!(swapped.verify(), Err(RequestSignatureError::BadSignature));
    }

    #[test]
    fn output_is_sealed_only_to_recipients_the_consumer_signed() {
        use crate::run::Encryption;
        let alice = crate::keys::x25519_public(&[1; 32]);
        let mallory = B64.encode(crate::keys::x25519_public(&[2; 32]));
        // Alice's key given in its age form: the same key.
        let request = json!({"definition": {}, "recipient_pubkeys": [crate::keys::age_recipient(&alice)]});
        let signed = SignedRequest::sign(&consumer_signing_seed(&[1; 32]), &signed_fields(&request, "p"));
        let honest = Encryption { recipients: vec![B64.encode(alice)], request: Some(signed.clone()) };
        assert_eq!(honest.sealing_keys("p").unwrap(), vec![alice]);

        let why = |e: &Encryption, project: &str| e.sealing_keys(project).unwrap_err();
        let mut injected = honest.clone();
        injected.recipients.push(mallory.clone());
        assert!(why(&injected, "p").contains("not among the recipients the consumer signed"));
        assert!(why(&honest, "q").contains("signed for project `p`, not `q`"));
        let stripped = Encryption { recipients: vec![mallory], request: None };
        assert!(why(&stripped, "p").contains("covered by no consumer signature"));
        let mut edited = honest.clone();
        if let Some(r) = edited.request.as_mut() {
            r.body = r.body.replace("\"definition\":{}", "\"definition\":{\"x\":1}");
        }
        assert!(why(&edited, "p").contains("does not verify"));
    }
}
