//! The front end's end of a worker's control channel: a SOCK_SEQPACKET pair, messages as
//! `sluice_proto::control` defines them.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

pub use sluice_proto::control::{MAX_MESSAGE, ToFrontend, ToWorker, hung_up, send};

/// Socket buffers big enough for a few publications in flight.
const BUFFER: i32 = 4 << 20;

/// (front end's end, worker's end); the front end's end does not block.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair(2) writes two new fds into the array.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are new and owned by nothing else.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl and setsockopt on our own fds, with a live i32.
    unsafe {
        let flags = libc::fcntl(ours.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(ours.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        // As root the buffers may exceed the sysctl maximum: a 256 KiB publication must fit.
        let size = (&BUFFER as *const i32).cast();
        let len = std::mem::size_of::<i32>() as u32;
        libc::setsockopt(
            theirs.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            size,
            len,
        );
        libc::setsockopt(
            ours.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            size,
            len,
        );
        libc::setsockopt(
            ours.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            size,
            len,
        );
    }
    Ok((ours, theirs))
}

/// Most datagrams (and bytes) taken from one worker per call, whatever they hold, so a worker
/// that floods its channel cannot keep the controller from its other work; the rest wait for
/// the next call.
const MAX_PER_CALL: usize = 256;
const MAX_BYTES_PER_CALL: usize = 8 * MAX_MESSAGE;

/// What one call of [`receive`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Received {
    pub messages: Vec<ToFrontend>,
    /// The worker's end is closed (it is exiting).
    pub closed: bool,
}

/// The messages waiting on `fd` (malformed ones are logged and dropped).
pub fn receive(fd: RawFd) -> Received {
    thread_local! {
        // One receive buffer for the controller thread, not one allocation per message.
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; MAX_MESSAGE]);
    }
    BUF.with(|b| receive_into(fd, &mut b.borrow_mut()))
}

fn receive_into(fd: RawFd, buf: &mut [u8]) -> Received {
    let mut out = Received::default();
    let mut bytes = 0;
    for _ in 0..MAX_PER_CALL {
        if bytes >= MAX_BYTES_PER_CALL {
            break;
        }
        // SAFETY: receives into a live buffer of the given size.
        let n = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
                out.closed = true;
            }
            return out;
        }
        if n == 0 {
            // EOF, or an empty datagram (which says nothing): only a hang-up ends the channel.
            if hung_up(fd) {
                out.closed = true;
                return out;
            }
            log::warn!("control: dropped an empty message");
            continue;
        }
        if n as usize > MAX_MESSAGE {
            log::warn!("control: dropped a message longer than {MAX_MESSAGE} bytes");
            continue;
        }
        bytes += n as usize;
        match ToFrontend::decode(&buf[..n as usize]) {
            Ok(m) => out.messages.push(m),
            Err(e) => log::warn!("control: dropped a message: {e}"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_worker_sends_arrives_decoded_and_garbage_is_dropped() {
        let (ours, theirs) = pair().unwrap();
        let stats = ToFrontend::Stats {
            requests: 12,
            outcomes: Default::default(),
        };
        send(theirs.as_raw_fd(), &stats.encode()).unwrap();
        // An empty datagram once ended the read and lost the messages around it.
        for m in [
            &b"pong 1"[..],
            b"",
            b"cache 18446744073709551615 /x\nHTTP/1.1 200 OK\r\n\r\n",
        ] {
            send(theirs.as_raw_fd(), m).unwrap();
        }
        send(theirs.as_raw_fd(), &stats.encode()).unwrap();
        let got = receive(ours.as_raw_fd());
        assert_eq!(got.messages, vec![stats.clone(), stats.clone()]);
        assert!(!got.closed);
        send(theirs.as_raw_fd(), &stats.encode()).unwrap();
        drop(theirs);
        let last = receive(ours.as_raw_fd());
        assert_eq!((last.messages, last.closed), (vec![stats], true));
    }
}
