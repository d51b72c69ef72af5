//! `sluice-worker`: the library a sluice worker process is built on.
//!
//! A worker gets its sockets from the sluice front end (systemd socket-activation convention:
//! `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES` with `pool` listening sockets, one `handoff`
//! SEQPACKET socket and one `control` SEQPACKET socket), or binds `SLUICE_LISTEN` / `--listen`
//! itself when run standalone. It serves HTTP/1.1 on one io_uring per thread and calls a
//! [`Handler`] for every request.
//!
//! On the `control` socket the front end sends `ping <seq>` (answered with
//! `pong <seq> requests=<n> rss_kib=<n>` by thread 0's ring, so a worker whose threads are stuck
//! does not answer) and `stop` (as SIGTERM); the worker sends `stats requests=<n>` at most once a
//! second when its response count changed. EOF on it stops the worker gracefully.
//!
//! Routing is per request, as in HTTP.sys: the front end also sends the whole route table
//! (`routes\n<prefix> <pool>\n...`) and the set of paths it serves from its cache
//! (`cached\n<path>\n...`). A request whose canonical path routes to another pool, to no pool,
//! to a cached path (for a cache-eligible request) or cannot be canonicalized is not answered:
//! once the earlier responses on its connection are sent, the connection goes back to the front
//! end on the `handoff` socket with every unconsumed byte from that request on. An empty table
//! (or no handoff socket) turns this off. Responses a handler marks cacheable
//! (`Cache-Control: public, max-age=N` and the rules in `publish.rs`) are published to the
//! front end's cache on the control socket (`cache <N> <path>\n` + the response).
//!
//! A graceful stop (SIGTERM, SIGINT, `stop`) stops accepting, answers the request in progress
//! on each keep-alive connection with `Connection: close`, closes idle connections at once and
//! returns when no connection remains (in-progress ones are cut after about 5 s; after 10 s
//! the threads are given up on and [`run`] returns an error).
//!
//! ```no_run
//! use sluice_worker::{Context, Request, Response};
//!
//! fn main() -> Result<(), sluice_worker::Error> {
//!     sluice_worker::run(|_req: &Request<'_>, _ctx: &Context| Response::new(200).body("hi\n"))
//! }
//! ```

mod control;
mod handoff;
mod http;
mod publish;
mod routing;
mod runtime;
mod sockets;

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use sluice_common::canonical::{CanonicalError, canonicalize};

/// Everything that can stop a worker from starting or running. Its `Debug` output is the
/// message itself, so `fn main() -> Result<(), Error>` reports it readably.
#[derive(thiserror::Error)]
pub enum Error {
    #[error(
        "no sockets to serve: start the worker under the sluice front end (LISTEN_FDS) \
         or give listen addresses with SLUICE_LISTEN=ADDR[,ADDR...] or --listen ADDR"
    )]
    NoSockets,
    #[error("invalid {name}={value:?}: {reason}")]
    InvalidEnv {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("invalid arguments: {0} (usage: [--listen ADDR]...)")]
    Usage(String),
    #[error("inherited fd {fd} ({name}) is not {expected}")]
    BadInheritedFd {
        fd: i32,
        name: String,
        expected: &'static str,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("io_uring: {0}")]
    Ring(std::io::Error),
    #[error("worker thread failed: {0}")]
    Thread(String),
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// One parsed HTTP request, borrowed from the connection's buffer.
#[derive(Debug)]
pub struct Request<'a> {
    method: &'a str,
    target: &'a str,
    minor_version: u8,
    headers: &'a [httparse::Header<'a>],
    body: &'a [u8],
    /// The canonical path, computed on first use (routing or the handler) and kept.
    canonical: OnceLock<Result<String, CanonicalError>>,
}

impl<'a> Request<'a> {
    pub(crate) fn from_parsed(parsed: &'a httparse::Request<'_, 'a>, body: &'a [u8]) -> Self {
        Request {
            method: parsed.method.unwrap_or(""),
            target: parsed.path.unwrap_or(""),
            minor_version: parsed.version.unwrap_or(1),
            headers: &*parsed.headers,
            body,
            canonical: OnceLock::new(),
        }
    }

    /// Carries a canonical path already computed for this request (from its head, before the
    /// body arrived), so it is computed once.
    pub(crate) fn with_canonical(self, canonical: Option<Result<String, CanonicalError>>) -> Self {
        if let Some(canonical) = canonical {
            let _ = self.canonical.set(canonical);
        }
        self
    }

    /// Takes the canonical path if it was computed.
    pub(crate) fn take_canonical(self) -> Option<Result<String, CanonicalError>> {
        self.canonical.into_inner()
    }

    /// The canonical path or why there is none.
    pub(crate) fn canonical_result(&self) -> &Result<String, CanonicalError> {
        self.canonical
            .get_or_init(|| canonicalize(routing::target_path(self.target).as_bytes()))
    }

    /// The canonical path, as the front end routes by it: the path of the target (an
    /// absolute-form `http://host/p` gives `/p`) with escapes decoded, `\` as `/`, empty, `.`
    /// and `..` segments resolved (see `sluice_common::canonical`). None when the path cannot
    /// be made canonical (bad escape, control byte, climbs above `/`, not UTF-8, `*`).
    /// Computed once per request.
    pub fn canonical_path(&self) -> Option<&str> {
        self.canonical_result().as_ref().ok().map(String::as_str)
    }

    /// The method, e.g. `GET`.
    pub fn method(&self) -> &'a str {
        self.method
    }

    /// The raw request target, as sent (path and query).
    pub fn target(&self) -> &'a str {
        self.target
    }

    /// The raw path: the target up to `?`.
    pub fn path(&self) -> &'a str {
        self.target
            .split_once('?')
            .map_or(self.target, |(path, _)| path)
    }

    /// The raw query: the target after the first `?`, if any.
    pub fn query(&self) -> Option<&'a str> {
        self.target.split_once('?').map(|(_, query)| query)
    }

    /// The minor HTTP version: 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub fn minor_version(&self) -> u8 {
        self.minor_version
    }

    /// The value of the first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }

    /// All headers in the order received.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        self.headers.iter().map(|h| (h.name, h.value))
    }

    /// The request body (de-chunked when it was sent chunked).
    pub fn body(&self) -> &'a [u8] {
        self.body
    }
}

/// A response built by a handler. `Content-Length`, `Date`, `Server` and `Connection` are
/// added by the server; a handler's `Connection: close` closes the connection after it.
#[derive(Debug, Clone)]
pub struct Response {
    status: u16,
    /// Serialized `name: value\r\n` lines.
    headers: Vec<u8>,
    body: Vec<u8>,
    close: bool,
    has_date: bool,
    has_server: bool,
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
        self
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

/// Facts about the worker process, passed to every handler call.
#[derive(Debug, Clone)]
pub struct Context {
    pool: Option<String>,
    pid: u32,
}

impl Context {
    /// The application pool this worker serves (`SLUICE_POOL`), if named.
    pub fn pool(&self) -> Option<&str> {
        self.pool.as_deref()
    }

    /// This process's id.
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

/// Answers requests. Called on the worker threads, so it must be `Send + Sync`; it runs on the
/// connection's thread and should not block for long.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: &Request<'_>, ctx: &Context) -> Response;
}

impl<F> Handler for F
where
    F: Fn(&Request<'_>, &Context) -> Response + Send + Sync + 'static,
{
    fn handle(&self, req: &Request<'_>, ctx: &Context) -> Response {
        self(req, ctx)
    }
}

/// How a worker runs. [`Options::from_env`] reads the `SLUICE_*` variables.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// Addresses to bind when no sockets are inherited (`SLUICE_LISTEN`, `--listen`).
    pub listen: Vec<SocketAddr>,
    /// Pool name (`SLUICE_POOL`).
    pub pool: Option<String>,
    /// Threads, each with its own io_uring (`SLUICE_THREADS`; default: available cores).
    pub threads: usize,
    /// Idle keep-alive (and slow request) timeout (`SLUICE_IDLE_TIMEOUT`, seconds; default 120).
    pub idle_timeout: Duration,
    /// Largest request body accepted (default 64 MiB; more is answered 413).
    pub max_body: usize,
    /// Time to receive a request head (`SLUICE_HEADER_TIMEOUT`, seconds; default 120); the
    /// connection is closed after it.
    pub header_timeout: Duration,
    /// Longest request head (`SLUICE_MAX_REQUEST_HEAD`, bytes; default 16 KiB; more: 431).
    pub max_request_head: usize,
    /// Longest request target (`SLUICE_MAX_URL`, bytes; default 16 KiB; more: 414).
    pub max_url: usize,
    /// Slowest a client may take a response, bytes per second (`SLUICE_MIN_SEND_RATE`;
    /// default 150, HTTP.sys's; 0: no limit beyond the idle timeout).
    pub min_send_rate: u64,
    /// Largest serialized response published to the front end's cache
    /// (`SLUICE_CACHE_MAX_ENTRY`, bytes; default 256 KiB; 0: never publish).
    pub cache_max_entry: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listen: Vec::new(),
            pool: None,
            threads: std::thread::available_parallelism().map_or(1, usize::from),
            idle_timeout: Duration::from_secs(120),
            max_body: 64 * 1024 * 1024,
            header_timeout: Duration::from_secs(120),
            max_request_head: 16 * 1024,
            max_url: 16 * 1024,
            min_send_rate: 150,
            cache_max_entry: 256 * 1024,
        }
    }
}

impl Options {
    /// Defaults overridden by `SLUICE_LISTEN`, `SLUICE_POOL`, `SLUICE_THREADS`,
    /// `SLUICE_IDLE_TIMEOUT`, `SLUICE_HEADER_TIMEOUT`, `SLUICE_MAX_REQUEST_HEAD`, `SLUICE_MAX_URL`,
    /// `SLUICE_MIN_SEND_RATE` (the front end sets these from its `[limits]`) and
    /// `SLUICE_CACHE_MAX_ENTRY`.
    pub fn from_env() -> Result<Self, Error> {
        let mut options = Options::default();
        if let Some(list) = env("SLUICE_LISTEN") {
            options.listen = list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| parse_env("SLUICE_LISTEN", s))
                .collect::<Result<_, _>>()?;
        }
        options.pool = env("SLUICE_POOL").filter(|p| !p.is_empty());
        if let Some(threads) = env("SLUICE_THREADS") {
            options.threads = parse_env::<usize>("SLUICE_THREADS", &threads)?;
            if options.threads == 0 {
                return Err(invalid_env(
                    "SLUICE_THREADS",
                    &threads,
                    "must be at least 1",
                ));
            }
        }
        if let Some(secs) = env("SLUICE_IDLE_TIMEOUT") {
            options.idle_timeout = Duration::from_secs(parse_env("SLUICE_IDLE_TIMEOUT", &secs)?);
        }
        if let Some(secs) = env("SLUICE_HEADER_TIMEOUT") {
            options.header_timeout =
                Duration::from_secs(parse_env("SLUICE_HEADER_TIMEOUT", &secs)?);
        }
        if let Some(n) = env("SLUICE_MAX_REQUEST_HEAD") {
            options.max_request_head = parse_env("SLUICE_MAX_REQUEST_HEAD", &n)?;
        }
        if let Some(n) = env("SLUICE_MAX_URL") {
            options.max_url = parse_env("SLUICE_MAX_URL", &n)?;
        }
        if let Some(n) = env("SLUICE_MIN_SEND_RATE") {
            options.min_send_rate = parse_env("SLUICE_MIN_SEND_RATE", &n)?;
        }
        if let Some(n) = env("SLUICE_CACHE_MAX_ENTRY") {
            options.cache_max_entry = parse_env("SLUICE_CACHE_MAX_ENTRY", &n)?;
        }
        Ok(options)
    }

    /// Applies command-line arguments: `--listen ADDR` (or `--listen=ADDR`, repeatable)
    /// replaces the listen addresses. Anything else is an error.
    pub fn with_args<I>(mut self, args: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = String>,
    {
        let mut from_args = Vec::new();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let value = match arg.strip_prefix("--listen") {
                Some("") => args
                    .next()
                    .ok_or_else(|| Error::Usage("--listen needs an address".into()))?,
                Some(rest) if rest.starts_with('=') => rest[1..].to_string(),
                _ => return Err(Error::Usage(format!("unknown argument {arg:?}"))),
            };
            let addr = value
                .parse()
                .map_err(|e| Error::Usage(format!("--listen {value:?}: {e}")))?;
            from_args.push(addr);
        }
        if !from_args.is_empty() {
            self.listen = from_args;
        }
        Ok(self)
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn parse_env<T>(name: &'static str, value: &str) -> Result<T, Error>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    value
        .trim()
        .parse()
        .map_err(|e: T::Err| invalid_env(name, value, &e.to_string()))
}

fn invalid_env(name: &'static str, value: &str, reason: &str) -> Error {
    Error::InvalidEnv {
        name,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// Runs a worker with [`Options::from_env`] and the process's `--listen` arguments, until
/// SIGTERM or SIGINT. Call it from `main` before starting other threads (it reads and unsets
/// the `LISTEN_*` variables).
pub fn run<H: Handler>(handler: H) -> Result<(), Error> {
    let options = Options::from_env()?.with_args(std::env::args().skip(1))?;
    run_with(options, handler)
}

/// Runs a worker with explicit options until SIGTERM or SIGINT, then stops gracefully.
/// Inherited sockets (`LISTEN_FDS`) take precedence over `options.listen`. Call it from `main`
/// before starting other threads (it reads and unsets the `LISTEN_*` variables).
pub fn run_with<H: Handler>(options: Options, handler: H) -> Result<(), Error> {
    let sockets = sockets::Sockets::acquire(&options.listen)?;
    runtime::serve(sockets, &options, handler)
}

/// Entry point for the fuzz targets in `fuzz/` (not part of the API): the HTTP parser is
/// crate-private, and fuzzing it through the io_uring runtime would be slow and flaky.
#[doc(hidden)]
pub mod fuzzing {
    use crate::http::{HttpConn, Limits, Outcome};
    use crate::{Request, Response};

    /// Feeds `input` to one connection's parser in two reads split at `split_at` (clamped),
    /// then checks that the split changed nothing: the handler saw the same requests and the
    /// connection ended the same way as when all bytes arrive in one read.
    pub fn parse_stream(input: &[u8], split_at: usize) {
        let split = split_at.min(input.len());
        let whole = feed(&[input]);
        let pieces = feed(&[&input[..split], &input[split..]]);
        assert_eq!(
            whole, pieces,
            "a split at {split} changed how the input was parsed"
        );
    }

    /// (method, target, body) of every handled request, final responses, ended with Close.
    type Seen = (Vec<(String, String, Vec<u8>)>, u64, bool);

    fn feed(pieces: &[&[u8]]) -> Seen {
        let mut conn = HttpConn::new(Limits::default());
        let (mut rbuf, mut wbuf, mut seen) = (Vec::new(), Vec::new(), Vec::new());
        let mut handler = |req: &Request<'_>| {
            // Touch every accessor so the borrowed slices are all read.
            let _ = (
                req.path(),
                req.query(),
                req.header("host"),
                req.headers().count(),
            );
            seen.push((
                req.method().to_owned(),
                req.target().to_owned(),
                req.body().to_vec(),
            ));
            Response::new(200)
        };
        let mut closed = false;
        for piece in pieces {
            rbuf.extend_from_slice(piece);
            if conn.process(&mut rbuf, &mut wbuf, false, &mut handler) == Outcome::Close {
                closed = true;
                break;
            }
            wbuf.clear();
        }
        (seen, conn.responses(), closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_argument_overrides_environment_addresses() {
        let options = Options {
            listen: vec!["127.0.0.1:1".parse().unwrap()],
            ..Options::default()
        };
        let args = ["--listen", "127.0.0.1:2", "--listen=[::1]:3"].map(String::from);
        let options = options.with_args(args).unwrap();
        assert_eq!(
            options.listen,
            [
                "127.0.0.1:2".parse().unwrap(),
                "[::1]:3".parse::<SocketAddr>().unwrap()
            ]
        );
    }

    #[test]
    fn unknown_argument_is_a_usage_error() {
        assert!(matches!(
            Options::default().with_args(["--nope".to_string()]),
            Err(Error::Usage(_))
        ));
    }

    #[test]
    fn response_headers_reject_injection_and_track_connection_close() {
        let r = Response::new(200)
            .header("x-a", "1\r\nx-b: 2")
            .header("connection", "close")
            .header("x-ok", "y");
        assert_eq!(r.headers, b"x-ok: y\r\n");
        assert!(r.close);
    }

    #[test]
    fn request_splits_path_and_query() {
        let mut headers = [httparse::EMPTY_HEADER; 4];
        let mut parsed = httparse::Request::new(&mut headers);
        parsed
            .parse(b"GET /a/b?x=1&y HTTP/1.1\r\nHost: h\r\n\r\n")
            .unwrap();
        let req = Request::from_parsed(&parsed, b"");
        assert_eq!((req.path(), req.query()), ("/a/b", Some("x=1&y")));
        assert_eq!(req.header("HOST"), Some(&b"h"[..]));
    }

    #[test]
    fn request_canonical_path_is_decoded_and_resolved_raw_path_is_kept() {
        let canonical = |raw: &[u8]| {
            let mut headers = [httparse::EMPTY_HEADER; 4];
            let mut parsed = httparse::Request::new(&mut headers);
            parsed.parse(raw).unwrap();
            let req = Request::from_parsed(&parsed, b"");
            (
                req.path().to_owned(),
                req.canonical_path().map(str::to_owned),
            )
        };
        assert_eq!(
            canonical(b"GET /a/%62/../c//d?q=1 HTTP/1.1\r\n\r\n"),
            ("/a/%62/../c//d".to_owned(), Some("/a/c/d".to_owned()))
        );
        assert_eq!(
            canonical(b"GET http://host:80/x/./y HTTP/1.1\r\n\r\n")
                .1
                .as_deref(),
            Some("/x/y")
        );
        assert_eq!(canonical(b"GET /../x HTTP/1.1\r\n\r\n").1, None);
        assert_eq!(canonical(b"OPTIONS * HTTP/1.1\r\n\r\n").1, None);
    }

    #[test]
    fn response_header_lines_are_listed() {
        let r = Response::new(200)
            .header("Cache-Control", "public, max-age=5")
            .header("x", "");
        let lines: Vec<_> = r.header_lines().collect();
        assert_eq!(
            lines,
            [
                (&b"Cache-Control"[..], &b"public, max-age=5"[..]),
                (b"x", b"")
            ]
        );
    }
}
