//! The TLS thread's epoll loop. Each connection goes: handshake (rustls) → open (our record
//! layer, one request head at a time) → handed to its pool, or closed after its answer.

use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use sluice_proto::{access::Arrival, handoff};
use sluice_tls::{Opened, RecordLayer, Session};

use super::{
    TlsFront, TlsStats,
    handshake::{Handshake, Step},
};
use crate::cache::{Keep, Lookup};
use crate::dispatcher::{
    Held, PoolId,
    head::{self, Decision},
    reply,
};
use crate::epoll::{self, Epoll, set_nonblocking};

const WAKE: u64 = u64::MAX;
const STOP: u64 = u64::MAX - 1;
/// Listener tokens: LISTENER + index.
const LISTENER: u64 = 1 << 48;
/// Most ciphertext read ahead of the record being opened.
const MAX_INPUT: usize = 2 * sluice_tls::MAX_RECORD;
/// How long a connection answered and closing may take to read the rest of what it sent.
const LINGER: Duration = Duration::from_secs(2);

enum Phase {
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
    /// EPOLLOUT is in the interest set.
    writing: bool,
}

pub struct Loop {
    f: TlsFront,
    epoll: Epoll,
    conns: HashMap<u64, Conn>,
    next_token: u64,
    inbox: mpsc::Receiver<Held>,
    wake: Arc<OwnedFd>,
}

impl Loop {
    pub fn new(f: TlsFront, inbox: mpsc::Receiver<Held>, wake: Arc<OwnedFd>) -> io::Result<Loop> {
        let lp = Loop {
            f,
            epoll: Epoll::new()?,
            conns: HashMap::new(),
            next_token: 0,
            inbox,
            wake,
        };
        for (i, &fd) in lp.f.listeners.iter().enumerate() {
            // Accepted until EAGAIN on each readiness: the listener must not block.
            set_nonblocking(fd, true);
            lp.epoll.add(fd, epoll::IN, LISTENER + i as u64)?;
        }
        lp.epoll.add(lp.wake.as_raw_fd(), epoll::IN, WAKE)?;
        lp.epoll.add(lp.f.stop, epoll::IN, STOP)?;
        Ok(lp)
    }

    pub fn run(&mut self) -> io::Result<()> {
        let mut next_tick = Instant::now() + Duration::from_secs(1);
        loop {
            let n = self.epoll.wait(1000)?;
            for i in 0..n {
                let (token, bits) = self.epoll.ready(i);
                match token {
                    STOP => return Ok(()),
                    WAKE => self.take_up(),
                    t if t >= LISTENER => self.accept((t - LISTENER) as usize),
                    t => self.on_event(t, bits),
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + Duration::from_secs(1);
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
        }
    }

    fn accept(&mut self, index: usize) {
        let Some(&listener) = self.f.listeners.get(index) else {
            return;
        };
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
            let config = match self.f.config.lock() {
                Ok(c) => c.clone(),
                Err(p) => p.into_inner().clone(),
            };
            let handshake = match Handshake::new(config) {
                Ok(h) => h,
                Err(e) => {
                    log::warn!("TLS: cannot start a handshake: {e}");
                    continue;
                }
            };
            let conn = Conn {
                fd,
                phase: Phase::Handshake(Box::new(handshake)),
                input: Vec::new(),
                plain: Vec::new(),
                out: Vec::new(),
                sent: 0,
                then: Then::Serve,
                sni: String::new(),
                deadline: Instant::now() + self.f.header_timeout,
                arrival: Arrival::Dispatcher,
                local: None,
                writing: false,
            };
            self.add(conn);
        }
    }

    fn add(&mut self, conn: Conn) -> Option<u64> {
        self.next_token += 1;
        let token = self.next_token;
        let events = epoll::IN | epoll::RDHUP;
        if let Err(e) = self.epoll.add(conn.fd.as_raw_fd(), events, token) {
            log::warn!("TLS: epoll: {e}");
            return None;
        }
        self.conns.insert(token, conn);
        Some(token)
    }

    /// Sessions workers handed back, passed on by the dispatcher.
    fn take_up(&mut self) {
        let mut count = [0u8; 8];
        // SAFETY: reads 8 bytes into a live buffer from our eventfd.
        unsafe { libc::read(self.wake.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
        while let Ok(held) = self.inbox.try_recv() {
            TlsStats::add(&self.f.stats.handed_back);
            let (session, plain) = match Session::decode(&held.bytes) {
                Ok((s, rest)) => (s, rest.to_vec()),
                Err(e) => {
                    log::warn!("a TLS connection handed back: {e}; closed");
                    continue;
                }
            };
            let layer = match RecordLayer::new(&session) {
                Ok(l) => l,
                Err(e) => {
                    log::warn!("a TLS connection handed back: {e}; closed");
                    continue;
                }
            };
            set_nonblocking(held.fd.as_raw_fd(), true);
            let conn = Conn {
                fd: held.fd,
                phase: Phase::Open(Box::new(layer)),
                input: session.pending,
                plain,
                out: Vec::new(),
                sent: 0,
                then: Then::Serve,
                sni: session.server_name,
                deadline: Instant::now() + self.f.header_timeout,
                arrival: held.arrival,
                local: None,
                writing: false,
            };
            if let Some(t) = self.add(conn) {
                self.drive(t);
            }
        }
    }

    fn on_event(&mut self, token: u64, bits: u32) {
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
            let start = c.input.len();
            c.input.resize(start + 16 * 1024, 0);
            // SAFETY: reads into the live, just-grown tail of the input buffer.
            let n = unsafe {
                libc::recv(
                    c.fd.as_raw_fd(),
                    c.input[start..].as_mut_ptr().cast(),
                    16 * 1024,
                    0,
                )
            };
            c.input.truncate(start + n.max(0) as usize);
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
        if c.then != Then::Serve {
            return;
        }
        let Phase::Open(layer) = &mut c.phase else {
            return;
        };
        let mut at = 0;
        let mut failed = None;
        let mut peer_closed = false;
        loop {
            match layer.open(&mut c.input[at..]) {
                Ok(None) => break,
                Ok(Some((n, opened))) => {
                    match opened {
                        Opened::Data(r) => c
                            .plain
                            .extend_from_slice(&c.input[at + r.start..at + r.end]),
                        Opened::Alert { .. } => peer_closed = true,
                        Opened::KeyUpdate { requested } => {
                            if requested {
                                if let Err(e) = layer.seal_key_update(&mut c.out) {
                                    failed = Some(e);
                                }
                            }
                        }
                        Opened::Handshake(_) => {
                            failed = Some(sluice_tls::RecordError::Unexpected(
                                sluice_tls::CONTENT_HANDSHAKE,
                            ))
                        }
                    }
                    at += n;
                    if peer_closed || failed.is_some() {
                        break;
                    }
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        c.input.drain(..at);
        if let Some(e) = failed {
            log::debug!("a TLS connection: {e}");
            let _ = layer.seal_alert(e.alert(), &mut c.out);
            c.then = Then::Close;
            return;
        }
        if peer_closed {
            let _ = layer.seal_alert(0, &mut c.out);
            c.then = Then::Close;
            return;
        }
        let (table, limits) = (self.f.table.current().1, &self.f.limits);
        if table.routes.has_ip_sites() && c.local.is_none() {
            c.local = sluice_proto::site::local_address_of(c.fd.as_raw_fd());
        }
        while !c.plain.is_empty() {
            let local = c.local.filter(|_| table.routes.has_ip_sites());
            let seen = head::inspect(&c.plain, limits, &table.routes, local);
            let full = c.plain.len() >= limits.max_request_head;
            if seen.decision == Decision::NeedMore && !full {
                break;
            }
            c.deadline = Instant::now() + self.f.header_timeout;
            if !sluice_proto::host::agrees_with_sni(&seen.host, &c.sni) {
                let why = "this connection was made for another host";
                c.then = refuse(layer, &mut c.out, 421, why, &self.f.stats);
                return;
            }
            let answer = seen.cache.as_ref().and_then(|q| {
                let keep = match (seen.close, q.http10) {
                    (true, _) => Keep::Close,
                    (false, true) => Keep::Http10,
                    (false, false) => Keep::Http11,
                };
                let lookup = Lookup {
                    host: &q.host,
                    path: &q.path,
                    accept_encoding: q.accept_encoding,
                    head_only: q.head_only,
                    keep,
                    routed: match seen.decision {
                        Decision::Pool(p) => Some(p),
                        _ => None,
                    },
                };
                self.f.cache.lock().ok()?.answer(&lookup, Instant::now())
            });
            if let Some(bytes) = answer {
                TlsStats::add(&self.f.stats.cache_answers);
                let (close, head_len) = (seen.close, seen.head_len);
                if let Err(e) = layer.seal(&bytes, &mut c.out) {
                    log::debug!("a TLS connection: {e}");
                    c.then = Then::Close;
                    return;
                }
                c.plain.drain(..head_len);
                if close {
                    let _ = layer.seal_alert(0, &mut c.out);
                    c.then = Then::Close;
                    return;
                }
                c.deadline = Instant::now() + self.f.idle_timeout;
                continue;
            }
            match crate::dispatcher::admit(seen.decision, full, &table, &self.f.flags) {
                Decision::Pool(p) if table.pool(p).is_some_and(|e| e.relay) => {
                    let why = "socket pools cannot be reached over TLS yet";
                    c.then = refuse(layer, &mut c.out, 503, why, &self.f.stats);
                }
                Decision::Pool(p) => c.then = Then::HandOff(p),
                Decision::Refuse(code, why) => {
                    c.then = refuse(layer, &mut c.out, code, why, &self.f.stats);
                }
                Decision::NeedMore => {}
            }
            return;
        }
    }

    /// Sends what is sealed; once all of it is out, does what comes next.
    fn flush(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        while c.sent < c.out.len() {
            let rest = &c.out[c.sent..];
            // SAFETY: sends from a live buffer on a connection we own.
            let n = unsafe {
                libc::send(
                    c.fd.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EAGAIN) {
                    if !c.writing {
                        c.writing = true;
                        let _ = interest(&self.epoll, c.fd.as_raw_fd(), token, true);
                    }
                    return;
                }
                self.close(token);
                return;
            }
            c.sent += n as usize;
        }
        c.out.clear();
        c.sent = 0;
        if c.writing {
            c.writing = false;
            let _ = interest(&self.epoll, c.fd.as_raw_fd(), token, false);
        }
        match c.then {
            Then::Serve => {}
            Then::HandOff(p) => self.hand_off(token, p),
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
        let session = layer.session(&c.input, &c.sni);
        let mut payload = Vec::with_capacity(256 + c.input.len() + c.plain.len());
        session.encode(&mut payload);
        payload.extend_from_slice(&c.plain);
        let flags = handoff::routed_flags(c.arrival) | handoff::TLS;
        // Workers get connections as the dispatcher passes them: blocking.
        set_nonblocking(c.fd.as_raw_fd(), false);
        match handoff::send(entry.handoff, c.fd.as_raw_fd(), flags, &payload) {
            Ok(()) => TlsStats::add(&self.f.stats.handed_off),
            Err(e) => {
                log::warn!("handing a TLS connection to pool {p} failed: {e}");
                // Answered 503 over the session instead.
                let why = "the application's queue is full";
                c.then = refuse(layer, &mut c.out, 503, why, &self.f.stats);
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
        }
    }
}

/// What the loop waits for on a connection: always its input, its output while some is
/// left to send.
fn interest(epoll: &Epoll, fd: RawFd, token: u64, writing: bool) -> io::Result<()> {
    let out = if writing { epoll::OUT } else { 0 };
    epoll.modify(fd, epoll::IN | epoll::RDHUP | out, token)
}

/// Seals a refusal and a close_notify; the connection closes once they are sent.
fn refuse(
    layer: &mut RecordLayer,
    out: &mut Vec<u8>,
    code: u16,
    why: &str,
    stats: &TlsStats,
) -> Then {
    TlsStats::add(&stats.refused);
    if layer.seal(&reply(code, why), out).is_ok() {
        let _ = layer.seal_alert(0, out);
    }
    Then::Close
}
