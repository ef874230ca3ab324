//! The plugin's error type and its mapping onto CNI error codes and the
//! error JSON printed on stdout.

use std::io;

use serde::Serialize;

/// Well-known CNI error codes (spec "Error codes") plus weft's own (100+).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const CONTAINER_UNKNOWN: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// A kernel (netlink, sysctl, netns) operation failed.
    pub const KERNEL: u32 = 100;
    /// The node subnet has no free address.
    pub const IPAM_EXHAUSTED: u32 = 101;
    /// CHECK found the attachment different from what ADD set up.
    pub const CHECK_MISMATCH: u32 = 102;
}

/// Everything that can go wrong in one plugin invocation.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("incompatible CNI version {version:?}")]
    IncompatibleVersion { version: String, reason: String },

    #[error("unsupported field in network configuration: {field}={value}")]
    UnsupportedField { field: String, value: String },

    #[error("container unknown or does not exist: {what}")]
    ContainerUnknown {
        what: String,
        #[source]
        source: Option<io::Error>,
    },

    #[error("invalid environment variables: {}", .problems.join("; "))]
    InvalidEnv { problems: Vec<String> },

    #[error("I/O failure: {what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },

    #[error("failed to decode {what}")]
    Decode {
        what: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("invalid network configuration: {field}={value:?}: {reason}")]
    InvalidConfig {
        field: String,
        value: String,
        reason: String,
    },

    #[error("try again later: {what}")]
    TryAgainLater {
        what: String,
        #[source]
        source: Option<io::Error>,
    },

    #[error("plugin not available: {what}")]
    NotAvailable { what: String },

    #[error("{op} failed")]
    Kernel {
        op: String,
        #[source]
        source: io::Error,
    },

    #[error("no free address in subnet {subnet}")]
    IpamExhausted { subnet: String },

    #[error("check failed: {what}")]
    CheckMismatch { what: String },
}

impl CniError {
    pub fn code(&self) -> u32 {
        match self {
            CniError::IncompatibleVersion { .. } => code::INCOMPATIBLE_VERSION,
            CniError::UnsupportedField { .. } => code::UNSUPPORTED_FIELD,
            CniError::ContainerUnknown { .. } => code::CONTAINER_UNKNOWN,
            CniError::InvalidEnv { .. } => code::INVALID_ENV,
            CniError::Io { .. } => code::IO_FAILURE,
            CniError::Decode { .. } => code::DECODE,
            CniError::InvalidConfig { .. } => code::INVALID_CONFIG,
            CniError::TryAgainLater { .. } => code::TRY_AGAIN_LATER,
            CniError::NotAvailable { .. } => code::NOT_AVAILABLE,
            CniError::Kernel { .. } => code::KERNEL,
            CniError::IpamExhausted { .. } => code::IPAM_EXHAUSTED,
            CniError::CheckMismatch { .. } => code::CHECK_MISMATCH,
        }
    }

    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        CniError::Io {
            what: what.into(),
            source,
        }
    }

    pub fn kernel(op: impl Into<String>, source: io::Error) -> Self {
        CniError::Kernel {
            op: op.into(),
            source,
        }
    }

    pub fn config(
        field: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        CniError::InvalidConfig {
            field: field.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }

    /// The whole cause chain, for the error JSON's `details`.
    pub fn details(&self) -> String {
        let mut out = self.to_string();
        if let CniError::IncompatibleVersion { reason, .. } = self {
            out.push_str(": ");
            out.push_str(reason);
        }
        let mut src = std::error::Error::source(self);
        while let Some(e) = src {
            out.push_str(": ");
            out.push_str(&e.to_string());
            src = e.source();
        }
        out
    }

    /// The JSON object the spec prescribes for errors.
    pub fn to_json(&self, cni_version: &str) -> ErrorJson {
        ErrorJson {
            cni_version: cni_version.to_string(),
            code: self.code(),
            msg: self.to_string(),
            details: self.details(),
        }
    }
}

/// `{"cniVersion", "code", "msg", "details"}` printed on stdout on failure.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct ErrorJson {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub details: String,
}

pub type Result<T, E = CniError> = std::result::Result<T, E>;

/// `err: source: source…` for any error, for messages that embed a cause.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_spec_table() {
        let e = CniError::InvalidEnv {
            problems: vec!["CNI_IFNAME missing".into(), "CNI_NETNS missing".into()],
        };
        assert_eq!(e.code(), 4);
        let j = e.to_json("1.1.0");
        assert!(j.msg.contains("CNI_IFNAME") && j.msg.contains("CNI_NETNS"));
        assert_eq!(CniError::NotAvailable { what: "x".into() }.code(), 50);
        assert_eq!(
            CniError::TryAgainLater {
                what: "x".into(),
                source: None
            }
            .code(),
            11
        );
    }

    #[test]
    fn details_carry_the_source_chain() {
        let e = CniError::kernel(
            "create veth weft0123",
            io::Error::from_raw_os_error(libc::EEXIST),
        );
        assert_eq!(e.code(), code::KERNEL);
        assert!(e
            .details()
            .contains("create veth weft0123 failed: File exists"));
    }
}
