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

type Waiter = oneshot::Sender<Result<(), String>>;

pub(crate) struct GroupCommit {
    tx: std::sync::Mutex<Option<mpsc::Sender<Waiter>>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for GroupCommit {
    /// The flusher holds a database handle: stop it with the last store handle, so the
    /// directory's lock is released when the store is dropped, not some time later.
    fn drop(&mut self) {
        let tx = self.tx.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        drop(tx);
        if let Some(t) = self
            .thread
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = t.join();
        }
    }
}

impl GroupCommit {
    pub(crate) fn start(db: sled::Db) -> Arc<GroupCommit> {
        let (tx, rx) = mpsc::channel::<Waiter>();
        let spawned = std::thread::Builder::new()
            .name("store-flusher".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiters = vec![first];
                    while let Ok(w) = rx.try_recv() {
                        waiters.push(w);
                    }
                    let r = db.flush().map(|_| ()).map_err(|e| e.to_string());
                    for w in waiters {
                        let _ = w.send(r.clone());
                    }
                }
            });
        let (tx, thread) = match spawned {
            Ok(t) => (Some(tx), Some(t)),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the store flusher thread; durable writes will fail");
                (None, None)
            }
        };
        Arc::new(GroupCommit {
            tx: std::sync::Mutex::new(tx),
            thread: std::sync::Mutex::new(thread),
        })
    }

    /// Resolves once everything written before the call is on disk.
    pub(crate) async fn durable(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        {
            let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
            match guard.as_ref() {
                Some(s) => s
                    .send(tx)
                    .map_err(|_| "the store flusher has stopped".to_string())?,
                None => return Err("the store flusher is not running".into()),
            }
        }
        rx.await
            .map_err(|_| "the store flusher has stopped".to_string())?
    }
}
