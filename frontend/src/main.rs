//! `sluice`: the front end. `check` validates a config, `run` serves it, `status` asks a
//! running front end over its admin socket.

use std::path::PathBuf;

use sluice::{admin, config, server, status};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "HTTP front end: eBPF-steered application pools with io_uring workers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a config file and report every problem, naming its key.
    Check { config: PathBuf },
    /// Serve a config: load the kernel programs, open the pools' queues, start the workers.
    Run { config: PathBuf },
    /// Show pools, workers, queue lengths and steering counters of a running front end.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The admin socket (default: the one in --config, else /run/sluice/admin.sock).
        #[arg(long)]
        admin: Option<PathBuf>,
        /// Read the admin socket path from this config file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Show which pool a config's router picks for each request target, by the rule the
    /// dispatcher and every worker apply (`GET TARGET HTTP/1.1` with `Host: HOST`, or
    /// `HTTP/1.0` without a Host when --host is not given); the kernel program agrees
    /// wherever it steers.
    Route {
        config: PathBuf,
        /// The `Host` the requests name.
        #[arg(long, conflicts_with = "heads")]
        host: Option<String>,
        /// The local address the connections arrive on (for routes bound to an address).
        #[arg(long)]
        local: Option<std::net::IpAddr>,
        /// Whole request heads instead, one per line of this file, hex-encoded: each is judged
        /// as the dispatcher judges it (`pool NAME`, `refuse STATUS REASON` or `partial`).
        #[arg(long, conflicts_with = "paths")]
        heads: Option<PathBuf>,
        /// Request targets, such as `/api/x?q=1`, `/a/../b` or `http://host/x`.
        #[arg(required_unless_present = "heads")]
        paths: Vec<String>,
    },
    /// Re-read the running front end's config file and apply it (like SIGHUP); a config that
    /// does not check is refused and the running one stays.
    Reload {
        /// The admin socket (default: the one in --config, else /run/sluice/admin.sock).
        #[arg(long)]
        admin: Option<PathBuf>,
        /// Read the admin socket path from this config file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Replace the running front end's program with the binary at its path (a new build),
    /// in place: its sockets, queued connections, workers and counters carry over. Waits
    /// until the new program serves, or says why it did not (the running one serves on).
    Upgrade {
        /// The admin socket (default: the one in --config, else /run/sluice/admin.sock).
        #[arg(long)]
        admin: Option<PathBuf>,
        /// Read the admin socket path from this config file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// The front end's response cache.
    Cache {
        #[command(subcommand)]
        action: CacheAction,
        /// The admin socket (default: the one in --config, else /run/sluice/admin.sock).
        #[arg(long, global = true)]
        admin: Option<PathBuf>,
        /// Read the admin socket path from this config file.
        #[arg(long, global = true)]
        config: Option<PathBuf>,
    },
    /// Act on one pool of a running front end.
    Pool {
        #[command(subcommand)]
        action: PoolAction,
        /// The admin socket (default: the one in --config, else /run/sluice/admin.sock).
        #[arg(long, global = true)]
        admin: Option<PathBuf>,
        /// Read the admin socket path from this config file.
        #[arg(long, global = true)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CacheAction {
    /// Every cached response: path, size, age, time to live, hits, origin.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Drop one cached path, or everything.
    Purge { path: Option<String> },
}

#[derive(Subcommand)]
enum PoolAction {
    /// Run a pool that rapid-fail protection stopped (or start an idle one now).
    Start { name: String },
    /// Replace every worker of the pool, overlapped: the new ones start first.
    Recycle { name: String },
}

fn admin_path(admin: Option<PathBuf>, config: Option<PathBuf>) -> Result<PathBuf> {
    Ok(match (admin, config) {
        (Some(p), _) => p,
        (None, Some(c)) => config::Config::load(&c)?.admin_socket,
        (None, None) => PathBuf::from(config::DEFAULT_ADMIN_SOCKET),
    })
}

/// `sluice upgrade`: asks, then watches status until the count of upgrades moves (done) or
/// the error changes (failed).
fn upgrade(admin_socket: &std::path::Path) -> Result<()> {
    let read = || -> Result<status::Status> {
        Ok(serde_json::from_str(&admin::ask(admin_socket, "status")?)?)
    };
    let before = read()?;
    let answer = admin::ask(admin_socket, "upgrade")?;
    print!("{answer}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        // Between the programs the admin socket does not answer for a moment.
        if let Ok(now) = read() {
            if now.upgrades > before.upgrades {
                println!(
                    "upgraded: the new program serves (upgrade {})",
                    now.upgrades
                );
                return Ok(());
            }
            if now.upgrade_error.is_some() && now.upgrade_error != before.upgrade_error {
                anyhow::bail!(
                    "the upgrade failed, the earlier program serves on: {}",
                    now.upgrade_error.unwrap_or_default()
                );
            }
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("the front end did not report the upgrade's outcome within 60 s");
        }
    }
}

/// The error and its causes, each said once (some libraries' messages repeat their cause,
/// which the chain then gives again), and for a permission error the privileges it needs.
fn report(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    let denied = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::EPERM))
    });
    if denied && !text.contains("needs root") {
        text.push_str(
            " (sluice needs root with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, or CAP_SYS_ADMIN, \
             for its kernel programs, and CAP_SETUID/CAP_SETGID for its workers; the step \
             named first is the one that was refused)",
        );
    }
    text
}

/// Bytes from their hex digits.
fn hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    if let Err(e) = real_main() {
        eprintln!("sluice: {}", report(&e));
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    match Cli::parse().command {
        Command::Check { config } => {
            let c = config::Config::load(&config)?;
            println!(
                "{}: ok ({} listen address(es), {} pool(s), {} route(s), steering {})",
                config.display(),
                c.listen.len(),
                c.pools.len(),
                c.routes.len(),
                c.steering.as_str()
            );
            for p in c.unrouted_pools() {
                println!("warning: pool {p} has no route");
            }
            for w in c.warnings() {
                println!("warning: {w}");
            }
            Ok(())
        }
        Command::Run { config } => {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                anyhow::bail!(
                    "sluice run needs root: CAP_BPF and CAP_NET_ADMIN to load and attach its kernel \
                     programs, CAP_SETUID and CAP_SETGID to run each pool's workers as its own user"
                );
            }
            server::run_path(&config)
        }
        Command::Upgrade { admin, config } => upgrade(&admin_path(admin, config)?),
        Command::Route {
            config,
            host,
            local,
            heads,
            paths,
        } => {
            let c = config::Config::load(&config)?;
            // The ids a fresh front end gives the config's pools: their places in it.
            let table = sluice::route::RouteTable::new(c.plain_routes().map(|r| {
                let id = sluice::pool::PoolId::new(r.pool);
                (r.site.clone(), r.prefix.clone(), id)
            }));
            let limits = c.limits.head_limits();
            let judge = |head: &[u8]| {
                use sluice::pipeline::head::{Decision, inspect};
                match inspect(head, &limits, &table, local, "").decision {
                    Decision::Pool(id) => format!("pool {}", c.pools[id.index()].name),
                    Decision::Refuse(code, why) => format!("refuse {code} {why}"),
                    Decision::NeedMore => "partial".to_owned(),
                }
            };
            if let Some(file) = heads {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                for (n, line) in text.lines().enumerate() {
                    let head = hex(line.trim())
                        .with_context(|| format!("{}:{}: not hex", file.display(), n + 1))?;
                    println!("{}", judge(&head));
                }
                return Ok(());
            }
            for target in paths {
                let head = match &host {
                    Some(h) => format!("GET {target} HTTP/1.1\r\nHost: {h}\r\n\r\n"),
                    None => format!("GET {target} HTTP/1.0\r\n\r\n"),
                };
                println!("{target}\t{}", judge(head.as_bytes()));
            }
            Ok(())
        }
        Command::Cache {
            action,
            admin,
            config,
        } => {
            let path = admin_path(admin, config)?;
            match action {
                CacheAction::List { json } => {
                    let answer = admin::ask(&path, "cache list")?;
                    if json {
                        println!("{}", answer.trim());
                    } else {
                        let list: Vec<sluice::cache::Listed> =
                            serde_json::from_str(&answer).context("reading the cache list")?;
                        println!(
                            "{:<40} {:>9} {:>7} {:>9} {:>8}  origin",
                            "path", "bytes", "age_s", "ttl_left", "hits"
                        );
                        for e in list {
                            println!(
                                "{:<40} {:>9} {:>7} {:>9} {:>8}  {}",
                                e.path, e.bytes, e.age_s, e.ttl_left_s, e.hits, e.origin
                            );
                        }
                    }
                }
                CacheAction::Purge { path: p } => {
                    let command = match p {
                        Some(p) => format!("cache purge {p}"),
                        None => "cache purge".to_owned(),
                    };
                    print!("{}", admin::ask(&path, &command)?);
                }
            }
            Ok(())
        }
        Command::Reload { admin, config } => {
            print!("{}", admin::ask(&admin_path(admin, config)?, "reload")?);
            Ok(())
        }
        Command::Pool {
            action,
            admin,
            config,
        } => {
            let path = admin_path(admin, config)?;
            let command = match action {
                PoolAction::Start { name } => format!("pool start {name}"),
                PoolAction::Recycle { name } => format!("pool recycle {name}"),
            };
            print!("{}", admin::ask(&path, &command)?);
            Ok(())
        }
        Command::Status {
            json,
            admin,
            config,
        } => {
            let path = admin_path(admin, config)?;
            let answer = admin::ask(&path, "status")?;
            if json {
                print!("{answer}");
            } else {
                let s: status::Status =
                    serde_json::from_str(&answer).context("reading the status answer")?;
                print!("{}", s.render());
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::report;

    #[derive(Debug, thiserror::Error)]
    #[error("failed to create map `X`")]
    struct Create(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("map error: {0}")]
    struct Repeats(#[source] Create);

    #[test]
    fn a_cause_a_message_already_says_is_not_said_again_and_eperm_names_the_privileges() {
        let e = anyhow::Error::new(Repeats(Create(std::io::Error::from_raw_os_error(
            libc::EPERM,
        ))))
        .context("loading the eBPF object: map error: failed to create map `X`")
        .context("loading the steering programs");
        let text = report(&e);
        assert_eq!(text.matches("failed to create map").count(), 1, "{text}");
        assert!(
            text.starts_with(
                "loading the steering programs: loading the eBPF object: map error: failed to \
                 create map `X`: Operation not permitted"
            ),
            "{text}"
        );
        assert!(text.contains("CAP_BPF"), "{text}");
        let plain = report(&anyhow::anyhow!("no such pool"));
        assert_eq!(plain, "no such pool");
    }
}
