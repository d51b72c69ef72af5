//! systemd's file-descriptor store: under a unit with `FileDescriptorStoreMax=`, the front
//! end gives systemd every socket that holds a queue (`FDSTORE=1`), and a front end that
//! systemd starts again after a crash gets them back (`LISTEN_FDS`, `LISTEN_FDNAMES`): the
//! connections that arrived meanwhile wait in those queues and are served, not refused.
//!
//! The names say what a socket is; which address it is for is read from the socket itself
//! (`getsockname`), so a changed `listen` list or pool order cannot mix them up.

use std::{
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use sluice_proto::sockaddr::socket_option;

/// Name of a group's dispatcher socket in the store.
pub const DISPATCH: &str = "dispatch";

/// Name of a TLS listener (the TLS thread's, slot 0 of its group) in the store.
pub const TLS: &str = "tls";

/// Name of a pool's listening sockets in the store.
pub fn pool_name(pool: &str) -> String {
    format!("pool.{pool}")
}

/// Names of a pool's handoff pair (front end's end, workers' end): hand-offs still queued in
/// it survive too.
pub fn handoff_names(pool: &str) -> [String; 2] {
    [format!("handoff.{pool}"), format!("handoff-workers.{pool}")]
}

/// Sockets systemd passed in, by name, until the start takes them.
#[derive(Debug, Default)]
pub struct Inherited {
    fds: Vec<(String, OwnedFd)>,
    taken: usize,
}

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;
/// More than any store holds (`FileDescriptorStoreMax` is at most 4096 in practice).
const MAX_FDS: usize = 65536;

impl Inherited {
    /// What `LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES` hand this process (none when
    /// `LISTEN_PID` names another process: the variables were meant for a parent).
    pub fn from_env() -> Inherited {
        let var = |k| std::env::var(k).ok();
        let (Some(pid), Some(n)) = (var("LISTEN_PID"), var("LISTEN_FDS")) else {
            return Inherited::default();
        };
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return Inherited::default();
        }
        let Some(n) = n.parse::<usize>().ok().filter(|&n| n <= MAX_FDS) else {
            log::warn!("LISTEN_FDS={n} is not a count: taking no sockets from systemd");
            return Inherited::default();
        };
        let names = var("LISTEN_FDNAMES").unwrap_or_default();
        let mut names = names.split(':');
        let mut fds = Vec::new();
        for i in 0..n {
            let fd = FIRST_FD + i as RawFd;
            // SAFETY: F_GETFD only checks that the fd is open.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                log::warn!("LISTEN_FDS names fd {fd}, which is not open");
                continue;
            }
            // SAFETY: systemd passed fd `fd` to this process for it to own; nothing else in
            // the process knows it (it is taken once, at start).
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // Our children must not inherit it.
            // SAFETY: fcntl on an fd we own.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            fds.push((names.next().unwrap_or("unknown").to_owned(), owned));
        }
        Inherited { fds, taken: 0 }
    }

    /// Named sockets handed over otherwise (an upgrade).
    pub fn from_list(fds: Vec<(String, OwnedFd)>) -> Inherited {
        Inherited { fds, taken: 0 }
    }

    /// The first listening TCP socket called `name` bound to `addr`.
    pub fn take_listener(&mut self, name: &str, addr: SocketAddr) -> Option<OwnedFd> {
        let i = self.fds.iter().position(|(n, fd)| {
            n == name
                && listening(fd.as_raw_fd())
                && sluice_proto::sockaddr::local(fd.as_raw_fd()) == Some(addr)
        })?;
        self.taken += 1;
        Some(self.fds.remove(i).1)
    }

    /// The first AF_UNIX SOCK_SEQPACKET socket called `name`.
    pub fn take_seqpacket(&mut self, name: &str) -> Option<OwnedFd> {
        let i = self.fds.iter().position(|(n, fd)| {
            n == name && socket_option(fd.as_raw_fd(), libc::SO_TYPE) == Some(libc::SOCK_SEQPACKET)
        })?;
        self.taken += 1;
        Some(self.fds.remove(i).1)
    }

    /// How many sockets the start took.
    pub fn taken(&self) -> usize {
        self.taken
    }

    /// Closes what nothing took (a pool the config no longer has, an address it no longer
    /// listens on), saying so.
    pub fn close_rest(&mut self) {
        for (n, _) in self.fds.drain(..) {
            log::warn!("socket {n} from systemd's fd store is not in the config: closed");
        }
    }
}

/// A listening TCP socket.
fn listening(fd: RawFd) -> bool {
    socket_option(fd, libc::SO_ACCEPTCONN) == Some(1)
        && socket_option(fd, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
}
