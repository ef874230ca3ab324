//! The HTTP API: Kubernetes-style paths over hyper, bearer-token auth, size
//! limits, `Status` errors, watches, and the weft push stream.

use crate::auth::{Identity, Tokens};
use crate::state::{
    authorize_read, watch_line, Control, DeleteOptions, EventType, FieldSelector, Stored,
};
use crate::status::ApiError;
use crate::watch::Resume;
use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use weft_model::{Kind, LabelSelector};

/// A response body that is either complete or streamed from a channel.
pub type ApiBody = Either<Full<Bytes>, ChannelBody>;

pub struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

pub struct ApiServer {
    pub control: Arc<Control>,
    pub tokens: Tokens,
    pub max_body_bytes: usize,
}

/// The target of a request path.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Collection {
        kind: Kind,
        ns: Option<String>,
    },
    Object {
        kind: Kind,
        ns: Option<String>,
        name: String,
        status: bool,
    },
    Stream {
        node: String,
    },
    Discovery(&'static str),
    DiscoveryGroup,
    Health(&'static str),
    Version,
    Metrics,
}

fn parse_route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let (group, rest): (&str, &[&str]) = match segs.as_slice() {
        ["healthz"] => return Some(Route::Health("healthz")),
        ["livez"] => return Some(Route::Health("livez")),
        ["readyz"] => return Some(Route::Health("readyz")),
        ["version"] => return Some(Route::Version),
        ["metrics"] => return Some(Route::Metrics),
        ["api"] => return Some(Route::Discovery("api")),
        ["apis"] => return Some(Route::Discovery("apis")),
        ["api", "v1"] => return Some(Route::Discovery("v1")),
        ["apis", "discovery.k8s.io"] => return Some(Route::DiscoveryGroup),
        ["apis", "discovery.k8s.io", "v1"] => return Some(Route::Discovery("discovery.k8s.io/v1")),
        ["weft", "v1", "nodes", node, "stream"] => {
            return Some(Route::Stream {
                node: node.to_string(),
            })
        }
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", "discovery.k8s.io", "v1", rest @ ..] => ("discovery.k8s.io", rest),
        _ => return None,
    };
    let kind_of = |plural: &str| {
        Kind::ALL
            .into_iter()
            .find(|k| k.plural() == plural && k.group() == group)
    };
    match rest {
        [plural] => Some(Route::Collection {
            kind: kind_of(plural)?,
            ns: None,
        }),
        ["namespaces", ns, plural] => {
            let kind = kind_of(plural)?;
            kind.namespaced().then(|| Route::Collection {
                kind,
                ns: Some(ns.to_string()),
            })
        }
        ["namespaces", ns, plural, name] => {
            let kind = kind_of(plural)?;
            kind.namespaced().then(|| Route::Object {
                kind,
                ns: Some(ns.to_string()),
                name: name.to_string(),
                status: false,
            })
        }
        ["namespaces", ns, plural, name, "status"] => {
            let kind = kind_of(plural)?;
            kind.namespaced().then(|| Route::Object {
                kind,
                ns: Some(ns.to_string()),
                name: name.to_string(),
                status: true,
            })
        }
        [plural, name] => {
            let kind = kind_of(plural)?;
            (!kind.namespaced()).then(|| Route::Object {
                kind,
                ns: None,
                name: name.to_string(),
                status: false,
            })
        }
        [plural, name, "status"] => {
            let kind = kind_of(plural)?;
            (!kind.namespaced()).then(|| Route::Object {
                kind,
                ns: None,
                name: name.to_string(),
                status: true,
            })
        }
        _ => None,
    }
}

/// Decode `%XX` and `+` in a query component.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Query {
        Query(
            q.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }
    /// `labelSelector` and `fieldSelector`, parsed.
    fn selectors(&self) -> Result<(LabelSelector, FieldSelector), ApiError> {
        let labels = LabelSelector::parse(self.get("labelSelector").unwrap_or(""))
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let fields = FieldSelector::parse(self.get("fieldSelector").unwrap_or(""))?;
        Ok((labels, fields))
    }

    fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("1" | "true" | ""))
    }
}

fn json_response(code: u16, body: Bytes) -> Response<ApiBody> {
    let mut r = Response::new(Either::Left(Full::new(body)));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn value_response(code: u16, v: &serde_json::Value) -> Response<ApiBody> {
    json_response(code, Bytes::from(serde_json::to_vec(v).unwrap_or_default()))
}

fn error_response(e: &ApiError) -> Response<ApiBody> {
    value_response(e.code(), &e.status())
}

fn stream_response(rx: mpsc::Receiver<Bytes>, content_type: &'static str) -> Response<ApiBody> {
    let mut r = Response::new(Either::Right(ChannelBody(rx)));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn list_body(kind: Kind, rev: u64, items: &[Stored]) -> Bytes {
    let mut v = Vec::with_capacity(128 + items.iter().map(|s| s.json.len() + 1).sum::<usize>());
    v.extend_from_slice(
        format!(
            "{{\"apiVersion\":\"{}\",\"kind\":\"{}List\",\"metadata\":{{\"resourceVersion\":\"{rev}\"}},\"items\":[",
            kind.api_version(),
            kind.name()
        )
        .as_bytes(),
    );
    for (i, s) in items.iter().enumerate() {
        if i > 0 {
            v.push(b',');
        }
        v.extend_from_slice(&s.json);
    }
    v.extend_from_slice(b"]}");
    Bytes::from(v)
}

impl ApiServer {
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ApiBody>, Infallible> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let resp = match self.route(req).await {
            Ok(r) => r,
            Err(e) => error_response(&e),
        };
        tracing::debug!(%method, %path, code = resp.status().as_u16(), "request");
        Ok(resp)
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Response<ApiBody>, ApiError> {
        let route = parse_route(req.uri().path()).ok_or(ApiError::NoRoute)?;
        match &route {
            Route::Health(which) => return Ok(self.health(which)),
            Route::Version => {
                return Ok(value_response(
                    200,
                    &serde_json::json!({"major": "1", "minor": "34", "gitVersion": concat!("v1.34.0-weft.", env!("CARGO_PKG_VERSION")), "platform": "linux/amd64"}),
                ))
            }
            _ => {}
        }
        let who = self
            .tokens
            .authenticate(
                req.headers()
                    .get(AUTHORIZATION)
                    .and_then(|h| h.to_str().ok()),
            )
            .cloned()
            .ok_or(ApiError::Unauthorized)?;
        let query = Query::parse(req.uri().query());
        match route {
            Route::Discovery(which) => Ok(value_response(200, &discovery(which))),
            Route::DiscoveryGroup => Ok(value_response(200, &discovery_group())),
            Route::Metrics => Ok(json_response(200, Bytes::from(self.metrics())).map(|b| b)),
            Route::Stream { node } => self.stream(&who, &node, &query, req.method()),
            Route::Collection { kind, ns } => match *req.method() {
                Method::GET if query.flag("watch") && query.get("watch").is_some() => {
                    self.watch(&who, kind, ns.as_deref(), &query)
                }
                Method::GET => self.list(&who, kind, ns.as_deref(), &query),
                Method::POST => {
                    let body = self.body(req, false).await?;
                    let (stored, rev) = self.control.create(&who, kind, ns.as_deref(), body)?;
                    self.wait(rev).await?;
                    Ok(json_response(201, stored.json))
                }
                _ => Err(ApiError::MethodNotAllowed),
            },
            Route::Object {
                kind,
                ns,
                name,
                status,
            } => {
                let nsr = ns.as_deref();
                match *req.method() {
                    Method::GET => {
                        let (stored, _) = self.control.get(kind, nsr.unwrap_or(""), &name)?;
                        if !authorize_read(&who, &stored.obj) {
                            return Err(forbidden_read(&who, kind, &name));
                        }
                        Ok(json_response(200, stored.json))
                    }
                    Method::PUT => {
                        let body = self.body(req, false).await?;
                        let (stored, rev) =
                            self.control.update(&who, kind, nsr, &name, body, status)?;
                        self.wait(rev).await?;
                        Ok(json_response(200, stored.json))
                    }
                    Method::PATCH => {
                        let patch = self.body(req, true).await?;
                        let (current, _) = self.control.get(kind, nsr.unwrap_or(""), &name)?;
                        let mut merged = current.obj.to_value();
                        merge_patch(&mut merged, &patch);
                        let (stored, rev) = self
                            .control
                            .update(&who, kind, nsr, &name, merged, status)?;
                        self.wait(rev).await?;
                        Ok(json_response(200, stored.json))
                    }
                    Method::DELETE => {
                        let mut opts = DeleteOptions::default();
                        if let Some(g) = query.get("gracePeriodSeconds") {
                            opts.grace_period_seconds = Some(g.parse().map_err(|_| {
                                ApiError::BadRequest(format!(
                                    "gracePeriodSeconds: Invalid value: {g:?}: must be an integer"
                                ))
                            })?);
                        }
                        let body = self.body_opt(req).await?;
                        if let Some(b) = body {
                            if let Some(g) = b.get("gracePeriodSeconds").and_then(|v| v.as_i64()) {
                                opts.grace_period_seconds = Some(g);
                            }
                            if let Some(rv) = b
                                .pointer("/preconditions/resourceVersion")
                                .and_then(|v| v.as_str())
                            {
                                opts.precondition_rv = Some(rv.to_string());
                            }
                        }
                        let (stored, rev) =
                            self.control
                                .delete(&who, kind, nsr.unwrap_or(""), &name, &opts)?;
                        self.wait(rev).await?;
                        Ok(json_response(200, stored.json))
                    }
                    _ => Err(ApiError::MethodNotAllowed),
                }
            }
            Route::Health(_) | Route::Version => Err(ApiError::NoRoute),
        }
    }

    fn health(&self, which: &str) -> Response<ApiBody> {
        let failure = self.control.failure();
        match (which, failure) {
            ("livez", _) | (_, None) => {
                let mut r = Response::new(Either::Left(Full::new(Bytes::from_static(b"ok"))));
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                r
            }
            (_, Some(f)) => {
                let mut r = Response::new(Either::Left(Full::new(Bytes::from(format!(
                    "store failed: {f}\n"
                )))));
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                r
            }
        }
    }

    fn metrics(&self) -> String {
        let hub = self.control.hub.lock().unwrap_or_else(|p| p.into_inner());
        format!(
            "# HELP weft_control_revision Current store revision.\n# TYPE weft_control_revision gauge\nweft_control_revision {}\n\
             # HELP weft_control_stream_subscribers Connected push-stream subscribers.\n# TYPE weft_control_stream_subscribers gauge\nweft_control_stream_subscribers {}\n\
             # HELP weft_control_stream_frames_encoded_total Delta frames encoded (once each, for all subscribers).\n# TYPE weft_control_stream_frames_encoded_total counter\nweft_control_stream_frames_encoded_total {}\n\
             # HELP weft_control_stream_bytes_encoded_total Bytes of delta frames encoded.\n# TYPE weft_control_stream_bytes_encoded_total counter\nweft_control_stream_bytes_encoded_total {}\n",
            self.control.rev(),
            hub.subscribers(),
            hub.encoded_frames,
            hub.encoded_bytes
        )
    }

    async fn wait(&self, rev: u64) -> Result<(), ApiError> {
        let mut d = self.control.durable();
        crate::store::wait_durable(&mut d, rev).await.map_err(|e| {
            self.control.fail(e.to_string());
            ApiError::Unavailable(e.to_string())
        })
    }

    async fn read_body(&self, req: Request<Incoming>) -> Result<(Option<String>, Bytes), ApiError> {
        let ct = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| {
                s.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            });
        if let Some(len) = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
        {
            if len > self.max_body_bytes {
                return Err(ApiError::TooLarge(self.max_body_bytes));
            }
        }
        let bytes = Limited::new(req.into_body(), self.max_body_bytes)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    ApiError::TooLarge(self.max_body_bytes)
                } else {
                    ApiError::BadRequest(format!("reading request body: {e}"))
                }
            })?
            .to_bytes();
        Ok((ct, bytes))
    }

    async fn body(
        &self,
        req: Request<Incoming>,
        patch: bool,
    ) -> Result<serde_json::Value, ApiError> {
        let (ct, bytes) = self.read_body(req).await?;
        let ct = ct.unwrap_or_else(|| "application/json".into());
        let accepted = if patch {
            "application/merge-patch+json"
        } else {
            "application/json, application/yaml"
        };
        match ct.as_str() {
            "application/merge-patch+json" if patch => parse_json(&bytes),
            "application/json" | "application/yaml" | "application/x-yaml" | "text/yaml"
                if !patch =>
            {
                if ct == "application/json" {
                    parse_json(&bytes)
                } else {
                    let text = std::str::from_utf8(&bytes)
                        .map_err(|_| ApiError::BadRequest("request body is not UTF-8".into()))?;
                    let mut docs = weft_model::manifest::parse_documents(text)
                        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
                    if docs.len() != 1 {
                        return Err(ApiError::BadRequest(format!(
                            "expected one YAML document, got {}",
                            docs.len()
                        )));
                    }
                    Ok(docs.remove(0))
                }
            }
            _ => Err(ApiError::UnsupportedMediaType(accepted.into())),
        }
    }

    async fn body_opt(
        &self,
        req: Request<Incoming>,
    ) -> Result<Option<serde_json::Value>, ApiError> {
        let (_, bytes) = self.read_body(req).await?;
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(None);
        }
        parse_json(&bytes).map(Some)
    }

    fn list(
        &self,
        who: &Identity,
        kind: Kind,
        ns: Option<&str>,
        q: &Query,
    ) -> Result<Response<ApiBody>, ApiError> {
        let (labels, fields) = q.selectors()?;
        let (mut items, rev) = self.control.list(kind, ns, &labels, &fields);
        items.retain(|s| authorize_read(who, &s.obj));
        Ok(json_response(200, list_body(kind, rev, &items)))
    }

    fn watch(
        &self,
        who: &Identity,
        kind: Kind,
        ns: Option<&str>,
        q: &Query,
    ) -> Result<Response<ApiBody>, ApiError> {
        let (labels, fields) = q.selectors()?;
        let timeout = q
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map(Duration::from_secs);
        let since = match q.get("resourceVersion") {
            None | Some("") | Some("0") => None,
            Some(v) => Some(v.parse::<u64>().map_err(|_| {
                ApiError::BadRequest(format!("resourceVersion: Invalid value: {v:?}"))
            })?),
        };
        let filter = WatchFilter {
            kind,
            ns: ns.map(str::to_string),
            labels,
            fields,
            who: who.clone(),
        };
        let (initial, last, mut live): (Vec<Bytes>, u64, broadcast::Receiver<_>) = match since {
            None => {
                // Everything now, as ADDED events, then what follows.
                let (items, rev, live) = self.control.list_and_subscribe(kind, ns);
                let lines = items
                    .iter()
                    .filter(|s| filter.visible(&s.obj))
                    .map(|s| watch_line(EventType::Added, &s.json))
                    .collect();
                (lines, rev, live)
            }
            Some(rv) => {
                let resume = self
                    .control
                    .watch
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .resume(rv);
                match resume {
                    // Too old: one ERROR event and the end, so the client re-lists.
                    Resume::Gone { oldest } => {
                        return Ok(json_response(
                            200,
                            error_event(&ApiError::Gone {
                                requested: rv,
                                oldest,
                            }),
                        ));
                    }
                    Resume::From(events, live) => {
                        let lines = events
                            .iter()
                            .filter(|e| filter.selects(&e.obj))
                            .filter_map(|e| e.line_for(|o| filter.visible(o)))
                            .collect();
                        let last = events.last().map_or(rv, |e| e.rev.max(rv));
                        (lines, last, live)
                    }
                }
            }
        };
        let (tx, rx) = mpsc::channel::<Bytes>(256);
        let control = self.control.clone();
        tokio::spawn(async move {
            // Objects listed above may not be durable yet: wait before sending them.
            let mut d = control.durable();
            if crate::store::wait_durable(&mut d, last.min(control.rev()))
                .await
                .is_err()
            {
                return;
            }
            for line in initial {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
            loop {
                let next = async {
                    match deadline {
                        Some(d) => tokio::time::timeout_at(d, live.recv()).await.ok(),
                        None => Some(live.recv().await),
                    }
                };
                tokio::select! {
                    ev = next => match ev {
                        None => return,
                        Some(Ok(e)) => {
                            // Events at or below `last` were part of the initial lines.
                            if e.rev <= last || !filter.selects(&e.obj) {
                                continue;
                            }
                            let Some(line) = e.line_for(|o| filter.visible(o)) else { continue };
                            if tx.send(line).await.is_err() {
                                return;
                            }
                        }
                        Some(Err(broadcast::error::RecvError::Lagged(_))) => {
                            let gone = ApiError::Gone { requested: last, oldest: control.rev() };
                            let _ = tx.send(error_event(&gone)).await;
                            return;
                        }
                        Some(Err(broadcast::error::RecvError::Closed)) => return,
                    },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(stream_response(rx, "application/json"))
    }

    fn stream(
        &self,
        who: &Identity,
        node: &str,
        q: &Query,
        method: &Method,
    ) -> Result<Response<ApiBody>, ApiError> {
        if method != Method::GET {
            return Err(ApiError::MethodNotAllowed);
        }
        if let Some(me) = who.node() {
            if me != node {
                return Err(ApiError::Forbidden(format!(
                    "nodes \"{node}\" is forbidden: User \"{}\" cannot read the stream of another node",
                    who.user
                )));
            }
        }
        let since = match q.get("since") {
            None | Some("") => None,
            Some(s) => Some(s.parse::<u64>().map_err(|_| {
                ApiError::BadRequest(format!(
                    "since: Invalid value: {s:?}: must be a revision number"
                ))
            })?),
        };
        let rx = crate::stream::open(self.control.clone(), since);
        Ok(stream_response(rx, "application/x-ndjson"))
    }
}

/// Which objects a watch sends.
struct WatchFilter {
    kind: Kind,
    ns: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    who: Identity,
}

impl WatchFilter {
    /// The watched collection (kind and namespace).
    fn selects(&self, o: &weft_model::Object) -> bool {
        o.kind() == self.kind && self.ns.as_deref().is_none_or(|n| o.namespace() == n)
    }

    /// Within the collection: matches the selectors and may be read by the watcher.
    fn visible(&self, o: &weft_model::Object) -> bool {
        self.labels.matches(o.meta().labels.as_ref())
            && self.fields.matches(o)
            && authorize_read(&self.who, o)
    }
}

/// A watch `ERROR` event carrying the error's Status.
fn error_event(e: &ApiError) -> Bytes {
    let mut v = serde_json::to_vec(&serde_json::json!({"type": "ERROR", "object": e.status()}))
        .unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

fn forbidden_read(who: &Identity, kind: Kind, name: &str) -> ApiError {
    ApiError::Forbidden(format!(
        "{} \"{name}\" is forbidden: User \"{}\" cannot get resource \"{}\" in API group \"{}\"",
        kind.plural(),
        who.user,
        kind.plural(),
        kind.group()
    ))
}

fn parse_json(bytes: &[u8]) -> Result<serde_json::Value, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::BadRequest(format!("request body is not valid JSON: {e}")))
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match patch {
        serde_json::Value::Object(p) => {
            if !target.is_object() {
                *target = serde_json::Value::Object(Default::default());
            }
            if let Some(t) = target.as_object_mut() {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn resource(kind: Kind) -> Vec<serde_json::Value> {
    let verbs = [
        "create", "delete", "get", "list", "patch", "update", "watch",
    ];
    let mut out = vec![serde_json::json!({
        "name": kind.plural(), "singularName": kind.singular(), "namespaced": kind.namespaced(),
        "kind": kind.name(), "verbs": verbs, "shortNames": kind.short_names(),
    })];
    if matches!(
        kind,
        Kind::Pod | Kind::Service | Kind::Node | Kind::Namespace
    ) {
        out.push(serde_json::json!({
            "name": format!("{}/status", kind.plural()), "singularName": "", "namespaced": kind.namespaced(),
            "kind": kind.name(), "verbs": ["get", "patch", "update"],
        }));
    }
    out
}

fn discovery(which: &str) -> serde_json::Value {
    match which {
        "api" => serde_json::json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}),
        "apis" => {
            serde_json::json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [discovery_group()]})
        }
        "v1" => {
            let resources: Vec<serde_json::Value> =
                [Kind::Namespace, Kind::Node, Kind::Pod, Kind::Service]
                    .into_iter()
                    .flat_map(resource)
                    .collect();
            serde_json::json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": resources})
        }
        _ => {
            serde_json::json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "discovery.k8s.io/v1",
            "resources": resource(Kind::EndpointSlice)})
        }
    }
}

fn discovery_group() -> serde_json::Value {
    serde_json::json!({"kind": "APIGroup", "apiVersion": "v1", "name": "discovery.k8s.io",
        "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"}})
}

/// Serve the API on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, server: Arc<ApiServer>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let server = server.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| server.clone().handle(req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            parse_route("/api/v1/namespaces/default/services"),
            Some(Route::Collection {
                kind: Kind::Service,
                ns: Some("default".into())
            })
        );
        assert_eq!(
            parse_route("/api/v1/namespaces/default"),
            Some(Route::Object {
                kind: Kind::Namespace,
                ns: None,
                name: "default".into(),
                status: false
            })
        );
        assert_eq!(
            parse_route("/apis/discovery.k8s.io/v1/namespaces/a/endpointslices/x"),
            Some(Route::Object {
                kind: Kind::EndpointSlice,
                ns: Some("a".into()),
                name: "x".into(),
                status: false
            })
        );
        assert_eq!(
            parse_route("/api/v1/namespaces/a/pods/p/status"),
            Some(Route::Object {
                kind: Kind::Pod,
                ns: Some("a".into()),
                name: "p".into(),
                status: true
            })
        );
        assert_eq!(
            parse_route("/api/v1/services"),
            Some(Route::Collection {
                kind: Kind::Service,
                ns: None
            })
        );
        assert_eq!(parse_route("/api/v1/endpointslices"), None, "wrong group");
        assert_eq!(
            parse_route("/api/v1/pods/x"),
            None,
            "namespaced object without namespace"
        );
        assert_eq!(parse_route("/api/v1/namespaces/a/nodes"), None);
        assert_eq!(
            parse_route("/weft/v1/nodes/n1/stream"),
            Some(Route::Stream { node: "n1".into() })
        );
    }

    #[test]
    fn query_decoding() {
        let q = Query::parse(Some("labelSelector=app%3Dweb%2Ctier+in+(a)&watch=1&x=%zz"));
        assert_eq!(q.get("labelSelector"), Some("app=web,tier in (a)"));
        assert!(q.flag("watch"));
        assert_eq!(q.get("x"), Some("%zz"));
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("a%4"), "a%4");
    }

    #[test]
    fn merge_patch_rfc7386() {
        let mut t = serde_json::json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut t, &serde_json::json!({"a": "z", "c": {"f": null}}));
        assert_eq!(t, serde_json::json!({"a": "z", "c": {"d": "e"}}));
    }
}
