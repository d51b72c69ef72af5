//! Layout shared by the kernel programs (`sluice-ebpf`) and the front end.
//!
//! Everything here is part of the contract between the BPF object and user space: change
//! both sides together. The user-space contract between the front end and its workers is
//! `sluice-proto`.
#![cfg_attr(not(feature = "std"), no_std)]

/// Bytes of a path prefix an LPM-trie key holds. Routes longer than this are refused by
/// the config check; longer request paths are still steered by their first bytes.
pub const MAX_PREFIX: usize = 128;
/// Bytes of the first data segment the steering program looks at for `METHOD SP PATH` and,
/// when some route names a host, the `Host` line right after the request line. A path (or
/// Host line) whose end is not within this window goes to the dispatcher.
pub const LINE_WINDOW: usize = 256;
/// Bytes of a host name a site key holds; a request whose Host is longer goes to the
/// dispatcher (counted as `host_too_long`).
pub const HOST_KEY: usize = 64;
/// Bytes of the site id (big-endian) that starts a route key.
pub const SITE_ID_BYTES: usize = 4;
/// Bytes of a route key: the site id, then the path key (`MAX_PREFIX`).
pub const ROUTE_KEY: usize = SITE_ID_BYTES + MAX_PREFIX;
/// Most sites (distinct route hosts) in the site map.
pub const MAX_SITES: u32 = 1024;
/// Site id of the strong wildcard (`host = "+"`) routes.
pub const SITE_STRONG: u32 = 0;
/// Site id of the weak wildcard routes (no `host`).
pub const SITE_WEAK: u32 = 1;
/// The first id given to a named site.
pub const SITE_FIRST_NAMED: u32 = 2;
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
/// Most connections of the front end's own (relays to socket pools, health probes) in a
/// group's `DIRECT` map at once.
pub const MAX_DIRECT: u32 = 65536;

/// `CONFIG[CFG_MODE]`: how SYNs without data are counted.
pub const CFG_MODE: u32 = 0;
/// `CONFIG[CFG_ROUTES]`: bit 0 says which pair of maps is live, 0 (`ROUTES_A`, `SITES_A`)
/// or 1 (`ROUTES_B`, `SITES_B`); the `KIND_*` bits say which kinds of site their routes
/// have (the program skips the lookups of the others). A reload fills the other pair, then
/// writes this word once: the whole table changes at once.
pub const CFG_ROUTES: u32 = 1;
/// Some route has `host = "+"`.
pub const KIND_STRONG: u32 = 1 << 1;
/// Some route names a host (exact or wildcard label): the program reads the Host line.
pub const KIND_NAMED: u32 = 1 << 2;
/// Some route is bound to an IP address: the program reads the packet's destination.
pub const KIND_IP: u32 = 1 << 3;
/// Plain requests all get 308 to https (`redirect_https`): the program sends every new
/// connection of a plain group to the dispatcher, which answers them.
pub const KIND_REDIRECT: u32 = 1 << 4;
/// `CONFIG[CFG_DIRECT]`: non-zero while the front end has connections of its own in
/// `DIRECT` (the program skips reading the source address otherwise).
pub const CFG_DIRECT: u32 = 2;
/// `CONFIG[CFG_GROUP]`: what the group's listen address serves, `GROUP_PLAIN` or
/// `GROUP_TLS`. A TLS group's slot 0 is the front end's TLS listener; the program reads the
/// SNI name of the ClientHello in the first segment and steers only the names of
/// `tls = "passthrough"` pools (its route maps hold only their routes, each for `/`).
pub const CFG_GROUP: u32 = 3;
pub const CFG_LEN: u32 = 4;
pub const GROUP_PLAIN: u32 = 0;
pub const GROUP_TLS: u32 = 1;
pub const MODE_SYN: u32 = 0;
pub const MODE_FIRST_SEGMENT: u32 = 1;

/// `SITES_*` key: a host name (lower case, no port, no trailing dot, zero-padded), a
/// wildcard route's suffix, or an address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteKey {
    pub kind: u32,
    pub name: [u8; HOST_KEY],
}

pub const SITE_EXACT: u32 = 1;
/// The suffix after `*.`; looked up with the request's host minus its first label.
pub const SITE_WILDCARD: u32 = 2;
/// `name[..4]`: an IPv4 address in network order.
pub const SITE_IP4: u32 = 3;
/// `name[..16]`: an IPv6 address in network order.
pub const SITE_IP6: u32 = 4;

#[cfg(feature = "user")]
// SAFETY: SiteKey is repr(C): a u32 then bytes, 68 bytes with no padding.
unsafe impl aya::Pod for SiteKey {}

/// `DIRECT` key: the source of a connection the front end itself opened to one of its
/// listen addresses, to put it into a given pool's queue (a relay to a socket pool, a health
/// probe). The source is always one of the host's own addresses, which a packet from outside
/// cannot carry (the kernel drops such martians), and the port is one the front end holds
/// bound while the entry exists.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DirectKey {
    /// IPv4 in `addr[..4]` (network order), or IPv6.
    pub addr: [u8; 16],
    /// The source port in network order, as the TCP header holds it.
    pub port: u16,
    /// 4 or 6.
    pub family: u8,
    pub _pad: u8,
}

#[cfg(feature = "user")]
// SAFETY: DirectKey is repr(C): 16 bytes, a u16 and two u8s, 20 bytes with no padding.
unsafe impl aya::Pod for DirectKey {}

/// `POOLS[i]`: the pool's sockets in the group's socket array and its state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolSlots {
    pub first: u32,
    pub count: u32,
    pub flags: u32,
    pub _pad: u32,
}

/// A route value that is no pool: the route's site is shared by pools that do not trust
/// each other, and its connections go to the dispatcher (`counter::SHARED_SITE`).
pub const ROUTE_SHARED: u32 = u32::MAX - 1;

/// The pool is stopped: its connections go to the dispatcher (which answers 503).
pub const POOL_FLAG_STOPPED: u32 = 1;
/// Every connection of the pool goes through the front end's relay (`proxy_protocol`, so
/// each one starts with a PROXY header): the program sends them to the dispatcher.
pub const POOL_FLAG_RELAY: u32 = 2;

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
    /// Fallback: some route names a host, and no `Host` line follows the request line
    /// within the window (an HTTP/1.0 request without one, another header first).
    pub const NO_HOST: u32 = 12;
    /// Fallback: the Host is longer than `HOST_KEY`.
    pub const HOST_TOO_LONG: u32 = 13;
    /// Fallback: the Host line holds what the program does not read (an IPv6 literal, an
    /// empty label, a bad port, other bytes).
    pub const BAD_HOST: u32 = 14;
    /// Not a fallback: connections of the front end's own put into a pool's queue (`DIRECT`).
    pub const DIRECT: u32 = 15;
    /// Fallback: the route's pool takes its connections through the relay only.
    pub const RELAY_ONLY: u32 = 16;
    /// Not a fallback: `redirect_https` sends every plain connection to the dispatcher.
    pub const REDIRECT: u32 = 17;
    /// Not a fallback: a TLS connection whose SNI name no passthrough pool serves goes to
    /// the front end's own handshake.
    pub const TLS_TERMINATED: u32 = 18;
    /// Fallback (TLS group): the first segment does not start a ClientHello.
    pub const NOT_HELLO: u32 = 19;
    /// Fallback (TLS group): the ClientHello's SNI name is not within the first segment, or
    /// comes after more extensions than the program walks.
    pub const HELLO_INCOMPLETE: u32 = 20;
    /// Fallback (TLS group): the ClientHello names no server.
    pub const NO_SNI: u32 = 21;
    /// Fallback (TLS group): the SNI name holds what a host name cannot, or is longer than
    /// `HOST_KEY`.
    pub const BAD_SNI: u32 = 22;
    /// Fallback: the route's host is shared by pools that do not trust each other, so the
    /// front end keeps the connection and delivers each request (`ROUTE_SHARED`).
    pub const SHARED_SITE: u32 = 23;
    /// Connections steered in the kernel to pool `i` count at `POOL_BASE + i`.
    pub const POOL_BASE: u32 = 32;
    pub const LEN: u32 = POOL_BASE + super::MAX_POOLS;

    /// Fallback counters and the names status reports them under.
    pub const FALLBACKS: [(u32, &str); 17] = [
        (NO_PAYLOAD, "no_payload"),
        (NOT_HTTP, "not_http"),
        (UNSAFE_PATH, "unsafe_path"),
        (INCOMPLETE, "incomplete_line"),
        (NO_ROUTE, "no_route"),
        (POOL_STOPPED, "pool_stopped"),
        (SELECT_FAILED, "select_failed"),
        (MIGRATED, "migrated"),
        (NO_HOST, "no_host"),
        (HOST_TOO_LONG, "host_too_long"),
        (BAD_HOST, "bad_host"),
        (RELAY_ONLY, "relay_only"),
        (NOT_HELLO, "not_hello"),
        (HELLO_INCOMPLETE, "hello_incomplete"),
        (NO_SNI, "no_sni"),
        (BAD_SNI, "bad_sni"),
        (SHARED_SITE, "shared_site"),
    ];
}
