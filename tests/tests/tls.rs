//! HTTPS: the front end does the handshake, hands the session's keys to the pool's worker,
//! which runs the record layer. Reached with curl, python's ssl, openssl s_client and a
//! rustls client; certificates are made with openssl at test time.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use sluice_tests::{certs::*, *};

/// Pools `api` (/api/), `echo` (/echo/), `files` (/files/, serving `files_root`) and `web`
/// (/), a static cache entry /cached, plain 8080 and TLS 8443.
fn template(certs: &Certs, files_root: &Path) -> String {
    let cached = certs.dir.join("cached.txt");
    std::fs::write(&cached, "cached over tls\n").unwrap();
    format!(
        r#"
[server]
listen = ["127.0.0.1:8080"]
listen_tls = ["127.0.0.1:8443"]
steering = "first-segment"
set_sysctls = true
admin_socket = "{{admin}}"

{shop}
[[tls.certificate]]
hosts = ["other.test"]
cert = "{other_cert}"
key = "{other_key}"

[[cache.static]]
path = "/cached"
file = "{cached}"
content_type = "text/plain"

[[pool]]
name = "api"
command = ["{{hello}}"]
threads = 1
start = "always"

[[pool]]
name = "echo"
command = ["{{echo}}"]
threads = 1

[[pool]]
name = "files"
command = ["{{files}}", "--root", "{files}"]
threads = 1

[[pool]]
name = "web"
command = ["{{hello}}"]
threads = 1

[[route]]
prefix = "/api/"
pool = "api"

[[route]]
prefix = "/echo/"
pool = "echo"

[[route]]
prefix = "/files/"
pool = "files"

[[route]]
prefix = "/"
pool = "web"
"#,
        shop = certs.shop_table(),
        other_cert = certs.cert("other").display(),
        other_key = certs.key("other").display(),
        cached = cached.display(),
        files = files_root.display(),
    )
}

fn start(tag: &str) -> (Netns, Sluice, Certs, PathBuf) {
    let ns = Netns::new(tag);
    let dir = temp_dir(tag);
    let certs = Certs::make(&dir);
    let files = dir.join("root");
    std::fs::create_dir_all(files.join("files")).unwrap();
    let s = Sluice::start(&ns, &template(&certs, &files));
    (ns, s, certs, files)
}

fn curl(ns: &Netns, certs: &Certs, host: &str, path: &str, extra: &[&str]) -> (String, String) {
    let ca = certs.ca();
    let out = ns
        .command("curl")
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .arg("--cacert")
        .arg(&ca)
        .arg("--resolve")
        .arg(format!("{host}:8443:127.0.0.1"))
        .args(extra)
        .arg(format!("https://{host}:8443{path}"))
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn curl_reaches_each_pool_by_sni_and_path_in_tls13_and_tls12() {
    let (ns, s, certs, _) = start("tls-curl");
    // TLS 1.3 (curl's choice), then TLS 1.2 only.
    for extra in [&[][..], &["--tlsv1.2", "--tls-max", "1.2"][..]] {
        let (out, err) = curl(&ns, &certs, SHOP, "/api/x", extra);
        assert!(
            out.contains("hello from pool api"),
            "{out} {err}\n{}",
            s.log_text()
        );
        assert!(out.ends_with("200"), "{out}");
        let (out, _) = curl(&ns, &certs, "a.example.test", "/page", extra);
        assert!(out.contains("hello from pool web"), "{out}");
        // The second certificate, chosen by SNI.
        let (out, err) = curl(&ns, &certs, "other.test", "/api/y", extra);
        assert!(out.contains("hello from pool api"), "{out} {err}");
        let (out, _) = curl(&ns, &certs, SHOP, "/cached", extra);
        assert!(out.starts_with("cached over tls"), "{out}");
    }
    // Plain HTTP still answers on its own port.
    let r = get_in(&ns, "/api/plain");
    assert_eq!(r.status, 200);
}

#[test]
fn openssl_s_client_speaks_each_aead_suite_in_tls13_and_tls12() {
    let (ns, s, certs, _) = start("tls-suites");
    let suites: [(&str, &str, &str); 6] = [
        ("-tls1_3", "-ciphersuites", "TLS_AES_128_GCM_SHA256"),
        ("-tls1_3", "-ciphersuites", "TLS_AES_256_GCM_SHA384"),
        ("-tls1_3", "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"),
        ("-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"),
        ("-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384"),
        ("-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305"),
    ];
    for (version, flag, suite) in suites {
        let mut child = ns
            .command("openssl")
            .args([
                "s_client",
                "-connect",
                "127.0.0.1:8443",
                "-servername",
                SHOP,
            ])
            .arg("-CAfile")
            .arg(certs.ca())
            .args(["-brief", "-ign_eof", version, flag, suite])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(
                b"GET /api/s HTTP/1.1\r\nHost: shop.example.test\r\n\r\nGET /w HTTP/1.1\r\nHost: shop.example.test\r\nConnection: close\r\n\r\n",
            )
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            stdout.contains("hello from pool api") && stdout.contains("hello from pool web"),
            "{suite}: {stdout}\n{stderr}\n{}",
            s.log_text()
        );
        assert!(
            stderr.contains(suite.trim_start_matches("ECDHE-")) || stderr.contains(suite),
            "{suite}: {stderr}"
        );
    }
}

/// python's http.client over one TLS connection: `(status, body)` per request.
fn python_keep_alive(ns: &Netns, certs: &Certs, requests: &[(&str, &str)]) -> Vec<(u16, String)> {
    python_keep_alive_to(ns, certs, SHOP, requests)
}

/// The same, with the ClientHello naming `sni`.
fn python_keep_alive_to(
    ns: &Netns,
    certs: &Certs,
    sni: &str,
    requests: &[(&str, &str)],
) -> Vec<(u16, String)> {
    let script = format!(
        r#"
import http.client, socket, ssl, sys
ctx = ssl.create_default_context(cafile="{ca}")
c = http.client.HTTPSConnection("{sni}", 8443, context=ctx, timeout=20)
# Connected by hand: the name is not in any resolver, and the SNI must still name it.
c.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", 8443), timeout=20), server_hostname="{sni}")
for host, path in {reqs}:
    c.putrequest("GET", path, skip_host=True)
    c.putheader("Host", host)
    c.endheaders()
    r = c.getresponse()
    body = r.read().decode()
    print(r.status, body.strip().replace("\n", " "))
    sys.stdout.flush()
    if r.status >= 400 and r.getheader("connection") == "close":
        break
"#,
        ca = certs.ca().display(),
        reqs = format!(
            "[{}]",
            requests
                .iter()
                .map(|(h, p)| format!("({h:?}, {p:?})"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    let text = ns.python(&script).unwrap_or_else(|e| panic!("python: {e}"));
    text.lines()
        .map(|l| {
            let (code, body) = l.split_once(' ').unwrap_or((l, ""));
            (code.parse().unwrap_or(0), body.to_owned())
        })
        .collect()
}

#[test]
fn one_keep_alive_tls_connection_gets_every_answer_from_its_own_pool_and_the_cache() {
    let (ns, s, certs, _) = start("tls-alternate");
    let asked = [
        (SHOP, "/api/1"),
        (SHOP, "/cached"),
        (SHOP, "/page/2"),
        (SHOP, "/api/3"),
        (SHOP, "/cached"),
        (SHOP, "/page/4"),
        (SHOP, "/api/5"),
    ];
    let got = python_keep_alive(&ns, &certs, &asked);
    let want = [
        "pool api",
        "cached over tls",
        "pool web",
        "pool api",
        "cached over tls",
        "pool web",
        "pool api",
    ];
    assert_eq!(got.len(), want.len(), "{got:?}\n{}", s.log_text());
    for ((code, body), want) in got.iter().zip(want) {
        assert_eq!(*code, 200, "{got:?}");
        assert!(body.contains(want), "{body} is not from {want}: {got:?}");
    }
    // The host is shared by the pools: the session stayed in the front end, whose delivery
    // path answered the cached path itself and delivered the rest, each to its pool.
    let st = s.status();
    let tls = &st["tls"];
    assert_eq!(tls["handshakes"], 1, "{st}");
    assert_eq!(tls["handed_off"], 0, "{st}");
    assert_eq!(tls["delivered"], 1, "{st}");
    assert_eq!(st["delivery"]["cache_answers"], 2, "{st}");
    assert_eq!(pool(&st, "api")["delivered"], 3, "{st}");
    assert_eq!(pool(&st, "web")["delivered"], 2, "{st}");
}

#[test]
fn a_request_for_another_host_than_the_sni_name_gets_421_first_or_later() {
    let (ns, _s, certs, _) = start("tls-421");
    let got = python_keep_alive(&ns, &certs, &[("other.test", "/api/x")]);
    assert_eq!(got[0].0, 421, "{got:?}");
    // On a connection that served its own host first: the front end answers.
    let got = python_keep_alive(&ns, &certs, &[(SHOP, "/api/x"), ("other.test", "/api/y")]);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].0, 200, "{got:?}");
    assert_eq!(got[1].0, 421, "{got:?}");
}

#[test]
fn what_the_front_end_answers_over_tls_gets_its_access_log_line() {
    let tag = "tls-alog";
    let ns = Netns::new(tag);
    let dir = temp_dir(tag);
    let certs = Certs::make(&dir);
    let files = dir.join("root");
    std::fs::create_dir_all(&files).unwrap();
    let log = dir.join("access.log");
    let template = template(&certs, &files).replace(
        "admin_socket = \"{admin}\"",
        &format!(
            "admin_socket = \"{{admin}}\"\naccess_log = \"{}\"",
            log.display()
        ),
    );
    let s = Sluice::start(&ns, &template);
    // The cache over the session, then a refusal; each answered by the TLS thread.
    let got = python_keep_alive(&ns, &certs, &[(SHOP, "/cached"), ("other.test", "/x")]);
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [200, 421]);
    let mut text = String::new();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().count() >= 2 {
            break;
        }
    }
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}\n{}", s.log_text());
    assert!(
        lines[0].contains("\"GET /cached HTTP/1.1\" 200 16 "),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains(" shop.example.test "), "{}", lines[0]);
    assert!(
        lines[1].contains("\"GET /x HTTP/1.1\" 421 "),
        "{}",
        lines[1]
    );
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn a_4_mb_post_and_a_100_mb_download_arrive_intact_over_tls() {
    let (ns, s, certs, files) = start("tls-big");
    let dir = certs.dir.clone();
    let mut rng = Rng(7);
    let post: Vec<u8> = (0..4 << 20).map(|_| rng.next() as u8).collect();
    std::fs::write(dir.join("post.bin"), &post).unwrap();
    let big = files.join("files/big.bin");
    {
        let mut f = std::fs::File::create(&big).unwrap();
        let mut chunk = vec![0u8; 1 << 20];
        for i in 0..100 {
            for b in chunk.iter_mut() {
                *b = (rng.next() >> 13) as u8 ^ i as u8;
            }
            f.write_all(&chunk).unwrap();
        }
    }
    let back = dir.join("back.bin");
    let (out, err) = curl(
        &ns,
        &certs,
        SHOP,
        "/echo/up",
        &[
            "--data-binary",
            &format!("@{}", dir.join("post.bin").display()),
            "-H",
            "content-type: application/octet-stream",
            "-o",
            &back.display().to_string(),
        ],
    );
    assert!(
        out.trim().starts_with("200"),
        "{out} {err}\n{}",
        s.log_text()
    );
    assert_eq!(sha256(&back), sha256(&dir.join("post.bin")));
    let got = dir.join("got.bin");
    let (out, err) = curl(
        &ns,
        &certs,
        SHOP,
        "/files/big.bin",
        &["-o", &got.display().to_string()],
    );
    assert!(out.trim().starts_with("200"), "{out} {err}");
    assert_eq!(std::fs::metadata(&got).unwrap().len(), 100 << 20);
    assert_eq!(sha256(&got), sha256(&big));
}

fn connect(ns: &Netns, config: Arc<rustls::ClientConfig>) -> TlsStream {
    ns.enter(|| {
        let tcp = TcpStream::connect("127.0.0.1:8443").unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let name = rustls::pki_types::ServerName::try_from(SHOP).unwrap();
        let conn = rustls::ClientConnection::new(config, name).unwrap();
        rustls::StreamOwned::new(conn, tcp)
    })
}

fn ask(stream: &mut TlsStream, path: &str) -> Response {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {SHOP}\r\n\r\n");
    stream.write_all(req.as_bytes()).unwrap();
    stream.flush().unwrap();
    read_response(stream).unwrap()
}

#[test]
fn a_key_update_mid_connection_moves_both_sides_to_new_keys_and_serving_goes_on() {
    let (ns, s, certs, _) = start("tls-keyupdate");
    use rustls::crypto::ring::cipher_suite as cs;
    for suite in [
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
    ] {
        let mut stream = connect(&ns, client_config(&certs, Some(suite)));
        let r = ask(&mut stream, "/api/before");
        assert!(String::from_utf8_lossy(&r.body).contains("pool api"));
        for round in 0..3 {
            // Asks the worker to update too: its answer comes under its new keys.
            stream.conn.refresh_traffic_keys().unwrap();
            let r = ask(&mut stream, &format!("/api/after{round}"));
            assert_eq!(r.status, 200, "{}", s.log_text());
            assert!(String::from_utf8_lossy(&r.body).contains("pool api"));
        }
        // And after a hand-back (the cache answers in the front end) the new keys hold.
        let r = ask(&mut stream, "/cached");
        assert_eq!(r.body, b"cached over tls\n");
        stream.conn.refresh_traffic_keys().unwrap();
        let r = ask(&mut stream, "/api/last");
        assert!(
            String::from_utf8_lossy(&r.body).contains("pool api"),
            "{}",
            s.log_text()
        );
    }
}

/// Whether `needle` is anywhere in the readable memory of process `pid`.
fn memory_holds(pid: i32, needle: &[u8]) -> bool {
    use std::os::unix::fs::FileExt;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.contains("[vvar]") || line.contains("[vsyscall]") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut buf = vec![0u8; (b - a) as usize];
        if mem.read_exact_at(&mut buf, a).is_err() {
            continue;
        }
        if buf.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
    }
    false
}

/// The private scalar of a P-256 key in PEM (the 32 bytes after `04 20` in its DER).
fn private_scalar(key_pem: &Path) -> Vec<u8> {
    use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
    let key = PrivateKeyDer::from_pem_file(key_pem).unwrap();
    let der = key.secret_der();
    let at = der
        .windows(2)
        .position(|w| w == [0x04, 0x20])
        .expect("an EC private key");
    der[at + 2..at + 34].to_vec()
}

#[test]
fn a_workers_memory_never_holds_the_certificates_private_key() {
    use rustls::pki_types::pem::PemObject;
    let (ns, s, certs, _) = start("tls-keys");
    let mut stream = connect(&ns, client_config(&certs, None));
    for i in 0..5 {
        assert_eq!(ask(&mut stream, &format!("/api/{i}")).status, 200);
    }
    let scalar = private_scalar(&certs.key("shop"));
    // ring keeps the scalar as little-endian limbs: both byte orders are looked for.
    let reversed: Vec<u8> = scalar.iter().rev().copied().collect();
    let pem = std::fs::read(certs.key("shop")).unwrap();
    let holds = |pid: i32| memory_holds(pid, &scalar) || memory_holds(pid, &reversed);
    // The scan finds the key where it is: in this process, which holds the key's DER.
    let held = rustls::pki_types::PrivateKeyDer::from_pem_file(certs.key("shop")).unwrap();
    assert!(
        holds(std::process::id() as i32),
        "the scan should find a held key"
    );
    drop(held);
    let workers = worker_pids(&s.status(), "api");
    assert!(!workers.is_empty());
    for pid in workers {
        assert!(
            !memory_holds(pid, &scalar),
            "worker {pid} holds the private key"
        );
        assert!(
            !memory_holds(pid, &pem[40..72]),
            "worker {pid} holds the key file's text"
        );
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        assert!(!environ.windows(32).any(|w| w == &pem[40..72]));
    }
}

#[test]
fn tls_connections_waiting_for_killed_workers_are_all_answered_after_the_restart() {
    let (ns, s, certs, _) = start("tls-kill");
    let config = client_config(&certs, None);
    let pids = worker_pids(&s.status(), "api");
    for &p in &pids {
        // SAFETY: signals a worker this test's front end started.
        unsafe { libc::kill(p, libc::SIGSTOP) };
    }
    let clients: Vec<_> = (0..200)
        .map(|i| {
            let config = config.clone();
            let mut stream = connect(&ns, config);
            std::thread::spawn(move || {
                let r = ask(&mut stream, &format!("/api/waiting/{i}"));
                (r.status, String::from_utf8_lossy(&r.body).into_owned())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    for &p in &pids {
        // SAFETY: as above.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    let mut answered = 0;
    for c in clients {
        let (status, body) = c.join().expect("a client failed");
        assert_eq!(status, 200, "{body}\n{}", s.log_text());
        assert!(body.contains("pool api"), "{body}");
        answered += 1;
    }
    assert_eq!(answered, 200);
    let now = worker_pids(&s.status(), "api");
    assert!(
        now.iter().all(|p| !pids.contains(p)),
        "the workers were restarted"
    );
}

#[test]
fn a_clienthello_on_the_plain_port_gets_400_at_once() {
    let ns = Netns::new("tls-plain-hello");
    let s = Sluice::start(&ns, &two_pools("first-segment"));
    let hello: &[u8] = &[
        0x16, 0x03, 0x01, 0x00, 0x2f, 0x01, 0x00, 0x00, 0x2b, 0x03, 0x03, 0, 1, 2, 3, 4, 5, 6, 7,
        8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30,
        31, 0x00, 0x00, 0x02, 0x13, 0x01, 0x01, 0x00, 0x00, 0x00,
    ];
    let started = std::time::Instant::now();
    let r = ns.enter(|| exchange(v4(), hello)).expect("an answer");
    assert_eq!(r.status, 400, "{}", s.log_text());
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_certificate_that_does_not_match_its_key_is_refused_naming_the_key() {
    let dir = temp_dir("tls-mismatch");
    let certs = Certs::make(&dir);
    let files = dir.join("root");
    std::fs::create_dir_all(&files).unwrap();
    let text = template(&certs, &files).replacen(
        &certs.key("shop").display().to_string(),
        &certs.key("other").display().to_string(),
        1,
    );
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, config(&text, &dir.join("admin.sock"))).unwrap();
    let out = Command::new(sluice_bin())
        .arg("check")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("tls.certificate[0].key"), "{err}");
    assert!(err.contains("other.key"), "{err}");
    let _ = std::fs::write(certs.cert("shop"), "not a certificate");
    std::fs::write(
        &cfg,
        config(&template(&certs, &files), &dir.join("admin.sock")),
    )
    .unwrap();
    let out = Command::new(sluice_bin())
        .arg("check")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tls.certificate[0].cert"), "{err}");
}

#[test]
fn a_handshake_record_longer_than_tls_allows_is_cut_at_once() {
    let (ns, s, _certs, _) = start("tls-huge");
    let started = std::time::Instant::now();
    let got = ns.enter(|| {
        let mut c = TcpStream::connect("127.0.0.1:8443").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // A handshake record header declaring 65,535 bytes, then part of them.
        let mut hello = vec![0x16, 0x03, 0x01, 0xff, 0xff];
        hello.extend(std::iter::repeat_n(0u8, 30_000));
        let _ = c.write_all(&hello);
        let mut back = Vec::new();
        let _ = std::io::Read::read_to_end(&mut c, &mut back);
        back
    });
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "held {:?}\n{}",
        started.elapsed(),
        s.log_text()
    );
    // What came back, if anything, is an alert record.
    assert!(got.is_empty() || got[0] == 0x15, "{got:?}");
}

#[test]
fn an_sslv2_format_clienthello_is_refused_at_once() {
    let (ns, s, _certs, _) = start("tls-sslv2");
    let started = std::time::Instant::now();
    ns.enter(|| {
        let mut c = TcpStream::connect("127.0.0.1:8443").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        // An SSLv2 CLIENT-HELLO offering TLS 1.0: 2-byte length with the top bit set,
        // message type 1, version 3.1, then its lengths, cipher specs and challenge.
        let mut body = vec![1, 3, 1, 0, 9, 0, 0, 0, 16];
        body.extend([0x00, 0x00, 0x2f, 0x00, 0x00, 0x35, 0x00, 0x00, 0xff]);
        body.extend([0x5a; 16]);
        let mut hello = vec![0x80 | (body.len() >> 8) as u8, body.len() as u8];
        hello.extend(body);
        c.write_all(&hello).unwrap();
        let mut back = Vec::new();
        let _ = std::io::Read::read_to_end(&mut c, &mut back);
    });
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "held {:?} (until the header timeout)\n{}",
        started.elapsed(),
        s.log_text()
    );
}

#[test]
fn a_socket_pool_behind_tls_gets_plaintext_and_its_answers_go_back_sealed() {
    let ns = Netns::new("tls-socket");
    let dir = temp_dir("tls-socket");
    let certs = Certs::make(&dir);
    let template = format!(
        r#"
[server]
listen = ["127.0.0.1:8080"]
listen_tls = ["127.0.0.1:8443"]
steering = "first-segment"
set_sysctls = true
admin_socket = "{{admin}}"

{shop}
[[pool]]
name = "node"
worker = "socket"
command = ["node", "node_app.js"]
cwd = "{{workers}}"

[[pool]]
name = "api"
command = ["{{hello}}"]
threads = 1

[[route]]
host = "node.example.test"
prefix = "/"
pool = "node"

[[route]]
prefix = "/"
pool = "api"
"#,
        shop = certs.shop_table(),
    );
    let s = Sluice::start(&ns, &template);
    // One connection, three requests, all answered by the Node.js server through the front
    // end's decryption.
    let got = python_keep_alive_to(
        &ns,
        &certs,
        "node.example.test",
        &[
            ("node.example.test", "/a"),
            ("node.example.test", "/b?x=1"),
            ("node.example.test", "/c"),
        ],
    );
    assert_eq!(got.len(), 3, "{got:?}\n{}", s.log_text());
    for ((code, body), path) in got.iter().zip(["/a", "/b?x=1", "/c"]) {
        assert_eq!(*code, 200, "{got:?}");
        assert!(body.starts_with(&format!("node {path} ")), "{body}");
    }
    // A sluice-worker pool on the same listener still gets its sessions.
    let got = python_keep_alive(&ns, &certs, &[(SHOP, "/x")]);
    assert!(got[0].1.contains("pool api"), "{got:?}");
    let st = s.status();
    assert_eq!(st["tls"]["relayed"], 1, "{st}");
}

/// A session a worker holds is idle when no request byte arrives, whatever records do: a
/// client that sends only KeyUpdates after its answer is cut at the idle timeout, as a
/// silent one is (it could otherwise hold a pool's fds at a few bytes a second).
#[test]
fn a_worker_cuts_a_session_that_sends_only_key_updates_at_the_idle_timeout() {
    let ns = Netns::new("tls-kuidle");
    let dir = temp_dir("tls-kuidle");
    let certs = Certs::make(&dir);
    let files = dir.join("root");
    std::fs::create_dir_all(files.join("files")).unwrap();
    // The pools trust each other: the session goes to the worker with its keys.
    let config = format!(
        "{}\n[[site]]\nhost = \"*\"\ntrust_pools = true\n\n[limits]\nidle_timeout = \"2s\"\n",
        template(&certs, &files)
    );
    let s = Sluice::start(&ns, &config);
    let mut stream = connect(&ns, client_config(&certs, None));
    let r = ask(&mut stream, "/api/first");
    assert_eq!(r.pool(), Some("api"));
    let started = std::time::Instant::now();
    let closed = ns.enter(|| {
        stream
            .sock
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        while started.elapsed() < Duration::from_secs(8) {
            std::thread::sleep(Duration::from_millis(480));
            if stream.conn.refresh_traffic_keys().is_err() || stream.flush().is_err() {
                return Some(started.elapsed());
            }
            let mut buf = [0u8; 64];
            match stream.read(&mut buf) {
                Ok(0) => return Some(started.elapsed()),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return Some(started.elapsed()),
            }
        }
        None
    });
    let st = s.status();
    assert_eq!(st["tls"]["handed_off"].as_u64(), Some(1), "{st}");
    let after = closed.unwrap_or_else(|| panic!("the session outlived the idle timeout by far"));
    assert!(
        after < Duration::from_secs(5),
        "cut after {after:?} with idle_timeout 2s"
    );
}

/// A TLS 1.3 server of the test's own for `SHOP` (the same certificate), which allows early
/// data on resumption: it gives the client a ticket that says early data may be sent.
fn early_data_server(certs: &Certs, ns: &Netns) -> std::thread::JoinHandle<()> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let chain: Vec<CertificateDer> = CertificateDer::pem_file_iter(certs.cert("shop"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(certs.key("shop")).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    // Early data needs stateful resumption in rustls: no ticketer.
    config.max_early_data_size = 16384;
    let config = Arc::new(config);
    let listener = ns.enter(|| std::net::TcpListener::bind("127.0.0.1:9443").unwrap());
    std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        let conn = rustls::ServerConnection::new(config).unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).unwrap_or(0) == 0 {
                return;
            }
            head.push(byte[0]);
        }
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        s.conn.send_close_notify();
        let _ = s.flush();
    })
}

#[test]
fn early_data_under_a_ticket_sluice_cannot_read_is_skipped_for_a_full_handshake() {
    let (ns, s, certs, _) = start("tls-early");
    let server = early_data_server(&certs, &ns);
    let mut config = (*sluice_tests::certs::client_config(&certs, None)).clone();
    config.enable_early_data = true;
    let config = Arc::new(config);
    let name = || rustls::pki_types::ServerName::try_from(SHOP).unwrap();
    let request = format!("GET /api/early HTTP/1.1\r\nHost: {SHOP}\r\nConnection: close\r\n\r\n");
    ns.enter(|| {
        // A ticket that allows early data, from the other server.
        let tcp = TcpStream::connect("127.0.0.1:9443").unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let conn = rustls::ClientConnection::new(config.clone(), name()).unwrap();
        let mut first = rustls::StreamOwned::new(conn, tcp);
        first
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut got = Vec::new();
        let _ = first.read_to_end(&mut got);
        assert!(got.ends_with(b"ok"), "{}", String::from_utf8_lossy(&got));
    });
    server.join().unwrap();
    let answer = ns.enter(|| {
        // To sluice with that ticket, early data first: sluice cannot read the ticket, so
        // it must skip the early data and finish a full handshake.
        let tcp = TcpStream::connect("127.0.0.1:8443").unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut conn = rustls::ClientConnection::new(config.clone(), name()).unwrap();
        let sent_early = match conn.early_data() {
            Some(mut early) => early.write_all(request.as_bytes()).is_ok(),
            None => false,
        };
        assert!(sent_early, "the client had no early-data ticket to use");
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .unwrap_or_else(|e| panic!("the handshake failed: {e}\n{}", s.log_text()));
        }
        assert!(!stream.conn.is_early_data_accepted());
        stream.write_all(request.as_bytes()).unwrap();
        let mut got = Vec::new();
        let _ = stream.read_to_end(&mut got);
        String::from_utf8_lossy(&got).into_owned()
    });
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.contains("pool api"), "{answer}");
}
