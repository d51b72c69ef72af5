//! Access-log entries: what a worker tells the front end about each request it answered, and
//! what the front end records of its own answers. The front end writes the log (a worker
//! cannot write anywhere else, nor name another pool or pid: those come from the channel an
//! entry arrived on).
//!
//! On the control channel (`access\n` then one entry a line) an entry is tab-separated
//! fields, each [`clean`] text: `time_ms client method target protocol host status bytes
//! duration_us arrival referer user_agent` (`-` for none).

use std::fmt;
use std::net::SocketAddr;

/// Longest text field kept; longer values are cut (`target` holds the most).
pub const MAX_FIELD: usize = 2048;
/// Most entries one message carries.
pub const MAX_BATCH: usize = 8192;
/// A worker sends its batch once it holds this many bytes (well within a control message).
pub const BATCH_BYTES: usize = 64 * 1024;
/// A batch the front end could not take yet (its channel full) is kept and sent with the
/// next, up to this many bytes; past it the oldest lines are dropped (and counted).
pub const HELD_BYTES: usize = 4 * BATCH_BYTES;

/// How the connection reached whoever answered the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Put in the pool's queue by the kernel program.
    Kernel,
    /// Routed (and handed over, or answered) by the front end's dispatcher.
    Dispatcher,
    /// Handed back by a worker of another pool, then routed by the dispatcher.
    Handback,
    /// Read by the front end, which keeps the client's connection, and delivered to the
    /// pool on a connection that carries only that pool's requests.
    Delivered,
}

impl Arrival {
    pub fn as_str(self) -> &'static str {
        match self {
            Arrival::Kernel => "kernel",
            Arrival::Dispatcher => "dispatcher",
            Arrival::Handback => "handback",
            Arrival::Delivered => "delivered",
        }
    }

    pub fn parse(s: &str) -> Option<Arrival> {
        match s {
            "kernel" => Some(Arrival::Kernel),
            "dispatcher" => Some(Arrival::Dispatcher),
            "handback" => Some(Arrival::Handback),
            "delivered" => Some(Arrival::Delivered),
            _ => None,
        }
    }
}

impl fmt::Display for Arrival {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One request as a worker (or the dispatcher) reports it: raw bytes, cleaned as they are
/// encoded, so building a line allocates nothing.
#[derive(Debug, Clone, Copy)]
pub struct Report<'a> {
    /// When the answer was ready, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub client: Option<SocketAddr>,
    pub method: &'a [u8],
    pub target: &'a [u8],
    /// `HTTP/1.1`, `HTTP/1.0`; empty when the request line could not be read.
    pub protocol: &'a [u8],
    /// Normalized (`Host::normalized`); empty when the request named none.
    pub host: &'a [u8],
    pub status: u16,
    /// Bytes of the response body sent.
    pub bytes: u64,
    /// From the complete request to the answer ready.
    pub duration_us: u64,
    pub arrival: Arrival,
    pub referer: &'a [u8],
    pub user_agent: &'a [u8],
}

/// One request as the log records it, read from a line: text fields are [`clean`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    pub time_ms: u64,
    /// `address:port` text (only the characters an IP socket address has).
    pub client: Option<&'a str>,
    pub method: &'a str,
    pub target: &'a str,
    pub protocol: &'a str,
    pub host: &'a str,
    pub status: u16,
    pub bytes: u64,
    pub duration_us: u64,
    pub arrival: Arrival,
    pub referer: &'a str,
    pub user_agent: &'a str,
}

/// Appends `raw` as log text: visible ASCII and spaces, anything else (and `"`, `\`) as
/// `\xHH`, cut to [`MAX_FIELD`] bytes; `-` when empty. Clean text needs no escaping in the
/// combined format, and only its backslashes in JSON.
pub fn clean_into(out: &mut String, raw: &[u8]) {
    if raw.is_empty() {
        out.push('-');
        return;
    }
    let start = out.len();
    for &b in raw {
        if out.len() - start + 4 > MAX_FIELD {
            break;
        }
        if (b' '..0x7f).contains(&b) && b != b'"' && b != b'\\' {
            out.push(b as char);
        } else {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\x");
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
    }
}

/// `raw` as log text ([`clean_into`]), empty for empty.
pub fn clean(raw: &[u8]) -> String {
    let mut s = String::new();
    if !raw.is_empty() {
        clean_into(&mut s, raw);
    }
    s
}

/// Whether `s` is what [`clean_into`] makes.
pub fn is_clean(s: &str) -> bool {
    s.len() <= MAX_FIELD && s.bytes().all(|b| (b' '..0x7f).contains(&b) && b != b'"')
}

impl Report<'_> {
    /// Appends the report's line, newline included.
    pub fn encode_into(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = write!(out, "{}\t", self.time_ms);
        match self.client {
            Some(a) => {
                let _ = write!(out, "{a}\t");
            }
            None => out.push_str("-\t"),
        }
        for text in [self.method, self.target, self.protocol, self.host] {
            clean_into(out, text);
            out.push('\t');
        }
        let _ = write!(
            out,
            "{}\t{}\t{}\t{}\t",
            self.status, self.bytes, self.duration_us, self.arrival
        );
        clean_into(out, self.referer);
        out.push('\t');
        clean_into(out, self.user_agent);
        out.push('\n');
    }
}

impl<'a> Entry<'a> {
    /// Reads one line (without its newline) that [`Report::encode_into`] wrote; None for
    /// anything else.
    pub fn decode(line: &'a str) -> Option<Entry<'a>> {
        let mut f = line.split('\t');
        let mut next = || f.next();
        let number = |s: Option<&str>| -> Option<u64> {
            let s = s?;
            (!s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse().ok())
                .flatten()
        };
        let text = |s: Option<&'a str>| -> Option<&'a str> {
            match s? {
                "-" => Some(""),
                s if is_clean(s) && !s.is_empty() => Some(s),
                _ => None,
            }
        };
        let time_ms = number(next())?;
        let client = match next()? {
            "-" => None,
            c if !c.is_empty()
                && c.len() <= 64
                && c.bytes().all(|b| {
                    b.is_ascii_hexdigit() || matches!(b, b'.' | b':' | b'[' | b']' | b'%')
                }) =>
            {
                Some(c)
            }
            _ => return None,
        };
        let (method, target, protocol, host) =
            (text(next())?, text(next())?, text(next())?, text(next())?);
        let status = u16::try_from(number(next())?).ok()?;
        if !(100..=999).contains(&status) {
            return None;
        }
        let entry = Entry {
            time_ms,
            client,
            method,
            target,
            protocol,
            host,
            status,
            bytes: number(next())?,
            duration_us: number(next())?,
            arrival: Arrival::parse(next()?)?,
            referer: text(next())?,
            user_agent: text(next())?,
        };
        next().is_none().then_some(entry)
    }
}

/// What a request head says for the log, read leniently (a head the rule refused is logged
/// too): the request line's three parts and the Host (normalized when it is a valid one),
/// Referer and User-Agent values, borrowed from the head.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Described<'a> {
    pub method: &'a [u8],
    pub target: &'a [u8],
    pub protocol: &'a [u8],
    pub host: std::borrow::Cow<'a, [u8]>,
    pub referer: &'a [u8],
    pub user_agent: &'a [u8],
}

/// Reads `head` (the bytes a connection sent, from a request's first byte) for the log.
pub fn describe(head: &[u8]) -> Described<'_> {
    let line_end = head
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(head.len().min(MAX_FIELD));
    let line = &head[..line_end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.splitn(3, |&b| b == b' ');
    let mut d = Described {
        method: parts.next().unwrap_or_default(),
        target: parts.next().unwrap_or_default(),
        protocol: parts.next().unwrap_or_default(),
        ..Described::default()
    };
    let (mut host, mut referer, mut user_agent) = (None, None, None);
    for raw in head[line_end.min(head.len())..]
        .split(|&b| b == b'\n')
        .skip(1)
    {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.is_empty() {
            break;
        }
        let Some(colon) = raw.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&raw[..colon], raw[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"host") {
            host.get_or_insert(value);
        } else if name.eq_ignore_ascii_case(b"referer") {
            referer.get_or_insert(value);
        } else if name.eq_ignore_ascii_case(b"user-agent") {
            user_agent.get_or_insert(value);
        }
    }
    d.host = match host {
        None => std::borrow::Cow::Borrowed(&b""[..]),
        Some(value) => match crate::host::parse(value) {
            Ok(h) => match h.normalized() {
                std::borrow::Cow::Borrowed(n) => std::borrow::Cow::Borrowed(n.as_bytes()),
                std::borrow::Cow::Owned(n) => std::borrow::Cow::Owned(n.into_bytes()),
            },
            Err(_) => std::borrow::Cow::Borrowed(value),
        },
    };
    d.referer = referer.unwrap_or_default();
    d.user_agent = user_agent.unwrap_or_default();
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report<'static> {
        Report {
            time_ms: 1_764_633_600_123,
            client: Some("127.0.0.1:40000".parse().unwrap()),
            method: b"GET",
            target: b"/a b\"\\\x01\xff",
            protocol: b"HTTP/1.1",
            host: b"shop.test",
            status: 200,
            bytes: 12,
            duration_us: 34,
            arrival: Arrival::Handback,
            referer: b"",
            user_agent: b"curl/8",
        }
    }

    fn line(r: &Report<'_>) -> String {
        let mut s = String::new();
        r.encode_into(&mut s);
        s.trim_end_matches('\n').to_owned()
    }

    #[test]
    fn hostile_bytes_become_escaped_text() {
        assert_eq!(clean(b"/a b\"\\\x01\xff"), "/a b\\x22\\x5c\\x01\\xff");
        assert!(is_clean(&clean(&[0u8; 10_000])));
        assert!(clean(&[b'a'; 10_000]).len() <= MAX_FIELD);
    }

    #[test]
    fn a_report_decodes_as_the_entry_it_describes() {
        let text = line(&report());
        let e = Entry::decode(&text).unwrap();
        assert_eq!(e.target, "/a b\\x22\\x5c\\x01\\xff");
        assert_eq!(
            (e.method, e.host, e.referer, e.user_agent),
            ("GET", "shop.test", "", "curl/8")
        );
        assert_eq!((e.status, e.bytes, e.duration_us), (200, 12, 34));
        assert_eq!(e.arrival, Arrival::Handback);
        assert_eq!(e.client, Some("127.0.0.1:40000"));
        let none = line(&Report {
            client: None,
            host: b"",
            ..report()
        });
        let e = Entry::decode(&none).unwrap();
        assert_eq!((e.client, e.host), (None, ""));
    }

    #[test]
    fn a_head_is_described_even_when_the_rule_refuses_it() {
        let d = describe(
            b"GET /a?b HTTP/1.1\r\nUser-Agent: curl/8\r\nHost: Shop.Test:80\r\nReferer: r\r\n\r\n",
        );
        assert_eq!(
            (d.method, d.target, d.protocol),
            (&b"GET"[..], &b"/a?b"[..], &b"HTTP/1.1"[..])
        );
        assert_eq!(
            (&*d.host, d.referer, d.user_agent),
            (&b"shop.test"[..], &b"r"[..], &b"curl/8"[..])
        );
        let d = describe(b"\x16\x03\x01\x02");
        assert_eq!(d.method, b"\x16\x03\x01\x02");
        assert_eq!(&*describe(b"GET /x HTTP/1.1\r\nHost: a b\r\n").host, b"a b");
    }

    #[test]
    fn malformed_lines_are_refused() {
        let good = line(&report());
        for bad in [
            String::new(),
            good.replace("\t200\t", "\t20\t"),
            good.replace("\t200\t", "\t-1\t"),
            good.replace("handback", "elsewhere"),
            good.replace("GET", "G\"T"),
            good.replace("127.0.0.1:40000", "nowhere"),
            good.replace("127.0.0.1:40000", "1.2.3.4 x"),
            format!("{good}\textra"),
        ] {
            assert_eq!(Entry::decode(&bad), None, "{bad}");
        }
    }
}
