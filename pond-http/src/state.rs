//! Application state shared by the handlers.

use std::sync::Arc;

use pond_core::engine::Engine;
use pond_core::store::Store;
use pond_exec::Driver;
use pond_store::WatchedStore;

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    /// The engine (submit, cancel, reads).
    pub engine: Arc<Engine>,
    /// The store, with change announcements.
    pub store: Arc<WatchedStore>,
    /// This node's driver, poked when a cancel arrives so local stages stop at once.
    pub driver: Option<Arc<Driver>>,
    /// Limits.
    pub limits: Limits,
    /// Recently verified tokens.
    pub tokens: Arc<crate::auth::TokenCache>,
    /// Orchestrators, workers and enrollment codes.
    pub pools: Arc<pond_core::pool::Pools>,
    /// Throttles pool members' last-seen writes.
    pub seen: Arc<crate::orch::SeenThrottle>,
    /// Each orchestrator's newest claim poll.
    pub polls: Arc<crate::orch::Polls>,
    /// Workers recently resolved by claims.
    pub members: Arc<crate::orch::MemberCache>,
    /// Webhook secrets' key and receiver policy.
    pub webhooks: Arc<crate::webhooks::WebhookConfig>,
}

impl AppState {
    /// The store as a trait object.
    pub fn store_dyn(&self) -> Arc<dyn Store> {
        self.store.clone()
    }
}

/// Request limits.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest run submission (`POST /v1/runs`); other JSON routes take at most
    /// [`crate::boundary::SMALL_BODY_BYTES`].
    pub max_json_bytes: usize,
    /// Largest uploaded bundle, and (with room for sealing) a pooled job's artifact.
    pub max_bundle_bytes: usize,
    /// Largest page of runs or log lines.
    pub max_page: u32,
    /// Whether a run that names recipients but says nothing of `encrypt` is encrypted.
    pub encryption_default: bool,
    /// Web origins (`https://app.example.com`) whose pages may call the API from a browser
    /// (CORS); none by default.
    pub cors_origins: Vec<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_json_bytes: 4 * 1024 * 1024,
            max_bundle_bytes: 100 * 1024 * 1024,
            max_page: 1000,
            encryption_default: true,
            cors_origins: Vec::new(),
        }
    }
}
