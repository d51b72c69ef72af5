//! A pool's typed id.

/// A pool's id: its place in the front end's pool table for the front end's whole life (a
/// removed pool's id is never reused), and its index in the kernel's `POOLS` map and
/// counters. A fresh front end gives its config's pools the ids 0, 1, ... in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolId(u32);

impl PoolId {
    /// The id at `index` of the pool table (below `MAX_POOLS`).
    pub const fn new(index: usize) -> PoolId {
        PoolId(index as u32)
    }

    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The id as the kernel maps store it.
    pub fn raw(self) -> u32 {
        self.0
    }
}

impl std::fmt::Display for PoolId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}
