//! The dispatcher: the front end's own io_uring loop for what the kernel did not steer.
//! It accepts on the dispatcher sockets, reads the request head, routes it with the same
//! rules as the kernel program (after canonicalizing the URL), and hands the connection to
//! the pool's workers with the bytes already read — or refuses it with a clear status.

mod handoff;
pub mod head;

use std::{
    io,
    os::fd::RawFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use self::head::{Decision, Limits};
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
}

const REFUSAL_CODES: [u16; 5] = [400, 408, 414, 431, 503];

impl DispatchStats {
    pub fn new(pools: usize) -> DispatchStats {
        DispatchStats {
            handed_off: (0..pools).map(|_| AtomicU64::new(0)).collect(),
            refused: REFUSAL_CODES.iter().map(|&c| (c, AtomicU64::new(0))).collect(),
            ..Default::default()
        }
    }

    fn refuse(&self, code: u16) {
        if let Some((_, n)) = self.refused.iter().find(|(c, _)| *c == code) {
            n.fetch_add(1, Relaxed);
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
        PoolFlags((0..pools).map(|_| std::sync::atomic::AtomicU32::new(0)).collect())
    }

    pub fn get(&self, pool: usize) -> u32 {
        self.0.get(pool).map(|f| f.load(Relaxed)).unwrap_or(0)
    }

    /// Sets or clears `flag`; true if that changed anything.
    pub fn set(&self, pool: usize, flag: u32, on: bool) -> bool {
        let Some(f) = self.0.get(pool) else { return false };
        let old = if on { f.fetch_or(flag, Relaxed) } else { f.fetch_and(!flag, Relaxed) };
        (old & flag != 0) != on
    }
}

/// What the dispatcher knows of one pool.
#[derive(Debug, Clone)]
pub struct PoolEntry {
    /// The front end's end of the pool's handoff channel.
    pub handoff: RawFd,
    /// The pool's listening sockets, drained while the pool is stopped.
    pub listeners: Vec<RawFd>,
    /// The workers' end of the handoff channel (the front end holds it too), drained likewise.
    pub handoff_workers: RawFd,
}

/// The routes and pools the dispatcher works with; a reload swaps in a new one.
#[derive(Debug, Default)]
pub struct Table {
    pub routes: RouteTable,
    /// By pool id; `None` for ids of removed pools.
    pub pools: Vec<Option<PoolEntry>>,
}

/// The current table, and the generation of it the dispatcher has started using (the front
/// end closes a removed pool's fds only once the dispatcher no longer holds them).
#[derive(Debug, Default)]
pub struct SharedTable {
    table: std::sync::RwLock<(u64, Arc<Table>)>,
    seen: AtomicU64,
}

impl SharedTable {
    pub fn new(table: Table) -> SharedTable {
        SharedTable { table: std::sync::RwLock::new((1, Arc::new(table))), seen: AtomicU64::new(0) }
    }

    /// Installs a new table; returns its generation.
    pub fn replace(&self, table: Table) -> u64 {
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        t.0 += 1;
        t.1 = Arc::new(table);
        t.0
    }

    fn current(&self) -> (u64, Arc<Table>) {
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
    /// Readable (eventfd) when the dispatcher must stop.
    pub stop: RawFd,
    pub flags: Arc<PoolFlags>,
    /// Readable (eventfd) when `flags` or the table changed.
    pub wake: RawFd,
}

const RING_ENTRIES: u32 = 1024;
/// How long a refused connection may take to close its side after our answer.
const LINGER: Duration = Duration::from_secs(2);
const TICK: Duration = Duration::from_secs(1);

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

fn ud(op: u64, index: usize) -> u64 {
    op << 32 | index as u64
}

enum State {
    Reading,
    Replying,
    Lingering,
}

struct Conn {
    fd: RawFd,
    buf: Vec<u8>,
    filled: usize,
    state: State,
    deadline: Instant,
    reply: Vec<u8>,
    sent: usize,
    /// Operations in flight; the slot is freed only when none are.
    inflight: u32,
    /// Tells this connection from an earlier one in the same slot.
    serial: u64,
    /// Dropped to make room (see `max_pending`).
    dropped: bool,
}

pub fn run(d: Dispatcher) -> io::Result<()> {
    let mut ring = IoUring::builder().setup_coop_taskrun().build(RING_ENTRIES)?;
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut pending: Vec<squeue::Entry> = Vec::new();
    let tick = types::Timespec::from(TICK);
    let linger_ts = types::Timespec::from(LINGER);
    let mut stop_buf = [0u8; 8];
    let mut wake_buf = [0u8; 8];
    let pools_max = sluice_common::MAX_POOLS as usize;
    let mut draining = vec![false; pools_max];
    // Listening sockets each draining pool had when its accepts were armed.
    let mut drained_listeners = vec![0usize; pools_max];
    let mut drain_msgs: Vec<Box<handoff::Incoming>> = (0..pools_max).map(|_| Box::new(handoff::Incoming::new())).collect();
    let (mut generation, mut table) = d.table.current();
    // Unrouted connections in accept order: (slot, serial); stale entries are skipped.
    let mut reading_order: std::collections::VecDeque<(usize, u64)> = std::collections::VecDeque::new();
    let mut next_serial = 0u64;
    // Connections in the Reading state, and those of them dropped but not yet closed.
    let (mut reading, mut dropping) = (0usize, 0usize);
    d.table.seen.store(generation, std::sync::atomic::Ordering::Release);

    for (i, &fd) in d.listeners.iter().enumerate() {
        pending.push(accept(fd, i));
    }
    pending.push(opcode::Timeout::new(&tick).build().user_data(ud(OP_TICK, 0)));
    pending.push(
        opcode::Read::new(types::Fd(d.stop), stop_buf.as_mut_ptr(), 8).build().user_data(ud(OP_STOP, 0)),
    );
    pending.push(opcode::Read::new(types::Fd(d.wake), wake_buf.as_mut_ptr(), 8).build().user_data(ud(OP_WAKE, 0)));

    loop {
        {
            let mut sq = ring.submission();
            for e in pending.drain(..) {
                // SAFETY: every buffer an entry points at lives in `conns` (boxed Vec storage
                // that is not touched while the op is in flight), in `stop_buf` or `tick`.
                while unsafe { sq.push(&e) }.is_err() {
                    drop(sq);
                    ring.submit()?;
                    sq = ring.submission();
                }
            }
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(e),
        }
        let cqes: Vec<(u64, i32, u32)> = ring.completion().map(|c: cqueue::Entry| (c.user_data(), c.result(), c.flags())).collect();
        let (g, t) = d.table.current();
        if g != generation {
            (generation, table) = (g, t);
            d.table.seen.store(generation, std::sync::atomic::Ordering::Release);
        }
        for (user_data, res, flags) in cqes {
            let op = user_data >> 32;
            let index = (user_data & 0xffff_ffff) as usize;
            match op {
                OP_STOP => return Ok(()),
                OP_TICK => {
                    let now = Instant::now();
                    for c in conns.iter_mut().flatten() {
                        if !matches!(c.state, State::Lingering) && now > c.deadline {
                            d.stats.timeouts.fetch_add(1, Relaxed);
                            // Ends the pending recv (it returns 0); the normal path closes.
                            // SAFETY: shutdown on a connection we own.
                            unsafe { libc::shutdown(c.fd, libc::SHUT_RDWR) };
                        }
                    }
                    pending.push(opcode::Timeout::new(&tick).build().user_data(ud(OP_TICK, 0)));
                }
                OP_WAKE => {
                    pending.push(
                        opcode::Read::new(types::Fd(d.wake), wake_buf.as_mut_ptr(), 8).build().user_data(ud(OP_WAKE, 0)),
                    );
                    for p in 0..pools_max {
                        let entry = table.pools.get(p).and_then(Option::as_ref);
                        let stopped = entry.is_some() && d.flags.get(p) & PoolFlags::STOPPED != 0;
                        if let (true, false, Some(q)) = (stopped, draining[p], entry) {
                            // Connections already queued for a stopped pool get 503 too.
                            log::info!("dispatcher: answering pool {p}'s queue with 503 while it is stopped");
                            for (j, &fd) in q.listeners.iter().enumerate() {
                                pending.push(drain_accept(fd, p, j));
                            }
                            pending.push(drain_msgs[p].recv(q.handoff_workers, ud(OP_DRAIN_HANDOFF, p)));
                            draining[p] = true;
                            drained_listeners[p] = q.listeners.len();
                        } else if !stopped && draining[p] {
                            for j in 0..drained_listeners[p] {
                                pending.push(cancel(ud(OP_DRAIN_ACCEPT, p << 8 | j)));
                            }
                            pending.push(cancel(ud(OP_DRAIN_HANDOFF, p)));
                            draining[p] = false;
                        }
                    }
                }
                OP_DRAIN_ACCEPT => {
                    let (p, j) = (index >> 8, index & 0xff);
                    if !cqueue::more(flags) && draining.get(p).copied().unwrap_or(false) {
                        if let Some(fd) = table.pools.get(p).and_then(Option::as_ref).and_then(|q| q.listeners.get(j)) {
                            pending.push(drain_accept(*fd, p, j));
                        }
                    }
                    if res >= 0 {
                        let slot = insert(&mut conns, &mut free, res, &d);
                        if let Some(c) = conns[slot].as_mut() {
                            start_reply(c, 503, "the application pool is stopped", &d.stats);
                            pending.push(send(c, slot));
                        }
                    }
                }
                OP_DRAIN_HANDOFF => {
                    let p = index;
                    if res >= 0 {
                        if let Some(fd) = drain_msgs[p].take_fd() {
                            let slot = insert(&mut conns, &mut free, fd, &d);
                            if let Some(c) = conns[slot].as_mut() {
                                start_reply(c, 503, "the application pool is stopped", &d.stats);
                                pending.push(send(c, slot));
                            }
                        }
                    }
                    if res != -libc::ECANCELED && draining.get(p).copied().unwrap_or(false) {
                        if let Some(q) = table.pools.get(p).and_then(Option::as_ref) {
                            pending.push(drain_msgs[p].recv(q.handoff_workers, ud(OP_DRAIN_HANDOFF, p)));
                        }
                    }
                }
                OP_CANCEL => {}
                OP_ACCEPT => {
                    if !cqueue::more(flags) {
                        pending.push(accept(d.listeners[index], index));
                    }
                    if res < 0 {
                        if res != -libc::EINTR && res != -libc::ECONNABORTED {
                            log::warn!("dispatcher accept: {}", io::Error::from_raw_os_error(-res));
                        }
                        continue;
                    }
                    d.stats.accepted.fetch_add(1, Relaxed);
                    // Bounded: slow clients cannot hold every slot; the oldest unrouted
                    // connection makes room (its pending read ends and it is closed).
                    while reading - dropping >= d.max_pending {
                        let Some((old, serial)) = reading_order.pop_front() else { break };
                        if let Some(c) = conns.get_mut(old).and_then(Option::as_mut) {
                            if c.serial == serial && matches!(c.state, State::Reading) && !c.dropped {
                                c.dropped = true;
                                dropping += 1;
                                d.stats.dropped.fetch_add(1, Relaxed);
                                // SAFETY: shutdown on a connection we own.
                                unsafe { libc::shutdown(c.fd, libc::SHUT_RDWR) };
                                break;
                            }
                        }
                    }
                    let slot = insert(&mut conns, &mut free, res, &d);
                    if let Some(c) = conns[slot].as_mut() {
                        next_serial += 1;
                        c.serial = next_serial;
                        reading += 1;
                        reading_order.push_back((slot, next_serial));
                        pending.push(recv(c, slot));
                    }
                }
                OP_RECV => {
                    let Some(c) = conns[index].as_mut() else { continue };
                    c.inflight -= 1;
                    if res <= 0 {
                        reading -= 1;
                        if c.dropped {
                            dropping -= 1;
                        }
                        close(&mut conns, &mut free, index);
                        continue;
                    }
                    c.filled += res as usize;
                    let decision = match head::decide(&c.buf[..c.filled], &d.limits, &table.routes) {
                        Decision::NeedMore if c.filled < c.buf.len() => Decision::NeedMore,
                        Decision::NeedMore => Decision::Refuse(431, "the request head is too large"),
                        Decision::Pool(p) if table.pools.get(p).and_then(Option::as_ref).is_none() => {
                            Decision::Refuse(503, "the application pool is being removed")
                        }
                        other => other,
                    };
                    if decision != Decision::NeedMore {
                        // Routed or refused: no longer an unrouted connection.
                        reading -= 1;
                        if c.dropped {
                            dropping -= 1;
                            c.dropped = false;
                        }
                    }
                    match decision {
                        Decision::NeedMore => pending.push(recv(c, index)),
                        Decision::Pool(pool) if d.flags.get(pool) & PoolFlags::STOPPED != 0 => {
                            start_reply(c, 503, "the application pool is stopped", &d.stats);
                            pending.push(send(c, index));
                        }
                        Decision::Pool(pool) if d.flags.get(pool) & PoolFlags::FULL != 0 => {
                            start_reply(c, 503, "the application's queue is full", &d.stats);
                            pending.push(send(c, index));
                        }
                        Decision::Pool(pool) => match handoff::send(
                            table.pools.get(pool).and_then(Option::as_ref).map(|e| e.handoff).unwrap_or(-1),
                            c.fd,
                            &c.buf[..c.filled],
                        ) {
                            Ok(()) => {
                                    if let Some(n) = d.stats.handed_off.get(pool) {
                                    n.fetch_add(1, Relaxed);
                                }
                                close(&mut conns, &mut free, index);
                            }
                            Err(e) => {
                                log::warn!("handoff to pool {pool} failed: {e}");
                                start_reply(c, 503, "the application's queue is full", &d.stats);
                                pending.push(send(c, index));
                            }
                        },
                        Decision::Refuse(code, why) => {
                            start_reply(c, code, why, &d.stats);
                            pending.push(send(c, index));
                        }
                    }
                }
                OP_SEND => {
                    let Some(c) = conns[index].as_mut() else { continue };
                    c.inflight -= 1;
                    if res <= 0 {
                        close(&mut conns, &mut free, index);
                        continue;
                    }
                    c.sent += res as usize;
                    if c.sent < c.reply.len() {
                        pending.push(send(c, index));
                        continue;
                    }
                    // Let the client close first: the answer says `Connection: close` and has a
                    // length, so the client closes once it has read it; wait briefly for its
                    // FIN. Whoever sends the first FIN keeps the TIME_WAIT, and a server-side
                    // TIME_WAIT defeats first-segment steering of that client's next SYN.
                    c.state = State::Lingering;
                    pending.extend(linger(c, index, &linger_ts));
                }
                OP_LINGER => {
                    let Some(c) = conns[index].as_mut() else { continue };
                    c.inflight -= 1;
                    if res > 0 && Instant::now() < c.deadline {
                        pending.extend(linger(c, index, &linger_ts));
                    } else if c.inflight == 0 {
                        close(&mut conns, &mut free, index);
                    } else {
                        // The linked timeout is still to complete; close then.
                        c.filled = usize::MAX;
                    }
                }
                OP_LINGER_TIMEOUT => {
                    let Some(c) = conns[index].as_mut() else { continue };
                    c.inflight -= 1;
                    if c.inflight == 0 && c.filled == usize::MAX {
                        close(&mut conns, &mut free, index);
                    }
                }
                _ => {}
            }
        }
    }
}

fn insert(conns: &mut Vec<Option<Conn>>, free: &mut Vec<usize>, fd: RawFd, d: &Dispatcher) -> usize {
    let conn = Conn {
        fd,
        buf: vec![0; d.limits.max_request_head.max(d.limits.max_url + 64) + 1],
        filled: 0,
        state: State::Reading,
        deadline: Instant::now() + d.header_timeout,
        reply: Vec::new(),
        sent: 0,
        inflight: 0,
        serial: 0,
        dropped: false,
    };
    let slot = free.pop().unwrap_or_else(|| {
        conns.push(None);
        conns.len() - 1
    });
    conns[slot] = Some(conn);
    slot
}

fn drain_accept(fd: RawFd, pool: usize, listener: usize) -> squeue::Entry {
    opcode::AcceptMulti::new(types::Fd(fd))
        .flags(libc::SOCK_CLOEXEC)
        .build()
        .user_data(ud(OP_DRAIN_ACCEPT, pool << 8 | listener))
}

fn cancel(target: u64) -> squeue::Entry {
    opcode::AsyncCancel::new(target).build().user_data(ud(OP_CANCEL, 0))
}

fn accept(fd: RawFd, index: usize) -> squeue::Entry {
    opcode::AcceptMulti::new(types::Fd(fd)).flags(libc::SOCK_CLOEXEC).build().user_data(ud(OP_ACCEPT, index))
}

fn recv(c: &mut Conn, index: usize) -> squeue::Entry {
    c.inflight += 1;
    let rest = &mut c.buf[c.filled..];
    opcode::Recv::new(types::Fd(c.fd), rest.as_mut_ptr(), rest.len() as u32).build().user_data(ud(OP_RECV, index))
}

fn send(c: &mut Conn, index: usize) -> squeue::Entry {
    c.inflight += 1;
    let rest = &c.reply[c.sent..];
    opcode::Send::new(types::Fd(c.fd), rest.as_ptr(), rest.len() as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(ud(OP_SEND, index))
}

fn linger(c: &mut Conn, index: usize, ts: &types::Timespec) -> [squeue::Entry; 2] {
    c.inflight += 2;
    c.filled = 0;
    let buf = &mut c.buf[..];
    [
        opcode::Recv::new(types::Fd(c.fd), buf.as_mut_ptr(), buf.len() as u32)
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(ud(OP_LINGER, index)),
        opcode::LinkTimeout::new(ts).build().user_data(ud(OP_LINGER_TIMEOUT, index)),
    ]
}

fn start_reply(c: &mut Conn, code: u16, why: &str, stats: &DispatchStats) {
    stats.refuse(code);
    c.state = State::Replying;
    c.deadline = Instant::now() + LINGER;
    c.reply = reply(code, why);
    c.sent = 0;
}

/// A complete answer that closes the connection.
pub fn reply(code: u16, why: &str) -> Vec<u8> {
    let reason = match code {
        400 => "Bad Request",
        408 => "Request Timeout",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let body = format!("{code} {reason}: {why}\n");
    let retry = if code == 503 { "Retry-After: 1\r\n" } else { "" };
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{retry}Connection: close\r\nServer: sluice\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn close(conns: &mut [Option<Conn>], free: &mut Vec<usize>, index: usize) {
    if let Some(c) = conns[index].take() {
        // SAFETY: the connection's fd is ours and no operation on it is in flight.
        unsafe { libc::close(c.fd) };
        free.push(index);
    }
}
