//! One rule for a request head, called by everyone who reads one: the dispatcher, every
//! worker and `sluice route`. It decides where the head ends, whether it is well formed, how
//! its body is framed, which path and host it names, and what it says about the connection;
//! or the status that refuses it. A head is judged the same whichever side reads it, so no
//! byte sequence can be one request to the front end and two to a worker.
//!
//! Stricter than RFC 9112 where leniency is a smuggling vector: lines end in CRLF only (a
//! bare LF or CR is 400), no NUL, no empty line before the request line, one `Host` (HTTP/1.1
//! must send it), at most one `Content-Length` made of digits, `Transfer-Encoding` only as a
//! single final `chunked` and never with `Content-Length` or in HTTP/1.0. The request line is
//! judged as soon as it ends, so an HTTP/0.9 line or `PRI * HTTP/2.0` is refused at once
//! rather than waiting for a blank line that never comes.

use std::borrow::Cow;

use crate::canonical::{self, CanonicalError};
use crate::host::{self, Host};
use crate::limits::HeadLimits;
use crate::target::{self, TargetError};

/// Why a head is refused: the status to answer (the connection closes after it) and a short
/// reason for the body and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
}

const fn refuse(status: u16, reason: &'static str) -> Refusal {
    Refusal { status, reason }
}

/// How the body after the head is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (no `Content-Length`, or `Content-Length: 0`).
    None,
    /// `Content-Length: n`, n > 0.
    Length(u64),
    Chunked,
}

/// What a complete, valid head says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head<'b> {
    /// Bytes of the head, blank line included: the body (or the next request) starts there.
    pub head_len: usize,
    pub method: &'b str,
    /// The raw request-target.
    pub target: &'b str,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// The raw path (before `?`; `/` for an absolute form without one).
    pub path: &'b str,
    pub query: Option<&'b str>,
    /// The path as routes see it (`canonical`).
    pub canonical: Cow<'b, str>,
    /// The authority of an absolute-form target, else the `Host` header.
    pub host: Option<Host<'b>>,
    pub framing: Framing,
    /// The connection may carry another request after this one.
    pub keep_alive: bool,
    /// `Expect: 100-continue` (HTTP/1.1 only).
    pub expect_continue: bool,
    pub has_authorization: bool,
    pub has_range: bool,
    /// The `Accept-Encoding` value, trimmed (what a `Vary: Accept-Encoding` entry varies on).
    pub accept_encoding: Option<&'b [u8]>,
}

impl Head<'_> {
    /// Whether a body follows the head.
    pub fn has_body(&self) -> bool {
        self.framing != Framing::None
    }
}

/// Whether the request at the start of `buf` is a `HEAD`, read from its first bytes, so that
/// a refusal of a head that does not parse still knows: an answer to `HEAD` carries no body
/// (a client would read the text as the start of the next response).
pub fn is_head(buf: &[u8]) -> bool {
    buf.starts_with(b"HEAD ")
}

/// The outcome of [`parse`].
#[derive(Debug)]
pub enum Parsed<'h, 'b> {
    /// The head has not ended yet and nothing so far is wrong: read more.
    Partial,
    /// The head is complete and valid; the parsed headers come with it.
    Complete(httparse::Request<'h, 'b>, Head<'b>),
}

/// Judges the request head at the start of `buf`. `headers` is the room for its header lines
/// (`limits::MAX_HEADERS` of them; more is 431).
pub fn parse<'h, 'b>(
    buf: &'b [u8],
    limits: &HeadLimits,
    headers: &'h mut [httparse::Header<'b>],
) -> Result<Parsed<'h, 'b>, Refusal> {
    let ends = scan(buf, limits)?;
    let Some(head_end) = ends.head_end else {
        return Ok(Parsed::Partial);
    };
    let mut req = httparse::Request::new(headers);
    match req.parse(&buf[..head_end]) {
        Ok(httparse::Status::Complete(n)) if n == head_end => {}
        Ok(_) => return Err(refuse(400, "the request head is malformed")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(refuse(431, "the request has too many header lines"));
        }
        Err(httparse::Error::Version) => {
            return Err(refuse(505, "only HTTP/1.0 and HTTP/1.1 are served"));
        }
        Err(httparse::Error::HeaderName | httparse::Error::HeaderValue) => {
            return Err(refuse(400, "a header line is malformed"));
        }
        Err(_) => return Err(refuse(400, "the request line is malformed")),
    }
    let head = facts(&req, head_end, limits)?;
    Ok(Parsed::Complete(req, head))
}

/// Where the first line and the head end, checking line endings on the way.
struct Ends {
    head_end: Option<usize>,
}

fn scan(buf: &[u8], limits: &HeadLimits) -> Result<Ends, Refusal> {
    if matches!(buf.first(), Some(b'\r' | b'\n')) {
        return Err(refuse(400, "the request starts with an empty line"));
    }
    // The method is a token: anything else is not HTTP, whatever follows.
    if let Some(&b) = buf
        .iter()
        .take_while(|&&b| b != b' ')
        .find(|&&b| !is_tchar(b))
    {
        if b != b'\r' {
            return Err(refuse(
                400,
                "the request does not start with an HTTP method",
            ));
        }
    }
    let window = buf.len().min(limits.max_request_head + 4);
    let mut line_start = 0;
    let mut first_line_end = None;
    let mut i = 0;
    while i < window {
        match buf[i] {
            b'\n' => return Err(refuse(400, "a line ends in a bare LF (CRLF is required)")),
            0 => return Err(refuse(400, "the request head holds a NUL byte")),
            b'\r' => {
                match buf.get(i + 1) {
                    None => break,
                    Some(b'\n') => {}
                    Some(_) => return Err(refuse(400, "a bare CR in the request head")),
                }
                if first_line_end.is_none() {
                    first_line_end = Some(i);
                    request_line(&buf[..i], limits)?;
                }
                if i == line_start && i > 0 {
                    let end = i + 2;
                    if end > limits.max_request_head {
                        return Err(refuse(431, "the request head is too large"));
                    }
                    return Ok(Ends {
                        head_end: Some(end),
                    });
                }
                i += 2;
                line_start = i;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    if first_line_end.is_none() && buf.len() > limits.max_url + 32 {
        return Err(refuse(414, "the request URL is too long"));
    }
    if buf.len() >= limits.max_request_head {
        return Err(refuse(431, "the request head is too large"));
    }
    Ok(Ends { head_end: None })
}

/// Judges a complete request line (`METHOD SP target SP HTTP/1.x`) on its own.
fn request_line(line: &[u8], limits: &HeadLimits) -> Result<(), Refusal> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refuse(
            400,
            "the request line is not `METHOD target HTTP/1.1`",
        ));
    };
    if target.len() > limits.max_url {
        return Err(refuse(414, "the request URL is too long"));
    }
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) || target.is_empty() {
        return Err(refuse(400, "the request line is malformed"));
    }
    match version {
        b"HTTP/1.1" | b"HTTP/1.0" => Ok(()),
        [b'H', b'T', b'T', b'P', b'/', d, b'.', e] if d.is_ascii_digit() && e.is_ascii_digit() => {
            Err(refuse(505, "only HTTP/1.0 and HTTP/1.1 are served"))
        }
        [b'H', b'T', b'T', b'P', b'/', d] if d.is_ascii_digit() => {
            Err(refuse(505, "only HTTP/1.0 and HTTP/1.1 are served"))
        }
        _ => Err(refuse(400, "the request line's HTTP version is malformed")),
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn facts<'b>(
    req: &httparse::Request<'_, 'b>,
    head_len: usize,
    limits: &HeadLimits,
) -> Result<Head<'b>, Refusal> {
    let method = req.method.unwrap_or("");
    let raw_target = req.path.unwrap_or("");
    let minor_version = req.version.unwrap_or(1);
    if raw_target.len() > limits.max_url {
        return Err(refuse(414, "the request URL is too long"));
    }
    let t = target::parse(raw_target).map_err(|e| match e {
        TargetError::Fragment => refuse(400, "the request target holds `#`"),
        TargetError::Asterisk => refuse(400, "the request target `*` names no resource"),
        TargetError::Form => refuse(400, "the request target is not a path or an http(s) URL"),
        TargetError::Scheme => refuse(400, "the request URL's scheme is not http or https"),
        TargetError::UserInfo => refuse(400, "the request URL holds user information"),
        TargetError::Authority(_) => refuse(400, "the request URL's host is not a valid host"),
    })?;
    let canonical = canonical::canonical_cow(t.path).map_err(|e| match e {
        CanonicalError::AboveRoot => refuse(400, "the request path climbs above `/`"),
        CanonicalError::BadEscape => refuse(400, "the request path has a bad %-escape"),
        CanonicalError::ControlByte => refuse(400, "the request path holds a control byte"),
        CanonicalError::NotUtf8 => refuse(400, "the request path is not UTF-8 once decoded"),
        CanonicalError::NotAbsolute => refuse(400, "the request path does not start with `/`"),
    })?;

    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut host_header: Option<Host<'b>> = None;
    let (mut close, mut keep) = (false, false);
    let mut expect_continue = false;
    let (mut has_authorization, mut has_range) = (false, false);
    let mut accept_encoding = None;
    for h in req.headers.iter() {
        let name = h.name;
        let value = h.value.trim_ascii();
        if name.eq_ignore_ascii_case("content-length") {
            if content_length.is_some() {
                return Err(refuse(400, "the request has more than one Content-Length"));
            }
            content_length = Some(
                content_length_value(value)
                    .ok_or(refuse(400, "the request's Content-Length is not a number"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked {
                return Err(refuse(
                    400,
                    "the request has more than one Transfer-Encoding",
                ));
            }
            if !value.eq_ignore_ascii_case(b"chunked") {
                return Err(refuse(
                    501,
                    "only the chunked transfer coding is understood",
                ));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("host") {
            if host_header.is_some() {
                return Err(refuse(400, "the request has more than one Host"));
            }
            host_header = Some(
                host::parse(value)
                    .map_err(|_| refuse(400, "the request's Host is not a valid host"))?,
            );
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case("expect") {
            if !value.eq_ignore_ascii_case(b"100-continue") {
                return Err(refuse(417, "only `Expect: 100-continue` is understood"));
            }
            expect_continue = minor_version == 1;
        } else if name.eq_ignore_ascii_case("authorization") {
            has_authorization = true;
        } else if name.eq_ignore_ascii_case("range") {
            has_range = true;
        } else if name.eq_ignore_ascii_case("accept-encoding") {
            accept_encoding = Some(value);
        }
    }
    if minor_version == 1 && host_header.is_none() {
        return Err(refuse(400, "an HTTP/1.1 request must have a Host header"));
    }
    let framing = match (chunked, content_length) {
        (true, Some(_)) => {
            return Err(refuse(
                400,
                "the request has both Transfer-Encoding and Content-Length",
            ));
        }
        (true, None) if minor_version == 0 => {
            return Err(refuse(400, "an HTTP/1.0 request cannot be chunked"));
        }
        (true, None) => Framing::Chunked,
        (false, Some(n)) if n > limits.max_request_body => {
            return Err(refuse(
                413,
                "the request body is larger than this server accepts",
            ));
        }
        (false, Some(0)) | (false, None) => Framing::None,
        (false, Some(n)) => Framing::Length(n),
    };
    let keep_alive = if minor_version == 0 {
        keep && !close
    } else {
        !close
    };
    Ok(Head {
        head_len,
        method,
        target: raw_target,
        minor_version,
        path: t.path,
        query: t.query,
        canonical,
        host: t.authority.or(host_header),
        framing,
        keep_alive,
        expect_continue,
        has_authorization,
        has_range,
        accept_encoding,
    })
}

/// Digits only (no sign, no space, no list), at most 19 of them.
pub(crate) fn content_length_value(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judge(raw: &[u8]) -> Result<Option<(String, Framing, bool)>, u16> {
        let mut headers = [httparse::EMPTY_HEADER; crate::limits::MAX_HEADERS];
        match parse(raw, &HeadLimits::default(), &mut headers) {
            Ok(Parsed::Partial) => Ok(None),
            Ok(Parsed::Complete(_, h)) => {
                Ok(Some((h.canonical.into_owned(), h.framing, h.keep_alive)))
            }
            Err(r) => Err(r.status),
        }
    }

    #[test]
    fn a_plain_request_names_its_canonical_path_and_host() {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let raw =
            b"GET /a/../b//c?q HTTP/1.1\r\nHost: Ex.test:81\r\nAccept-Encoding:  gzip \r\n\r\nrest";
        let Ok(Parsed::Complete(_, h)) = parse(raw, &HeadLimits::default(), &mut headers) else {
            panic!()
        };
        assert_eq!(h.canonical, "/b/c");
        assert_eq!((h.path, h.query), ("/a/../b//c", Some("q")));
        assert_eq!(h.host.unwrap().name, "Ex.test");
        assert_eq!(h.head_len, raw.len() - 4);
        assert_eq!(h.accept_encoding, Some(&b"gzip"[..]));
        assert!(h.keep_alive);
    }

    #[test]
    fn an_absolute_target_names_the_host_over_the_header() {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let raw = b"GET HTTP://a.test/x HTTP/1.1\r\nHost: b.test\r\n\r\n";
        let Ok(Parsed::Complete(_, h)) = parse(raw, &HeadLimits::default(), &mut headers) else {
            panic!()
        };
        assert_eq!((h.host.unwrap().name, &*h.canonical), ("a.test", "/x"));
    }

    #[test]
    fn an_incomplete_head_asks_for_more() {
        assert_eq!(judge(b""), Ok(None));
        assert_eq!(judge(b"GET /x HT"), Ok(None));
        assert_eq!(judge(b"GET /x HTTP/1.1\r"), Ok(None));
        assert_eq!(judge(b"GET /x HTTP/1.1\r\nHost: h\r\n"), Ok(None));
        assert_eq!(judge(b"GET /x HTTP/1.1\r\nHost: h\r\n\r"), Ok(None));
    }

    #[test]
    fn smuggling_forms_are_refused() {
        for raw in [
            &b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 41\r\n\r\n"[..],
            b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length:\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0 0\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\n",
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n",
            b"POST /a HTTP/1.1\r\nHost: x\r\n Transfer-Encoding: chunked\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",
        ] {
            assert!(
                matches!(judge(raw), Err(400)),
                "{:?} -> {:?}",
                String::from_utf8_lossy(raw),
                judge(raw)
            );
        }
        assert_eq!(
            judge(b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Err(501)
        );
        assert_eq!(
            judge(b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n"),
            Err(501)
        );
    }

    #[test]
    fn bare_line_endings_nul_and_leading_blank_lines_are_refused_at_once() {
        assert_eq!(judge(b"GET / HTTP/1.1\nHost: x\n\n"), Err(400));
        assert_eq!(judge(b"GET / HTTP/1.1\r\nHost: x\n\r\n"), Err(400));
        assert_eq!(judge(b"GET / HTTP/1.1\rHost: x\r\n\r\n"), Err(400));
        assert_eq!(judge(b"GET / HTTP/1.1\r\nHost: a\0b\r\n\r\n"), Err(400));
        assert_eq!(judge(b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"), Err(400));
        // Before the head ends: no wait for a blank line that never comes.
        assert_eq!(judge(b"GET / HTTP/1.1\nHost: x"), Err(400));
    }

    #[test]
    fn other_protocols_are_refused_when_the_request_line_ends() {
        assert_eq!(judge(b"GET /\r\n"), Err(400));
        assert_eq!(judge(b"PRI * HTTP/2.0\r\n"), Err(505));
        assert_eq!(judge(b"GET / HTTP/2\r\n"), Err(505));
        assert_eq!(judge(b"GET / HTTP/1.2\r\n"), Err(505));
        assert_eq!(judge(b"GET / FTP/1.1\r\n"), Err(400));
        assert_eq!(judge(b"GET  / HTTP/1.1\r\n"), Err(400));
        assert_eq!(judge(b"G(T / HTTP/1.1\r\n"), Err(400));
        // A TLS ClientHello on the plain port: refused on its first byte.
        assert_eq!(
            judge(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
            Err(400)
        );
        assert_eq!(judge(b"\x16"), Err(400));
    }

    #[test]
    fn hosts_are_required_single_and_valid() {
        assert_eq!(judge(b"GET / HTTP/1.1\r\n\r\n"), Err(400));
        assert_eq!(
            judge(b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"),
            Err(400)
        );
        for bad in ["a b", "a/b", "a@b", "[::1", "x:99999", ""] {
            let raw = format!("GET / HTTP/1.1\r\nHost: {bad}\r\n\r\n");
            assert_eq!(judge(raw.as_bytes()), Err(400), "{bad}");
        }
        assert!(judge(b"GET / HTTP/1.0\r\n\r\n").unwrap().is_some());
    }

    #[test]
    fn targets_with_fragments_or_foreign_forms_are_refused() {
        for t in [
            "/api/x#/../../admin/",
            "http://x#/admin/",
            "*",
            "ftp://h/x",
            "h:443",
            "/..",
        ] {
            let raw = format!("GET {t} HTTP/1.1\r\nHost: x\r\n\r\n");
            assert_eq!(judge(raw.as_bytes()), Err(400), "{t}");
        }
    }

    #[test]
    fn framing_and_keep_alive_follow_the_headers() {
        let ok = |raw: &[u8]| judge(raw).unwrap().unwrap();
        assert_eq!(ok(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").1, Framing::None);
        assert_eq!(
            ok(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").1,
            Framing::None
        );
        assert_eq!(
            ok(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n").1,
            Framing::Length(12)
        );
        assert_eq!(
            ok(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n").1,
            Framing::Chunked
        );
        assert!(!ok(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: x, close\r\n\r\n").2);
        assert!(!ok(b"GET / HTTP/1.0\r\n\r\n").2);
        assert!(ok(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").2);
        assert_eq!(
            judge(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 30000001\r\n\r\n"),
            Err(413)
        );
        assert_eq!(
            judge(b"GET / HTTP/1.1\r\nHost: x\r\nExpect: x\r\n\r\n"),
            Err(417)
        );
    }

    #[test]
    fn sizes_over_the_limits_are_414_and_431() {
        let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(17000));
        assert_eq!(judge(long.as_bytes()), Err(414));
        let unended = format!("GET /{}", "a".repeat(17000));
        assert_eq!(judge(unended.as_bytes()), Err(414));
        let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n", "a".repeat(17000));
        assert_eq!(judge(big.as_bytes()), Err(431));
        let many: String = (0..101).map(|i| format!("X{i}: y\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n");
        assert_eq!(judge(raw.as_bytes()), Err(431));
    }
}
