//! The sandbox's seccomp policy, compiled to BPF in pure Rust (`seccompiler`), so building
//! pond needs no system library.
//!
//! The policy allows ordinary work and denies what a contained command has no business doing:
//! - a denylist of system calls (new namespaces, mounts, tracing, modules, keyrings, BPF, perf,
//!   io_uring, …) → `EPERM`;
//! - `clone` with any new-namespace flag → `EPERM`, and `clone3` → `ENOSYS` (its flags are in
//!   memory a filter cannot read; libc then falls back to `clone`);
//! - an **allowlist of socket families**: `AF_UNIX`, `AF_INET`, `AF_INET6`, and `AF_NETLINK`
//!   for `NETLINK_ROUTE` only (libc's interface lookups); every other family (`AF_VSOCK`,
//!   `AF_PACKET`, `AF_BLUETOOTH`, …) → `EAFNOSUPPORT`, whatever the kernel offers;
//! - another architecture's entry points kill the process, and x32 system-call numbers (the
//!   same architecture with bit 30 set, which a per-number list would not match) → `ENOSYS`.
//!
//! [`programs`] builds the filters once in the helper; [`install`] applies them in the
//! container's init (after no_new_privileges, before it waits to be started).

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// A system call by name and number (names are for the OCI form of the policy).
type Syscall = (&'static str, i64);

macro_rules! syscalls {
    ($($name:ident),* $(,)?) => { &[$((stringify!($name), libc::$name as i64)),*] };
}

/// Denied outright with `EPERM`. Names are libc's `SYS_*` constants.
const DENIED: &[Syscall] = syscalls![
    SYS_unshare,
    SYS_setns,
    SYS_mount,
    SYS_umount2,
    SYS_pivot_root,
    SYS_chroot,
    SYS_ptrace,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_kexec_load,
    SYS_kexec_file_load,
    SYS_init_module,
    SYS_finit_module,
    SYS_delete_module,
    SYS_bpf,
    SYS_perf_event_open,
    SYS_keyctl,
    SYS_add_key,
    SYS_request_key,
    SYS_userfaultfd,
    SYS_open_by_handle_at,
    SYS_name_to_handle_at,
    SYS_swapon,
    SYS_swapoff,
    SYS_reboot,
    SYS_syslog,
    SYS_acct,
    SYS_settimeofday,
    SYS_clock_settime,
    SYS_clock_adjtime,
    SYS_adjtimex,
    SYS_quotactl,
    SYS_fsopen,
    SYS_fsconfig,
    SYS_fsmount,
    SYS_fspick,
    SYS_move_mount,
    SYS_open_tree,
    SYS_mount_setattr,
    SYS_lookup_dcookie,
    SYS_io_uring_setup,
    SYS_io_uring_enter,
    SYS_io_uring_register,
    SYS_personality,
    SYS_vhangup,
];

/// x86-only entry points, denied too.
#[cfg(target_arch = "x86_64")]
const DENIED_ARCH: &[Syscall] = syscalls![SYS_iopl, SYS_ioperm, SYS_uselib];
#[cfg(not(target_arch = "x86_64"))]
const DENIED_ARCH: &[Syscall] = &[];

/// `clone` flags that make a new namespace: each denied on its own.
const NAMESPACE_FLAGS: &[i32] = &[
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWCGROUP,
];

/// The socket families a sandboxed command may open.
pub const SOCKET_FAMILIES: &[i32] = &[libc::AF_UNIX, libc::AF_INET, libc::AF_INET6, libc::AF_NETLINK];
/// The one netlink protocol allowed (route: interface and address lookups, read by libc).
const NETLINK_PROTOCOL: i32 = libc::NETLINK_ROUTE;

/// The architecture pond was built for (the only one whose calls are allowed at all).
fn target_arch() -> Result<TargetArch, String> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|e| format!("seccomp on {}: {e}", std::env::consts::ARCH))
}

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(|e| format!("seccomp condition: {e}"))
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, String> {
    SeccompRule::new(conditions).map_err(|e| format!("seccomp rule: {e}"))
}

/// One filter: the calls in `rules` matching any of their rules (or unconditionally, for an
/// empty list) get `errno`; everything else is allowed.
fn filter(rules: BTreeMap<i64, Vec<SeccompRule>>, errno: i32) -> Result<BpfProgram, String> {
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(errno as u32), target_arch()?)
        .map_err(|e| format!("seccomp filter: {e}"))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| format!("compiling the seccomp filter: {e}"))
}

/// The filters, in the order [`install`] applies them. For any one call at most one of them
/// answers with an error, so stacking them changes no answer.
pub fn programs() -> Result<Vec<BpfProgram>, String> {
    // 1. The denylist, and clone with a namespace flag (a rule per flag: a rule's conditions
    //    are ANDed, the rules of one call ORed).
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().chain(DENIED_ARCH).map(|&(_, nr)| (nr, Vec::new())).collect();
    let mut clone_rules = Vec::new();
    for &flag in NAMESPACE_FLAGS {
        let flag = flag as u32 as u64;
        clone_rules.push(rule(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(flag),
            flag,
        )
        .map_err(|e| format!("seccomp condition: {e}"))?])?);
    }
    denied.insert(libc::SYS_clone, clone_rules);

    // 2. clone3 answers ENOSYS.
    let clone3 = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);

    // 3. Socket families: a family outside the allowlist, or netlink with another protocol.
    let mut other_family = Vec::new();
    for &family in SOCKET_FAMILIES {
        other_family.push(condition(0, SeccompCmpOp::Ne, family as u64)?);
    }
    let other_netlink = vec![
        condition(0, SeccompCmpOp::Eq, libc::AF_NETLINK as u64)?,
        condition(2, SeccompCmpOp::Ne, NETLINK_PROTOCOL as u64)?,
    ];
    // Packet-level sockets reached through the inet families (the obsolete `SOCK_PACKET` type,
    // and raw IP): refused here too, not only by the missing CAP_NET_RAW. The type's low four
    // bits are the kind; the rest are SOCK_NONBLOCK/SOCK_CLOEXEC.
    // (libc marks SOCK_PACKET deprecated for use; refusing it is the point.)
    const SOCK_PACKET: i32 = 10;
    let mut packet_kinds = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        for kind in [SOCK_PACKET, libc::SOCK_RAW] {
            packet_kinds.push(rule(vec![
                condition(0, SeccompCmpOp::Eq, family as u64)?,
                condition(1, SeccompCmpOp::MaskedEq(0xf), kind as u64)?,
            ])?);
        }
    }
    let mut socket_rules = vec![rule(other_family.clone())?, rule(other_netlink)?];
    socket_rules.extend(packet_kinds);
    let sockets = BTreeMap::from([(libc::SYS_socket, socket_rules), (libc::SYS_socketpair, vec![rule(other_family)?])]);

    Ok(vec![
        x32_guard(),
        filter(denied, libc::EPERM)?,
        filter(clone3, libc::ENOSYS)?,
        filter(sockets, libc::EAFNOSUPPORT)?,
    ])
}

/// On x86-64 the x32 ABI reaches the same kernel with the call number's bit 30 set: a filter
/// keyed by call numbers would let `unshare | 0x4000_0000` through. seccompiler has no range
/// test, so these five instructions answer every such number with ENOSYS (elsewhere: allow).
fn x32_guard() -> BpfProgram {
    const LD_W_ABS: u16 = 0x00 | 0x00 | 0x20;
    const JSET_K: u16 = 0x05 | 0x40;
    const JEQ_K: u16 = 0x05 | 0x10;
    const RET_K: u16 = 0x06;
    const ARCH_OFFSET: u32 = 4;
    const NR_OFFSET: u32 = 0;
    const X32_BIT: u32 = 0x4000_0000;
    const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
    let stmt = |code, k| sock_filter { code, jt: 0, jf: 0, k };
    let jump = |code, k, jt, jf| sock_filter { code, jt, jf, k };
    vec![
        stmt(LD_W_ABS, ARCH_OFFSET),
        jump(JEQ_K, AUDIT_ARCH_X86_64, 0, 2),
        stmt(LD_W_ABS, NR_OFFSET),
        jump(JSET_K, X32_BIT, 1, 0),
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
        stmt(RET_K, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
    ]
}

/// Applies the filters to the calling thread (which must be the process's only one), setting
/// no_new_privileges first as seccomp requires of an unprivileged caller.
pub fn install(programs: &[BpfProgram]) -> Result<(), String> {
    for program in programs {
        seccompiler::apply_filter(program).map_err(|e| format!("installing the seccomp filter: {e}"))?;
    }
    Ok(())
}

/// The same policy as an OCI `linux.seccomp` object, for running the sandbox's bundle under
/// other runtimes (crun, runc) in the benchmark.
pub fn oci_profile() -> serde_json::Value {
    use serde_json::json;
    let name = |s: &str| s.trim_start_matches("SYS_").to_string();
    let denied: Vec<String> = DENIED.iter().chain(DENIED_ARCH).map(|(n, _)| name(n)).collect();
    let arch = if cfg!(target_arch = "aarch64") { "SCMP_ARCH_AARCH64" } else { "SCMP_ARCH_X86_64" };
    let mut syscalls = vec![
        json!({"names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM}),
        json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS}),
    ];
    for &flag in NAMESPACE_FLAGS {
        let flag = flag as u32 as u64;
        syscalls.push(json!({"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM,
            "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}]}));
    }
    json!({"defaultAction": "SCMP_ACT_ALLOW", "architectures": [arch], "syscalls": syscalls})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `probe` in a forked child after installing the filters; returns the child's exit
    /// code (the probe's errno, or 0).
    fn in_child(probe: fn() -> i32) -> i32 {
        let programs = programs().unwrap();
        // SAFETY: the child only installs the filter, makes one call and exits.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                if install(&programs).is_err() {
                    libc::_exit(255);
                }
                libc::_exit(probe());
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            assert!(libc::WIFEXITED(status), "child died: {status}");
            libc::WEXITSTATUS(status)
        }
    }

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    fn socket(family: i32, protocol: i32) -> i32 {
        // SAFETY: a socket call whose descriptor is leaked into a child that exits at once.
        if unsafe { libc::socket(family, libc::SOCK_DGRAM, protocol) } < 0 {
            errno()
        } else {
            0
        }
    }

    #[test]
    fn socket_families_outside_the_allowlist_are_refused() {
        assert_eq!(in_child(|| socket(libc::AF_VSOCK, 0)), libc::EAFNOSUPPORT);
        assert_eq!(in_child(|| socket(libc::AF_PACKET, 0)), libc::EAFNOSUPPORT);
        assert_eq!(in_child(|| socket(libc::AF_NETLINK, libc::NETLINK_AUDIT)), libc::EAFNOSUPPORT);
        assert_eq!(in_child(|| socket(libc::AF_INET, 0)), 0);
        // Packet-level kinds through the inet families, whatever flags ride along.
        fn inet_packet() -> i32 {
            // SAFETY: a socket call in a child that exits at once.
            if unsafe { libc::socket(libc::AF_INET, 10 | libc::SOCK_CLOEXEC, 0) } < 0 {
                errno()
            } else {
                0
            }
        }
        fn inet6_raw() -> i32 {
            // SAFETY: as above.
            if unsafe { libc::socket(libc::AF_INET6, libc::SOCK_RAW | libc::SOCK_NONBLOCK, 58) } < 0 {
                errno()
            } else {
                0
            }
        }
        assert_eq!(in_child(inet_packet), libc::EAFNOSUPPORT);
        assert_eq!(in_child(inet6_raw), libc::EAFNOSUPPORT);
        assert_eq!(in_child(|| socket(libc::AF_UNIX, 0)), 0);
        assert_eq!(in_child(|| socket(libc::AF_NETLINK, libc::NETLINK_ROUTE)), 0);
    }

    #[test]
    fn namespaces_are_refused_and_plain_forks_are_not() {
        // SAFETY: plain system calls in a child.
        assert_eq!(
            in_child(|| if unsafe { libc::unshare(libc::CLONE_NEWUTS) } < 0 { errno() } else { 0 }),
            libc::EPERM
        );
        let clone3 = || if unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) } < 0 { errno() } else { 0 };
        assert_eq!(in_child(clone3), libc::ENOSYS);
        #[cfg(target_arch = "x86_64")]
        {
            let x32_unshare =
                || if unsafe { libc::syscall(libc::SYS_unshare | 0x4000_0000, 0) } < 0 { errno() } else { 0 };
            assert_eq!(in_child(x32_unshare), libc::ENOSYS);
        }
        let fork = || unsafe {
            let pid = libc::fork();
            if pid == 0 {
                libc::_exit(0);
            }
            if pid < 0 {
                return errno();
            }
            libc::waitpid(pid, std::ptr::null_mut(), 0);
            0
        };
        assert_eq!(in_child(fork), 0);
    }
}
