//! The control plane's state: every object in memory over a durable
//! [`Store`], changed only by transactions. One API write is one transaction:
//! decode, defaults, validation, authorization, allocation and the endpoint
//! controller's reaction all happen before anything is stored, so a failing
//! request leaves nothing behind. Committed changes reach watchers and the
//! node view only once the store reports them durable.

use crate::alloc::{AllocError, IpAllocator, PortAllocator, SubnetAllocator};
use crate::auth::Identity;
use crate::compile;
use crate::controllers::endpoints::{self, SERVICE_NAME_LABEL};
use crate::status::ApiError;
use crate::store::{Durable, Op, Store, Txn};
use bytes::Bytes;
use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::{Namespace, NamespaceStatus, Pod, PodStatus, ServiceStatus};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;
use weft_model::validate::{validate_object, validate_update};
use weft_model::view::{wire, Protocol};
use weft_model::{
    Change, FieldError, FieldErrorKind, Kind, LabelSelector, NodeEntry, Object, ObjectKey,
    ServiceEntry, ValidationContext,
};

/// Cluster-wide settings.
#[derive(Clone, Debug)]
pub struct Settings {
    pub service_cidr: Ipv4Network,
    pub cluster_cidr: Ipv4Network,
    pub node_cidr_mask: u8,
    pub node_port_range: RangeInclusive<u16>,
    /// Watch events retained for `?watch=1&resourceVersion=N` resumption.
    pub watch_history: usize,
    /// View deltas retained for stream resumption without a snapshot.
    pub stream_history: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            service_cidr: "10.96.0.0/12".parse().expect("static"),
            cluster_cidr: "10.244.0.0/16".parse().expect("static"),
            node_cidr_mask: 24,
            node_port_range: 30000..=32767,
            watch_history: 20_000,
            stream_history: 20_000,
        }
    }
}

/// An object as stored: the typed value and its JSON encoding (with resourceVersion).
#[derive(Clone, Debug)]
pub struct Stored {
    pub obj: Arc<Object>,
    pub json: Bytes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One watch event, encoded once for every watcher.
#[derive(Debug)]
pub struct WatchEvent {
    pub rev: u64,
    pub event: EventType,
    pub obj: Arc<Object>,
    /// The object before a modification (for selector watches).
    pub prev: Option<Arc<Object>>,
    /// `{"type":"ADDED","object":{...}}\n`
    pub line: Bytes,
    /// The object's JSON alone.
    pub json: Bytes,
}

impl WatchEvent {
    /// The line a watcher whose filter is `matches` should see, if any: a
    /// modification that moves an object into or out of the selection is an
    /// ADDED or DELETED for that watcher, as in Kubernetes.
    pub fn line_for(&self, matches: impl Fn(&Object) -> bool) -> Option<Bytes> {
        let now = matches(&self.obj);
        match (self.event, self.prev.as_deref().map(&matches)) {
            (EventType::Modified, Some(true)) if !now => {
                Some(watch_line(EventType::Deleted, &self.json))
            }
            (EventType::Modified, Some(false)) if now => {
                Some(watch_line(EventType::Added, &self.json))
            }
            _ if now => Some(self.line.clone()),
            _ => None,
        }
    }
}

/// A committed transaction waiting to become durable before it is published.
#[derive(Debug)]
pub struct Committed {
    pub rev: u64,
    pub events: Vec<Arc<WatchEvent>>,
    /// Encoded view changes (items of a Delta's `changes`).
    pub changes: Vec<Bytes>,
}

const RESERVATION_PREFIX: &str = "weft/podcidr/";

fn store_key(key: &ObjectKey) -> String {
    if key.namespace.is_empty() {
        format!("{}/{}", key.kind.plural(), key.name)
    } else {
        format!("{}/{}/{}", key.kind.plural(), key.namespace, key.name)
    }
}

struct Inner {
    objects: BTreeMap<ObjectKey, Stored>,
    /// (namespace, service name) -> names of EndpointSlices labelled with it.
    slices_by_service: HashMap<(String, String), BTreeSet<String>>,
    rev: u64,
    ips: IpAllocator,
    ports: [PortAllocator; 3],
    subnets: SubnetAllocator,
    /// Pods in graceful deletion: (deadline in unix seconds, key).
    terminating: BTreeSet<(i64, ObjectKey)>,
    /// Compiled Services with their JSON, encoded once and reused by every Reset and Delta.
    view_services: BTreeMap<(String, String), (ServiceEntry, Bytes)>,
    view_nodes: BTreeMap<String, NodeEntry>,
    /// Compiled Pods, kept only as their JSON (reused by every Reset and
    /// Delta): pods are the most numerous entries, and the encoding of an
    /// entry is deterministic, so equal bytes mean an unchanged entry.
    view_pods: BTreeMap<(String, String), Bytes>,
    snapshot: Option<(u64, Bytes)>,
    pending: VecDeque<Committed>,
    failed: Option<String>,
}

fn proto_index(p: Protocol) -> usize {
    match p {
        Protocol::TCP => 0,
        Protocol::UDP => 1,
        Protocol::SCTP => 2,
    }
}

/// Writes staged by one transaction; `None` deletes.
#[derive(Default)]
struct Staged {
    writes: BTreeMap<ObjectKey, Option<Object>>,
    extra: Vec<Op>,
    /// Allocations to undo if the transaction fails.
    undo: Vec<Alloc>,
    /// Allocations to release once the transaction commits.
    release: Vec<Alloc>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Alloc {
    Ip(Ipv4Addr),
    Port(Protocol, u16),
    Subnet(String),
}

/// Options of a DELETE.
#[derive(Clone, Debug, Default)]
pub struct DeleteOptions {
    pub grace_period_seconds: Option<i64>,
    pub precondition_rv: Option<String>,
}

/// The control plane.
pub struct Control {
    settings: Settings,
    validation: ValidationContext,
    inner: Mutex<Inner>,
    store: Box<dyn Store>,
    durable: watch::Receiver<Durable>,
    pub watch: Mutex<crate::watch::WatchHub>,
    pub hub: Mutex<crate::stream::ViewHub>,
}

fn now_ts() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp::new(d.as_secs() as i64, d.subsec_nanos() as i32).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn now() -> Time {
    Time(now_ts())
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    if getrandom::fill(&mut b).is_err() {
        // Fall back to time-derived bytes; uniqueness is still checked by callers.
        let t = now_ts().as_nanosecond() as u128;
        for (i, x) in b.iter_mut().enumerate() {
            *x = (t >> ((i % 16) * 8)) as u8 ^ (i as u8).wrapping_mul(151);
        }
    }
    b
}

fn new_uid() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Kubernetes' generateName suffix alphabet (no vowels, no confusable digits).
fn random_suffix() -> String {
    const ALPHA: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    random_bytes::<5>()
        .iter()
        .map(|b| ALPHA[*b as usize % ALPHA.len()] as char)
        .collect()
}

fn field(
    kind: FieldErrorKind,
    field: &str,
    value: Option<String>,
    detail: impl Into<String>,
) -> FieldError {
    FieldError {
        kind,
        field: field.into(),
        value,
        detail: detail.into(),
    }
}

impl Control {
    /// Open the control plane over `store`, loading what it holds.
    pub fn open(settings: Settings, mut store: Box<dyn Store>) -> anyhow::Result<Arc<Control>> {
        let snap = store.load()?;
        let mut inner = Inner {
            objects: BTreeMap::new(),
            slices_by_service: HashMap::new(),
            rev: snap.rev,
            ips: IpAllocator::new(settings.service_cidr),
            ports: [
                PortAllocator::new(settings.node_port_range.clone()),
                PortAllocator::new(settings.node_port_range.clone()),
                PortAllocator::new(settings.node_port_range.clone()),
            ],
            subnets: SubnetAllocator::new(settings.cluster_cidr, settings.node_cidr_mask)
                .map_err(anyhow::Error::msg)?,
            terminating: BTreeSet::new(),
            view_services: BTreeMap::new(),
            view_nodes: BTreeMap::new(),
            view_pods: BTreeMap::new(),
            snapshot: None,
            pending: VecDeque::new(),
            failed: None,
        };
        let mut reservations = Vec::new();
        for (key, value) in &snap.entries {
            if let Some(node) = key.strip_prefix(RESERVATION_PREFIX) {
                let cidr = std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse::<Ipv4Network>().ok());
                match cidr {
                    Some(c) => reservations.push((node.to_string(), c)),
                    None => tracing::warn!(key, "ignoring unreadable pod CIDR reservation"),
                }
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(value)
                .map_err(|e| anyhow::anyhow!("stored object {key} is not JSON: {e}"))?;
            let obj =
                Object::from_value(v).map_err(|e| anyhow::anyhow!("stored object {key}: {e}"))?;
            let k = obj.key();
            inner.index(&k, None, Some(&obj));
            inner.objects.insert(
                k,
                Stored {
                    obj: Arc::new(obj),
                    json: value.clone(),
                },
            );
        }
        for (node, cidr) in reservations {
            inner.subnets.restore_reservation(&node, cidr);
        }
        inner.rebuild_allocations();
        inner.rebuild_view();
        let durable = store.durable();
        let rev = inner.rev;
        let validation = ValidationContext {
            service_cidrs: vec![settings.service_cidr.into()],
            node_port_range: settings.node_port_range.clone(),
        };
        let control = Arc::new(Control {
            watch: Mutex::new(crate::watch::WatchHub::new(rev, settings.watch_history)),
            hub: Mutex::new(crate::stream::ViewHub::new(rev, settings.stream_history)),
            settings,
            validation,
            inner: Mutex::new(inner),
            store,
            durable,
        });
        tracing::info!(rev, objects = control.lock().objects.len(), "state loaded");
        Ok(control)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug; the state is still consistent
        // because transactions apply only after every fallible step.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn durable(&self) -> watch::Receiver<Durable> {
        self.durable.clone()
    }

    pub fn rev(&self) -> u64 {
        self.lock().rev
    }

    pub fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// Create the namespaces every cluster has, if missing.
    pub fn bootstrap(&self) -> Result<Option<u64>, ApiError> {
        let mut inner = self.lock();
        let mut st = Staged::default();
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let key = ObjectKey::new(Kind::Namespace, "", ns);
            if inner.objects.contains_key(&key) {
                continue;
            }
            let mut obj = Object::Namespace(Namespace {
                metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                    name: Some(ns.into()),
                    ..Default::default()
                },
                ..Default::default()
            });
            prepare_create(&mut obj);
            st.writes.insert(key, Some(obj));
        }
        if st.writes.is_empty() {
            return Ok(None);
        }
        self.commit(&mut inner, st).map(Some)
    }

    // ---- reads ----

    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Result<(Stored, u64), ApiError> {
        let inner = self.lock();
        let key = ObjectKey::new(kind, ns, name);
        inner
            .objects
            .get(&key)
            .cloned()
            .map(|s| (s, inner.rev))
            .ok_or_else(|| ApiError::not_found(kind, name))
    }

    /// Objects of `kind` (in `ns`, or all namespaces) matching the selectors, and the list revision.
    pub fn list(
        &self,
        kind: Kind,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> (Vec<Stored>, u64) {
        let inner = self.lock();
        let out = inner
            .range(kind, ns)
            .filter(|s| labels.matches(s.obj.meta().labels.as_ref()) && fields.matches(&s.obj))
            .cloned()
            .collect();
        (out, inner.rev)
    }

    /// Everything of `kind` at the current revision, with a watch subscription from exactly there.
    pub fn list_and_subscribe(
        &self,
        kind: Kind,
        ns: Option<&str>,
    ) -> (
        Vec<Stored>,
        u64,
        tokio::sync::broadcast::Receiver<Arc<WatchEvent>>,
    ) {
        // The watch hub is published to under its own lock after durability; subscribing
        // while holding the state lock means every event after `rev` arrives on `rx`.
        let inner = self.lock();
        let rx = self
            .watch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .subscribe();
        let items = inner.range(kind, ns).cloned().collect();
        (items, inner.rev, rx)
    }

    /// The encoded Reset frame of the current view and its revision.
    pub fn snapshot(&self) -> (u64, Bytes) {
        let mut inner = self.lock();
        if let Some((rev, bytes)) = &inner.snapshot {
            if *rev == inner.rev {
                return (*rev, bytes.clone());
            }
        }
        let nodes: Vec<&NodeEntry> = inner.view_nodes.values().collect();
        let bytes = Bytes::from(wire::reset(
            inner.rev,
            inner.view_services.values().map(|(_, b)| b.as_ref()),
            &nodes,
            inner.view_pods.values().map(|b| b.as_ref()),
        ));
        inner.snapshot = Some((inner.rev, bytes.clone()));
        (inner.rev, bytes)
    }

    // ---- writes ----

    fn check_writable(inner: &Inner) -> Result<(), ApiError> {
        match &inner.failed {
            Some(f) => Err(ApiError::Unavailable(f.clone())),
            None => Ok(()),
        }
    }

    /// Create an object from a request body. Returns the stored object and the revision to wait for.
    pub fn create(
        &self,
        who: &Identity,
        kind: Kind,
        ns: Option<&str>,
        body: serde_json::Value,
    ) -> Result<(Stored, u64), ApiError> {
        let mut obj = decode_body(kind, body)?;
        set_namespace(&mut obj, ns)?;
        let mut inner = self.lock();
        Self::check_writable(&inner)?;
        if obj.name().is_empty() {
            if let Some(prefix) = obj.meta().generate_name.clone() {
                obj.meta_mut().name =
                    Some(inner.unique_name(kind, obj.namespace(), &prefix, &Staged::default()));
            }
        }
        let name = obj.name().to_string();
        authorize_write(who, None, Some(&obj))?;
        prepare_create(&mut obj);
        let errs = validate_object(&obj, &self.validation);
        if !errs.is_empty() {
            return Err(ApiError::invalid(kind, &name, errs));
        }
        let key = obj.key();
        if kind.namespaced() {
            let nskey = ObjectKey::new(Kind::Namespace, "", obj.namespace());
            if !inner.objects.contains_key(&nskey) {
                return Err(ApiError::not_found(Kind::Namespace, obj.namespace()));
            }
        }
        if inner.objects.contains_key(&key) {
            return Err(ApiError::AlreadyExists { kind, name });
        }
        self.admit_and_commit(&mut inner, None, obj)
    }

    /// Admission (allocation), the controllers' reaction and commit of one object write.
    fn admit_and_commit(
        &self,
        inner: &mut Inner,
        old: Option<&Object>,
        mut obj: Object,
    ) -> Result<(Stored, u64), ApiError> {
        let key = obj.key();
        let mut st = Staged::default();
        if let Err(e) = inner.admit(&mut st, old, &mut obj) {
            inner.undo(&mut st);
            return Err(e);
        }
        st.writes.insert(key.clone(), Some(obj));
        inner.run_controllers(&mut st);
        let rev = self.commit(inner, st)?;
        let stored = inner
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::Internal(format!("{key} vanished after its write")))?;
        Ok((stored, rev))
    }

    /// Replace an object (or its status when `status` is true).
    pub fn update(
        &self,
        who: &Identity,
        kind: Kind,
        ns: Option<&str>,
        name: &str,
        body: serde_json::Value,
        status: bool,
    ) -> Result<(Stored, u64), ApiError> {
        let mut obj = decode_body(kind, body)?;
        set_namespace(&mut obj, ns)?;
        if obj.name().is_empty() {
            obj.meta_mut().name = Some(name.to_string());
        }
        if obj.name() != name {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                obj.name()
            )));
        }
        let mut inner = self.lock();
        Self::check_writable(&inner)?;
        let key = obj.key();
        let old = inner
            .objects
            .get(&key)
            .map(|s| s.obj.clone())
            .ok_or_else(|| ApiError::not_found(kind, name))?;
        if let Some(rv) = obj
            .meta()
            .resource_version
            .as_deref()
            .filter(|r| !r.is_empty())
        {
            if Some(rv) != old.meta().resource_version.as_deref() {
                return Err(ApiError::Conflict {
                    kind,
                    name: name.into(),
                    reason: "the object has been modified; please apply your changes to the latest version and try again".into(),
                });
            }
        }
        authorize_write(who, Some(&old), Some(&obj))?;
        prepare_update(&old, &mut obj, status);
        let errs = validate_update(&old, &obj, &self.validation);
        if !errs.is_empty() {
            return Err(ApiError::invalid(kind, name, errs));
        }
        // A status update may not move a Pod either: check what will be stored.
        authorize_write(who, Some(&old), Some(&obj))?;
        if *old == obj {
            // Nothing changed: Kubernetes answers with the object and no new revision.
            let stored = inner
                .objects
                .get(&key)
                .cloned()
                .ok_or_else(|| ApiError::not_found(kind, name))?;
            return Ok((stored, inner.rev));
        }
        self.admit_and_commit(&mut inner, Some(&old), obj)
    }

    /// Delete an object. Pods bound to a node terminate gracefully first.
    pub fn delete(
        &self,
        who: &Identity,
        kind: Kind,
        ns: &str,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<(Stored, u64), ApiError> {
        let mut inner = self.lock();
        Self::check_writable(&inner)?;
        let key = ObjectKey::new(kind, ns, name);
        let old = inner
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(kind, name))?;
        if let Some(rv) = &opts.precondition_rv {
            if Some(rv.as_str()) != old.obj.meta().resource_version.as_deref() {
                return Err(ApiError::Conflict {
                    kind,
                    name: name.into(),
                    reason: format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}", old.obj.meta().resource_version.as_deref().unwrap_or("")),
                });
            }
        }
        authorize_write(who, Some(&old.obj), None)?;
        if kind == Kind::Namespace && matches!(name, "default" | "kube-system" | "kube-public") {
            return Err(ApiError::Forbidden(format!(
                "namespaces \"{name}\" is forbidden: this namespace may not be deleted"
            )));
        }
        let mut st = Staged::default();
        if let Object::Pod(pod) = &*old.obj {
            let bound = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .is_some();
            let default_grace = pod
                .spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
                .unwrap_or(30);
            let grace = opts.grace_period_seconds.unwrap_or(default_grace).max(0);
            if bound && grace > 0 {
                if pod.metadata.deletion_timestamp.is_some() {
                    // Already terminating: a second delete can only shorten the grace period.
                    let cur = pod.metadata.deletion_grace_period_seconds.unwrap_or(grace);
                    if grace >= cur {
                        return Ok((old, inner.rev));
                    }
                }
                let mut p = pod.clone();
                p.metadata.deletion_timestamp = Some(now());
                p.metadata.deletion_grace_period_seconds = Some(grace);
                st.writes.insert(key.clone(), Some(Object::Pod(p)));
                inner.run_controllers(&mut st);
                let rev = self.commit(&mut inner, st)?;
                let stored = inner
                    .objects
                    .get(&key)
                    .cloned()
                    .ok_or_else(|| ApiError::Internal("pod vanished".into()))?;
                return Ok((stored, rev));
            }
        }
        st.writes.insert(key.clone(), None);
        if kind == Kind::Namespace {
            let doomed: Vec<ObjectKey> = inner
                .objects
                .keys()
                .filter(|k| k.kind.namespaced() && k.namespace == name)
                .cloned()
                .collect();
            for k in doomed {
                st.writes.insert(k, None);
            }
        }
        inner.run_controllers(&mut st);
        let rev = self.commit(&mut inner, st)?;
        Ok((old, rev))
    }

    /// Finish graceful deletions whose grace period has passed.
    pub fn expire_terminating(&self) -> Option<u64> {
        let mut inner = self.lock();
        if inner.failed.is_some() {
            return None;
        }
        let now = now_ts().as_second();
        let due: Vec<ObjectKey> = inner
            .terminating
            .iter()
            .take_while(|(deadline, _)| *deadline <= now)
            .map(|(_, k)| k.clone())
            .collect();
        if due.is_empty() {
            return None;
        }
        let mut st = Staged::default();
        for k in due {
            st.writes.insert(k, None);
        }
        inner.run_controllers(&mut st);
        self.commit(&mut inner, st).ok()
    }

    /// Assign a revision, submit to the store, apply in memory and queue publication.
    fn commit(&self, inner: &mut Inner, mut st: Staged) -> Result<u64, ApiError> {
        let rev = inner.rev + 1;
        let mut ops = Vec::with_capacity(st.writes.len() + st.extra.len());
        let mut encoded = Vec::with_capacity(st.writes.len());
        for (key, obj) in std::mem::take(&mut st.writes) {
            match obj {
                Some(mut obj) => {
                    obj.meta_mut().resource_version = Some(rev.to_string());
                    let json = Bytes::from(obj.to_json_bytes());
                    ops.push(Op::Put {
                        key: store_key(&key),
                        value: json.clone(),
                    });
                    encoded.push((
                        key,
                        Some(Stored {
                            obj: Arc::new(obj),
                            json,
                        }),
                    ));
                }
                None => {
                    ops.push(Op::Delete {
                        key: store_key(&key),
                    });
                    encoded.push((key, None));
                }
            }
        }
        ops.append(&mut st.extra);
        if let Err(e) = self.store.submit(Txn { rev, ops }) {
            inner.undo(&mut st);
            let msg = e.to_string();
            tracing::error!(error = %msg, "store rejected a transaction; refusing further writes");
            inner.failed = Some(msg.clone());
            return Err(ApiError::Unavailable(msg));
        }
        inner.rev = rev;
        for a in std::mem::take(&mut st.release) {
            inner.release(a);
        }
        let mut events = Vec::new();
        let mut touched_services = BTreeSet::new();
        let mut touched_nodes = BTreeSet::new();
        let mut touched_pods = BTreeSet::new();
        for (key, new) in encoded {
            let old = inner.objects.get(&key).cloned();
            inner.index(
                &key,
                old.as_ref().map(|s| &*s.obj),
                new.as_ref().map(|s| &*s.obj),
            );
            match key.kind {
                Kind::Service => {
                    touched_services.insert((key.namespace.clone(), key.name.clone()));
                }
                Kind::EndpointSlice => {
                    for s in [&old, &new].into_iter().flatten() {
                        if let Some(svc) = s
                            .obj
                            .meta()
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(SERVICE_NAME_LABEL))
                        {
                            touched_services.insert((key.namespace.clone(), svc.clone()));
                        }
                    }
                }
                Kind::Node => {
                    touched_nodes.insert(key.name.clone());
                }
                Kind::Pod => {
                    touched_pods.insert((key.namespace.clone(), key.name.clone()));
                }
                _ => {}
            }
            let prev = old.as_ref().map(|o| o.obj.clone());
            let (event, stored) = match (&old, new) {
                (_, Some(n)) => {
                    let ev = if old.is_some() {
                        EventType::Modified
                    } else {
                        EventType::Added
                    };
                    inner.objects.insert(key.clone(), n.clone());
                    (ev, n)
                }
                (Some(o), None) => {
                    inner.objects.remove(&key);
                    (EventType::Deleted, o.clone())
                }
                (None, None) => continue,
            };
            let line = watch_line(event, &stored.json);
            // The object's JSON is a slice of the line: one allocation per event.
            let json = line.slice(line.len() - stored.json.len() - 2..line.len() - 2);
            events.push(Arc::new(WatchEvent {
                rev,
                event,
                line,
                json,
                prev: if event == EventType::Modified {
                    prev
                } else {
                    None
                },
                obj: stored.obj,
            }));
        }
        let changes = inner.recompile(&touched_services, &touched_nodes, &touched_pods);
        inner.pending.push_back(Committed {
            rev,
            events,
            changes,
        });
        Ok(rev)
    }

    /// Publish every committed transaction that the store reports durable.
    pub fn publish_durable(&self, durable: u64) {
        let ready: Vec<Committed> = {
            let mut inner = self.lock();
            let mut out = Vec::new();
            while inner.pending.front().is_some_and(|c| c.rev <= durable) {
                out.extend(inner.pending.pop_front());
            }
            out
        };
        if ready.is_empty() {
            return;
        }
        {
            let mut w = self.watch.lock().unwrap_or_else(|p| p.into_inner());
            for c in &ready {
                w.publish(&c.events);
            }
        }
        let mut hub = self.hub.lock().unwrap_or_else(|p| p.into_inner());
        for c in ready {
            hub.publish(c.rev, c.changes);
        }
    }

    /// Mark the control plane failed (the store broke).
    pub fn fail(&self, why: String) {
        self.lock().failed = Some(why);
    }
}

/// One watch event line: `{"type":"ADDED","object":{...}}\n`.
pub(crate) fn watch_line(event: EventType, json: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(json.len() + 32);
    v.extend_from_slice(b"{\"type\":\"");
    v.extend_from_slice(event.as_str().as_bytes());
    v.extend_from_slice(b"\",\"object\":");
    v.extend_from_slice(json);
    v.extend_from_slice(b"}\n");
    Bytes::from(v)
}

/// `?fieldSelector=` support for the fields agents and tools filter on.
#[derive(Clone, Debug, Default)]
pub struct FieldSelector {
    terms: Vec<(String, String, bool)>,
}

impl FieldSelector {
    pub fn parse(text: &str) -> Result<FieldSelector, ApiError> {
        let mut terms = Vec::new();
        for t in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (k, v, neg) = if let Some((k, v)) = t.split_once("!=") {
                (k, v, true)
            } else if let Some((k, v)) = t.split_once("==") {
                (k, v, false)
            } else if let Some((k, v)) = t.split_once('=') {
                (k, v, false)
            } else {
                return Err(ApiError::BadRequest(format!(
                    "invalid field selector term {t:?}"
                )));
            };
            let k = k.trim();
            if !matches!(
                k,
                "metadata.name" | "metadata.namespace" | "spec.nodeName" | "status.phase"
            ) {
                return Err(ApiError::BadRequest(format!(
                    "field label not supported: {k} (supported: metadata.name, metadata.namespace, spec.nodeName, status.phase)"
                )));
            }
            terms.push((k.to_string(), v.trim().to_string(), neg));
        }
        Ok(FieldSelector { terms })
    }

    pub fn matches(&self, obj: &Object) -> bool {
        self.terms.iter().all(|(k, v, neg)| {
            let actual = match k.as_str() {
                "metadata.name" => Some(obj.name().to_string()),
                "metadata.namespace" => Some(obj.namespace().to_string()),
                "spec.nodeName" => match obj {
                    Object::Pod(p) => p.spec.as_ref().and_then(|s| s.node_name.clone()),
                    _ => None,
                },
                "status.phase" => match obj {
                    Object::Pod(p) => p.status.as_ref().and_then(|s| s.phase.clone()),
                    _ => None,
                },
                _ => None,
            };
            (actual.as_deref().unwrap_or("") == v) != *neg
        })
    }
}

fn decode_body(kind: Kind, body: serde_json::Value) -> Result<Object, ApiError> {
    if let (Some(av), Some(k)) = (
        body.get("apiVersion").and_then(|v| v.as_str()),
        body.get("kind").and_then(|v| v.as_str()),
    ) {
        if av != kind.api_version() || k != kind.name() {
            return Err(ApiError::BadRequest(format!(
                "the API version in the data ({av}) and kind ({k}) do not match the resource {} ({})",
                kind.plural(),
                kind.api_version()
            )));
        }
    }
    Object::from_value_as(kind, body).map_err(|e| ApiError::BadRequest(e.to_string()))
}

fn set_namespace(obj: &mut Object, ns: Option<&str>) -> Result<(), ApiError> {
    if !obj.kind().namespaced() {
        obj.meta_mut().namespace = None;
        return Ok(());
    }
    let Some(ns) = ns else {
        return Err(ApiError::BadRequest(
            "a namespaced object must be written under /namespaces/{namespace}/".into(),
        ));
    };
    match obj.meta().namespace.as_deref() {
        Some(given) if !given.is_empty() && given != ns => Err(ApiError::BadRequest(
            "the namespace of the provided object does not match the namespace sent on the request"
                .into(),
        )),
        _ => {
            obj.meta_mut().namespace = Some(ns.to_string());
            Ok(())
        }
    }
}

/// Server-set fields on create, and the status Kubernetes resets on create.
fn prepare_create(obj: &mut Object) {
    let m = obj.meta_mut();
    m.uid = Some(new_uid());
    m.creation_timestamp = Some(now());
    m.resource_version = None;
    m.deletion_timestamp = None;
    m.deletion_grace_period_seconds = None;
    m.generation = Some(1);
    m.managed_fields = None;
    match obj {
        Object::Pod(p) => {
            p.status = Some(PodStatus {
                phase: Some("Pending".into()),
                ..Default::default()
            })
        }
        Object::Service(s) => {
            crate::controllers::services::set_defaults(s);
            s.status = Some(ServiceStatus {
                load_balancer: Some(Default::default()),
                ..Default::default()
            });
        }
        Object::Namespace(n) => {
            n.status = Some(NamespaceStatus {
                phase: Some("Active".into()),
                ..Default::default()
            })
        }
        Object::Node(_) | Object::EndpointSlice(_) => {}
    }
}

/// Keep server-owned fields across an update; a status update changes only status, a main update only the rest.
fn prepare_update(old: &Object, new: &mut Object, status: bool) {
    let om = old.meta().clone();
    if status {
        // Status subresource: take everything but status from the stored object.
        let mut merged = old.clone();
        match (&mut merged, &*new) {
            (Object::Pod(m), Object::Pod(n)) => m.status = n.status.clone(),
            (Object::Service(m), Object::Service(n)) => m.status = n.status.clone(),
            (Object::Node(m), Object::Node(n)) => m.status = n.status.clone(),
            (Object::Namespace(m), Object::Namespace(n)) => m.status = n.status.clone(),
            _ => {}
        }
        *new = merged;
        return;
    }
    {
        let m = new.meta_mut();
        m.uid = om.uid.clone();
        m.creation_timestamp = om.creation_timestamp.clone();
        m.deletion_timestamp = om.deletion_timestamp.clone();
        m.deletion_grace_period_seconds = om.deletion_grace_period_seconds;
        m.generation = om.generation;
        m.resource_version = om.resource_version.clone();
    }
    let spec_changed = match (old, &mut *new) {
        (Object::Pod(o), Object::Pod(n)) => {
            n.status = o.status.clone();
            o.spec != n.spec
        }
        (Object::Service(o), Object::Service(n)) => {
            n.status = o.status.clone();
            crate::controllers::services::set_defaults(n);
            crate::controllers::services::carry_allocations(o, n);
            o.spec != n.spec
        }
        (Object::Namespace(o), Object::Namespace(n)) => {
            n.status = o.status.clone();
            o.spec != n.spec
        }
        (Object::Node(o), Object::Node(n)) => {
            // Agents PUT their Node without the podCIDR the control plane assigned.
            let ospec = o.spec.clone().unwrap_or_default();
            let nspec = n.spec.get_or_insert_with(Default::default);
            if nspec.pod_cidr.as_deref().unwrap_or("").is_empty() {
                nspec.pod_cidr = ospec.pod_cidr.clone();
                nspec.pod_cidrs = ospec.pod_cidrs.clone();
            }
            if n.status.is_none() {
                n.status = o.status.clone();
            }
            o.spec != n.spec
        }
        (Object::EndpointSlice(o), Object::EndpointSlice(n)) => {
            o.endpoints != n.endpoints || o.ports != n.ports
        }
        _ => false,
    };
    if spec_changed {
        new.meta_mut().generation = Some(om.generation.unwrap_or(1) + 1);
    }
}

/// Node identities may write only their own Node and Pods bound to them.
fn authorize_write(
    who: &Identity,
    old: Option<&Object>,
    new: Option<&Object>,
) -> Result<(), ApiError> {
    if who.is_admin() {
        return Ok(());
    }
    let obj = new.or(old).expect("a write has an old or a new object");
    let verb = match (old, new) {
        (None, _) => "create",
        (_, None) => "delete",
        _ => "update",
    };
    let deny = || {
        let ns = if obj.namespace().is_empty() {
            String::new()
        } else {
            format!(" in the namespace \"{}\"", obj.namespace())
        };
        ApiError::Forbidden(format!(
            "{} \"{}\" is forbidden: User \"{}\" cannot {verb} resource \"{}\" in API group \"{}\"{ns}",
            obj.kind().plural(),
            obj.name(),
            who.user,
            obj.kind().plural(),
            obj.kind().group()
        ))
    };
    let Some(node) = who.node() else {
        return Err(deny());
    };
    let bound_to_node = |o: &Object| match o {
        Object::Node(n) => n.metadata.name.as_deref() == Some(node),
        Object::Pod(p) => p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node),
        _ => false,
    };
    if old.is_none_or(bound_to_node) && new.is_none_or(bound_to_node) {
        Ok(())
    } else {
        Err(deny())
    }
}

/// Whether `who` may read `obj` (nodes read only their own Node and Pods).
pub fn authorize_read(who: &Identity, obj: &Object) -> bool {
    match who.node() {
        None => true,
        Some(node) => match obj {
            Object::Node(n) => n.metadata.name.as_deref() == Some(node),
            Object::Pod(p) => p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node),
            _ => false,
        },
    }
}

impl Inner {
    fn range<'a>(&'a self, kind: Kind, ns: Option<&str>) -> impl Iterator<Item = &'a Stored> + 'a {
        let (lo, hi) = match ns {
            Some(ns) if kind.namespaced() => (
                ObjectKey::new(kind, ns, ""),
                ObjectKey {
                    kind,
                    namespace: format!("{ns}\0"),
                    name: String::new(),
                },
            ),
            _ => (
                ObjectKey {
                    kind,
                    namespace: String::new(),
                    name: String::new(),
                },
                ObjectKey {
                    kind,
                    namespace: "\u{10ffff}".into(),
                    name: String::new(),
                },
            ),
        };
        self.objects.range(lo..hi).map(|(_, s)| s)
    }

    fn lookup<'a>(&'a self, st: &'a Staged, key: &ObjectKey) -> Option<&'a Object> {
        match st.writes.get(key) {
            Some(v) => v.as_ref(),
            None => self.objects.get(key).map(|s| &*s.obj),
        }
    }

    fn unique_name(&self, kind: Kind, ns: &str, prefix: &str, st: &Staged) -> String {
        loop {
            let name = format!("{prefix}{}", random_suffix());
            if self.lookup(st, &ObjectKey::new(kind, ns, &name)).is_none() {
                return name;
            }
        }
    }

    fn index(&mut self, key: &ObjectKey, old: Option<&Object>, new: Option<&Object>) {
        match key.kind {
            Kind::EndpointSlice => {
                let svc_of = |o: Option<&Object>| {
                    o.and_then(|o| o.meta().labels.as_ref()?.get(SERVICE_NAME_LABEL).cloned())
                };
                if let Some(s) = svc_of(old) {
                    if let Some(set) = self
                        .slices_by_service
                        .get_mut(&(key.namespace.clone(), s.clone()))
                    {
                        set.remove(&key.name);
                        if set.is_empty() {
                            self.slices_by_service.remove(&(key.namespace.clone(), s));
                        }
                    }
                }
                if let Some(s) = svc_of(new) {
                    self.slices_by_service
                        .entry((key.namespace.clone(), s))
                        .or_default()
                        .insert(key.name.clone());
                }
            }
            Kind::Pod => {
                let deadline = |o: Option<&Object>| match o {
                    Some(Object::Pod(p)) => p.metadata.deletion_timestamp.as_ref().map(|t| {
                        t.0.as_second() + p.metadata.deletion_grace_period_seconds.unwrap_or(0)
                    }),
                    _ => None,
                };
                if let Some(d) = deadline(old) {
                    self.terminating.remove(&(d, key.clone()));
                }
                if let Some(d) = deadline(new) {
                    self.terminating.insert((d, key.clone()));
                }
            }
            _ => {}
        }
    }

    fn rebuild_allocations(&mut self) {
        let objs: Vec<Arc<Object>> = self.objects.values().map(|s| s.obj.clone()).collect();
        for obj in objs {
            match &*obj {
                Object::Service(svc) => {
                    for a in crate::controllers::services::allocations(svc) {
                        let res = match a {
                            Alloc::Ip(ip) => self.ips.allocate(ip),
                            Alloc::Port(p, n) => self.ports[proto_index(p)].allocate(n),
                            Alloc::Subnet(_) => Ok(()),
                        };
                        if let Err(e) = res {
                            tracing::warn!(service = %obj.key(), error = %e, "stored allocation conflicts");
                        }
                    }
                }
                Object::Node(node) => {
                    let cidr = node
                        .spec
                        .as_ref()
                        .and_then(|s| s.pod_cidr.as_deref())
                        .and_then(|c| c.parse::<Ipv4Network>().ok());
                    if let Some(c) = cidr {
                        if let Err(e) = self.subnets.claim(obj.name(), c) {
                            tracing::warn!(node = obj.name(), error = %e, "stored pod CIDR conflicts");
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn rebuild_view(&mut self) {
        let services: BTreeSet<(String, String)> = self
            .range(Kind::Service, None)
            .map(|s| (s.obj.namespace().to_string(), s.obj.name().to_string()))
            .collect();
        let nodes: BTreeSet<String> = self
            .range(Kind::Node, None)
            .map(|s| s.obj.name().to_string())
            .collect();
        let pods: BTreeSet<(String, String)> = self
            .range(Kind::Pod, None)
            .map(|s| (s.obj.namespace().to_string(), s.obj.name().to_string()))
            .collect();
        self.recompile(&services, &nodes, &pods);
    }

    /// Recompute view entries of touched Services, Nodes and Pods; return what changed.
    fn recompile(
        &mut self,
        services: &BTreeSet<(String, String)>,
        nodes: &BTreeSet<String>,
        pods: &BTreeSet<(String, String)>,
    ) -> Vec<Bytes> {
        let mut changes = Vec::new();
        for (ns, name) in services {
            let key = ObjectKey::new(Kind::Service, ns, name);
            let entry = match self.objects.get(&key).map(|s| &*s.obj) {
                Some(Object::Service(svc)) => {
                    let slices: Vec<&EndpointSlice> = self
                        .slices_by_service
                        .get(&(ns.clone(), name.clone()))
                        .into_iter()
                        .flatten()
                        .filter_map(|sn| {
                            match self
                                .objects
                                .get(&ObjectKey::new(Kind::EndpointSlice, ns, sn))
                                .map(|s| &*s.obj)
                            {
                                Some(Object::EndpointSlice(es)) => Some(es),
                                _ => None,
                            }
                        })
                        .collect();
                    Some(compile::service_entry(svc, &slices))
                }
                _ => None,
            };
            let k = (ns.clone(), name.clone());
            match entry {
                Some(e) => {
                    if self.view_services.get(&k).map(|(old, _)| old) != Some(&e) {
                        let json = Bytes::from(wire::entry(&e));
                        changes.push(Bytes::from(wire::service_change(&json)));
                        self.view_services.insert(k, (e, json));
                    }
                }
                None => {
                    if self.view_services.remove(&k).is_some() {
                        changes.push(Bytes::from(wire::change(&Change::ServiceRemoved {
                            namespace: ns.clone(),
                            name: name.clone(),
                        })));
                    }
                }
            }
        }
        for name in nodes {
            let key = ObjectKey::new(Kind::Node, "", name);
            match self.objects.get(&key).map(|s| &*s.obj) {
                Some(Object::Node(n)) => {
                    let e = compile::node_entry(n);
                    if self.view_nodes.get(name) != Some(&e) {
                        self.view_nodes.insert(name.clone(), e.clone());
                        changes.push(Bytes::from(wire::change(&Change::Node { node: e })));
                    }
                }
                _ => {
                    if self.view_nodes.remove(name).is_some() {
                        changes.push(Bytes::from(wire::change(&Change::NodeRemoved {
                            name: name.clone(),
                        })));
                    }
                }
            }
        }
        for (ns, name) in pods {
            let key = ObjectKey::new(Kind::Pod, ns, name);
            let entry = match self.objects.get(&key).map(|s| &*s.obj) {
                Some(Object::Pod(p)) => compile::pod_entry(p),
                _ => None,
            };
            let k = (ns.clone(), name.clone());
            match entry {
                Some(e) => {
                    let json = Bytes::from(wire::entry(&e));
                    if self.view_pods.get(&k) != Some(&json) {
                        changes.push(Bytes::from(wire::pod_change(&json)));
                        self.view_pods.insert(k, json);
                    }
                }
                None => {
                    if self.view_pods.remove(&k).is_some() {
                        changes.push(Bytes::from(wire::change(&Change::PodRemoved {
                            namespace: ns.clone(),
                            name: name.clone(),
                        })));
                    }
                }
            }
        }
        if !changes.is_empty() {
            self.snapshot = None;
        }
        changes
    }

    fn undo(&mut self, st: &mut Staged) {
        for a in std::mem::take(&mut st.undo) {
            self.release(a);
        }
    }

    fn release(&mut self, a: Alloc) {
        match a {
            Alloc::Ip(ip) => self.ips.release(ip),
            Alloc::Port(p, n) => self.ports[proto_index(p)].release(n),
            Alloc::Subnet(node) => self.subnets.release(&node),
        }
    }

    /// Admission with allocation: cluster IPs and NodePorts for Services, pod CIDRs for Nodes.
    fn admit(
        &mut self,
        st: &mut Staged,
        old: Option<&Object>,
        obj: &mut Object,
    ) -> Result<(), ApiError> {
        let kind = obj.kind();
        let name = obj.name().to_string();
        match obj {
            Object::Service(svc) => {
                let old_svc = match old {
                    Some(Object::Service(o)) => Some(o),
                    _ => None,
                };
                let have: Vec<Alloc> = old_svc
                    .map(crate::controllers::services::allocations)
                    .unwrap_or_default();
                let errs = crate::controllers::services::allocate(
                    svc,
                    &have,
                    &mut TxAlloc {
                        ips: &mut self.ips,
                        ports: &mut self.ports,
                        undo: &mut st.undo,
                    },
                );
                if !errs.is_empty() {
                    return Err(
                        match errs.iter().find(|e| e.detail.contains("range is full")) {
                            Some(full) => {
                                ApiError::Internal(format!("failed to allocate: {}", full.detail))
                            }
                            None => ApiError::invalid(kind, &name, errs),
                        },
                    );
                }
                let now_have = crate::controllers::services::allocations(svc);
                for a in have {
                    if !now_have.iter().any(|b| same_alloc(&a, b)) {
                        st.release.push(a);
                    }
                }
            }
            Object::Node(node) => {
                let spec = node.spec.get_or_insert_with(Default::default);
                let requested = spec.pod_cidr.clone().filter(|c| !c.is_empty());
                let had = match old {
                    Some(Object::Node(o)) => o.spec.as_ref().and_then(|s| s.pod_cidr.clone()),
                    _ => None,
                };
                if requested.is_some() && requested == had {
                    return Ok(());
                }
                let (net, displaced) = match requested {
                    Some(c) => {
                        let net: Ipv4Network = c.parse().map_err(|_| {
                            ApiError::invalid(
                                kind,
                                &name,
                                vec![field(
                                    FieldErrorKind::Invalid,
                                    "spec.podCIDR",
                                    Some(format!("{c:?}")),
                                    "must be a valid IPv4 CIDR",
                                )],
                            )
                        })?;
                        let displaced = self.subnets.claim(&name, net).map_err(|e| {
                            ApiError::invalid(
                                kind,
                                &name,
                                vec![field(
                                    FieldErrorKind::Invalid,
                                    "spec.podCIDR",
                                    Some(format!("{c:?}")),
                                    e.to_string(),
                                )],
                            )
                        })?;
                        (net, displaced)
                    }
                    None => self.subnets.allocate(&name).map_err(|e| {
                        ApiError::invalid(
                            kind,
                            &name,
                            vec![field(
                                FieldErrorKind::Forbidden,
                                "spec.podCIDR",
                                None,
                                e.to_string(),
                            )],
                        )
                    })?,
                };
                if let Some(d) = displaced.filter(|d| *d != name) {
                    // A departed node's reservation was taken over.
                    st.extra.push(Op::Delete {
                        key: format!("{RESERVATION_PREFIX}{d}"),
                    });
                }
                st.undo.push(Alloc::Subnet(name.clone()));
                st.extra.push(Op::Put {
                    key: format!("{RESERVATION_PREFIX}{name}"),
                    value: Bytes::from(net.to_string()),
                });
                spec.pod_cidr = Some(net.to_string());
                spec.pod_cidrs = Some(vec![net.to_string()]);
            }
            _ => {}
        }
        Ok(())
    }

    /// Releases for deleted objects and the endpoint controller's reaction to staged writes.
    fn run_controllers(&mut self, st: &mut Staged) {
        // Pod garbage collection (Kubernetes' podgc): Pods bound to a Node that
        // is deleted go with it, so their endpoints do not outlive the node.
        let gone_nodes: Vec<String> = st
            .writes
            .iter()
            .filter(|(k, v)| k.kind == Kind::Node && v.is_none())
            .map(|(k, _)| k.name.clone())
            .collect();
        if !gone_nodes.is_empty() {
            let orphans: Vec<ObjectKey> = self
                .range(Kind::Pod, None)
                .filter(|s| match &*s.obj {
                    Object::Pod(p) => p
                        .spec
                        .as_ref()
                        .and_then(|x| x.node_name.as_ref())
                        .is_some_and(|n| gone_nodes.contains(n)),
                    _ => false,
                })
                .map(|s| s.obj.key())
                .collect();
            for k in orphans {
                st.writes.entry(k).or_insert(None);
            }
        }
        let mut services: BTreeSet<(String, String)> = BTreeSet::new();
        let writes: Vec<(ObjectKey, Option<Object>)> = st
            .writes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, new) in &writes {
            let old = self.objects.get(key).map(|s| s.obj.clone());
            match key.kind {
                Kind::Service => {
                    if new.is_none() {
                        if let Some(Object::Service(o)) = old.as_deref() {
                            st.release
                                .extend(crate::controllers::services::allocations(o));
                        }
                    }
                    services.insert((key.namespace.clone(), key.name.clone()));
                }
                Kind::Node if new.is_none() => st.release.push(Alloc::Subnet(key.name.clone())),
                Kind::Pod => {
                    let labels: Vec<_> = [old.as_deref(), new.as_ref()]
                        .into_iter()
                        .flatten()
                        .filter_map(|o| o.meta().labels.clone())
                        .collect();
                    for svc in self.range(Kind::Service, Some(&key.namespace)) {
                        if let Object::Service(s) = &*svc.obj {
                            if !endpoints::selects_pods(s) {
                                continue;
                            }
                            let sel = LabelSelector::from_map(
                                s.spec
                                    .as_ref()
                                    .and_then(|x| x.selector.as_ref())
                                    .expect("selects_pods"),
                            );
                            if labels.iter().any(|l| sel.matches(Some(l))) {
                                services
                                    .insert((key.namespace.clone(), svc.obj.name().to_string()));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        for (ns, name) in services {
            let skey = ObjectKey::new(Kind::Service, &ns, &name);
            let mut existing_names: BTreeSet<String> = self
                .slices_by_service
                .get(&(ns.clone(), name.clone()))
                .cloned()
                .unwrap_or_default();
            for (k, v) in &st.writes {
                if k.kind == Kind::EndpointSlice && k.namespace == ns {
                    if let Some(o) = v {
                        if o.meta()
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(SERVICE_NAME_LABEL))
                            == Some(&name)
                        {
                            existing_names.insert(k.name.clone());
                        }
                    }
                }
            }
            let changes = {
                let existing: Vec<&EndpointSlice> = existing_names
                    .iter()
                    .filter_map(|n| {
                        match self.lookup(st, &ObjectKey::new(Kind::EndpointSlice, &ns, n)) {
                            Some(Object::EndpointSlice(es))
                                if endpoints::is_managed_slice_of(es, &name) =>
                            {
                                Some(es)
                            }
                            _ => None,
                        }
                    })
                    .collect();
                match self.lookup(st, &skey) {
                    Some(Object::Service(svc)) => {
                        if !endpoints::selects_pods(svc) && existing.is_empty() {
                            continue;
                        }
                        let pod_keys: Vec<ObjectKey> = self
                            .range(Kind::Pod, Some(&ns))
                            .map(|s| s.obj.key())
                            .chain(
                                st.writes
                                    .keys()
                                    .filter(|k| k.kind == Kind::Pod && k.namespace == ns)
                                    .cloned(),
                            )
                            .collect::<BTreeSet<_>>()
                            .into_iter()
                            .collect();
                        let pods: Vec<&Pod> = pod_keys
                            .iter()
                            .filter_map(|k| match self.lookup(st, k) {
                                Some(Object::Pod(p)) => Some(p),
                                _ => None,
                            })
                            .collect();
                        endpoints::reconcile(svc, &pods, &existing)
                    }
                    _ => endpoints::SliceChanges {
                        write: Vec::new(),
                        delete: existing
                            .iter()
                            .filter_map(|s| s.metadata.name.clone())
                            .collect(),
                    },
                }
            };
            for name in changes.delete {
                st.writes
                    .insert(ObjectKey::new(Kind::EndpointSlice, &ns, &name), None);
            }
            for mut slice in changes.write {
                let mut obj_name = slice.metadata.name.clone().unwrap_or_default();
                if obj_name.is_empty() {
                    let prefix = slice.metadata.generate_name.clone().unwrap_or_default();
                    obj_name = self.unique_name(Kind::EndpointSlice, &ns, &prefix, st);
                    slice.metadata.name = Some(obj_name.clone());
                    let mut obj = Object::EndpointSlice(slice);
                    prepare_create(&mut obj);
                    st.writes.insert(
                        ObjectKey::new(Kind::EndpointSlice, &ns, &obj_name),
                        Some(obj),
                    );
                } else {
                    let key = ObjectKey::new(Kind::EndpointSlice, &ns, &obj_name);
                    let mut obj = Object::EndpointSlice(slice);
                    if let Some(old) = self.objects.get(&key) {
                        prepare_update(&old.obj, &mut obj, false);
                    }
                    st.writes.insert(key, Some(obj));
                }
            }
        }
    }
}

/// The allocators as one transaction sees them: every allocation is recorded for undo.
struct TxAlloc<'a> {
    ips: &'a mut IpAllocator,
    ports: &'a mut [PortAllocator; 3],
    undo: &'a mut Vec<Alloc>,
}

impl crate::controllers::services::Allocator for TxAlloc<'_> {
    fn take(&mut self, a: &Alloc) -> Result<(), AllocError> {
        match a {
            Alloc::Ip(ip) => self.ips.allocate(*ip)?,
            Alloc::Port(p, n) => self.ports[proto_index(*p)].allocate(*n)?,
            Alloc::Subnet(_) => return Ok(()),
        }
        self.undo.push(a.clone());
        Ok(())
    }

    fn next(&mut self, what: Option<Protocol>) -> Result<Alloc, AllocError> {
        let a = match what {
            None => Alloc::Ip(self.ips.allocate_next()?),
            Some(p) => Alloc::Port(p, self.ports[proto_index(p)].allocate_next()?),
        };
        self.undo.push(a.clone());
        Ok(a)
    }
}

fn same_alloc(a: &Alloc, b: &Alloc) -> bool {
    match (a, b) {
        (Alloc::Ip(x), Alloc::Ip(y)) => x == y,
        (Alloc::Port(p, n), Alloc::Port(q, m)) => p == q && n == m,
        (Alloc::Subnet(x), Alloc::Subnet(y)) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::ADMIN_GROUP;
    use crate::store::MemoryStore;
    use serde_json::{json, Value};
    use weft_model::{PodEntry, StreamFrame};

    fn admin() -> Identity {
        Identity {
            user: "admin".into(),
            groups: vec![ADMIN_GROUP.into()],
        }
    }

    fn settings() -> Settings {
        Settings {
            service_cidr: "198.19.0.0/16".parse().unwrap(),
            cluster_cidr: "198.18.128.0/17".parse().unwrap(),
            ..Default::default()
        }
    }

    fn control() -> Arc<Control> {
        let c = Control::open(settings(), Box::new(MemoryStore::new())).unwrap();
        c.bootstrap().unwrap();
        c
    }

    /// The view changes committed at `rev`, decoded as an agent reads them.
    fn changes(c: &Control, rev: u64) -> Vec<Change> {
        c.lock()
            .pending
            .iter()
            .filter(|p| p.rev == rev)
            .flat_map(|p| p.changes.iter())
            .map(|b| serde_json::from_slice(b).unwrap())
            .collect()
    }

    fn pod_body(name: &str, node: &str, host_network: bool) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
            "spec": {"nodeName": node, "hostNetwork": host_network,
                "containers": [{"name": "c", "image": "busybox"}]}
        })
    }

    /// Write the Pod's status as its node's agent does; returns the revision.
    fn set_status(c: &Control, name: &str, status: Value) -> u64 {
        let mut body = pod_body(name, "n1", false);
        body["status"] = status;
        let (_, rev) = c
            .update(&admin(), Kind::Pod, Some("default"), name, body, true)
            .unwrap();
        rev
    }

    fn entry(name: &str, ips: &[&str], node: &str) -> PodEntry {
        PodEntry {
            namespace: "default".into(),
            name: name.into(),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            node: Some(node.into()),
        }
    }

    fn removed(name: &str) -> Change {
        Change::PodRemoved {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn snapshot_pods(c: &Control) -> Vec<PodEntry> {
        let (_, bytes) = c.snapshot();
        match StreamFrame::decode(&bytes[..bytes.len() - 1]).unwrap() {
            StreamFrame::Reset { pods, .. } => pods,
            f => panic!("not a reset: {f:?}"),
        }
    }

    #[test]
    fn pod_writes_produce_pod_deltas() {
        let c = control();
        let running = |ip: &str| {
            json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "False"}]})
        };

        // Created without an address: nothing to carry yet.
        let (_, rev) = c
            .create(
                &admin(),
                Kind::Pod,
                Some("default"),
                pod_body("web-0", "n1", false),
            )
            .unwrap();
        assert_eq!(changes(&c, rev), []);
        assert_eq!(snapshot_pods(&c), []);

        // The agent reports the pod IP.
        let rev = set_status(&c, "web-0", running("198.18.128.5"));
        let web0 = entry("web-0", &["198.18.128.5"], "n1");
        assert_eq!(changes(&c, rev), [Change::Pod { pod: web0.clone() }]);
        assert_eq!(snapshot_pods(&c), std::slice::from_ref(&web0));

        // A status change that leaves the entry as it was emits nothing.
        let mut ready = running("198.18.128.5");
        ready["conditions"][0]["status"] = json!("True");
        let rev = set_status(&c, "web-0", ready);
        assert_eq!(changes(&c, rev), []);

        // A new address replaces the entry.
        let rev = set_status(&c, "web-0", running("198.18.128.6"));
        let web0 = entry("web-0", &["198.18.128.6"], "n1");
        assert_eq!(changes(&c, rev), [Change::Pod { pod: web0.clone() }]);

        // A terminal phase releases the address; deleting the pod then emits nothing.
        let (_, rev) = c
            .create(
                &admin(),
                Kind::Pod,
                Some("default"),
                pod_body("job-0", "n1", false),
            )
            .unwrap();
        assert_eq!(changes(&c, rev), []);
        let rev = set_status(&c, "job-0", running("198.18.128.7"));
        assert_eq!(
            changes(&c, rev),
            [Change::Pod {
                pod: entry("job-0", &["198.18.128.7"], "n1")
            }]
        );
        let mut done = running("198.18.128.7");
        done["phase"] = json!("Succeeded");
        let rev = set_status(&c, "job-0", done);
        assert_eq!(changes(&c, rev), [removed("job-0")]);
        let opts = DeleteOptions {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        let (_, rev) = c
            .delete(&admin(), Kind::Pod, "default", "job-0", &opts)
            .unwrap();
        assert_eq!(changes(&c, rev), []);

        // A host-network pod shares its node's address: never carried.
        let (_, rev) = c
            .create(
                &admin(),
                Kind::Pod,
                Some("default"),
                pod_body("agent", "n1", true),
            )
            .unwrap();
        assert_eq!(changes(&c, rev), []);
        let mut body = pod_body("agent", "n1", true);
        body["status"] = running("198.18.0.11");
        let (_, rev) = c
            .update(&admin(), Kind::Pod, Some("default"), "agent", body, true)
            .unwrap();
        assert_eq!(changes(&c, rev), []);
        assert_eq!(snapshot_pods(&c), std::slice::from_ref(&web0));

        // Graceful deletion: the terminating pod still owns its address...
        let (_, rev) = c
            .delete(&admin(), Kind::Pod, "default", "web-0", &Default::default())
            .unwrap();
        assert_eq!(changes(&c, rev), []);
        assert_eq!(snapshot_pods(&c), [web0]);
        // ...until it is gone.
        let (_, rev) = c
            .delete(&admin(), Kind::Pod, "default", "web-0", &opts)
            .unwrap();
        assert_eq!(changes(&c, rev), [removed("web-0")]);
        assert_eq!(snapshot_pods(&c), []);
    }

    #[test]
    fn deleting_a_node_removes_its_pods_from_the_view() {
        let c = control();
        let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2"},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.12"}]}});
        c.create(&admin(), Kind::Node, None, node).unwrap();
        c.create(
            &admin(),
            Kind::Pod,
            Some("default"),
            pod_body("db-0", "n2", false),
        )
        .unwrap();
        let mut body = pod_body("db-0", "n2", false);
        body["status"] = json!({"phase": "Running", "podIP": "198.18.129.2"});
        c.update(&admin(), Kind::Pod, Some("default"), "db-0", body, true)
            .unwrap();
        assert_eq!(snapshot_pods(&c), [entry("db-0", &["198.18.129.2"], "n2")]);
        let (_, rev) = c
            .delete(&admin(), Kind::Node, "", "n2", &Default::default())
            .unwrap();
        let got = changes(&c, rev);
        assert!(got.contains(&removed("db-0")), "{got:?}");
        assert!(
            got.contains(&Change::NodeRemoved { name: "n2".into() }),
            "{got:?}"
        );
    }

    #[test]
    fn stored_pods_are_in_the_view_after_a_restart() {
        let mut pod = pod_body("web-0", "n1", false);
        pod["status"] = json!({"phase": "Running", "podIP": "198.18.128.5"});
        let mut ended = pod_body("job-0", "n1", false);
        ended["status"] = json!({"phase": "Failed", "podIP": "198.18.128.6"});
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}});
        let entries = [
            ("namespaces/default", ns),
            ("pods/default/web-0", pod),
            ("pods/default/job-0", ended),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), Bytes::from(v.to_string())))
        .collect();
        let store = MemoryStore::with_snapshot(crate::store::Snapshot { rev: 3, entries });
        let c = Control::open(settings(), Box::new(store)).unwrap();
        assert_eq!(snapshot_pods(&c), [entry("web-0", &["198.18.128.5"], "n1")]);
    }
}
