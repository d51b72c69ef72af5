//! eventfd(2): how one thread of the front end wakes another (the dispatcher, the relay, the
//! TLS thread) or tells it to stop. One module for the syscalls.

use std::{
    io,
    os::fd::{FromRawFd, OwnedFd, RawFd},
};

/// A new eventfd, close-on-exec; non-blocking for a loop that reads it on readiness.
pub fn create(nonblocking: bool) -> io::Result<OwnedFd> {
    let flags = libc::EFD_CLOEXEC | if nonblocking { libc::EFD_NONBLOCK } else { 0 };
    // SAFETY: eventfd(2) with flags only; the fd is owned right away.
    let fd = unsafe { libc::eventfd(0, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds `value` to the counter of `fd`, waking whoever waits on it.
pub fn signal(fd: RawFd, value: u64) {
    // SAFETY: writes 8 bytes from a live u64 to an eventfd.
    unsafe { libc::write(fd, (&raw const value).cast(), 8) };
}

/// Reads (and so resets) the counter of `fd`: 0 when nothing was signalled.
pub fn take(fd: RawFd) -> u64 {
    let mut value = 0u64;
    // SAFETY: reads 8 bytes from an eventfd into a live u64.
    let n = unsafe { libc::read(fd, (&raw mut value).cast(), 8) };
    if n == 8 { value } else { 0 }
}
