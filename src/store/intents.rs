//! Intent before effect (`<integration>/intents`): what LMS writes are about to do.
//!
//! Before a set of changes is sent to the LMS, their intents are stored as one record and made
//! durable; once the LMS answered and the index entries are written, the record is removed
//! (or kept with only the users whose outcome is uncertain, e.g. a timeout). A crash at any
//! instant therefore leaves either no record (nothing was sent, or everything was indexed) or a
//! record naming every user whose index entry may not be what the LMS holds. Those are read
//! back from the LMS at the next start of `serve` and at the start of every reconcile
//! (`sync::apply::settle_intents`) before anything trusts the index.
//!
//! One record per chunk of changes, not one per user: a first reconcile of 100,000 users
//! writes a few hundred of them, not 200,000 extra index writes.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{decode, encode, IntegrationStore, StoreError};

/// One write that is about to be sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Intent {
    pub entra_id: String,
    /// `create`, `update`, `deactivate` or `reactivate`.
    pub action: String,
    /// The LMS user written to (none for a create).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_id: Option<String>,
    pub user_name: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct IntentRecord {
    at: DateTime<Utc>,
    intents: Vec<Intent>,
}

/// The key of one stored intent record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct IntentId(u64);

impl IntegrationStore {
    /// Stores intents (not yet durable: await [`IntegrationStore::durable`] before the LMS
    /// sees the writes).
    pub(crate) fn record_intents(&self, intents: Vec<Intent>) -> Result<IntentId, StoreError> {
        let id = self.db.generate_id()?;
        let rec = IntentRecord {
            at: Utc::now(),
            intents,
        };
        self.intents.insert(id.to_be_bytes(), encode(&rec)?)?;
        Ok(IntentId(id))
    }

    /// The writes of a record are settled: removes it, or keeps only `uncertain` ones (their
    /// outcome is unknown, e.g. the LMS timed out). Call after the index entries are written.
    pub(crate) fn settle_intents(
        &self,
        id: IntentId,
        uncertain: Vec<Intent>,
    ) -> Result<(), StoreError> {
        if uncertain.is_empty() {
            self.intents.remove(id.0.to_be_bytes())?;
        } else {
            let rec = IntentRecord {
                at: Utc::now(),
                intents: uncertain,
            };
            self.intents.insert(id.0.to_be_bytes(), encode(&rec)?)?;
        }
        Ok(())
    }

    /// Every intent left by an earlier process or run, with its record. An unreadable record
    /// is reported, not skipped: it would hide writes whose outcome is unknown.
    pub(crate) fn pending_intents(&self) -> Result<Vec<(IntentId, Intent)>, StoreError> {
        let tree = format!("{}/intents", self.name);
        let mut out = Vec::new();
        for r in self.intents.iter() {
            let (k, v) = r?;
            let rec: IntentRecord = decode(&tree, &k, &v)?;
            let mut b = [0u8; 8];
            let n = k.len().min(8);
            b[..n].copy_from_slice(&k[..n]);
            let id = IntentId(u64::from_be_bytes(b));
            out.extend(rec.intents.into_iter().map(|i| (id, i)));
        }
        Ok(out)
    }

    /// Removes intent records once their users were read back from the LMS.
    #[cfg(test)]
    pub(crate) fn drop_intents(&self, ids: &[IntentId]) -> Result<(), StoreError> {
        for id in ids {
            self.intents.remove(id.0.to_be_bytes())?;
        }
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn intents_len(&self) -> usize {
        self.intents.len()
    }
}

#[cfg(test)]
mod tests {
    use crate::store::tests::store_a;

    use super::*;

    fn intent(id: &str) -> Intent {
        Intent {
            entra_id: id.into(),
            action: "update".into(),
            target_id: Some(format!("t-{id}")),
            user_name: format!("{id}@x"),
        }
    }

    #[test]
    fn intents_stay_until_settled_and_uncertain_ones_stay_after() {
        let (_s, a) = store_a();
        let r1 = a.record_intents(vec![intent("u1"), intent("u2")]).unwrap();
        let r2 = a.record_intents(vec![intent("u3")]).unwrap();
        assert_eq!(a.pending_intents().unwrap().len(), 3);
        a.settle_intents(r1, vec![intent("u2")]).unwrap();
        a.settle_intents(r2, Vec::new()).unwrap();
        let left = a.pending_intents().unwrap();
        assert_eq!(left, vec![(r1, intent("u2"))]);
        a.drop_intents(&[r1]).unwrap();
        assert!(a.pending_intents().unwrap().is_empty());
        assert_eq!(a.intents_len(), 0);
    }
}
