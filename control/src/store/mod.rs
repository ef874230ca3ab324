//! The control plane's persistence seam.
//!
//! This module owns the [`Store`] trait — the only way the control plane
//! persists state — plus two implementations: [`EmbeddedStore`] (a snapshot
//! file and an append-only write-ahead log in a local directory; etcd comes
//! later behind the same trait) and [`MemoryStore`] (an in-memory fake for
//! unit tests).
//!
//! # Durability contract
//!
//! The caller applies a transaction to its in-memory state, [`Store::submit`]s
//! it (under its state lock, so queue order equals revision order) and only
//! acknowledges the write to its client after [`wait_durable`] returns `Ok`.
//! A store publishes a revision through [`Store::durable`] only after the
//! bytes that hold it have been written *and* flushed to stable storage
//! (`fdatasync`), so a transaction reported durable survives `kill -9` and
//! power loss. Revisions become durable in order: `Durable { rev: n }` means
//! every submitted transaction with `rev <= n` is durable.
//!
//! Once a store reports `failed`, it will make nothing more durable: later
//! submits fail with [`StoreError::Failed`], and the process should stop
//! serving writes (restart re-reads what reached the disk).

mod embedded;

pub use embedded::{EmbeddedOptions, EmbeddedStore};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use tokio::sync::watch;

/// One atomic transaction. Revisions strictly increase from one submitted
/// transaction to the next (gaps are allowed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Txn {
    pub rev: u64,
    pub ops: Vec<Op>,
}

/// One change inside a [`Txn`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: Bytes },
    Delete { key: String },
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
        }
    }

    pub fn delete(key: impl Into<String>) -> Self {
        Op::Delete { key: key.into() }
    }

    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// The full stored state at revision `rev`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub rev: u64,
    pub entries: BTreeMap<String, Bytes>,
}

impl Snapshot {
    /// Apply one transaction's operations (does not check revision order).
    pub fn apply(&mut self, txn: &Txn) {
        apply_ops(&mut self.entries, &txn.ops);
        self.rev = txn.rev;
    }
}

pub(crate) fn apply_ops(entries: &mut BTreeMap<String, Bytes>, ops: &[Op]) {
    for op in ops {
        match op {
            Op::Put { key, value } => {
                entries.insert(key.clone(), value.clone());
            }
            Op::Delete { key } => {
                entries.remove(key);
            }
        }
    }
}

/// Highest revision on stable storage. `failed` is set once the store is
/// broken (write or fsync error): nothing more will be made durable.
#[derive(Clone, Debug, PartialEq)]
pub struct Durable {
    pub rev: u64,
    pub failed: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is corrupt at byte offset {offset}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("store directory {} is locked by another process", path.display())]
    Locked { path: PathBuf },
    #[error("store failed, nothing more will be made durable: {0}")]
    Failed(String),
    #[error("transaction rev {rev} is not greater than the last submitted rev {last}")]
    RevOrder { last: u64, rev: u64 },
    #[error("record at rev {rev} is {bytes} bytes, over the limit of {max} bytes")]
    TooLarge { rev: u64, bytes: u64, max: u64 },
    #[error("store was closed before rev {rev} became durable")]
    Closed { rev: u64 },
    #[error("store used out of order: {0}")]
    Misuse(&'static str),
}

/// Render an error with its whole `source()` chain, for `Durable::failed`
/// and log lines.
pub(crate) fn error_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

pub trait Store: Send + Sync + 'static {
    /// What is stored, at startup (called once before any submit).
    fn load(&mut self) -> Result<Snapshot, StoreError>;
    /// Queue a transaction; returns at once. Called with the caller's state
    /// lock held, so queue order == rev order.
    fn submit(&self, txn: Txn) -> Result<(), StoreError>;
    /// Watch of the highest revision on stable storage (after fdatasync).
    fn durable(&self) -> watch::Receiver<Durable>;
}

/// Wait until `rev` is durable (`Ok`), or the store failed or closed before
/// that (`Err`). A revision that became durable before a later failure is
/// still reported `Ok`: it is on disk.
pub async fn wait_durable(rx: &mut watch::Receiver<Durable>, rev: u64) -> Result<(), StoreError> {
    let waited = rx
        .wait_for(|d| d.rev >= rev || d.failed.is_some())
        .await
        .map(|d| d.clone());
    // On Err the sender is gone; the last published value still tells us
    // whether `rev` made it.
    let last = match waited {
        Ok(d) => d,
        Err(_) => rx.borrow().clone(),
    };
    if last.rev >= rev {
        Ok(())
    } else if let Some(reason) = last.failed {
        Err(StoreError::Failed(reason))
    } else {
        Err(StoreError::Closed { rev })
    }
}

/// In-memory fake for unit tests: every submit is durable at once.
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
    durable: watch::Sender<Durable>,
}

struct MemoryInner {
    snapshot: Snapshot,
    failed: Option<String>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store at rev 0.
    pub fn new() -> Self {
        Self::with_snapshot(Snapshot::default())
    }

    /// A store whose `load` returns `snapshot`.
    pub fn with_snapshot(snapshot: Snapshot) -> Self {
        let durable = watch::Sender::new(Durable {
            rev: snapshot.rev,
            failed: None,
        });
        MemoryStore {
            inner: Mutex::new(MemoryInner {
                snapshot,
                failed: None,
            }),
            durable,
        }
    }

    /// Current state (everything submitted so far).
    pub fn snapshot(&self) -> Snapshot {
        self.lock().snapshot.clone()
    }

    /// Simulate a broken disk: publish `failed` and reject later submits.
    pub fn fail(&self, reason: impl Into<String>) {
        let reason = reason.into();
        let mut inner = self.lock();
        inner.failed = Some(reason.clone());
        let rev = inner.snapshot.rev;
        self.durable.send_replace(Durable {
            rev,
            failed: Some(reason),
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Store for MemoryStore {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        Ok(self.snapshot())
    }

    fn submit(&self, txn: Txn) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if let Some(reason) = &inner.failed {
            return Err(StoreError::Failed(reason.clone()));
        }
        if txn.rev <= inner.snapshot.rev {
            return Err(StoreError::RevOrder {
                last: inner.snapshot.rev,
                rev: txn.rev,
            });
        }
        inner.snapshot.apply(&txn);
        self.durable.send_replace(Durable {
            rev: txn.rev,
            failed: None,
        });
        Ok(())
    }

    fn durable(&self) -> watch::Receiver<Durable> {
        self.durable.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_basics() {
        let mut store = MemoryStore::new();
        assert_eq!(store.load().unwrap(), Snapshot::default());
        let mut rx = store.durable();
        store
            .submit(Txn {
                rev: 1,
                ops: vec![Op::put("a", "1"), Op::put("b", "2")],
            })
            .unwrap();
        store
            .submit(Txn {
                rev: 2,
                ops: vec![Op::delete("a")],
            })
            .unwrap();
        wait_durable(&mut rx, 2).await.unwrap();
        let snap = store.snapshot();
        assert_eq!(snap.rev, 2);
        assert_eq!(
            snap.entries.into_iter().collect::<Vec<_>>(),
            vec![("b".to_string(), Bytes::from("2"))]
        );

        // Revisions must increase.
        let err = store
            .submit(Txn {
                rev: 2,
                ops: vec![],
            })
            .unwrap_err();
        assert!(
            matches!(err, StoreError::RevOrder { last: 2, rev: 2 }),
            "{err}"
        );

        // A failure is reported to waiters and to later submits; revisions
        // that were durable before it stay Ok.
        store.fail("disk on fire");
        let err = wait_durable(&mut rx, 3).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Failed(r) if r == "disk on fire"),
            "{err}"
        );
        wait_durable(&mut rx, 2).await.unwrap();
        let err = store
            .submit(Txn {
                rev: 3,
                ops: vec![],
            })
            .unwrap_err();
        assert!(matches!(err, StoreError::Failed(_)), "{err}");
    }

    #[tokio::test]
    async fn wait_durable_reports_close() {
        let (tx, mut rx) = watch::channel(Durable {
            rev: 4,
            failed: None,
        });
        drop(tx);
        wait_durable(&mut rx, 4).await.unwrap();
        let err = wait_durable(&mut rx, 5).await.unwrap_err();
        assert!(matches!(err, StoreError::Closed { rev: 5 }), "{err}");
    }

    #[test]
    fn error_text_includes_source() {
        let err = StoreError::Io {
            path: PathBuf::from("/x/wal"),
            op: "fsync",
            source: std::io::Error::other("boom"),
        };
        assert_eq!(error_text(&err), "fsync /x/wal: boom");
    }
}
