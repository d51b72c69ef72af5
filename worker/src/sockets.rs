//! Where a worker's sockets come from: inherited from the front end (`LISTEN_FDS`, systemd
//! socket-activation convention) or bound here in standalone mode.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use crate::Error;

use sluice_proto::env::{
    FD_CONTROL, FD_HANDOFF, FD_POOL, LISTEN_FDNAMES, LISTEN_FDS, LISTEN_FDS_START, LISTEN_PID,
};
const BACKLOG: libc::c_int = 1024;
const FASTOPEN_QUEUE: libc::c_int = 1024;

/// The sockets a worker serves.
#[derive(Debug)]
pub(crate) struct Sockets {
    /// Listening TCP sockets of the pool (never shut down: the front end shares them).
    pub pools: Vec<OwnedFd>,
    /// The pool's SEQPACKET socket that delivers handed-off connections.
    pub handoff: Option<OwnedFd>,
    /// The private SEQPACKET control channel to the front end (see `control.rs`).
    pub control: Option<OwnedFd>,
    /// True when the sockets came from the front end.
    pub inherited: bool,
    /// Inherited fds with names this worker does not use, kept open as the contract says.
    _other: Vec<OwnedFd>,
}

impl Sockets {
    /// Inherited sockets when `LISTEN_FDS` names any for this process, else `listen` bound
    /// here, else [`Error::NoSockets`].
    pub(crate) fn acquire(listen: &[SocketAddr]) -> Result<Self, Error> {
        if let Some(sockets) = inherited()? {
            if sockets.pools.is_empty() && sockets.handoff.is_none() {
                log::warn!("LISTEN_FDS holds no `pool` or `handoff` socket");
            } else {
                if !listen.is_empty() {
                    log::warn!(
                        "serving the inherited sockets; ignoring listen addresses {listen:?}"
                    );
                }
                return Ok(sockets);
            }
        }
        if listen.is_empty() {
            return Err(Error::NoSockets);
        }
        let pools = listen
            .iter()
            .map(|&addr| bind(addr))
            .collect::<Result<_, _>>()?;
        Ok(Sockets {
            pools,
            handoff: None,
            control: None,
            inherited: false,
            _other: Vec::new(),
        })
    }

    /// Sockets set up by a test, as if inherited.
    #[cfg(test)]
    pub(crate) fn for_test(
        pools: Vec<OwnedFd>,
        handoff: Option<OwnedFd>,
        control: Option<OwnedFd>,
    ) -> Self {
        Sockets {
            pools,
            handoff,
            control,
            inherited: true,
            _other: Vec::new(),
        }
    }
}

/// Reads (and unsets) `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES`.
fn inherited() -> Result<Option<Sockets>, Error> {
    let Ok(count) = std::env::var(LISTEN_FDS) else {
        return Ok(None);
    };
    let pid = std::env::var(LISTEN_PID).ok();
    let names = std::env::var(LISTEN_FDNAMES).unwrap_or_default();
    for var in [LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES] {
        // SAFETY: `run`/`run_with` are documented to be called from `main` before other
        // threads exist; nothing else reads or writes the environment concurrently.
        unsafe { std::env::remove_var(var) };
    }
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(std::process::id())
    {
        log::warn!(
            "LISTEN_PID={pid} is not this process ({}); ignoring LISTEN_FDS",
            std::process::id()
        );
        return Ok(None);
    }
    let count: RawFd =
        count
            .trim()
            .parse()
            .map_err(|e: std::num::ParseIntError| Error::InvalidEnv {
                name: LISTEN_FDS,
                value: count.clone(),
                reason: e.to_string(),
            })?;
    let mut names = names.split(':');
    let mut sockets = Sockets {
        pools: Vec::new(),
        handoff: None,
        control: None,
        inherited: true,
        _other: Vec::new(),
    };
    for fd in LISTEN_FDS_START..LISTEN_FDS_START.saturating_add(count.max(0)) {
        let name = names.next().unwrap_or("unknown");
        // SAFETY: the socket-activation convention hands fds 3..3+LISTEN_FDS to this process
        // and nothing else in it owns them; we take ownership exactly once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        set_cloexec(fd).map_err(|source| Error::Os {
            what: "setting FD_CLOEXEC on an inherited fd",
            source,
        })?;
        match name {
            FD_POOL => {
                if getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN).ok() != Some(1) {
                    return Err(Error::BadInheritedFd {
                        fd,
                        name: name.into(),
                        expected: "a listening socket",
                    });
                }
                sockets.pools.push(owned);
            }
            FD_HANDOFF if sockets.handoff.is_none() => {
                if getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE).ok()
                    != Some(libc::SOCK_SEQPACKET)
                {
                    return Err(Error::BadInheritedFd {
                        fd,
                        name: name.into(),
                        expected: "a SOCK_SEQPACKET socket",
                    });
                }
                sockets.handoff = Some(owned);
            }
            FD_CONTROL if sockets.control.is_none() => {
                if getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE).ok()
                    != Some(libc::SOCK_SEQPACKET)
                {
                    return Err(Error::BadInheritedFd {
                        fd,
                        name: name.into(),
                        expected: "a SOCK_SEQPACKET socket",
                    });
                }
                sockets.control = Some(owned);
            }
            _ => {
                log::debug!("inherited fd {fd} named {name:?} is not used");
                sockets._other.push(owned);
            }
        }
    }
    log::info!(
        "inherited {} pool socket(s){}{} from the front end",
        sockets.pools.len(),
        if sockets.handoff.is_some() {
            ", a handoff socket"
        } else {
            ""
        },
        if sockets.control.is_some() {
            ", a control socket"
        } else {
            ""
        }
    );
    Ok(Some(sockets))
}

/// Binds a listening socket for standalone mode: SO_REUSEPORT so several processes can share
/// the port, backlog 1024, TCP Fast Open queue 1024 when the kernel allows it.
fn bind(addr: SocketAddr) -> Result<OwnedFd, Error> {
    let bind_err = |source| Error::Bind { addr, source };
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2) call; the result is checked and owned immediately.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(bind_err(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).map_err(bind_err)?;
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1).map_err(bind_err)?;
    if addr.is_ipv6() {
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1).map_err(bind_err)?;
    }
    let (storage, len) = sockaddr(addr);
    // SAFETY: `storage` holds a valid sockaddr of `len` bytes for this address family.
    if unsafe { libc::bind(fd, (&raw const storage).cast(), len) } < 0 {
        return Err(bind_err(io::Error::last_os_error()));
    }
    // SAFETY: listen(2) on a socket we own.
    if unsafe { libc::listen(fd, BACKLOG) } < 0 {
        return Err(bind_err(io::Error::last_os_error()));
    }
    if let Err(e) = setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_FASTOPEN, FASTOPEN_QUEUE) {
        log::debug!("TCP_FASTOPEN on {addr}: {e}");
    }
    log::info!("listening on {addr}");
    Ok(sock)
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl(2) F_GETFD/F_SETFD on an fd this process owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(crate) fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and the length passed matches it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub(crate) fn getsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live and describe a c_int-sized buffer.
    let rc = unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &mut len) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value)
    }
}
