//! The agent's local API on a unix socket: the CNI plugin reports each pod
//! it wired (`add`) or unwired (`del`), one JSON line per connection, and the
//! agent reports the pod's IP to the control plane so endpoints follow pods.
//! Reports are fire-and-forget for the plugin: it never waits on the
//! control plane.

use crate::client::{ClientError, Endpoint};
use bytes::Bytes;
use hyper::Method;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

/// One report from the CNI plugin.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodReport {
    pub op: String,
    #[serde(rename = "containerID")]
    pub container_id: String,
    #[serde(default)]
    pub ifname: String,
    #[serde(default)]
    pub ip: String,
    #[serde(default)]
    pub pod_namespace: String,
    #[serde(default)]
    pub pod_name: String,
}

impl PodReport {
    /// The address without a prefix length.
    pub fn address(&self) -> &str {
        self.ip.split('/').next().unwrap_or("")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocalApiError {
    #[error("binding {path}: {source}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A question from netctl, answered with one JSON line.
#[derive(Debug)]
pub struct Query {
    /// What is asked (`overlay`, `services`, `trace`, `ebpf`).
    pub what: String,
    /// The whole request (its other fields are the question's arguments).
    pub request: serde_json::Value,
    pub reply: tokio::sync::oneshot::Sender<serde_json::Value>,
}

/// Listen on `path` (replacing a stale socket): pod reports go to `out`,
/// queries to `queries` (their answer is written back on the connection).
pub fn listen(
    path: &Path,
    out: mpsc::Sender<PodReport>,
    queries: mpsc::Sender<Query>,
) -> Result<(), LocalApiError> {
    let bind = |source| LocalApiError::Bind {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).map_err(bind)?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let out = out.clone();
            let queries = queries.clone();
            tokio::spawn(async move {
                let (rd, mut wr) = stream.into_split();
                let mut lines = tokio::io::BufReader::new(rd).lines();
                let read = tokio::time::timeout(Duration::from_secs(2), lines.next_line()).await;
                let Ok(Ok(Some(line))) = read else { return };
                let op = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v.get("op").and_then(|o| o.as_str()).map(str::to_string));
                match op.as_deref() {
                    Some("add") | Some("del") => match serde_json::from_str::<PodReport>(&line) {
                        Ok(r) => {
                            let _ = out.send(r).await;
                        }
                        Err(e) => tracing::warn!(error = %e, "malformed report on the local API"),
                    },
                    Some(what) => {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        let request = serde_json::from_str(&line).unwrap_or_default();
                        let _ = queries
                            .send(Query {
                                what: what.to_string(),
                                request,
                                reply: tx,
                            })
                            .await;
                        let answer = tokio::time::timeout(Duration::from_secs(10), rx)
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .unwrap_or_else(
                                || serde_json::json!({"error": "the agent did not answer"}),
                            );
                        let mut bytes = serde_json::to_vec(&answer).unwrap_or_default();
                        bytes.push(b'\n');
                        use tokio::io::AsyncWriteExt;
                        let _ = wr.write_all(&bytes).await;
                    }
                    None => tracing::warn!("malformed line on the local API"),
                }
            });
        }
    });
    Ok(())
}

/// What became of a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reported {
    /// The Pod's status was updated.
    Updated,
    /// The Pod already said so.
    Unchanged,
    /// Not a Kubernetes pod (no namespace/name, or unknown to the API): nothing to do.
    NotAPod,
}

/// Report a pod's network to the control plane: on `add`, its IP, phase
/// Running and Ready (weft has no probes of its own); on `del`, clear the IP
/// if it is still this one. Pods the API does not know (a container started
/// outside Kubernetes) are ignored.
pub async fn report(ep: &Endpoint, r: &PodReport) -> Result<Reported, ClientError> {
    if r.pod_namespace.is_empty() || r.pod_name.is_empty() {
        return Ok(Reported::NotAPod);
    }
    let path = format!("/api/v1/namespaces/{}/pods/{}", r.pod_namespace, r.pod_name);
    let pod = match ep.call(Method::GET, &path, None).await {
        Ok((_, body)) => body,
        Err(ClientError::Status { code: 404, .. }) => return Ok(Reported::NotAPod),
        Err(e) => return Err(e),
    };
    let mut pod: serde_json::Value =
        serde_json::from_slice(&pod).map_err(|source| ClientError::Frame {
            server: ep.authority.clone(),
            source,
        })?;
    let ip = r.address().to_string();
    let status = &mut pod["status"];
    match r.op.as_str() {
        "add" => {
            if status["podIP"] == ip.as_str() && status["phase"] == "Running" {
                return Ok(Reported::Unchanged);
            }
            status["podIP"] = ip.clone().into();
            status["podIPs"] = serde_json::json!([{"ip": ip}]);
            status["phase"] = "Running".into();
            status["conditions"] = serde_json::json!([
                {"type": "Ready", "status": "True"},
                {"type": "ContainersReady", "status": "True"},
                {"type": "PodReadyToStartContainers", "status": "True"}
            ]);
        }
        "del" => {
            if status["podIP"] != ip.as_str() {
                return Ok(Reported::Unchanged);
            }
            if let Some(s) = status.as_object_mut() {
                s.remove("podIP");
                s.remove("podIPs");
            }
            status["conditions"] = serde_json::json!([{"type": "Ready", "status": "False", "reason": "NetworkRemoved"}]);
        }
        _ => return Ok(Reported::NotAPod),
    }
    ep.call(
        Method::PUT,
        &format!("{path}/status"),
        Some(Bytes::from(pod.to_string())),
    )
    .await
    .map(|_| Reported::Updated)
}

/// Pods recorded in the CNI plugin's IPAM claims (`<ipamDir>/<network>/<ip>`,
/// docs/cni.md), as `add` reports: how the agent learns about pods wired while
/// it was away.
pub fn claims(dir: &Path) -> Vec<PodReport> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.parse::<std::net::Ipv4Addr>().is_err() {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let Some(claim) = weft_model::node_state::Claim::decode(&text) else {
            continue;
        };
        let r = PodReport {
            op: "add".into(),
            container_id: claim.container_id,
            ifname: claim.ifname,
            ip: name,
            pod_namespace: claim.pod.namespace.unwrap_or_default(),
            pod_name: claim.pod.name.unwrap_or_default(),
        };
        if !r.pod_name.is_empty() {
            out.push(r);
        }
    }
    out.sort_by(|a, b| a.ip.cmp(&b.ip));
    out
}

/// Default socket path.
pub fn default_socket() -> PathBuf {
    PathBuf::from("/run/weft/agent.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_parses_plugin_line() {
        let r: PodReport = serde_json::from_str(
            r#"{"op":"add","containerID":"abc","ifname":"eth0","netns":"/run/netns/x","ip":"198.18.128.5/24","podNamespace":"shop","podName":"web-1","podUID":"u"}"#,
        )
        .unwrap();
        assert_eq!(r.address(), "198.18.128.5");
        assert_eq!(
            (r.pod_namespace.as_str(), r.pod_name.as_str()),
            ("shop", "web-1")
        );
    }

    #[test]
    fn claims_become_reports() {
        let dir = std::env::temp_dir().join(format!("weft-claims-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("198.18.128.5"),
            "cid1\neth0\nnetns=/run/netns/x\npodNamespace=shop\npodName=web-1\n",
        )
        .unwrap();
        std::fs::write(dir.join("198.18.128.6"), "cid2\neth0\n").unwrap();
        std::fs::write(dir.join("lock"), "").unwrap();
        let got = claims(&dir);
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].ip.as_str(), got[0].pod_name.as_str()),
            ("198.18.128.5", "web-1")
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn socket_forwards_reports() {
        let path = std::env::temp_dir().join(format!("weft-agent-sock-{}", std::process::id()));
        let (tx, mut rx) = mpsc::channel(4);
        let (qtx, mut qrx) = mpsc::channel(4);
        listen(&path, tx, qtx).unwrap();
        tokio::spawn(async move {
            while let Some(q) = qrx.recv().await {
                let _ = q.reply.send(serde_json::json!({"asked": q.what}));
            }
        });
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let mut c = tokio::net::UnixStream::connect(&path).await.unwrap();
        c.write_all(b"{\"op\":\"overlay\"}\n").await.unwrap();
        let mut answer = String::new();
        tokio::io::BufReader::new(c)
            .read_line(&mut answer)
            .await
            .unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&answer).unwrap()["asked"],
            "overlay"
        );
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        s.write_all(b"{\"op\":\"del\",\"containerID\":\"c1\",\"ip\":\"198.18.128.9\"}\n")
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.op, "del");
        assert_eq!(got.container_id, "c1");
        let _ = std::fs::remove_file(path);
    }
}
