//! The io_uring runtime: one thread and one ring per core. Each ring has a multishot accept on
//! every pool socket, a recvmsg on the handoff socket, a periodic tick and an eventfd read that
//! wakes it for a graceful stop; each connection runs a recv -> handle -> send state machine
//! with at most one operation in flight. Thread 0's ring also reads the control socket and
//! answers it after each completion batch, so a worker whose threads are stuck in handlers
//! stops answering pings; it also stores the `routes` and `cached` lists it receives there for
//! every thread (`routing.rs`).
//!
//! Before a request is answered, routing may decide it belongs to the front end: the responses
//! to the earlier requests on the connection are sent first, then the connection goes back on
//! the handoff socket with every unconsumed byte from that request on (`handoff::send`).

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use sluice_proto::handoff::{self, HandoffError, RecvBuf};
use sluice_proto::outcomes::Cells;
use sluice_proto::site::local_address_of;

use crate::access::{self, ConnInfo};
use crate::control::{self, ToFrontend, ToWorker};
use crate::http::{self, Dispatch, HttpConn, Limits, Outcome};
use crate::publish::Publisher;
use crate::response::Tail;
use crate::routing::{Routing, RoutingView, SharedRouting};
use crate::sockets::{Sockets, setsockopt_int};
use crate::{Context, Error, Handler, Options, Request, Response};
use sluice_proto::access::Arrival;

const RING_ENTRIES: u32 = 1024;
const CQ_ENTRIES: u32 = 8192;
const TICK: Duration = Duration::from_millis(500);
const TICKS_PER_SECOND: u64 = 2;
/// Ticks a lingering close waits for the client's FIN (~2 s).
const LINGER_TICKS: u64 = 4;
/// Ticks a keep-alive connection idle at a stop request gets to send one more request, which
/// is answered with `Connection: close` (~2 s). Closing it at once would race with a request
/// the client is sending (a client such as wrk then reports a read error).
const STOP_GRACE_TICKS: u64 = 4;
/// Ticks after the cut before a thread gives up waiting for cancellations.
const STOP_ABANDON_TICKS: u64 = 2;
/// How long a worker under a front end waits for the route table and the cached keys before
/// it gives up (the front end queues them before it starts the worker).
const GREETING_LIMIT: Duration = Duration::from_secs(30);
/// Ticks between unsolicited `stats` messages (at most one per second).
const STATS_TICKS: u64 = 2;
const READ_CHUNK: usize = 4096;
const MAX_READ_CHUNK: usize = 1 << 20;
/// Send buffer asked for on the control and handoff sockets, so a `cache` message with a
/// 256 KiB response fits (the kernel caps it at twice `net.core.wmem_max`).
const SEQPACKET_SNDBUF: libc::c_int = 1 << 20;

// Operation kinds, in the low byte of user_data.
const OP_ACCEPT: u8 = 1;
const OP_HANDOFF: u8 = 2;
const OP_WAKE: u8 = 3;
const OP_TICK: u8 = 4;
const OP_RECV: u8 = 5;
const OP_SEND: u8 = 6;
const OP_CANCEL: u8 = 7;
const OP_CONTROL: u8 = 8;
/// A chunk of a file body read into the connection's write buffer.
const OP_FILE: u8 = 9;
/// Bytes of a file body read and sent at a time: what a download costs in memory.
const FILE_CHUNK: usize = 256 * 1024;

/// user_data: kind (8 bits) | index (32 bits) | generation (24 bits).
fn user_data(kind: u8, index: u32, generation: u32) -> u64 {
    u64::from(kind) | (u64::from(index) << 8) | (u64::from(generation & 0xff_ffff) << 40)
}

fn split_user_data(ud: u64) -> (u8, u32, u32) {
    (ud as u8, (ud >> 8) as u32, (ud >> 40) as u32)
}

struct Shared<H> {
    handler: H,
    /// `SLUICE_POOL`.
    pool: Option<String>,
    pid: u32,
    pools: Vec<RawFd>,
    handoff: Option<RawFd>,
    control: Option<RawFd>,
    limits: Limits,
    idle_ticks: u64,
    /// Ticks a request head may take to arrive.
    header_ticks: u64,
    /// Bytes per second a client must take responses at (0: no limit).
    min_send_rate: u64,
    /// Ticks after a stop request before connections still in progress are cut (from the
    /// pool's `shutdown_time_limit`, less a margin so the worker ends before it is killed).
    stop_deadline_ticks: u64,
    /// Responses written by this process (all threads).
    requests: AtomicU64,
    /// Set when a stop was asked for on the control channel (or the front end went away);
    /// the main thread polls it between signal waits (every 250 ms) and stops every thread.
    stop_requested: AtomicBool,
    /// The route table and cached paths from the front end (written by thread 0).
    routing: SharedRouting,
    /// Publishes cacheable responses on the control socket.
    publisher: Publisher,
    /// Send access-log entries (`SLUICE_ACCESS_LOG`).
    access_log: bool,
    /// Per thread: how its answers went (reported in `stats`).
    outcomes: Box<[Cells]>,
}

/// Serves `sockets` until SIGTERM/SIGINT, then stops gracefully.
pub(crate) fn serve<H: Handler>(
    sockets: Sockets,
    options: &Options,
    handler: H,
) -> Result<(), Error> {
    let signals = block_stop_signals()?;
    for fd in [sockets.control.as_ref(), sockets.handoff.as_ref()]
        .into_iter()
        .flatten()
    {
        if let Err(e) = setsockopt_int(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            SEQPACKET_SNDBUF,
        ) {
            log::debug!("SO_SNDBUF on fd {}: {e}", fd.as_raw_fd());
        }
    }
    let control_fd = sockets.control.as_ref().map(AsRawFd::as_raw_fd);
    let shared = Arc::new(Shared {
        handler,
        pool: options.pool.clone(),
        pid: std::process::id(),
        pools: sockets.pools.iter().map(AsRawFd::as_raw_fd).collect(),
        handoff: sockets.handoff.as_ref().map(AsRawFd::as_raw_fd),
        control: sockets.control.as_ref().map(AsRawFd::as_raw_fd),
        limits: options.head_limits(),
        idle_ticks: (options.idle_timeout.as_millis() / TICK.as_millis()).max(1) as u64,
        header_ticks: (options.header_timeout.as_millis() / TICK.as_millis()).max(1) as u64,
        min_send_rate: options.min_send_rate,
        stop_deadline_ticks: stop_deadline_ticks(options.shutdown_time_limit),
        requests: AtomicU64::new(0),
        stop_requested: AtomicBool::new(false),
        routing: SharedRouting::default(),
        publisher: Publisher::new(control_fd, options.cache_max_entry),
        access_log: options.access_log,
        outcomes: (0..options.threads).map(|_| Cells::default()).collect(),
    });
    log::info!(
        "sluice-worker pid {} pool {}: {} thread(s), {} {} pool socket(s){}{}",
        shared.pid,
        shared.pool.as_deref().unwrap_or("(standalone)"),
        options.threads,
        shared.pools.len(),
        if sockets.inherited {
            "inherited"
        } else {
            "bound"
        },
        if shared.handoff.is_some() {
            ", handoff socket"
        } else {
            ""
        },
        if shared.control.is_some() {
            ", control socket"
        } else {
            ""
        },
    );

    if let Some(fd) = shared.control {
        match await_greeting(fd, options.pool.as_deref().unwrap_or(""), &shared.routing)? {
            Greeting::Complete => {}
            Greeting::Stop => {
                log::info!("stopped by the front end before serving");
                return Ok(());
            }
        }
    }

    let mut threads = Vec::with_capacity(options.threads);
    let mut spawn_error = None;
    for index in 0..options.threads {
        let wake = match eventfd() {
            Ok(fd) => fd,
            Err(source) => {
                spawn_error = Some(Error::Os {
                    what: "eventfd",
                    source,
                });
                break;
            }
        };
        let wake_fd = wake.as_raw_fd();
        let shared = Arc::clone(&shared);
        let spawned = thread::Builder::new()
            .name(format!("sluice-w{index}"))
            .spawn(move || Worker::new(&shared, index, wake_fd).and_then(|mut w| w.run()));
        match spawned {
            Ok(handle) => threads.push((handle, wake)),
            Err(source) => {
                spawn_error = Some(Error::Os {
                    what: "spawning a worker thread",
                    source,
                });
                break;
            }
        }
    }

    if spawn_error.is_none() {
        wait_for_stop(&signals, &threads, &shared.stop_requested);
    }
    for (_, wake) in &threads {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        unsafe { libc::write(wake.as_raw_fd(), (&raw const one).cast(), 8) };
    }
    let mut result = spawn_error.map_or(Ok(()), Err);
    // A handler that never returns: give up on its thread a little after the deadline.
    let stop_limit = options.shutdown_time_limit + Duration::from_secs(5);
    let deadline = Instant::now() + stop_limit;
    while Instant::now() < deadline && threads.iter().any(|(h, _)| !h.is_finished()) {
        thread::sleep(Duration::from_millis(20));
    }
    if threads.iter().any(|(h, _)| !h.is_finished()) {
        let stuck = threads.iter().filter(|(h, _)| !h.is_finished()).count();
        log::error!(
            "{stuck} worker thread(s) did not stop within {}s (a handler that never returns?); \
             giving up on them",
            stop_limit.as_secs()
        );
        // The stuck threads may still use the sockets and eventfds: never close them.
        std::mem::forget(threads);
        std::mem::forget(sockets);
        return Err(Error::Thread(format!(
            "{stuck} worker thread(s) did not stop within {}s",
            stop_limit.as_secs()
        )));
    }
    for (handle, _wake) in threads {
        let outcome = handle
            .join()
            .unwrap_or_else(|_| Err(Error::Thread("a worker thread panicked".into())));
        if let Err(e) = outcome {
            log::error!("{e}");
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    // The listening sockets close here; inherited ones stay open in the front end.
    drop(sockets);
    if result.is_ok() {
        log::info!("stopped");
    }
    result
}

/// Ticks a graceful stop lets connections in progress run: the shutdown time limit less two
/// seconds (at least one tick), so the worker closes them itself before the front end kills it.
fn stop_deadline_ticks(limit: Duration) -> u64 {
    (limit.saturating_sub(Duration::from_secs(2)).as_millis() / TICK.as_millis()).max(1) as u64
}

enum Greeting {
    Complete,
    Stop,
}

/// Reads the control channel until the route table and the cached keys have arrived (the
/// front end queues both before the worker starts), answering pings meanwhile. A worker that
/// served before it knew the routes would answer requests that belong to another pool.
fn await_greeting(fd: RawFd, own_pool: &str, routing: &SharedRouting) -> Result<Greeting, Error> {
    let deadline = Instant::now() + GREETING_LIMIT;
    let (mut routes, mut cached) = (false, false);
    let mut buf = vec![0u8; control::MAX_MESSAGE + 1];
    while !(routes && cached) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Startup(format!(
                "the front end sent no route table within {}s",
                GREETING_LIMIT.as_secs()
            )));
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        if unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) } <= 0 {
            continue;
        }
        // SAFETY: `buf` is live and writable for its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) {
                continue;
            }
            return Err(Error::Os {
                what: "reading the control channel",
                source: e,
            });
        }
        if n == 0 && control::hung_up(fd) {
            return Ok(Greeting::Stop);
        }
        match ToWorker::decode(&buf[..n as usize]) {
            Ok(ToWorker::Routes(table)) => {
                routing.set_routes(table, own_pool);
                routes = true;
            }
            Ok(ToWorker::Cached(keys)) => {
                routing.set_cached(keys);
                cached = true;
            }
            Ok(ToWorker::Ping(seq)) => {
                let pong = ToFrontend::Pong {
                    seq,
                    requests: 0,
                    rss_kib: control::current_rss_kib(),
                };
                let _ = control::send(fd, &pong.encode());
            }
            Ok(ToWorker::Stop) => return Ok(Greeting::Stop),
            Err(e) => log::warn!("ignoring a control message: {e}"),
        }
    }
    Ok(Greeting::Complete)
}

/// Blocks SIGTERM and SIGINT in this thread (and the threads it spawns) so they can be taken
/// with sigtimedwait instead of a handler.
fn block_stop_signals() -> Result<libc::sigset_t, Error> {
    // SAFETY: sigset_t is plain data, initialized by sigemptyset before use; pthread_sigmask
    // only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(Error::Os {
                what: "blocking SIGTERM/SIGINT",
                source: io::Error::from_raw_os_error(rc),
            });
        }
        Ok(set)
    }
}

/// Returns when a stop signal arrives, a stop is asked for on the control channel, or a worker
/// thread ends on its own (an error).
fn wait_for_stop(
    signals: &libc::sigset_t,
    threads: &[(thread::JoinHandle<Result<(), Error>>, OwnedFd)],
    stop_requested: &AtomicBool,
) {
    let timeout = libc::timespec {
        tv_sec: 0,
        tv_nsec: 250_000_000,
    };
    loop {
        // SAFETY: `signals` is an initialized sigset; no siginfo is requested.
        let signo = unsafe { libc::sigtimedwait(signals, std::ptr::null_mut(), &timeout) };
        if stop_requested.load(Ordering::SeqCst) {
            log::info!("stop requested by the front end: stopping gracefully");
            return;
        }
        if signo > 0 {
            log::info!("signal {signo} received: stopping gracefully");
            return;
        }
        if threads.iter().any(|(h, _)| h.is_finished()) {
            log::error!("a worker thread ended unexpectedly: stopping");
            return;
        }
    }
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain eventfd(2) call; the result is checked and owned immediately.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn new_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .setup_cqsize(CQ_ENTRIES)
        .build(RING_ENTRIES)
        .or_else(|e| {
            log::debug!("io_uring with DEFER_TASKRUN unavailable ({e}); using defaults");
            IoUring::builder()
                .setup_cqsize(CQ_ENTRIES)
                .build(RING_ENTRIES)
        })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Reading,
    Writing,
    /// Response sent and write side shut down; discarding input until the client's FIN.
    Lingering {
        until: u64,
    },
}

struct Conn {
    fd: OwnedFd,
    http: HttpConn,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    /// Bytes of `wbuf` already sent.
    sent: usize,
    phase: Phase,
    /// user_data of the operation in flight, if any.
    in_flight: Option<u64>,
    cancelled: bool,
    close_after_send: bool,
    /// How many more bytes the current request needs, when known.
    want: usize,
    last_active: u64,
    /// Tick request bytes last arrived or an answer was last written: what the idle timeout
    /// of a reading connection counts from. A TLS record that carries no request byte (an
    /// empty record, a KeyUpdate) is no activity, or a client could hold a connection
    /// forever at a few bytes a second.
    plain_at: u64,
    /// Tick the request head now arriving began (its header timeout runs from there).
    head_since: Option<u64>,
    /// Tick the response now being sent began.
    write_since: u64,
    /// Hand the connection back to the front end once `wbuf` is sent; `rbuf` starts at the
    /// first byte of the request it does not answer.
    hand_back: bool,
    /// The front end routed the next request here (a handoff marked `ROUTED`): serve it
    /// without routing it again.
    routed: bool,
    /// The front end's own connection carrying only this pool's requests
    /// (`handoff::DELIVERED`): every request on it is served, none handed back.
    delivered: bool,
    /// The host of the first request served on a connection given to this pool (normalized,
    /// empty for none): a later request naming another host is answered 421
    /// (`sluice_proto::ownership`).
    pinned: Option<String>,
    /// The connection's local address, read when a route is bound to one.
    local: Option<IpAddr>,
    /// Its peer and how it got here, for the access log.
    info: ConnInfo,
    /// The rest of a file body being sent: the file, the next offset, the bytes left.
    stream: Option<(Arc<std::fs::File>, u64, u64)>,
    /// After the response being sent (a 101), the connection goes to this function.
    upgrade: Option<Box<dyn FnOnce(crate::Upgraded) + Send>>,
    /// A TLS connection's record layer: `rbuf` and `wbuf` hold plaintext, its own buffers the
    /// ciphertext.
    tls: Option<Box<crate::tls::TlsConn>>,
}

/// Connection table with generation-tagged slots, so a stale completion never reaches a newer
/// connection in the same slot.
#[derive(Default)]
struct Slab {
    slots: Vec<(u32, Option<Conn>)>,
    free: Vec<u32>,
    len: usize,
}

impl Slab {
    fn insert(&mut self, conn: Conn) -> (u32, u32) {
        self.len += 1;
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            slot.0 = slot.0.wrapping_add(1) & 0xff_ffff;
            slot.1 = Some(conn);
            (index, slot.0)
        } else {
            self.slots.push((0, Some(conn)));
            ((self.slots.len() - 1) as u32, 0)
        }
    }

    fn get_mut(&mut self, index: u32, generation: u32) -> Option<&mut Conn> {
        match self.slots.get_mut(index as usize) {
            Some((g, Some(conn))) if *g == generation => Some(conn),
            _ => None,
        }
    }

    fn remove(&mut self, index: u32) -> Option<Conn> {
        let conn = self.slots.get_mut(index as usize)?.1.take()?;
        self.free.push(index);
        self.len -= 1;
        Some(conn)
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (u32, u32, &mut Conn)> {
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(|(i, (g, c))| Some((i as u32, *g, c.as_mut()?)))
    }
}

struct Worker<'s, H> {
    ring: IoUring,
    shared: &'s Shared<H>,
    conns: Slab,
    tick: u64,
    stop_tick: Option<u64>,
    /// Per pool socket: a multishot accept is armed / must be re-armed on the next tick.
    accept_armed: Vec<bool>,
    accept_retry: Vec<bool>,
    /// Leaked on purpose: the kernel may still write to it if the thread exits with the
    /// recvmsg in flight; it is allocated once per thread.
    handoff_buf: &'static mut RecvBuf,
    handoff_armed: bool,
    handoff_retry: bool,
    handoff_closed: bool,
    wake_fd: RawFd,
    wake_buf: &'static mut u64,
    tick_spec: Box<types::Timespec>,
    cqes: Vec<(u64, i32, u32)>,
    /// Thread 0 only: the control channel.
    control: Option<ControlChannel>,
    /// This thread's view of the routing state.
    routing: RoutingView,
    /// This thread's access-log entries not sent yet (None: the log is off).
    access: Option<access::Batch>,
    /// This thread's number (its `Shared::outcomes` cell).
    index: usize,
}

/// Thread 0's side of the control channel (see `control.rs`).
struct ControlChannel {
    fd: RawFd,
    /// Leaked on purpose, like the handoff buffer: a recv may be in flight when the thread
    /// exits. MAX_MESSAGE (256 KiB) long, allocated once per process (only thread 0 has one).
    buf: &'static mut [u8],
    armed: bool,
    /// EOF or an error: never re-armed.
    closed: bool,
    /// The request count in the last `pong` or `stats`.
    reported: u64,
    /// Replies to send once the current completion batch is processed.
    outbox: Vec<Outgoing>,
}

#[derive(Debug, Clone, Copy)]
enum Outgoing {
    Pong(u64),
    Stats,
}

impl<'s, H: Handler> Worker<'s, H> {
    fn new(shared: &'s Shared<H>, index: usize, wake_fd: RawFd) -> Result<Self, Error> {
        let ring = new_ring().map_err(Error::Ring)?;
        let control = shared
            .control
            .filter(|_| index == 0)
            .map(|fd| ControlChannel {
                fd,
                buf: Box::leak(vec![0; control::MAX_MESSAGE].into_boxed_slice()),
                armed: false,
                closed: false,
                reported: 0,
                outbox: Vec::new(),
            });
        Ok(Worker {
            ring,
            shared,
            conns: Slab::default(),
            tick: 0,
            stop_tick: None,
            accept_armed: vec![false; shared.pools.len()],
            accept_retry: vec![false; shared.pools.len()],
            handoff_buf: Box::leak(RecvBuf::new()),
            handoff_armed: false,
            handoff_retry: false,
            handoff_closed: false,
            wake_fd,
            wake_buf: Box::leak(Box::new(0)),
            tick_spec: Box::new(types::Timespec::from(TICK)),
            cqes: Vec::with_capacity(CQ_ENTRIES as usize),
            control,
            routing: RoutingView::new(&shared.routing),
            access: access::Batch::new(shared.control, shared.access_log),
            index,
        })
    }

    fn run(&mut self) -> Result<(), Error> {
        for index in 0..self.shared.pools.len() {
            self.arm_accept(index)?;
        }
        self.arm_handoff()?;
        self.arm_control()?;
        let wake = opcode::Read::new(types::Fd(self.wake_fd), (&raw mut *self.wake_buf).cast(), 8)
            .build()
            .user_data(user_data(OP_WAKE, 0, 0));
        self.push(wake)?;
        self.arm_tick()?;

        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                    ) => {}
                Err(e) => return Err(Error::Ring(e)),
            }
            self.cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            let cqes = std::mem::take(&mut self.cqes);
            for &(ud, res, flags) in &cqes {
                self.on_completion(ud, res, flags)?;
            }
            self.cqes = cqes;
            self.cqes.clear();
            self.flush_control();

            if let Some(stop) = self.stop_tick {
                let listeners_idle = !self.accept_armed.contains(&true) && !self.handoff_armed;
                if self.conns.len == 0 && listeners_idle {
                    if let Some(batch) = self.access.as_mut() {
                        batch.flush();
                    }
                    return Ok(());
                }
                if self.tick >= stop + self.shared.stop_deadline_ticks + STOP_ABANDON_TICKS {
                    log::warn!(
                        "{} connection(s) did not finish cancelling; abandoning them",
                        self.conns.len
                    );
                    // Their buffers may still be referenced by the kernel: never free them.
                    std::mem::forget(std::mem::take(&mut self.conns));
                    return Ok(());
                }
            }
        }
    }

    /// Queues an entry, flushing the submission queue when it is full.
    fn push(&mut self, entry: squeue::Entry) -> Result<(), Error> {
        loop {
            // SAFETY: every entry built in this module points at memory that stays valid until
            // its completion: connection buffers are not touched or freed while an operation
            // is in flight (`Conn::in_flight`), and the handoff/wake buffers are leaked.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit().map_err(Error::Ring)?;
        }
    }

    fn arm_accept(&mut self, index: usize) -> Result<(), Error> {
        let fd = self.shared.pools[index];
        let entry = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(OP_ACCEPT, index as u32, 0));
        self.push(entry)?;
        self.accept_armed[index] = true;
        self.accept_retry[index] = false;
        Ok(())
    }

    fn arm_handoff(&mut self) -> Result<(), Error> {
        let Some(fd) = self.shared.handoff else {
            return Ok(());
        };
        if self.handoff_closed {
            return Ok(());
        }
        let msg = self.handoff_buf.prepare();
        let entry = opcode::RecvMsg::new(types::Fd(fd), msg)
            .flags(libc::MSG_CMSG_CLOEXEC as u32)
            .build()
            .user_data(user_data(OP_HANDOFF, 0, 0));
        self.push(entry)?;
        self.handoff_armed = true;
        self.handoff_retry = false;
        Ok(())
    }

    fn arm_control(&mut self) -> Result<(), Error> {
        let Some(ctl) = self.control.as_mut() else {
            return Ok(());
        };
        if ctl.closed || ctl.armed {
            return Ok(());
        }
        // MSG_TRUNC: the result is the datagram's real length, so a longer one is detected.
        let entry = opcode::Recv::new(
            types::Fd(ctl.fd),
            ctl.buf.as_mut_ptr(),
            ctl.buf.len() as u32,
        )
        .flags(libc::MSG_TRUNC)
        .build()
        .user_data(user_data(OP_CONTROL, 0, 0));
        ctl.armed = true;
        self.push(entry)
    }

    /// A control message arrived (or the channel ended).
    fn on_control(&mut self, res: i32) -> Result<(), Error> {
        let Some(ctl) = self.control.as_mut() else {
            return Ok(());
        };
        ctl.armed = false;
        if res < 0 {
            if matches!(-res, libc::EINTR | libc::EAGAIN) {
                return self.arm_control();
            }
            log::warn!(
                "control socket: {}; stopping gracefully",
                io::Error::from_raw_os_error(-res)
            );
            ctl.closed = true;
            return self.stop_from_control();
        }
        let len = res as usize;
        if len == 0 && control::hung_up(ctl.fd) {
            log::info!("the front end closed the control socket: stopping gracefully");
            ctl.closed = true;
            return self.stop_from_control();
        }
        let command = match ctl.buf.get(..len) {
            Some(msg) => ToWorker::decode(msg),
            None => Err(sluice_proto::control::ControlError::TooLong),
        };
        match command {
            Ok(ToWorker::Ping(seq)) => {
                ctl.outbox.push(Outgoing::Pong(seq));
                self.arm_control()
            }
            Ok(ToWorker::Stop) => {
                log::info!("stop requested on the control channel");
                self.arm_control()?;
                self.stop_from_control()
            }
            Ok(ToWorker::Routes(routes)) => {
                let own = self.shared.pool.as_deref().unwrap_or("");
                self.shared.routing.set_routes(routes, own);
                self.arm_control()
            }
            Ok(ToWorker::Cached(keys)) => {
                self.shared.routing.set_cached(keys);
                self.arm_control()
            }
            Err(e) => {
                log::warn!("ignoring a control message: {e}");
                self.arm_control()
            }
        }
    }

    /// Stops this thread at once and asks the main thread to stop the others.
    fn stop_from_control(&mut self) -> Result<(), Error> {
        self.shared.stop_requested.store(true, Ordering::SeqCst);
        self.begin_stop()
    }

    /// Sends the queued control replies (after a completion batch).
    fn flush_control(&mut self) {
        let Some(ctl) = self.control.as_mut() else {
            return;
        };
        if ctl.outbox.is_empty() {
            return;
        }
        let requests = self.shared.requests.load(Ordering::Relaxed);
        for out in ctl.outbox.drain(..) {
            let msg = match out {
                Outgoing::Pong(seq) => ToFrontend::Pong {
                    seq,
                    requests,
                    rss_kib: control::current_rss_kib(),
                },
                Outgoing::Stats => ToFrontend::Stats {
                    requests,
                    outcomes: self.shared.outcomes.iter().map(Cells::read).sum(),
                },
            };
            ctl.reported = requests;
            if ctl.closed {
                continue;
            }
            if let Err(e) = control::send(ctl.fd, &msg.encode()) {
                log::debug!("control message {msg:?} dropped: {e}");
            }
        }
    }

    fn arm_tick(&mut self) -> Result<(), Error> {
        let entry = opcode::Timeout::new(&raw const *self.tick_spec)
            .flags(types::TimeoutFlags::MULTISHOT)
            .build()
            .user_data(user_data(OP_TICK, 0, 0));
        self.push(entry)
    }

    fn on_completion(&mut self, ud: u64, res: i32, flags: u32) -> Result<(), Error> {
        let (kind, index, generation) = split_user_data(ud);
        match kind {
            OP_ACCEPT => self.on_accept(index as usize, res, flags),
            OP_HANDOFF => self.on_handoff(res),
            OP_WAKE => self.begin_stop(),
            OP_TICK => {
                self.tick += 1;
                if !cqueue::more(flags) {
                    self.arm_tick()?;
                }
                self.on_tick()
            }
            OP_RECV => self.on_recv(index, generation, res),
            OP_SEND => self.on_send(index, generation, res),
            OP_CANCEL => Ok(()),
            OP_CONTROL => self.on_control(res),
            OP_FILE => self.on_file_read(index, generation, res),
            _ => {
                log::error!("unexpected completion {ud:#x}");
                Ok(())
            }
        }
    }

    fn on_accept(&mut self, index: usize, res: i32, flags: u32) -> Result<(), Error> {
        if !cqueue::more(flags) {
            self.accept_armed[index] = false;
            if self.stop_tick.is_none() {
                if res < 0 {
                    // e.g. EMFILE: try again on the next tick rather than spin.
                    log::warn!("accept: {}", io::Error::from_raw_os_error(-res));
                    self.accept_retry[index] = true;
                } else {
                    self.arm_accept(index)?;
                }
            }
        }
        if res < 0 {
            return Ok(());
        }
        // SAFETY: a non-negative accept result is a new descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(res) };
        self.add_conn(
            fd,
            Vec::with_capacity(READ_CHUNK),
            false,
            Arrival::Kernel,
            None,
            None,
        )
    }

    fn on_handoff(&mut self, res: i32) -> Result<(), Error> {
        self.handoff_armed = false;
        if res < 0 {
            if res != -libc::ECANCELED {
                log::warn!("handoff recvmsg: {}", io::Error::from_raw_os_error(-res));
                self.handoff_retry = true;
            }
            return Ok(());
        }
        // Owned at once: the buffer is re-armed before the connection is served.
        let mut delivered = None;
        let received = self.handoff_buf.complete(res as usize).map(|h| {
            // A TLS connection's bytes start with its session.
            let (tls, plain) = if h.flags & handoff::TLS != 0 {
                match crate::tls::TlsConn::from_handoff(h.bytes) {
                    Ok((tls, plain)) => (Some(Box::new(tls)), plain),
                    Err(e) => {
                        log::warn!("a TLS connection handed over without a usable session: {e}");
                        return None;
                    }
                }
            } else if h.flags & handoff::DELIVERED != 0 {
                // The front end's own connection, carrying only this pool's requests; its
                // payload names the client.
                match sluice_proto::proxy::parse(h.bytes) {
                    Some((addresses, n)) => {
                        delivered = Some(addresses);
                        (None, h.bytes[n..].to_vec())
                    }
                    None => {
                        log::warn!("a delivered connection without the client's addresses");
                        return None;
                    }
                }
            } else {
                (None, h.bytes.to_vec())
            };
            let mut bytes = Vec::with_capacity(plain.len().max(READ_CHUNK));
            bytes.extend_from_slice(&plain);
            Some((
                h.fd,
                h.flags & handoff::ROUTED != 0,
                handoff::arrival(h.flags),
                bytes,
                tls,
            ))
        });
        let closed = matches!(received, Err(HandoffError::Empty))
            && self.shared.handoff.is_some_and(handoff::hung_up);
        if self.stop_tick.is_none() {
            if closed {
                log::warn!("the handoff channel was closed by the front end");
                self.handoff_closed = true;
            } else {
                self.arm_handoff()?;
            }
        }
        match received {
            Ok(Some((fd, routed, arrival, bytes, tls))) => {
                log::debug!("handed-off connection with {} bytes", bytes.len());
                self.add_conn(fd, bytes, routed, arrival, tls, delivered)
            }
            Ok(None) => Ok(()),
            Err(_) if closed => Ok(()),
            Err(e) => {
                log::warn!("{e}");
                Ok(())
            }
        }
    }

    /// Starts serving a connection whose input so far is `rbuf`.
    fn add_conn(
        &mut self,
        fd: OwnedFd,
        rbuf: Vec<u8>,
        routed: bool,
        arrival: Arrival,
        tls: Option<Box<crate::tls::TlsConn>>,
        delivered: Option<sluice_proto::proxy::Addresses>,
    ) -> Result<(), Error> {
        let info = ConnInfo {
            peer: match delivered {
                Some(a) => Some(a.client),
                None => self
                    .access
                    .as_ref()
                    .and_then(|_| sluice_proto::sockaddr::peer(fd.as_raw_fd())),
            },
            arrival,
        };
        if let Err(e) = setsockopt_int(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_NODELAY, 1) {
            log::debug!("TCP_NODELAY: {e}");
        }
        let has_input = !rbuf.is_empty() || tls.as_ref().is_some_and(|t| !t.input.is_empty());
        let conn = Conn {
            fd,
            http: HttpConn::new(self.shared.limits),
            rbuf,
            wbuf: Vec::new(),
            sent: 0,
            phase: Phase::Reading,
            in_flight: None,
            cancelled: false,
            close_after_send: false,
            want: 0,
            last_active: self.tick,
            plain_at: self.tick,
            head_since: None,
            write_since: self.tick,
            hand_back: false,
            routed,
            delivered: delivered.is_some(),
            pinned: None,
            local: delivered.map(|a| sluice_proto::site::local_address(a.local.ip())),
            info,
            stream: None,
            upgrade: None,
            tls,
        };
        let (index, generation) = self.conns.insert(conn);
        if has_input {
            // A partly received record the session carried may already be complete.
            if let Some(conn) = self.conns.get_mut(index, generation) {
                if let Some(tls) = conn.tls.as_mut() {
                    if tls.open(&mut conn.rbuf) != crate::tls::Input::Open {
                        conn.close_after_send = true;
                    }
                }
            }
            self.process(index, generation)
        } else {
            self.submit_recv(index, generation)
        }
    }

    fn on_recv(&mut self, index: u32, generation: u32, res: i32) -> Result<(), Error> {
        let tick = self.tick;
        let Some(conn) = self.conns.get_mut(index, generation) else {
            log::error!("recv completion for a missing connection");
            return Ok(());
        };
        conn.in_flight = None;
        conn.cancelled = false;
        if let Phase::Lingering { until } = conn.phase {
            if res > 0 && tick < until {
                conn.rbuf.clear();
                if let Some(tls) = conn.tls.as_mut() {
                    tls.input.clear();
                }
                return self.submit_recv(index, generation);
            }
            self.close(index);
            return Ok(());
        }
        if res <= 0 {
            if res < 0 && !matches!(-res, libc::ECANCELED | libc::ECONNRESET | libc::EPIPE) {
                log::debug!("recv: {}", io::Error::from_raw_os_error(-res));
            }
            self.close(index);
            return Ok(());
        }
        let into = match conn.tls.as_mut() {
            Some(tls) => &mut tls.input,
            None => &mut conn.rbuf,
        };
        let len = into.len() + res as usize;
        // The kernel never reports more than the spare capacity it was given.
        debug_assert!(len <= into.capacity());
        // SAFETY: the kernel wrote `res` initialized bytes into the spare capacity starting at
        // the old length, which is what submit_recv handed it.
        unsafe { into.set_len(len.min(into.capacity())) };
        conn.last_active = tick;
        let plain_before = conn.rbuf.len();
        if let Some(tls) = conn.tls.as_mut() {
            if tls.open(&mut conn.rbuf) != crate::tls::Input::Open {
                // Whatever was complete is still served; then our close_notify and close.
                conn.close_after_send = true;
            }
        }
        if conn.tls.is_none() || conn.rbuf.len() > plain_before {
            conn.plain_at = tick;
        }
        self.process(index, generation)
    }

    /// Runs the HTTP state machine over the buffered input and starts the next operation.
    fn process(&mut self, index: u32, generation: u32) -> Result<(), Error> {
        let closing = self.stop_tick.is_some();
        let shared = self.shared;
        let Some(conn) = self.conns.get_mut(index, generation) else {
            return Ok(());
        };
        // Without a handoff socket (standalone) there is nobody to hand back to.
        let routing = shared
            .handoff
            .map(|_| self.routing.current(&shared.routing))
            .filter(|routing| routing.is_active());
        if conn.local.is_none() && routing.is_some_and(Routing::needs_local_address) {
            conn.local = local_address_of(conn.fd.as_raw_fd());
        }
        let mut dispatch = Dispatcher {
            shared,
            routing,
            routed: &mut conn.routed,
            local: conn.local,
            access: self.access.as_mut(),
            info: conn.info,
            fd: conn.fd.as_raw_fd(),
            outcomes: shared.outcomes.get(self.index),
            sni: conn.tls.as_ref().map(|t| t.sni.as_str()),
            delivered: conn.delivered,
            pinned: &mut conn.pinned,
        };
        let before = conn.http.responses();
        match conn
            .http
            .process(&mut conn.rbuf, &mut conn.wbuf, closing, &mut dispatch)
        {
            Outcome::NeedMore { hint } => conn.want = hint,
            Outcome::Close => conn.close_after_send = true,
            Outcome::HandBack => conn.hand_back = true,
        }
        match conn.http.take_tail() {
            Some(Tail::File { file, len }) => conn.stream = Some((file, 0, len)),
            // An upgraded connection is handed to blocking code as a plain socket, which a
            // TLS session cannot be: it closes after the 101 instead.
            Some(Tail::Upgrade(_)) if conn.tls.is_some() => {
                log::warn!("a protocol upgrade over TLS is not served; closing the connection");
                conn.close_after_send = true;
            }
            Some(Tail::Upgrade(then)) => conn.upgrade = Some(then),
            None => {}
        }
        conn.head_since = if conn.http.in_head(&conn.rbuf) {
            conn.head_since.or(Some(self.tick))
        } else {
            None
        };
        let written = conn.http.responses() - before;
        if written > 0 {
            shared.requests.fetch_add(written, Ordering::Relaxed);
            conn.plain_at = self.tick;
        }
        let sealed = conn.tls.as_ref().is_some_and(|t| !t.out.is_empty());
        let notify = conn.tls.is_some() && conn.close_after_send && !conn.hand_back;
        if !conn.wbuf.is_empty() || sealed || notify {
            self.submit_send(index, generation)
        } else if conn.hand_back {
            self.hand_back(index, generation)
        } else if conn.close_after_send {
            self.start_linger(index, generation)
        } else {
            self.submit_recv(index, generation)
        }
    }

    /// Sends the connection back to the front end with its unconsumed input, then closes this
    /// process's fd (a plain close: the front end now owns the connection). If that fails the
    /// request is answered `503` with `Connection: close`.
    fn hand_back(&mut self, index: u32, generation: u32) -> Result<(), Error> {
        let Some(conn) = self.conns.get_mut(index, generation) else {
            return Ok(());
        };
        conn.hand_back = false;
        let sent = match (self.shared.handoff, conn.tls.as_ref()) {
            (Some(sock), Some(tls)) => match tls.hand_back_payload(&conn.rbuf) {
                Ok(payload) => handoff::send(sock, conn.fd.as_raw_fd(), handoff::TLS, &payload),
                Err(e) => Err(io::Error::other(e)),
            },
            (Some(sock), None) => handoff::send(sock, conn.fd.as_raw_fd(), 0, &conn.rbuf),
            (None, _) => Err(io::Error::from_raw_os_error(libc::ENOTCONN)),
        };
        match sent {
            Ok(()) => {
                log::debug!("handed a connection back with {} byte(s)", conn.rbuf.len());
                self.close(index);
                Ok(())
            }
            Err(e) => {
                log::warn!(
                    "handing a connection back to the front end failed ({e}); answering 503"
                );
                let bytes = http::write_error(
                    &mut conn.wbuf,
                    503,
                    "the request could not be passed to its application",
                );
                if let Some(batch) = self.access.as_mut() {
                    access::refused(batch, &conn.rbuf, 503, bytes, conn.info);
                }
                conn.rbuf.clear();
                conn.close_after_send = true;
                self.shared.requests.fetch_add(1, Ordering::Relaxed);
                self.submit_send(index, generation)
            }
        }
    }

    fn submit_recv(&mut self, index: u32, generation: u32) -> Result<(), Error> {
        let Some(conn) = self.conns.get_mut(index, generation) else {
            return Ok(());
        };
        if conn.rbuf.is_empty() && conn.rbuf.capacity() > 16 * READ_CHUNK {
            conn.rbuf = Vec::with_capacity(READ_CHUNK);
        }
        let want = conn.want.clamp(READ_CHUNK, MAX_READ_CHUNK);
        let into = match conn.tls.as_mut() {
            Some(tls) => &mut tls.input,
            None => &mut conn.rbuf,
        };
        if into.capacity() - into.len() < READ_CHUNK.min(want) {
            into.reserve(want);
        }
        let spare = into.spare_capacity_mut();
        let len = spare.len().min(u32::MAX as usize) as u32;
        let ud = user_data(OP_RECV, index, generation);
        let entry = opcode::Recv::new(
            types::Fd(conn.fd.as_raw_fd()),
            spare.as_mut_ptr().cast(),
            len,
        )
        .build()
        .user_data(ud);
        conn.in_flight = Some(ud);
        if conn.phase == Phase::Writing {
            conn.phase = Phase::Reading;
        }
        self.push(entry)
    }

    fn submit_send(&mut self, index: u32, generation: u32) -> Result<(), Error> {
        let Some(conn) = self.conns.get_mut(index, generation) else {
            return Ok(());
        };
        if conn.sent == 0 {
            conn.write_since = self.tick;
        }
        let pending = match conn.tls.as_mut() {
            Some(tls) => {
                // Everything written so far is sealed at once; the plaintext counts as sent
                // when its records are.
                if tls.out_sent == tls.out.len() {
                    tls.out.clear();
                    tls.out_sent = 0;
                }
                let last = conn.close_after_send
                    && !conn.hand_back
                    && conn.stream.is_none()
                    && conn.upgrade.is_none();
                if conn.sent < conn.wbuf.len() {
                    tls.seal(&conn.wbuf[conn.sent..], last);
                    conn.sent = conn.wbuf.len();
                } else if last {
                    tls.close_notify();
                }
                &tls.out[tls.out_sent..]
            }
            None => &conn.wbuf[conn.sent..],
        };
        let len = pending.len().min(u32::MAX as usize) as u32;
        let ud = user_data(OP_SEND, index, generation);
        let entry = opcode::Send::new(types::Fd(conn.fd.as_raw_fd()), pending.as_ptr(), len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud);
        conn.in_flight = Some(ud);
        conn.phase = Phase::Writing;
        self.push(entry)
    }

    fn on_send(&mut self, index: u32, generation: u32, res: i32) -> Result<(), Error> {
        let tick = self.tick;
        let Some(conn) = self.conns.get_mut(index, generation) else {
            log::error!("send completion for a missing connection");
            return Ok(());
        };
        conn.in_flight = None;
        conn.cancelled = false;
        if res <= 0 {
            if res < 0 && !matches!(-res, libc::ECANCELED | libc::ECONNRESET | libc::EPIPE) {
                log::debug!("send: {}", io::Error::from_raw_os_error(-res));
            }
            self.close(index);
            return Ok(());
        }
        conn.last_active = tick;
        match conn.tls.as_mut() {
            Some(tls) => {
                tls.out_sent += res as usize;
                if tls.out_sent < tls.out.len() {
                    return self.submit_send(index, generation);
                }
                tls.out.clear();
                tls.out_sent = 0;
            }
            None => {
                conn.sent += res as usize;
                if conn.sent < conn.wbuf.len() {
                    return self.submit_send(index, generation);
                }
            }
        }
        conn.sent = 0;
        if conn.stream.is_some() {
            conn.wbuf.clear();
            return self.submit_file_read(index, generation);
        }
        if conn.upgrade.is_some() {
            self.take_over(index);
            return Ok(());
        }
        if !conn.wbuf.is_empty() {
            // An answer went out: the idle time starts now (a TLS control record alone,
            // a KeyUpdate's answer, does not count).
            conn.plain_at = tick;
        }
        if conn.wbuf.capacity() > 16 * READ_CHUNK {
            conn.wbuf = Vec::new();
        } else {
            conn.wbuf.clear();
        }
        // While stopping, a connection whose response was not marked `Connection: close`
        // (it was built before the stop) stays open for one more request: that one is
        // answered with `Connection: close`; the sweep closes it after the grace time.
        if conn.hand_back {
            self.hand_back(index, generation)
        } else if conn.close_after_send {
            self.start_linger(index, generation)
        } else {
            self.submit_recv(index, generation)
        }
    }

    /// Lingering close: after the last response, read (and discard) until the client closes or
    /// the linger time ends, then close. The write side is deliberately *not* shut down first:
    /// whichever side sends the first FIN keeps the TIME_WAIT, and a server-side TIME_WAIT
    /// defeats the kernel steering of the next SYN from that client port (DESIGN.md). Every
    /// response carries `Content-Length` and `Connection: close`, so the client knows it is
    /// complete and closes first.
    fn start_linger(&mut self, index: u32, generation: u32) -> Result<(), Error> {
        let until = self.tick + LINGER_TICKS;
        let Some(conn) = self.conns.get_mut(index, generation) else {
            return Ok(());
        };
        conn.phase = Phase::Lingering { until };
        conn.rbuf.clear();
        if let Some(tls) = conn.tls.as_mut() {
            tls.input.clear();
        }
        conn.want = 0;
        self.submit_recv(index, generation)
    }

    /// Reads the next chunk of the file body being sent into the write buffer.
    fn submit_file_read(&mut self, index: u32, generation: u32) -> Result<(), Error> {
        let Some(conn) = self.conns.get_mut(index, generation) else {
            return Ok(());
        };
        let Some((file, offset, left)) = conn.stream.as_ref() else {
            return Ok(());
        };
        let want = (*left).min(FILE_CHUNK as u64) as usize;
        conn.wbuf.reserve(want);
        let spare = conn.wbuf.spare_capacity_mut();
        let ud = user_data(OP_FILE, index, generation);
        let entry = opcode::Read::new(
            types::Fd(file.as_raw_fd()),
            spare.as_mut_ptr().cast(),
            want as u32,
        )
        .offset(*offset)
        .build()
        .user_data(ud);
        conn.in_flight = Some(ud);
        conn.phase = Phase::Writing;
        self.push(entry)
    }

    fn on_file_read(&mut self, index: u32, generation: u32, res: i32) -> Result<(), Error> {
        let Some(conn) = self.conns.get_mut(index, generation) else {
            return Ok(());
        };
        conn.in_flight = None;
        conn.cancelled = false;
        let Some((file, offset, left)) = conn.stream.take() else {
            return Ok(());
        };
        if res <= 0 {
            // The file shrank or failed under us: the framing promised more bytes, so the
            // only honest end is to cut the connection.
            log::warn!(
                "a response file ended {left} byte(s) early ({}); closing the connection",
                if res < 0 {
                    io::Error::from_raw_os_error(-res).to_string()
                } else {
                    "end of file".into()
                }
            );
            self.close(index);
            return Ok(());
        }
        let n = (res as usize).min(conn.wbuf.capacity());
        // SAFETY: the kernel wrote `n` initialized bytes at the start of the spare capacity
        // (the buffer was empty) that submit_file_read handed it.
        unsafe { conn.wbuf.set_len(n) };
        let left = left - n as u64;
        if left > 0 {
            conn.stream = Some((file, offset + n as u64, left));
        }
        self.submit_send(index, generation)
    }

    /// Gives the connection (after its 101) to the handler's upgrade function, on a thread of
    /// its own with blocking I/O.
    fn take_over(&mut self, index: u32) {
        let Some(mut conn) = self.conns.remove(index) else {
            return;
        };
        let Some(then) = conn.upgrade.take() else {
            return;
        };
        let stream = std::net::TcpStream::from(conn.fd);
        if let Err(e) = stream.set_nonblocking(false) {
            log::warn!("an upgraded connection: {e}");
            return;
        }
        let upgraded = crate::Upgraded {
            stream,
            read_ahead: std::mem::take(&mut conn.rbuf),
            offset: 0,
        };
        let spawned = thread::Builder::new()
            .name("sluice-upgraded".into())
            .spawn(move || {
                if panic::catch_unwind(AssertUnwindSafe(|| then(upgraded))).is_err() {
                    log::error!("an upgraded connection's handler panicked");
                }
            });
        if let Err(e) = spawned {
            log::warn!("no thread for an upgraded connection: {e}");
        }
    }

    fn close(&mut self, index: u32) {
        // Dropping the connection closes its socket.
        self.conns.remove(index);
    }

    fn cancel(&mut self, ud: u64) -> Result<(), Error> {
        let entry = opcode::AsyncCancel::new(ud)
            .build()
            .user_data(user_data(OP_CANCEL, 0, 0));
        self.push(entry)
    }

    fn begin_stop(&mut self) -> Result<(), Error> {
        if self.stop_tick.is_some() {
            return Ok(());
        }
        self.stop_tick = Some(self.tick);
        log::debug!("stopping: {} open connection(s)", self.conns.len);
        for index in 0..self.accept_armed.len() {
            if self.accept_armed[index] {
                self.cancel(user_data(OP_ACCEPT, index as u32, 0))?;
            }
        }
        if self.handoff_armed {
            self.cancel(user_data(OP_HANDOFF, 0, 0))?;
        }
        self.sweep()
    }

    fn on_tick(&mut self) -> Result<(), Error> {
        if let Some(batch) = self.access.as_mut() {
            batch.flush();
        }
        if self.tick.is_multiple_of(STATS_TICKS)
            && let Some(ctl) = self.control.as_mut()
            && self.shared.requests.load(Ordering::Relaxed) != ctl.reported
        {
            ctl.outbox.push(Outgoing::Stats);
        }
        if self.stop_tick.is_none() {
            for index in 0..self.accept_retry.len() {
                if self.accept_retry[index] {
                    self.arm_accept(index)?;
                }
            }
            if self.handoff_retry {
                self.arm_handoff()?;
            }
        }
        self.sweep()
    }

    /// Cancels the operations of connections that are past their time: idle too long,
    /// lingering too long, idle during a stop, or anything after the stop deadline.
    fn sweep(&mut self) -> Result<(), Error> {
        let tick = self.tick;
        let idle_ticks = self.shared.idle_ticks;
        let header_ticks = self.shared.header_ticks;
        let grace_over = self
            .stop_tick
            .is_some_and(|stop| tick >= stop + STOP_GRACE_TICKS);
        let deadline = self.shared.stop_deadline_ticks;
        let cut_all = self.stop_tick.is_some_and(|stop| tick >= stop + deadline);
        let mut to_cancel = Vec::new();
        for (_, _, conn) in self.conns.iter_mut() {
            let Some(ud) = conn.in_flight else { continue };
            if conn.cancelled {
                continue;
            }
            let expired = match conn.phase {
                Phase::Lingering { until } => tick >= until,
                Phase::Reading => {
                    tick.saturating_sub(conn.plain_at) >= idle_ticks
                        || conn
                            .head_since
                            .is_some_and(|t| tick.saturating_sub(t) >= header_ticks)
                        || (grace_over && conn.http.is_idle(&conn.rbuf))
                }
                // A client must take the response at min_send_rate (plus two seconds); without
                // a rate, only the idle timeout applies.
                Phase::Writing => match self.shared.min_send_rate {
                    0 => tick.saturating_sub(conn.last_active) >= idle_ticks,
                    rate => {
                        tick.saturating_sub(conn.write_since)
                            >= (conn.wbuf.len() as u64 / rate + 2) * TICKS_PER_SECOND
                    }
                },
            };
            if expired || cut_all {
                conn.cancelled = true;
                to_cancel.push(ud);
            }
        }
        for ud in to_cancel {
            self.cancel(ud)?;
        }
        Ok(())
    }
}

/// Answers a connection's requests: hands foreign ones back (when routing is active), calls
/// the handler for the others and offers its responses to the front end's cache.
struct Dispatcher<'a, H> {
    shared: &'a Shared<H>,
    /// Some when requests may be handed back (a handoff socket and a route table).
    routing: Option<&'a Routing>,
    /// The next request was routed here by the front end: serve it as it is.
    routed: &'a mut bool,
    /// The connection's local address (for routes bound to one).
    local: Option<IpAddr>,
    /// This thread's access-log batch, when the log is on.
    access: Option<&'a mut access::Batch>,
    info: ConnInfo,
    /// The connection (for `Context::peer`).
    fd: RawFd,
    /// This thread's counts of answers.
    outcomes: Option<&'a Cells>,
    /// A TLS connection's SNI name: a request for another host goes back to the front end,
    /// which answers 421 (`sluice_proto::host::agrees_with_sni`).
    sni: Option<&'a str>,
    /// The connection carries only requests the front end routed here.
    delivered: bool,
    /// The host the connection serves (`Conn::pinned`).
    pinned: &'a mut Option<String>,
}

impl<H: Handler> Dispatcher<'_, H> {
    fn context(&self) -> Context<'_> {
        Context::new(
            self.shared.pool.as_deref(),
            self.shared.pid,
            self.fd,
            self.info.arrival,
            self.info.peer,
        )
    }

    fn log_answer(&mut self, req: &Request<'_>, resp: &Response, started: Instant) {
        if let Some(cells) = self.outcomes {
            cells.record(resp.status(), started.elapsed().as_micros() as u64);
        }
        if let Some(batch) = self.access.as_deref_mut() {
            let bytes = http::body_bytes_sent(resp, req.method() == "HEAD");
            access::answered(batch, req, resp.status(), bytes, started, self.info);
        }
    }
}

impl<H: Handler> Dispatch for Dispatcher<'_, H> {
    fn misdirected(&mut self, req: &Request<'_>) -> bool {
        // A delivered connection carries what the front end routed; a TLS session's host
        // is its SNI name, which the hand-back path checks; a standalone worker has no table.
        if self.delivered || self.sni.is_some() || self.routing.is_none() {
            return false;
        }
        let host = sluice_proto::cache::key_host(req.head());
        match self.pinned.as_deref() {
            None => {
                *self.pinned = Some(host.into_owned());
                false
            }
            Some(pinned) if pinned == host => false,
            Some(pinned) => {
                log::debug!("421 for a request for {host:?} on a connection for {pinned:?}");
                true
            }
        }
    }

    fn hand_back(&mut self, req: &Request<'_>) -> bool {
        if self.delivered {
            return false;
        }
        if std::mem::take(self.routed) {
            return false;
        }
        let Some(routing) = self.routing else {
            return false;
        };
        if let Some(sni) = self.sni {
            let host = sluice_proto::cache::key_host(req.head());
            if !sluice_proto::host::agrees_with_sni(&host, sni) {
                log::debug!("handing back a request for {host} on a session made for {sni}");
                return true;
            }
        }
        match routing.decide(req, self.local, self.sni.unwrap_or("")) {
            None => false,
            Some(why) => {
                log::debug!("handing back {} {}: {why}", req.method(), req.target());
                true
            }
        }
    }

    fn respond(&mut self, req: &Request<'_>) -> Response {
        let started = Instant::now();
        let resp = call_handler(&self.shared.handler, req, &self.context());
        self.shared.publisher.offer(req, &resp);
        self.log_answer(req, &resp, started);
        resp
    }

    fn stream_body(&mut self, req: &Request<'_>) -> Option<Box<dyn crate::BodySink>> {
        let ctx = self.context();
        let handler = &self.shared.handler;
        panic::catch_unwind(AssertUnwindSafe(|| handler.stream_body(req, &ctx))).unwrap_or_else(
            |_| {
                log::error!("handler panicked on {} {}", req.method(), req.target());
                None
            },
        )
    }

    fn finish(&mut self, sink: Box<dyn crate::BodySink>, req: &Request<'_>) -> Response {
        let started = Instant::now();
        let resp =
            panic::catch_unwind(AssertUnwindSafe(|| sink.finish(req))).unwrap_or_else(|_| {
                log::error!("body sink panicked on {} {}", req.method(), req.target());
                Response::text(500, "internal server error\n").header("connection", "close")
            });
        self.log_answer(req, &resp, started);
        resp
    }

    fn refused(&mut self, input: &[u8], status: u16, bytes: u64) {
        if let Some(cells) = self.outcomes {
            cells.record(status, 0);
        }
        if let Some(batch) = self.access.as_deref_mut() {
            access::refused(batch, input, status, bytes, self.info);
        }
    }
}

/// Calls the handler; a panic becomes a 500 that closes the connection.
fn call_handler<H: Handler>(handler: &H, req: &Request<'_>, ctx: &Context<'_>) -> Response {
    panic::catch_unwind(AssertUnwindSafe(|| handler.handle(req, ctx))).unwrap_or_else(|_| {
        log::error!("handler panicked on {} {}", req.method(), req.target());
        Response::text(500, "internal server error\n").header("connection", "close")
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Instant;

    use super::*;

    fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair(2) writes two fds into the live array.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        // SAFETY: both fds are new and owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn send(fd: &OwnedFd, msg: &str) {
        control::send(fd.as_raw_fd(), msg.as_bytes()).unwrap();
    }

    /// What the front end queues before it starts a worker.
    fn greet(fd: &OwnedFd) {
        send(fd, "routes\n");
        send(fd, "cached\n");
    }

    /// The next message, or None after `timeout`.
    fn recv(fd: &OwnedFd, timeout: Duration) -> Option<String> {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
        if rc <= 0 {
            return None;
        }
        let mut buf = [0u8; 512];
        // SAFETY: `buf` is live and writable for its length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        (n > 0).then(|| String::from_utf8_lossy(&buf[..n as usize]).into_owned())
    }

    /// The next message that is not `stats`.
    fn recv_reply(fd: &OwnedFd) -> String {
        loop {
            let msg = recv(fd, Duration::from_secs(5)).expect("a reply within 5 s");
            if !msg.starts_with("stats ") {
                return msg;
            }
        }
    }

    fn start(
        threads: usize,
    ) -> (
        OwnedFd,
        std::net::SocketAddr,
        thread::JoinHandle<Result<(), Error>>,
    ) {
        let (front, worker_end) = seqpacket_pair();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sockets = Sockets::for_test(vec![OwnedFd::from(listener)], None, Some(worker_end));
        let options = Options {
            threads,
            ..Options::default()
        };
        greet(&front);
        let server = thread::spawn(move || {
            serve(sockets, &options, |_: &Request<'_>, _: &Context| {
                Response::text(200, "hi\n")
            })
        });
        (front, addr, server)
    }

    fn join_within(server: thread::JoinHandle<Result<(), Error>>, limit: Duration) {
        let start = Instant::now();
        while !server.is_finished() {
            assert!(
                start.elapsed() < limit,
                "the worker did not stop within {limit:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
        server.join().unwrap().unwrap();
    }

    fn get(addr: std::net::SocketAddr) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn control_channel_ping_stats_and_stop() {
        let (front, addr, server) = start(2);
        send(&front, "ping 7");
        let pong = recv_reply(&front);
        assert!(pong.starts_with("pong 7 requests=0 rss_kib="), "{pong}");
        let rss: u64 = pong.rsplit('=').next().unwrap().parse().unwrap();
        assert!(rss > 0, "{pong}");

        for _ in 0..3 {
            assert!(get(addr).starts_with("HTTP/1.1 200 "));
        }
        send(&front, "ping 8");
        assert!(recv_reply(&front).starts_with("pong 8 requests=3 "));
        // No stats for a count already reported.
        assert_eq!(recv(&front, Duration::from_millis(1200)), None);
        assert!(get(addr).starts_with("HTTP/1.1 200 "));
        let stats = recv(&front, Duration::from_millis(2500)).unwrap_or_default();
        // Four answers, all 2xx: the counts ride with the request count.
        assert!(
            stats.starts_with("stats requests=4 classes=0,4,0,0,0 buckets="),
            "{stats}"
        );
        send(&front, "hello there");
        send(&front, "ping 9");
        assert!(recv_reply(&front).starts_with("pong 9 requests=4 "));

        // An idle keep-alive connection and one in the middle of a request.
        let mut idle = TcpStream::connect(addr).unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = idle.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200 "));
        assert!(!String::from_utf8_lossy(&buf[..n]).contains("Connection: close"));
        let mut busy = TcpStream::connect(addr).unwrap();
        busy.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n")
            .unwrap();
        thread::sleep(Duration::from_millis(100));

        send(&front, "stop");
        // The idle connection may send one more request: it is answered and closed.
        thread::sleep(Duration::from_millis(200));
        idle.write_all(b"GET /last HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        idle.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut last = String::new();
        idle.read_to_string(&mut last).unwrap();
        assert!(last.starts_with("HTTP/1.1 200 "), "{last}");
        assert!(last.contains("\r\nConnection: close\r\n"), "{last}");
        busy.write_all(b"\r\n").unwrap();
        let mut out = String::new();
        busy.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        busy.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
        assert!(out.contains("\r\nConnection: close\r\n"), "{out}");
        join_within(server, Duration::from_secs(5));
        // Not accepting any more: the listening socket is closed with the worker here.
        assert!(TcpStream::connect(addr).is_err());
    }

    #[test]
    fn control_channel_eof_stops_the_worker() {
        let (front, _addr, server) = start(1);
        send(&front, "ping 1");
        assert!(recv_reply(&front).starts_with("pong 1 requests=0 "));
        drop(front);
        join_within(server, Duration::from_secs(5));
    }

    /// Receives one handed-back connection on the front end's end of the handoff pair.
    fn recv_handback(front: &OwnedFd) -> (Vec<u8>, TcpStream) {
        let mut pfd = libc::pollfd {
            fd: front.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(rc, 1, "a hand-back within 5 s");
        let mut buf = RecvBuf::new();
        let msg = buf.prepare();
        // SAFETY: `msg` points into `buf`, which outlives the call.
        let n = unsafe { libc::recvmsg(front.as_raw_fd(), msg, libc::MSG_CMSG_CLOEXEC) };
        assert!(n > 0, "{}", io::Error::last_os_error());
        let handoff = buf.complete(n as usize).unwrap();
        (handoff.bytes.to_vec(), TcpStream::from(handoff.fd))
    }

    fn read_response(c: &mut TcpStream) -> String {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = c.read(&mut buf).unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&out);
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text[..end]
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .map_or(0, |v| v.parse().unwrap());
                if out.len() >= end + 4 + len {
                    return text.into_owned();
                }
            }
        }
    }

    #[test]
    fn foreign_request_on_a_keep_alive_connection_is_handed_back_after_earlier_responses() {
        let (front_ctl, worker_ctl) = seqpacket_pair();
        let (front_handoff, worker_handoff) = seqpacket_pair();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sockets = Sockets::for_test(
            vec![OwnedFd::from(listener)],
            Some(worker_handoff),
            Some(worker_ctl),
        );
        let options = Options {
            threads: 2,
            pool: Some("api".into()),
            ..Options::default()
        };
        let server = thread::spawn(move || {
            serve(sockets, &options, |req: &Request<'_>, _: &Context| {
                Response::text(200, format!("worker {:?}\n", req.canonical_path()))
            })
        });
        send(&front_ctl, "routes\n* /api/ api\n* / web\n");
        send(&front_ctl, "cached\nt\t/api/cached\n");
        send(&front_ctl, "ping 1");
        assert!(recv_reply(&front_ctl).starts_with("pong 1 "));

        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /api/a HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let first = read_response(&mut c);
        assert!(
            first.starts_with("HTTP/1.1 200 ") && first.ends_with("worker \"/api/a\"\n"),
            "{first}"
        );
        // Pipelined: one for this pool, one for another, then one more for this pool.
        c.write_all(b"GET /api/%62 HTTP/1.1\r\nHost: t\r\n\r\nGET /web/b HTTP/1.1\r\nHost: t\r\n\r\nGET /api/c HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let (bytes, mut conn) = recv_handback(&front_handoff);
        assert_eq!(
            bytes,
            b"GET /web/b HTTP/1.1\r\nHost: t\r\n\r\nGET /api/c HTTP/1.1\r\nHost: t\r\n\r\n"
        );
        conn.write_all(b"HTTP/1.1 200 OK\r\nx-from: frontend\r\nContent-Length: 3\r\n\r\nfe\n")
            .unwrap();
        // The worker's answer to /api/%62, then the front end's to /web/b.
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut both = Vec::new();
        let mut buf = [0u8; 4096];
        while !both.ends_with(b"fe\n") {
            let n = c.read(&mut buf).unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&both));
            both.extend_from_slice(&buf[..n]);
        }
        let both = String::from_utf8_lossy(&both);
        let worker_at = both
            .find("worker \"/api/b\"\n")
            .expect("the worker's answer");
        let frontend_at = both
            .find("x-from: frontend")
            .expect("the front end's answer");
        assert!(worker_at < frontend_at, "{both}");

        // A cached path (GET) is handed back; with a query string it is served.
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /api/cached?x HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        assert!(read_response(&mut c).starts_with("HTTP/1.1 200 "));
        c.write_all(b"GET /api/cached HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let (bytes, _conn) = recv_handback(&front_handoff);
        assert!(bytes.starts_with(b"GET /api/cached HTTP/1.1\r\n"));

        // A table that routes everything here: nothing is handed back.
        send(&front_ctl, "routes\n* / api\n");
        send(&front_ctl, "ping 2");
        assert!(
            recv_reply(&front_ctl).starts_with("pong 2 requests=3 "),
            "hand-backs are not counted"
        );
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /web/x HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        assert!(read_response(&mut c).ends_with("worker \"/web/x\"\n"));

        send(&front_ctl, "stop");
        join_within(server, Duration::from_secs(5));
    }

    #[test]
    fn failed_hand_back_is_answered_503() {
        let (front_ctl, worker_ctl) = seqpacket_pair();
        let (front_handoff, worker_handoff) = seqpacket_pair();
        drop(front_handoff);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sockets = Sockets::for_test(
            vec![OwnedFd::from(listener)],
            Some(worker_handoff),
            Some(worker_ctl),
        );
        let options = Options {
            threads: 1,
            pool: Some("api".into()),
            ..Options::default()
        };
        let server = thread::spawn(move || {
            serve(sockets, &options, |_: &Request<'_>, _: &Context| {
                Response::text(200, "hi\n")
            })
        });
        send(&front_ctl, "routes\n* /api/ api\n");
        send(&front_ctl, "cached\n");
        send(&front_ctl, "ping 1");
        assert!(recv_reply(&front_ctl).starts_with("pong 1 "));
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(
            b"GET /api/a HTTP/1.1\r\nHost: t\r\n\r\nGET /other HTTP/1.1\r\nHost: t\r\n\r\n",
        )
        .unwrap();
        let mut out = String::new();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
        assert!(
            out.contains("HTTP/1.1 503 ") && out.contains("Connection: close"),
            "{out}"
        );
        send(&front_ctl, "stop");
        join_within(server, Duration::from_secs(5));
    }

    #[test]
    fn stuck_handler_thread_stops_pongs() {
        let (front, worker_end) = seqpacket_pair();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sockets = Sockets::for_test(vec![OwnedFd::from(listener)], None, Some(worker_end));
        let options = Options {
            threads: 1,
            ..Options::default()
        };
        greet(&front);
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = std::sync::Mutex::new(release_rx);
        let server = thread::spawn(move || {
            serve(sockets, &options, move |req: &Request<'_>, _: &Context| {
                if req.path() == "/block" {
                    let _ = release_rx.lock().map(|rx| rx.recv());
                }
                Response::text(200, "hi\n")
            })
        });
        send(&front, "ping 1");
        assert!(recv_reply(&front).starts_with("pong 1 "));
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /block HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        thread::sleep(Duration::from_millis(200));
        send(&front, "ping 2");
        assert_eq!(
            recv(&front, Duration::from_millis(1500)),
            None,
            "no pong while stuck"
        );
        release_tx.send(()).unwrap();
        assert!(recv_reply(&front).starts_with("pong 2 requests=1 "));
        send(&front, "stop");
        join_within(server, Duration::from_secs(5));
    }
}
