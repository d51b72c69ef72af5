//! Reload (SIGHUP, `sluice reload`): the config file is read again and applied without
//! dropping a connection. New pools get their sockets first; then the route table switches at
//! once in the kernel and in the dispatcher; pools whose settings changed are recycled,
//! overlapped; removed pools' workers finish their requests, and their sockets close once
//! nothing uses them (what is still queued moves to the dispatcher and is routed afresh).
//! A config that does not check, or that changes what cannot change while running, is refused
//! with the reason, and the running one keeps serving.

use anyhow::{Result, bail};

use super::Frontend;
use crate::config::Config;

impl Frontend {
    /// `reload_config`, told to systemd when it runs under a `Type=notify` unit.
    pub(super) fn reload(&mut self) -> Result<String> {
        if let Some(n) = &self.notify {
            n.reloading();
        }
        let result = self.reload_config();
        if let Some(n) = &self.notify {
            n.ready(&self.summary());
        }
        result
    }

    fn reload_config(&mut self) -> Result<String> {
        let new = Config::load(&self.config.path)?;
        let old = &self.config;
        let fixed = [
            ("server.listen", old.listen != new.listen),
            ("server.steering", old.steering != new.steering),
            ("server.set_sysctls", old.set_sysctls != new.set_sysctls),
            ("server.admin_socket", old.admin_socket != new.admin_socket),
            ("server.metrics", old.metrics != new.metrics),
            ("server.access_log", old.access_log != new.access_log),
            ("limits", old.limits != new.limits),
            ("cache", old.cache != new.cache),
            ("server.listen_tls", old.tls.listen != new.tls.listen),
        ];
        for (key, changed) in fixed {
            if changed {
                bail!("{key} cannot change while sluice runs; restart it to change {key}");
            }
        }
        for (i, p) in new.pools.iter().enumerate() {
            if let Some(o) = old.pools.iter().find(|o| o.name == p.name) {
                if o.sockets != p.sockets {
                    bail!(
                        "pool[{i}].sockets cannot change while sluice runs (pool {})",
                        p.name
                    );
                }
                // Which groups hold its sockets follows from it.
                if o.runs.passthrough != p.runs.passthrough {
                    bail!(
                        "pool[{i}].tls cannot change while sluice runs (pool {}); give the \
                         pool another name to replace it",
                        p.name
                    );
                }
            }
        }
        let added: Vec<usize> = (0..new.pools.len())
            .filter(|&i| !old.pools.iter().any(|o| o.name == new.pools[i].name))
            .collect();
        if self.pools.len() + added.len() > sluice_common::MAX_POOLS as usize {
            bail!(
                "too many pools over this front end's life (at most {}); restart sluice",
                sluice_common::MAX_POOLS
            );
        }

        let mut summary = Vec::new();
        // Certificates are read again (a file replaced in place too), first: one that does
        // not load refuses the reload before anything changed. New handshakes use them;
        // sessions made before keep theirs.
        if let Some(t) = &self.tls {
            let config = super::tls_server_config(&new, t.secrets.clone())?;
            match t.config.lock() {
                Ok(mut c) => *c = config,
                Err(p) => *p.into_inner() = config,
            }
            summary.push(format!(
                "{} certificate(s) read",
                new.tls.certificates.len()
            ));
        }
        if new.has_socket_pools() {
            self.steering.enable_direct()?;
        }
        // 1. New pools: sockets, slots, workers (on demand or always).
        for &i in &added {
            let id = self.add_pool(&new.pools[i])?;
            self.store_pool(id);
            summary.push(format!("added pool {}", new.pools[i].name));
        }
        // 2. Changed pools: new settings, workers recycled overlapped.
        for p in &new.pools {
            let Some(id) = self.id_of(&p.name) else {
                continue;
            };
            let rt = &mut self.pools[id.index()];
            if rt.config == *p {
                continue;
            }
            if rt.config.queue_length != p.queue_length {
                for fd in &rt.listeners {
                    // listen(2) on a listening socket only changes its backlog.
                    // SAFETY: listen on our own socket.
                    unsafe {
                        libc::listen(std::os::fd::AsRawFd::as_raw_fd(fd), p.queue_length as i32)
                    };
                }
            }
            rt.config = p.clone();
            let launch = rt.launch(&new);
            self.supervisor.update(id, launch)?;
            self.refresh_kernel_flags(id)?;
            summary.push(format!("changed pool {} (recycling its workers)", p.name));
        }
        // 3. The route table, at once.
        let ids = self.ids_of(&new);
        self.install_routes(&new, &ids)?;
        // 4. Removed pools: drain.
        let generation = self.table_generation();
        for id in 0..self.pools.len() {
            let rt = &self.pools[id];
            if rt.removed.is_none() && !new.pools.iter().any(|p| p.name == rt.name) {
                summary.push(format!("removed pool {}", rt.name));
                self.pools[id].removed = Some(generation);
                self.supervisor.remove(crate::pool::PoolId::new(id));
            }
        }
        // Pools removed are no longer in the dispatcher's table: install it again without them.
        self.install_routes(&new, &ids)?;
        let routes_changed = self.config.routes.len() != new.routes.len()
            || self.config.routes.iter().zip(&new.routes).any(|(a, b)| {
                a.site != b.site
                    || a.prefix != b.prefix
                    || self.config.pools[a.pool].name != new.pools[b.pool].name
            });
        if routes_changed {
            summary.push(format!("{} route(s) in place", new.routes.len()));
        }
        self.config = new;
        let text = if summary.is_empty() {
            "reloaded: nothing changed".to_owned()
        } else {
            format!("reloaded: {}", summary.join("; "))
        };
        log::info!("{text}");
        Ok(text + "\n")
    }

    fn table_generation(&self) -> u64 {
        // The generation the next install will have.
        self.table.generation() + 1
    }
}
