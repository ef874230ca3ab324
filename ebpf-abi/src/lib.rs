//! The ABI between weft's eBPF programs (`weft-ebpf`) and the agent: map
//! names and the `#[repr(C)]` keys and values both sides read and write.
//!
//! Rules, because both sides see the same bytes: no implicit padding (every
//! hole is an explicit `_pad` field the writer zeroes, so hash keys compare
//! equal), `u32` flags instead of `bool`, no `Option` and no enums, and
//! addresses and ports in network byte order (`_be`), as the kernel hands
//! them to the programs.
//!
//! With feature `user` the types implement `aya::Pod`.
#![no_std]

/// Name of the `HashMap<ServiceKey, ServiceValue>` of service frontends.
pub const SERVICES_MAP: &str = "WEFT_SERVICES";
/// Name of the `HashMap<BackendKey, Backend>` of service backends.
pub const BACKENDS_MAP: &str = "WEFT_BACKENDS";

/// Capacity of [`SERVICES_MAP`] (frontends: address, port, protocol).
pub const SERVICES_MAX_ENTRIES: u32 = 16_384;
/// Capacity of [`BACKENDS_MAP`] (backends summed over all frontends).
pub const BACKENDS_MAX_ENTRIES: u32 = 65_536;

/// A service frontend: IPv4 address, port and IP protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// IPv4 address, network byte order.
    pub addr_be: u32,
    /// Port, network byte order.
    pub port_be: u16,
    /// IP protocol number (`IPPROTO_TCP` = 6, `IPPROTO_UDP` = 17).
    pub proto: u8,
    pub _pad: u8,
}

/// What a frontend resolves to: how many backends, and where they live in
/// the backends map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Number of backends at `BackendKey { slot: backend_slot, index: 0..backend_count }`.
    pub backend_count: u32,
    /// Bit set of `SERVICE_F_*` flags (none defined yet).
    pub flags: u32,
    /// Client-IP affinity timeout in seconds; 0 = no affinity.
    pub affinity_timeout_s: u32,
    /// Slot of this service's backends in the backends map.
    pub backend_slot: u32,
}

/// One backend of a service: the service's slot and the backend's index in it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub slot: u32,
    pub index: u32,
}

/// A backend address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend {
    /// IPv4 address, network byte order.
    pub addr_be: u32,
    /// Port, network byte order.
    pub port_be: u16,
    pub _pad: u16,
    /// Bit set of `BACKEND_F_*` flags (none defined yet).
    pub flags: u32,
}

// The layouts are the ABI: a field added or reordered without updating both
// sides must fail the build, not corrupt map lookups.
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);
const _: () = assert!(core::mem::align_of::<ServiceKey>() == 4);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);
const _: () = assert!(core::mem::align_of::<ServiceValue>() == 4);
const _: () = assert!(core::mem::size_of::<BackendKey>() == 8);
const _: () = assert!(core::mem::align_of::<BackendKey>() == 4);
const _: () = assert!(core::mem::size_of::<Backend>() == 12);
const _: () = assert!(core::mem::align_of::<Backend>() == 4);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and has
    // no implicit padding (checked above), so every byte pattern is valid.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for Backend {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn layouts_match_the_kernel_side() {
        assert_eq!((size_of::<ServiceKey>(), align_of::<ServiceKey>()), (8, 4));
        assert_eq!(
            (
                offset_of!(ServiceKey, addr_be),
                offset_of!(ServiceKey, port_be),
                offset_of!(ServiceKey, proto),
                offset_of!(ServiceKey, _pad)
            ),
            (0, 4, 6, 7)
        );
        assert_eq!(
            (size_of::<ServiceValue>(), align_of::<ServiceValue>()),
            (16, 4)
        );
        assert_eq!(
            (
                offset_of!(ServiceValue, backend_count),
                offset_of!(ServiceValue, flags),
                offset_of!(ServiceValue, affinity_timeout_s),
                offset_of!(ServiceValue, backend_slot)
            ),
            (0, 4, 8, 12)
        );
        assert_eq!((size_of::<BackendKey>(), align_of::<BackendKey>()), (8, 4));
        assert_eq!(
            (offset_of!(BackendKey, slot), offset_of!(BackendKey, index)),
            (0, 4)
        );
        assert_eq!((size_of::<Backend>(), align_of::<Backend>()), (12, 4));
        assert_eq!(
            (
                offset_of!(Backend, addr_be),
                offset_of!(Backend, port_be),
                offset_of!(Backend, _pad),
                offset_of!(Backend, flags)
            ),
            (0, 4, 6, 8)
        );
    }

    #[test]
    fn map_names_fit_the_kernel_limit() {
        // BPF_OBJ_NAME_LEN is 16 including the NUL.
        for name in [SERVICES_MAP, BACKENDS_MAP] {
            assert!(name.len() < 16, "{name}");
        }
    }

    #[test]
    fn key_bytes_are_network_order() {
        let key = ServiceKey {
            addr_be: u32::from_ne_bytes([198, 19, 0, 10]),
            port_be: 53u16.to_be(),
            proto: 17,
            _pad: 0,
        };
        // SAFETY: ServiceKey is repr(C), 8 bytes, no padding.
        let bytes: [u8; 8] = unsafe { core::mem::transmute(key) };
        assert_eq!(bytes, [198, 19, 0, 10, 0, 53, 17, 0]);
    }
}
