//! Which interfaces the ack gate must watch for a set of listen addresses.

use std::{
    collections::BTreeSet,
    ffi::CStr,
    net::{IpAddr, SocketAddr},
};

#[derive(Debug, thiserror::Error)]
pub enum InterfaceError {
    #[error("listing interfaces: {0}")]
    List(std::io::Error),
    #[error("no interface has the address {0}")]
    NoInterface(IpAddr),
}

/// The interfaces packets for `addrs` arrive on: loopback for loopback addresses, every
/// interface for a wildcard address, the owning interface otherwise.
pub fn interfaces_for(addrs: &[SocketAddr]) -> Result<Vec<String>, InterfaceError> {
    let all = interfaces()?;
    let mut out = BTreeSet::new();
    for a in addrs {
        let ip = a.ip();
        if ip.is_unspecified() {
            out.extend(all.iter().map(|(name, _)| name.clone()));
        } else if ip.is_loopback() {
            out.insert("lo".to_owned());
        } else {
            let owner = all
                .iter()
                .find(|(_, addr)| *addr == Some(ip))
                .ok_or(InterfaceError::NoInterface(ip))?;
            out.insert(owner.0.clone());
            // Traffic to a local address from this host itself arrives on loopback.
            out.insert("lo".to_owned());
        }
    }
    Ok(out.into_iter().collect())
}

/// (name, address) for every interface address, plus each interface once with `None`.
fn interfaces() -> Result<Vec<(String, Option<IpAddr>)>, InterfaceError> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(InterfaceError::List(std::io::Error::last_os_error()));
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let addr = if ifa.ifa_addr.is_null() {
            None
        } else {
            // SAFETY: ifa_addr points at a sockaddr whose family says which struct it is.
            unsafe {
                match (*ifa.ifa_addr).sa_family as i32 {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        Some(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ))
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        Some(IpAddr::from(sin6.sin6_addr.s6_addr))
                    }
                    _ => None,
                }
            }
        };
        if !out
            .iter()
            .any(|(n, _): &(String, Option<IpAddr>)| *n == name)
        {
            out.push((name.clone(), None));
        }
        if addr.is_some() {
            out.push((name, addr));
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: frees the list getifaddrs allocated, once.
    unsafe { libc::freeifaddrs(head) };
    // Wildcard listeners: every interface name once.
    Ok(out)
}
