//! `sluice upgrade` with HTTPS: the TLS listeners and what the TLS thread holds carry over.
//! Open sessions go on with their keys and sequence numbers, connections whose handshake
//! has not begun start it in the next program, and a handshake under way is waited for.

use std::{
    io::Write,
    net::TcpStream,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use sluice_tests::{certs::*, upgrading::*, *};

/// `two_pools` over TLS too, with a static cache entry /cached (answered by the TLS thread
/// itself, so its keep-alive connections stay there).
fn config(certs: &Certs) -> String {
    let cached = certs.dir.join("cached.txt");
    std::fs::write(&cached, "cached over tls\n").unwrap();
    format!(
        "{}\n[[cache.static]]\npath = \"/cached\"\nfile = \"{}\"\ncontent_type = \"text/plain\"\n",
        certs.two_pools("first-segment"),
        cached.display()
    )
}

fn start(tag: &str) -> (Netns, Sluice, Certs, std::path::PathBuf) {
    let ns = Netns::new(tag);
    let certs = Certs::make(&temp_dir(tag));
    let bin = binary_copy(tag);
    let s = Sluice::start_program(&ns, &config(&certs), &bin);
    wait_for(&s, Duration::from_secs(10), "ready workers", |st| {
        worker_pids(st, "api").len() == 2 && worker_pids(st, "web").len() == 1
    });
    (ns, s, certs, bin)
}

fn tls(st: &serde_json::Value, what: &str) -> u64 {
    st["tls"][what].as_u64().unwrap_or(0)
}

fn ask(stream: &mut TlsStream, path: &str) -> Response {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {SHOP}\r\n\r\n");
    stream.write_all(req.as_bytes()).expect("request");
    stream.flush().expect("flush");
    read_response(stream).expect("response")
}

fn tcp(ns: &Netns) -> TcpStream {
    ns.enter(|| {
        let c = TcpStream::connect("127.0.0.1:8443").expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        c
    })
}

fn client(config: &Arc<rustls::ClientConfig>) -> rustls::ClientConnection {
    let name = rustls::pki_types::ServerName::try_from(SHOP).unwrap();
    rustls::ClientConnection::new(config.clone(), name).expect("client")
}

/// What the client has to send now.
fn output(c: &mut rustls::ClientConnection) -> Vec<u8> {
    let mut out = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut out).expect("write_tls");
    }
    out
}

/// Runs `sluice upgrade`, and `meanwhile` as soon as the front end has begun to hand over.
fn upgrade_and_meanwhile(s: &Sluice, meanwhile: impl FnOnce()) -> std::process::Output {
    std::thread::scope(|scope| {
        let up = scope.spawn(|| upgrade(s));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !s.log_text().contains("upgrading: handing over") {
            assert!(Instant::now() < deadline, "{}", s.log_text());
            std::thread::sleep(Duration::from_millis(5));
        }
        meanwhile();
        up.join().expect("upgrade")
    })
}

fn cleanup(bin: &Path, certs: &Certs) {
    let _ = std::fs::remove_dir_all(bin.parent().unwrap_or(Path::new("/nonexistent")));
    let _ = std::fs::remove_dir_all(&certs.dir);
}

#[test]
fn https_traffic_runs_through_two_upgrades_with_no_error_and_the_same_workers() {
    let (ns, s, certs, bin) = start("uptls-wrk");
    let pids = |s: &Sluice| {
        let st = s.status();
        let mut w: Vec<i32> = ["api", "web"]
            .iter()
            .flat_map(|p| worker_pids(&st, p))
            .collect();
        w.sort_unstable();
        w
    };
    let before = pids(&s);
    let pid = s.pid();
    let run = |args: &[&str], url: &str| {
        let mut a = vec!["-t1", "-d8s", "--timeout", "10s"];
        a.extend(args);
        a.push(url);
        wrk(&ns, &a)
    };
    let results = std::thread::scope(|scope| {
        // Handed to the api workers with their keys: the workers hold them.
        let workers = scope.spawn(|| run(&["-c8"], "https://127.0.0.1:8443/api/x"));
        // A handshake per request: the TLS listener and the handshakes under way.
        let close = scope.spawn(|| {
            run(
                &["-c4", "-H", "Connection: close"],
                "https://127.0.0.1:8443/web",
            )
        });
        // Answered from the cache by the TLS thread: these sessions stay in it.
        let cached = scope.spawn(|| run(&["-c4"], "https://127.0.0.1:8443/cached"));
        for round in 1..=2 {
            std::thread::sleep(Duration::from_millis(1500));
            install(&bin, Ok(&sluice_bin()));
            let st0 = s.status();
            let out = upgrade(&s);
            assert!(out.status.success(), "upgrade {round}: {}", text(&out));
            assert!(runs_current_file(pid, &bin), "the new file runs");
            let st1 = s.status();
            for what in ["accepted", "handshakes", "handed_off", "cache_answers"] {
                assert!(
                    tls(&st1, what) >= tls(&st0, what),
                    "tls.{what} went back: {st0}\n{st1}"
                );
            }
        }
        [
            ("workers", workers.join().expect("wrk")),
            ("close", close.join().expect("wrk")),
            ("cached", cached.join().expect("wrk")),
        ]
    });
    for (what, r) in &results {
        assert!(r.requests > 0, "{what}: {}", r.output);
        assert_eq!(r.socket_errors, 0, "{what}: {}\n{}", r.output, s.log_text());
        assert_eq!(r.non_2xx, 0, "{what}: {}", r.output);
    }
    // Each upgrade carried at least the four keep-alive sessions of the cache's clients.
    let log = s.log_text();
    let carried: Vec<u64> = log
        .split("TLS: took up ")
        .skip(1)
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .collect();
    assert!(
        carried.len() == 2 && carried.iter().all(|&n| n >= 4),
        "{carried:?}\n{log}"
    );
    assert_eq!(s.pid(), pid);
    assert_eq!(pids(&s), before, "workers adopted, not restarted");
    assert_eq!(s.status()["upgrades"], 2);
    cleanup(&bin, &certs);
}

#[test]
fn tls_connections_in_every_state_are_served_after_an_upgrade() {
    let (ns, s, certs, bin) = start("uptls-states");
    let config = client_config(&certs, None);
    let connect = || {
        let conn = client(&config);
        rustls::StreamOwned::new(conn, tcp(&ns))
    };
    // Open sessions, idle in the TLS thread after a cache answer: one with nothing more,
    // one with half of its next request head.
    let mut idle = connect();
    assert_eq!(ask(&mut idle, "/cached").body, b"cached over tls\n");
    let mut half = connect();
    assert_eq!(ask(&mut half, "/cached").status, 200);
    half.write_all(b"GET /api/half HTTP/1.1\r\nHo").unwrap();
    half.flush().unwrap();
    // Connections that sent nothing (in first-segment steering the server side has none
    // yet: the ack gate holds them until their first data), and ones that sent part of
    // their ClientHello (the TLS thread holds them).
    let silent: Vec<TcpStream> = (0..5).map(|_| tcp(&ns)).collect();
    let mut partial: Vec<(rustls::ClientConnection, TcpStream, Vec<u8>)> = (0..3)
        .map(|_| {
            let mut c = client(&config);
            let hello = output(&mut c);
            let mut t = tcp(&ns);
            t.write_all(&hello[..40]).unwrap();
            (c, t, hello[40..].to_vec())
        })
        .collect();
    // A handshake under way: the server's flight is read, the client's Finished is sent
    // only once the upgrade has begun.
    let mut midway = client(&config);
    let mut midway_tcp = tcp(&ns);
    midway_tcp.write_all(&output(&mut midway)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !midway.wants_write() {
        assert!(Instant::now() < deadline, "no server flight");
        midway.read_tls(&mut midway_tcp).expect("server flight");
        midway.process_new_packets().expect("server flight");
    }
    std::thread::sleep(Duration::from_millis(300));
    install(&bin, Ok(&sluice_bin()));
    let before = s.status();
    let finished = output(&mut midway);
    let out = upgrade_and_meanwhile(&s, || midway_tcp.write_all(&finished).unwrap());
    assert!(out.status.success(), "{}", text(&out));
    let log = s.log_text();
    assert!(
        log.contains("TLS: took up 3 session(s) and 3 connection(s) before their handshake"),
        "{log}"
    );
    assert!(!log.contains("TLS connection(s) cut"), "{log}");

    let mut midway = rustls::StreamOwned::new(midway, midway_tcp);
    let r = ask(&mut midway, "/api/midway");
    assert_eq!((r.status, r.pool()), (200, Some("api")), "midway");
    half.write_all(format!("st: {SHOP}\r\n\r\n").as_bytes())
        .unwrap();
    half.flush().unwrap();
    let r = read_response(&mut half).expect("the rest of the half head");
    assert_eq!((r.status, r.pool()), (200, Some("api")), "half");
    assert_eq!(ask(&mut idle, "/cached").body, b"cached over tls\n");
    let r = ask(&mut idle, "/web/after");
    assert_eq!((r.status, r.pool()), (200, Some("web")), "idle");
    for (i, t) in silent.into_iter().enumerate() {
        let mut stream = rustls::StreamOwned::new(client(&config), t);
        let r = ask(&mut stream, "/api/silent");
        assert_eq!((r.status, r.pool()), (200, Some("api")), "silent {i}");
    }
    for (i, (c, mut t, rest)) in partial.drain(..).enumerate() {
        t.write_all(&rest).unwrap();
        let mut stream = rustls::StreamOwned::new(c, t);
        let r = ask(&mut stream, "/web/partial");
        assert_eq!((r.status, r.pool()), (200, Some("web")), "partial {i}");
    }
    let after = s.status();
    // The figures go on from the earlier program's: the new one accepted the five silent
    // connections, and the nine handshakes since were made by both programs (the one under
    // way by the earlier, the rest by the new one).
    assert_eq!(tls(&after, "accepted"), tls(&before, "accepted") + 5);
    assert_eq!(tls(&after, "handshakes"), tls(&before, "handshakes") + 9);
    assert_eq!(
        tls(&after, "cache_answers"),
        tls(&before, "cache_answers") + 1
    );
    assert_eq!(
        tls(&after, "handshake_failures"),
        tls(&before, "handshake_failures")
    );
    cleanup(&bin, &certs);
}

const NODE: &str = "node.example.test";

/// While the hand-over waits for a handshake under way (here one that never ends, so the
/// wait lasts its 2 s), a carried session that sends a request is not read: the request is
/// served by the next program, and the connection goes on. Read by the old program, the
/// request would join the connection to the socket pool's relay, which cannot be carried:
/// the connection would be cut at the exec.
#[test]
fn a_request_sent_during_the_hand_over_wait_is_served_by_the_next_program() {
    let ns = Netns::new("uptls-wait");
    let certs = Certs::make(&temp_dir("uptls-wait"));
    let bin = binary_copy("uptls-wait");
    // A site of its own: a socket pool answers every request of its connections.
    let node = "\n[[pool]]\nname = \"node\"\nworker = \"socket\"\ncommand = [\"node\", \"node_app.js\"]\ncwd = \"{workers}\"\nstart = \"always\"\n\n[[route]]\nhost = \"node.example.test\"\nprefix = \"/\"\npool = \"node\"\n";
    let template = format!("{}{node}", config(&certs));
    let s = Sluice::start_program(&ns, &template, &bin);
    let config = client_config(&certs, None);
    let node = || {
        let name = rustls::pki_types::ServerName::try_from(NODE).unwrap();
        rustls::ClientConnection::new(config.clone(), name).expect("client")
    };
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: {NODE}\r\n\r\n");
    // Node.js answers chunked.
    let body = |r: &Response| String::from_utf8_lossy(&r.body).into_owned();
    let mut joined = rustls::StreamOwned::new(node(), tcp(&ns));
    joined.write_all(get("/node/before").as_bytes()).unwrap();
    let r = read_response(&mut joined).expect("before");
    assert!(body(&r).contains("node /node/before "), "{}", s.log_text());
    // Answered from the cache so far: a session the TLS thread holds, between requests.
    let mut session = rustls::StreamOwned::new(node(), tcp(&ns));
    session.write_all(get("/cached").as_bytes()).unwrap();
    let r = read_response(&mut session).expect("cached");
    assert_eq!(r.body, b"cached over tls\n");
    // A handshake that stops after the server's flight.
    let mut stalled = node();
    let mut stalled_tcp = tcp(&ns);
    stalled_tcp.write_all(&output(&mut stalled)).unwrap();
    while !stalled.wants_write() {
        stalled.read_tls(&mut stalled_tcp).expect("server flight");
        stalled.process_new_packets().expect("server flight");
    }
    install(&bin, Ok(&sluice_bin()));
    let out = upgrade_and_meanwhile(&s, || {
        std::thread::sleep(Duration::from_millis(200));
        session.write_all(get("/node/during").as_bytes()).unwrap();
        session.flush().unwrap();
    });
    assert!(out.status.success(), "{}", text(&out));
    let r = read_response(&mut session)
        .unwrap_or_else(|e| panic!("the request sent during the wait: {e}\n{}", s.log_text()));
    assert!(body(&r).contains("node /node/during "), "{}", body(&r));
    session.write_all(get("/node/after").as_bytes()).unwrap();
    let r = read_response(&mut session)
        .unwrap_or_else(|e| panic!("the same connection after: {e}\n{}", s.log_text()));
    assert!(body(&r).contains("node /node/after "), "{}", body(&r));
    // Cut: the stalled handshake and the connection already joined to the socket pool.
    let log = s.log_text();
    assert!(log.contains("upgrading: 2 TLS connection(s) cut"), "{log}");
    assert!(log.contains("TLS: took up 1 session(s)"), "{log}");
    drop((stalled_tcp, joined));
    cleanup(&bin, &certs);
}

/// A new program that cannot start goes back to the earlier one with the same state: the
/// TLS sessions it carried are taken up again by the earlier program and go on.
#[test]
fn tls_sessions_go_on_when_an_upgrade_goes_back_to_the_earlier_program() {
    let (ns, s, certs, bin) = start("uptls-back");
    let config = client_config(&certs, None);
    let mut session = rustls::StreamOwned::new(client(&config), tcp(&ns));
    assert_eq!(ask(&mut session, "/cached").status, 200);
    install_unstartable(&bin);
    assert_went_back(&upgrade(&s));
    let log = s.log_text();
    assert!(log.contains("TLS: took up 1 session(s)"), "{log}");
    let r = ask(&mut session, "/api/back");
    assert_eq!((r.status, r.pool()), (200, Some("api")));
    assert_eq!(ask(&mut session, "/cached").body, b"cached over tls\n");
    assert_eq!(s.status()["upgrades"], 0);
    cleanup(&bin, &certs);
}
