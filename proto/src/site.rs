//! Which requests a route's `host` takes, as HTTP.sys URL-prefix hosts (and the IIS site
//! bindings mapped onto them) do. Five kinds, tried in this order for every request:
//!
//! 1. `+`, the strong wildcard: every host;
//! 2. an exact name (`shop.example.test`), compared case-insensitively without the port;
//! 3. a wildcard label (`*.example.test`): a host that is one label more than the suffix
//!    (`a.example.test`; neither `example.test` nor `a.b.example.test`);
//! 4. an IP address (`127.0.0.2`, `[::1]`): the local address the connection arrived on,
//!    whatever its `Host`;
//! 5. no host (or `*`), the weak wildcard: every request, today's single site.
//!
//! Within a kind the longest path prefix wins (`route`); a request goes to the next kind only
//! when no prefix of the earlier one matches.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// Longest name a route's host may have (a DNS name's limit).
pub const MAX_NAME: usize = 253;
/// Longest label of a route's host name.
pub const MAX_LABEL: usize = 63;

/// A route's site: what its `host` names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    Strong,
    /// Lower case, no trailing dot.
    Exact(String),
    /// The suffix after `*.`, lower case, no trailing dot.
    Wildcard(String),
    /// IPv4-mapped IPv6 addresses are kept as IPv4 (what a dual-stack socket's peer is).
    Ip(IpAddr),
    Weak,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SiteError {
    #[error("is empty (leave `host` out, or write `*`, for every host)")]
    Empty,
    #[error("is longer than {MAX_NAME} bytes")]
    TooLong,
    #[error("has a label longer than {MAX_LABEL} bytes")]
    LongLabel,
    #[error("has an empty label")]
    EmptyLabel,
    #[error(
        "holds a character a host name cannot have (letters, digits, `-`, `_` and `.` only; \
         `*.` only as the first label; no port)"
    )]
    BadName,
    #[error("is not an IPv6 address in brackets")]
    BadLiteral,
}

impl Site {
    /// The site a route's `host` value names (None: no `host` key).
    pub fn parse(host: Option<&str>) -> Result<Site, SiteError> {
        let Some(host) = host else {
            return Ok(Site::Weak);
        };
        match host {
            "" => Err(SiteError::Empty),
            "*" => Ok(Site::Weak),
            "+" => Ok(Site::Strong),
            _ => {
                if let Some(inner) = host.strip_prefix('[') {
                    let v6 = inner
                        .strip_suffix(']')
                        .and_then(|a| a.parse::<Ipv6Addr>().ok())
                        .ok_or(SiteError::BadLiteral)?;
                    return Ok(Site::Ip(local_address(IpAddr::V6(v6))));
                }
                if let Ok(ip) = host.parse::<IpAddr>() {
                    return Ok(Site::Ip(local_address(ip)));
                }
                if let Some(suffix) = host.strip_prefix("*.") {
                    return name(suffix).map(Site::Wildcard);
                }
                name(host).map(Site::Exact)
            }
        }
    }

    /// The order HTTP.sys tries the kinds in (lower first).
    pub fn rank(&self) -> u8 {
        match self {
            Site::Strong => 0,
            Site::Exact(_) => 1,
            Site::Wildcard(_) => 2,
            Site::Ip(_) => 3,
            Site::Weak => 4,
        }
    }
}

/// The form `Site::parse` reads back: `+`, `*`, the name, `*.suffix`, the address (IPv6 in
/// brackets).
impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Site::Strong => f.write_str("+"),
            Site::Exact(n) => f.write_str(n),
            Site::Wildcard(s) => write!(f, "*.{s}"),
            Site::Ip(IpAddr::V4(a)) => write!(f, "{a}"),
            Site::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            Site::Weak => f.write_str("*"),
        }
    }
}

/// A connection's local address as IP-bound routes compare it: an IPv4-mapped IPv6 address
/// (a dual-stack socket's view of an IPv4 connection) is the IPv4 address.
pub fn local_address(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The local address of connected socket `fd`, as IP-bound routes compare it; None when
/// the socket has none (not an IP socket, or closed).
pub fn local_address_of(fd: std::os::fd::RawFd) -> Option<IpAddr> {
    crate::sockaddr::local(fd).map(|a| local_address(a.ip()))
}

/// A host name in a route: lower-cased, one trailing dot dropped.
fn name(raw: &str) -> Result<String, SiteError> {
    let n = raw.strip_suffix('.').unwrap_or(raw);
    if n.is_empty() {
        return Err(SiteError::Empty);
    }
    if n.len() > MAX_NAME {
        return Err(SiteError::TooLong);
    }
    if !n
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(SiteError::BadName);
    }
    for label in n.split('.') {
        if label.is_empty() {
            return Err(SiteError::EmptyLabel);
        }
        if label.len() > MAX_LABEL {
            return Err(SiteError::LongLabel);
        }
    }
    Ok(n.to_ascii_lowercase())
}

/// The suffix a wildcard-label route must name to take `host` (a normalized request host):
/// everything after its first label. None for a one-label host.
pub fn wildcard_suffix(host: &str) -> Option<&str> {
    match host.split_once('.') {
        Some((label, suffix)) if !label.is_empty() && !suffix.is_empty() => Some(suffix),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_host_is_recognized_and_written_back_the_same() {
        let cases = [
            (None, Site::Weak, "*"),
            (Some("*"), Site::Weak, "*"),
            (Some("+"), Site::Strong, "+"),
            (
                Some("Shop.Example.Test."),
                Site::Exact("shop.example.test".into()),
                "shop.example.test",
            ),
            (
                Some("*.Example.test"),
                Site::Wildcard("example.test".into()),
                "*.example.test",
            ),
            (
                Some("127.0.0.2"),
                Site::Ip("127.0.0.2".parse().unwrap()),
                "127.0.0.2",
            ),
            (Some("[::1]"), Site::Ip("::1".parse().unwrap()), "[::1]"),
            (Some("::1"), Site::Ip("::1".parse().unwrap()), "[::1]"),
            (
                Some("[::ffff:10.0.0.1]"),
                Site::Ip("10.0.0.1".parse().unwrap()),
                "10.0.0.1",
            ),
        ];
        for (raw, site, shown) in cases {
            let parsed = Site::parse(raw).unwrap();
            assert_eq!(parsed, site, "{raw:?}");
            assert_eq!(parsed.to_string(), shown);
            assert_eq!(
                Site::parse(Some(shown)).unwrap(),
                site,
                "{shown} reads back"
            );
        }
    }

    #[test]
    fn impossible_hosts_name_their_reason() {
        assert_eq!(Site::parse(Some("")), Err(SiteError::Empty));
        assert_eq!(Site::parse(Some("a..b")), Err(SiteError::EmptyLabel));
        assert_eq!(Site::parse(Some(".a")), Err(SiteError::EmptyLabel));
        assert_eq!(Site::parse(Some("a:80")), Err(SiteError::BadName));
        assert_eq!(Site::parse(Some("a.*.b")), Err(SiteError::BadName));
        assert_eq!(Site::parse(Some("**.b")), Err(SiteError::BadName));
        assert_eq!(Site::parse(Some("*.")), Err(SiteError::Empty));
        assert_eq!(Site::parse(Some("[::1")), Err(SiteError::BadLiteral));
        assert_eq!(Site::parse(Some("[1.2.3.4]")), Err(SiteError::BadLiteral));
        assert_eq!(
            Site::parse(Some(&"a".repeat(64))),
            Err(SiteError::LongLabel)
        );
        let long = vec!["a".repeat(60); 5].join(".");
        assert_eq!(Site::parse(Some(&long)), Err(SiteError::TooLong));
    }

    #[test]
    fn a_sockets_local_address_is_read_back() {
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(
            local_address_of(l.as_raw_fd()),
            Some("127.0.0.1".parse().unwrap())
        );
        assert_eq!(local_address_of(-1), None);
    }

    #[test]
    fn a_wildcard_label_is_exactly_one_label() {
        assert_eq!(wildcard_suffix("a.example.test"), Some("example.test"));
        assert_eq!(wildcard_suffix("a.b.example.test"), Some("b.example.test"));
        assert_eq!(wildcard_suffix("test"), None);
        assert_eq!(wildcard_suffix(".test"), None);
    }
}
