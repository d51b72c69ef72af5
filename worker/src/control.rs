//! The worker's end of the control channel (fd name `control`); the messages and their wire
//! form are `sluice_proto::control`'s. `requests` counts the HTTP responses this process has
//! written since it started (all threads); `rss_kib` is `VmRSS` from `/proc/self/status`.
//! EOF or an error on the socket means the front end is gone: graceful stop. The runtime's
//! thread 0 does the I/O; this module holds the socket calls that are not io_uring operations.

pub(crate) use sluice_proto::control::{MAX_MESSAGE, ToFrontend, ToWorker, hung_up, send};

/// The `VmRSS` value (kB) in the text of `/proc/<pid>/status`.
pub(crate) fn vm_rss_kib(status: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix("VmRSS:")?;
        let mut parts = value.split_whitespace();
        let n = parts.next()?.parse().ok()?;
        match parts.next() {
            None | Some("kB") => Some(n),
            Some(_) => None,
        }
    })
}

/// This process's resident set size in KiB, 0 when unknown.
pub(crate) fn current_rss_kib() -> u64 {
    match std::fs::read_to_string("/proc/self/status") {
        Ok(status) => vm_rss_kib(&status).unwrap_or(0),
        Err(e) => {
            log::debug!("reading /proc/self/status: {e}");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_from_proc_status() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t    1536 kB\nRssAnon:\t 100 kB\n";
        assert_eq!(vm_rss_kib(status), Some(1536));
        assert_eq!(vm_rss_kib("Name:\tx\n"), None);
        assert!(current_rss_kib() > 0);
    }

    #[test]
    fn hung_up_on_a_socketpair() {
        let mut fds = [0; 2];
        // SAFETY: socketpair(2) writes two fds into the live array.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: both fds are new and owned by nobody else.
        let (a, b) = unsafe {
            use std::os::fd::{FromRawFd, OwnedFd};
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        };
        use std::os::fd::AsRawFd;
        let stats = ToFrontend::Stats {
            requests: 5,
            outcomes: Default::default(),
        }
        .encode();
        send(a.as_raw_fd(), &stats).unwrap();
        let mut buf = [0u8; 256];
        // SAFETY: `buf` is live and writable for its length.
        let n = unsafe { libc::recv(b.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert_eq!(&buf[..n as usize], &stats[..]);
        assert!(!hung_up(b.as_raw_fd()));
        drop(a);
        assert!(hung_up(b.as_raw_fd()));
    }
}
