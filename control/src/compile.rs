//! Compiling stored objects into the node view's entries: a Service with its
//! EndpointSlices becomes one `ServiceEntry`, a Node one `NodeEntry`, a Pod
//! that owns pod IPs one `PodEntry`. Runs once per change on the control
//! plane; agents only ever see the result.

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::collections::BTreeMap;
use std::net::IpAddr;
use weft_model::view::{FrontendPort, Protocol, ServiceType};
use weft_model::{Backend, BackendPort, NodeEntry, PodEntry, ServiceEntry};

pub const VTEP_IP_ANNOTATION: &str = "weft.dev/vtep-ip";
pub const VTEP_MAC_ANNOTATION: &str = "weft.dev/vtep-mac";
const OPTION_PREFIX: &str = "weft.dev/";

fn ips(list: Option<&Vec<String>>) -> Vec<IpAddr> {
    list.into_iter()
        .flatten()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The entry for `svc` given every EndpointSlice labelled with its name.
pub fn service_entry(svc: &Service, slices: &[&EndpointSlice]) -> ServiceEntry {
    let spec = svc.spec.clone().unwrap_or_default();
    let service_type = match spec.type_.as_deref() {
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => ServiceType::ExternalName,
        _ => ServiceType::ClusterIP,
    };
    let headless = spec.cluster_ip.as_deref() == Some("None");
    let mut cluster_ips = ips(spec.cluster_ips.as_ref());
    if cluster_ips.is_empty() {
        cluster_ips.extend(
            spec.cluster_ip
                .as_deref()
                .and_then(|s| s.parse::<IpAddr>().ok()),
        );
    }
    if service_type == ServiceType::ExternalName {
        cluster_ips.clear();
    }
    let labels = svc.metadata.labels.clone().unwrap_or_default();
    let proxied = !labels.contains_key("service.kubernetes.io/service-proxy-name")
        && !labels.contains_key("service.kubernetes.io/headless");
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            Some(FrontendPort {
                name: p.name.clone().unwrap_or_default(),
                protocol: Protocol::parse(p.protocol.as_deref().unwrap_or("TCP"))?,
                port: u16::try_from(p.port).ok()?,
                node_port: p
                    .node_port
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|n| *n != 0),
            })
        })
        .collect();
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(10800)
    });
    let load_balancer_ips = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect();
    let options = svc
        .metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| k.starts_with(OPTION_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();

    // Backends from every slice; an address in several slices merges its ports.
    let mut backends: BTreeMap<IpAddr, Backend> = BTreeMap::new();
    let mut sorted: Vec<&&EndpointSlice> = slices.iter().collect();
    sorted.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    for slice in sorted {
        if slice.address_type == "FQDN" {
            continue;
        }
        let ports: Vec<BackendPort> = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(BackendPort {
                    name: p.name.clone().unwrap_or_default(),
                    protocol: Protocol::parse(p.protocol.as_deref().unwrap_or("TCP"))?,
                    port: u16::try_from(p.port?).ok().filter(|p| *p != 0)?,
                })
            })
            .collect();
        for ep in &slice.endpoints {
            let conds = ep.conditions.clone().unwrap_or_default();
            // Kubernetes: a nil ready/serving means "unknown", interpreted as ready.
            let terminating = conds.terminating.unwrap_or(false);
            let ready = conds.ready.unwrap_or(true);
            let serving = conds.serving.unwrap_or(ready);
            for addr in &ep.addresses {
                let Ok(ip) = addr.parse::<IpAddr>() else {
                    continue;
                };
                let target = ep.target_ref.as_ref().and_then(|r| {
                    Some(format!(
                        "{}/{}",
                        r.namespace.as_deref().unwrap_or(""),
                        r.name.as_deref()?
                    ))
                });
                let b = backends.entry(ip).or_insert_with(|| Backend {
                    ip,
                    node: ep.node_name.clone(),
                    hostname: ep.hostname.clone(),
                    target,
                    zone: ep.zone.clone(),
                    ports: Vec::new(),
                    ready,
                    serving,
                    terminating,
                });
                for p in &ports {
                    if !b.ports.contains(p) {
                        b.ports.push(p.clone());
                    }
                }
            }
        }
    }

    ServiceEntry {
        namespace: svc.metadata.namespace.clone().unwrap_or_default(),
        name: svc.metadata.name.clone().unwrap_or_default(),
        service_type,
        cluster_ips,
        headless,
        external_name: (service_type == ServiceType::ExternalName)
            .then(|| spec.external_name.clone())
            .flatten(),
        ports,
        external_ips: ips(spec.external_ips.as_ref()),
        load_balancer_ips,
        affinity_timeout,
        external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        health_check_node_port: spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0),
        publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false),
        proxied,
        options,
        backends: backends.into_values().collect(),
    }
}

/// The entry for a Node: addresses, subnet and VXLAN endpoint.
pub fn node_entry(node: &Node) -> NodeEntry {
    let status = node.status.as_ref();
    let addr = |kind: &str| -> Option<IpAddr> {
        status?
            .addresses
            .as_ref()?
            .iter()
            .find(|a| a.type_ == kind)
            .and_then(|a| a.address.parse().ok())
    };
    let node_ip = addr("InternalIP").or_else(|| addr("ExternalIP"));
    let ann = node.metadata.annotations.as_ref();
    let spec = node.spec.as_ref();
    let mut pod_cidrs: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    if pod_cidrs.is_empty() {
        pod_cidrs.extend(spec.and_then(|s| s.pod_cidr.clone()));
    }
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    NodeEntry {
        name: node.metadata.name.clone().unwrap_or_default(),
        node_ip,
        pod_cidrs,
        vtep_ip: ann
            .and_then(|a| a.get(VTEP_IP_ANNOTATION))
            .and_then(|s| s.parse().ok())
            .or(node_ip),
        vtep_mac: ann.and_then(|a| a.get(VTEP_MAC_ANNOTATION)).cloned(),
        ready,
    }
}

/// A pod that ran to completion (`Succeeded`/`Failed`): it holds no
/// address and is no endpoint.
pub fn pod_terminal(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    matches!(phase, Some("Succeeded" | "Failed"))
}

/// The Pod's addresses, primary first: `status.podIPs` when set (podIP is
/// its first item), else `status.podIP` (older writers set it alone);
/// unparsable ones and repeats left out.
pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let listed = status.pod_ips.as_deref().unwrap_or_default();
    let only = status.pod_ip.as_deref().filter(|_| listed.is_empty());
    let mut ips = Vec::with_capacity(listed.len().max(1));
    for ip in listed
        .iter()
        .map(|p| p.ip.as_str())
        .chain(only)
        .filter_map(|s| s.parse::<IpAddr>().ok())
    {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips
}

/// The entry for a Pod, or `None` when the Pod owns no pod IP: none assigned
/// yet, `hostNetwork` (its address is its node's, which the pod must not be
/// taken to own), or terminal (`Succeeded`/`Failed`: the runtime released its
/// addresses, which may already belong to another pod). A terminating pod
/// still holds its addresses and keeps its entry.
pub fn pod_entry(pod: &Pod) -> Option<PodEntry> {
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return None;
    }
    if pod_terminal(pod) {
        return None;
    }
    let ips = pod_ips(pod);
    if ips.is_empty() {
        return None;
    }
    Some(PodEntry {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        ips,
        node: spec
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn service_with_slices() {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "annotations": {"weft.dev/lb": "maglev", "other": "x"}},
            "spec": {"type": "NodePort", "clusterIP": "198.19.0.20", "clusterIPs": ["198.19.0.20"],
                "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}],
                "sessionAffinity": "ClientIP", "externalTrafficPolicy": "Local",
                "externalIPs": ["198.19.255.7"]}
        })).unwrap();
        let s1: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "web-a"}, "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["198.18.128.2"], "nodeName": "n1", "conditions": {"ready": true, "serving": true, "terminating": false}},
                {"addresses": ["198.18.129.2"], "nodeName": "n2", "conditions": {"ready": false, "serving": true, "terminating": true}}
            ]
        })).unwrap();
        let e = service_entry(&svc, &[&s1]);
        assert_eq!(e.service_type, ServiceType::NodePort);
        assert_eq!(
            e.cluster_ips,
            vec!["198.19.0.20".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(e.ports[0].node_port, Some(30080));
        assert_eq!(e.affinity_timeout, Some(10800));
        assert!(e.external_local && !e.internal_local && e.proxied);
        assert_eq!(e.options.len(), 1);
        assert_eq!(e.backends.len(), 2);
        assert_eq!(e.backends[0].port_for("http", Protocol::TCP), Some(8080));
        assert!(e.backends[0].ready && e.backends[0].is_local("n1"));
        assert!(!e.backends[1].ready && e.backends[1].serving && e.backends[1].terminating);
    }

    #[test]
    fn external_name_and_proxy_labels() {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "ext", "namespace": "default", "labels": {"service.kubernetes.io/service-proxy-name": "other"}},
            "spec": {"type": "ExternalName", "externalName": "example.test"}
        })).unwrap();
        let e = service_entry(&svc, &[]);
        assert_eq!(e.external_name.as_deref(), Some("example.test"));
        assert!(e.cluster_ips.is_empty());
        assert!(!e.proxied);
    }

    #[test]
    fn node_entry_prefers_annotations() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n1", "annotations": {"weft.dev/vtep-mac": "02:00:00:00:00:01"}},
            "spec": {"podCIDR": "198.18.128.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.11"}],
                "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        let e = node_entry(&node);
        assert_eq!(e.pod_cidrs, ["198.18.128.0/24"]);
        assert_eq!(e.vtep_ip, Some("198.18.0.11".parse().unwrap()));
        assert_eq!(e.vtep_mac.as_deref(), Some("02:00:00:00:00:01"));
        assert!(e.ready);
    }

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web-0", "namespace": "shop"},
            "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
            "status": status
        }))
        .unwrap()
    }

    #[test]
    fn pod_entry_ips_from_pod_ips_then_pod_ip() {
        let e = pod_entry(&pod(json!({
            "phase": "Running", "podIP": "198.18.128.5",
            "podIPs": [{"ip": "198.18.128.5"}, {"ip": "fd00::5"}, {"ip": "198.18.128.5"}]
        })))
        .unwrap();
        assert_eq!((e.namespace.as_str(), e.name.as_str()), ("shop", "web-0"));
        assert_eq!(
            e.ips,
            [
                "198.18.128.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert_eq!(e.node.as_deref(), Some("n1"));

        // podIP alone (no podIPs): still the pod's address.
        let e = pod_entry(&pod(json!({"phase": "Pending", "podIP": "198.18.128.6"}))).unwrap();
        assert_eq!(e.ips, ["198.18.128.6".parse::<IpAddr>().unwrap()]);

        // A terminating pod still owns its address.
        let mut p = pod(json!({"phase": "Running", "podIP": "198.18.128.7"}));
        p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert!(pod_entry(&p).is_some());

        // Not scheduled yet: no node.
        let mut p = pod(json!({"podIP": "198.18.128.8"}));
        p.spec.as_mut().unwrap().node_name = None;
        assert_eq!(pod_entry(&p).unwrap().node, None);
    }

    #[test]
    fn pod_entry_leaves_out_pods_that_own_no_pod_ip() {
        // No address yet, or none that parses.
        assert_eq!(pod_entry(&pod(json!({"phase": "Pending"}))), None);
        assert_eq!(pod_entry(&pod(json!({"podIP": "not-an-ip"}))), None);
        let mut p = pod(json!({"podIP": "198.18.128.5"}));
        p.status = None;
        assert_eq!(pod_entry(&p), None);
        // Terminal phases released their addresses.
        for phase in ["Succeeded", "Failed"] {
            assert_eq!(
                pod_entry(&pod(json!({"phase": phase, "podIP": "198.18.128.5"}))),
                None,
                "{phase}"
            );
        }
        // hostNetwork: the address is the node's, not the pod's.
        let mut p = pod(json!({"phase": "Running", "podIP": "198.18.0.11",
            "podIPs": [{"ip": "198.18.0.11"}]}));
        p.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(pod_entry(&p), None);
    }
}
