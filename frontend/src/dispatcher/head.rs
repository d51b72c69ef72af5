//! What the dispatcher does with the bytes a connection has sent so far: wait for more,
//! route the request to a pool, or refuse it with a status code.

use crate::{canonical, route::RouteTable};

/// Limits on a request head (HTTP.sys defaults).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_request_head: usize,
    pub max_url: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_head: 16 * 1024,
            max_url: 16 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The head is not complete yet.
    NeedMore,
    /// Hand the connection to this pool.
    Pool(usize),
    /// Answer with this status and a short reason, then close.
    Refuse(u16, &'static str),
}

const MAX_HEADERS: usize = 128;

/// A request the cache may answer: `GET`/`HEAD` without query, body, `Authorization` or
/// `Range`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheQuery {
    pub path: String,
    pub head_only: bool,
}

/// Everything the dispatcher learns from a complete head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    pub decision: Decision,
    /// Bytes of the head (the request ends there when it has no body).
    pub head_len: usize,
    pub cache: Option<CacheQuery>,
    /// The client wants the connection closed after this answer.
    pub close: bool,
}

pub fn decide(buf: &[u8], limits: &Limits, routes: &RouteTable) -> Decision {
    inspect(buf, limits, routes).decision
}

pub fn inspect(buf: &[u8], limits: &Limits, routes: &RouteTable) -> Inspection {
    let mut out = Inspection {
        decision: Decision::NeedMore,
        head_len: 0,
        cache: None,
        close: true,
    };
    out.decision = decide_into(buf, limits, routes, &mut out);
    out
}

fn decide_into(buf: &[u8], limits: &Limits, routes: &RouteTable, out: &mut Inspection) -> Decision {
    // The request line is the method, the URL and the version: longer than the URL limit
    // plus room for those is a URL over the limit, whatever else is wrong.
    let line_len = buf
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(buf.len());
    if line_len > limits.max_url + 32 {
        return Decision::Refuse(414, "the request URL is too long");
    }
    let head_end = match find_head_end(buf) {
        Some(end) => end,
        None if buf.len() >= limits.max_request_head => {
            return Decision::Refuse(431, "the request head is too large");
        }
        None => return Decision::NeedMore,
    };
    if head_end > limits.max_request_head {
        return Decision::Refuse(431, "the request head is too large");
    }
    out.head_len = head_end;
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let target = match req.parse(&buf[..head_end]) {
        Ok(httparse::Status::Complete(_)) => req.path.unwrap_or(""),
        Ok(httparse::Status::Partial) => {
            return Decision::Refuse(400, "the request head is malformed");
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Decision::Refuse(431, "the request has too many headers");
        }
        Err(httparse::Error::Version) => {
            return Decision::Refuse(400, "the request's HTTP version is not supported");
        }
        Err(_) => return Decision::Refuse(400, "the request head is malformed"),
    };
    if target.len() > limits.max_url {
        return Decision::Refuse(414, "the request URL is too long");
    }
    let Some(raw_path) = origin_path(target) else {
        return Decision::Refuse(400, "the request target is not a path");
    };
    let path = match canonical::canonicalize(raw_path.as_bytes()) {
        Ok(p) => p,
        Err(_) => return Decision::Refuse(400, "the request URL is not valid"),
    };
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let has = |name: &str, word: &str| {
        header(name).is_some_and(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case(word))
        })
    };
    out.close = if req.version == Some(0) {
        !has("connection", "keep-alive")
    } else {
        has("connection", "close")
    };
    let method = req.method.unwrap_or("");
    let no_body = header("transfer-encoding").is_none()
        && header("content-length").is_none_or(|v| v.iter().all(|b| *b == b'0' || *b == b' '));
    if (method == "GET" || method == "HEAD")
        && !target.contains('?')
        && no_body
        && header("authorization").is_none()
        && header("range").is_none()
    {
        out.cache = Some(CacheQuery {
            path: path.clone(),
            head_only: method == "HEAD",
        });
    }
    match routes.lookup(&path) {
        Some(pool) => Decision::Pool(pool),
        None => Decision::Refuse(400, "no application is configured for this URL"),
    }
}

/// Index just past the blank line that ends the head.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// The path of an origin-form (`/p?q`) or absolute-form (`http://h/p?q`) target.
fn origin_path(target: &str) -> Option<&str> {
    let rest = if target.starts_with('/') {
        target
    } else {
        let after_scheme = target
            .strip_prefix("http://")
            .or_else(|| target.strip_prefix("https://"))
            .or_else(|| target.strip_prefix("HTTP://"))?;
        // The authority ends at the first `/` or `?`: `http://h?q/x` is the path `/`.
        match after_scheme.find(['/', '?']) {
            Some(i) if after_scheme[i..].starts_with('/') => &after_scheme[i..],
            _ => "/",
        }
    };
    // Only `?` ends the path. A request target has no fragment, and the kernel program routes
    // `/api#x` by that whole path: cutting at `#` here would send it to another pool.
    Some(rest.split('?').next().unwrap_or(rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> RouteTable {
        RouteTable::new([("/api/".to_owned(), 1), ("/".to_owned(), 0)])
    }

    fn d(req: &[u8]) -> Decision {
        decide(req, &Limits::default(), &routes())
    }

    #[test]
    fn routes_complete_heads_by_canonical_path() {
        assert_eq!(
            d(b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n"),
            Decision::Pool(1)
        );
        assert_eq!(d(b"GET /apix HTTP/1.1\r\n\r\n"), Decision::Pool(0));
        assert_eq!(
            d(b"GET /x/../api/y?q=1 HTTP/1.1\r\n\r\n"),
            Decision::Pool(1)
        );
        assert_eq!(d(b"GET http://h/api/ HTTP/1.1\r\n\r\n"), Decision::Pool(1));
        assert_eq!(d(b"GET //api/x HTTP/1.1\r\n\r\n"), Decision::Pool(1));
    }

    #[test]
    fn waits_for_the_rest_of_the_head() {
        assert_eq!(d(b"GET /api/x HTTP/1.1\r\nHost: a\r\n"), Decision::NeedMore);
        assert_eq!(d(b""), Decision::NeedMore);
    }

    #[test]
    fn refuses_malformed_and_oversized_requests() {
        assert!(matches!(
            d(b"GET /a HTTP/9.9\r\n\r\n"),
            Decision::Refuse(400, _)
        ));
        assert!(matches!(
            d(b"G\x01T / HTTP/1.1\r\n\r\n"),
            Decision::Refuse(400, _)
        ));
        assert!(matches!(
            d(b"GET /%zz HTTP/1.1\r\n\r\n"),
            Decision::Refuse(400, _)
        ));
        assert!(matches!(
            d(b"GET /../x HTTP/1.1\r\n\r\n"),
            Decision::Refuse(400, _)
        ));
        assert!(matches!(
            d(b"GET * HTTP/1.1\r\n\r\n"),
            Decision::Refuse(400, _)
        ));
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(17000));
        assert!(matches!(d(long.as_bytes()), Decision::Refuse(414, _)));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(17000));
        assert!(matches!(d(big.as_bytes()), Decision::Refuse(431, _)));
    }

    #[test]
    fn hash_is_part_of_the_path_and_query_ends_the_authority() {
        // Found by fuzz/fuzz_targets/dispatcher_head.rs: the path was cut at `#`, so this was
        // routed on `/+` although its whole path does not canonicalize (and `/api#x` went to
        // /api/ here but to / in the kernel program).
        assert!(matches!(
            d(b"GET /+#/%2e%2/.p/iwwww%2Fz HTTP/1.1\r\n\r\n"),
            Decision::Refuse(400, _)
        ));
        assert_eq!(d(b"GET /api#x HTTP/1.1\r\n\r\n"), Decision::Pool(0));
        assert_eq!(d(b"GET /api/#x HTTP/1.1\r\n\r\n"), Decision::Pool(1));
        assert_eq!(
            d(b"GET http://h?/api/x HTTP/1.1\r\n\r\n"),
            Decision::Pool(0)
        );
    }

    #[test]
    fn no_route_is_400() {
        let t = RouteTable::new([("/api/".to_owned(), 1)]);
        assert!(matches!(
            decide(b"GET /web HTTP/1.1\r\n\r\n", &Limits::default(), &t),
            Decision::Refuse(400, _)
        ));
    }
}
