//! The front end's response cache (HTTP.sys's kernel-mode cache): complete responses to
//! `GET`/`HEAD` without query, kept by `CacheKey` (canonical path, and the `Accept-Encoding`
//! of a response that varies on it), answered by the dispatcher without touching a worker.
//! Filled by workers' publications (checked by `sluice_proto::cache`, the rules the workers
//! publish by) and by static entries from the config; bounded per entry and in total, least
//! recently used first out; every answer gets a fresh `Date` and an `Age`.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

pub use sluice_proto::cache::CacheKey;

use crate::pool::PoolId;
use sluice_proto::cache::ANY_HOST;

use crate::config::{CacheConfig, StaticEntry};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CacheError {
    #[error("the response is {0} bytes, more than cache.max_entry_bytes")]
    TooLarge(usize),
    #[error("malformed publication: {0}")]
    Malformed(&'static str),
}

/// Where an entry came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Published by a worker of this pool: kept only while its path routes there.
    Worker(PoolId),
    Static,
}

#[derive(Debug, Clone)]
struct Entry {
    /// Status line and headers, each ending in CRLF, without Date, Age, Connection and
    /// Content-Length (added per answer).
    head: Vec<u8>,
    body: Vec<u8>,
    stored: Instant,
    expires: Instant,
    last_used: u64,
    hits: u64,
    origin: Origin,
    /// The whole keep-alive answer to a GET, as rendered for `second` (its Date and Age only
    /// change once a second): shared by every hit within it, with no copy.
    rendered: Option<(u64, u64, Arc<[u8]>)>,
}

/// A request the cache may answer (`sluice_proto::cache::request_eligible`).
#[derive(Debug, Clone, Copy)]
pub struct Lookup<'a> {
    /// Normalized (`sluice_proto::cache::key_host`).
    pub host: &'a str,
    pub path: &'a str,
    pub accept_encoding: Option<&'a [u8]>,
    pub head_only: bool,
    pub keep: Keep,
    /// The pool the request routes to.
    pub routed: Option<PoolId>,
}

/// What an answer says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// HTTP/1.1 keep-alive: nothing to say.
    Http11,
    /// HTTP/1.0 keep-alive: `Connection: keep-alive`.
    Http10,
    /// `Connection: close`.
    Close,
}

impl Keep {
    /// What a request that asked to close (`close`), in HTTP/1.0 or not, is answered with.
    pub fn of(close: bool, http10: bool) -> Keep {
        match (close, http10) {
            (true, _) => Keep::Close,
            (false, true) => Keep::Http10,
            (false, false) => Keep::Http11,
        }
    }
}

/// An answer's bytes: shared with the entry that rendered it, or made for this answer alone.
#[derive(Debug, Clone)]
pub enum Answer {
    Shared(Arc<[u8]>),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Answer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Answer::Shared(b) => b,
            Answer::Owned(b) => b,
        }
    }
}

impl Entry {
    fn size(&self) -> usize {
        self.head.len() + self.body.len()
    }
}

/// What `sluice cache list` shows of an entry.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Listed {
    pub path: String,
    /// The `Accept-Encoding` value the entry answers, for a response that varies on it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub accept_encoding: Option<String>,
    pub bytes: usize,
    pub age_s: u64,
    pub ttl_left_s: u64,
    pub hits: u64,
    pub origin: String,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    pub entries: usize,
    pub bytes: usize,
    pub hits: u64,
    pub misses: u64,
}

pub struct Cache {
    entries: HashMap<CacheKey, Entry>,
    /// Entries that vary on `Accept-Encoding` (a request probes their key only if any).
    varied: usize,
    /// Static entries for every host (probed only if any).
    any_host: usize,
    /// The key a lookup probes with, kept so that a hit allocates nothing.
    probe: CacheKey,
    /// `Date` text and the second it is for.
    date: (u64, String),
    total: usize,
    max_entry: usize,
    max_total: usize,
    clock: u64,
    hits: u64,
    misses: u64,
    statics: Vec<StaticEntry>,
}

impl Cache {
    pub fn new(config: &CacheConfig) -> Cache {
        Cache {
            entries: HashMap::new(),
            varied: 0,
            any_host: 0,
            probe: CacheKey {
                host: String::new(),
                path: String::new(),
                variant: None,
            },
            date: (u64::MAX, String::new()),
            total: 0,
            max_entry: config.max_entry_bytes as usize,
            max_total: config.max_total_bytes as usize,
            clock: 0,
            hits: 0,
            misses: 0,
            statics: config.statics.clone(),
        }
    }

    /// Loads (or reloads) the static entries from their files; returns the paths stored.
    pub fn load_statics(&mut self, now: Instant) -> Vec<String> {
        let mut stored = Vec::new();
        for st in self.statics.clone() {
            match std::fs::read(&st.file) {
                Ok(body) => {
                    let head = crate::answers::static_head(&st.content_type, st.ttl.as_secs());
                    let key = CacheKey {
                        host: st.host.clone(),
                        path: st.path.clone(),
                        variant: None,
                    };
                    match self.insert(&key, head, body, st.ttl, Origin::Static, now) {
                        Ok(_) => stored.push(st.path.clone()),
                        Err(e) => log::warn!("cache: static {}: {e}", st.path),
                    }
                }
                Err(e) => log::warn!("cache: static {} from {}: {e}", st.path, st.file.display()),
            }
        }
        stored
    }

    /// Stores a response; evicts the least recently used entries to make room and returns
    /// their keys.
    pub fn insert(
        &mut self,
        key: &CacheKey,
        head: Vec<u8>,
        body: Vec<u8>,
        ttl: Duration,
        origin: Origin,
        now: Instant,
    ) -> Result<Vec<CacheKey>, CacheError> {
        let size = head.len() + body.len();
        if size > self.max_entry || size > self.max_total {
            return Err(CacheError::TooLarge(size));
        }
        self.remove(key);
        let mut evicted = Vec::new();
        while self.total + size > self.max_total {
            let Some(victim) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            log::debug!("cache: evicting {}", victim.path);
            self.remove(&victim);
            evicted.push(victim);
        }
        self.clock += 1;
        self.total += size;
        self.varied += usize::from(key.variant.is_some());
        self.any_host += usize::from(key.host == ANY_HOST);
        self.entries.insert(
            key.clone(),
            Entry {
                head,
                body,
                stored: now,
                // A lifetime is at most a year (`MAX_TTL_SECS`); the clock cannot overflow.
                expires: now.checked_add(ttl).unwrap_or(now),
                last_used: self.clock,
                hits: 0,
                origin,
                rendered: None,
            },
        );
        Ok(evicted)
    }

    /// Drops the entries published by a pool whose host and path can no longer reach it
    /// (after a reload changed the routes); returns their keys.
    pub fn retain_routed(&mut self, reaches: impl Fn(&CacheKey, PoolId) -> bool) -> Vec<CacheKey> {
        let stale: Vec<CacheKey> = self
            .entries
            .iter()
            .filter(|(k, e)| matches!(e.origin, Origin::Worker(p) if !reaches(k, p)))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &stale {
            self.remove(k);
        }
        stale
    }

    fn remove(&mut self, key: &CacheKey) -> bool {
        match self.entries.remove(key) {
            Some(e) => {
                self.total -= e.size();
                self.varied -= usize::from(key.variant.is_some());
                self.any_host -= usize::from(key.host == ANY_HOST);
                true
            }
            None => false,
        }
    }

    /// The key of the entry that answers `q`, in `self.probe` (no allocation once the
    /// probe's strings have grown).
    fn probe(&mut self, q: &Lookup<'_>) -> bool {
        let set = |probe: &mut CacheKey, host: &str, variant: Option<&[u8]>| {
            probe.host.clear();
            probe.host.push_str(host);
            probe.path.clear();
            probe.path.push_str(q.path);
            probe.variant = variant.map(|_| String::new());
        };
        set(&mut self.probe, q.host, None);
        if self.entries.contains_key(&self.probe) {
            return true;
        }
        if self.varied > 0 {
            let [_, varied, _] = CacheKey::candidates(q.host, q.path, q.accept_encoding);
            self.probe = varied;
            if self.entries.contains_key(&self.probe) {
                return true;
            }
        }
        if self.any_host > 0 {
            set(&mut self.probe, ANY_HOST, None);
            return self.entries.contains_key(&self.probe);
        }
        false
    }

    /// The full answer to a request, if an entry answers it and is fresh: counts a hit or a
    /// miss. An entry a pool published answers only a request that routes to that pool.
    pub fn answer(&mut self, q: &Lookup<'_>, now: Instant) -> Option<Answer> {
        let (head_only, keep) = (q.head_only, q.keep);
        self.clock += 1;
        let clock = self.clock;
        let found = self.probe(q);
        let wall = SystemTime::now();
        let second = wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.date.0 != second {
            self.date = (second, http_date(wall));
        }
        let Some(e) = self
            .entries
            .get_mut(&self.probe)
            .filter(|e| found && e.expires > now)
            .filter(|e| match e.origin {
                Origin::Worker(pool) => q.routed == Some(pool),
                Origin::Static => true,
            })
        else {
            self.misses += 1;
            return None;
        };
        e.last_used = clock;
        e.hits += 1;
        self.hits += 1;
        let plain = !head_only && keep == Keep::Http11;
        let age = now.duration_since(e.stored).as_secs();
        if plain {
            if let Some((at, at_age, bytes)) = &e.rendered {
                if *at == second && *at_age == age {
                    return Some(Answer::Shared(bytes.clone()));
                }
            }
        }
        let mut out = Vec::with_capacity(e.head.len() + e.body.len() + 96);
        out.extend_from_slice(&e.head);
        out.extend_from_slice(b"Date: ");
        out.extend_from_slice(self.date.1.as_bytes());
        out.extend_from_slice(
            format!("\r\nAge: {age}\r\nContent-Length: {}\r\n", e.body.len()).as_bytes(),
        );
        match keep {
            Keep::Http11 => {}
            Keep::Http10 => out.extend_from_slice(b"Connection: keep-alive\r\n"),
            Keep::Close => out.extend_from_slice(b"Connection: close\r\n"),
        }
        out.extend_from_slice(b"\r\n");
        if !head_only {
            out.extend_from_slice(&e.body);
        }
        if plain {
            let bytes: Arc<[u8]> = out.into();
            e.rendered = Some((second, age, bytes.clone()));
            return Some(Answer::Shared(bytes));
        }
        Some(Answer::Owned(out))
    }

    pub fn contains(&self, key: &CacheKey) -> bool {
        self.entries.contains_key(key)
    }

    /// Whether any entry is kept for `path` (the kernel's set of cached paths has it).
    pub fn has_path(&self, path: &str) -> bool {
        self.entries.keys().any(|k| k.path == path)
    }

    /// When the next entry expires.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.entries.values().map(|e| e.expires).min()
    }

    /// Drops expired entries; returns their keys. Expired static entries are read again.
    pub fn expire(&mut self, now: Instant) -> (Vec<CacheKey>, Vec<CacheKey>) {
        let gone: Vec<(CacheKey, Origin)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.expires <= now)
            .map(|(k, e)| (k.clone(), e.origin.clone()))
            .collect();
        let mut removed = Vec::new();
        let mut reloaded = Vec::new();
        let statics: Vec<StaticEntry> = self.statics.clone();
        for (key, origin) in gone {
            self.remove(&key);
            if origin == Origin::Static {
                if let Some(st) = statics.iter().find(|s| s.path == key.path) {
                    let keep = std::mem::take(&mut self.statics);
                    self.statics = vec![st.clone()];
                    let ok = !self.load_statics(now).is_empty();
                    self.statics = keep;
                    if ok {
                        reloaded.push(key);
                        continue;
                    }
                }
            }
            removed.push(key);
        }
        (removed, reloaded)
    }

    /// Removes the entries of one path (every variant), or all; returns the keys removed.
    pub fn purge(&mut self, path: Option<&str>) -> Vec<CacheKey> {
        let keys: Vec<CacheKey> = self
            .entries
            .keys()
            .filter(|k| path.is_none_or(|p| k.path == p))
            .cloned()
            .collect();
        for k in &keys {
            self.remove(k);
        }
        keys
    }

    /// Every key, sorted.
    pub fn keys(&self) -> Vec<CacheKey> {
        let mut v: Vec<CacheKey> = self.entries.keys().cloned().collect();
        v.sort();
        v
    }

    pub fn list(&self, now: Instant) -> Vec<Listed> {
        let mut v: Vec<Listed> = self
            .entries
            .iter()
            .map(|(k, e)| Listed {
                path: k.path.clone(),
                accept_encoding: k.variant.clone(),
                bytes: e.size(),
                age_s: now.duration_since(e.stored).as_secs(),
                ttl_left_s: e.expires.saturating_duration_since(now).as_secs(),
                hits: e.hits,
                origin: match e.origin {
                    Origin::Worker(_) => "worker".into(),
                    Origin::Static => "static".into(),
                },
            })
            .collect();
        v.sort_by(|a, b| a.path.cmp(&b.path));
        v
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.entries.len(),
            bytes: self.total,
            hits: self.hits,
            misses: self.misses,
        }
    }
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn http_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let c = crate::dates::civil(secs);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        c.weekday,
        c.day,
        c.month_name(),
        c.year,
        c.hour,
        c.minute,
        c.second
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Cache {
        /// A lookup for host `h` routed to pool 0.
        fn ask(
            &mut self,
            path: &str,
            accept_encoding: Option<&[u8]>,
            now: Instant,
            head_only: bool,
            keep: Keep,
        ) -> Option<Answer> {
            let q = Lookup {
                host: "h",
                path,
                accept_encoding,
                head_only,
                keep,
                routed: Some(PoolId::new(0)),
            };
            self.answer(&q, now)
        }
    }

    fn k(path: &str) -> CacheKey {
        CacheKey {
            host: "h".into(),
            path: path.into(),
            variant: None,
        }
    }

    fn cache(max_entry: u64, max_total: u64) -> Cache {
        Cache::new(&CacheConfig {
            max_entry_bytes: max_entry,
            max_total_bytes: max_total,
            statics: vec![],
        })
    }

    #[test]
    fn answers_fresh_entries_with_date_age_and_length() {
        let mut c = cache(1000, 10_000);
        let t0 = Instant::now();
        c.insert(
            &k("/a"),
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n".to_vec(),
            b"hello".to_vec(),
            Duration::from_secs(10),
            Origin::Worker(PoolId::new(0)),
            t0,
        )
        .unwrap();
        let out = String::from_utf8(
            c.ask("/a", None, t0 + Duration::from_secs(3), false, Keep::Http11)
                .unwrap()
                .to_vec(),
        )
        .unwrap();
        assert!(
            out.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nDate: "),
            "{out}"
        );
        assert!(
            out.contains("\r\nAge: 3\r\nContent-Length: 5\r\n\r\nhello"),
            "{out}"
        );
        let head =
            String::from_utf8(c.ask("/a", None, t0, true, Keep::Close).unwrap().to_vec()).unwrap();
        assert!(head.ends_with("Connection: close\r\n\r\n"), "{head}");
        assert!(
            c.ask(
                "/a",
                None,
                t0 + Duration::from_secs(11),
                false,
                Keep::Http11
            )
            .is_none(),
            "expired"
        );
        assert!(c.ask("/b", None, t0, false, Keep::Http11).is_none());
        assert_eq!((c.stats().hits, c.stats().misses), (2, 2));
    }

    #[test]
    fn evicts_least_recently_used_and_refuses_oversized() {
        let mut c = cache(100, 250);
        let t0 = Instant::now();
        let ttl = Duration::from_secs(60);
        for p in ["/1", "/2"] {
            c.insert(
                &k(p),
                vec![b'h'; 20],
                vec![b'b'; 80],
                ttl,
                Origin::Worker(PoolId::new(0)),
                t0,
            )
            .unwrap();
        }
        c.ask("/1", None, t0, false, Keep::Http11);
        c.insert(
            &k("/3"),
            vec![b'h'; 20],
            vec![b'b'; 80],
            ttl,
            Origin::Worker(PoolId::new(0)),
            t0,
        )
        .unwrap();
        assert_eq!(c.keys(), [k("/1"), k("/3")], "the least recently used went");
        assert_eq!(
            c.insert(
                &k("/4"),
                vec![],
                vec![0; 101],
                ttl,
                Origin::Worker(PoolId::new(0)),
                t0
            ),
            Err(CacheError::TooLarge(101))
        );
        assert_eq!(c.stats().bytes, 200);
        assert_eq!(c.purge(None).len(), 2);
        assert_eq!(c.stats().bytes, 0);
    }

    #[test]
    fn a_varying_entry_answers_only_its_own_accept_encoding() {
        let mut c = cache(1000, 10_000);
        let t0 = Instant::now();
        let gz = CacheKey {
            host: "h".into(),
            path: "/v".into(),
            variant: Some("gzip".into()),
        };
        let ttl = Duration::from_secs(9);
        c.insert(
            &gz,
            b"HTTP/1.1 200 OK\r\n".to_vec(),
            b"z".to_vec(),
            ttl,
            Origin::Worker(PoolId::new(0)),
            t0,
        )
        .unwrap();
        assert!(
            c.ask("/v", Some(b"gzip"), t0, false, Keep::Http11)
                .is_some()
        );
        assert!(c.ask("/v", Some(b"br"), t0, false, Keep::Http11).is_none());
        assert!(c.ask("/v", None, t0, false, Keep::Http11).is_none());
        assert!(c.has_path("/v") && !c.has_path("/w"));
        assert_eq!(c.next_expiry(), Some(t0 + ttl));
    }

    #[test]
    fn entries_whose_path_routes_elsewhere_now_are_dropped_statics_stay() {
        let mut c = cache(1000, 10_000);
        let t0 = Instant::now();
        let ttl = Duration::from_secs(60);
        let (api, web) = (PoolId::new(0), PoolId::new(1));
        c.insert(&k("/api/a"), vec![], vec![1], ttl, Origin::Worker(api), t0)
            .unwrap();
        c.insert(&k("/web/b"), vec![], vec![2], ttl, Origin::Worker(web), t0)
            .unwrap();
        c.insert(&k("/logo"), vec![], vec![3], ttl, Origin::Static, t0)
            .unwrap();
        // A reload sends everything to web.
        let gone = c.retain_routed(|_, pool| pool == web);
        assert_eq!(gone, [k("/api/a")]);
        assert_eq!(c.keys(), [k("/logo"), k("/web/b")]);
    }

    #[test]
    fn an_entry_answers_only_its_host_and_requests_routed_to_its_pool() {
        let mut c = cache(1000, 10_000);
        let t0 = Instant::now();
        let ttl = Duration::from_secs(60);
        let (p0, p1) = (PoolId::new(0), PoolId::new(1));
        c.insert(&k("/a"), vec![], vec![1], ttl, Origin::Worker(p0), t0)
            .unwrap();
        let any = CacheKey {
            host: ANY_HOST.into(),
            ..k("/logo")
        };
        c.insert(&any, vec![], vec![2], ttl, Origin::Static, t0)
            .unwrap();
        let ask = |c: &mut Cache, host, path, routed| {
            let q = Lookup {
                host,
                path,
                accept_encoding: None,
                head_only: false,
                keep: Keep::Http11,
                routed,
            };
            c.answer(&q, t0).is_some()
        };
        assert!(ask(&mut c, "h", "/a", Some(p0)));
        assert!(!ask(&mut c, "other", "/a", Some(p0)), "another host");
        assert!(!ask(&mut c, "h", "/a", Some(p1)), "routed to another pool");
        assert!(!ask(&mut c, "h", "/a", None), "routed nowhere");
        assert!(ask(&mut c, "h", "/logo", Some(p1)));
        assert!(
            ask(&mut c, "", "/logo", None),
            "a static entry for every host"
        );
    }

    #[test]
    fn an_http10_keep_alive_answer_says_so_and_http11_ones_are_shared() {
        let mut c = cache(1000, 10_000);
        let t0 = Instant::now();
        let ttl = Duration::from_secs(60);
        c.insert(
            &k("/a"),
            b"HTTP/1.1 200 OK\r\n".to_vec(),
            b"x".to_vec(),
            ttl,
            Origin::Static,
            t0,
        )
        .unwrap();
        let text = |a: Answer| String::from_utf8(a.to_vec()).unwrap();
        let http10 = text(c.ask("/a", None, t0, false, Keep::Http10).unwrap());
        assert!(
            http10.contains("\r\nConnection: keep-alive\r\n"),
            "{http10}"
        );
        // Two hits within one second share one rendering (tried again if a second ends
        // between them).
        let shared = (0..3).any(|_| {
            let one = c.ask("/a", None, t0, false, Keep::Http11).unwrap();
            let two = c.ask("/a", None, t0, false, Keep::Http11).unwrap();
            assert!(!text(one.clone()).contains("Connection:"));
            matches!((one, two), (Answer::Shared(a), Answer::Shared(b)) if Arc::ptr_eq(&a, &b))
        });
        assert!(shared);
    }

    #[test]
    fn http_date_is_imf_fixdate() {
        assert_eq!(
            http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777)),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
    }
}
