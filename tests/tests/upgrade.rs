//! `sluice upgrade`: the front end replaces its program with the binary at its path, in
//! place; traffic, queued connections, workers and counters carry over. Each test runs the
//! front end from a copy of the binary and puts a new one (or a broken one) at that path.

use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use sluice_tests::{upgrading::*, *};

fn workers(s: &Sluice) -> Vec<i32> {
    let st = wait_for(s, Duration::from_secs(10), "ready workers", |st| {
        worker_pids(st, "api").len() == 2 && worker_pids(st, "web").len() == 1
    });
    let mut w: Vec<i32> = ["api", "web"]
        .iter()
        .flat_map(|p| worker_pids(&st, p))
        .collect();
    w.sort_unstable();
    w
}

type Counter = fn(&serde_json::Value) -> u64;

/// Counters that only grow while traffic runs.
const COUNTERS: [(&str, Counter); 3] = [
    ("program runs", |st| {
        st["kernel"]["program_runs"].as_u64().unwrap_or(0)
    }),
    ("dispatcher accepts", |st| {
        st["dispatcher"]["accepted"].as_u64().unwrap_or(0)
    }),
    ("steered in the kernel", |st| {
        st["pools"].as_array().map_or(0, |ps| {
            ps.iter().filter_map(|p| p["steered_kernel"].as_u64()).sum()
        })
    }),
];

#[test]
fn wrk_runs_through_two_upgrades_with_no_error_and_the_same_workers_in_both_modes() {
    for mode in ["first-segment", "syn"] {
        let ns = Netns::new("upwrk");
        let bin = binary_copy("wrk");
        let s = Sluice::start_program(&ns, &two_pools(mode), &bin);
        let before_workers = workers(&s);
        let pid = s.pid();
        let (keepalive, close) = std::thread::scope(|scope| {
            let ka = scope.spawn(|| {
                wrk(
                    &ns,
                    &[
                        "-t1",
                        "-c16",
                        "-d8s",
                        "--timeout",
                        "10s",
                        "http://127.0.0.1:8080/api/x",
                    ],
                )
            });
            let cl = scope.spawn(|| {
                wrk(
                    &ns,
                    &[
                        "-t1",
                        "-c4",
                        "-d8s",
                        "--timeout",
                        "10s",
                        "-H",
                        "Connection: close",
                        "http://127.0.0.1:8080/web",
                    ],
                )
            });
            for round in 1..=2 {
                std::thread::sleep(Duration::from_millis(1500));
                install(&bin, Ok(&sluice_bin()));
                assert!(!runs_current_file(pid, &bin), "the file was replaced");
                let st0 = s.status();
                let out = upgrade(&s);
                assert!(
                    out.status.success(),
                    "{mode}: upgrade {round}: {}",
                    text(&out)
                );
                assert!(text(&out).contains("upgraded"), "{}", text(&out));
                assert!(runs_current_file(pid, &bin), "{mode}: the new file runs");
                // Counters go on from where the earlier program left them.
                let st1 = s.status();
                for (what, f) in COUNTERS {
                    assert!(f(&st1) >= f(&st0), "{mode}: {what} went back: {st0}\n{st1}");
                }
            }
            (ka.join().expect("wrk"), cl.join().expect("wrk"))
        });
        for (what, r) in [("keep-alive", &keepalive), ("close", &close)] {
            assert!(r.requests > 0, "{mode} {what}: {}", r.output);
            assert_eq!(
                r.socket_errors,
                0,
                "{mode} {what}: {}\n{}",
                r.output,
                s.log_text()
            );
            assert_eq!(r.non_2xx, 0, "{mode} {what}: {}", r.output);
        }
        assert_eq!(s.pid(), pid);
        assert_eq!(
            workers(&s),
            before_workers,
            "{mode}: workers adopted, not restarted"
        );
        let st = s.status();
        assert_eq!(st["upgrades"], 2, "{st}");
        let _ = std::fs::remove_dir_all(bin.parent().unwrap_or(Path::new("/nonexistent")));
    }
}

/// 200 connections wait while the upgrade happens: in the pool's queue (its workers are
/// stopped with SIGSTOP), in its handoff channel (syn mode), and in the dispatcher, which has
/// read part of their request (their first bytes end mid request line).
#[test]
fn connections_waiting_during_an_upgrade_are_all_answered() {
    for mode in ["first-segment", "syn"] {
        let ns = Netns::new("upq");
        let bin = binary_copy("queue");
        let s = Sluice::start_program(&ns, &two_pools(mode), &bin);
        workers(&s);
        let api = worker_pids(&s.status(), "api");
        for &p in &api {
            // SAFETY: pausing a worker of the front end this test started.
            unsafe { libc::kill(p, libc::SIGSTOP) };
        }
        let a: SocketAddr = ([127, 0, 0, 1], 8080).into();
        let mut waiting: Vec<(TcpStream, bool)> = ns.enter(|| {
            (0..200)
                .map(|i| {
                    let mut c =
                        TcpStream::connect_timeout(&a, Duration::from_secs(5)).expect("connect");
                    let partial = i % 10 == 0;
                    if partial {
                        c.write_all(b"GET /api/part").expect("first bytes");
                    } else {
                        c.write_all(&get_request("/api/queued")).expect("request");
                    }
                    c.set_read_timeout(Some(Duration::from_secs(30)))
                        .expect("timeout");
                    (c, partial)
                })
                .collect()
        });
        std::thread::sleep(Duration::from_millis(300));
        install(&bin, Ok(&sluice_bin()));
        let out = upgrade(&s);
        assert!(out.status.success(), "{mode}: {}", text(&out));
        for (c, partial) in &mut waiting {
            if *partial {
                c.write_all(b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                    .expect("the rest");
            }
        }
        for &p in &api {
            // SAFETY: resuming the workers paused above.
            unsafe { libc::kill(p, libc::SIGCONT) };
        }
        for (i, (mut c, _)) in waiting.into_iter().enumerate() {
            let r = read_response(&mut c).unwrap_or_else(|e| {
                panic!(
                    "{mode}: connection {i} waited in vain: {e}\n{}",
                    s.log_text()
                )
            });
            assert_eq!(r.status, 200, "{mode}: connection {i}");
            assert_eq!(r.pool(), Some("api"), "{mode}: connection {i}");
        }
        assert!(
            s.log_text()
                .contains("dispatcher: took up 20 connection(s)"),
            "{mode}: the dispatcher's partial requests were handed over:\n{}",
            s.log_text()
        );
        assert_eq!(worker_pids(&s.status(), "api"), api);
        let _ = std::fs::remove_dir_all(bin.parent().unwrap_or(Path::new("/nonexistent")));
    }
}

#[test]
fn an_upgrade_to_a_binary_that_fails_check_is_refused_and_the_running_program_serves_on() {
    let ns = Netns::new("upbad");
    let bin = binary_copy("bad");
    let s = Sluice::start_program(&ns, &two_pools("first-segment"), &bin);
    let before = workers(&s);
    install(
        &bin,
        Err("#!/bin/sh\necho 'this build is broken' >&2\nexit 3\n"),
    );
    let out = upgrade(&s);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("check"), "{}", text(&out));
    assert!(
        text(&out).contains("this build is broken"),
        "{}",
        text(&out)
    );
    assert_eq!(get_in(&ns, "/api/x").pool(), Some("api"));
    assert_eq!(workers(&s), before);
    let st = s.status();
    assert_eq!(st["upgrades"], 0, "{st}");
    assert!(
        st["upgrade_error"]
            .as_str()
            .is_some_and(|e| e.contains("broken")),
        "{st}"
    );
    let _ = std::fs::remove_dir_all(bin.parent().unwrap_or(Path::new("/nonexistent")));
}

/// The new program passes `check` but cannot start (here it is pointed at a config that does
/// not exist): it runs the earlier program again, which serves on with the same workers and
/// says why; a good build afterwards upgrades.
#[test]
fn an_upgrade_whose_program_cannot_start_goes_back_to_the_earlier_program() {
    let ns = Netns::new("upback");
    let bin = binary_copy("back");
    let s = Sluice::start_program(&ns, &two_pools("syn"), &bin);
    let before = workers(&s);
    let real = sluice_bin();
    install_unstartable(&bin);
    assert_went_back(&upgrade(&s));
    assert_eq!(get_in(&ns, "/api/x").pool(), Some("api"));
    assert_eq!(workers(&s), before, "the same workers, adopted back");
    let st = s.status();
    assert_eq!(st["upgrades"], 0, "{st}");

    // This time by signal, as `kill -USR2` (or systemd) would ask.
    install(&bin, Ok(&real));
    // SAFETY: signalling the front end this test started.
    unsafe { libc::kill(s.pid() as i32, libc::SIGUSR2) };
    wait_for(
        &s,
        Duration::from_secs(20),
        "the upgrade by SIGUSR2",
        |st| st["upgrades"] == 1,
    );
    assert_eq!(get_in(&ns, "/web/x").pool(), Some("web"));
    assert_eq!(workers(&s), before);
    let _ = std::fs::remove_dir_all(bin.parent().unwrap_or(Path::new("/nonexistent")));
}

/// Socket pools carry over too: the servers keep running (same pids), kernel-steered traffic
/// to them goes on, their health checks go on, and their output still reaches the log
/// (the pipe's read end is passed: a server writing to a closed pipe would die).
#[test]
fn socket_pools_keep_their_servers_and_their_output_through_an_upgrade() {
    let ns = Netns::new("upsock");
    let bin = binary_copy("sock");
    let template = r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "first-segment"
set_sysctls = true
admin_socket = "{admin}"

[[pool]]
name = "node"
worker = "socket"
command = ["node", "node_app.js"]
cwd = "{workers}"
start = "always"

[[pool]]
name = "uv"
worker = "socket"
command = ["{apps}/uvicorn", "--fd", "3", "asgi_app:app"]
cwd = "{workers}"
start = "always"
health = { path = "/healthz", interval = "1s", timeout = "2s" }

[[route]]
host = "node.test"
prefix = "/"
pool = "node"

[[route]]
host = "uv.test"
prefix = "/"
pool = "uv"
"#;
    let s = Sluice::start_program(&ns, template, &bin);
    let ready = |st: &serde_json::Value, p: &str| {
        pool(st, p)["workers"]
            .as_array()
            .is_some_and(|w| w.len() == 1 && w[0]["ready"] == true)
    };
    let st = wait_for(&s, Duration::from_secs(30), "both servers ready", |st| {
        ready(st, "node") && ready(st, "uv")
    });
    let before: Vec<i32> = ["node", "uv"]
        .iter()
        .flat_map(|p| worker_pids(&st, p))
        .collect();
    let r = std::thread::scope(|scope| {
        let w = scope.spawn(|| {
            wrk(
                &ns,
                &[
                    "-t1",
                    "-c8",
                    "-d6s",
                    "--timeout",
                    "10s",
                    "-H",
                    "Host: node.test",
                    "http://127.0.0.1:8080/n",
                ],
            )
        });
        std::thread::sleep(Duration::from_secs(2));
        install(&bin, Ok(&sluice_bin()));
        let out = upgrade(&s);
        assert!(out.status.success(), "{}", text(&out));
        w.join().expect("wrk")
    });
    assert!(r.requests > 0, "{}", r.output);
    assert_eq!(r.socket_errors, 0, "{}\n{}", r.output, s.log_text());
    assert_eq!(r.non_2xx, 0, "{}", r.output);
    let out = ns
        .command("curl")
        .args([
            "-s",
            "-m",
            "5",
            "-H",
            "Host: uv.test",
            "http://127.0.0.1:8080/after-upgrade",
        ])
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = wait_for(
        &s,
        Duration::from_secs(10),
        "uvicorn's line in the log",
        |_| s.log_text().contains("/after-upgrade"),
    );
    let log = s.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("/after-upgrade"))
        .unwrap_or_default();
    assert!(
        line.contains(&format!("pool uv[{}]: ", before[1])),
        "{line}"
    );
    let after: Vec<i32> = ["node", "uv"]
        .iter()
        .flat_map(|p| worker_pids(&st, p))
        .collect();
    assert_eq!(after, before, "the same servers: {st}");
    // Health checks go on under the new program: the server stays ready.
    std::thread::sleep(Duration::from_millis(2500));
    let st = s.status();
    assert!(ready(&st, "uv"), "{st}");
    let _ = std::fs::remove_dir_all(bin.parent().unwrap_or(Path::new("/nonexistent")));
}

/// Pools' own uids follow their order; after a reload inserted a pool before another, the
/// next program would number them differently and an adopted worker could share a uid with
/// another pool's new ones: the upgrade is refused, saying why.
#[test]
fn an_upgrade_after_a_reload_reordered_pools_is_refused() {
    let ns = Netns::new("upord");
    let bin = binary_copy("order");
    let s = Sluice::start_program(&ns, &two_pools("syn"), &bin);
    workers(&s);
    let inserted = two_pools("syn").replacen(
        "[[pool]]\nname = \"web\"",
        "[[pool]]\nname = \"mid\"\ncommand = [\"{hello}\"]\nthreads = 1\n\n[[pool]]\nname = \"web\"",
        1,
    );
    assert!(inserted.contains("\"mid\""), "{inserted}");
    s.rewrite(&inserted);
    sluice_admin(&s, &["reload"]);
    install(&bin, Ok(&sluice_bin()));
    let out = upgrade(&s);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("reordered pools"), "{}", text(&out));
    assert_eq!(get_in(&ns, "/api/x").pool(), Some("api"));
    let _ = std::fs::remove_dir_all(bin.parent().unwrap_or(Path::new("/nonexistent")));
}

/// The connections the front end keeps for a shared host (no trust: each request is
/// delivered) go through an upgrade between requests: wrk's keep-alive connections see no
/// error, and the log says how many were handed over.
#[test]
fn kept_connections_of_a_shared_host_are_carried_through_an_upgrade() {
    let ns = Netns::new("upkept");
    let bin = binary_copy("kept");
    let shared =
        two_pools("first-segment").replace("[[site]]\nhost = \"*\"\ntrust_pools = true\n", "");
    assert!(!shared.contains("trust_pools"));
    let s = Sluice::start_program(&ns, &shared, &bin);
    let before_workers = workers(&s);
    let load = std::thread::scope(|scope| {
        let ka = scope.spawn(|| {
            wrk(
                &ns,
                &[
                    "-t1",
                    "-c16",
                    "-d6s",
                    "--timeout",
                    "10s",
                    "http://127.0.0.1:8080/api/x",
                ],
            )
        });
        std::thread::sleep(Duration::from_millis(2000));
        install(&bin, Ok(&sluice_bin()));
        let out = upgrade(&s);
        assert!(out.status.success(), "{}", text(&out));
        ka.join().expect("wrk")
    });
    assert!(load.requests > 0, "{}", load.output);
    assert_eq!(load.socket_errors, 0, "{}\n{}", load.output, s.log_text());
    assert_eq!(load.non_2xx, 0, "{}", load.output);
    let log = s.log_text();
    let carried = log
        .lines()
        .filter_map(|l| l.split("upgrading: ").nth(1))
        .filter_map(|l| l.strip_suffix(" kept connection(s) handed over"))
        .filter_map(|n| n.trim().parse::<u32>().ok())
        .sum::<u32>();
    assert!(carried >= 1, "kept connections handed over: {log}");
    assert_eq!(
        workers(&s),
        before_workers,
        "workers adopted, not restarted"
    );
    let st = s.status();
    assert!(
        pool(&st, "api")["delivered"].as_u64().unwrap_or(0) > 0,
        "{st}"
    );
    let _ = std::fs::remove_dir_all(bin.parent().unwrap_or(Path::new("/nonexistent")));
}
