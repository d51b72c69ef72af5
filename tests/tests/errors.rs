//! Bad input gets a clear answer and loses nothing: configs name the key and the reason,
//! malformed requests get their status code and the front end keeps serving.

use std::{net::SocketAddr, process::Command, time::Duration};

use sluice_tests::*;

fn check(text: &str) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("sluice-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("bad.toml");
    std::fs::write(&path, config(text, &dir.join("admin.sock"))).expect("write");
    let out = Command::new(sluice_bin())
        .arg("check")
        .arg(&path)
        .output()
        .expect("sluice check");
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn check_accepts_the_demo_config() {
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo.toml");
    let out = Command::new(sluice_bin())
        .arg("check")
        .arg(&demo)
        .output()
        .expect("sluice check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn malformed_configs_name_the_key_and_the_reason() {
    let cases: &[(&str, &[&str])] = &[
        (
            "[server]\nlisten = [\"127.0.0.1:80\"]\n[[pool]]\nname = \"a\"\ncommand = [\"{hello}\"]\n[[route]]\nprefix = \"/x/\"\npool = \"nope\"\n",
            &["route[0].pool", "no pool is named `nope`"],
        ),
        (
            "[server]\nlisten = [\"127.0.0.1:80\"]\n[[pool]]\nname = \"a\"\ncommand = [\"{hello}\"]\n[[route]]\nprefix = \"/x\"\npool = \"a\"\n[[route]]\nprefix = \"/x/\"\npool = \"a\"\n",
            &["route[1].prefix", "same prefix"],
        ),
        (
            "[server]\nlisten = [\"localhost:80\"]\n",
            &["server.listen[0]", "not an address"],
        ),
        (
            "[server]\nlisten = [\"127.0.0.1:80\"]\n[[pool]]\nname = \"a\"\ncommand = [\"./missing-worker\"]\n",
            &["pool[0].command", "not found"],
        ),
        (
            "[server]\nlisten = [\"127.0.0.1:80\"]\nsteering = \"tfo\"\n",
            &["steering", "first-segment"],
        ),
        (
            "[server]\nlisten = [\"127.0.0.1:80\"]\nbogus = 1\n",
            &["bogus"],
        ),
        (
            "[server]\nlisten = [\"127.0.0.1:80\"]\n[[pool]]\nname = \"a\"\ncommand = [\"{hello}\"]\nqueue_length = 0\n",
            &["pool[0].queue_length", "out of range"],
        ),
        (
            "[server]\nlisten = [\"127.0.0.1:80\"]\n[[pool]]\nname = \"a\"\ncommand = [\"{hello}\"]\n[[route]]\nprefix = \"/a/../b\"\npool = \"a\"\n",
            &["route[0].prefix", "canonical"],
        ),
        (
            "[server]\nlisten = [\"127.0.0.1:80\"]\nthreads = 0\n",
            &["server.threads", "from 1 to 1024"],
        ),
        ("not toml at all", &["sluice"]),
    ];
    for (text, wants) in cases {
        let (ok, out) = check(text);
        assert!(!ok, "accepted:\n{text}");
        for w in *wants {
            assert!(out.contains(w), "`{w}` missing from:\n{out}\nfor:\n{text}");
        }
    }
}

#[test]
fn first_segment_mode_refuses_to_start_without_syncookies_unless_allowed() {
    let ns = Netns::new("nosys");
    let t = "[server]\nlisten = [\"127.0.0.1:8080\"]\nsteering = \"first-segment\"\nadmin_socket = \"{admin}\"\n[[pool]]\nname = \"a\"\ncommand = [\"{hello}\"]\n[[route]]\nprefix = \"/\"\npool = \"a\"\n";
    let mut s = Sluice::spawn(&ns, t);
    let code = s.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(1), "log:\n{}", s.log_text());
    let log = s.log_text();
    assert!(
        log.contains("net.ipv4.tcp_syncookies") && log.contains("set_sysctls"),
        "{log}"
    );
    assert_eq!(
        ns.read_sysctl("net.ipv4.tcp_syncookies"),
        "1",
        "sluice changed a sysctl it was not allowed to"
    );
}

const SERVE: &str = r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "syn"
admin_socket = "{admin}"

[[pool]]
name = "api"
command = ["{hello}"]
threads = 1

[[route]]
prefix = "/api/"
pool = "api"
"#;

#[test]
fn malformed_requests_get_their_status_and_the_front_end_keeps_serving() {
    let ns = Netns::new("bad");
    let s = Sluice::start(&ns, SERVE);
    let addr: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
    let long_url = format!(
        "GET /api/{} HTTP/1.1\r\nHost: t\r\n\r\n",
        "a".repeat(20_000)
    );
    let big_head = format!(
        "GET /api/x HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "b".repeat(20_000)
    );
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (b"GARBAGE\r\n\r\n".to_vec(), 400),
        (b"GET /api/x HTTP/7.0\r\n\r\n".to_vec(), 505),
        (b"GET /api/%zz HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 400),
        (
            b"GET /../etc/passwd HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(),
            400,
        ),
        (b"GET /api/%00 HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 400),
        (
            b"GET /nothing/here HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(),
            400,
        ),
        (b"GET /api/x HTTP/1.1\r\nBad Header\r\n\r\n".to_vec(), 400),
        (long_url.into_bytes(), 414),
        (big_head.into_bytes(), 431),
    ];
    ns.enter(|| {
        for (req, code) in &cases {
            let r = exchange(addr, req).unwrap_or_else(|e| {
                panic!(
                    "{:?}: {e}",
                    String::from_utf8_lossy(&req[..req.len().min(60)])
                )
            });
            assert_eq!(
                r.status,
                *code,
                "{:?}",
                String::from_utf8_lossy(&req[..req.len().min(60)])
            );
            assert!(!r.body.is_empty(), "a refusal says why");
            let ok =
                exchange(addr, &get_request("/api/after")).expect("serving after a bad request");
            assert_eq!(ok.pool(), Some("api"));
        }
    });
    let st = s.status();
    assert_eq!(st["dispatcher"]["refused"]["400"], 6, "{st}");
    assert_eq!(st["dispatcher"]["refused"]["505"], 1, "{st}");
    assert_eq!(st["dispatcher"]["refused"]["414"], 1, "{st}");
    assert_eq!(st["dispatcher"]["refused"]["431"], 1, "{st}");
}

/// Without the privileges its kernel programs need, `sluice run` says which step was refused,
/// the OS's reason once, and what it needs.
#[test]
fn run_without_cap_bpf_names_the_step_the_reason_once_and_the_privileges() {
    let ns = Netns::new("nocap");
    let dir = std::env::temp_dir().join(format!("sluice-nocap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg = dir.join("sluice.toml");
    std::fs::write(&cfg, config(&two_pools("syn"), &dir.join("admin.sock"))).expect("write");
    let out = ns
        .command("setpriv")
        .args([
            "--bounding-set",
            "-bpf,-sys_admin,-perfmon",
            "--inh-caps",
            "-bpf,-sys_admin,-perfmon",
        ])
        .arg(sluice_bin())
        .arg("run")
        .arg(&cfg)
        .output()
        .expect("setpriv sluice run");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("sluice: loading the steering programs"),
        "{err}"
    );
    assert!(last.contains("Operation not permitted"), "{err}");
    assert!(last.contains("CAP_BPF"), "{err}");
    assert_eq!(last.matches("failed to create map").count(), 1, "{err}");
}

/// A refusal of a `HEAD` is a head alone, whoever reads the request (the dispatcher, a
/// worker of a pool that owns the host, the front end keeping a shared host's connection):
/// a client that reads it as a HEAD answer must not find its text where the next response
/// should start.
#[test]
fn a_refused_head_request_gets_no_body_from_any_reader() {
    const TWO_LENGTHS: &[u8] =
        b"HEAD /api/x HTTP/1.1\r\nHost: HOST\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
    let config = r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "first-segment"
set_sysctls = true
admin_socket = "{admin}"

[[pool]]
name = "own"
command = ["{hello}"]
threads = 1
start = "always"

[[pool]]
name = "web"
command = ["{hello}"]
threads = 1
start = "always"

[[route]]
host = "own.test"
prefix = "/"
pool = "own"

[[route]]
prefix = "/api/"
pool = "own"

[[route]]
prefix = "/"
pool = "web"
"#;
    let ns = Netns::new("headrefuse");
    let s = Sluice::start(&ns, config);
    wait_for(&s, Duration::from_secs(10), "workers", |st| {
        !worker_pids(st, "own").is_empty() && !worker_pids(st, "web").is_empty()
    });
    let addr: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
    // own.test: steered in the kernel to its worker, which refuses it; shared.test: the
    // kernel sends it to the dispatcher (a shared host), which refuses it.
    for (host, reader) in [
        ("own.test", "the worker"),
        ("shared.test", "the dispatcher"),
    ] {
        let raw = with_host(TWO_LENGTHS, host);
        let all = ns.enter(|| {
            use std::io::{Read, Write};
            let mut c = std::net::TcpStream::connect(addr).expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.write_all(&raw).expect("send");
            let mut out = Vec::new();
            let _ = c.read_to_end(&mut out);
            out
        });
        let text = String::from_utf8_lossy(&all);
        assert!(text.starts_with("HTTP/1.1 400 "), "{reader}: {text}");
        assert!(
            text.ends_with("\r\n\r\n"),
            "{reader} sent a body after the head: {text:?}"
        );
    }
    // A shared host's next request on a kept connection: the delivery thread refuses it.
    let all = ns.enter(|| {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"GET /x HTTP/1.1\r\nHost: shared.test\r\n\r\n")
            .expect("send");
        let first = read_response(&mut c).expect("first answer");
        assert_eq!(first.pool(), Some("web"));
        c.write_all(&with_host(TWO_LENGTHS, "shared.test"))
            .expect("send");
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        out
    });
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 400 "), "delivery: {text}");
    assert!(
        text.ends_with("\r\n\r\n"),
        "delivery sent a body after the head: {text:?}"
    );
    assert!(s.status()["delivery"]["refused"].as_u64().unwrap_or(0) >= 1);
}

fn with_host(raw: &[u8], host: &str) -> Vec<u8> {
    String::from_utf8_lossy(raw)
        .replace("HOST", host)
        .into_bytes()
}
