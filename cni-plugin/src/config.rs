//! The network configuration read from stdin: parsing, version negotiation
//! and validation. Unknown fields are allowed (the runtime adds its own).

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use crate::error::{CniError, Result};

/// Result/protocol versions this plugin speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CniVersion {
    V030,
    V031,
    V040,
    V100,
    V110,
}

impl CniVersion {
    pub const SUPPORTED: [CniVersion; 5] = [
        CniVersion::V030,
        CniVersion::V031,
        CniVersion::V040,
        CniVersion::V100,
        CniVersion::V110,
    ];
    pub const LATEST: CniVersion = CniVersion::V110;

    pub fn parse(s: &str) -> Option<CniVersion> {
        Self::SUPPORTED.into_iter().find(|v| v.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V030 => "0.3.0",
            CniVersion::V031 => "0.3.1",
            CniVersion::V040 => "0.4.0",
            CniVersion::V100 => "1.0.0",
            CniVersion::V110 => "1.1.0",
        }
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub const DEFAULT_NODE_STATE_PATH: &str = "/run/weft/node.json";
pub const DEFAULT_IPAM_BASE: &str = "/var/lib/weft/ipam";
pub const DEFAULT_AGENT_SOCKET: &str = "/run/weft/agent.sock";

/// One `{containerID, ifname}` pair from GC's valid-attachments list.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Deserialize)]
struct RawConf {
    #[serde(rename = "cniVersion")]
    cni_version: Option<String>,
    #[serde(rename = "cniVersions", default)]
    cni_versions: Option<Vec<String>>,
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(rename = "nodeStatePath")]
    node_state_path: Option<String>,
    #[serde(rename = "ipamDir")]
    ipam_dir: Option<String>,
    #[serde(rename = "agentSocket")]
    agent_socket: Option<String>,
    #[serde(rename = "ipamFsync", default)]
    ipam_fsync: bool,
    #[serde(rename = "prevResult")]
    prev_result: Option<serde_json::Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
    #[serde(rename = "cni.dev/attachments")]
    legacy_attachments: Option<Vec<Attachment>>,
    dns: Option<crate::node_state::Dns>,
    #[serde(rename = "runtimeConfig")]
    runtime_config: Option<serde_json::Value>,
}

/// A validated network configuration.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: CniVersion,
    pub name: String,
    pub node_state_path: PathBuf,
    /// The IPAM directory of this network: `<ipamDir or default>/<name>`.
    pub ipam_dir: PathBuf,
    pub agent_socket: PathBuf,
    /// fsync IPAM claims (see `ipam` module docs); off by default.
    pub ipam_fsync: bool,
    pub prev_result: Option<serde_json::Value>,
    /// GC's keep-list: union of `cni.dev/valid-attachments` and the legacy
    /// `cni.dev/attachments`; `None` when neither was given.
    pub valid_attachments: Option<Vec<Attachment>>,
    /// `dns` from the config, used when the node state has none.
    pub dns: Option<crate::node_state::Dns>,
    /// `runtimeConfig` as given: the capabilities' arguments are validated
    /// by the verbs that use them ([`NetConf::port_mappings`]), so a bad
    /// `portMappings` fails ADD but never DEL, which must always clean up.
    pub runtime_config: Option<serde_json::Value>,
}

/// Best effort: the `cniVersion` to stamp on an error, even for bad input.
pub fn error_version(stdin: &[u8]) -> String {
    #[derive(Deserialize)]
    struct V {
        #[serde(rename = "cniVersion")]
        v: Option<String>,
    }
    serde_json::from_slice::<V>(stdin)
        .ok()
        .and_then(|v| v.v)
        .filter(|v| CniVersion::parse(v).is_some())
        .unwrap_or_else(|| CniVersion::LATEST.as_str().to_string())
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<NetConf> {
        let raw: RawConf = serde_json::from_slice(stdin).map_err(|source| CniError::Decode {
            what: "network configuration from stdin".into(),
            source,
        })?;
        let version = raw
            .cni_version
            .ok_or_else(|| CniError::config("cniVersion", "", "is required"))?;
        let cni_version =
            CniVersion::parse(&version).ok_or_else(|| CniError::IncompatibleVersion {
                version: version.clone(),
                reason: format!(
                    "supported versions are {}",
                    CniVersion::SUPPORTED.map(|v| v.as_str()).join(", ")
                ),
            })?;
        if let Some(list) = &raw.cni_versions {
            if list.iter().all(|v| CniVersion::parse(v).is_none()) && !list.is_empty() {
                return Err(CniError::IncompatibleVersion {
                    version: list.join(","),
                    reason: "none of cniVersions is supported".into(),
                });
            }
        }
        let name = raw
            .name
            .ok_or_else(|| CniError::config("name", "", "is required"))?;
        validate_name(&name).map_err(|why| CniError::config("name", &name, why))?;
        if let Some(kind) = &raw.kind {
            if kind.is_empty() || kind.contains('/') || kind.contains('\\') {
                return Err(CniError::config(
                    "type",
                    kind,
                    "must be a file name without path separators",
                ));
            }
        }
        let node_state_path = abs_path(
            "nodeStatePath",
            raw.node_state_path,
            DEFAULT_NODE_STATE_PATH,
        )?;
        let ipam_base = abs_path("ipamDir", raw.ipam_dir, DEFAULT_IPAM_BASE)?;
        let agent_socket = abs_path("agentSocket", raw.agent_socket, DEFAULT_AGENT_SOCKET)?;
        let valid_attachments = match (raw.valid_attachments, raw.legacy_attachments) {
            (None, None) => None,
            (a, b) => {
                let mut all: Vec<Attachment> = a.into_iter().chain(b).flatten().collect();
                all.sort();
                all.dedup();
                Some(all)
            }
        };
        Ok(NetConf {
            cni_version,
            ipam_dir: ipam_base.join(&name),
            name,
            node_state_path,
            agent_socket,
            ipam_fsync: raw.ipam_fsync,
            prev_result: raw.prev_result,
            valid_attachments,
            dns: raw.dns,
            runtime_config: raw.runtime_config,
        })
    }

    /// The validated `runtimeConfig.portMappings` (hostPorts); code 7 naming
    /// the entry, field and value when one is invalid.
    pub fn port_mappings(&self) -> Result<Vec<weft_model::node_state::PortMapping>> {
        crate::portmap::parse(self.runtime_config.as_ref())
    }
}

/// Network names: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`, never `.`/`..`-like path
/// tricks since the name becomes a directory.
pub fn validate_name(name: &str) -> std::result::Result<(), &'static str> {
    crate::env::validate_container_id(name)
}

fn abs_path(field: &str, value: Option<String>, default: &str) -> Result<PathBuf> {
    match value {
        None => Ok(PathBuf::from(default)),
        Some(v) if v.starts_with('/') && !v.contains('\0') => Ok(PathBuf::from(v)),
        Some(v) => Err(CniError::config(field, v, "must be an absolute path")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(json: &str) -> Result<NetConf> {
        NetConf::parse(json.as_bytes())
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = conf(r#"{"cniVersion":"1.1.0","name":"weft","type":"weft-cni","extra":{"x":1}}"#)
            .unwrap();
        assert_eq!(c.cni_version, CniVersion::V110);
        assert_eq!(c.ipam_dir, PathBuf::from("/var/lib/weft/ipam/weft"));
        assert_eq!(c.node_state_path, PathBuf::from(DEFAULT_NODE_STATE_PATH));
        assert!(c.valid_attachments.is_none());
    }

    #[test]
    fn versions() {
        for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
            let c = conf(&format!(r#"{{"cniVersion":"{v}","name":"n"}}"#)).unwrap();
            assert_eq!(c.cni_version.as_str(), v);
        }
        for v in ["0.2.0", "0.1.0", "2.0.0", "1.1"] {
            let e = conf(&format!(r#"{{"cniVersion":"{v}","name":"n"}}"#)).unwrap_err();
            assert_eq!(e.code(), 1, "{v}");
        }
        assert_eq!(conf(r#"{"name":"n"}"#).unwrap_err().code(), 7);
    }

    #[test]
    fn bad_input_codes() {
        assert_eq!(conf("{not json").unwrap_err().code(), 6);
        assert_eq!(conf("").unwrap_err().code(), 6);
        let e = conf(r#"{"cniVersion":"1.1.0","name":"../etc"}"#).unwrap_err();
        assert_eq!(e.code(), 7);
        assert!(e.to_string().contains("name"));
        let e = conf(r#"{"cniVersion":"1.1.0","name":"a/b"}"#).unwrap_err();
        assert_eq!(e.code(), 7);
        let e = conf(r#"{"cniVersion":"1.1.0","name":"n","type":"../x"}"#).unwrap_err();
        assert_eq!(e.code(), 7);
        let e = conf(r#"{"cniVersion":"1.1.0","name":"n","ipamDir":"rel/dir"}"#).unwrap_err();
        assert!(e.to_string().contains("ipamDir"));
        // Wrong JSON types are decode errors naming the field.
        let e = conf(r#"{"cniVersion":"1.1.0","name":"n","ipamDir":5}"#).unwrap_err();
        assert_eq!(e.code(), 6);
    }

    #[test]
    fn gc_attachments_merge_legacy_key() {
        let c = conf(
            r#"{"cniVersion":"1.1.0","name":"n",
                "cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}],
                "cni.dev/attachments":[{"containerID":"b","ifname":"eth0"},{"containerID":"a","ifname":"eth0"}]}"#,
        )
        .unwrap();
        let v = c.valid_attachments.unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].container_id, "b");
    }

    #[test]
    fn runtime_config_is_kept_and_validated_on_demand() {
        let c = conf(
            r#"{"cniVersion":"1.1.0","name":"n",
                "runtimeConfig":{"portMappings":[{"hostPort":70000,"containerPort":80}]}}"#,
        )
        .unwrap();
        let e = c.port_mappings().unwrap_err();
        assert_eq!(e.code(), 7);
        assert!(e
            .to_string()
            .contains("runtimeConfig.portMappings[0].hostPort"));
        let c = conf(r#"{"cniVersion":"1.1.0","name":"n"}"#).unwrap();
        assert!(c.port_mappings().unwrap().is_empty());
    }

    #[test]
    fn error_version_falls_back_to_latest() {
        assert_eq!(error_version(br#"{"cniVersion":"0.4.0"}"#), "0.4.0");
        assert_eq!(error_version(br#"{"cniVersion":"9.9"}"#), "1.1.0");
        assert_eq!(error_version(b"garbage"), "1.1.0");
    }
}
