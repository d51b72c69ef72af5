//! Layout shared by the kernel programs (`sluice-ebpf`) and the front end.
//!
//! Everything here is part of the contract between the BPF object and user space: change
//! both sides together. The user-space contract between the front end and its workers is
//! `sluice-proto`.
#![cfg_attr(not(feature = "std"), no_std)]

/// Bytes of a path prefix an LPM-trie key holds. Routes longer than this are refused by
/// the config check; longer request paths are still steered by their first bytes.
pub const MAX_PREFIX: usize = 128;
/// Bytes of the first data segment the steering program looks at for `METHOD SP PATH`.
/// A path whose end is not within this window goes to the dispatcher.
pub const LINE_WINDOW: usize = 256;
/// Most pools one front end serves (index into `POOLS`).
pub const MAX_POOLS: u32 = 64;
/// Most routes in the prefix map.
pub const MAX_ROUTES: u32 = 1024;
/// Socket-array slots per reuseport group.
pub const SOCKET_SLOTS: u32 = 256;
/// Slot of the front end's dispatcher socket in every group.
pub const DISPATCHER_SLOT: u32 = 0;
/// Most paths in the kernel's set of cached paths.
pub const MAX_CACHED_PATHS: u32 = 4096;
/// Most listening ports the ack gate knows.
pub const MAX_GATED_PORTS: u32 = 64;

/// `CONFIG[CFG_MODE]`: how SYNs without data are counted.
pub const CFG_MODE: u32 = 0;
/// `CONFIG[CFG_ROUTES]`: which prefix map is live, 0 (`ROUTES_A`) or 1 (`ROUTES_B`). A
/// reload fills the other one, then flips this: the route table changes at once.
pub const CFG_ROUTES: u32 = 1;
pub const CFG_LEN: u32 = 4;
pub const MODE_SYN: u32 = 0;
pub const MODE_FIRST_SEGMENT: u32 = 1;

/// `POOLS[i]`: the pool's sockets in the group's socket array and its state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolSlots {
    pub first: u32,
    pub count: u32,
    pub flags: u32,
    pub _pad: u32,
}

/// The pool is stopped: its connections go to the dispatcher (which answers 503).
pub const POOL_FLAG_STOPPED: u32 = 1;

#[cfg(feature = "user")]
// SAFETY: PoolSlots is repr(C), made of u32s only, with no padding and no invalid bit patterns.
unsafe impl aya::Pod for PoolSlots {}

/// Indexes into the per-CPU `COUNTERS` array.
pub mod counter {
    /// Fallback: a segment with no payload (a SYN in syn mode, or an ACK the gate let through).
    pub const NO_PAYLOAD: u32 = 0;
    /// Fallback: the payload does not start with `METHOD SP /`.
    pub const NOT_HTTP: u32 = 1;
    /// Fallback: the path holds `%`, `\`, `#`, `//`, `/./`, `/../` or a byte outside visible ASCII.
    pub const UNSAFE_PATH: u32 = 2;
    /// Fallback: the path does not end within the segment's first `LINE_WINDOW` bytes.
    pub const INCOMPLETE: u32 = 3;
    /// Fallback: no route matches the path.
    pub const NO_ROUTE: u32 = 4;
    /// Fallback: the route's pool is stopped.
    pub const POOL_STOPPED: u32 = 5;
    /// Fallback: selecting the pool's socket failed (empty slot); the dispatcher took it.
    pub const SELECT_FAILED: u32 = 6;
    /// A closing listener's queued connection moved to the dispatcher.
    pub const MIGRATED: u32 = 7;
    /// Not a fallback: in first-segment mode a SYN without data is answered by cookie and
    /// the connection is steered again when its first data segment arrives.
    pub const SYN_COOKIE: u32 = 8;
    /// Not a fallback: pure ACKs dropped by the ack gate (first-segment mode).
    pub const ACK_GATE_DROPS: u32 = 9;
    /// Total runs of the steering program.
    pub const RUNS: u32 = 10;
    /// Not a fallback: the first request's path is in the front end's cache, so the
    /// connection goes to the dispatcher, which answers it without a worker.
    pub const CACHED: u32 = 11;
    /// Connections steered in the kernel to pool `i` count at `POOL_BASE + i`.
    pub const POOL_BASE: u32 = 16;
    pub const LEN: u32 = POOL_BASE + super::MAX_POOLS;

    /// Fallback counters and the names status reports them under.
    pub const FALLBACKS: [(u32, &str); 8] = [
        (NO_PAYLOAD, "no_payload"),
        (NOT_HTTP, "not_http"),
        (UNSAFE_PATH, "unsafe_path"),
        (INCOMPLETE, "incomplete_line"),
        (NO_ROUTE, "no_route"),
        (POOL_STOPPED, "pool_stopped"),
        (SELECT_FAILED, "select_failed"),
        (MIGRATED, "migrated"),
    ];
}
