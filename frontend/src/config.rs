//! The TOML configuration: parsed strictly, then checked as a whole so that every problem is
//! reported at once, each naming its key and the reason.

use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use sluice_common::{MAX_POOLS, MAX_PREFIX, MAX_ROUTES, SOCKET_SLOTS};

use crate::route;

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
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: {} problem(s):\n{}", problems.len(), list(problems))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
}

fn list(problems: &[Problem]) -> String {
    problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n")
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Vec<String>,
    #[serde(default = "default_steering")]
    steering: Steering,
    #[serde(default)]
    set_sysctls: bool,
    #[serde(default = "default_admin_socket")]
    admin_socket: PathBuf,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
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
    pub pools: Vec<Pool>,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone)]
pub struct Pool {
    pub name: String,
    /// `command[0]` resolved to an executable path.
    pub program: PathBuf,
    pub args: Vec<String>,
    pub processes: u32,
    pub queue_length: u32,
    pub threads: Option<u32>,
    pub sockets: u32,
}

#[derive(Debug, Clone)]
pub struct Route {
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
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
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
            bad("server.listen".into(), "needs at least one address, e.g. \"127.0.0.1:8080\"".into());
        }
        for (i, a) in raw.server.listen.iter().enumerate() {
            match a.parse::<SocketAddr>() {
                Ok(addr) if addr.port() == 0 => {
                    bad(format!("server.listen[{i}]"), format!("`{a}` needs a port other than 0"))
                }
                Ok(addr) if listen.contains(&addr) => {
                    bad(format!("server.listen[{i}]"), format!("`{a}` is listed twice"))
                }
                Ok(addr) => listen.push(addr),
                Err(_) => bad(
                    format!("server.listen[{i}]"),
                    format!("`{a}` is not an address:port (IPv6 as \"[::1]:8080\")"),
                ),
            }
        }
        if raw.server.admin_socket.as_os_str().is_empty() {
            bad("server.admin_socket".into(), "must not be empty".into());
        }

        if raw.pools.len() > MAX_POOLS as usize {
            bad("pool".into(), format!("{} pools; at most {MAX_POOLS}", raw.pools.len()));
        }
        let mut names = HashSet::new();
        let mut pools = Vec::new();
        let mut slots = 1u32; // slot 0: the dispatcher
        for (i, p) in raw.pools.iter().enumerate() {
            let key = |k: &str| format!("pool[{i}].{k}");
            if p.name.is_empty()
                || !p.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                bad(key("name"), format!("`{}` must be letters, digits, `-` or `_`", p.name));
            } else if !names.insert(p.name.clone()) {
                bad(key("name"), format!("pool `{}` is defined twice", p.name));
            }
            let program = match p.command.first() {
                None => {
                    bad(key("command"), "is empty; give the worker program and its arguments".into());
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
                bad(key("processes"), format!("{} is out of range 1..={MAX_PROCESSES}", p.processes));
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
                bad(key("sockets"), format!("{} is out of range 1..={MAX_SOCKETS_PER_POOL}", p.sockets));
            }
            slots += p.sockets;
            pools.push(Pool {
                name: p.name.clone(),
                program,
                args: p.command.iter().skip(1).cloned().collect(),
                processes: p.processes,
                queue_length: p.queue_length,
                threads: p.threads,
                sockets: p.sockets,
            });
        }
        if slots > SOCKET_SLOTS {
            bad("pool".into(), format!("{slots} sockets in all; at most {SOCKET_SLOTS}"));
        }

        if raw.routes.len() > MAX_ROUTES as usize {
            bad("route".into(), format!("{} routes; at most {MAX_ROUTES}", raw.routes.len()));
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
                    bad(format!("route[{i}].prefix"), format!("`{}` {reason}", r.prefix));
                    None
                }
            };
            let pool = raw.pools.iter().position(|p| p.name == r.pool);
            if pool.is_none() {
                bad(format!("route[{i}].pool"), format!("no pool is named `{}`", r.pool));
            }
            if let (Some(prefix), Some(pool)) = (prefix, pool) {
                if let Some(j) = routes.iter().position(|x| x.prefix == prefix) {
                    bad(
                        format!("route[{i}].prefix"),
                        format!("`{}` is the same prefix as an earlier route ({prefix})", r.prefix),
                    );
                    let _ = j;
                } else {
                    routes.push(Route { prefix, pool });
                }
            }
        }

        if !problems.is_empty() {
            return Err(ConfigError::Invalid { path: path.to_owned(), problems });
        }
        Ok(Config {
            path: path.to_owned(),
            listen,
            steering: raw.server.steering,
            set_sysctls: raw.server.set_sysctls,
            admin_socket: raw.server.admin_socket,
            pools,
            routes,
        })
    }

    /// Names of pools no route leads to (served only if a later config routes to them).
    pub fn unrouted_pools(&self) -> Vec<&str> {
        self.pools
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.routes.iter().any(|r| r.pool == *i))
            .map(|(_, p)| p.name.as_str())
            .collect()
    }
}

/// Resolves a worker program: a path with `/` against the config's folder, a bare name on PATH.
fn resolve_program(prog: &str, base: &Path) -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = if prog.contains('/') {
        let p = Path::new(prog);
        vec![if p.is_absolute() { p.to_path_buf() } else { base.join(p) }]
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
    fn unknown_key_and_bad_steering_are_syntax_errors_naming_the_key() {
        let e = check("[server]\nlisten = [\"127.0.0.1:1\"]\nlisen = 1\n").unwrap_err().to_string();
        assert!(e.contains("lisen"), "{e}");
        let e = check("[server]\nlisten = [\"127.0.0.1:1\"]\nsteering = \"fast\"\n").unwrap_err().to_string();
        assert!(e.contains("fast") && e.contains("first-segment"), "{e}");
    }
}
