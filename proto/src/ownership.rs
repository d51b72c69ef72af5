//! Who may hold a client's connection: the rule that keeps pools apart. Nothing can make a
//! process give back an fd it was sent, so a connection goes to a pool only when everything
//! that can legitimately arrive on it belongs to that pool:
//!
//! - a **dedicated** host (every route a request for it, on that local address, can reach
//!   leads to one pool): the connection is the pool's; a later request on it that names
//!   another host gets `421 Misdirected Request` from the worker;
//! - a host whose sites all say their pools **trust** each other (`[[site]] trust_pools`):
//!   the connection goes to its first request's pool and workers hand it back when a later
//!   request belongs elsewhere (per-request routing by hand-back);
//! - any other host is **shared**: the front end keeps the connection for its whole life and
//!   delivers each request to its pool on a channel that carries only that pool's requests.
//!
//! The dispatcher, the kernel maps (per site, `kernel_steerable`) and `sluice check` all
//! decide by these functions.

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::route::RouteTable;
use crate::site::Site;

/// The sites whose pools trust each other.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust(BTreeSet<Site>);

impl Trust {
    pub fn new(sites: impl IntoIterator<Item = Site>) -> Trust {
        Trust(sites.into_iter().collect())
    }

    pub fn contains(&self, site: &Site) -> bool {
        self.0.contains(site)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Who holds a connection whose requests name one host and arrive on one local address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner<T> {
    /// Every request it may carry goes to this pool.
    Pool(T),
    /// Its pools trust each other: the first request's pool, with hand-backs.
    Trusted,
    /// The front end: each request is delivered to its own pool.
    Shared,
}

/// Who holds a connection for `host` (normalized; None without one) on `local`.
pub fn owner<T: Copy + PartialEq>(
    table: &RouteTable<T>,
    trust: &Trust,
    host: Option<&str>,
    local: Option<IpAddr>,
) -> Owner<T> {
    match table.reachable(host, local).as_slice() {
        [only] => Owner::Pool(*only),
        [] => Owner::Shared,
        _ if table
            .sites_for(host, local)
            .iter()
            .all(|s| trust.contains(s)) =>
        {
            Owner::Trusted
        }
        _ => Owner::Shared,
    }
}

/// Whether the kernel may steer a connection by a route of `site` into the route's pool:
/// every host and local address whose requests can be routed through `site` is owned by
/// one pool or trusted. Checked over `RouteTable::samples`, which stand for every host
/// and address.
pub fn kernel_steerable<T: Copy + PartialEq>(
    table: &RouteTable<T>,
    trust: &Trust,
    site: &Site,
) -> bool {
    let samples = table.samples();
    samples.hosts.iter().all(|host| {
        samples.locals.iter().all(|&local| {
            let host = host.as_deref();
            !table.sites_for(host, local).contains(site)
                || owner(table, trust, host, local) != Owner::Shared
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: &[(&str, &str, u8)]) -> RouteTable<u8> {
        RouteTable::new(
            routes
                .iter()
                .map(|&(h, p, d)| (Site::parse(Some(h)).unwrap(), p.to_owned(), d)),
        )
    }

    const API: u8 = 1;
    const WEB: u8 = 2;
    const SHOP: u8 = 3;
    const ACME: u8 = 4;

    #[test]
    fn a_host_split_between_pools_is_shared_and_a_site_of_one_pool_is_its_own() {
        let t = table(&[
            ("*", "/api/", API),
            ("*", "/", WEB),
            ("shop.test", "/", SHOP),
        ]);
        let none = Trust::default();
        assert_eq!(owner(&t, &none, Some("shop.test"), None), Owner::Pool(SHOP));
        assert_eq!(owner(&t, &none, Some("other.test"), None), Owner::Shared);
        assert_eq!(owner(&t, &none, None, None), Owner::Shared);
        assert!(kernel_steerable(
            &t,
            &none,
            &Site::Exact("shop.test".into())
        ));
        assert!(!kernel_steerable(&t, &none, &Site::Weak));
    }

    #[test]
    fn a_site_without_a_root_prefix_shares_its_host_with_the_next_kind() {
        let t = table(&[("shop.test", "/cart/", SHOP), ("*", "/", WEB)]);
        let none = Trust::default();
        assert_eq!(owner(&t, &none, Some("shop.test"), None), Owner::Shared);
        assert_eq!(owner(&t, &none, Some("a.test"), None), Owner::Pool(WEB));
        // The weak site is reached by shop.test's other paths too.
        assert!(!kernel_steerable(&t, &none, &Site::Weak));
        assert!(!kernel_steerable(
            &t,
            &none,
            &Site::Exact("shop.test".into())
        ));
    }

    #[test]
    fn a_strong_wildcard_prefix_splits_every_host() {
        let t = table(&[
            ("+", "/.well-known/acme-challenge/", ACME),
            ("shop.test", "/", SHOP),
        ]);
        let none = Trust::default();
        assert_eq!(owner(&t, &none, Some("shop.test"), None), Owner::Shared);
        assert!(!kernel_steerable(&t, &none, &Site::Strong));
    }

    #[test]
    fn trust_makes_a_split_host_the_first_pools_with_hand_backs() {
        let t = table(&[
            ("*", "/api/", API),
            ("*", "/", WEB),
            ("shop.test", "/", SHOP),
        ]);
        let trust = Trust::new([Site::Weak]);
        assert_eq!(owner(&t, &trust, Some("a.test"), None), Owner::Trusted);
        assert!(kernel_steerable(&t, &trust, &Site::Weak));
        // Trust is per site: a host reaching an untrusted site stays shared.
        let t = table(&[
            ("shop.test", "/cart/", SHOP),
            ("*", "/", WEB),
            ("*", "/api/", API),
        ]);
        assert_eq!(owner(&t, &trust, Some("shop.test"), None), Owner::Shared);
        let both = Trust::new([Site::Weak, Site::Exact("shop.test".into())]);
        assert_eq!(owner(&t, &both, Some("shop.test"), None), Owner::Trusted);
    }

    #[test]
    fn a_local_address_site_is_owned_per_address() {
        let t = table(&[("127.0.0.2", "/", API), ("*", "/x/", WEB), ("*", "/", API)]);
        let none = Trust::default();
        let at = Some("127.0.0.2".parse().unwrap());
        assert_eq!(owner(&t, &none, Some("a"), at), Owner::Pool(API));
        assert_eq!(owner(&t, &none, Some("a"), None), Owner::Shared);
        assert!(kernel_steerable(
            &t,
            &none,
            &Site::Ip("127.0.0.2".parse().unwrap())
        ));
    }
}
