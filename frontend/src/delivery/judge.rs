//! What the front end does with the next request on a connection it keeps: the verdict,
//! from the bytes and the facts (table, pool states, cache), with no I/O. The head rule, the
//! cache and the last word on a pool's state are the dispatcher's (`head::inspect`,
//! `dispatcher::admit`), so a request is judged alike on every path.

use std::net::IpAddr;
use std::time::Instant;

use crate::cache::{Answer, Cache};
use crate::dispatcher::head::{self, Decision, Limits};
use crate::dispatcher::{PoolFlags, PoolId, Table, admit};

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
    /// Deliver the request to its pool.
    Deliver(Delivery),
}

/// A request for a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub pool: PoolId,
    pub head_len: usize,
    pub framing: sluice_proto::request::Framing,
    pub head_only: bool,
    /// The client closes after this answer.
    pub close: bool,
    pub upgrade: bool,
}

/// What the connection tells beside its bytes.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The local address it reached.
    pub local: Option<IpAddr>,
    /// A TLS session's SNI name (`sluice_proto::host::agrees_with_sni`).
    pub sni: Option<&'a str>,
    pub now: Instant,
}

/// Judges the head at the start of `input`; `full` when `input` fills the head buffer.
pub fn judge(
    input: &[u8],
    full: bool,
    limits: &Limits,
    table: &Table,
    flags: &PoolFlags,
    cache: &std::sync::Mutex<Cache>,
    facts: Facts<'_>,
) -> Verdict {
    let Facts { local, sni, now } = facts;
    let seen = head::inspect(
        input,
        limits,
        &table.routes,
        local.filter(|_| table.routes.has_ip_sites()),
    );
    if let Some(port) = table.redirect {
        return match seen.decision {
            Decision::NeedMore if !full => Verdict::NeedMore,
            Decision::NeedMore => refuse(
                431,
                "the request head is too large",
                sluice_proto::request::is_head(input),
            ),
            Decision::Refuse(status, why) if seen.head_len == 0 => {
                refuse(status, why, sluice_proto::request::is_head(input))
            }
            _ => match crate::dispatcher::redirect::location(
                &seen.host, local, port, seen.path, seen.query,
            ) {
                Some(location) => Verdict::Redirect {
                    answer: crate::dispatcher::redirect::answer(&location),
                },
                _ => refuse(400, "a redirect to https needs a Host", seen.head_only),
            },
        };
    }
    if let Some(sni) = sni {
        if seen.head_len > 0 && !sluice_proto::host::agrees_with_sni(&seen.host, sni) {
            return refuse(
                421,
                "this connection was made for another host",
                seen.head_only,
            );
        }
    }
    if let Some(lookup) = seen.lookup() {
        if let Some(answer) = cache.lock().ok().and_then(|mut c| c.answer(&lookup, now)) {
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
        Decision::Pool(pool) => Verdict::Deliver(Delivery {
            pool,
            head_len: seen.head_len,
            framing: seen.framing,
            head_only: seen.head_only,
            close: seen.close,
            upgrade: seen.upgrade,
        }),
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

    fn entry(name: &str) -> crate::dispatcher::PoolEntry {
        crate::dispatcher::PoolEntry {
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
        let cache = std::sync::Mutex::new(Cache::new(&Default::default()));
        let facts = Facts {
            local: None,
            sni: None,
            now: Instant::now(),
        };
        judge(
            raw,
            false,
            &Limits::default(),
            &table(),
            flags,
            &cache,
            facts,
        )
    }

    #[test]
    fn each_request_of_a_kept_connection_is_delivered_to_its_own_pool() {
        let flags = PoolFlags::new(2);
        let Verdict::Deliver(d) = verdict(
            b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
            &flags,
        ) else {
            panic!()
        };
        assert_eq!((d.pool, d.head_len, d.close), (PoolId::new(0), 52, false));
        assert_eq!(d.framing, sluice_proto::request::Framing::Length(3));
        let Verdict::Deliver(d) = verdict(
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
}
