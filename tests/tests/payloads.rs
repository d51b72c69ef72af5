//! Request bodies arrive intact whichever way the connection was routed.

use std::net::SocketAddr;

use sluice_tests::*;

fn template(steering: &str) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:8080"]
steering = "{steering}"
set_sysctls = true
admin_socket = "{{admin}}"

[[pool]]
name = "echo"
command = ["{{echo}}"]
threads = 1

[[route]]
prefix = "/echo/"
pool = "echo"
"#
    )
}

fn payload(len: usize) -> Vec<u8> {
    let mut x = 0x2545f4914f6cdd1du64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn post_4mb(steering: &str) {
    let ns = Netns::new("post");
    let s = Sluice::start(&ns, &template(steering));
    let body = payload(4 << 20);
    let addr: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
    let r = ns.enter(|| {
        let mut req = format!(
            "POST /echo/upload HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        exchange(addr, &req).expect("POST")
    });
    assert_eq!(r.status, 200);
    assert_eq!(r.pool(), Some("echo"));
    assert_eq!(r.body.len(), body.len());
    assert_eq!(
        sha_like(&r.body),
        sha_like(&body),
        "the echoed body differs"
    );
    let st = s.status();
    let p = pool(&st, "echo");
    let routed = p["steered_kernel"].as_u64().unwrap_or(0) + p["handed_off"].as_u64().unwrap_or(0);
    assert_eq!(routed, 1, "{st}");
    if steering == "first-segment" {
        assert_eq!(p["steered_kernel"], 1, "{st}");
    } else {
        assert_eq!(p["handed_off"], 1, "{st}");
    }
}

#[test]
fn post_of_4mb_arrives_intact_when_steered_in_the_kernel() {
    post_4mb("first-segment");
}

#[test]
fn post_of_4mb_arrives_intact_through_the_dispatcher_handoff() {
    post_4mb("syn");
}
