//! The node state file: the contract between the agent, which writes it
//! (atomically) when it learns the node's subnet, and the CNI plugin, which
//! only reads it, so pods can be wired while the agent is away
//! (docs/cni.md). One type on both sides keeps them from drifting.

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
