//! TC ingress "ack gate" for first-segment mode.
//!
//! With `tcp_syncookies=2` no request socket exists after the SYN. The client's pure ACK
//! would complete the handshake by cookie with no payload, so the steering program could
//! not see the request. Dropping it makes the client's first data segment (which carries
//! the same ACK) complete the handshake instead. Only ACKs to our own listening ports that
//! `bpf_skc_lookup_tcp` resolves to a LISTEN socket are dropped: established connections
//! and other services are untouched.

use core::mem::size_of;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_sock_tuple,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as Tuple4,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 as Tuple6,
    },
    helpers::{bpf_sk_release, bpf_skc_lookup_tcp},
    macros::{classifier, map},
    maps::HashMap,
    programs::TcContext,
};
use sluice_common::{DirectKey, MAX_GATED_PORTS, counter};

use crate::bump;

/// Local TCP ports (host order) whose listeners the gate protects.
#[map]
static GATED_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_GATED_PORTS, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_FLAGS_MASK: u8 = 0x3f;
const TCP_ACK: u8 = 0x10;

/// Reads a header field straight from the packet when it is in the linear area (the usual
/// case, and cheap: this runs on every packet the interface receives), else through the
/// helper.
#[inline(always)]
fn field<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, i64> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + off + size_of::<T>() <= end {
        // SAFETY: the bounds check above keeps the read inside the packet's linear data.
        return Ok(unsafe { core::ptr::read_unaligned((start + off) as *const T) });
    }
    ctx.load(off)
}

#[classifier]
pub fn ack_gate(ctx: TcContext) -> i32 {
    match gate(&ctx) {
        Ok(true) => {
            bump(counter::ACK_GATE_DROPS);
            TC_ACT_SHOT as i32
        }
        // Not ours: TC_ACT_UNSPEC is TCX_NEXT, so the interface's next program (another front
        // end's gate, a firewall) still sees the packet; TC_ACT_OK would end the chain here.
        _ => TC_ACT_UNSPEC,
    }
}

/// A pure ACK: of FIN/SYN/RST/PSH/ACK/URG only ACK, and no payload.
#[inline(always)]
fn pure_ack(ctx: &TcContext, l4: usize, l4_len: usize) -> Result<Option<(u16, u16)>, i64> {
    let sport: u16 = field(ctx, l4)?;
    let dport: u16 = field(ctx, l4 + 2)?;
    let b12: u8 = field(ctx, l4 + 12)?;
    let flags: u8 = field(ctx, l4 + 13)?;
    let doff = ((b12 >> 4) as usize) * 4;
    if flags & TCP_FLAGS_MASK != TCP_ACK || l4_len != doff {
        return Ok(None);
    }
    // SAFETY: reading a plain u16 key from a hash map.
    if unsafe { GATED_PORTS.get(&u16::from_be(dport)) }.is_none() {
        return Ok(None);
    }
    Ok(Some((sport, dport)))
}

/// A handshake ACK of the front end's own connection (a probe that sends nothing): let
/// through, so the connection completes without data and reaches its pool's queue.
#[inline(always)]
fn own(family: u8, addr: &[u8], sport: u16) -> bool {
    if !crate::direct::active() {
        return false;
    }
    let mut key = DirectKey {
        port: sport,
        family,
        ..DirectKey::default()
    };
    let n = addr.len().min(16);
    key.addr[..n].copy_from_slice(&addr[..n]);
    crate::direct::lookup(&key).is_some()
}

#[inline(always)]
fn gate(ctx: &TcContext) -> Result<bool, i64> {
    let proto = u16::from_be(field::<u16>(ctx, 12)?);
    // SAFETY: bpf_sock_tuple is plain data; all-zero is a valid value.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let tuple_len;
    if proto == ETH_P_IP {
        let vihl: u8 = field(ctx, ETH_HLEN)?;
        // Only plain 20-byte IPv4 headers: constant offsets keep every read direct (the
        // verifier refuses variable packet offsets here), and a handshake ACK carrying IP
        // options is let through (it costs one dispatcher fallback, nothing else).
        if vihl != 0x45 || field::<u8>(ctx, ETH_HLEN + 9)? != IPPROTO_TCP {
            return Ok(false);
        }
        let ihl = 20;
        let tot_len = u16::from_be(field::<u16>(ctx, ETH_HLEN + 2)?) as usize;
        let Some((sport, dport)) = pure_ack(ctx, ETH_HLEN + ihl, tot_len.wrapping_sub(ihl))? else {
            return Ok(false);
        };
        let saddr: u32 = field(ctx, ETH_HLEN + 12)?;
        if own(4, &saddr.to_ne_bytes(), sport) {
            return Ok(false);
        }
        tuple.__bindgen_anon_1.ipv4 = Tuple4 {
            saddr,
            daddr: field(ctx, ETH_HLEN + 16)?,
            sport,
            dport,
        };
        tuple_len = size_of::<Tuple4>();
    } else if proto == ETH_P_IPV6 {
        // Extension headers before TCP are left alone (never seen on a handshake ACK).
        if field::<u8>(ctx, ETH_HLEN + 6)? != IPPROTO_TCP {
            return Ok(false);
        }
        let payload_len = u16::from_be(field::<u16>(ctx, ETH_HLEN + 4)?) as usize;
        let Some((sport, dport)) = pure_ack(ctx, ETH_HLEN + 40, payload_len)? else {
            return Ok(false);
        };
        let saddr: [u32; 4] = field(ctx, ETH_HLEN + 8)?;
        let mut bytes = [0u8; 16];
        for (i, w) in saddr.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        if own(6, &bytes, sport) {
            return Ok(false);
        }
        tuple.__bindgen_anon_1.ipv6 = Tuple6 {
            saddr,
            daddr: field(ctx, ETH_HLEN + 24)?,
            sport,
            dport,
        };
        tuple_len = size_of::<Tuple6>();
    } else {
        return Ok(false);
    }
    // SAFETY: `tuple` lives on the stack for the call; the returned reference is released
    // below on every path.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            tuple_len as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return Ok(false);
    }
    // SAFETY: `sk` is a non-null socket reference from the lookup above.
    let state = unsafe { (*sk).state };
    // SAFETY: releases the reference taken by bpf_skc_lookup_tcp exactly once.
    unsafe { bpf_sk_release(sk.cast()) };
    Ok(state == BPF_TCP_LISTEN)
}
