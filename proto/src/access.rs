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
/// Most entries a worker batches into one message.
pub const MAX_BATCH: usize = 128;

/// How the connection reached whoever answered the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Put in the pool's queue by the kernel program.
    Kernel,
    /// Routed (and handed over, or answered) by the front end's dispatcher.
    Dispatcher,
    /// Handed back by a worker of another pool, then routed by the dispatcher.
    Handback,
}

impl Arrival {
    pub fn as_str(self) -> &'static str {
        match self {
            Arrival::Kernel => "kernel",
            Arrival::Dispatcher => "dispatcher",
            Arrival::Handback => "handback",
        }
    }

    fn parse(s: &str) -> Option<Arrival> {
        match s {
            "kernel" => Some(Arrival::Kernel),
            "dispatcher" => Some(Arrival::Dispatcher),
            "handback" => Some(Arrival::Handback),
            _ => None,
        }
    }
}

impl fmt::Display for Arrival {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One request as the log records it. Text fields are [`clean`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// When the answer was ready, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub client: Option<SocketAddr>,
    pub method: String,
    pub target: String,
    /// `HTTP/1.1`, `HTTP/1.0`; empty when the request line could not be read.
    pub protocol: String,
    /// Normalized (`Host::normalized`); empty when the request named none.
    pub host: String,
    pub status: u16,
    /// Bytes of the response body sent.
    pub bytes: u64,
    /// From the complete request to the answer ready.
    pub duration_us: u64,
    pub arrival: Arrival,
    pub referer: String,
    pub user_agent: String,
}

/// `raw` as log text: visible ASCII and spaces, anything else (and `"`, `\`) as `\xHH`, cut
/// to [`MAX_FIELD`] bytes. Clean text needs no escaping in either log format.
pub fn clean(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len().min(MAX_FIELD));
    for &b in raw {
        if out.len() + 4 > MAX_FIELD {
            break;
        }
        if (b' '..0x7f).contains(&b) && b != b'"' && b != b'\\' {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Whether `s` is what [`clean`] makes.
pub fn is_clean(s: &str) -> bool {
    s.len() <= MAX_FIELD && s.bytes().all(|b| (b' '..0x7f).contains(&b) && b != b'"')
}

fn field(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

impl Entry {
    /// The entry's line on the control channel (no newline).
    pub fn encode(&self) -> String {
        let client = self.client.map_or("-".to_owned(), |a| a.to_string());
        format!(
            "{}\t{client}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            self.time_ms,
            field(&self.method),
            field(&self.target),
            field(&self.protocol),
            field(&self.host),
            self.status,
            self.bytes,
            self.duration_us,
            self.arrival,
            field(&self.referer),
            field(&self.user_agent),
        )
    }

    /// Reads a line [`Entry::encode`] wrote; None for anything else.
    pub fn decode(line: &str) -> Option<Entry> {
        let f: Vec<&str> = line.split('\t').collect();
        let [
            time,
            client,
            method,
            target,
            protocol,
            host,
            status,
            bytes,
            duration,
            arrival,
            referer,
            ua,
        ] = f.as_slice()
        else {
            return None;
        };
        let number = |s: &str| -> Option<u64> {
            (!s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse().ok())
                .flatten()
        };
        let text = |s: &str| -> Option<String> {
            match s {
                "-" => Some(String::new()),
                s if is_clean(s) && !s.is_empty() => Some(s.to_owned()),
                _ => None,
            }
        };
        let client = match *client {
            "-" => None,
            c => Some(c.parse().ok()?),
        };
        let status = u16::try_from(number(status)?).ok()?;
        if !(100..=999).contains(&status) {
            return None;
        }
        Some(Entry {
            time_ms: number(time)?,
            client,
            method: text(method)?,
            target: text(target)?,
            protocol: text(protocol)?,
            host: text(host)?,
            status,
            bytes: number(bytes)?,
            duration_us: number(duration)?,
            arrival: Arrival::parse(arrival)?,
            referer: text(referer)?,
            user_agent: text(ua)?,
        })
    }
}

/// What a request head says for the log, read leniently (a head the rule refused is logged
/// too): the request line's three parts and the Host, Referer and User-Agent values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Described {
    pub method: String,
    pub target: String,
    pub protocol: String,
    pub host: String,
    pub referer: String,
    pub user_agent: String,
}

/// Reads `head` (the bytes a connection sent, from a request's first byte) for the log.
pub fn describe(head: &[u8]) -> Described {
    let line_end = head
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(head.len().min(MAX_FIELD));
    let line = head[..line_end]
        .strip_suffix(b"\r")
        .unwrap_or(&head[..line_end]);
    let mut parts = line.splitn(3, |&b| b == b' ');
    let mut d = Described {
        method: clean(parts.next().unwrap_or_default()),
        target: clean(parts.next().unwrap_or_default()),
        protocol: clean(parts.next().unwrap_or_default()),
        ..Described::default()
    };
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
        let is_host = name.eq_ignore_ascii_case(b"host");
        let slot = if is_host {
            &mut d.host
        } else if name.eq_ignore_ascii_case(b"referer") {
            &mut d.referer
        } else if name.eq_ignore_ascii_case(b"user-agent") {
            &mut d.user_agent
        } else {
            continue;
        };
        if slot.is_empty() {
            *slot = match crate::host::parse(value) {
                Ok(h) if is_host => h.normalized().into_owned(),
                _ => clean(value),
            };
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            time_ms: 1_764_633_600_123,
            client: Some("127.0.0.1:40000".parse().unwrap()),
            method: "GET".into(),
            target: clean(b"/a b\"\\\x01\xff"),
            protocol: "HTTP/1.1".into(),
            host: "shop.test".into(),
            status: 200,
            bytes: 12,
            duration_us: 34,
            arrival: Arrival::Handback,
            referer: String::new(),
            user_agent: clean(b"curl/8"),
        }
    }

    #[test]
    fn hostile_bytes_become_escaped_text() {
        assert_eq!(clean(b"/a b\"\\\x01\xff"), "/a b\\x22\\x5c\\x01\\xff");
        assert!(is_clean(&clean(&[0u8; 10_000])));
        assert!(clean(&[b'a'; 10_000]).len() <= MAX_FIELD);
    }

    #[test]
    fn an_entry_decodes_as_it_was_encoded() {
        let e = entry();
        assert_eq!(Entry::decode(&e.encode()), Some(e.clone()));
        let none = Entry {
            client: None,
            host: String::new(),
            ..e
        };
        assert_eq!(Entry::decode(&none.encode()), Some(none));
    }

    #[test]
    fn a_head_is_described_even_when_the_rule_refuses_it() {
        let d = describe(
            b"GET /a?b HTTP/1.1\r\nUser-Agent: curl/8\r\nHost: Shop.Test:80\r\nReferer: r\r\n\r\n",
        );
        assert_eq!(
            (d.method.as_str(), d.target.as_str(), d.protocol.as_str()),
            ("GET", "/a?b", "HTTP/1.1")
        );
        assert_eq!(
            (d.host.as_str(), d.referer.as_str(), d.user_agent.as_str()),
            ("shop.test", "r", "curl/8")
        );
        let d = describe(b"\x16\x03\x01\x02");
        assert_eq!(d.method, "\\x16\\x03\\x01\\x02");
        assert_eq!(describe(b"GET /x HTTP/1.1\r\nHost: a b\r\n").host, "a b");
    }

    #[test]
    fn malformed_lines_are_refused() {
        let good = entry().encode();
        for bad in [
            String::new(),
            good.replace("\t200\t", "\t20\t"),
            good.replace("\t200\t", "\t-1\t"),
            good.replace("handback", "elsewhere"),
            good.replace("GET", "G\"T"),
            good.replace("127.0.0.1:40000", "nowhere"),
            format!("{good}\textra"),
        ] {
            assert_eq!(Entry::decode(&bad), None, "{bad}");
        }
    }
}
