//! HTTP/1.1 on one connection: request heads (httparse), bodies (`Content-Length` and an
//! incremental in-place chunked decoder), keep-alive rules, pipelining and response
//! serialization. No I/O here: the runtime feeds bytes in and sends what comes out.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use sluice_proto::limits::MAX_HEADERS;
use sluice_proto::request::{self, Parsed, Refusal};

use crate::response::Tail;
use crate::{BodySink, Request, Response};

/// Longest chunk-extension or trailer section accepted in a chunked body.
const MAX_CHUNK_META: usize = 16 * 1024;

/// Size limits for one request: the shared ones.
pub(crate) type Limits = sluice_proto::limits::HeadLimits;

/// What the connection should do after [`HttpConn::process`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Send what is in the write buffer (if anything), then read more; `hint` is how many more
    /// bytes the current request still needs, when known (0 = unknown).
    NeedMore { hint: usize },
    /// Send what is in the write buffer, then close the connection (lingering close).
    Close,
    /// The next request belongs to the front end (another pool, its cache, no route): send
    /// what is in the write buffer, then hand the connection back. The read buffer starts at
    /// that request's first byte.
    HandBack,
}

/// What answers the requests of a connection.
pub(crate) trait Dispatch {
    /// Called for every complete request head before it is answered; true hands the
    /// connection back to the front end from this request on.
    fn hand_back(&mut self, _req: &Request<'_>) -> bool {
        false
    }

    /// Called for every complete request head first; true answers it 421 and closes the
    /// connection (it names a host this connection does not serve).
    fn misdirected(&mut self, _req: &Request<'_>) -> bool {
        false
    }

    /// Answers a complete request.
    fn respond(&mut self, req: &Request<'_>) -> Response;

    /// A sink for the body of a request whose body is not here yet (None: buffer it).
    fn stream_body(&mut self, _req: &Request<'_>) -> Option<Box<dyn BodySink>> {
        None
    }

    /// Answers a request whose body went to `sink`.
    fn finish(&mut self, sink: Box<dyn BodySink>, req: &Request<'_>) -> Response {
        sink.finish(req)
    }

    /// A request was refused with `status` (and a body of `bytes`) before any handler saw
    /// it; `input` holds what the connection sent from that request's first byte.
    fn refused(&mut self, _input: &[u8], _status: u16, _bytes: u64) {}
}

impl<F> Dispatch for F
where
    F: FnMut(&Request<'_>) -> Response,
{
    fn respond(&mut self, req: &Request<'_>) -> Response {
        self(req)
    }
}

/// How the body of a request is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(usize),
    Chunked,
}

/// What the head says about the request, without borrowing the buffer.
#[derive(Debug, Clone, Copy)]
struct HeadInfo {
    head_len: usize,
    framing: Framing,
    keep_alive: bool,
    http10: bool,
    expect_continue: bool,
}

impl HeadInfo {
    fn of(head: &request::Head<'_>) -> HeadInfo {
        HeadInfo {
            head_len: head.head_len,
            framing: match head.framing {
                request::Framing::None => Framing::None,
                // At most `max_request_body`, which fits.
                request::Framing::Length(n) => Framing::Length(n as usize),
                request::Framing::Chunked => Framing::Chunked,
            },
            keep_alive: head.keep_alive,
            http10: head.minor_version == 0,
            expect_continue: head.expect_continue,
        }
    }
}

/// A request whose head is complete but whose body is still arriving. It starts at offset 0 of
/// the read buffer (the buffer is compacted after every `process`).
struct Pending {
    info: HeadInfo,
    chunked: Option<ChunkedDecoder>,
    continue_sent: bool,
    /// Where the body goes as it arrives, when the handler streams it; its bytes are then
    /// dropped from the read buffer once given.
    sink: Option<Box<dyn BodySink>>,
    /// Body bytes given to the sink so far.
    streamed: usize,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("info", &self.info)
            .field("streamed", &self.sink.as_ref().map(|_| self.streamed))
            .finish()
    }
}

/// Per-connection HTTP state.
#[derive(Debug, Default)]
pub(crate) struct HttpConn {
    limits: Limits,
    pending: Option<Pending>,
    /// Final responses written so far (handler responses and rejections; not `100 Continue`).
    responses: u64,
    /// What follows the last response written (a file body, an upgrade): the runtime sends
    /// `wbuf`, then takes it, and only then are later requests processed.
    tail: Option<Tail>,
}

/// A request-level error answered with a status and `Connection: close`.
type Reject = Refusal;

/// A body that breaks the chunked syntax.
const BAD_CHUNK: Reject = Refusal {
    status: 400,
    reason: "the chunked request body is malformed",
};
/// A body over the limit.
const TOO_LARGE: Reject = Refusal {
    status: 413,
    reason: "the request body is larger than this server accepts",
};

impl HttpConn {
    pub(crate) fn new(limits: Limits) -> Self {
        HttpConn {
            limits,
            pending: None,
            responses: 0,
            tail: None,
        }
    }

    /// The tail of the last response written, if it has one (see `Response::file`,
    /// `Response::upgrade`).
    pub(crate) fn take_tail(&mut self) -> Option<Tail> {
        self.tail.take()
    }

    /// How many final responses [`HttpConn::process`] has written on this connection.
    pub(crate) fn responses(&self) -> u64 {
        self.responses
    }

    /// True while a request head is partly received (its header timeout runs).
    pub(crate) fn in_head(&self, rbuf: &[u8]) -> bool {
        self.pending.is_none() && !rbuf.is_empty()
    }

    /// True when no request is partly received: the connection is idle between requests.
    pub(crate) fn is_idle(&self, rbuf: &[u8]) -> bool {
        self.pending.is_none() && rbuf.is_empty()
    }

    /// Parses and answers every complete request in `rbuf`, in order, appending the responses
    /// to `wbuf`. Consumed bytes are removed from `rbuf`. `closing` makes the next response the
    /// last one (graceful stop).
    pub(crate) fn process<F>(
        &mut self,
        rbuf: &mut Vec<u8>,
        wbuf: &mut Vec<u8>,
        closing: bool,
        handler: &mut F,
    ) -> Outcome
    where
        F: Dispatch,
    {
        let mut pos = 0;
        let outcome = loop {
            let step = if self.pending.is_some() {
                self.continue_body(rbuf, wbuf, closing, handler)
            } else if pos == rbuf.len() {
                break Outcome::NeedMore { hint: 0 };
            } else {
                self.start_request(rbuf, pos, wbuf, closing, handler)
            };
            match step {
                Step::Done {
                    consumed,
                    keep_alive,
                } => {
                    self.responses += 1;
                    pos += consumed;
                    if !keep_alive {
                        break Outcome::Close;
                    }
                    if self.tail.is_some() {
                        // Later pipelined requests wait until the tail is sent.
                        break Outcome::NeedMore { hint: 0 };
                    }
                }
                Step::BodyPending => {
                    // Move the request to the front so the body state's offsets start at 0.
                    rbuf.drain(..pos);
                    pos = 0;
                }
                Step::Incomplete => {
                    let hint = self
                        .pending
                        .as_ref()
                        .map_or(0, |p| p.bytes_wanted(rbuf.len()));
                    break Outcome::NeedMore { hint };
                }
                Step::Rejected(refusal) => {
                    self.pending = None;
                    self.responses += 1;
                    let head_only = request::is_head(&rbuf[pos..]);
                    let bytes = write_refusal(wbuf, &refusal, head_only);
                    handler.refused(&rbuf[pos..], refusal.status, bytes);
                    break Outcome::Close;
                }
                Step::HandBack => break Outcome::HandBack,
            }
        };
        if outcome == Outcome::Close {
            rbuf.clear();
        } else if pos > 0 {
            rbuf.drain(..pos);
        }
        outcome
    }

    /// Parses a new request head at `rbuf[pos..]`; answers it at once when its body is already
    /// in the buffer (the common case), otherwise records it as pending.
    fn start_request<F>(
        &mut self,
        rbuf: &[u8],
        pos: usize,
        wbuf: &mut Vec<u8>,
        closing: bool,
        handler: &mut F,
    ) -> Step
    where
        F: Dispatch,
    {
        let input = &rbuf[pos..];
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let (parsed, head) = match request::parse(input, &self.limits, &mut headers) {
            Ok(Parsed::Partial) => return Step::Incomplete,
            Ok(Parsed::Complete(parsed, head)) => (parsed, head),
            Err(refusal) => {
                log::debug!("refusing a request: {}", refusal.reason);
                return Step::Rejected(refusal);
            }
        };
        let info = HeadInfo::of(&head);
        let head_len = info.head_len;
        let keep_alive = info.keep_alive && !closing;
        // The request whole when its body is already here (the common case), else its head.
        let complete = match info.framing {
            Framing::None => Some(head_len),
            Framing::Length(n) if input.len() - head_len >= n => Some(head_len + n),
            Framing::Length(_) | Framing::Chunked => None,
        };
        let body = complete.map_or(&[][..], |end| &input[head_len..end]);
        let req = Request::new(head, parsed.headers, body);
        if handler.misdirected(&req) {
            return Step::Rejected(Refusal {
                status: 421,
                reason: "this connection serves another host; connect again for this one",
            });
        }
        if handler.hand_back(&req) {
            return Step::HandBack;
        }
        match complete {
            Some(consumed) => {
                let (keep_alive, tail) = respond(wbuf, &req, keep_alive, info.http10, handler);
                self.tail = tail;
                Step::Done {
                    consumed,
                    keep_alive,
                }
            }
            None => {
                let chunked =
                    (info.framing == Framing::Chunked).then(|| ChunkedDecoder::new(head_len));
                let sink = handler.stream_body(&req);
                self.pending = Some(Pending {
                    info,
                    chunked,
                    continue_sent: false,
                    sink,
                    streamed: 0,
                });
                Step::BodyPending
            }
        }
    }

    /// Advances the pending request's body with the bytes now in `rbuf` (the request starts at
    /// offset 0) and answers it once complete.
    fn continue_body<F>(
        &mut self,
        rbuf: &mut Vec<u8>,
        wbuf: &mut Vec<u8>,
        closing: bool,
        handler: &mut F,
    ) -> Step
    where
        F: Dispatch,
    {
        let Some(pending) = self.pending.as_mut() else {
            return Step::Incomplete;
        };
        if pending.sink.is_some() {
            return self.stream_body(rbuf, wbuf, closing, handler);
        }
        let info = pending.info;
        let (body_end, consumed) = match pending.chunked.as_mut() {
            None => {
                let Framing::Length(n) = info.framing else {
                    return Step::Rejected(BAD_CHUNK);
                };
                if rbuf.len() < info.head_len + n {
                    return pending.incomplete(wbuf);
                }
                (info.head_len + n, info.head_len + n)
            }
            Some(decoder) => match decoder.decode(rbuf, self.limits.max_request_body as usize) {
                Ok(Decoded::Done { body_end, consumed }) => (body_end, consumed),
                Ok(Decoded::NeedMore) => return pending.incomplete(wbuf),
                Err(reject) => return Step::Rejected(reject),
            },
        };
        self.pending = None;
        let (head_bytes, rest) = rbuf.split_at(info.head_len);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let Ok(Parsed::Complete(parsed, head)) =
            request::parse(head_bytes, &self.limits, &mut headers)
        else {
            // The same bytes were judged valid when the head arrived.
            return Step::Rejected(BAD_CHUNK);
        };
        let keep_alive = info.keep_alive && !closing;
        let req = Request::new(head, parsed.headers, &rest[..body_end - info.head_len]);
        let (keep_alive, tail) = respond(wbuf, &req, keep_alive, info.http10, handler);
        self.tail = tail;
        Step::Done {
            consumed,
            keep_alive,
        }
    }
}

impl HttpConn {
    /// `continue_body` for a body that goes to the handler's sink: whatever body bytes are
    /// here are given and dropped from `rbuf` (the head stays at its start), so the buffer
    /// holds one read's worth, not the body.
    fn stream_body<F>(
        &mut self,
        rbuf: &mut Vec<u8>,
        wbuf: &mut Vec<u8>,
        closing: bool,
        handler: &mut F,
    ) -> Step
    where
        F: Dispatch,
    {
        let Some(pending) = self.pending.as_mut() else {
            return Step::Incomplete;
        };
        let info = pending.info;
        let head_len = info.head_len;
        let max_body = self.limits.max_request_body as usize;
        // (end of the body's bytes here, end of the request's input) once complete.
        let done = match (&mut pending.chunked, info.framing) {
            (None, Framing::Length(n)) => {
                let take = (rbuf.len() - head_len).min(n - pending.streamed);
                if let Some(sink) = pending.sink.as_mut() {
                    sink.data(&rbuf[head_len..head_len + take]);
                }
                pending.streamed += take;
                if pending.streamed == n {
                    Some(head_len + take)
                } else {
                    rbuf.truncate(head_len);
                    None
                }
            }
            (Some(decoder), _) => {
                let left = max_body.saturating_sub(pending.streamed);
                match decoder.decode(rbuf, left) {
                    Ok(Decoded::Done { body_end, consumed }) => {
                        if let Some(sink) = pending.sink.as_mut() {
                            sink.data(&rbuf[head_len..body_end]);
                        }
                        Some(consumed)
                    }
                    Ok(Decoded::NeedMore) => {
                        let (out, raw) = decoder.rebase();
                        if let Some(sink) = pending.sink.as_mut() {
                            sink.data(&rbuf[head_len..out]);
                        }
                        pending.streamed += out - head_len;
                        rbuf.drain(head_len..raw);
                        None
                    }
                    Err(reject) => return Step::Rejected(reject),
                }
            }
            (None, _) => return Step::Rejected(BAD_CHUNK),
        };
        let Some(consumed) = done else {
            return pending.incomplete(wbuf);
        };
        let Some(sink) = self.pending.take().and_then(|p| p.sink) else {
            return Step::Rejected(BAD_CHUNK);
        };
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let Ok(Parsed::Complete(parsed, head)) =
            request::parse(&rbuf[..head_len], &self.limits, &mut headers)
        else {
            return Step::Rejected(BAD_CHUNK);
        };
        let keep_alive = info.keep_alive && !closing;
        let req = Request::new(head, parsed.headers, &[]);
        let resp = handler.finish(sink, &req);
        let (keep_alive, tail) = write(wbuf, resp, &req, keep_alive, info.http10);
        self.tail = tail;
        Step::Done {
            consumed,
            keep_alive,
        }
    }
}

enum Step {
    /// A request was answered; `consumed` bytes of input belong to it.
    Done {
        consumed: usize,
        keep_alive: bool,
    },
    /// A head was parsed; its body is handled by the pending state from now on.
    BodyPending,
    /// More input is needed.
    Incomplete,
    Rejected(Reject),
    /// The request at the current position goes back to the front end.
    HandBack,
}

impl Pending {
    fn incomplete(&mut self, wbuf: &mut Vec<u8>) -> Step {
        if self.info.expect_continue && !self.continue_sent {
            wbuf.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            self.continue_sent = true;
        }
        Step::Incomplete
    }

    /// How many more bytes the body needs, when known.
    fn bytes_wanted(&self, have: usize) -> usize {
        match (self.info.framing, &self.chunked) {
            (Framing::Length(n), _) => {
                (self.info.head_len + n).saturating_sub(have + self.streamed)
            }
            (_, Some(d)) => d.bytes_wanted(),
            _ => 0,
        }
    }
}

/// Calls the handler and serializes its response; returns whether the connection stays
/// open and the response's tail, when one follows it on the wire.
fn respond<F>(
    wbuf: &mut Vec<u8>,
    req: &Request<'_>,
    keep_alive: bool,
    http10: bool,
    handler: &mut F,
) -> (bool, Option<Tail>)
where
    F: Dispatch,
{
    let resp = handler.respond(req);
    write(wbuf, resp, req, keep_alive, http10)
}

/// Serializes a handler's response to `req`; returns what `respond` does.
fn write(
    wbuf: &mut Vec<u8>,
    mut resp: Response,
    req: &Request<'_>,
    keep_alive: bool,
    http10: bool,
) -> (bool, Option<Tail>) {
    let head_only = req.method() == "HEAD";
    // An upgrade needs a request that asked for one; else it is a handler error.
    if matches!(resp.tail, Some(Tail::Upgrade(_))) && !asks_upgrade(req) {
        log::warn!("a handler upgraded a request that asked for no upgrade; answering 500");
        resp = Response::text(500, "internal server error\n").header("connection", "close");
    }
    let upgrade = matches!(resp.tail, Some(Tail::Upgrade(_)));
    let keep_alive = (keep_alive || upgrade) && !resp.close;
    write_response(wbuf, &resp, keep_alive, http10, head_only);
    let tail = match resp.tail.take() {
        Some(Tail::File { .. }) if head_only || bodiless(resp.status) => None,
        tail => tail,
    };
    (keep_alive, tail)
}

/// The request says `Connection: upgrade` and names a protocol in `Upgrade`.
fn asks_upgrade(req: &Request<'_>) -> bool {
    let connection = req.header("connection").unwrap_or_default();
    req.header("upgrade").is_some_and(|u| !u.is_empty())
        && connection
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
}

/// Appends `resp` to `wbuf` with the framing headers the server owns.
pub(crate) fn write_response(
    wbuf: &mut Vec<u8>,
    resp: &Response,
    keep_alive: bool,
    http10: bool,
    head_only: bool,
) {
    serialize(wbuf, resp, Some((keep_alive, http10)), head_only);
}

/// `resp` as [`write_response`] puts it on the wire for a GET, but without the `Date` and
/// `Connection` headers: what the front end's cache stores (it adds those per answer).
pub(crate) fn write_cacheable(wbuf: &mut Vec<u8>, resp: &Response) {
    serialize(wbuf, resp, None, false);
}

/// `connection`: (keep_alive, http10) for the wire; None for the cache (no `Date`, no
/// `Connection`).
fn serialize(
    wbuf: &mut Vec<u8>,
    resp: &Response,
    connection: Option<(bool, bool)>,
    head_only: bool,
) {
    let status = resp.status;
    wbuf.reserve(128 + resp.headers.len() + resp.body.len());
    let upgrade = matches!(resp.tail, Some(Tail::Upgrade(_)));
    wbuf.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(wbuf, u64::from(status));
    wbuf.push(b' ');
    wbuf.extend_from_slice(reason(status).as_bytes());
    wbuf.extend_from_slice(b"\r\n");
    if !resp.has_server {
        wbuf.extend_from_slice(b"Server: sluice-worker\r\n");
    }
    if connection.is_none() {
        // What the front end adds to every answer itself is left out (the handler's own
        // `Date` too), by the rule the front end stores by.
        for line in resp.headers.split_inclusive(|&b| b == b'\n') {
            let name = line.split(|&b| b == b':').next().unwrap_or_default();
            if !sluice_proto::cache::per_answer_header(name) {
                wbuf.extend_from_slice(line);
            }
        }
    } else {
        if !resp.has_date {
            wbuf.extend_from_slice(b"Date: ");
            push_date(wbuf);
            wbuf.extend_from_slice(b"\r\n");
        }
        wbuf.extend_from_slice(&resp.headers);
    }
    let bodiless = bodiless(status);
    if !bodiless {
        wbuf.extend_from_slice(b"Content-Length: ");
        push_decimal(wbuf, resp.body_len());
        wbuf.extend_from_slice(b"\r\n");
    }
    match connection {
        _ if upgrade => wbuf.extend_from_slice(b"Connection: Upgrade\r\n"),
        Some((false, _)) => wbuf.extend_from_slice(b"Connection: close\r\n"),
        Some((true, true)) => wbuf.extend_from_slice(b"Connection: keep-alive\r\n"),
        Some((true, false)) | None => {}
    }
    wbuf.extend_from_slice(b"\r\n");
    if !head_only && !bodiless {
        wbuf.extend_from_slice(&resp.body);
    }
}

/// Statuses whose responses never carry a body (RFC 9110 §6.4.1).
fn bodiless(status: u16) -> bool {
    (100..200).contains(&status) || status == 204 || status == 304
}

/// Bytes of `resp`'s body that go on the wire (none for HEAD and bodiless statuses).
pub(crate) fn body_bytes_sent(resp: &Response, head_only: bool) -> u64 {
    if head_only || bodiless(resp.status) {
        0
    } else {
        resp.body_len()
    }
}

/// Appends the answer to a refused request, which closes the connection; returns the
/// length of its body.
pub(crate) fn write_refusal(wbuf: &mut Vec<u8>, refusal: &Refusal, head_only: bool) -> u64 {
    write_error_to(wbuf, refusal.status, refusal.reason, head_only)
}

/// Appends a short error response that closes the connection; returns the length of its
/// body.
pub(crate) fn write_error(wbuf: &mut Vec<u8>, status: u16, why: &str) -> u64 {
    write_error_to(wbuf, status, why, false)
}

/// The same, to a `HEAD` when `head_only`: the head alone; returns the bytes of body sent.
fn write_error_to(wbuf: &mut Vec<u8>, status: u16, why: &str, head_only: bool) -> u64 {
    let body = format!("{} {}: {why}\n", status, reason(status));
    let len = body.len() as u64;
    let resp = Response::new(status)
        .header("content-type", "text/plain")
        .body(body);
    write_response(wbuf, &resp, false, false, head_only);
    if head_only { 0 } else { len }
}

fn push_decimal(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

/// Standard reason phrase for `status` ("" for unknown codes, which HTTP allows).
pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

thread_local! {
    /// The formatted `Date` value and the second it was formatted for.
    static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
}

fn push_date(buf: &mut Vec<u8>) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(sec, text)| {
        if *sec != now {
            *text = http_date(now);
            *sec = now;
        }
        buf.extend_from_slice(text);
    });
}

/// Formats seconds since the epoch as an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn http_date(secs: u64) -> [u8; 29] {
    const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, rem / 60 % 60, rem % 60);
    // Civil-from-days (Howard Hinnant), valid for dates after 1970.
    let z = days as i64 + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);

    let mut out = [0u8; 29];
    out[..3].copy_from_slice(DAYS[(days % 7) as usize]);
    out[3..5].copy_from_slice(b", ");
    two(&mut out[5..7], day as u64);
    out[7] = b' ';
    out[8..11].copy_from_slice(MONTHS[(month - 1) as usize]);
    out[11] = b' ';
    two(&mut out[12..14], (year / 100) as u64);
    two(&mut out[14..16], (year % 100) as u64);
    out[16] = b' ';
    two(&mut out[17..19], h);
    out[19] = b':';
    two(&mut out[20..22], m);
    out[22] = b':';
    two(&mut out[23..25], s);
    out[25..29].copy_from_slice(b" GMT");
    out
}

fn two(out: &mut [u8], v: u64) {
    out[0] = b'0' + (v / 10 % 10) as u8;
    out[1] = b'0' + (v % 10) as u8;
}

/// Result of feeding bytes to the chunked decoder.
#[derive(Debug, PartialEq, Eq)]
enum Decoded {
    NeedMore,
    /// The body is `buf[head_len..body_end]`; the request used `consumed` input bytes.
    Done {
        body_end: usize,
        consumed: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading hex digits of a chunk size.
    Size,
    /// Skipping a chunk extension up to CR.
    Extension,
    /// Expecting LF after the size line's CR.
    SizeLf,
    /// Copying chunk data; the count is what is left of this chunk.
    Data(usize),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final blank line).
    TrailerStart,
    TrailerLine,
    TrailerLineLf,
    FinalLf,
}

/// Decodes `Transfer-Encoding: chunked` in place: decoded data is moved down to follow the
/// head directly, so the body ends up contiguous in the read buffer without another copy, and
/// decoding resumes where it stopped when more bytes arrive.
#[derive(Debug)]
struct ChunkedDecoder {
    state: ChunkState,
    /// Next undecoded input byte.
    raw: usize,
    /// End of the decoded body so far.
    out: usize,
    head_len: usize,
    size: usize,
    digits: usize,
    meta: usize,
}

impl ChunkedDecoder {
    fn new(head_len: usize) -> Self {
        ChunkedDecoder {
            state: ChunkState::Size,
            raw: head_len,
            out: head_len,
            head_len,
            size: 0,
            digits: 0,
            meta: 0,
        }
    }

    fn bytes_wanted(&self) -> usize {
        match self.state {
            ChunkState::Data(n) => n + 2,
            _ => 0,
        }
    }

    /// For a streamed body: returns (end of the decoded bytes, first undecoded byte) and
    /// starts both over right after the head, where the caller moves what is undecoded.
    fn rebase(&mut self) -> (usize, usize) {
        let at = (self.out, self.raw);
        self.out = self.head_len;
        self.raw = self.head_len;
        at
    }

    fn decode(&mut self, buf: &mut [u8], max_body: usize) -> Result<Decoded, Reject> {
        use ChunkState::*;
        const BAD: Reject = BAD_CHUNK;
        while self.raw < buf.len() {
            if let Data(left) = self.state {
                let n = left.min(buf.len() - self.raw);
                buf.copy_within(self.raw..self.raw + n, self.out);
                self.raw += n;
                self.out += n;
                self.state = if left == n { DataCr } else { Data(left - n) };
                continue;
            }
            let b = buf[self.raw];
            self.raw += 1;
            self.state = match (self.state, b) {
                (Size, _) if b.is_ascii_hexdigit() => {
                    let digit = (b as char).to_digit(16).unwrap_or(0) as usize;
                    self.size = self
                        .size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(digit))
                        .ok_or(TOO_LARGE)?;
                    if self.out - self.head_len + self.size > max_body {
                        return Err(TOO_LARGE);
                    }
                    self.digits += 1;
                    Size
                }
                (Size, b';' | b' ' | b'\t') if self.digits > 0 => Extension,
                (Size, b'\r') if self.digits > 0 => SizeLf,
                (Extension, b'\r') => SizeLf,
                (Extension, b'\n') => return Err(BAD),
                (Extension, _) => {
                    self.meta += 1;
                    if self.meta > MAX_CHUNK_META {
                        return Err(BAD);
                    }
                    Extension
                }
                (SizeLf, b'\n') => {
                    let size = std::mem::take(&mut self.size);
                    self.digits = 0;
                    if size == 0 { TrailerStart } else { Data(size) }
                }
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => Size,
                (TrailerStart, b'\r') => FinalLf,
                (TrailerStart | TrailerLine, b'\n') => return Err(BAD),
                (TrailerStart | TrailerLine, _) => {
                    self.meta += 1;
                    if self.meta > MAX_CHUNK_META {
                        return Err(BAD_CHUNK);
                    }
                    if b == b'\r' {
                        TrailerLineLf
                    } else {
                        TrailerLine
                    }
                }
                (TrailerLineLf, b'\n') => TrailerStart,
                (FinalLf, b'\n') => {
                    return Ok(Decoded::Done {
                        body_end: self.out,
                        consumed: self.raw,
                    });
                }
                _ => return Err(BAD),
            };
        }
        Ok(Decoded::NeedMore)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `input` (fed in the given pieces) through one connection, answering every request
    /// with its method, path and body. Returns the response bytes and the last outcome.
    fn run(pieces: &[&[u8]], limits: Limits) -> (String, Outcome) {
        let mut conn = HttpConn::new(limits);
        let mut rbuf = Vec::new();
        let mut wbuf = Vec::new();
        let mut outcome = Outcome::NeedMore { hint: 0 };
        let mut handler = |req: &Request<'_>| {
            let mut body = format!("{} {} ", req.method(), req.path()).into_bytes();
            body.extend_from_slice(req.body());
            Response::new(200).body(body)
        };
        for piece in pieces {
            rbuf.extend_from_slice(piece);
            outcome = conn.process(&mut rbuf, &mut wbuf, false, &mut handler);
            if outcome == Outcome::Close {
                break;
            }
        }
        (String::from_utf8_lossy(&wbuf).into_owned(), outcome)
    }

    fn statuses(out: &str) -> Vec<&str> {
        out.match_indices("HTTP/1.1 ")
            .filter(|(i, _)| {
                out.as_bytes()
                    .get(i + 9..i + 12)
                    .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
            })
            .map(|(i, _)| &out[i + 9..i + 12])
            .collect()
    }

    #[test]
    fn pipelined_requests_are_answered_in_order_in_one_batch() {
        let input = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\n\r\nGET /d HT";
        let (out, outcome) = run(&[input], Limits::default());
        assert_eq!(statuses(&out), ["200", "200", "200"]);
        let a = out.find("GET /a").unwrap();
        let b = out.find("GET /b").unwrap();
        let c = out.find("GET /c").unwrap();
        assert!(a < b && b < c);
        assert_eq!(outcome, Outcome::NeedMore { hint: 0 });
    }

    #[test]
    fn request_split_across_reads_is_answered_once_complete() {
        let (out, outcome) = run(
            &[b"GET /x HTTP/1.1\r\nHo", b"st: x\r\n", b"\r\n"],
            Limits::default(),
        );
        assert_eq!(statuses(&out), ["200"]);
        assert_eq!(outcome, Outcome::NeedMore { hint: 0 });
    }

    #[test]
    fn content_length_body_split_across_reads() {
        let (out, _) = run(
            &[
                b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234",
                b"56789GET /n HTTP/1.1\r\nHost: x\r\n\r\n",
            ],
            Limits::default(),
        );
        assert!(out.contains("POST /p 0123456789"), "{out}");
        assert!(out.contains("GET /n "), "{out}");
    }

    #[test]
    fn chunked_body_is_decoded() {
        let input = b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: y\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\n\r\n";
        let (out, _) = run(&[input], Limits::default());
        assert!(out.contains("POST /c hello world"), "{out}");
        assert!(out.contains("GET /after "), "{out}");
    }

    #[test]
    fn chunked_body_split_at_every_byte_is_decoded() {
        let input: &[u8] =
            b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\na\r\n0123456789\r\n0\r\n\r\n";
        let pieces: Vec<&[u8]> = input.chunks(1).collect();
        let (out, outcome) = run(&pieces, Limits::default());
        assert!(out.contains("POST /c abc0123456789"), "{out}");
        assert_eq!(outcome, Outcome::NeedMore { hint: 0 });
        assert_eq!(statuses(&out), ["200"]);
    }

    #[test]
    fn bad_chunk_syntax_is_rejected_with_400() {
        for body in [
            &b"zz\r\nabc\r\n0\r\n\r\n"[..],
            b"3\r\nabcX\r\n0\r\n\r\n",
            b"\r\n",
            b"3\nabc\r\n0\r\n\r\n",
        ] {
            let mut input =
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            input.extend_from_slice(body);
            let (out, outcome) = run(&[&input], Limits::default());
            assert_eq!(statuses(&out), ["400"], "{}", String::from_utf8_lossy(body));
            assert_eq!(outcome, Outcome::Close);
            assert!(out.contains("Connection: close"));
        }
    }

    #[test]
    fn content_length_with_chunked_is_rejected_with_400() {
        let input = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let (out, outcome) = run(&[input], Limits::default());
        assert_eq!(statuses(&out), ["400"]);
        assert_eq!(outcome, Outcome::Close);
    }

    #[test]
    fn conflicting_content_lengths_are_rejected_with_400() {
        let input =
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd";
        assert_eq!(statuses(&run(&[input], Limits::default()).0), ["400"]);
    }

    #[test]
    fn malformed_request_line_is_rejected_with_400() {
        let (out, outcome) = run(&[b"GET / HTTP/1.1 extra\r\n\r\n"], Limits::default());
        assert_eq!(statuses(&out), ["400"]);
        assert_eq!(outcome, Outcome::Close);
        let (out, _) = run(&[b"\x00\x01garbage\r\n\r\n"], Limits::default());
        assert_eq!(statuses(&out), ["400"]);
    }

    #[test]
    fn http11_without_host_is_rejected_with_400() {
        assert_eq!(
            statuses(&run(&[b"GET / HTTP/1.1\r\n\r\n"], Limits::default()).0),
            ["400"]
        );
    }

    #[test]
    fn oversized_body_is_rejected_with_413_before_reading_it() {
        let limits = Limits {
            max_request_body: 100,
            ..Limits::default()
        };
        let (out, outcome) = run(
            &[b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n"],
            limits,
        );
        assert_eq!(statuses(&out), ["413"]);
        assert_eq!(outcome, Outcome::Close);
    }

    #[test]
    fn oversized_chunked_body_is_rejected_with_413() {
        let limits = Limits {
            max_request_body: 8,
            ..Limits::default()
        };
        let input = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n";
        assert_eq!(statuses(&run(&[input], limits).0), ["413"]);
    }

    #[test]
    fn long_url_is_rejected_with_414() {
        let mut input = b"GET /".to_vec();
        input.extend(std::iter::repeat_n(b'a', 17 * 1024));
        let (out, outcome) = run(&[&input], Limits::default());
        assert_eq!(statuses(&out), ["414"]);
        assert_eq!(outcome, Outcome::Close);
    }

    #[test]
    fn oversized_head_is_rejected_with_431() {
        let mut input = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
        for i in 0..400 {
            input.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "v".repeat(40)).as_bytes());
        }
        let (out, outcome) = run(&[&input], Limits::default());
        assert_eq!(statuses(&out), ["431"]);
        assert_eq!(outcome, Outcome::Close);
    }

    #[test]
    fn too_many_headers_is_rejected_with_431() {
        let mut input = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
        for i in 0..(MAX_HEADERS + 1) {
            input.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        input.extend_from_slice(b"\r\n");
        assert_eq!(statuses(&run(&[&input], Limits::default()).0), ["431"]);
    }

    #[test]
    fn http11_keeps_alive_by_default_and_closes_on_request() {
        let (out, outcome) = run(&[b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"], Limits::default());
        assert!(!out.contains("Connection:"));
        assert_eq!(outcome, Outcome::NeedMore { hint: 0 });

        let (out, outcome) =
            run(&[b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /ignored HTTP/1.1\r\nHost: x\r\n\r\n"], Limits::default());
        assert!(out.contains("Connection: close"));
        assert_eq!(
            statuses(&out),
            ["200"],
            "nothing after the closing request is answered"
        );
        assert_eq!(outcome, Outcome::Close);
    }

    #[test]
    fn http10_closes_unless_keep_alive_is_asked_for() {
        let (out, outcome) = run(&[b"GET / HTTP/1.0\r\n\r\n"], Limits::default());
        assert!(out.contains("Connection: close"));
        assert_eq!(outcome, Outcome::Close);

        let (out, outcome) = run(
            &[b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"],
            Limits::default(),
        );
        assert!(out.contains("Connection: keep-alive"));
        assert_eq!(outcome, Outcome::NeedMore { hint: 0 });
    }

    #[test]
    fn expect_100_continue_is_answered_before_the_body() {
        let mut conn = HttpConn::new(Limits::default());
        let mut rbuf =
            b"POST /u HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
                .to_vec();
        let mut wbuf = Vec::new();
        let mut handler = |req: &Request<'_>| Response::new(200).body(req.body().to_vec());
        let outcome = conn.process(&mut rbuf, &mut wbuf, false, &mut handler);
        assert_eq!(outcome, Outcome::NeedMore { hint: 3 });
        assert_eq!(wbuf, b"HTTP/1.1 100 Continue\r\n\r\n");
        wbuf.clear();
        rbuf.extend_from_slice(b"abc");
        conn.process(&mut rbuf, &mut wbuf, false, &mut handler);
        let out = String::from_utf8_lossy(&wbuf);
        assert!(
            out.starts_with("HTTP/1.1 200 OK\r\n") && out.ends_with("\r\n\r\nabc"),
            "{out}"
        );
        assert!(rbuf.is_empty());
    }

    #[test]
    fn head_response_has_length_but_no_body() {
        let (out, _) = run(&[b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n"], Limits::default());
        assert!(out.contains("Content-Length: 8\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\n"), "{out}");
    }

    #[test]
    fn responses_carry_length_date_and_server() {
        let (out, _) = run(&[b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"], Limits::default());
        assert!(out.contains("Content-Length: 7\r\n"), "{out}");
        assert!(out.contains("Date: ") && out.contains(" GMT\r\n"), "{out}");
        assert!(out.contains("Server: sluice-worker\r\n"), "{out}");
    }

    #[test]
    fn closing_connection_marks_the_next_response_final() {
        let mut conn = HttpConn::new(Limits::default());
        let mut rbuf =
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let mut wbuf = Vec::new();
        let outcome = conn.process(&mut rbuf, &mut wbuf, true, &mut |_: &Request<'_>| {
            Response::new(200)
        });
        assert_eq!(outcome, Outcome::Close);
        let out = String::from_utf8_lossy(&wbuf);
        assert_eq!(statuses(&out), ["200"]);
        assert!(out.contains("\r\nConnection: close\r\n"), "{out}");
        assert!(rbuf.is_empty(), "the rest of the input is dropped");
        assert_eq!(conn.responses(), 1);
    }

    #[test]
    fn request_in_progress_when_stopping_is_answered_with_connection_close() {
        // A keep-alive connection that has sent part of a request when the stop begins: the
        // request is still answered, its response is final.
        let mut conn = HttpConn::new(Limits::default());
        let mut handler = |_: &Request<'_>| Response::new(200).body("done");
        let mut rbuf = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab".to_vec();
        let mut wbuf = Vec::new();
        let outcome = conn.process(&mut rbuf, &mut wbuf, false, &mut handler);
        assert!(matches!(outcome, Outcome::NeedMore { .. }));
        assert!(wbuf.is_empty() && !conn.is_idle(&rbuf));
        rbuf.extend_from_slice(b"cd");
        let outcome = conn.process(&mut rbuf, &mut wbuf, true, &mut handler);
        assert_eq!(outcome, Outcome::Close);
        let out = String::from_utf8_lossy(&wbuf);
        assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
        assert!(out.contains("\r\nConnection: close\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\ndone"), "{out}");
        assert_eq!(conn.responses(), 1);
    }

    #[test]
    fn rejections_count_as_responses_but_continue_does_not() {
        let mut conn = HttpConn::new(Limits::default());
        let mut rbuf = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nBAD\x01 / HTTP/1.1\r\n\r\n".to_vec();
        let mut wbuf = Vec::new();
        let outcome = conn.process(&mut rbuf, &mut wbuf, false, &mut |_: &Request<'_>| {
            Response::new(200)
        });
        assert_eq!(outcome, Outcome::Close);
        assert_eq!(statuses(&String::from_utf8_lossy(&wbuf)), ["200", "400"]);
        assert_eq!(conn.responses(), 2);

        let mut conn = HttpConn::new(Limits::default());
        let mut rbuf =
            b"PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
                .to_vec();
        let mut wbuf = Vec::new();
        conn.process(&mut rbuf, &mut wbuf, false, &mut |_: &Request<'_>| {
            Response::new(200)
        });
        assert_eq!(statuses(&String::from_utf8_lossy(&wbuf)), ["100"]);
        assert_eq!(conn.responses(), 0);
    }

    /// Hands back every request whose path starts with `/web`.
    struct HandBackWeb(Vec<String>);

    impl Dispatch for HandBackWeb {
        fn hand_back(&mut self, req: &Request<'_>) -> bool {
            req.path().starts_with("/web")
        }

        fn respond(&mut self, req: &Request<'_>) -> Response {
            self.0.push(req.path().to_owned());
            Response::new(200).body(req.path().to_owned())
        }
    }

    #[test]
    fn foreign_request_stops_processing_and_keeps_its_bytes_for_the_hand_back() {
        let mut conn = HttpConn::new(Limits::default());
        let mut rbuf = b"GET /api/a HTTP/1.1\r\nHost: x\r\n\r\nGET /web/b HTTP/1.1\r\nHost: x\r\n\r\nGET /api/c HTTP/1.1\r\nHost: x\r\n\r\nGET /api/d HT".to_vec();
        let mut wbuf = Vec::new();
        let mut dispatch = HandBackWeb(Vec::new());
        let outcome = conn.process(&mut rbuf, &mut wbuf, false, &mut dispatch);
        assert_eq!(outcome, Outcome::HandBack);
        assert_eq!(
            dispatch.0,
            ["/api/a"],
            "nothing after the foreign request is answered"
        );
        assert_eq!(statuses(&String::from_utf8_lossy(&wbuf)), ["200"]);
        assert_eq!(
            rbuf,
            b"GET /web/b HTTP/1.1\r\nHost: x\r\n\r\nGET /api/c HTTP/1.1\r\nHost: x\r\n\r\nGET /api/d HT"
        );
        assert_eq!(conn.responses(), 1, "a hand-back is not a response");
    }

    #[test]
    fn foreign_request_with_a_body_is_handed_back_before_its_body_or_100_continue() {
        let mut conn = HttpConn::new(Limits::default());
        let input = b"POST /web/u HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\nabc";
        let mut rbuf = input.to_vec();
        let mut wbuf = Vec::new();
        let outcome = conn.process(&mut rbuf, &mut wbuf, false, &mut HandBackWeb(Vec::new()));
        assert_eq!(outcome, Outcome::HandBack);
        assert!(wbuf.is_empty());
        assert_eq!(rbuf, input);
    }

    #[test]
    fn canonical_path_computed_from_the_head_reaches_the_handler_after_the_body() {
        let mut conn = HttpConn::new(Limits::default());
        let mut rbuf = b"POST /a/./b HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n".to_vec();
        let mut wbuf = Vec::new();
        struct Check;
        impl Dispatch for Check {
            fn hand_back(&mut self, req: &Request<'_>) -> bool {
                assert!(req.head().has_body());
                assert_eq!(req.canonical_path(), "/a/b");
                false
            }
            fn respond(&mut self, req: &Request<'_>) -> Response {
                Response::new(200).body(format!("{:?}", req.canonical_path()))
            }
        }
        conn.process(&mut rbuf, &mut wbuf, false, &mut Check);
        rbuf.extend_from_slice(b"hi");
        conn.process(&mut rbuf, &mut wbuf, false, &mut Check);
        assert!(String::from_utf8_lossy(&wbuf).ends_with("\"/a/b\""));
    }

    #[test]
    fn http_date_formats_known_instants() {
        assert_eq!(&http_date(784_111_777), b"Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(&http_date(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(&http_date(1_709_164_800), b"Thu, 29 Feb 2024 00:00:00 GMT");
    }

    #[test]
    fn a_file_body_gets_its_length_and_holds_back_later_pipelined_requests() {
        use std::io::Write as _;
        let path = std::env::temp_dir().join(format!("sluice-http-file-{}", std::process::id()));
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(b"0123456789"))
            .unwrap();
        let mut conn = HttpConn::new(Limits::default());
        let mut rbuf =
            b"GET /f HTTP/1.1\r\nHost: a\r\n\r\nGET /g HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        let mut wbuf = Vec::new();
        let mut handler = |req: &Request<'_>| match req.path() {
            "/f" => Response::new(200).file(std::fs::File::open(&path).unwrap()),
            _ => Response::new(200).body("g"),
        };
        let outcome = conn.process(&mut rbuf, &mut wbuf, false, &mut handler);
        let out = String::from_utf8_lossy(&wbuf).into_owned();
        assert_eq!(outcome, Outcome::NeedMore { hint: 0 });
        assert!(
            out.contains("Content-Length: 10\r\n") && out.ends_with("\r\n\r\n"),
            "{out}"
        );
        assert_eq!(statuses(&out).len(), 1, "{out}");
        assert!(matches!(conn.take_tail(), Some(Tail::File { len: 10, .. })));
        // Once the tail is sent, the next request is answered.
        wbuf.clear();
        conn.process(&mut rbuf, &mut wbuf, false, &mut handler);
        assert!(String::from_utf8_lossy(&wbuf).ends_with("\r\n\r\ng"));
        // HEAD: the length, no tail.
        let mut head = b"HEAD /f HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        wbuf.clear();
        conn.process(&mut head, &mut wbuf, false, &mut handler);
        assert!(String::from_utf8_lossy(&wbuf).contains("Content-Length: 10\r\n"));
        assert!(conn.take_tail().is_none());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn an_upgrade_answers_101_with_connection_upgrade_only_when_the_request_asked() {
        let mut handler =
            |_: &Request<'_>| Response::upgrade(|_| {}).header("upgrade", "websocket");
        let mut conn = HttpConn::new(Limits::default());
        let mut wbuf = Vec::new();
        let mut asked = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nextra".to_vec();
        conn.process(&mut asked, &mut wbuf, false, &mut handler);
        let out = String::from_utf8_lossy(&wbuf).into_owned();
        assert!(
            out.starts_with("HTTP/1.1 101 ") && out.contains("Connection: Upgrade\r\n"),
            "{out}"
        );
        assert!(!out.contains("Content-Length"), "{out}");
        assert!(matches!(conn.take_tail(), Some(Tail::Upgrade(_))));
        // What followed the request stays for the new protocol.
        assert_eq!(asked, b"extra");
        let mut conn = HttpConn::new(Limits::default());
        let mut wbuf = Vec::new();
        let mut plain = b"GET /ws HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        let outcome = conn.process(&mut plain, &mut wbuf, false, &mut handler);
        assert!(String::from_utf8_lossy(&wbuf).starts_with("HTTP/1.1 500 "));
        assert_eq!(outcome, Outcome::Close);
        assert!(conn.take_tail().is_none());
    }

    /// A sink that records what it was given, for the streaming tests.
    struct Collect(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl BodySink for Collect {
        fn data(&mut self, chunk: &[u8]) {
            self.0.lock().unwrap().extend_from_slice(chunk);
        }
        fn finish(self: Box<Self>, req: &Request<'_>) -> Response {
            let n = self.0.lock().unwrap().len();
            Response::new(200).body(format!("{} {n}", req.path()))
        }
    }

    struct Streaming(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Dispatch for Streaming {
        fn respond(&mut self, req: &Request<'_>) -> Response {
            Response::new(200).body(format!("{} whole", req.path()))
        }
        fn stream_body(&mut self, _req: &Request<'_>) -> Option<Box<dyn BodySink>> {
            Some(Box::new(Collect(self.0.clone())))
        }
    }

    #[test]
    fn a_streamed_body_reaches_the_sink_piece_by_piece_and_never_fills_the_buffer() {
        for chunked in [false, true] {
            let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let mut handler = Streaming(got.clone());
            let mut conn = HttpConn::new(Limits::default());
            let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
            let mut input = if chunked {
                let mut v =
                    b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                for piece in body.chunks(7000) {
                    v.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                    v.extend_from_slice(piece);
                    v.extend_from_slice(b"\r\n");
                }
                v.extend_from_slice(b"0\r\n\r\n");
                v
            } else {
                let mut v = format!(
                    "POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                v.extend_from_slice(&body);
                v
            };
            input.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n");
            let mut rbuf = Vec::new();
            let mut wbuf = Vec::new();
            let mut largest = 0;
            for piece in input.chunks(4096) {
                rbuf.extend_from_slice(piece);
                largest = largest.max(rbuf.len());
                conn.process(&mut rbuf, &mut wbuf, false, &mut handler);
            }
            let out = String::from_utf8_lossy(&wbuf).into_owned();
            assert_eq!(*got.lock().unwrap(), body, "chunked={chunked}");
            assert!(out.contains("\r\n\r\n/up 100000"), "{out}");
            assert!(out.ends_with("\r\n\r\n/next whole"), "{out}");
            // The head and at most one piece (plus a chunk's framing) are ever held.
            assert!(largest < 2 * 4096 + 200, "chunked={chunked}: {largest}");
        }
    }

    #[test]
    fn a_streamed_chunked_body_over_the_limit_is_refused_413() {
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut handler = Streaming(got);
        let limits = Limits {
            max_request_body: 10_000,
            ..Limits::default()
        };
        let mut conn = HttpConn::new(limits);
        let mut rbuf =
            b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let mut wbuf = Vec::new();
        let mut outcome = Outcome::NeedMore { hint: 0 };
        for _ in 0..4 {
            rbuf.extend_from_slice(b"1000\r\n");
            rbuf.extend_from_slice(&[b'x'; 0x1000]);
            rbuf.extend_from_slice(b"\r\n");
            outcome = conn.process(&mut rbuf, &mut wbuf, false, &mut handler);
            if outcome == Outcome::Close {
                break;
            }
        }
        assert_eq!(outcome, Outcome::Close);
        assert!(String::from_utf8_lossy(&wbuf).starts_with("HTTP/1.1 413 "));
    }
}
