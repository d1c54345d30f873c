//! The notification queue and its dead letters (`<integration>/queue`, `<integration>/dead`).
//!
//! Keys are sled-generated u64 ids in big-endian order, so iteration is arrival order. An item
//! leaves the queue only when the worker applied it or moved it to the dead-letter tree.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{decode, encode, IntegrationStore, StoreError};

/// What a notification tells the worker to look at. Hints, not truth: the worker re-reads
/// Graph before changing anything.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Hint {
    /// The membership of this group (one of ours or a nested one) changed.
    Membership { group_id: String },
    /// This user changed (or was created, soft-deleted, deleted). `follow_up` marks hints the
    /// worker derived itself (a manager's reports, a delta round's members); those do not fan
    /// out to further reports.
    User {
        user_id: String,
        #[serde(default)]
        follow_up: bool,
    },
    /// A lifecycle event for one of our subscriptions.
    Lifecycle {
        event: String,
        subscription_id: String,
    },
    /// Run a full reconcile (a gap in notifications was detected).
    Reconcile { reason: String },
}

impl Hint {
    pub fn describe(&self) -> String {
        match self {
            Hint::Membership { group_id } => format!("membership of group {group_id}"),
            Hint::User { user_id, .. } => format!("user {user_id}"),
            Hint::Lifecycle {
                event,
                subscription_id,
            } => format!("lifecycle {event} for subscription {subscription_id}"),
            Hint::Reconcile { reason } => format!("full reconcile ({reason})"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueItem {
    pub hint: Hint,
    pub received_at: DateTime<Utc>,
    #[serde(default)]
    pub attempts: u32,
    /// Not retried before this time (backoff after a failure).
    #[serde(default)]
    pub not_before: Option<DateTime<Utc>>,
    #[serde(default)]
    pub last_error: Option<String>,
    /// Set on dead letters.
    #[serde(default)]
    pub dead_at: Option<DateTime<Utc>>,
}

impl QueueItem {
    pub fn new(hint: Hint) -> QueueItem {
        QueueItem {
            hint,
            received_at: Utc::now(),
            attempts: 0,
            not_before: None,
            last_error: None,
            dead_at: None,
        }
    }
}

fn key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

fn id_of(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = k.len().min(8);
    b[..n].copy_from_slice(&k[..n]);
    u64::from_be_bytes(b)
}

/// Queue and dead-letter counts.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct QueueStats {
    pub queued: usize,
    pub waiting_retry: usize,
    pub dead: usize,
    pub oldest_queued_at: Option<DateTime<Utc>>,
}

impl IntegrationStore {
    /// Appends items and resolves once they are durable (what a 202 may promise): through the
    /// webhook journal when the store has one, else by a sled flush.
    pub async fn enqueue_durable(&self, items: &[QueueItem]) -> Result<(), StoreError> {
        if self.fail_writes() {
            return Err(StoreError::Io("writes are failing (injected)".into()));
        }
        match &self.journal {
            Some(j) => j.append(&self.name, items).await.map_err(StoreError::Io),
            None => {
                self.enqueue(items)?;
                self.durable().await
            }
        }
    }

    /// Appends items (not yet durable: await [`IntegrationStore::durable`] before acknowledging).
    ///
    /// Plain inserts, not one atomic batch: sled 0.34's `apply_batch` writes out (and
    /// `sync_file_range`s) its log buffer twice per call, which undid the group commit at
    /// every webhook request. No caller needs the items all-or-nothing: each awaits `durable`
    /// before acknowledging (the webhook's 202) or advancing (a delta link), so a crash in
    /// between can only keep some of the hints, and Graph retries or the round repeats
    /// (hints are idempotent).
    pub fn enqueue(&self, items: &[QueueItem]) -> Result<Vec<u64>, StoreError> {
        if self.fail_writes() {
            return Err(StoreError::Io("writes are failing (injected)".into()));
        }
        let encoded = items.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
        let mut ids = Vec::with_capacity(items.len());
        for bytes in encoded {
            let id = self.db.generate_id()?;
            let old = self.queue.insert(key(id), bytes)?;
            self.counts.inserted(&old);
            ids.push(id);
        }
        Ok(ids)
    }

    /// Up to `limit` items in arrival order whose backoff has passed.
    pub fn queue_ready(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<(u64, QueueItem)>, StoreError> {
        let tree = format!("{}/queue", self.name);
        let mut out = Vec::new();
        for r in self.queue.iter() {
            let (k, v) = r?;
            let it: QueueItem = decode(&tree, &k, &v)?;
            if it.not_before.is_some_and(|t| t > now) {
                continue;
            }
            out.push((id_of(&k), it));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The earliest `not_before` among waiting items (when the worker should look again).
    pub fn queue_next_retry(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let tree = format!("{}/queue", self.name);
        let mut next: Option<DateTime<Utc>> = None;
        for r in self.queue.iter() {
            let (k, v) = r?;
            let it: QueueItem = decode(&tree, &k, &v)?;
            if let Some(t) = it.not_before {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        Ok(next)
    }

    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// Removes applied items (one remove each, so the in-memory count knows which existed).
    pub fn dequeue(&self, ids: &[u64]) -> Result<(), StoreError> {
        for id in ids {
            let old = self.queue.remove(key(*id))?;
            self.counts.removed(&old);
        }
        Ok(())
    }

    /// Rewrites an item (after a failed attempt).
    pub fn requeue(&self, id: u64, item: &QueueItem) -> Result<(), StoreError> {
        let old = self.queue.insert(key(id), encode(item)?)?;
        self.counts.inserted(&old);
        Ok(())
    }

    /// Moves an item from the queue to the dead-letter tree.
    pub fn bury(&self, id: u64, item: &QueueItem) -> Result<(), StoreError> {
        let mut dead = item.clone();
        dead.dead_at = Some(Utc::now());
        if self.dead.insert(key(id), encode(&dead)?)?.is_none() {
            self.counts
                .dead
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let old = self.queue.remove(key(id))?;
        self.counts.removed(&old);
        Ok(())
    }

    /// The first `limit` queued items that failed at least once (for `/status`).
    pub fn retrying(&self, limit: usize) -> Result<Vec<(u64, QueueItem)>, StoreError> {
        let tree = format!("{}/queue", self.name);
        let mut out = Vec::new();
        for r in self.queue.iter() {
            let (k, v) = r?;
            let it: QueueItem = decode(&tree, &k, &v)?;
            if it.attempts > 0 {
                out.push((id_of(&k), it));
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The oldest `limit` dead letters (for `/status`), without decoding the rest.
    pub fn dead_letters_first(&self, limit: usize) -> Result<Vec<(u64, QueueItem)>, StoreError> {
        let tree = format!("{}/dead", self.name);
        self.dead
            .iter()
            .take(limit)
            .map(|r| {
                let (k, v) = r?;
                Ok((id_of(&k), decode(&tree, &k, &v)?))
            })
            .collect()
    }

    pub fn dead_letters(&self) -> Result<Vec<(u64, QueueItem)>, StoreError> {
        self.dead_letters_first(usize::MAX)
    }

    /// Moves dead letters back to the queue with a fresh attempt count (`None`: all of them).
    /// Returns how many were moved.
    pub fn replay(&self, id: Option<u64>) -> Result<usize, StoreError> {
        let items: Vec<(u64, QueueItem)> = match id {
            Some(id) => {
                let tree = format!("{}/dead", self.name);
                match self.dead.get(key(id))? {
                    Some(v) => vec![(id, decode(&tree, &key(id), &v)?)],
                    None => Vec::new(),
                }
            }
            None => self.dead_letters()?,
        };
        for (id, mut it) in items.iter().cloned() {
            it.attempts = 0;
            it.not_before = None;
            it.dead_at = None;
            self.enqueue(&[it])?;
            if self.dead.remove(key(id))?.is_some() {
                self.counts
                    .dead
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(items.len())
    }

    pub fn queue_stats(&self, now: DateTime<Utc>) -> Result<QueueStats, StoreError> {
        let tree = format!("{}/queue", self.name);
        let mut s = QueueStats {
            dead: self.dead.len(),
            ..Default::default()
        };
        for r in self.queue.iter() {
            let (k, v) = r?;
            let it: QueueItem = decode(&tree, &k, &v)?;
            s.queued += 1;
            if it.not_before.is_some_and(|t| t > now) {
                s.waiting_retry += 1;
            }
            s.oldest_queued_at = Some(
                s.oldest_queued_at
                    .map_or(it.received_at, |o| o.min(it.received_at)),
            );
        }
        Ok(s)
    }
}
