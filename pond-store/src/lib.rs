//! pond-store: implementations of [`pond_core::store::Store`].
//!
//! - [`MemoryStore`]: everything in memory; the reference the others are compared against.
//! - [`SqliteStore`]: one SQLite file (WAL), the embedded default; migrations in
//!   `migrations/sqlite`, embedded at build time.
//!
//! - [`WatchedStore`]: wraps any store and announces its writes to waiters.
//!
//! All of them pass the conformance suite in `tests/conformance.rs`.
#![deny(missing_docs)]

mod memory;
mod rows;
mod sqlite;
mod watched;

pub use memory::MemoryStore;
pub use sqlite::SqliteStore;
pub use watched::WatchedStore;

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}
