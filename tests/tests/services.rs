//! Kubernetes `[sig-network] Services` behaviour end to end, on the simulated
//! cluster (tests/src/cluster.rs), once with each service dataplane
//! (iptables, eBPF): real packets from pods on both nodes, from a node
//! itself and from a host outside the cluster. Where the two differ by
//! design the test says so (a socket cannot hang like a dropped packet, so
//! eBPF refuses a Local-policy miss with EHOSTUNREACH at connect time).
//! Without root (or, for eBPF, cgroup v2) each test prints `skipped: <why>`.

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};
use weft_e2e::cluster::{
    cgroup_skip_reason, eventually, http_status, http_text, in_netns, skip, try_connect,
    udp_request, Cluster, Connect, Dataplane, Pod, HTTP_PORT,
};

const NS: &str = "svc";
const WAIT: Duration = Duration::from_secs(15);

fn service(c: &Cluster, name: &str, spec: Value) -> Result<Value> {
    c.post(
        &format!("/api/v1/namespaces/{NS}/services"),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS}, "spec": spec}),
    )
}

fn cluster_ip(svc: &Value) -> Result<Ipv4Addr> {
    svc["spec"]["clusterIP"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no clusterIP in {}", svc["spec"]))
}

fn node_port(svc: &Value, i: usize) -> Result<u16> {
    svc["spec"]["ports"][i]["nodePort"]
        .as_u64()
        .map(|p| p as u16)
        .with_context(|| format!("no nodePort in {}", svc["spec"]))
}

/// The hostname of the pod that answered `GET /hostname` at ip:port.
fn hostname(from: &str, ip: Ipv4Addr, port: u16) -> Result<String> {
    Ok(http_text(from, ip, port, "/hostname")?.trim().to_string())
}

/// Wait until ip:port answers from `from` with one of `names`.
fn reaches(from: &str, ip: Ipv4Addr, port: u16, names: &[&str]) -> Result<String> {
    eventually(&format!("{from} -> {ip}:{port}"), WAIT, || {
        let h = hostname(from, ip, port)?;
        ensure!(
            names.contains(&h.as_str()),
            "answered by {h}, expected one of {names:?}"
        );
        Ok(h)
    })
}

/// Wait until a connection from `from` to ip:port ends the way `want` says.
fn connects(from: &str, ip: Ipv4Addr, port: u16, want: Connect) -> Result<()> {
    let addr = SocketAddr::from((ip, port));
    eventually(&format!("{from} -> {addr} {want:?}"), WAIT, || {
        let got = try_connect(from, addr, Duration::from_secs(2));
        ensure!(got == want, "{got:?}");
        Ok(())
    })
}

/// The distinct backends seen over `n` new connections.
fn spread(from: &str, ip: Ipv4Addr, port: u16, n: usize) -> Result<Vec<String>> {
    let mut seen = Vec::new();
    for _ in 0..n {
        let h = hostname(from, ip, port)?;
        if !seen.contains(&h) {
            seen.push(h);
        }
    }
    seen.sort();
    Ok(seen)
}

fn names(pods: &[&Pod]) -> Vec<String> {
    pods.iter().map(|p| p.name.clone()).collect()
}

/// Whether a cluster with `dp` can run here; prints `skipped: why` if not.
fn runnable(dp: Dataplane) -> bool {
    match dp {
        Dataplane::Iptables => !skip(),
        Dataplane::Ebpf => match cgroup_skip_reason() {
            Some(why) => {
                println!("skipped: {why}");
                false
            }
            None => true,
        },
    }
}

/// A connection the Service's traffic policy leaves no endpoint for: the
/// packet is dropped (iptables, and north-south eBPF), or the socket is
/// refused at connect() with EHOSTUNREACH (eBPF socket programs).
fn not_served(from: &str, ip: Ipv4Addr, port: u16, socket_level: bool) -> Result<()> {
    if !socket_level {
        return connects(from, ip, port, Connect::TimedOut);
    }
    let addr = SocketAddr::from((ip, port));
    eventually(
        &format!("{from} -> {addr} host unreachable"),
        WAIT,
        || match try_connect(from, addr, Duration::from_secs(2)) {
            // EHOSTUNREACH
            Connect::Failed(e) if e.contains("os error 113") => Ok(()),
            other => bail!("{other:?}"),
        },
    )
}

#[test]
fn services_cluster_ips_node_ports_affinity_and_type_changes_iptables() -> Result<()> {
    cluster_ips_node_ports_affinity_and_type_changes(Dataplane::Iptables)
}

#[test]
fn services_cluster_ips_node_ports_affinity_and_type_changes_ebpf() -> Result<()> {
    cluster_ips_node_ports_affinity_and_type_changes(Dataplane::Ebpf)
}

fn cluster_ips_node_ports_affinity_and_type_changes(dp: Dataplane) -> Result<()> {
    if !runnable(dp) {
        return Ok(());
    }
    let t0 = Instant::now();
    let mut c = Cluster::up_with(2, dp)?;
    let w1 = c.add_pod(0, NS, "web-1", &[("app", "web")])?;
    let w2 = c.add_pod(1, NS, "web-2", &[("app", "web")])?;
    let w3 = c.add_pod(1, NS, "web-3", &[("app", "web")])?;
    let c1 = c.add_pod(0, NS, "client-1", &[("app", "client")])?;
    let c2 = c.add_pod(1, NS, "client-2", &[("app", "client")])?;
    let web = [&w1, &w2, &w3];
    let web_names = names(&web);
    let web_names: Vec<&str> = web_names.iter().map(String::as_str).collect();
    let node0 = c.nodes[0].netns.clone();
    let node_ip = [c.nodes[0].ip, c.nodes[1].ip];
    let ext = c.external_ns();

    // Multiport ClusterIP, named targetPorts, the same port on TCP and UDP.
    let svc = service(
        &c,
        "web",
        json!({"selector": {"app": "web"}, "ports": [
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
            {"name": "udp", "port": 80, "protocol": "UDP", "targetPort": "udp"},
            {"name": "alt", "port": 81, "protocol": "TCP", "targetPort": HTTP_PORT}
        ]}),
    )?;
    let vip = cluster_ip(&svc)?;
    for from in [&c1.netns, &c2.netns, &node0] {
        reaches(from, vip, 80, &web_names)?;
        reaches(from, vip, 81, &web_names)?;
        let answer = udp_request(from, vip, 80, b"ping")?;
        let answer = String::from_utf8_lossy(&answer).into_owned();
        ensure!(
            web_names.iter().any(|n| answer == format!("{n}:ping")),
            "UDP via {vip}:80 from {from}: {answer:?}"
        );
    }
    // Spread over every backend (no affinity): P(missing one in 30) < 1e-5.
    let seen = spread(&c1.netns, vip, 80, 30)?;
    ensure!(seen.len() == 3, "30 connections reached only {seen:?}");
    // Pod -> ClusterIP keeps the pod's source.
    let seen_ip = http_text(&c1.netns, vip, 80, "/clientip")?;
    ensure!(
        seen_ip.trim() == c1.ip.to_string(),
        "the backend saw {seen_ip:?}, not client-1's {}",
        c1.ip
    );
    println!(
        "ClusterIP multiport TCP+UDP from pods on both nodes and a node: ok ({:.1}s)",
        t0.elapsed().as_secs_f64()
    );

    // NodePort: on every node's address, from outside, masqueraded (ETP Cluster).
    let np_svc = service(
        &c,
        "web-np",
        json!({"type": "NodePort", "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    )?;
    let np = node_port(&np_svc, 0)?;
    for ip in node_ip {
        reaches(&ext, ip, np, &web_names)?;
        let client = http_text(&ext, ip, np, "/clientip")?;
        ensure!(
            client.trim() != c.external_ip().to_string(),
            "externalTrafficPolicy Cluster must masquerade, the backend saw {client}"
        );
    }
    reaches(&c2.netns, node_ip[0], np, &web_names)?;
    reaches(&node0, node_ip[0], np, &web_names)?;
    // Not on 127.0.0.1 unless enabled.
    let lo = try_connect(
        &node0,
        SocketAddr::from(([127, 0, 0, 1], np)),
        Duration::from_secs(2),
    );
    ensure!(
        lo != Connect::Connected,
        "NodePort answered on 127.0.0.1: {lo:?}"
    );
    // ... unless enabled: node-2's agent restarted with --localhost-node-ports.
    c.kill_agent(1);
    c.nodes[1].agent_args = vec!["--localhost-node-ports".into()];
    c.start_agent(1)?;
    let node1 = c.nodes[1].netns.clone();
    let seen = eventually("NodePort on 127.0.0.1", WAIT, || {
        let seen = spread(&node1, Ipv4Addr::LOCALHOST, np, 20)?;
        ensure!(
            seen.len() == 3,
            "20 connections to 127.0.0.1:{np} reached only {seen:?}"
        );
        Ok(seen)
    })?;
    println!("NodePort from outside, a pod and the node; on 127.0.0.1 only when enabled (reached {seen:?}): ok");

    // Session affinity ClientIP: one backend per client until the timeout.
    let sticky = service(
        &c,
        "sticky",
        json!({"selector": {"app": "web"}, "sessionAffinity": "ClientIP",
               "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 2}},
               "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    )?;
    let sticky_ip = cluster_ip(&sticky)?;
    reaches(&c1.netns, sticky_ip, 80, &web_names)?;
    // The connection that first got through may have been sent before the
    // Service was programmed (its retransmitted SYN then translated on the
    // way, under another client key): take the first choice from a new one.
    let first = hostname(&c1.netns, sticky_ip, 80)?;
    for _ in 0..15 {
        let h = hostname(&c1.netns, sticky_ip, 80)?;
        ensure!(h == first, "affinity broken: {first} then {h}");
    }
    // After the timeout a new choice is made: P(same backend 12 times in a row) = 3^-12.
    let mut moved = false;
    for _ in 0..12 {
        std::thread::sleep(Duration::from_millis(3100));
        if hostname(&c1.netns, sticky_ip, 80)? != first {
            moved = true;
            break;
        }
    }
    ensure!(moved, "affinity never expired after its 2s timeout");
    // Turning affinity off spreads again.
    c.update(&format!("/api/v1/namespaces/{NS}/services/sticky"), |s| {
        s["spec"]["sessionAffinity"] = "None".into();
        s["spec"]
            .as_object_mut()
            .map(|m| m.remove("sessionAffinityConfig"));
    })?;
    eventually("affinity off spreads", WAIT, || {
        let seen = spread(&c1.netns, sticky_ip, 80, 20)?;
        ensure!(seen.len() > 1, "still only {seen:?}");
        Ok(())
    })?;
    println!("session affinity on, its timeout, and off: ok");

    // Type changes: ExternalName -> ClusterIP -> NodePort -> ClusterIP.
    service(
        &c,
        "morph",
        json!({"type": "ExternalName", "externalName": "web.example.test"}),
    )?;
    let path = format!("/api/v1/namespaces/{NS}/services/morph");
    let morphed = c.update(&path, |s| {
        s["spec"] = json!({"type": "ClusterIP", "selector": {"app": "web"},
                           "ports": [{"name": "http", "port": 80, "targetPort": "http"}]});
    })?;
    let morph_ip = cluster_ip(&morphed)?;
    reaches(&c1.netns, morph_ip, 80, &web_names)?;
    let morphed = c.update(&path, |s| s["spec"]["type"] = "NodePort".into())?;
    let morph_np = node_port(&morphed, 0)?;
    reaches(&ext, node_ip[1], morph_np, &web_names)?;
    c.update(&path, |s| {
        s["spec"]["type"] = "ClusterIP".into();
        if let Some(p) = s["spec"]["ports"][0].as_object_mut() {
            p.remove("nodePort");
        }
    })?;
    connects(&ext, node_ip[1], morph_np, Connect::Refused)?;
    reaches(&c2.netns, morph_ip, 80, &web_names)?;
    let back = c.update(&path, |s| {
        s["spec"] = json!({"type": "ExternalName", "externalName": "web.example.test"});
    })?;
    ensure!(
        back["spec"]["clusterIP"].is_null(),
        "ExternalName kept {}",
        back["spec"]
    );
    connects(&c1.netns, morph_ip, 80, Connect::Refused).or_else(|_| {
        // With no Service at that address the packet is routed nowhere.
        let got = try_connect(
            &c1.netns,
            SocketAddr::from((morph_ip, 80)),
            Duration::from_secs(2),
        );
        ensure!(got != Connect::Connected, "{morph_ip}:80 still answers");
        Ok(())
    })?;
    println!("type changes ExternalName <-> ClusterIP <-> NodePort: ok");

    // Recreate a Service: the new one works, the old address does not.
    c.delete(&format!("/api/v1/namespaces/{NS}/services/web-np"))?;
    let gone = SocketAddr::from((node_ip[0], np));
    eventually("deleted NodePort closes", WAIT, || {
        let got = try_connect(&ext, gone, Duration::from_secs(2));
        ensure!(got != Connect::Connected, "{got:?}");
        Ok(())
    })?;
    let again = service(
        &c,
        "web-np",
        json!({"type": "NodePort", "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    )?;
    reaches(&ext, node_ip[0], node_port(&again, 0)?, &web_names)?;
    reaches(&c1.netns, cluster_ip(&again)?, 80, &web_names)?;
    println!("Service deleted and recreated: ok");

    // No endpoints: refused at once (REJECT), from a pod, the node and outside.
    let empty = service(
        &c,
        "empty",
        json!({"type": "LoadBalancer", "selector": {"app": "nothing"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    )?;
    let empty_ip = cluster_ip(&empty)?;
    connects(&c1.netns, empty_ip, 80, Connect::Refused)?;
    connects(&node0, empty_ip, 80, Connect::Refused)?;
    connects(&ext, node_ip[1], node_port(&empty, 0)?, Connect::Refused)?;
    // ... and at a load-balancer IP, which is not the node's own address.
    let empty_lb: Ipv4Addr = "198.19.255.101".parse()?;
    c.update(
        &format!("/api/v1/namespaces/{NS}/services/empty/status"),
        |s| {
            s["status"] = json!({"loadBalancer": {"ingress": [{"ip": empty_lb.to_string()}]}});
        },
    )?;
    c.sh(
        &ext,
        &[
            "ip",
            "route",
            "add",
            &format!("{empty_lb}/32"),
            "via",
            &node_ip[0].to_string(),
        ],
    )?;
    connects(&ext, empty_lb, 80, Connect::Refused)?;
    println!("no endpoints -> REJECT: ok");

    // Agent health and metrics.
    let (code, body) = http_status(&node0, node_ip[0], 10256, "/healthz")?;
    ensure!(
        code == 200 && body.contains("lastUpdated"),
        "/healthz: {code} {body}"
    );
    let (code, _) = http_status(&node0, node_ip[0], 10256, "/livez")?;
    ensure!(code == 200, "/livez: {code}");
    let (code, metrics) = http_status(&node0, node_ip[0], 10256, "/metrics")?;
    ensure!(code == 200, "/metrics: {code}");
    let programmed = metric(&metrics, "weft_services_programmed")?;
    ensure!(programmed >= 4.0, "weft_services_programmed {programmed}");
    ensure!(
        metric(
            &metrics,
            &format!("weft_sync_duration_seconds_count{{dataplane=\"{dp}\"}}")
        )? >= 1.0
    );

    // Someone flushes the nat table (iptables) or unpins the connect
    // program's link, which detaches it (eBPF): the agent notices and
    // restores what it programmed.
    let before = metric(&metrics, "weft_full_resyncs_total{reason=\"damage\"}").unwrap_or(0.0);
    match dp {
        Dataplane::Iptables => {
            c.sh(&node0, &["iptables", "-t", "nat", "-F"])?;
        }
        Dataplane::Ebpf => {
            let link = c.nodes[0].bpffs.join("links").join("weft_connect4");
            std::fs::remove_file(&link).with_context(|| format!("unpinning {}", link.display()))?;
        }
    }
    // Wait for the agent to notice (its check tick) rather than for traffic
    // alone: with eBPF, the TC program still translates pod packets while
    // the socket programs are detached, so traffic may never stop.
    let after = eventually(
        "the damage noticed and repaired",
        Duration::from_secs(30),
        || {
            let (_, metrics) = http_status(&node0, node_ip[0], 10256, "/metrics")?;
            let after = metric(&metrics, "weft_full_resyncs_total{reason=\"damage\"}")?;
            ensure!(
                after > before,
                "no damage resync counted yet ({before} -> {after})"
            );
            if dp == Dataplane::Ebpf {
                let link = c.nodes[0].bpffs.join("links").join("weft_connect4");
                ensure!(link.exists(), "{} not pinned again", link.display());
            }
            Ok(after)
        },
    )?;
    reaches(&node0, vip, 80, &web_names)?;
    reaches(&c1.netns, vip, 80, &web_names)?;
    println!("damage resyncs counted: {before} -> {after}");
    println!(
        "damage repaired; health and metrics: ok ({:.1}s)",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A sample's value in Prometheus text (`name{labels} value`).
fn metric(text: &str, name: &str) -> Result<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no sample {name} in /metrics"))
}

#[test]
fn services_traffic_policies_readiness_hairpin_and_udp_cycling_iptables() -> Result<()> {
    traffic_policies_readiness_hairpin_and_udp_cycling(Dataplane::Iptables)
}

#[test]
fn services_traffic_policies_readiness_hairpin_and_udp_cycling_ebpf() -> Result<()> {
    traffic_policies_readiness_hairpin_and_udp_cycling(Dataplane::Ebpf)
}

fn traffic_policies_readiness_hairpin_and_udp_cycling(dp: Dataplane) -> Result<()> {
    if !runnable(dp) {
        return Ok(());
    }
    let ebpf = dp == Dataplane::Ebpf;
    let t0 = Instant::now();
    let mut c = Cluster::up_with(2, dp)?;
    let l1 = c.add_pod(0, NS, "local-1", &[("app", "local")])?;
    let c1 = c.add_pod(0, NS, "client-1", &[("app", "client")])?;
    let c2 = c.add_pod(1, NS, "client-2", &[("app", "client")])?;
    let node_ip = [c.nodes[0].ip, c.nodes[1].ip];
    let node1 = c.nodes[1].netns.clone();
    let ext = c.external_ns();
    let ext_ip = c.external_ip();

    // externalTrafficPolicy: Local — client address kept, only nodes with a
    // local endpoint answer, health check port says which.
    let etp = service(
        &c,
        "etp-local",
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "selector": {"app": "local"},
               "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    )?;
    // A load balancer (here: a route on the external host) sends its ingress IP to node-1.
    let lb_ip: Ipv4Addr = "198.19.255.100".parse()?;
    c.update(
        &format!("/api/v1/namespaces/{NS}/services/etp-local/status"),
        |s| {
            s["status"] = json!({"loadBalancer": {"ingress": [{"ip": lb_ip.to_string()}]}});
        },
    )?;
    c.sh(
        &ext,
        &[
            "ip",
            "route",
            "add",
            &format!("{lb_ip}/32"),
            "via",
            &node_ip[0].to_string(),
        ],
    )?;
    reaches(&ext, lb_ip, 80, &["local-1"])?;
    let client = http_text(&ext, lb_ip, 80, "/clientip")?;
    ensure!(
        client.trim() == ext_ip.to_string(),
        "LB ingress with ETP Local must keep the client address, backend saw {client}"
    );
    let np = node_port(&etp, 0)?;
    let hc = etp["spec"]["healthCheckNodePort"]
        .as_u64()
        .context("no healthCheckNodePort")? as u16;
    reaches(&ext, node_ip[0], np, &["local-1"])?;
    let client = http_text(&ext, node_ip[0], np, "/clientip")?;
    ensure!(
        client.trim() == ext_ip.to_string(),
        "ETP Local must keep the client address, backend saw {client}"
    );
    connects(&ext, node_ip[1], np, Connect::TimedOut)?;
    // Pods and the node itself reach every endpoint through their own
    // node's NodePort even without a local one (a pod going to another
    // node's address leaves masqueraded, as an outside client would).
    reaches(&c2.netns, node_ip[1], np, &["local-1"])?;
    reaches(&c1.netns, node_ip[0], np, &["local-1"])?;
    reaches(&node1, node_ip[1], np, &["local-1"])?;
    let health = eventually("health check ports", WAIT, || {
        let (a, body) = http_status(&ext, node_ip[0], hc, "/")?;
        let (b, _) = http_status(&ext, node_ip[1], hc, "/")?;
        ensure!((a, b) == (200, 503), "node-1 {a}, node-2 {b}");
        Ok(body)
    })?;
    let health: Value = serde_json::from_str(&health)?;
    ensure!(health["localEndpoints"] == 1, "{health}");
    println!("LoadBalancer ingress IP, externalTrafficPolicy Local + healthCheckNodePort: ok");

    // internalTrafficPolicy: Local — only pods on a node with an endpoint.
    let itp = service(
        &c,
        "itp-local",
        json!({"internalTrafficPolicy": "Local", "selector": {"app": "local"},
               "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    )?;
    let itp_ip = cluster_ip(&itp)?;
    reaches(&c1.netns, itp_ip, 80, &["local-1"])?;
    not_served(&c2.netns, itp_ip, 80, ebpf)?;
    println!("internalTrafficPolicy Local: ok");

    // Hairpin: a pod reaches itself through its own Service. With packet
    // NAT it must be masqueraded (or the reply would skip the translation);
    // translated at connect() it is a plain connection to itself.
    let self_ip = itp_ip;
    let seen = eventually("hairpin", WAIT, || {
        http_text(&l1.netns, self_ip, 80, "/clientip")
    })?;
    if ebpf {
        ensure!(
            seen.trim() == l1.ip.to_string(),
            "hairpin at the socket: backend saw {seen}, not the pod itself"
        );
    } else {
        ensure!(
            seen.trim() != l1.ip.to_string(),
            "hairpin was not masqueraded: backend saw {seen}"
        );
    }
    println!("hairpin: ok");

    // Unready endpoints: not used, unless publishNotReadyAddresses.
    let u1 = c.add_pod(1, NS, "unready-1", &[("app", "unready")])?;
    let plain = service(
        &c,
        "unready",
        json!({"selector": {"app": "unready"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    )?;
    let publish = service(
        &c,
        "unready-pub",
        json!({"publishNotReadyAddresses": true, "selector": {"app": "unready"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    )?;
    let (plain_ip, publish_ip) = (cluster_ip(&plain)?, cluster_ip(&publish)?);
    reaches(&c1.netns, plain_ip, 80, &["unready-1"])?;
    c.set_pod_ready(&u1, false)?;
    connects(&c1.netns, plain_ip, 80, Connect::Refused)?;
    reaches(&c1.netns, publish_ip, 80, &["unready-1"])?;
    println!("unready endpoints with and without publishNotReadyAddresses: ok");

    // Terminating endpoints: used while serving when nothing is ready.
    let t1 = c.add_pod(0, NS, "term-1", &[("app", "term")])?;
    let t2 = c.add_pod(1, NS, "term-2", &[("app", "term")])?;
    let term = service(
        &c,
        "term",
        json!({"selector": {"app": "term"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    )?;
    let term_ip = cluster_ip(&term)?;
    reaches(&c2.netns, term_ip, 80, &["term-1", "term-2"])?;
    c.delete_pod(&t1, 300)?;
    c.delete_pod(&t2, 300)?;
    // Ready (serving) and terminating: still answered.
    eventually("endpoints terminating", WAIT, || {
        let slices = c.get(&format!(
            "/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
        ))?;
        let text = slices.to_string();
        ensure!(
            text.contains("\"terminating\":true"),
            "no terminating endpoint yet"
        );
        Ok(())
    })?;
    reaches(&c2.netns, term_ip, 80, &["term-1", "term-2"])?;
    c.set_pod_ready(&t1, false)?;
    c.set_pod_ready(&t2, false)?;
    connects(&c2.netns, term_ip, 80, Connect::Refused)?;
    c.unwire_pod(&t1)?;
    c.unwire_pod(&t2)?;
    println!("terminating fallback: ok");

    // hostPort (CNI portMappings): local destinations only, never shadowing a Service.
    let shadowed: u16 = 30998;
    service(
        &c,
        "hp-web",
        json!({"type": "NodePort", "selector": {"app": "local"},
               "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": shadowed}]}),
    )?;
    let h1 = c.add_pod_with(
        0,
        NS,
        "hostport-1",
        &[("app", "hostport")],
        Some(json!([
            {"hostPort": 8081, "containerPort": HTTP_PORT, "protocol": "tcp"},
            {"hostPort": shadowed, "containerPort": HTTP_PORT, "protocol": "tcp"}
        ])),
    )?;
    reaches(&ext, node_ip[0], 8081, &["hostport-1"])?;
    reaches(&c2.netns, node_ip[0], 8081, &["hostport-1"])?;
    reaches(&c.nodes[0].netns.clone(), node_ip[0], 8081, &["hostport-1"])?;
    reaches(&h1.netns, node_ip[0], 8081, &["hostport-1"])?;
    let other = try_connect(
        &ext,
        SocketAddr::from((node_ip[1], 8081)),
        Duration::from_secs(2),
    );
    ensure!(
        other != Connect::Connected,
        "the hostPort answered on the other node"
    );
    for _ in 0..5 {
        let h = hostname(&ext, node_ip[0], shadowed)?;
        ensure!(
            h == "local-1",
            "hostPort {shadowed} shadowed the Service's NodePort: {h} answered"
        );
    }
    // What an operator on node-1 sees: the dataplane, the Services, the hostPorts.
    let out = std::process::Command::new(weft_e2e::bin("netctl")?)
        .arg("services")
        .arg("--socket")
        .arg(&c.nodes[0].socket)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "netctl services: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        if ebpf {
            "dataplane: ebpf"
        } else {
            "dataplane: iptables ("
        },
        "svc/hp-web",
        &format!(
            "hostPort  *:8081/TCP -> {}:{HTTP_PORT} (svc/hostport-1)",
            h1.ip
        ),
    ] {
        ensure!(
            text.contains(want),
            "netctl services lacks {want:?}:\n{text}"
        );
    }
    println!("hostPort: ok (and a hostPort never shadows a NodePort)");

    // UDP server pod cycling behind a ClusterIP and a NodePort: clients that
    // keep their source port reach the new pod (conntrack entries cleaned),
    // including a NodePort that received traffic before it existed (0 -> 1).
    let fixed_np: u16 = 30999;
    let ext_sock = in_netns(&ext, || UdpSocket::bind("0.0.0.0:40002"))??;
    ext_sock.set_read_timeout(Some(Duration::from_millis(300)))?;
    let early = SocketAddr::from((node_ip[0], fixed_np));
    ext_sock.send_to(b"early", early)?;
    let s1 = c.add_pod(1, NS, "udp-1", &[("app", "udp")])?;
    let udp = service(
        &c,
        "udp",
        json!({"type": "NodePort", "selector": {"app": "udp"},
               "ports": [{"name": "udp", "port": 53, "protocol": "UDP", "targetPort": "udp", "nodePort": fixed_np}]}),
    )?;
    let udp_ip = cluster_ip(&udp)?;
    let pod_sock = in_netns(&c1.netns, || UdpSocket::bind("0.0.0.0:40001"))??;
    pod_sock.set_read_timeout(Some(Duration::from_millis(300)))?;
    let vip = SocketAddr::from((udp_ip, 53));
    let took = follow_udp(&ext_sock, early, "udp-1")?;
    println!("UDP NodePort first endpoint reached from a fixed source port after {took:.1}s");
    follow_udp(&pod_sock, vip, "udp-1")?;
    // A connected UDP socket: eBPF translates it once, at connect().
    let conn = in_netns(&c1.netns, || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(vip)?;
        s.set_read_timeout(Some(Duration::from_millis(300)))?;
        Ok(s)
    })??;
    follow_connected(&conn, vip, "udp-1")?;
    c.unwire_pod(&s1)?;
    let _s2 = c.add_pod(0, NS, "udp-2", &[("app", "udp")])?;
    let via_vip = follow_udp(&pod_sock, vip, "udp-2")?;
    let via_np = follow_udp(&ext_sock, early, "udp-2")?;
    let (via_conn, aborted) = follow_connected(&conn, vip, "udp-2")?;
    if ebpf {
        ensure!(
            aborted,
            "the connected socket to the removed backend was not aborted"
        );
    }
    println!("UDP server replaced: ClusterIP client moved after {via_vip:.1}s, NodePort client after {via_np:.1}s, connected socket after {via_conn:.1}s (aborted and reconnected: {aborted})");
    let (_, metrics) = http_status(&c.nodes[0].netns.clone(), node_ip[0], 10256, "/metrics")?;
    let deleted = metric(&metrics, "weft_conntrack_entries_deleted_total")?;
    if ebpf {
        // The outside client's connection entry to the old backend.
        ensure!(deleted >= 1.0, "node-1 removed {deleted} stale connections");
    } else {
        ensure!(deleted >= 2.0, "node-1 deleted {deleted} conntrack entries, expected the early NodePort one and the old backend's");
    }
    println!(
        "all policy/readiness/hairpin/UDP checks: ok ({:.1}s)",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// [`follow_udp`] on a connected socket: one that is aborted (the eBPF
/// dataplane destroys sockets aimed at a removed backend) connects again,
/// as a client would, without a new socket. Seconds, and whether it was aborted.
fn follow_connected(sock: &UdpSocket, to: SocketAddr, name: &str) -> Result<(f64, bool)> {
    let start = Instant::now();
    let mut buf = [0u8; 512];
    let mut aborted = false;
    let mut last = String::new();
    while start.elapsed() < WAIT {
        if let Err(e) = sock.send(b"x") {
            last = e.to_string();
        }
        match sock.recv(&mut buf) {
            Ok(n) => {
                last = String::from_utf8_lossy(&buf[..n]).into_owned();
                if last == format!("{name}:x") {
                    return Ok((start.elapsed().as_secs_f64(), aborted));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => {
                aborted = true;
                sock.connect(to)?;
            }
            Err(e) => last = e.to_string(),
        }
    }
    bail!("{to}: {name} never answered the connected socket (last: {last:?})")
}

/// Keep sending from one socket (one source port) until `name` answers;
/// seconds it took. A stale conntrack entry would keep the answers away for
/// as long as the client keeps sending.
fn follow_udp(sock: &UdpSocket, to: SocketAddr, name: &str) -> Result<f64> {
    let start = Instant::now();
    let mut buf = [0u8; 512];
    let mut last = String::new();
    while start.elapsed() < WAIT {
        sock.send_to(b"x", to)?;
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            last = String::from_utf8_lossy(&buf[..n]).into_owned();
            if last == format!("{name}:x") {
                return Ok(start.elapsed().as_secs_f64());
            }
        }
    }
    bail!("{to}: {name} never answered the fixed-port client (last answer {last:?})")
}

/// `weft.dev/lb: maglev` (eBPF): every node holds the same Maglev table for
/// a backend set and hashes an outside flow the same way, so one flow (a
/// client address and port) reaches the same backend through any node — as
/// behind ECMP, where a flow may land on another node. A random Service
/// (the control) disagrees between nodes for some of the same flows.
#[test]
fn services_maglev_same_backend_through_every_node_ebpf() -> Result<()> {
    if !runnable(Dataplane::Ebpf) {
        return Ok(());
    }
    let mut c = Cluster::up_with(2, Dataplane::Ebpf)?;
    for (i, node) in [0, 1, 1].into_iter().enumerate() {
        c.add_pod(node, NS, &format!("mg-{i}"), &[("app", "mg")])?;
    }
    let ext = c.external_ns();
    let node_ip = [c.nodes[0].ip, c.nodes[1].ip];
    let mut ports = Vec::new();
    for (name, lb) in [("maglev", Some("maglev")), ("random", None)] {
        let mut meta = json!({"name": name, "namespace": NS});
        if let Some(lb) = lb {
            meta["annotations"] = json!({"weft.dev/lb": lb});
        }
        let svc = c.post(
            &format!("/api/v1/namespaces/{NS}/services"),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": meta,
                   "spec": {"type": "NodePort", "selector": {"app": "mg"},
                            "ports": [{"name": "udp", "port": 53, "protocol": "UDP", "targetPort": "udp"}]}}),
        )?;
        ports.push(node_port(&svc, 0)?);
    }
    // One socket per flow; each asks both nodes from the same source port.
    let flows = 24;
    let socks: Vec<UdpSocket> = (0..flows)
        .map(|i| {
            let s = in_netns(&ext, || UdpSocket::bind(("0.0.0.0", 41000 + i)))??;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            Ok(s)
        })
        .collect::<Result<_>>()?;
    let ask = |s: &UdpSocket, to: SocketAddr| -> Result<String> {
        eventually(&format!("{to} answers"), WAIT, || {
            s.send_to(b"f", to)?;
            let mut buf = [0u8; 64];
            let (n, _) = s.recv_from(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        })
    };
    let mut disagree = [0usize; 2];
    let mut used = std::collections::BTreeSet::new();
    for (k, port) in ports.iter().enumerate() {
        for s in &socks {
            let a = ask(s, SocketAddr::from((node_ip[0], *port)))?;
            let b = ask(s, SocketAddr::from((node_ip[1], *port)))?;
            if k == 0 {
                used.insert(a.clone());
            }
            if a != b {
                disagree[k] += 1;
            }
        }
    }
    ensure!(
        disagree[0] == 0,
        "Maglev: {} of {flows} flows reached different backends through the two nodes",
        disagree[0]
    );
    ensure!(
        used.len() >= 2,
        "Maglev spread {flows} flows over {used:?} only"
    );
    ensure!(
        disagree[1] > 0,
        "random selection agreed on all {flows} flows through both nodes (expected some to differ)"
    );
    println!(
        "Maglev: {flows} flows, same backend through both nodes, over {} backends; random: {} of {flows} differ",
        used.len(),
        disagree[1]
    );
    Ok(())
}
