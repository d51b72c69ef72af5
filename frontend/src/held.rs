//! What an upgrade passes from one front-end process to the next: a connection a transport
//! held between requests, with what it had read of it; and how a transport's loop is told
//! to stop (close what it holds, or hand it over).

/// A connection held between requests, with the bytes read of it.
#[derive(Debug)]
pub struct Held {
    pub fd: std::os::fd::OwnedFd,
    pub bytes: Vec<u8>,
    pub arrival: sluice_proto::access::Arrival,
}

/// How a transport's loop is to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Stop {
    /// Close what it holds (the front end stops).
    Close = 1,
    /// Hand every connection over, with what was read of it (an upgrade).
    HandOver = 2,
}

impl Stop {
    /// Tells the loop whose `stop` eventfd is `fd`.
    pub fn send(self, fd: std::os::fd::RawFd) {
        crate::eventfd::signal(fd, self as u64);
    }
}
