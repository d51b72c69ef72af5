//! The kernel program and the user-space router agree: every path the kernel steers reaches
//! the pool the user-space router (`sluice route`) picks for it, and every path the kernel
//! cannot prove canonical (or that has no route) goes to the dispatcher, which routes it by
//! its canonical path or refuses it.

use std::{collections::HashMap, net::SocketAddr, process::Command};

use sluice_tests::*;

const CONFIG: &str = r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "first-segment"
set_sysctls = true
admin_socket = "{admin}"

[[pool]]
name = "api"
command = ["{hello}"]
threads = 1
start = "always"

[[pool]]
name = "apiv2"
command = ["{hello}"]
threads = 1
start = "always"

[[pool]]
name = "assets"
command = ["{hello}"]
threads = 1
start = "always"

[[route]]
prefix = "/api/"
pool = "api"

[[route]]
prefix = "/api/v2/"
pool = "apiv2"

[[route]]
prefix = "/static/"
pool = "assets"

# Pools that trust each other: the kernel steers their shared host by path.
[[site]]
host = "*"
trust_pools = true
"#;

fn paths(n: usize) -> Vec<String> {
    let plain = [
        "api",
        "v2",
        "static",
        "apix",
        "v22",
        "x",
        "index.html",
        "a.b",
        "...",
        "~user",
        "v2x",
        "API",
        "-",
        "_",
        ".hidden",
        "..x",
    ];
    let nasty = [
        ".",
        "..",
        "",
        "%2e",
        "%2e%2e",
        "%2F",
        "%41pi",
        "%00",
        "%zz",
        "%",
        "a\\b",
        "ap%69",
        "é",
        "#",
        "x#/../../static",
    ];
    let first = ["api", "static", "api/v2", "apix", "x"];
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut out = vec![
        "/api".to_owned(),
        "/api/".to_owned(),
        "/api/v2".to_owned(),
        "/api/v2/".to_owned(),
        "/apix".to_owned(),
        "/api/../static/x".to_owned(),
        "/%2e%2e/".to_owned(),
        "/api%2Fx".to_owned(),
        "//api/x".to_owned(),
        "/static/./a".to_owned(),
        "/api?x=/static/".to_owned(),
        "/api/x#/../../static/".to_owned(),
        "/api#".to_owned(),
        format!("/api/{}", "a".repeat(300)),
        format!("/static/{}", "b".repeat(120)),
    ];
    while out.len() < n {
        let depth = rng.next() % 4;
        let mut p = format!("/{}", rng.pick(&first));
        for _ in 0..depth {
            p.push('/');
            let seg = if rng.next() % 5 == 0 {
                rng.pick(&nasty)
            } else {
                rng.pick(&plain)
            };
            p.push_str(seg);
        }
        if rng.next() % 5 == 0 {
            p.push('/');
        }
        if rng.next() % 7 == 0 {
            p.push_str("?q=");
            p.push_str(rng.pick(&plain));
        }
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// What the kernel program can prove canonical: visible ASCII without `%`, `\` or `#`, no
/// empty, `.` or `..` segment, ending within its 256-byte window after "GET ".
fn kernel_safe(target: &str) -> bool {
    let path = target.split('?').next().unwrap_or("");
    path.len() + 4 < 256
        && path
            .bytes()
            .all(|b| b > b' ' && b < 0x7f && b != b'%' && b != b'\\' && b != b'#')
        && !path[1..].split('/').enumerate().any(|(i, s)| {
            let last = i == path[1..].split('/').count() - 1;
            s == "." || s == ".." || (s.is_empty() && !last)
        })
}

#[test]
fn kernel_and_user_space_routers_agree_on_random_and_adversarial_paths() {
    let ns = Netns::new("agree");
    let s = Sluice::start(&ns, CONFIG);
    let targets = paths(400);
    let cfg = s.dir.join("sluice.toml");
    let out = Command::new(sluice_bin())
        .arg("route")
        .arg(&cfg)
        .args(&targets)
        .output()
        .expect("sluice route");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected: HashMap<String, String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(t, a)| {
            // `pool NAME` or `refuse STATUS REASON`: the pool's name, or the status.
            let mut words = a.split_whitespace();
            let _kind = words.next();
            (t.to_owned(), words.next().unwrap_or("").to_owned())
        })
        .collect();
    assert_eq!(
        expected.len(),
        targets.len(),
        "sluice route answered every path"
    );
    let addr: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
    let steered = |st: &serde_json::Value| -> u64 {
        st["pools"]
            .as_array()
            .map(|ps| ps.iter().filter_map(|p| p["steered_kernel"].as_u64()).sum())
            .unwrap_or(0)
    };
    let (mut in_kernel, mut in_dispatcher) = (0, 0);
    for t in &targets {
        let want = &expected[t];
        let before = steered(&s.status());
        let r = ns
            .enter(|| exchange(addr, &get_request(t)))
            .unwrap_or_else(|e| panic!("{t}: {e}"));
        let by_kernel = steered(&s.status()) > before;
        let got = match r.pool() {
            Some(p) => p.to_owned(),
            None => r.status.to_string(),
        };
        assert_eq!(
            &got, want,
            "{t}: served by {got}, the user-space router says {want} (kernel steered: {by_kernel})"
        );
        let routable = want != "400";
        assert_eq!(
            by_kernel,
            kernel_safe(t) && routable,
            "{t}: kernel steered = {by_kernel}, but kernel-safe = {}, routable = {routable}",
            kernel_safe(t)
        );
        if by_kernel {
            in_kernel += 1;
        } else {
            in_dispatcher += 1;
        }
    }
    eprintln!(
        "{} paths: {in_kernel} steered in the kernel, {in_dispatcher} through the dispatcher",
        targets.len()
    );
    assert!(
        in_kernel > 50 && in_dispatcher > 50,
        "the generator must exercise both paths"
    );
}
