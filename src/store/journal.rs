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
//! handling one twice is harmless. Records: `len: u32 LE | crc32: u32 LE | JSON`; a torn or
//! corrupt tail (a crash mid-write, never acknowledged) ends the replay.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::queue::QueueItem;
use super::thread::Worker;
use super::StoreError;
use crate::config::IntegrationName;

pub(crate) const FILE_NAME: &str = "webhook.journal";
/// Empty the journal (after a sled flush) when it is this big or this old.
const MAX_BYTES: u64 = 8 * 1024 * 1024;
const MAX_AGE: Duration = Duration::from_secs(5);
/// A record longer than this is corrupt (bodies are limited far below it).
const MAX_RECORD: usize = 64 * 1024 * 1024;

#[derive(Serialize, Deserialize)]
struct Record {
    integration: String,
    items: Vec<QueueItem>,
}

struct Request {
    record: Vec<u8>,
    integration: String,
    items: Vec<Vec<u8>>,
    reply: oneshot::Sender<Result<(), String>>,
}

pub(crate) struct Journal {
    /// Stopped and joined with the last store handle (it holds the database).
    writer: Worker<Request>,
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

fn insert(db: &sled::Db, tree: &sled::Tree, encoded: &[u8]) -> Result<(), String> {
    let id = db.generate_id().map_err(|e| e.to_string())?;
    tree.insert(id.to_be_bytes(), encoded)
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Reads the complete records at the start of `bytes`.
fn records(bytes: &[u8]) -> Vec<Record> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while bytes.len() >= at + 8 {
        let len =
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
        let crc = u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
        let start = at + 8;
        if len > MAX_RECORD || bytes.len() < start + len {
            break;
        }
        let payload = &bytes[start..start + len];
        if crc32fast::hash(payload) != crc {
            break;
        }
        match serde_json::from_slice::<Record>(payload) {
            Ok(r) => out.push(r),
            Err(_) => break,
        }
        at = start + len;
    }
    out
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Empties the journal once sled holds everything in it durably.
fn checkpoint(db: &sled::Db, file: &mut File) -> Result<(), String> {
    db.flush().map_err(|e| e.to_string())?;
    file.set_len(0).map_err(|e| e.to_string())?;
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    file.sync_all().map_err(|e| e.to_string())
}

impl Journal {
    /// Opens (creating) the journal in `dir`, queues what it still holds, and starts the
    /// writer thread.
    pub(crate) fn open(db: sled::Db, dir: &Path) -> Result<Arc<Journal>, StoreError> {
        let path: PathBuf = dir.join(FILE_NAME);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|e| io_err(&path, e))?;
        let mut trees = HashMap::new();
        if !bytes.is_empty() {
            let recs = records(&bytes);
            let mut n = 0usize;
            for r in &recs {
                let tree = queue_tree(&db, &mut trees, &r.integration).map_err(StoreError::Io)?;
                for it in &r.items {
                    insert(&db, &tree, &super::encode(it)?).map_err(StoreError::Io)?;
                    n += 1;
                }
            }
            tracing::info!(
                items = n,
                bytes = bytes.len(),
                "webhook journal replayed into the queues"
            );
            checkpoint(&db, &mut file).map_err(StoreError::Io)?;
        }
        let writer = Worker::spawn("webhook-journal".into(), move |rx| {
            writer(db, file, rx, trees)
        })
        .map_err(|e| StoreError::Io(format!("cannot start the journal writer: {e}")))?;
        Ok(Arc::new(Journal { writer }))
    }

    /// Resolves once the items are on disk (journal) and in the integration's queue.
    pub(crate) async fn append(
        &self,
        integration: &str,
        items: &[QueueItem],
    ) -> Result<(), String> {
        let payload = serde_json::to_vec(&Record {
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

fn writer(
    db: sled::Db,
    mut file: File,
    rx: mpsc::Receiver<Request>,
    mut trees: HashMap<String, sled::Tree>,
) {
    let mut written: u64 = 0;
    let mut since = Instant::now();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(r) = rx.try_recv() {
            batch.push(r);
        }
        let mut buf = Vec::with_capacity(batch.iter().map(|r| r.record.len()).sum());
        for r in &batch {
            buf.extend_from_slice(&r.record);
        }
        let durable = file
            .write_all(&buf)
            .and_then(|_| file.sync_data())
            .map_err(|e| format!("webhook journal: {e}"));
        if durable.is_ok() {
            written += buf.len() as u64;
        }
        for r in batch {
            let result = durable.clone().and_then(|_| {
                let tree = queue_tree(&db, &mut trees, &r.integration)?;
                r.items.iter().try_for_each(|it| insert(&db, &tree, it))
            });
            let _ = r.reply.send(result);
        }
        if written > 0 && (written >= MAX_BYTES || since.elapsed() >= MAX_AGE) {
            match checkpoint(&db, &mut file) {
                Ok(()) => {
                    written = 0;
                    since = Instant::now();
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot empty the webhook journal; it keeps growing until this works")
                }
            }
        }
    }
    // Shutting down: leave nothing for the next start to replay.
    if written > 0 {
        if let Err(e) = checkpoint(&db, &mut file) {
            tracing::warn!(error = %e, "webhook journal not emptied at shutdown; it is replayed at the next start");
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

    #[test]
    fn records_stop_at_a_torn_or_corrupt_tail() {
        let rec = |u: &str| {
            frame(
                &serde_json::to_vec(&Record {
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
            &serde_json::to_vec(&Record {
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
