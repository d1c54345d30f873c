//! Cheap views of the store for request handlers and probes: nothing here decodes a record or
//! writes anything.
//!
//! - [`WriteHealth`]: the outcome of the store's own last writes (journal appends and syncs,
//!   sled flushes), which is what `/readyz` reports instead of writing a probe key;
//! - [`QueueCounts`]: queue and dead-letter sizes kept in memory as items come and go, which is
//!   what `/metrics` reports instead of decoding the queue at every scrape;
//! - [`IntegrationStore::has_subscription`]: a key lookup for the webhook's hot path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

use super::IntegrationStore;

/// Below this much free space in the data directory's file system the store is reported not
/// writable: the webhook journal alone grows to 8 MiB between checkpoints.
pub(crate) const MIN_FREE_BYTES: u64 = 16 * 1024 * 1024;

/// The last failed write of the store, cleared by the next one that succeeds, and the data
/// directory whose free space is looked at (on-disk stores).
#[derive(Default, Debug)]
pub(crate) struct WriteHealth {
    last_error: Mutex<Option<(DateTime<Utc>, String)>>,
    dir: Mutex<Option<PathBuf>>,
}

/// `Err` when the file system of `dir` has less than `min` bytes free for us (a `statvfs`;
/// nothing is written). Where free space cannot be read, nothing is said.
pub(crate) fn free_space(dir: &Path, min: u64) -> Result<(), String> {
    #[cfg(target_os = "linux")]
    if let Ok(s) = rustix::fs::statvfs(dir) {
        let free = s.f_bavail.saturating_mul(s.f_frsize);
        if free < min {
            return Err(format!(
                "the data directory's file system has {free} bytes free (less than {min})"
            ));
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (dir, min);
    Ok(())
}

impl WriteHealth {
    /// Also watch the free space of `dir`.
    pub(crate) fn watch_dir(&self, dir: &Path) {
        *self.dir.lock().unwrap_or_else(|e| e.into_inner()) = Some(dir.to_path_buf());
    }

    pub(crate) fn failed(&self, what: &str, error: &str) {
        let mut e = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        *e = Some((Utc::now(), format!("{what}: {error}")));
    }

    pub(crate) fn succeeded(&self) {
        let mut e = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        if e.is_some() {
            tracing::info!("store writes work again");
            *e = None;
        }
    }

    /// `Err` with when and what while the last write failed, or while the data directory's
    /// file system is (nearly) full.
    pub(crate) fn state(&self) -> Result<(), String> {
        if let Some((at, what)) = &*self.last_error.lock().unwrap_or_else(|e| e.into_inner()) {
            return Err(format!("last write failed at {}: {what}", at.to_rfc3339()));
        }
        let dir = self.dir.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match dir {
            Some(d) => free_space(&d, MIN_FREE_BYTES),
            None => Ok(()),
        }
    }
}

/// Items in one integration's queue and dead-letter tree, counted as they are inserted and
/// removed (sled tells whether a key was new or existed).
#[derive(Debug)]
pub(crate) struct QueueCounts {
    pub(crate) queued: AtomicI64,
    pub(crate) dead: AtomicI64,
}

impl QueueCounts {
    pub(crate) fn new(queued: usize, dead: usize) -> Self {
        QueueCounts {
            queued: AtomicI64::new(queued as i64),
            dead: AtomicI64::new(dead as i64),
        }
    }

    /// After a queue insert that returned `old`.
    pub(crate) fn inserted(&self, old: &Option<sled::IVec>) {
        if old.is_none() {
            self.queued.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// After a queue remove that returned `old`.
    pub(crate) fn removed(&self, old: &Option<sled::IVec>) {
        if old.is_some() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Every integration's counts, shared by all handles of one store (the journal writer's too).
#[derive(Default, Debug)]
pub(crate) struct Counters(Mutex<HashMap<String, Arc<QueueCounts>>>);

impl Counters {
    /// The counts of `integration`, made from the trees' sizes the first time (one scan of
    /// keys at start-up, never again).
    pub(crate) fn of(
        &self,
        integration: &str,
        queue: &sled::Tree,
        dead: &sled::Tree,
    ) -> Arc<QueueCounts> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            m.entry(integration.to_string())
                .or_insert_with(|| Arc::new(QueueCounts::new(queue.len(), dead.len()))),
        )
    }

    /// The counts of `integration` if some handle made them already.
    pub(crate) fn get(&self, integration: &str) -> Option<Arc<QueueCounts>> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(integration)
            .cloned()
    }
}

impl IntegrationStore {
    /// Whether a subscription id is recorded (a key lookup; the record is not decoded).
    pub(crate) fn has_subscription(&self, id: &str) -> bool {
        self.subs.contains_key(id.as_bytes()).unwrap_or(false)
    }

    /// Queued and dead-letter items, from the counts kept in memory (`/metrics`).
    pub(crate) fn queue_counts(&self) -> (u64, u64) {
        let q = self.counts.queued.load(Ordering::Relaxed).max(0) as u64;
        let d = self.counts.dead.load(Ordering::Relaxed).max(0) as u64;
        (q, d)
    }
}

#[cfg(test)]
impl super::Store {
    /// A digest of every tree's keys and values (tests: "this changed no store key").
    pub(crate) fn digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let mut names = self.db.tree_names();
        names.sort();
        for name in names {
            name.hash(&mut h);
            if let Ok(tree) = self.db.open_tree(&name) {
                for (k, v) in tree.iter().flatten() {
                    k.hash(&mut h);
                    v.hash(&mut h);
                }
            }
        }
        h.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_health_reports_failures_until_a_write_succeeds() {
        let h = WriteHealth::default();
        assert!(h.state().is_ok());
        h.failed("appending", "No space left on device (os error 28)");
        let e = h.state().unwrap_err();
        assert!(e.contains("No space left"), "{e}");
        h.succeeded();
        assert!(h.state().is_ok());
    }

    /// Readiness used to insert a probe key on every call.
    #[test]
    fn the_readiness_check_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let before = store.digest();
        for _ in 0..3 {
            assert!(store.writable());
        }
        assert_eq!(store.digest(), before);
    }

    /// The in-memory counts follow every way items enter and leave the queue and the dead
    /// letters, so `/metrics` need not decode the queue.
    #[tokio::test]
    async fn queue_counts_follow_the_queue() {
        use crate::store::queue::{Hint, QueueItem};
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let name = crate::model::IntegrationName::parse("acme").unwrap();
        let s = store.integration(&name).unwrap();
        let item = |u: &str| {
            QueueItem::new(Hint::User {
                user_id: u.into(),
                follow_up: false,
            })
        };
        s.enqueue_durable(&[item("a"), item("b")]).await.unwrap();
        let ids = s.enqueue(&[item("c"), item("d")]).unwrap();
        assert_eq!(s.queue_counts(), (4, 0));
        s.requeue(ids[0], &item("c")).unwrap();
        s.bury(ids[1], &item("d")).unwrap();
        assert_eq!(s.queue_counts(), (3, 1));
        s.dequeue(&[ids[0], ids[0], 12345]).unwrap();
        assert_eq!(s.queue_counts(), (2, 1));
        s.replay(None, false).unwrap();
        assert_eq!(s.queue_counts(), (3, 0));
        assert_eq!(s.queue_counts().0 as usize, s.queue_len());
        // Another handle of the same integration shares the counts; a reopened store
        // starts from the trees' sizes.
        let again = store.integration(&name).unwrap();
        assert_eq!(again.queue_counts(), (3, 0));
        drop((s, again, store));
        let store = crate::store::Store::open(dir.path()).unwrap();
        assert_eq!(store.integration(&name).unwrap().queue_counts(), (3, 0));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn free_space_is_read_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_space(dir.path(), 0).is_ok());
        let e = free_space(dir.path(), u64::MAX).unwrap_err();
        assert!(e.contains("bytes free"), "{e}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing written"
        );
    }
}
