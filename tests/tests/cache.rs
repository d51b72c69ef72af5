//! The front end's response cache: answers without touching a worker, filled from config and
//! from workers' publications, with Date and Age, expiring, and per-request routing around it
//! on keep-alive connections.

use std::{io::Write, net::TcpStream, process::Command, time::Duration};

use sluice_tests::*;

/// Sends requests one after another on one keep-alive connection, naming the host
/// `get_request` names (the cache keys by host); returns the responses.
fn keep_alive(ns: &Netns, paths: &[&str]) -> Vec<Response> {
    ns.enter(|| {
        let mut c = TcpStream::connect(v4()).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        paths
            .iter()
            .map(|p| {
                c.write_all(format!("GET {p} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
                    .expect("send");
                read_response(&mut c).unwrap_or_else(|e| panic!("{p}: {e}"))
            })
            .collect()
    })
}

#[test]
fn static_entries_are_answered_by_the_front_end_with_date_and_age() {
    let ns = Netns::new("cstatic");
    let dir = std::env::temp_dir().join(format!("sluice-static-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("logo.txt");
    std::fs::write(&file, "the logo\n").expect("file");
    let s = Sluice::start(
        &ns,
        &format!(
            r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "first-segment"
set_sysctls = true
admin_socket = "{{admin}}"

[[cache.static]]
path = "/static/logo.txt"
file = "{}"
content_type = "text/plain"
ttl = "1h"

[[pool]]
name = "web"
command = ["{{hello}}"]
threads = 1
start = "always"

[[route]]
prefix = "/"
pool = "web"
"#,
            file.display()
        ),
    );
    wait_for(&s, Duration::from_secs(10), "a ready worker", |st| {
        pool(st, "web")["workers"]
            .as_array()
            .is_some_and(|w| w.len() == 1 && w[0]["ready"] == true)
    });
    let before = s.status();
    let r = get_in(&ns, "/static/logo.txt");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"the logo\n");
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert!(
        r.header("date").is_some_and(|d| d.ends_with(" GMT")),
        "{r:?}"
    );
    assert!(r.header("age").is_some(), "{r:?}");
    assert_eq!(r.pool(), None, "a worker answered a cached path");
    // Keep-alive: the cache answers, then the next request on the same connection goes to
    // its pool with the bytes already read.
    let rs = keep_alive(
        &ns,
        &["/static/logo.txt", "/page", "/static/logo.txt", "/other"],
    );
    // The third request reaches web's worker, which hands the connection back for the cache;
    // the fourth goes to web again.
    assert_eq!(
        rs.iter().map(|r| r.pool()).collect::<Vec<_>>(),
        [None, Some("web"), None, Some("web")],
        "{rs:?}"
    );
    assert_eq!(rs[2].body, b"the logo\n");
    let st = s.status();
    assert!(
        st["kernel"]["cache_steered"].as_u64().unwrap_or(0) >= 2,
        "cached paths steered to the front end: {st}"
    );
    assert!(st["cache"]["hits"].as_u64().unwrap_or(0) >= 3, "{st}");
    assert_eq!(st["cache"]["entries"], 1, "{st}");
    let _ = before;

    let list = sluice_admin(&s, &["cache", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&list).expect("json");
    assert_eq!(list[0]["path"], "/static/logo.txt", "{list}");
    assert_eq!(list[0]["origin"], "static", "{list}");
    assert!(sluice_admin(&s, &["cache", "purge", "/static/logo.txt"]).contains("purged 1 entry"));
    // Not cached any more: the request goes to the pool.
    assert_eq!(get_in(&ns, "/static/logo.txt").pool(), Some("web"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_static_entries_name_their_key() {
    let dir = std::env::temp_dir().join(format!("sluice-badstatic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("c.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = [\"127.0.0.1:80\"]\n[cache]\nmax_total_bytes = \"lots\"\n[[cache.static]]\npath = \"/a/../b\"\nfile = \"/nonexistent\"\n[[cache.static]]\npath = \"/c\"\nfile = \"/nonexistent\"\n",
    )
    .expect("write");
    let out = Command::new(sluice_bin())
        .arg("check")
        .arg(&path)
        .output()
        .expect("check");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for key in [
        "cache.max_total_bytes",
        "cache.static[0].path",
        "cache.static[1].file",
    ] {
        assert!(text.contains(key), "{key} missing from: {text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn files_config(root: &std::path::Path) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "first-segment"
set_sysctls = true
admin_socket = "{{admin}}"

[[pool]]
name = "files"
command = ["{{files}}", "--root", "{}", "--cache-control", "public, max-age=5"]
threads = 1
start = "always"

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
prefix = "/files/"
pool = "files"

[[route]]
prefix = "/api/"
pool = "api"

[[route]]
prefix = "/"
pool = "web"
"#,
        root.display()
    )
}

fn files_root(tag: &str) -> std::path::PathBuf {
    let root = std::env::temp_dir().join(format!("sluice-files-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(root.join("files")).expect("dir");
    std::fs::write(root.join("files/index.html"), "<h1>cached page</h1>\n").expect("file");
    root
}

fn ready(s: &Sluice) {
    wait_for(s, Duration::from_secs(10), "ready workers", |st| {
        st["pools"].as_array().is_some_and(|ps| {
            ps.iter().all(|p| {
                p["workers"]
                    .as_array()
                    .is_some_and(|w| w.len() == 1 && w[0]["ready"] == true)
            })
        })
    });
}

#[test]
fn a_published_response_is_served_from_the_cache_until_its_ttl_ends() {
    let ns = Netns::new("cpub");
    let root = files_root("pub");
    let s = Sluice::start(&ns, &files_config(&root));
    ready(&s);
    let first = get_in(&ns, "/files/index.html");
    assert_eq!((first.status, first.pool()), (200, Some("files")));
    assert_eq!(
        first.header("age"),
        None,
        "the first answer comes from the worker"
    );
    wait_for(&s, Duration::from_secs(5), "the publication", |st| {
        st["cache"]["entries"] == 1
    });
    let stored = std::time::Instant::now();
    let load = wrk(
        &ns,
        &[
            "-t1",
            "-c10",
            "-d2s",
            // The host the entry was published for: the cache keys by host.
            "-H",
            "Host: test",
            "http://127.0.0.1:8080/files/index.html",
        ],
    );
    assert_eq!(
        (load.non_2xx, load.socket_errors),
        (0, 0),
        "{}",
        load.output
    );
    std::thread::sleep(Duration::from_millis(1200));
    let r = get_in(&ns, "/files/index.html");
    assert_eq!(r.body, b"<h1>cached page</h1>\n");
    let age: u64 = r
        .header("age")
        .expect("a cached answer has an Age")
        .parse()
        .expect("age");
    assert!(age >= 2, "Age {age} did not grow");
    let st = s.status();
    // While wrk hammered the path, the worker's request count stood still.
    assert!(
        requests(&st, "files") <= 2,
        "the worker answered {} requests: {st}",
        requests(&st, "files")
    );
    assert!(
        st["cache"]["hits"].as_u64().unwrap_or(0) >= load.requests,
        "{st}"
    );
    // After its 5 s the worker is asked again (and publishes again).
    std::thread::sleep(
        (stored + Duration::from_millis(5500)).saturating_duration_since(std::time::Instant::now()),
    );
    let again = get_in(&ns, "/files/index.html");
    assert_eq!(
        again.header("age"),
        None,
        "expired entries are not served: {again:?}"
    );
    wait_for(
        &s,
        Duration::from_secs(5),
        "the worker's second answer",
        |st| requests(st, "files") >= 2,
    );
    let _ = std::fs::remove_dir_all(&root);
}

fn requests(st: &serde_json::Value, name: &str) -> u64 {
    pool(st, name)["requests"].as_u64().unwrap_or(0)
}

#[test]
fn a_keep_alive_connection_gets_each_request_from_the_right_place() {
    let ns = Netns::new("cmix");
    let root = files_root("mix");
    let s = Sluice::start(&ns, &files_config(&root));
    ready(&s);
    get_in(&ns, "/files/index.html");
    wait_for(&s, Duration::from_secs(5), "the publication", |st| {
        st["cache"]["entries"] == 1
    });
    for first in ["/api/x", "/", "/files/index.html"] {
        let rs = keep_alive(
            &ns,
            &[
                first,
                "/api/x",
                "/",
                "/files/index.html",
                "/api/y",
                "/files/missing.txt",
                "/web/z",
            ],
        );
        let got: Vec<(Option<&str>, bool)> = rs
            .iter()
            .map(|r| (r.pool(), r.header("age").is_some()))
            .collect();
        assert_eq!(
            &got[1..],
            [
                (Some("api"), false),
                (Some("web"), false),
                (Some("files"), true),
                (Some("api"), false),
                (Some("files"), false),
                (Some("web"), false),
            ],
            "starting with {first}: {rs:?}"
        );
        assert_eq!(rs[5].status, 404);
    }
    // The host is shared by three pools: the front end kept every connection, answered the
    // cached path itself and delivered the rest; no pool held a connection to hand back.
    let st = s.status();
    assert!(
        st["delivery"]["cache_answers"].as_u64().unwrap_or(0) >= 3,
        "{st}"
    );
    assert_eq!(st["dispatcher"]["handed_back"].as_u64(), Some(0), "{st}");
    let _ = std::fs::remove_dir_all(&root);
}

/// Sends `bytes`, closes the sending side, and returns everything until the server closes.
fn send_all(ns: &Netns, bytes: &[u8]) -> Vec<u8> {
    ns.enter(|| {
        use std::io::Read;
        let mut c = TcpStream::connect(v4()).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        c.write_all(bytes).expect("send");
        c.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        out
    })
}

#[test]
fn smuggling_forms_on_the_cache_path_get_one_400_and_nothing_else() {
    let ns = Netns::new("csmug");
    let root = files_root("smug");
    let s = Sluice::start(&ns, &files_config(&root));
    ready(&s);
    let first = get_in(&ns, "/files/index.html");
    assert_eq!(first.pool(), Some("files"));
    wait_for(&s, Duration::from_secs(5), "the publication", |st| {
        st["cache"]["entries"] == 1
    });
    let smuggled = "GET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    for framing in [
        format!("Content-Length: 0\r\nContent-Length: {}", smuggled.len()),
        "Content-Length:".to_owned(),
        "Content-Length: 0 0".to_owned(),
        format!(
            "Content-Length: {}\r\nTransfer-Encoding: chunked",
            smuggled.len()
        ),
    ] {
        let raw =
            format!("GET /files/index.html HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n{smuggled}");
        let out = String::from_utf8_lossy(&send_all(&ns, raw.as_bytes())).into_owned();
        assert!(out.starts_with("HTTP/1.1 400 "), "{framing:?}: {out}");
        assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{framing:?}: {out}");
        assert!(!out.contains("x-sluice-pool"), "{framing:?}: {out}");
    }
    // A cached path over HTTP/1.1 without Host is refused by the cache as by the workers.
    let out = String::from_utf8_lossy(&send_all(&ns, b"GET /files/index.html HTTP/1.1\r\n\r\n"))
        .into_owned();
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn an_expired_entry_bounces_no_request_between_the_front_end_and_its_pool() {
    let ns = Netns::new("cbounce");
    let root = files_root("bounce");
    let s = Sluice::start(
        &ns,
        &files_config(&root).replace("public, max-age=5", "public, max-age=1"),
    );
    ready(&s);
    // The connection is the files pool's from its first request on (a 404, not cached).
    let answers = ns.enter(|| {
        let mut c = TcpStream::connect(v4()).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut ask = |path: &str| {
            c.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
                .expect("send");
            read_response(&mut c).unwrap_or_else(|e| panic!("{path}: {e}"))
        };
        assert_eq!(ask("/files/missing").status, 404);
        let until = std::time::Instant::now() + Duration::from_secs(4);
        let mut n = 0u64;
        while std::time::Instant::now() < until {
            let r = ask("/files/index.html");
            assert_eq!(r.body, b"<h1>cached page</h1>\n");
            n += 1;
        }
        n
    });
    let st = s.status();
    let handed_back = st["dispatcher"]["handed_back"].as_u64().unwrap_or(0);
    eprintln!("{answers} answers, {handed_back} hand-backs");
    assert!(answers > 100, "{answers}");
    // Each request is handed back at most once (to reach the cache); none bounces.
    assert!(
        handed_back <= answers,
        "{handed_back} hand-backs for {answers} answers: {st}"
    );
    let _ = std::fs::remove_dir_all(&root);
}
