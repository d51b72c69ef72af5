//! Heads the dispatcher answered from the cache, kept by their exact bytes. A keep-alive
//! client sends the same head again and again, and judging a head (`head::inspect`) is a
//! function of its bytes, the route table, the limits and the connection's local address
//! and SNI name only: a head that starts the buffer byte for byte, under the same table,
//! local address and SNI name, is judged as it was before, so the judgement is reused instead of parsed again
//! (the parse was a quarter of a cache answer's user-space time). Only heads that were
//! complete, cache-eligible and so without a body are kept: what follows them is the next
//! request. The cache itself is still asked on every hit, so its entries' lifetimes and
//! pools are judged as before.

use std::net::IpAddr;

use super::head::{Decision, Inspection};
use crate::pool::PoolId;

/// Heads kept: enough for the distinct heads of one busy client set, small enough that a
/// miss costs a few compares.
const SLOTS: usize = 16;
/// Longer heads are judged every time (each slot keeps its bytes).
const MAX_HEAD: usize = 1024;

/// A judged head's outcome, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judged {
    pub host: String,
    pub path: String,
    pub accept_encoding: Option<Vec<u8>>,
    pub head_only: bool,
    pub http10: bool,
    pub close: bool,
    pub head_len: usize,
    pub routed: Option<PoolId>,
}

impl Judged {
    /// What the cache is asked for the head (as `Inspection::lookup` asks it).
    pub fn lookup(&self) -> crate::cache::Lookup<'_> {
        crate::cache::Lookup {
            host: &self.host,
            path: &self.path,
            accept_encoding: self.accept_encoding.as_deref(),
            head_only: self.head_only,
            keep: crate::cache::Keep::of(self.close, self.http10),
            routed: self.routed,
        }
    }
}

#[derive(Debug)]
struct Slot {
    head: Vec<u8>,
    local: Option<IpAddr>,
    /// The SNI name it was judged under (empty: none): the host of a request naming none.
    sni: String,
    judged: Judged,
}

#[derive(Debug, Default)]
pub struct HeadMemo {
    /// The table generation (`SharedTable`) its judgements were made under (0: none yet).
    generation: u64,
    slots: Vec<Slot>,
    /// The slot the next new head replaces, once all are used.
    next: usize,
}

impl HeadMemo {
    /// The judgement of the head `buf` starts with, if it was kept.
    pub fn find(&self, buf: &[u8], local: Option<IpAddr>, sni: &str) -> Option<&Judged> {
        self.slots
            .iter()
            .find(|s| s.local == local && s.sni == sni && buf.starts_with(&s.head))
            .map(|s| &s.judged)
    }

    /// Keeps a head the cache answered (`seen` judged `buf`).
    pub fn keep(&mut self, buf: &[u8], local: Option<IpAddr>, sni: &str, seen: &Inspection<'_>) {
        let Some(q) = seen.cache.as_ref() else {
            return;
        };
        if seen.decision == Decision::NeedMore {
            return;
        }
        let routed = seen.decision.pool();
        if seen.head_len == 0 || seen.head_len > MAX_HEAD.min(buf.len()) {
            return;
        }
        let judged = Judged {
            host: q.host.to_string(),
            path: q.path.to_string(),
            accept_encoding: q.accept_encoding.map(<[u8]>::to_vec),
            head_only: q.head_only,
            http10: q.http10,
            close: seen.close,
            head_len: seen.head_len,
            routed,
        };
        let head = &buf[..seen.head_len];
        if self.slots.len() < SLOTS {
            self.slots.push(Slot {
                head: head.to_vec(),
                local,
                sni: sni.to_owned(),
                judged,
            });
            return;
        }
        let slot = &mut self.slots[self.next];
        self.next = (self.next + 1) % SLOTS;
        slot.head.clear();
        slot.head.extend_from_slice(head);
        slot.local = local;
        slot.sni.clear();
        slot.sni.push_str(sni);
        slot.judged = judged;
    }

    /// The table generation its judgements were made under.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Judging under table `generation`: when the table changed, every judgement may
    /// differ now, and all are forgotten.
    pub fn under(&mut self, generation: u64) {
        if generation != self.generation {
            self.generation = generation;
            self.slots.clear();
            self.next = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::head::{Limits, inspect};
    use crate::route::RouteTable;
    use sluice_proto::site::Site;

    fn routes() -> RouteTable<PoolId> {
        RouteTable::new([
            (
                Site::parse(Some("*")).unwrap(),
                "/".to_owned(),
                PoolId::new(0),
            ),
            (
                Site::parse(Some("shop.test")).unwrap(),
                "/".to_owned(),
                PoolId::new(1),
            ),
        ])
    }

    fn kept(memo: &mut HeadMemo, raw: &[u8]) {
        let seen = inspect(raw, &Limits::default(), &routes(), None, "");
        memo.keep(raw, None, "", &seen);
    }

    #[test]
    fn a_kept_head_is_judged_as_a_fresh_parse_judges_it() {
        let mut memo = HeadMemo::default();
        let raw = b"GET /a HTTP/1.1\r\nHost: Shop.test\r\nAccept-Encoding: gzip\r\n\r\n";
        kept(&mut memo, raw);
        let mut pipelined = raw.to_vec();
        pipelined.extend_from_slice(b"GET /b HTTP/1.1\r\n");
        let j = memo.find(&pipelined, None, "").expect("kept");
        let fresh = inspect(&pipelined, &Limits::default(), &routes(), None, "");
        let q = fresh.cache.unwrap();
        assert_eq!(j.host, q.host);
        assert_eq!(j.path, q.path);
        assert_eq!(j.accept_encoding.as_deref(), q.accept_encoding);
        assert_eq!(j.head_len, fresh.head_len);
        assert_eq!(j.routed, Some(PoolId::new(1)));
        assert!(!j.close);
    }

    #[test]
    fn only_the_same_bytes_at_the_same_address_are_found() {
        let mut memo = HeadMemo::default();
        kept(&mut memo, b"GET /a HTTP/1.1\r\nHost: shop.test\r\n\r\n");
        // One byte different, a head cut short, another address: judged afresh.
        assert!(
            memo.find(b"GET /a HTTP/1.1\r\nHost: shop.tesT\r\n\r\n", None, "")
                .is_none()
        );
        assert!(
            memo.find(b"GET /a HTTP/1.1\r\nHost: shop.test\r\n", None, "")
                .is_none()
        );
        let other = Some("127.0.0.2".parse().unwrap());
        assert!(
            memo.find(b"GET /a HTTP/1.1\r\nHost: shop.test\r\n\r\n", other, "")
                .is_none()
        );
        memo.under(1);
        assert!(
            memo.find(b"GET /a HTTP/1.1\r\nHost: shop.test\r\n\r\n", None, "")
                .is_none()
        );
    }

    #[test]
    fn heads_the_cache_cannot_answer_are_not_kept() {
        let mut memo = HeadMemo::default();
        for raw in [
            &b"GET /a?q HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\n",
            b"GET /a HTTP/1.1\r\nHost: a b\r\n\r\n",
        ] {
            kept(&mut memo, raw);
            assert!(memo.find(raw, None, "").is_none(), "{raw:?}");
        }
    }

    #[test]
    fn a_memo_full_of_heads_replaces_the_oldest() {
        let mut memo = HeadMemo::default();
        let raw = |i: usize| format!("GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes();
        for i in 0..SLOTS + 1 {
            kept(&mut memo, &raw(i));
        }
        assert!(memo.find(&raw(0), None, "").is_none());
        assert!(memo.find(&raw(1), None, "").is_some());
        assert!(memo.find(&raw(SLOTS), None, "").is_some());
    }
}
