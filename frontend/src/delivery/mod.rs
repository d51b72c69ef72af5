//! Delivery: the front end keeps every connection whose requests may belong to more than
//! one pool (`sluice_proto::ownership::Owner::Shared`) for its whole life and delivers each
//! request to its pool on a channel that carries only that pool's requests for that
//! connection, reading each answer back with its framing parsed. No pool ever holds the
//! client's connection, reads another pool's request, or answers one.
//!
//! Loops of their own on epoll, like the relay, one per core (`[server] threads`): the
//! dispatcher (or the TLS thread) gives a connection to the next loop, round robin, once it
//! has routed the connection's first request to a shared host; from then on the connection
//! is that loop's alone, so nothing on the per-request path is shared between loops but the
//! cache and the counters.

mod conn;
pub mod framing;
mod upstream;

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc,
    },
    time::{Duration, Instant},
};

use sluice_proto::access::Arrival;

use self::conn::{Conn, Cx};
use crate::epoll::{self, Epoll};
use crate::held::Held;
use crate::pipeline::head::Limits;
use crate::pipeline::memo::HeadMemo;
use crate::table::{PoolFlags, SharedTable};

const WAKE: u64 = u64::MAX;

/// Figures for status.
#[derive(Debug)]
pub struct DeliveryStats {
    /// Client connections the front end keeps now.
    pub open: AtomicU64,
    /// Client connections taken since the start.
    pub connections: AtomicU64,
    /// Requests delivered, by pool id.
    pub requests: Vec<AtomicU64>,
    /// Channels opened into pool queues.
    pub channels: AtomicU64,
    /// Channels that could not be opened (answered 503).
    pub failed: AtomicU64,
    /// Answers from pools refused as malformed, or missing (502).
    pub bad_responses: AtomicU64,
    pub cache_answers: AtomicU64,
    pub refused: AtomicU64,
    pub timeouts: AtomicU64,
}

impl DeliveryStats {
    fn new() -> DeliveryStats {
        DeliveryStats {
            open: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            requests: (0..sluice_common::MAX_POOLS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            channels: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            bad_responses: AtomicU64::new(0),
            cache_answers: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
        }
    }

    /// Requests delivered to pool `index`.
    pub fn delivered(&self, index: usize) -> u64 {
        self.requests.get(index).map_or(0, |n| n.load(Relaxed))
    }
}

/// What the delivery loops share with the rest of the front end.
#[derive(Clone)]
pub struct Shared {
    pub table: Arc<SharedTable>,
    pub flags: Arc<PoolFlags>,
    pub cache: Arc<Mutex<crate::cache::Cache>>,
    pub limits: Limits,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub direct: Option<Arc<crate::direct::Direct>>,
    pub access_log: Option<crate::access_log::AccessLog>,
    pub stats: Arc<DeliveryStats>,
}

enum Job {
    Conn {
        client: OwnedFd,
        bytes: Vec<u8>,
        arrival: Arrival,
        origin: Option<Origin>,
    },
    /// An upgrade: hand every connection over between requests (see `Delivery::hand_over`).
    HandOver(mpsc::Sender<Vec<Held>>),
}

/// Where a connection that is not the client's own socket comes from: the TLS thread's
/// plaintext of a session it keeps (`plaintext_pair`).
#[derive(Debug, Clone)]
pub struct Origin {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// A TLS session's SNI name (empty when its ClientHello named none): a request for
    /// another host is answered 421. None for a plain connection.
    pub sni: Option<String>,
}

/// A stream socketpair, both ends non-blocking: a TLS session's plaintext (the TLS thread's
/// end, the delivery thread's) and, made blocking on the worker's side, a delivery channel.
pub fn plaintext_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two new fds into the array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just created and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// How long an upgrade waits for answers under way before it cuts them.
pub const HAND_OVER_WAIT: Duration = Duration::from_secs(2);

/// The dispatcher's end: give the delivery thread a connection.
#[derive(Clone)]
pub struct Delivery {
    loops: Arc<Vec<Handle>>,
    /// The loop the next connection goes to (round robin).
    next: Arc<std::sync::atomic::AtomicUsize>,
    pub stats: Arc<DeliveryStats>,
}

/// How a loop is reached: its queue of jobs and the eventfd that wakes it.
struct Handle {
    jobs: mpsc::Sender<Job>,
    wake: Arc<OwnedFd>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Delivery({} loops)", self.loops.len())
    }
}

impl Delivery {
    /// Starts `threads` delivery loops (at least one; `stats` left out: made here).
    pub fn spawn(
        threads: usize,
        make: impl FnOnce(Arc<DeliveryStats>) -> Shared,
    ) -> io::Result<Delivery> {
        let stats = Arc::new(DeliveryStats::new());
        let shared = make(stats.clone());
        let mut loops = Vec::new();
        for i in 0..threads.max(1) {
            let wake = Arc::new(crate::eventfd::create(true)?);
            let epoll = Epoll::new()?;
            epoll.add(wake.as_raw_fd(), epoll::IN, WAKE)?;
            let (tx, rx) = mpsc::channel();
            let lp = Loop {
                epoll,
                wake: wake.clone(),
                jobs: rx,
                shared: shared.clone(),
                conns: HashMap::new(),
                next: 0,
                handing: None,
                memo: HeadMemo::default(),
            };
            std::thread::Builder::new()
                .name(format!("sluice-delivery-{i}"))
                .spawn(move || lp.run())?;
            loops.push(Handle { jobs: tx, wake });
        }
        Ok(Delivery {
            loops: Arc::new(loops),
            next: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            stats,
        })
    }

    /// Keeps `client`, of which `bytes` were read (its first request's head at least).
    /// Err if the thread is gone.
    pub fn give(&self, client: OwnedFd, bytes: Vec<u8>, arrival: Arrival) -> Result<(), ()> {
        self.send(Job::Conn {
            client,
            bytes,
            arrival,
            origin: None,
        })
    }

    /// Keeps a stream that stands for a client's connection (a TLS session's plaintext).
    pub fn give_from(
        &self,
        stream: OwnedFd,
        bytes: Vec<u8>,
        arrival: Arrival,
        origin: Origin,
    ) -> Result<(), ()> {
        self.send(Job::Conn {
            client: stream,
            bytes,
            arrival,
            origin: Some(origin),
        })
    }

    /// How many loops deliver.
    pub fn loops(&self) -> usize {
        self.loops.len()
    }

    /// Gives `job` to the next loop.
    fn send(&self, job: Job) -> Result<(), ()> {
        let i = self.next.fetch_add(1, Relaxed) % self.loops.len().max(1);
        let handle = self.loops.get(i).ok_or(())?;
        handle.send(job)
    }

    /// For an upgrade: every loop stops reading requests, finishes the answers under way
    /// (at most `HAND_OVER_WAIT`, all loops at once), and returns every connection between
    /// requests with the bytes it read of the next one; what is still in an answer then is
    /// cut. The loops serve on (empty), so connections given to them again after a failed
    /// exec are served.
    pub fn hand_over(&self) -> Vec<Held> {
        let asked: Vec<_> = self
            .loops
            .iter()
            .filter_map(|h| {
                let (tx, rx) = mpsc::channel();
                h.send(Job::HandOver(tx)).ok().map(|()| rx)
            })
            .collect();
        let until = Instant::now() + HAND_OVER_WAIT + Duration::from_secs(3);
        let mut held = Vec::new();
        for rx in asked {
            let left = until.saturating_duration_since(Instant::now());
            held.extend(rx.recv_timeout(left).unwrap_or_default());
        }
        held
    }
}

impl Handle {
    fn send(&self, job: Job) -> Result<(), ()> {
        self.jobs.send(job).map_err(|_| ())?;
        crate::eventfd::signal(self.wake.as_raw_fd(), 1);
        Ok(())
    }
}

struct Loop {
    epoll: Epoll,
    wake: Arc<OwnedFd>,
    jobs: mpsc::Receiver<Job>,
    shared: Shared,
    conns: HashMap<u64, Conn>,
    next: u64,
    /// An upgrade is taking the connections: until when, and where they go.
    handing: Option<(Instant, mpsc::Sender<Vec<Held>>, Vec<Held>)>,
    /// Heads the cache answered (`pipeline::memo`).
    memo: HeadMemo,
}

impl Loop {
    fn run(mut self) {
        let mut last_expiry = Instant::now();
        loop {
            let timeout = if self.handing.is_some() { 20 } else { 1000 };
            let n = match self.epoll.wait(timeout) {
                Ok(n) => n,
                Err(e) => {
                    log::error!("delivery: epoll_wait: {e}");
                    return;
                }
            };
            let (generation, table) = self.shared.table.current();
            self.memo.under(generation);
            let now = Instant::now();
            for i in 0..n {
                let (token, bits) = self.epoll.ready(i);
                if token == WAKE {
                    crate::eventfd::take(self.wake.as_raw_fd());
                    if !self.take_jobs(&table, now) {
                        return;
                    }
                } else {
                    let readable = bits & (epoll::IN | epoll::ENDED) != 0;
                    if let Some(c) = self.conns.get_mut(&(token >> 1)).filter(|_| readable) {
                        // Which side has news: only that one is read again.
                        if token & 1 == 0 {
                            c.client_ready = true;
                        } else {
                            c.up_ready = true;
                        }
                    }
                    self.step(token >> 1, &table, now);
                }
            }
            if self.handing.is_some() {
                self.hand_over_step(now);
            }
            if now.duration_since(last_expiry) >= Duration::from_millis(500) {
                last_expiry = now;
                self.expire(now);
            }
        }
    }

    /// Takes every connection that is between requests; once none is left, or the wait is
    /// over (the rest are cut), sends them on.
    fn hand_over_step(&mut self, now: Instant) {
        let ready: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.carriable())
            .map(|(&id, _)| id)
            .collect();
        for id in ready {
            if let Some(c) = self.conns.remove(&id) {
                self.shared.stats.open.fetch_sub(1, Relaxed);
                // The fd lives on in the next program: out of this epoll set first.
                self.epoll.delete(c.client.as_raw_fd());
                if let Some((_, _, held)) = self.handing.as_mut() {
                    held.push(c.into_held());
                }
            }
        }
        let over = self
            .handing
            .as_ref()
            .is_some_and(|(until, _, _)| self.conns.is_empty() || now >= *until);
        if over {
            if let Some((_, reply, held)) = self.handing.take() {
                let cut = self.conns.len();
                if cut > 0 {
                    log::warn!("upgrading: {cut} kept connection(s) still in an answer are cut");
                }
                for id in self.conns.keys().copied().collect::<Vec<_>>() {
                    self.close(id);
                }
                log::info!("upgrading: {} kept connection(s) handed over", held.len());
                let _ = reply.send(held);
            }
        }
    }

    /// False once the dispatcher is gone (the front end is stopping).
    fn take_jobs(&mut self, table: &crate::table::Table, now: Instant) -> bool {
        loop {
            match self.jobs.try_recv() {
                Ok(Job::Conn {
                    client,
                    bytes,
                    arrival,
                    origin,
                }) => self.start(client, bytes, arrival, origin, table, now),
                Ok(Job::HandOver(reply)) => {
                    self.handing = Some((now + HAND_OVER_WAIT, reply, Vec::new()));
                    self.hand_over_step(now);
                }
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn start(
        &mut self,
        client: OwnedFd,
        bytes: Vec<u8>,
        arrival: Arrival,
        origin: Option<Origin>,
        table: &crate::table::Table,
        now: Instant,
    ) {
        let fd = client.as_raw_fd();
        let origin = origin.or_else(|| {
            Some(Origin {
                peer: sluice_proto::sockaddr::peer(fd)?,
                local: sluice_proto::sockaddr::local(fd)?,
                sni: None,
            })
        });
        let Some(origin) = origin else {
            // The client is gone already.
            return;
        };
        epoll::set_nonblocking(fd, true);
        let id = self.next;
        self.next += 1;
        let events = epoll::IN | epoll::OUT | epoll::RDHUP | libc::EPOLLET as u32;
        if let Err(e) = self.epoll.add(fd, events, id << 1) {
            log::warn!("delivery: epoll: {e}");
            return;
        }
        let conn = Conn::new(
            client,
            bytes,
            arrival,
            Origin {
                peer: unmap(origin.peer),
                local: unmap(origin.local),
                sni: origin.sni,
            },
            now,
            self.shared.header_timeout,
        );
        self.shared.stats.connections.fetch_add(1, Relaxed);
        self.shared.stats.open.fetch_add(1, Relaxed);
        self.conns.insert(id, conn);
        self.step(id, table, now);
    }

    fn step(&mut self, id: u64, table: &crate::table::Table, now: Instant) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let epoll = &self.epoll;
        let mut watch = |fd| {
            let events = epoll::IN | epoll::OUT | epoll::RDHUP | libc::EPOLLET as u32;
            epoll.add(fd, events, id << 1 | 1)
        };
        let mut cx = Cx {
            shared: &self.shared,
            table,
            now,
            holding: self.handing.is_some(),
            watch: &mut watch,
            memo: &mut self.memo,
        };
        if conn.drive(&mut cx).is_err() {
            self.close(id);
        }
    }

    fn close(&mut self, id: u64) {
        if self.conns.remove(&id).is_some() {
            // Closing the fds takes them out of the epoll set: no other process holds the
            // client's fd or our ends of the channels.
            self.shared.stats.open.fetch_sub(1, Relaxed);
        }
    }

    fn expire(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| now > c.deadline)
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            if let Some(c) = self.conns.get_mut(&id) {
                c.expire(&self.shared.stats);
            }
            self.close(id);
        }
    }
}

/// An IPv4 client seen on an IPv6 socket is an IPv4 client.
fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        a => a,
    }
}
