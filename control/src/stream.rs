//! The per-node push stream: a Reset snapshot, then the ordered deltas of the
//! compiled view. Each delta is encoded once and the same bytes go to every
//! subscriber; a bounded history lets a client that reconnects with
//! `?since=REV` resume without a snapshot.

use crate::state::Control;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use weft_model::view::wire;
use weft_model::StreamFrame;

/// One encoded delta frame.
#[derive(Clone, Debug)]
pub struct Encoded {
    pub rev: u64,
    pub bytes: Bytes,
}

pub struct ViewHub {
    deltas: VecDeque<Encoded>,
    cap: usize,
    /// Every view change with a revision above `base` is in `deltas`.
    base: u64,
    /// Newest published revision.
    head: u64,
    tx: broadcast::Sender<Encoded>,
    /// Frames encoded, bytes encoded (for metrics).
    pub encoded_frames: u64,
    pub encoded_bytes: u64,
}

impl ViewHub {
    pub fn new(rev: u64, cap: usize) -> Self {
        let (tx, _) = broadcast::channel(1024);
        ViewHub {
            deltas: VecDeque::new(),
            cap: cap.max(1),
            base: rev,
            head: rev,
            tx,
            encoded_frames: 0,
            encoded_bytes: 0,
        }
    }

    pub fn head(&self) -> u64 {
        self.head
    }

    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Publish the view changes of a durable revision (encoded once, shared by all).
    pub fn publish(&mut self, rev: u64, changes: Vec<Bytes>) {
        self.head = self.head.max(rev);
        if changes.is_empty() {
            return;
        }
        let bytes = Bytes::from(wire::delta(rev, changes.iter().map(|c| c.as_ref())));
        self.encoded_frames += 1;
        self.encoded_bytes += bytes.len() as u64;
        let e = Encoded { rev, bytes };
        self.deltas.push_back(e.clone());
        while self.deltas.len() > self.cap {
            if let Some(old) = self.deltas.pop_front() {
                self.base = old.rev;
            }
        }
        let _ = self.tx.send(e);
    }

    /// Deltas after `since` if the history covers it, with a live receiver.
    fn resume(&self, since: u64) -> Option<(Vec<Encoded>, broadcast::Receiver<Encoded>)> {
        if since < self.base || since > self.head {
            return None;
        }
        let out = self
            .deltas
            .iter()
            .filter(|d| d.rev > since)
            .cloned()
            .collect();
        Some((out, self.tx.subscribe()))
    }
}

const PING_EVERY: Duration = Duration::from_secs(10);

/// Start a stream for one subscriber; frames arrive on the returned channel.
pub fn open(control: Arc<Control>, since: Option<u64>) -> mpsc::Receiver<Bytes> {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        if let Err(e) = run(control, since, tx).await {
            tracing::debug!(reason = e, "stream closed");
        }
    });
    rx
}

/// Reset (snapshot) and subscription, consistent: the receiver sees every delta after the snapshot.
fn reset(control: &Arc<Control>) -> (u64, Bytes, broadcast::Receiver<Encoded>) {
    let rx = control
        .hub
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .tx
        .subscribe();
    let (rev, bytes) = control.snapshot();
    (rev, bytes, rx)
}

async fn run(
    control: Arc<Control>,
    since: Option<u64>,
    tx: mpsc::Sender<Bytes>,
) -> Result<(), &'static str> {
    let resumed = since.and_then(|s| {
        control
            .hub
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .resume(s)
            .map(|(d, rx)| (s, d, rx))
    });
    let (mut last, mut rx) = match resumed {
        Some((s, deltas, rx)) => {
            let mut last = s;
            for d in deltas {
                last = d.rev;
                tx.send(d.bytes).await.map_err(|_| "client gone")?;
            }
            (last, rx)
        }
        None => {
            let (rev, bytes, rx) = reset(&control);
            wait_durable(&control, rev).await?;
            tx.send(bytes).await.map_err(|_| "client gone")?;
            (rev, rx)
        }
    };
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Ok(d) => {
                    if d.rev > last {
                        last = d.rev;
                        tx.send(d.bytes).await.map_err(|_| "client gone")?;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // Too far behind to catch up from deltas: start over from a snapshot.
                    tracing::info!(skipped = n, "stream subscriber lagged; sending a reset");
                    let (rev, bytes, new_rx) = reset(&control);
                    wait_durable(&control, rev).await?;
                    rx = new_rx;
                    last = rev;
                    tx.send(bytes).await.map_err(|_| "client gone")?;
                }
                Err(broadcast::error::RecvError::Closed) => return Err("hub closed"),
            },
            _ = ping.tick() => {
                let frame = Bytes::from(StreamFrame::Ping { rev: last }.encode());
                tx.send(frame).await.map_err(|_| "client gone")?;
            }
            _ = tx.closed() => return Err("client gone"),
        }
    }
}

async fn wait_durable(control: &Arc<Control>, rev: u64) -> Result<(), &'static str> {
    let mut d = control.durable();
    crate::store::wait_durable(&mut d, rev)
        .await
        .map_err(|_| "store failed")
}
