//! The status report, built from what the front end holds.

use std::{collections::BTreeMap, sync::atomic::Ordering::Relaxed, time::Instant};

use sluice_common::counter;

use super::Frontend;
use crate::access_log::AccessLog;
use crate::status::{
    DispatcherStatus, DurationStatus, KernelStatus, PoolStatus, Status, WorkerStatus, responses_of,
};

impl Frontend {
    pub(super) fn status(&self) -> Status {
        let counters = self.steering.counters().unwrap_or_else(|e| {
            log::warn!("reading steering counters: {e}");
            Default::default()
        });
        let info = self.supervisor.info(Instant::now());
        let pools = self
            .pools
            .iter()
            .enumerate()
            .filter(|(id, p)| {
                p.removed.is_none() || info.get(*id).is_some_and(|i| !i.workers.is_empty())
            })
            .map(|(id, p)| {
                let i = info.get(id);
                PoolStatus {
                    name: p.name.clone(),
                    state: i.map(|p| p.state.as_str()).unwrap_or("unknown").to_owned(),
                    requests: i.map(|p| p.requests).unwrap_or(0),
                    workers: i
                        .map(|p| {
                            p.workers
                                .iter()
                                .map(|w| WorkerStatus {
                                    pid: w.pid,
                                    uptime_s: w.uptime.as_secs(),
                                    requests: w.requests,
                                    restarts: w.restarts,
                                    ready: w.ready,
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    queued: p.queued(),
                    steered_kernel: counters.steered(id),
                    handed_off: self
                        .stats
                        .handed_off
                        .get(id)
                        .map(|n| n.load(Relaxed))
                        .unwrap_or(0),
                    delivered: self.delivery.stats.delivered(id),
                    responses: i.map(|p| responses_of(&p.outcomes)).unwrap_or_default(),
                    duration_us: i
                        .map(|p| DurationStatus::of(&p.outcomes))
                        .unwrap_or_default(),
                }
            })
            .collect();
        Status {
            steering: self.config.steering.as_str().to_owned(),
            listen: self.config.listen.iter().map(|a| a.to_string()).collect(),
            pools,
            fallbacks: counter::FALLBACKS
                .iter()
                .map(|&(i, name)| (name.to_owned(), counters.get(i)))
                .collect(),
            dispatcher: DispatcherStatus {
                accepted: self.stats.accepted.load(Relaxed),
                refused: self
                    .stats
                    .refused
                    .iter()
                    .map(|(c, n)| (c.to_string(), n.load(Relaxed)))
                    .collect::<BTreeMap<_, _>>(),
                header_timeouts: self.stats.timeouts.load(Relaxed),
                dropped_pending: self.stats.dropped.load(Relaxed),
                handed_back: self.stats.handed_back.load(Relaxed),
                relays_open: self.relay.stats.open.load(Relaxed),
                relays: self.relay.stats.started.load(Relaxed),
                relays_failed: self.relay.stats.failed.load(Relaxed),
                redirects: self.stats.redirects.load(Relaxed),
            },
            delivery: {
                let d = &self.delivery.stats;
                crate::status::DeliveryStatus {
                    loops: self.delivery.loops() as u64,
                    open: d.open.load(Relaxed),
                    connections: d.connections.load(Relaxed),
                    channels: d.channels.load(Relaxed),
                    channels_failed: d.failed.load(Relaxed),
                    bad_responses: d.bad_responses.load(Relaxed),
                    cache_answers: d.cache_answers.load(Relaxed),
                    refused: d.refused.load(Relaxed),
                    timeouts: d.timeouts.load(Relaxed),
                }
            },
            kernel: KernelStatus {
                program_runs: counters.get(counter::RUNS),
                syn_cookies: counters.get(counter::SYN_COOKIE),
                ack_gate_drops: counters.get(counter::ACK_GATE_DROPS),
                cache_steered: counters.get(counter::CACHED),
                redirected: counters.get(counter::REDIRECT),
                tls_terminated: counters.get(counter::TLS_TERMINATED),
            },
            cache: self.lock_cache().stats(),
            foreign_listeners: self.guard.foreign,
            access_log_dropped: self.access_log.as_ref().map_or(0, AccessLog::dropped),
            access_log_malformed: self.access_log.as_ref().map_or(0, AccessLog::malformed),
            inherited_sockets: self.inherited_sockets as u64,
            upgrades: self.upgrades,
            upgrade_error: self.upgrade_error.clone(),
            tls: self.tls.as_ref().map(|t| {
                t.stats.snapshot(
                    self.config
                        .tls
                        .listen
                        .iter()
                        .map(|a| a.to_string())
                        .collect(),
                )
            }),
        }
    }
}
