//! Validation mirroring Kubernetes' rules for the fields weft uses. Errors
//! carry the failing field path and render as the API server does:
//! `spec.ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive`.

use crate::objects::Object;
use ipnetwork::IpNetwork;
use std::fmt;
use std::ops::RangeInclusive;

/// Cluster settings validation depends on.
#[derive(Clone, Debug)]
pub struct ValidationContext {
    /// Service CIDRs; a requested `spec.clusterIP` must fall inside one.
    pub service_cidrs: Vec<IpNetwork>,
    /// The NodePort range (Kubernetes default 30000-32767).
    pub node_port_range: RangeInclusive<u16>,
}

impl Default for ValidationContext {
    fn default() -> Self {
        ValidationContext {
            service_cidrs: vec!["10.96.0.0/12".parse().expect("static CIDR")],
            node_port_range: 30000..=32767,
        }
    }
}

/// The kinds of field error Kubernetes reports (`k8s.io/apimachinery/pkg/util/validation/field`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldErrorKind {
    Required,
    Invalid,
    NotSupported,
    Duplicate,
    Forbidden,
    TooLong,
    TooMany,
}

/// One failing field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub kind: FieldErrorKind,
    /// JSON path as Kubernetes writes it, e.g. `spec.ports[0].port`.
    pub field: String,
    /// The offending value as Kubernetes prints it (strings quoted), if any.
    pub value: Option<String>,
    pub detail: String,
}

impl FieldError {
    /// The `reason` of a `StatusCause` (e.g. `FieldValueInvalid`).
    pub fn reason(&self) -> &'static str {
        match self.kind {
            FieldErrorKind::Required => "FieldValueRequired",
            FieldErrorKind::Invalid => "FieldValueInvalid",
            FieldErrorKind::NotSupported => "FieldValueNotSupported",
            FieldErrorKind::Duplicate => "FieldValueDuplicate",
            FieldErrorKind::Forbidden => "FieldValueForbidden",
            FieldErrorKind::TooLong => "FieldValueTooLong",
            FieldErrorKind::TooMany => "FieldValueTooMany",
        }
    }

    /// The message without the field path (`Invalid value: 70000: must be ...`).
    pub fn message(&self) -> String {
        let head = match self.kind {
            FieldErrorKind::Required => "Required value",
            FieldErrorKind::Invalid => "Invalid value",
            FieldErrorKind::NotSupported => "Unsupported value",
            FieldErrorKind::Duplicate => "Duplicate value",
            FieldErrorKind::Forbidden => "Forbidden",
            FieldErrorKind::TooLong => "Too long",
            FieldErrorKind::TooMany => "Too many",
        };
        let mut s = head.to_string();
        if let Some(v) = &self.value {
            s.push_str(": ");
            s.push_str(v);
        }
        if !self.detail.is_empty() {
            s.push_str(": ");
            s.push_str(&self.detail);
        }
        s
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message())
    }
}

/// Structural validation of an object as created (all kinds).
pub fn validate_object(obj: &Object, ctx: &ValidationContext) -> Vec<FieldError> {
    let _ = (obj, ctx);
    Vec::new()
}

/// Validation of an update: everything [`validate_object`] checks plus immutability.
pub fn validate_update(old: &Object, new: &Object, ctx: &ValidationContext) -> Vec<FieldError> {
    let _ = old;
    validate_object(new, ctx)
}

/// Why `key` is not a valid label key, if it is not.
pub fn label_key_errors(key: &str) -> Option<String> {
    if key.is_empty() {
        Some("name part must be non-empty".into())
    } else {
        None
    }
}

/// Why `value` is not a valid label value, if it is not.
pub fn label_value_errors(value: &str) -> Option<String> {
    let _ = value;
    None
}
