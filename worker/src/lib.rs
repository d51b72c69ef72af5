//! `sluice-worker`: the library a sluice worker process is built on.
//!
//! A worker gets its sockets from the sluice front end (systemd socket-activation convention:
//! `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES` with `pool` listening sockets, one `handoff`
//! SEQPACKET socket and one `control` SEQPACKET socket), or binds `SLUICE_LISTEN` / `--listen`
//! itself when run standalone. It serves HTTP/1.1 on one io_uring per thread and calls a
//! [`Handler`] for every request. A response body is bytes or a file streamed in bounded
//! reads ([`Response::file`]); [`Response::upgrade`] gives the connection to the handler after
//! a 101; [`Handler::stream_body`] takes a request body piece by piece as it arrives; the
//! [`Context`] names the client and how its connection arrived.
//!
//! On the `control` socket the front end sends `ping <seq>` (answered with
//! `pong <seq> requests=<n> rss_kib=<n>` by thread 0's ring, so a worker whose threads are stuck
//! does not answer) and `stop` (as SIGTERM); the worker sends `stats requests=<n> classes=... buckets=... sum_us=<n>`
//! (its answers by status class and handler time, `sluice_proto::outcomes`) at most once a
//! second when its response count changed. EOF on it stops the worker gracefully.
//!
//! Routing is per request, as in HTTP.sys: the front end also sends the whole route table
//! (`routes\n<host> <prefix> <pool>\n...`) and the set of paths it serves from its cache
//! (`cached\n<host>\t<path>\n...`). A request whose host and canonical path route to another pool, to no pool,
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

mod access;
mod control;
mod http;
mod publish;
mod response;
mod routing;
mod runtime;
mod sockets;
mod tls;

use std::net::SocketAddr;

pub use response::{Response, Upgraded};
use std::time::Duration;

use sluice_proto::env::{self as names, Reader};
use sluice_proto::limits::{self, HeadLimits};
use sluice_proto::request::Head;

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
    #[error("cannot start: {0}")]
    Startup(String),
}

impl From<names::BadVar> for Error {
    fn from(e: names::BadVar) -> Self {
        Error::InvalidEnv {
            name: e.name,
            value: e.value,
            reason: e.reason,
        }
    }
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// One parsed HTTP request, borrowed from the connection's buffer. Its head was judged by
/// `sluice_proto::request`, the rule the front end applies too.
#[derive(Debug)]
pub struct Request<'a> {
    head: Head<'a>,
    headers: &'a [httparse::Header<'a>],
    body: &'a [u8],
}

impl<'a> Request<'a> {
    pub(crate) fn new(head: Head<'a>, headers: &'a [httparse::Header<'a>], body: &'a [u8]) -> Self {
        Request {
            head,
            headers,
            body,
        }
    }

    /// What the shared head rule found.
    pub(crate) fn head(&self) -> &Head<'a> {
        &self.head
    }

    /// The canonical path, as the front end routes by it: the path of the target (an
    /// absolute-form `http://host/p` gives `/p`) with escapes decoded, `\` as `/`, empty, `.`
    /// and `..` segments resolved (see `sluice_proto::canonical`).
    pub fn canonical_path(&self) -> &str {
        &self.head.canonical
    }

    /// The host the request names (an absolute-form target's authority, else `Host`), without
    /// its port; None for an HTTP/1.0 request without one.
    pub fn host(&self) -> Option<&'a str> {
        self.head.host.map(|h| h.name)
    }

    /// The method, e.g. `GET`.
    pub fn method(&self) -> &'a str {
        self.head.method
    }

    /// The raw request target, as sent (path and query).
    pub fn target(&self) -> &'a str {
        self.head.target
    }

    /// The raw path: the target up to `?` (for an absolute-form target, the part after the
    /// authority).
    pub fn path(&self) -> &'a str {
        self.head.path
    }

    /// The raw query: the target after the first `?`, if any.
    pub fn query(&self) -> Option<&'a str> {
        self.head.query
    }

    /// The minor HTTP version: 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub fn minor_version(&self) -> u8 {
        self.head.minor_version
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

/// Parses `raw` as one request (it must be a complete, valid head) and calls `f` with it.
#[cfg(test)]
pub(crate) fn with_request<T>(raw: &[u8], body: &[u8], f: impl FnOnce(&Request<'_>) -> T) -> T {
    let mut headers = [httparse::EMPTY_HEADER; sluice_proto::limits::MAX_HEADERS];
    match sluice_proto::request::parse(raw, &Default::default(), &mut headers) {
        Ok(sluice_proto::request::Parsed::Complete(parsed, head)) => {
            f(&Request::new(head, parsed.headers, body))
        }
        other => panic!("not a valid request head: {other:?}"),
    }
}

/// Facts about the worker process and the connection a request came on, passed to every
/// handler call.
#[derive(Debug)]
pub struct Context<'a> {
    pool: Option<&'a str>,
    pid: u32,
    conn: Option<ConnFacts>,
}

#[derive(Debug)]
struct ConnFacts {
    fd: std::os::fd::RawFd,
    arrival: Arrival,
    /// Read from the socket when first asked for (or known already).
    peer: std::cell::OnceCell<Option<std::net::SocketAddr>>,
}

pub use sluice_proto::access::Arrival;

impl<'a> Context<'a> {
    /// For a request on connection `fd` (its peer, when known already).
    pub(crate) fn new(
        pool: Option<&'a str>,
        pid: u32,
        fd: std::os::fd::RawFd,
        arrival: Arrival,
        peer: Option<std::net::SocketAddr>,
    ) -> Context<'a> {
        let known = std::cell::OnceCell::new();
        if let Some(p) = peer {
            let _ = known.set(Some(p));
        }
        Context {
            pool,
            pid,
            conn: Some(ConnFacts {
                fd,
                arrival,
                peer: known,
            }),
        }
    }

    /// The application pool this worker serves (`SLUICE_POOL`), if named.
    pub fn pool(&self) -> Option<&str> {
        self.pool
    }

    /// This process's id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The client's address: the connection's peer (with a front end's relay in between it
    /// would be the front end, but sluice-worker pools are never relayed).
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        let c = self.conn.as_ref()?;
        *c.peer.get_or_init(|| sluice_proto::sockaddr::peer(c.fd))
    }

    /// How the connection reached this worker: steered by the kernel program, handed over by
    /// the front end's dispatcher, or handed back by another pool's worker and routed again.
    pub fn arrival(&self) -> Option<Arrival> {
        self.conn.as_ref().map(|c| c.arrival)
    }

    /// The kernel program put the connection straight into this pool's queue.
    pub fn steered(&self) -> bool {
        self.arrival() == Some(Arrival::Kernel)
    }
}

/// Answers requests. Called on the worker threads, so it must be `Send + Sync`; it runs on the
/// connection's thread and should not block for long.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: &Request<'_>, ctx: &Context<'_>) -> Response;

    /// Called for a request whose body has not all arrived with its head. A sink receives
    /// the body as it arrives (decoded, for a chunked one) and makes the response once it is
    /// complete, so the worker never holds the whole body; `None` (the default) buffers it
    /// whole, up to `max_request_body`, and calls [`Handler::handle`].
    fn stream_body(&self, _req: &Request<'_>, _ctx: &Context<'_>) -> Option<Box<dyn BodySink>> {
        None
    }
}

/// Receives a request body piece by piece (see [`Handler::stream_body`]). Runs on the
/// connection's thread, like the handler.
pub trait BodySink: Send {
    /// The next bytes of the body.
    fn data(&mut self, chunk: &[u8]);
    /// The body is complete; `req` is the request (its `body()` is empty).
    fn finish(self: Box<Self>, req: &Request<'_>) -> Response;
}

impl<F> Handler for F
where
    F: Fn(&Request<'_>, &Context<'_>) -> Response + Send + Sync + 'static,
{
    fn handle(&self, req: &Request<'_>, ctx: &Context<'_>) -> Response {
        self(req, ctx)
    }
}

/// How a worker runs. [`Options::from_env`] reads the `SLUICE_*` variables the front end sets
/// (`sluice_proto::env`).
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
    /// Largest request body accepted (`SLUICE_MAX_REQUEST_BODY`, bytes; default 30,000,000,
    /// IIS's; more is answered 413).
    pub max_request_body: u64,
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
    /// How long a graceful stop lets responses in progress finish before they are cut
    /// (`SLUICE_SHUTDOWN_TIME_LIMIT`, seconds; default 90, IIS's).
    pub shutdown_time_limit: Duration,
    /// Send the front end an access-log entry per request (`SLUICE_ACCESS_LOG=1`; default
    /// off).
    pub access_log: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listen: Vec::new(),
            pool: None,
            threads: std::thread::available_parallelism().map_or(1, usize::from),
            idle_timeout: Duration::from_secs(120),
            max_request_body: limits::DEFAULT_MAX_REQUEST_BODY,
            header_timeout: Duration::from_secs(120),
            max_request_head: limits::DEFAULT_MAX_REQUEST_HEAD,
            max_url: limits::DEFAULT_MAX_URL,
            min_send_rate: 150,
            cache_max_entry: 256 * 1024,
            shutdown_time_limit: Duration::from_secs(90),
            access_log: false,
        }
    }
}

impl Options {
    /// Defaults overridden by the `SLUICE_*` variables (`sluice_proto::env`): the front end
    /// sets them from its config; `SLUICE_LISTEN` is for running standalone.
    pub fn from_env() -> Result<Self, Error> {
        Options::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`Options::from_env`] over any source of variables.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let r = Reader(lookup);
        let mut o = Options::default();
        if let Some(list) = r.text(names::LISTEN) {
            o.listen = list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse()
                        .map_err(|e: std::net::AddrParseError| Error::InvalidEnv {
                            name: names::LISTEN,
                            value: s.to_owned(),
                            reason: e.to_string(),
                        })
                })
                .collect::<Result<_, _>>()?;
        }
        o.pool = r.text(names::POOL);
        r.number(names::THREADS, &mut o.threads)?;
        if o.threads == 0 {
            return Err(invalid_env(names::THREADS, "0", "must be at least 1"));
        }
        r.seconds(names::IDLE_TIMEOUT, &mut o.idle_timeout)?;
        r.seconds(names::HEADER_TIMEOUT, &mut o.header_timeout)?;
        r.number(names::MAX_REQUEST_HEAD, &mut o.max_request_head)?;
        r.number(names::MAX_URL, &mut o.max_url)?;
        r.number(names::MAX_REQUEST_BODY, &mut o.max_request_body)?;
        r.number(names::MIN_SEND_RATE, &mut o.min_send_rate)?;
        r.number(names::CACHE_MAX_ENTRY, &mut o.cache_max_entry)?;
        r.seconds(names::SHUTDOWN_TIME_LIMIT, &mut o.shutdown_time_limit)?;
        let mut access_log = 0u8;
        r.number(names::ACCESS_LOG, &mut access_log)?;
        o.access_log = access_log == 1;
        if o.max_request_head > limits::MAX_HEAD_LIMIT || o.max_url > limits::MAX_HEAD_LIMIT {
            return Err(invalid_env(
                names::MAX_REQUEST_HEAD,
                &o.max_request_head.max(o.max_url).to_string(),
                "head limits are at most 64 KiB",
            ));
        }
        Ok(o)
    }

    /// The limits a request head is judged by.
    pub(crate) fn head_limits(&self) -> HeadLimits {
        HeadLimits {
            max_request_head: self.max_request_head,
            max_url: self.max_url,
            max_request_body: self.max_request_body,
        }
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
        with_request(b"GET /a/b?x=1&y HTTP/1.1\r\nHost: h\r\n\r\n", b"", |req| {
            assert_eq!((req.path(), req.query()), ("/a/b", Some("x=1&y")));
            assert_eq!(req.header("HOST"), Some(&b"h"[..]));
            assert_eq!(req.host(), Some("h"));
        });
    }

    #[test]
    fn request_canonical_path_is_decoded_and_resolved_raw_path_is_kept() {
        let canonical = |raw: &[u8]| {
            with_request(raw, b"", |req| {
                (req.path().to_owned(), req.canonical_path().to_owned())
            })
        };
        assert_eq!(
            canonical(b"GET /a/%62/../c//d?q=1 HTTP/1.1\r\nHost: h\r\n\r\n"),
            ("/a/%62/../c//d".to_owned(), "/a/c/d".to_owned())
        );
        assert_eq!(
            canonical(b"GET http://host:80/x/./y HTTP/1.1\r\nHost: h\r\n\r\n").1,
            "/x/y"
        );
    }

    #[test]
    fn options_read_back_what_the_front_end_writes() {
        let settings = sluice_proto::env::WorkerSettings {
            pool: "api".into(),
            threads: Some(3),
            idle_timeout: Duration::from_secs(7),
            header_timeout: Duration::from_secs(9),
            max_request_head: 4000,
            max_url: 300,
            max_request_body: 5,
            min_send_rate: 0,
            cache_max_entry: 1,
            shutdown_time_limit: Duration::from_secs(11),
            access_log: true,
        };
        let vars = settings.vars();
        let o = Options::from_lookup(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        })
        .unwrap();
        assert_eq!(o.pool.as_deref(), Some("api"));
        assert_eq!(o.threads, 3);
        assert_eq!(
            (o.idle_timeout, o.header_timeout),
            (Duration::from_secs(7), Duration::from_secs(9))
        );
        assert_eq!(
            (o.max_request_head, o.max_url, o.max_request_body),
            (4000, 300, 5)
        );
        assert_eq!((o.min_send_rate, o.cache_max_entry), (0, 1));
        assert_eq!(o.shutdown_time_limit, Duration::from_secs(11));
        assert!(o.access_log);
        assert!(Options::from_lookup(|n| (n == names::MAX_URL).then(|| "x".into())).is_err());
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
