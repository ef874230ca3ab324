//! The control plane's API, end to end against the real binary on loopback:
//! Kubernetes paths and Status errors, allocation, the endpoint controller,
//! authorization, watches and the per-node push stream.

use hyper::Method;
use serde_json::json;
use std::time::Duration;
use weft_agent::sync::Stream;
use weft_e2e::{node_token, ControlProcess, TempDir, VIEWER_TOKEN};
use weft_model::{NodeView, StreamFrame};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn svc(name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec})
}

const SVCS: &str = "/api/v1/namespaces/default/services";
const PODS: &str = "/api/v1/namespaces/default/pods";
const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices";

#[test]
fn invalid_objects_get_status_with_field_path_and_nothing_is_stored() {
    let dir = TempDir::new("invalid");
    let cp = ControlProcess::start(&dir.0, &[]).unwrap();
    let api = cp.admin();
    rt().block_on(async {
        let err = api.post(SVCS, svc("bad", json!({"ports": [{"port": 70000, "targetPort": 80}]}))).await.unwrap_err();
        assert_eq!(err.code, 422);
        assert_eq!(err.status["kind"], "Status");
        assert_eq!(err.status["reason"], "Invalid");
        assert_eq!(
            err.status["message"],
            "Service \"bad\" is invalid: spec.ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive"
        );
        assert_eq!(err.status["details"]["causes"][0]["field"], "spec.ports[0].port");

        // malformed JSON and wrong types: 400 naming the field
        let (code, body) = api.raw(Method::POST, SVCS, "{not json".into()).await.unwrap();
        assert_eq!(code, 400, "{body:?}");
        let err = api.post(SVCS, svc("t", json!({"ports": [{"port": "eighty"}]}))).await.unwrap_err();
        assert_eq!(err.code, 400);
        assert!(err.status["message"].as_str().unwrap().contains("spec.ports[0].port"), "{}", err.status);

        // unknown namespace, wrong kind for the path, conflicting namespace
        let err = api.post("/api/v1/namespaces/nope/services", svc("a", json!({"ports": [{"port": 80}]}))).await.unwrap_err();
        assert_eq!((err.code, err.status["message"].as_str().unwrap()), (404, "namespaces \"nope\" not found"));
        let err = api.post(SVCS, json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}})).await.unwrap_err();
        assert_eq!(err.code, 400);

        // nothing was stored by any of the failures
        let list = api.get(SVCS).await.unwrap();
        assert_eq!(list["items"].as_array().unwrap().len(), 0);


        // 404 for unknown paths and objects, as Status
        let err = api.get("/api/v1/namespaces/default/services/missing").await.unwrap_err();
        assert_eq!((err.code, err.status["message"].as_str().unwrap()), (404, "services \"missing\" not found"));
        assert_eq!(api.get("/api/v1/widgets").await.unwrap_err().code, 404);
    });
}

#[test]
fn request_bodies_are_size_limited() {
    let dir = TempDir::new("bodylimit");
    let cp = ControlProcess::start(&dir.0, &["--max-body-bytes", "65536"]).unwrap();
    let api = cp.admin();
    rt().block_on(async {
        let big = format!(
            "{{\"metadata\":{{\"name\":\"big\",\"annotations\":{{\"a\":\"{}\"}}}}}}",
            "x".repeat(200_000)
        );
        let (code, body) = api.raw(Method::POST, SVCS, big.into()).await.unwrap();
        assert_eq!(code, 413, "{}", String::from_utf8_lossy(&body));
        let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status["reason"], "RequestEntityTooLarge");
        assert_eq!(api.get(&format!("{SVCS}/big")).await.unwrap_err().code, 404);
    });
}

#[test]
fn cluster_ips_and_node_ports_are_allocated_released_and_never_shared() {
    let dir = TempDir::new("alloc");
    let cp = ControlProcess::start(&dir.0, &["--node-port-range", "30000-30002"]).unwrap();
    let api = cp.admin();
    rt().block_on(async {
        let a = api.post(SVCS, svc("a", json!({"ports": [{"port": 80}]}))).await.unwrap();
        let ip_a = a["spec"]["clusterIP"].as_str().unwrap().to_string();
        assert!(ip_a.starts_with("198.19."), "{ip_a}");
        assert_eq!(a["spec"]["clusterIPs"][0], ip_a.as_str());
        assert_eq!(a["spec"]["ports"][0]["targetPort"], 80);

        // requested IP honoured; conflict rejected with the field
        let b = api.post(SVCS, svc("b", json!({"clusterIP": "198.19.0.10", "ports": [{"port": 53, "protocol": "UDP"}]}))).await.unwrap();
        assert_eq!(b["spec"]["clusterIP"], "198.19.0.10");
        let err = api.post(SVCS, svc("c", json!({"clusterIP": "198.19.0.10", "ports": [{"port": 53}]}))).await.unwrap_err();
        assert_eq!(err.code, 422);
        assert_eq!(err.status["details"]["causes"][0]["field"], "spec.clusterIPs");
        let err = api.post(SVCS, svc("c", json!({"clusterIP": "10.96.0.10", "ports": [{"port": 53}]}))).await.unwrap_err();
        assert_eq!(err.code, 422, "outside the service CIDR");
        assert_eq!(api.get(&format!("{SVCS}/c")).await.unwrap_err().code, 404);

        // NodePorts: per protocol, conflicts rejected, range exhaustion is an error, release on delete
        let np = api.post(SVCS, svc("np", json!({"type": "NodePort", "ports": [
            {"name": "t", "port": 53, "protocol": "TCP", "nodePort": 30001},
            {"name": "u", "port": 53, "protocol": "UDP", "nodePort": 30001}]}))).await.unwrap();
        assert_eq!(np["spec"]["ports"][1]["nodePort"], 30001);
        let err = api.post(SVCS, svc("np2", json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30001}]}))).await.unwrap_err();
        assert_eq!(err.status["details"]["causes"][0]["field"], "spec.ports[0].nodePort");
        assert!(err.status["message"].as_str().unwrap().contains("provided port is already allocated"));
        let np3 = api.post(SVCS, svc("np3", json!({"type": "NodePort", "ports": [{"name": "a", "port": 80}, {"name": "b", "port": 81}]}))).await.unwrap();
        let mut got: Vec<i64> = np3["spec"]["ports"].as_array().unwrap().iter().map(|p| p["nodePort"].as_i64().unwrap()).collect();
        got.sort();
        assert_eq!(got, [30000, 30002]);
        let err = api.post(SVCS, svc("np4", json!({"type": "NodePort", "ports": [{"port": 80}]}))).await.unwrap_err();
        assert!(err.code >= 400, "range is full");
        assert_eq!(api.get(&format!("{SVCS}/np4")).await.unwrap_err().code, 404);

        // type transitions: NodePort -> ClusterIP drops node ports (released), -> ExternalName drops the IP
        let mut cur = api.get(&format!("{SVCS}/np3")).await.unwrap();
        cur["spec"]["type"] = json!("ClusterIP");
        for p in cur["spec"]["ports"].as_array_mut().unwrap() {
            p.as_object_mut().unwrap().remove("nodePort");
        }
        let upd = api.put(&format!("{SVCS}/np3"), cur).await.unwrap();
        assert!(upd["spec"]["ports"][0].get("nodePort").is_none());
        let ip3 = upd["spec"]["clusterIP"].as_str().unwrap().to_string();
        api.post(SVCS, svc("np5", json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30002}]}))).await.unwrap();

        let mut cur = api.get(&format!("{SVCS}/np3")).await.unwrap();
        cur["spec"]["type"] = json!("ExternalName");
        cur["spec"]["externalName"] = json!("example.test");
        let ext = api.put(&format!("{SVCS}/np3"), cur).await.unwrap();
        assert!(ext["spec"].get("clusterIP").is_none(), "{}", ext["spec"]);
        // the released IP can be requested again
        api.post(SVCS, svc("reuse", json!({"clusterIP": ip3, "ports": [{"port": 80}]}))).await.unwrap();

        // ExternalName -> ClusterIP allocates a fresh IP; -> LoadBalancer allocates node ports
        let mut cur = api.get(&format!("{SVCS}/np3")).await.unwrap();
        cur["spec"]["type"] = json!("ClusterIP");
        cur["spec"].as_object_mut().unwrap().remove("externalName");
        let back = api.put(&format!("{SVCS}/np3"), cur).await.unwrap();
        let ip_back = back["spec"]["clusterIP"].as_str().unwrap();
        assert!(ip_back.starts_with("198.19.") && ip_back != ip3);

        // clusterIP is immutable
        let mut cur = api.get(&format!("{SVCS}/a")).await.unwrap();
        cur["spec"]["clusterIP"] = json!("198.19.0.99");
        cur["spec"]["clusterIPs"] = json!(["198.19.0.99"]);
        let err = api.put(&format!("{SVCS}/a"), cur).await.unwrap_err();
        assert_eq!(err.code, 422);

        // delete releases: the requested IP becomes available
        api.delete(&format!("{SVCS}/b")).await.unwrap();
        api.post(SVCS, svc("b2", json!({"clusterIP": "198.19.0.10", "ports": [{"port": 53}]}))).await.unwrap();

        // optimistic concurrency
        let mut stale = api.get(&format!("{SVCS}/a")).await.unwrap();
        let mut fresh = stale.clone();
        fresh["metadata"]["labels"] = json!({"v": "1"});
        api.put(&format!("{SVCS}/a"), fresh).await.unwrap();
        stale["metadata"]["labels"] = json!({"v": "2"});
        let err = api.put(&format!("{SVCS}/a"), stale).await.unwrap_err();
        assert_eq!((err.code, err.status["reason"].as_str().unwrap()), (409, "Conflict"));
        let _ = ip_a;
    });
}

fn pod(name: &str, node: &str, labels: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "weft/demo",
            "ports": [{"name": "http", "containerPort": 8080}]}]}})
}

async fn set_pod_status(api: &weft_e2e::Api, name: &str, ip: &str, ready: bool) {
    let mut p = api.get(&format!("{PODS}/{name}")).await.unwrap();
    p["status"] = json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]});
    api.put(&format!("{PODS}/{name}/status"), p).await.unwrap();
}

fn endpoints_of(list: &serde_json::Value, svc: &str) -> Vec<(String, bool, bool, bool, i64)> {
    let mut out = Vec::new();
    for s in list["items"].as_array().unwrap() {
        if s["metadata"]["labels"]["kubernetes.io/service-name"] != svc {
            continue;
        }
        let port = s["ports"][0]["port"].as_i64().unwrap_or(0);
        for e in s["endpoints"].as_array().unwrap() {
            let c = &e["conditions"];
            out.push((
                e["addresses"][0].as_str().unwrap().to_string(),
                c["ready"].as_bool().unwrap(),
                c["serving"].as_bool().unwrap(),
                c["terminating"].as_bool().unwrap(),
                port,
            ));
        }
    }
    out.sort();
    out
}

#[test]
fn endpoint_controller_follows_pods() {
    let dir = TempDir::new("endpoints");
    let cp = ControlProcess::start(&dir.0, &[]).unwrap();
    let api = cp.admin();
    rt().block_on(async {
        api.post(SVCS, svc("web", json!({"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}))).await.unwrap();
        api.post(SVCS, svc("web-all", json!({"selector": {"app": "web"}, "publishNotReadyAddresses": true, "ports": [{"port": 80, "targetPort": 8080}]}))).await.unwrap();
        for (i, node) in ["n1", "n2", "n3"].iter().enumerate() {
            api.post(PODS, pod(&format!("web-{i}"), node, json!({"app": "web"}))).await.unwrap();
        }
        api.post(PODS, pod("other", "n1", json!({"app": "db"}))).await.unwrap();
        // a pod status as the node would report it; status sent on create is ignored, as in Kubernetes
        let created = api.get(&format!("{PODS}/web-0")).await.unwrap();
        assert_eq!(created["status"]["phase"], "Pending");
        set_pod_status(&api, "web-0", "198.18.128.2", true).await;
        set_pod_status(&api, "web-1", "198.18.129.2", true).await;
        set_pod_status(&api, "web-2", "198.18.130.2", false).await;
        set_pod_status(&api, "other", "198.18.128.3", true).await;
        let slices = api.get(SLICES).await.unwrap();
        assert_eq!(
            endpoints_of(&slices, "web"),
            vec![
                ("198.18.128.2".into(), true, true, false, 8080),
                ("198.18.129.2".into(), true, true, false, 8080),
                ("198.18.130.2".into(), false, false, false, 8080),
            ]
        );
        let all = endpoints_of(&slices, "web-all");
        assert!(all.iter().all(|e| e.1), "publishNotReadyAddresses marks every endpoint ready: {all:?}");

        // graceful deletion: terminating, then gone after the grace period
        let del = api.req(Method::DELETE, &format!("{PODS}/web-0?gracePeriodSeconds=2"), None).await.unwrap();
        assert!(del["metadata"]["deletionTimestamp"].is_string());
        let slices = api.get(SLICES).await.unwrap();
        assert!(endpoints_of(&slices, "web").contains(&("198.18.128.2".into(), false, true, true, 8080)));
        let mut gone = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if api.get(&format!("{PODS}/web-0")).await.is_err() {
                gone = true;
                break;
            }
        }
        assert!(gone, "pod finalized after its grace period");
        let slices = api.get(SLICES).await.unwrap();
        assert_eq!(endpoints_of(&slices, "web").len(), 2);

        // 250 pods: slices of at most 100 endpoints
        api.post(SVCS, svc("many", json!({"selector": {"app": "many"}, "ports": [{"port": 80}]}))).await.unwrap();
        for i in 0..250 {
            api.post(PODS, pod(&format!("m-{i}"), "n1", json!({"app": "many"}))).await.unwrap();
            set_pod_status(&api, &format!("m-{i}"), &format!("198.18.{}.{}", 140 + i / 200, 2 + i % 200), true).await;
        }
        let slices = api.get(&format!("{SLICES}?labelSelector=kubernetes.io%2Fservice-name%3Dmany")).await.unwrap();
        let mut sizes: Vec<usize> = slices["items"].as_array().unwrap().iter().map(|s| s["endpoints"].as_array().unwrap().len()).collect();
        sizes.sort();
        assert_eq!(sizes, [50, 100, 100]);

        // selector-less Services keep user-supplied slices; deleting a Service removes only managed slices
        api.post(SVCS, svc("manual", json!({"ports": [{"port": 80}]}))).await.unwrap();
        api.post(SLICES, json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "manual-1", "labels": {"kubernetes.io/service-name": "manual"}},
            "addressType": "IPv4", "ports": [{"port": 9000, "protocol": "TCP", "name": ""}],
            "endpoints": [{"addresses": ["198.18.150.9"]}]})).await.unwrap();
        set_pod_status(&api, "web-1", "198.18.129.2", true).await;
        assert!(api.get(&format!("{SLICES}/manual-1")).await.is_ok());
        api.delete(&format!("{SVCS}/many")).await.unwrap();
        let left = api.get(&format!("{SLICES}?labelSelector=kubernetes.io%2Fservice-name%3Dmany")).await.unwrap();
        assert_eq!(left["items"].as_array().unwrap().len(), 0);

        // a deleted Node takes its Pods (and so their endpoints) with it
        api.post("/api/v1/nodes", json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2"}})).await.unwrap();
        api.delete("/api/v1/nodes/n2").await.unwrap();
        assert_eq!(api.get(&format!("{PODS}/web-1")).await.unwrap_err().code, 404, "web-1 ran on n2");
        let slices = api.get(SLICES).await.unwrap();
        assert_eq!(endpoints_of(&slices, "web").iter().map(|e| e.0.as_str()).collect::<Vec<_>>(), ["198.18.130.2"]);
    });
}

#[test]
fn node_subnets_are_stable_and_exhaustion_is_clear() {
    let dir = TempDir::new("subnets");
    let cp = ControlProcess::start(
        &dir.0,
        &[
            "--cluster-cidr",
            "198.18.128.0/23",
            "--node-cidr-mask",
            "24",
        ],
    )
    .unwrap();
    let api = cp.admin();
    let node = |n: &str| json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}});
    rt().block_on(async {
        let n1 = api.post("/api/v1/nodes", node("n1")).await.unwrap();
        let n2 = api.post("/api/v1/nodes", node("n2")).await.unwrap();
        let c1 = n1["spec"]["podCIDR"].as_str().unwrap().to_string();
        assert_ne!(c1, n2["spec"]["podCIDR"].as_str().unwrap());
        let err = api.post("/api/v1/nodes", node("n3")).await.unwrap_err();
        assert_eq!(err.code, 422);
        assert!(
            err.status["message"]
                .as_str()
                .unwrap()
                .contains("198.18.128.0/23"),
            "{}",
            err.status
        );
        // a node that re-registers keeps its subnet
        api.delete("/api/v1/nodes/n1").await.unwrap();
        let again = api.post("/api/v1/nodes", node("n1")).await.unwrap();
        assert_eq!(again["spec"]["podCIDR"], c1.as_str());
        // an agent PUT without podCIDR keeps it; a different podCIDR is refused
        let mut cur = again.clone();
        cur["spec"] = json!({});
        let kept = api.put("/api/v1/nodes/n1", cur).await.unwrap();
        assert_eq!(kept["spec"]["podCIDR"], c1.as_str());
        let mut cur = kept.clone();
        cur["spec"]["podCIDR"] = json!("198.18.129.0/24");
        cur["spec"]["podCIDRs"] = json!(["198.18.129.0/24"]);
        assert_eq!(
            api.put("/api/v1/nodes/n1", cur).await.unwrap_err().code,
            422
        );
    });
    // and after a restart of the control plane
    let mut cp = cp;
    cp.restart().unwrap();
    let api = cp.admin();
    rt().block_on(async {
        let c1 = api.get("/api/v1/nodes/n1").await.unwrap()["spec"]["podCIDR"].clone();
        api.delete("/api/v1/nodes/n1").await.unwrap();
        let again = api
            .post(
                "/api/v1/nodes",
                json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}),
            )
            .await
            .unwrap();
        assert_eq!(again["spec"]["podCIDR"], c1);
    });
}

#[test]
fn authorization_by_token() {
    let dir = TempDir::new("authz");
    let cp = ControlProcess::start(&dir.0, &[]).unwrap();
    let admin = cp.admin();
    let viewer = cp.client(VIEWER_TOKEN);
    let n1 = cp.client(&node_token("n1"));
    let anon = cp.client("");
    rt().block_on(async {
        assert_eq!(anon.get(SVCS).await.unwrap_err().code, 401);
        assert_eq!(cp.client("wrong").get(SVCS).await.unwrap_err().code, 401);
        assert!(viewer.get(SVCS).await.is_ok());
        let err = viewer
            .post(SVCS, svc("x", json!({"ports": [{"port": 80}]})))
            .await
            .unwrap_err();
        assert_eq!(err.code, 403);
        // nodes: their own Node and Pods only
        n1.post(
            "/api/v1/nodes",
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}),
        )
        .await
        .unwrap();
        assert_eq!(
            n1.post(
                "/api/v1/nodes",
                json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2"}})
            )
            .await
            .unwrap_err()
            .code,
            403
        );
        assert_eq!(
            n1.post(SVCS, svc("x", json!({"ports": [{"port": 80}]})))
                .await
                .unwrap_err()
                .code,
            403
        );
        admin
            .post(PODS, pod("mine", "n1", json!({})))
            .await
            .unwrap();
        admin
            .post(PODS, pod("theirs", "n2", json!({})))
            .await
            .unwrap();
        set_pod_status(&n1, "mine", "198.18.128.2", true).await;
        let mut theirs = admin.get(&format!("{PODS}/theirs")).await.unwrap();
        theirs["status"] = json!({"podIP": "198.18.129.2"});
        assert_eq!(
            n1.put(&format!("{PODS}/theirs/status"), theirs)
                .await
                .unwrap_err()
                .code,
            403
        );
        assert_eq!(
            n1.get(&format!("{PODS}/theirs")).await.unwrap_err().code,
            403
        );
        // moving a pod to another node is forbidden too
        let mut mine = admin.get(&format!("{PODS}/mine")).await.unwrap();
        mine["spec"]["nodeName"] = json!("n2");
        assert!(n1.put(&format!("{PODS}/mine"), mine).await.is_err());
        // the node's own stream only
        let own = Stream::open(&n1.ep, "n1", None).await;
        assert!(own.is_ok());
        match Stream::open(&n1.ep, "n2", None).await {
            Err(weft_agent::client::ClientError::Status { code, .. }) => assert_eq!(code, 403),
            other => panic!("expected 403, got {:?}", other.map(|_| ())),
        }
    });
}

#[test]
fn watch_streams_events_and_resumes_from_a_resource_version() {
    let dir = TempDir::new("watch");
    let cp = ControlProcess::start(&dir.0, &[]).unwrap();
    let api = cp.admin();
    rt().block_on(async {
        api.post(SVCS, svc("before", json!({"ports": [{"port": 80}]}))).await.unwrap();
        let resp = api.ep.send(Method::GET, &format!("{SVCS}?watch=1"), None).await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut lines = weft_agent::client::LineReader::new(resp.into_body());
        let first = next_event(&mut lines).await;
        assert_eq!((first["type"].as_str().unwrap(), first["object"]["metadata"]["name"].as_str().unwrap()), ("ADDED", "before"));
        let created = api.post(SVCS, svc("live", json!({"ports": [{"port": 80}]}))).await.unwrap();
        let rv: u64 = created["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
        let ev = next_event(&mut lines).await;
        assert_eq!((ev["type"].as_str().unwrap(), ev["object"]["metadata"]["name"].as_str().unwrap()), ("ADDED", "live"));
        api.delete(&format!("{SVCS}/live")).await.unwrap();
        let ev = next_event(&mut lines).await;
        assert_eq!(ev["type"], "DELETED");

        // resume after `rv`: only what came later
        let resp = api.ep.send(Method::GET, &format!("{SVCS}?watch=true&resourceVersion={rv}"), None).await.unwrap();
        let mut lines = weft_agent::client::LineReader::new(resp.into_body());
        let l = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await.unwrap().unwrap().unwrap();
        let ev: serde_json::Value = serde_json::from_slice(&l).unwrap();
        assert_eq!((ev["type"].as_str().unwrap(), ev["object"]["metadata"]["name"].as_str().unwrap()), ("DELETED", "live"));

        // a selector watch sees an object leave the selection as DELETED and enter it as ADDED
        let resp = api.ep.send(Method::GET, &format!("{SVCS}?watch=1&labelSelector=tier%3Dfront"), None).await.unwrap();
        let mut sel = weft_agent::client::LineReader::new(resp.into_body());
        let mut s = api.post(SVCS, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "mover", "labels": {"tier": "back"}}, "spec": {"ports": [{"port": 80}]}})).await.unwrap();
        s["metadata"]["labels"] = json!({"tier": "front"});
        let s = api.put(&format!("{SVCS}/mover"), s).await.unwrap();
        let ev = next_event(&mut sel).await;
        assert_eq!((ev["type"].as_str().unwrap(), ev["object"]["metadata"]["name"].as_str().unwrap()), ("ADDED", "mover"));
        let mut s = s;
        s["metadata"]["labels"] = json!({"tier": "back"});
        api.put(&format!("{SVCS}/mover"), s).await.unwrap();
        let ev = next_event(&mut sel).await;
        assert_eq!((ev["type"].as_str().unwrap(), ev["object"]["metadata"]["name"].as_str().unwrap()), ("DELETED", "mover"));

        // label selectors on list
        api.post(SVCS, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "lab", "labels": {"tier": "front"}}, "spec": {"ports": [{"port": 80}]}})).await.unwrap();
        let l = api.get(&format!("{SVCS}?labelSelector=tier%3Dfront")).await.unwrap();
        assert_eq!(l["items"].as_array().unwrap().len(), 1);
        let l = api.get(&format!("{SVCS}?labelSelector=tier+notin+(front)")).await.unwrap();
        let names: Vec<&str> = l["items"].as_array().unwrap().iter().map(|i| i["metadata"]["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["before", "mover"]);
        assert_eq!(api.get(&format!("{SVCS}?labelSelector=a+in+(b")).await.unwrap_err().code, 400);
    });
}

async fn next_event(lines: &mut weft_agent::client::LineReader) -> serde_json::Value {
    let l = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    serde_json::from_slice(&l).unwrap()
}

async fn next_frame(s: &mut Stream) -> StreamFrame {
    loop {
        let f = tokio::time::timeout(Duration::from_secs(10), s.next_frame())
            .await
            .expect("frame in time")
            .unwrap()
            .expect("stream open");
        if !matches!(f, StreamFrame::Ping { .. }) {
            return f;
        }
    }
}

#[test]
fn push_stream_resets_then_deltas_and_resumes_without_snapshot() {
    let dir = TempDir::new("stream");
    let cp = ControlProcess::start(&dir.0, &[]).unwrap();
    let api = cp.admin();
    rt().block_on(async {
        api.post(SVCS, svc("a", json!({"ports": [{"port": 80}]})))
            .await
            .unwrap();
        let mut s = Stream::open(&api.ep, "n1", None).await.unwrap();
        let mut view = NodeView::default();
        let f = next_frame(&mut s).await;
        assert!(matches!(f, StreamFrame::Reset { .. }));
        view.apply(f).unwrap();
        assert!(view
            .services
            .contains_key(&("default".to_string(), "a".to_string())));

        // a node registering and a Service with endpoints arrive as deltas
        api.post(
            "/api/v1/nodes",
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.11"}]}}),
        )
        .await
        .unwrap();
        let f = next_frame(&mut s).await;
        assert!(matches!(f, StreamFrame::Delta { .. }), "{f:?}");
        view.apply(f).unwrap();
        let n1 = &view.nodes["n1"];
        assert!(n1.pod_cidrs[0].starts_with("198.18."));
        assert_eq!(n1.vtep_ip, Some("198.18.0.11".parse().unwrap()));
        let held = view.rev;
        drop(s);

        // changes while disconnected; a reconnect within the window gets only deltas
        api.post(SVCS, svc("b", json!({"ports": [{"port": 81}]})))
            .await
            .unwrap();
        api.delete(&format!("{SVCS}/a")).await.unwrap();
        let mut s = Stream::open(&api.ep, "n1", Some(held)).await.unwrap();
        for _ in 0..2 {
            let f = next_frame(&mut s).await;
            assert!(
                matches!(f, StreamFrame::Delta { .. }),
                "resumed without a snapshot: {f:?}"
            );
            view.apply(f).unwrap();
        }
        assert!(view
            .services
            .contains_key(&("default".to_string(), "b".to_string())));
        assert!(!view
            .services
            .contains_key(&("default".to_string(), "a".to_string())));
        // a revision outside the window (from the future here) gets a Reset
        let mut s2 = Stream::open(&api.ep, "n1", Some(view.rev + 1000))
            .await
            .unwrap();
        assert!(matches!(
            next_frame(&mut s2).await,
            StreamFrame::Reset { .. }
        ));
        // an unrelated write (a Pod without endpoints effects) sends nothing; the next delta is the next view change
        api.post(PODS, pod("idle", "n1", json!({}))).await.unwrap();
        api.post(SVCS, svc("c", json!({"ports": [{"port": 82}]})))
            .await
            .unwrap();
        match next_frame(&mut s).await {
            StreamFrame::Delta { changes, .. } => assert_eq!(changes.len(), 1),
            f => panic!("{f:?}"),
        }
    });
}

#[test]
fn watch_from_a_revision_older_than_the_history_is_expired() {
    let dir = TempDir::new("watch-gone");
    let cp = ControlProcess::start(&dir.0, &["--watch-history", "2"]).unwrap();
    let api = cp.admin();
    rt().block_on(async {
        for i in 0..5 {
            api.post(
                SVCS,
                svc(&format!("s{i}"), json!({"ports": [{"port": 80}]})),
            )
            .await
            .unwrap();
        }
        let resp = api
            .ep
            .send(
                Method::GET,
                &format!("{SVCS}?watch=1&resourceVersion=2"),
                None,
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut lines = weft_agent::client::LineReader::new(resp.into_body());
        let ev = next_event(&mut lines).await;
        assert_eq!(ev["type"], "ERROR");
        assert_eq!(ev["object"]["code"], 410);
        assert_eq!(ev["object"]["reason"], "Expired");
        // a recent revision still resumes
        let resp = api
            .ep
            .send(
                Method::GET,
                &format!("{SVCS}?watch=1&resourceVersion=5"),
                None,
            )
            .await
            .unwrap();
        let mut lines = weft_agent::client::LineReader::new(resp.into_body());
        let ev = next_event(&mut lines).await;
        assert_eq!(
            (
                ev["type"].as_str().unwrap(),
                ev["object"]["metadata"]["name"].as_str().unwrap()
            ),
            ("ADDED", "s4")
        );
    });
}
