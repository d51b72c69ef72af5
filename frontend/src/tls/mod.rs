//! HTTPS: the front end's TLS listeners. Loops of their own, one per core (`[server]
//! threads`; handshakes cost CPU the dispatcher's loop must not wait for), accept on
//! `listen_tls` (each listener in every loop's epoll with `EPOLLEXCLUSIVE`, so the kernel
//! wakes one loop per connection and no lock is shared), runs the handshake with
//! rustls (`handshake`), takes the session's keys out, and from then on reads and writes
//! records with the same record layer the workers run (`sluice_tls`). Each request head is
//! judged by the dispatcher's rules: answered from the cache over the session, refused, or
//! handed with the session's keys to the pool's worker, which serves the connection itself.
//! Workers hand a TLS connection back the same way (through the dispatcher, which passes it
//! here), with the session as it stands.

pub mod certs;
mod event_loop;
mod handshake;
mod upstream;

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc,
    },
    time::Duration,
};

pub use event_loop::HAND_OVER_WAIT;
pub use handshake::Secrets;

use crate::held::Held;
use crate::pipeline::head::Limits;
use crate::status::TlsStatus;
use crate::table::{PoolFlags, SharedTable};

/// Figures for status and metrics.
#[derive(Debug, Default)]
pub struct TlsStats {
    pub accepted: AtomicU64,
    pub handshakes: AtomicU64,
    pub handshake_failures: AtomicU64,
    /// Sessions handed to a pool's worker with their keys.
    pub handed_off: AtomicU64,
    pub cache_answers: AtomicU64,
    /// Requests refused over TLS (421 for a Host other than the SNI name among them).
    pub refused: AtomicU64,
    /// Sessions a worker handed back.
    pub handed_back: AtomicU64,
    /// Connections joined to a socket pool (plaintext to it, sealed back).
    pub relayed: AtomicU64,
    /// Sessions of a shared host whose plaintext went to the delivery thread.
    pub delivered: AtomicU64,
    /// Connections for a passthrough pool the kernel did not steer (its ClientHello read
    /// here), relayed to it untouched.
    pub passed_through: AtomicU64,
    /// Connections for a passthrough pool that is stopped, removed or full: closed with a
    /// TLS alert.
    pub passthrough_refused: AtomicU64,
}

/// Everything a TLS loop works with; it owns none of the fds but its connections'.
#[derive(Clone)]
pub struct TlsFront {
    pub listeners: Vec<RawFd>,
    /// The handshakes' configuration: a reload puts a new one here.
    pub config: Arc<Mutex<Arc<rustls::ServerConfig>>>,
    pub secrets: Arc<Secrets>,
    pub table: Arc<SharedTable>,
    pub flags: Arc<PoolFlags>,
    pub cache: Arc<Mutex<crate::cache::Cache>>,
    pub limits: Limits,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub stats: Arc<TlsStats>,
    /// Keeps shared hosts' plaintext and delivers their requests.
    pub delivery: Option<crate::delivery::Delivery>,
    /// Connections into socket pools' queues (None without socket pools).
    pub direct: Option<Arc<crate::direct::Direct>>,
    /// Lines for what the thread answers itself (cache hits, refusals).
    pub access_log: Option<crate::access_log::AccessLog>,
    /// Carries passthrough connections the kernel did not steer to their pool.
    pub relay: Option<crate::relay::Relay>,
    /// Readable (eventfd) when the loop must stop; each loop is given its own
    /// (`Running::stop`).
    pub stop: RawFd,
}

/// The dispatcher's way to pass on a TLS connection a worker handed back: to the next loop,
/// round robin.
#[derive(Clone)]
pub struct Inbox {
    loops: Arc<Vec<InboxOf>>,
    next: Arc<std::sync::atomic::AtomicUsize>,
}

struct InboxOf {
    sender: mpsc::Sender<(Held, Option<crate::table::PoolId>)>,
    wake: Arc<OwnedFd>,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("tls::Inbox")
    }
}

impl Inbox {
    /// `from`: the pool whose worker handed the session back (its name is checked against
    /// what that pool could have been given), or None for the front end's own.
    pub fn send(&self, held: Held, from: Option<crate::table::PoolId>) {
        let i = self.next.fetch_add(1, Relaxed) % self.loops.len().max(1);
        let Some(to) = self.loops.get(i) else {
            return;
        };
        if to.sender.send((held, from)).is_ok() {
            crate::eventfd::signal(to.wake.as_raw_fd(), 1);
        }
    }
}

/// What the TLS loops hold when they stop for an upgrade, for the next program's loops (or
/// these again, if the upgrade cannot happen) to take up.
#[derive(Debug, Default)]
pub struct Carried {
    /// Open sessions, each with its `Session` payload and the plaintext not yet served:
    /// the form a worker's hand-back has.
    pub sessions: Vec<Held>,
    /// Connections whose handshake had not begun, with the bytes they had sent.
    pub fresh: Vec<Held>,
}

impl Carried {
    /// Dealt out over `n` loops, round robin.
    fn deal(self, n: usize) -> Vec<Carried> {
        let mut out: Vec<Carried> = (0..n.max(1)).map(|_| Carried::default()).collect();
        let k = out.len();
        for (i, h) in self.sessions.into_iter().enumerate() {
            out[i % k].sessions.push(h);
        }
        for (i, h) in self.fresh.into_iter().enumerate() {
            out[i % k].fresh.push(h);
        }
        out
    }

    fn join(&mut self, other: Carried) {
        self.sessions.extend(other.sessions);
        self.fresh.extend(other.fresh);
    }
}

/// The TLS loops once they have stopped: to run again, and what they handed over.
pub struct Stopped {
    lps: Vec<(OwnedFd, Box<event_loop::Loop>)>,
    pub carried: Carried,
    /// Connections cut at the stop (relays to socket pools, handshakes that did not end in
    /// time).
    pub cut: usize,
}

impl Stopped {
    /// Sessions the dispatcher passed on before it stopped, not yet taken up: carried too.
    pub fn take_handed_back(&mut self) {
        for (_, lp) in &self.lps {
            self.carried.sessions.extend(lp.inbox_left());
        }
    }
}

/// The running TLS loops.
pub struct Running {
    loops: Vec<(
        OwnedFd,
        std::thread::JoinHandle<(Box<event_loop::Loop>, Carried, usize)>,
    )>,
}

impl Running {
    /// Tells every loop how to stop, waits for each and gathers what they hand over; None
    /// if a loop panicked.
    pub fn stop(self, how: crate::held::Stop) -> Option<Stopped> {
        for (stop, _) in &self.loops {
            how.send(stop.as_raw_fd());
        }
        let mut stopped = Stopped {
            lps: Vec::new(),
            carried: Carried::default(),
            cut: 0,
        };
        let mut whole = true;
        for (stop, thread) in self.loops {
            match thread.join() {
                Ok((lp, carried, cut)) => {
                    stopped.carried.join(carried);
                    stopped.cut += cut;
                    stopped.lps.push((stop, lp));
                }
                Err(_) => {
                    log::error!("a TLS loop panicked");
                    whole = false;
                }
            }
        }
        whole.then_some(stopped)
    }
}

/// Starts `threads` TLS loops, first taking up `carried` (from before an upgrade).
pub fn spawn(front: TlsFront, carried: Carried, threads: usize) -> io::Result<(Inbox, Running)> {
    let mut inboxes = Vec::new();
    let mut lps = Vec::new();
    for _ in 0..threads.max(1) {
        let stop = crate::eventfd::create(true)?;
        let wake = Arc::new(crate::eventfd::create(true)?);
        let (sender, inbox) = mpsc::channel();
        let front = TlsFront {
            stop: stop.as_raw_fd(),
            ..front.clone()
        };
        let lp = event_loop::Loop::new(front, inbox, wake.clone())?;
        lps.push((stop, Box::new(lp)));
        inboxes.push(InboxOf { sender, wake });
    }
    let running = run(lps, carried)?;
    let inbox = Inbox {
        loops: Arc::new(inboxes),
        next: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    };
    Ok((inbox, running))
}

/// Runs stopped TLS loops again (an upgrade that could not happen), with what they carried;
/// the dispatcher's inbox is the same.
pub fn resume(stopped: Stopped) -> io::Result<Running> {
    for (_, lp) in &stopped.lps {
        lp.listen()?;
    }
    run(stopped.lps, stopped.carried)
}

fn run(lps: Vec<(OwnedFd, Box<event_loop::Loop>)>, carried: Carried) -> io::Result<Running> {
    let (sessions, fresh) = (carried.sessions.len(), carried.fresh.len());
    if sessions + fresh > 0 {
        log::info!(
            "TLS: took up {sessions} session(s) and {fresh} connection(s) before their handshake"
        );
    }
    let shares = carried.deal(lps.len());
    let mut loops = Vec::new();
    for (i, ((stop, mut lp), share)) in lps.into_iter().zip(shares).enumerate() {
        let thread = std::thread::Builder::new()
            .name(format!("tls-{i}"))
            .spawn(move || {
                lp.take_up_carried(share);
                let (carried, cut) = match lp.run() {
                    Ok(over) => over.unwrap_or_default(),
                    Err(e) => {
                        log::error!("a TLS loop stopped: {e}");
                        Default::default()
                    }
                };
                (lp, carried, cut)
            })?;
        loops.push((stop, thread));
    }
    Ok(Running { loops })
}

impl TlsStats {
    pub(crate) fn add(n: &AtomicU64) {
        n.fetch_add(1, Relaxed);
    }

    /// The figures, for status and for the next program of an upgrade.
    pub fn snapshot(&self, listen: Vec<String>) -> TlsStatus {
        let n = |c: &AtomicU64| c.load(Relaxed);
        TlsStatus {
            listen,
            accepted: n(&self.accepted),
            handshakes: n(&self.handshakes),
            handshake_failures: n(&self.handshake_failures),
            handed_off: n(&self.handed_off),
            handed_back: n(&self.handed_back),
            cache_answers: n(&self.cache_answers),
            refused: n(&self.refused),
            relayed: n(&self.relayed),
            delivered: n(&self.delivered),
            passed_through: n(&self.passed_through),
            passthrough_refused: n(&self.passthrough_refused),
        }
    }

    /// Goes on from an earlier program's figures.
    pub fn restore(&self, t: &TlsStatus) {
        for (n, v) in [
            (&self.accepted, t.accepted),
            (&self.handshakes, t.handshakes),
            (&self.handshake_failures, t.handshake_failures),
            (&self.handed_off, t.handed_off),
            (&self.handed_back, t.handed_back),
            (&self.cache_answers, t.cache_answers),
            (&self.refused, t.refused),
            (&self.relayed, t.relayed),
            (&self.delivered, t.delivered),
            (&self.passed_through, t.passed_through),
            (&self.passthrough_refused, t.passthrough_refused),
        ] {
            n.store(v, Relaxed);
        }
    }
}
