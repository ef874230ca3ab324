//! Service load balancing. A pure [`plan::ServicePlan`] is built from the
//! node view; the [`tracer`] answers, for a packet, what any dataplane must
//! do with it (the oracle the dataplanes are tested against, as kube-proxy's
//! own tests do). [`iptables`] renders the plan into rules, [`netfilter`]
//! applies them (the only part that touches the kernel) and [`driver`] runs
//! it from the view; [`hostports`] adds the CNI portMappings.

pub mod driver;
#[doc(hidden)]
pub mod fixtures;
pub mod hostports;
pub mod iptables;
pub mod netfilter;
pub mod plan;
pub mod report;
#[cfg(test)]
mod sim;
pub mod tracer;
