//! Per-request routing, as HTTP.sys does it: a keep-alive connection steered to this pool may
//! later carry a request for another pool, or for a path the front end answers from its cache.
//! Such a request is handed back to the front end (with the connection) instead of answered.
//!
//! The front end sends the whole route table (`routes`) and the set of paths it caches
//! (`cached`) on the control channel; thread 0 stores them here and every runtime thread reads
//! them. The routing rules themselves are `sluice_common`'s, the ones the front end uses.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use sluice_common::canonical::CanonicalError;
use sluice_common::route::RouteTable;

use crate::Request;

/// What the front end told this worker about routing. Immutable; replaced as a whole.
#[derive(Debug, Default)]
pub(crate) struct Routing {
    /// None: no routing knowledge (no table yet, or an empty one): never hand back.
    routes: Option<Arc<Routes>>,
    cached: Arc<HashSet<String>>,
}

/// A non-empty route table, with which of its pools is this worker's.
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
    /// The path cannot be canonicalized; the front end answers it.
    BadPath(CanonicalError),
    /// The front end serves this path from its cache.
    Cached,
    /// The path belongs to another pool.
    OtherPool(String),
    /// No prefix matches the path.
    NoRoute,
}

impl std::fmt::Display for Foreign {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Foreign::BadPath(e) => write!(f, "bad path: {e}"),
            Foreign::Cached => f.write_str("served from the front end's cache"),
            Foreign::OtherPool(pool) => write!(f, "routed to pool {pool}"),
            Foreign::NoRoute => f.write_str("no route"),
        }
    }
}

impl Routing {
    /// The state after a `routes` message: `routes` replaces the table, the cached set stays.
    /// `own_pool` is this worker's pool name; without one, nothing is ever handed back.
    pub(crate) fn with_routes(
        &self,
        routes: Vec<(String, String)>,
        own_pool: Option<&str>,
    ) -> Routing {
        let routes = match own_pool {
            _ if routes.is_empty() => None,
            None => {
                log::warn!("got a route table but SLUICE_POOL is not set: never handing back");
                None
            }
            Some(own_pool) => {
                let mut pools: Vec<String> = Vec::new();
                let mut entries = Vec::with_capacity(routes.len());
                for (prefix, pool) in routes {
                    let index = match pools.iter().position(|p| *p == pool) {
                        Some(index) => index,
                        None => {
                            pools.push(pool);
                            pools.len() - 1
                        }
                    };
                    entries.push((prefix, index));
                }
                let own = pools.iter().position(|p| p == own_pool);
                if own.is_none() {
                    log::warn!(
                        "the route table does not name this worker's pool {own_pool}: \
                         every request will be handed back"
                    );
                }
                Some(Arc::new(Routes {
                    table: RouteTable::new(entries),
                    pools,
                    own,
                }))
            }
        };
        Routing {
            routes,
            cached: Arc::clone(&self.cached),
        }
    }

    /// The state after a `cached` message: the set is replaced, the table stays.
    pub(crate) fn with_cached(&self, paths: Vec<String>) -> Routing {
        Routing {
            routes: self.routes.clone(),
            cached: Arc::new(paths.into_iter().collect()),
        }
    }

    /// True when requests may be handed back at all (the table is not empty).
    pub(crate) fn is_active(&self) -> bool {
        self.routes.is_some()
    }

    /// Whether a request belongs elsewhere: `canonical` is its canonical path, `cache_eligible`
    /// whether the front end could answer it from its cache (see [`cache_eligible`]).
    pub(crate) fn decide(
        &self,
        canonical: Result<&str, CanonicalError>,
        cache_eligible: bool,
    ) -> Option<Foreign> {
        let routes = self.routes.as_ref()?;
        let path = match canonical {
            Ok(path) => path,
            Err(e) => return Some(Foreign::BadPath(e)),
        };
        if cache_eligible && self.cached.contains(path) {
            return Some(Foreign::Cached);
        }
        match routes.table.lookup(path) {
            None => Some(Foreign::NoRoute),
            Some(index) if Some(index) == routes.own => None,
            Some(index) => Some(Foreign::OtherPool(
                routes.pools.get(index).cloned().unwrap_or_default(),
            )),
        }
    }

    /// [`Routing::decide`] for a parsed request; `has_body` says whether a body follows its head.
    pub(crate) fn decide_request(&self, req: &Request<'_>, has_body: bool) -> Option<Foreign> {
        if !self.is_active() {
            return None;
        }
        let canonical = match req.canonical_result() {
            Ok(path) => Ok(path.as_str()),
            Err(e) => Err(*e),
        };
        self.decide(canonical, cache_eligible(req, has_body, true))
    }
}

/// Whether the front end's cache may answer (or store the answer to) this request: GET (or
/// HEAD when `allow_head`), no query string, no `Authorization`, no `Range`, no body.
pub(crate) fn cache_eligible(req: &Request<'_>, has_body: bool, allow_head: bool) -> bool {
    let method_ok = req.method() == "GET" || (allow_head && req.method() == "HEAD");
    method_ok
        && !has_body
        && req.query().is_none()
        && req.header("authorization").is_none()
        && req.header("range").is_none()
}

/// The path part of a request target: before `?`, and for an absolute-form target
/// (`http://host/p?q`) the part from the first `/` after the authority (`/` when none).
pub(crate) fn target_path(target: &str) -> &str {
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    if path.starts_with('/') {
        return path;
    }
    match path.split_once("://") {
        Some((scheme, rest))
            if !scheme.is_empty()
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')) =>
        {
            rest.find('/').map_or("/", |slash| &rest[slash..])
        }
        _ => path,
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

    fn routing(own: &str) -> Routing {
        Routing::default()
            .with_routes(
                vec![
                    ("/api/".into(), "api".into()),
                    ("/".into(), "web".into()),
                    ("/api/v2/".into(), "web".into()),
                ],
                Some(own),
            )
            .with_cached(vec!["/api/cached".into(), "/logo.png".into()])
    }

    fn decide(r: &Routing, path: &str, cache_eligible: bool) -> Option<Foreign> {
        r.decide(Ok(path), cache_eligible)
    }

    #[test]
    fn own_pool_requests_are_served() {
        let r = routing("api");
        assert_eq!(decide(&r, "/api/x", true), None);
        assert_eq!(decide(&r, "/api", true), None);
    }

    #[test]
    fn other_pool_requests_are_handed_back() {
        let r = routing("api");
        assert_eq!(
            decide(&r, "/web/b", true),
            Some(Foreign::OtherPool("web".into()))
        );
        assert_eq!(
            decide(&r, "/api/v2/x", false),
            Some(Foreign::OtherPool("web".into()))
        );
        assert_eq!(
            decide(&routing("web"), "/api/x", true),
            Some(Foreign::OtherPool("api".into()))
        );
    }

    #[test]
    fn cached_paths_are_handed_back_only_when_cache_eligible() {
        let r = routing("api");
        assert_eq!(decide(&r, "/api/cached", true), Some(Foreign::Cached));
        assert_eq!(decide(&r, "/api/cached", false), None);
    }

    #[test]
    fn unrouted_paths_are_handed_back() {
        let r = Routing::default().with_routes(vec![("/api/".into(), "api".into())], Some("api"));
        assert_eq!(decide(&r, "/other", true), Some(Foreign::NoRoute));
        assert_eq!(decide(&r, "/", true), Some(Foreign::NoRoute));
    }

    #[test]
    fn bad_paths_are_handed_back() {
        let r = routing("api");
        assert_eq!(
            r.decide(Err(CanonicalError::AboveRoot), true),
            Some(Foreign::BadPath(CanonicalError::AboveRoot))
        );
    }

    #[test]
    fn empty_table_never_hands_back() {
        let r = Routing::default().with_cached(vec!["/x".into()]);
        assert!(!r.is_active());
        assert_eq!(decide(&r, "/x", true), None);
        assert_eq!(r.decide(Err(CanonicalError::BadEscape), true), None);
        let emptied = routing("api").with_routes(vec![], Some("api"));
        assert_eq!(decide(&emptied, "/web/b", true), None);
        let no_pool_name = Routing::default().with_routes(vec![("/a/".into(), "a".into())], None);
        assert_eq!(decide(&no_pool_name, "/b", true), None);
    }

    #[test]
    fn routes_and_cached_messages_replace_only_their_part() {
        let r = routing("api").with_cached(vec!["/web/b".into()]);
        assert_eq!(decide(&r, "/api/cached", true), None);
        assert_eq!(decide(&r, "/web/b", true), Some(Foreign::Cached));
        let r = r.with_routes(vec![("/".into(), "api".into())], Some("api"));
        assert_eq!(decide(&r, "/web/c", true), None);
        assert_eq!(decide(&r, "/web/b", true), Some(Foreign::Cached));
    }

    #[test]
    fn request_decision_uses_the_canonical_path_and_cache_rules() {
        let r = routing("api");
        let decide_raw = |raw: &[u8]| {
            let mut headers = [httparse::EMPTY_HEADER; 8];
            let mut parsed = httparse::Request::new(&mut headers);
            parsed.parse(raw).unwrap();
            let req = Request::from_parsed(&parsed, b"");
            r.decide_request(&req, false)
        };
        assert_eq!(
            decide_raw(b"GET /api/../web/x HTTP/1.1\r\nHost: h\r\n\r\n"),
            Some(Foreign::OtherPool("web".into()))
        );
        assert_eq!(
            decide_raw(b"GET /%61pi/x HTTP/1.1\r\nHost: h\r\n\r\n"),
            None
        );
        assert_eq!(
            decide_raw(b"GET http://h/web/x HTTP/1.1\r\nHost: h\r\n\r\n"),
            Some(Foreign::OtherPool("web".into()))
        );
        assert_eq!(
            decide_raw(b"GET /api/cached HTTP/1.1\r\nHost: h\r\n\r\n"),
            Some(Foreign::Cached)
        );
        assert_eq!(
            decide_raw(b"HEAD /api/cached HTTP/1.1\r\nHost: h\r\n\r\n"),
            Some(Foreign::Cached)
        );
        assert_eq!(
            decide_raw(b"GET /api/cached?x=1 HTTP/1.1\r\nHost: h\r\n\r\n"),
            None
        );
        assert_eq!(
            decide_raw(b"POST /api/cached HTTP/1.1\r\nHost: h\r\n\r\n"),
            None
        );
        assert_eq!(
            decide_raw(b"GET /api/cached HTTP/1.1\r\nHost: h\r\nAuthorization: x\r\n\r\n"),
            None
        );
        assert_eq!(
            decide_raw(b"GET /api/cached HTTP/1.1\r\nHost: h\r\nRange: bytes=0-1\r\n\r\n"),
            None
        );
        assert!(matches!(
            decide_raw(b"GET /api/%zz HTTP/1.1\r\nHost: h\r\n\r\n"),
            Some(Foreign::BadPath(_))
        ));
        assert!(matches!(
            decide_raw(b"GET /.. HTTP/1.1\r\nHost: h\r\n\r\n"),
            Some(Foreign::BadPath(_))
        ));
    }

    #[test]
    fn absolute_form_targets_route_by_their_path() {
        assert_eq!(target_path("/a/b?x"), "/a/b");
        assert_eq!(target_path("http://host/p?q"), "/p");
        assert_eq!(target_path("https://host:8443/p/q"), "/p/q");
        assert_eq!(target_path("http://host"), "/");
        assert_eq!(target_path("http://host?x"), "/");
        assert_eq!(target_path("*"), "*");
    }

    #[test]
    fn shared_routing_updates_reach_every_view() {
        let shared = SharedRouting::default();
        let mut view = RoutingView::new(&shared);
        assert!(!view.current(&shared).is_active());
        shared.update(|r| r.with_routes(vec![("/".into(), "web".into())], Some("api")));
        assert!(view.current(&shared).is_active());
        assert_eq!(
            view.current(&shared).decide(Ok("/x"), false),
            Some(Foreign::OtherPool("web".into()))
        );
    }
}
