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
