//! The kernel side of routing: loads sluice's eBPF object once per listen address (one
//! SO_REUSEPORT group each), attaches the steering program to the group, and — in
//! first-segment mode — the ack gate to the interfaces the listen addresses use.
//! Map contents are written through `maps`; interfaces are found by `gate`.

mod gate;
mod maps;

use std::os::fd::{AsFd, AsRawFd};

use aya::{
    Ebpf,
    programs::{ProgramError, SchedClassifier, SkReuseport, TcAttachType},
};

use sluice_common::{
    KIND_IP, KIND_NAMED, KIND_STRONG, SITE_FIRST_NAMED, SITE_STRONG, SITE_WEAK, SiteKey,
};
use sluice_proto::site::Site;

pub use gate::interfaces_for;
pub use maps::Counters;

/// The object built by `cargo xtask build-ebpf` (see build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("SLUICE_EBPF_OBJECT"));

/// The steering program attached to every group: the `migrate` variant, so a closing pool
/// socket's queue moves to the dispatcher instead of being hashed across pools.
const STEER_PROGRAM: &str = "steer_migrate";
const GATE_PROGRAM: &str = "ack_gate";

#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    // The cause is also the source, so the binary's report reaches the OS error beneath it
    // (and says each part once).
    #[error("{what}: {cause}")]
    Program {
        what: String,
        #[source]
        cause: ProgramError,
    },
    #[error("{what}: {cause}")]
    Map {
        what: String,
        #[source]
        cause: aya::maps::MapError,
    },
}

fn program_error(what: impl Into<String>) -> impl FnOnce(ProgramError) -> SteeringError {
    let what = what.into();
    move |cause| {
        // The verifier log is the only useful part of a load failure.
        let what = match &cause {
            ProgramError::LoadError { verifier_log, .. } => {
                let log = verifier_log.to_string();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(30)..].join("\n");
                format!("{what}\nverifier log (last lines):\n{tail}")
            }
            _ => what,
        };
        let cause = match cause {
            ProgramError::LoadError { io_error, .. } => ProgramError::IOError(io_error),
            other => other,
        };
        SteeringError::Program { what, cause }
    }
}

/// One loaded copy of the object per reuseport group: the plain listen addresses' first,
/// then the TLS listen addresses'.
pub struct Steering {
    groups: Vec<Ebpf>,
    /// The index of the first TLS group.
    tls_from: usize,
    gated: Vec<String>,
    /// Which of the two route maps is live.
    live_routes: u32,
    /// What the program before an upgrade had counted.
    earlier: Counters,
}

impl Steering {
    /// Loads and verifies the programs for `plain` reuseport groups, then `tls` TLS ones.
    pub fn load(plain: usize, tls: usize) -> Result<Steering, SteeringError> {
        let mut loaded = Vec::with_capacity(plain + tls);
        for g in 0..plain + tls {
            // No kernel BTF: the programs need no CO-RE relocation, and parsing vmlinux's BTF
            // would cost tens of MiB of peak memory per copy.
            let mut ebpf = aya::EbpfLoader::new().btf(None).load(OBJECT)?;
            let prog: &mut SkReuseport = ebpf
                .program_mut(STEER_PROGRAM)
                .ok_or(SteeringError::Missing(STEER_PROGRAM))?
                .try_into()
                .map_err(program_error(STEER_PROGRAM))?;
            prog.load().map_err(program_error(format!(
                "verifying {STEER_PROGRAM} (group {g})"
            )))?;
            if g >= plain {
                maps::set_config(
                    &mut ebpf,
                    sluice_common::CFG_GROUP,
                    sluice_common::GROUP_TLS,
                )?;
            }
            loaded.push(ebpf);
        }
        Ok(Steering {
            groups: loaded,
            tls_from: plain,
            gated: Vec::new(),
            live_routes: 0,
            earlier: Counters::default(),
        })
    }

    /// Attaches the steering program to the group `socket` belongs to.
    pub fn attach(&self, group: usize, socket: impl AsFd) -> Result<(), SteeringError> {
        let ebpf = &self.groups[group];
        let prog: &SkReuseport = ebpf
            .program(STEER_PROGRAM)
            .ok_or(SteeringError::Missing(STEER_PROGRAM))?
            .try_into()
            .map_err(program_error(STEER_PROGRAM))?;
        prog.attach(socket)
            .map_err(program_error(format!("attaching {STEER_PROGRAM}")))
    }

    /// Attaches the ack gate (first-segment mode) to `interfaces`, for `ports`.
    pub fn attach_gate(
        &mut self,
        interfaces: &[String],
        ports: &[u16],
    ) -> Result<(), SteeringError> {
        let Some(ebpf) = self.groups.first_mut() else {
            return Ok(());
        };
        maps::set_gated_ports(ebpf, ports)?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(GATE_PROGRAM)
            .ok_or(SteeringError::Missing(GATE_PROGRAM))?
            .try_into()
            .map_err(program_error(GATE_PROGRAM))?;
        prog.load()
            .map_err(program_error(format!("verifying {GATE_PROGRAM}")))?;
        for iface in interfaces {
            // TCX (kernel 6.6+) needs no qdisc; older kernels need clsact. Already there is fine.
            let _ = aya::programs::tc::qdisc_add_clsact(iface);
            prog.attach(iface, TcAttachType::Ingress)
                .map_err(program_error(format!(
                    "attaching {GATE_PROGRAM} to {iface} ingress"
                )))?;
            log::info!("ack gate attached to {iface} ingress for ports {ports:?}");
            self.gated.push(iface.clone());
        }
        Ok(())
    }

    /// Group 0's `DIRECT` map, for the front end's own connections into pool queues (see
    /// `crate::direct`); the program reads sources only once `enable_direct` ran.
    pub fn take_direct(&mut self) -> Result<crate::direct::DirectMap, SteeringError> {
        let ebpf = self
            .groups
            .first_mut()
            .ok_or(SteeringError::Missing("DIRECT"))?;
        let map = ebpf
            .take_map("DIRECT")
            .ok_or(SteeringError::Missing("DIRECT"))?;
        map.try_into().map_err(|cause| SteeringError::Map {
            what: "DIRECT".into(),
            cause,
        })
    }

    /// The program looks up the source of new connections in `DIRECT` (some pool is a
    /// socket pool). Only group 0 takes such connections.
    pub fn enable_direct(&mut self) -> Result<(), SteeringError> {
        match self.groups.first_mut() {
            Some(e) => maps::set_config(e, sluice_common::CFG_DIRECT, 1),
            None => Ok(()),
        }
    }

    pub fn set_mode(&mut self, mode: u32) -> Result<(), SteeringError> {
        self.groups
            .iter_mut()
            .try_for_each(|e| maps::set_config(e, sluice_common::CFG_MODE, mode))
    }

    pub fn set_socket(
        &mut self,
        group: usize,
        slot: u32,
        socket: &impl AsRawFd,
    ) -> Result<(), SteeringError> {
        maps::set_socket(&mut self.groups[group], slot, socket)
    }

    pub fn set_pool(
        &mut self,
        pool: u32,
        slots: sluice_common::PoolSlots,
    ) -> Result<(), SteeringError> {
        self.groups
            .iter_mut()
            .try_for_each(|e| maps::set_pool(e, pool, slots))
    }

    /// Replaces the whole route table at once: the spare map is filled, then made live.
    /// Plain groups get `routes` (all sent to the dispatcher with `redirect`), TLS groups
    /// the passthrough pools' (`passthrough`, each for `/`).
    pub fn set_routes(
        &mut self,
        routes: &[(Site, String, u32)],
        passthrough: &[(Site, String, u32)],
        redirect: bool,
    ) -> Result<(), SteeringError> {
        let next = 1 - self.live_routes;
        let plain = kernel_routes(routes);
        let tls = kernel_routes(passthrough);
        let redirect = if redirect {
            sluice_common::KIND_REDIRECT
        } else {
            0
        };
        let tls_from = self.tls_from;
        for (g, e) in self.groups.iter_mut().enumerate() {
            let (sites, keyed, _) = if g < tls_from { &plain } else { &tls };
            maps::fill_routes(e, next, sites, keyed)?;
        }
        for (g, e) in self.groups.iter_mut().enumerate() {
            let kinds = if g < tls_from {
                plain.2 | redirect
            } else {
                tls.2
            };
            maps::set_config(e, sluice_common::CFG_ROUTES, next | kinds)?;
        }
        let old = self.live_routes;
        self.live_routes = next;
        // A lookup still running on the old map finds nothing and goes to the dispatcher,
        // which routes with the new table: clearing it is safe.
        self.groups
            .iter_mut()
            .try_for_each(|e| maps::clear_routes(e, old))
    }

    /// Steers connections whose first request is `path` to the dispatcher (its cache), or not.
    pub fn set_cached(&mut self, path: &str, cached: bool) -> Result<(), SteeringError> {
        let tls_from = self.tls_from;
        self.groups[..tls_from]
            .iter_mut()
            .try_for_each(|e| maps::set_cached(e, path, cached))
    }

    /// The group of TLS listen address `i`.
    pub fn tls_group(&self, i: usize) -> usize {
        self.tls_from + i
    }

    /// Zeroes a pool's kernel counter (a pool id that is used again).
    pub fn reset_pool_counter(&mut self, pool: u32) -> Result<(), SteeringError> {
        self.groups
            .iter_mut()
            .try_for_each(|e| maps::reset_counter(e, sluice_common::counter::POOL_BASE + pool))
    }

    /// The counters summed over CPUs and groups.
    pub fn counters(&self) -> Result<Counters, SteeringError> {
        self.counters_in(0..sluice_common::counter::LEN)
    }

    /// Only the per-pool "steered" counters of the first `pools` pools (the controller reads
    /// them every tick; status reads everything).
    pub fn steered_counters(&self, pools: usize) -> Result<Counters, SteeringError> {
        let base = sluice_common::counter::POOL_BASE;
        self.counters_in(base..base + pools as u32)
    }

    /// Counts of the program this one replaced (an upgrade): every reading adds them.
    pub fn set_earlier(&mut self, counts: Vec<u64>) {
        self.earlier = Counters(counts);
    }

    fn counters_in(&self, indexes: std::ops::Range<u32>) -> Result<Counters, SteeringError> {
        let mut total = self.earlier.clone();
        for e in &self.groups {
            total.add(&maps::counters(e, indexes.clone())?);
        }
        Ok(total)
    }
}

impl Drop for Steering {
    fn drop(&mut self) {
        // Dropping the Ebpf objects detaches the TCX links; sk_reuseport programs go with
        // the group's sockets, which the caller closes.
        for iface in &self.gated {
            log::info!("ack gate detached from {iface}");
        }
    }
}

/// The kernel's form of a route table: the site map (key -> id), the routes by site id,
/// and the `KIND_*` bits of the kinds present. A named site whose name the kernel's key
/// cannot hold gets no entry: the program sends every request for it to the dispatcher.
fn kernel_routes(
    routes: &[(Site, String, u32)],
) -> (Vec<(SiteKey, u32)>, Vec<(u32, String, u32)>, u32) {
    let mut ids: Vec<(Site, u32)> = Vec::new();
    let mut sites = Vec::new();
    let mut keyed = Vec::new();
    let mut kinds = 0;
    for (site, prefix, pool) in routes {
        let id = match site {
            Site::Strong => {
                kinds |= KIND_STRONG;
                SITE_STRONG
            }
            Site::Weak => SITE_WEAK,
            named => {
                kinds |= if matches!(named, Site::Ip(_)) {
                    KIND_IP
                } else {
                    KIND_NAMED
                };
                match ids.iter().find(|(s, _)| s == named) {
                    Some((_, id)) => *id,
                    None => {
                        let Some(key) = maps::site_key(named) else {
                            continue;
                        };
                        let id = SITE_FIRST_NAMED + ids.len() as u32;
                        ids.push((named.clone(), id));
                        sites.push((key, id));
                        id
                    }
                }
            }
        };
        keyed.push((id, prefix.clone(), *pool));
    }
    (sites, keyed, kinds)
}
