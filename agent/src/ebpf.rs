//! The kernel programs, built from `ebpf/` (crate `weft-ebpf`) by build.rs and
//! embedded here, so an agent binary always carries the object its map
//! layouts (`weft-ebpf-abi`) were compiled against.

/// Name of the cgroup/connect4 program that rewrites service connects.
pub const CONNECT4_PROGRAM: &str = "weft_connect4";

/// The eBPF object (ELF for bpfel, with BTF), aligned for parsing in place.
pub fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft-ebpf"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_HASH;
    use aya_obj::programs::CgroupSockAddrAttachType;
    use aya_obj::{Object, ProgramSection};
    use core::mem::size_of;
    use weft_ebpf_abi::{
        Backend, BackendKey, ServiceKey, ServiceValue, BACKENDS_MAP, BACKENDS_MAX_ENTRIES,
        SERVICES_MAP, SERVICES_MAX_ENTRIES,
    };

    #[test]
    fn object_has_connect4_and_service_maps() {
        let obj = Object::parse(object()).expect("embedded object parses");

        let prog = obj
            .programs
            .get(CONNECT4_PROGRAM)
            .unwrap_or_else(|| panic!("no {CONNECT4_PROGRAM} in {:?}", obj.programs.keys()));
        assert!(
            matches!(
                prog.section,
                ProgramSection::CgroupSockAddr {
                    attach_type: CgroupSockAddrAttachType::Connect4
                }
            ),
            "{:?}",
            prog.section
        );

        for (name, key, value, max) in [
            (
                SERVICES_MAP,
                size_of::<ServiceKey>(),
                size_of::<ServiceValue>(),
                SERVICES_MAX_ENTRIES,
            ),
            (
                BACKENDS_MAP,
                size_of::<BackendKey>(),
                size_of::<Backend>(),
                BACKENDS_MAX_ENTRIES,
            ),
        ] {
            let map = obj
                .maps
                .get(name)
                .unwrap_or_else(|| panic!("no map {name} in {:?}", obj.maps.keys()));
            assert_eq!(map.map_type(), BPF_MAP_TYPE_HASH as u32, "{name}");
            assert_eq!(map.key_size() as usize, key, "{name} key size");
            assert_eq!(map.value_size() as usize, value, "{name} value size");
            assert_eq!(map.max_entries(), max, "{name} max entries");
        }
    }

    /// A cgroup v2 directory made for one test run, removed on drop (after
    /// its processes have exited; attached programs go with it).
    struct TestCgroup(std::path::PathBuf);

    impl TestCgroup {
        fn create() -> std::io::Result<Self> {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let dir = std::path::Path::new(CGROUP2)
                .join(format!("weft-test-{}-{nanos}", std::process::id()));
            std::fs::create_dir(&dir)?;
            Ok(Self(dir))
        }
    }

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            if let Err(e) = std::fs::remove_dir(&self.0) {
                eprintln!("removing {}: {e}", self.0.display());
            }
        }
    }

    /// cgroup v2 on this project's hybrid hosts.
    const CGROUP2: &str = "/sys/fs/cgroup/unified";

    fn effective_uid() -> Option<u32> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("Uid:"))?;
        line.split_whitespace().nth(2)?.parse().ok()
    }

    /// Loads the object, attaches `weft_connect4` to a fresh cgroup, maps a
    /// service frontend to a local listener, and connects to the frontend
    /// from a process in that cgroup: the connection must reach the listener.
    #[test]
    fn connect4_rewrites_service_to_backend() {
        use aya::maps::HashMap;
        use aya::programs::{CgroupAttachMode, CgroupSockAddr};
        use std::net::{Ipv4Addr, TcpListener};
        use std::time::{Duration, Instant};

        if effective_uid() != Some(0) {
            println!("skipped: needs root (loads and attaches eBPF)");
            return;
        }
        if !std::path::Path::new(CGROUP2)
            .join("cgroup.controllers")
            .exists()
        {
            println!("skipped: no cgroup v2 at {CGROUP2}");
            return;
        }
        if !std::path::Path::new("/bin/bash").exists() {
            println!("skipped: the client is bash's /dev/tcp and /bin/bash is missing");
            return;
        }

        let cgroup = TestCgroup::create().expect("create test cgroup");
        let mut bpf = aya::Ebpf::load(object()).expect("load object");
        let prog: &mut CgroupSockAddr = bpf
            .program_mut(CONNECT4_PROGRAM)
            .expect("program")
            .try_into()
            .expect("cgroup_sock_addr program");
        prog.load().expect("verifier accepts weft_connect4");
        let cgroup_dir = std::fs::File::open(&cgroup.0).expect("open cgroup");
        prog.attach(&cgroup_dir, CgroupAttachMode::Single)
            .expect("attach to cgroup");

        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind listener");
        listener.set_nonblocking(true).expect("nonblocking");
        let backend_port = listener.local_addr().expect("local addr").port();

        // 198.19.0.0/16 is the tests' service range; nothing listens there.
        let frontend = Ipv4Addr::new(198, 19, 0, 77);
        let slot = 7;
        let mut services: HashMap<_, ServiceKey, ServiceValue> =
            HashMap::try_from(bpf.map_mut(SERVICES_MAP).expect("services map"))
                .expect("services map types");
        services
            .insert(
                ServiceKey {
                    addr_be: u32::from_ne_bytes(frontend.octets()),
                    port_be: 80u16.to_be(),
                    proto: 6,
                    _pad: 0,
                },
                ServiceValue {
                    backend_count: 1,
                    flags: 0,
                    affinity_timeout_s: 0,
                    backend_slot: slot,
                },
                0,
            )
            .expect("insert service");
        let mut backends: HashMap<_, BackendKey, Backend> =
            HashMap::try_from(bpf.map_mut(BACKENDS_MAP).expect("backends map"))
                .expect("backends map types");
        backends
            .insert(
                BackendKey { slot, index: 0 },
                Backend {
                    addr_be: u32::from_ne_bytes(Ipv4Addr::LOCALHOST.octets()),
                    port_be: backend_port.to_be(),
                    _pad: 0,
                    flags: 0,
                },
                0,
            )
            .expect("insert backend");

        // The client joins the cgroup itself, then connects to the frontend.
        let mut client = std::process::Command::new("/bin/bash")
            .arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" && exec 3<>"/dev/tcp/$2/80""#)
            .arg("client")
            .arg(&cgroup.0)
            .arg(frontend.to_string())
            .spawn()
            .expect("spawn client");

        let deadline = Instant::now() + Duration::from_secs(10);
        let accepted = loop {
            match listener.accept() {
                Ok((_, peer)) => break Some(peer),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = client.kill();
        let status = client.wait().expect("wait for client");
        let peer = accepted.unwrap_or_else(|| {
            panic!("no connection reached the backend within 10 s (client: {status})")
        });
        assert_eq!(peer.ip(), Ipv4Addr::LOCALHOST);
        // The client has exited, so the cgroup can go; programs go with it.
        drop(bpf);
        drop(cgroup);
    }
}
