//! pond-core: the domain of Pond and the engine that drives runs, free of IO.
//!
//! - [`definition`]: workflows (stages, executors, sandbox profiles, tiers) and their validation.
//! - [`source`]: where a run's code comes from.
//! - [`run`]: runs, stages, attempts and the state machine, as pure functions of `now`.
//! - [`store`]: the [`store::Store`] trait everything persistent goes through.
//! - [`exec`]: the [`exec::Executor`], output, stop-signal and workspace seams.
//! - [`sandbox`]: the [`sandbox::SandboxBackend`] seam.
//! - [`json`]: JSON decoding whose errors name the field path.
//! - [`net`]: the network destinations pond refuses to dial for a tenant (IANA special-purpose ranges).
//! - [`routing`]: placement on worker pools — tags, capability globs, trust tiers.
//! - [`attest`]: signed results (wire format (d)) and key fingerprints.
//! - [`keys`]: a worker's sealing and signing keys; low-order X25519 keys refused.
//! - [`pool`]: enrollment codes, orchestrators and workers, job ids.
//! - [`agents`]: the model and harness registry, presets, template lint, dry runs.
//! - [`credentials`]: credentials sealed at rest and to one worker per job (format (c)).
//! - [`seal`]: sealed boxes, encrypted log lines and artifacts (libsodium wire formats).
//! - [`engine`]: the [`engine::Engine`] that ties them together.
//! - `openapi` (feature `openapi`): OpenAPI schemas of the types whose JSON is hand-written.
//!
//! Nothing here opens a socket, a file or a process, or reads the clock: time arrives through
//! the [`time::Clock`] the caller injects.
#![deny(missing_docs)]

pub mod agents;
pub mod attest;
pub mod bundles;
pub mod credentials;
pub mod definition;
pub mod engine;
pub mod error;
pub mod events;
pub mod exec;
pub mod ids;
pub mod json;
pub mod keys;
pub mod merkle;
pub mod net;
#[cfg(feature = "openapi")]
mod openapi;
pub mod pool;
pub mod routing;
pub mod run;
pub mod sandbox;
pub mod seal;
pub mod server_keys;
pub mod signed_request;
pub mod source;
pub mod store;
pub mod time;
pub mod transparency;
pub mod usage;
pub mod webhooks;

pub use error::{CoreError, FieldError, StoreError};
