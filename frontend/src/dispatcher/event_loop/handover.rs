//! Handing the dispatcher's connections to the next front-end process (an upgrade), and
//! taking them up there. Every operation in flight is cancelled and its completion taken (an
//! accept that completed is a connection, a read that completed is bytes, a hand-back that
//! arrived is a connection and its bytes), answers under way are finished, and every
//! connection still waiting for (the rest of) a request leaves with what it has read.

use std::os::fd::OwnedFd;

use super::*;

/// How long the last completions and the answers under way may take.
const FINISH: Duration = Duration::from_secs(1);

impl Loop {
    /// Connections an earlier process held: each is judged again with the bytes it brought.
    pub(super) fn take_up(&mut self, held: Vec<Held>) {
        if !held.is_empty() {
            log::info!(
                "dispatcher: took up {} connection(s) from before the upgrade",
                held.len()
            );
        }
        for h in held {
            let slot = self.admit(h.fd.into_raw_fd(), &h.bytes);
            if let Some(c) = self.conns[slot].as_mut() {
                c.arrival = h.arrival;
            }
            self.process(slot);
        }
    }

    pub(super) fn hand_over(&mut self) -> io::Result<Vec<Held>> {
        self.pending.push(
            opcode::AsyncCancel2::new(types::CancelBuilder::any())
                .build()
                .user_data(ud(OP_CANCEL, 0)),
        );
        let deadline = Instant::now() + FINISH;
        let ts = types::Timespec::from(Duration::from_millis(50));
        while (self.inflight > 0 || !self.pending.is_empty()) && Instant::now() < deadline {
            self.submit_pending()?;
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                    ) => {}
                Err(e) => return Err(e),
            }
            let cqes: Vec<(u64, i32, u32)> = self
                .ring
                .completion()
                .map(|c: cqueue::Entry| (c.user_data(), c.result(), c.flags()))
                .collect();
            for (user_data, res, flags) in cqes {
                if !cqueue::more(flags) {
                    self.inflight = self.inflight.saturating_sub(1);
                }
                self.settle(user_data >> 32, (user_data & 0xffff_ffff) as usize, res);
            }
        }
        if self.inflight > 0 {
            log::warn!(
                "dispatcher: {} operation(s) still in flight at the handover",
                self.inflight
            );
        }
        let mut held = Vec::new();
        for slot in 0..self.conns.len() {
            let Some(c) = self.conns[slot].as_mut() else {
                continue;
            };
            if c.inflight > 0 {
                // Its buffer may still be written to: it cannot be judged. The client is told
                // (its fd stays open, and the loop's memory is kept: see `run`).
                // SAFETY: shutdown on a connection we own.
                unsafe { libc::shutdown(c.fd, libc::SHUT_RDWR) };
                continue;
            }
            let keep = match c.state {
                State::Reading => Some(0),
                State::Replying { keep } => {
                    let done = finish(c.fd, &c.reply[c.sent..], deadline + FINISH);
                    keep.filter(|_| done)
                }
                State::Lingering => None,
            };
            let Some(consumed) = keep else {
                self.close(slot);
                continue;
            };
            if let Some(c) = self.conns[slot].take() {
                // SAFETY: the connection's fd is ours and no operation on it is in flight;
                // taking it out of the slot leaves it to the `Held` alone.
                let fd = unsafe { OwnedFd::from_raw_fd(c.fd) };
                held.push(Held {
                    fd,
                    bytes: c.buf[consumed.min(c.filled)..c.filled].to_vec(),
                    arrival: c.arrival,
                });
                self.free.push(slot);
            }
        }
        Ok(held)
    }

    /// One completion while handing over: what it brings is kept, nothing new is started.
    fn settle(&mut self, op: u64, index: usize, res: i32) {
        match op {
            OP_ACCEPT | OP_DRAIN_ACCEPT if res >= 0 => {
                if op == OP_ACCEPT {
                    self.d.stats.accepted.fetch_add(1, Ordering::Relaxed);
                }
                self.insert(res, &[]);
            }
            OP_HANDBACK | OP_REROUTE | OP_DRAIN_HANDOFF if res >= 0 => {
                let msgs = match op {
                    OP_HANDBACK => &mut self.handback_msgs,
                    OP_REROUTE => &mut self.reroute_msgs,
                    _ => &mut self.drain_msgs,
                };
                // The box stays in its slot: another receive on it may still be in flight.
                let Some(msg) = msgs.get_mut(index).and_then(Option::as_mut) else {
                    return;
                };
                let taken = msg
                    .complete(res as usize)
                    .map(|m| (m.fd, m.bytes.to_vec(), m.flags & handoff::TLS != 0));
                if taken.is_ok() && op == OP_HANDBACK {
                    self.d.stats.handed_back.fetch_add(1, Ordering::Relaxed);
                }
                match taken {
                    Ok((fd, bytes, true)) => {
                        // Into the TLS thread's inbox, carried with its own (the thread has
                        // stopped and its inbox is drained after this one).
                        let arrival = if op == OP_HANDBACK {
                            Arrival::Handback
                        } else {
                            Arrival::Dispatcher
                        };
                        to_tls(self.d.tls.as_ref(), fd, bytes, arrival, None);
                    }
                    Ok((fd, bytes, false)) => {
                        let slot = self.insert(fd.into_raw_fd(), &bytes);
                        if let (true, Some(c)) = (op == OP_HANDBACK, self.conns[slot].as_mut()) {
                            c.arrival = Arrival::Handback;
                        }
                    }
                    Err(e) => log::warn!("pool {index}'s handoff channel: {e}"),
                }
            }
            OP_RECV | OP_SEND | OP_LINGER | OP_LINGER_TIMEOUT => {
                let Some(c) = self.conns.get_mut(index).and_then(Option::as_mut) else {
                    return;
                };
                c.inflight = c.inflight.saturating_sub(1);
                let gone = match op {
                    OP_RECV if res > 0 => {
                        c.filled += res as usize;
                        false
                    }
                    OP_SEND if res > 0 => {
                        c.sent += res as usize;
                        false
                    }
                    OP_RECV | OP_SEND => res != -libc::ECANCELED,
                    // A lingering connection was answered: it ends here.
                    _ => true,
                };
                if gone {
                    c.state = State::Lingering;
                }
            }
            _ => {}
        }
    }
}

/// Writes the rest of an answer, waiting for the socket up to `deadline`; true when all of it
/// went.
fn finish(fd: RawFd, mut rest: &[u8], deadline: Instant) -> bool {
    while !rest.is_empty() {
        // SAFETY: send(2) from a live slice on a connection we own.
        let n = unsafe {
            libc::send(
                fd,
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n > 0 {
            rest = &rest[n as usize..];
            continue;
        }
        let err = io::Error::last_os_error();
        let left = deadline.saturating_duration_since(Instant::now());
        if n < 0 && err.raw_os_error() == Some(libc::EAGAIN) && !left.is_zero() {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: poll(2) on one live pollfd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
            continue;
        }
        return false;
    }
    true
}
