//! Watch fan-out: durable events in revision order, a bounded history for
//! `?watch=1&resourceVersion=N` resumption, and a broadcast for live watchers.

use crate::state::WatchEvent;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::broadcast;

pub struct WatchHub {
    history: VecDeque<Arc<WatchEvent>>,
    cap: usize,
    /// Every event with a revision above `base` is in `history`.
    base: u64,
    tx: broadcast::Sender<Arc<WatchEvent>>,
}

/// Where a watch starting at a revision begins.
pub enum Resume {
    /// Events after the requested revision, then the live receiver.
    From(Vec<Arc<WatchEvent>>, broadcast::Receiver<Arc<WatchEvent>>),
    /// The revision is older than the history kept.
    Gone { oldest: u64 },
}

impl WatchHub {
    pub fn new(rev: u64, cap: usize) -> Self {
        let (tx, _) = broadcast::channel(4096);
        WatchHub {
            history: VecDeque::new(),
            cap: cap.max(1),
            base: rev,
            tx,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<WatchEvent>> {
        self.tx.subscribe()
    }

    pub fn publish(&mut self, events: &[Arc<WatchEvent>]) {
        for e in events {
            self.history.push_back(e.clone());
            let _ = self.tx.send(e.clone());
        }
        while self.history.len() > self.cap {
            if let Some(e) = self.history.pop_front() {
                self.base = e.rev;
            }
        }
        // Events of one revision are never split: drop the rest of a partly-evicted revision.
        while self.history.front().is_some_and(|e| e.rev <= self.base) {
            self.history.pop_front();
        }
    }

    pub fn resume(&self, since: u64) -> Resume {
        if since < self.base {
            return Resume::Gone { oldest: self.base };
        }
        let events = self
            .history
            .iter()
            .filter(|e| e.rev > since)
            .cloned()
            .collect();
        Resume::From(events, self.tx.subscribe())
    }
}
