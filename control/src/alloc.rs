//! Allocators for cluster-unique resources: Service cluster IPs, NodePorts
//! (per protocol) and per-node pod subnets. They live in memory and are
//! rebuilt from stored objects at startup, so the store is the only truth.

use ipnetwork::Ipv4Network;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// Why an allocation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("the provided {what} ({value}) is not in the valid range. The range of valid {what}s is {range}")]
    OutOfRange {
        what: &'static str,
        value: String,
        range: String,
    },
    #[error("provided {what} {value} is already allocated")]
    Allocated { what: &'static str, value: String },
    #[error("range is full: no {what} left in {range}")]
    Full { what: &'static str, range: String },
}

/// A fixed-size bitmap over `0..len`, with a cursor so that freed items are
/// not handed out again right away.
#[derive(Clone, Debug)]
struct Bitmap {
    bits: Vec<u64>,
    len: u32,
    used: u32,
}

impl Bitmap {
    fn new(len: u32) -> Self {
        Bitmap {
            bits: vec![0; len.div_ceil(64) as usize],
            len,
            used: 0,
        }
    }
    fn get(&self, i: u32) -> bool {
        self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    fn set(&mut self, i: u32) -> bool {
        if self.get(i) {
            return false;
        }
        self.bits[(i / 64) as usize] |= 1 << (i % 64);
        self.used += 1;
        true
    }
    fn clear(&mut self, i: u32) {
        if self.get(i) {
            self.bits[(i / 64) as usize] &= !(1 << (i % 64));
            self.used -= 1;
        }
    }
    /// First free index in `lo..hi` at or after `from`, wrapping within the band.
    fn find_free(&self, lo: u32, hi: u32, from: u32) -> Option<u32> {
        if lo >= hi {
            return None;
        }
        let start = from.clamp(lo, hi - 1);
        (start..hi).chain(lo..start).find(|&i| !self.get(i))
    }
}

/// Cluster IPs from one IPv4 service CIDR. As in Kubernetes, the lower band
/// (min(max(16, size/16), 256) addresses) is kept for requested IPs: dynamic
/// allocation takes from the upper band first.
#[derive(Clone, Debug)]
pub struct IpAllocator {
    cidr: Ipv4Network,
    map: Bitmap,
    cursor: u32,
}

impl IpAllocator {
    pub fn new(cidr: Ipv4Network) -> Self {
        let size = 1u64 << (32 - cidr.prefix());
        // network and broadcast addresses are never handed out (for /31 and /32 nothing is).
        let len = size.clamp(0, u32::MAX as u64) as u32;
        let mut map = Bitmap::new(len.max(1));
        if len >= 1 {
            map.set(0);
        }
        if len >= 2 {
            map.set(len - 1);
        }
        map.used = 0; // reserved addresses are not "allocated"
        IpAllocator {
            cidr,
            map,
            cursor: 0,
        }
    }

    pub fn cidr(&self) -> Ipv4Network {
        self.cidr
    }

    fn static_band(&self) -> u32 {
        let size = self.map.len;
        (size / 16).clamp(16, 256).min(size)
    }

    fn offset(&self, ip: Ipv4Addr) -> Option<u32> {
        if !self.cidr.contains(ip) {
            return None;
        }
        let off = u32::from(ip) - u32::from(self.cidr.network());
        (off != 0 && off + 1 != self.map.len).then_some(off)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.cidr.contains(ip)
    }

    pub fn is_allocated(&self, ip: Ipv4Addr) -> bool {
        self.offset(ip).is_some_and(|o| self.map.get(o))
    }

    pub fn allocate(&mut self, ip: Ipv4Addr) -> Result<(), AllocError> {
        let off = self.offset(ip).ok_or_else(|| AllocError::OutOfRange {
            what: "IP",
            value: ip.to_string(),
            range: self.cidr.to_string(),
        })?;
        if !self.map.set(off) {
            return Err(AllocError::Allocated {
                what: "IP",
                value: ip.to_string(),
            });
        }
        Ok(())
    }

    pub fn allocate_next(&mut self) -> Result<Ipv4Addr, AllocError> {
        let len = self.map.len;
        let band = self.static_band();
        let off = self
            .map
            .find_free(band, len.saturating_sub(1), self.cursor)
            .or_else(|| self.map.find_free(1, band, 1))
            .ok_or_else(|| AllocError::Full {
                what: "IP",
                range: self.cidr.to_string(),
            })?;
        self.map.set(off);
        self.cursor = off + 1;
        Ok(Ipv4Addr::from(u32::from(self.cidr.network()) + off))
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        if let Some(off) = self.offset(ip) {
            self.map.clear(off);
        }
    }

    pub fn used(&self) -> u32 {
        self.map.used
    }
}

/// NodePorts of one protocol within the configured range.
#[derive(Clone, Debug)]
pub struct PortAllocator {
    lo: u16,
    hi: u16,
    map: Bitmap,
    cursor: u32,
}

impl PortAllocator {
    pub fn new(range: std::ops::RangeInclusive<u16>) -> Self {
        let (lo, hi) = (*range.start(), *range.end());
        let len = (hi as u32 + 1).saturating_sub(lo as u32);
        PortAllocator {
            lo,
            hi,
            map: Bitmap::new(len.max(1)),
            cursor: 0,
        }
    }

    fn range(&self) -> String {
        format!("{}-{}", self.lo, self.hi)
    }

    pub fn is_allocated(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port) && self.map.get((port - self.lo) as u32)
    }

    pub fn allocate(&mut self, port: u16) -> Result<(), AllocError> {
        if !(self.lo..=self.hi).contains(&port) {
            return Err(AllocError::OutOfRange {
                what: "port",
                value: port.to_string(),
                range: self.range(),
            });
        }
        if !self.map.set((port - self.lo) as u32) {
            return Err(AllocError::Allocated {
                what: "port",
                value: port.to_string(),
            });
        }
        Ok(())
    }

    pub fn allocate_next(&mut self) -> Result<u16, AllocError> {
        let len = self.map.len;
        let off = self
            .map
            .find_free(0, len, self.cursor)
            .ok_or_else(|| AllocError::Full {
                what: "port",
                range: self.range(),
            })?;
        self.map.set(off);
        self.cursor = off + 1;
        Ok(self.lo + off as u16)
    }

    pub fn release(&mut self, port: u16) {
        if (self.lo..=self.hi).contains(&port) {
            self.map.clear((port - self.lo) as u32);
        }
    }
}

/// Per-node pod subnets carved from the cluster CIDR. A node keeps its subnet
/// across deletion and re-registration through a reservation by name; reserved
/// subnets of departed nodes are reused only when no fresh subnet is left.
#[derive(Clone, Debug)]
pub struct SubnetAllocator {
    cluster: Ipv4Network,
    mask: u8,
    map: Bitmap,
    /// node name -> subnet index, for every node that ever held one (live or departed).
    reserved: BTreeMap<String, u32>,
    /// subnet index -> owner name, for reserved indexes.
    owners: BTreeMap<u32, String>,
    /// Names of nodes that currently exist.
    live: BTreeMap<String, u32>,
}

impl SubnetAllocator {
    pub fn new(cluster: Ipv4Network, mask: u8) -> Result<Self, String> {
        if mask < cluster.prefix() || mask > 30 {
            return Err(format!(
                "node CIDR mask /{mask} must be between the cluster CIDR's /{} and /30",
                cluster.prefix()
            ));
        }
        let count = 1u64 << (mask - cluster.prefix());
        if count > 1 << 20 {
            return Err(format!(
                "cluster CIDR {cluster} with /{mask} node subnets gives {count} subnets; at most 1048576 are supported"
            ));
        }
        Ok(SubnetAllocator {
            cluster,
            mask,
            map: Bitmap::new(count as u32),
            reserved: BTreeMap::new(),
            owners: BTreeMap::new(),
            live: BTreeMap::new(),
        })
    }

    pub fn cluster(&self) -> Ipv4Network {
        self.cluster
    }

    fn subnet(&self, idx: u32) -> Ipv4Network {
        let step = 1u32 << (32 - self.mask);
        let base = u32::from(self.cluster.network()) + idx * step;
        Ipv4Network::new(Ipv4Addr::from(base), self.mask).expect("mask checked in new")
    }

    fn index_of(&self, net: Ipv4Network) -> Option<u32> {
        if net.prefix() != self.mask || !self.cluster.contains(net.network()) {
            return None;
        }
        if net.network() != net.ip() {
            return None;
        }
        Some((u32::from(net.network()) - u32::from(self.cluster.network())) >> (32 - self.mask))
    }

    /// Record an existing reservation (from the store) for a node that may or may not exist.
    pub fn restore_reservation(&mut self, node: &str, net: Ipv4Network) {
        if let Some(idx) = self.index_of(net) {
            self.reserved.insert(node.to_string(), idx);
            self.owners.insert(idx, node.to_string());
        }
    }

    /// Mark `node` as live holding `net` (its stored spec.podCIDR, or a requested one).
    /// Returns the departed node whose reservation this displaced, if any.
    pub fn claim(&mut self, node: &str, net: Ipv4Network) -> Result<Option<String>, AllocError> {
        let idx = self.index_of(net).ok_or_else(|| AllocError::OutOfRange {
            what: "pod CIDR",
            value: net.to_string(),
            range: format!("/{} subnets of {}", self.mask, self.cluster),
        })?;
        if self.map.get(idx) && self.live.get(node) != Some(&idx) {
            return Err(AllocError::Allocated {
                what: "pod CIDR",
                value: net.to_string(),
            });
        }
        let mut displaced = None;
        if let Some(owner) = self.owners.get(&idx).cloned() {
            if owner != node {
                self.reserved.remove(&owner);
                displaced = Some(owner);
            }
        }
        if let Some(prev) = self.reserved.insert(node.to_string(), idx) {
            if prev != idx {
                self.owners.remove(&prev);
            }
        }
        self.map.set(idx);
        self.live.insert(node.to_string(), idx);
        self.owners.insert(idx, node.to_string());
        Ok(displaced)
    }

    /// A subnet for `node`: its reservation if it has one, else a fresh one,
    /// else the reservation of a departed node.
    /// Also returns the departed node whose reservation was taken over, if any.
    pub fn allocate(&mut self, node: &str) -> Result<(Ipv4Network, Option<String>), AllocError> {
        if let Some(&idx) = self.live.get(node) {
            return Ok((self.subnet(idx), None));
        }
        let idx = match self.reserved.get(node) {
            Some(&idx) if !self.map.get(idx) => idx,
            _ => {
                let fresh =
                    (0..self.map.len).find(|i| !self.map.get(*i) && !self.owners.contains_key(i));
                match fresh {
                    Some(i) => i,
                    None => (0..self.map.len)
                        .find(|i| !self.map.get(*i))
                        .ok_or_else(|| AllocError::Full {
                            what: "pod CIDR",
                            range: format!(
                                "cluster CIDR {} (all {} /{} subnets are assigned to nodes)",
                                self.cluster, self.map.len, self.mask
                            ),
                        })?,
                }
            }
        };
        let net = self.subnet(idx);
        let displaced = self.claim(node, net)?;
        Ok((net, displaced))
    }

    /// The node is gone; its subnet stays reserved for it until needed elsewhere.
    pub fn release(&mut self, node: &str) {
        if let Some(idx) = self.live.remove(node) {
            self.map.clear(idx);
        }
    }

    /// The reservation of `node`, if any.
    pub fn reservation(&self, node: &str) -> Option<Ipv4Network> {
        self.reserved.get(node).map(|&i| self.subnet(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ips_requested_dynamic_release() {
        let mut a = IpAllocator::new("198.19.0.0/24".parse().unwrap());
        // requested IP honoured, conflicts rejected
        a.allocate("198.19.0.10".parse().unwrap()).unwrap();
        assert!(matches!(
            a.allocate("198.19.0.10".parse().unwrap()),
            Err(AllocError::Allocated { .. })
        ));
        // network/broadcast/outside are out of range
        for bad in ["198.19.0.0", "198.19.0.255", "198.19.1.1"] {
            assert!(matches!(
                a.allocate(bad.parse().unwrap()),
                Err(AllocError::OutOfRange { .. })
            ));
        }
        // dynamic allocation avoids the static band (first 16 of a /24)
        let ip = a.allocate_next().unwrap();
        assert!(u32::from(ip) & 0xff >= 16, "{ip}");
        // all 254 usable addresses (.1 to .254) can be taken exactly once
        let mut seen = std::collections::HashSet::from([ip, "198.19.0.10".parse().unwrap()]);
        while let Ok(ip) = a.allocate_next() {
            assert!(seen.insert(ip), "{ip} handed out twice");
        }
        assert_eq!(seen.len(), 254);
        assert_eq!(a.used(), 254);
        // a released IP is free again, and only once
        a.release("198.19.0.10".parse().unwrap());
        assert_eq!(
            a.allocate_next().unwrap(),
            "198.19.0.10".parse::<Ipv4Addr>().unwrap()
        );
        assert!(a.allocate_next().is_err());
    }

    #[test]
    fn dynamic_does_not_reuse_right_after_release() {
        let mut a = IpAllocator::new("198.19.0.0/16".parse().unwrap());
        let first = a.allocate_next().unwrap();
        a.release(first);
        let second = a.allocate_next().unwrap();
        assert_ne!(first, second);
    }

    #[test]
    fn node_ports_per_protocol_range() {
        let mut tcp = PortAllocator::new(30000..=30002);
        tcp.allocate(30001).unwrap();
        assert!(matches!(
            tcp.allocate(30001),
            Err(AllocError::Allocated { .. })
        ));
        assert!(matches!(
            tcp.allocate(29999),
            Err(AllocError::OutOfRange { .. })
        ));
        let a = tcp.allocate_next().unwrap();
        let b = tcp.allocate_next().unwrap();
        assert_eq!([a, b], [30000, 30002]);
        assert!(matches!(tcp.allocate_next(), Err(AllocError::Full { .. })));
        tcp.release(30001);
        assert_eq!(tcp.allocate_next().unwrap(), 30001);
    }

    #[test]
    fn subnets_are_stable_per_node_and_exhaust_clearly() {
        let mut s = SubnetAllocator::new("198.18.128.0/22".parse().unwrap(), 24).unwrap();
        let n1 = s.allocate("n1").unwrap().0;
        let n2 = s.allocate("n2").unwrap().0;
        assert_ne!(n1, n2);
        assert_eq!(
            s.allocate("n1").unwrap().0,
            n1,
            "idempotent for a live node"
        );
        s.release("n1");
        let n3 = s.allocate("n3").unwrap().0;
        assert_ne!(
            n3, n1,
            "a departed node's subnet is not reused while fresh ones exist"
        );
        assert_eq!(
            s.allocate("n1").unwrap().0,
            n1,
            "re-registration keeps the subnet"
        );
        let n4 = s.allocate("n4").unwrap().0;
        let err = s.allocate("n5").unwrap_err();
        assert!(err.to_string().contains("all 4 /24 subnets"), "{err}");
        // a departed node's reservation is reused only on exhaustion
        s.release("n4");
        assert_eq!(s.allocate("n5").unwrap(), (n4, Some("n4".to_string())));
        assert_eq!(s.reservation("n4"), None);
        // requested subnet conflicts
        assert!(matches!(
            s.claim("n6", n2),
            Err(AllocError::Allocated { .. })
        ));
        assert!(matches!(
            s.claim("n6", "198.18.200.0/24".parse().unwrap()),
            Err(AllocError::OutOfRange { .. })
        ));
    }
}
