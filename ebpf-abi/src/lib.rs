//! The ABI between weft's eBPF programs (`weft-ebpf`) and the agent: map
//! names and the `#[repr(C)]` keys and values both sides read and write.
//!
//! Rules, because both sides see the same bytes: no implicit padding (every
//! hole is an explicit `_pad` field the writer zeroes, so hash keys compare
//! equal), `u32` flags instead of `bool`, no `Option` and no enums, and
//! addresses and ports in network byte order (`_be`), as the kernel hands
//! them to the programs.
//!
//! The maps are pinned in bpffs and outlive the agent (a restart or an
//! upgrade keeps forwarding): a change of any layout here must come with a
//! new [`ABI_VERSION`], which puts the maps under a new pin directory.
//!
//! With feature `user` the types implement `aya::Pod`.
#![no_std]

/// Version of the map layouts below; part of the maps' pin directory.
pub const ABI_VERSION: u32 = 1;

/// `HashMap<ServiceKey, ServiceValue>`: service frontends.
pub const SERVICES_MAP: &str = "WEFT_SVC";
/// `HashMap<BackendKey, Backend>`: backend sets.
pub const BACKENDS_MAP: &str = "WEFT_BE";
/// `HashMap<u32 set id, MaglevTable>`: Maglev lookup tables of the sets of
/// Services that ask for consistent hashing.
pub const MAGLEV_MAP: &str = "WEFT_MAGLEV";
/// `LruHashMap<AffinityKey, AffinityValue>`: ClientIP session affinity.
pub const AFFINITY_MAP: &str = "WEFT_AFF";
/// `HashMap<AffinityMatchKey, u32>`: which backends each affinity group
/// (Service port) may still use; an affinity entry whose backend left is ignored.
pub const AFFINITY_MATCH_MAP: &str = "WEFT_AFF_MATCH";
/// `LruHashMap<SockRevKey, SockRevValue>`: for a socket translated at
/// connect/sendmsg time, the frontend it asked for (getpeername, recvmsg).
pub const SOCK_REV_MAP: &str = "WEFT_SOCK_REV";

/// `LruHashMap<CtKey, CtValue>`: north-south connections the TC program
/// translated, both directions.
pub const CT_MAP: &str = "WEFT_CT";
/// `Array<NodeConfig>` of one entry: this node's interfaces and addresses.
pub const NODE_MAP: &str = "WEFT_NODE";

/// Capacity of [`CT_MAP`] (least recently used entries are evicted; two per connection).
pub const CT_MAX_ENTRIES: u32 = 262_144;

/// Capacity of [`SERVICES_MAP`]: frontends (address, port, protocol, scope).
pub const SERVICES_MAX_ENTRIES: u32 = 131_072;
/// Capacity of [`BACKENDS_MAP`]: backends summed over all sets.
pub const BACKENDS_MAX_ENTRIES: u32 = 524_288;
/// Capacity of [`MAGLEV_MAP`]: sets with a Maglev table.
pub const MAGLEV_MAX_ENTRIES: u32 = 8_192;
/// Capacity of [`AFFINITY_MAP`] (least recently used entries are evicted).
pub const AFFINITY_MAX_ENTRIES: u32 = 65_536;
/// Capacity of [`AFFINITY_MATCH_MAP`].
pub const AFFINITY_MATCH_MAX_ENTRIES: u32 = 65_536;
/// Capacity of [`SOCK_REV_MAP`] (least recently used entries are evicted).
pub const SOCK_REV_MAX_ENTRIES: u32 = 262_144;

/// Entries of a Maglev table: a prime well above any set's backend count.
pub const MAGLEV_TABLE_SIZE: u32 = 1021;

/// Who the frontend entry is for.
/// Sockets of this node's pods and processes (cgroup hooks, east-west).
pub const SCOPE_SOCKET: u8 = 0;
/// Packets arriving from outside the node (TC on the uplink, north-south).
pub const SCOPE_EXTERNAL: u8 = 1;

/// No usable endpoint anywhere: refuse at once (ECONNREFUSED, TCP reset,
/// ICMP port unreachable).
pub const SVC_F_REJECT: u32 = 1 << 0;
/// Endpoints exist but none this traffic may use here (a Local traffic
/// policy without a local endpoint): drop.
pub const SVC_F_DROP: u32 = 1 << 1;
/// Masquerade the client (north-south): replies must come back through
/// this node.
pub const SVC_F_SNAT: u32 = 1 << 2;
/// Pick backends by the set's Maglev table instead of at random.
pub const SVC_F_MAGLEV: u32 = 1 << 3;

/// The backend is a pod on this node.
pub const BACKEND_F_LOCAL: u32 = 1 << 0;

/// Tag of an [`AffinityKey::client`] that holds an IPv4 address (north-south)
/// rather than a network-namespace cookie (socket hooks).
pub const AFFINITY_CLIENT_IP: u64 = 1 << 63;

/// [`CtKey::dir`]: a packet from the client to the frontend.
pub const CT_FORWARD: u8 = 0;
/// [`CtKey::dir`]: a packet from the backend back to the client (or the
/// masquerading address).
pub const CT_REPLY: u8 = 1;
/// [`CtValue::flags`]: the connection's source was masqueraded.
pub const CT_F_SNAT: u32 = 1 << 0;

/// A packet's addresses as the TC program sees them on arrival.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// [`CT_FORWARD`] or [`CT_REPLY`].
    pub dir: u8,
    pub _pad: u16,
}

/// How to rewrite a packet of a translated connection, and where to send it.
/// Forward: destination -> (`addr_a`, `port_a`) = the backend; with
/// [`CT_F_SNAT`] source -> (`addr_b`, `port_b`). Reply: source ->
/// (`addr_a`, `port_a`) = the frontend; with [`CT_F_SNAT`] destination ->
/// (`addr_b`, `port_b`) = the client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    pub addr_a_be: u32,
    pub addr_b_be: u32,
    pub port_a_be: u16,
    pub port_b_be: u16,
    pub flags: u32,
    /// Interface the rewritten packet leaves by.
    pub ifindex: u32,
}

/// This node as the TC program needs it; written by the agent when it
/// attaches the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeConfig {
    /// The node's own address (NodePorts): refusals to it are left to the
    /// kernel, which answers with a reset or port unreachable.
    pub node_addr_be: u32,
    /// The pod bridge and its address (masquerade towards local pods).
    pub bridge_ifindex: u32,
    pub bridge_addr_be: u32,
    /// The VXLAN device and its address (masquerade towards remote pods:
    /// their replies come back through the overlay).
    pub vxlan_ifindex: u32,
    pub vxlan_addr_be: u32,
}

/// A service frontend: IPv4 address, port, IP protocol, and who asks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// IPv4 address, network byte order.
    pub addr_be: u32,
    /// Port, network byte order.
    pub port_be: u16,
    /// IP protocol number (`IPPROTO_TCP` = 6, `IPPROTO_UDP` = 17, SCTP = 132).
    pub proto: u8,
    /// [`SCOPE_SOCKET`] or [`SCOPE_EXTERNAL`].
    pub scope: u8,
}

/// What a frontend resolves to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Backends are `BackendKey { set_id, index: 0..count }`.
    pub set_id: u32,
    /// Number of backends in the set; 0 with [`SVC_F_REJECT`] or [`SVC_F_DROP`].
    pub count: u32,
    /// Bit set of `SVC_F_*`.
    pub flags: u32,
    /// Affinity group (one per Service port); 0 = no session affinity.
    pub affinity_id: u32,
    /// ClientIP affinity timeout in seconds (with `affinity_id` != 0).
    pub affinity_timeout_s: u32,
}

/// One backend of a set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendKey {
    pub set_id: u32,
    pub index: u32,
}

/// A backend address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    /// IPv4 address, network byte order.
    pub addr_be: u32,
    /// Port, network byte order.
    pub port_be: u16,
    pub _pad: u16,
    /// Bit set of `BACKEND_F_*`.
    pub flags: u32,
}

/// A set's Maglev lookup table: backend indices into the set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    pub indices: [u32; MAGLEV_TABLE_SIZE as usize],
}

/// Session affinity of one client to one affinity group.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub affinity_id: u32,
    pub _pad: u32,
    /// The client: a network-namespace cookie, or an IPv4 address (network
    /// order, in the low 32 bits) tagged with [`AFFINITY_CLIENT_IP`].
    pub client: u64,
}

/// The backend a client sticks to, and when it last used it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
    /// `bpf_ktime_get_ns()` of the last use.
    pub last_used_ns: u64,
}

/// A backend still in an affinity group's set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AffinityMatchKey {
    pub affinity_id: u32,
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}

/// A translated socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    /// `bpf_get_socket_cookie()`.
    pub cookie: u64,
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}

/// The frontend the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevValue {
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}

// The layouts are the ABI: a field added or reordered without updating both
// sides must fail the build, not corrupt map lookups.
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 20);
const _: () = assert!(core::mem::size_of::<BackendKey>() == 8);
const _: () = assert!(core::mem::size_of::<Backend>() == 12);
const _: () = assert!(core::mem::size_of::<MaglevTable>() == 4 * MAGLEV_TABLE_SIZE as usize);
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 16);
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);
const _: () = assert!(core::mem::size_of::<AffinityMatchKey>() == 12);
const _: () = assert!(core::mem::size_of::<SockRevKey>() == 16);
const _: () = assert!(core::mem::size_of::<SockRevValue>() == 8);
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);
const _: () = assert!(core::mem::size_of::<CtValue>() == 20);
const _: () = assert!(core::mem::size_of::<NodeConfig>() == 20);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and has
    // no implicit padding (checked above), so every byte pattern is valid.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for MaglevTable {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for AffinityMatchKey {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevValue {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for NodeConfig {}
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
                offset_of!(ServiceKey, scope)
            ),
            (0, 4, 6, 7)
        );
        assert_eq!(
            (
                offset_of!(ServiceValue, set_id),
                offset_of!(ServiceValue, count),
                offset_of!(ServiceValue, flags),
                offset_of!(ServiceValue, affinity_id),
                offset_of!(ServiceValue, affinity_timeout_s)
            ),
            (0, 4, 8, 12, 16)
        );
        assert_eq!(
            (
                offset_of!(BackendKey, set_id),
                offset_of!(BackendKey, index)
            ),
            (0, 4)
        );
        assert_eq!(
            (
                offset_of!(Backend, addr_be),
                offset_of!(Backend, port_be),
                offset_of!(Backend, flags)
            ),
            (0, 4, 8)
        );
        assert_eq!(
            (size_of::<AffinityKey>(), align_of::<AffinityKey>()),
            (16, 8)
        );
        assert_eq!(offset_of!(AffinityKey, client), 8);
        assert_eq!(offset_of!(AffinityValue, last_used_ns), 8);
        assert_eq!(
            (
                offset_of!(AffinityMatchKey, addr_be),
                offset_of!(AffinityMatchKey, port_be)
            ),
            (4, 8)
        );
        assert_eq!(
            (
                offset_of!(SockRevKey, addr_be),
                offset_of!(SockRevKey, port_be)
            ),
            (8, 12)
        );
    }

    #[test]
    fn ct_layouts() {
        assert_eq!(
            (
                offset_of!(CtKey, daddr_be),
                offset_of!(CtKey, sport_be),
                offset_of!(CtKey, dport_be),
                offset_of!(CtKey, proto),
                offset_of!(CtKey, dir)
            ),
            (4, 8, 10, 12, 13)
        );
        assert_eq!(
            (
                offset_of!(CtValue, port_a_be),
                offset_of!(CtValue, flags),
                offset_of!(CtValue, ifindex)
            ),
            (8, 12, 16)
        );
        assert_eq!(offset_of!(NodeConfig, vxlan_addr_be), 16);
    }

    #[test]
    fn map_names_fit_the_kernel_limit() {
        // BPF_OBJ_NAME_LEN is 16 including the NUL.
        for name in [
            SERVICES_MAP,
            BACKENDS_MAP,
            MAGLEV_MAP,
            AFFINITY_MAP,
            AFFINITY_MATCH_MAP,
            SOCK_REV_MAP,
            CT_MAP,
            NODE_MAP,
        ] {
            assert!(name.len() < 16, "{name}");
        }
    }

    #[test]
    fn key_bytes_are_network_order() {
        let key = ServiceKey {
            addr_be: u32::from_ne_bytes([198, 19, 0, 10]),
            port_be: 53u16.to_be(),
            proto: 17,
            scope: SCOPE_EXTERNAL,
        };
        // SAFETY: ServiceKey is repr(C), 8 bytes, no padding.
        let bytes: [u8; 8] = unsafe { core::mem::transmute(key) };
        assert_eq!(bytes, [198, 19, 0, 10, 0, 53, 17, 1]);
    }
}
