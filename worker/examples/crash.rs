//! A worker that fails on purpose, for the front end's failure tests. It answers like `hello`
//! (`200`, `x-sluice-pool`, body `crash worker pool <pool> pid <pid>`), with behaviours chosen
//! by arguments (they combine):
//!
//! - `--exit-on PREFIX`: a request whose path starts with PREFIX exits the process with status
//!   3 without answering.
//! - `--hang-on PREFIX`: a request whose path starts with PREFIX blocks its thread forever.
//! - `--exit-after N`: exits with status 3 right after answering the N-th request (counted over
//!   the whole process); later requests are not answered.
//! - `--fail-start`: exits with status 2 at once, before serving.
//! - `--start-delay SECS`: sleeps that long before serving.
//!
//! Other arguments (`--listen ADDR`) go to the library.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sluice_worker::{Context, Options, Request, Response};

const USAGE: &str = "usage: crash [--exit-on PREFIX] [--hang-on PREFIX] [--exit-after N] \
                     [--fail-start] [--start-delay SECS] [--listen ADDR]...";
/// How long after returning the N-th response `--exit-after` exits: the runtime sends it in
/// the meantime (it is queued on the connection's ring as soon as the handler returns).
const EXIT_AFTER_GRACE: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
struct Behaviour {
    exit_on: Vec<String>,
    hang_on: Vec<String>,
    exit_after: Option<u64>,
    fail_start: bool,
    start_delay: Option<Duration>,
    /// Arguments for the library (`--listen`).
    rest: Vec<String>,
}

fn usage(problem: &str) -> ! {
    eprintln!("crash: {problem}\n{USAGE}");
    std::process::exit(2);
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Behaviour {
    let mut b = Behaviour::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_string(), Some(value.into())),
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| -> String {
            inline
                .clone()
                .or_else(|| args.next())
                .unwrap_or_else(|| usage(&format!("{flag} needs {what}")))
        };
        match flag.as_str() {
            "--exit-on" => b.exit_on.push(value("a path prefix")),
            "--hang-on" => b.hang_on.push(value("a path prefix")),
            "--exit-after" => {
                let n = value("a count");
                match n.parse::<u64>() {
                    Ok(n) if n > 0 => b.exit_after = Some(n),
                    _ => usage(&format!("--exit-after {n:?}: not a positive integer")),
                }
            }
            "--start-delay" => {
                let secs = value("seconds");
                match secs.parse::<f64>() {
                    Ok(s) if s.is_finite() && s >= 0.0 => {
                        b.start_delay = Some(Duration::from_secs_f64(s));
                    }
                    _ => usage(&format!("--start-delay {secs:?}: not a number of seconds")),
                }
            }
            "--fail-start" if inline.is_none() => b.fail_start = true,
            "--listen" => {
                b.rest.push("--listen".into());
                b.rest.push(value("an address"));
            }
            _ => usage(&format!("unknown argument {arg:?}")),
        }
    }
    b
}

fn main() -> Result<(), sluice_worker::Error> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let b = parse_args(std::env::args().skip(1));
    if b.fail_start {
        eprintln!("crash: --fail-start: exiting with status 2");
        std::process::exit(2);
    }
    if let Some(delay) = b.start_delay {
        log::info!("--start-delay: sleeping {delay:?} before serving");
        std::thread::sleep(delay);
    }
    let options = Options::from_env()?.with_args(b.rest.clone())?;
    let answered = AtomicU64::new(0);
    sluice_worker::run_with(options, move |req: &Request<'_>, ctx: &Context| {
        let path = req.path();
        if b.exit_on.iter().any(|p| path.starts_with(p.as_str())) {
            log::warn!("--exit-on: {path}: exiting with status 3");
            std::process::exit(3);
        }
        if b.hang_on.iter().any(|p| path.starts_with(p.as_str())) {
            log::warn!("--hang-on: {path}: blocking this thread forever");
            hang();
        }
        if let Some(limit) = b.exit_after {
            let n = answered.fetch_add(1, Ordering::SeqCst) + 1;
            if n > limit {
                // The exit is already scheduled; do not answer.
                hang();
            }
            if n == limit {
                log::warn!("--exit-after {limit}: exiting with status 3 after this response");
                std::thread::spawn(|| {
                    std::thread::sleep(EXIT_AFTER_GRACE);
                    std::process::exit(3);
                });
            }
        }
        let pool = ctx.pool().unwrap_or("standalone");
        Response::text(200, format!("crash worker pool {pool} pid {}\n", ctx.pid()))
            .header("x-sluice-pool", pool)
    })
}

fn hang() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_combine() {
        let args = [
            "--exit-on",
            "/die",
            "--hang-on=/hang",
            "--exit-after",
            "2",
            "--start-delay",
            "0.5",
            "--listen",
            "127.0.0.1:0",
        ]
        .map(String::from);
        let b = parse_args(args);
        assert_eq!(b.exit_on, ["/die"]);
        assert_eq!(b.hang_on, ["/hang"]);
        assert_eq!(b.exit_after, Some(2));
        assert_eq!(b.start_delay, Some(Duration::from_millis(500)));
        assert!(!b.fail_start);
        assert_eq!(b.rest, ["--listen", "127.0.0.1:0"]);
    }
}
