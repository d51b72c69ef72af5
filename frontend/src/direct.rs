//! The front end's own connections into a pool's queue. A socket worker reads nothing but
//! its listening sockets, so a connection the front end routes to it (a dispatcher fallback,
//! a hand-back, a health probe) must arrive there as a new connection: the front end binds a
//! socket to a port of its own, writes (source address, port) -> pool into group 0's
//! `DIRECT` map, and connects to group 0's listen address; the steering program puts that
//! connection into the pool's socket. The entry lives as long as the socket holds the port.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd},
    sync::{Arc, Mutex},
};

use aya::maps::{HashMap, MapData};
use sluice_common::DirectKey;

use crate::pool::PoolId;
use crate::sockets;

pub type DirectMap = HashMap<MapData, DirectKey, u32>;

pub struct Direct {
    map: Mutex<DirectMap>,
    target: SocketAddr,
}

/// A connection of the front end's own on its way into a pool's queue.
pub struct DirectConn {
    pub fd: OwnedFd,
    /// Our end's address (the server sees it as the peer).
    pub local: SocketAddr,
    /// The listen address it connects to.
    pub target: SocketAddr,
    key: DirectKey,
    direct: Arc<Direct>,
}

fn key_of(addr: SocketAddr) -> DirectKey {
    let mut key = DirectKey {
        port: addr.port().to_be(),
        ..DirectKey::default()
    };
    match addr.ip() {
        IpAddr::V4(a) => {
            key.family = 4;
            key.addr[..4].copy_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            key.family = 6;
            key.addr = a.octets();
        }
    }
    key
}

impl Direct {
    /// `listen` is group 0's listen address; a wildcard one is reached on loopback.
    pub fn new(map: DirectMap, listen: SocketAddr) -> Arc<Direct> {
        let ip = match listen.ip() {
            IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        Arc::new(Direct {
            map: Mutex::new(map),
            target: SocketAddr::new(ip, listen.port()),
        })
    }

    /// Starts a connection into `pool`'s queue; true when it is connected already (else
    /// wait for writable and check `sockets::connect_result`).
    pub fn open(self: &Arc<Self>, pool: PoolId) -> io::Result<(DirectConn, bool)> {
        // From the listen address itself: a source only this host can use.
        let (fd, port) = sockets::bound_stream(self.target.ip())?;
        let local = SocketAddr::new(self.target.ip(), port);
        let key = key_of(local);
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, pool.raw(), 0)
            .map_err(|e| io::Error::other(format!("DIRECT map: {e}")))?;
        let conn = DirectConn {
            fd,
            local,
            target: self.target,
            key,
            direct: self.clone(),
        };
        let connected = sockets::connect_start(conn.fd.as_raw_fd(), self.target)?;
        Ok((conn, connected))
    }
}

impl Drop for DirectConn {
    fn drop(&mut self) {
        let mut map = self.direct.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = map.remove(&self.key) {
            log::warn!("removing {} from the DIRECT map: {e}", self.local);
        }
    }
}
