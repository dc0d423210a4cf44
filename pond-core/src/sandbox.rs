//! The sandbox seam. A backend turns a command into one that runs contained under a profile;
//! executors spawn what it returns. Backends live in `pond-sandbox`.

use std::path::PathBuf;

use crate::definition::SandboxProfile;

/// A command to run, before or after a backend wrapped it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// The complete environment (nothing is inherited).
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
}

/// Why a backend refused a command.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// The backend cannot enforce this profile on this host.
    #[error("sandbox profile `{0}` cannot be enforced by this backend")]
    Unsupported(&'static str),
    /// The backend's self-check failed; it refuses to run anything.
    #[error("sandbox self-check failed: {0}")]
    SelfCheck(String),
}

/// Contains commands under sandbox profiles.
pub trait SandboxBackend: Send + Sync {
    /// A short name (`host`, `oci`).
    fn name(&self) -> &'static str;
    /// The profiles this backend enforces on this host.
    fn profiles(&self) -> Vec<SandboxProfile>;
    /// The command that runs `command` contained under `profile`. Fails closed: a profile the
    /// backend cannot enforce is an error, never a silent downgrade.
    fn wrap(&self, profile: SandboxProfile, command: CommandSpec) -> Result<CommandSpec, SandboxError>;
}
