//! The compiled node view the control plane pushes to every agent, and the
//! frames of the push stream. Agents never see raw objects: a Service arrives
//! as one [`ServiceEntry`] (its frontends and every backend from all of its
//! EndpointSlices), a Node as one [`NodeEntry`] (subnet and overlay endpoint),
//! a Pod as one [`PodEntry`] (its addresses, for cluster DNS pod records and
//! for telling which pod owns a source address).
//!
//! Entries name each backend's node instead of carrying a per-node "local"
//! bit, so one encoding serves every subscriber; an agent derives locality
//! with [`Backend::is_local`].
//!
//! Wire format: newline-delimited JSON, one [`StreamFrame`] per line,
//! adjacently tagged (`{"type":"Delta","data":{...}}`) so a decoder reads the
//! tag first and decodes the body in one pass. [`wire`] builds frames from
//! entries encoded once, so the control plane never re-serializes an unchanged
//! entry for a snapshot.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// L4 protocol of a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    TCP,
    UDP,
    SCTP,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::TCP),
            "UDP" => Some(Protocol::UDP),
            "SCTP" => Some(Protocol::SCTP),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::TCP => "TCP",
            Protocol::UDP => "UDP",
            Protocol::SCTP => "SCTP",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
}

/// One port of a Service's frontend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendPort {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
}

/// A backend's port for one named Service port (the resolved targetPort).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendPort {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// One endpoint address of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub ip: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Endpoint hostname (DNS records for headless Services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The target (`namespace/name` of the Pod), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    pub ports: Vec<BackendPort>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Backend {
    /// Whether this backend runs on `node`.
    pub fn is_local(&self, node: &str) -> bool {
        self.node.as_deref() == Some(node)
    }

    /// The backend's port for the Service port named `name` with `protocol`.
    pub fn port_for(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }
}

/// A Service compiled for agents: frontends, policies and every backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEntry {
    pub namespace: String,
    pub name: String,
    #[serde(rename = "type")]
    pub service_type: ServiceType,
    /// Cluster IPs (empty for headless and ExternalName Services).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_ips: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub headless: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<FrontendPort>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_ips: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_ips: Vec<IpAddr>,
    /// `sessionAffinity: ClientIP` timeout in seconds; `None` when affinity is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_timeout: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub external_local: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub internal_local: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub publish_not_ready: bool,
    /// False when another proxy owns the Service (`service.kubernetes.io/service-proxy-name`
    /// or `service.kubernetes.io/headless` labels): DNS still serves it, dataplanes skip it.
    pub proxied: bool,
    /// `weft.dev/*` annotations (per-Service dataplane options).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Backend>,
}

impl Default for ServiceEntry {
    /// An empty ClusterIP Service handled by weft (`proxied`), for building entries field by field.
    fn default() -> Self {
        ServiceEntry {
            namespace: String::new(),
            name: String::new(),
            service_type: ServiceType::ClusterIP,
            cluster_ips: Vec::new(),
            headless: false,
            external_name: None,
            ports: Vec::new(),
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            affinity_timeout: None,
            external_local: false,
            internal_local: false,
            health_check_node_port: None,
            publish_not_ready: false,
            proxied: true,
            options: BTreeMap::new(),
            backends: Vec::new(),
        }
    }
}

impl ServiceEntry {
    pub fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }

    /// Drop spare capacity left by decoding (serde grows vectors as it reads them).
    pub fn shrink(&mut self) {
        for b in &mut self.backends {
            b.ports.shrink_to_fit();
        }
        self.backends.shrink_to_fit();
        self.ports.shrink_to_fit();
        self.cluster_ips.shrink_to_fit();
    }
}

/// A Node compiled for agents: its pod subnet and overlay endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_ip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod_cidrs: Vec<String>,
    /// VXLAN tunnel endpoint: underlay address and MAC of the node's VTEP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_ip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_mac: Option<String>,
    pub ready: bool,
}

/// A Pod compiled for agents: who owns which pod IPs. Only pods that own
/// their addresses are carried: at least one assigned pod IP, not
/// `hostNetwork` (such a pod shares its node's IP and must not be taken for
/// its owner), and not terminal (`Succeeded`/`Failed` pods release their
/// IPs, as the endpoints controller leaves them out). Pods are the most
/// numerous entries of the view, so the entry stays small.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PodEntry {
    pub namespace: String,
    pub name: String,
    /// `status.podIPs` (or `status.podIP`), primary first; never empty.
    pub ips: Vec<IpAddr>,
    /// `spec.nodeName`, once scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl PodEntry {
    pub fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }

    /// Drop spare capacity left by decoding.
    pub fn shrink(&mut self) {
        self.ips.shrink_to_fit();
    }
}

/// One change inside a delta.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op")]
pub enum Change {
    /// Add or replace a Service entry.
    Service {
        service: ServiceEntry,
    },
    ServiceRemoved {
        namespace: String,
        name: String,
    },
    /// Add or replace a Node entry.
    Node {
        node: NodeEntry,
    },
    NodeRemoved {
        name: String,
    },
    /// Add or replace a Pod entry.
    Pod {
        pod: PodEntry,
    },
    /// The Pod is gone or no longer owns addresses (terminal, unassigned).
    PodRemoved {
        namespace: String,
        name: String,
    },
}

/// One frame of the push stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum StreamFrame {
    /// The whole view at `rev`: replaces whatever the agent held.
    Reset {
        rev: u64,
        services: Vec<ServiceEntry>,
        nodes: Vec<NodeEntry>,
        /// Absent in frames of control planes that predate pods in the view.
        #[serde(default)]
        pods: Vec<PodEntry>,
    },
    /// Changes that take the view from the previous revision to `rev`.
    Delta { rev: u64, changes: Vec<Change> },
    /// Keep-alive; `rev` is the newest revision sent so far.
    Ping { rev: u64 },
}

impl StreamFrame {
    /// Encode as one line of the stream (JSON + `\n`).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    pub fn decode(line: &[u8]) -> Result<StreamFrame, serde_json::Error> {
        serde_json::from_slice(line)
    }

    pub fn rev(&self) -> u64 {
        match self {
            StreamFrame::Reset { rev, .. }
            | StreamFrame::Delta { rev, .. }
            | StreamFrame::Ping { rev } => *rev,
        }
    }
}

/// Building frames from pre-encoded pieces; the result decodes as [`StreamFrame`].
pub mod wire {
    use super::{Change, NodeEntry};
    use serde::Serialize;

    /// An entry's JSON (a [`super::ServiceEntry`] or a [`super::PodEntry`]),
    /// to be kept and reused by [`reset`] and by [`service_change`] or
    /// [`pod_change`].
    pub fn entry(entry: &impl Serialize) -> Vec<u8> {
        serde_json::to_vec(entry).unwrap_or_default()
    }

    /// The JSON of `Change::Service` around a Service entry encoded by [`entry`].
    pub fn service_change(encoded: &[u8]) -> Vec<u8> {
        put(b"{\"op\":\"Service\",\"service\":", encoded)
    }

    /// The JSON of `Change::Pod` around a Pod entry encoded by [`entry`].
    pub fn pod_change(encoded: &[u8]) -> Vec<u8> {
        put(b"{\"op\":\"Pod\",\"pod\":", encoded)
    }

    /// An add-or-replace change: `head` (its op and field name), the encoded
    /// entry, the closing brace.
    fn put(head: &[u8], encoded: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(head.len() + encoded.len() + 1);
        v.extend_from_slice(head);
        v.extend_from_slice(encoded);
        v.push(b'}');
        v
    }

    /// The JSON of any change.
    pub fn change(c: &Change) -> Vec<u8> {
        serde_json::to_vec(c).unwrap_or_default()
    }

    fn join<'a>(v: &mut Vec<u8>, items: impl Iterator<Item = &'a [u8]>) {
        v.push(b'[');
        for (i, item) in items.enumerate() {
            if i > 0 {
                v.push(b',');
            }
            v.extend_from_slice(item);
        }
        v.push(b']');
    }

    /// A Delta frame line from encoded changes.
    pub fn delta<'a>(rev: u64, changes: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
        let mut v =
            format!("{{\"type\":\"Delta\",\"data\":{{\"rev\":{rev},\"changes\":").into_bytes();
        join(&mut v, changes);
        v.extend_from_slice(b"}}\n");
        v
    }

    /// A Reset frame line from encoded services, the nodes and encoded pods.
    pub fn reset<'a>(
        rev: u64,
        services: impl Iterator<Item = &'a [u8]>,
        nodes: &[&NodeEntry],
        pods: impl Iterator<Item = &'a [u8]>,
    ) -> Vec<u8> {
        let mut v =
            format!("{{\"type\":\"Reset\",\"data\":{{\"rev\":{rev},\"services\":").into_bytes();
        join(&mut v, services);
        v.extend_from_slice(b",\"nodes\":");
        v.extend_from_slice(&serde_json::to_vec(nodes).unwrap_or_else(|_| b"[]".to_vec()));
        v.extend_from_slice(b",\"pods\":");
        join(&mut v, pods);
        v.extend_from_slice(b"}}\n");
        v
    }
}

/// Why a frame could not be applied to a view.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ViewError {
    #[error("delta at revision {got} does not follow revision {have}")]
    OutOfOrder { have: u64, got: u64 },
    #[error("delta received before any reset")]
    NoReset,
}

/// What an agent holds: the latest view and its revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    pub rev: u64,
    /// False until the first Reset.
    pub synced: bool,
    pub services: BTreeMap<(String, String), ServiceEntry>,
    pub nodes: BTreeMap<String, NodeEntry>,
    /// Pods that own pod IPs, cluster-wide, by (namespace, name).
    pub pods: BTreeMap<(String, String), PodEntry>,
}

/// Which Services and which Pods the view changed since a consumer last
/// looked: the keys of every applied delta, or everything after a reset.
/// Consumers (the service dataplane, cluster DNS) re-plan only what changed
/// instead of comparing every entry; a Pod change is not a Service change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ViewChanges {
    /// A reset replaced the view: anything may have changed.
    pub all: bool,
    pub services: std::collections::BTreeSet<(String, String)>,
    pub pods: std::collections::BTreeSet<(String, String)>,
}

impl ViewChanges {
    /// Note what `frame` changes.
    pub fn record(&mut self, frame: &StreamFrame) {
        match frame {
            StreamFrame::Reset { .. } => self.all = true,
            StreamFrame::Delta { changes, .. } => {
                for c in changes {
                    let (set, key) = match c {
                        Change::Service { service } => (&mut self.services, service.key()),
                        Change::ServiceRemoved { namespace, name } => {
                            (&mut self.services, (namespace.clone(), name.clone()))
                        }
                        Change::Pod { pod } => (&mut self.pods, pod.key()),
                        Change::PodRemoved { namespace, name } => {
                            (&mut self.pods, (namespace.clone(), name.clone()))
                        }
                        Change::Node { .. } | Change::NodeRemoved { .. } => continue,
                    };
                    set.insert(key);
                }
            }
            StreamFrame::Ping { .. } => {}
        }
    }

    /// Add what `other` noted.
    pub fn merge(&mut self, other: &ViewChanges) {
        self.all |= other.all;
        self.services.extend(other.services.iter().cloned());
        self.pods.extend(other.pods.iter().cloned());
    }

    /// Nothing a consumer needs to look at.
    pub fn is_empty(&self) -> bool {
        !self.all && self.services.is_empty() && self.pods.is_empty()
    }
}

/// Where a client keeps the entries of its view. [`apply`] owns the stream's
/// rules (a Reset replaces everything; a Delta must follow a Reset and carry a
/// newer revision); a store only says how entries are kept.
pub trait ViewStore {
    fn rev(&self) -> u64;
    fn synced(&self) -> bool;
    fn set_rev(&mut self, rev: u64);
    /// Replace everything with a snapshot (and mark the view synced).
    fn reset(&mut self, services: Vec<ServiceEntry>, nodes: Vec<NodeEntry>, pods: Vec<PodEntry>);
    fn put_service(&mut self, service: ServiceEntry);
    fn remove_service(&mut self, namespace: String, name: String);
    fn put_node(&mut self, node: NodeEntry);
    fn remove_node(&mut self, name: String);
    fn put_pod(&mut self, pod: PodEntry);
    fn remove_pod(&mut self, namespace: String, name: String);
}

/// Apply one frame to any store, with the stream's ordering rules.
pub fn apply<S: ViewStore + ?Sized>(store: &mut S, frame: StreamFrame) -> Result<(), ViewError> {
    match frame {
        StreamFrame::Reset {
            rev,
            services,
            nodes,
            pods,
        } => {
            store.reset(services, nodes, pods);
            store.set_rev(rev);
        }
        StreamFrame::Delta { rev, changes } => {
            if !store.synced() {
                return Err(ViewError::NoReset);
            }
            if rev <= store.rev() {
                return Err(ViewError::OutOfOrder {
                    have: store.rev(),
                    got: rev,
                });
            }
            for c in changes {
                match c {
                    Change::Service { service } => store.put_service(service),
                    Change::ServiceRemoved { namespace, name } => {
                        store.remove_service(namespace, name)
                    }
                    Change::Node { node } => store.put_node(node),
                    Change::NodeRemoved { name } => store.remove_node(name),
                    Change::Pod { pod } => store.put_pod(pod),
                    Change::PodRemoved { namespace, name } => store.remove_pod(namespace, name),
                }
            }
            store.set_rev(rev);
        }
        StreamFrame::Ping { .. } => {}
    }
    Ok(())
}

impl ViewStore for NodeView {
    fn rev(&self) -> u64 {
        self.rev
    }
    fn synced(&self) -> bool {
        self.synced
    }
    fn set_rev(&mut self, rev: u64) {
        self.rev = rev;
    }
    fn reset(&mut self, services: Vec<ServiceEntry>, nodes: Vec<NodeEntry>, pods: Vec<PodEntry>) {
        self.synced = true;
        self.services = services
            .into_iter()
            .map(|mut s| {
                s.shrink();
                (s.key(), s)
            })
            .collect();
        self.nodes = nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
        self.pods = pods
            .into_iter()
            .map(|mut p| {
                p.shrink();
                (p.key(), p)
            })
            .collect();
    }
    fn put_service(&mut self, mut service: ServiceEntry) {
        service.shrink();
        self.services.insert(service.key(), service);
    }
    fn remove_service(&mut self, namespace: String, name: String) {
        self.services.remove(&(namespace, name));
    }
    fn put_node(&mut self, node: NodeEntry) {
        self.nodes.insert(node.name.clone(), node);
    }
    fn remove_node(&mut self, name: String) {
        self.nodes.remove(&name);
    }
    fn put_pod(&mut self, mut pod: PodEntry) {
        pod.shrink();
        self.pods.insert(pod.key(), pod);
    }
    fn remove_pod(&mut self, namespace: String, name: String) {
        self.pods.remove(&(namespace, name));
    }
}

impl NodeView {
    /// Apply one frame. A Reset replaces everything; a Delta must be newer.
    pub fn apply(&mut self, frame: StreamFrame) -> Result<(), ViewError> {
        apply(self, frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_changes_note_services_and_pods_apart() {
        let mut c = ViewChanges::default();
        assert!(c.is_empty());
        c.record(&StreamFrame::Delta {
            rev: 2,
            changes: vec![
                Change::Service {
                    service: svc("web", "198.19.0.20"),
                },
                Change::ServiceRemoved {
                    namespace: "default".into(),
                    name: "old".into(),
                },
                Change::PodRemoved {
                    namespace: "default".into(),
                    name: "web-0".into(),
                },
                Change::NodeRemoved { name: "n2".into() },
            ],
        });
        let key = |n: &str| ("default".to_string(), n.to_string());
        assert!(!c.all);
        assert_eq!(c.services, [key("old"), key("web")].into_iter().collect());
        assert_eq!(c.pods, [key("web-0")].into_iter().collect());
        let mut later = ViewChanges::default();
        later.record(&StreamFrame::Delta {
            rev: 3,
            changes: vec![Change::NodeRemoved { name: "n3".into() }],
        });
        assert!(later.is_empty(), "a Node change is neither");
        later.record(&StreamFrame::Reset {
            rev: 4,
            services: vec![],
            nodes: vec![],
            pods: vec![],
        });
        c.merge(&later);
        assert!(c.all && c.services.len() == 2 && c.pods.len() == 1);
    }

    fn svc(name: &str, ip: &str) -> ServiceEntry {
        ServiceEntry {
            namespace: "default".into(),
            name: name.into(),
            cluster_ips: vec![ip.parse().unwrap()],
            ports: vec![FrontendPort {
                name: "http".into(),
                protocol: Protocol::TCP,
                port: 80,
                node_port: None,
            }],
            backends: vec![Backend {
                ip: "198.18.128.2".parse().unwrap(),
                node: Some("n1".into()),
                hostname: None,
                target: Some("default/web-0".into()),
                zone: None,
                ports: vec![BackendPort {
                    name: "http".into(),
                    protocol: Protocol::TCP,
                    port: 8080,
                }],
                ready: true,
                serving: true,
                terminating: false,
            }],
            ..Default::default()
        }
    }

    fn pod(name: &str, ips: &[&str]) -> PodEntry {
        PodEntry {
            namespace: "default".into(),
            name: name.into(),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            node: Some("n1".into()),
        }
    }

    #[test]
    fn wire_pieces_decode_as_frames() {
        let a = svc("a", "198.19.0.5");
        let b = svc("b", "198.19.0.6");
        let node = NodeEntry {
            name: "n1".into(),
            node_ip: Some("198.18.0.11".parse().unwrap()),
            pod_cidrs: vec!["198.18.128.0/24".into()],
            vtep_ip: None,
            vtep_mac: None,
            ready: true,
        };
        let p = pod("web-0", &["198.18.128.2"]);
        let enc: Vec<Vec<u8>> = [&a, &b].into_iter().map(wire::entry).collect();
        let enc_pod = wire::entry(&p);
        let line = wire::reset(
            7,
            enc.iter().map(|v| v.as_slice()),
            &[&node],
            [enc_pod.as_slice()].into_iter(),
        );
        assert_eq!(line.last(), Some(&b'\n'));
        let frame = StreamFrame::decode(&line[..line.len() - 1]).unwrap();
        assert_eq!(
            frame,
            StreamFrame::Reset {
                rev: 7,
                services: vec![a.clone(), b.clone()],
                nodes: vec![node.clone()],
                pods: vec![p.clone()],
            }
        );
        assert_eq!(line, frame.encode(), "hand-built bytes equal serde's");
        let removed = Change::ServiceRemoved {
            namespace: "default".into(),
            name: "a".into(),
        };
        let pod_removed = Change::PodRemoved {
            namespace: "default".into(),
            name: "web-1".into(),
        };
        let items = [
            wire::service_change(&enc[1]),
            wire::change(&removed),
            wire::pod_change(&enc_pod),
            wire::change(&pod_removed),
        ];
        let line = wire::delta(8, items.iter().map(|v| v.as_slice()));
        let frame = StreamFrame::decode(&line[..line.len() - 1]).unwrap();
        assert_eq!(
            frame,
            StreamFrame::Delta {
                rev: 8,
                changes: vec![
                    Change::Service { service: b },
                    removed,
                    Change::Pod { pod: p },
                    pod_removed
                ]
            }
        );
        assert_eq!(line, frame.encode());
    }

    #[test]
    fn frames_round_trip_and_apply_in_order() {
        let mut view = NodeView::default();
        let delta = StreamFrame::Delta {
            rev: 3,
            changes: vec![],
        };
        assert_eq!(view.apply(delta.clone()), Err(ViewError::NoReset));

        let reset = StreamFrame::Reset {
            rev: 2,
            services: vec![svc("a", "198.19.0.5")],
            nodes: vec![],
            pods: vec![],
        };
        let line = reset.encode();
        assert_eq!(line.last(), Some(&b'\n'));
        let back = StreamFrame::decode(&line[..line.len() - 1]).unwrap();
        assert_eq!(back, reset);
        view.apply(back).unwrap();
        assert_eq!(view.rev, 2);
        assert!(view.services[&("default".into(), "a".into())].backends[0].is_local("n1"));

        let d = StreamFrame::Delta {
            rev: 5,
            changes: vec![
                Change::Service {
                    service: svc("b", "198.19.0.6"),
                },
                Change::ServiceRemoved {
                    namespace: "default".into(),
                    name: "a".into(),
                },
            ],
        };
        view.apply(StreamFrame::decode(&d.encode()).unwrap())
            .unwrap();
        assert_eq!(view.rev, 5);
        assert_eq!(view.services.len(), 1);
        assert_eq!(
            view.apply(StreamFrame::Delta {
                rev: 5,
                changes: vec![]
            }),
            Err(ViewError::OutOfOrder { have: 5, got: 5 })
        );
    }

    #[test]
    fn reset_without_pods_decodes_as_empty() {
        // A Reset from a control plane that predates pods in the view.
        let old = br#"{"type":"Reset","data":{"rev":4,"services":[],"nodes":[{"name":"n1","ready":true}]}}"#;
        let frame = StreamFrame::decode(old).unwrap();
        let StreamFrame::Reset {
            rev, nodes, pods, ..
        } = &frame
        else {
            panic!("not a reset: {frame:?}");
        };
        assert_eq!((*rev, nodes.len(), pods.len()), (4, 1, 0));

        let mut view = NodeView::default();
        view.pods.insert(
            ("default".into(), "stale".into()),
            pod("stale", &["198.18.128.9"]),
        );
        view.apply(frame).unwrap();
        assert!(
            view.synced && view.pods.is_empty(),
            "a reset replaces pods too"
        );
        assert_eq!(view.nodes.len(), 1);
    }

    #[test]
    fn pod_changes_apply() {
        let mut view = NodeView::default();
        let reset = StreamFrame::Reset {
            rev: 1,
            services: vec![],
            nodes: vec![],
            pods: vec![
                pod("a", &["198.18.128.2"]),
                pod("b", &["198.18.128.3", "fd00::3"]),
            ],
        };
        view.apply(StreamFrame::decode(&reset.encode()).unwrap())
            .unwrap();
        assert_eq!(view.pods.len(), 2);
        let b = &view.pods[&("default".into(), "b".into())];
        assert_eq!(b.ips.len(), 2);
        assert_eq!(b.node.as_deref(), Some("n1"));

        let delta = StreamFrame::Delta {
            rev: 2,
            changes: vec![
                Change::Pod {
                    pod: pod("a", &["198.18.128.7"]),
                },
                Change::PodRemoved {
                    namespace: "default".into(),
                    name: "b".into(),
                },
                Change::Pod {
                    pod: PodEntry {
                        namespace: "other".into(),
                        node: None,
                        ..pod("c", &["198.18.129.4"])
                    },
                },
            ],
        };
        let line = delta.encode();
        let text = std::str::from_utf8(&line).unwrap();
        assert!(text.contains(r#"{"op":"Pod","pod":{"namespace":"default","name":"a""#));
        assert!(
            !text.contains(r#""node":null"#),
            "an unscheduled pod omits node"
        );
        view.apply(StreamFrame::decode(&line).unwrap()).unwrap();
        assert_eq!(view.rev, 2);
        let keys: Vec<_> = view.pods.keys().cloned().collect();
        assert_eq!(
            keys,
            [
                ("default".to_string(), "a".to_string()),
                ("other".to_string(), "c".to_string())
            ]
        );
        assert_eq!(
            view.pods[&("default".into(), "a".into())].ips,
            ["198.18.128.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(view.pods[&("other".into(), "c".into())].node, None);
        // Removing a pod the view does not hold is not an error.
        view.apply(StreamFrame::Delta {
            rev: 3,
            changes: vec![Change::PodRemoved {
                namespace: "default".into(),
                name: "never".into(),
            }],
        })
        .unwrap();
        assert_eq!(view.pods.len(), 2);
    }
}
