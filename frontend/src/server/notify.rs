//! systemd's readiness protocol (`sd_notify`): when `NOTIFY_SOCKET` is set (a `Type=notify`
//! unit), the front end says when it serves (`READY=1`), when it reloads (`RELOADING=1`, then
//! `READY=1` again) and when it stops (`STOPPING=1`), each with a `STATUS=` line; and it keeps
//! its queues' sockets in the unit's file-descriptor store (`FDSTORE=1`, see `fdstore`).

use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

pub struct Notifier {
    /// Connected to the notify socket, so messages with fds need no address.
    socket: UnixDatagram,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` names (a path, or `@name` in the abstract namespace).
    pub fn from_env() -> Option<Notifier> {
        let name = std::env::var_os("NOTIFY_SOCKET")?;
        let name = name.to_string_lossy().into_owned();
        let to = match name.strip_prefix('@') {
            Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()),
            None => SocketAddr::from_pathname(&name),
        };
        let to = match to {
            Ok(a) => a,
            Err(e) => {
                log::warn!("NOTIFY_SOCKET={name}: {e}");
                return None;
            }
        };
        match UnixDatagram::unbound().and_then(|s| s.connect_addr(&to).map(|()| s)) {
            Ok(socket) => Some(Notifier { socket }),
            Err(e) => {
                log::warn!("NOTIFY_SOCKET={name}: {e}");
                None
            }
        }
    }

    fn send(&self, state: &str) {
        if let Err(e) = self.socket.send(state.as_bytes()) {
            log::warn!(
                "telling systemd {:?}: {e}",
                state.lines().next().unwrap_or("")
            );
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}\n"));
    }

    pub fn reloading(&self) {
        // systemd 253+ wants the time of the reload with it; older ones ignore it.
        let usec = monotonic_usec();
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading\n"
        ));
    }

    /// Gives systemd `fd` to keep under `name` (it ignores one it holds already).
    pub fn store(&self, name: &str, fd: RawFd) {
        let text = format!("FDSTORE=1\nFDNAME={name}\n");
        if let Err(e) = send_fd(self.socket.as_raw_fd(), text.as_bytes(), fd) {
            log::warn!("giving systemd's fd store {name}: {e}");
        }
    }

    /// Asks systemd to close what it keeps under `name`.
    pub fn unstore(&self, name: &str) {
        self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}\n"));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping: workers first, then the dispatcher\n");
    }
}

fn monotonic_usec() -> u64 {
    // SAFETY: an all-zero timespec is valid; clock_gettime fills it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: CLOCK_MONOTONIC with a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// One datagram with `fd` attached (SCM_RIGHTS).
fn send_fd(socket: RawFd, bytes: &[u8], fd: RawFd) -> std::io::Result<()> {
    // Room for one cmsghdr and one fd, in u64 words for its alignment.
    let mut control = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is valid (no name).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size (24 bytes for one fd: within `control`).
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
    // SAFETY: the control buffer holds one header and one fd (CMSG_SPACE above); sendmsg
    // reads the iovec and the control data, both alive for the call.
    let rc = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
        libc::CMSG_DATA(cmsg).cast::<RawFd>().write_unaligned(fd);
        libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL)
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
