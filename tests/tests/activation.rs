//! Process activation (WAS's job): on-demand start, idle stop, rapid-fail protection, health
//! pings, overlapped recycling, queue-full answers, worker identity and isolation.

use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use sluice_tests::*;

/// Stops pool api's only worker (SIGSTOP), then opens `n` connections that send a request
/// each: they wait in the pool's queue. Returns the worker's pid and the clients.
fn stop_worker_and_queue(ns: &Netns, s: &Sluice, n: usize) -> (i32, Vec<TcpStream>) {
    let st = wait_for(s, Duration::from_secs(10), "a worker", |st| {
        worker_pids(st, "api").len() == 1
    });
    let pid = worker_pids(&st, "api")[0];
    // SAFETY: signalling the worker this test's sluice started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_millis(200));
    let clients = ns.enter(|| {
        (0..n)
            .map(|i| {
                let mut c = TcpStream::connect(v4()).expect("connect");
                c.write_all(&get_request(&format!("/queued/{i}")))
                    .expect("send");
                c
            })
            .collect()
    });
    (pid, clients)
}

#[test]
fn on_demand_pool_starts_with_its_first_request_and_stops_when_idle() {
    let ns = Netns::new("ondemand");
    let s = Sluice::start(
        &ns,
        &one_pool(r#""{hello}""#, "processes = 2\nidle_timeout = \"2s\""),
    );
    let st = s.status();
    assert_eq!(pool(&st, "api")["state"], "idle", "{st}");
    assert_eq!(worker_pids(&st, "api").len(), 0, "{st}");
    for round in 0..2 {
        let r = get_in(&ns, "/first");
        assert_eq!(r.status, 200, "round {round}");
        let st = wait_for(&s, Duration::from_secs(10), "two workers", |st| {
            worker_pids(st, "api").len() == 2
        });
        assert_eq!(pool(&st, "api")["state"], "running", "{st}");
        // No request for the idle timeout: the workers stop, nothing is lost.
        wait_for(&s, Duration::from_secs(10), "the pool to go idle", |st| {
            pool(st, "api")["state"] == "idle" && worker_pids(st, "api").is_empty()
        });
    }
}

const CRASHY: &str = r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "first-segment"
set_sysctls = true
admin_socket = "{admin}"

[[pool]]
name = "crashy"
command = ["{crash}", "--exit-on", "/crashy/die"]
threads = 1
start = "always"
rapid_fail = { failures = 3, interval = "1m" }

[[pool]]
name = "web"
command = ["{hello}"]
threads = 1
start = "always"

[[route]]
prefix = "/crashy/"
pool = "crashy"

[[route]]
prefix = "/"
pool = "web"
"#;

#[test]
fn a_crash_loop_stops_the_pool_with_503_until_pool_start() {
    let ns = Netns::new("rapid");
    let s = Sluice::start(&ns, CRASHY);
    wait_for(&s, Duration::from_secs(10), "workers", |st| {
        worker_pids(st, "crashy").len() == 1 && worker_pids(st, "web").len() == 1
    });
    let web = worker_pids(&s.status(), "web");
    for i in 0..3 {
        wait_for(&s, Duration::from_secs(10), "a crashy worker", |st| {
            pool(st, "crashy")["state"] != "running" || worker_pids(st, "crashy").len() == 1
        });
        // The worker exits without answering: the front end, which keeps the connection of
        // this shared host, answers 502 (or 503 once the pool is stopped).
        let r = ns.enter(|| exchange(v4(), &get_request("/crashy/die")));
        assert!(
            r.as_ref().is_ok_and(|r| r.status == 502 || r.status == 503),
            "crash {i}: {r:?}"
        );
        // The other pool serves normally throughout.
        assert_eq!(get_in(&ns, "/page").pool(), Some("web"));
    }
    let st = wait_for(
        &s,
        Duration::from_secs(10),
        "rapid-fail to stop the pool",
        |st| pool(st, "crashy")["state"] == "stopped",
    );
    assert!(
        worker_pids(&st, "crashy").is_empty()
            || pool(&st, "crashy")["workers"].as_array().is_some(),
        "{st}"
    );
    for _ in 0..5 {
        let started = Instant::now();
        let r = get_in(&ns, "/crashy/ok");
        let took = started.elapsed();
        assert_eq!(r.status, 503, "{r:?}");
        assert!(
            r.header("retry-after").is_some(),
            "503 without Retry-After: {r:?}"
        );
        assert!(took < Duration::from_millis(100), "503 took {took:?}");
    }
    assert_eq!(get_in(&ns, "/page").pool(), Some("web"));
    assert_eq!(
        worker_pids(&s.status(), "web"),
        web,
        "the other pool's worker was disturbed"
    );

    let out = sluice_admin(&s, &["pool", "start", "crashy"]);
    assert!(out.contains("started"), "{out}");
    wait_for(&s, Duration::from_secs(10), "the pool to run again", |st| {
        pool(st, "crashy")["state"] == "running" && worker_pids(st, "crashy").len() == 1
    });
    let r = get_in(&ns, "/crashy/ok");
    assert_eq!((r.status, r.pool()), (200, Some("crashy")));
}

#[test]
fn a_hung_worker_is_detected_by_ping_and_replaced() {
    let ns = Netns::new("hang");
    let s = Sluice::start(
        &ns,
        &one_pool(
            r#""{crash}", "--hang-on", "/hang""#,
            "start = \"always\"\nping_interval = \"1s\"\nping_timeout = \"2s\"",
        ),
    );
    let st = wait_for(&s, Duration::from_secs(10), "a ready worker", |st| {
        pool(st, "api")["workers"]
            .as_array()
            .is_some_and(|w| w.len() == 1 && w[0]["ready"] == true)
    });
    let hung = worker_pids(&st, "api")[0];
    // This request never gets an answer; keep its connection open while the worker hangs.
    let _stuck = ns.enter(|| {
        let mut c = TcpStream::connect(v4()).expect("connect");
        c.write_all(&get_request("/hang")).expect("send");
        c
    });
    let st = wait_for(
        &s,
        Duration::from_secs(15),
        "the hung worker to be replaced",
        |st| {
            let pids = worker_pids(st, "api");
            pids.len() == 1 && pids[0] != hung
        },
    );
    assert!(
        s.log_text().contains("did not answer a ping"),
        "{}",
        s.log_text()
    );
    let _ = st;
    let r = get_in(&ns, "/after");
    assert_eq!(r.status, 200);
}

#[test]
fn overlapped_recycle_under_wrk_load_fails_no_request() {
    let ns = Netns::new("recycle");
    let s = Sluice::start(&ns, &two_pools("first-segment"));
    let before = worker_pids(&s.status(), "api");
    assert_eq!(before.len(), 2);
    let load = std::thread::scope(|scope| {
        let w = scope.spawn(|| {
            wrk(
                &ns,
                &["-t1", "-c20", "-d6s", "http://127.0.0.1:8080/api/load"],
            )
        });
        std::thread::sleep(Duration::from_secs(1));
        sluice_admin(&s, &["pool", "recycle", "api"]);
        std::thread::sleep(Duration::from_secs(2));
        sluice_admin(&s, &["pool", "recycle", "api"]);
        w.join().expect("wrk thread")
    });
    assert!(load.requests > 1000, "{}", load.output);
    assert_eq!(load.non_2xx, 0, "{}", load.output);
    assert_eq!(load.socket_errors, 0, "{}", load.output);
    let st = wait_for(&s, Duration::from_secs(20), "two fresh workers", |st| {
        let pids = worker_pids(st, "api");
        pids.len() == 2 && pids.iter().all(|p| !before.contains(p))
    });
    let _ = st;
}

#[test]
fn a_full_queue_answers_503_and_recovers_when_it_drains() {
    let ns = Netns::new("full");
    let s = Sluice::start(
        &ns,
        &one_pool(r#""{hello}""#, "start = \"always\"\nqueue_length = 5"),
    );
    let (pid, mut clients) = stop_worker_and_queue(&ns, &s, 6);
    wait_for(&s, Duration::from_secs(5), "a full queue", |st| {
        pool(st, "api")["queued"].as_u64().unwrap_or(0) >= 5
    });
    // Over the limit: answered at once with 503, not a hang or a silent drop.
    let started = Instant::now();
    let r = get_in(&ns, "/over");
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "503 took {:?}",
        started.elapsed()
    );
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    for (i, c) in clients.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let r = read_response(c).unwrap_or_else(|e| panic!("queued {i}: {e}"));
        assert_eq!(r.status, 200, "queued {i}");
    }
    wait_for(&s, Duration::from_secs(5), "the queue to drain", |st| {
        pool(st, "api")["queued"] == 0
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = get_in(&ns, "/again");
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the pool did not recover: {r:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn socket_inodes(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.display().to_string())
        .filter(|l| l.starts_with("socket:"))
        .collect()
}

#[test]
fn workers_run_as_their_user_with_only_their_own_pool_sockets() {
    let ns = Netns::new("ident");
    let s = Sluice::start(
        &ns,
        r#"
[server]
listen = ["127.0.0.1:8080", "[::1]:8080"]
steering = "syn"
admin_socket = "{admin}"
metrics = "127.0.0.1:9464"

[[pool]]
name = "api"
command = ["{hello}"]
threads = 1
start = "always"
user = "nobody"

[[pool]]
name = "web"
command = ["{hello}"]
threads = 1
start = "always"

[[route]]
prefix = "/api/"
pool = "api"

[[route]]
prefix = "/"
pool = "web"
"#,
    );
    let st = wait_for(&s, Duration::from_secs(10), "workers", |st| {
        worker_pids(st, "api").len() == 1 && worker_pids(st, "web").len() == 1
    });
    let api = worker_pids(&st, "api")[0];
    let web = worker_pids(&st, "web")[0];
    let status = std::fs::read_to_string(format!("/proc/{api}/status")).expect("status");
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("Uid line");
    assert!(
        uid.split_whitespace().skip(1).all(|u| u == "65534"),
        "api worker is not nobody: {uid}"
    );
    // Its own process group.
    let stat = std::fs::read_to_string(format!("/proc/{api}/stat")).expect("stat");
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .expect("stat")
        .1
        .split_whitespace()
        .collect();
    assert_eq!(
        fields[2],
        api.to_string(),
        "worker is not its own process group leader"
    );
    // Two pool sockets (IPv4, IPv6), the handoff channel and its control channel, no more.
    let a = socket_inodes(api);
    let w = socket_inodes(web);
    assert_eq!(a.len(), 4, "api worker sockets: {a:?}");
    assert!(
        a.iter().all(|x| !w.contains(x)),
        "api and web share a socket: {a:?} {w:?}"
    );
    assert_eq!(get_in(&ns, "/api/who").pool(), Some("api"));
    // The Prometheus endpoint shows the same figures.
    let metrics = ns.enter(|| {
        exchange(
            "127.0.0.1:9464".parse().expect("addr"),
            b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n",
        )
        .expect("metrics")
    });
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        text.contains("sluice_pool_state{pool=\"api\",state=\"running\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("sluice_delivered_total{pool=\"api\"} 1"),
        "{text}"
    );
}

fn kill_workers_under_load(close: bool) {
    let ns = Netns::new(if close { "killsc" } else { "kills" });
    let s = Sluice::start(&ns, &two_pools("first-segment"));
    let mut args = vec!["-t1", "-c20", "-d6s"];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push("http://127.0.0.1:8080/api/load");
    let load = std::thread::scope(|scope| {
        let w = scope.spawn(|| wrk(&ns, &args));
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(1200));
            if let Some(&pid) = worker_pids(&s.status(), "api").first() {
                // SAFETY: a worker of this test's sluice.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        w.join().expect("wrk thread")
    });
    assert!(load.requests > 1000, "{}", load.output);
    assert_eq!(load.non_2xx, 0, "{}", load.output);
    // At most the connections open on the killed workers fail (20 per kill at worst); every
    // connection waiting in the queue is answered by the replacement.
    assert!(load.socket_errors <= 4 * 20, "{}", load.output);
    let st = wait_for(&s, Duration::from_secs(10), "replacements", |st| {
        worker_pids(st, "api").len() == 2
    });
    assert_eq!(pool(&st, "api")["state"], "running", "{st}");
}

#[test]
fn killing_workers_under_keep_alive_load_loses_only_their_open_connections() {
    kill_workers_under_load(false);
}

#[test]
fn killing_workers_under_connection_close_load_loses_only_their_open_connections() {
    kill_workers_under_load(true);
}

#[test]
fn connections_queued_for_a_pool_that_stops_are_answered_503() {
    let ns = Netns::new("drain");
    let s = Sluice::start(
        &ns,
        &one_pool(
            r#""{hello}""#,
            "start = \"always\"\nrapid_fail = { failures = 1, interval = \"1m\" }",
        ),
    );
    let (pid, mut clients) = stop_worker_and_queue(&ns, &s, 20);
    wait_for(&s, Duration::from_secs(5), "20 queued", |st| {
        pool(st, "api")["queued"] == 20
    });
    // One failure is enough here: the pool stops with 20 connections in its queue.
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for(&s, Duration::from_secs(5), "the pool to stop", |st| {
        pool(st, "api")["state"] == "stopped"
    });
    for (i, c) in clients.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let r = read_response(c).unwrap_or_else(|e| panic!("queued {i} left hanging: {e}"));
        assert_eq!(r.status, 503, "queued {i}");
        assert!(r.header("retry-after").is_some());
    }
    assert_eq!(pool(&s.status(), "api")["queued"], 0);
}

const RELOADED: &str = r#"
[server]
listen = ["127.0.0.1:8080", "[::1]:8080"]
steering = "first-segment"
set_sysctls = true
admin_socket = "{admin}"

[[pool]]
name = "api"
command = ["{hello}"]
processes = 1
threads = 1
start = "always"

[[pool]]
name = "fresh"
command = ["{hello}"]
threads = 1

[[route]]
prefix = "/api/"
pool = "api"

[[route]]
prefix = "/fresh/"
pool = "fresh"

[[route]]
prefix = "/"
pool = "api"
"#;

#[test]
fn reload_under_load_adds_changes_and_removes_pools_without_failing_a_request() {
    let ns = Netns::new("reload");
    let s = Sluice::start(&ns, &two_pools("first-segment"));
    let api_before = worker_pids(&s.status(), "api");
    let web_before = worker_pids(&s.status(), "web");
    assert_eq!(get_in(&ns, "/").pool(), Some("web"));
    // A config that does not check is refused; the running one keeps serving.
    s.rewrite("[server]\nlisten = [\"127.0.0.1:8080\"]\nbogus = 1\n");
    let out = Command::new(sluice_bin())
        .arg("reload")
        .arg("--admin")
        .arg(&s.admin)
        .output()
        .expect("reload");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bogus") && err.contains("running configuration stays"),
        "{err}"
    );
    assert_eq!(get_in(&ns, "/api/x").pool(), Some("api"));

    s.rewrite(RELOADED);
    let load = std::thread::scope(|scope| {
        let w = scope.spawn(|| {
            wrk(
                &ns,
                &["-t1", "-c20", "-d5s", "http://127.0.0.1:8080/api/load"],
            )
        });
        std::thread::sleep(Duration::from_secs(1));
        // SIGHUP, as an operator's `kill -HUP` would.
        // SAFETY: signalling the sluice this test started.
        unsafe { libc::kill(s.pid() as i32, libc::SIGHUP) };
        w.join().expect("wrk thread")
    });
    assert!(load.requests > 1000, "{}", load.output);
    assert_eq!(load.non_2xx, 0, "{}", load.output);
    assert_eq!(load.socket_errors, 0, "{}", load.output);
    assert!(
        s.log_text().contains("reloaded: added pool fresh"),
        "{}",
        s.log_text()
    );
    // The routes changed at once: / now goes to api, /fresh/ to the new pool.
    assert_eq!(get_in(&ns, "/").pool(), Some("api"));
    assert_eq!(get_in(&ns, "/fresh/x").pool(), Some("fresh"));
    assert_eq!(get_in(&ns, "/api/y").pool(), Some("api"));
    let st = wait_for(
        &s,
        Duration::from_secs(20),
        "api recycled to one worker, web gone",
        |st| {
            let api = worker_pids(st, "api");
            api.len() == 1
                && !api_before.contains(&api[0])
                && st["pools"]
                    .as_array()
                    .is_some_and(|p| p.iter().all(|p| p["name"] != "web"))
        },
    );
    for pid in web_before {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .unwrap_or_default()
                    .contains(") Z"),
            "web worker {pid} still runs"
        );
    }
    // The reloaded config has no trusting site: the new pool shares the host with api, its
    // requests are delivered, and the kernel sends the host's connections to the front end.
    let _ = st;
    let before = s.status();
    get_in(&ns, "/fresh/kernel");
    let after = s.status();
    let count = |st: &serde_json::Value| pool(st, "fresh")["delivered"].as_u64().unwrap_or(0);
    assert_eq!(count(&after), count(&before) + 1, "{after}");
    assert!(
        after["fallbacks"]["shared_site"].as_u64() > before["fallbacks"]["shared_site"].as_u64(),
        "{after}"
    );
}

#[test]
fn connections_waiting_for_a_pool_a_reload_removes_are_routed_afresh() {
    let ns = Netns::new("rmq");
    let before = r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "syn"
admin_socket = "{admin}"

[[pool]]
name = "old"
command = ["{hello}"]
threads = 1
start = "always"
shutdown_time_limit = "1s"

[[pool]]
name = "web"
command = ["{hello}"]
threads = 1
start = "always"

[[route]]
prefix = "/old/"
pool = "old"

[[route]]
prefix = "/"
pool = "web"
"#;
    let s = Sluice::start(&ns, before);
    let st = wait_for(&s, Duration::from_secs(10), "workers", |st| {
        worker_pids(st, "old").len() == 1 && worker_pids(st, "web").len() == 1
    });
    let old = worker_pids(&st, "old")[0];
    // SAFETY: the worker of this test's sluice.
    unsafe { libc::kill(old, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_millis(200));
    // Plain clients of this shared host are kept by the front end, which delivers each
    // request on a channel passed through old's handoff channel, where it waits: its worker
    // is stopped.
    let mut clients: Vec<TcpStream> = ns.enter(|| {
        (0..10)
            .map(|i| {
                let mut c = TcpStream::connect(v4()).expect("connect");
                c.write_all(&get_request(&format!("/old/{i}")))
                    .expect("send");
                c
            })
            .collect()
    });
    wait_for(&s, Duration::from_secs(5), "10 deliveries", |st| {
        pool(st, "old")["delivered"] == 10
    });
    // The reload removes old; /old/ now belongs to web.
    s.rewrite(&before.replace("prefix = \"/old/\"\npool = \"old\"", "prefix = \"/old/\"\npool = \"web\"").replace(
        "[[pool]]\nname = \"old\"\ncommand = [\"{hello}\"]\nthreads = 1\nstart = \"always\"\nshutdown_time_limit = \"1s\"\n",
        "",
    ));
    let out = Command::new(sluice_bin())
        .arg("reload")
        .arg("--admin")
        .arg(&s.admin)
        .output()
        .expect("reload");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed pool old"));
    for (i, c) in clients.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let r = read_response(c)
            .unwrap_or_else(|e| panic!("connection {i} left for the removed pool was lost: {e}"));
        assert_eq!((r.status, r.pool()), (200, Some("web")), "connection {i}");
    }
    // SAFETY: as above (it is killed after its shutdown limit anyway).
    unsafe { libc::kill(old, libc::SIGCONT) };
}

/// /metrics counts a pool's answers by status class and how long its handlers took, from
/// what its workers report: 200s and 404s of the `files` worker, and a 405 it refuses.
#[test]
fn metrics_count_a_pools_answers_by_class_with_a_duration_histogram() {
    let ns = Netns::new("classes");
    let root = std::env::temp_dir().join(format!("sluice-classes-{}", std::process::id()));
    std::fs::create_dir_all(&root).expect("root");
    std::fs::write(root.join("here.txt"), "here\n").expect("file");
    let s = Sluice::start(
        &ns,
        &format!(
            r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "first-segment"
set_sysctls = true
admin_socket = "{{admin}}"
metrics = "127.0.0.1:9464"

[[pool]]
name = "files"
command = ["{{files}}", "--root", "{}", "--cache-control", "no-store"]
threads = 1
start = "always"

[[route]]
prefix = "/"
pool = "files"
"#,
            root.display()
        ),
    );
    ns.enter(|| {
        let a: SocketAddr = ([127, 0, 0, 1], 8080).into();
        for _ in 0..6 {
            assert_eq!(
                exchange(a, &get_request("/here.txt")).expect("200").status,
                200
            );
        }
        for _ in 0..3 {
            assert_eq!(
                exchange(a, &get_request("/gone.txt")).expect("404").status,
                404
            );
        }
        let post =
            b"POST /here.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        assert_eq!(exchange(a, post).expect("405").status, 405);
    });
    // Workers report within a second of answering.
    let st = wait_for(&s, Duration::from_secs(5), "the counts reported", |st| {
        pool(st, "files")["duration_us"]["counts"]
            .as_array()
            .and_then(|c| c.last())
            .and_then(|v| v.as_u64())
            == Some(10)
    });
    let p = pool(&st, "files");
    assert_eq!(p["responses"]["2xx"], 6, "{st}");
    assert_eq!(p["responses"]["4xx"], 4, "{st}");
    let metrics = ns.enter(|| {
        exchange(
            "127.0.0.1:9464".parse().expect("addr"),
            b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
        )
        .expect("metrics")
    });
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    for line in [
        "sluice_pool_responses_total{pool=\"files\",class=\"2xx\"} 6",
        "sluice_pool_responses_total{pool=\"files\",class=\"4xx\"} 4",
        "sluice_pool_request_duration_seconds_bucket{pool=\"files\",le=\"+Inf\"} 10",
        "sluice_pool_request_duration_seconds_count{pool=\"files\"} 10",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
    // Buckets are cumulative: they never go down.
    let buckets: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with("sluice_pool_request_duration_seconds_bucket{pool=\"files\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert_eq!(buckets.len(), 11, "{text}");
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    let _ = std::fs::remove_dir_all(&root);
}
