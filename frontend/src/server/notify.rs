//! systemd's readiness protocol (`sd_notify`): when `NOTIFY_SOCKET` is set (a `Type=notify`
//! unit), the front end says when it serves (`READY=1`), when it reloads (`RELOADING=1`, then
//! `READY=1` again) and when it stops (`STOPPING=1`), each with a `STATUS=` line.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

pub struct Notifier {
    socket: UnixDatagram,
    to: SocketAddr,
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
        match UnixDatagram::unbound() {
            Ok(socket) => Some(Notifier { socket, to }),
            Err(e) => {
                log::warn!("NOTIFY_SOCKET={name}: {e}");
                None
            }
        }
    }

    fn send(&self, state: &str) {
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.to) {
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
