//! The eBPF socket programs against the real kernel: maps pinned in a bpffs
//! this test mounts, programs attached to a cgroup it creates, clients on
//! threads that joined that cgroup inside a network namespace it creates
//! (all removed even on failure). A ClusterIP connect reaches a backend and
//! getpeername() shows the Service; a UDP answer comes from the Service
//! address; a Service without endpoints refuses at once; a thread outside
//! the cgroup is not translated; a second "agent" replaces the programs in
//! their pinned links, adopts the maps and writes nothing.
//! Needs root and cgroup v2; otherwise it says "skipped" and why.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use weft_agent::dataplane::ebpf::kernel::{Kernel, SOCKET_PROGRAMS};
use weft_agent::dataplane::ebpf::reconcile::{MapStore, Reconciler};
use weft_agent::dataplane::fixtures::{backend, config, node_port_service, NODE};
use weft_agent::dataplane::plan::{build, ServicePlan};
use weft_model::view::{FrontendPort, Protocol};
use weft_model::{BackendPort, NodeView, ServiceEntry};

mod common;
use common::Netns;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 20);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 21);
const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 22);
const BACKENDS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(198, 18, 128, 5),
    Ipv4Addr::new(198, 18, 128, 6),
];

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (loads eBPF, creates cgroups and namespaces)".into());
    }
    if cgroup2().is_none() {
        return Some("no cgroup v2 hierarchy".into());
    }
    None
}

fn cgroup2() -> Option<PathBuf> {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(PathBuf::from)
        .find(|d| d.join("cgroup.controllers").exists())
}

/// A threaded cgroup subtree for this process: the process moves into the
/// domain (so single threads may join the child), threads join `node`.
/// Dropping moves the process back and removes both.
struct Cgroups {
    original: PathBuf,
    domain: PathBuf,
    node: PathBuf,
}

impl Cgroups {
    fn create(root: &Path) -> Cgroups {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("cgroup v2 line in /proc/self/cgroup");
        let original = root.join(rel.trim_start_matches('/'));
        let domain = root.join(format!("weft-ebpf-test-{}", std::process::id()));
        std::fs::create_dir(&domain).unwrap();
        let node = domain.join("node");
        let cg = Cgroups {
            original,
            domain,
            node,
        };
        std::fs::create_dir(&cg.node).unwrap();
        std::fs::write(cg.node.join("cgroup.type"), "threaded").unwrap();
        std::fs::write(
            cg.domain.join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .unwrap();
        cg
    }

    /// Put the calling thread into the node cgroup (its new sockets get the programs).
    fn join_node(path: &Path) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        std::fs::write(path.join("cgroup.threads"), tid.to_string()).unwrap();
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.original.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        for d in [&self.node, &self.domain] {
            if let Err(e) = std::fs::remove_dir(d) {
                eprintln!("removing {}: {e}", d.display());
            }
        }
    }
}

/// A directory the agent mounts a bpffs on; unmounted and removed on drop.
struct Bpffs(PathBuf);

impl Drop for Bpffs {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.0.to_str().unwrap()).unwrap();
        // SAFETY: a valid path; detaching a mount this test made.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn plan() -> ServicePlan {
    let mut web = node_port_service(
        "web",
        BACKENDS
            .iter()
            .map(|ip| backend(&ip.to_string(), NODE, true, true, false))
            .collect(),
    );
    web.ports.push(FrontendPort {
        name: "dns".into(),
        protocol: Protocol::UDP,
        port: 53,
        node_port: None,
    });
    for b in &mut web.backends {
        b.ports.push(BackendPort {
            name: "dns".into(),
            protocol: Protocol::UDP,
            port: 5353,
        });
    }
    let mut sticky = node_port_service(
        "sticky",
        BACKENDS
            .iter()
            .map(|ip| backend(&ip.to_string(), NODE, true, true, false))
            .collect(),
    );
    sticky.cluster_ips = vec![STICKY_VIP.into()];
    sticky.ports[0].node_port = Some(30082);
    sticky.affinity_timeout = Some(2);
    let mut empty = node_port_service("empty", vec![]);
    empty.cluster_ips = vec![EMPTY_VIP.into()];
    empty.ports[0].node_port = Some(30081);
    let services: Vec<ServiceEntry> = vec![web, empty, sticky];
    let view = NodeView {
        rev: 1,
        synced: true,
        services: services.into_iter().map(|s| (s.key(), s)).collect(),
        nodes: Default::default(),
        pods: Default::default(),
    };
    build(&view, &config())
}

#[test]
fn socket_programs_translate_and_survive_a_restart() {
    if let Some(why) = skip_reason() {
        println!("skipped: {why}");
        return;
    }
    let ns = Netns::create("ebpf").expect("create netns");
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    for ip in BACKENDS {
        ns.exec(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"]);
    }
    let cg = Cgroups::create(&cgroup2().unwrap());
    let bpffs = Bpffs(std::env::temp_dir().join(format!("weft-ebpf-test-{}", std::process::id())));

    let mut kernel = Kernel::open(&bpffs.0, &cg.node).expect("load and attach");
    assert_eq!(kernel.attach.attached, SOCKET_PROGRAMS.to_vec());
    let mut reconciler = Reconciler::adopt(&kernel.image().unwrap());
    let plan = plan();
    let stats = reconciler
        .apply(&plan, &mut kernel)
        .expect("program the maps");
    assert!(stats.writes > 0);

    // Backends inside the namespace: TCP answers with its own address, UDP echoes it.
    let listeners: Vec<TcpListener> = BACKENDS
        .iter()
        .map(|ip| {
            ns.run({
                let ip = *ip;
                move || TcpListener::bind((ip, 8080)).unwrap()
            })
        })
        .collect();
    for l in listeners {
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let mut s = s;
                let me = s.local_addr().unwrap().ip().to_string();
                let _ = s.write_all(me.as_bytes());
            }
        });
    }
    let udp: Vec<Arc<UdpSocket>> = BACKENDS
        .iter()
        .map(|ip| {
            let ip = *ip;
            Arc::new(ns.run(move || UdpSocket::bind((ip, 5353)).unwrap()))
        })
        .collect();
    for u in &udp {
        let u = u.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = u.recv_from(&mut buf) {
                let _ = u.send_to(&buf[..n], from);
            }
        });
    }

    let node = cg.node.clone();
    let results = ns.run(move || {
        Cgroups::join_node(&node);
        let mut seen = std::collections::BTreeSet::new();
        let mut peers = Vec::new();
        for _ in 0..40 {
            let mut s =
                TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), Duration::from_secs(3))
                    .expect("connect through the ClusterIP");
            peers.push(s.peer_addr().unwrap());
            let mut answer = String::new();
            s.read_to_string(&mut answer).unwrap();
            seen.insert(answer);
        }
        let mut sticky = std::collections::BTreeSet::new();
        for _ in 0..30 {
            let mut s = TcpStream::connect_timeout(
                &SocketAddr::from((STICKY_VIP, 80)),
                Duration::from_secs(3),
            )
            .expect("connect through the sticky ClusterIP");
            let mut answer = String::new();
            s.read_to_string(&mut answer).unwrap();
            sticky.insert(answer);
        }
        assert_eq!(
            sticky.len(),
            1,
            "ClientIP affinity: one backend, saw {sticky:?}"
        );
        let refused =
            TcpStream::connect_timeout(&SocketAddr::from((EMPTY_VIP, 80)), Duration::from_secs(3))
                .map(|_| ())
                .map_err(|e| e.kind());
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        u.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        u.send_to(b"ping", (VIP, 53)).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = u
            .recv_from(&mut buf)
            .expect("UDP answer through the ClusterIP");
        (seen, peers, refused, buf[..n].to_vec(), from)
    });
    let (seen, peers, refused, echo, from) = results;
    assert_eq!(seen.len(), 2, "both backends reached: {seen:?}");
    assert!(
        peers.iter().all(|p| *p == SocketAddr::from((VIP, 80))),
        "getpeername shows the Service: {peers:?}"
    );
    assert_eq!(
        refused,
        Err(ErrorKind::ConnectionRefused),
        "no endpoints: refused at once"
    );
    assert_eq!(echo, b"ping");
    assert_eq!(
        from,
        SocketAddr::from((VIP, 53)),
        "the datagram comes from the Service address"
    );

    // A thread outside the cgroup is not translated (no route to the VIP here).
    let outside = ns.run(|| {
        TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), Duration::from_secs(1)).map(|_| ())
    });
    assert!(outside.is_err(), "untranslated outside the node's cgroup");

    // A new agent: the programs are replaced in their pinned links, the maps
    // adopted; nothing is rewritten and connections keep working.
    // The first agent still holds its programs and maps (a new agent may
    // start before the old one is gone).
    let first = kernel;
    let mut kernel = Kernel::open(&bpffs.0, &cg.node).expect("second agent");
    drop(first);
    assert_eq!(kernel.attach.replaced, SOCKET_PROGRAMS.to_vec());
    let mut again = Reconciler::adopt(&kernel.image().unwrap());
    let stats = again.apply(&plan, &mut kernel).unwrap();
    assert_eq!(stats.writes, 0, "{stats:?}");
    let node = cg.node.clone();
    let answer = ns.run(move || {
        Cgroups::join_node(&node);
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), Duration::from_secs(3))
                .unwrap();
        let mut a = String::new();
        s.read_to_string(&mut a).unwrap();
        a
    });
    assert!(answer.starts_with("198.18.128."), "{answer}");
    drop(kernel);

    // An agent switched to another dataplane removes the pins: the
    // programs are detached and the Service address is left alone.
    assert!(weft_agent::dataplane::ebpf::kernel::remove_pins(&bpffs.0).unwrap());
    assert!(!weft_agent::dataplane::ebpf::kernel::remove_pins(&bpffs.0).unwrap());
    let node = cg.node.clone();
    let after = ns.run(move || {
        Cgroups::join_node(&node);
        TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), Duration::from_secs(1)).map(|_| ())
    });
    assert!(
        after.is_err(),
        "still translated after the pins were removed"
    );
}
