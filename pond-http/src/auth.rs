//! Bearer-token authentication. Tokens are random 32-byte secrets; only their SHA-256 is
//! stored, so a database dump does not yield usable tokens.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use pond_core::ids::TokenId;
use pond_core::store::{Role, Store, TokenRecord};
use pond_core::time::Timestamp;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::state::AppState;

/// Who is calling.
#[derive(Clone, Debug)]
pub struct Principal {
    /// The token's id.
    pub token_id: TokenId,
    /// What it may do.
    pub role: Role,
    /// The projects a consumer token may use.
    pub projects: Vec<String>,
    /// SHA-256 of the secret presented, to check later that the token still stands (a long
    /// log follow re-checks it).
    pub(crate) secret_sha256: String,
}

impl Principal {
    /// Whether the caller may see and act on runs of `project`.
    pub fn can_use(&self, project: &str) -> bool {
        self.role == Role::Admin || self.projects.iter().any(|p| p == project)
    }

    /// The projects visible to the caller; `None` for all.
    pub fn visible_projects(&self) -> Option<Vec<String>> {
        match self.role {
            Role::Admin => None,
            Role::Consumer => Some(self.projects.clone()),
        }
    }

    /// Refuses callers that are not admins.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self.role {
            Role::Admin => Ok(()),
            Role::Consumer => Err(ApiError::Forbidden("this needs an admin token".into())),
        }
    }
}

/// Tokens verified in the last few seconds, so a busy client costs one database read per
/// `ttl` instead of one per request. A revocation takes effect at once on the node that made it
/// and within `ttl` on the others.
pub struct TokenCache {
    ttl: std::time::Duration,
    entries: std::sync::Mutex<std::collections::HashMap<String, (TokenRecord, std::time::Instant)>>,
}

impl TokenCache {
    /// A cache keeping entries for `ttl`.
    pub fn new(ttl: std::time::Duration) -> Self {
        TokenCache { ttl, entries: Default::default() }
    }

    fn get(&self, hash: &str) -> Option<TokenRecord> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.get(hash).filter(|(_, at)| at.elapsed() < self.ttl).map(|(t, _)| t.clone())
    }

    fn put(&self, hash: String, token: TokenRecord) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() > 10_000 {
            entries.retain(|_, (_, at)| at.elapsed() < self.ttl);
        }
        entries.insert(hash, (token, std::time::Instant::now()));
    }

    /// The entry for `hash` if it was read from the store less than `max_age` ago.
    fn fresh(&self, hash: &str, max_age: std::time::Duration) -> Option<TokenRecord> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.get(hash).filter(|(_, at)| at.elapsed() < max_age.min(self.ttl)).map(|(t, _)| t.clone())
    }

    /// Forgets every entry (after a revocation).
    pub fn clear(&self) {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// SHA-256 of a token secret, hex.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new token: the secret (shown once) and the record to store.
pub fn mint_token(role: Role, name: &str, projects: Vec<String>, now: Timestamp) -> (String, TokenRecord) {
    let mut raw = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let prefix = match role {
        Role::Admin => "pond_admin_",
        Role::Consumer => "pond_key_",
    };
    let secret = format!("{prefix}{}", hex::encode(raw));
    let record = TokenRecord {
        id: TokenId::generate(now),
        name: name.to_string(),
        role,
        projects,
        secret_sha256: hash_secret(&secret),
        created_at: now,
        revoked_at: None,
    };
    (secret, record)
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::Unauthorized("missing bearer token (Authorization: Bearer <token>)".into()))?;
        let secret = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ApiError::Unauthorized("the Authorization header must be `Bearer <token>`".into()))?;
        let hash = hash_secret(secret);
        let record = match state.tokens.get(&hash) {
            Some(record) => record,
            None => {
                let record = state
                    .store
                    .find_token(&hash)
                    .await?
                    .filter(|t| t.revoked_at.is_none())
                    .ok_or_else(|| ApiError::Unauthorized("unknown or revoked token".into()))?;
                state.tokens.put(hash.clone(), record.clone());
                record
            }
        };
        Ok(Principal { token_id: record.id, role: record.role, projects: record.projects, secret_sha256: hash })
    }
}

/// How stale a "still valid" answer for a long-lived request may be: a revocation made on
/// another node ends such requests within this (plus their re-check period), whatever the
/// token cache's own lifetime. Streams of one token share one store read per period.
const REVALIDATE_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether the token whose secret hashes to `hash` still stands (exists, not revoked).
pub(crate) async fn still_valid(state: &AppState, hash: &str) -> Result<bool, pond_core::StoreError> {
    if state.tokens.fresh(hash, REVALIDATE_AFTER).is_some() {
        return Ok(true);
    }
    match state.store.find_token(hash).await?.filter(|t| t.revoked_at.is_none()) {
        Some(record) => {
            state.tokens.put(hash.to_string(), record);
            Ok(true)
        }
        None => Ok(false),
    }
}
