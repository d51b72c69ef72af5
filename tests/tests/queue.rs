//! The pool socket held by the front end is the pool's queue: nothing in it is lost when
//! every worker dies.

use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use sluice_tests::*;

#[test]
fn killing_every_worker_loses_none_of_200_queued_connections() {
    let ns = Netns::new("kill");
    let s = Sluice::start(&ns, &two_pools("first-segment"));
    let st = s.status();
    let api = worker_pids(&st, "api");
    let web = worker_pids(&st, "web");
    assert_eq!(api.len(), 2);
    // Stopped workers accept nothing: connections pile up in the pool's queue.
    for &pid in &api {
        // SAFETY: signalling workers this test's sluice started.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
    }
    for &pid in &api {
        wait_stopped(pid);
    }
    let addr: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
    let mut clients: Vec<TcpStream> = ns.enter(|| {
        (0..200)
            .map(|i| {
                let mut c =
                    TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
                c.write_all(&get_request(&format!("/api/queued/{i}")))
                    .expect("send");
                c
            })
            .collect()
    });
    wait_for(
        &s,
        Duration::from_secs(10),
        "200 connections queued in pool api",
        |st| pool(st, "api")["queued"] == 200,
    );
    for &pid in &api {
        // SAFETY: as above; SIGKILL ends a stopped process too.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let st = wait_for(&s, Duration::from_secs(20), "replacement workers", |st| {
        let now = worker_pids(st, "api");
        now.len() == 2 && now.iter().all(|p| !api.contains(p))
    });
    for (i, c) in clients.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let r = read_response(c)
            .unwrap_or_else(|e| panic!("queued connection {i} lost: {e}\nlog:\n{}", s.log_text()));
        assert_eq!(r.status, 200, "connection {i}");
        assert_eq!(r.pool(), Some("api"), "connection {i}");
    }
    let st2 = s.status();
    assert_eq!(pool(&st2, "api")["queued"], 0, "{st2}");
    assert!(
        pool(&st, "api")["workers"]
            .as_array()
            .is_some_and(|ws| ws.iter().all(|w| w["restarts"] == 1)),
        "{st}"
    );
    // The other pool was not disturbed.
    assert_eq!(worker_pids(&st2, "web"), web, "{st2}");
    let r = ns.enter(|| exchange(addr, &get_request("/")).expect("web"));
    assert_eq!(r.pool(), Some("web"));
}

/// Waits until every thread of `pid` is stopped (SIGSTOP is delivered asynchronously).
fn wait_stopped(pid: i32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("worker tasks");
        let all_stopped = tasks.filter_map(Result::ok).all(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // The state follows the parenthesized command name.
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
        });
        if all_stopped {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "worker {pid} did not stop"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
