//! What the front end's cache may hold and answer, decided once for both sides: the worker
//! decides with these functions what to publish and which requests to hand back, the front end
//! what to store and which requests to answer.
//!
//! A request may be answered from the cache (or its answer stored) when it is a `GET` (or a
//! `HEAD`, for answering) without query, body, `Authorization` or `Range`. A response may be
//! stored when it is a 200 with `Cache-Control: public` and a positive `s-maxage` or `max-age`
//! (`s-maxage` wins), none of `no-store`, `no-cache`, `private`, no `Set-Cookie`, and no
//! `Vary` but `Accept-Encoding`. An entry whose response varies on `Accept-Encoding` answers
//! only requests with the same `Accept-Encoding` as the one it answered; the key says so.

use crate::request::Head;

/// Longest lifetime an entry gets (a year); larger `max-age` values are capped to it.
pub const MAX_TTL_SECS: u64 = 365 * 24 * 3600;
/// Largest `cache.max_entry_bytes` a config may set.
pub const MAX_ENTRY_LIMIT: usize = 1 << 20;
/// Longest `Accept-Encoding` value an entry may vary on.
pub const MAX_VARIANT: usize = 256;

/// The host of a static entry that answers every host.
pub const ANY_HOST: &str = "*";

/// An entry's key: the request's host (normalized, `Host::normalized`; empty for a request
/// without one; [`ANY_HOST`] for a static entry that names none), its canonical path and,
/// for a response that varies on `Accept-Encoding`, the request's `Accept-Encoding` value
/// (empty when it sent none).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey {
    pub host: String,
    pub path: String,
    pub variant: Option<String>,
}

impl CacheKey {
    /// The keys that can answer a request for `host` and `path` with `accept_encoding`, in
    /// the order they are tried: the entry that does not vary, the one that varies on this
    /// very value, then a static entry for every host.
    pub fn candidates(host: &str, path: &str, accept_encoding: Option<&[u8]>) -> [CacheKey; 3] {
        let key = |host: &str, variant| CacheKey {
            host: host.to_owned(),
            path: path.to_owned(),
            variant,
        };
        [
            key(host, None),
            key(host, Some(variant(accept_encoding).unwrap_or_default())),
            key(ANY_HOST, None),
        ]
    }

    /// Text without control bytes (and so without the tab and newline the control channel
    /// uses as separators), and a host that is empty, [`ANY_HOST`] or normalized.
    pub fn is_valid(&self) -> bool {
        let clean = |s: &str| !s.bytes().any(|b| b < 0x20 || b == 0x7f);
        self.path.starts_with('/')
            && clean(&self.path)
            && valid_host(&self.host)
            && self
                .variant
                .as_ref()
                .is_none_or(|v| v.len() <= MAX_VARIANT && clean(v))
    }
}

/// The host of a request as a key holds it (empty when it named none).
pub fn key_host<'b>(head: &Head<'b>) -> std::borrow::Cow<'b, str> {
    head.host.map(|h| h.normalized()).unwrap_or_default()
}

/// The host a request is routed and cached by, whoever reads it: the one it names
/// (normalized), else the SNI name of the TLS session it came on (`sni`, normalized; empty
/// for none), as the kernel program steered the session. None when neither names one.
pub fn routing_host<'b>(head: &Head<'b>, sni: &'b str) -> Option<std::borrow::Cow<'b, str>> {
    match head.host {
        Some(h) => Some(h.normalized()),
        None => (!sni.is_empty()).then_some(std::borrow::Cow::Borrowed(sni)),
    }
}

fn valid_host(host: &str) -> bool {
    host.is_empty()
        || host == ANY_HOST
        || crate::host::parse(host.as_bytes())
            .is_ok_and(|h| h.port.is_none() && h.normalized() == host)
}

/// The `Accept-Encoding` value an entry varies on: trimmed, empty when absent; None when it
/// cannot be a key (too long, not text).
fn variant(accept_encoding: Option<&[u8]>) -> Option<String> {
    let v = accept_encoding.unwrap_or_default().trim_ascii();
    if v.len() > MAX_VARIANT || v.iter().any(|&b| b < 0x20 || b >= 0x7f) {
        return None;
    }
    Some(String::from_utf8_lossy(v).into_owned())
}

/// Whether the cache may answer this request (`allow_head`) or store the answer to it.
pub fn request_eligible(head: &Head<'_>, allow_head: bool) -> bool {
    let method_ok = head.method == "GET" || (allow_head && head.method == "HEAD");
    method_ok
        && head.query.is_none()
        && !head.has_body()
        && !head.has_authorization
        && !head.has_range
}

/// The key a publication of the answer to `head` is stored under, when the response
/// `varies` on `Accept-Encoding`; None when the request's value cannot be a key.
pub fn publication_key(head: &Head<'_>, varies: bool) -> Option<CacheKey> {
    let variant = if varies {
        Some(variant(head.accept_encoding)?)
    } else {
        None
    };
    Some(CacheKey {
        host: key_host(head).into_owned(),
        path: head.canonical.clone().into_owned(),
        variant,
    })
}

/// Why a response may not be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotCacheable {
    #[error("only 200 responses are cached")]
    Status,
    #[error("no Cache-Control")]
    NoCacheControl,
    #[error("Cache-Control is not `public`")]
    NotPublic,
    #[error("Cache-Control forbids it (no-store, no-cache or private)")]
    Forbidden,
    #[error("no positive s-maxage or max-age")]
    NoLifetime,
    #[error("the response sets a cookie")]
    SetCookie,
    #[error("the response varies on more than Accept-Encoding")]
    Vary,
    #[error("the response has a header a cached answer must not repeat")]
    Header,
}

/// How a storable response may be kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    /// Seconds, 1..=MAX_TTL_SECS.
    pub ttl: u64,
    /// `Vary: Accept-Encoding`.
    pub varies: bool,
}

/// Whether a response with `status` and `headers` (name, value) may be stored, and for how
/// long.
pub fn lifetime<'a>(
    status: u16,
    headers: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<Lifetime, NotCacheable> {
    if status != 200 {
        return Err(NotCacheable::Status);
    }
    let (mut public, mut forbidden, mut seen) = (false, false, false);
    let (mut max_age, mut s_maxage) = (None, None);
    let mut varies = false;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case(b"set-cookie") {
            return Err(NotCacheable::SetCookie);
        }
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return Err(NotCacheable::Header);
        }
        if name.eq_ignore_ascii_case(b"vary") {
            for t in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if t.is_empty() {
                    continue;
                }
                if !t.eq_ignore_ascii_case(b"accept-encoding") {
                    return Err(NotCacheable::Vary);
                }
                varies = true;
            }
        }
        if !name.eq_ignore_ascii_case(b"cache-control") {
            continue;
        }
        seen = true;
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
    if !seen {
        return Err(NotCacheable::NoCacheControl);
    }
    if forbidden {
        return Err(NotCacheable::Forbidden);
    }
    if !public {
        return Err(NotCacheable::NotPublic);
    }
    match s_maxage.or(max_age) {
        Some(ttl) if ttl > 0 => Ok(Lifetime { ttl, varies }),
        _ => Err(NotCacheable::NoLifetime),
    }
}

/// A delta-seconds value (digits, optionally quoted); None when malformed. Capped at
/// [`MAX_TTL_SECS`].
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
    Some(n.unwrap_or(u64::MAX).min(MAX_TTL_SECS))
}

/// Headers the front end adds to every answer itself, so a stored response leaves them out.
pub fn per_answer_header(name: &[u8]) -> bool {
    [
        &b"date"[..],
        b"age",
        b"connection",
        b"keep-alive",
        b"content-length",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// A published response, checked and ready to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Status line and headers (each ending in CRLF) without the per-answer ones.
    pub head: Vec<u8>,
    pub body: Vec<u8>,
    pub lifetime: Lifetime,
}

/// Why a published response is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadResponse {
    #[error("the response head does not parse")]
    Head,
    #[error("Content-Length does not match the body")]
    Length,
    #[error("{0}")]
    NotCacheable(NotCacheable),
    #[error("the response is larger than cache.max_entry_bytes")]
    TooLarge,
}

/// Checks a response as a worker publishes it (`HTTP/1.1 200 ...`, headers with
/// `Content-Length`, blank line, body) against the rules above.
pub fn check_response(raw: &[u8], max_entry: usize) -> Result<Stored, BadResponse> {
    if raw.len() > max_entry.min(MAX_ENTRY_LIMIT) + 8192 {
        return Err(BadResponse::TooLarge);
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(BadResponse::Head),
    };
    let status = parsed.code.unwrap_or(0);
    let lifetime = lifetime(
        status,
        parsed.headers.iter().map(|h| (h.name.as_bytes(), h.value)),
    )
    .map_err(BadResponse::NotCacheable)?;
    let mut lengths = parsed
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"));
    // The request rule's reading of a length: digits only.
    let length = match (lengths.next(), lengths.next()) {
        (Some(h), None) => crate::request::content_length_value(h.value.trim_ascii())
            .and_then(|n| usize::try_from(n).ok()),
        _ => None,
    };
    let body = &raw[head_len..];
    if length != Some(body.len()) {
        return Err(BadResponse::Length);
    }
    let mut head = format!("HTTP/1.1 200 {}\r\n", parsed.reason.unwrap_or("OK")).into_bytes();
    for h in parsed.headers.iter() {
        if per_answer_header(h.name.as_bytes()) {
            continue;
        }
        head.extend_from_slice(h.name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(h.value);
        head.extend_from_slice(b"\r\n");
    }
    if head.len() + body.len() > max_entry {
        return Err(BadResponse::TooLarge);
    }
    Ok(Stored {
        head,
        body: body.to_vec(),
        lifetime,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lt(headers: &[(&str, &str)]) -> Result<Lifetime, NotCacheable> {
        lifetime(
            200,
            headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())),
        )
    }

    #[test]
    fn public_max_age_is_stored_and_s_maxage_wins() {
        assert_eq!(
            lt(&[("Cache-Control", "public, max-age=60")]).unwrap().ttl,
            60
        );
        assert_eq!(
            lt(&[("cache-control", "public, max-age=60, s-maxage=5")])
                .unwrap()
                .ttl,
            5
        );
        assert_eq!(
            lt(&[
                ("cache-control", "public"),
                ("cache-control", "max-age=\"7\"")
            ])
            .unwrap()
            .ttl,
            7
        );
        assert_eq!(
            lt(&[("cache-control", "public, max-age=18446744073709551616")])
                .unwrap()
                .ttl,
            MAX_TTL_SECS
        );
    }

    #[test]
    fn forbidden_and_incomplete_cache_control_is_not_stored() {
        assert_eq!(lt(&[]), Err(NotCacheable::NoCacheControl));
        assert_eq!(
            lt(&[("cache-control", "max-age=9")]),
            Err(NotCacheable::NotPublic)
        );
        assert_eq!(
            lt(&[("cache-control", "public")]),
            Err(NotCacheable::NoLifetime)
        );
        assert_eq!(
            lt(&[("cache-control", "public, max-age=0")]),
            Err(NotCacheable::NoLifetime)
        );
        for f in ["private", "no-store", "no-cache", "No-Cache=\"x\""] {
            let v = format!("public, max-age=9, {f}");
            assert_eq!(lt(&[("cache-control", &v)]), Err(NotCacheable::Forbidden));
        }
        let cc = ("cache-control", "public, max-age=9");
        assert_eq!(
            lt(&[cc, ("set-cookie", "a=b")]),
            Err(NotCacheable::SetCookie)
        );
        assert_eq!(lt(&[cc, ("vary", "Cookie")]), Err(NotCacheable::Vary));
        assert_eq!(lt(&[cc, ("vary", "*")]), Err(NotCacheable::Vary));
        assert!(lt(&[cc, ("vary", "Accept-Encoding")]).unwrap().varies);
        assert!(!lt(&[cc]).unwrap().varies);
        assert_eq!(
            lifetime(404, [(&b"cache-control"[..], &b"public, max-age=9"[..])]),
            Err(NotCacheable::Status)
        );
    }

    #[test]
    fn a_varying_entry_answers_only_its_own_accept_encoding() {
        let key = |host: &str, variant: Option<&str>| CacheKey {
            host: host.into(),
            path: "/a".into(),
            variant: variant.map(Into::into),
        };
        let [c0, c1, c2] = CacheKey::candidates("h.test", "/a", Some(b" gzip "));
        assert_eq!(
            (c0, c1, c2),
            (
                key("h.test", None),
                key("h.test", Some("gzip")),
                key(ANY_HOST, None)
            )
        );
        let [_, none, _] = CacheKey::candidates("h.test", "/a", None);
        assert_eq!(none.variant.as_deref(), Some(""));
    }

    #[test]
    fn a_key_names_a_normalized_host_or_none_or_every_host() {
        let key = |host: &str| CacheKey {
            host: host.into(),
            path: "/a".into(),
            variant: None,
        };
        for ok in ["", "*", "a.test", "127.0.0.1", "[::1]"] {
            assert!(key(ok).is_valid(), "{ok}");
        }
        for bad in ["A.test", "a.test.", "a.test:80", "a b", "a\tb", "**"] {
            assert!(!key(bad).is_valid(), "{bad}");
        }
    }

    #[test]
    fn a_published_response_is_checked_and_stripped_of_per_answer_headers() {
        let raw = b"HTTP/1.1 200 OK\r\nDate: x\r\nCache-Control: public, max-age=60\r\nContent-Length: 5\r\nConnection: close\r\nx-a: 1\r\n\r\nhello";
        let s = check_response(raw, 4096).unwrap();
        assert_eq!(s.body, b"hello");
        assert_eq!(
            String::from_utf8(s.head).unwrap(),
            "HTTP/1.1 200 OK\r\nCache-Control: public, max-age=60\r\nx-a: 1\r\n"
        );
        assert_eq!(s.lifetime.ttl, 60);
        for bad in [
            &b"HTTP/1.1 200 OK\r\nCache-Control: public, max-age=60\r\nContent-Length: 9\r\n\r\nshort"[..],
            b"HTTP/1.1 200 OK\r\nCache-Control: public, max-age=60\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            b"HTTP/1.1 404 Not Found\r\nCache-Control: public, max-age=60\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            b"garbage",
        ] {
            assert!(check_response(bad, 4096).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(check_response(raw, 20), Err(BadResponse::TooLarge));
    }
}
