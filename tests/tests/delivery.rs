//! Requests, not connections, cross a pool boundary: a host whose paths belong to pools that
//! do not trust each other is the front end's, which delivers each request to its pool on a
//! channel of that pool's own. A hostile pool that keeps every fd it is given reads none of
//! another pool's requests and answers none of them, over plain HTTP and HTTPS (TLS 1.2 and
//! 1.3: no session key leaves the front end); a dedicated site is still steered in the
//! kernel and answers 421 for another host.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sluice_tests::*;

/// The hostile worker script.
fn hoarder() -> PathBuf {
    workers_dir().join("hoarder.py")
}

/// `hoard` (the hoarder, `/api/`) and `web` (hello, `/`) share every host, over plain HTTP
/// on 8080 and HTTPS on 8443 (shop.example.test's certificate).
fn shared_host(
    steering: &str,
    hoard_file: &str,
    hand_back: bool,
    certs: &sluice_tests::certs::Certs,
) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:8080"]
listen_tls = ["127.0.0.1:8443"]
steering = "{steering}"
set_sysctls = true
admin_socket = "{{admin}}"

{tls}

[[pool]]
name = "hoard"
command = ["/usr/bin/python3", "{hoarder}"]
start = "always"
ping_interval = "0"
rapid_fail = {{ failures = 0 }}
env = {{ HOARD_FILE = "{hoard_file}", HOARD_HAND_BACK = "{hb}" }}

[[pool]]
name = "web"
command = ["{{hello}}"]
threads = 1
start = "always"

[[route]]
prefix = "/api/"
pool = "hoard"

[[route]]
prefix = "/"
pool = "web"
"#,
        hoarder = hoarder().display(),
        hb = if hand_back { "1" } else { "0" },
        tls = certs.shop_table(),
    )
}

/// A file any pool's uid may append to, in a folder of its own.
fn hoard_file(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-hoard-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let file = dir.join("hoard");
    std::fs::write(&file, b"").expect("file");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    file
}

/// A client connection, plain or TLS.
trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

fn send_and_read(s: &mut dyn Stream, request: &[u8]) -> Response {
    s.write_all(request).expect("send");
    read_response(&mut &mut *s).unwrap_or_else(|e| {
        panic!(
            "no answer to {:?}: {e}",
            String::from_utf8_lossy(request)
                .lines()
                .next()
                .unwrap_or("")
        )
    })
}

/// How the test's clients connect: plain to 8080, or TLS to 8443 (with a TLS version).
#[derive(Clone, Copy)]
enum Client {
    Plain,
    Tls13,
    Tls12,
}

impl Client {
    fn host(self) -> &'static str {
        match self {
            Client::Plain => "shared.test",
            _ => sluice_tests::certs::SHOP,
        }
    }

    fn connect(self, certs: Option<&sluice_tests::certs::Certs>) -> Box<dyn Stream> {
        use rustls::crypto::ring::cipher_suite as cs;
        let suite = match self {
            Client::Plain => {
                let s = TcpStream::connect(v4()).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                return Box::new(s);
            }
            Client::Tls13 => None,
            Client::Tls12 => Some(cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
        };
        let certs = certs.expect("certificates for TLS");
        let config = sluice_tests::certs::client_config(certs, suite);
        let tcp = TcpStream::connect("127.0.0.1:8443").expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let name = rustls::pki_types::ServerName::try_from(self.host()).unwrap();
        let conn = rustls::ClientConnection::new(config, name).unwrap();
        Box::new(rustls::StreamOwned::new(conn, tcp))
    }
}

/// Keep-alive connections that alternate the hoarder's pool and `web`, each `web` request
/// carrying a secret: every `web` answer is web's, and the hoarder read no secret.
fn alternate(
    ns: &Netns,
    connections: usize,
    tag: &str,
    client: Client,
    certs: Option<&sluice_tests::certs::Certs>,
) -> Vec<String> {
    let host = client.host();
    ns.enter(|| {
        let mut secrets = Vec::new();
        for c in 0..connections {
            let mut s = client.connect(certs);
            let s = &mut *s;
            for round in 0..2 {
                let r = send_and_read(
                    s,
                    format!("GET /api/{c}/{round} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
                );
                assert_eq!(r.status, 200);
                assert!(
                    String::from_utf8_lossy(&r.body).starts_with("hoarded /api/"),
                    "{:?}",
                    String::from_utf8_lossy(&r.body)
                );
                let secret = format!("secret-{tag}-{c}-{round}");
                let r = send_and_read(
                    s,
                    format!(
                        "GET /account HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {secret}\r\n\r\n"
                    )
                    .as_bytes(),
                );
                let body = String::from_utf8_lossy(&r.body).into_owned();
                assert_eq!(r.status, 200, "{body}");
                assert!(
                    body.starts_with("hello from pool web"),
                    "connection {c} round {round}: the answer to web's request came from {body:?}"
                );
                secrets.push(secret);
            }
            // Nothing more arrives: no forged answer waits behind the last one.
            let r = send_and_read(
                s,
                format!("GET /last HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
            );
            assert!(String::from_utf8_lossy(&r.body).starts_with("hello from pool web"));
            let mut extra = Vec::new();
            let _ = s.read_to_end(&mut extra);
            assert!(
                extra.is_empty(),
                "bytes after the last answer: {:?}",
                String::from_utf8_lossy(&extra)
            );
        }
        secrets
    })
}

#[test]
fn a_pool_that_keeps_every_fd_reads_no_request_of_another_pool_on_a_shared_host() {
    let dir = sluice_tests::certs::temp_dir("hoard");
    let certs = sluice_tests::certs::Certs::make(&dir);
    for steering in ["syn", "first-segment"] {
        for hand_back in [false, true] {
            let tag = format!("{}-{}", &steering[..3], u8::from(hand_back));
            let file = hoard_file(&tag);
            let ns = Netns::new("hoard");
            let s = Sluice::start(
                &ns,
                &shared_host(steering, &file.display().to_string(), hand_back, &certs),
            );
            wait_for(&s, Duration::from_secs(20), "both pools up", |st| {
                !worker_pids(st, "hoard").is_empty() && !worker_pids(st, "web").is_empty()
            });
            let secrets = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut all = alternate(&ns, 20, &tag, Client::Plain, None);
                for (client, n, name) in
                    [(Client::Tls13, 10, "tls13"), (Client::Tls12, 10, "tls12")]
                {
                    all.extend(alternate(
                        &ns,
                        n,
                        &format!("{tag}-{name}"),
                        client,
                        Some(&certs),
                    ));
                }
                all
            })) {
                Ok(secrets) => secrets,
                Err(e) => panic!(
                    "{steering}, hand-back {hand_back}: {:?}\nstatus: {}\nlog:\n{}",
                    e.downcast_ref::<String>(),
                    s.status(),
                    s.log_text()
                ),
            };
            // Give the hoarder's threads time to record whatever they could read.
            std::thread::sleep(Duration::from_millis(500));
            let hoard = std::fs::read(&file).expect("hoard file");
            let text = String::from_utf8_lossy(&hoard);
            assert!(
                text.contains("GET /api/0/0"),
                "the hoarder recorded its own requests ({steering}, hand-back {hand_back}): {text}"
            );
            for secret in &secrets {
                assert!(
                    !text.contains(secret.as_str()),
                    "{steering}, hand-back {hand_back}: the hoarder read {secret}"
                );
            }
            assert!(
                !text.contains("/account"),
                "{steering}: it read a web request"
            );
            assert!(
                !text.contains("HOARDER-GOT-A-NONBLOCKING-FD"),
                "a worker's end of a delivery channel is blocking, as an accepted socket is"
            );
            let st = s.status();
            // Two web requests and a last one per connection: 20 plain, 20 over TLS.
            assert_eq!(
                pool(&st, "web")["delivered"].as_u64(),
                Some(40 * 3),
                "{steering}: {st}"
            );
            assert_eq!(st["tls"]["delivered"].as_u64(), Some(20), "{st}");
            assert_eq!(
                st["tls"]["handed_off"].as_u64(),
                Some(0),
                "no session left the front end: {st}"
            );
            if steering == "first-segment" {
                assert!(
                    st["fallbacks"]["shared_site"].as_u64().unwrap_or(0) >= 20,
                    "the kernel sent the shared host to the dispatcher: {st}"
                );
            }
            let log = s.log_text();
            assert!(
                log.contains("wrote past the end of its answer"),
                "the forged answers were dropped: {log}"
            );
            drop(s);
            let _ = std::fs::remove_dir_all(file.parent().unwrap());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

const DEDICATED: &str = r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "first-segment"
set_sysctls = true
admin_socket = "{admin}"

[[pool]]
name = "shop"
command = ["{hello}"]
threads = 1
start = "always"

[[pool]]
name = "web"
command = ["{hello}"]
threads = 1
start = "always"

[[route]]
host = "shop.test"
prefix = "/"
pool = "shop"

[[route]]
prefix = "/"
pool = "web"
"#;

#[test]
fn a_dedicated_site_is_steered_in_the_kernel_and_answers_421_for_another_host() {
    let ns = Netns::new("dedicated");
    let s = Sluice::start(&ns, DEDICATED);
    wait_for(&s, Duration::from_secs(20), "pools up", |st| {
        !worker_pids(st, "shop").is_empty() && !worker_pids(st, "web").is_empty()
    });
    let (first, second, third) = ns.enter(|| {
        let mut c = TcpStream::connect(v4()).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let first = send_and_read(&mut c, b"GET /a HTTP/1.1\r\nHost: shop.test\r\n\r\n");
        let second = send_and_read(&mut c, b"GET /b HTTP/1.1\r\nHost: SHOP.test:8080\r\n\r\n");
        let third = send_and_read(&mut c, b"GET /c HTTP/1.1\r\nHost: web.test\r\n\r\n");
        (first, second, third)
    });
    assert_eq!(first.pool(), Some("shop"));
    assert_eq!(second.pool(), Some("shop"));
    assert_eq!(
        third.status,
        421,
        "{:?}",
        String::from_utf8_lossy(&third.body)
    );
    let st = s.status();
    assert!(
        pool(&st, "shop")["steered_kernel"].as_u64().unwrap_or(0) >= 1,
        "{st}"
    );
    assert_eq!(st["fallbacks"]["shared_site"].as_u64(), Some(0), "{st}");
    // A new connection for the other host reaches it.
    let r = ns.enter(|| {
        exchange(
            v4(),
            b"GET /c HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n",
        )
    });
    assert_eq!(r.expect("web").pool(), Some("web"));
}

const SOCKET_POOLS: &str = r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "{steering}"
set_sysctls = true
admin_socket = "{admin}"

[[pool]]
name = "gun"
worker = "socket"
command = ["{apps}/gunicorn", "--workers", "2", "--no-control-socket", "wsgi_app:app"]
cwd = "{workers}"
start = "always"

[[pool]]
name = "uv"
worker = "socket"
command = ["{apps}/uvicorn", "--fd", "3", "--no-access-log", "asgi_app:app"]
cwd = "{workers}"
start = "always"

[[route]]
prefix = "/gun/"
pool = "gun"

[[route]]
prefix = "/"
pool = "uv"
"#;

#[test]
fn gunicorn_and_uvicorn_share_a_host_by_path_on_one_keep_alive_connection() {
    for steering in ["first-segment", "syn"] {
        let ns = Netns::new("sockshare");
        let s = Sluice::start(&ns, &SOCKET_POOLS.replace("{steering}", steering));
        wait_for(&s, Duration::from_secs(30), "servers up", |st| {
            !worker_pids(st, "gun").is_empty() && !worker_pids(st, "uv").is_empty()
        });
        // Wait until both servers answer (their start takes a moment).
        let deadline = Instant::now() + Duration::from_secs(30);
        while ns
            .enter(|| {
                exchange(
                    v4(),
                    b"GET /gun/ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                )
            })
            .map_or(true, |r| r.status != 200)
        {
            assert!(Instant::now() < deadline, "gunicorn never answered");
            std::thread::sleep(Duration::from_millis(200));
        }
        let script = "import http.client\n\
            c = http.client.HTTPConnection('127.0.0.1', 8080, timeout=20)\n\
            for i in range(6):\n    \
                path = '/gun/%d' % i if i % 2 == 0 else '/uv/%d' % i\n    \
                c.request('GET', path, headers={'Host': 'one.test'})\n    \
                r = c.getresponse()\n    \
                print(r.status, r.read().decode().strip())\n";
        let out = ns
            .command(apps_bin().join("python"))
            .arg("-c")
            .arg(script)
            .output()
            .expect("python");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines.len(),
            6,
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (i, line) in lines.iter().enumerate() {
            let want = if i % 2 == 0 {
                format!("200 gunicorn /gun/{i}")
            } else {
                format!("200 uvicorn /uv/{i}")
            };
            assert!(line.starts_with(&want), "{steering}: {text}");
        }
        let st = s.status();
        assert!(
            pool(&st, "uv")["delivered"].as_u64().unwrap_or(0) >= 3,
            "{st}"
        );
        drop(s);
    }
}

#[test]
fn redirect_https_leaves_the_https_requests_of_a_shared_host_to_their_pools() {
    let dir = sluice_tests::certs::temp_dir("hoard-redirect");
    let certs = sluice_tests::certs::Certs::make(&dir);
    let file = hoard_file("redirect");
    let config = shared_host("first-segment", &file.display().to_string(), false, &certs)
        .replace("admin_socket", "redirect_https = true\nadmin_socket");
    let ns = Netns::new("hoardredir");
    let s = Sluice::start(&ns, &config);
    wait_for(&s, Duration::from_secs(20), "both pools up", |st| {
        !worker_pids(st, "hoard").is_empty() && !worker_pids(st, "web").is_empty()
    });
    // Plain requests are redirected, whichever pool they route to.
    let r = ns
        .enter(|| exchange(v4(), b"GET /api/x HTTP/1.1\r\nHost: shared.test\r\n\r\n"))
        .unwrap();
    assert_eq!(r.status, 308);
    // Over HTTPS the shared host's requests reach their pools: a redirect there would send
    // the browser back to the same URL for ever.
    let secrets = alternate(&ns, 2, "redirect", Client::Tls13, Some(&certs));
    assert_eq!(secrets.len(), 4);
    let st = s.status();
    assert_eq!(st["tls"]["delivered"].as_u64(), Some(2), "{st}");
    drop(s);
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_request_without_host_on_a_tls_session_goes_where_its_sni_name_routes() {
    let dir = sluice_tests::certs::temp_dir("sni-host");
    let certs = sluice_tests::certs::Certs::make(&dir);
    // shop.example.test is `shop`'s alone on `/` and splits `/api/` with `api`: both the
    // session handed to a pool and the one the front end keeps route by the SNI name.
    let config = format!(
        r#"
[server]
listen = ["127.0.0.1:8080"]
listen_tls = ["127.0.0.1:8443"]
steering = "first-segment"
set_sysctls = true
admin_socket = "{{admin}}"

{tls}

[[pool]]
name = "shop"
command = ["{{hello}}"]
threads = 1
start = "always"

[[pool]]
name = "web"
command = ["{{hello}}"]
threads = 1
start = "always"

[[route]]
host = "{shop}"
prefix = "/"
pool = "shop"

[[route]]
prefix = "/"
pool = "web"
"#,
        tls = certs.shop_table(),
        shop = sluice_tests::certs::SHOP,
    );
    for shared in [false, true] {
        let config = if shared {
            config.replace(
                "\n[[route]]\nprefix = \"/\"",
                &format!(
                    "\n[[route]]\nhost = \"{}\"\nprefix = \"/api/\"\npool = \"web\"\n\n[[route]]\nprefix = \"/\"",
                    sluice_tests::certs::SHOP
                ),
            )
        } else {
            config.clone()
        };
        let ns = Netns::new("snihost");
        let s = Sluice::start(&ns, &config);
        wait_for(&s, Duration::from_secs(20), "pools up", |st| {
            !worker_pids(st, "shop").is_empty() && !worker_pids(st, "web").is_empty()
        });
        let r = ns.enter(|| {
            let mut c = Client::Tls13.connect(Some(&certs));
            send_and_read(&mut *c, b"GET /page HTTP/1.0\r\n\r\n")
        });
        let body = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.status, 200, "{body}");
        assert!(
            body.starts_with("hello from pool shop"),
            "shared {shared}: {body}\n{}",
            s.log_text()
        );
        let st = s.status();
        assert_eq!(
            st["tls"]["delivered"].as_u64(),
            Some(u64::from(shared)),
            "{st}"
        );
        drop(s);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_worker_cannot_hand_a_tls_session_back_under_a_name_it_was_not_given() {
    let dir = sluice_tests::certs::temp_dir("renamer");
    let certs = sluice_tests::certs::Certs::make(&dir);
    // shop.example.test is the renamer's alone; other.example.test (same certificate) is
    // web's. The renamer hands every session back named other.example.test, with a request
    // for web as the plaintext it "did not serve".
    let config = format!(
        r#"
[server]
listen = ["127.0.0.1:8080"]
listen_tls = ["127.0.0.1:8443"]
steering = "first-segment"
set_sysctls = true
admin_socket = "{{admin}}"

{tls}

[[pool]]
name = "renamer"
command = ["/usr/bin/python3", "{renamer}"]
start = "always"
ping_interval = "0"
rapid_fail = {{ failures = 0 }}
env = {{ RENAME_TO = "other.example.test", RENAME_REQUEST = "GET /stolen HTTP/1.1|Host: other.example.test||" }}

[[pool]]
name = "web"
command = ["{{hello}}"]
threads = 1
start = "always"

[[route]]
host = "{shop}"
prefix = "/"
pool = "renamer"

[[route]]
host = "other.example.test"
prefix = "/"
pool = "web"
"#,
        tls = certs.shop_table(),
        shop = sluice_tests::certs::SHOP,
        renamer = workers_dir().join("renamer.py").display(),
    );
    let ns = Netns::new("renamer");
    let s = Sluice::start(&ns, &config);
    wait_for(&s, Duration::from_secs(20), "pools up", |st| {
        !worker_pids(st, "renamer").is_empty() && !worker_pids(st, "web").is_empty()
    });
    for _ in 0..3 {
        let got = ns.enter(|| {
            let mut c = Client::Tls13.connect(Some(&certs));
            let head = format!(
                "GET / HTTP/1.1\r\nHost: {}\r\n\r\n",
                sluice_tests::certs::SHOP
            );
            c.write_all(head.as_bytes()).expect("send");
            let mut back = Vec::new();
            let _ = c.read_to_end(&mut back);
            String::from_utf8_lossy(&back).into_owned()
        });
        assert!(
            !got.contains("hello from pool web"),
            "another site's pool answered on the session: {got}"
        );
    }
    let st = s.status();
    assert_eq!(st["tls"]["handed_back"].as_u64(), Some(3), "{st}");
    let web = pool(&st, "web");
    assert_eq!(web["handed_off"].as_u64().unwrap_or(0), 0, "{st}");
    assert_eq!(web["delivered"].as_u64().unwrap_or(0), 0, "{st}");
    let log = s.log_text();
    assert!(log.contains("which it could not have been given"), "{log}");
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}
