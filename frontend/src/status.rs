//! The status report `sluice status` prints: what the admin socket answers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub steering: String,
    pub listen: Vec<String>,
    pub pools: Vec<PoolStatus>,
    /// Connections the steering program sent to the dispatcher, by reason.
    pub fallbacks: BTreeMap<String, u64>,
    pub dispatcher: DispatcherStatus,
    /// The connections the front end keeps and delivers requests from.
    #[serde(default)]
    pub delivery: DeliveryStatus,
    pub kernel: KernelStatus,
    #[serde(default)]
    pub cache: crate::cache::CacheStats,
    /// Listeners that are not sluice's seen on its listen addresses since it started.
    #[serde(default)]
    pub foreign_listeners: u64,
    /// Access-log lines dropped: the writer fell behind, or a worker sent a line that is
    /// not an entry.
    #[serde(default)]
    pub access_log_dropped: u64,
    #[serde(default)]
    pub access_log_malformed: u64,
    /// Sockets this run took back from systemd's fd store at its start.
    #[serde(default)]
    pub inherited_sockets: u64,
    /// Upgrades (`sluice upgrade`) this process has been through.
    #[serde(default)]
    pub upgrades: u64,
    /// Why the last upgrade was refused or failed, if it was.
    #[serde(default)]
    pub upgrade_error: Option<String>,
    /// HTTPS, when `listen_tls` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsStatus>,
}

/// What the TLS thread has done since the start.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TlsStatus {
    pub listen: Vec<String>,
    pub accepted: u64,
    pub handshakes: u64,
    pub handshake_failures: u64,
    /// Sessions handed to a pool's worker with their keys.
    pub handed_off: u64,
    /// Sessions workers handed back (a request for another pool, the cache or another host).
    pub handed_back: u64,
    pub cache_answers: u64,
    pub refused: u64,
    /// Connections joined to a socket pool (decrypted to it, sealed back).
    #[serde(default)]
    pub relayed: u64,
    /// Sessions of a shared host kept by the front end, their requests delivered.
    #[serde(default)]
    pub delivered: u64,
    /// Connections for passthrough pools whose ClientHello the front end read (the kernel
    /// did not steer them: see the fallbacks), relayed untouched.
    #[serde(default)]
    pub passed_through: u64,
    /// Connections for a passthrough pool that was stopped, removed or full: closed with
    /// a TLS alert.
    #[serde(default)]
    pub passthrough_refused: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolStatus {
    pub name: String,
    /// `running`, `idle` (no worker until a connection waits) or `stopped` (rapid-fail).
    pub state: String,
    /// Requests the pool's workers answered (as they last reported).
    pub requests: u64,
    pub workers: Vec<WorkerStatus>,
    /// Connections waiting in the pool's accept queues now.
    pub queued: u64,
    /// Connections the kernel program steered to this pool.
    pub steered_kernel: u64,
    /// Connections the dispatcher handed to this pool.
    pub handed_off: u64,
    /// Requests the front end delivered to this pool from connections it keeps (hosts
    /// shared by pools that do not trust each other).
    #[serde(default)]
    pub delivered: u64,
    /// Its workers' answers by status class (`1xx` to `5xx`), as they last reported
    /// (sluice-worker workers report them; a socket pool's server does not).
    #[serde(default)]
    pub responses: BTreeMap<String, u64>,
    /// How long its handlers took.
    #[serde(default)]
    pub duration_us: DurationStatus,
}

/// A histogram of handler times in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DurationStatus {
    /// Bucket bounds (`sluice_proto::outcomes::DURATION_BUCKETS_US`).
    pub le: Vec<u64>,
    /// Answers at or under each bound (cumulative), then all of them.
    pub counts: Vec<u64>,
    pub sum: u64,
}

impl DurationStatus {
    pub fn of(o: &sluice_proto::outcomes::Outcomes) -> DurationStatus {
        let counts = o
            .buckets
            .iter()
            .scan(0u64, |acc, &n| {
                *acc = acc.saturating_add(n);
                Some(*acc)
            })
            .collect();
        DurationStatus {
            le: sluice_proto::outcomes::DURATION_BUCKETS_US.to_vec(),
            counts,
            sum: o.sum_us,
        }
    }
}

/// Status classes as `responses` names them.
pub fn responses_of(o: &sluice_proto::outcomes::Outcomes) -> BTreeMap<String, u64> {
    o.classes
        .iter()
        .enumerate()
        .map(|(i, &n)| (format!("{}xx", i + 1), n))
        .collect()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub pid: i32,
    pub uptime_s: u64,
    pub requests: u64,
    /// Replacements before this worker in its slot.
    pub restarts: u32,
    /// Answered its first ping and is not shutting down.
    pub ready: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DispatcherStatus {
    /// Connections accepted on the dispatcher sockets.
    pub accepted: u64,
    /// Requests refused, by status code.
    pub refused: BTreeMap<String, u64>,
    pub header_timeouts: u64,
    /// Unrouted connections dropped to stay within `limits.max_pending`.
    #[serde(default)]
    pub dropped_pending: u64,
    /// Connections workers handed back for a request routed elsewhere.
    #[serde(default)]
    pub handed_back: u64,
    /// Connections relayed to socket pools: running now, since start, and those that could
    /// not be put into their pool's queue.
    #[serde(default)]
    pub relays_open: u64,
    #[serde(default)]
    pub relays: u64,
    #[serde(default)]
    pub relays_failed: u64,
    /// Requests answered 308 to https (`redirect_https`).
    #[serde(default)]
    pub redirects: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeliveryStatus {
    /// Delivery loops (`[server] threads`).
    #[serde(default)]
    pub loops: u64,
    /// Client connections kept now, and since the start.
    pub open: u64,
    pub connections: u64,
    /// Channels opened into pool queues, and those that could not be (answered 503).
    pub channels: u64,
    pub channels_failed: u64,
    /// Answers from pools refused as malformed or missing (502).
    pub bad_responses: u64,
    pub cache_answers: u64,
    pub refused: u64,
    pub timeouts: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelStatus {
    /// Runs of the steering program.
    pub program_runs: u64,
    /// First-segment mode: data-less SYNs answered by cookie (steered later on their data).
    pub syn_cookies: u64,
    /// First-segment mode: handshake ACKs dropped by the ack gate.
    pub ack_gate_drops: u64,
    /// Connections whose first request is a cached path, sent to the front end's cache.
    #[serde(default)]
    pub cache_steered: u64,
    /// `redirect_https`: plain connections sent to the dispatcher for their 308.
    #[serde(default)]
    pub redirected: u64,
    /// TLS connections whose SNI name no passthrough pool serves, sent to the front end's
    /// handshake.
    #[serde(default)]
    pub tls_terminated: u64,
}

impl Status {
    /// The Prometheus text exposition of the same figures.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, u64)>| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (labels, v) in rows {
                out.push_str(&format!("{name}{labels} {v}\n"));
            }
        };
        let per_pool = |f: &dyn Fn(&PoolStatus) -> u64| -> Vec<(String, u64)> {
            self.pools
                .iter()
                .map(|p| (format!("{{pool=\"{}\"}}", p.name), f(p)))
                .collect()
        };
        family(
            "sluice_pool_state",
            "gauge",
            "1 for the pool's current state.",
            self.pools
                .iter()
                .flat_map(|p| {
                    ["running", "idle", "stopped"].map(|s| {
                        (
                            format!("{{pool=\"{}\",state=\"{s}\"}}", p.name),
                            (p.state == s) as u64,
                        )
                    })
                })
                .collect(),
        );
        family(
            "sluice_pool_workers",
            "gauge",
            "Worker processes running.",
            per_pool(&|p| p.workers.len() as u64),
        );
        family(
            "sluice_pool_queued",
            "gauge",
            "Connections waiting in the pool's queue.",
            per_pool(&|p| p.queued),
        );
        family(
            "sluice_pool_requests_total",
            "counter",
            "Requests the pool's workers answered.",
            per_pool(&|p| p.requests),
        );
        family(
            "sluice_pool_restarts_total",
            "counter",
            "Worker replacements after failures.",
            per_pool(&|p| p.workers.iter().map(|w| w.restarts as u64).sum()),
        );
        family(
            "sluice_steered_kernel_total",
            "counter",
            "Connections steered in the kernel.",
            per_pool(&|p| p.steered_kernel),
        );
        family(
            "sluice_handed_off_total",
            "counter",
            "Connections the dispatcher handed to the pool.",
            per_pool(&|p| p.handed_off),
        );
        family(
            "sluice_delivered_total",
            "counter",
            "Requests the front end delivered to the pool from connections it keeps.",
            per_pool(&|p| p.delivered),
        );
        // Per pool, not per pid: series must not churn as workers are replaced.
        family(
            "sluice_pool_youngest_worker_seconds",
            "gauge",
            "Seconds since the pool's most recently started worker started.",
            per_pool(&|p| p.workers.iter().map(|w| w.uptime_s).min().unwrap_or(0)),
        );
        family(
            "sluice_fallbacks_total",
            "counter",
            "Connections the kernel program sent to the dispatcher, by reason.",
            self.fallbacks
                .iter()
                .map(|(k, v)| (format!("{{reason=\"{k}\"}}"), *v))
                .collect(),
        );
        family(
            "sluice_dispatcher_accepted_total",
            "counter",
            "Connections the dispatcher accepted.",
            vec![(String::new(), self.dispatcher.accepted)],
        );
        family(
            "sluice_dispatcher_refused_total",
            "counter",
            "Requests the dispatcher refused, by status code.",
            self.dispatcher
                .refused
                .iter()
                .map(|(k, v)| (format!("{{code=\"{k}\"}}"), *v))
                .collect(),
        );
        let one = |v: u64| vec![(String::new(), v)];
        for (name, help, v) in [
            (
                "sluice_dispatcher_header_timeouts_total",
                "Connections closed for taking too long to send a request head.",
                self.dispatcher.header_timeouts,
            ),
            (
                "sluice_dispatcher_dropped_pending_total",
                "Unrouted connections dropped to stay within limits.max_pending.",
                self.dispatcher.dropped_pending,
            ),
            (
                "sluice_dispatcher_handed_back_total",
                "Connections workers handed back for a request routed elsewhere.",
                self.dispatcher.handed_back,
            ),
            (
                "sluice_relays_total",
                "Connections the front end relayed to socket pools.",
                self.dispatcher.relays,
            ),
            (
                "sluice_relays_failed_total",
                "Relays that could not be put into their pool's queue (answered 503).",
                self.dispatcher.relays_failed,
            ),
            (
                "sluice_program_runs_total",
                "Runs of the steering program.",
                self.kernel.program_runs,
            ),
            (
                "sluice_cache_steered_total",
                "Connections the kernel sent to the front end's cache.",
                self.kernel.cache_steered,
            ),
            (
                "sluice_dispatcher_redirects_total",
                "Requests answered 308 to https (redirect_https).",
                self.dispatcher.redirects,
            ),
            (
                "sluice_kernel_tls_terminated_total",
                "TLS connections the kernel sent to the front end's handshake (no passthrough pool has their SNI name).",
                self.kernel.tls_terminated,
            ),
            (
                "sluice_foreign_listeners_total",
                "Listeners that are not sluice's seen on its listen addresses.",
                self.foreign_listeners,
            ),
        ] {
            family(name, "counter", help, one(v));
        }
        family(
            "sluice_upgrades_total",
            "counter",
            "Upgrades this front-end process has been through.",
            one(self.upgrades),
        );
        if let Some(t) = &self.tls {
            family(
                "sluice_tls_total",
                "counter",
                "HTTPS: connections accepted, handshakes done and failed, sessions handed to pools and back, cache answers and refusals over TLS.",
                [
                    ("accepted", t.accepted),
                    ("handshakes", t.handshakes),
                    ("handshake_failures", t.handshake_failures),
                    ("handed_off", t.handed_off),
                    ("handed_back", t.handed_back),
                    ("cache_answers", t.cache_answers),
                    ("refused", t.refused),
                    ("relayed", t.relayed),
                    ("delivered", t.delivered),
                    ("passed_through", t.passed_through),
                    ("passthrough_refused", t.passthrough_refused),
                ]
                .into_iter()
                .map(|(what, n)| (format!("{{what=\"{what}\"}}"), n))
                .collect(),
            );
        }
        family(
            "sluice_inherited_sockets",
            "gauge",
            "Sockets this run took back from systemd's fd store at its start.",
            one(self.inherited_sockets),
        );
        family(
            "sluice_access_log_dropped_total",
            "counter",
            "Access-log lines dropped (the writer behind, or not an entry).",
            vec![
                ("{reason=\"behind\"}".into(), self.access_log_dropped),
                ("{reason=\"malformed\"}".into(), self.access_log_malformed),
            ],
        );
        family(
            "sluice_cache_entries",
            "gauge",
            "Responses in the front-end cache.",
            vec![(String::new(), self.cache.entries as u64)],
        );
        family(
            "sluice_cache_bytes",
            "gauge",
            "Bytes in the front-end cache.",
            vec![(String::new(), self.cache.bytes as u64)],
        );
        family(
            "sluice_cache_hits_total",
            "counter",
            "Requests answered from the cache.",
            vec![(String::new(), self.cache.hits)],
        );
        family(
            "sluice_cache_misses_total",
            "counter",
            "Cache-eligible requests not in the cache.",
            vec![(String::new(), self.cache.misses)],
        );
        family(
            "sluice_syn_cookies_total",
            "counter",
            "Data-less SYNs answered by cookie (first-segment mode).",
            vec![(String::new(), self.kernel.syn_cookies)],
        );
        family(
            "sluice_ack_gate_drops_total",
            "counter",
            "Handshake ACKs dropped by the ack gate.",
            vec![(String::new(), self.kernel.ack_gate_drops)],
        );
        family(
            "sluice_pool_responses_total",
            "counter",
            "Answers of the pool's workers by status class.",
            self.pools
                .iter()
                .flat_map(|p| {
                    p.responses.iter().map(|(class, &n)| {
                        (format!("{{pool=\"{}\",class=\"{class}\"}}", p.name), n)
                    })
                })
                .collect(),
        );
        let name = "sluice_pool_request_duration_seconds";
        out.push_str(&format!(
            "# HELP {name} How long the pool's handlers took.\n# TYPE {name} histogram\n"
        ));
        for p in &self.pools {
            let d = &p.duration_us;
            let total = d.counts.last().copied().unwrap_or(0);
            for (le, n) in d.le.iter().zip(&d.counts) {
                let le = *le as f64 / 1e6;
                out.push_str(&format!(
                    "{name}_bucket{{pool=\"{}\",le=\"{le}\"}} {n}\n",
                    p.name
                ));
            }
            out.push_str(&format!(
                "{name}_bucket{{pool=\"{}\",le=\"+Inf\"}} {total}\n",
                p.name
            ));
            out.push_str(&format!(
                "{name}_sum{{pool=\"{}\"}} {}\n",
                p.name,
                d.sum as f64 / 1e6
            ));
            out.push_str(&format!("{name}_count{{pool=\"{}\"}} {total}\n", p.name));
        }
        out
    }

    /// The human-readable form of `sluice status`.
    pub fn render(&self) -> String {
        let mut out = format!(
            "steering: {}   listen: {}\n",
            self.steering,
            self.listen.join(", ")
        );
        out.push_str(&format!(
            "{:<16} {:>8} {:>8} {:>14} {:>11} {:>10}  workers (pid/uptime/requests/restarts)\n",
            "pool", "state", "queued", "steered_kernel", "handed_off", "delivered"
        ));
        for p in &self.pools {
            let workers: Vec<String> = p
                .workers
                .iter()
                .map(|w| format!("{}/{}s/{}/{}", w.pid, w.uptime_s, w.requests, w.restarts))
                .collect();
            out.push_str(&format!(
                "{:<16} {:>8} {:>8} {:>14} {:>11} {:>10}  {}\n",
                p.name,
                p.state,
                p.queued,
                p.steered_kernel,
                p.handed_off,
                p.delivered,
                if workers.is_empty() {
                    "-".to_owned()
                } else {
                    workers.join(" ")
                }
            ));
        }
        let fallbacks: Vec<String> = self
            .fallbacks
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        out.push_str(&format!("dispatcher fallbacks: {}\n", fallbacks.join(" ")));
        let d = &self.delivery;
        out.push_str(&format!(
            "delivery: loops={} open={} connections={} channels={} channels_failed={} bad_responses={} cache_answers={} refused={} timeouts={}\n",
            d.loops, d.open, d.connections, d.channels, d.channels_failed, d.bad_responses, d.cache_answers, d.refused, d.timeouts
        ));
        let refused: Vec<String> = self
            .dispatcher
            .refused
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        out.push_str(&format!(
            "dispatcher: accepted={} refused: {} header_timeouts={} dropped_pending={} handed_back={} redirects={}\n",
            self.dispatcher.accepted,
            refused.join(" "),
            self.dispatcher.header_timeouts,
            self.dispatcher.dropped_pending,
            self.dispatcher.handed_back,
            self.dispatcher.redirects,
        ));
        out.push_str(&format!(
            "relays: open={} total={} failed={}\n",
            self.dispatcher.relays_open, self.dispatcher.relays, self.dispatcher.relays_failed
        ));
        out.push_str(&format!(
            "kernel: program_runs={} syn_cookies={} ack_gate_drops={} cache_steered={} redirected={} tls_terminated={}\n",
            self.kernel.program_runs,
            self.kernel.syn_cookies,
            self.kernel.ack_gate_drops,
            self.kernel.cache_steered,
            self.kernel.redirected,
            self.kernel.tls_terminated,
        ));
        out.push_str(&format!(
            "cache: entries={} bytes={} hits={} misses={}\n",
            self.cache.entries, self.cache.bytes, self.cache.hits, self.cache.misses
        ));
        if let Some(t) = &self.tls {
            out.push_str(&format!(
                "tls ({}): accepted={} handshakes={} failures={} handed_off={} handed_back={} cache_answers={} refused={} relayed={} delivered={} passed_through={} passthrough_refused={}\n",
                t.listen.join(" "),
                t.accepted,
                t.handshakes,
                t.handshake_failures,
                t.handed_off,
                t.handed_back,
                t.cache_answers,
                t.refused,
                t.relayed,
                t.delivered,
                t.passed_through,
                t.passthrough_refused,
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_of_hostile_counts_stays_cumulative() {
        let mut o = sluice_proto::outcomes::Outcomes::default();
        o.buckets[0] = u64::MAX;
        o.buckets[1] = 5;
        let d = DurationStatus::of(&o);
        assert!(d.counts.windows(2).all(|w| w[0] <= w[1]), "{:?}", d.counts);
        assert_eq!(d.counts.last(), Some(&u64::MAX));
    }

    #[test]
    fn every_figure_of_status_is_a_metric_without_pid_labels() {
        let st: Status = serde_json::from_value(serde_json::json!({
            "steering": "syn", "listen": ["127.0.0.1:80"],
            "pools": [{"name": "api", "state": "running", "requests": 5, "queued": 1,
                       "steered_kernel": 2, "handed_off": 3,
                       "responses": {"2xx": 4, "4xx": 1},
                       "duration_us": {"le": [500, 1000], "counts": [3, 4, 5], "sum": 2500},
                       "workers": [{"pid": 42, "uptime_s": 9, "requests": 5, "restarts": 1, "ready": true}]}],
            "fallbacks": {"no_host": 4},
            "dispatcher": {"accepted": 6, "refused": {"400": 1}, "header_timeouts": 7,
                           "dropped_pending": 8, "handed_back": 10},
            "kernel": {"program_runs": 11, "syn_cookies": 12, "ack_gate_drops": 13, "cache_steered": 14},
            "foreign_listeners": 15, "access_log_dropped": 16, "access_log_malformed": 17,
            "inherited_sockets": 18, "upgrades": 19
        }))
        .unwrap();
        let text = st.prometheus();
        for line in [
            "sluice_pool_youngest_worker_seconds{pool=\"api\"} 9",
            "sluice_dispatcher_header_timeouts_total 7",
            "sluice_dispatcher_dropped_pending_total 8",
            "sluice_dispatcher_handed_back_total 10",
            "sluice_program_runs_total 11",
            "sluice_cache_steered_total 14",
            "sluice_foreign_listeners_total 15",
            "sluice_access_log_dropped_total{reason=\"behind\"} 16",
            "sluice_access_log_dropped_total{reason=\"malformed\"} 17",
            "sluice_fallbacks_total{reason=\"no_host\"} 4",
            "sluice_inherited_sockets 18",
            "sluice_upgrades_total 19",
            "sluice_pool_responses_total{pool=\"api\",class=\"4xx\"} 1",
            "sluice_pool_request_duration_seconds_bucket{pool=\"api\",le=\"0.0005\"} 3",
            "sluice_pool_request_duration_seconds_bucket{pool=\"api\",le=\"+Inf\"} 5",
            "sluice_pool_request_duration_seconds_sum{pool=\"api\"} 0.0025",
            "sluice_pool_request_duration_seconds_count{pool=\"api\"} 5",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(!text.contains("pid="), "{text}");
    }
}
