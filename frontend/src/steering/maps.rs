//! Reads and writes of the steering maps. Keys and values come from `sluice_common`.

use std::os::fd::AsRawFd;

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapError, PerCpuArray, ReusePortSockArray, lpm_trie::Key},
};
use sluice_common::{
    HOST_KEY, MAX_PREFIX, PoolSlots, ROUTE_KEY, SITE_EXACT, SITE_ID_BYTES, SITE_IP4, SITE_IP6,
    SITE_WILDCARD, SiteKey, counter,
};
use sluice_proto::site::Site;

use super::SteeringError;

fn map_error(what: impl Into<String>) -> impl FnOnce(MapError) -> SteeringError {
    let what = what.into();
    move |cause| SteeringError::Map { what, cause }
}

fn map<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::maps::Map, SteeringError> {
    ebpf.map_mut(name).ok_or(SteeringError::Missing(name))
}

pub(super) fn set_config(ebpf: &mut Ebpf, index: u32, value: u32) -> Result<(), SteeringError> {
    let mut config: Array<_, u32> = map(ebpf, "CONFIG")?
        .try_into()
        .map_err(map_error("CONFIG"))?;
    config
        .set(index, value, 0)
        .map_err(map_error(format!("CONFIG[{index}]")))
}

pub(super) fn set_socket(
    ebpf: &mut Ebpf,
    slot: u32,
    socket: &impl AsRawFd,
) -> Result<(), SteeringError> {
    let mut sockets: ReusePortSockArray<_> = map(ebpf, "SOCKETS")?
        .try_into()
        .map_err(map_error("SOCKETS"))?;
    // A socket kept from an earlier run (systemd's fd store) stays in that run's array, and
    // the kernel refuses it in a second one (EBUSY), until the earlier program, replaced by
    // ours when its group was attached, is freed: shortly after (an RCU grace period).
    let deadline = std::time::Instant::now() + EARLIER_ARRAY_PATIENCE;
    loop {
        match sockets.set(slot, socket, 0) {
            Err(MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            other => return other.map_err(map_error(format!("SOCKETS[{slot}]"))),
        }
    }
}

/// How long a socket may stay in an earlier run's array after our program replaced it.
const EARLIER_ARRAY_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

pub(super) fn set_pool(ebpf: &mut Ebpf, pool: u32, slots: PoolSlots) -> Result<(), SteeringError> {
    let mut pools: Array<_, PoolSlots> =
        map(ebpf, "POOLS")?.try_into().map_err(map_error("POOLS"))?;
    pools
        .set(pool, slots, 0)
        .map_err(map_error(format!("POOLS[{pool}]")))
}

/// The trie key for site `site` and a normalized prefix (ends in `/`): the site id, then the
/// prefix's bytes; its length in bits.
pub(super) fn route_key(site: u32, prefix: &str) -> Key<[u8; ROUTE_KEY]> {
    let mut data = [0u8; ROUTE_KEY];
    data[..SITE_ID_BYTES].copy_from_slice(&site.to_be_bytes());
    let n = prefix.len().min(MAX_PREFIX);
    data[SITE_ID_BYTES..SITE_ID_BYTES + n].copy_from_slice(&prefix.as_bytes()[..n]);
    Key::new(((SITE_ID_BYTES + n) * 8) as u32, data)
}

/// The site map's key for a named site; None for the wildcards (fixed ids) and for names
/// longer than the kernel's key (the program sends such hosts to the dispatcher).
pub(super) fn site_key(site: &Site) -> Option<SiteKey> {
    let mut name = [0u8; HOST_KEY];
    let (kind, bytes): (u32, Vec<u8>) = match site {
        Site::Exact(n) => (SITE_EXACT, n.as_bytes().to_vec()),
        Site::Wildcard(s) => (SITE_WILDCARD, s.as_bytes().to_vec()),
        Site::Ip(std::net::IpAddr::V4(a)) => (SITE_IP4, a.octets().to_vec()),
        Site::Ip(std::net::IpAddr::V6(a)) => (SITE_IP6, a.octets().to_vec()),
        Site::Strong | Site::Weak => return None,
    };
    if bytes.len() > HOST_KEY {
        return None;
    }
    name[..bytes.len()].copy_from_slice(&bytes);
    Some(SiteKey { kind, name })
}

fn route_map(which: u32) -> &'static str {
    if which == 1 { "ROUTES_B" } else { "ROUTES_A" }
}

fn site_map(which: u32) -> &'static str {
    if which == 1 { "SITES_B" } else { "SITES_A" }
}

/// Makes map pair `which` hold exactly `sites` (key -> id) and `routes` ((site id, prefix)
/// -> pool).
pub(super) fn fill_routes(
    ebpf: &mut Ebpf,
    which: u32,
    sites: &[(SiteKey, u32)],
    routes: &[(u32, String, u32)],
) -> Result<(), SteeringError> {
    clear_routes(ebpf, which)?;
    let name = site_map(which);
    let mut site_ids: HashMap<_, SiteKey, u32> =
        map(ebpf, name)?.try_into().map_err(map_error(name))?;
    for (key, id) in sites {
        site_ids
            .insert(key, *id, 0)
            .map_err(map_error(format!("{name}[site {id}]")))?;
    }
    let name = route_map(which);
    let mut trie: LpmTrie<_, [u8; ROUTE_KEY], u32> =
        map(ebpf, name)?.try_into().map_err(map_error(name))?;
    for (site, prefix, pool) in routes {
        trie.insert(&route_key(*site, prefix), *pool, 0)
            .map_err(map_error(format!("{name}[site {site} {prefix}]")))?;
    }
    Ok(())
}

pub(super) fn clear_routes(ebpf: &mut Ebpf, which: u32) -> Result<(), SteeringError> {
    let name = route_map(which);
    let mut map: LpmTrie<_, [u8; ROUTE_KEY], u32> =
        map(ebpf, name)?.try_into().map_err(map_error(name))?;
    let keys: Vec<Key<[u8; ROUTE_KEY]>> = map.keys().filter_map(Result::ok).collect();
    for k in keys {
        map.remove(&k)
            .map_err(map_error(format!("{name}: removing a route")))?;
    }
    let name = site_map(which);
    let mut site_ids: HashMap<_, SiteKey, u32> =
        self::map(ebpf, name)?.try_into().map_err(map_error(name))?;
    let keys: Vec<SiteKey> = site_ids.keys().filter_map(Result::ok).collect();
    for k in keys {
        site_ids
            .remove(&k)
            .map_err(map_error(format!("{name}: removing a site")))?;
    }
    Ok(())
}

pub(super) fn set_gated_ports(ebpf: &mut Ebpf, ports: &[u16]) -> Result<(), SteeringError> {
    let mut gated: HashMap<_, u16, u8> = map(ebpf, "GATED_PORTS")?
        .try_into()
        .map_err(map_error("GATED_PORTS"))?;
    for &port in ports {
        gated
            .insert(port, 1, 0)
            .map_err(map_error(format!("GATED_PORTS[{port}]")))?;
    }
    Ok(())
}

/// The steering counters (see `sluice_common::counter`), summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters(pub Vec<u64>);

impl Counters {
    pub fn get(&self, index: u32) -> u64 {
        self.0.get(index as usize).copied().unwrap_or(0)
    }

    pub fn steered(&self, pool: usize) -> u64 {
        self.get(counter::POOL_BASE + pool as u32)
    }

    pub(super) fn add(&mut self, other: &Counters) {
        if self.0.len() < other.0.len() {
            self.0.resize(other.0.len(), 0);
        }
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a += b;
        }
    }
}

/// The counters at `indexes` (others read as 0): one syscall per index.
pub(super) fn counters(
    ebpf: &Ebpf,
    indexes: std::ops::Range<u32>,
) -> Result<Counters, SteeringError> {
    let m = ebpf
        .map("COUNTERS")
        .ok_or(SteeringError::Missing("COUNTERS"))?;
    let array: PerCpuArray<_, u64> = m.try_into().map_err(map_error("COUNTERS"))?;
    let mut out = vec![0u64; counter::LEN as usize];
    for (i, slot) in out
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| indexes.contains(&(*i as u32)))
    {
        let values = array
            .get(&(i as u32), 0)
            .map_err(map_error(format!("COUNTERS[{i}]")))?;
        *slot = values.iter().sum();
    }
    Ok(Counters(out))
}

pub(super) fn reset_counter(ebpf: &mut Ebpf, index: u32) -> Result<(), SteeringError> {
    let mut array: PerCpuArray<_, u64> = map(ebpf, "COUNTERS")?
        .try_into()
        .map_err(map_error("COUNTERS"))?;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| SteeringError::Map {
        what: "counting CPUs".into(),
        cause: MapError::SyscallError(aya::sys::SyscallError {
            call: "nr_cpus",
            io_error: e,
        }),
    })?;
    let zeros =
        aya::maps::PerCpuValues::try_from(vec![0u64; cpus]).map_err(|e| SteeringError::Map {
            what: "zero counters".into(),
            cause: MapError::SyscallError(aya::sys::SyscallError {
                call: "PerCpuValues",
                io_error: e,
            }),
        })?;
    array
        .set(index, zeros, 0)
        .map_err(map_error(format!("COUNTERS[{index}]")))
}

/// The kernel's key for a cached path: like a route key's data with site id 0 (the path,
/// then `/`), zero padded. Paths too long for it are not steered to the cache (the
/// dispatcher still answers them when their connection reaches it).
pub(super) fn cached_key(path: &str) -> Option<[u8; ROUTE_KEY]> {
    if path.len() + 1 > MAX_PREFIX {
        return None;
    }
    let mut data = [0u8; ROUTE_KEY];
    let at = SITE_ID_BYTES + path.len();
    data[SITE_ID_BYTES..at].copy_from_slice(path.as_bytes());
    data[at] = b'/';
    Some(data)
}

pub(super) fn set_cached(ebpf: &mut Ebpf, path: &str, cached: bool) -> Result<(), SteeringError> {
    let Some(key) = cached_key(path) else {
        return Ok(());
    };
    let mut map: HashMap<_, [u8; ROUTE_KEY], u8> = map(ebpf, "CACHED")?
        .try_into()
        .map_err(map_error("CACHED"))?;
    if cached {
        map.insert(key, 1, 0)
            .map_err(map_error(format!("CACHED[{path}]")))
    } else {
        match map.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            // aya reports a missing key as the syscall's ENOENT: already gone, as wanted.
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(e) => Err(map_error(format!("CACHED[{path}]"))(e)),
        }
    }
}
