//! The webhook journal: how a notification becomes durable before its 202.
//!
//! Making sled durable per request is expensive (its insert plus its own log I/O threads per
//! flush; see README, Performance). So accepted queue items are first appended to a plain file,
//! `webhook.journal` in the data directory, by one writer thread that batches every request
//! waiting, writes them, `fdatasync`s once and answers them all (group commit). Only then does
//! the same thread insert the items into the integration's sled queue, where the worker finds
//! them. Every few seconds (or MiBs) it flushes sled and empties the journal.
//!
//! At open, whatever the journal still holds is inserted into the queues again (a crash before
//! the sled flush). An item can thus be queued twice, never lost: queue items are hints, and
//! handling one twice is harmless. Records: `len: u32 LE | crc32: u32 LE | JSON`.
//!
//! Failures:
//! - a failed append (no space, an I/O error, a short write, a failed `fdatasync`) is answered
//!   with an error (the webhook says 503, so Graph retries) and the file is cut back to the end
//!   of the last complete record before anything else is written; while it cannot be cut back,
//!   every append is refused. So an acknowledged record never follows a torn one.
//! - at replay, a torn or corrupt tail (a crash mid-write, never acknowledged) is dropped; a bad
//!   record in the middle is skipped and the intact records after it are kept (each record has
//!   its own length and CRC), and the skip is logged and shown on `/status`.
//! - records of an integration that is not configured (any more) are not replayed: no queue is
//!   made for it; they are counted and logged.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::health::{Counters, WriteHealth};
use super::queue::QueueItem;
use super::thread::Worker;
use super::StoreError;
use crate::model::IntegrationName;

pub(crate) const FILE_NAME: &str = "webhook.journal";
/// Empty the journal (after a sled flush) when it is this big or this old.
const MAX_BYTES: u64 = 8 * 1024 * 1024;
const MAX_AGE: Duration = Duration::from_secs(5);
/// A record longer than this is corrupt (bodies are limited far below it).
const MAX_RECORD: usize = 64 * 1024 * 1024;
/// How every record's JSON starts (serde writes the fields in declaration order); used to find
/// the next record after a corrupt one without checksumming every offset.
const RECORD_START: &[u8] = b"{\"integration\":\"";

#[derive(Serialize, Deserialize)]
struct Entry {
    integration: String,
    items: Vec<QueueItem>,
}

struct Request {
    record: Vec<u8>,
    integration: String,
    items: Vec<Vec<u8>>,
    reply: oneshot::Sender<Result<(), String>>,
}

/// Which integrations a replay may fill.
pub(crate) enum Replay<'a> {
    /// Only these (the configured ones); others' records are dropped.
    Configured(&'a [IntegrationName]),
    /// Only integrations whose queue already exists in the store (no configuration at hand).
    Existing,
}

/// What the replay at open found: shown on `/status` and logged.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct ReplayReport {
    /// Records read and items queued again.
    pub records: usize,
    pub items: usize,
    /// Corrupt records in the middle of the journal that were skipped (intact records after
    /// them were kept): `(byte offset, length)`.
    pub corrupt: Vec<(u64, u64)>,
    /// Bytes of a torn or corrupt tail that were dropped (a crash mid-write).
    pub torn_tail: u64,
    /// Items of integrations that are not configured, by name, that were not queued.
    pub unconfigured: BTreeMap<String, usize>,
}

impl ReplayReport {
    /// What an operator should hear about, if anything.
    pub(crate) fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.corrupt.is_empty() {
            let at: Vec<String> = self
                .corrupt
                .iter()
                .take(5)
                .map(|(o, l)| format!("{l} bytes at offset {o}"))
                .collect();
            out.push(format!(
                "webhook journal: {} corrupt record(s) skipped at start-up ({}); the intact records after them were queued. Notifications in the skipped records are lost: the next full reconcile repairs what they carried",
                self.corrupt.len(),
                at.join(", ")
            ));
        }
        if !self.unconfigured.is_empty() {
            let names: Vec<String> = self
                .unconfigured
                .iter()
                .map(|(n, c)| format!("{} ({c})", crate::logging::excerpt(n, 64)))
                .collect();
            out.push(format!(
                "webhook journal: items of integrations that are not configured were not queued: {}",
                names.join(", ")
            ));
        }
        out
    }
}

pub(crate) struct Journal {
    /// Stopped and joined with the last store handle (it holds the database).
    writer: Worker<Request>,
    pub(crate) report: ReplayReport,
    #[cfg(test)]
    faults: Arc<std::sync::Mutex<faults::Faults>>,
}

fn io_err(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("{}: {e}", path.display()))
}

fn queue_tree(
    db: &sled::Db,
    trees: &mut HashMap<String, sled::Tree>,
    integration: &str,
) -> Result<sled::Tree, String> {
    if let Some(t) = trees.get(integration) {
        return Ok(t.clone());
    }
    IntegrationName::parse(integration)
        .map_err(|e| format!("journal names integration {integration:?}: {e}"))?;
    let t = db
        .open_tree(format!("{integration}/queue"))
        .map_err(|e| e.to_string())?;
    trees.insert(integration.to_string(), t.clone());
    Ok(t)
}

fn insert(db: &sled::Db, tree: &sled::Tree, encoded: &[u8]) -> Result<Option<sled::IVec>, String> {
    let id = db.generate_id().map_err(|e| e.to_string())?;
    tree.insert(id.to_be_bytes(), encoded)
        .map_err(|e| e.to_string())
}

/// The record framed at `at`, and where the next one starts.
fn frame_at(bytes: &[u8], at: usize) -> Option<(Entry, usize)> {
    let header = bytes.get(at..at.checked_add(8)?)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_RECORD {
        return None;
    }
    let start = at + 8;
    let payload = bytes.get(start..start.checked_add(len)?)?;
    if !payload.starts_with(RECORD_START) || crc32fast::hash(payload) != crc {
        return None;
    }
    let r = serde_json::from_slice::<Entry>(payload).ok()?;
    Some((r, start + len))
}

/// The records of a journal file, skipping corrupt ones where later records are intact.
#[derive(Default)]
struct Scan {
    records: Vec<Entry>,
    /// Corrupt spans followed by intact records: (offset, length).
    corrupt: Vec<(u64, u64)>,
    /// Bytes at the end that hold no intact record.
    tail: u64,
}

/// Reads every intact record of `bytes`. After a record that fails its length, CRC or JSON
/// check, the next record is looked for first where the bad record's own length says it ends,
/// then at every later offset whose bytes look like a record's start; the checksum work of
/// that search is bounded (a few times the file's size), so any input is read in linear time.
fn scan(bytes: &[u8]) -> Scan {
    let mut out = Scan::default();
    let mut at = 0usize;
    let mut budget = bytes.len().saturating_mul(4).saturating_add(1 << 20);
    while at < bytes.len() {
        if let Some((r, next)) = frame_at(bytes, at) {
            out.records.push(r);
            at = next;
            continue;
        }
        // A bad record: where does the next intact one start?
        let by_len = bytes
            .get(at..at + 8)
            .map(|h| at + 8 + u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize)
            .filter(|n| *n < bytes.len() && frame_at(bytes, *n).is_some());
        let next = by_len.or_else(|| {
            let mut o = at + 1;
            while o + 8 + RECORD_START.len() <= bytes.len() && budget > 0 {
                if bytes[o + 8..].starts_with(RECORD_START) {
                    let len =
                        u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]])
                            as usize;
                    budget = budget.saturating_sub(len.min(bytes.len()));
                    if frame_at(bytes, o).is_some() {
                        return Some(o);
                    }
                }
                o += 1;
            }
            None
        });
        match next {
            Some(n) => {
                out.corrupt.push((at as u64, (n - at) as u64));
                at = n;
            }
            None => {
                out.tail = (bytes.len() - at) as u64;
                break;
            }
        }
    }
    out
}

/// The complete records at the start of `bytes` (as far as a replay would read them).
#[cfg(test)]
fn records(bytes: &[u8]) -> Vec<Entry> {
    scan(bytes).records
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Empties the journal once sled holds everything in it durably.
fn checkpoint(db: &sled::Db, file: &mut JournalFile) -> Result<(), String> {
    db.flush().map_err(|e| e.to_string())?;
    file.set_len(0).map_err(|e| e.to_string())?;
    file.file
        .seek(SeekFrom::Start(0))
        .map_err(|e| e.to_string())?;
    file.file.sync_all().map_err(|e| e.to_string())
}

/// Replays `bytes` into the queues `which` allows.
fn replay(
    db: &sled::Db,
    bytes: &[u8],
    which: &Replay<'_>,
    trees: &mut HashMap<String, sled::Tree>,
) -> Result<ReplayReport, StoreError> {
    let scan = scan(bytes);
    let mut report = ReplayReport {
        records: scan.records.len(),
        corrupt: scan.corrupt,
        torn_tail: scan.tail,
        ..Default::default()
    };
    let existing: Vec<Vec<u8>> = match which {
        Replay::Existing => db.tree_names().into_iter().map(|n| n.to_vec()).collect(),
        Replay::Configured(_) => Vec::new(),
    };
    for r in &scan.records {
        let wanted = match which {
            Replay::Configured(names) => names.iter().any(|n| n.as_str() == r.integration),
            Replay::Existing => existing
                .iter()
                .any(|n| n.as_slice() == format!("{}/queue", r.integration).as_bytes()),
        };
        if !wanted {
            *report
                .unconfigured
                .entry(r.integration.clone())
                .or_default() += r.items.len();
            continue;
        }
        let tree = queue_tree(db, trees, &r.integration).map_err(StoreError::Io)?;
        for it in &r.items {
            insert(db, &tree, &super::encode(it)?).map_err(StoreError::Io)?;
            report.items += 1;
        }
    }
    Ok(report)
}

impl Journal {
    /// Opens (creating) the journal in `dir`, queues what it still holds (see [`Replay`]), and
    /// starts the writer thread.
    pub(crate) fn open(
        db: sled::Db,
        dir: &Path,
        which: Replay<'_>,
        counters: Arc<Counters>,
        health: Arc<WriteHealth>,
    ) -> Result<Arc<Journal>, StoreError> {
        let path: PathBuf = dir.join(FILE_NAME);
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        #[cfg(test)]
        let faults: Arc<std::sync::Mutex<faults::Faults>> = Default::default();
        let mut file = JournalFile {
            file,
            #[cfg(test)]
            faults: Arc::clone(&faults),
        };
        let mut bytes = Vec::new();
        file.file
            .read_to_end(&mut bytes)
            .map_err(|e| io_err(&path, e))?;
        let mut trees = HashMap::new();
        let mut report = ReplayReport::default();
        if !bytes.is_empty() {
            report = replay(&db, &bytes, &which, &mut trees)?;
            tracing::info!(
                records = report.records,
                items = report.items,
                bytes = bytes.len(),
                torn_tail_bytes = report.torn_tail,
                "webhook journal replayed into the queues"
            );
            for w in report.warnings() {
                tracing::error!("{w}");
            }
            checkpoint(&db, &mut file).map_err(StoreError::Io)?;
        }
        let writer = Worker::spawn("webhook-journal".into(), move |rx| {
            writer(db, file, rx, trees, &counters, &health)
        })
        .map_err(|e| StoreError::Io(format!("cannot start the journal writer: {e}")))?;
        Ok(Arc::new(Journal {
            writer,
            report,
            #[cfg(test)]
            faults,
        }))
    }

    /// Resolves once the items are on disk (journal) and in the integration's queue.
    pub(crate) async fn append(
        &self,
        integration: &str,
        items: &[QueueItem],
    ) -> Result<(), String> {
        let payload = serde_json::to_vec(&Entry {
            integration: integration.to_string(),
            items: items.to_vec(),
        })
        .map_err(|e| e.to_string())?;
        let encoded = items
            .iter()
            .map(|it| serde_json::to_vec(it).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(Request {
                record: frame(&payload),
                integration: integration.to_string(),
                items: encoded,
                reply,
            })
            .map_err(|_| "the webhook journal writer has stopped".to_string())?;
        rx.await
            .map_err(|_| "the webhook journal writer has stopped".to_string())?
    }
}

/// The journal file as the writer uses it; in tests, faults can be injected into its calls.
struct JournalFile {
    file: File,
    #[cfg(test)]
    faults: Arc<std::sync::Mutex<faults::Faults>>,
}

impl JournalFile {
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        #[cfg(test)]
        let short = self.fault().short_write.take();
        #[cfg(test)]
        if let Some(written) = short {
            let n = written.min(buf.len());
            self.file.write_all(&buf[..n])?;
            return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
        }
        self.file.write_all(buf)
    }

    fn sync_data(&mut self) -> std::io::Result<()> {
        #[cfg(test)]
        if std::mem::take(&mut self.fault().fail_sync) {
            return Err(std::io::Error::from_raw_os_error(5)); // EIO
        }
        self.file.sync_data()
    }

    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        #[cfg(test)]
        {
            let mut f = self.fault();
            if f.fail_truncate > 0 {
                f.fail_truncate -= 1;
                return Err(std::io::Error::from_raw_os_error(5));
            }
        }
        self.file.set_len(len)
    }

    #[cfg(test)]
    fn fault(&self) -> std::sync::MutexGuard<'_, faults::Faults> {
        self.faults.lock().unwrap()
    }
}

#[cfg(test)]
mod faults {
    /// Faults the next journal calls meet (tests only).
    #[derive(Default)]
    pub(super) struct Faults {
        /// The next write writes this many bytes, then fails with ENOSPC.
        pub(super) short_write: Option<usize>,
        /// The next `fdatasync` fails with EIO.
        pub(super) fail_sync: bool,
        /// The next this many truncations fail with EIO.
        pub(super) fail_truncate: u32,
    }
}

/// Cuts the file back to `committed` bytes (the end of the last complete record) and makes
/// that durable.
fn cut_back(file: &mut JournalFile, committed: u64) -> std::io::Result<()> {
    file.set_len(committed)?;
    file.sync_data()
}

fn writer(
    db: sled::Db,
    mut file: JournalFile,
    rx: mpsc::Receiver<Request>,
    mut trees: HashMap<String, sled::Tree>,
    counters: &Counters,
    health: &WriteHealth,
) {
    let mut written: u64 = 0;
    // Set after a failed append whose bytes could not be cut off: the length to cut back to.
    // Nothing is appended until that cut is done.
    let mut owed_cut: Option<u64> = None;
    let mut since = Instant::now();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(r) = rx.try_recv() {
            batch.push(r);
        }
        if let Some(len) = owed_cut {
            if cut_back(&mut file, len).is_ok() {
                owed_cut = None;
                tracing::info!(
                    "webhook journal cut back to its last complete record; appends resume"
                );
            }
        }
        let durable = if owed_cut.is_some() {
            Err(
                "webhook journal: a failed append could not be cut off yet; refusing appends"
                    .to_string(),
            )
        } else {
            append_batch(&mut file, &batch, health)
                .map(|n| written += n)
                .map_err(|(e, cut)| {
                    owed_cut = cut;
                    e
                })
        };
        if durable.is_ok() {
            health.succeeded();
        }
        for r in batch {
            let result = durable.clone().and_then(|_| {
                let tree = queue_tree(&db, &mut trees, &r.integration)?;
                let counts = counters.get(&r.integration);
                r.items.iter().try_for_each(|it| {
                    let old = insert(&db, &tree, it)?;
                    if let Some(c) = &counts {
                        c.inserted(&old);
                    }
                    Ok(())
                })
            });
            let _ = r.reply.send(result);
        }
        if written > 0 && owed_cut.is_none() && (written >= MAX_BYTES || since.elapsed() >= MAX_AGE)
        {
            match checkpoint(&db, &mut file) {
                Ok(()) => {
                    written = 0;
                    since = Instant::now();
                }
                Err(e) => {
                    health.failed("emptying the webhook journal", &e);
                    tracing::error!(error = %e, "cannot empty the webhook journal; it keeps growing until this works")
                }
            }
        }
    }
    // Shutting down: leave nothing for the next start to replay.
    if written > 0 && owed_cut.is_none() {
        if let Err(e) = checkpoint(&db, &mut file) {
            tracing::warn!(error = %e, "webhook journal not emptied at shutdown; it is replayed at the next start");
        }
    }
}

/// Appends one batch's records and syncs them: `Ok(bytes)`. On failure the file is cut back to
/// its length before the batch; `Err((message, Some(len)))` when even that failed and is owed.
fn append_batch(
    file: &mut JournalFile,
    batch: &[Request],
    health: &WriteHealth,
) -> Result<u64, (String, Option<u64>)> {
    let before = file
        .file
        .metadata()
        .map_err(|e| (format!("webhook journal: {e}"), None))?
        .len();
    let mut buf = Vec::with_capacity(batch.iter().map(|r| r.record.len()).sum());
    for r in batch {
        buf.extend_from_slice(&r.record);
    }
    match file.write_all(&buf).and_then(|_| file.sync_data()) {
        Ok(()) => Ok(buf.len() as u64),
        Err(e) => {
            let e = format!("webhook journal: {e}");
            health.failed("appending to the webhook journal", &e);
            // Whatever of this batch reached the file must go before anything is appended
            // (and acknowledged) after it.
            match cut_back(file, before) {
                Ok(()) => {
                    tracing::error!(error = %e, "webhook journal append failed; cut back to the last complete record, the requests are answered 503");
                    Err((e, None))
                }
                Err(t) => {
                    tracing::error!(error = %e, truncate_error = %t, "webhook journal append failed and the file cannot be cut back; refusing appends until it can");
                    Err((e, Some(before)))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::queue::Hint;
    use crate::store::Store;

    fn item(user: &str) -> QueueItem {
        QueueItem::new(Hint::User {
            user_id: user.into(),
            follow_up: false,
        })
    }

    fn rec_of(integration: &str, u: &str) -> Vec<u8> {
        frame(
            &serde_json::to_vec(&Entry {
                integration: integration.into(),
                items: vec![item(u)],
            })
            .unwrap(),
        )
    }

    fn users_in(bytes: &[u8]) -> Vec<String> {
        records(bytes)
            .iter()
            .flat_map(|r| r.items.iter())
            .map(|it| match &it.hint {
                Hint::User { user_id, .. } => user_id.clone(),
                other => other.describe(),
            })
            .collect()
    }

    /// A record corrupted in the middle is skipped and the intact ones after it are kept, both
    /// when its length field is intact (found by length) and when it is not (found by
    /// searching for the next record's start).
    #[test]
    fn a_corrupt_record_in_the_middle_keeps_the_records_after_it() {
        let (r1, r2, r3) = (rec_of("a", "u1"), rec_of("a", "u2"), rec_of("a", "u3"));
        let mut bytes = [r1.clone(), r2.clone(), r3.clone()].concat();
        let mid = r1.len() + 8 + 5;
        bytes[mid] ^= 0xff; // a payload byte of u2's record
        let s = scan(&bytes);
        assert_eq!(users_in(&bytes), ["u1", "u3"]);
        assert_eq!(s.corrupt, vec![(r1.len() as u64, r2.len() as u64)]);
        assert_eq!(s.tail, 0);

        let mut bytes = [r1.clone(), r2.clone(), r3.clone()].concat();
        bytes[r1.len() + 1] ^= 0x40; // u2's length field
        assert_eq!(users_in(&bytes), ["u1", "u3"]);
        assert_eq!(scan(&bytes).corrupt.len(), 1);

        // Garbage between records (a torn append the old writer left before a good one).
        let bytes = [r1.clone(), r2[..11].to_vec(), r3.clone()].concat();
        assert_eq!(users_in(&bytes), ["u1", "u3"]);
        assert_eq!(scan(&bytes).corrupt, vec![(r1.len() as u64, 11)]);

        // Nothing intact after the bad record: a torn tail, not a corrupt middle.
        let bytes = [r1.clone(), r2[..11].to_vec()].concat();
        let s = scan(&bytes);
        assert!(s.corrupt.is_empty());
        assert_eq!(s.tail, 11);
    }

    #[test]
    fn records_stop_at_a_torn_or_corrupt_tail() {
        let rec = |u: &str| {
            frame(
                &serde_json::to_vec(&Entry {
                    integration: "a".into(),
                    items: vec![item(u)],
                })
                .unwrap(),
            )
        };
        let mut bytes = rec("u1");
        bytes.extend(rec("u2"));
        let whole = bytes.len();
        bytes.extend(&rec("u3")[..10]); // torn
        assert_eq!(records(&bytes).len(), 2);
        let mut corrupt = bytes[..whole].to_vec();
        let last = corrupt.len() - 3;
        corrupt[last] ^= 0xff; // flips a byte of u2's record
        assert_eq!(records(&corrupt).len(), 1);
        assert!(records(&[]).is_empty());
    }

    #[tokio::test]
    async fn appended_items_are_queued_and_a_left_over_journal_is_replayed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let name = IntegrationName::parse("acme").unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let s = store.integration(&name).unwrap();
            s.enqueue_durable(&[item("u1"), item("u2")]).await.unwrap();
            assert_eq!(s.queue_len(), 2);
        }
        // As after a crash before the sled flush: records still in the journal.
        let rec = frame(
            &serde_json::to_vec(&Entry {
                integration: "acme".into(),
                items: vec![item("u3")],
            })
            .unwrap(),
        );
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE_NAME))
            .unwrap();
        f.write_all(&rec).unwrap();
        f.write_all(&rec[..5]).unwrap(); // torn tail, never acknowledged
        drop(f);
        let store = Store::open(dir.path()).unwrap();
        let s = store.integration(&name).unwrap();
        assert_eq!(s.queue_len(), 3, "u1, u2 from sled and u3 replayed");
        assert_eq!(
            std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len(),
            0,
            "emptied after the replay"
        );
    }
}

#[cfg(test)]
mod failure_tests {
    use super::*;
    use crate::store::queue::Hint;
    use crate::store::Store;

    fn item(user: &str) -> QueueItem {
        QueueItem::new(Hint::User {
            user_id: user.into(),
            follow_up: false,
        })
    }

    fn journal_bytes(dir: &Path) -> Vec<u8> {
        std::fs::read(dir.join(FILE_NAME)).unwrap()
    }

    fn faults(store: &Store) -> Arc<std::sync::Mutex<faults::Faults>> {
        Arc::clone(&store.journal.as_ref().unwrap().faults)
    }

    /// A short write (no space left) is answered with an error and cut off before the next
    /// append, so the acknowledged record that follows is readable by a replay; the failed
    /// items are not queued.
    #[tokio::test]
    async fn a_failed_append_is_cut_off_before_the_next_one_is_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let name = IntegrationName::parse("acme").unwrap();
        let store = Store::open(dir.path()).unwrap();
        let s = store.integration(&name).unwrap();
        s.enqueue_durable(&[item("u1")]).await.unwrap();
        faults(&store).lock().unwrap().short_write = Some(11);
        let err = s.enqueue_durable(&[item("u2")]).await.unwrap_err();
        assert!(err.to_string().contains("webhook journal"), "{err}");
        assert!(store.write_state().is_err(), "readiness hears of it");
        s.enqueue_durable(&[item("u3")]).await.unwrap();
        assert!(store.write_state().is_ok(), "and of the recovery");
        let bytes = journal_bytes(dir.path());
        let scan = scan(&bytes);
        assert!(
            scan.corrupt.is_empty() && scan.tail == 0,
            "no torn bytes left"
        );
        let users: Vec<String> = scan
            .records
            .iter()
            .flat_map(|r| r.items.iter().map(|i| i.hint.describe()))
            .collect();
        assert_eq!(users, ["user u1", "user u3"]);
        assert_eq!(s.queue_len(), 2);
        assert_eq!(s.queue_counts(), (2, 0));
    }

    /// A failed fdatasync is treated like a failed write.
    #[tokio::test]
    async fn a_failed_sync_fails_the_append_and_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let name = IntegrationName::parse("acme").unwrap();
        let store = Store::open(dir.path()).unwrap();
        let s = store.integration(&name).unwrap();
        faults(&store).lock().unwrap().fail_sync = true;
        assert!(s.enqueue_durable(&[item("u1")]).await.is_err());
        assert!(journal_bytes(dir.path()).is_empty());
        s.enqueue_durable(&[item("u2")]).await.unwrap();
        assert_eq!(records(&journal_bytes(dir.path())).len(), 1);
        assert_eq!(s.queue_len(), 1);
    }

    /// While the failed bytes cannot be cut off, every append is refused; once the cut works,
    /// appends resume and the file holds only complete records.
    #[tokio::test]
    async fn appends_are_refused_until_the_failed_bytes_are_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let name = IntegrationName::parse("acme").unwrap();
        let store = Store::open(dir.path()).unwrap();
        let s = store.integration(&name).unwrap();
        s.enqueue_durable(&[item("u1")]).await.unwrap();
        {
            let f = faults(&store);
            let mut f = f.lock().unwrap();
            f.short_write = Some(9);
            f.fail_truncate = 2; // the cut after the failure and the first retry fail
        }
        assert!(s.enqueue_durable(&[item("u2")]).await.is_err());
        let refused = s.enqueue_durable(&[item("u3")]).await.unwrap_err();
        assert!(refused.to_string().contains("refusing"), "{refused}");
        // The third cut works: this append goes through.
        s.enqueue_durable(&[item("u4")]).await.unwrap();
        let bytes = journal_bytes(dir.path());
        let scan = scan(&bytes);
        assert!(scan.corrupt.is_empty() && scan.tail == 0);
        assert_eq!(scan.records.len(), 2, "u1 and u4");
        assert_eq!(s.queue_len(), 2);
    }

    /// Replay after a crash: a corrupt record in the middle is skipped (and reported for
    /// `/status`), the records after it are queued; records of an integration that is not
    /// configured make no queue.
    #[test]
    fn replay_skips_a_corrupt_middle_and_unconfigured_integrations() {
        let dir = tempfile::tempdir().unwrap();
        let acme = IntegrationName::parse("acme").unwrap();
        drop(Store::open(dir.path()).unwrap());
        let rec = |integration: &str, u: &str| {
            frame(
                &serde_json::to_vec(&Entry {
                    integration: integration.into(),
                    items: vec![item(u)],
                })
                .unwrap(),
            )
        };
        let mut bad = rec("acme", "u2");
        let n = bad.len();
        bad[n - 4] ^= 0x55;
        let bytes = [
            rec("acme", "u1"),
            bad,
            rec("gone", "x1"),
            rec("acme", "u3"),
            rec("gone", "x2"),
        ]
        .concat();
        std::fs::write(dir.path().join(FILE_NAME), &bytes).unwrap();
        let store = Store::open_configured(dir.path(), std::slice::from_ref(&acme)).unwrap();
        let report = store.journal_report().unwrap();
        assert_eq!(report.records, 4);
        assert_eq!(report.items, 2);
        assert_eq!(report.corrupt.len(), 1);
        assert_eq!(report.unconfigured.get("gone"), Some(&2));
        let warnings = report.warnings();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("1 corrupt record"), "{warnings:?}");
        assert!(warnings[1].contains("gone (2)"), "{warnings:?}");
        let s = store.integration(&acme).unwrap();
        assert_eq!(s.queue_len(), 2, "u1 and u3");
        let trees: Vec<String> = store
            .db
            .tree_names()
            .iter()
            .map(|t| String::from_utf8_lossy(t).into_owned())
            .collect();
        assert!(
            !trees.iter().any(|t| t.starts_with("gone/")),
            "no queue made for an unconfigured integration: {trees:?}"
        );
    }

    /// Without the configuration at hand, only queues that exist are filled.
    #[test]
    fn replay_without_configuration_fills_only_existing_queues() {
        let dir = tempfile::tempdir().unwrap();
        let acme = IntegrationName::parse("acme").unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.integration(&acme).unwrap();
            store.flush().unwrap();
        }
        let rec = |integration: &str| {
            frame(
                &serde_json::to_vec(&Entry {
                    integration: integration.into(),
                    items: vec![item("u")],
                })
                .unwrap(),
            )
        };
        std::fs::write(
            dir.path().join(FILE_NAME),
            [rec("acme"), rec("stranger")].concat(),
        )
        .unwrap();
        let store = Store::open(dir.path()).unwrap();
        let report = store.journal_report().unwrap();
        assert_eq!(report.items, 1);
        assert_eq!(report.unconfigured.get("stranger"), Some(&1));
        assert!(!store
            .db
            .tree_names()
            .iter()
            .any(|t| t.starts_with(b"stranger/")));
    }
}

/// Fuzz targets of the replay (see `src/fuzz.rs` for the budget and `PROPTEST_CASES`).
#[cfg(test)]
mod fuzz_tests {
    use super::*;
    use crate::fuzz::config;
    use crate::store::Store;
    use proptest::prelude::*;

    fn record(name: &str) -> Vec<u8> {
        frame(
            &serde_json::to_vec(&Entry {
                integration: name.into(),
                items: vec![],
            })
            .unwrap(),
        )
    }

    proptest! {
        #![proptest_config(config(96))]

        /// Whatever bytes the journal holds at start-up: the store opens, only the configured
        /// integration gets a queue, and the journal is empty afterwards.
        #[test]
        fn any_journal_file_opens(bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..4096),
            prop::collection::vec(any::<u8>(), 0..64).prop_map(|garbage| {
                [garbage.clone(), record("other"), garbage].concat()
            }),
        ]) {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(FILE_NAME), &bytes).unwrap();
            let acme = IntegrationName::parse("acme").unwrap();
            let store = Store::open_configured(dir.path(), std::slice::from_ref(&acme)).unwrap();
            prop_assert_eq!(store.journal_report().unwrap().items, 0);
            prop_assert!(!store.db.tree_names().iter().any(|t| t.starts_with(b"other/")));
            drop(store);
            prop_assert_eq!(std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len(), 0);
        }

        /// Intact records with garbage before each: every record is found, in order.
        #[test]
        fn every_intact_record_between_garbage_is_found(parts in prop::collection::vec(
            ("[a-z][a-z0-9-]{0,10}", prop::collection::vec(any::<u8>(), 0..64)),
            0..12,
        )) {
            let mut bytes = Vec::new();
            for (name, garbage) in &parts {
                bytes.extend_from_slice(garbage);
                bytes.extend_from_slice(&record(name));
            }
            let found: Vec<String> = scan(&bytes).records.into_iter().map(|r| r.integration).collect();
            let want: Vec<String> = parts.into_iter().map(|(n, _)| n).collect();
            prop_assert_eq!(found, want);
        }
    }

    proptest! {
        #![proptest_config(config(512))]

        /// Arbitrary bytes: no panic, and bounded work (a file of repeated record starts with
        /// huge lengths is the worst case for the search).
        #[test]
        fn scan_of_any_bytes(bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..8192),
            (any::<u32>(), 1usize..400).prop_map(|(len, n)| {
                let mut one = len.to_le_bytes().to_vec();
                one.extend_from_slice(&[0u8; 4]);
                one.extend_from_slice(RECORD_START);
                one.repeat(n)
            }),
        ]) {
            let s = scan(&bytes);
            prop_assert!(s.records.is_empty() || !bytes.is_empty());
        }
    }
}
