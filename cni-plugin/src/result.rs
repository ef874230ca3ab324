//! The ADD result, rendered in the shape of the negotiated CNI version, and
//! the parts of a `prevResult` that CHECK needs. Pure.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::config::CniVersion;
use crate::node_state::Dns;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    pub mtu: Option<u32>,
    /// Set for the container-side interface (the netns path).
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// Address with the subnet's prefix length.
    pub address: Ipv4Network,
    pub gateway: Option<Ipv4Addr>,
    /// Index into `interfaces`.
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Network,
    pub gw: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

impl CniResult {
    /// The result JSON for `version`: 0.3.x/0.4.0 carry `"version":"4"` in
    /// each IP; 1.1.0 adds the interface MTU.
    pub fn render(&self, version: CniVersion) -> Value {
        let legacy = version < CniVersion::V100;
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut o = Map::new();
                o.insert("name".into(), json!(i.name));
                o.insert("mac".into(), json!(i.mac));
                if let (Some(mtu), true) = (i.mtu, version >= CniVersion::V110) {
                    o.insert("mtu".into(), json!(mtu));
                }
                if let Some(s) = &i.sandbox {
                    o.insert("sandbox".into(), json!(s));
                }
                Value::Object(o)
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut o = Map::new();
                if legacy {
                    o.insert("version".into(), json!("4"));
                }
                o.insert("address".into(), json!(ip.address.to_string()));
                if let Some(gw) = ip.gateway {
                    o.insert("gateway".into(), json!(gw.to_string()));
                }
                if let Some(i) = ip.interface {
                    o.insert("interface".into(), json!(i));
                }
                Value::Object(o)
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut o = Map::new();
                o.insert("dst".into(), json!(r.dst.to_string()));
                if let Some(gw) = r.gw {
                    o.insert("gw".into(), json!(gw.to_string()));
                }
                Value::Object(o)
            })
            .collect();
        let mut out = Map::new();
        out.insert("cniVersion".into(), json!(version.as_str()));
        out.insert("interfaces".into(), Value::Array(interfaces));
        out.insert("ips".into(), Value::Array(ips));
        out.insert("routes".into(), Value::Array(routes));
        out.insert(
            "dns".into(),
            serde_json::to_value(&self.dns).unwrap_or_else(|_| json!({})),
        );
        Value::Object(out)
    }
}

/// The fields of a previous result this plugin inspects (any version).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PrevResult {
    #[serde(default)]
    pub interfaces: Vec<PrevInterface>,
    #[serde(default)]
    pub ips: Vec<PrevIp>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PrevInterface {
    pub name: String,
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PrevIp {
    pub address: String,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub interface: Option<usize>,
}

impl PrevResult {
    /// The IPv4 address assigned to the sandbox interface `ifname`.
    pub fn container_ip(&self, ifname: &str) -> Option<Ipv4Network> {
        self.ips
            .iter()
            .filter(
                |ip| match ip.interface.and_then(|i| self.interfaces.get(i)) {
                    Some(iface) => iface.name == ifname && iface.sandbox.is_some(),
                    None => true,
                },
            )
            .find_map(|ip| ip.address.parse::<Ipv4Network>().ok())
    }
}

pub fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "weft1a2b3c4d".into(),
                    mac: "fe:01:02:03:04:05".into(),
                    mtu: Some(1450),
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: "0a:58:c6:12:80:05".into(),
                    mtu: Some(1450),
                    sandbox: Some("/run/netns/p1".into()),
                },
            ],
            ips: vec![IpConfig {
                address: "198.18.128.5/24".parse().unwrap(),
                gateway: Some(Ipv4Addr::new(198, 18, 128, 1)),
                interface: Some(1),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some(Ipv4Addr::new(198, 18, 128, 1)),
            }],
            dns: Dns {
                nameservers: vec!["198.19.0.10".into()],
                domain: None,
                search: vec!["svc.cluster.local".into(), "cluster.local".into()],
                options: vec!["ndots:5".into()],
            },
        }
    }

    #[test]
    fn v110_shape() {
        let v = sample().render(CniVersion::V110);
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["interfaces"][0]["mtu"], 1450);
        assert!(v["interfaces"][0].get("sandbox").is_none());
        assert_eq!(v["interfaces"][1]["sandbox"], "/run/netns/p1");
        assert_eq!(v["ips"][0]["address"], "198.18.128.5/24");
        assert_eq!(v["ips"][0]["gateway"], "198.18.128.1");
        assert_eq!(v["ips"][0]["interface"], 1);
        assert!(v["ips"][0].get("version").is_none());
        assert_eq!(v["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(v["routes"][0]["gw"], "198.18.128.1");
        assert_eq!(v["dns"]["nameservers"][0], "198.19.0.10");
        assert_eq!(v["dns"]["options"][0], "ndots:5");
        assert!(v["dns"].get("domain").is_none());
    }

    #[test]
    fn v100_has_no_interface_mtu() {
        let v = sample().render(CniVersion::V100);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert!(v["interfaces"][0].get("mtu").is_none());
        assert!(v["ips"][0].get("version").is_none());
    }

    #[test]
    fn legacy_versions_carry_ip_version() {
        for ver in [CniVersion::V030, CniVersion::V031, CniVersion::V040] {
            let v = sample().render(ver);
            assert_eq!(v["cniVersion"], ver.as_str());
            assert_eq!(v["ips"][0]["version"], "4");
            assert!(v["interfaces"][1].get("mtu").is_none());
        }
    }

    #[test]
    fn prev_result_round_trip_finds_container_ip() {
        for ver in CniVersion::SUPPORTED {
            let prev: PrevResult = serde_json::from_value(sample().render(ver)).unwrap();
            assert_eq!(
                prev.container_ip("eth0").unwrap().to_string(),
                "198.18.128.5/24"
            );
            assert!(prev.container_ip("net1").is_none());
        }
    }

    #[test]
    fn mac_formatting() {
        assert_eq!(
            mac_string(&[0x0a, 0x58, 0, 1, 0xff, 0x10]),
            "0a:58:00:01:ff:10"
        );
    }
}
