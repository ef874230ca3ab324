//! A simulated cluster out of network namespaces (shared/design.md,
//! "Simulated cluster"), with the real binaries:
//!
//! ```text
//!  <p>-ul: br0 ──┬── v-cp  ═ eth0 (<p>-cp  198.18.0.1)    weft-control :6443
//!                ├── v-n1  ═ eth0 (<p>-n1  198.18.0.11)   weft-agent node-1, weft-workload node-1
//!                ├── v-n2  ═ eth0 (<p>-n2  198.18.0.12)   weft-agent node-2, ...
//!                ├── ...
//!                └── v-ext ═ eth0 (<p>-ext 198.19.255.10) weft-workload external
//!  pods: <p>-p<k>, wired by the real weft-cni run inside their node's namespace
//! ```
//!
//! `<p>` is `wc<pid>x<counter>`, unique per cluster. Every process the
//! cluster starts is killed by pid and every namespace deleted when the
//! [`Cluster`] drops, also when a test panics; logs stay in the run's temp
//! directory (kept with `WEFT_KEEP_TMP`). Only 198.18.0.0/15 addresses are used.

use crate::{bin, node_token, Api, ControlProcess, TempDir};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const CONTROL_IP: &str = "198.18.0.1";
pub const CONTROL_LISTEN: &str = "198.18.0.1:6443";
pub const SERVER: &str = "http://198.18.0.1:6443";
pub const SERVICE_CIDR: &str = "198.19.0.0/16";
pub const CLUSTER_CIDR: &str = "198.18.128.0/17";
pub const CLUSTER_DNS: &str = "198.19.0.10";
/// The external test host (design.md: 198.19.255.0/24).
pub const EXTERNAL_IP: &str = "198.19.255.10";
pub const EXTERNAL_NET: &str = "198.19.255.0/24";
pub const UNDERLAY_NET: &str = "198.18.0.0/24";
/// The ports every workload serves.
pub const HTTP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 9090;
/// The agents' `--resync-seconds` in the harness.
pub const RESYNC_SECONDS: u64 = 2;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Why this machine cannot run a simulated cluster (not root, no `ip`,
/// `ip netns add` fails), or None when it can.
pub fn skip_reason() -> Option<String> {
    static REASON: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    REASON.get_or_init(probe).clone()
}

fn probe() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (the cluster is built from network namespaces)".into());
    }
    let probe = format!("wc{}xprobe", std::process::id());
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Err(e) => return Some(format!("cannot run `ip`: {e}")),
        Ok(o) if !o.status.success() => {
            return Some(format!(
                "`ip netns add` fails: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Ok(_) => {}
    }
    let _ = Command::new("ip").args(["netns", "del", &probe]).output();
    None
}

/// Run `f` on a thread that has joined network namespace `netns`: sockets
/// it creates stay in that namespace (the caller's threads are untouched).
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = std::fs::File::open(format!("/run/netns/{netns}"))
        .with_context(|| format!("opening network namespace {netns}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a valid namespace fd affects only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns({netns}): {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread in {netns} panicked"))?
    })
}

/// A TCP connection to `addr` made from inside `netns`.
pub fn connect_from(netns: &str, addr: SocketAddr) -> Result<TcpStream> {
    let s = in_netns(netns, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(3))
    })?
    .with_context(|| format!("connecting to {addr} from {netns}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// `GET path` over HTTP/1.1 from inside `netns`: the status code and the
/// body, whatever the code (the body checked against Content-Length).
pub fn http_status_bytes(
    netns: &str,
    ip: Ipv4Addr,
    port: u16,
    path: &str,
) -> Result<(u16, Vec<u8>)> {
    let addr = SocketAddr::from((ip, port));
    let mut s = connect_from(netns, addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("reading GET {path} from {addr} (from {netns})"))?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("GET {path} from {addr}: no HTTP header in the answer"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = raw[split + 4..].to_vec();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("GET {path} from {addr}: not HTTP: {head:?}"))?;
    if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|l| l.trim().parse::<usize>().ok())
    {
        if len != body.len() {
            bail!(
                "GET {path} from {addr}: Content-Length {len}, got {} bytes",
                body.len()
            );
        }
    }
    Ok((code, body))
}

/// `GET path` over HTTP/1.1 from inside `netns`; Ok(body) for a 200.
pub fn http_get(netns: &str, ip: Ipv4Addr, port: u16, path: &str) -> Result<Vec<u8>> {
    let (code, body) = http_status_bytes(netns, ip, port, path)?;
    if code != 200 {
        bail!("GET {path} from {ip}:{port} (from {netns}): HTTP {code}");
    }
    Ok(body)
}

/// `GET path` from inside `netns`: the status code and the body as text.
pub fn http_status(netns: &str, ip: Ipv4Addr, port: u16, path: &str) -> Result<(u16, String)> {
    let (code, body) = http_status_bytes(netns, ip, port, path)?;
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

/// What a TCP connect from inside a namespace ran into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Connect {
    Connected,
    /// Refused at once (a TCP reset or an ICMP port unreachable: a REJECT).
    Refused,
    /// No answer within the timeout (a DROP).
    TimedOut,
    Failed(String),
}

/// Try one TCP connection to `addr` from inside `netns`.
pub fn try_connect(netns: &str, addr: SocketAddr, timeout: Duration) -> Connect {
    match in_netns(netns, || TcpStream::connect_timeout(&addr, timeout)) {
        Ok(Ok(_)) => Connect::Connected,
        Ok(Err(e)) => match e.kind() {
            std::io::ErrorKind::ConnectionRefused => Connect::Refused,
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Connect::TimedOut,
            _ => Connect::Failed(e.to_string()),
        },
        Err(e) => Connect::Failed(format!("{e:#}")),
    }
}

/// Poll `f` every 200 ms until it returns Ok or `timeout` passes (then its last error).
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{what}: not within {}s", timeout.as_secs())))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Print `skipped: why` and return true when the cluster tests cannot run here.
pub fn skip() -> bool {
    if let Some(why) = skip_reason() {
        println!("skipped: {why}");
        return true;
    }
    false
}

/// `GET path` as text.
pub fn http_text(netns: &str, ip: Ipv4Addr, port: u16, path: &str) -> Result<String> {
    Ok(String::from_utf8_lossy(&http_get(netns, ip, port, path)?).into_owned())
}

/// Send `payload` to `ip:port` over UDP from inside `netns` and return the
/// answer (up to 3 tries, 2 s each).
pub fn udp_request(netns: &str, ip: Ipv4Addr, port: u16, payload: &[u8]) -> Result<Vec<u8>> {
    let sock = in_netns(netns, || UdpSocket::bind("0.0.0.0:0"))??;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = vec![0u8; 65536];
    let mut last = None;
    for _ in 0..3 {
        sock.send_to(payload, (ip, port))?;
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => return Ok(buf[..n].to_vec()),
            Err(e) => last = Some(e),
        }
    }
    bail!(
        "no UDP answer from {ip}:{port} to {} bytes (from {netns}): {}",
        payload.len(),
        last.map(|e| e.to_string()).unwrap_or_default()
    )
}

/// Run a command, failing with its stderr when it fails.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// Kill and reap a child we started (SIGKILL, by pid).
fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn log_file(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Remove namespaces left by earlier runs whose process is gone (a test
/// binary killed with SIGKILL cannot clean up after itself).
fn remove_stale_namespaces() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name
            .strip_prefix("wc")
            .and_then(|r| r.split_once('x'))
            .and_then(|(p, _)| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(pids) = ip(&["netns", "pids", name]) {
            for p in pids
                .lines()
                .filter_map(|p| p.trim().parse::<i32>().ok())
                .filter(|p| *p as u32 != std::process::id())
            {
                // SAFETY: kill has no memory preconditions.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
        let _ = ip(&["netns", "del", name]);
    }
}

/// Forwards connections accepted on a loopback port of the calling
/// namespace to `target` inside another namespace: how the test process
/// reaches the control plane.
pub struct Forwarder {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Forwarder {
    pub fn start(netns: &str, target: SocketAddr) -> Result<Forwarder> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let ns = std::fs::File::open(format!("/run/netns/{netns}"))
            .with_context(|| format!("opening network namespace {netns}"))?;
        let flag = stop.clone();
        std::thread::Builder::new()
            .name(format!("fwd-{netns}"))
            .spawn(move || {
                // SAFETY: setns on a valid namespace fd affects only this thread.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return;
                }
                drop(ns);
                for conn in listener.incoming() {
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = conn else { continue };
                    // connect() here creates the socket in the target namespace.
                    let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5))
                    else {
                        continue;
                    };
                    splice(client, server);
                }
            })?;
        Ok(Forwarder { addr, stop })
    }
}

fn splice(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    for (mut from, mut to) in [(a, b2), (b, a2)] {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so its thread (and its namespace reference) ends.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// One node: a namespace with an agent and a host workload.
pub struct Node {
    /// `node-1`, ...
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub dir: PathBuf,
    pub state_path: PathBuf,
    pub socket: PathBuf,
    /// The CNI config's `ipamDir` (claims live in `<ipam_base>/weft/`).
    pub ipam_base: PathBuf,
    /// The CNI network config file.
    pub cni_config: PathBuf,
    /// The node's podCIDR once up.
    pub pod_cidr: String,
    agent: Option<Child>,
    /// How many times the agent was started (its log is `agent.<n>.log`).
    pub agent_starts: usize,
    /// Extra flags for the agent's next start.
    pub agent_args: Vec<String>,
    host_workload: Option<Child>,
}

impl Node {
    /// The IPAM directory of the `weft` network, as the agent reads it.
    pub fn ipam_dir(&self) -> PathBuf {
        self.ipam_base.join("weft")
    }

    /// The log of the agent's latest start.
    pub fn agent_log(&self) -> PathBuf {
        self.dir.join(format!("agent.{}.log", self.agent_starts))
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|c| c.id())
    }

    /// The CNI network config the node's runtime uses.
    pub fn cni_conf(&self) -> Value {
        json!({
            "cniVersion": "1.1.0",
            "name": "weft",
            "type": "weft-cni",
            "nodeStatePath": self.state_path,
            "ipamDir": self.ipam_base,
            "agentSocket": self.socket,
        })
    }
}

/// A pod wired by the CNI plugin, with a workload running in it.
#[derive(Clone, Debug)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Index into [`Cluster::nodes`].
    pub node: usize,
    pub netns: String,
    pub container_id: String,
    pub ip: Ipv4Addr,
    /// The CNI ADD result as printed.
    pub cni_result: Value,
}

/// The simulated cluster; tears itself down on drop.
pub struct Cluster {
    pub prefix: String,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    control: Option<ControlProcess>,
    api: Option<Api>,
    rt: tokio::runtime::Runtime,
    /// Namespaces we created, deleted in reverse order.
    namespaces: Vec<String>,
    /// Workloads (the external host; pods' under their container id), killed on drop.
    workloads: Vec<Child>,
    pod_workloads: std::collections::BTreeMap<String, Child>,
    pod_counter: usize,
    known_namespaces: Vec<String>,
    started: Instant,
    // Last: removed after everything above is gone.
    pub tmp: TempDir,
}

impl Cluster {
    /// Bring up a cluster of `nodes` nodes (1..=6), wait until every node has
    /// its podCIDR, its node state file and routes to every peer's subnet.
    pub fn up(nodes: usize) -> Result<Cluster> {
        if !(1..=6).contains(&nodes) {
            bail!("a simulated cluster has 1 to 6 nodes, not {nodes}");
        }
        remove_stale_namespaces();
        let prefix = format!(
            "wc{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let tmp = TempDir::new(&prefix);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut c = Cluster {
            prefix,
            nodes: Vec::new(),
            pods: Vec::new(),
            control: None,
            api: None,
            rt,
            namespaces: Vec::new(),
            workloads: Vec::new(),
            pod_workloads: std::collections::BTreeMap::new(),
            pod_counter: 0,
            known_namespaces: Vec::new(),
            started: Instant::now(),
            tmp,
        };
        c.bring_up(nodes)?;
        eprintln!(
            "cluster {}: {nodes} nodes up in {:.1}s (logs: {})",
            c.prefix,
            c.started.elapsed().as_secs_f64(),
            c.tmp.0.display()
        );
        Ok(c)
    }

    /// The namespace name for `role` (`ul`, `cp`, `n1`, `ext`, `p3`, ...).
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    pub fn external_ns(&self) -> String {
        self.ns("ext")
    }

    pub fn external_ip(&self) -> Ipv4Addr {
        EXTERNAL_IP.parse().expect("constant")
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn bring_up(&mut self, n: usize) -> Result<()> {
        // The underlay.
        let ul = self.ns("ul");
        self.add_netns(&ul)?;
        ip(&["-n", &ul, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &ul, "link", "set", "br0", "up"])?;
        let mut members = vec![("cp".to_string(), format!("{CONTROL_IP}/24"))];
        for i in 1..=n {
            members.push((format!("n{i}"), format!("198.18.0.{}/24", 10 + i)));
        }
        members.push(("ext".to_string(), format!("{EXTERNAL_IP}/24")));
        for (role, addr) in &members {
            let ns = self.ns(role);
            self.add_netns(&ns)?;
            let host_end = format!("v-{role}");
            ip(&[
                "-n", &ul, "link", "add", &host_end, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ])?;
            ip(&["-n", &ul, "link", "set", &host_end, "master", "br0", "up"])?;
            ip(&["-n", &ns, "addr", "add", addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        // The external host and the nodes reach each other directly on the
        // underlay segment (design.md's external test hosts).
        let ext = self.ns("ext");
        ip(&["-n", &ext, "route", "add", UNDERLAY_NET, "dev", "eth0"])?;
        for i in 1..=n {
            let node = self.ns(&format!("n{i}"));
            ip(&["-n", &node, "route", "add", EXTERNAL_NET, "dev", "eth0"])?;
            // Like any real node, a default route (here via the external
            // host): a node's own connections to cluster IPs need a route
            // before the service rules translate them.
            ip(&[
                "-n",
                &node,
                "route",
                "add",
                "default",
                "via",
                EXTERNAL_IP,
                "dev",
                "eth0",
            ])?;
        }

        // The control plane.
        let cp_dir = self.tmp.0.join("control");
        let control = ControlProcess::start_in_netns(
            &cp_dir,
            &self.ns("cp"),
            CONTROL_LISTEN,
            &[
                "--service-cidr",
                SERVICE_CIDR,
                "--cluster-cidr",
                CLUSTER_CIDR,
            ],
        )?;
        self.api = Some(control.admin());
        self.control = Some(control);

        // The external host's workload.
        let child = self.spawn_workload(&ext, "external", &self.tmp.0.join("external.log"))?;
        self.workloads.push(child);

        // Nodes.
        for i in 1..=n {
            let name = format!("node-{i}");
            let dir = self.tmp.0.join(&name);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("token"), format!("{}\n", node_token(&name)))?;
            let mut node = Node {
                netns: self.ns(&format!("n{i}")),
                ip: Ipv4Addr::new(198, 18, 0, 10 + i as u8),
                state_path: dir.join("node.json"),
                socket: dir.join("agent.sock"),
                ipam_base: dir.join("ipam"),
                cni_config: dir.join("weft.conf"),
                pod_cidr: String::new(),
                agent: None,
                agent_starts: 0,
                agent_args: Vec::new(),
                host_workload: None,
                name,
                dir,
            };
            std::fs::write(&node.cni_config, node.cni_conf().to_string())?;
            node.host_workload = Some(self.spawn_workload(
                &node.netns,
                &node.name,
                &node.dir.join("host-workload.log"),
            )?);
            self.nodes.push(node);
            self.start_agent(i - 1)?;
        }
        self.wait_overlay(Duration::from_secs(60))
    }

    /// Wait until every node has a podCIDR, a node state file and a route
    /// to every other node's subnet.
    fn wait_overlay(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.ensure_running()?;
            let last = match self.overlay_ready() {
                Ok(()) => return Ok(()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "cluster {} not up after {}s: {last}",
                    self.prefix,
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn overlay_ready(&mut self) -> Result<()> {
        let list = self.get("/api/v1/nodes")?;
        for node in &mut self.nodes {
            let obj = list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|o| o["metadata"]["name"] == node.name.as_str())
                .with_context(|| format!("{} not registered", node.name))?;
            let cidr = obj["spec"]["podCIDR"].as_str().unwrap_or("");
            if cidr.is_empty() {
                bail!("{} has no podCIDR", node.name);
            }
            node.pod_cidr = cidr.to_string();
            if !node.state_path.exists() {
                bail!("{} has no node state file yet", node.name);
            }
        }
        for node in &self.nodes {
            let routes = ip(&["-n", &node.netns, "route", "show"])?;
            for peer in &self.nodes {
                if peer.name != node.name
                    && !routes
                        .lines()
                        .any(|l| l.starts_with(&format!("{} ", peer.pod_cidr)))
                {
                    bail!(
                        "{} has no route to {}'s {}",
                        node.name,
                        peer.name,
                        peer.pod_cidr
                    );
                }
            }
        }
        Ok(())
    }

    /// Fail with the log's tail if the control plane or an agent exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        for node in &mut self.nodes {
            if let Some(a) = node.agent.as_mut() {
                if let Some(st) = a.try_wait()? {
                    node.agent = None;
                    bail!(
                        "the agent of {} exited ({st}): {}",
                        node.name,
                        tail(&node.agent_log(), 15)
                    );
                }
            }
        }
        Ok(())
    }

    fn spawn_workload(&self, netns: &str, name: &str, log: &Path) -> Result<Child> {
        let log = log_file(log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(bin("weft-workload")?)
            .args(["--name", name])
            .args(["--http", &HTTP_PORT.to_string()])
            .args(["--udp", &UDP_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting weft-workload")?;
        // Ready when it accepts connections.
        let deadline = Instant::now() + Duration::from_secs(10);
        let lo = SocketAddr::from(([127, 0, 0, 1], HTTP_PORT));
        while connect_from(netns, lo).is_err() {
            if Instant::now() > deadline {
                bail!("weft-workload {name} in {netns} does not listen on {HTTP_PORT}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(child)
    }

    /// Start (or restart) node `i`'s agent; its log is a new `agent.<n>.log`.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        if node.agent.is_some() {
            bail!("the agent of {} is running", node.name);
        }
        node.agent_starts += 1;
        let log = log_file(&node.agent_log())?;
        let child = Command::new("ip")
            .args(["netns", "exec", &node.netns])
            .arg(bin("weft-agent")?)
            .args(["--server", SERVER, "--token-file"])
            .arg(node.dir.join("token"))
            .args(["--node-name", &node.name])
            .args(["--node-ip", &node.ip.to_string()])
            .args(["--cluster-cidr", CLUSTER_CIDR, "--cluster-dns", CLUSTER_DNS])
            .arg("--node-state")
            .arg(&node.state_path)
            .arg("--socket")
            .arg(&node.socket)
            .arg("--ipam-dir")
            .arg(node.ipam_dir())
            .args(["--resync-seconds", &RESYNC_SECONDS.to_string()])
            // Each simulated node is its own host: its own xtables lock (the
            // default /run/xtables.lock is shared by every namespace).
            .env("XTABLES_LOCKFILE", node.dir.join("xtables.lock"))
            .args(&node.agent_args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting weft-agent")?;
        node.agent = Some(child);
        Ok(())
    }

    /// SIGKILL node `i`'s agent (as a crash would) and reap it.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut a) = self.nodes[i].agent.take() {
            kill(&mut a);
        }
    }

    /// The text of node `i`'s current agent log.
    pub fn agent_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.nodes[i].agent_log()).unwrap_or_default()
    }

    // ---- the API ----

    fn api(&self) -> Result<&Api> {
        self.api.as_ref().context("no control plane")
    }

    fn call(&self, method: hyper::Method, path: &str, body: Option<Value>) -> Result<Value> {
        let api = self.api()?.clone();
        let m = method.clone();
        let res = self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(10), api.req(m, path, body)).await
        });
        match res {
            Err(_) => bail!("{method} {path}: no answer within 10s"),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(f)) => bail!(
                "{method} {path}: HTTP {}: {}",
                f.code,
                f.status["message"]
                    .as_str()
                    .unwrap_or(&f.status.to_string())
            ),
        }
    }

    /// Admin GET.
    pub fn get(&self, path: &str) -> Result<Value> {
        self.call(hyper::Method::GET, path, None)
    }
    /// Admin POST.
    pub fn post(&self, path: &str, body: Value) -> Result<Value> {
        self.call(hyper::Method::POST, path, Some(body))
    }
    /// Admin PUT.
    pub fn put(&self, path: &str, body: Value) -> Result<Value> {
        self.call(hyper::Method::PUT, path, Some(body))
    }
    /// GET, change, PUT (retried on a conflict).
    pub fn update(&self, path: &str, mut change: impl FnMut(&mut Value)) -> Result<Value> {
        let mut last = None;
        for _ in 0..5 {
            let mut obj = self.get(path)?;
            change(&mut obj);
            match self.put(path, obj) {
                Ok(v) => return Ok(v),
                Err(e) if format!("{e:#}").contains("HTTP 409") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("PUT {path}: conflicts")))
    }
    /// Admin DELETE.
    pub fn delete(&self, path: &str) -> Result<Value> {
        self.call(hyper::Method::DELETE, path, None)
    }

    /// The control plane's data/log directory.
    pub fn control_dir(&self) -> PathBuf {
        self.tmp.0.join("control")
    }

    fn ensure_namespace(&mut self, ns: &str) -> Result<()> {
        if self.known_namespaces.iter().any(|n| n == ns) {
            return Ok(());
        }
        if self.get(&format!("/api/v1/namespaces/{ns}")).is_err() {
            self.post(
                "/api/v1/namespaces",
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            )?;
        }
        self.known_namespaces.push(ns.to_string());
        Ok(())
    }

    // ---- pods ----

    /// Create Pod `ns/name` bound to node `node` (index), wire it with the
    /// real CNI plugin as a runtime does, and start its workload.
    pub fn add_pod(
        &mut self,
        node: usize,
        ns: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<Pod> {
        self.add_pod_with(node, ns, name, labels, None)
    }

    /// [`Cluster::add_pod`] with CNI `runtimeConfig.portMappings` (hostPorts),
    /// as a runtime passes them.
    pub fn add_pod_with(
        &mut self,
        node: usize,
        ns: &str,
        name: &str,
        labels: &[(&str, &str)],
        port_mappings: Option<Value>,
    ) -> Result<Pod> {
        self.ensure_namespace(ns)?;
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect();
        let node_name = self.nodes[node].name.clone();
        let created = self.post(
            &format!("/api/v1/namespaces/{ns}/pods"),
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": labels},
                "spec": {
                    "nodeName": node_name,
                    "containers": [{
                        "name": "app", "image": "weft-workload",
                        "ports": [
                            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
                            {"name": "udp", "containerPort": UDP_PORT, "protocol": "UDP"}
                        ]
                    }]
                }
            }),
        )?;
        let uid = created["metadata"]["uid"]
            .as_str()
            .unwrap_or("")
            .to_string();
        self.pod_counter += 1;
        let k = self.pod_counter;
        let netns = self.ns(&format!("p{k}"));
        self.add_netns(&netns)?;
        let container_id = format!("{}-{k}-{name}", self.prefix);
        let cni_args =
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID={uid}");
        let mut pod = Pod {
            namespace: ns.to_string(),
            name: name.to_string(),
            uid,
            node,
            netns: netns.clone(),
            container_id: container_id.clone(),
            ip: Ipv4Addr::UNSPECIFIED,
            cni_result: Value::Null,
        };
        let runtime = port_mappings.map(|m| json!({"portMappings": m}));
        let out = self.cni_with(node, "ADD", &container_id, &netns, &cni_args, runtime)?;
        // From here on the pod holds an address: DEL it on drop whatever happens.
        self.pods.push(pod.clone());
        if !out.status.success() {
            bail!(
                "CNI ADD for {ns}/{name} on {node_name} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let result: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("CNI ADD printed no JSON for {ns}/{name}"))?;
        let addr = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse::<Ipv4Addr>().ok())
            .with_context(|| format!("CNI ADD result has no ips[0].address: {result}"))?;
        pod.ip = addr;
        pod.cni_result = result;
        *self.pods.last_mut().expect("pushed above") = pod.clone();
        let log = self.tmp.0.join(format!("pod-{ns}-{name}.log"));
        let child = self.spawn_workload(&netns, name, &log)?;
        self.pod_workloads.insert(container_id, child);
        Ok(pod)
    }

    /// Delete the Pod object (`grace` seconds of graceful termination, during
    /// which its endpoints are terminating; 0 = at once). The pod keeps
    /// running and wired until [`Cluster::unwire_pod`].
    pub fn delete_pod(&self, pod: &Pod, grace: u32) -> Result<()> {
        self.delete(&format!(
            "/api/v1/namespaces/{}/pods/{}?gracePeriodSeconds={grace}",
            pod.namespace, pod.name
        ))?;
        Ok(())
    }

    /// Stop the pod as its runtime would: kill its workload, CNI DEL, delete
    /// its network namespace (and the Pod object if still there).
    pub fn unwire_pod(&mut self, pod: &Pod) -> Result<()> {
        if let Some(mut w) = self.pod_workloads.remove(&pod.container_id) {
            kill(&mut w);
        }
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={}",
            pod.namespace, pod.name, pod.uid
        );
        let out = self.cni(pod.node, "DEL", &pod.container_id, &pod.netns, &args)?;
        if !out.status.success() {
            bail!(
                "CNI DEL of {}/{}: {}",
                pod.namespace,
                pod.name,
                String::from_utf8_lossy(&out.stdout)
            );
        }
        self.pods.retain(|p| p.container_id != pod.container_id);
        ip(&["netns", "del", &pod.netns])?;
        self.namespaces.retain(|n| n != &pod.netns);
        let _ = self.delete(&format!(
            "/api/v1/namespaces/{}/pods/{}?gracePeriodSeconds=0",
            pod.namespace, pod.name
        ));
        Ok(())
    }

    /// Set the pod's Ready condition (as a kubelet's readiness probe would).
    pub fn set_pod_ready(&self, pod: &Pod, ready: bool) -> Result<()> {
        let path = format!("/api/v1/namespaces/{}/pods/{}", pod.namespace, pod.name);
        let mut obj = self.get(&path)?;
        let status = if ready { "True" } else { "False" };
        let conds = obj["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut conds: Vec<Value> = conds.into_iter().filter(|c| c["type"] != "Ready").collect();
        conds.push(json!({"type": "Ready", "status": status}));
        obj["status"]["conditions"] = Value::Array(conds);
        self.put(&format!("{path}/status"), obj)?;
        Ok(())
    }

    /// Run the CNI plugin inside node `node`'s namespace, as a runtime does.
    fn cni(
        &self,
        node: usize,
        command: &str,
        container_id: &str,
        netns: &str,
        cni_args: &str,
    ) -> Result<Output> {
        self.cni_with(node, command, container_id, netns, cni_args, None)
    }

    /// [`Cluster::cni`] with a `runtimeConfig` added to the network config.
    fn cni_with(
        &self,
        node: usize,
        command: &str,
        container_id: &str,
        netns: &str,
        cni_args: &str,
        runtime_config: Option<Value>,
    ) -> Result<Output> {
        let n = &self.nodes[node];
        let plugin = bin("weft-cni")?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &n.netns])
            .arg(&plugin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env(
                "CNI_NETNS",
                if netns.is_empty() {
                    String::new()
                } else {
                    format!("/run/netns/{netns}")
                },
            )
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", plugin.parent().unwrap_or(Path::new("/")))
            .env("CNI_ARGS", cni_args)
            .env("WEFT_CNI_LOG", n.dir.join("cni.log"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting weft-cni")?;
        let mut conf = std::fs::read(&n.cni_config)?;
        if let Some(rc) = runtime_config {
            let mut v: Value = serde_json::from_slice(&conf)?;
            v["runtimeConfig"] = rc;
            conf = v.to_string().into_bytes();
        }
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(&conf)?;
        }
        Ok(child.wait_with_output()?)
    }

    // ---- commands ----

    /// Run `args` inside network namespace `netns` (`ip netns exec`).
    pub fn exec(&self, netns: &str, args: &[&str]) -> Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", netns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {args:?} in {netns}"))
    }

    /// Like [`Cluster::exec`], Ok(stdout) only when the command succeeds.
    pub fn sh(&self, netns: &str, args: &[&str]) -> Result<String> {
        run(Command::new("ip").args(["netns", "exec", netns]).args(args))
    }

    /// Node `i`'s overlay as the kernel holds it: routes, the VXLAN
    /// device's neighbours and FDB entries.
    pub fn overlay_state(&self, i: usize) -> Result<String> {
        let ns = &self.nodes[i].netns;
        Ok(format!(
            "# ip route\n{}# ip neigh show dev weft.1\n{}# bridge fdb show dev weft.1\n{}",
            self.sh(ns, &["ip", "route", "show"])?,
            self.sh(ns, &["ip", "neigh", "show", "dev", "weft.1"])?,
            self.sh(ns, &["bridge", "fdb", "show", "dev", "weft.1"])?,
        ))
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            let kept = if std::env::var_os("WEFT_KEEP_TMP").is_some() {
                "kept"
            } else {
                "removed; set WEFT_KEEP_TMP=1 to keep them"
            };
            eprintln!(
                "cluster {}: test failed; logs in {} ({kept})",
                self.prefix,
                self.tmp.0.display()
            );
            for node in &self.nodes {
                eprintln!(
                    "--- {} ({}):\n{}",
                    node.name,
                    node.agent_log().display(),
                    tail(&node.agent_log(), 12)
                );
            }
            let cl = self.control_dir().join("control.log");
            eprintln!("--- control ({}):\n{}", cl.display(), tail(&cl, 12));
        }
        for w in self
            .workloads
            .iter_mut()
            .chain(self.pod_workloads.values_mut())
        {
            kill(w);
        }
        for node in &mut self.nodes {
            if let Some(w) = node.host_workload.as_mut() {
                kill(w);
            }
        }
        // Pods: CNI DEL, their namespace, their API object.
        let pods = std::mem::take(&mut self.pods);
        for p in pods.iter().rev() {
            let args = format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={}",
                p.namespace, p.name, p.uid
            );
            match self.cni(p.node, "DEL", &p.container_id, &p.netns, &args) {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "cluster {}: CNI DEL of {}/{} failed: {}",
                    self.prefix,
                    p.namespace,
                    p.name,
                    String::from_utf8_lossy(&o.stdout)
                ),
                Err(e) => eprintln!("cluster {}: CNI DEL of {}: {e:#}", self.prefix, p.name),
            }
            if self.control.is_some() {
                let _ = self.delete(&format!(
                    "/api/v1/namespaces/{}/pods/{}",
                    p.namespace, p.name
                ));
            }
        }
        for node in &mut self.nodes {
            if let Some(mut a) = node.agent.take() {
                kill(&mut a);
            }
        }
        self.api = None;
        if let Some(mut c) = self.control.take() {
            c.kill9();
        }
        for ns in self.namespaces.iter().rev() {
            // Anything still running in it (a client a test started) goes too.
            if let Ok(pids) = ip(&["netns", "pids", ns]) {
                for p in pids
                    .lines()
                    .filter_map(|p| p.trim().parse::<i32>().ok())
                    .filter(|p| *p as u32 != std::process::id())
                {
                    // SAFETY: kill has no memory preconditions.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cluster {}: {e:#}", self.prefix);
            }
        }
    }
}
