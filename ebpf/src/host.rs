//! The site keys of a request: its `Host` (read from the line right after the request line,
//! when some route names a host) and the local address it arrived on (when some route is
//! bound to one).
//!
//! The name is kept as `sluice_proto::host::Host::normalized` makes it: lower case, without
//! the port and one trailing dot. Only `Host:` OWS name [`:` digits] OWS CRLF is read, with
//! a name of letters, digits, `-`, `_` and `.` and no empty label; anything else (another
//! header first, an IPv6 literal, a bad port, a name longer than `HOST_KEY`) goes to the
//! dispatcher with its counter, so what this program steers is what the user-space router
//! would pick.

use aya_ebpf::{EbpfContext as _, helpers::bpf_skb_load_bytes_relative, programs::SkReuseportContext};
use sluice_common::{HOST_KEY, LINE_WINDOW, SITE_EXACT, SITE_IP4, SITE_IP6, SITE_WILDCARD, counter};

use crate::Scratch;
use crate::parse::{at, launder};

/// Most spaces and tabs read around the Host value.
const MAX_OWS: usize = 8;
/// Most digits of a port.
const MAX_PORT_DIGITS: usize = 5;

#[inline(always)]
pub(crate) fn name_byte(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_' || c == b'.'
}

#[inline(always)]
fn ows(c: u8) -> bool {
    c == b' ' || c == b'\t'
}

/// Position of the first byte at or after `from` that is not a space or tab (at most
/// MAX_OWS of them).
#[inline(always)]
fn skip_ows(line: &[u8; LINE_WINDOW], from: usize) -> usize {
    let mut i = 0;
    while i < MAX_OWS {
        if !ows(at(line, from + i)) {
            break;
        }
        i += 1;
    }
    from + i
}

/// Reads the Host line after the request line (whose path ended at `from`) into
/// `scratch.site` as an exact-name key; `scratch.host_len` is the name's length.
#[inline(always)]
pub(crate) fn host_line(scratch: &mut Scratch, n: usize, from: usize) -> Result<(), u32> {
    // Every phase starts from positions and a length read back from memory: each way out
    // of a loop leaves values (and, through comparisons, ranges of `n`) of its own, and the
    // verifier would walk the rest of the program once for each.
    let n = opaque(&mut scratch.tmp, n);
    // The end of the request line: its first CR (the query and version hold none).
    let from = launder(&mut scratch.tmp, from);
    let line = &scratch.line;
    let mut cr = 0;
    let mut j = from;
    while j < LINE_WINDOW {
        if j >= n {
            return Err(counter::NO_HOST);
        }
        let c = at(line, j);
        if c == b'\r' {
            cr = j;
            break;
        }
        if c == b'\n' {
            return Err(counter::NO_HOST);
        }
        j += 1;
    }
    if cr == 0 {
        return Err(counter::NO_HOST);
    }
    let n = opaque(&mut scratch.tmp, n);
    let h = launder(&mut scratch.tmp, cr) + 2;
    let line = &scratch.line;
    if at(line, h - 1) != b'\n'
        || at(line, h) | 0x20 != b'h'
        || at(line, h + 1) | 0x20 != b'o'
        || at(line, h + 2) | 0x20 != b's'
        || at(line, h + 3) | 0x20 != b't'
        || at(line, h + 4) != b':'
    {
        return Err(counter::NO_HOST);
    }
    let p = skip_ows(line, h + 5);
    if p >= LINE_WINDOW {
        return Err(counter::NO_HOST);
    }
    let p = launder(&mut scratch.tmp, p);
    // The name, lower-cased, until the first byte that cannot be in one.
    scratch.site.kind = SITE_EXACT;
    scratch.site.name = [0; HOST_KEY];
    let line = &scratch.line;
    let mut len = HOST_KEY + 1;
    let mut k = 0;
    while k <= HOST_KEY {
        if p + k >= n {
            return Err(counter::NO_HOST);
        }
        let mut c = at(line, p + k);
        if c.is_ascii_uppercase() {
            c |= 0x20;
        }
        if !name_byte(c) {
            len = k;
            break;
        }
        if c == b'.' && (k == 0 || at(line, p + k + 1) == b'.') {
            return Err(counter::BAD_HOST);
        }
        if let Some(d) = scratch.site.name.get_mut(k) {
            *d = c;
        }
        k += 1;
    }
    if len > HOST_KEY {
        return Err(counter::HOST_TOO_LONG);
    }
    if len == 0 {
        return Err(counter::BAD_HOST);
    }
    let n = opaque(&mut scratch.tmp, n);
    let len = opaque(&mut scratch.tmp, len);
    let line = &scratch.line;
    // Below the window: every byte up to p + len was read from it.
    let mut q = launder(&mut scratch.tmp, p + len);
    if at(line, q) == b':' {
        q += 1;
        let mut port: u32 = 0;
        let mut digits = 0;
        while digits <= MAX_PORT_DIGITS {
            let c = at(line, q + digits);
            if !c.is_ascii_digit() {
                break;
            }
            port = port * 10 + u32::from(c - b'0');
            digits += 1;
        }
        if digits > MAX_PORT_DIGITS || port > 65535 {
            return Err(counter::BAD_HOST);
        }
        if q + digits >= LINE_WINDOW {
            return Err(counter::BAD_HOST);
        }
        q = launder(&mut scratch.tmp, q + digits);
    }
    let line = &scratch.line;
    let e = skip_ows(line, q);
    if e >= LINE_WINDOW {
        return Err(counter::BAD_HOST);
    }
    let e = launder(&mut scratch.tmp, e);
    // CRLF, and no obs-fold continuing the value (the head rule refuses one).
    let next = at(line, e + 2);
    if e + 1 >= n || at(line, e) != b'\r' || at(line, e + 1) != b'\n' || (e + 2 < n && ows(next))
    {
        return Err(counter::BAD_HOST);
    }
    // One trailing dot (the DNS root) is not part of the name.
    let last = len - 1;
    if scratch.site.name.get(last).copied() == Some(b'.') {
        if let Some(d) = scratch.site.name.get_mut(last) {
            *d = 0;
        }
    }
    Ok(())
}

/// Turns the exact-name key in `scratch.site` into the wildcard key its host would match:
/// the name after its first label. False when the name has one label.
#[inline(always)]
pub(crate) fn to_wildcard(scratch: &mut Scratch) -> bool {
    let mut dot = HOST_KEY;
    let mut k = 0;
    while k < HOST_KEY {
        if scratch.site.name.get(k).copied() == Some(b'.') {
            dot = k;
            break;
        }
        k += 1;
    }
    if dot >= HOST_KEY - 1 {
        return false;
    }
    let from = launder(&mut scratch.tmp, dot + 1);
    if scratch.site.name.get(from).copied().unwrap_or(0) == 0 {
        return false;
    }
    let mut i = 0;
    while i < HOST_KEY {
        let j = from + i;
        let c = if j < HOST_KEY {
            // Through memory, then masked: LLVM would otherwise fold `from` into the
            // pointer, and the verifier cannot bound a pointer by a sum it was not shown.
            let j = opaque(&mut scratch.tmp, j) & (HOST_KEY - 1);
            scratch.site.name[j]
        } else {
            0
        };
        if let Some(d) = scratch.site.name.get_mut(i) {
            *d = c;
        }
        i += 1;
    }
    scratch.site.kind = SITE_WILDCARD;
    true
}

/// `v` read back from map memory: a value neither LLVM nor the verifier tracks.
#[inline(always)]
pub(crate) fn opaque(tmp: &mut u64, v: usize) -> usize {
    // SAFETY: volatile access to a field of the per-CPU scratch value we hold exclusively.
    unsafe {
        core::ptr::write_volatile(tmp, v as u64);
        core::ptr::read_volatile(tmp) as usize
    }
}

/// Puts the connection's local address (the segment's destination) in `scratch.site`.
#[inline(always)]
pub(crate) fn local_address(ctx: &SkReuseportContext, scratch: &mut Scratch) -> bool {
    let mut version = [0u8; 1];
    if !load_net(ctx, 0, version.as_mut_ptr(), 1) {
        return false;
    }
    scratch.site.name = [0; HOST_KEY];
    let name = scratch.site.name.as_mut_ptr();
    match version[0] >> 4 {
        4 => {
            scratch.site.kind = SITE_IP4;
            load_net(ctx, 16, name, 4)
        }
        6 => {
            scratch.site.kind = SITE_IP6;
            load_net(ctx, 24, name, 16)
        }
        _ => false,
    }
}

/// Reads `len` bytes at `off` from the network header into `dst`.
#[inline(always)]
pub(crate) fn load_net(ctx: &SkReuseportContext, off: u32, dst: *mut u8, len: u32) -> bool {
    const BPF_HDR_START_NET: u32 = 1;
    // SAFETY: `dst` points at `len` writable bytes of the per-CPU scratch value or the stack;
    // aya-ebpf has no safe wrapper for this helper on sk_reuseport contexts.
    unsafe {
        bpf_skb_load_bytes_relative(ctx.as_ptr(), off, dst.cast(), len, BPF_HDR_START_NET) >= 0
    }
}
