//! The control channel: a private AF_UNIX SOCK_SEQPACKET socket from the front end (fd name
//! `control`). One short ASCII message per datagram, fields separated by single spaces.
//!
//! Front end -> worker:
//! - `ping <seq>` (decimal u64): answered with `pong <seq> requests=<n> rss_kib=<n>`.
//! - `stop`: graceful stop, as SIGTERM.
//! - `routes\n<prefix> <pool>\n...`: the whole route table (normalized prefixes ending in `/`),
//!   replacing the previous one; `routes` alone is an empty table (never hand back).
//! - `cached\n<canonical-path>\n...`: the whole set of paths the front end serves from its
//!   cache, replacing the previous one.
//!
//! Worker -> front end, unsolicited: `stats requests=<n>`, at most once per second and only
//! when the count changed since the last `stats` or `pong`; and `cache <ttl> <canonical-path>\n`
//! followed by a complete response to cache (see `publish.rs`).
//!
//! Messages are at most [`MAX_MESSAGE`] bytes (the `routes` and `cached` lists can be long).
//!
//! `requests` counts the HTTP responses this process has written since it started (all
//! threads); `rss_kib` is `VmRSS` from `/proc/self/status`. EOF or an error on the socket means
//! the front end is gone: graceful stop. This module holds the message parsing and formatting
//! and the socket calls that are not io_uring operations; the runtime's thread 0 does the I/O.

use std::io;
use std::os::fd::RawFd;

use sluice_common::route::normalize_prefix;

/// Largest message accepted; anything longer is ignored.
pub(crate) const MAX_MESSAGE: usize = 256 * 1024;

/// A message from the front end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    Ping(u64),
    Stop,
    /// The whole route table: (normalized prefix, pool name).
    Routes(Vec<(String, String)>),
    /// The whole set of canonical paths the front end serves from its cache.
    Cached(Vec<String>),
}

/// Why a message from the front end was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ControlError {
    #[error("unknown control message {0:?}")]
    Unknown(String),
    #[error("bad sequence number in control message {0:?}")]
    BadSeq(String),
    #[error("control message longer than {MAX_MESSAGE} bytes")]
    TooLong,
    #[error("bad line {line:?} in a `{list}` control message: {reason}")]
    BadLine {
        list: &'static str,
        line: String,
        reason: &'static str,
    },
    #[error("a `{0}` control message is not UTF-8")]
    NotUtf8(&'static str),
}

/// Parses one datagram. A single trailing newline is tolerated.
pub(crate) fn parse(msg: &[u8]) -> Result<Command, ControlError> {
    if msg.len() > MAX_MESSAGE {
        return Err(ControlError::TooLong);
    }
    let first_line = msg.split(|&b| b == b'\n').next().unwrap_or(msg);
    let first_line = first_line.strip_suffix(b"\r").unwrap_or(first_line);
    match first_line {
        b"routes" => return parse_routes(msg),
        b"cached" => return parse_cached(msg),
        _ => {}
    }
    let msg = msg.strip_suffix(b"\n").unwrap_or(msg);
    let msg = msg.strip_suffix(b"\r").unwrap_or(msg);
    let text = String::from_utf8_lossy(msg);
    let mut fields = text.split(' ');
    match (fields.next(), fields.next(), fields.next()) {
        (Some("stop"), None, None) => Ok(Command::Stop),
        (Some("ping"), Some(seq), None) => parse_u64(seq)
            .map(Command::Ping)
            .ok_or_else(|| ControlError::BadSeq(text.into_owned())),
        _ => Err(ControlError::Unknown(text.into_owned())),
    }
}

/// The lines after the first one, without empty lines (a trailing newline is fine).
fn list_lines<'m>(
    msg: &'m [u8],
    list: &'static str,
) -> Result<impl Iterator<Item = &'m str>, ControlError> {
    let text = std::str::from_utf8(msg).map_err(|_| ControlError::NotUtf8(list))?;
    Ok(text.lines().skip(1).filter(|line| !line.is_empty()))
}

/// `routes\n<prefix> <pool>\n...`. Prefixes must be normalized (as `normalize_prefix` leaves
/// them); pool names are one non-empty field. One bad line refuses the whole message.
fn parse_routes(msg: &[u8]) -> Result<Command, ControlError> {
    let bad = |line: &str, reason| ControlError::BadLine {
        list: "routes",
        line: line.to_owned(),
        reason,
    };
    let mut routes = Vec::new();
    for line in list_lines(msg, "routes")? {
        let mut fields = line.split(' ');
        let (Some(prefix), Some(pool), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(bad(line, "expected `<prefix> <pool>`"));
        };
        if pool.is_empty() {
            return Err(bad(line, "empty pool name"));
        }
        match normalize_prefix(prefix) {
            Ok(normalized) if normalized == prefix => {}
            Ok(_) => return Err(bad(line, "the prefix does not end in `/`")),
            Err(reason) => return Err(bad(line, reason)),
        }
        routes.push((prefix.to_owned(), pool.to_owned()));
    }
    Ok(Command::Routes(routes))
}

/// `cached\n<canonical-path>\n...`. Each path must start with `/`.
fn parse_cached(msg: &[u8]) -> Result<Command, ControlError> {
    let mut paths = Vec::new();
    for line in list_lines(msg, "cached")? {
        if !line.starts_with('/') || line.bytes().any(|b| b < 0x20 || b == 0x7f) {
            return Err(ControlError::BadLine {
                list: "cached",
                line: line.to_owned(),
                reason: "not a canonical path",
            });
        }
        paths.push(line.to_owned());
    }
    Ok(Command::Cached(paths))
}

/// A plain decimal u64: digits only (no sign, no spaces), no overflow.
fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `pong <seq> requests=<n> rss_kib=<n>`.
pub(crate) fn pong(seq: u64, requests: u64, rss_kib: u64) -> String {
    format!("pong {seq} requests={requests} rss_kib={rss_kib}")
}

/// `stats requests=<n>`.
pub(crate) fn stats(requests: u64) -> String {
    format!("stats requests={requests}")
}

/// The `VmRSS` value (kB) in the text of `/proc/<pid>/status`.
pub(crate) fn vm_rss_kib(status: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix("VmRSS:")?;
        let mut parts = value.split_whitespace();
        let n = parts.next()?.parse().ok()?;
        match parts.next() {
            None | Some("kB") => Some(n),
            Some(_) => None,
        }
    })
}

/// This process's resident set size in KiB, 0 when unknown.
pub(crate) fn current_rss_kib() -> u64 {
    match std::fs::read_to_string("/proc/self/status") {
        Ok(status) => vm_rss_kib(&status).unwrap_or(0),
        Err(e) => {
            log::debug!("reading /proc/self/status: {e}");
            0
        }
    }
}

/// Sends one message without blocking (MSG_DONTWAIT | MSG_NOSIGNAL). A full socket drops it.
pub(crate) fn send(fd: RawFd, msg: &str) -> io::Result<()> {
    send_bytes(fd, msg.as_bytes())
}

/// [`send`] for a message that is not text (a `cache` message carries a response body).
pub(crate) fn send_bytes(fd: RawFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: `msg` is a live buffer of `msg.len()` bytes; send(2) only reads it.
    let rc = unsafe {
        libc::send(
            fd,
            msg.as_ptr().cast(),
            msg.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// After a recv returned 0: true when the peer has closed its end (rather than sending an
/// empty datagram).
pub(crate) fn peer_closed(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `pfd` is one live pollfd; a zero timeout never blocks.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    rc < 0 || pfd.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_and_stop_are_parsed() {
        assert_eq!(parse(b"ping 7"), Ok(Command::Ping(7)));
        assert_eq!(parse(b"ping 0\n"), Ok(Command::Ping(0)));
        assert_eq!(
            parse(b"ping 18446744073709551615"),
            Ok(Command::Ping(u64::MAX))
        );
        assert_eq!(parse(b"stop"), Ok(Command::Stop));
        assert_eq!(parse(b"stop\r\n"), Ok(Command::Stop));
    }

    #[test]
    fn malformed_messages_are_errors() {
        for bad in [
            &b"ping"[..],
            b"ping ",
            b"ping +7",
            b"ping -1",
            b"ping 7x",
            b"ping 18446744073709551616",
        ] {
            assert!(
                matches!(
                    parse(bad),
                    Err(ControlError::BadSeq(_) | ControlError::Unknown(_))
                ),
                "{bad:?}"
            );
        }
        for bad in [
            &b""[..],
            b"PING 1",
            b"ping  7",
            b"ping 7 8",
            b" stop",
            b"stop now",
            b"hello",
        ] {
            assert!(
                matches!(parse(bad), Err(ControlError::Unknown(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse(&vec![b'x'; MAX_MESSAGE + 1]),
            Err(ControlError::TooLong)
        );
    }

    #[test]
    fn routes_message_is_parsed_into_prefix_and_pool_pairs() {
        assert_eq!(
            parse(b"routes\n/api/ api\n/ web\n"),
            Ok(Command::Routes(vec![
                ("/api/".into(), "api".into()),
                ("/".into(), "web".into())
            ]))
        );
        assert_eq!(
            parse(b"routes\r\n/a/b/ p1\r\n"),
            Ok(Command::Routes(vec![("/a/b/".into(), "p1".into())]))
        );
    }

    #[test]
    fn empty_routes_message_is_an_empty_table() {
        assert_eq!(parse(b"routes"), Ok(Command::Routes(vec![])));
        assert_eq!(parse(b"routes\n"), Ok(Command::Routes(vec![])));
    }

    #[test]
    fn routes_message_with_a_bad_line_is_refused() {
        for bad in [
            &b"routes\n/api/\n"[..],
            b"routes\n/api/ api extra\n",
            b"routes\n/api api\n",
            b"routes\napi/ api\n",
            b"routes\n/a/../b/ api\n",
            b"routes\n/api/  api\n",
            b"routes\n/x/ \xff\n",
        ] {
            assert!(
                matches!(
                    parse(bad),
                    Err(ControlError::BadLine { .. } | ControlError::NotUtf8(_))
                ),
                "{bad:?} -> {:?}",
                parse(bad)
            );
        }
        assert!(matches!(
            parse(b"routes now"),
            Err(ControlError::Unknown(_))
        ));
    }

    #[test]
    fn cached_message_is_parsed_into_paths() {
        assert_eq!(
            parse(b"cached\n/index.html\n/a b/c\n"),
            Ok(Command::Cached(vec!["/index.html".into(), "/a b/c".into()]))
        );
        assert_eq!(parse(b"cached"), Ok(Command::Cached(vec![])));
        assert_eq!(parse(b"cached\n"), Ok(Command::Cached(vec![])));
        assert!(matches!(
            parse(b"cached\nindex.html\n"),
            Err(ControlError::BadLine { .. })
        ));
    }

    #[test]
    fn long_lists_up_to_the_limit_are_accepted() {
        let mut msg = b"cached\n".to_vec();
        while msg.len() < MAX_MESSAGE - 40 {
            msg.extend_from_slice(format!("/some/long/path/{}\n", msg.len()).as_bytes());
        }
        let Ok(Command::Cached(paths)) = parse(&msg) else {
            panic!("not parsed")
        };
        assert!(paths.len() > 5000);
    }

    #[test]
    fn replies_are_formatted() {
        assert_eq!(pong(7, 3, 1234), "pong 7 requests=3 rss_kib=1234");
        assert_eq!(stats(42), "stats requests=42");
    }

    #[test]
    fn vm_rss_is_read_from_proc_status() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t    1536 kB\nRssAnon:\t 100 kB\n";
        assert_eq!(vm_rss_kib(status), Some(1536));
        assert_eq!(vm_rss_kib("Name:\tx\n"), None);
        assert!(current_rss_kib() > 0);
    }

    #[test]
    fn send_and_peer_closed_on_a_socketpair() {
        let mut fds = [0; 2];
        // SAFETY: socketpair(2) writes two fds into the live array.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: both fds are new and owned by nobody else.
        let (a, b) = unsafe {
            use std::os::fd::{FromRawFd, OwnedFd};
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        };
        use std::os::fd::AsRawFd;
        send(a.as_raw_fd(), &stats(5)).unwrap();
        let mut buf = [0u8; 64];
        // SAFETY: `buf` is live and writable for its length.
        let n = unsafe { libc::recv(b.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert_eq!(&buf[..n as usize], b"stats requests=5");
        assert!(!peer_closed(b.as_raw_fd()));
        drop(a);
        assert!(peer_closed(b.as_raw_fd()));
    }
}
