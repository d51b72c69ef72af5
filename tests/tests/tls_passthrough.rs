//! `tls = "passthrough"`: a pool whose own server ends TLS (gunicorn with its own
//! certificate, on its inherited sockets) gets the connections whose ClientHello names its
//! host, untouched. The kernel program reads the SNI name from the first segment; what it
//! cannot read there goes to the front end's TLS thread, which reads the whole ClientHello
//! and relays the connection. And `redirect_https`: plain requests get 308 to https.

use std::time::Duration;

use sluice_tests::{certs::*, *};

/// Pool `own` (gunicorn with own.test's certificate and key, passthrough) and `api` (a
/// hello worker behind the front end's own TLS, for shop.example.test).
fn template(certs: &Certs, steering: &str, extra_server: &str, own_extra: &str) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:8080"]
listen_tls = ["127.0.0.1:8443"]
steering = "{steering}"
set_sysctls = true
admin_socket = "{{admin}}"
{extra_server}

{shop}
[[pool]]
name = "own"
worker = "socket"
tls = "passthrough"
command = ["{{apps}}/gunicorn", "--workers", "1", "--no-control-socket",
           "--certfile", "{own_cert}", "--keyfile", "{own_key}", "wsgi_app:app"]
cwd = "{{workers}}"
{own_extra}

[[pool]]
name = "api"
command = ["{{hello}}"]
threads = 1

[[route]]
host = "own.test"
prefix = "/"
pool = "own"

[[route]]
prefix = "/"
pool = "api"
"#,
        shop = certs.shop_table(),
        own_cert = certs.cert("own").display(),
        own_key = certs.key("own").display(),
    )
}

fn start(tag: &str, steering: &str, extra_server: &str, own_extra: &str) -> (Netns, Sluice, Certs) {
    let (ns, certs) = setup(tag);
    let s = Sluice::start(&ns, &template(&certs, steering, extra_server, own_extra));
    (ns, s, certs)
}

fn setup(tag: &str) -> (Netns, Certs) {
    let ns = Netns::new(tag);
    let certs = Certs::make(&temp_dir(tag));
    // The pool's server runs as the pool's own user: its key is for it to read.
    use std::os::unix::fs::PermissionsExt;
    for f in [certs.cert("own"), certs.key("own")] {
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    (ns, certs)
}

/// A TLS GET from python's ssl, driven through memory BIOs so the test decides how the
/// ClientHello is cut into segments: its first `split` bytes, a pause, then the rest (0:
/// all at once). Prints the peer certificate's common name, then the answer.
fn python_get(
    ns: &Netns,
    s: &Sluice,
    certs: &Certs,
    sni: &str,
    path: &str,
    split: usize,
) -> String {
    let script = format!(
        r#"
import socket, ssl, sys, time
ctx = ssl.create_default_context(cafile="{ca}")
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(inc, out, server_hostname="{sni}")
s = socket.create_connection(("127.0.0.1", 8443), timeout=20)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def flush():
    data = out.read()
    if data:
        s.sendall(data)
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = out.read()
split = {split}
if split:
    s.sendall(hello[:split])
    time.sleep(0.3)
    s.sendall(hello[split:])
else:
    s.sendall(hello)
while True:
    try:
        tls.do_handshake()
        flush()
        break
    except ssl.SSLWantReadError:
        flush()
        d = s.recv(65536)
        if not d:
            sys.exit("closed during the handshake")
        inc.write(d)
tls.write(b"GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n")
flush()
answer = b""
while True:
    try:
        chunk = tls.read(65536)
        if not chunk:
            break
        answer += chunk
    except ssl.SSLWantReadError:
        d = s.recv(65536)
        if not d:
            break
        inc.write(d)
    except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
        break
cn = dict(x[0] for x in tls.getpeercert()["subject"])["commonName"]
print("cn=" + cn)
print(answer.decode())
"#,
        ca = certs.ca().display(),
    );
    ns.python(&script)
        .unwrap_or_else(|e| panic!("python: {e}\n{}", s.log_text()))
}

/// curl for https://own.test:8443`path` (the passthrough pool's name), trusting the test CA.
fn curl_own(ns: &Netns, certs: &Certs, path: &str, max_time: &str) -> std::process::Command {
    let mut c = ns.command("curl");
    c.args(["-sS", "--max-time", max_time, "--cacert"])
        .arg(certs.ca())
        .args(["--resolve", "own.test:8443:127.0.0.1"])
        .arg(format!("https://own.test:8443{path}"));
    c
}

fn fallback(st: &serde_json::Value, reason: &str) -> u64 {
    st["fallbacks"][reason].as_u64().unwrap_or(0)
}

fn wait_ready(s: &Sluice) {
    wait_for(s, Duration::from_secs(30), "gunicorn ready", |st| {
        pool(st, "own")["workers"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w["ready"] == true))
    });
}

#[test]
fn a_passthrough_hosts_connections_are_steered_in_the_kernel_to_its_own_tls_server() {
    let (ns, s, certs) = start("pt-kernel", "first-segment", "", "");
    // Started on demand by its first connection: the first one waits in its queue.
    let got = python_get(&ns, &s, &certs, "own.test", "/x", 0);
    assert!(got.starts_with("cn=own.test\n"), "{got}\n{}", s.log_text());
    assert!(
        got.contains("200 OK") && got.contains("gunicorn /x "),
        "{got}"
    );
    wait_ready(&s);
    for path in ["/a", "/b"] {
        let got = python_get(&ns, &s, &certs, "own.test", path, 0);
        assert!(got.contains(&format!("gunicorn {path} ")), "{got}");
    }
    // The front end's own TLS still serves the other names on the same listener.
    let got = python_get(&ns, &s, &certs, SHOP, "/y", 0);
    assert!(got.starts_with("cn=shop.example.test\n"), "{got}");
    assert!(got.contains("pool api"), "{got}");
    let st = s.status();
    assert_eq!(pool(&st, "own")["steered_kernel"], 3, "{st}");
    assert_eq!(st["tls"]["passed_through"], 0, "{st}");
    assert_eq!(st["tls"]["handshakes"], 1, "only shop's: {st}");
    assert!(st["kernel"]["tls_terminated"].as_u64() >= Some(1), "{st}");
}

#[test]
fn a_passthrough_pool_keeps_its_server_and_its_kernel_steering_through_an_upgrade() {
    let (ns, certs) = setup("pt-upgrade");
    let bin = upgrading::binary_copy("pt-upgrade");
    let s = Sluice::start_program(&ns, &template(&certs, "first-segment", "", ""), &bin);
    let got = python_get(&ns, &s, &certs, "own.test", "/before", 0);
    assert!(got.contains("gunicorn /before "), "{got}\n{}", s.log_text());
    wait_ready(&s);
    let server = worker_pids(&s.status(), "own");
    upgrading::install(&bin, Ok(&sluice_bin()));
    let out = upgrading::upgrade(&s);
    assert!(out.status.success(), "{}", upgrading::text(&out));
    // The new program's kernel program steers by SNI into the same sockets.
    for path in ["/after1", "/after2"] {
        let got = python_get(&ns, &s, &certs, "own.test", path, 0);
        assert!(got.starts_with("cn=own.test\n"), "{got}\n{}", s.log_text());
        assert!(got.contains(&format!("gunicorn {path} ")), "{got}");
    }
    let got = python_get(&ns, &s, &certs, SHOP, "/y", 0);
    assert!(got.contains("pool api"), "{got}");
    let st = s.status();
    assert_eq!(worker_pids(&st, "own"), server, "gunicorn adopted: {st}");
    assert_eq!(pool(&st, "own")["steered_kernel"], 3, "{st}");
    assert_eq!(st["tls"]["passed_through"], 0, "{st}");
    let _ = std::fs::remove_dir_all(bin.parent().unwrap_or(std::path::Path::new("/nonexistent")));
}

#[test]
fn a_clienthello_cut_before_its_name_is_read_by_the_front_end_and_relayed_untouched() {
    let (ns, s, certs) = start("pt-cut", "first-segment", "", "");
    // 60 bytes: the record and handshake headers, not the session id's end.
    let got = python_get(&ns, &s, &certs, "own.test", "/cut", 60);
    assert!(got.starts_with("cn=own.test\n"), "{got}\n{}", s.log_text());
    assert!(got.contains("gunicorn /cut "), "{got}");
    // A name the front end serves, cut the same way, gets the front end's handshake.
    let got = python_get(&ns, &s, &certs, SHOP, "/cut", 60);
    assert!(got.contains("pool api"), "{got}");
    let st = s.status();
    assert_eq!(fallback(&st, "hello_incomplete"), 2, "{st}");
    assert_eq!(st["tls"]["passed_through"], 1, "{st}");
    assert_eq!(pool(&st, "own")["steered_kernel"], 0, "{st}");
}

#[test]
fn in_syn_mode_the_front_end_reads_every_clienthello_and_relays_a_passthrough_one() {
    let (ns, s, certs) = start("pt-syn", "syn", "", "");
    for path in ["/s1", "/s2"] {
        let got = python_get(&ns, &s, &certs, "own.test", path, 0);
        assert!(got.starts_with("cn=own.test\n"), "{got}\n{}", s.log_text());
        assert!(got.contains(&format!("gunicorn {path} ")), "{got}");
    }
    let st = s.status();
    assert_eq!(st["tls"]["passed_through"], 2, "{st}");
    assert!(fallback(&st, "no_payload") >= 2, "{st}");
    let text = sluice_admin(&s, &["status"]);
    assert!(
        text.contains("tls (127.0.0.1:8443): accepted=2 ") && text.contains(" passed_through=2 "),
        "{text}"
    );
}

#[test]
fn a_passthrough_pool_that_is_stopped_gets_its_clients_a_tls_alert_not_a_hang() {
    let (ns, mut s, certs) = start(
        "pt-stop",
        "syn",
        "",
        "start = \"always\"\nrapid_fail = { failures = 1, interval = \"1m\" }",
    );
    wait_ready(&s);
    let got = python_get(&ns, &s, &certs, "own.test", "/first", 0);
    assert!(got.contains("gunicorn /first "), "{got}");
    // One failure stops the pool (rapid-fail protection).
    let pid = worker_pids(&s.status(), "own")[0];
    // SAFETY: kill(2) of the worker this test's front end started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let st = wait_for(&s, Duration::from_secs(10), "own stopped", |st| {
        pool(st, "own")["state"] == "stopped"
    });
    let started = std::time::Instant::now();
    let out = curl_own(&ns, &certs, "/", "10").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{st}");
    assert!(err.contains("alert internal error"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "{err}");
    assert_eq!(s.status()["tls"]["passthrough_refused"], 1);
    s.stop();
}

#[test]
fn redirect_https_answers_plain_requests_308_to_the_same_url_over_https() {
    let (ns, s, certs) = start("redirect", "first-segment", "redirect_https = true", "");
    let heads = [
        (
            "GET /a/b?x=1 HTTP/1.1\r\nHost: Shop.Example.TEST:8080\r\n\r\n",
            "https://shop.example.test:8443/a/b?x=1",
        ),
        ("GET /c HTTP/1.0\r\n\r\n", "https://127.0.0.1:8443/c"),
        (
            "POST http://other.test/p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
            "https://other.test:8443/p",
        ),
    ];
    for (head, location) in heads {
        let r = ns.enter(|| exchange(v4(), head.as_bytes())).unwrap();
        assert_eq!(r.status, 308, "{head:?}: {r:?}\n{}", s.log_text());
        assert_eq!(r.header("location"), Some(location), "{head:?}");
    }
    // A head that is not valid is refused as on any plain connection.
    let r = ns
        .enter(|| exchange(v4(), b"GET /a#b HTTP/1.1\r\nHost: x\r\n\r\n"))
        .unwrap();
    assert_eq!(r.status, 400);
    // Over TLS everything is served as before.
    let got = python_get(&ns, &s, &certs, SHOP, "/z", 0);
    assert!(got.contains("pool api"), "{got}");
    let st = s.status();
    assert_eq!(st["dispatcher"]["redirects"], 3, "{st}");
    assert_eq!(st["kernel"]["redirected"], 4, "{st}");
    assert_eq!(pool(&st, "api")["steered_kernel"], 0, "{st}");
}

#[test]
fn connections_queued_for_a_passthrough_pool_that_stops_get_a_tls_alert() {
    let (ns, s, certs) = start(
        "pt-drain",
        "first-segment",
        "",
        "start = \"always\"\nrapid_fail = { failures = 1, interval = \"1m\" }",
    );
    wait_ready(&s);
    let master = worker_pids(&s.status(), "own")[0];
    let children: Vec<i32> =
        std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
    // Nobody accepts: the kernel steers three connections into the pool's queue.
    for &pid in children.iter().chain([&master]) {
        // SAFETY: kill(2) of processes this test's front end started.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
    }
    let clients: Vec<_> = (0..3)
        .map(|_| {
            curl_own(&ns, &certs, "/q", "20")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    wait_for(&s, Duration::from_secs(10), "3 queued", |st| {
        pool(st, "own")["queued"] == 3
    });
    // SAFETY: as above; one failure stops the pool, whose queue the front end drains.
    unsafe { libc::kill(master, libc::SIGKILL) };
    for c in clients {
        let out = c.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("alert internal error"),
            "{err}\n{}",
            s.log_text()
        );
    }
    let st = s.status();
    assert_eq!(pool(&st, "own")["state"], "stopped", "{st}");
    assert_eq!(pool(&st, "own")["steered_kernel"], 3, "{st}");
    for pid in children {
        // SAFETY: as above (the orphaned, stopped gunicorn worker).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}
