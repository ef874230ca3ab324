//! End-to-end tests on a simulated 3-node cluster (tests/src/cluster.rs):
//! real weft-control, weft-agent and weft-cni in network namespaces, pods
//! running weft-workload. Each test brings its own cluster up once, so the
//! checks are grouped into few functions. Without root (or without
//! `ip netns`) each prints `skipped: <why>` and returns.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_e2e::cluster::{
    connect_from, eventually, http_get, http_status, http_text, skip, udp_request, Cluster, Pod,
    HTTP_PORT, RESYNC_SECONDS, UDP_PORT,
};

/// The workload's UDP answer: `NAME:` + payload.
fn check_udp(from: &str, to: &Pod, payload: &[u8]) -> Result<()> {
    let got = udp_request(from, to.ip, UDP_PORT, payload)?;
    let mut want = format!("{}:", to.name).into_bytes();
    want.extend_from_slice(payload);
    if got != want {
        bail!(
            "UDP {} bytes {from} -> {} ({}): answer of {} bytes starting {:?}",
            payload.len(),
            to.name,
            to.ip,
            got.len(),
            String::from_utf8_lossy(&got[..got.len().min(40)])
        );
    }
    Ok(())
}

#[test]
fn cluster_pods_services_nodes_and_the_outside() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let t0 = Instant::now();
    let mut c = Cluster::up(3)?;
    let ns = "e2e";

    // Two pods per node, all behind one Service.
    let mut pods = Vec::new();
    for node in 0..3 {
        for k in 0..2 {
            let name = format!("web-{}-{k}", node + 1);
            pods.push(c.add_pod(node, ns, &name, &[("app", "web")])?);
        }
    }
    c.post(
        &format!("/api/v1/namespaces/{ns}/services"),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": ns},
            "spec": {"selector": {"app": "web"}, "ports": [
                {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                {"name": "udp", "port": 90, "targetPort": "udp", "protocol": "UDP"}
            ]}
        }),
    )?;
    for (p, node) in pods.iter().zip([0, 0, 1, 1, 2, 2]) {
        let cidr = &c.nodes[node].pod_cidr;
        let net: Ipv4Addr = cidr.split('/').next().unwrap_or("").parse()?;
        assert_eq!(
            u32::from(p.ip) >> 8,
            u32::from(net) >> 8,
            "{} got {} outside its node's {cidr}",
            p.name,
            p.ip
        );
    }

    // Endpoints follow pods: the agent reports each CNI ADD, the control
    // plane's endpoint controller turns it into the Service's slice.
    for p in &pods {
        eventually(
            &format!("status.podIP of {}", p.name),
            Duration::from_secs(20),
            || {
                let obj = c.get(&format!("/api/v1/namespaces/{ns}/pods/{}", p.name))?;
                let got = obj["status"]["podIP"].as_str().unwrap_or("");
                if got != p.ip.to_string() {
                    bail!("{} has podIP {got:?}, CNI gave {}", p.name, p.ip);
                }
                Ok(())
            },
        )?;
    }
    eventually("the EndpointSlice of web", Duration::from_secs(20), || {
        let list = c.get(&format!(
            "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector=kubernetes.io/service-name%3Dweb"
        ))?;
        let mut addrs: Vec<String> = list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .filter(|e| e.pointer("/conditions/ready") != Some(&Value::Bool(false)))
            .filter_map(|e| e["addresses"][0].as_str().map(str::to_string))
            .collect();
        addrs.sort();
        let mut want: Vec<String> = pods.iter().map(|p| p.ip.to_string()).collect();
        want.sort();
        if addrs != want {
            bail!("ready endpoints {addrs:?}, want {want:?}");
        }
        Ok(())
    })?;
    println!("endpoints follow pods: 6 pods reported, slice has their CNI addresses");

    // Pod to pod, every pair, TCP and UDP; the server sees the client pod's address.
    for a in &pods {
        for b in &pods {
            let name = http_text(&a.netns, b.ip, HTTP_PORT, "/hostname")
                .with_context(|| format!("{} -> {}", a.name, b.name))?;
            assert_eq!(name, b.name, "{} -> {} ({})", a.name, b.name, b.ip);
            let seen = http_text(&a.netns, b.ip, HTTP_PORT, "/clientip")?;
            assert_eq!(
                seen,
                a.ip.to_string(),
                "{} -> {}: pod to pod must keep the pod address",
                a.name,
                b.name
            );
            check_udp(&a.netns, b, format!("hello from {}", a.name).as_bytes())?;
        }
    }
    println!("pod -> pod: 36 pairs over HTTP and UDP, sources kept");

    // Large payloads across nodes: a 2,000-byte datagram (fragmented under
    // the overlay MTU) and a 1 MB HTTP body, between every node pair.
    let big: Vec<u8> = (0..2000u32).map(|i| (i % 251) as u8).collect();
    for a in pods.iter().step_by(2) {
        for b in pods.iter().step_by(2) {
            if a.node == b.node {
                continue;
            }
            check_udp(&a.netns, b, &big)?;
            let body = http_get(&a.netns, b.ip, HTTP_PORT, "/bytes/1000000")?;
            assert_eq!(body.len(), 1_000_000, "{} -> {}", a.name, b.name);
            assert!(body
                .iter()
                .enumerate()
                .all(|(i, &x)| x == b'0' + (i % 10) as u8));
        }
    }
    println!("cross-node: 2000-byte UDP datagrams and 1 MB HTTP bodies intact");

    // Node -> pod (with curl, as an operator would) and pod -> node.
    for node in &c.nodes {
        for p in &pods {
            let out = c.sh(
                &node.netns,
                &[
                    "curl",
                    "-sS",
                    "--max-time",
                    "5",
                    &format!("http://{}:{HTTP_PORT}/hostname", p.ip),
                ],
            )?;
            assert_eq!(out, p.name, "{} -> {}", node.name, p.name);
        }
    }
    for p in &pods {
        for node in &c.nodes {
            let name = http_text(&p.netns, node.ip, HTTP_PORT, "/hostname")
                .with_context(|| format!("{} -> {}", p.name, node.name))?;
            assert_eq!(name, node.name);
            let mut want = format!("{}:", node.name).into_bytes();
            want.extend_from_slice(b"ping");
            assert_eq!(udp_request(&p.netns, node.ip, UDP_PORT, b"ping")?, want);
        }
    }
    println!("node -> pod and pod -> node: every pair");

    // Pod -> outside the cluster: masqueraded to the node's address.
    let ext = c.external_ip();
    for p in &pods {
        assert_eq!(
            http_text(&p.netns, ext, HTTP_PORT, "/hostname")?,
            "external"
        );
        let seen = http_text(&p.netns, ext, HTTP_PORT, "/clientip")?;
        assert_eq!(
            seen,
            c.nodes[p.node].ip.to_string(),
            "{} -> external must be seen with its node's address",
            p.name
        );
        let mut want = b"external:".to_vec();
        want.extend_from_slice(b"out");
        assert_eq!(udp_request(&p.netns, ext, UDP_PORT, b"out")?, want);
    }
    println!("pod -> external host: seen as the node's address");
    println!("took {:.1}s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// Counts bytes of an endless HTTP stream read in the background.
struct Stream {
    bytes: Arc<AtomicU64>,
    failed: Arc<AtomicBool>,
    error: Arc<std::sync::Mutex<String>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Stream {
    fn open(from: &Pod, to: &Pod) -> Result<Stream> {
        let mut s = connect_from(&from.netns, (to.ip, HTTP_PORT).into())?;
        std::io::Write::write_all(
            &mut s,
            b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let bytes = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicBool::new(false));
        let error = Arc::new(std::sync::Mutex::new(String::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, f, e, st) = (bytes.clone(), failed.clone(), error.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !st.load(Ordering::SeqCst) {
                match s.read(&mut buf) {
                    Ok(0) => {
                        *e.lock().unwrap_or_else(|p| p.into_inner()) = "EOF".into();
                        f.store(true, Ordering::SeqCst);
                        return;
                    }
                    Ok(n) => {
                        b.fetch_add(n as u64, Ordering::SeqCst);
                    }
                    Err(err) => {
                        *e.lock().unwrap_or_else(|p| p.into_inner()) = err.to_string();
                        f.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            }
        });
        Ok(Stream {
            bytes,
            failed,
            error,
            stop,
            thread: Some(thread),
        })
    }

    /// Fails if the stream broke or delivered nothing for `d`.
    fn delivers_during(&self, what: &str, d: Duration) -> Result<u64> {
        let before = self.bytes.load(Ordering::SeqCst);
        std::thread::sleep(d);
        let after = self.bytes.load(Ordering::SeqCst);
        if self.failed.load(Ordering::SeqCst) {
            bail!(
                "the pod-to-pod stream broke {what}: {}",
                self.error.lock().unwrap_or_else(|p| p.into_inner())
            );
        }
        if after <= before {
            bail!("the pod-to-pod stream delivered nothing {what}");
        }
        Ok(after - before)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Routes, neighbours and FDB entries on `node` that point at `gone`.
fn leftovers(c: &Cluster, node: usize, gone_cidr: &str, gone_ip: Ipv4Addr) -> Result<Vec<String>> {
    let state = c.overlay_state(node)?;
    let net = gone_cidr.split('/').next().unwrap_or("");
    Ok(state
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(&format!("{gone_cidr} "))
                || l.starts_with(&format!("{net} "))
                || l.contains(&format!("dst {gone_ip} "))
                || l.ends_with(&format!("dst {gone_ip}"))
        })
        .map(str::to_string)
        .collect())
}

#[test]
fn cluster_agent_restart_keeps_flows_and_leaving_nodes_are_unwired() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let t0 = Instant::now();
    let mut c = Cluster::up(3)?;
    let a = c.add_pod(0, "e2e", "client", &[])?;
    let b = c.add_pod(1, "e2e", "server", &[])?;
    let x = c.add_pod(2, "e2e", "third", &[])?;
    assert_eq!(http_text(&a.netns, b.ip, HTTP_PORT, "/hostname")?, "server");

    // --- agent restart under a live flow ---
    let stream = Stream::open(&a, &b)?;
    stream.delivers_during("before the restart", Duration::from_millis(500))?;
    let before: Vec<String> = (0..3).map(|i| c.overlay_state(i)).collect::<Result<_>>()?;
    for victim in [1usize, 0] {
        c.kill_agent(victim);
        let n = stream.delivers_during(
            &format!("while the agent of {} is down", c.nodes[victim].name),
            Duration::from_secs(1),
        )?;
        println!(
            "agent of {} down: the flow delivered {n} bytes in 1s",
            c.nodes[victim].name
        );
        c.start_agent(victim)?;
        // The restarted agent follows the stream and reconciles (on the
        // first view and then every resync); give it two resync rounds.
        eventually(
            "the restarted agent's view",
            Duration::from_secs(20),
            || {
                c.ensure_running()?;
                if !c.agent_log(victim).contains("view updated") {
                    bail!(
                        "no `view updated` in {}",
                        c.nodes[victim].agent_log().display()
                    );
                }
                Ok(())
            },
        )?;
        stream.delivers_during(
            "after the restart",
            Duration::from_secs(2 * RESYNC_SECONDS + 1),
        )?;
        let log = c.agent_log(victim);
        for line in [
            "overlay reconciled",
            "node state written",
            "node not in its desired state",
        ] {
            assert!(
                !log.contains(line),
                "the restarted agent of {} logged `{line}`: a restart must change nothing\n{log}",
                c.nodes[victim].name
            );
        }
    }
    let after: Vec<String> = (0..3).map(|i| c.overlay_state(i)).collect::<Result<_>>()?;
    for i in 0..3 {
        let gone: Vec<&str> = before[i]
            .lines()
            .filter(|l| !after[i].lines().any(|a| a == *l))
            .collect();
        let new: Vec<&str> = after[i]
            .lines()
            .filter(|l| !before[i].lines().any(|b| b == *l))
            .collect();
        assert!(
            gone.is_empty() && new.is_empty(),
            "{}'s overlay changed across agent restarts: removed {gone:?}, added {new:?}",
            c.nodes[i].name
        );
    }
    drop(stream);
    println!("agent restarts (SIGKILL) on both ends: flow kept, no kernel change");

    // --- a node leaves ---
    let gone = 2;
    let gone_cidr = c.nodes[gone].pod_cidr.clone();
    let gone_ip = c.nodes[gone].ip;
    for i in 0..2 {
        let l = leftovers(&c, i, &gone_cidr, gone_ip)?;
        assert!(
            l.len() >= 3,
            "{} should have a route, neighbour and FDB entry for node-3 before it leaves: {l:?}\n{}",
            c.nodes[i].name,
            c.overlay_state(i)?
        );
    }
    let _ = x;
    c.kill_agent(gone);
    let name = c.nodes[gone].name.clone();
    c.delete(&format!("/api/v1/nodes/{name}"))?;
    let left = Instant::now();
    for i in 0..2 {
        eventually(
            &format!("{} forgetting {name}", c.nodes[i].name),
            Duration::from_secs(3 * RESYNC_SECONDS + 5),
            || {
                let l = leftovers(&c, i, &gone_cidr, gone_ip)?;
                if !l.is_empty() {
                    bail!("still there: {l:?}");
                }
                Ok(())
            },
        )?;
    }
    println!(
        "{name} left: its route, neighbour and FDB entry gone from the other nodes after {:.1}s",
        left.elapsed().as_secs_f64()
    );
    // The rest of the cluster is untouched.
    assert_eq!(http_text(&a.netns, b.ip, HTTP_PORT, "/hostname")?, "server");
    println!("took {:.1}s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// podman with its CNI backend as the runtime of node-1 (shared/runtimes/ci-recipe.sh).
struct Podman {
    root: std::path::PathBuf,
    netns: String,
}

impl Podman {
    fn cmd(&self, args: &[&str]) -> Command {
        // nsenter switches only the network namespace: podman's own netns
        // bind mounts (/run/netns/netns-*) land in the host's mount namespace,
        // where later podman commands find them (`ip netns exec` would hide
        // them in a private mount namespace).
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("podman")
            .args(args)
            .env("CONTAINERS_CONF", self.root.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.root.join("storage.conf"))
            .stdin(std::process::Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.cmd(args).output().context("running podman")?;
        if !out.status.success() {
            bail!(
                "podman {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.cmd(&["rm", "-f", "-t", "0", "--all"]).output();
        let _ = self.cmd(&["rmi", "-af"]).output();
        // Overlay storage may still be mounted; unmount before the temp dir goes.
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.root.join("storage/overlay"))
            .output();
    }
}

fn podman_missing() -> Option<String> {
    for (prog, pkg) in [
        ("podman", "podman"),
        ("runc", "runc"),
        ("conmon", "conmon"),
        ("nsenter", "util-linux"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {prog}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!(
                "{prog} is not installed (Debian package {pkg}; `cargo xtask setup` installs it)"
            ));
        }
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("/bin/busybox is missing (Debian package busybox-static)".into());
    }
    None
}

#[test]
fn cluster_podman_container_reaches_pods() -> Result<()> {
    if skip() {
        return Ok(());
    }
    if let Some(why) = podman_missing() {
        println!("skipped: {why}");
        return Ok(());
    }
    let t0 = Instant::now();
    let mut c = Cluster::up(3)?;
    let target = c.add_pod(1, "e2e", "target", &[])?;
    let root = c.tmp.0.join("podman");
    for d in [
        "net.d",
        "run",
        "storage",
        "cni-bin",
        "rootfs/bin",
        "rootfs/etc",
        "rootfs/tmp",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    // podman's plugin dir holds weft-cni (and nothing else of ours).
    std::os::unix::fs::symlink(weft_e2e::bin("weft-cni")?, root.join("cni-bin/weft-cni"))?;
    let node = &c.nodes[0];
    let mut plugin = node.cni_conf();
    plugin.as_object_mut().map(|o| o.remove("cniVersion"));
    plugin.as_object_mut().map(|o| o.remove("name"));
    plugin["capabilities"] = json!({"portMappings": true});
    std::fs::write(
        root.join("net.d/weft.conflist"),
        json!({"cniVersion": "1.0.0", "name": "weft", "plugins": [plugin]}).to_string(),
    )?;
    // As in the recipe: stay within the hard rlimits, cgroupfs, file events,
    // our own config dir, and default subnets inside 198.18.0.0/15.
    let limit = |flag: &str| -> String {
        let out = Command::new("sh")
            .args(["-c", &format!("ulimit -H{flag}")])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        match out.parse::<u64>() {
            Ok(n) if flag == "u" => n.min(32768).to_string(),
            Ok(n) => n.to_string(),
            Err(_) if flag == "u" => "32768".into(),
            Err(_) => "1048576".into(),
        }
    };
    let (nofile, nproc) = (limit("n"), limit("u"));
    let r = root.display();
    std::fs::write(
        root.join("containers.conf"),
        format!(
            r#"[containers]
log_driver = "k8s-file"
default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{r}/run/events.log"
runtime = "runc"
tmp_dir = "{r}/run/libpod"
volume_path = "{r}/storage/volumes"
[network]
network_backend = "cni"
cni_plugin_dirs = ["{r}/cni-bin", "/usr/lib/cni"]
network_config_dir = "{r}/net.d"
default_network = "weft"
default_subnet = "198.19.254.0/24"
default_subnet_pools = [ {{ "base" = "198.19.128.0/17", "size" = 24 }} ]
"#
        ),
    )?;
    std::fs::write(
        root.join("storage.conf"),
        format!(
            "[storage]\ndriver = \"overlay\"\ngraphroot = \"{r}/storage\"\nrunroot = \"{r}/run/storage\"\n"
        ),
    )?;
    // A registry-free busybox image.
    std::fs::copy("/bin/busybox", root.join("rootfs/bin/busybox"))?;
    for applet in ["sh", "sleep", "wget", "ip", "cat", "httpd"] {
        std::os::unix::fs::symlink("busybox", root.join(format!("rootfs/bin/{applet}")))?;
    }
    std::fs::write(
        root.join("rootfs/etc/passwd"),
        "root:x:0:0:root:/:/bin/sh\n",
    )?;
    std::fs::write(root.join("rootfs/etc/group"), "root:x:0:\n")?;
    let pm = Podman {
        root: root.clone(),
        netns: node.netns.clone(),
    };
    let tar = root.join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(root.join("rootfs"))
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()?;
    assert!(status.success(), "tar failed");
    let img = "localhost/weft-e2e-busybox:latest";
    pm.run(&[
        "import",
        "-q",
        "--change",
        "ENV PATH=/bin",
        &tar.to_string_lossy(),
        img,
    ])?;

    let started = Instant::now();
    pm.run(&[
        "run",
        "-d",
        "--name",
        "pm1",
        "--network",
        "weft",
        // A hostPort: podman hands it to the plugin as runtimeConfig.portMappings.
        "-p",
        "18080:8080",
        img,
        "sleep",
        "600",
    ])?;
    println!(
        "podman run -d on {} took {} ms",
        node.name,
        started.elapsed().as_millis()
    );
    let ip: Ipv4Addr = pm
        .run(&[
            "inspect",
            "pm1",
            "--format",
            "{{(index .NetworkSettings.Networks \"weft\").IPAddress}}",
        ])?
        .parse()
        .context("podman inspect gave no IPv4 address")?;
    let net: Ipv4Addr = node.pod_cidr.split('/').next().unwrap_or("").parse()?;
    assert_eq!(
        u32::from(ip) >> 8,
        u32::from(net) >> 8,
        "the podman container got {ip}, outside {}'s {}",
        node.name,
        node.pod_cidr
    );
    let claim = node.ipam_dir().join(ip.to_string());
    assert!(claim.exists(), "no IPAM claim {}", claim.display());

    // The container reaches a pod on node-2, which sees the container's address.
    let url = |p: &str| format!("http://{}:{HTTP_PORT}{p}", target.ip);
    let name = eventually("podman container -> pod", Duration::from_secs(10), || {
        pm.run(&["exec", "pm1", "wget", "-q", "-O", "-", &url("/hostname")])
    })?;
    assert_eq!(name, "target");
    let seen = pm.run(&["exec", "pm1", "wget", "-q", "-O", "-", &url("/clientip")])?;
    assert_eq!(
        seen,
        ip.to_string(),
        "pod must see the container's own address"
    );
    // And back: the pod reaches the container (ping, busybox has no server here).
    let out = c.exec(
        &target.netns,
        &["ping", "-c", "1", "-W", "2", &ip.to_string()],
    )?;
    assert!(
        out.status.success(),
        "pod -> podman container ping failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    println!(
        "podman container {ip} on node-1 <-> pod {} on node-2",
        target.ip
    );

    // The hostPort: the claim records it and the agent's rules send the
    // node's port 18080 to the container's 8080 (busybox httpd), from outside.
    let text = std::fs::read_to_string(&claim)?;
    assert!(
        text.contains("portMapping=tcp/18080/8080"),
        "the claim does not record the hostPort:\n{text}"
    );
    pm.run(&[
        "exec", "-d", "pm1", "httpd", "-f", "-p", "8080", "-h", "/etc",
    ])?;
    let body = eventually(
        "outside -> hostPort 18080 on node-1",
        Duration::from_secs(15),
        || {
            let (code, body) = http_status(&c.external_ns(), node.ip, 18080, "/group")?;
            anyhow::ensure!(code == 200, "HTTP {code}");
            Ok(body)
        },
    )?;
    assert_eq!(
        body, "root:x:0:\n",
        "the container's /etc/group via the hostPort"
    );
    println!("podman -p 18080:8080: reached from outside through node-1's hostPort");

    // Stop: podman runs CNI DEL, the claim and the netns go.
    let sandbox = pm.run(&[
        "inspect",
        "pm1",
        "--format",
        "{{.NetworkSettings.SandboxKey}}",
    ])?;
    pm.run(&["rm", "-f", "-t", "0", "pm1"])?;
    assert!(
        !claim.exists(),
        "CNI DEL left the claim {}",
        claim.display()
    );
    assert!(
        sandbox.is_empty() || !Path::new(&sandbox).exists(),
        "podman left {sandbox}"
    );
    drop(pm);
    println!("took {:.1}s", t0.elapsed().as_secs_f64());
    Ok(())
}
