//! A host as a request names it (`Host` header or an absolute-form target's authority):
//! a DNS name or an IP literal, with an optional port. Anything a DNS name or IP literal
//! cannot hold is refused (RFC 9110 §7.2, RFC 3986 §3.2.2).

use std::borrow::Cow;
use std::net::Ipv6Addr;

/// Longest host name accepted (a DNS name is at most 253 bytes, plus a trailing dot).
pub const MAX_HOST: usize = 255;

/// A checked host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host<'a> {
    /// The name or IP literal as sent, without the port (`[::1]` keeps its brackets).
    pub name: &'a str,
    pub port: Option<u16>,
}

impl<'a> Host<'a> {
    /// The name lower-cased, without its trailing dot: the form routes and cache keys
    /// compare. Borrowed when it already is (what clients almost always send).
    pub fn normalized(&self) -> Cow<'a, str> {
        normalize(self.name)
    }
}

/// A host name lower-cased, without its trailing dot: how a `Host` and a ClientHello's SNI
/// name are compared.
pub fn normalize(name: &str) -> Cow<'_, str> {
    let n = name.strip_suffix('.').unwrap_or(name);
    if n.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(n.to_ascii_lowercase())
    } else {
        Cow::Borrowed(n)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("the host is empty")]
    Empty,
    #[error("the host is longer than {MAX_HOST} bytes")]
    TooLong,
    #[error("the host holds a character a host name cannot have")]
    BadName,
    #[error("the host has an empty label (`..`, or a leading dot)")]
    EmptyLabel,
    #[error("the host's IP literal is not an IPv6 address")]
    BadLiteral,
    #[error("the host's port is not a number from 0 to 65535")]
    BadPort,
}

/// Whether a request whose normalized host (`Host::normalized`, empty without one) is `host`
/// may be served on a TLS session whose ClientHello named `sni` (empty without SNI): the
/// same name, or one side unnamed. Anything else is 421 (RFC 9110 §15.5.20), from whichever
/// side reads the request, so a session made for one site never carries another's requests.
pub fn agrees_with_sni(host: &str, sni: &str) -> bool {
    sni.is_empty() || host.is_empty() || host == sni
}

/// Checks `value` as `host [":" port]`.
pub fn parse(value: &[u8]) -> Result<Host<'_>, HostError> {
    let text = std::str::from_utf8(value).map_err(|_| HostError::BadName)?;
    if text.is_empty() {
        return Err(HostError::Empty);
    }
    if text.len() > MAX_HOST + 6 {
        return Err(HostError::TooLong);
    }
    let (name, port) = if let Some(rest) = text.strip_prefix('[') {
        let close = rest.find(']').ok_or(HostError::BadLiteral)?;
        rest[..close]
            .parse::<Ipv6Addr>()
            .map_err(|_| HostError::BadLiteral)?;
        let after = &rest[close + 1..];
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(HostError::BadLiteral)?),
        };
        (&text[..close + 2], port)
    } else {
        match text.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (text, None),
        }
    };
    if name.is_empty() {
        return Err(HostError::Empty);
    }
    if name.len() > MAX_HOST {
        return Err(HostError::TooLong);
    }
    if !name.starts_with('[')
        && !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err(HostError::BadName);
    }
    // A DNS name has no empty label; one trailing dot (the root) is allowed.
    if !name.starts_with('[') {
        let labels = name.strip_suffix('.').unwrap_or(name);
        if labels.is_empty() || labels.split('.').any(str::is_empty) {
            return Err(HostError::EmptyLabel);
        }
    }
    let port = match port {
        None | Some("") => None,
        Some(p) => {
            if p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HostError::BadPort);
            }
            Some(p.parse::<u16>().map_err(|_| HostError::BadPort)?)
        }
    };
    Ok(Host { name, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_literals_with_ports_are_hosts() {
        assert_eq!(
            parse(b"Example.test:8080"),
            Ok(Host {
                name: "Example.test",
                port: Some(8080)
            })
        );
        assert_eq!(parse(b"127.0.0.1").unwrap().port, None);
        assert_eq!(parse(b"[::1]:80").unwrap().name, "[::1]");
        assert_eq!(parse(b"x:").unwrap().port, None);
        assert_eq!(
            parse(b"Shop.Example.").unwrap().normalized(),
            "shop.example"
        );
        assert!(matches!(
            parse(b"a.b").unwrap().normalized(),
            Cow::Borrowed("a.b")
        ));
    }

    #[test]
    fn impossible_hosts_are_refused() {
        for bad in [
            &b""[..],
            b"a b",
            b"a/b",
            b"a@b",
            b"[::1",
            b"[zz]",
            b"x:99999",
            b"x:-1",
            b"x:1:2",
            b":80",
            b"\xff",
            b"a\tb",
            b".",
            b".a",
            b"a..b",
            b"a..",
            b"..:80",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(parse(&[b'a'; 300]), Err(HostError::TooLong));
    }
}
