//! The sandbox seam. A backend turns a command into one that runs contained under a profile;
//! executors spawn what it returns, then read the backend's report to say why a contained
//! command ended (an OOM kill or a timeout is named as such, not left as an exit code).
//! Backends live in `pond-sandbox`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::definition::{SandboxLimits, SandboxProfile};

/// A command to run, before or after a backend wrapped it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// The complete environment (nothing is inherited).
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Host paths the command needs beyond the system directories, and how. A confined
    /// profile shows the command these paths (at the same place) and nothing else of the
    /// host's files; the host profile ignores them.
    pub paths: Vec<PathGrant>,
}

/// One host path a command is given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathGrant {
    /// Absolute host path (a directory or a file).
    pub path: PathBuf,
    /// What the command may do with it.
    pub access: PathAccess,
}

/// How a command may use a granted path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathAccess {
    /// Read only (tools, prompt files).
    ReadOnly,
    /// Read and written; what the command leaves there is kept (outputs, the agent's home).
    Writable,
    /// The run's checkout: read-only under `untrusted-code-read`, a throwaway writable copy
    /// under `untrusted-code-write` (the checkout other stages see is never changed).
    Checkout,
}

/// What a stage asks of the sandbox, beyond the command itself.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SandboxRequest {
    /// The isolation profile.
    pub profile: SandboxProfile,
    /// The stage's limits (unset ones take the backend's defaults).
    pub limits: SandboxLimits,
    /// Hosts the command may reach through the egress proxy beyond the operator's list (the
    /// repository's git remote); used by `untrusted-code-write` only.
    pub allow_hosts: Vec<String>,
    /// Ports of the host's loopback the command may reach at the same address (the model
    /// broker): the only loopback service a confined command sees.
    pub loopback_ports: Vec<u16>,
    /// A private directory of this attempt where the backend may keep its files; the
    /// executor removes it afterwards.
    pub scratch: PathBuf,
}

/// A wrapped command and where its backend will report how it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wrapped {
    /// The command to spawn.
    pub command: CommandSpec,
    /// A JSON [`SandboxReport`] the backend writes when the command ended, if it writes one.
    pub report: Option<PathBuf>,
}

/// How a contained command ended, as its backend saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxReport {
    /// The command's exit code, when it exited.
    pub exit_code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
    /// The kernel killed it for exceeding the memory limit.
    pub oom_killed: bool,
    /// It ran past the wall-clock limit and was killed.
    pub timed_out: bool,
    /// The limits in force.
    pub memory_mib: u64,
    /// The wall-clock limit in force, in seconds.
    pub timeout_secs: u64,
    /// The sandbox itself failed (could not be set up or cleaned up).
    pub error: Option<String>,
    /// The uid the backend gave the sandbox's processes (held by it alone while it ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Connections the egress proxy refused, counted by the proxy itself (the stage's stderr,
    /// which also says so, is the stage's to write and proves nothing).
    #[serde(default)]
    pub egress_refused: u64,
}

impl SandboxReport {
    /// Why the command failed, in words, or `None` for a plain success.
    pub fn failure(&self) -> Option<String> {
        if let Some(error) = &self.error {
            return Some(format!("sandbox: {error}"));
        }
        if self.timed_out {
            return Some(format!("timed out: killed after the sandbox's {} s wall-clock limit", self.timeout_secs));
        }
        if self.oom_killed {
            return Some(format!("out of memory: killed at the sandbox's {} MiB memory limit", self.memory_mib));
        }
        match (self.exit_code, self.signal) {
            (Some(0), _) => None,
            (Some(code), _) => Some(format!("exited with code {code}")),
            (None, Some(signal)) => Some(format!("killed by signal {signal}")),
            (None, None) => Some("ended without an exit status".into()),
        }
    }
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
    /// The stage asked for more than this host allows, or for something malformed.
    #[error("{field}: {reason}")]
    Request {
        /// The offending field (`sandbox.limits.memory_mib`).
        field: String,
        /// Why it was refused.
        reason: String,
    },
    /// Preparing the sandbox failed.
    #[error("preparing the sandbox: {0}")]
    Prepare(String),
}

/// Contains commands under sandbox profiles.
pub trait SandboxBackend: Send + Sync {
    /// A short name (`host`, `oci`).
    fn name(&self) -> &'static str;
    /// The profiles this backend enforces on this host.
    fn profiles(&self) -> Vec<SandboxProfile>;
    /// The command that runs `command` contained as `request` says. Fails closed: a profile
    /// the backend cannot enforce is an error, never a silent downgrade.
    fn wrap(&self, request: &SandboxRequest, command: CommandSpec) -> Result<Wrapped, SandboxError>;
}
