//! The controller's side of the response cache: publications from workers go in, expired
//! entries go out, and the kernel's set of cached paths and the workers' copy of it follow.

use std::time::Instant;

use anyhow::Result;

use super::Frontend;
use crate::cache::{self, Origin};

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

    /// A worker's publication of a cacheable response.
    pub(super) fn publish(&mut self, raw: &[u8], now: Instant) {
        let p = match cache::parse_publication(raw) {
            Ok(p) => p,
            Err(e) => {
                log::warn!("cache: {e}");
                return;
            }
        };
        let (fresh, stored) = {
            let mut cache = self.lock_cache();
            let fresh = !cache.contains(&p.path);
            (
                fresh,
                cache.insert(&p.path, p.head, p.body, p.ttl, Origin::Worker, now),
            )
        };
        match stored {
            Ok(()) => {
                log::debug!("cache: stored {} for {:?}", p.path, p.ttl);
                if fresh {
                    if let Err(e) = self.steering.set_cached(&p.path, true) {
                        log::warn!("cache: {e}");
                    }
                    self.greet_workers();
                }
            }
            Err(e) => log::info!("cache: not storing {}: {e}", p.path),
        }
    }

    pub(super) fn expire_cache(&mut self, now: Instant) -> Result<()> {
        let (removed, _reloaded) = self.lock_cache().expire(now);
        self.uncache(&removed)
    }

    fn uncache(&mut self, paths: &[String]) -> Result<()> {
        if paths.is_empty() {
            return Ok(());
        }
        for path in paths {
            self.steering.set_cached(path, false)?;
        }
        self.greet_workers();
        Ok(())
    }

    pub(super) fn cache_list(&self) -> String {
        let list = self.lock_cache().list(Instant::now());
        serde_json::to_string(&list).unwrap_or_else(|e| format!("error: {e}"))
    }

    pub(super) fn cache_purge(&mut self, path: Option<&str>) -> String {
        let removed = self.lock_cache().purge(path);
        if let Err(e) = self.uncache(&removed) {
            return format!("error: {e:#}");
        }
        format!(
            "purged {} entr{}\n",
            removed.len(),
            if removed.len() == 1 { "y" } else { "ies" }
        )
    }

    /// Tells every worker the route table and the cached paths (and every new one later).
    pub(super) fn greet_workers(&mut self) {
        let mut cached = String::from("cached\n");
        for p in self.lock_cache().paths() {
            cached.push_str(&p);
            cached.push('\n');
        }
        self.supervisor
            .greet(vec![self.routes_message.clone(), cached]);
    }

    pub(super) fn lock_cache(&self) -> std::sync::MutexGuard<'_, cache::Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}
