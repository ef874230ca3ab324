//! The node's service plan: for every proxied Service, its frontends on this
//! node (cluster IPs, NodePorts on the node's addresses, allowed external IPs,
//! load-balancer IPs) and, per port, the backends each kind of traffic may
//! use under the Service's traffic policies. Pure: built from the view and
//! the node's settings.

use ipnetwork::IpNetwork;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use weft_model::view::{FrontendPort, Protocol};
use weft_model::{Backend, NodeView, ServiceEntry};

/// What the plan needs to know about this node.
#[derive(Clone, Debug)]
pub struct PlanConfig {
    pub node: String,
    /// Addresses NodePorts answer on (the node's own addresses).
    pub node_addresses: Vec<IpAddr>,
    /// Also answer NodePorts on 127.0.0.1 (off by default, as in kube-proxy's
    /// `--nodeport-addresses` without loopback).
    pub localhost_node_ports: bool,
    /// externalIPs are honoured only inside these ranges (CVE-2020-8554);
    /// empty = none.
    pub external_ip_allow: Vec<IpNetwork>,
    /// The pod CIDR: dataplanes tell pod sources from others by it.
    pub cluster_cidr: IpNetwork,
    /// The cluster DNS address the agent serves itself (a local address of
    /// the node): its port 53 frontends are not translated, whatever
    /// Service claims that address.
    pub local_dns: Option<IpAddr>,
}

/// How a frontend is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIP,
    NodePort,
    ExternalIP,
    LoadBalancer,
}

impl FrontendKind {
    /// Traffic to cluster IPs is internal; the rest is external (traffic policies).
    pub fn external(self) -> bool {
        self != FrontendKind::ClusterIP
    }
}

/// One address:port a Service answers on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub kind: FrontendKind,
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// Index into [`PlannedService::ports`].
    pub port_index: usize,
}

/// A backend address and port for one Service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub ip: IpAddr,
    pub port: u16,
    pub local: bool,
}

/// The backends of one Service port, by traffic kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortBackends {
    /// Internal traffic (to cluster IPs): all usable endpoints, or only local
    /// ones under `internalTrafficPolicy: Local`.
    pub internal: Vec<Target>,
    /// External traffic from outside the cluster: all usable endpoints, or
    /// only local ones under `externalTrafficPolicy: Local`.
    pub external: Vec<Target>,
    /// Usable endpoints anywhere (pods and the node reaching an external
    /// frontend of an `externalTrafficPolicy: Local` Service use these).
    pub cluster: Vec<Target>,
    /// Whether any endpoint exists for this port at all (ready or not):
    /// distinguishes "no endpoints" (REJECT) from "none usable here" (DROP).
    pub any: bool,
}

/// One Service as this node serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedService {
    pub namespace: String,
    pub name: String,
    pub ports: Vec<FrontendPort>,
    pub frontends: Vec<Frontend>,
    pub backends: Vec<PortBackends>,
    pub affinity_timeout: Option<u32>,
    pub external_local: bool,
    pub internal_local: bool,
    pub health_check_node_port: Option<u16>,
    /// `weft.dev/*` options (e.g. the backend selection algorithm).
    pub options: std::collections::BTreeMap<String, String>,
}

/// Every proxied Service on this node. Services are shared (`Arc`): a
/// [`PlanBuilder`] hands an unchanged Service's planned form to the next plan
/// without rebuilding or copying it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePlan {
    pub services: Vec<Arc<PlannedService>>,
    /// externalIPs that were not programmed because no allow-list range holds them.
    pub denied_external_ips: Vec<(String, IpAddr)>,
    /// Backends never programmed (loopback, link-local, unspecified, multicast).
    pub rejected_backends: Vec<(String, IpAddr)>,
    /// This plan's number from its [`PlanBuilder`] (0 from [`build`]).
    pub generation: u64,
    /// The Services (namespace, name) that may differ from the builder's
    /// previous plan (generation - 1); None = any of them. A dataplane that
    /// applied that previous plan needs to look at these only.
    pub changed: Option<Vec<(String, String)>>,
}

/// Addresses a backend may never have: a Service must not become a way to
/// reach the node's loopback, link-local or multicast space.
pub fn forbidden_backend(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_link_local()
                || o[0] == 0
                || v4.is_multicast()
                || v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

fn usable<'a>(backends: &[&'a Backend]) -> Vec<&'a Backend> {
    // Ready endpoints; when none is ready, serving terminating ones (KEP-1669).
    let ready: Vec<&Backend> = backends.iter().copied().filter(|b| b.ready).collect();
    if !ready.is_empty() {
        return ready;
    }
    backends
        .iter()
        .copied()
        .filter(|b| b.serving && b.terminating)
        .collect()
}

fn targets(bs: &[&Backend], port: &FrontendPort, node: &str) -> Vec<Target> {
    let mut out: Vec<Target> = bs
        .iter()
        .filter_map(|b| {
            Some(Target {
                ip: b.ip,
                port: b.port_for(&port.name, port.protocol)?,
                local: b.is_local(node),
            })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Build the plan for this node from the view.
pub fn build(view: &NodeView, cfg: &PlanConfig) -> ServicePlan {
    PlanBuilder::default().build_all(view, cfg)
}

/// One Service's planned form, and the view entry it was planned from.
struct Planned {
    entry: ServiceEntry,
    service: Option<Arc<PlannedService>>,
    denied: Vec<(String, IpAddr)>,
    rejected: Vec<(String, IpAddr)>,
}

/// Builds plans from successive views, planning again only the Services
/// whose view entry changed (a change costs one comparison per Service, not
/// a rebuild of every Service). For one node's settings: use a new builder
/// when the [`PlanConfig`] changes.
#[derive(Default)]
pub struct PlanBuilder {
    cache: HashMap<(String, String), Planned>,
    /// The last plan built (its Services sorted by namespace/name), which
    /// [`PlanBuilder::update`] edits in place.
    last: Option<ServicePlan>,
    generation: u64,
}

impl PlanBuilder {
    /// The plan for `view`, comparing every Service with the one planned
    /// before.
    pub fn build(&mut self, view: &NodeView, cfg: &PlanConfig) -> ServicePlan {
        let mut plan = self.build_all(view, cfg);
        self.generation += 1;
        plan.generation = self.generation;
        self.last = Some(plan.clone());
        plan
    }

    /// The plan for `view` when only the Services in `changed` (namespace,
    /// name) can differ from the view of the previous call: costs what
    /// changed (plus copying the list of shared Services), not a look at
    /// every Service. Without a previous plan it is [`PlanBuilder::build`].
    pub fn update(
        &mut self,
        view: &NodeView,
        cfg: &PlanConfig,
        changed: &std::collections::BTreeSet<(String, String)>,
    ) -> ServicePlan {
        let Some(mut plan) = self.last.take() else {
            return self.build(view, cfg);
        };
        let mut side_lists_changed = false;
        for key in changed {
            let pos = plan.services.binary_search_by(|s| {
                (s.namespace.as_str(), s.name.as_str()).cmp(&(key.0.as_str(), key.1.as_str()))
            });
            let had_side = self
                .cache
                .get(key)
                .is_some_and(|p| !p.denied.is_empty() || !p.rejected.is_empty());
            let service = match view.services.get(key) {
                Some(svc) => {
                    let current = matches!(self.cache.get(key), Some(p) if p.entry == *svc);
                    if !current {
                        self.cache.insert(key.clone(), planned(svc, cfg));
                    }
                    let p = &self.cache[key];
                    side_lists_changed |=
                        had_side || !p.denied.is_empty() || !p.rejected.is_empty();
                    p.service.clone()
                }
                None => {
                    self.cache.remove(key);
                    side_lists_changed |= had_side;
                    None
                }
            };
            match (pos, service) {
                (Ok(i), Some(s)) => plan.services[i] = s,
                (Ok(i), None) => {
                    plan.services.remove(i);
                }
                (Err(i), Some(s)) => plan.services.insert(i, s),
                (Err(_), None) => {}
            }
        }
        if side_lists_changed {
            plan.denied_external_ips.clear();
            plan.rejected_backends.clear();
            for key in view.services.keys() {
                if let Some(p) = self.cache.get(key) {
                    plan.denied_external_ips.extend(p.denied.iter().cloned());
                    plan.rejected_backends.extend(p.rejected.iter().cloned());
                }
            }
        }
        self.generation += 1;
        plan.generation = self.generation;
        plan.changed = Some(changed.iter().cloned().collect());
        self.last = Some(plan.clone());
        plan
    }

    fn build_all(&mut self, view: &NodeView, cfg: &PlanConfig) -> ServicePlan {
        let mut plan = ServicePlan::default();
        for (key, svc) in &view.services {
            let current = matches!(self.cache.get(key), Some(p) if p.entry == *svc);
            if !current {
                self.cache.insert(key.clone(), planned(svc, cfg));
            }
            if let Some(p) = self.cache.get(key) {
                plan.services.extend(p.service.clone());
                plan.denied_external_ips.extend(p.denied.iter().cloned());
                plan.rejected_backends.extend(p.rejected.iter().cloned());
            }
        }
        if self.cache.len() > view.services.len() {
            self.cache.retain(|k, _| view.services.contains_key(k));
        }
        plan
    }
}

fn planned(svc: &ServiceEntry, cfg: &PlanConfig) -> Planned {
    let mut side = ServicePlan::default();
    let service = plan_service(svc, cfg, &mut side).map(Arc::new);
    Planned {
        entry: svc.clone(),
        service,
        denied: side.denied_external_ips,
        rejected: side.rejected_backends,
    }
}

fn plan_service(
    svc: &ServiceEntry,
    cfg: &PlanConfig,
    plan: &mut ServicePlan,
) -> Option<PlannedService> {
    if !svc.proxied || svc.headless || svc.external_name.is_some() || svc.cluster_ips.is_empty() {
        return None;
    }
    let key = format!("{}/{}", svc.namespace, svc.name);
    let mut valid: Vec<&Backend> = Vec::new();
    for b in &svc.backends {
        if forbidden_backend(b.ip) {
            plan.rejected_backends.push((key.clone(), b.ip));
        } else {
            valid.push(b);
        }
    }
    let mut external_ips = Vec::new();
    for ip in &svc.external_ips {
        if cfg.external_ip_allow.iter().any(|n| n.contains(*ip)) {
            external_ips.push(*ip);
        } else {
            plan.denied_external_ips.push((key.clone(), *ip));
        }
    }
    let mut node_addrs = cfg.node_addresses.clone();
    if cfg.localhost_node_ports {
        node_addrs.push(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    }
    let mut frontends = Vec::new();
    let mut backends = Vec::new();
    for (i, port) in svc.ports.iter().enumerate() {
        for ip in &svc.cluster_ips {
            if cfg.local_dns == Some(*ip) && port.port == 53 {
                continue;
            }
            frontends.push(Frontend {
                kind: FrontendKind::ClusterIP,
                ip: *ip,
                port: port.port,
                protocol: port.protocol,
                port_index: i,
            });
        }
        if let Some(np) = port.node_port {
            for ip in &node_addrs {
                frontends.push(Frontend {
                    kind: FrontendKind::NodePort,
                    ip: *ip,
                    port: np,
                    protocol: port.protocol,
                    port_index: i,
                });
            }
        }
        for ip in &external_ips {
            frontends.push(Frontend {
                kind: FrontendKind::ExternalIP,
                ip: *ip,
                port: port.port,
                protocol: port.protocol,
                port_index: i,
            });
        }
        for ip in &svc.load_balancer_ips {
            frontends.push(Frontend {
                kind: FrontendKind::LoadBalancer,
                ip: *ip,
                port: port.port,
                protocol: port.protocol,
                port_index: i,
            });
        }
        let with_port: Vec<&Backend> = valid
            .iter()
            .copied()
            .filter(|b| b.port_for(&port.name, port.protocol).is_some())
            .collect();
        let local: Vec<&Backend> = with_port
            .iter()
            .copied()
            .filter(|b| b.is_local(&cfg.node))
            .collect();
        let cluster = targets(&usable(&with_port), port, &cfg.node);
        let local_usable = targets(&usable(&local), port, &cfg.node);
        backends.push(PortBackends {
            internal: if svc.internal_local {
                local_usable.clone()
            } else {
                cluster.clone()
            },
            external: if svc.external_local {
                local_usable
            } else {
                cluster.clone()
            },
            cluster,
            any: !with_port.is_empty(),
        });
    }
    Some(PlannedService {
        namespace: svc.namespace.clone(),
        name: svc.name.clone(),
        ports: svc.ports.clone(),
        frontends,
        backends,
        affinity_timeout: svc.affinity_timeout,
        external_local: svc.external_local,
        internal_local: svc.internal_local,
        health_check_node_port: svc.health_check_node_port,
        options: svc.options.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{self, backend, node_port_service};
    use super::*;

    /// The plan without the builder's bookkeeping, for comparing plans.
    fn content(p: &ServicePlan) -> ServicePlan {
        ServicePlan {
            generation: 0,
            changed: None,
            ..p.clone()
        }
    }

    proptest::proptest! {
        /// Editing the last plan by the changed keys gives the plan built
        /// from scratch, whatever the sequence of puts and removals.
        #[test]
        fn update_by_changed_keys_equals_a_full_build(
            steps in proptest::collection::vec((0usize..8, 0u8..5), 1..30)
        ) {
            let cfg = fixtures::config();
            let mut view = NodeView { rev: 1, synced: true, ..Default::default() };
            let mut builder = PlanBuilder::default();
            builder.build(&view, &cfg);
            for (i, what) in steps {
                let name = format!("s{i}");
                let mut s = node_port_service(
                    &name,
                    vec![backend(&format!("198.18.128.{}", 10 + i), fixtures::NODE, true, true, false)],
                );
                s.cluster_ips = vec![format!("198.19.0.{}", 20 + i).parse().unwrap()];
                s.ports[0].node_port = Some(30000 + i as u16);
                match what {
                    0 => { view.services.remove(&s.key()); }
                    1 => { s.backends.clear(); view.services.insert(s.key(), s); }
                    2 => { s.external_ips = vec!["198.19.254.1".parse().unwrap()]; view.services.insert(s.key(), s); }
                    3 => { s.proxied = false; view.services.insert(s.key(), s); }
                    _ => { view.services.insert(s.key(), s); }
                }
                let changed = [("default".to_string(), name)].into_iter().collect();
                let got = builder.update(&view, &cfg, &changed);
                proptest::prop_assert_eq!(content(&got), content(&build(&view, &cfg)));
                proptest::prop_assert!(got.changed.is_some());
            }
        }
    }

    #[test]
    fn the_builder_plans_only_what_changed() {
        let view = |second: &str| NodeView {
            rev: 1,
            synced: true,
            services: [
                node_port_service(
                    "a",
                    vec![backend("198.18.128.5", "node-1", true, true, false)],
                ),
                node_port_service("b", vec![backend(second, "node-2", true, true, false)]),
                ServiceEntry {
                    external_ips: vec!["198.19.254.1".parse().unwrap()],
                    ..node_port_service(
                        "c",
                        vec![backend("127.0.0.1", "node-1", true, true, false)],
                    )
                },
            ]
            .into_iter()
            .map(|s| (s.key(), s))
            .collect(),
            nodes: Default::default(),
            pods: Default::default(),
        };
        let cfg = fixtures::config();
        let mut builder = PlanBuilder::default();
        let one = builder.build(&view("198.18.129.5"), &cfg);
        assert_eq!(
            content(&one),
            build(&view("198.18.129.5"), &cfg),
            "same plan as a fresh build"
        );
        assert_eq!(one.denied_external_ips.len(), 1);
        assert_eq!(one.rejected_backends.len(), 1);
        let two = builder.build(&view("198.18.129.9"), &cfg);
        assert_eq!(content(&two), build(&view("198.18.129.9"), &cfg));
        assert!(
            Arc::ptr_eq(&one.services[0], &two.services[0]),
            "unchanged: shared, not planned again"
        );
        assert!(
            !Arc::ptr_eq(&one.services[1], &two.services[1]),
            "changed: planned again"
        );
        assert_eq!(
            two.denied_external_ips.len(),
            1,
            "side findings kept for unchanged Services"
        );
        let mut smaller = view("198.18.129.9");
        smaller.services.retain(|(_, name), _| name == "a");
        let three = builder.build(&smaller, &cfg);
        assert_eq!(three.services.len(), 1);
        assert!(three.denied_external_ips.is_empty());
        assert_eq!(builder.cache.len(), 1, "removed Services are forgotten");
    }
}
