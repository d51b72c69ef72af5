//! `METHOD SP PATH` from the first bytes of a segment, and the trie key for the path.
//!
//! Only a path the program can prove canonical is steered: anything with `%`, `\`, `//`,
//! a `.` or `..` segment, a `#` (never valid in a request-target: the dispatcher answers it
//! 400), or a byte outside visible ASCII goes to the dispatcher, which canonicalizes it. The key is the path up to `?` or SP with a `/` appended, so that the
//! prefix `/api/` matches `/api` and `/api/x` but not `/apix` (HTTP.sys URL-group rules).

use sluice_common::{LINE_WINDOW, MAX_PREFIX, counter};

use crate::Scratch;

pub(crate) enum Verdict {
    /// Route found: the pool index.
    Pool(u32),
    /// Goes to the dispatcher; the counter index says why.
    Fallback(u32),
    /// First-segment mode: a data-less SYN answered by cookie; decided again on the data.
    Cookie,
    /// The path is in the front end's cache.
    Cached,
}

const MAX_METHOD: usize = 16;

/// Byte `i` of the window, 0 past its end. No indexing that could panic: a panic path
/// leaves a call with no exit behind, which the verifier refuses.
#[inline(always)]
fn at(line: &[u8; LINE_WINDOW], i: usize) -> u8 {
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
fn launder(tmp: &mut u64, v: usize) -> usize {
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

#[inline(always)]
pub(crate) fn request_line(scratch: &mut Scratch, n: usize) -> Verdict {
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
            return Verdict::Fallback(counter::NOT_HTTP);
        }
        i += 1;
    }
    let start = sp + 1;
    if sp == 0 || sp >= MAX_METHOD || start >= n || at(line, start) != b'/' {
        // Includes `OPTIONS *` and absolute-form targets: the dispatcher handles those.
        return Verdict::Fallback(counter::NOT_HTTP);
    }
    // One stateless pass (no state carried between iterations but the position: the
    // verifier walks a loop once per iteration and per distinct register state, so carrying
    // segment state through 256 bytes blows past its instruction limit). Each `/` looks
    // ahead for an empty, `.` or `..` segment (`//`, `/./`, `/../`, trailing `/.`, `/..`).
    let mut end = 0;
    let mut j = start;
    while j < LINE_WINDOW {
        if j >= n {
            return Verdict::Fallback(counter::INCOMPLETE);
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
                return Verdict::Fallback(counter::UNSAFE_PATH);
            }
        } else if c == b'%' || c == b'\\' || c == b'#' || c <= b' ' || c >= 0x7f {
            return Verdict::Fallback(counter::UNSAFE_PATH);
        }
        j += 1;
    }
    if end == 0 {
        return Verdict::Fallback(counter::INCOMPLETE);
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
    key.data = [0; MAX_PREFIX];
    let mut k = 0;
    while k < MAX_PREFIX {
        if k >= path_len {
            break;
        }
        if let Some(d) = key.data.get_mut(k) {
            *d = at(line, start + k);
        }
        k += 1;
    }
    if let Some(d) = key.data.get_mut(k) {
        *d = b'/';
        k += 1;
    }
    key.prefix_len = (k * 8) as u32;
    // SAFETY: reading a plain byte value from a hash map.
    if unsafe { crate::CACHED.get(&key.data) }.is_some() {
        return Verdict::Cached;
    }
    match crate::route(key) {
        Some(pool) => Verdict::Pool(pool),
        None => Verdict::Fallback(counter::NO_ROUTE),
    }
}
