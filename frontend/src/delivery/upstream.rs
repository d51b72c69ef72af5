//! A channel into one pool's queue that carries one client connection's requests for that
//! pool and nothing else. For a sluice-worker pool it is one end of a socketpair, sent on
//! the pool's handoff channel marked `DELIVERED` with a PROXY v2 header naming the client;
//! for a socket pool, a connection of the front end's own into the pool's queue
//! (`crate::direct`), which starts with a PROXY v2 header when the pool asks for one.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::Arc,
};

use sluice_proto::handoff;

use crate::direct::{Direct, DirectConn};
use crate::table::{PoolEntry, PoolId};

enum Link {
    Pair(OwnedFd),
    Direct(DirectConn),
}

pub struct Upstream {
    pub pool: PoolId,
    link: Link,
    /// A direct connection's handshake is over.
    pub connected: bool,
    /// Bytes for the pool not yet sent.
    pub out: Vec<u8>,
    pub sent: usize,
    /// Bytes from the pool not yet judged.
    pub input: Vec<u8>,
    /// Requests written to it.
    pub used: u32,
}

impl Upstream {
    /// Opens a channel for the client at `client` (which reached `local`) into `entry`'s
    /// pool.
    pub fn open(
        pool: PoolId,
        entry: &PoolEntry,
        direct: Option<&Arc<Direct>>,
        client: SocketAddr,
        local: SocketAddr,
    ) -> io::Result<Upstream> {
        let header = sluice_proto::proxy::header(client, local);
        let (link, connected, out) = if entry.relay {
            let direct = direct.ok_or_else(|| io::Error::other("no direct connections"))?;
            let (conn, connected) = direct.open(pool)?;
            let out = if entry.proxy { header } else { Vec::new() };
            (Link::Direct(conn), connected, out)
        } else {
            let (ours, theirs) = socketpair()?;
            handoff::send(
                entry.handoff,
                theirs.as_raw_fd(),
                handoff::ROUTED | handoff::DELIVERED,
                &header,
            )?;
            (Link::Pair(ours), true, Vec::new())
        };
        Ok(Upstream {
            pool,
            link,
            connected,
            out,
            sent: 0,
            input: Vec::new(),
            used: 0,
        })
    }

    pub fn fd(&self) -> RawFd {
        match &self.link {
            Link::Pair(fd) => fd.as_raw_fd(),
            Link::Direct(c) => c.fd.as_raw_fd(),
        }
    }

    /// Whether everything queued for the pool has gone.
    pub fn flushed(&self) -> bool {
        self.sent >= self.out.len()
    }

    /// Sends what is queued; Ok(true) once all of it is.
    pub fn flush(&mut self) -> io::Result<bool> {
        if !self.connected {
            if !crate::sockets::connected(self.fd())? {
                return Ok(false);
            }
            self.connected = true;
        }
        let done = crate::epoll::send_pending(self.fd(), &self.out, &mut self.sent)?;
        if done {
            self.out.clear();
            self.sent = 0;
        }
        Ok(done)
    }
}

/// (the front end's end, non-blocking; the worker's end, blocking as an accepted socket is).
fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (ours, theirs) = super::plaintext_pair()?;
    crate::epoll::set_nonblocking(theirs.as_raw_fd(), false);
    Ok((ours, theirs))
}
