//! pond-sandbox: implementations of `pond_core::sandbox::SandboxBackend`.
//!
//! - [`HostBackend`]: the `none` profile (a plain host process); it refuses every confined
//!   profile, so a stage that asks for confinement fails closed where nothing else is set up.
//! - `oci` (Linux): `untrusted-code-read` and `untrusted-code-write` on youki's libcontainer,
//!   with the seccomp policy of `seccomp` compiled in pure Rust.
//! - [`egress`]: the allowlist proxy confined sandboxes reach the network through.
#![deny(missing_docs)]

#[cfg(target_os = "linux")]
pub mod bench;
pub mod egress;
#[cfg(target_os = "linux")]
pub mod oci;
#[cfg(target_os = "linux")]
pub mod seccomp;

use pond_core::definition::SandboxProfile;
use pond_core::sandbox::{CommandSpec, SandboxBackend, SandboxError, SandboxRequest, Wrapped};

/// Runs commands as plain host processes: the `none` profile only.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostBackend;

impl SandboxBackend for HostBackend {
    fn name(&self) -> &'static str {
        "host"
    }

    fn profiles(&self) -> Vec<SandboxProfile> {
        vec![SandboxProfile::None]
    }

    fn wrap(&self, request: &SandboxRequest, command: CommandSpec) -> Result<Wrapped, SandboxError> {
        match request.profile {
            SandboxProfile::None => Ok(Wrapped { command, report: None }),
            other => Err(SandboxError::Unsupported(other.as_str())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_backend_fails_closed_on_confined_profiles() {
        let cmd = CommandSpec { argv: vec!["true".into()], env: vec![], cwd: "/".into(), paths: vec![] };
        let request = |profile| SandboxRequest { profile, ..SandboxRequest::default() };
        assert_eq!(HostBackend.wrap(&request(SandboxProfile::None), cmd.clone()).unwrap().command, cmd);
        for p in [SandboxProfile::UntrustedCodeRead, SandboxProfile::UntrustedCodeWrite] {
            let err = HostBackend.wrap(&request(p), cmd.clone()).unwrap_err();
            assert!(err.to_string().contains(p.as_str()));
        }
    }
}
