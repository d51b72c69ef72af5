//! What the dispatcher does with the bytes a connection has sent so far: wait for more,
//! route the request to a pool, or refuse it with a status code. The head is judged by
//! `sluice_proto::request`, the rule every worker applies too.

use sluice_proto::limits::MAX_HEADERS;
use std::net::IpAddr;

use sluice_proto::cache;
use sluice_proto::request::{self, Parsed};
use sluice_proto::route::Query;

pub use sluice_proto::limits::HeadLimits as Limits;

use crate::{pool::PoolId, route::RouteTable};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The head is not complete yet.
    NeedMore,
    /// Hand the connection to this pool.
    Pool(PoolId),
    /// Answer with this status and a short reason, then close.
    Refuse(u16, &'static str),
}

/// A request the cache may answer: `GET`/`HEAD` without query, body, `Authorization` or
/// `Range` (`sluice_proto::cache::request_eligible`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheQuery<'b> {
    /// Normalized (`sluice_proto::cache::key_host`).
    pub host: std::borrow::Cow<'b, str>,
    pub path: std::borrow::Cow<'b, str>,
    pub head_only: bool,
    pub accept_encoding: Option<&'b [u8]>,
    /// HTTP/1.0: a kept connection must say `Connection: keep-alive`.
    pub http10: bool,
}

/// Everything the dispatcher learns from a complete head (borrowed from its bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection<'b> {
    pub decision: Decision,
    /// Bytes of the head (the request ends there when it has no body).
    pub head_len: usize,
    pub cache: Option<CacheQuery<'b>>,
    /// The client wants the connection closed after this answer.
    pub close: bool,
    /// The request's normalized host (`sluice_proto::cache::key_host`; empty without one).
    pub host: std::borrow::Cow<'b, str>,
    /// The raw path and query of the request-target (empty until the head is complete).
    pub path: &'b str,
    pub query: Option<&'b str>,
    /// How the request's body is framed (None until the head is complete).
    pub framing: request::Framing,
    /// The method is `HEAD`: an answer carries no body.
    pub head_only: bool,
    /// The request asks for a protocol upgrade (`Upgrade`, as WebSocket does).
    pub upgrade: bool,
}

impl Decision {
    /// The pool a routed request goes to.
    pub fn pool(&self) -> Option<PoolId> {
        match self {
            Decision::Pool(p) => Some(*p),
            _ => None,
        }
    }
}

impl Inspection<'_> {
    /// What is known of a head that is not complete, or not valid: only `decision`.
    fn without_head(decision: Decision) -> Inspection<'static> {
        Inspection {
            decision,
            head_len: 0,
            cache: None,
            close: true,
            host: Default::default(),
            path: "",
            query: None,
            framing: request::Framing::None,
            head_only: false,
            upgrade: false,
        }
    }

    /// What the cache is asked for this request, if it may answer it.
    pub fn lookup(&self) -> Option<crate::cache::Lookup<'_>> {
        let q = self.cache.as_ref()?;
        Some(crate::cache::Lookup {
            host: &q.host,
            path: &q.path,
            accept_encoding: q.accept_encoding,
            head_only: q.head_only,
            keep: crate::cache::Keep::of(self.close, q.http10),
            routed: self.decision.pool(),
        })
    }
}

/// `local`: the address the connection arrived on, for IP-bound routes (None: they do not
/// match).
pub fn decide(
    buf: &[u8],
    limits: &Limits,
    routes: &RouteTable<PoolId>,
    local: Option<IpAddr>,
) -> Decision {
    inspect(buf, limits, routes, local, "").decision
}

/// `sni`: a TLS session's server name (normalized; empty for none), the host of a request
/// that names none (HTTP/1.0 without `Host`), as the kernel program routed the session.
pub fn inspect<'b>(
    buf: &'b [u8],
    limits: &Limits,
    routes: &RouteTable<PoolId>,
    local: Option<IpAddr>,
    sni: &'b str,
) -> Inspection<'b> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let parsed_upgrade;
    let head = match request::parse(buf, limits, &mut headers) {
        Ok(Parsed::Partial) => return Inspection::without_head(Decision::NeedMore),
        Ok(Parsed::Complete(req, head)) => {
            parsed_upgrade = req
                .headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case("upgrade"));
            head
        }
        Err(r) => return Inspection::without_head(Decision::Refuse(r.status, r.reason)),
    };
    let named = cache::routing_host(&head, sni);
    let host = named.clone().unwrap_or_default();
    let query = Query {
        host: named.as_deref(),
        local,
        path: &head.canonical,
    };
    let decision = match routes.lookup(&query) {
        Some(pool) => Decision::Pool(pool),
        None => Decision::Refuse(400, "no application is configured for this URL"),
    };
    let cache = cache::request_eligible(&head, true).then(|| CacheQuery {
        host: host.clone(),
        path: head.canonical,
        head_only: head.method == "HEAD",
        accept_encoding: head.accept_encoding,
        http10: head.minor_version == 0,
    });
    Inspection {
        decision,
        head_len: head.head_len,
        cache,
        close: !head.keep_alive,
        host,
        path: head.path,
        query: head.query,
        framing: head.framing,
        head_only: head.method == "HEAD",
        upgrade: parsed_upgrade,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_proto::site::Site;

    const WEB: Decision = Decision::Pool(PoolId::new(0));
    const API: Decision = Decision::Pool(PoolId::new(1));

    const SHOP: Decision = Decision::Pool(PoolId::new(2));
    const LOCAL: Decision = Decision::Pool(PoolId::new(3));

    fn routes() -> RouteTable<PoolId> {
        let site = |h: &str| Site::parse(Some(h)).unwrap();
        RouteTable::new([
            (site("*"), "/api/".to_owned(), PoolId::new(1)),
            (site("*"), "/".to_owned(), PoolId::new(0)),
            (site("shop.test"), "/".to_owned(), PoolId::new(2)),
            (site("127.0.0.2"), "/".to_owned(), PoolId::new(3)),
        ])
    }

    fn d(req: &[u8]) -> Decision {
        decide(req, &Limits::default(), &routes(), None)
    }

    #[test]
    fn a_request_without_host_on_a_tls_session_routes_by_its_sni_name() {
        fn on<'b>(raw: &'b [u8], sni: &'b str) -> Inspection<'b> {
            inspect(raw, &Limits::default(), &routes(), None, sni)
        }
        let seen = on(b"GET / HTTP/1.0\r\n\r\n", "shop.test");
        assert_eq!((seen.decision, &*seen.host), (SHOP, "shop.test"));
        assert_eq!(
            seen.cache.map(|q| q.host.into_owned()).as_deref(),
            Some("shop.test")
        );
        // Without SNI it is the weak wildcard's; a Host the request names wins (the 421
        // rule is the pipeline's).
        assert_eq!(on(b"GET / HTTP/1.0\r\n\r\n", "").decision, WEB);
        let named = on(b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n", "shop.test");
        assert_eq!((named.decision, &*named.host), (WEB, "other.test"));
    }

    #[test]
    fn routes_by_the_host_a_request_names_then_by_its_local_address() {
        assert_eq!(
            d(b"GET /api/x HTTP/1.1\r\nHost: SHOP.test.:8080\r\n\r\n"),
            SHOP
        );
        assert_eq!(
            d(b"GET http://shop.test/api/ HTTP/1.1\r\nHost: a\r\n\r\n"),
            SHOP
        );
        assert_eq!(
            d(b"GET http://a/api/ HTTP/1.1\r\nHost: shop.test\r\n\r\n"),
            API
        );
        let local = Some("127.0.0.2".parse().unwrap());
        let at = |raw: &[u8]| decide(raw, &Limits::default(), &routes(), local);
        assert_eq!(at(b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n"), LOCAL);
        assert_eq!(at(b"GET /api/x HTTP/1.0\r\n\r\n"), LOCAL);
        assert_eq!(at(b"GET /api/x HTTP/1.1\r\nHost: shop.test\r\n\r\n"), SHOP);
        for bad in ["a..b", ".a", "[::1", "a b"] {
            let raw = format!("GET / HTTP/1.1\r\nHost: {bad}\r\n\r\n");
            assert!(
                matches!(d(raw.as_bytes()), Decision::Refuse(400, _)),
                "{bad}"
            );
        }
    }

    #[test]
    fn routes_complete_heads_by_canonical_path() {
        assert_eq!(d(b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n"), API);
        assert_eq!(d(b"GET /apix HTTP/1.1\r\nHost: a\r\n\r\n"), WEB);
        assert_eq!(d(b"GET /x/../api/y?q=1 HTTP/1.1\r\nHost: a\r\n\r\n"), API);
        assert_eq!(d(b"GET http://h/api/ HTTP/1.1\r\nHost: a\r\n\r\n"), API);
        assert_eq!(d(b"GET //api/x HTTP/1.0\r\n\r\n"), API);
    }

    #[test]
    fn waits_for_the_rest_of_the_head() {
        assert_eq!(d(b"GET /api/x HTTP/1.1\r\nHost: a\r\n"), Decision::NeedMore);
        assert_eq!(d(b""), Decision::NeedMore);
    }

    #[test]
    fn a_fragment_in_the_target_is_refused_not_routed() {
        // It was kept in the path, and `..` climbed out of /api/ into another pool.
        assert!(matches!(
            d(b"GET /api/x#/../../admin/ HTTP/1.1\r\nHost: a\r\n\r\n"),
            Decision::Refuse(400, _)
        ));
        assert!(matches!(
            d(b"GET http://x#/admin/ HTTP/1.1\r\nHost: a\r\n\r\n"),
            Decision::Refuse(400, _)
        ));
        assert_eq!(d(b"GET http://h?/api/x HTTP/1.1\r\nHost: a\r\n\r\n"), WEB);
    }

    #[test]
    fn a_cached_answer_needs_a_request_without_any_body_framing() {
        fn seen(raw: &[u8]) -> Inspection<'_> {
            inspect(raw, &Limits::default(), &routes(), None, "")
        }
        assert!(seen(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n").cache.is_some());
        // Duplicate, empty and listed lengths are refused, not read as "no body".
        for raw in [
            &b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 41\r\n\r\n"[..],
            b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length:\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0 0\r\n\r\n",
        ] {
            let s = seen(raw);
            assert!(matches!(s.decision, Decision::Refuse(400, _)), "{s:?}");
            assert!(s.cache.is_none());
        }
        assert!(seen(b"GET /a HTTP/1.1\r\n\r\n").cache.is_none(), "no Host");
    }
}
