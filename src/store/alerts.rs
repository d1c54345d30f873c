//! The alert outbox (`_alerts/outbox`) and the alert marks (`_alerts/marks`), shared by all
//! integrations (entries name theirs; mark keys start with it). `_` cannot begin an
//! integration name, so these trees never meet an integration's.
//!
//! Owns only the layout: entries are opaque serde values under sled-generated u64 ids (arrival
//! order); a mark is a time under a string key. What they mean is `alert`'s business.

use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Serialize};

use super::{decode, encode, IntegrationStore, Store, StoreError};

const OUTBOX: &str = "_alerts/outbox";
const MARKS: &str = "_alerts/marks";
const UNDECODABLE: &str = "_alerts/undecodable";

/// Handle on the alert trees. Clone is cheap.
#[derive(Clone)]
pub(crate) struct AlertTrees {
    outbox: sled::Tree,
    marks: sled::Tree,
    db: sled::Db,
}

impl AlertTrees {
    fn open(db: &sled::Db) -> Result<AlertTrees, StoreError> {
        Ok(AlertTrees {
            outbox: db.open_tree(OUTBOX)?,
            marks: db.open_tree(MARKS)?,
            db: db.clone(),
        })
    }

    /// Every outbox entry, oldest first. An entry that no longer decodes (corruption, or
    /// written by a newer version before a rollback) is moved to `_alerts/undecodable` with an
    /// error log line, so it cannot stop every other alert from being sent.
    pub(crate) fn entries<T: DeserializeOwned>(&self) -> Result<Vec<(u64, T)>, StoreError> {
        let mut out = Vec::new();
        for r in self.outbox.iter() {
            let (k, v) = r?;
            match decode(OUTBOX, &k, &v) {
                Ok(e) => out.push((id_of(&k), e)),
                Err(e) => {
                    tracing::error!(error = %e, "ALERT LOST: an outbox entry cannot be read; set aside in _alerts/undecodable");
                    self.db.open_tree(UNDECODABLE)?.insert(&k, v)?;
                    self.outbox.remove(&k)?;
                }
            }
        }
        Ok(out)
    }

    #[cfg(test)]
    pub(crate) fn entry<T: DeserializeOwned>(&self, id: u64) -> Result<Option<T>, StoreError> {
        match self.outbox.get(id.to_be_bytes())? {
            Some(v) => Ok(Some(decode(OUTBOX, &id.to_be_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// Appends an entry; returns its id.
    pub(crate) fn push<T: Serialize>(&self, entry: &T) -> Result<u64, StoreError> {
        let id = self.db.generate_id()?;
        self.outbox.insert(id.to_be_bytes(), encode(entry)?)?;
        Ok(id)
    }

    pub(crate) fn put<T: Serialize>(&self, id: u64, entry: &T) -> Result<(), StoreError> {
        self.outbox.insert(id.to_be_bytes(), encode(entry)?)?;
        Ok(())
    }

    pub(crate) fn remove(&self, id: u64) -> Result<(), StoreError> {
        self.outbox.remove(id.to_be_bytes())?;
        Ok(())
    }

    pub(crate) fn mark(&self, key: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        match self.marks.get(key.as_bytes())? {
            Some(v) => Ok(Some(decode(MARKS, key.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    pub(crate) fn set_mark(&self, key: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.marks.insert(key.as_bytes(), encode(&at)?)?;
        Ok(())
    }

    /// Forgets marks older than `before`; returns how many.
    pub(crate) fn prune_marks(&self, before: DateTime<Utc>) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for r in self.marks.iter() {
            let (k, v) = r?;
            // An unreadable mark is as good as an old one.
            let old = serde_json::from_slice::<DateTime<Utc>>(&v).map_or(true, |t| t < before);
            if old {
                batch.remove(k);
                n += 1;
            }
        }
        self.marks.apply_batch(batch)?;
        Ok(n)
    }

    /// Blocks until the outbox and marks are on disk.
    pub(crate) fn flush(&self) -> Result<(), StoreError> {
        self.outbox.flush()?;
        Ok(())
    }
}

fn id_of(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = k.len().min(8);
    b[..n].copy_from_slice(&k[..n]);
    u64::from_be_bytes(b)
}

impl Store {
    pub(crate) fn alerts(&self) -> Result<AlertTrees, StoreError> {
        AlertTrees::open(&self.db)
    }
}

impl IntegrationStore {
    pub(crate) fn alerts(&self) -> Result<AlertTrees, StoreError> {
        AlertTrees::open(&self.db)
    }

    /// The clientState generated and kept in the store, if any (never creates one), so that
    /// alerts can be scrubbed of it.
    pub(crate) fn stored_client_state(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .meta
            .get(b"client_state")?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_keep_arrival_order_and_marks_prune() {
        let s = Store::temporary().unwrap();
        let a = s.alerts().unwrap();
        let first = a.push(&"one").unwrap();
        let second = a.push(&"two").unwrap();
        assert!(first < second);
        assert_eq!(
            a.entries::<String>().unwrap(),
            vec![(first, "one".to_string()), (second, "two".to_string())]
        );
        a.remove(first).unwrap();
        assert_eq!(a.entry::<String>(first).unwrap(), None);
        let now = Utc::now();
        a.set_mark("x\0old", now - chrono::Duration::days(40))
            .unwrap();
        a.set_mark("x\0new", now).unwrap();
        assert_eq!(a.prune_marks(now - chrono::Duration::days(1)).unwrap(), 1);
        assert_eq!(a.mark("x\0new").unwrap(), Some(now));
        assert_eq!(a.mark("x\0old").unwrap(), None);
    }

    #[test]
    fn an_undecodable_entry_is_set_aside_and_the_rest_still_read() {
        let s = Store::temporary().unwrap();
        let a = s.alerts().unwrap();
        let bad = a.push(&"not a number").unwrap();
        let good = a.push(&7u32).unwrap();
        assert_eq!(a.entries::<u32>().unwrap(), vec![(good, 7)]);
        assert_eq!(
            a.entry::<u32>(bad).unwrap(),
            None,
            "moved out of the outbox"
        );
        assert_eq!(a.entries::<u32>().unwrap(), vec![(good, 7)]);
    }
}
