//! Keeping the reuseport groups sluice's own. A second front end (or any root process with
//! SO_REUSEPORT) that binds a listen address joins its group and can replace the steering
//! program, taking the traffic; when it exits, the group is left with a program whose socket
//! array is empty, and every connection is refused. So: refuse to start on an address that
//! already has a listener (`probe`), and watch for listeners that are not ours (`Guard`): one
//! that appears is logged and counted. Every second each group gets sluice's program attached
//! again, whoever replaced it (a foreign listener, or a worker through its own pool socket by
//! a path seccomp does not see).

use std::{
    collections::HashSet,
    net::SocketAddr,
    os::fd::RawFd,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

/// How often the groups get sluice's program again and the namespace's listening sockets
/// are looked at (sock_diag lists listeners without walking the connections).
const EVERY: Duration = Duration::from_secs(1);

/// How long the start waits for a listener on its address to go: the previous front end's
/// (or its workers') listeners outlive their processes for a moment, because io_uring lets go
/// of the files of its pending accepts only in the kernel's deferred ring teardown.
pub const PROBE_PATIENCE: Duration = Duration::from_secs(3);

/// Fails when something still listens on `addr` after `patience` (a listener that shares
/// the address, including a wildcard one on its port).
pub fn probe(addr: SocketAddr, patience: Duration) -> Result<()> {
    let deadline = Instant::now() + patience;
    loop {
        match probe_once(addr) {
            Err(e) if Instant::now() < deadline => {
                log::debug!("{e}; trying again");
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

fn probe_once(addr: SocketAddr) -> Result<()> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); closed below.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("probing {addr}: {}", std::io::Error::last_os_error());
    }
    // SO_REUSEADDR without SO_REUSEPORT: TIME_WAIT leftovers do not count, listeners do.
    let one: libc::c_int = 1;
    let (ss, len) = crate::sockets::sockaddr(&addr);
    // SAFETY: setsockopt/bind on our own fd with live, correctly sized arguments.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            4,
        );
        if addr.is_ipv6() {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                (&raw const one).cast(),
                4,
            );
        }
        libc::bind(fd, (&raw const ss).cast(), len)
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the probe socket we made.
    unsafe { libc::close(fd) };
    if rc < 0 && err.raw_os_error() == Some(libc::EADDRINUSE) {
        bail!(
            "{addr} already has a listener (another sluice, or another server on that address or \
             on its port's wildcard address): stop it first; see `ss -ltnp 'sport = :{}'`",
            addr.port()
        );
    }
    Ok(())
}

/// Watches the listen addresses for sockets that are not the front end's.
pub struct Guard {
    addrs: Vec<SocketAddr>,
    next: Instant,
    /// Foreign socket inodes already reported.
    reported: HashSet<u64>,
    /// Foreign listeners seen since the start.
    pub foreign: u64,
}

impl Guard {
    pub fn new(addrs: &[SocketAddr]) -> Guard {
        Guard {
            addrs: addrs.to_vec(),
            next: Instant::now() + EVERY,
            reported: HashSet::new(),
            foreign: 0,
        }
    }

    /// Once a second (None between): the groups (by index into the listen addresses) that
    /// have a listener not among `ours` that was not reported before.
    pub fn check(&mut self, now: Instant, ours: &[RawFd]) -> Option<Vec<usize>> {
        if now < self.next {
            return None;
        }
        self.next = now + EVERY;
        let ours: HashSet<u64> = ours.iter().filter_map(|&fd| inode(fd)).collect();
        let mut groups = Vec::new();
        let listeners = crate::diag::listeners().unwrap_or_else(|e| {
            log::warn!("listing the namespace's listeners: {e}");
            Vec::new()
        });
        for (addr, ino) in listeners {
            if ours.contains(&ino) || self.reported.contains(&ino) {
                continue;
            }
            let Some(g) = self.addrs.iter().position(|a| shares(a, &addr)) else {
                continue;
            };
            self.reported.insert(ino);
            self.foreign += 1;
            log::error!(
                "a listener that is not sluice's appeared on {addr} (socket inode {ino}): it can \
                 take this address's connections; sluice attached its steering program again, \
                 so it gets none. Stop the other server"
            );
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        Some(groups)
    }
}

/// Whether a listener on `other` takes part in `ours`'s group (same port, same address or a
/// wildcard one).
fn shares(ours: &SocketAddr, other: &SocketAddr) -> bool {
    ours.port() == other.port()
        && (ours.ip() == other.ip() || other.ip().is_unspecified())
        && ours.is_ipv4() == other.is_ipv4()
}

fn inode(fd: RawFd) -> Option<u64> {
    // SAFETY: fstat writes into the live `st`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above, on an fd we hold.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st.st_ino)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn a_listener_on_a_bound_address_is_found_and_refused() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert!(probe(addr, Duration::ZERO).is_err());
        let mut g = Guard::new(&[addr]);
        g.next = Instant::now();
        assert_eq!(g.check(Instant::now(), &[]), Some(vec![0]));
        assert_eq!(g.check(Instant::now(), &[]), None, "once a second");
        g.next = Instant::now();
        assert_eq!(g.check(Instant::now(), &[]), Some(vec![]), "reported once");
        let mut g2 = Guard::new(&[addr]);
        g2.next = Instant::now();
        assert_eq!(
            g2.check(Instant::now(), &[l.as_raw_fd()]),
            Some(vec![]),
            "ours"
        );
        drop(l);
        assert!(probe(addr, Duration::ZERO).is_ok());
    }

    #[test]
    fn a_start_waits_for_a_listener_that_is_going_away() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(l);
        });
        let t = Instant::now();
        assert!(probe(addr, PROBE_PATIENCE).is_ok());
        assert!(t.elapsed() >= Duration::from_millis(250));
        closer.join().unwrap();
    }
}
