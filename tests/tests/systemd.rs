//! Running under systemd: a `Type=notify` unit learns from sluice when it serves, reloads and
//! stops, over the notify socket systemd names in `NOTIFY_SOCKET`, as systemd itself reads it.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::net::UnixDatagram,
    },
    process::Command,
    time::Duration,
};

use sluice_tests::{certs::*, *};

/// The next state change (fd-store messages, which come with fds, are skipped here).
fn next(socket: &UnixDatagram) -> String {
    loop {
        let (text, _) = recv_with_fds(socket);
        if !text.starts_with("FDSTORE=1") {
            return text;
        }
    }
}

/// One notification and the fds that came with it, as systemd reads them.
fn recv_with_fds(socket: &UnixDatagram) -> (String, Vec<OwnedFd>) {
    let mut buf = [0u8; 4096];
    let mut control = [0u64; 512];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: recvmsg into live buffers of the sizes given.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    assert!(
        n >= 0,
        "a notification within 30 s: {}",
        std::io::Error::last_os_error()
    );
    let mut fds = Vec::new();
    // SAFETY: walks the control messages recvmsg wrote, within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<i32>();
                let count = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    (
        String::from_utf8_lossy(&buf[..n as usize]).into_owned(),
        fds,
    )
}

/// 40 connections to `two_pools`' port, each with its request sent, half for `api` and half
/// for `web`: made while no front end runs, they wait in the kernel. Each comes with the pool
/// that must answer it.
fn connect_while_down(ns: &Netns) -> Vec<(TcpStream, &'static str)> {
    let a: SocketAddr = ([127, 0, 0, 1], 8080).into();
    ns.enter(|| {
        (0..40)
            .map(|i| {
                let (path, pool) = if i % 2 == 0 {
                    ("/api/w", "api")
                } else {
                    ("/w", "web")
                };
                let mut c = TcpStream::connect_timeout(&a, Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("connect while down: {e}"));
                c.write_all(&get_request(path)).expect("request");
                c.set_read_timeout(Some(Duration::from_secs(30)))
                    .expect("timeout");
                (c, pool)
            })
            .collect()
    })
}

fn notify_socket(tag: &str) -> (UnixDatagram, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!("sluice-{tag}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let socket = UnixDatagram::bind(&path).expect("notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    (socket, path)
}

#[test]
fn a_notify_unit_hears_ready_reloading_and_stopping() {
    let ns = Netns::new("notify");
    let (socket, path) = notify_socket("notify");
    let notify = path.display().to_string();
    let mut s = Sluice::start_env(
        &ns,
        &one_pool("\"{hello}\"", "start = \"always\""),
        &[("NOTIFY_SOCKET", notify.as_str())],
    );
    let ready = next(&socket);
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    assert!(
        ready.contains("STATUS=serving 127.0.0.1:8080 with 1 pool(s)"),
        "{ready}"
    );
    // Ready means serving: a request is answered at once.
    assert_eq!(get_in(&ns, "/x").pool(), Some("api"));

    sluice_admin(&s, &["reload"]);
    let reloading = next(&socket);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert!(next(&socket).starts_with("READY=1\n"));

    s.stop();
    let stopping = next(&socket);
    assert!(stopping.starts_with("STOPPING=1\n"), "{stopping}");
    let _ = std::fs::remove_file(&path);
}

/// TLS clients that sent their ClientHello while no front end ran: they wait in the TLS
/// listener's queue.
fn hello_while_down(ns: &Netns, certs: &Certs) -> Vec<TlsStream> {
    let config = client_config(certs, None);
    ns.enter(|| {
        (0..10)
            .map(|_| {
                let name = rustls::pki_types::ServerName::try_from(SHOP).unwrap();
                let mut c = rustls::ClientConnection::new(config.clone(), name).unwrap();
                let mut t = TcpStream::connect("127.0.0.1:8443").expect("connect while down");
                t.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                c.write_tls(&mut t).expect("ClientHello");
                rustls::StreamOwned::new(c, t)
            })
            .collect()
    })
}

/// What systemd does for a unit with `FileDescriptorStoreMax=`: it keeps the sockets sluice
/// gives it, and when the front end dies (kill -9, its workers with it) starts it again with
/// them. Connections that arrived while nothing ran wait in those queues and are answered,
/// plain and TLS.
#[test]
fn a_front_end_killed_with_sigkill_gets_its_queues_back_from_the_fd_store() {
    for steering in ["first-segment", "syn"] {
        let ns = Netns::new("fdstore");
        let (socket, path) = notify_socket("fdstore");
        let notify = path.display().to_string();
        let env = [("NOTIFY_SOCKET", notify.as_str())];
        let certs = Certs::make(&temp_dir("fdstore"));
        let template = certs.two_pools(steering);
        // Read as sluice sends, as systemd does: more datagrams than the socket queues
        // (net.unix.max_dgram_qlen, 10 here) would block the sender.
        let (mut first, stored) = std::thread::scope(|scope| {
            let store = scope.spawn(|| {
                let mut stored: Vec<(String, OwnedFd)> = Vec::new();
                loop {
                    let (text, fds) = recv_with_fds(&socket);
                    if text.starts_with("READY=1") {
                        return stored;
                    }
                    if let Some(name) = text
                        .strip_prefix("FDSTORE=1\nFDNAME=")
                        .and_then(|t| t.lines().next())
                    {
                        assert!(!fds.is_empty(), "{text} without fds");
                        stored.extend(fds.into_iter().map(|f| (name.to_owned(), f)));
                    }
                }
            });
            let first = Sluice::start_env(&ns, &template, &env);
            (first, store.join().expect("the fd store"))
        });
        let names: Vec<&str> = stored.iter().map(|(n, _)| n.as_str()).collect();
        for want in [
            "dispatch",
            "tls",
            "pool.api",
            "pool.web",
            "handoff.api",
            "handoff-workers.web",
        ] {
            assert!(
                names.contains(&want),
                "{steering}: {want} not stored: {names:?}"
            );
        }
        let st = wait_for(&first, Duration::from_secs(10), "ready workers", |st| {
            worker_pids(st, "api").len() == 2 && worker_pids(st, "web").len() == 1
        });
        let workers: Vec<i32> = ["api", "web"]
            .iter()
            .flat_map(|p| worker_pids(&st, p))
            .collect();

        // SAFETY: signalling the process this test started.
        unsafe { libc::kill(first.pid() as i32, libc::SIGKILL) };
        assert_eq!(
            first.wait_exit(Duration::from_secs(10)),
            None,
            "killed, no exit code"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while workers
            .iter()
            .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
        {
            assert!(
                std::time::Instant::now() < deadline,
                "workers outlived the front end"
            );
            std::thread::sleep(Duration::from_millis(50));
        }

        // Nothing runs now; these wait in the kernel, in the sockets systemd holds.
        let waiting = connect_while_down(&ns);
        let hellos = hello_while_down(&ns, &certs);

        // The second run gives its sockets to the store too: read and dropped.
        let drain = socket.try_clone().expect("notify socket");
        std::thread::spawn(move || while drain.recv(&mut [0u8; 4096]).is_ok() {});
        let second = Sluice::start_inheriting(&ns, &template, &env, &stored);
        for (i, (mut c, pool)) in waiting.into_iter().enumerate() {
            let r = read_response(&mut c)
                .unwrap_or_else(|e| panic!("{steering}: connection {i} waited in vain: {e}"));
            assert_eq!(r.status, 200, "{steering}: connection {i}");
            assert_eq!(r.pool(), Some(pool), "{steering}: connection {i}");
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest);
        }
        for (i, mut t) in hellos.into_iter().enumerate() {
            t.write_all(format!("GET /api/t HTTP/1.1\r\nHost: {SHOP}\r\n\r\n").as_bytes())
                .expect("request over TLS");
            t.flush().expect("flush");
            let r = read_response(&mut t)
                .unwrap_or_else(|e| panic!("{steering}: TLS connection {i} waited in vain: {e}"));
            assert_eq!(
                (r.status, r.pool()),
                (200, Some("api")),
                "{steering}: TLS {i}"
            );
        }
        let st = second.status();
        assert_eq!(
            st["inherited_sockets"],
            stored.len() as u64,
            "{steering}: every stored socket taken: {st}"
        );
        assert!(
            second.log_text().contains("from systemd's fd store"),
            "{}",
            second.log_text()
        );
        drop(second);
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_dir_all(&certs.dir);
    }
}

/// The real systemd of this machine as PID 1 of a PID namespace of the test's own (private
/// mounts, `/` read-only inside, its own cgroup), running the shipped unit.
struct Systemd {
    launcher: std::process::Child,
    /// systemd's pid as this test sees it.
    pid: u32,
    cgroup: std::path::PathBuf,
}

impl Systemd {
    fn start(ns: &Netns, dir: &std::path::Path, target: &str) -> Systemd {
        let cgroup = std::path::PathBuf::from("/sys/fs/cgroup/unified").join(&ns.name);
        let inner = dir.join("inner.sh");
        let d = dir.display();
        std::fs::write(
            &inner,
            format!(
                "set -e\n\
                 mount --bind {d} {d}\n\
                 mount -o remount,bind,ro /\n\
                 mount --bind /proc/sys /proc/sys\n\
                 mount -o remount,bind,ro /proc/sys\n\
                 mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
                 mount -t tmpfs -o mode=755 tmpfs /run\n\
                 hostname sluice-test\n\
                 mkdir -p /run/host && echo unshare > /run/host/container-manager\n\
                 exec env -i container=unshare PATH=/usr/sbin:/usr/bin:/sbin:/bin \
                 SYSTEMD_UNIT_PATH={d}/units: /lib/systemd/systemd --unit={target} \
                 --log-target=console --show-status=no\n"
            ),
        )
        .expect("inner.sh");
        // The cgroup first (systemd takes the one it starts in as its root), then the
        // namespaces: the test's network namespace, and PID, mount, UTS, IPC, cgroup ones.
        let launcher = Command::new("sh")
            .args([
                "-c",
                "mkdir -p \"$1\" && echo $$ > \"$1/cgroup.procs\" && exec ip netns exec \"$2\" \
                 unshare --pid --fork --mount --uts --ipc --cgroup --propagation private \
                 --mount-proc sh \"$3\"",
                "sh",
            ])
            .arg(&cgroup)
            .arg(&ns.name)
            .arg(&inner)
            .stdout(std::fs::File::create(dir.join("systemd.log")).expect("log"))
            .stderr(std::process::Stdio::null())
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start systemd");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let pid = loop {
            let children =
                std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", launcher.id()))
                    .unwrap_or_default();
            let pid = children
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok());
            if let Some(pid) = pid.filter(|p: &u32| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "systemd")
            }) {
                break pid;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "systemd did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        Systemd {
            launcher,
            pid,
            cgroup,
        }
    }

    fn systemctl(&self, args: &[&str]) -> String {
        let out = Command::new("timeout")
            .args([
                "10",
                "nsenter",
                "-t",
                &self.pid.to_string(),
                "-m",
                "-p",
                "systemctl",
                "--no-pager",
            ])
            .args(args)
            .output()
            .expect("systemctl");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Pids (as the test sees them) of the unit's processes called `comm`.
    fn unit_pids(&self, unit: &str, comm: &str) -> Vec<u32> {
        std::fs::read_to_string(
            self.cgroup
                .join("system.slice")
                .join(unit)
                .join("cgroup.procs"),
        )
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .collect()
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        let _ = self.systemctl(&["exit", "0"]);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.launcher.try_wait().ok().flatten().is_none() {
            if std::time::Instant::now() > deadline {
                // SIGKILL to a PID namespace's init ends everything in it.
                // SAFETY: signalling the systemd this test started.
                unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
                let _ = self.launcher.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Emptied cgroups, deepest first.
        fn remove(dir: &std::path::Path) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        remove(&e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        remove(&self.cgroup);
    }
}

/// The shipped unit under the real systemd: sluice says READY, gives its sockets to the fd
/// store, and after a kill -9 systemd restarts it with them: connections made while no front
/// end ran are answered.
#[test]
fn under_real_systemd_a_killed_front_end_is_restarted_with_its_queues() {
    let ns = Netns::new("sysd");
    // Inside, /proc/sys is read-only: the namespace's own value is set from out here.
    ns.sysctl("net.ipv4.tcp_syncookies", "2");
    let dir = std::env::temp_dir().join(format!("sluice-systemd-{}", ns.name));
    let units = dir.join("units");
    std::fs::create_dir_all(&units).expect("units dir");
    let admin = dir.join("admin.sock");
    let cfg = dir.join("sluice.toml");
    std::fs::write(&cfg, config(&two_pools("first-segment"), &admin)).expect("config");
    let log = dir.join("sluice.log");
    // The shipped unit with this checkout's paths; the test's additions come after it.
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../dist/sluice.service"
    ))
    .expect("dist/sluice.service");
    let unit: String = shipped
        .lines()
        .filter(|l| !l.contains("network-online.target"))
        .map(|l| {
            l.replace("/usr/local/bin/sluice", &sluice_bin().display().to_string())
                .replace("/etc/sluice/sluice.toml", &cfg.display().to_string())
                + "\n"
        })
        .collect();
    let l = log.display();
    std::fs::write(
        units.join("sluice.service"),
        format!(
            "{unit}\n[Unit]\nDefaultDependencies=no\nConflicts=shutdown.target\nBefore=shutdown.target\n\n\
             [Service]\nRestartSec=2\nEnvironment=RUST_LOG=info\nStandardOutput=append:{l}\nStandardError=append:{l}\n"
        ),
    )
    .expect("unit");
    std::fs::write(
        units.join("sluice-test.target"),
        "[Unit]\nDefaultDependencies=no\nWants=sluice.service\n",
    )
    .expect("target");
    assert!(unit.contains("FileDescriptorStoreMax="), "{unit}");

    let systemd = Systemd::start(&ns, &dir, "sluice-test.target");
    let status = |what: &str| -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new(sluice_bin())
                .args(["status", "--json", "--admin"])
                .arg(&admin)
                .output()
                .expect("sluice status");
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                if worker_pids(&v, "api").len() == 2 && worker_pids(&v, "web").len() == 1 {
                    return v;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: not serving within 30 s; systemctl status:\n{}\nlog:\n{}",
                systemd.systemctl(&["status", "sluice.service"]),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    status("first start");
    assert_eq!(
        systemd.systemctl(&["show", "-p", "ActiveState", "--value", "sluice.service"]),
        "active"
    );
    let stored: u64 = systemd
        .systemctl(&[
            "show",
            "-p",
            "NFileDescriptorStore",
            "--value",
            "sluice.service",
        ])
        .parse()
        .unwrap_or(0);
    assert!(stored >= 6, "the fd store holds {stored} fds");

    let main = systemd.unit_pids("sluice.service", "sluice");
    assert_eq!(main.len(), 1, "one sluice in the unit: {main:?}");
    // SAFETY: signalling the front end this test's systemd started.
    unsafe { libc::kill(main[0] as i32, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{}", main[0])).exists()
        && std::fs::read_to_string(format!("/proc/{}/comm", main[0]))
            .is_ok_and(|c| c.trim() == "sluice")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "sluice outlived SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // systemd waits RestartSec (2 s) before it starts sluice again: these connect meanwhile.
    let waiting = connect_while_down(&ns);
    for (i, (mut c, pool)) in waiting.into_iter().enumerate() {
        let r = read_response(&mut c).unwrap_or_else(|e| {
            panic!(
                "connection {i} waited in vain: {e}; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        assert_eq!(r.status, 200, "connection {i}");
        assert_eq!(r.pool(), Some(pool), "connection {i}");
    }
    let st = status("after the restart");
    assert!(st["inherited_sockets"].as_u64().unwrap_or(0) >= 6, "{st}");
    assert_eq!(
        systemd.systemctl(&["show", "-p", "NRestarts", "--value", "sluice.service"]),
        "1"
    );
    drop(systemd);
    let _ = std::fs::remove_dir_all(&dir);
}
