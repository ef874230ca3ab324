//! `runtimeConfig.portMappings`, the CNI `portMappings` capability (hostPorts):
//! parsing and validation. The plugin only records the mappings in the
//! pod's IPAM claim; the agent programs them (docs/cni.md).
//!
//! Runtimes differ in the keys they send: podman and the CNI conventions use
//! `hostPort`/`containerPort`/`protocol`/`hostIP`, containerd's CRI sends
//! `HostPort`/`ContainerPort`/`Protocol`/`HostIP`. Keys are matched as Go's
//! `encoding/json` (and so the reference `portmap` plugin) matches them:
//! exactly if possible, otherwise ignoring ASCII case.

use std::collections::HashSet;
use std::net::IpAddr;

use serde_json::{Map, Value};
use weft_model::node_state::PortMapping;
use weft_model::view::Protocol;

use crate::error::{CniError, Result};

const FIELD: &str = "runtimeConfig.portMappings";

/// The validated mappings of `runtimeConfig` (absent or `null` → none), in
/// the order given. Every entry is checked before anything is returned, so
/// an ADD with one bad entry changes nothing.
pub fn parse(runtime_config: Option<&Value>) -> Result<Vec<PortMapping>> {
    let list = match runtime_config {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(rc)) => match rc.get("portMappings") {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(list)) => list,
            Some(other) => return Err(invalid(FIELD, other, "must be a list")),
        },
        Some(other) => return Err(invalid("runtimeConfig", other, "must be an object")),
    };
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let at = format!("{FIELD}[{i}]");
        let Value::Object(entry) = entry else {
            return Err(invalid(&at, entry, "must be an object"));
        };
        let m = PortMapping {
            host_port: port(entry, &at, "hostPort")?,
            container_port: port(entry, &at, "containerPort")?,
            protocol: protocol(entry, &at)?,
            host_ip: host_ip(entry, &at)?,
        };
        if !seen.insert((m.host_ip, m.host_port, m.protocol)) {
            let value = get(entry, "hostPort").cloned().unwrap_or(Value::Null);
            return Err(invalid(
                &format!("{at}.hostPort"),
                &value,
                format!(
                    "duplicates an earlier mapping of {} port {} on {}",
                    m.protocol.as_str().to_ascii_lowercase(),
                    m.host_port,
                    m.host_ip
                        .map_or_else(|| "every address".to_string(), |ip| ip.to_string())
                ),
            ));
        }
        out.push(m);
    }
    Ok(out)
}

/// `key`, or else the first key equal to it ignoring ASCII case.
fn get<'a>(entry: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    entry.get(key).or_else(|| {
        entry
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

fn invalid(field: &str, value: &Value, reason: impl Into<String>) -> CniError {
    CniError::config(field, value.to_string(), reason)
}

fn port(entry: &Map<String, Value>, at: &str, key: &str) -> Result<u16> {
    let field = format!("{at}.{key}");
    match get(entry, key) {
        None | Some(Value::Null) => Err(invalid(&field, &Value::Null, "is required")),
        Some(v) => v
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n != 0)
            .ok_or_else(|| invalid(&field, v, "is not a valid port (1-65535)")),
    }
}

fn protocol(entry: &Map<String, Value>, at: &str) -> Result<Protocol> {
    let bad = |v: &Value| invalid(&format!("{at}.protocol"), v, "must be tcp, udp or sctp");
    match get(entry, "protocol") {
        None | Some(Value::Null) => Ok(Protocol::TCP),
        Some(Value::String(s)) if s.is_empty() => Ok(Protocol::TCP),
        Some(v @ Value::String(s)) => {
            Protocol::parse(&s.to_ascii_uppercase()).ok_or_else(|| bad(v))
        }
        Some(v) => Err(bad(v)),
    }
}

/// Empty, `0.0.0.0` and `::` all mean every local address.
fn host_ip(entry: &Map<String, Value>, at: &str) -> Result<Option<IpAddr>> {
    let bad = |v: &Value| {
        invalid(
            &format!("{at}.hostIP"),
            v,
            "must be empty or an IPv4 or IPv6 address",
        )
    };
    match get(entry, "hostIP") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(v @ Value::String(s)) => s
            .parse::<IpAddr>()
            .map(|ip| Some(ip).filter(|ip| !ip.is_unspecified()))
            .map_err(|_| bad(v)),
        Some(v) => Err(bad(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_json(v: Value) -> Result<Vec<PortMapping>> {
        parse(Some(&v))
    }

    fn err(v: Value) -> (u32, String) {
        let e = parse_json(v).unwrap_err();
        (e.code(), e.to_string())
    }

    #[test]
    fn absent_or_null_is_none() {
        assert!(parse(None).unwrap().is_empty());
        assert!(parse_json(Value::Null).unwrap().is_empty());
        assert!(parse_json(json!({})).unwrap().is_empty());
        assert!(parse_json(json!({"portMappings": null, "aliases": ["x"]}))
            .unwrap()
            .is_empty());
        assert!(parse_json(json!({"portMappings": []})).unwrap().is_empty());
    }

    #[test]
    fn podman_and_containerd_shapes() {
        // podman / the CNI conventions: camelCase keys.
        let got = parse_json(json!({"portMappings": [
            {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""},
            {"hostPort": 5353, "containerPort": 53, "protocol": "UDP", "hostIP": "198.18.0.11"},
            {"hostPort": 9000, "containerPort": 9000, "protocol": "Sctp"},
            {"hostPort": 8443, "containerPort": 443, "hostIP": "0.0.0.0"},
            {"hostPort": 8444, "containerPort": 444, "hostIP": "fd00::11", "extra": true}
        ]}))
        .unwrap();
        let m = |protocol, host_port, container_port, host_ip: Option<&str>| PortMapping {
            protocol,
            host_port,
            container_port,
            host_ip: host_ip.map(|ip| ip.parse().unwrap()),
        };
        assert_eq!(
            got,
            vec![
                m(Protocol::TCP, 8080, 80, None),
                m(Protocol::UDP, 5353, 53, Some("198.18.0.11")),
                m(Protocol::SCTP, 9000, 9000, None),
                m(Protocol::TCP, 8443, 443, None),
                m(Protocol::TCP, 8444, 444, Some("fd00::11")),
            ]
        );
        // containerd's CRI: Go field names, no JSON tags.
        let got = parse_json(json!({"portMappings": [
            {"HostPort": 8080, "ContainerPort": 80, "Protocol": "tcp", "HostIP": ""}
        ]}))
        .unwrap();
        assert_eq!(got, vec![m(Protocol::TCP, 8080, 80, None)]);
    }

    #[test]
    fn bad_entries_name_the_field_and_value() {
        let (code, msg) = err(json!({"portMappings": [
            {"hostPort": 8080, "containerPort": 80},
            {"hostPort": 70000, "containerPort": 80}
        ]}));
        assert_eq!(code, 7);
        assert!(
            msg.contains("runtimeConfig.portMappings[1].hostPort=\"70000\"")
                && msg.contains("is not a valid port"),
            "{msg}"
        );
        for (entry, field, value) in [
            (
                json!({"hostPort": 0, "containerPort": 80}),
                "[0].hostPort",
                "0",
            ),
            (
                json!({"hostPort": -1, "containerPort": 80}),
                "[0].hostPort",
                "-1",
            ),
            (
                json!({"hostPort": 80.5, "containerPort": 80}),
                "[0].hostPort",
                "80.5",
            ),
            (
                json!({"hostPort": "8080", "containerPort": 80}),
                "[0].hostPort",
                "\\\"8080\\\"",
            ),
            (json!({"containerPort": 80}), "[0].hostPort", "null"),
            (
                json!({"hostPort": 80, "containerPort": 65536}),
                "[0].containerPort",
                "65536",
            ),
            (json!({"hostPort": 80}), "[0].containerPort", "null"),
            (
                json!({"hostPort": 80, "containerPort": 80, "protocol": "icmp"}),
                "[0].protocol",
                "\\\"icmp\\\"",
            ),
            (
                json!({"hostPort": 80, "containerPort": 80, "protocol": 6}),
                "[0].protocol",
                "6",
            ),
            (
                json!({"hostPort": 80, "containerPort": 80, "hostIP": "198.18.0"}),
                "[0].hostIP",
                "\\\"198.18.0\\\"",
            ),
            (
                json!({"hostPort": 80, "containerPort": 80, "hostIP": "198.18.0.11/32"}),
                "[0].hostIP",
                "\\\"198.18.0.11/32\\\"",
            ),
        ] {
            let (code, msg) = err(json!({"portMappings": [entry]}));
            assert_eq!(code, 7, "{msg}");
            let want = format!("runtimeConfig.portMappings{field}=\"{value}\"");
            assert!(msg.contains(&want), "{msg} does not contain {want}");
        }
        let (_, msg) = err(json!({"portMappings": [8080]}));
        assert!(
            msg.contains("runtimeConfig.portMappings[0]=\"8080\": must be an object"),
            "{msg}"
        );
        let (_, msg) = err(json!({"portMappings": {"hostPort": 1}}));
        assert!(
            msg.contains("runtimeConfig.portMappings=") && msg.contains("must be a list"),
            "{msg}"
        );
        let (_, msg) = err(json!("x"));
        assert!(
            msg.contains("runtimeConfig=") && msg.contains("must be an object"),
            "{msg}"
        );
    }

    #[test]
    fn duplicates_are_refused_by_host_ip_port_and_protocol() {
        let (code, msg) = err(json!({"portMappings": [
            {"hostPort": 8080, "containerPort": 80},
            {"hostPort": 8080, "containerPort": 81, "protocol": "TCP", "hostIP": "0.0.0.0"}
        ]}));
        assert_eq!(code, 7);
        assert!(
            msg.contains("runtimeConfig.portMappings[1].hostPort=\"8080\"")
                && msg.contains("duplicates an earlier mapping of tcp port 8080 on every address"),
            "{msg}"
        );
        // Same port on another protocol or another address is fine.
        let ok = parse_json(json!({"portMappings": [
            {"hostPort": 8080, "containerPort": 80},
            {"hostPort": 8080, "containerPort": 80, "protocol": "udp"},
            {"hostPort": 8080, "containerPort": 81, "hostIP": "198.18.0.11"},
            {"hostPort": 8080, "containerPort": 82, "hostIP": "198.18.0.12"}
        ]}))
        .unwrap();
        assert_eq!(ok.len(), 4);
        let (_, msg) = err(json!({"portMappings": [
            {"hostPort": 53, "containerPort": 53, "protocol": "udp", "hostIP": "198.18.0.11"},
            {"hostPort": 53, "containerPort": 5353, "protocol": "UDP", "hostIP": "198.18.0.11"}
        ]}));
        assert!(
            msg.contains("[1].hostPort") && msg.contains("udp port 53 on 198.18.0.11"),
            "{msg}"
        );
    }
}
