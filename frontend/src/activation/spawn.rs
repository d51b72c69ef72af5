//! Starting one worker process with its pool's sockets, in the systemd socket-activation
//! convention: fds 3.. with `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID`.
//!
//! `LISTEN_PID` must be the child's own pid, which std's `Command` cannot put in the child's
//! environment, so this forks by hand. Everything the child touches after `fork` is prepared
//! before it: the child only makes async-signal-safe calls.
//!
//! A worker gets nothing of the front end's but what the contract gives it: its fds, an
//! environment made only of the pool's `env` and the `SLUICE_*`/`LISTEN_*` variables (and a
//! default `PATH`), no capabilities, `PR_SET_NO_NEW_PRIVS`, and its pool's identity.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use sluice_proto::env::{FD_CONTROL, LISTEN_FDNAMES, LISTEN_FDS};

const LISTEN_PID: &[u8] = b"LISTEN_PID=";
/// `PATH` when the pool's `env` sets none (systemd's default for services).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Room for the decimal pid after `LISTEN_PID=`, NUL-padded.
const PID_ROOM: usize = 21;

/// What one worker process is started with.
pub struct Launch {
    program: CString,
    argv: Vec<CString>,
    /// NUL-terminated `KEY=VALUE` entries; the last one is the `LISTEN_PID=` slot.
    env: Vec<Vec<u8>>,
    /// The pool's fds; the worker's own control fd is added at spawn time, last.
    fds: Vec<RawFd>,
    /// Run as (uid, gid) when set.
    identity: Option<(u32, u32)>,
    /// Keeps the worker's hands off the reuseport groups' steering program.
    filter: super::seccomp::Filter,
    /// A sluice-worker gets a control fd last; a socket worker only its pool's sockets.
    control: bool,
    /// Working directory.
    cwd: Option<CString>,
    /// Its stdout and stderr go to a pipe the front end reads (and logs, prefixed).
    capture: bool,
}

/// How a worker process is set up beside its fds and environment.
pub struct Setup<'a> {
    pub control: bool,
    pub cwd: Option<&'a Path>,
    pub capture: bool,
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in a worker argument"))
}

impl Launch {
    /// `fds` are passed as 3.. under `names`, then the worker's control fd as `control`;
    /// `env` is the worker's whole environment but the `LISTEN_*` variables (entries with a
    /// NUL or a `LISTEN_` name are left out).
    pub fn new(
        program: &Path,
        args: &[String],
        fds: Vec<RawFd>,
        names: &[String],
        env: &[(String, String)],
        identity: Option<(u32, u32)>,
        setup: Setup<'_>,
    ) -> io::Result<Launch> {
        let program = cstring(program.as_os_str().as_bytes())?;
        let mut argv = vec![program.clone()];
        for a in args {
            argv.push(cstring(a.as_bytes())?);
        }
        let mut entries: Vec<Vec<u8>> = Vec::new();
        let mut push = |k: &str, v: &str| {
            let mut e = k.as_bytes().to_vec();
            e.push(b'=');
            e.extend_from_slice(v.as_bytes());
            e.push(0);
            entries.push(e);
        };
        if !env.iter().any(|(k, _)| k == "PATH") {
            push("PATH", DEFAULT_PATH);
        }
        for (k, v) in env {
            if !k.starts_with("LISTEN_") && !k.contains(['\0', '=']) && !v.contains('\0') {
                push(k, v);
            }
        }
        let mut names = names.to_vec();
        if setup.control {
            names.push(FD_CONTROL.to_owned());
        }
        push(LISTEN_FDS, &names.len().to_string());
        push(LISTEN_FDNAMES, &names.join(":"));
        let mut env = entries;
        let mut pid_slot = LISTEN_PID.to_vec();
        pid_slot.resize(LISTEN_PID.len() + PID_ROOM, 0);
        env.push(pid_slot);
        Ok(Launch {
            program,
            argv,
            env,
            fds,
            identity,
            filter: super::seccomp::Filter::new(),
            control: setup.control,
            cwd: setup
                .cwd
                .map(|c| cstring(c.as_os_str().as_bytes()))
                .transpose()?,
            capture: setup.capture,
        })
    }

    /// Whether the worker speaks the control protocol.
    pub fn has_control(&self) -> bool {
        self.control
    }

    /// The uid the worker runs as.
    pub fn uid(&self) -> u32 {
        // SAFETY: getuid has no preconditions.
        self.identity
            .map_or(unsafe { libc::getuid() }, |(uid, _)| uid)
    }

    /// The program it runs.
    pub fn program(&self) -> &Path {
        Path::new(std::ffi::OsStr::from_bytes(self.program.as_bytes()))
    }

    /// Forks and execs the worker with `control` as its last fd (a sluice-worker); returns
    /// its pid once exec has succeeded, and the read end of its output when captured.
    pub fn spawn(&mut self, control: Option<RawFd>) -> io::Result<(libc::pid_t, Option<OwnedFd>)> {
        let mut fds = self.fds.clone();
        fds.extend(control);
        let output = if self.capture {
            let mut p = [0; 2];
            // SAFETY: pipe2 writes two fds into the array.
            if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: both fds were just created and are owned by nothing else.
            Some(unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) })
        } else {
            None
        };
        let out_fd = output.as_ref().map_or(-1, |(_, w)| w.as_raw_fd());
        let cwd = self.cwd.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        let mut argv: Vec<*const libc::c_char> = self.argv.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let pid_at = self.env.len() - 1;
        // Reset the pid slot from an earlier spawn.
        for b in &mut self.env[pid_at][LISTEN_PID.len()..] {
            *b = 0;
        }
        let mut envp: Vec<*mut libc::c_char> =
            self.env.iter_mut().map(|e| e.as_mut_ptr().cast()).collect();
        envp.push(std::ptr::null_mut());
        let pid_digits: *mut u8 = envp[pid_at].cast::<u8>().wrapping_add(LISTEN_PID.len());

        // Exec failure travels back over a CLOEXEC pipe: EOF means exec succeeded.
        let mut pipe = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = fds.len() as RawFd;
        let identity = self.identity;
        // SAFETY: fork(2); the child branch below only uses async-signal-safe calls on memory
        // prepared before the fork, and ends in execve or _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            let e = io::Error::last_os_error();
            // SAFETY: closing the pipe we just made.
            unsafe {
                libc::close(pipe[0]);
                libc::close(pipe[1]);
            }
            return Err(e);
        }
        if pid == 0 {
            // SAFETY: in the child, see above.
            unsafe {
                child(
                    &self.program,
                    &argv,
                    &envp,
                    pid_digits,
                    &fds,
                    n,
                    identity,
                    &self.filter,
                    pipe[1],
                    out_fd,
                    cwd,
                )
            }
        }
        // SAFETY: parent side of the pipe: close the write end, read the child's verdict.
        unsafe {
            libc::close(pipe[1]);
            let mut errno = [0u8; 4];
            let r = libc::read(pipe[0], errno.as_mut_ptr().cast(), 4);
            libc::close(pipe[0]);
            if r == 4 {
                let mut status = 0;
                libc::waitpid(pid, &mut status, 0);
                return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)));
            }
        }
        // Our copy of the write end closes here: EOF once the worker (and its children) are gone.
        Ok((pid, output.map(|(r, _)| r)))
    }
}

/// The child between fork and exec.
///
/// SAFETY: must only be called in a freshly forked child; uses raw syscalls only.
unsafe fn child(
    program: &CString,
    argv: &[*const libc::c_char],
    envp: &[*mut libc::c_char],
    pid_digits: *mut u8,
    fds: &[RawFd],
    n: RawFd,
    identity: Option<(u32, u32)>,
    filter: &super::seccomp::Filter,
    report: RawFd,
    output: RawFd,
    cwd: *const libc::c_char,
) -> ! {
    unsafe {
        let fail = |report: RawFd| -> ! {
            let e = *libc::__errno_location();
            let b = e.to_ne_bytes();
            libc::write(report, b.as_ptr().cast(), 4);
            libc::_exit(127)
        };
        // The front end blocks its signals for signalfd; the mask survives exec.
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        // Rust ignores SIGPIPE; an ignored disposition survives exec too.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        // Own process group: a terminal's Ctrl-C reaches the front end, which stops workers.
        libc::setpgid(0, 0);
        // The worker must not outlive the front end that holds its queue.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
        if libc::getppid() == 1 {
            libc::_exit(0);
        }
        // Output first: the fd dance below may reuse the pipe's number.
        if output >= 0 && (libc::dup2(output, 1) < 0 || libc::dup2(output, 2) < 0) {
            fail(report);
        }
        if !cwd.is_null() && libc::chdir(cwd) < 0 {
            fail(report);
        }
        // Move the fds above the target range first so dup2 cannot clobber a source.
        let mut moved = [0 as RawFd; 64];
        for (i, &fd) in fds.iter().enumerate().take(moved.len()) {
            let m = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3 + n);
            if m < 0 {
                fail(report);
            }
            moved[i] = m;
        }
        for i in 0..fds.len().min(moved.len()) {
            if libc::dup2(moved[i], 3 + i as RawFd) < 0 {
                fail(report);
            }
        }
        for i in 0..fds.len().min(moved.len()) {
            libc::close(moved[i]);
        }
        // Nothing else leaks into the worker: mark every other fd close-on-exec (the report
        // pipe stays usable until exec).
        libc::syscall(
            libc::SYS_close_range,
            (3 + n) as u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        // No privilege can be gained by exec (setuid binaries, file capabilities).
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
            fail(report);
        }
        // Drop privileges last: the capability bounding set, the group list, group, then
        // user. A non-root uid ends with no capabilities at all (setuid from root clears
        // them); root, written in the config as `user = "root"`, keeps its own.
        if let Some((uid, gid)) = identity {
            if uid != 0 {
                for cap in 0..64 {
                    libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
                }
            }
            if libc::setgroups(1, &gid) < 0 || libc::setgid(gid) < 0 || libc::setuid(uid) < 0 {
                fail(report);
            }
        }
        if !filter.install() {
            fail(report);
        }
        // Write our pid into the LISTEN_PID slot.
        let mut pid = libc::getpid() as u32;
        let mut digits = [0u8; 10];
        let mut len = 0;
        loop {
            digits[len] = b'0' + (pid % 10) as u8;
            len += 1;
            pid /= 10;
            if pid == 0 {
                break;
            }
        }
        for i in 0..len {
            *pid_digits.add(i) = digits[len - 1 - i];
        }
        libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr().cast());
        fail(report)
    }
}
