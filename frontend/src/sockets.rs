//! The listening sockets: per listen address one SO_REUSEPORT group holding the dispatcher's
//! socket and every pool's sockets, and per pool the SOCK_SEQPACKET pair the dispatcher hands
//! connections over. The front end holds all of them for its whole life, so a pool's queue
//! outlives any worker.

use std::{
    io,
    mem::{size_of, size_of_val},
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{what} for {addr}: {cause}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        cause: io::Error,
    },
    #[error("handoff socket pair: {0}")]
    Handoff(io::Error),
}

/// Backlog of the dispatcher's own socket: what the kernel could not steer waits here.
pub const DISPATCHER_BACKLOG: i32 = 4096;
/// TCP Fast Open queue on every listener (syn mode steers TFO SYNs).
const TFO_QUEUE: i32 = 1024;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn setopt(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: passes a pointer to a live i32 and its size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as u32,
        )
    })
    .map(drop)
}

pub(crate) fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            size_of_val(&sin)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6 and suitably aligned.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of_val(&sin6)
        }
    };
    (ss, len as libc::socklen_t)
}

/// A listening TCP socket in the reuseport group of `addr`.
pub fn listener(addr: SocketAddr, backlog: i32) -> Result<OwnedFd, SocketError> {
    let err = |what| move |cause| SocketError::Listen { what, addr, cause };
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = cvt(unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })
        .map_err(err("socket"))?;
    // SAFETY: fd was just returned by socket(2) and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = fd.as_raw_fd();
    setopt(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).map_err(err("SO_REUSEADDR"))?;
    setopt(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1).map_err(err("SO_REUSEPORT"))?;
    if addr.is_ipv6() {
        // [::]:port and 0.0.0.0:port are separate groups.
        setopt(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1).map_err(err("IPV6_V6ONLY"))?;
    }
    let _ = setopt(raw, libc::IPPROTO_TCP, libc::TCP_FASTOPEN, TFO_QUEUE);
    // Accepted connections inherit it: a server that writes a head and a body separately
    // (uvicorn given a socket by fd does not set it itself) would otherwise wait out the
    // client's delayed ACK, 40 ms per response.
    setopt(raw, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1).map_err(err("TCP_NODELAY"))?;
    let (ss, len) = sockaddr(&addr);
    // SAFETY: ss/len describe a valid sockaddr for this family.
    cvt(unsafe { libc::bind(raw, (&ss as *const libc::sockaddr_storage).cast(), len) })
        .map_err(err("bind"))?;
    // SAFETY: listen(2) on our socket.
    cvt(unsafe { libc::listen(raw, backlog) }).map_err(err("listen"))?;
    Ok(fd)
}

/// A listening socket kept from an earlier run (systemd's fd store), with this config's
/// backlog.
pub fn relisten(fd: OwnedFd, backlog: i32) -> Result<OwnedFd, SocketError> {
    // SAFETY: listen(2) on a socket we own; on a listening socket it only sets the backlog.
    if unsafe { libc::listen(fd.as_raw_fd(), backlog) } < 0 {
        let addr = sluice_proto::sockaddr::local(fd.as_raw_fd())
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        return Err(SocketError::Listen {
            what: "listen",
            addr,
            cause: io::Error::last_os_error(),
        });
    }
    Ok(fd)
}

/// The dispatcher's end and the workers' end of a pool's handoff channel.
pub struct HandoffPair {
    pub frontend: OwnedFd,
    pub workers: OwnedFd,
}

/// Bytes the front end may have queued towards a pool's workers (handoffs wait here while
/// the pool's workers restart).
const HANDOFF_SNDBUF: i32 = 8 << 20;

pub fn handoff_pair() -> Result<HandoffPair, SocketError> {
    let mut fds = [0; 2];
    // SAFETY: socketpair(2) writes two fds into the array.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })
    .map_err(SocketError::Handoff)?;
    // SAFETY: both fds were just created and are owned by nothing else.
    let (frontend, workers) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let raw = frontend.as_raw_fd();
    // As root the limit can be raised past wmem_max; otherwise take what we get.
    if setopt(raw, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, HANDOFF_SNDBUF).is_err() {
        let _ = setopt(raw, libc::SOL_SOCKET, libc::SO_SNDBUF, HANDOFF_SNDBUF);
    }
    let _ = setopt(
        workers.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        HANDOFF_SNDBUF,
    );
    // SAFETY: fcntl on our own fd.
    unsafe {
        let flags = libc::fcntl(raw, libc::F_GETFL);
        cvt(libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK))
            .map_err(SocketError::Handoff)?;
    }
    Ok(HandoffPair { frontend, workers })
}

/// Connections waiting in a listening socket's accept queue.
pub fn queued(fd: RawFd) -> io::Result<u32> {
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes into it.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
        cvt(libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        ))?;
        // On a LISTEN socket tcpi_unacked is the accept-queue length.
        Ok(info.tcpi_unacked)
    }
}

/// A non-blocking TCP socket bound to `ip` on a port the kernel picks; returns it and the
/// port. The front end's own connections into a pool's queue start here (see `direct`).
pub fn bound_stream(ip: std::net::IpAddr) -> io::Result<(OwnedFd, u16)> {
    let family = if ip.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = cvt(unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?;
    // SAFETY: fd was just returned by socket(2) and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let (ss, len) = sockaddr(&SocketAddr::new(ip, 0));
    // SAFETY: ss/len describe a valid sockaddr for this family.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    })?;
    let port = sluice_proto::sockaddr::local(fd.as_raw_fd())
        .map(|a| a.port())
        .ok_or_else(|| io::Error::other("getsockname after bind"))?;
    Ok((fd, port))
}

/// Starts connecting non-blocking `fd` to `addr`: Ok(true) when connected already, Ok(false)
/// while in progress (wait for writable, then `connect_result`).
pub fn connect_start(fd: RawFd, addr: SocketAddr) -> io::Result<bool> {
    let (ss, len) = sockaddr(&addr);
    // SAFETY: ss/len describe a valid sockaddr for this family.
    match cvt(unsafe { libc::connect(fd, (&ss as *const libc::sockaddr_storage).cast(), len) }) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether a non-blocking connect has ended: Ok(false) while its handshake is under way,
/// Ok(true) once connected, Err when it failed.
pub fn connected(fd: RawFd) -> io::Result<bool> {
    connect_result(fd)?;
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: polls one live pollfd without waiting.
    let writable = unsafe { libc::poll(&mut pfd, 1, 0) == 1 && pfd.revents & libc::POLLOUT != 0 };
    Ok(writable)
}

/// The outcome of a non-blocking connect that became writable.
pub fn connect_result(fd: RawFd) -> io::Result<()> {
    let mut err: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: reads one int into a live variable.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    if err == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(err))
    }
}
