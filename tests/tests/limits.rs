//! Slow and oversized clients: limits and timeouts hold, and normal requests keep being
//! served while they last.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use sluice_tests::*;

fn template(steering: &str) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "{steering}"
set_sysctls = true
admin_socket = "{{admin}}"

[limits]
header_timeout = "3s"
max_pending = 300

[[pool]]
name = "api"
command = ["{{hello}}"]
threads = 1
start = "always"

[[route]]
prefix = "/"
pool = "api"
"#
    )
}

/// 500 connections that send a request line and then one header byte a second.
fn slowloris(steering: &str) {
    let ns = Netns::new("slow");
    let s = Sluice::start(&ns, &template(steering));
    let addr: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
    let (slow_closed, worst) = ns.enter(|| {
        let mut slow: Vec<TcpStream> = (0..500)
            .map(|i| {
                let mut c = TcpStream::connect(addr).expect("connect");
                c.write_all(format!("GET /slow/{i} HTTP/1.1\r\nHost: t\r\nX-Slow: ").as_bytes())
                    .expect("send");
                c.set_read_timeout(Some(Duration::from_millis(1)))
                    .expect("timeout");
                c
            })
            .collect();
        let started = Instant::now();
        let mut worst = Duration::ZERO;
        let mut open = vec![true; slow.len()];
        // Trickle for longer than the header timeout while normal clients come and go.
        while started.elapsed() < Duration::from_secs(6) {
            for (c, o) in slow.iter_mut().zip(open.iter_mut()).filter(|(_, o)| **o) {
                let mut b = [0u8; 256];
                match c.read(&mut b) {
                    Ok(_) => *o = false,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if c.write_all(b"a").is_err() {
                            *o = false;
                        }
                    }
                    Err(_) => *o = false,
                }
            }
            for _ in 0..5 {
                let t = Instant::now();
                let r = exchange(addr, &get_request("/normal"))
                    .expect("a normal request while slow clients wait");
                assert_eq!(r.status, 200);
                worst = worst.max(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        (open.iter().filter(|o| !**o).count(), worst)
    });
    eprintln!(
        "{steering}: {slow_closed}/500 slow connections closed; slowest normal request {worst:?}"
    );
    assert_eq!(
        slow_closed, 500,
        "slow connections outlived the 3 s header timeout"
    );
    assert!(
        worst < Duration::from_secs(1),
        "a normal request waited {worst:?} behind slow clients"
    );
    let st = s.status();
    assert_eq!(pool(&st, "api")["state"], "running", "{st}");
}

#[test]
fn slowloris_through_the_dispatcher_is_cut_at_the_header_timeout() {
    slowloris("syn");
}

#[test]
fn slowloris_steered_to_workers_is_cut_at_the_header_timeout() {
    slowloris("first-segment");
}

fn sized(steering: &str) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "{steering}"
set_sysctls = true
admin_socket = "{{admin}}"
metrics = "127.0.0.1:9090"

[limits]
max_request_head = 65536
max_request_body = 1000

[[pool]]
name = "api"
command = ["{{echo}}"]
threads = 1
start = "always"

[[route]]
prefix = "/"
pool = "api"
"#
    )
}

#[test]
fn a_body_over_max_request_body_is_413_and_a_head_of_the_largest_size_reaches_its_worker() {
    for steering in ["first-segment", "syn"] {
        let ns = Netns::new("sized");
        let s = Sluice::start(&ns, &sized(steering));
        let addr: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        ns.enter(|| {
            let big = format!(
                "POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2000\r\n\r\n{}",
                "b".repeat(2000)
            );
            let r = exchange(addr, big.as_bytes()).expect("answer");
            assert_eq!(r.status, 413, "{steering}");
            let ok = format!(
                "POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n{}",
                "b".repeat(1000)
            );
            let r = exchange(addr, ok.as_bytes()).expect("answer");
            assert_eq!((r.status, r.body.len()), (200, 1000), "{steering}");
            // 60 KB of headers: within max_request_head, through the dispatcher's handoff
            // (syn) or straight to the worker (first-segment).
            let head = format!(
                "GET /x HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
                "h".repeat(60_000)
            );
            let r = exchange(addr, head.as_bytes()).expect("answer");
            assert_eq!((r.status, r.pool()), (200, Some("api")), "{steering}");
        });
        assert_eq!(s.log_text().matches("dropped a handoff").count(), 0);
    }
}

#[test]
fn an_idle_connection_to_the_metrics_endpoint_delays_no_scrape() {
    let ns = Netns::new("metrics");
    let _s = Sluice::start(&ns, &sized("syn"));
    let metrics: SocketAddr = "127.0.0.1:9090".parse().expect("addr");
    ns.enter(|| {
        let _idle = TcpStream::connect(metrics).expect("idle connection");
        let start = Instant::now();
        let r = exchange(metrics, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").expect("scrape");
        assert_eq!(r.status, 200);
        assert!(
            String::from_utf8_lossy(&r.body).contains("sluice_"),
            "{r:?}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        let r = exchange(metrics, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").expect("404");
        assert_eq!(r.status, 404);
    });
}
