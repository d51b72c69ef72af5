//! Connections the front end opens itself to one of its listen addresses, to put them into
//! a given pool's queue: relays of dispatcher-routed connections to socket pools, and
//! health probes. They are told apart by their source (address, port), which the front end
//! writes into `DIRECT` before it connects and removes once the connection is closed.

use aya_ebpf::{macros::map, maps::HashMap, programs::SkReuseportContext};
use sluice_common::{CFG_DIRECT, DirectKey, MAX_DIRECT};

use crate::CONFIG;
use crate::host::load_net;

/// Source of a front-end connection -> the pool whose queue it goes to.
#[map]
pub(crate) static DIRECT: HashMap<DirectKey, u32> = HashMap::with_max_entries(MAX_DIRECT, 0);

/// The front end has connections in `DIRECT`: only then is the source read.
#[inline(always)]
pub(crate) fn active() -> bool {
    CONFIG.get(CFG_DIRECT).copied().unwrap_or(0) != 0
}

/// The pool a connection from `sport` (network order) of the front end's goes to.
#[inline(always)]
pub(crate) fn pool(ctx: &SkReuseportContext, sport: u16) -> Option<u32> {
    let mut key = DirectKey {
        port: sport,
        ..DirectKey::default()
    };
    let mut version = [0u8; 1];
    if !load_net(ctx, 0, version.as_mut_ptr(), 1) {
        return None;
    }
    let ok = match version[0] >> 4 {
        4 => {
            key.family = 4;
            load_net(ctx, 12, key.addr.as_mut_ptr(), 4)
        }
        6 => {
            key.family = 6;
            load_net(ctx, 8, key.addr.as_mut_ptr(), 16)
        }
        _ => false,
    };
    if !ok {
        return None;
    }
    lookup(&key)
}

#[inline(always)]
pub(crate) fn lookup(key: &DirectKey) -> Option<u32> {
    // SAFETY: reading a plain u32 value from a hash map.
    unsafe { DIRECT.get(key) }.copied()
}
