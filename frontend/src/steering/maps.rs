//! Reads and writes of the steering maps. Keys and values come from `sluice_common`.

use std::os::fd::AsRawFd;

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapError, PerCpuArray, ReusePortSockArray, lpm_trie::Key},
};
use sluice_common::{MAX_PREFIX, PoolSlots, counter};

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
    sockets
        .set(slot, socket, 0)
        .map_err(map_error(format!("SOCKETS[{slot}]")))
}

pub(super) fn set_pool(ebpf: &mut Ebpf, pool: u32, slots: PoolSlots) -> Result<(), SteeringError> {
    let mut pools: Array<_, PoolSlots> =
        map(ebpf, "POOLS")?.try_into().map_err(map_error("POOLS"))?;
    pools
        .set(pool, slots, 0)
        .map_err(map_error(format!("POOLS[{pool}]")))
}

/// The trie key for a normalized prefix (ends in `/`): its bytes, length in bits.
pub(super) fn route_key(prefix: &str) -> Key<[u8; MAX_PREFIX]> {
    let mut data = [0u8; MAX_PREFIX];
    let n = prefix.len().min(MAX_PREFIX);
    data[..n].copy_from_slice(&prefix.as_bytes()[..n]);
    Key::new((n * 8) as u32, data)
}

fn route_map(which: u32) -> &'static str {
    if which == 1 { "ROUTES_B" } else { "ROUTES_A" }
}

/// Makes route map `which` hold exactly `routes`.
pub(super) fn fill_routes(
    ebpf: &mut Ebpf,
    which: u32,
    routes: &[(String, u32)],
) -> Result<(), SteeringError> {
    clear_routes(ebpf, which)?;
    let name = route_map(which);
    let mut map: LpmTrie<_, [u8; MAX_PREFIX], u32> =
        map(ebpf, name)?.try_into().map_err(map_error(name))?;
    for (prefix, pool) in routes {
        map.insert(&route_key(prefix), *pool, 0)
            .map_err(map_error(format!("{name}[{prefix}]")))?;
    }
    Ok(())
}

pub(super) fn clear_routes(ebpf: &mut Ebpf, which: u32) -> Result<(), SteeringError> {
    let name = route_map(which);
    let mut map: LpmTrie<_, [u8; MAX_PREFIX], u32> =
        map(ebpf, name)?.try_into().map_err(map_error(name))?;
    let keys: Vec<Key<[u8; MAX_PREFIX]>> = map.keys().filter_map(Result::ok).collect();
    for k in keys {
        map.remove(&k)
            .map_err(map_error(format!("{name}: removing a route")))?;
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

/// The kernel's key for a cached path: like a route key's data (the path, then `/`), zero
/// padded. Paths too long for it are not steered to the cache (the dispatcher still answers
/// them when their connection reaches it).
pub(super) fn cached_key(path: &str) -> Option<[u8; MAX_PREFIX]> {
    if path.len() + 1 > MAX_PREFIX {
        return None;
    }
    let mut data = [0u8; MAX_PREFIX];
    data[..path.len()].copy_from_slice(path.as_bytes());
    data[path.len()] = b'/';
    Some(data)
}

pub(super) fn set_cached(ebpf: &mut Ebpf, path: &str, cached: bool) -> Result<(), SteeringError> {
    let Some(key) = cached_key(path) else {
        return Ok(());
    };
    let mut map: HashMap<_, [u8; MAX_PREFIX], u8> = map(ebpf, "CACHED")?
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
