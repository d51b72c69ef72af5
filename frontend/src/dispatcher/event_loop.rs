//! The dispatcher's io_uring loop. Connections come from the dispatcher sockets (what the
//! kernel did not steer, or steered here for the cache), from workers handing a connection
//! back (a later request for another pool or the cache), and — while a pool is stopped — from
//! that pool's queues (answered 503). Each one is read until its request head is complete,
//! then answered from the cache (the connection stays open for the next request), handed to
//! its pool with the bytes already read, or refused.

use std::{
    collections::VecDeque,
    io,
    os::fd::{FromRawFd, IntoRawFd, RawFd},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use crate::cache::Answer;
use sluice_common::MAX_POOLS;
use sluice_proto::access::Arrival;
use sluice_proto::site::local_address_of;

mod handover;

use super::{Dispatcher, Held, PoolFlags, PoolId, Stop, Table, handoff};
use crate::pipeline::memo::HeadMemo;
use crate::pipeline::{self, Facts, Hold, Rules, Verdict};

const RING_ENTRIES: u32 = 1024;
/// IORING_RECVSEND_POLL_FIRST: arm the poll without trying the receive first.
const RECVSEND_POLL_FIRST: u16 = 1;
/// How long a connection we answered and close may take to close its side.
const LINGER: Duration = Duration::from_secs(2);
const TICK: Duration = Duration::from_secs(1);
/// Connection buffers kept for reuse (each `max_request_head`-sized).
const MAX_SPARE_BUFFERS: usize = 256;

// user_data: op << 32 | index
const OP_ACCEPT: u64 = 1;
const OP_RECV: u64 = 2;
const OP_SEND: u64 = 3;
const OP_LINGER: u64 = 4;
const OP_LINGER_TIMEOUT: u64 = 5;
const OP_TICK: u64 = 6;
const OP_STOP: u64 = 7;
const OP_WAKE: u64 = 8;
/// index: pool << 8 | listener
const OP_DRAIN_ACCEPT: u64 = 9;
/// index: pool
const OP_DRAIN_HANDOFF: u64 = 10;
const OP_CANCEL: u64 = 11;
/// index: pool
const OP_HANDBACK: u64 = 12;
/// index: pool (a removed pool's handoff channel, read from the workers' end)
const OP_REROUTE: u64 = 13;

fn ud(op: u64, index: usize) -> u64 {
    op << 32 | index as u64
}

enum State {
    /// Waiting for a complete request head (unrouted).
    Reading,
    /// Sending `reply`; then keep the connection (having consumed `consumed` bytes) or close.
    Replying {
        keep: Option<usize>,
    },
    Lingering,
}

struct Conn {
    fd: RawFd,
    buf: Vec<u8>,
    filled: usize,
    state: State,
    deadline: Instant,
    reply: Answer,
    sent: usize,
    /// Operations in flight; the slot is freed only when none are.
    inflight: u32,
    /// Tells this connection from an earlier one in the same slot.
    serial: u64,
    /// Counted among the unrouted connections (see `max_pending`).
    counted: bool,
    /// Dropped to make room (see `max_pending`).
    dropped: bool,
    /// The lingering read is over; close when the linked timeout completes.
    done: bool,
    /// How the connection came to the dispatcher (accepted, or handed back by a worker).
    arrival: Arrival,
    /// When its current request began arriving (the access log's duration).
    started: Instant,
    /// Its local address, read (once) when a route is bound to an address.
    local: Option<std::net::IpAddr>,
}

pub struct Loop {
    d: Dispatcher,
    ring: IoUring,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    pending: Vec<squeue::Entry>,
    tick: Box<types::Timespec>,
    linger: Box<types::Timespec>,
    stop_buf: Box<[u8; 8]>,
    wake_buf: Box<[u8; 8]>,
    generation: u64,
    table: Arc<Table>,
    draining: Vec<bool>,
    drained_listeners: Vec<usize>,
    /// Message buffers, made when a pool first needs one (256 KiB each).
    drain_msgs: Vec<Option<Box<handoff::Incoming>>>,
    handback_armed: Vec<bool>,
    handback_msgs: Vec<Option<Box<handoff::Incoming>>>,
    reroute_armed: Vec<bool>,
    reroute_msgs: Vec<Option<Box<handoff::Incoming>>>,
    /// Unrouted connections in arrival order: (slot, serial); stale entries are skipped.
    order: VecDeque<(usize, u64)>,
    next_serial: u64,
    /// Unrouted connections, and those of them dropped but not yet closed.
    reading: usize,
    dropping: usize,
    buf_len: usize,
    /// Buffers of closed connections, for the next ones.
    spare: Vec<Vec<u8>>,
    /// When the current batch of completions arrived: one clock read per batch.
    now: Instant,
    /// The completions of the current batch.
    cqes: Vec<(u64, i32, u32)>,
    /// Submitted operations whose last completion has not come yet.
    inflight: usize,
    /// Told to stop and hand its connections over (after the current batch).
    handing_over: bool,
    /// Heads answered from the cache, judged once.
    memo: HeadMemo,
}

impl Loop {
    pub fn new(d: Dispatcher) -> io::Result<Loop> {
        // One thread submits and reaps: completions run when it asks for them, not as
        // interrupts of whatever it is doing (fewer task-work wake-ups per request).
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_coop_taskrun()
            .build(RING_ENTRIES)
            .or_else(|e| {
                log::debug!("io_uring with DEFER_TASKRUN unavailable ({e}); using defaults");
                IoUring::builder().setup_coop_taskrun().build(RING_ENTRIES)
            })?;
        let (generation, table) = d.table.current();
        d.table.seen.store(generation, Ordering::Release);
        let pools = MAX_POOLS as usize;
        let buf_len = d.limits.max_request_head.max(d.limits.max_url + 64) + 1;
        Ok(Loop {
            ring,
            conns: Vec::new(),
            free: Vec::new(),
            pending: Vec::new(),
            tick: Box::new(types::Timespec::from(TICK)),
            linger: Box::new(types::Timespec::from(LINGER)),
            stop_buf: Box::new([0; 8]),
            wake_buf: Box::new([0; 8]),
            generation,
            table,
            draining: vec![false; pools],
            drained_listeners: vec![0; pools],
            drain_msgs: (0..pools).map(|_| None).collect(),
            handback_armed: vec![false; pools],
            handback_msgs: (0..pools).map(|_| None).collect(),
            reroute_armed: vec![false; pools],
            reroute_msgs: (0..pools).map(|_| None).collect(),
            order: VecDeque::new(),
            next_serial: 0,
            reading: 0,
            dropping: 0,
            buf_len,
            spare: Vec::new(),
            now: Instant::now(),
            cqes: Vec::with_capacity(RING_ENTRIES as usize),
            inflight: 0,
            handing_over: false,
            memo: HeadMemo::default(),
            d,
        })
    }

    pub fn run(mut self) -> io::Result<Vec<Held>> {
        let held = std::mem::take(&mut self.d.initial);
        self.take_up(held);
        for (i, &fd) in self.d.listeners.clone().iter().enumerate() {
            self.pending.push(accept(fd, OP_ACCEPT, i));
        }
        self.pending.push(
            opcode::Timeout::new(&*self.tick)
                .build()
                .user_data(ud(OP_TICK, 0)),
        );
        self.pending.push(
            opcode::Read::new(types::Fd(self.d.stop), self.stop_buf.as_mut_ptr(), 8)
                .build()
                .user_data(ud(OP_STOP, 0)),
        );
        self.arm_wake();
        self.table_changed();
        loop {
            self.submit()?;
            // One buffer for every batch, one clock read per batch, and the table's lock taken
            // only when its generation moved.
            let mut cqes = std::mem::take(&mut self.cqes);
            cqes.clear();
            cqes.extend(
                self.ring
                    .completion()
                    .map(|c: cqueue::Entry| (c.user_data(), c.result(), c.flags())),
            );
            self.now = Instant::now();
            if self.d.table.latest() != self.generation {
                let (g, t) = self.d.table.current();
                (self.generation, self.table) = (g, t);
                self.d.table.seen.store(g, Ordering::Release);
                self.table_changed();
            }
            for &(user_data, res, flags) in &cqes {
                if !cqueue::more(flags) {
                    self.inflight = self.inflight.saturating_sub(1);
                }
                let (op, index) = (user_data >> 32, (user_data & 0xffff_ffff) as usize);
                match op {
                    OP_STOP if u64::from_ne_bytes(*self.stop_buf) == Stop::HandOver as u64 => {
                        // The rest of this batch is handled first: nothing it carries is lost.
                        self.handing_over = true;
                    }
                    OP_STOP => return Ok(Vec::new()),
                    OP_TICK => self.on_tick(),
                    OP_WAKE => {
                        self.arm_wake();
                        self.table_changed();
                    }
                    OP_ACCEPT => self.on_accept(index, res, flags),
                    OP_DRAIN_ACCEPT => self.on_drain_accept(index, res, flags),
                    OP_DRAIN_HANDOFF => self.on_drain_handoff(index, res),
                    OP_HANDBACK => self.on_handback(index, res),
                    OP_REROUTE => self.on_reroute(index, res),
                    OP_RECV => self.on_recv(index, res),
                    OP_SEND => self.on_send(index, res),
                    OP_LINGER => self.on_linger(index, res),
                    OP_LINGER_TIMEOUT => self.on_linger_timeout(index),
                    _ => {}
                }
            }
            self.cqes = cqes;
            if self.handing_over {
                let held = self.hand_over()?;
                if self.inflight > 0 {
                    // Operations the kernel may still complete point into this loop's buffers:
                    // they (and the ring) are kept for the process's life rather than freed.
                    std::mem::forget(self);
                }
                return Ok(held);
            }
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        self.submit_pending()?;
        match self.ring.submit_and_wait(1) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Puts the queued entries in the ring (each counted in `inflight`), without waiting.
    fn submit_pending(&mut self) -> io::Result<()> {
        let mut sq = self.ring.submission();
        for e in self.pending.drain(..) {
            // SAFETY: every buffer an entry points at is owned by this loop and stays put
            // until its completion: connection buffers (heap storage not touched while an
            // operation is in flight), the boxed messages, timespecs and eventfd buffers.
            while unsafe { sq.push(&e) }.is_err() {
                drop(sq);
                self.ring.submit()?;
                sq = self.ring.submission();
            }
            self.inflight += 1;
        }
        Ok(())
    }

    fn arm_wake(&mut self) {
        self.pending.push(
            opcode::Read::new(types::Fd(self.d.wake), self.wake_buf.as_mut_ptr(), 8)
                .build()
                .user_data(ud(OP_WAKE, 0)),
        );
    }

    /// Brings the per-pool operations in line with the table and the pool flags: hand-back
    /// reads for every pool, queue draining for stopped ones.
    fn table_changed(&mut self) {
        for p in 0..MAX_POOLS as usize {
            let entry = self.table.pools.get(p).and_then(Option::as_ref).cloned();
            // A removed pool's workers are gone: what was handed to them and not taken is read
            // back from their end and routed afresh.
            if let (Some(e), false) = (&entry, self.reroute_armed[p]) {
                if e.removed {
                    let op = incoming(&mut self.reroute_msgs[p])
                        .recv(e.handoff_workers, ud(OP_REROUTE, p));
                    self.pending.push(op);
                    self.reroute_armed[p] = true;
                }
            }
            // Hand-backs from the pool's workers arrive on the front end's end of its channel.
            match (&entry, self.handback_armed[p]) {
                (Some(e), false) => {
                    let entry =
                        incoming(&mut self.handback_msgs[p]).recv(e.handoff, ud(OP_HANDBACK, p));
                    self.pending.push(entry);
                    self.handback_armed[p] = true;
                }
                (None, true) => {
                    self.pending.push(cancel(ud(OP_HANDBACK, p)));
                    self.handback_armed[p] = false;
                }
                _ => {}
            }
            let stopped = entry.as_ref().is_some_and(|e| !e.removed)
                && self.d.flags.get(PoolId::new(p)) & PoolFlags::STOPPED != 0;
            if let (true, false, Some(q)) = (stopped, self.draining[p], &entry) {
                // Connections already queued for a stopped pool get 503 too.
                log::info!("dispatcher: answering pool {p}'s queue with 503 while it is stopped");
                for (j, &fd) in q.listeners.iter().enumerate() {
                    self.pending.push(accept(fd, OP_DRAIN_ACCEPT, p << 8 | j));
                }
                let entry = incoming(&mut self.drain_msgs[p])
                    .recv(q.handoff_workers, ud(OP_DRAIN_HANDOFF, p));
                self.pending.push(entry);
                self.draining[p] = true;
                self.drained_listeners[p] = q.listeners.len();
            } else if !stopped && self.draining[p] {
                for j in 0..self.drained_listeners[p] {
                    self.pending.push(cancel(ud(OP_DRAIN_ACCEPT, p << 8 | j)));
                }
                self.pending.push(cancel(ud(OP_DRAIN_HANDOFF, p)));
                self.draining[p] = false;
            }
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        for c in self.conns.iter_mut().flatten() {
            if !matches!(c.state, State::Lingering) && now > c.deadline {
                if matches!(c.state, State::Reading) {
                    self.d.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                }
                // Ends the pending operation (a read returns 0); the normal path closes.
                // SAFETY: shutdown on a connection we own.
                unsafe { libc::shutdown(c.fd, libc::SHUT_RDWR) };
            }
        }
        self.pending.push(
            opcode::Timeout::new(&*self.tick)
                .build()
                .user_data(ud(OP_TICK, 0)),
        );
    }

    fn insert(&mut self, fd: RawFd, bytes: &[u8]) -> usize {
        // Buffers of closed connections are used again: no allocation per connection.
        let mut buf = match self.spare.pop() {
            Some(b) if bytes.len() < b.len() => b,
            _ => vec![0; self.buf_len.max(bytes.len() + 1)],
        };
        buf[..bytes.len()].copy_from_slice(bytes);
        let conn = Conn {
            fd,
            buf,
            filled: bytes.len(),
            state: State::Reading,
            deadline: self.now + self.d.header_timeout,
            reply: Answer::Owned(Vec::new()),
            sent: 0,
            inflight: 0,
            serial: 0,
            counted: false,
            dropped: false,
            done: false,
            arrival: Arrival::Dispatcher,
            started: self.now,
            local: None,
        };
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        self.conns[slot] = Some(conn);
        slot
    }

    /// A new unrouted connection: bounded, so slow clients cannot hold every slot; the oldest
    /// unrouted connection makes room (its pending read ends and it is closed).
    fn admit(&mut self, fd: RawFd, bytes: &[u8]) -> usize {
        while self.reading - self.dropping >= self.d.max_pending {
            let Some((old, serial)) = self.order.pop_front() else {
                break;
            };
            if let Some(c) = self.conns.get_mut(old).and_then(Option::as_mut) {
                if c.serial == serial && c.counted && !c.dropped {
                    c.dropped = true;
                    self.dropping += 1;
                    self.d.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    // SAFETY: shutdown on a connection we own.
                    unsafe { libc::shutdown(c.fd, libc::SHUT_RDWR) };
                    break;
                }
            }
        }
        let slot = self.insert(fd, bytes);
        self.next_serial += 1;
        let serial = self.next_serial;
        if let Some(c) = self.conns[slot].as_mut() {
            c.serial = serial;
            c.counted = true;
        }
        self.reading += 1;
        self.push_order(slot, serial);
        slot
    }

    /// Remembers an unrouted connection's arrival; entries of connections routed since are
    /// dropped now and then, so the queue stays about as long as the unrouted count.
    fn push_order(&mut self, slot: usize, serial: u64) {
        self.order.push_back((slot, serial));
        if self.order.len() > 2 * self.reading + 1024 {
            let conns = &self.conns;
            self.order.retain(|&(s, n)| {
                conns
                    .get(s)
                    .and_then(Option::as_ref)
                    .is_some_and(|c| c.serial == n && c.counted)
            });
        }
    }

    /// The connection leaves the unrouted count.
    fn uncount(&mut self, slot: usize) {
        if let Some(c) = self.conns[slot].as_mut() {
            if c.counted {
                c.counted = false;
                self.reading -= 1;
                if c.dropped {
                    c.dropped = false;
                    self.dropping -= 1;
                }
            }
        }
    }

    fn on_accept(&mut self, index: usize, res: i32, flags: u32) {
        if !cqueue::more(flags) {
            self.pending
                .push(accept(self.d.listeners[index], OP_ACCEPT, index));
        }
        if res < 0 {
            if res != -libc::EINTR && res != -libc::ECONNABORTED {
                log::warn!("dispatcher accept: {}", io::Error::from_raw_os_error(-res));
            }
            return;
        }
        self.d.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let slot = self.admit(res, &[]);
        self.recv(slot);
    }

    fn on_drain_accept(&mut self, index: usize, res: i32, flags: u32) {
        let (p, j) = (index >> 8, index & 0xff);
        if !cqueue::more(flags) && self.draining.get(p).copied().unwrap_or(false) {
            if let Some(&fd) = self
                .table
                .pools
                .get(p)
                .and_then(Option::as_ref)
                .and_then(|q| q.listeners.get(j))
            {
                self.pending.push(accept(fd, OP_DRAIN_ACCEPT, index));
            }
        }
        if res >= 0 {
            let slot = self.insert(res, &[]);
            let passthrough = self
                .table
                .pool(PoolId::new(p))
                .is_some_and(|e| e.passthrough);
            if passthrough {
                self.d.stats.refuse(503);
                let alert = sluice_tls::hello::UNAVAILABLE.to_vec();
                self.start_reply(slot, Answer::Owned(alert), None);
            } else {
                self.refuse(slot, 503, "the application pool is stopped");
            }
        }
    }

    fn on_drain_handoff(&mut self, p: usize, res: i32) {
        if res >= 0 {
            let tls = self.d.tls.as_ref();
            let fd = incoming(&mut self.drain_msgs[p])
                .complete(res as usize)
                .ok()
                .and_then(|m| {
                    if m.flags & handoff::TLS == 0 {
                        return Some(m.fd.into_raw_fd());
                    }
                    // The TLS thread answers it 503 over its session.
                    to_tls(tls, m.fd, m.bytes.to_vec(), Arrival::Dispatcher, None);
                    None
                });
            if let Some(fd) = fd {
                let slot = self.insert(fd, &[]);
                self.refuse(slot, 503, "the application pool is stopped");
            }
        }
        if res != -libc::ECANCELED && self.draining.get(p).copied().unwrap_or(false) {
            if let Some(q) = self.table.pools.get(p).and_then(Option::as_ref) {
                let fd = q.handoff_workers;
                let entry = incoming(&mut self.drain_msgs[p]).recv(fd, ud(OP_DRAIN_HANDOFF, p));
                self.pending.push(entry);
            }
        }
    }

    fn on_handback(&mut self, p: usize, res: i32) {
        if res >= 0 {
            self.d.stats.handed_back.fetch_add(1, Ordering::Relaxed);
            self.admit_message(p, res as usize, false);
        }
        if res == -libc::ECANCELED {
            return;
        }
        match self.table.pools.get(p).and_then(Option::as_ref) {
            Some(e) => {
                let fd = e.handoff;
                let entry = incoming(&mut self.handback_msgs[p]).recv(fd, ud(OP_HANDBACK, p));
                self.pending.push(entry);
            }
            None => self.handback_armed[p] = false,
        }
    }

    /// Takes the connection of pool `p`'s last hand-back (or reroute) message of `len` bytes,
    /// with its bytes copied once, straight into the connection's buffer, and routes it. A
    /// message that carries no connection (a hostile or broken worker) is dropped and logged.
    fn admit_message(&mut self, p: usize, len: usize, reroute: bool) {
        let msgs = if reroute {
            &mut self.reroute_msgs
        } else {
            &mut self.handback_msgs
        };
        let Some(mut msg) = msgs[p].take() else {
            return;
        };
        let slot = match msg.complete(len) {
            // A delivery channel (the front end's own) is never routed as a client: one
            // left in a removed pool's channel closes, and the delivery thread answers.
            Ok(m) if m.flags & sluice_proto::handoff::DELIVERED != 0 => {
                if !reroute {
                    log::warn!("pool {p} handed back a delivery channel; closed");
                }
                None
            }
            Ok(m) if m.flags & handoff::TLS != 0 => {
                let arrival = if reroute {
                    Arrival::Dispatcher
                } else {
                    Arrival::Handback
                };
                // A worker's hand-back names its session itself: the TLS thread checks that
                // this pool could have been given a session of that name.
                let from = (!reroute).then(|| PoolId::new(p));
                to_tls(self.d.tls.as_ref(), m.fd, m.bytes.to_vec(), arrival, from);
                None
            }
            Ok(m) => {
                let fd = m.fd.into_raw_fd();
                let slot = self.admit(fd, m.bytes);
                if let Some(c) = self.conns[slot].as_mut().filter(|_| !reroute) {
                    c.arrival = Arrival::Handback;
                }
                Some(slot)
            }
            Err(e) => {
                log::warn!("pool {p}'s handoff channel: {e}");
                None
            }
        };
        let msgs = if reroute {
            &mut self.reroute_msgs
        } else {
            &mut self.handback_msgs
        };
        msgs[p] = Some(msg);
        if let Some(slot) = slot {
            self.process(slot);
        }
    }

    fn on_reroute(&mut self, p: usize, res: i32) {
        if res >= 0 {
            log::info!("dispatcher: routing a connection left for removed pool {p} afresh");
            self.admit_message(p, res as usize, true);
        }
        if res == -libc::ECANCELED {
            return;
        }
        if let Some(e) = self.table.pools.get(p).and_then(Option::as_ref) {
            let fd = e.handoff_workers;
            let op = incoming(&mut self.reroute_msgs[p]).recv(fd, ud(OP_REROUTE, p));
            self.pending.push(op);
        }
    }

    fn recv(&mut self, slot: usize) {
        self.recv_with(slot, 0);
    }

    /// `ioprio`: io_uring's receive flags.
    fn recv_with(&mut self, slot: usize, ioprio: u16) {
        let Some(c) = self.conns[slot].as_mut() else {
            return;
        };
        c.inflight += 1;
        let rest = &mut c.buf[c.filled..];
        self.pending.push(
            opcode::Recv::new(types::Fd(c.fd), rest.as_mut_ptr(), rest.len() as u32)
                .ioprio(ioprio)
                .build()
                .user_data(ud(OP_RECV, slot)),
        );
    }

    fn on_recv(&mut self, slot: usize, res: i32) {
        let Some(c) = self.conns[slot].as_mut() else {
            return;
        };
        c.inflight -= 1;
        if res <= 0 {
            self.uncount(slot);
            self.close(slot);
            return;
        }
        c.filled += res as usize;
        self.process(slot);
    }

    /// Decides what to do with what the connection has sent so far.
    fn process(&mut self, slot: usize) {
        // Nothing yet (a kept connection after its answer): its next request is not sent
        // before the client has read this answer, so the read waits for data first instead
        // of trying at once and failing.
        if self.conns[slot].as_ref().is_some_and(|c| c.filled == 0) {
            self.recv_with(slot, RECVSEND_POLL_FIRST);
            return;
        }
        // The local address is asked once per connection, and only where a verdict may
        // need it (IP-bound sites, a redirect of a head without `Host`).
        if self.table.routes.has_ip_sites() || self.table.redirect.is_some() {
            if let Some(c) = self.conns[slot].as_mut().filter(|c| c.local.is_none()) {
                c.local = local_address_of(c.fd);
            }
        }
        let verdict = {
            let Some(c) = self.conns[slot].as_ref() else {
                return;
            };
            let rules = Rules {
                limits: &self.d.limits,
                table: &self.table,
                generation: self.generation,
                flags: &self.d.flags,
                cache: &self.d.cache,
            };
            let facts = Facts {
                local: c.local,
                sni: None,
                tls: false,
                kept: false,
                now: self.now,
            };
            let full = c.filled >= c.buf.len();
            pipeline::judge(&c.buf[..c.filled], full, rules, facts, &mut self.memo)
        };
        if matches!(verdict, Verdict::NeedMore) {
            self.recv(slot);
            return;
        }
        self.uncount(slot);
        match verdict {
            Verdict::NeedMore => {}
            Verdict::Cached {
                answer,
                head_len,
                keep,
                pool,
            } => self.answer_cached(slot, answer, pool, !keep, head_len),
            Verdict::Refuse { status, why, .. } => self.refuse(slot, status, why),
            Verdict::Redirect { answer } => {
                self.d.stats.redirects.fetch_add(1, Ordering::Relaxed);
                if self.d.access_log.is_some() {
                    self.log_answer(slot, 308, crate::access_log::body_len(&answer), None);
                }
                self.start_reply(slot, Answer::Owned(answer), None);
            }
            Verdict::Pool(r) if r.hold == Hold::FrontEnd => self.deliver(slot, r.pool),
            Verdict::Pool(r) if self.table.pool(r.pool).is_some_and(|e| e.relay) => {
                self.relay(slot, r.pool);
            }
            Verdict::Pool(r) => self.hand_off(slot, r.pool),
        }
    }

    /// Gives the connection, with the bytes read of it, to pool `p`'s workers.
    fn hand_off(&mut self, slot: usize, p: PoolId) {
        let channel = self.table.pool(p).map_or(-1, |e| e.handoff);
        let Some(c) = self.conns[slot].as_ref() else {
            return;
        };
        let flags = handoff::routed_flags(c.arrival);
        let counted = self.d.stats.hand_off(p);
        match handoff::send(channel, c.fd, flags, &c.buf[..c.filled]) {
            Ok(()) => self.close(slot),
            Err(e) => {
                counted.undo();
                log::warn!("handoff to pool {p} failed: {e}");
                self.refuse(slot, 503, "the application's queue is full");
            }
        }
    }

    fn answer_cached(
        &mut self,
        slot: usize,
        bytes: Answer,
        routed: Option<PoolId>,
        close: bool,
        head_len: usize,
    ) {
        self.d.stats.cache_answers.fetch_add(1, Ordering::Relaxed);
        if self.d.access_log.is_some() {
            let pool = routed.and_then(|p| self.table.pool(p).map(|e| e.name.clone()));
            self.log_answer(slot, 200, crate::access_log::body_len(&bytes), pool);
        }
        let keep = (!close).then_some(head_len);
        self.start_reply(slot, bytes, keep);
    }

    /// A copy of the connection's fd for another thread (the slot's own copy closes after
    /// it is passed on, as after a handoff); None (answered 503) if it cannot be made.
    fn pass_on(&mut self, slot: usize, p: PoolId) -> Option<std::os::fd::OwnedFd> {
        let c = self.conns[slot].as_ref()?;
        // SAFETY: duplicates the connection's fd; the copy is owned right away.
        let fd = unsafe { libc::fcntl(c.fd, libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            log::warn!(
                "passing a connection on for pool {p}: {}",
                io::Error::last_os_error()
            );
            self.refuse(slot, 503, "the application pool cannot be reached");
            return None;
        }
        // SAFETY: `fd` was just made by F_DUPFD and is owned by nothing else.
        Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    }

    /// A socket pool's connection: the relay joins it to a connection into the pool's
    /// queue, with the bytes read so far.
    fn relay(&mut self, slot: usize, p: PoolId) {
        let Some(relay) = self.d.relay.clone() else {
            self.refuse(slot, 503, "the application pool cannot be reached");
            return;
        };
        let Some(client) = self.pass_on(slot, p) else {
            return;
        };
        let Some(c) = self.conns[slot].as_ref() else {
            return;
        };
        let counted = self.d.stats.hand_off(p);
        if relay
            .join(client, c.buf[..c.filled].to_vec(), p, &self.table)
            .is_err()
        {
            counted.undo();
            self.refuse(slot, 503, "the application pool cannot be reached");
            return;
        }
        self.close(slot);
    }

    /// A connection of a shared host: the delivery thread keeps it and delivers each of
    /// its requests, this one first.
    fn deliver(&mut self, slot: usize, p: PoolId) {
        let Some(delivery) = self.d.delivery.clone() else {
            self.refuse(slot, 503, "the application pool cannot be reached");
            return;
        };
        let Some(client) = self.pass_on(slot, p) else {
            return;
        };
        let Some(c) = self.conns[slot].as_ref() else {
            return;
        };
        if delivery
            .give(client, c.buf[..c.filled].to_vec(), c.arrival)
            .is_err()
        {
            self.refuse(slot, 503, "the application pool cannot be reached");
            return;
        }
        self.close(slot);
    }

    fn refuse(&mut self, slot: usize, code: u16, why: &str) {
        self.d.stats.refuse(code);
        let head_only = self.conns[slot]
            .as_ref()
            .is_some_and(|c| sluice_proto::request::is_head(&c.buf[..c.filled]));
        let answer = crate::answers::refusal(code, why, head_only);
        if self.d.access_log.is_some() {
            self.log_answer(slot, code, crate::access_log::body_len(&answer), None);
        }
        self.start_reply(slot, Answer::Owned(answer), None);
    }

    /// An access-log line for what the dispatcher answered on `slot` itself.
    fn log_answer(&self, slot: usize, status: u16, bytes: u64, pool: Option<Arc<str>>) {
        let (Some(log), Some(c)) = (&self.d.access_log, self.conns[slot].as_ref()) else {
            return;
        };
        log.answered(crate::access_log::Answered {
            fd: c.fd,
            head: &c.buf[..c.filled],
            status,
            bytes,
            duration: self.now.saturating_duration_since(c.started),
            arrival: c.arrival,
            pool,
        });
    }

    fn start_reply(&mut self, slot: usize, bytes: Answer, keep: Option<usize>) {
        let Some(c) = self.conns[slot].as_mut() else {
            return;
        };
        c.state = State::Replying { keep };
        c.deadline = self.now + LINGER.max(self.d.idle_timeout.min(Duration::from_secs(30)));
        c.reply = bytes;
        c.sent = 0;
        self.send(slot);
    }

    fn send(&mut self, slot: usize) {
        let Some(c) = self.conns[slot].as_mut() else {
            return;
        };
        c.inflight += 1;
        let rest = &c.reply[c.sent..];
        self.pending.push(
            opcode::Send::new(types::Fd(c.fd), rest.as_ptr(), rest.len() as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data(ud(OP_SEND, slot)),
        );
    }

    fn on_send(&mut self, slot: usize, res: i32) {
        let Some(c) = self.conns[slot].as_mut() else {
            return;
        };
        c.inflight -= 1;
        if res <= 0 {
            self.close(slot);
            return;
        }
        c.sent += res as usize;
        if c.sent < c.reply.len() {
            self.send(slot);
            return;
        }
        match c.state {
            State::Replying {
                keep: Some(consumed),
            } => {
                // Keep-alive after a cached answer: the next request may be pipelined already.
                c.started = self.now;
                c.buf.copy_within(consumed..c.filled, 0);
                c.filled -= consumed;
                c.state = State::Reading;
                c.reply = Answer::Owned(Vec::new());
                c.deadline = self.now
                    + if c.filled > 0 {
                        self.d.header_timeout
                    } else {
                        self.d.idle_timeout
                    };
                self.next_serial += 1;
                let serial = self.next_serial;
                if let Some(c) = self.conns[slot].as_mut() {
                    c.serial = serial;
                    c.counted = true;
                }
                self.reading += 1;
                self.push_order(slot, serial);
                self.process(slot);
            }
            _ => {
                // Let the client close first: the answer says `Connection: close` and has a
                // length, so the client closes once it has read it; wait briefly for its FIN.
                // Whoever sends the first FIN keeps the TIME_WAIT, and a server-side
                // TIME_WAIT defeats first-segment steering of that client's next SYN.
                c.state = State::Lingering;
                self.linger(slot);
            }
        }
    }

    fn linger(&mut self, slot: usize) {
        let Some(c) = self.conns[slot].as_mut() else {
            return;
        };
        c.inflight += 2;
        c.filled = 0;
        let buf = &mut c.buf[..];
        self.pending.push(
            opcode::Recv::new(types::Fd(c.fd), buf.as_mut_ptr(), buf.len() as u32)
                .build()
                .flags(squeue::Flags::IO_LINK)
                .user_data(ud(OP_LINGER, slot)),
        );
        self.pending.push(
            opcode::LinkTimeout::new(&*self.linger)
                .build()
                .user_data(ud(OP_LINGER_TIMEOUT, slot)),
        );
    }

    fn on_linger(&mut self, slot: usize, res: i32) {
        let Some(c) = self.conns[slot].as_mut() else {
            return;
        };
        c.inflight -= 1;
        if res > 0 && self.now < c.deadline {
            self.linger(slot);
        } else if c.inflight == 0 {
            self.close(slot);
        } else {
            // The linked timeout is still to complete; close then.
            c.done = true;
        }
    }

    fn on_linger_timeout(&mut self, slot: usize) {
        let Some(c) = self.conns[slot].as_mut() else {
            return;
        };
        c.inflight -= 1;
        if c.inflight == 0 && c.done {
            self.close(slot);
        }
    }

    fn close(&mut self, slot: usize) {
        if let Some(c) = self.conns[slot].take() {
            // SAFETY: the connection's fd is ours and no operation on it is in flight.
            unsafe { libc::close(c.fd) };
            self.free.push(slot);
            if c.buf.len() == self.buf_len && self.spare.len() < MAX_SPARE_BUFFERS {
                self.spare.push(c.buf);
            }
        }
    }
}

fn incoming(slot: &mut Option<Box<handoff::Incoming>>) -> &mut handoff::Incoming {
    slot.get_or_insert_with(|| Box::new(handoff::Incoming::new()))
}

fn accept(fd: RawFd, op: u64, index: usize) -> squeue::Entry {
    opcode::AcceptMulti::new(types::Fd(fd))
        .flags(libc::SOCK_CLOEXEC)
        .build()
        .user_data(ud(op, index))
}

/// A TLS session a worker handed on (its `Session` payload, then plaintext): the TLS
/// thread reads it; without one it is dropped, and so closed.
fn to_tls(
    tls: Option<&crate::tls::Inbox>,
    fd: std::os::fd::OwnedFd,
    bytes: Vec<u8>,
    arrival: Arrival,
    from: Option<PoolId>,
) {
    if let Some(tls) = tls {
        tls.send(Held { fd, bytes, arrival }, from);
    }
}

fn cancel(target: u64) -> squeue::Entry {
    opcode::AsyncCancel::new(target)
        .build()
        .user_data(ud(OP_CANCEL, 0))
}
