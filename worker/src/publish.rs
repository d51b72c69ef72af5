//! Publishing cacheable responses to the front end's cache, automatically from the headers.
//!
//! A response is published when the request is a GET without query string, `Authorization`,
//! `Range` or body; the status is 200; `Cache-Control` holds `public` and `s-maxage=N` or
//! `max-age=N` with N > 0 (`s-maxage` wins when both are there) and none of `no-store`,
//! `no-cache`, `private`; there is no `Set-Cookie`; `Vary` is absent or names only
//! `Accept-Encoding`; and the serialized response is at most `SLUICE_CACHE_MAX_ENTRY` bytes.
//!
//! The message, one datagram on the control socket:
//! `cache <N> <canonical-path>\n` followed by the response as the worker puts it on the wire,
//! without `Date` and `Connection` (status line, headers with `Content-Length`, blank line,
//! body). A path is not published again until its N seconds have passed.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::routing::cache_eligible;
use crate::{Request, Response, control, http};

/// Entries in the recently-published map above which expired ones are dropped.
const PRUNE_AT: usize = 4096;
/// Wait before trying a path again whose message could not be sent.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Publishes cacheable responses on the control socket (shared by every runtime thread).
#[derive(Debug)]
pub(crate) struct Publisher {
    control: Option<RawFd>,
    max_entry: usize,
    /// Canonical path -> when it may be published again.
    recent: Mutex<HashMap<String, Instant>>,
}

/// Why a response's headers forbid caching it (for tests and debug logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotCacheable {
    Status,
    NoCacheControl,
    NotPublic,
    /// `no-store`, `no-cache` or `private`.
    Forbidden,
    /// No positive `s-maxage` / `max-age` (`s-maxage` counts when both are given).
    NoLifetime,
    SetCookie,
    Vary,
}

impl Publisher {
    pub(crate) fn new(control: Option<RawFd>, max_entry: usize) -> Self {
        Publisher {
            control,
            max_entry,
            recent: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes `resp` (the handler's answer to `req`) when the rules allow it.
    pub(crate) fn offer(&self, req: &Request<'_>, resp: &Response) {
        let Some(fd) = self.control else { return };
        if self.max_entry == 0 {
            return;
        }
        // The response's few headers first: most responses say nothing about caching.
        let Ok(ttl) = lifetime(resp) else { return };
        if !cache_eligible(req, !req.body().is_empty(), false)
            || req.header("transfer-encoding").is_some()
        {
            return;
        }
        let Some(path) = req.canonical_path() else {
            return;
        };
        let now = Instant::now();
        if !self.due(path, now) {
            return;
        }
        let msg = match message(ttl, path, resp, self.max_entry) {
            Some(msg) => msg,
            None => {
                log::debug!(
                    "not publishing {path}: the response is over {} bytes",
                    self.max_entry
                );
                self.remember(path, now + Duration::from_secs(ttl));
                return;
            }
        };
        match control::send_bytes(fd, &msg) {
            Ok(()) => {
                log::debug!("published {path} for {ttl}s ({} bytes)", msg.len());
                self.remember(path, now + Duration::from_secs(ttl));
            }
            Err(e) => {
                log::debug!("publishing {path} ({} bytes): {e}", msg.len());
                self.remember(path, now + RETRY_AFTER);
            }
        }
    }

    /// True when `path` was not published, or its lifetime has passed.
    fn due(&self, path: &str, now: Instant) -> bool {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        recent.get(path).is_none_or(|&until| now >= until)
    }

    fn remember(&self, path: &str, until: Instant) {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if recent.len() >= PRUNE_AT {
            let now = Instant::now();
            recent.retain(|_, &mut until| until > now);
        }
        recent.insert(path.to_owned(), until);
    }
}

/// The `cache` message for `resp`, or None when the serialized response exceeds `max_entry`.
pub(crate) fn message(ttl: u64, path: &str, resp: &Response, max_entry: usize) -> Option<Vec<u8>> {
    let head = format!("cache {ttl} {path}\n");
    let mut msg = Vec::with_capacity(head.len() + 256 + resp.body_bytes().len());
    msg.extend_from_slice(head.as_bytes());
    http::write_cacheable(&mut msg, resp);
    (msg.len() - head.len() <= max_entry).then_some(msg)
}

/// How long the front end may cache `resp`, in seconds, or why it may not.
pub(crate) fn lifetime(resp: &Response) -> Result<u64, NotCacheable> {
    if resp.status() != 200 {
        return Err(NotCacheable::Status);
    }
    let mut public = false;
    let mut forbidden = false;
    let mut seen_cache_control = false;
    let mut max_age = None;
    let mut s_maxage = None;
    for (name, value) in resp.header_lines() {
        if name.eq_ignore_ascii_case(b"set-cookie") {
            return Err(NotCacheable::SetCookie);
        }
        if name.eq_ignore_ascii_case(b"vary") {
            let only_encoding = value
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .filter(|t| !t.is_empty())
                .all(|t| t.eq_ignore_ascii_case(b"accept-encoding"));
            if !only_encoding {
                return Err(NotCacheable::Vary);
            }
        }
        if !name.eq_ignore_ascii_case(b"cache-control") {
            continue;
        }
        seen_cache_control = true;
        for directive in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            let (key, arg) = match directive.iter().position(|&b| b == b'=') {
                Some(eq) => (
                    directive[..eq].trim_ascii(),
                    Some(directive[eq + 1..].trim_ascii()),
                ),
                None => (directive, None),
            };
            if key.eq_ignore_ascii_case(b"public") {
                public = true;
            } else if key.eq_ignore_ascii_case(b"no-store")
                || key.eq_ignore_ascii_case(b"no-cache")
                || key.eq_ignore_ascii_case(b"private")
            {
                forbidden = true;
            } else if key.eq_ignore_ascii_case(b"s-maxage") {
                s_maxage = Some(arg.and_then(seconds).unwrap_or(0));
            } else if key.eq_ignore_ascii_case(b"max-age") {
                max_age = Some(arg.and_then(seconds).unwrap_or(0));
            }
        }
    }
    if !seen_cache_control {
        return Err(NotCacheable::NoCacheControl);
    }
    if forbidden {
        return Err(NotCacheable::Forbidden);
    }
    if !public {
        return Err(NotCacheable::NotPublic);
    }
    match s_maxage.or(max_age) {
        Some(n) if n > 0 => Ok(n),
        _ => Err(NotCacheable::NoLifetime),
    }
}

/// A delta-seconds value (digits, optionally quoted); None when malformed. Huge values are
/// capped at a year.
fn seconds(arg: &[u8]) -> Option<u64> {
    let arg = arg
        .strip_prefix(b"\"")
        .and_then(|a| a.strip_suffix(b"\""))
        .unwrap_or(arg);
    if arg.is_empty() || !arg.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = arg.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    });
    Some(n.unwrap_or(u64::MAX).min(365 * 24 * 3600))
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use super::*;

    fn cc(value: &str) -> Response {
        Response::text(200, "x").header("cache-control", value)
    }

    #[test]
    fn max_age_gives_the_lifetime() {
        assert_eq!(lifetime(&cc("public, max-age=60")), Ok(60));
        assert_eq!(lifetime(&cc("Public , Max-Age=\"7\"")), Ok(7));
    }

    #[test]
    fn s_maxage_wins_over_max_age() {
        assert_eq!(lifetime(&cc("public, max-age=60, s-maxage=5")), Ok(5));
        assert_eq!(lifetime(&cc("s-maxage=5, public, max-age=60")), Ok(5));
        assert_eq!(
            lifetime(&cc("public, s-maxage=0, max-age=60")),
            Err(NotCacheable::NoLifetime)
        );
        // Across several Cache-Control headers too.
        let r = cc("public, max-age=60").header("cache-control", "s-maxage=9");
        assert_eq!(lifetime(&r), Ok(9));
    }

    #[test]
    fn public_and_a_positive_lifetime_are_required() {
        assert_eq!(lifetime(&cc("max-age=60")), Err(NotCacheable::NotPublic));
        assert_eq!(lifetime(&cc("public")), Err(NotCacheable::NoLifetime));
        assert_eq!(
            lifetime(&cc("public, max-age=0")),
            Err(NotCacheable::NoLifetime)
        );
        assert_eq!(
            lifetime(&cc("public, max-age=abc")),
            Err(NotCacheable::NoLifetime)
        );
        assert_eq!(
            lifetime(&Response::text(200, "x")),
            Err(NotCacheable::NoCacheControl)
        );
    }

    #[test]
    fn private_no_store_and_no_cache_forbid_publishing() {
        assert_eq!(
            lifetime(&cc("public, max-age=60, private")),
            Err(NotCacheable::Forbidden)
        );
        assert_eq!(
            lifetime(&cc("private=\"x\", public, max-age=60")),
            Err(NotCacheable::Forbidden)
        );
        assert_eq!(
            lifetime(&cc("public, no-store, max-age=60")),
            Err(NotCacheable::Forbidden)
        );
        assert_eq!(
            lifetime(&cc("public, no-cache, max-age=60")),
            Err(NotCacheable::Forbidden)
        );
        assert_eq!(
            lifetime(&cc("public, No-Cache=\"set-cookie\", max-age=60")),
            Err(NotCacheable::Forbidden)
        );
    }

    #[test]
    fn set_cookie_forbids_publishing() {
        let r = cc("public, max-age=60").header("Set-Cookie", "a=b");
        assert_eq!(lifetime(&r), Err(NotCacheable::SetCookie));
    }

    #[test]
    fn vary_other_than_accept_encoding_forbids_publishing() {
        let vary = |v: &str| lifetime(&cc("public, max-age=60").header("vary", v));
        assert_eq!(vary("Accept-Encoding"), Ok(60));
        assert_eq!(vary("accept-encoding, Accept-Encoding"), Ok(60));
        assert_eq!(vary("Accept-Encoding, Cookie"), Err(NotCacheable::Vary));
        assert_eq!(vary("*"), Err(NotCacheable::Vary));
        assert_eq!(vary("User-Agent"), Err(NotCacheable::Vary));
    }

    #[test]
    fn only_200_is_published() {
        let r = Response::text(404, "x").header("cache-control", "public, max-age=60");
        assert_eq!(lifetime(&r), Err(NotCacheable::Status));
    }

    fn eligible(raw: &[u8], body: &[u8]) -> bool {
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut parsed = httparse::Request::new(&mut headers);
        parsed.parse(raw).unwrap();
        let req = Request::from_parsed(&parsed, body);
        cache_eligible(&req, !req.body().is_empty(), false)
    }

    #[test]
    fn only_plain_gets_are_cache_eligible_for_publishing() {
        assert!(eligible(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n", b""));
        assert!(!eligible(b"HEAD /a HTTP/1.1\r\nHost: h\r\n\r\n", b""));
        assert!(!eligible(b"POST /a HTTP/1.1\r\nHost: h\r\n\r\n", b""));
        assert!(!eligible(b"GET /a?x HTTP/1.1\r\nHost: h\r\n\r\n", b""));
        assert!(!eligible(b"GET /a? HTTP/1.1\r\nHost: h\r\n\r\n", b""));
        assert!(!eligible(
            b"GET /a HTTP/1.1\r\nHost: h\r\nAuthorization: Basic x\r\n\r\n",
            b""
        ));
        assert!(!eligible(
            b"GET /a HTTP/1.1\r\nHost: h\r\nrange: bytes=1-\r\n\r\n",
            b""
        ));
        assert!(!eligible(
            b"GET /a HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\n",
            b"x"
        ));
    }

    #[test]
    fn message_is_the_wire_response_without_date_and_connection() {
        let r = cc("public, max-age=60")
            .header("date", "Thu, 01 Jan 1970 00:00:00 GMT")
            .header("x-a", "1")
            .header("connection", "close")
            .body("hello");
        let msg = message(60, "/a b", &r, 1024).unwrap();
        let text = String::from_utf8(msg).unwrap();
        assert_eq!(
            text,
            "cache 60 /a b\nHTTP/1.1 200 OK\r\nServer: sluice-worker\r\n\
             content-type: text/plain; charset=utf-8\r\ncache-control: public, max-age=60\r\n\
             x-a: 1\r\nContent-Length: 5\r\n\r\nhello"
        );
        let size = text.len() - "cache 60 /a b\n".len();
        assert!(message(60, "/a b", &r, size).is_some());
        assert!(message(60, "/a b", &r, size - 1).is_none());
    }

    fn pair() -> (OwnedFd, OwnedFd) {
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
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn recv(fd: &OwnedFd) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        // SAFETY: `buf` is live and writable for its length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        (n > 0).then(|| buf[..n as usize].to_vec())
    }

    #[test]
    fn a_path_is_published_once_per_lifetime() {
        let (front, worker) = pair();
        let publisher = Publisher::new(Some(worker.as_raw_fd()), 4096);
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut parsed = httparse::Request::new(&mut headers);
        parsed
            .parse(b"GET /x/../index.html HTTP/1.1\r\nHost: h\r\n\r\n")
            .unwrap();
        let req = Request::from_parsed(&parsed, b"");
        publisher.offer(&req, &cc("public, max-age=60"));
        let msg = recv(&front).expect("a cache message");
        assert!(msg.starts_with(b"cache 60 /index.html\nHTTP/1.1 200 OK\r\n"));
        publisher.offer(&req, &cc("public, max-age=60"));
        assert_eq!(recv(&front), None, "published again within its lifetime");
        // Not eligible: nothing sent.
        publisher.offer(&req, &cc("private, max-age=60"));
        let disabled = Publisher::new(Some(worker.as_raw_fd()), 0);
        disabled.offer(&req, &cc("public, max-age=60"));
        assert_eq!(recv(&front), None);
    }
}
