//! The front end's side of an upgrade (see `upgrade`): what it checks first, what it hands
//! over (and takes back if the exec fails), and what the next program adopts.

use std::{
    os::fd::{AsRawFd, RawFd},
    sync::atomic::Ordering::Relaxed,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use sluice_common::counter;

use super::{
    Frontend,
    upgrade::{Counts, HeldState, Incoming, State, check_binary},
};
use crate::{admin::AdminSocket, config::Config, held::Stop};

impl Frontend {
    /// The checks an upgrade must pass before anything is stopped: the binary at this
    /// program's path accepts the config, which is the one running.
    pub(super) fn prepare_upgrade(&self) -> Result<()> {
        let on_disk = Config::load(&self.config.path)
            .with_context(|| format!("reading {}", self.config.path.display()))?;
        // Both are parsed by this program: equal texts of meaning give equal renderings.
        if format!("{on_disk:?}") != format!("{:?}", self.config) {
            bail!(
                "{} differs from the running configuration: `sluice reload` it first (an upgrade \
                 changes the program only)",
                self.config.path.display()
            );
        }
        // The next program numbers the pools in the config's order, and a pool's own uid
        // follows its number: after a reload removed or inserted a pool the numbers differ,
        // and an adopted worker could share a uid with another pool's new ones.
        let renumbered = self.pools.len() != self.config.pools.len()
            || self
                .pools
                .iter()
                .zip(&self.config.pools)
                .any(|(rt, c)| rt.removed.is_some() || rt.name != c.name);
        if renumbered {
            bail!(
                "a reload since this process started removed or reordered pools, and pools' own \
                 uids follow their order: restart sluice to take the new binary (under systemd \
                 its fd store keeps the queued connections)"
            );
        }
        check_binary(&self.exe, &self.config.path)
    }

    pub(super) fn upgrade_refused(&mut self, e: &anyhow::Error) {
        log::error!("upgrade refused, this program serves on: {e:#}");
        self.upgrade_error = Some(format!("{e:#}"));
    }

    /// Stops the TLS thread and the dispatcher (each hands over what it holds) and executes
    /// the binary at this program's path with the state. Returns only if that fails; both
    /// then run again with the connections they held.
    pub(super) fn upgrade(&mut self, admin: &AdminSocket) -> Result<()> {
        if let Some(n) = &self.notify {
            n.reloading();
        }
        log::info!("upgrading: handing over to {}", self.exe.display());
        // The TLS thread first: it may wait a moment for handshakes under way, and the
        // dispatcher serves meanwhile. What the dispatcher passes on to it after this stays
        // in its inbox and is carried too.
        let mut tls = self.stop_tls(Stop::HandOver);
        // The connections the front end keeps for shared hosts, between requests.
        let kept = self.delivery.hand_over();
        Stop::HandOver.send(self.stop.as_raw_fd());
        let joined = self
            .dispatch_thread
            .take()
            .map(std::thread::JoinHandle::join);
        let mut held = match joined {
            Some(Ok(Ok(held))) => held,
            other => {
                // Serve on with a new dispatcher; what the old one held is lost.
                self.resume_tls(tls);
                self.spawn_dispatcher(kept)?;
                if let Some(n) = &self.notify {
                    n.ready(&self.summary());
                }
                match other {
                    Some(Ok(Err(e))) => bail!("the dispatcher stopped with an error: {e}"),
                    _ => bail!("the dispatcher thread was gone"),
                }
            }
        };
        held.extend(kept);
        if let Some(t) = tls.as_mut() {
            t.take_handed_back();
        }
        let opened = self.relay.stats.open.load(Relaxed);
        if opened > 0 {
            log::warn!("upgrading: {opened} relayed connection(s) to socket pools are cut");
        }
        if let Some(t) = tls.as_ref().filter(|t| t.cut > 0) {
            log::warn!(
                "upgrading: {} TLS connection(s) cut (relays to socket pools, handshakes not \
                 over within {:?})",
                t.cut,
                crate::tls::HAND_OVER_WAIT
            );
        }
        let mut state = self.state(admin.fd(), &held, tls.as_ref().map(|t| &t.carried));
        let e = state.exec(&self.exe, &self.config.path);
        // Still here: the exec failed. Serve on with what the threads held.
        self.resume_tls(tls);
        self.spawn_dispatcher(held)?;
        if let Some(n) = &self.notify {
            n.ready(&self.summary());
        }
        bail!("executing {}: {e}", self.exe.display())
    }

    /// Stops the TLS thread (if there is one) and takes what it returns.
    fn stop_tls(&mut self, how: Stop) -> Option<crate::tls::Stopped> {
        self.tls.as_mut()?.thread.take()?.stop(how)
    }

    /// Runs the TLS thread again after an upgrade that did not happen. If it cannot start,
    /// plain HTTP serves on and the reason is logged (and in status as the upgrade's error).
    fn resume_tls(&mut self, stopped: Option<crate::tls::Stopped>) {
        let (Some(t), Some(stopped)) = (self.tls.as_mut(), stopped) else {
            return;
        };
        match crate::tls::resume(stopped) {
            Ok(thread) => t.thread = Some(thread),
            Err(e) => log::error!("the TLS thread could not start again: {e}"),
        }
    }

    fn state(
        &self,
        admin: RawFd,
        held: &[crate::held::Held],
        tls: Option<&crate::tls::Carried>,
    ) -> State {
        let sockets = self.queue_sockets();
        let (workers, requests_gone) = self.supervisor.handover(Instant::now());
        State {
            upgrades: self.upgrades,
            sockets,
            admin: Some(admin),
            workers,
            requests_gone,
            held: HeldState::of(held),
            tls_sessions: tls.map(|t| HeldState::of(&t.sessions)).unwrap_or_default(),
            tls_fresh: tls.map(|t| HeldState::of(&t.fresh)).unwrap_or_default(),
            counts: self.counts(),
            sysctls: self.restore.entries(),
            previous: self.image.as_ref().map(AsRawFd::as_raw_fd),
            ..State::default()
        }
    }

    fn counts(&self) -> Counts {
        let kernel = self.steering.counters().unwrap_or_default();
        let s = &self.stats;
        Counts {
            kernel: (0..counter::POOL_BASE).map(|i| kernel.get(i)).collect(),
            pools: self
                .pools
                .iter()
                .enumerate()
                .filter(|(_, p)| p.removed.is_none())
                .map(|(i, p)| {
                    let handed = s.handed_off.get(i).map_or(0, |n| n.load(Relaxed));
                    (p.name.clone(), kernel.steered(i), handed)
                })
                .collect(),
            accepted: s.accepted.load(Relaxed),
            refused: s
                .refused
                .iter()
                .map(|(c, n)| (*c, n.load(Relaxed)))
                .collect(),
            timeouts: s.timeouts.load(Relaxed),
            dropped: s.dropped.load(Relaxed),
            handed_back: s.handed_back.load(Relaxed),
            cache_answers: s.cache_answers.load(Relaxed),
            relays: self.relay.stats.started.load(Relaxed),
            relays_failed: self.relay.stats.failed.load(Relaxed),
            tls: (self.tls.as_ref()).map(|t| t.stats.snapshot(Vec::new())),
        }
    }

    /// In the next program: the workers, the counters and the requests of gone workers of
    /// the earlier one, matched to this program's pools by name.
    pub(super) fn adopt(&mut self, incoming: &Incoming) -> Result<()> {
        let state = &incoming.state;
        let now = Instant::now();
        for w in &state.workers {
            let Some(id) = self.id_of(&w.pool) else {
                log::warn!(
                    "worker {} of pool {}, which this config lacks: stopping it",
                    w.pid,
                    w.pool
                );
                // SAFETY: signalling our own child.
                unsafe { libc::kill(w.pid, libc::SIGTERM) };
                continue;
            };
            let control = w.control.map(Incoming::take).transpose()?;
            let output = w.output.map(Incoming::take).transpose()?;
            self.supervisor.adopt(id, w, control, output, now);
        }
        for (name, n, outcomes) in &state.requests_gone {
            if let Some(id) = self.id_of(name) {
                self.supervisor.adopt_requests_gone(id, *n, outcomes);
            }
        }
        let c = &state.counts;
        let mut earlier = vec![0u64; counter::LEN as usize];
        let global = c.kernel.len().min(counter::POOL_BASE as usize);
        earlier[..global].copy_from_slice(&c.kernel[..global]);
        for (name, steered, handed) in &c.pools {
            let Some(id) = self.id_of(name) else { continue };
            if let Some(e) = earlier.get_mut(counter::POOL_BASE as usize + id.index()) {
                *e = *steered;
            }
            if let Some(n) = self.stats.handed_off.get(id.index()) {
                n.store(*handed, Relaxed);
            }
        }
        self.steering.set_earlier(earlier);
        let s = &self.stats;
        s.accepted.store(c.accepted, Relaxed);
        for (code, n) in &c.refused {
            if let Some((_, a)) = s.refused.iter().find(|(k, _)| k == code) {
                a.store(*n, Relaxed);
            }
        }
        s.timeouts.store(c.timeouts, Relaxed);
        s.dropped.store(c.dropped, Relaxed);
        s.handed_back.store(c.handed_back, Relaxed);
        s.cache_answers.store(c.cache_answers, Relaxed);
        self.relay.stats.started.store(c.relays, Relaxed);
        self.relay.stats.failed.store(c.relays_failed, Relaxed);
        Ok(())
    }
}
