//! The kernel programs, built from `ebpf/` (crate `weft-ebpf`) by build.rs and
//! embedded here, so an agent binary always carries the object its map
//! layouts (`weft-ebpf-abi`) were compiled against.

/// The eBPF object (ELF for bpfel, with BTF), aligned for parsing in place.
pub fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft-ebpf"))
}

#[cfg(test)]
mod tests {
    use super::super::kernel::SOCKET_PROGRAMS;
    use super::*;
    use aya_obj::generated::bpf_map_type::{
        BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH,
    };
    use aya_obj::maps::PinningType;
    use aya_obj::programs::CgroupSockAddrAttachType;
    use aya_obj::{Object, ProgramSection};
    use core::mem::size_of;
    use weft_ebpf_abi::*;

    #[test]
    fn object_has_the_socket_programs() {
        let obj = Object::parse(object()).expect("embedded object parses");
        for (name, want) in SOCKET_PROGRAMS.into_iter().zip([
            CgroupSockAddrAttachType::Connect4,
            CgroupSockAddrAttachType::UDPSendMsg4,
            CgroupSockAddrAttachType::UDPRecvMsg4,
            CgroupSockAddrAttachType::GetPeerName4,
        ]) {
            let prog = obj
                .programs
                .get(name)
                .unwrap_or_else(|| panic!("no {name} in {:?}", obj.programs.keys()));
            match &prog.section {
                ProgramSection::CgroupSockAddr { attach_type } => {
                    assert_eq!(format!("{attach_type:?}"), format!("{want:?}"), "{name}")
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn object_has_the_tc_program() {
        let obj = Object::parse(object()).expect("embedded object parses");
        let prog = obj
            .programs
            .get(super::super::kernel::TC_PROGRAM)
            .expect("TC program");
        assert!(
            matches!(prog.section, ProgramSection::SchedClassifier),
            "{:?}",
            prog.section
        );
    }

    #[test]
    fn object_maps_match_the_abi_and_are_pinned() {
        let obj = Object::parse(object()).expect("embedded object parses");
        for (name, ty, key, value, max) in [
            (
                SERVICES_MAP,
                BPF_MAP_TYPE_HASH,
                size_of::<ServiceKey>(),
                size_of::<ServiceValue>(),
                SERVICES_MAX_ENTRIES,
            ),
            (
                BACKENDS_MAP,
                BPF_MAP_TYPE_HASH,
                size_of::<BackendKey>(),
                size_of::<Backend>(),
                BACKENDS_MAX_ENTRIES,
            ),
            (
                MAGLEV_MAP,
                BPF_MAP_TYPE_HASH,
                4,
                size_of::<MaglevTable>(),
                MAGLEV_MAX_ENTRIES,
            ),
            (
                AFFINITY_MAP,
                BPF_MAP_TYPE_LRU_HASH,
                size_of::<AffinityKey>(),
                size_of::<AffinityValue>(),
                AFFINITY_MAX_ENTRIES,
            ),
            (
                AFFINITY_MATCH_MAP,
                BPF_MAP_TYPE_HASH,
                size_of::<AffinityMatchKey>(),
                4,
                AFFINITY_MATCH_MAX_ENTRIES,
            ),
            (
                CT_MAP,
                BPF_MAP_TYPE_LRU_HASH,
                size_of::<CtKey>(),
                size_of::<CtValue>(),
                CT_MAX_ENTRIES,
            ),
            (NODE_MAP, BPF_MAP_TYPE_ARRAY, 4, size_of::<NodeConfig>(), 1),
            (
                SOCK_REV_MAP,
                BPF_MAP_TYPE_LRU_HASH,
                size_of::<SockRevKey>(),
                size_of::<SockRevValue>(),
                SOCK_REV_MAX_ENTRIES,
            ),
        ] {
            let map = obj
                .maps
                .get(name)
                .unwrap_or_else(|| panic!("no map {name} in {:?}", obj.maps.keys()));
            assert_eq!(map.map_type(), ty as u32, "{name}");
            assert_eq!(map.key_size() as usize, key, "{name} key size");
            assert_eq!(map.value_size() as usize, value, "{name} value size");
            assert_eq!(map.max_entries(), max, "{name} max entries");
            assert_eq!(
                map.pinning(),
                PinningType::ByName,
                "{name} survives the agent"
            );
        }
    }
}
