//! The sandbox benchmark: create + start + exit of `/bin/true` in pond's OCI backend, beside
//! crun, runc and bubblewrap on the same machine in the same run, and the fork/exec floor.
//! Every runtime runs the same container where it can (the same root filesystem binds,
//! namespaces, seccomp filter and cgroup limits); bubblewrap has no cgroups.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::oci::{self, HelperSpec};

/// One runtime's timings.
#[derive(Debug)]
pub struct Timing {
    /// Runtime and version.
    pub name: String,
    /// Milliseconds per run, sorted.
    pub millis: Vec<f64>,
    /// Why it did not run, if it did not.
    pub skipped: Option<String>,
}

impl Timing {
    fn percentile(&self, p: f64) -> f64 {
        if self.millis.is_empty() {
            return f64::NAN;
        }
        let i = ((self.millis.len() as f64 - 1.0) * p).round() as usize;
        self.millis[i]
    }
}

/// The benchmark's result.
#[derive(Debug)]
pub struct Report {
    /// Runs per runtime.
    pub runs: usize,
    /// Timings, the floor first.
    pub timings: Vec<Timing>,
    /// Leftovers in pond's state directory after all runs (containers, bundles, mounts, cgroups).
    pub leftovers: Vec<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "/bin/true: create + start + exit, {} runs each (ms)", self.runs)?;
        writeln!(f, "{:<52} {:>8} {:>8}", "runtime", "median", "p90")?;
        for t in &self.timings {
            match &t.skipped {
                Some(why) => writeln!(f, "{:<52} skipped: {why}", t.name)?,
                None => writeln!(f, "{:<52} {:>8.2} {:>8.2}", t.name, t.percentile(0.5), t.percentile(0.9))?,
            }
        }
        write!(f, "pond leftovers after {} sandboxes: {}", self.runs, self.leftovers.len())
    }
}

fn version(program: &str) -> Option<String> {
    let out = Command::new(program).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next()?.trim().to_string();
    Some(first)
}

/// One runtime's way to run the container once (its argument: the run's number).
type Once<'a> = Box<dyn FnMut(usize) -> Result<(), String> + 'a>;

/// Times `runs` runs of each runtime, interleaved (run i of every runtime, then run i + 1, each
/// round in a random order), so that the machine's drift over the minute the benchmark takes
/// falls on all of them alike.
/// One unmeasured run of each first warms the page cache; a runtime that fails is skipped.
fn time_interleaved(runs: usize, mut runtimes: Vec<(String, Once<'_>)>) -> Vec<Timing> {
    let mut timings: Vec<Timing> = Vec::new();
    for (name, once) in &mut runtimes {
        let skipped = once(usize::MAX).err();
        timings.push(Timing { name: name.clone(), millis: Vec::with_capacity(runs), skipped });
    }
    // Each round runs the runtimes in a fresh random order. What ran just before matters: the
    // first cgroup move after a quiet spell waits for an RCU grace period (5-20 ms here), so a
    // runtime that always followed another's cgroup work would always start warm, and one that
    // always followed a runtime without cgroups would always start cold.
    let mut order: Vec<usize> = (0..runtimes.len()).collect();
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9e37_79b9_7f4a_7c15)
        | 1;
    for i in 0..runs {
        shuffle(&mut order, &mut seed);
        for &j in &order {
            let (once, timing) = (&mut runtimes[j].1, &mut timings[j]);
            if timing.skipped.is_some() {
                continue;
            }
            let start = Instant::now();
            match once(i) {
                Ok(()) => timing.millis.push(start.elapsed().as_secs_f64() * 1000.0),
                Err(e) => {
                    timing.millis.clear();
                    timing.skipped = Some(format!("run {i}: {e}"));
                }
            }
        }
    }
    for timing in &mut timings {
        timing.millis.sort_by(f64::total_cmp);
    }
    timings
}

/// Fisher-Yates with xorshift64: the order needs no more randomness than that.
fn shuffle(items: &mut [usize], state: &mut u64) {
    for i in (1..items.len()).rev() {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        items.swap(i, (*state % (i as u64 + 1)) as usize);
    }
}

fn status(mut cmd: Command) -> Result<(), String> {
    let out =
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).output().map_err(|e| e.to_string())?;
    if out.status.success() {
        // The helper's phase marks (`POND_SANDBOX_TRACE`), passed on for tuning.
        if std::env::var_os("POND_SANDBOX_TRACE").is_some() && !out.stderr.is_empty() {
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    } else {
        Err(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Runs the benchmark in `work` (a scratch directory) with `pond_exe` as the helper. Must be
/// called from a single-threaded process: it moves itself into a private mount namespace
/// without the cgroup2 `unified` mount, which crun refuses on hybrid hosts.
pub fn run(pond_exe: &Path, work: &Path, runs: usize) -> Result<Report, String> {
    std::fs::create_dir_all(work).map_err(|e| format!("creating {}: {e}", work.display()))?;
    private_mounts_without_unified();
    let mut runtimes: Vec<(String, Once<'_>)> = Vec::new();
    runtimes.push(("fork/exec floor".into(), Box::new(|_| status(Command::new("/bin/true")))));

    let state = work.join("pond-state");
    let scratch = work.join("pond-scratch");
    std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    // The helper takes its state directory's activity lock: the directory exists before it
    // starts, as `OciBackend::new` makes it for a server or worker.
    std::fs::create_dir_all(&state).map_err(|e| format!("creating {}: {e}", state.display()))?;
    oci::collect_garbage(&state)?;
    let helper = oci::helper_command(pond_exe);
    let helper_name = Path::new(&helper[0]).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (pond_state, pond_scratch) = (state.clone(), scratch.clone());
    runtimes.push((
        format!("pond oci ({helper_name} + libcontainer 0.7)"),
        Box::new(move |i| {
            let report = pond_scratch.join("report.json");
            let spec = HelperSpec::plain(&format!("bench-{i}"), &pond_state, &["/bin/true"], report.clone());
            let path = pond_scratch.join("spec.json");
            std::fs::write(&path, serde_json::to_vec(&spec).unwrap_or_default()).map_err(|e| e.to_string())?;
            let mut cmd = Command::new(&helper[0]);
            cmd.args(&helper[1..]).arg(&path);
            status(cmd)?;
            let report = std::fs::read_to_string(&report).map_err(|e| e.to_string())?;
            if !report.contains("\"exit_code\":0") {
                return Err(report);
            }
            Ok(())
        }),
    ));

    let bundle = work.join("bundle");
    oci::comparison_bundle(&bundle, &["/bin/true"])?;
    for runtime in ["crun", "runc"] {
        let Some(v) = version(runtime) else {
            runtimes.push((runtime.into(), Box::new(|_| Err("not installed".into()))));
            continue;
        };
        let root = work.join(format!("{runtime}-root"));
        let bundle = bundle.clone();
        runtimes.push((
            v,
            Box::new(move |i| {
                let mut cmd = Command::new(runtime);
                cmd.arg("--root").arg(&root).args(["run", "--bundle"]).arg(&bundle).arg(format!("bench-{i}"));
                status(cmd)
            }),
        ));
    }
    match version("bwrap") {
        None => runtimes.push(("bwrap".into(), Box::new(|_| Err("not installed".into())))),
        Some(v) => {
            let mut args: Vec<String> = Vec::new();
            for dir in ["/usr", "/etc", "/lib", "/lib64", "/bin", "/sbin"] {
                match std::fs::symlink_metadata(dir) {
                    Ok(m) if m.file_type().is_symlink() => {
                        let target = std::fs::read_link(dir).unwrap_or_else(|_| PathBuf::from(dir));
                        args.extend(["--symlink".into(), target.display().to_string(), dir.into()]);
                    }
                    Ok(_) => args.extend(["--ro-bind".into(), dir.into(), dir.into()]),
                    Err(_) => {}
                }
            }
            args.extend(
                [
                    "--proc",
                    "/proc",
                    "--dev",
                    "/dev",
                    "--tmpfs",
                    "/tmp",
                    "--unshare-all",
                    "--die-with-parent",
                    "--cap-drop",
                    "ALL",
                ]
                .map(String::from),
            );
            args.push("/bin/true".into());
            runtimes.push((
                format!("{v} (no cgroups)"),
                Box::new(move |_| {
                    let mut cmd = Command::new("bwrap");
                    cmd.args(&args);
                    status(cmd)
                }),
            ));
        }
    }
    let timings = time_interleaved(runs, runtimes);
    let leftovers = oci::leftovers(&state);
    Ok(Report { runs, timings, leftovers })
}

fn private_mounts_without_unified() {
    // SAFETY: unshare and mount calls on this (single-threaded) process only.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return;
        }
        libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        );
        libc::umount2(c"/sys/fs/cgroup/unified".as_ptr(), libc::MNT_DETACH);
    }
}
