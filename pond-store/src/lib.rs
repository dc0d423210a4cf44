//! pond-store: implementations of [`pond_core::store::Store`].
//!
//! - [`MemoryStore`]: everything in memory; the reference the others are compared against.
//! - [`SqliteStore`]: one SQLite file (WAL), the embedded default; migrations in
//!   `migrations/sqlite`, embedded at build time.
//!
//! - [`PgStore`]: PostgreSQL, the production store shared by many nodes; migrations in
//!   `migrations/postgres`.
//! - [`ScratchDatabase`]: a throwaway PostgreSQL database for tests and benchmarks.
//! - [`WatchedStore`]: wraps any store and announces its writes to waiters.
//!
//! All of them pass the conformance suite in `tests/conformance.rs`.
#![deny(missing_docs)]

mod batch;
mod memory;
mod pg;
mod pg_arrays;
mod rows;
mod schema;
mod scratch;
mod seed;
mod sqlite;
mod watched;

pub use memory::MemoryStore;
pub use pg::{PgStore, CHANGE_CHANNEL};
pub use schema::{pg_record, pg_schema, sqlite_record, sqlite_schema, SchemaStatus};
pub use scratch::{missing_prerequisite, Activity, ScratchDatabase};
pub use seed::{Backlog, BACKLOG_PROJECT};
pub use sqlite::SqliteStore;
pub use watched::WatchedStore;

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// The refusal of an artifact whose attempt may no longer write (see
/// [`pond_core::store::Store::put_artifact`]).
pub(crate) fn attempt_not_writing(a: &pond_core::store::Artifact) -> pond_core::StoreError {
    pond_core::StoreError::Conflict(format!(
        "artifact `{}` was refused: stage `{}` attempt {} no longer takes output (its result was reported, or it lost its lease)",
        a.name, a.stage, a.attempt
    ))
}

/// A stored leaf hash, which must be 32 bytes.
pub(crate) fn leaf_hash_of(bytes: &[u8]) -> Result<[u8; 32], pond_core::StoreError> {
    bytes
        .try_into()
        .map_err(|_| pond_core::StoreError::Corrupt(format!("a transparency log leaf hash of {} bytes", bytes.len())))
}

/// The refusal of an artifact that would take its run past the per-run cap.
pub(crate) fn over_cap(a: &pond_core::store::Artifact, others: u64, cap: u64) -> pond_core::StoreError {
    pond_core::StoreError::Conflict(format!(
        "`{}` ({} bytes) would bring the run's artifacts to {} bytes, above this server's per-run cap of {cap} bytes",
        a.name,
        a.size,
        others.saturating_add(a.size)
    ))
}

/// The refusal of an artifact whose name another stage of the run already used.
pub(crate) fn name_taken(a: &pond_core::store::Artifact, owner: &str) -> pond_core::StoreError {
    pond_core::StoreError::Conflict(format!(
        "artifact `{}` was refused: stage `{owner}` of this run already stored an artifact of that name (names are unique within a run)",
        a.name
    ))
}

/// The time a store stamps on what it writes itself (events).
pub(crate) fn wall_clock() -> pond_core::time::Timestamp {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    pond_core::time::Timestamp::from_millis(since_epoch.as_millis() as i64)
}
