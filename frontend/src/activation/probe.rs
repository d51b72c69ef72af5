//! Readiness and health of socket workers, which have no control channel. Each probe is a
//! connection of the front end's own put into the pool's queue by the steering program
//! (`crate::direct`), so it reaches that pool's workers and no other pool's:
//!
//! - `Check::Accept` (no `health` configured): the worker is ready once it accepts the
//!   probe from its queue (the kernel gives the accepted socket an inode; `crate::diag`);
//! - `Check::Get`: an HTTP/1.1 GET of the health path; a 2xx or 3xx status passes.
//!
//! Probes are rare (one per pool at a time, every few seconds) and each may wait for its
//! timeout, so each runs on a short-lived thread and reports over a channel.

use std::{
    io,
    os::fd::{AsRawFd, RawFd},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use crate::direct::Direct;
use crate::pool::PoolId;

/// What a probe checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Accept,
    Get { path: String, host: String },
}

/// A finished probe.
#[derive(Debug)]
pub struct Outcome {
    pub pool: PoolId,
    /// When it was started: workers started before then are the ones it speaks for.
    pub sent: Instant,
    pub result: Result<(), String>,
}

pub struct Prober {
    direct: Arc<Direct>,
    tx: mpsc::Sender<Outcome>,
    rx: Mutex<mpsc::Receiver<Outcome>>,
}

/// How often a probe waiting for its accept asks the kernel.
const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// Most bytes of an answer read for its status line.
const STATUS_LINE_MAX: usize = 512;

impl Prober {
    pub fn new(direct: Arc<Direct>) -> Prober {
        let (tx, rx) = mpsc::channel();
        Prober {
            direct,
            tx,
            rx: Mutex::new(rx),
        }
    }

    /// Starts a probe of `pool`; its outcome comes out of `finished`.
    pub fn start(&self, pool: PoolId, check: Check, timeout: Duration, now: Instant) {
        let direct = self.direct.clone();
        let tx = self.tx.clone();
        let spawned = std::thread::Builder::new()
            .name("sluice-probe".into())
            .spawn(move || {
                let result = run(&direct, pool, &check, now + timeout).map_err(|e| e.to_string());
                let _ = tx.send(Outcome {
                    pool,
                    sent: now,
                    result,
                });
            });
        if let Err(e) = spawned {
            let _ = self.tx.send(Outcome {
                pool,
                sent: now,
                result: Err(format!("starting the probe: {e}")),
            });
        }
    }

    /// Probes that finished since the last call.
    pub fn finished(&self) -> Vec<Outcome> {
        let rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        rx.try_iter().collect()
    }
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("no {what} in time"))
}

/// Waits until `fd` is ready for `events` or `deadline` passes.
fn wait(fd: RawFd, events: i16, deadline: Instant, what: &str) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: polls one live pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
    match n {
        n if n < 0 => Err(io::Error::last_os_error()),
        0 => Err(timed_out(what)),
        _ => Ok(()),
    }
}

fn run(direct: &Arc<Direct>, pool: PoolId, check: &Check, deadline: Instant) -> io::Result<()> {
    let (conn, connected) = direct.open(pool)?;
    let fd = conn.fd.as_raw_fd();
    if !connected {
        wait(fd, libc::POLLOUT, deadline, "connection")?;
        crate::sockets::connect_result(fd)?;
    }
    match check {
        Check::Accept => loop {
            if crate::diag::accepted(conn.target, conn.local)? == Some(true) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(timed_out("accept of the probe"));
            }
            std::thread::sleep(ACCEPT_POLL);
        },
        Check::Get { path, host } => {
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sluice-health\r\nConnection: close\r\n\r\n"
            );
            let mut sent = 0;
            while sent < request.len() {
                wait(fd, libc::POLLOUT, deadline, "room to send the request")?;
                let rest = &request.as_bytes()[sent..];
                // SAFETY: sends from a live buffer of its length.
                let n =
                    unsafe { libc::send(fd, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::WouldBlock {
                        return Err(e);
                    }
                    continue;
                }
                sent += n as usize;
            }
            let mut answer = Vec::new();
            let mut buf = [0u8; STATUS_LINE_MAX];
            while !answer.contains(&b'\n') && answer.len() < STATUS_LINE_MAX {
                wait(fd, libc::POLLIN, deadline, "answer")?;
                // SAFETY: receives into a live buffer of its length.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::WouldBlock {
                        return Err(e);
                    }
                    continue;
                }
                if n == 0 {
                    break;
                }
                answer.extend_from_slice(&buf[..n as usize]);
            }
            match status(&answer) {
                Some(code) if (200..400).contains(&code) => Ok(()),
                Some(code) => Err(io::Error::other(format!("GET {path} answered {code}"))),
                None => Err(io::Error::other(format!("GET {path}: no HTTP status line"))),
            }
        }
    }
}

/// The status code of an HTTP/1.x answer's first line.
fn status(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|&b| b == b'\n').next()?;
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let code = rest.get(2..5)?;
    if rest.get(1) != Some(&b' ') || !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::status;

    #[test]
    fn a_status_line_gives_its_code_and_anything_else_none() {
        assert_eq!(status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            status(b"HTTP/1.0 503 Service Unavailable\r\nX: y"),
            Some(503)
        );
        assert_eq!(status(b"HTTP/1.1 20"), None);
        assert_eq!(status(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status(b""), None);
    }
}
