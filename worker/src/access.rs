//! Access-log entries for the front end (`SLUICE_ACCESS_LOG=1`): one per request this worker
//! answered (or refused), batched per thread and sent on the control channel, where the
//! front end writes them under this worker's pool and pid.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sluice_proto::access::{self, Arrival, Entry, MAX_BATCH};
use sluice_proto::control::{self, ToFrontend};

use crate::Request;

/// What the log says of a connection, learnt once when it arrives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnInfo {
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) arrival: Arrival,
}

/// One thread's entries not sent yet.
#[derive(Debug)]
pub(crate) struct Batch {
    control: RawFd,
    entries: Vec<Entry>,
}

impl Batch {
    /// None when logging is off or there is no front end to send to.
    pub(crate) fn new(control: Option<RawFd>, on: bool) -> Option<Batch> {
        Some(Batch {
            control: control.filter(|_| on)?,
            entries: Vec::with_capacity(MAX_BATCH),
        })
    }

    pub(crate) fn push(&mut self, entry: Entry) {
        self.entries.push(entry);
        if self.entries.len() >= MAX_BATCH {
            self.flush();
        }
    }

    /// Sends what is batched (every tick, and when a batch is full).
    pub(crate) fn flush(&mut self) {
        if self.entries.is_empty() {
            return;
        }
        let msg = ToFrontend::Access(std::mem::take(&mut self.entries)).encode();
        if let Err(e) = control::send(self.control, &msg) {
            log::debug!("access-log entries dropped: {e}");
        }
        self.entries.reserve(MAX_BATCH);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn text(value: Option<&[u8]>) -> String {
    value.map(access::clean).unwrap_or_default()
}

/// The entry for a request answered with `status` and `bytes` of body, begun at `started`.
pub(crate) fn answered(
    req: &Request<'_>,
    status: u16,
    bytes: u64,
    started: Instant,
    conn: ConnInfo,
) -> Entry {
    let head = req.head();
    Entry {
        time_ms: now_ms(),
        client: conn.peer,
        method: access::clean(req.method().as_bytes()),
        target: access::clean(req.target().as_bytes()),
        protocol: format!("HTTP/1.{}", req.minor_version()),
        host: sluice_proto::cache::key_host(head).into_owned(),
        status,
        bytes,
        duration_us: started.elapsed().as_micros() as u64,
        arrival: conn.arrival,
        referer: text(req.header("referer")),
        user_agent: text(req.header("user-agent")),
    }
}

/// The entry for a request refused with `status` before it reached the handler; `input` is
/// what the connection sent from that request's first byte.
pub(crate) fn refused(input: &[u8], status: u16, bytes: u64, conn: ConnInfo) -> Entry {
    let d = access::describe(input);
    Entry {
        time_ms: now_ms(),
        client: conn.peer,
        method: d.method,
        target: d.target,
        protocol: d.protocol,
        host: d.host,
        status,
        bytes,
        duration_us: 0,
        arrival: conn.arrival,
        referer: d.referer,
        user_agent: d.user_agent,
    }
}
