//! The differential rule: a corpus of request heads (smuggling forms, bad line endings, NUL,
//! `#`, every request-target form, foreign versions, bad hosts) sent as the first request of a
//! connection and as the second (pipelined after a valid one), in both steering modes. Every
//! answer comes from the pool `sluice route --heads` names, or is the refusal it names, from
//! whichever side read the head (the dispatcher or a worker); no head sent once is ever
//! answered twice.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    time::Duration,
};

use sluice_tests::*;

fn config(steering: &str) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "{steering}"
set_sysctls = true
admin_socket = "{{admin}}"

[[pool]]
name = "api"
command = ["{{hello}}"]
threads = 1
start = "always"

[[pool]]
name = "web"
command = ["{{hello}}"]
threads = 1
start = "always"

[[route]]
prefix = "/api/"
pool = "api"

[[route]]
prefix = "/web/"
pool = "web"
"#
    )
}

/// One request as a client sends it: the head, and the body its own framing declares.
struct Item {
    bytes: Vec<u8>,
    head_request: bool,
}

/// The corpus: every combination of a request line, a header set and a line ending style,
/// plus hand-written smuggling forms, each body framed as the head itself says.
fn corpus() -> Vec<Item> {
    let targets = [
        "/api/x",
        "/web/y",
        "/nothing",
        "/api/x#/../../web/",
        "http://x#/web/",
        "http://h/api/a",
        "HTTP://h/web/b",
        "https://h:8443/api/c",
        "ftp://h/api/x",
        "*",
        "h:443",
        "/api/../web/z",
        "//api//x",
        "/api/%zz",
        "/api%2Fx",
        "/web/%2e%2e/api/q",
        "/a?b#c",
    ];
    let lines = [
        ("GET", "HTTP/1.1"),
        ("HEAD", "HTTP/1.1"),
        ("POST", "HTTP/1.1"),
        ("GET", "HTTP/1.0"),
        ("GET", "HTTP/2.0"),
        ("get", "HTTP/1.1"),
    ];
    let hosts: [&[&str]; 7] = [
        &["Host: ok.test"],
        &[],
        &["Host: a", "Host: a"],
        &["Host: a b"],
        &["Host: a@b"],
        &["Host: [::1"],
        &["Host: x:99999"],
    ];
    let mut out = Vec::new();
    for target in targets {
        for (method, version) in lines {
            for host in hosts {
                let mut head = format!("{method} {target} {version}\r\n");
                for h in host {
                    head.push_str(h);
                    head.push_str("\r\n");
                }
                head.push_str("\r\n");
                out.push(Item {
                    bytes: head.into_bytes(),
                    head_request: method == "HEAD",
                });
            }
        }
    }
    let smuggled = "GET /web/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let framed = [
        // Content-Length forms: duplicate, conflicting, signed, empty, listed, spaced.
        format!("Content-Length: 0\r\nContent-Length: {}", smuggled.len()),
        format!("Content-Length: {0}\r\nContent-Length: {0}", smuggled.len()),
        format!("Content-Length: +{}", smuggled.len()),
        "Content-Length:".to_owned(),
        "Content-Length: 0 0".to_owned(),
        format!("Content-Length: {0}, {0}", smuggled.len()),
        format!("Content-Length: {}", smuggled.len()),
        "Content-Length: 0".to_owned(),
        format!("Content-Length : {}", smuggled.len()),
        // CL.TE and TE.CL.
        format!(
            "Content-Length: {}\r\nTransfer-Encoding: chunked",
            smuggled.len() + 5
        ),
        format!(
            "Transfer-Encoding: chunked\r\nContent-Length: {}",
            smuggled.len() + 5
        ),
        // Transfer-Encoding obfuscations.
        "Transfer-Encoding: chunked".to_owned(),
        "Transfer-Encoding: Chunked".to_owned(),
        "Transfer-Encoding:  chunked ".to_owned(),
        "Transfer-Encoding: xchunked".to_owned(),
        "Transfer-Encoding: chunked, identity".to_owned(),
        "Transfer-Encoding: identity, chunked".to_owned(),
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked".to_owned(),
        "Transfer-Encoding:\tchunked".to_owned(),
        "Transfer-Encoding\t: chunked".to_owned(),
        " Transfer-Encoding: chunked".to_owned(),
        "X: y\r\n Transfer-Encoding: chunked".to_owned(),
        "Transfer-Encoding: chunked\r\nX: \u{0}".to_owned(),
        "Expect: 100-continue\r\nContent-Length: 2".to_owned(),
        "Expect: nothing".to_owned(),
    ];
    for target in ["/api/s", "/web/s"] {
        for (method, version) in [
            ("POST", "HTTP/1.1"),
            ("GET", "HTTP/1.1"),
            ("POST", "HTTP/1.0"),
        ] {
            for f in &framed {
                let head = format!("{method} {target} {version}\r\nHost: x\r\n{f}\r\n\r\n");
                // The body the head claims: what RFC 9112 makes of it when it is valid.
                let body = if f.to_ascii_lowercase().contains("chunked") {
                    format!("{:x}\r\n{smuggled}\r\n0\r\n\r\n", smuggled.len())
                } else if f.contains("Content-Length: 2") {
                    "ok".to_owned()
                } else if f.contains(&format!("Content-Length: {}", smuggled.len()))
                    && !f.contains(',')
                {
                    smuggled.to_owned()
                } else {
                    String::new()
                };
                out.push(Item {
                    bytes: format!("{head}{body}").into_bytes(),
                    head_request: false,
                });
            }
        }
    }
    // Line endings, NUL and other protocols.
    for raw in [
        "GET /api/lf HTTP/1.1\nHost: x\n\n",
        "GET /api/lf HTTP/1.1\r\nHost: x\n\r\n",
        "GET /api/cr HTTP/1.1\rHost: x\r\n\r\n",
        "GET /api/nul\0 HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /api/x HTTP/1.1\r\nHost: x\u{0}y\r\n\r\n",
        "GET /api/x HTTP/1.1\r\nX: a\r\n b\r\nHost: x\r\n\r\n",
        "\r\nGET /api/x HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /api/\r\n",
        "GET /api/x\r\n\r\n",
        "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        "GET  /api/x HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /api/x HTTP/1.1 \r\nHost: x\r\n\r\n",
        "GET /api/x  HTTP/1.1\r\nHost: x\r\n\r\n",
        "\u{16}\u{3}\u{1}\u{2}\u{0}\u{1}\u{0}\u{1}\u{fc}\u{3}\u{3}",
    ] {
        out.push(Item {
            bytes: raw.as_bytes().to_vec(),
            head_request: false,
        });
    }
    out
}

/// What `sluice route --heads` says of every item's head.
fn verdicts(s: &Sluice, items: &[Item]) -> Vec<String> {
    let heads: Vec<&[u8]> = items.iter().map(|i| i.bytes.as_slice()).collect();
    route_heads(&s.dir.join("sluice.toml"), None, &heads)
}

/// The final responses in `raw`, in order: (status, x-sluice-pool). `head_at` is the index
/// of the response to a HEAD request (it has no body).
fn responses(raw: &[u8], head_at: Option<usize>) -> Vec<(u16, Option<String>)> {
    let mut out = Vec::new();
    let mut rest = raw;
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_owned())
            })
        };
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if (100..200).contains(&status) {
            rest = &rest[end + 4..];
            continue;
        }
        let body = if head_at == Some(out.len()) { 0 } else { len };
        out.push((status, header("x-sluice-pool")));
        rest = &rest[(end + 4 + body).min(rest.len())..];
    }
    out
}

/// Sends `bytes`, closes the sending side, and reads until the server closes.
fn exchange_all(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    // A refusal may close the connection before everything is written: that is fine.
    let _ = c.write_all(bytes);
    let _ = c.shutdown(Shutdown::Write);
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return raw,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
}

/// Checks one answer against the verdict; `None` when there may be no answer at all.
fn check(what: &str, verdict: &str, got: Option<&(u16, Option<String>)>) {
    let mut words = verdict.split_whitespace();
    match (words.next(), words.next(), got) {
        (Some("pool"), Some(pool), Some((status, from))) => {
            assert!(
                *status < 400 && from.as_deref() == Some(pool),
                "{what}: `sluice route` says pool {pool}, got {status} from {from:?}"
            );
        }
        (Some("refuse"), Some(code), Some((status, from))) => {
            assert!(
                status.to_string() == code && from.is_none(),
                "{what}: `sluice route` says {verdict}, got {status} from {from:?}"
            );
        }
        // An unfinished head at EOF: closed, or refused.
        (Some("partial"), _, None) => {}
        (Some("partial"), _, Some((status, from))) => assert!(
            *status >= 400 && from.is_none(),
            "{what}: a partial head got {status} from {from:?}"
        ),
        _ => panic!("{what}: `sluice route` says {verdict}, got {got:?}"),
    }
}

fn run_corpus(steering: &str) {
    let ns = Netns::new("diff");
    let s = Sluice::start(&ns, &config(steering));
    let items = corpus();
    assert!(items.len() >= 500, "{} heads", items.len());
    let verdicts = verdicts(&s, &items);
    let addr: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
    let first = b"GET /api/first HTTP/1.1\r\nHost: x\r\n\r\n";
    let (mut routed, mut refused) = (0, 0);
    ns.enter(|| {
        for (item, verdict) in items.iter().zip(&verdicts) {
            let shown = String::from_utf8_lossy(&item.bytes[..item.bytes.len().min(90)]);
            let head_at = item.head_request.then_some(0);
            let alone = responses(&exchange_all(addr, &item.bytes), head_at);
            assert!(alone.len() <= 1, "{steering}: {shown:?} answered {alone:?}");
            check(
                &format!("{steering}, first: {shown:?}"),
                verdict,
                alone.first(),
            );

            let mut pipelined = first.to_vec();
            pipelined.extend_from_slice(&item.bytes);
            let head_at = item.head_request.then_some(1);
            let both = responses(&exchange_all(addr, &pipelined), head_at);
            assert!(
                both.len() <= 2,
                "{steering}: {shown:?} second answered {both:?}"
            );
            assert_eq!(
                both.first().map(|r| (r.0, r.1.as_deref())),
                Some((200, Some("api"))),
                "{steering}: the request before {shown:?}"
            );
            check(
                &format!("{steering}, second: {shown:?}"),
                verdict,
                both.get(1),
            );
            if verdict.starts_with("pool") {
                routed += 1;
            } else {
                refused += 1;
            }
        }
    });
    eprintln!(
        "{steering}: {} heads, {routed} routed, {refused} refused",
        items.len()
    );
    assert!(routed > 50 && refused > 200, "the corpus exercises both");
    let st = s.status();
    assert!(
        s.pid() > 0 && st["pools"].as_array().is_some(),
        "still serving: {st}"
    );
}

#[test]
fn every_head_is_answered_once_by_the_pool_or_the_refusal_sluice_route_names_first_segment() {
    run_corpus("first-segment");
}

#[test]
fn every_head_is_answered_once_by_the_pool_or_the_refusal_sluice_route_names_syn() {
    run_corpus("syn");
}
