//! `cargo xtask bench`: sluice against the same worker serving the port alone ("direct", the
//! limit) and against nginx proxying to it, side by side in one run. Rounds alternate the
//! systems (A B C … A B C …) so drift on this noisy machine hits all of them alike; the
//! report gives medians and min–max, and ratios as medians of per-round ratios.
//!
//! Everything runs in network namespaces the benchmark makes (sysctls stay there): one with
//! `tcp_syncookies=2` for first-segment steering, one with the defaults for the rest.
//!
//! Beside throughput, every run measures CPU time per request: the server's processes
//! (`utime + stime` from `/proc/PID/stat`: front end and workers, or nginx and its upstream)
//! and the whole machine (busy time from `/proc/stat`, steal excluded). At saturation wrk and
//! the server share the two cores, which pulls throughput ratios toward 1; CPU per request
//! says what the server itself costs, and moves less between rounds.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{root, toolchain};

#[derive(clap::Args)]
pub struct Args {
    /// One short round of each scenario (under 3 minutes in all).
    #[arg(long)]
    quick: bool,
    /// Rounds (default 10; 1 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds per wrk run (default 5; 3 with --quick).
    #[arg(long)]
    seconds: Option<u64>,
    /// Where to write every figure as JSON (default target/bench.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Only these systems (comma-separated names): figures go to the JSON only, and
    /// docs/benchmarks.md stays as the last full run left it.
    #[arg(long)]
    only: Option<String>,
}

const CONNECTIONS: u32 = 50;

/// One system under test: where wrk points and which namespace it runs in.
struct Target {
    name: &'static str,
    ns: &'static str,
    url: String,
    close: bool,
    /// pids whose peak RSS is reported, by role.
    pids: Vec<(&'static str, u32)>,
    /// sluice's admin socket, for the fallback counters.
    admin: Option<PathBuf>,
    /// The `Host` wrk sends instead of the URL's.
    host: Option<&'static str>,
    /// A wrk script that makes the requests (the split systems alternate two paths).
    script: Option<PathBuf>,
}

struct Netns(String);

impl Netns {
    fn new(name: &str) -> Result<Netns> {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        crate::run(Command::new("ip").args(["netns", "add", name]))?;
        crate::run(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]))?;
        Ok(Netns(name.to_owned()))
    }
    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Processes the benchmark started; ended by pid on drop.
#[derive(Default)]
struct Procs(Vec<Child>);

impl Procs {
    fn spawn(&mut self, cmd: &mut Command, log: &Path) -> Result<u32> {
        let out = fs::File::create(log)?;
        let child = cmd
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("{cmd:?}"))?;
        let pid = child.id();
        self.0.push(child);
        Ok(pid)
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // SAFETY: signalling a child this benchmark started.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for c in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_http(ns: &Netns, url: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = ns
            .cmd("curl")
            .args(["-sfk", "-m", "2", "-o", "/dev/null", url])
            .status()
            .map(|s| s.success());
        if ok.unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} did not answer within 30 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The body both the front-end cache and nginx's `return 200` answer with.
const CACHED_BODY: &str = "hello from pool api pid 0000000\n";

fn sluice_config(
    dir: &Path,
    name: &str,
    listen: &str,
    steering: &str,
    hello: &Path,
    server_extra: &str,
) -> Result<(PathBuf, PathBuf)> {
    let admin = dir.join(format!("{name}.sock"));
    let cfg = dir.join(format!("{name}.toml"));
    let cached = dir.join("cached.txt");
    fs::write(&cached, CACHED_BODY)?;
    fs::write(
        &cfg,
        format!(
            "[server]\nlisten = [\"{listen}\"]\nsteering = \"{steering}\"\nset_sysctls = true\nadmin_socket = \"{}\"\n{server_extra}\n\
             [[cache.static]]\npath = \"/cached\"\nfile = \"{}\"\ncontent_type = \"text/plain\"\nttl = \"1h\"\n\n\
             [[pool]]\nname = \"api\"\ncommand = [\"{}\"]\nprocesses = 1\nthreads = 1\nstart = \"always\"\n\n\
             [[route]]\nprefix = \"/api/\"\npool = \"api\"\n",
            admin.display(),
            cached.display(),
            hello.display()
        ),
    )?;
    Ok((cfg, admin))
}

/// Two pools sharing one host by path (`/api/` and the rest): the front end keeps the
/// connections and delivers each request to its pool.
/// `threads`: the front end's delivery loops (None: its default, one per CPU).
fn split_config(
    dir: &Path,
    name: &str,
    listen: &str,
    hello: &Path,
    threads: Option<usize>,
) -> Result<(PathBuf, PathBuf)> {
    let admin = dir.join(format!("{name}.sock"));
    let cfg = dir.join(format!("{name}.toml"));
    let threads = threads.map_or(String::new(), |n| format!("threads = {n}\n"));
    let mut text = format!(
        "[server]\nlisten = [\"{listen}\"]\nsteering = \"first-segment\"\nset_sysctls = true\nadmin_socket = \"{}\"\n{threads}\n",
        admin.display()
    );
    for (pool, prefix) in [("api", "/api/"), ("web", "/")] {
        text.push_str(&format!(
            "[[pool]]\nname = \"{pool}\"\ncommand = [\"{}\"]\nprocesses = 1\nthreads = 1\nstart = \"always\"\n\n\
             [[route]]\nprefix = \"{prefix}\"\npool = \"{pool}\"\n\n",
            hello.display()
        ));
    }
    fs::write(&cfg, text)?;
    Ok((cfg, admin))
}

/// A wrk script whose requests alternate `/api/hello` and `/web/hello`.
fn alternate_script(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("alternate.lua");
    fs::write(
        &path,
        "local n = 0\nrequest = function()\n  n = n + 1\n  if n % 2 == 0 then\n    return wrk.format(\"GET\", \"/api/hello\")\n  end\n  return wrk.format(\"GET\", \"/web/hello\")\nend\n",
    )?;
    Ok(path)
}

/// The host `hosts_keepalive` names: one of three sites on one port.
const SITE_HOST: &str = "shop.example.test";

/// Three sites on one port (an exact host, a wildcard label, every other host), a pool each.
fn sites_config(dir: &Path, listen: &str, hello: &Path) -> Result<(PathBuf, PathBuf)> {
    let admin = dir.join("sites.sock");
    let cfg = dir.join("sites.toml");
    let mut text = format!(
        "[server]\nlisten = [\"{listen}\"]\nsteering = \"first-segment\"\nset_sysctls = true\nadmin_socket = \"{}\"\n\n",
        admin.display()
    );
    for (pool, host) in [
        ("shop", SITE_HOST),
        ("tenants", "*.tenants.test"),
        ("web", "*"),
    ] {
        text.push_str(&format!(
            "[[pool]]\nname = \"{pool}\"\ncommand = [\"{}\"]\nprocesses = 1\nthreads = 1\nstart = \"always\"\n\n\
             [[route]]\nhost = \"{host}\"\nprefix = \"/\"\npool = \"{pool}\"\n\n",
            hello.display()
        ));
    }
    fs::write(&cfg, text)?;
    Ok((cfg, admin))
}

/// One socket pool (a Node.js server on its inherited fd) serving every path.
fn socket_config(dir: &Path, listen: &str, node_app: &Path) -> Result<(PathBuf, PathBuf)> {
    let admin = dir.join("socket.sock");
    let cfg = dir.join("socket.toml");
    fs::write(
        &cfg,
        format!(
            "[server]\nlisten = [\"{listen}\"]\nsteering = \"first-segment\"\nset_sysctls = true\nadmin_socket = \"{}\"\n\n\
             [[pool]]\nname = \"node\"\nworker = \"socket\"\ncommand = [\"node\", \"{}\"]\nstart = \"always\"\n\n\
             [[route]]\nprefix = \"/\"\npool = \"node\"\n",
            admin.display(),
            node_app.display()
        ),
    )?;
    Ok((cfg, admin))
}

/// A self-signed certificate for the TLS systems (wrk does not verify it).
fn tls_certificate(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("tls.pem"), dir.join("tls.key"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=bench.test", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()?
        .success();
    if !ok {
        bail!("openssl could not make the benchmark's certificate");
    }
    Ok((cert, key))
}

/// sluice serving HTTPS on `tls` (plain `listen` beside it), the api pool, /cached, and the
/// Node.js socket pool on /node (plaintext to it through the TLS thread). The two pools share
/// the host and trust each other, so a session goes to the api worker with its keys (the
/// hand-off path the TLS systems measure; without trust the front end keeps such a host's
/// sessions and delivers each request).
/// `name` names its files; `threads`: its TLS and delivery loops (None: one per CPU).
fn tls_config(
    dir: &Path,
    (name, threads): (&str, Option<usize>),
    listen: &str,
    tls: &str,
    (hello, node_app): (&Path, &Path),
    (cert, key): (&Path, &Path),
) -> Result<(PathBuf, PathBuf)> {
    let admin = dir.join(format!("{name}.sock"));
    let cfg = dir.join(format!("{name}.toml"));
    let cached = dir.join("cached.txt");
    fs::write(&cached, CACHED_BODY)?;
    let threads = threads.map_or(String::new(), |n| format!("threads = {n}\n"));
    fs::write(
        &cfg,
        format!(
            "[server]\nlisten = [\"{listen}\"]\nlisten_tls = [\"{tls}\"]\nsteering = \"first-segment\"\nset_sysctls = true\nadmin_socket = \"{}\"\n{threads}\n\
             [[tls.certificate]]\nhosts = [\"bench.test\"]\ncert = \"{}\"\nkey = \"{}\"\n\n\
             [[cache.static]]\npath = \"/cached\"\nfile = \"{}\"\ncontent_type = \"text/plain\"\nttl = \"1h\"\n\n\
             [[pool]]\nname = \"api\"\ncommand = [\"{}\"]\nprocesses = 1\nthreads = 1\nstart = \"always\"\n\n\
             [[route]]\nprefix = \"/api/\"\npool = \"api\"\n\n\
             [[pool]]\nname = \"node\"\nworker = \"socket\"\nrouting = \"connection\"\ncommand = [\"node\", \"{}\"]\nstart = \"always\"\n\n\
             [[route]]\nprefix = \"/node\"\npool = \"node\"\n\n\
             [[site]]\nhost = \"*\"\ntrust_pools = true\n",
            admin.display(),
            cert.display(),
            key.display(),
            cached.display(),
            hello.display(),
            node_app.display()
        ),
    )?;
    Ok((cfg, admin))
}

fn status(sluice: &Path, admin: &Path) -> Result<Value> {
    let out = Command::new(sluice)
        .args(["status", "--json", "--admin"])
        .arg(admin)
        .output()?;
    if !out.status.success() {
        bail!("sluice status: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn worker_pids(st: &Value) -> Vec<u32> {
    st["pools"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["workers"].as_array().into_iter().flatten())
        .filter_map(|w| w["pid"].as_u64())
        .map(|p| p as u32)
        .collect()
}

fn fallbacks(st: &Value) -> u64 {
    let program: u64 = st["fallbacks"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    program.max(st["dispatcher"]["accepted"].as_u64().unwrap_or(0))
}

fn peak_rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmHWM:")
                    .map(|v| v.trim().trim_end_matches(" kB").trim().to_owned())
            })
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Children of `pid` (nginx's worker).
fn children(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[derive(Debug, Clone, Default)]
struct Run {
    rps: f64,
    requests: u64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    non_2xx: u64,
    /// CPU µs per request: the server's processes, and the whole machine (steal excluded).
    server_us: f64,
    machine_us: f64,
}

/// `utime + stime` of `pid` (all its threads), in clock ticks.
fn process_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which may hold spaces: state is field 3, utime 14.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0)
}

/// Busy ticks of the whole machine: all but idle, iowait and steal (`/proc/stat`).
fn machine_ticks() -> u64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    at(0) + at(1) + at(2) + at(5) + at(6)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn parse_duration_ms(s: &str) -> f64 {
    let s = s.trim();
    let (num, scale) = if let Some(v) = s.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1000.0)
    } else {
        (s, 1.0)
    };
    num.parse::<f64>().map(|v| v * scale).unwrap_or(f64::NAN)
}

fn parse_wrk(text: &str) -> Run {
    let mut r = Run::default();
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().unwrap_or(0.0);
        } else if line.contains(" requests in ") {
            r.requests = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("50%") {
            r.p50_ms = parse_duration_ms(v);
        } else if let Some(v) = line.strip_prefix("99%") {
            r.p99_ms = parse_duration_ms(v);
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            r.errors = v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v.trim().parse().unwrap_or(0);
        }
    }
    r
}

fn wrk(ns: &Netns, t: &Target, seconds: u64) -> Result<(Run, String)> {
    let mut c = ns.cmd("wrk");
    c.args([
        "-t1",
        &format!("-c{CONNECTIONS}"),
        &format!("-d{seconds}s"),
        "--latency",
    ]);
    if t.close {
        c.args(["-H", "Connection: close"]);
    }
    if let Some(host) = t.host {
        c.args(["-H", &format!("Host: {host}")]);
    }
    if let Some(script) = &t.script {
        c.arg("-s").arg(script);
    }
    c.arg(&t.url);
    let server = || {
        t.pids
            .iter()
            .map(|&(_, pid)| process_ticks(pid))
            .sum::<u64>()
    };
    let (server0, machine0) = (server(), machine_ticks());
    let out = c.output().context("running wrk")?;
    let (server1, machine1) = (server(), machine_ticks());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "wrk against {} failed: {}",
            t.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut run = parse_wrk(&text);
    let per_request =
        |ticks: u64| ticks as f64 / ticks_per_second() * 1e6 / run.requests.max(1) as f64;
    run.server_us = per_request(server1.saturating_sub(server0));
    run.machine_us = per_request(machine1.saturating_sub(machine0));
    Ok((run, text))
}

/// Lines in a file (the access log after a run).
fn count_lines(path: &Path) -> u64 {
    fs::read(path).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count() as u64)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn version(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| {
            let s = String::from_utf8_lossy(if o.stdout.is_empty() {
                &o.stderr
            } else {
                &o.stdout
            })
            .into_owned();
            s.lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_default()
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 10 });
    let seconds = args.seconds.unwrap_or(if args.quick { 3 } else { 5 });
    toolchain::ensure_packages(&[
        ("wrk", "wrk"),
        ("nginx", "nginx"),
        ("curl", "curl"),
        ("node", "nodejs"),
        ("openssl", "openssl"),
    ])?;
    crate::build()?;
    let root = root();
    let sluice = root.join("target/release/sluice");
    let hello = root.join("target/release/examples/hello");
    let dir = root.join("target/bench");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;

    let fs_ns = Netns::new("sluice-bench-fs")?;
    let base = Netns::new("sluice-bench")?;
    fs_ns
        .cmd("sysctl")
        .args(["-qw", "net.ipv4.tcp_syncookies=2"])
        .status()?;
    // With `Connection: close` the side that closes first keeps the TIME_WAIT. sluice lets
    // the client close first (first-segment steering needs that), so wrk's ports sit in
    // TIME_WAIT and, with the default range (28,232 ports, reusable after 1 s), cap any such
    // server near 14k connections/s on one client. A wide range takes that cap away for all.
    for ns in [&fs_ns, &base] {
        ns.cmd("sysctl")
            .args(["-qw", "net.ipv4.ip_local_port_range=1024 65535"])
            .status()?;
    }
    let mut procs = Procs::default();

    // sluice, first-segment, in its own namespace (syncookies=2 there only).
    let (cfg, admin_fs) = sluice_config(
        &dir,
        "first-segment",
        "127.0.0.1:8080",
        "first-segment",
        &hello,
        "",
    )?;
    let sluice_fs = procs.spawn(
        fs_ns.cmd(&sluice).arg("run").arg(&cfg),
        &dir.join("sluice-fs.log"),
    )?;
    // sluice with three sites, first-segment, beside the first (another port).
    let (cfg, admin_sites) = sites_config(&dir, "127.0.0.1:8082", &hello)?;
    let sluice_sites = procs.spawn(
        fs_ns.cmd(&sluice).arg("run").arg(&cfg),
        &dir.join("sluice-sites.log"),
    )?;
    // sluice, syn mode (plain clients go through the dispatcher), with the default sysctls.
    let (cfg, admin_syn) = sluice_config(&dir, "syn", "127.0.0.1:8081", "syn", &hello, "")?;
    // The first-segment set-up again with the access log on (a file, truncated after each
    // run so the benchmark does not fill the disk).
    let access_log = dir.join("access.log");
    let (cfg_logged, admin_logged) = sluice_config(
        &dir,
        "logged",
        "127.0.0.1:8083",
        "first-segment",
        &hello,
        &format!("access_log = \"{}\"\n", access_log.display()),
    )?;
    let sluice_logged = procs.spawn(
        fs_ns.cmd(&sluice).arg("run").arg(&cfg_logged),
        &dir.join("sluice-logged.log"),
    )?;
    let sluice_syn = procs.spawn(
        base.cmd(&sluice).arg("run").arg(&cfg),
        &dir.join("sluice-syn.log"),
    )?;
    // A socket pool: the Node.js server of the tests behind sluice (first-segment), and the
    // same server alone on a port of its own.
    let node_app = root.join("tests/workers/node_app.js");
    let (cfg_socket, admin_socket) = socket_config(&dir, "127.0.0.1:8084", &node_app)?;
    let sluice_socket = procs.spawn(
        fs_ns.cmd(&sluice).arg("run").arg(&cfg_socket),
        &dir.join("sluice-socket.log"),
    )?;
    let node_alone = procs.spawn(
        base.cmd("node").arg(&node_app).env("PORT", "9002"),
        &dir.join("node-alone.log"),
    )?;
    // HTTPS: sluice terminating TLS and handing the session to the worker.
    let certificate = tls_certificate(&dir)?;
    let (cfg_tls, admin_tls) = tls_config(
        &dir,
        ("tls", None),
        "127.0.0.1:8085",
        "127.0.0.1:8443",
        (&hello, &node_app),
        (&certificate.0, &certificate.1),
    )?;
    let sluice_tls = procs.spawn(
        fs_ns.cmd(&sluice).arg("run").arg(&cfg_tls),
        &dir.join("sluice-tls.log"),
    )?;
    // The same with one TLS loop: what a second loop gives to handshakes.
    let (cfg_tls1, admin_tls1) = tls_config(
        &dir,
        ("tls1", Some(1)),
        "127.0.0.1:8088",
        "127.0.0.1:8444",
        (&hello, &node_app),
        (&certificate.0, &certificate.1),
    )?;
    let sluice_tls1 = procs.spawn(
        fs_ns.cmd(&sluice).arg("run").arg(&cfg_tls1),
        &dir.join("sluice-tls1.log"),
    )?;
    // Two pools on one host, split by path: delivered per request.
    let (cfg_split, admin_split) = split_config(&dir, "split", "127.0.0.1:8086", &hello, None)?;
    let sluice_split = procs.spawn(
        fs_ns.cmd(&sluice).arg("run").arg(&cfg_split),
        &dir.join("sluice-split.log"),
    )?;
    // The same with one delivery loop: what a second loop gives.
    let (cfg_split1, admin_split1) =
        split_config(&dir, "split1", "127.0.0.1:8087", &hello, Some(1))?;
    let sluice_split1 = procs.spawn(
        fs_ns.cmd(&sluice).arg("run").arg(&cfg_split1),
        &dir.join("sluice-split1.log"),
    )?;
    let alternate = alternate_script(&dir)?;
    // A second copy of the worker alone, nginx's upstream for the split host's other path.
    let direct2 = procs.spawn(
        base.cmd(&hello)
            .env("SLUICE_LISTEN", "127.0.0.1:9003")
            .env("SLUICE_THREADS", "1")
            .env("RUST_LOG", "warn"),
        &dir.join("direct2.log"),
    )?;
    // The same worker binary alone on a plain listening socket: the limit.
    let direct = procs.spawn(
        base.cmd(&hello)
            .env("SLUICE_LISTEN", "127.0.0.1:9001")
            .env("SLUICE_THREADS", "1")
            .env("RUST_LOG", "warn"),
        &dir.join("direct.log"),
    )?;
    // nginx, one worker, proxying to that worker with upstream keep-alive; plus `return 200`.
    let body = CACHED_BODY.trim_end_matches('\n').to_owned() + "\\n";
    let nginx_conf = dir.join("nginx.conf");
    fs::write(
        &nginx_conf,
        format!(
            "worker_processes 1;\ndaemon off;\npid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  upstream hello {{ server 127.0.0.1:9001; keepalive 64; }}\n\
             server {{ listen 127.0.0.1:8090; location / {{ proxy_pass http://hello; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n\
             server {{ listen 127.0.0.1:8091; location / {{ default_type text/plain; return 200 \"{body}\"; }} }}\n\
             upstream node {{ server 127.0.0.1:9002; keepalive 64; }}\n\
             server {{ listen 127.0.0.1:8092; location / {{ proxy_pass http://node; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n\
             upstream hello2 {{ server 127.0.0.1:9003; keepalive 64; }}\n\
             server {{ listen 127.0.0.1:8093; location /api/ {{ proxy_pass http://hello; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} location / {{ proxy_pass http://hello2; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n\
             ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:bench:1m;\n\
             server {{ listen 127.0.0.1:8493 ssl; location / {{ proxy_pass http://hello; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n\
             server {{ listen 127.0.0.1:8494 ssl; location / {{ default_type text/plain; return 200 \"{body}\"; }} }}\n\
             server {{ listen 127.0.0.1:8495 ssl; location / {{ proxy_pass http://node; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n}}\n",
            dir = dir.display(),
            cert = certificate.0.display(),
            key = certificate.1.display(),
        ),
    )?;
    let nginx = procs.spawn(
        base.cmd("nginx").arg("-c").arg(&nginx_conf),
        &dir.join("nginx.log"),
    )?;

    wait_http(&fs_ns, "http://127.0.0.1:8080/api/hello")?;
    wait_http(&fs_ns, "http://127.0.0.1:8082/api/hello")?;
    wait_http(&fs_ns, "http://127.0.0.1:8083/api/hello")?;
    wait_http(&fs_ns, "http://127.0.0.1:8084/node")?;
    wait_http(&fs_ns, "http://127.0.0.1:8086/api/hello")?;
    wait_http(&fs_ns, "http://127.0.0.1:8086/web/hello")?;
    wait_http(&fs_ns, "https://127.0.0.1:8443/api/hello")?;
    wait_http(&fs_ns, "https://127.0.0.1:8443/node")?;
    for url in [
        "http://127.0.0.1:8081/api/hello",
        "http://127.0.0.1:9001/api/hello",
        "http://127.0.0.1:8090/api/hello",
        "http://127.0.0.1:8091/",
        "http://127.0.0.1:9002/node",
        "http://127.0.0.1:8092/node",
        "http://127.0.0.1:9003/web/hello",
        "http://127.0.0.1:8093/web/hello",
        "https://127.0.0.1:8493/api/hello",
        "https://127.0.0.1:8494/",
    ] {
        wait_http(&base, url)?;
    }
    let fs_workers = worker_pids(&status(&sluice, &admin_fs)?);
    let syn_workers = worker_pids(&status(&sluice, &admin_syn)?);
    let nginx_workers = children(nginx);

    let mut pids_fs = vec![("front end", sluice_fs)];
    pids_fs.extend(fs_workers.iter().map(|&p| ("worker", p)));
    let mut pids_sites = vec![("front end", sluice_sites)];
    pids_sites.extend(
        worker_pids(&status(&sluice, &admin_sites)?)
            .iter()
            .map(|&p| ("worker", p)),
    );
    let mut pids_logged = vec![("front end", sluice_logged)];
    pids_logged.extend(
        worker_pids(&status(&sluice, &admin_logged)?)
            .iter()
            .map(|&p| ("worker", p)),
    );
    let mut pids_socket = vec![("front end", sluice_socket)];
    pids_socket.extend(
        worker_pids(&status(&sluice, &admin_socket)?)
            .iter()
            .map(|&p| ("worker", p)),
    );
    let mut pids_tls = vec![("front end", sluice_tls)];
    pids_tls.extend(
        worker_pids(&status(&sluice, &admin_tls)?)
            .iter()
            .map(|&p| ("worker", p)),
    );
    let mut pids_tls1 = vec![("front end", sluice_tls1)];
    pids_tls1.extend(
        worker_pids(&status(&sluice, &admin_tls1)?)
            .iter()
            .map(|&p| ("worker", p)),
    );
    let mut pids_node_nginx = vec![("nginx master", nginx), ("worker", node_alone)];
    pids_node_nginx.extend(nginx_workers.iter().map(|&p| ("nginx worker", p)));
    let mut pids_syn = vec![("front end", sluice_syn)];
    pids_syn.extend(syn_workers.iter().map(|&p| ("worker", p)));
    let mut pids_nginx = vec![("nginx master", nginx), ("worker", direct)];
    pids_nginx.extend(nginx_workers.iter().map(|&p| ("nginx worker", p)));
    let mut pids_split = vec![("front end", sluice_split)];
    pids_split.extend(
        worker_pids(&status(&sluice, &admin_split)?)
            .iter()
            .map(|&p| ("worker", p)),
    );
    let mut pids_split1 = vec![("front end", sluice_split1)];
    pids_split1.extend(
        worker_pids(&status(&sluice, &admin_split1)?)
            .iter()
            .map(|&p| ("worker", p)),
    );
    let mut pids_split_nginx = pids_nginx.clone();
    pids_split_nginx.push(("worker", direct2));

    let target = |name,
                  ns: &'static str,
                  url: &str,
                  close,
                  pids: &Vec<(&'static str, u32)>,
                  admin: Option<&PathBuf>| Target {
        name,
        ns,
        url: url.to_owned(),
        close,
        pids: pids.clone(),
        admin: admin.cloned(),
        host: None,
        script: None,
    };
    let targets = vec![
        target(
            "steered_keepalive",
            "fs",
            "http://127.0.0.1:8080/api/hello",
            false,
            &pids_fs,
            Some(&admin_fs),
        ),
        target(
            "steered_keepalive_logged",
            "fs",
            "http://127.0.0.1:8083/api/hello",
            false,
            &pids_logged,
            Some(&admin_logged),
        ),
        Target {
            host: Some(SITE_HOST),
            ..target(
                "hosts_keepalive",
                "fs",
                "http://127.0.0.1:8082/api/hello",
                false,
                &pids_sites,
                Some(&admin_sites),
            )
        },
        Target {
            script: Some(alternate.clone()),
            ..target(
                "split_keepalive",
                "fs",
                "http://127.0.0.1:8086/",
                false,
                &pids_split,
                Some(&admin_split),
            )
        },
        Target {
            script: Some(alternate.clone()),
            ..target(
                "split_1loop_keepalive",
                "fs",
                "http://127.0.0.1:8087/",
                false,
                &pids_split1,
                Some(&admin_split1),
            )
        },
        Target {
            script: Some(alternate.clone()),
            ..target(
                "split_direct_keepalive",
                "base",
                "http://127.0.0.1:9001/",
                false,
                &vec![("worker", direct)],
                None,
            )
        },
        Target {
            script: Some(alternate.clone()),
            ..target(
                "split_nginx_keepalive",
                "base",
                "http://127.0.0.1:8093/",
                false,
                &pids_split_nginx,
                None,
            )
        },
        target(
            "direct_keepalive",
            "base",
            "http://127.0.0.1:9001/api/hello",
            false,
            &vec![("worker", direct)],
            None,
        ),
        target(
            "nginx_keepalive",
            "base",
            "http://127.0.0.1:8090/api/hello",
            false,
            &pids_nginx,
            None,
        ),
        target(
            "close_first_segment",
            "fs",
            "http://127.0.0.1:8080/api/hello",
            true,
            &pids_fs,
            Some(&admin_fs),
        ),
        target(
            "close_syn",
            "base",
            "http://127.0.0.1:8081/api/hello",
            true,
            &pids_syn,
            Some(&admin_syn),
        ),
        target(
            "close_direct",
            "base",
            "http://127.0.0.1:9001/api/hello",
            true,
            &vec![("worker", direct)],
            None,
        ),
        target(
            "close_nginx",
            "base",
            "http://127.0.0.1:8090/api/hello",
            true,
            &pids_nginx,
            None,
        ),
        target(
            "nginx_return",
            "base",
            "http://127.0.0.1:8091/",
            false,
            &pids_nginx,
            None,
        ),
        target(
            "socket_keepalive",
            "fs",
            "http://127.0.0.1:8084/node",
            false,
            &pids_socket,
            Some(&admin_socket),
        ),
        target(
            "socket_alone_keepalive",
            "base",
            "http://127.0.0.1:9002/node",
            false,
            &vec![("worker", node_alone)],
            None,
        ),
        target(
            "socket_nginx_keepalive",
            "base",
            "http://127.0.0.1:8092/node",
            false,
            &pids_node_nginx,
            None,
        ),
        target(
            "cache_keepalive",
            "fs",
            "http://127.0.0.1:8080/cached",
            false,
            &pids_fs,
            Some(&admin_fs),
        ),
        target(
            "tls_keepalive",
            "fs",
            "https://127.0.0.1:8443/api/hello",
            false,
            &pids_tls,
            None,
        ),
        target(
            "tls_nginx_keepalive",
            "base",
            "https://127.0.0.1:8493/api/hello",
            false,
            &pids_nginx,
            None,
        ),
        target(
            "tls_nginx_return",
            "base",
            "https://127.0.0.1:8494/",
            false,
            &pids_nginx,
            None,
        ),
        target(
            "tls_cache",
            "fs",
            "https://127.0.0.1:8443/cached",
            false,
            &pids_tls,
            None,
        ),
        target(
            "tls_close",
            "fs",
            "https://127.0.0.1:8443/api/hello",
            true,
            &pids_tls,
            None,
        ),
        target(
            "tls_close_1loop",
            "fs",
            "https://127.0.0.1:8444/api/hello",
            true,
            &pids_tls1,
            None,
        ),
        target(
            "tls_nginx_close",
            "base",
            "https://127.0.0.1:8493/api/hello",
            true,
            &pids_nginx,
            None,
        ),
        target(
            "tls_socket_keepalive",
            "fs",
            "https://127.0.0.1:8443/node",
            false,
            &pids_tls,
            None,
        ),
        target(
            "tls_socket_nginx_keepalive",
            "base",
            "https://127.0.0.1:8495/node",
            false,
            &pids_node_nginx,
            None,
        ),
    ];
    let only: Option<Vec<String>> = args
        .only
        .as_ref()
        .map(|o| o.split(',').map(|s| s.trim().to_owned()).collect());
    let targets: Vec<Target> = match &only {
        Some(names) => targets
            .into_iter()
            .filter(|t| names.iter().any(|n| n == t.name))
            .collect(),
        None => targets,
    };
    if targets.is_empty() {
        bail!("--only names no system of the benchmark");
    }

    let mut runs: BTreeMap<&str, Vec<Run>> = BTreeMap::new();
    let mut lines_logged: Vec<u64> = Vec::new();
    let mut fallback_counts: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for round in 0..rounds {
        for t in &targets {
            let ns = if t.ns == "fs" { &fs_ns } else { &base };
            let before = t
                .admin
                .as_ref()
                .map(|a| status(&sluice, a).map(|s| fallbacks(&s)))
                .transpose()?;
            let (r, text) = wrk(ns, t, seconds)?;
            if t.name == "steered_keepalive_logged" {
                lines_logged.push(count_lines(&access_log));
                fs::write(&access_log, "")?;
            }
            fs::write(dir.join(format!("wrk-{}-{round}.txt", t.name)), &text)?;
            if let (Some(a), Some(b)) = (&t.admin, before) {
                fallback_counts
                    .entry(t.name)
                    .or_default()
                    .push(fallbacks(&status(&sluice, a)?).saturating_sub(b));
            }
            eprintln!(
                "round {}/{rounds} {:<22} {:>10.0} req/s  p50 {:.3} ms  p99 {:.3} ms  \
                 cpu {:.2} µs/req (machine {:.2})  errors {} non-2xx {}",
                round + 1,
                t.name,
                r.rps,
                r.p50_ms,
                r.p99_ms,
                r.server_us,
                r.machine_us,
                r.errors,
                r.non_2xx
            );
            runs.entry(t.name).or_default().push(r);
        }
    }

    let ratio_pairs = [
        (
            "steered_keepalive_vs_direct",
            "steered_keepalive",
            "direct_keepalive",
        ),
        (
            "steered_keepalive_vs_nginx",
            "steered_keepalive",
            "nginx_keepalive",
        ),
        (
            "hosts_keepalive_vs_direct",
            "hosts_keepalive",
            "direct_keepalive",
        ),
        (
            "steered_keepalive_logged_vs_direct",
            "steered_keepalive_logged",
            "direct_keepalive",
        ),
        (
            "close_first_segment_vs_direct",
            "close_first_segment",
            "close_direct",
        ),
        ("close_syn_vs_direct", "close_syn", "close_direct"),
        (
            "close_first_segment_vs_nginx",
            "close_first_segment",
            "close_nginx",
        ),
        ("close_syn_vs_nginx", "close_syn", "close_nginx"),
        ("cache_vs_nginx_return", "cache_keepalive", "nginx_return"),
        (
            "split_keepalive_vs_nginx",
            "split_keepalive",
            "split_nginx_keepalive",
        ),
        (
            "split_keepalive_vs_direct",
            "split_keepalive",
            "split_direct_keepalive",
        ),
        (
            "split_2_loops_vs_1",
            "split_keepalive",
            "split_1loop_keepalive",
        ),
        (
            "socket_keepalive_vs_alone",
            "socket_keepalive",
            "socket_alone_keepalive",
        ),
        (
            "socket_keepalive_vs_nginx",
            "socket_keepalive",
            "socket_nginx_keepalive",
        ),
        (
            "tls_keepalive_vs_nginx",
            "tls_keepalive",
            "tls_nginx_keepalive",
        ),
        (
            "tls_keepalive_vs_nginx_return",
            "tls_keepalive",
            "tls_nginx_return",
        ),
        ("tls_close_vs_nginx", "tls_close", "tls_nginx_close"),
        ("tls_close_2_loops_vs_1", "tls_close", "tls_close_1loop"),
        ("tls_cache_vs_nginx_return", "tls_cache", "tls_nginx_return"),
        (
            "tls_socket_vs_nginx",
            "tls_socket_keepalive",
            "tls_socket_nginx_keepalive",
        ),
    ];
    let mut ratios = serde_json::Map::new();
    let mut cpu_ratios = serde_json::Map::new();
    for (name, a, b) in ratio_pairs {
        if !runs.contains_key(a) || !runs.contains_key(b) {
            continue;
        }
        let per_round = |f: &dyn Fn(&Run) -> f64| -> Vec<f64> {
            runs[a]
                .iter()
                .zip(&runs[b])
                .map(|(x, y)| f(x) / f(y))
                .collect()
        };
        ratios.insert(name.into(), json!(median(&mut per_round(&|r| r.rps))));
        let summary = |mut v: Vec<f64>| {
            json!({
                "median": median(&mut v),
                "min": v.iter().cloned().fold(f64::INFINITY, f64::min),
                "max": v.iter().cloned().fold(0.0, f64::max),
            })
        };
        cpu_ratios.insert(
            name.into(),
            json!({
                "server": summary(per_round(&|r| r.server_us)),
                "machine": summary(per_round(&|r| r.machine_us)),
            }),
        );
    }
    let mut scenarios = serde_json::Map::new();
    for t in &targets {
        let rs = &runs[t.name];
        let mut rps: Vec<f64> = rs.iter().map(|r| r.rps).collect();
        let mut p50: Vec<f64> = rs.iter().map(|r| r.p50_ms).collect();
        let mut p99: Vec<f64> = rs.iter().map(|r| r.p99_ms).collect();
        let mut server_us: Vec<f64> = rs.iter().map(|r| r.server_us).collect();
        let mut machine_us: Vec<f64> = rs.iter().map(|r| r.machine_us).collect();
        let range = |v: &[f64]| {
            (
                v.iter().cloned().fold(f64::INFINITY, f64::min),
                v.iter().cloned().fold(0.0, f64::max),
            )
        };
        let (server_min, server_max) = range(&server_us);
        let (machine_min, machine_max) = range(&machine_us);
        let rss: BTreeMap<String, u64> =
            t.pids.iter().fold(BTreeMap::new(), |mut m, (role, pid)| {
                *m.entry(role.to_string()).or_default() += peak_rss_kib(*pid);
                m
            });
        scenarios.insert(
            t.name.into(),
            json!({
                "url": t.url,
                "connection_close": t.close,
                "rps": rps.clone(),
                "rps_median": median(&mut rps),
                "rps_min": rps.iter().cloned().fold(f64::INFINITY, f64::min),
                "rps_max": rps.iter().cloned().fold(0.0, f64::max),
                "p50_ms_median": median(&mut p50),
                "p99_ms_median": median(&mut p99),
                "server_cpu_us_per_request": server_us.clone(),
                "server_cpu_us_median": median(&mut server_us),
                "server_cpu_us_min": server_min,
                "server_cpu_us_max": server_max,
                "machine_cpu_us_per_request": machine_us.clone(),
                "machine_cpu_us_median": median(&mut machine_us),
                "machine_cpu_us_min": machine_min,
                "machine_cpu_us_max": machine_max,
                "socket_errors": rs.iter().map(|r| r.errors).sum::<u64>(),
                "non_2xx": rs.iter().map(|r| r.non_2xx).sum::<u64>(),
                "peak_rss_kib": rss,
                "dispatcher_fallbacks": fallback_counts.get(t.name),
            }),
        );
    }
    let machine = json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": version(Command::new("uname").arg("-r")),
        "cpu": fs::read_to_string("/proc/cpuinfo").unwrap_or_default().lines().find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())).unwrap_or_default(),
    });
    let versions = json!({
        "sluice": env!("CARGO_PKG_VERSION"),
        "nginx": version(Command::new("nginx").arg("-v")),
        "wrk": version(Command::new("wrk").arg("-v")),
        "rustc": version(Command::new("rustc").arg("-V")),
    });
    let report = json!({
        "rounds": rounds,
        "seconds_per_run": seconds,
        "connections": CONNECTIONS,
        "wrk_threads": 1,
        "worker": {"binary": "hello", "processes": 1, "threads": 1},
        "duration_s": started.elapsed().as_secs(),
        "machine": machine,
        "versions": versions,
        "ratios": ratios,
        "cpu_ratios": cpu_ratios,
        "scenarios": scenarios,
        // Every request of the logged runs has its line (wrk's count, then the log's).
        "access_log": {
            "requests_per_run": runs.get("steered_keepalive_logged").map(|rs| rs.iter().map(|r| r.requests).collect::<Vec<_>>()),
            "lines_per_run": lines_logged,
        },
    });
    drop(procs);
    let json_path = args.json.unwrap_or_else(|| root.join("target/bench.json"));
    fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    let command = format!(
        "cargo xtask bench{}",
        if args.quick {
            " --quick".to_owned()
        } else {
            format!(" --rounds {rounds} --seconds {seconds}")
        }
    );
    if only.is_none() {
        fs::create_dir_all(root.join("docs"))?;
        fs::write(root.join("docs/benchmarks.md"), markdown(&report, &command))?;
        fs::write(root.join("docs/benchmarks.svg"), svg(&report))?;
        eprintln!(
            "\nwrote {}, docs/benchmarks.md and docs/benchmarks.svg in {} s",
            json_path.display(),
            started.elapsed().as_secs()
        );
    } else {
        eprintln!(
            "\nwrote {} in {} s (a partial run: docs/ untouched)",
            json_path.display(),
            started.elapsed().as_secs()
        );
    }
    for (k, v) in &ratios {
        eprintln!(
            "  {k:<32} {:.3} req/s, cpu {:.3} (machine {:.3})",
            v.as_f64().unwrap_or(f64::NAN),
            cpu_ratios[k]["server"]["median"]
                .as_f64()
                .unwrap_or(f64::NAN),
            cpu_ratios[k]["machine"]["median"]
                .as_f64()
                .unwrap_or(f64::NAN)
        );
    }
    Ok(())
}

const TARGETS: [(&str, &str, f64); 16] = [
    ("steered_keepalive_vs_direct", "≥ 0.95", 0.95),
    ("steered_keepalive_logged_vs_direct", "≥ 0.9", 0.9),
    ("hosts_keepalive_vs_direct", "≥ 0.97", 0.97),
    ("steered_keepalive_vs_nginx", "≥ 2", 2.0),
    ("close_first_segment_vs_direct", "≥ 0.9", 0.9),
    ("close_syn_vs_direct", "≥ 0.6", 0.6),
    ("close_first_segment_vs_nginx", "> 1", 1.0),
    ("close_syn_vs_nginx", "> 1", 1.0),
    ("cache_vs_nginx_return", "≥ 1.0", 1.0),
    ("socket_keepalive_vs_alone", "≥ 0.97", 0.97),
    ("socket_keepalive_vs_nginx", "≥ 1.5", 1.5),
    ("tls_keepalive_vs_nginx", "≥ 1.5", 1.5),
    ("tls_keepalive_vs_nginx_return", "≥ 0.9", 0.9),
    ("tls_close_vs_nginx", "≥ 1.0", 1.0),
    ("tls_cache_vs_nginx_return", "≥ 1.0", 1.0),
    ("split_keepalive_vs_nginx", "≥ 1.5", 1.5),
];

/// CPU-per-request targets: the ratio must be at most this.
const CPU_TARGETS: [(&str, f64); 4] = [
    ("cache_vs_nginx_return", 0.7),
    ("split_keepalive_vs_nginx", 0.6),
    ("steered_keepalive_vs_direct", 1.02),
    ("close_first_segment_vs_direct", 1.05),
];

fn cpu_target(name: &str) -> Option<f64> {
    CPU_TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
}

fn markdown(r: &Value, command: &str) -> String {
    let mut md = String::from("# Benchmarks\n\nGenerated by `");
    md.push_str(command);
    md.push_str("`; every figure is also in the JSON it writes (`target/bench.json`).\n\n");
    md.push_str(&format!(
        "Machine: {} cores, {}, kernel {}. Versions: {}, {}, {}. {} round(s) of {} s per system, alternating; \
         wrk with 1 thread and {} connections; every server runs the `hello` worker with 1 process and 1 thread \
         (nginx: 1 worker); the `socket_*` systems run the tests' Node.js server (`tests/workers/node_app.js`). The run took {} s.\n\n",
        r["machine"]["cores"],
        r["machine"]["cpu"].as_str().unwrap_or(""),
        r["machine"]["kernel"].as_str().unwrap_or(""),
        r["versions"]["nginx"].as_str().unwrap_or(""),
        r["versions"]["wrk"].as_str().unwrap_or("").split(" [").next().unwrap_or(""),
        r["versions"]["rustc"].as_str().unwrap_or(""),
        r["rounds"],
        r["seconds_per_run"],
        r["connections"],
        r["duration_s"],
    ));
    md.push_str("## Ratios (medians of per-round ratios of requests/s)\n\n| ratio | measured | target |\n|---|---|---|\n");
    for (name, want, min) in TARGETS {
        let v = r["ratios"][name].as_f64().unwrap_or(f64::NAN);
        let verdict = if v >= min { "met" } else { "missed" };
        md.push_str(&format!("| {name} | {v:.3} | {want} ({verdict}) |\n"));
    }
    md.push_str(
        "\n## CPU time per request (medians of per-round ratios, min–max)\n\n`server`: the server's \
         processes (`utime + stime`); `machine`: every busy CPU of the machine, steal excluded, wrk \
         included. Lower is cheaper.\n\n| ratio | server | machine | target (server) |\n|---|---|---|---|\n",
    );
    for (name, _, _) in TARGETS {
        let c = &r["cpu_ratios"][name];
        let cell = |k: &str| {
            format!(
                "{:.3} ({:.3}–{:.3})",
                c[k]["median"].as_f64().unwrap_or(f64::NAN),
                c[k]["min"].as_f64().unwrap_or(f64::NAN),
                c[k]["max"].as_f64().unwrap_or(f64::NAN)
            )
        };
        let target = match cpu_target(name) {
            Some(t) => {
                let v = c["server"]["median"].as_f64().unwrap_or(f64::NAN);
                let verdict = if v <= t { "met" } else { "missed" };
                format!("≤ {t} ({verdict})")
            }
            None => "–".to_owned(),
        };
        md.push_str(&format!(
            "| {name} | {} | {} | {target} |\n",
            cell("server"),
            cell("machine")
        ));
    }
    md.push_str("\n![ratios](benchmarks.svg)\n\n## Systems\n\n| system | req/s median | min–max | p50 ms | p99 ms | server CPU µs/req (min–max) | machine CPU µs/req (min–max) | errors | non-2xx | peak RSS KiB | dispatcher fallbacks |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    if let Some(s) = r["scenarios"].as_object() {
        for (name, v) in s {
            let rss: Vec<String> = v["peak_rss_kib"]
                .as_object()
                .map(|m| m.iter().map(|(k, n)| format!("{k} {n}")).collect())
                .unwrap_or_default();
            let fb = v["dispatcher_fallbacks"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| x.to_string())
                        .collect::<Vec<_>>()
                        .join("/")
                })
                .unwrap_or("–".into());
            let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
            md.push_str(&format!(
                "| {name} | {:.0} | {:.0}–{:.0} | {:.3} | {:.3} | {:.2} ({:.2}–{:.2}) | {:.2} ({:.2}–{:.2}) | {} | {} | {} | {fb} |\n",
                f("rps_median"),
                f("rps_min"),
                f("rps_max"),
                f("p50_ms_median"),
                f("p99_ms_median"),
                f("server_cpu_us_median"),
                f("server_cpu_us_min"),
                f("server_cpu_us_max"),
                f("machine_cpu_us_median"),
                f("machine_cpu_us_min"),
                f("machine_cpu_us_max"),
                v["socket_errors"],
                v["non_2xx"],
                rss.join(", "),
            ));
        }
    }
    md.push_str(
        "\nSystems: `steered_*`/`close_first_segment` = sluice in first-segment mode (the connection is put in the \
         pool's queue by the kernel program); `close_syn` = sluice in syn mode, where wrk's plain connections go \
         through the dispatcher and are handed to the worker over SCM_RIGHTS; `direct_*` = the same worker binary \
         on its own listening socket; `nginx_*` = nginx `proxy_pass` with upstream keep-alive to that worker; \
         `nginx_return` = nginx answering `return 200` itself; `cache_keepalive` = the same bytes answered from \
         sluice's front-end cache (a static entry; the kernel steers the connection to the front end, no worker \
         is involved); `hosts_keepalive` = sluice in first-segment mode with three sites on one port (an exact          host, a wildcard label, every other host), wrk naming the exact one: the kernel steers each connection          by its Host and the worker routes every request by host and path again; \
         `steered_keepalive_logged` = `steered_keepalive` with `access_log` on (a file). `close_*` send `Connection: close`: one connection per request; the benchmark's network \
         namespaces use `net.ipv4.ip_local_port_range = 1024 65535`, since a single client that closes first \
         (as sluice lets it, to keep first-segment steering working) otherwise runs out of ports near 14k \
         connections/s whatever the server.\n",
    );
    md
}

fn svg(r: &Value) -> String {
    let (w, bar_h, gap, left) = (720.0, 26.0, 12.0, 260.0);
    let max = TARGETS
        .iter()
        .map(|(n, _, t)| r["ratios"][*n].as_f64().unwrap_or(0.0).max(*t))
        .fold(1.0, f64::max)
        * 1.1;
    let scale = (w - left - 60.0) / max;
    let section = TARGETS.len() as f64 * (bar_h + gap);
    let h = 40.0 + section + 30.0 + 40.0 + section + 30.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"13\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"22\" font-size=\"15\">sluice throughput ratios (bars) and targets (red lines)</text>\n"
    );
    for (i, (name, _, target)) in TARGETS.iter().enumerate() {
        let v = r["ratios"][*name].as_f64().unwrap_or(0.0);
        let y = 40.0 + i as f64 * (bar_h + gap);
        let color = if v >= *target { "#3a7d44" } else { "#c0803a" };
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{name}</text>\n\
             <rect x=\"{left}\" y=\"{y}\" width=\"{:.1}\" height=\"{bar_h}\" fill=\"{color}\"/>\n\
             <text x=\"{:.1}\" y=\"{}\">{v:.2}</text>\n\
             <line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{}\" y2=\"{}\" stroke=\"red\" stroke-width=\"2\"/>\n",
            left - 8.0,
            y + bar_h * 0.7,
            v * scale,
            left + v * scale + 6.0,
            y + bar_h * 0.7,
            left + target * scale,
            left + target * scale,
            y - 3.0,
            y + bar_h + 3.0,
        ));
    }
    let base_y = 40.0 + section + 10.0;
    s.push_str(&format!(
        "<line x1=\"{left}\" x2=\"{left}\" y1=\"36\" y2=\"{base_y}\" stroke=\"black\"/>\n\
         <line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"36\" y2=\"{base_y}\" stroke=\"#888\" stroke-dasharray=\"4 3\"/>\n\
         <text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" fill=\"#555\">1.0</text>\n",
        left + scale,
        left + scale,
        left + scale,
        base_y + 14.0
    ));
    // CPU time per request: lower is cheaper; the red lines are upper bounds.
    let top = base_y + 40.0;
    let cpu = |name: &str| {
        r["cpu_ratios"][name]["server"]["median"]
            .as_f64()
            .unwrap_or(0.0)
    };
    let cmax = TARGETS.iter().map(|(n, _, _)| cpu(n)).fold(1.1, f64::max) * 1.1;
    let cscale = (w - left - 60.0) / cmax;
    s.push_str(&format!(
        "<text x=\"10\" y=\"{}\" font-size=\"15\">server CPU time per request, ratios (bars; lower is cheaper) and upper targets (red)</text>\n",
        top - 14.0
    ));
    for (i, (name, _, _)) in TARGETS.iter().enumerate() {
        let v = cpu(name);
        let y = top + i as f64 * (bar_h + gap);
        let color = match cpu_target(name) {
            Some(t) if v > t => "#c0803a",
            _ => "#3a6d9d",
        };
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{name}</text>\n\
             <rect x=\"{left}\" y=\"{y}\" width=\"{:.1}\" height=\"{bar_h}\" fill=\"{color}\"/>\n\
             <text x=\"{:.1}\" y=\"{}\">{v:.2}</text>\n",
            left - 8.0,
            y + bar_h * 0.7,
            v * cscale,
            left + v * cscale + 6.0,
            y + bar_h * 0.7,
        ));
        if let Some(t) = cpu_target(name) {
            s.push_str(&format!(
                "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{}\" y2=\"{}\" stroke=\"red\" stroke-width=\"2\"/>\n",
                left + t * cscale,
                left + t * cscale,
                y - 3.0,
                y + bar_h + 3.0
            ));
        }
    }
    let end = top + section + 10.0;
    s.push_str(&format!(
        "<line x1=\"{left}\" x2=\"{left}\" y1=\"{}\" y2=\"{end}\" stroke=\"black\"/>\n\
         <line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{}\" y2=\"{end}\" stroke=\"#888\" stroke-dasharray=\"4 3\"/>\n\
         <text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" fill=\"#555\">1.0</text>\n</svg>\n",
        top - 4.0,
        left + cscale,
        left + cscale,
        top - 4.0,
        left + cscale,
        end + 14.0
    ));
    s
}
