//! The dispatcher: the front end's own io_uring loop for what the kernel did not steer.
//! It accepts on the dispatcher sockets, reads the request head, routes it with the same
//! rules as the kernel program (after canonicalizing the URL), and hands the connection to
//! the pool's workers with the bytes already read — or refuses it with a clear status.

mod event_loop;
mod handoff;

use std::{
    io,
    os::fd::RawFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

pub use crate::held::{Held, Stop};
use crate::pipeline::head::Limits;
pub(crate) use crate::table::CountedAhead;
pub use crate::table::{PoolEntry, PoolFlags, PoolId, SharedTable, Table};

/// Counters the dispatcher keeps for status.
#[derive(Debug, Default)]
pub struct DispatchStats {
    pub accepted: AtomicU64,
    /// Per pool: connections handed to its workers.
    pub handed_off: Vec<AtomicU64>,
    /// Refusals by status code.
    pub refused: Vec<(u16, AtomicU64)>,
    pub timeouts: AtomicU64,
    /// Unrouted connections dropped because `max_pending` were waiting.
    pub dropped: AtomicU64,
    /// Connections workers handed back (a later request for another pool or the cache).
    pub handed_back: AtomicU64,
    /// Requests answered from the cache.
    pub cache_answers: AtomicU64,
    /// Requests answered 308 to https (`redirect_https`).
    pub redirects: AtomicU64,
}

const REFUSAL_CODES: [u16; 9] = [400, 408, 413, 414, 417, 431, 501, 503, 505];

impl DispatchStats {
    pub fn new(pools: usize) -> DispatchStats {
        DispatchStats {
            handed_off: (0..pools).map(|_| AtomicU64::new(0)).collect(),
            refused: REFUSAL_CODES
                .iter()
                .map(|&c| (c, AtomicU64::new(0)))
                .collect(),
            ..Default::default()
        }
    }

    /// Counts a hand-off to `pool` ahead of its send (see [`CountedAhead`]).
    pub(crate) fn hand_off(&self, pool: PoolId) -> CountedAhead<'_> {
        CountedAhead::new(self.handed_off.get(pool.index()))
    }

    pub(crate) fn refuse(&self, code: u16) {
        if let Some((_, n)) = self.refused.iter().find(|(c, _)| *c == code) {
            n.fetch_add(1, Relaxed);
        }
    }
}

/// Everything the dispatcher thread needs; it owns none of the fds.
pub struct Dispatcher {
    pub listeners: Vec<RawFd>,
    pub table: Arc<SharedTable>,
    pub limits: Limits,
    pub header_timeout: Duration,
    /// Most connections held before their request is routed; the oldest goes past it.
    pub max_pending: usize,
    pub stats: Arc<DispatchStats>,
    /// Readable (eventfd) when the dispatcher must stop; the value says how (`Stop`).
    pub stop: RawFd,
    pub flags: Arc<PoolFlags>,
    /// Readable (eventfd) when `flags` or the table changed.
    pub wake: RawFd,
    pub cache: Arc<std::sync::Mutex<crate::cache::Cache>>,
    /// Time a keep-alive connection answered from the cache may wait for its next request.
    pub idle_timeout: Duration,
    /// Lines for what the dispatcher answers itself (cache hits, refusals).
    pub access_log: Option<crate::access_log::AccessLog>,
    /// Carries connections to socket pools.
    pub relay: Option<crate::relay::Relay>,
    /// Keeps the connections of shared hosts and delivers their requests.
    pub delivery: Option<crate::delivery::Delivery>,
    /// Takes the TLS connections workers hand back (their bytes start with the session).
    pub tls: Option<crate::tls::Inbox>,
    /// Connections an earlier process held (an upgrade), taken up first.
    pub initial: Vec<Held>,
}

/// Runs until stopped; returns the connections it held when told to hand them over.
pub fn run(d: Dispatcher) -> io::Result<Vec<Held>> {
    event_loop::Loop::new(d)?.run()
}
