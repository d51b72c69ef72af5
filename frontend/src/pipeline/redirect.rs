//! `[server] redirect_https`: a plain-listener request gets 308 to the same URL over https
//! (the answer's text is `answers::redirect`).
//! The host and target come from a head `sluice_proto::request` accepted (visible ASCII, no
//! CR or LF), so nothing a client sends can add a header line.

use std::net::IpAddr;

/// `https://host[:port]path[?query]`; the port is left out when it is 443. `host` is the
/// request's normalized host (an IPv6 literal keeps its brackets); without one, the
/// connection's local address.
pub fn location(
    host: &str,
    local: Option<IpAddr>,
    port: u16,
    path: &str,
    query: Option<&str>,
) -> Option<String> {
    let host = match (host.is_empty(), local) {
        (false, _) => host.to_owned(),
        (true, Some(IpAddr::V6(a))) => format!("[{a}]"),
        (true, Some(a)) => a.to_string(),
        (true, None) => return None,
    };
    let port = if port == 443 {
        String::new()
    } else {
        format!(":{port}")
    };
    let query = query.map_or(String::new(), |q| format!("?{q}"));
    Some(format!("https://{host}{port}{path}{query}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_location_keeps_host_path_and_query_and_names_the_https_port() {
        assert_eq!(
            location("shop.test", None, 8443, "/a/b", Some("x=1")).as_deref(),
            Some("https://shop.test:8443/a/b?x=1")
        );
        assert_eq!(
            location("[::1]", None, 443, "/", None).as_deref(),
            Some("https://[::1]/")
        );
        let v6 = Some("::1".parse().unwrap());
        assert_eq!(
            location("", v6, 443, "/x", None).as_deref(),
            Some("https://[::1]/x")
        );
        let v4 = Some("10.0.0.1".parse().unwrap());
        assert_eq!(
            location("", v4, 8443, "/x", None).as_deref(),
            Some("https://10.0.0.1:8443/x")
        );
        assert_eq!(location("", None, 443, "/", None), None);
    }
}
