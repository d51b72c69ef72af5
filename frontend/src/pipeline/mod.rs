//! The request pipeline: what the front end does with the next request head on a
//! connection, judged from its bytes and the facts (the table, the pools' states, the cache,
//! what the connection tells beside its bytes), with no I/O. The head rule, the SNI/Host
//! rule, the redirect, the cache, admission and the route are decided here once; the
//! dispatcher, the TLS thread and the delivery thread only carry the verdict out, and the
//! next protocol feeds the same function.

pub mod head;
pub mod memo;
pub mod redirect;

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use self::head::{Decision, Limits};
use self::memo::HeadMemo;
use crate::cache::{Answer, Cache};
use crate::table::{PoolFlags, PoolId, Table};

/// What to do with the bytes at the start of a connection's input.
#[derive(Debug)]
pub enum Verdict {
    /// The head is not complete yet.
    NeedMore,
    /// Answer from the cache; the request was `head_len` bytes.
    Cached {
        answer: Answer,
        head_len: usize,
        keep: bool,
        pool: Option<PoolId>,
    },
    /// Answer with this status and reason, then close.
    Refuse {
        status: u16,
        why: &'static str,
        head_only: bool,
    },
    /// Answer this (a redirect to https), then close.
    Redirect { answer: Vec<u8> },
    /// The request is its pool's.
    Pool(Routed),
}

/// A request for a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    pub pool: PoolId,
    pub head_len: usize,
    pub framing: sluice_proto::request::Framing,
    pub head_only: bool,
    /// The client closes after this answer.
    pub close: bool,
    pub upgrade: bool,
    /// Who holds the connection from here (`sluice_proto::ownership`).
    pub hold: Hold,
}

/// Who holds a connection once its request is routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The pool may: everything that can arrive on it is the pool's (a dedicated site, pools
    /// that trust each other, a pool that takes whole connections).
    Pool,
    /// The front end keeps it and delivers each request to its pool.
    FrontEnd,
}

/// The rules a transport judges with: its current table and the shared state.
#[derive(Clone, Copy)]
pub struct Rules<'a> {
    pub limits: &'a Limits,
    pub table: &'a Table,
    /// The table's generation (`SharedTable`).
    pub generation: u64,
    pub flags: &'a PoolFlags,
    pub cache: &'a Mutex<Cache>,
}

/// What the connection tells beside its bytes.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The local address it reached (for IP-bound sites, and a redirect without `Host`).
    pub local: Option<IpAddr>,
    /// A TLS session's SNI name (`sluice_proto::host::agrees_with_sni`).
    pub sni: Option<&'a str>,
    /// It came over TLS: never redirected to https.
    pub tls: bool,
    /// The front end keeps it already (delivery): no pool is to hold it.
    pub kept: bool,
    pub now: Instant,
}

/// Judges the head at the start of `input`; `full` when `input` fills the head buffer.
/// `memo` is the calling thread's memory of heads the cache answered.
pub fn judge(
    input: &[u8],
    full: bool,
    rules: Rules<'_>,
    facts: Facts<'_>,
    memo: &mut HeadMemo,
) -> Verdict {
    let Rules {
        limits,
        table,
        generation,
        flags,
        cache,
    } = rules;
    memo.under(generation);
    if let Some(port) = table.redirect.filter(|_| !facts.tls) {
        return redirect(input, full, limits, table, facts.local, port);
    }
    let local = facts.local.filter(|_| table.routes.has_ip_sites());
    let sni = facts.sni.unwrap_or("");
    // A head answered from the cache before, byte for byte, is not parsed again.
    let mut asked = false;
    if let Some(j) = memo.find(input, local, sni) {
        match cache
            .lock()
            .ok()
            .and_then(|mut c| c.answer(&j.lookup(), facts.now))
        {
            Some(answer) => {
                return Verdict::Cached {
                    answer,
                    head_len: j.head_len,
                    keep: !j.close,
                    pool: j.routed,
                };
            }
            // Expired or gone: judged afresh, and the cache not asked twice.
            None => asked = true,
        }
    }
    let seen = head::inspect(input, limits, &table.routes, local, sni);
    if seen.head_len > 0 && !sluice_proto::host::agrees_with_sni(&seen.host, sni) {
        return refuse(
            421,
            "this connection was made for another host",
            seen.head_only,
        );
    }
    if let Some(lookup) = seen.lookup().filter(|_| !asked) {
        if let Some(answer) = cache
            .lock()
            .ok()
            .and_then(|mut c| c.answer(&lookup, facts.now))
        {
            memo.keep(input, local, sni, &seen);
            return Verdict::Cached {
                answer,
                head_len: seen.head_len,
                keep: !seen.close,
                pool: seen.decision.pool(),
            };
        }
    }
    match admit(seen.decision, full, table, flags) {
        Decision::NeedMore => Verdict::NeedMore,
        Decision::Refuse(status, why) => refuse(status, why, sluice_proto::request::is_head(input)),
        Decision::Pool(pool) => {
            let hold = if facts.kept || !table.gives_connection(&seen.host, local, pool) {
                Hold::FrontEnd
            } else {
                Hold::Pool
            };
            Verdict::Pool(Routed {
                pool,
                head_len: seen.head_len,
                framing: seen.framing,
                head_only: seen.head_only,
                close: seen.close,
                upgrade: seen.upgrade,
                hold,
            })
        }
    }
}

/// `redirect_https` on a plain connection: a complete, valid head gets 308 to its https URL,
/// wherever it routes; a head that is not one gets its refusal as on any plain connection.
fn redirect(
    input: &[u8],
    full: bool,
    limits: &Limits,
    table: &Table,
    local: Option<IpAddr>,
    port: u16,
) -> Verdict {
    let seen = head::inspect(input, limits, &table.routes, None, "");
    let head_only = sluice_proto::request::is_head(input);
    match seen.decision {
        Decision::NeedMore if !full => Verdict::NeedMore,
        Decision::NeedMore => refuse(431, "the request head is too large", head_only),
        Decision::Refuse(status, why) if seen.head_len == 0 => refuse(status, why, head_only),
        _ => match redirect::location(&seen.host, local, port, seen.path, seen.query) {
            Some(location) => Verdict::Redirect {
                answer: crate::answers::redirect(&location, seen.head_only),
            },
            None => refuse(400, "a redirect to https needs a Host", seen.head_only),
        },
    }
}

/// The last word on a judged head, whoever read it: a head that filled the buffer without
/// ending is 431; a pool being removed, stopped or with a full queue is 503.
pub fn admit(decision: Decision, full: bool, table: &Table, flags: &PoolFlags) -> Decision {
    match decision {
        Decision::NeedMore if full => Decision::Refuse(431, "the request head is too large"),
        Decision::Pool(p) if table.pool(p).is_none_or(|e| e.removed) => {
            Decision::Refuse(503, "the application pool is being removed")
        }
        Decision::Pool(p) if flags.get(p) & PoolFlags::STOPPED != 0 => {
            Decision::Refuse(503, "the application pool is stopped")
        }
        Decision::Pool(p) if flags.get(p) & PoolFlags::FULL != 0 => {
            Decision::Refuse(503, "the application's queue is full")
        }
        other => other,
    }
}

fn refuse(status: u16, why: &'static str, head_only: bool) -> Verdict {
    Verdict::Refuse {
        status,
        why,
        head_only,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_proto::site::Site;

    fn table() -> Table {
        Table {
            routes: crate::route::RouteTable::new([
                (Site::Weak, "/api/".to_owned(), PoolId::new(0)),
                (Site::Weak, "/".to_owned(), PoolId::new(1)),
            ]),
            pools: vec![Some(entry("api")), Some(entry("web"))],
            ..Default::default()
        }
    }

    fn entry(name: &str) -> crate::table::PoolEntry {
        crate::table::PoolEntry {
            name: name.into(),
            handoff: -1,
            listeners: Vec::new(),
            handoff_workers: -1,
            removed: false,
            relay: false,
            proxy: false,
            passthrough: false,
            whole: false,
        }
    }

    fn verdict(raw: &[u8], flags: &PoolFlags) -> Verdict {
        with(raw, flags, &table(), facts())
    }

    fn facts() -> Facts<'static> {
        Facts {
            local: None,
            sni: None,
            tls: false,
            kept: true,
            now: Instant::now(),
        }
    }

    fn with(raw: &[u8], flags: &PoolFlags, table: &Table, facts: Facts<'_>) -> Verdict {
        let cache = Mutex::new(Cache::new(&Default::default()));
        let rules = Rules {
            limits: &Limits::default(),
            table,
            generation: 1,
            flags,
            cache: &cache,
        };
        judge(raw, false, rules, facts, &mut HeadMemo::default())
    }

    #[test]
    fn each_request_of_a_kept_connection_is_delivered_to_its_own_pool() {
        let flags = PoolFlags::new(2);
        let Verdict::Pool(d) = verdict(
            b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
            &flags,
        ) else {
            panic!()
        };
        assert_eq!((d.pool, d.head_len, d.close), (PoolId::new(0), 52, false));
        assert_eq!(d.framing, sluice_proto::request::Framing::Length(3));
        let Verdict::Pool(d) = verdict(
            b"HEAD / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            &flags,
        ) else {
            panic!()
        };
        assert_eq!((d.pool, d.head_only, d.close), (PoolId::new(1), true, true));
        assert!(matches!(
            verdict(b"GET / HTTP/1.1\r\nHost: a\r\n", &flags),
            Verdict::NeedMore
        ));
    }

    #[test]
    fn a_stopped_pool_and_a_bad_head_are_refused_with_the_method_known() {
        let flags = PoolFlags::new(2);
        flags.set(PoolId::new(0), PoolFlags::STOPPED, true);
        assert!(matches!(
            verdict(b"HEAD /api/ HTTP/1.1\r\nHost: a\r\n\r\n", &flags),
            Verdict::Refuse {
                status: 503,
                head_only: true,
                ..
            }
        ));
        assert!(matches!(
            verdict(
                b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                &flags
            ),
            Verdict::Refuse {
                status: 400,
                head_only: false,
                ..
            }
        ));
        // A HEAD that does not parse is still a HEAD: its refusal has no body.
        assert!(matches!(
            verdict(
                b"HEAD / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                &flags
            ),
            Verdict::Refuse {
                status: 400,
                head_only: true,
                ..
            }
        ));
    }

    /// `shop.test` is `shop`'s alone; every other host splits `/api/` and `/`.
    fn split_and_dedicated() -> Table {
        Table {
            routes: crate::route::RouteTable::new([
                (
                    Site::Exact("shop.test".into()),
                    "/".to_owned(),
                    PoolId::new(2),
                ),
                (Site::Weak, "/api/".to_owned(), PoolId::new(0)),
                (Site::Weak, "/".to_owned(), PoolId::new(1)),
            ]),
            pools: vec![Some(entry("api")), Some(entry("web")), Some(entry("shop"))],
            ..Default::default()
        }
    }

    #[test]
    fn a_connection_goes_to_a_pool_only_when_its_host_is_that_pools_alone() {
        let (flags, table) = (PoolFlags::new(3), split_and_dedicated());
        let new = Facts {
            kept: false,
            ..facts()
        };
        let hold = |raw: &[u8], facts| match with(raw, &flags, &table, facts) {
            Verdict::Pool(r) => r.hold,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            hold(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n", new),
            Hold::Pool
        );
        assert_eq!(
            hold(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", new),
            Hold::FrontEnd
        );
        assert_eq!(
            hold(b"GET /api/ HTTP/1.1\r\nHost: a\r\n\r\n", new),
            Hold::FrontEnd
        );
        // A connection the front end keeps stays its own, whatever the host.
        let kept = facts();
        assert_eq!(
            hold(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n", kept),
            Hold::FrontEnd
        );
    }

    #[test]
    fn redirect_https_redirects_plain_requests_only_and_a_head_gets_no_body() {
        let flags = PoolFlags::new(3);
        let table = Table {
            redirect: Some(8443),
            ..split_and_dedicated()
        };
        let Verdict::Redirect { answer } = with(
            b"HEAD /x HTTP/1.1\r\nHost: a.test\r\n\r\n",
            &flags,
            &table,
            facts(),
        ) else {
            panic!()
        };
        let text = String::from_utf8(answer).unwrap();
        assert!(
            text.contains("Location: https://a.test:8443/x\r\n"),
            "{text}"
        );
        assert!(text.ends_with("\r\n\r\n"), "{text}");
        let tls = Facts {
            tls: true,
            sni: Some("a.test"),
            ..facts()
        };
        assert!(matches!(
            with(b"GET /x HTTP/1.1\r\nHost: a.test\r\n\r\n", &flags, &table, tls),
            Verdict::Pool(Routed { pool, .. }) if pool == PoolId::new(1)
        ));
    }

    #[test]
    fn a_head_the_cache_answered_is_still_421_on_a_session_for_another_host() {
        let flags = PoolFlags::new(3);
        let table = split_and_dedicated();
        let cache = Mutex::new(Cache::new(&Default::default()));
        let key = sluice_proto::cache::CacheKey {
            host: "a.test".into(),
            path: "/".into(),
            variant: None,
        };
        let now = Instant::now();
        let head = b"HTTP/1.1 200 OK\r\n".to_vec();
        let ttl = std::time::Duration::from_secs(60);
        let origin = crate::cache::Origin::Static;
        cache
            .lock()
            .unwrap()
            .insert(&key, head, b"hi".to_vec(), ttl, origin, now)
            .unwrap();
        let rules = Rules {
            limits: &Limits::default(),
            table: &table,
            generation: 1,
            flags: &flags,
            cache: &cache,
        };
        let mut memo = HeadMemo::default();
        let raw = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n";
        let on = |sni| Facts {
            sni: Some(sni),
            tls: true,
            now,
            ..facts()
        };
        for _ in 0..2 {
            let v = judge(raw, false, rules, on("a.test"), &mut memo);
            assert!(matches!(v, Verdict::Cached { head_len: 32, .. }), "{v:?}");
        }
        let v = judge(raw, false, rules, on("b.test"), &mut memo);
        assert!(matches!(v, Verdict::Refuse { status: 421, .. }), "{v:?}");
        // A head without Host takes the SNI name; the same bytes on a plain connection
        // name no host, and the answer kept for a.test is not theirs.
        let bare = b"GET / HTTP/1.0\r\n\r\n";
        for _ in 0..2 {
            let v = judge(bare, false, rules, on("a.test"), &mut memo);
            assert!(matches!(v, Verdict::Cached { .. }), "{v:?}");
        }
        let v = judge(bare, false, rules, facts(), &mut memo);
        assert!(
            matches!(v, Verdict::Pool(Routed { pool, .. }) if pool == PoolId::new(1)),
            "{v:?}"
        );
    }
}
