//! The contracts between the agent and the CNI plugin (docs/cni.md), one
//! type on both sides so they cannot drift: the node state file, which the
//! agent writes (atomically) when it learns the node's subnet and the plugin
//! only reads, so pods can be wired while the agent is away; and the IPAM
//! claim files, which the plugin writes and the agent reads to learn about
//! pods wired while it was away, including the hostPorts (CNI
//! `portMappings`) it must program for them.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::view::Protocol;

/// DNS settings handed to the runtime in the result (`dns`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

/// `/run/weft/node.json`, e.g.
/// `{"subnet":"198.18.128.0/24","gateway":"198.18.128.1","mtu":1450,"bridge":"weft0",
///   "clusterCIDR":"198.18.128.0/17","dns":{"nameservers":["198.19.0.10"],...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// This node's pod subnet; IPAM allocates from it.
    pub subnet: String,
    /// Address of the bridge inside `subnet`; the pods' default gateway.
    pub gateway: String,
    /// MTU for both veth ends (the overlay MTU).
    pub mtu: u32,
    /// The bridge the agent created; host-side veths are enslaved to it.
    pub bridge: String,
    /// The whole cluster pod CIDR (informational for the plugin).
    #[serde(
        rename = "clusterCIDR",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cluster_cidr: Option<String>,
    #[serde(default)]
    pub dns: Dns,
}

/// Kubernetes pod identity from `CNI_ARGS` (`K8S_POD_*`), when the runtime sends it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub uid: Option<String>,
}

/// One hostPort of a pod (an entry of the CNI `portMappings` capability),
/// as validated by the plugin and recorded in its claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortMapping {
    pub protocol: Protocol,
    pub host_port: u16,
    pub container_port: u16,
    /// The node address the port is bound to; `None` is every local
    /// address (an empty `hostIP`, `0.0.0.0` or `::`).
    pub host_ip: Option<IpAddr>,
}

impl PortMapping {
    /// The claim line's value: `tcp/8080/80`, or `tcp/8080/80/198.18.0.11`
    /// with a host IP (`/` cannot occur in an address, IPv6 included).
    pub fn encode(&self) -> String {
        let proto = self.protocol.as_str().to_ascii_lowercase();
        match self.host_ip {
            None => format!("{proto}/{}/{}", self.host_port, self.container_port),
            Some(ip) => format!("{proto}/{}/{}/{ip}", self.host_port, self.container_port),
        }
    }

    /// The inverse of [`PortMapping::encode`]; `None` for anything it would
    /// not have written (port 0 included). An unspecified host IP is read as
    /// none, as the plugin normalizes it.
    pub fn decode(s: &str) -> Option<PortMapping> {
        let mut parts = s.splitn(4, '/');
        let protocol = Protocol::parse(&parts.next()?.to_ascii_uppercase())?;
        let port = |p: Option<&str>| p?.parse::<u16>().ok().filter(|p| *p != 0);
        let host_port = port(parts.next())?;
        let container_port = port(parts.next())?;
        let host_ip = match parts.next() {
            None => None,
            Some(ip) => Some(ip.parse::<IpAddr>().ok()?).filter(|ip| !ip.is_unspecified()),
        };
        Some(PortMapping {
            protocol,
            host_port,
            container_port,
            host_ip,
        })
    }
}

impl fmt::Display for PortMapping {
    /// `198.18.0.11:8080/tcp -> 80` or `*:8080/tcp -> 80`, for messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = self.protocol.as_str().to_ascii_lowercase();
        match self.host_ip {
            None => write!(f, "*:{}/{proto} -> {}", self.host_port, self.container_port),
            Some(IpAddr::V6(ip)) => write!(
                f,
                "[{ip}]:{}/{proto} -> {}",
                self.host_port, self.container_port
            ),
            Some(ip) => write!(
                f,
                "{ip}:{}/{proto} -> {}",
                self.host_port, self.container_port
            ),
        }
    }
}

/// Who holds an address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claim {
    pub container_id: String,
    pub ifname: String,
    pub netns: Option<String>,
    pub pod: PodRef,
    /// The pod's hostPorts (`portMapping=` lines; absent in claims written
    /// before hostPort support, which decode with none).
    pub port_mappings: Vec<PortMapping>,
}

impl Claim {
    pub fn matches(&self, container_id: &str, ifname: &str) -> bool {
        self.container_id == container_id && self.ifname == ifname
    }

    /// The claim file's content.
    pub fn encode(&self) -> String {
        let mut s = format!("{}\n{}\n", self.container_id, self.ifname);
        let mut kv = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                // Values come from the runtime; a newline would forge a key.
                let v: String = v.chars().filter(|c| *c != '\n' && *c != '\r').collect();
                s.push_str(&format!("{k}={v}\n"));
            }
        };
        kv("netns", &self.netns);
        kv("podNamespace", &self.pod.namespace);
        kv("podName", &self.pod.name);
        kv("podUID", &self.pod.uid);
        for m in &self.port_mappings {
            s.push_str(&format!("portMapping={}\n", m.encode()));
        }
        s
    }

    /// A claim file's content; `None` when it lacks the first two lines.
    /// Unknown keys are ignored (a newer plugin may add some), and so is a
    /// `portMapping` line that does not decode: one bad line must not hide
    /// the pod, nor make GC treat its address as unreadable.
    pub fn decode(text: &str) -> Option<Claim> {
        let mut lines = text.lines();
        let container_id = lines.next()?.to_string();
        let ifname = lines.next()?.to_string();
        if container_id.is_empty() || ifname.is_empty() {
            return None;
        }
        let mut claim = Claim {
            container_id,
            ifname,
            ..Claim::default()
        };
        for line in lines {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            if k == "portMapping" {
                claim.port_mappings.extend(PortMapping::decode(v));
                continue;
            }
            let v = Some(v.to_string());
            match k {
                "netns" => claim.netns = v,
                "podNamespace" => claim.pod.namespace = v,
                "podName" => claim.pod.name = v,
                "podUID" => claim.pod.uid = v,
                _ => {}
            }
        }
        Some(claim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(
        protocol: Protocol,
        host_port: u16,
        container_port: u16,
        host_ip: Option<&str>,
    ) -> PortMapping {
        PortMapping {
            protocol,
            host_port,
            container_port,
            host_ip: host_ip.map(|ip| ip.parse().unwrap()),
        }
    }

    fn claim() -> Claim {
        Claim {
            container_id: "cid1".into(),
            ifname: "eth0".into(),
            netns: Some("/run/netns/cni-1".into()),
            pod: PodRef {
                namespace: Some("shop".into()),
                name: Some("web-0".into()),
                uid: Some("u-1".into()),
            },
            port_mappings: vec![
                mapping(Protocol::TCP, 8080, 80, None),
                mapping(Protocol::UDP, 5353, 53, Some("198.18.0.11")),
                mapping(Protocol::SCTP, 9000, 9000, Some("fd00::11")),
            ],
        }
    }

    #[test]
    fn claim_with_port_mappings_round_trips() {
        let c = claim();
        let text = c.encode();
        assert!(text.ends_with(
            "podUID=u-1\nportMapping=tcp/8080/80\nportMapping=udp/5353/53/198.18.0.11\nportMapping=sctp/9000/9000/fd00::11\n"
        ), "{text}");
        assert_eq!(Claim::decode(&text), Some(c));
    }

    #[test]
    fn claims_written_before_hostports_decode_with_none() {
        let old =
            "cid1\neth0\nnetns=/run/netns/cni-1\npodNamespace=shop\npodName=web-0\npodUID=u-1\n";
        let c = Claim::decode(old).unwrap();
        assert!(c.port_mappings.is_empty());
        assert_eq!(
            c.encode(),
            old,
            "a claim without mappings is written as before"
        );
        let mut want = claim();
        want.port_mappings.clear();
        assert_eq!(c, want);
    }

    #[test]
    fn bad_port_mapping_lines_are_skipped_not_fatal() {
        let text = "cid1\neth0\nportMapping=tcp/70000/80\nportMapping=icmp/1/1\nportMapping=tcp/0/80\n\
                    portMapping=tcp/8080\nportMapping=tcp/8080/80/not-an-ip\nportMapping=UDP/53/53/0.0.0.0\n\
                    portMapping=tcp/443/8443\nfuture=1\n";
        let c = Claim::decode(text).unwrap();
        assert_eq!(
            c.port_mappings,
            vec![
                mapping(Protocol::UDP, 53, 53, None),
                mapping(Protocol::TCP, 443, 8443, None)
            ]
        );
    }

    #[test]
    fn port_mapping_text_forms() {
        let m = mapping(Protocol::TCP, 8080, 80, Some("198.18.0.11"));
        assert_eq!(m.encode(), "tcp/8080/80/198.18.0.11");
        assert_eq!(PortMapping::decode(&m.encode()), Some(m));
        assert_eq!(m.to_string(), "198.18.0.11:8080/tcp -> 80");
        assert_eq!(
            mapping(Protocol::UDP, 53, 5353, None).to_string(),
            "*:53/udp -> 5353"
        );
        assert_eq!(
            mapping(Protocol::TCP, 1, 2, Some("fd00::1")).to_string(),
            "[fd00::1]:1/tcp -> 2"
        );
    }
}
