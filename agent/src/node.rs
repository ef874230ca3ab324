//! Node-level setup around the overlay: IP forwarding, masquerade of pod
//! traffic leaving the cluster CIDR, and the node state file the CNI plugin
//! reads (so pods can be wired while the agent restarts).

use crate::dataplane::netfilter::{split_rule, Iptables};
use crate::overlay::{Desired, BRIDGE};
use ipnetwork::Ipv4Network;
use std::io::Write;
use std::path::Path;
use weft_model::node_state::{Dns, NodeState};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("writing {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("iptables {table}/{chain}: {reason}")]
    Iptables {
        table: &'static str,
        chain: &'static str,
        reason: String,
    },
}

/// Cluster DNS settings handed to pods through the CNI result.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    pub nameserver: std::net::IpAddr,
    pub domain: String,
}

/// The node state file for the CNI plugin (the shared contract type, docs/cni.md).
pub fn node_state(want: &Desired, cluster: Ipv4Network, dns: &DnsConfig) -> NodeState {
    let d = dns.domain.trim_end_matches('.');
    NodeState {
        subnet: want.subnet.to_string(),
        gateway: want.gateway.ip().to_string(),
        mtu: want.mtu,
        bridge: BRIDGE.into(),
        cluster_cidr: Some(cluster.to_string()),
        dns: Dns {
            nameservers: vec![dns.nameserver.to_string()],
            domain: None,
            search: vec![format!("svc.{d}"), d.to_string()],
            options: vec!["ndots:5".into()],
        },
    }
}

/// Write `value` to `path` atomically (temp file, fsync, rename); returns
/// whether the content changed.
pub fn write_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<bool, NodeError> {
    let io = |source| NodeError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
    bytes.push(b'\n');
    if std::fs::read(path).ok().as_deref() == Some(&bytes[..]) {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(true)
}

/// Turn on IPv4 forwarding (per network namespace).
pub fn ensure_forwarding() -> Result<(), NodeError> {
    let path = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(path)
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
    {
        return Ok(());
    }
    std::fs::write(path, "1").map_err(|source| NodeError::Io {
        path: path.into(),
        source,
    })
}

pub const MASQ_CHAIN: &str = "WEFT-POSTROUTING";

/// The rules of our own NAT chain: traffic inside the cluster keeps its
/// source; pod traffic leaving the cluster CIDR is masqueraded.
pub fn masquerade_rules(cluster: Ipv4Network) -> Vec<String> {
    vec![
        format!("-s {cluster} -d {cluster} -m comment --comment \"weft: pod to pod keeps its source\" -j RETURN"),
        format!("-s {cluster} ! -d 224.0.0.0/4 -m comment --comment \"weft: pods leaving the cluster\" -j MASQUERADE --random-fully"),
    ]
}

/// Ensure our chain exists with exactly our rules and is jumped to from
/// POSTROUTING, with the iptables of the dataplane's mode. Blocking (it runs
/// iptables, waiting at most a few seconds for the xtables lock).
pub fn ensure_masquerade(ipt: &Iptables, cluster: Ipv4Network) -> Result<(), NodeError> {
    let err = |chain: &'static str, e: crate::dataplane::netfilter::Error| NodeError::Iptables {
        table: "nat",
        chain,
        reason: e.to_string(),
    };
    let want = masquerade_rules(cluster);
    let have = ipt.chain_rules("nat", MASQ_CHAIN);
    let current = have.as_ref().is_some_and(|h| {
        h.len() == want.len()
            && want.iter().all(|w| {
                let words = split_rule(w);
                let mut args = vec!["-t", "nat", "-C", MASQ_CHAIN];
                args.extend(words.iter().map(String::as_str));
                ipt.run(&args).is_ok()
            })
    });
    if !current {
        // One transaction: the chain is (re)created with exactly our rules.
        let mut input = format!("*nat\n:{MASQ_CHAIN} - [0:0]\n");
        for r in &want {
            input.push_str(&format!("-A {MASQ_CHAIN} {r}\n"));
        }
        input.push_str("COMMIT\n");
        ipt.restore(&input).map_err(|e| err(MASQ_CHAIN, e))?;
    }
    let words = split_rule(&format!(
        "-m comment --comment \"weft: masquerade\" -j {MASQ_CHAIN}"
    ));
    let mut check = vec!["-t", "nat", "-C", "POSTROUTING"];
    check.extend(words.iter().map(String::as_str));
    if ipt.run(&check).is_err() {
        let mut add = vec!["-t", "nat", "-A", "POSTROUTING"];
        add.extend(words.iter().map(String::as_str));
        ipt.run(&add).map_err(|e| err("POSTROUTING", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_file_contract_and_atomic_write() {
        let want = Desired {
            subnet: "198.18.128.0/24".parse().unwrap(),
            gateway: "198.18.128.1/24".parse().unwrap(),
            mtu: 1450,
            local_ip: "198.18.0.11".parse().unwrap(),
            vtep_mac: [2, 0, 0, 0, 0, 1],
            bridge_mac: [2, 0, 0, 0, 0, 2],
            vtep_addr: "198.18.128.0/32".parse().unwrap(),
            peers: vec![],
        };
        let dns = DnsConfig {
            nameserver: "198.19.0.10".parse().unwrap(),
            domain: "cluster.local".into(),
        };
        let v = node_state(&want, "198.18.128.0/17".parse().unwrap(), &dns);
        assert_eq!(v.gateway, "198.18.128.1");
        assert_eq!(v.mtu, 1450);
        assert_eq!(v.dns.search[0], "svc.cluster.local");
        let dir = std::env::temp_dir().join(format!("weft-node-state-{}", std::process::id()));
        let path = dir.join("node.json");
        assert!(write_atomic(&path, &v).unwrap());
        assert!(
            !write_atomic(&path, &v).unwrap(),
            "unchanged content is not rewritten"
        );
        let back: NodeState = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, v);
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            json["clusterCIDR"], "198.18.128.0/17",
            "the field names of docs/cni.md"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn masquerade_spares_cluster_traffic() {
        let r = masquerade_rules("198.18.128.0/17".parse().unwrap());
        assert!(
            r[0].starts_with("-s 198.18.128.0/17 -d 198.18.128.0/17")
                && r[0].ends_with("-j RETURN")
        );
        assert!(r[1].contains("-j MASQUERADE"));
    }
}
