//! Validation mirroring Kubernetes' rules for the fields weft uses. Errors
//! carry the failing field path and render as the API server does:
//! `spec.ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive`.
//!
//! This module owns:
//! - the syntax checks of `k8s.io/apimachinery/pkg/util/validation` (DNS labels
//!   and subdomains, qualified names, label values, IANA service names, IPs and
//!   CIDRs), with the same messages;
//! - per-kind create validation ([`validate_object`]) following
//!   `pkg/apis/core/validation` and `pkg/apis/discovery/validation`, restricted
//!   to the fields weft reads, plus the checks the API server's allocators make
//!   on user-requested cluster IPs and node ports;
//! - update validation ([`validate_update`]): immutability rules.
//!
//! Validation runs on objects as the user sent them, before defaulting: absent
//! fields that Kubernetes would default (service type, protocols, session
//! affinity, traffic policies, target ports) are accepted and checked as their
//! defaults. Clearing or allocating fields is done by the API server elsewhere.

use crate::objects::Object;
use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{
    Container, Namespace, Node, Pod, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::{BTreeMap, HashSet};
use std::fmt::{self, Write as _};
use std::net::IpAddr;
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
    let mut errs = Errors::default();
    match obj {
        Object::Namespace(ns) => validate_namespace(ns, &mut errs),
        Object::Node(node) => validate_node(node, &mut errs),
        Object::Pod(pod) => validate_pod(pod, &mut errs),
        Object::Service(svc) => validate_service(svc, ctx, &mut errs),
        Object::EndpointSlice(slice) => validate_endpoint_slice(slice, &mut errs),
    }
    errs.0
}

/// Validation of an update: everything [`validate_object`] checks plus immutability.
pub fn validate_update(old: &Object, new: &Object, ctx: &ValidationContext) -> Vec<FieldError> {
    let mut errs = Errors::default();
    if old.kind() != new.kind() {
        errs.invalid(&Path::new("kind"), new.kind().name(), IMMUTABLE);
    } else {
        validate_meta_update(old.meta(), new.meta(), new.kind().namespaced(), &mut errs);
        match (old, new) {
            (Object::Service(o), Object::Service(n)) => validate_service_update(o, n, &mut errs),
            (Object::Node(o), Object::Node(n)) => validate_node_update(o, n, &mut errs),
            (Object::Pod(o), Object::Pod(n)) => validate_pod_update(o, n, &mut errs),
            (Object::EndpointSlice(o), Object::EndpointSlice(n)) => {
                validate_endpoint_slice_update(o, n, &mut errs)
            }
            _ => {}
        }
    }
    let mut out = errs.0;
    out.extend(validate_object(new, ctx));
    out
}

// ---------------------------------------------------------------------------
// Syntax checks (k8s.io/apimachinery/pkg/util/validation), same messages.
// ---------------------------------------------------------------------------

const DNS1123_LABEL_MAX: usize = 63;
const DNS1123_SUBDOMAIN_MAX: usize = 253;
const DNS1035_LABEL_MAX: usize = 63;
const QUALIFIED_NAME_MAX: usize = 63;
const LABEL_VALUE_MAX: usize = 63;
const IANA_SVC_NAME_MAX: usize = 15;

const DNS1123_LABEL_FMT: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?";
const DNS1123_LABEL_ERR: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character";
const DNS1123_SUBDOMAIN_FMT: &str =
    "[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";
const DNS1123_SUBDOMAIN_ERR: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character";
const DNS1035_LABEL_FMT: &str = "[a-z]([-a-z0-9]*[a-z0-9])?";
const DNS1035_LABEL_ERR: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character";
const QUALIFIED_NAME_FMT: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
const QUALIFIED_NAME_ERR: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";
const LABEL_VALUE_FMT: &str = "(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?";
const LABEL_VALUE_ERR: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";

const PORT_RANGE_MSG: &str = "must be between 1 and 65535, inclusive";
const IP_MSG: &str = "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)";
const CIDR_MSG: &str = "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)";
const IMMUTABLE: &str = "field is immutable";

/// `validation.MaxLenError`.
fn max_len_error(n: usize) -> String {
    format!("must be no more than {n} characters")
}

/// `validation.RegexError`, including its odd `',  or '` spacing.
fn regex_error(msg: &str, fmt: &str, examples: &[&str]) -> String {
    if examples.is_empty() {
        return format!("{msg} (regex used for validation is '{fmt}')");
    }
    let mut s = format!("{msg} (e.g. ");
    for (i, e) in examples.iter().enumerate() {
        if i > 0 {
            s.push_str(" or ");
        }
        let _ = write!(s, "'{e}', ");
    }
    let _ = write!(s, "regex used for validation is '{fmt}')");
    s
}

fn is_lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// `^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`
fn matches_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    match (b.first(), b.last()) {
        (Some(&first), Some(&last)) => {
            is_lower_alnum(first)
                && is_lower_alnum(last)
                && b.iter().all(|&c| is_lower_alnum(c) || c == b'-')
        }
        _ => false,
    }
}

/// Labels joined by dots; the empty string does not match.
fn matches_dns1123_subdomain(s: &str) -> bool {
    s.split('.').all(matches_dns1123_label)
}

/// `^[a-z]([-a-z0-9]*[a-z0-9])?$`
fn matches_dns1035_label(s: &str) -> bool {
    let b = s.as_bytes();
    match (b.first(), b.last()) {
        (Some(&first), Some(&last)) => {
            first.is_ascii_lowercase()
                && is_lower_alnum(last)
                && b.iter().all(|&c| is_lower_alnum(c) || c == b'-')
        }
        _ => false,
    }
}

/// `^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$`
fn matches_qualified_name(s: &str) -> bool {
    let b = s.as_bytes();
    match (b.first(), b.last()) {
        (Some(&first), Some(&last)) => {
            first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && b.iter()
                    .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

/// Why `value` is not a lowercase RFC 1123 label (`validation.IsDNS1123Label`).
pub fn dns1123_label_errors(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if value.len() > DNS1123_LABEL_MAX {
        errs.push(max_len_error(DNS1123_LABEL_MAX));
    }
    if !matches_dns1123_label(value) {
        if matches_dns1123_subdomain(value) {
            // A valid subdomain but not a label: the dots are the problem.
            errs.push("must not contain dots".to_string());
        } else {
            errs.push(regex_error(
                DNS1123_LABEL_ERR,
                DNS1123_LABEL_FMT,
                &["my-name", "123-abc"],
            ));
        }
    }
    errs
}

/// Why `value` is not a lowercase RFC 1123 subdomain (`validation.IsDNS1123Subdomain`).
pub fn dns1123_subdomain_errors(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if value.len() > DNS1123_SUBDOMAIN_MAX {
        errs.push(max_len_error(DNS1123_SUBDOMAIN_MAX));
    }
    if !matches_dns1123_subdomain(value) {
        errs.push(regex_error(
            DNS1123_SUBDOMAIN_ERR,
            DNS1123_SUBDOMAIN_FMT,
            &["example.com"],
        ));
    }
    errs
}

/// Why `value` is not an RFC 1035 label (`validation.IsDNS1035Label`).
pub fn dns1035_label_errors(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if value.len() > DNS1035_LABEL_MAX {
        errs.push(max_len_error(DNS1035_LABEL_MAX));
    }
    if !matches_dns1035_label(value) {
        errs.push(regex_error(
            DNS1035_LABEL_ERR,
            DNS1035_LABEL_FMT,
            &["my-name", "abc-123"],
        ));
    }
    errs
}

/// Why `value` is not an IANA_SVC_NAME, the syntax of named ports
/// (`validation.IsValidPortName`).
pub fn iana_svc_name_errors(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if value.len() > IANA_SVC_NAME_MAX {
        errs.push(max_len_error(IANA_SVC_NAME_MAX));
    }
    if value.is_empty() || !value.bytes().all(|c| is_lower_alnum(c) || c == b'-') {
        errs.push(
            "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)".to_string(),
        );
    }
    if !value.bytes().any(|c| c.is_ascii_lowercase()) {
        errs.push("must contain at least one letter (a-z)".to_string());
    }
    if value.contains("--") {
        errs.push("must not contain consecutive hyphens".to_string());
    }
    if value.starts_with('-') || value.ends_with('-') {
        errs.push("must not begin or end with a hyphen".to_string());
    }
    errs
}

/// Why `value` is not a qualified name: an optional DNS-subdomain prefix and
/// `/`, then a name of at most 63 characters (`validation.IsQualifiedName`).
/// Label keys and annotation keys have this syntax.
pub fn qualified_name_errors(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    let parts: Vec<&str> = value.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                errs.push("prefix part must be non-empty".to_string());
            } else {
                for msg in dns1123_subdomain_errors(prefix) {
                    errs.push(format!("prefix part {msg}"));
                }
            }
            *name
        }
        _ => {
            errs.push(format!(
                "a qualified name {} with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')",
                regex_error(
                    QUALIFIED_NAME_ERR,
                    QUALIFIED_NAME_FMT,
                    &["MyName", "my.name", "123-abc"]
                )
            ));
            return errs;
        }
    };
    if name.is_empty() {
        errs.push("name part must be non-empty".to_string());
    } else if name.len() > QUALIFIED_NAME_MAX {
        errs.push(format!("name part {}", max_len_error(QUALIFIED_NAME_MAX)));
    }
    if !matches_qualified_name(name) {
        errs.push(format!(
            "name part {}",
            regex_error(
                QUALIFIED_NAME_ERR,
                QUALIFIED_NAME_FMT,
                &["MyName", "my.name", "123-abc"]
            )
        ));
    }
    errs
}

/// `validation.IsValidLabelValue`: at most 63 characters, empty allowed.
fn label_value_msgs(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if value.len() > LABEL_VALUE_MAX {
        errs.push(max_len_error(LABEL_VALUE_MAX));
    }
    if !value.is_empty() && !matches_qualified_name(value) {
        errs.push(regex_error(
            LABEL_VALUE_ERR,
            LABEL_VALUE_FMT,
            &["MyValue", "my_value", "12345"],
        ));
    }
    errs
}

fn join_msgs(msgs: Vec<String>) -> Option<String> {
    if msgs.is_empty() {
        None
    } else {
        // Kubernetes' selector parser joins a key's messages this way.
        Some(msgs.join("; "))
    }
}

/// Why `key` is not a valid label key, if it is not.
pub fn label_key_errors(key: &str) -> Option<String> {
    join_msgs(qualified_name_errors(key))
}

/// Why `value` is not a valid label value, if it is not.
pub fn label_value_errors(value: &str) -> Option<String> {
    join_msgs(label_value_msgs(value))
}

/// Parse an IP address as Kubernetes accepts it for new objects: no leading
/// zeros, no zones, no IPv4-mapped IPv6 form.
pub fn validate_ip(value: &str) -> Result<IpAddr, String> {
    match value.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some() => {
            Err("must not be an IPv4-mapped IPv6 address".to_string())
        }
        Ok(ip) => Ok(ip),
        Err(_) if has_leading_zero_octets(value) => Err("must not have leading 0s".to_string()),
        Err(_) => Err(IP_MSG.to_string()),
    }
}

/// Whether `value` is a dotted IPv4 address once leading zeros are dropped
/// (Go's lenient parser accepts it; Kubernetes then rejects it by name).
fn has_leading_zero_octets(value: &str) -> bool {
    let octets: Vec<&str> = value.split('.').collect();
    octets.len() == 4
        && octets.iter().all(|o| {
            !o.is_empty() && o.len() <= 3 && o.bytes().all(|c| c.is_ascii_digit()) && {
                let v: u32 = o.bytes().fold(0, |acc, c| acc * 10 + u32::from(c - b'0'));
                v <= 255
            }
        })
}

/// Parse a CIDR (`10.9.8.0/24`): the prefix length is required and the host
/// bits must be zero. Kubernetes reports every failure with one message.
pub fn validate_cidr(value: &str) -> Result<IpNetwork, String> {
    let bad = || CIDR_MSG.to_string();
    let (addr, prefix) = value.split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = addr.parse().map_err(|_| bad())?;
    if let IpAddr::V6(v6) = ip {
        if v6.to_ipv4_mapped().is_some() {
            return Err(bad());
        }
    }
    let digits_ok = !prefix.is_empty()
        && prefix.bytes().all(|c| c.is_ascii_digit())
        && (prefix == "0" || !prefix.starts_with('0'));
    if !digits_ok {
        return Err(bad());
    }
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    let net = IpNetwork::new(ip, prefix).map_err(|_| bad())?;
    if net.network() != ip {
        return Err(bad());
    }
    Ok(net)
}

/// `ValidateNonSpecialIP`: addresses that cannot be a service or endpoint address.
fn non_special_ip_errors(ip: IpAddr, raw: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if ip.is_unspecified() {
        errs.push(format!("may not be unspecified ({raw})"));
    }
    if ip.is_loopback() {
        errs.push("may not be in the loopback range (127.0.0.0/8, ::1/128)".to_string());
    }
    let (link_local, link_local_multicast) = match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            (v4.is_link_local(), o[0] == 224 && o[1] == 0 && o[2] == 0)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            // fe80::/10, and ff02::/16 in any of the flag variants Go accepts.
            (s[0] & 0xffc0 == 0xfe80, s[0] & 0xff0f == 0xff02)
        }
    };
    if link_local {
        errs.push("may not be in the link-local range (169.254.0.0/16, fe80::/10)".to_string());
    }
    if link_local_multicast {
        errs.push(
            "may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)".to_string(),
        );
    }
    errs
}

fn valid_port(port: i32) -> bool {
    (1..=65535).contains(&port)
}

/// Go's `%q`: how Kubernetes prints a string value.
fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() || (c.is_whitespace() && c != ' ') => {
                if (c as u32) < 0x10000 {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                } else {
                    let _ = write!(out, "\\U{:08x}", c as u32);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------
// Paths, printed values and the error list.
// ---------------------------------------------------------------------------

/// A field path being built, e.g. `spec.ports[0].port`.
#[derive(Clone, Debug)]
struct Path(String);

impl Path {
    fn new(root: &str) -> Path {
        Path(root.to_string())
    }

    fn child(&self, name: &str) -> Path {
        Path(format!("{}.{name}", self.0))
    }

    fn index(&self, i: usize) -> Path {
        Path(format!("{}[{i}]", self.0))
    }
}

/// A value as Kubernetes prints it in an error: numbers bare, strings quoted,
/// lists and structs as JSON.
trait Printed {
    fn printed(&self) -> String;
}

impl Printed for str {
    fn printed(&self) -> String {
        go_quote(self)
    }
}

impl Printed for String {
    fn printed(&self) -> String {
        go_quote(self)
    }
}

impl Printed for [String] {
    fn printed(&self) -> String {
        serde_json::Value::from(self.to_vec()).to_string()
    }
}

impl Printed for serde_json::Value {
    fn printed(&self) -> String {
        self.to_string()
    }
}

macro_rules! printed_number {
    ($($t:ty),*) => {$(
        impl Printed for $t {
            fn printed(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
printed_number!(i32, i64, usize);

/// The accumulated errors, with one constructor per `field.ErrorType`.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, kind: FieldErrorKind, path: &Path, value: Option<String>, detail: String) {
        self.0.push(FieldError {
            kind,
            field: path.0.clone(),
            value,
            detail,
        });
    }

    fn required(&mut self, path: &Path, detail: &str) {
        self.push(FieldErrorKind::Required, path, None, detail.to_string());
    }

    fn invalid<V: Printed + ?Sized>(&mut self, path: &Path, value: &V, detail: impl Into<String>) {
        self.push(
            FieldErrorKind::Invalid,
            path,
            Some(value.printed()),
            detail.into(),
        );
    }

    /// One Invalid error per message, as Kubernetes reports syntax failures.
    fn invalid_each<V: Printed + ?Sized>(&mut self, path: &Path, value: &V, msgs: Vec<String>) {
        for msg in msgs {
            self.invalid(path, value, msg);
        }
    }

    fn not_supported(&mut self, path: &Path, value: &str, supported: &[&str]) {
        let quoted: Vec<String> = supported.iter().map(|s| go_quote(s)).collect();
        self.push(
            FieldErrorKind::NotSupported,
            path,
            Some(go_quote(value)),
            format!("supported values: {}", quoted.join(", ")),
        );
    }

    fn duplicate<V: Printed + ?Sized>(&mut self, path: &Path, value: &V) {
        self.push(
            FieldErrorKind::Duplicate,
            path,
            Some(value.printed()),
            String::new(),
        );
    }

    fn forbidden(&mut self, path: &Path, detail: impl Into<String>) {
        self.push(FieldErrorKind::Forbidden, path, None, detail.into());
    }

    fn too_long(&mut self, path: &Path, max_bytes: usize) {
        let detail = format!("may not be more than {max_bytes} bytes");
        self.push(FieldErrorKind::TooLong, path, None, detail);
    }

    fn too_many(&mut self, path: &Path, actual: usize, max: usize) {
        let detail = format!("must have at most {max} items");
        self.push(
            FieldErrorKind::TooMany,
            path,
            Some(actual.printed()),
            detail,
        );
    }
}

// ---------------------------------------------------------------------------
// Object metadata.
// ---------------------------------------------------------------------------

const TOTAL_ANNOTATION_SIZE_LIMIT: usize = 256 * 1024;

/// A name check; the flag says the value is a `generateName` prefix.
type NameFn = fn(&str, bool) -> Vec<String>;

/// A `generateName` prefix gets a random suffix, so a trailing dash is fine:
/// Kubernetes masks it before checking (`maskTrailingDash`, quirk included).
fn mask_trailing_dash(name: &str) -> String {
    match name.strip_suffix('-') {
        Some(_) if name.len() > 1 => {
            let cut = name.len() - 2;
            match name.get(..cut) {
                Some(head) => format!("{head}a"),
                None => name.to_string(),
            }
        }
        _ => name.to_string(),
    }
}

fn name_is_dns_label(name: &str, prefix: bool) -> Vec<String> {
    if prefix {
        dns1123_label_errors(&mask_trailing_dash(name))
    } else {
        dns1123_label_errors(name)
    }
}

fn name_is_dns1035_label(name: &str, prefix: bool) -> Vec<String> {
    if prefix {
        dns1035_label_errors(&mask_trailing_dash(name))
    } else {
        dns1035_label_errors(name)
    }
}

fn name_is_dns_subdomain(name: &str, prefix: bool) -> Vec<String> {
    if prefix {
        dns1123_subdomain_errors(&mask_trailing_dash(name))
    } else {
        dns1123_subdomain_errors(name)
    }
}

/// `ValidateObjectMeta`. The namespace may be absent (the request path
/// supplies it); cluster-scoped kinds ignore it, as the API server clears it.
fn validate_meta(meta: &ObjectMeta, namespaced: bool, name_fn: NameFn, errs: &mut Errors) {
    let path = Path::new("metadata");
    let generate_name = meta.generate_name.as_deref().unwrap_or("");
    if !generate_name.is_empty() {
        let p = path.child("generateName");
        errs.invalid_each(&p, generate_name, name_fn(generate_name, true));
    }
    let name = meta.name.as_deref().unwrap_or("");
    if name.is_empty() {
        // With only generateName set, the server generates the name later.
        if generate_name.is_empty() {
            errs.required(&path.child("name"), "name or generateName is required");
        }
    } else {
        errs.invalid_each(&path.child("name"), name, name_fn(name, false));
    }
    if namespaced {
        if let Some(ns) = meta.namespace.as_deref().filter(|ns| !ns.is_empty()) {
            errs.invalid_each(&path.child("namespace"), ns, dns1123_label_errors(ns));
        }
    }
    validate_labels(meta.labels.as_ref(), &path.child("labels"), errs);
    validate_annotations(meta.annotations.as_ref(), &path.child("annotations"), errs);
}

/// `ValidateLabels`: every error names the map, with the bad key or value.
fn validate_labels(labels: Option<&BTreeMap<String, String>>, path: &Path, errs: &mut Errors) {
    for (k, v) in labels.into_iter().flatten() {
        errs.invalid_each(path, k, qualified_name_errors(k));
        errs.invalid_each(path, v, label_value_msgs(v));
    }
}

/// `ValidateAnnotations`: keys are qualified names ignoring case; keys and
/// values together are limited to 256 KiB.
fn validate_annotations(
    annotations: Option<&BTreeMap<String, String>>,
    path: &Path,
    errs: &mut Errors,
) {
    let Some(annotations) = annotations else {
        return;
    };
    let mut total = 0usize;
    for (k, v) in annotations {
        errs.invalid_each(path, k, qualified_name_errors(&k.to_lowercase()));
        total = total.saturating_add(k.len()).saturating_add(v.len());
    }
    if total > TOTAL_ANNOTATION_SIZE_LIMIT {
        errs.too_long(path, TOTAL_ANNOTATION_SIZE_LIMIT);
    }
}

/// `ValidateObjectMetaUpdate`: name and namespace never change. An empty new
/// namespace means "not given" (the request path supplies it).
fn validate_meta_update(old: &ObjectMeta, new: &ObjectMeta, namespaced: bool, errs: &mut Errors) {
    let path = Path::new("metadata");
    let old_name = old.name.as_deref().unwrap_or("");
    let new_name = new.name.as_deref().unwrap_or("");
    if old_name != new_name {
        errs.invalid(&path.child("name"), new_name, IMMUTABLE);
    }
    if namespaced {
        let old_ns = old.namespace.as_deref().unwrap_or("");
        let new_ns = new.namespace.as_deref().unwrap_or("");
        if !new_ns.is_empty() && old_ns != new_ns {
            errs.invalid(&path.child("namespace"), new_ns, IMMUTABLE);
        }
    }
}

// ---------------------------------------------------------------------------
// Namespace.
// ---------------------------------------------------------------------------

fn validate_namespace(ns: &Namespace, errs: &mut Errors) {
    validate_meta(&ns.metadata, false, name_is_dns_label, errs);
}

// ---------------------------------------------------------------------------
// Service.
// ---------------------------------------------------------------------------

const PROTOCOLS: &[&str] = &["SCTP", "TCP", "UDP"];
const SERVICE_TYPES: &[&str] = &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"];
const SESSION_AFFINITIES: &[&str] = &["ClientIP", "None"];
const TRAFFIC_POLICIES: &[&str] = &["Cluster", "Local"];
const IP_FAMILIES: &[&str] = &["IPv4", "IPv6"];
const IP_FAMILY_POLICIES: &[&str] = &["PreferDualStack", "RequireDualStack", "SingleStack"];
const MAX_CLIENT_IP_AFFINITY_SECONDS: i32 = 86400;

/// The effective value of an optional string field that defaults when absent or empty.
fn or_default<'a>(value: Option<&'a String>, default: &'a str) -> &'a str {
    value
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .unwrap_or(default)
}

fn service_type(spec: Option<&ServiceSpec>) -> &str {
    or_default(spec.and_then(|s| s.type_.as_ref()), "ClusterIP")
}

/// The primary cluster IP as requested and the field it came from: `clusterIP`
/// wins; `clusterIPs[0]` stands in when only the list is set (the API server
/// keeps the two in step).
fn primary_cluster_ip(spec: &ServiceSpec) -> Option<(&str, Path)> {
    let spec_path = Path::new("spec");
    match spec.cluster_ip.as_deref() {
        Some(ip) if !ip.is_empty() => Some((ip, spec_path.child("clusterIP"))),
        _ => spec
            .cluster_ips
            .as_deref()
            .and_then(|ips| ips.first())
            .filter(|ip| !ip.is_empty())
            .map(|ip| (ip.as_str(), spec_path.child("clusterIPs").index(0))),
    }
}

fn primary_cluster_ip_value(spec: Option<&ServiceSpec>) -> &str {
    spec.and_then(primary_cluster_ip)
        .map(|(ip, _)| ip)
        .unwrap_or("")
}

fn validate_service(svc: &Service, ctx: &ValidationContext, errs: &mut Errors) {
    validate_meta(&svc.metadata, true, name_is_dns1035_label, errs);
    let spec_path = Path::new("spec");
    let Some(spec) = &svc.spec else {
        errs.required(&spec_path, "");
        return;
    };
    let ty = service_type(Some(spec));
    if !SERVICE_TYPES.contains(&ty) {
        errs.not_supported(&spec_path.child("type"), ty, SERVICE_TYPES);
    }
    let primary = primary_cluster_ip(spec);
    let headless = primary.as_ref().is_some_and(|(ip, _)| *ip == "None");
    let ports = spec.ports.as_deref().unwrap_or(&[]);

    // Headless services may have no ports: they only publish endpoints.
    if ports.is_empty() && !headless && ty != "ExternalName" {
        errs.required(&spec_path.child("ports"), "");
    }

    match ty {
        "NodePort" | "LoadBalancer" => {
            if let Some((ip, path)) = primary.as_ref().filter(|_| headless) {
                errs.invalid(
                    path,
                    *ip,
                    format!("may not be set to 'None' for {ty} services"),
                );
            }
        }
        "ExternalName" => validate_external_name(spec, errs),
        _ => {}
    }

    validate_service_ports(ports, ty, ctx, errs);

    if let Some(selector) = &spec.selector {
        validate_labels(Some(selector), &spec_path.child("selector"), errs);
    }

    validate_session_affinity(spec, errs);

    // ExternalName services have no cluster IPs (checked above).
    if ty != "ExternalName" {
        validate_cluster_ips(spec, headless, ctx, errs);
    }

    let external_ips = spec.external_ips.as_deref().unwrap_or(&[]);
    let ips_path = spec_path.child("externalIPs");
    for (i, raw) in external_ips.iter().enumerate() {
        let path = ips_path.index(i);
        match validate_ip(raw) {
            Err(msg) => errs.invalid(&path, raw, msg),
            Ok(ip) => errs.invalid_each(&path, raw, non_special_ip_errors(ip, raw)),
        }
    }

    let ranges = spec.load_balancer_source_ranges.as_deref().unwrap_or(&[]);
    if !ranges.is_empty() {
        let path = spec_path.child("loadBalancerSourceRanges");
        if ty != "LoadBalancer" {
            errs.forbidden(&path, "may only be used when `type` is 'LoadBalancer'");
        }
        for (i, raw) in ranges.iter().enumerate() {
            // Historically these may be space-padded (they began as an annotation).
            if let Err(msg) = validate_cidr(raw.trim()) {
                errs.invalid(&path.index(i), raw.trim(), msg);
            }
        }
    }

    validate_traffic_policies(spec, ty, !external_ips.is_empty(), ctx, errs);
}

/// An ExternalName service is a DNS alias: the name is required and no
/// cluster IP or IP family may be set.
fn validate_external_name(spec: &ServiceSpec, errs: &mut Errors) {
    let spec_path = Path::new("spec");
    const MSG: &str = "may not be set for ExternalName services";
    if spec.cluster_ip.as_deref().is_some_and(|ip| !ip.is_empty()) {
        errs.forbidden(&spec_path.child("clusterIP"), MSG);
    }
    if spec
        .cluster_ips
        .as_deref()
        .is_some_and(|ips| !ips.is_empty())
    {
        errs.forbidden(&spec_path.child("clusterIPs"), MSG);
    }
    if spec.ip_families.as_deref().is_some_and(|f| !f.is_empty()) {
        errs.forbidden(&spec_path.child("ipFamilies"), MSG);
    }
    if spec.ip_family_policy.is_some() {
        errs.forbidden(&spec_path.child("ipFamilyPolicy"), MSG);
    }
    // The name (a CNAME target) may end in a dot to mark it fully qualified.
    let raw = spec.external_name.as_deref().unwrap_or("");
    let cname = raw.strip_suffix('.').unwrap_or(raw);
    let path = spec_path.child("externalName");
    if cname.is_empty() {
        errs.required(&path, "");
    } else {
        errs.invalid_each(&path, cname, dns1123_subdomain_errors(cname));
    }
}

fn node_port_range_error(ctx: &ValidationContext) -> String {
    format!(
        "provided port is not in the valid range. The range of valid ports is {}-{}",
        ctx.node_port_range.start(),
        ctx.node_port_range.end()
    )
}

fn in_node_port_range(port: i32, ctx: &ValidationContext) -> bool {
    u16::try_from(port).is_ok_and(|p| ctx.node_port_range.contains(&p))
}

fn validate_service_ports(
    ports: &[ServicePort],
    ty: &str,
    ctx: &ValidationContext,
    errs: &mut Errors,
) {
    let ports_path = Path::new("spec").child("ports");
    let mut names = HashSet::new();
    let mut node_ports = HashSet::new();
    let mut pairs = HashSet::new();
    for (i, sp) in ports.iter().enumerate() {
        let path = ports_path.index(i);
        let name = sp.name.as_deref().unwrap_or("");
        // With several ports, names tell them apart (EndpointSlices match on them).
        if ports.len() > 1 && name.is_empty() {
            errs.required(&path.child("name"), "");
        } else if !name.is_empty() {
            errs.invalid_each(&path.child("name"), name, dns1123_label_errors(name));
            if !names.insert(name) {
                errs.duplicate(&path.child("name"), name);
            }
        }

        if !valid_port(sp.port) {
            errs.invalid(&path.child("port"), &sp.port, PORT_RANGE_MSG);
        }

        let protocol = or_default(sp.protocol.as_ref(), "TCP");
        if !PROTOCOLS.contains(&protocol) {
            errs.not_supported(&path.child("protocol"), protocol, PROTOCOLS);
        }

        // 0 and "" are what defaulting replaces with `port`.
        match &sp.target_port {
            Some(IntOrString::Int(p)) if *p != 0 && !valid_port(*p) => {
                errs.invalid(&path.child("targetPort"), p, PORT_RANGE_MSG);
            }
            Some(IntOrString::String(s)) if !s.is_empty() => {
                errs.invalid_each(&path.child("targetPort"), s, iana_svc_name_errors(s));
            }
            _ => {}
        }

        if let Some(app) = &sp.app_protocol {
            errs.invalid_each(&path.child("appProtocol"), app, qualified_name_errors(app));
        }

        let node_port = sp.node_port.unwrap_or(0);
        if node_port != 0 {
            let np_path = path.child("nodePort");
            if ty == "ClusterIP" || ty == "ExternalName" {
                errs.forbidden(&np_path, format!("may not be used when `type` is '{ty}'"));
            } else if !in_node_port_range(node_port, ctx) {
                errs.invalid(&np_path, &node_port, node_port_range_error(ctx));
            }
            if !node_ports.insert((protocol, node_port)) {
                errs.duplicate(&np_path, &node_port);
            }
        }

        if !pairs.insert((protocol, sp.port)) {
            let key = serde_json::json!({ "port": sp.port, "protocol": protocol });
            errs.duplicate(&path, &key);
        }
    }
}

fn validate_session_affinity(spec: &ServiceSpec, errs: &mut Errors) {
    let spec_path = Path::new("spec");
    let affinity = or_default(spec.session_affinity.as_ref(), "None");
    if !SESSION_AFFINITIES.contains(&affinity) {
        errs.not_supported(
            &spec_path.child("sessionAffinity"),
            affinity,
            SESSION_AFFINITIES,
        );
    }
    let config_path = spec_path.child("sessionAffinityConfig");
    match affinity {
        // An absent timeout is defaulted (10800s), so only a given one is checked.
        "ClientIP" => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            if let Some(t) = timeout {
                if t <= 0 || t > MAX_CLIENT_IP_AFFINITY_SECONDS {
                    let path = config_path.child("clientIP").child("timeoutSeconds");
                    errs.invalid(
                        &path,
                        &t,
                        format!(
                            "must be greater than 0 and less than {MAX_CLIENT_IP_AFFINITY_SECONDS}"
                        ),
                    );
                }
            }
        }
        "None" if spec.session_affinity_config.is_some() => {
            errs.forbidden(
                &config_path,
                "must not be set when session affinity is None",
            );
        }
        _ => {}
    }
}

/// Why a requested cluster IP cannot be allocated: the allocator's message
/// when it lies outside the service CIDRs of its family. As in Kubernetes the
/// network address (and for IPv4 the broadcast address) is never allocatable.
fn cluster_ip_range_error(ip: IpAddr, ctx: &ValidationContext) -> Option<String> {
    if ctx.service_cidrs.is_empty() {
        // No service CIDR configured: nothing to check against.
        return None;
    }
    let same_family: Vec<&IpNetwork> = ctx
        .service_cidrs
        .iter()
        .filter(|n| n.is_ipv4() == ip.is_ipv4())
        .collect();
    let allocatable = |n: &IpNetwork| {
        n.contains(ip) && ip != n.network() && !(n.is_ipv4() && ip == n.broadcast())
    };
    if same_family.iter().any(|n| allocatable(n)) {
        return None;
    }
    let shown: Vec<String> = if same_family.is_empty() {
        ctx.service_cidrs.iter().map(|n| n.to_string()).collect()
    } else {
        same_family.iter().map(|n| n.to_string()).collect()
    };
    Some(format!(
        "failed to allocate IP {ip}: the provided IP ({ip}) is not in the valid range. The range of valid IPs is {}",
        shown.join(", ")
    ))
}

/// `ValidateServiceClusterIPsRelatedFields` plus the allocator's range check.
fn validate_cluster_ips(
    spec: &ServiceSpec,
    headless: bool,
    ctx: &ValidationContext,
    errs: &mut Errors,
) {
    let spec_path = Path::new("spec");
    let list_path = spec_path.child("clusterIPs");
    let list = spec.cluster_ips.as_deref().unwrap_or(&[]);
    let cluster_ip = spec.cluster_ip.as_deref().unwrap_or("");

    if !cluster_ip.is_empty() && list.first().is_some_and(|first| first != cluster_ip) {
        errs.invalid(&list_path, list, "first value must match `clusterIP`");
    }

    let families = spec.ip_families.as_deref().unwrap_or(&[]);
    let families_path = spec_path.child("ipFamilies");
    let mut seen = HashSet::new();
    for (i, family) in families.iter().enumerate() {
        if !IP_FAMILIES.contains(&family.as_str()) {
            errs.not_supported(&families_path.index(i), family, IP_FAMILIES);
        }
        if !seen.insert(family.as_str()) {
            errs.duplicate(&families_path.index(i), family);
        }
    }
    if families.len() > 2 {
        errs.invalid(&families_path, families, "may only hold up to 2 values");
    }
    if let Some(policy) = &spec.ip_family_policy {
        if !IP_FAMILY_POLICIES.contains(&policy.as_str()) {
            errs.not_supported(
                &spec_path.child("ipFamilyPolicy"),
                policy,
                IP_FAMILY_POLICIES,
            );
        }
    }

    if list.len() > 2 {
        errs.invalid(&list_path, list, "may only hold up to 2 values");
        return;
    }
    if list.iter().skip(1).any(|ip| ip == "None") || (headless && list.len() > 1) {
        errs.invalid(&list_path, list, "'None' must be the first and only value");
        return;
    }
    if headless {
        return;
    }

    // The requested IPs with the field each came from; later checks refer to
    // them by family position.
    let mut entries: Vec<(Path, &str)> = Vec::new();
    if let Some((ip, path)) = primary_cluster_ip(spec) {
        entries.push((path, ip));
    }
    for (i, ip) in list.iter().enumerate().skip(1) {
        entries.push((list_path.index(i), ip.as_str()));
    }

    let mut parsed: Vec<Option<IpAddr>> = Vec::new();
    for (path, raw) in &entries {
        match validate_ip(raw) {
            Err(msg) => {
                errs.invalid(path, *raw, msg);
                parsed.push(None);
            }
            Ok(ip) => {
                if let Some(msg) = cluster_ip_range_error(ip, ctx) {
                    errs.invalid(path, *raw, msg);
                }
                parsed.push(Some(ip));
            }
        }
    }
    if let [Some(a), Some(b)] = parsed.as_slice() {
        if a.is_ipv4() == b.is_ipv4() {
            errs.invalid(
                &list_path,
                list,
                "may specify no more than one IP for each IP family",
            );
        }
    }
    for (i, ((path, raw), ip)) in entries.iter().zip(&parsed).enumerate() {
        let (Some(family), Some(ip)) = (families.get(i), ip) else {
            continue;
        };
        let want_v6 = match family.as_str() {
            "IPv4" => false,
            "IPv6" => true,
            _ => continue,
        };
        if ip.is_ipv6() != want_v6 {
            let which = if want_v6 { "IPv6" } else { "IPv4" };
            errs.invalid(
                path,
                *raw,
                format!("expected an {which} value as indicated by `ipFamilies[{i}]`"),
            );
        }
    }
}

/// `validateServiceExternalTrafficPolicy` and the internal traffic policy.
/// Absent policies and a zero health-check port are defaulted/allocated by
/// the server and so accepted here.
fn validate_traffic_policies(
    spec: &ServiceSpec,
    ty: &str,
    has_external_ips: bool,
    ctx: &ValidationContext,
    errs: &mut Errors,
) {
    let spec_path = Path::new("spec");
    let etp = spec.external_traffic_policy.as_deref().unwrap_or("");
    let etp_path = spec_path.child("externalTrafficPolicy");
    let externally_accessible =
        ty == "NodePort" || ty == "LoadBalancer" || (ty == "ClusterIP" && has_external_ips);
    if !externally_accessible {
        if !etp.is_empty() {
            errs.invalid(
                &etp_path,
                etp,
                "may only be set for externally-accessible services",
            );
        }
    } else if !etp.is_empty() && !TRAFFIC_POLICIES.contains(&etp) {
        errs.not_supported(&etp_path, etp, TRAFFIC_POLICIES);
    }

    let hc = spec.health_check_node_port.unwrap_or(0);
    let hc_path = spec_path.child("healthCheckNodePort");
    let needs_health_check = ty == "LoadBalancer" && etp == "Local";
    if !needs_health_check {
        if hc != 0 {
            errs.invalid(
                &hc_path,
                &hc,
                "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'",
            );
        }
    } else if hc != 0 && !in_node_port_range(hc, ctx) {
        errs.invalid(&hc_path, &hc, node_port_range_error(ctx));
    }

    if let Some(itp) = &spec.internal_traffic_policy {
        if !TRAFFIC_POLICIES.contains(&itp.as_str()) {
            errs.not_supported(
                &spec_path.child("internalTrafficPolicy"),
                itp,
                TRAFFIC_POLICIES,
            );
        }
    }
}

/// The cluster IP may not change, except across ExternalName (which has
/// none): the server clears it going to ExternalName and allocates it coming
/// back. Omitting it on update is not a change the server fills in for us.
fn validate_service_update(old: &Service, new: &Service, errs: &mut Errors) {
    let old_type = service_type(old.spec.as_ref());
    let new_type = service_type(new.spec.as_ref());
    if old_type == "ExternalName" || new_type == "ExternalName" {
        return;
    }
    let old_ip = primary_cluster_ip_value(old.spec.as_ref());
    let new_ip = primary_cluster_ip_value(new.spec.as_ref());
    if !old_ip.is_empty() && old_ip != new_ip {
        errs.invalid(&Path::new("spec").child("clusterIP"), new_ip, IMMUTABLE);
    }
}

// ---------------------------------------------------------------------------
// Pod.
// ---------------------------------------------------------------------------

fn validate_pod(pod: &Pod, errs: &mut Errors) {
    validate_meta(&pod.metadata, true, name_is_dns_subdomain, errs);
    match &pod.spec {
        None => errs.required(&Path::new("spec"), ""),
        Some(spec) => validate_pod_spec(spec, errs),
    }
    if let Some(status) = &pod.status {
        validate_pod_status(status, errs);
    }
}

fn validate_pod_spec(spec: &PodSpec, errs: &mut Errors) {
    let spec_path = Path::new("spec");
    // Container names are unique across init and regular containers; port
    // names across the whole pod, since Services refer to them by name.
    let mut names = HashSet::new();
    let mut port_names = HashSet::new();
    let init = spec.init_containers.as_deref().unwrap_or(&[]);
    let init_path = spec_path.child("initContainers");
    for (i, c) in init.iter().enumerate() {
        validate_container(c, &init_path.index(i), &mut names, &mut port_names, errs);
    }
    let containers_path = spec_path.child("containers");
    if spec.containers.is_empty() {
        errs.required(&containers_path, "");
    }
    for (i, c) in spec.containers.iter().enumerate() {
        validate_container(
            c,
            &containers_path.index(i),
            &mut names,
            &mut port_names,
            errs,
        );
    }

    if let Some(node) = spec.node_name.as_deref().filter(|n| !n.is_empty()) {
        errs.invalid_each(
            &spec_path.child("nodeName"),
            node,
            dns1123_subdomain_errors(node),
        );
    }
    if let Some(host) = spec.hostname.as_deref().filter(|h| !h.is_empty()) {
        errs.invalid_each(
            &spec_path.child("hostname"),
            host,
            dns1123_label_errors(host),
        );
    }
    if let Some(sub) = spec.subdomain.as_deref().filter(|s| !s.is_empty()) {
        errs.invalid_each(
            &spec_path.child("subdomain"),
            sub,
            dns1123_label_errors(sub),
        );
    }
}

fn validate_container<'a>(
    c: &'a Container,
    path: &Path,
    names: &mut HashSet<&'a str>,
    port_names: &mut HashSet<&'a str>,
    errs: &mut Errors,
) {
    let name_path = path.child("name");
    if c.name.is_empty() {
        errs.required(&name_path, "");
    } else {
        errs.invalid_each(&name_path, &c.name, dns1123_label_errors(&c.name));
    }
    if !names.insert(c.name.as_str()) && !c.name.is_empty() {
        errs.duplicate(&name_path, &c.name);
    }

    let image = c.image.as_deref().unwrap_or("");
    if image.is_empty() {
        errs.required(&path.child("image"), "");
    } else if image.trim() != image {
        errs.invalid(
            &path.child("image"),
            image,
            "must not have leading or trailing whitespace",
        );
    }

    let ports_path = path.child("ports");
    for (i, port) in c.ports.as_deref().unwrap_or(&[]).iter().enumerate() {
        let p = ports_path.index(i);
        if let Some(name) = port.name.as_deref().filter(|n| !n.is_empty()) {
            let msgs = iana_svc_name_errors(name);
            if !msgs.is_empty() {
                errs.invalid_each(&p.child("name"), name, msgs);
            } else if !port_names.insert(name) {
                errs.duplicate(&p.child("name"), name);
            }
        }
        if port.container_port == 0 {
            errs.required(&p.child("containerPort"), "");
        } else if !valid_port(port.container_port) {
            errs.invalid(
                &p.child("containerPort"),
                &port.container_port,
                PORT_RANGE_MSG,
            );
        }
        let host_port = port.host_port.unwrap_or(0);
        if host_port != 0 && !valid_port(host_port) {
            errs.invalid(&p.child("hostPort"), &host_port, PORT_RANGE_MSG);
        }
        let protocol = or_default(port.protocol.as_ref(), "TCP");
        if !PROTOCOLS.contains(&protocol) {
            errs.not_supported(&p.child("protocol"), protocol, PROTOCOLS);
        }
    }
}

fn validate_pod_status(status: &PodStatus, errs: &mut Errors) {
    let status_path = Path::new("status");
    if let Some(raw) = status.pod_ip.as_deref().filter(|ip| !ip.is_empty()) {
        if let Err(msg) = validate_ip(raw) {
            errs.invalid(&status_path.child("podIP"), raw, msg);
        }
    }
    let pod_ips = status.pod_ips.as_deref().unwrap_or(&[]);
    let list_path = status_path.child("podIPs");
    let mut parsed = Vec::new();
    for (i, pip) in pod_ips.iter().enumerate() {
        match validate_ip(&pip.ip) {
            Err(msg) => errs.invalid(&list_path.index(i).child("ip"), &pip.ip, msg),
            Ok(ip) => parsed.push(ip),
        }
    }
    // Dual-stack pods have one IP of each family, no more.
    if parsed.len() == pod_ips.len() && pod_ips.len() > 1 {
        let v4 = parsed.iter().filter(|ip| ip.is_ipv4()).count();
        if pod_ips.len() > 2 || v4 != 1 {
            let shown = serde_json::to_value(pod_ips).unwrap_or_default();
            errs.invalid(
                &list_path,
                &shown,
                "may specify no more than one IP for each IP family",
            );
        }
        let mut seen = HashSet::new();
        for (i, pip) in pod_ips.iter().enumerate() {
            if !seen.insert(pip.ip.as_str()) {
                errs.duplicate(&list_path.index(i).child("ip"), &pip.ip);
            }
        }
    }
}

/// A pod stays on the node it was bound to.
fn validate_pod_update(old: &Pod, new: &Pod, errs: &mut Errors) {
    let node_of = |p: &Pod| {
        p.spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default()
    };
    let (old_node, new_node) = (node_of(old), node_of(new));
    if !old_node.is_empty() && old_node != new_node {
        errs.invalid(&Path::new("spec").child("nodeName"), &new_node, IMMUTABLE);
    }
}

// ---------------------------------------------------------------------------
// Node.
// ---------------------------------------------------------------------------

const NODE_ADDRESS_TYPES: &[&str] = &[
    "ExternalDNS",
    "ExternalIP",
    "Hostname",
    "InternalDNS",
    "InternalIP",
];

fn validate_node(node: &Node, errs: &mut Errors) {
    validate_meta(&node.metadata, false, name_is_dns_subdomain, errs);
    let spec_path = Path::new("spec");
    if let Some(spec) = &node.spec {
        if let Some(cidr) = spec.pod_cidr.as_deref().filter(|c| !c.is_empty()) {
            if let Err(msg) = validate_cidr(cidr) {
                errs.invalid(&spec_path.child("podCIDR"), cidr, msg);
            }
        }
        let cidrs = spec.pod_cidrs.as_deref().unwrap_or(&[]);
        let list_path = spec_path.child("podCIDRs");
        let mut parsed = Vec::new();
        for (i, cidr) in cidrs.iter().enumerate() {
            match validate_cidr(cidr) {
                Err(msg) => errs.invalid(&list_path.index(i), cidr, msg),
                Ok(net) => parsed.push(net),
            }
        }
        if parsed.len() == cidrs.len() && cidrs.len() > 1 {
            let v4 = parsed.iter().filter(|n| n.is_ipv4()).count();
            if cidrs.len() > 2 || v4 != 1 {
                errs.invalid(
                    &list_path,
                    cidrs,
                    "may specify no more than one CIDR for each IP family",
                );
            }
        }
    }

    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or(&[]);
    let addr_path = Path::new("status").child("addresses");
    let mut seen = HashSet::new();
    for (i, a) in addresses.iter().enumerate() {
        let p = addr_path.index(i);
        if !NODE_ADDRESS_TYPES.contains(&a.type_.as_str()) {
            errs.not_supported(&p.child("type"), &a.type_, NODE_ADDRESS_TYPES);
        } else if a.type_.ends_with("IP") {
            if let Err(msg) = validate_ip(&a.address) {
                errs.invalid(&p.child("address"), &a.address, msg);
            }
        }
        if !seen.insert((a.type_.as_str(), a.address.as_str())) {
            let shown = serde_json::json!({ "address": a.address, "type": a.type_ });
            errs.duplicate(&p, &shown);
        }
    }
}

/// Pod CIDRs are assigned once: they may go from empty to set, never change.
fn validate_node_update(old: &Node, new: &Node, errs: &mut Errors) {
    const MSG: &str = "node updates may not change podCIDR except from \"\" to valid";
    let spec_path = Path::new("spec");
    let cidr_of = |n: &Node| {
        n.spec
            .as_ref()
            .and_then(|s| s.pod_cidr.clone())
            .unwrap_or_default()
    };
    let cidrs_of = |n: &Node| {
        n.spec
            .as_ref()
            .and_then(|s| s.pod_cidrs.clone())
            .unwrap_or_default()
    };
    let old_cidr = cidr_of(old);
    if !old_cidr.is_empty() && old_cidr != cidr_of(new) {
        errs.forbidden(&spec_path.child("podCIDR"), MSG);
    }
    let old_cidrs = cidrs_of(old);
    if !old_cidrs.is_empty() && old_cidrs != cidrs_of(new) {
        errs.forbidden(&spec_path.child("podCIDRs"), MSG);
    }
}

// ---------------------------------------------------------------------------
// EndpointSlice.
// ---------------------------------------------------------------------------

const ADDRESS_TYPES: &[&str] = &["FQDN", "IPv4", "IPv6"];
const MAX_ENDPOINTS: usize = 1000;
const MAX_ADDRESSES: usize = 100;
const MAX_ENDPOINT_PORTS: usize = 100;
const MAX_TOPOLOGY_LABELS: usize = 16;

fn validate_endpoint_slice(slice: &EndpointSlice, errs: &mut Errors) {
    validate_meta(&slice.metadata, true, name_is_dns_subdomain, errs);
    let type_path = Path::new("addressType");
    if slice.address_type.is_empty() {
        errs.required(&type_path, "");
    } else if !ADDRESS_TYPES.contains(&slice.address_type.as_str()) {
        errs.not_supported(&type_path, &slice.address_type, ADDRESS_TYPES);
    }

    let endpoints_path = Path::new("endpoints");
    if slice.endpoints.len() > MAX_ENDPOINTS {
        errs.too_many(&endpoints_path, slice.endpoints.len(), MAX_ENDPOINTS);
    } else {
        for (i, ep) in slice.endpoints.iter().enumerate() {
            validate_endpoint(ep, &slice.address_type, &endpoints_path.index(i), errs);
        }
    }

    let ports = slice.ports.as_deref().unwrap_or(&[]);
    let ports_path = Path::new("ports");
    if ports.len() > MAX_ENDPOINT_PORTS {
        errs.too_many(&ports_path, ports.len(), MAX_ENDPOINT_PORTS);
    } else {
        validate_endpoint_ports(ports, &ports_path, errs);
    }
}

fn validate_endpoint(ep: &Endpoint, address_type: &str, path: &Path, errs: &mut Errors) {
    let addr_path = path.child("addresses");
    if ep.addresses.is_empty() {
        errs.required(&addr_path, "must contain at least 1 address");
    } else if ep.addresses.len() > MAX_ADDRESSES {
        errs.too_many(&addr_path, ep.addresses.len(), MAX_ADDRESSES);
    }
    for (i, raw) in ep.addresses.iter().enumerate() {
        let p = addr_path.index(i);
        // Addresses of an unknown type are not checked (the type already failed).
        let want_v4 = match address_type {
            "IPv4" => true,
            "IPv6" => false,
            "FQDN" => {
                validate_fqdn(raw, &p, errs);
                continue;
            }
            _ => continue,
        };
        match validate_ip(raw) {
            Ok(ip) if ip.is_ipv4() == want_v4 => {
                errs.invalid_each(&p, raw, non_special_ip_errors(ip, raw));
            }
            _ => {
                let family = if want_v4 { "IPv4" } else { "IPv6" };
                errs.invalid(&p, raw, format!("must be a valid {family} address"));
            }
        }
    }
    if let Some(node) = &ep.node_name {
        errs.invalid_each(
            &path.child("nodeName"),
            node,
            dns1123_subdomain_errors(node),
        );
    }
    if let Some(topology) = &ep.deprecated_topology {
        let topo_path = path.child("deprecatedTopology");
        if topology.len() > MAX_TOPOLOGY_LABELS {
            errs.too_many(&topo_path, topology.len(), MAX_TOPOLOGY_LABELS);
        }
        validate_labels(Some(topology), &topo_path, errs);
    }
    if let Some(host) = &ep.hostname {
        errs.invalid_each(&path.child("hostname"), host, dns1123_label_errors(host));
    }
}

/// A slice's addresses are all of one type, fixed at creation.
fn validate_endpoint_slice_update(old: &EndpointSlice, new: &EndpointSlice, errs: &mut Errors) {
    if old.address_type != new.address_type {
        errs.invalid(&Path::new("addressType"), &new.address_type, IMMUTABLE);
    }
}

/// `validation.IsFullyQualifiedDomainName`: a subdomain of at least two
/// labels, optionally ending in a dot.
fn validate_fqdn(raw: &str, path: &Path, errs: &mut Errors) {
    if raw.is_empty() {
        errs.required(path, "");
        return;
    }
    let name = raw.strip_suffix('.').unwrap_or(raw);
    let msgs = dns1123_subdomain_errors(name);
    if !msgs.is_empty() {
        errs.invalid(path, name, msgs.join(","));
        return;
    }
    if !name.contains('.') {
        errs.invalid(
            path,
            name,
            "should be a domain with at least two segments separated by dots",
        );
        return;
    }
    for label in name.split('.') {
        let msgs = dns1123_label_errors(label);
        if !msgs.is_empty() {
            errs.invalid(path, label, msgs.join(","));
            return;
        }
    }
}

fn validate_endpoint_ports(ports: &[EndpointPort], path: &Path, errs: &mut Errors) {
    // Names are unique; the empty name counts too, so it may appear once.
    let mut names = HashSet::new();
    for (i, port) in ports.iter().enumerate() {
        let p = path.index(i);
        let name = port.name.as_deref().unwrap_or("");
        if !name.is_empty() {
            errs.invalid_each(&p.child("name"), name, dns1123_label_errors(name));
        }
        if !names.insert(name) {
            errs.duplicate(&p.child("name"), name);
        }
        if let Some(num) = port.port {
            if !valid_port(num) {
                errs.invalid(&p.child("port"), &num, PORT_RANGE_MSG);
            }
        }
        let protocol = or_default(port.protocol.as_ref(), "TCP");
        if !PROTOCOLS.contains(&protocol) {
            errs.not_supported(&p.child("protocol"), protocol, PROTOCOLS);
        }
        if let Some(app) = &port.app_protocol {
            errs.invalid_each(&p.child("appProtocol"), app, qualified_name_errors(app));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn obj(v: Value) -> Object {
        Object::from_value(v).unwrap()
    }

    fn errors(v: Value) -> Vec<String> {
        validate_object(&obj(v), &ValidationContext::default())
            .iter()
            .map(|e| e.to_string())
            .collect()
    }

    fn update_errors(old: Value, new: Value) -> Vec<String> {
        validate_update(&obj(old), &obj(new), &ValidationContext::default())
            .iter()
            .map(|e| e.to_string())
            .collect()
    }

    fn assert_has(errs: &[String], want: &str) {
        assert!(
            errs.iter().any(|e| e == want),
            "missing {want:?} in {errs:#?}"
        );
    }

    fn assert_clean(errs: &[String]) {
        assert!(errs.is_empty(), "unexpected errors: {errs:#?}");
    }

    fn svc(spec: Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": spec,
        })
    }

    fn pod(spec: Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web-0", "namespace": "default"},
            "spec": spec,
        })
    }

    fn node(spec: Value, status: Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "node-a"},
            "spec": spec,
            "status": status,
        })
    }

    fn slice(address_type: &str, endpoints: Value, ports: Value) -> Value {
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": "web-abc12", "namespace": "default"},
            "addressType": address_type,
            "endpoints": endpoints,
            "ports": ports,
        })
    }

    fn namespace(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    }

    // --- rendering -------------------------------------------------------

    #[test]
    fn display_matches_kubernetes_for_key_examples() {
        let e = errors(svc(json!({"ports": [{"port": 70000}]})));
        assert_has(
            &e,
            "spec.ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive",
        );

        let e = errors(svc(json!({"ports": [{"port": 80, "protocol": "SCTPX"}]})));
        assert_has(
            &e,
            r#"spec.ports[0].protocol: Unsupported value: "SCTPX": supported values: "SCTP", "TCP", "UDP""#,
        );

        let e = errors(svc(json!({"ports": [
            {"name": "http", "port": 80},
            {"name": "http", "port": 81},
        ]})));
        assert_eq!(e, vec![r#"spec.ports[1].name: Duplicate value: "http""#]);

        let e = errors(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "default"},
            "spec": {"ports": [{"port": 80}]},
        }));
        assert_eq!(
            e,
            vec!["metadata.name: Required value: name or generateName is required"]
        );

        let e = errors(svc(json!({"ports": [{"port": 80, "nodePort": 30080}]})));
        assert_eq!(
            e,
            vec!["spec.ports[0].nodePort: Forbidden: may not be used when `type` is 'ClusterIP'"]
        );
    }

    #[test]
    fn reason_and_message() {
        let errs = validate_object(
            &obj(svc(json!({"ports": [{"port": 0}]}))),
            &ValidationContext::default(),
        );
        assert_eq!(errs.len(), 1);
        let e = &errs[0];
        assert_eq!(e.kind, FieldErrorKind::Invalid);
        assert_eq!(e.reason(), "FieldValueInvalid");
        assert_eq!(e.field, "spec.ports[0].port");
        assert_eq!(e.value.as_deref(), Some("0"));
        assert_eq!(
            e.message(),
            "Invalid value: 0: must be between 1 and 65535, inclusive"
        );
        let required = FieldError {
            kind: FieldErrorKind::Required,
            field: "spec.ports".into(),
            value: None,
            detail: String::new(),
        };
        assert_eq!(required.to_string(), "spec.ports: Required value");
        assert_eq!(required.reason(), "FieldValueRequired");
    }

    #[test]
    fn strings_are_quoted_like_go() {
        assert_eq!(go_quote("abc"), r#""abc""#);
        assert_eq!(go_quote("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(go_quote("a\nb\t\u{1}"), r#""a\nb\t\x01""#);
        assert_eq!(go_quote("é"), "\"é\"");
        assert_eq!(go_quote("\u{a0}"), r#""\u00a0""#);
    }

    // --- syntax checks -----------------------------------------------------

    #[test]
    fn dns_label_and_subdomain_messages() {
        assert!(dns1123_label_errors("my-name").is_empty());
        assert!(dns1123_label_errors("123-abc").is_empty());
        assert_eq!(
            dns1123_label_errors("Bad_Name"),
            vec!["a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"]
        );
        assert_eq!(dns1123_label_errors("a.b"), vec!["must not contain dots"]);
        assert_eq!(
            dns1123_label_errors(&"a".repeat(64)),
            vec!["must be no more than 63 characters"]
        );
        assert!(!dns1123_label_errors("").is_empty());
        assert!(!dns1123_label_errors("-a").is_empty());
        assert!(!dns1123_label_errors("a-").is_empty());

        assert!(dns1123_subdomain_errors("example.com").is_empty());
        assert!(dns1123_subdomain_errors("a").is_empty());
        assert_eq!(
            dns1123_subdomain_errors("a..b"),
            vec!["a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"]
        );
        assert!(!dns1123_subdomain_errors(".a").is_empty());
        assert!(!dns1123_subdomain_errors("a.").is_empty());
        assert!(!dns1123_subdomain_errors("A.b").is_empty());
        let long = vec!["a".repeat(63); 4].join(".");
        assert_eq!(
            dns1123_subdomain_errors(&long),
            vec!["must be no more than 253 characters"]
        );

        assert!(dns1035_label_errors("web").is_empty());
        assert!(dns1035_label_errors("a").is_empty());
        assert_eq!(
            dns1035_label_errors("1web"),
            vec!["a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"]
        );
    }

    #[test]
    fn iana_service_names() {
        for ok in ["http", "h2c", "dns-tcp", "a", "abcdefghijklmno"] {
            assert!(iana_svc_name_errors(ok).is_empty(), "{ok}");
        }
        assert_eq!(
            iana_svc_name_errors("abcdefghijklmnop"),
            vec!["must be no more than 15 characters"]
        );
        assert_eq!(
            iana_svc_name_errors("HTTP"),
            vec![
                "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)",
                "must contain at least one letter (a-z)",
            ]
        );
        assert_eq!(
            iana_svc_name_errors("8080"),
            vec!["must contain at least one letter (a-z)"]
        );
        assert_eq!(
            iana_svc_name_errors("a--b"),
            vec!["must not contain consecutive hyphens"]
        );
        assert_eq!(
            iana_svc_name_errors("-ab"),
            vec!["must not begin or end with a hyphen"]
        );
        assert!(!iana_svc_name_errors("").is_empty());
    }

    #[test]
    fn label_keys_and_values() {
        for ok in [
            "app",
            "App.Name_1",
            "example.com/app",
            "kubernetes.io/service-name",
            "a",
        ] {
            assert_eq!(label_key_errors(ok), None, "{ok}");
        }
        let e = label_key_errors("-bad").unwrap();
        assert_eq!(
            e,
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
        );
        assert!(label_key_errors("")
            .unwrap()
            .starts_with("name part must be non-empty; name part must consist"));
        assert!(label_key_errors("/app")
            .unwrap()
            .starts_with("prefix part must be non-empty"));
        assert!(label_key_errors("Example.com/app")
            .unwrap()
            .starts_with("prefix part a lowercase RFC 1123 subdomain"));
        assert!(label_key_errors("example.com/")
            .unwrap()
            .starts_with("name part must be non-empty"));
        assert!(label_key_errors("a/b/c")
            .unwrap()
            .starts_with("a qualified name must consist of"));
        assert_eq!(
            label_key_errors(&"a".repeat(64)).as_deref(),
            Some("name part must be no more than 63 characters")
        );
        assert!(label_key_errors(&format!("{}/a", "a".repeat(254))).is_some());

        for ok in ["", "web", "my_value", "12345", "a.b-c"] {
            assert_eq!(label_value_errors(ok), None, "{ok:?}");
        }
        assert_eq!(
            label_value_errors("b c").as_deref(),
            Some("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')")
        );
        assert!(label_value_errors("-x").is_some());
        assert!(label_value_errors("(x").is_some());
        assert_eq!(
            label_value_errors(&"a".repeat(64)).as_deref(),
            Some("must be no more than 63 characters")
        );
    }

    #[test]
    fn ips_and_cidrs() {
        assert_eq!(validate_ip("10.0.0.1"), Ok("10.0.0.1".parse().unwrap()));
        assert!(validate_ip("2001:db8::1").is_ok());
        assert_eq!(validate_ip("10.0.0"), Err(IP_MSG.to_string()));
        assert_eq!(validate_ip(""), Err(IP_MSG.to_string()));
        assert_eq!(
            validate_ip("010.0.0.1"),
            Err("must not have leading 0s".to_string())
        );
        assert_eq!(
            validate_ip("::ffff:1.2.3.4"),
            Err("must not be an IPv4-mapped IPv6 address".to_string())
        );

        assert!(validate_cidr("10.244.0.0/24").is_ok());
        assert!(validate_cidr("fd00:10:244::/64").is_ok());
        assert!(validate_cidr("0.0.0.0/0").is_ok());
        for bad in [
            "10.244.0.1/24",
            "10.244.0.0",
            "10.244.0.0/33",
            "10.244.0.0/024",
            "10.244.0.0/",
            "10.244.0.0/-1",
            "fd00::1/64",
            "nonsense",
        ] {
            assert_eq!(validate_cidr(bad), Err(CIDR_MSG.to_string()), "{bad}");
        }
    }

    // --- metadata ----------------------------------------------------------

    #[test]
    fn valid_namespace() {
        assert_clean(&errors(namespace("kube-system")));
    }

    #[test]
    fn namespace_name_is_a_dns_label() {
        assert_eq!(
            errors(namespace("Bad_Name")),
            vec![
                r#"metadata.name: Invalid value: "Bad_Name": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"#
            ]
        );
        assert_eq!(
            errors(namespace("a.b")),
            vec![r#"metadata.name: Invalid value: "a.b": must not contain dots"#]
        );
    }

    #[test]
    fn service_name_is_a_dns1035_label() {
        let mut v = svc(json!({"ports": [{"port": 80}]}));
        v["metadata"]["name"] = json!("1web");
        let e = errors(v);
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with(r#"metadata.name: Invalid value: "1web": a DNS-1035 label"#));

        let mut v = svc(json!({"ports": [{"port": 80}]}));
        v["metadata"]["name"] = json!("a".repeat(64));
        assert_has(
            &errors(v),
            &format!(
                "metadata.name: Invalid value: \"{}\": must be no more than 63 characters",
                "a".repeat(64)
            ),
        );
    }

    #[test]
    fn subdomain_names_for_pods_nodes_and_slices() {
        let spec = json!({"containers": [{"name": "c", "image": "nginx"}]});
        let mut v = pod(spec.clone());
        v["metadata"]["name"] = json!("web.example-0");
        assert_clean(&errors(v));
        let mut v = pod(spec);
        v["metadata"]["name"] = json!("web..0");
        assert!(errors(v)[0].starts_with(
            r#"metadata.name: Invalid value: "web..0": a lowercase RFC 1123 subdomain"#
        ));

        let mut v = node(json!({}), json!({}));
        v["metadata"]["name"] = json!("Node_A");
        assert_eq!(errors(v).len(), 1);

        let mut v = slice("IPv4", json!([]), json!([]));
        v["metadata"]["name"] = json!("x".repeat(254));
        assert_has(
            &errors(v),
            &format!(
                "metadata.name: Invalid value: \"{}\": must be no more than 253 characters",
                "x".repeat(254)
            ),
        );
    }

    #[test]
    fn generate_name() {
        let mut v = svc(json!({"ports": [{"port": 80}]}));
        v["metadata"] = json!({"generateName": "web-", "namespace": "default"});
        assert_clean(&errors(v));

        let mut v = svc(json!({"ports": [{"port": 80}]}));
        v["metadata"] = json!({"generateName": "Web-"});
        let e = errors(v);
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with(r#"metadata.generateName: Invalid value: "Web-": a DNS-1035"#));

        let mut v = namespace("x");
        v["metadata"] = json!({"generateName": "team-"});
        assert_clean(&errors(v));
    }

    #[test]
    fn metadata_namespace_is_a_dns_label() {
        let mut v = svc(json!({"ports": [{"port": 80}]}));
        v["metadata"]["namespace"] = json!("Team_A");
        let e = errors(v);
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with(
            r#"metadata.namespace: Invalid value: "Team_A": a lowercase RFC 1123 label"#
        ));

        // Absent namespace: supplied by the request path.
        let mut v = svc(json!({"ports": [{"port": 80}]}));
        v["metadata"] = json!({"name": "web"});
        assert_clean(&errors(v));

        // Cluster-scoped kinds ignore it (the server clears it).
        let mut v = namespace("prod");
        v["metadata"]["namespace"] = json!("Whatever_");
        assert_clean(&errors(v));
    }

    #[test]
    fn labels_and_annotations() {
        let mut v = namespace("prod");
        v["metadata"]["labels"] = json!({
            "app": "web",
            "example.com/tier": "",
            "-bad": "ok",
            "good": "bad value",
        });
        let e = errors(v);
        assert_eq!(e.len(), 2, "{e:#?}");
        assert!(
            e[0].starts_with(r#"metadata.labels: Invalid value: "-bad": name part must consist"#)
        );
        assert!(e[1]
            .starts_with(r#"metadata.labels: Invalid value: "bad value": a valid label must be"#));

        let mut v = namespace("prod");
        v["metadata"]["annotations"] = json!({
            "Example.com/Note": "upper case keys are fine here",
            "bad key": "x",
        });
        let e = errors(v);
        assert_eq!(e.len(), 1, "{e:#?}");
        assert!(e[0].starts_with(
            r#"metadata.annotations: Invalid value: "bad key": name part must consist"#
        ));

        let mut v = namespace("prod");
        v["metadata"]["annotations"] = json!({"big": "x".repeat(256 * 1024)});
        assert_eq!(
            errors(v),
            vec!["metadata.annotations: Too long: may not be more than 262144 bytes"]
        );
        let mut v = namespace("prod");
        v["metadata"]["annotations"] = json!({"big": "x".repeat(256 * 1024 - 3)});
        assert_clean(&errors(v));
    }

    // --- Service -----------------------------------------------------------

    #[test]
    fn valid_services() {
        let good = [
            json!({"ports": [{"port": 80}]}),
            json!({"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                   "selector": {"app": "web"},
                   "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                             {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"},
                             {"name": "dns-tcp", "port": 53, "protocol": "TCP", "appProtocol": "kubernetes.io/h2c"}],
                   "sessionAffinity": "ClientIP",
                   "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86400}},
                   "internalTrafficPolicy": "Local",
                   "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack"}),
            json!({"type": "NodePort", "externalTrafficPolicy": "Local",
                   "ports": [{"port": 80, "nodePort": 30080}, ]}),
            json!({"type": "NodePort", "ports": [
                {"name": "a", "port": 80, "nodePort": 30080, "protocol": "TCP"},
                {"name": "b", "port": 80, "nodePort": 30080, "protocol": "UDP"}]}),
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                   "healthCheckNodePort": 32000, "loadBalancerSourceRanges": ["10.0.0.0/8", " 192.168.0.0/16 "],
                   "ports": [{"port": 443}]}),
            json!({"type": "LoadBalancer", "ports": [{"port": 443}]}),
            json!({"type": "ExternalName", "externalName": "db.example.com."}),
            json!({"type": "ExternalName", "externalName": "db", "ports": [{"port": 5432}]}),
            json!({"clusterIP": "None"}),
            json!({"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"port": 5432}]}),
            json!({"clusterIPs": ["10.96.0.11"], "ports": [{"port": 80}]}),
            json!({"clusterIP": "", "ports": [{"port": 80, "targetPort": 0, "nodePort": 0}]}),
            json!({"externalIPs": ["203.0.113.7"], "externalTrafficPolicy": "Cluster", "ports": [{"port": 80}]}),
            json!({"sessionAffinity": "ClientIP", "ports": [{"port": 80}]}),
        ];
        for spec in good {
            assert_clean(&errors(svc(spec)));
        }
    }

    #[test]
    fn service_spec_and_ports_required() {
        let v = json!({"apiVersion": "v1", "kind": "Service",
                       "metadata": {"name": "web", "namespace": "default"}});
        assert_eq!(errors(v), vec!["spec: Required value"]);
        assert_eq!(errors(svc(json!({}))), vec!["spec.ports: Required value"]);
        assert_eq!(
            errors(svc(json!({"type": "NodePort", "ports": []}))),
            vec!["spec.ports: Required value"]
        );
    }

    #[test]
    fn service_type_must_be_supported() {
        assert_eq!(
            errors(svc(json!({"type": "Headless", "ports": [{"port": 80}]}))),
            vec![
                r#"spec.type: Unsupported value: "Headless": supported values: "ClusterIP", "ExternalName", "LoadBalancer", "NodePort""#
            ]
        );
    }

    #[test]
    fn service_port_rules() {
        let e = errors(svc(
            json!({"ports": [{"port": 80}, {"port": 81, "name": "b"}]}),
        ));
        assert_eq!(e, vec!["spec.ports[0].name: Required value"]);

        let e = errors(svc(json!({"ports": [{"port": 80, "name": "HTTP"}]})));
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with(
            r#"spec.ports[0].name: Invalid value: "HTTP": a lowercase RFC 1123 label"#
        ));

        let e = errors(svc(json!({"ports": [{"port": -1}]})));
        assert_eq!(
            e,
            vec!["spec.ports[0].port: Invalid value: -1: must be between 1 and 65535, inclusive"]
        );

        let e = errors(svc(json!({"ports": [
            {"name": "a", "port": 80},
            {"name": "b", "port": 80, "protocol": "TCP"},
        ]})));
        assert_eq!(
            e,
            vec![r#"spec.ports[1]: Duplicate value: {"port":80,"protocol":"TCP"}"#]
        );

        let e = errors(svc(json!({"ports": [{"port": 80, "targetPort": 0x10000}]})));
        assert_eq!(
            e,
            vec!["spec.ports[0].targetPort: Invalid value: 65536: must be between 1 and 65535, inclusive"]
        );
        let e = errors(svc(
            json!({"ports": [{"port": 80, "targetPort": "Web_Port"}]}),
        ));
        assert_eq!(
            e,
            vec![
                r#"spec.ports[0].targetPort: Invalid value: "Web_Port": must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)"#
            ]
        );
        let e = errors(svc(
            json!({"ports": [{"port": 80, "targetPort": "very-long-port-name"}]}),
        ));
        assert_eq!(
            e,
            vec![
                r#"spec.ports[0].targetPort: Invalid value: "very-long-port-name": must be no more than 15 characters"#
            ]
        );

        let e = errors(svc(json!({"ports": [{"port": 80, "appProtocol": "-x"}]})));
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with(r#"spec.ports[0].appProtocol: Invalid value: "-x""#));
    }

    #[test]
    fn node_ports() {
        let e = errors(svc(
            json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 80}]}),
        ));
        assert_eq!(
            e,
            vec!["spec.ports[0].nodePort: Invalid value: 80: provided port is not in the valid range. The range of valid ports is 30000-32767"]
        );
        let e = errors(svc(
            json!({"type": "LoadBalancer", "ports": [{"port": 80, "nodePort": -5}]}),
        ));
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("spec.ports[0].nodePort: Invalid value: -5: provided port"));

        let e = errors(svc(json!({"type": "NodePort", "ports": [
            {"name": "a", "port": 80, "nodePort": 30080},
            {"name": "b", "port": 81, "nodePort": 30080},
        ]})));
        assert_eq!(e, vec!["spec.ports[1].nodePort: Duplicate value: 30080"]);

        let e = errors(svc(
            json!({"type": "ExternalName", "externalName": "db.example.com",
                                  "ports": [{"port": 80, "nodePort": 30080}]}),
        ));
        assert_eq!(
            e,
            vec![
                "spec.ports[0].nodePort: Forbidden: may not be used when `type` is 'ExternalName'"
            ]
        );

        // The range comes from the context.
        let ctx = ValidationContext {
            node_port_range: 20000..=20100,
            ..ValidationContext::default()
        };
        let v = obj(svc(
            json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}),
        ));
        let e: Vec<String> = validate_object(&v, &ctx)
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(
            e,
            vec!["spec.ports[0].nodePort: Invalid value: 30080: provided port is not in the valid range. The range of valid ports is 20000-20100"]
        );
    }

    #[test]
    fn cluster_ips() {
        assert_eq!(
            errors(svc(
                json!({"clusterIP": "1.2.3.4", "ports": [{"port": 80}]})
            )),
            vec![
                r#"spec.clusterIP: Invalid value: "1.2.3.4": failed to allocate IP 1.2.3.4: the provided IP (1.2.3.4) is not in the valid range. The range of valid IPs is 10.96.0.0/12"#
            ]
        );
        // The network and broadcast addresses are never allocatable.
        assert_eq!(
            errors(svc(
                json!({"clusterIP": "10.96.0.0", "ports": [{"port": 80}]})
            ))
            .len(),
            1
        );
        assert_eq!(
            errors(svc(
                json!({"clusterIP": "10.111.255.255", "ports": [{"port": 80}]})
            ))
            .len(),
            1
        );
        assert_clean(&errors(svc(
            json!({"clusterIP": "10.111.255.254", "ports": [{"port": 80}]}),
        )));
        assert_eq!(
            errors(svc(
                json!({"clusterIP": "10.96.0.300", "ports": [{"port": 80}]})
            )),
            vec![
                r#"spec.clusterIP: Invalid value: "10.96.0.300": must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"#
            ]
        );
        assert_eq!(
            errors(svc(
                json!({"clusterIPs": ["10.0.0.1"], "ports": [{"port": 80}]})
            )),
            vec![
                r#"spec.clusterIPs[0]: Invalid value: "10.0.0.1": failed to allocate IP 10.0.0.1: the provided IP (10.0.0.1) is not in the valid range. The range of valid IPs is 10.96.0.0/12"#
            ]
        );
        assert_eq!(
            errors(svc(
                json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.11"],
                              "ports": [{"port": 80}]})
            )),
            vec![
                r#"spec.clusterIPs: Invalid value: ["10.96.0.11"]: first value must match `clusterIP`"#
            ]
        );
        assert_eq!(
            errors(svc(
                json!({"type": "LoadBalancer", "clusterIP": "None", "ports": [{"port": 80}]})
            )),
            vec![
                r#"spec.clusterIP: Invalid value: "None": may not be set to 'None' for LoadBalancer services"#
            ]
        );
        assert_eq!(
            errors(svc(
                json!({"type": "NodePort", "clusterIPs": ["None"], "ports": [{"port": 80}]})
            )),
            vec![
                r#"spec.clusterIPs[0]: Invalid value: "None": may not be set to 'None' for NodePort services"#
            ]
        );
        assert_eq!(
            errors(svc(
                json!({"clusterIP": "None", "clusterIPs": ["None", "10.96.0.1"]})
            )),
            vec![
                r#"spec.clusterIPs: Invalid value: ["None","10.96.0.1"]: 'None' must be the first and only value"#
            ]
        );
        assert_eq!(
            errors(svc(
                json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "10.96.0.11"],
                              "ports": [{"port": 80}]})
            )),
            vec![
                r#"spec.clusterIPs: Invalid value: ["10.96.0.10","10.96.0.11"]: may specify no more than one IP for each IP family"#
            ]
        );
        assert_eq!(
            errors(svc(
                json!({"clusterIP": "10.96.0.10", "ipFamilies": ["IPv6"],
                              "ports": [{"port": 80}]})
            )),
            vec![
                r#"spec.clusterIP: Invalid value: "10.96.0.10": expected an IPv6 value as indicated by `ipFamilies[0]`"#
            ]
        );
    }

    #[test]
    fn dual_stack_cluster_ips() {
        let ctx = ValidationContext {
            service_cidrs: vec![
                "10.96.0.0/12".parse().unwrap(),
                "fd00:10:96::/112".parse().unwrap(),
            ],
            ..ValidationContext::default()
        };
        let check = |spec: Value| -> Vec<String> {
            validate_object(&obj(svc(spec)), &ctx)
                .iter()
                .map(|e| e.to_string())
                .collect()
        };
        assert_clean(&check(json!({
            "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:10:96::a"],
            "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
            "ports": [{"port": 80}]})));
        assert_eq!(
            check(
                json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:20::a"],
                         "ports": [{"port": 80}]})
            ),
            vec![
                r#"spec.clusterIPs[1]: Invalid value: "fd00:20::a": failed to allocate IP fd00:20::a: the provided IP (fd00:20::a) is not in the valid range. The range of valid IPs is fd00:10:96::/112"#
            ]
        );
        assert_eq!(
            check(
                json!({"ipFamilies": ["IPv4", "IPv4"], "ipFamilyPolicy": "Dual",
                         "ports": [{"port": 80}]})
            ),
            vec![
                r#"spec.ipFamilies[1]: Duplicate value: "IPv4""#,
                r#"spec.ipFamilyPolicy: Unsupported value: "Dual": supported values: "PreferDualStack", "RequireDualStack", "SingleStack""#,
            ]
        );
        assert_eq!(
            check(json!({"ipFamilies": ["IPv5"], "ports": [{"port": 80}]})),
            vec![
                r#"spec.ipFamilies[0]: Unsupported value: "IPv5": supported values: "IPv4", "IPv6""#
            ]
        );
    }

    #[test]
    fn external_name_services() {
        assert_eq!(
            errors(svc(json!({"type": "ExternalName"}))),
            vec!["spec.externalName: Required value"]
        );
        assert_eq!(
            errors(svc(json!({"type": "ExternalName", "externalName": "."}))),
            vec!["spec.externalName: Required value"]
        );
        let e = errors(svc(
            json!({"type": "ExternalName", "externalName": "Bad_Host"}),
        ));
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with(
            r#"spec.externalName: Invalid value: "Bad_Host": a lowercase RFC 1123 subdomain"#
        ));
        assert_eq!(
            errors(svc(
                json!({"type": "ExternalName", "externalName": "db.example.com",
                              "clusterIP": "10.96.0.10", "ipFamilies": ["IPv4"]})
            )),
            vec![
                "spec.clusterIP: Forbidden: may not be set for ExternalName services",
                "spec.ipFamilies: Forbidden: may not be set for ExternalName services",
            ]
        );
    }

    #[test]
    fn session_affinity() {
        assert_eq!(
            errors(svc(
                json!({"sessionAffinity": "Sticky", "ports": [{"port": 80}]})
            )),
            vec![
                r#"spec.sessionAffinity: Unsupported value: "Sticky": supported values: "ClientIP", "None""#
            ]
        );
        assert_eq!(
            errors(svc(json!({"sessionAffinity": "ClientIP",
                              "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86401}},
                              "ports": [{"port": 80}]}))),
            vec!["spec.sessionAffinityConfig.clientIP.timeoutSeconds: Invalid value: 86401: must be greater than 0 and less than 86400"]
        );
        assert_eq!(
            errors(svc(json!({"sessionAffinity": "ClientIP",
                              "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}},
                              "ports": [{"port": 80}]})))
            .len(),
            1
        );
        assert_eq!(
            errors(svc(json!({"sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                              "ports": [{"port": 80}]}))),
            vec!["spec.sessionAffinityConfig: Forbidden: must not be set when session affinity is None"]
        );
    }

    #[test]
    fn traffic_policies_and_health_check_port() {
        assert_eq!(
            errors(svc(
                json!({"externalTrafficPolicy": "Cluster", "ports": [{"port": 80}]})
            )),
            vec![
                r#"spec.externalTrafficPolicy: Invalid value: "Cluster": may only be set for externally-accessible services"#
            ]
        );
        assert_eq!(
            errors(svc(
                json!({"type": "NodePort", "externalTrafficPolicy": "Global",
                              "ports": [{"port": 80}]})
            )),
            vec![
                r#"spec.externalTrafficPolicy: Unsupported value: "Global": supported values: "Cluster", "Local""#
            ]
        );
        assert_eq!(
            errors(svc(
                json!({"internalTrafficPolicy": "Node", "ports": [{"port": 80}]})
            )),
            vec![
                r#"spec.internalTrafficPolicy: Unsupported value: "Node": supported values: "Cluster", "Local""#
            ]
        );
        assert_eq!(
            errors(svc(json!({"type": "NodePort", "externalTrafficPolicy": "Local",
                              "healthCheckNodePort": 31000, "ports": [{"port": 80}]}))),
            vec!["spec.healthCheckNodePort: Invalid value: 31000: may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'"]
        );
        assert_eq!(
            errors(svc(json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                              "healthCheckNodePort": 10256, "ports": [{"port": 80}]}))),
            vec!["spec.healthCheckNodePort: Invalid value: 10256: provided port is not in the valid range. The range of valid ports is 30000-32767"]
        );
        assert_eq!(
            errors(svc(json!({"loadBalancerSourceRanges": ["10.0.0.1/8"], "ports": [{"port": 80}]}))),
            vec![
                "spec.loadBalancerSourceRanges: Forbidden: may only be used when `type` is 'LoadBalancer'",
                r#"spec.loadBalancerSourceRanges[0]: Invalid value: "10.0.0.1/8": must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"#,
            ]
        );
    }

    #[test]
    fn external_ips() {
        let e = errors(svc(json!({"externalIPs": [
            "203.0.113.7", "0.0.0.0", "127.0.0.1", "169.254.1.1", "224.0.0.5",
            "fe80::1", "::1", "nope"],
            "ports": [{"port": 80}]})));
        assert_eq!(
            e,
            vec![
                r#"spec.externalIPs[1]: Invalid value: "0.0.0.0": may not be unspecified (0.0.0.0)"#,
                r#"spec.externalIPs[2]: Invalid value: "127.0.0.1": may not be in the loopback range (127.0.0.0/8, ::1/128)"#,
                r#"spec.externalIPs[3]: Invalid value: "169.254.1.1": may not be in the link-local range (169.254.0.0/16, fe80::/10)"#,
                r#"spec.externalIPs[4]: Invalid value: "224.0.0.5": may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)"#,
                r#"spec.externalIPs[5]: Invalid value: "fe80::1": may not be in the link-local range (169.254.0.0/16, fe80::/10)"#,
                r#"spec.externalIPs[6]: Invalid value: "::1": may not be in the loopback range (127.0.0.0/8, ::1/128)"#,
                r#"spec.externalIPs[7]: Invalid value: "nope": must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"#,
            ]
        );
    }

    #[test]
    fn service_selector_is_label_syntax() {
        let e = errors(svc(
            json!({"selector": {"app": "a b", "-k": "v"}, "ports": [{"port": 80}]}),
        ));
        assert_eq!(e.len(), 2, "{e:#?}");
        assert!(e[0].starts_with(r#"spec.selector: Invalid value: "-k": name part"#));
        assert!(e[1].starts_with(r#"spec.selector: Invalid value: "a b": a valid label"#));
    }

    // --- updates -----------------------------------------------------------

    #[test]
    fn service_cluster_ip_is_immutable() {
        let old = svc(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}));
        assert_clean(&update_errors(old.clone(), old.clone()));
        assert_eq!(
            update_errors(
                old.clone(),
                svc(json!({"clusterIP": "10.96.0.20", "ports": [{"port": 80}]}))
            ),
            vec![r#"spec.clusterIP: Invalid value: "10.96.0.20": field is immutable"#]
        );
        // Clearing it is only allowed when becoming ExternalName.
        assert_eq!(
            update_errors(old.clone(), svc(json!({"ports": [{"port": 80}]}))),
            vec![r#"spec.clusterIP: Invalid value: "": field is immutable"#]
        );
        assert_eq!(
            update_errors(
                old.clone(),
                svc(json!({"clusterIP": "None", "ports": [{"port": 80}]}))
            ),
            vec![r#"spec.clusterIP: Invalid value: "None": field is immutable"#]
        );
        assert_clean(&update_errors(
            old.clone(),
            svc(json!({"type": "ExternalName", "externalName": "db.example.com"})),
        ));
        assert_clean(&update_errors(
            svc(json!({"type": "ExternalName", "externalName": "db.example.com"})),
            svc(json!({"type": "NodePort", "clusterIP": "10.96.0.30",
                       "ports": [{"port": 80, "nodePort": 30001}]})),
        ));
        // Type changes among the IP-bearing types keep the IP.
        assert_clean(&update_errors(
            old.clone(),
            svc(json!({"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                       "ports": [{"port": 80, "nodePort": 30001}]})),
        ));
        // An unset cluster IP may be set (the allocator fills it in).
        assert_clean(&update_errors(svc(json!({"ports": [{"port": 80}]})), old));
    }

    #[test]
    fn names_and_namespaces_are_immutable() {
        let old = svc(json!({"ports": [{"port": 80}]}));
        let mut new = old.clone();
        new["metadata"]["name"] = json!("other");
        new["metadata"]["namespace"] = json!("prod");
        assert_eq!(
            update_errors(old.clone(), new),
            vec![
                r#"metadata.name: Invalid value: "other": field is immutable"#,
                r#"metadata.namespace: Invalid value: "prod": field is immutable"#,
            ]
        );
        assert_eq!(
            update_errors(namespace("a"), namespace("b")),
            vec![r#"metadata.name: Invalid value: "b": field is immutable"#]
        );
        assert_eq!(
            update_errors(namespace("a"), old),
            vec![r#"kind: Invalid value: "Service": field is immutable"#]
        );
    }

    #[test]
    fn node_pod_cidr_set_once() {
        let empty = node(json!({}), json!({}));
        let set = node(
            json!({"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]}),
            json!({}),
        );
        assert_clean(&update_errors(empty, set.clone()));
        assert_clean(&update_errors(set.clone(), set.clone()));
        let moved = node(
            json!({"podCIDR": "10.244.2.0/24", "podCIDRs": ["10.244.2.0/24"]}),
            json!({}),
        );
        assert_eq!(
            update_errors(set.clone(), moved),
            vec![
                r#"spec.podCIDR: Forbidden: node updates may not change podCIDR except from "" to valid"#,
                r#"spec.podCIDRs: Forbidden: node updates may not change podCIDR except from "" to valid"#,
            ]
        );
        let cleared = node(json!({}), json!({}));
        assert_eq!(update_errors(set, cleared).len(), 2);
    }

    #[test]
    fn pod_node_name_set_once() {
        let spec = |node: Option<&str>| {
            let mut s = json!({"containers": [{"name": "c", "image": "nginx"}]});
            if let Some(n) = node {
                s["nodeName"] = json!(n);
            }
            pod(s)
        };
        assert_clean(&update_errors(spec(None), spec(Some("node-a"))));
        assert_clean(&update_errors(spec(Some("node-a")), spec(Some("node-a"))));
        assert_eq!(
            update_errors(spec(Some("node-a")), spec(Some("node-b"))),
            vec![r#"spec.nodeName: Invalid value: "node-b": field is immutable"#]
        );
        assert_eq!(
            update_errors(spec(Some("node-a")), spec(None)),
            vec![r#"spec.nodeName: Invalid value: "": field is immutable"#]
        );
    }

    #[test]
    fn endpoint_slice_address_type_is_immutable() {
        let old = slice("IPv4", json!([{"addresses": ["10.244.1.5"]}]), json!([]));
        let new = slice("IPv6", json!([{"addresses": ["fd00::5"]}]), json!([]));
        assert_eq!(
            update_errors(old.clone(), new),
            vec![r#"addressType: Invalid value: "IPv6": field is immutable"#]
        );
        assert_clean(&update_errors(old.clone(), old));
    }

    // --- Pod ---------------------------------------------------------------

    #[test]
    fn valid_pod() {
        let mut v = pod(json!({
            "nodeName": "node-a.example",
            "hostname": "web-0",
            "subdomain": "web",
            "initContainers": [{"name": "init", "image": "busybox"}],
            "containers": [
                {"name": "web", "image": "nginx:1.27",
                 "ports": [{"name": "http", "containerPort": 80},
                           {"name": "metrics", "containerPort": 9090, "hostPort": 9090, "protocol": "TCP"}]},
                {"name": "dns", "image": "coredns",
                 "ports": [{"containerPort": 53, "protocol": "UDP"}, {"containerPort": 53, "protocol": "SCTP"}]},
            ],
        }));
        v["status"] = json!({"podIP": "10.244.1.5",
                             "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00:244::5"}]});
        assert_clean(&errors(v));
    }

    #[test]
    fn pod_rules() {
        let v = json!({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": "p", "namespace": "default"}});
        assert_eq!(errors(v), vec!["spec: Required value"]);
        assert_eq!(
            errors(pod(json!({"containers": []}))),
            vec!["spec.containers: Required value"]
        );
        assert_eq!(
            errors(pod(
                json!({"containers": [{"name": "web"}, {"name": "web", "image": "x"}]})
            )),
            vec![
                "spec.containers[0].image: Required value",
                r#"spec.containers[1].name: Duplicate value: "web""#,
            ]
        );
        assert_eq!(
            errors(pod(
                json!({"initContainers": [{"name": "web", "image": "x"}],
                              "containers": [{"name": "web", "image": "x"}]})
            )),
            vec![r#"spec.containers[0].name: Duplicate value: "web""#]
        );
        let e = errors(pod(json!({"containers": [{"name": "Web", "image": " x"}]})));
        assert_eq!(e.len(), 2);
        assert!(e[0].starts_with(
            r#"spec.containers[0].name: Invalid value: "Web": a lowercase RFC 1123 label"#
        ));
        assert_eq!(
            e[1],
            r#"spec.containers[0].image: Invalid value: " x": must not have leading or trailing whitespace"#
        );
        assert_eq!(
            errors(pod(json!({"containers": [{"image": "x"}]}))),
            vec!["spec.containers[0].name: Required value"]
        );
    }

    #[test]
    fn pod_container_ports() {
        let e = errors(pod(json!({"containers": [
            {"name": "a", "image": "x", "ports": [
                {"containerPort": 70000},
                {"containerPort": 80, "hostPort": 65536},
                {"containerPort": 81, "protocol": "ICMP"},
                {"containerPort": 82, "name": "HTTP"},
                {"containerPort": 83, "name": "http"},
                {},
            ]},
            {"name": "b", "image": "x", "ports": [{"containerPort": 84, "name": "http"}]},
        ]})));
        assert_eq!(
            e,
            vec![
                "spec.containers[0].ports[0].containerPort: Invalid value: 70000: must be between 1 and 65535, inclusive",
                "spec.containers[0].ports[1].hostPort: Invalid value: 65536: must be between 1 and 65535, inclusive",
                r#"spec.containers[0].ports[2].protocol: Unsupported value: "ICMP": supported values: "SCTP", "TCP", "UDP""#,
                r#"spec.containers[0].ports[3].name: Invalid value: "HTTP": must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)"#,
                r#"spec.containers[0].ports[3].name: Invalid value: "HTTP": must contain at least one letter (a-z)"#,
                "spec.containers[0].ports[5].containerPort: Required value",
                r#"spec.containers[1].ports[0].name: Duplicate value: "http""#,
            ]
        );
    }

    #[test]
    fn pod_spec_names_and_status_ips() {
        let e = errors(pod(json!({"nodeName": "Node_A", "hostname": "a.b",
                                  "containers": [{"name": "c", "image": "x"}]})));
        assert_eq!(e.len(), 2, "{e:#?}");
        assert!(e[0].starts_with(
            r#"spec.nodeName: Invalid value: "Node_A": a lowercase RFC 1123 subdomain"#
        ));
        assert_eq!(
            e[1],
            r#"spec.hostname: Invalid value: "a.b": must not contain dots"#
        );

        let mut v = pod(json!({"containers": [{"name": "c", "image": "x"}]}));
        v["status"] = json!({"podIP": "10.244.1", "podIPs": [{"ip": "x"}]});
        assert_eq!(
            errors(v),
            vec![
                r#"status.podIP: Invalid value: "10.244.1": must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"#,
                r#"status.podIPs[0].ip: Invalid value: "x": must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"#,
            ]
        );
        let mut v = pod(json!({"containers": [{"name": "c", "image": "x"}]}));
        v["status"] = json!({"podIPs": [{"ip": "10.244.1.5"}, {"ip": "10.244.1.5"}]});
        assert_eq!(
            errors(v),
            vec![
                r#"status.podIPs: Invalid value: [{"ip":"10.244.1.5"},{"ip":"10.244.1.5"}]: may specify no more than one IP for each IP family"#,
                r#"status.podIPs[1].ip: Duplicate value: "10.244.1.5""#,
            ]
        );
    }

    // --- Node --------------------------------------------------------------

    #[test]
    fn valid_node() {
        assert_clean(&errors(node(
            json!({"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:244:1::/64"]}),
            json!({"addresses": [
                {"type": "InternalIP", "address": "192.168.1.10"},
                {"type": "InternalIP", "address": "fd00::10"},
                {"type": "ExternalIP", "address": "203.0.113.10"},
                {"type": "Hostname", "address": "node-a"},
                {"type": "InternalDNS", "address": "node-a.cluster.internal"},
                {"type": "ExternalDNS", "address": "node-a.example.com"},
            ]}),
        )));
    }

    #[test]
    fn node_rules() {
        assert_eq!(
            errors(node(
                json!({"podCIDR": "10.244.1.1/24", "podCIDRs": ["10.244.1.0/24", "banana"]}),
                json!({})
            )),
            vec![
                r#"spec.podCIDR: Invalid value: "10.244.1.1/24": must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"#,
                r#"spec.podCIDRs[1]: Invalid value: "banana": must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"#,
            ]
        );
        assert_eq!(
            errors(node(
                json!({"podCIDRs": ["10.244.1.0/24", "10.244.2.0/24"]}),
                json!({})
            )),
            vec![
                r#"spec.podCIDRs: Invalid value: ["10.244.1.0/24","10.244.2.0/24"]: may specify no more than one CIDR for each IP family"#
            ]
        );
        assert_eq!(
            errors(node(
                json!({}),
                json!({"addresses": [
                    {"type": "PublicIP", "address": "1.2.3.4"},
                    {"type": "InternalIP", "address": "node-a"},
                    {"type": "Hostname", "address": "node-a"},
                    {"type": "Hostname", "address": "node-a"},
                ]})
            )),
            vec![
                r#"status.addresses[0].type: Unsupported value: "PublicIP": supported values: "ExternalDNS", "ExternalIP", "Hostname", "InternalDNS", "InternalIP""#,
                r#"status.addresses[1].address: Invalid value: "node-a": must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"#,
                r#"status.addresses[3]: Duplicate value: {"address":"node-a","type":"Hostname"}"#,
            ]
        );
    }

    // --- EndpointSlice -----------------------------------------------------

    #[test]
    fn valid_endpoint_slices() {
        assert_clean(&errors(slice(
            "IPv4",
            json!([
                {"addresses": ["10.244.1.5"], "hostname": "web-0", "nodeName": "node-a",
                 "zone": "z1", "conditions": {"ready": true}},
                {"addresses": ["10.244.2.7", "10.244.2.8"]},
            ]),
            json!([{"name": "http", "port": 8080, "protocol": "TCP"},
                   {"name": "", "port": 53, "protocol": "UDP", "appProtocol": "dns"}]),
        )));
        assert_clean(&errors(slice(
            "IPv6",
            json!([{"addresses": ["fd00:244::5"]}]),
            json!([{"port": 80}]),
        )));
        assert_clean(&errors(slice(
            "FQDN",
            json!([{"addresses": ["web.example.com", "db.example.com."]}]),
            json!(null),
        )));
        assert_clean(&errors(slice("IPv4", json!([]), json!([]))));
    }

    #[test]
    fn endpoint_slice_address_type() {
        assert_eq!(
            errors(slice("", json!([]), json!([]))),
            vec!["addressType: Required value"]
        );
        assert_eq!(
            errors(slice("IPv5", json!([{"addresses": ["x"]}]), json!([]))),
            vec![
                r#"addressType: Unsupported value: "IPv5": supported values: "FQDN", "IPv4", "IPv6""#
            ]
        );
    }

    #[test]
    fn endpoint_rules() {
        let e = errors(slice(
            "IPv4",
            json!([
                {"addresses": []},
                {"addresses": ["fd00::1", "10.0.0.300", "127.0.0.1"]},
                {"addresses": ["10.244.1.5"], "hostname": "Web", "nodeName": "node_a"},
            ]),
            json!([]),
        ));
        assert_eq!(e.len(), 6, "{e:#?}");
        assert_eq!(
            e[0],
            "endpoints[0].addresses: Required value: must contain at least 1 address"
        );
        assert_eq!(
            e[1],
            r#"endpoints[1].addresses[0]: Invalid value: "fd00::1": must be a valid IPv4 address"#
        );
        assert_eq!(
            e[2],
            r#"endpoints[1].addresses[1]: Invalid value: "10.0.0.300": must be a valid IPv4 address"#
        );
        assert_eq!(
            e[3],
            r#"endpoints[1].addresses[2]: Invalid value: "127.0.0.1": may not be in the loopback range (127.0.0.0/8, ::1/128)"#
        );
        assert!(e[4].starts_with(
            r#"endpoints[2].nodeName: Invalid value: "node_a": a lowercase RFC 1123 subdomain"#
        ));
        assert!(e[5].starts_with(
            r#"endpoints[2].hostname: Invalid value: "Web": a lowercase RFC 1123 label"#
        ));

        assert_eq!(
            errors(slice(
                "IPv6",
                json!([{"addresses": ["10.0.0.1"]}]),
                json!([])
            )),
            vec![
                r#"endpoints[0].addresses[0]: Invalid value: "10.0.0.1": must be a valid IPv6 address"#
            ]
        );
        let e = errors(slice(
            "FQDN",
            json!([{"addresses": ["db", "Bad_Name.com", "-a.b"]}]),
            json!([]),
        ));
        assert_eq!(e.len(), 3, "{e:#?}");
        assert_eq!(
            e[0],
            r#"endpoints[0].addresses[0]: Invalid value: "db": should be a domain with at least two segments separated by dots"#
        );
        assert!(e[1].starts_with(r#"endpoints[0].addresses[1]: Invalid value: "Bad_Name.com": a lowercase RFC 1123 subdomain"#));

        let many: Vec<Value> = (0..101)
            .map(|i| json!(format!("10.244.0.{}", i % 250 + 1)))
            .collect();
        assert_eq!(
            errors(slice("IPv4", json!([{"addresses": many}]), json!([]))),
            vec!["endpoints[0].addresses: Too many: 101: must have at most 100 items"]
        );
        let endpoints: Vec<Value> = (0..1001)
            .map(|_| json!({"addresses": ["10.244.0.1"]}))
            .collect();
        assert_eq!(
            errors(slice("IPv4", json!(endpoints), json!([]))),
            vec!["endpoints: Too many: 1001: must have at most 1000 items"]
        );
    }

    #[test]
    fn endpoint_port_rules() {
        let e = errors(slice(
            "IPv4",
            json!([]),
            json!([
                {"port": 80},
                {"port": 81},
                {"name": "http", "port": 0},
                {"name": "http", "port": 82, "protocol": "ICMP"},
                {"name": "Web", "port": 83},
            ]),
        ));
        assert_eq!(e.len(), 5, "{e:#?}");
        assert_eq!(e[0], r#"ports[1].name: Duplicate value: """#);
        assert_eq!(
            e[1],
            "ports[2].port: Invalid value: 0: must be between 1 and 65535, inclusive"
        );
        assert_eq!(e[2], r#"ports[3].name: Duplicate value: "http""#);
        assert_eq!(
            e[3],
            r#"ports[3].protocol: Unsupported value: "ICMP": supported values: "SCTP", "TCP", "UDP""#
        );
        assert!(
            e[4].starts_with(r#"ports[4].name: Invalid value: "Web": a lowercase RFC 1123 label"#)
        );

        let ports: Vec<Value> = (0..101)
            .map(|i| json!({"name": format!("p{i}"), "port": 80}))
            .collect();
        assert_eq!(
            errors(slice("IPv4", json!([]), json!(ports))),
            vec!["ports: Too many: 101: must have at most 100 items"]
        );
    }
}
