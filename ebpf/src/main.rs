//! weft's kernel programs: socket-level Service load balancing.
//!
//! `weft_connect4` and `weft_sendmsg4` (cgroup/connect4, cgroup/sendmsg4)
//! turn a connect() or sendto() to a Service frontend into one to a backend,
//! before any packet exists: established flows carry no per-packet NAT and no
//! conntrack entry. `weft_getpeername4` and `weft_recvmsg4` give the
//! application back the address it asked for (getpeername(), the source of
//! a datagram). The maps and their layouts come from `weft-ebpf-abi`; the
//! agent fills them (frontends, backend sets, Maglev tables, affinity groups).
#![no_std]
#![no_main]

mod tc;

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_set_retval,
    },
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LruHashMap},
    programs::SockAddrContext,
};
use weft_ebpf_abi::{
    AffinityKey, AffinityMatchKey, AffinityValue, Backend, BackendKey, MaglevTable, ServiceKey,
    ServiceValue, SockRevKey, SockRevValue, AFFINITY_MATCH_MAX_ENTRIES, AFFINITY_MAX_ENTRIES,
    BACKENDS_MAX_ENTRIES, MAGLEV_MAX_ENTRIES, MAGLEV_TABLE_SIZE, SCOPE_SOCKET,
    SERVICES_MAX_ENTRIES, SOCK_REV_MAX_ENTRIES, SVC_F_DROP, SVC_F_MAGLEV, SVC_F_REJECT,
};

/// cgroup/sock_addr verdicts: let the call proceed (with whatever address
/// the program left in the context), or fail it (with the errno set by
/// `bpf_set_retval`, EPERM otherwise).
const ALLOW: i32 = 1;
const DENY: i32 = 0;

const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

/// Maps created without preallocated elements: sized for a large cluster,
/// they cost memory only for what is in them.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "WEFT_SVC")]
pub(crate) static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(SERVICES_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "WEFT_BE")]
static BACKENDS: HashMap<BackendKey, Backend> =
    HashMap::pinned(BACKENDS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "WEFT_MAGLEV")]
static MAGLEV: HashMap<u32, MaglevTable> = HashMap::pinned(MAGLEV_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "WEFT_AFF")]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(AFFINITY_MAX_ENTRIES, 0);

#[map(name = "WEFT_AFF_MATCH")]
static AFFINITY_MATCH: HashMap<AffinityMatchKey, u32> =
    HashMap::pinned(AFFINITY_MATCH_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "WEFT_SOCK_REV")]
static SOCK_REV: LruHashMap<SockRevKey, SockRevValue> = LruHashMap::pinned(SOCK_REV_MAX_ENTRIES, 0);

// `#[map(name = ...)]` takes a literal; these checks keep each equal to the
// ABI's constant, which is what the agent looks the map up by.
const _: () = assert!(same(weft_ebpf_abi::SERVICES_MAP, "WEFT_SVC"));
const _: () = assert!(same(weft_ebpf_abi::BACKENDS_MAP, "WEFT_BE"));
const _: () = assert!(same(weft_ebpf_abi::MAGLEV_MAP, "WEFT_MAGLEV"));
const _: () = assert!(same(weft_ebpf_abi::AFFINITY_MAP, "WEFT_AFF"));
const _: () = assert!(same(weft_ebpf_abi::AFFINITY_MATCH_MAP, "WEFT_AFF_MATCH"));
const _: () = assert!(same(weft_ebpf_abi::SOCK_REV_MAP, "WEFT_SOCK_REV"));

#[cgroup_sock_addr(connect4)]
pub fn weft_connect4(ctx: SockAddrContext) -> i32 {
    // The verdict is picked from constants here: the verifier must see a
    // return value in [0, 1], which a value passed back through the stack
    // does not prove. Never fail a connect() because of an inconsistent
    // map: on Err the socket keeps the address the application asked for.
    match translate(&ctx, Call::Connect) {
        Ok(DENY) => DENY,
        _ => ALLOW,
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn weft_sendmsg4(ctx: SockAddrContext) -> i32 {
    match translate(&ctx, Call::Sendmsg) {
        Ok(DENY) => DENY,
        _ => ALLOW,
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn weft_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_frontend(&ctx);
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn weft_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_frontend(&ctx);
    ALLOW
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    Connect,
    Sendmsg,
}

#[inline(always)]
fn translate(ctx: &SockAddrContext, call: Call) -> Result<i32, i32> {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's
    // lifetime; these are 4-byte context reads the verifier allows here.
    let (ip, port, protocol) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    let key = ServiceKey {
        addr_be: ip,
        // user_port holds the network-order port in a 4-byte field.
        port_be: port as u16,
        proto: protocol as u8,
        scope: SCOPE_SOCKET,
    };
    // SAFETY: the value is copied out at once; the agent may replace the
    // entry concurrently, which at worst gives a stale but whole value.
    let Some(service) = (unsafe { SERVICES.get(key) }).copied() else {
        return Ok(ALLOW);
    };
    if service.flags & SVC_F_REJECT != 0 {
        return Ok(refuse(ECONNREFUSED));
    }
    if service.flags & SVC_F_DROP != 0 || service.count == 0 {
        // A Local traffic policy without a local endpoint. A socket cannot
        // be left hanging like a dropped packet; the caller learns at once.
        return Ok(refuse(EHOSTUNREACH));
    }
    let sa_ptr = sa as *mut core::ffi::c_void;
    // SAFETY: helpers the kernel allows for cgroup/sock_addr programs, on
    // the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(sa_ptr) };
    // SAFETY: allowed for cgroup/sock_addr programs, on their context.
    let client = unsafe { bpf_get_netns_cookie(sa_ptr) };
    let hash = match call {
        // SAFETY: a helper without arguments or preconditions.
        Call::Connect => unsafe { bpf_get_prandom_u32() },
        // sendmsg() on an unconnected socket picks per datagram: hashing
        // the socket cookie keeps one socket on one backend while the set
        // is unchanged.
        Call::Sendmsg => mix(cookie),
    };
    let backend = select(&service, client, hash)?;
    // SAFETY: connect4/sendmsg4 may write user_ip4 and user_port (4-byte stores).
    unsafe {
        (*sa).user_ip4 = backend.addr_be;
        (*sa).user_port = u32::from(backend.port_be);
    }
    let rev = SockRevKey {
        cookie,
        addr_be: backend.addr_be,
        port_be: backend.port_be,
        _pad: 0,
    };
    let frontend = SockRevValue {
        addr_be: ip,
        port_be: port as u16,
        _pad: 0,
    };
    // Without this entry getpeername() shows the backend: not worth failing
    // the connect for.
    let _ = SOCK_REV.insert(rev, frontend, 0);
    Ok(ALLOW)
}

/// Fail the call with `errno`.
#[inline(always)]
fn refuse(errno: i32) -> i32 {
    // SAFETY: allowed for connect4/sendmsg4; it only sets the syscall's result.
    unsafe { bpf_set_retval(-errno) };
    DENY
}

/// The backend for a new flow of `client`: the one it sticks to under
/// ClientIP affinity, else from the set's Maglev table or by `hash`.
#[inline(always)]
pub(crate) fn select(service: &ServiceValue, client: u64, hash: u32) -> Result<Backend, i32> {
    if let Some(b) = affine(client, service) {
        return Ok(b);
    }
    let b = pick(service, hash)?;
    remember(client, service, &b);
    Ok(b)
}

#[inline(always)]
fn pick(service: &ServiceValue, hash: u32) -> Result<Backend, i32> {
    let index = if service.flags & SVC_F_MAGLEV != 0 {
        // SAFETY: copied out at once (see SERVICES above).
        let table = unsafe { MAGLEV.get(service.set_id) }.ok_or(ENOENT)?;
        let slot = hash % MAGLEV_TABLE_SIZE;
        // The compiler knows slot < size and drops a plain bounds check,
        // which the verifier needs to see: read it back opaquely first.
        // SAFETY: a read of a local.
        let slot = unsafe { core::ptr::read_volatile(&slot) } as usize;
        if slot >= table.indices.len() {
            return Err(ENOENT);
        }
        table.indices[slot]
    } else {
        hash % service.count
    };
    // SAFETY: as above.
    (unsafe {
        BACKENDS.get(BackendKey {
            set_id: service.set_id,
            index,
        })
    })
    .copied()
    .ok_or(ENOENT)
}

/// The backend this client sticks to, if the Service has ClientIP affinity,
/// the entry is fresh and its backend is still in the set.
#[inline(always)]
fn affine(client: u64, service: &ServiceValue) -> Option<Backend> {
    if service.affinity_id == 0 {
        return None;
    }
    let key = AffinityKey {
        affinity_id: service.affinity_id,
        _pad: 0,
        client,
    };
    // SAFETY: copied out at once.
    let entry = (unsafe { AFFINITY.get(key) }).copied()?;
    // SAFETY: a helper without arguments or preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout_ns = u64::from(service.affinity_timeout_s) * 1_000_000_000;
    let member = AffinityMatchKey {
        affinity_id: service.affinity_id,
        addr_be: entry.addr_be,
        port_be: entry.port_be,
        _pad: 0,
    };
    // SAFETY: existence check only.
    let still_member = unsafe { AFFINITY_MATCH.get(member) }.is_some();
    if now.saturating_sub(entry.last_used_ns) > timeout_ns || !still_member {
        return None;
    }
    let fresh = AffinityValue {
        last_used_ns: now,
        ..entry
    };
    let _ = AFFINITY.insert(key, fresh, 0);
    Some(Backend {
        addr_be: entry.addr_be,
        port_be: entry.port_be,
        _pad: 0,
        flags: 0,
    })
}

/// Start (or restart) this client's affinity to `backend`.
#[inline(always)]
fn remember(client: u64, service: &ServiceValue, backend: &Backend) {
    if service.affinity_id == 0 {
        return;
    }
    let key = AffinityKey {
        affinity_id: service.affinity_id,
        _pad: 0,
        client,
    };
    let value = AffinityValue {
        addr_be: backend.addr_be,
        port_be: backend.port_be,
        _pad: 0,
        // SAFETY: a helper without arguments or preconditions.
        last_used_ns: unsafe { bpf_ktime_get_ns() },
    };
    let _ = AFFINITY.insert(key, value, 0);
}

/// getpeername()/recvmsg() on a translated socket: show the frontend.
#[inline(always)]
fn restore_frontend(ctx: &SockAddrContext) {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: as in `translate`; getpeername4/recvmsg4 may read and write
    // user_ip4 and user_port.
    let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let key = SockRevKey {
        // SAFETY: allowed for these attach types, on their context.
        cookie: unsafe { bpf_get_socket_cookie(sa as *mut core::ffi::c_void) },
        addr_be: ip,
        port_be: port as u16,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    if let Some(frontend) = (unsafe { SOCK_REV.get(key) }).copied() {
        // SAFETY: as above.
        unsafe {
            (*sa).user_ip4 = frontend.addr_be;
            (*sa).user_port = u32::from(frontend.port_be);
        }
    }
}

/// A 64-bit mixer (splitmix64's finalizer) folded to 32 bits.
#[inline(always)]
pub(crate) fn mix(x: u64) -> u32 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z ^ (z >> 32)) as u32
}

/// The frontend points at a backend or table the agent has not written (or
/// has just removed): a transient state during an update.
const ENOENT: i32 = 2;

pub(crate) const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
