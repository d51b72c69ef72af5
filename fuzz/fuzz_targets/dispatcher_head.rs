//! Any bytes as the start of a connection through the dispatcher's decision: it must never
//! panic, refuse only with the codes the dispatcher answers, and route a request exactly as
//! canonicalizing its path and looking that up would.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::{
    canonical::canonicalize,
    pipeline::head::{Decision, Limits, decide},
    pool::PoolId,
    route::{Query, RouteTable},
};
use sluice_proto::site::Site;

fuzz_target!(|data: &[u8]| {
    let routes = RouteTable::new([
        (Site::Weak, "/api/".to_owned(), PoolId::new(1)),
        (Site::Weak, "/".to_owned(), PoolId::new(0)),
    ]);
    match decide(data, &Limits::default(), &routes, None) {
        Decision::NeedMore => {}
        Decision::Refuse(code, _) => {
            assert!(
                matches!(code, 400 | 413 | 414 | 417 | 431 | 501 | 505),
                "refused with {code}"
            )
        }
        Decision::Pool(p) => {
            assert!(p.index() <= 1, "pool {p} is not in the table");
            // Re-parse independently of decide(): a routed request is a complete, valid head.
            let mut headers = [httparse::EMPTY_HEADER; 128];
            let mut req = httparse::Request::new(&mut headers);
            assert!(
                matches!(req.parse(data), Ok(httparse::Status::Complete(_))),
                "routed an unparsable head"
            );
            let path = path_of(req.path.expect("a complete head has a target"));
            let canonical = canonicalize(path.as_bytes())
                .unwrap_or_else(|e| panic!("routed {path:?}, which does not canonicalize: {e}"));
            assert_eq!(
                routes.lookup(&Query::path(&canonical)),
                Some(p),
                "{path:?} -> {canonical:?} routed to {p}"
            );
        }
    }
});

/// The path of an origin-form (`/p?q`) or absolute-form (`http://h/p?q`) target, as RFC 9112
/// reads it: the authority ends at `/` or `?`, the path at `?`. Written apart from
/// `decide()`'s own parsing on purpose, so a disagreement shows.
fn path_of(target: &str) -> &str {
    let path = match target.find("://") {
        Some(i) if !target.starts_with('/') => {
            let rest = &target[i + 3..];
            match rest.find(['/', '?']) {
                Some(j) if rest[j..].starts_with('/') => &rest[j..],
                _ => "/",
            }
        }
        _ => target,
    };
    path.split('?').next().unwrap_or(path)
}
