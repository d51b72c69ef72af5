//! `sluice run`: builds the kernel tables and sockets from the config, starts the workers and
//! the dispatcher, then runs the controller loop until SIGINT/SIGTERM.
//!
//! Data flows one way: config -> route table -> kernel maps and sockets -> workers.

use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use sluice_common::{DISPATCHER_SLOT, MODE_FIRST_SEGMENT, MODE_SYN, POOL_FLAG_STOPPED, PoolSlots, counter};

use crate::{
    activation::{Event, PoolLaunch, Supervisor},
    admin::AdminSocket,
    config::{Config, Steering as Mode},
    dispatcher::{self, DispatchStats, Dispatcher, PoolFlags, PoolQueues, head::Limits},
    metrics,
    route::RouteTable,
    sockets::{self, DISPATCHER_BACKLOG, HandoffPair},
    status::{DispatcherStatus, KernelStatus, PoolStatus, Status, WorkerStatus},
    steering::{self, Steering},
    sysctl,
};

/// How often the controller looks at queues and workers while a pool runs, and otherwise.
const TICK_BUSY: Duration = Duration::from_millis(50);
const TICK_IDLE: Duration = Duration::from_millis(500);
/// HTTP.sys's header wait timeout.
const HEADER_TIMEOUT: Duration = Duration::from_secs(120);

struct PoolSockets {
    /// One per (listen address, socket index).
    listeners: Vec<OwnedFd>,
    handoff: HandoffPair,
}

pub fn run(config: Config) -> Result<()> {
    let signals = Signals::block()?;
    let mut restore = sysctl::Restore::default();
    match config.steering {
        Mode::FirstSegment => {
            restore.require("net.ipv4.tcp_syncookies", "2", config.set_sysctls)?;
        }
        Mode::Syn => {
            let tfo = sysctl::read("net.ipv4.tcp_fastopen").ok().and_then(|v| v.parse::<u32>().ok()).unwrap_or(0);
            if tfo & 0x2 == 0 {
                log::warn!(
                    "net.ipv4.tcp_fastopen={tfo:#x} has no server bit (0x2): no SYN carries data, so every \
                     connection goes through the dispatcher"
                );
            }
        }
    }

    let mut steering = Steering::load(config.listen.len()).context("loading the steering programs")?;
    steering.set_mode(match config.steering {
        Mode::Syn => MODE_SYN,
        Mode::FirstSegment => MODE_FIRST_SEGMENT,
    })?;

    // Per listen address: the dispatcher socket, then every pool's sockets, in slot order.
    let mut dispatch_sockets = Vec::new();
    let mut pools: Vec<PoolSockets> = Vec::new();
    for pool in &config.pools {
        pools.push(PoolSockets { listeners: Vec::new(), handoff: sockets::handoff_pair()? });
        let _ = pool;
    }
    for (g, &addr) in config.listen.iter().enumerate() {
        let d = sockets::listener(addr, DISPATCHER_BACKLOG)?;
        steering.set_socket(g, DISPATCHER_SLOT, &d)?;
        steering.attach(g, &d)?;
        dispatch_sockets.push(d);
        let mut slot = DISPATCHER_SLOT + 1;
        for (p, pool) in config.pools.iter().enumerate() {
            for _ in 0..pool.sockets {
                let fd = sockets::listener(addr, pool.queue_length as i32)?;
                steering.set_socket(g, slot, &fd)?;
                pools[p].listeners.push(fd);
                slot += 1;
            }
        }
    }
    let mut slot = DISPATCHER_SLOT + 1;
    let mut slots = Vec::new();
    for (p, pool) in config.pools.iter().enumerate() {
        slots.push(PoolSlots { first: slot, count: pool.sockets, flags: 0, _pad: 0 });
        steering.set_pool(p as u32, slots[p])?;
        slot += pool.sockets;
    }
    for r in &config.routes {
        steering.set_route(&r.prefix, r.pool as u32)?;
    }
    if config.steering == Mode::FirstSegment {
        let ifaces = steering::interfaces_for(&config.listen)?;
        let mut ports: Vec<u16> = config.listen.iter().map(|a| a.port()).collect();
        ports.sort_unstable();
        ports.dedup();
        steering.attach_gate(&ifaces, &ports)?;
    }
    for p in config.unrouted_pools() {
        log::warn!("pool {p} has no route: it gets no requests");
    }

    let launches = config
        .pools
        .iter()
        .zip(&pools)
        .map(|(pool, s)| {
            let mut fds: Vec<(RawFd, String)> =
                s.listeners.iter().map(|fd| (fd.as_raw_fd(), "pool".to_owned())).collect();
            fds.push((s.handoff.workers.as_raw_fd(), "handoff".to_owned()));
            let mut demand: Vec<RawFd> = s.listeners.iter().map(|fd| fd.as_raw_fd()).collect();
            demand.push(s.handoff.workers.as_raw_fd());
            PoolLaunch {
                name: pool.name.clone(),
                program: pool.program.clone(),
                args: pool.args.clone(),
                processes: pool.processes,
                threads: pool.threads,
                activation: pool.activation.clone(),
                fds,
                demand,
            }
        })
        .collect();
    let mut supervisor = Supervisor::new(launches).context("preparing worker processes")?;

    let stats = Arc::new(DispatchStats::new(config.pools.len()));
    let flags = Arc::new(PoolFlags::new(config.pools.len()));
    let stop = eventfd()?;
    let wake = eventfd()?;
    let dispatcher = Dispatcher {
        listeners: dispatch_sockets.iter().map(|fd| fd.as_raw_fd()).collect(),
        handoff: pools.iter().map(|p| p.handoff.frontend.as_raw_fd()).collect(),
        routes: RouteTable::new(config.routes.iter().map(|r| (r.prefix.clone(), r.pool))),
        limits: Limits::default(),
        header_timeout: HEADER_TIMEOUT,
        stats: stats.clone(),
        stop: stop.as_raw_fd(),
        flags: flags.clone(),
        queues: pools
            .iter()
            .map(|p| PoolQueues {
                listeners: p.listeners.iter().map(|fd| fd.as_raw_fd()).collect(),
                handoff: p.handoff.workers.as_raw_fd(),
            })
            .collect(),
        wake: wake.as_raw_fd(),
    };
    let dispatch_thread = std::thread::Builder::new()
        .name("dispatcher".into())
        .spawn(move || dispatcher::run(dispatcher))
        .context("starting the dispatcher thread")?;

    let admin = AdminSocket::bind(&config.admin_socket)?;
    if let Some(addr) = config.metrics {
        metrics::serve(addr, config.admin_socket.clone())?;
        log::info!("Prometheus metrics on http://{addr}/metrics");
    }
    log::info!(
        "sluice serving {} ({}) with {} pool(s), steering {} (admin socket {})",
        config.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "),
        config.path.display(),
        config.pools.len(),
        config.steering.as_str(),
        config.admin_socket.display()
    );

    let mut kernel_flags = vec![0u32; config.pools.len()];
    let mut apply = |steering: &mut Steering, pool: usize, flag: u32, on: bool| -> Result<()> {
        if flags.set(pool, flag, on) {
            // Either flag sends the pool's new connections to the dispatcher.
            let kernel = if flags.get(pool) != 0 { POOL_FLAG_STOPPED } else { 0 };
            if kernel != kernel_flags[pool] {
                kernel_flags[pool] = kernel;
                steering.set_pool(pool as u32, PoolSlots { flags: kernel, ..slots[pool] })?;
            }
            if flag == PoolFlags::STOPPED {
                // SAFETY: writes 8 bytes to our eventfd.
                unsafe { libc::write(wake.as_raw_fd(), (&1u64 as *const u64).cast(), 8) };
            }
        }
        Ok(())
    };

    loop {
        let watched = supervisor.watched();
        let mut fds = vec![
            libc::pollfd { fd: signals.fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: admin.fd(), events: libc::POLLIN, revents: 0 },
        ];
        fds.extend(watched.iter().map(|&(fd, _, _)| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }));
        let wait = if supervisor.busy() { TICK_BUSY } else { TICK_IDLE };
        // SAFETY: poll(2) over a live array of pollfds.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as u64, wait.as_millis() as i32) };
        let mut quit = false;
        for sig in signals.read() {
            match sig {
                libc::SIGINT | libc::SIGTERM => quit = true,
                libc::SIGHUP => log::warn!("SIGHUP: configuration reload is not supported yet"),
                _ => {}
            }
        }
        if quit {
            break;
        }
        let now2 = Instant::now();
        for (pfd, &(_, pool, pid)) in fds[2..].iter().zip(&watched) {
            if pfd.revents != 0 {
                supervisor.readable(pool, pid, now2);
            }
        }
        let mut events = supervisor.reap(now2);
        let counters = steering.counters().unwrap_or_default();
        let activity: Vec<u64> = (0..config.pools.len())
            .map(|i| counters.steered(i) + stats.handed_off.get(i).map(|n| n.load(Relaxed)).unwrap_or(0))
            .collect();
        let queued: Vec<u64> = pools.iter().map(|p| queued(p)).collect();
        events.extend(supervisor.tick(now2, &activity, &queued));
        for e in events {
            match e {
                Event::Stopped(i) => apply(&mut steering, i, PoolFlags::STOPPED, true)?,
                Event::Restarted(i) => apply(&mut steering, i, PoolFlags::STOPPED, false)?,
            }
        }
        // Queue full (HTTP.sys QueueFull): new connections get 503 from the dispatcher until
        // the workers catch up.
        for (i, (q, pool)) in queued.iter().zip(&config.pools).enumerate() {
            let full = pools[i].listeners.iter().any(|fd| sockets::queued(fd.as_raw_fd()).unwrap_or(0) >= pool.queue_length);
            if full != (flags.get(i) & PoolFlags::FULL != 0) {
                if full {
                    log::warn!("pool {}: queue full ({q} waiting); answering 503 until it drains", pool.name);
                } else {
                    log::info!("pool {}: queue drained ({q} waiting)", pool.name);
                }
                apply(&mut steering, i, PoolFlags::FULL, full)?;
            }
        }
        if fds[1].revents & libc::POLLIN != 0 {
            admin.serve(|command| {
                let words: Vec<&str> = command.split_whitespace().collect();
                match words.as_slice() {
                    ["status"] => {
                        let s = status(&config, &pools, &steering, &supervisor, &stats);
                        serde_json::to_string(&s).unwrap_or_else(|e| format!("error: {e}"))
                    }
                    ["metrics"] => status(&config, &pools, &steering, &supervisor, &stats).prometheus(),
                    ["pool", "start", name] => match supervisor.start(name, Instant::now()) {
                        Ok(events) => {
                            for e in events {
                                if let Event::Restarted(i) = e {
                                    if let Err(err) = apply(&mut steering, i, PoolFlags::STOPPED, false) {
                                        return format!("error: {err:#}");
                                    }
                                }
                            }
                            format!("pool {name} started")
                        }
                        Err(e) => format!("error: {e}"),
                    },
                    ["pool", "recycle", name] => match supervisor.recycle(name) {
                        Ok(n) => format!("pool {name}: recycling {n} worker(s)"),
                        Err(e) => format!("error: {e}"),
                    },
                    _ => format!("error: unknown command `{command}` (known: status, metrics, pool start NAME, pool recycle NAME)"),
                }
            });
        }
    }

    log::info!("stopping: workers first, then the dispatcher");
    supervisor.stop_all();
    // SAFETY: writes 8 bytes to our eventfd.
    unsafe { libc::write(stop.as_raw_fd(), (&1u64 as *const u64).cast(), 8) };
    match dispatch_thread.join() {
        Ok(Err(e)) => log::error!("dispatcher: {e}"),
        Err(_) => log::error!("dispatcher thread panicked"),
        Ok(Ok(())) => {}
    }
    drop(admin);
    drop(dispatch_sockets);
    drop(pools);
    drop(steering);
    drop(restore);
    log::info!("stopped");
    Ok(())
}

fn eventfd() -> Result<OwnedFd> {
    // SAFETY: eventfd(2) returns a new fd that we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        bail!("eventfd: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn queued(p: &PoolSockets) -> u64 {
    p.listeners.iter().map(|fd| sockets::queued(fd.as_raw_fd()).unwrap_or(0) as u64).sum()
}

fn status(
    config: &Config,
    pools: &[PoolSockets],
    steering: &Steering,
    supervisor: &Supervisor,
    stats: &DispatchStats,
) -> Status {
    let counters = steering.counters().unwrap_or_else(|e| {
        log::warn!("reading steering counters: {e}");
        Default::default()
    });
    let info = supervisor.info(Instant::now());
    let pools = config
        .pools
        .iter()
        .enumerate()
        .map(|(i, p)| PoolStatus {
            name: p.name.clone(),
            state: info.get(i).map(|p| p.state.as_str()).unwrap_or("unknown").to_owned(),
            requests: info.get(i).map(|p| p.requests).unwrap_or(0),
            workers: info
                .get(i)
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
            queued: pools[i].listeners.iter().map(|fd| sockets::queued(fd.as_raw_fd()).unwrap_or(0) as u64).sum(),
            steered_kernel: counters.steered(i),
            handed_off: stats.handed_off.get(i).map(|n| n.load(Relaxed)).unwrap_or(0),
        })
        .collect();
    Status {
        steering: config.steering.as_str().to_owned(),
        listen: config.listen.iter().map(|a| a.to_string()).collect(),
        pools,
        fallbacks: counter::FALLBACKS.iter().map(|&(i, name)| (name.to_owned(), counters.get(i))).collect(),
        dispatcher: DispatcherStatus {
            accepted: stats.accepted.load(Relaxed),
            refused: stats.refused.iter().map(|(c, n)| (c.to_string(), n.load(Relaxed))).collect::<BTreeMap<_, _>>(),
            header_timeouts: stats.timeouts.load(Relaxed),
        },
        kernel: KernelStatus {
            program_runs: counters.get(counter::RUNS),
            syn_cookies: counters.get(counter::SYN_COOKIE),
            ack_gate_drops: counters.get(counter::ACK_GATE_DROPS),
        },
    }
}

/// SIGINT, SIGTERM, SIGHUP and SIGCHLD, blocked in every thread and read from a signalfd.
struct Signals {
    fd: OwnedFd,
}

impl Signals {
    fn block() -> Result<Signals> {
        // SAFETY: builds a signal set and blocks it for this thread (threads started later
        // inherit the mask); signalfd returns a new fd we own.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGCHLD] {
                libc::sigaddset(&mut set, s);
            }
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                bail!("blocking signals failed");
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                bail!("signalfd: {}", std::io::Error::last_os_error());
            }
            Ok(Signals { fd: OwnedFd::from_raw_fd(fd) })
        }
    }

    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn read(&self) -> Vec<i32> {
        let mut out = Vec::new();
        loop {
            // SAFETY: signalfd_siginfo is plain data; read(2) fills at most its size.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: reading into a live, correctly sized buffer.
            let n = unsafe { libc::read(self.fd(), (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
            if n as usize != size {
                return out;
            }
            out.push(info.ssi_signo as i32);
        }
    }
}
