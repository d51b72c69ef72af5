//! URL-prefix routing, HTTP.sys style: the longest prefix that matches at a segment
//! boundary wins. A prefix is kept normalized to end in `/`; a path matches it when the path
//! with a `/` appended starts with it, so `/api/` takes `/api` and `/api/x` but not `/apix`.
//! The kernel program uses the same rule with its LPM-trie key. Each route belongs to a
//! site (`site`): the host it answers for.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::site::{Site, local_address, wildcard_suffix};

/// Whether `name` can be a pool's name: letters, digits, `-` and `_`, not empty.
pub fn valid_pool_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Checks and normalizes a configured prefix.
pub fn normalize_prefix(prefix: &str) -> Result<String, &'static str> {
    if !prefix.starts_with('/') {
        return Err("must start with `/`");
    }
    if prefix
        .bytes()
        .any(|b| b <= b' ' || b >= 0x7f || b == b'%' || b == b'\\' || b == b'?')
    {
        return Err("must be a plain path: visible ASCII without `%`, `\\` or `?`");
    }
    let canonical =
        crate::canonical::canonicalize(prefix.as_bytes()).map_err(|_| "is not a canonical path")?;
    let mut p = prefix.to_owned();
    if !p.ends_with('/') {
        p.push('/');
    }
    let mut c = canonical;
    if !c.ends_with('/') {
        c.push('/');
    }
    if c != p {
        return Err("is not canonical (it holds `//`, `.` or `..` segments)");
    }
    Ok(p)
}

/// What a request offers the router: its host (normalized: `Host::normalized`; None for
/// an HTTP/1.0 request without one), the local address its connection arrived on (None when
/// unknown: IP-bound routes do not match) and its canonical path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query<'a> {
    pub host: Option<&'a str>,
    pub local: Option<IpAddr>,
    pub path: &'a str,
}

impl<'a> Query<'a> {
    /// A request that names no host and arrived on no known address: weak-wildcard routes
    /// (and strong ones) only.
    pub fn path(path: &'a str) -> Query<'a> {
        Query {
            host: None,
            local: None,
            path,
        }
    }
}

/// One site's prefixes, longest first.
#[derive(Debug, Clone)]
struct Prefixes<T>(Vec<(String, T)>);

impl<T: Copy> Prefixes<T> {
    fn lookup(&self, path: &str) -> Option<T> {
        self.0
            .iter()
            .find(|(prefix, _)| matches(prefix, path))
            .map(|(_, pool)| *pool)
    }
}

/// The routing table in user space: same content as the kernel's maps. `T` is what a route
/// leads to (the front end's pool id, a worker's index into its list of pool names). The
/// kinds of site are tried in `Site::rank` order (see `site`).
#[derive(Debug, Clone)]
pub struct RouteTable<T = usize> {
    strong: Prefixes<T>,
    exact: HashMap<String, Prefixes<T>>,
    wildcard: HashMap<String, Prefixes<T>>,
    ip: HashMap<IpAddr, Prefixes<T>>,
    weak: Prefixes<T>,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        RouteTable {
            strong: Prefixes(Vec::new()),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            ip: HashMap::new(),
            weak: Prefixes(Vec::new()),
        }
    }
}

impl<T: Copy> RouteTable<T> {
    /// From (site, normalized prefix, destination); a later duplicate of a (site, prefix)
    /// loses (the config check refuses duplicates).
    pub fn new(routes: impl IntoIterator<Item = (Site, String, T)>) -> RouteTable<T> {
        let mut table = RouteTable::default();
        for (site, prefix, pool) in routes {
            let list = match site {
                Site::Strong => &mut table.strong,
                Site::Exact(n) => table.exact.entry(n).or_insert(Prefixes(Vec::new())),
                Site::Wildcard(s) => table.wildcard.entry(s).or_insert(Prefixes(Vec::new())),
                Site::Ip(a) => table.ip.entry(a).or_insert(Prefixes(Vec::new())),
                Site::Weak => &mut table.weak,
            };
            if !list.0.iter().any(|(p, _)| *p == prefix) {
                list.0.push((prefix, pool));
            }
        }
        let sort = |p: &mut Prefixes<T>| {
            p.0.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)))
        };
        sort(&mut table.strong);
        sort(&mut table.weak);
        table.exact.values_mut().for_each(sort);
        table.wildcard.values_mut().for_each(sort);
        table.ip.values_mut().for_each(sort);
        table
    }

    /// No route at all.
    pub fn is_empty(&self) -> bool {
        self.strong.0.is_empty()
            && self.weak.0.is_empty()
            && self.exact.is_empty()
            && self.wildcard.is_empty()
            && self.ip.is_empty()
    }

    /// Where a request goes: the first kind of site with a matching prefix decides.
    pub fn lookup(&self, q: &Query<'_>) -> Option<T> {
        if let Some(pool) = self.strong.lookup(q.path) {
            return Some(pool);
        }
        if let Some(host) = q.host {
            if let Some(pool) = self.exact.get(host).and_then(|p| p.lookup(q.path)) {
                return Some(pool);
            }
            if let Some(pool) = wildcard_suffix(host)
                .and_then(|s| self.wildcard.get(s))
                .and_then(|p| p.lookup(q.path))
            {
                return Some(pool);
            }
        }
        if let Some(pool) = q
            .local
            .and_then(|a| self.ip.get(&local_address(a)))
            .and_then(|p| p.lookup(q.path))
        {
            return Some(pool);
        }
        self.weak.lookup(q.path)
    }

    /// The sites a request for `host` arriving on `local` is tried against, in order, up to
    /// and including the first that takes every path (it has `/`): past it no request of
    /// that host and address goes.
    pub fn sites_for(&self, host: Option<&str>, local: Option<IpAddr>) -> Vec<Site> {
        self.kinds_for(host, local)
            .into_iter()
            .map(|(s, _)| s)
            .collect()
    }

    fn kinds_for(&self, host: Option<&str>, local: Option<IpAddr>) -> Vec<(Site, &Prefixes<T>)> {
        let mut kinds: Vec<(Site, &Prefixes<T>)> = vec![(Site::Strong, &self.strong)];
        if let Some(host) = host {
            if let Some(p) = self.exact.get(host) {
                kinds.push((Site::Exact(host.to_owned()), p));
            }
            if let Some((s, p)) = wildcard_suffix(host).and_then(|s| self.wildcard.get_key_value(s))
            {
                kinds.push((Site::Wildcard(s.clone()), p));
            }
        }
        if let Some((a, p)) = local.and_then(|a| self.ip.get_key_value(&local_address(a))) {
            kinds.push((Site::Ip(*a), p));
        }
        kinds.push((Site::Weak, &self.weak));
        let mut out = Vec::new();
        for (site, prefixes) in kinds {
            if prefixes.0.is_empty() {
                continue;
            }
            let covers = prefixes.0.iter().any(|(p, _)| p == "/");
            out.push((site, prefixes));
            if covers {
                break;
            }
        }
        out
    }

    /// Every destination some request for `host` arriving on `local` routes to, whatever
    /// its path (each once). A path's route is the route of its longest matching prefix, so
    /// looking up each prefix of the sites it may reach finds them all.
    pub fn reachable(&self, host: Option<&str>, local: Option<IpAddr>) -> Vec<T>
    where
        T: PartialEq,
    {
        let mut out: Vec<T> = Vec::new();
        for (_, prefixes) in self.kinds_for(host, local) {
            for (prefix, _) in &prefixes.0 {
                let q = Query {
                    host,
                    local,
                    path: prefix,
                };
                if let Some(dest) = self.lookup(&q) {
                    if !out.contains(&dest) {
                        out.push(dest);
                    }
                }
            }
        }
        out
    }

    /// Whether any route is bound to an IP address (a caller learns its connection's local
    /// address only then).
    pub fn has_ip_sites(&self) -> bool {
        !self.ip.is_empty()
    }

    /// The addresses IP-bound routes name.
    pub fn ip_sites(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ip.keys().copied()
    }

    /// Requests that between them reach every route a request can reach: each host the
    /// table names (a wildcard's with a first label), a host it does not name, and none; no
    /// local address and each one IP-bound routes name; each prefix, `/`, and a path no route
    /// names. What a check over "every request" walks.
    pub fn samples(&self) -> Samples {
        let mut hosts: Vec<Option<String>> = vec![None, Some("sluice-unlisted.invalid".into())];
        hosts.extend(self.exact.keys().map(|h| Some(h.clone())));
        hosts.extend(
            self.wildcard
                .keys()
                .map(|s| Some(format!("sluice-sample.{s}"))),
        );
        let mut locals = vec![None];
        locals.extend(self.ip.keys().map(|&a| Some(a)));
        let mut paths: Vec<String> = vec!["/".into(), "/sluice-unlisted-path".into()];
        let all = std::iter::once(&self.strong)
            .chain(self.exact.values())
            .chain(self.wildcard.values())
            .chain(self.ip.values())
            .chain(std::iter::once(&self.weak));
        for p in all {
            for (prefix, _) in &p.0 {
                if !paths.contains(prefix) {
                    paths.push(prefix.clone());
                }
            }
        }
        Samples {
            hosts,
            locals,
            paths,
        }
    }

    /// Whether a request for `host` (normalized) and `path` may reach `pool` through some
    /// local address: what a publication by that pool must satisfy. The cache checks the
    /// request's own route again before it answers.
    pub fn may_reach(&self, host: Option<&str>, path: &str, pool: T) -> bool
    where
        T: PartialEq,
    {
        let q = |local| Query { host, local, path };
        self.lookup(&q(None)) == Some(pool)
            || self
                .ip
                .keys()
                .any(|&a| self.lookup(&q(Some(a))) == Some(pool))
    }
}

/// See `RouteTable::samples`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Samples {
    pub hosts: Vec<Option<String>>,
    pub locals: Vec<Option<IpAddr>>,
    pub paths: Vec<String>,
}

fn matches(prefix: &str, path: &str) -> bool {
    // path + "/" starts with prefix (prefix ends in '/')
    let p = prefix.as_bytes();
    let q = path.as_bytes();
    if q.len() >= p.len() {
        q.starts_with(p)
    } else {
        q.len() + 1 == p.len() && p.starts_with(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weak(routes: &[(&str, usize)]) -> RouteTable {
        RouteTable::new(routes.iter().map(|&(p, t)| (Site::Weak, p.to_owned(), t)))
    }

    fn path(t: &RouteTable, p: &str) -> Option<usize> {
        t.lookup(&Query::path(p))
    }

    #[test]
    fn prefix_matches_at_segment_boundaries_only() {
        let t = weak(&[("/api/", 1), ("/", 0), ("/api/v2/", 2)]);
        assert_eq!(path(&t, "/api"), Some(1));
        assert_eq!(path(&t, "/api/"), Some(1));
        assert_eq!(path(&t, "/api/x"), Some(1));
        assert_eq!(path(&t, "/apix"), Some(0));
        assert_eq!(path(&t, "/api/v2"), Some(2));
        assert_eq!(path(&t, "/api/v2x"), Some(1));
        assert_eq!(path(&t, "/"), Some(0));
    }

    #[test]
    fn no_route_without_a_root_prefix() {
        let t = weak(&[("/api/", 1)]);
        assert_eq!(path(&t, "/"), None);
        assert_eq!(path(&t, "/ap"), None);
    }

    fn sites() -> RouteTable {
        let site = |h: &str| Site::parse(Some(h)).unwrap();
        RouteTable::new([
            (site("+"), "/.well-known/acme-challenge/".into(), 0),
            (site("shop.test"), "/".into(), 1),
            (site("shop.test"), "/api/".into(), 2),
            (site("*.tenants.test"), "/".into(), 3),
            (site("127.0.0.2"), "/".into(), 4),
            (site("*"), "/".into(), 5),
            (site("*"), "/only-weak/".into(), 6),
        ])
    }

    fn at(t: &RouteTable, host: Option<&str>, local: &str, path: &str) -> Option<usize> {
        let local = local.parse().ok();
        t.lookup(&Query { host, local, path })
    }

    #[test]
    fn kinds_of_site_are_tried_in_http_sys_order() {
        let t = sites();
        let l = "127.0.0.1";
        assert_eq!(
            at(&t, Some("shop.test"), l, "/.well-known/acme-challenge/x"),
            Some(0)
        );
        assert_eq!(at(&t, Some("shop.test"), l, "/api/x"), Some(2));
        assert_eq!(at(&t, Some("shop.test"), l, "/x"), Some(1));
        // An exact site with a matching prefix wins over every later kind, even a longer
        // prefix there.
        assert_eq!(at(&t, Some("shop.test"), l, "/only-weak/x"), Some(1));
        assert_eq!(at(&t, Some("a.tenants.test"), l, "/x"), Some(3));
        assert_eq!(at(&t, Some("a.b.tenants.test"), l, "/x"), Some(5));
        assert_eq!(at(&t, Some("tenants.test"), l, "/x"), Some(5));
        assert_eq!(at(&t, Some("other.test"), "127.0.0.2", "/x"), Some(4));
        assert_eq!(
            at(&t, Some("other.test"), "::ffff:127.0.0.2", "/x"),
            Some(4)
        );
        assert_eq!(at(&t, Some("shop.test"), "127.0.0.2", "/x"), Some(1));
        assert_eq!(at(&t, None, "127.0.0.2", "/x"), Some(4));
        assert_eq!(at(&t, None, l, "/only-weak/"), Some(6));
        assert_eq!(at(&t, Some("127.0.0.2"), l, "/x"), Some(5));
    }

    #[test]
    fn a_site_without_a_matching_prefix_falls_to_the_next_kind() {
        let site = |h: &str| Site::parse(Some(h)).unwrap();
        let t = RouteTable::new([
            (site("shop.test"), "/shop/".into(), 1),
            (site("*"), "/".into(), 0),
        ]);
        assert_eq!(at(&t, Some("shop.test"), "", "/shop/a"), Some(1));
        assert_eq!(at(&t, Some("shop.test"), "", "/other"), Some(0));
        let only_exact = RouteTable::new([(site("shop.test"), "/".into(), 1)]);
        assert_eq!(at(&only_exact, Some("else.test"), "", "/"), None);
        assert_eq!(at(&only_exact, None, "", "/"), None);
    }

    #[test]
    fn a_pool_may_publish_what_some_local_address_routes_to_it() {
        let t = sites();
        assert!(t.may_reach(Some("x.test"), "/p", 4));
        assert!(t.may_reach(Some("x.test"), "/p", 5));
        assert!(!t.may_reach(Some("shop.test"), "/p", 4));
        assert!(!t.may_reach(Some("shop.test"), "/p", 5));
    }

    #[test]
    fn prefixes_are_normalized_or_refused() {
        assert_eq!(normalize_prefix("/api").unwrap(), "/api/");
        assert_eq!(normalize_prefix("/").unwrap(), "/");
        assert!(normalize_prefix("api").is_err());
        assert!(normalize_prefix("/a//b").is_err());
        assert!(normalize_prefix("/a/../b").is_err());
        assert!(normalize_prefix("/a%20b").is_err());
    }
}
