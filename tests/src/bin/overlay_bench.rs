//! weft-overlay-bench: cross-node pod-to-pod TCP throughput (iperf3) through
//! weft's VXLAN overlay, against the same two pod namespaces joined by a
//! plain veth pair, interleaved run by run.
//!
//! Setup (all in namespaces `wob<pid>-*`, removed on exit):
//! - two node namespaces `n1`, `n2` joined by a veth underlay `ul0`
//!   (198.18.0.11/24 and 198.18.0.12/24, MTU 1500), IPv4 forwarding on;
//! - the overlay programmed in each node by the agent library
//!   (`weft_agent::overlay::reconcile` with `NetlinkLinks`): bridge `weft0`
//!   with the gateway, VXLAN `weft.1` (VNI 1, port 8472, MTU 1450), route,
//!   permanent neighbour and FDB entry for the peer;
//! - one pod namespace per node (`pa`, `pb`) attached to its node's bridge by
//!   a veth of MTU 1450, as weft-cni does: 198.18.128.2/24 via 198.18.128.1
//!   and 198.18.129.2/24 via 198.18.129.1;
//! - the baseline: a second, plain veth pair `p2p0` directly between `pa` and
//!   `pb` (198.18.1.1/24, 198.18.1.2/24), measured at MTU 1500 and at MTU
//!   1450 (the overlay's pod MTU).
//!
//! One iperf3 server in `pb`; the client in `pa` runs `-t T` (one TCP stream)
//! against 198.18.129.2 (overlay) or 198.18.1.2 (plain veth), rotating the
//! order of the variants every round; the median of the runs is reported.
//!
//! Run by `cargo xtask bench overlay`; needs root and iperf3.

use anyhow::{anyhow, bail, ensure, Context};
use clap::Parser;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use weft_agent::overlay::netlink::NetlinkLinks;
use weft_agent::overlay::{reconcile, vtep_mac, Desired, Peer};
use weft_e2e::benchnet::{self, ip, run, summarize, Namespaces};

#[derive(Parser, Debug)]
#[command(about = "pod-to-pod TCP throughput: VXLAN overlay vs plain veth, interleaved")]
struct Args {
    /// Seconds per iperf3 run (`iperf3 -t`).
    #[arg(long, default_value_t = 10)]
    time: u32,
    /// Runs per variant (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Skip the plain-veth variant at MTU 1450.
    #[arg(long)]
    no_veth_1450: bool,
    /// iperf3 port.
    #[arg(long, default_value_t = 5201)]
    port: u16,
    /// Also write the report (markdown) to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

const UNDERLAY_MTU: u32 = 1500;
const POD_MTU: u32 = 1450;
const POD_A: &str = "198.18.128.2";
const POD_B: &str = "198.18.129.2";
const P2P_A: &str = "198.18.1.1";
const P2P_B: &str = "198.18.1.2";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Vxlan,
    Veth(u32),
}

impl Variant {
    fn label(self) -> String {
        match self {
            Variant::Vxlan => format!("VXLAN overlay (pod veth + bridge + VXLAN, MTU {POD_MTU})"),
            Variant::Veth(m) => format!("plain veth pod to pod, MTU {m}"),
        }
    }
    fn dst(self) -> &'static str {
        match self {
            Variant::Vxlan => POD_B,
            Variant::Veth(_) => P2P_B,
        }
    }
}

struct Run {
    gbps: f64,
    sender_gbps: f64,
    retransmits: u64,
    cpu_client: f64,
    cpu_server: f64,
}

/// The iperf3 server; killed (by its own pid) on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn node_desired(me: usize) -> Desired {
    let name = |i: usize| format!("node-{i}");
    let other = 3 - me;
    Desired {
        subnet: format!("198.18.{}.0/24", 127 + me).parse().unwrap(),
        gateway: format!("198.18.{}.1/24", 127 + me).parse().unwrap(),
        mtu: UNDERLAY_MTU - weft_agent::overlay::VXLAN_OVERHEAD,
        local_ip: format!("198.18.0.{}", 10 + me).parse().unwrap(),
        vtep_addr: format!("198.18.{}.0/32", 127 + me).parse().unwrap(),
        vtep_mac: vtep_mac(&name(me)),
        bridge_mac: weft_agent::overlay::bridge_mac(&name(me)),
        peers: vec![Peer {
            node: name(other),
            subnet: format!("198.18.{}.0/24", 127 + other).parse().unwrap(),
            vtep_ip: format!("198.18.0.{}", 10 + other).parse().unwrap(),
            vtep_mac: vtep_mac(&name(other)),
        }],
    }
}

fn nsexec(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut a = vec!["netns", "exec", ns];
    a.extend_from_slice(args);
    ip(&a)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    benchnet::require_root("weft-overlay-bench")?;
    ensure!(args.runs > 0, "--runs must be at least 1");
    run("iperf3", &["--version"])
        .context("iperf3 is needed (apt-get install iperf3, or `cargo xtask setup`)")?;
    let load_start = benchnet::loadavg();

    // ---------------------------------------------------------------- setup
    let mut ns = Namespaces::new("wob");
    let n1 = ns.add("n1")?;
    let n2 = ns.add("n2")?;
    let pa = ns.add("pa")?;
    let pb = ns.add("pb")?;
    ip(&[
        "link", "add", "ul0", "netns", &n1, "mtu", "1500", "type", "veth", "peer", "name", "ul0",
        "netns", &n2, "mtu", "1500",
    ])?;
    for (n, addr) in [(&n1, "198.18.0.11/24"), (&n2, "198.18.0.12/24")] {
        ip(&["-n", n, "addr", "add", addr, "dev", "ul0"])?;
        ip(&["-n", n, "link", "set", "ul0", "up"])?;
        nsexec(n, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    }
    for (n, me) in [(n1.clone(), 1usize), (n2.clone(), 2usize)] {
        let out = benchnet::run_in(&n, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let links = NetlinkLinks::new().map_err(|e| anyhow!("{e}"))?;
                reconcile(&links, &node_desired(me))
                    .await
                    .map_err(|e| anyhow!("{e}"))
            })
        })?;
        ensure!(out.errors.is_empty(), "overlay on {n}: {:?}", out.errors);
    }
    let mtu = POD_MTU.to_string();
    for (node, pod, host_if, addr, gw) in [
        (&n1, &pa, "vpa", "198.18.128.2/24", "198.18.128.1"),
        (&n2, &pb, "vpb", "198.18.129.2/24", "198.18.129.1"),
    ] {
        ip(&[
            "-n", node, "link", "add", host_if, "mtu", &mtu, "type", "veth", "peer", "name",
            "eth0", "mtu", &mtu, "netns", pod,
        ])?;
        ip(&["-n", node, "link", "set", host_if, "master", "weft0", "up"])?;
        ip(&["-n", pod, "addr", "add", addr, "dev", "eth0"])?;
        ip(&["-n", pod, "link", "set", "eth0", "up"])?;
        ip(&["-n", pod, "route", "add", "default", "via", gw])?;
    }
    ip(&[
        "link", "add", "p2p0", "netns", &pa, "type", "veth", "peer", "name", "p2p0", "netns", &pb,
    ])?;
    for (pod, addr) in [(&pa, "198.18.1.1/24"), (&pb, "198.18.1.2/24")] {
        ip(&["-n", pod, "addr", "add", addr, "dev", "p2p0"])?;
        ip(&["-n", pod, "link", "set", "p2p0", "up"])?;
    }
    for dst in [POD_B, P2P_B] {
        nsexec(&pa, &["ping", "-c", "3", "-i", "0.2", "-W", "2", dst])
            .with_context(|| format!("pod A cannot reach {dst}"))?;
    }
    nsexec(&pb, &["ping", "-c", "1", "-W", "2", POD_A])?;
    nsexec(&pb, &["ping", "-c", "1", "-W", "2", P2P_A])?;
    let route = ip(&["-n", &pa, "route", "get", POD_B])?;
    ensure!(
        route.contains("dev eth0"),
        "pod A routes {POD_B} via: {route}"
    );

    // ---------------------------------------------------------------- server
    let port = args.port.to_string();
    let _server = Server(
        Command::new("ip")
            .args(["netns", "exec", &pb, "iperf3", "-s", "-p", &port])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s")?,
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ss = nsexec(&pb, &["ss", "-ltnH"])?;
        if ss.contains(&format!(":{port} ")) {
            break;
        }
        if Instant::now() > deadline {
            bail!("iperf3 server in {pb} is not listening on {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // ---------------------------------------------------------------- runs
    let mut variants = vec![Variant::Vxlan, Variant::Veth(1500)];
    if !args.no_veth_1450 {
        variants.push(Variant::Veth(POD_MTU));
    }
    let vx_tx_before = tx_bytes(&n1, "weft.1")?;
    let mut runs: Vec<Vec<Run>> = variants.iter().map(|_| Vec::new()).collect();
    let mut sequence = Vec::new();
    for round in 0..args.runs {
        for j in 0..variants.len() {
            let k = (j + round) % variants.len();
            let v = variants[k];
            if let Variant::Veth(m) = v {
                let m = m.to_string();
                ip(&["-n", &pa, "link", "set", "p2p0", "mtu", &m])?;
                ip(&["-n", &pb, "link", "set", "p2p0", "mtu", &m])?;
            }
            let r = iperf(&pa, v.dst(), &port, args.time)?;
            eprintln!(
                "round {} {}: {:.2} Gbit/s ({} retransmits)",
                round + 1,
                v.label(),
                r.gbps,
                r.retransmits
            );
            sequence.push(format!("{:.2}", r.gbps));
            runs[k].push(r);
        }
    }
    let vx_tx = tx_bytes(&n1, "weft.1")? - vx_tx_before;

    // ---------------------------------------------------------------- offloads
    let devices = [
        (pa.as_str(), "eth0", "pod A eth0"),
        (n1.as_str(), "vpa", "node 1 host veth"),
        (n1.as_str(), "weft0", "node 1 weft0"),
        (n1.as_str(), "weft.1", "node 1 weft.1 (VXLAN)"),
        (n1.as_str(), "ul0", "node 1 ul0 (underlay)"),
        (n2.as_str(), "ul0", "node 2 ul0 (underlay)"),
        (n2.as_str(), "weft.1", "node 2 weft.1 (VXLAN)"),
        (pb.as_str(), "eth0", "pod B eth0"),
        (pa.as_str(), "p2p0", "pod A p2p0 (plain veth)"),
    ];
    let features = [
        "tcp-segmentation-offload",
        "generic-segmentation-offload",
        "generic-receive-offload",
        "tx-udp_tnl-segmentation",
        "rx-udp-gro-forwarding",
        "rx-gro-list",
    ];
    let ethtool_ok = run("ethtool", &["--version"]).is_ok();
    let mut offloads = Vec::new();
    if ethtool_ok {
        for (n, dev, label) in devices {
            let k = nsexec(n, &["ethtool", "-k", dev])?;
            let vals: Vec<String> = features
                .iter()
                .map(|f| {
                    k.lines()
                        .find_map(|l| l.trim().strip_prefix(&format!("{f}: ")))
                        .map(|v| v.replace(" [fixed]", " (fixed)"))
                        .unwrap_or_else(|| "-".into())
                })
                .collect();
            offloads.push((label, vals));
        }
    }
    let vx_details = ip(&["-n", &n1, "-d", "link", "show", "weft.1"])?;

    // ---------------------------------------------------------------- report
    let iperf_version = run("iperf3", &["--version"])
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
        .unwrap_or_default();
    let mut r = benchnet::report_header("weft overlay throughput benchmark", &load_start);
    writeln!(
        r,
        "Tool: {iperf_version}, one TCP stream, `-t {}`, receiver throughput; {} runs per variant, order rotated every round (sequence, Gbit/s: {})  ",
        args.time,
        args.runs,
        sequence.join(", ")
    )?;
    writeln!(
        r,
        "Overlay: underlay veth MTU {UNDERLAY_MTU}, VXLAN `weft.1` MTU {} (VNI 1, port 8472, programmed by `weft_agent::overlay::reconcile`), pod veths MTU {POD_MTU}; {:.2} GB left node 1 through weft.1 during the overlay runs  ",
        UNDERLAY_MTU - weft_agent::overlay::VXLAN_OVERHEAD,
        vx_tx as f64 / 1e9
    )?;
    writeln!(
        r,
        "Baseline: the same two pod namespaces joined directly by a plain veth pair (no bridge, no routing, no encapsulation)\n"
    )?;
    writeln!(
        r,
        "| path | runs | median | min | max | sender median | retransmits (sum) | CPU client / server (median %) |"
    )?;
    writeln!(r, "|---|---|---|---|---|---|---|---|")?;
    let mut medians = Vec::new();
    for (k, v) in variants.iter().enumerate() {
        let g: Vec<f64> = runs[k].iter().map(|x| x.gbps).collect();
        let s = summarize(&g);
        let min = g.iter().copied().fold(f64::INFINITY, f64::min);
        let snd = summarize(&runs[k].iter().map(|x| x.sender_gbps).collect::<Vec<_>>()).p50;
        let retr: u64 = runs[k].iter().map(|x| x.retransmits).sum();
        let cc = summarize(&runs[k].iter().map(|x| x.cpu_client).collect::<Vec<_>>()).p50;
        let cs = summarize(&runs[k].iter().map(|x| x.cpu_server).collect::<Vec<_>>()).p50;
        writeln!(
            r,
            "| {} | {} | **{:.2} Gbit/s** | {min:.2} | {:.2} | {snd:.2} | {retr} | {cc:.0} / {cs:.0} |",
            v.label(),
            g.len(),
            s.p50,
            s.max
        )?;
        medians.push(s.p50);
    }
    writeln!(r)?;
    writeln!(r, "| ratio (medians) | value | target | met? |")?;
    writeln!(r, "|---|---|---|---|")?;
    for (k, v) in variants.iter().enumerate().skip(1) {
        let ratio = medians[0] / medians[k];
        writeln!(
            r,
            "| VXLAN overlay / {} | **{ratio:.2}x** | >= 0.85x | {} |",
            v.label(),
            if ratio >= 0.85 { "yes" } else { "**no**" }
        )?;
    }
    writeln!(r)?;
    if ethtool_ok {
        writeln!(r, "Offloads (`ethtool -k`, defaults, nothing tuned):\n")?;
        writeln!(r, "| device | {} |", features.join(" | "))?;
        writeln!(r, "|---|{}", "---|".repeat(features.len()))?;
        for (label, vals) in &offloads {
            writeln!(r, "| {label} | {} |", vals.join(" | "))?;
        }
        writeln!(r)?;
    } else {
        writeln!(r, "Offloads: ethtool not installed, not reported.\n")?;
    }
    let vx_line = vx_details
        .lines()
        .find(|l| l.contains("vxlan id"))
        .unwrap_or("")
        .trim();
    writeln!(r, "VXLAN device: `{vx_line}`")?;
    print!("{r}");
    if let Some(out) = &args.out {
        std::fs::write(out, &r).with_context(|| format!("writing {}", out.display()))?;
    }
    drop(_server);
    drop(ns);
    Ok(())
}

fn tx_bytes(ns: &str, dev: &str) -> anyhow::Result<u64> {
    let v: Value = serde_json::from_str(&ip(&["-n", ns, "-s", "-j", "link", "show", dev])?)?;
    v[0]["stats64"]["tx"]["bytes"]
        .as_u64()
        .with_context(|| format!("no tx bytes for {dev}: {v}"))
}

fn iperf(ns: &str, dst: &str, port: &str, secs: u32) -> anyhow::Result<Run> {
    let t = secs.to_string();
    let mut last = String::new();
    // The server takes one test at a time; a busy answer right after the
    // previous test is retried once.
    for _ in 0..2 {
        let out = Command::new("ip")
            .args([
                "netns", "exec", ns, "iperf3", "-c", dst, "-p", port, "-t", &t, "-J",
            ])
            .output()
            .context("running iperf3 -c")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if out.status.success() && v["error"].is_null() {
            let end = &v["end"];
            let f = |p: &Value| p.as_f64().unwrap_or(f64::NAN);
            return Ok(Run {
                gbps: f(&end["sum_received"]["bits_per_second"]) / 1e9,
                sender_gbps: f(&end["sum_sent"]["bits_per_second"]) / 1e9,
                retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
                cpu_client: f(&end["cpu_utilization_percent"]["host_total"]),
                cpu_server: f(&end["cpu_utilization_percent"]["remote_total"]),
            });
        }
        last = format!(
            "{} {}",
            v["error"].as_str().unwrap_or(&text),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    bail!("iperf3 -c {dst} failed: {last}")
}
