//! The access log: one line per request from whoever answered it (a worker, or the front end
//! for cache hits and its own refusals), with how the connection got there, in both formats.

use std::{io::Write, net::TcpStream, time::Duration};

use sluice_tests::*;

fn config(format: &str, log: &std::path::Path, static_file: &std::path::Path) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "first-segment"
set_sysctls = true
admin_socket = "{{admin}}"
access_log = "{}"
access_log_format = "{format}"

[[cache.static]]
path = "/cached.txt"
file = "{}"
content_type = "text/plain"

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
prefix = "/"
pool = "web"

# The weak site's pools trust each other: steered by path, handed back.
[[site]]
host = "*"
trust_pools = true

# A host split between the pools without trust: the front end delivers each request.
[[route]]
host = "deliv.test"
prefix = "/api/"
pool = "api"

[[route]]
host = "deliv.test"
prefix = "/"
pool = "web"
"#,
        log.display(),
        static_file.display()
    )
}

/// One line's fields, whichever the format.
#[derive(Debug, Default, Clone)]
struct Line {
    client: String,
    method: String,
    target: String,
    protocol: String,
    status: u16,
    bytes: u64,
    referer: String,
    user_agent: String,
    host: String,
    pool: String,
    pid: String,
    arrival: String,
}

fn parse_combined(l: &str) -> Line {
    // ip - - [date] "request" status bytes "referer" "user-agent" host ms pool pid arrival
    let q: Vec<&str> = l.split('"').collect();
    assert_eq!(q.len(), 7, "{l}");
    let request: Vec<&str> = q[1].split(' ').collect();
    let mid: Vec<&str> = q[2].split_whitespace().collect();
    let tail: Vec<&str> = q[6].split_whitespace().collect();
    assert_eq!(tail.len(), 5, "{l}");
    assert!(tail[1].parse::<f64>().is_ok(), "duration in ms: {l}");
    assert!(q[0].contains(" +0000] "), "{l}");
    Line {
        client: q[0].split(' ').next().unwrap_or("").to_owned(),
        method: request[0].to_owned(),
        target: request.get(1).unwrap_or(&"").to_string(),
        protocol: request.get(2).unwrap_or(&"").to_string(),
        status: mid[0].parse().expect("status"),
        bytes: mid[1].parse().expect("bytes"),
        referer: q[3].to_owned(),
        user_agent: q[5].to_owned(),
        host: tail[0].to_owned(),
        pool: tail[2].to_owned(),
        pid: tail[3].to_owned(),
        arrival: tail[4].to_owned(),
    }
}

fn parse_json(l: &str) -> Line {
    let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
    let s = |k: &str| v[k].as_str().unwrap_or("-").to_owned();
    assert!(v["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{l}");
    assert!(v["duration_ms"].as_f64().is_some(), "{l}");
    let client = s("client");
    Line {
        client: client
            .rsplit_once(':')
            .map_or(client.clone(), |(ip, _)| ip.to_owned()),
        method: s("method"),
        target: s("target"),
        protocol: s("protocol"),
        status: v["status"].as_u64().unwrap_or(0) as u16,
        bytes: v["bytes"].as_u64().unwrap_or(0),
        referer: if s("referer").is_empty() {
            "-".into()
        } else {
            s("referer")
        },
        user_agent: s("user_agent"),
        host: if s("host").is_empty() {
            "-".into()
        } else {
            s("host")
        },
        pool: s("pool"),
        pid: v["pid"].as_u64().map_or("-".into(), |p| p.to_string()),
        arrival: s("arrival"),
    }
}

fn request(path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: Shop.Test:8080\r\nUser-Agent: t-agent/1\r\nReferer: http://r/\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

fn run(format: &str) {
    let ns = Netns::new(&format!("alog-{format}"));
    let dir = std::env::temp_dir().join(format!("sluice-alog-{format}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let log = dir.join("access.log");
    let file = dir.join("cached.txt");
    std::fs::write(&file, "cached\n").expect("static");
    let s = Sluice::start(&ns, &config(format, &log, &file));
    let st = wait_for(&s, Duration::from_secs(10), "workers", |st| {
        worker_pids(st, "api").len() == 1 && worker_pids(st, "web").len() == 1
    });
    let (api_pid, web_pid) = (
        worker_pids(&st, "api")[0].to_string(),
        worker_pids(&st, "web")[0].to_string(),
    );
    let addr = v4();
    ns.enter(|| {
        // Steered in the kernel to api.
        assert_eq!(exchange(addr, &request("/api/kernel")).unwrap().status, 200);
        // A path the kernel cannot prove canonical: routed by the dispatcher.
        assert_eq!(exchange(addr, &request("/api/%64isp")).unwrap().status, 200);
        // Answered from the front end's cache.
        assert_eq!(exchange(addr, &request("/cached.txt")).unwrap().status, 200);
        // Refused by the dispatcher: a fragment.
        assert_eq!(exchange(addr, &request("/x#frag")).unwrap().status, 400);
        // Refused by the api worker: its path is steered, its head is not valid.
        let bad = b"GET /api/badlen HTTP/1.1\r\nHost: shop.test\r\nContent-Length: x\r\n\r\n";
        assert_eq!(exchange(addr, bad).unwrap().status, 400);
        // A keep-alive connection steered to api, whose next request is web's: handed back.
        let mut c = TcpStream::connect(addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        for path in ["/api/first", "/web/handback"] {
            c.write_all(format!("GET {path} HTTP/1.1\r\nHost: shop.test\r\n\r\n").as_bytes())
                .unwrap();
            assert_eq!(read_response(&mut c).unwrap().status, 200);
        }
        // A shared host: the front end keeps the connection and delivers the request.
        let delivered =
            b"GET /api/delivered HTTP/1.1\r\nHost: deliv.test\r\nConnection: close\r\n\r\n";
        assert_eq!(exchange(addr, delivered).unwrap().status, 200);
    });
    // Workers send every tick (half a second); the writer flushes when idle.
    let mut lines = Vec::new();
    for _ in 0..60 {
        std::thread::sleep(Duration::from_millis(100));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        lines = text
            .lines()
            .map(|l| match format {
                "json" => parse_json(l),
                _ => parse_combined(l),
            })
            .collect();
        if lines.len() >= 8 {
            break;
        }
    }
    let find = |target: &str| -> Line {
        let found: Vec<&Line> = lines.iter().filter(|l| l.target == target).collect();
        assert_eq!(found.len(), 1, "one line for {target} in {lines:#?}");
        found[0].clone()
    };
    assert_eq!(lines.len(), 8, "{lines:#?}");

    let k = find("/api/kernel");
    assert_eq!(
        (k.client.as_str(), k.method.as_str(), k.protocol.as_str()),
        ("127.0.0.1", "GET", "HTTP/1.1")
    );
    assert_eq!((k.status, k.host.as_str()), (200, "shop.test"));
    assert!(k.bytes > 0);
    assert_eq!(
        (k.referer.as_str(), k.user_agent.as_str()),
        ("http://r/", "t-agent/1")
    );
    assert_eq!(
        (k.pool.as_str(), k.pid.as_str(), k.arrival.as_str()),
        ("api", api_pid.as_str(), "kernel")
    );

    let d = find("/api/%64isp");
    assert_eq!(
        (d.pool.as_str(), d.pid.as_str(), d.arrival.as_str()),
        ("api", api_pid.as_str(), "dispatcher")
    );

    let c = find("/cached.txt");
    assert_eq!((c.status, c.bytes), (200, 7));
    assert_eq!(
        (c.pool.as_str(), c.pid.as_str()),
        ("web", "-"),
        "answered by the front end for web"
    );

    let r = find("/x#frag");
    assert_eq!(
        (
            r.status,
            r.pool.as_str(),
            r.pid.as_str(),
            r.arrival.as_str()
        ),
        (400, "-", "-", "dispatcher")
    );

    let w = find("/api/badlen");
    assert_eq!(
        (
            w.status,
            w.pool.as_str(),
            w.pid.as_str(),
            w.arrival.as_str()
        ),
        (400, "api", api_pid.as_str(), "kernel")
    );

    let f = find("/api/first");
    assert_eq!((f.pool.as_str(), f.arrival.as_str()), ("api", "kernel"));
    let h = find("/web/handback");
    assert_eq!(
        (h.pool.as_str(), h.pid.as_str(), h.arrival.as_str()),
        ("web", web_pid.as_str(), "handback")
    );
    let d = find("/api/delivered");
    assert_eq!(
        (
            d.client.as_str(),
            d.host.as_str(),
            d.pool.as_str(),
            d.pid.as_str(),
            d.arrival.as_str()
        ),
        (
            "127.0.0.1",
            "deliv.test",
            "api",
            api_pid.as_str(),
            "delivered"
        ),
        "the worker learns the client's address from the delivery channel"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_request_gets_one_combined_line_from_whoever_answered_it() {
    run("combined");
}

#[test]
fn every_request_gets_one_json_line_from_whoever_answered_it() {
    run("json");
}
