//! Group commit: one blocking `flush()` on a dedicated thread serves every caller that was
//! waiting when it started.
//!
//! sled 0.34's `flush_async()` deadlocks with many concurrent callers (spacejam/sled#1308), so
//! request handlers never call it. They write, then ask this committer for durability and await
//! the answer; the flusher thread drains all waiting requests, flushes once and answers them all.
//! A request that arrives during a flush waits for the next one, so every answer covers the
//! writes its caller made before asking.

use std::sync::mpsc;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::health::WriteHealth;
use super::thread::Worker;

type Waiter = oneshot::Sender<Result<(), String>>;

pub(crate) struct GroupCommit {
    /// The flusher holds a database handle: it is stopped and joined with the last store
    /// handle, so the directory's lock is released when the store is dropped, not some time
    /// later. `None` when the thread could not be started.
    flusher: Option<Worker<Waiter>>,
}

impl GroupCommit {
    /// `health` hears of every flush's outcome.
    pub(crate) fn start(db: sled::Db, health: Arc<WriteHealth>) -> Arc<GroupCommit> {
        let spawned = Worker::spawn("store-flusher".into(), move |rx: mpsc::Receiver<Waiter>| {
            while let Ok(first) = rx.recv() {
                let mut waiters = vec![first];
                while let Ok(w) = rx.try_recv() {
                    waiters.push(w);
                }
                let r = db.flush().map(|_| ()).map_err(|e| e.to_string());
                match &r {
                    Ok(()) => health.succeeded(),
                    Err(e) => health.failed("flushing the store", e),
                }
                for w in waiters {
                    let _ = w.send(r.clone());
                }
            }
        });
        let flusher = match spawned {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the store flusher thread; durable writes will fail");
                None
            }
        };
        Arc::new(GroupCommit { flusher })
    }

    /// Resolves once everything written before the call is on disk.
    pub(crate) async fn durable(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        match self.flusher.as_ref() {
            Some(f) => f
                .send(tx)
                .map_err(|_| "the store flusher has stopped".to_string())?,
            None => return Err("the store flusher is not running".into()),
        }
        rx.await
            .map_err(|_| "the store flusher has stopped".to_string())?
    }
}
