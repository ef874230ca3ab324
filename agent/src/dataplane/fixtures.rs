//! Builders for tests of the service plan, the tracer and the dataplanes
//! (unit tests here and the agent's integration tests): one node, one
//! NodePort Service shape, addresses from the test plan.

use super::plan::{build, PlanConfig, ServicePlan};
use std::collections::BTreeMap;
use weft_model::view::{FrontendPort, Protocol, ServiceType};
use weft_model::{Backend, BackendPort, NodeView, ServiceEntry};

/// The node the plans are built for.
pub const NODE: &str = "node-1";
pub const NODE_IP: &str = "198.18.0.11";
pub const CLUSTER_CIDR: &str = "198.18.128.0/17";
pub const CLUSTER_IP: &str = "198.19.0.20";

/// An endpoint serving port `http` (TCP 8080) on `node`.
pub fn backend(ip: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> Backend {
    Backend {
        ip: ip.parse().expect("fixture IP"),
        node: Some(node.into()),
        hostname: None,
        target: None,
        zone: None,
        ports: vec![BackendPort {
            name: "http".into(),
            protocol: Protocol::TCP,
            port: 8080,
        }],
        ready,
        serving,
        terminating,
    }
}

/// A NodePort Service `default/NAME` at 198.19.0.20:80 (NodePort 30080), port `http`.
pub fn node_port_service(name: &str, backends: Vec<Backend>) -> ServiceEntry {
    ServiceEntry {
        namespace: "default".into(),
        name: name.into(),
        service_type: ServiceType::NodePort,
        cluster_ips: vec![CLUSTER_IP.parse().expect("fixture IP")],
        ports: vec![FrontendPort {
            name: "http".into(),
            protocol: Protocol::TCP,
            port: 80,
            node_port: Some(30080),
        }],
        backends,
        ..Default::default()
    }
}

/// The plan settings of [`NODE`]: externalIPs allowed in 198.19.255.0/24.
pub fn config() -> PlanConfig {
    PlanConfig {
        node: NODE.into(),
        node_addresses: vec![NODE_IP.parse().expect("fixture IP")],
        localhost_node_ports: false,
        external_ip_allow: vec!["198.19.255.0/24".parse().expect("fixture CIDR")],
        cluster_cidr: CLUSTER_CIDR.parse().expect("fixture CIDR"),
        local_dns: None,
    }
}

/// The plan of [`NODE`] for a view holding `services`.
pub fn plan(services: Vec<ServiceEntry>) -> ServicePlan {
    let view = NodeView {
        rev: 1,
        synced: true,
        services: services.into_iter().map(|s| (s.key(), s)).collect(),
        nodes: BTreeMap::new(),
        pods: Default::default(),
    };
    build(&view, &config())
}
