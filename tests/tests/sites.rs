//! Sites: routes by host as HTTP.sys URL prefixes do (strong wildcard, exact host, wildcard
//! label, local address, weak wildcard), in the kernel for plain first requests and in user
//! space for everything else, with the same answers.

use std::{
    collections::BTreeMap,
    io::Write,
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use sluice_tests::*;

/// A name longer than the kernel's site key (64 bytes): routed in user space only.
const LONG: &str = "a-host-name-that-is-much-longer-than-the-kernels-site-key.example.test";

/// `trust`: every site's pools trust each other, so the kernel steers by host and path (the
/// strong wildcard's acme route otherwise shares every host, which the front end keeps).
fn sites_config(steering: &str, trust: bool) -> String {
    let pool = |name: &str| {
        format!(
            "[[pool]]\nname = \"{name}\"\ncommand = [\"{{hello}}\"]\nthreads = 1\nstart = \"always\"\n\n"
        )
    };
    let mut c = format!(
        r#"
[server]
listen = ["127.0.0.1:8080", "127.0.0.2:8080"]
steering = "{steering}"
set_sysctls = true
admin_socket = "{{admin}}"

"#
    );
    for p in [
        "shop", "shopapi", "tenants", "acme", "local", "long", "web", "webapi",
    ] {
        c.push_str(&pool(p));
    }
    c.push_str(&format!(
        r#"
[[route]]
host = "shop.example.test"
prefix = "/"
pool = "shop"

[[route]]
host = "Shop.Example.Test"
prefix = "/api/"
pool = "shopapi"

[[route]]
host = "*.tenants.test"
prefix = "/"
pool = "tenants"

[[route]]
host = "+"
prefix = "/.well-known/acme-challenge/"
pool = "acme"

[[route]]
host = "127.0.0.2"
prefix = "/"
pool = "local"

[[route]]
host = "{LONG}"
prefix = "/"
pool = "long"

[[route]]
prefix = "/"
pool = "web"

[[route]]
host = "*"
prefix = "/api/"
pool = "webapi"
"#
    ));
    if trust {
        for host in [
            "+",
            "shop.example.test",
            "*.tenants.test",
            "127.0.0.2",
            LONG,
            "*",
        ] {
            c.push_str(&format!(
                "\n[[site]]\nhost = \"{host}\"\ntrust_pools = true\n"
            ));
        }
    }
    c
}

fn addr(local: &str) -> SocketAddr {
    format!("{local}:8080").parse().expect("address")
}

fn head(host: &str, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()
}

/// Per pool: (connections steered in the kernel, connections handed off by the dispatcher).
fn arrivals(s: &Sluice) -> BTreeMap<String, (u64, u64)> {
    let st = s.status();
    st["pools"]
        .as_array()
        .expect("pools")
        .iter()
        .map(|p| {
            let n = |k: &str| p[k].as_u64().unwrap_or(0);
            (
                p["name"].as_str().unwrap_or("").to_owned(),
                (n("steered_kernel"), n("handed_off")),
            )
        })
        .collect()
}

#[test]
fn sites_on_one_port_reach_their_pools_in_the_kernel_and_through_the_dispatcher() {
    let cases = [
        ("shop.example.test", "/cart", "shop", "127.0.0.1"),
        ("SHOP.example.TEST:8080", "/api/x", "shopapi", "127.0.0.1"),
        ("shop.example.test.", "/", "shop", "127.0.0.1"),
        ("a.tenants.test", "/x", "tenants", "127.0.0.1"),
        ("b.tenants.test:80", "/api/y", "tenants", "127.0.0.1"),
        ("a.b.tenants.test", "/x", "web", "127.0.0.1"),
        ("tenants.test", "/api/z", "webapi", "127.0.0.1"),
        (
            "shop.example.test",
            "/.well-known/acme-challenge/t",
            "acme",
            "127.0.0.1",
        ),
        (
            "any.test",
            "/.well-known/acme-challenge/t",
            "acme",
            "127.0.0.2",
        ),
        ("any.test", "/x", "local", "127.0.0.2"),
        ("shop.example.test", "/x", "shop", "127.0.0.2"),
        ("any.test", "/x", "web", "127.0.0.1"),
        ("127.0.0.1:8080", "/api/", "webapi", "127.0.0.1"),
    ];
    for steering in ["first-segment", "syn"] {
        let ns = Netns::new(if steering == "syn" {
            "sites-syn"
        } else {
            "sites-fs"
        });
        let s = Sluice::start(&ns, &sites_config(steering, true));
        for (host, path, want, local) in cases {
            let before = arrivals(&s);
            let r = ns
                .enter(|| exchange(addr(local), &head(host, path)))
                .unwrap_or_else(|e| panic!("{host} {path}: {e}"));
            assert_eq!(
                r.pool(),
                Some(want),
                "{steering}: Host {host}, {path} on {local}: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
            let after = arrivals(&s);
            let (k0, d0) = before[want];
            let (k1, d1) = after[want];
            if steering == "first-segment" {
                assert_eq!(
                    (k1 - k0, d1 - d0),
                    (1, 0),
                    "Host {host} {path}: steered in the kernel"
                );
            } else {
                assert_eq!((k1 - k0, d1 - d0), (0, 1), "Host {host} {path}: dispatcher");
            }
        }
        // The long name is routed, by the dispatcher, in both modes.
        let before = arrivals(&s);
        let r = ns
            .enter(|| exchange(addr("127.0.0.1"), &head(LONG, "/x")))
            .expect("long host");
        assert_eq!(r.pool(), Some("long"));
        assert_eq!(arrivals(&s)["long"].1, before["long"].1 + 1);
        if steering == "first-segment" {
            let st = s.status();
            assert!(
                st["fallbacks"]["host_too_long"].as_u64().unwrap_or(0) >= 1,
                "{st}"
            );
        }
    }
}

#[test]
fn one_keep_alive_connection_alternating_hosts_gets_every_answer_from_its_pool() {
    let ns = Netns::new("sites-ka");
    let s = Sluice::start(&ns, &sites_config("first-segment", false));
    let steps = [
        ("shop.example.test", "/a", "shop"),
        ("a.tenants.test", "/a", "tenants"),
        ("shop.example.test", "/api/a", "shopapi"),
        ("other.test", "/a", "web"),
        ("SHOP.EXAMPLE.TEST", "/a", "shop"),
        ("x.tenants.test", "/.well-known/acme-challenge/a", "acme"),
        (LONG, "/a", "long"),
        ("other.test", "/api/a", "webapi"),
        ("shop.example.test", "/a", "shop"),
    ];
    let got: Vec<(String, String)> = ns.enter(|| {
        let mut c = TcpStream::connect(addr("127.0.0.1")).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut out = Vec::new();
        for round in 0..3 {
            for (host, path, _) in steps {
                c.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
                    .expect("send");
                let r = read_response(&mut c).unwrap_or_else(|e| panic!("{round} {host}: {e}"));
                out.push((host.to_owned(), r.pool().unwrap_or("?").to_owned()));
            }
        }
        out
    });
    let want: Vec<(String, String)> = (0..3)
        .flat_map(|_| steps.iter().map(|(h, _, p)| (h.to_string(), p.to_string())))
        .collect();
    assert_eq!(got, want);
    // The acme route shares every host: the front end kept the connection and delivered
    // each request; no worker held it.
    let st = s.status();
    let delivered: u64 = st["pools"]
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| p["delivered"].as_u64()).sum())
        .unwrap_or(0);
    assert_eq!(delivered, want.len() as u64, "{st}");
    assert_eq!(st["dispatcher"]["handed_back"].as_u64(), Some(0), "{st}");
}

/// A random request head and the local address it is sent to.
fn random_request(rng: &mut Rng) -> (Vec<u8>, &'static str) {
    let long_label = format!("{}.tenants.test", "x".repeat(60));
    let hosts = [
        "shop.example.test",
        "SHOP.EXAMPLE.test",
        "shop.example.test.",
        "shop.example.test:8080",
        "shop.example.test:",
        "shop.example.test:99999",
        "shop.example.test:123456",
        "a.tenants.test",
        "A.Tenants.Test:1",
        "a.b.tenants.test",
        "tenants.test",
        "_x.tenants.test",
        "-.tenants.test",
        ".tenants.test",
        "a..tenants.test",
        "a.tenants..test",
        "a.tenants.test..",
        "127.0.0.1",
        "127.0.0.2:8080",
        "[::1]",
        "[::1]:8080",
        "[::ffff:127.0.0.2]",
        "other.test",
        "x",
        ".",
        "",
        LONG,
        &long_label,
        "shop example",
        "shop.example.test\t",
        "sh\u{f6}p.test",
    ];
    let segments = [
        "api",
        "cart",
        ".well-known",
        "acme-challenge",
        "x",
        "API",
        "a.b",
        "static",
        "index.html",
    ];
    // What only the dispatcher canonicalizes: now and then.
    let unsafe_segments = ["..", ".", "%61pi", ""];
    let host = rng.pick(&hosts).to_owned();
    let mut path = String::new();
    for _ in 0..=rng.next() % 3 {
        path.push('/');
        if rng.next() % 8 == 0 {
            path.push_str(rng.pick(&unsafe_segments));
        } else {
            path.push_str(rng.pick(&segments));
        }
    }
    if rng.next() % 6 == 0 {
        path = format!("/.well-known/acme-challenge{path}");
    }
    if rng.next() % 8 == 0 {
        path.push_str("?q=1");
    }
    let local = if rng.next() % 3 == 0 {
        "127.0.0.2"
    } else {
        "127.0.0.1"
    };
    let ows = if rng.next() % 10 == 0 { "\t " } else { " " };
    let name = if rng.next() % 10 == 0 { "host" } else { "Host" };
    let raw = match rng.next() % 12 {
        // Another header first: the kernel reads only a Host right after the request line.
        0 => format!(
            "GET {path} HTTP/1.1\r\nUser-Agent: t\r\n{name}:{ows}{host}\r\nConnection: close\r\n\r\n"
        ),
        // Absolute form: its authority names the host, whatever the header says.
        1 => format!(
            "GET http://{host}{path} HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n"
        ),
        // HTTP/1.0 without a Host: weak wildcard and address-bound routes only.
        2 => format!("GET {path} HTTP/1.0\r\n\r\n"),
        3 => format!("GET {path} HTTP/1.0\r\n{name}:{ows}{host}{ows}\r\n\r\n"),
        _ => format!("GET {path} HTTP/1.1\r\n{name}:{ows}{host}\r\nConnection: close\r\n\r\n"),
    };
    (raw.into_bytes(), local)
}

/// What `sluice route --local LOCAL --heads` says of each head: a pool name or a status.
fn expected(cfg: &std::path::Path, local: &str, heads: &[&[u8]]) -> Vec<String> {
    route_heads(cfg, Some(local), heads)
        .iter()
        .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_owned())
        .collect()
}

#[test]
fn kernel_and_user_space_routers_agree_on_100000_random_hosts_and_paths() {
    const N: usize = 100_000;
    let ns = Netns::new("sites-agree");
    let s = Sluice::start(&ns, &sites_config("first-segment", true));
    let cfg = s.dir.join("sluice.toml");
    let mut rng = Rng(0x5eed_0009_0000_0001);
    let requests: Vec<(Vec<u8>, &str)> = (0..N).map(|_| random_request(&mut rng)).collect();
    let mut want = vec![String::new(); N];
    for local in ["127.0.0.1", "127.0.0.2"] {
        let idx: Vec<usize> = (0..N).filter(|&i| requests[i].1 == local).collect();
        let heads: Vec<&[u8]> = idx.iter().map(|&i| requests[i].0.as_slice()).collect();
        for (i, w) in idx.iter().zip(expected(&cfg, local, &heads)) {
            want[*i] = w;
        }
    }
    let before = s.status();
    const THREADS: usize = 4;
    let mismatches: Vec<String> = ns.enter(|| {
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (requests, want) = (&requests, &want);
                    scope.spawn(move || {
                        let mut bad = Vec::new();
                        for i in (t..N).step_by(THREADS) {
                            let (raw, local) = &requests[i];
                            let got = match exchange(addr(local), raw) {
                                Ok(r) => r.pool().map_or(r.status.to_string(), str::to_owned),
                                Err(e) => format!("error {e}"),
                            };
                            if got != want[i] {
                                bad.push(format!(
                                    "{:?} on {local}: served by {got}, sluice route says {}",
                                    String::from_utf8_lossy(raw),
                                    want[i]
                                ));
                            }
                        }
                        bad
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("client thread"))
                .collect()
        })
    });
    assert!(
        mismatches.is_empty(),
        "{} of {N} disagree, first ones:\n{}",
        mismatches.len(),
        mismatches[..mismatches.len().min(20)].join("\n")
    );
    let after = s.status();
    let n = |st: &serde_json::Value, path: &[&str]| {
        path.iter().fold(st, |v, k| &v[*k]).as_u64().unwrap_or(0)
    };
    let steered = |st: &serde_json::Value| -> u64 {
        st["pools"]
            .as_array()
            .map(|ps| ps.iter().filter_map(|p| p["steered_kernel"].as_u64()).sum())
            .unwrap_or(0)
    };
    let in_kernel = steered(&after) - steered(&before);
    // A worker hands back a request that is not its pool's: a connection steered wrong and
    // answered right would show here.
    let handed_back =
        n(&after, &["dispatcher", "handed_back"]) - n(&before, &["dispatcher", "handed_back"]);
    let reasons: Vec<(String, u64)> = [
        "no_host",
        "host_too_long",
        "bad_host",
        "not_http",
        "unsafe_path",
    ]
    .iter()
    .map(|r| {
        (
            r.to_string(),
            n(&after, &["fallbacks", r]) - n(&before, &["fallbacks", r]),
        )
    })
    .collect();
    eprintln!("{N} requests: {in_kernel} steered in the kernel; fallbacks {reasons:?}");
    assert_eq!(
        handed_back, 0,
        "no connection was steered to a pool it does not route to"
    );
    assert!(
        in_kernel as usize > N / 4,
        "the kernel steered a fair share ({in_kernel})"
    );
    for (reason, count) in &reasons[..3] {
        assert!(
            *count > 100,
            "{reason}: {count}: the generator exercises each fallback"
        );
    }
}

#[test]
fn the_cache_answers_a_host_only_what_that_host_published() {
    let ns = Netns::new("sites-cache");
    let dir = std::env::temp_dir().join(format!("sluice-sites-cache-{}", std::process::id()));
    for site in ["shop", "tenants"] {
        std::fs::create_dir_all(dir.join(site)).expect("dir");
        std::fs::write(dir.join(site).join("index.html"), format!("{site}\n")).expect("file");
    }
    let pool = |name: &str| {
        format!(
            "[[pool]]\nname = \"{name}\"\ncommand = [\"{{files}}\", \"--root\", \"{}\"]\nthreads = 1\nstart = \"always\"\n\n",
            dir.join(name).display()
        )
    };
    let config = format!(
        r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "first-segment"
set_sysctls = true
admin_socket = "{{admin}}"

{}{}
[[route]]
host = "shop.example.test"
prefix = "/"
pool = "shop"

[[route]]
prefix = "/"
pool = "tenants"
"#,
        pool("shop"),
        pool("tenants")
    );
    let s = Sluice::start(&ns, &config);
    let get = |host: &str| {
        ns.enter(|| exchange(addr("127.0.0.1"), &head(host, "/index.html")))
            .expect("request")
    };
    assert_eq!(get("shop.example.test").body, b"shop\n");
    wait_for(&s, Duration::from_secs(5), "the shop entry", |st| {
        st["cache"]["entries"].as_u64() == Some(1)
    });
    // Same path, other host (routed to the other pool): never the shop's entry.
    assert_eq!(get("a.tenants.test").body, b"tenants\n");
    assert_eq!(get("SHOP.example.test:8080").body, b"shop\n");
    let st = wait_for(&s, Duration::from_secs(5), "both entries", |st| {
        st["cache"]["entries"].as_u64() == Some(2)
    });
    assert!(st["cache"]["hits"].as_u64().unwrap_or(0) >= 1, "{st}");
    for _ in 0..3 {
        assert_eq!(get("b.tenants.test").body, b"tenants\n");
        assert_eq!(get("shop.example.test").body, b"shop\n");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
