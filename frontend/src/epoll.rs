//! epoll(7) for the front end's readiness loops (the relay, the TLS thread): one owner of the
//! instance and of its event buffer, registration by token, waits that ride over EINTR.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

pub const IN: u32 = libc::EPOLLIN as u32;
pub const OUT: u32 = libc::EPOLLOUT as u32;
pub const RDHUP: u32 = libc::EPOLLRDHUP as u32;
/// Any sign the peer is gone or the socket failed.
pub const ENDED: u32 = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
/// Reported whatever the interest: both directions shut, or an error.
pub const GONE: u32 = (libc::EPOLLHUP | libc::EPOLLERR) as u32;

pub struct Epoll {
    fd: OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 with flags only.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Epoll {
            // SAFETY: just created, owned by nothing else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 256],
        })
    }

    fn ctl(&self, op: i32, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: (de)registers an fd with our epoll instance; `ev` is live for the call.
        if unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, token)
    }

    pub fn modify(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    /// Out of the set. Closing an fd is not enough when its open file lives on elsewhere (a
    /// connection handed to a worker): epoll keys on the file.
    pub fn delete(&self, fd: RawFd) {
        let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0);
    }

    /// Waits up to `timeout_ms`; how many events are ready (`ready(i)` for each; 0 after a
    /// signal).
    pub fn wait(&mut self, timeout_ms: i32) -> io::Result<usize> {
        // SAFETY: epoll_wait writes at most `events.len()` entries into the live vector.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                self.events.as_mut_ptr(),
                self.events.len() as i32,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(0)
            } else {
                Err(e)
            };
        }
        Ok(n as usize)
    }

    /// The `i`th ready event of the last wait: (token, events).
    pub fn ready(&self, i: usize) -> (u64, u32) {
        let e = self.events[i];
        (e.u64, e.events)
    }
}

pub fn set_nonblocking(fd: RawFd, on: bool) {
    // SAFETY: fcntl flag changes on an fd the caller holds.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        let fl = if on {
            fl | libc::O_NONBLOCK
        } else {
            fl & !libc::O_NONBLOCK
        };
        libc::fcntl(fd, libc::F_SETFL, fl);
    }
}

/// Sends `buf[*sent..]` on a non-blocking socket; true once all of it is sent, false when the
/// socket takes no more for now.
pub fn send_pending(fd: RawFd, buf: &[u8], sent: &mut usize) -> io::Result<bool> {
    while *sent < buf.len() {
        let rest = &buf[*sent..];
        // SAFETY: sends from a live buffer on a socket the caller holds.
        let n = unsafe {
            libc::send(
                fd,
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                return Ok(false);
            }
            return Err(e);
        }
        *sent += n as usize;
    }
    Ok(true)
}
