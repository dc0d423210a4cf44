//! What keeps a pool worker's secrets from its `none`-profile jobs. Such a job runs on the host
//! with the worker's user, next to the worker's key directory (its token, sealing and signing
//! keys). Before the job's program starts, its process enters a mount namespace of its own in
//! which the key directory is covered by an empty tmpfs, with only the job's own directories
//! (`keep`) mounted back. It cannot uncover it:
//!
//! - a worker that is not root: the namespace is made in a user namespace mapping the worker's
//!   uid to itself; the program then runs under that non-zero uid, so it has no capability left
//!   to unmount with, and the worker is not dumpable ([`make_undumpable`]), so the job cannot
//!   read the worker's memory, environment or descriptors through `/proc` or ptrace.
//! - a root worker: the job runs as the worker's own unprivileged uid (one per worker,
//!   allocated by the caller), with no capabilities and no supplementary groups; the job's
//!   directories are handed to that uid. Root-owned files (other workers' keys on the host)
//!   stay unreadable, other processes' `/proc` entries are out of reach, and since the key
//!   directory often sits below directories only root may enter (`/root`, a private
//!   temporary directory), the cover is laid on the highest such ancestor, with the path down
//!   to the job's directories made again inside it.
//!
//! Every call in [`KeyCover::enter`] runs in the forked child before `execve`: only system
//! calls, on strings prepared beforehand.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A key directory to cover, and the job directories inside it to show through.
#[derive(Debug)]
pub struct KeyCover {
    /// Where the tmpfs goes: the key directory, or its highest ancestor the job's user could
    /// not enter.
    cover: CString,
    /// Directories to make inside the tmpfs, outermost first, down to the key directory.
    chain: Vec<CString>,
    /// The job directories shown through (direct children of the key directory).
    keep: Vec<CString>,
    keep_paths: Vec<PathBuf>,
    /// For a root worker: the uid (and gid) its jobs run as.
    job_uid: Option<u32>,
    uid_map: CString,
    gid_map: CString,
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::other(format!("{} holds a NUL", path.display())))
}

fn c_text(text: &str) -> CString {
    CString::new(text).unwrap_or_default()
}

impl KeyCover {
    /// Covers the key directory `keys` (made absolute and resolved), showing the directories
    /// `keep`, each a direct child of it. A root worker must name the uid its jobs run as.
    pub fn new(keys: &Path, keep: &[PathBuf], job_uid: Option<u32>) -> io::Result<KeyCover> {
        let keys = std::fs::canonicalize(keys)?;
        if keep.len() > 8 {
            return Err(io::Error::other("at most 8 directories can be shown through a cover"));
        }
        let mut kept = Vec::new();
        let mut keep_paths = Vec::new();
        for dir in keep {
            let dir = std::fs::canonicalize(dir)?;
            if dir.parent() != Some(keys.as_path()) {
                return Err(io::Error::other(format!(
                    "{} is not directly inside {}: it cannot be shown through the cover",
                    dir.display(),
                    keys.display()
                )));
            }
            kept.push(c_path(&dir)?);
            keep_paths.push(dir);
        }
        // SAFETY: geteuid/getuid/getgid have no preconditions.
        let (euid, uid, gid) = unsafe { (libc::geteuid(), libc::getuid(), libc::getgid()) };
        let job_uid = match (euid, job_uid) {
            (0, None) => return Err(io::Error::other("a root worker's jobs need a uid of their own to run as")),
            (0, Some(0)) => return Err(io::Error::other("a root worker's jobs cannot run as root")),
            (0, some) => some,
            _ => None,
        };
        // A job of another uid cannot pass a directory that is not searchable by others: cover
        // the highest such ancestor instead, and make the path down again inside the tmpfs.
        let mut cover = keys.clone();
        if job_uid.is_some() {
            for ancestor in keys.ancestors().skip(1) {
                if ancestor == Path::new("/") {
                    break;
                }
                use std::os::unix::fs::PermissionsExt;
                if std::fs::metadata(ancestor)?.permissions().mode() & 0o001 == 0 {
                    cover = ancestor.to_path_buf();
                }
            }
        }
        let mut chain = Vec::new();
        let mut below = keys.as_path();
        while below != cover {
            chain.push(c_path(below)?);
            below = below.parent().unwrap_or(&cover);
        }
        chain.reverse();
        Ok(KeyCover {
            cover: c_path(&cover)?,
            chain,
            keep: kept,
            keep_paths,
            job_uid,
            uid_map: c_text(&format!("{uid} {uid} 1\n")),
            gid_map: c_text(&format!("{gid} {gid} 1\n")),
        })
    }

    /// The uid jobs run as, when it is not the worker's own.
    pub fn job_uid(&self) -> Option<u32> {
        self.job_uid
    }

    /// Whether `path` is inside one of the directories shown through the cover.
    pub fn shows(&self, path: &Path) -> bool {
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        self.keep_paths.iter().any(|k| path.starts_with(k) && path != *k)
    }

    /// Hands `dir` (recursively) and the directories between it and the kept directory it is
    /// in to the job's uid, so the job can work there. Nothing to do when the job keeps the
    /// worker's uid; refused for a path outside the kept directories.
    pub fn hand_over(&self, dir: &Path) -> io::Result<()> {
        let Some(uid) = self.job_uid else { return Ok(()) };
        let dir = std::fs::canonicalize(dir)?;
        let dir = dir.as_path();
        let Some(top) = self.keep_paths.iter().find(|k| dir.starts_with(k) && dir != k.as_path()) else {
            return Err(io::Error::other(format!("{} is not inside a job directory", dir.display())));
        };
        for ancestor in dir.ancestors().skip(1).take_while(|a| a != top) {
            std::os::unix::fs::lchown(ancestor, Some(uid), Some(uid))?;
        }
        let mut pending = vec![dir.to_path_buf()];
        while let Some(path) = pending.pop() {
            std::os::unix::fs::lchown(&path, Some(uid), Some(uid))?;
            if std::fs::symlink_metadata(&path)?.is_dir() {
                for entry in std::fs::read_dir(&path)? {
                    pending.push(entry?.path());
                }
            }
        }
        Ok(())
    }

    /// Enters the covered view, changes to `cwd` again through it (a working directory taken
    /// before the cover would still reach the covered tree by `..`), and gives up what could
    /// undo it. Call only in the forked child before `execve` (a `pre_exec` hook): the process
    /// must be single-threaded.
    ///
    /// # Safety
    /// Runs in a forked child; uses only async-signal-safe system calls.
    pub unsafe fn enter(&self, cwd: &std::ffi::CStr) -> io::Result<()> {
        let check = |rc: libc::c_int| if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) };
        let root = self.job_uid.is_some();
        if root {
            check(libc::unshare(libc::CLONE_NEWNS))?;
        } else {
            check(libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS))?;
            // The worker is not dumpable, and this child inherited that: its /proc files are
            // root's until `execve`, so the maps below could not be written. The child turns
            // dumpable for the microseconds before `execve` replaces its memory (a copy of the
            // worker's); only a process of the worker's user already running could race it.
            check(libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0))?;
            write_file(c"/proc/self/setgroups", c"deny")?;
            write_file(c"/proc/self/uid_map", &self.uid_map)?;
            write_file(c"/proc/self/gid_map", &self.gid_map)?;
        }
        // Nothing done here reaches the host's mount table.
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        // Handles on what is shown again, taken in this namespace before the cover hides it.
        let mut kept = [-1; 8];
        for (slot, dir) in kept.iter_mut().zip(&self.keep) {
            *slot = check(libc::open(dir.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC))?;
        }
        check(libc::mount(
            c"tmpfs".as_ptr(),
            self.cover.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            c"mode=0755,size=64k".as_ptr().cast(),
        ))?;
        for dir in &self.chain {
            check(libc::mkdir(dir.as_ptr(), 0o755))?;
        }
        for (fd, dir) in kept.iter().zip(&self.keep) {
            check(libc::mkdir(dir.as_ptr(), 0o755))?;
            bind_fd(*fd, dir)?;
        }
        if let Some(uid) = self.job_uid {
            // Leaving uid 0 for another clears every capability (no SECBIT_KEEP_CAPS); with
            // no_new_privileges below, no set-uid program gives one back.
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setresgid(uid, uid, uid))?;
            check(libc::setresuid(uid, uid, uid))?;
        }
        check(libc::chdir(cwd.as_ptr()))?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        Ok(())
    }
}

/// Writes `text` to `path` (a /proc file) with raw system calls.
unsafe fn write_file(path: &std::ffi::CStr, text: &std::ffi::CStr) -> io::Result<()> {
    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let bytes = text.to_bytes();
    let written = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
    let error = io::Error::last_os_error();
    libc::close(fd);
    if written != bytes.len() as isize {
        return Err(error);
    }
    Ok(())
}

/// Bind-mounts what `fd` (an `O_PATH` handle) names at `target`.
unsafe fn bind_fd(fd: libc::c_int, target: &std::ffi::CStr) -> io::Result<()> {
    // "/proc/self/fd/<fd>" built without allocating.
    let mut source = *b"/proc/self/fd/0000000000\0";
    let mut n = fd as u32;
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        source[14 + i] = digits[len - 1 - i];
    }
    source[14 + len] = 0;
    let rc = libc::mount(
        source.as_ptr().cast(),
        target.as_ptr(),
        std::ptr::null(),
        libc::MS_BIND | libc::MS_REC,
        std::ptr::null(),
    );
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes this process non-dumpable: a process of the same user (a job) can no longer read its
/// memory, environment or open files through `/proc`, nor ptrace it.
pub fn make_undumpable() {
    // SAFETY: prctl with constant arguments on this process only.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_directories_must_be_direct_children_of_the_cover() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("jobs/deep")).unwrap();
        assert!(KeyCover::new(dir.path(), &[dir.path().join("jobs")], Some(101_000)).is_ok());
        let deep = KeyCover::new(dir.path(), &[dir.path().join("jobs/deep")], Some(101_000)).unwrap_err();
        assert!(deep.to_string().contains("not directly inside"), "{deep}");
    }
}
