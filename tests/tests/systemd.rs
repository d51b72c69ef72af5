//! Running under systemd: a `Type=notify` unit learns from sluice when it serves, reloads and
//! stops, over the notify socket systemd names in `NOTIFY_SOCKET`, as systemd itself reads it.

use std::{os::unix::net::UnixDatagram, time::Duration};

use sluice_tests::*;

fn next(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification within 30 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn a_notify_unit_hears_ready_reloading_and_stopping() {
    let ns = Netns::new("notify");
    let path = std::env::temp_dir().join(format!("sluice-notify-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let socket = UnixDatagram::bind(&path).expect("notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let notify = path.display().to_string();
    let mut s = Sluice::start_env(
        &ns,
        &one_pool("\"{hello}\"", "start = \"always\""),
        &[("NOTIFY_SOCKET", notify.as_str())],
    );
    let ready = next(&socket);
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    assert!(
        ready.contains("STATUS=serving 127.0.0.1:8080 with 1 pool(s)"),
        "{ready}"
    );
    // Ready means serving: a request is answered at once.
    assert_eq!(get_in(&ns, "/x").pool(), Some("api"));

    sluice_admin(&s, &["reload"]);
    let reloading = next(&socket);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert!(next(&socket).starts_with("READY=1\n"));

    s.stop();
    let stopping = next(&socket);
    assert!(stopping.starts_with("STOPPING=1\n"), "{stopping}");
    let _ = std::fs::remove_file(&path);
}
