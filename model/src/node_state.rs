//! The contracts between the agent and the CNI plugin (docs/cni.md), one
//! type on both sides so they cannot drift: the node state file, which the
//! agent writes (atomically) when it learns the node's subnet and the plugin
//! only reads, so pods can be wired while the agent is away; and the IPAM
//! claim files, which the plugin writes and the agent reads to learn about
//! pods wired while it was away.

use serde::{Deserialize, Serialize};

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

/// Who holds an address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claim {
    pub container_id: String,
    pub ifname: String,
    pub netns: Option<String>,
    pub pod: PodRef,
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
        s
    }

    /// A claim file's content; `None` when it lacks the first two lines.
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
