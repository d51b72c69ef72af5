//! The TOML configuration: parsed strictly, then checked as a whole so that every problem is
//! reported at once, each naming its key and the reason.

use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use sluice_common::{MAX_POOLS, MAX_PREFIX, MAX_ROUTES, SOCKET_SLOTS};

use crate::route;
use sluice_proto::cache::ANY_HOST;
use sluice_proto::site::Site;

mod identity;
mod tls;
mod units;
mod worker;

pub use tls::{Certificate, TlsConfig};
pub use worker::{Health, Routing, Runs, WorkerKind};

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key, as a path: `server.listen[1]`, `pool[0].command`, `route[2].pool`.
    pub key: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: {} problem(s):\n{}", problems.len(), list(problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Steering {
    /// Only SYNs carrying data (TCP Fast Open) are steered in the kernel.
    Syn,
    /// Plain clients are steered on their first data segment (syncookies + ack gate).
    FirstSegment,
}

impl Steering {
    pub fn as_str(self) -> &'static str {
        match self {
            Steering::Syn => "syn",
            Steering::FirstSegment => "first-segment",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    #[serde(default, rename = "pool")]
    pools: Vec<RawPool>,
    #[serde(default, rename = "route")]
    routes: Vec<RawRoute>,
    #[serde(default, rename = "site")]
    sites: Vec<RawSite>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    tls: tls::RawTls,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    max_entry_bytes: Option<u64>,
    max_total_bytes: Option<String>,
    #[serde(default, rename = "static")]
    statics: Vec<RawStatic>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStatic {
    host: Option<String>,
    path: String,
    file: PathBuf,
    content_type: Option<String>,
    ttl: Option<String>,
}

/// The front end's response cache (HTTP.sys's kernel cache); defaults are HTTP.sys's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Largest response kept (default 256 KiB).
    pub max_entry_bytes: u64,
    /// All responses kept together (default 64 MiB); the least recently used go first.
    pub max_total_bytes: u64,
    pub statics: Vec<StaticEntry>,
}

/// A response preloaded from a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticEntry {
    /// The host it answers (normalized), or `sluice_proto::cache::ANY_HOST`.
    pub host: String,
    /// Canonical path it answers.
    pub path: String,
    pub file: PathBuf,
    pub content_type: String,
    /// Kept this long, then read again from the file.
    pub ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_entry_bytes: 256 * 1024,
            max_total_bytes: 64 << 20,
            statics: Vec::new(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_request_head: Option<usize>,
    max_url: Option<usize>,
    max_request_body: Option<Size>,
    header_timeout: Option<String>,
    idle_timeout: Option<String>,
    min_send_rate: Option<u64>,
    max_pending: Option<usize>,
}

/// A size written as a number of bytes or as text with a unit (`"30MB"`, `"64MiB"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    fn bytes(&self) -> Result<u64, String> {
        match self {
            Size::Bytes(n) => Ok(*n),
            Size::Text(t) => units::size(t),
        }
    }
}

/// Limits on clients, HTTP.sys's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Request line and headers, bytes (431 past it).
    pub max_request_head: usize,
    /// Request target, bytes (414 past it).
    pub max_url: usize,
    /// Request body, bytes (413 past it; IIS's 30,000,000 by default).
    pub max_request_body: u64,
    /// Time to receive a whole request head (the connection is closed after it).
    pub header_timeout: Duration,
    /// Time a keep-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Bytes per second a client must take a response at (a slower one is cut off).
    pub min_send_rate: u64,
    /// Connections the dispatcher holds before their request is routed; past it the oldest is
    /// dropped, so slow clients cannot starve it.
    pub max_pending: usize,
}

impl Limits {
    /// The limits a request head is judged by (`sluice_proto::request`).
    pub fn head_limits(&self) -> sluice_proto::limits::HeadLimits {
        sluice_proto::limits::HeadLimits {
            max_request_head: self.max_request_head,
            max_url: self.max_url,
            max_request_body: self.max_request_body,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_head: sluice_proto::limits::DEFAULT_MAX_REQUEST_HEAD,
            max_url: sluice_proto::limits::DEFAULT_MAX_URL,
            max_request_body: sluice_proto::limits::DEFAULT_MAX_REQUEST_BODY,
            header_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(120),
            min_send_rate: 150,
            max_pending: 10_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Vec<String>,
    /// HTTPS addresses (the certificates are `[[tls.certificate]]`).
    #[serde(default)]
    listen_tls: Vec<String>,
    /// Every plain-listener request gets 308 to its https URL.
    #[serde(default)]
    redirect_https: bool,
    #[serde(default = "default_steering")]
    steering: Steering,
    #[serde(default)]
    set_sysctls: bool,
    #[serde(default = "default_admin_socket")]
    admin_socket: PathBuf,
    /// Address of the Prometheus text endpoint; none by default.
    metrics: Option<String>,
    /// Where the access log goes: a file, or `-` for stderr; off by default.
    access_log: Option<PathBuf>,
    #[serde(default)]
    access_log_format: LogFormat,
    /// Connection-owning loops (the delivery loops): default, one per CPU.
    threads: Option<usize>,
}

/// Most connection-owning loops `[server] threads` may ask for.
pub const MAX_THREADS: usize = 1024;

/// The access log's line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Apache/nginx `combined`, then host, duration (ms), pool, worker pid and arrival.
    #[default]
    Combined,
    /// One JSON object a line.
    Json,
}

/// `[server] access_log`: one line per request, written by the front end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogConfig {
    /// None: standard error.
    pub file: Option<PathBuf>,
    pub format: LogFormat,
}

fn default_steering() -> Steering {
    Steering::Syn
}

pub const DEFAULT_ADMIN_SOCKET: &str = "/run/sluice/admin.sock";

fn default_admin_socket() -> PathBuf {
    PathBuf::from(DEFAULT_ADMIN_SOCKET)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: String,
    command: Vec<String>,
    #[serde(default = "default_processes")]
    processes: u32,
    #[serde(default = "default_queue_length")]
    queue_length: u32,
    /// Threads per worker process; absent: the worker's default (one per core).
    threads: Option<u32>,
    /// Listening sockets per listen address; connections spread over them by hash.
    #[serde(default = "default_sockets")]
    sockets: u32,
    #[serde(default)]
    start: Start,
    idle_timeout: Option<String>,
    rapid_fail: Option<RawRapidFail>,
    ping_interval: Option<String>,
    ping_timeout: Option<String>,
    startup_time_limit: Option<String>,
    shutdown_time_limit: Option<String>,
    recycle: Option<RawRecycle>,
    user: Option<String>,
    group: Option<String>,
    /// The workers' whole environment (but the contract's `SLUICE_*` and `LISTEN_*`).
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
    /// What the workers are: a sluice-worker program or any server of inherited sockets.
    #[serde(default)]
    worker: WorkerKind,
    cwd: Option<PathBuf>,
    health: Option<worker::RawHealth>,
    proxy_protocol: Option<bool>,
    routing: Option<Routing>,
    /// `"passthrough"`: TLS connections for this pool's hosts reach its own TLS server
    /// untouched.
    tls: Option<worker::PoolTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRapidFail {
    failures: Option<u32>,
    interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecycle {
    time: Option<String>,
    requests: Option<u64>,
    memory: Option<String>,
}

/// When a pool's workers start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Start {
    /// When the first connection waits in the pool's queue (IIS's OnDemand).
    #[default]
    OnDemand,
    /// With the front end (IIS's AlwaysRunning).
    Always,
}

/// How the front end runs a pool's workers; defaults are IIS's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activation {
    pub start: Start,
    /// Stop the workers after this long without a request; zero: never.
    pub idle_timeout: Duration,
    /// Stop the pool after this many failures within `rapid_fail_interval`; zero: never.
    pub rapid_fail_failures: u32,
    pub rapid_fail_interval: Duration,
    /// Zero: no pings (the worker need not speak the control protocol).
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub startup_time_limit: Duration,
    pub shutdown_time_limit: Duration,
    /// Recycle a worker after this long (zero: never), this many requests, this much memory.
    pub recycle_time: Duration,
    pub recycle_requests: u64,
    pub recycle_memory: u64,
    /// Run the workers as this uid/gid; without `user`, a uid of the pool's own (see
    /// `activation::identity`).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl Default for Activation {
    fn default() -> Self {
        Activation {
            start: Start::OnDemand,
            idle_timeout: Duration::from_secs(20 * 60),
            rapid_fail_failures: 5,
            rapid_fail_interval: Duration::from_secs(5 * 60),
            ping_interval: Duration::from_secs(30),
            ping_timeout: Duration::from_secs(90),
            startup_time_limit: Duration::from_secs(90),
            shutdown_time_limit: Duration::from_secs(90),
            recycle_time: Duration::from_secs(29 * 3600),
            recycle_requests: 0,
            recycle_memory: 0,
            uid: None,
            gid: None,
        }
    }
}

fn default_processes() -> u32 {
    1
}
/// HTTP.sys's default request-queue length.
pub const DEFAULT_QUEUE_LENGTH: u32 = 1000;
fn default_queue_length() -> u32 {
    DEFAULT_QUEUE_LENGTH
}
fn default_sockets() -> u32 {
    1
}

/// `[[site]]`: what a host's routes share.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    host: String,
    /// Its pools may share connections: the kernel steers them by path and workers hand
    /// connections back (a pool can read the others' requests).
    #[serde(default)]
    trust_pools: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    host: Option<String>,
    prefix: String,
    pool: String,
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub listen: Vec<SocketAddr>,
    pub steering: Steering,
    pub set_sysctls: bool,
    pub admin_socket: PathBuf,
    pub metrics: Option<SocketAddr>,
    pub access_log: Option<AccessLogConfig>,
    /// Connection-owning loops (`[server] threads`; default one per CPU).
    pub threads: usize,
    pub pools: Vec<Pool>,
    pub routes: Vec<Route>,
    /// Sites whose pools trust each other (`[[site]] trust_pools = true`).
    pub trust: sluice_proto::ownership::Trust,
    pub limits: Limits,
    pub cache: CacheConfig,
    pub tls: TlsConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    /// `command[0]` resolved to an executable path.
    pub program: PathBuf,
    pub args: Vec<String>,
    pub processes: u32,
    pub queue_length: u32,
    pub threads: Option<u32>,
    pub sockets: u32,
    pub activation: Activation,
    /// The pool's `env` table.
    pub env: Vec<(String, String)>,
    /// What its workers are and how they are checked.
    pub runs: Runs,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The host it answers for.
    pub site: Site,
    /// Normalized: starts and ends with `/`.
    pub prefix: String,
    /// Index into `Config::pools`.
    pub pool: usize,
}

pub const MAX_PROCESSES: u32 = 256;
pub const MAX_SOCKETS_PER_POOL: u32 = 16;
pub const MAX_QUEUE_LENGTH: u32 = 65535;

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_owned(),
            cause,
        })?;
        Config::parse(&text, path)
    }

    /// Parses `text` as if read from `path` (relative worker paths resolve against its folder).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut problems = Vec::new();
        let mut bad = |key: String, reason: String| problems.push(Problem { key, reason });

        let mut listen = Vec::new();
        if raw.server.listen.is_empty() {
            bad(
                "server.listen".into(),
                "needs at least one address, e.g. \"127.0.0.1:8080\"".into(),
            );
        }
        for (i, a) in raw.server.listen.iter().enumerate() {
            match a.parse::<SocketAddr>() {
                Ok(addr) if addr.port() == 0 => bad(
                    format!("server.listen[{i}]"),
                    format!("`{a}` needs a port other than 0"),
                ),
                Ok(addr) if listen.contains(&addr) => bad(
                    format!("server.listen[{i}]"),
                    format!("`{a}` is listed twice"),
                ),
                Ok(addr) => listen.push(addr),
                Err(_) => bad(
                    format!("server.listen[{i}]"),
                    format!("`{a}` is not an address:port (IPv6 as \"[::1]:8080\")"),
                ),
            }
        }
        let metrics = match &raw.server.metrics {
            None => None,
            Some(m) => match m.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    bad(
                        "server.metrics".into(),
                        format!("`{m}` is not an address:port"),
                    );
                    None
                }
            },
        };
        let access_log = match &raw.server.access_log {
            None => None,
            Some(p) if p.as_os_str().is_empty() => {
                bad(
                    "server.access_log".into(),
                    "must be a file or `-` (standard error)".into(),
                );
                None
            }
            Some(p) => Some(AccessLogConfig {
                file: (p.as_os_str() != "-").then(|| {
                    if p.is_absolute() {
                        p.clone()
                    } else {
                        base.join(p)
                    }
                }),
                format: raw.server.access_log_format,
            }),
        };
        if raw.server.admin_socket.as_os_str().is_empty() {
            bad("server.admin_socket".into(), "must not be empty".into());
        }

        if raw.pools.len() > MAX_POOLS as usize {
            bad(
                "pool".into(),
                format!("{} pools; at most {MAX_POOLS}", raw.pools.len()),
            );
        }
        let mut names = HashSet::new();
        let mut pools = Vec::new();
        let mut slots = 1u32; // slot 0: the dispatcher
        for (i, p) in raw.pools.iter().enumerate() {
            let key = |k: &str| format!("pool[{i}].{k}");
            if !sluice_proto::route::valid_pool_name(&p.name) {
                bad(
                    key("name"),
                    format!("`{}` must be letters, digits, `-` or `_`", p.name),
                );
            } else if !names.insert(p.name.clone()) {
                bad(key("name"), format!("pool `{}` is defined twice", p.name));
            }
            let program = match p.command.first() {
                None => {
                    bad(
                        key("command"),
                        "is empty; give the worker program and its arguments".into(),
                    );
                    PathBuf::new()
                }
                Some(prog) => match resolve_program(prog, &base) {
                    Ok(path) => path,
                    Err(reason) => {
                        bad(key("command"), reason);
                        PathBuf::new()
                    }
                },
            };
            if p.processes == 0 || p.processes > MAX_PROCESSES {
                bad(
                    key("processes"),
                    format!("{} is out of range 1..={MAX_PROCESSES}", p.processes),
                );
            }
            if p.queue_length == 0 || p.queue_length > MAX_QUEUE_LENGTH {
                bad(
                    key("queue_length"),
                    format!("{} is out of range 1..={MAX_QUEUE_LENGTH}", p.queue_length),
                );
            }
            if p.threads == Some(0) {
                bad(key("threads"), "must be at least 1".into());
            }
            if p.sockets == 0 || p.sockets > MAX_SOCKETS_PER_POOL {
                bad(
                    key("sockets"),
                    format!("{} is out of range 1..={MAX_SOCKETS_PER_POOL}", p.sockets),
                );
            }
            slots += p.sockets;
            let activation = activation(p, &mut |k, r| bad(key(k), r));
            for (k, v) in &p.env {
                if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                    bad(
                        key("env"),
                        format!("`{k}` is not a variable name with a value"),
                    );
                } else if k.starts_with("LISTEN_") || k.starts_with("SLUICE_") {
                    bad(
                        key("env"),
                        format!("`{k}` is set by sluice itself (the worker contract)"),
                    );
                }
            }
            let mut sluice_only = Vec::new();
            if p.threads.is_some() {
                sluice_only.push("threads");
            }
            if p.ping_interval.is_some() {
                sluice_only.push("ping_interval");
            }
            if p.ping_timeout.is_some() {
                sluice_only.push("ping_timeout");
            }
            let runs = worker::runs(
                worker::RawRuns {
                    kind: p.worker,
                    cwd: p.cwd.as_deref(),
                    health: p.health.as_ref(),
                    proxy_protocol: p.proxy_protocol,
                    routing: p.routing,
                    passthrough: p.tls == Some(worker::PoolTls::Passthrough),
                    sluice_only,
                },
                &base,
                &mut |k, r| bad(key(k), r),
            );
            pools.push(Pool {
                runs,
                name: p.name.clone(),
                program,
                args: p.command.iter().skip(1).cloned().collect(),
                processes: p.processes,
                queue_length: p.queue_length,
                threads: p.threads,
                sockets: p.sockets,
                activation,
                env: p.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            });
        }
        if slots > SOCKET_SLOTS {
            bad(
                "pool".into(),
                format!("{slots} sockets in all; at most {SOCKET_SLOTS}"),
            );
        }

        if raw.routes.len() > MAX_ROUTES as usize {
            bad(
                "route".into(),
                format!("{} routes; at most {MAX_ROUTES}", raw.routes.len()),
            );
        }
        let mut routes: Vec<Route> = Vec::new();
        for (i, r) in raw.routes.iter().enumerate() {
            let prefix = match route::normalize_prefix(&r.prefix) {
                Ok(p) if p.len() > MAX_PREFIX => {
                    bad(
                        format!("route[{i}].prefix"),
                        format!("`{}` is longer than {} bytes", r.prefix, MAX_PREFIX - 1),
                    );
                    None
                }
                Ok(p) => Some(p),
                Err(reason) => {
                    bad(
                        format!("route[{i}].prefix"),
                        format!("`{}` {reason}", r.prefix),
                    );
                    None
                }
            };
            let pool = raw.pools.iter().position(|p| p.name == r.pool);
            if pool.is_none() {
                bad(
                    format!("route[{i}].pool"),
                    format!("no pool is named `{}`", r.pool),
                );
            }
            let site = match Site::parse(r.host.as_deref()) {
                Ok(site) => Some(site),
                Err(reason) => {
                    let host = r.host.as_deref().unwrap_or_default();
                    bad(format!("route[{i}].host"), format!("`{host}` {reason}"));
                    None
                }
            };
            if let (Some(site), Some(prefix), Some(pool)) = (site, prefix, pool) {
                if let Some(j) = routes
                    .iter()
                    .position(|x| x.site == site && x.prefix == prefix)
                {
                    bad(
                        format!("route[{i}].prefix"),
                        format!(
                            "`{}` is the same prefix as route[{j}] for the same host ({site} {prefix})",
                            r.prefix
                        ),
                    );
                } else {
                    routes.push(Route { site, prefix, pool });
                }
            }
        }

        for (route, reason) in worker::passthrough_problems(&pools, &routes) {
            bad(format!("route[{route}]"), reason);
        }
        let plain: Vec<Route> = routes
            .iter()
            .filter(|r| !pools.get(r.pool).is_some_and(|p| p.runs.passthrough))
            .cloned()
            .collect();
        let mut trusted = Vec::new();
        for (i, s) in raw.sites.iter().enumerate() {
            match Site::parse(Some(&s.host)) {
                Err(e) => bad(format!("site[{i}].host"), format!("`{}` {e}", s.host)),
                Ok(site) if !plain.iter().any(|r| r.site == site) => bad(
                    format!("site[{i}].host"),
                    format!("`{}`: no route names this host", s.host),
                ),
                Ok(site) if trusted.contains(&site) => bad(
                    format!("site[{i}].host"),
                    format!("`{}` is listed twice", s.host),
                ),
                Ok(site) => {
                    if s.trust_pools {
                        trusted.push(site);
                    }
                }
            }
        }
        let trust = sluice_proto::ownership::Trust::new(trusted);
        for (pool, reason) in worker::shared_hosts(&pools, &plain, &trust) {
            bad(format!("pool[{pool}].routing"), reason);
        }

        let mut limits = Limits::default();
        {
            let l = &raw.limits;
            // Every buffer a head passes through holds MAX_HEAD_LIMIT bytes: no larger limit.
            let max = sluice_proto::limits::MAX_HEAD_LIMIT;
            let mut bytes = |key: &str, v: Option<usize>, min: usize, into: &mut usize| {
                if let Some(n) = v {
                    if n < min || n > max {
                        bad(
                            format!("limits.{key}"),
                            format!("{n} is out of range {min}..={max}"),
                        );
                    } else {
                        *into = n;
                    }
                }
            };
            bytes(
                "max_request_head",
                l.max_request_head,
                256,
                &mut limits.max_request_head,
            );
            bytes("max_url", l.max_url, 64, &mut limits.max_url);
            if let Some(size) = &l.max_request_body {
                match size.bytes() {
                    Ok(0) => bad(
                        "limits.max_request_body".into(),
                        "must be more than 0".into(),
                    ),
                    Ok(n) => limits.max_request_body = n,
                    Err(reason) => bad("limits.max_request_body".into(), reason),
                }
            }
            for (key, v, into) in [
                (
                    "header_timeout",
                    &l.header_timeout,
                    &mut limits.header_timeout,
                ),
                ("idle_timeout", &l.idle_timeout, &mut limits.idle_timeout),
            ] {
                if let Some(text) = v {
                    match units::duration(text) {
                        Ok(d) if d.is_zero() => {
                            bad(format!("limits.{key}"), "must be more than 0".into())
                        }
                        Ok(d) => *into = d,
                        Err(reason) => bad(format!("limits.{key}"), reason),
                    }
                }
            }
            if let Some(r) = l.min_send_rate {
                limits.min_send_rate = r;
            }
            if let Some(n) = l.max_pending {
                if n == 0 {
                    bad("limits.max_pending".into(), "must be at least 1".into());
                } else {
                    limits.max_pending = n;
                }
            }
        }

        let mut cache = CacheConfig::default();
        if let Some(n) = raw.cache.max_entry_bytes {
            cache.max_entry_bytes = n;
        }
        if let Some(t) = &raw.cache.max_total_bytes {
            match units::size(t) {
                Ok(n) => cache.max_total_bytes = n,
                Err(reason) => bad("cache.max_total_bytes".into(), reason),
            }
        }
        if cache.max_entry_bytes > 1 << 20 {
            bad(
                "cache.max_entry_bytes".into(),
                format!("{} is more than 1 MiB", cache.max_entry_bytes),
            );
        } else if cache.max_entry_bytes > cache.max_total_bytes {
            bad(
                "cache.max_entry_bytes".into(),
                "is larger than cache.max_total_bytes".into(),
            );
        }
        for (i, st) in raw.cache.statics.iter().enumerate() {
            let key = |k: &str| format!("cache.static[{i}].{k}");
            let path = match crate::canonical::canonicalize(st.path.as_bytes()) {
                Ok(c) if c == st.path => c,
                _ => {
                    bad(
                        key("path"),
                        format!("`{}` is not a canonical path", st.path),
                    );
                    continue;
                }
            };
            let file = if st.file.is_absolute() {
                st.file.clone()
            } else {
                base.join(&st.file)
            };
            match std::fs::metadata(&file) {
                Ok(m) if m.is_file() && m.len() <= cache.max_entry_bytes => {}
                Ok(m) if m.is_file() => bad(
                    key("file"),
                    format!("`{}` is larger than cache.max_entry_bytes", file.display()),
                ),
                _ => bad(
                    key("file"),
                    format!("`{}` is not a readable file", file.display()),
                ),
            }
            let ttl = match st.ttl.as_deref().map(units::duration) {
                None => Duration::from_secs(3600),
                Some(Ok(d)) if !d.is_zero() => d,
                Some(Ok(_)) => {
                    bad(key("ttl"), "must be more than 0".into());
                    continue;
                }
                Some(Err(reason)) => {
                    bad(key("ttl"), reason);
                    continue;
                }
            };
            let host = match st.host.as_deref().map(|h| Site::parse(Some(h))) {
                None => ANY_HOST.to_owned(),
                Some(Ok(Site::Weak)) => ANY_HOST.to_owned(),
                Some(Ok(Site::Exact(name))) => name,
                Some(Ok(Site::Ip(ip))) if ip.is_ipv4() => ip.to_string(),
                Some(Ok(site @ Site::Ip(_))) => site.to_string(),
                Some(Ok(_)) => {
                    bad(
                        key("host"),
                        "must be one host name or address (or `*`): the Host a request names"
                            .into(),
                    );
                    continue;
                }
                Some(Err(reason)) => {
                    let host = st.host.as_deref().unwrap_or_default();
                    bad(key("host"), format!("`{host}` {reason}"));
                    continue;
                }
            };
            if cache
                .statics
                .iter()
                .any(|s: &StaticEntry| s.path == path && s.host == host)
            {
                bad(
                    key("path"),
                    format!("`{path}` is listed twice for host {host}"),
                );
                continue;
            }
            let content_type = st
                .content_type
                .clone()
                .unwrap_or_else(|| "application/octet-stream".into());
            cache.statics.push(StaticEntry {
                host,
                path,
                file,
                content_type,
                ttl,
            });
        }

        let tls = tls::check(
            &raw.server.listen_tls,
            raw.server.redirect_https,
            &listen,
            &raw.tls,
            &base,
            &mut |k, r| bad(k, r),
        );
        if tls.listen.is_empty() {
            for (i, p) in pools.iter().enumerate() {
                if p.runs.passthrough {
                    bad(
                        format!("pool[{i}].tls"),
                        "passthrough needs server.listen_tls (the addresses whose \
                         ClientHellos are read)"
                            .into(),
                    );
                }
            }
        }
        let threads = match raw.server.threads {
            Some(n) if !(1..=MAX_THREADS).contains(&n) => {
                bad(
                    "server.threads".into(),
                    format!("must be from 1 to {MAX_THREADS} (leave it out for one per CPU)"),
                );
                1
            }
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, usize::from),
        };
        if !problems.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            });
        }
        Ok(Config {
            path: path.to_owned(),
            listen,
            threads,
            steering: raw.server.steering,
            set_sysctls: raw.server.set_sysctls,
            admin_socket: raw.server.admin_socket,
            metrics,
            access_log,
            pools,
            routes,
            trust,
            limits,
            cache,
            tls,
        })
    }

    /// What is allowed but probably unwise, each naming its key: pools that share a user
    /// (their workers can reach each other's processes and sockets), a pool that runs as
    /// root, a metrics endpoint on every address.
    pub fn warnings(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        for (i, p) in self.pools.iter().enumerate() {
            let Some(uid) = p.activation.uid else {
                continue;
            };
            if uid == 0 {
                out.push(Problem {
                    key: format!("pool[{i}].user"),
                    reason: format!("pool {} runs as root", p.name),
                });
            } else if let Some(other) = self.pools[..i]
                .iter()
                .find(|o| o.activation.uid == Some(uid))
            {
                out.push(Problem {
                    key: format!("pool[{i}].user"),
                    reason: format!(
                        "pools {} and {} run as the same user (uid {uid}): each can reach the \
                         other's processes and sockets; leave `user` out to give every pool a \
                         uid of its own",
                        other.name, p.name
                    ),
                });
            }
        }
        for site in self.trusting_sites() {
            let pools: std::collections::BTreeSet<&str> = self
                .plain_routes()
                .filter(|r| r.site == site)
                .map(|r| self.pools[r.pool].name.as_str())
                .collect();
            out.push(Problem {
                key: "site.trust_pools".into(),
                reason: format!(
                    "host {site}: its pools ({}) share connections; each pool's workers can \
                     read the requests (and credentials) a client sends to the others on \
                     a shared connection",
                    pools.into_iter().collect::<Vec<_>>().join(", ")
                ),
            });
        }
        if let Some(m) = self.metrics {
            if m.ip().is_unspecified() {
                out.push(Problem {
                    key: "server.metrics".into(),
                    reason: format!("{m} serves the metrics on every address of this host"),
                });
            }
        }
        out
    }

    /// Names of pools no route leads to (served only if a later config routes to them).
    /// Some pool runs `worker = "socket"`: the front end relays to it.
    /// The routes plain listeners route by (the kernel's plain groups, the dispatcher, the
    /// workers' hand-backs): every route but those of passthrough pools.
    pub fn plain_routes(&self) -> impl Iterator<Item = &Route> {
        self.routes
            .iter()
            .filter(|r| !self.pools.get(r.pool).is_some_and(|p| p.runs.passthrough))
    }

    /// The routes of passthrough pools: SNI names (each for `/`) whose TLS connections go
    /// to the pool untouched.
    pub fn passthrough_routes(&self) -> impl Iterator<Item = &Route> {
        self.routes
            .iter()
            .filter(|r| self.pools.get(r.pool).is_some_and(|p| p.runs.passthrough))
    }

    /// The sites `[[site]] trust_pools = true` names, in route order.
    pub fn trusting_sites(&self) -> Vec<Site> {
        let mut out: Vec<Site> = Vec::new();
        for r in self.plain_routes() {
            if self.trust.contains(&r.site) && !out.contains(&r.site) {
                out.push(r.site.clone());
            }
        }
        out
    }

    pub fn has_socket_pools(&self) -> bool {
        self.pools.iter().any(|p| p.runs.kind == WorkerKind::Socket)
    }

    /// The `Host` the front end's health checks of pool `i` name: the host of its first
    /// route that names one, else the first listen address.
    pub fn probe_host(&self, pool: usize) -> String {
        use sluice_proto::site::Site;
        let named = self
            .routes
            .iter()
            .filter(|r| r.pool == pool)
            .find_map(|r| match &r.site {
                Site::Exact(h) => Some(h.clone()),
                Site::Wildcard(s) => Some(format!("health.{s}")),
                _ => None,
            });
        named.unwrap_or_else(|| {
            self.listen
                .first()
                .map_or_else(|| "localhost".into(), |a| a.to_string())
        })
    }

    pub fn unrouted_pools(&self) -> Vec<&str> {
        self.pools
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.routes.iter().any(|r| r.pool == *i))
            .map(|(_, p)| p.name.as_str())
            .collect()
    }
}

/// The pool's activation settings; problems go to `bad(key, reason)`.
fn activation(p: &RawPool, bad: &mut dyn FnMut(&str, String)) -> Activation {
    let mut a = Activation {
        start: p.start,
        ..Activation::default()
    };
    let mut dur = |key: &str, v: &Option<String>, into: &mut Duration| {
        if let Some(text) = v {
            match units::duration(text) {
                Ok(d) => *into = d,
                Err(reason) => bad(key, reason),
            }
        }
    };
    dur("idle_timeout", &p.idle_timeout, &mut a.idle_timeout);
    dur("ping_interval", &p.ping_interval, &mut a.ping_interval);
    dur("ping_timeout", &p.ping_timeout, &mut a.ping_timeout);
    dur(
        "startup_time_limit",
        &p.startup_time_limit,
        &mut a.startup_time_limit,
    );
    dur(
        "shutdown_time_limit",
        &p.shutdown_time_limit,
        &mut a.shutdown_time_limit,
    );
    if let Some(rf) = &p.rapid_fail {
        if let Some(f) = rf.failures {
            a.rapid_fail_failures = f;
        }
        dur(
            "rapid_fail.interval",
            &rf.interval,
            &mut a.rapid_fail_interval,
        );
    }
    if let Some(r) = &p.recycle {
        dur("recycle.time", &r.time, &mut a.recycle_time);
        if let Some(n) = r.requests {
            a.recycle_requests = n;
        }
        if let Some(m) = &r.memory {
            match units::size(m) {
                Ok(n) => a.recycle_memory = n,
                Err(reason) => bad("recycle.memory", reason),
            }
        }
    }
    for (key, d) in [
        ("ping_timeout", a.ping_timeout),
        ("startup_time_limit", a.startup_time_limit),
        ("shutdown_time_limit", a.shutdown_time_limit),
    ] {
        if d.is_zero() {
            bad(key, "must be more than 0".into());
        }
    }
    if a.rapid_fail_failures > 0 && a.rapid_fail_interval.is_zero() {
        bad(
            "rapid_fail.interval",
            "must be more than 0 when rapid_fail.failures is set".into(),
        );
    }
    if let Some(user) = &p.user {
        match identity::uid(user) {
            Ok((uid, gid)) => {
                a.uid = Some(uid);
                a.gid = Some(gid);
            }
            Err(reason) => bad("user", reason),
        }
    }
    if let Some(group) = &p.group {
        match identity::gid(group) {
            Ok(gid) => a.gid = Some(gid),
            Err(reason) => bad("group", reason),
        }
    }
    a
}

/// Resolves a worker program: a path with `/` against the config's folder, a bare name on PATH.
fn resolve_program(prog: &str, base: &Path) -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = if prog.contains('/') {
        let p = Path::new(prog);
        vec![if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }]
    } else {
        std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).map(|d| d.join(prog)).collect())
            .unwrap_or_default()
    };
    for c in &candidates {
        if let Ok(meta) = std::fs::metadata(c) {
            if !meta.is_file() {
                return Err(format!("worker binary `{}` is not a file", c.display()));
            }
            if meta.permissions().mode() & 0o111 == 0 {
                return Err(format!("worker binary `{}` is not executable", c.display()));
            }
            return Ok(std::fs::canonicalize(c).unwrap_or_else(|_| c.clone()));
        }
    }
    match candidates.first() {
        Some(c) if prog.contains('/') => Err(format!(
            "worker binary `{}` not found (relative paths resolve against the config file's folder)",
            c.display()
        )),
        _ => Err(format!("worker binary `{prog}` not found on PATH")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/nonexistent/sluice.toml"))
    }

    fn problems(text: &str) -> Vec<Problem> {
        match check(text) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    const POOL: &str = "[[pool]]\nname = \"api\"\ncommand = [\"/bin/true\"]\n";

    #[test]
    fn head_limits_past_what_every_buffer_holds_are_refused() {
        let p = problems(&format!(
            "[server]\nlisten = [\"127.0.0.1:80\"]\n[limits]\nmax_request_head = 1048576\n\
             max_url = 65537\nmax_request_body = \"x\"\n{POOL}"
        ));
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "limits.max_request_head",
                "limits.max_url",
                "limits.max_request_body"
            ],
            "{p:?}"
        );
        let c = check(&format!(
            "[server]\nlisten = [\"127.0.0.1:80\"]\n[limits]\nmax_request_head = 65536\n\
             max_request_body = \"1MiB\"\n{POOL}"
        ))
        .unwrap();
        assert_eq!(
            (c.limits.max_request_head, c.limits.max_request_body),
            (65536, 1 << 20)
        );
        assert_eq!(
            Limits::default().max_request_body,
            sluice_proto::limits::DEFAULT_MAX_REQUEST_BODY
        );
    }

    #[test]
    fn a_pool_env_may_not_set_the_contracts_variables_and_shared_users_are_warned_of() {
        let p = problems(&format!(
            "[server]\nlisten = [\"127.0.0.1:80\"]\n{POOL}env = {{ SLUICE_POOL = \"x\" }}\n"
        ));
        assert_eq!(p[0].key, "pool[0].env", "{p:?}");
        let c = check(
            "[server]\nlisten = [\"127.0.0.1:80\"]\nmetrics = \"0.0.0.0:9090\"\n\
             [[pool]]\nname = \"a\"\ncommand = [\"/bin/true\"]\nuser = \"nobody\"\n\
             [[pool]]\nname = \"b\"\ncommand = [\"/bin/true\"]\nuser = \"nobody\"\n\
             [[pool]]\nname = \"c\"\ncommand = [\"/bin/true\"]\nenv = { A = \"1\" }\n",
        )
        .unwrap();
        let w = c.warnings();
        let keys: Vec<&str> = w.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["pool[1].user", "server.metrics"], "{w:?}");
        assert_eq!(c.pools[2].env, [("A".to_owned(), "1".to_owned())]);
        assert_eq!(c.pools[2].activation.uid, None, "no user: a uid of its own");
    }

    #[test]
    fn minimal_config_gets_http_sys_defaults() {
        let c = check(&format!(
            "[server]\nlisten = [\"127.0.0.1:8080\", \"[::1]:8080\"]\n{POOL}[[route]]\nprefix = \"/api\"\npool = \"api\"\n"
        ))
        .unwrap();
        assert_eq!(c.steering, Steering::Syn);
        assert_eq!(c.pools[0].queue_length, 1000);
        assert_eq!(c.pools[0].processes, 1);
        assert_eq!(c.routes[0].prefix, "/api/");
        assert_eq!(c.admin_socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
        assert_eq!(c.listen.len(), 2);
    }

    #[test]
    fn every_problem_names_its_key() {
        let p = problems(
            "[server]\nlisten = [\"127.0.0.1\", \"[::1]:0\"]\n\
             [[pool]]\nname = \"api\"\ncommand = [\"./no-such-worker\"]\nqueue_length = 0\n\
             [[pool]]\nname = \"api\"\ncommand = []\n\
             [[route]]\nprefix = \"/a\"\npool = \"nope\"\n\
             [[route]]\nprefix = \"a/\"\npool = \"api\"\n\
             [[route]]\nprefix = \"/x/\"\npool = \"api\"\n[[route]]\nprefix = \"/x\"\npool = \"api\"\n",
        );
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "server.listen[0]",
                "server.listen[1]",
                "pool[0].command",
                "pool[0].queue_length",
                "pool[1].name",
                "pool[1].command",
                "route[0].pool",
                "route[1].prefix",
                "route[3].prefix",
            ],
            "{p:#?}"
        );
        assert!(p[2].reason.contains("not found"), "{}", p[2].reason);
        assert!(p[6].reason.contains("no pool is named `nope`"));
        assert!(p[8].reason.contains("same prefix"));
    }

    #[test]
    fn route_hosts_name_their_site_and_same_host_prefixes_conflict() {
        let route = |host: &str, prefix: &str| {
            format!("[[route]]\nhost = \"{host}\"\nprefix = \"{prefix}\"\npool = \"api\"\n")
        };
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:8080\"]\n{POOL}{}{}{}{}{}[[route]]\nprefix = \"/\"\npool = \"api\"\n",
            route("Shop.Test.", "/"),
            route("*.tenants.test", "/"),
            route("+", "/acme/"),
            route("127.0.0.2", "/"),
            route("*", "/api/"),
        );
        let c = check(&text).unwrap();
        let sites: Vec<String> = c.routes.iter().map(|r| r.site.to_string()).collect();
        assert_eq!(
            sites,
            ["shop.test", "*.tenants.test", "+", "127.0.0.2", "*", "*"]
        );
        let p = problems(&format!(
            "[server]\nlisten = [\"127.0.0.1:8080\"]\n{POOL}{}{}{}{}{}",
            route("shop.test", "/"),
            route("SHOP.test", "/"),
            route("a..b", "/"),
            route("shop.test:80", "/"),
            route("", "/x/"),
        ));
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "route[1].prefix",
                "route[2].host",
                "route[3].host",
                "route[4].host"
            ]
        );
        assert!(
            p[0].reason
                .contains("same prefix as route[0] for the same host"),
            "{}",
            p[0].reason
        );
        assert!(p[1].reason.contains("empty label"), "{}", p[1].reason);
        assert!(p[2].reason.contains("no port"), "{}", p[2].reason);
    }

    #[test]
    fn a_static_entry_answers_every_host_or_the_one_it_names() {
        let file = |host: &str, path: &str| {
            let host = if host.is_empty() {
                String::new()
            } else {
                format!("host = \"{host}\"\n")
            };
            format!("[[cache.static]]\n{host}path = \"{path}\"\nfile = \"/etc/hostname\"\n")
        };
        let head = format!("[server]\nlisten = [\"127.0.0.1:8080\"]\n{POOL}");
        let c = check(&format!(
            "{head}{}{}{}",
            file("", "/a"),
            file("Shop.Test", "/a"),
            file("*", "/b")
        ))
        .unwrap();
        let hosts: Vec<&str> = c.cache.statics.iter().map(|s| s.host.as_str()).collect();
        assert_eq!(hosts, [ANY_HOST, "shop.test", ANY_HOST]);
        let p = problems(&format!(
            "{head}{}{}{}",
            file("*.shop.test", "/a"),
            file("shop.test", "/a"),
            file("SHOP.test", "/a")
        ));
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["cache.static[0].host", "cache.static[2].path"],
            "{p:#?}"
        );
    }

    #[test]
    fn activation_keys_default_to_iis_and_name_bad_values() {
        let c = check(&format!("[server]\nlisten = [\"127.0.0.1:8080\"]\n{POOL}")).unwrap();
        assert_eq!(c.pools[0].activation, Activation::default());
        assert_eq!(c.pools[0].activation.start, Start::OnDemand);
        assert_eq!(
            c.pools[0].activation.idle_timeout,
            Duration::from_secs(1200)
        );
        let c = check(&format!(
            "[server]\nlisten = [\"127.0.0.1:8080\"]\n{POOL}start = \"always\"\nidle_timeout = \"0\"\n\
             rapid_fail = {{ failures = 3, interval = \"1m\" }}\nrecycle = {{ time = \"2h\", requests = 10, memory = \"64MiB\" }}\n"
        ))
        .unwrap();
        let a = &c.pools[0].activation;
        assert_eq!(
            (a.start, a.idle_timeout, a.rapid_fail_failures),
            (Start::Always, Duration::ZERO, 3)
        );
        assert_eq!(
            (a.recycle_time, a.recycle_requests, a.recycle_memory),
            (Duration::from_secs(7200), 10, 64 << 20)
        );
        let p = problems(&format!(
            "[server]\nlisten = [\"127.0.0.1:8080\"]\nmetrics = \"nope\"\n{POOL}ping_timeout = \"0\"\nidle_timeout = \"5\"\n\
             user = \"no-such-user-here\"\nrecycle = {{ memory = \"lots\" }}\n"
        ));
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "server.metrics",
                "pool[0].idle_timeout",
                "pool[0].recycle.memory",
                "pool[0].ping_timeout",
                "pool[0].user"
            ],
            "{p:#?}"
        );
    }

    #[test]
    fn unknown_key_and_bad_steering_are_syntax_errors_naming_the_key() {
        let e = check("[server]\nlisten = [\"127.0.0.1:1\"]\nlisen = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lisen"), "{e}");
        let e = check("[server]\nlisten = [\"127.0.0.1:1\"]\nsteering = \"fast\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("fast") && e.contains("first-segment"), "{e}");
    }
}
