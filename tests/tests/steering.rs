//! Connections reach the right pool, steered in the kernel where the mode allows it.

use std::{net::SocketAddr, time::Duration};

use sluice_tests::*;

const V4: &str = "127.0.0.1:8080";
const V6: &str = "[::1]:8080";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

/// (path, pool it must reach)
const CASES: [(&str, &str); 6] = [
    ("/api/x", "api"),
    ("/api", "api"),
    ("/api/v1/users?id=3", "api"),
    ("/", "web"),
    ("/apix", "web"),
    ("/web/page", "web"),
];

fn curl(ns: &Netns, url: &str) -> (String, String) {
    let out = ns
        .command("curl")
        .args(["-s", "-m", "5", "-D", "-", url])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let pool = text
        .lines()
        .find_map(|l| l.strip_prefix("x-sluice-pool: "))
        .map(|p| p.trim().to_owned())
        .unwrap_or_default();
    (pool, text)
}

#[test]
fn first_segment_steers_plain_clients_in_the_kernel() {
    let ns = Netns::new("fs");
    let s = Sluice::start(&ns, &two_pools("first-segment"));
    let mut expected = std::collections::HashMap::<&str, u64>::new();
    for (path, want) in CASES {
        for base in ["http://127.0.0.1:8080", "http://[::1]:8080"] {
            let (pool, text) = curl(&ns, &format!("{base}{path}"));
            assert_eq!(pool, want, "curl {base}{path}:\n{text}");
            *expected.entry(want).or_default() += 1;
        }
    }
    ns.enter(|| {
        for (path, want) in CASES {
            for a in [V4, V6] {
                let r = exchange(addr(a), &get_request(path)).expect("plain client");
                assert_eq!(r.status, 200);
                assert_eq!(r.pool(), Some(want), "plain client {a}{path}");
            }
        }
    });
    for (_, want) in CASES {
        *expected.entry(want).or_default() += 2;
    }
    let st = s.status();
    for (pool_name, n) in &expected {
        let p = pool(&st, pool_name);
        assert_eq!(
            p["steered_kernel"], *n,
            "pool {pool_name} steered in the kernel: {st}"
        );
        assert_eq!(
            p["handed_off"], 0,
            "pool {pool_name} went through the dispatcher: {st}"
        );
    }
    for (reason, n) in st["fallbacks"].as_object().expect("fallbacks") {
        assert_eq!(n, 0, "fallback {reason}: {st}");
    }
    assert_eq!(st["dispatcher"]["accepted"], 0, "{st}");
    assert!(
        st["kernel"]["ack_gate_drops"].as_u64().unwrap_or(0) > 0,
        "the ack gate dropped nothing: {st}"
    );
}

#[test]
fn first_segment_sends_uncanonical_paths_to_the_dispatcher() {
    let ns = Netns::new("fsu");
    let s = Sluice::start(&ns, &two_pools("first-segment"));
    ns.enter(|| {
        for (path, want) in [
            ("/web/../api/x", "api"),
            ("//api/x", "api"),
            ("/%61pi/x", "api"),
            ("/api/./x", "api"),
            ("/api/%2e%2e/w", "web"),
        ] {
            let r = exchange(addr(V4), &get_request(path)).expect("client");
            assert_eq!(r.pool(), Some(want), "{path}");
        }
    });
    let st = s.status();
    assert_eq!(st["fallbacks"]["unsafe_path"], 5, "{st}");
    assert_eq!(pool(&st, "api")["handed_off"], 4, "{st}");
    assert_eq!(pool(&st, "web")["handed_off"], 1, "{st}");
}

#[test]
fn syn_mode_steers_tfo_clients_and_dispatches_plain_ones() {
    let ns = Netns::new("syn");
    // Client and server TFO without cookies, inside this namespace only.
    ns.sysctl("net.ipv4.tcp_fastopen", "0x607");
    let s = Sluice::start(&ns, &two_pools("syn"));
    ns.enter(|| {
        for (path, want) in CASES {
            for a in [V4, V6] {
                let r = exchange_tfo(addr(a), &get_request(path)).expect("TFO client");
                assert_eq!(r.pool(), Some(want), "TFO {a}{path}");
            }
        }
    });
    let st = s.status();
    assert_eq!(pool(&st, "api")["steered_kernel"], 6, "{st}");
    assert_eq!(pool(&st, "web")["steered_kernel"], 6, "{st}");
    assert_eq!(st["dispatcher"]["accepted"], 0, "{st}");

    for (path, want) in CASES {
        let (pool_name, text) = curl(&ns, &format!("http://127.0.0.1:8080{path}"));
        assert_eq!(pool_name, want, "curl {path}:\n{text}");
    }
    let st = s.status();
    assert_eq!(pool(&st, "api")["handed_off"], 3, "{st}");
    assert_eq!(pool(&st, "web")["handed_off"], 3, "{st}");
    assert_eq!(st["fallbacks"]["no_payload"], 6, "{st}");
    assert_eq!(
        pool(&st, "api")["steered_kernel"],
        6,
        "plain clients must not count as steered: {st}"
    );
}

#[test]
fn wrk_keepalive_through_first_segment_has_no_errors() {
    let ns = Netns::new("wrk");
    let s = Sluice::start(&ns, &two_pools("first-segment"));
    let r = wrk(
        &ns,
        &["-t1", "-c50", "-d10s", "http://127.0.0.1:8080/api/hello"],
    );
    assert!(r.requests > 1000, "too few requests:\n{}", r.output);
    assert_eq!(r.non_2xx, 0, "{}", r.output);
    assert_eq!(r.socket_errors, 0, "{}", r.output);
    let st = s.status();
    assert_eq!(
        pool(&st, "api")["steered_kernel"],
        50,
        "every wrk connection steered in the kernel: {st}"
    );
    // wrk checks the address with one connection it closes without sending anything; its
    // FIN completes the handshake with no payload, so that one reaches the dispatcher.
    assert!(
        st["dispatcher"]["accepted"].as_u64().unwrap_or(9) <= 1,
        "{st}"
    );
    for (reason, n) in st["fallbacks"].as_object().expect("fallbacks") {
        let allowed = if reason == "no_payload" { 1 } else { 0 };
        assert!(
            n.as_u64().unwrap_or(9) <= allowed,
            "fallback {reason}: {st}"
        );
    }
}

#[test]
fn sluice_stops_cleanly_and_restores_what_it_changed() {
    let ns = Netns::new("stop");
    assert_eq!(ns.read_sysctl("net.ipv4.tcp_syncookies"), "1");
    let mut s = Sluice::start(&ns, &two_pools("first-segment"));
    assert_eq!(ns.read_sysctl("net.ipv4.tcp_syncookies"), "2");
    let pids = [
        worker_pids(&s.status(), "api"),
        worker_pids(&s.status(), "web"),
    ]
    .concat();
    assert_eq!(pids.len(), 3);
    assert_eq!(s.stop(), Some(0), "log:\n{}", s.log_text());
    assert_eq!(
        ns.read_sysctl("net.ipv4.tcp_syncookies"),
        "1",
        "syncookies not restored"
    );
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "worker {pid} outlived sluice"
        );
    }
    // No ack gate left behind: with cookies on, a handshake to a new listener on the same
    // port completes without the client sending data (the gate would drop its ACK).
    ns.sysctl("net.ipv4.tcp_syncookies", "2");
    ns.enter(|| {
        let l = std::net::TcpListener::bind(V4).expect("bind after sluice stopped");
        l.set_nonblocking(true).expect("nonblocking");
        let _c = std::net::TcpStream::connect_timeout(&addr(V4), Duration::from_secs(2))
            .expect("connect");
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while l.accept().is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "handshake never completed: ack gate still attached?"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let log = s.log_text();
    assert!(
        log.contains("restored net.ipv4.tcp_syncookies = 1"),
        "{log}"
    );
}

/// Each front end's ack gate must pass on packets that are not its own to the next program on
/// the interface (TCX_NEXT), not end the chain: a second front end in the namespace (or any
/// other tc program after ours) would otherwise never see its handshake ACKs.
#[test]
fn two_front_ends_in_one_namespace_both_steer_in_the_kernel() {
    let ns = Netns::new("two");
    let first = Sluice::start(&ns, &one_pool("\"{hello}\"", "start = \"always\""));
    let second = Sluice::start(
        &ns,
        &one_pool("\"{hello}\"", "start = \"always\"").replace("127.0.0.1:8080", "127.0.0.1:8081"),
    );
    for (s, port) in [(&first, 8080), (&second, 8081), (&first, 8080)] {
        wait_for(s, Duration::from_secs(10), "a ready worker", |st| {
            !worker_pids(st, "api").is_empty()
        });
        let a: SocketAddr = ([127, 0, 0, 1], port).into();
        ns.enter(|| {
            for _ in 0..10 {
                let r = exchange(a, &get_request("/x")).expect("plain client");
                assert_eq!(r.status, 200, "port {port}");
            }
        });
    }
    for (s, n) in [(&first, 20), (&second, 10)] {
        let st = s.status();
        assert_eq!(pool(&st, "api")["steered_kernel"], n, "{st}");
        assert_eq!(
            st["dispatcher"]["accepted"], 0,
            "went through the dispatcher: {st}"
        );
    }
}
