//! `netctl apply -f FILE|-`: create what is missing, replace what differs,
//! leave alone what already matches.

use crate::source::{load_objects, read_sources};
use crate::{object_path, object_ref, report, Context};
use anyhow::Result;
use clap::Args;
use serde_json::Value;
use std::io::Write;
use weft_model::Object;

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Manifest file, directory, or `-` for stdin (repeatable).
    #[arg(short = 'f', long = "filename", value_name = "FILE", required = true)]
    pub files: Vec<String>,
}

/// What applying one object did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
        }
    }
}

pub async fn run(
    ctx: &Context,
    args: &ApplyArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<bool> {
    let sources = read_sources(&args.files)?;
    let objects = load_objects(&sources, ctx.namespace.as_deref())?;
    apply_objects(ctx, &objects, out, err).await
}

/// Apply each object in turn; an object the server refuses is reported on
/// `err` and the rest still applied. `Ok(false)` if any was refused.
pub async fn apply_objects(
    ctx: &Context,
    objects: &[Object],
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<bool> {
    if objects.is_empty() {
        anyhow::bail!("no objects passed to apply");
    }
    let mut ok = true;
    for obj in objects {
        match apply_one(ctx, obj).await? {
            Ok(outcome) => writeln!(
                out,
                "{} {}",
                object_ref(obj.kind(), obj.name()),
                outcome.as_str()
            )?,
            Err(e) => {
                report(err, &e)?;
                ok = false;
            }
        }
    }
    Ok(ok)
}

/// Apply one object. The outer `Result` is for transport failures (which
/// stop the command), the inner one for the server's refusals.
pub async fn apply_one(
    ctx: &Context,
    obj: &Object,
) -> Result<std::result::Result<Outcome, crate::ApiError>> {
    let kind = obj.kind();
    let path = object_path(kind, obj.namespace(), obj.name());
    let mut desired = obj.to_value();
    strip_server_fields(&mut desired);

    let current = ctx.client.get(&path).await?;
    if current.is_not_found() {
        let collection = crate::collection_path(kind, kind.namespaced().then(|| obj.namespace()));
        let resp = ctx.client.post(&collection, &desired).await?;
        return Ok(if resp.is_success() {
            Ok(Outcome::Created)
        } else {
            Err(resp.api_error())
        });
    }
    if !current.is_success() {
        return Ok(Err(current.api_error()));
    }
    let mut live = current.json()?;
    if let Some(map) = live.as_object_mut() {
        map.entry("apiVersion")
            .or_insert_with(|| kind.api_version().into());
        map.entry("kind").or_insert_with(|| kind.name().into());
    }
    if is_subset(&desired, &live) {
        return Ok(Ok(Outcome::Unchanged));
    }
    if kind == weft_model::Kind::Service {
        keep_allocated_service_fields(&mut desired, &live);
    }
    if let Some(rv) = live.pointer("/metadata/resourceVersion").cloned() {
        if let Some(meta) = desired.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), rv);
        }
    }
    let resp = ctx.client.put(&path, &desired).await?;
    Ok(if resp.is_success() {
        Ok(Outcome::Configured)
    } else {
        Err(resp.api_error())
    })
}

/// Metadata fields the server owns: a manifest's copies are ignored when
/// comparing and not sent.
pub const SERVER_METADATA: [&str; 8] = [
    "resourceVersion",
    "uid",
    "creationTimestamp",
    "generation",
    "managedFields",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
];

/// Drop server-owned metadata from a user's object.
pub fn strip_server_fields(v: &mut Value) {
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        for f in SERVER_METADATA {
            meta.remove(f);
        }
    }
}

/// Whether everything the user wrote (`want`) is already in the server's
/// object (`have`). Maps may have extra keys on the server (defaults, status,
/// server metadata); lists must match element by element since a replace
/// would drop extra elements; empty maps/lists and nulls match absent fields.
pub fn is_subset(want: &Value, have: &Value) -> bool {
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => w.iter().all(|(k, wv)| match h.get(k) {
            Some(hv) => is_subset(wv, hv),
            None => is_empty(wv),
        }),
        (Value::Object(w), Value::Null) => w.values().all(is_empty),
        (Value::Array(w), Value::Array(h)) => {
            w.len() == h.len() && w.iter().zip(h).all(|(a, b)| is_subset(a, b))
        }
        (Value::Array(w), Value::Null) => w.is_empty(),
        (Value::Null, _) => true,
        (Value::Number(a), Value::Number(b)) => a == b || a.as_f64() == b.as_f64(),
        (a, b) => a == b,
    }
}

/// Carry the values the server allocated for a Service (cluster IPs, IP
/// families, node ports) into a replacement that leaves them out, as the
/// Kubernetes API server itself does on update, so that `apply` of a
/// manifest without them does not ask for them to be released.
pub fn keep_allocated_service_fields(desired: &mut Value, live: &Value) {
    let (Some(want), Some(have)) = (
        desired.get_mut("spec").and_then(Value::as_object_mut),
        live.get("spec").and_then(Value::as_object),
    ) else {
        return;
    };
    let svc_type = want
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP")
        .to_string();
    if svc_type == "ExternalName" {
        return;
    }
    let missing = |m: &serde_json::Map<String, Value>, k: &str| {
        m.get(k)
            .is_none_or(|v| v.is_null() || v == "" || v == &Value::Array(vec![]))
    };
    if missing(want, "clusterIP") && missing(want, "clusterIPs") {
        for k in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
            if missing(want, k) {
                if let Some(v) = have.get(k) {
                    want.insert(k.to_string(), v.clone());
                }
            }
        }
    }
    if !matches!(svc_type.as_str(), "NodePort" | "LoadBalancer") {
        return;
    }
    if missing(want, "healthCheckNodePort") {
        if let Some(v) = have.get("healthCheckNodePort") {
            want.insert("healthCheckNodePort".into(), v.clone());
        }
    }
    let have_ports = have.get("ports").and_then(Value::as_array);
    let Some(want_ports) = want.get_mut("ports").and_then(Value::as_array_mut) else {
        return;
    };
    let proto = |p: &Value| {
        p.get("protocol")
            .and_then(Value::as_str)
            .unwrap_or("TCP")
            .to_string()
    };
    for wp in want_ports.iter_mut() {
        if wp.get("nodePort").is_some_and(|v| !v.is_null() && v != 0) {
            continue;
        }
        let same = have_ports
            .into_iter()
            .flatten()
            .find(|hp| hp.get("port") == wp.get("port") && proto(hp) == proto(wp));
        if let (Some(node_port), Some(map)) =
            (same.and_then(|hp| hp.get("nodePort")), wp.as_object_mut())
        {
            map.insert("nodePort".into(), node_port.clone());
        }
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.values().all(is_empty),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn subset_ignores_server_additions() {
        let want = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}});
        let have = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"},
                "resourceVersion": "7", "uid": "u-1", "creationTimestamp": "2025-01-01T00:00:00Z"},
            "spec": {"selector": {"app": "web"}, "clusterIP": "10.96.0.9", "type": "ClusterIP",
                "ports": [{"port": 80, "protocol": "TCP", "targetPort": 80}]},
            "status": {"loadBalancer": {}}});
        assert!(is_subset(&want, &have));
    }

    #[test]
    fn subset_detects_changes() {
        let have = json!({"metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {"ports": [{"port": 80, "protocol": "TCP"}, {"port": 443, "protocol": "TCP"}]}});
        // A changed value.
        assert!(!is_subset(
            &json!({"metadata": {"labels": {"app": "api"}}}),
            &have
        ));
        // A new key.
        assert!(!is_subset(
            &json!({"metadata": {"labels": {"tier": "fe"}}}),
            &have
        ));
        // A removed list element (a replace would drop it).
        assert!(!is_subset(
            &json!({"spec": {"ports": [{"port": 80}]}}),
            &have
        ));
        // A type change.
        assert!(!is_subset(
            &json!({"spec": {"ports": [{"port": "80"}, {"port": 443}]}}),
            &have
        ));
        assert!(is_subset(
            &json!({"spec": {"ports": [{"port": 80}, {"port": 443}]}}),
            &have
        ));
    }

    #[test]
    fn subset_treats_empty_as_absent() {
        let have = json!({"metadata": {"name": "a"}, "spec": null});
        assert!(is_subset(
            &json!({"metadata": {"name": "a", "labels": {}, "finalizers": []}}),
            &have
        ));
        assert!(is_subset(&json!({"spec": {"selector": {}}}), &have));
        assert!(!is_subset(
            &json!({"spec": {"selector": {"a": "b"}}}),
            &have
        ));
        assert!(is_subset(&json!({"x": null}), &json!({"x": 3})));
        assert!(is_subset(&json!({"n": 1.0}), &json!({"n": 1})));
    }

    #[test]
    fn keeps_allocated_service_fields() {
        let live = json!({"spec": {"type": "NodePort", "clusterIP": "10.96.0.7", "clusterIPs": ["10.96.0.7"],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30080},
                      {"port": 53, "protocol": "UDP", "nodePort": 30053}]}});
        let mut want = json!({"spec": {"type": "NodePort",
            "ports": [{"port": 80}, {"port": 53, "protocol": "TCP"}, {"port": 9, "nodePort": 30009}]}});
        keep_allocated_service_fields(&mut want, &live);
        assert_eq!(
            want,
            json!({"spec": {"type": "NodePort", "clusterIP": "10.96.0.7", "clusterIPs": ["10.96.0.7"],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "ports": [{"port": 80, "nodePort": 30080}, {"port": 53, "protocol": "TCP"},
                      {"port": 9, "nodePort": 30009}]}})
        );

        // An explicit cluster IP and a switch to ClusterIP are left alone.
        let mut want = json!({"spec": {"clusterIP": "None", "ports": [{"port": 80}]}});
        keep_allocated_service_fields(&mut want, &live);
        assert_eq!(
            want,
            json!({"spec": {"clusterIP": "None", "ports": [{"port": 80}]}})
        );
        let mut want = json!({"spec": {"type": "ExternalName", "externalName": "x.example"}});
        keep_allocated_service_fields(&mut want, &live);
        assert_eq!(
            want,
            json!({"spec": {"type": "ExternalName", "externalName": "x.example"}})
        );
    }

    #[test]
    fn strips_server_owned_metadata() {
        let mut v = json!({"metadata": {"name": "a", "resourceVersion": "3", "uid": "x",
            "creationTimestamp": "2025-01-01T00:00:00Z", "labels": {"k": "v"}}});
        strip_server_fields(&mut v);
        assert_eq!(v, json!({"metadata": {"name": "a", "labels": {"k": "v"}}}));
    }
}
