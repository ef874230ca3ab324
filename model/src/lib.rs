//! weft's shared model: the Kubernetes objects weft stores (the ecosystem's
//! maintained `k8s-openapi` types, not copies), manifest reading, validation
//! with Kubernetes-style field paths, label selectors, the compiled per-node
//! view and the wire frames of the push stream. Pure: no I/O.

pub mod manifest;
pub mod node_state;
pub mod objects;
pub mod selector;
pub mod validate;
pub mod view;

pub use manifest::{parse_manifests, ManifestError};
pub use objects::{Kind, Object, ObjectKey};
pub use selector::{LabelSelector, SelectorError};
pub use validate::{FieldError, FieldErrorKind, ValidationContext};
pub use view::{
    Backend, BackendPort, Change, NodeEntry, NodeView, PodEntry, ServiceEntry, StreamFrame,
};

/// Re-exported so that every crate names the same Kubernetes types.
pub use k8s_openapi;
