//! The controller's side of the response cache: publications from workers go in (after the
//! checks that keep one pool out of another's cache), expired entries go out, and the
//! kernel's set of cached paths and the workers' copy of the keys follow.

use std::time::Instant;

use anyhow::Result;
use sluice_proto::cache::{ANY_HOST, CacheKey, check_response};

use super::Frontend;
use crate::activation::{Published, control::ToWorker};
use crate::cache::{self, Origin};
use crate::pool::PoolId;
use crate::route::RouteTable;

/// Whether requests for `key`'s host and path may route to `pool` (through some local
/// address): the only entries a pool may publish and keep. Each answer checks the request's
/// own route again.
fn reaches(routes: &RouteTable<PoolId>, key: &CacheKey, pool: PoolId) -> bool {
    let host = (!key.host.is_empty()).then_some(key.host.as_str());
    key.host != ANY_HOST && routes.may_reach(host, &key.path, pool)
}

impl Frontend {
    /// Static entries from the config, at start.
    pub(super) fn load_statics(&mut self) -> Result<()> {
        let stored = self.lock_cache().load_statics(Instant::now());
        for path in &stored {
            self.steering.set_cached(path, true)?;
            log::info!("cache: static entry {path}");
        }
        Ok(())
    }

    /// A worker's publication of a cacheable response. It is stored only when its path
    /// routes to the publisher's pool (known from the channel it came on, not from anything
    /// the worker says), the publisher is a current worker of that running pool, and the
    /// response passes the same rules the worker published it by.
    pub(super) fn publish(&mut self, p: Published, now: Instant) {
        let pool_name = self
            .pools
            .get(p.pool.index())
            .map_or("?", |r| r.name.as_str())
            .to_owned();
        let refuse = |why: &str| {
            log::warn!(
                "cache: refused a publication of {} from worker {} of pool {pool_name} (host `{}`): {why}",
                p.key.path,
                p.pid,
                p.key.host
            );
        };
        if !p.live {
            return refuse("the worker is being retired or its pool is not running");
        }
        let (_, table) = self.table.current();
        if !reaches(&table.routes, &p.key, p.pool) {
            return refuse("the host and path do not route to this pool");
        }
        let max_entry = self.config.cache.max_entry_bytes as usize;
        let stored = match check_response(&p.response, max_entry) {
            Ok(s) => s,
            Err(e) => return refuse(&e.to_string()),
        };
        let ttl = std::time::Duration::from_secs(stored.lifetime.ttl);
        let (new_path, result) = {
            let mut cache = self.lock_cache();
            let new_path = !cache.has_path(&p.key.path);
            let fresh = !cache.contains(&p.key);
            let origin = Origin::Worker(p.pool);
            let r = cache.insert(&p.key, stored.head, stored.body, ttl, origin, now);
            (new_path, r.map(|evicted| (fresh, evicted)))
        };
        match result {
            Ok((fresh, evicted)) => {
                self.uncache(&evicted);
                log::debug!(
                    "cache: stored {} for {ttl:?} from pool {pool_name}",
                    p.key.path
                );
                if new_path {
                    if let Err(e) = self.steering.set_cached(&p.key.path, true) {
                        log::warn!("cache: {e}");
                    }
                }
                if fresh {
                    self.greeting_due = true;
                }
            }
            Err(e) => log::info!("cache: not storing {}: {e}", p.key.path),
        }
    }

    pub(super) fn expire_cache(&mut self, now: Instant) {
        let (removed, _reloaded) = self.lock_cache().expire(now);
        self.uncache(&removed);
    }

    /// The routes changed: entries a pool published for paths that no longer route to it go.
    pub(super) fn uncache_unrouted(&mut self) {
        let (_, table) = self.table.current();
        let stale = self
            .lock_cache()
            .retain_routed(|key, pool| reaches(&table.routes, key, pool));
        for k in &stale {
            log::info!(
                "cache: dropped {} {}: it routes elsewhere now",
                k.host,
                k.path
            );
        }
        self.uncache(&stale);
    }

    /// Entries are gone: the kernel forgets their paths (when no variant is left) and the
    /// workers the keys, at once, so no request is handed back for what is no longer there.
    /// A map that cannot be updated costs a detour through the dispatcher, never an answer.
    fn uncache(&mut self, keys: &[CacheKey]) {
        if keys.is_empty() {
            return;
        }
        for k in keys {
            if !self.lock_cache().has_path(&k.path) {
                if let Err(e) = self.steering.set_cached(&k.path, false) {
                    log::warn!("cache: {e}");
                }
            }
        }
        self.greeting_due = true;
    }

    pub(super) fn cache_list(&self) -> String {
        let list = self.lock_cache().list(Instant::now());
        serde_json::to_string(&list).unwrap_or_else(|e| format!("error: {e}"))
    }

    pub(super) fn cache_purge(&mut self, path: Option<&str>) -> String {
        let removed = self.lock_cache().purge(path);
        self.uncache(&removed);
        format!(
            "purged {} entr{}\n",
            removed.len(),
            if removed.len() == 1 { "y" } else { "ies" }
        )
    }

    /// Tells every worker the route table and the cached keys (and every new one before it
    /// starts), once per controller step however many changes it saw.
    pub(super) fn greet_workers(&mut self) {
        self.greeting_due = false;
        let cached = ToWorker::cached_within(self.lock_cache().keys());
        self.supervisor
            .greet(vec![self.routes_message.clone(), cached]);
    }

    pub(super) fn lock_cache(&self) -> std::sync::MutexGuard<'_, cache::Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}
