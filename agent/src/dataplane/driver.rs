//! Drives the service dataplane from the view: every view change (and every
//! hostPort change the CNI plugin reports) rebuilds the plan and applies it;
//! a periodic check repairs outside damage and a slower timer forces a full
//! rewrite. The kernel work runs on the blocking pool, so the async runtime
//! (the stream, the local API, DNS) never waits for iptables.

use super::hostports::HostPort;
use super::plan::{PlanBuilder, PlanConfig};
use super::ServiceDataplane;
use crate::health::{Health, Metrics, ServiceHealth, ServiceHealthState};
use crate::sync::SharedView;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{watch, Notify};

pub struct DriverConfig {
    pub plan: PlanConfig,
    /// The CNI plugin's IPAM directory: hostPort mappings live in its claims.
    pub ipam_dir: PathBuf,
    /// How often the kernel is checked for outside damage.
    pub check_every: Duration,
    /// How often everything is rewritten regardless.
    pub full_every: Duration,
}

/// What the driver shares with the rest of the agent.
pub struct Shared {
    pub view: SharedView,
    /// The view's revision, bumped on every change.
    pub changes: watch::Receiver<u64>,
    /// Wakes the driver for changes outside the view (hostPorts).
    pub poke: Arc<Notify>,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    /// Which Services changed (the stream's deltas): the plan is then
    /// edited by those only. None: every Service is compared each time.
    pub service_changes: Option<crate::sync::SharedChanges>,
}

pub async fn run<D: ServiceDataplane>(mut dp: D, cfg: DriverConfig, shared: Shared) {
    let Shared {
        view,
        mut changes,
        poke,
        health,
        metrics,
        service_changes,
    } = shared;
    // healthCheckNodePorts answer on the node's addresses.
    let mut service_health =
        ServiceHealth::new(cfg.plan.node_addresses.clone()).with_proxy_health(health.clone());
    // Plans only the Services that changed since the last view.
    let mut planner = PlanBuilder::default();
    // The first apply comes with the first view; checks start a period later.
    let mut check = tokio::time::interval_at(
        tokio::time::Instant::now() + cfg.check_every,
        cfg.check_every,
    );
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_full = Instant::now();
    // Consecutive failed applies: the retry backs off (1 s doubling to 30 s).
    let mut failures: u32 = 0;
    // The hostPorts of the plugin's claims, read again only when a pod came
    // or went (a poke) and on the check tick — not on every Service change.
    let mut hostports: Option<Arc<Vec<HostPort>>> = None;
    loop {
        let mut verify = false;
        let mut reread = hostports.is_none();
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                changes.borrow_and_update();
                // A revision that changed no Service (a Pod's addresses, a
                // Node) leaves the plan as it is: nothing to program.
                if hostports.is_some() {
                    if let Some(sc) = &service_changes {
                        let c = sc.lock().unwrap_or_else(|p| p.into_inner());
                        if !c.all && c.services.is_empty() {
                            drop(c);
                            let v = view.read().unwrap_or_else(|p| p.into_inner());
                            metrics.set_revision(v.rev);
                            continue;
                        }
                    }
                }
                health.queued(SystemTime::now());
            }
            _ = poke.notified() => {
                health.queued(SystemTime::now());
                reread = true;
            }
            _ = check.tick() => {
                verify = true;
                reread = true;
            }
        }
        let (plan, checks) = {
            let v = view.read().unwrap_or_else(|p| p.into_inner());
            if !v.synced {
                continue;
            }
            metrics.set_revision(v.rev);
            // Taken while the view is read-locked: a change applied later
            // is noted for the next round.
            let plan = match service_changes.as_ref().map(crate::sync::take) {
                Some(c) if !c.all => planner.update(&v, &cfg.plan, &c.services),
                _ => planner.build(&v, &cfg.plan),
            };
            (plan, health_checks(&v, &cfg.plan.node))
        };
        let full_due = last_full.elapsed() >= cfg.full_every;
        if full_due {
            last_full = Instant::now();
        }
        let ipam_dir = cfg.ipam_dir.clone();
        let known = hostports.clone();
        let started = Instant::now();
        let job = tokio::task::spawn_blocking(move || {
            let mut resync = None;
            if full_due {
                dp.invalidate();
                resync = Some(Resync::Periodic);
            } else if verify {
                resync = dp.check().map(Resync::Damage);
            }
            let (ports, conflicts) = match known {
                Some(ports) if !reread => (ports, Vec::new()),
                _ => {
                    let found = super::hostports::read(&ipam_dir);
                    (Arc::new(found.ports), found.conflicts)
                }
            };
            let result = dp.program(&plan, &ports);
            (dp, resync, ports, conflicts, result)
        });
        let (back, resync, ports, conflicts, result) = match job.await {
            Ok(r) => r,
            Err(e) => {
                // The apply panicked: nothing safe to continue with.
                tracing::error!(error = %e, "the service dataplane task failed; exiting");
                std::process::exit(1);
            }
        };
        dp = back;
        hostports = Some(ports);
        let name = dp.name();
        match resync {
            Some(Resync::Periodic) => metrics.full_resync("periodic"),
            Some(Resync::Damage(reason)) => {
                tracing::warn!(dataplane = name, %reason, "our rules were changed by someone else; rewriting them");
                metrics.full_resync("damage");
            }
            None => {}
        }
        for c in &conflicts {
            tracing::warn!(conflict = %c, "hostPort not programmed");
        }
        match result {
            Ok(stats) => {
                let secs = started.elapsed().as_secs_f64();
                metrics.observe_sync(name, secs);
                metrics.set_programmed(stats.services as u64, stats.endpoints as u64);
                metrics.conntrack_deleted(stats.conntrack_deleted);
                for e in &stats.conntrack_errors {
                    tracing::warn!(error = %e, "conntrack cleanup failed");
                }
                if stats.chains > 0 || failures > 0 {
                    tracing::info!(
                        chains = stats.chains,
                        bytes = stats.bytes,
                        full = stats.full,
                        services = stats.services,
                        conntrack_deleted = stats.conntrack_deleted,
                        ms = (secs * 1000.0) as u64,
                        "services programmed"
                    );
                }
                failures = 0;
                health.applied(SystemTime::now());
                for e in service_health.sync(checks).await {
                    tracing::warn!(error = %e, "healthCheckNodePort not served");
                }
            }
            Err(e) => {
                metrics.sync_error(name);
                let delay = retry_delay(failures);
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, retry_in_s = delay.as_secs(), attempt = failures, "programming services failed");
                // Retry without spinning; a view change retries sooner.
                let poke = poke.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    poke.notify_one();
                });
            }
        }
    }
}

/// Why an apply rewrites everything.
enum Resync {
    /// The `--full-resync-seconds` timer.
    Periodic,
    /// The check found our rules changed by someone else.
    Damage(String),
}

/// How long to wait before retrying after `failures` failed applies in a row.
fn retry_delay(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(5)).min(Duration::from_secs(30))
}

/// The healthCheckNodePorts this node serves: every `externalTrafficPolicy:
/// Local` Service that has one, with its local endpoint counts.
pub fn health_checks(view: &weft_model::NodeView, node: &str) -> BTreeMap<u16, ServiceHealthState> {
    let mut out = BTreeMap::new();
    for svc in view.services.values() {
        let Some(port) = svc.health_check_node_port else {
            continue;
        };
        if !svc.proxied || !svc.external_local {
            continue;
        }
        let local = || svc.backends.iter().filter(|b| b.is_local(node));
        out.insert(
            port,
            ServiceHealthState {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
                local_endpoints: local().filter(|b| b.ready).count(),
                local_serving_terminating: local().filter(|b| b.serving && b.terminating).count(),
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{self, backend, node_port_service};
    use super::super::hostports::HostPort;
    use super::super::plan::ServicePlan;
    use super::super::ApplyStats;
    use super::*;
    use std::sync::Mutex;

    #[derive(Debug, thiserror::Error)]
    #[error("recorded failure")]
    struct Failure;

    /// Records every call; fails the calls it is told to.
    #[derive(Clone, Default)]
    struct RecordingDataplane {
        calls: Arc<Mutex<Vec<String>>>,
        fail: Arc<Mutex<u32>>,
    }

    impl ServiceDataplane for RecordingDataplane {
        type Error = Failure;
        fn name(&self) -> &'static str {
            "recording"
        }
        fn program(
            &mut self,
            plan: &ServicePlan,
            hostports: &[HostPort],
        ) -> Result<ApplyStats, Failure> {
            let names: Vec<&str> = plan.services.iter().map(|s| s.name.as_str()).collect();
            self.calls
                .lock()
                .unwrap()
                .push(format!("program {names:?} hostports={}", hostports.len()));
            let mut fail = self.fail.lock().unwrap();
            if *fail > 0 {
                *fail -= 1;
                return Err(Failure);
            }
            Ok(ApplyStats {
                services: plan.services.len(),
                ..ApplyStats::default()
            })
        }
        fn check(&mut self) -> Option<String> {
            self.calls.lock().unwrap().push("check".into());
            None
        }
        fn invalidate(&mut self) {
            self.calls.lock().unwrap().push("invalidate".into());
        }
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..200 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{what}: not within 5 s");
    }

    #[tokio::test]
    async fn programs_each_view_and_retries_failures() {
        let view: SharedView = Default::default();
        let (tx, rx) = watch::channel(0u64);
        let dp = RecordingDataplane::default();
        *dp.fail.lock().unwrap() = 1;
        let changed = crate::sync::SharedChanges::default();
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::new(Duration::from_secs(30)));
        let dir = std::env::temp_dir().join(format!("weft-driver-test-{}", std::process::id()));
        let cfg = DriverConfig {
            plan: PlanConfig {
                node_addresses: vec![],
                ..fixtures::config()
            },
            ipam_dir: dir,
            check_every: Duration::from_secs(3600),
            full_every: Duration::from_secs(3600),
        };
        let shared = Shared {
            view: view.clone(),
            changes: rx,
            poke: Arc::new(Notify::new()),
            health: health.clone(),
            metrics: metrics.clone(),
            service_changes: Some(changed.clone()),
        };
        let task = tokio::spawn(run(dp.clone(), cfg, shared));
        {
            let mut v = view.write().unwrap();
            v.synced = true;
            let s = node_port_service(
                "web",
                vec![backend("198.18.128.5", "node-1", true, true, false)],
            );
            changed.lock().unwrap().services.insert(s.key());
            v.services.insert(s.key(), s);
        }
        tx.send(1).unwrap();
        // The first apply fails (counted), the retry a second later succeeds.
        let calls = dp.calls.clone();
        until("a failed apply retried", || {
            calls
                .lock()
                .unwrap()
                .iter()
                .filter(|c| c.starts_with("program [\"web\"]"))
                .count()
                >= 2
        })
        .await;
        let text = metrics.render();
        assert!(
            text.contains("weft_sync_errors_total{dataplane=\"recording\"} 1"),
            "{text}"
        );
        assert!(text.contains("weft_services_programmed 1"), "{text}");
        until("healthy after the retry", || {
            health.healthy(SystemTime::now())
        })
        .await;
        // A Service deleted (and noted, as the stream follower does): the
        // next apply programs the smaller plan.
        {
            let mut v = view.write().unwrap();
            for k in v.services.keys() {
                changed.lock().unwrap().services.insert(k.clone());
            }
            v.services.clear();
        }
        tx.send(2).unwrap();
        until("the empty plan programmed", || {
            calls
                .lock()
                .unwrap()
                .iter()
                .any(|c| c.starts_with("program []"))
        })
        .await;
        task.abort();
    }

    #[test]
    fn retries_back_off_to_thirty_seconds() {
        let secs: Vec<u64> = (0..8).map(|f| retry_delay(f).as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(retry_delay(u32::MAX).as_secs(), 30);
    }
}
