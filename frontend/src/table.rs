//! The routes and pools every transport works with, as the controller last set them: the
//! route table, each pool's entry (its channels and how it takes requests) and its flags
//! (stopped, queue full). Config makes it; a reload swaps in a new one.

use std::{
    os::fd::RawFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

pub use crate::pool::PoolId;
use crate::route::RouteTable;

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

impl Table {
    /// Whether pool `pool` could have been given a TLS session made for `name` (its SNI
    /// name; empty for none) on `local`: some request for that name reaches the pool, and
    /// a connection for it may be the pool's. A worker handing a session back names it
    /// itself; a session it could not have had is refused.
    pub fn may_hold_session(
        &self,
        name: &str,
        local: Option<std::net::IpAddr>,
        pool: PoolId,
    ) -> bool {
        let host = (!name.is_empty()).then_some(name);
        let local = local.filter(|_| self.routes.has_ip_sites());
        self.routes.reachable(host, local).contains(&pool)
            && self.gives_connection(name, local, pool)
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

/// A hand-off counted before its send, by whichever transport sends it: the pool may
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
