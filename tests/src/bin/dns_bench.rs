//! weft-dns-bench: weft's cluster DNS server next to NSD and Knot serving
//! the same records, in one run, on the same CPU budget.
//!
//! Records: N Services in a few namespaces of `cluster.local`, built as
//! `weft_model::view::ServiceEntry` values the way a cluster has them:
//! ClusterIP Services with 1-3 ports (a single port sometimes unnamed,
//! TCP and UDP), headless Services with 2-5 ready endpoints that have
//! hostnames (StatefulSet style; some with an extra not-ready endpoint, which
//! DNS leaves out), a few ExternalName Services. weft-dns reads them as a
//! view file (the stream Reset's data); NSD and Knot read the equivalent
//! static zones written from the same entries by the Kubernetes DNS
//! specification (schema 1.1.0): SOA, NS, `dns-version` TXT, A for cluster
//! IPs, A per ready headless endpoint and per endpoint hostname, SRV per
//! named port (headless: one per endpoint, equal weights), CNAME for
//! ExternalName, PTR for cluster IPs and headless endpoints in one reverse
//! zone per /16.
//!
//! Queries: one file for every server (deterministic seed), looped by
//! dnsperf: A for existing Services and endpoint hostnames, SRV for named
//! ports, PTR for cluster IPs and endpoints, and names inside the zone that
//! do not exist (missing Services, and what a pod's `ndots:5` search path
//! makes of external names: `api.github.com.<ns>.svc.cluster.local`, ...).
//!
//! Before any timing, every server answers a sample of the query file plus
//! the apex, `dns-version` and an ExternalName through `dig`; the rcode and
//! the answer set must equal what the records say, for each server.
//!
//! Each server runs on 127.0.0.1 on its own port, every process and thread
//! pinned to one CPU (`--server-cpu`; Knot pins a worker thread to CPU 0
//! itself, so threads are checked and re-pinned after start); dnsperf is
//! pinned to another (`--client-cpu`). NSD runs with `server-count: 1` and
//! response rate limiting off (its default of 200 qps per /24 would drop
//! the benchmark); Knot with one UDP, one TCP and one background worker;
//! weft-dns with `--no-forward` (its serving loop is one thread). Per
//! server: the outstanding-query limit that gives the most qps in short
//! calibration runs, then per round the peak (the most dnsperf completes),
//! dnsperf's per-query latencies (`-v`) at 50% of that round's peak, and at
//! one rate for all (50% of the lowest peak). Server CPU (the scheduler's
//! run time of its threads), dnsperf's CPU and per-CPU busy time are
//! sampled around each run, to tell which side was saturated.
//!
//! The machine is shared: other work runs on the same two CPUs. With
//! `--sched fifo` (the default, as root) the servers and dnsperf run at
//! real-time priority, so a wake-up preempts that work at once (measured
//! here: at the default priority, a loaded machine cut every server's peak
//! to about a fifth and put its p99 near 10 ms). The kernel holds real-time
//! tasks to 95% of each second, which caps every server alike at peak.
//!
//! Memory: weft-dns, NSD and Knot load a larger set (default 10,000
//! Services x 10 endpoints) and, when asked, 100,000 pods (weft with
//! `--pods verified`; NSD and Knot with one `a-b-c-d.<ns>.pod` A record per
//! pod, the static equivalent); VmRSS, VmHWM and Pss of the server's
//! processes once it answers.
//!
//! Every process started here is tracked by pid and stopped on exit, also
//! on failure; files live in a temp directory removed at the end. Network:
//! 127.0.0.1 only. Run by `cargo xtask bench dns`; needs dnsperf, nsd,
//! knotd and dig (`cargo xtask setup`); root only for `--sched`.

use anyhow::{bail, ensure, Context};
use clap::Parser;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, BufWriter, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use weft_e2e::bench::{
    mib, percentile, proc_cpu_secs, proc_kb_field, proc_status_bytes, sorted, source_revision, Rng,
};
use weft_e2e::{benchnet, TempDir};
use weft_model::view::{
    Backend, BackendPort, FrontendPort, PodEntry, Protocol, ServiceEntry, ServiceType,
};

/// A server under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
enum Kind {
    Weft,
    Nsd,
    Knot,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Weft => "weft",
            Kind::Nsd => "NSD",
            Kind::Knot => "Knot",
        }
    }

    /// Its part of the names of the files written for it.
    fn tag(self) -> &'static str {
        match self {
            Kind::Weft => "weft",
            Kind::Nsd => "nsd",
            Kind::Knot => "knot",
        }
    }
}

const NSD: &str = "/usr/sbin/nsd";
const KNOTD: &str = "/usr/sbin/knotd";

/// How the processes under test are scheduled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Sched {
    Fifo,
    Nice,
    Default,
}

/// SCHED_FIFO priority of `--sched fifo`: above every normal task, below the
/// kernel's own real-time threads (interrupt threads run at 50).
const FIFO_PRIORITY: i32 = 10;
/// Nice value of `--sched nice`.
const NICE: i32 = -19;

impl Sched {
    fn describe(self) -> String {
        match self {
            Sched::Fifo => format!("SCHED_FIFO priority {FIFO_PRIORITY} (real-time: a wake-up preempts other work on the CPU at once; the kernel still leaves other tasks 5% of each second)"),
            Sched::Nice => format!("nice {NICE} (a large share of the CPU, but a wake-up may wait for another task's time slice)"),
            Sched::Default => "the default priority (sharing their CPUs with whatever else runs)".to_string(),
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    about = "cluster DNS: weft-dns vs NSD and Knot serving the same records; dnsperf qps and latency on one pinned core; memory at 10k Services / 100k pods"
)]
struct Args {
    /// Services in the served zone.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Servers to measure (comma-separated: weft, nsd, knot).
    #[arg(long, value_delimiter = ',', default_value = "weft,nsd,knot")]
    servers: Vec<Kind>,
    /// Lines in the query file (dnsperf loops over it).
    #[arg(long, default_value_t = 100_000)]
    queries: usize,
    /// Query mix in percent: A, SRV, PTR, NXDOMAIN (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "50,20,15,15")]
    mix: Vec<usize>,
    /// Seed of the records and the query file.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Queries from the file checked through dig on every server before timing.
    #[arg(long, default_value_t = 300)]
    check: usize,
    /// CPU every server process and thread is pinned to.
    #[arg(long, default_value_t = 1)]
    server_cpu: usize,
    /// CPU dnsperf is pinned to.
    #[arg(long, default_value_t = 0)]
    client_cpu: usize,
    /// Scheduling of the servers and dnsperf on their CPUs. Other work on
    /// this machine runs on the same two CPUs; `fifo` (real-time priority
    /// 10: a wake-up preempts other work at once) gives each the whole of its
    /// CPU whenever it can run, `nice` (-19) a large share after a wake-up
    /// delay, `default` nothing. The same for every server; `fifo` and
    /// `nice` need root (without it: `default`).
    #[arg(long, value_enum, default_value_t = Sched::Fifo)]
    sched: Sched,
    /// dnsperf clients (-c: sockets, each its own source port).
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// dnsperf outstanding-query limits (-q) tried per server; the one with
    /// the most qps is used for that server's peak and latency runs.
    #[arg(long, value_delimiter = ',', default_value = "20,50,100,200")]
    outstanding: Vec<usize>,
    /// dnsperf outstanding-query limit (-q) of the latency runs, the same for
    /// every server: high, so that dnsperf sends on schedule (with a low
    /// limit, queries held back while answers are late wait unmeasured).
    #[arg(long, default_value_t = 200)]
    latency_outstanding: usize,
    /// Seconds of each calibration run.
    #[arg(long, default_value_t = 3)]
    calibrate_secs: u64,
    /// Seconds of each timed run (peak, latency).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Rounds of peak + latency runs, the servers' order rotating each round.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Offered load of the latency runs, as a fraction of the peak.
    #[arg(long, default_value_t = 0.5)]
    load: f64,
    /// Services of the memory measurement (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    memory_services: usize,
    /// Endpoints per Service in the memory measurement.
    #[arg(long, default_value_t = 10)]
    memory_endpoints: usize,
    /// Pods in the memory measurement's second step (0 skips the step).
    #[arg(long, default_value_t = 100_000)]
    memory_pods: usize,
    /// The weft-dns binary (default: next to this one).
    #[arg(long)]
    weft_dns: Option<PathBuf>,
    /// Keep the generated view, zones, configs and query file in this directory.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Also write the report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

const ZONE: &str = "cluster.local";
const TTL: u32 = 5;
const SCHEMA_VERSION: &str = "1.1.0";

const NAMESPACES: &[&str] = &[
    "default",
    "kube-system",
    "shop",
    "payments",
    "search",
    "identity",
    "data",
    "observability",
];

const WORDS: &[&str] = &[
    "api",
    "web",
    "cart",
    "checkout",
    "catalog",
    "auth",
    "users",
    "orders",
    "search",
    "cache",
    "db",
    "queue",
    "gateway",
    "billing",
    "inventory",
    "mail",
];

/// (name, protocol, port) a Service port is drawn from.
const PORTS: &[(&str, Protocol, u16)] = &[
    ("http", Protocol::TCP, 80),
    ("https", Protocol::TCP, 443),
    ("grpc", Protocol::TCP, 9090),
    ("metrics", Protocol::TCP, 9100),
    ("dns", Protocol::UDP, 53),
    ("syslog", Protocol::UDP, 514),
    ("admin", Protocol::TCP, 8081),
    ("redis", Protocol::TCP, 6379),
];

/// External names a pod's search path turns into names inside the zone.
const EXTERNAL: &[&str] = &[
    "api.github.com",
    "www.google.com",
    "s3.amazonaws.com",
    "registry-1.docker.io",
    "sts.amazonaws.com",
    "login.microsoftonline.com",
    "pypi.org",
    "repo.maven.apache.org",
];

// ---------------------------------------------------------------- records

/// Where endpoint (and pod) addresses come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AddrPlan {
    /// The test address plan's pod CIDR, 198.18.128.0/17 (32,000 addresses).
    Test,
    /// 10.244.0.0/14: a cluster of 100,000 pods needs more than a /17. Only
    /// ever data in a file the server reads; never on an interface, never
    /// routed.
    Wide,
}

impl AddrPlan {
    const TEST_ADDRESSES: usize = 128 * 250;

    fn for_count(n: usize) -> AddrPlan {
        if n <= Self::TEST_ADDRESSES {
            AddrPlan::Test
        } else {
            AddrPlan::Wide
        }
    }

    fn addr(self, k: usize) -> Ipv4Addr {
        match self {
            AddrPlan::Test => {
                let k = k % Self::TEST_ADDRESSES;
                Ipv4Addr::new(198, 18, (128 + k / 250) as u8, (k % 250 + 1) as u8)
            }
            AddrPlan::Wide => Ipv4Addr::new(
                10,
                (244 + k / 62_500) as u8,
                ((k / 250) % 250) as u8,
                (k % 250 + 1) as u8,
            ),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            AddrPlan::Test => "198.18.128.0/17 (the test plan's pod CIDR)",
            AddrPlan::Wide => "10.244.0.0/14 (more than the test plan's /17 holds; data only, never on an interface)",
        }
    }
}

/// Service `i`'s cluster IP in 198.19.0.0/16 (from 198.19.1.1; 198.19.0.10 is the DNS Service's).
fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, (1 + i / 250) as u8, (i % 250 + 1) as u8)
}

/// How a set of Services is generated.
#[derive(Clone, Copy, Debug)]
struct Shape {
    services: usize,
    /// Endpoints per Service; `None`: ClusterIP 1-3, headless 2-5 ready
    /// (a quarter of them with one more, not ready).
    endpoints: Option<usize>,
    /// Pods at least: one per endpoint, then pods behind no Service (jobs,
    /// agents) up to this many.
    pods: usize,
    seed: u64,
}

/// Generated Services and the pods behind their endpoints.
struct Cluster {
    services: Vec<ServiceEntry>,
    pods: Vec<PodEntry>,
    plan: AddrPlan,
}

fn generate(shape: Shape) -> Cluster {
    let mut rng = Rng::new(shape.seed);
    // Address plan by the most endpoints this shape can have.
    let most = (shape.services * shape.endpoints.unwrap_or(6)).max(shape.pods);
    let plan = AddrPlan::for_count(most);
    let mut next_addr = 0usize;
    let mut services = Vec::with_capacity(shape.services);
    let mut pods = Vec::new();
    for i in 0..shape.services {
        let namespace = NAMESPACES[rng.below(NAMESPACES.len())].to_string();
        let name = format!("{}-{i}", WORDS[rng.below(WORDS.len())]);
        let roll = rng.below(100);
        let mut s = ServiceEntry {
            namespace: namespace.clone(),
            name: name.clone(),
            ..Default::default()
        };
        if roll < 3 {
            s.service_type = ServiceType::ExternalName;
            s.external_name = Some(format!("{name}.example.net"));
            s.proxied = false;
            services.push(s);
            continue;
        }
        let headless = roll < 15;
        let nports = if headless {
            1 + rng.below(2)
        } else {
            1 + rng.below(3)
        };
        let mut picked: Vec<usize> = Vec::new();
        while picked.len() < nports {
            let p = rng.below(PORTS.len());
            if !picked.contains(&p) {
                picked.push(p);
            }
        }
        // A single port is often unnamed (no SRV record); several must be named.
        let unnamed = nports == 1 && !headless && rng.below(100) < 40;
        s.ports = picked
            .iter()
            .map(|&p| FrontendPort {
                name: if unnamed {
                    String::new()
                } else {
                    PORTS[p].0.to_string()
                },
                protocol: PORTS[p].1,
                port: PORTS[p].2,
                node_port: None,
            })
            .collect();
        let (ready, not_ready) = match (shape.endpoints, headless) {
            (Some(e), _) => (e, 0),
            (None, true) => (2 + rng.below(4), usize::from(rng.below(4) == 0)),
            (None, false) => (1 + rng.below(3), 0),
        };
        if headless {
            s.headless = true;
            s.proxied = false;
        } else {
            s.cluster_ips = vec![IpAddr::V4(cluster_ip(i))];
        }
        for j in 0..ready + not_ready {
            let ip = IpAddr::V4(plan.addr(next_addr));
            let pod = format!("{name}-{j}");
            let node = format!("node-{}", next_addr % 100);
            next_addr += 1;
            s.backends.push(Backend {
                ip,
                node: Some(node.clone()),
                hostname: headless.then(|| pod.clone()),
                target: Some(format!("{namespace}/{pod}")),
                zone: None,
                ports: s
                    .ports
                    .iter()
                    .map(|p| BackendPort {
                        name: p.name.clone(),
                        protocol: p.protocol,
                        // headless: targetPort = port, so SRV names the port the pod serves
                        port: if headless { p.port } else { p.port + 8000 },
                    })
                    .collect(),
                ready: j < ready,
                serving: j < ready,
                terminating: false,
            });
            pods.push(PodEntry {
                namespace: namespace.clone(),
                name: pod,
                ips: vec![ip],
                node: Some(node),
            });
        }
        services.push(s);
    }
    let mut k = 0;
    while pods.len() < shape.pods {
        let ip = IpAddr::V4(plan.addr(next_addr));
        pods.push(PodEntry {
            namespace: NAMESPACES[k % NAMESPACES.len()].to_string(),
            name: format!("job-{k}"),
            ips: vec![ip],
            node: Some(format!("node-{}", next_addr % 100)),
        });
        next_addr += 1;
        k += 1;
    }
    Cluster {
        services,
        pods,
        plan,
    }
}

/// One record of the static zones; names absolute, lower case.
#[derive(Clone, Debug)]
struct Rr {
    owner: String,
    rtype: &'static str,
    rdata: String,
}

/// The records the specification gives for a set of Services (and pods).
#[derive(Default)]
struct Records {
    /// cluster.local.
    zone: Vec<Rr>,
    /// Reverse zones by name (one per /16), with their PTR records.
    reverse: BTreeMap<String, Vec<Rr>>,
    /// (owner, type) -> normalized answers ("TYPE rdata").
    index: HashMap<(String, &'static str), BTreeSet<String>>,
    /// Every owner name, forward and reverse.
    owners: BTreeSet<String>,
}

impl Records {
    fn push(&mut self, rr: Rr) {
        self.index
            .entry((rr.owner.clone(), rr.rtype))
            .or_default()
            .insert(format!("{} {}", rr.rtype, rr.rdata));
        self.owners.insert(rr.owner.clone());
        if rr.owner.ends_with(".in-addr.arpa.") {
            let zone = reverse_zone(&rr.owner);
            self.reverse.entry(zone).or_default().push(rr);
        } else {
            self.zone.push(rr);
        }
    }

    fn count(&self) -> usize {
        self.zone.len() + self.reverse.values().map(Vec::len).sum::<usize>()
    }

    /// Whether `name` (absolute, lower case) has records or names below it:
    /// it exists (NODATA rather than NXDOMAIN when the type is missing).
    fn has_name(&self, name: &str) -> bool {
        let below = format!(".{name}");
        self.owners.iter().any(|o| o == name || o.ends_with(&below))
    }

    /// One `a-b-c-d.<ns>.pod` A record per pod address: the static zone's
    /// equivalent of weft's `--pods verified`.
    fn add_pods(&mut self, pods: &[PodEntry]) {
        for p in pods {
            for ip in &p.ips {
                let IpAddr::V4(v4) = ip else { continue };
                self.push(Rr {
                    owner: format!(
                        "{}.{}.pod.{ZONE}.",
                        v4.to_string().replace('.', "-"),
                        p.namespace.to_ascii_lowercase()
                    ),
                    rtype: "A",
                    rdata: v4.to_string(),
                });
            }
        }
    }
}

fn ptr_name(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
}

/// `d.c.b.a.in-addr.arpa.` -> `b.a.in-addr.arpa` (its /16 zone).
fn reverse_zone(ptr: &str) -> String {
    let labels: Vec<&str> = ptr.trim_end_matches('.').split('.').collect();
    labels[2..].join(".")
}

fn proto_label(p: Protocol) -> &'static str {
    match p {
        Protocol::TCP => "_tcp",
        Protocol::UDP => "_udp",
        Protocol::SCTP => "_sctp",
    }
}

fn soa_rdata() -> String {
    format!("ns.dns.{ZONE}. hostmaster.{ZONE}. 1 7200 1800 86400 {TTL}")
}

/// The records of a set of Services (pods: [`Records::add_pods`]).
fn records(services: &[ServiceEntry]) -> Records {
    let mut r = Records::default();
    let apex = format!("{ZONE}.");
    let ns_name = format!("ns.dns.{ZONE}.");
    r.push(Rr {
        owner: apex.clone(),
        rtype: "SOA",
        rdata: soa_rdata(),
    });
    r.push(Rr {
        owner: apex.clone(),
        rtype: "NS",
        rdata: ns_name.clone(),
    });
    r.push(Rr {
        owner: ns_name,
        rtype: "A",
        rdata: "127.0.0.1".into(),
    });
    r.push(Rr {
        owner: format!("dns-version.{ZONE}."),
        rtype: "TXT",
        rdata: format!("\"{SCHEMA_VERSION}\""),
    });
    for s in services {
        let svc = format!(
            "{}.{}.svc.{ZONE}.",
            s.name.to_ascii_lowercase(),
            s.namespace.to_ascii_lowercase()
        );
        let named: Vec<&FrontendPort> = s.ports.iter().filter(|p| !p.name.is_empty()).collect();
        if let Some(ext) = &s.external_name {
            r.push(Rr {
                owner: svc,
                rtype: "CNAME",
                rdata: format!("{}.", ext.trim_end_matches('.').to_ascii_lowercase()),
            });
            continue;
        }
        if s.headless || s.cluster_ips.is_empty() {
            let mut seen: BTreeSet<IpAddr> = BTreeSet::new();
            let eps: Vec<&Backend> = s
                .backends
                .iter()
                .filter(|b| (b.ready || s.publish_not_ready) && seen.insert(b.ip))
                .collect();
            let host = |b: &Backend| -> String {
                match &b.hostname {
                    Some(h) if !h.is_empty() => h.to_ascii_lowercase(),
                    _ => b.ip.to_string().replace('.', "-"),
                }
            };
            for b in &eps {
                let IpAddr::V4(ip) = b.ip else { continue };
                let fqdn = format!("{}.{svc}", host(b));
                r.push(Rr {
                    owner: svc.clone(),
                    rtype: "A",
                    rdata: ip.to_string(),
                });
                r.push(Rr {
                    owner: fqdn.clone(),
                    rtype: "A",
                    rdata: ip.to_string(),
                });
                r.push(Rr {
                    owner: ptr_name(ip),
                    rtype: "PTR",
                    rdata: fqdn,
                });
            }
            for p in &named {
                let with: Vec<(&Backend, u16)> = eps
                    .iter()
                    .filter_map(|b| {
                        let port = b
                            .ports
                            .iter()
                            .find(|bp| {
                                bp.name.eq_ignore_ascii_case(&p.name) && bp.protocol == p.protocol
                            })?
                            .port;
                        Some((*b, port))
                    })
                    .collect();
                // Equal weights summing to about 100, as CoreDNS gives them.
                let weight = (100 / with.len().max(1)).max(1);
                for (b, port) in with {
                    r.push(Rr {
                        owner: format!(
                            "_{}.{}.{svc}",
                            p.name.to_ascii_lowercase(),
                            proto_label(p.protocol)
                        ),
                        rtype: "SRV",
                        rdata: format!("0 {weight} {port} {}.{svc}", host(b)),
                    });
                }
            }
        } else {
            for ip in &s.cluster_ips {
                let IpAddr::V4(ip) = ip else { continue };
                r.push(Rr {
                    owner: svc.clone(),
                    rtype: "A",
                    rdata: ip.to_string(),
                });
                r.push(Rr {
                    owner: ptr_name(*ip),
                    rtype: "PTR",
                    rdata: svc.clone(),
                });
            }
            for p in &named {
                r.push(Rr {
                    owner: format!(
                        "_{}.{}.{svc}",
                        p.name.to_ascii_lowercase(),
                        proto_label(p.protocol)
                    ),
                    rtype: "SRV",
                    rdata: format!("0 100 {} {svc}", p.port),
                });
            }
        }
    }
    r
}

/// The zone files: (zone name, file name) written into `dir`.
fn write_zones(dir: &Path, r: &Records, tag: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut zones = Vec::new();
    let mut write = |zone: &str, body: &[Rr], with_apex: bool| -> anyhow::Result<()> {
        let file = format!("{tag}-{zone}.zone");
        let mut w = BufWriter::new(
            std::fs::File::create(dir.join(&file)).with_context(|| format!("creating {file}"))?,
        );
        writeln!(w, "$TTL {TTL}")?;
        if !with_apex {
            writeln!(w, "{zone}. IN SOA {}", soa_rdata())?;
            writeln!(w, "{zone}. IN NS ns.dns.{ZONE}.")?;
        }
        for rr in body {
            writeln!(w, "{} IN {} {}", rr.owner, rr.rtype, rr.rdata)?;
        }
        w.flush()?;
        zones.push((zone.to_string(), file));
        Ok(())
    };
    write(ZONE, &r.zone, true)?;
    for (zone, body) in &r.reverse {
        write(zone, body, false)?;
    }
    Ok(zones)
}

/// weft's view file: the Reset data of the push stream.
fn write_view(path: &Path, services: &[ServiceEntry], pods: &[PodEntry]) -> anyhow::Result<()> {
    let mut w = BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    serde_json::to_writer(
        &mut w,
        &serde_json::json!({"rev": 1, "services": services, "nodes": [], "pods": pods}),
    )?;
    w.flush()?;
    Ok(())
}

// ---------------------------------------------------------------- queries

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum QKind {
    A,
    Srv,
    Ptr,
    NxDomain,
}

impl QKind {
    fn label(self) -> &'static str {
        match self {
            QKind::A => "A",
            QKind::Srv => "SRV",
            QKind::Ptr => "PTR",
            QKind::NxDomain => "NXDOMAIN",
        }
    }
}

#[derive(Clone, Debug)]
struct Query {
    name: String,
    rtype: &'static str,
    kind: QKind,
}

/// What a query must get.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Expected {
    rcode: &'static str,
    answers: BTreeSet<String>,
}

struct QueryMix {
    queries: Vec<Query>,
    /// Distinct names per kind available to draw from.
    pool: BTreeMap<QKind, usize>,
}

fn query_mix(r: &Records, services: &[ServiceEntry], args: &Args) -> anyhow::Result<QueryMix> {
    let mut a_names: Vec<String> = Vec::new();
    let mut srv_names: Vec<String> = Vec::new();
    let mut ptr_names: Vec<String> = Vec::new();
    for s in services {
        if s.external_name.is_some() {
            continue;
        }
        let svc = format!("{}.{}.svc.{ZONE}.", s.name, s.namespace);
        a_names.push(svc.clone());
        if s.headless {
            for b in s.backends.iter().filter(|b| b.ready) {
                if let Some(h) = &b.hostname {
                    a_names.push(format!("{h}.{svc}"));
                }
            }
        }
    }
    for (owner, rtype) in r.index.keys() {
        match *rtype {
            "SRV" => srv_names.push(owner.clone()),
            "PTR" => ptr_names.push(owner.clone()),
            _ => {}
        }
    }
    srv_names.sort();
    ptr_names.sort();
    // A names: Service names weigh as much as all hostnames of a headless one.
    let mut nx_names: Vec<String> = Vec::new();
    for (k, ns) in NAMESPACES.iter().enumerate() {
        for j in 0..50 {
            nx_names.push(format!("missing-{k}-{j}.{ns}.svc.{ZONE}."));
        }
        for ext in EXTERNAL {
            nx_names.push(format!("{ext}.{ns}.svc.{ZONE}."));
        }
    }
    for ext in EXTERNAL {
        nx_names.push(format!("{ext}.svc.{ZONE}."));
        nx_names.push(format!("{ext}.{ZONE}."));
    }
    for n in &nx_names {
        ensure!(!r.has_name(n), "the made-up name {n} exists in the zone");
    }
    ensure!(
        !a_names.is_empty() && !srv_names.is_empty() && !ptr_names.is_empty(),
        "--services {} gives no A, SRV or PTR names to query",
        args.services
    );
    ensure!(
        args.mix.len() == 4 && args.mix.iter().sum::<usize>() == 100,
        "--mix takes four percentages (A, SRV, PTR, NXDOMAIN) that sum to 100"
    );
    let mut rng = Rng::new(args.seed.wrapping_mul(7919).wrapping_add(17));
    let mut queries = Vec::with_capacity(args.queries);
    for _ in 0..args.queries {
        let roll = rng.below(100);
        let (kind, list, rtype) = if roll < args.mix[0] {
            (QKind::A, &a_names, "A")
        } else if roll < args.mix[0] + args.mix[1] {
            (QKind::Srv, &srv_names, "SRV")
        } else if roll < args.mix[0] + args.mix[1] + args.mix[2] {
            (QKind::Ptr, &ptr_names, "PTR")
        } else {
            (QKind::NxDomain, &nx_names, "A")
        };
        queries.push(Query {
            name: list[rng.below(list.len())].clone(),
            rtype,
            kind,
        });
    }
    let pool = BTreeMap::from([
        (QKind::A, a_names.len()),
        (QKind::Srv, srv_names.len()),
        (QKind::Ptr, ptr_names.len()),
        (QKind::NxDomain, nx_names.len()),
    ]);
    Ok(QueryMix { queries, pool })
}

fn expected(r: &Records, name: &str, rtype: &'static str) -> Expected {
    let name = name.to_ascii_lowercase();
    if let Some(set) = r.index.get(&(name.clone(), rtype)) {
        return Expected {
            rcode: "NOERROR",
            answers: set.clone(),
        };
    }
    if let Some(set) = r.index.get(&(name.clone(), "CNAME")) {
        return Expected {
            rcode: "NOERROR",
            answers: set.clone(),
        };
    }
    Expected {
        rcode: if r.has_name(&name) {
            "NOERROR"
        } else {
            "NXDOMAIN"
        },
        answers: BTreeSet::new(),
    }
}

// ---------------------------------------------------------------- processes

/// A CPU set with one CPU.
fn one_cpu(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit inside the set (cpu < CPU_SETSIZE, checked by the caller).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set
}

/// Make the command's process start on `cpu` only, scheduled as `sched`
/// (threads and children inherit both).
fn pin_command(cmd: &mut Command, cpu: usize, sched: Sched) {
    let set = one_cpu(cpu);
    // SAFETY: the closure only makes plain syscalls (sched_setaffinity,
    // sched_setscheduler, setpriority; async-signal-safe) in the child
    // between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            match sched {
                Sched::Fifo => {
                    let param = libc::sched_param {
                        sched_priority: FIFO_PRIORITY,
                    };
                    if libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Sched::Nice => {
                    if libc::setpriority(libc::PRIO_PROCESS, 0, NICE) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Sched::Default => {}
            }
            Ok(())
        });
    }
}

fn pin_task(tid: i32, cpu: usize) -> std::io::Result<()> {
    let set = one_cpu(cpu);
    // SAFETY: sched_setaffinity with a valid set of the size passed.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Fields after the command name of /proc/<pid>/stat (field 3 is index 0).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// (parent pid, start time) of a process.
fn ppid_start(pid: i32) -> Option<(i32, u64)> {
    let f = stat_fields(pid)?;
    Some((f.get(1)?.parse().ok()?, f.get(19)?.parse().ok()?))
}

/// `pid` and every process below it, each with its start time.
fn process_tree(pid: i32) -> Vec<(i32, u64)> {
    let mut all: Vec<(i32, i32, u64)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Some((pp, start)) = ppid_start(p) {
                all.push((p, pp, start));
            }
        }
    }
    let mut tree: Vec<(i32, u64)> = all
        .iter()
        .filter(|(p, _, _)| *p == pid)
        .map(|(p, _, s)| (*p, *s))
        .collect();
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i].0;
        for (p, pp, s) in &all {
            if *pp == parent && !tree.iter().any(|(t, _)| t == p) {
                tree.push((*p, *s));
            }
        }
        i += 1;
    }
    tree
}

/// User + system CPU seconds of one process (all its threads).
fn cpu_secs(pid: i32) -> f64 {
    // The scheduler's own run time of every thread (ns, exact), else the
    // tick-sampled user + system time.
    let mut ns = 0u64;
    let mut any = false;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let path = t.path().join("schedstat");
            if let Some(v) = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            {
                ns += v;
                any = true;
            }
        }
    }
    if any {
        return ns as f64 / 1e9;
    }
    proc_cpu_secs(&pid.to_string()).unwrap_or(0.0)
}

/// CPU seconds of the children waited for so far (user + system).
fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_CHILDREN is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// The real-time limit: (runtime, period) in µs, from /proc/sys/kernel.
fn rt_limit() -> Option<(i64, i64)> {
    let read = |f: &str| -> Option<i64> {
        std::fs::read_to_string(format!("/proc/sys/kernel/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some((read("sched_rt_runtime_us")?, read("sched_rt_period_us")?))
}

/// Jiffies of one CPU from /proc/stat.
#[derive(Clone, Copy, Debug, Default)]
struct CpuTimes {
    total: u64,
    busy: u64,
    /// irq + softirq.
    irq: u64,
    steal: u64,
}

/// Per CPU, in CPU order.
fn cpu_times() -> Vec<CpuTimes> {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else {
        return Vec::new();
    };
    s.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let f = |i: usize| v.get(i).copied().unwrap_or(0);
            // user nice system idle iowait irq softirq steal
            let total: u64 = (0..8).map(f).sum();
            CpuTimes {
                total,
                busy: total - f(3) - f(4),
                irq: f(5) + f(6),
                steal: f(7),
            }
        })
        .collect()
}

/// What one CPU did between two samples, as fractions of the interval.
#[derive(Clone, Copy, Debug)]
struct CpuUse {
    busy: f64,
    irq: f64,
    steal: f64,
}

impl Default for CpuUse {
    fn default() -> Self {
        CpuUse {
            busy: f64::NAN,
            irq: f64::NAN,
            steal: f64::NAN,
        }
    }
}

fn cpu_use(a: &[CpuTimes], b: &[CpuTimes], cpu: usize) -> CpuUse {
    match (a.get(cpu), b.get(cpu)) {
        (Some(a), Some(b)) if b.total > a.total => {
            let d = (b.total - a.total) as f64;
            CpuUse {
                busy: (b.busy - a.busy) as f64 / d,
                irq: (b.irq - a.irq) as f64 / d,
                steal: (b.steal - a.steal) as f64 / d,
            }
        }
        _ => CpuUse::default(),
    }
}

/// A server process this bench started: stopped (SIGTERM, then SIGKILL,
/// then any process of its tree still there) when dropped.
struct Server {
    kind: Kind,
    child: Child,
    port: u16,
    log: PathBuf,
    /// The processes of its tree seen so far, with their start times (so a
    /// recycled pid is never signalled).
    tree: Vec<(i32, u64)>,
    /// Threads found on another CPU and moved to the server CPU.
    repinned: Vec<String>,
    stopped: bool,
}

impl Server {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn refresh(&mut self) {
        for (p, s) in process_tree(self.pid()) {
            if !self.tree.iter().any(|(t, _)| *t == p) {
                self.tree.push((p, s));
            }
        }
    }

    /// Processes of the tree that are still the ones seen.
    fn live(&self) -> Vec<i32> {
        self.tree
            .iter()
            .filter(|(p, s)| ppid_start(*p).is_some_and(|(_, st)| st == *s))
            .map(|(p, _)| *p)
            .collect()
    }

    /// Move every thread of the tree that may run elsewhere to `cpu`.
    fn pin_all(&mut self, cpu: usize) -> anyhow::Result<()> {
        self.refresh();
        let want = cpu.to_string();
        for pid in self.live() {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for t in tasks.flatten() {
                let Ok(tid) = t.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
                    .unwrap_or_default();
                let allowed = status
                    .lines()
                    .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default();
                if allowed != want {
                    pin_task(tid, cpu).with_context(|| {
                        format!("pinning thread {tid} of {} to CPU {cpu}", self.kind.label())
                    })?;
                    let note = format!("thread {tid} (allowed: {allowed})");
                    if !self.repinned.contains(&note) {
                        self.repinned.push(note);
                    }
                }
            }
        }
        Ok(())
    }

    /// CPU seconds used by the whole tree so far.
    fn cpu(&self) -> f64 {
        self.live().into_iter().map(cpu_secs).sum()
    }

    fn memory(&self) -> Memory {
        let live = self.live();
        let mut m = Memory {
            processes: live.len(),
            ..Memory::default()
        };
        for p in &live {
            let p = p.to_string();
            m.rss += proc_status_bytes(&p, "VmRSS").unwrap_or(0);
            m.hwm = m.hwm.max(proc_status_bytes(&p, "VmHWM").unwrap_or(0));
            m.pss += proc_kb_field(&p, "smaps_rollup", "Pss").unwrap_or(0);
        }
        m
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Stop it: SIGTERM to the process started, up to 5 s, then SIGKILL; then
    /// SIGKILL to any process of its tree still alive.
    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        self.refresh();
        let pid = self.pid();
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill on the pid of a child we have not reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(self.child.try_wait(), Ok(None)) {
                eprintln!(
                    "{} did not stop on SIGTERM in 5 s: SIGKILL",
                    self.kind.label()
                );
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        // Children that outlived it (NSD's server and xfrd processes) —
        // only those of its tree, by pid and start time.
        let t = Instant::now();
        loop {
            let left: Vec<i32> = self.live().into_iter().filter(|p| *p != pid).collect();
            if left.is_empty() {
                break;
            }
            if t.elapsed() > Duration::from_secs(2) {
                for p in left {
                    // SAFETY: kill on a pid whose start time matches the process we saw.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Memory of a server's processes.
#[derive(Clone, Copy, Debug, Default)]
struct Memory {
    /// VmRSS, summed over the processes; bytes.
    rss: u64,
    /// The largest process's VmHWM; bytes.
    hwm: u64,
    /// Pss, summed (pages shared between the processes counted once); bytes.
    pss: u64,
    processes: usize,
}

/// A port free for both UDP and TCP on 127.0.0.1.
fn free_port() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free for both UDP and TCP on 127.0.0.1")
}

/// What a server is started with.
struct Files<'a> {
    dir: &'a Path,
    tag: &'a str,
    view: &'a Path,
    zones: &'a [(String, String)],
    weft_pods: &'a str,
}

fn start(
    kind: Kind,
    f: &Files,
    weft_bin: &Path,
    cpu: usize,
    sched: Sched,
) -> anyhow::Result<Server> {
    let port = free_port()?;
    let dir = f.dir.display();
    let log = f.dir.join(format!("{}-{}.log", f.tag, kind.tag()));
    let mut cmd = match kind {
        Kind::Weft => {
            let mut c = Command::new(weft_bin);
            c.arg("--view")
                .arg(f.view)
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--zone", ZONE, "--ttl", &TTL.to_string(), "--no-forward"])
                .args(["--pods", f.weft_pods])
                .env("RUST_LOG", "warn");
            c
        }
        Kind::Nsd => {
            let conf = peer_conf(
                f,
                kind,
                |r| {
                    format!("server:\n  ip-address: 127.0.0.1@{port}\n  server-count: 1\n  username: \"\"\n  chroot: \"\"\n  zonesdir: \"{dir}\"\n  pidfile: \"{r}/nsd.pid\"\n  database: \"\"\n  xfrdfile: \"{r}/xfrd.state\"\n  zonelistfile: \"{r}/zone.list\"\n  xfrdir: \"{r}\"\n  verbosity: 0\n  do-ip6: no\n  rrl-ratelimit: 0\n  rrl-whitelist-ratelimit: 0\nremote-control:\n  control-enable: no\n")
                },
                |zone, file| format!("zone:\n  name: \"{zone}\"\n  zonefile: \"{file}\"\n"),
            )?;
            let mut c = Command::new(NSD);
            c.arg("-d").arg("-c").arg(conf);
            c
        }
        Kind::Knot => {
            let conf = peer_conf(
                f,
                kind,
                |r| {
                    format!("server:\n    rundir: \"{r}\"\n    pidfile: \"{r}/knot.pid\"\n    listen: 127.0.0.1@{port}\n    udp-workers: 1\n    tcp-workers: 1\n    background-workers: 1\nlog:\n  - target: stderr\n    any: warning\ndatabase:\n    storage: \"{r}/db\"\ncontrol:\n    listen: \"{r}/knot.sock\"\ntemplate:\n  - id: default\n    storage: \"{dir}\"\n    zonefile-sync: -1\n    zonefile-load: whole\n    journal-content: none\n    semantic-checks: off\nzone:\n")
                },
                |zone, file| format!("  - domain: {zone}\n    file: \"{file}\"\n"),
            )?;
            let mut c = Command::new(KNOTD);
            c.arg("-c").arg(conf);
            c
        }
    };
    let out = std::fs::File::create(&log)?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    pin_command(&mut cmd, cpu, sched);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", kind.label()))?;
    Ok(Server {
        kind,
        child,
        port,
        log,
        tree: Vec::new(),
        repinned: Vec::new(),
        stopped: false,
    })
}

/// Write NSD's or Knot's configuration to `<tag>-<server>.conf` in the
/// files' directory: `head` (given the server's state directory,
/// `<tag>-<server>/`) and `entry(zone, file)` per zone. Returns its path.
fn peer_conf(
    f: &Files,
    kind: Kind,
    head: impl FnOnce(std::path::Display) -> String,
    entry: impl Fn(&str, &str) -> String,
) -> anyhow::Result<PathBuf> {
    let run = f.dir.join(format!("{}-{}", f.tag, kind.tag()));
    std::fs::create_dir_all(&run).with_context(|| format!("creating {}", run.display()))?;
    let mut conf = head(run.display());
    for (zone, file) in f.zones {
        conf.push_str(&entry(zone, file));
    }
    let path = f.dir.join(format!("{}-{}.conf", f.tag, kind.tag()));
    std::fs::write(&path, conf).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

// ---------------------------------------------------------------- a tiny DNS client

/// One UDP question; (rcode, answer count) of the response.
fn ask(port: u16, name: &str, qtype: u16, timeout: Duration) -> Option<(u8, u16)> {
    let sock = UdpSocket::bind("127.0.0.1:0").ok()?;
    sock.set_read_timeout(Some(timeout)).ok()?;
    let id: u16 = (std::process::id() as u16) ^ 0x5a5a;
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    sock.send_to(&q, SocketAddr::from(([127, 0, 0, 1], port)))
        .ok()?;
    let mut buf = [0u8; 4096];
    let (n, _) = sock.recv_from(&mut buf).ok()?;
    if n < 12 || buf[0..2] != id.to_be_bytes() || buf[2] & 0x80 == 0 {
        return None;
    }
    Some((buf[3] & 0x0f, u16::from_be_bytes([buf[6], buf[7]])))
}

/// Wait until the server answers `name` (type `qtype`) with at least one
/// record; the time from its start.
fn wait_ready(
    s: &mut Server,
    started: Instant,
    name: &str,
    qtype: u16,
) -> anyhow::Result<Duration> {
    let deadline = Duration::from_secs(120);
    loop {
        if let Ok(Some(status)) = s.child.try_wait() {
            bail!(
                "{} exited ({status}) before answering; its log:\n{}",
                s.kind.label(),
                s.log_tail()
            );
        }
        if let Some((0, n)) = ask(s.port, name, qtype, Duration::from_millis(100)) {
            if n > 0 {
                return Ok(started.elapsed());
            }
        }
        if started.elapsed() > deadline {
            bail!(
                "{} did not answer {name} within {} s; its log:\n{}",
                s.kind.label(),
                deadline.as_secs(),
                s.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- dig checks

/// A query every server answers through dig before timing.
struct CheckQuery {
    name: String,
    rtype: &'static str,
    /// The query kind's label, or "other".
    kind: &'static str,
    want: Expected,
}

/// Answers of one server to the check queries, compared with the records.
#[derive(Default)]
struct Check {
    asked: usize,
    right: usize,
    /// First mismatches, described.
    wrong: Vec<String>,
    /// Per query kind: (asked, right).
    by_kind: BTreeMap<&'static str, (usize, usize)>,
}

/// Ask every check query through one `dig -f` batch; compare.
fn dig_check(s: &Server, dir: &Path, checks: &[CheckQuery]) -> anyhow::Result<Check> {
    let batch = dir.join(format!("check-{}.txt", s.kind.tag()));
    let mut text = String::new();
    for q in checks {
        writeln!(text, "{} {}", q.name, q.rtype)?;
    }
    std::fs::write(&batch, text)?;
    let out = Command::new("dig")
        .arg("@127.0.0.1")
        .args(["-p", &s.port.to_string()])
        .args([
            "+noedns",
            "+nottlid",
            "+noall",
            "+comments",
            "+question",
            "+answer",
            "+tries=2",
            "+time=2",
        ])
        .arg("-f")
        .arg(&batch)
        .stdin(Stdio::null())
        .output()
        .context("running dig (bind9-dnsutils; `cargo xtask setup`)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    // (qname, type) -> (status, answers)
    let mut got: HashMap<(String, String), (String, BTreeSet<String>)> = HashMap::new();
    let mut status = String::new();
    let mut key: Option<(String, String)> = None;
    let mut in_question = false;
    for line in stdout.lines() {
        if let Some(rest) = line.strip_prefix(";; ->>HEADER<<-") {
            status = rest
                .split("status: ")
                .nth(1)
                .and_then(|r| r.split(',').next())
                .unwrap_or("")
                .trim()
                .to_string();
            key = None;
            continue;
        }
        if line.starts_with(";; QUESTION SECTION:") {
            in_question = true;
            continue;
        }
        if in_question {
            in_question = false;
            let t: Vec<&str> = line.trim_start_matches(';').split_whitespace().collect();
            if t.len() >= 3 {
                let k = (t[0].to_ascii_lowercase(), t[2].to_string());
                got.insert(k.clone(), (status.clone(), BTreeSet::new()));
                key = Some(k);
            }
            continue;
        }
        if line.is_empty() || line.starts_with(';') {
            continue;
        }
        let t: Vec<&str> = line.split_whitespace().collect();
        if let (Some(k), true) = (&key, t.len() >= 4) {
            if let Some(e) = got.get_mut(k) {
                e.1.insert(format!("{} {}", t[2], t[3..].join(" ")).to_ascii_lowercase());
            }
        }
    }
    let mut c = Check::default();
    for CheckQuery {
        name,
        rtype,
        kind,
        want,
    } in checks
    {
        c.asked += 1;
        let k = (name.to_ascii_lowercase(), rtype.to_string());
        let entry = c.by_kind.entry(kind).or_default();
        entry.0 += 1;
        let want_answers: BTreeSet<String> = want
            .answers
            .iter()
            .map(|a| a.to_ascii_lowercase())
            .collect();
        match got.get(&k) {
            Some((st, answers)) if st == want.rcode && *answers == want_answers => {
                c.right += 1;
                entry.1 += 1;
            }
            other => {
                if c.wrong.len() < 8 {
                    let seen = match other {
                        Some((st, a)) => format!("{st} {a:?}"),
                        None => "no answer".to_string(),
                    };
                    c.wrong.push(format!(
                        "`{name} {rtype}`: expected {} {:?}, got {seen}",
                        want.rcode, want_answers
                    ));
                }
            }
        }
    }
    Ok(c)
}

// ---------------------------------------------------------------- dnsperf

/// One dnsperf run and what the machine did meanwhile.
#[derive(Clone, Debug, Default)]
struct Perf {
    outstanding: usize,
    /// -Q, if the rate was limited.
    rate: Option<u64>,
    qps: f64,
    completed: u64,
    lost: u64,
    rcodes: Vec<(String, u64)>,
    avg_ms: f64,
    /// Per-query latencies (ms), with `-v`; sorted.
    latencies: Vec<f64>,
    /// Server tree CPU, in cores (1.0 = one CPU all the time).
    server_cores: f64,
    /// dnsperf's own CPU, in cores.
    client_cores: f64,
    /// The server CPU and the client CPU (all work on them, softirq included).
    server_cpu: CpuUse,
    client_cpu: CpuUse,
}

struct PerfSetup<'a> {
    qfile: &'a Path,
    dir: &'a Path,
    clients: usize,
    client_cpu: usize,
    server_cpu: usize,
    sched: Sched,
}

impl PerfSetup<'_> {
    /// A run of [`dnsperf`] after moving back any thread of the server
    /// found on another CPU (Knot pins a worker to CPU 0 itself) and a
    /// second's pause.
    fn run(
        &self,
        s: &mut Server,
        secs: u64,
        outstanding: usize,
        rate: Option<u64>,
    ) -> anyhow::Result<Perf> {
        s.pin_all(self.server_cpu)?;
        std::thread::sleep(Duration::from_secs(1));
        dnsperf(self, s, secs, outstanding, rate)
    }
}

fn dnsperf(
    p: &PerfSetup,
    s: &Server,
    secs: u64,
    outstanding: usize,
    rate: Option<u64>,
) -> anyhow::Result<Perf> {
    let verbose = rate.is_some();
    let out_path = p.dir.join("dnsperf.out");
    let mut cmd = Command::new("dnsperf");
    cmd.args(["-s", "127.0.0.1", "-p", &s.port.to_string()])
        .arg("-d")
        .arg(p.qfile)
        .args(["-l", &secs.to_string()])
        .args(["-c", &p.clients.to_string()])
        .args(["-q", &outstanding.to_string()])
        .args(["-t", "2"]);
    if let Some(r) = rate {
        cmd.args(["-Q", &r.to_string(), "-v"]);
    }
    let out = std::fs::File::create(&out_path)?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(Stdio::null());
    pin_command(&mut cmd, p.client_cpu, p.sched);
    let cpu0 = s.cpu();
    let kids0 = children_cpu();
    let t0 = cpu_times();
    let w0 = Instant::now();
    let status = cmd
        .status()
        .context("running dnsperf (`cargo xtask setup`)")?;
    let wall = w0.elapsed().as_secs_f64();
    let cpu1 = s.cpu();
    let t1 = cpu_times();
    let kids1 = children_cpu();
    if !status.success() {
        bail!(
            "dnsperf against {} failed ({status}): {}",
            s.kind.label(),
            std::fs::read_to_string(&out_path).unwrap_or_default()
        );
    }
    let mut perf = Perf {
        outstanding,
        rate,
        server_cores: (cpu1 - cpu0) / wall,
        client_cores: (kids1 - kids0) / wall,
        server_cpu: cpu_use(&t0, &t1, p.server_cpu),
        client_cpu: cpu_use(&t0, &t1, p.client_cpu),
        ..Default::default()
    };
    let file = std::fs::File::open(&out_path)?;
    let num = |v: &str| -> u64 {
        v.split_whitespace()
            .next()
            .and_then(|x| x.parse().ok())
            .unwrap_or(0)
    };
    for line in BufReader::new(file).lines() {
        let line = line?;
        if let Some(rest) = line.strip_prefix("> ") {
            if verbose {
                let t: Vec<&str> = rest.split_whitespace().collect();
                if t.len() == 4 {
                    if let Ok(secs) = t[3].parse::<f64>() {
                        perf.latencies.push(secs * 1e3);
                    }
                }
            }
            continue;
        }
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Queries completed:") {
            perf.completed = num(v);
        } else if let Some(v) = l.strip_prefix("Queries lost:") {
            perf.lost = num(v);
        } else if let Some(v) = l.strip_prefix("Queries per second:") {
            perf.qps = v.trim().parse().unwrap_or(f64::NAN);
        } else if let Some(v) = l.strip_prefix("Average Latency (s):") {
            perf.avg_ms = v
                .split_whitespace()
                .next()
                .and_then(|x| x.parse::<f64>().ok())
                .map_or(f64::NAN, |x| x * 1e3);
        } else if let Some(v) = l.strip_prefix("Response codes:") {
            for part in v.split(',') {
                let t: Vec<&str> = part.split_whitespace().collect();
                if t.len() >= 2 {
                    perf.rcodes
                        .push((t[0].to_string(), t[1].parse().unwrap_or(0)));
                }
            }
        }
    }
    let _ = std::fs::remove_file(&out_path);
    perf.latencies.sort_by(f64::total_cmp);
    ensure!(
        perf.completed > 0,
        "dnsperf against {} completed no query",
        s.kind.label()
    );
    Ok(perf)
}

// ---------------------------------------------------------------- main

fn tool_version(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines()
                .find(|l| l.to_ascii_lowercase().contains("version"))
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// Results for one server.
#[derive(Default)]
struct Result1 {
    check: Check,
    calibration: Vec<Perf>,
    /// The outstanding limit of its peak runs, from the calibration.
    outstanding: usize,
    peaks: Vec<Perf>,
    own: Vec<Perf>,
    common: Vec<Perf>,
    ready: Duration,
    memory: Memory,
    repinned: Vec<String>,
}

impl Result1 {
    fn peak(&self) -> f64 {
        median(&self.peaks.iter().map(|p| p.qps).collect::<Vec<_>>())
    }
    /// Median of the peak runs' qps per CPU-second of the server.
    fn per_cpu(&self) -> f64 {
        median(
            &self
                .peaks
                .iter()
                .map(|p| p.qps / p.server_cores)
                .collect::<Vec<_>>(),
        )
    }
    fn valid(&self) -> bool {
        self.check.asked > 0 && self.check.right == self.check.asked
    }
}

/// A memory row.
struct MemRow {
    kind: Kind,
    step: String,
    ready: Duration,
    memory: Memory,
    repinned: usize,
}

/// The outstanding limit for a server's timed runs: among the calibration
/// runs that lost no query (all, if every one lost some), the smallest limit
/// within 2% of the most qps; more in flight than that only adds queueing
/// (and, past the server's socket buffer, lost queries).
fn choose_outstanding(cal: &[Perf]) -> Option<usize> {
    let clean: Vec<&Perf> = cal.iter().filter(|p| p.lost == 0).collect();
    let pool: Vec<&Perf> = if clean.is_empty() {
        cal.iter().collect()
    } else {
        clean
    };
    let best = pool.iter().map(|p| p.qps).fold(0.0, f64::max);
    pool.iter()
        .filter(|p| p.qps >= 0.98 * best)
        .map(|p| p.outstanding)
        .min()
}

fn median(v: &[f64]) -> f64 {
    percentile(&sorted(v.to_vec()), 0.5)
}

/// The servers' indices in round `round`'s order: rotated by one each round.
fn rotation(n: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |j| (j + round) % n)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let load_start = benchnet::loadavg();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    ensure!(
        args.server_cpu != args.client_cpu && args.server_cpu < cpus && args.client_cpu < cpus,
        "--server-cpu {} and --client-cpu {} must be two different CPUs of the {cpus} here",
        args.server_cpu,
        args.client_cpu
    );
    ensure!(args.services >= 10, "--services must be at least 10");
    ensure!(
        args.services <= 60_000,
        "--services must be at most 60,000 (cluster IPs)"
    );
    ensure!(
        args.memory_services <= 60_000,
        "--memory-services must be at most 60,000 (cluster IPs)"
    );
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    ensure!(
        args.latency_outstanding > 0 && args.outstanding.iter().all(|q| *q > 0),
        "--outstanding and --latency-outstanding must be at least 1"
    );
    ensure!(!args.outstanding.is_empty(), "--outstanding names none");
    ensure!(
        args.load > 0.0 && args.load <= 1.0,
        "--load must be in (0, 1]"
    );
    ensure!(!args.servers.is_empty(), "--servers names none");
    let mut tools = vec![("dnsperf", "dnsperf"), ("dig", "bind9-dnsutils")];
    if args.servers.contains(&Kind::Nsd) {
        tools.push((NSD, "nsd"));
    }
    if args.servers.contains(&Kind::Knot) {
        tools.push((KNOTD, "knot"));
    }
    for (tool, package) in tools {
        let runs = Command::new(tool)
            .arg("-h")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        ensure!(
            runs,
            "{tool} is needed (Debian package {package}): run `cargo xtask setup`"
        );
    }
    let weft_bin = match &args.weft_dns {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory of this binary")?
            .join("weft-dns"),
    };
    let mut servers = args.servers.clone();
    servers.sort();
    servers.dedup();
    let mut weft_skipped = None;
    if servers.contains(&Kind::Weft) && !weft_bin.exists() {
        let why = format!(
            "{} is not built (`cargo build --release -p weft-dns`)",
            weft_bin.display()
        );
        eprintln!("weft skipped: {why}");
        servers.retain(|k| *k != Kind::Weft);
        weft_skipped = Some(why);
    }
    ensure!(!servers.is_empty(), "no server to measure");

    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let sched = if args.sched != Sched::Default && !root {
        eprintln!(
            "--sched {:?} needs root; running at the default priority",
            args.sched
        );
        Sched::Default
    } else {
        args.sched
    };

    let tmp = TempDir::new("dns-bench");
    let dir = tmp.0.clone();

    // The served records, the view, the zones, the queries.
    let cluster = generate(Shape {
        services: args.services,
        endpoints: None,
        pods: 0,
        seed: args.seed,
    });
    let recs = records(&cluster.services);
    let view = dir.join("perf-view.json");
    write_view(&view, &cluster.services, &[])?;
    let zones = write_zones(&dir, &recs, "perf")?;
    let mix = query_mix(&recs, &cluster.services, &args)?;
    let qfile = dir.join("queries.txt");
    {
        let mut w = BufWriter::new(std::fs::File::create(&qfile)?);
        for q in &mix.queries {
            writeln!(w, "{} {}", q.name, q.rtype)?;
        }
        w.flush()?;
    }
    // Check queries: the first distinct ones of the file, and the specials.
    let mut checks: Vec<CheckQuery> = Vec::new();
    let mut seen = BTreeSet::new();
    for q in &mix.queries {
        if checks.len() >= args.check {
            break;
        }
        if seen.insert((q.name.clone(), q.rtype)) {
            checks.push(CheckQuery {
                name: q.name.clone(),
                rtype: q.rtype,
                kind: q.kind.label(),
                want: expected(&recs, &q.name, q.rtype),
            });
        }
    }
    let ext = cluster
        .services
        .iter()
        .find(|s| s.external_name.is_some())
        .map(|s| format!("{}.{}.svc.{ZONE}.", s.name, s.namespace));
    let mut specials: Vec<(String, &'static str)> = vec![
        (format!("{ZONE}."), "SOA"),
        (format!("{ZONE}."), "NS"),
        (format!("dns-version.{ZONE}."), "TXT"),
        (format!("shop.svc.{ZONE}."), "A"),
        (format!("nosuch-namespace.svc.{ZONE}."), "A"),
    ];
    if let Some(e) = ext {
        specials.push((e, "A"));
    }
    for (name, rtype) in specials {
        let want = expected(&recs, &name, rtype);
        checks.push(CheckQuery {
            name,
            rtype,
            kind: "other",
            want,
        });
    }
    let expect_nx = checks.iter().filter(|c| c.want.rcode == "NXDOMAIN").count();
    eprintln!(
        "records: {} Services, {} records ({} in cluster.local, {} reverse zones); {} queries; {} checks ({} NXDOMAIN)",
        cluster.services.len(),
        recs.count(),
        recs.zone.len(),
        recs.reverse.len(),
        mix.queries.len(),
        checks.len(),
        expect_nx
    );

    let perf_setup = PerfSetup {
        qfile: &qfile,
        dir: &dir,
        clients: args.clients,
        client_cpu: args.client_cpu,
        server_cpu: args.server_cpu,
        sched,
    };
    let files = Files {
        dir: &dir,
        tag: "perf",
        view: &view,
        zones: &zones,
        weft_pods: "disabled",
    };
    // Start every server (idle ones use no CPU), check their answers.
    // `running` is in the order of `servers`.
    let mut running: Vec<Server> = Vec::new();
    let mut results: BTreeMap<Kind, Result1> = BTreeMap::new();
    for &k in &servers {
        let t = Instant::now();
        let mut s = start(k, &files, &weft_bin, args.server_cpu, sched)?;
        let ready = wait_ready(&mut s, t, &format!("dns-version.{ZONE}"), 16)?;
        s.pin_all(args.server_cpu)?;
        let check = dig_check(&s, &dir, &checks)?;
        eprintln!(
            "{:<5} ready in {:.0} ms on port {}; answers checked: {} of {} right{}",
            k.label(),
            ready.as_secs_f64() * 1e3,
            s.port,
            check.right,
            check.asked,
            if s.repinned.is_empty() {
                String::new()
            } else {
                format!("; re-pinned {}", s.repinned.join(", "))
            }
        );
        for w in &check.wrong {
            eprintln!("  {w}");
        }
        results.insert(
            k,
            Result1 {
                check,
                ready,
                ..Default::default()
            },
        );
        running.push(s);
    }

    // Calibration: the outstanding limit giving the most qps, per server.
    for s in &mut running {
        let res = results.entry(s.kind).or_default();
        for &q in &args.outstanding {
            let p = perf_setup.run(s, args.calibrate_secs, q, None)?;
            eprintln!(
                "{:<5} calibrate -q {q:>4}: {:>9.0} qps, lost {}, server {:.0}% of a core",
                s.kind.label(),
                p.qps,
                p.lost,
                p.server_cores * 100.0
            );
            res.calibration.push(p);
        }
        res.outstanding = choose_outstanding(&res.calibration).unwrap_or(args.outstanding[0]);
    }

    // Rounds: peaks, then latency at `load` of each server's own peak.
    for round in 0..args.rounds {
        for i in rotation(running.len(), round) {
            let s = &mut running[i];
            let res = results.entry(s.kind).or_default();
            let p = perf_setup.run(s, args.duration, res.outstanding, None)?;
            eprintln!(
                "round {} {:<5} peak: {:>9.0} qps (-q {}), lost {}, server {:.0}% of a core, dnsperf {:.0}%, CPU{} {:.0}% busy ({:.0}% irq), CPU{} {:.0}% busy ({:.0}% irq)",
                round + 1,
                s.kind.label(),
                p.qps,
                p.outstanding,
                p.lost,
                p.server_cores * 100.0,
                p.client_cores * 100.0,
                args.server_cpu,
                p.server_cpu.busy * 100.0,
                p.server_cpu.irq * 100.0,
                args.client_cpu,
                p.client_cpu.busy * 100.0,
                p.client_cpu.irq * 100.0
            );
            res.peaks.push(p);
        }
        for i in rotation(running.len(), round) {
            let s = &mut running[i];
            let res = results.entry(s.kind).or_default();
            let peak = res.peaks.last().map_or(0.0, |p| p.qps);
            let rate = ((peak * args.load).round() as u64).max(1);
            let p = perf_setup.run(s, args.duration, args.latency_outstanding, Some(rate))?;
            eprintln!(
                "round {} {:<5} at {rate} qps: {:.0} qps done, p50 {:.3} ms, p99 {:.3} ms, lost {}, server {:.0}% of a core, dnsperf {:.0}%",
                round + 1,
                s.kind.label(),
                p.qps,
                percentile(&p.latencies, 0.5),
                percentile(&p.latencies, 0.99),
                p.lost,
                p.server_cores * 100.0,
                p.client_cores * 100.0
            );
            res.own.push(p);
        }
    }
    // One rate for all: `load` x the lowest median peak.
    let lowest = servers
        .iter()
        .map(|k| results[k].peak())
        .fold(f64::INFINITY, f64::min);
    let common_rate = ((lowest * args.load).round() as u64).max(1);
    if servers.len() > 1 {
        for round in 0..args.rounds {
            for i in rotation(running.len(), round) {
                let s = &mut running[i];
                let p = perf_setup.run(
                    s,
                    args.duration,
                    args.latency_outstanding,
                    Some(common_rate),
                )?;
                eprintln!(
                    "round {} {:<5} at the common {common_rate} qps: p50 {:.3} ms, p99 {:.3} ms, lost {}",
                    round + 1,
                    s.kind.label(),
                    percentile(&p.latencies, 0.5),
                    percentile(&p.latencies, 0.99),
                    p.lost
                );
                results.entry(s.kind).or_default().common.push(p);
            }
        }
    }
    // Every server's memory before any stops: Pss splits the pages shared
    // between processes, so stopping one changes the others'.
    for s in &mut running {
        let res = results.entry(s.kind).or_default();
        res.memory = s.memory();
        res.repinned = std::mem::take(&mut s.repinned);
    }
    for mut s in running {
        s.stop();
    }

    // Memory at a larger scale.
    let mut mem_rows: Vec<MemRow> = Vec::new();
    let mut mem_info = String::new();
    if args.memory_services > 0 {
        let big = generate(Shape {
            services: args.memory_services,
            endpoints: Some(args.memory_endpoints),
            pods: args.memory_pods,
            seed: args.seed,
        });
        let behind: usize = big.services.iter().map(|s| s.backends.len()).sum();
        let pods = &big.pods[..big.pods.len().min(args.memory_pods)];
        let mut steps: Vec<(String, bool)> = vec![(
            format!(
                "{} Services x {} endpoints",
                args.memory_services, args.memory_endpoints
            ),
            false,
        )];
        if args.memory_pods > 0 {
            writeln!(
                mem_info,
                "- pods: {} ({} of them the endpoints of the Services, {} behind no Service)",
                pods.len(),
                behind.min(pods.len()),
                pods.len().saturating_sub(behind)
            )?;
            steps.push((
                format!(
                    "{} Services x {} endpoints + {} pods",
                    args.memory_services, args.memory_endpoints, args.memory_pods
                ),
                true,
            ));
        }
        let probe = big
            .services
            .iter()
            .rev()
            .find(|s| !s.cluster_ips.is_empty())
            .map(|s| format!("{}.{}.svc.{ZONE}", s.name, s.namespace))
            .context("no ClusterIP Service in the memory set")?;
        // The steps add to the records: first the Services', then the pods'.
        let mut r = records(&big.services);
        for (si, (step, with_pods)) in steps.iter().enumerate() {
            let tag = format!("mem{si}");
            if *with_pods {
                r.add_pods(pods);
            }
            let view = dir.join(format!("{tag}-view.json"));
            write_view(&view, &big.services, if *with_pods { pods } else { &[] })?;
            let zones = write_zones(&dir, &r, &tag)?;
            let view_bytes = std::fs::metadata(&view).map(|m| m.len()).unwrap_or(0);
            let zone_bytes: u64 = zones
                .iter()
                .map(|(_, f)| std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0))
                .sum();
            writeln!(
                mem_info,
                "- {step}: weft view {:.1} MiB of JSON; static zones {} records in {} zones, {:.1} MiB of zone files{}",
                mib(view_bytes as f64),
                r.count(),
                zones.len(),
                mib(zone_bytes as f64),
                if *with_pods {
                    format!(" ({} of them pod A records)", pods.len())
                } else {
                    String::new()
                }
            )?;
            let files = Files {
                dir: &dir,
                tag: &tag,
                view: &view,
                zones: &zones,
                weft_pods: if *with_pods { "verified" } else { "disabled" },
            };
            for &k in &servers {
                let t = Instant::now();
                let mut s = start(k, &files, &weft_bin, args.server_cpu, sched)?;
                let ready = wait_ready(&mut s, t, &probe, 1)?;
                s.pin_all(args.server_cpu)?;
                if *with_pods {
                    let p = pods.last().context("no pod")?;
                    let IpAddr::V4(ip) = p.ips[0] else {
                        bail!("pod addresses are IPv4 here")
                    };
                    let name = format!(
                        "{}.{}.pod.{ZONE}",
                        ip.to_string().replace('.', "-"),
                        p.namespace
                    );
                    ensure!(
                        matches!(ask(s.port, &name, 1, Duration::from_secs(2)), Some((0, 1))),
                        "{} does not answer the pod name {name}",
                        k.label()
                    );
                }
                // Let allocator caches and load-time buffers settle.
                std::thread::sleep(Duration::from_secs(2));
                let memory = s.memory();
                eprintln!(
                    "memory {step}, {}: ready in {:.2} s, RSS {}, HWM {}, Pss {} ({} processes)",
                    k.label(),
                    ready.as_secs_f64(),
                    fmt_mib(memory.rss),
                    fmt_mib(memory.hwm),
                    fmt_mib(memory.pss),
                    memory.processes
                );
                mem_rows.push(MemRow {
                    kind: k,
                    step: step.clone(),
                    ready,
                    memory,
                    repinned: s.repinned.len(),
                });
                s.stop();
            }
        }
        writeln!(
            mem_info,
            "- endpoint and pod addresses: {}",
            big.plan.describe()
        )?;
    }

    if let Some(d) = &args.dump {
        std::fs::create_dir_all(d)?;
        for e in std::fs::read_dir(&dir)?.flatten() {
            if e.path().is_file() {
                std::fs::copy(e.path(), d.join(e.file_name()))?;
            }
        }
    }

    let info = Info {
        sched,
        load_start,
        revision: source_revision(&["dns", "model"]),
        weft_skipped,
        weft_bin,
        started,
        common_rate,
        lowest,
        mem_info,
        mix,
    };
    let report = report(&args, &info, &cluster, &recs, &results, &mem_rows)?;
    print!("{report}");
    if let Some(out) = &args.out {
        std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
    }
    drop(tmp);
    Ok(())
}

// ---------------------------------------------------------------- report

struct Info {
    sched: Sched,
    load_start: String,
    revision: String,
    weft_skipped: Option<String>,
    weft_bin: PathBuf,
    started: Instant,
    common_rate: u64,
    lowest: f64,
    mem_info: String,
    mix: QueryMix,
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "**no**"
    }
}

fn fmt_qps(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn fmt_lat(ms: f64) -> String {
    if !ms.is_finite() {
        "-".into()
    } else if ms < 1.0 {
        format!("{:.0} µs", ms * 1e3)
    } else {
        format!("{ms:.2} ms")
    }
}

fn fmt_mib(bytes: u64) -> String {
    format!("{:.1} MiB", mib(bytes as f64))
}

fn pct(v: f64) -> String {
    if v.is_finite() {
        format!("{:.0}%", v * 100.0)
    } else {
        "-".into()
    }
}

fn rcodes(p: &Perf) -> String {
    let total: u64 = p.rcodes.iter().map(|r| r.1).sum();
    p.rcodes
        .iter()
        .map(|(c, n)| format!("{c} {:.1}%", *n as f64 * 100.0 / total.max(1) as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Latency percentiles of some runs pooled, ms.
struct Pooled {
    n: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

fn pooled(runs: &[Perf]) -> Pooled {
    let all = sorted(
        runs.iter()
            .flat_map(|p| p.latencies.iter().copied())
            .collect(),
    );
    Pooled {
        n: all.len(),
        p50: percentile(&all, 0.5),
        p90: percentile(&all, 0.9),
        p99: percentile(&all, 0.99),
        p999: percentile(&all, 0.999),
        max: all.last().copied().unwrap_or(f64::NAN),
    }
}

fn report(
    args: &Args,
    info: &Info,
    cluster: &Cluster,
    recs: &Records,
    results: &BTreeMap<Kind, Result1>,
    mem: &[MemRow],
) -> anyhow::Result<String> {
    let services = &cluster.services;
    let mut r = benchnet::report_header(
        "weft cluster DNS benchmark (weft-dns vs NSD and Knot)",
        &info.load_start,
    );
    let mut xtask_args: Vec<String> = std::env::args().skip(1).collect();
    xtask_args.retain(|a| !a.is_empty());
    writeln!(
        r,
        "Reproduce: `cargo xtask bench dns{}{}`  ",
        if xtask_args.is_empty() { "" } else { " " },
        xtask_args.join(" ")
    )?;
    let kinds: Vec<Kind> = results.keys().copied().collect();
    let mut versions = Vec::new();
    if kinds.contains(&Kind::Weft) {
        versions.push(format!(
            "weft-dns `{}` ({}; `--no-forward --ttl {TTL}`, pods disabled; serving loop on one thread)",
            info.weft_bin.display(),
            info.revision
        ));
    }
    if kinds.contains(&Kind::Nsd) {
        versions.push(format!(
            "{} (`server-count: 1`, response rate limiting off)",
            tool_version(NSD, &["-v"])
        ));
    }
    if kinds.contains(&Kind::Knot) {
        versions.push(format!(
            "Knot DNS {} (`udp-workers: 1`, `tcp-workers: 1`, `background-workers: 1`)",
            tool_version(KNOTD, &["-V"])
                .rsplit(' ')
                .next()
                .unwrap_or("")
        ));
    }
    if let Some(why) = &info.weft_skipped {
        versions.push(format!("weft-dns **skipped**: {why}"));
    }
    writeln!(r, "Servers: {}  ", versions.join("; "))?;
    writeln!(
        r,
        "CPU budget: every process and thread of the server under test pinned to CPU {} (sched_setaffinity at start, threads checked and re-pinned before every run), dnsperf ({}) pinned to CPU {}; both at {}; UDP over 127.0.0.1, one server queried at a time (the others idle)  ",
        args.server_cpu,
        tool_version("dnsperf", &["-h"]).trim_start_matches("Version ").trim(),
        args.client_cpu,
        info.sched.describe()
    )?;
    let cip = services
        .iter()
        .filter(|s| !s.cluster_ips.is_empty())
        .count();
    let hl: Vec<&ServiceEntry> = services.iter().filter(|s| s.headless).collect();
    let en = services
        .iter()
        .filter(|s| s.external_name.is_some())
        .count();
    let unnamed = services
        .iter()
        .filter(|s| !s.cluster_ips.is_empty() && s.ports.iter().any(|p| p.name.is_empty()))
        .count();
    let udp_ports = services
        .iter()
        .flat_map(|s| &s.ports)
        .filter(|p| p.protocol == Protocol::UDP)
        .count();
    let all_ports: usize = services.iter().map(|s| s.ports.len()).sum();
    let hl_ready: usize = hl
        .iter()
        .map(|s| s.backends.iter().filter(|b| b.ready).count())
        .sum();
    let hl_not_ready: usize = hl
        .iter()
        .map(|s| s.backends.iter().filter(|b| !b.ready).count())
        .sum();
    let namespaces: BTreeSet<&str> = services.iter().map(|s| s.namespace.as_str()).collect();
    writeln!(
        r,
        "Records: {} Services in {} namespaces of `{ZONE}` (seed {}): {cip} ClusterIP with 1-3 ports ({unnamed} with one unnamed port), {} headless with {hl_ready} ready endpoints with hostnames (2-5 each; {hl_not_ready} more not ready, left out of DNS), {en} ExternalName; {all_ports} ports, {udp_ports} of them UDP; endpoints in {}. weft-dns reads them as a view file (`{{\"rev\":1,\"services\":[...],\"nodes\":[],\"pods\":[]}}`); NSD and Knot read the same records as static zones: {} records in `{ZONE}` and {} PTR records in {} reverse zones ({}), TTL {TTL}  ",
        services.len(),
        namespaces.len(),
        args.seed,
        hl.len(),
        cluster.plan.describe(),
        recs.zone.len(),
        recs.reverse.values().map(Vec::len).sum::<usize>(),
        recs.reverse.len(),
        recs.reverse.keys().cloned().collect::<Vec<_>>().join(", ")
    )?;
    let queries = info.mix.queries.len();
    let mut asked: BTreeMap<QKind, usize> = BTreeMap::new();
    for q in &info.mix.queries {
        *asked.entry(q.kind).or_default() += 1;
    }
    let kc = |k: QKind| asked.get(&k).copied().unwrap_or(0);
    let share = |k: QKind| kc(k) as f64 * 100.0 / queries as f64;
    let pl = |k: QKind| info.mix.pool.get(&k).copied().unwrap_or(0);
    writeln!(
        r,
        "Queries: one file of {} lines for every server, looped by dnsperf (no EDNS, RD set): {} A ({:.1}%; {} names: Services and headless endpoint hostnames), {} SRV ({:.1}%; {} named ports), {} PTR ({:.1}%; {} addresses: cluster IPs and headless endpoints), {} NXDOMAIN A ({:.1}%; {} names: missing Services and a pod's `ndots:5` search-path expansions of external names such as `api.github.com.shop.svc.{ZONE}`)  ",
        queries,
        kc(QKind::A),
        share(QKind::A),
        pl(QKind::A),
        kc(QKind::Srv),
        share(QKind::Srv),
        pl(QKind::Srv),
        kc(QKind::Ptr),
        share(QKind::Ptr),
        pl(QKind::Ptr),
        kc(QKind::NxDomain),
        share(QKind::NxDomain),
        pl(QKind::NxDomain)
    )?;
    writeln!(
        r,
        "Runs: dnsperf `-c {} -t 2`; per server an outstanding limit (`-q`) from {:?} by {} s calibration runs (the smallest within 2% of the most qps among the runs that lost no query); then {} round(s), the servers' order rotating: peak ({} s, unlimited rate), latency at {:.0}% of that round's peak (`-Q`, `-v`: every query's latency; `-q {}` for every server, so that dnsperf sends on schedule), and at one rate for all, {:.0}% of the lowest median peak = {} qps. Total time {:.0} s  ",
        args.clients,
        args.outstanding,
        args.calibrate_secs,
        args.rounds,
        args.duration,
        args.load * 100.0,
        args.latency_outstanding,
        args.load * 100.0,
        fmt_qps(info.common_rate as f64),
        info.started.elapsed().as_secs_f64()
    )?;
    writeln!(r)?;

    // Answers.
    writeln!(r, "Answers checked before timing (`dig +noedns`, one batch per server): rcode and the whole answer set (type and data, TTL aside) against the records written; additional and authority sections not compared.\n")?;
    let mut kinds_in_check: BTreeSet<&str> = BTreeSet::new();
    for res in results.values() {
        kinds_in_check.extend(res.check.by_kind.keys());
    }
    write!(r, "| server | right / asked |")?;
    for k in &kinds_in_check {
        write!(r, " {k} |")?;
    }
    writeln!(r)?;
    write!(r, "|---|---|")?;
    for _ in &kinds_in_check {
        write!(r, "---|")?;
    }
    writeln!(r)?;
    for (k, res) in results {
        write!(
            r,
            "| {} | {} / {} {} |",
            k.label(),
            res.check.right,
            res.check.asked,
            if res.valid() {
                "(all right)"
            } else {
                "**WRONG ANSWERS**"
            }
        )?;
        for kind in &kinds_in_check {
            let (a, ok) = res.check.by_kind.get(kind).copied().unwrap_or((0, 0));
            write!(r, " {ok} / {a} |")?;
        }
        writeln!(r)?;
    }
    writeln!(r)?;
    for (k, res) in results {
        for w in &res.check.wrong {
            writeln!(r, "- {} answered {w}", k.label())?;
        }
    }
    if results.values().any(|res| !res.check.wrong.is_empty()) {
        writeln!(r)?;
    }

    // Summary with ratios and targets.
    let get = |k: Kind| results.get(&k);
    let weft = get(Kind::Weft);
    let nsd = get(Kind::Nsd);
    let knot = get(Kind::Knot);
    let ratio = |a: Option<f64>, b: Option<f64>| -> String {
        match (a, b) {
            (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => {
                format!("{:.2}x", a / b)
            }
            _ => "-".into(),
        }
    };
    let cell = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".to_string(), f);
    let own_p99 = |x: &Result1| pooled(&x.own).p99;
    let common_p99 = |x: &Result1| pooled(&x.common).p99;
    writeln!(
        r,
        "| metric | weft | NSD | Knot | weft / NSD | weft / Knot | target | met? |"
    )?;
    writeln!(r, "|---|---|---|---|---|---|---|---|")?;
    let peak = |x: Option<&Result1>| x.map(Result1::peak);
    let weft_valid = weft.is_some_and(Result1::valid);
    let eff = |x: Option<&Result1>| x.map(Result1::per_cpu);
    // The most dnsperf completed against any server: with the same query
    // file and settings it can do at least that.
    let ceiling = results
        .values()
        .flat_map(|x| &x.peaks)
        .map(|p| p.qps)
        .fold(0.0, f64::max);
    let target_peak = match (weft, nsd) {
        (Some(w), Some(n)) if weft_valid => {
            let by_qps = w.peak() >= 0.5 * n.peak();
            if n.peak() >= 0.9 * ceiling {
                // NSD reached about the most dnsperf did: its qps may be
                // dnsperf's limit, so check the CPU-normalised ratio too.
                let by_cpu = w.per_cpu() >= 0.5 * n.per_cpu();
                format!(
                    "{} (NSD ran at about dnsperf's most; per server CPU-second {:.2}x)",
                    yes(by_qps && by_cpu),
                    w.per_cpu() / n.per_cpu()
                )
            } else {
                yes(by_qps).to_string()
            }
        }
        (Some(_), Some(_)) => "n/a: weft's answers are wrong".into(),
        _ => "not measured".into(),
    };
    writeln!(
        r,
        "| **peak qps**, median of {} rounds | **{}** | {} | {} | **{}** | {} | weft >= 0.5x NSD | {target_peak} |",
        args.rounds,
        cell(peak(weft), &fmt_qps),
        cell(peak(nsd), &fmt_qps),
        cell(peak(knot), &fmt_qps),
        ratio(peak(weft), peak(nsd)),
        ratio(peak(weft), peak(knot)),
    )?;
    writeln!(
        r,
        "| qps per server CPU-second at peak, median | {} | {} | {} | {} | {} | | |",
        cell(eff(weft), &fmt_qps),
        cell(eff(nsd), &fmt_qps),
        cell(eff(knot), &fmt_qps),
        ratio(eff(weft), eff(nsd)),
        ratio(eff(weft), eff(knot)),
    )?;
    let target_p99 = match weft {
        Some(w) if weft_valid => yes(own_p99(w) <= 2.0).to_string(),
        Some(_) => "n/a: weft's answers are wrong".into(),
        None => "not measured".into(),
    };
    writeln!(
        r,
        "| **p99 latency at {:.0}% of its own peak** (all rounds pooled) | **{}** | {} | {} | {} | {} | weft <= 2 ms | {target_p99} |",
        args.load * 100.0,
        cell(weft.map(own_p99), &fmt_lat),
        cell(nsd.map(own_p99), &fmt_lat),
        cell(knot.map(own_p99), &fmt_lat),
        ratio(weft.map(own_p99), nsd.map(own_p99)),
        ratio(weft.map(own_p99), knot.map(own_p99)),
    )?;
    if results.len() > 1 {
        writeln!(
            r,
            "| p99 latency at the same {} qps for all | {} | {} | {} | {} | {} | | |",
            fmt_qps(info.common_rate as f64),
            cell(weft.map(common_p99), &fmt_lat),
            cell(nsd.map(common_p99), &fmt_lat),
            cell(knot.map(common_p99), &fmt_lat),
            ratio(weft.map(common_p99), nsd.map(common_p99)),
            ratio(weft.map(common_p99), knot.map(common_p99)),
        )?;
    }
    let pss = |x: Option<&Result1>| x.map(|x| x.memory.pss as f64);
    let mib_cell = |v: Option<f64>| cell(v, &|b| fmt_mib(b as u64));
    writeln!(
        r,
        "| memory serving the {} Services (Pss of its processes) | {} | {} | {} | {} | {} | | |",
        services.len(),
        mib_cell(pss(weft)),
        mib_cell(pss(nsd)),
        mib_cell(pss(knot)),
        ratio(pss(weft), pss(nsd)),
        ratio(pss(weft), pss(knot)),
    )?;
    for step in mem.iter().map(|m| m.step.clone()).collect::<BTreeSet<_>>() {
        let m = |k: Kind| {
            mem.iter()
                .find(|row| row.kind == k && row.step == step)
                .map(|row| row.memory.pss as f64)
        };
        writeln!(
            r,
            "| memory at {step} (Pss) | {} | {} | {} | {} | {} | | |",
            mib_cell(m(Kind::Weft)),
            mib_cell(m(Kind::Nsd)),
            mib_cell(m(Kind::Knot)),
            ratio(m(Kind::Weft), m(Kind::Nsd)),
            ratio(m(Kind::Weft), m(Kind::Knot)),
        )?;
    }
    writeln!(r)?;

    // Calibration.
    writeln!(
        r,
        "Calibration of the peak runs' outstanding limit ({} s per limit; qps, the server's CPU in cores, lost queries):\n",
        args.calibrate_secs
    )?;
    write!(r, "| server |")?;
    for q in &args.outstanding {
        write!(r, " `-q {q}` |")?;
    }
    writeln!(r, " chosen |")?;
    write!(r, "|---|")?;
    for _ in &args.outstanding {
        write!(r, "---|")?;
    }
    writeln!(r, "---|")?;
    for (k, res) in results {
        write!(r, "| {} |", k.label())?;
        for p in &res.calibration {
            write!(
                r,
                " {} ({:.2}; lost {}) |",
                fmt_qps(p.qps),
                p.server_cores,
                p.lost
            )?;
        }
        writeln!(r, " `-q {}` |", res.outstanding)?;
    }
    writeln!(r)?;

    // Peaks.
    writeln!(r, "Peak runs ({} s each, unlimited rate). CPU in cores, from the scheduler's run time of every thread: the server's processes, and dnsperf's own (from its rusage); CPU busy: all work on that CPU from /proc/stat, with the share of irq + softirq in brackets (on loopback a packet's receive path runs on the sending CPU: the server's CPU carries the replies' delivery to dnsperf, dnsperf's CPU the queries' delivery to the server):\n", args.duration)?;
    writeln!(
        r,
        "| server | round | `-q` | **qps** | lost | response codes | avg latency | server CPU | qps per server CPU-second | dnsperf CPU | CPU{} busy (irq) | CPU{} busy (irq) |",
        args.server_cpu, args.client_cpu
    )?;
    writeln!(r, "|---|---|---|---|---|---|---|---|---|---|---|---|")?;
    let cpu_cell = |c: &CpuUse| format!("{} ({})", pct(c.busy), pct(c.irq));
    for (k, res) in results {
        for (i, p) in res.peaks.iter().enumerate() {
            writeln!(
                r,
                "| {} | {} | {} | **{}** | {} | {} | {} | {:.2} | {} | {:.2} | {} | {} |",
                k.label(),
                i + 1,
                p.outstanding,
                fmt_qps(p.qps),
                p.lost,
                rcodes(p),
                fmt_lat(p.avg_ms),
                p.server_cores,
                fmt_qps(p.qps / p.server_cores),
                p.client_cores,
                cpu_cell(&p.server_cpu),
                cpu_cell(&p.client_cpu)
            )?;
        }
    }
    writeln!(r)?;

    // Latency.
    let lat_table = |r: &mut String,
                     title: &str,
                     pick: &dyn Fn(&Result1) -> &Vec<Perf>|
     -> anyhow::Result<()> {
        writeln!(r, "{title}\n")?;
        writeln!(r, "| server | rate asked (per round) | qps done | queries timed | lost | p50 | p90 | **p99** | p99.9 | max | p99 per round | server CPU | dnsperf CPU |")?;
        writeln!(r, "|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
        for (k, res) in results {
            let runs = pick(res);
            if runs.is_empty() {
                continue;
            }
            let Pooled {
                n,
                p50,
                p90,
                p99,
                p999,
                max,
            } = pooled(runs);
            let rates: Vec<String> = runs
                .iter()
                .map(|p| fmt_qps(p.rate.unwrap_or(0) as f64))
                .collect();
            let done: Vec<String> = runs.iter().map(|p| fmt_qps(p.qps)).collect();
            let per_round: Vec<String> = runs
                .iter()
                .map(|p| fmt_lat(percentile(&p.latencies, 0.99)))
                .collect();
            let lost: u64 = runs.iter().map(|p| p.lost).sum();
            let cores: Vec<String> = runs
                .iter()
                .map(|p| format!("{:.2}", p.server_cores))
                .collect();
            let client: Vec<String> = runs
                .iter()
                .map(|p| format!("{:.2}", p.client_cores))
                .collect();
            writeln!(
                r,
                "| {} | {} | {} | {n} | {lost} | {} | {} | **{}** | {} | {} | {} | {} | {} |",
                k.label(),
                rates.join(" / "),
                done.join(" / "),
                fmt_lat(p50),
                fmt_lat(p90),
                fmt_lat(p99),
                fmt_lat(p999),
                fmt_lat(max),
                per_round.join(" / "),
                cores.join(" / "),
                client.join(" / ")
            )?;
        }
        writeln!(r)?;
        Ok(())
    };
    lat_table(
        &mut r,
        &format!(
            "Latency at {:.0}% of each server's own peak of the round (dnsperf `-v`: every completed query's latency, measured by dnsperf from send to receive; all rounds pooled; lost: no answer within 2 s, not in the percentiles):",
            args.load * 100.0
        ),
        &|x| &x.own,
    )?;
    if results.len() > 1 {
        lat_table(
            &mut r,
            &format!(
                "Latency at the same offered rate for every server, {} qps ({:.0}% of the lowest median peak, {}):",
                fmt_qps(info.common_rate as f64),
                args.load * 100.0,
                fmt_qps(info.lowest)
            ),
            &|x| &x.common,
        )?;
    }

    let busy_client = results
        .values()
        .flat_map(|x| x.own.iter().chain(&x.common))
        .filter(|p| p.client_cores >= 0.9)
        .count();
    if busy_client > 0 {
        writeln!(r, "In {busy_client} latency run(s) dnsperf kept 0.9 of its CPU or more busy (CPU in cores, per round): whatever delay its own work adds (sending, receiving, writing every latency) is in what it measures. That can only add to the server's latency: the percentiles are upper bounds of the server's.\n")?;
    }

    // Memory.
    writeln!(r, "Memory of each server's processes: serving the {} Services above, at the end of the timed runs; then each server started alone with a larger set, measured 2 s after it first answers (VmRSS summed over its processes, VmHWM the largest process's peak, Pss: resident memory with pages shared between processes split among them, which counts NSD's forked server and xfrd processes once). Ready: from spawn to the first right answer for the last Service.\n", services.len())?;
    writeln!(
        r,
        "| server | set | ready | processes | VmRSS | VmHWM | **Pss** |"
    )?;
    writeln!(r, "|---|---|---|---|---|---|---|")?;
    let mem_row = |r: &mut String, kind: Kind, set: &str, ready: String, m: &Memory| {
        writeln!(
            r,
            "| {} | {set} | {ready} | {} | {} | {} | **{}** |",
            kind.label(),
            m.processes,
            fmt_mib(m.rss),
            fmt_mib(m.hwm),
            fmt_mib(m.pss)
        )
    };
    for (k, res) in results {
        mem_row(
            &mut r,
            *k,
            &format!("{} Services (timed runs)", services.len()),
            format!("{:.0} ms", res.ready.as_secs_f64() * 1e3),
            &res.memory,
        )?;
    }
    for m in mem {
        mem_row(
            &mut r,
            m.kind,
            &m.step,
            format!("{:.2} s", m.ready.as_secs_f64()),
            &m.memory,
        )?;
    }
    writeln!(r)?;
    if !info.mem_info.is_empty() {
        writeln!(r, "Memory sets (the same generator, every Service with {} endpoints, all ready; headless ones' endpoints have hostnames; each endpoint is a pod):\n", args.memory_endpoints)?;
        write!(r, "{}", info.mem_info)?;
        writeln!(r, "- with pods, weft runs `--pods verified` (it indexes pods by address either way); NSD and Knot get one `a-b-c-d.<ns>.pod.{ZONE}` A record per pod, the static zone's way to answer the same names\n")?;
    }

    // Notes that follow from the numbers.
    writeln!(r, "Notes from this run:\n")?;
    // dnsperf's own CPU does not show its headroom (it keeps a CPU busy at
    // any high rate); `ceiling`, the most it completed, does.
    for (k, res) in results {
        let Some(p) = res.peaks.iter().max_by(|a, b| a.qps.total_cmp(&b.qps)) else {
            continue;
        };
        let sc = &p.server_cpu;
        let others = (sc.busy - p.server_cores - sc.irq - sc.steal).max(0.0);
        let top = res.peak() >= 0.9 * ceiling;
        let bound = if !top && p.server_cores >= 0.8 {
            format!(
                "server-bound: it used {:.2} of CPU {} ({} irq on that CPU), while dnsperf with the same file and settings completed up to {} qps against another server in this run",
                p.server_cores,
                args.server_cpu,
                pct(sc.irq),
                fmt_qps(ceiling)
            )
        } else if top && p.server_cores >= 0.8 {
            format!(
                "at about the most dnsperf completed against any server in this run ({}), with the server using {:.2} of CPU {} and dnsperf {:.2} of CPU {}: either may be the limit, so {} can do at least this; its qps per server CPU-second, {}, is the fairer comparison",
                fmt_qps(ceiling),
                p.server_cores,
                args.server_cpu,
                p.client_cores,
                args.client_cpu,
                k.label(),
                fmt_qps(p.qps / p.server_cores)
            )
        } else if sc.busy >= 0.95 && others >= 0.1 {
            format!(
                "CPU {} was {} busy but the server got {:.2} of it; about {} went to other work on the machine: a contended core, not the server's limit",
                args.server_cpu,
                pct(sc.busy),
                p.server_cores,
                pct(others)
            )
        } else {
            format!(
                "neither the server ({:.2} of a core) nor, by the other servers' peaks, dnsperf was saturated: limited by the outstanding limit or by waits",
                p.server_cores
            )
        };
        writeln!(r, "- {} peak: {bound}.", k.label())?;
        if !res.repinned.is_empty() {
            writeln!(
                r,
                "- {}: {} thread(s) were not limited to CPU {} after start and were re-pinned ({}).",
                k.label(),
                res.repinned.len(),
                args.server_cpu,
                res.repinned.join(", ")
            )?;
        }
    }
    let repinned_mem: usize = mem.iter().map(|m| m.repinned).sum();
    if repinned_mem > 0 {
        writeln!(
            r,
            "- memory runs: {repinned_mem} thread(s) re-pinned after start."
        )?;
    }
    let steal = results
        .values()
        .flat_map(|x| &x.peaks)
        .map(|p| p.server_cpu.steal.max(p.client_cpu.steal))
        .fold(0.0, f64::max);
    if steal >= 0.01 {
        writeln!(r, "- Steal (time the hypervisor did not run this VM's CPU although it had work) reached {} of a CPU in a peak run: it takes its share from every server alike.", pct(steal))?;
    }
    if let (Sched::Fifo, Some((runtime, period))) = (info.sched, rt_limit()) {
        if runtime >= 0 && runtime < period {
            let stop_ms = (period - runtime) as f64 / 1e3;
            let maxima: Vec<f64> = results
                .values()
                .flat_map(|x| x.own.iter().chain(&x.common))
                .map(|p| p.latencies.last().copied().unwrap_or(0.0))
                .collect();
            let near = maxima
                .iter()
                .filter(|m| **m >= stop_ms * 0.8 && **m <= stop_ms * 1.3)
                .count();
            writeln!(
                r,
                "- Real-time tasks may use {runtime} µs of every {period} µs (`sched_rt_runtime_us`): a SCHED_FIFO task that wants more is stopped for the rest of the period ({stop_ms:.0} ms). At peak every server runs into it (about 0.95 of a core each, alike), and so does dnsperf whenever it needs more than that of its CPU; {near} of the {} latency runs have their maximum within 0.8-1.3x of {stop_ms:.0} ms, which is that stop, not the server.",
                maxima.len()
            )?;
        }
    }
    writeln!(
        r,
        "- Other processes on this machine share both CPUs: pinning keeps the server and dnsperf apart, not others away; the servers and dnsperf ran at {} (see the load averages above).",
        info.sched.describe()
    )?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> (Cluster, Records) {
        let c = generate(Shape {
            services: 300,
            endpoints: None,
            pods: 0,
            seed: 1,
        });
        let r = records(&c.services);
        (c, r)
    }

    #[test]
    fn every_srv_target_and_ptr_name_has_an_address() {
        let (_, r) = small();
        for ((owner, rtype), set) in &r.index {
            let targets: Vec<String> = match *rtype {
                "SRV" => set
                    .iter()
                    .map(|a| a.rsplit(' ').next().unwrap().to_string())
                    .collect(),
                "PTR" => set
                    .iter()
                    .map(|a| a.trim_start_matches("PTR ").to_string())
                    .collect(),
                _ => continue,
            };
            for t in targets {
                assert!(
                    r.index.contains_key(&(t.clone(), "A")),
                    "{owner} {rtype} -> {t} has no A record"
                );
            }
        }
    }

    #[test]
    fn the_mix_has_every_kind_and_its_expectations_hold() {
        let (c, r) = small();
        let args = Args::parse_from(["weft-dns-bench", "--queries", "2000"]);
        let mix = query_mix(&r, &c.services, &args).unwrap();
        let mut kinds = BTreeSet::new();
        for q in &mix.queries {
            kinds.insert(q.kind);
            let e = expected(&r, &q.name, q.rtype);
            match q.kind {
                QKind::NxDomain => assert_eq!(e.rcode, "NXDOMAIN", "{}", q.name),
                _ => assert!(e.rcode == "NOERROR" && !e.answers.is_empty(), "{}", q.name),
            }
        }
        assert_eq!(kinds.len(), 4);
        // Not-ready endpoints are left out, ExternalName is a CNAME.
        let en = c
            .services
            .iter()
            .find(|s| s.external_name.is_some())
            .unwrap();
        let name = format!("{}.{}.svc.{ZONE}.", en.name, en.namespace);
        assert!(expected(&r, &name, "A")
            .answers
            .iter()
            .all(|a| a.starts_with("CNAME ")));
        let nr = c
            .services
            .iter()
            .flat_map(|s| &s.backends)
            .find(|b| !b.ready)
            .unwrap();
        let IpAddr::V4(ip) = nr.ip else { panic!() };
        assert_eq!(expected(&r, &ptr_name(ip), "PTR").rcode, "NXDOMAIN");
    }

    #[test]
    fn calibration_prefers_no_loss_then_fewer_in_flight() {
        let run = |outstanding, qps, lost| Perf {
            outstanding,
            qps,
            lost,
            ..Default::default()
        };
        let cal = [
            run(20, 179_000.0, 0),
            run(50, 181_500.0, 0),
            run(100, 180_700.0, 0),
            run(200, 182_500.0, 12),
        ];
        assert_eq!(choose_outstanding(&cal), Some(20));
        let cal = [
            run(20, 280_000.0, 0),
            run(100, 325_000.0, 0),
            run(200, 334_000.0, 0),
        ];
        assert_eq!(choose_outstanding(&cal), Some(200));
        assert_eq!(choose_outstanding(&[run(50, 10.0, 3)]), Some(50));
    }

    #[test]
    fn addresses_stay_in_their_plan() {
        assert_eq!(AddrPlan::Test.addr(0), Ipv4Addr::new(198, 18, 128, 1));
        assert_eq!(
            AddrPlan::Test.addr(31_999),
            Ipv4Addr::new(198, 18, 255, 250)
        );
        assert_eq!(AddrPlan::Wide.addr(0), Ipv4Addr::new(10, 244, 0, 1));
        assert_eq!(
            AddrPlan::Wide.addr(99_999),
            Ipv4Addr::new(10, 245, 149, 250)
        );
        assert_eq!(
            reverse_zone("5.1.19.198.in-addr.arpa."),
            "19.198.in-addr.arpa"
        );
    }
}
