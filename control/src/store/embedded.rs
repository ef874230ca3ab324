//! Embedded durable store: a snapshot file plus an append-only write-ahead
//! log (WAL) in one directory, written by one dedicated thread.
//!
//! Directory layout:
//! - `LOCK`: held with an exclusive `flock` for the store's lifetime so two
//!   servers never share the directory.
//! - `snapshot`: the full state at some revision. Written to `snapshot.tmp`,
//!   `fdatasync`ed, renamed over `snapshot`, then the directory is fsynced,
//!   so `snapshot` is always either the old or the new complete file.
//! - `wal`: transactions after (and possibly before) the snapshot's revision.
//!
//! Record framing (both files): `[u32 LE payload len][u32 LE crc32(payload)][payload]`.
//! - WAL payload: `u64 rev, u32 op count`, then per op `u8 tag (1 put, 2 delete),
//!   u32 key len, key`, and for a put `u32 value len, value`. All LE.
//! - Snapshot file: magic `WEFTSNAP1`, then one record whose payload is
//!   `u64 rev, u64 count`, then per entry `u32 key len, key, u32 value len, value`.
//!
//! Durability: the writer thread drains every queued transaction (group
//! commit), appends them with one `write_all`, calls `sync_data` once, and
//! only then publishes the last revision as durable. A transaction reported
//! durable has therefore reached stable storage and survives `kill -9` and
//! power loss. A crash mid-append can only leave a torn tail after the last
//! synced record; `load` detects it (short record, bad length, bad CRC) and
//! truncates it — those transactions were never reported durable.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::watch;

use super::{apply_ops, error_text, Durable, Op, Snapshot, Store, StoreError, Txn};

/// Largest WAL record accepted (written or read). Checked before allocating,
/// so a corrupt length field cannot make recovery allocate gigabytes.
const MAX_RECORD: u64 = 256 << 20;
/// Stop draining the queue into one group commit beyond this many bytes, to
/// bound the writer's buffer; the rest goes into the next batch.
const MAX_BATCH_BYTES: usize = 32 << 20;
/// Record header: payload length + CRC.
const HEADER_LEN: u64 = 8;
/// Smallest valid WAL payload (rev + op count). A smaller length can only be
/// a torn tail — notably a zero-filled tail (len 0, crc 0 is a "valid" CRC).
const MIN_WAL_PAYLOAD: u64 = 12;
const SNAPSHOT_MAGIC: &[u8] = b"WEFTSNAP1";
const TAG_PUT: u8 = 1;
const TAG_DELETE: u8 = 2;

const LOCK_FILE: &str = "LOCK";
const WAL_FILE: &str = "wal";
const SNAPSHOT_FILE: &str = "snapshot";
const SNAPSHOT_TMP_FILE: &str = "snapshot.tmp";

#[derive(Clone, Debug)]
pub struct EmbeddedOptions {
    /// Write a snapshot and truncate the WAL once the WAL exceeds this size.
    pub compact_after_bytes: u64,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            compact_after_bytes: 64 << 20,
        }
    }
}

/// Durable store in a local directory; see the module docs.
pub struct EmbeddedStore {
    dir: PathBuf,
    opts: EmbeddedOptions,
    /// Held (and locked) for the store's lifetime; released when dropped,
    /// which is after `Drop::drop` joined the writer.
    _lock: File,
    /// Until `load`, the sender lives here; then it moves to the writer.
    durable_tx: Option<watch::Sender<Durable>>,
    durable_rx: watch::Receiver<Durable>,
    /// Last submitted rev, and the queue. One mutex so that rev checking and
    /// enqueueing are atomic: queue order is rev order even if callers race.
    queue: Mutex<Queue>,
    writer: Option<JoinHandle<()>>,
    #[cfg(test)]
    fault: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

struct Queue {
    last_rev: u64,
    tx: Option<mpsc::Sender<Txn>>,
}

impl EmbeddedStore {
    /// Create `dir` if missing and lock it. Nothing is read until `load`.
    pub fn open(dir: &Path, opts: EmbeddedOptions) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(io_err(dir, "create directory"))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_err(&lock_path, "open lock file"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked { path: lock_path });
            }
            Err(fs::TryLockError::Error(source)) => {
                return Err(StoreError::Io {
                    path: lock_path,
                    op: "lock",
                    source,
                });
            }
        }
        let (durable_tx, durable_rx) = watch::channel(Durable {
            rev: 0,
            failed: None,
        });
        Ok(EmbeddedStore {
            dir: dir.to_path_buf(),
            opts,
            _lock: lock,
            durable_tx: Some(durable_tx),
            durable_rx,
            queue: Mutex::new(Queue {
                last_rev: 0,
                tx: None,
            }),
            writer: None,
            #[cfg(test)]
            fault: Default::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Read the snapshot and replay the WAL, truncating a torn tail. Makes
    /// what was read durable (a record written but not yet synced by a
    /// killed process may still only be in the page cache) before returning
    /// it, so nothing we hand out can vanish on power loss.
    fn recover(&self) -> Result<(Snapshot, File, u64), StoreError> {
        let tmp_path = self.dir.join(SNAPSHOT_TMP_FILE);
        match fs::remove_file(&tmp_path) {
            Ok(()) => tracing::info!(path = %tmp_path.display(), "removed unfinished snapshot"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&tmp_path, "remove")(e)),
        }

        let snap_path = self.dir.join(SNAPSHOT_FILE);
        let mut snapshot = match fs::read(&snap_path) {
            Ok(data) => decode_snapshot(&snap_path, Bytes::from(data))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Snapshot::default(),
            Err(e) => return Err(io_err(&snap_path, "read")(e)),
        };
        let snapshot_rev = snapshot.rev;

        let wal_path = self.dir.join(WAL_FILE);
        // Append mode: every write goes to the end, also after set_len(0).
        let wal = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&wal_path)
            .map_err(io_err(&wal_path, "open"))?;
        let scan = replay_wal(&wal_path, &wal, &mut snapshot)?;
        if scan.good_len < scan.file_len {
            tracing::warn!(
                path = %wal_path.display(),
                offset = scan.good_len,
                bytes_dropped = scan.file_len - scan.good_len,
                reason = %scan.tail_reason,
                "truncating torn WAL tail (crash during append; those transactions were never acknowledged)"
            );
            wal.set_len(scan.good_len)
                .map_err(io_err(&wal_path, "truncate torn tail of"))?;
        }
        wal.sync_data().map_err(io_err(&wal_path, "fsync"))?;
        // Makes a freshly created WAL's directory entry durable too.
        sync_dir(&self.dir)?;
        tracing::info!(
            dir = %self.dir.display(),
            snapshot_rev,
            rev = snapshot.rev,
            replayed = scan.replayed,
            entries = snapshot.entries.len(),
            "store loaded"
        );
        Ok((snapshot, wal, scan.good_len))
    }

    #[cfg(test)]
    fn inject_write_fault(&self) {
        self.fault.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Store for EmbeddedStore {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        let Some(durable_tx) = self.durable_tx.take() else {
            return Err(StoreError::Misuse("load called twice"));
        };
        let (snapshot, wal, wal_len) = match self.recover() {
            Ok(r) => r,
            Err(e) => {
                // Allow a retry after e.g. a transient read error.
                self.durable_tx = Some(durable_tx);
                return Err(e);
            }
        };
        durable_tx.send_replace(Durable {
            rev: snapshot.rev,
            failed: None,
        });
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            dir: self.dir.clone(),
            wal_path: self.dir.join(WAL_FILE),
            wal,
            wal_len,
            state: snapshot.entries.clone(),
            rev: snapshot.rev,
            compact_after_bytes: self.opts.compact_after_bytes,
            durable: durable_tx,
            rx,
            buf: Vec::new(),
            #[cfg(test)]
            fault: self.fault.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("weft-wal".into())
            .spawn(move || writer.run())
            .map_err(io_err(&self.dir, "spawn WAL writer thread for"))?;
        self.writer = Some(handle);
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.last_rev = snapshot.rev;
        queue.tx = Some(tx);
        Ok(snapshot)
    }

    fn submit(&self, txn: Txn) -> Result<(), StoreError> {
        if let Some(reason) = &self.durable_rx.borrow().failed {
            return Err(StoreError::Failed(reason.clone()));
        }
        let bytes = encoded_txn_len(&txn);
        if bytes > MAX_RECORD {
            return Err(StoreError::TooLarge {
                rev: txn.rev,
                bytes,
                max: MAX_RECORD,
            });
        }
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(tx) = &queue.tx else {
            return Err(StoreError::Misuse("submit before load"));
        };
        if txn.rev <= queue.last_rev {
            return Err(StoreError::RevOrder {
                last: queue.last_rev,
                rev: txn.rev,
            });
        }
        let rev = txn.rev;
        if tx.send(txn).is_err() {
            // The writer stopped: it failed (and published why) or panicked.
            let reason = self
                .durable_rx
                .borrow()
                .failed
                .clone()
                .unwrap_or_else(|| "WAL writer thread stopped".to_string());
            return Err(StoreError::Failed(reason));
        }
        queue.last_rev = rev;
        Ok(())
    }

    fn durable(&self) -> watch::Receiver<Durable> {
        self.durable_rx.clone()
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish what is queued and exit.
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tx
            .take();
        if let Some(handle) = self.writer.take() {
            if handle.join().is_err() {
                tracing::error!(dir = %self.dir.display(), "WAL writer thread panicked");
            }
        }
    }
}

/// The writer thread's state. It alone writes the WAL and snapshot after
/// `load`, and keeps its own copy of the state (values are `Bytes`, so this
/// shares memory with the caller's) to write snapshots from.
struct Writer {
    dir: PathBuf,
    wal_path: PathBuf,
    wal: File,
    wal_len: u64,
    state: BTreeMap<String, Bytes>,
    /// Last durable rev.
    rev: u64,
    compact_after_bytes: u64,
    durable: watch::Sender<Durable>,
    rx: mpsc::Receiver<Txn>,
    buf: Vec<u8>,
    #[cfg(test)]
    fault: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Writer {
    fn run(mut self) {
        // A WAL recovered over the threshold (e.g. compaction kept failing
        // before a restart) is compacted before taking new work.
        if self.wal_len > self.compact_after_bytes {
            if let Err(e) = self.compact() {
                return self.fail(e);
            }
        }
        while let Ok(first) = self.rx.recv() {
            if let Err(e) = self.commit_batch(first) {
                return self.fail(e);
            }
        }
        tracing::debug!(rev = self.rev, "WAL writer exiting");
    }

    /// Group commit: everything queued now goes out with one write and one
    /// fdatasync.
    fn commit_batch(&mut self, first: Txn) -> Result<(), StoreError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        encode_txn(&mut buf, &first);
        let mut batch = vec![first];
        while buf.len() < MAX_BATCH_BYTES {
            match self.rx.try_recv() {
                Ok(txn) => {
                    encode_txn(&mut buf, &txn);
                    batch.push(txn);
                }
                Err(_) => break,
            }
        }

        self.append(&buf)?;
        self.wal_len += buf.len() as u64;
        // Don't keep one huge batch's buffer around forever.
        if buf.capacity() <= 4 << 20 {
            self.buf = buf;
        }

        for txn in &batch {
            apply_ops(&mut self.state, &txn.ops);
            self.rev = txn.rev;
        }
        // Only now, after sync_data, may anyone learn these revs are durable.
        self.durable.send_replace(Durable {
            rev: self.rev,
            failed: None,
        });

        if self.wal_len > self.compact_after_bytes {
            self.compact()?;
        }
        Ok(())
    }

    fn append(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        #[cfg(test)]
        if self.fault.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(io_err(&self.wal_path, "append to")(io::Error::other(
                "injected write fault",
            )));
        }
        self.wal
            .write_all(buf)
            .map_err(io_err(&self.wal_path, "append to"))?;
        self.wal
            .sync_data()
            .map_err(io_err(&self.wal_path, "fsync"))
    }

    /// Write a snapshot of the current (durable) state, then empty the WAL.
    /// A crash after the rename but before the truncation is harmless:
    /// replay skips WAL records with rev <= the snapshot's rev.
    fn compact(&mut self) -> Result<(), StoreError> {
        let tmp_path = self.dir.join(SNAPSHOT_TMP_FILE);
        let snap_path = self.dir.join(SNAPSHOT_FILE);

        let mut summary = CrcCounter::default();
        write_snapshot_payload(&mut summary, self.rev, &self.state)
            .map_err(io_err(&tmp_path, "encode snapshot"))?;
        let payload_len = u32::try_from(summary.len).map_err(|_| StoreError::TooLarge {
            rev: self.rev,
            bytes: summary.len,
            max: u32::MAX.into(),
        })?;

        let file = File::create(&tmp_path).map_err(io_err(&tmp_path, "create"))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let write = |w: &mut BufWriter<File>| -> io::Result<()> {
            w.write_all(SNAPSHOT_MAGIC)?;
            w.write_all(&payload_len.to_le_bytes())?;
            w.write_all(&summary.hasher.clone().finalize().to_le_bytes())?;
            write_snapshot_payload(w, self.rev, &self.state)?;
            w.flush()
        };
        write(&mut w).map_err(io_err(&tmp_path, "write"))?;
        let file = w
            .into_inner()
            .map_err(|e| io_err(&tmp_path, "write")(e.into_error()))?;
        file.sync_data().map_err(io_err(&tmp_path, "fsync"))?;
        drop(file);
        fs::rename(&tmp_path, &snap_path).map_err(io_err(&snap_path, "rename snapshot.tmp to"))?;
        // The rename is only durable once the directory is synced; until
        // then the WAL must stay.
        sync_dir(&self.dir)?;

        self.wal
            .set_len(0)
            .map_err(io_err(&self.wal_path, "truncate"))?;
        self.wal
            .sync_data()
            .map_err(io_err(&self.wal_path, "fsync"))?;
        tracing::info!(
            rev = self.rev,
            entries = self.state.len(),
            snapshot_bytes = summary.len,
            wal_bytes = self.wal_len,
            "compacted WAL into snapshot"
        );
        self.wal_len = 0;
        Ok(())
    }

    fn fail(self, err: StoreError) {
        let reason = error_text(&err);
        tracing::error!(
            dir = %self.dir.display(),
            durable_rev = self.rev,
            error = %reason,
            "store failed; no further writes will be made durable"
        );
        self.durable.send_replace(Durable {
            rev: self.rev,
            failed: Some(reason),
        });
        // Returning drops `rx`: later submits see a closed channel.
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "fsync directory"))
}

// ---- encoding ----

fn encoded_txn_len(txn: &Txn) -> u64 {
    let ops: u64 = txn
        .ops
        .iter()
        .map(|op| match op {
            Op::Put { key, value } => 1 + 4 + key.len() as u64 + 4 + value.len() as u64,
            Op::Delete { key } => 1 + 4 + key.len() as u64,
        })
        .sum();
    8 + 4 + ops
}

/// Append one framed WAL record. The caller checked the size (`submit`
/// rejects records over `MAX_RECORD`, so every length fits in u32).
fn encode_txn(buf: &mut Vec<u8>, txn: &Txn) {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER_LEN as usize]);
    buf.extend_from_slice(&txn.rev.to_le_bytes());
    buf.extend_from_slice(&(txn.ops.len() as u32).to_le_bytes());
    for op in &txn.ops {
        match op {
            Op::Put { key, value } => {
                buf.push(TAG_PUT);
                put_bytes(buf, key.as_bytes());
                put_bytes(buf, value);
            }
            Op::Delete { key } => {
                buf.push(TAG_DELETE);
                put_bytes(buf, key.as_bytes());
            }
        }
    }
    let payload = &buf[start + HEADER_LEN as usize..];
    let len = (payload.len() as u32).to_le_bytes();
    let crc = crc32fast::hash(payload).to_le_bytes();
    buf[start..start + 4].copy_from_slice(&len);
    buf[start + 4..start + 8].copy_from_slice(&crc);
}

fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
    buf.extend_from_slice(b);
}

/// Snapshot payload, streamed: written once to a [`CrcCounter`] for the
/// header and once to the file, so no second copy of the state is built.
fn write_snapshot_payload(
    w: &mut impl Write,
    rev: u64,
    state: &BTreeMap<String, Bytes>,
) -> io::Result<()> {
    w.write_all(&rev.to_le_bytes())?;
    w.write_all(&(state.len() as u64).to_le_bytes())?;
    for (key, value) in state {
        for part in [key.as_bytes(), value.as_ref()] {
            let len = u32::try_from(part.len())
                .map_err(|_| io::Error::other("snapshot entry over 4 GiB"))?;
            w.write_all(&len.to_le_bytes())?;
            w.write_all(part)?;
        }
    }
    Ok(())
}

#[derive(Default)]
struct CrcCounter {
    hasher: crc32fast::Hasher,
    len: u64,
}

impl Write for CrcCounter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---- decoding ----

/// Bounds-checked reader over a payload; values are zero-copy slices.
struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    fn take(&mut self, n: usize, what: &str) -> Result<Bytes, String> {
        if self.buf.len() - self.pos < n {
            return Err(format!(
                "{what}: need {n} bytes, only {} left",
                self.buf.len() - self.pos
            ));
        }
        let out = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let b = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&b);
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn bytes(&mut self, what: &str) -> Result<Bytes, String> {
        let len = self.u32(what)? as usize;
        self.take(len, what)
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let b = self.bytes(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

/// Decode a WAL payload whose CRC matched. Any error here is real
/// corruption (or a format bug), not a torn write.
fn decode_txn(payload: Bytes) -> Result<Txn, (usize, String)> {
    let mut r = Reader {
        buf: payload,
        pos: 0,
    };
    let at = |r: &Reader, e: String| (r.pos, e);
    let rev = r.u64("rev").map_err(|e| at(&r, e))?;
    let count = r.u32("op count").map_err(|e| at(&r, e))? as usize;
    // Smallest op is 5 bytes: don't trust `count` for the allocation.
    let mut ops = Vec::with_capacity(count.min(r.remaining() / 5));
    for _ in 0..count {
        let op = (|| match r.u8("op tag")? {
            TAG_PUT => Ok(Op::Put {
                key: r.string("key")?,
                value: r.bytes("value")?,
            }),
            TAG_DELETE => Ok(Op::Delete {
                key: r.string("key")?,
            }),
            tag => Err(format!("unknown op tag {tag}")),
        })()
        .map_err(|e| at(&r, e))?;
        ops.push(op);
    }
    if r.remaining() != 0 {
        return Err((r.pos, format!("{} trailing bytes after ops", r.remaining())));
    }
    Ok(Txn { rev, ops })
}

fn decode_snapshot(path: &Path, data: Bytes) -> Result<Snapshot, StoreError> {
    let corrupt = |offset: usize, reason: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason,
    };
    if !data.starts_with(SNAPSHOT_MAGIC) {
        return Err(corrupt(0, "missing WEFTSNAP1 magic".into()));
    }
    let mut r = Reader {
        buf: data,
        pos: SNAPSHOT_MAGIC.len(),
    };
    let len = r.u32("record length").map_err(|e| corrupt(r.pos, e))? as usize;
    let crc = r.u32("record crc").map_err(|e| corrupt(r.pos, e))?;
    let payload_start = r.pos;
    if r.remaining() != len {
        return Err(corrupt(
            payload_start,
            format!(
                "record length {len} but {} bytes follow the header",
                r.remaining()
            ),
        ));
    }
    let payload = r.take(len, "payload").map_err(|e| corrupt(r.pos, e))?;
    let actual = crc32fast::hash(&payload);
    if actual != crc {
        return Err(corrupt(
            payload_start,
            format!("crc mismatch: header {crc:#010x}, payload {actual:#010x}"),
        ));
    }
    let mut r = Reader {
        buf: payload,
        pos: 0,
    };
    let at = |r: &Reader, e: String| corrupt(payload_start + r.pos, e);
    let rev = r.u64("rev").map_err(|e| at(&r, e))?;
    let count = r.u64("entry count").map_err(|e| at(&r, e))?;
    let mut entries = BTreeMap::new();
    for _ in 0..count {
        let key = r.string("key").map_err(|e| at(&r, e))?;
        let value = r.bytes("value").map_err(|e| at(&r, e))?;
        if entries.insert(key, value).is_some() {
            return Err(at(&r, "duplicate key".into()));
        }
    }
    if r.remaining() != 0 {
        return Err(at(
            &r,
            format!("{} trailing bytes after entries", r.remaining()),
        ));
    }
    Ok(Snapshot { rev, entries })
}

struct WalScan {
    /// Length of the valid prefix.
    good_len: u64,
    file_len: u64,
    tail_reason: String,
    replayed: usize,
}

/// Apply WAL records with rev > `snap.rev` to `snap`. Stops at the first
/// torn record (reported via `good_len < file_len`); a CRC-valid record that
/// does not decode, or out-of-order revs, are hard corruption errors.
fn replay_wal(path: &Path, wal: &File, snap: &mut Snapshot) -> Result<WalScan, StoreError> {
    let file_len = wal.metadata().map_err(io_err(path, "stat"))?.len();
    let mut reader = BufReader::with_capacity(1 << 20, wal);
    let mut pos = 0u64;
    let mut last_rev: Option<u64> = None;
    let mut replayed = 0;
    let torn = |pos: u64, reason: String, replayed| {
        Ok(WalScan {
            good_len: pos,
            file_len,
            tail_reason: reason,
            replayed,
        })
    };
    while pos < file_len {
        let left = file_len - pos;
        if left < HEADER_LEN {
            return torn(pos, format!("{left}-byte partial header"), replayed);
        }
        let mut header = [0u8; HEADER_LEN as usize];
        reader
            .read_exact(&mut header)
            .map_err(io_err(path, "read"))?;
        let len = u64::from(u32::from_le_bytes([
            header[0], header[1], header[2], header[3],
        ]));
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if !(MIN_WAL_PAYLOAD..=MAX_RECORD).contains(&len) {
            return torn(pos, format!("implausible record length {len}"), replayed);
        }
        if len > left - HEADER_LEN {
            return torn(
                pos,
                format!(
                    "record length {len} but only {} bytes left",
                    left - HEADER_LEN
                ),
                replayed,
            );
        }
        // Bounded by MAX_RECORD and by the file's actual size.
        let mut payload = vec![0u8; len as usize];
        reader
            .read_exact(&mut payload)
            .map_err(io_err(path, "read"))?;
        let actual = crc32fast::hash(&payload);
        if actual != crc {
            return torn(
                pos,
                format!("crc mismatch: header {crc:#010x}, payload {actual:#010x}"),
                replayed,
            );
        }
        let txn =
            decode_txn(Bytes::from(payload)).map_err(|(off, reason)| StoreError::Corrupt {
                path: path.to_path_buf(),
                offset: pos + HEADER_LEN + off as u64,
                reason,
            })?;
        if let Some(prev) = last_rev {
            if txn.rev <= prev {
                return Err(StoreError::Corrupt {
                    path: path.to_path_buf(),
                    offset: pos,
                    reason: format!("rev {} after rev {prev}", txn.rev),
                });
            }
        }
        last_rev = Some(txn.rev);
        if txn.rev > snap.rev {
            snap.apply(&txn);
            replayed += 1;
        }
        pos += HEADER_LEN + len;
    }
    Ok(WalScan {
        good_len: pos,
        file_len,
        tail_reason: String::new(),
        replayed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::wait_durable;
    use std::sync::Arc;

    fn open(dir: &Path) -> EmbeddedStore {
        EmbeddedStore::open(dir, EmbeddedOptions::default()).unwrap()
    }

    fn open_loaded(dir: &Path, opts: EmbeddedOptions) -> (EmbeddedStore, Snapshot) {
        let mut store = EmbeddedStore::open(dir, opts).unwrap();
        let snap = store.load().unwrap();
        (store, snap)
    }

    fn txn(rev: u64, ops: Vec<Op>) -> Txn {
        Txn { rev, ops }
    }

    fn entries(pairs: &[(&str, &str)]) -> BTreeMap<String, Bytes> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Bytes::copy_from_slice(v.as_bytes())))
            .collect()
    }

    async fn submit_wait(store: &EmbeddedStore, t: Txn) {
        let rev = t.rev;
        let mut rx = store.durable();
        store.submit(t).unwrap();
        wait_durable(&mut rx, rev).await.unwrap();
    }

    fn wal_len(dir: &Path) -> u64 {
        fs::metadata(dir.join(WAL_FILE)).unwrap().len()
    }

    fn append_raw(dir: &Path, bytes: &[u8]) {
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.join(WAL_FILE))
            .unwrap();
        f.write_all(bytes).unwrap();
    }

    #[tokio::test]
    async fn put_delete_reopen_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        {
            let (store, snap) = open_loaded(&dir, EmbeddedOptions::default());
            assert_eq!(snap, Snapshot::default());
            assert_eq!(store.durable().borrow().rev, 0);
            submit_wait(&store, txn(1, vec![Op::put("a", "1"), Op::put("b", "2")])).await;
            submit_wait(
                &store,
                txn(
                    2,
                    vec![Op::delete("a"), Op::put("c", ""), Op::delete("nope")],
                ),
            )
            .await;
            submit_wait(&store, txn(5, vec![Op::put("b", "22")])).await;
            submit_wait(&store, txn(6, vec![])).await;
            // Misuse is rejected without breaking the store.
            let err = store.submit(txn(6, vec![])).unwrap_err();
            assert!(
                matches!(err, StoreError::RevOrder { last: 6, rev: 6 }),
                "{err}"
            );
        }
        let (store, snap) = open_loaded(&dir, EmbeddedOptions::default());
        assert_eq!(snap.rev, 6);
        assert_eq!(snap.entries, entries(&[("b", "22"), ("c", "")]));
        assert_eq!(store.durable().borrow().rev, 6);
        submit_wait(&store, txn(7, vec![Op::put("d", "4")])).await;
        drop(store);

        let mut store = open(&dir);
        let snap = store.load().unwrap();
        assert_eq!(snap.rev, 7);
        assert_eq!(snap.entries.len(), 3);
        let err = store.load().unwrap_err();
        assert!(matches!(err, StoreError::Misuse(_)), "{err}");
    }

    #[test]
    fn submit_before_load_is_misuse() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open(tmp.path());
        let err = store.submit(txn(1, vec![])).unwrap_err();
        assert!(matches!(err, StoreError::Misuse(_)), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn concurrent_submits_all_durable_and_reloaded() {
        const TASKS: usize = 8;
        const PER_TASK: usize = 150;
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = open_loaded(tmp.path(), EmbeddedOptions::default());
        let store = Arc::new(store);
        // Stands in for the caller's state lock: rev assignment and submit
        // happen under it, waiting happens outside.
        let rev_lock = Arc::new(std::sync::Mutex::new(0u64));

        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let store = store.clone();
            let rev_lock = rev_lock.clone();
            tasks.push(tokio::spawn(async move {
                let mut rx = store.durable();
                let mut expected = BTreeMap::new();
                for i in 0..PER_TASK {
                    let key = format!("t{t}/k{}", i % 40);
                    let op = if i % 7 == 6 {
                        expected.remove(&key);
                        Op::delete(key)
                    } else {
                        let value = Bytes::from(format!("{t}-{i}"));
                        expected.insert(key.clone(), value.clone());
                        Op::Put { key, value }
                    };
                    let rev = {
                        let mut rev = rev_lock.lock().unwrap();
                        *rev += 1;
                        store.submit(txn(*rev, vec![op])).unwrap();
                        *rev
                    };
                    wait_durable(&mut rx, rev).await.unwrap();
                    assert!(rx.borrow().rev >= rev);
                }
                expected
            }));
        }
        let mut expected = BTreeMap::new();
        for task in tasks {
            expected.extend(task.await.unwrap());
        }
        let total = (TASKS * PER_TASK) as u64;
        assert_eq!(store.durable().borrow().rev, total);
        drop(Arc::into_inner(store).unwrap());

        let (_store, snap) = open_loaded(tmp.path(), EmbeddedOptions::default());
        assert_eq!(snap.rev, total);
        assert_eq!(snap.entries, expected);
    }

    /// Writes revs 1..=3 and returns the WAL offsets where records 2 and 3 start.
    async fn three_records(dir: &Path) -> (u64, u64) {
        let (store, _) = open_loaded(dir, EmbeddedOptions::default());
        submit_wait(&store, txn(1, vec![Op::put("a", "1")])).await;
        let second = wal_len(dir);
        submit_wait(&store, txn(2, vec![Op::put("b", "2")])).await;
        let third = wal_len(dir);
        submit_wait(&store, txn(3, vec![Op::put("c", "3")])).await;
        (second, third)
    }

    #[tokio::test]
    async fn torn_tail_cut_mid_record_is_truncated() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (_, third) = three_records(dir).await;
        let full = wal_len(dir);
        // Cut the last record in half.
        let f = OpenOptions::new()
            .write(true)
            .open(dir.join(WAL_FILE))
            .unwrap();
        f.set_len(full - 3).unwrap();
        drop(f);

        let (store, snap) = open_loaded(dir, EmbeddedOptions::default());
        assert_eq!(snap.rev, 2);
        assert_eq!(snap.entries, entries(&[("a", "1"), ("b", "2")]));
        assert_eq!(wal_len(dir), third);
        // Appending after recovery works, and reuses the lost rev.
        submit_wait(&store, txn(3, vec![Op::put("z", "26")])).await;
        drop(store);
        let (_store, snap) = open_loaded(dir, EmbeddedOptions::default());
        assert_eq!(snap.rev, 3);
        assert_eq!(
            snap.entries,
            entries(&[("a", "1"), ("b", "2"), ("z", "26")])
        );
    }

    #[tokio::test]
    async fn torn_tail_garbage_variants_are_truncated() {
        let mut valid_txn = Vec::new();
        encode_txn(&mut valid_txn, &txn(9, vec![Op::put("x", "y")]));
        let mut bad_crc = valid_txn.clone();
        let last = bad_crc.len() - 1;
        bad_crc[last] ^= 0xff;

        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("partial header", vec![0xde, 0xad, 0xbe]),
            ("zero fill", vec![0; 64]),
            ("huge length", {
                let mut v = u32::MAX.to_le_bytes().to_vec();
                v.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
                v
            }),
            ("length past eof", {
                let mut v = 1000u32.to_le_bytes().to_vec();
                v.extend_from_slice(&[0; 20]);
                v
            }),
            ("bad crc", bad_crc),
            ("partial record", valid_txn[..valid_txn.len() - 1].to_vec()),
        ];
        for (name, garbage) in cases {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path();
            three_records(dir).await;
            let good = wal_len(dir);
            append_raw(dir, &garbage);

            let (store, snap) = open_loaded(dir, EmbeddedOptions::default());
            assert_eq!(snap.rev, 3, "{name}");
            assert_eq!(
                snap.entries,
                entries(&[("a", "1"), ("b", "2"), ("c", "3")]),
                "{name}"
            );
            assert_eq!(wal_len(dir), good, "{name}");
            submit_wait(&store, txn(4, vec![Op::delete("a")])).await;
            drop(store);
            let (_store, snap) = open_loaded(dir, EmbeddedOptions::default());
            assert_eq!(snap.rev, 4, "{name}");
            assert_eq!(snap.entries, entries(&[("b", "2"), ("c", "3")]), "{name}");
        }
    }

    #[tokio::test]
    async fn crc_valid_but_undecodable_record_is_corrupt() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (second, _) = three_records(dir).await;
        // Rewrite the file as: record 1, then a well-framed record with an
        // unknown op tag. That is not a torn write; refuse to guess.
        let wal = fs::read(dir.join(WAL_FILE)).unwrap();
        let mut payload = Vec::new();
        payload.extend_from_slice(&2u64.to_le_bytes());
        payload.extend_from_slice(&1u32.to_le_bytes());
        payload.push(9);
        payload.extend_from_slice(&0u32.to_le_bytes());
        let mut data = wal[..second as usize].to_vec();
        data.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        data.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        data.extend_from_slice(&payload);
        fs::write(dir.join(WAL_FILE), data).unwrap();

        let mut store = open(dir);
        let err = store.load().unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt { offset, reason, .. }
                if *offset == second + HEADER_LEN + 13 && reason.contains("tag")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn compaction_keeps_everything_and_shrinks_wal() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let opts = EmbeddedOptions {
            compact_after_bytes: 200,
        };
        let mut expected = BTreeMap::new();
        let mut max_wal = 0;
        {
            let (store, _) = open_loaded(dir, opts.clone());
            for rev in 1..=100u64 {
                let key = format!("k{}", rev % 13);
                let op = if rev % 5 == 0 {
                    expected.remove(&key);
                    Op::delete(key)
                } else {
                    let value = Bytes::from(format!("value-{rev}"));
                    expected.insert(key.clone(), value.clone());
                    Op::Put { key, value }
                };
                submit_wait(&store, txn(rev, vec![op])).await;
                max_wal = max_wal.max(wal_len(dir));
            }
        }
        assert!(dir.join(SNAPSHOT_FILE).exists());
        assert!(!dir.join(SNAPSHOT_TMP_FILE).exists());
        // Never much past the threshold: compaction runs after each batch
        // that crosses it.
        assert!(max_wal <= 200 + 64, "wal grew to {max_wal}");
        assert!(wal_len(dir) <= 200);

        let (store, snap) = open_loaded(dir, opts.clone());
        assert_eq!(snap.rev, 100);
        assert_eq!(snap.entries, expected);
        submit_wait(&store, txn(101, vec![Op::put("after", "compaction")])).await;
        drop(store);
        let (_store, snap) = open_loaded(dir, opts);
        assert_eq!(snap.rev, 101);
        expected.insert("after".into(), Bytes::from("compaction"));
        assert_eq!(snap.entries, expected);
    }

    #[tokio::test]
    async fn crash_between_snapshot_and_wal_truncation_is_safe() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        three_records(dir).await;
        let wal_before = fs::read(dir.join(WAL_FILE)).unwrap();
        {
            // Compacts at startup because the recovered WAL is over the threshold.
            let (_store, _) = open_loaded(
                dir,
                EmbeddedOptions {
                    compact_after_bytes: 1,
                },
            );
        }
        assert_eq!(wal_len(dir), 0);
        // Put the old WAL back, as if we crashed before truncating it, and
        // leave a half-written snapshot.tmp behind.
        fs::write(dir.join(WAL_FILE), &wal_before).unwrap();
        fs::write(dir.join(SNAPSHOT_TMP_FILE), b"WEFTSNAP1garbage").unwrap();
        let (store, snap) = open_loaded(dir, EmbeddedOptions::default());
        assert_eq!(snap.rev, 3);
        assert_eq!(snap.entries, entries(&[("a", "1"), ("b", "2"), ("c", "3")]));
        assert!(!dir.join(SNAPSHOT_TMP_FILE).exists());
        submit_wait(&store, txn(4, vec![Op::put("d", "4")])).await;
        drop(store);
        let (_store, snap) = open_loaded(dir, EmbeddedOptions::default());
        assert_eq!(snap.rev, 4);
        assert_eq!(snap.entries.len(), 4);
    }

    #[tokio::test]
    async fn corrupt_snapshot_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        {
            let (store, _) = open_loaded(
                dir,
                EmbeddedOptions {
                    compact_after_bytes: 1,
                },
            );
            submit_wait(&store, txn(1, vec![Op::put("a", "1")])).await;
        }
        let good = fs::read(dir.join(SNAPSHOT_FILE)).unwrap();
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        let mut huge_len = good.clone();
        huge_len[9..13].copy_from_slice(&u32::MAX.to_le_bytes());
        for (name, data) in [
            ("flipped byte", flipped),
            ("bad magic", bad_magic),
            ("truncated", good[..good.len() - 2].to_vec()),
            ("huge length", huge_len),
            ("trailing bytes", [&good[..], b"x"].concat()),
            ("empty", Vec::new()),
        ] {
            fs::write(dir.join(SNAPSHOT_FILE), data).unwrap();
            let mut store = open(dir);
            let err = store.load().unwrap_err();
            assert!(matches!(err, StoreError::Corrupt { .. }), "{name}: {err}");
        }
        fs::write(dir.join(SNAPSHOT_FILE), good).unwrap();
        let (_store, snap) = open_loaded(dir, EmbeddedOptions::default());
        assert_eq!(snap.entries, entries(&[("a", "1")]));
    }

    #[test]
    fn second_open_is_locked() {
        let tmp = tempfile::tempdir().unwrap();
        let first = open(tmp.path());
        let err = EmbeddedStore::open(tmp.path(), EmbeddedOptions::default())
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        drop(first);
        open(tmp.path());
    }

    #[tokio::test]
    async fn write_failure_fails_the_store() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = open_loaded(tmp.path(), EmbeddedOptions::default());
        submit_wait(&store, txn(1, vec![Op::put("a", "1")])).await;
        store.inject_write_fault();
        let mut rx = store.durable();
        store.submit(txn(2, vec![Op::put("b", "2")])).unwrap();
        let err = wait_durable(&mut rx, 2).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Failed(r) if r.contains("injected write fault")),
            "{err}"
        );
        let durable = rx.borrow().clone();
        assert_eq!(durable.rev, 1);
        assert!(durable.failed.is_some());
        // Rev 1 was durable before the failure and stays reported so.
        wait_durable(&mut rx, 1).await.unwrap();
        let err = store.submit(txn(3, vec![])).unwrap_err();
        assert!(matches!(err, StoreError::Failed(_)), "{err}");
        drop(store);
        let (_store, snap) = open_loaded(tmp.path(), EmbeddedOptions::default());
        assert_eq!(snap.rev, 1);
    }

    #[test]
    fn oversized_txn_is_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = open_loaded(tmp.path(), EmbeddedOptions::default());
        let value = Bytes::from(vec![0u8; MAX_RECORD as usize]);
        let err = store
            .submit(txn(
                1,
                vec![Op::Put {
                    key: "k".into(),
                    value,
                }],
            ))
            .unwrap_err();
        assert!(matches!(err, StoreError::TooLarge { rev: 1, .. }), "{err}");
    }
}
