//! The node state file: the agent's half of the contract with the plugin.
//! The agent writes it (atomically, by rename) when it learns the node's
//! subnet; the plugin only reads it, so ADD works while the agent is away.

use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;

pub use weft_model::node_state::{Dns, NodeState};

/// A parsed, validated node state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub subnet: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
    pub bridge: String,
    pub dns: Dns,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeStateError {
    #[error("node state {path} is not readable (is the weft agent running?)")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("node state {path} is invalid: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Check a node state and parse its addresses.
pub fn validate(state: &NodeState) -> Result<Node, String> {
    let subnet: Ipv4Network = state
        .subnet
        .parse()
        .map_err(|e| format!("subnet {:?}: {e}", state.subnet))?;
    if subnet.prefix() > 30 {
        return Err(format!("subnet {subnet} is too small for pods"));
    }
    if subnet.network() != subnet.ip() {
        return Err(format!("subnet {subnet} has host bits set"));
    }
    let gateway: Ipv4Addr = state
        .gateway
        .parse()
        .map_err(|e| format!("gateway {:?}: {e}", state.gateway))?;
    if !subnet.contains(gateway) || gateway == subnet.network() || gateway == subnet.broadcast() {
        return Err(format!(
            "gateway {gateway} is not a host address of {subnet}"
        ));
    }
    if !(576..=65535).contains(&state.mtu) {
        return Err(format!("mtu {} is out of range 576..=65535", state.mtu));
    }
    crate::env::validate_ifname(&state.bridge)
        .map_err(|why| format!("bridge {:?}: {why}", state.bridge))?;
    Ok(Node {
        subnet,
        gateway,
        mtu: state.mtu,
        bridge: state.bridge.clone(),
        dns: state.dns.clone(),
    })
}

pub fn load(path: &Path) -> Result<Node, NodeStateError> {
    let bytes = std::fs::read(path).map_err(|source| NodeStateError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    let state: NodeState = serde_json::from_slice(&bytes).map_err(|e| NodeStateError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    validate(&state).map_err(|reason| NodeStateError::Invalid {
        path: path.to_path_buf(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{"subnet":"198.18.128.0/24","gateway":"198.18.128.1","mtu":1450,"bridge":"weft0","clusterCIDR":"198.18.128.0/17","dns":{"nameservers":["198.19.0.10"],"search":["svc.cluster.local","cluster.local"],"options":["ndots:5"]}}"#;

    #[test]
    fn the_documented_example_parses() {
        let s: NodeState = serde_json::from_str(EXAMPLE).unwrap();
        let n = validate(&s).unwrap();
        assert_eq!(n.subnet.to_string(), "198.18.128.0/24");
        assert_eq!(n.gateway, Ipv4Addr::new(198, 18, 128, 1));
        assert_eq!(n.dns.options, vec!["ndots:5"]);
    }

    #[test]
    fn bad_states_are_rejected_with_the_field() {
        let base: NodeState = serde_json::from_str(EXAMPLE).unwrap();
        let mut s = base.clone();
        s.gateway = "198.18.129.1".into();
        assert!(validate(&s).unwrap_err().contains("gateway"));
        let mut s = base.clone();
        s.subnet = "198.18.128.7/24".into();
        assert!(validate(&s).unwrap_err().contains("host bits"));
        let mut s = base.clone();
        s.mtu = 10;
        assert!(validate(&s).unwrap_err().contains("mtu"));
        let mut s = base;
        s.bridge = "a/b".into();
        assert!(validate(&s).unwrap_err().contains("bridge"));
    }

    #[test]
    fn missing_file_is_unreadable() {
        let e = load(Path::new("/nonexistent/weft/node.json")).unwrap_err();
        assert!(matches!(e, NodeStateError::Unreadable { .. }));
    }
}
