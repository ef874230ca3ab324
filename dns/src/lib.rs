//! weft-dns: the cluster DNS zone over the node view, its forwarder and
//! cache.
//!
//! - [`zone`]: the Kubernetes DNS specification (schema 1.1.0) compiled from
//!   the view's Services and Pods into an immutable [`zone::Snapshot`], and
//!   the pure lookup over it.
//! - [`handler`]: [`ClusterDns`], the request handler: checks a request,
//!   answers cluster names from the current snapshot (swapped atomically:
//!   a query never waits for an update), walks the pod's search path on the
//!   server, and forwards everything else.
//! - [`forward`]: the upstream forwarder with its cache; [`resolv_conf`]: the
//!   node's upstreams.
//! - [`server`]: UDP and TCP listeners with their limits.
//! - [`feed`]: keeps a snapshot in step with a [`weft_model::NodeView`].
//!
//! The crate is embedded by the agent and runnable alone (`weft-dns`).

pub mod feed;
pub mod forward;
pub mod handler;
pub mod resolv_conf;
pub mod server;
pub mod zone;
pub mod zone_handler;

pub use handler::{ClusterDns, DnsStats};
pub use zone::{PodRecords, Snapshot, ZoneConfig};
