//! weft's control plane: a Kubernetes-style API over a durable embedded store,
//! the controllers that allocate addresses and maintain EndpointSlices, and the
//! per-node push stream of the compiled node view. `main.rs` only wires these.

pub mod alloc;
pub mod auth;
pub mod compile;
pub mod controllers;
pub mod http;
pub mod server;
pub mod state;
pub mod status;
pub mod store;
pub mod stream;
pub mod watch;
