//! The flannel-style VXLAN overlay: one subnet per node behind a bridge, and
//! a static route, permanent neighbour and FDB entry per peer (no miss
//! handling, learning off). Pure planning and diffing live here; the kernel
//! is reached only through [`Links`] ([`netlink::NetlinkLinks`] for real,
//! [`fake::FakeLinks`] for tests).
//!
//! Reconciliation is level-based: observe what the kernel has, compute the
//! operations that turn it into the desired state, apply them. A restart with
//! the same view observes a matching kernel and does nothing.

pub mod fake;
pub mod netlink;

use ipnetwork::Ipv4Network;
use std::net::{IpAddr, Ipv4Addr};
use weft_model::NodeView;

pub const BRIDGE: &str = "weft0";
pub const VXLAN: &str = "weft.1";
pub const VNI: u32 = 1;
pub const VXLAN_PORT: u16 = 8472;
/// Outer IPv4 + UDP + VXLAN + inner Ethernet headers.
pub const VXLAN_OVERHEAD: u32 = 50;

pub type Mac = [u8; 6];

/// What the agent knows about its own node.
#[derive(Clone, Debug)]
pub struct OverlayConfig {
    pub node: String,
    pub node_ip: Ipv4Addr,
    pub underlay_mtu: u32,
}

impl OverlayConfig {
    pub fn mtu(&self) -> u32 {
        self.underlay_mtu.saturating_sub(VXLAN_OVERHEAD)
    }
}

/// The node's VTEP MAC: stable across restarts (derived from the node name),
/// locally administered and unicast, so peers' FDB entries stay valid.
pub fn vtep_mac(node: &str) -> Mac {
    // FNV-1a: a fixed, dependency-free hash; collisions only matter within one cluster.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    [(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

/// The bridge's MAC: pinned (else the kernel takes the lowest port MAC, and
/// the pods' gateway MAC would change as pods come and go).
pub fn bridge_mac(node: &str) -> Mac {
    let mut m = vtep_mac(node);
    m[5] ^= 0x5a;
    m[4] ^= 0xa5;
    m
}

pub fn format_mac(m: &Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_mac(s: &str) -> Option<Mac> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut m = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return None;
        }
        m[i] = u8::from_str_radix(p, 16).ok()?;
    }
    Some(m)
}

/// Another node as the overlay sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    pub node: String,
    pub subnet: Ipv4Network,
    pub vtep_ip: Ipv4Addr,
    pub vtep_mac: Mac,
}

impl Peer {
    /// The next hop for the peer's subnet: its network address, resolved by a
    /// permanent neighbour entry to the peer's VTEP MAC (flannel's scheme).
    pub fn next_hop(&self) -> Ipv4Addr {
        self.subnet.network()
    }
}

/// The overlay this node should have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub subnet: Ipv4Network,
    /// The bridge's address: the subnet's first host, with the subnet's prefix.
    pub gateway: Ipv4Network,
    pub mtu: u32,
    pub local_ip: Ipv4Addr,
    /// The VXLAN device's address: the subnet's network address as a /32
    /// (flannel's scheme). Traffic the node sends or masquerades into the
    /// overlay leaves with it, so the answers come back through the overlay.
    pub vtep_addr: Ipv4Network,
    pub vtep_mac: Mac,
    pub bridge_mac: Mac,
    pub peers: Vec<Peer>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("node {0} has no pod subnet in the view yet")]
    NoSubnet(String),
    #[error("node {node}: pod subnet {value:?} is not an IPv4 CIDR with room for a gateway")]
    BadSubnet { node: String, value: String },
}

/// The desired overlay from the view. Peers missing a subnet, VTEP address or
/// MAC are left out and reported in the second value.
pub fn plan(view: &NodeView, cfg: &OverlayConfig) -> Result<(Desired, Vec<String>), PlanError> {
    let me = view
        .nodes
        .get(&cfg.node)
        .ok_or_else(|| PlanError::NoSubnet(cfg.node.clone()))?;
    let raw = me
        .pod_cidrs
        .first()
        .ok_or_else(|| PlanError::NoSubnet(cfg.node.clone()))?;
    let subnet: Ipv4Network = raw
        .parse()
        .ok()
        .filter(|n: &Ipv4Network| n.prefix() <= 30)
        .ok_or_else(|| PlanError::BadSubnet {
            node: cfg.node.clone(),
            value: raw.clone(),
        })?;
    let gw_ip = Ipv4Addr::from(u32::from(subnet.network()) + 1);
    let gateway = Ipv4Network::new(gw_ip, subnet.prefix()).map_err(|_| PlanError::BadSubnet {
        node: cfg.node.clone(),
        value: raw.clone(),
    })?;
    let mut peers = Vec::new();
    let mut skipped = Vec::new();
    for (name, n) in &view.nodes {
        if *name == cfg.node {
            continue;
        }
        let subnet = n
            .pod_cidrs
            .first()
            .and_then(|c| c.parse::<Ipv4Network>().ok());
        let vtep_ip = match n.vtep_ip.or(n.node_ip) {
            Some(IpAddr::V4(ip)) => Some(ip),
            _ => None,
        };
        let mac = n.vtep_mac.as_deref().and_then(parse_mac);
        match (subnet, vtep_ip, mac) {
            (Some(subnet), Some(vtep_ip), Some(vtep_mac)) => peers.push(Peer {
                node: name.clone(),
                subnet,
                vtep_ip,
                vtep_mac,
            }),
            _ => skipped.push(format!(
                "node {name}: waiting for {}",
                [
                    subnet.is_none().then_some("a pod subnet"),
                    vtep_ip.is_none().then_some("a VTEP address"),
                    mac.is_none().then_some("a VTEP MAC"),
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(", ")
            )),
        }
    }
    peers.sort();
    Ok((
        Desired {
            subnet,
            gateway,
            mtu: cfg.mtu(),
            local_ip: cfg.node_ip,
            vtep_addr: Ipv4Network::new(subnet.network(), 32).map_err(|_| {
                PlanError::BadSubnet {
                    node: cfg.node.clone(),
                    value: raw.clone(),
                }
            })?,
            vtep_mac: vtep_mac(&cfg.node),
            bridge_mac: bridge_mac(&cfg.node),
            peers,
        },
        skipped,
    ))
}

/// A link as observed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub mtu: u32,
    pub up: bool,
    pub mac: Option<Mac>,
    pub addrs: Vec<Ipv4Network>,
}

/// The VXLAN device's parameters as observed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VxlanParams {
    pub vni: u32,
    pub port: u16,
    pub local: Option<Ipv4Addr>,
    pub learning: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub dst: Ipv4Network,
    pub via: Ipv4Addr,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Neighbour {
    pub ip: Ipv4Addr,
    pub mac: Mac,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fdb {
    pub mac: Mac,
    pub dst: Ipv4Addr,
}

/// What the kernel has that the overlay owns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub bridge: Option<LinkState>,
    pub vxlan: Option<(LinkState, VxlanParams)>,
    /// Routes whose output device is the VXLAN device.
    pub routes: Vec<Route>,
    /// Permanent neighbours on the VXLAN device.
    pub neighbours: Vec<Neighbour>,
    /// FDB entries with a remote destination on the VXLAN device.
    pub fdb: Vec<Fdb>,
}

/// One change to the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    CreateBridge {
        mtu: u32,
        mac: Mac,
    },
    SetBridge {
        mtu: u32,
        mac: Mac,
    },
    AddBridgeAddr(Ipv4Network),
    DelBridgeAddr(Ipv4Network),
    AddVxlanAddr(Ipv4Network),
    DelVxlanAddr(Ipv4Network),
    /// Remove a VXLAN device whose parameters are wrong (it is then recreated).
    DeleteVxlan,
    CreateVxlan {
        vni: u32,
        port: u16,
        local: Ipv4Addr,
        mtu: u32,
        mac: Mac,
    },
    SetVxlan {
        mtu: u32,
    },
    AddRoute(Route),
    DelRoute(Route),
    AddNeighbour(Neighbour),
    DelNeighbour(Neighbour),
    AddFdb(Fdb),
    DelFdb(Fdb),
}

/// The operations that turn `have` into `want`; empty when they match.
pub fn diff(have: &Observed, want: &Desired) -> Vec<Op> {
    let mut ops = Vec::new();
    match &have.bridge {
        None => {
            ops.push(Op::CreateBridge {
                mtu: want.mtu,
                mac: want.bridge_mac,
            });
            ops.push(Op::AddBridgeAddr(want.gateway));
        }
        Some(b) => {
            if b.mtu != want.mtu || !b.up || b.mac != Some(want.bridge_mac) {
                ops.push(Op::SetBridge {
                    mtu: want.mtu,
                    mac: want.bridge_mac,
                });
            }
            if !b.addrs.contains(&want.gateway) {
                ops.push(Op::AddBridgeAddr(want.gateway));
            }
            for a in &b.addrs {
                if *a != want.gateway {
                    ops.push(Op::DelBridgeAddr(*a));
                }
            }
        }
    }
    let wanted_params = VxlanParams {
        vni: VNI,
        port: VXLAN_PORT,
        local: Some(want.local_ip),
        learning: false,
    };
    let recreate = match &have.vxlan {
        None => true,
        Some((link, params)) => {
            if *params != wanted_params || link.mac != Some(want.vtep_mac) {
                ops.push(Op::DeleteVxlan);
                true
            } else {
                if link.mtu != want.mtu || !link.up {
                    ops.push(Op::SetVxlan { mtu: want.mtu });
                }
                if !link.addrs.contains(&want.vtep_addr) {
                    ops.push(Op::AddVxlanAddr(want.vtep_addr));
                }
                for a in &link.addrs {
                    if *a != want.vtep_addr {
                        ops.push(Op::DelVxlanAddr(*a));
                    }
                }
                false
            }
        }
    };
    if recreate {
        ops.push(Op::CreateVxlan {
            vni: VNI,
            port: VXLAN_PORT,
            local: want.local_ip,
            mtu: want.mtu,
            mac: want.vtep_mac,
        });
        ops.push(Op::AddVxlanAddr(want.vtep_addr));
    }
    // A recreated device starts empty: everything is added afresh.
    let empty = Observed::default();
    let have = if recreate { &empty } else { have };
    let routes: Vec<Route> = want
        .peers
        .iter()
        .map(|p| Route {
            dst: p.subnet,
            via: p.next_hop(),
        })
        .collect();
    let neighbours: Vec<Neighbour> = want
        .peers
        .iter()
        .map(|p| Neighbour {
            ip: p.next_hop(),
            mac: p.vtep_mac,
        })
        .collect();
    let fdb: Vec<Fdb> = want
        .peers
        .iter()
        .map(|p| Fdb {
            mac: p.vtep_mac,
            dst: p.vtep_ip,
        })
        .collect();
    // Order: FDB and neighbours before the route that uses them; removals first.
    for f in &have.fdb {
        if !fdb.contains(f) {
            ops.push(Op::DelFdb(f.clone()));
        }
    }
    for n in &have.neighbours {
        if !neighbours.contains(n) {
            ops.push(Op::DelNeighbour(n.clone()));
        }
    }
    for r in &have.routes {
        if !routes.contains(r) {
            ops.push(Op::DelRoute(r.clone()));
        }
    }
    for f in fdb {
        if !have.fdb.contains(&f) {
            ops.push(Op::AddFdb(f));
        }
    }
    for n in neighbours {
        if !have.neighbours.contains(&n) {
            ops.push(Op::AddNeighbour(n));
        }
    }
    for r in routes {
        if !have.routes.contains(&r) {
            ops.push(Op::AddRoute(r));
        }
    }
    ops
}

#[derive(Debug, thiserror::Error)]
pub enum LinksError {
    #[error("netlink {op}: {source}")]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{op}: {reason}")]
    Kernel { op: String, reason: String },
}

/// The kernel side of the overlay.
#[allow(async_fn_in_trait)]
pub trait Links {
    async fn observe(&self) -> Result<Observed, LinksError>;
    async fn apply(&self, op: &Op) -> Result<(), LinksError>;
}

/// What one reconciliation did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub applied: Vec<Op>,
    pub errors: Vec<String>,
}

/// Observe, diff, apply. Keeps going after a failed operation and reports every error.
pub async fn reconcile<L: Links>(links: &L, want: &Desired) -> Result<Outcome, LinksError> {
    let have = links.observe().await?;
    let mut out = Outcome::default();
    for op in diff(&have, want) {
        match links.apply(&op).await {
            Ok(()) => out.applied.push(op),
            Err(e) => out.errors.push(format!("{op:?}: {e}")),
        }
    }
    Ok(out)
}

/// The overlay as an operator sees it: the node's own side, every peer with
/// whether its route, neighbour and FDB entry are in the kernel, and the
/// operations a reconcile would still apply (`netctl overlay`).
pub fn describe(
    node: &str,
    want: Option<&Desired>,
    have: &Observed,
    problem: Option<&str>,
) -> serde_json::Value {
    use serde_json::json;
    let peers: Vec<serde_json::Value> = want
        .map(|w| {
            w.peers
                .iter()
                .map(|p| {
                    json!({
                        "node": p.node,
                        "subnet": p.subnet.to_string(),
                        "vtep": p.vtep_ip.to_string(),
                        "mac": format_mac(&p.vtep_mac),
                        "route": have.routes.contains(&Route { dst: p.subnet, via: p.next_hop() }),
                        "neighbour": have.neighbours.contains(&Neighbour { ip: p.next_hop(), mac: p.vtep_mac }),
                        "fdb": have.fdb.contains(&Fdb { mac: p.vtep_mac, dst: p.vtep_ip }),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let pending: Vec<String> = want
        .map(|w| diff(have, w).iter().map(|o| format!("{o:?}")).collect())
        .unwrap_or_default();
    json!({
        "node": node,
        "problem": problem,
        "subnet": want.map(|w| w.subnet.to_string()),
        "gateway": want.map(|w| w.gateway.to_string()),
        "mtu": want.map(|w| w.mtu),
        "vtep": want.map(|w| w.local_ip.to_string()),
        "vtepMac": want.map(|w| format_mac(&w.vtep_mac)),
        "bridge": have.bridge.as_ref().map(|b| json!({"mtu": b.mtu, "up": b.up, "addrs": b.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>()})),
        "vxlan": have.vxlan.as_ref().map(|(l, p)| json!({"mtu": l.mtu, "up": l.up, "vni": p.vni, "port": p.port, "learning": p.learning,
            "local": p.local.map(|x| x.to_string()), "mac": l.mac.as_ref().map(format_mac)})),
        "routes": have.routes.iter().map(|r| format!("{} via {} onlink", r.dst, r.via)).collect::<Vec<_>>(),
        "neighbours": have.neighbours.iter().map(|n| format!("{} lladdr {} permanent", n.ip, format_mac(&n.mac))).collect::<Vec<_>>(),
        "fdb": have.fdb.iter().map(|f| format!("{} dst {}", format_mac(&f.mac), f.dst)).collect::<Vec<_>>(),
        "peers": peers,
        "pending": pending,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_model::NodeEntry;

    fn node(name: &str, ip: &str, cidr: Option<&str>) -> NodeEntry {
        NodeEntry {
            name: name.into(),
            node_ip: Some(ip.parse().unwrap()),
            pod_cidrs: cidr.into_iter().map(String::from).collect(),
            vtep_ip: Some(ip.parse().unwrap()),
            vtep_mac: Some(format_mac(&vtep_mac(name))),
            ready: true,
        }
    }

    fn view(nodes: Vec<NodeEntry>) -> NodeView {
        NodeView {
            rev: 1,
            synced: true,
            services: Default::default(),
            nodes: nodes.into_iter().map(|n| (n.name.clone(), n)).collect(),
            pods: Default::default(),
        }
    }

    fn cfg() -> OverlayConfig {
        OverlayConfig {
            node: "n1".into(),
            node_ip: "198.18.0.11".parse().unwrap(),
            underlay_mtu: 1500,
        }
    }

    #[test]
    fn macs_are_stable_unicast_and_local() {
        let m = vtep_mac("node-1");
        assert_eq!(m, vtep_mac("node-1"));
        assert_ne!(m, vtep_mac("node-2"));
        assert_eq!(m[0] & 0x01, 0, "unicast");
        assert_eq!(m[0] & 0x02, 0x02, "locally administered");
        assert_eq!(parse_mac(&format_mac(&m)), Some(m));
        assert_eq!(parse_mac("zz:00:00:00:00:00"), None);
    }

    #[test]
    fn plan_from_view() {
        let v = view(vec![
            node("n1", "198.18.0.11", Some("198.18.128.0/24")),
            node("n2", "198.18.0.12", Some("198.18.129.0/24")),
            node("n3", "198.18.0.13", None),
        ]);
        let (want, skipped) = plan(&v, &cfg()).unwrap();
        assert_eq!(want.gateway.to_string(), "198.18.128.1/24");
        assert_eq!(want.mtu, 1450);
        assert_eq!(want.peers.len(), 1);
        assert_eq!(want.peers[0].next_hop().to_string(), "198.18.129.0");
        assert_eq!(skipped, ["node n3: waiting for a pod subnet"]);
        let no_me = view(vec![node("n2", "198.18.0.12", Some("198.18.129.0/24"))]);
        assert_eq!(
            plan(&no_me, &cfg()).unwrap_err(),
            PlanError::NoSubnet("n1".into())
        );
    }

    #[tokio::test]
    async fn reconcile_converges_repairs_and_is_quiet_when_right() {
        let v = view(vec![
            node("n1", "198.18.0.11", Some("198.18.128.0/24")),
            node("n2", "198.18.0.12", Some("198.18.129.0/24")),
            node("n3", "198.18.0.13", Some("198.18.130.0/24")),
        ]);
        let (want, _) = plan(&v, &cfg()).unwrap();
        let links = fake::FakeLinks::default();
        let first = reconcile(&links, &want).await.unwrap();
        assert!(first.errors.is_empty());
        // bridge, its address, the VXLAN device and its address, and per peer: FDB, neighbour, route
        assert_eq!(first.applied.len(), 4 + 2 * 3);
        assert!(first
            .applied
            .contains(&Op::AddVxlanAddr("198.18.128.0/32".parse().unwrap())));
        // nothing to do the second time (a restart changes nothing that was right)
        assert!(reconcile(&links, &want).await.unwrap().applied.is_empty());
        // a route deleted by hand is put back, and only it
        links.mutate(|k| {
            k.routes.pop();
        });
        let again = reconcile(&links, &want).await.unwrap();
        assert!(
            matches!(again.applied.as_slice(), [Op::AddRoute(_)]),
            "{:?}",
            again.applied
        );
        // a deleted VXLAN device is recreated with all peers' entries
        links.mutate(|k| {
            k.vxlan = None;
            k.routes.clear();
            k.neighbours.clear();
            k.fdb.clear();
        });
        let again = reconcile(&links, &want).await.unwrap();
        assert_eq!(again.applied.len(), 2 + 2 * 3);
        // a departed node's entries are removed
        let v2 = view(vec![
            node("n1", "198.18.0.11", Some("198.18.128.0/24")),
            node("n2", "198.18.0.12", Some("198.18.129.0/24")),
        ]);
        let (want2, _) = plan(&v2, &cfg()).unwrap();
        let gone = reconcile(&links, &want2).await.unwrap();
        assert_eq!(gone.applied.len(), 3);
        assert!(gone
            .applied
            .iter()
            .all(|o| matches!(o, Op::DelRoute(_) | Op::DelNeighbour(_) | Op::DelFdb(_))));
        // a VXLAN device with learning on is replaced
        links.mutate(|k| {
            if let Some((_, p)) = k.vxlan.as_mut() {
                p.learning = true;
            }
        });
        let fixed = reconcile(&links, &want2).await.unwrap();
        assert_eq!(fixed.applied[0], Op::DeleteVxlan);
    }
}
