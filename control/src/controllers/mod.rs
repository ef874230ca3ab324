//! Controllers that run inside each transaction: Service admission and
//! allocation, and the endpoint controller.

pub mod endpoints;
pub mod services;
