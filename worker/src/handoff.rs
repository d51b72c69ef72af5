//! Connections handed off by the front end: one SEQPACKET message per connection, whose payload
//! is the bytes already read from the client and whose ancillary data is the client's fd.
//! The same format goes the other way when a worker hands a connection back ([`send`]): the
//! payload is every byte not yet consumed, from the first byte of the request the worker does
//! not answer.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use crate::sockets::getsockopt_int;

/// Largest payload the front end sends (one request head as read so far).
pub(crate) const MAX_PAYLOAD: usize = 64 * 1024;
/// Room for this many fds, so a misbehaving sender's extra fds arrive (and get closed) instead
/// of being cut off.
const MAX_FDS: usize = 8;
const CONTROL_WORDS: usize =
    (MAX_FDS * size_of::<RawFd>() + 2 * size_of::<libc::cmsghdr>()) / 8 + 1;

/// Largest payload handed back (the front end's receive buffer for handed-back connections is
/// sized like the one for handoffs).
pub(crate) const MAX_HANDBACK: usize = MAX_PAYLOAD;

/// Sends one connection on the handoff socket `sock`: `payload` as the message, `fd` in
/// SCM_RIGHTS. Never blocks (MSG_DONTWAIT) and never raises SIGPIPE (MSG_NOSIGNAL). The caller
/// still owns `fd` and closes it after a successful send.
pub(crate) fn send(sock: RawFd, payload: &[u8], fd: RawFd) -> io::Result<()> {
    if payload.len() > MAX_HANDBACK {
        return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
    }
    let mut control = [0u64; CONTROL_WORDS];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
    debug_assert!(msg.msg_controllen <= size_of_val(&control));
    // SAFETY: `msg_control` points at `control`, which is 8-byte aligned and at least
    // CMSG_SPACE(one fd) long, so CMSG_FIRSTHDR is non-null and the header and one fd fit.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
        libc::CMSG_DATA(cmsg).cast::<RawFd>().write_unaligned(fd);
    }
    // SAFETY: `msg` points at live `iov` (which points at `payload`, only read) and `control`
    // for the duration of the call.
    let rc = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if rc as usize != payload.len() {
        // SEQPACKET sends whole messages; anything else is a kernel contract change.
        return Err(io::Error::other("short handoff send"));
    }
    Ok(())
}

/// A handed-off connection.
#[derive(Debug)]
pub(crate) struct Handoff {
    pub fd: OwnedFd,
    /// The start of the connection's input stream.
    pub bytes: Vec<u8>,
}

/// Why a message did not yield a connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandoffError {
    /// The front end closed its end of the socket.
    #[error("the handoff socket was closed by the front end")]
    Closed,
    /// The message was dropped (any fd it carried is closed).
    #[error("dropped a handoff message: {0}")]
    Dropped(&'static str),
}

/// The buffers of one outstanding recvmsg. Boxed so the self-referencing pointers stay valid
/// while the kernel holds them.
pub(crate) struct RecvBuf {
    msg: libc::msghdr,
    iov: libc::iovec,
    control: [u64; CONTROL_WORDS],
    data: Box<[u8]>,
}

impl RecvBuf {
    pub(crate) fn new() -> Box<Self> {
        // SAFETY: msghdr and iovec are plain C structs for which all-zero is valid.
        let (msg, iov) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        // One spare byte detects a payload larger than the contract allows.
        Box::new(RecvBuf {
            msg,
            iov,
            control: [0; CONTROL_WORDS],
            data: vec![0; MAX_PAYLOAD + 1].into_boxed_slice(),
        })
    }

    /// Resets the header for a new recvmsg and returns it. The pointer stays valid as long as
    /// `self` is neither moved nor dropped.
    pub(crate) fn prepare(&mut self) -> *mut libc::msghdr {
        self.iov = libc::iovec {
            iov_base: self.data.as_mut_ptr().cast(),
            iov_len: self.data.len(),
        };
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
    pub(crate) fn complete(&mut self, len: usize) -> Result<Handoff, HandoffError> {
        let fds = self.take_fds();
        let flags = self.msg.msg_flags;
        if flags & libc::MSG_CTRUNC != 0 {
            return Err(HandoffError::Dropped(
                "ancillary data truncated (MSG_CTRUNC)",
            ));
        }
        if flags & libc::MSG_TRUNC != 0 || len > MAX_PAYLOAD {
            return Err(HandoffError::Dropped("payload larger than 64 KiB"));
        }
        let mut fds = fds.into_iter();
        let (Some(fd), None) = (fds.next(), fds.next()) else {
            return if len == 0 && self.msg.msg_controllen == 0 {
                Err(HandoffError::Closed)
            } else {
                Err(HandoffError::Dropped(
                    "message does not carry exactly one fd",
                ))
            };
        };
        let ty = getsockopt_int(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SOL_SOCKET,
            libc::SO_TYPE,
        );
        if ty.ok() != Some(libc::SOCK_STREAM) {
            return Err(HandoffError::Dropped("the fd is not a stream socket"));
        }
        let mut bytes = Vec::with_capacity(len.max(4096));
        bytes.extend_from_slice(&self.data[..len]);
        Ok(Handoff { fd, bytes })
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
        fds
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

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

    #[test]
    fn handed_back_connection_arrives_with_payload_and_fd() {
        let (front, worker) = pair(libc::SOCK_SEQPACKET);
        let (client, conn) = pair(libc::SOCK_STREAM);
        send(
            worker.as_raw_fd(),
            b"GET /web/b HTTP/1.1\r\n",
            conn.as_raw_fd(),
        )
        .unwrap();
        drop(conn);
        let mut buf = RecvBuf::new();
        let msg = buf.prepare();
        // SAFETY: `msg` points into `buf`, which outlives the call.
        let n = unsafe { libc::recvmsg(front.as_raw_fd(), msg, libc::MSG_CMSG_CLOEXEC) };
        assert!(n > 0);
        let handoff = buf.complete(n as usize).unwrap();
        assert_eq!(handoff.bytes, b"GET /web/b HTTP/1.1\r\n");
        // The fd received is the same connection: what is written to it reaches the client.
        // SAFETY: writes 2 bytes from a live buffer to our own socket.
        unsafe { libc::write(handoff.fd.as_raw_fd(), b"ok".as_ptr().cast(), 2) };
        let mut got = [0u8; 2];
        // SAFETY: `got` is live and writable for its length.
        let n = unsafe { libc::read(client.as_raw_fd(), got.as_mut_ptr().cast(), 2) };
        assert_eq!((n, &got), (2, b"ok"));
    }

    #[test]
    fn oversized_hand_back_is_refused() {
        let (_front, worker) = pair(libc::SOCK_SEQPACKET);
        let (_client, conn) = pair(libc::SOCK_STREAM);
        let big = vec![b'x'; MAX_HANDBACK + 1];
        let e = send(worker.as_raw_fd(), &big, conn.as_raw_fd()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EMSGSIZE));
    }
}
