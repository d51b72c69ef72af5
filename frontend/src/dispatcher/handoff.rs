//! The dispatcher's side of the handoff channels (`sluice_proto::handoff`): connections go to
//! a pool's workers marked `ROUTED`, and come back from them (hand-backs) or, for a removed
//! pool, are read back from its workers' end; receiving is an io_uring RecvMsg.

use std::os::fd::RawFd;

pub use sluice_proto::handoff::{HandoffError, Received, RecvBuf, TLS, routed_flags, send};

/// Room to receive one handoff message; must stay put (it is boxed) while a RecvMsg runs.
pub struct Incoming(Box<RecvBuf>);

impl Incoming {
    pub fn new() -> Incoming {
        Incoming(RecvBuf::new())
    }

    /// A RecvMsg for `channel`.
    pub fn recv(&mut self, channel: RawFd, user_data: u64) -> io_uring::squeue::Entry {
        io_uring::opcode::RecvMsg::new(io_uring::types::Fd(channel), self.0.prepare())
            .flags(libc::MSG_CMSG_CLOEXEC as u32)
            .build()
            .user_data(user_data)
    }

    /// The message of a RecvMsg that returned `n`.
    pub fn complete(&mut self, n: usize) -> Result<Received<'_>, HandoffError> {
        self.0.complete(n)
    }
}
