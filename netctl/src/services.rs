//! `netctl services` (this node's Services: frontends → backends with their
//! states) and `netctl trace FROM TO` (what the Service rules do with such a
//! packet on this node, in words). Both ask the local agent, which answers
//! from the view it holds.

use crate::agent::{s, show, AgentArgs};
use anyhow::Result;
use std::io::Write;

#[derive(Debug, clap::Args)]
pub struct ServicesArgs {
    #[command(flatten)]
    pub agent: AgentArgs,
}

#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    /// Where the packet comes from: `node`, `pod:IP`, `remote-pod:IP`,
    /// `external:IP`, or an IP (a pod inside the cluster CIDR, else external).
    pub from: String,
    /// Destination `IP:PORT`.
    pub to: String,
    #[arg(long, short = 'p', default_value = "TCP")]
    pub protocol: String,
    #[command(flatten)]
    pub agent: AgentArgs,
}

/// Human form of the services answer.
pub fn render_services(v: &serde_json::Value) -> String {
    if let Some(e) = v.get("error") {
        return format!("error from the agent: {}\n", s(e));
    }
    let mut out = String::new();
    if let Some(d) = v.get("dataplane") {
        out.push_str(&format!("dataplane: {}\n", s(d)));
    }
    for svc in v["services"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{}   (externalTrafficPolicy {}, internalTrafficPolicy {}{})\n",
            s(&svc["service"]),
            s(&svc["externalTrafficPolicy"]),
            s(&svc["internalTrafficPolicy"]),
            if svc["affinityTimeout"].is_null() {
                String::new()
            } else {
                format!(", ClientIP affinity {}s", s(&svc["affinityTimeout"]))
            }
        ));
        for f in svc["frontends"].as_array().into_iter().flatten() {
            out.push_str(&format!("  frontend  {}\n", s(f)));
        }
        let backends = svc["backends"].as_array().cloned().unwrap_or_default();
        if backends.is_empty() {
            out.push_str("  backends  none (connections are rejected)\n");
        }
        for b in backends {
            let ports: Vec<String> = b["ports"].as_array().into_iter().flatten().map(s).collect();
            out.push_str(&format!(
                "  backend   {} [{}] on {}: {}\n",
                s(&b["ip"]),
                ports.join(","),
                s(&b["node"]),
                s(&b["state"])
            ));
        }
    }
    for h in v["hostPorts"].as_array().into_iter().flatten() {
        out.push_str(&format!("hostPort  {}\n", s(h)));
    }
    for (key, what) in [
        ("deniedExternalIPs", "externalIP not in the allow-list"),
        ("rejectedBackends", "backend address never programmed"),
    ] {
        for d in v[key].as_array().into_iter().flatten() {
            out.push_str(&format!("note: {what}: {}\n", s(d)));
        }
    }
    if v["services"].as_array().is_none_or(|a| a.is_empty()) {
        out.push_str("no Services proxied on this node\n");
    }
    out
}

pub async fn services(args: &ServicesArgs, out: &mut impl Write) -> Result<bool> {
    show(
        &args.agent,
        &serde_json::json!({"op": "services"}),
        render_services,
        out,
    )
    .await
}

/// Human form of a trace answer.
pub fn render_trace(v: &serde_json::Value) -> String {
    match v.get("error") {
        Some(e) => format!("error: {}\n", s(e)),
        None => format!(
            "{} -> {} {}: {}\n",
            s(&v["from"]),
            s(&v["to"]),
            s(&v["protocol"]),
            s(&v["explanation"])
        ),
    }
}

pub async fn trace(args: &TraceArgs, out: &mut impl Write) -> Result<bool> {
    let req = serde_json::json!({"op": "trace", "from": args.from, "to": args.to, "protocol": args.protocol});
    show(&args.agent, &req, render_trace, out).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_services() {
        let v = serde_json::json!({"rev": 3, "services": [{
            "service": "shop/web", "frontends": ["ClusterIP 198.19.0.20:80/TCP"],
            "backends": [{"ip": "198.18.128.5", "node": "node-1", "ports": ["8080/TCP"], "state": "ready"}],
            "affinityTimeout": null, "externalTrafficPolicy": "Cluster", "internalTrafficPolicy": "Cluster"}],
            "deniedExternalIPs": ["shop/web 198.19.254.9"], "rejectedBackends": [],
            "dataplane": "iptables (nft)", "hostPorts": ["*:8081/TCP -> 198.18.128.7:8080 (shop/hp)"]});
        let text = render_services(&v);
        assert!(
            text.contains("shop/web   (externalTrafficPolicy Cluster"),
            "{text}"
        );
        assert!(
            text.contains("backend   198.18.128.5 [8080/TCP] on node-1: ready"),
            "{text}"
        );
        assert!(
            text.contains("note: externalIP not in the allow-list: shop/web 198.19.254.9"),
            "{text}"
        );
        assert!(text.starts_with("dataplane: iptables (nft)\n"), "{text}");
        assert!(
            text.contains("hostPort  *:8081/TCP -> 198.18.128.7:8080 (shop/hp)"),
            "{text}"
        );
    }

    #[test]
    fn renders_trace_answers_and_errors() {
        let v = serde_json::json!({"from": "LocalPod(198.18.128.9)", "to": "198.19.0.10:53", "protocol": "UDP",
            "explanation": "kube-system/dns via ClusterIP: translated to one of 198.18.128.2:9090 (local)"});
        assert_eq!(
            render_trace(&v),
            "LocalPod(198.18.128.9) -> 198.19.0.10:53 UDP: kube-system/dns via ClusterIP: translated to one of 198.18.128.2:9090 (local)\n"
        );
        assert_eq!(
            render_trace(&serde_json::json!({"error": "to: \"x\": expected IP:PORT"})),
            "error: to: \"x\": expected IP:PORT\n"
        );
    }
}
