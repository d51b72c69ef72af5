//! What a handler answers: a status, headers and a body, which is bytes, a file streamed in
//! bounded chunks, or — after a `101 Switching Protocols` — the raw connection itself.

use std::{
    fs::File,
    io::{Read, Write},
    net::TcpStream,
    sync::Arc,
};

/// A response built by a handler. `Content-Length`, `Date`, `Server` and `Connection` are
/// added by the server; a handler's `Connection: close` closes the connection after it.
pub struct Response {
    pub(crate) status: u16,
    /// Serialized `name: value\r\n` lines.
    pub(crate) headers: Vec<u8>,
    pub(crate) body: Vec<u8>,
    pub(crate) close: bool,
    pub(crate) has_date: bool,
    pub(crate) has_server: bool,
    /// What follows the head instead of `body`.
    pub(crate) tail: Option<Tail>,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("body", &self.body.len())
            .field("tail", &self.tail)
            .finish()
    }
}

/// A body the server sends after the head, or a takeover of the connection.
pub(crate) enum Tail {
    /// `len` bytes of `file` from its start, read and sent in bounded chunks.
    File { file: Arc<File>, len: u64 },
    /// After the 101 is sent, the connection goes to this function on a thread of its own.
    Upgrade(Box<dyn FnOnce(Upgraded) + Send>),
}

impl std::fmt::Debug for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tail::File { len, .. } => write!(f, "File({len} bytes)"),
            Tail::Upgrade(_) => f.write_str("Upgrade"),
        }
    }
}

/// A connection taken over after `101 Switching Protocols` (a WebSocket, say): blocking
/// reads and writes on the socket, starting with the bytes the server had already read
/// after the request.
pub struct Upgraded {
    pub(crate) stream: TcpStream,
    pub(crate) read_ahead: Vec<u8>,
    pub(crate) offset: usize,
}

impl Upgraded {
    /// The socket, and the bytes that arrived after the request head and were read already
    /// (hand both to a protocol library: e.g. tungstenite's `WebSocket::from_partially_read`).
    pub fn into_parts(self) -> (TcpStream, Vec<u8>) {
        let mut rest = self.read_ahead;
        rest.drain(..self.offset);
        (self.stream, rest)
    }
}

impl Read for Upgraded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.offset < self.read_ahead.len() {
            let n = buf.len().min(self.read_ahead.len() - self.offset);
            buf[..n].copy_from_slice(&self.read_ahead[self.offset..self.offset + n]);
            self.offset += n;
            return Ok(n);
        }
        self.stream.read(buf)
    }
}

impl Write for Upgraded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

impl Response {
    /// An empty response with `status` (100..=999; anything else becomes 500).
    pub fn new(status: u16) -> Self {
        Response {
            status: if (100..=999).contains(&status) {
                status
            } else {
                500
            },
            headers: Vec::new(),
            body: Vec::new(),
            close: false,
            has_date: false,
            has_server: false,
            tail: None,
        }
    }

    /// `200 OK`.
    pub fn ok() -> Self {
        Response::new(200)
    }

    /// `404 Not Found` with a short text body.
    pub fn not_found() -> Self {
        Response::text(404, "not found\n")
    }

    /// A `text/plain; charset=utf-8` response.
    pub fn text(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Response::new(status)
            .header("content-type", "text/plain; charset=utf-8")
            .body(body)
    }

    /// Adds a header. Names or values with CR, LF or NUL are dropped (and logged);
    /// `Content-Length` and `Transfer-Encoding` are computed by the server and ignored here.
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        let value = value.as_ref();
        let valid_name =
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        if !valid_name || value.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0)) {
            log::warn!("dropping invalid response header {name:?}");
            return self;
        }
        if name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding")
        {
            return self;
        }
        if name.eq_ignore_ascii_case("connection") {
            self.close |= value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
            return self;
        }
        self.has_date |= name.eq_ignore_ascii_case("date");
        self.has_server |= name.eq_ignore_ascii_case("server");
        self.headers.extend_from_slice(name.as_bytes());
        self.headers.extend_from_slice(b": ");
        self.headers.extend_from_slice(value);
        self.headers.extend_from_slice(b"\r\n");
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self.tail = None;
        self
    }

    /// Sends the whole of `file` as the body, read and sent in bounded chunks (the worker
    /// never holds more than one chunk of it), with its length as `Content-Length`. Such a
    /// response is never published to the front end's cache.
    pub fn file(mut self, file: File) -> Self {
        match file.metadata() {
            Ok(m) => {
                self.body = Vec::new();
                self.tail = Some(Tail::File {
                    file: Arc::new(file),
                    len: m.len(),
                });
                self
            }
            Err(e) => {
                log::warn!("reading a response file's length: {e}");
                Response::text(500, "internal server error\n")
            }
        }
    }

    /// `101 Switching Protocols`: once it is sent, `then` takes over the connection on a
    /// thread of its own. Add the protocol's headers (`Upgrade: websocket`,
    /// `Sec-WebSocket-Accept`); the server adds `Connection: Upgrade`.
    pub fn upgrade(then: impl FnOnce(Upgraded) + Send + 'static) -> Self {
        let mut r = Response::new(101);
        r.tail = Some(Tail::Upgrade(Box::new(then)));
        r
    }

    /// The length of the body (bytes or file).
    pub(crate) fn body_len(&self) -> u64 {
        match &self.tail {
            Some(Tail::File { len, .. }) => *len,
            _ => self.body.len() as u64,
        }
    }

    /// Whether the body is a file or the response an upgrade.
    pub(crate) fn has_tail(&self) -> bool {
        self.tail.is_some()
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The body set so far.
    pub fn body_bytes(&self) -> &[u8] {
        &self.body
    }

    /// The headers set so far as (name, value), in order (not the ones the server adds).
    pub(crate) fn header_lines(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers
            .split(|&b| b == b'\n')
            .filter(|line| !line.is_empty())
            .filter_map(|line| {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let colon = line.iter().position(|&b| b == b':')?;
                Some((&line[..colon], line[colon + 1..].trim_ascii()))
            })
    }
}
