//! Per-request routing, as HTTP.sys does it: a keep-alive connection steered to this pool may
//! later carry a request for another pool, or for a key the front end answers from its cache.
//! Such a request is handed back to the front end (with the connection) instead of answered.
//!
//! The front end sends the whole route table (`routes`) and the keys it caches (`cached`) on
//! the control channel, both before the worker starts: the worker waits for them before it
//! serves (see `runtime::serve`), so no request is answered before the worker knows where it
//! belongs. Thread 0 stores later updates here and every runtime thread reads them. The rules
//! themselves are `sluice_proto`'s, the ones the front end uses.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use sluice_proto::cache::{self, CacheKey};
use sluice_proto::control::RouteEntry;
use sluice_proto::route::{Query, RouteTable};

use crate::Request;

/// What the front end told this worker about routing. Immutable; replaced as a whole.
#[derive(Debug, Default)]
pub(crate) struct Routing {
    /// None: no route table (a standalone worker): never hand back.
    routes: Option<Arc<Routes>>,
    cached: Arc<Cached>,
}

/// The front end's cached keys, and their paths (looked up first, by the request's own path:
/// no allocation for a request whose path is not cached at all, the usual case).
#[derive(Debug, Default)]
struct Cached {
    keys: HashSet<CacheKey>,
    paths: HashSet<String>,
}

/// A route table, with which of its pools is this worker's.
#[derive(Debug)]
struct Routes {
    table: RouteTable,
    /// Pool names by the index the table gives.
    pools: Vec<String>,
    /// Index of this worker's pool in `pools`, if the table names it.
    own: Option<usize>,
}

/// Why a request is handed back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Foreign {
    /// The front end serves this request from its cache.
    Cached,
    /// The host and path belong to another pool.
    OtherPool(String),
    /// No route matches the host and path.
    NoRoute,
}

impl std::fmt::Display for Foreign {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Foreign::Cached => f.write_str("served from the front end's cache"),
            Foreign::OtherPool(pool) => write!(f, "routed to pool {pool}"),
            Foreign::NoRoute => f.write_str("no route"),
        }
    }
}

impl Routing {
    /// The state after a `routes` message: `routes` replaces the table, the cached set stays.
    /// An empty table hands every request back (the front end answers it).
    pub(crate) fn with_routes(&self, routes: Vec<RouteEntry>, own_pool: &str) -> Routing {
        let mut pools: Vec<String> = Vec::new();
        let mut entries = Vec::with_capacity(routes.len());
        for RouteEntry { site, prefix, pool } in routes {
            let index = match pools.iter().position(|p| *p == pool) {
                Some(index) => index,
                None => {
                    pools.push(pool);
                    pools.len() - 1
                }
            };
            entries.push((site, prefix, index));
        }
        let own = pools.iter().position(|p| p == own_pool);
        if own.is_none() {
            log::warn!(
                "the route table does not name this worker's pool {own_pool}: \
                 every request will be handed back"
            );
        }
        Routing {
            routes: Some(Arc::new(Routes {
                table: RouteTable::new(entries),
                pools,
                own,
            })),
            cached: Arc::clone(&self.cached),
        }
    }

    /// The state after a `cached` message: the set is replaced, the table stays.
    pub(crate) fn with_cached(&self, keys: Vec<CacheKey>) -> Routing {
        let paths = keys.iter().map(|k| k.path.clone()).collect();
        Routing {
            routes: self.routes.clone(),
            cached: Arc::new(Cached {
                keys: keys.into_iter().collect(),
                paths,
            }),
        }
    }

    /// True when requests may be handed back at all (a table was received).
    pub(crate) fn is_active(&self) -> bool {
        self.routes.is_some()
    }

    /// Whether the route table binds routes to local addresses (a connection's own is
    /// looked up only then).
    pub(crate) fn needs_local_address(&self) -> bool {
        self.routes.as_ref().is_some_and(|r| r.table.has_ip_sites())
    }

    /// Whether a request (on a connection whose local address is `local`, and on a TLS
    /// session named `sni`, empty for none) belongs elsewhere.
    pub(crate) fn decide(
        &self,
        req: &Request<'_>,
        local: Option<IpAddr>,
        sni: &str,
    ) -> Option<Foreign> {
        let routes = self.routes.as_ref()?;
        let head = req.head();
        let path = req.canonical_path();
        let named = cache::routing_host(head, sni);
        let host = named.clone().unwrap_or_default();
        if self.cached.paths.contains(path)
            && cache::request_eligible(head, true)
            && CacheKey::candidates(&host, path, head.accept_encoding)
                .iter()
                .any(|k| self.cached.keys.contains(k))
        {
            return Some(Foreign::Cached);
        }
        let query = Query {
            host: named.as_deref(),
            local,
            path,
        };
        match routes.table.lookup(&query) {
            None => Some(Foreign::NoRoute),
            Some(index) if Some(index) == routes.own => None,
            Some(index) => Some(Foreign::OtherPool(
                routes.pools.get(index).cloned().unwrap_or_default(),
            )),
        }
    }
}

/// The routing state shared by every runtime thread. Thread 0 replaces it; the others notice a
/// new version with one atomic load per request and only then take the lock.
#[derive(Debug, Default)]
pub(crate) struct SharedRouting {
    version: AtomicU64,
    state: RwLock<Arc<Routing>>,
}

impl SharedRouting {
    /// The current state and its version.
    pub(crate) fn load(&self) -> (u64, Arc<Routing>) {
        let version = self.version.load(Ordering::Acquire);
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        (version, Arc::clone(&state))
    }

    /// The version of the current state (cheap; compare with the one a thread holds).
    pub(crate) fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Takes what a `routes` message says (`own_pool`: this worker's pool).
    pub(crate) fn set_routes(&self, routes: Vec<RouteEntry>, own_pool: &str) {
        log::info!("route table from the front end: {} route(s)", routes.len());
        self.update(|current| current.with_routes(routes, own_pool));
    }

    /// Takes what a `cached` message says.
    pub(crate) fn set_cached(&self, keys: Vec<CacheKey>) {
        log::debug!("the front end caches {} key(s)", keys.len());
        self.update(|current| current.with_cached(keys));
    }

    /// Replaces the state with `update(current)`.
    pub(crate) fn update(&self, update: impl FnOnce(&Routing) -> Routing) {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        *state = Arc::new(update(&state));
        self.version.fetch_add(1, Ordering::Release);
    }
}

/// One thread's view of the shared routing state, refreshed when its version changes.
#[derive(Debug)]
pub(crate) struct RoutingView {
    version: u64,
    state: Arc<Routing>,
}

impl RoutingView {
    pub(crate) fn new(shared: &SharedRouting) -> Self {
        let (version, state) = shared.load();
        RoutingView { version, state }
    }

    /// The current state, reloaded if thread 0 replaced it.
    pub(crate) fn current(&mut self, shared: &SharedRouting) -> &Routing {
        if shared.version() != self.version {
            (self.version, self.state) = shared.load();
        }
        &self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::with_request;
    use sluice_proto::site::Site;

    fn route(site: &str, prefix: &str, pool: &str) -> RouteEntry {
        RouteEntry {
            site: Site::parse(Some(site)).unwrap(),
            prefix: prefix.into(),
            pool: pool.into(),
        }
    }

    fn key(path: &str) -> CacheKey {
        CacheKey {
            host: "h".into(),
            path: path.into(),
            variant: None,
        }
    }

    fn routing(own: &str) -> Routing {
        Routing::default()
            .with_routes(
                vec![
                    route("*", "/api/", "api"),
                    route("*", "/", "web"),
                    route("*", "/api/v2/", "web"),
                ],
                own,
            )
            .with_cached(vec![
                key("/api/cached"),
                key("/logo.png"),
                CacheKey {
                    host: "h".into(),
                    path: "/api/gz".into(),
                    variant: Some("gzip".into()),
                },
            ])
    }

    fn decide(r: &Routing, raw: &str) -> Option<Foreign> {
        with_request(raw.as_bytes(), b"", |req| r.decide(req, None, ""))
    }

    fn get(path: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n")
    }

    #[test]
    fn own_pool_requests_are_served() {
        let r = routing("api");
        assert_eq!(decide(&r, &get("/api/x")), None);
        assert_eq!(decide(&r, &get("/api")), None);
        assert_eq!(decide(&r, &get("/%61pi/x")), None);
    }

    #[test]
    fn other_pool_requests_are_handed_back() {
        let r = routing("api");
        assert_eq!(
            decide(&r, &get("/web/b")),
            Some(Foreign::OtherPool("web".into()))
        );
        assert_eq!(
            decide(&r, &get("/api/v2/x")),
            Some(Foreign::OtherPool("web".into()))
        );
        assert_eq!(
            decide(&r, &get("/api/../web/x")),
            Some(Foreign::OtherPool("web".into()))
        );
        assert_eq!(
            decide(&r, &get("http://h/web/x")),
            Some(Foreign::OtherPool("web".into()))
        );
        assert_eq!(
            decide(&routing("web"), &get("/api/x")),
            Some(Foreign::OtherPool("api".into()))
        );
    }

    #[test]
    fn cached_keys_are_handed_back_only_for_requests_the_cache_may_answer() {
        let r = routing("api");
        assert_eq!(decide(&r, &get("/api/cached")), Some(Foreign::Cached));
        assert_eq!(
            decide(&r, "HEAD /api/cached HTTP/1.1\r\nHost: h\r\n\r\n"),
            Some(Foreign::Cached)
        );
        for raw in [
            get("/api/cached?x=1"),
            "POST /api/cached HTTP/1.1\r\nHost: h\r\n\r\n".into(),
            "GET /api/cached HTTP/1.1\r\nHost: h\r\nAuthorization: x\r\n\r\n".into(),
            "GET /api/cached HTTP/1.1\r\nHost: h\r\nRange: bytes=0-1\r\n\r\n".into(),
            "GET /api/cached HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\n".into(),
        ] {
            assert_eq!(decide(&r, &raw), None, "{raw}");
        }
    }

    #[test]
    fn a_varying_entry_is_handed_back_only_for_its_own_accept_encoding() {
        let r = routing("api");
        let with =
            |ae: &str| format!("GET /api/gz HTTP/1.1\r\nHost: h\r\nAccept-Encoding: {ae}\r\n\r\n");
        assert_eq!(decide(&r, &with("gzip")), Some(Foreign::Cached));
        assert_eq!(decide(&r, &with("br")), None);
        assert_eq!(decide(&r, &get("/api/gz")), None);
    }

    #[test]
    fn unrouted_paths_and_an_empty_table_hand_back() {
        let r = Routing::default().with_routes(vec![route("*", "/api/", "api")], "api");
        assert_eq!(decide(&r, &get("/other")), Some(Foreign::NoRoute));
        let empty = Routing::default().with_routes(vec![], "api");
        assert!(empty.is_active());
        assert_eq!(decide(&empty, &get("/x")), Some(Foreign::NoRoute));
    }

    #[test]
    fn a_request_for_another_site_or_address_is_handed_back() {
        let r = Routing::default().with_routes(
            vec![
                route("shop.test", "/", "shop"),
                route("127.0.0.2", "/", "local"),
                route("*", "/", "web"),
            ],
            "shop",
        );
        let host = |h: &str| format!("GET /x HTTP/1.1\r\nHost: {h}\r\n\r\n");
        assert_eq!(decide(&r, &host("Shop.Test.:80")), None);
        assert_eq!(
            decide(&r, &host("web.test")),
            Some(Foreign::OtherPool("web".into()))
        );
        assert!(r.needs_local_address());
        let at = |raw: &str, local: &str| {
            with_request(raw.as_bytes(), b"", |req| {
                r.decide(req, local.parse().ok(), "")
            })
        };
        assert_eq!(
            at(&host("web.test"), "127.0.0.2"),
            Some(Foreign::OtherPool("local".into()))
        );
        assert_eq!(at(&host("shop.test"), "127.0.0.2"), None);
    }

    #[test]
    fn a_request_without_host_on_a_tls_session_routes_by_its_sni_name() {
        let r = Routing::default().with_routes(
            vec![route("shop.test", "/", "shop"), route("*", "/", "web")],
            "shop",
        );
        let on = |sni: &str| {
            with_request(b"GET /x HTTP/1.0\r\n\r\n", b"", |req| {
                r.decide(req, None, sni)
            })
        };
        assert_eq!(on("shop.test"), None);
        assert_eq!(on(""), Some(Foreign::OtherPool("web".into())));
    }

    #[test]
    fn a_cached_key_of_another_host_is_not_handed_back() {
        let r = routing("api");
        let raw = "GET /api/cached HTTP/1.1\r\nHost: other\r\n\r\n";
        assert_eq!(decide(&r, raw), None);
    }

    #[test]
    fn no_table_never_hands_back() {
        let r = Routing::default().with_cached(vec![key("/x")]);
        assert!(!r.is_active());
        assert_eq!(decide(&r, &get("/x")), None);
    }

    #[test]
    fn routes_and_cached_messages_replace_only_their_part() {
        let r = routing("api").with_cached(vec![key("/web/b")]);
        assert_eq!(decide(&r, &get("/api/cached")), None);
        assert_eq!(decide(&r, &get("/web/b")), Some(Foreign::Cached));
        let r = r.with_routes(vec![route("*", "/", "api")], "api");
        assert_eq!(decide(&r, &get("/web/c")), None);
        assert_eq!(decide(&r, &get("/web/b")), Some(Foreign::Cached));
    }

    #[test]
    fn shared_routing_updates_reach_every_view() {
        let shared = SharedRouting::default();
        let mut view = RoutingView::new(&shared);
        assert!(!view.current(&shared).is_active());
        shared.update(|r| r.with_routes(vec![route("*", "/", "web")], "api"));
        assert!(view.current(&shared).is_active());
        assert_eq!(
            decide(view.current(&shared), &get("/x")),
            Some(Foreign::OtherPool("web".into()))
        );
    }
}
