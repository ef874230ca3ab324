//! Keeps the eBPF maps equal to the encoded plan, writing only what changed.
//!
//! Backend sets are content-addressed: frontends with the same backends (a
//! Service's cluster IP and NodePorts, both scopes) share one set id. A
//! changed set is written under a new id, the frontends are then switched to
//! it (one map update each, atomic for the programs), and only then is the
//! old set deleted: a program never reads a half-written set. Affinity
//! groups (one per Service port with ClientIP affinity) carry the backends
//! still allowed, so a sticky client whose backend left picks again.
//!
//! On start the reconciler adopts what the pinned maps already hold
//! ([`Reconciler::adopt`]): sets with the wanted content and affinity groups
//! are reused, so an agent restart rewrites nothing that is still right and
//! sticky clients keep their backends.

use super::super::maglev;
use super::super::plan::{PlannedService, ServicePlan};
use super::encode::{encode, FrontendSpec, GroupKey, SetSpec};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use weft_ebpf_abi::{
    AffinityMatchKey, Backend, BackendKey, MaglevTable, ServiceKey, ServiceValue, MAGLEV_TABLE_SIZE,
};

/// The maps' contents, as a snapshot (restart adoption, the fake, netctl).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Image {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<BackendKey, Backend>,
    pub maglev: BTreeMap<u32, Vec<u32>>,
    pub affinity_match: BTreeSet<AffinityMatchKey>,
}

/// Writes to the service maps. One implementation per backend: the
/// kernel's pinned maps, and [`FakeMaps`].
pub trait MapStore {
    type Error: std::error::Error + Send + Sync + 'static;
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), Self::Error>;
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), Self::Error>;
    fn put_backend(&mut self, key: BackendKey, value: Backend) -> Result<(), Self::Error>;
    fn delete_backend(&mut self, key: BackendKey) -> Result<(), Self::Error>;
    fn put_maglev(&mut self, set_id: u32, table: &MaglevTable) -> Result<(), Self::Error>;
    fn delete_maglev(&mut self, set_id: u32) -> Result<(), Self::Error>;
    fn put_affinity_match(&mut self, key: AffinityMatchKey) -> Result<(), Self::Error>;
    fn delete_affinity_match(&mut self, key: AffinityMatchKey) -> Result<(), Self::Error>;
    /// Everything the maps hold now.
    fn image(&self) -> Result<Image, Self::Error>;
}

/// In-memory maps, counting writes: unit tests of the reconciler.
#[derive(Debug, Default)]
pub struct FakeMaps {
    pub image: Image,
    pub writes: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("fake maps never fail")]
pub struct Never;

impl MapStore for FakeMaps {
    type Error = Never;
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), Never> {
        self.writes += 1;
        self.image.services.insert(key, value);
        Ok(())
    }
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), Never> {
        self.writes += 1;
        self.image.services.remove(&key);
        Ok(())
    }
    fn put_backend(&mut self, key: BackendKey, value: Backend) -> Result<(), Never> {
        self.writes += 1;
        self.image.backends.insert(key, value);
        Ok(())
    }
    fn delete_backend(&mut self, key: BackendKey) -> Result<(), Never> {
        self.writes += 1;
        self.image.backends.remove(&key);
        Ok(())
    }
    fn put_maglev(&mut self, set_id: u32, table: &MaglevTable) -> Result<(), Never> {
        self.writes += 1;
        self.image.maglev.insert(set_id, table.indices.to_vec());
        Ok(())
    }
    fn delete_maglev(&mut self, set_id: u32) -> Result<(), Never> {
        self.writes += 1;
        self.image.maglev.remove(&set_id);
        Ok(())
    }
    fn put_affinity_match(&mut self, key: AffinityMatchKey) -> Result<(), Never> {
        self.writes += 1;
        self.image.affinity_match.insert(key);
        Ok(())
    }
    fn delete_affinity_match(&mut self, key: AffinityMatchKey) -> Result<(), Never> {
        self.writes += 1;
        self.image.affinity_match.remove(&key);
        Ok(())
    }
    fn image(&self) -> Result<Image, Never> {
        Ok(self.image.clone())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError<E: std::error::Error + 'static> {
    #[error("writing the service maps")]
    Map(#[source] E),
    #[error("{what} ids exhausted")]
    Exhausted { what: &'static str },
    #[error("Maglev table for a set of {backends} backends")]
    Maglev {
        backends: usize,
        #[source]
        source: maglev::MaglevError,
    },
}

/// What one reconcile did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Services encoded again (new or changed).
    pub services_changed: usize,
    /// Map entries written or deleted.
    pub writes: usize,
    /// Frontend keys wanted by more than one Service (the first by
    /// namespace/name wins, as in the tracer).
    pub conflicts: Vec<(ServiceKey, String, String)>,
    pub skipped_ipv6: usize,
    /// Services whose `weft.dev/lb` value is unknown (random is used).
    pub unknown_lb: Vec<(String, String)>,
    /// Backends (address, port, network order) no set holds any more: their
    /// connected UDP sockets and north-south connections are stale.
    pub removed_backends: Vec<(u32, u16)>,
}

struct SetEntry {
    id: u32,
    refs: usize,
}

struct GroupEntry {
    id: u32,
    refs: usize,
    /// Backend (address, port) -> how many referencing frontends' sets hold it.
    members: BTreeMap<(u32, u16), usize>,
    /// Members found in the maps on adoption and not referenced yet.
    adopted: BTreeSet<(u32, u16)>,
}

/// Service key in the plan's order.
type SvcName = (String, String);

struct Cached {
    service: Arc<PlannedService>,
    frontends: Vec<FrontendSpec>,
}

/// The maps' desired state and the ids behind it.
#[derive(Default)]
pub struct Reconciler {
    services: BTreeMap<SvcName, Cached>,
    /// Frontend key -> the Services that want it, with their spec.
    owners: HashMap<ServiceKey, BTreeMap<SvcName, FrontendSpec>>,
    /// What the services map holds, as written.
    programmed: HashMap<ServiceKey, ServiceValue>,
    sets: HashMap<SetSpec, SetEntry>,
    set_by_id: HashMap<u32, SetSpec>,
    groups: HashMap<GroupKey, GroupEntry>,
    group_by_id: HashMap<u32, GroupKey>,
    /// Groups found in the maps on adoption, not yet claimed by a Service port.
    orphan_groups: HashMap<u32, BTreeSet<(u32, u16)>>,
    ids: Ids,
    /// Backend (address, port) -> number of sets holding it.
    backend_sets: HashMap<(u32, u16), usize>,
    /// Backends whose count dropped to 0 during this apply.
    dropped: Vec<(u32, u16)>,
    /// The next apply looks at every frontend (after adoption).
    full: bool,
    /// Generation of the builder's plan applied last (None: a plan from
    /// elsewhere, or none yet): the next one may list only its changes.
    applied_generation: Option<u64>,
    /// Frontends adopted from the maps: their set is referenced, their
    /// affinity group is not (groups are claimed by Service ports anew).
    adopted_keys: std::collections::HashSet<ServiceKey>,
}

#[derive(Default)]
struct Ids {
    next_set: u32,
    free_sets: Vec<u32>,
    next_group: u32,
    free_groups: Vec<u32>,
}

impl Ids {
    fn set(&mut self) -> Option<u32> {
        self.free_sets.pop().or_else(|| {
            self.next_set = self.next_set.checked_add(1)?;
            Some(self.next_set)
        })
    }
    fn group(&mut self) -> Option<u32> {
        self.free_groups.pop().or_else(|| {
            self.next_group = self.next_group.checked_add(1)?;
            Some(self.next_group)
        })
    }
}

impl Reconciler {
    /// A reconciler for maps holding `image` (empty for new maps).
    pub fn adopt(image: &Image) -> Reconciler {
        let mut r = Reconciler {
            full: true,
            ..Default::default()
        };
        // Sets: contiguous indices 0..n, the Maglev table where there is one.
        let mut by_set: BTreeMap<u32, Vec<(u32, Backend)>> = BTreeMap::new();
        for (k, v) in &image.backends {
            by_set.entry(k.set_id).or_default().push((k.index, *v));
        }
        for (id, mut list) in by_set {
            r.ids.next_set = r.ids.next_set.max(id);
            list.sort_by_key(|(i, _)| *i);
            let contiguous = list.iter().enumerate().all(|(n, (i, _))| *i as usize == n);
            let spec = SetSpec {
                backends: list.into_iter().map(|(_, b)| b).collect(),
                maglev: image.maglev.contains_key(&id),
            };
            // A table must be the one this content computes (an agent killed
            // while writing a set leaves a table for the whole set and only
            // part of its backends).
            let table_ok = !spec.maglev
                || maglev_indices(&spec).ok().as_deref()
                    == image.maglev.get(&id).map(Vec::as_slice);
            if contiguous && table_ok && !r.sets.contains_key(&spec) {
                for b in &spec.backends {
                    *r.backend_sets.entry((b.addr_be, b.port_be)).or_insert(0) += 1;
                }
                r.set_by_id.insert(id, spec.clone());
                r.sets.insert(spec, SetEntry { id, refs: 0 });
            }
        }
        for id in image.maglev.keys() {
            r.ids.next_set = r.ids.next_set.max(*id);
        }
        for m in &image.affinity_match {
            r.ids.next_group = r.ids.next_group.max(m.affinity_id);
            r.orphan_groups
                .entry(m.affinity_id)
                .or_default()
                .insert((m.addr_be, m.port_be));
        }
        for (k, v) in &image.services {
            r.ids.next_group = r.ids.next_group.max(v.affinity_id);
            r.programmed.insert(*k, *v);
            r.adopted_keys.insert(*k);
            if let Some(spec) = r.set_by_id.get(&v.set_id) {
                if v.count > 0 {
                    if let Some(e) = r.sets.get_mut(spec) {
                        e.refs += 1;
                    }
                }
            }
        }
        r
    }

    /// Make the maps match `plan`. Only Services whose planned form changed
    /// since the last call are encoded again and only their frontends'
    /// entries are looked at (everything, the first time after adoption).
    pub fn apply<S: MapStore>(
        &mut self,
        plan: &ServicePlan,
        store: &mut S,
    ) -> Result<Stats, ReconcileError<S::Error>> {
        let mut stats = Stats::default();
        let mut affected: BTreeSet<ServiceKey> = BTreeSet::new();
        if self.full {
            affected.extend(self.programmed.keys().copied());
        }

        // Only the Services the plan says changed, when it follows the plan
        // applied last; otherwise every Service, compared with its cache.
        let incremental = !self.full
            && plan.generation > 0
            && self.applied_generation == Some(plan.generation - 1);
        match (&plan.changed, incremental) {
            (Some(changed), true) => {
                for name in changed {
                    let pos = plan.services.binary_search_by(|s| {
                        (s.namespace.as_str(), s.name.as_str())
                            .cmp(&(name.0.as_str(), name.1.as_str()))
                    });
                    match pos {
                        Ok(i) => self.consider(&plan.services[i], &mut stats, &mut affected),
                        Err(_) => {
                            if let Some(old) = self.services.remove(name) {
                                self.disown(name, &old.frontends, &mut affected);
                            }
                        }
                    }
                }
            }
            _ => {
                let mut wanted: BTreeSet<SvcName> = BTreeSet::new();
                for svc in &plan.services {
                    self.consider(svc, &mut stats, &mut affected);
                    wanted.insert((svc.namespace.clone(), svc.name.clone()));
                }
                if self.services.len() > wanted.len() {
                    let gone: Vec<SvcName> = self
                        .services
                        .keys()
                        .filter(|k| !wanted.contains(*k))
                        .cloned()
                        .collect();
                    for name in gone {
                        if let Some(old) = self.services.remove(&name) {
                            self.disown(&name, &old.frontends, &mut affected);
                        }
                    }
                }
            }
        }

        // New values first (sets written before any frontend points at
        // them), then the old values' sets and groups released.
        let mut released: Vec<(ServiceValue, bool)> = Vec::new();
        let mut writes = 0usize;
        for key in &affected {
            let (want, conflict) = match self.owners.get(key) {
                Some(o) if !o.is_empty() => {
                    let mut it = o.iter();
                    let (first, spec) = it.next().expect("not empty");
                    let conflict = it.next().map(|(other, _)| (first.clone(), other.clone()));
                    (Some(spec.clone()), conflict)
                }
                _ => (None, None),
            };
            if let Some((a, b)) = conflict {
                stats.conflicts.push((
                    *key,
                    format!("{}/{}", a.0, a.1),
                    format!("{}/{}", b.0, b.1),
                ));
            }
            let old = self.programmed.get(key).copied();
            let new = match &want {
                Some(spec) => Some(self.acquire(spec, old, store, &mut writes)?),
                None => None,
            };
            match new {
                Some(v) if Some(v) != old => {
                    store.put_service(*key, v).map_err(ReconcileError::Map)?;
                    writes += 1;
                    self.programmed.insert(*key, v);
                }
                Some(_) => {}
                None => {
                    if old.is_some() {
                        store.delete_service(*key).map_err(ReconcileError::Map)?;
                        writes += 1;
                        self.programmed.remove(key);
                    }
                }
            }
            if let Some(o) = old {
                let adopted = self.adopted_keys.remove(key);
                released.push((o, adopted));
            }
        }
        for (v, adopted) in released {
            self.release(v, adopted, store, &mut writes)?;
        }
        if self.full {
            self.collect_garbage(store, &mut writes)?;
            self.full = false;
        }
        self.applied_generation = (plan.generation > 0).then_some(plan.generation);
        stats.writes = writes;
        // A backend dropped from one set and added to another in the same
        // apply is still live.
        let mut removed: Vec<(u32, u16)> = std::mem::take(&mut self.dropped)
            .into_iter()
            .filter(|k| !self.backend_sets.contains_key(k))
            .collect();
        removed.sort_unstable();
        removed.dedup();
        stats.removed_backends = removed;
        Ok(stats)
    }

    /// Encode `svc` again if it differs from what was encoded for it.
    fn consider(
        &mut self,
        svc: &Arc<PlannedService>,
        stats: &mut Stats,
        affected: &mut BTreeSet<ServiceKey>,
    ) {
        let name = (svc.namespace.clone(), svc.name.clone());
        let unchanged = matches!(self.services.get(&name),
            Some(c) if Arc::ptr_eq(&c.service, svc) || *c.service == **svc);
        if unchanged {
            return;
        }
        let enc = encode(svc);
        stats.services_changed += 1;
        stats.skipped_ipv6 += enc.skipped_ipv6;
        if let Some(lb) = enc.unknown_lb {
            stats
                .unknown_lb
                .push((format!("{}/{}", svc.namespace, svc.name), lb));
        }
        if let Some(old) = self.services.remove(&name) {
            self.disown(&name, &old.frontends, affected);
        }
        for f in &enc.frontends {
            affected.insert(f.key);
            self.owners
                .entry(f.key)
                .or_default()
                .insert(name.clone(), f.clone());
        }
        self.services.insert(
            name,
            Cached {
                service: svc.clone(),
                frontends: enc.frontends,
            },
        );
    }

    fn disown(
        &mut self,
        name: &SvcName,
        frontends: &[FrontendSpec],
        affected: &mut BTreeSet<ServiceKey>,
    ) {
        for f in frontends {
            affected.insert(f.key);
            if let Some(o) = self.owners.get_mut(&f.key) {
                o.remove(name);
                if o.is_empty() {
                    self.owners.remove(&f.key);
                }
            }
        }
    }

    /// The value for `spec`, taking a reference on its set and group
    /// (written first when new). `old` is the key's current value: its
    /// affinity group is claimed when adoption left it unclaimed.
    fn acquire<S: MapStore>(
        &mut self,
        spec: &FrontendSpec,
        old: Option<ServiceValue>,
        store: &mut S,
        writes: &mut usize,
    ) -> Result<ServiceValue, ReconcileError<S::Error>> {
        let Some(set) = &spec.set else {
            return Ok(ServiceValue {
                flags: spec.flags,
                ..Default::default()
            });
        };
        let set_id = match self.sets.get_mut(set) {
            Some(e) => {
                e.refs += 1;
                e.id
            }
            None => {
                let id = self
                    .ids
                    .set()
                    .ok_or(ReconcileError::Exhausted { what: "set" })?;
                if set.maglev {
                    let indices = maglev_indices(set).map_err(|source| ReconcileError::Maglev {
                        backends: set.backends.len(),
                        source,
                    })?;
                    let mut table = MaglevTable {
                        indices: [0; MAGLEV_TABLE_SIZE as usize],
                    };
                    for (slot, i) in table.indices.iter_mut().zip(indices) {
                        *slot = i;
                    }
                    store.put_maglev(id, &table).map_err(ReconcileError::Map)?;
                    *writes += 1;
                }
                for (index, b) in set.backends.iter().enumerate() {
                    store
                        .put_backend(
                            BackendKey {
                                set_id: id,
                                index: index as u32,
                            },
                            *b,
                        )
                        .map_err(ReconcileError::Map)?;
                    *writes += 1;
                }
                for b in &set.backends {
                    *self.backend_sets.entry((b.addr_be, b.port_be)).or_insert(0) += 1;
                }
                self.sets.insert(set.clone(), SetEntry { id, refs: 1 });
                self.set_by_id.insert(id, set.clone());
                id
            }
        };
        let (affinity_id, timeout) = match &spec.affinity {
            None => (0, 0),
            Some((group, timeout)) => {
                let id = self.acquire_group(group, set, old, store, writes)?;
                (id, *timeout)
            }
        };
        Ok(ServiceValue {
            set_id,
            count: set.backends.len() as u32,
            flags: spec.flags,
            affinity_id,
            affinity_timeout_s: timeout,
        })
    }

    fn acquire_group<S: MapStore>(
        &mut self,
        group: &GroupKey,
        set: &SetSpec,
        old: Option<ServiceValue>,
        store: &mut S,
        writes: &mut usize,
    ) -> Result<u32, ReconcileError<S::Error>> {
        if !self.groups.contains_key(group) {
            let claim = old
                .map(|v| v.affinity_id)
                .filter(|id| *id != 0 && self.orphan_groups.contains_key(id));
            let (id, adopted) = match claim {
                Some(id) => (id, self.orphan_groups.remove(&id).unwrap_or_default()),
                None => (
                    self.ids.group().ok_or(ReconcileError::Exhausted {
                        what: "affinity group",
                    })?,
                    BTreeSet::new(),
                ),
            };
            self.group_by_id.insert(id, group.clone());
            self.groups.insert(
                group.clone(),
                GroupEntry {
                    id,
                    refs: 0,
                    members: BTreeMap::new(),
                    adopted,
                },
            );
        }
        let entry = self.groups.get_mut(group).expect("inserted above");
        entry.refs += 1;
        for b in &set.backends {
            let k = (b.addr_be, b.port_be);
            let n = entry.members.entry(k).or_insert(0);
            *n += 1;
            // An adopted member is already in the map.
            if *n == 1 && !entry.adopted.remove(&k) {
                store
                    .put_affinity_match(AffinityMatchKey {
                        affinity_id: entry.id,
                        addr_be: b.addr_be,
                        port_be: b.port_be,
                        _pad: 0,
                    })
                    .map_err(ReconcileError::Map)?;
                *writes += 1;
            }
        }
        Ok(entry.id)
    }

    /// Drop one frontend value's references; delete what nobody uses.
    fn release<S: MapStore>(
        &mut self,
        v: ServiceValue,
        adopted: bool,
        store: &mut S,
        writes: &mut usize,
    ) -> Result<(), ReconcileError<S::Error>> {
        if v.count == 0 {
            return Ok(());
        }
        let Some(set) = self.set_by_id.get(&v.set_id).cloned() else {
            return Ok(());
        };
        if v.affinity_id != 0 && !adopted {
            if let Some(gk) = self.group_by_id.get(&v.affinity_id).cloned() {
                if let Some(g) = self.groups.get_mut(&gk) {
                    g.refs = g.refs.saturating_sub(1);
                    for b in &set.backends {
                        let k = (b.addr_be, b.port_be);
                        if let Some(n) = g.members.get_mut(&k) {
                            *n = n.saturating_sub(1);
                            if *n == 0 {
                                g.members.remove(&k);
                                store
                                    .delete_affinity_match(AffinityMatchKey {
                                        affinity_id: g.id,
                                        addr_be: k.0,
                                        port_be: k.1,
                                        _pad: 0,
                                    })
                                    .map_err(ReconcileError::Map)?;
                                *writes += 1;
                            }
                        }
                    }
                    if g.refs == 0 {
                        let id = g.id;
                        let left = std::mem::take(&mut g.members)
                            .into_keys()
                            .chain(std::mem::take(&mut g.adopted));
                        for k in left {
                            store
                                .delete_affinity_match(AffinityMatchKey {
                                    affinity_id: id,
                                    addr_be: k.0,
                                    port_be: k.1,
                                    _pad: 0,
                                })
                                .map_err(ReconcileError::Map)?;
                            *writes += 1;
                        }
                        self.groups.remove(&gk);
                        self.group_by_id.remove(&id);
                        self.ids.free_groups.push(id);
                    }
                }
            }
        }
        if let Some(e) = self.sets.get_mut(&set) {
            e.refs = e.refs.saturating_sub(1);
            if e.refs == 0 {
                let id = e.id;
                self.delete_set(id, &set, store, writes)?;
            }
        }
        Ok(())
    }

    fn delete_set<S: MapStore>(
        &mut self,
        id: u32,
        set: &SetSpec,
        store: &mut S,
        writes: &mut usize,
    ) -> Result<(), ReconcileError<S::Error>> {
        for index in 0..set.backends.len() {
            store
                .delete_backend(BackendKey {
                    set_id: id,
                    index: index as u32,
                })
                .map_err(ReconcileError::Map)?;
            *writes += 1;
        }
        if set.maglev {
            store.delete_maglev(id).map_err(ReconcileError::Map)?;
            *writes += 1;
        }
        for b in &set.backends {
            let k = (b.addr_be, b.port_be);
            if let Some(n) = self.backend_sets.get_mut(&k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.backend_sets.remove(&k);
                    self.dropped.push(k);
                }
            }
        }
        self.sets.remove(set);
        self.set_by_id.remove(&id);
        self.ids.free_sets.push(id);
        Ok(())
    }

    /// After the first apply following adoption: delete what the maps held
    /// that nothing references (sets, groups, stray entries).
    fn collect_garbage<S: MapStore>(
        &mut self,
        store: &mut S,
        writes: &mut usize,
    ) -> Result<(), ReconcileError<S::Error>> {
        let image = store.image().map_err(ReconcileError::Map)?;
        // Entries of sets never adopted (not contiguous, or duplicates).
        let stray_backends: Vec<BackendKey> = image
            .backends
            .keys()
            .filter(|k| !self.set_by_id.contains_key(&k.set_id))
            .copied()
            .collect();
        let stray_maglev: Vec<u32> = image
            .maglev
            .keys()
            .filter(|id| !self.set_by_id.get(id).is_some_and(|s| s.maglev))
            .copied()
            .collect();
        let unused: Vec<(u32, SetSpec)> = self
            .sets
            .iter()
            .filter(|(_, e)| e.refs == 0)
            .map(|(s, e)| (e.id, s.clone()))
            .collect();
        for (id, set) in unused {
            self.delete_set(id, &set, store, writes)?;
        }
        for k in stray_backends {
            store.delete_backend(k).map_err(ReconcileError::Map)?;
            *writes += 1;
        }
        for id in stray_maglev {
            store.delete_maglev(id).map_err(ReconcileError::Map)?;
            *writes += 1;
        }
        let unclaimed = std::mem::take(&mut self.orphan_groups)
            .into_iter()
            .flat_map(|(id, m)| m.into_iter().map(move |k| (id, k)));
        let unreferenced: Vec<(u32, (u32, u16))> = self
            .groups
            .values_mut()
            .flat_map(|g| {
                let id = g.id;
                std::mem::take(&mut g.adopted)
                    .into_iter()
                    .map(move |k| (id, k))
            })
            .collect();
        for (id, (addr_be, port_be)) in unclaimed.chain(unreferenced) {
            {
                store
                    .delete_affinity_match(AffinityMatchKey {
                        affinity_id: id,
                        addr_be,
                        port_be,
                        _pad: 0,
                    })
                    .map_err(ReconcileError::Map)?;
                *writes += 1;
            }
        }
        Ok(())
    }

    /// Frontend entries programmed (for metrics and netctl).
    pub fn frontends(&self) -> usize {
        self.programmed.len()
    }
}

/// The Maglev table of a set (indices into its backends).
fn maglev_indices(set: &SetSpec) -> Result<Vec<u32>, maglev::MaglevError> {
    let names: Vec<String> = set
        .backends
        .iter()
        .map(|b| {
            format!(
                "{}:{}",
                super::encode::addr_of(b.addr_be),
                u16::from_be(b.port_be)
            )
        })
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    maglev::table(&refs, MAGLEV_TABLE_SIZE)
}

/// What the programs decide for `key` from the maps' contents: the same
/// reading the kernel side does (frontend, flags, backend set).
pub fn decide(image: &Image, key: ServiceKey) -> super::encode::Decision {
    use super::encode::Decision;
    use weft_ebpf_abi::{SVC_F_DROP, SVC_F_REJECT, SVC_F_SNAT};
    let Some(v) = image.services.get(&key) else {
        return Decision::Pass;
    };
    if v.flags & SVC_F_REJECT != 0 {
        return Decision::Reject;
    }
    if v.flags & SVC_F_DROP != 0 || v.count == 0 {
        return Decision::Drop;
    }
    let mut backends: Vec<Backend> = (0..v.count)
        .filter_map(|index| {
            image.backends.get(&BackendKey {
                set_id: v.set_id,
                index,
            })
        })
        .copied()
        .collect();
    backends.sort();
    Decision::Translate {
        backends,
        snat: v.flags & SVC_F_SNAT != 0,
        affinity_timeout: (v.affinity_id != 0).then_some(v.affinity_timeout_s),
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::fixtures::{backend as be, config, node_port_service, NODE};
    use super::super::super::plan::{PlanBuilder, ServicePlan};
    use super::super::encode::{addr_be, proto_number, Decision};
    use super::*;
    use std::net::Ipv4Addr;
    use weft_ebpf_abi::{SCOPE_EXTERNAL, SCOPE_SOCKET};
    use weft_model::view::Protocol;
    use weft_model::{NodeView, ServiceEntry};

    fn key(ip: &str, port: u16, scope: u8) -> ServiceKey {
        ServiceKey {
            addr_be: addr_be(ip.parse::<Ipv4Addr>().unwrap()),
            port_be: port.to_be(),
            proto: proto_number(Protocol::TCP),
            scope,
        }
    }

    fn svc(i: u16, backends: usize) -> ServiceEntry {
        let mut s = node_port_service(
            &format!("s{i:03}"),
            (0..backends)
                .map(|b| {
                    // Distinct per Service, so no two Services share a set.
                    let ip = format!(
                        "198.18.{}.{}",
                        128 + 2 * (i % 60) as usize + b % 2,
                        10 + b + 10 * (i / 60) as usize
                    );
                    be(
                        &ip,
                        if b % 2 == 0 { NODE } else { "node-2" },
                        true,
                        true,
                        false,
                    )
                })
                .collect(),
        );
        s.cluster_ips = vec![format!("198.19.{}.{}", i / 200, i % 200 + 20)
            .parse()
            .unwrap()];
        s.ports[0].node_port = Some(30000 + i);
        s
    }

    struct Views {
        builder: PlanBuilder,
        services: Vec<ServiceEntry>,
    }

    impl Views {
        fn new(services: Vec<ServiceEntry>) -> Views {
            Views {
                builder: PlanBuilder::default(),
                services,
            }
        }
        fn plan(&mut self) -> ServicePlan {
            let view = NodeView {
                rev: 1,
                synced: true,
                services: self.services.iter().map(|s| (s.key(), s.clone())).collect(),
                nodes: Default::default(),
                pods: Default::default(),
            };
            self.builder.build(&view, &config())
        }
        /// The plan when only `names` changed (the builder's delta path).
        fn update(&mut self, names: &[String]) -> ServicePlan {
            let view = NodeView {
                rev: 1,
                synced: true,
                services: self.services.iter().map(|s| (s.key(), s.clone())).collect(),
                nodes: Default::default(),
                pods: Default::default(),
            };
            let changed = names
                .iter()
                .map(|n| ("default".to_string(), n.clone()))
                .collect();
            self.builder.update(&view, &config(), &changed)
        }
    }

    /// Every frontend of the plan decides, read off the maps, what the
    /// encoded specs say; nothing else is in the services map; no set,
    /// table or match entry is left over.
    fn consistent(plan: &ServicePlan, maps: &FakeMaps) {
        let specs: Vec<_> = plan
            .services
            .iter()
            .flat_map(|s| encode(s).frontends)
            .collect();
        let mut keys = BTreeSet::new();
        for f in &specs {
            if !keys.insert(f.key) {
                continue;
            }
            assert_eq!(
                decide(&maps.image, f.key),
                super::super::encode::lookup(&specs, f.key),
                "{:?}",
                f.key
            );
        }
        assert_eq!(
            maps.image.services.keys().copied().collect::<BTreeSet<_>>(),
            keys,
            "services map holds exactly the plan's frontends"
        );
        let used: BTreeSet<u32> = maps
            .image
            .services
            .values()
            .filter(|v| v.count > 0)
            .map(|v| v.set_id)
            .collect();
        let held: BTreeSet<u32> = maps.image.backends.keys().map(|k| k.set_id).collect();
        assert_eq!(used, held, "no orphan backend set");
        for id in maps.image.maglev.keys() {
            assert!(used.contains(id), "orphan Maglev table {id}");
        }
        let mut members: BTreeSet<AffinityMatchKey> = BTreeSet::new();
        for v in maps.image.services.values().filter(|v| v.affinity_id != 0) {
            for index in 0..v.count {
                let b = maps.image.backends[&BackendKey {
                    set_id: v.set_id,
                    index,
                }];
                members.insert(AffinityMatchKey {
                    affinity_id: v.affinity_id,
                    addr_be: b.addr_be,
                    port_be: b.port_be,
                    _pad: 0,
                });
            }
        }
        assert_eq!(maps.image.affinity_match, members, "affinity members");
    }

    #[test]
    fn one_endpoint_change_writes_only_that_service() {
        let mut views = Views::new((0..100).map(|i| svc(i, 4)).collect());
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::adopt(&Image::default());
        let plan = views.plan();
        let first = r.apply(&plan, &mut maps).unwrap();
        assert_eq!(first.services_changed, 100);
        consistent(&plan, &maps);
        // One NodePort Service: cluster IP and NodePort, two scopes each;
        // both scopes share one set of 4 backends.
        assert_eq!(maps.image.services.len(), 400);
        assert_eq!(maps.image.backends.len(), 400);

        let plan = views.plan();
        let again = r.apply(&plan, &mut maps).unwrap();
        assert_eq!((again.services_changed, again.writes), (0, 0));

        views.services[42].backends.pop();
        let plan = views.plan();
        let before = maps.writes;
        let change = r.apply(&plan, &mut maps).unwrap();
        consistent(&plan, &maps);
        assert_eq!(change.services_changed, 1);
        // new set (3) + 4 frontends switched + old set deleted (4)
        assert_eq!(change.writes, 3 + 4 + 4, "{change:?}");
        assert_eq!(change.removed_backends.len(), 1, "{change:?}");
        assert_eq!(maps.writes - before, change.writes);
    }

    #[test]
    fn reject_drop_and_removal() {
        let mut s = svc(1, 2);
        let mut views = Views::new(vec![s.clone()]);
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::adopt(&Image::default());
        r.apply(&views.plan(), &mut maps).unwrap();
        s.backends.clear();
        views.services = vec![s.clone()];
        let plan = views.plan();
        r.apply(&plan, &mut maps).unwrap();
        consistent(&plan, &maps);
        assert_eq!(
            decide(&maps.image, key("198.19.0.21", 80, SCOPE_SOCKET)),
            Decision::Reject
        );
        assert!(maps.image.backends.is_empty());
        s.backends = vec![be("198.18.129.10", "node-2", true, true, false)];
        s.external_local = true;
        views.services = vec![s];
        let plan = views.plan();
        r.apply(&plan, &mut maps).unwrap();
        consistent(&plan, &maps);
        assert_eq!(
            decide(&maps.image, key("198.18.0.11", 30001, SCOPE_EXTERNAL)),
            Decision::Drop
        );
        views.services.clear();
        let plan = views.plan();
        r.apply(&plan, &mut maps).unwrap();
        assert_eq!(maps.image, Image::default(), "everything removed");
    }

    #[test]
    fn restart_adopts_the_maps_and_rewrites_nothing_still_right() {
        let mut services: Vec<ServiceEntry> = (0..20).map(|i| svc(i, 3)).collect();
        services[3].affinity_timeout = Some(600);
        services[4]
            .options
            .insert(super::super::encode::LB_OPTION.into(), "maglev".into());
        let mut views = Views::new(services);
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::adopt(&Image::default());
        let plan = views.plan();
        r.apply(&plan, &mut maps).unwrap();
        consistent(&plan, &maps);
        assert_eq!(maps.image.maglev.len(), 1);
        let group = maps.image.services[&key("198.19.0.23", 80, SCOPE_SOCKET)].affinity_id;
        assert_ne!(group, 0);

        // A new agent: same plan, nothing written.
        let mut r2 = Reconciler::adopt(&maps.image);
        let stats = r2.apply(&views.plan(), &mut maps).unwrap();
        assert_eq!(stats.writes, 0, "{stats:?}");
        assert_eq!(
            maps.image.services[&key("198.19.0.23", 80, SCOPE_SOCKET)].affinity_id,
            group,
            "sticky clients keep their group"
        );

        // A new agent after changes while it was down: only those written.
        views.services[5].backends.pop();
        views.services.remove(6);
        let mut r3 = Reconciler::adopt(&maps.image);
        let plan = views.plan();
        let stats = r3.apply(&plan, &mut maps).unwrap();
        consistent(&plan, &maps);
        // s005: new set (2) + 4 frontends + old set (3); s006: 4 frontends + set (3)
        assert_eq!(stats.writes, 2 + 4 + 3 + 4 + 3, "{stats:?}");
        // and it keeps working incrementally
        views.services[3].backends.pop();
        let plan = views.plan();
        r3.apply(&plan, &mut maps).unwrap();
        consistent(&plan, &maps);
    }

    #[test]
    fn adoption_cleans_what_nothing_wants() {
        let mut image = Image::default();
        // a set with a hole, a stray table and an unclaimed group
        image.backends.insert(
            BackendKey {
                set_id: 9,
                index: 1,
            },
            Backend::default(),
        );
        image.maglev.insert(7, vec![0; 3]);
        image.affinity_match.insert(AffinityMatchKey {
            affinity_id: 5,
            ..Default::default()
        });
        image.services.insert(
            key("198.19.9.9", 80, SCOPE_SOCKET),
            ServiceValue {
                set_id: 9,
                count: 2,
                ..Default::default()
            },
        );
        let mut maps = FakeMaps {
            image: image.clone(),
            writes: 0,
        };
        let mut r = Reconciler::adopt(&image);
        let mut views = Views::new(vec![svc(1, 2)]);
        let plan = views.plan();
        r.apply(&plan, &mut maps).unwrap();
        consistent(&plan, &maps);
        assert!(maps.image.maglev.is_empty() && maps.image.affinity_match.is_empty());
    }

    #[test]
    fn conflicting_frontends_first_service_wins() {
        let a = svc(1, 2);
        let mut b = svc(2, 3);
        b.cluster_ips = a.cluster_ips.clone();
        let mut views = Views::new(vec![a, b]);
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::adopt(&Image::default());
        let stats = r.apply(&views.plan(), &mut maps).unwrap();
        assert_eq!(
            stats.conflicts.len(),
            2,
            "both scopes: {:?}",
            stats.conflicts
        );
        assert_eq!(stats.conflicts[0].1, "default/s001");
        match decide(&maps.image, key("198.19.0.21", 80, SCOPE_SOCKET)) {
            Decision::Translate { backends, .. } => assert_eq!(backends.len(), 2),
            d => panic!("{d:?}"),
        }
        // the winner leaves: the other takes the frontend over
        views.services.remove(0);
        let plan = views.plan();
        r.apply(&plan, &mut maps).unwrap();
        consistent(&plan, &maps);
        match decide(&maps.image, key("198.19.0.21", 80, SCOPE_SOCKET)) {
            Decision::Translate { backends, .. } => assert_eq!(backends.len(), 3),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn affinity_members_follow_the_backends() {
        let mut s = svc(1, 3);
        s.affinity_timeout = Some(60);
        let mut views = Views::new(vec![s]);
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::adopt(&Image::default());
        let plan = views.plan();
        r.apply(&plan, &mut maps).unwrap();
        consistent(&plan, &maps);
        assert_eq!(maps.image.affinity_match.len(), 3);
        views.services[0].backends.remove(0);
        let plan = views.plan();
        r.apply(&plan, &mut maps).unwrap();
        consistent(&plan, &maps);
        assert_eq!(maps.image.affinity_match.len(), 2);
        views.services[0].affinity_timeout = None;
        let plan = views.plan();
        let stats = r.apply(&plan, &mut maps).unwrap();
        assert!(
            stats.removed_backends.is_empty(),
            "a changed set keeps its backends: {stats:?}"
        );
        assert!(maps.image.affinity_match.is_empty());
        views.services[0].affinity_timeout = Some(60);
        let plan = views.plan();
        r.apply(&plan, &mut maps).unwrap();
        consistent(&plan, &maps);
        assert_eq!(maps.image.affinity_match.len(), 2);
        views.services[0].affinity_timeout = None;
        let plan = views.plan();
        r.apply(&plan, &mut maps).unwrap();
        consistent(&plan, &maps);
        assert!(maps.image.affinity_match.is_empty());
    }

    /// Maps that stop taking writes after `budget` more: an agent killed
    /// in the middle of an update.
    struct Crashing {
        maps: FakeMaps,
        budget: usize,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("killed")]
    struct Killed;

    impl MapStore for Crashing {
        type Error = Killed;
        fn put_service(&mut self, k: ServiceKey, v: ServiceValue) -> Result<(), Killed> {
            self.spend()?;
            self.maps.put_service(k, v).map_err(|_| Killed)
        }
        fn delete_service(&mut self, k: ServiceKey) -> Result<(), Killed> {
            self.spend()?;
            self.maps.delete_service(k).map_err(|_| Killed)
        }
        fn put_backend(&mut self, k: BackendKey, v: Backend) -> Result<(), Killed> {
            self.spend()?;
            self.maps.put_backend(k, v).map_err(|_| Killed)
        }
        fn delete_backend(&mut self, k: BackendKey) -> Result<(), Killed> {
            self.spend()?;
            self.maps.delete_backend(k).map_err(|_| Killed)
        }
        fn put_maglev(&mut self, id: u32, t: &MaglevTable) -> Result<(), Killed> {
            self.spend()?;
            self.maps.put_maglev(id, t).map_err(|_| Killed)
        }
        fn delete_maglev(&mut self, id: u32) -> Result<(), Killed> {
            self.spend()?;
            self.maps.delete_maglev(id).map_err(|_| Killed)
        }
        fn put_affinity_match(&mut self, k: AffinityMatchKey) -> Result<(), Killed> {
            self.spend()?;
            self.maps.put_affinity_match(k).map_err(|_| Killed)
        }
        fn delete_affinity_match(&mut self, k: AffinityMatchKey) -> Result<(), Killed> {
            self.spend()?;
            self.maps.delete_affinity_match(k).map_err(|_| Killed)
        }
        fn image(&self) -> Result<Image, Killed> {
            Ok(self.maps.image.clone())
        }
    }

    impl Crashing {
        fn spend(&mut self) -> Result<(), Killed> {
            if self.budget == 0 {
                return Err(Killed);
            }
            self.budget -= 1;
            Ok(())
        }
    }

    /// What the programs may read at any instant: every frontend that
    /// translates points at a whole backend set (and Maglev table).
    fn no_dangling(image: &Image) {
        for (k, v) in &image.services {
            if v.count == 0 {
                continue;
            }
            for index in 0..v.count {
                assert!(
                    image.backends.contains_key(&BackendKey {
                        set_id: v.set_id,
                        index
                    }),
                    "{k:?} -> set {} lacks backend {index}",
                    v.set_id
                );
            }
            if v.flags & weft_ebpf_abi::SVC_F_MAGLEV != 0 {
                let table = image
                    .maglev
                    .get(&v.set_id)
                    .expect("Maglev table written first");
                assert!(
                    table.iter().all(|i| *i < v.count),
                    "table points past the set"
                );
            }
        }
    }

    use proptest::prelude::*;

    proptest! {
        /// An agent killed after any number of map writes leaves maps the
        /// programs can still use (no frontend points at a missing backend),
        /// and the next agent adopts them and converges.
        #[test]
        fn killed_mid_update_the_next_agent_converges(
            changes in prop::collection::vec((0usize..6, 0u8..6, 0usize..40), 1..12)
        ) {
            let mut views = Views::new((0..6).map(|i| svc(i, 3)).collect());
            let mut maps = FakeMaps::default();
            Reconciler::adopt(&Image::default()).apply(&views.plan(), &mut maps).unwrap();
            for (i, what, budget) in changes {
                if let Some(s) = views.services.get_mut(i) {
                    match what {
                        0 => { s.backends.pop(); }
                        1 => s.backends.push(be(&format!("198.18.129.{}", 60 + s.backends.len()), "node-2", true, true, false)),
                        2 => s.affinity_timeout = if s.affinity_timeout.is_some() { None } else { Some(30) },
                        3 => { s.options.insert(super::super::encode::LB_OPTION.into(), "maglev".into()); }
                        4 => { views.services.remove(i); }
                        _ => s.external_local = !s.external_local,
                    }
                }
                let plan = views.plan();
                // The agent that dies part-way through this plan...
                let mut crashing = Crashing { maps: std::mem::take(&mut maps), budget };
                let mut r = Reconciler::adopt(&crashing.maps.image);
                let _ = r.apply(&plan, &mut crashing);
                no_dangling(&crashing.maps.image);
                // ... and the one started after it.
                maps = crashing.maps;
                let mut next = Reconciler::adopt(&maps.image);
                next.apply(&plan, &mut maps).unwrap();
                consistent(&plan, &maps);
                no_dangling(&maps.image);
            }
        }
    }

    fn arb_change() -> impl Strategy<Value = (usize, u8)> {
        (0usize..6, 0u8..8)
    }

    proptest! {
        /// Random sequences of changes (backends, policies, affinity,
        /// Maglev, removal), with an agent restart now and then: the maps
        /// always say what the encoded plan says, and hold nothing else.
        #[test]
        fn maps_follow_any_sequence_of_plans(changes in prop::collection::vec(arb_change(), 1..25)) {
            let mut views = Views::new((0..6).map(|i| svc(i, 3)).collect());
            let mut maps = FakeMaps::default();
            let mut r = Reconciler::adopt(&Image::default());
            for (i, what) in changes {
                let mut touched: Vec<String> = views.services.get(i).map(|s| s.name.clone()).into_iter().collect();
                if let Some(s) = views.services.get_mut(i) {
                    match what {
                        0 => { s.backends.pop(); }
                        1 => s.backends.push(be(&format!("198.18.129.{}", 50 + s.backends.len()), "node-2", true, true, false)),
                        2 => s.external_local = !s.external_local,
                        3 => s.affinity_timeout = if s.affinity_timeout.is_some() { None } else { Some(30) },
                        4 => { s.options.insert(super::super::encode::LB_OPTION.into(), "maglev".into()); }
                        5 => { views.services.remove(i); }
                        6 => s.internal_local = !s.internal_local,
                        _ => r = Reconciler::adopt(&maps.image),
                    }
                } else {
                    let s = svc(10 + i as u16, 2);
                    touched.push(s.name.clone());
                    views.services.push(s);
                }
                // Half the time the builder's delta path (only the touched
                // Service listed), else a full comparison.
                let plan = if what % 2 == 0 { views.update(&touched) } else { views.plan() };
                r.apply(&plan, &mut maps).unwrap();
                consistent(&plan, &maps);
            }
        }
    }
}
