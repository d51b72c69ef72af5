//! sluice's kernel programs.
//!
//! - `steer` / `steer_migrate` (sk_reuseport): pick the listening socket of a new connection
//!   from the request line in its first data segment. The migrate variant also moves the
//!   queue of a closing listener to the dispatcher instead of letting the kernel hash it to
//!   any socket of the group (another pool).
//! - `ack_gate` (TC ingress, first-segment mode): drops the pure ACK that would complete a
//!   handshake against one of our LISTEN sockets, so the client's first data segment completes
//!   it by syncookie and `steer` sees the request line.
//!
//! One object is loaded per listen address (one reuseport group), so every map here belongs to
//! one group; the front end fills them all the same way.
#![no_std]
#![no_main]

mod direct;
mod gate;
mod hello;
mod host;
mod parse;

use aya_ebpf::{
    EbpfContext as _,
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::bpf_skb_load_bytes,
    macros::{map, sk_reuseport},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, ReusePortSockArray, lpm_trie::Key},
    programs::SkReuseportContext,
};
use sluice_common::{
    CFG_GROUP, CFG_LEN, CFG_MODE, CFG_ROUTES, DISPATCHER_SLOT, GROUP_TLS, KIND_IP, KIND_NAMED,
    KIND_REDIRECT, KIND_STRONG,
    LINE_WINDOW, MAX_CACHED_PATHS, MAX_POOLS, MAX_ROUTES, MAX_SITES, MODE_FIRST_SEGMENT,
    POOL_FLAG_RELAY, POOL_FLAG_STOPPED, PoolSlots, ROUTE_KEY, ROUTE_SHARED, SITE_STRONG, SITE_WEAK, SOCKET_SLOTS, SiteKey,
    counter,
};

pub(crate) enum Verdict {
    /// Route found: the pool index.
    Pool(u32),
    /// Goes to the dispatcher; the counter index says why.
    Fallback(u32),
    /// First-segment mode: a data-less SYN answered by cookie; decided again on the data.
    Cookie,
    /// The path is in the front end's cache.
    Cached,
    /// A connection of the front end's own, for this pool (see `direct`).
    Direct(u32),
    /// Not steered, and not a fallback (the counter says why): `redirect_https` on a plain
    /// group, or a TLS connection for the front end's own handshake.
    Front(u32),
}

const IPPROTO_TCP: u32 = 6;

/// The group's listening sockets: slot 0 the dispatcher, then each pool's sockets.
#[map]
static SOCKETS: ReusePortSockArray = ReusePortSockArray::with_max_entries(SOCKET_SLOTS, 0);

/// (site id, path prefix normalized to end in `/`) -> pool index; two copies,
/// `CONFIG[CFG_ROUTES]` says which is live (see `sluice_common::CFG_ROUTES`).
#[map]
static ROUTES_A: LpmTrie<[u8; ROUTE_KEY], u32> = LpmTrie::with_max_entries(MAX_ROUTES, 0);
#[map]
static ROUTES_B: LpmTrie<[u8; ROUTE_KEY], u32> = LpmTrie::with_max_entries(MAX_ROUTES, 0);

/// Host name, wildcard suffix or address -> site id; paired with the route maps.
#[map]
static SITES_A: HashMap<SiteKey, u32> = HashMap::with_max_entries(MAX_SITES, 0);
#[map]
static SITES_B: HashMap<SiteKey, u32> = HashMap::with_max_entries(MAX_SITES, 0);

/// Paths the front end answers from its cache (for some host), keyed like a route key's
/// data with site id 0 (the path, a `/` appended, zero-padded): a connection whose first
/// request is one goes to the dispatcher, which answers it or hands it on.
#[map]
pub(crate) static CACHED: HashMap<[u8; ROUTE_KEY], u8> =
    HashMap::with_max_entries(MAX_CACHED_PATHS, 0);

/// Pool index -> its slots in `SOCKETS` and its state.
#[map]
static POOLS: Array<PoolSlots> = Array::with_max_entries(MAX_POOLS, 0);

#[map]
pub(crate) static CONFIG: Array<u32> = Array::with_max_entries(CFG_LEN, 0);

/// See `sluice_common::counter`.
#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);

/// Per-CPU room for the request line and the keys: too big for the 512-byte stack.
#[repr(C)]
pub(crate) struct Scratch {
    pub(crate) line: [u8; LINE_WINDOW],
    pub(crate) key: Key<[u8; ROUTE_KEY]>,
    pub(crate) site: SiteKey,
    /// Values passed through memory so the verifier forgets them (see `parse::launder`).
    pub(crate) tmp: u64,
}

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub(crate) fn bump(index: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, written only by this CPU while the program runs.
        unsafe { *p += 1 };
    }
}

/// The live pair of maps (bit 0) and the kinds of site their routes have.
#[inline(always)]
fn live_routes() -> u32 {
    CONFIG.get(CFG_ROUTES).copied().unwrap_or(0)
}

/// The pool of the longest prefix of `key` in the live route map.
#[inline(always)]
fn route(live: u32, key: &Key<[u8; ROUTE_KEY]>) -> Option<u32> {
    if live & 1 == 1 {
        ROUTES_B.get(key).copied()
    } else {
        ROUTES_A.get(key).copied()
    }
}

/// The id of the site `key` names in the live site map.
#[inline(always)]
fn site(live: u32, key: &SiteKey) -> Option<u32> {
    // SAFETY: reading a plain u32 value from a hash map.
    unsafe {
        if live & 1 == 1 {
            SITES_B.get(key).copied()
        } else {
            SITES_A.get(key).copied()
        }
    }
}

/// The route of `site` for the path in `scratch.key`.
#[inline(always)]
fn route_in(live: u32, scratch: &mut Scratch, site: u32) -> Option<u32> {
    parse::set_site(scratch, site);
    route(live, &scratch.key)
}

/// The route of the site `scratch.site` names, if it names one.
#[inline(always)]
fn route_named(live: u32, scratch: &mut Scratch) -> Option<u32> {
    let id = site(live, &scratch.site)?;
    route_in(live, scratch, id)
}

/// Routes the request whose path is in `scratch.key`, trying the kinds of site in
/// `sluice_proto::site` order (strong, exact, wildcard label, address, weak).
#[inline(always)]
fn route_request(ctx: &SkReuseportContext, scratch: &mut Scratch, n: usize, end: usize) -> Verdict {
    let live = live_routes();
    if live & KIND_STRONG != 0 {
        if let Some(pool) = route_in(live, scratch, SITE_STRONG) {
            return Verdict::Pool(pool);
        }
    }
    if live & KIND_NAMED != 0 {
        if let Err(reason) = host::host_line(scratch, n, end) {
            return Verdict::Fallback(reason);
        }
        if let Some(pool) = route_named(live, scratch) {
            return Verdict::Pool(pool);
        }
        if host::to_wildcard(scratch) {
            if let Some(pool) = route_named(live, scratch) {
                return Verdict::Pool(pool);
            }
        }
    }
    if live & KIND_IP != 0 && host::local_address(ctx, scratch) {
        if let Some(pool) = route_named(live, scratch) {
            return Verdict::Pool(pool);
        }
    }
    match route_in(live, scratch, SITE_WEAK) {
        Some(pool) => Verdict::Pool(pool),
        None => Verdict::Fallback(counter::NO_ROUTE),
    }
}

/// The passthrough pool of the SNI name in `scratch.site`: a TLS group's route maps hold
/// only passthrough routes, each for the path `/`.
#[inline(always)]
fn route_server_name(scratch: &mut Scratch) -> Verdict {
    let live = live_routes();
    scratch.key.data = [0; sluice_common::ROUTE_KEY];
    scratch.key.data[sluice_common::SITE_ID_BYTES] = b'/';
    scratch.key.prefix_len = ((sluice_common::SITE_ID_BYTES + 1) * 8) as u32;
    if let Some(pool) = route_named(live, scratch) {
        return Verdict::Pool(pool);
    }
    if host::to_wildcard(scratch) {
        if let Some(pool) = route_named(live, scratch) {
            return Verdict::Pool(pool);
        }
    }
    Verdict::Front(counter::TLS_TERMINATED)
}

#[inline(always)]
fn mode() -> u32 {
    CONFIG.get(CFG_MODE).copied().unwrap_or(0)
}

/// Reads `len` bytes at `off` (offset 0 = the TCP header) into `dst`.
#[inline(always)]
pub(crate) fn load(ctx: &SkReuseportContext, off: u32, dst: *mut u8, len: u32) -> bool {
    // SAFETY: `dst` points at `len` writable bytes (a stack array or the scratch map value);
    // aya-ebpf has no safe wrapper for this helper on sk_reuseport contexts.
    unsafe { bpf_skb_load_bytes(ctx.as_ptr(), off, dst.cast(), len) >= 0 }
}

/// Decides where the connection goes, from the segment that is being looked up.
#[inline(always)]
fn classify(ctx: &SkReuseportContext) -> Verdict {
    if ctx.ip_protocol() != IPPROTO_TCP {
        return Verdict::Fallback(counter::NOT_HTTP);
    }
    // Read the context field once: the verifier rejects a second read through a modified
    // context pointer.
    let len = ctx.len() as u32;
    let mut th = [0u8; 14];
    if !load(ctx, 0, th.as_mut_ptr(), th.len() as u32) {
        return Verdict::Fallback(counter::NOT_HTTP);
    }
    if direct::active() {
        if let Some(pool) = direct::pool(ctx, u16::from_ne_bytes([th[0], th[1]])) {
            return Verdict::Direct(pool);
        }
    }
    let tls = CONFIG.get(CFG_GROUP).copied().unwrap_or(0) == GROUP_TLS;
    let redirect = !tls && live_routes() & KIND_REDIRECT != 0;
    let doff = ((th[12] >> 4) as u32) * 4;
    let syn = th[13] & 0x02 != 0;
    if len <= doff {
        return if syn && mode() == MODE_FIRST_SEGMENT {
            Verdict::Cookie
        } else if redirect {
            Verdict::Front(counter::REDIRECT)
        } else {
            Verdict::Fallback(counter::NO_PAYLOAD)
        };
    }
    // Counted once per connection: a first-segment SYN went by cookie above.
    if redirect {
        return Verdict::Front(counter::REDIRECT);
    }
    let avail = len - doff;
    // A size the verifier can bound to 1..=LINE_WINDOW without trusting `len > doff`.
    let n = if avail >= LINE_WINDOW as u32 {
        LINE_WINDOW as u32
    } else {
        ((avail - 1) & (LINE_WINDOW as u32 - 1)) + 1
    };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Verdict::Fallback(counter::NOT_HTTP);
    };
    // SAFETY: the per-CPU scratch value is ours for the duration of this program run.
    let scratch = unsafe { &mut *scratch };
    if tls {
        return match hello::server_name(ctx, doff, len, scratch) {
            Ok(()) => route_server_name(scratch),
            Err(reason) => Verdict::Fallback(reason),
        };
    }
    // The payload is not in the linear area: it has to be copied out with the helper.
    if !load(ctx, doff, scratch.line.as_mut_ptr(), n) {
        return Verdict::Fallback(counter::NOT_HTTP);
    }
    let n = n as usize;
    let end = match parse::request_line(scratch, n) {
        Ok(end) => end,
        Err(reason) => return Verdict::Fallback(reason),
    };
    // SAFETY: reading a plain byte value from a hash map.
    if unsafe { CACHED.get(&scratch.key.data) }.is_some() {
        return Verdict::Cached;
    }
    route_request(ctx, scratch, n, end)
}

#[inline(always)]
fn select(ctx: &SkReuseportContext, slot: u32) -> bool {
    SOCKETS.select_reuseport(ctx, slot).is_ok()
}

/// Selects the dispatcher; a failure must not fall into the kernel's hash over the whole
/// group (which would hand the connection to an arbitrary pool), so it drops instead.
#[inline(always)]
fn to_dispatcher(ctx: &SkReuseportContext) -> u32 {
    if select(ctx, DISPATCHER_SLOT) {
        SK_PASS
    } else {
        SK_DROP
    }
}

#[inline(always)]
fn steer_new(ctx: &SkReuseportContext) -> u32 {
    bump(counter::RUNS);
    let pool = match classify(ctx) {
        Verdict::Pool(p) => p,
        Verdict::Direct(p) => return to_direct(ctx, p),
        Verdict::Cached => {
            bump(counter::CACHED);
            return to_dispatcher(ctx);
        }
        Verdict::Cookie => {
            bump(counter::SYN_COOKIE);
            return to_dispatcher(ctx);
        }
        Verdict::Front(why) => {
            bump(why);
            return to_dispatcher(ctx);
        }
        Verdict::Fallback(reason) => {
            bump(reason);
            return to_dispatcher(ctx);
        }
    };
    if pool == ROUTE_SHARED {
        bump(counter::SHARED_SITE);
        return to_dispatcher(ctx);
    }
    let Some(slots) = POOLS.get(pool) else {
        bump(counter::NO_ROUTE);
        return to_dispatcher(ctx);
    };
    if slots.flags & POOL_FLAG_STOPPED != 0 {
        bump(counter::POOL_STOPPED);
        return to_dispatcher(ctx);
    }
    if slots.flags & POOL_FLAG_RELAY != 0 {
        bump(counter::RELAY_ONLY);
        return to_dispatcher(ctx);
    }
    if slots.count == 0 {
        bump(counter::SELECT_FAILED);
        return to_dispatcher(ctx);
    }
    let slot = slots.first + ctx.hash() % slots.count;
    if select(ctx, slot) {
        bump(counter::POOL_BASE + (pool % MAX_POOLS));
        SK_PASS
    } else {
        bump(counter::SELECT_FAILED);
        to_dispatcher(ctx)
    }
}

/// A front-end connection goes to its pool's socket or is refused: the dispatcher would
/// route it again, to the same relay.
#[inline(always)]
fn to_direct(ctx: &SkReuseportContext, pool: u32) -> u32 {
    let Some(slots) = POOLS.get(pool) else {
        return SK_DROP;
    };
    if slots.count == 0 {
        return SK_DROP;
    }
    if select(ctx, slots.first + ctx.hash() % slots.count) {
        bump(counter::DIRECT);
        SK_PASS
    } else {
        SK_DROP
    }
}

#[sk_reuseport]
pub fn steer(ctx: SkReuseportContext) -> u32 {
    steer_new(&ctx)
}

#[sk_reuseport(migrate)]
pub fn steer_migrate(ctx: SkReuseportContext) -> u32 {
    if ctx.migrating_sk().is_some() {
        // A pool socket is closing: its queued connections are established and their
        // request is already buffered; the dispatcher reads it and routes it afresh.
        bump(counter::MIGRATED);
        return to_dispatcher(&ctx);
    }
    steer_new(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
