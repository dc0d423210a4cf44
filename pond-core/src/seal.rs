//! Confidentiality wire formats, libsodium-compatible (`shared/notes/crypto-formats.md`), so a
//! consumer decrypts Pond's output with any libsodium binding and no Pond code:
//!
//! - sealed boxes (`crypto_box_seal`) to X25519 recipients;
//! - (a) log lines: an `ENC1K:` key header per stream (the stream key sealed to each recipient,
//!   signed with Ed25519), then one `ENC1:` line per log line (`crypto_secretbox` under the
//!   stream key, nonce = stream id ‖ sequence number, so a dropped or reordered line shows);
//! - (b) artifacts: `crypto_secretstream_xchacha20poly1305` in 64 KiB chunks, last tagged FINAL,
//!   with a `.pondkey` JSON sidecar holding the file key sealed to each recipient.
//!
//! The primitives are dryoc's (a pure-Rust libsodium port); keys, nonces and stream ids come
//! from the OS random generator through it. Nothing here touches files or the network.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use dryoc::classic::crypto_box::{crypto_box_seal, crypto_box_seal_open};
use dryoc::classic::crypto_secretbox::{crypto_secretbox_easy, crypto_secretbox_open_easy};
use dryoc::classic::crypto_secretstream_xchacha20poly1305 as ss;
use dryoc::constants::{
    CRYPTO_BOX_SEALBYTES, CRYPTO_SECRETBOX_MACBYTES, CRYPTO_SECRETSTREAM_XCHACHA20POLY1305_ABYTES,
    CRYPTO_SECRETSTREAM_XCHACHA20POLY1305_HEADERBYTES, CRYPTO_SECRETSTREAM_XCHACHA20POLY1305_TAG_FINAL,
    CRYPTO_SECRETSTREAM_XCHACHA20POLY1305_TAG_MESSAGE,
};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::attest::fingerprint;

/// Domain separation of the log key header signature.
pub const LOGKEY_PREFIX: &[u8; 15] = b"pond.logkey.v1\0";
/// Plaintext bytes per artifact chunk.
pub const CHUNK: usize = 65_536;
/// Largest chunk size a sidecar may name (a bigger one is refused, not allocated).
pub const MAX_CHUNK: usize = 16 * 1024 * 1024;
/// The sidecar's file suffix.
pub const SIDECAR_SUFFIX: &str = ".pondkey";

/// Why something could not be opened (or sealed).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SealError {
    /// Not in the expected shape (prefix, base64, lengths, JSON).
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// None of the recipients is this key.
    #[error("not a recipient: this key ({0}) cannot open it")]
    NotRecipient(String),
    /// Authentication failed: tampered, truncated, or the wrong key.
    #[error("authentication failed: {0}")]
    Forged(&'static str),
    /// A log line out of order or missing (the sequence number is authenticated).
    #[error("log line out of order: expected sequence {expected}")]
    OutOfOrder {
        /// The sequence number the next line must have.
        expected: u64,
    },
    /// The key header's signature does not verify.
    #[error("log key header signature does not verify")]
    BadSignature,
    /// An artifact without its FINAL chunk, or with bytes after it.
    #[error("artifact {0}")]
    Truncated(&'static str),
}

/// 32 random bytes (a new key or seed).
pub fn random_key() -> [u8; 32] {
    random()
}

/// Seals a stage attempt's output as it is produced, for the sinks that store or upload it:
/// the first batch of lines gets the stream's `ENC1K:` header in front; each artifact becomes
/// the ciphertext and its `.pondkey` sidecar.
pub struct OutputSealer {
    recipients: Vec<[u8; 32]>,
    signer: [u8; 32],
    stream: std::sync::Mutex<Option<LogSealer>>,
}

impl OutputSealer {
    /// A sealer for `recipients`, signing log key headers with the Ed25519 seed `signer`.
    pub fn new(recipients: Vec<[u8; 32]>, signer: [u8; 32]) -> Self {
        OutputSealer { recipients, signer, stream: std::sync::Mutex::new(None) }
    }

    /// The sealer for a run's output: none for a run in clear; for a confidential run, one
    /// sealing only to the recipients its consumer signed, or why it cannot (the stage must then
    /// fail without running: nothing may be written in clear, or to a key the consumer did not
    /// choose).
    pub fn for_run(run: &crate::run::Run, signer: [u8; 32]) -> Result<Option<Self>, String> {
        match &run.encryption {
            None => Ok(None),
            Some(e) => Ok(Some(OutputSealer::new(e.sealing_keys(&run.project_id)?, signer))),
        }
    }

    /// The lines as stored: a header first (once), then one `ENC1:` line per line (pieces of a
    /// long line keep their `continued` mark). Pond's own notes (`System`) stay in clear.
    pub fn lines(&self, lines: Vec<crate::exec::OutputLine>) -> Vec<crate::exec::OutputLine> {
        use crate::exec::OutputLine;
        use crate::store::LogStream;
        let mut guard = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(lines.len() + 1);
        let sealer = guard.get_or_insert_with(|| {
            let (sealer, header) = LogSealer::new(&self.recipients, &self.signer);
            out.push(OutputLine::text(LogStream::System, header));
            sealer
        });
        for line in lines {
            if line.stream == LogStream::System {
                out.push(line);
                continue;
            }
            let sealed = sealer.seal_line(&line.bytes);
            out.push(OutputLine { stream: line.stream, bytes: sealed.into_bytes(), continued: line.continued });
        }
        out
    }

    /// The artifact as stored: `(name, ciphertext)` and `(name.pondkey, sidecar)`.
    pub fn artifact(&self, name: &str, data: &[u8]) -> [(String, Vec<u8>); 2] {
        let (sealed, sidecar) = seal_artifact(data, &self.recipients);
        [(name.to_string(), sealed), (format!("{name}{SIDECAR_SUFFIX}"), sidecar.into_bytes())]
    }
}

/// `N` random bytes from the OS (through dryoc).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    random()
}

fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    dryoc::rng::copy_randombytes(&mut out);
    out
}

/// `crypto_box_seal`: anonymous encryption to `recipient` (ephemeral pk ‖ mac ‖ ct).
pub fn seal(recipient: &[u8; 32], message: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; message.len() + CRYPTO_BOX_SEALBYTES];
    // Only fails on a short output buffer, which the size above rules out.
    let _ = crypto_box_seal(&mut out, message, recipient);
    out
}

/// Opens a sealed box with the recipient's key pair.
pub fn open_sealed(public: &[u8; 32], secret: &[u8; 32], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
    if sealed.len() < CRYPTO_BOX_SEALBYTES {
        return Err(SealError::Malformed("sealed box"));
    }
    let mut out = vec![0u8; sealed.len() - CRYPTO_BOX_SEALBYTES];
    crypto_box_seal_open(&mut out, sealed, public, secret).map_err(|_| SealError::Forged("sealed box"))?;
    Ok(out)
}

/// The first 8 bytes of SHA-256 of a public key: how a recipient finds its entry.
pub fn fp8(public: &[u8; 32]) -> [u8; 8] {
    let digest = Sha256::digest(public);
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

/// Seals one log stream (format (a)): its header line, then each line in order.
pub struct LogSealer {
    key: [u8; 32],
    stream_id: [u8; 16],
    seq: u64,
}

impl LogSealer {
    /// A new stream for `recipients`, with its `ENC1K:` header signed by `signer` (an Ed25519
    /// seed: the worker's key, or the control plane's in local mode).
    pub fn new(recipients: &[[u8; 32]], signer: &[u8; 32]) -> (LogSealer, String) {
        let sealer = LogSealer { key: random(), stream_id: random(), seq: 0 };
        let header = sealer.header(recipients, signer);
        (sealer, header)
    }

    fn header(&self, recipients: &[[u8; 32]], signer: &[u8; 32]) -> String {
        let mut body = Vec::with_capacity(17 + recipients.len() * 88);
        body.extend_from_slice(&self.stream_id);
        body.push(recipients.len().min(255) as u8);
        for pk in recipients.iter().take(255) {
            body.extend_from_slice(&fp8(pk));
            body.extend_from_slice(&seal(pk, &self.key));
        }
        let mut signed = LOGKEY_PREFIX.to_vec();
        signed.extend_from_slice(&body);
        let sig = SigningKey::from_bytes(signer).sign(&signed);
        format!("ENC1K:{} {}", B64.encode(&body), B64.encode(sig.to_bytes()))
    }

    /// The `ENC1:` line for the next log line.
    pub fn seal_line(&mut self, line: &[u8]) -> String {
        let nonce = line_nonce(&self.stream_id, self.seq);
        self.seq += 1;
        let mut boxed = vec![0u8; line.len() + CRYPTO_SECRETBOX_MACBYTES];
        let _ = crypto_secretbox_easy(&mut boxed, line, &nonce, &self.key);
        let mut out = Vec::with_capacity(24 + boxed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&boxed);
        format!("ENC1:{}", B64.encode(out))
    }
}

fn line_nonce(stream_id: &[u8; 16], seq: u64) -> [u8; 24] {
    let mut nonce = [0u8; 24];
    nonce[..16].copy_from_slice(stream_id);
    nonce[16..].copy_from_slice(&seq.to_be_bytes());
    nonce
}

/// Opens one log stream: made from its `ENC1K:` header, then given its `ENC1:` lines in order.
pub struct LogOpener {
    key: [u8; 32],
    stream_id: [u8; 16],
    next: u64,
}

impl LogOpener {
    /// Opens a header line with the recipient's key pair. With `signer`, the header's signature
    /// must verify under it.
    /// (See [`header_signer`] to check a header against several keys first.)
    pub fn from_header(
        line: &str,
        public: &[u8; 32],
        secret: &[u8; 32],
        signer: Option<&[u8; 32]>,
    ) -> Result<LogOpener, SealError> {
        let rest = line.strip_prefix("ENC1K:").ok_or(SealError::Malformed("log key header"))?;
        let (body_b64, _signature) = rest.split_once(' ').ok_or(SealError::Malformed("log key header"))?;
        let body = B64.decode(body_b64).map_err(|_| SealError::Malformed("log key header"))?;
        if let Some(signer) = signer {
            header_signer(line, std::slice::from_ref(signer))?;
        }
        if body.len() < 17 {
            return Err(SealError::Malformed("log key header"));
        }
        let n = body[16] as usize;
        let entry = 8 + 32 + CRYPTO_BOX_SEALBYTES;
        if body.len() != 17 + n * entry {
            return Err(SealError::Malformed("log key header"));
        }
        let mine = fp8(public);
        for i in 0..n {
            let at = 17 + i * entry;
            if body[at..at + 8] == mine {
                let key = open_sealed(public, secret, &body[at + 8..at + entry])?;
                let key: [u8; 32] = key.try_into().map_err(|_| SealError::Malformed("stream key"))?;
                let mut stream_id = [0u8; 16];
                stream_id.copy_from_slice(&body[..16]);
                return Ok(LogOpener { key, stream_id, next: 0 });
            }
        }
        Err(SealError::NotRecipient(fingerprint(public)))
    }

    /// Opens the next `ENC1:` line; a line from another position (dropped, reordered or
    /// replayed) is refused.
    pub fn open_line(&mut self, line: &str) -> Result<Vec<u8>, SealError> {
        let b64 = line.strip_prefix("ENC1:").ok_or(SealError::Malformed("log line"))?;
        let raw = B64.decode(b64).map_err(|_| SealError::Malformed("log line"))?;
        if raw.len() < 24 + CRYPTO_SECRETBOX_MACBYTES {
            return Err(SealError::Malformed("log line"));
        }
        let nonce: [u8; 24] = raw[..24].try_into().map_err(|_| SealError::Malformed("log line"))?;
        if nonce != line_nonce(&self.stream_id, self.next) {
            return Err(SealError::OutOfOrder { expected: self.next });
        }
        let mut out = vec![0u8; raw.len() - 24 - CRYPTO_SECRETBOX_MACBYTES];
        crypto_secretbox_open_easy(&mut out, &raw[24..], &nonce, &self.key)
            .map_err(|_| SealError::Forged("log line"))?;
        self.next += 1;
        Ok(out)
    }
}

/// The `.pondkey` sidecar of an encrypted artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sidecar {
    /// Format version (1).
    pub pondkey: u32,
    /// `secretstream_xchacha20poly1305`.
    pub alg: String,
    /// Plaintext bytes per chunk.
    pub chunk_size: usize,
    /// The file key sealed to each recipient.
    pub recipients: Vec<SidecarRecipient>,
}

/// One recipient of an artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SidecarRecipient {
    /// `SHA256:…` fingerprint of the recipient's key.
    pub fp: String,
    /// Base64 of the sealed file key.
    pub sealed_key: String,
}

/// Encrypts an artifact chunk by chunk (format (b)), so a large file streams through a small
/// buffer: the header first, then [`ArtifactStream::push`] for each [`CHUNK`] of plaintext.
pub struct ArtifactStream {
    state: ss::State,
}

impl ArtifactStream {
    /// A stream under `key` itself (no recipients): the stream and its 24-byte header.
    pub fn with_key(key: &[u8; 32]) -> (ArtifactStream, [u8; 24]) {
        let mut state = ss::State::new();
        let mut header = ss::Header::default();
        ss::crypto_secretstream_xchacha20poly1305_init_push(&mut state, &mut header, key);
        (ArtifactStream { state }, header)
    }

    /// A new stream for `recipients`: the stream, its 24-byte header (the file's first bytes)
    /// and the sidecar JSON.
    pub fn new(recipients: &[[u8; 32]]) -> (ArtifactStream, [u8; 24], String) {
        let key: ss::Key = random();
        let (stream, header) = ArtifactStream::with_key(&key);
        let sidecar = Sidecar {
            pondkey: 1,
            alg: "secretstream_xchacha20poly1305".into(),
            chunk_size: CHUNK,
            recipients: recipients
                .iter()
                .map(|pk| SidecarRecipient { fp: fingerprint(pk), sealed_key: B64.encode(seal(pk, &key)) })
                .collect(),
        };
        (stream, header, serde_json::to_string(&sidecar).unwrap_or_default())
    }

    /// Appends the ciphertext of one chunk (at most [`CHUNK`] bytes; the `last` one is tagged
    /// FINAL) to `out`.
    pub fn push(&mut self, chunk: &[u8], last: bool, out: &mut Vec<u8>) {
        let tag = if last {
            CRYPTO_SECRETSTREAM_XCHACHA20POLY1305_TAG_FINAL
        } else {
            CRYPTO_SECRETSTREAM_XCHACHA20POLY1305_TAG_MESSAGE
        };
        let start = out.len();
        out.resize(start + chunk.len() + CRYPTO_SECRETSTREAM_XCHACHA20POLY1305_ABYTES, 0);
        // Only fails on a wrong output size, which the resize above rules out.
        let _ = ss::crypto_secretstream_xchacha20poly1305_push(&mut self.state, &mut out[start..], chunk, None, tag);
    }
}

/// Encrypts data kept at rest under the server's key (the secretstream file of format (b),
/// without a sidecar): uploaded source bundles, pooled jobs' inputs, credentials.
pub fn seal_at_rest(key: &[u8; 32], data: &[u8]) -> Vec<u8> {
    let (stream, header) = ArtifactStream::with_key(key);
    stream_chunks(stream, header, data)
}

/// Opens what [`seal_at_rest`] sealed.
pub fn open_at_rest(key: &[u8; 32], data: &[u8]) -> Result<Vec<u8>, SealError> {
    open_stream(data, key, CHUNK)
}

fn stream_chunks(mut stream: ArtifactStream, header: [u8; 24], data: &[u8]) -> Vec<u8> {
    let chunks = data.len().div_ceil(CHUNK).max(1);
    let mut out = Vec::with_capacity(header.len() + data.len() + chunks * CRYPTO_SECRETSTREAM_XCHACHA20POLY1305_ABYTES);
    out.extend_from_slice(&header);
    for i in 0..chunks {
        let part = &data[(i * CHUNK).min(data.len())..((i + 1) * CHUNK).min(data.len())];
        stream.push(part, i + 1 == chunks, &mut out);
    }
    out
}

/// Encrypts an artifact for `recipients` (format (b)): the file and its sidecar JSON.
pub fn seal_artifact(data: &[u8], recipients: &[[u8; 32]]) -> (Vec<u8>, String) {
    let (stream, header, sidecar) = ArtifactStream::new(recipients);
    (stream_chunks(stream, header, data), sidecar)
}

/// Decrypts an artifact with its sidecar and the recipient's key pair. Fails on tampering, on
/// a missing FINAL chunk, and on bytes after it.
pub fn open_artifact(data: &[u8], sidecar: &str, public: &[u8; 32], secret: &[u8; 32]) -> Result<Vec<u8>, SealError> {
    let sidecar: Sidecar = serde_json::from_str(sidecar).map_err(|_| SealError::Malformed("sidecar"))?;
    if sidecar.pondkey != 1
        || sidecar.alg != "secretstream_xchacha20poly1305"
        || !(1..=MAX_CHUNK).contains(&sidecar.chunk_size)
    {
        return Err(SealError::Malformed("sidecar"));
    }
    let mine = fingerprint(public);
    let entry = sidecar.recipients.iter().find(|r| r.fp == mine).ok_or(SealError::NotRecipient(mine))?;
    let sealed = B64.decode(&entry.sealed_key).map_err(|_| SealError::Malformed("sidecar"))?;
    let key: ss::Key =
        open_sealed(public, secret, &sealed)?.try_into().map_err(|_| SealError::Malformed("file key"))?;
    open_stream(data, &key, sidecar.chunk_size)
}

/// Decrypts a secretstream file (header ‖ chunks of `chunk_size` plaintext bytes) under `key`.
pub fn open_stream(data: &[u8], key: &[u8; 32], chunk_size: usize) -> Result<Vec<u8>, SealError> {
    if !(1..=MAX_CHUNK).contains(&chunk_size) {
        return Err(SealError::Malformed("chunk size"));
    }
    if data.len() < CRYPTO_SECRETSTREAM_XCHACHA20POLY1305_HEADERBYTES {
        return Err(SealError::Truncated("shorter than its header"));
    }
    let header: ss::Header = data[..CRYPTO_SECRETSTREAM_XCHACHA20POLY1305_HEADERBYTES]
        .try_into()
        .map_err(|_| SealError::Malformed("stream header"))?;
    let mut state = ss::State::new();
    ss::crypto_secretstream_xchacha20poly1305_init_pull(&mut state, &header, key);
    let mut rest = &data[CRYPTO_SECRETSTREAM_XCHACHA20POLY1305_HEADERBYTES..];
    let mut out = Vec::with_capacity(rest.len());
    let step = chunk_size + CRYPTO_SECRETSTREAM_XCHACHA20POLY1305_ABYTES;
    loop {
        if rest.len() < CRYPTO_SECRETSTREAM_XCHACHA20POLY1305_ABYTES {
            return Err(SealError::Truncated("has no FINAL chunk (cut short)"));
        }
        let take = rest.len().min(step);
        let start = out.len();
        out.resize(start + take - CRYPTO_SECRETSTREAM_XCHACHA20POLY1305_ABYTES, 0);
        let mut tag = 0u8;
        ss::crypto_secretstream_xchacha20poly1305_pull(&mut state, &mut out[start..], &mut tag, &rest[..take], None)
            .map_err(|_| SealError::Forged("artifact chunk"))?;
        rest = &rest[take..];
        if tag == CRYPTO_SECRETSTREAM_XCHACHA20POLY1305_TAG_FINAL {
            if !rest.is_empty() {
                return Err(SealError::Truncated("has bytes after its FINAL chunk"));
            }
            return Ok(out);
        }
    }
}

/// Which of `signers` (Ed25519 public keys) signed a log key header (`ENC1K:`); an error when
/// none did. A reader checks this before trusting a stream: anyone who knows the recipients'
/// public keys can write a header and lines, but only pond's nodes and the run's workers sign.
pub fn header_signer(line: &str, signers: &[[u8; 32]]) -> Result<[u8; 32], SealError> {
    let rest = line.strip_prefix("ENC1K:").ok_or(SealError::Malformed("log key header"))?;
    let (body_b64, sig_b64) = rest.split_once(' ').ok_or(SealError::Malformed("log key header"))?;
    let body = B64.decode(body_b64).map_err(|_| SealError::Malformed("log key header"))?;
    let sig = B64.decode(sig_b64).map_err(|_| SealError::Malformed("log key header signature"))?;
    let sig = ed25519_dalek::Signature::from_slice(&sig).map_err(|_| SealError::BadSignature)?;
    let mut signed = LOGKEY_PREFIX.to_vec();
    signed.extend_from_slice(&body);
    signers
        .iter()
        .find(|k| VerifyingKey::from_bytes(k).is_ok_and(|key| key.verify_strict(&signed, &sig).is_ok()))
        .copied()
        .ok_or(SealError::BadSignature)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A test X25519 key pair (public, secret) from a fixed secret.
    pub(crate) fn pair(n: u8) -> ([u8; 32], [u8; 32]) {
        (crate::keys::x25519_public(&[n; 32]), [n; 32])
    }

    #[test]
    fn log_lines_round_trip_and_detect_reordering() {
        let (a_pub, a_sec) = pair(1);
        let (b_pub, b_sec) = pair(2);
        let (c_pub, c_sec) = pair(3);
        let signer = [9u8; 32];
        let signer_pub = SigningKey::from_bytes(&signer).verifying_key().to_bytes();
        let (mut sealer, header) = LogSealer::new(&[a_pub, b_pub], &signer);
        let plain: [&[u8]; 4] = [b"one", b"", "three ✓".as_bytes(), &[0, 0xff, b'\n']];
        let lines: Vec<String> = plain.iter().map(|l| sealer.seal_line(l)).collect();
        for (public, secret) in [(a_pub, a_sec), (b_pub, b_sec)] {
            let mut opener = LogOpener::from_header(&header, &public, &secret, Some(&signer_pub)).unwrap();
            let got: Vec<Vec<u8>> = lines.iter().map(|l| opener.open_line(l).unwrap()).collect();
            assert_eq!(got, plain.map(|p| p.to_vec()), "any bytes round-trip");
        }
        assert!(matches!(LogOpener::from_header(&header, &c_pub, &c_sec, None), Err(SealError::NotRecipient(_))));
        let other = SigningKey::from_bytes(&[8u8; 32]).verifying_key().to_bytes();
        assert_eq!(LogOpener::from_header(&header, &a_pub, &a_sec, Some(&other)).err(), Some(SealError::BadSignature));
        let mut opener = LogOpener::from_header(&header, &a_pub, &a_sec, None).unwrap();
        assert_eq!(opener.open_line(&lines[1]).err(), Some(SealError::OutOfOrder { expected: 0 }));
        let mut tampered = B64.decode(&lines[0][5..]).unwrap();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(
            opener.open_line(&format!("ENC1:{}", B64.encode(tampered))).err(),
            Some(SealError::Forged("log line"))
        );
    }

    #[test]
    fn artifacts_round_trip_and_detect_truncation() {
        let (a_pub, a_sec) = pair(1);
        let (c_pub, c_sec) = pair(3);
        for size in [0usize, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let (sealed, sidecar) = seal_artifact(&data, &[a_pub]);
            assert_eq!(open_artifact(&sealed, &sidecar, &a_pub, &a_sec).unwrap(), data, "size {size}");
            assert!(matches!(open_artifact(&sealed, &sidecar, &c_pub, &c_sec), Err(SealError::NotRecipient(_))));
        }
        let data = vec![7u8; 2 * CHUNK + 5];
        let (sealed, sidecar) = seal_artifact(&data, &[a_pub]);
        // Cut after the first chunk: no FINAL.
        let cut = &sealed[..24 + CHUNK + 17];
        assert!(matches!(open_artifact(cut, &sidecar, &a_pub, &a_sec), Err(SealError::Truncated(_))));
        let mut longer = sealed.clone();
        longer.extend_from_slice(&[0; 40]);
        assert!(open_artifact(&longer, &sidecar, &a_pub, &a_sec).is_err());
        let mut flipped = sealed.clone();
        flipped[100] ^= 1;
        assert_eq!(open_artifact(&flipped, &sidecar, &a_pub, &a_sec).err(), Some(SealError::Forged("artifact chunk")));
        let _ = c_sec;
    }
}
