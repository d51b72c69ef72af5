//! The one thing a worker's own sockets would let it do to other pools: every pool socket is
//! a member of its listen address's SO_REUSEPORT group, and any member may replace (or
//! detach) the group's steering program with `setsockopt(SO_ATTACH_REUSEPORT_CBPF/EBPF)` or
//! `SO_DETACH_REUSEPORT_BPF`, no privilege needed. A worker that did so would take every
//! pool's connections. A seccomp filter, installed in the child before exec (under
//! `PR_SET_NO_NEW_PRIVS`), refuses those options with EPERM; every other call is allowed.
//! System calls of another ABI (i386, x32), whose numbers the filter would not know, are
//! refused too. The controller also attaches sluice's program again every second (see
//! `server::guard`), for the same options sent through an io_uring command, which seccomp
//! does not see.

/// The filter program; built before the fork, installed after it.
pub struct Filter(Vec<libc::sock_filter>);

/// `AUDIT_ARCH_*`: the ELF machine with the 64-bit and little-endian bits.
#[cfg(target_arch = "x86_64")]
const ARCH: u32 = 62 | 0x8000_0000 | 0x4000_0000;
#[cfg(target_arch = "aarch64")]
const ARCH: u32 = 183 | 0x8000_0000 | 0x4000_0000;

/// Offsets in `struct seccomp_data`: nr, arch, then six u64 arguments from 16 (low words
/// first on these little-endian targets).
const NR: u32 = 0;
const ARCH_AT: u32 = 4;
const ARG1: u32 = 16 + 8;
const ARG2: u32 = 16 + 16;

/// x32 system calls carry this bit in their number.
const X32_BIT: u32 = 0x4000_0000;

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

impl Filter {
    pub fn new() -> Filter {
        let load = |at| stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, at);
        let ret = |v| stmt(libc::BPF_RET | libc::BPF_K, v);
        let deny = libc::SECCOMP_RET_ERRNO | (libc::EPERM as u32 & libc::SECCOMP_RET_DATA);
        let allow = libc::SECCOMP_RET_ALLOW;
        Filter(vec![
            // 0: another ABI: refused.
            load(ARCH_AT),
            jump(ARCH, 1, 0),
            ret(deny),
            // 3: x32 numbers: refused.
            load(NR),
            stmt(
                (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u32,
                X32_BIT,
            ),
            // (jt 0 = next: deny; jf 1 = skip it) -- patched below.
            ret(deny),
            // 6: setsockopt? (else to the allow at 13)
            jump(libc::SYS_setsockopt as u32, 0, 6),
            load(ARG1),
            // 8: at SOL_SOCKET? (else allow)
            jump(libc::SOL_SOCKET as u32, 0, 4),
            load(ARG2),
            // 10..12: one of the group's program options: to the deny at 14.
            jump(libc::SO_ATTACH_REUSEPORT_CBPF as u32, 3, 0),
            jump(libc::SO_ATTACH_REUSEPORT_EBPF as u32, 2, 0),
            jump(libc::SO_DETACH_REUSEPORT_BPF as u32, 1, 0),
            ret(allow),
            ret(deny),
        ])
        .with_x32_jump()
    }

    fn with_x32_jump(mut self) -> Filter {
        // At 4: >= X32_BIT goes to the deny at 5, else over it to 6.
        self.0[4].jt = 0;
        self.0[4].jf = 1;
        self
    }

    /// Installs the filter in this process. Only async-signal-safe calls: for the child
    /// between fork and exec.
    ///
    /// # Safety
    /// `PR_SET_NO_NEW_PRIVS` must be set (or the process privileged); the filter's memory
    /// must stay valid for the call.
    pub unsafe fn install(&self) -> bool {
        let prog = libc::sock_fprog {
            len: self.0.len() as u16,
            filter: self.0.as_ptr().cast_mut(),
        };
        // SAFETY: `prog` points at the live filter; the kernel copies it.
        unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                &raw const prog,
            ) == 0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child with the filter installed; returns its exit code.
    fn in_child(f: fn() -> i32) -> i32 {
        let filter = Filter::new();
        // SAFETY: the child only runs `f` (plain syscalls) and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: in the child, as `install` requires.
            unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if !filter.install() {
                    libc::_exit(100);
                }
                libc::_exit(f());
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        libc::WEXITSTATUS(status)
    }

    fn setopt(opt: libc::c_int) -> i32 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&l);
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with a live int; the kernel refuses a wrong size as EINVAL.
        let rc = unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, opt, (&raw const one).cast(), 4) };
        if rc == 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(1)
        }
    }

    #[test]
    fn a_worker_cannot_touch_its_groups_steering_program_but_keeps_other_options() {
        assert_eq!(
            in_child(|| setopt(libc::SO_ATTACH_REUSEPORT_CBPF)),
            libc::EPERM
        );
        assert_eq!(
            in_child(|| setopt(libc::SO_ATTACH_REUSEPORT_EBPF)),
            libc::EPERM
        );
        assert_eq!(
            in_child(|| setopt(libc::SO_DETACH_REUSEPORT_BPF)),
            libc::EPERM
        );
        assert_eq!(in_child(|| setopt(libc::SO_KEEPALIVE)), 0);
        assert_eq!(in_child(|| setopt(libc::SO_REUSEADDR)), 0);
        // Without the filter the same call gets past the permission check (EINVAL: no program).
        assert_ne!(setopt(libc::SO_ATTACH_REUSEPORT_CBPF), libc::EPERM);
    }
}
