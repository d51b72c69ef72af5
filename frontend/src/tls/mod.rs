//! HTTPS: the front end's TLS listeners. A thread of its own (handshakes cost CPU the
//! dispatcher's loop must not wait for) accepts on `listen_tls`, runs the handshake with
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

/// Everything the TLS thread works with; it owns none of the fds but its connections'.
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
    /// Readable (eventfd) when the thread must stop.
    pub stop: RawFd,
}

/// The dispatcher's way to pass on a TLS connection a worker handed back.
#[derive(Clone)]
pub struct Inbox {
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
        if self.sender.send((held, from)).is_ok() {
            crate::eventfd::signal(self.wake.as_raw_fd(), 1);
        }
    }
}

/// What the TLS thread holds when it stops for an upgrade, for the next program's TLS thread
/// (or this one's again, if the upgrade cannot happen) to take up.
#[derive(Debug, Default)]
pub struct Carried {
    /// Open sessions, each with its `Session` payload and the plaintext not yet served:
    /// the form a worker's hand-back has.
    pub sessions: Vec<Held>,
    /// Connections whose handshake had not begun, with the bytes they had sent.
    pub fresh: Vec<Held>,
}

/// A TLS thread that has stopped: its loop, to run again, and what it handed over.
pub struct Stopped {
    lp: Box<event_loop::Loop>,
    pub carried: Carried,
    /// Connections cut at the stop (relays to socket pools, handshakes that did not end in
    /// time).
    pub cut: usize,
}

impl Stopped {
    /// Sessions the dispatcher passed on before it stopped, not yet taken up: carried too.
    pub fn take_handed_back(&mut self) {
        self.carried.sessions.extend(self.lp.inbox_left());
    }
}

pub type Thread = std::thread::JoinHandle<Stopped>;

/// Starts the TLS thread, first taking up `carried` (from before an upgrade).
pub fn spawn(front: TlsFront, carried: Carried) -> io::Result<(Inbox, Thread)> {
    let wake = Arc::new(crate::eventfd::create(true)?);
    let (sender, inbox) = mpsc::channel();
    let lp = event_loop::Loop::new(front, inbox, wake.clone())?;
    let thread = run(Box::new(lp), carried)?;
    Ok((Inbox { sender, wake }, thread))
}

/// Runs a stopped TLS thread again (an upgrade that could not happen), with what it carried;
/// the dispatcher's inbox is the same.
pub fn resume(stopped: Stopped) -> io::Result<Thread> {
    stopped.lp.listen()?;
    run(stopped.lp, stopped.carried)
}

fn run(mut lp: Box<event_loop::Loop>, carried: Carried) -> io::Result<Thread> {
    std::thread::Builder::new()
        .name("tls".into())
        .spawn(move || {
            lp.take_up_carried(carried);
            let (carried, cut) = match lp.run() {
                Ok(over) => over.unwrap_or_default(),
                Err(e) => {
                    log::error!("the TLS thread stopped: {e}");
                    Default::default()
                }
            };
            Stopped { lp, carried, cut }
        })
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
