//! `sluice upgrade` (and SIGUSR2): the front end replaces its program with the binary at its
//! path (a new build) in place, with exec(2). The process stays (its pid, so the workers stay
//! its children and systemd's main pid is unchanged), and so does every fd that holds state:
//! the listening sockets and the connections waiting in them, the handoff pairs, the workers'
//! control channels and output pipes, the admin socket, the connections the dispatcher was
//! reading (with what it had read). The new program loads its own kernel programs and takes
//! all of it over, described by a [`State`] in a memfd named by `SLUICE_UPGRADE_STATE`.
//!
//! Before exec the new binary must pass `check` on the running config; if the new program
//! then cannot start, it executes the earlier one again (kept open since its start) with the
//! same state and the reason, and that one serves on and reports it.

use std::{
    ffi::{CString, OsString},
    io::{Read, Seek, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sluice_proto::access::Arrival;

use crate::activation::WorkerState;
use crate::held::Held;

/// Names the fd of the state in the next program's environment.
const STATE_VAR: &str = "SLUICE_UPGRADE_STATE";
/// Set when the next program could not start and the earlier one runs again: why.
const FAILED_VAR: &str = "SLUICE_UPGRADE_FAILED";
/// The state's layout; a program refuses another.
const VERSION: u32 = 1;
/// Most a new binary's `check` may take.
const CHECK_LIMIT: Duration = Duration::from_secs(20);

/// Everything one program of the process passes to the next. Fields a later build adds
/// must have defaults, so that this build still reads the state (and can go back).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    pub version: u32,
    /// Upgrades that succeeded before this one.
    pub upgrades: u64,
    /// Queue-holding sockets, by their fd-store names (see `fdstore`).
    pub sockets: Vec<(String, RawFd)>,
    pub admin: Option<RawFd>,
    pub workers: Vec<WorkerState>,
    /// Per pool name, requests of its workers already gone, and how they went.
    pub requests_gone: Vec<(String, u64, String)>,
    pub held: Vec<HeldState>,
    /// The TLS thread's open sessions (a `Session` payload, then plaintext not yet served).
    pub tls_sessions: Vec<HeldState>,
    /// The TLS thread's connections whose handshake had not begun (the bytes they sent).
    pub tls_fresh: Vec<HeldState>,
    pub counts: Counts,
    /// Sysctls to restore when the front end exits.
    pub sysctls: Vec<(String, String)>,
    /// The earlier program, to go back to.
    pub previous: Option<RawFd>,
    /// Its command line and environment, for going back.
    pub argv: Vec<Vec<u8>>,
    pub env: Vec<Vec<u8>>,
}

/// A connection the dispatcher or the TLS thread held.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct HeldState {
    pub fd: RawFd,
    pub bytes: Vec<u8>,
    pub arrival: String,
}

impl HeldState {
    pub fn of(held: &[Held]) -> Vec<HeldState> {
        held.iter()
            .map(|h| HeldState {
                fd: h.fd.as_raw_fd(),
                bytes: h.bytes.clone(),
                arrival: h.arrival.as_str().to_owned(),
            })
            .collect()
    }
}

/// Counters, so that status and metrics go on from where they were.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Counts {
    /// The kernel program's counters below the per-pool ones, by index.
    pub kernel: Vec<u64>,
    /// Per pool name: (steered in the kernel, handed off by the dispatcher).
    pub pools: Vec<(String, u64, u64)>,
    pub accepted: u64,
    pub refused: Vec<(u16, u64)>,
    pub timeouts: u64,
    pub dropped: u64,
    pub handed_back: u64,
    pub cache_answers: u64,
    pub relays: u64,
    pub relays_failed: u64,
    pub tls: Option<crate::status::TlsStatus>,
}

/// The state a program was started with, and the fds it names, until it serves.
pub struct Incoming {
    pub state: State,
    memfd: OwnedFd,
    /// Why the program this one replaced (a newer one) could not start: this is the earlier
    /// program, running again.
    pub failed: Option<String>,
}

impl Incoming {
    /// The state `SLUICE_UPGRADE_STATE` names, if any.
    pub fn from_env() -> Result<Option<Incoming>> {
        let Some(var) = std::env::var_os(STATE_VAR) else {
            return Ok(None);
        };
        let fd: RawFd = var
            .to_str()
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{STATE_VAR}={var:?} is not an fd"))?;
        // SAFETY: F_GETFD only checks that the fd is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            bail!("{STATE_VAR} names fd {fd}, which is not open");
        }
        // SAFETY: the program before this one left fd `fd` (its memfd) for this one to own.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut file = std::fs::File::from(memfd.try_clone()?);
        file.rewind()?;
        let mut text = Vec::new();
        file.read_to_end(&mut text)?;
        let state: State = serde_json::from_slice(&text).context("reading the upgrade state")?;
        if state.version != VERSION {
            bail!(
                "the upgrade state is version {}, this program reads {VERSION}",
                state.version
            );
        }
        Ok(Some(Incoming {
            state,
            memfd,
            failed: std::env::var(FAILED_VAR).ok(),
        }))
    }

    /// A copy of one of the state's fds, for this program to own; the original stays open
    /// (a program to go back to needs it) until [`Incoming::done`].
    pub fn take(fd: RawFd) -> Result<OwnedFd> {
        // SAFETY: F_DUPFD_CLOEXEC makes a new fd; the original is left alone.
        let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if n < 0 {
            bail!(
                "taking over fd {fd} from before the upgrade: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: `n` was just created and is owned by nothing else.
        Ok(unsafe { OwnedFd::from_raw_fd(n) })
    }

    /// The queue-holding sockets, as this program's own fds, to be taken by name.
    pub fn sockets(&self) -> Result<crate::fdstore::Inherited> {
        let fds = self
            .state
            .sockets
            .iter()
            .map(|(name, fd)| Ok((name.clone(), Self::take(*fd)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(crate::fdstore::Inherited::from_list(fds))
    }

    /// The dispatcher's connections, as this program's own fds.
    pub fn held(&self) -> Result<Vec<Held>> {
        Self::take_held(&self.state.held)
    }

    /// The TLS thread's connections, as this program's own fds.
    pub fn tls(&self) -> Result<crate::tls::Carried> {
        Ok(crate::tls::Carried {
            sessions: Self::take_held(&self.state.tls_sessions)?,
            fresh: Self::take_held(&self.state.tls_fresh)?,
        })
    }

    fn take_held(held: &[HeldState]) -> Result<Vec<Held>> {
        held.iter()
            .map(|h| {
                Ok(Held {
                    fd: Self::take(h.fd)?,
                    bytes: h.bytes.clone(),
                    arrival: Arrival::parse(&h.arrival).unwrap_or(Arrival::Dispatcher),
                })
            })
            .collect()
    }

    /// This program serves: the earlier program's fds (copies of them are ours) are closed.
    pub fn done(self) {
        for fd in self.state.all_fds() {
            // SAFETY: these fds were left by the earlier program for this one, which has
            // taken copies of the ones it uses; nothing else refers to these numbers.
            unsafe { libc::close(fd) };
        }
        drop(self.memfd);
    }

    /// This program could not start: the earlier one runs again, with the same state and
    /// `why`. Returns only if that cannot be done (then the error is the caller's to report).
    pub fn go_back(&self, why: &anyhow::Error) -> anyhow::Error {
        let Some(previous) = self.state.previous.filter(|_| self.failed.is_none()) else {
            return anyhow::anyhow!("no earlier program to go back to");
        };
        log::error!("this program cannot take over ({why:#}); going back to the earlier one");
        // The state's environment has neither variable (see `State::exec`).
        let mut env = self.state.env_with(self.memfd.as_raw_fd());
        let reason = format!("{why:#}").replace('\0', " ");
        env.push(format!("{FAILED_VAR}={reason}").into_bytes());
        let e = exec(Exec::Fd(previous), &self.state.argv, &env);
        anyhow::anyhow!("going back to the earlier program: {e}")
    }
}

impl State {
    /// The environment for the next program: this one's, and the state's fd.
    fn env_with(&self, memfd: RawFd) -> Vec<Vec<u8>> {
        let mut env = self.env.clone();
        env.push(format!("{STATE_VAR}={memfd}").into_bytes());
        env
    }

    /// Every fd the state names, which must survive exec.
    fn all_fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.sockets.iter().map(|(_, fd)| *fd).collect();
        fds.extend(self.admin);
        fds.extend(self.previous);
        for w in &self.workers {
            fds.extend(w.control);
            fds.extend(w.output);
        }
        fds.extend(
            (self
                .held
                .iter()
                .chain(&self.tls_sessions)
                .chain(&self.tls_fresh))
            .map(|h| h.fd),
        );
        fds
    }

    /// Writes the state into a memfd without FD_CLOEXEC, clears FD_CLOEXEC on every fd it
    /// names, and executes `program`. Returns only on failure, with FD_CLOEXEC set again.
    pub fn exec(&mut self, program: &Path, config: &Path) -> std::io::Error {
        self.version = VERSION;
        self.argv = vec![
            program.as_os_str().as_bytes().to_vec(),
            b"run".to_vec(),
            config.as_os_str().as_bytes().to_vec(),
        ];
        // systemd's LISTEN_* were meant for this process's first program only: their fds are
        // long taken (and their numbers reused).
        self.env = std::env::vars_os()
            .filter(|(k, _)| {
                let k = k.as_bytes();
                !k.starts_with(b"LISTEN_")
                    && k != STATE_VAR.as_bytes()
                    && k != FAILED_VAR.as_bytes()
            })
            .map(|(k, v)| {
                let mut e: OsString = k;
                e.push("=");
                e.push(v);
                e.as_bytes().to_vec()
            })
            .collect();
        let memfd = match write_memfd(self) {
            Ok(fd) => fd,
            Err(e) => return e,
        };
        let env = self.env_with(memfd.as_raw_fd());
        let fds = self.all_fds();
        for &fd in &fds {
            set_cloexec(fd, false);
        }
        let e = exec(Exec::Path(program), &self.argv, &env);
        for &fd in &fds {
            set_cloexec(fd, true);
        }
        e
    }
}

fn write_memfd(state: &State) -> std::io::Result<OwnedFd> {
    let json = serde_json::to_vec(state).map_err(std::io::Error::other)?;
    // SAFETY: memfd_create with a NUL-terminated name; no FD_CLOEXEC, the next program reads it.
    let fd = unsafe { libc::memfd_create(c"sluice-upgrade".as_ptr(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = std::fs::File::from(fd.try_clone()?);
    file.write_all(&json)?;
    file.rewind()?;
    Ok(fd)
}

fn set_cloexec(fd: RawFd, on: bool) {
    // SAFETY: fcntl on an fd this process holds.
    unsafe { libc::fcntl(fd, libc::F_SETFD, if on { libc::FD_CLOEXEC } else { 0 }) };
}

enum Exec<'a> {
    Path(&'a Path),
    Fd(RawFd),
}

/// execve(2) or fexecve(3); returns only on failure.
fn exec(program: Exec, argv: &[Vec<u8>], env: &[Vec<u8>]) -> std::io::Error {
    let c = |v: &Vec<u8>| CString::new(v.clone()).ok();
    let (Some(argv), Some(env)) = (
        argv.iter().map(c).collect::<Option<Vec<CString>>>(),
        env.iter().map(c).collect::<Option<Vec<CString>>>(),
    ) else {
        return std::io::Error::other("a NUL byte in the command line or environment");
    };
    let mut argp: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argp.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    match program {
        Exec::Path(p) => {
            let Ok(path) = CString::new(p.as_os_str().as_bytes()) else {
                return std::io::Error::other("a NUL byte in the program's path");
            };
            // SAFETY: NUL-terminated path and NULL-terminated arrays of NUL-terminated
            // strings, all alive for the call; execve only returns on failure.
            unsafe { libc::execve(path.as_ptr(), argp.as_ptr(), envp.as_ptr()) };
        }
        Exec::Fd(fd) => {
            // SAFETY: as above, with the program as an open fd.
            unsafe { libc::fexecve(fd, argp.as_ptr(), envp.as_ptr()) };
        }
    }
    std::io::Error::last_os_error()
}

/// The new binary accepts the running config (`sluice check`), within [`CHECK_LIMIT`].
pub fn check_binary(program: &Path, config: &Path) -> Result<()> {
    let mut child = std::process::Command::new(program)
        .arg("check")
        .arg(config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {} check", program.display()))?;
    // Read while it runs: a long report must not fill the pipe and stall it.
    let mut reader = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut err = Vec::new();
            let _ = e.by_ref().take(64 * 1024).read_to_end(&mut err);
            let _ = std::io::copy(&mut e, &mut std::io::sink());
            String::from_utf8_lossy(&err).into_owned()
        })
    });
    let deadline = Instant::now() + CHECK_LIMIT;
    loop {
        if let Some(status) = child.try_wait()? {
            let err = reader
                .take()
                .and_then(|r| r.join().ok())
                .unwrap_or_default();
            if !status.success() {
                bail!(
                    "{} check {} failed ({status}): {}",
                    program.display(),
                    config.display(),
                    err.trim()
                );
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{} check did not finish within {CHECK_LIMIT:?}",
                program.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The path of this program's binary, where an upgrade finds the next one: the kernel
/// names a binary replaced since it started `PATH (deleted)`, and the path is what counts.
pub fn own_path() -> std::io::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let bytes = exe.as_os_str().as_bytes();
    Ok(match bytes.strip_suffix(b" (deleted)") {
        Some(path) => std::path::PathBuf::from(std::ffi::OsStr::from_bytes(path)),
        None => exe,
    })
}

/// The program this process runs now, kept open to go back to after a failed upgrade.
pub fn own_image() -> Option<OwnedFd> {
    // SAFETY: open(2) of a NUL-terminated path; the fd is owned right away.
    let fd = unsafe { libc::open(c"/proc/self/exe".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    // SAFETY: a new fd owned by nothing else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(name: &str, body: &str) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("sluice-check-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sluice");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn a_check_that_floods_its_output_is_judged_by_its_exit_at_once() {
        let started = Instant::now();
        let loud = script("loud", "head -c 300000 /dev/zero; exit 0");
        check_binary(&loud, Path::new("/nonexistent.toml")).unwrap();
        let failing = script("failing", "head -c 300000 /dev/zero >&2; exit 3");
        let e = check_binary(&failing, Path::new("/nonexistent.toml")).unwrap_err();
        assert!(format!("{e}").contains("failed ("), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        for p in [loud, failing] {
            let _ = std::fs::remove_dir_all(p.parent().unwrap());
        }
    }

    #[test]
    fn a_state_without_the_fields_a_later_build_added_still_reads() {
        let state: State = serde_json::from_str(r#"{"version": 1, "upgrades": 2}"#).unwrap();
        assert_eq!(state.upgrades, 2);
        assert!(state.workers.is_empty());
        let worker: WorkerState = serde_json::from_str(r#"{"pool": "api", "pid": 7}"#).unwrap();
        assert_eq!(worker.pid, 7);
    }
}
