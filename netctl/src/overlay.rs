//! `netctl overlay`: ask the node's agent (over its local socket) how the
//! VXLAN overlay looks — this node's side, every peer's route, neighbour and
//! FDB entry, and what a reconcile would still change.

use crate::agent::{s, show, AgentArgs};
use anyhow::Result;
use std::io::Write;

#[derive(Debug, clap::Args)]
pub struct OverlayArgs {
    #[command(flatten)]
    pub agent: AgentArgs,
}

fn mark(v: &serde_json::Value) -> &'static str {
    if v.as_bool() == Some(true) {
        "ok"
    } else {
        "MISSING"
    }
}

/// Human form of the agent's overlay description.
pub fn render(v: &serde_json::Value) -> String {
    let mut out = String::new();
    if let Some(e) = v.get("error") {
        return format!("error from the agent: {}\n", s(e));
    }
    out.push_str(&format!(
        "node {}   subnet {}   gateway {}   mtu {}   vtep {} ({})\n",
        s(&v["node"]),
        s(&v["subnet"]),
        s(&v["gateway"]),
        s(&v["mtu"]),
        s(&v["vtep"]),
        s(&v["vtepMac"])
    ));
    if !v["problem"].is_null() {
        out.push_str(&format!("problem: {}\n", s(&v["problem"])));
    }
    let bridge = match v["bridge"].as_object() {
        Some(b) => format!(
            "weft0 {} mtu {} addrs {}",
            if b.get("up").and_then(|u| u.as_bool()) == Some(true) {
                "up"
            } else {
                "DOWN"
            },
            s(&b["mtu"]),
            b.get("addrs")
                .and_then(|a| a.as_array())
                .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
                .unwrap_or_default()
        ),
        None => "weft0 MISSING".into(),
    };
    let vxlan = match v["vxlan"].as_object() {
        Some(x) => format!(
            "weft.1 {} mtu {} vni {} port {} local {} mac {} learning {}",
            if x.get("up").and_then(|u| u.as_bool()) == Some(true) {
                "up"
            } else {
                "DOWN"
            },
            s(&x["mtu"]),
            s(&x["vni"]),
            s(&x["port"]),
            s(&x["local"]),
            s(&x["mac"]),
            if x.get("learning").and_then(|l| l.as_bool()) == Some(true) {
                "on"
            } else {
                "off"
            }
        ),
        None => "weft.1 MISSING".into(),
    };
    out.push_str(&format!("{bridge}\n{vxlan}\n\n"));
    let rows: Vec<Vec<String>> = v["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            vec![
                s(&p["node"]),
                s(&p["subnet"]),
                s(&p["vtep"]),
                s(&p["mac"]),
                mark(&p["route"]).into(),
                mark(&p["neighbour"]).into(),
                mark(&p["fdb"]).into(),
            ]
        })
        .collect();
    if rows.is_empty() {
        out.push_str("no peers\n");
    } else {
        out.push_str(&crate::table::render(
            &["PEER", "SUBNET", "VTEP", "MAC", "ROUTE", "NEIGH", "FDB"],
            &rows,
        ));
    }
    let list =
        |key: &str| -> Vec<String> { v[key].as_array().into_iter().flatten().map(s).collect() };
    out.push_str("\nroutes (dev weft.1):\n");
    for r in list("routes") {
        out.push_str(&format!("  {r}\n"));
    }
    out.push_str("neighbours (dev weft.1):\n");
    for r in list("neighbours") {
        out.push_str(&format!("  {r}\n"));
    }
    out.push_str("fdb (dev weft.1):\n");
    for r in list("fdb") {
        out.push_str(&format!("  {r}\n"));
    }
    let pending = list("pending");
    if pending.is_empty() {
        out.push_str("\nin sync: nothing to change\n");
    } else {
        out.push_str(&format!(
            "\n{} change(s) pending (the agent applies them on its next reconcile):\n",
            pending.len()
        ));
        for p in pending {
            out.push_str(&format!("  {p}\n"));
        }
    }
    out
}

pub async fn run(args: &OverlayArgs, out: &mut impl Write) -> Result<bool> {
    show(
        &args.agent,
        &serde_json::json!({"op": "overlay"}),
        render,
        out,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_peers_and_pending() {
        let v = serde_json::json!({
            "node": "node-1", "subnet": "198.18.128.0/24", "gateway": "198.18.128.1/24", "mtu": 1450,
            "vtep": "198.18.0.11", "vtepMac": "02:00:00:00:00:01", "problem": null,
            "bridge": {"mtu": 1450, "up": true, "addrs": ["198.18.128.1/24"]},
            "vxlan": {"mtu": 1450, "up": true, "vni": 1, "port": 8472, "learning": false, "local": "198.18.0.11", "mac": "02:00:00:00:00:01"},
            "routes": ["198.18.129.0/24 via 198.18.129.0 onlink"], "neighbours": [], "fdb": [],
            "peers": [{"node": "node-2", "subnet": "198.18.129.0/24", "vtep": "198.18.0.12", "mac": "02:00:00:00:00:02",
                "route": true, "neighbour": false, "fdb": false}],
            "pending": ["AddFdb(..)", "AddNeighbour(..)"],
        });
        let text = render(&v);
        assert!(
            text.contains("node node-1   subnet 198.18.128.0/24"),
            "{text}"
        );
        assert!(
            text.contains("weft.1 up mtu 1450 vni 1 port 8472"),
            "{text}"
        );
        let peer = text.lines().find(|l| l.starts_with("node-2")).unwrap();
        assert!(peer.contains("ok") && peer.contains("MISSING"), "{peer}");
        assert!(text.contains("2 change(s) pending"), "{text}");
        assert_eq!(
            render(&serde_json::json!({"error": "x"})),
            "error from the agent: x\n"
        );
    }
}
