//! Publishing cacheable responses to the front end's cache, automatically from the headers,
//! by the rules of `sluice_proto::cache` (the front end checks them again on arrival).
//!
//! The message, one datagram on the control socket, is `ToFrontend::Cache`: the key (the
//! canonical path, and the request's `Accept-Encoding` when the response varies on it), then
//! the response as the worker puts it on the wire, without `Date` and `Connection`. A key is
//! not published again until its lifetime has passed.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use sluice_proto::cache::{self, CacheKey};

use crate::control::{self, ToFrontend};
use crate::{Request, Response, http};

/// Entries in the recently-published map above which expired ones are dropped.
const PRUNE_AT: usize = 4096;
/// Wait before trying a key again whose message could not be sent.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Publishes cacheable responses on the control socket (shared by every runtime thread).
#[derive(Debug)]
pub(crate) struct Publisher {
    control: Option<RawFd>,
    max_entry: usize,
    /// Key -> when it may be published again.
    recent: Mutex<HashMap<CacheKey, Instant>>,
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
        // A streamed file or an upgrade has no body the cache could hold.
        if self.max_entry == 0 || resp.has_tail() {
            return;
        }
        // The response's few headers first: most responses say nothing about caching.
        let Ok(lifetime) = cache::lifetime(resp.status(), resp.header_lines()) else {
            return;
        };
        if !cache::request_eligible(req.head(), false) {
            return;
        }
        let Some(key) = cache::publication_key(req.head(), lifetime.varies) else {
            return;
        };
        let now = Instant::now();
        if !self.due(&key, now) {
            return;
        }
        let ttl = Duration::from_secs(lifetime.ttl);
        let Some(msg) = message(&key, resp, self.max_entry) else {
            log::debug!(
                "not publishing {}: the response is over {} bytes",
                key.path,
                self.max_entry
            );
            self.remember(key, now + ttl);
            return;
        };
        match control::send(fd, &msg) {
            Ok(()) => {
                log::debug!("published {} for {ttl:?} ({} bytes)", key.path, msg.len());
                self.remember(key, now + ttl);
            }
            Err(e) => {
                log::debug!("publishing {} ({} bytes): {e}", key.path, msg.len());
                self.remember(key, now + RETRY_AFTER);
            }
        }
    }

    /// True when `key` was not published, or its lifetime has passed.
    fn due(&self, key: &CacheKey, now: Instant) -> bool {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        recent.get(key).is_none_or(|&until| now >= until)
    }

    fn remember(&self, key: CacheKey, until: Instant) {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if recent.len() >= PRUNE_AT {
            let now = Instant::now();
            recent.retain(|_, &mut until| until > now);
        }
        recent.insert(key, until);
    }
}

/// The `cache` message for `resp`, or None when the serialized response exceeds `max_entry`.
pub(crate) fn message(key: &CacheKey, resp: &Response, max_entry: usize) -> Option<Vec<u8>> {
    let mut response = Vec::with_capacity(256 + resp.body_bytes().len());
    http::write_cacheable(&mut response, resp);
    (response.len() <= max_entry).then(|| {
        ToFrontend::Cache {
            key: key.clone(),
            response,
        }
        .encode()
    })
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use super::*;
    use crate::with_request;

    fn cc(value: &str) -> Response {
        Response::text(200, "x").header("cache-control", value)
    }

    #[test]
    fn the_published_message_is_what_the_front_end_stores() {
        let r = cc("public, max-age=60")
            .header("date", "Thu, 01 Jan 1970 00:00:00 GMT")
            .header("x-a", "1")
            .header("connection", "close")
            .body("hello");
        let key = CacheKey {
            host: "shop.test".into(),
            path: "/a b".into(),
            variant: None,
        };
        let msg = message(&key, &r, 1024).unwrap();
        // The front end's decoder and checker take it as it is.
        let Ok(ToFrontend::Cache {
            key: back,
            response,
        }) = ToFrontend::decode(&msg)
        else {
            panic!("not decoded")
        };
        assert_eq!(back, key);
        let stored = cache::check_response(&response, 1024).unwrap();
        assert_eq!(stored.body, b"hello");
        assert_eq!(stored.lifetime.ttl, 60);
        assert_eq!(
            String::from_utf8(stored.head).unwrap(),
            "HTTP/1.1 200 OK\r\nServer: sluice-worker\r\ncontent-type: text/plain; charset=utf-8\r\n\
             cache-control: public, max-age=60\r\nx-a: 1\r\n"
        );
        assert!(message(&key, &r, response.len()).is_some());
        assert!(message(&key, &r, response.len() - 1).is_none());
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
    fn a_key_is_published_once_per_lifetime() {
        let (front, worker) = pair();
        let publisher = Publisher::new(Some(worker.as_raw_fd()), 4096);
        with_request(
            b"GET /x/../index.html HTTP/1.1\r\nHost: h\r\n\r\n",
            b"",
            |req| {
                publisher.offer(req, &cc("public, max-age=60"));
                let msg = recv(&front).expect("a cache message");
                assert!(msg.starts_with(b"cache h\t/index.html\nHTTP/1.1 200 OK\r\n"));
                publisher.offer(req, &cc("public, max-age=60"));
                assert_eq!(recv(&front), None, "published again within its lifetime");
                publisher.offer(req, &cc("private, max-age=60"));
                Publisher::new(Some(worker.as_raw_fd()), 0).offer(req, &cc("public, max-age=60"));
                assert_eq!(recv(&front), None);
            },
        );
    }

    #[test]
    fn a_response_that_varies_is_published_under_the_requests_encoding() {
        let (front, worker) = pair();
        let publisher = Publisher::new(Some(worker.as_raw_fd()), 4096);
        let raw = b"GET /v HTTP/1.1\r\nHost: h\r\nAccept-Encoding: gzip\r\n\r\n";
        with_request(raw, b"", |req| {
            publisher.offer(
                req,
                &cc("public, max-age=60").header("vary", "Accept-Encoding"),
            );
        });
        let msg = recv(&front).expect("a cache message");
        assert!(
            msg.starts_with(b"cache h\t/v\tgzip\n"),
            "{}",
            String::from_utf8_lossy(&msg)
        );
    }

    #[test]
    fn only_plain_gets_are_published() {
        let (front, worker) = pair();
        let publisher = Publisher::new(Some(worker.as_raw_fd()), 4096);
        for raw in [
            &b"HEAD /a HTTP/1.1\r\nHost: h\r\n\r\n"[..],
            b"POST /a HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET /a?x HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET /a? HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: h\r\nAuthorization: Basic x\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: h\r\nrange: bytes=1-\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\n",
        ] {
            with_request(raw, b"x", |req| {
                publisher.offer(req, &cc("public, max-age=60"))
            });
            assert_eq!(recv(&front), None, "{}", String::from_utf8_lossy(raw));
        }
    }
}
