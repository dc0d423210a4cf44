//! pond-exec: what runs stages on a node.
//!
//! - executors: [`NoopExecutor`], [`BuiltinExecutor`] (file inventory, TODO scan, repo map),
//!   [`ShellExecutor`] (argv, env allowlist, live logs, artifacts, process-group kill);
//! - [`LocalWorkspaces`]: run checkouts from `git_https`, `local` and `bundle` sources;
//! - [`Driver`]: the claim → execute → renew → complete loop around a `pond_core::Engine`;
//! - [`StopHandle`]: cancel / timeout / lost-lease signalling;
//! - [`Worker`]: a pool worker's claim → unpack → run → sign → report loop.
#![deny(missing_docs)]

mod builtin;
#[cfg(target_os = "linux")]
pub mod cover;
mod delivery;
mod driver;
mod keys;
mod noop;
mod shell;
#[cfg(target_os = "linux")]
mod stage_cgroup;
mod stop;
mod swarm;
mod worker;
mod workspace;

pub use builtin::{file_inventory, language_of, repo_map, todo_scan, Area, BuiltinExecutor, FileEntry, Todo};
pub use driver::{Driver, DriverConfig};
pub use keys::{default_key_dir, load_or_create_identity, load_or_create_key};
pub use noop::NoopExecutor;
pub use shell::{reap_orphans, ShellConfig, ShellExecutor};
pub use stop::{StopHandle, TokioPause};
pub use swarm::SwarmExecutor;
pub use worker::{Worker, WorkerConfig, WorkerSummary};
pub use workspace::{
    pack_dir, pack_source, tree_digest, unpack_bundle, FetchConfig, LocalWorkspaces, PackError, Packed,
};
