//! Passing a connection, with the bytes already read from it, to a pool's workers: one
//! SOCK_SEQPACKET message carrying the bytes and the fd (SCM_RIGHTS).

use std::{io, os::fd::RawFd};

pub fn send(channel: RawFd, conn: RawFd, bytes: &[u8]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // Room for one cmsghdr carrying one int, u64-aligned.
    let mut control = [0u64; 4];
    // SAFETY: builds a msghdr over live buffers and sends it; CMSG_* stay within `control`.
    unsafe {
        let space = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), conn);
        let n = libc::sendmsg(channel, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Largest handoff message: a request head, or what a worker hands back (it answers 503
/// instead of handing back more).
pub const MAX_MESSAGE: usize = 256 * 1024;

/// Room to receive one handoff message (the dispatcher drains a stopped pool's channel).
pub struct Incoming {
    msg: libc::msghdr,
    iov: libc::iovec,
    buf: Vec<u8>,
    control: [u64; 8],
}

impl Incoming {
    pub fn new() -> Incoming {
        // SAFETY: msghdr and iovec are plain data; all-zero is valid and filled in by recv().
        unsafe {
            Incoming {
                msg: std::mem::zeroed(),
                iov: std::mem::zeroed(),
                buf: vec![0; MAX_MESSAGE],
                control: [0; 8],
            }
        }
    }

    /// A RecvMsg for `channel`; `self` must stay put (it is boxed) until it completes.
    pub fn recv(&mut self, channel: RawFd, user_data: u64) -> io_uring::squeue::Entry {
        self.iov = libc::iovec {
            iov_base: self.buf.as_mut_ptr().cast(),
            iov_len: self.buf.len(),
        };
        self.control = [0; 8];
        self.msg.msg_name = std::ptr::null_mut();
        self.msg.msg_namelen = 0;
        self.msg.msg_iov = &mut self.iov;
        self.msg.msg_iovlen = 1;
        self.msg.msg_control = self.control.as_mut_ptr().cast();
        self.msg.msg_controllen = std::mem::size_of_val(&self.control);
        self.msg.msg_flags = 0;
        io_uring::opcode::RecvMsg::new(io_uring::types::Fd(channel), &mut self.msg)
            .flags(libc::MSG_CMSG_CLOEXEC as u32)
            .build()
            .user_data(user_data)
    }

    /// The first `n` bytes of the last message.
    pub fn bytes(&self, n: usize) -> &[u8] {
        &self.buf[..n.min(self.buf.len())]
    }

    /// The last message did not fit.
    pub fn truncated(&self) -> bool {
        self.msg.msg_flags & libc::MSG_TRUNC != 0
    }

    /// The connection fd the last message carried.
    pub fn take_fd(&mut self) -> Option<RawFd> {
        // SAFETY: walks the control buffer the kernel filled, within msg_controllen.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&self.msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
                    self.msg.msg_controllen = 0;
                    return Some(fd);
                }
                cmsg = libc::CMSG_NXTHDR(&self.msg, cmsg);
            }
        }
        None
    }
}
