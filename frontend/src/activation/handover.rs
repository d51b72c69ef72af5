//! What an upgrade carries of the supervisor: each worker (pid, channels, counts) and each
//! pool's count of requests by workers already gone, so that the next front-end program, in
//! the same process, adopts the workers without restarting them. They stay this process's
//! children across exec, so `waitpid` still reaps them.

use std::{
    os::fd::{AsRawFd, OwnedFd, RawFd},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{PoolState, Supervisor, Worker, output};
use crate::pool::PoolId;
use sluice_proto::outcomes::Outcomes;

/// One worker, as the next program gets it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerState {
    pub pool: String,
    pub pid: libc::pid_t,
    /// The front end's end of its control channel (sluice-worker workers).
    pub control: Option<RawFd>,
    /// A copy of the read end of its output pipe (socket workers).
    pub output: Option<RawFd>,
    /// How long it has run.
    pub age_ms: u64,
    pub ready: bool,
    pub requests: u64,
    pub restarts: u32,
    /// Asked to stop already: it finishes and exits.
    pub retiring: bool,
    /// How its answers went (`Outcomes::encode`).
    pub outcomes: String,
}

impl Supervisor {
    /// Every worker, and per pool (by name) the requests of workers gone and how they went.
    pub fn handover(&self, now: Instant) -> (Vec<WorkerState>, Vec<(String, u64, String)>) {
        let mut workers = Vec::new();
        let mut gone = Vec::new();
        for p in &self.pools {
            if p.state == PoolState::Removed {
                continue;
            }
            gone.push((p.name.clone(), p.requests_gone, p.outcomes_gone.encode()));
            workers.extend(p.workers.iter().map(|w| WorkerState {
                pool: p.name.clone(),
                pid: w.pid,
                control: w.control.as_ref().map(AsRawFd::as_raw_fd),
                output: w.output.as_ref().map(AsRawFd::as_raw_fd),
                age_ms: now.duration_since(w.started).as_millis() as u64,
                ready: w.ready,
                requests: w.requests,
                restarts: w.restarts,
                retiring: w.retiring.is_some(),
                outcomes: w.outcomes.encode(),
            }));
        }
        (workers, gone)
    }

    /// Takes over a worker the earlier program started, with its channels (already this
    /// process's own fds): it is told the routes and cached keys again and pinged as usual.
    pub fn adopt(
        &mut self,
        pool: PoolId,
        w: &WorkerState,
        control: Option<OwnedFd>,
        out: Option<OwnedFd>,
        now: Instant,
    ) {
        let Some(p) = self.pools.get_mut(pool.index()) else {
            return;
        };
        for m in &self.greeting {
            if let Some(c) = &control {
                let _ = super::control::send(c.as_raw_fd(), m);
            }
        }
        let output = out.and_then(|o| {
            let copy = o.try_clone().ok();
            output::forward(p.name.clone(), w.pid, o);
            copy
        });
        let started = now
            .checked_sub(Duration::from_millis(w.age_ms))
            .unwrap_or(now);
        if !w.retiring && p.state == PoolState::Idle {
            p.state = PoolState::Running;
        }
        p.workers.push(Worker {
            pid: w.pid,
            control,
            started,
            ready: w.ready,
            requests: w.requests,
            rss_kib: 0,
            last_pong: now,
            ping: None,
            retiring: w.retiring.then_some(now),
            recycle: false,
            restarts: w.restarts,
            output,
            outcomes: Outcomes::parse(&w.outcomes).unwrap_or_default(),
        });
        log::info!("pool {}: adopted worker {}", p.name, w.pid);
    }

    /// The requests of pool `pool`'s workers that were gone before an upgrade, and how they
    /// went.
    pub fn adopt_requests_gone(&mut self, pool: PoolId, n: u64, outcomes: &str) {
        if let Some(p) = self.pools.get_mut(pool.index()) {
            p.requests_gone += n;
            p.outcomes_gone
                .add(&Outcomes::parse(outcomes).unwrap_or_default());
        }
    }
}
