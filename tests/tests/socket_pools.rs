//! Socket pools: gunicorn, uvicorn and a Node.js server run as pools' workers with nothing
//! but their inherited listening sockets. Kernel-steered connections reach them directly;
//! connections the front end routes (syn mode, paths the kernel cannot steer) reach them
//! through the relay, a connection of the front end's own put into the pool's queue.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use sluice_tests::*;

const HOSTS: [(&str, &str); 3] = [
    ("gun.test", "gunicorn"),
    ("uv.test", "uvicorn"),
    ("node.test", "node"),
];

fn servers(steering: &str) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "{steering}"
set_sysctls = true
admin_socket = "{{admin}}"

[[pool]]
name = "web"
command = ["{{hello}}"]
threads = 1

[[pool]]
name = "gun"
worker = "socket"
command = ["{{apps}}/gunicorn", "--workers", "2", "--no-control-socket", "wsgi_app:app"]
cwd = "{{workers}}"

[[pool]]
name = "uv"
worker = "socket"
command = ["{{apps}}/uvicorn", "--fd", "3", "--no-access-log", "asgi_app:app"]
cwd = "{{workers}}"
health = {{ path = "/healthz", interval = "1s", timeout = "2s" }}

[[pool]]
name = "node"
worker = "socket"
command = ["node", "node_app.js"]
cwd = "{{workers}}"

[[pool]]
name = "fds"
worker = "socket"
command = ["{{apps}}/python", "fds.py"]
cwd = "{{workers}}"
start = "always"

[[route]]
prefix = "/"
pool = "web"

[[route]]
host = "gun.test"
prefix = "/"
pool = "gun"

[[route]]
host = "uv.test"
prefix = "/"
pool = "uv"

[[route]]
host = "node.test"
prefix = "/"
pool = "node"

[[route]]
host = "fds.test"
prefix = "/"
pool = "fds"
"#
    )
}

fn curl(ns: &Netns, host: &str, path: &str) -> String {
    let out = ns
        .command("curl")
        .args(["-s", "-m", "20", "--path-as-is", "-H"])
        .arg(format!("Host: {host}"))
        .arg(format!("http://127.0.0.1:8080{path}"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two requests on one keep-alive connection with python's http.client.
fn python_get(ns: &Netns, host: &str, path: &str) -> String {
    let script = format!(
        "import http.client\n\
         c = http.client.HTTPConnection('127.0.0.1', 8080, timeout=20)\n\
         for _ in range(2):\n    \
             c.request('GET', '{path}', headers={{'Host': '{host}'}})\n    \
             r = c.getresponse()\n    \
             print(r.status, r.read().decode().strip())\n"
    );
    let out = ns
        .command(apps_bin().join("python"))
        .arg("-c")
        .arg(script)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "python client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn relays(s: &Sluice) -> u64 {
    s.status()["dispatcher"]["relays"].as_u64().unwrap_or(0)
}

fn each_server_answers_its_host(steering: &str) {
    let ns = Netns::new("sockpools");
    let s = Sluice::start(&ns, &servers(steering));
    // Paths the kernel steers, and paths only the dispatcher routes (then the relay).
    for path in ["/x", "/a%20b", "//x"] {
        for (host, server) in HOSTS {
            let body = curl(&ns, host, path);
            assert!(
                body.starts_with(&format!("{server} ")),
                "{steering}: curl {host}{path} got {body:?}; log:\n{}",
                s.log_text()
            );
            let answers = python_get(&ns, host, path);
            assert_eq!(
                answers.lines().count(),
                2,
                "{steering}: python {host}{path}: {answers}"
            );
            for line in answers.lines() {
                assert!(
                    line.starts_with(&format!("200 {server} ")),
                    "{steering}: python {host}{path} got {line:?}"
                );
            }
        }
        assert!(curl(&ns, "other.test", path).starts_with("hello from pool web"));
    }
    assert!(relays(&s) > 0, "{steering}: nothing went through the relay");

    // Load on all three at once, 10 s.
    let runs: Vec<WrkResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = HOSTS
            .iter()
            .map(|(host, _)| {
                let ns = &ns;
                scope.spawn(move || {
                    wrk(
                        ns,
                        &[
                            "-t1",
                            "-c8",
                            "-d10s",
                            "-H",
                            &format!("Host: {host}"),
                            "http://127.0.0.1:8080/load",
                        ],
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("wrk"))
            .collect()
    });
    for (r, (host, _)) in runs.iter().zip(HOSTS) {
        assert!(r.requests > 100, "{steering} {host}: {}", r.output);
        assert_eq!(r.socket_errors, 0, "{steering} {host}: {}", r.output);
        assert_eq!(r.non_2xx, 0, "{steering} {host}: {}", r.output);
    }
    let status = s.status();
    if steering == "first-segment" {
        for name in ["gun", "uv", "node"] {
            assert!(
                pool(&status, name)["steered_kernel"].as_u64().unwrap_or(0) > 0,
                "{name} got nothing steered in the kernel: {status}"
            );
        }
    }
    let log = s.log_text();
    // A socket worker gets its pool's socket as fd 3 and nothing else.
    assert!(
        log.contains("inherited LISTEN_FDS=1 LISTEN_FDNAMES=pool LISTEN_PID_OK=True fds=0,1,2,3"),
        "{log}"
    );
    // Its output reaches the log under its pool and pid.
    let pid = worker_pids(&status, "gun")[0];
    assert!(
        log.contains(&format!("pool gun[{pid}]: ")) && log.contains("Booting worker"),
        "{log}"
    );
    assert_eq!(relay_open_after(&s, Duration::from_secs(10)), 0);
}

/// Relays still open once `limit` has passed (they end when both sides have closed).
fn relay_open_after(s: &Sluice, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        let open = s.status()["dispatcher"]["relays_open"]
            .as_u64()
            .unwrap_or(0);
        if open == 0 || Instant::now() > deadline {
            return open;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn gunicorn_uvicorn_and_node_answer_their_hosts_steered_by_first_segment() {
    each_server_answers_its_host("first-segment");
}

#[test]
fn gunicorn_uvicorn_and_node_answer_their_hosts_relayed_in_syn_mode() {
    each_server_answers_its_host("syn");
}

const ONE_UVICORN: &str = r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "@STEERING@"
set_sysctls = true
admin_socket = "{admin}"

[[pool]]
name = "uv"
worker = "socket"
command = ["{apps}/uvicorn", "--fd", "3", "--no-access-log", "asgi_app:app"]
cwd = "{workers}"
start = "always"
queue_length = 500
env = { UNHEALTHY_FILE = "@MARKER@" }
@HEALTH@

[[route]]
prefix = "/"
pool = "uv"
"#;

fn one_uvicorn(steering: &str, marker: &str, health: &str) -> String {
    ONE_UVICORN
        .replace("@STEERING@", steering)
        .replace("@MARKER@", marker)
        .replace("@HEALTH@", health)
}

fn killed_workers_leave_their_queue(steering: &str) {
    let ns = Netns::new("sockkill");
    let s = Sluice::start(&ns, &one_uvicorn(steering, "/nonexistent", ""));
    let status = wait_for(&s, Duration::from_secs(20), "uvicorn ready", |st| {
        pool(st, "uv")["workers"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w["ready"] == true))
    });
    let before = worker_pids(&status, "uv");
    // Stopped, so the 100 connections certainly wait in the queue; then killed.
    for &pid in &before {
        // SAFETY: signalling the worker this test's sluice started.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
    }
    let answers: BTreeMap<u16, usize> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..100)
            .map(|i| {
                let ns = &ns;
                scope.spawn(move || {
                    ns.enter(|| exchange(v4(), &get_request(&format!("/queued/{i}"))))
                        .map(|r| r.status)
                        .unwrap_or(0)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        for &pid in &before {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let mut counts = BTreeMap::new();
        for c in clients {
            *counts.entry(c.join().expect("client")).or_insert(0) += 1;
        }
        counts
    });
    assert_eq!(
        answers,
        BTreeMap::from([(200, 100)]),
        "{steering}: log:\n{}",
        s.log_text()
    );
    let after = worker_pids(&s.status(), "uv");
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{before:?} {after:?}"
    );
}

#[test]
fn killed_socket_workers_leave_100_queued_connections_to_the_next_steered_by_first_segment() {
    killed_workers_leave_their_queue("first-segment");
}

#[test]
fn killed_socket_workers_leave_100_queued_connections_to_the_next_relayed_in_syn_mode() {
    killed_workers_leave_their_queue("syn");
}

#[test]
fn a_failing_health_check_replaces_the_worker_and_readiness_waits_for_a_pass() {
    let ns = Netns::new("sockhealth");
    let dir = std::env::temp_dir().join(format!("sluice-health-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let marker = dir.join("unhealthy");
    let health = r#"health = { path = "/healthz", interval = "500ms", timeout = "1s" }"#;
    let s = Sluice::start(
        &ns,
        &one_uvicorn("syn", &marker.display().to_string(), health),
    );
    let ready = |st: &serde_json::Value| {
        pool(st, "uv")["workers"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w["ready"] == true))
    };
    let first = worker_pids(&wait_for(&s, Duration::from_secs(20), "ready", ready), "uv");
    std::fs::write(&marker, b"").expect("marker");
    let log = |s: &Sluice| s.log_text();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !log(&s).contains("health check failed (GET /healthz answered 503)") {
        assert!(
            Instant::now() < deadline,
            "no failed check; log:\n{}",
            log(&s)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its replacement is not ready while the check fails.
    std::thread::sleep(Duration::from_secs(2));
    let st = s.status();
    assert!(!ready(&st), "ready while unhealthy: {st}");
    assert!(worker_pids(&st, "uv").iter().all(|p| !first.contains(p)));
    std::fs::remove_file(&marker).expect("marker");
    wait_for(&s, Duration::from_secs(20), "ready again", ready);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_socket_pool_in_a_trusting_site_is_refused_unless_it_routes_by_connection() {
    let shared = |routing: &str| {
        format!(
            r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "first-segment"
set_sysctls = true
admin_socket = "{{admin}}"

[[pool]]
name = "web"
command = ["{{hello}}"]
threads = 1

[[pool]]
name = "gun"
worker = "socket"
command = ["{{apps}}/gunicorn", "--no-control-socket", "wsgi_app:app"]
cwd = "{{workers}}"
{routing}

[[route]]
prefix = "/app/"
pool = "gun"

[[route]]
prefix = "/"
pool = "web"

[[site]]
host = "*"
trust_pools = true
"#
        )
    };
    let dir = std::env::temp_dir().join(format!("sluice-shared-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("shared.toml");
    std::fs::write(&file, config(&shared(""), &dir.join("admin.sock"))).expect("write");
    let out = std::process::Command::new(sluice_bin())
        .arg("check")
        .arg(&file)
        .output()
        .expect("sluice check");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("pool[1].routing: pool `gun` (worker = \"socket\") shares")
            && text.contains("route[0] (* /app/)")
            && text.contains("route[1] (* /)"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);

    let ns = Netns::new("sockshared");
    let s = Sluice::start(&ns, &shared(r#"routing = "connection""#));
    assert!(curl(&ns, "any.test", "/app/x").starts_with("gunicorn /app/x"));
    assert!(curl(&ns, "any.test", "/x").starts_with("hello from pool web"));
    drop(s);
}

#[test]
fn a_proxy_protocol_pool_learns_each_clients_address_from_a_proxy_v2_header() {
    let ns = Netns::new("sockproxy");
    let s = Sluice::start(
        &ns,
        r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "first-segment"
set_sysctls = true
admin_socket = "{admin}"

[[pool]]
name = "px"
worker = "socket"
command = ["{apps}/python", "proxy_v2.py"]
cwd = "{workers}"
proxy_protocol = true

[[route]]
prefix = "/"
pool = "px"
"#,
    );
    // Plain paths the kernel could steer go through the relay too: each connection must
    // start with the header.
    for path in ["/x", "/a%20b"] {
        let (me, answer) = ns.enter(|| {
            let mut c = std::net::TcpStream::connect(v4()).expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(20))).ok();
            let me = c.local_addr().expect("local");
            std::io::Write::write_all(&mut c, &get_request(path)).expect("write");
            (me, read_response(&mut c))
        });
        let answer = answer.unwrap_or_else(|e| panic!("{path}: {e}; log:\n{}", s.log_text()));
        assert_eq!(
            String::from_utf8_lossy(&answer.body),
            format!("proxy {me}\n"),
            "{path}"
        );
    }
    let st = s.status();
    assert!(
        st["fallbacks"]["relay_only"].as_u64().unwrap_or(0) >= 1,
        "{st}"
    );
    assert_eq!(pool(&st, "px")["steered_kernel"].as_u64(), Some(0), "{st}");
}

#[test]
fn a_keep_alive_connection_reaches_a_socket_pool_after_a_cache_answer_and_another_host_gets_421() {
    let ns = Netns::new("sockmove");
    let dir = std::env::temp_dir().join(format!("sluice-sockmove-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cached = dir.join("cached.txt");
    std::fs::write(&cached, "from the cache\n").expect("static");
    let s = Sluice::start(
        &ns,
        &format!(
            r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "first-segment"
set_sysctls = true
admin_socket = "{{admin}}"

[[cache.static]]
path = "/cached"
file = "{}"

[[pool]]
name = "web"
command = ["{{hello}}"]
threads = 1
start = "always"

[[pool]]
name = "uv"
worker = "socket"
command = ["{{apps}}/uvicorn", "--fd", "3", "--no-access-log", "asgi_app:app"]
cwd = "{{workers}}"
start = "always"

[[route]]
prefix = "/"
pool = "web"

[[route]]
host = "uv.test"
prefix = "/"
pool = "uv"
"#,
            cached.display()
        ),
    );
    // One connection each. The front end's cache answers first: the next request, for
    // uv.test (a host uvicorn owns), joins the connection to uvicorn through the relay. Or
    // web's worker answers first: the connection is web's (it owns web.test), so a request
    // on it for uv.test is answered 421 and the connection closes; http.client connects
    // again for the next one, which reaches uvicorn.
    let script = "import http.client\n\
        for first in [('web.test', '/first'), ('web.test', '/cached')]:\n    \
            c = http.client.HTTPConnection('127.0.0.1', 8080, timeout=20)\n    \
            for host, path in [first, ('uv.test', '/second'), ('uv.test', '/third')]:\n        \
                c.request('GET', path, headers={'Host': host})\n        \
                print(c.getresponse().read().decode().strip())\n    \
            c.close()\n";
    let out = ns
        .command(apps_bin().join("python"))
        .arg("-c")
        .arg(script)
        .output()
        .expect("python");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        6,
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(lines[0].starts_with("hello from pool web"), "{text}");
    assert!(lines[1].starts_with("421 Misdirected Request"), "{text}");
    assert!(lines[2].starts_with("uvicorn /third"), "{text}");
    assert_eq!(lines[3], "from the cache", "{text}");
    assert!(lines[4].starts_with("uvicorn /second"), "{text}");
    assert!(lines[5].starts_with("uvicorn /third"), "{text}");
    let st = s.status();
    assert_eq!(st["dispatcher"]["handed_back"].as_u64(), Some(0), "{st}");
    assert!(relays(&s) >= 1, "{st}");
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}
