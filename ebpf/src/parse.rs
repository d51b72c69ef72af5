//! `METHOD SP PATH` from the first bytes of a segment, and the path part of the route key.
//!
//! Only a path the program can prove canonical is steered: anything with `%`, `\`, `//`,
//! a `.` or `..` segment, a `#` (never valid in a request-target: the dispatcher answers it
//! 400), or a byte outside visible ASCII goes to the dispatcher, which canonicalizes it. The key is the path up to `?` or SP with a `/` appended, so that the
//! prefix `/api/` matches `/api` and `/api/x` but not `/apix` (HTTP.sys URL-group rules).

use sluice_common::{LINE_WINDOW, MAX_PREFIX, SITE_ID_BYTES as SITE_BYTES, counter};

use crate::Scratch;

const MAX_METHOD: usize = 16;

/// Byte `i` of the window, 0 past its end. No indexing that could panic: a panic path
/// leaves a call with no exit behind, which the verifier refuses.
#[inline(always)]
pub(crate) fn at(line: &[u8; LINE_WINDOW], i: usize) -> u8 {
    // The mask keeps the access provably in bounds for the verifier, whatever LLVM makes of
    // the comparison.
    if i < LINE_WINDOW {
        line[i & (LINE_WINDOW - 1)]
    } else {
        0
    }
}

/// Returns `v` (below LINE_WINDOW) read back from map memory. The verifier tracks exact values in registers and
/// on the stack, so every position where a loop ended would otherwise multiply the walk of
/// the next loop; map memory it does not track.
#[inline(always)]
pub(crate) fn launder(tmp: &mut u64, v: usize) -> usize {
    // SAFETY: volatile access to a field of the per-CPU scratch value we hold exclusively.
    unsafe {
        core::ptr::write_volatile(tmp, v as u64);
        core::ptr::read_volatile(tmp) as usize & (LINE_WINDOW - 1)
    }
}

/// What may follow a segment: another segment, the end of the path, or the query.
#[inline(always)]
fn segment_end(c: u8) -> bool {
    c == b'/' || c == b' ' || c == b'?'
}

/// Reads the request line's method and path; fills the path part of `scratch.key` (site id
/// 0) and returns where the path ends (its SP or `?`). Err: the fallback counter.
#[inline(always)]
pub(crate) fn request_line(scratch: &mut Scratch, n: usize) -> Result<usize, u32> {
    let line = &scratch.line;
    let mut sp = MAX_METHOD;
    let mut i = 0;
    while i < MAX_METHOD {
        let c = at(line, i);
        if c == b' ' {
            sp = i;
            break;
        }
        if !c.is_ascii_uppercase() {
            return Err(counter::NOT_HTTP);
        }
        i += 1;
    }
    let start = sp + 1;
    if sp == 0 || sp >= MAX_METHOD || start >= n || at(line, start) != b'/' {
        // Includes `OPTIONS *` and absolute-form targets: the dispatcher handles those.
        return Err(counter::NOT_HTTP);
    }
    // One stateless pass (no state carried between iterations but the position: the
    // verifier walks a loop once per iteration and per distinct register state, so carrying
    // segment state through 256 bytes blows past its instruction limit). Each `/` looks
    // ahead for an empty, `.` or `..` segment (`//`, `/./`, `/../`, trailing `/.`, `/..`).
    let mut end = 0;
    let mut j = start;
    while j < LINE_WINDOW {
        if j >= n {
            return Err(counter::INCOMPLETE);
        }
        let c = at(line, j);
        if c == b' ' || c == b'?' {
            end = j;
            break;
        }
        if c == b'/' {
            let a = at(line, j + 1);
            let b = at(line, j + 2);
            let c = at(line, j + 3);
            if a == b'/' || (a == b'.' && (segment_end(b) || (b == b'.' && segment_end(c)))) {
                return Err(counter::UNSAFE_PATH);
            }
        } else if c == b'%' || c == b'\\' || c == b'#' || c <= b' ' || c >= 0x7f {
            return Err(counter::UNSAFE_PATH);
        }
        j += 1;
    }
    if end == 0 {
        return Err(counter::INCOMPLETE);
    }
    // Copy the path, then the terminating `/`; bytes past MAX_PREFIX are not needed because
    // no route is longer than that.
    // Launder: each exit of the loop above leaves exact values that would multiply the walk
    // of the loop below.
    let start = launder(&mut scratch.tmp, start);
    let path_len = launder(&mut scratch.tmp, end.wrapping_sub(start));
    let line = &scratch.line;
    let key = &mut scratch.key;
    // Zeroed first: the cached-path lookup compares all of it.
    key.data = [0; sluice_common::ROUTE_KEY];
    let mut k = 0;
    while k < MAX_PREFIX {
        if k >= path_len {
            break;
        }
        if let Some(d) = key.data.get_mut(SITE_BYTES + k) {
            *d = at(line, start + k);
        }
        k += 1;
    }
    if let Some(d) = key.data.get_mut(SITE_BYTES + k) {
        *d = b'/';
        k += 1;
    }
    key.prefix_len = ((SITE_BYTES + k) * 8) as u32;
    Ok(end)
}

/// Sets the site id of `scratch.key` (a route key: site, then path).
#[inline(always)]
pub(crate) fn set_site(scratch: &mut Scratch, site: u32) {
    let b = site.to_be_bytes();
    scratch.key.data[0] = b[0];
    scratch.key.data[1] = b[1];
    scratch.key.data[2] = b[2];
    scratch.key.data[3] = b[3];
}
