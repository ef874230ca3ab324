//! The five kinds weft stores, as one enum over the `k8s-openapi` types, and
//! the facts about each kind (API group, plural, scope) the API server and
//! netctl need.

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use std::fmt;

/// A kind of object weft stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Node,
    Pod,
    Service,
    EndpointSlice,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Namespace,
        Kind::Node,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
    ];

    /// The `kind` field of objects of this kind.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }

    /// API group ("" for the core group).
    pub fn group(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io",
            _ => "",
        }
    }

    /// The `apiVersion` field of objects of this kind.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    /// The lower-case plural used in URL paths.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Node => "nodes",
            Kind::Pod => "pods",
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
        }
    }

    /// The lower-case singular (as in discovery documents).
    pub fn singular(self) -> &'static str {
        match self {
            Kind::Namespace => "namespace",
            Kind::Node => "node",
            Kind::Pod => "pod",
            Kind::Service => "service",
            Kind::EndpointSlice => "endpointslice",
        }
    }

    pub fn short_names(self) -> &'static [&'static str] {
        match self {
            Kind::Namespace => &["ns"],
            Kind::Node => &["no"],
            Kind::Pod => &["po"],
            Kind::Service => &["svc"],
            Kind::EndpointSlice => &[],
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node)
    }

    /// The kind a manifest's `apiVersion` and `kind` name, if weft stores it.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.name() == kind)
    }

    /// The kind a user typed (`svc`, `services`, `Service`, `endpointslices.discovery.k8s.io`).
    pub fn from_resource(word: &str) -> Option<Kind> {
        let w = word.to_ascii_lowercase();
        let w = w.strip_suffix(".discovery.k8s.io").unwrap_or(&w);
        Kind::ALL
            .into_iter()
            .find(|k| k.plural() == w || k.singular() == w || k.short_names().contains(&w))
    }

    /// The URL path of the collection, e.g. `/api/v1/namespaces/default/services`.
    pub fn collection_path(self, namespace: Option<&str>) -> String {
        let prefix = if self.group().is_empty() {
            "/api/v1".to_string()
        } else {
            format!("/apis/{}", self.api_version())
        };
        match (self.namespaced(), namespace) {
            (true, Some(ns)) => format!("{prefix}/namespaces/{ns}/{}", self.plural()),
            _ => format!("{prefix}/{}", self.plural()),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where an object lives: kind, namespace ("" for cluster-scoped kinds) and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Self {
        let namespace = if kind.namespaced() { namespace } else { "" };
        ObjectKey {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}/{}", self.kind.plural(), self.name)
        } else {
            write!(f, "{}/{}/{}", self.kind.plural(), self.namespace, self.name)
        }
    }
}

/// One stored object of any kind weft knows.
#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Object {
    Namespace(Namespace),
    Node(Node),
    Pod(Pod),
    Service(Service),
    EndpointSlice(EndpointSlice),
}

/// Why a JSON value is not an object of a kind weft stores.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("object has no apiVersion/kind")]
    MissingType,
    #[error("no kind \"{kind}\" is registered for version \"{api_version}\" (weft stores Namespace, Node, Pod, Service and discovery.k8s.io/v1 EndpointSlice)")]
    UnknownKind { api_version: String, kind: String },
    #[error("{kind}: {path}: {message}")]
    Field {
        kind: Kind,
        path: String,
        message: String,
    },
}

fn decode<T: DeserializeOwned>(kind: Kind, value: serde_json::Value) -> Result<T, DecodeError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        DecodeError::Field {
            kind,
            path: if path == "." { String::new() } else { path },
            message: e.into_inner().to_string(),
        }
    })
}

impl Object {
    /// Decode a JSON value whose `apiVersion`/`kind` name one of weft's kinds.
    pub fn from_value(value: serde_json::Value) -> Result<Object, DecodeError> {
        let api_version = value.get("apiVersion").and_then(|v| v.as_str());
        let kind = value.get("kind").and_then(|v| v.as_str());
        let (Some(api_version), Some(kind_name)) = (api_version, kind) else {
            return Err(DecodeError::MissingType);
        };
        let Some(kind) = Kind::from_type(api_version, kind_name) else {
            return Err(DecodeError::UnknownKind {
                api_version: api_version.to_string(),
                kind: kind_name.to_string(),
            });
        };
        Ok(match kind {
            Kind::Namespace => Object::Namespace(decode(kind, value)?),
            Kind::Node => Object::Node(decode(kind, value)?),
            Kind::Pod => Object::Pod(decode(kind, value)?),
            Kind::Service => Object::Service(decode(kind, value)?),
            Kind::EndpointSlice => Object::EndpointSlice(decode(kind, value)?),
        })
    }

    /// Decode a JSON value that must be of `kind` (its own apiVersion/kind may be absent).
    pub fn from_value_as(kind: Kind, mut value: serde_json::Value) -> Result<Object, DecodeError> {
        if let Some(map) = value.as_object_mut() {
            map.entry("apiVersion")
                .or_insert_with(|| kind.api_version().into());
            map.entry("kind").or_insert_with(|| kind.name().into());
        }
        Object::from_value(value)
    }

    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Node(_) => Kind::Node,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
        }
    }

    pub fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Object::Namespace(o) => &mut o.metadata,
            Object::Node(o) => &mut o.metadata,
            Object::Pod(o) => &mut o.metadata,
            Object::Service(o) => &mut o.metadata,
            Object::EndpointSlice(o) => &mut o.metadata,
        }
    }

    pub fn name(&self) -> &str {
        self.meta().name.as_deref().unwrap_or("")
    }

    /// The namespace ("" for cluster-scoped kinds or when unset).
    pub fn namespace(&self) -> &str {
        if self.kind().namespaced() {
            self.meta().namespace.as_deref().unwrap_or("")
        } else {
            ""
        }
    }

    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(self.kind(), self.namespace(), self.name())
    }

    /// The object as JSON, with `apiVersion` and `kind`.
    pub fn to_value(&self) -> serde_json::Value {
        let v = match self {
            Object::Namespace(o) => serde_json::to_value(o),
            Object::Node(o) => serde_json::to_value(o),
            Object::Pod(o) => serde_json::to_value(o),
            Object::Service(o) => serde_json::to_value(o),
            Object::EndpointSlice(o) => serde_json::to_value(o),
        };
        // Serializing these types cannot fail: they hold only strings, numbers,
        // maps and lists.
        v.unwrap_or(serde_json::Value::Null)
    }

    pub fn to_json_bytes(&self) -> Vec<u8> {
        let r = match self {
            Object::Namespace(o) => serde_json::to_vec(o),
            Object::Node(o) => serde_json::to_vec(o),
            Object::Pod(o) => serde_json::to_vec(o),
            Object::Service(o) => serde_json::to_vec(o),
            Object::EndpointSlice(o) => serde_json::to_vec(o),
        };
        r.unwrap_or_default()
    }

    pub fn resource_version(&self) -> Option<u64> {
        self.meta().resource_version.as_deref()?.parse().ok()
    }
}
