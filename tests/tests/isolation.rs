//! Pool isolation: a request is answered only by the pool it routes to, from the first
//! request after a cold start on; a pool cannot put anything in the cache for another pool's
//! paths, nor crash the front end with what it sends; workers run with no privilege, a uid of
//! their pool's own and none of the front end's environment.

use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use sluice_tests::*;

fn three_pools(steering: &str, static_file: &std::path::Path) -> String {
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
threads = 2

[[pool]]
name = "admin"
command = ["{{hello}}"]
threads = 2

[[pool]]
name = "web"
command = ["{{hello}}"]
threads = 1

[[route]]
prefix = "/api/"
pool = "api"

[[route]]
prefix = "/admin/"
pool = "admin"

[[route]]
prefix = "/"
pool = "web"

[[cache.static]]
path = "/api/cached.txt"
file = "{}"
content_type = "text/plain"
"#,
        static_file.display()
    )
}

/// One keep-alive connection, requests one after the other: (path, expected pool; None for
/// the front end's cache).
fn alternate(addr: SocketAddr, steps: &[(&str, Option<&str>)]) -> Result<(), String> {
    let mut c =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    for (path, want) in steps {
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
        c.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        let r = read_response(&mut c).map_err(|e| format!("{path}: {e}"))?;
        if r.status != 200 || r.pool() != *want {
            return Err(format!(
                "{path}: {} from {:?}, wanted {want:?}",
                r.status,
                r.pool()
            ));
        }
    }
    Ok(())
}

#[test]
fn two_hundred_cold_starts_never_answer_from_the_wrong_pool() {
    let ns = Netns::new("cold");
    let dir = std::env::temp_dir().join(format!("sluice-cold-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("cached.txt");
    std::fs::write(&file, "cached\n").expect("static file");
    let steps = [
        ("/api/a", Some("api")),
        ("/admin/b", Some("admin")),
        ("/api/cached.txt", None),
        ("/c", Some("web")),
        ("/admin/d", Some("admin")),
        ("/api/e", Some("api")),
    ];
    let addr: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
    let started = Instant::now();
    let mut wrong = Vec::new();
    for i in 0..200 {
        let steering = if i % 2 == 0 { "syn" } else { "first-segment" };
        let mut s = Sluice::start(&ns, &three_pools(steering, &file));
        // On-demand pools: the first request of each starts its workers.
        if let Err(e) = ns.enter(|| alternate(addr, &steps)) {
            wrong.push(format!("start {i} ({steering}): {e}"));
        }
        s.stop();
    }
    eprintln!("200 cold starts in {:?}", started.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        wrong.is_empty(),
        "{} wrong answer(s):\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// The hostile worker script (`cargo xtask test` says where, for a checkout other users cannot
/// reach).
fn rogue() -> PathBuf {
    workers_dir().join("rogue.py")
}

const ROGUE: &str = r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "{steering}"
set_sysctls = true
admin_socket = "{admin}"

[[pool]]
name = "api"
command = ["/usr/bin/python3", "{rogue}"]
start = "always"
ping_interval = "0"
rapid_fail = { failures = 0 }

[[pool]]
name = "admin"
command = ["{hello}"]
threads = 1
start = "always"

[[route]]
prefix = "/api/"
pool = "api"

[[route]]
prefix = "/admin/"
pool = "admin"
"#;

fn cached_paths(s: &Sluice) -> Vec<String> {
    let list: serde_json::Value =
        serde_json::from_str(&sluice_admin(s, &["cache", "list", "--json"])).expect("json");
    list.as_array()
        .map(|l| {
            l.iter()
                .filter_map(|e| e["path"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn wait_log(s: &Sluice, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.log_text().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log:\n{}",
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_pool_cannot_publish_for_another_pool_or_after_it_is_recycled_nor_crash_the_front_end() {
    for steering in ["first-segment", "syn"] {
        let ns = Netns::new("rogue");
        let template = ROGUE
            .replace("{steering}", steering)
            .replace("{rogue}", &rogue().display().to_string());
        let s = Sluice::start(&ns, &template);
        wait_log(&s, "refused a publication of /admin/forged from worker");
        // Its own pool socket gives it no hold on the group's steering program.
        wait_log(&s, "rogue: reuseport attach: rc=-1 errno=1");
        wait_log(&s, "rogue: reuseport detach: rc=-1 errno=1");
        wait_log(&s, "control: dropped a message");
        wait_log(&s, "handoff channel");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cached_paths(&s).contains(&"/api/legit".to_owned()) {
            assert!(Instant::now() < deadline, "its own path was not stored");
            std::thread::sleep(Duration::from_millis(50));
        }
        // 4200 entries that expire within a second: the kernel's set overflows, then they go.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let paths = cached_paths(&s);
            if paths == ["/api/legit"] {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{steering}: {} entries left",
                paths.len()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // The forged path is answered by its own pool.
        for path in ["/admin/forged", "/admin/forged2"] {
            let r = get_in(&ns, path);
            assert_eq!(
                r.pool(),
                Some("admin"),
                "{steering}: {path} from {:?}",
                r.pool()
            );
        }
        // Recycled away: what the old worker publishes while it retires is not stored.
        sluice_admin(&s, &["pool", "recycle", "api"]);
        wait_log(&s, "refused a publication of /api/after-retire from worker");
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !cached_paths(&s).contains(&"/api/after-retire".to_owned()),
            "{steering}: stored a retiring worker's publication"
        );
        assert_eq!(
            get_in(&ns, "/admin/x").pool(),
            Some("admin"),
            "still serving"
        );
        assert!(s.log_text().matches("refused a publication").count() >= 3);
    }
}

fn proc_field(pid: i32, file: &str, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).expect("proc");
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/{file}"))
}

const TWO_POOLS_NO_USER: &str = r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "syn"
admin_socket = "{admin}"

[[pool]]
name = "one"
command = ["{hello}"]
threads = 1
start = "always"
env = { GREETING = "hello" }

[[pool]]
name = "two"
command = ["{hello}"]
threads = 1
start = "always"

[[route]]
prefix = "/one/"
pool = "one"

[[route]]
prefix = "/"
pool = "two"
"#;

#[test]
fn workers_of_pools_without_a_user_have_no_privilege_a_uid_each_and_none_of_the_front_ends_environment()
 {
    let ns = Netns::new("ident");
    let s = Sluice::start_env(&ns, TWO_POOLS_NO_USER, &[("SLUICE_TEST_SECRET", "hunter2")]);
    let st = wait_for(&s, Duration::from_secs(10), "both pools running", |st| {
        worker_pids(st, "one").len() == 1 && worker_pids(st, "two").len() == 1
    });
    let mut uids = Vec::new();
    for pool in ["one", "two"] {
        let pid = worker_pids(&st, pool)[0];
        let uid = proc_field(pid, "status", "Uid:");
        let real: u32 = uid.split_whitespace().next().unwrap().parse().unwrap();
        assert!(
            uid.split_whitespace().all(|u| u == real.to_string()),
            "{pool}: {uid}"
        );
        assert!((61184..=65519).contains(&real), "{pool} runs as {real}");
        uids.push(real);
        for key in ["CapEff:", "CapPrm:", "CapBnd:", "CapAmb:"] {
            assert_eq!(
                proc_field(pid, "status", key),
                "0000000000000000",
                "{pool} {key}"
            );
        }
        assert_eq!(proc_field(pid, "status", "NoNewPrivs:"), "1", "{pool}");
        let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
        let vars: Vec<String> = environ
            .split(|&b| b == 0)
            .filter(|v| !v.is_empty())
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        assert!(
            !vars
                .iter()
                .any(|v| v.contains("hunter2") || v.starts_with("RUST_LOG=")),
            "{pool} sees the front end's environment: {vars:?}"
        );
        assert!(
            vars.iter().all(|v| {
                v.starts_with("SLUICE_")
                    || v.starts_with("LISTEN_")
                    || v.starts_with("PATH=")
                    || v == "GREETING=hello"
            }),
            "{pool}: {vars:?}"
        );
        assert_eq!(vars.iter().any(|v| v == "GREETING=hello"), pool == "one");
    }
    assert_ne!(uids[0], uids[1], "two pools share a uid");
    // And they serve.
    assert_eq!(get_in(&ns, "/one/x").pool(), Some("one"));
    assert_eq!(get_in(&ns, "/x").pool(), Some("two"));
}

#[test]
fn a_second_front_end_on_the_same_address_is_refused_and_a_foreign_listener_takes_nothing() {
    let ns = Netns::new("hijack");
    let s = Sluice::start(&ns, &one_pool("\"{hello}\"", "start = \"always\""));
    let mut second = Sluice::spawn(&ns, &one_pool("\"{hello}\"", ""));
    let code = second.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(1), "the second front end must refuse to start");
    assert!(
        second
            .log_text()
            .contains("127.0.0.1:8080 already has a listener"),
        "{}",
        second.log_text()
    );
    assert_eq!(
        get_in(&ns, "/x").pool(),
        Some("api"),
        "the first still serves"
    );

    // A root process that joins the group with SO_REUSEPORT takes no connection, and when it
    // goes the first front end still serves.
    let foreign = ns.enter(|| {
        // SAFETY: plain socket(2); closed at the end of the test.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        let one: libc::c_int = 1;
        // SAFETY: setsockopt/bind/listen on the fd just made, with live arguments.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEPORT,
                (&raw const one).cast(),
                4,
            );
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&raw const one).cast(),
                4,
            );
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 8080u16.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
                },
                sin_zero: [0; 8],
            };
            assert_eq!(
                libc::bind(fd, (&raw const sin).cast(), size_of_val(&sin) as u32),
                0,
                "{}",
                std::io::Error::last_os_error()
            );
            assert_eq!(libc::listen(fd, 16), 0);
        }
        fd
    });
    wait_for(
        &s,
        Duration::from_secs(15),
        "the foreign listener noticed",
        |st| st["foreign_listeners"].as_u64() == Some(1),
    );
    for i in 0..20 {
        let r = get_in(&ns, &format!("/during/{i}"));
        assert_eq!(
            r.pool(),
            Some("api"),
            "request {i} during the foreign listener"
        );
    }
    // SAFETY: closing the socket made above.
    unsafe { libc::close(foreign) };
    for i in 0..20 {
        assert_eq!(get_in(&ns, &format!("/after/{i}")).pool(), Some("api"));
    }
}

#[test]
fn an_admin_socket_path_that_names_a_regular_file_is_refused_and_the_file_kept() {
    let ns = Netns::new("admfile");
    let dir = std::env::temp_dir().join(format!("sluice-admfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let precious = dir.join("precious.txt");
    std::fs::write(&precious, "keep me").expect("file");
    let template = one_pool("\"{hello}\"", "").replace("{admin}", &precious.display().to_string());
    let mut s = Sluice::spawn(&ns, &template);
    assert_eq!(s.wait_exit(Duration::from_secs(20)), Some(1));
    assert!(s.log_text().contains("is not a socket"), "{}", s.log_text());
    assert_eq!(std::fs::read_to_string(&precious).expect("kept"), "keep me");
    let _ = std::fs::remove_dir_all(&dir);
}
