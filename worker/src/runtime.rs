//! The io_uring runtime: one thread and one ring per core. Each ring has a multishot accept on
//! every pool socket, a recvmsg on the handoff socket, a periodic tick and an eventfd read that
//! wakes it for a graceful stop; each connection runs a recv -> handle -> send state machine
//! with at most one operation in flight.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use crate::handoff::{HandoffError, RecvBuf};
use crate::http::{HttpConn, Limits, Outcome};
use crate::sockets::{Sockets, setsockopt_int};
use crate::{Context, Error, Handler, Options, Request, Response};

const RING_ENTRIES: u32 = 1024;
const CQ_ENTRIES: u32 = 8192;
const TICK: Duration = Duration::from_millis(500);
/// Ticks a lingering close waits for the client's FIN (~2 s).
const LINGER_TICKS: u64 = 4;
/// Ticks after a stop request before in-progress connections are cut (~4.5 s).
const STOP_DEADLINE_TICKS: u64 = 9;
/// Ticks after the cut before a thread gives up waiting for cancellations.
const STOP_ABANDON_TICKS: u64 = 2;
const READ_CHUNK: usize = 4096;
const MAX_READ_CHUNK: usize = 1 << 20;

// Operation kinds, in the low byte of user_data.
const OP_ACCEPT: u8 = 1;
const OP_HANDOFF: u8 = 2;
const OP_WAKE: u8 = 3;
const OP_TICK: u8 = 4;
const OP_RECV: u8 = 5;
const OP_SEND: u8 = 6;
const OP_CANCEL: u8 = 7;

/// user_data: kind (8 bits) | index (32 bits) | generation (24 bits).
fn user_data(kind: u8, index: u32, generation: u32) -> u64 {
    u64::from(kind) | (u64::from(index) << 8) | (u64::from(generation & 0xff_ffff) << 40)
}

fn split_user_data(ud: u64) -> (u8, u32, u32) {
    (ud as u8, (ud >> 8) as u32, (ud >> 40) as u32)
}

struct Shared<H> {
    handler: H,
    ctx: Context,
    pools: Vec<RawFd>,
    handoff: Option<RawFd>,
    limits: Limits,
    idle_ticks: u64,
}

/// Serves `sockets` until SIGTERM/SIGINT, then stops gracefully.
pub(crate) fn serve<H: Handler>(
    sockets: Sockets,
    options: &Options,
    handler: H,
) -> Result<(), Error> {
    let signals = block_stop_signals()?;
    let shared = Arc::new(Shared {
        handler,
        ctx: Context {
            pool: options.pool.clone(),
            pid: std::process::id(),
        },
        pools: sockets.pools.iter().map(AsRawFd::as_raw_fd).collect(),
        handoff: sockets.handoff.as_ref().map(AsRawFd::as_raw_fd),
        limits: Limits {
            max_body: options.max_body,
            ..Limits::default()
        },
        idle_ticks: (options.idle_timeout.as_millis() / TICK.as_millis()).max(1) as u64,
    });
    log::info!(
        "sluice-worker pid {} pool {}: {} thread(s), {} {} pool socket(s){}",
        shared.ctx.pid,
        shared.ctx.pool().unwrap_or("(standalone)"),
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
    );

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
            .spawn(move || Worker::new(&shared, wake_fd).and_then(|mut w| w.run()));
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
        wait_for_stop(&signals, &threads);
    }
    for (_, wake) in &threads {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        unsafe { libc::write(wake.as_raw_fd(), (&raw const one).cast(), 8) };
    }
    let mut result = spawn_error.map_or(Ok(()), Err);
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

/// Returns when a stop signal arrives or a worker thread ends on its own (an error).
fn wait_for_stop(
    signals: &libc::sigset_t,
    threads: &[(thread::JoinHandle<Result<(), Error>>, OwnedFd)],
) {
    let timeout = libc::timespec {
        tv_sec: 0,
        tv_nsec: 250_000_000,
    };
    loop {
        // SAFETY: `signals` is an initialized sigset; no siginfo is requested.
        let signo = unsafe { libc::sigtimedwait(signals, std::ptr::null_mut(), &timeout) };
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
}

impl<'s, H: Handler> Worker<'s, H> {
    fn new(shared: &'s Shared<H>, wake_fd: RawFd) -> Result<Self, Error> {
        let ring = new_ring().map_err(Error::Ring)?;
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
        })
    }

    fn run(&mut self) -> Result<(), Error> {
        for index in 0..self.shared.pools.len() {
            self.arm_accept(index)?;
        }
        self.arm_handoff()?;
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

            if let Some(stop) = self.stop_tick {
                let listeners_idle = !self.accept_armed.contains(&true) && !self.handoff_armed;
                if self.conns.len == 0 && listeners_idle {
                    return Ok(());
                }
                if self.tick >= stop + STOP_DEADLINE_TICKS + STOP_ABANDON_TICKS {
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
        self.add_conn(fd, Vec::with_capacity(READ_CHUNK))
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
        let received = self.handoff_buf.complete(res as usize);
        if self.stop_tick.is_none() {
            match &received {
                Err(HandoffError::Closed) => {
                    log::warn!("{}", HandoffError::Closed);
                    self.handoff_closed = true;
                }
                _ => self.arm_handoff()?,
            }
        }
        match received {
            Ok(handoff) => {
                log::debug!("handed-off connection with {} bytes", handoff.bytes.len());
                self.add_conn(handoff.fd, handoff.bytes)
            }
            Err(HandoffError::Closed) => Ok(()),
            Err(e) => {
                log::warn!("{e}");
                Ok(())
            }
        }
    }

    /// Starts serving a connection whose input so far is `rbuf`.
    fn add_conn(&mut self, fd: OwnedFd, rbuf: Vec<u8>) -> Result<(), Error> {
        if let Err(e) = setsockopt_int(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_NODELAY, 1) {
            log::debug!("TCP_NODELAY: {e}");
        }
        let has_input = !rbuf.is_empty();
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
        };
        let (index, generation) = self.conns.insert(conn);
        if has_input {
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
        let len = conn.rbuf.len() + res as usize;
        // The kernel never reports more than the spare capacity it was given.
        debug_assert!(len <= conn.rbuf.capacity());
        // SAFETY: the kernel wrote `res` initialized bytes into the spare capacity starting at
        // the old length, which is what submit_recv handed it.
        unsafe { conn.rbuf.set_len(len.min(conn.rbuf.capacity())) };
        conn.last_active = tick;
        self.process(index, generation)
    }

    /// Runs the HTTP state machine over the buffered input and starts the next operation.
    fn process(&mut self, index: u32, generation: u32) -> Result<(), Error> {
        let closing = self.stop_tick.is_some();
        let shared = self.shared;
        let Some(conn) = self.conns.get_mut(index, generation) else {
            return Ok(());
        };
        let mut dispatch = |req: &Request<'_>| call_handler(&shared.handler, req, &shared.ctx);
        match conn
            .http
            .process(&mut conn.rbuf, &mut conn.wbuf, closing, &mut dispatch)
        {
            Outcome::NeedMore { hint } => conn.want = hint,
            Outcome::Close => conn.close_after_send = true,
        }
        if !conn.wbuf.is_empty() {
            self.submit_send(index, generation)
        } else if conn.close_after_send {
            self.start_linger(index, generation)
        } else {
            self.submit_recv(index, generation)
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
        if conn.rbuf.capacity() - conn.rbuf.len() < READ_CHUNK.min(want) {
            conn.rbuf.reserve(want);
        }
        let spare = conn.rbuf.spare_capacity_mut();
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
        let pending = &conn.wbuf[conn.sent..];
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
        let stopping = self.stop_tick.is_some();
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
        conn.sent += res as usize;
        conn.last_active = tick;
        if conn.sent < conn.wbuf.len() {
            return self.submit_send(index, generation);
        }
        conn.sent = 0;
        if conn.wbuf.capacity() > 16 * READ_CHUNK {
            conn.wbuf = Vec::new();
        } else {
            conn.wbuf.clear();
        }
        if conn.close_after_send {
            self.start_linger(index, generation)
        } else if stopping && conn.http.is_idle(&conn.rbuf) {
            self.close(index);
            Ok(())
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
        conn.want = 0;
        self.submit_recv(index, generation)
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
        let stopping = self.stop_tick.is_some();
        let cut_all = self
            .stop_tick
            .is_some_and(|stop| tick >= stop + STOP_DEADLINE_TICKS);
        let mut to_cancel = Vec::new();
        for (_, _, conn) in self.conns.iter_mut() {
            let Some(ud) = conn.in_flight else { continue };
            if conn.cancelled {
                continue;
            }
            let expired = match conn.phase {
                Phase::Lingering { until } => tick >= until,
                Phase::Reading => {
                    tick.saturating_sub(conn.last_active) >= idle_ticks
                        || (stopping && conn.http.is_idle(&conn.rbuf))
                }
                Phase::Writing => tick.saturating_sub(conn.last_active) >= idle_ticks,
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

/// Calls the handler; a panic becomes a 500 that closes the connection.
fn call_handler<H: Handler>(handler: &H, req: &Request<'_>, ctx: &Context) -> Response {
    panic::catch_unwind(AssertUnwindSafe(|| handler.handle(req, ctx))).unwrap_or_else(|_| {
        log::error!("handler panicked on {} {}", req.method(), req.target());
        Response::text(500, "internal server error\n").header("connection", "close")
    })
}
