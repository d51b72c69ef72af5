//! `sluice run`: builds the kernel tables and sockets from the config, starts the workers and
//! the dispatcher, then runs the controller loop until SIGINT/SIGTERM. SIGHUP (or
//! `sluice reload`) applies a changed config without dropping anything (see `reload`).
//!
//! Data flows one way: config -> route table -> kernel maps and sockets -> workers.

mod cache;
mod guard;
mod handover;
mod notify;
mod pools;
mod reload;
mod signals;
mod status;
mod upgrade;

use std::{
    os::fd::{AsRawFd, OwnedFd},
    sync::{Arc, atomic::Ordering::Relaxed},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use sluice_common::{DISPATCHER_SLOT, MAX_POOLS, MODE_FIRST_SEGMENT, MODE_SYN};

use self::{guard::Guard, pools::PoolRt, signals::Signals};
use crate::access_log::AccessLog;
use crate::{
    activation::{Event, Supervisor, control::ToWorker},
    admin::AdminSocket,
    config::{Config, Steering as Mode},
    dispatcher::{self, DispatchStats, Dispatcher, PoolFlags, SharedTable},
    metrics,
    pool::PoolId,
    sockets::{self, DISPATCHER_BACKLOG},
    steering::{self, Steering},
    sysctl,
};
use sluice_proto::control::RouteEntry;
use sluice_proto::site::Site;

/// How often the controller looks at queues and workers while a pool runs, and otherwise.
const TICK_BUSY: Duration = Duration::from_millis(50);
const TICK_IDLE: Duration = Duration::from_millis(500);

/// Everything a running front end holds.
struct Frontend {
    config: Config,
    steering: Steering,
    /// One per listen address: the dispatcher's own socket in that group.
    dispatch_sockets: Vec<OwnedFd>,
    /// By pool id (stable across reloads; ids are not reused).
    pools: Vec<PoolRt>,
    /// Next free slot in every group's socket array.
    next_slot: u32,
    supervisor: Supervisor,
    stats: Arc<DispatchStats>,
    flags: Arc<PoolFlags>,
    table: Arc<SharedTable>,
    cache: Arc<std::sync::Mutex<crate::cache::Cache>>,
    /// The `routes` control message every worker gets.
    routes_message: ToWorker,
    stop: OwnedFd,
    wake: OwnedFd,
    dispatch_thread: Option<JoinHandle<std::io::Result<Vec<dispatcher::Held>>>>,
    /// Watches the listen addresses for listeners that are not ours.
    guard: Guard,
    /// The workers' copy of the routes or the cached keys is behind: greet them at the end
    /// of this step.
    greeting_due: bool,
    /// Where lines go when `[server] access_log` is set.
    access_log: Option<AccessLog>,
    /// systemd's notify socket, under a `Type=notify` unit.
    notify: Option<notify::Notifier>,
    /// Joins dispatcher-routed connections to socket pools.
    relay: crate::relay::Relay,
    /// Keeps shared hosts' connections and delivers their requests.
    pub(crate) delivery: crate::delivery::Delivery,
    /// Sockets systemd's fd store handed back, until the start has taken them.
    inherited: crate::fdstore::Inherited,
    /// How many sockets the start took from systemd's fd store.
    inherited_sockets: usize,
    /// The binary at this program's path (`sluice upgrade` runs what is there then).
    exe: std::path::PathBuf,
    /// This program, kept open to go back to if an upgrade's program cannot start.
    image: Option<OwnedFd>,
    /// Upgrades this process has been through, and why the last one failed (if it did).
    upgrades: u64,
    upgrade_error: Option<String>,
    /// An upgrade was asked for and passed its checks: done after this step.
    upgrade_due: bool,
    /// The TLS listeners, each in slot 0 of its group; the TLS thread accepts on them.
    tls_sockets: Vec<OwnedFd>,
    /// HTTPS: its listeners and the thread that serves them (none without `listen_tls`).
    tls: Option<TlsRt>,
    /// The front end's connections into socket pools' queues (the TLS thread's too).
    direct: Option<Arc<crate::direct::Direct>>,
    /// Restores changed sysctls on drop (last).
    restore: sysctl::Restore,
}

/// The running HTTPS side.
struct TlsRt {
    /// The handshakes' configuration; a reload replaces it.
    config: Arc<std::sync::Mutex<Arc<rustls::ServerConfig>>>,
    secrets: Arc<crate::tls::Secrets>,
    stats: Arc<crate::tls::TlsStats>,
    inbox: Option<crate::tls::Inbox>,
    thread: Option<crate::tls::Running>,
}

/// `sluice run CONFIG`; in the next program of an upgrade, takes over from the earlier one
/// (and goes back to it if it cannot).
pub fn run_path(path: &std::path::Path) -> Result<()> {
    let incoming = upgrade::Incoming::from_env()?;
    match Config::load(path) {
        Ok(config) => run(config, incoming),
        Err(e) => Err(cannot_take_over(incoming, e.into())),
    }
}

/// A start that failed: with an upgrade's state, the earlier program runs again (and this
/// returns only if it cannot).
fn cannot_take_over(incoming: Option<upgrade::Incoming>, e: anyhow::Error) -> anyhow::Error {
    match incoming {
        Some(i) => {
            let back = i.go_back(&e);
            e.context(back)
        }
        None => e,
    }
}

fn run(config: Config, incoming: Option<upgrade::Incoming>) -> Result<()> {
    // Before any thread starts: these fds are ours alone from here on.
    let inherited = match &incoming {
        Some(i) => i.sockets(),
        None => Ok(crate::fdstore::Inherited::from_env()),
    };
    let started = inherited.and_then(|inherited| {
        let signals = Signals::block()?;
        // Taken before the start, whose last step runs the dispatcher: nothing after that
        // may fail and go back with connections the dispatcher has touched.
        let taken = match incoming.as_ref().and_then(|i| i.state.admin) {
            Some(fd) => Some(AdminSocket::from_fd(
                upgrade::Incoming::take(fd)?,
                &config.admin_socket,
            )?),
            None => None,
        };
        let fe = Frontend::start(config, inherited, incoming.as_ref())?;
        let admin = match taken {
            Some(a) => a,
            None => AdminSocket::bind(&fe.config.admin_socket)?,
        };
        Ok((signals, fe, admin))
    });
    let (signals, mut fe, admin) = match started {
        Ok(s) => s,
        Err(e) => return Err(cannot_take_over(incoming, e)),
    };
    let upgraded = incoming.is_some();
    if let Some(i) = incoming {
        match &i.failed {
            Some(why) => log::error!("the upgrade failed, this program serves on: {why}"),
            None => log::info!(
                "upgraded: this program took over every socket, {} connection(s) the dispatcher held and {} worker(s)",
                i.state.held.len(),
                i.state.workers.len()
            ),
        }
        i.done();
    }
    if fe.inherited_sockets > 0 && !upgraded {
        log::info!(
            "took {} socket(s) from systemd's fd store: what waited in them is served",
            fe.inherited_sockets
        );
    }
    fe.store_sockets();
    if let Some(addr) = fe.config.metrics {
        metrics::serve(addr, fe.config.admin_socket.clone())?;
        log::info!("Prometheus metrics on http://{addr}/metrics");
    }
    log::info!(
        "sluice {} ({}, admin socket {})",
        fe.summary(),
        fe.config.path.display(),
        fe.config.admin_socket.display()
    );
    if let Some(n) = &fe.notify {
        n.ready(&fe.summary());
    }

    loop {
        let watched = fe.supervisor.watched();
        let mut fds = vec![
            libc::pollfd {
                fd: signals.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: admin.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        fds.extend(watched.iter().map(|&(fd, _, _)| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }));
        let wait = if fe.supervisor.busy() || fe.pools.iter().any(|p| p.removed.is_some()) {
            TICK_BUSY
        } else {
            TICK_IDLE
        };
        // Wake when the next cache entry expires: the kernel and the workers forget it then,
        // not a tick later.
        let next_expiry = fe.lock_cache().next_expiry();
        let wait = next_expiry.map_or(wait, |t| {
            wait.min(t.saturating_duration_since(Instant::now()) + Duration::from_millis(1))
        });
        // SAFETY: poll(2) over a live array of pollfds.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as u64, wait.as_millis() as i32) };
        let mut quit = false;
        for sig in signals.read() {
            match sig {
                libc::SIGINT | libc::SIGTERM => quit = true,
                libc::SIGHUP => {
                    if let Err(e) = fe.reload() {
                        log::error!("reload refused, the running configuration stays: {e:#}");
                    }
                }
                libc::SIGUSR1 => {
                    if let Some(log) = &fe.access_log {
                        log.reopen();
                    }
                }
                libc::SIGUSR2 => match fe.prepare_upgrade() {
                    Ok(()) => fe.upgrade_due = true,
                    Err(e) => fe.upgrade_refused(&e),
                },
                _ => {}
            }
        }
        if quit {
            break;
        }
        let now = Instant::now();
        for (pfd, &(_, pool, pid)) in fds[2..].iter().zip(&watched) {
            if pfd.revents != 0 {
                for published in fe.supervisor.readable(pool, pid, now) {
                    fe.publish(published, now);
                }
            }
        }
        fe.step(now)?;
        if fds[1].revents & libc::POLLIN != 0 {
            admin.serve(|command| fe.command(command));
        }
        if std::mem::take(&mut fe.upgrade_due) {
            // Returns only when the upgrade could not happen; this program serves on.
            if let Err(e) = fe.upgrade(&admin) {
                fe.upgrade_refused(&e);
            }
        }
    }
    drop(admin);
    fe.shutdown();
    Ok(())
}

impl Frontend {
    fn start(
        config: Config,
        mut inherited: crate::fdstore::Inherited,
        incoming: Option<&upgrade::Incoming>,
    ) -> Result<Frontend> {
        // A dispatcher or TLS socket systemd (or an upgrade) kept for us is this front
        // end's own group.
        let kept_dispatch = kept_or_free(&mut inherited, crate::fdstore::DISPATCH, &config.listen)?;
        let kept_tls = kept_or_free(&mut inherited, crate::fdstore::TLS, &config.tls.listen)?;
        for w in config.warnings() {
            log::warn!("{w}");
        }
        let mut restore = sysctl::Restore::default();
        if let Some(i) = incoming {
            restore.adopt(i.state.sysctls.clone());
        }
        match config.steering {
            Mode::FirstSegment => {
                restore.require("net.ipv4.tcp_syncookies", "2", config.set_sysctls)?
            }
            Mode::Syn => {
                let tfo = sysctl::read("net.ipv4.tcp_fastopen")
                    .ok()
                    .and_then(|v| v.parse::<u32>().ok())
                    .unwrap_or(0);
                if tfo & 0x2 == 0 {
                    log::warn!(
                        "net.ipv4.tcp_fastopen={tfo:#x} has no server bit (0x2): no SYN carries data, so every \
                         connection goes through the dispatcher"
                    );
                }
            }
        }
        let mut steering = Steering::load(config.listen.len(), config.tls.listen.len())
            .context("loading the steering programs")?;
        steering.set_mode(match config.steering {
            Mode::Syn => MODE_SYN,
            Mode::FirstSegment => MODE_FIRST_SEGMENT,
        })?;
        // Per listen address: the dispatcher socket first, with the program attached.
        let dispatch_sockets = (config.listen.iter().zip(kept_dispatch).enumerate())
            .map(|(g, (&addr, kept))| group_listener(&mut steering, g, addr, kept))
            .collect::<Result<Vec<_>>>()?;
        // Per TLS listen address: the TLS thread's socket in slot 0 of its group, whose
        // program steers passthrough pools' names by SNI.
        let tls_sockets = (config.tls.listen.iter().zip(kept_tls).enumerate())
            .map(|(i, (&addr, kept))| {
                let g = steering.tls_group(i);
                group_listener(&mut steering, g, addr, kept)
            })
            .collect::<Result<Vec<_>>>()?;
        let stats = Arc::new(DispatchStats::new(MAX_POOLS as usize));
        let flags = Arc::new(PoolFlags::new(MAX_POOLS as usize));
        let stop = eventfd()?;
        let wake = eventfd()?;
        let table = Arc::new(SharedTable::new(Default::default()));
        let cache = Arc::new(std::sync::Mutex::new(crate::cache::Cache::new(
            &config.cache,
        )));
        let access_log = match &config.access_log {
            None => None,
            Some(c) => Some(AccessLog::start(c).with_context(|| {
                format!(
                    "opening the access log {}",
                    c.file
                        .as_deref()
                        .map_or("(standard error)".into(), |p| p.display().to_string())
                )
            })?),
        };
        let mut supervisor = Supervisor::new(Vec::new())?;
        supervisor.set_access_log(access_log.clone());
        // The front end's own connections into pool queues: relays to socket pools and
        // their probes, all through group 0.
        let direct = crate::direct::Direct::new(
            steering.take_direct()?,
            *config
                .listen
                .first()
                .context("the config has no listen address")?,
        );
        supervisor.set_prober(crate::activation::probe::Prober::new(direct.clone()));
        let relay =
            crate::relay::Relay::spawn(direct.clone()).context("starting the relay thread")?;
        if config.has_socket_pools() {
            steering.enable_direct()?;
        }
        let delivery =
            crate::delivery::Delivery::spawn(config.threads, |stats| crate::delivery::Shared {
                table: table.clone(),
                flags: flags.clone(),
                cache: cache.clone(),
                limits: config.limits.head_limits(),
                header_timeout: config.limits.header_timeout,
                idle_timeout: config.limits.idle_timeout,
                direct: config.has_socket_pools().then(|| direct.clone()),
                access_log: access_log.clone(),
                stats,
            })
            .context("starting the delivery loops")?;
        let mut fe = Frontend {
            config: config.clone(),
            steering,
            dispatch_sockets,
            pools: Vec::new(),
            next_slot: DISPATCHER_SLOT + 1,
            supervisor,
            access_log: access_log.clone(),
            notify: notify::Notifier::from_env(),
            stats,
            flags,
            table,
            cache,
            routes_message: ToWorker::Routes(Vec::new()),
            stop,
            wake,
            dispatch_thread: None,
            guard: Guard::new(&config.listen),
            greeting_due: false,
            relay: relay.clone(),
            delivery,
            inherited,
            inherited_sockets: 0,
            exe: upgrade::own_path().context("finding this program's path")?,
            image: upgrade::own_image(),
            upgrades: incoming.map_or(0, |i| i.state.upgrades + u64::from(i.failed.is_none())),
            upgrade_error: incoming.and_then(|i| i.failed.clone()),
            upgrade_due: false,
            tls: None,
            tls_sockets,
            direct: config.has_socket_pools().then_some(direct),
            restore,
        };
        let ids: Vec<Option<PoolId>> = config
            .pools
            .iter()
            .map(|p| fe.add_pool(p).map(Some))
            .collect::<Result<_>>()?;
        fe.inherited_sockets = fe.inherited.taken();
        fe.inherited.close_rest();
        fe.load_statics()?;
        fe.install_routes(&config, &ids)?;
        if config.steering == Mode::FirstSegment {
            let ifaces = steering::interfaces_for(&config.listen)?;
            let mut ports: Vec<u16> = (config.listen.iter().chain(&config.tls.listen))
                .map(|a| a.port())
                .collect();
            ports.sort_unstable();
            ports.dedup();
            fe.steering.attach_gate(&ifaces, &ports)?;
        }
        for p in config.unrouted_pools() {
            log::warn!("pool {p} has no route: it gets no requests");
        }
        if let Some(i) = incoming {
            fe.adopt(i)?;
        }
        // Every fd taken before either thread starts: once the TLS thread has served a
        // carried session, going back to the earlier program would serve it twice.
        let carried = incoming.map(upgrade::Incoming::tls).transpose()?;
        let held = incoming.map(upgrade::Incoming::held).transpose()?;
        let earlier = incoming.and_then(|i| i.state.counts.tls.as_ref());
        fe.start_tls(carried.unwrap_or_default(), earlier)?;
        fe.spawn_dispatcher(held.unwrap_or_default())?;
        Ok(fe)
    }

    /// Starts the dispatcher thread, first taking up `held` (connections from before an
    /// upgrade, or from an upgrade that could not happen).
    fn spawn_dispatcher(&mut self, held: Vec<dispatcher::Held>) -> Result<()> {
        let config = &self.config;
        let dispatcher = Dispatcher {
            listeners: self
                .dispatch_sockets
                .iter()
                .map(|fd| fd.as_raw_fd())
                .collect(),
            table: self.table.clone(),
            limits: config.limits.head_limits(),
            header_timeout: config.limits.header_timeout,
            max_pending: config.limits.max_pending,
            stats: self.stats.clone(),
            stop: self.stop.as_raw_fd(),
            flags: self.flags.clone(),
            wake: self.wake.as_raw_fd(),
            cache: self.cache.clone(),
            idle_timeout: config.limits.idle_timeout,
            access_log: self.access_log.clone(),
            relay: Some(self.relay.clone()),
            delivery: Some(self.delivery.clone()),
            tls: self.tls.as_ref().and_then(|t| t.inbox.clone()),
            initial: held,
        };
        self.dispatch_thread = Some(
            std::thread::Builder::new()
                .name("dispatcher".into())
                .spawn(move || dispatcher::run(dispatcher))
                .context("starting the dispatcher thread")?,
        );
        Ok(())
    }

    /// Starts the TLS thread on the `listen_tls` sockets (nothing without them), taking up
    /// what an earlier program carried and going on from its figures.
    fn start_tls(
        &mut self,
        carried: crate::tls::Carried,
        earlier: Option<&crate::status::TlsStatus>,
    ) -> Result<()> {
        let config = &self.config;
        if config.tls.listen.is_empty() {
            return Ok(());
        }
        let secrets = Arc::new(crate::tls::Secrets::default());
        let server_config = tls_server_config(config, secrets.clone())?;
        let stats = Arc::new(crate::tls::TlsStats::default());
        if let Some(t) = earlier {
            stats.restore(t);
        }
        let shared = Arc::new(std::sync::Mutex::new(server_config));
        let front = crate::tls::TlsFront {
            listeners: self.tls_sockets.iter().map(|s| s.as_raw_fd()).collect(),
            config: shared.clone(),
            secrets: secrets.clone(),
            table: self.table.clone(),
            flags: self.flags.clone(),
            cache: self.cache.clone(),
            limits: config.limits.head_limits(),
            header_timeout: config.limits.header_timeout,
            idle_timeout: config.limits.idle_timeout,
            stats: stats.clone(),
            direct: self.direct.clone(),
            relay: Some(self.relay.clone()),
            delivery: Some(self.delivery.clone()),
            access_log: self.access_log.clone(),
            // Each loop is given its own.
            stop: -1,
        };
        let (inbox, thread) =
            crate::tls::spawn(front, carried, config.threads).context("starting the TLS loops")?;
        self.tls = Some(TlsRt {
            config: shared,
            secrets,
            stats,
            inbox: Some(inbox),
            thread: Some(thread),
        });
        Ok(())
    }

    /// The id of the live pool called `name`.
    fn id_of(&self, name: &str) -> Option<PoolId> {
        self.pools
            .iter()
            .position(|r| r.name == name && r.removed.is_none())
            .map(PoolId::new)
    }

    /// The pool ids of `config`'s pools, in its order (after `add_pool`/reload made them);
    /// None for a pool that has none (never, once they are added).
    fn ids_of(&self, config: &Config) -> Vec<Option<PoolId>> {
        config.pools.iter().map(|p| self.id_of(&p.name)).collect()
    }

    /// Routes of `config` (pool indexes mapped to ids by `ids`) into the kernel and the
    /// dispatcher, each switched at once.
    fn install_routes(&mut self, config: &Config, ids: &[Option<PoolId>]) -> Result<()> {
        let with_ids = |routes: &mut dyn Iterator<Item = &crate::config::Route>| {
            routes
                .filter_map(|r| Some((r.site.clone(), r.prefix.clone(), (*ids.get(r.pool)?)?)))
                .collect::<Vec<(Site, String, PoolId)>>()
        };
        let routes = with_ids(&mut config.plain_routes());
        let passthrough = with_ids(&mut config.passthrough_routes());
        let kernel = |routes: &[(Site, String, PoolId)]| -> Vec<(Site, String, u32)> {
            routes
                .iter()
                .map(|(s, p, id)| (s.clone(), p.clone(), id.raw()))
                .collect()
        };
        // A site shared by pools that do not trust each other is steered to the
        // dispatcher, which keeps its connections (`sluice_proto::ownership`); a pool that
        // takes whole connections is steered to wherever it is routed.
        let user_table = crate::route::RouteTable::new(routes.clone());
        let whole = |id: PoolId| self.pools.get(id.index()).is_some_and(|p| p.entry().whole);
        let steered: Vec<(Site, String, u32)> = routes
            .iter()
            .map(|(s, p, id)| {
                let steerable = whole(*id)
                    || sluice_proto::ownership::kernel_steerable(&user_table, &config.trust, s);
                let value = if steerable {
                    id.raw()
                } else {
                    sluice_common::ROUTE_SHARED
                };
                (s.clone(), p.clone(), value)
            })
            .collect();
        self.steering
            .set_routes(&steered, &kernel(&passthrough), config.tls.redirect_https)?;
        // Workers hand back requests that route elsewhere: they get the table too.
        self.routes_message = ToWorker::Routes(
            config
                .plain_routes()
                .map(|r| RouteEntry {
                    site: r.site.clone(),
                    prefix: r.prefix.clone(),
                    pool: config.pools[r.pool].name.clone(),
                })
                .collect(),
        );
        self.greet_workers();
        let table = dispatcher::Table {
            routes: user_table,
            trust: config.trust.clone(),
            passthrough: crate::route::RouteTable::new(passthrough),
            redirect: config.tls.redirect_port(),
            pools: self.pools.iter().map(|p| Some(p.entry())).collect(),
        };
        self.table.replace(table);
        self.wake_dispatcher();
        self.uncache_unrouted();
        Ok(())
    }

    fn wake_dispatcher(&self) {
        crate::eventfd::signal(self.wake.as_raw_fd(), 1);
    }

    /// Sets or clears a pool flag, in the dispatcher and (as "go to the dispatcher") in the
    /// kernel's pool map.
    fn set_flag(&mut self, pool: PoolId, flag: u32, on: bool) -> Result<()> {
        if self.flags.set(pool, flag, on) {
            self.refresh_kernel_flags(pool)?;
            if flag == PoolFlags::STOPPED {
                self.wake_dispatcher();
            }
        }
        Ok(())
    }

    /// Writes the pool's kernel flags when they changed (its state, or a reload).
    pub(super) fn refresh_kernel_flags(&mut self, pool: PoolId) -> Result<()> {
        let i = pool.index();
        let kernel = pools::kernel_flags(&self.pools[i].config, self.flags.get(pool));
        if kernel != self.pools[i].slots.flags {
            self.pools[i].slots.flags = kernel;
            self.steering.set_pool(pool.raw(), self.pools[i].slots)?;
        }
        Ok(())
    }

    /// One controller step: reap, run the supervisor, watch queues, finish removals.
    fn step(&mut self, now: Instant) -> Result<()> {
        let mut events = self.supervisor.reap(now);
        let counters = self
            .steering
            .steered_counters(self.pools.len())
            .unwrap_or_default();
        let activity: Vec<u64> = (0..self.pools.len())
            .map(|i| {
                counters.steered(i)
                    + self
                        .stats
                        .handed_off
                        .get(i)
                        .map(|n| n.load(Relaxed))
                        .unwrap_or(0)
            })
            .collect();
        let queues: Vec<(u64, bool)> = self.pools.iter().map(PoolRt::queue).collect();
        let queued: Vec<u64> = queues.iter().map(|q| q.0).collect();
        events.extend(self.supervisor.tick(now, &activity, &queued));
        for e in events {
            match e {
                Event::Stopped(i) => self.set_flag(i, PoolFlags::STOPPED, true)?,
                Event::Restarted(i) => self.set_flag(i, PoolFlags::STOPPED, false)?,
            }
        }
        // Queue full (HTTP.sys QueueFull): new connections get 503 from the dispatcher until
        // the workers catch up.
        for i in 0..self.pools.len() {
            if self.pools[i].removed.is_some() {
                continue;
            }
            let id = PoolId::new(i);
            let full = queues[i].1;
            if full != (self.flags.get(id) & PoolFlags::FULL != 0) {
                if full {
                    log::warn!(
                        "pool {}: queue full ({} waiting); answering 503 until it drains",
                        self.pools[i].name,
                        queued[i]
                    );
                } else {
                    log::info!("pool {}: queue drained", self.pools[i].name);
                }
                self.set_flag(id, PoolFlags::FULL, full)?;
            }
        }
        self.finish_removals();
        self.expire_cache(now);
        self.guard_groups(now);
        if self.greeting_due {
            self.greet_workers();
        }
        Ok(())
    }

    /// Once a second every group gets our program attached again (a listener that is not
    /// ours, or a worker, may have replaced it); foreign listeners are logged by the guard.
    fn guard_groups(&mut self, now: Instant) {
        let ours: Vec<std::os::fd::RawFd> = self
            .dispatch_sockets
            .iter()
            .map(|fd| fd.as_raw_fd())
            .chain(
                self.pools
                    .iter()
                    .flat_map(|p| p.listeners.iter().map(|fd| fd.as_raw_fd())),
            )
            .collect();
        if self.guard.check(now, &ours).is_none() {
            return;
        }
        for (g, socket) in self.dispatch_sockets.iter().enumerate() {
            if let Err(e) = self.steering.attach(g, socket) {
                log::error!("attaching the steering program again: {e}");
            }
        }
    }

    fn command(&mut self, command: &str) -> String {
        let words: Vec<&str> = command.split_whitespace().collect();
        match words.as_slice() {
            ["status"] => {
                serde_json::to_string(&self.status()).unwrap_or_else(|e| format!("error: {e}"))
            }
            ["metrics"] => self.status().prometheus(),
            ["upgrade"] => match self.prepare_upgrade() {
                Ok(()) => {
                    self.upgrade_due = true;
                    format!(
                        "upgrading: {} passed check; handing over (upgrade {})\n",
                        self.exe.display(),
                        self.upgrades + 1
                    )
                }
                Err(e) => {
                    self.upgrade_refused(&e);
                    format!("error: upgrade refused, this program serves on: {e:#}")
                }
            },
            ["cache", "list"] => self.cache_list(),
            ["cache", "purge"] => self.cache_purge(None),
            ["cache", "purge", path] => self.cache_purge(Some(path)),
            ["reload"] => match self.reload() {
                Ok(summary) => summary,
                Err(e) => {
                    log::error!("reload refused, the running configuration stays: {e:#}");
                    format!("error: reload refused, the running configuration stays: {e:#}")
                }
            },
            ["pool", "start", name] => match self.supervisor.start(name, Instant::now()) {
                Ok(events) => {
                    for e in events {
                        if let Event::Restarted(i) = e {
                            if let Err(err) = self.set_flag(i, PoolFlags::STOPPED, false) {
                                return format!("error: {err:#}");
                            }
                        }
                    }
                    format!("pool {name} started\n")
                }
                Err(e) => format!("error: {e}"),
            },
            ["pool", "recycle", name] => match self.supervisor.recycle(name) {
                Ok(n) => format!("pool {name}: recycling {n} worker(s)\n"),
                Err(e) => format!("error: {e}"),
            },
            _ => format!(
                "error: unknown command `{command}` (known: status, metrics, reload, upgrade, pool start NAME, pool recycle NAME, cache list, cache purge [PATH])"
            ),
        }
    }

    /// One line for systemd's STATUS=.
    fn summary(&self) -> String {
        let workers: usize = self
            .supervisor
            .info(Instant::now())
            .iter()
            .map(|p| p.workers.len())
            .sum();
        format!(
            "serving {} with {} pool(s), {workers} worker(s), steering {}",
            self.config
                .listen
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            self.config.pools.len(),
            self.config.steering.as_str()
        )
    }

    fn shutdown(mut self) {
        if let Some(n) = &self.notify {
            n.stopping();
        }
        log::info!("stopping: workers first, then the dispatcher");
        self.supervisor.stop_all();
        crate::held::Stop::Close.send(self.stop.as_raw_fd());
        match self.dispatch_thread.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => log::error!("dispatcher: {e}"),
            Some(Ok(Ok(held))) if !held.is_empty() => {
                log::warn!(
                    "dispatcher: {} connection(s) closed at the stop",
                    held.len()
                )
            }
            Some(Err(_)) => log::error!("dispatcher thread panicked"),
            _ => {}
        }
        if let Some(running) = self.tls.as_mut().and_then(|t| t.thread.take()) {
            let _ = running.stop(crate::held::Stop::Close);
        }
        self.tls = None;
        self.tls_sockets.clear();
        // Sockets, then programs (dropping the objects detaches the ack gate), then sysctls.
        self.dispatch_sockets.clear();
        self.pools.clear();
        let Frontend {
            steering, restore, ..
        } = self;
        drop(steering);
        drop(restore);
        log::info!("stopped");
    }
}

/// The sockets kept under `name` for `addrs` (systemd's fd store, an upgrade's state), by
/// address. An address with none is probed first, before anything changes: another
/// listener on it would take its traffic.
fn kept_or_free(
    inherited: &mut crate::fdstore::Inherited,
    name: &str,
    addrs: &[std::net::SocketAddr],
) -> Result<Vec<Option<OwnedFd>>> {
    let kept: Vec<Option<OwnedFd>> = addrs
        .iter()
        .map(|&a| inherited.take_listener(name, a))
        .collect();
    for (&addr, ours) in addrs.iter().zip(&kept) {
        if ours.is_none() {
            guard::probe(addr, guard::PROBE_PATIENCE)?;
        }
    }
    Ok(kept)
}

/// Slot 0 of group `g` on `addr` (the dispatcher's socket or the TLS thread's): the kept
/// socket or a new one, with the group's program attached.
fn group_listener(
    steering: &mut Steering,
    g: usize,
    addr: std::net::SocketAddr,
    kept: Option<OwnedFd>,
) -> Result<OwnedFd> {
    let s = match kept {
        Some(fd) => sockets::relisten(fd, DISPATCHER_BACKLOG)?,
        None => sockets::listener(addr, DISPATCHER_BACKLOG)?,
    };
    // Attached first: a group kept from an earlier run (systemd's fd store) still runs that
    // run's program, whose socket array holds these sockets until it is replaced.
    // Meanwhile our empty array makes the program drop (the client sends again), never
    // pick a pool by hash.
    steering.attach(g, &s)?;
    steering.set_socket(g, DISPATCHER_SLOT, &s)?;
    Ok(s)
}

/// The handshakes' configuration from `config`'s certificates (checked when it was read).
fn tls_server_config(
    config: &Config,
    secrets: Arc<crate::tls::Secrets>,
) -> Result<Arc<rustls::ServerConfig>> {
    let provider = crate::tls::certs::provider();
    let mut served = Vec::new();
    for (i, c) in config.tls.certificates.iter().enumerate() {
        let key = crate::tls::certs::load(c, &provider)
            .map_err(|(which, why)| anyhow::anyhow!("tls.certificate[{i}].{which}: {why}"))?;
        served.push((c.hosts.clone(), key));
    }
    crate::tls::certs::server_config(served, secrets).context("making the TLS configuration")
}

fn eventfd() -> Result<OwnedFd> {
    crate::eventfd::create(false).context("eventfd")
}
