//! The TLS thread's epoll loop. Each connection goes: handshake (rustls) → open (our record
//! layer, one request head at a time) → handed to its pool, or closed after its answer.

use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use sluice_proto::{access::Arrival, handoff};
use sluice_tls::{Received, RecordLayer, Session, hello::Hello};

use super::{
    Carried, TlsFront, TlsStats,
    handshake::{Handshake, Step},
    upstream::{self, Upstream, WINDOW},
};
use crate::access_log::{Answered, body_len};
use crate::epoll::{self, Epoll, set_nonblocking};
use crate::held::{Held, Stop};
use crate::pipeline::head::Decision;
use crate::pipeline::memo::HeadMemo;
use crate::pipeline::{self, Facts, Hold, Rules, Verdict};
use crate::table::{CountedAhead, PoolId};
use sluice_proto::request::is_head;

const WAKE: u64 = u64::MAX;
/// A relayed connection's pool side: its connection's token with this bit.
const UP: u64 = 1 << 47;
const STOP: u64 = u64::MAX - 1;
/// Listener tokens: LISTENER + index.
const LISTENER: u64 = 1 << 48;
/// Most ciphertext read ahead of the record being opened.
const MAX_INPUT: usize = 2 * sluice_tls::MAX_RECORD;
/// How long a connection answered and closing may take to read the rest of what it sent.
const LINGER: Duration = Duration::from_secs(2);

mod handover;
pub use handover::HAND_OVER_WAIT;

enum Phase {
    /// Some pool is `tls = "passthrough"`: the ClientHello is read first, for its SNI name,
    /// before any byte goes to a handshake.
    Hello,
    Handshake(Box<Handshake>),
    Open(Box<RecordLayer>),
    /// Answered and closing: what the client still sends is read and dropped.
    Lingering,
}

/// What comes once everything sealed so far is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    Serve,
    HandOff(PoolId),
    /// Join the connection to a socket pool (`upstream`).
    Relay(PoolId),
    /// A shared host: the delivery thread gets the plaintext and delivers each request.
    Deliver,
    /// Joined: plaintext goes both ways until one side ends.
    Relaying,
    Close,
}

struct Conn {
    fd: OwnedFd,
    phase: Phase,
    /// Ciphertext received, not yet opened.
    input: Vec<u8>,
    /// Plaintext opened, not yet answered.
    plain: Vec<u8>,
    /// Ciphertext to send, and how much of it is sent.
    out: Vec<u8>,
    sent: usize,
    then: Then,
    /// The SNI name (empty without one).
    sni: String,
    deadline: Instant,
    arrival: Arrival,
    local: Option<IpAddr>,
    /// The events registered for it now.
    mask: u32,
    /// A socket pool's side, while relaying.
    up: Option<Box<Upstream>>,
    /// When the request now being read began (for the access log).
    started: Instant,
}

impl Conn {
    /// A connection with nothing read or sent yet, due to send its request within `timeout`.
    fn new(fd: OwnedFd, phase: Phase, arrival: Arrival, timeout: Duration) -> Conn {
        let now = Instant::now();
        Conn {
            fd,
            phase,
            input: Vec::new(),
            plain: Vec::new(),
            out: Vec::new(),
            sent: 0,
            then: Then::Serve,
            sni: String::new(),
            deadline: now + timeout,
            started: now,
            arrival,
            local: None,
            mask: 0,
            up: None,
        }
    }
}

pub struct Loop {
    f: TlsFront,
    epoll: Epoll,
    conns: HashMap<u64, Conn>,
    next_token: u64,
    inbox: mpsc::Receiver<(Held, Option<PoolId>)>,
    wake: Arc<OwnedFd>,
    /// Heads the cache answered (`pipeline::memo`).
    memo: HeadMemo,
}

impl Loop {
    pub fn new(
        f: TlsFront,
        inbox: mpsc::Receiver<(Held, Option<PoolId>)>,
        wake: Arc<OwnedFd>,
    ) -> io::Result<Loop> {
        let lp = Loop {
            f,
            epoll: Epoll::new()?,
            conns: HashMap::new(),
            next_token: 0,
            inbox,
            wake,
            memo: HeadMemo::default(),
        };
        lp.listen()?;
        lp.epoll.add(lp.wake.as_raw_fd(), epoll::IN, WAKE)?;
        lp.epoll.add(lp.f.stop, epoll::IN, STOP)?;
        Ok(lp)
    }

    /// Watches the listeners (again, after a hand-over that did not happen; a loop that
    /// stopped on an error still watches them).
    pub fn listen(&self) -> io::Result<()> {
        for (i, &fd) in self.f.listeners.iter().enumerate() {
            // Accepted until EAGAIN on each readiness: the listener must not block.
            set_nonblocking(fd, true);
            // Every loop watches every listener; the kernel wakes one of them per event.
            let events = epoll::IN | libc::EPOLLEXCLUSIVE as u32;
            match self.epoll.add(fd, events, LISTENER + i as u64) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                other => other?,
            }
        }
        Ok(())
    }

    /// Serves until told to stop; a stop for an upgrade returns what is handed over and how
    /// many connections were cut (`handover`).
    pub fn run(&mut self) -> io::Result<Option<(Carried, usize)>> {
        let mut next_tick = Instant::now() + Duration::from_secs(1);
        loop {
            let n = self.epoll.wait(1000)?;
            for i in 0..n {
                let (token, bits) = self.epoll.ready(i);
                match token {
                    STOP => {
                        let how = crate::eventfd::take(self.f.stop);
                        if how == Stop::HandOver as u64 {
                            return Ok(Some(self.hand_over()));
                        }
                        return Ok(None);
                    }
                    WAKE => self.take_up(),
                    t if t >= LISTENER => self.accept((t - LISTENER) as usize),
                    t => self.on_event(t, bits),
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + Duration::from_secs(1);
                self.close_late(now);
            }
        }
    }

    fn close_late(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| now > c.deadline)
            .map(|(&t, _)| t)
            .collect();
        for t in late {
            self.close(t);
        }
    }

    fn accept(&mut self, index: usize) {
        let Some(&listener) = self.f.listeners.get(index) else {
            return;
        };
        let hello_first = !self.f.table.current().1.passthrough.is_empty();
        loop {
            // SAFETY: accept4 on our listener; the returned fd is owned right away.
            let fd = unsafe {
                libc::accept4(
                    listener,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error();
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN) | Some(libc::ECONNABORTED) | Some(libc::EINTR)
                ) {
                    log::warn!("TLS accept: {e}");
                }
                return;
            }
            // SAFETY: a new descriptor from accept4, owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            TlsStats::add(&self.f.stats.accepted);
            let Some(phase) = self.first_phase(hello_first) else {
                continue;
            };
            let conn = Conn::new(fd, phase, Arrival::Dispatcher, self.f.header_timeout);
            self.add(conn);
        }
    }

    /// Where a new connection begins: its ClientHello read for the SNI name while some pool
    /// is passthrough, else the handshake.
    fn first_phase(&self, hello_first: bool) -> Option<Phase> {
        if hello_first {
            Some(Phase::Hello)
        } else {
            self.handshake()
        }
    }

    /// A new handshake with the current certificates.
    fn handshake(&self) -> Option<Phase> {
        let config = match self.f.config.lock() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        };
        match Handshake::new(config) {
            Ok(h) => Some(Phase::Handshake(Box::new(h))),
            Err(e) => {
                log::warn!("TLS: cannot start a handshake: {e}");
                None
            }
        }
    }

    /// The ClientHello read so far: a passthrough pool's name goes to that pool untouched
    /// (`pass_through`); anything else goes on to the front end's handshake. False while
    /// more of it is needed, or once the connection is passed on.
    fn read_hello(&mut self, token: u64) -> bool {
        let Some(c) = self.conns.get_mut(&token) else {
            return false;
        };
        let name = match sluice_tls::hello::read(&c.input) {
            Hello::Partial if c.input.len() < MAX_INPUT => return false,
            Hello::Partial => None,
            Hello::Done(name) => name,
        };
        let table = self.f.table.current().1;
        let pool = name.as_deref().and_then(|host| {
            table.passthrough.lookup(&sluice_proto::route::Query {
                host: Some(host),
                local: None,
                path: "/",
            })
        });
        if let Some(p) = pool {
            self.pass_through(token, p, &table);
            return false;
        }
        match self.handshake() {
            Some(phase) => {
                if let Some(c) = self.conns.get_mut(&token) {
                    c.phase = phase;
                }
                true
            }
            None => {
                self.close(token);
                false
            }
        }
    }

    /// A passthrough pool's connection, with the bytes read of it, goes to the relay, which
    /// puts a connection of the front end's own into the pool's queue (`crate::relay`). A
    /// pool that cannot take it gets the client a fatal alert: without the pool's
    /// certificate, no HTTP answer can be sealed.
    fn pass_through(&mut self, token: u64, p: PoolId, table: &crate::table::Table) {
        let admitted = crate::pipeline::admit(Decision::Pool(p), false, table, &self.f.flags);
        let relay = self.f.relay.as_ref();
        if let (Decision::Pool(p), Some(relay)) = (admitted, relay) {
            if let Some(c) = self.conns.remove(&token) {
                self.epoll.delete(c.fd.as_raw_fd());
                let counted = CountedAhead::new(Some(&self.f.stats.passed_through));
                if relay.join(c.fd, c.input, p, table).is_err() {
                    counted.undo();
                }
            }
            return;
        }
        TlsStats::add(&self.f.stats.passthrough_refused);
        if let Some(c) = self.conns.get_mut(&token) {
            c.out.extend_from_slice(&sluice_tls::hello::UNAVAILABLE);
            c.then = Then::Close;
        }
        self.flush(token);
    }

    fn add(&mut self, mut conn: Conn) -> Option<u64> {
        self.next_token += 1;
        let token = self.next_token;
        conn.mask = epoll::IN | epoll::RDHUP;
        if let Err(e) = self.epoll.add(conn.fd.as_raw_fd(), conn.mask, token) {
            log::warn!("TLS: epoll: {e}");
            return None;
        }
        self.conns.insert(token, conn);
        Some(token)
    }

    /// Registers what the connection (and its pool side) waits for now: a side is read only
    /// while the other side's backlog is under `WINDOW`, and watched for writing while it
    /// has some.
    fn settle(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let pending = c.out.len() - c.sent;
        let backlog = c.up.as_ref().map_or(0, |u| u.backlog());
        // Not read while it cannot take more: level-triggered readiness would spin.
        let mut mask = 0;
        if backlog < WINDOW && c.input.len() < MAX_INPUT {
            mask |= epoll::IN | epoll::RDHUP;
        }
        if pending > 0 {
            mask |= epoll::OUT;
        }
        if mask != c.mask {
            c.mask = mask;
            let _ = self.epoll.modify(c.fd.as_raw_fd(), mask, token);
        }
        if let Some(u) = c.up.as_mut().filter(|u| !u.ended) {
            let mut mask = 0;
            if pending < WINDOW {
                mask |= epoll::IN | epoll::RDHUP;
            }
            if !u.connected || u.backlog() > 0 {
                mask |= epoll::OUT;
            }
            if mask != u.mask {
                u.mask = mask;
                let _ = self.epoll.modify(u.conn.fd(), mask, token | UP);
            }
        }
    }

    /// Sessions workers handed back, passed on by the dispatcher.
    fn take_up(&mut self) {
        crate::eventfd::take(self.wake.as_raw_fd());
        while let Ok((held, from)) = self.inbox.try_recv() {
            TlsStats::add(&self.f.stats.handed_back);
            if self.vouched(&held, from) {
                self.adopt_session(held, "a TLS connection handed back");
            }
        }
    }

    /// Whether a session handed back by pool `from` names one that pool could have been
    /// given (`Table::may_hold_session`); the front end's own (`from` None) always does.
    fn vouched(&self, held: &Held, from: Option<PoolId>) -> bool {
        let Some(p) = from else {
            return true;
        };
        let Ok((session, _)) = Session::decode(&held.bytes) else {
            // Refused with its reason where it is adopted.
            return true;
        };
        let table = self.f.table.current().1;
        let local = sluice_proto::site::local_address_of(held.fd.as_raw_fd());
        if table.may_hold_session(&session.server_name, local, p) {
            return true;
        }
        log::warn!(
            "pool {} handed back a TLS session named {:?}, which it could not have been given; closed",
            table.pool(p).map_or("?", |e| &e.name),
            session.server_name
        );
        false
    }

    /// What the dispatcher passed on and this thread has not taken up (at a stop), counted
    /// as handed back like what it takes up.
    pub fn inbox_left(&self) -> Vec<Held> {
        let mut left = Vec::new();
        for (held, from) in self.inbox.try_iter() {
            TlsStats::add(&self.f.stats.handed_back);
            if self.vouched(&held, from) {
                left.push(held);
            }
        }
        left
    }

    /// What a TLS thread handed over at an upgrade: its sessions go on where they were, its
    /// connections whose handshake had not begun start one.
    pub fn take_up_carried(&mut self, carried: Carried) {
        for held in carried.sessions {
            self.adopt_session(held, "a TLS session from before the upgrade");
        }
        let hello_first = !self.f.table.current().1.passthrough.is_empty();
        for held in carried.fresh {
            let Some(phase) = self.first_phase(hello_first) else {
                continue;
            };
            set_nonblocking(held.fd.as_raw_fd(), true);
            let mut conn = Conn::new(held.fd, phase, held.arrival, self.f.header_timeout);
            conn.input = held.bytes;
            if let Some(t) = self.add(conn) {
                self.drive(t);
            }
        }
    }

    /// A session in the form a hand-back has (its `Session` payload, then plaintext):
    /// served on with our record layer.
    fn adopt_session(&mut self, held: Held, what: &str) {
        let (session, plain) = match Session::decode(&held.bytes) {
            Ok((s, rest)) => (s, rest.to_vec()),
            Err(e) => {
                log::warn!("{what}: {e}; closed");
                return;
            }
        };
        let layer = match RecordLayer::new(&session) {
            Ok(l) => l,
            Err(e) => {
                log::warn!("{what}: {e}; closed");
                return;
            }
        };
        set_nonblocking(held.fd.as_raw_fd(), true);
        let phase = Phase::Open(Box::new(layer));
        let mut conn = Conn::new(held.fd, phase, held.arrival, self.f.header_timeout);
        (conn.input, conn.plain, conn.sni) = (session.pending, plain, session.server_name);
        if let Some(t) = self.add(conn) {
            self.drive(t);
        }
    }

    fn on_event(&mut self, token: u64, bits: u32) {
        if token & UP != 0 {
            self.on_pool(token & !UP, bits);
            return;
        }
        if bits & epoll::GONE != 0 {
            // Reset, or both directions shut (a lingering close got the client's FIN).
            self.close(token);
            return;
        }
        if bits & epoll::OUT != 0 {
            self.flush(token);
        }
        if bits & (epoll::IN | epoll::ENDED) != 0 {
            self.read(token);
        }
    }

    fn read(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let mut ended = false;
        loop {
            if c.input.len() >= MAX_INPUT && !matches!(c.phase, Phase::Lingering) {
                break;
            }
            if matches!(c.phase, Phase::Lingering) {
                c.input.clear();
            }
            // Into the spare capacity: no zeroing of the room per read.
            c.input.reserve(16 * 1024);
            let spare = c.input.spare_capacity_mut();
            // SAFETY: recv writes at most `spare.len()` bytes into the live spare capacity.
            let n =
                unsafe { libc::recv(c.fd.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), 0) };
            if n > 0 {
                let len = c.input.len() + n as usize;
                // SAFETY: the kernel initialized the `n` bytes after the old length.
                unsafe { c.input.set_len(len) };
            }
            if n == 0 {
                ended = true;
                break;
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EAGAIN) {
                    ended = true;
                }
                break;
            }
        }
        if ended || matches!(c.phase, Phase::Lingering) {
            if ended {
                self.close(token);
            }
            return;
        }
        self.drive(token);
    }

    /// Moves the connection on with what it has received.
    fn drive(&mut self, token: u64) {
        if self
            .conns
            .get(&token)
            .is_some_and(|c| matches!(c.phase, Phase::Hello))
            && !self.read_hello(token)
        {
            return;
        }
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if let Phase::Handshake(h) = &mut c.phase {
            match h.advance(&mut c.input, &mut c.out, &self.f.secrets) {
                Step::More => {
                    self.flush(token);
                    return;
                }
                Step::Failed(why) => {
                    log::debug!("a TLS handshake failed: {why}");
                    TlsStats::add(&self.f.stats.handshake_failures);
                    c.then = Then::Close;
                    self.flush(token);
                    return;
                }
                Step::Ready => {}
            }
            let Phase::Handshake(h) = std::mem::replace(&mut c.phase, Phase::Lingering) else {
                return;
            };
            let done = match h.finish() {
                Ok(done) => done,
                Err(why) => {
                    log::warn!("a TLS session could not be taken out of its handshake: {why}");
                    TlsStats::add(&self.f.stats.handshake_failures);
                    self.close(token);
                    return;
                }
            };
            TlsStats::add(&self.f.stats.handshakes);
            match RecordLayer::new(&done.session) {
                Ok(layer) => c.phase = Phase::Open(Box::new(layer)),
                Err(e) => {
                    log::warn!("a TLS session's keys: {e}");
                    self.close(token);
                    return;
                }
            }
            c.sni = done.session.server_name;
            c.plain = done.plaintext;
        }
        self.serve(token);
        self.flush(token);
    }

    /// Opens the records received and answers the request heads they hold, until one goes
    /// to a pool or more input is needed.
    fn serve(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if c.then != Then::Serve && c.then != Then::Relaying {
            return;
        }
        let Phase::Open(layer) = &mut c.phase else {
            return;
        };
        let (plain, up) = (&mut c.plain, &mut c.up);
        let mut sent_on = false;
        let said = layer.open_all(&mut c.input, &mut c.out, |d| match up.as_mut() {
            Some(up) => {
                sent_on |= !d.is_empty();
                up.push(d)
            }
            None => plain.extend_from_slice(d),
        });
        if sent_on {
            // A relay is idle only when neither side moves: an upload is progress too.
            c.deadline = Instant::now() + self.f.idle_timeout;
        }
        let peer_closed = match said {
            Received::Open => false,
            Received::Closed => true,
            Received::Failed(e) => {
                log::debug!("a TLS connection: {e}");
                c.then = Then::Close;
                return;
            }
        };
        if let Some(up) = c.up.as_mut() {
            // Relaying: the client's close_notify ends its direction only; the pool's
            // answer still comes back.
            up.client_done |= peer_closed;
            self.pump(token);
            return;
        }
        if peer_closed {
            let _ = layer.seal_alert(0, &mut c.out);
            c.then = Then::Close;
            return;
        }
        let ((generation, table), limits) = (self.f.table.current(), &self.f.limits);
        if table.routes.has_ip_sites() && c.local.is_none() {
            c.local = sluice_proto::site::local_address_of(c.fd.as_raw_fd());
        }
        while !c.plain.is_empty() {
            let full = c.plain.len() >= limits.max_request_head;
            let rules = Rules {
                limits,
                table: &table,
                generation,
                flags: &self.f.flags,
                cache: &self.f.cache,
            };
            let facts = Facts {
                local: c.local,
                sni: Some(&c.sni),
                tls: true,
                kept: false,
                now: Instant::now(),
            };
            let verdict = pipeline::judge(&c.plain, full, rules, facts, &mut self.memo);
            if matches!(verdict, Verdict::NeedMore) {
                break;
            }
            c.deadline = Instant::now() + self.f.header_timeout;
            let log = |status, bytes, pool| {
                if let Some(log) = &self.f.access_log {
                    log.answered(Answered {
                        fd: c.fd.as_raw_fd(),
                        head: &c.plain,
                        status,
                        bytes,
                        duration: c.started.elapsed(),
                        arrival: c.arrival,
                        pool,
                    });
                }
            };
            match verdict {
                Verdict::NeedMore => {}
                Verdict::Cached {
                    answer,
                    head_len,
                    keep,
                    pool,
                } => {
                    TlsStats::add(&self.f.stats.cache_answers);
                    let pool = pool.and_then(|p| table.pool(p));
                    log(200, body_len(&answer), pool.map(|e| e.name.clone()));
                    if let Err(e) = layer.seal(&answer, &mut c.out) {
                        log::debug!("a TLS connection: {e}");
                        c.then = Then::Close;
                        return;
                    }
                    c.plain.drain(..head_len.min(c.plain.len()));
                    if !keep {
                        let _ = layer.seal_alert(0, &mut c.out);
                        c.then = Then::Close;
                        return;
                    }
                    c.deadline = Instant::now() + self.f.idle_timeout;
                    c.started = Instant::now();
                    continue;
                }
                Verdict::Refuse {
                    status,
                    why,
                    head_only,
                } => {
                    let (then, bytes) =
                        refuse(layer, &mut c.out, status, why, head_only, &self.f.stats);
                    log(status, bytes, None);
                    c.then = then;
                }
                // Never on a TLS connection (`Facts::tls`); answered as given all the same.
                Verdict::Redirect { answer } => {
                    log(308, body_len(&answer), None);
                    if layer.seal(&answer, &mut c.out).is_ok() {
                        let _ = layer.seal_alert(0, &mut c.out);
                    }
                    c.then = Then::Close;
                }
                // No pool may hold the session of a host it shares with others: the
                // delivery thread gets its plaintext, this request first.
                Verdict::Pool(r) if r.hold == Hold::FrontEnd => c.then = Then::Deliver,
                Verdict::Pool(r) if table.pool(r.pool).is_some_and(|e| e.relay) => {
                    c.then = Then::Relay(r.pool);
                }
                Verdict::Pool(r) => c.then = Then::HandOff(r.pool),
            }
            return;
        }
    }

    /// Sends what is sealed; once all of it is out, does what comes next.
    fn flush(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        match epoll::send_pending(c.fd.as_raw_fd(), &c.out, &mut c.sent) {
            Ok(true) => {}
            Ok(false) => {
                self.settle(token);
                return;
            }
            Err(_) => {
                self.close(token);
                return;
            }
        }
        c.out.clear();
        c.sent = 0;
        let then = c.then;
        self.settle(token);
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        match then {
            Then::Serve => {}
            Then::HandOff(p) => self.hand_off(token, p),
            Then::Relay(p) => self.start_relay(token, p),
            Then::Deliver => self.start_delivery(token),
            // The pool's side is read again when `settle` lets it (no call back into the
            // pump from here: the pump flushes).
            Then::Relaying => {}
            Then::Close if !matches!(c.phase, Phase::Lingering) => {
                // The client closes first (it has its answer and our close_notify); what it
                // still sends meanwhile is read and dropped, so no reset cuts the answer.
                c.phase = Phase::Lingering;
                c.deadline = Instant::now() + LINGER;
                // SAFETY: shutdown of the write side of a connection we own.
                unsafe { libc::shutdown(c.fd.as_raw_fd(), libc::SHUT_WR) };
            }
            Then::Close => {}
        }
    }

    /// Gives the connection, with its session and the plaintext not yet served, to pool `p`.
    fn hand_off(&mut self, token: u64, p: PoolId) {
        let Some(mut c) = self.conns.remove(&token) else {
            return;
        };
        // Out of the set first: epoll keys on the open file, which outlives our fd in the
        // worker, and would come back with the connection.
        self.epoll.delete(c.fd.as_raw_fd());
        let Phase::Open(layer) = &mut c.phase else {
            return;
        };
        let table = self.f.table.current().1;
        let Some(entry) = table.pool(p) else {
            return;
        };
        let payload = match layer.payload(&c.input, &c.sni, &c.plain) {
            Ok(payload) => payload,
            Err(e) => {
                // Half a KeyUpdate came with the request: the session cannot move.
                log::debug!("a TLS connection for pool {p}: {e}");
                let _ = layer.seal_alert(e.alert(), &mut c.out);
                c.then = Then::Close;
                if let Some(t) = self.add(c) {
                    self.flush(t);
                }
                return;
            }
        };
        let flags = handoff::routed_flags(c.arrival) | handoff::TLS;
        // Workers get connections as the dispatcher passes them: blocking.
        set_nonblocking(c.fd.as_raw_fd(), false);
        let counted = CountedAhead::new(Some(&self.f.stats.handed_off));
        match handoff::send(entry.handoff, c.fd.as_raw_fd(), flags, &payload) {
            Ok(()) => {}
            Err(e) => {
                counted.undo();
                log::warn!("handing a TLS connection to pool {p} failed: {e}");
                // Answered 503 over the session instead.
                let why = "the application's queue is full";
                c.then = unavailable(layer, &mut c.out, why, &c.plain, &self.f.stats);
                set_nonblocking(c.fd.as_raw_fd(), true);
                if let Some(t) = self.add(c) {
                    self.flush(t);
                }
            }
        }
    }

    fn close(&mut self, token: u64) {
        if let Some(c) = self.conns.remove(&token) {
            self.epoll.delete(c.fd.as_raw_fd());
            if let Some(up) = &c.up {
                self.epoll.delete(up.conn.fd());
            }
        }
    }

    /// Joins the connection to socket pool `p`: a connection into its queue gets the
    /// plaintext read so far (after a PROXY v2 header for a `proxy_protocol` pool).
    fn start_relay(&mut self, token: u64, p: PoolId) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let Phase::Open(layer) = &mut c.phase else {
            return;
        };
        let table = self.f.table.current().1;
        let proxy = table.pool(p).is_some_and(|e| e.proxy);
        let opened = self.f.direct.as_ref().map(|d| d.open(p));
        let (conn, connected) = match opened {
            Some(Ok(o)) => o,
            other => {
                if let Some(Err(e)) = other {
                    log::warn!("TLS to socket pool {p}: {e}");
                }
                let why = "the application pool cannot be reached";
                c.then = unavailable(layer, &mut c.out, why, &c.plain, &self.f.stats);
                self.flush(token);
                return;
            }
        };
        let mut first = Vec::new();
        if proxy {
            let fd = c.fd.as_raw_fd();
            if let (Some(client), Some(local)) = (
                sluice_proto::sockaddr::peer(fd),
                sluice_proto::sockaddr::local(fd),
            ) {
                first = crate::relay::proxy_header(client, local);
            }
        }
        first.append(&mut c.plain);
        if let Err(e) = self
            .epoll
            .add(conn.fd.as_raw_fd(), epoll::OUT | epoll::RDHUP, token | UP)
        {
            log::warn!("TLS to socket pool {p}: epoll: {e}");
            self.close(token);
            return;
        }
        let mut up = Upstream::new(upstream::Link::Pool(conn), connected, first);
        up.mask = epoll::OUT | epoll::RDHUP;
        c.up = Some(Box::new(up));
        c.then = Then::Relaying;
        c.deadline = Instant::now() + self.f.idle_timeout;
        TlsStats::add(&self.f.stats.relayed);
        self.pump(token);
    }

    /// Joins the connection's plaintext to the delivery thread through a socketpair: the
    /// session stays here, and each request goes to its own pool from there.
    fn start_delivery(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let Phase::Open(layer) = &mut c.phase else {
            return;
        };
        let fd = c.fd.as_raw_fd();
        let addresses = sluice_proto::sockaddr::peer(fd).zip(sluice_proto::sockaddr::local(fd));
        let pair = crate::delivery::plaintext_pair();
        let (Some(delivery), Some((peer, local)), Ok((ours, theirs))) =
            (self.f.delivery.as_ref(), addresses, pair)
        else {
            let why = "the application pool cannot be reached";
            c.then = unavailable(layer, &mut c.out, why, &c.plain, &self.f.stats);
            self.flush(token);
            return;
        };
        let first = std::mem::take(&mut c.plain);
        let from = crate::delivery::Origin {
            peer,
            local,
            sni: Some(c.sni.clone()),
        };
        if delivery
            .give_from(theirs, Vec::new(), c.arrival, from)
            .is_err()
        {
            let why = "the application pool cannot be reached";
            c.then = unavailable(layer, &mut c.out, why, &first, &self.f.stats);
            self.flush(token);
            return;
        }
        let link = upstream::Link::Delivery(ours);
        if let Err(e) = self
            .epoll
            .add(link.fd(), epoll::OUT | epoll::RDHUP, token | UP)
        {
            log::warn!("TLS to the delivery thread: epoll: {e}");
            self.close(token);
            return;
        }
        let mut up = Upstream::new(link, true, first);
        up.mask = epoll::OUT | epoll::RDHUP;
        c.up = Some(Box::new(up));
        c.then = Then::Relaying;
        c.deadline = Instant::now() + self.f.idle_timeout;
        TlsStats::add(&self.f.stats.delivered);
        self.pump(token);
    }

    fn on_pool(&mut self, token: u64, bits: u32) {
        let Some(up) = self.conns.get_mut(&token).and_then(|c| c.up.as_mut()) else {
            return;
        };
        if !up.connected && bits & (epoll::OUT | epoll::ENDED) != 0 {
            match crate::sockets::connect_result(up.conn.fd()) {
                Ok(()) => up.connected = true,
                Err(e) => {
                    log::warn!("TLS to a socket pool: connecting into its queue: {e}");
                    self.close(token);
                    return;
                }
            }
        }
        // A pool side that is gone is read to its end whatever the client's backlog: its
        // readiness would not go away.
        self.pump_draining(token, bits & epoll::GONE != 0);
    }

    fn pump(&mut self, token: u64) {
        self.pump_draining(token, false);
    }

    /// Moves plaintext both ways between a relayed connection and its pool.
    fn pump_draining(&mut self, token: u64, drain: bool) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let (Phase::Open(layer), Some(up)) = (&mut c.phase, c.up.as_mut()) else {
            return;
        };
        if let Err(e) = up.write() {
            log::debug!("TLS to a socket pool: {e}");
            self.close(token);
            return;
        }
        let pending = c.out.len() - c.sent;
        let room = if drain {
            usize::MAX
        } else {
            WINDOW.saturating_sub(pending)
        };
        let read = if up.ended {
            Ok(upstream::Read::Data)
        } else {
            up.read(room)
        };
        if !up.answer.is_empty() {
            c.deadline = Instant::now() + self.f.idle_timeout;
            let sealed = layer.seal(&up.answer, &mut c.out);
            up.answer.clear();
            if let Err(e) = sealed {
                log::debug!("TLS to a socket pool: {e}");
                self.close(token);
                return;
            }
        }
        match read {
            Ok(upstream::Read::Data) => {}
            Ok(upstream::Read::Ended) => {
                // The server closed: the client gets the rest and our close_notify; the
                // pool's side leaves the set (it would stay readable).
                self.epoll.delete(up.conn.fd());
                let _ = layer.seal_alert(0, &mut c.out);
                c.then = Then::Close;
            }
            Err(e) => {
                log::debug!("TLS to a socket pool: {e}");
                self.close(token);
                return;
            }
        }
        self.settle(token);
        self.flush(token);
    }
}

/// Seals the refusal and close_notify; returns what comes next and the body's length.
/// 503 over the session to the request at the start of `plain`, then close.
fn unavailable(
    layer: &mut RecordLayer,
    out: &mut Vec<u8>,
    why: &str,
    plain: &[u8],
    stats: &TlsStats,
) -> Then {
    refuse(layer, out, 503, why, is_head(plain), stats).0
}

fn refuse(
    layer: &mut RecordLayer,
    out: &mut Vec<u8>,
    code: u16,
    why: &str,
    head_only: bool,
    stats: &TlsStats,
) -> (Then, u64) {
    TlsStats::add(&stats.refused);
    let answer = crate::answers::refusal(code, why, head_only);
    if layer.seal(&answer, out).is_ok() {
        let _ = layer.seal_alert(0, out);
    }
    (Then::Close, body_len(&answer))
}
