//! weft's CNI plugin (spec 1.1.0): veth pairs onto the node bridge, node-local
//! crash-safe IPAM (which also records the pod's hostPorts for the agent), and
//! best-effort pod notifications to the agent.
//!
//! Synchronous by design: a plugin process lives for milliseconds, so it
//! talks netlink directly and never starts an async runtime.

pub mod agent;
pub mod commands;
pub mod config;
pub mod env;
pub mod error;
pub mod ipam;
pub mod netlink;
pub mod netns;
pub mod node_state;
pub mod portmap;
pub mod result;

pub use commands::run;
