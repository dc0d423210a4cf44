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
//! - a root worker: the job stays uid 0 but loses every capability (bounding set emptied,
//!   securebits locked so `execve` cannot regain them): it cannot unmount, read another
//!   process's memory (`/proc/<pid>/mem`, `/proc/1/root`: the kernel refuses a caller whose
//!   capabilities are not a superset of the target's), load modules or read kernel memory.
//!   `/dev` is a fresh tmpfs holding only the harmless device nodes (no raw disks), and
//!   `/proc/sys` and `/sys` are read-only (no `core_pattern` or `uevent_helper` helper running
//!   with full privileges).
//!
//! Every call in [`KeyCover::enter`] runs in the forked child before `execve`: only system
//! calls, on strings prepared beforehand.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Device nodes a job on a root worker keeps (bound from the host's).
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// A key directory to cover, and the job directories inside it to show through.
#[derive(Debug)]
pub struct KeyCover {
    cover: CString,
    /// (the directory's path, the path it is mounted back at — the same, inside the cover).
    keep: Vec<CString>,
    root: bool,
    uid_map: CString,
    gid_map: CString,
    devices: Vec<(CString, CString)>,
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::other(format!("{} holds a NUL", path.display())))
}

fn c_text(text: &str) -> CString {
    CString::new(text).unwrap_or_default()
}

impl KeyCover {
    /// Covers `cover` (made absolute and resolved), showing the directories `keep`, each a
    /// direct child of `cover`.
    pub fn new(cover: &Path, keep: &[PathBuf]) -> io::Result<KeyCover> {
        let cover = std::fs::canonicalize(cover)?;
        if keep.len() > 8 {
            return Err(io::Error::other("at most 8 directories can be shown through a cover"));
        }
        let mut kept = Vec::new();
        for dir in keep {
            let dir = std::fs::canonicalize(dir)?;
            if dir.parent() != Some(cover.as_path()) {
                return Err(io::Error::other(format!(
                    "{} is not directly inside {}: it cannot be shown through the cover",
                    dir.display(),
                    cover.display()
                )));
            }
            kept.push(c_path(&dir)?);
        }
        // SAFETY: geteuid/getuid/getgid have no preconditions.
        let (euid, uid, gid) = unsafe { (libc::geteuid(), libc::getuid(), libc::getgid()) };
        Ok(KeyCover {
            cover: c_path(&cover)?,
            keep: kept,
            root: euid == 0,
            uid_map: c_text(&format!("{uid} {uid} 1\n")),
            gid_map: c_text(&format!("{gid} {gid} 1\n")),
            devices: DEVICES.iter().map(|d| (c_text(&format!("/dev/{d}")), c_text(&format!("/dev/{d}")))).collect(),
        })
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
        if self.root {
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
        let mut devices = [-1; DEVICES.len()];
        if self.root {
            for (slot, (host, _)) in devices.iter_mut().zip(&self.devices) {
                *slot = libc::open(host.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
            }
        }
        check(libc::mount(
            c"tmpfs".as_ptr(),
            self.cover.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            c"mode=0755,size=64k".as_ptr().cast(),
        ))?;
        for (fd, dir) in kept.iter().zip(&self.keep) {
            check(libc::mkdir(dir.as_ptr(), 0o755))?;
            bind_fd(*fd, dir)?;
        }
        if self.root {
            self.confine_root(&devices)?;
        }
        check(libc::chdir(cwd.as_ptr()))?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        Ok(())
    }

    /// For a job of a root worker: a /dev without disks, read-only kernel knobs, and no
    /// capabilities, ever again.
    unsafe fn confine_root(&self, devices: &[libc::c_int]) -> io::Result<()> {
        let check = |rc: libc::c_int| if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) };
        for knobs in [c"/proc/sys", c"/sys"] {
            check(libc::mount(
                knobs.as_ptr(),
                knobs.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
            check(libc::mount(std::ptr::null(), knobs.as_ptr(), std::ptr::null(), flags, std::ptr::null()))?;
        }
        // /dev/pts and /dev/shm are taken along; the device nodes are bound one by one.
        let pts = libc::open(c"/dev/pts".as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC);
        check(libc::mount(
            c"tmpfs".as_ptr(),
            c"/dev".as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            c"mode=0755,size=64k".as_ptr().cast(),
        ))?;
        for (fd, (_, node)) in devices.iter().zip(&self.devices) {
            if *fd < 0 {
                continue;
            }
            let made = libc::open(node.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o666);
            if made >= 0 {
                libc::close(made);
                bind_fd(*fd, node)?;
            }
        }
        if pts >= 0 && libc::mkdir(c"/dev/pts".as_ptr(), 0o755) == 0 {
            bind_fd(pts, c"/dev/pts")?;
        }
        if libc::mkdir(c"/dev/shm".as_ptr(), 0o1777) == 0 {
            libc::mount(
                c"tmpfs".as_ptr(),
                c"/dev/shm".as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                std::ptr::null(),
            );
        }
        for (link, target) in [
            (c"/dev/fd", c"/proc/self/fd"),
            (c"/dev/stdin", c"/proc/self/fd/0"),
            (c"/dev/stdout", c"/proc/self/fd/1"),
            (c"/dev/stderr", c"/proc/self/fd/2"),
        ] {
            libc::symlink(target.as_ptr(), link.as_ptr());
        }
        // No capability now, and none from executing anything (uid 0 gets no full set back).
        const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
        const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
        const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
        const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
        const SECBIT_KEEP_CAPS_LOCKED: libc::c_ulong = 1 << 5;
        const SECBIT_NO_CAP_AMBIENT_RAISE: libc::c_ulong = 1 << 6;
        const SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED: libc::c_ulong = 1 << 7;
        let bits = SECBIT_NOROOT
            | SECBIT_NOROOT_LOCKED
            | SECBIT_NO_SETUID_FIXUP
            | SECBIT_NO_SETUID_FIXUP_LOCKED
            | SECBIT_KEEP_CAPS_LOCKED
            | SECBIT_NO_CAP_AMBIENT_RAISE
            | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
        check(libc::prctl(libc::PR_SET_SECUREBITS, bits, 0, 0, 0))?;
        for cap in 0..64 {
            // Numbers past the kernel's last capability answer EINVAL: nothing to drop.
            libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
        }
        check(libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0))?;
        #[repr(C)]
        struct CapHeader {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        struct CapData {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
        let mut header = CapHeader { version: CAPABILITY_VERSION_3, pid: 0 };
        let none = [
            CapData { effective: 0, permitted: 0, inheritable: 0 },
            CapData { effective: 0, permitted: 0, inheritable: 0 },
        ];
        check(libc::syscall(libc::SYS_capset, &mut header as *mut CapHeader, none.as_ptr()) as libc::c_int)?;
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
        assert!(KeyCover::new(dir.path(), &[dir.path().join("jobs")]).is_ok());
        let deep = KeyCover::new(dir.path(), &[dir.path().join("jobs/deep")]).unwrap_err();
        assert!(deep.to_string().contains("not directly inside"), "{deep}");
    }
}
