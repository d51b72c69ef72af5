//! Process activation, the job WAS does for IIS: start each pool's worker processes with the
//! pool's sockets, replace a worker that exits (with back-off, so a crash loop does not spin),
//! and stop them all on shutdown. The pool sockets stay open in the front end throughout, so
//! connections queued while a worker is down wait for its replacement.

mod spawn;

use std::{
    io,
    os::fd::RawFd,
    path::PathBuf,
    time::{Duration, Instant},
};

pub use spawn::Launch;

/// A worker that lived this long before exiting is not counted as crashing.
const HEALTHY_UPTIME: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// One pool's processes.
pub struct PoolWorkers {
    pub name: String,
    launch: Launch,
    slots: Vec<Slot>,
}

#[derive(Debug, Clone)]
struct Slot {
    pid: Option<libc::pid_t>,
    started: Instant,
    restarts: u32,
    /// Exits in a row that came sooner than HEALTHY_UPTIME after a start.
    quick_exits: u32,
    next_start: Option<Instant>,
}

/// What status reports about a worker.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub pid: libc::pid_t,
    pub uptime: Duration,
    pub restarts: u32,
}

/// What a pool is started with.
pub struct PoolLaunch {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub processes: u32,
    pub threads: Option<u32>,
    /// (fd, LISTEN_FDNAMES name)
    pub fds: Vec<(RawFd, String)>,
}

pub struct Supervisor {
    pools: Vec<PoolWorkers>,
}

fn backoff(quick_exits: u32) -> Duration {
    match quick_exits {
        0 | 1 => Duration::ZERO,
        n => Duration::from_millis(100u64 << (n - 2).min(7)).min(MAX_BACKOFF),
    }
}

impl Supervisor {
    pub fn new(pools: Vec<PoolLaunch>) -> io::Result<Supervisor> {
        let now = Instant::now();
        let pools = pools
            .into_iter()
            .map(|p| {
                let (fds, names): (Vec<RawFd>, Vec<String>) = p.fds.into_iter().unzip();
                let mut env = vec![("SLUICE_POOL".to_owned(), p.name.clone())];
                if let Some(t) = p.threads {
                    env.push(("SLUICE_THREADS".to_owned(), t.to_string()));
                }
                let launch = Launch::new(&p.program, &p.args, fds, &names, &env)?;
                let slot = Slot { pid: None, started: now, restarts: 0, quick_exits: 0, next_start: Some(now) };
                Ok(PoolWorkers { name: p.name, launch, slots: vec![slot; p.processes as usize] })
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Supervisor { pools })
    }

    /// Starts every worker that is due.
    pub fn start_due(&mut self, now: Instant) {
        for pool in &mut self.pools {
            for slot in &mut pool.slots {
                if slot.pid.is_some() || slot.next_start.is_none_or(|t| t > now) {
                    continue;
                }
                match pool.launch.spawn() {
                    Ok(pid) => {
                        log::info!("pool {}: started worker {pid}", pool.name);
                        slot.pid = Some(pid);
                        slot.started = now;
                        slot.next_start = None;
                    }
                    Err(e) => {
                        slot.quick_exits += 1;
                        let wait = backoff(slot.quick_exits).max(Duration::from_millis(500));
                        log::error!("pool {}: cannot start worker: {e}; retrying in {wait:?}", pool.name);
                        slot.next_start = Some(now + wait);
                    }
                }
            }
        }
    }

    /// The earliest pending start, to bound the controller's wait.
    pub fn next_start(&self) -> Option<Instant> {
        self.pools.iter().flat_map(|p| &p.slots).filter(|s| s.pid.is_none()).filter_map(|s| s.next_start).min()
    }

    /// Collects exited workers and schedules their replacements.
    pub fn reap(&mut self, now: Instant) {
        loop {
            let mut status = 0;
            // SAFETY: waitpid on any child, non-blocking.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            self.exited(pid, status, now);
        }
    }

    fn exited(&mut self, pid: libc::pid_t, status: i32, now: Instant) {
        for pool in &mut self.pools {
            for slot in &mut pool.slots {
                if slot.pid != Some(pid) {
                    continue;
                }
                slot.pid = None;
                let lived = now.duration_since(slot.started);
                slot.quick_exits = if lived < HEALTHY_UPTIME { slot.quick_exits + 1 } else { 1 };
                let wait = backoff(slot.quick_exits);
                slot.restarts += 1;
                slot.next_start = Some(now + wait);
                log::warn!(
                    "pool {}: worker {pid} {} after {:.1}s; restarting in {wait:?}",
                    pool.name,
                    describe(status),
                    lived.as_secs_f64()
                );
                return;
            }
        }
    }

    /// Stops every worker: SIGTERM, then SIGKILL after `limit`.
    pub fn stop_all(&mut self, limit: Duration) {
        let pids: Vec<libc::pid_t> = self.pools.iter().flat_map(|p| &p.slots).filter_map(|s| s.pid).collect();
        for pool in &mut self.pools {
            for slot in &mut pool.slots {
                slot.next_start = None;
            }
        }
        for &pid in &pids {
            // SAFETY: signalling a child we started and have not reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + limit;
        let mut left: Vec<libc::pid_t> = pids;
        while !left.is_empty() {
            left.retain(|&pid| {
                let mut status = 0;
                // SAFETY: non-blocking wait for our own child.
                unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) == 0 }
            });
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                for &pid in &left {
                    log::warn!("worker {pid} did not stop within {limit:?}; killing it");
                    // SAFETY: our unreaped child.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                        libc::waitpid(pid, std::ptr::null_mut(), 0);
                    }
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for pool in &mut self.pools {
            for slot in &mut pool.slots {
                slot.pid = None;
            }
        }
    }

    /// Per pool, in config order: its running workers.
    pub fn workers(&self, now: Instant) -> Vec<Vec<WorkerInfo>> {
        self.pools
            .iter()
            .map(|p| {
                p.slots
                    .iter()
                    .filter_map(|s| {
                        s.pid.map(|pid| WorkerInfo { pid, uptime: now.duration_since(s.started), restarts: s.restarts })
                    })
                    .collect()
            })
            .collect()
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
