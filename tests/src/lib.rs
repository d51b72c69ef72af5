//! Helpers for the integration tests: network namespaces made by the test, the real
//! `sluice` binary started inside one, and small HTTP clients that run inside it.
//!
//! Every test must run as root (it creates namespaces); nothing touches the host's sysctls
//! or addresses, and only processes the test started are signalled, by pid.

use std::{
    collections::HashMap,
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::{AsRawFd, FromRawFd},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub mod certs;
pub mod upgrading;

use serde_json::Value;

/// The IPv4 address every test's front end listens on.
pub fn v4() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

/// Runs `sluice WORDS --admin ADMIN` against a running front end, as an operator would;
/// returns what it printed (the command must succeed).
pub fn sluice_admin(s: &Sluice, words: &[&str]) -> String {
    let out = Command::new(sluice_bin())
        .args(words)
        .arg("--admin")
        .arg(&s.admin)
        .output()
        .expect("sluice");
    assert!(
        out.status.success(),
        "sluice {words:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `GET path` on a new connection inside the namespace.
pub fn get_in(ns: &Netns, path: &str) -> Response {
    ns.enter(|| exchange(v4(), &get_request(path)))
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// Where the release binaries are (`cargo xtask test` sets SLUICE_BIN_DIR).
pub fn bin_dir() -> PathBuf {
    std::env::var_os("SLUICE_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release"))
}

/// The test worker scripts and applications (`tests/workers`, or the copy `cargo xtask
/// test` made where pool uids can reach it).
pub fn workers_dir() -> PathBuf {
    std::env::var_os("SLUICE_TEST_WORKERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("workers"))
}

/// The `bin` folder of the virtual environment holding gunicorn, uvicorn and websockets
/// (`cargo xtask test` makes it).
pub fn apps_bin() -> PathBuf {
    let p = std::env::var_os("SLUICE_TEST_APPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/apps/bin"));
    assert!(
        p.join("gunicorn").exists(),
        "{} has no gunicorn: run the tests with `cargo xtask test`",
        p.display()
    );
    p
}

pub fn sluice_bin() -> PathBuf {
    let p = bin_dir().join("sluice");
    assert!(
        p.exists(),
        "{} is missing: run the tests with `cargo xtask test`",
        p.display()
    );
    p
}

pub fn example(name: &str) -> PathBuf {
    let p = bin_dir().join("examples").join(name);
    assert!(
        p.exists(),
        "{} is missing: run the tests with `cargo xtask test`",
        p.display()
    );
    p
}

fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "sl{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        tag
    )
}

fn must(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| panic!("{shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace of the test's own, with loopback up; deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the integration tests run as root (they create network namespaces)"
        );
        let name = unique(tag);
        must(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        must(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        ns
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        must(
            self.command("sysctl")
                .args(["-qw", &format!("{key}={value}")]),
        );
    }

    pub fn read_sysctl(&self, key: &str) -> String {
        String::from_utf8_lossy(&must(self.command("sysctl").args(["-n", key])).stdout)
            .trim()
            .to_owned()
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it makes live there.
    /// Runs a python3 script inside: its standard output, or (on failure) that and its
    /// standard error.
    pub fn python(&self, script: &str) -> Result<String, String> {
        let out = self
            .command("python3")
            .arg("-c")
            .arg(script)
            .output()
            .map_err(|e| format!("python3: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("{text}\n{}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                // SAFETY: setns on this thread only, with a namespace fd we hold.
                let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A `sluice run` inside a namespace; stopped with SIGTERM on drop.
pub struct Sluice {
    child: Option<Child>,
    pub dir: PathBuf,
    pub admin: PathBuf,
    pub log: PathBuf,
}

/// A config template: `{admin}`, `{hello}`, `{echo}`, `{crash}`, `{files}`, `{websocket}`, `{upload}` are
/// filled in, and
/// `{apps}` (the application servers' `bin`) and `{workers}` (the worker scripts' folder).
pub fn config(template: &str, admin: &Path) -> String {
    let mut t = template.replace("{admin}", &admin.display().to_string());
    if t.contains("{apps}") {
        t = t.replace("{apps}", &apps_bin().display().to_string());
    }
    if t.contains("{workers}") {
        t = t.replace("{workers}", &workers_dir().display().to_string());
    }
    for name in ["hello", "echo", "crash", "files", "websocket", "upload"] {
        let key = format!("{{{name}}}");
        if t.contains(&key) {
            t = t.replace(&key, &example(name).display().to_string());
        }
    }
    t
}

/// One pool `api` serving every path on 127.0.0.1:8080 in first-segment mode: `command` is the
/// TOML array's contents (e.g. `"{hello}"`), `extra` more `[[pool]]` keys, one per line.
pub fn one_pool(command: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "first-segment"
set_sysctls = true
admin_socket = "{{admin}}"

[[pool]]
name = "api"
command = [{command}]
threads = 1
{extra}

[[route]]
prefix = "/"
pool = "api"
"#
    )
}

/// Pools `api` (2 processes, `/api/`) and `web` (`/`) of hello workers on 127.0.0.1:8080
/// and [::1]:8080, in the given steering mode, allowed to set the sysctls it needs. Their
/// host's pools trust each other (`[[site]] trust_pools`), so the kernel steers by path and
/// workers hand connections back: what the steering tests measure. Without it the front end
/// keeps such a host's connections (`tests/tests/delivery.rs`).
pub fn two_pools(steering: &str) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:8080", "[::1]:8080"]
steering = "{steering}"
set_sysctls = true
admin_socket = "{{admin}}"

[[pool]]
name = "api"
command = ["{{hello}}"]
processes = 2
threads = 1
start = "always"

[[pool]]
name = "web"
command = ["{{hello}}"]
threads = 1
start = "always"

[[route]]
prefix = "/api/"
pool = "api"

[[route]]
prefix = "/"
pool = "web"

[[site]]
host = "*"
trust_pools = true
"#
    )
}

impl Sluice {
    /// Starts sluice with `template` (see `config`) and waits until it answers status.
    pub fn start(ns: &Netns, template: &str) -> Sluice {
        let mut s = Sluice::spawn(ns, template);
        s.wait_ready();
        s
    }

    /// Waits until sluice answers status; panics with its log if it exits first.
    fn wait_ready(&mut self) {
        let s = self;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if s.try_status().is_some() {
                return;
            }
            if let Some(Ok(Some(status))) = s.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "sluice exited ({status}) before it served; log:\n{}",
                    s.log_text()
                );
            }
            if Instant::now() > deadline {
                panic!("sluice did not come up within 30 s; log:\n{}", s.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// [`Sluice::start`] with more variables in sluice's own environment.
    pub fn start_env(ns: &Netns, template: &str, env: &[(&str, &str)]) -> Sluice {
        let mut s = Sluice::spawn_env(ns, template, env);
        s.wait_ready();
        s
    }

    /// Starts sluice without waiting for it.
    pub fn spawn(ns: &Netns, template: &str) -> Sluice {
        Sluice::spawn_env(ns, template, &[])
    }

    /// Starts sluice as systemd starts a unit with a file-descriptor store: `fds` at 3.., named
    /// in `LISTEN_FDNAMES`, with `LISTEN_PID` its own pid.
    pub fn start_inheriting(
        ns: &Netns,
        template: &str,
        env: &[(&str, &str)],
        fds: &[(String, std::os::fd::OwnedFd)],
    ) -> Sluice {
        use std::os::unix::process::CommandExt;
        // Above 3.. first, so placing them cannot overwrite one another.
        let high: Vec<std::os::fd::OwnedFd> = fds
            .iter()
            .map(|(_, fd)| {
                // SAFETY: F_DUPFD_CLOEXEC makes a new fd we own.
                let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 1000) };
                assert!(n >= 0, "dup: {}", std::io::Error::last_os_error());
                // SAFETY: `n` was just created.
                unsafe { std::os::fd::OwnedFd::from_raw_fd(n) }
            })
            .collect();
        let raw: Vec<i32> = high.iter().map(|f| f.as_raw_fd()).collect();
        let names: Vec<&str> = fds.iter().map(|(n, _)| n.as_str()).collect();
        let count = fds.len().to_string();
        let names = names.join(":");
        let mut env: Vec<(&str, &str)> = env.to_vec();
        env.push(("LISTEN_FDS", &count));
        env.push(("LISTEN_FDNAMES", &names));
        let mut s = Sluice::spawn_with(ns, template, &env, |c| {
            // SAFETY: between fork and exec only dup2(2), which is async-signal-safe; dup2
            // leaves the copies without FD_CLOEXEC, so the program gets them.
            unsafe {
                c.pre_exec(move || {
                    for (i, &fd) in raw.iter().enumerate() {
                        if libc::dup2(fd, 3 + i as i32) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        });
        drop(high);
        s.wait_ready();
        s
    }

    fn spawn_env(ns: &Netns, template: &str, env: &[(&str, &str)]) -> Sluice {
        Sluice::spawn_with(ns, template, env, |_| {})
    }

    /// [`Sluice::start`] running the front end from `program` (a copy of the binary that an
    /// upgrade test replaces).
    pub fn start_program(ns: &Netns, template: &str, program: &Path) -> Sluice {
        let mut s = Sluice::spawn_from(ns, template, &[], program, |_| {});
        s.wait_ready();
        s
    }

    /// Starts sluice, `wrap` adjusting its command; with `LISTEN_FDS` in `env` it also gets
    /// `LISTEN_PID`, its own pid, as systemd sets it.
    fn spawn_with(
        ns: &Netns,
        template: &str,
        env: &[(&str, &str)],
        wrap: impl FnOnce(&mut Command),
    ) -> Sluice {
        Sluice::spawn_from(ns, template, env, &sluice_bin(), wrap)
    }

    fn spawn_from(
        ns: &Netns,
        template: &str,
        env: &[(&str, &str)],
        program: &Path,
        wrap: impl FnOnce(&mut Command),
    ) -> Sluice {
        let inherit = env.iter().any(|(k, _)| *k == "LISTEN_FDS");
        let dir = std::env::temp_dir().join(unique("run"));
        fs::create_dir_all(&dir).expect("temp dir");
        let admin = dir.join("admin.sock");
        let cfg = dir.join("sluice.toml");
        fs::write(&cfg, config(template, &admin)).expect("write config");
        let log = dir.join("sluice.log");
        let out = fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut cmd = if inherit {
            // `ip netns exec` and `sh` exec in place: $$ is sluice's own pid.
            let mut c = ns.command("sh");
            c.args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\""])
                .arg(program);
            c
        } else {
            ns.command(program)
        };
        cmd.arg("run")
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        wrap(&mut cmd);
        let child = cmd.spawn().expect("start sluice");
        Sluice {
            child: Some(child),
            dir,
            admin,
            log,
        }
    }

    /// Replaces the config file (for a reload).
    pub fn rewrite(&self, template: &str) {
        fs::write(self.dir.join("sluice.toml"), config(template, &self.admin))
            .expect("write config");
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn try_status(&self) -> Option<Value> {
        let out = Command::new(sluice_bin())
            .args(["status", "--json", "--admin"])
            .arg(&self.admin)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `sluice status --json`, as a user would run it.
    pub fn status(&self) -> Value {
        self.try_status()
            .unwrap_or_else(|| panic!("sluice status failed; log:\n{}", self.log_text()))
    }

    /// Waits for the process to end by itself; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then the exit code (SIGKILL after 20 s).
    pub fn stop(&mut self) -> Option<i32> {
        let pid = self.pid();
        if pid == 0 {
            return None;
        }
        // SAFETY: signalling the child we started.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let code = self.wait_exit(Duration::from_secs(20));
        if code.is_none() {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        code
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

pub fn pool<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["pools"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("no pool {name} in {status}"))
}

pub fn worker_pids(status: &Value, name: &str) -> Vec<i32> {
    pool(status, name)["workers"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .filter_map(|w| w["pid"].as_i64())
                .map(|p| p as i32)
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `f(status)` holds; panics with the last status after `limit`.
pub fn wait_for(s: &Sluice, limit: Duration, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let st = s.status();
        if f(&st) {
            return st;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; status: {st}\nlog:\n{}",
                s.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    pub fn pool(&self) -> Option<&str> {
        self.header("x-sluice-pool")
    }
}

/// Parses one response from `raw` (the whole stream up to the server's close, or more).
pub fn parse_response(raw: &[u8]) -> Option<(Response, usize)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut headers = HashMap::new();
    for l in lines.filter(|l| !l.is_empty()) {
        let (k, v) = l.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(raw.len() - end);
    if raw.len() < end + len {
        return None;
    }
    Some((
        Response {
            status,
            headers,
            body: raw[end..end + len].to_vec(),
        },
        end + len,
    ))
}

/// Reads one complete response from `stream`.
pub fn read_response(stream: &mut impl Read) -> std::io::Result<Response> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        if let Some((r, _)) = parse_response(&raw) {
            return Ok(r);
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return parse_response(&raw).map(|(r, _)| r).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed after {} bytes: {:?}",
                        raw.len(),
                        String::from_utf8_lossy(&raw)
                    ),
                )
            });
        }
        raw.extend_from_slice(&buf[..n]);
    }
}

/// A plain client: connect, send `request`, read one response. Call inside `Netns::enter`.
pub fn exchange(addr: SocketAddr, request: &[u8]) -> std::io::Result<Response> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request)?;
    read_response(&mut s)
}

pub fn get_request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").into_bytes()
}

/// A TCP Fast Open client: the request rides in the SYN. Call inside `Netns::enter`.
pub fn exchange_tfo(addr: SocketAddr, request: &[u8]) -> std::io::Result<Response> {
    let (family, ss, len) = sockaddr(addr);
    // SAFETY: socket(2); the fd is owned by the TcpStream right after.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is ours.
    let mut s = unsafe { TcpStream::from_raw_fd(fd) };
    // SAFETY: sendto with MSG_FASTOPEN connects and sends in the SYN; buffers are live.
    let n = unsafe {
        libc::sendto(
            fd,
            request.as_ptr().cast(),
            request.len(),
            libc::MSG_FASTOPEN,
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if (n as usize) < request.len() {
        s.write_all(&request[n as usize..])?;
    }
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    read_response(&mut s)
}

fn sockaddr(addr: SocketAddr) -> (i32, libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: plain data, zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is big enough and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            (
                libc::AF_INET,
                ss,
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            (
                libc::AF_INET6,
                ss,
                std::mem::size_of::<libc::sockaddr_in6>() as u32,
            )
        }
    }
}

/// The figures from one wrk run.
#[derive(Debug, Default, Clone)]
pub struct WrkResult {
    pub requests: u64,
    pub non_2xx: u64,
    pub socket_errors: u64,
    pub output: String,
}

/// Runs wrk inside the namespace.
pub fn wrk(ns: &Netns, args: &[&str]) -> WrkResult {
    let out = must(ns.command("wrk").args(args));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    parse_wrk(&text)
}

pub fn parse_wrk(text: &str) -> WrkResult {
    let mut r = WrkResult {
        output: text.to_owned(),
        ..Default::default()
    };
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = rest.trim().parse().unwrap_or(u64::MAX);
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            r.socket_errors = rest
                .split(',')
                .filter_map(|p| p.split_whitespace().last())
                .filter_map(|n| n.parse::<u64>().ok())
                .sum();
        } else if line.contains(" requests in ") {
            r.requests = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    r
}

pub fn sha_like(data: &[u8]) -> u64 {
    // FNV-1a: enough to tell two payloads apart in a test.
    data.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// A small deterministic generator (xorshift), so a failure can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

/// What `sluice route CONFIG [--local LOCAL] --heads` says of each request head, a line
/// each (`pool NAME`, `refuse STATUS REASON`).
pub fn route_heads(config: &Path, local: Option<&str>, heads: &[&[u8]]) -> Vec<String> {
    let file = std::env::temp_dir().join(format!(
        "sluice-heads-{}-{}",
        std::process::id(),
        local.unwrap_or("any")
    ));
    let hex: String = heads
        .iter()
        .map(|h| h.iter().map(|b| format!("{b:02x}")).collect::<String>() + "\n")
        .collect();
    std::fs::write(&file, hex).expect("heads file");
    let mut cmd = Command::new(sluice_bin());
    cmd.arg("route").arg(config);
    if let Some(local) = local {
        cmd.args(["--local", local]);
    }
    let out = cmd
        .arg("--heads")
        .arg(&file)
        .output()
        .expect("sluice route");
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), heads.len(), "an answer per head");
    lines
}
