//! One direction of a relay: bytes move from a socket into a pipe and from the pipe into the
//! other socket with splice(2), so the kernel moves the pages and no byte of a body passes
//! through the front end's memory.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

/// Bytes asked of one splice from a socket (the pipe's default capacity).
const CHUNK: usize = 64 * 1024;

/// What a direction is waiting for after a `pump`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// The source has nothing more now, or the destination is full.
    Wait,
    /// The source ended and the destination was told (shutdown for writing).
    Done,
}

pub struct Pump {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes in the pipe not yet given to the destination.
    held: usize,
    eof: bool,
    done: bool,
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice(2) between two fds we own, with no offsets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl Pump {
    pub fn new() -> io::Result<Pump> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just created and are owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pump {
            read,
            write,
            held: 0,
            eof: false,
            done: false,
        })
    }

    pub fn done(&self) -> bool {
        self.done
    }

    /// Moves what it can from `src` to `dst`; an error means the relay is over.
    pub fn pump(&mut self, src: RawFd, dst: RawFd) -> io::Result<Flow> {
        loop {
            if self.done {
                return Ok(Flow::Done);
            }
            if self.held > 0 {
                match splice(self.read.as_raw_fd(), dst, self.held) {
                    Ok(n) => self.held -= n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flow::Wait),
                    Err(e) => return Err(e),
                }
                continue;
            }
            if self.eof {
                // SAFETY: shutdown(2) on a socket we own.
                unsafe { libc::shutdown(dst, libc::SHUT_WR) };
                self.done = true;
                continue;
            }
            match splice(src, self.write.as_raw_fd(), CHUNK) {
                Ok(0) => self.eof = true,
                Ok(n) => self.held += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flow::Wait),
                Err(e) => return Err(e),
            }
        }
    }
}
