//! "Restart and upgrade without loss" on the eBPF dataplane, end to end: a
//! 2-node cluster, a ClusterIP HTTP Service with backends on both nodes and
//! a UDP echo Service on the same pods. From a client pod on node-1 run,
//! all the time:
//! - `wrk` against the HTTP ClusterIP: every request is a new connection
//!   (the workload answers `Connection: close`), so each goes through the
//!   connect program;
//! - a 10 Hz UDP probe against the UDP ClusterIP from an unconnected socket:
//!   every datagram goes through the sendmsg and recvmsg programs;
//! - a 10 Hz TCP probe (connect, `GET /hostname`): wrk times requests from
//!   their first byte written, so a connect that hangs on a dropped SYN
//!   shows up in none of its counters; the probe sees it as a retransmission.
//!
//! Meanwhile node-1's agent is killed with SIGKILL and started again, five
//! times, with traffic running for 2 s without any agent each time. Nothing
//! may be lost: no wrk socket error or bad status, no lost, late or
//! misaddressed probe. Each restarted agent must have replaced the programs
//! in their pinned links (none attached anew: no instant without a program)
//! and adopted the pinned maps. Without root or cgroup v2 the test prints
//! `skipped: <why>`; without wrk it fails (`cargo xtask setup` installs it).

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use weft_e2e::cluster::{
    cgroup_skip_reason, enter_node_cgroup, eventually, http_status, http_text, in_netns, tail,
    udp_request, Cluster, Dataplane, Pod,
};

const NS: &str = "restart";
const WAIT: Duration = Duration::from_secs(20);
/// The agents' `--health-listen` port (on the node's address).
const HEALTH_PORT: u16 = 10256;
const CYCLES: usize = 5;
/// How long traffic runs with no agent at all, each cycle.
const AGENT_DOWN: Duration = Duration::from_millis(2000);
/// How long traffic runs with the restarted (synced) agent before the next kill.
const AGENT_UP: Duration = Duration::from_millis(2000);
/// And after the last restart, on top: the agent checks its pinned links
/// every 5 s (`--check-seconds`).
const LAST_AGENT_UP: Duration = Duration::from_millis(4000);
const PROBE_EVERY: Duration = Duration::from_millis(100);
const PROBE_WAIT: Duration = Duration::from_millis(500);
/// The socket programs every restart must find in their pinned links.
const SOCKET_PROGRAMS: [&str; 4] = [
    "weft_connect4",
    "weft_sendmsg4",
    "weft_recvmsg4",
    "weft_getpeername4",
];

#[test]
fn ebpf_agent_kill_9_and_restart_lose_nothing() -> Result<()> {
    if let Some(why) = cgroup_skip_reason() {
        println!("skipped: {why}");
        return Ok(());
    }
    ensure_wrk()?;
    let t0 = Instant::now();
    let mut c = Cluster::up_with(2, Dataplane::Ebpf)?;
    let w1 = c.add_pod(0, NS, "web-1", &[("app", "web")])?;
    let w2 = c.add_pod(1, NS, "web-2", &[("app", "web")])?;
    let w3 = c.add_pod(1, NS, "web-3", &[("app", "web")])?;
    let client = c.add_pod(0, NS, "client", &[("app", "client")])?;
    let web: Vec<String> = [&w1, &w2, &w3].iter().map(|p| p.name.clone()).collect();

    let http = service(
        &c,
        "web",
        json!({"selector": {"app": "web"},
               "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}]}),
    )?;
    let echo = service(
        &c,
        "echo",
        json!({"selector": {"app": "web"},
               "ports": [{"name": "udp", "port": 7, "protocol": "UDP", "targetPort": "udp"}]}),
    )?;
    let (http_vip, udp_vip) = (cluster_ip(&http)?, cluster_ip(&echo)?);
    // Every backend programmed on node-1 before the traffic starts.
    eventually("all HTTP backends reachable", WAIT, || {
        let mut seen = Vec::new();
        for _ in 0..30 {
            let h = http_text(&client.netns, http_vip, 80, "/hostname")?;
            let h = h.trim().to_string();
            ensure!(web.contains(&h), "answered by {h}");
            if !seen.contains(&h) {
                seen.push(h);
            }
        }
        ensure!(
            seen.len() == web.len(),
            "30 connections reached only {seen:?}"
        );
        Ok(())
    })?;
    eventually("UDP echo reachable", WAIT, || {
        let answer = udp_request(&client.netns, udp_vip, 7, b"hello")?;
        let answer = String::from_utf8_lossy(&answer).into_owned();
        ensure!(
            web.iter().any(|n| answer == format!("{n}:hello")),
            "{answer:?}"
        );
        Ok(())
    })?;
    wait_synced(&mut c, 0)?;
    let setup = t0.elapsed();

    let udp = Prober::start(
        "udp-probe",
        &client,
        SocketAddr::from((udp_vip, 7)),
        web.clone(),
        udp_probe,
    )?;
    let tcp = Prober::start(
        "tcp-probe",
        &client,
        SocketAddr::from((http_vip, 80)),
        web.clone(),
        tcp_probe,
    )?;
    let wrk = Wrk::start(&client, &format!("http://{http_vip}:80/hostname"))?;
    let traffic = Instant::now();
    std::thread::sleep(AGENT_UP);
    // (killed, started) instants: the windows with no agent on node-1.
    let mut down = Vec::new();
    for cycle in 1..=CYCLES {
        let killed = Instant::now();
        c.kill_agent(0);
        std::thread::sleep(AGENT_DOWN);
        let started = Instant::now();
        c.start_agent(0)?;
        let synced = wait_synced(&mut c, 0)
            .with_context(|| format!("cycle {cycle}: the restarted agent never synced"))?;
        down.push((killed, started));
        println!(
            "cycle {cycle}: agent down {:.1}s, synced {:.1}s after its start (agent.{}.log)",
            (started - killed).as_secs_f64(),
            synced.as_secs_f64(),
            c.nodes[0].agent_starts
        );
        std::thread::sleep(AGENT_UP);
    }
    // The last agent past its first periodic check of the kernel.
    std::thread::sleep(LAST_AGENT_UP);
    let wrk = wrk.stop();
    let probes = [("UDP", udp.stop()?), ("TCP", tcp.stop()?)];
    let ran = traffic.elapsed();

    let mut failures = Vec::new();
    let (wrk_text, wrk_report) = match wrk {
        Ok(text) => {
            let report = parse_wrk(&text);
            (text, report)
        }
        Err(e) => (String::new(), Err(e)),
    };
    match &wrk_report {
        Ok(r) => {
            if r.socket_errors() > 0 {
                failures.push(format!(
                    "wrk socket errors: connect {}, read {}, write {}, timeout {}",
                    r.connect, r.read, r.write, r.timeout
                ));
            }
            if r.bad_status > 0 {
                failures.push(format!("wrk: {} non-2xx/3xx responses", r.bad_status));
            }
            if r.requests < 1000 {
                failures.push(format!("wrk made only {} requests", r.requests));
            }
            // It ran until it was stopped, through every restart.
            if r.seconds + 1.0 < ran.as_secs_f64() {
                failures.push(format!(
                    "wrk ran {:.1}s of the {:.1}s with traffic",
                    r.seconds,
                    ran.as_secs_f64()
                ));
            }
        }
        Err(e) => failures.push(format!("wrk: {e:#}")),
    }
    let mut probe_summary = Vec::new();
    for (what, results) in &probes {
        let lost: Vec<&ProbeResult> = results.iter().filter(|p| p.outcome.is_err()).collect();
        for p in lost.iter().take(10) {
            failures.push(format!(
                "{what} probe {} at +{:.2}s ({}): {}",
                p.seq,
                (p.at - traffic).as_secs_f64(),
                if in_windows(p.at, &down) {
                    "no agent"
                } else {
                    "agent up"
                },
                p.outcome.as_ref().err().map(String::as_str).unwrap_or("")
            ));
        }
        if lost.len() > 10 {
            failures.push(format!("... {} {what} probes lost in all", lost.len()));
        }
        let answered_down = results
            .iter()
            .filter(|p| p.outcome.is_ok() && in_windows(p.at, &down))
            .count();
        // Traffic really ran while no agent was there.
        if answered_down == 0 {
            failures.push(format!(
                "no {what} probe was answered while the agent was down"
            ));
        }
        probe_summary.push(format!(
            "{what} probe {} sent, {} lost ({answered_down} answered with no agent)",
            results.len(),
            lost.len()
        ));
    }
    let mut frontends = Vec::new();
    for start in 2..=c.nodes[0].agent_starts {
        let path = c.nodes[0].dir.join(format!("agent.{start}.log"));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        match restart_log(&text) {
            Ok(r) => {
                let missing: Vec<&str> = SOCKET_PROGRAMS
                    .into_iter()
                    .filter(|p| !r.replaced.iter().any(|q| q == p))
                    .collect();
                if !missing.is_empty() || !r.attached.is_empty() {
                    failures.push(format!(
                        "{}: replaced {:?}, attached anew {:?}: {missing:?} not replaced in their pinned links",
                        path.display(),
                        r.replaced,
                        r.attached
                    ));
                }
                if r.frontends == 0 {
                    failures.push(format!(
                        "{}: adopted no frontends from the pinned maps",
                        path.display()
                    ));
                }
                frontends.push(r.frontends);
            }
            Err(e) => failures.push(format!("{}: {e:#}", path.display())),
        }
    }

    let (requests, errors) = match &wrk_report {
        Ok(r) => (r.requests.to_string(), r.socket_errors() + r.bad_status),
        Err(_) => ("?".into(), 0),
    };
    println!(
        "{CYCLES} agent kill -9/restart cycles: wrk {requests} requests, {errors} errors; \
         {}; {:.1}s of traffic, {:.1}s setup; frontends adopted per restart {frontends:?}",
        probe_summary.join("; "),
        ran.as_secs_f64(),
        setup.as_secs_f64(),
    );
    if !failures.is_empty() {
        bail!(
            "lost traffic or no in-place restart:\n  {}\n--- wrk:\n{wrk_text}\n--- node-1's dataplane now:\n{}",
            failures.join("\n  "),
            dataplane_state(&c, 0)
        );
    }
    Ok(())
}

fn service(c: &Cluster, name: &str, spec: Value) -> Result<Value> {
    c.post(
        &format!("/api/v1/namespaces/{NS}/services"),
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": NS}, "spec": spec}),
    )
}

fn cluster_ip(svc: &Value) -> Result<Ipv4Addr> {
    svc["spec"]["clusterIP"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no clusterIP in {}", svc["spec"]))
}

fn ensure_wrk() -> Result<()> {
    match Command::new("wrk")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => Ok(()),
        Err(e) => bail!("wrk cannot run ({e}): run `cargo xtask setup`, which installs it"),
    }
}

/// Wait until node `i`'s current agent has programmed the dataplane once
/// (`/healthz` 200 with a `lastUpdated`: a fresh agent answers 200 before
/// its first sync too). How long it took.
fn wait_synced(c: &mut Cluster, i: usize) -> Result<Duration> {
    let start = Instant::now();
    let (netns, ip) = (c.nodes[i].netns.clone(), c.nodes[i].ip);
    eventually(&format!("{} synced", c.nodes[i].name), WAIT, || {
        c.ensure_running()?;
        let (code, body) = http_status(&netns, ip, HEALTH_PORT, "/healthz")?;
        let v: Value = serde_json::from_str(&body).with_context(|| format!("/healthz: {body}"))?;
        ensure!(
            code == 200 && !v["lastUpdated"].is_null(),
            "/healthz: {code} {body}"
        );
        Ok(())
    })?;
    Ok(start.elapsed())
}

fn in_windows(t: Instant, windows: &[(Instant, Instant)]) -> bool {
    windows.iter().any(|(a, b)| *a <= t && t < *b)
}

/// What bpftool sees of node `i`'s dataplane, and its agent log's tail.
fn dataplane_state(c: &Cluster, i: usize) -> String {
    let node = &c.nodes[i];
    let mut cmds: Vec<Vec<String>> = Vec::new();
    if let Some(cg) = &node.cgroup {
        cmds.push(vec![
            "cgroup".into(),
            "show".into(),
            cg.display().to_string(),
        ]);
    }
    let mut pins: Vec<_> = std::fs::read_dir(node.bpffs.join("links"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    pins.sort();
    for pin in pins {
        cmds.push(vec![
            "link".into(),
            "show".into(),
            "pinned".into(),
            pin.display().to_string(),
        ]);
    }
    let mut map_dirs: Vec<_> = std::fs::read_dir(&node.bpffs)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("maps-v"))
                })
                .collect()
        })
        .unwrap_or_default();
    map_dirs.sort();
    for pin in map_dirs
        .iter()
        .flat_map(|d| ["WEFT_SVC", "WEFT_BE"].map(|m| d.join(m)))
    {
        cmds.push(vec![
            "map".into(),
            "dump".into(),
            "pinned".into(),
            pin.display().to_string(),
        ]);
    }
    let mut out = String::new();
    for args in cmds {
        out.push_str(&format!("# bpftool {}\n", args.join(" ")));
        match Command::new("bpftool").args(&args).output() {
            Ok(o) => {
                out.push_str(&String::from_utf8_lossy(&o.stdout));
                out.push_str(&String::from_utf8_lossy(&o.stderr));
            }
            Err(e) => out.push_str(&format!("cannot run bpftool: {e}\n")),
        }
    }
    if let Ok(overlay) = c.overlay_state(i) {
        out.push_str(&overlay);
    }
    out.push_str(&format!(
        "# {}\n{}\n",
        node.agent_log().display(),
        tail(&node.agent_log(), 20)
    ));
    out
}

// ---- wrk ----

/// wrk running in a pod (its namespace and its node's cgroup); killed on drop.
struct Wrk {
    child: Child,
}

impl Wrk {
    /// Start wrk with a duration longer than the test: [`Wrk::stop`] ends it.
    fn start(pod: &Pod, url: &str) -> Result<Wrk> {
        let mut cmd = Command::new("ip");
        enter_node_cgroup(&mut cmd, &pod.netns)?;
        let child = cmd
            .args(["netns", "exec", &pod.netns])
            .args([
                "wrk",
                "-t1",
                "-c4",
                "-d300s",
                "--timeout",
                "2s",
                "--latency",
            ])
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting wrk (run `cargo xtask setup` if it is missing)")?;
        Ok(Wrk { child })
    }

    /// SIGINT (wrk stops and prints its report, `ip netns exec` having
    /// exec'd it), then its output.
    fn stop(mut self) -> Result<String> {
        if let Some(st) = self.child.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = self.child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            bail!("wrk exited early ({st}): {err}");
        }
        let pid = i32::try_from(self.child.id()).context("pid")?;
        // SAFETY: kill has no memory preconditions; the pid is our child's,
        // not yet reaped.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(st) = self.child.try_wait()? {
                break st;
            }
            if Instant::now() > deadline {
                bail!("wrk did not stop within 15s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let (mut out, mut err) = (String::new(), String::new());
        if let Some(mut o) = self.child.stdout.take() {
            o.read_to_string(&mut out)?;
        }
        if let Some(mut e) = self.child.stderr.take() {
            e.read_to_string(&mut err)?;
        }
        ensure!(status.success(), "wrk: {status}: {out}{err}");
        Ok(out)
    }
}

impl Drop for Wrk {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What wrk reported.
#[derive(Debug, Default, PartialEq)]
struct WrkReport {
    requests: u64,
    /// How long it ran.
    seconds: f64,
    connect: u64,
    read: u64,
    write: u64,
    timeout: u64,
    /// `Non-2xx or 3xx responses`.
    bad_status: u64,
}

impl WrkReport {
    fn socket_errors(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout
    }
}

/// Parse wrk's text report: `N requests in T, ...` (required), `Socket
/// errors: connect A, read B, write C, timeout D` and `Non-2xx or 3xx
/// responses: N` (printed only when not zero).
fn parse_wrk(text: &str) -> Result<WrkReport> {
    let mut r = WrkReport::default();
    let mut saw_requests = false;
    for line in text.lines().map(str::trim) {
        if let Some((n, rest)) = line.split_once(" requests in ") {
            r.requests = n.trim().parse().with_context(|| format!("wrk: {line:?}"))?;
            let t = rest.split(',').next().unwrap_or("").trim();
            r.seconds = wrk_seconds(t).with_context(|| format!("wrk duration in {line:?}"))?;
            saw_requests = true;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            let mut seen = 0;
            for item in rest.split(',') {
                let (name, n) = item
                    .trim()
                    .split_once(' ')
                    .with_context(|| format!("wrk: {line:?}"))?;
                let n: u64 = n.trim().parse().with_context(|| format!("wrk: {line:?}"))?;
                match name {
                    "connect" => r.connect = n,
                    "read" => r.read = n,
                    "write" => r.write = n,
                    "timeout" => r.timeout = n,
                    other => bail!("wrk: unknown socket error kind {other:?} in {line:?}"),
                }
                seen += 1;
            }
            ensure!(seen == 4, "wrk: {line:?}");
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.bad_status = rest
                .trim()
                .parse()
                .with_context(|| format!("wrk: {line:?}"))?;
        }
    }
    ensure!(
        saw_requests,
        "no `N requests in` line in wrk's output:\n{text}"
    );
    Ok(r)
}

/// wrk's duration format: `28.53s`, `1.02m`, `950.00ms`, `2.00h`.
fn wrk_seconds(t: &str) -> Result<f64> {
    let split = t
        .find(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
        .with_context(|| format!("no unit in {t:?}"))?;
    let (n, unit) = t.split_at(split);
    let n: f64 = n.parse().with_context(|| format!("{t:?}"))?;
    Ok(match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => bail!("unknown unit {other:?} in {t:?}"),
    })
}

// ---- the agent's log ----

/// What a restarted agent logged about its programs and maps.
#[derive(Debug, PartialEq)]
struct RestartLog {
    /// Programs swapped into their pinned links (BPF_LINK_UPDATE).
    replaced: Vec<String>,
    /// Programs attached through a new link.
    attached: Vec<String>,
    /// Frontends found in the pinned service map.
    frontends: u64,
}

/// From the `eBPF socket programs in place ... attached=[..] replaced=[..]`
/// and `adopting the pinned service maps frontends=N` lines.
fn restart_log(text: &str) -> Result<RestartLog> {
    let programs = text
        .lines()
        .find(|l| l.contains("eBPF socket programs in place"))
        .context("no \"eBPF socket programs in place\" line")?;
    let adopt = text
        .lines()
        .find(|l| l.contains("adopting the pinned service maps"))
        .context("no \"adopting the pinned service maps\" line")?;
    let frontends = field(adopt, "frontends")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no frontends=N in {adopt:?}"))?;
    Ok(RestartLog {
        replaced: list_field(programs, "replaced")?,
        attached: list_field(programs, "attached")?,
        frontends,
    })
}

/// The value of `name=value` (up to the next space) in a log line.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    line[start..].split(' ').next()
}

/// `name=["a", "b"]` (a Debug-printed list) in a log line.
fn list_field(line: &str, name: &str) -> Result<Vec<String>> {
    let key = format!(" {name}=[");
    let start = line
        .find(&key)
        .with_context(|| format!("no {name}=[..] in {line:?}"))?
        + key.len();
    let end = line[start..]
        .find(']')
        .with_context(|| format!("unterminated {name}=[.. in {line:?}"))?;
    Ok(line[start..start + end]
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .collect())
}

// ---- the probes ----

struct ProbeResult {
    seq: u64,
    /// When it was sent.
    at: Instant,
    /// Ok, or why it counts as lost.
    outcome: std::result::Result<(), String>,
}

/// What one probe does: Ok when answered in full, without loss.
type ProbeFn = fn(u64, SocketAddr, &[String], &mut ProbeState) -> std::result::Result<(), String>;

/// State a probe keeps from one round to the next (the UDP socket).
#[derive(Default)]
struct ProbeState {
    udp: Option<UdpSocket>,
}

/// A probe every [`PROBE_EVERY`] from a thread inside a pod (its network
/// namespace and its node's cgroup, through `in_netns`), until stopped.
struct Prober {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Vec<ProbeResult>>>>,
}

impl Prober {
    fn start(
        what: &str,
        pod: &Pod,
        to: SocketAddr,
        backends: Vec<String>,
        probe: ProbeFn,
    ) -> Result<Prober> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let netns = pod.netns.clone();
        let thread = std::thread::Builder::new()
            .name(what.into())
            .spawn(move || in_netns(&netns, || probe_loop(probe, to, &backends, &flag)))?;
        Ok(Prober {
            stop,
            thread: Some(thread),
        })
    }

    fn stop(mut self) -> Result<Vec<ProbeResult>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .context("stopped twice")?
            .join()
            .map_err(|_| anyhow::anyhow!("a probe thread panicked"))?
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn probe_loop(
    probe: ProbeFn,
    to: SocketAddr,
    backends: &[String],
    stop: &AtomicBool,
) -> Vec<ProbeResult> {
    let mut results = Vec::new();
    let mut state = ProbeState::default();
    let mut next = Instant::now();
    for seq in 0u64.. {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next = Instant::now().max(next) + PROBE_EVERY;
        let at = Instant::now();
        let outcome = probe(seq, to, backends, &mut state);
        results.push(ProbeResult { seq, at, outcome });
    }
    results
}

/// One datagram from an unconnected socket (each one through the sendmsg
/// program); the answer `<backend>:<payload>` must come within
/// [`PROBE_WAIT`] and from the ClusterIP itself (the recvmsg program shows
/// the frontend, not the backend). Late answers to earlier probes are skipped.
fn udp_probe(
    seq: u64,
    to: SocketAddr,
    backends: &[String],
    state: &mut ProbeState,
) -> std::result::Result<(), String> {
    if state.udp.is_none() {
        state.udp = Some(UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("bind: {e}"))?);
    }
    let sock = state.udp.as_ref().expect("set above");
    let payload = format!("probe-{seq}");
    sock.send_to(payload.as_bytes(), to)
        .map_err(|e| format!("send: {e}"))?;
    let deadline = Instant::now() + PROBE_WAIT;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no answer within {}ms", PROBE_WAIT.as_millis()));
        }
        sock.set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let answer = String::from_utf8_lossy(&buf[..n]);
                let Some((who, echoed)) = answer.split_once(':') else {
                    return Err(format!("answer {answer:?} from {from}"));
                };
                if echoed != payload {
                    continue;
                }
                if from != to {
                    return Err(format!("answer from {from}, not the ClusterIP {to}"));
                }
                if !backends.iter().any(|b| b == who) {
                    return Err(format!("answered by {who:?}, not a backend"));
                }
                return Ok(());
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("recv: {e}")),
        }
    }
}

/// One new connection and `GET /hostname`. wrk cannot see a connect that
/// hangs (it times only requests, from their first byte written), so this
/// probe does: the connection must not have retransmitted anything (a SYN
/// dropped because the Service was untranslated costs a 1 s retransmit, and
/// still succeeds), and getpeername must show the ClusterIP.
fn tcp_probe(
    _seq: u64,
    to: SocketAddr,
    backends: &[String],
    _state: &mut ProbeState,
) -> std::result::Result<(), String> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))
        .map_err(|e| format!("connect: {e} after {:?}", started.elapsed()))?;
    let connected = started.elapsed();
    let peer = s.peer_addr().map_err(|e| format!("getpeername: {e}"))?;
    if peer != to {
        return Err(format!("getpeername shows {peer}, not the ClusterIP {to}"));
    }
    let io = |e: std::io::Error| format!("{e} (connected in {connected:?})");
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(io)?;
    write!(
        s,
        "GET /hostname HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(io)?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not HTTP: {raw:?}"))?;
    if !head.starts_with("HTTP/1.1 200 ") || !backends.iter().any(|b| b == body.trim()) {
        return Err(format!("answer {head:?} {body:?}"));
    }
    let retransmitted = total_retrans(&s).map_err(|e| format!("TCP_INFO: {e}"))?;
    if retransmitted > 0 {
        return Err(format!(
            "{retransmitted} segment(s) retransmitted (connected in {connected:?})"
        ));
    }
    Ok(())
}

/// `tcpi_total_retrans` of a TCP socket.
fn total_retrans(s: &TcpStream) -> std::io::Result<u32> {
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket fd, a buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info.tcpi_total_retrans)
}

#[cfg(test)]
mod parsers {
    use super::*;

    const WRK: &str = "\
Running 5m test @ http://198.19.0.17:80/hostname
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   580.12us    1.03ms  41.27ms   97.80%
    Req/Sec     7.31k   612.40     8.46k    71.33%
  Latency Distribution
     50%  440.00us
     75%  610.00us
     90%  850.00us
     99%    3.21ms
  213456 requests in 29.84s, 17.31MB read
  Socket errors: connect 1, read 2, write 3, timeout 4
  Non-2xx or 3xx responses: 5
Requests/sec:   7153.35
Transfer/sec:    594.19KB
";

    #[test]
    fn wrk_report_with_errors() {
        let r = parse_wrk(WRK).unwrap();
        assert_eq!(
            r,
            WrkReport {
                requests: 213456,
                seconds: 29.84,
                connect: 1,
                read: 2,
                write: 3,
                timeout: 4,
                bad_status: 5,
            }
        );
        assert_eq!(r.socket_errors(), 10);
    }

    #[test]
    fn wrk_report_clean_and_broken() {
        // wrk leaves out the error lines when there are none.
        let clean: String = WRK
            .lines()
            .filter(|l| !l.contains("errors") && !l.contains("Non-2xx"))
            .map(|l| format!("{l}\n"))
            .collect();
        let r = parse_wrk(&clean).unwrap();
        assert_eq!(
            (r.requests, r.socket_errors(), r.bad_status),
            (213456, 0, 0)
        );
        assert_eq!(
            parse_wrk(&clean.replace("29.84s", "1.50m"))
                .unwrap()
                .seconds,
            90.0
        );
        assert!(parse_wrk("unable to connect to 198.19.0.17:80 Connection refused").is_err());
        assert!(parse_wrk(&WRK.replace("read 2", "read two")).is_err());
    }

    #[test]
    fn agent_restart_lines() {
        let log = "\
2025-01-01T00:00:00.000001Z  INFO weft_agent::dataplane::ebpf: eBPF socket programs in place cgroup=/sys/fs/cgroup/unified/x bpffs=/tmp/b attached=[] replaced=[\"weft_connect4\", \"weft_sendmsg4\"]
2025-01-01T00:00:00.000002Z  INFO weft_agent::dataplane::ebpf: adopting the pinned service maps frontends=2 backends=6
";
        let r = restart_log(log).unwrap();
        assert_eq!(r.replaced, ["weft_connect4", "weft_sendmsg4"]);
        assert!(r.attached.is_empty());
        assert_eq!(r.frontends, 2);
        assert!(restart_log("nothing here").is_err());
    }
}
