//! weft-services-bench: how fast weft's service dataplanes program N
//! ClusterIP Services x E endpoints, and what a connection through a cluster
//! IP costs, in one run.
//!
//! iptables: against a kube-proxy-shaped ruleset of the same size applied
//! the way kube-proxy applies it (the peer), in both iptables
//! implementations (nft and legacy); then the new-connection latency through
//! a cluster IP at N Services against the same connection to the pod IP.
//!
//! Per mode and size N, each side in its own fresh namespace (`wsb<pid>-*`,
//! removed on exit, also on failure):
//! - weft: the agent library itself. A `NodeView` of N Services is turned
//!   into a plan (`weft_agent::dataplane::plan::build`) and applied with
//!   `IptablesDataplane::apply` (first apply = full sync: the restore of
//!   every chain, then the jumps from the built-in chains). Then single
//!   changes, each timed as the agent pays it (the plan rebuilt from the
//!   whole view, then `apply`, which restores only the changed chains): one
//!   endpoint of one Service replaced, one Service added, one removed, a
//!   no-op; and a full resync onto the rules already there (a restart).
//! - peer: the same Services rendered as kube-proxy (1.28+, iptables mode,
//!   large-cluster mode since there are more than 1000 endpoints) writes
//!   them: `KUBE-SERVICES`, `KUBE-SVC-*`, `KUBE-SEP-*`, `KUBE-MARK-MASQ`,
//!   `KUBE-POSTROUTING`, `KUBE-NODEPORTS`, the filter chains, each Service's
//!   chains together. First the jumps (`iptables -N`, `-C`, `-I`, as
//!   kube-proxy ensures them before its restore), then one full
//!   `iptables-restore --noflush` (the baseline the issue names), stopped at
//!   a time limit; then, for the same endpoint changes as weft's, the
//!   partial restore of kube-proxy's `MinimizeIPTablesRestore` (the fixed
//!   chains, the whole `KUBE-SERVICES`, the changed Service's chains).
//!   Both sides run `iptables-restore --noflush -w 5` the same way (spawn,
//!   input on stdin, wait).
//!
//! eBPF (`--dataplanes`): per size N, the agent's own pieces as its
//! dataplane uses them: `Kernel::open` (load, verify, attach the socket
//! programs through pinned links) on a fresh private bpffs (empty maps) and
//! a threaded cgroup of this process (`<cgroup2>/wsb<pid>-cg/node`; only
//! threads that join it get the programs), `Reconciler::adopt`, then the
//! full sync (`PlanBuilder::build` + `Reconciler::apply`) and its entries
//! checked in the maps. Single changes are timed as the agent's driver pays
//! a stream delta: `PlanBuilder::update` by the changed (namespace, name)
//! key, `Reconciler::apply` (which then looks at that Service only), and the
//! stale-backend cleanup `EbpfDataplane::program` runs after it (the
//! north-south connection map purged, connected UDP sockets to a removed
//! backend destroyed in the node namespace). The same endpoint changes,
//! additions and removals as the iptables side; map writes counted per
//! change; the cost of one map write measured alone (rewriting existing
//! entries) gives the floor of writes x one write. Then a restart (programs
//! replaced in their pinned links, maps read back and adopted, full plan
//! applied: nothing should be written).
//!
//! Latency: namespaces client <-> node <-> server (veths; client
//! 198.18.128.10/24, server 198.18.129.10/24, the node routes between them).
//! The probe Service (port 80 -> server:8080 for connects, 81 -> 8081 TCP
//! and UDP for sockperf) is part of every view, sorts last by name and has
//! the address after the last generated Service's in the same /24
//! (198.19.40.251 at N = 10,000), so its frontend rules are the last ones a
//! new connection can meet, in one list or in per-/24 buckets.
//! - iptables: the node holds weft's rules, in the host's iptables mode as
//!   kube-proxy picks it; the weft run at the latency size happens in the
//!   node namespace. Measured with no rules (before the weft run), with N
//!   Services (right after its full sync), and with the probe Service alone
//!   (after the run, the tables emptied).
//! - eBPF: its own fresh topology (no iptables rules ever loaded in it); the
//!   client threads (and the sockperf client processes) that connect to the
//!   cluster IP are in the programs' cgroup. Right after the full sync at
//!   the latency size, the maps alternate between the N Services and the
//!   probe Service alone (reconciled down and back up), `--rr-rounds`
//!   times, each state measured for its share of the connects and one
//!   sockperf round per turn, so that both states meet the same machine;
//!   the pod IP both from the cgroup and from outside it (no programs: the
//!   path's own cost).
//!
//! New connections: sequential blocking `connect()`s from the client,
//! targets alternating, timed from the call to its return (SYN out, SYN-ACK
//! back); the client then waits for the server's close (untimed) and
//! resets. Request/response: `sockperf ping-pong` (TCP and UDP, 64-byte
//! messages, one in flight) against `sockperf server` started in the server
//! namespace for the phase, in rounds alternating the targets; every round
//! trip of the runs' valid periods (sockperf's full log) is kept. Two
//! modes: busy-polling (client and server poll non-blocking sockets, so the
//! round trip is the path's own) and blocking (each message wakes a
//! sleeping thread; on a VM with idle vCPUs that wake-up dominates). Rates
//! are compared at the median round trip. Each phase starts after a 3 s
//! pause.
//!
//! Run by `cargo xtask bench services`; needs root and iptables (nft and
//! legacy), for eBPF cgroup v2 and a kernel that loads the programs, for
//! request/response sockperf (skipped, and reported so, without it).

use anyhow::{ensure, Context};
use clap::Parser;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_agent::dataplane::ebpf::encode::{addr_of, encode};
use weft_agent::dataplane::ebpf::kernel::Kernel;
use weft_agent::dataplane::ebpf::reconcile::{MapStore, Reconciler};
use weft_agent::dataplane::iptables::{restore_input, Ruleset};
use weft_agent::dataplane::netfilter::{
    count_rules, split_rule, Iptables, IptablesDataplane, Mode,
};
use weft_agent::dataplane::plan::{build, PlanBuilder, PlanConfig, ServicePlan};
use weft_agent::dataplane::ServiceDataplane;
use weft_e2e::bench::{endpoint_ip, ms};
use weft_e2e::benchnet::{
    self, ip, summarize, BpffsDir, Namespaces, SockperfServer, Summary, ThreadedCgroup,
};
use weft_model::view::{FrontendPort, Protocol};
use weft_model::{Backend, BackendPort, NodeView, ServiceEntry};

/// A service dataplane the bench measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Dataplane {
    Iptables,
    Ebpf,
}

/// A sockperf protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
enum RrProto {
    Tcp,
    Udp,
}

impl RrProto {
    fn as_str(self) -> &'static str {
        match self {
            RrProto::Tcp => "TCP",
            RrProto::Udp => "UDP",
        }
    }
}

/// How sockperf's client and server wait for a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
enum RrMode {
    /// Non-blocking sockets polled in a loop: no sleep and wake-up per
    /// message, so the round trip is the network path's (each side spins on
    /// a CPU while it runs).
    BusyPoll,
    /// Blocking receive: each message wakes a sleeping thread, as most
    /// applications do (on a VM, an idle vCPU's wake-up goes through the
    /// hypervisor).
    Blocking,
}

impl RrMode {
    fn as_str(self) -> &'static str {
        match self {
            RrMode::BusyPoll => "busy-polling",
            RrMode::Blocking => "blocking",
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    about = "service programming, iptables (weft vs a kube-proxy-shaped restore, nft and legacy) and eBPF; connect and request/response latency through a cluster IP"
)]
struct Args {
    /// Service counts to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
    sizes: Vec<usize>,
    /// Dataplanes to measure (comma-separated: iptables, ebpf).
    #[arg(long, value_delimiter = ',', default_value = "iptables,ebpf")]
    dataplanes: Vec<Dataplane>,
    /// iptables implementations to measure (comma-separated: nft, legacy).
    #[arg(long, value_delimiter = ',', default_value = "nft,legacy")]
    modes: Vec<Mode>,
    /// Endpoints per Service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Endpoint changes per size (median and max reported), also for the peer.
    #[arg(long, default_value_t = 10)]
    changes: usize,
    /// Service additions and removals per size.
    #[arg(long, default_value_t = 3)]
    adds: usize,
    /// Skip the peer's partial restores.
    #[arg(long)]
    no_peer_partial: bool,
    /// Insert the peer's jumps after its full restore instead of before (not
    /// kube-proxy's order; isolates what rules reachable from the built-in
    /// chains cost at commit).
    #[arg(long)]
    peer_jumps_after: bool,
    /// Stop the peer's full restore after this many seconds (0: never); its
    /// partial restores then run on the same rules loaded another way.
    #[arg(long, default_value_t = 120)]
    peer_limit: u64,
    /// Services in the latency phase (the probe included); its weft
    /// measurements run in the latency node namespace, at this (mode, N).
    /// 0 skips the phase.
    #[arg(long, default_value_t = 10000)]
    latency_services: usize,
    /// iptables mode of the latency phase (default: the host's, as kube-proxy detects it).
    #[arg(long)]
    latency_mode: Option<Mode>,
    /// Timed connects per target and phase (after 100 untimed ones).
    #[arg(long, default_value_t = 2000)]
    connects: usize,
    /// sockperf request/response protocols per target and phase
    /// (comma-separated: tcp, udp).
    #[arg(long, value_delimiter = ',', default_value = "tcp,udp")]
    rr_protocols: Vec<RrProto>,
    /// sockperf modes (comma-separated: busy-poll, blocking): how client
    /// and server wait for a message.
    #[arg(long, value_delimiter = ',', default_value = "busy-poll,blocking")]
    rr_modes: Vec<RrMode>,
    /// sockperf rounds per target, protocol and phase (targets alternate
    /// within a round; 0 skips request/response). The eBPF latency phase
    /// alternates its two states (N Services, the probe alone) this many
    /// times, one round each.
    #[arg(long, default_value_t = 5)]
    rr_rounds: usize,
    /// Seconds of one sockperf run (its first 0.4 s are a warm-up it
    /// leaves out).
    #[arg(long, default_value_t = 2)]
    rr_secs: u64,
    /// sockperf message size in bytes.
    #[arg(long, default_value_t = 64)]
    rr_msg_size: usize,
    /// Also write the report (markdown) to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the full restore inputs (weft's first apply, the peer's full
    /// sync) per size into this directory, to reproduce a restore by hand.
    #[arg(long)]
    dump: Option<PathBuf>,
}

const NAMESPACE: &str = "bench";
const CLUSTER_CIDR: &str = "198.18.128.0/17";
const NODE: &str = "node-1";
const NODE_IP: &str = "198.18.0.11";
/// Nodes the endpoints are spread over (ClusterIP rules do not depend on it).
const NODES: usize = 50;
const PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
/// The probe's sockperf port (TCP and UDP) and its target port.
const RR_PORT: u16 = 81;
const RR_TARGET_PORT: u16 = 8081;
const CLIENT_IP: &str = "198.18.128.10";
const SERVER_IP: &str = "198.18.129.10";
const PROBE_NAME: &str = "zz-probe";
/// kube-proxy's large-cluster mode starts above this many endpoints.
const KP_LARGE_CLUSTER_ENDPOINTS: usize = 1000;

// ---------------------------------------------------------------- the view

/// Cluster IP of Service `i` in 198.19.0.0/16 (198.19.1.1 up; 198.19.0.x,
/// 198.19.250+ and 198.19.255.x are left for DNS, added Services, the probe
/// and "external" hosts).
fn cluster_ip(i: usize) -> IpAddr {
    assert!(i < 249 * 250, "too many Services for the address plan");
    format!("198.19.{}.{}", 1 + i / 250, 1 + i % 250)
        .parse()
        .expect("valid address")
}

fn backend(ip: IpAddr, k: usize) -> Backend {
    Backend {
        ip,
        node: Some(format!("node-{}", k % NODES + 1)),
        hostname: None,
        target: None,
        zone: None,
        ports: vec![BackendPort {
            name: "http".into(),
            protocol: Protocol::TCP,
            port: TARGET_PORT,
        }],
        ready: true,
        serving: true,
        terminating: false,
    }
}

fn service(name: String, cluster_ip: IpAddr, backends: Vec<Backend>) -> ServiceEntry {
    ServiceEntry {
        namespace: NAMESPACE.into(),
        name,
        cluster_ips: vec![cluster_ip],
        ports: vec![FrontendPort {
            name: "http".into(),
            protocol: Protocol::TCP,
            port: PORT,
            node_port: None,
        }],
        backends,
        ..Default::default()
    }
}

/// Endpoint addresses repeat every this many endpoints (the /17 pod CIDR).
const ENDPOINT_ADDRESSES: usize = 128 * 250;

/// Service `i`'s target port: 8080, plus one each time the endpoint
/// addresses start over, so that every backend (address, port) is distinct
/// (as in a cluster where every pod has its own address; with 10 endpoints
/// per Service, 10,000 Services need 100,000). Equal backends would be one
/// backend set in the eBPF maps.
fn target_port(i: usize, e: usize) -> u16 {
    TARGET_PORT + u16::try_from(i * e / ENDPOINT_ADDRESSES).expect("a port offset")
}

/// Service `i`: `bench/svc-NNNNN`, one TCP port, `e` ready endpoints in the pod CIDR.
fn bench_service(i: usize, e: usize) -> ServiceEntry {
    let port = target_port(i, e);
    let backends = (0..e)
        .map(|j| {
            let k = i * e + j;
            let mut b = backend(endpoint_ip(k).parse().expect("valid address"), k);
            b.ports[0].port = port;
            b
        })
        .collect();
    service(format!("svc-{i:05}"), cluster_ip(i), backends)
}

/// The probe's cluster IP in a view of size `n`: host .251 of the /24 of
/// the last generated Service (generated ones use .1 to .250). With its
/// name sorting after every `svc-*`, its rule is the last one whether the
/// frontends are one list or bucketed by address.
fn probe_ip(n: usize) -> IpAddr {
    let IpAddr::V4(last) = cluster_ip(n.saturating_sub(2)) else {
        unreachable!("cluster IPs are IPv4")
    };
    let [a, b, c, _] = last.octets();
    IpAddr::from([a, b, c, 251])
}

/// The probe Service: one endpoint, the latency phase's server; port 80
/// (TCP, connects) and 81 (TCP and UDP, sockperf).
fn probe_service(n: usize) -> ServiceEntry {
    let mut server = backend(SERVER_IP.parse().expect("valid address"), 0);
    let mut svc = service(PROBE_NAME.into(), probe_ip(n), Vec::new());
    for (name, protocol) in [("rr", Protocol::TCP), ("rr-udp", Protocol::UDP)] {
        svc.ports.push(FrontendPort {
            name: name.into(),
            protocol,
            port: RR_PORT,
            node_port: None,
        });
        server.ports.push(BackendPort {
            name: name.into(),
            protocol,
            port: RR_TARGET_PORT,
        });
    }
    svc.backends = vec![server];
    svc
}

/// The view of size `n`: `n - 1` generated Services and the probe.
fn bench_view(n: usize, e: usize) -> NodeView {
    view_of(
        (0..n.saturating_sub(1))
            .map(|i| bench_service(i, e))
            .chain([probe_service(n)]),
    )
}

fn view_of(services: impl IntoIterator<Item = ServiceEntry>) -> NodeView {
    NodeView {
        rev: 1,
        synced: true,
        services: services.into_iter().map(|s| (s.key(), s)).collect(),
        nodes: BTreeMap::new(),
        pods: Default::default(),
    }
}

fn plan_config() -> PlanConfig {
    PlanConfig {
        node: NODE.into(),
        node_addresses: vec![NODE_IP.parse().expect("valid address")],
        localhost_node_ports: false,
        external_ip_allow: Vec::new(),
        cluster_cidr: CLUSTER_CIDR.parse().expect("valid CIDR"),
        local_dns: None,
    }
}

/// An endpoint address no generated Service uses (last octet 251..254).
fn fresh_endpoint(c: usize) -> IpAddr {
    format!("198.18.{}.{}", 128 + c % 128, 251 + (c / 128) % 4)
        .parse()
        .expect("valid address")
}

/// `count` indices spread over 0..n, shifted by `offset`.
fn spread(n: usize, count: usize, offset: usize) -> Vec<usize> {
    (0..count)
        .map(|c| (c * n / count.max(1) + offset) % n.max(1))
        .collect()
}

// ---------------------------------------------------------------- the peer

/// kube-proxy's chain-name hash: 16 base32 characters ([A-Z2-7]). kube-proxy
/// takes them from a SHA-256; any well-spread hash gives the same shape.
fn kp_hash(s: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |seed: u64| {
        let mut h = seed;
        for b in s.as_bytes() {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    };
    let (a, b) = (fnv(0xcbf2_9ce4_8422_2325), fnv(0x8422_2325_cbf2_9ce4));
    (0..16)
        .map(|i| {
            let v = if i < 12 {
                a >> (i * 5)
            } else {
                b >> ((i - 12) * 5)
            };
            ALPHABET[(v & 31) as usize] as char
        })
        .collect()
}

/// The jumps kube-proxy ensures from the built-in chains: (table, chain, rule, target).
const KP_JUMPS: &[(&str, &str, &str, &str)] = &[
    (
        "filter",
        "INPUT",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "INPUT",
        "-m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS",
        "KUBE-NODEPORTS",
    ),
    (
        "filter",
        "INPUT",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "FORWARD",
        "-m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
        "KUBE-FORWARD",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "KUBE-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
    ),
    (
        "filter",
        "OUTPUT",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "OUTPUT",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "KUBE-SERVICES",
    ),
    (
        "nat",
        "OUTPUT",
        "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "KUBE-SERVICES",
    ),
    (
        "nat",
        "PREROUTING",
        "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "KUBE-SERVICES",
    ),
    (
        "nat",
        "POSTROUTING",
        "-m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
        "KUBE-POSTROUTING",
    ),
];

/// Ensure kube-proxy's chains and jumps as it does before a full restore:
/// `-N` for the chain (an existing chain is fine), `-C` for the jump, `-I` when missing.
fn kp_ensure_jumps(ipt: &Iptables) -> anyhow::Result<usize> {
    let mut calls = 0;
    for (table, chain, rule, target) in KP_JUMPS {
        let _ = ipt.run(&["-t", table, "-N", target]);
        let words = split_rule(rule);
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        let mut check = vec!["-t", table, "-C", chain];
        check.extend(&words);
        calls += 2;
        if ipt.run(&check).is_err() {
            let mut insert = vec!["-t", table, "-I", chain];
            insert.extend(&words);
            ipt.run(&insert)?;
            calls += 1;
        }
    }
    Ok(calls)
}

/// `iptables-restore` input as kube-proxy writes it for `plan`: everything
/// (`only` = None: a full sync), or the fixed chains, the whole
/// `KUBE-SERVICES` and the chains of the Services in `only` (a partial sync
/// with `MinimizeIPTablesRestore`; in large-cluster mode stale chains are
/// left for the periodic cleanup, so there are no `-X` lines).
fn kube_proxy_restore(plan: &ServicePlan, only: Option<&BTreeSet<(String, String)>>) -> String {
    let endpoints: usize = plan
        .services
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| b.cluster.len()))
        .sum();
    let large = endpoints > KP_LARGE_CLUSTER_ENDPOINTS;
    let mut filter_rules = String::new();
    let mut nat_chains = String::new();
    let mut nat_rules = String::new();
    let mut services = String::new();
    for svc in &plan.services {
        let write_chains =
            only.is_none_or(|o| o.contains(&(svc.namespace.clone(), svc.name.clone())));
        for (i, port) in svc.ports.iter().enumerate() {
            let p = match port.protocol {
                Protocol::TCP => "tcp",
                Protocol::UDP => "udp",
                Protocol::SCTP => "sctp",
            };
            let port_name = format!("{}/{}:{}", svc.namespace, svc.name, port.name);
            let svc_chain = format!("KUBE-SVC-{}", kp_hash(&format!("{port_name}{p}")));
            let targets = &svc.backends[i].cluster;
            for f in svc.frontends.iter().filter(|f| f.port_index == i) {
                if targets.is_empty() {
                    let _ = writeln!(
                        filter_rules,
                        "-A KUBE-SERVICES -d {}/32 -p {p} -m comment --comment \"{port_name} has no endpoints\" -m {p} --dport {} -j REJECT --reject-with icmp-port-unreachable",
                        f.ip, f.port
                    );
                    continue;
                }
                let _ = writeln!(
                    services,
                    "-A KUBE-SERVICES -d {}/32 -p {p} -m comment --comment \"{port_name} cluster IP\" -m {p} --dport {} -j {svc_chain}",
                    f.ip, f.port
                );
            }
            if targets.is_empty() || !write_chains {
                continue;
            }
            let _ = writeln!(nat_chains, ":{svc_chain} - [0:0]");
            for f in svc.frontends.iter().filter(|f| f.port_index == i) {
                let _ = writeln!(
                    nat_rules,
                    "-A {svc_chain} ! -s {CLUSTER_CIDR} -d {}/32 -p {p} -m comment --comment \"{port_name} cluster IP\" -m {p} --dport {} -j KUBE-MARK-MASQ",
                    f.ip, f.port
                );
            }
            let n = targets.len();
            for (k, t) in targets.iter().enumerate() {
                let ep = format!("{}:{}", t.ip, t.port);
                let sep = format!("KUBE-SEP-{}", kp_hash(&format!("{port_name}{p}{ep}")));
                let _ = writeln!(nat_chains, ":{sep} - [0:0]");
                let c = if large {
                    String::new()
                } else {
                    format!("-m comment --comment \"{port_name} -> {ep}\" ")
                };
                if n - k > 1 {
                    let _ = writeln!(
                        nat_rules,
                        "-A {svc_chain} {c}-m statistic --mode random --probability {:.10} -j {sep}",
                        1.0 / (n - k) as f64
                    );
                } else {
                    let _ = writeln!(nat_rules, "-A {svc_chain} {c}-j {sep}");
                }
                let c = if large {
                    String::new()
                } else {
                    format!("-m comment --comment \"{port_name}\" ")
                };
                let _ = writeln!(nat_rules, "-A {sep} -s {}/32 {c}-j KUBE-MARK-MASQ", t.ip);
                let _ = writeln!(
                    nat_rules,
                    "-A {sep} -p {p} {c}-m {p} -j DNAT --to-destination {ep}"
                );
            }
        }
    }
    let mut out = String::from("*filter\n");
    for c in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    out.push_str(&filter_rules);
    out.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    out.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n");
    out.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    out.push_str("COMMIT\n*nat\n");
    for c in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    out.push_str(&nat_chains);
    out.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    out.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    out.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    out.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    out.push_str(&services);
    out.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    out.push_str(&nat_rules);
    out.push_str("COMMIT\n");
    out
}

// ---------------------------------------------------------------- helpers

fn rules_in(rs: &Ruleset) -> (usize, usize) {
    let chains = rs.nat.len() + rs.filter.len();
    let rules = rs
        .nat
        .values()
        .chain(rs.filter.values())
        .map(Vec::len)
        .sum();
    (chains, rules)
}

/// What the kernel holds, read cheaply (on a thread inside the namespace):
/// chains named `prefix*` in nat and filter, and the rules of the nat chain
/// `services`. Not `iptables-nft-save`: on a nat table of 110k chains it
/// runs for minutes and then overflows its stack (seen with 1.8.9).
fn kernel_check(ipt: &Iptables, prefix: &str, services: &str) -> anyhow::Result<(usize, usize)> {
    let chains = match ipt.mode {
        Mode::Nft => benchnet::run("nft", &["list", "chains", "ip"])?
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("chain "))
            .filter(|c| c.starts_with(prefix))
            .count(),
        Mode::Legacy => {
            let mut n = 0;
            for table in ["nat", "filter"] {
                n += ipt
                    .save(table)?
                    .lines()
                    .filter(|l| l.strip_prefix(':').is_some_and(|c| c.starts_with(prefix)))
                    .count();
            }
            n
        }
    };
    let rules = ipt.run(&["-t", "nat", "-S", services])?;
    Ok((chains, count_rules(&rules)))
}

/// Empty nat and filter (flush every chain, delete user chains) with one
/// restore, so the kernel frees the rules now rather than in the namespace
/// cleanup worker while the next measurement runs.
fn flush_tables(ipt: &Iptables) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut child = Command::new(ipt.mode.tool("iptables-restore"))
        .args(["-w", "5"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning iptables-restore")?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(b"*nat\nCOMMIT\n*filter\nCOMMIT\n")?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "flushing tables: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(t.elapsed())
}

/// User and system CPU seconds of this process's reaped children (the
/// iptables tools), to split a step's time between iptables' own work in
/// userspace and the kernel's.
fn children_cpu() -> (f64, f64) {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

/// Children's (user, sys) CPU in ms spent while `f` ran.
fn with_cpu<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    let (u0, s0) = children_cpu();
    let out = f();
    let (u1, s1) = children_cpu();
    (out, (u1 - u0) * 1e3, (s1 - s0) * 1e3)
}

/// The commit the working tree is at, and whether the dataplane's sources
/// differ from it (read at run time, from the current directory).
fn source_revision() -> String {
    let head = benchnet::run("git", &["log", "-1", "--format=%h %cI %s"])
        .map(|s| s.trim().chars().take(100).collect::<String>())
        .unwrap_or_else(|_| "unknown (not a git checkout)".into());
    let dirty = benchnet::run(
        "git",
        &[
            "status",
            "--porcelain",
            "--",
            "agent",
            "model",
            "ebpf",
            "ebpf-abi",
        ],
    )
    .map(|s| !s.trim().is_empty())
    .unwrap_or(false);
    format!(
        "working tree at `{head}`{}",
        if dirty {
            ", with uncommitted changes in agent/, model/, ebpf/ or ebpf-abi/"
        } else {
            ""
        }
    )
}

/// A file removed on drop.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A pause before a measured phase: the kernel frees big rulesets (and
/// deleted namespaces) in the background after the commit returns.
fn settle() {
    std::thread::sleep(Duration::from_secs(3));
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// A duration for tables: ms below 10 s, s above.
fn fmt_ms(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} s", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v:.1} ms")
    }
}

/// A duration for the eBPF tables: µs below 1 ms, else as [`fmt_ms`].
fn fmt_fine(v: f64) -> String {
    if v < 1.0 {
        format!("{:.0} µs", v * 1e3)
    } else {
        fmt_ms(v)
    }
}

// ---------------------------------------------------------------- weft side

/// One single-change step as the agent pays it.
#[derive(Clone, Debug, Default)]
struct Step {
    /// The agent's `PlanBuilder::build` over the whole view (Services
    /// whose entry is unchanged are compared, not planned again).
    build_ms: f64,
    /// `IptablesDataplane::apply` (render and compare the changed Services,
    /// restore of the changed chains).
    apply_ms: f64,
    /// The apply's restore input, replayed right after it with a bare
    /// `iptables-restore --noflush` (the same input onto the same rules):
    /// the iptables part of the apply. Endpoint changes only (their input
    /// defines no new chain and deletes none, so a replay is idempotent).
    replay_ms: Option<f64>,
    /// CPU of the iptables processes the apply ran: user, system.
    tool_user_ms: f64,
    tool_sys_ms: f64,
    chains: usize,
    bytes: usize,
}

impl Step {
    fn total(&self) -> f64 {
        self.build_ms + self.apply_ms
    }
}

#[derive(Debug, Default)]
struct WeftRun {
    chains: usize,
    rules: usize,
    /// Checked in the kernel after the full sync: chains, services-chain rules.
    kernel: (usize, usize),
    build_ms: f64,
    full_ms: f64,
    /// The full sync's restore input applied alone, with a bare
    /// `iptables-restore --noflush`, in another fresh namespace: the
    /// restore's share of the full sync (the rest: listing the tables
    /// before, the jumps after).
    alone_ms: f64,
    alone_user_ms: f64,
    alone_sys_ms: f64,
    full_bytes: usize,
    noop: Vec<Step>,
    endpoint: Vec<Step>,
    add: Vec<Step>,
    remove: Vec<Step>,
    /// A full rewrite onto the rules already there (`invalidate`, then
    /// `apply`): what an agent restart and the periodic full resync cost.
    resync: Vec<Step>,
    flush_ms: f64,
}

struct Weft {
    dp: IptablesDataplane,
    cfg: PlanConfig,
    /// The agent's planner: plans again only the Services that changed.
    planner: PlanBuilder,
    plan: ServicePlan,
}

impl Weft {
    /// Rebuild the plan from `view` and apply it; `replay`: time the
    /// apply's restore input again on its own (see [`Step::replay_ms`]).
    fn step(&mut self, view: &NodeView, replay: bool) -> anyhow::Result<Step> {
        let t = Instant::now();
        let plan = self.planner.build(view, &self.cfg);
        let build_ms = ms(t.elapsed());
        let t = Instant::now();
        let (stats, tool_user_ms, tool_sys_ms) = with_cpu(|| self.dp.apply(&plan, BTreeMap::new()));
        let apply_ms = ms(t.elapsed());
        let stats = stats?;
        let mut replay_ms = None;
        if replay {
            // The input the apply wrote: the changed chains of the whole
            // old and new rulesets (checked by its size against the apply's).
            let old = self.dp.desired(&self.plan, BTreeMap::new());
            let new = self.dp.desired(&plan, BTreeMap::new());
            let input = restore_input(&old, &new).context("the change changed nothing")?;
            ensure!(
                input.len() == stats.bytes && !input.contains("\n-X "),
                "the replayed input ({} bytes) is not the applied one ({} bytes)",
                input.len(),
                stats.bytes
            );
            let ipt = Iptables {
                mode: self.dp.mode(),
            };
            let t = Instant::now();
            ipt.restore(&input)?;
            replay_ms = Some(ms(t.elapsed()));
        }
        self.plan = plan;
        Ok(Step {
            build_ms,
            apply_ms,
            replay_ms,
            tool_user_ms,
            tool_sys_ms,
            chains: stats.chains,
            bytes: stats.bytes,
        })
    }
}

/// weft's first restore input at size `n`, applied alone (on a thread inside
/// a fresh namespace, emptied again afterwards): (ms, user ms, sys ms, bytes).
fn restore_alone(mode: Mode, n: usize, endpoints: usize) -> anyhow::Result<(f64, f64, f64, usize)> {
    let plan = build(&bench_view(n, endpoints), &plan_config());
    let dp = IptablesDataplane::new(mode, CLUSTER_CIDR);
    let input = restore_input(&Ruleset::default(), &dp.desired(&plan, BTreeMap::new()))
        .context("an empty plan")?;
    let (took, user, sys) = with_cpu(|| timed_restore(mode, &input, None, false));
    let took = took?.context("not stopped")?;
    flush_tables(&Iptables { mode })?;
    Ok((took, user, sys, input.len()))
}

/// Everything weft does at one size, on a thread inside the namespace.
/// `keep`: leave the rules in place. `probe`: right after the full sync,
/// time connects to the probe's cluster IP and the server's pod IP.
fn weft_run(
    mode: Mode,
    n: usize,
    args: &ArgsCopy,
    keep: bool,
    probe: Option<Probe>,
) -> anyhow::Result<(WeftRun, Option<PhaseResult>)> {
    let mut out = WeftRun::default();
    let mut view = bench_view(n, args.endpoints);
    let cfg = plan_config();
    let t = Instant::now();
    let mut planner = PlanBuilder::default();
    let plan = planner.build(&view, &cfg);
    out.build_ms = ms(t.elapsed());
    let mut dp = IptablesDataplane::new(mode, CLUSTER_CIDR);
    dp.conntrack = false;
    (out.chains, out.rules) = rules_in(&dp.desired(&plan, BTreeMap::new()));
    let ipt = Iptables { mode };
    let t = Instant::now();
    let stats = dp.apply(&plan, BTreeMap::new());
    out.full_ms = ms(t.elapsed());
    let stats = stats?;
    ensure!(stats.full, "the first apply was not a full one");
    out.full_bytes = stats.bytes;
    let t = Instant::now();
    let want = dp.desired(&plan, BTreeMap::new());
    let services_rules = want.nat.get("WEFT-SERVICES").map_or(0, Vec::len);
    out.kernel = kernel_check(&ipt, "WEFT-", "WEFT-SERVICES")?;
    ensure!(
        out.kernel == (out.chains, services_rules),
        "the kernel holds {:?} (WEFT- chains, WEFT-SERVICES rules), not {:?}",
        out.kernel,
        (out.chains, services_rules)
    );
    eprintln!(
        "{} {n:>6} weft: full sync {} (listing the rules back: {})",
        mode.as_str(),
        fmt_ms(out.full_ms),
        fmt_ms(ms(t.elapsed()))
    );
    let mut series = None;
    if let Some(p) = probe {
        settle();
        series = Some(p.measure(&[LatTarget::cluster_ip(n, None), LatTarget::pod_ip(None)])?);
    }
    let mut w = Weft {
        dp,
        cfg,
        planner,
        plan,
    };
    for _ in 0..3 {
        out.noop.push(w.step(&view, false)?);
    }
    let generated = n - 1;
    // One endpoint of one Service replaced (a pod restarted elsewhere).
    for (c, i) in spread(generated, args.changes, 0).into_iter().enumerate() {
        let key = (NAMESPACE.to_string(), format!("svc-{i:05}"));
        let svc = view.services.get_mut(&key).context("no such Service")?;
        let j = c % svc.backends.len();
        svc.backends[j].ip = fresh_endpoint(c);
        out.endpoint.push(w.step(&view, true)?);
    }
    // A Service added (sorted among the others), then one removed.
    for (c, i) in spread(generated, args.adds, generated / 7)
        .into_iter()
        .enumerate()
    {
        let mut s = bench_service(i, args.endpoints);
        s.name = format!("svc-{i:05}-add");
        s.cluster_ips = vec![format!("198.19.250.{}", c + 1).parse()?];
        view.services.insert(s.key(), s);
        out.add.push(w.step(&view, false)?);
    }
    for i in spread(generated, args.adds, generated / 3) {
        let key = (NAMESPACE.to_string(), format!("svc-{i:05}"));
        ensure!(view.services.remove(&key).is_some(), "no Service {key:?}");
        out.remove.push(w.step(&view, false)?);
    }
    w.dp.invalidate();
    let step = w.step(&view, false)?;
    eprintln!(
        "{} {n:>6} weft: full resync onto its rules {}",
        mode.as_str(),
        fmt_ms(step.total())
    );
    out.resync.push(step);
    if !keep {
        out.flush_ms = ms(flush_tables(&ipt)?);
    }
    Ok((out, series))
}

// ---------------------------------------------------------------- peer side

#[derive(Debug, Default)]
struct PeerRun {
    rules: usize,
    chains: usize,
    kernel: (usize, usize),
    bytes: usize,
    generate_ms: f64,
    jumps_ms: f64,
    jump_calls: usize,
    /// `None`: stopped at the time limit.
    full_ms: Option<f64>,
    full_user_ms: f64,
    full_sys_ms: f64,
    /// When the full restore was stopped: loading the same rules with a
    /// flushing restore (not kube-proxy's way) and the jumps, untimed for
    /// the tables, so the partial restores still meet the full ruleset.
    loaded_ms: Option<f64>,
    partial_ms: Vec<f64>,
    partial_user_ms: Vec<f64>,
    partial_sys_ms: Vec<f64>,
    partial_bytes: usize,
    flush_ms: f64,
}

/// `iptables-restore --noflush -w 5` (the arguments weft's dataplane uses)
/// of `input`, timed from spawn to exit; killed (by its pid) at `limit`.
/// `None` when stopped. `flush`: without `--noflush`.
fn timed_restore(
    mode: Mode,
    input: &str,
    limit: Option<Duration>,
    flush: bool,
) -> anyhow::Result<Option<f64>> {
    let args: &[&str] = if flush {
        &["-w", "5"]
    } else {
        &["--noflush", "-w", "5"]
    };
    let t = Instant::now();
    let mut child = Command::new(mode.tool("iptables-restore"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning iptables-restore")?;
    let pid = child.id() as libc::pid_t;
    let mut stdin = child.stdin.take().context("no stdin")?;
    let done = (std::sync::Mutex::new(false), std::sync::Condvar::new());
    let (out, took, killed) = std::thread::scope(|s| {
        s.spawn(move || {
            // A killed child closes the pipe: the write fails, as it should.
            let _ = stdin.write_all(input.as_bytes());
        });
        let dog = s.spawn(|| {
            let Some(limit) = limit else { return false };
            let (lock, cv) = &done;
            let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
            let (finished, _) = cv
                .wait_timeout_while(guard, limit, |d| !*d)
                .unwrap_or_else(|p| p.into_inner());
            if *finished {
                return false;
            }
            // SAFETY: kill on the pid of our own child, not yet reaped
            // (the waiting thread marks `done` before this lock is free).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            true
        });
        let out = child.wait_with_output();
        let took = t.elapsed();
        let (lock, cv) = &done;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
        (out, took, dog.join().unwrap_or(false))
    });
    let out = out.context("waiting for iptables-restore")?;
    if killed {
        return Ok(None);
    }
    ensure!(
        out.status.success(),
        "{} failed: {}",
        mode.tool("iptables-restore"),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(Some(ms(took)))
}

fn peer_run(mode: Mode, n: usize, args: &ArgsCopy) -> anyhow::Result<PeerRun> {
    let mut out = PeerRun::default();
    let mut view = bench_view(n, args.endpoints);
    let cfg = plan_config();
    let plan = build(&view, &cfg);
    let t = Instant::now();
    let text = kube_proxy_restore(&plan, None);
    out.generate_ms = ms(t.elapsed());
    out.bytes = text.len();
    out.rules = text.lines().filter(|l| l.starts_with("-A ")).count();
    out.chains = text.lines().filter(|l| l.starts_with(":KUBE-")).count();
    let ipt = Iptables { mode };
    let jumps = |out: &mut PeerRun| -> anyhow::Result<()> {
        let t = Instant::now();
        out.jump_calls = kp_ensure_jumps(&ipt)?;
        out.jumps_ms = ms(t.elapsed());
        Ok(())
    };
    if !args.peer_jumps_after {
        jumps(&mut out)?;
    }
    let limit = (args.peer_limit > 0).then(|| Duration::from_secs(args.peer_limit));
    let (full, user, sys) = with_cpu(|| timed_restore(mode, &text, limit, false));
    out.full_ms = full?;
    (out.full_user_ms, out.full_sys_ms) = (user, sys);
    if out.full_ms.is_none() && !args.no_peer_partial {
        // Nothing was committed (iptables-restore commits at COMMIT, after
        // parsing); load the same rules another way for the partial restores.
        let t = Instant::now();
        timed_restore(mode, &text, None, true)?;
        kp_ensure_jumps(&ipt)?;
        out.loaded_ms = Some(ms(t.elapsed()));
    } else if args.peer_jumps_after {
        jumps(&mut out)?;
    }
    if out.full_ms.is_some() || out.loaded_ms.is_some() {
        let nat = text.split("*nat\n").nth(1).unwrap_or_default();
        let want = (
            out.chains,
            nat.lines()
                .filter(|l| l.starts_with("-A KUBE-SERVICES "))
                .count(),
        );
        out.kernel = kernel_check(&ipt, "KUBE-", "KUBE-SERVICES")?;
        ensure!(
            out.kernel == want,
            "the kernel holds {:?} (KUBE- chains, KUBE-SERVICES rules), not {want:?}",
            out.kernel
        );
    }
    if !args.no_peer_partial {
        // The same endpoint changes as weft's.
        for (c, i) in spread(n - 1, args.changes, 0).into_iter().enumerate() {
            let key = (NAMESPACE.to_string(), format!("svc-{i:05}"));
            let svc = view.services.get_mut(&key).context("no such Service")?;
            let j = c % svc.backends.len();
            svc.backends[j].ip = fresh_endpoint(c);
            let plan = build(&view, &cfg);
            let only = BTreeSet::from([key]);
            let text = kube_proxy_restore(&plan, Some(&only));
            out.partial_bytes = text.len();
            let (took, user, sys) = with_cpu(|| timed_restore(mode, &text, None, false));
            out.partial_ms.push(took?.context("not stopped")?);
            out.partial_user_ms.push(user);
            out.partial_sys_ms.push(sys);
        }
    }
    out.flush_ms = ms(flush_tables(&ipt)?);
    Ok(out)
}

// ---------------------------------------------------------------- eBPF side

/// One single change on the eBPF dataplane, as the agent's driver pays a
/// stream delta.
#[derive(Clone, Debug, Default)]
struct EbpfStep {
    /// `PlanBuilder::update` by the changed key.
    plan_ms: f64,
    /// `Reconciler::apply` (encode the changed Service, write the maps).
    apply_ms: f64,
    /// What `EbpfDataplane::program` does after the apply for backends no
    /// set holds any more: purge the north-south connection map, destroy
    /// connected UDP sockets to them in the node namespace.
    cleanup_ms: f64,
    /// Map entries written or deleted.
    writes: usize,
    /// Major page faults of the measuring thread during the step.
    majflt: u64,
}

impl EbpfStep {
    fn total(&self) -> f64 {
        self.plan_ms + self.apply_ms + self.cleanup_ms
    }
}

/// An agent restart on the maps of the run: programs replaced in their
/// pinned links, maps read back and adopted, the full plan applied.
#[derive(Clone, Debug, Default)]
struct EbpfRestart {
    open_ms: f64,
    image_ms: f64,
    adopt_ms: f64,
    build_ms: f64,
    apply_ms: f64,
    writes: usize,
}

impl EbpfRestart {
    fn total(&self) -> f64 {
        self.open_ms + self.image_ms + self.adopt_ms + self.build_ms + self.apply_ms
    }
}

#[derive(Debug, Default)]
struct EbpfRun {
    n: usize,
    /// Entries in the kernel after the full sync (checked against the
    /// encoded plan): frontends (services map), backends (backends map).
    frontends: usize,
    backends: usize,
    /// `Kernel::open` on a fresh bpffs: load, verify, attach, pin.
    open_ms: f64,
    build_ms: f64,
    /// The full sync: `Reconciler::apply` of the whole plan onto empty maps.
    full_ms: f64,
    full_writes: usize,
    /// Reading every entry back (`Kernel::image`).
    image_ms: f64,
    /// One map write alone, µs: existing entries written again with their
    /// value (backends map, services map), mean.
    write_backend_us: f64,
    write_service_us: f64,
    noop: Vec<EbpfStep>,
    endpoint: Vec<EbpfStep>,
    add: Vec<EbpfStep>,
    remove: Vec<EbpfStep>,
    restart: EbpfRestart,
    /// Why the restart failed (the run then went on with the first agent).
    restart_error: Option<String>,
    /// The maps reconciled down to the probe alone (latency size only).
    probe_only: Option<(f64, usize)>,
}

/// The agent's pieces of the eBPF dataplane, as `EbpfDataplane` holds them.
struct EbpfAgent {
    kernel: Kernel,
    reconciler: Reconciler,
    planner: PlanBuilder,
    cfg: PlanConfig,
}

impl EbpfAgent {
    /// A change of the Services in `changed`, as the driver applies a delta.
    fn step(
        &mut self,
        view: &NodeView,
        changed: &BTreeSet<(String, String)>,
    ) -> anyhow::Result<EbpfStep> {
        let t = Instant::now();
        let faults = major_faults();
        let plan = self.planner.update(view, &self.cfg, changed);
        let plan_ms = ms(t.elapsed());
        ensure!(
            plan.changed
                .as_ref()
                .is_some_and(|c| c.len() == changed.len()),
            "the plan does not list the changed Services"
        );
        let t = Instant::now();
        let stats = self
            .reconciler
            .apply(&plan, &mut self.kernel)
            .context("Reconciler::apply")?;
        let apply_ms = ms(t.elapsed());
        let t = Instant::now();
        cleanup(&mut self.kernel, &stats.removed_backends)?;
        let cleanup_ms = ms(t.elapsed());
        Ok(EbpfStep {
            plan_ms,
            apply_ms,
            cleanup_ms,
            writes: stats.writes,
            majflt: major_faults() - faults,
        })
    }
}

/// Major page faults of the calling thread so far (a page read back from
/// disk: e.g. code dropped from memory while the process was idle).
fn major_faults() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    ru.ru_majflt as u64
}

/// `EbpfDataplane::program`'s cleanup after an apply (see [`EbpfStep::cleanup_ms`]);
/// this thread is in the node's namespace. There are no pod namespaces here.
fn cleanup(kernel: &mut Kernel, removed: &[(u32, u16)]) -> anyhow::Result<usize> {
    if removed.is_empty() {
        return Ok(0);
    }
    let mut n = kernel
        .purge_connections(removed)
        .context("purging the connection map")?;
    let targets: Vec<(std::net::Ipv4Addr, u16)> = removed
        .iter()
        .map(|(a, p)| (addr_of(*a), u16::from_be(*p)))
        .collect();
    n += weft_agent::dataplane::sockdestroy::destroy_udp_to(&targets)
        .context("destroying UDP sockets to removed backends")?;
    Ok(n)
}

/// The frontend and backend entries the maps must hold for `plan` (backend
/// sets are shared by equal content).
fn expected_entries(plan: &ServicePlan) -> (usize, usize) {
    let mut frontends = 0;
    let mut sets = BTreeSet::new();
    for svc in &plan.services {
        for f in encode(svc).frontends {
            frontends += 1;
            if let Some(set) = f.set {
                sets.insert(set);
            }
        }
    }
    (frontends, sets.iter().map(|s| s.backends.len()).sum())
}

/// Everything the eBPF side does at one size, on a thread inside the node
/// namespace: maps pinned under `bpffs` (fresh), programs attached to
/// `cgroup`. `probe`: latency right after the full sync and with the probe
/// alone at the end; returns those rows' measurements.
fn ebpf_run(
    n: usize,
    args: &ArgsCopy,
    bpffs: &Path,
    cgroup: &Path,
    probe: Option<Probe>,
) -> anyhow::Result<(EbpfRun, Vec<(usize, PhaseResult)>)> {
    let mut out = EbpfRun {
        n,
        ..Default::default()
    };
    let mut view = bench_view(n, args.endpoints);
    let cfg = plan_config();
    let t = Instant::now();
    let mut kernel = Kernel::open(bpffs, cgroup).context("loading and attaching the programs")?;
    out.open_ms = ms(t.elapsed());
    let image = kernel.image()?;
    ensure!(
        image.services.is_empty() && image.backends.is_empty(),
        "the maps of a fresh bpffs are not empty"
    );
    let mut reconciler = Reconciler::adopt(&image);
    let t = Instant::now();
    let mut planner = PlanBuilder::default();
    let plan = planner.build(&view, &cfg);
    out.build_ms = ms(t.elapsed());
    let t = Instant::now();
    let stats = reconciler
        .apply(&plan, &mut kernel)
        .context("the full sync")?;
    out.full_ms = ms(t.elapsed());
    out.full_writes = stats.writes;
    let t = Instant::now();
    let image = kernel.image()?;
    out.image_ms = ms(t.elapsed());
    (out.frontends, out.backends) = (image.services.len(), image.backends.len());
    let want = expected_entries(&plan);
    ensure!(
        (out.frontends, out.backends) == want,
        "the maps hold {:?} (frontends, backends), not {want:?}",
        (out.frontends, out.backends)
    );
    ensure!(
        out.full_writes == out.frontends + out.backends,
        "the full sync wrote {} entries for {} in the maps",
        out.full_writes,
        out.frontends + out.backends
    );
    eprintln!(
        "ebpf {n:>6}: load+attach {}, full sync {} ({} writes; reading the maps back: {})",
        fmt_ms(out.open_ms),
        fmt_ms(out.full_ms),
        out.full_writes,
        fmt_ms(out.image_ms)
    );
    // One write alone: existing entries written again with their value.
    const SAMPLE: usize = 2000;
    let t = Instant::now();
    let mut k = 0;
    for (key, value) in image.backends.iter().take(SAMPLE) {
        kernel.put_backend(*key, *value)?;
        k += 1;
    }
    out.write_backend_us = t.elapsed().as_secs_f64() * 1e6 / k.max(1) as f64;
    let t = Instant::now();
    let mut k = 0;
    for (key, value) in image.services.iter().take(SAMPLE) {
        kernel.put_service(*key, *value)?;
        k += 1;
    }
    out.write_service_us = t.elapsed().as_secs_f64() * 1e6 / k.max(1) as f64;
    drop(image);

    let mut phases = Vec::new();
    let mut a = EbpfAgent {
        kernel,
        reconciler,
        planner,
        cfg,
    };
    if let Some(p) = &probe {
        let (at_n, alone) = ebpf_latency(&mut a, &view, n, cgroup, p, &mut out)?;
        phases.push((n, at_n));
        phases.push((1, alone));
    }
    for _ in 0..3 {
        out.noop.push(a.step(&view, &BTreeSet::new())?);
    }
    let generated = n - 1;
    for (c, i) in spread(generated, args.changes, 0).into_iter().enumerate() {
        let key = (NAMESPACE.to_string(), format!("svc-{i:05}"));
        let svc = view.services.get_mut(&key).context("no such Service")?;
        let j = c % svc.backends.len();
        svc.backends[j].ip = fresh_endpoint(c);
        out.endpoint.push(a.step(&view, &BTreeSet::from([key]))?);
    }
    for (c, i) in spread(generated, args.adds, generated / 7)
        .into_iter()
        .enumerate()
    {
        let mut s = bench_service(i, args.endpoints);
        s.name = format!("svc-{i:05}-add");
        s.cluster_ips = vec![format!("198.19.250.{}", c + 1).parse()?];
        let key = s.key();
        view.services.insert(s.key(), s);
        out.add.push(a.step(&view, &BTreeSet::from([key]))?);
    }
    for i in spread(generated, args.adds, generated / 3) {
        let key = (NAMESPACE.to_string(), format!("svc-{i:05}"));
        ensure!(view.services.remove(&key).is_some(), "no Service {key:?}");
        out.remove.push(a.step(&view, &BTreeSet::from([key]))?);
    }

    // A restart: a new agent on the same bpffs. The old one goes once the
    // new one is in place, so a failed restart leaves the run its maps.
    match restart_agent(&view, &a.cfg, bpffs, cgroup) {
        Ok((new, r)) => {
            eprintln!(
                "ebpf {n:>6}: restart {} ({} writes)",
                fmt_ms(r.total()),
                r.writes
            );
            out.restart = r;
            a = new;
        }
        Err(e) => {
            eprintln!("ebpf {n:>6}: restart FAILED: {e:#}");
            out.restart_error = Some(format!("{e:#}"));
        }
    }

    drop(a);
    Ok((out, phases))
}

/// The eBPF latency phases: with the maps holding `view` (N Services, as
/// after the full sync) and holding the probe alone, alternated
/// `p.rounds` times (`--rr-rounds`, at least 1), each state's share of
/// the connects and one sockperf round per state and round, so both states
/// meet the same machine. Leaves the maps holding `view`.
fn ebpf_latency(
    a: &mut EbpfAgent,
    view: &NodeView,
    n: usize,
    cgroup: &Path,
    p: &Probe,
    out: &mut EbpfRun,
) -> anyhow::Result<(PhaseResult, PhaseResult)> {
    let targets = [
        LatTarget::cluster_ip(n, Some(cgroup)),
        LatTarget::pod_ip(Some(cgroup)),
        LatTarget::pod_ip_outside(),
    ];
    let rounds = p.rounds.max(1);
    let part = Probe {
        connects: p.connects.div_ceil(rounds),
        rr: p.rr.clone().map(|c| RrConfig { rounds: 1, ..c }),
        ..p.clone()
    };
    let alone_view = view_of([probe_service(n)]);
    let mut at_n: Option<PhaseResult> = None;
    let mut alone: Option<PhaseResult> = None;
    for round in 0..rounds {
        if round > 0 {
            let plan = a.planner.build(view, &a.cfg);
            a.reconciler.apply(&plan, &mut a.kernel)?;
        }
        settle();
        merge(&mut at_n, part.measure(&targets)?);
        let t = Instant::now();
        let plan = a.planner.build(&alone_view, &a.cfg);
        let stats = a.reconciler.apply(&plan, &mut a.kernel)?;
        cleanup(&mut a.kernel, &stats.removed_backends)?;
        if round == 0 {
            out.probe_only = Some((ms(t.elapsed()), stats.writes));
            let image = a.kernel.image()?;
            ensure!(
                (image.services.len(), image.backends.len()) == expected_entries(&plan),
                "the maps do not hold the probe alone"
            );
        }
        settle();
        merge(&mut alone, part.measure(&targets)?);
        eprintln!("ebpf {n:>6}: latency round {} of {rounds} done", round + 1);
    }
    let plan = a.planner.build(view, &a.cfg);
    a.reconciler.apply(&plan, &mut a.kernel)?;
    let image = a.kernel.image()?;
    ensure!(
        (image.services.len(), image.backends.len()) == expected_entries(&plan),
        "the maps do not hold the N Services again"
    );
    Ok((
        at_n.context("no latency round")?,
        alone.context("no latency round")?,
    ))
}

/// Add `more`'s samples to `acc` (same targets, modes and protocols).
fn merge(acc: &mut Option<PhaseResult>, more: PhaseResult) {
    let Some(a) = acc else {
        *acc = Some(more);
        return;
    };
    for (x, y) in a.connect.iter_mut().zip(more.connect) {
        x.extend(y);
    }
    for (x, y) in a.rr.iter_mut().zip(more.rr) {
        for ((_, _, xs), (_, _, ys)) in x.iter_mut().zip(y) {
            xs.extend(ys);
        }
    }
}

/// A new agent on the maps and links pinned under `bpffs`: programs
/// replaced in their links, maps read back and adopted, the full plan of
/// `view` applied.
fn restart_agent(
    view: &NodeView,
    cfg: &PlanConfig,
    bpffs: &Path,
    cgroup: &Path,
) -> anyhow::Result<(EbpfAgent, EbpfRestart)> {
    let mut r = EbpfRestart::default();
    let t = Instant::now();
    let mut kernel =
        Kernel::open(bpffs, cgroup).context("Kernel::open on the pinned maps and links")?;
    r.open_ms = ms(t.elapsed());
    ensure!(
        kernel.attach.attached.is_empty(),
        "the restart attached anew instead of replacing: {:?}",
        kernel.attach
    );
    let t = Instant::now();
    let image = kernel.image()?;
    r.image_ms = ms(t.elapsed());
    let t = Instant::now();
    let mut reconciler = Reconciler::adopt(&image);
    r.adopt_ms = ms(t.elapsed());
    drop(image);
    let t = Instant::now();
    let mut planner = PlanBuilder::default();
    let plan = planner.build(view, cfg);
    r.build_ms = ms(t.elapsed());
    let t = Instant::now();
    let stats = reconciler
        .apply(&plan, &mut kernel)
        .context("the restart's apply")?;
    r.apply_ms = ms(t.elapsed());
    r.writes = stats.writes;
    cleanup(&mut kernel, &stats.removed_backends)?;
    Ok((
        EbpfAgent {
            kernel,
            reconciler,
            planner,
            cfg: cfg.clone(),
        },
        r,
    ))
}

// ---------------------------------------------------------------- latency

/// An accept-and-close TCP server on a thread inside a namespace; stopped
/// and joined on drop.
struct Server {
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
    ns: String,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(ns: &str, addr: SocketAddr) -> anyhow::Result<Server> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let name = ns.to_string();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let listener = benchnet::enter(&name)
                .and_then(|_| TcpListener::bind(addr).context("binding the server"));
            let listener = match listener {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            for conn in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                drop(conn);
            }
        });
        rx.recv().context("server thread died")??;
        Ok(Server {
            stop,
            addr,
            ns: ns.to_string(),
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop from inside its namespace.
        let addr = self.addr;
        let _ = benchnet::run_in(&self.ns, move || {
            let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
            Ok(())
        });
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One blocking connect, timed; then (untimed) wait for the server's close,
/// so the next SYN never meets a full accept queue, and close with a reset
/// (no TIME_WAIT).
fn connect_once(addr: SocketAddr) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    let us = t.elapsed().as_secs_f64() * 1e6;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = [0u8; 1];
    let _ = std::io::Read::read(&mut s, &mut buf);
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a correctly sized struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    Ok(us)
}

/// One latency target: connects go to `connect`, sockperf to `rr` (the
/// same address, the sockperf port); the client runs in `cgroup` when set.
#[derive(Clone, Debug)]
struct LatTarget {
    label: &'static str,
    connect: SocketAddr,
    rr: SocketAddr,
    cgroup: Option<PathBuf>,
}

impl LatTarget {
    fn cluster_ip(n: usize, cgroup: Option<&Path>) -> LatTarget {
        LatTarget {
            label: "cluster IP",
            connect: probe_addr(n),
            rr: SocketAddr::new(probe_ip(n), RR_PORT),
            cgroup: cgroup.map(Path::to_path_buf),
        }
    }

    fn pod_ip(cgroup: Option<&Path>) -> LatTarget {
        LatTarget {
            label: "pod IP",
            connect: server_addr(),
            rr: SocketAddr::new(server_addr().ip(), RR_TARGET_PORT),
            cgroup: cgroup.map(Path::to_path_buf),
        }
    }

    /// The pod IP from a client outside the programs' cgroup.
    fn pod_ip_outside() -> LatTarget {
        LatTarget {
            label: "pod IP, client outside the cgroup",
            ..LatTarget::pod_ip(None)
        }
    }
}

/// sockperf request/response settings.
#[derive(Clone, Debug)]
struct RrConfig {
    modes: Vec<RrMode>,
    protocols: Vec<RrProto>,
    rounds: usize,
    secs: u64,
    msg_size: usize,
}

/// Where a latency phase's clients run and what they measure.
#[derive(Clone, Debug)]
struct Probe {
    /// How many times the eBPF latency phase alternates its two states.
    rounds: usize,
    client: String,
    /// The server namespace (sockperf servers run there during a phase's
    /// request/response runs).
    server: String,
    connects: usize,
    /// None: no request/response (sockperf missing or not asked for).
    rr: Option<RrConfig>,
}

/// Every request/response round trip (µs) of one target, per mode and protocol.
type RrSamples = Vec<(RrMode, RrProto, Vec<f64>)>;

/// What one phase measured, per target (in the order given): connect
/// times, and per protocol every request/response round trip (µs).
struct PhaseResult {
    labels: Vec<&'static str>,
    connect: Vec<Vec<f64>>,
    rr: Vec<RrSamples>,
}

impl Probe {
    fn measure(&self, targets: &[LatTarget]) -> anyhow::Result<PhaseResult> {
        let connect = connect_series(&self.client, targets, self.connects)?;
        let rr = match &self.rr {
            Some(c) => rr_series(&self.client, &self.server, targets, c)?,
            None => targets.iter().map(|_| Vec::new()).collect(),
        };
        Ok(PhaseResult {
            labels: targets.iter().map(|t| t.label).collect(),
            connect,
            rr,
        })
    }
}

/// sockperf runs to each target and protocol, `rounds` times, targets
/// alternating in each round; samples of a (target, mode, protocol)
/// merged. Per mode, that mode's servers (TCP and UDP) run in the server
/// namespace for the mode's runs only (a busy-polling server spins).
fn rr_series(
    client_ns: &str,
    server_ns: &str,
    targets: &[LatTarget],
    c: &RrConfig,
) -> anyhow::Result<Vec<RrSamples>> {
    let mut out: Vec<RrSamples> = targets.iter().map(|_| Vec::new()).collect();
    let listen = SocketAddr::new(server_addr().ip(), RR_TARGET_PORT);
    for mode in &c.modes {
        let busy = *mode == RrMode::BusyPoll;
        let mut servers = Vec::new();
        for p in &c.protocols {
            servers.push(SockperfServer::start(
                server_ns,
                listen,
                *p == RrProto::Tcp,
                busy,
            )?);
        }
        let (ts, cfg, mode) = (targets.to_vec(), c.clone(), *mode);
        let samples = benchnet::run_in(client_ns, move || {
            let mut out: Vec<Vec<Vec<f64>>> = ts
                .iter()
                .map(|_| cfg.protocols.iter().map(|_| Vec::new()).collect())
                .collect();
            for _ in 0..cfg.rounds {
                for (k, t) in ts.iter().enumerate() {
                    for (i, p) in cfg.protocols.iter().enumerate() {
                        let v = benchnet::sockperf_pingpong(
                            t.rr,
                            *p == RrProto::Tcp,
                            busy,
                            cfg.secs,
                            cfg.msg_size,
                            t.cgroup.as_deref(),
                        )
                        .with_context(|| {
                            format!(
                                "sockperf {} {} to the {}",
                                mode.as_str(),
                                p.as_str(),
                                t.label
                            )
                        })?;
                        out[k][i].extend(v);
                    }
                }
            }
            Ok(out)
        });
        drop(servers);
        for (k, per_proto) in samples?.into_iter().enumerate() {
            for (p, v) in c.protocols.iter().zip(per_proto) {
                out[k].push((mode, *p, v));
            }
        }
    }
    Ok(out)
}

/// A request to a connecting thread.
enum ConnectJob {
    /// Untimed: is the target reachable at all?
    Check(SocketAddr),
    Time(SocketAddr),
}

/// A thread in the client namespace (and in a cgroup when given) that
/// connects on request, so targets whose clients differ in cgroup can
/// alternate; the timing happens on the thread.
struct ConnectWorker {
    jobs: Option<std::sync::mpsc::Sender<ConnectJob>>,
    results: std::sync::mpsc::Receiver<anyhow::Result<f64>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ConnectWorker {
    fn start(ns: &str, cgroup: Option<PathBuf>) -> anyhow::Result<ConnectWorker> {
        let (jobs, rx) = std::sync::mpsc::channel::<ConnectJob>();
        let (tx, results) = std::sync::mpsc::channel();
        let ns = ns.to_string();
        let thread = std::thread::spawn(move || {
            let ready = benchnet::enter(&ns).and_then(|_| match &cgroup {
                Some(cg) => ThreadedCgroup::join(cg),
                None => Ok(()),
            });
            let ok = ready.is_ok();
            let _ = tx.send(ready.map(|_| 0.0));
            if !ok {
                return;
            }
            for job in rx {
                let r = match job {
                    ConnectJob::Check(t) => TcpStream::connect_timeout(&t, Duration::from_secs(2))
                        .map(|_| 0.0)
                        .with_context(|| format!("{t} is not reachable from the client")),
                    ConnectJob::Time(t) => connect_once(t),
                };
                if tx.send(r).is_err() {
                    return;
                }
            }
        });
        let w = ConnectWorker {
            jobs: Some(jobs),
            results,
            thread: Some(thread),
        };
        w.results.recv().context("connect thread died")??;
        Ok(w)
    }

    fn run(&self, job: ConnectJob) -> anyhow::Result<f64> {
        self.jobs
            .as_ref()
            .context("stopped")?
            .send(job)
            .map_err(|_| anyhow::anyhow!("connect thread died"))?;
        self.results.recv().context("connect thread died")?
    }
}

impl Drop for ConnectWorker {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `connects` timed connects to each target, alternating, in microseconds.
/// One client thread per target (in the target's cgroup, if any), handed
/// each connect in turn: targets whose clients differ alternate too, every
/// target is measured the same way, and the hand-over is not timed.
fn connect_series(
    client_ns: &str,
    targets: &[LatTarget],
    connects: usize,
) -> anyhow::Result<Vec<Vec<f64>>> {
    let workers = targets
        .iter()
        .map(|t| ConnectWorker::start(client_ns, t.cgroup.clone()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let worker = |k: usize| &workers[k];
    for (k, t) in targets.iter().enumerate() {
        worker(k).run(ConnectJob::Check(t.connect))?;
    }
    for j in 0..100 {
        let k = j % targets.len();
        worker(k).run(ConnectJob::Time(targets[k].connect))?;
    }
    let mut out: Vec<Vec<f64>> = targets
        .iter()
        .map(|_| Vec::with_capacity(connects))
        .collect();
    for _ in 0..connects {
        for (k, t) in targets.iter().enumerate() {
            out[k].push(worker(k).run(ConnectJob::Time(t.connect))?);
        }
    }
    Ok(out)
}

/// Request/response round trips of one (target, protocol): summary and mean
/// (µs); the mean is the inverse of the transaction rate.
#[derive(Clone, Copy, Debug)]
struct Rr {
    s: Summary,
    mean: f64,
}

/// One row of the latency tables.
struct LatRow {
    /// "iptables (nft)", "eBPF".
    dataplane: String,
    phase: String,
    /// Services in the node's rules or maps (the probe included; 0: none).
    services: usize,
    target: &'static str,
    connect: Summary,
    rr: Vec<(RrMode, RrProto, Rr)>,
}

fn lat_rows(dataplane: &str, phase: &str, services: usize, r: PhaseResult) -> Vec<LatRow> {
    r.labels
        .into_iter()
        .zip(r.connect)
        .zip(r.rr)
        .map(|((label, c), rr)| LatRow {
            dataplane: dataplane.to_string(),
            phase: phase.to_string(),
            services,
            target: label,
            connect: summarize(&c),
            rr: rr
                .into_iter()
                .map(|(m, p, v)| {
                    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
                    (
                        m,
                        p,
                        Rr {
                            s: summarize(&v),
                            mean,
                        },
                    )
                })
                .collect(),
        })
        .collect()
}

struct LatencyRun {
    mode: Mode,
    services: usize,
    rows: Vec<LatRow>,
    /// Applying the probe Service alone (after emptying the tables).
    probe_apply_ms: f64,
}

/// client <-> node <-> server, with the connect server listening.
struct Topology {
    client: String,
    node: String,
    server_ns: String,
    server: Option<Server>,
}

impl Topology {
    fn new(ns: &mut Namespaces, tag: &str) -> anyhow::Result<Topology> {
        let client = ns.add(&format!("{tag}-lat-client"))?;
        let node = ns.add(&format!("{tag}-lat-node"))?;
        let server = ns.add(&format!("{tag}-lat-server"))?;
        for (other, node_if, own, gw) in [
            (&client, "vc", CLIENT_IP, "198.18.128.1"),
            (&server, "vs", SERVER_IP, "198.18.129.1"),
        ] {
            ip(&[
                "-n", &node, "link", "add", node_if, "type", "veth", "peer", "name", "eth0",
                "netns", other,
            ])?;
            ip(&[
                "-n",
                &node,
                "addr",
                "add",
                &format!("{gw}/24"),
                "dev",
                node_if,
            ])?;
            ip(&["-n", &node, "link", "set", node_if, "up"])?;
            ip(&[
                "-n",
                other,
                "addr",
                "add",
                &format!("{own}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", other, "link", "set", "eth0", "up"])?;
            ip(&["-n", other, "route", "add", "default", "via", gw])?;
        }
        benchnet::run(
            "ip",
            &[
                "netns",
                "exec",
                &node,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        )?;
        let srv = Server::start(&server, server_addr())?;
        Ok(Topology {
            client,
            node,
            server_ns: server,
            server: Some(srv),
        })
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Before the namespaces go: the server is woken from inside its own.
        self.server.take();
    }
}

fn server_addr() -> SocketAddr {
    SocketAddr::new(SERVER_IP.parse().expect("valid address"), TARGET_PORT)
}

fn probe_addr(n: usize) -> SocketAddr {
    SocketAddr::new(probe_ip(n), PORT)
}

// ---------------------------------------------------------------- main

/// The arguments the measuring threads need (plain data, `Send`).
#[derive(Clone, Debug)]
struct ArgsCopy {
    endpoints: usize,
    changes: usize,
    adds: usize,
    no_peer_partial: bool,
    peer_jumps_after: bool,
    peer_limit: u64,
}

struct SizeResult {
    mode: Mode,
    n: usize,
    weft: WeftRun,
    peer: PeerRun,
}

fn p50(v: &[f64]) -> f64 {
    summarize(v).p50
}

fn max(v: &[f64]) -> f64 {
    summarize(v).max
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    benchnet::require_root("weft-services-bench")?;
    // iptables-legacy serialises on a host-wide lock file (/run/xtables.lock,
    // shared by every namespace) and retries once a second when another
    // process holds it. Give this run's tools, weft's and the peer's alike,
    // their own lock, so unrelated iptables users on the machine do not add
    // waits. Set before any thread starts.
    let lock = std::env::temp_dir().join(format!("wsb{}-xtables.lock", std::process::id()));
    std::env::set_var("XTABLES_LOCKFILE", &lock);
    let _lock_file = RemoveOnDrop(lock);
    ensure!(args.endpoints > 0, "--endpoints must be at least 1");
    ensure!(args.changes > 0, "--changes must be at least 1");
    ensure!(
        args.sizes.iter().all(|n| *n > 1 && *n < 249 * 250),
        "--sizes must be between 2 and {}",
        249 * 250 - 1
    );
    ensure!(
        args.latency_services == 0 || args.latency_services > 1,
        "--latency-services must be 0 (skip) or at least 2"
    );
    ensure!(!args.dataplanes.is_empty(), "--dataplanes names none");
    ensure!(args.rr_secs > 0, "--rr-secs must be at least 1");
    let with_iptables = args.dataplanes.contains(&Dataplane::Iptables);
    let with_ebpf = args.dataplanes.contains(&Dataplane::Ebpf);
    let latency_mode = args.latency_mode.unwrap_or_else(Mode::detect);
    let mut modes = args.modes.clone();
    if args.latency_services > 0 && !modes.contains(&latency_mode) {
        modes.push(latency_mode);
    }
    if with_iptables {
        for mode in &modes {
            benchnet::run(&mode.tool("iptables"), &["--version"]).with_context(|| {
                format!(
                    "{} is needed (apt-get install iptables, or `cargo xtask setup`)",
                    mode.tool("iptables")
                )
            })?;
        }
    }
    // Request/response needs sockperf; without it that part is skipped and
    // the report says why.
    let sockperf = if args.latency_services == 0 {
        Err("no latency phase (--latency-services 0)".to_string())
    } else if args.rr_rounds == 0 {
        Err("not asked for (--rr-rounds 0)".to_string())
    } else {
        benchnet::sockperf_version()
    };
    if let Err(why) = &sockperf {
        eprintln!("request/response latency skipped: {why}");
    }
    let rr = sockperf.is_ok().then(|| RrConfig {
        modes: args.rr_modes.clone(),
        protocols: args.rr_protocols.clone(),
        rounds: args.rr_rounds,
        secs: args.rr_secs,
        msg_size: args.rr_msg_size,
    });
    let load_start = benchnet::loadavg();
    let revision = source_revision();
    let started = Instant::now();
    let host_mode = Mode::detect();
    let copy = ArgsCopy {
        endpoints: args.endpoints,
        changes: args.changes,
        adds: args.adds,
        no_peer_partial: args.no_peer_partial,
        peer_jumps_after: args.peer_jumps_after,
        peer_limit: args.peer_limit,
    };
    // (mode, N); the latency phase runs at its own (mode, N), added if missing.
    let mut runs: Vec<(Mode, usize)> = if with_iptables {
        args.modes
            .iter()
            .flat_map(|m| args.sizes.iter().map(move |n| (*m, *n)))
            .collect()
    } else {
        Vec::new()
    };
    let lat_key = (latency_mode, args.latency_services);
    if with_iptables && args.latency_services > 0 && !runs.contains(&lat_key) {
        runs.push(lat_key);
    }
    if let Some(dir) = &args.dump {
        std::fs::create_dir_all(dir)?;
        let mut sizes: Vec<usize> = runs.iter().map(|r| r.1).collect();
        sizes.sort();
        sizes.dedup();
        for n in sizes {
            let plan = build(&bench_view(n, args.endpoints), &plan_config());
            let dp = IptablesDataplane::new(Mode::Nft, CLUSTER_CIDR);
            let weft = restore_input(&Ruleset::default(), &dp.desired(&plan, BTreeMap::new()))
                .context("an empty plan")?;
            std::fs::write(dir.join(format!("weft-{n}.restore")), weft)?;
            std::fs::write(
                dir.join(format!("kube-proxy-{n}.restore")),
                kube_proxy_restore(&plan, None),
            )?;
        }
    }

    let mut results = Vec::new();
    let mut latency = None;
    for (mode, n) in runs {
        let tag = mode.as_str();
        let dp_label = format!("iptables ({tag})");
        let mut ns = Namespaces::new("wsb");
        // weft's first restore input alone, in its own fresh namespace.
        let alone_ns = ns.add(&format!("{tag}-alone-{n}"))?;
        let e = args.endpoints;
        settle();
        let alone = benchnet::run_in(&alone_ns, move || restore_alone(mode, n, e))
            .with_context(|| format!("weft's restore alone, {tag}, {n} Services"))?;
        ns.clear();
        let with_latency = args.latency_services > 0 && (mode, n) == lat_key;
        let topo = if with_latency {
            Some(Topology::new(&mut ns, tag)?)
        } else {
            None
        };
        let wns = match &topo {
            Some(t) => t.node.clone(),
            None => ns.add(&format!("{tag}-weft-{n}"))?,
        };
        let mut lat = LatencyRun {
            mode,
            services: n,
            rows: Vec::new(),
            probe_apply_ms: f64::NAN,
        };
        let probe = topo.as_ref().map(|t| Probe {
            rounds: args.rr_rounds.max(1),
            client: t.client.clone(),
            server: t.server_ns.clone(),
            connects: args.connects,
            rr: rr.clone(),
        });
        if let Some(p) = &probe {
            settle();
            let r = p.measure(&[LatTarget::pod_ip(None)])?;
            lat.rows.extend(lat_rows(&dp_label, "no rules", 0, r));
        }
        let c = copy.clone();
        settle();
        let t = Instant::now();
        let p = probe.clone();
        let (mut weft, series) =
            benchnet::run_in(&wns, move || weft_run(mode, n, &c, with_latency, p))
                .with_context(|| format!("weft, {tag}, {n} Services"))?;
        ensure!(
            alone.3 == weft.full_bytes,
            "the restore applied alone ({} bytes) is not the full sync's ({} bytes)",
            alone.3,
            weft.full_bytes
        );
        (weft.alone_ms, weft.alone_user_ms, weft.alone_sys_ms) = (alone.0, alone.1, alone.2);
        eprintln!(
            "{tag} {n:>6} weft: full sync {}, endpoint change p50 {} (build+apply), add p50 {}, remove p50 {} [{:.0} s]",
            fmt_ms(weft.full_ms),
            fmt_ms(p50(&weft.endpoint.iter().map(Step::total).collect::<Vec<_>>())),
            fmt_ms(p50(&weft.add.iter().map(Step::total).collect::<Vec<_>>())),
            fmt_ms(p50(&weft.remove.iter().map(Step::total).collect::<Vec<_>>())),
            secs(t.elapsed())
        );
        if let (Some(t), Some(p), Some(series)) = (&topo, &probe, series) {
            let label = format!("{n} Services (probe last)");
            lat.rows.extend(lat_rows(&dp_label, &label, n, series));
            // The probe alone: empty the tables, then a first apply of it.
            lat.probe_apply_ms = benchnet::run_in(&t.node, move || {
                flush_tables(&Iptables { mode })?;
                let mut dp = IptablesDataplane::new(mode, CLUSTER_CIDR);
                dp.conntrack = false;
                let plan = build(&view_of([probe_service(n)]), &plan_config());
                let t = Instant::now();
                dp.apply(&plan, BTreeMap::new())?;
                Ok(ms(t.elapsed()))
            })?;
            settle();
            let r = p.measure(&[LatTarget::cluster_ip(n, None), LatTarget::pod_ip(None)])?;
            lat.rows
                .extend(lat_rows(&dp_label, "probe Service only", 1, r));
            benchnet::run_in(&t.node, move || flush_tables(&Iptables { mode }))?;
            eprintln!("{tag} {n:>6} latency done");
            latency = Some(lat);
        }
        drop(topo);
        ns.clear();
        let pns = ns.add(&format!("{tag}-peer-{n}"))?;
        let c = copy.clone();
        settle();
        let t = Instant::now();
        let peer = benchnet::run_in(&pns, move || peer_run(mode, n, &c))
            .with_context(|| format!("peer, {tag}, {n} Services"))?;
        eprintln!(
            "{tag} {n:>6} peer: jumps {}, full restore {}, partial p50 {} [{:.0} s]",
            fmt_ms(peer.jumps_ms),
            peer.full_ms
                .map(fmt_ms)
                .unwrap_or_else(|| format!("stopped at {} s", args.peer_limit)),
            fmt_ms(p50(&peer.partial_ms)),
            secs(t.elapsed())
        );
        ns.clear();
        results.push(SizeResult {
            mode,
            n,
            weft,
            peer,
        });
    }

    let mut ebpf = EbpfResults::default();
    if with_ebpf {
        // Only the threads that join `cg.node` (and processes they start)
        // get the programs; dropped (and the process moved back) at the end.
        let cg = ThreadedCgroup::create("wsb")?;
        let mut sizes = args.sizes.clone();
        if args.latency_services > 0 && !sizes.contains(&args.latency_services) {
            sizes.push(args.latency_services);
        }
        for n in sizes {
            let mut ns = Namespaces::new("wsb");
            let with_latency = args.latency_services == n;
            let topo = if with_latency {
                Some(Topology::new(&mut ns, "ebpf")?)
            } else {
                None
            };
            let node_ns = match &topo {
                Some(t) => t.node.clone(),
                None => ns.add(&format!("ebpf-{n}"))?,
            };
            let probe = topo.as_ref().map(|t| Probe {
                rounds: args.rr_rounds.max(1),
                client: t.client.clone(),
                server: t.server_ns.clone(),
                connects: args.connects,
                rr: rr.clone(),
            });
            let bpffs = BpffsDir::new("wsb", &n.to_string());
            let (dir, node, c) = (bpffs.0.clone(), cg.node.clone(), copy.clone());
            settle();
            let t = Instant::now();
            let (run, phases) =
                benchnet::run_in(&node_ns, move || ebpf_run(n, &c, &dir, &node, probe))
                    .with_context(|| format!("eBPF, {n} Services"))?;
            eprintln!(
                "ebpf {n:>6}: endpoint change p50 {} ({} writes), add p50 {}, remove p50 {} [{:.0} s]",
                fmt_ms(p50(&run.endpoint.iter().map(EbpfStep::total).collect::<Vec<_>>())),
                run.endpoint.first().map_or(0, |s| s.writes),
                fmt_ms(p50(&run.add.iter().map(EbpfStep::total).collect::<Vec<_>>())),
                fmt_ms(p50(&run.remove.iter().map(EbpfStep::total).collect::<Vec<_>>())),
                secs(t.elapsed())
            );
            for (services, phase) in phases {
                let label = if services == 1 {
                    "probe Service only".to_string()
                } else {
                    format!("{services} Services (probe last)")
                };
                ebpf.rows.extend(lat_rows("eBPF", &label, services, phase));
            }
            if with_latency {
                ebpf.latency_services = n;
                ebpf.probe_only = run.probe_only;
            }
            ebpf.runs.push(run);
            drop(topo);
            ns.clear();
            drop(bpffs);
        }
        drop(cg);
    }

    let info = RunInfo {
        load_start,
        revision,
        host_mode,
        sockperf,
        started,
    };
    let report = report(&args, &info, &results, latency.as_ref(), &ebpf)?;
    print!("{report}");
    if let Some(out) = &args.out {
        std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

/// The eBPF side's results: per size, and the latency rows.
#[derive(Default)]
struct EbpfResults {
    runs: Vec<EbpfRun>,
    rows: Vec<LatRow>,
    latency_services: usize,
    probe_only: Option<(f64, usize)>,
}

/// About the run as a whole, for the report.
struct RunInfo {
    load_start: String,
    revision: String,
    host_mode: Mode,
    /// sockperf's version, or why request/response was skipped.
    sockperf: Result<String, String>,
    started: Instant,
}

fn report(
    args: &Args,
    info: &RunInfo,
    results: &[SizeResult],
    latency: Option<&LatencyRun>,
    ebpf: &EbpfResults,
) -> anyhow::Result<String> {
    let RunInfo {
        load_start,
        revision,
        host_mode,
        sockperf,
        started,
    } = info;
    let host_mode = *host_mode;
    let ver = |m: Mode| {
        benchnet::run(&m.tool("iptables"), &["--version"])
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let mut modes: Vec<Mode> = Vec::new();
    for s in results {
        if !modes.contains(&s.mode) {
            modes.push(s.mode);
        }
    }
    let mut r = benchnet::report_header("weft services benchmark (iptables and eBPF)", load_start);
    writeln!(
        r,
        "Scale: N Services x {} endpoints (ClusterIP, one TCP port; every backend address:port distinct: the target port goes up by one every 32,000 endpoints, the addresses of the /17 pod CIDR; N - 1 generated + the probe Service, which has 1 endpoint and three ports: 80/TCP for connects, 81/TCP and 81/UDP for sockperf); {} endpoint changes, {} additions and {} removals per size; iptables: {}  ",
        args.endpoints,
        args.changes,
        args.adds,
        args.adds,
        if modes.is_empty() {
            "not measured".to_string()
        } else {
            modes
                .iter()
                .map(|m| format!("`{}`", ver(*m)))
                .collect::<Vec<_>>()
                .join(", ")
        }
    )?;
    writeln!(r, "weft-agent: {revision} (at the start of the run)  ")?;
    writeln!(
        r,
        "Request/response: {}  ",
        match sockperf {
            Ok(v) => format!("`{v}`"),
            Err(why) => format!("**skipped**: {why}"),
        }
    )?;
    writeln!(
        r,
        "Host iptables mode (kube-proxy's rule: the implementation holding more rules, nft on a tie): {}; peer full restores stopped after {} s; whole run {:.0} s\n",
        host_mode.as_str(),
        args.peer_limit,
        secs(started.elapsed())
    )?;
    let cpu = |u: f64, s: f64| format!("{} / {}", fmt_ms(u), fmt_ms(s));
    let peer_full = |p: &PeerRun| match p.full_ms {
        Some(v) => format!("**{}**", fmt_ms(v)),
        None => format!("**> {} s** (stopped)", args.peer_limit),
    };
    // weft / peer full restore: a bound when the peer was stopped.
    let ratio_full = |weft_ms: f64, p: &PeerRun| match p.full_ms {
        Some(v) => format!("{:.3}x", weft_ms / v),
        None => format!("< {:.3}x", weft_ms / (args.peer_limit as f64 * 1e3)),
    };

    if !results.is_empty() {
        writeln!(
        r,
        "Full sync into an empty namespace (weft: its first `apply`; of which restore: the same input applied alone with a bare `iptables-restore --noflush` in another fresh namespace, the rest being the listing of the tables before and the 12 jumps after; CPU: of the iptables processes, user / system; after each full sync the chains and the services chain's rules were checked in the kernel):\n"
    )?;
        writeln!(
        r,
        "| mode | N | weft chains / rules | **weft full sync** | of which restore / the rest | weft restore CPU | weft full resync onto its rules (restart) | kube-proxy-shaped chains / rules | peer jumps, then full restore | peer restore CPU | weft restore / peer restore | weft full sync / peer jumps + restore |"
    )?;
        writeln!(r, "|---|---|---|---|---|---|---|---|---|---|---|---|")?;
        for s in results {
            let w = &s.weft;
            let resync: Vec<f64> = w.resync.iter().map(Step::total).collect();
            writeln!(
            r,
            "| {} | {} | {} / {} | **{}** | {} / {} | {} | {} | {} / {} | {} ({} calls), {} | {} | **{}** | {} |",
            s.mode.as_str(),
            s.n,
            w.chains,
            w.rules,
            fmt_ms(w.full_ms),
            fmt_ms(w.alone_ms),
            fmt_ms(w.full_ms - w.alone_ms),
            cpu(w.alone_user_ms, w.alone_sys_ms),
            fmt_ms(p50(&resync)),
            s.peer.chains,
            s.peer.rules,
            fmt_ms(s.peer.jumps_ms),
            s.peer.jump_calls,
            peer_full(&s.peer),
            cpu(s.peer.full_user_ms, s.peer.full_sys_ms),
            ratio_full(w.alone_ms, &s.peer),
            match s.peer.full_ms {
                Some(v) => format!("{:.3}x", w.full_ms / (v + s.peer.jumps_ms)),
                None => format!(
                    "< {:.3}x",
                    w.full_ms / (args.peer_limit as f64 * 1e3 + s.peer.jumps_ms)
                ),
            }
        )?;
        }
        writeln!(r)?;

        writeln!(
        r,
        "Single changes (weft: the plan rebuilt from the whole view, then `apply`, as the agent does per change; peer: kube-proxy's partial restore of the same endpoint change; p50 / max):\n"
    )?;
        writeln!(
        r,
        "| mode | N | **weft endpoint change** | of which apply | chains / bytes restored | weft add Service | weft remove Service | weft no-op | peer partial restore | weft / peer partial (p50) | weft change (p50) / peer full restore |"
    )?;
        writeln!(r, "|---|---|---|---|---|---|---|---|---|---|---|")?;
        let pm = |v: &[f64]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                format!("{} / {}", fmt_ms(p50(v)), fmt_ms(max(v)))
            }
        };
        let tot = |v: &[Step]| v.iter().map(Step::total).collect::<Vec<_>>();
        for s in results {
            let ep = tot(&s.weft.endpoint);
            let apply: Vec<f64> = s.weft.endpoint.iter().map(|x| x.apply_ms).collect();
            let last = s.weft.endpoint.last().cloned().unwrap_or_default();
            let ratio_partial = if s.peer.partial_ms.is_empty() {
                "-".to_string()
            } else {
                format!("{:.2}x", p50(&ep) / p50(&s.peer.partial_ms))
            };
            writeln!(
                r,
                "| {} | {} | **{}** | {} | {} / {} B | {} | {} | {} | {} | {} | {} |",
                s.mode.as_str(),
                s.n,
                pm(&ep),
                pm(&apply),
                last.chains,
                last.bytes,
                pm(&tot(&s.weft.add)),
                pm(&tot(&s.weft.remove)),
                pm(&tot(&s.weft.noop)),
                pm(&s.peer.partial_ms),
                ratio_partial,
                ratio_full(p50(&ep), &s.peer)
            )?;
        }
        writeln!(r)?;

        writeln!(
        r,
        "Where an endpoint change goes (p50 of each part; iptables-restore: the apply's input replayed on its own right after the apply; the rest of the apply: rendering and comparing the changed Service, the shared chains, spawning; CPU: of the iptables processes during the apply, user / system, mean per change, sampled at the scheduler tick):\n"
    )?;
        writeln!(
        r,
        "| mode | N | plan build | apply | of which iptables-restore | rest of apply | weft total | weft iptables CPU | peer partial iptables CPU |"
    )?;
        writeln!(r, "|---|---|---|---|---|---|---|---|---|")?;
        for s in results {
            let e = &s.weft.endpoint;
            let col = |f: &dyn Fn(&Step) -> f64| p50(&e.iter().map(f).collect::<Vec<_>>());
            // CPU times are sampled at the scheduler tick: a mean, not a median.
            let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len().max(1) as f64;
            let replay = |x: &Step| x.replay_ms.unwrap_or(f64::NAN);
            writeln!(
                r,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.mode.as_str(),
                s.n,
                fmt_ms(col(&|x| x.build_ms)),
                fmt_ms(col(&|x| x.apply_ms)),
                fmt_ms(col(&replay)),
                fmt_ms(col(&|x| x.apply_ms - replay(x))),
                fmt_ms(col(&Step::total)),
                cpu(
                    mean(e.iter().map(|x| x.tool_user_ms).collect()),
                    mean(e.iter().map(|x| x.tool_sys_ms).collect())
                ),
                if s.peer.partial_ms.is_empty() {
                    "-".to_string()
                } else {
                    cpu(
                        mean(s.peer.partial_user_ms.clone()),
                        mean(s.peer.partial_sys_ms.clone()),
                    )
                }
            )?;
        }
        writeln!(r)?;

        let biggest = results.iter().map(|s| s.n).max().unwrap_or(0);
        writeln!(r, "| target | mode | measured (p50 / max) | met? |")?;
        writeln!(r, "|---|---|---|---|")?;
        for s in results.iter().filter(|s| s.n == biggest) {
            let ep = tot(&s.weft.endpoint);
            let all: Vec<f64> = s
                .weft
                .endpoint
                .iter()
                .chain(&s.weft.add)
                .chain(&s.weft.remove)
                .map(Step::total)
                .collect();
            for (what, v) in [
                ("endpoint change", &ep),
                ("any of endpoint change, add, remove", &all),
            ] {
                writeln!(
                r,
                "| a single change at {} Services applied in <= 100 ms ({what}) | {} | **{} / {}** | {} |",
                s.n,
                s.mode.as_str(),
                fmt_ms(p50(v)),
                fmt_ms(max(v)),
                if max(v) <= 100.0 {
                    "yes"
                } else if p50(v) <= 100.0 {
                    "p50 yes, max **no**"
                } else {
                    "**no**"
                }
            )?;
            }
        }
        writeln!(r)?;

        let each = |f: &dyn Fn(&SizeResult) -> String| {
            results
                .iter()
                .map(|s| format!("{} {}: {}", s.mode.as_str(), s.n, f(s)))
                .collect::<Vec<_>>()
                .join("; ")
        };
        writeln!(
            r,
            "Plan build of the whole view before the full sync: {}.  ",
            each(&|s| fmt_ms(s.weft.build_ms))
        )?;
        writeln!(
            r,
            "Generating the peer's text: {}.  ",
            each(&|s| fmt_ms(s.peer.generate_ms))
        )?;
        writeln!(
            r,
            "Restore input, full: {}.  ",
            each(&|s| format!(
                "weft {:.1} MB, peer {:.1} MB, peer partial {:.2} MB",
                s.weft.full_bytes as f64 / 1e6,
                s.peer.bytes as f64 / 1e6,
                s.peer.partial_bytes as f64 / 1e6
            ))
        )?;
        let stopped: Vec<String> = results
            .iter()
            .filter_map(|s| {
                s.peer
                    .loaded_ms
                    .map(|v| format!("{} {}: {}", s.mode.as_str(), s.n, fmt_ms(v)))
            })
            .collect();
        if !stopped.is_empty() {
            writeln!(
            r,
            "Peer full restores stopped at the limit: the same rules were then loaded with a flushing restore (no `--noflush`) and the jumps, untimed for the tables, for the partial restores: {}.  ",
            stopped.join("; ")
        )?;
        }
        writeln!(
            r,
            "Emptying the tables afterwards (weft / peer): {}.\n",
            each(&|s| format!(
                "{} / {}",
                if s.weft.flush_ms > 0.0 {
                    fmt_ms(s.weft.flush_ms)
                } else {
                    "- (kept for the latency phase)".to_string()
                },
                fmt_ms(s.peer.flush_ms)
            ))
        )?;
    }

    if !ebpf.runs.is_empty() {
        report_ebpf(&mut r, args, host_mode, results, ebpf)?;
    }
    let mut rows: Vec<&LatRow> = Vec::new();
    if let Some(l) = latency {
        rows.extend(&l.rows);
    }
    rows.extend(&ebpf.rows);
    if !rows.is_empty() {
        report_latency(&mut r, args, &rows, latency, ebpf)?;
    }
    Ok(r)
}

/// "a" or "a–b" for a range of counts.
fn range(v: impl IntoIterator<Item = usize>) -> String {
    let v: Vec<usize> = v.into_iter().collect();
    match (v.iter().min(), v.iter().max()) {
        (Some(a), Some(b)) if a == b => a.to_string(),
        (Some(a), Some(b)) => format!("{a}–{b}"),
        _ => "-".into(),
    }
}

fn report_ebpf(
    r: &mut String,
    args: &Args,
    host_mode: Mode,
    results: &[SizeResult],
    e: &EbpfResults,
) -> anyhow::Result<()> {
    // weft's iptables run at the same size in this run (the host's mode first).
    let ipt = |n: usize| {
        results
            .iter()
            .find(|s| s.n == n && s.mode == host_mode)
            .or_else(|| results.iter().find(|s| s.n == n))
    };
    let pm = |v: &[f64]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            format!("{} / {}", fmt_fine(p50(v)), fmt_fine(max(v)))
        }
    };
    let tot = |v: &[EbpfStep]| v.iter().map(EbpfStep::total).collect::<Vec<_>>();
    writeln!(
        r,
        "eBPF dataplane, full sync onto empty maps (a fresh bpffs per size; load + attach: `Kernel::open`, which loads and verifies the programs and attaches them to the cgroup through pinned links; full sync: `Reconciler::apply` of `PlanBuilder::build`'s plan; every frontend and backend entry was then checked in the maps; one write: existing entries written again with their own value, mean of up to 2,000; floor: the full sync's writes x one backend write; iptables: weft's full sync (its first `apply`) at the same N in this run):\n"
    )?;
    writeln!(
        r,
        "| N | frontend / backend entries | load + attach | plan build | **full sync** | map writes | one write, backends / services map | floor: writes x one write | full sync / floor | reading the maps back | weft iptables full sync | eBPF / iptables | restart: total (load + replace links / read maps / adopt / build / apply), writes |"
    )?;
    writeln!(r, "|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
    for x in &e.runs {
        let floor = x.full_writes as f64 * x.write_backend_us / 1e3;
        let (ipt_full, ratio) = match ipt(x.n) {
            Some(s) => (
                format!("{} ({})", fmt_fine(s.weft.full_ms), s.mode.as_str()),
                format!("**{:.4}x**", x.full_ms / s.weft.full_ms),
            ),
            None => ("-".into(), "-".into()),
        };
        let rs = &x.restart;
        let restart = match &x.restart_error {
            Some(e) => format!("**failed**: {e}"),
            None => format!(
                "{} ({} / {} / {} / {} / {}), {} writes",
                fmt_fine(rs.total()),
                fmt_fine(rs.open_ms),
                fmt_fine(rs.image_ms),
                fmt_fine(rs.adopt_ms),
                fmt_fine(rs.build_ms),
                fmt_fine(rs.apply_ms),
                rs.writes
            ),
        };
        writeln!(
            r,
            "| {} | {} / {} | {} | {} | **{}** | {} | {:.2} µs / {:.2} µs | {} | {:.2}x | {} | {} | {} | {} |",
            x.n,
            x.frontends,
            x.backends,
            fmt_fine(x.open_ms),
            fmt_fine(x.build_ms),
            fmt_fine(x.full_ms),
            x.full_writes,
            x.write_backend_us,
            x.write_service_us,
            fmt_fine(floor),
            x.full_ms / floor,
            fmt_fine(x.image_ms),
            ipt_full,
            ratio,
            restart
        )?;
    }
    writeln!(r)?;
    writeln!(
        r,
        "eBPF single changes, each timed as the agent's driver pays a stream delta: `PlanBuilder::update` by the changed (namespace, name) key, `Reconciler::apply` (which then looks at that Service only), and the cleanup `EbpfDataplane::program` runs after it for backends no set holds any more (north-south connection map purged, connected UDP sockets to them destroyed in the node namespace). An endpoint change writes the Service's new backend set, switches its frontend entries to it and deletes the old set. iptables: weft's endpoint change at the same N in this run (plan rebuilt from the whole view, then `apply`). p50 / max:\n"
    )?;
    writeln!(
        r,
        "| N | **eBPF endpoint change** | of which plan update / apply / cleanup (p50) | map writes | floor: writes x one write | change / floor (p50) | add Service (writes) | remove Service (writes) | no-op | weft iptables endpoint change | eBPF / iptables (p50) |"
    )?;
    writeln!(r, "|---|---|---|---|---|---|---|---|---|---|---|")?;
    for x in &e.runs {
        let ep = tot(&x.endpoint);
        let col = |f: &dyn Fn(&EbpfStep) -> f64| p50(&x.endpoint.iter().map(f).collect::<Vec<_>>());
        let writes = p50(&x
            .endpoint
            .iter()
            .map(|s| s.writes as f64)
            .collect::<Vec<_>>());
        let floor = writes * x.write_backend_us / 1e3;
        let (ipt_ep, ratio) = match ipt(x.n) {
            Some(s) => {
                let v: Vec<f64> = s.weft.endpoint.iter().map(Step::total).collect();
                (
                    format!("{} ({})", pm(&v), s.mode.as_str()),
                    format!("**{:.4}x**", p50(&ep) / p50(&v)),
                )
            }
            None => ("-".into(), "-".into()),
        };
        writeln!(
            r,
            "| {} | **{}** | {} / {} / {} | {} | {} | {:.1}x | {} ({}) | {} ({}) | {} | {} | {} |",
            x.n,
            pm(&ep),
            fmt_fine(col(&|s| s.plan_ms)),
            fmt_fine(col(&|s| s.apply_ms)),
            fmt_fine(col(&|s| s.cleanup_ms)),
            range(x.endpoint.iter().map(|s| s.writes)),
            fmt_fine(floor),
            p50(&ep) / floor,
            pm(&tot(&x.add)),
            range(x.add.iter().map(|s| s.writes)),
            pm(&tot(&x.remove)),
            range(x.remove.iter().map(|s| s.writes)),
            pm(&tot(&x.noop)),
            ipt_ep,
            ratio
        )?;
    }
    writeln!(r)?;
    if let Some(big) = e.runs.iter().max_by_key(|x| x.n) {
        let ep = tot(&big.endpoint);
        let all: Vec<f64> = big
            .endpoint
            .iter()
            .chain(&big.add)
            .chain(&big.remove)
            .map(EbpfStep::total)
            .collect();
        writeln!(r, "| target | dataplane | measured (p50 / max) | met? |")?;
        writeln!(r, "|---|---|---|---|")?;
        for (what, v) in [
            ("endpoint change", &ep),
            ("any of endpoint change, add, remove", &all),
        ] {
            writeln!(
                r,
                "| one change at {} Services applied in <= 5 ms ({what}; plan update + apply + cleanup) | eBPF | **{} / {}** | {} |",
                big.n,
                fmt_fine(p50(v)),
                fmt_fine(max(v)),
                verdict_le(p50(v), max(v), 5.0)
            )?;
        }
        writeln!(r)?;
    }
    for x in &e.runs {
        let all = [
            ("no-op", &x.noop),
            ("endpoint change", &x.endpoint),
            ("add", &x.add),
            ("remove", &x.remove),
        ];
        let slowest = all
            .iter()
            .flat_map(|(kind, v)| v.iter().map(move |s| (*kind, s)))
            .max_by(|a, b| a.1.total().total_cmp(&b.1.total()));
        let faults: u64 = all
            .iter()
            .flat_map(|(_, v)| v.iter())
            .map(|s| s.majflt)
            .sum();
        if let Some((kind, s)) = slowest {
            writeln!(
                r,
                "N = {}: the slowest step was a {kind}, {} (plan update {} / apply {} / cleanup {}), with {} major page faults; {faults} in all the steps.  ",
                x.n,
                fmt_fine(s.total()),
                fmt_fine(s.plan_ms),
                fmt_fine(s.apply_ms),
                fmt_fine(s.cleanup_ms),
                s.majflt
            )?;
        }
    }
    writeln!(
        r,
        "{} endpoint changes, {} additions, {} removals and 3 no-ops per size; the restart opens the same bpffs again (the programs replaced in their pinned links), reads and adopts the maps and applies a full plan from a new `PlanBuilder`: a restart that finds the maps right writes nothing.\n",
        args.changes, args.adds, args.adds
    )?;
    Ok(())
}

/// "yes" when the max is within `limit`, "p50 yes, max no" when only the p50 is.
fn verdict_le(p50: f64, max: f64, limit: f64) -> &'static str {
    if max <= limit {
        "yes"
    } else if p50 <= limit {
        "p50 yes, max **no**"
    } else {
        "**no**"
    }
}

fn report_latency(
    r: &mut String,
    args: &Args,
    rows: &[&LatRow],
    latency: Option<&LatencyRun>,
    e: &EbpfResults,
) -> anyhow::Result<()> {
    let mut combos: Vec<(RrMode, RrProto)> = rows
        .iter()
        .flat_map(|x| x.rr.iter().map(|(m, p, _)| (*m, *p)))
        .collect();
    combos.sort();
    combos.dedup();
    let mut modes: Vec<RrMode> = combos.iter().map(|c| c.0).collect();
    modes.dedup();
    writeln!(
        r,
        "Latency through the node (namespaces client -> node -> server; iptables: weft's rules in the node; eBPF: its own topology, never any iptables rule in it, the client in the programs' cgroup unless the target says otherwise). New connections: {} timed blocking connect()s per row, the phase's targets alternating, each on its client's thread; microseconds:\n",
        args.connects
    )?;
    writeln!(
        r,
        "| dataplane | in the node | target | connect p50 | p90 | p99 | max |"
    )?;
    writeln!(r, "|---|---|---|---|---|---|---|")?;
    for x in rows {
        writeln!(
            r,
            "| {} | {} | {} | **{:.0}** | {:.0} | **{:.0}** | {:.0} |",
            x.dataplane,
            x.phase,
            x.target,
            x.connect.p50,
            x.connect.p90,
            x.connect.p99,
            x.connect.max
        )?;
    }
    writeln!(r)?;
    for mode in &modes {
        let protos: Vec<RrProto> = combos
            .iter()
            .filter(|c| c.0 == *mode)
            .map(|c| c.1)
            .collect();
        writeln!(
            r,
            "Request/response, {} (`sockperf ping-pong`{}, {} rounds x {} s per row and protocol, the phase's targets alternating in each round, {}-byte messages, one in flight; every round trip of the runs' valid periods, microseconds; the mean round trip is the inverse of the transaction rate; the ratios below compare rates at the median round trip):\n",
            mode.as_str(),
            if *mode == RrMode::BusyPoll {
                " and `sockperf server` with `--nonblocked`: both poll their socket in a loop"
            } else {
                ", blocking receives"
            },
            args.rr_rounds,
            args.rr_secs,
            args.rr_msg_size
        )?;
        let mut head = String::from("| dataplane | in the node | target |");
        let mut line = String::from("|---|---|---|");
        for p in &protos {
            let p = p.as_str();
            let _ = write!(head, " {p} p50 | {p} p99 | {p} mean |");
            line.push_str("---|---|---|");
        }
        writeln!(r, "{head}\n{line}")?;
        for x in rows {
            let mut l = format!("| {} | {} | {} |", x.dataplane, x.phase, x.target);
            for p in &protos {
                match x.rr.iter().find(|(m, q, _)| m == mode && q == p) {
                    Some((_, _, rr)) => {
                        let _ = write!(
                            l,
                            " **{:.2}** | {:.1} | {:.2} |",
                            rr.s.p50, rr.s.p99, rr.mean
                        );
                    }
                    None => l.push_str(" - | - | - |"),
                }
            }
            writeln!(r, "{l}")?;
        }
        writeln!(r)?;
    }

    let find = |ebpf: bool, services: usize, target: &str| {
        rows.iter()
            .find(|x| {
                (x.dataplane == "eBPF") == ebpf && x.services == services && x.target == target
            })
            .copied()
    };
    let rr_of = |x: &LatRow, m: RrMode, p: RrProto| {
        x.rr.iter()
            .find(|(n, q, _)| *n == m && *q == p)
            .map(|(_, _, rr)| *rr)
    };
    writeln!(r, "| ratio | measured | target | met? |")?;
    writeln!(r, "|---|---|---|---|")?;
    // Request/response: ratio of rates = direct round trip / cluster IP round
    // trip, at the median (the mean, shown beside it, is at the mercy of rare
    // preemptions of the polling processes on a small machine).
    let rate_row = |r: &mut String,
                    what: &str,
                    c: Option<&LatRow>,
                    d: Option<&LatRow>,
                    target: Option<f64>|
     -> anyhow::Result<()> {
        let (Some(c), Some(d)) = (c, d) else {
            return Ok(());
        };
        for (m, p) in &combos {
            let (Some(a), Some(b)) = (rr_of(c, *m, *p), rr_of(d, *m, *p)) else {
                continue;
            };
            let rate = b.s.p50 / a.s.p50;
            writeln!(
                r,
                "| {what}: {} {} request/response rate (by p50 round trip; by mean) | **{rate:.3}x** ({:.3}x) | {} | {} |",
                m.as_str(),
                p.as_str(),
                b.mean / a.mean,
                target.map_or("(reference)".into(), |t| format!(">= {t}x")),
                match target {
                    Some(t) if rate >= t => "yes",
                    Some(_) => "**no**",
                    None => "",
                }
            )?;
        }
        Ok(())
    };
    let n = e.latency_services;
    let outside = "pod IP, client outside the cgroup";
    let phases = |n: usize| {
        [
            (n, format!("{n} Services")),
            (1, "the probe alone".to_string()),
        ]
    };
    if n > 0 {
        for (services, phase) in phases(n) {
            rate_row(
                r,
                &format!("eBPF cluster IP / pod IP with no programs, {phase}"),
                find(true, services, "cluster IP"),
                find(true, services, outside),
                Some(0.95),
            )?;
        }
        for (services, phase) in phases(n) {
            rate_row(
                r,
                &format!("eBPF cluster IP / pod IP from the cgroup, {phase}"),
                find(true, services, "cluster IP"),
                find(true, services, "pod IP"),
                None,
            )?;
        }
    }
    if let Some(l) = latency {
        let m = l.services;
        for (services, phase) in phases(m) {
            rate_row(
                r,
                &format!("iptables cluster IP / pod IP, {phase} in the rules"),
                find(false, services, "cluster IP"),
                find(false, services, "pod IP"),
                None,
            )?;
        }
        rate_row(
            r,
            &format!("iptables cluster IP at {m} Services / pod IP with no rules"),
            find(false, m, "cluster IP"),
            find(false, 0, "pod IP"),
            None,
        )?;
    }
    let conn = |r: &mut String,
                what: String,
                a: Option<&LatRow>,
                b: Option<&LatRow>,
                target: Option<f64>|
     -> anyhow::Result<()> {
        let (Some(a), Some(b)) = (a, b) else {
            return Ok(());
        };
        let q = a.connect.p50 / b.connect.p50;
        writeln!(
            r,
            "| {what}: new connection p50 (p99) | {} ({:.2}x) | {} | {} |",
            if target.is_some() {
                format!("**{q:.2}x**")
            } else {
                format!("{q:.2}x")
            },
            a.connect.p99 / b.connect.p99,
            target.map_or("(reference)".into(), |t| format!("<= {t}x")),
            match target {
                Some(t) if q <= t => "yes",
                Some(_) => "**no**",
                None => "",
            }
        )?;
        Ok(())
    };
    if n > 0 {
        conn(
            r,
            format!("eBPF cluster IP, {n} Services / the probe alone"),
            find(true, n, "cluster IP"),
            find(true, 1, "cluster IP"),
            Some(1.1),
        )?;
        for (services, phase) in phases(n) {
            conn(
                r,
                format!("eBPF cluster IP / pod IP with no programs, {phase}"),
                find(true, services, "cluster IP"),
                find(true, services, outside),
                None,
            )?;
        }
    }
    if let Some(l) = latency {
        let m = l.services;
        conn(
            r,
            format!("iptables cluster IP, {m} Services / the probe alone"),
            find(false, m, "cluster IP"),
            find(false, 1, "cluster IP"),
            Some(1.1),
        )?;
        for (services, phase) in phases(m) {
            conn(
                r,
                format!("iptables cluster IP / pod IP, {phase} in the rules"),
                find(false, services, "cluster IP"),
                find(false, services, "pod IP"),
                None,
            )?;
        }
        conn(
            r,
            format!("iptables cluster IP at {m} Services / pod IP with no rules"),
            find(false, m, "cluster IP"),
            find(false, 0, "pod IP"),
            None,
        )?;
    }
    writeln!(r)?;
    if let Some(l) = latency {
        writeln!(
            r,
            "iptables ({} mode): the {} Services case is the weft run of the tables above (N = {}), measured right after its full sync (before its changes); the probe-only case is a first apply of the probe alone after that run, the tables emptied first ({}).  ",
            l.mode.as_str(),
            l.services,
            l.services,
            fmt_ms(l.probe_apply_ms)
        )?;
    }
    if n > 0 {
        writeln!(
            r,
            "eBPF: in the eBPF run above at N = {n}, right after its full sync, the maps alternated {} times between the {n} Services and the probe alone (reconciled down: {}; and back up), each state measured for its share of the connects and one sockperf round per turn, so both states met the same machine.",
            args.rr_rounds.max(1),
            e.probe_only
                .map(|(t, w)| format!("{}, {w} writes", fmt_ms(t)))
                .unwrap_or_else(|| "-".into())
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxy_shape() {
        let view = view_of((0..3).map(|i| bench_service(i, 2)));
        let plan = build(&view, &plan_config());
        let full = kube_proxy_restore(&plan, None);
        assert!(full.starts_with("*filter\n") && full.ends_with("COMMIT\n"));
        let services: Vec<&str> = full
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES -d"))
            .collect();
        assert_eq!(services.len(), 3);
        assert!(services[0].contains("\"bench/svc-00000:http cluster IP\""));
        assert_eq!(full.matches(":KUBE-SEP-").count(), 6);
        assert!(full.contains("--probability 0.5000000000 -j KUBE-SEP-"));
        let only = BTreeSet::from([(NAMESPACE.to_string(), "svc-00001".to_string())]);
        let partial = kube_proxy_restore(&plan, Some(&only));
        assert_eq!(partial.matches(":KUBE-SEP-").count(), 2);
        assert_eq!(partial.matches("-A KUBE-SERVICES -d").count(), 3);
        for l in full.lines().filter(|l| l.starts_with(':')) {
            assert!(l.len() - ":".len() - " - [0:0]".len() <= 28, "{l}");
        }
    }

    #[test]
    fn backends_are_distinct() {
        let mut seen = BTreeSet::new();
        for i in 0..10_000 {
            for b in bench_service(i, 10).backends {
                assert!(seen.insert((b.ip, b.ports[0].port)), "{i}: {}", b.ip);
            }
        }
        let plan = build(&bench_view(10_000, 10), &plan_config());
        // 9,999 Services of 10 endpoints and the probe's 2 sets of 1.
        assert_eq!(expected_entries(&plan).1, 99_992);
    }

    #[test]
    fn probe_serves_connects_and_sockperf() {
        let plan = build(&view_of([probe_service(1000)]), &plan_config());
        let probe = &plan.services[0];
        let ports: Vec<(Protocol, u16)> = probe
            .frontends
            .iter()
            .map(|f| (f.protocol, f.port))
            .collect();
        assert_eq!(
            ports,
            vec![
                (Protocol::TCP, PORT),
                (Protocol::TCP, RR_PORT),
                (Protocol::UDP, RR_PORT)
            ]
        );
        assert!(probe.backends.iter().all(|b| b.cluster.len() == 1));
        // A socket and an external entry per frontend; one backend set per
        // distinct content (8081 serves TCP and UDP from one set).
        assert_eq!(expected_entries(&plan), (6, 2));
    }

    #[test]
    fn addresses_fit_the_plan() {
        assert_eq!(cluster_ip(0).to_string(), "198.19.1.1");
        assert_eq!(cluster_ip(9999).to_string(), "198.19.40.250");
        assert_eq!(probe_ip(10000).to_string(), "198.19.40.251");
        assert_eq!(probe_ip(1000).to_string(), "198.19.4.251");
        assert_eq!(probe_ip(2).to_string(), "198.19.1.251");
        let cidr = plan_config().cluster_cidr;
        for c in 0..600 {
            assert!(cidr.contains(fresh_endpoint(c)));
        }
        for k in [0, 31_999, 99_999] {
            assert!(cidr.contains(endpoint_ip(k).parse().unwrap()));
        }
    }
}
