//! Server-key rotation. What pond keeps at rest (provider credentials, webhook signing secrets,
//! uploaded source bundles, pooled jobs' inputs) is sealed under the server key. To rotate it,
//! a node starts with the new key as its current one and the old one as *previous*: it opens
//! with either and seals with the new, and a sweep ([`Engine::reseal_at_rest`]) re-seals
//! everything still under a previous key — records through compare-and-swap, blobs in place —
//! until nothing is; then the previous key can be forgotten.
//!
//! The control plane's signing identity (what endorses nodes' and workers' keys, signs
//! transparency heads and job tickets) is derived from an *identity root*, not from whichever
//! key is current: consumers and workers pin it, and a routine rotation must not look to them
//! like a swapped control plane. The root is kept in the store sealed under the server key
//! (re-sealed with everything else); a database that has none yet takes the key that sealed
//! its data so far, which is what the identity was derived from before. A node whose keys do
//! not open the stored root is refused at start: it was given another deployment's key.
//!
//! Several nodes on one database roll a rotation in two steps: first every node is given the new
//! key as a *next* key (opened, never moved to or from), then each moves to it with the old one
//! as previous. A node not yet moved reads what moved nodes sealed and never moves it back; which
//! way data moves is the operator's setting alone, never something the database says.

use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::error::{CoreError, StoreError};
use crate::ids::BlobId;
use crate::seal::{open_at_rest, seal_at_rest, SealError};
use crate::store::{BlobMeta, Store};

/// Record kind of the sealed identity root (one record, key [`IDENTITY_KEY`]).
pub const IDENTITY: &str = "server-identity";
/// The key of the identity root's record.
pub const IDENTITY_KEY: &str = "root";
/// Record kinds whose bodies hold values sealed at rest (see [`sealed_fields`]).
const SEALED_RECORDS: [&str; 2] = ["credential", crate::webhooks::SUBSCRIPTION_RECORD];
/// Blobs looked at per page of the sweep.
const BLOB_PAGE: u32 = 200;

/// The server's keys: the one that seals; during a rotation, the *previous* ones, whose values
/// are opened and moved to the current key, and the *next* ones, opened only (a node not yet
/// moved to a new key reads what the moved nodes sealed, and never moves it back). Which way
/// data moves is the operator's setting alone: nothing in the database decides it.
#[derive(Clone)]
pub struct AtRestKeys {
    current: [u8; 32],
    previous: Vec<[u8; 32]>,
    next: Vec<[u8; 32]>,
}

/// Which of the keys a value is sealed under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealedUnder {
    /// The current key.
    Current,
    /// A previous key: the sweep moves it to the current one.
    Previous,
    /// A next key: left where it is.
    Next,
}

impl std::fmt::Debug for AtRestKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtRestKeys")
            .field("current", &crate::credentials::server_key_fingerprint(&self.current))
            .field("previous", &self.previous.len())
            .field("next", &self.next.len())
            .finish()
    }
}

impl AtRestKeys {
    /// `current` seals; `previous` (repeats and the current key dropped) only open.
    pub fn new(current: [u8; 32], previous: &[[u8; 32]]) -> Self {
        let mut kept: Vec<[u8; 32]> = Vec::new();
        for key in previous {
            if *key != current && !kept.contains(key) {
                kept.push(*key);
            }
        }
        AtRestKeys { current, previous: kept, next: Vec::new() }
    }

    /// With `next` keys accepted for opening only (repeats of the others dropped).
    pub fn with_next(mut self, next: &[[u8; 32]]) -> Self {
        for key in next {
            if *key != self.current && !self.previous.contains(key) && !self.next.contains(key) {
                self.next.push(*key);
            }
        }
        self
    }

    /// Keys accepted for opening only.
    pub fn next(&self) -> &[[u8; 32]] {
        &self.next
    }

    /// The key that seals.
    pub fn current(&self) -> &[u8; 32] {
        &self.current
    }

    /// Keys still accepted for opening, whose values the sweep moves to the current key.
    pub fn previous(&self) -> &[[u8; 32]] {
        &self.previous
    }

    /// Seals under the current key.
    pub fn seal(&self, data: &[u8]) -> Vec<u8> {
        seal_at_rest(&self.current, data)
    }

    /// Opens what any of the keys sealed.
    pub fn open(&self, data: &[u8]) -> Result<Vec<u8>, SealError> {
        self.open_which(data).map(|(_, opened)| opened)
    }

    /// Opens, saying which of the keys sealed it.
    pub fn open_which(&self, data: &[u8]) -> Result<(SealedUnder, Vec<u8>), SealError> {
        let first = match open_at_rest(&self.current, data) {
            Ok(opened) => return Ok((SealedUnder::Current, opened)),
            Err(e) => e,
        };
        let others = self.previous.iter().map(|k| (k, SealedUnder::Previous));
        for (key, under) in others.chain(self.next.iter().map(|k| (k, SealedUnder::Next))) {
            if let Ok(opened) = open_at_rest(key, data) {
                return Ok((under, opened));
            }
        }
        Err(first)
    }
}

/// What one pass of the sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResealReport {
    /// Records re-sealed under the current key.
    pub records: u64,
    /// Blobs re-sealed under the current key.
    pub blobs: u64,
    /// Blobs looked at.
    pub blobs_checked: u64,
    /// Values still under a previous key after the pass (changed underneath it, or failed):
    /// another pass is needed.
    pub remaining: u64,
}

/// The identity root the store holds, opened with `keys`; `None` when it holds none yet. Reads
/// only (`pond server --check`); [`identity_root`] stores one when there is none.
pub async fn stored_identity(store: &dyn Store, keys: &AtRestKeys) -> Result<Option<[u8; 32]>, CoreError> {
    match store.get_record(IDENTITY, IDENTITY_KEY).await? {
        Some(text) => open_identity(keys, &text).map(Some),
        None => Ok(None),
    }
}

/// Opens the identity root's record body with `keys`, or says the keys are not this
/// deployment's.
pub fn open_identity(keys: &AtRestKeys, text: &str) -> Result<[u8; 32], CoreError> {
    let wrong_key = || {
        CoreError::Store(StoreError::Backend(format!(
            "the server key (fingerprint {}) does not open this database's sealed identity: this node was given \
             another key than the nodes that wrote it (give it theirs; while rotating, the old one as a previous key)",
            crate::credentials::server_key_fingerprint(keys.current())
        )))
    };
    let sealed = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, text.trim())
        .map_err(|_| StoreError::Corrupt("the sealed identity is not base64".into()))?;
    let root = keys.open(&sealed).map_err(|_| wrong_key())?;
    root.try_into().map_err(|_| CoreError::Store(StoreError::Corrupt("the identity root is not 32 bytes".into())))
}

/// Which of `keys`' derived root opens the stored identity, storing one when the database has
/// none: the identity root for [`crate::engine::EngineConfig::identity_key`]. `accept` sees a
/// root about to be stored first, and may refuse it (a node that pinned another identity).
pub async fn identity_root(
    store: &dyn Store,
    keys: &AtRestKeys,
    accept: impl FnOnce(&[u8; 32]) -> Result<(), CoreError>,
) -> Result<[u8; 32], CoreError> {
    if let Some(root) = stored_identity(store, keys).await? {
        return Ok(root);
    }
    let root = first_root(store, keys).await?;
    accept(&root)?;
    let sealed = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, keys.seal(&root));
    if store.swap_record(IDENTITY, IDENTITY_KEY, None, &sealed).await? {
        return Ok(root);
    }
    // Another node stored it first.
    let text =
        store.get_record(IDENTITY, IDENTITY_KEY).await?.ok_or_else(|| StoreError::NotFound("identity".into()))?;
    open_identity(keys, &text)
}

/// The identity root of a database that stores none yet. A new deployment (no node ever
/// endorsed its log-signing key here) gets a random one: the server key then only guards it, so
/// a rotation after a leak of the key alone leaves nothing derivable from the old key. A
/// deployment older than the stored root derived its identity from its server key: the one of
/// `keys` whose control-plane key endorsed the nodes' signing keys is taken — and if none did,
/// the node was given another deployment's key and is refused before it stores anything.
pub async fn first_root(store: &dyn Store, keys: &AtRestKeys) -> Result<[u8; 32], CoreError> {
    let signers: Vec<crate::engine::LogSigner> = store
        .list_records(crate::engine::LOG_SIGNER)
        .await?
        .iter()
        .filter_map(|(_, body)| serde_json::from_str::<crate::engine::LogSigner>(body).ok())
        .collect();
    let endorsed: Vec<&crate::engine::LogSigner> = signers.iter().filter(|s| !s.endorsement.is_empty()).collect();
    if signers.is_empty() {
        return Ok(crate::seal::random_key());
    }
    // A node stores the identity before it endorses its signing key under it: signers read
    // here may be those of a node that started beside this one, whose identity is read now.
    if let Some(root) = stored_identity(store, keys).await? {
        return Ok(root);
    }
    let candidates = std::iter::once(*keys.current()).chain(keys.previous().iter().copied());
    if endorsed.is_empty() {
        // Signers from before endorsements: nothing to check a key against; the key that sealed
        // the data — the first previous one while a rotation is under way, else the current.
        return Ok(keys.previous().first().copied().unwrap_or(*keys.current()));
    }
    for candidate in candidates {
        let control = crate::keys::ed25519_public(&crate::keys::control_plane_seed(&candidate));
        let vouches = endorsed.iter().any(|s| {
            crate::transparency::decode32(&s.signing_key)
                .is_some_and(|key| crate::keys::endorsed(&control, "node", &s.node_id, &key, &s.endorsement))
        });
        if vouches {
            return Ok(candidate);
        }
    }
    Err(CoreError::Store(StoreError::Backend(format!(
        "the server key (fingerprint {}) is not the one this database's nodes were endorsed under: this node was \
         given another key than the nodes that wrote it (give it theirs; while rotating, the old one as a previous key)",
        crate::credentials::server_key_fingerprint(keys.current())
    ))))
}

/// The base64 values sealed at rest in a record body: `sealed` (credentials) and
/// `secrets[].sealed` (webhook subscriptions).
fn sealed_fields(body: &mut serde_json::Value) -> Vec<&mut serde_json::Value> {
    let mut fields = Vec::new();
    let Some(object) = body.as_object_mut() else { return fields };
    for (name, value) in object.iter_mut() {
        match (name.as_str(), value) {
            ("sealed", v @ serde_json::Value::String(_)) => fields.push(v),
            ("secrets", serde_json::Value::Array(items)) => {
                for item in items {
                    if let Some(v) = item.get_mut("sealed").filter(|v| v.is_string()) {
                        fields.push(v);
                    }
                }
            }
            _ => {}
        }
    }
    fields
}

/// Re-seals one base64 value under the current key; `Some(true)` when it changed it,
/// `Some(false)` when it already was, `None` when no key opens it.
fn reseal_text(keys: &AtRestKeys, value: &mut serde_json::Value) -> Option<bool> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let sealed = b64.decode(value.as_str()?).ok()?;
    match keys.open_which(&sealed) {
        Ok((SealedUnder::Current | SealedUnder::Next, _)) => Some(false),
        Ok((SealedUnder::Previous, opened)) => {
            *value = serde_json::Value::String(b64.encode(keys.seal(&opened)));
            Some(true)
        }
        Err(_) => None,
    }
}

/// Whether a blob is sealed under a previous key (one the sweep moves): looks only at its first
/// chunk.
fn under_previous_key(keys: &AtRestKeys, first_chunk: &[u8]) -> bool {
    !crate::seal::at_rest_opens(keys.current(), first_chunk)
        && keys.previous().iter().any(|k| crate::seal::at_rest_opens(k, first_chunk))
}

impl Engine {
    /// The keys sealing and opening what pond keeps at rest.
    pub fn at_rest_keys(&self) -> AtRestKeys {
        AtRestKeys::new(self.config().at_rest_key, &self.config().previous_keys).with_next(&self.config().next_keys)
    }

    /// One pass of the re-seal sweep: every record value and blob sealed under a previous key
    /// is sealed again under the current one. Safe beside other nodes doing the same and
    /// beside readers (see [`open_sealed_blob`]).
    pub async fn reseal_at_rest(&self) -> Result<ResealReport, CoreError> {
        let keys = self.at_rest_keys();
        let mut report = ResealReport::default();
        if keys.previous().is_empty() {
            return Ok(report);
        }
        let store = self.store();
        // The identity root, then the records holding sealed values.
        if let Some(text) = store.get_record(IDENTITY, IDENTITY_KEY).await? {
            let mut value = serde_json::Value::String(text.clone());
            match reseal_text(&keys, &mut value) {
                Some(true) => {
                    let body = value.as_str().unwrap_or_default();
                    if store.swap_record(IDENTITY, IDENTITY_KEY, Some(&text), body).await? {
                        report.records += 1;
                    } else {
                        report.remaining += 1;
                    }
                }
                Some(false) => {}
                None => report.remaining += 1,
            }
        }
        let fingerprint = crate::credentials::server_key_fingerprint(keys.current());
        for kind in SEALED_RECORDS {
            for (key, text) in store.list_records(kind).await? {
                let Ok(mut body) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
                let mut changed = false;
                for field in sealed_fields(&mut body) {
                    match reseal_text(&keys, field) {
                        Some(true) => changed = true,
                        Some(false) => {}
                        // Neither opens it: nothing to re-seal (a corrupt value stays as it is).
                        None => {}
                    }
                }
                if !changed {
                    continue;
                }
                if let Some(view) = body.get_mut("view").and_then(|v| v.as_object_mut()) {
                    view.insert("key_fingerprint".into(), serde_json::Value::String(fingerprint.clone()));
                }
                let new = serde_json::to_string(&body).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                // Changed meanwhile (replaced, rotated by its owner): the next pass sees it.
                if store.swap_record(kind, &key, Some(&text), &new).await? {
                    report.records += 1;
                } else {
                    report.remaining += 1;
                }
            }
        }
        // Blobs: uploaded bundles and pooled inputs are sealed at rest; artifacts are not (they
        // are plain or sealed to the run's recipients) and are left alone after a look at their
        // first sealed chunk's worth of bytes (the header and one 64 KiB chunk), not more.
        let mut after = None;
        loop {
            let page = store.list_blobs(after, BLOB_PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            for meta in &page {
                report.blobs_checked += 1;
                let first = match store.read_blob_prefix(meta.id, crate::seal::AT_REST_PREFIX_BYTES).await {
                    Ok(chunk) => chunk,
                    Err(StoreError::NotFound(_)) => continue,
                    Err(e) => return Err(e.into()),
                };
                if !under_previous_key(&keys, &first) {
                    continue;
                }
                match self.reseal_blob(&keys, meta).await? {
                    true => report.blobs += 1,
                    false => report.remaining += 1,
                }
            }
            if page.len() < BLOB_PAGE as usize {
                break;
            }
        }
        Ok(report)
    }

    /// Re-seals one blob in place; `false` when it changed underneath (or went).
    async fn reseal_blob(&self, keys: &AtRestKeys, meta: &BlobMeta) -> Result<bool, CoreError> {
        let data = match crate::store::read_blob(self.store().as_ref(), meta).await {
            Ok(data) => data,
            Err(StoreError::NotFound(_)) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let Ok((SealedUnder::Previous, opened)) = keys.open_which(&data) else { return Ok(false) };
        Ok(self.store().replace_blob(meta.id, &meta.sha256, &keys.seal(&opened)).await?)
    }
}

/// Why a sealed blob could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealedBlobError {
    /// No such blob.
    #[error("not found")]
    Missing,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No key opens it.
    #[error("does not open with the server key: {0}")]
    Open(SealError),
}

/// Reads a blob sealed at rest and opens it with `keys`. A re-seal may replace the blob between
/// two of its chunks being read; what then fails to open is read once more, whole and new.
pub async fn open_sealed_blob(
    store: &dyn Store,
    id: BlobId,
    keys: &AtRestKeys,
) -> Result<(BlobMeta, Vec<u8>), SealedBlobError> {
    let mut last = None;
    for _ in 0..2 {
        let meta = store.blob_meta(id).await?.ok_or(SealedBlobError::Missing)?;
        let data = match crate::store::read_blob(store, &meta).await {
            Ok(data) => data,
            Err(StoreError::NotFound(_)) => return Err(SealedBlobError::Missing),
            Err(e) => return Err(e.into()),
        };
        match keys.open(&data) {
            Ok(opened) => return Ok((meta, opened)),
            Err(e) => last = Some(e),
        }
    }
    Err(SealedBlobError::Open(last.unwrap_or(SealError::Malformed("blob"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_open_under_any_and_seal_under_the_current() {
        let (old, new) = ([1u8; 32], [2u8; 32]);
        let before = seal_at_rest(&old, b"provider key");
        let keys = AtRestKeys::new(new, &[old, new, old]);
        assert_eq!(keys.previous().len(), 1, "the current key and repeats are dropped");
        assert_eq!(keys.open_which(&before).unwrap(), (SealedUnder::Previous, b"provider key".to_vec()));
        let after = keys.seal(b"provider key");
        assert!(open_at_rest(&old, &after).is_err(), "sealed under the new key only");
        assert_eq!(keys.open_which(&after).unwrap(), (SealedUnder::Current, b"provider key".to_vec()));
        assert!(AtRestKeys::new([3u8; 32], &[]).open(&before).is_err());
    }

    #[test]
    fn a_values_first_chunk_tells_its_key() {
        let (old, new) = ([1u8; 32], [2u8; 32]);
        let keys = AtRestKeys::new(new, &[old]);
        let big = vec![7u8; 3 * crate::seal::CHUNK + 5];
        let sealed = seal_at_rest(&old, &big);
        assert!(under_previous_key(&keys, &sealed[..crate::store::BLOB_CHUNK_BYTES.min(sealed.len())]));
        assert!(!under_previous_key(&keys, &seal_at_rest(&new, b"x")));
        assert!(!under_previous_key(&keys, b"plain artifact bytes, not sealed at all"));
        // A next key's values are opened, never moved.
        let ahead = AtRestKeys::new(new, &[]).with_next(&[[9u8; 32]]);
        let sealed_ahead = seal_at_rest(&[9u8; 32], b"x");
        assert!(!under_previous_key(&ahead, &sealed_ahead));
        assert_eq!(ahead.open_which(&sealed_ahead).unwrap(), (SealedUnder::Next, b"x".to_vec()));
    }

    #[test]
    fn record_fields_are_resealed_in_place() {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let (old, new) = ([1u8; 32], [2u8; 32]);
        let keys = AtRestKeys::new(new, &[old]);
        let mut body = serde_json::json!({
            "view": {"name": "k"},
            "sealed": b64.encode(seal_at_rest(&old, b"a")),
            "secrets": [{"sealed": b64.encode(seal_at_rest(&new, b"b"))}, {"sealed": b64.encode(seal_at_rest(&old, b"c"))}],
        });
        let results: Vec<Option<bool>> = sealed_fields(&mut body).into_iter().map(|f| reseal_text(&keys, f)).collect();
        assert_eq!(results, vec![Some(true), Some(false), Some(true)]);
        for field in sealed_fields(&mut body) {
            let sealed = b64.decode(field.as_str().unwrap()).unwrap();
            assert!(open_at_rest(&new, &sealed).is_ok());
        }
    }
}
