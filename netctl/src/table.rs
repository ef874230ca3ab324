//! kubectl's human-readable tables: upper-case headers, left-aligned columns
//! separated by (at least) three spaces, and its column choices per kind.

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use std::collections::BTreeMap;
use weft_model::{Kind, Object};

/// Annotations holding a node's VXLAN tunnel endpoint.
pub const VTEP_IP_ANNOTATION: &str = "weft.dev/vtep-ip";
pub const VTEP_MAC_ANNOTATION: &str = "weft.dev/vtep-mac";

const NONE: &str = "<none>";

/// Lay out rows like kubectl's tabwriter (min width 6, padding 3); the last
/// column is not padded. Every line ends with `\n`.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let cols = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(cols) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate().take(cols) {
            line.push_str(cell);
            if i + 1 < cols {
                let width = (widths[i] + 3).max(6);
                line.extend(std::iter::repeat_n(' ', width - cell.chars().count()));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// kubectl's `HumanDuration` (k8s.io/apimachinery/pkg/util/duration).
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    if seconds < 0 {
        return "0s".into();
    }
    if seconds < 60 * 2 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = seconds / 3600;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let dy = (hours / 24) % 365;
        return if dy == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{dy}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

/// The current time (from the system clock; the AGE functions take `now`
/// as a parameter so that tests can fix it).
pub fn now() -> Timestamp {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = i64::try_from(since.as_secs()).unwrap_or(i64::MAX);
    Timestamp::from_second(secs).unwrap_or(Timestamp::MAX)
}

/// The AGE cell: time since `created`, `<unknown>` without a timestamp.
pub fn age(created: Option<&Time>, now: Timestamp) -> String {
    match created {
        Some(t) => human_duration(now.duration_since(t.0).as_secs()),
        None => "<unknown>".into(),
    }
}

/// Headers and rows for objects of one kind. `with_namespace` adds the
/// NAMESPACE column (`-A`); `wide` the extra `-o wide` columns.
pub fn table(
    kind: Kind,
    objects: &[Object],
    wide: bool,
    with_namespace: bool,
    now: Timestamp,
) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let mut headers: Vec<&'static str> = match kind {
        Kind::Namespace => vec!["NAME", "STATUS", "AGE"],
        Kind::Node => vec!["NAME", "STATUS", "POD-CIDR", "INTERNAL-IP", "AGE"],
        Kind::Pod => vec!["NAME", "READY", "STATUS", "IP", "NODE", "AGE"],
        Kind::Service => vec![
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE",
        ],
        Kind::EndpointSlice => vec!["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"],
    };
    if wide {
        headers.extend(match kind {
            Kind::Node => &["EXTERNAL-IP", "VTEP"][..],
            Kind::Pod => &["LABELS"][..],
            Kind::Service => &["SELECTOR"][..],
            Kind::Namespace | Kind::EndpointSlice => &[][..],
        });
    }
    let with_namespace = with_namespace && kind.namespaced();
    if with_namespace {
        headers.insert(0, "NAMESPACE");
    }
    let rows = objects
        .iter()
        .map(|obj| {
            let mut row = match obj {
                Object::Namespace(o) => namespace_row(o, now),
                Object::Node(o) => node_row(o, wide, now),
                Object::Pod(o) => pod_row(o, wide, now),
                Object::Service(o) => service_row(o, wide, now),
                Object::EndpointSlice(o) => endpoint_slice_row(o, now),
            };
            if with_namespace {
                row.insert(0, obj.namespace().to_string());
            }
            row
        })
        .collect();
    (headers, rows)
}

/// Render objects of one kind as kubectl would.
pub fn render_objects(
    kind: Kind,
    objects: &[Object],
    wide: bool,
    with_namespace: bool,
    now: Timestamp,
) -> String {
    let (headers, rows) = table(kind, objects, wide, with_namespace, now);
    render(&headers, &rows)
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.name.clone().unwrap_or_default()
}

fn namespace_row(ns: &Namespace, now: Timestamp) -> Vec<String> {
    let phase = ns
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| {
            if ns.metadata.deletion_timestamp.is_some() {
                "Terminating".into()
            } else {
                "Active".into()
            }
        });
    vec![
        name_of(&ns.metadata),
        phase,
        age(ns.metadata.creation_timestamp.as_ref(), now),
    ]
}

/// Ready / NotReady / Unknown from the Ready condition, plus
/// `,SchedulingDisabled` for cordoned nodes.
pub fn node_status(node: &Node) -> String {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    let mut status = match ready.map(|c| c.status.as_str()) {
        Some("True") => "Ready".to_string(),
        Some("False") => "NotReady".to_string(),
        _ => "Unknown".to_string(),
    };
    if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
        status.push_str(",SchedulingDisabled");
    }
    status
}

fn node_address(node: &Node, type_: &str) -> String {
    let addrs: Vec<&str> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(|a| {
            a.iter()
                .filter(|a| a.type_ == type_)
                .map(|a| a.address.as_str())
                .collect()
        })
        .unwrap_or_default();
    // kubectl shows the first address of the type.
    addrs
        .first()
        .map_or_else(|| NONE.to_string(), |a| a.to_string())
}

/// `ip@mac` from the VTEP annotations (either part may be missing).
pub fn node_vtep(node: &Node) -> String {
    let ann = node.metadata.annotations.as_ref();
    let get = |k: &str| {
        ann.and_then(|a| a.get(k))
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    };
    match (get(VTEP_IP_ANNOTATION), get(VTEP_MAC_ANNOTATION)) {
        (Some(ip), Some(mac)) => format!("{ip}@{mac}"),
        (Some(ip), None) => ip.to_string(),
        (None, Some(mac)) => format!("@{mac}"),
        (None, None) => NONE.to_string(),
    }
}

fn node_row(node: &Node, wide: bool, now: Timestamp) -> Vec<String> {
    let spec = node.spec.as_ref();
    let cidrs = spec
        .and_then(|s| s.pod_cidrs.clone())
        .filter(|c| !c.is_empty())
        .or_else(|| {
            spec.and_then(|s| s.pod_cidr.clone())
                .filter(|c| !c.is_empty())
                .map(|c| vec![c])
        })
        .map(|c| c.join(","))
        .unwrap_or_else(|| NONE.to_string());
    let mut row = vec![
        name_of(&node.metadata),
        node_status(node),
        cidrs,
        node_address(node, "InternalIP"),
        age(node.metadata.creation_timestamp.as_ref(), now),
    ];
    if wide {
        row.push(node_address(node, "ExternalIP"));
        row.push(node_vtep(node));
    }
    row
}

/// `ready/total` containers.
pub fn pod_ready(pod: &Pod) -> String {
    let spec_containers = pod.spec.as_ref().map_or(0, |s| s.containers.len());
    let status = pod.status.as_ref();
    let statuses = status
        .and_then(|s| s.container_statuses.as_deref())
        .unwrap_or_default();
    if statuses.is_empty() {
        let total = spec_containers.max(1);
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        return format!("{}/{total}", if ready { total } else { 0 });
    }
    let ready = statuses.iter().filter(|c| c.ready).count();
    format!("{ready}/{}", spec_containers.max(statuses.len()))
}

/// The STATUS cell: Terminating, the status reason, or the phase.
pub fn pod_status(pod: &Pod) -> String {
    if pod.metadata.deletion_timestamp.is_some() {
        return "Terminating".into();
    }
    let status = pod.status.as_ref();
    status
        .and_then(|s| s.reason.clone())
        .filter(|r| !r.is_empty())
        .or_else(|| {
            status
                .and_then(|s| s.phase.clone())
                .filter(|p| !p.is_empty())
        })
        .unwrap_or_else(|| "Unknown".into())
}

/// `a=b,c=d` (sorted), or `<none>`.
pub fn format_labels(labels: Option<&BTreeMap<String, String>>) -> String {
    match labels {
        Some(l) if !l.is_empty() => l
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
        _ => NONE.to_string(),
    }
}

fn pod_row(pod: &Pod, wide: bool, now: Timestamp) -> Vec<String> {
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .filter(|ip| !ip.is_empty())
        .unwrap_or_else(|| NONE.to_string());
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| NONE.to_string());
    let mut row = vec![
        name_of(&pod.metadata),
        pod_ready(pod),
        pod_status(pod),
        ip,
        node,
        age(pod.metadata.creation_timestamp.as_ref(), now),
    ];
    if wide {
        row.push(format_labels(pod.metadata.labels.as_ref()));
    }
    row
}

/// PORT(S): `80/TCP`, `80:30080/TCP`, comma-joined; `<none>` without ports.
pub fn service_ports(svc: &Service) -> String {
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default();
    if ports.is_empty() {
        return NONE.to_string();
    }
    ports
        .iter()
        .map(|p| {
            let proto = p
                .protocol
                .as_deref()
                .filter(|p| !p.is_empty())
                .unwrap_or("TCP");
            match p.node_port {
                Some(np) if np > 0 => format!("{}:{np}/{proto}", p.port),
                _ => format!("{}/{proto}", p.port),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The service type, `ClusterIP` when unset.
fn service_type(svc: &Service) -> &str {
    svc.spec
        .as_ref()
        .and_then(|s| s.type_.as_deref())
        .filter(|t| !t.is_empty())
        .unwrap_or("ClusterIP")
}

/// CLUSTER-IP: the first cluster IP (`None` for headless), `<none>` if unset.
pub fn service_cluster_ip(svc: &Service) -> String {
    let spec = svc.spec.as_ref();
    spec.and_then(|s| s.cluster_ips.as_ref())
        .and_then(|ips| ips.first().cloned())
        .or_else(|| spec.and_then(|s| s.cluster_ip.clone()))
        .filter(|ip| !ip.is_empty())
        .unwrap_or_else(|| NONE.to_string())
}

/// EXTERNAL-IP, as kubectl's `getServiceExternalIP`.
pub fn service_external_ip(svc: &Service, wide: bool) -> String {
    let spec = svc.spec.as_ref();
    let external_ips: Vec<String> = spec
        .and_then(|s| s.external_ips.clone())
        .unwrap_or_default();
    match service_type(svc) {
        "ClusterIP" | "NodePort" => {
            if external_ips.is_empty() {
                NONE.to_string()
            } else {
                external_ips.join(",")
            }
        }
        "LoadBalancer" => {
            let lb = load_balancer_ingress(svc, wide);
            if !external_ips.is_empty() {
                let mut all: Vec<String> = if lb.is_empty() {
                    Vec::new()
                } else {
                    lb.split(',').map(str::to_string).collect()
                };
                all.extend(external_ips);
                all.join(",")
            } else if !lb.is_empty() {
                lb
            } else {
                "<pending>".to_string()
            }
        }
        "ExternalName" => spec
            .and_then(|s| s.external_name.clone())
            .unwrap_or_default(),
        _ => "<unknown>".to_string(),
    }
}

/// The load balancer ingress IPs/hostnames, comma-joined; cut to 13
/// characters + `...` beyond 16 unless wide (kubectl's `loadBalancerStatusStringer`).
fn load_balancer_ingress(svc: &Service, wide: bool) -> String {
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default();
    let r = ingress
        .iter()
        .filter_map(|i| {
            i.ip.as_deref()
                .filter(|s| !s.is_empty())
                .or(i.hostname.as_deref().filter(|s| !s.is_empty()))
        })
        .collect::<Vec<_>>()
        .join(",");
    if !wide && r.chars().count() > 16 {
        let cut: String = r.chars().take(13).collect();
        format!("{cut}...")
    } else {
        r
    }
}

fn service_row(svc: &Service, wide: bool, now: Timestamp) -> Vec<String> {
    let mut row = vec![
        name_of(&svc.metadata),
        service_type(svc).to_string(),
        service_cluster_ip(svc),
        service_external_ip(svc, wide),
        service_ports(svc),
        age(svc.metadata.creation_timestamp.as_ref(), now),
    ];
    if wide {
        row.push(format_labels(
            svc.spec.as_ref().and_then(|s| s.selector.as_ref()),
        ));
    }
    row
}

/// Up to three items comma-joined, then ` + N more...`; `<unset>` when empty.
fn list_with_more(items: impl Iterator<Item = String>) -> String {
    const MAX: usize = 3;
    let mut shown = Vec::new();
    let mut count = 0;
    for item in items {
        if shown.len() < MAX {
            shown.push(item);
        }
        count += 1;
    }
    let joined = shown.join(",");
    if count > MAX {
        format!("{joined} + {} more...", count - MAX)
    } else if joined.is_empty() {
        "<unset>".to_string()
    } else {
        joined
    }
}

/// PORTS of an EndpointSlice: the port numbers (or names, or `*`).
pub fn endpoint_slice_ports(ports: &[EndpointPort]) -> String {
    list_with_more(ports.iter().map(|p| match (p.port, &p.name) {
        (Some(n), _) => n.to_string(),
        (None, Some(name)) => name.clone(),
        (None, None) => "*".to_string(),
    }))
}

/// ENDPOINTS of an EndpointSlice: the first three addresses.
pub fn endpoint_slice_endpoints(slice: &EndpointSlice) -> String {
    list_with_more(
        slice
            .endpoints
            .iter()
            .flat_map(|e| e.addresses.iter().cloned()),
    )
}

fn endpoint_slice_row(slice: &EndpointSlice, now: Timestamp) -> Vec<String> {
    vec![
        name_of(&slice.metadata),
        slice.address_type.clone(),
        endpoint_slice_ports(slice.ports.as_deref().unwrap_or_default()),
        endpoint_slice_endpoints(slice),
        age(slice.metadata.creation_timestamp.as_ref(), now),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> Timestamp {
        "2025-06-01T12:00:00Z".parse().unwrap()
    }

    fn obj(kind: Kind, v: serde_json::Value) -> Object {
        Object::from_value_as(kind, v).unwrap()
    }

    fn svc(spec: serde_json::Value, status: serde_json::Value) -> Service {
        let Object::Service(s) = obj(
            Kind::Service,
            json!({"metadata": {"name": "s"}, "spec": spec, "status": status}),
        ) else {
            unreachable!()
        };
        s
    }

    #[test]
    fn human_durations_match_kubectl() {
        let cases = [
            (-5, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (5, "5s"),
            (119, "119s"),
            (120, "2m"),
            (192, "3m12s"),
            (599, "9m59s"),
            (600, "10m"),
            (3 * 3600 - 1, "179m"),
            (3 * 3600, "3h"),
            (3 * 3600 + 25 * 60, "3h25m"),
            (8 * 3600, "8h"),
            (47 * 3600 + 59 * 60, "47h"),
            (48 * 3600, "2d"),
            (52 * 3600, "2d4h"),
            (8 * 86400, "8d"),
            (400 * 86400, "400d"),
            (730 * 86400, "2y"),
            (800 * 86400, "2y70d"),
            (9 * 365 * 86400, "9y"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_duration(secs), want, "{secs}s");
        }
        let t = Time("2025-06-01T11:56:48Z".parse().unwrap());
        assert_eq!(age(Some(&t), now()), "3m12s");
        assert_eq!(age(None, now()), "<unknown>");
    }

    #[test]
    fn render_pads_columns_by_three_spaces() {
        let rows = vec![
            vec![
                "kubernetes".to_string(),
                "ClusterIP".to_string(),
                "5d".to_string(),
            ],
            vec!["a".to_string(), "".to_string(), "1s".to_string()],
        ];
        assert_eq!(
            render(&["NAME", "TYPE", "AGE"], &rows),
            "NAME         TYPE        AGE\nkubernetes   ClusterIP   5d\na                        1s\n"
        );
        // kubectl's tabwriter keeps columns at least 6 wide.
        let rows = vec![vec!["a".to_string(), "b".to_string()]];
        assert_eq!(render(&["X", "Y"], &rows), "X     Y\na     b\n");
    }

    #[test]
    fn service_table() {
        let services = vec![
            obj(
                Kind::Service,
                json!({"metadata": {"name": "kubernetes", "namespace": "default",
                    "creationTimestamp": "2025-05-27T08:00:00Z"},
                  "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"],
                    "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]}}),
            ),
            obj(
                Kind::Service,
                json!({"metadata": {"name": "web", "namespace": "shop",
                    "creationTimestamp": "2025-06-01T11:59:55Z"},
                  "spec": {"type": "NodePort", "clusterIPs": ["10.96.0.20"], "selector": {"tier": "fe", "app": "web"},
                    "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"},
                              {"port": 53, "protocol": "UDP"}]}}),
            ),
        ];
        assert_eq!(
            render_objects(Kind::Service, &services, false, false, now()),
            "\
NAME         TYPE        CLUSTER-IP   EXTERNAL-IP   PORT(S)               AGE
kubernetes   ClusterIP   10.96.0.1    <none>        443/TCP               5d4h
web          NodePort    10.96.0.20   <none>        80:30080/TCP,53/UDP   5s
"
        );
        assert_eq!(
            render_objects(Kind::Service, &services, true, true, now()),
            "\
NAMESPACE   NAME         TYPE        CLUSTER-IP   EXTERNAL-IP   PORT(S)               AGE    SELECTOR
default     kubernetes   ClusterIP   10.96.0.1    <none>        443/TCP               5d4h   <none>
shop        web          NodePort    10.96.0.20   <none>        80:30080/TCP,53/UDP   5s     app=web,tier=fe
"
        );
    }

    #[test]
    fn service_cells_edge_cases() {
        // Headless, no ports.
        let s = svc(
            json!({"clusterIP": "None", "clusterIPs": ["None"]}),
            json!({}),
        );
        assert_eq!(service_cluster_ip(&s), "None");
        assert_eq!(service_ports(&s), "<none>");
        assert_eq!(service_external_ip(&s, false), "<none>");
        assert_eq!(service_type(&s), "ClusterIP");
        // No cluster IP at all; protocol defaults to TCP.
        let s = svc(json!({"ports": [{"port": 8080}]}), json!({}));
        assert_eq!(service_cluster_ip(&s), "<none>");
        assert_eq!(service_ports(&s), "8080/TCP");
        // externalIPs on a ClusterIP service.
        let s = svc(
            json!({"externalIPs": ["203.0.113.1", "203.0.113.2"]}),
            json!({}),
        );
        assert_eq!(service_external_ip(&s, false), "203.0.113.1,203.0.113.2");
        // ExternalName.
        let s = svc(
            json!({"type": "ExternalName", "externalName": "db.example.com"}),
            json!({}),
        );
        assert_eq!(service_external_ip(&s, false), "db.example.com");
        assert_eq!(service_cluster_ip(&s), "<none>");
        // LoadBalancer: pending, ingress, ingress + externalIPs, long lists cut unless wide.
        let s = svc(json!({"type": "LoadBalancer"}), json!({}));
        assert_eq!(service_external_ip(&s, false), "<pending>");
        let s = svc(
            json!({"type": "LoadBalancer", "externalIPs": ["198.51.100.9"]}),
            json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}, {"hostname": "lb.example"}]}}),
        );
        assert_eq!(
            service_external_ip(&s, true),
            "203.0.113.7,lb.example,198.51.100.9"
        );
        assert_eq!(
            service_external_ip(&s, false),
            "203.0.113.7,l...,198.51.100.9"
        );
        let s = svc(
            json!({"type": "LoadBalancer"}),
            json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}),
        );
        assert_eq!(service_external_ip(&s, false), "203.0.113.7");
        let s = svc(json!({"type": "Weird"}), json!({}));
        assert_eq!(service_external_ip(&s, false), "<unknown>");
    }

    #[test]
    fn endpoint_slice_table_and_cells() {
        let mk = |ports: serde_json::Value, eps: serde_json::Value| {
            obj(
                Kind::EndpointSlice,
                json!({"metadata": {"name": "web-abc", "namespace": "default",
                    "creationTimestamp": "2025-06-01T10:00:00Z"},
                  "addressType": "IPv4", "ports": ports, "endpoints": eps}),
            )
        };
        let five = json!([
            {"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2", "10.0.0.3"]},
            {"addresses": ["10.0.0.4"]}, {"addresses": ["10.0.0.5"]}
        ]);
        let slices = vec![
            mk(
                json!([{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns"}]),
                five,
            ),
            mk(json!([]), json!([])),
        ];
        assert_eq!(
            render_objects(Kind::EndpointSlice, &slices, false, false, now()),
            "\
NAME      ADDRESSTYPE   PORTS      ENDPOINTS                                AGE
web-abc   IPv4          8080,dns   10.0.0.1,10.0.0.2,10.0.0.3 + 2 more...   120m
web-abc   IPv4          <unset>    <unset>                                  120m
"
        );
        let ports: Vec<EndpointPort> = serde_json::from_value(json!([
            {"port": 1}, {"port": 2}, {"port": 3}, {"port": 4}, {}
        ]))
        .unwrap();
        assert_eq!(endpoint_slice_ports(&ports), "1,2,3 + 2 more...");
        assert_eq!(endpoint_slice_ports(&ports[4..]), "*");
        let Object::EndpointSlice(s) = mk(
            json!([]),
            json!([{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2", "10.0.0.3"]}]),
        ) else {
            unreachable!()
        };
        assert_eq!(endpoint_slice_endpoints(&s), "10.0.0.1,10.0.0.2,10.0.0.3");
    }

    #[test]
    fn node_table() {
        let nodes = vec![
            obj(
                Kind::Node,
                json!({"metadata": {"name": "node-1", "creationTimestamp": "2025-05-30T08:00:00Z",
                    "annotations": {"weft.dev/vtep-ip": "192.168.1.10", "weft.dev/vtep-mac": "02:42:c0:a8:01:0a"}},
                  "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:1::/64"]},
                  "status": {"conditions": [{"type": "Ready", "status": "True"}],
                    "addresses": [{"type": "InternalIP", "address": "192.168.1.10"},
                                  {"type": "ExternalIP", "address": "203.0.113.10"},
                                  {"type": "Hostname", "address": "node-1"}]}}),
            ),
            obj(
                Kind::Node,
                json!({"metadata": {"name": "node-2"}, "spec": {"unschedulable": true},
                  "status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
            ),
            obj(Kind::Node, json!({"metadata": {"name": "node-3"}})),
        ];
        assert_eq!(
            render_objects(Kind::Node, &nodes, false, true, now()),
            "\
NAME     STATUS                        POD-CIDR                    INTERNAL-IP    AGE
node-1   Ready                         10.244.1.0/24,fd00:1::/64   192.168.1.10   2d4h
node-2   NotReady,SchedulingDisabled   <none>                      <none>         <unknown>
node-3   Unknown                       <none>                      <none>         <unknown>
"
        );
        let (headers, rows) = table(Kind::Node, &nodes, true, false, now());
        assert_eq!(&headers[5..], ["EXTERNAL-IP", "VTEP"]);
        assert_eq!(
            &rows[0][5..],
            ["203.0.113.10", "192.168.1.10@02:42:c0:a8:01:0a"]
        );
        assert_eq!(&rows[1][5..], ["<none>", "<none>"]);
    }

    #[test]
    fn pod_table() {
        let pods = vec![
            obj(
                Kind::Pod,
                json!({"metadata": {"name": "web-0", "namespace": "shop", "labels": {"app": "web"},
                    "creationTimestamp": "2025-06-01T11:00:00Z"},
                  "spec": {"nodeName": "node-1", "containers": [{"name": "a"}, {"name": "b"}]},
                  "status": {"phase": "Running", "podIP": "10.244.1.5",
                    "containerStatuses": [
                      {"name": "a", "ready": true, "restartCount": 0, "image": "x", "imageID": ""},
                      {"name": "b", "ready": false, "restartCount": 0, "image": "x", "imageID": ""}]}}),
            ),
            obj(
                Kind::Pod,
                json!({"metadata": {"name": "web-1", "namespace": "shop",
                    "deletionTimestamp": "2025-06-01T11:59:00Z"},
                  "spec": {"containers": []},
                  "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}),
            ),
            obj(
                Kind::Pod,
                json!({"metadata": {"name": "web-2", "namespace": "shop"},
                  "spec": {"containers": [{"name": "a"}]}, "status": {"phase": "Pending"}}),
            ),
        ];
        assert_eq!(
            render_objects(Kind::Pod, &pods, true, false, now()),
            "\
NAME    READY   STATUS        IP           NODE     AGE         LABELS
web-0   1/2     Running       10.244.1.5   node-1   60m         app=web
web-1   1/1     Terminating   <none>       <none>   <unknown>   <none>
web-2   0/1     Pending       <none>       <none>   <unknown>   <none>
"
        );
    }

    #[test]
    fn namespace_table() {
        let nss = vec![
            obj(
                Kind::Namespace,
                json!({"metadata": {"name": "default", "creationTimestamp": "2025-06-01T11:59:30Z"},
                  "status": {"phase": "Active"}}),
            ),
            obj(
                Kind::Namespace,
                json!({"metadata": {"name": "old", "deletionTimestamp": "2025-06-01T11:59:30Z"}}),
            ),
        ];
        // -A adds no NAMESPACE column for cluster-scoped kinds.
        assert_eq!(
            render_objects(Kind::Namespace, &nss, false, true, now()),
            "NAME      STATUS        AGE\ndefault   Active        30s\nold       Terminating   <unknown>\n"
        );
    }
}
