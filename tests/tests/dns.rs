//! Cluster DNS end to end: every agent answers on the cluster DNS address
//! inside its node; pods resolve with their own libc resolver (`getent`,
//! their resolv.conf written from the CNI result as a runtime does) and
//! with `dig`. Names outside the cluster go to the external host's DNS
//! (the nodes' upstream). Without root each test prints `skipped: <why>`.

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use weft_e2e::cluster::{
    cgroup_skip_reason, eventually, skip, Cluster, Dataplane, CLUSTER_DNS, EXTERNAL_IP,
};

const A: &str = "dns-a";
const B: &str = "dns-b";
const WAIT: Duration = Duration::from_secs(20);

fn service(c: &Cluster, ns: &str, name: &str, spec: Value) -> Result<Value> {
    c.post(
        &format!("/api/v1/namespaces/{ns}/services"),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec}),
    )
}

/// `getent ahostsv4 NAME` in `netns`: the addresses, sorted; Err when the
/// name does not resolve.
fn getent(c: &Cluster, netns: &str, name: &str) -> Result<Vec<String>> {
    let out = c.exec(netns, &["getent", "ahostsv4", name])?;
    ensure!(
        out.status.success(),
        "getent ahostsv4 {name} in {netns}: exit {:?}",
        out.status.code()
    );
    let mut ips: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("STREAM"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    ips.sort();
    ips.dedup();
    Ok(ips)
}

/// `dig +short` at the cluster DNS address from `netns` (extra args: type, +tcp…).
fn dig(c: &Cluster, netns: &str, args: &[&str]) -> Result<Vec<String>> {
    let server = format!("@{CLUSTER_DNS}");
    let mut all = vec!["dig", "+short", "+time=2", "+tries=2", server.as_str()];
    all.extend_from_slice(args);
    let out = c.exec(netns, &all)?;
    ensure!(
        out.status.success(),
        "dig {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    lines.sort();
    Ok(lines)
}

/// The rcode dig reports (`status: NXDOMAIN`).
fn dig_status(c: &Cluster, netns: &str, args: &[&str]) -> Result<String> {
    let server = format!("@{CLUSTER_DNS}");
    let mut all = vec!["dig", "+time=2", "+tries=2", server.as_str()];
    all.extend_from_slice(args);
    let out = c.sh(netns, &all)?;
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .map(str::to_string)
        .with_context(|| format!("no status in dig output: {out}"))
}

#[test]
fn cluster_dns_from_pods_and_nodes_iptables() -> Result<()> {
    if skip() {
        return Ok(());
    }
    cluster_dns_from_pods_and_nodes(Dataplane::Iptables)
}

/// The same with the eBPF dataplane: its socket programs must leave the
/// node's own DNS address alone.
#[test]
fn cluster_dns_from_pods_and_nodes_ebpf() -> Result<()> {
    if let Some(why) = cgroup_skip_reason() {
        println!("skipped: {why}");
        return Ok(());
    }
    cluster_dns_from_pods_and_nodes(Dataplane::Ebpf)
}

fn cluster_dns_from_pods_and_nodes(dp: Dataplane) -> Result<()> {
    let t0 = Instant::now();
    let mut c = Cluster::up_with(2, dp)?;
    let web = c.add_pod(0, A, "web-1", &[("app", "web")])?;
    let db1 = c.add_pod(0, A, "db-1", &[("app", "db")])?;
    let db2 = c.add_pod(1, A, "db-2", &[("app", "db")])?;
    let client = c.add_pod(1, A, "client", &[("app", "client")])?;
    let other = c.add_pod(0, B, "other", &[("app", "other")])?;
    let _ = &web;

    let svc = service(
        &c,
        A,
        "web",
        json!({"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    )?;
    let vip = svc["spec"]["clusterIP"]
        .as_str()
        .context("clusterIP")?
        .to_string();
    service(
        &c,
        A,
        "db",
        json!({"clusterIP": "None", "selector": {"app": "db"},
               "ports": [{"name": "sql", "port": 5432, "targetPort": "http"}]}),
    )?;
    service(
        &c,
        A,
        "ext",
        json!({"type": "ExternalName", "externalName": "www.example.test"}),
    )?;

    // The pod's resolv.conf is the CNI result's: its namespace first, ndots:5.
    let conf = c.sh(&client.netns, &["cat", "/etc/resolv.conf"])?;
    ensure!(
        conf.contains(&format!("nameserver {CLUSTER_DNS}"))
            && conf.contains(&format!(
                "search {A}.svc.cluster.local svc.cluster.local cluster.local"
            ))
            && conf.contains("ndots:5"),
        "the pod's resolv.conf: {conf}"
    );

    // Short name, name.namespace, FQDN: the ClusterIP, through libc.
    for name in [
        "web",
        "web.dns-a",
        "web.dns-a.svc",
        "web.dns-a.svc.cluster.local",
        "WEB.Dns-A.svc.cluster.local.",
    ] {
        let ips = eventually(&format!("getent {name} from the client pod"), WAIT, || {
            getent(&c, &client.netns, name)
        })?;
        ensure!(ips == [vip.clone()], "{name}: {ips:?}, want {vip}");
    }
    // The server knows the client pod's namespace: the first step of the
    // search path for `web.dns-a` (web.dns-a.dns-a.svc.cluster.local, which
    // does not exist) is answered at once with a CNAME to the name the
    // resolver would have found two round trips later.
    let walked = eventually("server-side search path", WAIT, || {
        let a = dig(&c, &client.netns, &["web.dns-a.dns-a.svc.cluster.local"])?;
        ensure!(a.len() == 2, "{a:?}");
        Ok(a)
    })?;
    ensure!(
        walked == [vip.clone(), "web.dns-a.svc.cluster.local.".to_string()],
        "search path answer: {walked:?}"
    );
    // A host that is no pod gets the plain NXDOMAIN (its resolver walks on).
    let node1 = c.nodes[1].netns.clone();
    ensure!(dig_status(&c, &node1, &["web.dns-a.dns-a.svc.cluster.local"])? == "NXDOMAIN");
    // Cross-namespace: from a pod of another namespace on the other node.
    ensure!(getent(&c, &other.netns, "web.dns-a")? == std::slice::from_ref(&vip));
    // ...where the short name means its own namespace: nothing there.
    ensure!(
        getent(&c, &other.netns, "web").is_err(),
        "web resolved in namespace {B}"
    );

    // Headless: one address per ready endpoint; SRV N x M; per-endpoint names.
    let mut want = vec![db1.ip.to_string(), db2.ip.to_string()];
    want.sort();
    let ips = eventually("headless db", WAIT, || {
        let ips = getent(&c, &client.netns, "db")?;
        ensure!(ips.len() == 2, "{ips:?}");
        Ok(ips)
    })?;
    ensure!(ips == want, "db: {ips:?}, want {want:?}");
    let srv = dig(
        &c,
        &client.netns,
        &["SRV", "_sql._tcp.db.dns-a.svc.cluster.local"],
    )?;
    ensure!(srv.len() == 2, "SRV: {srv:?}");
    for (line, ip) in srv.iter().zip(&want) {
        let host = format!("{}.db.dns-a.svc.cluster.local.", ip.replace('.', "-"));
        ensure!(
            line.ends_with(&format!(" {} {host}", weft_e2e::cluster::HTTP_PORT)),
            "SRV {line:?}, want port and {host}"
        );
        ensure!(
            dig(&c, &client.netns, &["A", &host])? == [ip.clone()],
            "{host}"
        );
    }
    let srv = dig(
        &c,
        &client.netns,
        &["SRV", "_http._tcp.web.dns-a.svc.cluster.local"],
    )?;
    ensure!(
        srv == ["0 100 80 web.dns-a.svc.cluster.local."],
        "SRV web: {srv:?}"
    );

    // PTR for a Service address and an endpoint address.
    ensure!(dig(&c, &client.netns, &["-x", &vip])? == ["web.dns-a.svc.cluster.local."]);
    let ptr = dig(&c, &client.netns, &["-x", &db1.ip.to_string()])?;
    ensure!(
        ptr == [format!(
            "{}.db.dns-a.svc.cluster.local.",
            db1.ip.to_string().replace('.', "-")
        )],
        "PTR of an endpoint: {ptr:?}"
    );

    // ExternalName: a CNAME, chased through the upstream by the server.
    ensure!(
        getent(&c, &client.netns, "ext")? == [EXTERNAL_IP.to_string()],
        "ext"
    );
    // A name outside the cluster: forwarded to the upstream.
    ensure!(getent(&c, &client.netns, "www.example.test")? == [EXTERNAL_IP.to_string()]);
    ensure!(dig_status(&c, &client.netns, &["missing.test"])? == "NXDOMAIN");

    // NXDOMAIN vs NODATA, the version record, SOA, TCP.
    ensure!(dig_status(&c, &client.netns, &["nope.dns-a.svc.cluster.local"])? == "NXDOMAIN");
    ensure!(dig_status(&c, &client.netns, &["AAAA", "web.dns-a.svc.cluster.local"])? == "NOERROR");
    ensure!(dig(&c, &client.netns, &["TXT", "dns-version.cluster.local"])? == ["\"1.1.0\""]);
    ensure!(
        dig(&c, &client.netns, &["+tcp", "web.dns-a.svc.cluster.local"])?
            == std::slice::from_ref(&vip)
    );
    let soa = dig(&c, &client.netns, &["SOA", "cluster.local"])?;
    ensure!(
        soa.len() == 1 && soa[0].starts_with("ns.dns.cluster.local."),
        "SOA {soa:?}"
    );

    // Nodes resolve too (their own processes, e.g. the kubelet).
    let node0 = c.nodes[0].netns.clone();
    ensure!(dig(&c, &node0, &["web.dns-a.svc.cluster.local"])? == std::slice::from_ref(&vip));

    // A new Service: how long from the API's answer until a pod resolves it.
    let started = Instant::now();
    let fresh = service(
        &c,
        A,
        "fresh",
        json!({"selector": {"app": "web"}, "ports": [{"port": 8080}]}),
    )?;
    let created = started.elapsed();
    let fresh_ip = fresh["spec"]["clusterIP"]
        .as_str()
        .context("clusterIP")?
        .to_string();
    let mut probes = 0;
    let resolvable = loop {
        probes += 1;
        if let Ok(ips) = dig(&c, &client.netns, &["fresh.dns-a.svc.cluster.local"]) {
            if ips == [fresh_ip.clone()] {
                break started.elapsed();
            }
        }
        ensure!(started.elapsed() < WAIT, "fresh never resolved");
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "a new Service resolvable {} ms after the create request was sent ({} ms of it the API call; {probes} dig probes)",
        resolvable.as_millis(),
        created.as_millis()
    );
    // Deleted: gone from DNS.
    c.delete(&format!("/api/v1/namespaces/{A}/services/fresh"))?;
    eventually("fresh gone", WAIT, || {
        ensure!(dig_status(&c, &client.netns, &["fresh.dns-a.svc.cluster.local"])? == "NXDOMAIN");
        Ok(())
    })?;
    // The server's counters on the client's node.
    let metrics = weft_e2e::cluster::http_text(&node1, c.nodes[1].ip, 10256, "/metrics")?;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(-1.0)
    };
    ensure!(value("weft_dns_requests_total ") > 10.0, "{metrics}");
    ensure!(
        value("weft_dns_search_path_hits_total ") >= 1.0,
        "{metrics}"
    );
    ensure!(value("weft_dns_forwarded_total ") >= 1.0, "{metrics}");
    ensure!(value("weft_dns_zone_services ") >= 3.0, "{metrics}");
    println!("cluster DNS e2e took {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}
