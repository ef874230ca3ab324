//! The sync client: follows `GET /weft/v1/nodes/{node}/stream`, applies
//! Reset and Delta frames to a [`NodeView`], and reconnects with
//! `?since=REV` so a short outage costs only the missed deltas.

use crate::client::{ClientError, Endpoint, LineReader};
use hyper::Method;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;
use weft_model::{NodeView, StreamFrame};

/// An open stream.
pub struct Stream {
    lines: LineReader,
    server: String,
}

impl Stream {
    /// Open the stream of `node`, resuming after `since` if given.
    pub async fn open(
        ep: &Endpoint,
        node: &str,
        since: Option<u64>,
    ) -> Result<Stream, ClientError> {
        let path = match since {
            Some(rev) => format!("/weft/v1/nodes/{node}/stream?since={rev}"),
            None => format!("/weft/v1/nodes/{node}/stream"),
        };
        let resp = ep.send(Method::GET, &path, None).await?;
        let code = resp.status().as_u16();
        if code != 200 {
            let mut lines = LineReader::new(resp.into_body());
            let body = lines.next_line().await.ok().flatten().unwrap_or_default();
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| {
                    v.get("message")
                        .and_then(|m| m.as_str())
                        .map(str::to_string)
                })
                .unwrap_or_default();
            return Err(ClientError::Status {
                method: "GET".into(),
                path,
                code,
                message,
            });
        }
        Ok(Stream {
            lines: LineReader::new(resp.into_body()),
            server: format!("http://{}", ep.authority),
        })
    }

    /// The next frame as raw bytes (one JSON line), or `None` when the server closed the stream.
    pub async fn next_raw(&mut self) -> Result<Option<bytes::Bytes>, ClientError> {
        self.lines
            .next_line()
            .await
            .map_err(|source| ClientError::Http {
                server: self.server.clone(),
                source,
            })
    }

    /// The next decoded frame.
    pub async fn next_frame(&mut self) -> Result<Option<StreamFrame>, ClientError> {
        match self.next_raw().await? {
            None => Ok(None),
            Some(line) => {
                StreamFrame::decode(&line)
                    .map(Some)
                    .map_err(|source| ClientError::Frame {
                        server: self.server.clone(),
                        source,
                    })
            }
        }
    }
}

/// The view an agent holds, shared with its consumers. Readers take the lock
/// briefly; the sync loop applies each frame in place (no copy of the view).
pub type SharedView = Arc<RwLock<NodeView>>;

pub use weft_model::view::ViewChanges;

/// A consumer's changes, noted by [`follow`] and taken by the consumer.
pub type SharedChanges = Arc<std::sync::Mutex<ViewChanges>>;

/// Take what accumulated, leaving nothing.
pub fn take(changes: &SharedChanges) -> ViewChanges {
    std::mem::take(&mut *changes.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Follow the stream forever, applying frames to `view`, noting what changed
/// for each consumer (service dataplane, DNS) and announcing each new
/// revision on `revs`. Reconnects with backoff; resumes from the held revision.
pub async fn follow(
    ep: Endpoint,
    node: String,
    view: SharedView,
    revs: watch::Sender<u64>,
    consumers: Vec<SharedChanges>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let since = {
            let v = view.read().unwrap_or_else(|p| p.into_inner());
            v.synced.then_some(v.rev)
        };
        match Stream::open(&ep, &node, since).await {
            Ok(mut stream) => {
                backoff = Duration::from_millis(200);
                match since {
                    Some(rev) => tracing::info!(
                        since = rev,
                        "stream opened; resuming after the revision held"
                    ),
                    None => tracing::info!("stream opened; waiting for a snapshot"),
                }
                loop {
                    match stream.next_frame().await {
                        Ok(Some(StreamFrame::Ping { .. })) => {}
                        Ok(Some(frame)) => {
                            let rev = frame.rev();
                            let mut noted = ViewChanges::default();
                            noted.record(&frame);
                            let applied =
                                view.write().unwrap_or_else(|p| p.into_inner()).apply(frame);
                            if let Err(e) = applied {
                                tracing::warn!(error = %e, rev, "frame out of order; starting over");
                                *view.write().unwrap_or_else(|p| p.into_inner()) =
                                    NodeView::default();
                                for changed in &consumers {
                                    changed.lock().unwrap_or_else(|p| p.into_inner()).all = true;
                                }
                                break;
                            }
                            {
                                // After the view holds the change, before
                                // consumers are woken.
                                for changed in &consumers {
                                    changed
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .merge(&noted);
                                }
                            }
                            let _ = revs.send(rev);
                        }
                        Ok(None) => {
                            tracing::info!("stream closed by the control plane");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "stream broke");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot open the stream")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
