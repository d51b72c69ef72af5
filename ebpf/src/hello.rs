//! The SNI name of the ClientHello in a TLS listener's first segment.
//!
//! Only what is in this segment is read (with the load helper, at offsets the walk finds):
//! the record and handshake headers, the lengths of the session id, cipher suites and
//! compression methods, then the extensions one by one until `server_name`. A ClientHello
//! whose SNI name is not within the segment (post-quantum key shares make one about 1.6 KB,
//! more than a segment on most links), or comes after more than `MAX_EXTENSIONS`
//! extensions, goes to the front end's TLS thread, which reads the whole ClientHello by the
//! same rule (`sluice_tls::hello`) and passes the connection on.
//!
//! The name is kept as `sluice_proto::host::normalize` makes it: lower case, without one
//! trailing dot, of letters, digits, `-`, `_` and `.` with no empty label; any other name
//! goes to the TLS thread (counted `bad_sni`).

use aya_ebpf::programs::SkReuseportContext;
use sluice_common::{HOST_KEY, SITE_EXACT, counter};

use crate::{Scratch, load};

/// Extensions walked before `server_name` (clients send 10 to 20).
const MAX_EXTENSIONS: u32 = 32;
/// Record header (5), handshake header (4), version (2), random (32), session id length (1).
const FIXED: u32 = 44;
const RECORD_HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_HOST: u8 = 0;

#[inline(always)]
fn be16(b: [u8; 2]) -> u32 {
    u32::from(u16::from_be_bytes(b))
}

/// Puts the SNI name of the ClientHello at `doff` (a segment of `len` bytes, TCP header
/// included) in `scratch.site` as an exact-name key. Err: the fallback counter.
#[inline(always)]
pub(crate) fn server_name(
    ctx: &SkReuseportContext,
    doff: u32,
    len: u32,
    scratch: &mut Scratch,
) -> Result<(), u32> {
    let mut h = [0u8; FIXED as usize];
    if !load(ctx, doff, h.as_mut_ptr(), FIXED) {
        let mut first = [0u8; 1];
        return if load(ctx, doff, first.as_mut_ptr(), 1) && first[0] != RECORD_HANDSHAKE {
            Err(counter::NOT_HELLO)
        } else {
            Err(counter::HELLO_INCOMPLETE)
        };
    }
    if h[0] != RECORD_HANDSHAKE || h[1] != 3 || h[5] != CLIENT_HELLO || h[43] > 32 {
        return Err(counter::NOT_HELLO);
    }
    let record_end = doff + 5 + be16([h[3], h[4]]);
    let mut off = doff + FIXED + u32::from(h[43]);
    let mut two = [0u8; 2];
    if !load(ctx, off, two.as_mut_ptr(), 2) {
        return Err(counter::HELLO_INCOMPLETE);
    }
    off += 2 + be16(two);
    let mut one = [0u8; 1];
    if !load(ctx, off, one.as_mut_ptr(), 1) {
        return Err(counter::HELLO_INCOMPLETE);
    }
    off += 1 + u32::from(one[0]);
    if !load(ctx, off, two.as_mut_ptr(), 2) {
        return Err(counter::HELLO_INCOMPLETE);
    }
    let end = off + 2 + be16(two);
    off += 2;
    let mut i = 0;
    while i < MAX_EXTENSIONS {
        if off + 4 > end {
            return Err(counter::NO_SNI);
        }
        if off + 4 > len || off + 4 > record_end {
            return Err(counter::HELLO_INCOMPLETE);
        }
        let mut e = [0u8; 4];
        if !load(ctx, off, e.as_mut_ptr(), 4) {
            return Err(counter::HELLO_INCOMPLETE);
        }
        let size = be16([e[2], e[3]]);
        if be16([e[0], e[1]]) == u32::from(EXT_SERVER_NAME) {
            return host_name(ctx, off + 4, size, scratch);
        }
        off += 4 + size;
        i += 1;
    }
    Err(counter::HELLO_INCOMPLETE)
}

/// The first name of a `server_name` extension whose data (`size` bytes) starts at `off`.
#[inline(always)]
fn host_name(
    ctx: &SkReuseportContext,
    off: u32,
    size: u32,
    scratch: &mut Scratch,
) -> Result<(), u32> {
    let mut l = [0u8; 5];
    if !load(ctx, off, l.as_mut_ptr(), 5) {
        return Err(counter::HELLO_INCOMPLETE);
    }
    let list = be16([l[0], l[1]]);
    let n = be16([l[3], l[4]]);
    if l[2] != NAME_HOST || n == 0 || 3 + n > list || 2 + list > size {
        return Err(counter::BAD_SNI);
    }
    if n > HOST_KEY as u32 {
        return Err(counter::BAD_SNI);
    }
    scratch.site.kind = SITE_EXACT;
    scratch.site.name = [0; HOST_KEY];
    // A length the verifier can bound to 1..=HOST_KEY: read back from memory first, so
    // LLVM cannot drop the mask as redundant with the checks above.
    let n = crate::host::opaque(&mut scratch.tmp, n as usize) as u32;
    let n = (n.wrapping_sub(1) & (HOST_KEY as u32 - 1)) + 1;
    if !load(ctx, off + 5, scratch.site.name.as_mut_ptr(), n) {
        return Err(counter::HELLO_INCOMPLETE);
    }
    let n = n as usize;
    let mut k = 0;
    while k < HOST_KEY {
        if k >= n {
            break;
        }
        let mut c = scratch.site.name[k & (HOST_KEY - 1)];
        if c.is_ascii_uppercase() {
            c |= 0x20;
        }
        if !crate::host::name_byte(c) {
            return Err(counter::BAD_SNI);
        }
        if c == b'.' {
            let next = if k + 1 < n {
                scratch.site.name[(k + 1) & (HOST_KEY - 1)]
            } else {
                0
            };
            if k == 0 || next == b'.' {
                return Err(counter::BAD_SNI);
            }
        }
        scratch.site.name[k & (HOST_KEY - 1)] = c;
        k += 1;
    }
    // One trailing dot (the DNS root) is not part of the name.
    let last = (n - 1) & (HOST_KEY - 1);
    if scratch.site.name[last] == b'.' {
        scratch.site.name[last] = 0;
    }
    Ok(())
}
