//! The request-target (RFC 9112 §3.2): which path and which host a request names. Only the
//! origin form (`/p?q`) and the absolute form with an `http` or `https` scheme
//! (`http://host/p?q`, the scheme in any case) name a resource sluice can route; the
//! authority form (`CONNECT`) and the asterisk form (`OPTIONS *`) do not. A request-target
//! never holds a fragment: `#` is refused wherever it stands.

use crate::host::{self, Host, HostError};

/// What a request-target names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    /// The raw path, up to `?` (`/` for an absolute form without one).
    pub path: &'a str,
    /// The raw query, after the first `?`.
    pub query: Option<&'a str>,
    /// The absolute form's authority.
    pub authority: Option<Host<'a>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("the request target holds `#` (a fragment is never sent)")]
    Fragment,
    #[error("the request target `*` names no resource to route")]
    Asterisk,
    #[error("the request target is neither a path nor an http(s) URL")]
    Form,
    #[error("the request target's URL scheme is not http or https")]
    Scheme,
    #[error("the request target's authority holds user information")]
    UserInfo,
    #[error("the request target's authority: {0}")]
    Authority(HostError),
}

/// Splits and checks a request-target.
pub fn parse(raw: &str) -> Result<Target<'_>, TargetError> {
    if raw.contains('#') {
        return Err(TargetError::Fragment);
    }
    if raw.starts_with('/') {
        let (path, query) = split_query(raw);
        return Ok(Target {
            path,
            query,
            authority: None,
        });
    }
    if raw == "*" {
        return Err(TargetError::Asterisk);
    }
    let (scheme, rest) = raw.split_once("://").ok_or(TargetError::Form)?;
    if !(scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")) {
        let is_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
        return Err(if is_scheme {
            TargetError::Scheme
        } else {
            TargetError::Form
        });
    }
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    if authority.contains('@') {
        return Err(TargetError::UserInfo);
    }
    let authority = host::parse(authority.as_bytes()).map_err(TargetError::Authority)?;
    let (path, query) = split_query(&rest[end..]);
    Ok(Target {
        path: if path.is_empty() { "/" } else { path },
        query,
        authority: Some(authority),
    })
}

fn split_query(s: &str) -> (&str, Option<&str>) {
    match s.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (s, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_form_splits_path_and_query() {
        let t = parse("/a/b?x=1?y").unwrap();
        assert_eq!(
            (t.path, t.query, t.authority),
            ("/a/b", Some("x=1?y"), None)
        );
        assert_eq!(parse("/").unwrap().query, None);
    }

    #[test]
    fn absolute_form_names_host_and_path_in_any_scheme_case() {
        for raw in [
            "http://h/p?q",
            "HTTP://h/p?q",
            "https://h/p?q",
            "HtTpS://h/p?q",
        ] {
            let t = parse(raw).unwrap();
            assert_eq!((t.path, t.query), ("/p", Some("q")), "{raw}");
            assert_eq!(t.authority.unwrap().name, "h");
        }
        let t = parse("http://h:8080").unwrap();
        assert_eq!((t.path, t.authority.unwrap().port), ("/", Some(8080)));
        assert_eq!(parse("http://h?/api/x").unwrap().path, "/");
        assert_eq!(parse("http://[::1]:80/x").unwrap().path, "/x");
    }

    #[test]
    fn fragments_other_forms_and_schemes_are_refused() {
        assert_eq!(parse("/api/x#/../../admin/"), Err(TargetError::Fragment));
        assert_eq!(parse("http://x#/admin/"), Err(TargetError::Fragment));
        assert_eq!(parse("*"), Err(TargetError::Asterisk));
        assert_eq!(parse("example.com:443"), Err(TargetError::Form));
        assert_eq!(parse("ftp://h/x"), Err(TargetError::Scheme));
        assert_eq!(parse("x-y://h/x"), Err(TargetError::Scheme));
        assert_eq!(parse("http://u@h/x"), Err(TargetError::UserInfo));
        assert!(matches!(parse("http:///x"), Err(TargetError::Authority(_))));
        assert!(matches!(
            parse("http://a b/x"),
            Err(TargetError::Authority(_))
        ));
        assert_eq!(parse("api/x"), Err(TargetError::Form));
    }
}
