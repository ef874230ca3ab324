//! Service load balancing. A pure [`plan::ServicePlan`] is built from the
//! node view; the [`tracer`] answers, for a packet, what any dataplane must
//! do with it (the oracle the dataplanes are tested against, as kube-proxy's
//! own tests do). A [`ServiceDataplane`] programs the kernel to match a plan:
//! [`netfilter::IptablesDataplane`] (rules rendered by [`iptables`], CNI
//! portMappings by [`hostports`]); [`driver`] runs one from the view.

pub mod driver;
pub mod ebpf;
#[doc(hidden)]
pub mod fixtures;
pub mod hostports;
pub mod iptables;
pub mod maglev;
pub mod netfilter;
pub mod plan;
pub mod report;
#[cfg(test)]
mod sim;
pub mod sockdestroy;
pub mod tracer;

/// What one apply did.
#[derive(Debug, Default)]
pub struct ApplyStats {
    /// Kernel objects rewritten or deleted (iptables: chains); 0 when nothing changed.
    pub chains: usize,
    /// Bytes handed to the kernel's tool (iptables-restore input).
    pub bytes: usize,
    /// The apply rewrote everything (first sync, or after outside damage).
    pub full: bool,
    pub conntrack_deleted: u64,
    pub conntrack_errors: Vec<netfilter::Error>,
    pub services: usize,
    pub endpoints: usize,
}

/// A service dataplane: programs the kernel to match a plan. Synchronous
/// (it may run tools or syscalls); the driver calls it off the async runtime.
pub trait ServiceDataplane: Send + 'static {
    type Error: std::error::Error + Send + 'static;
    /// Its name in logs and metrics labels (`iptables`).
    fn name(&self) -> &'static str;
    /// Make the kernel match `plan` and the node's `hostports`: the full
    /// desired state, idempotent, costing what changed since the last call.
    fn program(
        &mut self,
        plan: &plan::ServicePlan,
        hostports: &[hostports::HostPort],
    ) -> Result<ApplyStats, Self::Error>;
    /// Whether the kernel still holds what was programmed; the reason when
    /// not (the next `program` then rewrites everything).
    fn check(&mut self) -> Option<String>;
    /// Forget what was programmed: the next `program` rewrites everything.
    fn invalidate(&mut self);
}
