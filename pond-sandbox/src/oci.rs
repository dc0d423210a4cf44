//! The OCI backend on youki's libcontainer: `untrusted-code-read` and `untrusted-code-write`.
//!
//! libcontainer forks with raw `clone3` and runs Rust code in the child, which deadlocks when
//! the caller has other threads (an inherited malloc or stderr lock). So the backend never
//! calls it from the server or worker: [`OciBackend::wrap`] writes a [`HelperSpec`] and
//! returns the command `pond-sandbox-helper SPEC` (or `pond sandbox run SPEC`), a
//! single-threaded helper process (one per sandbox) that runs [`run_helper`]. The helper:
//!
//! 1. enters a new network namespace of its own with only `lo` up, and binds there the egress
//!    proxy (`127.0.0.1:3128`) and the loopback ports the command may reach (the broker);
//! 2. mounts one tmpfs of the stage's disk size as the bundle: the root's mount points, the
//!    container's state, and everything writable (a copy of the checkout under
//!    `untrusted-code-write`, the home and output directories, `/tmp`);
//! 3. writes an OCI bundle whose root is an empty directory with read-only binds of the host's
//!    system directories and the granted paths, and creates the container in new pid, mount,
//!    ipc, uts and cgroup namespaces sharing the helper's network namespace, as an
//!    unprivileged uid ([`SANDBOX_UID`]); no capabilities, no_new_privileges, a seccomp filter
//!    that also denies new namespaces, masked /proc paths, and cgroup limits (memory, pids, CPU);
//! 4. checks in /proc that seccomp, no_new_privileges and the empty capability set are in
//!    force before it starts the command, and refuses to start it otherwise;
//! 5. proxies: a thread that moved back into the host's network namespace serves the proxy
//!    and the forwards, so the sandbox's one way out is through them;
//! 6. waits with the wall-clock limit, then reads the memory cgroup's OOM count, copies the
//!    writable grants' contents back, unmounts the bundle (the cgroup stays, a warm slot for
//!    the next sandbox), and writes a [`SandboxReport`] the executor turns into the stage's
//!    result.
//!
//! A helper that dies (its worker was killed) leaves a container behind: [`collect_garbage`]
//! removes every container, cgroup and mount of the state directory at the next start.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use pond_core::definition::{SandboxLimits, SandboxProfile};
use pond_core::sandbox::{
    CommandSpec, PathAccess, PathGrant, SandboxBackend, SandboxError, SandboxReport, SandboxRequest, Wrapped,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::egress::{self, Rule};

/// The first of the users (and groups) commands run as: unprivileged ids no host account uses.
/// Each sandbox running on the host at the same time has its own ([`SANDBOX_UIDS`] of them,
/// held by a lock for the sandbox's life), so per-user kernel limits (inotify instances and
/// watches, pipe buffers, …) are per sandbox: one cannot exhaust them for the others.
///
/// No user namespace: its mapped root could not reach mount sources below the 0700
/// directories a worker keeps its checkouts and scratch space in, and a non-root uid without
/// capabilities, under no_new_privileges and seccomp, already cannot regain privileges.
pub const SANDBOX_UID: u32 = 101_000;
/// How many sandbox uids there are (`SANDBOX_UID..SANDBOX_UID + SANDBOX_UIDS`).
pub const SANDBOX_UIDS: u32 = 4096;

/// Where the host-wide uid locks live: one file per uid, `flock`ed by the helper using it.
/// Host-wide rather than per state directory, since two workers on one host share the kernel.
fn uid_lock_dir() -> PathBuf {
    if Path::new("/run").is_dir() {
        PathBuf::from("/run/pond-sandbox/uids")
    } else {
        std::env::temp_dir().join("pond-sandbox-uids")
    }
}

/// Takes a sandbox uid no other sandbox on this host holds; the lock goes with the file.
fn acquire_uid() -> Result<(File, u32), String> {
    let dir = uid_lock_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    // In a shared directory (the /tmp fallback) another user could have made it first, or put
    // a symlink there: the locks are trusted only in a real directory of ours that nobody else
    // can write.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(&dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != euid {
        return Err(format!("{} is not a directory of this user: refusing its uid locks", dir.display()));
    }
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(|e| format!("making {} private: {e}", dir.display()))?;
    match first_free_lock(&dir, SANDBOX_UIDS as usize)? {
        Some((file, n)) => Ok((file, SANDBOX_UID + n as u32)),
        None => Err(format!("all {SANDBOX_UIDS} sandbox uids are in use on this host")),
    }
}

/// The first of `dir/0.lock` … `dir/<count-1>.lock` this process could `flock`, and its number;
/// the lock lasts as long as the file is open (close-on-exec, so no container holds it).
fn first_free_lock(dir: &Path, count: usize) -> Result<Option<(File, usize)>, String> {
    use std::os::unix::fs::OpenOptionsExt;
    for n in 0..count {
        let path = dir.join(format!("{n}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        if file.try_lock().is_ok() {
            return Ok(Some((file, n)));
        }
    }
    Ok(None)
}

/// A sandbox uid for a root worker's unsandboxed jobs, held (with the returned lock file open)
/// for as long as the worker runs: no sandbox and no other worker on this host gets it.
pub fn acquire_job_uid() -> Result<(File, u32), String> {
    acquire_uid()
}

/// Whether `uid` is one of the sandbox uids.
pub fn is_sandbox_uid(uid: u32) -> bool {
    (SANDBOX_UID..SANDBOX_UID + SANDBOX_UIDS).contains(&uid)
}
/// Where the egress proxy listens inside the sandbox.
pub const PROXY_PORT: u16 = 3128;
/// The cgroup (under each hierarchy's root) holding every sandbox's cgroup.
const CGROUP_PARENT: &str = "pond-sandbox";

/// The cgroup holding the sandboxes of one state directory (one worker or server), relative
/// to a hierarchy's root: its own, so garbage collection and leak checks see only theirs.
fn cgroup_group(state_dir: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    state_dir.hash(&mut hasher);
    format!("{CGROUP_PARENT}/{:016x}", hasher.finish())
}
/// The host directories every sandbox sees, read-only, when they exist.
const SYSTEM_DIRS: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt"];

/// Settings of the OCI backend (the operator's).
#[derive(Clone, Debug)]
pub struct OciConfig {
    /// The helper command, to which the spec file's path is appended: `pond-sandbox-helper`,
    /// or `pond sandbox run` (see [`helper_command`]).
    pub helper: Vec<String>,
    /// Private state: containers, bundles. One per worker or server; garbage-collected at start.
    pub state_dir: PathBuf,
    /// Limits of a stage that sets none.
    pub defaults: Limits,
    /// The most a stage may ask for.
    pub ceilings: Limits,
    /// Hosts every `untrusted-code-write` sandbox may reach (package registries).
    pub egress_allow: Vec<String>,
}

/// Concrete limits (defaults or ceilings).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Processes and threads.
    pub pids: u64,
    /// CPU cores.
    pub cpus: f64,
    /// Wall-clock seconds.
    pub timeout_secs: u64,
    /// Writable space in MiB.
    pub disk_mib: u64,
}

impl Limits {
    /// Defaults for a stage that sets no limits.
    pub const DEFAULTS: Limits = Limits { memory_mib: 2048, pids: 512, cpus: 2.0, timeout_secs: 3600, disk_mib: 2048 };
    /// Default ceilings.
    pub const CEILINGS: Limits =
        Limits { memory_mib: 16384, pids: 4096, cpus: 16.0, timeout_secs: 86_400, disk_mib: 16384 };

    /// The stage's request over `self` (the defaults), refused above `ceilings`.
    pub fn resolve(&self, asked: &SandboxLimits, ceilings: &Limits) -> Result<Limits, SandboxError> {
        let over = |field: &str, asked: String, ceiling: String| SandboxError::Request {
            field: format!("sandbox.limits.{field}"),
            reason: format!("{asked} is above this host's ceiling of {ceiling}"),
        };
        let pick = |field: &str, asked: Option<u64>, default: u64, ceiling: u64| match asked {
            Some(v) if v > ceiling => Err(over(field, v.to_string(), ceiling.to_string())),
            Some(v) => Ok(v),
            None => Ok(default.min(ceiling)),
        };
        let cpus = match asked.cpus {
            Some(c) if c > ceilings.cpus => return Err(over("cpus", c.to_string(), ceilings.cpus.to_string())),
            Some(c) => c,
            None => self.cpus.min(ceilings.cpus),
        };
        Ok(Limits {
            memory_mib: pick("memory_mib", asked.memory_mib, self.memory_mib, ceilings.memory_mib)?,
            pids: pick("pids", asked.pids, self.pids, ceilings.pids)?,
            cpus,
            timeout_secs: pick("timeout_secs", asked.timeout_secs, self.timeout_secs, ceilings.timeout_secs)?,
            disk_mib: pick("disk_mib", asked.disk_mib, self.disk_mib, ceilings.disk_mib)?,
        })
    }
}

/// Everything the helper needs for one sandbox.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HelperSpec {
    /// Container id (unique; also names the bundle and the cgroup).
    pub id: String,
    /// The backend's state directory.
    pub state_dir: PathBuf,
    /// The profile.
    pub profile: SandboxProfile,
    /// The command.
    pub argv: Vec<String>,
    /// Its environment.
    pub env: Vec<(String, String)>,
    /// Its working directory.
    pub cwd: PathBuf,
    /// Granted host paths.
    pub paths: Vec<PathGrant>,
    /// Limits in force.
    pub limits: Limits,
    /// Egress allowlist (`untrusted-code-write`); empty: the proxy refuses (and logs) every host.
    pub egress_allow: Vec<String>,
    /// Host loopback ports forwarded into the sandbox.
    pub loopback_ports: Vec<u16>,
    /// Where to write the report.
    pub report: PathBuf,
    /// The pid of the process that starts the helper (the server or worker running the stage):
    /// the helper watches it, and refuses to start if its parent is already another process.
    /// Compared with `getppid()`, not assumed from it, so a worker that is pid 1 (a container's
    /// init) is watched like any other.
    #[serde(default)]
    pub parent_pid: u32,
}

impl HelperSpec {
    /// A `untrusted-code-write` sandbox running `argv` in `/` with the default limits, no
    /// granted paths and no network (benchmarks, leak checks).
    pub fn plain(id: &str, state_dir: &Path, argv: &[&str], report: PathBuf) -> HelperSpec {
        HelperSpec {
            id: id.to_string(),
            state_dir: state_dir.to_path_buf(),
            profile: SandboxProfile::UntrustedCodeWrite,
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: Vec::new(),
            cwd: "/".into(),
            paths: Vec::new(),
            limits: Limits::DEFAULTS,
            egress_allow: Vec::new(),
            loopback_ports: Vec::new(),
            report,
            parent_pid: std::process::id(),
        }
    }
}

/// The OCI backend.
#[derive(Debug)]
pub struct OciBackend {
    config: OciConfig,
}

/// Refuses a state directory another user could write in: the helper, as root, mounts on,
/// unmounts and runs bundles from paths under it, so whoever can rename or link there could
/// point those at paths (and an OCI config) of their own.
fn check_state_dir_is_private(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!(
            "the sandbox state directory {} belongs to uid {}, not to this process's ({me}); refusing it",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "the sandbox state directory {} is writable by other users (mode {:o}); refusing it",
            dir.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

impl OciBackend {
    /// A backend that has passed its self-check: a probe sandbox ran and saw seccomp,
    /// no_new_privileges, no capabilities, a non-root uid and no network. Collects the
    /// garbage a previous process left in the state directory first.
    pub fn new(config: OciConfig) -> Result<OciBackend, SandboxError> {
        std::fs::create_dir_all(&config.state_dir)
            .map_err(|e| SandboxError::SelfCheck(format!("creating {}: {e}", config.state_dir.display())))?;
        check_state_dir_is_private(&config.state_dir).map_err(SandboxError::SelfCheck)?;
        // Another live process's sandboxes in the same directory are left alone.
        collect_garbage_if_idle(&config.state_dir).map_err(SandboxError::SelfCheck)?;
        let backend = OciBackend { config };
        backend.self_check()?;
        Ok(backend)
    }

    fn self_check(&self) -> Result<(), SandboxError> {
        let scratch = tempfile::Builder::new()
            .prefix("self-check-")
            .tempdir_in(&self.config.state_dir)
            .map_err(|e| SandboxError::SelfCheck(e.to_string()))?;
        let out = scratch.path().join("out");
        std::fs::create_dir_all(&out).map_err(|e| SandboxError::SelfCheck(e.to_string()))?;
        let script = "set -e; grep -E '^(Uid|Seccomp|NoNewPrivs|CapEff|CapBnd):' /proc/self/status > \"$OUT/status\"; \
                      cat /proc/net/dev > \"$OUT/netdev\"";
        let command = CommandSpec {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec![("OUT".into(), out.to_string_lossy().into_owned()), ("PATH".into(), "/usr/bin:/bin".into())],
            cwd: out.clone(),
            paths: vec![PathGrant { path: out.clone(), access: PathAccess::Writable }],
        };
        let request = SandboxRequest {
            profile: SandboxProfile::UntrustedCodeWrite,
            limits: SandboxLimits { timeout_secs: Some(30), ..SandboxLimits::default() },
            scratch: scratch.path().to_path_buf(),
            ..SandboxRequest::default()
        };
        let wrapped = self.wrap(&request, command)?;
        let output = std::process::Command::new(&wrapped.command.argv[0])
            .args(&wrapped.command.argv[1..])
            .env_clear()
            .envs(wrapped.command.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&wrapped.command.cwd)
            .output()
            .map_err(|e| SandboxError::SelfCheck(format!("starting the helper: {e}")))?;
        let report = wrapped.report.as_ref().and_then(|r| std::fs::read(r).ok());
        let report: Option<SandboxReport> = report.and_then(|r| serde_json::from_slice(&r).ok());
        let helper_said = || String::from_utf8_lossy(&output.stderr).trim().to_string();
        match report.as_ref().map(|r| r.failure()) {
            Some(None) => {}
            Some(Some(why)) => {
                return Err(SandboxError::SelfCheck(format!("the probe sandbox failed: {why} {}", helper_said())))
            }
            None => return Err(SandboxError::SelfCheck(format!("the helper wrote no report: {}", helper_said()))),
        }
        let status = std::fs::read_to_string(out.join("status")).unwrap_or_default();
        let field = |name: &str| status_field(&status, name);
        let expect = [
            ("Seccomp:", field("Seccomp:") == "2"),
            ("NoNewPrivs:", field("NoNewPrivs:") == "1"),
            ("CapEff:", field("CapEff:").trim_start_matches('0').is_empty()),
            ("CapBnd:", field("CapBnd:").trim_start_matches('0').is_empty()),
            // Every uid (real, effective, saved, filesystem) is the one the helper took for this
            // sandbox alone: a sandbox uid, and not one shared with anything else.
            ("Uid:", {
                let assigned = report.as_ref().and_then(|r| r.uid).filter(|u| is_sandbox_uid(*u));
                let uids: Vec<&str> = field("Uid:").split_whitespace().collect();
                uids.len() == 4 && assigned.is_some_and(|a| uids.iter().all(|u| u.parse() == Ok(a)))
            }),
        ];
        if let Some((name, _)) = expect.iter().find(|(_, ok)| !ok) {
            return Err(SandboxError::SelfCheck(format!("inside the probe sandbox, {name} is `{}`", field(name))));
        }
        let netdev = std::fs::read_to_string(out.join("netdev")).unwrap_or_default();
        let devices: Vec<&str> = netdev.lines().skip(2).filter_map(|l| l.split(':').next()).map(str::trim).collect();
        if devices != ["lo"] {
            return Err(SandboxError::SelfCheck(format!("the probe sandbox sees network devices {devices:?}")));
        }
        Ok(())
    }

    /// The backend's settings.
    pub fn config(&self) -> &OciConfig {
        &self.config
    }
}

impl SandboxBackend for OciBackend {
    fn name(&self) -> &'static str {
        "oci"
    }

    fn profiles(&self) -> Vec<SandboxProfile> {
        vec![SandboxProfile::None, SandboxProfile::UntrustedCodeRead, SandboxProfile::UntrustedCodeWrite]
    }

    fn wrap(&self, request: &SandboxRequest, command: CommandSpec) -> Result<Wrapped, SandboxError> {
        if request.profile == SandboxProfile::None {
            return Ok(Wrapped { command, report: None });
        }
        let limits = self.config.defaults.resolve(&request.limits, &self.config.ceilings)?;
        if self.config.helper.is_empty() {
            return Err(SandboxError::SelfCheck("no helper command is configured".into()));
        }
        if command.argv.is_empty() {
            return Err(SandboxError::Request { field: "argv".into(), reason: "is empty".into() });
        }
        // The sandbox shows each path at its own place, so every one must be absolute.
        let absolute = |p: &Path| {
            std::path::absolute(p).map_err(|e| SandboxError::Prepare(format!("resolving {}: {e}", p.display())))
        };
        let mut command = command;
        command.cwd = absolute(&command.cwd)?;
        for grant in &mut command.paths {
            grant.path = absolute(&grant.path)?;
        }
        let mut egress_allow = Vec::new();
        if request.profile == SandboxProfile::UntrustedCodeWrite {
            egress_allow.extend(self.config.egress_allow.iter().cloned());
            egress_allow.extend(request.allow_hosts.iter().cloned());
        }
        let id = unique_id();
        let spec_path = request.scratch.join("sandbox.json");
        let report = request.scratch.join("sandbox-report.json");
        let spec = HelperSpec {
            id,
            state_dir: self.config.state_dir.clone(),
            profile: request.profile,
            argv: command.argv,
            env: command.env,
            cwd: command.cwd,
            paths: command.paths,
            limits,
            egress_allow,
            loopback_ports: request.loopback_ports.clone(),
            report: report.clone(),
            parent_pid: std::process::id(),
        };
        let text = serde_json::to_vec(&spec).map_err(|e| SandboxError::Prepare(e.to_string()))?;
        std::fs::write(&spec_path, text)
            .map_err(|e| SandboxError::Prepare(format!("writing {}: {e}", spec_path.display())))?;
        let mut argv = self.config.helper.clone();
        argv.push(spec_path.to_string_lossy().into_owned());
        let helper = CommandSpec {
            argv,
            env: vec![("PATH".into(), "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into())],
            cwd: request.scratch.clone(),
            paths: Vec::new(),
        };
        Ok(Wrapped { command: helper, report: Some(report) })
    }
}

/// The helper command for a `pond` executable: `pond-sandbox-helper` beside it when installed
/// (a smaller binary, a millisecond cheaper per sandbox), else `pond sandbox run`.
pub fn helper_command(pond_exe: &Path) -> Vec<String> {
    let small = pond_exe.with_file_name("pond-sandbox-helper");
    if small.is_file() {
        vec![small.to_string_lossy().into_owned()]
    } else {
        vec![pond_exe.to_string_lossy().into_owned(), "sandbox".into(), "run".into()]
    }
}

fn unique_id() -> String {
    let mut bytes = [0u8; 8];
    if let Ok(mut f) = File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    format!("pond-{}-{}", std::process::id(), u64::from_le_bytes(bytes) & 0xffff_ffff_ffff)
}

// ---------------------------------------------------------------------------------------------
// The helper process.

/// Runs one sandbox as [`HelperSpec`] at `spec_path` says, writes its report, and returns the
/// helper's exit code (0: the report was written). Must run in a single-threaded process.
pub fn run_helper(spec_path: &Path) -> i32 {
    let entry_ns = mono_ns();
    let spec: HelperSpec = match std::fs::read(spec_path).map(|b| serde_json::from_slice(&b)) {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return complain(&format!("reading {}: {e}", spec_path.display())),
        Err(e) => return complain(&format!("reading {}: {e}", spec_path.display())),
    };
    let mut report = SandboxReport {
        memory_mib: spec.limits.memory_mib,
        timeout_secs: spec.limits.timeout_secs,
        ..SandboxReport::default()
    };
    // Held (shared) until this helper exits, through teardown: garbage collection of the state
    // directory waits for no one and touches nothing while any helper of it lives.
    let active = match active_lock(&spec.state_dir).and_then(|f| {
        f.lock_shared().map_err(|e| format!("locking {}: {e}", spec.state_dir.join(ACTIVE_LOCK).display()))?;
        Ok(f)
    }) {
        Ok(f) => f,
        Err(e) => return complain(&e),
    };
    let mut sandbox = Sandbox::new(&spec);
    if let Err(e) = sandbox.run(&mut report) {
        report.error = Some(e);
    }
    report.egress_refused = EGRESS_REFUSED.load(std::sync::atomic::Ordering::Relaxed);
    sandbox.tear_down();
    sandbox.mark("teardown");
    sandbox.print_trace();
    drop(active);
    let text = serde_json::to_vec(&report).unwrap_or_default();
    let code = match std::fs::write(&spec.report, text) {
        Ok(()) => 0,
        Err(e) => complain(&format!("writing {}: {e}", spec.report.display())),
    };
    if std::env::var_os("POND_SANDBOX_TRACE").is_some() {
        let _ = writeln!(std::io::stderr(), "pond sandbox times: entry {entry_ns} end {}", mono_ns());
    }
    code
}

fn mono_ns() -> i128 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as i128 * 1_000_000_000 + now.tv_nsec as i128
}

fn complain(message: &str) -> i32 {
    let _ = writeln!(std::io::stderr(), "pond sandbox: {message}");
    2
}

struct Sandbox<'a> {
    spec: &'a HelperSpec,
    bundle: PathBuf,
    container: Option<Container>,
    rw_mounted: bool,
    /// The cgroup slot held (its lock file) and its number.
    slot: Option<(File, usize)>,
    /// Where the slot's cgroup directories are (one per hierarchy), listed when the slot is taken.
    slot_cgroups: Vec<PathBuf>,
    /// The uid held (its lock file) and its number.
    uid: Option<(File, u32)>,
    /// Phase ends, printed to stderr when `POND_SANDBOX_TRACE` is set (for tuning).
    marks: Vec<(&'static str, std::time::Instant)>,
}

fn os_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

impl<'a> Sandbox<'a> {
    fn new(spec: &'a HelperSpec) -> Self {
        // Named once the cgroup slot is taken (the bundle directory is the slot's).
        let bundle = PathBuf::new();
        let marks = vec![("start", std::time::Instant::now())];
        Sandbox {
            spec,
            bundle,
            container: None,
            rw_mounted: false,
            slot: None,
            slot_cgroups: Vec::new(),
            uid: None,
            marks,
        }
    }

    /// The bundle's writable space: copies of writable grants and checkouts, `/tmp`.
    fn rw(&self) -> PathBuf {
        self.bundle.join("rw")
    }

    fn mark(&mut self, phase: &'static str) {
        self.marks.push((phase, std::time::Instant::now()));
    }

    fn print_trace(&self) {
        if std::env::var_os("POND_SANDBOX_TRACE").is_none() {
            return;
        }
        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes the timespec it is given.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        let now_ns = now.tv_sec as i128 * 1_000_000_000 + now.tv_nsec as i128;
        let since_start = self.marks[0].1.elapsed().as_nanos() as i128;
        let mut line = format!("pond sandbox trace: at {} {}", now_ns - since_start, now_ns);
        for pair in self.marks.windows(2) {
            line.push_str(&format!(" {} {:.2}ms", pair[1].0, (pair[1].1 - pair[0].1).as_secs_f64() * 1000.0));
        }
        let _ = writeln!(std::io::stderr(), "{line}");
    }

    fn run(&mut self, report: &mut SandboxReport) -> Result<(), String> {
        let spec = self.spec;
        // The sandbox's network namespace is made on a thread of its own (a namespace is a
        // thread's, not a process's) while this one fills the bundle: creating one costs more
        // than half a millisecond. This thread joins it before libcontainer runs.
        let network = {
            let rules = spec.egress_allow.clone();
            let ports = spec.loopback_ports.clone();
            std::thread::Builder::new()
                .spawn(move || private_network(&rules, &ports))
                .map_err(|e| format!("starting the network set-up: {e}"))?
        };
        // Started after the network thread (a cgroup move holds back every thread or process
        // being made until it is done), joined before libcontainer forks (it needs a
        // single-threaded process); skipped when no thread can be made (the time is all it saves).
        let warm_moves = std::thread::Builder::new().spawn(warm_cgroup_moves).ok();
        self.mark("threads");
        // SAFETY: prctl with constant arguments on this process only.
        unsafe {
            // Processes the container leaves behind are re-parented to us, not to the host's init.
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        }
        // The process that started us (the server or worker running the stage): if it dies,
        // so does the sandbox, at once, rather than run on without anyone to take its output.
        let parent = pidfd_of_parent(spec.parent_pid)?;
        note_stop_signals();
        let host_netns =
            File::open("/proc/self/ns/net").map_err(|e| format!("opening the host network namespace: {e}"))?;
        self.mark("pre");
        let (lock, slot, existing) = acquire_slot(&spec.state_dir)?;
        self.mark("slot");
        self.slot = Some((lock, slot));
        let cgroup = slot_cgroup(&spec.state_dir, slot);
        let oom_before = oom_kills(&existing);
        self.slot_cgroups = existing;
        // The whole bundle is one tmpfs: the root's mount points, the container's state and
        // the writable space cost memory operations, not ext4 ones, and go with one unmount.
        // It is mounted on the slot's own directory, kept (empty) between sandboxes like the
        // slot's cgroups: making and removing a directory on the host's disk costs more than
        // the rest of the bundle.
        self.bundle = slot_bundle(&spec.state_dir, slot)?;
        self.mark("mkdir");
        mount_tmpfs(&self.bundle, spec.limits.disk_mib + 1)?;
        self.rw_mounted = true;
        self.mark("mount");
        for dir in [self.bundle.join("rootfs"), self.rw(), self.bundle.join("state")] {
            std::fs::create_dir_all(&dir).map_err(|e| format!("creating the bundle: {e}"))?;
        }
        self.mark("tmpfs");
        let (uid_lock, uid) = acquire_uid()?;
        self.uid = Some((uid_lock, uid));
        report.uid = Some(uid);
        self.mark("uid");
        let mounts = self.prepare_mounts(uid)?;
        self.mark("mounts");
        make_mount_points(&self.bundle.join("rootfs"), &mounts)?;
        self.mark("points");
        let netns = format!("/proc/{}/ns/net", std::process::id());
        let config = oci_config(spec, uid, &mounts, true, Some(netns), &cgroup);
        std::fs::write(self.bundle.join("config.json"), serde_json::to_vec_pretty(&config).unwrap_or_default())
            .map_err(|e| format!("writing config.json: {e}"))?;
        self.mark("bundle");

        let seccomp_filters = crate::seccomp::programs()?;
        let PrivateNetwork { namespace, proxy, forwards } =
            network.join().map_err(|_| "the network set-up thread panicked".to_string())??;
        // SAFETY: setns on this thread with a namespace fd the network thread opened; from here
        // /proc/<pid>/ns/net, which the container joins, names the sandbox's namespace.
        if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(os_error("joining the sandbox's network namespace"));
        }
        // What the container will join by path: refuse unless it is the new namespace and
        // not the host's.
        use std::os::unix::fs::MetadataExt;
        let joined = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
        let host = host_netns.metadata().map(|m| m.ino()).ok();
        let made = namespace.metadata().map(|m| m.ino()).ok();
        if joined.is_none() || joined != made || joined == host {
            return Err("the helper is not in the sandbox's network namespace; not starting it".into());
        }
        drop(namespace);
        self.mark("network");
        if warm_moves.is_some_and(|thread| thread.join().is_err()) {
            return Err("the cgroup warm-up thread panicked".into());
        }
        self.mark("warm");
        // libcontainer's processes each open a private procfs (fsopen + fsmount) for their
        // path checks unless one is cached in the process they were forked from: made here, it
        // is inherited by both (as the intermediate process's is by the init today). The init
        // gets it close-on-exec, the same as before.
        if let Err(e) = pathrs::procfs::ProcfsHandle::new() {
            return Err(format!("opening a procfs handle: {e}"));
        }
        let stdout = dup_fd(1)?;
        let stderr = dup_fd(2)?;
        // The container reads what the helper was given (/dev/null, or an agent's prompt).
        let stdin = dup_fd(0)?;
        let root = self.bundle.join("state");
        let built = ContainerBuilder::new(spec.id.clone(), SyscallType::default())
            .with_root_path(&root)
            .map_err(|e| format!("container root: {e}"))?
            .with_stdin(stdin)
            .with_stdout(stdout)
            .with_stderr(stderr)
            .validate_id()
            .map_err(|e| format!("container id: {e}"))?
            .with_executor(ConfinedExecutor { filters: seccomp_filters.clone() })
            .as_init(&self.bundle)
            .with_systemd(false)
            .with_detach(true)
            .build();
        let built = built.map_err(|e| format!("creating the container: {e}"))?;
        self.mark("create");
        let container = self.container.insert(built);
        let pid = container.pid().ok_or("the container has no process")?.as_raw();
        verify_confinement(pid)?;

        // Signals from here on are read from a signalfd; threads started below inherit the mask.
        let signals = block_signals()?;
        if STOP_REQUESTED.load(std::sync::atomic::Ordering::SeqCst) {
            // Stopped (the stage was cancelled) while the container was being made: it never
            // starts; tear_down empties the slot's cgroup, which kills the waiting init.
            report.signal = Some(libc::SIGKILL);
            return Ok(());
        }
        container.start().map_err(|e| format!("starting the container: {e}"))?;
        if proxy.is_some() || !forwards.is_empty() {
            // The proxy's CPU time is the sandbox's: its thread joins the slot's cpu cgroup
            // (cgroup v1 moves single threads; on a v2-only host it stays the helper's).
            let cpu_cgroups: Vec<PathBuf> =
                self.slot_cgroups.iter().filter(|d| names_v1_controller(d, "cpu")).cloned().collect();
            spawn_network_thread(host_netns, proxy, forwards, cpu_cgroups);
        }
        let status = wait_for(pid, signals.as_raw_fd(), parent.as_raw_fd(), spec.limits.timeout_secs, report)?;
        self.mark("start+wait");
        if libc::WIFEXITED(status) {
            report.exit_code = Some(libc::WEXITSTATUS(status));
        } else if libc::WIFSIGNALED(status) {
            report.signal = Some(libc::WTERMSIG(status));
        }
        report.oom_killed = oom_kills(&self.slot_cgroups) > oom_before;
        self.copy_back()?;
        Ok(())
    }

    /// Fills the tmpfs: `w<i>` for writable grants (their content copied in), `c<i>` for
    /// checkout copies, `tmp`. Returns the OCI mounts.
    fn prepare_mounts(&self, uid: u32) -> Result<Vec<serde_json::Value>, String> {
        let spec = self.spec;
        let mut mounts = system_mounts(&self.bundle.join("rootfs"))?;
        // The sandbox's user has a name (tools that look themselves up need one).
        for (file, line) in [
            (
                "passwd",
                format!("root:x:0:0:root:/root:/usr/sbin/nologin\nsandbox:x:{uid}:{uid}:pond sandbox:/tmp:/bin/sh\n"),
            ),
            ("group", format!("root:x:0:\nsandbox:x:{uid}:\n")),
        ] {
            let path = self.bundle.join(file);
            std::fs::write(&path, line).map_err(|e| format!("writing {}: {e}", path.display()))?;
            mounts.push(bind(&path, &Path::new("/etc").join(file), false));
        }
        let tmp = self.rw().join("tmp");
        make_dir(&tmp, 0o1777)?;
        mounts.push(bind(&tmp, Path::new("/tmp"), true));
        let mut seen = BTreeSet::new();
        for (i, grant) in spec.paths.iter().enumerate() {
            if !seen.insert(grant.path.clone()) {
                continue;
            }
            let copy = match (grant.access, spec.profile) {
                (PathAccess::ReadOnly, _) | (PathAccess::Checkout, SandboxProfile::UntrustedCodeRead) => None,
                (PathAccess::Writable, _) => Some(self.rw().join(format!("w{i}"))),
                (PathAccess::Checkout, _) => Some(self.rw().join(format!("c{i}"))),
            };
            match copy {
                None => {
                    if !grant.path.exists() {
                        return Err(format!("granted path {} does not exist", grant.path.display()));
                    }
                    mounts.push(bind(&grant.path, &grant.path, false));
                }
                Some(dir) => {
                    copy_tree(&grant.path, &dir, Some(uid))?;
                    mounts.push(bind(&dir, &grant.path, true));
                }
            }
        }
        Ok(mounts)
    }

    /// Copies what the command left in its writable grants back to the host paths.
    fn copy_back(&self) -> Result<(), String> {
        let mut seen = BTreeSet::new();
        for (i, grant) in self.spec.paths.iter().enumerate() {
            if grant.access == PathAccess::Writable && seen.insert(grant.path.clone()) {
                copy_tree(&self.rw().join(format!("w{i}")), &grant.path, None)?;
            }
        }
        Ok(())
    }

    fn tear_down(&mut self) {
        // Whatever is left in the slot's cgroup dies (the init was reaped, so the pid namespace
        // is already gone; this is belt and braces). The cgroup itself stays for the next
        // sandbox, which then skips making it.
        for dir in membership_dirs(&self.slot_cgroups) {
            empty_cgroup(dir);
        }
        self.mark("emptied");
        // libcontainer's delete() of a stopped container removes its cgroup and its state
        // directory; the state lives in the bundle's tmpfs, and the cgroup is kept warm.
        self.container = None;
        self.mark("dropped");
        // For debugging the backend by hand: keep the bundle (config.json) for inspection.
        if std::env::var_os("POND_SANDBOX_KEEP_BUNDLE").is_some() {
            return;
        }
        // The slot's directory stays, empty, for the next sandbox of the slot.
        if self.rw_mounted {
            unmount(&self.bundle);
        }
        self.mark("unmount");
    }
}

/// Makes each mount's destination in the (fresh, empty) `rootfs` ahead of libcontainer, a
/// directory, or an empty file for a file's bind: it then finds them with one lookup each
/// instead of making them through its procfs-verified path walk (~0.05 ms a mount). A
/// destination inside an earlier mount (`/dev/pts` in `/dev`, `/etc/passwd` in `/etc`) is left
/// to libcontainer: it only exists once that mount does.
fn make_mount_points(rootfs: &Path, mounts: &[serde_json::Value]) -> Result<(), String> {
    let mut made: Vec<&Path> = Vec::new();
    for mount in mounts {
        let Some(destination) = mount["destination"].as_str().map(Path::new) else { continue };
        if made.iter().any(|earlier| destination.starts_with(earlier)) {
            continue;
        }
        made.push(destination);
        // Only plain absolute paths, and never through a link (the rootfs holds links such as
        // `/bin -> usr/bin`, whose targets are the host's): anything else is left to
        // libcontainer, which resolves it inside the root.
        let Ok(relative) = destination.strip_prefix("/") else { continue };
        if !relative.components().all(|c| matches!(c, std::path::Component::Normal(_))) {
            continue;
        }
        let mut at = rootfs.to_path_buf();
        let mut through_link = false;
        for component in relative.components() {
            at.push(component);
            if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
                through_link = true;
                break;
            }
        }
        if through_link {
            continue;
        }
        let file_bind =
            mount["type"] == "bind" && mount["source"].as_str().is_some_and(|source| !Path::new(source).is_dir());
        let made_it = if file_bind {
            at.parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(&at).map(drop))
        } else {
            std::fs::create_dir_all(&at)
        };
        made_it.map_err(|e| format!("making the mount point {}: {e}", at.display()))?;
    }
    Ok(())
}

fn bind(source: &Path, destination: &Path, writable: bool) -> serde_json::Value {
    let mode = if writable { "rw" } else { "ro" };
    json!({"destination": destination, "type": "bind", "source": source, "options": ["rbind", mode, "nosuid", "nodev"]})
}

/// /proc, /dev and read-only binds of the host's system directories (symlinked ones, like
/// `/bin -> usr/bin`, become the same links in `rootfs`).
fn system_mounts(rootfs: &Path) -> Result<Vec<serde_json::Value>, String> {
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
    ];
    for dir in SYSTEM_DIRS {
        let path = Path::new(dir);
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(path).map_err(|e| format!("reading {dir}: {e}"))?;
                std::os::unix::fs::symlink(target, rootfs.join(dir.trim_start_matches('/')))
                    .map_err(|e| format!("linking {dir}: {e}"))?;
            }
            Ok(m) if m.is_dir() => mounts.push(bind(path, path, false)),
            _ => {}
        }
    }
    Ok(mounts)
}

/// Writes an OCI bundle at `dir` that runs `argv` with the same root filesystem, namespaces
/// (a fresh network namespace), seccomp filter and limits as a pond sandbox, for running the
/// same container under other runtimes (crun, runc) in the benchmark.
pub fn comparison_bundle(dir: &Path, argv: &[&str]) -> Result<(), String> {
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&rootfs).map_err(|e| format!("creating {}: {e}", rootfs.display()))?;
    let mut mounts = system_mounts(&rootfs)?;
    mounts.push(json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
        "options": ["nosuid", "nodev", "mode=1777", "size=65536k"]}));
    let spec = HelperSpec::plain("comparison", dir, argv, dir.join("report.json"));
    let mut config = oci_config(&spec, SANDBOX_UID, &mounts, false, None, "/pond-sandbox/comparison");
    // Pond applies its filter from the container's init (see `ConfinedExecutor`); other
    // runtimes get the same policy in the bundle.
    config["linux"]["seccomp"] = crate::seccomp::oci_profile();
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config).unwrap_or_default())
        .map_err(|e| format!("writing config.json: {e}"))
}

fn remove_bundle(bundle: &Path) -> Result<(), String> {
    // Mount points libcontainer made inside the rootfs are plain directories once the mount
    // namespace is gone; the tmpfs was unmounted by the caller.
    match std::fs::remove_dir_all(bundle) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("removing {}: {e}", bundle.display())),
    }
}

/// The container's OCI configuration; `netns` is the network namespace to join (the helper's),
/// `None` for a new one; `cgroup` the cgroup path.
fn oci_config(
    spec: &HelperSpec,
    uid: u32,
    mounts: &[serde_json::Value],
    proxied: bool,
    netns: Option<String>,
    cgroup: &str,
) -> serde_json::Value {
    let network = match netns {
        Some(path) => json!({"type": "network", "path": path}),
        None => json!({"type": "network"}),
    };
    let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if !spec.env.iter().any(|(k, _)| k == "PATH") {
        env.push("PATH=/usr/local/bin:/usr/bin:/bin".into());
    }
    if proxied {
        let proxy = format!("http://127.0.0.1:{PROXY_PORT}");
        for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"] {
            env.retain(|e| !e.starts_with(&format!("{name}=")));
            env.push(format!("{name}={proxy}"));
        }
        for name in ["NO_PROXY", "no_proxy"] {
            env.retain(|e| !e.starts_with(&format!("{name}=")));
            env.push(format!("{name}=127.0.0.1,localhost"));
        }
    }
    let period: u64 = 100_000;
    let quota = ((spec.limits.cpus * period as f64) as i64).max(1000);
    let memory = (spec.limits.memory_mib * 1024 * 1024) as i64;
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": uid},
            "args": spec.argv,
            "env": env,
            "cwd": spec.cwd,
            "capabilities": {"bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": []},
            "rlimits": [{"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
                        {"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "sandbox",
        "mounts": mounts,
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"},
                {"type": "cgroup"},
                network
            ],
            "cgroupsPath": cgroup,
            "resources": {
                "devices": [{"allow": false, "access": "rwm"}],
                "memory": {"limit": memory},
                "pids": {"limit": spec.limits.pids},
                "cpu": {"quota": quota, "period": period}
            },
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware"
            ],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// Runs the container's command as libcontainer's default executor does, after installing
/// pond's seccomp filters. `validate` runs in the container's init once it is in its
/// namespaces, under its uid, with no_new_privileges and no capabilities, before it waits to
/// be started: the same point where libcontainer would apply a filter itself, so the helper's
/// check of the waiting init ([`verify_confinement`]) sees it in force.
#[derive(Clone)]
struct ConfinedExecutor {
    filters: Vec<seccompiler::BpfProgram>,
}

impl libcontainer::workload::Executor for ConfinedExecutor {
    fn exec(&self, spec: &libcontainer::oci_spec::runtime::Spec) -> Result<(), libcontainer::workload::ExecutorError> {
        libcontainer::workload::default::DefaultExecutor {}.exec(spec)
    }

    fn validate(
        &self,
        spec: &libcontainer::oci_spec::runtime::Spec,
    ) -> Result<(), libcontainer::workload::ExecutorValidationError> {
        use libcontainer::workload::ExecutorValidationError as Invalid;
        libcontainer::workload::default::DefaultExecutor {}.validate(spec)?;
        // The container dies with its helper: init is the helper's child, and killing a pid
        // namespace's init kills everything in it. Set after the switch to the sandbox's uid
        // (a credential change clears it) and kept across the command's exec.
        // SAFETY: prctl on this process with constant arguments.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) } != 0 {
            return Err(Invalid::ArgValidationError(os_error("setting the parent-death signal")));
        }
        crate::seccomp::install(&self.filters).map_err(Invalid::ArgValidationError)
    }
}

/// Refuses to go on unless the container's init has seccomp, no_new_privileges and no
/// capabilities (it is waiting to be started, with all three applied).
fn verify_confinement(pid: i32) -> Result<(), String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("reading the container's status: {e}"))?;
    let field = |name: &str| status_field(&status, name);
    if field("Seccomp:") != "2" {
        return Err(format!(
            "seccomp is not in force in the container (Seccomp: {:?}); refusing to run",
            field("Seccomp:")
        ));
    }
    if field("NoNewPrivs:") != "1" {
        return Err("no_new_privileges is not set in the container; refusing to run".into());
    }
    if !field("CapEff:").trim_start_matches('0').is_empty() {
        return Err(format!("the container has capabilities ({}); refusing to run", field("CapEff:")));
    }
    Ok(())
}

/// The value of a `/proc/<pid>/status` line (`Seccomp:` → `2`), empty when absent.
fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
    status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or("")
}

/// A sandbox's network namespace (only `lo`, up) and the listeners bound in it.
struct PrivateNetwork {
    /// The namespace, for the helper's main thread to join.
    namespace: File,
    /// The egress proxy's listener and allowlist.
    proxy: Option<(std::net::TcpListener, Vec<Rule>)>,
    /// The loopback forwards' listeners and their host ports.
    forwards: Vec<(std::net::TcpListener, u16)>,
}

/// Run on a thread of its own: moves it into a new network namespace and binds the proxy and
/// the forwards there (a socket stays in the namespace it was made in).
fn private_network(egress_allow: &[String], loopback_ports: &[u16]) -> Result<PrivateNetwork, String> {
    enter_private_network()?;
    let namespace =
        File::open("/proc/thread-self/ns/net").map_err(|e| format!("opening the sandbox's network namespace: {e}"))?;
    // Every sandbox has the proxy, whatever its allowlist (`untrusted-code-read` and an
    // empty list allow nothing): a tool that reaches out through it is refused with a line in
    // the stage's log, so an attempt is seen, not only failed.
    let mut rules = Vec::new();
    for (i, text) in egress_allow.iter().enumerate() {
        rules.push(Rule::parse(text).map_err(|e| format!("egress allowlist entry {i}: {e}"))?);
    }
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", PROXY_PORT)).map_err(|e| format!("binding the egress proxy: {e}"))?;
    let mut forwards = Vec::new();
    for &port in loopback_ports {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))
            .map_err(|e| format!("binding the forward of port {port}: {e}"))?;
        forwards.push((listener, port));
    }
    Ok(PrivateNetwork { namespace, proxy: Some((listener, rules)), forwards })
}

/// Moves the calling thread into a new network namespace with only `lo`, up.
fn enter_private_network() -> Result<(), String> {
    // SAFETY: unshare(CLONE_NEWNET) moves only the calling thread into the new namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(os_error("creating the network namespace"));
    }
    // SAFETY: a plain socket and two ioctls on a zeroed ifreq naming `lo`.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(os_error("socket"));
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let ok = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) == 0 && {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(sock, libc::SIOCSIFFLAGS, &mut req) == 0
        };
        let err = os_error("bringing lo up");
        libc::close(sock);
        if !ok {
            return Err(err);
        }
    }
    Ok(())
}

/// Refusals of this helper's egress proxy (one sandbox per helper process), for its report.
static EGRESS_REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Serves the proxy and the forwards from a thread that went back to the host's network
/// namespace: it accepts on sockets bound in the sandbox's namespace and dials out from the
/// host's.
fn spawn_network_thread(
    host_netns: File,
    proxy: Option<(std::net::TcpListener, Vec<Rule>)>,
    forwards: Vec<(std::net::TcpListener, u16)>,
    cpu_cgroups: Vec<PathBuf>,
) {
    std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        for dir in &cpu_cgroups {
            let _ = std::fs::write(dir.join("tasks"), tid.to_string());
        }
        // SAFETY: setns on this thread only, with a namespace fd we opened.
        if unsafe { libc::setns(host_netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let _ = writeln!(std::io::stderr(), "pond sandbox: {}", os_error("joining the host network"));
            return;
        }
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        runtime.block_on(async move {
            let mut tasks = Vec::new();
            if let Some((listener, rules)) = proxy {
                if let Ok(listener) = to_tokio(listener) {
                    let log: egress::RefusalLog = std::sync::Arc::new(|line: String| {
                        EGRESS_REFUSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let _ = writeln!(std::io::stderr(), "pond sandbox: {line}");
                    });
                    tasks.push(tokio::spawn(egress::serve_on(listener, rules, log)));
                }
            }
            for (listener, port) in forwards {
                if let Ok(listener) = to_tokio(listener) {
                    tasks.push(tokio::spawn(egress::forward_on(listener, ([127, 0, 0, 1], port).into())));
                }
            }
            for t in tasks {
                let _ = t.await;
            }
        });
    });
}

fn to_tokio(listener: std::net::TcpListener) -> std::io::Result<tokio::net::TcpListener> {
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

/// Set by a stop signal (SIGTERM, SIGINT, SIGHUP) that arrived before [`block_signals`].
static STOP_REQUESTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP_REQUESTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Until the container exists, a stop signal only sets [`STOP_REQUESTED`], so the helper still
/// cleans up. A handler rather than a blocked mask: the mask would be inherited by the
/// container's command, a handler is reset by its exec.
fn note_stop_signals() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: installs an async-signal-safe handler (one atomic store).
        unsafe {
            libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t);
        }
    }
}

fn block_signals() -> Result<OwnedFd, String> {
    // SAFETY: sigset manipulation on a local, then a signalfd for it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(os_error("blocking signals"));
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(os_error("signalfd"));
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// A pidfd of this process's parent, which becomes readable when the parent exits. Fails if
/// the parent is already gone (we were re-parented to init or a subreaper).
fn pidfd_of_parent(expected: u32) -> Result<OwnedFd, String> {
    // SAFETY: getppid has no preconditions; pidfd_open on a pid we then re-check.
    let ppid = unsafe { libc::getppid() };
    // The parent we were started by is gone when our parent is not the pid the spec names (we
    // were re-parented to a reaper). A spec without one (older writer): any parent but init.
    let started_by = |pid: i32| if expected == 0 { pid != 1 } else { pid as u32 == expected };
    if !started_by(ppid) {
        return Err("the process that started the sandbox is gone; not starting it".into());
    }
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, ppid, 0) } as i32;
    if fd < 0 {
        return Err(os_error("pidfd_open of the helper's parent"));
    }
    // SAFETY: we own the new descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Re-checked after opening: the descriptor names our parent, not a process that reused its pid.
    if unsafe { libc::getppid() } != ppid {
        return Err("the process that started the sandbox is gone; not starting it".into());
    }
    Ok(fd)
}

/// Waits for the container's init; kills it at the deadline (`timed_out`), on a signal to
/// the helper (the stage was cancelled) or when the helper's parent dies (its node was
/// killed). Returns the wait status.
fn wait_for(
    pid: i32,
    signal_fd: i32,
    parent_fd: i32,
    timeout_secs: u64,
    report: &mut SandboxReport,
) -> Result<i32, String> {
    // SAFETY: pidfd_open on our own child.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if pidfd < 0 {
        return Err(os_error("pidfd_open"));
    }
    // SAFETY: we own the new descriptor.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let deadline = std::time::Instant::now() + Duration::from_secs(timeout_secs);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            report.timed_out = true;
            break;
        }
        let mut fds = [
            libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: signal_fd, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: parent_fd, events: libc::POLLIN, revents: 0 },
        ];
        let millis = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll on three descriptors we own.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, millis) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(os_error("poll"));
        }
        if fds.iter().any(|f| f.revents != 0) {
            break;
        }
    }
    // Killing a pid namespace's init kills everything in it.
    // SAFETY: signals our own child (a no-op if it already exited and awaits reaping).
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let mut status = 0;
    loop {
        // SAFETY: reaps our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Ok(status);
        }
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return Err(os_error("waitpid"));
        }
    }
}

fn dup_fd(fd: i32) -> Result<OwnedFd, String> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we own.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(os_error("dup"));
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn cstring(path: &Path) -> Result<std::ffi::CString, String> {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{} has a NUL byte", path.display()))
}

fn mount_tmpfs(at: &Path, size_mib: u64) -> Result<(), String> {
    let target = cstring(at)?;
    // nr_inodes bounds the files a sandbox can leave for the helper to copy back.
    let options = std::ffi::CString::new(format!("size={size_mib}m,nr_inodes=262144,mode=0755")).unwrap_or_default();
    // SAFETY: mount with valid C strings.
    let r = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            options.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(os_error(&format!("mounting the sandbox's tmpfs at {}", at.display())));
    }
    Ok(())
}

fn unmount(at: &Path) {
    if let Ok(target) = cstring(at) {
        // SAFETY: umount2 with a valid C string.
        unsafe {
            libc::umount2(target.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW);
        }
    }
}

fn make_dir(dir: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", dir.display()))
}

/// Copies the regular files and directories of `from` into `to` (symlinks and special files
/// are skipped: nothing the sandbox made may point the host elsewhere), owned by `owner`
/// when given.
fn copy_tree(from: &Path, to: &Path, owner: Option<u32>) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let chown = |p: &Path| match owner {
        Some(id) => std::os::unix::fs::lchown(p, Some(id), Some(id)).map_err(|e| format!("chown {}: {e}", p.display())),
        None => Ok(()),
    };
    std::fs::create_dir_all(to).map_err(|e| format!("creating {}: {e}", to.display()))?;
    chown(to)?;
    if !from.is_dir() {
        return Ok(());
    }
    for entry in walk(from)? {
        let (relative, kind, mode) = entry;
        let target = to.join(&relative);
        match kind {
            EntryKind::Dir => {
                std::fs::create_dir_all(&target).map_err(|e| format!("creating {}: {e}", target.display()))?;
                chown(&target)?;
            }
            EntryKind::File => {
                let source = from.join(&relative);
                if std::fs::symlink_metadata(&target).is_ok_and(|m| !m.is_file()) {
                    continue;
                }
                std::fs::copy(&source, &target).map_err(|e| format!("copying {}: {e}", source.display()))?;
                let _ = std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode & 0o777));
                chown(&target)?;
            }
        }
    }
    Ok(())
}

enum EntryKind {
    Dir,
    File,
}

fn walk(root: &Path) -> Result<Vec<(PathBuf, EntryKind, u32)>, String> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(relative) = stack.pop() {
        let dir = root.join(&relative);
        let entries = std::fs::read_dir(&dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
        for entry in entries.flatten() {
            let Ok(meta) = std::fs::symlink_metadata(entry.path()) else { continue };
            let path = relative.join(entry.file_name());
            if meta.is_dir() {
                out.push((path.clone(), EntryKind::Dir, meta.permissions().mode()));
                stack.push(path);
            } else if meta.is_file() {
                out.push((path, EntryKind::File, meta.permissions().mode()));
            }
        }
    }
    Ok(out)
}

/// The cgroup directories of sandbox `id` of `state_dir` (every sandbox of it: `None`) on
/// every mounted hierarchy.
/// The cgroup hierarchies' mount points: `/sys/fs/cgroup` on a cgroup v2 host, each directory
/// in it on a v1 or hybrid one.
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        vec![base.to_path_buf()]
    } else {
        std::fs::read_dir(base).map(|e| e.flatten().map(|e| e.path()).collect()).unwrap_or_default()
    }
}

fn cgroup_dirs(state_dir: &Path, id: Option<&str>) -> Vec<PathBuf> {
    let group = cgroup_group(state_dir);
    let mut dirs = Vec::new();
    for hierarchy in cgroup_hierarchies() {
        let parent = hierarchy.join(&group);
        match id {
            Some(id) => dirs.push(parent.join(id)),
            None => {
                if let Ok(entries) = std::fs::read_dir(&parent) {
                    dirs.extend(entries.flatten().map(|e| e.path()));
                }
            }
        }
    }
    dirs.into_iter().filter(|d| d.is_dir()).collect()
}

/// Moves this process into the cgroup it is already in, to have the kernel's wait for task
/// moves paid early: the first move into a cgroup after a quiet spell waits for an RCU grace
/// period (the global `cgroup_threadgroup_rwsem` switching to its writer side, ~5–7 ms on this
/// machine), and moves within ~10 ms of an earlier one do not (~0.2 ms). Run on a thread at the
/// helper's start, the wait overlaps the network namespace, the tmpfs and the bundle, and the
/// container's own moves into the slot's cgroups a few milliseconds later find the writer side
/// ready. A no-op move, best effort: nothing depends on it but the time (a host with
/// `favordynmods` on its cgroup2 mount has no such wait at all).
fn warm_cgroup_moves() {
    let Ok(own) = std::fs::read_to_string("/proc/self/cgroup") else { return };
    let pid = std::process::id().to_string();
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let relative = path.trim_start_matches('/');
        let candidates: Vec<PathBuf> = if controllers.is_empty() {
            // cgroup v2: the mount is /sys/fs/cgroup itself, or /sys/fs/cgroup/unified on a hybrid host.
            vec![Path::new("/sys/fs/cgroup").join(relative), Path::new("/sys/fs/cgroup/unified").join(relative)]
        } else if controllers.starts_with("name=") {
            continue;
        } else {
            vec![Path::new("/sys/fs/cgroup").join(controllers).join(relative)]
        };
        for dir in candidates {
            // Only the cgroup that lists this process (a cgroup namespace or a bind-mounted
            // subtree can make the path name another one), and only an existing file.
            let procs = dir.join("cgroup.procs");
            let listed = std::fs::read_to_string(&procs).is_ok_and(|text| text.lines().any(|l| l.trim() == pid));
            if listed
                && std::fs::OpenOptions::new()
                    .write(true)
                    .open(&procs)
                    .and_then(|mut f| f.write_all(pid.as_bytes()))
                    .is_ok()
            {
                return;
            }
        }
    }
}

/// The directory sandboxes of cgroup slot `slot` mount their bundle's tmpfs on, made on the
/// slot's first use and kept after. One a dead helper left mounted (its tmpfs with the
/// container's state and whatever the command wrote) is unmounted first: the slot's lock, held
/// by the caller, says no live helper uses it, and the slot's cgroups were just emptied.
fn slot_bundle(state_dir: &Path, slot: usize) -> Result<PathBuf, String> {
    let dir = state_dir.join("bundles").join(slot_name(slot));
    let target = cstring(&dir)?;
    // A mount stacked twice over (a helper that died while another's was still mounted there)
    // takes as many unmounts; EINVAL (not a mount point) or ENOENT (no directory) ends it.
    for _ in 0..16 {
        // SAFETY: umount2 with a valid C string.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) } != 0 {
            break;
        }
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    // The tmpfs goes on this very directory, never where a link there would lead.
    match std::fs::symlink_metadata(&dir) {
        Ok(meta) if meta.file_type().is_dir() => Ok(dir),
        Ok(_) => Err(format!("{} is not a directory; not mounting on it", dir.display())),
        Err(e) => Err(format!("reading {}: {e}", dir.display())),
    }
}

fn slot_name(slot: usize) -> String {
    format!("slot-{slot}")
}

/// The cgroup path (relative to each hierarchy's root) of cgroup slot `slot`.
fn slot_cgroup(state_dir: &Path, slot: usize) -> String {
    format!("/{}/{}", cgroup_group(state_dir), slot_name(slot))
}

/// Takes the first free cgroup slot of `state_dir`: a lock held for the helper's life (the
/// descriptor is close-on-exec, so the container never holds it). A slot whose lock is free
/// but whose cgroup still has processes belonged to a helper that died: they are killed.
/// Takes a free cgroup slot: its lock, its number and where its cgroup directories are (one per
/// hierarchy; made by libcontainer on the slot's first use, kept after), emptied of anything a
/// dead helper left there.
fn acquire_slot(state_dir: &Path) -> Result<(File, usize, Vec<PathBuf>), String> {
    let dir = state_dir.join("slots");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let (file, slot) = first_free_lock(&dir, 65_536)?.ok_or("no free cgroup slot")?;
    // Listed without checking which exist yet: a path of a hierarchy libcontainer leaves out
    // (a named one) is only read from, and reading it fails harmlessly.
    let group = cgroup_group(state_dir);
    let cgroups: Vec<PathBuf> =
        cgroup_hierarchies().into_iter().map(|h| h.join(&group).join(slot_name(slot))).collect();
    for cgroup in membership_dirs(&cgroups) {
        empty_cgroup(cgroup);
    }
    Ok((file, slot, cgroups))
}

/// Which of a slot's cgroup directories to look in for processes left in it: the pids
/// hierarchy's alone where there is one, since libcontainer puts every container process in all
/// of the slot's hierarchies (only the helper's own proxy thread joins the cpu one alone, and it
/// dies with the helper); every directory otherwise.
fn membership_dirs(cgroups: &[PathBuf]) -> Vec<&PathBuf> {
    match cgroups.iter().find(|d| hierarchy_has(d, "pids") && d.is_dir()) {
        Some(pids) => vec![pids],
        None => cgroups.iter().collect(),
    }
}

/// Whether the cgroup directory `dir` is in the hierarchy of `controller` (`…/cpu,cpuacct/…`
/// counts for `cpu`); on a cgroup v2 host, every directory is.
fn hierarchy_has(dir: &Path, controller: &str) -> bool {
    static UNIFIED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *UNIFIED.get_or_init(|| Path::new("/sys/fs/cgroup/cgroup.controllers").exists())
        || names_v1_controller(dir, controller)
}

/// Whether `dir` is in the cgroup v1 hierarchy of `controller` (`…/cpu,cpuacct/…` counts for `cpu`).
fn names_v1_controller(dir: &Path, controller: &str) -> bool {
    dir.to_string_lossy().split('/').any(|part| part.split(',').any(|c| c == controller))
}

/// How often the memory cgroup among a slot's `cgroups` killed a process for want of memory (a
/// counter over the slot's life: compare before and after).
fn oom_kills(cgroups: &[PathBuf]) -> u64 {
    for dir in cgroups.iter().filter(|d| hierarchy_has(d, "memory")) {
        for file in ["memory.events", "memory.oom_control"] {
            if let Ok(text) = std::fs::read_to_string(dir.join(file)) {
                if let Some(n) = text.lines().find_map(|l| l.strip_prefix("oom_kill ")) {
                    return n.trim().parse().unwrap_or(0);
                }
            }
        }
    }
    0
}

/// Kills what is left in a sandbox's cgroup and removes it.
fn remove_cgroup(dir: &Path) {
    empty_cgroup(dir);
    let _ = std::fs::remove_dir(dir);
}

/// Kills every process in a sandbox's cgroup.
fn empty_cgroup(dir: &Path) {
    // This helper itself is listed while its proxy thread is charged to the slot's cpu cgroup.
    let own = std::process::id() as i32;
    for _ in 0..50 {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<i32> = procs.lines().filter_map(|l| l.trim().parse().ok()).filter(|p| *p != own).collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: kills a process of the sandbox's own cgroup.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The lock file every helper of a state directory holds shared for its life.
const ACTIVE_LOCK: &str = "active.lock";

fn active_lock(state_dir: &Path) -> Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join(ACTIVE_LOCK);
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| format!("opening {}: {e}", path.display()))
}

/// Removes what sandboxes of `state_dir` left behind when their helper died: containers (and
/// their processes), cgroups, tmpfs mounts and bundles. Refused while any helper of the
/// directory is alive (another server or worker using it, or `pond sandbox gc` run beside one):
/// its sandboxes are not garbage, and its cgroup holds the helper itself.
pub fn collect_garbage(state_dir: &Path) -> Result<usize, String> {
    collect_garbage_if_idle(state_dir)?.ok_or_else(|| {
        format!(
            "sandboxes of {} are running (a server or worker uses this directory); nothing was collected",
            state_dir.display()
        )
    })
}

/// [`collect_garbage`], or `None` (nothing touched) while a helper of the directory is alive.
pub fn collect_garbage_if_idle(state_dir: &Path) -> Result<Option<usize>, String> {
    if !state_dir.is_dir() {
        return Ok(Some(0));
    }
    check_state_dir_is_private(state_dir)?;
    let lock = active_lock(state_dir)?;
    if lock.try_lock().is_err() {
        return Ok(None);
    }
    let mut removed = 0;
    let bundles = state_dir.join("bundles");
    if let Ok(entries) = std::fs::read_dir(&bundles) {
        for entry in entries.flatten() {
            // The container first (it kills the processes and removes the cgroup), then the
            // bundle's tmpfs.
            if let Ok(states) = std::fs::read_dir(entry.path().join("state")) {
                for state in states.flatten() {
                    if let Ok(mut container) = Container::load(state.path()) {
                        let _ = container.delete(true);
                    }
                }
            }
            unmount(&entry.path());
            remove_bundle(&entry.path())?;
            removed += 1;
        }
    }
    for dir in cgroup_dirs(state_dir, None) {
        remove_cgroup(&dir);
        removed += 1;
    }
    // The state directory's own cgroup group, on every hierarchy (empty now; a parent stays
    // busy for a moment while the kernel finishes destroying its children).
    let mut groups: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|h| h.path().join(cgroup_group(state_dir)))
        .collect();
    groups.push(Path::new("/sys/fs/cgroup").join(cgroup_group(state_dir)));
    for group in groups.into_iter().filter(|g| g.is_dir()) {
        for _ in 0..40 {
            match std::fs::remove_dir(&group) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => std::thread::sleep(Duration::from_millis(5)),
                _ => break,
            }
        }
    }
    drop(lock);
    Ok(Some(removed))
}

/// How many warm cgroup slots `state_dir` keeps (one per sandbox that ran at the same time).
pub fn warm_slots(state_dir: &Path) -> usize {
    let dirs = cgroup_dirs(state_dir, None);
    let names: BTreeSet<_> =
        dirs.iter().filter_map(|d| d.file_name()).filter(|n| n.to_string_lossy().starts_with("slot-")).collect();
    names.len()
}

/// What is left of sandboxes in `state_dir`: containers, bundles, tmpfs mounts and cgroups
/// (for leak checks).
pub fn leftovers(state_dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    // A slot's bundle directory stays, empty and unmounted, between sandboxes.
    if let Ok(entries) = std::fs::read_dir(state_dir.join("bundles")) {
        let kept = |e: &std::fs::DirEntry| {
            e.file_name().to_string_lossy().starts_with("slot-")
                && std::fs::read_dir(e.path()).is_ok_and(|mut inside| inside.next().is_none())
        };
        found.extend(
            entries.flatten().filter(|e| !kept(e)).map(|e| format!("bundles/{}", e.file_name().to_string_lossy())),
        );
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let state = state_dir.to_string_lossy();
    found.extend(mounts.lines().filter(|l| l.contains(state.as_ref())).map(|l| format!("mount {l}")));
    // The warm cgroup slots stay (one per sandbox that ran at the same time); a slot with a
    // process in it, or any other cgroup, is a leftover.
    for dir in cgroup_dirs(state_dir, None) {
        let is_slot = dir.file_name().is_some_and(|n| n.to_string_lossy().starts_with("slot-"));
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if !is_slot || !procs.trim().is_empty() {
            found.push(format!("cgroup {} (processes: {})", dir.display(), procs.split_whitespace().count()));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_stay_in_the_rootfs_and_off_its_links() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&rootfs).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, rootfs.join("lnk")).unwrap();
        let dir_mount = |at: &str| json!({"destination": at, "type": "tmpfs", "source": "tmpfs"});
        let mounts = [
            dir_mount("/proc"),
            dir_mount("/a/../../escaped"),
            dir_mount("/lnk/made-outside"),
            dir_mount("/proc/inside-an-earlier-mount"),
            dir_mount("relative"),
        ];
        make_mount_points(&rootfs, &mounts).unwrap();
        assert!(rootfs.join("proc").is_dir());
        assert!(!dir.path().join("escaped").exists(), "a `..` destination made a directory outside");
        assert!(!outside.join("made-outside").exists(), "a destination through a link made one outside");
        assert!(!rootfs.join("proc/inside-an-earlier-mount").exists());
        assert!(!rootfs.join("relative").exists());
    }

    #[test]
    fn limits_take_defaults_and_refuse_above_the_ceiling() {
        let ceilings = Limits { memory_mib: 1024, ..Limits::CEILINGS };
        let none = SandboxLimits::default();
        let resolved = Limits::DEFAULTS.resolve(&none, &ceilings).unwrap();
        assert_eq!(resolved.memory_mib, 1024, "a default above the ceiling is lowered to it");
        assert_eq!(resolved.pids, Limits::DEFAULTS.pids);
        let asked = SandboxLimits { memory_mib: Some(512), cpus: Some(0.5), ..none };
        let resolved = Limits::DEFAULTS.resolve(&asked, &ceilings).unwrap();
        assert_eq!((resolved.memory_mib, resolved.cpus), (512, 0.5));
        let err = Limits::DEFAULTS.resolve(&SandboxLimits { memory_mib: Some(4096), ..none }, &ceilings).unwrap_err();
        assert_eq!(err.to_string(), "sandbox.limits.memory_mib: 4096 is above this host's ceiling of 1024");
        let err = Limits::DEFAULTS.resolve(&SandboxLimits { cpus: Some(64.0), ..none }, &ceilings).unwrap_err();
        assert!(err.to_string().starts_with("sandbox.limits.cpus: 64 is above"), "{err}");
    }
}
