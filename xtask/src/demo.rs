//! `cargo xtask demo`: a three-node weft cluster in network namespaces on
//! this machine, using only the address plan of shared/design.md:
//! underlay 198.18.0.0/24, pods 198.18.128.0/17, services 198.19.0.0/16.
//!
//! ```text
//!  wd<pid>-ul: br0 ──┬── v-cp ═ eth0 (wd<pid>-cp 198.18.0.1)  weft-control :6443
//!                    ├── v-n1 ═ eth0 (wd<pid>-n1 198.18.0.11) weft-agent node-1
//!                    ├── v-n2 ═ eth0 (wd<pid>-n2 198.18.0.12) weft-agent node-2
//!                    ├── v-n3 ═ eth0 (wd<pid>-n3 198.18.0.13) weft-agent node-3
//!                    └── v-ext ═ eth0 (wd<pid>-ext 198.19.255.10) weft-workload --dns 53
//! ```
//!
//! Every pod of examples/demo.yaml gets a namespace `wd<pid>-p<k>`, is wired
//! by the real `weft-cni` (CNI ADD run in its node's namespace, as a runtime
//! does), gets the CNI result's DNS as its resolv.conf
//! (/etc/netns/wd<pid>-p<k>/resolv.conf, which `ip netns exec` bind-mounts)
//! and runs `weft-workload` (HTTP 8080, UDP echo 9090); the agents report
//! the pods' addresses to the control plane, and the checks send traffic
//! between pods across nodes and resolve names from the pods. Every agent
//! answers cluster DNS on 198.19.0.10 in its node and forwards other names
//! to the "external" host (198.19.255.10, design.md's external test range),
//! which answers `example.test` and below with its own address.
//!
//! Everything it creates is owned by a guard that tears it down on drop
//! (success, error or Ctrl-C); `--keep` leaves it running and `--down`
//! removes what earlier `--keep` runs (or killed runs) left behind.

use crate::{setup, util};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where runs record what they started, for `demo --down`.
const RUN_DIR: &str = "/run/weft-demo";
const CP_IP: &str = "198.18.0.1";
const API: &str = "198.18.0.1:6443";
const SERVER: &str = "http://198.18.0.1:6443";
const UNDERLAY_PREFIX: u8 = 24;
const SERVICE_CIDR: &str = "198.19.0.0/16";
const CLUSTER_CIDR: &str = "198.18.128.0/17";
const DNS_IP: &str = "198.19.0.10";
const ZONE: &str = "cluster.local";
const UNDERLAY_NET: &str = "198.18.0.0/24";
/// The external host: the agents' DNS upstream (design.md: 198.19.255.0/24).
const EXTERNAL_IP: &str = "198.19.255.10";
const EXTERNAL_NET: &str = "198.19.255.0/24";
const NODES: usize = 3;
const MANIFEST: &str = "examples/demo.yaml";

/// What the demo's manifest should produce: ready endpoints per Service.
const EXPECTED_ENDPOINTS: &[(&str, &str, usize)] =
    &[("shop", "web", 3), ("shop", "api", 2), ("shop", "db", 1)];

pub struct Options {
    pub keep: bool,
    pub down: bool,
    pub no_setup: bool,
}

pub fn run(opts: Options) -> Result<()> {
    if opts.down {
        return down();
    }
    if !util::is_root() {
        bail!(
            "the demo builds a cluster out of network namespaces and needs root; \
             run it as root (e.g. `sudo -E cargo xtask demo`)"
        );
    }
    util::trap_interrupts();
    if !opts.no_setup {
        setup::run(false)?;
    }
    util::run(util::cargo().args([
        "build",
        "--bins",
        "-p",
        "weft-control",
        "-p",
        "weft-agent",
        "-p",
        "netctl",
        "-p",
        "weft-cni",
        "-p",
        "weft-e2e",
    ]))?;
    util::check_interrupted()?;

    let started = Instant::now();
    let mut demo = Demo::new()?;
    let result = demo.run(opts.keep);
    match result {
        Ok(()) => {
            eprintln!("demo: finished in {:.1}s", started.elapsed().as_secs_f64());
            Ok(())
        }
        Err(e) => {
            if util::check_interrupted().is_ok() {
                demo.print_logs();
            }
            Err(e)
            // `demo` drops here: processes, namespaces and the temp dir go.
        }
    }
}

/// One node of the demo cluster.
struct NodeSpec {
    /// 1-based.
    n: usize,
}

impl NodeSpec {
    fn name(&self) -> String {
        format!("node-{}", self.n)
    }
    fn ip(&self) -> String {
        format!("198.18.0.{}", 10 + self.n)
    }
    fn role(&self) -> String {
        format!("n{}", self.n)
    }
}

fn nodes() -> Vec<NodeSpec> {
    (1..=NODES).map(|n| NodeSpec { n }).collect()
}

/// A check shown in the summary.
struct Check {
    ok: bool,
    text: String,
    detail: String,
}

fn check(ok: bool, text: impl Into<String>, detail: impl Into<String>) -> Check {
    Check {
        ok,
        text: text.into(),
        detail: detail.into(),
    }
}

/// The last `view updated` line of an agent log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct AgentView {
    rev: u64,
    services: usize,
    nodes: usize,
    subnet: String,
}

/// A pod of the manifest, wired with the real CNI plugin.
struct PodRun {
    namespace: String,
    name: String,
    uid: String,
    /// 1-based node number.
    node: usize,
    container_id: String,
    netns: String,
    /// The CNI result's address (empty until ADD succeeded).
    ip: String,
    gateway: String,
    workload: Option<Child>,
}

/// The demo cluster; tears itself down on drop unless kept.
struct Demo {
    prefix: String,
    tmp: PathBuf,
    bins: PathBuf,
    record: PathBuf,
    namespaces: Vec<String>,
    control: Option<Child>,
    agents: Vec<Child>,
    /// `weft-workload --dns 53` on the external host.
    external: Option<Child>,
    pods: Vec<PodRun>,
    keep: bool,
    /// The view revision every agent agreed on before the restart check.
    view_rev: Option<u64>,
}

impl Demo {
    fn new() -> Result<Demo> {
        let prefix = format!("wd{}", std::process::id());
        let tmp = std::env::temp_dir().join(format!("weft-demo-{prefix}"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("removing a stale {}", tmp.display()))?;
        }
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .create(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        std::fs::create_dir_all(RUN_DIR).with_context(|| format!("creating {RUN_DIR}"))?;
        let demo = Demo {
            record: Path::new(RUN_DIR).join(format!("{prefix}.state")),
            prefix,
            tmp,
            bins: util::target_dir().join("debug"),
            namespaces: Vec::new(),
            control: None,
            agents: Vec::new(),
            external: None,
            pods: Vec::new(),
            keep: false,
            view_rev: None,
        };
        demo.save_record();
        Ok(demo)
    }

    fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.bins.join(name)
    }

    /// Record what this run owns so `demo --down` can remove it if we cannot.
    fn save_record(&self) {
        let mut s = format!("dir {}\n", self.tmp.display());
        if self.keep {
            s.push_str("kept\n");
        }
        for ns in &self.namespaces {
            let _ = writeln!(s, "netns {ns}");
        }
        for c in self
            .control
            .iter()
            .chain(&self.agents)
            .chain(&self.external)
        {
            let _ = writeln!(s, "pid {}", c.id());
        }
        for c in self.pods.iter().filter_map(|p| p.workload.as_ref()) {
            let _ = writeln!(s, "pid {}", c.id());
        }
        if let Err(e) = std::fs::write(&self.record, s) {
            eprintln!("demo: cannot write {}: {e}", self.record.display());
        }
    }

    fn run(&mut self, keep: bool) -> Result<()> {
        self.network()?;
        self.start_external()?;
        self.write_tokens()?;
        self.start_control()?;
        self.wait_api(Duration::from_secs(20))?;
        self.write_cni_configs()?;
        self.start_agents()?;
        self.wait_nodes(Duration::from_secs(30))?;

        let mut apply = self.netctl(&["apply", "-f", MANIFEST]);
        util::run(&mut apply)?;
        self.wire_pods()?;
        let pod_ips = self.wait_pod_ips(Duration::from_secs(20));
        let pod_ips_ok = pod_ips.ok;
        let mut checks = vec![pod_ips];
        if pod_ips_ok {
            self.wait_slices(Duration::from_secs(20))?;
        }

        let state = self.snapshot()?;
        checks.extend(self.checks(&state)?);
        checks.extend(self.traffic_checks());
        checks.extend(self.service_checks(&state));
        checks.extend(self.dns_checks(&state));
        checks.extend(self.restart_checks(&state)?);
        print_summary(&self.prefix, &state, &checks);
        // What an operator on node-1 sees of the overlay.
        let mut overlay = Command::new("ip");
        overlay
            .args(["netns", "exec", &self.ns("n1")])
            .arg(self.bin("netctl"))
            .args(["overlay", "--socket"])
            .arg(self.tmp.join("node-1.agent.sock"));
        match util::capture(&mut overlay) {
            Ok(text) => {
                println!("\n$ netctl overlay   # on node-1");
                print!("{text}");
            }
            Err(e) => println!("\nnetctl overlay on node-1 failed: {e:#}"),
        }
        // How node-1 treats a pod's connection to shop/web's cluster IP, and
        // how a pod there resolves `web` (the agent answers 198.19.0.10:53
        // itself: the dataplane leaves that port alone, nothing to trace).
        let client = self
            .pods
            .iter()
            .find(|p| p.node == 1 && !p.name.starts_with("web-"))
            .or_else(|| self.pods.iter().find(|p| p.node == 1));
        let web_ip = state
            .services
            .iter()
            .find(|s| ns_name(s) == "shop/web")
            .map(|s| str_at(s, "/spec/clusterIP").to_string());
        if let (Some(client), Some(web_ip)) = (client, web_ip) {
            let from = format!("pod:{}", client.ip);
            let to = format!("{web_ip}:80");
            let mut trace = Command::new("ip");
            trace
                .args(["netns", "exec", &self.ns("n1")])
                .arg(self.bin("netctl"))
                .args(["trace", &from, &to, "-p", "TCP", "--socket"])
                .arg(self.tmp.join("node-1.agent.sock"));
            match util::capture(&mut trace) {
                Ok(text) => {
                    println!(
                        "\n$ netctl trace {from} {to} -p TCP   # on node-1, {} -> shop/web",
                        client.name
                    );
                    print!("{text}");
                }
                Err(e) => println!("\nnetctl trace on node-1 failed: {e:#}"),
            }
            let pod = format!("{}/{}", client.namespace, client.name);
            let mut dns = Command::new("ip");
            dns.args(["netns", "exec", &self.ns("n1")])
                .arg(self.bin("netctl"))
                .args(["dns", "web", "--from", &pod, "--node-state"])
                .arg(self.tmp.join("node-1.node.json"))
                .arg("--ipam-dir")
                .arg(self.tmp.join("ipam-1").join("weft"));
            match util::capture(&mut dns) {
                Ok(text) => {
                    println!("\n$ netctl dns web --from {pod}   # on node-1");
                    print!("{text}");
                }
                Err(e) => println!("\nnetctl dns on node-1 failed: {e:#}"),
            }
        }
        let failed = checks.iter().filter(|c| !c.ok).count();
        if failed > 0 {
            bail!("{failed} demo check(s) failed (see above)");
        }
        if keep {
            self.keep = true;
            self.save_record();
            let netctl = self.bin("netctl");
            println!();
            println!("The cluster keeps running (--keep). Reach it with:");
            println!(
                "  ip netns exec {} {} --server {SERVER} --token-file {} get svc -A",
                self.ns("cp"),
                netctl.display(),
                self.tmp.join("admin.token").display()
            );
            println!(
                "Logs: {}/control.log, {}/agent-N.log",
                self.tmp.display(),
                self.tmp.display()
            );
            if let (Some(c), Some(s)) = (
                self.pods.iter().find(|p| p.node == 1),
                self.pods.iter().find(|p| p.node == 2),
            ) {
                println!(
                    "From pod {} to pod {}: ip netns exec {} curl http://{}:8080/hostname",
                    c.name, s.name, c.netns, s.ip
                );
                println!(
                    "Resolve from pod {}: ip netns exec {} getent hosts web   (or dig web.shop.svc.{ZONE})",
                    c.name, c.netns
                );
            }
            println!("Clean up: cargo xtask demo --down");
        }
        Ok(())
    }

    // ---- the underlay ----

    fn add_netns(&mut self, name: &str) -> Result<()> {
        util::run(Command::new("ip").args(["netns", "add", name]))?;
        self.namespaces.push(name.to_string());
        self.save_record();
        Ok(())
    }

    fn network(&mut self) -> Result<()> {
        let ul = self.ns("ul");
        self.add_netns(&ul)?;
        ip(&["-n", &ul, "link", "set", "lo", "up"])?;
        ip(&["-n", &ul, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &ul, "link", "set", "br0", "up"])?;
        let mut members = vec![("cp".to_string(), format!("{CP_IP}/{UNDERLAY_PREFIX}"))];
        members.extend(
            nodes()
                .iter()
                .map(|n| (n.role(), format!("{}/{UNDERLAY_PREFIX}", n.ip()))),
        );
        members.push(("ext".to_string(), format!("{EXTERNAL_IP}/24")));
        for (role, addr) in members {
            util::check_interrupted()?;
            let ns = self.ns(&role);
            self.add_netns(&ns)?;
            let host_end = format!("v-{role}");
            // Created in the underlay namespace; the peer lands in the member's.
            ip(&[
                "-n", &ul, "link", "add", &host_end, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ])?;
            ip(&["-n", &ul, "link", "set", &host_end, "master", "br0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        // The external host and the nodes reach each other directly on the
        // underlay segment, as the e2e harness has it.
        ip(&[
            "-n",
            &self.ns("ext"),
            "route",
            "add",
            UNDERLAY_NET,
            "dev",
            "eth0",
        ])?;
        for node in nodes() {
            ip(&[
                "-n",
                &self.ns(&node.role()),
                "route",
                "add",
                EXTERNAL_NET,
                "dev",
                "eth0",
            ])?;
        }
        Ok(())
    }

    /// The external host: `weft-workload` (HTTP 8080, UDP echo 9090) with a
    /// DNS server on 53 (A records for example.test and below, its own
    /// address; NXDOMAIN otherwise), the agents' `--dns-upstream`.
    fn start_external(&mut self) -> Result<()> {
        let args: Vec<String> = [
            "--name", "external", "--http", "8080", "--udp", "9090", "--dns", "53",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let child = self.spawn(
            &self.ns("ext"),
            "external.log",
            &self.bin("weft-workload"),
            &args,
        )?;
        self.external = Some(child);
        self.save_record();
        self.wait_for(
            &format!("the external host's DNS on {EXTERNAL_IP}:53"),
            Duration::from_secs(10),
            |d| {
                let log = std::fs::read_to_string(d.tmp.join("external.log")).unwrap_or_default();
                if log.contains("dns on 53") {
                    Ok(Some(()))
                } else {
                    Err(format!("external.log: {:?}", log.trim()))
                }
            },
        )
    }

    // ---- credentials ----

    fn write_tokens(&self) -> Result<()> {
        let admin = format!("admin-demo-{}", util::random_hex(12)?);
        let mut file = format!("{admin},admin,1,\"system:masters\"\n");
        write_secret(&self.tmp.join("admin.token"), &format!("{admin}\n"))?;
        write_secret(
            &self.tmp.join("admin.hdr"),
            &format!("Authorization: Bearer {admin}\n"),
        )?;
        for node in nodes() {
            let name = node.name();
            let tok = format!("tok-{name}-{}", util::random_hex(12)?);
            let _ = writeln!(file, "{tok},system:node:{name},{name},\"system:nodes\"");
            write_secret(&self.tmp.join(format!("{name}.token")), &format!("{tok}\n"))?;
            write_secret(
                &self.tmp.join(format!("{name}.hdr")),
                &format!("Authorization: Bearer {tok}\n"),
            )?;
        }
        write_secret(&self.tmp.join("tokens"), &file)
    }

    // ---- processes ----

    /// Start `program` inside `netns`, stderr appended to `log`, in its own
    /// process group (Ctrl-C reaches us, and our guard stops it).
    fn spawn(&self, netns: &str, log: &str, program: &Path, args: &[String]) -> Result<Child> {
        let log_path = self.tmp.join(log);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns])
            .arg(program)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        util::echo(&cmd);
        eprintln!("  (log: {})", log_path.display());
        cmd.spawn()
            .with_context(|| format!("starting `{}`", util::display(&cmd)))
    }

    fn start_control(&mut self) -> Result<()> {
        let args: Vec<String> = [
            "--listen",
            API,
            "--data-dir",
            &self.tmp.join("data").to_string_lossy(),
            "--token-file",
            &self.tmp.join("tokens").to_string_lossy(),
            "--service-cidr",
            SERVICE_CIDR,
            "--cluster-cidr",
            CLUSTER_CIDR,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let child = self.spawn(
            &self.ns("cp"),
            "control.log",
            &self.bin("weft-control"),
            &args,
        )?;
        self.control = Some(child);
        self.save_record();
        Ok(())
    }

    fn start_agents(&mut self) -> Result<()> {
        for node in nodes() {
            let args: Vec<String> = [
                "--server",
                SERVER,
                "--token-file",
                &self
                    .tmp
                    .join(format!("{}.token", node.name()))
                    .to_string_lossy(),
                "--node-name",
                &node.name(),
                "--node-ip",
                &node.ip(),
                "--cluster-cidr",
                "198.18.128.0/17",
                "--cluster-dns",
                DNS_IP,
                // Names outside the cluster go to the external host.
                "--dns-upstream",
                &format!("{EXTERNAL_IP}:53"),
                "--node-state",
                &self
                    .tmp
                    .join(format!("{}.node.json", node.name()))
                    .to_string_lossy(),
                "--socket",
                &self
                    .tmp
                    .join(format!("{}.agent.sock", node.name()))
                    .to_string_lossy(),
                "--ipam-dir",
                &self
                    .tmp
                    .join(format!("ipam-{}", node.n))
                    .join("weft")
                    .to_string_lossy(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let child = self.spawn(
                &self.ns(&node.role()),
                &format!("agent-{}.log", node.n),
                &self.bin("weft-agent"),
                &args,
            )?;
            self.agents.push(child);
            self.save_record();
        }
        Ok(())
    }

    /// Fail (with the log) if a process we started has exited.
    fn ensure_running(&mut self) -> Result<()> {
        if let Some(c) = self.control.as_mut() {
            if let Some(st) = c.try_wait()? {
                bail!(
                    "weft-control exited ({st}); its log:\n{}",
                    util::tail(&self.tmp.join("control.log"), 20)
                );
            }
        }
        if let Some(c) = self.external.as_mut() {
            if let Some(st) = c.try_wait()? {
                bail!(
                    "the external host's weft-workload exited ({st}); its log:\n{}",
                    util::tail(&self.tmp.join("external.log"), 20)
                );
            }
        }
        for (i, a) in self.agents.iter_mut().enumerate() {
            if let Some(st) = a.try_wait()? {
                bail!(
                    "the weft-agent of node-{} exited ({st}); its log:\n{}",
                    i + 1,
                    util::tail(&self.tmp.join(format!("agent-{}.log", i + 1)), 20)
                );
            }
        }
        Ok(())
    }

    /// Poll `ready` every 250 ms until it returns Some, the deadline passes
    /// (error naming `what` and the last reason), or a process dies.
    fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut(&mut Demo) -> Result<Option<T>, String>,
    ) -> Result<T> {
        eprintln!("demo: waiting for {what} (up to {}s)", timeout.as_secs());
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            self.ensure_running()?;
            match ready(self) {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(why) => last = why,
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {}s waiting for {what}{}",
                    timeout.as_secs(),
                    if last.is_empty() {
                        String::new()
                    } else {
                        format!(": {last}")
                    }
                );
            }
            util::sleep(Duration::from_millis(250))?;
        }
    }

    fn wait_api(&mut self, timeout: Duration) -> Result<()> {
        self.wait_for(
            &format!("the API on {API} (`netctl get ns`)"),
            timeout,
            |d| {
                util::capture(&mut d.netctl(&["get", "ns"]))
                    .map(|_| Some(()))
                    .map_err(|e| format!("{e:#}"))
            },
        )
    }

    // ---- API access ----

    /// `ip netns exec <cp> netctl --server ... --token-file admin.token ARGS`.
    fn netctl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns("cp")])
            .arg(self.bin("netctl"))
            .args(["--server", SERVER, "--token-file"])
            .arg(self.tmp.join("admin.token"))
            .args(args)
            .current_dir(util::root());
        cmd
    }

    /// Every object of `kind` across namespaces, as the API returns them.
    fn list(&self, kind: &str) -> Result<Vec<Value>> {
        let out = util::capture(&mut self.netctl(&["get", kind, "-A", "-o", "json"]))?;
        let v: Value = serde_json::from_str(&out)
            .with_context(|| format!("`netctl get {kind} -A -o json` printed no JSON list"))?;
        Ok(v["items"].as_array().cloned().unwrap_or_default())
    }

    /// An HTTP request to the API with curl from inside `netns`, as the
    /// identity whose header file is `who` (`admin`, `node-1`, ...).
    fn http(
        &self,
        netns: &str,
        who: &str,
        method: &str,
        path: &str,
        body: Option<&Value>,
        echo: bool,
    ) -> Result<(u16, String)> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, "curl", "-sS", "--max-time", "10"])
            .args(["-X", method, "-H"])
            .arg(format!(
                "@{}",
                self.tmp.join(format!("{who}.hdr")).display()
            ))
            .args(["-o", "-", "-w", r"\n%{http_code}"]);
        if let Some(body) = body {
            let file = self.tmp.join("body.json");
            std::fs::write(&file, serde_json::to_vec(body)?)?;
            cmd.args(["-H", "Content-Type: application/json", "--data-binary"])
                .arg(format!("@{}", file.display()));
        }
        cmd.arg(format!("{SERVER}{path}"));
        let out = if echo {
            util::output(&mut cmd)?
        } else {
            util::capture(&mut cmd)?
        };
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", out.as_str()));
        let code: u16 = code
            .trim()
            .parse()
            .with_context(|| format!("curl printed no status code for {method} {path}"))?;
        Ok((code, body.to_string()))
    }

    // ---- bringing the cluster up ----

    /// Wait until the 3 nodes are registered with a podCIDR; returns them.
    fn wait_nodes(&mut self, timeout: Duration) -> Result<Vec<Value>> {
        self.wait_for(
            &format!("{NODES} nodes with a POD-CIDR (`netctl get nodes`)"),
            timeout,
            |d| {
                let items = d.list("nodes").map_err(|e| format!("{e:#}"))?;
                let with_cidr = items
                    .iter()
                    .filter(|n| !str_at(n, "/spec/podCIDR").is_empty())
                    .count();
                if with_cidr == NODES {
                    Ok(Some(items))
                } else {
                    Err(format!("{with_cidr} of {NODES} nodes have a podCIDR"))
                }
            },
        )
    }

    // ---- pods, wired as a runtime would ----

    /// The CNI network config for node `n` (docs/cni.md).
    fn cni_config_path(&self, n: usize) -> PathBuf {
        self.tmp.join(format!("node-{n}.cni.json"))
    }

    fn write_cni_configs(&self) -> Result<()> {
        for node in nodes() {
            let conf = json!({
                "cniVersion": "1.1.0",
                "name": "weft",
                "type": "weft-cni",
                "nodeStatePath": self.tmp.join(format!("{}.node.json", node.name())),
                "ipamDir": self.tmp.join(format!("ipam-{}", node.n)),
                "agentSocket": self.tmp.join(format!("{}.agent.sock", node.name())),
            });
            let path = self.cni_config_path(node.n);
            std::fs::write(&path, serde_json::to_vec_pretty(&conf)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    /// Run `weft-cni` inside node `node`'s namespace with the CNI environment
    /// and the node's config on stdin.
    fn cni(&self, pod: &PodRun, command: &str) -> Result<std::process::Output> {
        use std::io::Write;
        let spec = NodeSpec { n: pod.node };
        let plugin = self.bin("weft-cni");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(&spec.role())])
            .arg(&plugin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &pod.container_id)
            .env("CNI_NETNS", format!("/run/netns/{}", pod.netns))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.bins)
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={}",
                    pod.namespace, pod.name, pod.uid
                ),
            )
            .env(
                "WEFT_CNI_LOG",
                self.tmp.join(format!("cni-{}.log", pod.node)),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting `{}`", util::display(&cmd)))?;
        let conf = std::fs::read(self.cni_config_path(pod.node))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(&conf)?;
        }
        Ok(child.wait_with_output()?)
    }

    /// For every pod of the manifest: a network namespace, CNI ADD on its
    /// node, and `weft-workload` inside it. The agents report the pods'
    /// addresses to the control plane themselves.
    fn wire_pods(&mut self) -> Result<()> {
        let pods = self.list("pods")?;
        println!(
            "demo: wiring {} pods with weft-cni (CNI ADD in the node's namespace)",
            pods.len()
        );
        for (i, pod) in pods.iter().enumerate() {
            util::check_interrupted()?;
            let k = i + 1;
            let namespace = str_at(pod, "/metadata/namespace").to_string();
            let name = str_at(pod, "/metadata/name").to_string();
            let node = str_at(pod, "/spec/nodeName").to_string();
            let Some(spec) = nodes().into_iter().find(|n| n.name() == node) else {
                bail!("pod {namespace}/{name} is bound to {node:?}, not a demo node");
            };
            let netns = self.ns(&format!("p{k}"));
            self.add_netns(&netns)?;
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
            // From here on teardown runs CNI DEL for it, whatever happens.
            self.pods.push(PodRun {
                namespace: namespace.clone(),
                name: name.clone(),
                uid: str_at(pod, "/metadata/uid").to_string(),
                node: spec.n,
                container_id: format!("{}-p{k}-{name}", self.prefix),
                netns: netns.clone(),
                ip: String::new(),
                gateway: String::new(),
                workload: None,
            });
            let run = &self.pods[self.pods.len() - 1];
            // The agent writes the node state (subnet, bridge) once it has its
            // podCIDR; until then ADD answers code 11, "try again later".
            let deadline = Instant::now() + Duration::from_secs(20);
            let result: Value = loop {
                let out = self.cni(run, "ADD")?;
                let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                if out.status.success() {
                    break serde_json::from_str(&stdout).with_context(|| {
                        format!("CNI ADD for {namespace}/{name} printed no JSON: {stdout}")
                    })?;
                }
                let code = serde_json::from_str::<Value>(&stdout)
                    .ok()
                    .and_then(|v| v["code"].as_u64());
                if code == Some(11) && Instant::now() < deadline {
                    util::sleep(Duration::from_millis(250))?;
                    continue;
                }
                bail!(
                    "CNI ADD for {namespace}/{name} on {node} failed ({}): {}{}",
                    out.status,
                    stdout.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            };
            let addr = result
                .pointer("/ips/0/address")
                .and_then(Value::as_str)
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse::<Ipv4Addr>().ok())
                .with_context(|| format!("CNI ADD result has no ips[0].address: {result}"))?;
            let gateway = str_at(&result, "/ips/0/gateway").to_string();
            // What a runtime does with the result's DNS: the pod's resolv.conf.
            write_resolv_conf(&netns, &result["dns"])?;
            let args: Vec<String> = ["--name", &name, "--http", "8080", "--udp", "9090"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            let child = self.spawn(
                &netns,
                &format!("pod-{namespace}-{name}.log"),
                &self.bin("weft-workload"),
                &args,
            )?;
            let last = self.pods.len() - 1;
            let run = &mut self.pods[last];
            run.ip = addr.to_string();
            run.gateway = gateway;
            run.workload = Some(child);
            self.save_record();
            // Listening once it answers on its own loopback.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match self.http_from(&netns, "127.0.0.1", "/hostname") {
                    Ok(body) if body.trim() == name => break,
                    Ok(_) | Err(_) if Instant::now() < deadline => {
                        util::sleep(Duration::from_millis(50))?
                    }
                    Ok(body) => bail!("weft-workload {name} answered {body:?}"),
                    Err(e) => return Err(e.context(format!("weft-workload {name} in {netns}"))),
                }
            }
            println!("  {namespace}/{name} on {node}: {addr} (netns {netns})");
        }
        Ok(())
    }

    /// Wait until every pod's status carries the address CNI gave it: the
    /// agents report it (from the plugin's line on their socket).
    fn wait_pod_ips(&mut self, timeout: Duration) -> Check {
        let want: BTreeMap<String, String> = self
            .pods
            .iter()
            .map(|p| (format!("{}/{}", p.namespace, p.name), p.ip.clone()))
            .collect();
        let res = self.wait_for(
            "every pod's status.podIP to be its CNI address (the agents report it)",
            timeout,
            |d| {
                let pods = d.list("pods").map_err(|e| format!("{e:#}"))?;
                let mut bad = Vec::new();
                for (key, ip) in &want {
                    match pods.iter().find(|p| ns_name(p) == *key) {
                        None => bad.push(format!("{key} is gone")),
                        Some(p) => {
                            let have = str_at(p, "/status/podIP");
                            let phase = str_at(p, "/status/phase");
                            if have != ip || phase != "Running" {
                                bad.push(format!(
                                    "{key}: podIP {have:?} phase {phase:?}, want {ip} Running"
                                ));
                            }
                        }
                    }
                }
                if bad.is_empty() {
                    Ok(Some(()))
                } else {
                    Err(bad.join(", "))
                }
            },
        );
        check(
            res.is_ok(),
            "endpoints follow pods: every pod's status carries its CNI address",
            res.err().map(|e| format!("{e:#}")).unwrap_or_default(),
        )
    }

    // ---- traffic ----

    /// `curl http://IP:8080PATH` from inside `netns`.
    fn http_from(&self, netns: &str, ip: &str, path: &str) -> Result<String> {
        util::capture(
            Command::new("ip")
                .args(["netns", "exec", netns])
                .args(["curl", "-sS", "--max-time", "3"])
                .arg(format!("http://{ip}:8080{path}")),
        )
    }

    /// `GET http://IP:PORT/path` from inside `netns` (curl); the body.
    fn http_at(&self, netns: &str, ip: &str, port: u16, path: &str) -> Result<String> {
        util::capture(
            Command::new("ip")
                .args(["netns", "exec", netns])
                .args(["curl", "-sS", "--max-time", "3"])
                .arg(format!("http://{ip}:{port}{path}")),
        )
    }

    /// One datagram `hi` to IP:9090 from inside `netns`; the answer.
    fn udp_from(&self, netns: &str, ip: &str) -> Result<String> {
        self.udp_at(netns, ip, 9090)
    }

    /// One datagram `hi` to IP:PORT from inside `netns`; the answer.
    fn udp_at(&self, netns: &str, ip: &str, port: u16) -> Result<String> {
        let script = format!(
            "exec 3<>/dev/udp/{ip}/{port} && printf hi >&3 && timeout 2 dd bs=512 count=1 status=none <&3"
        );
        util::capture(
            Command::new("ip")
                .args(["netns", "exec", netns])
                .args(["bash", "-c", &script]),
        )
    }

    /// Cross-node pod pairs (client, server) by index into `self.pods`.
    fn cross_pairs(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (a, pa) in self.pods.iter().enumerate() {
            for (b, pb) in self.pods.iter().enumerate() {
                if pa.node != pb.node {
                    out.push((a, b));
                }
            }
        }
        out
    }

    fn traffic_checks(&self) -> Vec<Check> {
        let mut out = Vec::new();
        let pairs = self.cross_pairs();
        let label = |i: usize| {
            let p = &self.pods[i];
            format!("{} (node-{})", p.name, p.node)
        };

        // HTTP /hostname, UDP echo and /clientip for every cross-node pair.
        let (mut bad_http, mut bad_udp, mut bad_src) = (Vec::new(), Vec::new(), Vec::new());
        for &(a, b) in &pairs {
            let (c, s) = (&self.pods[a], &self.pods[b]);
            let got = retry(|| self.http_from(&c.netns, &s.ip, "/hostname"));
            match got {
                Ok(body) if body.trim() == s.name => {}
                Ok(body) => {
                    bad_http.push(format!("{} -> {}: {:?}", label(a), label(b), body.trim()))
                }
                Err(e) => bad_http.push(format!("{} -> {}: {e:#}", label(a), label(b))),
            }
            let want = format!("{}:hi", s.name);
            match retry(|| self.udp_from(&c.netns, &s.ip)) {
                Ok(body) if body == want => {}
                Ok(body) => bad_udp.push(format!("{} -> {}: {body:?}", label(a), label(b))),
                Err(e) => bad_udp.push(format!("{} -> {}: {e:#}", label(a), label(b))),
            }
            match retry(|| self.http_from(&c.netns, &s.ip, "/clientip")) {
                Ok(body) if body.trim() == c.ip => {}
                Ok(body) => bad_src.push(format!(
                    "{} -> {} saw {:?}, not {}",
                    label(a),
                    label(b),
                    body.trim(),
                    c.ip
                )),
                Err(e) => bad_src.push(format!("{} -> {}: {e:#}", label(a), label(b))),
            }
        }
        let n = pairs.len();
        out.push(check(
            bad_http.is_empty(),
            format!("pod -> pod across nodes, HTTP: all {n} pairs got the target's /hostname"),
            bad_http.join("; "),
        ));
        out.push(check(
            bad_udp.is_empty(),
            format!("pod -> pod across nodes, UDP: all {n} pairs echoed by the target"),
            bad_udp.join("; "),
        ));
        out.push(check(
            bad_src.is_empty(),
            format!(
                "pod -> pod keeps the source address: /clientip is the client's pod IP ({n} pairs)"
            ),
            bad_src.join("; "),
        ));

        // Node -> pod, every node to every pod.
        let mut bad = Vec::new();
        for node in nodes() {
            for p in &self.pods {
                match retry(|| self.http_from(&self.ns(&node.role()), &p.ip, "/hostname")) {
                    Ok(body) if body.trim() == p.name => {}
                    Ok(body) => {
                        bad.push(format!("{} -> {}: {:?}", node.name(), p.name, body.trim()))
                    }
                    Err(e) => bad.push(format!("{} -> {}: {e:#}", node.name(), p.name)),
                }
            }
        }
        out.push(check(
            bad.is_empty(),
            format!(
                "node -> pod: every node reaches all {} pods over HTTP",
                self.pods.len()
            ),
            bad.join("; "),
        ));

        // Pod -> its gateway.
        let mut bad = Vec::new();
        for p in &self.pods {
            let ok = retry(|| {
                util::capture(
                    Command::new("ip")
                        .args(["netns", "exec", &p.netns])
                        .args(["ping", "-c", "1", "-W", "1", &p.gateway]),
                )
            });
            if let Err(e) = ok {
                bad.push(format!("{} -> {}: {e:#}", p.name, p.gateway));
            }
        }
        out.push(check(
            bad.is_empty(),
            "pod -> node: every pod pings its node's gateway",
            bad.join("; "),
        ));
        out
    }

    /// Services through the agents' rules: every pod reaches shop/web by
    /// its cluster IP (keeping its source); every node answers shop/api's
    /// NodePort.
    fn service_checks(&self, st: &State) -> Vec<Check> {
        let svc = |ns: &str, name: &str| {
            st.services.iter().find(|s| {
                str_at(s, "/metadata/namespace") == ns && str_at(s, "/metadata/name") == name
            })
        };
        let backends = |app: &str| -> Vec<String> {
            self.pods
                .iter()
                .filter(|p| p.name.starts_with(&format!("{app}-")))
                .map(|p| p.name.clone())
                .collect()
        };
        let mut out = Vec::new();
        let web_ip = svc("shop", "web").map(|s| str_at(s, "/spec/clusterIP").to_string());
        let api_port = svc("shop", "api")
            .and_then(|s| s.pointer("/spec/ports/0/nodePort"))
            .and_then(|v| v.as_u64())
            .map(|p| p as u16);
        let (Some(web_ip), Some(api_port)) = (web_ip, api_port) else {
            out.push(check(
                false,
                "Services: shop/web and shop/api exist",
                "missing from the API",
            ));
            return out;
        };
        let (web, api) = (backends("web"), backends("api"));
        let (mut bad, mut bad_src) = (Vec::new(), Vec::new());
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.pods {
            match retry(|| self.http_at(&p.netns, &web_ip, 80, "/hostname")) {
                Ok(b) if web.contains(&b.trim().to_string()) => {
                    seen.insert(b.trim().to_string());
                }
                Ok(b) => bad.push(format!("{} -> web: {:?}", p.name, b.trim())),
                Err(e) => bad.push(format!("{} -> web: {e:#}", p.name)),
            }
            // (A web pod may land on itself: hairpin traffic is masqueraded.)
            let client_ip = || self.http_at(&p.netns, &web_ip, 80, "/clientip");
            match if web.contains(&p.name) {
                Ok(p.ip.clone())
            } else {
                retry(client_ip)
            } {
                Ok(b) if b.trim() == p.ip => {}
                Ok(b) => bad_src.push(format!("{} -> web saw {:?}", p.name, b.trim())),
                Err(e) => bad_src.push(format!("{}: {e:#}", p.name)),
            }
        }
        out.push(check(
            bad.is_empty(),
            format!(
                "pod -> ClusterIP: all {} pods reach shop/web at {web_ip}:80 (answered by {})",
                self.pods.len(),
                seen.into_iter().collect::<Vec<_>>().join(", ")
            ),
            bad.join("; "),
        ));
        out.push(check(
            bad_src.is_empty(),
            "pod -> ClusterIP keeps the source address (/clientip via shop/web from the non-web pods)",
            bad_src.join("; "),
        ));
        let mut bad = Vec::new();
        for from in nodes() {
            for to in nodes() {
                match retry(|| {
                    self.http_at(&self.ns(&from.role()), &to.ip(), api_port, "/hostname")
                }) {
                    Ok(b) if api.contains(&b.trim().to_string()) => {}
                    Ok(b) => bad.push(format!("{} -> {}: {:?}", from.name(), to.name(), b.trim())),
                    Err(e) => bad.push(format!("{} -> {}: {e:#}", from.name(), to.name())),
                }
            }
        }
        out.push(check(
            bad.is_empty(),
            format!("NodePort: shop/api answers on :{api_port} of every node, from every node"),
            bad.join("; "),
        ));
        out
    }

    // ---- cluster DNS ----

    /// `getent hosts NAME` inside `netns`: the pod's own libc resolver with
    /// its resolv.conf. The (address, canonical name) pairs it printed.
    fn getent(&self, netns: &str, name: &str) -> Result<Vec<(String, String)>> {
        let out = util::capture(
            Command::new("ip")
                .args(["netns", "exec", netns])
                .args(["getent", "hosts", name]),
        )?;
        let mut v: Vec<(String, String)> = out
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((w.next()?.to_string(), w.next().unwrap_or("").to_string()))
            })
            .collect();
        v.sort();
        v.dedup();
        Ok(v)
    }

    /// Just the addresses of [`Demo::getent`].
    fn getent_ips(&self, netns: &str, name: &str) -> Result<Vec<String>> {
        Ok(self
            .getent(netns, name)?
            .into_iter()
            .map(|(ip, _)| ip)
            .collect())
    }

    /// `dig +short @198.19.0.10 ARGS` inside `netns`: the answer lines (an
    /// error only when no answer came).
    fn dig(&self, netns: &str, args: &[&str]) -> Result<Vec<String>> {
        let out = util::capture(
            Command::new("ip")
                .args(["netns", "exec", netns])
                .args(["dig", "+short", "+time=2", "+tries=2"])
                .arg(format!("@{DNS_IP}"))
                .args(args),
        )?;
        Ok(out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// The rcode `dig @198.19.0.10 ARGS` reports (`NXDOMAIN`, `NOERROR`).
    fn dig_status(&self, netns: &str, args: &[&str]) -> Result<String> {
        let out = util::capture(
            Command::new("ip")
                .args(["netns", "exec", netns])
                .args(["dig", "+time=2", "+tries=2"])
                .arg(format!("@{DNS_IP}"))
                .args(args),
        )?;
        out.split("status: ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .map(str::to_string)
            .with_context(|| format!("no status in dig's output: {out}"))
    }

    /// Cluster DNS as the pods see it: every agent answers 198.19.0.10 in
    /// its node (the cluster zone, the pod's search path) and forwards the
    /// rest to the external host. Names through the pods' own resolver
    /// (`getent`), records with `dig`.
    fn dns_checks(&self, st: &State) -> Vec<Check> {
        let mut out = Vec::new();
        let svc = |ns: &str, name: &str| {
            st.services
                .iter()
                .find(|s| ns_name(s) == format!("{ns}/{name}"))
                .map(|s| str_at(s, "/spec/clusterIP").to_string())
        };
        let Some(web_ip) = svc("shop", "web") else {
            out.push(check(
                false,
                "cluster DNS: shop/web exists",
                "missing from the API",
            ));
            return out;
        };
        let fqdn = |name: &str, ns: &str| format!("{name}.{ns}.svc.{ZONE}");
        // The first pod of each node: every node's agent answers for itself.
        let per_node: Vec<&PodRun> = nodes()
            .iter()
            .filter_map(|n| self.pods.iter().find(|p| p.node == n.n))
            .collect();
        let on = |p: &PodRun| format!("{} (node-{})", p.name, p.node);

        // resolv.conf from the CNI result.
        let mut bad = Vec::new();
        for p in &self.pods {
            let want = [
                format!("nameserver {DNS_IP}"),
                format!("search {}.svc.{ZONE} svc.{ZONE} {ZONE}", p.namespace),
                "options ndots:5".to_string(),
            ];
            match util::capture(
                Command::new("ip")
                    .args(["netns", "exec", &p.netns])
                    .args(["cat", "/etc/resolv.conf"]),
            ) {
                Ok(text) => {
                    let lines: Vec<&str> = text.lines().map(str::trim).collect();
                    let missing: Vec<&String> = want
                        .iter()
                        .filter(|w| !lines.contains(&w.as_str()))
                        .collect();
                    if !missing.is_empty() {
                        bad.push(format!("{}: no {missing:?} in {text:?}", p.name));
                    }
                }
                Err(e) => bad.push(format!("{}: {e:#}", p.name)),
            }
        }
        out.push(check(
            bad.is_empty(),
            format!(
                "every pod's resolv.conf is its CNI result's: nameserver {DNS_IP}, search <ns>.svc.{ZONE} svc.{ZONE} {ZONE}, ndots:5"
            ),
            bad.join("; "),
        ));

        // shop/web by short name, name.namespace and FQDN, then by name over HTTP.
        let web_fqdn = fqdn("web", "shop");
        let mut bad = Vec::new();
        for p in &self.pods {
            let mut names = vec!["web.shop".to_string(), web_fqdn.clone()];
            if p.namespace == "shop" {
                names.insert(0, "web".to_string());
            }
            for name in &names {
                match retry(|| self.getent(&p.netns, name)) {
                    Ok(v) if v == [(web_ip.clone(), web_fqdn.clone())] => {}
                    Ok(v) => bad.push(format!("{} {name}: {v:?}", p.name)),
                    Err(e) => bad.push(format!("{} {name}: {e:#}", p.name)),
                }
            }
            let by_name = if p.namespace == "shop" {
                "web"
            } else {
                "web.shop"
            };
            match retry(|| {
                util::capture(
                    Command::new("ip")
                        .args(["netns", "exec", &p.netns])
                        .args(["curl", "-sS", "--max-time", "3"])
                        .arg(format!("http://{by_name}/hostname")),
                )
            }) {
                Ok(b) if b.trim().starts_with("web-") => {}
                Ok(b) => bad.push(format!("{} curl http://{by_name}/: {:?}", p.name, b.trim())),
                Err(e) => bad.push(format!("{} curl http://{by_name}/: {e:#}", p.name)),
            }
        }
        out.push(check(
            bad.is_empty(),
            format!(
                "pod -> cluster DNS: all {} pods resolve web, web.shop and {web_fqdn} to shop/web's ClusterIP {web_ip} (getent hosts) and reach it as http://web/",
                self.pods.len()
            ),
            bad.join("; "),
        ));

        // Headless shop/db: its pod's address, the pod's own name, SRV.
        let db = self.pods.iter().find(|p| p.name == "db-0");
        let db_ip = db.map(|p| p.ip.clone()).unwrap_or_default();
        let db_host = format!("db-0.{}", fqdn("db", "shop"));
        let srv_want = format!("0 100 5432 {db_host}.");
        let srv_name = format!("_postgres._tcp.{}", fqdn("db", "shop"));
        let mut bad = Vec::new();
        if db.is_none() {
            bad.push("no pod db-0".to_string());
        }
        for p in &per_node {
            for name in ["db", "db-0.db"] {
                match retry(|| self.getent_ips(&p.netns, name)) {
                    Ok(v) if v == [db_ip.clone()] => {}
                    Ok(v) => bad.push(format!("{} {name}: {v:?}", on(p))),
                    Err(e) => bad.push(format!("{} {name}: {e:#}", on(p))),
                }
            }
            match retry(|| self.dig(&p.netns, &["SRV", &srv_name])) {
                Ok(v) if v == [srv_want.clone()] => {}
                Ok(v) => bad.push(format!("{} SRV {srv_name}: {v:?}", on(p))),
                Err(e) => bad.push(format!("{} SRV {srv_name}: {e:#}", on(p))),
            }
        }
        out.push(check(
            bad.is_empty(),
            format!(
                "headless shop/db: db and db-0.db resolve to db-0's pod IP {db_ip}; SRV _postgres._tcp.db.shop -> {srv_want} (from a pod on each node)"
            ),
            bad.join("; "),
        ));

        // ExternalName: a CNAME the server chases at the upstream.
        let ext_fqdn = fqdn("ext", "shop");
        let cname = ["example.test.".to_string(), EXTERNAL_IP.to_string()];
        let mut bad = Vec::new();
        for p in &per_node {
            match retry(|| self.getent(&p.netns, "ext")) {
                Ok(v) if v == [(EXTERNAL_IP.to_string(), "example.test".to_string())] => {}
                Ok(v) => bad.push(format!("{} ext: {v:?}", on(p))),
                Err(e) => bad.push(format!("{} ext: {e:#}", on(p))),
            }
            match retry(|| self.dig(&p.netns, &[&ext_fqdn])) {
                Ok(v) if v == cname => {}
                Ok(v) => bad.push(format!("{} {ext_fqdn}: {v:?}", on(p))),
                Err(e) => bad.push(format!("{} {ext_fqdn}: {e:#}", on(p))),
            }
            match retry(|| self.http_from(&p.netns, "ext", "/hostname")) {
                Ok(b) if b.trim() == "external" => {}
                Ok(b) => bad.push(format!("{} curl http://ext:8080/: {:?}", on(p), b.trim())),
                Err(e) => bad.push(format!("{} curl http://ext:8080/: {e:#}", on(p))),
            }
        }
        out.push(check(
            bad.is_empty(),
            format!(
                "ExternalName shop/ext: ext is a CNAME to example.test, chased at the upstream (the external host {EXTERNAL_IP}:53); http://ext:8080/ reaches that host"
            ),
            bad.join("; "),
        ));

        // Other names: forwarded to the upstream, its answer passed on.
        let mut bad = Vec::new();
        for p in &per_node {
            match retry(|| self.getent_ips(&p.netns, "www.example.test")) {
                Ok(v) if v == [EXTERNAL_IP.to_string()] => {}
                Ok(v) => bad.push(format!("{} www.example.test: {v:?}", on(p))),
                Err(e) => bad.push(format!("{} www.example.test: {e:#}", on(p))),
            }
            match retry(|| self.dig_status(&p.netns, &["missing.test"])) {
                Ok(s) if s == "NXDOMAIN" => {}
                Ok(s) => bad.push(format!("{} missing.test: {s}", on(p))),
                Err(e) => bad.push(format!("{} missing.test: {e:#}", on(p))),
            }
        }
        out.push(check(
            bad.is_empty(),
            format!(
                "names outside the cluster go to the upstream: www.example.test -> {EXTERNAL_IP}, missing.test -> NXDOMAIN"
            ),
            bad.join("; "),
        ));

        // PTR of cluster IPs.
        let dns_fqdn = fqdn("kube-dns", "kube-system");
        let want = [
            (web_ip.clone(), web_fqdn.clone()),
            (DNS_IP.to_string(), dns_fqdn.clone()),
        ];
        let mut bad = Vec::new();
        for p in &per_node {
            for (ip, name) in &want {
                match retry(|| self.dig(&p.netns, &["-x", ip])) {
                    Ok(v) if v == [format!("{name}.")] => {}
                    Ok(v) => bad.push(format!("{} PTR {ip}: {v:?}", on(p))),
                    Err(e) => bad.push(format!("{} PTR {ip}: {e:#}", on(p))),
                }
            }
        }
        out.push(check(
            bad.is_empty(),
            format!("PTR of cluster IPs: {web_ip} -> {web_fqdn}, {DNS_IP} -> {dns_fqdn}"),
            bad.join("; "),
        ));
        out
    }

    /// After the restart: the first pod of each node reaches the first pod
    /// of the next node over HTTP.
    fn traffic_after_restart(&self) -> Check {
        let mut firsts: Vec<usize> = Vec::new();
        for node in nodes() {
            if let Some(i) = self.pods.iter().position(|p| p.node == node.n) {
                firsts.push(i);
            }
        }
        let mut bad = Vec::new();
        let mut done = Vec::new();
        for (j, &a) in firsts.iter().enumerate() {
            let b = firsts[(j + 1) % firsts.len()];
            let (c, s) = (&self.pods[a], &self.pods[b]);
            if c.node == s.node {
                continue;
            }
            done.push(format!("{} -> {}", c.name, s.name));
            match retry(|| self.http_from(&c.netns, &s.ip, "/hostname")) {
                Ok(body) if body.trim() == s.name => {}
                Ok(body) => bad.push(format!("{} -> {}: {:?}", c.name, s.name, body.trim())),
                Err(e) => bad.push(format!("{} -> {}: {e:#}", c.name, s.name)),
            }
        }
        check(
            bad.is_empty() && !done.is_empty(),
            format!(
                "pods kept their connectivity across the restart ({})",
                done.join(", ")
            ),
            bad.join("; "),
        )
    }

    fn wait_slices(&mut self, timeout: Duration) -> Result<()> {
        self.wait_for("EndpointSlices of web, api and db", timeout, |d| {
            let slices = d.list("endpointslices").map_err(|e| format!("{e:#}"))?;
            let counts = ready_endpoints(&slices);
            let mut missing = Vec::new();
            for (ns, svc, want) in EXPECTED_ENDPOINTS {
                let have = counts
                    .get(&(ns.to_string(), svc.to_string()))
                    .map_or(0, |c| c.0);
                if have != *want {
                    missing.push(format!("{ns}/{svc} has {have} of {want}"));
                }
            }
            if missing.is_empty() {
                Ok(Some(()))
            } else {
                Err(missing.join(", "))
            }
        })
    }

    fn snapshot(&self) -> Result<State> {
        Ok(State {
            nodes: self.list("nodes")?,
            pods: self.list("pods")?,
            services: self.list("services")?,
            slices: self.list("endpointslices")?,
        })
    }

    // ---- checks ----

    fn checks(&mut self, st: &State) -> Result<Vec<Check>> {
        let mut out = Vec::new();

        // Reachability over the underlay.
        let mut bad = Vec::new();
        for node in nodes() {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &self.ns(&node.role())])
                .args(["curl", "-sS", "--max-time", "5", "-f"])
                .arg(format!("{SERVER}/readyz"));
            match util::capture(&mut cmd) {
                Ok(body) if body.trim() == "ok" => {}
                Ok(body) => bad.push(format!("{}: {:?}", node.name(), body.trim())),
                Err(e) => bad.push(format!("{}: {e:#}", node.name())),
            }
        }
        out.push(check(
            bad.is_empty(),
            format!("control plane answers on {API} from every node namespace"),
            bad.join("; "),
        ));

        // The VXLAN overlay: every node reaches every other node's pod gateway
        // (the .1 of its subnet, on that node's bridge) through weft.1. The
        // agents program it on their own; allow them a few reconcile rounds.
        let gateways: Vec<(String, String)> = st
            .nodes
            .iter()
            .filter_map(|n| {
                let cidr = str_at(n, "/spec/podCIDR");
                let (net, _) = parse_cidr(cidr).ok()?;
                Some((
                    str_at(n, "/metadata/name").to_string(),
                    Ipv4Addr::from(u32::from(net) + 1).to_string(),
                ))
            })
            .collect();
        let mut bad = Vec::new();
        for node in nodes() {
            for (peer, gw) in &gateways {
                if *peer == node.name() {
                    continue;
                }
                let reached = (0..20).any(|i| {
                    if i > 0 {
                        std::thread::sleep(std::time::Duration::from_millis(250));
                    }
                    Command::new("ip")
                        .args(["netns", "exec", &self.ns(&node.role())])
                        .args(["ping", "-c", "1", "-W", "1", gw])
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success())
                });
                if !reached {
                    bad.push(format!("{} -> {peer} ({gw})", node.name()));
                }
            }
        }
        out.push(check(
            bad.is_empty(),
            "VXLAN overlay: every node reaches every other node's pod gateway",
            format!("unreachable: {}", bad.join(", ")),
        ));

        // Node subnets.
        let cluster = parse_cidr(CLUSTER_CIDR)?;
        let mut subnets = BTreeSet::new();
        let mut bad = Vec::new();
        for n in &st.nodes {
            let name = str_at(n, "/metadata/name");
            let cidr = str_at(n, "/spec/podCIDR");
            match parse_cidr(cidr) {
                Ok(c) if c.1 == 24 && cidr_contains(cluster, c) => {
                    subnets.insert(cidr.to_string());
                }
                _ => bad.push(format!("{name}: {cidr:?}")),
            }
        }
        out.push(check(
            st.nodes.len() == NODES && subnets.len() == NODES && bad.is_empty(),
            format!("{NODES} nodes registered with distinct /24 subnets inside {CLUSTER_CIDR}"),
            format!(
                "{} nodes, {} distinct subnets; bad: {}",
                st.nodes.len(),
                subnets.len(),
                bad.join(", ")
            ),
        ));

        // Node status as the agents reported it.
        let mut bad = Vec::new();
        for spec in nodes() {
            let Some(n) = st
                .nodes
                .iter()
                .find(|n| str_at(n, "/metadata/name") == spec.name())
            else {
                bad.push(format!("{} missing", spec.name()));
                continue;
            };
            if node_ready(n) != "Ready" {
                bad.push(format!("{} is {}", spec.name(), node_ready(n)));
            }
            if internal_ip(n) != spec.ip() {
                bad.push(format!(
                    "{} has InternalIP {:?}",
                    spec.name(),
                    internal_ip(n)
                ));
            }
        }
        out.push(check(
            bad.is_empty(),
            "every node is Ready with its underlay address (198.18.0.11-13)",
            bad.join(", "),
        ));

        // Cluster IPs.
        let services = parse_cidr(SERVICE_CIDR)?;
        let mut bad = Vec::new();
        let mut dns_ip = String::new();
        for s in &st.services {
            let key = ns_name(s);
            let ip = str_at(s, "/spec/clusterIP");
            let ty = svc_type(s);
            if key == "kube-system/kube-dns" {
                dns_ip = ip.to_string();
            }
            match (ty.as_str(), ip) {
                ("ExternalName", "") => {}
                ("ExternalName", ip) => {
                    bad.push(format!("{key} (ExternalName) has clusterIP {ip}"))
                }
                (_, "None") if key == "shop/db" => {}
                (_, ip) => match ip.parse::<Ipv4Addr>() {
                    Ok(a) if cidr_contains(services, (a, 32)) => {}
                    _ => bad.push(format!("{key} has clusterIP {ip:?}")),
                },
            }
        }
        if dns_ip != DNS_IP {
            bad.push(format!(
                "kube-system/kube-dns has {dns_ip:?}, asked for {DNS_IP}"
            ));
        }
        out.push(check(
            bad.is_empty(),
            format!("cluster IPs come from {SERVICE_CIDR}; kube-system/kube-dns holds {DNS_IP}"),
            bad.join(", "),
        ));

        // NodePort.
        let api = st.services.iter().find(|s| ns_name(s) == "shop/api");
        let node_port = api
            .and_then(|s| s.pointer("/spec/ports/0/nodePort"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        out.push(check(
            (30000..=32767).contains(&node_port),
            format!("shop/api got NodePort {node_port} from 30000-32767"),
            "no nodePort allocated in range",
        ));

        // Endpoints.
        let counts = ready_endpoints(&st.slices);
        let mut bad = Vec::new();
        for (ns, svc, want) in EXPECTED_ENDPOINTS {
            let (ready, total) = counts
                .get(&(ns.to_string(), svc.to_string()))
                .copied()
                .unwrap_or((0, 0));
            if ready != *want || total != *want {
                bad.push(format!("{ns}/{svc}: {ready}/{total} ready, want {want}"));
            }
        }
        let web_port = st
            .slices
            .iter()
            .filter(|s| slice_owner(s) == ("shop".into(), "web".into()))
            .flat_map(|s| s["ports"].as_array().cloned().unwrap_or_default())
            .any(|p| p["name"] == "http" && p["port"] == 8080);
        if !web_port {
            bad.push("shop/web's slice does not map port http to 8080".into());
        }
        let pod_ips: BTreeSet<&str> = self.pods.iter().map(|p| p.ip.as_str()).collect();
        for s in &st.slices {
            for ep in s["endpoints"].as_array().into_iter().flatten() {
                for a in ep["addresses"].as_array().into_iter().flatten() {
                    let a = a.as_str().unwrap_or("");
                    if !pod_ips.contains(a) {
                        bad.push(format!(
                            "{}/{} lists {a:?}, no pod's CNI address",
                            slice_owner(s).0,
                            slice_owner(s).1
                        ));
                    }
                }
            }
        }
        out.push(check(
            bad.is_empty(),
            "EndpointSlices: web 3, api 2, db 1 ready at the pods' CNI addresses; web's named port http resolves to 8080",
            bad.join(", "),
        ));

        // Headless and ExternalName.
        let db_host = st
            .slices
            .iter()
            .filter(|s| slice_owner(s) == ("shop".into(), "db".into()))
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .any(|e| e["hostname"] == "db-0");
        let slices_of = |ns: &str, name: &str| {
            st.slices
                .iter()
                .filter(|s| slice_owner(s) == (ns.to_string(), name.to_string()))
                .count()
        };
        let (ext_slices, dns_slices) = (
            slices_of("shop", "ext"),
            slices_of("kube-system", "kube-dns"),
        );
        out.push(check(
            db_host && ext_slices == 0 && dns_slices == 0,
            "headless shop/db publishes hostname db-0; ExternalName shop/ext and selectorless kube-system/kube-dns have no endpoints",
            format!("db hostname found: {db_host}; ext slices: {ext_slices}; kube-dns slices: {dns_slices}"),
        ));

        // The agents' views.
        let svc_count = util::capture(&mut self.netctl(&["get", "svc", "-A", "-o", "name"]))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count();
        let views = self.wait_views(st, svc_count, None, Duration::from_secs(15));
        let (ok, detail, rev) = match views {
            Ok(rev) => (true, String::new(), rev),
            Err(e) => (false, format!("{e:#}"), 0),
        };
        self.view_rev = ok.then_some(rev);
        out.push(check(
            ok,
            format!(
                "every agent holds the same view revision as the control plane (rev {rev}, {svc_count} services, {NODES} nodes)"
            ),
            detail,
        ));
        Ok(out)
    }

    /// Wait until every agent's last `view updated` line shows `services`
    /// services, all nodes, its own subnet and the same revision (`want_rev`
    /// if given), and the control plane has no view change after that revision.
    fn wait_views(
        &mut self,
        st: &State,
        services: usize,
        want_rev: Option<u64>,
        timeout: Duration,
    ) -> Result<u64> {
        let subnets: BTreeMap<String, String> = st
            .nodes
            .iter()
            .map(|n| {
                (
                    str_at(n, "/metadata/name").to_string(),
                    str_at(n, "/spec/podCIDR").to_string(),
                )
            })
            .collect();
        self.wait_for("every agent to hold the current view", timeout, |d| {
            let mut revs = BTreeSet::new();
            for node in nodes() {
                let log = d.tmp.join(format!("agent-{}.log", node.n));
                let Some(v) = last_view(&log) else {
                    return Err(format!("{} logged no `view updated` line", node.name()));
                };
                let subnet = subnets.get(&node.name()).cloned().unwrap_or_default();
                if v.services != services || v.nodes != NODES || v.subnet != subnet {
                    return Err(format!(
                        "{} holds rev={} services={} nodes={} subnet={:?}; want services={services} nodes={NODES} subnet={subnet:?}",
                        node.name(), v.rev, v.services, v.nodes, v.subnet
                    ));
                }
                revs.insert(v.rev);
            }
            let rev = match (revs.len(), revs.iter().next()) {
                (1, Some(r)) => *r,
                _ => return Err(format!("the agents hold different revisions: {revs:?}")),
            };
            if let Some(w) = want_rev {
                if rev != w {
                    return Err(format!("the agents hold rev {rev}, not {w}"));
                }
            }
            // Ask the control plane, as each node, for view changes after `rev`.
            for (node, frames) in d.pending_frames(rev).map_err(|e| format!("{e:#}"))? {
                if !frames.is_empty() {
                    return Err(format!(
                        "the control plane still has changes for {node} after rev {rev}: {}",
                        frames.join(" ")
                    ));
                }
            }
            Ok(Some(rev))
        })
    }

    /// Frames (other than keep-alives) the control plane sends each node
    /// within 2 s of opening its stream with `since=rev`: none means `rev`
    /// is current. The nodes are asked at the same time.
    fn pending_frames(&self, rev: u64) -> Result<Vec<(String, Vec<String>)>> {
        let mut running = Vec::new();
        for node in nodes() {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &self.ns(&node.role())])
                .args(["curl", "-sS", "-N", "--max-time", "2", "-H"])
                .arg(format!(
                    "@{}",
                    self.tmp.join(format!("{}.hdr", node.name())).display()
                ))
                .arg(format!(
                    "{SERVER}/weft/v1/nodes/{}/stream?since={rev}",
                    node.name()
                ))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let child = cmd
                .spawn()
                .with_context(|| format!("starting `{}`", util::display(&cmd)))?;
            running.push((node.name(), cmd, child));
        }
        let mut out = Vec::new();
        for (name, cmd, child) in running {
            let res = child.wait_with_output()?;
            // 28: curl's "operation timed out", expected for an open stream.
            if !res.status.success() && res.status.code() != Some(28) {
                bail!(
                    "`{}` failed: {}",
                    util::display(&cmd),
                    String::from_utf8_lossy(&res.stderr).trim()
                );
            }
            let frames = String::from_utf8_lossy(&res.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|f| f["type"] != "Ping")
                .map(|f| format!("{}@{}", f["type"].as_str().unwrap_or("?"), f["rev"]))
                .collect();
            out.push((name, frames));
        }
        Ok(out)
    }

    /// kill -9 the control plane, start it on the same data dir, and check
    /// nothing is lost and the agents come back to the same view.
    fn restart_checks(&mut self, before: &State) -> Result<Vec<Check>> {
        let mut out = Vec::new();
        let rev_before = self.view_rev;
        if let Some(mut c) = self.control.take() {
            eprintln!("demo: kill -9 weft-control (pid {})", c.id());
            let _ = c.kill();
            let _ = c.wait();
        }
        self.save_record();
        self.start_control()?;
        self.wait_api(Duration::from_secs(20))?;
        let after = self.snapshot()?;
        let diff = before.diff(&after);
        out.push(check(
            diff.is_empty(),
            format!(
                "control plane restart (kill -9) kept {} nodes, {} pods, {} services, {} slices unchanged",
                after.nodes.len(),
                after.pods.len(),
                after.services.len(),
                after.slices.len()
            ),
            diff.join("; "),
        ));

        let subscribers = self.wait_for("the agents to reconnect", Duration::from_secs(20), |d| {
            let (code, text) = d
                .http(&d.ns("cp"), "admin", "GET", "/metrics", None, false)
                .map_err(|e| format!("{e:#}"))?;
            let n = text
                .lines()
                .find_map(|l| l.strip_prefix("weft_control_stream_subscribers "))
                .and_then(|v| v.trim().parse::<usize>().ok());
            match (code, n) {
                (200, Some(n)) if n >= NODES => Ok(Some(n)),
                (200, n) => Err(format!("{} stream subscribers", n.unwrap_or(0))),
                (code, _) => Err(format!("GET /metrics: HTTP {code}")),
            }
        });
        let views = match (&subscribers, rev_before) {
            (Ok(_), Some(rev)) => self
                .wait_views(
                    &after,
                    after.services.len(),
                    Some(rev),
                    Duration::from_secs(15),
                )
                .map(|_| rev),
            (Ok(_), None) => Err(anyhow::anyhow!(
                "the agents did not agree before the restart"
            )),
            (Err(e), _) => Err(anyhow::anyhow!("{e:#}")),
        };
        let reconnected = views.is_ok();
        out.push(match views {
            Ok(rev) => check(
                true,
                format!(
                    "all {NODES} agents reconnected after the restart and still hold rev {rev}"
                ),
                "",
            ),
            Err(e) => check(
                false,
                "all agents reconnected after the restart with the same view",
                format!("{e:#}"),
            ),
        });
        if reconnected {
            out.push(self.traffic_after_restart());
        }
        Ok(out)
    }

    fn print_logs(&self) {
        let mut logs = vec![("weft-control".to_string(), self.tmp.join("control.log"))];
        for node in nodes() {
            logs.push((
                format!("weft-agent {}", node.name()),
                self.tmp.join(format!("agent-{}.log", node.n)),
            ));
            logs.push((
                format!("weft-cni {}", node.name()),
                self.tmp.join(format!("cni-{}.log", node.n)),
            ));
        }
        for (what, path) in logs {
            if path.exists() {
                eprintln!("--- last lines of the {what} log ({}):", path.display());
                eprint!("{}", util::tail(&path, 15));
            }
        }
    }

    fn teardown(&mut self) {
        eprintln!("demo: tearing down {}", self.prefix);
        // Pods first, as a runtime would: stop the workload, CNI DEL (while
        // the node namespaces still exist); their namespaces go below.
        let pods = std::mem::take(&mut self.pods);
        for mut p in pods.into_iter().rev() {
            if let Some(mut w) = p.workload.take() {
                let _ = w.kill();
                let _ = w.wait();
            }
            match self.cni(&p, "DEL") {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "demo: CNI DEL of {}/{} failed ({}): {}{}",
                    p.namespace,
                    p.name,
                    o.status,
                    String::from_utf8_lossy(&o.stdout).trim(),
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("demo: CNI DEL of {}/{}: {e:#}", p.namespace, p.name),
            }
        }
        for mut c in self
            .control
            .take()
            .into_iter()
            .chain(self.agents.drain(..))
            .chain(self.external.take())
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.namespaces.drain(..).rev() {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "del", &ns]);
            if let Err(e) = util::run(&mut cmd) {
                eprintln!("demo: {e:#}");
            }
            // The pods' resolv.conf (only pods have one; the name is ours).
            let etc = netns_etc(&ns);
            if etc.exists() {
                if let Err(e) = std::fs::remove_dir_all(&etc) {
                    eprintln!("demo: removing {}: {e}", etc.display());
                }
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.tmp) {
            eprintln!("demo: removing {}: {e}", self.tmp.display());
        }
        let _ = std::fs::remove_file(&self.record);
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if !self.keep {
            self.teardown();
        }
    }
}

/// `f` until it succeeds, up to 12 tries 250 ms apart (ARP, a first
/// overlay round); the last error otherwise.
fn retry<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let mut tries = 0;
    loop {
        tries += 1;
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if tries >= 12 || util::check_interrupted().is_err() => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    util::run(Command::new("ip").args(args))
}

/// Where `ip netns exec NAME` finds the files it bind-mounts over /etc.
fn netns_etc(netns: &str) -> PathBuf {
    Path::new("/etc/netns").join(netns)
}

/// A resolv.conf from a CNI result's `dns` object (nameservers, search,
/// options), the way a runtime writes one.
fn resolv_conf(dns: &Value) -> String {
    let list = |k: &str| -> Vec<&str> {
        dns[k]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    };
    let mut text = String::new();
    for ns in list("nameservers") {
        let _ = writeln!(text, "nameserver {ns}");
    }
    for key in ["search", "options"] {
        let l = list(key);
        if !l.is_empty() {
            let _ = writeln!(text, "{key} {}", l.join(" "));
        }
    }
    text
}

/// Write the pod namespace's resolv.conf from its CNI result's DNS.
fn write_resolv_conf(netns: &str, dns: &Value) -> Result<()> {
    let text = resolv_conf(dns);
    if !text.contains("nameserver ") {
        bail!("the CNI result for {netns} has no DNS nameservers: {dns}");
    }
    let dir = netns_etc(netns);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("resolv.conf"), text)
        .with_context(|| format!("writing {}/resolv.conf", dir.display()))
}

fn write_secret(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

// ---- cluster state and its summary ----

struct State {
    nodes: Vec<Value>,
    pods: Vec<Value>,
    services: Vec<Value>,
    slices: Vec<Value>,
}

impl State {
    /// What differs between two reads (by object and resourceVersion).
    fn diff(&self, other: &State) -> Vec<String> {
        let mut out = Vec::new();
        for (kind, a, b) in [
            ("nodes", &self.nodes, &other.nodes),
            ("pods", &self.pods, &other.pods),
            ("services", &self.services, &other.services),
            ("endpointslices", &self.slices, &other.slices),
        ] {
            let index = |l: &Vec<Value>| -> BTreeMap<String, String> {
                l.iter()
                    .map(|o| {
                        (
                            ns_name(o),
                            str_at(o, "/metadata/resourceVersion").to_string(),
                        )
                    })
                    .collect()
            };
            let (a, b) = (index(a), index(b));
            for (k, rv) in &a {
                match b.get(k) {
                    None => out.push(format!("{kind} {k} is gone")),
                    Some(rv2) if rv2 != rv => {
                        out.push(format!("{kind} {k} changed (rv {rv} -> {rv2})"))
                    }
                    _ => {}
                }
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!("{kind} {k} appeared"));
            }
        }
        out
    }
}

fn print_summary(prefix: &str, st: &State, checks: &[Check]) {
    println!();
    println!(
        "weft demo: {} nodes, {} pods, {} services (control plane {API} in netns {prefix}-cp)",
        st.nodes.len(),
        st.pods.len(),
        st.services.len()
    );
    let rows: Vec<Vec<String>> = st
        .nodes
        .iter()
        .map(|n| {
            vec![
                str_at(n, "/metadata/name").to_string(),
                internal_ip(n),
                str_at(n, "/spec/podCIDR").to_string(),
                node_ready(n),
            ]
        })
        .collect();
    print!("{}", table(&["NODE", "IP", "POD-CIDR", "STATUS"], &rows));
    println!();

    let rows: Vec<Vec<String>> = st
        .pods
        .iter()
        .map(|p| {
            vec![
                ns_name(p),
                str_at(p, "/spec/nodeName").to_string(),
                str_at(p, "/status/podIP").to_string(),
                str_at(p, "/status/phase").to_string(),
            ]
        })
        .collect();
    print!("{}", table(&["POD", "NODE", "IP", "STATUS"], &rows));
    println!();

    let counts = ready_endpoints(&st.slices);
    let rows: Vec<Vec<String>> = st
        .services
        .iter()
        .map(|s| {
            let ty = svc_type(s);
            let ip = match str_at(s, "/spec/clusterIP") {
                "" => "-".to_string(),
                ip => ip.to_string(),
            };
            let ready = if ty == "ExternalName" {
                format!("-> {}", str_at(s, "/spec/externalName"))
            } else if str_at(s, "/spec/clusterIP") == DNS_IP
                && s.pointer("/spec/selector")
                    .and_then(Value::as_object)
                    .is_none_or(|m| m.is_empty())
            {
                "- (every node's weft-agent answers it)".to_string()
            } else {
                let key = (
                    str_at(s, "/metadata/namespace").to_string(),
                    str_at(s, "/metadata/name").to_string(),
                );
                let (r, t) = counts.get(&key).copied().unwrap_or((0, 0));
                format!("{r}/{t}")
            };
            vec![ns_name(s), ty, ip, svc_ports(s), ready]
        })
        .collect();
    print!(
        "{}",
        table(
            &["SERVICE", "TYPE", "CLUSTER-IP", "PORTS", "READY ENDPOINTS"],
            &rows
        )
    );
    println!();

    let failed = checks.iter().filter(|c| !c.ok).count();
    println!("checks: {} passed, {failed} failed", checks.len() - failed);
    for c in checks {
        if c.ok {
            println!("  ok  {}", c.text);
        } else {
            println!("  FAIL {}: {}", c.text, c.detail);
        }
    }
}

/// Columns padded to their widest cell, three spaces apart.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                let _ = write!(s, "{c:<w$}   ", w = widths[i]);
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn ns_name(o: &Value) -> String {
    match str_at(o, "/metadata/namespace") {
        "" => str_at(o, "/metadata/name").to_string(),
        ns => format!("{ns}/{}", str_at(o, "/metadata/name")),
    }
}

fn svc_type(s: &Value) -> String {
    match str_at(s, "/spec/type") {
        "" => "ClusterIP".to_string(),
        t => t.to_string(),
    }
}

/// `80/TCP`, `8080:31234/TCP`, `53/UDP,53/TCP`.
fn svc_ports(s: &Value) -> String {
    let ports = s
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if ports.is_empty() {
        return "-".into();
    }
    ports
        .iter()
        .map(|p| {
            let proto = p["protocol"].as_str().unwrap_or("TCP");
            match p["nodePort"].as_u64() {
                Some(np) => format!("{}:{np}/{proto}", p["port"]),
                None => format!("{}/{proto}", p["port"]),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn node_ready(n: &Value) -> String {
    let ready = n
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .map(|c| c["status"] == "True");
    match ready {
        Some(true) => "Ready".into(),
        Some(false) => "NotReady".into(),
        None => "Unknown".into(),
    }
}

fn internal_ip(n: &Value) -> String {
    n.pointer("/status/addresses")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().find(|a| a["type"] == "InternalIP"))
        .and_then(|a| a["address"].as_str())
        .unwrap_or("")
        .to_string()
}

/// The (namespace, service) an EndpointSlice belongs to.
fn slice_owner(s: &Value) -> (String, String) {
    (
        str_at(s, "/metadata/namespace").to_string(),
        str_at(s, "/metadata/labels/kubernetes.io~1service-name").to_string(),
    )
}

/// (ready, total) endpoints per (namespace, service).
fn ready_endpoints(slices: &[Value]) -> BTreeMap<(String, String), (usize, usize)> {
    let mut out: BTreeMap<(String, String), (usize, usize)> = BTreeMap::new();
    for s in slices {
        let e = out.entry(slice_owner(s)).or_default();
        for ep in s["endpoints"].as_array().into_iter().flatten() {
            e.1 += 1;
            // Kubernetes: an absent `ready` means ready.
            if ep.pointer("/conditions/ready") != Some(&Value::Bool(false)) {
                e.0 += 1;
            }
        }
    }
    out
}

fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8)> {
    let (a, p) = s
        .split_once('/')
        .with_context(|| format!("{s:?} is not a CIDR"))?;
    let a: Ipv4Addr = a.parse().with_context(|| format!("{s:?} is not a CIDR"))?;
    let p: u8 = p.parse().with_context(|| format!("{s:?} is not a CIDR"))?;
    if p > 32 {
        bail!("{s:?} is not a CIDR");
    }
    Ok((a, p))
}

fn mask(p: u8) -> u32 {
    if p == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(p))
    }
}

/// Whether `inner` lies inside `outer`.
fn cidr_contains(outer: (Ipv4Addr, u8), inner: (Ipv4Addr, u8)) -> bool {
    inner.1 >= outer.1
        && (u32::from(inner.0) & mask(outer.1)) == (u32::from(outer.0) & mask(outer.1))
}

/// The last `view updated` line of an agent log.
fn last_view(log: &Path) -> Option<AgentView> {
    let text = std::fs::read(log).ok()?;
    let text = util::strip_ansi(&String::from_utf8_lossy(&text));
    text.lines()
        .filter(|l| l.contains("view updated"))
        .filter_map(parse_view_line)
        .next_back()
}

fn parse_view_line(line: &str) -> Option<AgentView> {
    let mut v = AgentView::default();
    let mut seen = 0;
    for word in line.split_whitespace() {
        let Some((k, val)) = word.split_once('=') else {
            continue;
        };
        let val = val.trim_matches('"');
        match k {
            "rev" => {
                v.rev = val.parse().ok()?;
                seen += 1;
            }
            "services" => {
                v.services = val.parse().ok()?;
                seen += 1;
            }
            "nodes" => {
                v.nodes = val.parse().ok()?;
                seen += 1;
            }
            "subnet" => v.subnet = val.to_string(),
            _ => {}
        }
    }
    (seen == 3).then_some(v)
}

// ---- demo --down ----

/// Remove what earlier runs left: recorded processes and temp dirs, and
/// every `wd<pid>-*` namespace whose run is no longer alive.
fn down() -> Result<()> {
    if !util::is_root() {
        bail!("removing network namespaces needs root; run `cargo xtask demo --down` as root");
    }
    let me = std::process::id();
    let live_demo = |pid: u32| {
        pid != me
            && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "xtask")
    };
    let mut removed = 0;

    // Recorded runs.
    let mut records: Vec<PathBuf> = std::fs::read_dir(RUN_DIR)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    records.sort();
    for rec in records {
        let Some(prefix) = rec
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".state"))
            .map(str::to_string)
        else {
            continue;
        };
        let owner: Option<u32> = prefix.strip_prefix("wd").and_then(|p| p.parse().ok());
        let text = std::fs::read_to_string(&rec).unwrap_or_default();
        let kept = text.lines().any(|l| l == "kept");
        if owner.is_some_and(live_demo) && !kept {
            println!(
                "skipping {prefix}: its demo (pid {}) is still running",
                owner.unwrap_or(0)
            );
            continue;
        }
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("pid", pid)) => {
                    let Ok(pid) = pid.trim().parse::<u32>() else {
                        continue;
                    };
                    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    if String::from_utf8_lossy(&cmdline).contains("weft-") {
                        match util::kill_pid(pid) {
                            Ok(()) => {
                                println!("killed pid {pid}");
                                removed += 1;
                            }
                            Err(e) => eprintln!("demo: {e:#}"),
                        }
                    }
                }
                Some(("dir", dir)) => {
                    let dir = Path::new(dir.trim());
                    let ours = dir
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("weft-demo-wd"));
                    if ours && dir.exists() {
                        match std::fs::remove_dir_all(dir) {
                            Ok(()) => {
                                println!("removed {}", dir.display());
                                removed += 1;
                            }
                            Err(e) => eprintln!("demo: removing {}: {e}", dir.display()),
                        }
                    }
                }
                _ => {}
            }
        }
        let _ = std::fs::remove_file(&rec);
    }

    // Namespaces of any run (recorded or not), and whatever still runs in them.
    let list = util::capture(Command::new("ip").args(["netns", "list"]))?;
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(owner) = demo_owner(name) else {
            continue;
        };
        if live_demo(owner) && Path::new(RUN_DIR).join(format!("wd{owner}.state")).exists() {
            println!("skipping {name}: its demo (pid {owner}) is still running");
            continue;
        }
        if let Ok(pids) = util::capture(Command::new("ip").args(["netns", "pids", name])) {
            for pid in pids.lines().filter_map(|p| p.trim().parse::<u32>().ok()) {
                if util::kill_pid(pid).is_ok() {
                    println!("killed pid {pid} (in netns {name})");
                    removed += 1;
                }
            }
        }
        util::run(Command::new("ip").args(["netns", "del", name]))?;
        removed += 1;
    }

    // Pods' resolv.conf directories (/etc/netns/wd<pid>-p<k>) whose run is gone.
    if let Ok(entries) = std::fs::read_dir("/etc/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(owner) = demo_owner(&name) else {
                continue;
            };
            if live_demo(owner) && Path::new(RUN_DIR).join(format!("wd{owner}.state")).exists() {
                continue;
            }
            if std::fs::remove_dir_all(e.path()).is_ok() {
                println!("removed {}", e.path().display());
                removed += 1;
            }
        }
    }

    // Temp dirs of runs that left no record.
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(owner) = name
                .strip_prefix("weft-demo-wd")
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if live_demo(owner) {
                continue;
            }
            if std::fs::remove_dir_all(e.path()).is_ok() {
                println!("removed {}", e.path().display());
                removed += 1;
            }
        }
    }
    if removed == 0 {
        println!("demo --down: nothing to clean up");
    } else {
        println!("demo --down: done");
    }
    Ok(())
}

/// `wd123-cp` → 123: the pid of the run that made a namespace.
fn demo_owner(netns: &str) -> Option<u32> {
    let rest = netns.strip_prefix("wd")?;
    let (pid, role) = rest.split_once('-')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) || role.is_empty() {
        return None;
    }
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_agent_view_lines() {
        let line = "2025-11-22T10:00:00.000000Z  INFO weft_agent: view updated rev=17 services=5 nodes=3 subnet=\"198.18.129.0/24\"";
        assert_eq!(
            parse_view_line(line),
            Some(AgentView {
                rev: 17,
                services: 5,
                nodes: 3,
                subnet: "198.18.129.0/24".into()
            })
        );
        assert_eq!(
            parse_view_line("INFO weft_agent: registered node=node-1"),
            None
        );
    }

    #[test]
    fn cidr_math() {
        let cluster = parse_cidr(CLUSTER_CIDR).unwrap();
        assert!(cidr_contains(
            cluster,
            parse_cidr("198.18.200.0/24").unwrap()
        ));
        assert!(!cidr_contains(
            cluster,
            parse_cidr("198.18.0.0/24").unwrap()
        ));
        assert!(!cidr_contains(
            cluster,
            parse_cidr("198.18.0.0/16").unwrap()
        ));
    }

    #[test]
    fn namespace_owner() {
        assert_eq!(demo_owner("wd123-cp"), Some(123));
        assert_eq!(demo_owner("wd123-p4"), Some(123));
        assert_eq!(demo_owner("wd123-"), None);
        assert_eq!(demo_owner("wdx-cp"), None);
        assert_eq!(demo_owner("other"), None);
    }

    #[test]
    fn renders_tables_and_ports() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "1".into()]]);
        assert_eq!(t, "A     BB\nxxx   1\n");
        let s = json!({"spec": {"ports": [{"port": 8080, "nodePort": 31000, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}]}});
        assert_eq!(svc_ports(&s), "8080:31000/TCP,53/UDP");
    }

    #[test]
    fn writes_resolv_conf_from_a_cni_result() {
        let dns = json!({"nameservers": ["198.19.0.10"],
                         "search": ["shop.svc.cluster.local", "svc.cluster.local", "cluster.local"],
                         "options": ["ndots:5"]});
        assert_eq!(
            resolv_conf(&dns),
            "nameserver 198.19.0.10\nsearch shop.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
        );
        assert_eq!(resolv_conf(&json!({})), "");
    }

    #[test]
    fn counts_ready_endpoints() {
        let slices = vec![json!({
            "metadata": {"namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "endpoints": [{"addresses": ["1.1.1.1"], "conditions": {"ready": true}},
                          {"addresses": ["1.1.1.2"], "conditions": {"ready": false}}]
        })];
        assert_eq!(
            ready_endpoints(&slices)[&("shop".to_string(), "web".to_string())],
            (1, 2)
        );
    }
}
