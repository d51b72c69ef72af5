//! The control channel between the front end and one worker process: a SOCK_SEQPACKET pair,
//! one short ASCII message per datagram.
//!
//! front end -> worker: `ping <seq>`, `stop`
//! worker -> front end: `pong <seq> requests=<n> rss_kib=<n>`, `stats requests=<n>`

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Pong {
        seq: u64,
        requests: Option<u64>,
        rss_kib: Option<u64>,
    },
    Stats {
        requests: u64,
    },
    /// `cache <ttl> <path>\n<response>`: the whole message, for the cache to parse.
    Cache(Vec<u8>),
}

/// Largest control message: a cache publication (at most `cache.max_entry_bytes`, itself at
/// most 1 MiB) and its first line.
const MAX_MESSAGE: usize = (1 << 20) + 8192;
/// Socket buffers big enough for a few publications in flight.
const BUFFER: i32 = 4 << 20;

pub fn parse(text: &str) -> Option<Message> {
    let mut words = text.split_ascii_whitespace();
    let field = |w: &str, name: &str| {
        w.strip_prefix(name)
            .and_then(|v| v.strip_prefix('='))
            .and_then(|v| v.parse().ok())
    };
    match words.next()? {
        "pong" => {
            let seq = words.next()?.parse().ok()?;
            let (mut requests, mut rss_kib) = (None, None);
            for w in words {
                requests = requests.or(field(w, "requests"));
                rss_kib = rss_kib.or(field(w, "rss_kib"));
            }
            Some(Message::Pong {
                seq,
                requests,
                rss_kib,
            })
        }
        "stats" => words
            .find_map(|w| field(w, "requests"))
            .map(|requests| Message::Stats { requests }),
        _ => None,
    }
}

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

pub fn send(fd: RawFd, text: &str) -> io::Result<()> {
    // SAFETY: sends from a live buffer.
    let n = unsafe {
        libc::send(
            fd,
            text.as_ptr().cast(),
            text.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Everything waiting on `fd`; `Err` when the worker's end is closed.
pub fn receive(fd: RawFd) -> io::Result<Vec<Message>> {
    thread_local! {
        // One receive buffer for the controller thread, not one allocation per message.
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; MAX_MESSAGE]);
    }
    BUF.with(|b| receive_into(fd, &mut b.borrow_mut()))
}

fn receive_into(fd: RawFd, buf: &mut [u8]) -> io::Result<Vec<Message>> {
    let mut out = Vec::new();
    loop {
        // SAFETY: receives into a live buffer of the given size.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(out);
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "control channel closed",
            ));
        }
        let msg = &buf[..n as usize];
        if msg.starts_with(b"cache ") {
            out.push(Message::Cache(msg.to_vec()));
            continue;
        }
        match std::str::from_utf8(msg).ok().and_then(parse) {
            Some(m) => out.push(m),
            None => log::debug!(
                "control: ignored {:?}",
                String::from_utf8_lossy(&buf[..n as usize])
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pongs_and_stats() {
        assert_eq!(
            parse("pong 7 requests=3 rss_kib=2048"),
            Some(Message::Pong {
                seq: 7,
                requests: Some(3),
                rss_kib: Some(2048)
            })
        );
        assert_eq!(
            parse("pong 8"),
            Some(Message::Pong {
                seq: 8,
                requests: None,
                rss_kib: None
            })
        );
        assert_eq!(
            parse("stats requests=12"),
            Some(Message::Stats { requests: 12 })
        );
        assert_eq!(parse("stats"), None);
        assert_eq!(parse("hello"), None);
        assert_eq!(parse("pong x"), None);
    }
}
