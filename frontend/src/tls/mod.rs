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

pub use handshake::Secrets;

use crate::dispatcher::{Held, PoolFlags, SharedTable, head::Limits};

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
    sender: mpsc::Sender<Held>,
    wake: Arc<OwnedFd>,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("tls::Inbox")
    }
}

impl Inbox {
    pub fn send(&self, held: Held) {
        if self.sender.send(held).is_ok() {
            crate::eventfd::signal(self.wake.as_raw_fd(), 1);
        }
    }
}

/// Starts the TLS thread.
pub fn spawn(front: TlsFront) -> io::Result<(Inbox, std::thread::JoinHandle<()>)> {
    let wake = Arc::new(crate::eventfd::create(true)?);
    let (sender, inbox) = mpsc::channel();
    let mut lp = event_loop::Loop::new(front, inbox, wake.clone())?;
    let thread = std::thread::Builder::new()
        .name("tls".into())
        .spawn(move || {
            if let Err(e) = lp.run() {
                log::error!("the TLS thread stopped: {e}");
            }
        })?;
    Ok((Inbox { sender, wake }, thread))
}

impl TlsStats {
    pub(crate) fn add(n: &AtomicU64) {
        n.fetch_add(1, Relaxed);
    }

    /// Takes back a count made ahead of a send that failed. Hand-offs are counted before
    /// their send: the pool may answer, and a client read status, before this thread
    /// runs again.
    pub(crate) fn undo(n: &AtomicU64) {
        n.fetch_sub(1, Relaxed);
    }
}
