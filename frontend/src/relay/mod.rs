//! The relay: how a connection the front end routed reaches a socket pool. A socket worker
//! takes connections only from its listening sockets, so the relay opens a connection of the
//! front end's own into the pool's queue (`crate::direct`), writes the bytes the dispatcher
//! already read (the request head, and whatever followed it; a PROXY v2 header before them
//! for a `proxy_protocol` pool), then joins the two sockets
//! with splice(2) in both directions until both have ended.
//!
//! It is a thread of its own on epoll: io_uring runs splice on blocking io-wq workers (one
//! kernel thread per waiting direction), while non-blocking splice on readiness costs two
//! syscalls per chunk and no thread.

mod pump;

pub use sluice_proto::proxy::header as proxy_header;

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc,
    },
    time::{Duration, Instant},
};

use self::pump::{Flow, Pump};
use crate::direct::{Direct, DirectConn};
use crate::epoll::{self, Epoll};
use crate::pool::PoolId;

/// How long a relay whose one direction ended may take to end the other.
const HALF_CLOSED_LIMIT: Duration = Duration::from_secs(5);
const WAKE: u64 = u64::MAX;

/// A connection for a socket pool, with what was read of it already.
struct Job {
    client: OwnedFd,
    /// Written to the pool before anything else (a PROXY header, then the request bytes).
    bytes: Vec<u8>,
    pool: PoolId,
    /// Write a PROXY v2 header with the client's address first.
    proxy: bool,
}

/// Figures for status.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Relays running now.
    pub open: AtomicU64,
    /// Relays started since the front end started.
    pub started: AtomicU64,
    /// Connections into a pool's queue that could not be made (answered 503).
    pub failed: AtomicU64,
}

/// The dispatcher's end: give the relay a connection.
#[derive(Clone)]
pub struct Relay {
    jobs: mpsc::Sender<Job>,
    wake: Arc<OwnedFd>,
    pub stats: Arc<RelayStats>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Relay")
    }
}

impl Relay {
    /// Starts the relay thread.
    pub fn spawn(direct: Arc<Direct>) -> io::Result<Relay> {
        let wake = Arc::new(crate::eventfd::create(true)?);
        let epoll = Epoll::new()?;
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(RelayStats::default());
        let lp = Loop {
            epoll,
            wake: wake.clone(),
            jobs: rx,
            direct,
            pairs: HashMap::new(),
            next: 0,
            stats: stats.clone(),
        };
        lp.epoll.add(wake.as_raw_fd(), epoll::IN, WAKE)?;
        std::thread::Builder::new()
            .name("sluice-relay".into())
            .spawn(move || lp.run())?;
        Ok(Relay {
            jobs: tx,
            wake,
            stats,
        })
    }

    /// Joins `client`, with the `bytes` read of it, to pool `pool`, as `table` says the pool
    /// takes connections (a PROXY v2 header first or not). Err if the relay thread is gone.
    pub fn join(
        &self,
        client: OwnedFd,
        bytes: Vec<u8>,
        pool: PoolId,
        table: &crate::table::Table,
    ) -> Result<(), ()> {
        let job = Job {
            client,
            bytes,
            pool,
            proxy: table.pool(pool).is_some_and(|e| e.proxy),
        };
        self.jobs.send(job).map_err(|_| ())?;
        crate::eventfd::signal(self.wake.as_raw_fd(), 1);
        Ok(())
    }
}

struct Pair {
    client: OwnedFd,
    up: DirectConn,
    connected: bool,
    bytes: Vec<u8>,
    sent: usize,
    to_pool: Pump,
    to_client: Pump,
    /// Set when one direction ended.
    half_closed: Option<Instant>,
}

struct Loop {
    epoll: Epoll,
    wake: Arc<OwnedFd>,
    jobs: mpsc::Receiver<Job>,
    direct: Arc<Direct>,
    pairs: HashMap<u64, Pair>,
    next: u64,
    stats: Arc<RelayStats>,
}

impl Loop {
    fn run(mut self) {
        loop {
            let n = match self.epoll.wait(1000) {
                Ok(n) => n,
                Err(e) => {
                    log::error!("relay: epoll_wait: {e}");
                    return;
                }
            };
            for i in 0..n {
                let (token, _) = self.epoll.ready(i);
                if token == WAKE {
                    crate::eventfd::take(self.wake.as_raw_fd());
                    if !self.take_jobs() {
                        return;
                    }
                } else {
                    self.step(token >> 1);
                }
            }
            self.expire(Instant::now());
        }
    }

    /// False once the dispatcher is gone (the front end is stopping).
    fn take_jobs(&mut self) -> bool {
        loop {
            match self.jobs.try_recv() {
                Ok(job) => self.start(job),
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn start(&mut self, mut job: Job) {
        let pool = job.pool;
        if job.proxy {
            let fd = job.client.as_raw_fd();
            match (
                sluice_proto::sockaddr::peer(fd),
                sluice_proto::sockaddr::local(fd),
            ) {
                (Some(client), Some(local)) => {
                    let mut bytes = proxy_header(client, local);
                    bytes.append(&mut job.bytes);
                    job.bytes = bytes;
                }
                _ => {
                    // The client is gone already.
                    return;
                }
            }
        }
        let (up, connected) = match self.direct.open(pool) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("relay to pool {pool}: {e}");
                self.stats.failed.fetch_add(1, Relaxed);
                refuse(job.client.as_raw_fd());
                return;
            }
        };
        let pair = match (Pump::new(), Pump::new()) {
            (Ok(to_pool), Ok(to_client)) => Pair {
                client: job.client,
                up,
                connected,
                bytes: job.bytes,
                sent: 0,
                to_pool,
                to_client,
                half_closed: None,
            },
            (Err(e), _) | (_, Err(e)) => {
                log::warn!("relay to pool {pool}: pipe: {e}");
                self.stats.failed.fetch_add(1, Relaxed);
                refuse(job.client.as_raw_fd());
                return;
            }
        };
        epoll::set_nonblocking(pair.client.as_raw_fd(), true);
        let id = self.next;
        self.next += 1;
        let events = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        if let Err(e) = self
            .epoll
            .add(pair.client.as_raw_fd(), events, id << 1)
            .and_then(|()| self.epoll.add(pair.up.fd.as_raw_fd(), events, id << 1 | 1))
        {
            log::warn!("relay to pool {pool}: epoll: {e}");
            self.stats.failed.fetch_add(1, Relaxed);
            refuse(pair.client.as_raw_fd());
            return;
        }
        self.stats.started.fetch_add(1, Relaxed);
        self.stats.open.fetch_add(1, Relaxed);
        self.pairs.insert(id, pair);
        self.step(id);
    }

    /// Moves whatever can move on relay `id`; closes it when it is over.
    fn step(&mut self, id: u64) {
        let Some(p) = self.pairs.get_mut(&id) else {
            return;
        };
        let over = match advance(p) {
            Ok(over) => over,
            Err(e) => {
                if !p.connected {
                    log::warn!("relay: connecting into the pool's queue: {e}");
                    self.stats.failed.fetch_add(1, Relaxed);
                    refuse(p.client.as_raw_fd());
                } else {
                    log::debug!("relay ended: {e}");
                }
                true
            }
        };
        if over {
            self.close(id);
        }
    }

    fn close(&mut self, id: u64) {
        if self.pairs.remove(&id).is_some() {
            // Closing the fds removes them from the epoll set; dropping the DirectConn its
            // DIRECT entry.
            self.stats.open.fetch_sub(1, Relaxed);
        }
    }

    fn expire(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .pairs
            .iter()
            .filter(|(_, p)| {
                p.half_closed
                    .is_some_and(|t| now.duration_since(t) > HALF_CLOSED_LIMIT)
            })
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            self.close(id);
        }
    }
}

/// One pass over a relay: finish connecting, write the bytes read already, then pump both
/// ways. True when both directions have ended.
fn advance(p: &mut Pair) -> io::Result<bool> {
    let up = p.up.fd.as_raw_fd();
    let client = p.client.as_raw_fd();
    if !p.connected {
        if !crate::sockets::connected(up)? {
            return Ok(false);
        }
        p.connected = true;
    }
    while p.sent < p.bytes.len() {
        let rest = &p.bytes[p.sent..];
        // SAFETY: sends from a live buffer of its length.
        let n = unsafe { libc::send(up, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(false);
            }
            return Err(e);
        }
        p.sent += n as usize;
    }
    if p.sent == p.bytes.len() && !p.bytes.is_empty() {
        p.bytes = Vec::new();
        p.sent = 0;
    }
    let a = p.to_pool.pump(client, up)?;
    let b = p.to_client.pump(up, client)?;
    if (a == Flow::Done || b == Flow::Done) && p.half_closed.is_none() {
        p.half_closed = Some(Instant::now());
    }
    Ok(p.to_pool.done() && p.to_client.done())
}

/// Best effort: the connection could not reach its pool.
fn refuse(fd: RawFd) {
    let answer = crate::answers::refusal(503, "the application pool cannot be reached", false);
    // SAFETY: sends from a live buffer of its length.
    unsafe {
        libc::send(
            fd,
            answer.as_ptr().cast(),
            answer.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
}
