//! What a pool runs: a `sluice-worker` program (the control channel, hand-offs, hand-backs)
//! or any server that takes inherited listening sockets (`worker = "socket"`), and for the
//! latter how its readiness and health are judged and how its connections are routed.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use sluice_proto::route::RouteTable;

use super::{Pool, Route, units};

/// The protocol a pool's workers speak with the front end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkerKind {
    /// A program built on `sluice-worker`: pool sockets, the handoff channel and the control
    /// channel.
    #[default]
    Sluice,
    /// Any server that serves inherited listening sockets (gunicorn `--bind fd://3`, uvicorn
    /// `--fd 3`, Node `listen({fd: 3})`): it gets its pool's sockets only.
    Socket,
}

/// What decides the pool of a request on a connection steered to a socket pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Routing {
    /// Every request goes to its own route's pool (a socket pool must then own its hosts).
    #[default]
    Request,
    /// The first request of a connection decides the pool of the whole connection.
    Connection,
}

/// `tls` on a pool: who ends its TLS connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolTls {
    /// The front end (the default): its certificates, the session handed to the pool.
    Terminate,
    /// The pool's own server: the connection reaches it untouched, steered by SNI.
    Passthrough,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    path: String,
    interval: Option<String>,
    timeout: Option<String>,
}

/// `health = { path, interval, timeout }`: an HTTP GET the front end puts into the pool's
/// own queue (never another pool's) and expects a 2xx or 3xx answer to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
}

pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest health-check path.
const MAX_HEALTH_PATH: usize = 1024;

/// How a pool's workers run, beside the activation policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Runs {
    pub kind: WorkerKind,
    /// The workers' working directory (default: the config file's folder).
    pub cwd: Option<PathBuf>,
    pub health: Option<Health>,
    /// Prepend a PROXY v2 header to connections the front end relays to the pool.
    pub proxy_protocol: bool,
    pub routing: Routing,
    /// `tls = "passthrough"`: the pool's server ends TLS itself; its routes are SNI names.
    pub passthrough: bool,
}

/// The raw keys `Runs` is made from.
pub(super) struct RawRuns<'a> {
    pub kind: WorkerKind,
    pub cwd: Option<&'a Path>,
    pub health: Option<&'a RawHealth>,
    pub proxy_protocol: Option<bool>,
    pub routing: Option<Routing>,
    pub passthrough: bool,
    /// Keys that only the sluice-worker protocol uses, set for this pool.
    pub sluice_only: Vec<&'static str>,
}

pub(super) fn runs(raw: RawRuns<'_>, base: &Path, bad: &mut dyn FnMut(&str, String)) -> Runs {
    let socket = raw.kind == WorkerKind::Socket;
    if socket {
        for key in raw.sluice_only {
            bad(
                key,
                "is for sluice-worker pools; a socket worker has no control channel (use \
                 `health` to check it)"
                    .into(),
            );
        }
    } else {
        for (key, set) in [
            ("health", raw.health.is_some()),
            ("proxy_protocol", raw.proxy_protocol.is_some()),
            ("routing", raw.routing.is_some()),
        ] {
            if set {
                bad(key, "is for `worker = \"socket\"` pools".into());
            }
        }
    }
    if raw.passthrough && !socket {
        bad(
            "tls",
            "passthrough gives the connection to the pool's own TLS server: it needs \
             worker = \"socket\""
                .into(),
        );
    }
    if raw.passthrough && raw.health.is_some() {
        bad(
            "health",
            "is a plain HTTP GET; a passthrough pool's server speaks TLS".into(),
        );
    }
    let cwd = raw.cwd.map(|c| {
        let dir = if c.is_absolute() {
            c.to_path_buf()
        } else {
            base.join(c)
        };
        if !dir.is_dir() {
            bad("cwd", format!("`{}` is not a directory", dir.display()));
        }
        dir
    });
    let health = raw.health.map(|h| {
        if !h.path.starts_with('/')
            || h.path.len() > MAX_HEALTH_PATH
            || h.path.bytes().any(|b| !b.is_ascii_graphic())
        {
            bad(
                "health.path",
                format!(
                    "`{}` must be a path starting with `/`, visible ASCII, at most \
                     {MAX_HEALTH_PATH} bytes",
                    h.path
                ),
            );
        }
        let mut dur = |key: &str, v: &Option<String>, default: Duration| match v {
            None => default,
            Some(text) => match units::duration(text) {
                Ok(d) if d.is_zero() => {
                    bad(key, "must be more than 0".into());
                    default
                }
                Ok(d) => d,
                Err(reason) => {
                    bad(key, reason);
                    default
                }
            },
        };
        Health {
            path: h.path.clone(),
            interval: dur("health.interval", &h.interval, DEFAULT_HEALTH_INTERVAL),
            timeout: dur("health.timeout", &h.timeout, DEFAULT_HEALTH_TIMEOUT),
        }
    });
    Runs {
        kind: raw.kind,
        cwd,
        health,
        proxy_protocol: raw.proxy_protocol.unwrap_or(false),
        routing: raw.routing.unwrap_or_default(),
        passthrough: raw.passthrough,
    }
}

/// What is wrong with the routes of passthrough pools: the front end sees only the SNI
/// name of their connections, so each route names a host (exact or `*.suffix`) and the
/// prefix `/`, and no other pool routes that host. Returns (route index, reason).
pub(super) fn passthrough_problems(pools: &[Pool], routes: &[Route]) -> Vec<(usize, String)> {
    let passthrough = |r: &Route| pools.get(r.pool).is_some_and(|p| p.runs.passthrough);
    let mut out = Vec::new();
    for (i, r) in routes.iter().enumerate() {
        if !passthrough(r) {
            continue;
        }
        let named = matches!(
            r.site,
            sluice_proto::site::Site::Exact(_) | sluice_proto::site::Site::Wildcard(_)
        );
        if !named || r.prefix != "/" {
            out.push((
                i,
                format!(
                    "pool `{}` is tls = \"passthrough\": its routes name a host (SNI) and the \
                     prefix `/`, since its connections are steered before any request is \
                     read (this one is {} {})",
                    pools[r.pool].name, r.site, r.prefix
                ),
            ));
            continue;
        }
        for (j, other) in routes.iter().enumerate() {
            if other.site == r.site && other.pool != r.pool {
                out.push((
                    j,
                    format!(
                        "host {} is passed through to pool `{}`'s own TLS server (route[{i}]); \
                         no other pool can serve it",
                        r.site, pools[r.pool].name
                    ),
                ));
            }
        }
    }
    out
}

/// A socket pool with `routing = "request"` that a trusting site gives shared connections:
/// a client whose first request reached the socket pool may send, on the same connection
/// and to the same host, a request that routes elsewhere, and the socket worker (which
/// cannot hand a connection back) would answer it. Hosts without trust are the front end's
/// and deliver each request to its pool, so they need nothing. Returns (pool index, reason
/// naming the routes).
pub(super) fn shared_hosts(
    pools: &[Pool],
    routes: &[Route],
    trust: &sluice_proto::ownership::Trust,
) -> Vec<(usize, String)> {
    let table = RouteTable::new(
        routes
            .iter()
            .enumerate()
            .map(|(i, r)| (r.site.clone(), r.prefix.clone(), i)),
    );
    let strict = |pool: usize| {
        pools.get(pool).is_some_and(|p| {
            p.runs.kind == WorkerKind::Socket && p.runs.routing == Routing::Request
        })
    };
    if !routes.iter().any(|r| strict(r.pool)) {
        return Vec::new();
    }
    let samples = table.samples();
    // (socket pool, other pool) -> (a host, a route of each).
    let mut found: BTreeMap<(usize, usize), (String, usize, usize)> = BTreeMap::new();
    for host in &samples.hosts {
        for local in &samples.locals {
            let owner = sluice_proto::ownership::owner(&table, trust, host.as_deref(), *local);
            if owner != sluice_proto::ownership::Owner::Trusted {
                continue;
            }
            let reached: BTreeSet<usize> = samples
                .paths
                .iter()
                .filter_map(|path| {
                    table.lookup(&sluice_proto::route::Query {
                        host: host.as_deref(),
                        local: *local,
                        path,
                    })
                })
                .collect();
            for &a in &reached {
                let pa = routes[a].pool;
                if !strict(pa) {
                    continue;
                }
                for &b in &reached {
                    let pb = routes[b].pool;
                    if pb != pa {
                        found
                            .entry((pa, pb))
                            .or_insert_with(|| (describe(host.as_deref(), *local), a, b));
                    }
                }
            }
        }
    }
    found
        .into_iter()
        .map(|((pa, pb), (host, a, b))| {
            (
                pa,
                format!(
                    "pool `{}` (worker = \"socket\") shares {host} with pool `{}`: route[{a}] \
                     ({} {}) and route[{b}] ({} {}); a socket worker answers every request \
                     of its connections and cannot hand one back, so leave the site's trust_pools \
                     out or set routing = \"connection\" (the first request of a connection \
                     decides its pool)",
                    pools[pa].name,
                    pools[pb].name,
                    routes[a].site,
                    routes[a].prefix,
                    routes[b].site,
                    routes[b].prefix,
                ),
            )
        })
        .collect()
}

fn describe(host: Option<&str>, local: Option<IpAddr>) -> String {
    match (host, local) {
        (Some(h), Some(a)) => format!("host `{h}` on {a}"),
        (Some(h), None) => format!("host `{h}`"),
        (None, Some(a)) => format!("requests without a host on {a}"),
        (None, None) => "requests without a host".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError, Problem};

    fn parse(text: &str) -> Result<Config, Vec<Problem>> {
        match Config::parse(text, Path::new("/tmp/sluice-test.toml")) {
            Ok(c) => Ok(c),
            Err(ConfigError::Invalid { problems, .. }) => Err(problems),
            Err(other) => panic!("{other}"),
        }
    }

    const SERVER: &str = "[server]\nlisten = [\"127.0.0.1:80\"]\n";

    fn pool(name: &str, extra: &str) -> String {
        format!("[[pool]]\nname = \"{name}\"\ncommand = [\"/bin/true\"]\n{extra}\n")
    }

    fn route(host: Option<&str>, prefix: &str, pool: &str) -> String {
        let host = host.map_or(String::new(), |h| format!("host = \"{h}\"\n"));
        format!("[[route]]\n{host}prefix = \"{prefix}\"\npool = \"{pool}\"\n")
    }

    #[test]
    fn a_socket_pool_gets_health_defaults_and_sluice_only_keys_are_refused() {
        let c = parse(&format!(
            "{SERVER}{}",
            pool(
                "app",
                "worker = \"socket\"\nhealth = { path = \"/healthz\" }"
            )
        ))
        .unwrap();
        let runs = &c.pools[0].runs;
        assert_eq!(runs.kind, WorkerKind::Socket);
        assert_eq!(
            runs.health,
            Some(Health {
                path: "/healthz".into(),
                interval: DEFAULT_HEALTH_INTERVAL,
                timeout: DEFAULT_HEALTH_TIMEOUT,
            })
        );
        let p = parse(&format!(
            "{SERVER}{}{}",
            pool(
                "app",
                "worker = \"socket\"\nthreads = 2\nping_interval = \"5s\"\n\
                 health = { path = \"healthz\", timeout = \"0s\" }\ncwd = \"/nonexistent-dir\""
            ),
            pool("web", "proxy_protocol = true\nrouting = \"connection\"")
        ))
        .unwrap_err();
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "pool[0].threads",
                "pool[0].ping_interval",
                "pool[0].cwd",
                "pool[0].health.path",
                "pool[0].health.timeout",
                "pool[1].proxy_protocol",
                "pool[1].routing",
            ],
            "{p:?}"
        );
    }

    #[test]
    fn a_socket_pool_shares_a_host_by_delivery_unless_the_site_trusts_its_pools() {
        let socket = "worker = \"socket\"";
        let trust = |host: &str| format!("[[site]]\nhost = \"{host}\"\ntrust_pools = true\n");
        // A site of its own, or a host split between pools without trust: the front end
        // delivers each request to its pool, so nothing is refused.
        for shop in ["/", "/app/"] {
            parse(&format!(
                "{SERVER}{}{}{}{}",
                pool("shop", socket),
                pool("web", ""),
                route(Some("shop.test"), shop, "shop"),
                route(None, "/", "web"),
            ))
            .unwrap();
        }
        // A trusting site shares connections: a socket worker cannot hand one back.
        let p = parse(&format!(
            "{SERVER}{}{}{}{}{}{}",
            pool("shop", socket),
            pool("web", ""),
            route(Some("shop.test"), "/app/", "shop"),
            route(None, "/", "web"),
            trust("shop.test"),
            trust("*"),
        ))
        .unwrap_err();
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "pool[0].routing");
        assert!(
            p[0].reason.contains("host `shop.test`")
                && p[0].reason.contains("route[0] (shop.test /app/)")
                && p[0].reason.contains("route[1] (* /)"),
            "{}",
            p[0].reason
        );
        // Two socket pools on one trusting host refuse each other.
        let p = parse(&format!(
            "{SERVER}{}{}{}{}{}",
            pool("a", socket),
            pool("b", socket),
            route(None, "/a/", "a"),
            route(None, "/", "b"),
            trust("*"),
        ))
        .unwrap_err();
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["pool[0].routing", "pool[1].routing"], "{p:?}");
        // routing = "connection" says the first request decides.
        parse(&format!(
            "{SERVER}{}{}{}{}{}{}",
            pool("shop", "worker = \"socket\"\nrouting = \"connection\""),
            pool("web", ""),
            route(Some("shop.test"), "/app/", "shop"),
            route(None, "/", "web"),
            trust("shop.test"),
            trust("*"),
        ))
        .unwrap();
    }

    #[test]
    fn a_trusting_site_names_a_routed_host_once_and_is_warned_of() {
        let site = |host: &str| format!("[[site]]\nhost = \"{host}\"\ntrust_pools = true\n");
        let base = format!(
            "{SERVER}{}{}{}{}",
            pool("api", ""),
            pool("web", ""),
            route(None, "/api/", "api"),
            route(None, "/", "web"),
        );
        let c = parse(&format!("{base}{}", site("*"))).unwrap();
        let w = c.warnings();
        assert!(
            w.iter()
                .any(|p| p.key == "site.trust_pools" && p.reason.contains("api, web")),
            "{w:?}"
        );
        let p = parse(&format!("{base}{}", site("other.test"))).unwrap_err();
        assert_eq!(p[0].key, "site[0].host", "{p:?}");
        assert!(p[0].reason.contains("no route names this host"), "{p:?}");
        let p = parse(&format!("{base}{}{}", site("*"), site("*"))).unwrap_err();
        assert_eq!(p[0].key, "site[1].host", "{p:?}");
        let p = parse(&format!("{base}{}", site("a..b"))).unwrap_err();
        assert_eq!(p[0].key, "site[0].host", "{p:?}");
    }

    #[test]
    fn a_passthrough_pool_is_a_socket_pool_whose_routes_are_whole_named_hosts_of_its_own() {
        const TLS: &str =
            "[server]\nlisten = [\"127.0.0.1:80\"]\nlisten_tls = [\"127.0.0.1:443\"]\n";
        let pt = "worker = \"socket\"\ntls = \"passthrough\"";
        // Without [[tls.certificate]] only that is refused: a passthrough pool needs none.
        let p = parse(&format!(
            "{TLS}{}{}{}",
            pool("own", pt),
            route(Some("own.test"), "/", "own"),
            route(Some("*.own.test"), "/", "own"),
        ))
        .unwrap_err();
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["tls.certificate"], "{p:?}");
        let p = parse(&format!(
            "{SERVER}{}{}{}{}{}{}",
            pool("own", &format!("{pt}\nhealth = {{ path = \"/h\" }}")),
            pool("web", "tls = \"passthrough\""),
            route(Some("own.test"), "/app/", "own"),
            route(None, "/", "own"),
            route(Some("b.test"), "/", "own"),
            route(Some("b.test"), "/x/", "web"),
        ))
        .unwrap_err();
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "pool[0].health",
                "pool[1].tls",
                "route[0]",
                "route[1]",
                "route[3]",
                "route[3]",
                "pool[0].tls",
                "pool[1].tls",
            ],
            "{p:?}"
        );
        assert!(p[2].reason.contains("prefix `/`"), "{}", p[2].reason);
        assert!(
            p[4].reason.contains("passed through to pool `own`"),
            "{}",
            p[4].reason
        );
        assert!(
            p[6].reason.contains("needs server.listen_tls"),
            "{}",
            p[6].reason
        );
    }

    #[test]
    fn redirect_https_needs_a_tls_listener_to_name() {
        let p = parse(&format!(
            "[server]\nlisten = [\"127.0.0.1:80\"]\nredirect_https = true\n{}",
            pool("web", "")
        ))
        .unwrap_err();
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "server.redirect_https");
    }
}
