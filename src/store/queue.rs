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
    /// A queue entry that could not be decoded (written by a newer version, or damaged): kept
    /// in the dead letters as it was (base64 of at most its first 4 KiB) instead of blocking
    /// the queue.
    Undecodable { bytes: usize, raw: String },
}

impl Hint {
    pub(crate) fn describe(&self) -> String {
        match self {
            Hint::Membership { group_id } => format!("membership of group {group_id}"),
            Hint::User { user_id, .. } => format!("user {user_id}"),
            Hint::Lifecycle {
                event,
                subscription_id,
            } => format!("lifecycle {event} for subscription {subscription_id}"),
            Hint::Reconcile { reason } => format!("full reconcile ({reason})"),
            Hint::Undecodable { bytes, .. } => format!("undecodable queue entry ({bytes} bytes)"),
        }
    }
}

/// Queued items by id, in arrival order.
pub(crate) type Ready = Vec<(u64, QueueItem)>;

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
    /// When Graph first answered 404 for this user hint: a deletion is only believed on a
    /// second 404 some seconds later (a replica may lag right after a create or a restore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_since: Option<DateTime<Utc>>,
    /// Replayed with `--allow-mass-deactivation`: its deactivation passes the guard.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_mass_deactivation: bool,
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
            missing_since: None,
            allow_mass_deactivation: false,
        }
    }

    /// A hint rostersync derives itself for one user (a delta round's member, a manager's
    /// report, a user read back after a crash): it does not fan out to the user's reports.
    pub(crate) fn follow_up(user_id: String) -> QueueItem {
        QueueItem::new(Hint::User {
            user_id,
            follow_up: true,
        })
    }

    /// What an undecodable entry becomes: a dead letter that shows its bytes.
    fn undecodable(bytes: &[u8], error: String) -> QueueItem {
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD.encode(&bytes[..bytes.len().min(4096)]);
        let mut it = QueueItem::new(Hint::Undecodable {
            bytes: bytes.len(),
            raw,
        });
        it.last_error = Some(error);
        it
    }
}

/// A queue value as an item; one that cannot be decoded becomes [`Hint::Undecodable`].
fn decode_item(tree: &str, k: &[u8], v: &[u8]) -> QueueItem {
    match decode::<QueueItem>(tree, k, v) {
        Ok(it) => it,
        Err(e) => QueueItem::undecodable(v, e.to_string()),
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
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueStats {
    pub queued: usize,
    pub waiting_retry: usize,
    pub dead: usize,
    pub oldest_queued_at: Option<DateTime<Utc>>,
}

impl IntegrationStore {
    /// Appends items and resolves once they are durable (what a 202 may promise): through the
    /// webhook journal when the store has one, else by a sled flush.
    pub(crate) async fn enqueue_durable(&self, items: &[QueueItem]) -> Result<(), StoreError> {
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

    /// Up to `limit` items in arrival order whose backoff has passed. An entry that cannot be
    /// decoded is moved to the dead letters with its bytes (it must not block the queue).
    pub fn queue_ready(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<(u64, QueueItem)>, StoreError> {
        Ok(self.queue_ready_next(now, limit)?.0)
    }

    /// [`Self::queue_ready`], and the earliest backoff among the items it passed over (when
    /// the worker should look again; complete when fewer than `limit` items are ready).
    pub(crate) fn queue_ready_next(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<(Ready, Option<DateTime<Utc>>), StoreError> {
        let tree = format!("{}/queue", self.name);
        let mut out = Vec::new();
        let mut next: Option<DateTime<Utc>> = None;
        for r in self.queue.iter() {
            let (k, v) = r?;
            let it = decode_item(&tree, &k, &v);
            if matches!(it.hint, Hint::Undecodable { .. }) {
                tracing::error!(integration = %self.name, item = id_of(&k), error = ?it.last_error, "undecodable queue entry moved to the dead letters");
                self.bury(id_of(&k), &it)?;
                continue;
            }
            if let Some(t) = it.not_before.filter(|t| *t > now) {
                next = Some(next.map_or(t, |n| n.min(t)));
                continue;
            }
            out.push((id_of(&k), it));
            if out.len() >= limit {
                break;
            }
        }
        Ok((out, next))
    }

    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// Removes applied items (one remove each, so the in-memory count knows which existed).
    pub(crate) fn dequeue(&self, ids: &[u64]) -> Result<(), StoreError> {
        for id in ids {
            let old = self.queue.remove(key(*id))?;
            self.counts.removed(&old);
        }
        Ok(())
    }

    /// Rewrites an item (after a failed attempt).
    pub(crate) fn requeue(&self, id: u64, item: &QueueItem) -> Result<(), StoreError> {
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
    pub(crate) fn retrying(&self, limit: usize) -> Result<Vec<(u64, QueueItem)>, StoreError> {
        let tree = format!("{}/queue", self.name);
        let mut out = Vec::new();
        for r in self.queue.iter() {
            let (k, v) = r?;
            let it = decode_item(&tree, &k, &v);
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
    pub(crate) fn dead_letters_first(
        &self,
        limit: usize,
    ) -> Result<Vec<(u64, QueueItem)>, StoreError> {
        let tree = format!("{}/dead", self.name);
        self.dead
            .iter()
            .take(limit)
            .map(|r| {
                let (k, v) = r?;
                Ok((id_of(&k), decode_item(&tree, &k, &v)))
            })
            .collect()
    }

    pub fn dead_letters(&self) -> Result<Vec<(u64, QueueItem)>, StoreError> {
        self.dead_letters_first(usize::MAX)
    }

    /// At most `limit` dead letters with an id above `after` (all from the first without),
    /// oldest first: a page of `queue dead`.
    pub(crate) fn dead_letters_after(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, QueueItem)>, StoreError> {
        let tree = format!("{}/dead", self.name);
        let from = match after {
            None => 0,
            Some(u64::MAX) => return Ok(Vec::new()),
            Some(a) => a + 1,
        };
        self.dead
            .range(key(from)..)
            .take(limit)
            .map(|r| {
                let (k, v) = r?;
                Ok((id_of(&k), decode_item(&tree, &k, &v)))
            })
            .collect()
    }

    /// Moves dead letters back to the queue with a fresh attempt count (`None`: all of them);
    /// `allow_mass_deactivation` lets their deactivations pass the guard. Undecodable entries
    /// stay (there is nothing to replay). Returns how many were moved.
    pub fn replay(
        &self,
        id: Option<u64>,
        allow_mass_deactivation: bool,
    ) -> Result<usize, StoreError> {
        let items: Vec<(u64, QueueItem)> = match id {
            Some(id) => {
                let tree = format!("{}/dead", self.name);
                match self.dead.get(key(id))? {
                    Some(v) => vec![(id, decode_item(&tree, &key(id), &v))],
                    None => Vec::new(),
                }
            }
            None => self.dead_letters()?,
        };
        let mut moved = 0;
        for (id, mut it) in items {
            if matches!(it.hint, Hint::Undecodable { .. }) {
                continue;
            }
            it.attempts = 0;
            it.not_before = None;
            it.dead_at = None;
            it.missing_since = None;
            it.allow_mass_deactivation = allow_mass_deactivation;
            self.enqueue(&[it])?;
            if self.dead.remove(key(id))?.is_some() {
                self.counts
                    .dead
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
            moved += 1;
        }
        Ok(moved)
    }

    pub fn queue_stats(&self, now: DateTime<Utc>) -> Result<QueueStats, StoreError> {
        let tree = format!("{}/queue", self.name);
        let mut s = QueueStats {
            dead: self.dead.len(),
            ..Default::default()
        };
        for r in self.queue.iter() {
            let (k, v) = r?;
            let it = decode_item(&tree, &k, &v);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::store_a;

    #[test]
    fn an_undecodable_entry_goes_to_the_dead_letters_and_blocks_nothing() {
        let (_s, a) = store_a();
        let user = |u: &str| {
            QueueItem::new(Hint::User {
                user_id: u.into(),
                follow_up: false,
            })
        };
        let ids = a.enqueue(&[user("u0"), user("u1"), user("u2")]).unwrap();
        a.queue.insert(key(ids[0]), &b"{not an item"[..]).unwrap();
        let ready = a.queue_ready(Utc::now(), 10).unwrap();
        assert_eq!(ready.len(), 2, "{ready:?}");
        let dead = a.dead_letters().unwrap();
        assert_eq!(dead.len(), 1);
        assert!(
            matches!(&dead[0].1.hint, Hint::Undecodable { bytes: 12, raw } if raw == "e25vdCBhbiBpdGVt"),
            "{dead:?}"
        );
        assert!(dead[0].1.last_error.is_some());
        assert_eq!(a.replay(None, false).unwrap(), 0, "nothing to replay");
        assert_eq!(a.queue_stats(Utc::now()).unwrap().dead, 1);
    }

    /// The worker learns when to look again: the earliest backoff among the waiting items.
    #[test]
    fn the_earliest_backoff_of_the_waiting_items_comes_with_the_ready_ones() {
        let (_s, a) = store_a();
        let now = Utc::now();
        let item = |u: &str, after: Option<i64>| {
            let mut it = QueueItem::new(Hint::User {
                user_id: u.into(),
                follow_up: false,
            });
            it.not_before = after.map(|s| now + chrono::Duration::seconds(s));
            it
        };
        a.enqueue(&[item("late", Some(30)), item("ready", None)])
            .unwrap();
        a.enqueue(&[item("soon", Some(3)), item("past", Some(-1))])
            .unwrap();
        let (ready, next) = a.queue_ready_next(now, 10).unwrap();
        let ids: Vec<_> = ready
            .iter()
            .map(|(_, it)| match &it.hint {
                Hint::User { user_id, .. } => user_id.as_str(),
                _ => "?",
            })
            .collect();
        assert_eq!(ids, ["ready", "past"]);
        assert_eq!(next, Some(now + chrono::Duration::seconds(3)));
        a.dequeue(&ready.iter().map(|(id, _)| *id).collect::<Vec<_>>())
            .unwrap();
        let (ready, next) = a
            .queue_ready_next(now + chrono::Duration::seconds(5), 10)
            .unwrap();
        assert_eq!(ready.len(), 1);
        assert_eq!(next, Some(now + chrono::Duration::seconds(30)));
    }
}
