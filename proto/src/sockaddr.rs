//! A socket's own and peer addresses (getsockname, getpeername), and its integer options.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;

/// An integer `SOL_SOCKET` option of `fd` (`SO_TYPE`, `SO_ACCEPTCONN`, ...).
pub fn socket_option(fd: RawFd, opt: libc::c_int) -> Option<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the live `value`.
    let rc =
        unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&raw mut value).cast(), &mut len) };
    (rc == 0).then_some(value)
}

/// The address `fd` is bound to locally.
pub fn local(fd: RawFd) -> Option<SocketAddr> {
    // SAFETY: getsockname only writes the sockaddr and length it is given.
    read(|ss, len| unsafe { libc::getsockname(fd, ss, len) })
}

/// The address of `fd`'s peer.
pub fn peer(fd: RawFd) -> Option<SocketAddr> {
    // SAFETY: getpeername only writes the sockaddr and length it is given.
    read(|ss, len| unsafe { libc::getpeername(fd, ss, len) })
}

fn read(
    call: impl FnOnce(*mut libc::sockaddr, *mut libc::socklen_t) -> libc::c_int,
) -> Option<SocketAddr> {
    // SAFETY: an all-zero sockaddr_storage is a valid value for the call to fill.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    if call((&raw mut ss).cast(), &mut len) != 0 {
        return None;
    }
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in for an AF_INET socket.
            let sin: libc::sockaddr_in = unsafe { std::ptr::read((&raw const ss).cast()) };
            let ip = IpAddr::V4(u32::from_be(sin.sin_addr.s_addr).into());
            Some(SocketAddr::new(ip, u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 for an AF_INET6 socket.
            let sin6: libc::sockaddr_in6 = unsafe { std::ptr::read((&raw const ss).cast()) };
            let ip = IpAddr::V6(sin6.sin6_addr.s6_addr.into());
            Some(SocketAddr::new(ip, u16::from_be(sin6.sin6_port)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ends_of_a_connection_are_read_back() {
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert_eq!(local(l.as_raw_fd()), Some(l.local_addr().unwrap()));
        assert_eq!(peer(c.as_raw_fd()), Some(l.local_addr().unwrap()));
        assert_eq!(local(c.as_raw_fd()), Some(c.local_addr().unwrap()));
        assert_eq!(peer(-1), None);
    }
}
