//! Where an HTTP/1 message body ends, and what a pool's response head says, without I/O:
//! the delivery path forwards bytes verbatim and needs only to know how many of them belong
//! to the message in flight. Anything a pool writes past the end of its answer is not the
//! client's (`Framer::advance` never counts it), and a head that could be read two ways is
//! refused (502), so a pool cannot write into the next request's answer.

use sluice_proto::limits::MAX_HEADERS;

/// Most bytes of a chunk-size line (size, extensions) and of the trailer section.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;
/// Most bytes of a pool's response head.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("malformed chunked body")]
    Chunked,
    #[error("chunk-size line or trailers too long")]
    TooLong,
}

/// How much of a byte stream is the current message's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framer {
    /// This many bytes remain.
    Length(u64),
    Chunked(Chunked),
    /// Everything until the sender closes.
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Hex digits of a chunk size.
    Size,
    /// Extensions after the size, up to CR.
    Ext,
    /// The LF after the size line.
    SizeLf,
    /// Chunk data.
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer line.
    Trailer,
    TrailerLf,
    /// The LF of the final empty line.
    LastLf,
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunked {
    state: ChunkState,
    size: u64,
    digits: usize,
    line: usize,
    trailers: usize,
}

impl Chunked {
    pub fn new() -> Chunked {
        Chunked {
            state: ChunkState::Size,
            size: 0,
            digits: 0,
            line: 0,
            trailers: 0,
        }
    }

    /// (bytes of `input` that belong to the body, the body ended).
    fn advance(&mut self, input: &[u8]) -> Result<(usize, bool), FramingError> {
        use ChunkState::*;
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                Done => return Ok((i, true)),
                Size => match hex(b) {
                    Some(d) => {
                        self.digits += 1;
                        if self.digits > 15 {
                            return Err(FramingError::Chunked);
                        }
                        self.size = self.size << 4 | u64::from(d);
                    }
                    None if self.digits == 0 => return Err(FramingError::Chunked),
                    None if b == b'\r' => self.state = SizeLf,
                    None if b == b';' || b == b' ' || b == b'\t' => {
                        self.state = Ext;
                        self.line = 0;
                    }
                    None => return Err(FramingError::Chunked),
                },
                Ext => {
                    self.line += 1;
                    if self.line > MAX_CHUNK_LINE {
                        return Err(FramingError::TooLong);
                    }
                    match b {
                        b'\r' => self.state = SizeLf,
                        b'\n' | 0 => return Err(FramingError::Chunked),
                        _ => {}
                    }
                }
                SizeLf => {
                    if b != b'\n' {
                        return Err(FramingError::Chunked);
                    }
                    self.digits = 0;
                    if self.size == 0 {
                        self.state = TrailerStart;
                    } else {
                        self.state = Data;
                    }
                }
                Data => {
                    let take =
                        (input.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = DataCr;
                    }
                    continue;
                }
                DataCr => {
                    if b != b'\r' {
                        return Err(FramingError::Chunked);
                    }
                    self.state = DataLf;
                }
                DataLf => {
                    if b != b'\n' {
                        return Err(FramingError::Chunked);
                    }
                    self.state = Size;
                }
                TrailerStart => match b {
                    b'\r' => self.state = LastLf,
                    b'\n' | 0 => return Err(FramingError::Chunked),
                    _ => {
                        self.state = Trailer;
                        self.trailers += 1;
                    }
                },
                Trailer => {
                    self.trailers += 1;
                    if self.trailers > MAX_TRAILERS {
                        return Err(FramingError::TooLong);
                    }
                    match b {
                        b'\r' => self.state = TrailerLf,
                        b'\n' | 0 => return Err(FramingError::Chunked),
                        _ => {}
                    }
                }
                TrailerLf => {
                    if b != b'\n' {
                        return Err(FramingError::Chunked);
                    }
                    self.state = TrailerStart;
                }
                LastLf => {
                    if b != b'\n' {
                        return Err(FramingError::Chunked);
                    }
                    self.state = Done;
                    return Ok((i + 1, true));
                }
            }
            i += 1;
        }
        Ok((i, self.state == Done))
    }
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked::new()
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

impl Framer {
    /// The body of a request the head rule accepted.
    pub fn request(framing: sluice_proto::request::Framing) -> Framer {
        match framing {
            sluice_proto::request::Framing::None => Framer::Length(0),
            sluice_proto::request::Framing::Length(n) => Framer::Length(n),
            sluice_proto::request::Framing::Chunked => Framer::Chunked(Chunked::new()),
        }
    }

    /// Nothing more belongs to the message (an `UntilClose` body ends only at EOF).
    pub fn done(&self) -> bool {
        match self {
            Framer::Length(n) => *n == 0,
            Framer::Chunked(c) => c.state == ChunkState::Done,
            Framer::UntilClose => false,
        }
    }

    /// How many bytes at the start of `input` belong to the body; the rest is not this
    /// message's.
    pub fn advance(&mut self, input: &[u8]) -> Result<usize, FramingError> {
        match self {
            Framer::Length(n) => {
                let take = (input.len() as u64).min(*n);
                *n -= take;
                Ok(take as usize)
            }
            Framer::Chunked(c) => c.advance(input).map(|(n, _)| n),
            Framer::UntilClose => Ok(input.len()),
        }
    }
}

/// What a pool's complete response head says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub head_len: usize,
    pub status: u16,
    /// An interim answer (1xx other than 101): another head follows.
    pub interim: bool,
    /// 101: the connection becomes the pool's tunnel.
    pub upgrade: bool,
    pub body: Framer,
    /// The pool closes the connection after this answer.
    pub close: bool,
}

/// Why a pool's answer is refused (the client gets 502).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadResponse {
    #[error("the response head is malformed")]
    Malformed,
    #[error("the response head is longer than {MAX_RESPONSE_HEAD} bytes")]
    TooLong,
    #[error("the response's Content-Length is invalid or repeated with another value")]
    Length,
    #[error("the response has both Transfer-Encoding and Content-Length")]
    Ambiguous,
}

/// Reads the response head at the start of `buf`, the answer to a request whose method
/// was `HEAD` when `head_request`. Ok(None): not complete yet.
pub fn response_head(buf: &[u8], head_request: bool) -> Result<Option<ResponseHead>, BadResponse> {
    let Some(end) = find_head_end(buf) else {
        return if buf.len() > MAX_RESPONSE_HEAD {
            Err(BadResponse::TooLong)
        } else {
            Ok(None)
        };
    };
    if end > MAX_RESPONSE_HEAD {
        return Err(BadResponse::TooLong);
    }
    let head = &buf[..end];
    // Lines end in CRLF only, and hold no NUL: what the client reads is what was judged.
    for (i, &b) in head.iter().enumerate() {
        let bare_lf = b == b'\n' && (i == 0 || head[i - 1] != b'\r');
        let bare_cr = b == b'\r' && head.get(i + 1) != Some(&b'\n');
        if b == 0 || bare_lf || bare_cr {
            return Err(BadResponse::Malformed);
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == end => {}
        _ => return Err(BadResponse::Malformed),
    }
    let status = resp.code.ok_or(BadResponse::Malformed)?;
    let http10 = resp.version == Some(0);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut close = http10;
    for h in resp.headers.iter() {
        let value = std::str::from_utf8(h.value).map_err(|_| BadResponse::Malformed)?;
        if h.name.eq_ignore_ascii_case("content-length") {
            for v in value.split(',') {
                let v = v.trim();
                if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(BadResponse::Length);
                }
                let n: u64 = v.parse().map_err(|_| BadResponse::Length)?;
                if length.is_some_and(|l| l != n) {
                    return Err(BadResponse::Length);
                }
                length = Some(n);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',') {
                let t = token.trim();
                if t.eq_ignore_ascii_case("close") {
                    close = true;
                } else if t.eq_ignore_ascii_case("keep-alive") && http10 {
                    close = false;
                }
            }
        }
    }
    let interim = (100..200).contains(&status) && status != 101;
    let upgrade = status == 101;
    let no_body = head_request || (100..200).contains(&status) || status == 204 || status == 304;
    let body = if no_body {
        Framer::Length(0)
    } else if transfer_encoding {
        if length.is_some() {
            return Err(BadResponse::Ambiguous);
        }
        if chunked {
            Framer::Chunked(Chunked::new())
        } else {
            close = true;
            Framer::UntilClose
        }
    } else if let Some(n) = length {
        Framer::Length(n)
    } else {
        close = true;
        Framer::UntilClose
    };
    Ok(Some(ResponseHead {
        head_len: end,
        status,
        interim,
        upgrade,
        body,
        close,
    }))
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(f: &mut Framer, input: &[u8]) -> usize {
        f.advance(input).unwrap()
    }

    #[test]
    fn a_chunked_body_ends_after_its_trailers_and_not_a_byte_later() {
        let body = b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\nGET /next";
        let mut f = Framer::Chunked(Chunked::new());
        let n = whole(&mut f, body);
        assert_eq!(&body[n..], b"GET /next");
        assert!(f.done());
        // The same, a byte at a time.
        let mut f = Framer::Chunked(Chunked::new());
        let mut total = 0;
        for b in body.iter() {
            total += whole(&mut f, std::slice::from_ref(b));
            if f.done() {
                break;
            }
        }
        assert_eq!(total, n);
    }

    #[test]
    fn malformed_chunks_are_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloXX",
            b"5\nhello",
            b"1234567890abcdef0\r\n",
            b"0\r\nbad\ntrailer\r\n\r\n",
        ] {
            let mut f = Framer::Chunked(Chunked::new());
            assert!(
                f.advance(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_length_body_takes_exactly_its_length() {
        let mut f = Framer::Length(3);
        assert_eq!(whole(&mut f, b"ab"), 2);
        assert_eq!(whole(&mut f, b"cdef"), 1);
        assert!(f.done());
    }

    #[test]
    fn response_heads_are_framed_by_status_method_and_headers() {
        let h = |raw: &[u8], head: bool| response_head(raw, head).unwrap().unwrap();
        let r = h(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false);
        assert_eq!(
            (r.head_len, r.body.clone(), r.close),
            (38, Framer::Length(5), false)
        );
        assert_eq!(
            h(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true).body,
            Framer::Length(0)
        );
        assert_eq!(
            h(
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
                false
            )
            .body,
            Framer::Length(0)
        );
        assert!(h(b"HTTP/1.1 100 Continue\r\n\r\n", false).interim);
        assert!(
            h(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
                false
            )
            .upgrade
        );
        let r = h(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
        );
        assert!(matches!(r.body, Framer::Chunked(_)));
        let r = h(b"HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!((r.body, r.close), (Framer::UntilClose, true));
        assert!(h(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false).close);
        assert!(
            !h(
                b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
                false
            )
            .close
        );
        assert!(
            h(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                false
            )
            .close
        );
        assert_eq!(
            response_head(b"HTTP/1.1 200 OK\r\nContent-Le", false),
            Ok(None)
        );
    }

    #[test]
    fn response_heads_that_could_be_read_two_ways_are_refused() {
        for (raw, want) in [
            (
                &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"[..],
                BadResponse::Length,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                BadResponse::Length,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                BadResponse::Ambiguous,
            ),
            (
                b"HTTP/1.1 200 OK\nContent-Length: 1\r\n\r\n",
                BadResponse::Malformed,
            ),
            (
                b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n",
                BadResponse::Malformed,
            ),
            (b"NOT HTTP\r\n\r\n", BadResponse::Malformed),
        ] {
            assert_eq!(
                response_head(raw, false),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let long = vec![b'a'; MAX_RESPONSE_HEAD + 1];
        assert_eq!(response_head(&long, false), Err(BadResponse::TooLong));
    }
}
