//! weft's kernel programs. Today one: `weft_connect4`, a cgroup/connect4 hook
//! that turns a connect() to a service frontend into a connect() to one of
//! its backends, before any packet exists (no per-packet NAT, no conntrack).
//!
//! The maps and their layouts come from `weft-ebpf-abi`; the agent fills them.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::bpf_get_prandom_u32,
    macros::{cgroup_sock_addr, map},
    maps::HashMap,
    programs::SockAddrContext,
};
use weft_ebpf_abi::{
    Backend, BackendKey, ServiceKey, ServiceValue, BACKENDS_MAP, BACKENDS_MAX_ENTRIES,
    SERVICES_MAP, SERVICES_MAX_ENTRIES,
};

/// cgroup/sock_addr verdict: let the call proceed (with whatever address the
/// program left in the context).
const ALLOW: i32 = 1;

// `#[map(name = ...)]` takes a literal; these checks keep it equal to the
// ABI's constant, which is what the agent looks the map up by.
const _: () = assert!(same(SERVICES_MAP, "WEFT_SERVICES"));
const _: () = assert!(same(BACKENDS_MAP, "WEFT_BACKENDS"));

#[map(name = "WEFT_SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(SERVICES_MAX_ENTRIES, 0);

#[map(name = "WEFT_BACKENDS")]
static BACKENDS: HashMap<BackendKey, Backend> = HashMap::with_max_entries(BACKENDS_MAX_ENTRIES, 0);

#[cgroup_sock_addr(connect4)]
pub fn weft_connect4(ctx: SockAddrContext) -> i32 {
    // Never fail a connect() because of us: on error the socket keeps the
    // address the application asked for.
    match try_weft_connect4(&ctx) {
        Ok(verdict) => verdict,
        Err(_) => ALLOW,
    }
}

fn try_weft_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's
    // lifetime; these are 4-byte context reads the verifier allows for connect4.
    let (ip, port, protocol) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    let key = ServiceKey {
        addr_be: ip,
        // user_port holds the network-order port in a 4-byte field.
        port_be: port as u16,
        proto: protocol as u8,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once; the agent may update the
    // entry concurrently, which at worst gives a stale but whole value.
    let Some(service) = (unsafe { SERVICES.get(key) }).copied() else {
        return Ok(ALLOW);
    };
    if service.backend_count == 0 {
        return Ok(ALLOW);
    }
    // SAFETY: a helper without arguments or preconditions.
    let index = unsafe { bpf_get_prandom_u32() } % service.backend_count;
    let backend_key = BackendKey {
        slot: service.backend_slot,
        index,
    };
    // SAFETY: as above.
    let backend = (unsafe { BACKENDS.get(backend_key) })
        .copied()
        .ok_or(ENOENT)?;
    // SAFETY: connect4 may write user_ip4 and user_port (4-byte stores).
    unsafe {
        (*sa).user_ip4 = backend.addr_be;
        (*sa).user_port = u32::from(backend.port_be);
    }
    Ok(ALLOW)
}

/// The service points at a backend the agent has not written (or has just
/// removed): a transient state during an update.
const ENOENT: i32 = 2;

const fn same(a: &str, b: &str) -> bool {
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
