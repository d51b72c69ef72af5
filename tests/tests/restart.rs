//! What a front end that dies leaves behind, a restart takes over or undoes.

use std::time::Duration;

use sluice_tests::*;

#[test]
fn a_sysctl_a_killed_front_end_left_changed_is_restored_by_the_next_one() {
    let ns = Netns::new("killed");
    ns.sysctl("net.ipv4.tcp_syncookies", "1");
    let config = one_pool("\"{hello}\"", "start = \"always\"");
    let mut first = Sluice::start(&ns, &config);
    assert_eq!(ns.read_sysctl("net.ipv4.tcp_syncookies"), "2");
    // SAFETY: signalling the sluice process this test started.
    unsafe { libc::kill(first.pid() as i32, libc::SIGKILL) };
    // Killed by a signal: no exit code.
    assert_eq!(first.wait_exit(Duration::from_secs(10)), None);
    assert_eq!(
        ns.read_sysctl("net.ipv4.tcp_syncookies"),
        "2",
        "nothing ran to restore it"
    );
    // Its workers stop when their control channel closes; the next start waits for their
    // listeners to go.
    let mut second = Sluice::start(&ns, &config);
    assert_eq!(get_in(&ns, "/x").pool(), Some("api"));
    assert!(
        second.log_text().contains("did not exit cleanly"),
        "{}",
        second.log_text()
    );
    second.stop();
    assert_eq!(
        ns.read_sysctl("net.ipv4.tcp_syncookies"),
        "1",
        "the value before the first front end changed it"
    );
}

/// The ack gate is owned by the front end's process (a TCX link fd), so a kill -9 detaches
/// it: a server that speaks first, listening on the dead front end's port with syncookies
/// still on, accepts a client that sends nothing (a gate left behind would drop that client's
/// handshake ACK, and the server would never see the connection).
#[test]
fn a_killed_first_segment_front_end_leaves_no_ack_gate_behind() {
    use std::os::fd::AsRawFd;
    let ns = Netns::new("nogate");
    let mut s = Sluice::start(&ns, &one_pool("\"{hello}\"", "start = \"always\""));
    wait_for(&s, Duration::from_secs(10), "a worker", |st| {
        !worker_pids(st, "api").is_empty()
    });
    // SAFETY: signalling the sluice process this test started.
    unsafe { libc::kill(s.pid() as i32, libc::SIGKILL) };
    assert_eq!(s.wait_exit(Duration::from_secs(10)), None);
    assert_eq!(ns.read_sysctl("net.ipv4.tcp_syncookies"), "2");
    let accepted = ns.enter(|| {
        // The workers (and with them the last pool sockets) go a moment after the front end.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match std::net::TcpListener::bind("127.0.0.1:8080") {
                Ok(l) => break l,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("binding the dead front end's port: {e}"),
            }
        };
        listener.set_nonblocking(true).expect("nonblocking");
        let _client = std::net::TcpStream::connect("127.0.0.1:8080").expect("connect");
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one live pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 3000) };
        n == 1 && listener.accept().is_ok()
    });
    assert!(
        accepted,
        "the handshake ACK was dropped: a gate outlived its front end"
    );
}
