//! The packet tracer: for a packet seen by this node, what the Service rules
//! do with it — which backends it may go to (DNAT), REJECT, DROP or pass
//! through untouched — and whether its source is masqueraded. Pure, over a
//! [`ServicePlan`]; the oracle both dataplanes are tested against, and what
//! `netctl trace` explains.

use super::plan::{FrontendKind, PlannedService, ServicePlan, Target};
use std::net::IpAddr;
use weft_model::view::Protocol;

/// Where a packet comes from, as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A pod on this node.
    LocalPod(IpAddr),
    /// A pod on another node (its packet reached this node over the overlay).
    RemotePod(IpAddr),
    /// A process in this node's own network namespace.
    Node,
    /// A client outside the cluster.
    External(IpAddr),
}

impl Source {
    fn pod_ip(&self) -> Option<IpAddr> {
        match self {
            Source::LocalPod(ip) | Source::RemotePod(ip) => Some(*ip),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src: Source,
    pub protocol: Protocol,
    pub dst: IpAddr,
    pub port: u16,
}

/// One backend a packet may be sent to, and whether its source is then masqueraded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub target: Target,
    pub masquerade: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No Service rule applies.
    PassThrough,
    /// Translated to one of `backends` (chosen per connection, or sticky per
    /// client for `affinity_timeout` seconds).
    Dnat {
        service: String,
        frontend: FrontendKind,
        backends: Vec<Candidate>,
        affinity_timeout: Option<u32>,
    },
    /// Refused at once (TCP reset / ICMP port unreachable): no usable endpoint anywhere.
    Reject { service: String, reason: String },
    /// Silently dropped: endpoints exist, but none this traffic may use here
    /// (a Local traffic policy with no local endpoint).
    Drop { service: String, reason: String },
}

/// What happens to `p` on this node.
pub fn trace(plan: &ServicePlan, p: &Packet) -> Verdict {
    for svc in &plan.services {
        for f in &svc.frontends {
            if f.ip == p.dst && f.port == p.port && f.protocol == p.protocol {
                return verdict(svc, f.kind, f.port_index, p);
            }
        }
    }
    Verdict::PassThrough
}

fn verdict(svc: &PlannedService, kind: FrontendKind, port_index: usize, p: &Packet) -> Verdict {
    let name = format!("{}/{}", svc.namespace, svc.name);
    let Some(pb) = svc.backends.get(port_index) else {
        return Verdict::PassThrough;
    };
    // Which backend set, and whether the source is masqueraded regardless of backend.
    let (set, masq_all, policy): (&[Target], bool, &str) = match (kind.external(), &p.src) {
        // Cluster IPs: pods keep their source; the node and outsiders are masqueraded.
        (false, Source::LocalPod(_) | Source::RemotePod(_)) => {
            (&pb.internal, false, "internalTrafficPolicy")
        }
        (false, _) => (&pb.internal, true, "internalTrafficPolicy"),
        // External frontends with externalTrafficPolicy: Cluster: always masqueraded.
        (true, _) if !svc.external_local => (&pb.external, true, "externalTrafficPolicy"),
        // externalTrafficPolicy: Local — clients outside keep their address and
        // reach only local endpoints; pods are short-circuited to the internal
        // endpoints, and the node itself is masqueraded to them (as kube-proxy does).
        (true, Source::External(_)) => (&pb.external, false, "externalTrafficPolicy"),
        (true, Source::LocalPod(_) | Source::RemotePod(_)) => {
            (&pb.internal, false, "internalTrafficPolicy")
        }
        (true, Source::Node) => (&pb.internal, true, "internalTrafficPolicy"),
    };
    if pb.cluster.is_empty() {
        let reason = if pb.any {
            "no ready or terminating-serving endpoints".to_string()
        } else {
            "no endpoints".to_string()
        };
        return Verdict::Reject {
            service: name,
            reason,
        };
    }
    if set.is_empty() {
        return Verdict::Drop {
            service: name,
            reason: format!("{policy}: Local and no local endpoint on this node"),
        };
    }
    let src_ip = p.src.pod_ip();
    Verdict::Dnat {
        service: name,
        frontend: kind,
        backends: set
            .iter()
            .map(|t| Candidate {
                target: t.clone(),
                // A pod of this node reaching itself through its Service
                // (hairpin) must be masqueraded, or its reply would skip the
                // translation. (A remote pod is translated by its own node.)
                masquerade: masq_all || (t.local && src_ip == Some(t.ip)),
            })
            .collect(),
        affinity_timeout: svc.affinity_timeout,
    }
}

impl Verdict {
    /// The tracer's answer in words (netctl trace).
    pub fn explain(&self) -> String {
        match self {
            Verdict::PassThrough => "no Service rule applies: the packet is routed as is".into(),
            Verdict::Reject { service, reason } => {
                format!("{service}: rejected at once ({reason})")
            }
            Verdict::Drop { service, reason } => format!("{service}: dropped ({reason})"),
            Verdict::Dnat {
                service,
                frontend,
                backends,
                affinity_timeout,
            } => {
                let list: Vec<String> = backends
                    .iter()
                    .map(|c| {
                        format!(
                            "{}:{}{}{}",
                            c.target.ip,
                            c.target.port,
                            if c.target.local { " (local)" } else { "" },
                            if c.masquerade { " [masqueraded]" } else { "" }
                        )
                    })
                    .collect();
                let sticky = affinity_timeout
                    .map(|t| format!("; ClientIP affinity for {t}s"))
                    .unwrap_or_default();
                format!(
                    "{service} via {frontend:?}: translated to one of {}{sticky}",
                    list.join(", ")
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{backend as be, node_port_service, plan as plan_of, NODE as ME};
    use super::*;
    use weft_model::{Backend, ServiceEntry};

    fn svc(name: &str, backends: Vec<Backend>) -> ServiceEntry {
        ServiceEntry {
            external_ips: vec![
                "198.19.255.50".parse().unwrap(),
                "198.19.254.1".parse().unwrap(),
            ],
            ..node_port_service(name, backends)
        }
    }

    fn pkt(src: Source, dst: &str, port: u16) -> Packet {
        Packet {
            src,
            protocol: Protocol::TCP,
            dst: dst.parse().unwrap(),
            port,
        }
    }

    fn pod(ip: &str) -> Source {
        Source::LocalPod(ip.parse().unwrap())
    }

    fn ips(v: &Verdict) -> Vec<(String, bool)> {
        match v {
            Verdict::Dnat { backends, .. } => backends
                .iter()
                .map(|c| (c.target.ip.to_string(), c.masquerade))
                .collect(),
            other => panic!("expected DNAT, got {other:?}"),
        }
    }

    #[test]
    fn cluster_ip_keeps_pod_source_and_masquerades_node_and_hairpin() {
        let plan = plan_of(vec![svc(
            "web",
            vec![
                be("198.18.128.5", ME, true, true, false),
                be("198.18.129.5", "node-2", true, true, false),
            ],
        )]);
        let v = trace(&plan, &pkt(pod("198.18.128.9"), "198.19.0.20", 80));
        assert_eq!(
            ips(&v),
            [
                ("198.18.128.5".into(), false),
                ("198.18.129.5".into(), false)
            ]
        );
        let v = trace(&plan, &pkt(Source::Node, "198.19.0.20", 80));
        assert!(ips(&v).iter().all(|(_, m)| *m));
        let v = trace(&plan, &pkt(pod("198.18.128.5"), "198.19.0.20", 80));
        assert_eq!(
            ips(&v)[0],
            ("198.18.128.5".into(), true),
            "hairpin is masqueraded"
        );
        assert_eq!(
            trace(&plan, &pkt(pod("198.18.128.9"), "198.19.0.20", 81)),
            Verdict::PassThrough
        );
        let udp = Packet {
            protocol: Protocol::UDP,
            ..pkt(pod("198.18.128.9"), "198.19.0.20", 80)
        };
        assert_eq!(
            trace(&plan, &udp),
            Verdict::PassThrough,
            "the TCP port is not the UDP port"
        );
    }

    #[test]
    fn node_ports_external_ips_and_the_allow_list() {
        let plan = plan_of(vec![svc(
            "web",
            vec![be("198.18.129.5", "node-2", true, true, false)],
        )]);
        let ext = Source::External("198.19.255.9".parse().unwrap());
        let v = trace(&plan, &pkt(ext.clone(), "198.18.0.11", 30080));
        assert_eq!(
            ips(&v),
            [("198.18.129.5".into(), true)],
            "ETP Cluster masquerades"
        );
        assert_eq!(
            trace(&plan, &pkt(ext.clone(), "127.0.0.1", 30080)),
            Verdict::PassThrough,
            "no NodePort on loopback by default"
        );
        assert!(matches!(
            trace(&plan, &pkt(ext.clone(), "198.19.255.50", 80)),
            Verdict::Dnat {
                frontend: FrontendKind::ExternalIP,
                ..
            }
        ));
        assert_eq!(
            trace(&plan, &pkt(ext, "198.19.254.1", 80)),
            Verdict::PassThrough,
            "externalIP outside the allow-list"
        );
        assert_eq!(plan.denied_external_ips.len(), 1);
    }

    #[test]
    fn external_traffic_policy_local() {
        let mut s = svc("web", vec![be("198.18.129.5", "node-2", true, true, false)]);
        s.external_local = true;
        let plan = plan_of(vec![s.clone()]);
        let ext = Source::External("198.19.255.9".parse().unwrap());
        // no local endpoint: outside clients are dropped; pods still get the cluster's endpoints
        assert!(matches!(
            trace(&plan, &pkt(ext.clone(), "198.18.0.11", 30080)),
            Verdict::Drop { .. }
        ));
        assert_eq!(
            ips(&trace(
                &plan,
                &pkt(pod("198.18.128.9"), "198.18.0.11", 30080)
            )),
            [("198.18.129.5".into(), false)]
        );
        assert_eq!(
            ips(&trace(&plan, &pkt(Source::Node, "198.18.0.11", 30080))),
            [("198.18.129.5".into(), true)]
        );
        // with a local endpoint: outside clients keep their source
        s.backends.push(be("198.18.128.7", ME, true, true, false));
        let plan = plan_of(vec![s]);
        assert_eq!(
            ips(&trace(&plan, &pkt(ext, "198.18.0.11", 30080))),
            [("198.18.128.7".into(), false)]
        );
    }

    #[test]
    fn internal_traffic_policy_local() {
        let mut s = svc("web", vec![be("198.18.129.5", "node-2", true, true, false)]);
        s.internal_local = true;
        let plan = plan_of(vec![s]);
        assert!(matches!(
            trace(&plan, &pkt(pod("198.18.128.9"), "198.19.0.20", 80)),
            Verdict::Drop { .. }
        ));
    }

    #[test]
    fn reject_without_endpoints_and_terminating_fallback() {
        let plan = plan_of(vec![svc("empty", vec![])]);
        assert!(matches!(
            trace(&plan, &pkt(pod("198.18.128.9"), "198.19.0.20", 80)),
            Verdict::Reject { .. }
        ));
        // only not-ready endpoints: still rejected
        let plan = plan_of(vec![svc(
            "unready",
            vec![be("198.18.128.5", ME, false, false, false)],
        )]);
        match trace(&plan, &pkt(pod("198.18.128.9"), "198.19.0.20", 80)) {
            Verdict::Reject { reason, .. } => assert!(reason.contains("no ready"), "{reason}"),
            v => panic!("{v:?}"),
        }
        // none ready, one terminating but serving: it is used
        let plan = plan_of(vec![svc(
            "term",
            vec![
                be("198.18.128.5", ME, false, true, true),
                be("198.18.128.6", ME, false, false, true),
            ],
        )]);
        assert_eq!(
            ips(&trace(&plan, &pkt(pod("198.18.128.9"), "198.19.0.20", 80))),
            [("198.18.128.5".into(), false)]
        );
        // a ready endpoint wins over terminating ones
        let plan = plan_of(vec![svc(
            "mix",
            vec![
                be("198.18.128.5", ME, false, true, true),
                be("198.18.128.8", ME, true, true, false),
            ],
        )]);
        assert_eq!(
            ips(&trace(&plan, &pkt(pod("198.18.128.9"), "198.19.0.20", 80))),
            [("198.18.128.8".into(), false)]
        );
    }

    #[test]
    fn forbidden_backends_ignored_and_unproxied_services_skipped() {
        let plan = plan_of(vec![svc(
            "bad",
            vec![
                be("127.0.0.1", ME, true, true, false),
                be("169.254.169.254", ME, true, true, false),
                be("198.18.128.5", ME, true, true, false),
            ],
        )]);
        assert_eq!(
            ips(&trace(&plan, &pkt(pod("198.18.128.9"), "198.19.0.20", 80))),
            [("198.18.128.5".into(), false)]
        );
        assert_eq!(plan.rejected_backends.len(), 2);
        let mut other = svc("other", vec![be("198.18.128.5", ME, true, true, false)]);
        other.proxied = false;
        assert_eq!(
            trace(
                &plan_of(vec![other]),
                &pkt(pod("198.18.128.9"), "198.19.0.20", 80)
            ),
            Verdict::PassThrough
        );
    }

    #[test]
    fn affinity_is_reported_and_explained() {
        let mut s = svc("web", vec![be("198.18.128.5", ME, true, true, false)]);
        s.affinity_timeout = Some(60);
        let v = trace(
            &plan_of(vec![s]),
            &pkt(pod("198.18.128.9"), "198.19.0.20", 80),
        );
        let text = v.explain();
        assert!(
            text.contains("default/web via ClusterIP")
                && text.contains("198.18.128.5:8080 (local)")
                && text.contains("60s"),
            "{text}"
        );
    }
}
