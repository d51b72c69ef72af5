//! A stopping worker finishes what it is sending, up to its pool's `shutdown_time_limit`.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use sluice_tests::*;

#[test]
fn a_download_in_progress_finishes_across_a_recycle() {
    let ns = Netns::new("drain");
    let root = std::env::temp_dir().join(format!("sluice-drain-{}", std::process::id()));
    std::fs::create_dir_all(root.join("files")).expect("dir");
    let body: Vec<u8> = (0..24u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(root.join("files/big.bin"), &body).expect("file");
    let s = Sluice::start(
        &ns,
        &one_pool(
            &format!(
                "\"{{files}}\", \"--root\", \"{}\", \"--cache-control\", \"no-store\"",
                root.display()
            ),
            "start = \"always\"",
        ),
    );
    wait_for(&s, Duration::from_secs(10), "a worker", |st| {
        worker_pids(st, "api").len() == 1
    });
    let got = ns.enter(|| {
        let mut c = TcpStream::connect(v4()).expect("connect");
        c.write_all(b"GET /files/big.bin HTTP/1.1\r\nHost: t\r\n\r\n")
            .expect("send");
        c.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let start = Instant::now();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut recycled = false;
        // About 3 MB/s: the download outlasts the old 4.5 s cut by far.
        loop {
            if !recycled && start.elapsed() > Duration::from_secs(1) {
                sluice_admin(&s, &["pool", "recycle", "api"]);
                recycled = true;
            }
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            let due = Duration::from_secs_f64(got.len() as f64 / 3e6);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
            if got.len() > body.len() + 1024 {
                break;
            }
        }
        got
    });
    let end = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head")
        + 4;
    assert!(got.starts_with(b"HTTP/1.1 200 "));
    assert_eq!(got.len() - end, body.len(), "the download was cut");
    assert!(got[end..] == body[..], "the body arrived changed");
    assert!(s.log_text().contains("recycling"), "{}", s.log_text());
    let _ = std::fs::remove_dir_all(&root);
}
