//! North-south: `weft_tc_ingress`, a TC classifier on the node's uplink,
//! pod bridge and VXLAN device. On the uplink, a new connection to a
//! NodePort, load-balancer or external IP (a `SCOPE_EXTERNAL` frontend) is
//! translated to a backend (and its source masqueraded where the entry says
//! so); both directions are recorded in the LRU connection map, and every
//! later packet is rewritten from there and redirected straight to the
//! interface it leaves by. Replies (arriving on the bridge or the VXLAN
//! device) are translated back and sent out of the interface the
//! connection came in on.

use crate::{mix, select, SERVICES};
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_get_prandom_u32, bpf_redirect_neigh},
    macros::{classifier, map},
    maps::{Array, LruHashMap},
    programs::TcContext,
};
use weft_ebpf_abi::{
    CtKey, CtValue, NodeConfig, ServiceKey, AFFINITY_CLIENT_IP, BACKEND_F_LOCAL, CT_FORWARD,
    CT_F_SNAT, CT_MAX_ENTRIES, CT_REPLY, SCOPE_EXTERNAL, SVC_F_DROP, SVC_F_MAGLEV, SVC_F_REJECT,
    SVC_F_SNAT,
};

#[map(name = "WEFT_CT")]
static CT: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(CT_MAX_ENTRIES, 0);

#[map(name = "WEFT_NODE")]
static NODE: Array<NodeConfig> = Array::pinned(1, 0);

const _: () = assert!(crate::same(weft_ebpf_abi::CT_MAP, "WEFT_CT"));
const _: () = assert!(crate::same(weft_ebpf_abi::NODE_MAP, "WEFT_NODE"));

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_OFF: usize = ETH_HLEN;
const IP_CSUM: usize = IP_OFF + 10;
const IP_SADDR: usize = IP_OFF + 12;
const IP_DADDR: usize = IP_OFF + 16;
/// Only option-less IPv4 headers are translated (ihl = 5).
const L4_OFF: usize = IP_OFF + 20;
const L4_SPORT: usize = L4_OFF;
const L4_DPORT: usize = L4_OFF + 2;
const TCP_FLAGS: usize = L4_OFF + 13;
const TCP_CSUM: usize = L4_OFF + 16;
const UDP_CSUM: usize = L4_OFF + 6;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

const BPF_F_PSEUDO_HDR: u64 = 0x10;
const BPF_F_MARK_MANGLED_0: u64 = 0x20;

/// Ephemeral range for masquerade ports when the client's port is taken.
const SNAT_PORT_MIN: u32 = 32768;
const SNAT_PORT_SPAN: u32 = 28232;

#[classifier]
pub fn weft_tc_ingress(ctx: TcContext) -> i32 {
    match try_ingress(&ctx) {
        Ok(Action::Redirect(ifindex)) => redirect(ifindex),
        Ok(Action::Drop) => TC_ACT_SHOT,
        // Anything we do not translate goes on as the kernel would take it.
        Ok(Action::Pass) | Err(_) => TC_ACT_OK,
    }
}

enum Action {
    Pass,
    Drop,
    Redirect(u32),
}

struct Packet {
    proto: u8,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
}

#[inline(always)]
fn try_ingress(ctx: &TcContext) -> Result<Action, i64> {
    let ethertype: u16 = ctx.load::<u16>(12)?;
    if u16::from_be(ethertype) != ETH_P_IP {
        return Ok(Action::Pass);
    }
    let vihl: u8 = ctx.load(IP_OFF)?;
    if vihl != 0x45 {
        return Ok(Action::Pass);
    }
    // Fragments (other than a whole datagram) are not translated.
    let frag: u16 = ctx.load(IP_OFF + 6)?;
    if u16::from_be(frag) & 0x3fff != 0 {
        return Ok(Action::Pass);
    }
    let proto: u8 = ctx.load(IP_OFF + 9)?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Ok(Action::Pass);
    }
    let p = Packet {
        proto,
        saddr: ctx.load(IP_SADDR)?,
        daddr: ctx.load(IP_DADDR)?,
        sport: ctx.load(L4_SPORT)?,
        dport: ctx.load(L4_DPORT)?,
    };
    let syn = proto == IPPROTO_TCP && {
        let flags: u8 = ctx.load(TCP_FLAGS)?;
        flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    };

    // A reply of a translated connection?
    let reply = CtKey {
        saddr_be: p.saddr,
        daddr_be: p.daddr,
        sport_be: p.sport,
        dport_be: p.dport,
        proto,
        dir: CT_REPLY,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    if let Some(ct) = unsafe { CT.get(reply) }.copied() {
        rewrite_src(ctx, &p, ct.addr_a_be, ct.port_a_be)?;
        if ct.flags & CT_F_SNAT != 0 {
            rewrite_dst(ctx, &p, ct.addr_b_be, ct.port_b_be)?;
        }
        return Ok(Action::Redirect(ct.ifindex));
    }

    // A later packet of a translated connection? (A new SYN picks again:
    // the tuple may be reused after the old backend left.)
    let forward = CtKey {
        dir: CT_FORWARD,
        ..reply
    };
    if !syn {
        // SAFETY: copied out at once.
        if let Some(ct) = unsafe { CT.get(forward) }.copied() {
            return apply_forward(ctx, &p, &ct);
        }
    }

    let key = ServiceKey {
        addr_be: p.daddr,
        port_be: p.dport,
        proto,
        scope: SCOPE_EXTERNAL,
    };
    // SAFETY: copied out at once.
    let Some(service) = (unsafe { SERVICES.get(key) }).copied() else {
        return Ok(Action::Pass);
    };
    let node = NODE.get(0).copied().ok_or(-2i64)?;
    if service.flags & SVC_F_REJECT != 0 {
        // Up the stack: the agent's filter rules (and, for the node's own
        // address, the kernel itself) answer with a reset or port unreachable.
        return Ok(Action::Pass);
    }
    if service.flags & SVC_F_DROP != 0 || service.count == 0 {
        return Ok(Action::Drop);
    }
    let client = AFFINITY_CLIENT_IP | u64::from(p.saddr);
    // Maglev hashes the flow, so every node picks the same backend for it;
    // otherwise random (the connection map keeps the flow's choice).
    let hash = if service.flags & SVC_F_MAGLEV != 0 {
        mix((u64::from(p.saddr) << 32) | (u64::from(p.sport) << 16) | u64::from(proto))
    } else {
        // SAFETY: a helper without arguments or preconditions.
        unsafe { bpf_get_prandom_u32() }
    };
    let backend = select(&service, client, hash).map_err(i64::from)?;
    let local = backend.flags & BACKEND_F_LOCAL != 0;
    let (out_ifindex, snat_addr) = if local {
        (node.bridge_ifindex, node.bridge_addr_be)
    } else {
        (node.vxlan_ifindex, node.vxlan_addr_be)
    };
    let snat = service.flags & SVC_F_SNAT != 0;
    let (src_addr, src_port) = if snat {
        (
            snat_addr,
            snat_port(&p, backend.addr_be, backend.port_be, snat_addr),
        )
    } else {
        (p.saddr, p.sport)
    };
    let fwd = CtValue {
        addr_a_be: backend.addr_be,
        addr_b_be: src_addr,
        port_a_be: backend.port_be,
        port_b_be: src_port,
        flags: if snat { CT_F_SNAT } else { 0 },
        ifindex: out_ifindex,
    };
    // SAFETY: reading the context's ingress interface.
    let in_ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let rev_key = CtKey {
        saddr_be: backend.addr_be,
        daddr_be: src_addr,
        sport_be: backend.port_be,
        dport_be: src_port,
        proto,
        dir: CT_REPLY,
        _pad: 0,
    };
    let rev = CtValue {
        addr_a_be: p.daddr,
        addr_b_be: p.saddr,
        port_a_be: p.dport,
        port_b_be: p.sport,
        flags: fwd.flags,
        ifindex: in_ifindex,
    };
    CT.insert(rev_key, rev, 0)?;
    CT.insert(forward, fwd, 0)?;
    apply_forward(ctx, &p, &fwd)
}

/// The masquerade port: the client's own unless another connection to the
/// same backend already uses it.
#[inline(always)]
fn snat_port(p: &Packet, backend: u32, backend_port: u16, snat_addr: u32) -> u16 {
    let mut port = p.sport;
    let mut tries = 0;
    while tries < 8 {
        let key = CtKey {
            saddr_be: backend,
            daddr_be: snat_addr,
            sport_be: backend_port,
            dport_be: port,
            proto: p.proto,
            dir: CT_REPLY,
            _pad: 0,
        };
        // SAFETY: copied out at once.
        match unsafe { CT.get(key) }.copied() {
            None => return port,
            Some(v) if v.addr_b_be == p.saddr && v.port_b_be == p.sport => return port,
            Some(_) => {}
        }
        // SAFETY: a helper without arguments or preconditions.
        let r = unsafe { bpf_get_prandom_u32() } % SNAT_PORT_SPAN;
        port = ((SNAT_PORT_MIN + r) as u16).to_be();
        tries += 1;
    }
    port
}

#[inline(always)]
fn apply_forward(ctx: &TcContext, p: &Packet, ct: &CtValue) -> Result<Action, i64> {
    rewrite_dst(ctx, p, ct.addr_a_be, ct.port_a_be)?;
    if ct.flags & CT_F_SNAT != 0 {
        rewrite_src(ctx, p, ct.addr_b_be, ct.port_b_be)?;
    }
    Ok(Action::Redirect(ct.ifindex))
}

#[inline(always)]
fn l4_csum_off(proto: u8) -> usize {
    if proto == IPPROTO_TCP {
        TCP_CSUM
    } else {
        UDP_CSUM
    }
}

/// Whether the L4 checksum needs updating (a UDP checksum of 0 means none).
#[inline(always)]
fn l4_flags(ctx: &TcContext, proto: u8) -> Result<Option<u64>, i64> {
    if proto == IPPROTO_UDP {
        let c: u16 = ctx.load(UDP_CSUM)?;
        if c == 0 {
            return Ok(None);
        }
        return Ok(Some(BPF_F_MARK_MANGLED_0));
    }
    Ok(Some(0))
}

#[inline(always)]
fn rewrite_dst(ctx: &TcContext, p: &Packet, addr: u32, port: u16) -> Result<(), i64> {
    rewrite(
        ctx, p.proto, IP_DADDR, p.daddr, addr, L4_DPORT, p.dport, port,
    )
}

#[inline(always)]
fn rewrite_src(ctx: &TcContext, p: &Packet, addr: u32, port: u16) -> Result<(), i64> {
    rewrite(
        ctx, p.proto, IP_SADDR, p.saddr, addr, L4_SPORT, p.sport, port,
    )
}

// BPF calls take at most five arguments: always inlined.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rewrite(
    ctx: &TcContext,
    proto: u8,
    addr_off: usize,
    old_addr: u32,
    new_addr: u32,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), i64> {
    let l4 = l4_flags(ctx, proto)?;
    let csum = l4_csum_off(proto);
    if old_addr != new_addr {
        ctx.l3_csum_replace(IP_CSUM, u64::from(old_addr), u64::from(new_addr), 4)?;
        if let Some(f) = l4 {
            ctx.l4_csum_replace(
                csum,
                u64::from(old_addr),
                u64::from(new_addr),
                f | BPF_F_PSEUDO_HDR | 4,
            )?;
        }
        ctx.store(addr_off, &new_addr, 0)?;
    }
    if old_port != new_port {
        if let Some(f) = l4 {
            ctx.l4_csum_replace(csum, u64::from(old_port), u64::from(new_port), f | 2)?;
        }
        ctx.store(port_off, &new_port, 0)?;
    }
    Ok(())
}

#[inline(always)]
fn redirect(ifindex: u32) -> i32 {
    // SAFETY: the helper resolves the next hop and its link-layer address
    // on `ifindex` itself (no parameters passed).
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}
