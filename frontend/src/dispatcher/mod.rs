//! The dispatcher: the front end's own io_uring loop for what the kernel did not steer.
//! It accepts on the dispatcher sockets, reads the request head, routes it with the same
//! rules as the kernel program (after canonicalizing the URL), and hands the connection to
//! the pool's workers with the bytes already read — or refuses it with a clear status.

mod event_loop;
mod handoff;
pub mod head;
mod memo;
pub(crate) mod redirect;

use std::{
    io,
    os::fd::RawFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use self::head::{Decision, Limits};
pub use crate::pool::PoolId;
use crate::route::RouteTable;

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

/// A hand-off counted before its send, by the dispatcher or the TLS thread: the pool may
/// answer, and a client read status, before the sending thread runs again. `undo` takes
/// it back when the send fails.
pub(crate) struct CountedAhead<'a>(Option<&'a AtomicU64>);

impl<'a> CountedAhead<'a> {
    pub(crate) fn new(n: Option<&'a AtomicU64>) -> CountedAhead<'a> {
        if let Some(n) = n {
            n.fetch_add(1, Relaxed);
        }
        CountedAhead(n)
    }

    /// The send failed: nothing was handed off.
    pub(crate) fn undo(self) {
        if let Some(n) = self.0 {
            n.fetch_sub(1, Relaxed);
        }
    }
}

/// Per-pool state the controller sets and the dispatcher reads.
#[derive(Debug)]
pub struct PoolFlags(Vec<std::sync::atomic::AtomicU32>);

impl PoolFlags {
    /// Rapid-fail protection stopped the pool: answer 503, drain its queue.
    pub const STOPPED: u32 = 1;
    /// The pool's queue is full: answer new connections 503.
    pub const FULL: u32 = 2;

    pub fn new(pools: usize) -> PoolFlags {
        PoolFlags(
            (0..pools)
                .map(|_| std::sync::atomic::AtomicU32::new(0))
                .collect(),
        )
    }

    pub fn get(&self, pool: PoolId) -> u32 {
        self.0
            .get(pool.index())
            .map(|f| f.load(Relaxed))
            .unwrap_or(0)
    }

    /// Sets or clears `flag`; true if that changed anything.
    pub fn set(&self, pool: PoolId, flag: u32, on: bool) -> bool {
        let Some(f) = self.0.get(pool.index()) else {
            return false;
        };
        let old = if on {
            f.fetch_or(flag, Relaxed)
        } else {
            f.fetch_and(!flag, Relaxed)
        };
        (old & flag != 0) != on
    }
}

/// What the dispatcher knows of one pool.
#[derive(Debug, Clone)]
pub struct PoolEntry {
    /// For the access log.
    pub name: Arc<str>,
    /// The front end's end of the pool's handoff channel.
    pub handoff: RawFd,
    /// The pool's listening sockets, drained while the pool is stopped.
    pub listeners: Vec<RawFd>,
    /// The workers' end of the handoff channel (the front end holds it too), drained likewise.
    pub handoff_workers: RawFd,
    /// A reload removed the pool: nothing routes to it, and connections still in its handoff
    /// channel are routed afresh.
    pub removed: bool,
    /// A socket pool: its connections go through the relay, not the handoff channel.
    pub relay: bool,
    /// Relayed connections start with a PROXY v2 header.
    pub proxy: bool,
    /// `tls = "passthrough"`: its queue holds TLS connections, which a stopped pool's drain
    /// answers with a TLS alert, not an HTTP 503.
    pub passthrough: bool,
    /// `routing = "connection"`: the pool takes whole connections (the first request's
    /// pool answers every later one).
    pub whole: bool,
}

/// The routes and pools the dispatcher works with; a reload swaps in a new one.
#[derive(Debug, Default)]
pub struct Table {
    pub routes: RouteTable<PoolId>,
    /// Sites whose pools trust each other (`[[site]] trust_pools`).
    pub trust: sluice_proto::ownership::Trust,
    /// SNI names of passthrough pools (each for `/`): the TLS thread's fallback for what
    /// the kernel did not steer.
    pub passthrough: RouteTable<PoolId>,
    /// `redirect_https`: plain requests get 308 to https on this port.
    pub redirect: Option<u16>,
    /// By pool id; `None` for ids of removed pools.
    pub pools: Vec<Option<PoolEntry>>,
}

impl Table {
    /// What the dispatcher knows of pool `id`.
    pub fn pool(&self, id: PoolId) -> Option<&PoolEntry> {
        self.pools.get(id.index()).and_then(Option::as_ref)
    }

    /// Whether a connection whose request for `host` (normalized, empty for none) on
    /// `local` routed to `pool` may be given to that pool (`sluice_proto::ownership`): it
    /// owns the host, the host's pools trust each other, or the pool takes whole
    /// connections. Otherwise the front end keeps it and delivers each request.
    pub fn gives_connection(
        &self,
        host: &str,
        local: Option<std::net::IpAddr>,
        pool: PoolId,
    ) -> bool {
        use sluice_proto::ownership::{Owner, owner};
        if self.pool(pool).is_some_and(|e| e.whole) {
            return true;
        }
        let host = (!host.is_empty()).then_some(host);
        let local = local.filter(|_| self.routes.has_ip_sites());
        match owner(&self.routes, &self.trust, host, local) {
            Owner::Pool(p) => p == pool,
            Owner::Trusted => true,
            Owner::Shared => false,
        }
    }
}

/// The current table, and the generation of it the dispatcher has started using (the front
/// end closes a removed pool's fds only once the dispatcher no longer holds them).
#[derive(Debug, Default)]
pub struct SharedTable {
    table: std::sync::RwLock<(u64, Arc<Table>)>,
    /// The generation of the current table, readable without the lock.
    latest: AtomicU64,
    pub(crate) seen: AtomicU64,
}

impl SharedTable {
    pub fn new(table: Table) -> SharedTable {
        SharedTable {
            table: std::sync::RwLock::new((1, Arc::new(table))),
            latest: AtomicU64::new(1),
            seen: AtomicU64::new(0),
        }
    }

    /// Installs a new table; returns its generation.
    pub fn replace(&self, table: Table) -> u64 {
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        t.0 += 1;
        t.1 = Arc::new(table);
        self.latest.store(t.0, std::sync::atomic::Ordering::Release);
        t.0
    }

    /// The generation of the current table, without taking its lock.
    pub(crate) fn latest(&self) -> u64 {
        self.latest.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn current(&self) -> (u64, Arc<Table>) {
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        (t.0, t.1.clone())
    }

    /// The generation of the current table.
    pub fn generation(&self) -> u64 {
        self.table.read().unwrap_or_else(|e| e.into_inner()).0
    }

    /// The newest generation the dispatcher has switched to.
    pub fn seen(&self) -> u64 {
        self.seen.load(std::sync::atomic::Ordering::Acquire)
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

/// How the dispatcher is to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Stop {
    /// Close what it holds (the front end stops).
    Close = 1,
    /// Hand every connection over, with what was read of it (an upgrade).
    HandOver = 2,
}

impl Stop {
    /// Tells the dispatcher whose `stop` eventfd is `fd`.
    pub fn send(self, fd: RawFd) {
        crate::eventfd::signal(fd, self as u64);
    }
}

/// A connection the dispatcher held, with what it had read of it: what an upgrade passes
/// from one front-end process to the next.
#[derive(Debug)]
pub struct Held {
    pub fd: std::os::fd::OwnedFd,
    pub bytes: Vec<u8>,
    pub arrival: sluice_proto::access::Arrival,
}

/// The last word on a judged head, whoever read it: a head that filled the buffer without
/// ending is 431; a pool being removed, stopped or with a full queue is 503.
pub fn admit(decision: Decision, full: bool, table: &Table, flags: &PoolFlags) -> Decision {
    match decision {
        Decision::NeedMore if full => Decision::Refuse(431, "the request head is too large"),
        Decision::Pool(p) if table.pool(p).is_none_or(|e| e.removed) => {
            Decision::Refuse(503, "the application pool is being removed")
        }
        Decision::Pool(p) if flags.get(p) & PoolFlags::STOPPED != 0 => {
            Decision::Refuse(503, "the application pool is stopped")
        }
        Decision::Pool(p) if flags.get(p) & PoolFlags::FULL != 0 => {
            Decision::Refuse(503, "the application's queue is full")
        }
        other => other,
    }
}

/// Runs until stopped; returns the connections it held when told to hand them over.
pub fn run(d: Dispatcher) -> io::Result<Vec<Held>> {
    event_loop::Loop::new(d)?.run()
}

/// A complete answer that closes the connection.
pub fn reply(code: u16, why: &str) -> Vec<u8> {
    reply_to(code, why, false)
}

/// The same, to a request whose method is `HEAD` when `head_only`: the head alone, so a
/// client reading it as a HEAD answer does not take the text for the next response.
pub fn reply_to(code: u16, why: &str, head_only: bool) -> Vec<u8> {
    let reason = match code {
        400 => "Bad Request",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    };
    let body = format!("{code} {reason}: {why}\n");
    let retry = if code == 503 {
        "Retry-After: 1\r\n"
    } else {
        ""
    };
    let shown = if head_only { "" } else { body.as_str() };
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{retry}Connection: close\r\nServer: sluice\r\n\r\n{shown}",
        body.len()
    )
    .into_bytes()
}
