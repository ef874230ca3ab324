//! Privileged end-to-end tests: the real `weft-cni` binary executed the way a
//! runtime does (environment + stdin), inside a "node" network namespace with
//! the bridge `weft0` at 198.18.128.1/24, against real pod namespaces.
//!
//! Needs root and iproute2; otherwise each test prints `skipped: <why>`.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use weft_cni::commands::host_ifname;

const BIN: &str = env!("CARGO_BIN_EXE_weft-cni");
const GATEWAY: &str = "198.18.128.1";
const MTU: u32 = 1450;

/// Namespaces and files of one test; everything is removed on drop, also
/// when the test fails.
struct Harness {
    prefix: String,
    node: String,
    namespaces: Vec<String>,
    dir: tempfile::TempDir,
}

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Harness {
    /// `None` (after printing why) when the machine cannot run these tests.
    fn new(test: &str) -> Option<Harness> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("skipped: {test} needs root to create network namespaces");
            return None;
        }
        let prefix = format!("wcni-{}-{test}", std::process::id());
        let node = format!("{prefix}-node");
        let mut h = Harness {
            prefix,
            node: node.clone(),
            namespaces: Vec::new(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        if let Err(e) = h.add_ns(&node) {
            println!("skipped: {test}: `ip netns add` failed: {e}");
            return None;
        }
        for args in [
            vec!["-n", &node, "link", "set", "lo", "up"],
            // A pinned bridge MAC, as the agent sets it, so ports never change it.
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
            ip(&args).expect("set up node namespace");
        }
        h.write_node_state();
        Some(h)
    }

    fn add_ns(&mut self, name: &str) -> Result<(), String> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        Ok(())
    }

    fn pod_ns(&mut self, n: usize) -> String {
        let name = format!("{}-p{n}", self.prefix);
        self.add_ns(&name).expect("create pod namespace");
        name
    }

    fn node_state_path(&self) -> PathBuf {
        self.dir.path().join("node.json")
    }

    fn write_node_state(&self) {
        let state = json!({
            "subnet": "198.18.128.0/24", "gateway": GATEWAY, "mtu": MTU, "bridge": "weft0",
            "clusterCIDR": "198.18.128.0/17",
            "dns": {"nameservers": ["198.19.0.10"], "search": ["svc.cluster.local", "cluster.local"],
                    "options": ["ndots:5"]}
        });
        fs::write(self.node_state_path(), state.to_string()).unwrap();
    }

    fn ipam_dir(&self) -> PathBuf {
        self.dir.path().join("ipam").join("weft")
    }

    fn agent_socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    fn conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version, "name": "weft", "type": "weft-cni",
            "nodeStatePath": self.node_state_path(),
            "ipamDir": self.dir.path().join("ipam"),
            "agentSocket": self.agent_socket(),
        })
    }

    /// Execute the plugin in the node namespace like a runtime would.
    fn plugin(&self, env: &[(&str, &str)], conf: &Value) -> (i32, Value) {
        run_plugin(&self.node, env, conf)
    }

    fn add(&self, cid: &str, pod: &str, version: &str) -> (i32, Value) {
        self.add_with(cid, pod, &self.conf(version))
    }

    fn add_with(&self, cid: &str, pod: &str, conf: &Value) -> (i32, Value) {
        let netns = format!("/run/netns/{pod}");
        self.plugin(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", cid),
                ("CNI_NETNS", &netns),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/opt/cni/bin"),
                (
                    "CNI_ARGS",
                    &format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod-{cid};K8S_POD_UID=uid-{cid}"),
                ),
            ],
            conf,
        )
    }

    fn del(&self, cid: &str, netns: &str, conf: &Value) -> (i32, Value) {
        self.plugin(
            &[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", cid),
                ("CNI_NETNS", netns),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/opt/cni/bin"),
            ],
            conf,
        )
    }

    fn check(&self, cid: &str, pod: &str, prev: &Value) -> (i32, Value) {
        self.check_with(cid, pod, prev, self.conf("1.1.0"))
    }

    fn check_with(&self, cid: &str, pod: &str, prev: &Value, mut conf: Value) -> (i32, Value) {
        conf["prevResult"] = prev.clone();
        self.plugin(
            &[
                ("CNI_COMMAND", "CHECK"),
                ("CNI_CONTAINERID", cid),
                ("CNI_NETNS", &format!("/run/netns/{pod}")),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/opt/cni/bin"),
            ],
            &conf,
        )
    }

    fn node_cat(&self, path: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.node, "cat", path])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn node_has_link(&self, name: &str) -> bool {
        ip(&["-n", &self.node, "link", "show", name]).is_ok()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

fn run_plugin(node: &str, env: &[(&str, &str)], conf: &Value) -> (i32, Value) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", node, BIN])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn plugin");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {stdout:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    (out.status.code().unwrap_or(-1), value)
}

fn pod_ip(result: &Value) -> Ipv4Addr {
    result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// TCP from the pod namespace to a listener on the gateway address in the
/// node namespace: proves ARP, the bridge port and the routes work.
fn tcp_reaches_gateway(node: &str, pod: &str) -> bool {
    let node_ns = fs::File::open(format!("/run/netns/{node}")).unwrap();
    let pod_ns = fs::File::open(format!("/run/netns/{pod}")).unwrap();
    let listener = weft_cni::netns::run_in(&node_ns, || TcpListener::bind((GATEWAY, 0)))
        .unwrap()
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let addr: SocketAddr = format!("{GATEWAY}:{port}").parse().unwrap();
    weft_cni::netns::run_in(&pod_ns, move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).is_ok()
    })
    .unwrap()
}

fn json_of(out: &str) -> Value {
    serde_json::from_str(out).unwrap()
}

#[test]
fn add_check_del_lifecycle() {
    let Some(mut h) = Harness::new("life") else {
        return;
    };
    let pod = h.pod_ns(1);
    let listener = std::os::unix::net::UnixListener::bind(h.agent_socket()).unwrap();

    let (code, res) = h.add("c1", &pod, "1.1.0");
    assert_eq!(code, 0, "{res}");
    assert_eq!(res["cniVersion"], "1.1.0");
    let ip_addr = pod_ip(&res);
    assert!(
        ip_addr.octets()[..3] == [198, 18, 128] && ip_addr.octets()[3] > 1,
        "{res}"
    );
    assert_eq!(res["ips"][0]["gateway"], GATEWAY);
    assert_eq!(res["routes"], json!([{"dst": "0.0.0.0/0", "gw": GATEWAY}]));
    assert_eq!(res["dns"]["nameservers"], json!(["198.19.0.10"]));
    assert_eq!(res["interfaces"][1]["sandbox"], format!("/run/netns/{pod}"));
    let host_if = host_ifname("c1", "eth0");
    assert_eq!(res["interfaces"][0]["name"], host_if);

    // Pod side: address, MTU, default route.
    let addrs = json_of(&ip(&["-n", &pod, "-j", "addr", "show", "eth0"]).unwrap());
    let a = &addrs[0];
    assert_eq!(a["mtu"], MTU);
    assert_eq!(a["address"], res["interfaces"][1]["mac"]);
    assert!(a["flags"].as_array().unwrap().contains(&json!("UP")));
    let inet: Vec<&Value> = a["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["family"] == "inet")
        .collect();
    assert_eq!(inet.len(), 1);
    assert_eq!(inet[0]["local"], ip_addr.to_string());
    assert_eq!(inet[0]["prefixlen"], 24);
    let routes = json_of(&ip(&["-n", &pod, "-j", "route", "show", "default"]).unwrap());
    assert_eq!(routes[0]["gateway"], GATEWAY);
    assert_eq!(routes[0]["dev"], "eth0");

    // Host side: bridge port, MTU, hairpin, accept_ra.
    let link = json_of(&ip(&["-n", &h.node, "-j", "link", "show", &host_if]).unwrap());
    assert_eq!(link[0]["master"], "weft0");
    assert_eq!(link[0]["mtu"], MTU);
    assert_eq!(
        h.node_cat(&format!("/sys/class/net/{host_if}/brport/hairpin_mode")),
        "1"
    );
    assert_eq!(
        h.node_cat(&format!("/proc/sys/net/ipv6/conf/{host_if}/accept_ra")),
        "0"
    );

    assert!(
        tcp_reaches_gateway(&h.node, &pod),
        "pod cannot reach the gateway"
    );

    // The claim carries the pod identity for the agent.
    let claim = fs::read_to_string(h.ipam_dir().join(ip_addr.to_string())).unwrap();
    assert!(claim.starts_with("c1\neth0\n"), "{claim}");
    assert!(claim.contains("podNamespace=default\n") && claim.contains("podName=pod-c1\n"));

    // The agent was told.
    listener.set_nonblocking(true).unwrap();
    let (conn, _) = listener
        .accept()
        .expect("plugin connected to the agent socket");
    let mut line = String::new();
    conn.set_nonblocking(false).unwrap();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(conn), &mut line).unwrap();
    let ev = json_of(&line);
    assert_eq!(ev["op"], "add");
    assert_eq!(ev["podName"], "pod-c1");
    assert_eq!(ev["podUID"], "uid-c1");
    assert_eq!(ev["ip"], format!("{ip_addr}/24"));

    // CHECK passes, then fails once the address is gone.
    let (code, out) = h.check("c1", &pod, &res);
    assert_eq!(code, 0, "{out}");
    ip(&["-n", &pod, "addr", "flush", "dev", "eth0"]).unwrap();
    let (code, out) = h.check("c1", &pod, &res);
    assert_eq!(code, 1);
    assert_eq!(out["code"], 102, "{out}");
    assert!(out["msg"].as_str().unwrap().contains("address"), "{out}");

    // DEL twice with prevResult, then with an empty netns and no prevResult.
    let mut conf = h.conf("1.1.0");
    conf["prevResult"] = res.clone();
    let netns = format!("/run/netns/{pod}");
    for _ in 0..2 {
        let (code, out) = h.del("c1", &netns, &conf);
        assert_eq!(code, 0, "{out}");
        assert_eq!(out, Value::Null);
    }
    let (code, out) = h.del("c1", "", &h.conf("1.1.0"));
    assert_eq!(code, 0, "{out}");
    assert!(!h.node_has_link(&host_if));
    assert!(ip(&["-n", &pod, "link", "show", "eth0"]).is_err());
    assert!(!h.ipam_dir().join(ip_addr.to_string()).exists());
}

#[test]
fn legacy_result_versions() {
    let Some(mut h) = Harness::new("legacy") else {
        return;
    };
    for (n, version) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0"].into_iter().enumerate() {
        let pod = h.pod_ns(n);
        let cid = format!("legacy{n}");
        let (code, res) = h.add(&cid, &pod, version);
        assert_eq!(code, 0, "{res}");
        assert_eq!(res["cniVersion"], version);
        if version.starts_with('0') {
            assert_eq!(res["ips"][0]["version"], "4");
        } else {
            assert!(res["ips"][0].get("version").is_none());
        }
        assert!(res["interfaces"][0].get("mtu").is_none());
        let (code, out) = h.del(&cid, &format!("/run/netns/{pod}"), &h.conf(version));
        assert_eq!(code, 0, "{out}");
    }
    let (code, out) = h.add("x", "does-not-exist", "0.2.0");
    assert_eq!((code, out["code"].clone()), (1, json!(1)), "{out}");
}

#[test]
fn status_needs_node_state_and_bridge() {
    let Some(h) = Harness::new("status") else {
        return;
    };
    let status = |h: &Harness| h.plugin(&[("CNI_COMMAND", "STATUS")], &h.conf("1.1.0"));
    let (code, out) = status(&h);
    assert_eq!(code, 0, "{out}");
    fs::remove_file(h.node_state_path()).unwrap();
    let (code, out) = status(&h);
    assert_eq!(code, 1);
    assert_eq!(out["code"], 50, "{out}");
    assert!(out["details"].as_str().unwrap().contains("node.json"));
    h.write_node_state();
    ip(&["-n", &h.node, "link", "del", "weft0"]).unwrap();
    let (_, out) = status(&h);
    assert_eq!(out["code"], 50, "{out}");
    assert!(out["msg"].as_str().unwrap().contains("weft0"));
}

#[test]
fn add_failures_release_everything_and_del_still_works() {
    let Some(mut h) = Harness::new("partial") else {
        return;
    };
    // A missing netns: container unknown, nothing allocated.
    let (code, out) = h.add("gone", "no-such-ns", "1.1.0");
    assert_eq!((code, out["code"].clone()), (1, json!(3)), "{out}");

    // The requested ifname is taken inside the pod: the veth cannot be
    // created, so the address must go back and no host link may remain.
    let pod = h.pod_ns(1);
    ip(&["-n", &pod, "link", "add", "eth0", "type", "bridge"]).unwrap();
    let (code, out) = h.add("clash", &pod, "1.1.0");
    assert_eq!(code, 1, "{out}");
    assert_eq!(out["code"], 100, "{out}");
    assert!(!h.node_has_link(&host_ifname("clash", "eth0")));
    let claims: Vec<_> = fs::read_dir(h.ipam_dir())
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .filter(|n| n.parse::<Ipv4Addr>().is_ok())
        .collect();
    assert!(claims.is_empty(), "address leaked: {claims:?}");

    // The runtime's DEL after the failed ADD, without prevResult, succeeds.
    let (code, out) = h.del("clash", &format!("/run/netns/{pod}"), &h.conf("1.1.0"));
    assert_eq!(code, 0, "{out}");
    // Node state missing: ADD asks to retry later, DEL still works.
    fs::remove_file(h.node_state_path()).unwrap();
    let pod2 = h.pod_ns(2);
    let (_, out) = h.add("later", &pod2, "1.1.0");
    assert_eq!(out["code"], 11, "{out}");
    let (code, out) = h.del("later", "", &h.conf("1.1.0"));
    assert_eq!(code, 0, "{out}");
}

#[test]
fn gc_removes_stale_attachments() {
    let Some(mut h) = Harness::new("gc") else {
        return;
    };
    let keep_pod = h.pod_ns(1);
    let stale_pod = h.pod_ns(2);
    let (code, keep) = h.add("keep", &keep_pod, "1.1.0");
    assert_eq!(code, 0, "{keep}");
    let (code, stale) = h.add("stale", &stale_pod, "1.1.0");
    assert_eq!(code, 0, "{stale}");
    // A claim left by a crashed plugin with no interface at all.
    fs::write(h.ipam_dir().join("198.18.128.200"), "crashed\neth0\n").unwrap();

    let mut conf = h.conf("1.1.0");
    conf["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    let (code, out) = h.plugin(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        &conf,
    );
    assert_eq!(code, 0, "{out}");
    assert!(h.ipam_dir().join(pod_ip(&keep).to_string()).exists());
    assert!(!h.ipam_dir().join(pod_ip(&stale).to_string()).exists());
    assert!(!h.ipam_dir().join("198.18.128.200").exists());
    assert!(h.node_has_link(&host_ifname("keep", "eth0")));
    assert!(!h.node_has_link(&host_ifname("stale", "eth0")));

    // The legacy key alone is honoured too.
    let mut conf = h.conf("1.1.0");
    conf["cni.dev/attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    let (code, out) = h.plugin(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        &conf,
    );
    assert_eq!(code, 0, "{out}");
    assert!(h.ipam_dir().join(pod_ip(&keep).to_string()).exists());
}

#[test]
fn concurrent_adds_get_distinct_addresses() {
    let Some(mut h) = Harness::new("conc") else {
        return;
    };
    const N: usize = 200;
    let pods: Vec<String> = (0..N).map(|i| h.pod_ns(i)).collect();
    let node = h.node.clone();
    let conf = h.conf("1.1.0");
    let results: Vec<(i32, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let (node, conf) = (&node, &conf);
                s.spawn(move || {
                    let netns = format!("/run/netns/{pod}");
                    let cid = format!("conc{i}");
                    run_plugin(
                        node,
                        &[
                            ("CNI_COMMAND", "ADD"),
                            ("CNI_CONTAINERID", &cid),
                            ("CNI_NETNS", &netns),
                            ("CNI_IFNAME", "eth0"),
                            ("CNI_PATH", "/opt/cni/bin"),
                        ],
                        conf,
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut seen = HashSet::new();
    for (code, res) in &results {
        assert_eq!(*code, 0, "{res}");
        assert!(
            seen.insert(pod_ip(res)),
            "duplicate address {}",
            pod_ip(res)
        );
    }
    assert_eq!(seen.len(), N);
    // Every pod really has its address.
    for (pod, (_, res)) in pods.iter().zip(&results) {
        let out = ip(&["-n", pod, "-4", "-o", "addr", "show", "eth0"]).unwrap();
        assert!(out.contains(&format!("{}/24", pod_ip(res))), "{pod}: {out}");
    }
    assert!(tcp_reaches_gateway(&h.node, &pods[N - 1]));
    std::thread::scope(|s| {
        for (i, pod) in pods.iter().enumerate() {
            let (node, conf) = (&node, &conf);
            s.spawn(move || {
                let netns = format!("/run/netns/{pod}");
                let cid = format!("conc{i}");
                let (code, out) = run_plugin(
                    node,
                    &[
                        ("CNI_COMMAND", "DEL"),
                        ("CNI_CONTAINERID", &cid),
                        ("CNI_NETNS", &netns),
                        ("CNI_IFNAME", "eth0"),
                    ],
                    conf,
                );
                assert_eq!(code, 0, "{out}");
            });
        }
    });
    let left = fs::read_dir(h.ipam_dir())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_str()
                .is_some_and(|n| n.parse::<Ipv4Addr>().is_ok())
        })
        .count();
    assert_eq!(left, 0);
}

/// The file names of the claims in the IPAM directory.
fn claim_files(h: &Harness) -> Vec<String> {
    match fs::read_dir(h.ipam_dir()) {
        Ok(dir) => dir
            .filter_map(|e| e.unwrap().file_name().into_string().ok())
            .filter(|n| n.parse::<Ipv4Addr>().is_ok())
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn host_ports_are_recorded_in_the_claim() {
    let Some(mut h) = Harness::new("hostport") else {
        return;
    };
    let pod = h.pod_ns(1);
    let with_ports = |ports: Value| {
        let mut conf = h.conf("1.1.0");
        conf["runtimeConfig"] = json!({ "portMappings": ports });
        conf
    };

    // An invalid entry: code 7 naming it, and nothing allocated or created.
    let bad = with_ports(json!([
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""},
        {"hostPort": 70000, "containerPort": 80, "protocol": "tcp", "hostIP": ""}
    ]));
    let (code, out) = h.add_with("hp", &pod, &bad);
    assert_eq!((code, out["code"].clone()), (1, json!(7)), "{out}");
    assert!(
        out["msg"]
            .as_str()
            .unwrap()
            .contains("runtimeConfig.portMappings[1].hostPort"),
        "{out}"
    );
    assert!(claim_files(&h).is_empty());
    assert!(!h.node_has_link(&host_ifname("hp", "eth0")));
    // The runtime's DEL after that failed ADD carries the same config: it succeeds.
    let (code, out) = h.del("hp", &format!("/run/netns/{pod}"), &bad);
    assert_eq!(code, 0, "{out}");

    // podman's shape and containerd's capitalised keys, in one list.
    let good = with_ports(json!([
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""},
        {"HostPort": 5353, "ContainerPort": 53, "Protocol": "udp", "HostIP": "198.18.0.11"}
    ]));
    let (code, res) = h.add_with("hp", &pod, &good);
    assert_eq!(code, 0, "{res}");
    let ip_addr = pod_ip(&res);
    let claim = fs::read_to_string(h.ipam_dir().join(ip_addr.to_string())).unwrap();
    assert!(
        claim.ends_with("portMapping=tcp/8080/80\nportMapping=udp/5353/53/198.18.0.11\n"),
        "{claim}"
    );

    // CHECK with the same mappings (any order) passes; with others it fails.
    let reordered = with_ports(json!([
        {"hostPort": 5353, "containerPort": 53, "protocol": "UDP", "hostIP": "198.18.0.11"},
        {"hostPort": 8080, "containerPort": 80}
    ]));
    let (code, out) = h.check_with("hp", &pod, &res, reordered);
    assert_eq!(code, 0, "{out}");
    let (code, out) = h.check_with("hp", &pod, &res, h.conf("1.1.0"));
    assert_eq!((code, out["code"].clone()), (1, json!(102)), "{out}");
    assert!(out["msg"].as_str().unwrap().contains("hostPorts"), "{out}");

    // DEL frees the claim and its mappings with it.
    let (code, out) = h.del("hp", &format!("/run/netns/{pod}"), &good);
    assert_eq!(code, 0, "{out}");
    assert!(claim_files(&h).is_empty());
}
