//! Two questions to the kernel's socket diagnostics (NETLINK_SOCK_DIAG).
//! - Has the server side of a TCP connection been accepted yet? A connection still in a
//!   listener's accept queue belongs to no socket file, so its inode is 0; `accept` gives it
//!   one. This is how the front end sees, without any protocol, that a socket worker takes
//!   connections from its queue.
//! - Which TCP listeners does this namespace have? Asked for the listening state only, the
//!   kernel walks its listening hash and not the connections: `/proc/net/tcp` walks every
//!   socket (75 ms for 25,000 in TIME_WAIT after a `Connection: close` run here).

use std::{
    io,
    mem::size_of,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const INET_DIAG_NOCOOKIE: u32 = !0;
const TCP_LISTEN: u8 = 10;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    ifindex: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

fn words(ip: IpAddr) -> [u32; 4] {
    let mut w = [0u32; 4];
    match ip {
        IpAddr::V4(a) => w[0] = u32::from_ne_bytes(a.octets()),
        IpAddr::V6(a) => {
            for (i, c) in a.octets().chunks(4).enumerate() {
                w[i] = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
    w
}

/// Whether the connection whose server side is `local` and whose client is `remote` has
/// been accepted; None when the kernel knows no such connection.
pub fn accepted(local: SocketAddr, remote: SocketAddr) -> io::Result<Option<bool>> {
    let fd = ask(
        libc::NLM_F_REQUEST as u16,
        ReqV2 {
            family: if local.is_ipv4() {
                libc::AF_INET as u8
            } else {
                libc::AF_INET6 as u8
            },
            protocol: libc::IPPROTO_TCP as u8,
            states: !0,
            id: SockId {
                sport: local.port().to_be(),
                dport: remote.port().to_be(),
                src: words(local.ip()),
                dst: words(remote.ip()),
                ifindex: 0,
                cookie: [INET_DIAG_NOCOOKIE; 2],
            },
            ..ReqV2::default()
        },
    )?;
    let mut buf = [0u8; 512];
    // SAFETY: receives into a live buffer of its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n < size_of::<NlMsgHdr>() {
        return Err(io::Error::other("short sock_diag answer"));
    }
    // SAFETY: at least a header's bytes were received; read_unaligned copies them out.
    let hdr: NlMsgHdr = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
    let body = &buf[size_of::<NlMsgHdr>()..n];
    if hdr.kind == NLMSG_ERROR {
        let code = body
            .get(..4)
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(0);
        return match -code {
            0 | libc::ENOENT => Ok(None),
            e => Err(io::Error::from_raw_os_error(e)),
        };
    }
    if hdr.kind != SOCK_DIAG_BY_FAMILY || body.len() < size_of::<DiagMsg>() {
        return Err(io::Error::other("unexpected sock_diag answer"));
    }
    // SAFETY: the body holds at least one inet_diag_msg; read_unaligned copies it out.
    let msg: DiagMsg = unsafe { std::ptr::read_unaligned(body.as_ptr().cast()) };
    // The kernel's lookup falls back to the listener when no connection matches.
    if msg.state == TCP_LISTEN || msg.id.dport != remote.port().to_be() {
        return Ok(None);
    }
    Ok(Some(msg.inode != 0))
}

/// A sock_diag socket with `req` sent on it.
fn ask(flags: u16, req: ReqV2) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    #[repr(C)]
    struct Request {
        hdr: NlMsgHdr,
        req: ReqV2,
    }
    let request = Request {
        hdr: NlMsgHdr {
            len: size_of::<Request>() as u32,
            kind: SOCK_DIAG_BY_FAMILY,
            flags,
            seq: 1,
            pid: 0,
        },
        req,
    };
    // SAFETY: sends the bytes of a live repr(C) value of plain integers.
    let sent = unsafe {
        libc::send(
            fd.as_raw_fd(),
            (&request as *const Request).cast(),
            size_of::<Request>(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Every TCP listener of this network namespace: (address, socket inode).
pub fn listeners() -> io::Result<Vec<(SocketAddr, u64)>> {
    let mut out = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        let fd = ask(
            (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            ReqV2 {
                family: family as u8,
                protocol: libc::IPPROTO_TCP as u8,
                states: 1 << TCP_LISTEN,
                id: SockId {
                    cookie: [INET_DIAG_NOCOOKIE; 2],
                    ..SockId::default()
                },
                ..ReqV2::default()
            },
        )?;
        let mut buf = vec![0u8; 32 * 1024];
        'dump: loop {
            // SAFETY: receives into a live buffer of its length.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut rest = &buf[..n as usize];
            if rest.is_empty() {
                break;
            }
            while rest.len() >= size_of::<NlMsgHdr>() {
                // SAFETY: a header's bytes are there; read_unaligned copies them out.
                let hdr: NlMsgHdr = unsafe { std::ptr::read_unaligned(rest.as_ptr().cast()) };
                let len = (hdr.len as usize).max(size_of::<NlMsgHdr>());
                let body = rest
                    .get(size_of::<NlMsgHdr>()..len.min(rest.len()))
                    .unwrap_or(&[]);
                match hdr.kind {
                    NLMSG_DONE => break 'dump,
                    NLMSG_ERROR => {
                        let code = body
                            .get(..4)
                            .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                        if code == 0 {
                            break 'dump;
                        }
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    SOCK_DIAG_BY_FAMILY if body.len() >= size_of::<DiagMsg>() => {
                        // SAFETY: the body holds an inet_diag_msg; read_unaligned copies it.
                        let m: DiagMsg = unsafe { std::ptr::read_unaligned(body.as_ptr().cast()) };
                        if m.state == TCP_LISTEN {
                            out.push((address(m.family, &m.id), u64::from(m.inode)));
                        }
                    }
                    _ => {}
                }
                // Messages are 4-byte aligned.
                let next = (len + 3) & !3;
                rest = rest.get(next..).unwrap_or(&[]);
            }
        }
    }
    Ok(out)
}

/// The local address of a diag message's socket.
fn address(family: u8, id: &SockId) -> SocketAddr {
    let mut bytes = [0u8; 16];
    for (i, w) in id.src.iter().enumerate() {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let port = u16::from_be(id.sport);
    if i32::from(family) == libc::AF_INET {
        SocketAddr::new(IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]]), port)
    } else {
        SocketAddr::new(IpAddr::from(bytes), port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_queued_connection_is_not_accepted_until_accept_takes_it() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = TcpStream::connect(server).unwrap();
        let me = client.local_addr().unwrap();
        assert_eq!(accepted(server, me).unwrap(), Some(false));
        let (_conn, _) = listener.accept().unwrap();
        assert_eq!(accepted(server, me).unwrap(), Some(true));
        let stranger: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(accepted(server, stranger).unwrap(), None);
    }

    #[test]
    fn listeners_are_listed_with_their_inodes_and_connections_are_not() {
        use std::os::fd::AsRawFd;
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = TcpListener::bind("[::1]:0").ok();
        let client = TcpStream::connect(v4.local_addr().unwrap()).unwrap();
        let (_conn, _) = v4.accept().unwrap();
        let found = listeners().unwrap();
        // SAFETY: fstat into a live stat of a listener we hold.
        let ino = |fd: i32| unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            libc::fstat(fd, &mut st);
            st.st_ino
        };
        assert!(
            found.contains(&(v4.local_addr().unwrap(), ino(v4.as_raw_fd()))),
            "{found:?}"
        );
        if let Some(v6) = v6 {
            assert!(found.contains(&(v6.local_addr().unwrap(), ino(v6.as_raw_fd()))));
        }
        let me = client.local_addr().unwrap();
        assert!(!found.iter().any(|(a, _)| *a == me || a.port() == me.port()));
    }
}
