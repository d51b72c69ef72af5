//! The TLS thread's side of an upgrade. It stops accepting: new connections wait in the
//! listeners' queues, which the next program takes over with the sockets. Then it lets
//! what is under way come to a point where it can be handed on, for at most
//! [`HAND_OVER_WAIT`]:
//! - a session between requests, with every answer sent, goes on as a `Session` payload
//!   and the plaintext not yet served (the form a worker's hand-back has);
//! - a connection whose handshake has not begun (rustls was fed no record) goes on as the
//!   bytes it sent;
//! - a handshake under way, an answer being sent, a hand-off being made: waited for.
//!
//! What can be carried is not read meanwhile, so nothing it sends starts anything new.
//!
//! rustls cannot hand on a handshake in the middle, and the relays to socket pools carry
//! no request boundaries: what is still in either at the end of the wait is cut.

use std::{
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use super::{Conn, LISTENER, Loop, Phase, STOP, Then, WAKE};
use crate::held::Held;
use crate::tls::Carried;

/// Most an upgrade waits for handshakes and answers under way: a handshake takes a round
/// trip or two once the client has sent its hello.
pub const HAND_OVER_WAIT: Duration = Duration::from_secs(2);

/// What can become of a connection at a hand-over, as it stands.
enum Fate {
    /// An open session between requests.
    Session,
    /// Nothing of its handshake has begun.
    Fresh,
    /// Will reach one of the above, or close: waited for.
    Wait,
    /// Cannot be handed on (a relay): cut at the end.
    Cut,
}

fn fate(c: &Conn) -> Fate {
    let all_sent = c.sent == c.out.len();
    match &c.phase {
        _ if c.up.is_some() || matches!(c.then, Then::Relaying | Then::Relay(_)) => Fate::Cut,
        Phase::Open(_) if c.then == Then::Serve && all_sent => Fate::Session,
        Phase::Hello if c.out.is_empty() => Fate::Fresh,
        Phase::Handshake(h) if !h.begun() && c.out.is_empty() => Fate::Fresh,
        _ => Fate::Wait,
    }
}

impl Loop {
    /// What can be carried is no longer read: a request read now could go to a relay and
    /// be cut with it, or a ClientHello to a pass-through. Unread bytes go with the socket.
    /// (Errors and hang-ups are still reported, and close the connection.)
    fn hold_carriable(&mut self) {
        for (&token, c) in self.conns.iter_mut() {
            if c.mask != 0 && matches!(fate(c), Fate::Session | Fate::Fresh) {
                c.mask = 0;
                let _ = self.epoll.modify(c.fd.as_raw_fd(), 0, token);
            }
        }
    }

    /// Stops accepting, waits (bounded) for what is under way, and hands over what can be.
    /// Returns it, and how many connections were cut.
    pub(super) fn hand_over(&mut self) -> (Carried, usize) {
        for &fd in &self.f.listeners {
            self.epoll.delete(fd);
        }
        let deadline = Instant::now() + HAND_OVER_WAIT;
        loop {
            self.hold_carriable();
            let waiting = self.conns.values().any(|c| matches!(fate(c), Fate::Wait));
            let left = deadline.saturating_duration_since(Instant::now());
            if !waiting || left.is_zero() {
                break;
            }
            let n = match self.epoll.wait(left.as_millis().clamp(1, 100) as i32) {
                Ok(n) => n,
                Err(e) => {
                    log::warn!("TLS: waiting at the hand-over: {e}");
                    break;
                }
            };
            for i in 0..n {
                let (token, bits) = self.epoll.ready(i);
                match token {
                    STOP => {}
                    WAKE => self.take_up(),
                    t if t >= LISTENER => {}
                    t => self.on_event(t, bits),
                }
            }
            self.close_late(Instant::now());
        }
        let mut carried = Carried::default();
        let mut cut = 0;
        for (_, c) in std::mem::take(&mut self.conns) {
            self.epoll.delete(c.fd.as_raw_fd());
            match (fate(&c), c.phase) {
                // Half a KeyUpdate received: the session cannot move, and is cut.
                (Fate::Session, Phase::Open(layer)) => {
                    match layer.payload(&c.input, &c.sni, &c.plain) {
                        Ok(bytes) => carried.sessions.push(Held {
                            bytes,
                            fd: c.fd,
                            arrival: c.arrival,
                        }),
                        Err(_) => cut += 1,
                    }
                }
                (Fate::Fresh, _) => carried.fresh.push(Held {
                    fd: c.fd,
                    bytes: c.input,
                    arrival: c.arrival,
                }),
                // Lingering after its answer: its close was due anyway.
                (_, Phase::Lingering) => {}
                _ => cut += 1,
            }
        }
        (carried, cut)
    }
}
