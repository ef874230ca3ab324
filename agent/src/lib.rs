//! weft's node agent. Today it joins the cluster (registers its Node) and
//! follows the control plane's push stream into an up-to-date [`NodeView`];
//! the overlay, service dataplanes and DNS build on that view.
//!
//! [`NodeView`]: weft_model::NodeView

pub mod client;
pub mod dataplane;
pub mod dns_host;
pub mod health;
pub mod local_api;
pub mod node;
pub mod overlay;
pub mod sync;
