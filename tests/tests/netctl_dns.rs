//! `netctl dns` against real agents serving cluster DNS on the simulated
//! cluster (tests/src/cluster.rs). Run inside a node, `--from ns/pod` sends
//! the queries from inside the pod's network namespace, so the server knows
//! the pod and walks the rest of its search path itself: `web.<other ns>`
//! resolves in one step through a CNAME, while the same name asked from the
//! node takes two. A name that exists nowhere lists every step and exits 1;
//! a pod that is not on the node is an error naming it (exit 2). Without
//! root the test prints `skipped: <why>`.

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::process::Output;
use std::time::Duration;
use weft_e2e::cluster::{eventually, skip, Cluster, CLUSTER_DNS};

const NS: &str = "ndns-a";
const OTHER: &str = "ndns-b";
const WAIT: Duration = Duration::from_secs(20);

fn service(c: &Cluster, ns: &str, name: &str) -> Result<String> {
    let svc = c.post(
        &format!("/api/v1/namespaces/{ns}/services"),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
               "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}),
    )?;
    svc["spec"]["clusterIP"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no clusterIP in {}", svc["spec"]))
}

/// `netctl dns ARGS` run inside node `i`, pointed at its node state and claims.
fn netctl_dns(c: &Cluster, i: usize, args: &[&str]) -> Result<Output> {
    let bin = weft_e2e::bin("netctl")?;
    let node = &c.nodes[i];
    let state = node.state_path.display().to_string();
    let ipam = node.ipam_dir().display().to_string();
    let mut all = vec![
        bin.to_str().context("netctl path")?,
        "dns",
        "--node-state",
        &state,
        "--ipam-dir",
        &ipam,
    ];
    all.extend_from_slice(args);
    c.exec(&node.netns, &all)
}

/// The JSON report and the exit code.
fn report(c: &Cluster, i: usize, args: &[&str]) -> Result<(Value, i32)> {
    let mut all = args.to_vec();
    all.extend_from_slice(&["-o", "json"]);
    let out = netctl_dns(c, i, &all)?;
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "netctl dns {args:?}: no JSON ({:?}): {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((v, out.status.code().unwrap_or(-1)))
}

fn step_names(v: &Value) -> Vec<String> {
    v["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| s["name"].as_str().unwrap_or("").to_string())
        .collect()
}

fn answer_data(step: &Value) -> Vec<String> {
    step["answers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| a["data"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn netctl_dns_walks_the_search_path_as_the_pod() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut c = Cluster::up(2)?;
    c.add_pod(0, NS, "web-1", &[("app", "web")])?;
    c.add_pod(0, OTHER, "web-2", &[("app", "web")])?;
    let client = c.add_pod(1, NS, "client", &[("app", "client")])?;
    let vip = service(&c, NS, "web")?;
    let other_vip = service(&c, OTHER, "web")?;
    let from = format!("{NS}/client");

    // `web` from the client: its own namespace's Service, at the first step.
    let v = eventually("netctl dns web --from the client", WAIT, || {
        let (v, code) = report(&c, 1, &["web", "--from", &from])?;
        ensure!(code == 0, "exit {code}: {v:#}");
        Ok(v)
    })?;
    ensure!(v["from"]["pod"] == from.as_str(), "{v:#}");
    ensure!(v["from"]["ip"] == client.ip.to_string(), "{v:#}");
    ensure!(v["nameserver"] == format!("{CLUSTER_DNS}:53"), "{v:#}");
    ensure!(
        v["search"]
            == json!([
                format!("{NS}.svc.cluster.local"),
                "svc.cluster.local",
                "cluster.local"
            ]),
        "{v:#}"
    );
    ensure!(
        v["resolvedAt"] == 1 && v["steps"].as_array().map(Vec::len) == Some(1),
        "{v:#}"
    );
    ensure!(
        step_names(&v) == [format!("web.{NS}.svc.cluster.local.")],
        "{v:#}"
    );
    ensure!(
        answer_data(&v["steps"][0]) == [vip.clone()],
        "{v:#}, want {vip}"
    );
    ensure!(v["steps"][0].get("serverWalked").is_none(), "{v:#}");

    // `web.<other>` from the client: the server knows the pod, walks the
    // search path itself and answers step 1 with a CNAME to step 2's name.
    let walked = format!("web.{OTHER}.svc.cluster.local.");
    let v = eventually("netctl dns web.<other ns> --from the client", WAIT, || {
        let (v, code) = report(&c, 1, &[&format!("web.{OTHER}"), "--from", &from])?;
        ensure!(
            code == 0 && v["steps"][0].get("serverWalked").is_some(),
            "exit {code}: {v:#}"
        );
        Ok(v)
    })?;
    ensure!(v["steps"].as_array().map(Vec::len) == Some(1), "{v:#}");
    ensure!(
        step_names(&v) == [format!("web.{OTHER}.{NS}.svc.cluster.local.")],
        "{v:#}"
    );
    ensure!(
        v["steps"][0]["serverWalked"] == json!({"step": 2, "target": walked}),
        "{v:#}"
    );
    ensure!(
        answer_data(&v["steps"][0]) == [walked.clone(), other_vip.clone()],
        "{v:#}, want CNAME {walked} then {other_vip}"
    );
    let out = netctl_dns(&c, 1, &[&format!("web.{OTHER}"), "--from", &from])?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "{text}");
    ensure!(
        text.contains(&format!(
            "server walked the search path: a CNAME to step 2's name {walked}"
        )),
        "{text}"
    );
    ensure!(
        text.contains(&format!(
            "web.{OTHER}.{NS}.svc.cluster.local. → {walked}  (CNAME"
        )),
        "{text}"
    );
    ensure!(
        text.contains(&format!("→ {walked} → {other_vip}\n")),
        "{text}"
    );

    // The same name from the node (searching like a pod of NS): the server
    // does not know that source, so the client walks: NXDOMAIN, then the answer.
    let (v, code) = report(&c, 1, &[&format!("web.{OTHER}"), "-n", NS])?;
    ensure!(code == 0 && v["from"]["node"] == true, "exit {code}: {v:#}");
    ensure!(
        step_names(&v)
            == [
                format!("web.{OTHER}.{NS}.svc.cluster.local."),
                walked.clone()
            ],
        "{v:#}"
    );
    ensure!(
        v["steps"][0]["rcode"] == "NXDOMAIN" && v["resolvedAt"] == 2,
        "{v:#}"
    );
    ensure!(answer_data(&v["steps"][1]) == [other_vip.clone()], "{v:#}");

    // A name outside the cluster: the server walks to the upstream's answer.
    let (v, code) = report(&c, 1, &["www.example.test", "--from", &from])?;
    ensure!(code == 0, "exit {code}: {v:#}");
    ensure!(
        v["steps"][0]["serverWalked"] == json!({"step": 4, "target": "www.example.test."}),
        "{v:#}"
    );

    // A name that exists nowhere: every step listed, NXDOMAIN each, exit 1.
    let out = netctl_dns(&c, 1, &["nothing-here", "--from", &from])?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(1),
        "exit {:?}: {text}",
        out.status.code()
    );
    for (i, name) in [
        format!("nothing-here.{NS}.svc.cluster.local."),
        "nothing-here.svc.cluster.local.".into(),
        "nothing-here.cluster.local.".into(),
        "nothing-here.".into(),
    ]
    .iter()
    .enumerate()
    {
        ensure!(
            text.contains(&format!("step {}/4  {name}  A  NXDOMAIN  ", i + 1)),
            "step {} {name} missing: {text}",
            i + 1
        );
    }
    ensure!(
        text.contains("not resolved: NXDOMAIN at every one of the 4 steps"),
        "{text}"
    );

    // A pod of another node, a pod that does not exist, bad input: exit 2, named.
    for (args, want) in [
        (
            vec!["web", "--from", "ndns-a/web-1"],
            "pod ndns-a/web-1 is not on this node",
        ),
        (
            vec!["web", "--from", "ndns-a/ghost"],
            "pod ndns-a/ghost is not on this node",
        ),
        (
            vec!["web", "--type", "BOGUS"],
            "invalid value 'BOGUS' for '--type <TYPE>'",
        ),
        (
            vec!["a..b"],
            "invalid value 'a..b' for '<NAME>': empty label",
        ),
    ] {
        let out = netctl_dns(&c, 1, &args)?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2),
            "{args:?}: exit {:?}: {err}",
            out.status.code()
        );
        ensure!(err.contains(want), "{args:?}: {err}");
    }
    Ok(())
}
