//! The front end's response cache: answers without touching a worker, filled from config and
//! from workers' publications, with Date and Age, expiring, and per-request routing around it
//! on keep-alive connections.

use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    process::Command,
    time::Duration,
};

use sluice_tests::*;

fn v4() -> SocketAddr {
    "127.0.0.1:8080".parse().expect("addr")
}

fn cli(s: &Sluice, words: &[&str]) -> String {
    let out = Command::new(sluice_bin()).args(words).arg("--admin").arg(&s.admin).output().expect("sluice");
    assert!(out.status.success(), "sluice {words:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sends requests one after another on one keep-alive connection; returns the responses.
fn keep_alive(ns: &Netns, paths: &[&str]) -> Vec<Response> {
    ns.enter(|| {
        let mut c = TcpStream::connect(v4()).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        paths
            .iter()
            .map(|p| {
                c.write_all(format!("GET {p} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes()).expect("send");
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
        pool(st, "web")["workers"].as_array().is_some_and(|w| w.len() == 1 && w[0]["ready"] == true)
    });
    let before = s.status();
    let r = get_from(&ns, "/static/logo.txt");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"the logo\n");
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert!(r.header("date").is_some_and(|d| d.ends_with(" GMT")), "{r:?}");
    assert!(r.header("age").is_some(), "{r:?}");
    assert_eq!(r.pool(), None, "a worker answered a cached path");
    // Keep-alive: the cache answers, then the next request on the same connection goes to
    // its pool with the bytes already read.
    let rs = keep_alive(&ns, &["/static/logo.txt", "/page", "/static/logo.txt", "/other"]);
    // The third request reaches web's worker, which hands the connection back for the cache;
    // the fourth goes to web again.
    assert_eq!(rs.iter().map(|r| r.pool()).collect::<Vec<_>>(), [None, Some("web"), None, Some("web")], "{rs:?}");
    assert_eq!(rs[2].body, b"the logo\n");
    let st = s.status();
    assert!(st["kernel"]["cache_steered"].as_u64().unwrap_or(0) >= 2, "cached paths steered to the front end: {st}");
    assert!(st["cache"]["hits"].as_u64().unwrap_or(0) >= 3, "{st}");
    assert_eq!(st["cache"]["entries"], 1, "{st}");
    let _ = before;

    let list = cli(&s, &["cache", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&list).expect("json");
    assert_eq!(list[0]["path"], "/static/logo.txt", "{list}");
    assert_eq!(list[0]["origin"], "static", "{list}");
    assert!(cli(&s, &["cache", "purge", "/static/logo.txt"]).contains("purged 1 entry"));
    // Not cached any more: the request goes to the pool.
    assert_eq!(get_from(&ns, "/static/logo.txt").pool(), Some("web"));
    let _ = std::fs::remove_dir_all(&dir);
}

fn get_from(ns: &Netns, path: &str) -> Response {
    ns.enter(|| exchange(v4(), &get_request(path))).unwrap_or_else(|e| panic!("GET {path}: {e}"))
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
    let out = Command::new(sluice_bin()).arg("check").arg(&path).output().expect("check");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for key in ["cache.max_total_bytes", "cache.static[0].path", "cache.static[1].file"] {
        assert!(text.contains(key), "{key} missing from: {text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
