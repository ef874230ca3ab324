//! weft-cni-bench: ADD and DEL latency of the weft CNI plugin against the
//! reference `bridge` + `host-local` plugins, side by side on one machine,
//! then N parallel ADDs (and DELs) of weft.
//!
//! Setup: a "node" namespace with the bridge `weft0` (198.18.128.1/24, pinned
//! MAC, as the agent makes it) and weft's node state file; the reference
//! plugin gets its own bridge `cni-ref0` with a host-local range
//! 198.18.129.0/24 in the same node namespace. This process enters the node
//! namespace and executes the plugins directly (no `ip netns exec`), as a
//! runtime does from the host namespace: environment + config on stdin.
//!
//! Serial phase: per iteration two fresh pod namespaces (created before the
//! timed window, deleted after the phase), then weft ADD / reference ADD /
//! weft DEL / reference DEL, the plugin going first alternating per
//! iteration. Each exec is timed from spawn to exit (stdout and stderr read).
//! DEL carries the ADD's result as `prevResult`, as runtimes send it.
//!
//! Parallel phase: P pre-created pod namespaces, P threads released by a
//! barrier, each running one weft ADD; p99 latency and P distinct addresses
//! are checked; then P parallel DELs. The same for the reference plugin,
//! for context.
//!
//! Run by `cargo xtask bench cni`; needs root. `--help` for the knobs.

use anyhow::{bail, ensure, Context};
use clap::Parser;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::Instant;
use weft_e2e::benchnet::{self, ip, summarize, Namespaces};
use weft_e2e::TempDir;

#[derive(Parser, Debug)]
#[command(about = "ADD/DEL latency: weft-cni vs the reference bridge+host-local, interleaved")]
struct Args {
    /// Serial iterations (each: one ADD and one DEL per plugin).
    #[arg(long, default_value_t = 100)]
    iterations: usize,
    /// Untimed iterations before the serial phase (page cache, bridge creation).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Concurrent ADDs (then DELs) in the parallel phase; 0 skips it (at most 253).
    #[arg(long, default_value_t = 200)]
    parallel: usize,
    /// Skip the reference plugin's parallel phase.
    #[arg(long)]
    no_parallel_reference: bool,
    /// Samples of the start-cost probes (VERSION, `ip` exec, veth deletion).
    #[arg(long, default_value_t = 20)]
    probes: usize,
    /// The weft plugin (default: weft-cni next to this binary, i.e. target/release).
    #[arg(long)]
    weft_cni: Option<PathBuf>,
    /// Directory of the reference plugins (`bridge`, `host-local`): CNI_PATH.
    #[arg(long, default_value = "/usr/lib/cni")]
    cni_path: PathBuf,
    /// Also write the report (markdown) to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

const IFNAME: &str = "eth0";
const CNI_VERSION: &str = "1.0.0";
const MTU: u32 = 1450;

#[derive(Clone)]
struct Plugin {
    label: &'static str,
    bin: PathBuf,
    conf: Value,
    cni_path: String,
}

struct Exec {
    ms: f64,
    result: Value,
}

impl Plugin {
    /// Execute once; the stdin bytes are built before the clock starts.
    fn exec(
        &self,
        verb: &str,
        cid: &str,
        netns: &str,
        prev: Option<&Value>,
    ) -> anyhow::Result<Exec> {
        let mut conf = self.conf.clone();
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        let stdin = conf.to_string().into_bytes();
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=pod-{cid};K8S_POD_INFRA_CONTAINER_ID={cid}"
        );
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", verb)
            .env("CNI_CONTAINERID", cid)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", IFNAME)
            .env("CNI_PATH", &self.cni_path)
            .env("CNI_ARGS", args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let t0 = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        // A plugin may exit without reading stdin (VERSION): EPIPE is fine.
        let mut input = child.stdin.take().context("no stdin")?;
        if let Err(e) = input.write_all(&stdin) {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                return Err(e).context("writing the config");
            }
        }
        drop(input);
        let out = child.wait_with_output()?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "{} {verb} {cid} failed ({}): {stdout} {}",
                self.label,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let result = if stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&stdout)
                .with_context(|| format!("{} {verb}: stdout is not JSON: {stdout}", self.label))?
        };
        Ok(Exec { ms, result })
    }

    fn add(&self, cid: &str, ns: &str) -> anyhow::Result<Exec> {
        self.exec("ADD", cid, &format!("/run/netns/{ns}"), None)
    }

    fn del(&self, cid: &str, ns: &str, prev: &Value) -> anyhow::Result<Exec> {
        self.exec("DEL", cid, &format!("/run/netns/{ns}"), Some(prev))
    }
}

fn result_ip(label: &str, r: &Value) -> anyhow::Result<String> {
    r["ips"][0]["address"]
        .as_str()
        .map(|s| s.split('/').next().unwrap_or(s).to_string())
        .with_context(|| format!("{label}: ADD result has no ips[0].address: {r}"))
}

/// Every measurement of the serial phase.
#[derive(Default)]
struct Serial {
    add: [Vec<f64>; 2],
    del: [Vec<f64>; 2],
}

/// One parallel phase of one plugin.
struct Parallel {
    add: Vec<f64>,
    add_wall_ms: f64,
    distinct: usize,
    del: Vec<f64>,
    del_wall_ms: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    benchnet::require_root("weft-cni-bench")?;
    ensure!(
        args.parallel <= 253,
        "--parallel {} does not fit a /24 (253 addresses)",
        args.parallel
    );
    let weft_bin = match &args.weft_cni {
        Some(p) => p.clone(),
        None => weft_e2e::bin("weft-cni")?,
    };
    for p in [
        weft_bin.clone(),
        args.cni_path.join("bridge"),
        args.cni_path.join("host-local"),
    ] {
        ensure!(
            p.exists(),
            "{} is missing (reference plugins: apt-get install containernetworking-plugins, or `cargo xtask setup`)",
            p.display()
        );
    }
    let cni_path = args.cni_path.display().to_string();
    let load_start = benchnet::loadavg();

    // ---------------------------------------------------------------- setup
    let mut nodes = Namespaces::new("wcb");
    let node = nodes.add("node")?;
    for a in [
        vec![
            "-n",
            &node,
            "link",
            "add",
            "weft0",
            "address",
            "02:00:c6:12:80:01",
            "type",
            "bridge",
        ],
        vec![
            "-n",
            &node,
            "addr",
            "add",
            "198.18.128.1/24",
            "dev",
            "weft0",
        ],
        vec!["-n", &node, "link", "set", "weft0", "up"],
    ] {
        ip(&a)?;
    }
    let tmp = TempDir::new("cni-bench");
    let state = tmp.0.join("node.json");
    std::fs::write(
        &state,
        json!({
            "subnet": "198.18.128.0/24", "gateway": "198.18.128.1", "mtu": MTU, "bridge": "weft0",
            "clusterCIDR": "198.18.128.0/17",
            "dns": {"nameservers": ["198.19.0.10"], "search": ["svc.cluster.local", "cluster.local"],
                    "options": ["ndots:5"]}
        })
        .to_string(),
    )?;
    let weft = Plugin {
        label: "weft",
        bin: weft_bin.clone(),
        conf: json!({
            "cniVersion": CNI_VERSION, "name": "weft", "type": "weft-cni",
            "nodeStatePath": state,
            "ipamDir": tmp.0.join("ipam"),
            // no agent in this bench: the socket does not exist, so no notification
            "agentSocket": tmp.0.join("agent.sock"),
        }),
        cni_path: cni_path.clone(),
    };
    let reference = Plugin {
        label: "reference",
        bin: args.cni_path.join("bridge"),
        conf: json!({
            "cniVersion": CNI_VERSION, "name": "wcb-ref", "type": "bridge",
            "bridge": "cni-ref0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
            "mtu": MTU,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "198.18.129.0/24", "gateway": "198.18.129.1"}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": tmp.0.join("ref-ipam"),
            }
        }),
        cni_path,
    };
    let plugins = [weft.clone(), reference.clone()];

    // From here on this thread (and every thread and process it starts) is in
    // the node namespace; `ip netns add/del` work from anywhere.
    benchnet::enter(&node)?;
    let mut pods = Namespaces::new("wcb");

    // ---------------------------------------------------------------- warm-up
    for i in 0..args.warmup {
        for p in &plugins {
            let ns = pods.add(&format!("warm-{}{i}", &p.label[..1]))?;
            let cid = format!("warm-{}-{i}", p.label);
            let r = p.add(&cid, &ns)?;
            p.del(&cid, &ns, &r.result)?;
        }
    }
    pods.clear();

    // ---------------------------------------------------------------- probes
    let mut version = [Vec::new(), Vec::new()];
    let mut ip_exec = Vec::new();
    let mut veth_del = Vec::new();
    for i in 0..args.probes {
        for k in order(i) {
            version[k].push(plugins[k].exec("VERSION", "probe", "dummy", None)?.ms);
        }
        let t0 = Instant::now();
        ip(&["link", "show", "dev", "lo"])?;
        ip_exec.push(t0.elapsed().as_secs_f64() * 1e3);
        let ns = pods.add(&format!("v{i}"))?;
        ip(&[
            "link", "add", "wcbprobe", "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        let t0 = Instant::now();
        ip(&["link", "del", "wcbprobe"])?;
        veth_del.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    pods.clear();

    // ---------------------------------------------------------------- serial
    eprintln!("serial phase: {} iterations", args.iterations);
    let mut serial = Serial::default();
    let mut pair_ratio_add = Vec::new();
    let mut pair_ratio_del = Vec::new();
    for i in 0..args.iterations {
        let netns = [pods.add(&format!("w{i}"))?, pods.add(&format!("r{i}"))?];
        let cid = |k: usize| format!("bench-{}-{i}", plugins[k].label);
        let mut results = [Value::Null, Value::Null];
        let mut add_ms = [0.0; 2];
        let mut del_ms = [0.0; 2];
        for k in order(i) {
            let r = plugins[k].add(&cid(k), &netns[k])?;
            result_ip(plugins[k].label, &r.result)?;
            add_ms[k] = r.ms;
            results[k] = r.result;
        }
        for k in order(i) {
            del_ms[k] = plugins[k].del(&cid(k), &netns[k], &results[k])?.ms;
        }
        for k in 0..2 {
            serial.add[k].push(add_ms[k]);
            serial.del[k].push(del_ms[k]);
        }
        pair_ratio_add.push(add_ms[0] / add_ms[1]);
        pair_ratio_del.push(del_ms[0] / del_ms[1]);
        if (i + 1) % 20 == 0 {
            eprintln!("  {} / {}", i + 1, args.iterations);
        }
    }
    pods.clear();

    // ---------------------------------------------------------------- parallel
    let mut parallel: Vec<(&'static str, Parallel)> = Vec::new();
    if args.parallel > 0 {
        let which: &[usize] = if args.no_parallel_reference {
            &[0]
        } else {
            &[0, 1]
        };
        for &k in which {
            eprintln!(
                "parallel phase: {} x {} ADD, then DEL",
                args.parallel, plugins[k].label
            );
            let res = parallel_phase(&plugins[k], &mut pods, args.parallel, k)?;
            if k == 0 {
                check_weft_clean(&tmp.0.join("ipam").join("weft"))?;
            }
            parallel.push((plugins[k].label, res));
            pods.clear();
        }
    }

    // ---------------------------------------------------------------- report
    let mut r = benchnet::report_header("weft CNI benchmark", &load_start);
    writeln!(
        r,
        "Plugins: weft `{}`; reference `{}` + `host-local` ({})  ",
        weft_bin.display(),
        reference.bin.display(),
        plugin_version(&args.cni_path)
    )?;
    writeln!(r, "Config: cniVersion {CNI_VERSION}, MTU {MTU} on both; weft: bridge weft0 198.18.128.0/24, `ipamFsync` false (default), no agent socket; reference: bridge cni-ref0, `isGateway`, `hairpinMode`, no masquerade, host-local 198.18.129.0/24 with a default route  ")?;
    writeln!(r, "Serial: {} iterations after {} untimed warm-up iterations; each exec timed from spawn to exit, plugin order alternating per iteration\n", args.iterations, args.warmup)?;

    writeln!(r, "| plugin | verb | n | p50 | p90 | p99 | max |")?;
    writeln!(r, "|---|---|---|---|---|---|---|")?;
    for (verb, v) in [("ADD", &serial.add), ("DEL", &serial.del)] {
        for k in 0..2 {
            let s = summarize(&v[k]);
            writeln!(
                r,
                "| {} | {verb} | {} | {} | {} | {} | {} |",
                plugins[k].label,
                s.n,
                f(s.p50),
                f(s.p90),
                f(s.p99),
                f(s.max)
            )?;
        }
    }
    let add_sum: Vec<Vec<f64>> = (0..2)
        .map(|k| {
            serial.add[k]
                .iter()
                .zip(&serial.del[k])
                .map(|(a, d)| a + d)
                .collect()
        })
        .collect();
    for k in 0..2 {
        let s = summarize(&add_sum[k]);
        writeln!(
            r,
            "| {} | ADD+DEL | {} | {} | {} | {} | {} |",
            plugins[k].label,
            s.n,
            f(s.p50),
            f(s.p90),
            f(s.p99),
            f(s.max)
        )?;
    }
    writeln!(r)?;
    writeln!(r, "| verb | weft p50 | reference p50 | **weft / reference** (medians) | median of per-iteration ratios | target | met? |")?;
    writeln!(r, "|---|---|---|---|---|---|---|")?;
    for (verb, v, pr) in [
        ("ADD", &serial.add, &pair_ratio_add),
        ("DEL", &serial.del, &pair_ratio_del),
    ] {
        let (w, rf) = (summarize(&v[0]), summarize(&v[1]));
        let ratio = w.p50 / rf.p50;
        let paired = summarize(pr).p50;
        writeln!(
            r,
            "| {verb} | {} | {} | **{ratio:.2}x** | {paired:.2}x | <= 0.5x | {} |",
            f(w.p50),
            f(rf.p50),
            yes(ratio <= 0.5)
        )?;
    }
    writeln!(r)?;
    writeln!(
        r,
        "Start-cost probes ({} samples each, same node namespace):\n",
        args.probes
    )?;
    writeln!(r, "| probe | p50 | p90 | max |")?;
    writeln!(r, "|---|---|---|---|")?;
    for (name, v) in [
        ("weft VERSION (exec + start + exit)", &version[0]),
        ("reference `bridge` VERSION", &version[1]),
        ("`ip link show dev lo` (exec cost of `ip`)", &ip_exec),
        (
            "`ip link del` of a veth whose peer is in another namespace",
            &veth_del,
        ),
    ] {
        let s = summarize(v);
        writeln!(r, "| {name} | {} | {} | {} |", f(s.p50), f(s.p90), f(s.max))?;
    }
    writeln!(r)?;
    for (label, p) in &parallel {
        let a = summarize(&p.add);
        let d = summarize(&p.del);
        let target = if *label == "weft" {
            "target: no duplicates"
        } else {
            "for context"
        };
        writeln!(r, "Parallel, {label}: {} ADDs released together by a barrier (one thread each, pre-created namespaces), then {} DELs  ", p.add.len(), p.del.len())?;
        writeln!(r)?;
        writeln!(
            r,
            "| {label}, parallel | p50 | p90 | **p99** | max | wall time, all | result |"
        )?;
        writeln!(r, "|---|---|---|---|---|---|---|")?;
        writeln!(
            r,
            "| ADD x{} | {} | {} | **{}** | {} | {} | {} distinct addresses of {} ({target}; {}) |",
            p.add.len(),
            f(a.p50),
            f(a.p90),
            f(a.p99),
            f(a.max),
            f(p.add_wall_ms),
            p.distinct,
            p.add.len(),
            yes(p.distinct == p.add.len())
        )?;
        writeln!(
            r,
            "| DEL x{} | {} | {} | **{}** | {} | {} | all succeeded |",
            p.del.len(),
            f(d.p50),
            f(d.p90),
            f(d.p99),
            f(d.max),
            f(p.del_wall_ms)
        )?;
        writeln!(r)?;
    }
    if parallel.iter().any(|(l, _)| *l == "weft") {
        writeln!(r, "After the weft parallel DELs: no claim left in the IPAM directory, no `weft*` link left on the node.")?;
    }
    print!("{r}");
    if let Some(out) = &args.out {
        std::fs::write(out, &r).with_context(|| format!("writing {}", out.display()))?;
    }
    drop(pods);
    drop(nodes);
    Ok(())
}

/// Which plugin goes first: weft on even iterations, the reference on odd.
fn order(i: usize) -> [usize; 2] {
    if i.is_multiple_of(2) {
        [0, 1]
    } else {
        [1, 0]
    }
}

fn parallel_phase(
    plugin: &Plugin,
    pods: &mut Namespaces,
    n: usize,
    k: usize,
) -> anyhow::Result<Parallel> {
    let names: Vec<String> = (0..n)
        .map(|i| pods.add(&format!("q{k}-{i}")))
        .collect::<anyhow::Result<_>>()?;
    let cids: Vec<String> = (0..n)
        .map(|i| format!("par-{}-{i}", plugin.label))
        .collect();

    let run = |verb: &'static str, prevs: Option<Vec<Value>>| -> anyhow::Result<(Vec<Exec>, f64)> {
        let barrier = Arc::new(Barrier::new(n + 1));
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let plugin = plugin.clone();
                let barrier = barrier.clone();
                let (cid, ns) = (cids[i].clone(), names[i].clone());
                let prev = prevs.as_ref().map(|p| p[i].clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    match prev {
                        None => plugin.add(&cid, &ns),
                        Some(prev) => plugin.del(&cid, &ns, &prev),
                    }
                })
            })
            .collect();
        barrier.wait();
        let released = Instant::now();
        let mut out = Vec::with_capacity(n);
        for h in handles {
            out.push(
                h.join()
                    .map_err(|_| anyhow::anyhow!("{verb} thread panicked"))??,
            );
        }
        Ok((out, released.elapsed().as_secs_f64() * 1e3))
    };

    let (adds, add_wall_ms) = run("ADD", None)?;
    let ips: Vec<String> = adds
        .iter()
        .map(|e| result_ip(plugin.label, &e.result))
        .collect::<anyhow::Result<_>>()?;
    let distinct = ips.iter().collect::<HashSet<_>>().len();
    ensure!(
        distinct == n,
        "{}: {n} parallel ADDs gave only {distinct} distinct addresses",
        plugin.label
    );
    let prevs: Vec<Value> = adds.iter().map(|e| e.result.clone()).collect();
    let (dels, del_wall_ms) = run("DEL", Some(prevs))?;
    Ok(Parallel {
        add: adds.iter().map(|e| e.ms).collect(),
        add_wall_ms,
        distinct,
        del: dels.iter().map(|e| e.ms).collect(),
        del_wall_ms,
    })
}

/// After the parallel DELs: no address claims and no host veths left.
fn check_weft_clean(ipam: &Path) -> anyhow::Result<()> {
    let claims: Vec<String> = std::fs::read_dir(ipam)
        .with_context(|| format!("reading {}", ipam.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
        .collect();
    ensure!(claims.is_empty(), "claims left after DEL: {claims:?}");
    let links = ip(&["-o", "link", "show"])?;
    let left: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .filter(|n| n.starts_with("weft") && !n.starts_with("weft0"))
        .collect();
    ensure!(left.is_empty(), "host veths left after DEL: {left:?}");
    Ok(())
}

fn plugin_version(dir: &Path) -> String {
    let out = Command::new(dir.join("bridge"))
        .env_clear()
        .output()
        .ok()
        .map(|o| {
            let s = String::from_utf8_lossy(&o.stderr).into_owned()
                + &String::from_utf8_lossy(&o.stdout);
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default();
    let pkg = Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "containernetworking-plugins"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            format!(
                "Debian containernetworking-plugins {}",
                String::from_utf8_lossy(&o.stdout)
            )
        })
        .unwrap_or_default();
    if !pkg.is_empty() {
        return pkg;
    }
    [out]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

fn f(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "**no**"
    }
}
