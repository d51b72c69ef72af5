//! A socket pool's side of a TLS connection. A socket pool's server reads plaintext from its
//! listening socket and knows nothing of sessions, so the TLS thread opens a connection of
//! the front end's own into the pool's queue (`crate::direct`, as the relay does for plain
//! connections), writes the plaintext it opens there and seals what comes back. Each side's
//! backlog is bounded by `WINDOW`: past it, the other side is not read.

use std::{io, os::fd::AsRawFd};

use crate::direct::DirectConn;

/// Bytes waiting for one side before the other is no longer read.
pub const WINDOW: usize = 256 * 1024;
const CHUNK: usize = 16 * 1024;

/// Where a relayed TLS connection's plaintext goes.
pub enum Link {
    /// A socket pool's queue, through a connection of the front end's own.
    Pool(DirectConn),
    /// The delivery thread, through a socketpair (a shared host: each request is delivered
    /// to its own pool).
    Delivery(std::os::fd::OwnedFd),
}

impl Link {
    pub fn fd(&self) -> std::os::fd::RawFd {
        match self {
            Link::Pool(c) => c.fd.as_raw_fd(),
            Link::Delivery(fd) => fd.as_raw_fd(),
        }
    }
}

pub struct Upstream {
    pub conn: Link,
    pub connected: bool,
    /// Plaintext for the pool, and how much of it is written.
    out: Vec<u8>,
    sent: usize,
    /// The client is done sending: our write side to the pool shuts once `out` is written.
    pub client_done: bool,
    shut: bool,
    /// The pool's server closed its side.
    pub ended: bool,
    /// The events registered for it now.
    pub mask: u32,
    /// The pool's answer read by the last `read`, for the caller to seal (kept: one
    /// allocation per connection, not per read).
    pub answer: Vec<u8>,
}

/// What reading the pool gave.
pub enum Read {
    /// Plaintext for the client (maybe none yet).
    Data,
    /// The pool's server closed.
    Ended,
}

impl Upstream {
    pub fn new(conn: Link, connected: bool, first: Vec<u8>) -> Upstream {
        Upstream {
            conn,
            connected,
            out: first,
            sent: 0,
            client_done: false,
            shut: false,
            ended: false,
            mask: 0,
            answer: Vec::new(),
        }
    }

    /// Plaintext not yet written to the pool.
    pub fn backlog(&self) -> usize {
        self.out.len() - self.sent
    }

    pub fn push(&mut self, plain: &[u8]) {
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        }
        self.out.extend_from_slice(plain);
    }

    /// Writes what it can; shuts the pool's side once the client is done and all is written.
    pub fn write(&mut self) -> io::Result<()> {
        if !self.connected {
            return Ok(());
        }
        if !crate::epoll::send_pending(self.conn.fd(), &self.out, &mut self.sent)? {
            return Ok(());
        }
        self.out.clear();
        self.sent = 0;
        if self.client_done && !self.shut {
            self.shut = true;
            // SAFETY: shutdown of the write side of a connection we own.
            unsafe { libc::shutdown(self.conn.fd(), libc::SHUT_WR) };
        }
        Ok(())
    }

    /// Reads the pool's answer onto `answer` while `room` allows.
    pub fn read(&mut self, room: usize) -> io::Result<Read> {
        while self.connected && self.answer.len() < room {
            // Into the spare capacity: no zeroing of the room per read.
            self.answer.reserve(CHUNK);
            let spare = self.answer.spare_capacity_mut();
            // SAFETY: recv writes at most `spare.len()` bytes into the live spare capacity.
            let n =
                unsafe { libc::recv(self.conn.fd(), spare.as_mut_ptr().cast(), spare.len(), 0) };
            if n > 0 {
                let len = self.answer.len() + n as usize;
                // SAFETY: the kernel initialized the `n` bytes after the old length.
                unsafe { self.answer.set_len(len) };
            }
            if n == 0 {
                self.ended = true;
                return Ok(Read::Ended);
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EAGAIN) {
                    break;
                }
                return Err(e);
            }
        }
        Ok(Read::Data)
    }
}
