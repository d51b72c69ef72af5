//! The control channel between the front end and one worker process: a private AF_UNIX
//! SOCK_SEQPACKET pair (fd name `control`), one message per datagram, at most
//! [`MAX_MESSAGE`] bytes. Text, fields separated by one space, lists one item a line:
//!
//! front end -> worker ([`ToWorker`]):
//! - `ping <seq>`: answered with `pong`.
//! - `stop`: graceful stop, as SIGTERM.
//! - `routes\n<host> <prefix> <pool>\n...`: the whole route table (each route's site as
//!   `site::Site` writes it, its normalized prefix, its pool), replacing
//!   the previous one. The front end sends it, then `cached`, before the worker starts; a
//!   worker serves nothing before it has both.
//! - `cached\n<host>\t<path>[\t<accept-encoding>]\n...`: the keys the front end's cache holds.
//!
//! worker -> front end ([`ToFrontend`]):
//! - `pong <seq> requests=<n> rss_kib=<n>`
//! - `stats requests=<n>`: at most once a second, when the count changed.
//! - `cache <host>\t<path>[\t<accept-encoding>]\n<response>`: a response to store (see
//!   `cache`).
//! - `access\n<entry>\n...`: access-log entries (see `access`).
//!
//! Every number is a plain decimal u64 (digits only, no overflow); anything else, and any
//! message of an unknown shape, is an error the reader logs and drops.

use std::io;
use std::os::fd::RawFd;

use crate::access;
use crate::cache::CacheKey;
use crate::route::normalize_prefix;
use crate::site::Site;

/// Largest message either way: a publication of the largest entry plus its first line, or
/// a long `cached` list (the front end leaves out what does not fit).
pub const MAX_MESSAGE: usize = crate::cache::MAX_ENTRY_LIMIT + 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToWorker {
    Ping(u64),
    Stop,
    Routes(Vec<RouteEntry>),
    Cached(Vec<CacheKey>),
}

/// One line of a `routes` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub site: Site,
    /// Normalized (`route::normalize_prefix`).
    pub prefix: String,
    pub pool: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToFrontend {
    Pong {
        seq: u64,
        requests: u64,
        rss_kib: u64,
    },
    Stats {
        requests: u64,
        /// How its answers went (classes, durations), cumulative.
        outcomes: crate::outcomes::Outcomes,
    },
    Cache {
        key: CacheKey,
        response: Vec<u8>,
    },
    /// Access-log lines (`access::Report::encode_into`, at most `access::MAX_BATCH`), in
    /// the order answered; each is checked when it is written (`access::Entry::decode`).
    Access(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("control message longer than {MAX_MESSAGE} bytes")]
    TooLong,
    #[error("control message is not text")]
    NotText,
    #[error("unknown control message {0:?}")]
    Unknown(String),
    #[error("bad number {0:?} in a control message")]
    BadNumber(String),
    #[error("bad line {line:?} in a `{list}` message: {reason}")]
    BadLine {
        list: &'static str,
        line: String,
        reason: &'static str,
    },
}

fn unknown(msg: &[u8]) -> ControlError {
    let shown = &msg[..msg.len().min(80)];
    ControlError::Unknown(String::from_utf8_lossy(shown).into_owned())
}

/// A plain decimal u64.
fn number(s: &str) -> Result<u64, ControlError> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ControlError::BadNumber(s.chars().take(24).collect()));
    }
    s.parse().map_err(|_| ControlError::BadNumber(s.to_owned()))
}

/// `name=<n>`.
fn field(s: Option<&str>, name: &str) -> Result<u64, ControlError> {
    let s = s.ok_or_else(|| ControlError::Unknown(format!("missing {name}=")))?;
    let v = s
        .strip_prefix(name)
        .and_then(|v| v.strip_prefix('='))
        .ok_or_else(|| ControlError::Unknown(s.chars().take(40).collect()))?;
    number(v)
}

/// `<host>\t<path>[\t<variant>]`.
fn key_text(key: &CacheKey) -> String {
    match &key.variant {
        None => format!("{}\t{}", key.host, key.path),
        Some(v) => format!("{}\t{}\t{v}", key.host, key.path),
    }
}

fn parse_key(line: &str, list: &'static str) -> Result<CacheKey, ControlError> {
    let bad = |reason| ControlError::BadLine {
        list,
        line: line.chars().take(80).collect(),
        reason,
    };
    let mut fields = line.splitn(3, '\t');
    let (Some(host), Some(path)) = (fields.next(), fields.next()) else {
        return Err(bad("expected `<host>\\t<path>[\\t<accept-encoding>]`"));
    };
    let key = CacheKey {
        host: host.to_owned(),
        path: path.to_owned(),
        variant: fields.next().map(str::to_owned),
    };
    let canonical = crate::canonical::canonicalize(key.path.as_bytes()).ok();
    if !key.is_valid() || canonical.as_deref() != Some(key.path.as_str()) {
        return Err(bad(
            "not a host, a canonical path and an optional Accept-Encoding value",
        ));
    }
    Ok(key)
}

fn text(msg: &[u8]) -> Result<&str, ControlError> {
    if msg.len() > MAX_MESSAGE {
        return Err(ControlError::TooLong);
    }
    std::str::from_utf8(msg).map_err(|_| ControlError::NotText)
}

impl ToWorker {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ToWorker::Ping(seq) => format!("ping {seq}").into_bytes(),
            ToWorker::Stop => b"stop".to_vec(),
            ToWorker::Routes(routes) => {
                let mut s = String::from("routes\n");
                for r in routes {
                    s.push_str(&format!("{} {} {}\n", r.site, r.prefix, r.pool));
                }
                s.into_bytes()
            }
            ToWorker::Cached(keys) => {
                let mut s = String::from("cached\n");
                for k in keys {
                    s.push_str(&key_text(k));
                    s.push('\n');
                }
                s.into_bytes()
            }
        }
    }

    /// A `cached` message with as many of `keys` as fit in [`MAX_MESSAGE`] (a worker that
    /// does not know a key serves that path itself, as its pool would; nothing is lost).
    pub fn cached_within(keys: impl IntoIterator<Item = CacheKey>) -> ToWorker {
        let mut size = "cached\n".len();
        let mut kept = Vec::new();
        for k in keys {
            size += key_text(&k).len() + 1;
            if size > MAX_MESSAGE {
                break;
            }
            kept.push(k);
        }
        ToWorker::Cached(kept)
    }

    pub fn decode(msg: &[u8]) -> Result<ToWorker, ControlError> {
        let text = text(msg)?;
        let (first, rest) = text.split_once('\n').unwrap_or((text, ""));
        match first {
            "routes" => {
                let mut routes = Vec::new();
                for line in rest.lines().filter(|l| !l.is_empty()) {
                    let bad = |reason| ControlError::BadLine {
                        list: "routes",
                        line: line.chars().take(80).collect(),
                        reason,
                    };
                    let mut fields = line.split(' ');
                    let (Some(site), Some(prefix), Some(pool), None) =
                        (fields.next(), fields.next(), fields.next(), fields.next())
                    else {
                        return Err(bad("expected `<host> <prefix> <pool>`"));
                    };
                    let site = match Site::parse(Some(site)) {
                        Ok(s) if s.to_string() == site => s,
                        _ => return Err(bad("not a route's host as the front end writes it")),
                    };
                    if !crate::route::valid_pool_name(pool) {
                        return Err(bad("not a pool name"));
                    }
                    match normalize_prefix(prefix) {
                        Ok(n) if n == prefix => {}
                        Ok(_) => return Err(bad("the prefix does not end in `/`")),
                        Err(reason) => return Err(bad(reason)),
                    }
                    routes.push(RouteEntry {
                        site,
                        prefix: prefix.to_owned(),
                        pool: pool.to_owned(),
                    });
                }
                Ok(ToWorker::Routes(routes))
            }
            "cached" => rest
                .lines()
                .filter(|l| !l.is_empty())
                .map(|l| parse_key(l, "cached"))
                .collect::<Result<_, _>>()
                .map(ToWorker::Cached),
            _ if !rest.is_empty() => Err(unknown(msg)),
            "stop" => Ok(ToWorker::Stop),
            _ => match first.split_once(' ') {
                Some(("ping", seq)) => number(seq).map(ToWorker::Ping),
                _ => Err(unknown(msg)),
            },
        }
    }
}

impl ToFrontend {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ToFrontend::Pong {
                seq,
                requests,
                rss_kib,
            } => format!("pong {seq} requests={requests} rss_kib={rss_kib}").into_bytes(),
            ToFrontend::Stats { requests, outcomes } => {
                format!("stats requests={requests} {}", outcomes.encode()).into_bytes()
            }
            ToFrontend::Cache { key, response } => {
                let mut out = format!("cache {}\n", key_text(key)).into_bytes();
                out.extend_from_slice(response);
                out
            }
            ToFrontend::Access(lines) => format!("access\n{lines}").into_bytes(),
        }
    }

    pub fn decode(msg: &[u8]) -> Result<ToFrontend, ControlError> {
        if msg.len() > MAX_MESSAGE {
            return Err(ControlError::TooLong);
        }
        if let Some(rest) = msg.strip_prefix(b"cache ") {
            let nl = rest
                .iter()
                .position(|&b| b == b'\n')
                .ok_or_else(|| unknown(msg))?;
            let line = std::str::from_utf8(&rest[..nl]).map_err(|_| ControlError::NotText)?;
            let key = parse_key(line, "cache")?;
            return Ok(ToFrontend::Cache {
                key,
                response: rest[nl + 1..].to_vec(),
            });
        }
        let text = text(msg)?;
        if let Some(lines) = text.strip_prefix("access\n") {
            let n = lines.lines().count();
            if n > access::MAX_BATCH {
                return Err(ControlError::Unknown(format!(
                    "{n} access-log lines in one message"
                )));
            }
            return Ok(ToFrontend::Access(lines.to_owned()));
        }
        let mut words = text.split(' ');
        let decoded = match words.next() {
            Some("pong") => ToFrontend::Pong {
                seq: number(words.next().unwrap_or(""))?,
                requests: field(words.next(), "requests")?,
                rss_kib: field(words.next(), "rss_kib")?,
            },
            Some("stats") => ToFrontend::Stats {
                requests: field(words.next(), "requests")?,
                // A worker built before the outcomes (one that outlived an upgrade of the
                // front end) sends the count alone.
                outcomes: match (words.next(), words.next(), words.next()) {
                    (None, _, _) => crate::outcomes::Outcomes::default(),
                    (Some(c), Some(b), Some(s)) => {
                        crate::outcomes::Outcomes::decode(c, b, s).ok_or_else(|| unknown(msg))?
                    }
                    _ => return Err(unknown(msg)),
                },
            },
            _ => return Err(unknown(msg)),
        };
        if words.next().is_some() {
            return Err(unknown(msg));
        }
        Ok(decoded)
    }
}

/// Whether the peer of a SEQPACKET `channel` (control or handoff) has closed its end: a
/// receive returns 0 both at EOF and for an empty datagram, which says nothing.
pub fn hung_up(channel: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: channel,
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one live pollfd; a zero timeout never blocks.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    rc < 0 || pfd.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0
}

/// Sends one datagram without blocking (MSG_DONTWAIT | MSG_NOSIGNAL): a full socket is an
/// error, never a wait.
pub fn send(fd: RawFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: `msg` is a live buffer of `msg.len()` bytes; send(2) only reads it.
    let rc = unsafe {
        libc::send(
            fd,
            msg.as_ptr().cast(),
            msg.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(path: &str, variant: Option<&str>) -> CacheKey {
        CacheKey {
            host: "h.test".into(),
            path: path.into(),
            variant: variant.map(Into::into),
        }
    }

    #[test]
    fn every_message_to_a_worker_decodes_as_it_was_encoded() {
        for m in [
            ToWorker::Ping(0),
            ToWorker::Ping(u64::MAX),
            ToWorker::Stop,
            ToWorker::Routes(vec![]),
            ToWorker::Routes(
                [
                    ("+", "/acme/", "acme"),
                    ("*", "/api/", "api"),
                    ("shop.test", "/", "shop"),
                    ("*.tenants.test", "/", "t"),
                    ("127.0.0.2", "/", "ip"),
                    ("[::1]", "/", "ip"),
                ]
                .map(|(site, prefix, pool)| RouteEntry {
                    site: Site::parse(Some(site)).unwrap(),
                    prefix: prefix.into(),
                    pool: pool.into(),
                })
                .to_vec(),
            ),
            ToWorker::Cached(vec![
                CacheKey {
                    host: String::new(),
                    ..key("/", None)
                },
                CacheKey {
                    host: "*".into(),
                    ..key("/", None)
                },
            ]),
            ToWorker::Cached(vec![]),
            ToWorker::Cached(vec![key("/a b/c", None), key("/x", Some("gzip, br"))]),
        ] {
            assert_eq!(ToWorker::decode(&m.encode()), Ok(m.clone()), "{m:?}");
        }
    }

    #[test]
    fn a_stats_message_without_outcomes_from_an_older_worker_is_its_count() {
        assert_eq!(
            ToFrontend::decode(b"stats requests=4"),
            Ok(ToFrontend::Stats {
                requests: 4,
                outcomes: Default::default(),
            })
        );
        assert!(ToFrontend::decode(b"stats requests=4 classes=1,2,3,4,5").is_err());
    }

    #[test]
    fn every_message_to_the_front_end_decodes_as_it_was_encoded() {
        for m in [
            ToFrontend::Pong {
                seq: 7,
                requests: u64::MAX,
                rss_kib: 0,
            },
            ToFrontend::Stats {
                requests: 3,
                outcomes: crate::outcomes::Outcomes {
                    classes: [0, 3, 0, 1, 0],
                    buckets: [1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                    sum_us: 1234,
                },
            },
            ToFrontend::Access(String::new()),
            ToFrontend::Access(
                "1\t-\tGET\t/\tHTTP/1.1\t-\t200\t0\t0\tkernel\t-\t-\n\
                 2\t[::1]:80\tPOST\t/x\\x22\t-\th\t404\t9\t7\thandback\tr\tu a\n"
                    .into(),
            ),
            ToFrontend::Cache {
                key: key("/i.html", Some("")),
                response: b"HTTP/1.1 200 OK\r\n\r\n\n\xff".to_vec(),
            },
        ] {
            assert_eq!(ToFrontend::decode(&m.encode()), Ok(m.clone()), "{m:?}");
        }
    }

    #[test]
    fn hostile_messages_are_errors_not_panics() {
        for bad in [
            &b""[..],
            b"ping",
            b"ping ",
            b"ping -1",
            b"ping +1",
            b"ping 18446744073709551616",
            b"ping 1 2",
            b"PING 1",
            b"stop now",
            b"stop\nx",
            b"routes\n* /api/\n",
            b"routes\n/api/ api\n",
            b"routes\n* /a/../b/ x\n",
            b"routes\n* /api x\n",
            // Found by fuzz/fuzz_targets/control.rs: a pool name with a NUL and a CR decoded
            // to a name its own encoding did not give back.
            b"routes\n* / &n\0\r",
            b"routes\n* / a.b\n",
            b"routes\nShop.test / a\n",
            b"routes\nshop.test. / a\n",
            b"routes\n::1 / a\n",
            b"routes\na:80 / a\n",
            b"cached\nrel\n",
            b"cached\n\trel\n",
            b"cached\n/x\n",
            b"cached\nh\t/a/../b\n",
            b"cached\nh\t/x\tgz\x01ip\n",
            b"cached\nH\t/x\n",
            b"cached\nh:80\t/x\n",
            b"\xff\xfe",
        ] {
            assert!(
                ToWorker::decode(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        for bad in [
            &b"cache 18446744073709551615 /x\nHTTP/1.1 200 OK\r\n\r\n"[..],
            b"cache /x",
            b"cache x\n",
            b"cache /x\n",
            b"cache h\t/a/./b\n",
            b"pong 1",
            b"pong 1 requests=1",
            b"pong 1 requests=1 rss_kib=99999999999999999999",
            b"pong 1 rss_kib=1 requests=1",
            b"stats requests=-1",
            b"stats requests=1 extra",
            b"hello",
        ] {
            assert!(
                ToFrontend::decode(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            ToWorker::decode(&vec![b'x'; MAX_MESSAGE + 1]),
            Err(ControlError::TooLong)
        );
    }

    #[test]
    fn a_cached_list_longer_than_a_message_is_cut_to_fit() {
        let keys = (0..100_000).map(|i| key(&format!("/some/long/path/{i:08}"), None));
        let m = ToWorker::cached_within(keys);
        let ToWorker::Cached(kept) = &m else { panic!() };
        assert!(kept.len() > 10_000 && kept.len() < 100_000);
        assert!(m.encode().len() <= MAX_MESSAGE);
    }
}
