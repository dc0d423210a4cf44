//! The `shell` executor: runs `argv` directly (no implicit shell) in the run's checkout.
//!
//! - The environment is built, not inherited: an operator allowlist of host variables
//!   (`PATH`, `LANG`, … by default), the stage's `env`, and `POND_*` variables.
//! - stdout and stderr stream into the run's log line by line as they are produced.
//! - Files written under `$POND_OUTPUT_DIR` become artifacts (relative path = name).
//! - The child leads its own process group; stop (cancel, timeout, lost lease) sends SIGTERM
//!   to the whole group, then SIGKILL after a grace period, so grandchildren die too.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pond_core::definition::{ExecutorSpec, SandboxProfile};
use pond_core::exec::OutputLine;
use pond_core::exec::{ExecContext, Executor, OutputSink};
use pond_core::run::StageOutcome;
use pond_core::sandbox::{CommandSpec, PathAccess, PathGrant, SandboxBackend, SandboxReport, SandboxRequest};
use pond_core::source::SourceSpec;
use pond_core::store::LogStream;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;

/// Longest log record; longer lines are cut into pieces marked `continued`.
pub use pond_core::exec::MAX_LINE_BYTES;
/// Most artifacts one stage may write.
pub const MAX_ARTIFACTS: usize = 1000;

/// Settings of the shell executor.
#[derive(Clone, Debug)]
pub struct ShellConfig {
    /// Host variables passed through to stages.
    pub env_allowlist: Vec<String>,
    /// Wait between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Where per-attempt scratch directories (output dir, home) are made.
    pub scratch_root: PathBuf,
    /// Largest artifact stored.
    pub max_artifact_bytes: u64,
    /// Where the process groups of running stages are recorded, so that the next start can
    /// kill the ones a crashed process left behind (see [`reap_orphans`]).
    pub group_dir: Option<PathBuf>,
    /// For a pool worker: its key directory, covered from every `none`-profile stage (see
    /// [`crate::cover`]). Confined profiles never see it anyway.
    #[cfg(target_os = "linux")]
    pub key_cover: Option<Arc<crate::cover::KeyCover>>,
}

impl ShellConfig {
    /// Defaults with scratch space under `scratch_root`.
    pub fn new(scratch_root: PathBuf) -> Self {
        ShellConfig {
            env_allowlist: ["PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM"].map(String::from).to_vec(),
            kill_grace: Duration::from_secs(10),
            scratch_root,
            max_artifact_bytes: 256 * 1024 * 1024,
            group_dir: None,
            #[cfg(target_os = "linux")]
            key_cover: None,
        }
    }
}

/// Runs `shell` stages through a sandbox backend.
pub struct ShellExecutor {
    config: ShellConfig,
    sandbox: Arc<dyn SandboxBackend>,
}

impl ShellExecutor {
    /// A shell executor wrapping commands with `sandbox`.
    pub fn new(config: ShellConfig, sandbox: Arc<dyn SandboxBackend>) -> Self {
        ShellExecutor { config, sandbox }
    }
}

/// What a caller (the swarm executor) gives a shell stage beyond its spec.
#[derive(Clone, Debug, Default)]
pub struct Grants {
    /// Host paths the command needs (the agent CLI, its home).
    pub paths: Vec<PathGrant>,
    /// Host loopback ports it may reach (the model broker).
    pub loopback_ports: Vec<u16>,
}

/// The host of a git URL (`https://user@host:port/x` → `host:port`), for the allowlist.
fn git_remote_host(url: &str) -> Option<String> {
    // The one parser submit and fetch use, so the egress rule names the host git connects to.
    let (host, port) = pond_core::source::git_remote(url).ok()?;
    let default = if url.starts_with("http://") { 80 } else { 443 };
    Some(if port == default { host } else { format!("{host}:{port}") })
}

/// Kills the process group when dropped, so an abandoned attempt (its task dropped, its node
/// shutting down) leaves no processes behind. With a record file, the group is also known to
/// the next start of this node if this process dies without running any destructor.
struct GroupGuard(Option<i32>, Option<PathBuf>);

/// The start time of process `pid` in clock ticks since boot (field 22 of `/proc/<pid>/stat`),
/// which tells a live process from a later one that reused its pid.
fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Whether any process is in process group `pgid` (field 5 of `/proc/<pid>/stat`).
fn group_has_members(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else { return false };
    entries.flatten().any(|e| {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { return false };
        let Some(close) = stat.rfind(')') else { return false };
        stat[close + 2..].split_whitespace().nth(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid)
    })
}

/// Kills the process groups recorded in `dir` by an earlier process that died while stages
/// ran (kill -9, OOM, power loss of the container), then clears the records. Returns how many
/// groups were still alive.
pub fn reap_orphans(dir: &Path) -> std::io::Result<usize> {
    let mut killed = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let recorded = std::fs::read_to_string(entry.path()).unwrap_or_default();
            if let (Ok(pgid), Ok(ticks)) = (name.parse::<i32>(), recorded.trim().parse::<u64>()) {
                // The leader alive with its recorded start time is our group. A leader that is
                // gone while members remain is ours too: Linux does not hand out a pid while a
                // process group still uses it. A leader with another start time is a reused pid.
                let ours = match start_ticks(pgid) {
                    Some(t) => t == ticks,
                    None => group_has_members(pgid),
                };
                if pgid > 1 && ours {
                    // SAFETY: killpg only sends a signal to the recorded group.
                    unsafe {
                        libc::killpg(pgid, libc::SIGKILL);
                    }
                    killed += 1;
                }
            }
            let _ = std::fs::remove_file(entry.path());
        }
    }
    #[cfg(target_os = "linux")]
    {
        killed += crate::stage_cgroup::reap_stage_cgroups(dir);
    }
    std::fs::create_dir_all(dir)?;
    Ok(killed)
}

impl GroupGuard {
    fn new(pgid: Option<i32>, dir: Option<&Path>) -> Self {
        let record = match (pgid, dir) {
            (Some(pgid), Some(dir)) => {
                let path = dir.join(pgid.to_string());
                let ticks = start_ticks(pgid).map(|t| t.to_string()).unwrap_or_default();
                std::fs::write(&path, ticks).ok().map(|()| path)
            }
            _ => None,
        };
        GroupGuard(pgid, record)
    }

    fn signal(&self, sig: i32) {
        if let Some(pgid) = self.0 {
            // SAFETY: killpg only sends a signal; a stale pgid at worst yields ESRCH.
            unsafe {
                libc::killpg(pgid, sig);
            }
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(path) = &self.1 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Reads a pipe into lines, bytes exactly as written (the newline dropped). A line longer than
/// [`MAX_LINE_BYTES`] goes out in pieces of that size as it is read, so no line is ever
/// buffered whole, whatever the process writes.
/// The variable that marks every process of one stage attempt.
const STAGE_MARK: &str = "POND_STAGE_MARK";

fn random_mark() -> String {
    use rand::Rng;
    format!("{:016x}", rand::thread_rng().gen::<u64>())
}

/// Kills every process whose environment carries `mark` (`POND_STAGE_MARK=<mark>`), until none
/// is left: the tools an agent started with `setsid` are out of the stage's process group but
/// not out of its environment. A process that rewrote its own environment escapes this; the
/// confined profiles kill a whole pid namespace instead.
fn kill_marked(mark: &str) {
    let needle = format!("{STAGE_MARK}={mark}");
    let own = std::process::id() as i32;
    let carries_mark = |pid: i32| {
        std::fs::read(format!("/proc/{pid}/environ"))
            .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == needle.as_bytes()))
    };
    for _ in 0..50 {
        let Ok(entries) = std::fs::read_dir("/proc") else { return };
        let marked: Vec<i32> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
            .filter(|&pid| pid != own && carries_mark(pid))
            .collect();
        if marked.is_empty() {
            return;
        }
        for pid in marked {
            // The pid is pinned by a descriptor, then checked again: if it was reused between
            // the scan and now, the process we would signal is not the one we saw, and is left.
            // SAFETY: pidfd_open of a pid; the descriptor is owned below.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
            if fd < 0 {
                continue;
            }
            // SAFETY: we own the new descriptor.
            let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            if carries_mark(pid) {
                // SAFETY: signals exactly the process the descriptor names.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        std::os::fd::AsRawFd::as_raw_fd(&fd),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::warn!(mark, "processes of an ended stage still run after 50 rounds of SIGKILL (stuck in the kernel?)");
}

async fn pump<R: AsyncRead + Unpin>(reader: R, stream: LogStream, tx: mpsc::Sender<OutputLine>) {
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let mut line: Vec<u8> = Vec::new();
    // Whether the last piece sent said "continued": the stream must not end on such a piece,
    // or a reader would wait for the rest of a line that never comes.
    let mut open_piece = false;
    loop {
        let (used, ended) = match reader.fill_buf().await {
            Ok([]) | Err(_) => {
                if !line.is_empty() || open_piece {
                    let _ = tx.send(OutputLine { stream, bytes: line, continued: false }).await;
                }
                return;
            }
            Ok(buf) => {
                let room = MAX_LINE_BYTES - line.len();
                match buf.iter().take(room).position(|&b| b == b'\n') {
                    Some(i) => {
                        line.extend_from_slice(&buf[..i]);
                        (i + 1, Some(false))
                    }
                    None => {
                        let n = buf.len().min(room);
                        line.extend_from_slice(&buf[..n]);
                        (n, (line.len() == MAX_LINE_BYTES).then_some(true))
                    }
                }
            }
        };
        reader.consume(used);
        if let Some(continued) = ended {
            let bytes = std::mem::take(&mut line);
            open_piece = continued;
            if tx.send(OutputLine { stream, bytes, continued }).await.is_err() {
                return;
            }
        }
    }
}

/// Forwards lines to the sink in batches: whatever arrived within 50 ms goes in one write.
async fn forward(mut rx: mpsc::Receiver<OutputLine>, output: &dyn OutputSink) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
        while batch.len() < 512 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(line)) => batch.push(line),
                Ok(None) | Err(_) => break,
            }
        }
        output.lines(batch).await;
    }
}

fn exit_text(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        (None, None) => "no exit status".into(),
    }
}

fn collect_outputs(dir: &Path, max_bytes: u64) -> Result<Vec<(String, PathBuf)>, String> {
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(dir).follow_links(false).sort_by_file_name() {
        let entry = entry.map_err(|e| e.to_string())?;
        if !entry.file_type().is_file() {
            continue;
        }
        let name = entry.path().strip_prefix(dir).unwrap_or(entry.path()).to_string_lossy().replace('\\', "/");
        let size = entry.metadata().map_err(|e| e.to_string())?.len();
        if size > max_bytes {
            return Err(format!("artifact `{name}` is {size} bytes; the limit is {max_bytes}"));
        }
        files.push((name, entry.into_path()));
        if files.len() > MAX_ARTIFACTS {
            return Err(format!("more than {MAX_ARTIFACTS} files in $POND_OUTPUT_DIR"));
        }
    }
    Ok(files)
}

#[async_trait]
impl Executor for ShellExecutor {
    fn kind(&self) -> &'static str {
        "shell"
    }

    async fn execute(&self, ctx: ExecContext<'_>) -> StageOutcome {
        self.run(ctx, Grants::default()).await
    }
}

impl ShellExecutor {
    /// Runs a shell stage with `grants` on top of what its spec asks for.
    pub async fn run(&self, ctx: ExecContext<'_>, grants: Grants) -> StageOutcome {
        let ExecutorSpec::Shell(spec) = &ctx.stage.executor else {
            return StageOutcome::Failed { error: "not a shell stage".into(), exit_code: None };
        };
        let fail = |error: String| StageOutcome::Failed { error, exit_code: None };
        let scratch = match tempfile::Builder::new()
            .prefix(&format!("{}-{}-{}-", ctx.run.id, ctx.stage.key, ctx.attempt))
            .tempdir_in(&self.config.scratch_root)
        {
            Ok(d) => d,
            Err(e) => return fail(format!("creating scratch dir in {}: {e}", self.config.scratch_root.display())),
        };
        let output_dir = scratch.path().join("output");
        let home = scratch.path().join("home");
        for d in [&output_dir, &home] {
            if let Err(e) = std::fs::create_dir_all(d) {
                return fail(format!("creating {}: {e}", d.display()));
            }
        }
        let mut env: Vec<(String, String)> = Vec::new();
        for name in &self.config.env_allowlist {
            if let Ok(value) = std::env::var(name) {
                env.push((name.clone(), value));
            }
        }
        env.push(("HOME".into(), home.to_string_lossy().into_owned()));
        for (k, v) in &spec.env {
            env.retain(|(name, _)| name != k);
            env.push((k.clone(), v.clone()));
        }
        env.push(("POND_RUN_ID".into(), ctx.run.id.to_string()));
        env.push(("POND_PROJECT_ID".into(), ctx.run.project_id.clone()));
        env.push(("POND_STAGE".into(), ctx.stage.key.clone()));
        env.push(("POND_ATTEMPT".into(), ctx.attempt.to_string()));
        env.push(("POND_OUTPUT_DIR".into(), output_dir.to_string_lossy().into_owned()));
        // Every process of this attempt inherits the mark, whatever session or group it makes,
        // so none outlives the stage (see `kill_marked`).
        let mark = random_mark();
        env.push((STAGE_MARK.into(), mark.clone()));
        for (label, path) in &ctx.workspace.sources {
            let var = format!("POND_SOURCE_{}", label.to_ascii_uppercase().replace(['-', '.'], "_"));
            env.push((var, path.to_string_lossy().into_owned()));
        }
        let mut paths = vec![PathGrant { path: ctx.workspace.cwd.clone(), access: PathAccess::Checkout }];
        for (_, source) in &ctx.workspace.sources {
            if !paths.iter().any(|g| source.starts_with(&g.path)) {
                paths.push(PathGrant { path: source.clone(), access: PathAccess::Checkout });
            }
        }
        for dir in [&output_dir, &home] {
            paths.push(PathGrant { path: dir.clone(), access: PathAccess::Writable });
        }
        paths.extend(grants.paths);
        let request = SandboxRequest {
            profile: spec.sandbox.as_ref().map(|s| s.profile).unwrap_or(SandboxProfile::None),
            limits: spec.sandbox.as_ref().map(|s| s.limits).unwrap_or_default(),
            allow_hosts: ctx
                .run
                .sources
                .iter()
                .filter_map(|s| match &s.spec {
                    SourceSpec::GitHttps { url, .. } => git_remote_host(url),
                    _ => None,
                })
                .collect(),
            loopback_ports: grants.loopback_ports,
            scratch: scratch.path().to_path_buf(),
        };
        let command = CommandSpec { argv: spec.argv.clone(), env, cwd: ctx.workspace.cwd.clone(), paths };
        let (command, report) = match self.sandbox.wrap(&request, command) {
            Ok(w) => (w.command, w.report),
            Err(e) => return fail(e.to_string()),
        };
        // Stdin: /dev/null, or the file the stage reads (an agent's prompt). Opened here, by the
        // host process: a sandboxed command gets it through its helper without a path grant.
        let stdin = match &spec.stdin_file {
            Some(path) => match std::fs::File::open(path) {
                Ok(file) => Stdio::from(file),
                Err(e) => return fail(format!("opening the stage's stdin {}: {e}", path.display())),
            },
            None => Stdio::null(),
        };
        let mut cmd = tokio::process::Command::new(&command.argv[0]);
        cmd.args(&command.argv[1..])
            .env_clear()
            .envs(command.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&command.cwd)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        // The worker's keys are covered from a host (`none`) process; a wrapped (confined)
        // command is the sandbox helper, which shows the stage nothing of the host anyway.
        #[cfg(target_os = "linux")]
        let cover = match (&self.config.key_cover, report.is_none()) {
            (Some(cover), true) => {
                // A root worker's job runs as a uid of its own: its directories become that uid's.
                // (Everything the stage may write or check out in the worker's directories: its
                // scratch, checkout, sources and the writable grants, e.g. an agent's home.)
                let mut theirs = vec![scratch.path().to_path_buf()];
                theirs.extend(
                    command
                        .paths
                        .iter()
                        .filter(|g| g.access != PathAccess::ReadOnly && cover.shows(&g.path))
                        .map(|g| g.path.clone()),
                );
                for dir in &theirs {
                    if let Err(e) = cover.hand_over(dir) {
                        return fail(format!("handing {} to the job's user: {e}", dir.display()));
                    }
                }
                match std::ffi::CString::new(command.cwd.as_os_str().as_encoded_bytes()) {
                    Ok(cwd) => Some((cover.clone(), cwd)),
                    Err(_) => return fail(format!("the working directory {} holds a NUL", command.cwd.display())),
                }
            }
            _ => None,
        };
        // A host process gets a cgroup of its own (when this node may make one), so the stage's
        // end kills whatever it started, in any session or environment. (A wrapped command is the
        // sandbox helper, whose container has its own cgroup and dies with it.)
        #[cfg(target_os = "linux")]
        let cgroup = match (&self.config.group_dir, report.is_none()) {
            (Some(groups), true) => crate::stage_cgroup::StageCgroup::create(groups, &mark).map(std::sync::Arc::new),
            _ => None,
        };
        #[cfg(target_os = "linux")]
        let child_cgroup = cgroup.clone();
        // SAFETY: prctl, the cgroup's and the cover's calls are async-signal-safe system calls on
        // the child being set up, with everything they need prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                // If this node dies (kill -9, OOM) the stage's process dies with it instead of
                // finishing work that another node will redo.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                // Into the stage's cgroup while still root (the cover may drop to the job's uid).
                #[cfg(target_os = "linux")]
                if let Some(cgroup) = &child_cgroup {
                    cgroup.enter_from_child()?;
                }
                #[cfg(target_os = "linux")]
                if let Some((cover, cwd)) = &cover {
                    cover.enter(cwd)?;
                }
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return fail(format!("starting `{}`: {e}", command.argv[0])),
        };
        let group = GroupGuard::new(child.id().map(|pid| pid as i32), self.config.group_dir.as_deref());
        let (tx, rx) = mpsc::channel(1024);
        let pumps = [
            child.stdout.take().map(|out| tokio::spawn(pump(out, LogStream::Stdout, tx.clone()))),
            child.stderr.take().map(|err| tokio::spawn(pump(err, LogStream::Stderr, tx.clone()))),
        ];
        drop(tx);
        let forwarding = forward(rx, ctx.output);
        let waiting = async {
            let status = tokio::select! {
                status = child.wait() => status,
                _ = ctx.stop.stopped() => {
                    group.signal(libc::SIGTERM);
                    match tokio::time::timeout(self.config.kill_grace, child.wait()).await {
                        Ok(status) => status,
                        Err(_) => {
                            group.signal(libc::SIGKILL);
                            child.wait().await
                        }
                    }
                }
            };
            // Grandchildren may still hold the pipes open; the group dies with the leader, and so
            // does whatever left the group (a tool an agent started in a session of its own):
            // every process that carries this attempt's mark.
            group.signal(libc::SIGKILL);
            let mark = mark.clone();
            #[cfg(target_os = "linux")]
            let cgroup = cgroup.clone();
            let _ = tokio::task::spawn_blocking(move || {
                #[cfg(target_os = "linux")]
                if let Some(cgroup) = &cgroup {
                    cgroup.kill_all();
                }
                kill_marked(&mark)
            })
            .await;
            status
        };
        let (status, ()) = tokio::join!(waiting, forwarding);
        for p in pumps.into_iter().flatten() {
            let _ = p.await;
        }
        let status = match status {
            Ok(s) => s,
            Err(e) => return fail(format!("waiting for the process: {e}")),
        };
        if ctx.stop.reason().is_some() {
            return StageOutcome::Cancelled;
        }
        // Output files are kept even when the command failed: they often explain why.
        let outputs = match collect_outputs(&output_dir, self.config.max_artifact_bytes) {
            Ok(o) => o,
            Err(e) => return fail(e),
        };
        for (name, path) in outputs {
            let stored = match tokio::fs::read(&path).await {
                Ok(data) => ctx.output.artifact(&name, data).await,
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = stored {
                return fail(format!("storing artifact `{name}`: {e}"));
            }
        }
        if let Some(report) = report {
            // The backend's word on how the command ended; without it the sandbox failed.
            let report: SandboxReport = match std::fs::read(&report).map(|b| serde_json::from_slice(&b)) {
                Ok(Ok(r)) => r,
                _ => {
                    metrics::counter!("pond_sandboxes_total", "outcome" => "sandbox_error").increment(1);
                    return fail(format!("the sandbox ended without a report ({})", exit_text(status)));
                }
            };
            let outcome = match (&report.error, report.oom_killed, report.timed_out) {
                (Some(_), _, _) => "sandbox_error",
                (None, true, _) => "oom_killed",
                (None, false, true) => "timed_out",
                _ => "exited",
            };
            metrics::counter!("pond_sandboxes_total", "outcome" => outcome).increment(1);
            if report.egress_refused > 0 {
                metrics::counter!("pond_sandbox_egress_refusals_total").increment(report.egress_refused);
            }
            return match report.failure() {
                None => StageOutcome::Succeeded,
                Some(error) => StageOutcome::Failed { error, exit_code: report.exit_code },
            };
        }
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(0), _) => StageOutcome::Succeeded,
            (Some(code), _) => {
                StageOutcome::Failed { error: format!("exited with code {code}"), exit_code: Some(code) }
            }
            (None, Some(sig)) => StageOutcome::Failed { error: format!("killed by signal {sig}"), exit_code: None },
            (None, None) => fail("ended without an exit status".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_git_remote_host_is_what_the_egress_allowlist_gets() {
        assert_eq!(super::git_remote_host("https://github.com/acme/app.git").as_deref(), Some("github.com"));
        assert_eq!(super::git_remote_host("https://Git.Internal:8443/x").as_deref(), Some("git.internal:8443"));
        assert_eq!(super::git_remote_host("https://github.com:443/x").as_deref(), Some("github.com"));
        // What submit refuses gets no egress rule either.
        assert_eq!(super::git_remote_host("https://user:pw@git.internal:8443/x"), None);
        assert_eq!(super::git_remote_host("not a url"), None);
    }

    /// What a reader of the pieces sees for output of `bytes`: (length, continued) per piece.
    async fn pieces(bytes: Vec<u8>) -> Vec<(usize, bool)> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        super::pump(std::io::Cursor::new(bytes), pond_core::store::LogStream::Stdout, tx).await;
        let mut seen = Vec::new();
        while let Some(piece) = rx.recv().await {
            seen.push((piece.bytes.len(), piece.continued));
        }
        seen
    }

    #[tokio::test]
    async fn output_never_ends_on_a_piece_that_says_more_follows() {
        let max = super::MAX_LINE_BYTES;
        // Exactly one piece's worth, no newline: the line is closed by an empty last piece.
        assert_eq!(pieces(vec![b'x'; max]).await, vec![(max, true), (0, false)]);
        assert_eq!(pieces(vec![b'x'; 2 * max]).await, vec![(max, true), (max, true), (0, false)]);
        // With its newline, the same.
        let mut line = vec![b'x'; max];
        line.push(b'\n');
        assert_eq!(pieces(line).await, vec![(max, true), (0, false)]);
        // A short last line without newline is one closed piece; nothing at all is nothing.
        assert_eq!(pieces(b"a\nbc".to_vec()).await, vec![(1, false), (2, false)]);
        assert_eq!(pieces(Vec::new()).await, vec![]);
    }
}
