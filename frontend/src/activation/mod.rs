//! Process activation, the job WAS does for IIS: start a pool's workers on demand (or with the
//! front end), replace workers that exit (with back-off), stop a pool that keeps failing
//! (rapid-fail protection), ping workers and replace hung ones, recycle them overlapped, and
//! stop idle pools. The pool sockets stay open in the front end throughout, so connections
//! queued while no worker runs wait for the next one.

pub mod control;
mod handover;
mod identity;
mod output;
pub mod probe;
mod seccomp;
mod spawn;

use std::{
    collections::VecDeque,
    io,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    path::PathBuf,
    time::{Duration, Instant},
};

pub use handover::WorkerState;
use sluice_proto::{cache::CacheKey, env::WorkerSettings, outcomes::Outcomes};
pub use spawn::Launch;

use self::control::{ToFrontend, ToWorker};
use crate::access_log::{AccessLog, Record};
use crate::config::{Activation, Runs, Start, WorkerKind};
use crate::pool::PoolId;

/// A worker that lived this long before exiting is not restarted with back-off.
const HEALTHY_UPTIME: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolState {
    /// No worker runs; the first connection in the queue starts them.
    Idle,
    Running,
    /// Rapid-fail protection stopped it: the dispatcher answers 503 until `pool start`.
    Stopped,
    /// A reload removed it: its workers finish their requests and are not replaced.
    Removed,
}

impl PoolState {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolState::Idle => "idle",
            PoolState::Running => "running",
            PoolState::Stopped => "stopped",
            PoolState::Removed => "removed",
        }
    }
}

/// What the front end must do after a supervisor step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Rapid-fail protection stopped the pool: steer it to the dispatcher, answer 503.
    Stopped(PoolId),
    /// The pool runs again (after `pool start`).
    Restarted(PoolId),
}

/// What a pool is started with.
pub struct PoolLaunch {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub processes: u32,
    pub threads: Option<u32>,
    pub activation: Activation,
    /// (fd, LISTEN_FDNAMES name) of the pool's sockets.
    pub fds: Vec<(RawFd, String)>,
    /// Readable when a connection waits for this pool (its listening sockets and the workers'
    /// end of its handoff channel).
    pub demand: Vec<RawFd>,
    /// The contract's settings (`SLUICE_*`).
    pub settings: WorkerSettings,
    /// The pool's own `env`.
    pub env: Vec<(String, String)>,
    /// What its workers are, and how a socket worker is checked.
    pub runs: Runs,
    /// The `Host` of its health checks (its first route's host, or the listen address).
    pub probe_host: String,
}

/// A cache publication from a worker, with what the front end needs to judge its sender.
#[derive(Debug)]
pub struct Published {
    pub pool: PoolId,
    pub pid: libc::pid_t,
    /// The sender is a current worker of a running pool (not one being recycled, stopped or
    /// removed).
    pub live: bool,
    pub key: CacheKey,
    pub response: Vec<u8>,
}

struct Worker {
    pid: libc::pid_t,
    /// A sluice-worker's control channel; a socket worker has none.
    control: Option<OwnedFd>,
    started: Instant,
    /// Answered its first ping (or pings are off).
    ready: bool,
    requests: u64,
    rss_kib: u64,
    last_pong: Instant,
    ping: Option<(u64, Instant)>,
    /// Asked to stop at this time (recycle, idle, shutdown): its exit is no failure.
    retiring: Option<Instant>,
    /// A replacement is wanted before it retires (overlapped recycle).
    recycle: bool,
    /// Replacements before this one in its slot.
    restarts: u32,
    /// A copy of the read end of a socket worker's output pipe (a thread reads its own), for
    /// an upgrade to pass on.
    output: Option<OwnedFd>,
    /// How its answers went, as it last reported.
    outcomes: Outcomes,
}

struct Pool {
    name: String,
    /// The uid its workers run as when it names no `user`.
    own_uid: u32,
    policy: Activation,
    processes: u32,
    launch: Launch,
    demand: Vec<RawFd>,
    state: PoolState,
    workers: Vec<Worker>,
    /// Failures within the rapid-fail window.
    failures: VecDeque<Instant>,
    /// Quick exits in a row, for the restart back-off.
    quick_exits: u32,
    next_start: Instant,
    /// Restart counts of slots waiting for a replacement.
    vacated: Vec<u32>,
    /// Requests of workers that are gone, so the pool's total only grows; and how they went.
    requests_gone: u64,
    outcomes_gone: Outcomes,
    last_total: u64,
    last_activity: Instant,
    runs: Runs,
    probe_host: String,
    /// A probe of this pool is running.
    probing: bool,
    /// No health check of ready workers starts before this.
    next_probe: Instant,
    /// No readiness probe starts before this (after one failed).
    retry_probe: Instant,
}

/// What status reports about a worker.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub pid: libc::pid_t,
    pub uptime: Duration,
    pub requests: u64,
    pub restarts: u32,
    pub ready: bool,
}

pub struct PoolInfo {
    pub state: PoolState,
    pub workers: Vec<WorkerInfo>,
    pub requests: u64,
    /// Its workers' answers by class and handler time (sluice-worker workers report them).
    pub outcomes: Outcomes,
}

pub struct Supervisor {
    pools: Vec<Pool>,
    seq: u64,
    /// Sent to every worker before it starts (the route table and the cached keys).
    greeting: Vec<Vec<u8>>,
    access_log: Option<AccessLog>,
    /// Checks socket workers (None: they count as ready once started).
    prober: Option<probe::Prober>,
}

fn backoff(quick_exits: u32) -> Duration {
    match quick_exits {
        0 | 1 => Duration::ZERO,
        n => Duration::from_millis(100u64 << (n - 2).min(7)).min(MAX_BACKOFF),
    }
}

fn signal(pid: libc::pid_t, sig: i32) {
    // SAFETY: signalling a worker we started and have not reaped.
    unsafe { libc::kill(pid, sig) };
}

impl Supervisor {
    pub fn new(pools: Vec<PoolLaunch>) -> io::Result<Supervisor> {
        let mut s = Supervisor {
            pools: Vec::new(),
            seq: 0,
            greeting: Vec::new(),
            access_log: None,
            prober: None,
        };
        for p in pools {
            s.add(p)?;
        }
        Ok(s)
    }

    /// How a pool's workers are started: a pool without `user` runs as `own` (its uid, see
    /// `identity`).
    fn launch(own: u32, p: &PoolLaunch) -> io::Result<Launch> {
        let (fds, names): (Vec<RawFd>, Vec<String>) = p.fds.iter().cloned().unzip();
        let mut env = p.env.clone();
        env.extend(
            p.settings
                .vars()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v)),
        );
        let (uid, gid) = match p.activation.uid {
            Some(uid) => (uid, p.activation.gid.unwrap_or(uid)),
            None => (own, p.activation.gid.unwrap_or(own)),
        };
        let socket = p.runs.kind == WorkerKind::Socket;
        let setup = spawn::Setup {
            control: !socket,
            cwd: p.runs.cwd.as_deref(),
            capture: socket,
        };
        Launch::new(
            &p.program,
            &p.args,
            fds,
            &names,
            &env,
            Some((uid, gid)),
            setup,
        )
    }

    /// Socket workers are checked through `prober` from now on.
    pub fn set_prober(&mut self, prober: probe::Prober) {
        self.prober = Some(prober);
    }

    /// A new pool, with the next id.
    pub fn add(&mut self, p: PoolLaunch) -> io::Result<()> {
        let now = Instant::now();
        // Allocated once: the pool keeps its uid for the front end's life.
        let own_uid = identity::dynamic(self.pools.len());
        let launch = Self::launch(own_uid, &p)?;
        let state = if p.activation.start == Start::Always {
            PoolState::Running
        } else {
            PoolState::Idle
        };
        self.pools.push(Pool {
            name: p.name,
            own_uid,
            policy: p.activation,
            processes: p.processes,
            launch,
            demand: p.demand,
            state,
            workers: Vec::new(),
            failures: VecDeque::new(),
            quick_exits: 0,
            next_start: now,
            vacated: Vec::new(),
            requests_gone: 0,
            outcomes_gone: Outcomes::default(),
            last_total: 0,
            last_activity: now,
            runs: p.runs,
            probe_host: p.probe_host,
            probing: false,
            next_probe: now,
            retry_probe: now,
        });
        Ok(())
    }

    /// New settings for pool `id` (a reload): its workers are recycled, overlapped.
    pub fn update(&mut self, id: PoolId, p: PoolLaunch) -> io::Result<()> {
        let Some(pool) = self.pools.get_mut(id.index()) else {
            return Ok(());
        };
        let launch = Self::launch(pool.own_uid, &p)?;
        pool.launch = launch;
        pool.runs = p.runs;
        pool.probe_host = p.probe_host;
        pool.policy = p.activation;
        pool.processes = p.processes;
        pool.demand = p.demand;
        if pool.policy.start == Start::Always && pool.state == PoolState::Idle {
            pool.state = PoolState::Running;
        }
        let mut n = 0;
        for w in pool.workers.iter_mut().filter(|w| w.retiring.is_none()) {
            w.recycle = true;
            n += 1;
        }
        log::info!("pool {}: new settings; recycling {n} worker(s)", pool.name);
        Ok(())
    }

    /// Pool `id` was removed (a reload): its workers finish their requests and exit.
    pub fn remove(&mut self, id: PoolId) {
        let now = Instant::now();
        if let Some(p) = self.pools.get_mut(id.index()) {
            p.state = PoolState::Removed;
            p.vacated.clear();
            for w in &mut p.workers {
                retire(w, now);
            }
            log::info!(
                "pool {}: removed; its workers finish their requests",
                p.name
            );
        }
    }

    /// The pool has no worker left (a removed pool can be forgotten).
    pub fn is_empty(&self, id: PoolId) -> bool {
        self.pools
            .get(id.index())
            .is_none_or(|p| p.workers.is_empty())
    }

    /// fds the controller must poll: (fd, pool, worker pid or 0 for demand).
    pub fn watched(&self) -> Vec<(RawFd, PoolId, libc::pid_t)> {
        let mut out = Vec::new();
        for (i, p) in self.pools.iter().enumerate() {
            let i = PoolId::new(i);
            if p.state == PoolState::Idle {
                out.extend(p.demand.iter().map(|&fd| (fd, i, 0)));
            }
            out.extend(
                p.workers
                    .iter()
                    .filter_map(|w| Some((w.control.as_ref()?.as_raw_fd(), i, w.pid))),
            );
        }
        out
    }

    /// Sets what every worker is told before it starts, and tells the running ones now.
    pub fn greet(&mut self, messages: Vec<ToWorker>) {
        let messages: Vec<Vec<u8>> = messages.iter().map(ToWorker::encode).collect();
        for p in &self.pools {
            for w in p.workers.iter().filter(|w| w.retiring.is_none()) {
                let Some(control) = &w.control else {
                    continue;
                };
                for m in &messages {
                    if let Err(e) = control::send(control.as_raw_fd(), m) {
                        log::warn!("pool {}: telling worker {}: {e}", p.name, w.pid);
                    }
                }
            }
        }
        self.greeting = messages;
    }

    /// Where the workers' access-log entries go (None: `[server] access_log` is off).
    pub fn set_access_log(&mut self, log: Option<AccessLog>) {
        self.access_log = log;
    }

    /// A watched fd is readable; returns the cache publications it carried.
    pub fn readable(&mut self, pool: PoolId, pid: libc::pid_t, now: Instant) -> Vec<Published> {
        let mut published = Vec::new();
        let access_log = self.access_log.clone();
        let Some(p) = self.pools.get_mut(pool.index()) else {
            return published;
        };
        if pid == 0 {
            if p.state == PoolState::Idle {
                log::info!(
                    "pool {}: a connection is waiting; starting its workers",
                    p.name
                );
                p.state = PoolState::Running;
                p.last_activity = now;
            }
            return published;
        }
        let pool_running = p.state == PoolState::Running;
        let Some(w) = p.workers.iter_mut().find(|w| w.pid == pid) else {
            return published;
        };
        let Some(control) = &w.control else {
            return published;
        };
        let received = control::receive(control.as_raw_fd());
        // A closed end means the worker is exiting: reap() will see it.
        for m in received.messages {
            match m {
                ToFrontend::Pong {
                    seq,
                    requests,
                    rss_kib,
                } => {
                    if w.ping.is_some_and(|(s, _)| s == seq) {
                        w.ping = None;
                    }
                    w.last_pong = now;
                    if !w.ready {
                        w.ready = true;
                        log::info!("pool {}: worker {} is ready", p.name, w.pid);
                    }
                    w.requests = requests;
                    w.rss_kib = rss_kib;
                }
                ToFrontend::Stats { requests, outcomes } => {
                    w.requests = requests;
                    w.outcomes = outcomes;
                }
                // The pool and pid are the channel's: a worker cannot log as another.
                ToFrontend::Access(lines) => {
                    if let Some(log) = &access_log {
                        log.record(Record {
                            lines,
                            pool: Some(p.name.as_str().into()),
                            pid: u32::try_from(pid).ok(),
                        });
                    }
                }
                ToFrontend::Cache { key, response } => published.push(Published {
                    pool,
                    pid,
                    live: pool_running && w.retiring.is_none() && !w.recycle,
                    key,
                    response,
                }),
            }
        }
        published
    }

    /// One step of every pool's state machine. `activity[i]`: a counter of pool i's
    /// connections (kernel-steered + handed off) that grows with traffic; `queued[i]` its
    /// queue length now.
    pub fn tick(&mut self, now: Instant, activity: &[u64], queued: &[u64]) -> Vec<Event> {
        let mut events = Vec::new();
        let outcomes = self
            .prober
            .as_ref()
            .map(probe::Prober::finished)
            .unwrap_or_default();
        for (index, p) in self.pools.iter_mut().enumerate() {
            let i = PoolId::new(index);
            let total = activity.get(index).copied().unwrap_or(0)
                + p.requests_gone
                + p.workers.iter().map(|w| w.requests).sum::<u64>();
            if total != p.last_total {
                p.last_total = total;
                p.last_activity = now;
            }
            let waiting = queued.get(index).copied().unwrap_or(0) > 0;
            if p.state == PoolState::Idle && waiting {
                p.state = PoolState::Running;
                p.last_activity = now;
            }
            if p.state != PoolState::Running {
                Self::retire_overdue(p, now);
                continue;
            }
            // Idle timeout: nothing happened for that long and nothing waits.
            if !p.policy.idle_timeout.is_zero()
                && p.policy.start == Start::OnDemand
                && now.duration_since(p.last_activity) >= p.policy.idle_timeout
                && !waiting
            {
                log::info!(
                    "pool {}: idle for {:?}; stopping its workers",
                    p.name,
                    p.policy.idle_timeout
                );
                for w in &mut p.workers {
                    retire(w, now);
                }
                p.vacated.clear();
                p.state = PoolState::Idle;
                continue;
            }
            let mut failed = 0;
            for o in outcomes.iter().filter(|o| o.pool == i) {
                p.probing = false;
                failed += Self::probed(p, o, now);
            }
            if let Some(prober) = &self.prober {
                Self::probe(p, i, prober, now);
            }
            for w in &mut p.workers {
                if w.retiring.is_some() {
                    continue;
                }
                if !w.ready && now.duration_since(w.started) > p.policy.startup_time_limit {
                    log::warn!(
                        "pool {}: worker {} did not start within {:?}; killing it",
                        p.name,
                        w.pid,
                        p.policy.startup_time_limit
                    );
                    signal(w.pid, libc::SIGKILL);
                    w.retiring = Some(now);
                    failed += 1;
                    continue;
                }
                if !p.policy.ping_interval.is_zero() && w.ready && w.control.is_some() {
                    match w.ping {
                        Some((_, sent)) if now.duration_since(sent) > p.policy.ping_timeout => {
                            log::warn!(
                                "pool {}: worker {} did not answer a ping within {:?}; killing it",
                                p.name,
                                w.pid,
                                p.policy.ping_timeout
                            );
                            signal(w.pid, libc::SIGKILL);
                            w.retiring = Some(now);
                            failed += 1;
                            continue;
                        }
                        None if now.duration_since(w.last_pong) >= p.policy.ping_interval => {
                            self.seq += 1;
                            let ping = ToWorker::Ping(self.seq).encode();
                            if let Some(control) = &w.control {
                                if control::send(control.as_raw_fd(), &ping).is_ok() {
                                    w.ping = Some((self.seq, now));
                                }
                            }
                        }
                        _ => {}
                    }
                }
                // Recycling conditions.
                let pol = &p.policy;
                let why = if !pol.recycle_time.is_zero()
                    && now.duration_since(w.started) >= pol.recycle_time
                {
                    Some("its time limit")
                } else if pol.recycle_requests > 0 && w.requests >= pol.recycle_requests {
                    Some("its request limit")
                } else if pol.recycle_memory > 0 && w.rss_kib * 1024 >= pol.recycle_memory {
                    Some("its memory limit")
                } else {
                    None
                };
                if let (Some(why), false) = (why, w.recycle) {
                    log::info!("pool {}: recycling worker {} ({why})", p.name, w.pid);
                    w.recycle = true;
                }
            }
            for _ in 0..failed {
                p.vacated.push(0);
                if Self::failure(p, now) {
                    events.push(Event::Stopped(i));
                }
            }
            if p.state != PoolState::Running {
                continue;
            }
            // Overlapped recycle: retire a worker marked for it once a replacement is ready.
            let ready_fresh = p
                .workers
                .iter()
                .filter(|w| w.retiring.is_none() && !w.recycle && w.ready)
                .count();
            let wanted_fresh = p.processes as usize;
            let mut surplus = (ready_fresh
                + p.workers
                    .iter()
                    .filter(|w| w.retiring.is_none() && w.recycle)
                    .count())
            .saturating_sub(wanted_fresh);
            for w in p
                .workers
                .iter_mut()
                .filter(|w| w.retiring.is_none() && w.recycle)
            {
                if surplus == 0 {
                    break;
                }
                retire(w, now);
                surplus -= 1;
            }
            // Start what is missing: one per missing slot, plus one per worker to recycle.
            let fresh = p
                .workers
                .iter()
                .filter(|w| w.retiring.is_none() && !w.recycle)
                .count();
            if fresh < wanted_fresh && now >= p.next_start {
                for _ in fresh..wanted_fresh {
                    let restarts = p.vacated.pop().map(|r| r + 1).unwrap_or(0);
                    let probes = self.prober.is_some();
                    if let Err(e) =
                        Self::spawn(p, now, restarts, &mut self.seq, &self.greeting, probes)
                    {
                        let hint = if e.kind() == io::ErrorKind::PermissionDenied {
                            format!(
                                " (its workers run as uid {}, which must be able to reach and \
                                 execute {}; or set the pool's `user`)",
                                p.launch.uid(),
                                p.launch.program().display()
                            )
                        } else {
                            String::new()
                        };
                        log::error!("pool {}: cannot start a worker: {e}{hint}", p.name);
                        p.next_start = now + Duration::from_secs(1);
                        if Self::failure(p, now) {
                            events.push(Event::Stopped(i));
                        }
                        break;
                    }
                }
            }
            Self::retire_overdue(p, now);
        }
        events
    }

    fn spawn(
        p: &mut Pool,
        now: Instant,
        restarts: u32,
        seq: &mut u64,
        greeting: &[Vec<u8>],
        probes: bool,
    ) -> io::Result<()> {
        let mut output_copy = None;
        let (pid, control, ready) = if p.launch.has_control() {
            let (ours, theirs) = control::pair()?;
            // Queued before the worker runs: it reads them when it starts.
            for m in greeting {
                control::send(ours.as_raw_fd(), m)?;
            }
            let (pid, _) = p.launch.spawn(Some(theirs.as_raw_fd()))?;
            (pid, Some(ours), p.policy.ping_interval.is_zero())
        } else {
            let (pid, out) = p.launch.spawn(None)?;
            if let Some(out) = out {
                output_copy = out.try_clone().ok();
                output::forward(p.name.clone(), pid, out);
            }
            // Ready once a probe says so (see `probe`), or at once when nothing probes.
            (pid, None, !probes)
        };
        log::info!("pool {}: started worker {pid}", p.name);
        let pings = control.is_some() && !p.policy.ping_interval.is_zero();
        let mut w = Worker {
            pid,
            control,
            started: now,
            ready,
            requests: 0,
            rss_kib: 0,
            last_pong: now,
            ping: None,
            retiring: None,
            recycle: false,
            restarts,
            output: output_copy,
            outcomes: Outcomes::default(),
        };
        if let (true, Some(control)) = (pings, &w.control) {
            // The first pong says the worker is up.
            *seq += 1;
            let _ = control::send(control.as_raw_fd(), &ToWorker::Ping(*seq).encode());
            w.ping = Some((*seq, now));
        }
        p.workers.push(w);
        Ok(())
    }

    /// Starts a probe of a socket pool when one is due: readiness while a worker is not
    /// ready, then a health check every `health.interval`.
    fn probe(p: &mut Pool, i: PoolId, prober: &probe::Prober, now: Instant) {
        if p.runs.kind != WorkerKind::Socket || p.probing {
            return;
        }
        let live = p.workers.iter().filter(|w| w.retiring.is_none());
        if live.clone().next().is_none() {
            return;
        }
        let unready = live.clone().any(|w| !w.ready);
        let due = if unready { p.retry_probe } else { p.next_probe };
        if now < due {
            return;
        }
        let (check, timeout) = match (&p.runs.health, unready) {
            (Some(h), _) => (
                probe::Check::Get {
                    path: h.path.clone(),
                    host: p.probe_host.clone(),
                },
                h.timeout,
            ),
            (None, true) => (probe::Check::Accept, p.policy.startup_time_limit),
            (None, false) => return,
        };
        p.probing = true;
        prober.start(i, check, timeout, now);
    }

    /// A probe of pool `p` finished; returns the failures it counts (0 or 1).
    fn probed(p: &mut Pool, o: &probe::Outcome, now: Instant) -> u32 {
        let interval = p.runs.health.as_ref().map_or(Duration::MAX, |h| h.interval);
        p.next_probe = now.checked_add(interval).unwrap_or(now);
        let waiting = |w: &Worker| !w.ready && w.retiring.is_none() && w.started <= o.sent;
        match &o.result {
            Ok(()) => {
                for w in p.workers.iter_mut().filter(|w| waiting(w)) {
                    w.ready = true;
                    log::info!("pool {}: worker {} is ready", p.name, w.pid);
                }
                0
            }
            Err(why) if p.workers.iter().any(waiting) => {
                // Not up yet: try again soon; `startup_time_limit` decides when it failed.
                log::debug!("pool {}: readiness probe: {why}", p.name);
                p.retry_probe = now + Duration::from_millis(200);
                0
            }
            Err(why) => {
                // IIS replaces a worker that fails its ping; here the longest-running one.
                let Some(w) = p
                    .workers
                    .iter_mut()
                    .filter(|w| w.ready && w.retiring.is_none() && w.started <= o.sent)
                    .min_by_key(|w| w.started)
                else {
                    return 0;
                };
                log::warn!(
                    "pool {}: health check failed ({why}); killing worker {}",
                    p.name,
                    w.pid
                );
                signal(w.pid, libc::SIGKILL);
                w.retiring = Some(now);
                1
            }
        }
    }

    fn retire_overdue(p: &mut Pool, now: Instant) {
        for w in &p.workers {
            if let Some(t) = w.retiring {
                if now.duration_since(t) > p.policy.shutdown_time_limit {
                    log::warn!(
                        "pool {}: worker {} did not stop within {:?}; killing it",
                        p.name,
                        w.pid,
                        p.policy.shutdown_time_limit
                    );
                    signal(w.pid, libc::SIGKILL);
                }
            }
        }
    }

    /// Records a failure; true when rapid-fail protection stops the pool now.
    fn failure(p: &mut Pool, now: Instant) -> bool {
        let pol = &p.policy;
        if pol.rapid_fail_failures == 0 {
            return false;
        }
        p.failures.push_back(now);
        while p
            .failures
            .front()
            .is_some_and(|&t| now.duration_since(t) > pol.rapid_fail_interval)
        {
            p.failures.pop_front();
        }
        if p.failures.len() < pol.rapid_fail_failures as usize || p.state == PoolState::Stopped {
            return false;
        }
        log::error!(
            "pool {}: {} failures within {:?}: rapid-fail protection stops the pool (`sluice pool start {}` restarts it)",
            p.name,
            p.failures.len(),
            pol.rapid_fail_interval,
            p.name
        );
        p.state = PoolState::Stopped;
        for w in &mut p.workers {
            retire(w, now);
        }
        p.vacated.clear();
        true
    }

    /// Collects exited workers; unexpected exits count as failures.
    pub fn reap(&mut self, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        loop {
            let mut status = 0;
            // SAFETY: waitpid on any child, non-blocking.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return events;
            }
            for (i, p) in self.pools.iter_mut().enumerate() {
                let i = PoolId::new(i);
                let Some(at) = p.workers.iter().position(|w| w.pid == pid) else {
                    continue;
                };
                let w = p.workers.remove(at);
                p.requests_gone += w.requests;
                p.outcomes_gone.add(&w.outcomes);
                let lived = now.duration_since(w.started);
                if w.retiring.is_some() {
                    log::info!(
                        "pool {}: worker {pid} {} after {:.1}s",
                        p.name,
                        describe(status),
                        lived.as_secs_f64()
                    );
                    break;
                }
                p.quick_exits = if lived < HEALTHY_UPTIME {
                    p.quick_exits + 1
                } else {
                    1
                };
                let wait = backoff(p.quick_exits);
                p.next_start = now + wait;
                p.vacated.push(w.restarts);
                log::warn!(
                    "pool {}: worker {pid} {} after {:.1}s; replacing it{}",
                    p.name,
                    describe(status),
                    lived.as_secs_f64(),
                    if wait.is_zero() {
                        String::new()
                    } else {
                        format!(" in {wait:?}")
                    }
                );
                if Self::failure(p, now) {
                    events.push(Event::Stopped(i));
                }
                break;
            }
        }
    }

    /// `sluice pool start NAME`: a stopped (or idle) pool runs again.
    pub fn start(&mut self, name: &str, now: Instant) -> Result<Vec<Event>, String> {
        let (i, p) = self.find(name)?;
        if p.state == PoolState::Removed {
            return Err(format!("pool `{name}` was removed by a reload"));
        }
        let was = p.state;
        p.failures.clear();
        p.quick_exits = 0;
        p.next_start = now;
        p.state = PoolState::Running;
        p.last_activity = now;
        log::info!("pool {name}: started by command (was {})", was.as_str());
        Ok(if was == PoolState::Stopped {
            vec![Event::Restarted(i)]
        } else {
            vec![]
        })
    }

    /// `sluice pool recycle NAME`: every worker is replaced, overlapped.
    pub fn recycle(&mut self, name: &str) -> Result<usize, String> {
        let (_, p) = self.find(name)?;
        let mut n = 0;
        for w in p.workers.iter_mut().filter(|w| w.retiring.is_none()) {
            w.recycle = true;
            n += 1;
        }
        log::info!("pool {name}: recycling {n} worker(s) by command");
        Ok(n)
    }

    fn find(&mut self, name: &str) -> Result<(PoolId, &mut Pool), String> {
        self.pools
            .iter_mut()
            .enumerate()
            .find(|(_, p)| p.name == name && p.state != PoolState::Removed)
            .map(|(i, p)| (PoolId::new(i), p))
            .ok_or_else(|| format!("no pool is named `{name}`"))
    }

    /// The earliest moment a tick has something to do, to bound the controller's wait.
    pub fn busy(&self) -> bool {
        self.pools.iter().any(|p| {
            p.state == PoolState::Running || p.workers.iter().any(|w| w.retiring.is_some())
        })
    }

    /// Stops every worker: `stop` and SIGTERM, then SIGKILL after each pool's limit.
    pub fn stop_all(&mut self) {
        let now = Instant::now();
        let mut limit = Duration::ZERO;
        for p in &mut self.pools {
            p.state = PoolState::Idle;
            limit = limit.max(p.policy.shutdown_time_limit);
            for w in &mut p.workers {
                retire(w, now);
            }
        }
        let deadline = now + limit;
        loop {
            let now = Instant::now();
            self.reap(now);
            let left: Vec<libc::pid_t> = self
                .pools
                .iter()
                .flat_map(|p| &p.workers)
                .map(|w| w.pid)
                .collect();
            if left.is_empty() {
                return;
            }
            if now >= deadline {
                for pid in left {
                    log::warn!("worker {pid} did not stop in time; killing it");
                    signal(pid, libc::SIGKILL);
                    // SAFETY: waiting for our own child.
                    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn info(&self, now: Instant) -> Vec<PoolInfo> {
        self.pools
            .iter()
            .map(|p| PoolInfo {
                state: p.state,
                requests: p.requests_gone + p.workers.iter().map(|w| w.requests).sum::<u64>(),
                outcomes: std::iter::once(p.outcomes_gone)
                    .chain(p.workers.iter().map(|w| w.outcomes))
                    .sum(),
                workers: p
                    .workers
                    .iter()
                    .map(|w| WorkerInfo {
                        pid: w.pid,
                        uptime: now.duration_since(w.started),
                        requests: w.requests,
                        restarts: w.restarts,
                        ready: w.ready && w.retiring.is_none(),
                    })
                    .collect(),
            })
            .collect()
    }
}

/// Asks a worker to stop: it finishes its requests, then exits.
fn retire(w: &mut Worker, now: Instant) {
    if w.retiring.is_none() {
        w.retiring = Some(now);
        if let Some(control) = &w.control {
            let _ = control::send(control.as_raw_fd(), &ToWorker::Stop.encode());
        }
        signal(w.pid, libc::SIGTERM);
    }
}

fn describe(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exited with status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("was killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("ended (status {status:#x})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(200));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
