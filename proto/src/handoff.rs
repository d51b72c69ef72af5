//! Passing a connection between the front end and a pool's workers: one SOCK_SEQPACKET
//! message per connection on the pool's handoff channel, whose ancillary data is the
//! connection's fd (SCM_RIGHTS, exactly one) and whose payload is one flags byte followed by
//! the bytes already read from the connection (at most [`MAX_PAYLOAD`]). The front end hands
//! connections to the workers on its end; a worker hands one back (a later request belongs
//! elsewhere) on the workers' end, with every unconsumed byte from that request on.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub use crate::control::hung_up;

/// The front end routed the first request in the bytes to this pool: the worker serves it
/// without routing it again (so a disagreement, say about a cache entry that has just
/// expired, can never bounce a request between the two).
pub const ROUTED: u8 = 1;
/// The connection came back from a worker of another pool before the front end routed it
/// here (the access log's `handback`).
pub const HANDED_BACK: u8 = 2;

/// A TLS connection: the payload starts with its session (`sluice_tls::Session`'s
/// encoding: keys, sequence numbers, the SNI name, a partly received record), and the bytes
/// after it are plaintext the session already carried.
pub const TLS: u8 = 4;

/// A connection of the front end's own that carries only requests it routed to this pool
/// (the front end keeps the client's connection, `ownership::Owner::Shared`): the worker
/// serves every request on it and never hands it back. The payload starts with a PROXY v2
/// header (`proxy::header`) naming the client's address and the local address it reached.
pub const DELIVERED: u8 = 8;

/// The flags of a connection the front end routed to a pool, which reached the front end
/// by `arrival`.
pub fn routed_flags(arrival: crate::access::Arrival) -> u8 {
    match arrival {
        crate::access::Arrival::Handback => ROUTED | HANDED_BACK,
        _ => ROUTED,
    }
}

/// How a connection handed over with `flags` got here (the access log's `arrival`).
pub fn arrival(flags: u8) -> crate::access::Arrival {
    if flags & DELIVERED != 0 {
        crate::access::Arrival::Delivered
    } else if flags & HANDED_BACK != 0 {
        crate::access::Arrival::Handback
    } else {
        crate::access::Arrival::Dispatcher
    }
}

/// Most bytes a handoff carries: a whole head of the largest size a config allows, with room
/// for what arrived after it. Every side's buffers hold this much.
pub const MAX_PAYLOAD: usize = 4 * crate::limits::MAX_HEAD_LIMIT;

/// Room for this many fds, so a misbehaving sender's extra fds arrive (and get closed)
/// instead of being cut off.
const MAX_FDS: usize = 8;
const CONTROL_WORDS: usize =
    (MAX_FDS * size_of::<RawFd>() + 2 * size_of::<libc::cmsghdr>()) / 8 + 1;

/// Sends `conn` with `flags` and `bytes` on `channel`; never blocks or raises SIGPIPE. The
/// caller still owns `conn` and closes it after a successful send.
pub fn send(channel: RawFd, conn: RawFd, flags: u8, bytes: &[u8]) -> io::Result<()> {
    if bytes.len() > MAX_PAYLOAD {
        return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
    }
    let flag = [flags];
    let mut iov = [
        libc::iovec {
            iov_base: flag.as_ptr().cast_mut().cast(),
            iov_len: 1,
        },
        libc::iovec {
            iov_base: bytes.as_ptr().cast_mut().cast(),
            iov_len: bytes.len(),
        },
    ];
    let mut control = [0u64; CONTROL_WORDS];
    // SAFETY: msghdr is a plain C struct for which all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = 2;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
    // SAFETY: `msg_control` points at `control`, 8-byte aligned and at least CMSG_SPACE(one
    // fd) long, so CMSG_FIRSTHDR is non-null and the header and one fd fit.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
        libc::CMSG_DATA(cmsg).cast::<RawFd>().write_unaligned(conn);
    }
    // SAFETY: `msg` points at live `iov` (which point at `flag` and `bytes`, only read) and
    // `control` for the duration of the call.
    let rc = unsafe { libc::sendmsg(channel, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if rc as usize != bytes.len() + 1 {
        return Err(io::Error::other("short handoff send"));
    }
    Ok(())
}

/// A received connection: its fd, the sender's flags and the bytes it had read.
#[derive(Debug)]
pub struct Received<'a> {
    pub fd: OwnedFd,
    pub flags: u8,
    pub bytes: &'a [u8],
}

/// Why a message did not yield a connection (any fd it carried is closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandoffError {
    #[error("dropped a handoff message: ancillary data truncated")]
    ControlTruncated,
    #[error("dropped a handoff message: larger than {MAX_PAYLOAD} bytes")]
    TooLarge,
    #[error("dropped a handoff message: it does not carry exactly one fd")]
    Fds,
    /// An empty datagram, or the end of the channel (see [`hung_up`]).
    #[error("an empty handoff message")]
    Empty,
    #[error("dropped a handoff message: the fd is not a TCP connection")]
    NotStream,
}

/// The buffers of one recvmsg (sendmsg's receiving side), for a plain call or an io_uring
/// RecvMsg. Boxed so the self-referencing pointers stay valid while the kernel holds them.
pub struct RecvBuf {
    msg: libc::msghdr,
    iov: libc::iovec,
    control: [u64; CONTROL_WORDS],
    data: Box<[u8]>,
}

impl RecvBuf {
    pub fn new() -> Box<RecvBuf> {
        // SAFETY: msghdr and iovec are plain C structs for which all-zero is valid.
        let (msg, iov) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        Box::new(RecvBuf {
            msg,
            iov,
            control: [0; CONTROL_WORDS],
            // The flags byte, the payload, and one spare byte that tells a larger one.
            data: vec![0; MAX_PAYLOAD + 2].into_boxed_slice(),
        })
    }

    /// Resets the header for a new recvmsg and returns it. The pointer stays valid as long as
    /// `self` is neither moved nor dropped.
    pub fn prepare(&mut self) -> *mut libc::msghdr {
        self.iov = libc::iovec {
            iov_base: self.data.as_mut_ptr().cast(),
            iov_len: self.data.len(),
        };
        self.control = [0; CONTROL_WORDS];
        self.msg.msg_name = std::ptr::null_mut();
        self.msg.msg_namelen = 0;
        self.msg.msg_iov = &raw mut self.iov;
        self.msg.msg_iovlen = 1;
        self.msg.msg_control = self.control.as_mut_ptr().cast();
        self.msg.msg_controllen = size_of_val(&self.control);
        self.msg.msg_flags = 0;
        &raw mut self.msg
    }

    /// Interprets a completed recvmsg that returned `len` bytes.
    pub fn complete(&mut self, len: usize) -> Result<Received<'_>, HandoffError> {
        let had_control = self.msg.msg_controllen != 0;
        let fds = self.take_fds();
        if self.msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(HandoffError::ControlTruncated);
        }
        if self.msg.msg_flags & libc::MSG_TRUNC != 0 || len > MAX_PAYLOAD + 1 {
            return Err(HandoffError::TooLarge);
        }
        let mut fds = fds.into_iter();
        let (Some(fd), None) = (fds.next(), fds.next()) else {
            // recvmsg returns 0 both at EOF and for an empty datagram: the caller tells them
            // apart with `hung_up`.
            return Err(match (len, had_control) {
                (0, false) => HandoffError::Empty,
                _ => HandoffError::Fds,
            });
        };
        if len == 0 {
            return Err(HandoffError::Empty);
        }
        // A client's TCP connection, nothing else: not a listener, not a unix socket (but
        // for the front end's own delivery channel, a stream socketpair).
        let flags = self.data[0];
        let domain = crate::sockaddr::socket_option(fd.as_raw_fd(), libc::SO_DOMAIN);
        let domain_ok = match domain {
            Some(libc::AF_INET | libc::AF_INET6) => flags & DELIVERED == 0,
            Some(libc::AF_UNIX) => flags & DELIVERED != 0,
            _ => false,
        };
        if crate::sockaddr::socket_option(fd.as_raw_fd(), libc::SO_TYPE) != Some(libc::SOCK_STREAM)
            || !domain_ok
            || crate::sockaddr::socket_option(fd.as_raw_fd(), libc::SO_ACCEPTCONN) != Some(0)
        {
            return Err(HandoffError::NotStream);
        }
        Ok(Received {
            fd,
            flags,
            bytes: &self.data[1..len],
        })
    }

    /// Takes ownership of every fd in SCM_RIGHTS messages, so none can leak.
    fn take_fds(&mut self) -> Vec<OwnedFd> {
        let mut fds = Vec::new();
        if self.msg.msg_controllen > size_of_val(&self.control) {
            return fds;
        }
        // SAFETY: the kernel filled `control` with `msg_controllen` bytes of cmsgs; the CMSG_*
        // macros walk only within that length, and each SCM_RIGHTS payload holds fds the
        // kernel just installed in this process, owned by nobody else.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&self.msg);
            while !cmsg.is_null() {
                let hdr = &*cmsg;
                if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
                    let payload = hdr.cmsg_len - libc::CMSG_LEN(0) as usize;
                    let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                    for i in 0..payload / size_of::<RawFd>() {
                        let fd = data.add(i).read_unaligned();
                        if fd >= 0 {
                            fds.push(OwnedFd::from_raw_fd(fd));
                        }
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&self.msg, cmsg);
            }
        }
        self.msg.msg_controllen = 0;
        fds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(ty: libc::c_int) -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair(2) writes two fds into the live array.
        let rc = unsafe {
            libc::socketpair(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())
        };
        assert_eq!(rc, 0);
        // SAFETY: both fds are new and owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// A loopback TCP connection: (client end, server end).
    fn tcp_pair() -> (OwnedFd, OwnedFd) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        (OwnedFd::from(client), OwnedFd::from(server))
    }

    fn recv(buf: &mut RecvBuf, fd: &OwnedFd) -> usize {
        let msg = buf.prepare();
        // SAFETY: `msg` points into `buf`, which outlives the call.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), msg, libc::MSG_CMSG_CLOEXEC) };
        assert!(n >= 0, "{}", io::Error::last_os_error());
        n as usize
    }

    #[test]
    fn a_handed_back_connection_is_known_as_one_where_it_lands() {
        use crate::access::Arrival;
        for a in [Arrival::Dispatcher, Arrival::Handback] {
            assert_eq!(arrival(routed_flags(a)), a);
            assert_ne!(routed_flags(a) & ROUTED, 0);
        }
    }

    #[test]
    fn a_connection_arrives_with_its_flags_and_bytes() {
        let (front, worker) = pair(libc::SOCK_SEQPACKET);
        let (client, conn) = tcp_pair();
        send(
            front.as_raw_fd(),
            conn.as_raw_fd(),
            ROUTED,
            b"GET / HTTP/1.1\r\n",
        )
        .unwrap();
        drop(conn);
        let mut buf = RecvBuf::new();
        let n = recv(&mut buf, &worker);
        let got = buf.complete(n).unwrap();
        assert_eq!((got.flags, got.bytes), (ROUTED, &b"GET / HTTP/1.1\r\n"[..]));
        // SAFETY: writes 2 bytes from a live buffer to our own socket.
        unsafe { libc::write(got.fd.as_raw_fd(), b"ok".as_ptr().cast(), 2) };
        let mut two = [0u8; 2];
        // SAFETY: `two` is live and writable.
        let r = unsafe { libc::read(client.as_raw_fd(), two.as_mut_ptr().cast(), 2) };
        assert_eq!((r, &two), (2, b"ok"));
    }

    #[test]
    fn the_largest_payload_fits_and_a_larger_one_is_refused() {
        let (front, worker) = pair(libc::SOCK_SEQPACKET);
        let (_client, conn) = tcp_pair();
        for fd in [front.as_raw_fd(), worker.as_raw_fd()] {
            let size: libc::c_int = 4 << 20;
            // SAFETY: setsockopt with a live int.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUFFORCE,
                    (&raw const size).cast(),
                    4,
                );
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&raw const size).cast(),
                    4,
                );
            }
        }
        let big = vec![b'x'; MAX_PAYLOAD];
        send(front.as_raw_fd(), conn.as_raw_fd(), 0, &big).unwrap();
        let mut buf = RecvBuf::new();
        let n = recv(&mut buf, &worker);
        assert_eq!(buf.complete(n).unwrap().bytes.len(), MAX_PAYLOAD);
        let e = send(
            front.as_raw_fd(),
            conn.as_raw_fd(),
            0,
            &vec![0; MAX_PAYLOAD + 1],
        )
        .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EMSGSIZE));
    }

    #[test]
    fn a_message_without_a_tcp_connection_is_dropped() {
        let (front, worker) = pair(libc::SOCK_SEQPACKET);
        let (other, _keep) = pair(libc::SOCK_SEQPACKET);
        let (unix, _keep2) = pair(libc::SOCK_STREAM);
        let listener = OwnedFd::from(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
        let mut buf = RecvBuf::new();
        for fd in [&other, &unix, &listener] {
            send(front.as_raw_fd(), fd.as_raw_fd(), 0, b"x").unwrap();
            let n = recv(&mut buf, &worker);
            assert_eq!(buf.complete(n).unwrap_err(), HandoffError::NotStream);
        }
        // An empty datagram without fds is not the channel closing.
        // SAFETY: a plain empty datagram.
        unsafe { libc::send(front.as_raw_fd(), b"".as_ptr().cast(), 0, 0) };
        let n = recv(&mut buf, &worker);
        assert_eq!(buf.complete(n).unwrap_err(), HandoffError::Empty);
        // SAFETY: a plain datagram without fds.
        unsafe { libc::send(front.as_raw_fd(), b"xy".as_ptr().cast(), 2, 0) };
        let n = recv(&mut buf, &worker);
        assert_eq!(buf.complete(n).unwrap_err(), HandoffError::Fds);
        assert!(!hung_up(worker.as_raw_fd()));
        drop(front);
        let n = recv(&mut buf, &worker);
        assert_eq!(buf.complete(n).unwrap_err(), HandoffError::Empty);
        assert!(hung_up(worker.as_raw_fd()));
    }
}
