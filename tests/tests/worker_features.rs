//! What sluice-worker gives a handler beyond buffered requests and responses: file bodies
//! streamed in bounded chunks, the connection itself after a `101` (WebSocket), and the
//! client's address and how its connection arrived.

use std::{
    io::{BufWriter, Read, Write},
    net::TcpStream,
    time::Duration,
};

use sluice_tests::*;

fn sha256(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM")
}

#[test]
fn a_100_mb_download_arrives_intact_while_the_worker_stays_under_16_mib() {
    let dir = std::env::temp_dir().join(format!("sluice-big-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let big = dir.join("big.bin");
    {
        let mut w = BufWriter::new(std::fs::File::create(&big).expect("create"));
        let mut rng = Rng(0x5eed);
        let mut chunk = vec![0u8; 1 << 16];
        for _ in 0..(100 << 20) / chunk.len() {
            for b in chunk.chunks_mut(8) {
                b.copy_from_slice(&rng.next().to_le_bytes()[..b.len()]);
            }
            w.write_all(&chunk).expect("write");
        }
    }
    let ns = Netns::new("bigfile");
    let s = Sluice::start(
        &ns,
        &one_pool(
            &format!("\"{{files}}\", \"--root\", \"{}\"", dir.display()),
            "start = \"always\"",
        ),
    );
    let st = wait_for(&s, Duration::from_secs(20), "files ready", |st| {
        !worker_pids(st, "api").is_empty()
    });
    let pid = worker_pids(&st, "api")[0];
    let got = dir.join("got.bin");
    let out = ns
        .command("curl")
        .args(["-s", "-m", "120", "-o"])
        .arg(&got)
        .args([
            "-w",
            "%{http_code} %{size_download}",
            "http://127.0.0.1:8080/big.bin",
        ])
        .output()
        .expect("curl");
    let summary = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        summary,
        format!("200 {}", 100 << 20),
        "log:\n{}",
        s.log_text()
    );
    assert_eq!(sha256(&got), sha256(&big));
    let peak = peak_rss_kib(pid);
    assert!(peak < 16 * 1024, "the worker's peak RSS was {peak} KiB");
    // Two at once, and a HEAD: the length without the body.
    let head = ns
        .command("curl")
        .args(["-sI", "http://127.0.0.1:8080/big.bin"])
        .output()
        .expect("curl");
    let head = String::from_utf8_lossy(&head.stdout).to_ascii_lowercase();
    assert!(
        head.contains(&format!("content-length: {}", 100 << 20)),
        "{head}"
    );
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

fn websockets(steering: &str) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "{steering}"
set_sysctls = true
admin_socket = "{{admin}}"

[[pool]]
name = "ws"
command = ["{{websocket}}"]
threads = 1
start = "always"

[[pool]]
name = "uv"
worker = "socket"
command = ["{{apps}}/uvicorn", "--fd", "3", "--no-access-log", "asgi_app:app"]
cwd = "{{workers}}"
start = "always"
routing = "connection"

[[route]]
prefix = "/ws/"
pool = "ws"

[[route]]
prefix = "/uv/"
pool = "uv"
"#
    )
}

/// Sends 1,000 messages on one WebSocket and checks every echo; prints `ok N`.
const ECHO_CLIENT: &str = r#"
import sys
from websockets.sync.client import connect
with connect(sys.argv[1], open_timeout=20) as ws:
    n = 0
    for i in range(1000):
        msg = f"message {i} " + "x" * (i % 300)
        ws.send(msg)
        if ws.recv(timeout=20) != msg:
            sys.exit(f"echo {i} differs")
        n += 1
    ws.send(b"\x00\x01binary")
    if ws.recv(timeout=20) != b"\x00\x01binary":
        sys.exit("binary echo differs")
print("ok", n)
"#;

fn websocket_echo(steering: &str) {
    let ns = Netns::new("websocket");
    let s = Sluice::start(&ns, &websockets(steering));
    for path in ["/ws/", "/uv/echo"] {
        let out = ns
            .command(apps_bin().join("python"))
            .arg("-c")
            .arg(ECHO_CLIENT)
            .arg(format!("ws://127.0.0.1:8080{path}"))
            .output()
            .expect("python");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "ok 1000",
            "{steering} {path}: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            s.log_text()
        );
    }
    // The HTTP side still answers after the upgrades.
    assert_eq!(get_in(&ns, "/ws/plain").status, 426);
}

#[test]
fn a_websocket_echoes_1000_messages_through_a_sluice_worker_and_uvicorn_steered_by_first_segment() {
    websocket_echo("first-segment");
}

#[test]
fn a_websocket_echoes_1000_messages_through_a_sluice_worker_and_uvicorn_relayed_in_syn_mode() {
    websocket_echo("syn");
}

#[test]
fn the_handler_learns_the_clients_address_and_how_its_connection_came() {
    let ns = Netns::new("client");
    let s = Sluice::start(&ns, &one_pool("\"{echo}\"", "start = \"always\""));
    // A path the kernel steers, and one only the dispatcher routes (then hands over).
    for (path, arrival) in [("/plain", "kernel"), ("/a%20b", "dispatcher")] {
        let (me, response) = ns.enter(|| {
            let mut c = TcpStream::connect(v4()).expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(10))).ok();
            let me = c.local_addr().expect("local");
            c.write_all(&get_request(path)).expect("write");
            let mut raw = Vec::new();
            let _ = c.read_to_end(&mut raw);
            (me, parse_response(&raw).map(|(r, _)| r))
        });
        let r = response.unwrap_or_else(|| panic!("no answer to {path}; log:\n{}", s.log_text()));
        assert_eq!(r.header("x-sluice-client"), Some(me.to_string().as_str()));
        assert_eq!(r.header("x-sluice-arrival"), Some(arrival), "{path}");
    }
}

#[test]
fn a_200_mb_upload_streams_to_the_handler_while_the_worker_stays_under_16_mib() {
    let dir = std::env::temp_dir().join(format!("sluice-upload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let big = dir.join("upload.bin");
    let mut data = vec![0u8; 200 << 20];
    let mut rng = Rng(0xfeed);
    for b in data.chunks_mut(8) {
        b.copy_from_slice(&rng.next().to_le_bytes()[..b.len()]);
    }
    std::fs::write(&big, &data).expect("write");
    let want = format!("received {} bytes fnv {:016x}", data.len(), sha_like(&data));
    drop(data);
    let ns = Netns::new("upload");
    let s = Sluice::start(
        &ns,
        &format!(
            "{}\n[limits]\nmax_request_body = \"300MB\"\n",
            one_pool("\"{upload}\"", "start = \"always\"")
        ),
    );
    let st = wait_for(&s, Duration::from_secs(20), "upload ready", |st| {
        !worker_pids(st, "api").is_empty()
    });
    let pid = worker_pids(&st, "api")[0];
    for chunked in [false, true] {
        let mut curl = ns.command("curl");
        curl.args(["-s", "-m", "120", "--data-binary"])
            .arg(format!("@{}", big.display()));
        if chunked {
            curl.args(["-H", "Transfer-Encoding: chunked"]);
        }
        let out = curl
            .arg("http://127.0.0.1:8080/upload")
            .output()
            .expect("curl");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            want,
            "chunked={chunked}; log:\n{}",
            s.log_text()
        );
    }
    let peak = peak_rss_kib(pid);
    assert!(peak < 16 * 1024, "the worker's peak RSS was {peak} KiB");
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}
