//! A cgroup of its own for each stage attempt that runs on the host (profile `none`), so the end
//! of a stage (exit, cancel, timeout) kills every process it started, whatever session, process
//! group or environment the process made: an agent's tools started with `setsid`, or under
//! `env -i`, are still in the cgroup. A process leaves a cgroup only by writing to another one's
//! `cgroup.procs`, which a job's own uid cannot (a root stage could; that is not a boundary).
//!
//! cgroup v2 (`cgroup.kill`, else `cgroup.freeze`) or the v1 freezer hierarchy: frozen, every
//! member killed, thawed, until it is empty. Made only when this process can (root with the
//! cgroup filesystem mounted); otherwise stages fall back to the process group and the
//! environment mark. The attempts of one node sit under one parent named after its process-group
//! directory, so a node reaps its own leftovers at start and never another node's.

use std::ffi::CString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Under each hierarchy: the parent of every node's stage cgroups.
const PARENT: &str = "pond-stages";

/// One stage attempt's cgroup.
#[derive(Debug)]
pub struct StageCgroup {
    dir: PathBuf,
    v2: bool,
    procs: CString,
}

/// Where a node's stage cgroups go, and whether they are v2; `None` when there is no usable
/// hierarchy (not root, no cgroupfs).
fn node_parent(group_dir: &Path) -> Option<(PathBuf, bool)> {
    use std::hash::{Hash, Hasher};
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    group_dir.hash(&mut hasher);
    let node = format!("{:016x}", hasher.finish());
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return Some((root.join(PARENT).join(node), true));
    }
    let freezer = root.join("freezer");
    freezer.join("cgroup.procs").exists().then(|| (freezer.join(PARENT).join(node), false))
}

impl StageCgroup {
    /// A new cgroup `name` for a stage attempt of the node whose process groups are recorded in
    /// `group_dir`, or `None` when this process cannot make one.
    pub fn create(group_dir: &Path, name: &str) -> Option<StageCgroup> {
        let (parent, v2) = node_parent(group_dir)?;
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir).ok()?;
        let procs = CString::new(dir.join("cgroup.procs").into_os_string().into_encoded_bytes()).ok()?;
        Some(StageCgroup { dir, v2, procs })
    }

    /// Moves the calling process into the cgroup. For `pre_exec`: only async-signal-safe calls
    /// (open, write of the pid's digits, close), everything prepared before the fork.
    pub fn enter_from_child(&self) -> std::io::Result<()> {
        // SAFETY: getpid, open, write and close on a path prepared before the fork.
        unsafe {
            let fd = libc::open(self.procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut digits = [0u8; 20];
            let mut n = libc::getpid() as u64;
            let mut at = digits.len();
            loop {
                at -= 1;
                digits[at] = b'0' + (n % 10) as u8;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
            let len = digits.len() - at;
            let written = libc::write(fd, digits[at..].as_ptr().cast(), len);
            libc::close(fd);
            if written != len as isize {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Kills every process in the cgroup, until it is empty.
    pub fn kill_all(&self) {
        kill_all(&self.dir, self.v2);
    }
}

impl Drop for StageCgroup {
    fn drop(&mut self) {
        kill_all(&self.dir, self.v2);
        remove(&self.dir);
    }
}

fn pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn write(path: &Path, text: &str) -> bool {
    std::fs::OpenOptions::new().write(true).open(path).and_then(|mut f| f.write_all(text.as_bytes())).is_ok()
}

fn kill_all(dir: &Path, v2: bool) {
    if v2 && write(&dir.join("cgroup.kill"), "1") {
        for _ in 0..100 {
            if pids(dir).is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // Frozen first, so nothing forks between the listing and the signal; SIGKILL is delivered
    // to frozen tasks once they thaw.
    let (state, frozen, thawed) = if v2 { ("cgroup.freeze", "1", "0") } else { ("freezer.state", "FROZEN", "THAWED") };
    for _ in 0..50 {
        let members = pids(dir);
        if members.is_empty() {
            return;
        }
        let froze = write(&dir.join(state), frozen);
        for pid in members {
            // SAFETY: a signal to a member of this stage's own cgroup.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        if froze {
            write(&dir.join(state), thawed);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    tracing::warn!(cgroup = %dir.display(), "processes of an ended stage still run after 50 rounds of SIGKILL");
}

fn remove(dir: &Path) {
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => std::thread::sleep(Duration::from_millis(5)),
            _ => return,
        }
    }
}

/// Kills and removes the stage cgroups a previous process of this node (same `group_dir`) left
/// behind; returns how many held processes.
pub fn reap_stage_cgroups(group_dir: &Path) -> usize {
    let Some((parent, v2)) = node_parent(group_dir) else { return 0 };
    let mut busy = 0;
    for entry in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        if !pids(&dir).is_empty() {
            busy += 1;
        }
        kill_all(&dir, v2);
        remove(&dir);
    }
    busy
}
