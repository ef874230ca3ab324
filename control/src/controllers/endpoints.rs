//! The endpoint controller: a Service's selector and the Pods it matches
//! become EndpointSlices, as Kubernetes' EndpointSlice controller does it.
//! Pure: given the Service, the namespace's Pods and the Service's current
//! managed slices, it returns the slices to write and delete, moving as few
//! endpoints as it can (kept endpoints stay in their slice, new ones fill free
//! room first).

use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::{BTreeMap, HashMap};
use weft_model::LabelSelector;

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "endpointslice-controller.weft.dev";
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// What the controller wants done for one Service.
#[derive(Debug, Default, PartialEq)]
pub struct SliceChanges {
    /// Slices to create or replace (new ones have `metadata.generate_name` set and no name).
    pub write: Vec<EndpointSlice>,
    /// Names of managed slices to delete.
    pub delete: Vec<String>,
}

/// Whether the controller manages endpoints for this Service at all.
pub fn selects_pods(svc: &Service) -> bool {
    let Some(spec) = &svc.spec else { return false };
    if spec.type_.as_deref() == Some("ExternalName") {
        return false;
    }
    spec.selector.as_ref().is_some_and(|s| !s.is_empty())
}

/// Whether `slice` is one this controller manages for Service `name`.
pub fn is_managed_slice_of(slice: &EndpointSlice, name: &str) -> bool {
    let labels = slice.metadata.labels.as_ref();
    labels
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .map(String::as_str)
        == Some(MANAGED_BY)
        && labels
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .map(String::as_str)
            == Some(name)
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The Pod's port for a Service port: an int targetPort as is, a named one
/// looked up among the Pod's container ports (same protocol).
fn resolve_port(pod: &Pod, target: &IntOrString, protocol: &str) -> Option<i32> {
    match target {
        IntOrString::Int(p) => Some(*p),
        IntOrString::String(name) => pod.spec.as_ref()?.containers.iter().find_map(|c| {
            c.ports.as_ref()?.iter().find_map(|p| {
                (p.name.as_deref() == Some(name.as_str())
                    && p.protocol.as_deref().unwrap_or("TCP") == protocol)
                    .then_some(p.container_port)
            })
        }),
    }
}

/// Compute the slice changes for `svc` given the Pods of its namespace and its existing managed slices.
pub fn reconcile(svc: &Service, pods: &[&Pod], existing: &[&EndpointSlice]) -> SliceChanges {
    let name = svc.metadata.name.clone().unwrap_or_default();
    let namespace = svc.metadata.namespace.clone().unwrap_or_default();
    let mut changes = SliceChanges::default();
    if !selects_pods(svc) {
        changes.delete = existing
            .iter()
            .filter_map(|s| s.metadata.name.clone())
            .collect();
        return changes;
    }
    let spec = svc.spec.as_ref().expect("selects_pods checked spec");
    let selector = LabelSelector::from_map(spec.selector.as_ref().expect("checked"));
    let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
    let svc_ports = spec.ports.clone().unwrap_or_default();

    // Desired endpoints grouped by (address type, port list).
    type Group = (String, Vec<(String, String, i32)>);
    let mut desired: BTreeMap<Group, BTreeMap<String, Endpoint>> = BTreeMap::new();
    for pod in pods {
        if !selector.matches(pod.metadata.labels.as_ref()) {
            continue;
        }
        if crate::compile::pod_terminal(pod) {
            continue;
        }
        let mut ports = Vec::new();
        for sp in &svc_ports {
            let protocol = sp.protocol.clone().unwrap_or_else(|| "TCP".into());
            let target = sp.target_port.clone().unwrap_or(IntOrString::Int(sp.port));
            if let Some(p) = resolve_port(pod, &target, &protocol) {
                ports.push((sp.name.clone().unwrap_or_default(), protocol, p));
            }
        }
        let serving = pod_ready(pod);
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let ready = publish_not_ready || (serving && !terminating);
        let pod_spec = pod.spec.as_ref();
        let hostname = pod_spec.and_then(|s| {
            (s.subdomain.as_deref() == Some(name.as_str()))
                .then(|| s.hostname.clone())
                .flatten()
        });
        for ip in crate::compile::pod_ips(pod) {
            let family = if ip.is_ipv6() { "IPv6" } else { "IPv4" };
            let ip = ip.to_string();
            let ep = Endpoint {
                addresses: vec![ip.clone()],
                conditions: Some(EndpointConditions {
                    ready: Some(ready),
                    serving: Some(serving),
                    terminating: Some(terminating),
                }),
                hostname: hostname.clone(),
                node_name: pod_spec.and_then(|s| s.node_name.clone()),
                target_ref: Some(ObjectReference {
                    kind: Some("Pod".into()),
                    namespace: pod.metadata.namespace.clone(),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            desired
                .entry((family.to_string(), ports.clone()))
                .or_default()
                .insert(ip, ep);
        }
    }

    let group_of = |s: &EndpointSlice| -> Group {
        let ports = s
            .ports
            .as_ref()
            .map(|ps| {
                ps.iter()
                    .map(|p| {
                        (
                            p.name.clone().unwrap_or_default(),
                            p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                            p.port.unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        (s.address_type.clone(), ports)
    };

    // Existing slices by group.
    let mut by_group: HashMap<Group, Vec<&EndpointSlice>> = HashMap::new();
    for s in existing {
        by_group.entry(group_of(s)).or_default().push(s);
    }
    for (group, slices) in &by_group {
        if !desired.contains_key(group) {
            changes
                .delete
                .extend(slices.iter().filter_map(|s| s.metadata.name.clone()));
        }
    }

    for (group, mut wanted) in desired {
        let mut slices: Vec<EndpointSlice> = by_group
            .remove(&group)
            .unwrap_or_default()
            .into_iter()
            .cloned()
            .collect();
        slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        let mut dirty = vec![false; slices.len()];
        // Keep endpoints that are still wanted where they are, with fresh conditions.
        for (i, s) in slices.iter_mut().enumerate() {
            let before = s.endpoints.clone();
            let mut kept = Vec::new();
            for ep in &s.endpoints {
                let Some(ip) = ep.addresses.first() else {
                    continue;
                };
                if let Some(new) = wanted.remove(ip) {
                    kept.push(new);
                }
            }
            if kept != before {
                dirty[i] = true;
            }
            s.endpoints = kept;
        }
        // Fill free room with the rest, then open new slices.
        let mut rest = wanted.into_values();
        for (i, s) in slices.iter_mut().enumerate() {
            while s.endpoints.len() < MAX_ENDPOINTS_PER_SLICE {
                match rest.next() {
                    Some(ep) => {
                        s.endpoints.push(ep);
                        dirty[i] = true;
                    }
                    None => break,
                }
            }
        }
        let mut fresh: Vec<EndpointSlice> = Vec::new();
        for ep in rest {
            if fresh
                .last()
                .is_none_or(|s| s.endpoints.len() >= MAX_ENDPOINTS_PER_SLICE)
            {
                fresh.push(new_slice(svc, &name, &namespace, &group));
            }
            if let Some(s) = fresh.last_mut() {
                s.endpoints.push(ep);
            }
        }
        for (i, s) in slices.into_iter().enumerate() {
            if s.endpoints.is_empty() {
                changes.delete.extend(s.metadata.name.clone());
            } else if dirty[i] {
                changes.write.push(s);
            }
        }
        changes.write.extend(fresh);
    }
    changes
}

fn new_slice(
    svc: &Service,
    name: &str,
    namespace: &str,
    group: &(String, Vec<(String, String, i32)>),
) -> EndpointSlice {
    let mut labels = svc.metadata.labels.clone().unwrap_or_default();
    labels.remove("service.kubernetes.io/headless");
    labels.insert(SERVICE_NAME_LABEL.into(), name.into());
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    if svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None") {
        labels.insert("service.kubernetes.io/headless".into(), String::new());
    }
    // Kubernetes: generateName is the Service name truncated to 58 characters plus "-".
    let prefix: String = name.chars().take(58).collect();
    EndpointSlice {
        metadata: ObjectMeta {
            generate_name: Some(format!("{prefix}-")),
            namespace: Some(namespace.into()),
            labels: Some(labels),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Service".into(),
                name: name.into(),
                uid: svc.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        address_type: group.0.clone(),
        ports: Some(
            group
                .1
                .iter()
                .map(|(n, proto, port)| EndpointPort {
                    name: Some(n.clone()),
                    protocol: Some(proto.clone()),
                    port: Some(*port),
                    app_protocol: None,
                })
                .collect(),
        ),
        endpoints: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).unwrap()
    }

    fn pod(name: &str, ip: &str, labels: serde_json::Value, ready: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "labels": labels, "uid": format!("uid-{name}")},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x",
                "ports": [{"name": "http", "containerPort": 8080}, {"name": "dns", "containerPort": 5353, "protocol": "UDP"}]}]},
            "status": {"podIP": ip, "phase": "Running",
                "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        }))
        .unwrap()
    }

    fn web() -> Service {
        svc(
            json!({"metadata": {"name": "web", "namespace": "default", "uid": "svc-uid"},
            "spec": {"selector": {"app": "web"}, "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"}]}}),
        )
    }

    fn named(mut s: EndpointSlice, n: &str) -> EndpointSlice {
        s.metadata.name = Some(n.into());
        s.metadata.generate_name = None;
        s
    }

    #[test]
    fn selector_named_ports_and_conditions() {
        let s = web();
        let p1 = pod("a", "198.18.128.2", json!({"app": "web"}), true);
        let p2 = pod("b", "198.18.128.3", json!({"app": "web"}), false);
        let mut p3 = pod("c", "198.18.128.4", json!({"app": "web"}), true);
        p3.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let other = pod("d", "198.18.128.5", json!({"app": "db"}), true);
        let ch = reconcile(&s, &[&p1, &p2, &p3, &other], &[]);
        assert!(ch.delete.is_empty());
        assert_eq!(ch.write.len(), 1);
        let slice = &ch.write[0];
        assert_eq!(slice.metadata.generate_name.as_deref(), Some("web-"));
        assert_eq!(
            slice.metadata.labels.as_ref().unwrap()[SERVICE_NAME_LABEL],
            "web"
        );
        let ports: Vec<_> = slice
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.clone().unwrap(), p.port.unwrap()))
            .collect();
        assert_eq!(
            ports,
            [("http".to_string(), 8080), ("dns".to_string(), 5353)]
        );
        let conds: BTreeMap<_, _> = slice
            .endpoints
            .iter()
            .map(|e| {
                let c = e.conditions.as_ref().unwrap();
                (
                    e.addresses[0].clone(),
                    (c.ready.unwrap(), c.serving.unwrap(), c.terminating.unwrap()),
                )
            })
            .collect();
        assert_eq!(conds["198.18.128.2"], (true, true, false));
        assert_eq!(conds["198.18.128.3"], (false, false, false));
        assert_eq!(conds["198.18.128.4"], (false, true, true));
        assert_eq!(conds.len(), 3);
    }

    #[test]
    fn publish_not_ready_marks_ready() {
        let mut s = web();
        s.spec.as_mut().unwrap().publish_not_ready_addresses = Some(true);
        let p = pod("b", "198.18.128.3", json!({"app": "web"}), false);
        let ch = reconcile(&s, &[&p], &[]);
        let c = ch.write[0].endpoints[0].conditions.clone().unwrap();
        assert_eq!((c.ready, c.serving), (Some(true), Some(false)));
    }

    #[test]
    fn unresolvable_named_port_groups_separately() {
        let s = web();
        let p1 = pod("a", "198.18.128.2", json!({"app": "web"}), true);
        let mut p2 = pod("b", "198.18.128.3", json!({"app": "web"}), true);
        p2.spec.as_mut().unwrap().containers[0].ports = Some(vec![serde_json::from_value(
            json!({"name": "http", "containerPort": 9090}),
        )
        .unwrap()]);
        let ch = reconcile(&s, &[&p1, &p2], &[]);
        assert_eq!(ch.write.len(), 2);
        let mut shapes: Vec<_> = ch
            .write
            .iter()
            .map(|w| (w.ports.as_ref().unwrap().len(), w.endpoints.len()))
            .collect();
        shapes.sort();
        assert_eq!(shapes, [(1, 1), (2, 1)]);
    }

    #[test]
    fn at_most_100_per_slice_and_minimal_churn() {
        let s = web();
        let pods: Vec<Pod> = (0..250)
            .map(|i| {
                pod(
                    &format!("p{i}"),
                    &format!("198.18.{}.{}", 128 + i / 200, 1 + i % 200),
                    json!({"app": "web"}),
                    true,
                )
            })
            .collect();
        let refs: Vec<&Pod> = pods.iter().collect();
        let ch = reconcile(&s, &refs, &[]);
        let mut sizes: Vec<_> = ch.write.iter().map(|w| w.endpoints.len()).collect();
        sizes.sort();
        assert_eq!(sizes, [50, 100, 100]);
        let existing: Vec<EndpointSlice> = ch
            .write
            .into_iter()
            .enumerate()
            .map(|(i, s)| named(s, &format!("web-{i}")))
            .collect();
        let ex: Vec<&EndpointSlice> = existing.iter().collect();
        // unchanged input → nothing to do
        assert_eq!(reconcile(&s, &refs, &ex), SliceChanges::default());
        // one pod turns unready → exactly one slice rewritten
        let mut pods2 = pods.clone();
        pods2[7] = pod("p7", "198.18.128.8", json!({"app": "web"}), false);
        let refs2: Vec<&Pod> = pods2.iter().collect();
        let ch = reconcile(&s, &refs2, &ex);
        assert_eq!(ch.write.len(), 1);
        assert!(ch.delete.is_empty());
        // one pod leaves → one slice rewritten, no new slices
        let refs3: Vec<&Pod> = pods.iter().skip(1).collect();
        let ch = reconcile(&s, &refs3, &ex);
        assert_eq!(ch.write.len(), 1);
        assert!(ch.write[0].metadata.name.is_some());
    }

    #[test]
    fn selectorless_and_removed_selector() {
        let mut s = web();
        s.spec.as_mut().unwrap().selector = None;
        let p = pod("a", "198.18.128.2", json!({"app": "web"}), true);
        let existing = named(reconcile(&web(), &[&p], &[]).write.remove(0), "web-x");
        let ch = reconcile(&s, &[&p], &[&existing]);
        assert!(ch.write.is_empty());
        assert_eq!(ch.delete, ["web-x"]);
        assert!(!selects_pods(&s));
    }

    #[test]
    fn pods_without_ip_or_finished_are_skipped() {
        let s = web();
        let mut done = pod("a", "198.18.128.2", json!({"app": "web"}), true);
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let mut noip = pod("b", "198.18.128.3", json!({"app": "web"}), true);
        noip.status.as_mut().unwrap().pod_ip = None;
        assert!(reconcile(&s, &[&done, &noip], &[]).write.is_empty());
    }
}
