//! Confidentiality wire formats, libsodium-compatible (`docs/FORMATS.md`), so a consumer
//! decrypts Pond's output with any libsodium binding and no Pond code:
//!
//! - sealed boxes (`crypto_box_seal`) to X25519 recipients;
//! - (a) log streams, one per stage attempt, bound to their [`Place`] (run, stage, attempt): an
//!   `ENC2K:` key header (the stream key sealed to each recipient, signed with Ed25519 over the
//!   place), one `ENC2:` record per line (XChaCha20-Poly1305 under the stream key, nonce =
//!   stream id ‖ sequence number, associated data = place, stream and continuation flag), and a
//!   signed `ENC2F:` final record (count and running hash of the lines), so a line moved,
//!   relabelled, dropped or cut off the end shows. `ENC1K:`/`ENC1:` streams of older runs are
//!   still read (no place, no final record);
//! - (b) artifacts: `crypto_secretstream_xchacha20poly1305` in 64 KiB chunks, last tagged FINAL,
//!   with a `.pondkey` JSON sidecar holding the file key sealed to each recipient; an output
//!   artifact's chunks carry its place and name as associated data and the sidecar a signature
//!   over place, name and the ciphertext's SHA-256 (`pondkey: 2`).
//!
//! The primitives are dryoc's (a pure-Rust libsodium port); keys, nonces and stream ids come
//! from the OS random generator through it. Nothing here touches files or the network.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use dryoc::classic::crypto_aead_xchacha20poly1305_ietf::{
    crypto_aead_xchacha20poly1305_ietf_decrypt, crypto_aead_xchacha20poly1305_ietf_encrypt,
};
use dryoc::classic::crypto_box::{crypto_box_seal, crypto_box_seal_open};
use dryoc::classic::crypto_secretbox::crypto_secretbox_open_easy;
use dryoc::classic::crypto_secretstream_xchacha20poly1305 as ss;
use dryoc::constants::{
    CRYPTO_AEAD_XCHACHA20POLY1305_IETF_ABYTES, CRYPTO_BOX_SEALBYTES, CRYPTO_SECRETBOX_MACBYTES,
    CRYPTO_SECRETSTREAM_XCHACHA20POLY1305_ABYTES, CRYPTO_SECRETSTREAM_XCHACHA20POLY1305_HEADERBYTES,
    CRYPTO_SECRETSTREAM_XCHACHA20POLY1305_TAG_FINAL, CRYPTO_SECRETSTREAM_XCHACHA20POLY1305_TAG_MESSAGE,
};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::attest::fingerprint;

/// Domain separation of the `ENC1K:` log key header signature (older runs).
pub const LOGKEY_PREFIX: &[u8; 15] = b"pond.logkey.v1\0";
/// Domain separation of the `ENC2K:` header signature.
pub const LOGKEY_V2: &[u8] = b"pond.logkey.v2\0";
/// Domain separation of an `ENC2:` line's associated data.
pub const LOGLINE_V2: &[u8] = b"pond.logline.v2\0";
/// Domain separation of the `ENC2F:` final record's signature.
pub const LOGEND_V2: &[u8] = b"pond.logend.v2\0";
/// Domain separation of an output artifact's associated data and sidecar signature.
pub const ARTIFACT_V2: &[u8] = b"pond.artifact.v2\0";
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
    /// A log stream without its final record.
    #[error("log stream has no final record: lines may have been cut off its end")]
    Unfinished,
    /// A final record that does not match the lines read.
    #[error("log stream's final record does not match its lines ({0}): lines were removed, added or changed")]
    EndMismatch(String),
    /// Something for another place (run, stage, attempt, stream or name).
    #[error("sealed for another place: {0}")]
    Misplaced(&'static str),
}

/// Where sealed output belongs: a stage attempt of a run. It is bound into every signature and
/// associated data, so output cannot pass for another run's, stage's or attempt's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    /// The run id.
    pub run: String,
    /// The stage key.
    pub stage: String,
    /// The attempt number.
    pub attempt: u32,
}

impl Place {
    /// The place of an attempt.
    pub fn new(run: impl std::fmt::Display, stage: &str, attempt: u32) -> Self {
        Place { run: run.to_string(), stage: stage.to_string(), attempt }
    }

    /// `run ‖ 0x00 ‖ stage ‖ 0x00 ‖ attempt:u32 big-endian` (run ids and stage keys hold no NUL).
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.run.len() + self.stage.len() + 6);
        out.extend_from_slice(self.run.as_bytes());
        out.push(0);
        out.extend_from_slice(self.stage.as_bytes());
        out.push(0);
        out.extend_from_slice(&self.attempt.to_be_bytes());
        out
    }
}

/// The byte an output stream is bound as: stdout 1, stderr 2 (pond's own notes are never sealed).
fn stream_byte(stream: crate::store::LogStream) -> u8 {
    match stream {
        crate::store::LogStream::Stdout => 1,
        crate::store::LogStream::Stderr => 2,
        crate::store::LogStream::System => 0,
    }
}

/// 32 random bytes (a new key or seed).
pub fn random_key() -> [u8; 32] {
    random()
}

/// Seals a stage attempt's output as it is produced, for the sinks that store or upload it:
/// the first batch of lines gets the stream's `ENC2K:` header in front, [`OutputSealer::finish`]
/// gives its `ENC2F:` final record; each artifact becomes the ciphertext and its `.pondkey`
/// sidecar, bound to the attempt and the name.
pub struct OutputSealer {
    recipients: Vec<[u8; 32]>,
    signer: [u8; 32],
    place: Place,
    stream: std::sync::Mutex<Option<LogSealer>>,
    finished: std::sync::atomic::AtomicBool,
}

impl OutputSealer {
    /// A sealer for `recipients` of the attempt at `place`, signing with the Ed25519 seed
    /// `signer`.
    pub fn new(recipients: Vec<[u8; 32]>, signer: [u8; 32], place: Place) -> Self {
        OutputSealer {
            recipients,
            signer,
            place,
            stream: std::sync::Mutex::new(None),
            finished: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The sealer for an attempt of a run: none for a run in clear; for a confidential run, one
    /// sealing only to the recipients its consumer signed, or why it cannot (the stage must then
    /// fail without running: nothing may be written in clear, or to a key the consumer did not
    /// choose).
    pub fn for_run(run: &crate::run::Run, stage: &str, attempt: u32, signer: [u8; 32]) -> Result<Option<Self>, String> {
        match &run.encryption {
            None => Ok(None),
            Some(e) => Ok(Some(OutputSealer::new(
                e.sealing_keys(&run.project_id)?,
                signer,
                Place::new(run.id, stage, attempt),
            ))),
        }
    }

    /// The lines as stored: a header first (once), then one `ENC2:` line per line (pieces of a
    /// long line keep their `continued` mark, which is authenticated). Pond's own notes
    /// (`System`) stay in clear.
    pub fn lines(&self, lines: Vec<crate::exec::OutputLine>) -> Vec<crate::exec::OutputLine> {
        use crate::exec::OutputLine;
        use crate::store::LogStream;
        let mut guard = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(lines.len() + 1);
        let sealer = guard.get_or_insert_with(|| {
            let (sealer, header) = LogSealer::new(&self.recipients, &self.signer, &self.place);
            out.push(OutputLine::text(LogStream::System, header));
            sealer
        });
        for line in lines {
            if line.stream == LogStream::System {
                out.push(line);
                continue;
            }
            let sealed = sealer.seal_line(&line.bytes, line.stream, line.continued);
            out.push(OutputLine { stream: line.stream, bytes: sealed.into_bytes(), continued: line.continued });
        }
        out
    }

    /// The stream's last records: its header if no line came, then the signed `ENC2F:` final
    /// record. Every attempt that ends normally has a whole stream, even an empty one, so a
    /// reader can tell a stream cut off (or removed) from one that said nothing.
    /// A second call gives nothing: the stream has one final record.
    pub fn finish(&self) -> Vec<crate::exec::OutputLine> {
        use crate::exec::OutputLine;
        use crate::store::LogStream;
        if self.finished.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Vec::new();
        }
        let mut out = self.lines(Vec::new());
        let guard = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sealer) = guard.as_ref() {
            out.push(OutputLine::text(LogStream::System, sealer.end()));
        }
        out
    }

    /// The artifact as stored: `(name, ciphertext)` and `(name.pondkey, sidecar)`.
    pub fn artifact(&self, name: &str, data: &[u8]) -> [(String, Vec<u8>); 2] {
        let (sealed, sidecar) = seal_output_artifact(data, &self.recipients, &self.place, name, &self.signer);
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

/// Seals one log stream (format (a), `ENC2`): its header line, each line in order, then its
/// final record.
pub struct LogSealer {
    key: [u8; 32],
    stream_id: [u8; 16],
    seq: u64,
    place: Place,
    signer: [u8; 32],
    chain: [u8; 32],
}

impl LogSealer {
    /// A new stream of the attempt at `place` for `recipients`, with its `ENC2K:` header signed
    /// by `signer` (an Ed25519 seed: the worker's key, or the control plane node's for local
    /// stages).
    pub fn new(recipients: &[[u8; 32]], signer: &[u8; 32], place: &Place) -> (LogSealer, String) {
        let sealer = LogSealer {
            key: random(),
            stream_id: random(),
            seq: 0,
            place: place.clone(),
            signer: *signer,
            chain: [0; 32],
        };
        let header = sealer.header(recipients);
        (sealer, header)
    }

    fn header(&self, recipients: &[[u8; 32]]) -> String {
        let mut body = Vec::with_capacity(17 + recipients.len() * 88);
        body.extend_from_slice(&self.stream_id);
        body.push(recipients.len().min(255) as u8);
        for pk in recipients.iter().take(255) {
            body.extend_from_slice(&fp8(pk));
            body.extend_from_slice(&seal(pk, &self.key));
        }
        let sig = SigningKey::from_bytes(&self.signer).sign(&header_message(&self.place, &body));
        format!("ENC2K:{} {}", B64.encode(&body), B64.encode(sig.to_bytes()))
    }

    /// The `ENC2:` record of the next line of `stream`.
    pub fn seal_line(&mut self, line: &[u8], stream: crate::store::LogStream, continued: bool) -> String {
        let nonce = line_nonce(&self.stream_id, self.seq);
        self.seq += 1;
        let mut boxed = vec![0u8; line.len() + CRYPTO_AEAD_XCHACHA20POLY1305_IETF_ABYTES];
        let ad = line_ad(&self.place, stream, continued);
        // Fails only on wrong buffer sizes (ruled out above) or a line over 256 GiB.
        let _ = crypto_aead_xchacha20poly1305_ietf_encrypt(&mut boxed, line, Some(&ad), &nonce, &self.key);
        let mut raw = Vec::with_capacity(24 + boxed.len());
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(&boxed);
        self.chain = chain_next(&self.chain, &raw);
        format!("ENC2:{}", B64.encode(raw))
    }

    /// The signed `ENC2F:` final record: how many lines the stream has and the running hash
    /// of their records.
    pub fn end(&self) -> String {
        let mut body = Vec::with_capacity(40);
        body.extend_from_slice(&self.seq.to_be_bytes());
        body.extend_from_slice(&self.chain);
        let sig = SigningKey::from_bytes(&self.signer).sign(&end_message(&self.place, &self.stream_id, &body));
        format!("ENC2F:{} {}", B64.encode(&body), B64.encode(sig.to_bytes()))
    }
}

fn header_message(place: &Place, body: &[u8]) -> Vec<u8> {
    [LOGKEY_V2, &place.bytes(), body].concat()
}

fn end_message(place: &Place, stream_id: &[u8; 16], body: &[u8]) -> Vec<u8> {
    [LOGEND_V2, &place.bytes(), stream_id, body].concat()
}

fn line_ad(place: &Place, stream: crate::store::LogStream, continued: bool) -> Vec<u8> {
    [LOGLINE_V2, &place.bytes(), &[stream_byte(stream), continued as u8]].concat()
}

/// The running hash of a stream: SHA-256(previous ‖ record bytes), from 32 zero bytes.
fn chain_next(previous: &[u8; 32], raw: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(previous);
    hasher.update(raw);
    hasher.finalize().into()
}

fn line_nonce(stream_id: &[u8; 16], seq: u64) -> [u8; 24] {
    let mut nonce = [0u8; 24];
    nonce[..16].copy_from_slice(stream_id);
    nonce[16..].copy_from_slice(&seq.to_be_bytes());
    nonce
}

/// Verifies an Ed25519 signature under any of `signers`, returning the one that holds.
fn signed_by(message: &[u8], sig_b64: &str, signers: &[[u8; 32]]) -> Result<[u8; 32], SealError> {
    let sig = B64.decode(sig_b64).map_err(|_| SealError::Malformed("signature"))?;
    let sig = ed25519_dalek::Signature::from_slice(&sig).map_err(|_| SealError::BadSignature)?;
    signers
        .iter()
        .find(|k| VerifyingKey::from_bytes(k).is_ok_and(|key| key.verify_strict(message, &sig).is_ok()))
        .copied()
        .ok_or(SealError::BadSignature)
}

/// Opens one log stream: made from its key header (`ENC2K:`, or `ENC1K:` of older runs), then
/// given its lines in order, then its final record.
pub struct LogOpener {
    version: u8,
    key: [u8; 32],
    stream_id: [u8; 16],
    next: u64,
    place: Place,
    /// The key that signed the header (when the reader checked it): the final record must be
    /// signed by the same key.
    signer: Option<[u8; 32]>,
    chain: [u8; 32],
    ended: bool,
}

impl LogOpener {
    /// Opens a header line of the stream of the attempt at `place` with the recipient's key
    /// pair. With `signers` not empty, the header must be signed by one of them (an `ENC2K:`
    /// header's signature covers the place; an `ENC1K:` one's does not).
    pub fn from_header(
        line: &str,
        public: &[u8; 32],
        secret: &[u8; 32],
        place: &Place,
        signers: &[[u8; 32]],
    ) -> Result<LogOpener, SealError> {
        let (version, rest) = match (line.strip_prefix("ENC2K:"), line.strip_prefix("ENC1K:")) {
            (Some(rest), _) => (2, rest),
            (None, Some(rest)) => (1, rest),
            (None, None) => return Err(SealError::Malformed("log key header")),
        };
        let signer = if signers.is_empty() { None } else { Some(header_signer(line, place, signers)?) };
        let (body_b64, _signature) = rest.split_once(' ').ok_or(SealError::Malformed("log key header"))?;
        let body = B64.decode(body_b64).map_err(|_| SealError::Malformed("log key header"))?;
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
                return Ok(LogOpener {
                    version,
                    key,
                    stream_id,
                    next: 0,
                    place: place.clone(),
                    signer,
                    chain: [0; 32],
                    ended: false,
                });
            }
        }
        Err(SealError::NotRecipient(fingerprint(public)))
    }

    /// The stream's format version: 2 (`ENC2`, bound to its place, with a final record) or 1.
    pub fn version(&self) -> u8 {
        self.version
    }

    /// Opens the next line, stored as `stream` with its `continued` mark; a line from another
    /// position (dropped, reordered or replayed), another stream or place is refused.
    pub fn open_line(
        &mut self,
        line: &str,
        stream: crate::store::LogStream,
        continued: bool,
    ) -> Result<Vec<u8>, SealError> {
        if self.ended {
            return Err(SealError::EndMismatch("a line after the final record".into()));
        }
        let prefix = if self.version == 2 { "ENC2:" } else { "ENC1:" };
        let b64 = line.strip_prefix(prefix).ok_or(SealError::Malformed("log line"))?;
        let raw = B64.decode(b64).map_err(|_| SealError::Malformed("log line"))?;
        let mac = if self.version == 2 { CRYPTO_AEAD_XCHACHA20POLY1305_IETF_ABYTES } else { CRYPTO_SECRETBOX_MACBYTES };
        if raw.len() < 24 + mac {
            return Err(SealError::Malformed("log line"));
        }
        let nonce: [u8; 24] = raw[..24].try_into().map_err(|_| SealError::Malformed("log line"))?;
        if nonce != line_nonce(&self.stream_id, self.next) {
            return Err(SealError::OutOfOrder { expected: self.next });
        }
        let mut out = vec![0u8; raw.len() - 24 - mac];
        if self.version == 2 {
            let ad = line_ad(&self.place, stream, continued);
            crypto_aead_xchacha20poly1305_ietf_decrypt(&mut out, &raw[24..], Some(&ad), &nonce, &self.key)
                .map_err(|_| SealError::Forged("log line (or its stream, continuation or place)"))?;
            self.chain = chain_next(&self.chain, &raw);
        } else {
            crypto_secretbox_open_easy(&mut out, &raw[24..], &nonce, &self.key)
                .map_err(|_| SealError::Forged("log line"))?;
        }
        self.next += 1;
        Ok(out)
    }

    /// Checks the stream's `ENC2F:` final record against the lines read (count and running
    /// hash) and, when the header's signer was checked, its signature by the same key.
    pub fn end(&mut self, line: &str) -> Result<(), SealError> {
        let rest = line.strip_prefix("ENC2F:").ok_or(SealError::Malformed("final record"))?;
        if self.version != 2 || self.ended {
            return Err(SealError::EndMismatch("an unexpected final record".into()));
        }
        let (body_b64, sig_b64) = rest.split_once(' ').ok_or(SealError::Malformed("final record"))?;
        let body = B64.decode(body_b64).map_err(|_| SealError::Malformed("final record"))?;
        if body.len() != 40 {
            return Err(SealError::Malformed("final record"));
        }
        if let Some(signer) = self.signer {
            signed_by(&end_message(&self.place, &self.stream_id, &body), sig_b64, &[signer])?;
        }
        let count = u64::from_be_bytes(body[..8].try_into().map_err(|_| SealError::Malformed("final record"))?);
        if count != self.next {
            return Err(SealError::EndMismatch(format!("it counts {count} lines, {} were read", self.next)));
        }
        if body[8..] != self.chain {
            return Err(SealError::EndMismatch("the running hash differs".into()));
        }
        self.ended = true;
        Ok(())
    }

    /// Whether the stream is whole: an `ENC2` stream must have had its final record (an
    /// `ENC1` stream of an older run has none to check).
    pub fn complete(&self) -> Result<(), SealError> {
        if self.version == 2 && !self.ended {
            return Err(SealError::Unfinished);
        }
        Ok(())
    }
}

/// The `.pondkey` sidecar of an encrypted artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sidecar {
    /// Format version: 1, or 2 for an output artifact bound to its place and name.
    pub pondkey: u32,
    /// `secretstream_xchacha20poly1305`.
    pub alg: String,
    /// Plaintext bytes per chunk.
    pub chunk_size: usize,
    /// The file key sealed to each recipient.
    pub recipients: Vec<SidecarRecipient>,
    /// Version 2: base64 Ed25519 signature by the writer (the node or worker that ran the
    /// attempt) over `pond.artifact.v2\0 ‖ place ‖ name ‖ 0x00 ‖ SHA-256(ciphertext)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
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
    /// Associated data of every chunk (an output artifact's place and name).
    ad: Option<Vec<u8>>,
}

impl ArtifactStream {
    /// A stream under `key` itself (no recipients): the stream and its 24-byte header.
    pub fn with_key(key: &[u8; 32]) -> (ArtifactStream, [u8; 24]) {
        let mut state = ss::State::new();
        let mut header = ss::Header::default();
        ss::crypto_secretstream_xchacha20poly1305_init_push(&mut state, &mut header, key);
        (ArtifactStream { state, ad: None }, header)
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
            recipients: sidecar_recipients(recipients, &key),
            signature: None,
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
        let _ = ss::crypto_secretstream_xchacha20poly1305_push(
            &mut self.state,
            &mut out[start..],
            chunk,
            self.ad.as_deref(),
            tag,
        );
    }
}

/// Encrypts data kept at rest under the server's key (the secretstream file of format (b),
/// without a sidecar): uploaded source bundles, pooled jobs' inputs, credentials.
pub fn seal_at_rest(key: &[u8; 32], data: &[u8]) -> Vec<u8> {
    let (stream, header) = ArtifactStream::with_key(key);
    stream_chunks(stream, header, data)
}

/// How much of what [`seal_at_rest`] made [`at_rest_opens`] needs: the header and the first
/// chunk with its tag.
pub const AT_REST_PREFIX_BYTES: usize =
    CRYPTO_SECRETSTREAM_XCHACHA20POLY1305_HEADERBYTES + CHUNK + CRYPTO_SECRETSTREAM_XCHACHA20POLY1305_ABYTES;

/// Whether `prefix` — the start of what [`seal_at_rest`] made, holding its header and at least
/// its first chunk (or all of it) — opens under `key`: tells which key sealed a large value
/// without reading all of it.
pub fn at_rest_opens(key: &[u8; 32], prefix: &[u8]) -> bool {
    let (header_bytes, tag_bytes) =
        (CRYPTO_SECRETSTREAM_XCHACHA20POLY1305_HEADERBYTES, CRYPTO_SECRETSTREAM_XCHACHA20POLY1305_ABYTES);
    if prefix.len() < header_bytes + tag_bytes {
        return false;
    }
    let Ok(header) = <ss::Header>::try_from(&prefix[..header_bytes]) else { return false };
    let mut state = ss::State::new();
    ss::crypto_secretstream_xchacha20poly1305_init_pull(&mut state, &header, key);
    let rest = &prefix[header_bytes..];
    let take = rest.len().min(CHUNK + tag_bytes);
    let mut out = vec![0u8; take - tag_bytes];
    let mut tag = 0u8;
    ss::crypto_secretstream_xchacha20poly1305_pull(&mut state, &mut out, &mut tag, &rest[..take], None).is_ok()
}

/// Opens what [`seal_at_rest`] sealed.
pub fn open_at_rest(key: &[u8; 32], data: &[u8]) -> Result<Vec<u8>, SealError> {
    open_stream(data, key, CHUNK, None)
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

/// Encrypts an output artifact `name` of the attempt at `place` for `recipients` (format (b),
/// `pondkey: 2`): every chunk carries place and name as associated data, and the sidecar the
/// writer's signature over them and the ciphertext's SHA-256.
pub fn seal_output_artifact(
    data: &[u8],
    recipients: &[[u8; 32]],
    place: &Place,
    name: &str,
    signer: &[u8; 32],
) -> (Vec<u8>, String) {
    let key: ss::Key = random();
    let (mut stream, header) = ArtifactStream::with_key(&key);
    stream.ad = Some(artifact_ad(place, name));
    let sealed = stream_chunks(stream, header, data);
    let digest: [u8; 32] = Sha256::digest(&sealed).into();
    let signature = SigningKey::from_bytes(signer).sign(&artifact_message(place, name, &digest));
    let sidecar = Sidecar {
        pondkey: 2,
        alg: "secretstream_xchacha20poly1305".into(),
        chunk_size: CHUNK,
        recipients: sidecar_recipients(recipients, &key),
        signature: Some(B64.encode(signature.to_bytes())),
    };
    (sealed, serde_json::to_string(&sidecar).unwrap_or_default())
}

fn sidecar_recipients(recipients: &[[u8; 32]], key: &ss::Key) -> Vec<SidecarRecipient> {
    recipients
        .iter()
        .map(|pk| SidecarRecipient { fp: fingerprint(pk), sealed_key: B64.encode(seal(pk, key)) })
        .collect()
}

fn artifact_ad(place: &Place, name: &str) -> Vec<u8> {
    [ARTIFACT_V2, &place.bytes(), name.as_bytes()].concat()
}

fn artifact_message(place: &Place, name: &str, digest: &[u8; 32]) -> Vec<u8> {
    [ARTIFACT_V2, &place.bytes(), name.as_bytes(), &[0], digest].concat()
}

/// Decrypts an artifact with its sidecar and the recipient's key pair (`pondkey: 1`: an
/// input sealed to a worker, or an output of an older run). Fails on tampering, on a missing
/// FINAL chunk, and on bytes after it.
pub fn open_artifact(data: &[u8], sidecar: &str, public: &[u8; 32], secret: &[u8; 32]) -> Result<Vec<u8>, SealError> {
    let sidecar = parse_sidecar(sidecar)?;
    if sidecar.pondkey != 1 {
        return Err(SealError::Malformed("sidecar (version)"));
    }
    let key = file_key(&sidecar, public, secret)?;
    open_stream(data, &key, sidecar.chunk_size, None)
}

/// Decrypts an output artifact `name` of the attempt at `place`. A `pondkey: 2` file opens only
/// at its own place and name, and with `signers` not empty its sidecar must be signed by one of
/// them over place, name and these exact bytes; a `pondkey: 1` file of an older run has neither
/// to check, and is refused when `minimum_version` is 2 (a run written since, where a v1 file
/// can only be a downgrade).
#[allow(clippy::too_many_arguments)]
pub fn open_output_artifact(
    data: &[u8],
    sidecar: &str,
    public: &[u8; 32],
    secret: &[u8; 32],
    place: &Place,
    name: &str,
    signers: &[[u8; 32]],
    minimum_version: u32,
) -> Result<Vec<u8>, SealError> {
    let sidecar = parse_sidecar(sidecar)?;
    if sidecar.pondkey < minimum_version {
        return Err(SealError::Malformed("sidecar (an older version than this run's)"));
    }
    let ad = match sidecar.pondkey {
        1 => None,
        2 => {
            if !signers.is_empty() {
                let sig = sidecar.signature.as_deref().ok_or(SealError::BadSignature)?;
                let digest: [u8; 32] = Sha256::digest(data).into();
                signed_by(&artifact_message(place, name, &digest), sig, signers)?;
            }
            Some(artifact_ad(place, name))
        }
        _ => return Err(SealError::Malformed("sidecar (version)")),
    };
    let key = file_key(&sidecar, public, secret)?;
    open_stream(data, &key, sidecar.chunk_size, ad.as_deref()).map_err(|e| match (e, &ad) {
        (SealError::Forged(_), Some(_)) => SealError::Forged("artifact chunk (or its name or place)"),
        (other, _) => other,
    })
}

fn parse_sidecar(text: &str) -> Result<Sidecar, SealError> {
    let sidecar: Sidecar = serde_json::from_str(text).map_err(|_| SealError::Malformed("sidecar"))?;
    if sidecar.alg != "secretstream_xchacha20poly1305" || !(1..=MAX_CHUNK).contains(&sidecar.chunk_size) {
        return Err(SealError::Malformed("sidecar"));
    }
    Ok(sidecar)
}

fn file_key(sidecar: &Sidecar, public: &[u8; 32], secret: &[u8; 32]) -> Result<ss::Key, SealError> {
    let mine = fingerprint(public);
    let entry = sidecar.recipients.iter().find(|r| r.fp == mine).ok_or(SealError::NotRecipient(mine))?;
    let sealed = B64.decode(&entry.sealed_key).map_err(|_| SealError::Malformed("sidecar"))?;
    open_sealed(public, secret, &sealed)?.try_into().map_err(|_| SealError::Malformed("file key"))
}

/// Decrypts a secretstream file (header ‖ chunks of `chunk_size` plaintext bytes) under `key`,
/// each chunk with associated data `ad`.
pub fn open_stream(data: &[u8], key: &[u8; 32], chunk_size: usize, ad: Option<&[u8]>) -> Result<Vec<u8>, SealError> {
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
        ss::crypto_secretstream_xchacha20poly1305_pull(&mut state, &mut out[start..], &mut tag, &rest[..take], ad)
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

/// Which of `signers` (Ed25519 public keys) signed a log key header of the stream at `place`
/// (`ENC2K:`; an `ENC1K:` header of an older run is not bound to a place); an error when none
/// did. A reader checks this before trusting a stream: anyone who knows the recipients' public
/// keys can write a header and lines, but only pond's nodes and the run's workers sign.
pub fn header_signer(line: &str, place: &Place, signers: &[[u8; 32]]) -> Result<[u8; 32], SealError> {
    let (v2, rest) = match (line.strip_prefix("ENC2K:"), line.strip_prefix("ENC1K:")) {
        (Some(rest), _) => (true, rest),
        (None, Some(rest)) => (false, rest),
        (None, None) => return Err(SealError::Malformed("log key header")),
    };
    let (body_b64, sig_b64) = rest.split_once(' ').ok_or(SealError::Malformed("log key header"))?;
    let body = B64.decode(body_b64).map_err(|_| SealError::Malformed("log key header"))?;
    let message = if v2 { header_message(place, &body) } else { [LOGKEY_PREFIX.as_slice(), &body].concat() };
    signed_by(&message, sig_b64, signers)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A test X25519 key pair (public, secret) from a fixed secret.
    pub(crate) fn pair(n: u8) -> ([u8; 32], [u8; 32]) {
        (crate::keys::x25519_public(&[n; 32]), [n; 32])
    }

    fn place(stage: &str) -> Place {
        Place::new("run-1", stage, 1)
    }

    fn signer_public(seed: &[u8; 32]) -> [u8; 32] {
        SigningKey::from_bytes(seed).verifying_key().to_bytes()
    }

    #[test]
    fn log_lines_round_trip_and_detect_reordering() {
        use crate::store::LogStream::{Stderr, Stdout};
        let (a_pub, a_sec) = pair(1);
        let (b_pub, b_sec) = pair(2);
        let (c_pub, c_sec) = pair(3);
        let signer = [9u8; 32];
        let at = place("build");
        let (mut sealer, header) = LogSealer::new(&[a_pub, b_pub], &signer, &at);
        let plain: [&[u8]; 4] = [b"one", b"", "three ✓".as_bytes(), &[0, 0xff, b'\n']];
        let lines: Vec<String> = plain.iter().map(|l| sealer.seal_line(l, Stdout, false)).collect();
        let end = sealer.end();
        for (public, secret) in [(a_pub, a_sec), (b_pub, b_sec)] {
            let mut opener = LogOpener::from_header(&header, &public, &secret, &at, &[signer_public(&signer)]).unwrap();
            let got: Vec<Vec<u8>> = lines.iter().map(|l| opener.open_line(l, Stdout, false).unwrap()).collect();
            assert_eq!(got, plain.map(|p| p.to_vec()), "any bytes round-trip");
            assert_eq!(opener.complete(), Err(SealError::Unfinished));
            opener.end(&end).unwrap();
            assert_eq!(opener.complete(), Ok(()));
        }
        assert!(matches!(LogOpener::from_header(&header, &c_pub, &c_sec, &at, &[]), Err(SealError::NotRecipient(_))));
        let other = signer_public(&[8u8; 32]);
        assert_eq!(LogOpener::from_header(&header, &a_pub, &a_sec, &at, &[other]).err(), Some(SealError::BadSignature));
        // Another stage's (or run's, or attempt's) header does not verify here.
        for elsewhere in [place("test"), Place::new("run-2", "build", 1), Place::new("run-1", "build", 2)] {
            assert_eq!(
                LogOpener::from_header(&header, &a_pub, &a_sec, &elsewhere, &[signer_public(&signer)]).err(),
                Some(SealError::BadSignature)
            );
        }
        let open = || LogOpener::from_header(&header, &a_pub, &a_sec, &at, &[signer_public(&signer)]).unwrap();
        let mut opener = open();
        assert_eq!(opener.open_line(&lines[1], Stdout, false).err(), Some(SealError::OutOfOrder { expected: 0 }));
        let mut tampered = B64.decode(&lines[0][5..]).unwrap();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(matches!(
            opener.open_line(&format!("ENC2:{}", B64.encode(tampered)), Stdout, false),
            Err(SealError::Forged(_))
        ));
        // Relabelled as stderr, or as the start of a longer line: refused.
        assert!(matches!(open().open_line(&lines[0], Stderr, false), Err(SealError::Forged(_))));
        assert!(matches!(open().open_line(&lines[0], Stdout, true), Err(SealError::Forged(_))));
        // A tail cut off: the final record counts more lines than were read.
        let mut opener = open();
        opener.open_line(&lines[0], Stdout, false).unwrap();
        assert!(matches!(opener.end(&end), Err(SealError::EndMismatch(_))));
        // A final record signed by another key than the header's.
        let (mut forger, _) = LogSealer::new(&[a_pub], &[8u8; 32], &at);
        forger.stream_id = sealer.stream_id;
        forger.seq = sealer.seq;
        forger.chain = sealer.chain;
        let mut opener = open();
        for l in &lines {
            opener.open_line(l, Stdout, false).unwrap();
        }
        assert_eq!(opener.end(&forger.end()), Err(SealError::BadSignature));
    }

    /// `ENC1` streams of older runs, written as they were, still open.
    #[test]
    fn enc1_streams_of_older_runs_still_open() {
        use dryoc::classic::crypto_secretbox::crypto_secretbox_easy;
        let (a_pub, a_sec) = pair(1);
        let signer = [9u8; 32];
        let (key, stream_id) = ([5u8; 32], [6u8; 16]);
        let mut body = stream_id.to_vec();
        body.push(1);
        body.extend_from_slice(&fp8(&a_pub));
        body.extend_from_slice(&seal(&a_pub, &key));
        let sig = SigningKey::from_bytes(&signer).sign(&[LOGKEY_PREFIX.as_slice(), &body].concat());
        let header = format!("ENC1K:{} {}", B64.encode(&body), B64.encode(sig.to_bytes()));
        let nonce = line_nonce(&stream_id, 0);
        let mut boxed = vec![0u8; 5 + CRYPTO_SECRETBOX_MACBYTES];
        crypto_secretbox_easy(&mut boxed, b"hello", &nonce, &key).unwrap();
        let line = format!("ENC1:{}", B64.encode([nonce.as_slice(), &boxed].concat()));
        let mut opener =
            LogOpener::from_header(&header, &a_pub, &a_sec, &place("x"), &[signer_public(&signer)]).unwrap();
        assert_eq!(opener.version(), 1);
        assert_eq!(opener.open_line(&line, crate::store::LogStream::Stdout, false).unwrap(), b"hello");
        assert_eq!(opener.complete(), Ok(()), "v1 streams have no final record to wait for");
    }

    #[test]
    fn output_artifacts_open_only_at_their_place_and_name() {
        let (a_pub, a_sec) = pair(1);
        let signer = [9u8; 32];
        let signers = [signer_public(&signer)];
        let at = place("build");
        let data = vec![3u8; CHUNK + 10];
        let (sealed, sidecar) = seal_output_artifact(&data, &[a_pub], &at, "report.txt", &signer);
        let open = |bytes: &[u8], place: &Place, name: &str, signers: &[[u8; 32]]| {
            open_output_artifact(bytes, &sidecar, &a_pub, &a_sec, place, name, signers, 2)
        };
        assert_eq!(open(&sealed, &at, "report.txt", &signers).unwrap(), data);
        // Under another name or place: the signature fails, and without signers the chunks do.
        assert_eq!(open(&sealed, &at, "other.txt", &signers).err(), Some(SealError::BadSignature));
        assert_eq!(open(&sealed, &place("test"), "report.txt", &signers).err(), Some(SealError::BadSignature));
        assert!(matches!(open(&sealed, &at, "other.txt", &[]), Err(SealError::Forged(_))));
        assert!(matches!(open(&sealed, &place("test"), "report.txt", &[]), Err(SealError::Forged(_))));
        // Signed by a key the reader does not trust.
        assert_eq!(open(&sealed, &at, "report.txt", &[signer_public(&[8; 32])]).err(), Some(SealError::BadSignature));
        // Not readable as a version 1 file (an input) either.
        assert!(open_artifact(&sealed, &sidecar, &a_pub, &a_sec).is_err());
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
