//! `netctl ebpf` against a real agent running the eBPF dataplane on the
//! simulated cluster (tests/src/cluster.rs): after a pod uses a ClusterIP
//! with ClientIP affinity and an outside host a NodePort, the node's maps
//! show both frontends with their Services and backends, the pod's
//! affinity entry and the masqueraded north-south connection. Without root
//! or cgroup v2 the tests print `skipped: <why>`; on an iptables node the
//! command says which dataplane the node runs.

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::net::Ipv4Addr;
use std::time::Duration;
use weft_e2e::cluster::{
    cgroup_skip_reason, eventually, http_text, Cluster, Dataplane, EXTERNAL_IP, HTTP_PORT,
};

const NS: &str = "svc";
const WAIT: Duration = Duration::from_secs(20);

fn service(c: &Cluster, name: &str, spec: Value) -> Result<Value> {
    c.post(
        &format!("/api/v1/namespaces/{NS}/services"),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS}, "spec": spec}),
    )
}

/// `netctl ebpf` on node `i`, with `extra` flags; its stdout.
fn netctl_ebpf(c: &Cluster, i: usize, extra: &[&str]) -> Result<String> {
    let out = std::process::Command::new(weft_e2e::bin("netctl")?)
        .arg("ebpf")
        .arg("--socket")
        .arg(&c.nodes[i].socket)
        .args(extra)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "netctl ebpf failed: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

/// The line of `text` holding every one of `parts`.
fn line_with<'a>(text: &'a str, parts: &[&str]) -> Result<&'a str> {
    text.lines()
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .with_context(|| format!("no line with {parts:?} in:\n{text}"))
}

#[test]
fn netctl_ebpf_shows_frontends_affinity_and_connections() -> Result<()> {
    if let Some(why) = cgroup_skip_reason() {
        println!("skipped: {why}");
        return Ok(());
    }
    let mut c = Cluster::up_with(2, Dataplane::Ebpf)?;
    let w1 = c.add_pod(0, NS, "web-1", &[("app", "web")])?;
    let w2 = c.add_pod(1, NS, "web-2", &[("app", "web")])?;
    let client = c.add_pod(0, NS, "client-1", &[("app", "client")])?;
    let node_ip = c.nodes[0].ip;
    let ext = c.external_ns();

    let sticky = service(
        &c,
        "sticky",
        json!({"selector": {"app": "web"}, "sessionAffinity": "ClientIP",
               "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
               "ports": [{"name": "http", "port": 80, "targetPort": HTTP_PORT}]}),
    )?;
    let sticky_ip: Ipv4Addr = sticky["spec"]["clusterIP"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no clusterIP in {}", sticky["spec"]))?;
    let np_svc = service(
        &c,
        "web-np",
        json!({"type": "NodePort", "selector": {"app": "web"},
               "ports": [{"name": "http", "port": 80, "targetPort": HTTP_PORT}]}),
    )?;
    let np = np_svc["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .map(|p| p as u16)
        .with_context(|| format!("no nodePort in {}", np_svc["spec"]))?;

    // Traffic that leaves entries behind: the pod sticks to a backend, the
    // outside host's connection is translated (and masqueraded) on node-1.
    let ip_of = |name: &str| if name == w1.name { w1.ip } else { w2.ip };
    let hostname = || -> Result<String> {
        let h = http_text(&client.netns, sticky_ip, 80, "/hostname")?;
        Ok(h.trim().to_string())
    };
    eventually("client-1 -> sticky", WAIT, || {
        let h = hostname()?;
        ensure!(h == w1.name || h == w2.name, "answered by {h:?}");
        Ok(())
    })?;
    // The first answer may have raced the programming: stick from here.
    let stuck = hostname()?;
    ensure!(hostname()? == stuck, "affinity broken");
    eventually("external -> NodePort", WAIT, || {
        let h = http_text(&ext, node_ip, np, "/hostname")?;
        ensure!(
            h.trim() == w1.name || h.trim() == w2.name,
            "answered by {h:?}"
        );
        Ok(())
    })?;

    let text = netctl_ebpf(&c, 0, &[])?;
    println!("{text}");

    // Header: the dataplane and where its programs are attached.
    ensure!(
        text.starts_with("dataplane: ebpf   maps pinned in "),
        "{text}"
    );
    line_with(
        &text,
        &[
            "socket programs: weft_connect4, weft_sendmsg4, weft_recvmsg4, weft_getpeername4 on cgroup ",
        ],
    )?;
    let tc = line_with(&text, &["tc ingress: "])?;
    for dev in ["eth0", "weft0", "weft.1"] {
        ensure!(tc.contains(dev), "TC not on {dev}: {tc}");
    }
    line_with(&text, &[&format!("node: {node_ip} on eth0 (ifindex ")])?;

    // Frontends: the sticky ClusterIP for this node's sockets with both
    // backends and its affinity; the NodePort from outside, masqueraded.
    let local = format!("{}:{HTTP_PORT} (local)", w1.ip);
    let remote = format!("{}:{HTTP_PORT}", w2.ip);
    let f = line_with(
        &text,
        &[
            &format!("{sticky_ip}:80/TCP "),
            " socket ",
            "svc/sticky (ClusterIP)",
        ],
    )?;
    ensure!(
        f.contains(&local) && f.contains(&remote) && f.ends_with("[affinity 600s]"),
        "{f}"
    );
    let f = line_with(
        &text,
        &[
            &format!("{node_ip}:{np}/TCP "),
            " external ",
            "svc/web-np (NodePort)",
        ],
    )?;
    ensure!(
        f.contains(&local) && f.contains(&remote) && f.ends_with("[snat]"),
        "{f}"
    );

    // client-1's affinity entry: its network namespace, named, and the
    // backend it sticks to.
    let a = line_with(
        &text,
        &["svc/sticky", "(pod svc/client-1)", "netns cookie "],
    )?;
    ensure!(
        a.contains(&format!("-> {}:{HTTP_PORT}", ip_of(&stuck))),
        "client-1 answered by {stuck}, but: {a}"
    );

    // The outside host's connection, both entries present.
    let conn = line_with(
        &text,
        &[
            &format!("TCP  {EXTERNAL_IP}:"),
            &format!(" -> {node_ip}:{np} => "),
            "(masqueraded as ",
            "[svc/web-np, via ",
        ],
    )?;
    ensure!(
        [w1.ip, w2.ip]
            .iter()
            .any(|ip| conn.contains(&format!("=> {ip}:{HTTP_PORT} "))),
        "{conn}"
    );
    ensure!(
        !conn.contains("only"),
        "one entry of the pair missing: {conn}"
    );

    // Map fill: the sticky cluster IP and web-np's cluster IP and NodePort,
    // two scopes each (other Services may exist, e.g. the cluster's DNS).
    let svc = line_with(&text, &["WEFT_SVC  "])?;
    let entries: u64 = svc
        .split_whitespace()
        .nth(1)
        .and_then(|e| e.split('/').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no count in {svc}"))?;
    ensure!(entries >= 6, "{svc}");
    line_with(&text, &["WEFT_CT  ", "/262144"])?;

    // The same answer as JSON.
    let v: Value = serde_json::from_str(&netctl_ebpf(&c, 0, &["--json"])?)?;
    ensure!(v["dataplane"] == "ebpf", "{v}");
    let fronts = v["frontends"].as_array().context("no frontends")?;
    ensure!(
        fronts.iter().any(|f| f["service"] == "svc/sticky"
            && f["scope"] == "socket"
            && f["affinity"]["timeoutSeconds"] == 600
            && f["matchesPlan"] == true),
        "{v:#}"
    );
    ensure!(
        v["connections"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["service"] == "svc/web-np")),
        "{v:#}"
    );
    Ok(())
}

#[test]
fn netctl_ebpf_on_an_iptables_node_names_its_dataplane() -> Result<()> {
    if weft_e2e::cluster::skip() {
        return Ok(());
    }
    let c = Cluster::up_with(1, Dataplane::Iptables)?;
    let out = std::process::Command::new(weft_e2e::bin("netctl")?)
        .arg("ebpf")
        .arg("--socket")
        .arg(&c.nodes[0].socket)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(!out.status.success(), "netctl ebpf succeeded: {text}");
    ensure!(
        text == "error from the agent: this node runs the iptables dataplane\n",
        "{text}"
    );
    Ok(())
}
