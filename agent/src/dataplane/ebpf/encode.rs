//! The pure encode step: a planned Service as the eBPF programs will see it
//! (frontend entries per scope, each with its flags and backend set), and
//! [`lookup`], what the programs decide for a packet given those entries.
//! The tests hold `lookup` over the encoded maps equal to the tracer, the
//! oracle the iptables rules are also checked against.

use super::super::plan::{PlannedService, Target};
use std::net::{IpAddr, Ipv4Addr};
use weft_ebpf_abi::{
    Backend, ServiceKey, BACKEND_F_LOCAL, SCOPE_EXTERNAL, SCOPE_SOCKET, SVC_F_DROP, SVC_F_MAGLEV,
    SVC_F_REJECT, SVC_F_SNAT,
};
use weft_model::view::Protocol;

/// The Service annotation that picks the backend selection algorithm.
pub const LB_OPTION: &str = "weft.dev/lb";

/// A backend set's content: the backends (sorted) and whether it carries a
/// Maglev table. Sets with equal content are one set in the maps.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SetSpec {
    pub backends: Vec<Backend>,
    pub maglev: bool,
}

/// A Service port's session-affinity group: which Service port, and its timeout.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupKey {
    pub namespace: String,
    pub name: String,
    pub port_index: usize,
}

/// One frontend entry before set and group ids are assigned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendSpec {
    pub key: ServiceKey,
    /// `SVC_F_*`.
    pub flags: u32,
    /// The backends, or None with [`SVC_F_REJECT`] / [`SVC_F_DROP`].
    pub set: Option<SetSpec>,
    /// ClientIP affinity: the group and its timeout in seconds.
    pub affinity: Option<(GroupKey, u32)>,
}

/// How one Service encodes, and what it could not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedService {
    pub frontends: Vec<FrontendSpec>,
    /// Frontends or backends the IPv4 programs cannot serve (IPv6).
    pub skipped_ipv6: usize,
    /// The `weft.dev/lb` value when it is neither `random` nor `maglev`.
    pub unknown_lb: Option<String>,
}

pub fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::TCP => 6,
        Protocol::UDP => 17,
        Protocol::SCTP => 132,
    }
}

pub fn addr_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn addr_of(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(be.to_ne_bytes())
}

/// The frontend entries of one planned Service.
pub fn encode(svc: &PlannedService) -> EncodedService {
    let mut out = EncodedService::default();
    let maglev = match svc.options.get(LB_OPTION).map(String::as_str) {
        None | Some("random") => false,
        Some("maglev") => true,
        Some(other) => {
            out.unknown_lb = Some(other.to_string());
            false
        }
    };
    let set_of = |targets: &[Target]| -> SetSpec {
        let mut backends: Vec<Backend> = targets
            .iter()
            .filter_map(|t| match t.ip {
                IpAddr::V4(ip) => Some(Backend {
                    addr_be: addr_be(ip),
                    port_be: t.port.to_be(),
                    _pad: 0,
                    flags: if t.local { BACKEND_F_LOCAL } else { 0 },
                }),
                IpAddr::V6(_) => None,
            })
            .collect();
        backends.sort();
        SetSpec { backends, maglev }
    };
    for f in &svc.frontends {
        let IpAddr::V4(ip) = f.ip else {
            continue;
        };
        let Some(pb) = svc.backends.get(f.port_index) else {
            continue;
        };
        let affinity = svc.affinity_timeout.map(|t| {
            (
                GroupKey {
                    namespace: svc.namespace.clone(),
                    name: svc.name.clone(),
                    port_index: f.port_index,
                },
                t,
            )
        });
        // The tracer's choice of set per source (see tracer::verdict):
        // sockets are this node's pods and processes, the external scope
        // is everything arriving from outside.
        let socket = if !f.kind.external() || svc.external_local {
            &pb.internal
        } else {
            &pb.external
        };
        let external = if f.kind.external() {
            &pb.external
        } else {
            &pb.internal
        };
        let snat = !f.kind.external() || !svc.external_local;
        let mut scopes = vec![(SCOPE_SOCKET, socket, 0)];
        // Nothing arrives from outside on a loopback address.
        if !ip.is_loopback() {
            scopes.push((SCOPE_EXTERNAL, external, if snat { SVC_F_SNAT } else { 0 }));
        }
        for (scope, targets, extra) in scopes {
            let key = ServiceKey {
                addr_be: addr_be(ip),
                port_be: f.port.to_be(),
                proto: proto_number(f.protocol),
                scope,
            };
            let set = set_of(targets);
            let (flags, set) = if pb.cluster.is_empty() {
                (SVC_F_REJECT, None)
            } else if set.backends.is_empty() {
                (SVC_F_DROP, None)
            } else {
                (extra | if maglev { SVC_F_MAGLEV } else { 0 }, Some(set))
            };
            out.frontends.push(FrontendSpec {
                key,
                flags,
                affinity: if set.is_some() {
                    affinity.clone()
                } else {
                    None
                },
                set,
            });
        }
    }
    out.skipped_ipv6 = svc.frontends.iter().filter(|f| f.ip.is_ipv6()).count()
        + svc
            .backends
            .iter()
            .map(|pb| pb.cluster.iter().filter(|t| t.ip.is_ipv6()).count())
            .sum::<usize>();
    out
}

/// What the programs do with a new flow, read off the frontend entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No entry: the address is left alone.
    Pass,
    Reject,
    Drop,
    /// Translated to one of these backends; the source masqueraded or not.
    Translate {
        backends: Vec<Backend>,
        snat: bool,
        affinity_timeout: Option<u32>,
    },
}

/// The programs' decision for `key` given the frontend entries in
/// `frontends` (first match, as the maps hold one entry per key).
pub fn lookup<'a>(
    frontends: impl IntoIterator<Item = &'a FrontendSpec>,
    key: ServiceKey,
) -> Decision {
    let Some(f) = frontends.into_iter().find(|f| f.key == key) else {
        return Decision::Pass;
    };
    if f.flags & SVC_F_REJECT != 0 {
        return Decision::Reject;
    }
    match &f.set {
        Some(set) if f.flags & SVC_F_DROP == 0 && !set.backends.is_empty() => Decision::Translate {
            backends: set.backends.clone(),
            snat: f.flags & SVC_F_SNAT != 0,
            affinity_timeout: f.affinity.as_ref().map(|(_, t)| *t),
        },
        _ => Decision::Drop,
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::fixtures::{backend as be, config, node_port_service, NODE};
    use super::super::super::plan::{build, ServicePlan};
    use super::super::super::tracer::{trace, Packet, Source, Verdict};
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use weft_model::{NodeView, ServiceEntry};

    fn plan_of(services: Vec<ServiceEntry>) -> ServicePlan {
        let view = NodeView {
            rev: 1,
            synced: true,
            services: services.into_iter().map(|s| (s.key(), s)).collect(),
            nodes: BTreeMap::new(),
            pods: Default::default(),
        };
        let mut cfg = config();
        cfg.localhost_node_ports = true;
        build(&view, &cfg)
    }

    fn all_frontends(plan: &ServicePlan) -> Vec<FrontendSpec> {
        plan.services
            .iter()
            .flat_map(|s| encode(s).frontends)
            .collect()
    }

    fn key(dst: IpAddr, port: u16, protocol: Protocol, scope: u8) -> ServiceKey {
        let IpAddr::V4(v4) = dst else { unreachable!() };
        ServiceKey {
            addr_be: addr_be(v4),
            port_be: port.to_be(),
            proto: proto_number(protocol),
            scope,
        }
    }

    /// The tracer's verdict in the programs' terms, for a source a given
    /// scope serves.
    fn expected(v: &Verdict) -> Decision {
        match v {
            Verdict::PassThrough => Decision::Pass,
            Verdict::Reject { .. } => Decision::Reject,
            Verdict::Drop { .. } => Decision::Drop,
            Verdict::Dnat {
                backends,
                affinity_timeout,
                ..
            } => {
                let mut list: Vec<Backend> = backends
                    .iter()
                    .map(|c| {
                        let IpAddr::V4(ip) = c.target.ip else {
                            unreachable!()
                        };
                        Backend {
                            addr_be: addr_be(ip),
                            port_be: c.target.port.to_be(),
                            _pad: 0,
                            flags: if c.target.local { BACKEND_F_LOCAL } else { 0 },
                        }
                    })
                    .collect();
                list.sort();
                Decision::Translate {
                    backends: list,
                    // For outside clients the tracer masquerades all or none.
                    snat: backends.iter().all(|c| c.masquerade),
                    affinity_timeout: *affinity_timeout,
                }
            }
        }
    }

    /// Compare the programs' decision with the tracer's for every frontend
    /// of the plan (and a port nobody serves), from a local pod, the node
    /// and an outside client. Socket hooks carry no NAT, so masquerade is
    /// compared for outside clients only.
    fn agree(plan: &ServicePlan) -> Result<(), TestCaseError> {
        let entries = all_frontends(plan);
        let mut probes: Vec<(IpAddr, u16, Protocol)> = plan
            .services
            .iter()
            .flat_map(|s| s.frontends.iter().map(|f| (f.ip, f.port, f.protocol)))
            .collect();
        probes.push(("198.19.0.20".parse().unwrap(), 9, Protocol::TCP));
        for (dst, port, protocol) in probes {
            for (src, scope) in [
                (
                    Source::LocalPod("198.18.128.99".parse().unwrap()),
                    SCOPE_SOCKET,
                ),
                (Source::Node, SCOPE_SOCKET),
                (
                    Source::External("198.19.255.9".parse().unwrap()),
                    SCOPE_EXTERNAL,
                ),
            ] {
                let p = Packet {
                    src: src.clone(),
                    protocol,
                    dst,
                    port,
                };
                let want = expected(&trace(plan, &p));
                let mut got = lookup(&entries, key(dst, port, protocol, scope));
                if dst.is_ipv4() && dst.to_string().starts_with("127.") && scope == SCOPE_EXTERNAL {
                    // Nothing arrives from outside on loopback: not encoded.
                    prop_assert_eq!(got, Decision::Pass);
                    continue;
                }
                if scope == SCOPE_SOCKET {
                    if let (
                        Decision::Translate { snat, .. },
                        Decision::Translate {
                            snat: want_snat, ..
                        },
                    ) = (&mut got, &want)
                    {
                        *snat = *want_snat;
                    }
                }
                prop_assert_eq!(&got, &want, "{:?} -> {}:{}/{:?}", src, dst, port, protocol);
            }
        }
        Ok(())
    }

    #[test]
    fn cluster_ip_node_port_and_policies_match_the_tracer() {
        let mut web = node_port_service(
            "web",
            vec![
                be("198.18.128.5", NODE, true, true, false),
                be("198.18.129.5", "node-2", true, true, false),
            ],
        );
        web.external_ips = vec!["198.19.255.50".parse().unwrap()];
        let mut local = web.clone();
        local.name = "local".into();
        local.cluster_ips = vec!["198.19.0.21".parse().unwrap()];
        local.ports[0].node_port = Some(30081);
        local.external_ips.clear();
        local.external_local = true;
        local.internal_local = true;
        local.backends = vec![be("198.18.129.5", "node-2", true, true, false)];
        let mut empty = node_port_service("empty", vec![]);
        empty.cluster_ips = vec!["198.19.0.22".parse().unwrap()];
        empty.ports[0].node_port = Some(30082);
        let plan = plan_of(vec![web, local, empty]);
        agree(&plan).unwrap();

        let entries = all_frontends(&plan);
        let np = |port: u16, scope| {
            lookup(
                &entries,
                key("198.18.0.11".parse().unwrap(), port, Protocol::TCP, scope),
            )
        };
        assert!(matches!(
            np(30080, SCOPE_EXTERNAL),
            Decision::Translate { snat: true, .. }
        ));
        assert_eq!(
            np(30081, SCOPE_EXTERNAL),
            Decision::Drop,
            "ETP Local, no local endpoint"
        );
        assert_eq!(
            np(30081, SCOPE_SOCKET),
            Decision::Drop,
            "pods use ITP Local here"
        );
        assert_eq!(np(30082, SCOPE_SOCKET), Decision::Reject);
        assert_eq!(np(30082, SCOPE_EXTERNAL), Decision::Reject);
    }

    #[test]
    fn maglev_option_and_unknown_values() {
        let mut s = node_port_service("web", vec![be("198.18.128.5", NODE, true, true, false)]);
        s.options.insert(LB_OPTION.into(), "maglev".into());
        let plan = plan_of(vec![s.clone()]);
        let enc = encode(&plan.services[0]);
        assert!(enc
            .frontends
            .iter()
            .all(|f| f.flags & SVC_F_MAGLEV != 0 && f.set.as_ref().unwrap().maglev));
        assert_eq!(enc.unknown_lb, None);
        s.options.insert(LB_OPTION.into(), "round-robin".into());
        let enc = encode(&plan_of(vec![s]).services[0]);
        assert_eq!(enc.unknown_lb.as_deref(), Some("round-robin"));
        assert!(enc.frontends.iter().all(|f| f.flags & SVC_F_MAGLEV == 0));
    }

    #[test]
    fn affinity_groups_are_per_service_port() {
        let mut s = node_port_service("web", vec![be("198.18.128.5", NODE, true, true, false)]);
        s.affinity_timeout = Some(30);
        let enc = encode(&plan_of(vec![s]).services[0]);
        let groups: std::collections::BTreeSet<_> =
            enc.frontends.iter().map(|f| f.affinity.clone()).collect();
        assert_eq!(groups.len(), 1, "{groups:?}");
        let (g, t) = groups.into_iter().next().flatten().unwrap();
        assert_eq!((g.name.as_str(), g.port_index, t), ("web", 0, 30));
    }

    #[test]
    fn ipv6_is_counted_not_encoded() {
        let mut s = node_port_service(
            "web",
            vec![
                be("198.18.128.5", NODE, true, true, false),
                be("fd00::5", NODE, true, true, false),
            ],
        );
        s.cluster_ips.push("fd00:19::20".parse().unwrap());
        let enc = encode(&plan_of(vec![s]).services[0]);
        assert_eq!(enc.skipped_ipv6, 2);
        assert!(enc
            .frontends
            .iter()
            .filter_map(|f| f.set.as_ref())
            .all(|set| set.backends.len() == 1));
    }

    fn arb_backend() -> impl Strategy<Value = weft_model::Backend> {
        (
            0u8..6,
            prop::sample::select(vec![NODE, "node-2"]),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(i, node, ready, serving, terminating)| {
                let net = if node == NODE { 128 } else { 129 };
                be(
                    &format!("198.18.{net}.{}", 10 + i),
                    node,
                    ready,
                    serving,
                    terminating,
                )
            })
    }

    fn arb_service(i: u8) -> impl Strategy<Value = ServiceEntry> {
        (
            prop::collection::vec(arb_backend(), 0..5),
            any::<bool>(),
            any::<bool>(),
            prop::option::of(1u32..100),
            any::<bool>(),
        )
            .prop_map(move |(backends, etp, itp, affinity, ext)| {
                let mut s = node_port_service(&format!("s{i}"), backends);
                s.cluster_ips = vec![format!("198.19.0.{}", 20 + i).parse().unwrap()];
                s.ports[0].node_port = Some(30080 + u16::from(i));
                s.external_local = etp;
                s.internal_local = itp;
                s.affinity_timeout = affinity;
                if ext {
                    s.external_ips = vec![format!("198.19.255.{}", 50 + i).parse().unwrap()];
                }
                s
            })
    }

    proptest! {
        #[test]
        fn encoded_maps_agree_with_the_tracer(
            a in arb_service(0), b in arb_service(1), c in arb_service(2)
        ) {
            agree(&plan_of(vec![a, b, c]))?;
        }
    }
}
