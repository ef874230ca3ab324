//! Service admission: Kubernetes' defaults, the fields that go with each type
//! (cleared on type change, carried over on update), and allocation of cluster
//! IPs, NodePorts and the health-check NodePort.

use crate::alloc::AllocError;
use crate::state::Alloc;
use k8s_openapi::api::core::v1::{ClientIPConfig, Service, SessionAffinityConfig};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::net::Ipv4Addr;
use weft_model::view::Protocol;
use weft_model::{FieldError, FieldErrorKind};

fn type_of(svc: &Service) -> &str {
    svc.spec
        .as_ref()
        .and_then(|s| s.type_.as_deref())
        .unwrap_or("ClusterIP")
}

fn needs_cluster_ip(svc: &Service) -> bool {
    let spec = svc.spec.as_ref();
    type_of(svc) != "ExternalName" && spec.and_then(|s| s.cluster_ip.as_deref()) != Some("None")
}

fn needs_node_ports(svc: &Service) -> bool {
    match type_of(svc) {
        "NodePort" => true,
        "LoadBalancer" => svc
            .spec
            .as_ref()
            .and_then(|s| s.allocate_load_balancer_node_ports)
            .unwrap_or(true),
        _ => false,
    }
}

fn needs_health_check(svc: &Service) -> bool {
    type_of(svc) == "LoadBalancer"
        && svc
            .spec
            .as_ref()
            .and_then(|s| s.external_traffic_policy.as_deref())
            == Some("Local")
}

/// Kubernetes' `SetDefaults_Service`, plus dropping fields the type cannot have.
pub fn set_defaults(svc: &mut Service) {
    let spec = svc.spec.get_or_insert_with(Default::default);
    let ty = spec.type_.get_or_insert_with(|| "ClusterIP".into()).clone();
    if spec.session_affinity.is_none() {
        spec.session_affinity = Some("None".into());
    }
    if spec.session_affinity.as_deref() == Some("ClientIP") {
        let cfg = spec
            .session_affinity_config
            .get_or_insert_with(SessionAffinityConfig::default);
        let ip = cfg.client_ip.get_or_insert_with(ClientIPConfig::default);
        ip.timeout_seconds.get_or_insert(10800);
    } else {
        spec.session_affinity_config = None;
    }
    for p in spec.ports.iter_mut().flatten() {
        p.protocol.get_or_insert_with(|| "TCP".into());
        match &p.target_port {
            None | Some(IntOrString::Int(0)) => p.target_port = Some(IntOrString::Int(p.port)),
            Some(IntOrString::String(s)) if s.is_empty() => {
                p.target_port = Some(IntOrString::Int(p.port))
            }
            _ => {}
        }
    }
    if ty == "ExternalName" {
        spec.cluster_ip = None;
        spec.cluster_ips = None;
        spec.ip_families = None;
        spec.ip_family_policy = None;
        spec.internal_traffic_policy = None;
        spec.external_traffic_policy = None;
        spec.health_check_node_port = None;
        for p in spec.ports.iter_mut().flatten() {
            p.node_port = None;
        }
        return;
    }
    spec.internal_traffic_policy
        .get_or_insert_with(|| "Cluster".into());
    if spec.cluster_ip.as_deref() != Some("None") {
        spec.ip_families.get_or_insert_with(|| vec!["IPv4".into()]);
        spec.ip_family_policy
            .get_or_insert_with(|| "SingleStack".into());
    }
    let external = matches!(ty.as_str(), "NodePort" | "LoadBalancer")
        || spec.external_ips.as_ref().is_some_and(|v| !v.is_empty());
    if external {
        spec.external_traffic_policy
            .get_or_insert_with(|| "Cluster".into());
    } else {
        spec.external_traffic_policy = None;
    }
    if ty == "LoadBalancer" {
        spec.allocate_load_balancer_node_ports.get_or_insert(true);
    } else {
        spec.allocate_load_balancer_node_ports = None;
    }
    if !(ty == "LoadBalancer" && spec.external_traffic_policy.as_deref() == Some("Local")) {
        spec.health_check_node_port = None;
    }
    if ty == "ClusterIP" {
        for p in spec.ports.iter_mut().flatten() {
            p.node_port = None;
        }
    }
    if let (Some(ip), None) = (&spec.cluster_ip, &spec.cluster_ips) {
        if !ip.is_empty() {
            spec.cluster_ips = Some(vec![ip.clone()]);
        }
    }
}

/// On update, keep what the server allocated when the new object leaves it empty
/// (Kubernetes' `patchAllocatedValues`).
pub fn carry_allocations(old: &Service, new: &mut Service) {
    let needs_ip = needs_cluster_ip(new);
    let needs_ports = needs_node_ports(new);
    let needs_hc = needs_health_check(new);
    let (Some(os), Some(ns)) = (old.spec.as_ref(), new.spec.as_mut()) else {
        return;
    };
    if needs_ip
        && ns.cluster_ip.as_deref().unwrap_or("").is_empty()
        && type_of(old) != "ExternalName"
    {
        ns.cluster_ip = os.cluster_ip.clone();
        ns.cluster_ips = os.cluster_ips.clone();
    }
    if needs_ports {
        for p in ns.ports.iter_mut().flatten() {
            if p.node_port.unwrap_or(0) == 0 {
                let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
                p.node_port = os
                    .ports
                    .iter()
                    .flatten()
                    .find(|o| o.port == p.port && o.protocol.as_deref().unwrap_or("TCP") == proto)
                    .and_then(|o| o.node_port);
            }
        }
    }
    if needs_hc && ns.health_check_node_port.unwrap_or(0) == 0 {
        ns.health_check_node_port = os.health_check_node_port;
    }
}

/// What `svc` holds in the allocators.
pub(crate) fn allocations(svc: &Service) -> Vec<Alloc> {
    let mut out = Vec::new();
    let Some(spec) = &svc.spec else { return out };
    if needs_cluster_ip(svc) {
        if let Some(ip) = spec
            .cluster_ip
            .as_deref()
            .and_then(|s| s.parse::<Ipv4Addr>().ok())
        {
            out.push(Alloc::Ip(ip));
        }
    }
    if needs_node_ports(svc) {
        for p in spec.ports.iter().flatten() {
            let proto =
                Protocol::parse(p.protocol.as_deref().unwrap_or("TCP")).unwrap_or(Protocol::TCP);
            if let Some(n) = p
                .node_port
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0)
            {
                let a = Alloc::Port(proto, n);
                if !out.contains(&a) {
                    out.push(a);
                }
            }
        }
    }
    if needs_health_check(svc) {
        if let Some(n) = spec
            .health_check_node_port
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n != 0)
        {
            let a = Alloc::Port(Protocol::TCP, n);
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

/// The allocators as admission sees them.
pub(crate) trait Allocator {
    /// Claim a requested value.
    fn take(&mut self, a: &Alloc) -> Result<(), AllocError>;
    /// Hand out a free value: `None` = a cluster IP, `Some(proto)` = a NodePort.
    fn next(&mut self, what: Option<Protocol>) -> Result<Alloc, AllocError>;
}

/// Allocate everything `svc` needs. `have` is what the stored version already
/// holds (kept as is). Errors name the fields.
pub(crate) fn allocate(
    svc: &mut Service,
    have: &[Alloc],
    alloc: &mut dyn Allocator,
) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let needs_ip = needs_cluster_ip(svc);
    let needs_ports = needs_node_ports(svc);
    let needs_hc = needs_health_check(svc);
    let Some(spec) = svc.spec.as_mut() else {
        return errs;
    };
    if needs_ip {
        let requested = spec.cluster_ip.clone().unwrap_or_default();
        if requested.is_empty() {
            match alloc.next(None) {
                Ok(Alloc::Ip(ip)) => {
                    spec.cluster_ip = Some(ip.to_string());
                    spec.cluster_ips = Some(vec![ip.to_string()]);
                }
                Ok(_) => {}
                Err(e) => errs.push(FieldError {
                    kind: FieldErrorKind::Invalid,
                    field: "spec.clusterIPs".into(),
                    value: None,
                    detail: e.to_string(),
                }),
            }
        } else if let Ok(ip) = requested.parse::<Ipv4Addr>() {
            let a = Alloc::Ip(ip);
            if !have.contains(&a) {
                if let Err(e) = alloc.take(&a) {
                    errs.push(FieldError {
                        kind: FieldErrorKind::Invalid,
                        field: "spec.clusterIPs".into(),
                        value: Some(format!("[\"{requested}\"]")),
                        detail: format!("failed to allocate IP {requested}: {e}"),
                    });
                }
            }
            spec.cluster_ips = Some(vec![requested]);
        } else {
            errs.push(FieldError {
                kind: FieldErrorKind::Invalid,
                field: "spec.clusterIPs".into(),
                value: Some(format!("[\"{requested}\"]")),
                detail: "IPv6 and malformed cluster IPs are not supported".into(),
            });
        }
    }
    if needs_ports {
        let mut taken_here: Vec<Alloc> = Vec::new();
        for (i, p) in spec.ports.iter_mut().flatten().enumerate() {
            let proto =
                Protocol::parse(p.protocol.as_deref().unwrap_or("TCP")).unwrap_or(Protocol::TCP);
            match p
                .node_port
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0)
            {
                Some(n) => {
                    let a = Alloc::Port(proto, n);
                    if have.contains(&a) || taken_here.contains(&a) {
                        continue;
                    }
                    match alloc.take(&a) {
                        Ok(()) => taken_here.push(a),
                        Err(e) => errs.push(FieldError {
                            kind: FieldErrorKind::Invalid,
                            field: format!("spec.ports[{i}].nodePort"),
                            value: Some(n.to_string()),
                            detail: match e {
                                AllocError::Allocated { .. } => {
                                    "provided port is already allocated".into()
                                }
                                other => other.to_string(),
                            },
                        }),
                    }
                }
                None => match alloc.next(Some(proto)) {
                    Ok(Alloc::Port(_, n)) => p.node_port = Some(n as i32),
                    Ok(_) => {}
                    Err(e) => errs.push(FieldError {
                        kind: FieldErrorKind::Invalid,
                        field: format!("spec.ports[{i}].nodePort"),
                        value: None,
                        detail: e.to_string(),
                    }),
                },
            }
        }
    }
    if needs_hc {
        match spec
            .health_check_node_port
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n != 0)
        {
            Some(n) => {
                let a = Alloc::Port(Protocol::TCP, n);
                if !have.contains(&a) {
                    if let Err(e) = alloc.take(&a) {
                        errs.push(FieldError {
                            kind: FieldErrorKind::Invalid,
                            field: "spec.healthCheckNodePort".into(),
                            value: Some(n.to_string()),
                            detail: e.to_string(),
                        });
                    }
                }
            }
            None => match alloc.next(Some(Protocol::TCP)) {
                Ok(Alloc::Port(_, n)) => spec.health_check_node_port = Some(n as i32),
                Ok(_) => {}
                Err(e) => errs.push(FieldError {
                    kind: FieldErrorKind::Invalid,
                    field: "spec.healthCheckNodePort".into(),
                    value: None,
                    detail: e.to_string(),
                }),
            },
        }
    }
    errs
}
