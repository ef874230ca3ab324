//! Service load balancing. A pure [`plan::ServicePlan`] is built from the
//! node view; the [`tracer`] answers, for a packet, what any dataplane must
//! do with it (the oracle the dataplanes are tested against, as kube-proxy's
//! own tests do); dataplanes implement [`ServiceDataplane`] and only their
//! `apply` touches the kernel.

#[doc(hidden)]
pub mod fixtures;
pub mod hostports;
pub mod iptables;
pub mod plan;
pub mod report;
#[cfg(test)]
mod sim;
pub mod tracer;

/// A service dataplane: programs the kernel to match a plan. `apply` takes
/// the full desired state and is idempotent.
#[allow(async_fn_in_trait)]
pub trait ServiceDataplane {
    type Error: std::error::Error;
    async fn apply(&mut self, plan: &plan::ServicePlan) -> Result<(), Self::Error>;
}
