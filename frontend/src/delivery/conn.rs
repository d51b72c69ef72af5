//! One client connection the front end keeps: its requests are judged one at a time
//! (`judge`), each delivered to its pool on that pool's channel for this connection
//! (`upstream`), and each answer read back with its framing parsed (`framing`) and passed
//! on. What a pool writes past the end of its answer ends its channel and never reaches the
//! client.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant},
};

use sluice_proto::access::Arrival;

use super::framing::{self, Framer};
use super::upstream::Upstream;
use super::{DeliveryStats, Shared};
use crate::pipeline::memo::HeadMemo;
use crate::pipeline::{self, Facts, Routed, Rules, Verdict};
use crate::table::PoolId;

/// A source is not read while its destination holds this much unsent.
const HIGH: usize = 256 * 1024;
/// Bytes asked of one read.
const READ: usize = 64 * 1024;
/// How long a closing connection may take to close its side.
const LINGER: Duration = Duration::from_secs(2);

/// Why a connection ends.
type End = ();

enum State {
    /// Waiting for (or judging) the next request head.
    Head,
    Exchange(Exchange),
    /// After a 101: the connection is the pool's, both ways.
    Tunnel {
        up: usize,
        client_done: bool,
    },
    /// Sending the last answer, then closing.
    Closing {
        shut: bool,
    },
}

struct Exchange {
    up: usize,
    pool: PoolId,
    request: Framer,
    /// None until the answer's head is read.
    response: Option<Framer>,
    head_only: bool,
    /// The client closes after this answer.
    close: bool,
    /// The pool closes the channel after this answer.
    channel_closes: bool,
    /// The head of a request without a body: if its channel ends before any answer, it is
    /// judged afresh (its pool may be gone, stopped or closing an idle channel).
    head: Option<Vec<u8>>,
    /// The channel carried a request before this one.
    reused: bool,
}

pub(super) struct Conn {
    pub client: OwnedFd,
    peer: SocketAddr,
    local: SocketAddr,
    /// A TLS session's SNI name: its requests name that host or get 421.
    sni: Option<String>,
    /// Client bytes not yet judged or delivered.
    cin: Vec<u8>,
    /// Bytes for the client not yet sent.
    cout: Vec<u8>,
    csent: usize,
    pub ups: Vec<Upstream>,
    state: State,
    pub deadline: Instant,
    arrival: Arrival,
    /// When the request being judged began (for the access log).
    started: Instant,
    /// The client's side, or a channel's, had an event since its last read came back empty:
    /// only then is it read (edge-triggered readiness; no read is tried on speculation).
    pub client_ready: bool,
    pub up_ready: bool,
}

/// What a connection's step needs from its loop.
pub(super) struct Cx<'a> {
    pub shared: &'a Shared,
    pub table: &'a crate::table::Table,
    pub now: Instant,
    /// An upgrade is taking the connections: no new request is started.
    pub holding: bool,
    /// Registers a new channel's fd for this connection's events.
    pub watch: &'a mut dyn FnMut(RawFd) -> io::Result<()>,
    /// The thread's heads the cache answered (`pipeline::memo`).
    pub memo: &'a mut HeadMemo,
}

enum Read {
    Data,
    Eof,
    Blocked,
}

fn read_into(fd: RawFd, buf: &mut Vec<u8>, max: usize) -> io::Result<Read> {
    if max == 0 {
        return Ok(Read::Blocked);
    }
    buf.reserve(max);
    let spare = buf.spare_capacity_mut();
    let len = spare.len().min(max);
    // SAFETY: reads at most `len` bytes into the vector's spare capacity.
    let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), len, libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(Read::Blocked),
            Some(libc::EINTR) => Ok(Read::Blocked),
            _ => Err(e),
        };
    }
    if n == 0 {
        return Ok(Read::Eof);
    }
    // SAFETY: the kernel initialized `n` bytes past the old length.
    unsafe { buf.set_len(buf.len() + n as usize) };
    Ok(Read::Data)
}

impl Conn {
    pub fn new(
        client: OwnedFd,
        bytes: Vec<u8>,
        arrival: Arrival,
        origin: super::Origin,
        now: Instant,
        header_timeout: Duration,
    ) -> Conn {
        Conn {
            client,
            peer: origin.peer,
            local: origin.local,
            sni: origin.sni,
            cin: bytes,
            cout: Vec::new(),
            csent: 0,
            ups: Vec::new(),
            state: State::Head,
            deadline: now + header_timeout,
            arrival,
            started: now,
            client_ready: true,
            up_ready: false,
        }
    }

    /// Moves whatever can move; Err when the connection is over.
    pub fn drive(&mut self, cx: &mut Cx<'_>) -> Result<(), End> {
        loop {
            let mut progress = self.flush_client()?;
            progress |= self.flush_upstreams(cx)?;
            progress |= match self.state {
                State::Head => self.step_head(cx)?,
                State::Exchange(_) => self.step_exchange(cx)?,
                State::Tunnel { .. } => self.step_tunnel()?,
                State::Closing { .. } => self.step_closing(cx)?,
            };
            if !progress {
                return Ok(());
            }
        }
    }

    /// Between requests with every answer sent: an upgrade may carry it.
    pub fn carriable(&self) -> bool {
        matches!(self.state, State::Head) && self.cout.is_empty()
    }

    /// What an upgrade carries: the client's connection and what was read of its next
    /// request (its channels close).
    pub fn into_held(self) -> crate::held::Held {
        crate::held::Held {
            fd: self.client,
            bytes: self.cin,
            arrival: self.arrival,
        }
    }

    /// The connection's time is up: a head that has begun gets 408 (best effort).
    pub fn expire(&mut self, stats: &DeliveryStats) {
        stats.timeouts.fetch_add(1, Relaxed);
        if matches!(self.state, State::Head) && !self.cin.is_empty() && self.cout.is_empty() {
            let answer = crate::answers::refusal(408, "the request head took too long", false);
            let mut sent = 0;
            let _ = crate::epoll::send_pending(self.client.as_raw_fd(), &answer, &mut sent);
        }
    }

    fn flush_client(&mut self) -> Result<bool, End> {
        if self.csent >= self.cout.len() {
            return Ok(false);
        }
        let before = self.csent;
        match crate::epoll::send_pending(self.client.as_raw_fd(), &self.cout, &mut self.csent) {
            Ok(true) => {
                self.cout.clear();
                self.csent = 0;
                Ok(true)
            }
            Ok(false) => Ok(self.csent > before),
            Err(_) => Err(()),
        }
    }

    fn flush_upstreams(&mut self, cx: &mut Cx<'_>) -> Result<bool, End> {
        let mut progress = false;
        let mut failed = None;
        for (i, up) in self.ups.iter_mut().enumerate() {
            if up.flushed() && up.connected {
                continue;
            }
            let before = (up.sent, up.connected);
            match up.flush() {
                Ok(_) => progress |= (up.sent, up.connected) != before,
                Err(e) => {
                    log::debug!("delivery channel to pool {}: {e}", up.pool);
                    failed = Some(i);
                    break;
                }
            }
        }
        if let Some(i) = failed {
            self.channel_failed(i, cx)?;
            progress = true;
        }
        Ok(progress)
    }

    /// A channel failed: an exchange on it that has had no answer yet gets 502 (or is sent
    /// again on a new channel, once); an idle one is dropped.
    fn channel_failed(&mut self, i: usize, cx: &mut Cx<'_>) -> Result<(), End> {
        let current = match &self.state {
            State::Exchange(x) => x.up == i,
            State::Tunnel { up, .. } => *up == i,
            _ => false,
        };
        if !current {
            self.drop_upstream(i);
            return Ok(());
        }
        if matches!(&self.state, State::Exchange(x) if x.response.is_none()) {
            return self.unanswered(i, cx);
        }
        Err(())
    }

    /// Channel `i` ended before the exchange on it had an answer. A bodiless request is
    /// judged afresh when that can change its fate: its pool was removed (a reload) or
    /// stopped (503), or the channel had carried a request before (the pool may have closed
    /// it as idle just as this one was sent: sent once more, on a new channel). Otherwise the
    /// pool took the request and closed without answering: 502.
    fn unanswered(&mut self, i: usize, cx: &mut Cx<'_>) -> Result<(), End> {
        let State::Exchange(x) = &mut self.state else {
            return Err(());
        };
        let (pool, reused, head) = (x.pool, x.reused, x.head.take());
        let Some(head) = head else {
            return self.bad_gateway(
                cx,
                "the application closed the connection without answering",
            );
        };
        let verdict = self.judge(&head, false, cx);
        if matches!(&verdict, Verdict::Pool(d) if d.pool == pool) && !reused {
            return self.bad_gateway(
                cx,
                "the application closed the connection without answering",
            );
        }
        self.drop_upstream(i);
        let mut input = head;
        input.append(&mut self.cin);
        self.cin = input;
        self.state = State::Head;
        Ok(())
    }

    /// Drops channel `i` (closing it ends the pool's side); indexes after it move down.
    fn drop_upstream(&mut self, i: usize) {
        if i >= self.ups.len() {
            return;
        }
        self.ups.remove(i);
        let fix = |up: &mut usize| {
            if *up > i {
                *up -= 1;
            }
        };
        match &mut self.state {
            State::Exchange(x) => fix(&mut x.up),
            State::Tunnel { up, .. } => fix(up),
            _ => {}
        }
    }

    fn bad_gateway(&mut self, cx: &mut Cx<'_>, why: &'static str) -> Result<(), End> {
        cx.shared.stats.bad_responses.fetch_add(1, Relaxed);
        let mut head_only = false;
        if let State::Exchange(x) = &self.state {
            head_only = x.head_only;
            if x.response.is_some() {
                // Part of the answer is out: the client learns of it by the close.
                return Err(());
            }
            let i = x.up;
            self.drop_upstream(i);
        }
        self.answer_and_close(crate::answers::refusal(502, why, head_only));
        Ok(())
    }

    fn answer_and_close(&mut self, answer: Vec<u8>) {
        self.cout.extend_from_slice(&answer);
        self.state = State::Closing { shut: false };
    }

    /// The channel into `pool` for this connection, opened on first use.
    fn channel(&mut self, pool: PoolId, cx: &mut Cx<'_>) -> Result<usize, End> {
        if let Some(i) = self.ups.iter().position(|u| u.pool == pool) {
            return Ok(i);
        }
        let Some(entry) = cx.table.pool(pool) else {
            return Err(());
        };
        let up = Upstream::open(
            pool,
            entry,
            cx.shared.direct.as_ref(),
            self.peer,
            self.local,
        )
        .and_then(|up| (cx.watch)(up.fd()).map(|()| up));
        match up {
            Ok(up) => {
                cx.shared.stats.channels.fetch_add(1, Relaxed);
                self.ups.push(up);
                Ok(self.ups.len() - 1)
            }
            Err(e) => {
                log::warn!("delivery to pool {}: {e}", entry.name);
                cx.shared.stats.failed.fetch_add(1, Relaxed);
                Err(())
            }
        }
    }

    /// The verdict on the head at the start of `input`, with this connection's facts.
    fn judge(&self, input: &[u8], full: bool, cx: &mut Cx<'_>) -> Verdict {
        let facts = Facts {
            local: Some(sluice_proto::site::local_address(self.local.ip())),
            sni: self.sni.as_deref(),
            tls: self.sni.is_some(),
            kept: true,
            now: cx.now,
        };
        let s = cx.shared;
        let rules = Rules {
            limits: &s.limits,
            table: cx.table,
            generation: cx.memo.generation(),
            flags: &s.flags,
            cache: &s.cache,
        };
        pipeline::judge(input, full, rules, facts, cx.memo)
    }

    fn step_head(&mut self, cx: &mut Cx<'_>) -> Result<bool, End> {
        if !self.cout.is_empty() || cx.holding {
            // The previous answer goes first; during an upgrade's hand-over the next
            // request waits for the next program.
            return Ok(false);
        }
        let mut progress = false;
        let max = cx.shared.limits.max_request_head;
        if !self.cin.is_empty() {
            let full = self.cin.len() >= max;
            let verdict = self.judge(&self.cin, full, cx);
            match verdict {
                Verdict::NeedMore => {}
                Verdict::Cached {
                    answer,
                    head_len,
                    keep,
                    pool,
                } => {
                    cx.shared.stats.cache_answers.fetch_add(1, Relaxed);
                    self.log(cx, 200, crate::access_log::body_len(&answer), pool);
                    self.cout.extend_from_slice(&answer);
                    self.cin.drain(..head_len.min(self.cin.len()));
                    self.started = cx.now;
                    if keep {
                        self.deadline = cx.now + cx.shared.idle_timeout;
                    } else {
                        self.state = State::Closing { shut: false };
                    }
                    return Ok(true);
                }
                Verdict::Refuse {
                    status,
                    why,
                    head_only,
                } => {
                    cx.shared.stats.refused.fetch_add(1, Relaxed);
                    let answer = crate::answers::refusal(status, why, head_only);
                    self.log(cx, status, crate::access_log::body_len(&answer), None);
                    self.answer_and_close(answer);
                    return Ok(true);
                }
                Verdict::Redirect { answer } => {
                    self.log(cx, 308, crate::access_log::body_len(&answer), None);
                    self.answer_and_close(answer);
                    return Ok(true);
                }
                Verdict::Pool(d) => {
                    self.start_exchange(d, cx)?;
                    return Ok(true);
                }
            }
        }
        if !self.client_ready {
            return Ok(progress);
        }
        let was_empty = self.cin.is_empty();
        let room = max.saturating_sub(self.cin.len());
        match read_into(self.client.as_raw_fd(), &mut self.cin, room) {
            Ok(Read::Data) => {
                if was_empty {
                    self.started = cx.now;
                    self.deadline = cx.now + cx.shared.header_timeout;
                }
                progress = true;
            }
            Ok(Read::Eof) | Err(_) => return Err(()),
            Ok(Read::Blocked) => self.client_ready = false,
        }
        Ok(progress)
    }

    fn start_exchange(&mut self, d: Routed, cx: &mut Cx<'_>) -> Result<(), End> {
        let i = match self.channel(d.pool, cx) {
            Ok(i) => i,
            Err(()) => {
                let answer = crate::answers::refusal(
                    503,
                    "the application pool cannot be reached",
                    d.head_only,
                );
                self.answer_and_close(answer);
                return Ok(());
            }
        };
        let head_len = d.head_len.min(self.cin.len());
        let up = &mut self.ups[i];
        let reused = up.used > 0;
        let head = (d.framing == sluice_proto::request::Framing::None)
            .then(|| self.cin[..head_len].to_vec());
        up.out.extend_from_slice(&self.cin[..head_len]);
        up.used += 1;
        self.cin.drain(..head_len);
        if let Some(n) = cx.shared.stats.requests.get(d.pool.index()) {
            n.fetch_add(1, Relaxed);
        }
        self.deadline = cx.now + cx.shared.idle_timeout;
        self.state = State::Exchange(Exchange {
            up: i,
            pool: d.pool,
            request: Framer::request(d.framing),
            response: None,
            head_only: d.head_only,
            close: d.close || d.upgrade,
            channel_closes: false,
            head,
            reused,
        });
        Ok(())
    }

    fn step_exchange(&mut self, cx: &mut Cx<'_>) -> Result<bool, End> {
        let State::Exchange(x) = &mut self.state else {
            return Ok(false);
        };
        let i = x.up;
        let Some(up) = self.ups.get_mut(i) else {
            return Err(());
        };
        let mut progress = false;
        // The request's body, client -> pool.
        if !x.request.done() {
            if !self.cin.is_empty() && up.out.len() < HIGH {
                let n = x.request.advance(&self.cin).map_err(|_| ())?;
                up.out.extend_from_slice(&self.cin[..n]);
                self.cin.drain(..n);
                progress |= n > 0;
            }
            if self.client_ready && self.cin.is_empty() && up.out.len() < HIGH && !x.request.done()
            {
                match read_into(self.client.as_raw_fd(), &mut self.cin, READ) {
                    Ok(Read::Data) => progress = true,
                    // The client is gone before its request ended.
                    Ok(Read::Eof) | Err(_) => return Err(()),
                    Ok(Read::Blocked) => self.client_ready = false,
                }
            }
        }
        // The answer, pool -> client.
        let mut ended = false;
        if self.up_ready && self.cout.len() < HIGH {
            match read_into(up.fd(), &mut up.input, READ) {
                Ok(Read::Data) => progress = true,
                Ok(Read::Blocked) => self.up_ready = false,
                Ok(Read::Eof) | Err(_) => ended = true,
            }
        }
        let mut complete = false;
        loop {
            match &mut x.response {
                None => match framing::response_head(&up.input, x.head_only) {
                    Ok(None) => break,
                    Err(bad) => {
                        log::warn!("pool {}: {bad}; answered 502", up.pool);
                        self.bad_gateway(cx, "the application's answer was malformed")?;
                        return Ok(true);
                    }
                    Ok(Some(h)) => {
                        self.cout.extend_from_slice(&up.input[..h.head_len]);
                        up.input.drain(..h.head_len);
                        progress = true;
                        if h.interim {
                            continue;
                        }
                        if h.upgrade {
                            // The rest is the pool's protocol, both ways.
                            self.cout.append(&mut up.input);
                            let pending = std::mem::take(&mut self.cin);
                            up.out.extend_from_slice(&pending);
                            self.state = State::Tunnel {
                                up: i,
                                client_done: false,
                            };
                            return Ok(true);
                        }
                        // The channel ends after this answer; the client's connection
                        // need not, unless the answer's end is the channel's close.
                        x.channel_closes = h.close;
                        if h.body == Framer::UntilClose {
                            x.close = true;
                        }
                        x.response = Some(h.body);
                        x.head = None;
                    }
                },
                Some(body) => {
                    let n = match body.advance(&up.input) {
                        Ok(n) => n,
                        Err(e) => {
                            log::warn!("pool {}: {e}", up.pool);
                            return Err(());
                        }
                    };
                    self.cout.extend_from_slice(&up.input[..n]);
                    up.input.drain(..n);
                    progress |= n > 0;
                    if body.done() {
                        complete = true;
                    } else if ended && *body == Framer::UntilClose {
                        complete = true;
                    }
                    break;
                }
            }
        }
        if !complete {
            if ended {
                if x.response.is_none() {
                    self.unanswered(i, cx)?;
                    return Ok(true);
                }
                // The answer was cut short: so is the client's connection.
                return Err(());
            }
            if progress {
                self.deadline = cx.now + cx.shared.idle_timeout;
            }
            return Ok(progress);
        }
        // The answer is complete.
        let extra = !up.input.is_empty();
        if extra {
            log::warn!(
                "pool {} wrote past the end of its answer; the rest is dropped and the channel closed",
                up.pool
            );
        }
        let drop_channel = extra || ended || x.channel_closes;
        let body_left = !x.request.done();
        let close = x.close || body_left;
        if drop_channel {
            self.drop_upstream(i);
        }
        self.deadline = cx.now + cx.shared.idle_timeout;
        self.started = cx.now;
        self.state = if close {
            State::Closing { shut: false }
        } else {
            State::Head
        };
        Ok(true)
    }

    fn step_tunnel(&mut self) -> Result<bool, End> {
        let State::Tunnel { up: i, client_done } = &mut self.state else {
            return Ok(false);
        };
        let Some(up) = self.ups.get_mut(*i) else {
            return Err(());
        };
        let mut progress = false;
        if !*client_done && up.out.len() < HIGH {
            match read_into(self.client.as_raw_fd(), &mut up.out, READ) {
                Ok(Read::Data) => progress = true,
                Ok(Read::Blocked) => {}
                Ok(Read::Eof) | Err(_) => {
                    *client_done = true;
                    if up.flushed() {
                        // SAFETY: shutdown(2) on a socket we own.
                        unsafe { libc::shutdown(up.fd(), libc::SHUT_WR) };
                    }
                    progress = true;
                }
            }
        }
        if self.cout.len() < HIGH {
            match read_into(up.fd(), &mut self.cout, READ) {
                Ok(Read::Data) => progress = true,
                Ok(Read::Blocked) => {}
                Ok(Read::Eof) | Err(_) => {
                    self.state = State::Closing { shut: false };
                    return Ok(true);
                }
            }
        }
        Ok(progress)
    }

    fn step_closing(&mut self, cx: &mut Cx<'_>) -> Result<bool, End> {
        let State::Closing { shut } = &mut self.state else {
            return Ok(false);
        };
        if !self.cout.is_empty() {
            return Ok(false);
        }
        if !*shut {
            *shut = true;
            // SAFETY: shutdown(2) on a socket we own.
            unsafe { libc::shutdown(self.client.as_raw_fd(), libc::SHUT_WR) };
            self.deadline = cx.now + LINGER;
            self.ups.clear();
        }
        // Read what the client still sends until it closes, so our close sends no reset
        // that could destroy the answer in flight.
        let mut sink = Vec::new();
        loop {
            sink.clear();
            match read_into(self.client.as_raw_fd(), &mut sink, READ) {
                Ok(Read::Data) => continue,
                Ok(Read::Blocked) => return Ok(false),
                Ok(Read::Eof) | Err(_) => return Err(()),
            }
        }
    }

    fn log(&self, cx: &Cx<'_>, status: u16, bytes: u64, pool: Option<PoolId>) {
        let Some(log) = &cx.shared.access_log else {
            return;
        };
        log.answered(crate::access_log::Answered {
            fd: self.client.as_raw_fd(),
            head: &self.cin,
            status,
            bytes,
            duration: cx.now.saturating_duration_since(self.started),
            arrival: self.arrival,
            pool: pool.and_then(|p| cx.table.pool(p).map(|e| e.name.clone())),
        });
    }
}
