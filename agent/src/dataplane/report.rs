//! What `netctl services` and `netctl trace` show: the plan and the tracer's
//! answers as JSON, computed by the agent from the view it holds.

use super::plan::{FrontendKind, PlanConfig, ServicePlan};
use super::tracer::{trace, Packet, Source, Verdict};
use serde_json::{json, Value};
use std::net::IpAddr;
use weft_model::view::Protocol;
use weft_model::NodeView;

/// Every Service on this node: frontends → backends with their states.
pub fn services(view: &NodeView, plan: &ServicePlan) -> Value {
    let mut rows = Vec::new();
    for svc in &plan.services {
        let key = (svc.namespace.clone(), svc.name.clone());
        let entry = view.services.get(&key);
        let frontends: Vec<String> = svc
            .frontends
            .iter()
            .map(|f| format!("{:?} {}:{}/{}", f.kind, f.ip, f.port, f.protocol.as_str()))
            .collect();
        let backends: Vec<Value> = entry
            .map(|e| {
                e.backends
                    .iter()
                    .map(|b| {
                        let state = if b.ready {
                            "ready"
                        } else if b.serving && b.terminating {
                            "terminating (serving)"
                        } else if b.terminating {
                            "terminating"
                        } else {
                            "not ready"
                        };
                        json!({
                            "ip": b.ip.to_string(),
                            "node": b.node,
                            "ports": b.ports.iter().map(|p| format!("{}/{}", p.port, p.protocol.as_str())).collect::<Vec<_>>(),
                            "state": state,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        rows.push(json!({
            "service": format!("{}/{}", svc.namespace, svc.name),
            "frontends": frontends,
            "backends": backends,
            "affinityTimeout": svc.affinity_timeout,
            "externalTrafficPolicy": if svc.external_local { "Local" } else { "Cluster" },
            "internalTrafficPolicy": if svc.internal_local { "Local" } else { "Cluster" },
        }));
    }
    json!({
        "rev": view.rev,
        "services": rows,
        "deniedExternalIPs": plan.denied_external_ips.iter().map(|(s, ip)| format!("{s} {ip}")).collect::<Vec<_>>(),
        "rejectedBackends": plan.rejected_backends.iter().map(|(s, ip)| format!("{s} {ip}")).collect::<Vec<_>>(),
    })
}

/// Parse `from` as netctl sends it: `node`, `pod:IP` (a pod on this node),
/// `remote-pod:IP`, `external:IP`, or a bare IP (a pod if inside the cluster
/// CIDR, else external).
pub fn parse_source(s: &str, cfg: &PlanConfig) -> Result<Source, String> {
    let ip = |v: &str| {
        v.parse::<IpAddr>()
            .map_err(|_| format!("{v:?} is not an IP address"))
    };
    match s.split_once(':') {
        _ if s == "node" => Ok(Source::Node),
        Some(("pod", v)) => Ok(Source::LocalPod(ip(v)?)),
        Some(("remote-pod", v)) => Ok(Source::RemotePod(ip(v)?)),
        Some(("external", v)) => Ok(Source::External(ip(v)?)),
        _ => {
            let a = ip(s)?;
            Ok(if cfg.cluster_cidr.contains(a) {
                Source::LocalPod(a)
            } else {
                Source::External(a)
            })
        }
    }
}

/// Answer a trace request `{"from": ..., "to": "IP:PORT", "protocol": "TCP"}`.
pub fn trace_request(
    req: &Value,
    plan: &ServicePlan,
    cfg: &PlanConfig,
    hostports: &[super::hostports::HostPort],
) -> Value {
    let from = req["from"].as_str().unwrap_or("");
    let to = req["to"].as_str().unwrap_or("");
    let proto = req["protocol"].as_str().unwrap_or("TCP");
    let src = match parse_source(from, cfg) {
        Ok(s) => s,
        Err(e) => return json!({"error": format!("from: {e}")}),
    };
    let Some((ip, port)) = to.rsplit_once(':') else {
        return json!({"error": format!("to: {to:?}: expected IP:PORT")});
    };
    let (Ok(dst), Ok(port)) = (ip.parse::<IpAddr>(), port.parse::<u16>()) else {
        return json!({"error": format!("to: {to:?}: expected IP:PORT")});
    };
    let Some(protocol) = Protocol::parse(&proto.to_ascii_uppercase()) else {
        return json!({"error": format!("protocol: {proto:?}: expected TCP, UDP or SCTP")});
    };
    let v = trace(
        plan,
        &Packet {
            src: src.clone(),
            protocol,
            dst,
            port,
        },
    );
    // Service rules come first; a packet they leave alone may hit a hostPort.
    if v == Verdict::PassThrough {
        let local = cfg.node_addresses.contains(&dst) || dst.is_loopback();
        if let Some(hp) = super::hostports::trace(hostports, dst, local, protocol, port) {
            return json!({
                "from": format!("{src:?}"),
                "to": to,
                "protocol": protocol.as_str(),
                "verdict": "hostport",
                "frontend": "HostPort",
                "explanation": format!(
                    "hostPort {} of {}: translated to {}:{} (a pod reaching its own hostPort, and the node's localhost, are masqueraded)",
                    hp.host_port, hp.pod, hp.pod_ip, hp.container_port
                ),
            });
        }
    }
    let kind = match &v {
        Verdict::PassThrough => "pass-through",
        Verdict::Dnat { .. } => "dnat",
        Verdict::Reject { .. } => "reject",
        Verdict::Drop { .. } => "drop",
    };
    let frontend = match &v {
        Verdict::Dnat { frontend, .. } => Some(match frontend {
            FrontendKind::ClusterIP => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::ExternalIP => "ExternalIP",
            FrontendKind::LoadBalancer => "LoadBalancer",
        }),
        _ => None,
    };
    json!({
        "from": format!("{src:?}"),
        "to": to,
        "protocol": protocol.as_str(),
        "verdict": kind,
        "frontend": frontend,
        "explanation": v.explain(),
    })
}
