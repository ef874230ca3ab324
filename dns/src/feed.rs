//! Keep a zone snapshot in step with the node view.
//!
//! A reset compares every Service's compiled records with what the snapshot
//! holds; a delta touches only the Services (and Pods) it names. Either way
//! only changed entries are replaced, in shards the snapshot shares with its
//! predecessor, and the result is published as a whole.

use crate::zone::{compile_service, Snapshot};
use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use weft_model::view::ViewChanges;
use weft_model::NodeView;

/// The pods' addresses last written into the snapshot.
#[derive(Debug, Default)]
pub struct Feed {
    pods: HashMap<(String, String), Vec<IpAddr>>,
}

/// What an update did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FeedStats {
    pub services_changed: usize,
    pub pods_changed: usize,
}

impl Feed {
    /// Bring `snap` to `view`, looking at what `changed` names.
    pub fn update(
        &mut self,
        snap: &mut Snapshot,
        view: &NodeView,
        changed: &ViewChanges,
    ) -> FeedStats {
        let mut stats = FeedStats::default();
        let zone = snap.config.zone.clone();
        let mut service = |snap: &mut Snapshot, key: &(String, String)| {
            let new = view
                .services
                .get(key)
                .and_then(|s| compile_service(&zone, s));
            let same = match (snap.services.get(key), &new) {
                (Some(old), Some(new)) => **old == *new,
                (None, None) => true,
                _ => false,
            };
            if !same {
                snap.put_service(key.clone(), new);
                stats.services_changed += 1;
            }
        };
        if changed.all {
            let gone: Vec<(String, String)> = snap
                .services
                .iter()
                .map(|(k, _)| k.clone())
                .filter(|k| !view.services.contains_key(k))
                .collect();
            for k in view.services.keys().chain(gone.iter()) {
                service(snap, k);
            }
        } else {
            for k in &changed.services {
                service(snap, k);
            }
        }
        let pod_keys: Vec<(String, String)> = if changed.all {
            let mut keys: BTreeSet<(String, String)> = view.pods.keys().cloned().collect();
            keys.extend(self.pods.keys().cloned());
            keys.into_iter().collect()
        } else {
            changed.pods.iter().cloned().collect()
        };
        for key in pod_keys {
            let new: Vec<IpAddr> = view
                .pods
                .get(&key)
                .map(|p| p.ips.clone())
                .unwrap_or_default();
            let old = self.pods.get(&key).cloned().unwrap_or_default();
            if old == new {
                continue;
            }
            snap.put_pod(&key.0, &key.1, &old, &new);
            stats.pods_changed += 1;
            if new.is_empty() {
                self.pods.remove(&key);
            } else {
                self.pods.insert(key, new);
            }
        }
        snap.synced = view.synced;
        snap.rev = view.rev;
        stats
    }
}

/// Build a snapshot of `view` from nothing (for the standalone server and
/// tests).
pub fn snapshot_of(config: crate::ZoneConfig, view: &NodeView) -> Snapshot {
    let mut snap = Snapshot::new(config);
    let mut feed = Feed::default();
    feed.update(
        &mut snap,
        view,
        &ViewChanges {
            all: true,
            ..Default::default()
        },
    );
    snap
}

/// Shared helper for owners of a [`crate::ClusterDns`]: update a copy of the
/// current snapshot and publish it.
pub fn publish(
    dns: &crate::ClusterDns,
    feed: &mut Feed,
    view: &NodeView,
    changed: &ViewChanges,
) -> FeedStats {
    let mut snap: Snapshot = Snapshot::clone(&dns.snapshot());
    let stats = feed.update(&mut snap, view, changed);
    dns.publish(snap);
    stats
}
