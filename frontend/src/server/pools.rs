//! A pool's kernel-side resources: its listening sockets in every reuseport group, its slots
//! in the socket arrays, its handoff channel; created when the pool appears and closed once a
//! removed pool is no longer used by the dispatcher.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use anyhow::{Result, bail};
use sluice_common::{MAX_POOLS, PoolSlots, SOCKET_SLOTS};
use sluice_proto::env::{FD_HANDOFF, FD_POOL, WorkerSettings};

use super::Frontend;
use crate::{
    activation::PoolLaunch,
    config::{self, WorkerKind},
    dispatcher::PoolEntry,
    fdstore,
    pool::PoolId,
    sockets::{self, HandoffPair},
};

pub(super) struct PoolRt {
    pub name: String,
    pub config: config::Pool,
    /// One per (listen address, socket index), in slot order per group.
    pub listeners: Vec<OwnedFd>,
    pub handoff: HandoffPair,
    pub slots: PoolSlots,
    /// Removed by a reload: the table generation after which its fds may close.
    pub removed: Option<u64>,
}

/// The contract's settings for a pool's workers (`sluice_proto::env`).
pub(super) fn worker_settings(
    pool: &config::Pool,
    l: &config::Limits,
    c: &config::CacheConfig,
    access_log: bool,
) -> WorkerSettings {
    WorkerSettings {
        pool: pool.name.clone(),
        threads: pool.threads,
        idle_timeout: l.idle_timeout,
        header_timeout: l.header_timeout,
        max_request_head: l.max_request_head,
        max_url: l.max_url,
        max_request_body: l.max_request_body,
        min_send_rate: l.min_send_rate,
        cache_max_entry: c.max_entry_bytes as usize,
        shutdown_time_limit: pool.activation.shutdown_time_limit,
        access_log,
    }
}

/// The kernel's flags for a pool (`sluice_common::POOL_FLAG_*`) given the dispatcher's
/// (`PoolFlags`): any of those sends its connections to the dispatcher, which answers 503;
/// a `proxy_protocol` pool takes every connection through the relay.
pub(super) fn kernel_flags(pool: &config::Pool, dispatcher: u32) -> u32 {
    let stopped = if dispatcher != 0 {
        sluice_common::POOL_FLAG_STOPPED
    } else {
        0
    };
    let relay = if pool.runs.proxy_protocol {
        sluice_common::POOL_FLAG_RELAY
    } else {
        0
    };
    stopped | relay
}

impl PoolRt {
    /// The sockets holding this pool's queue, by their fd-store names (none once removed).
    fn queue_sockets(&self) -> Vec<(String, RawFd)> {
        if self.removed.is_some() {
            return Vec::new();
        }
        let [fe, workers] = fdstore::handoff_names(&self.name);
        let name = fdstore::pool_name(&self.name);
        self.listeners
            .iter()
            .map(|fd| (name.clone(), fd.as_raw_fd()))
            .chain([
                (fe, self.handoff.frontend.as_raw_fd()),
                (workers, self.handoff.workers.as_raw_fd()),
            ])
            .collect()
    }

    pub fn entry(&self) -> PoolEntry {
        PoolEntry {
            name: self.config.name.as_str().into(),
            handoff: self.handoff.frontend.as_raw_fd(),
            listeners: self.listeners.iter().map(|fd| fd.as_raw_fd()).collect(),
            handoff_workers: self.handoff.workers.as_raw_fd(),
            removed: self.removed.is_some(),
            relay: self.config.runs.kind == WorkerKind::Socket,
            proxy: self.config.runs.proxy_protocol,
            passthrough: self.config.runs.passthrough,
            whole: self.config.runs.kind == WorkerKind::Socket
                && self.config.runs.routing == crate::config::Routing::Connection,
        }
    }

    pub fn queued(&self) -> u64 {
        self.queue().0
    }

    /// Connections waiting in all of the pool's sockets, and whether one of them holds
    /// `queue_length` (full): one TCP_INFO read per socket for both.
    pub fn queue(&self) -> (u64, bool) {
        self.listeners.iter().fold((0, false), |(sum, full), fd| {
            let n = sockets::queued(fd.as_raw_fd()).unwrap_or(0);
            (sum + n as u64, full || n >= self.config.queue_length)
        })
    }

    pub fn launch(&self, c: &config::Config) -> PoolLaunch {
        let (limits, cache) = (&c.limits, &c.cache);
        let mut fds: Vec<(RawFd, String)> = self
            .listeners
            .iter()
            .map(|fd| (fd.as_raw_fd(), FD_POOL.to_owned()))
            .collect();
        let mut demand: Vec<RawFd> = self.listeners.iter().map(|fd| fd.as_raw_fd()).collect();
        // A socket worker gets its listening sockets and nothing else.
        if self.config.runs.kind == WorkerKind::Sluice {
            fds.push((self.handoff.workers.as_raw_fd(), FD_HANDOFF.to_owned()));
            demand.push(self.handoff.workers.as_raw_fd());
        }
        let index = c.pools.iter().position(|p| p.name == self.config.name);
        PoolLaunch {
            name: self.config.name.clone(),
            program: self.config.program.clone(),
            args: self.config.args.clone(),
            processes: self.config.processes,
            threads: self.config.threads,
            activation: self.config.activation.clone(),
            fds,
            demand,
            settings: worker_settings(&self.config, limits, cache, c.access_log.is_some()),
            env: self.config.env.clone(),
            runs: self.config.runs.clone(),
            probe_host: index.map_or_else(|| "localhost".into(), |i| c.probe_host(i)),
        }
    }
}

impl Frontend {
    /// Opens a new pool's sockets in every plain group (and, for a passthrough pool, every
    /// TLS group: connections the front end relays to it come through group 0) and
    /// registers it; returns its id.
    pub(super) fn add_pool(&mut self, pool: &config::Pool) -> Result<PoolId> {
        if self.pools.len() >= MAX_POOLS as usize {
            bail!(
                "pool {}: this front end has had {MAX_POOLS} pools already (removed ones included); restart it",
                pool.name
            );
        }
        let first = self.next_slot;
        if first + pool.sockets > SOCKET_SLOTS {
            bail!(
                "pool {}: no socket-array slots left; restart sluice",
                pool.name
            );
        }
        let mut listeners = Vec::new();
        let tls: &[std::net::SocketAddr] = if pool.runs.passthrough {
            &self.config.tls.listen
        } else {
            &[]
        };
        let groups: Vec<(usize, std::net::SocketAddr)> = (self.config.listen.iter().copied())
            .enumerate()
            .chain(
                tls.iter()
                    .enumerate()
                    .map(|(i, &a)| (self.steering.tls_group(i), a)),
            )
            .collect();
        for (g, addr) in groups {
            for k in 0..pool.sockets {
                let backlog = pool.queue_length as i32;
                let fd = match self
                    .inherited
                    .take_listener(&fdstore::pool_name(&pool.name), addr)
                {
                    Some(fd) => sockets::relisten(fd, backlog)?,
                    None => sockets::listener(addr, backlog)?,
                };
                self.steering.set_socket(g, first + k, &fd)?;
                listeners.push(fd);
            }
        }
        self.next_slot += pool.sockets;
        let slots = PoolSlots {
            first,
            count: pool.sockets,
            flags: kernel_flags(pool, 0),
            _pad: 0,
        };
        let id = PoolId::new(self.pools.len());
        self.steering.set_pool(id.raw(), slots)?;
        self.steering.reset_pool_counter(id.raw())?;
        let rt = PoolRt {
            name: pool.name.clone(),
            config: pool.clone(),
            listeners,
            handoff: self.handoff_pair(&pool.name)?,
            slots,
            removed: None,
        };
        self.supervisor.add(rt.launch(&self.config))?;
        self.pools.push(rt);
        Ok(id)
    }

    /// The pool's handoff pair: the one systemd's fd store kept, or a new one.
    fn handoff_pair(&mut self, pool: &str) -> Result<sockets::HandoffPair> {
        let [fe, workers] = fdstore::handoff_names(pool);
        match (
            self.inherited.take_seqpacket(&fe),
            self.inherited.take_seqpacket(&workers),
        ) {
            (Some(frontend), Some(workers)) => Ok(sockets::HandoffPair { frontend, workers }),
            _ => Ok(sockets::handoff_pair()?),
        }
    }

    /// Every socket that holds a queue, named as systemd's fd store and an upgrade's state
    /// name them (`fdstore`): the dispatcher's, the TLS thread's, and every live pool's
    /// listeners and handoff pair.
    pub(super) fn queue_sockets(&self) -> Vec<(String, RawFd)> {
        let mut out: Vec<(String, RawFd)> = self
            .dispatch_sockets
            .iter()
            .map(|f| (fdstore::DISPATCH.to_owned(), f.as_raw_fd()))
            .chain((self.tls_sockets.iter()).map(|f| (fdstore::TLS.to_owned(), f.as_raw_fd())))
            .collect();
        for p in &self.pools {
            out.extend(p.queue_sockets());
        }
        out
    }

    /// Gives systemd's fd store (under a unit that has one) every socket that holds a queue.
    pub(super) fn store_sockets(&self) {
        if let Some(n) = &self.notify {
            for (name, fd) in self.queue_sockets() {
                n.store(&name, fd);
            }
        }
    }

    pub(super) fn store_pool(&self, id: PoolId) {
        if let (Some(n), Some(p)) = (&self.notify, self.pools.get(id.index())) {
            for (name, fd) in p.queue_sockets() {
                n.store(&name, fd);
            }
        }
    }

    /// Closes the sockets of removed pools once the dispatcher has let go of them; the
    /// kernel moves what is still queued in them to the dispatcher (the migrate program).
    pub(super) fn finish_removals(&mut self) {
        let seen = self.table.seen();
        let mut removed = Vec::new();
        for (id, p) in self.pools.iter_mut().enumerate() {
            let Some(generation) = p.removed else {
                continue;
            };
            if seen >= generation
                && !p.listeners.is_empty()
                && self.supervisor.is_empty(PoolId::new(id))
            {
                log::info!(
                    "pool {}: removed; closing its {} socket(s)",
                    p.name,
                    p.listeners.len()
                );
                p.listeners.clear();
                removed.push(p.name.clone());
            }
        }
        // The store forgets them too; a live pool of the same name gives its own again.
        for name in removed {
            if let Some(n) = &self.notify {
                n.unstore(&fdstore::pool_name(&name));
                for h in fdstore::handoff_names(&name) {
                    n.unstore(&h);
                }
            }
            if let Some(id) = self.id_of(&name) {
                self.store_pool(id);
            }
        }
    }
}
