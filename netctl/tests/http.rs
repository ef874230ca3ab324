//! netctl's commands against a tiny in-test API server on 127.0.0.1:0.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use netctl::apply::{self, ApplyArgs};
use netctl::delete::{self, DeleteArgs};
use netctl::get::{self, GetArgs, Output};
use netctl::{Client, Context, ServerUrl};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

const TOKEN: &str = "t0k";
const PLURALS: [&str; 5] = ["namespaces", "nodes", "pods", "services", "endpointslices"];

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    rv: u64,
    /// (method, path, body) of every request.
    log: Vec<(String, String, Value)>,
}

fn status(code: StatusCode, reason: &str, message: &str) -> (StatusCode, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// `services "web" not found` from `/api/v1/namespaces/default/services/web`.
fn not_found(path: &str) -> (StatusCode, Value) {
    let mut segs = path.rsplit('/');
    let name = segs.next().unwrap_or_default();
    let plural = segs.next().unwrap_or_default();
    let resource = if path.starts_with("/apis/discovery.k8s.io/") {
        format!("{plural}.discovery.k8s.io")
    } else {
        plural.to_string()
    };
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{resource} \"{name}\" not found"),
    )
}

fn handle(
    state: &Mutex<State>,
    method: &Method,
    uri: &str,
    auth: Option<&str>,
    body: &[u8],
) -> (StatusCode, Value) {
    let mut st = state.lock().unwrap();
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    st.log
        .push((method.to_string(), uri.to_string(), body.clone()));
    if auth != Some(&format!("Bearer {TOKEN}")) {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    match *method {
        Method::GET => {
            if let Some(obj) = st.objects.get(path) {
                return (StatusCode::OK, obj.clone());
            }
            let last = path.rsplit('/').next().unwrap_or_default();
            if !PLURALS.contains(&last) {
                return not_found(path);
            }
            let all_namespaces = !path.contains("/namespaces/");
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter(|(k, _)| {
                    let parent = k.rsplit_once('/').unwrap().0;
                    parent == path || (all_namespaces && parent.ends_with(&format!("/{last}")))
                })
                .map(|(_, v)| {
                    let mut v = v.clone();
                    // Real servers omit apiVersion/kind on list items.
                    v.as_object_mut().unwrap().remove("apiVersion");
                    v.as_object_mut().unwrap().remove("kind");
                    v
                })
                .filter(|v| match query.strip_prefix("labelSelector=") {
                    Some(sel) => {
                        let sel = sel.replace("%3D", "=");
                        let (k, val) = sel.split_once('=').unwrap();
                        v["metadata"]["labels"][k] == val
                    }
                    None => true,
                })
                .collect();
            st.rv += 1;
            let rv = st.rv.to_string();
            (
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "ServiceList", "metadata": {"resourceVersion": rv}, "items": items}),
            )
        }
        Method::POST => {
            let mut obj = body;
            if let Some(port) = obj.pointer("/spec/ports/0/port").and_then(Value::as_u64) {
                if port > 65535 {
                    let name = obj["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    return status(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        &format!("Service \"{name}\" is invalid: spec.ports[0].port: Invalid value: {port}: must be between 1 and 65535, inclusive"),
                    );
                }
            }
            let name = obj["metadata"]["name"].as_str().unwrap().to_string();
            let key = format!("{path}/{name}");
            if st.objects.contains_key(&key) {
                return status(StatusCode::CONFLICT, "AlreadyExists", "already exists");
            }
            st.rv += 1;
            let rv = st.rv.to_string();
            let meta = obj["metadata"].as_object_mut().unwrap();
            meta.insert("resourceVersion".into(), rv.into());
            meta.insert("uid".into(), format!("uid-{name}").into());
            meta.insert("creationTimestamp".into(), "2025-06-01T12:00:00Z".into());
            if obj["kind"] == "Service" {
                obj["spec"]["clusterIP"] = "10.96.0.10".into();
                obj["spec"]["clusterIPs"] = json!(["10.96.0.10"]);
                obj["spec"]["type"] = "ClusterIP".into();
                if let Some(ports) = obj["spec"]["ports"].as_array_mut() {
                    for p in ports {
                        p["protocol"] = "TCP".into();
                    }
                }
            }
            st.objects.insert(key, obj.clone());
            (StatusCode::CREATED, obj)
        }
        Method::PUT => {
            let Some(old) = st.objects.get(path).cloned() else {
                return not_found(path);
            };
            let mut obj = body;
            if obj["metadata"]["resourceVersion"] != old["metadata"]["resourceVersion"] {
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    "the object has been modified",
                );
            }
            st.rv += 1;
            let rv = st.rv.to_string();
            let meta = obj["metadata"].as_object_mut().unwrap();
            meta.insert("resourceVersion".into(), rv.into());
            meta.insert("uid".into(), old["metadata"]["uid"].clone());
            meta.insert(
                "creationTimestamp".into(),
                old["metadata"]["creationTimestamp"].clone(),
            );
            st.objects.insert(path.to_string(), obj.clone());
            (StatusCode::OK, obj)
        }
        Method::DELETE => match st.objects.remove(path) {
            Some(obj) => (StatusCode::OK, obj),
            None => not_found(path),
        },
        _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "no"),
    }
}

async fn serve(state: Arc<Mutex<State>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let state = state.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let state = state.clone();
                    async move {
                        assert!(req.headers().contains_key(hyper::header::HOST));
                        let method = req.method().clone();
                        let uri = req.uri().to_string();
                        let auth = req
                            .headers()
                            .get(hyper::header::AUTHORIZATION)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let (code, value) = handle(&state, &method, &uri, auth.as_deref(), &body);
                        let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
                        *resp.status_mut() = code;
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

fn context(url: &str, token: Option<&str>, ns: Option<&str>) -> Context {
    Context {
        client: Client::new(ServerUrl::parse(url).unwrap(), token.map(str::to_string)).unwrap(),
        namespace: ns.map(str::to_string),
        all_namespaces: false,
    }
}

struct Captured {
    ok: bool,
    out: String,
    err: String,
}

async fn apply_text(ctx: &Context, name: &str, text: &str) -> Captured {
    let dir = std::env::temp_dir().join(format!("netctl-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    let args = ApplyArgs {
        files: vec![file.display().to_string()],
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let ok = apply::run(ctx, &args, &mut out, &mut err).await.unwrap();
    Captured {
        ok,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    }
}

async fn get(ctx: &Context, kind: &str, names: &[&str], output: Option<Output>) -> Captured {
    let args = GetArgs {
        kind: kind.into(),
        names: names.iter().map(|s| s.to_string()).collect(),
        selector: None,
        output,
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let ok = get::run(ctx, &args, &mut out, &mut err).await.unwrap();
    Captured {
        ok,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    }
}

async fn delete(ctx: &Context, words: &[&str]) -> Captured {
    let args = DeleteArgs {
        args: words.iter().map(|s| s.to_string()).collect(),
        files: vec![],
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let ok = delete::run(ctx, &args, &mut out, &mut err).await.unwrap();
    Captured {
        ok,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    }
}

const WEB: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: web
  labels: {app: web}
spec:
  selector: {app: web}
  ports:
  - port: 80
    targetPort: 8080
";

#[tokio::test]
async fn apply_get_delete_round_trip() {
    let state = Arc::new(Mutex::new(State::default()));
    let url = serve(state.clone()).await;
    let ctx = context(&url, Some(TOKEN), None);

    // Create.
    let r = apply_text(&ctx, "web.yaml", WEB).await;
    assert_eq!(
        (r.ok, r.out.as_str(), r.err.as_str()),
        (true, "service/web created\n", "")
    );
    {
        let st = state.lock().unwrap();
        let (m, p, body) = st.log.last().unwrap();
        assert_eq!(
            (m.as_str(), p.as_str()),
            ("POST", "/api/v1/namespaces/default/services")
        );
        assert_eq!(body["metadata"]["namespace"], "default");
    }

    // Same manifest again: nothing to do, no PUT.
    let before = state.lock().unwrap().log.len();
    let r = apply_text(&ctx, "web.yaml", WEB).await;
    assert_eq!((r.ok, r.out.as_str()), (true, "service/web unchanged\n"));
    {
        let st = state.lock().unwrap();
        assert_eq!(st.log.len(), before + 1, "only a GET");
        assert_eq!(st.log.last().unwrap().0, "GET");
    }

    // A change: PUT with the server's resourceVersion.
    let changed = WEB.replace("labels: {app: web}", "labels: {app: web, tier: fe}");
    let r = apply_text(&ctx, "web.yaml", &changed).await;
    assert_eq!(
        (r.ok, r.out.as_str(), r.err.as_str()),
        (true, "service/web configured\n", "")
    );
    {
        let st = state.lock().unwrap();
        let (m, p, body) = st.log.last().unwrap();
        assert_eq!(
            (m.as_str(), p.as_str()),
            ("PUT", "/api/v1/namespaces/default/services/web")
        );
        assert_eq!(body["metadata"]["resourceVersion"], "1");
        assert_eq!(body["spec"]["clusterIP"], "10.96.0.10", "allocated IP kept");
        let stored = &st.objects["/api/v1/namespaces/default/services/web"];
        assert_eq!(stored["metadata"]["labels"]["tier"], "fe");
        assert_eq!(stored["metadata"]["resourceVersion"], "2");
    }
    let r = apply_text(&ctx, "web.yaml", &changed).await;
    assert_eq!(r.out, "service/web unchanged\n");

    // A refused object is reported and the rest still applied; exit non-zero.
    let two = "\
apiVersion: v1
kind: Service
metadata: {name: bad}
spec:
  ports: [{port: 70000}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  ports: [{port: 443, nodePort: 30443}]
";
    let r = apply_text(&ctx, "two.yaml", two).await;
    assert!(!r.ok);
    assert_eq!(r.out, "service/api created\n");
    assert_eq!(
        r.err,
        "Error from server (Invalid): Service \"bad\" is invalid: spec.ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive\n"
    );

    // get: table, names, selectors and all namespaces.
    let r = get(&ctx, "svc", &[], None).await;
    assert!(r.ok);
    assert!(r.out.starts_with("NAME   TYPE        CLUSTER-IP   EXTERNAL-IP   PORT(S)   AGE\nweb    ClusterIP   10.96.0.10   <none>        80/TCP    "), "{}", r.out);
    let r = get(
        &context(&url, Some(TOKEN), Some("shop")),
        "services",
        &["api", "nope"],
        Some(Output::Name),
    )
    .await;
    assert!(!r.ok);
    assert_eq!(r.out, "service/api\n");
    assert_eq!(
        r.err,
        "Error from server (NotFound): services \"nope\" not found\n"
    );
    let mut all = context(&url, Some(TOKEN), None);
    all.all_namespaces = true;
    let r = get(&all, "svc", &[], Some(Output::Name)).await;
    assert_eq!(r.out, "service/web\nservice/api\n");
    let r = get(&ctx, "svc", &["web"], Some(Output::Json)).await;
    let v: Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(v["kind"], "Service");
    assert_eq!(v["metadata"]["uid"], "uid-web");
    let r = get(&context(&url, Some(TOKEN), Some("empty")), "po", &[], None).await;
    assert_eq!(
        (r.ok, r.out.as_str(), r.err.as_str()),
        (true, "", "No resources found in empty namespace.\n")
    );
    let args = GetArgs {
        kind: "svc".into(),
        names: vec![],
        selector: Some("tier=fe".into()),
        output: Some(Output::Name),
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    get::run(&all, &args, &mut out, &mut err).await.unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), "service/web\n");
    assert!(state
        .lock()
        .unwrap()
        .log
        .last()
        .unwrap()
        .1
        .ends_with("/api/v1/services?labelSelector=tier%3Dfe"));

    // Delete, then delete again: NotFound on stderr and a failure.
    let r = delete(&ctx, &["svc", "web"]).await;
    assert_eq!((r.ok, r.out.as_str()), (true, "service \"web\" deleted\n"));
    let r = delete(&ctx, &["svc", "web"]).await;
    assert!(!r.ok);
    assert_eq!(r.out, "");
    assert_eq!(
        r.err,
        "Error from server (NotFound): services \"web\" not found\n"
    );
}

#[tokio::test]
async fn bad_token_is_reported() {
    let state = Arc::new(Mutex::new(State::default()));
    let url = serve(state.clone()).await;
    let r = get(&context(&url, Some("wrong"), None), "svc", &[], None).await;
    assert!(!r.ok);
    assert_eq!(r.err, "Error from server (Unauthorized): Unauthorized\n");
    let r = apply_text(&context(&url, None, None), "web2.yaml", WEB).await;
    assert!(!r.ok);
    assert_eq!(r.err, "Error from server (Unauthorized): Unauthorized\n");
}

#[tokio::test]
async fn unreachable_server_is_named() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let ctx = context(&format!("http://{addr}"), None, None);
    let err = ctx.client.get("/api/v1/nodes").await.unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        format!("cannot reach the control plane at http://{addr}: connection refused")
    );
}

#[tokio::test]
async fn silent_server_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Accept and then say nothing.
    let hold = tokio::spawn(async move {
        let mut conns = Vec::new();
        loop {
            let (s, _) = listener.accept().await.unwrap();
            conns.push(s);
        }
    });
    let client = Client::new(ServerUrl::parse(&format!("http://{addr}")).unwrap(), None)
        .unwrap()
        .with_timeout(Duration::from_millis(200));
    let err = client.get("/api/v1/nodes").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("the control plane at http://{addr} did not answer GET /api/v1/nodes within 0.2s")
    );
    hold.abort();
}
