//! A named thread fed jobs through a channel, stopped and joined when its owner is dropped:
//! the group-commit flusher, the webhook journal writer and the reconcile's index writer.
//!
//! Each holds a database handle, so the drop waits for it: the jobs already sent are done and
//! the handle is let go (the directory's lock released) before the owner's drop returns.

use std::sync::mpsc;
use std::thread::JoinHandle;

pub(crate) struct Worker<J> {
    jobs: Option<mpsc::Sender<J>>,
    thread: Option<JoinHandle<()>>,
}

impl<J: Send + 'static> Worker<J> {
    /// Starts `run` on a thread named `name`; it gets the jobs, and its receive fails once the
    /// worker is dropped and every job sent before was received.
    pub(crate) fn spawn(
        name: String,
        run: impl FnOnce(mpsc::Receiver<J>) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (jobs, rx) = mpsc::channel::<J>();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(rx))?;
        Ok(Worker {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Hands a job to the thread; gives it back when the thread has ended.
    pub(crate) fn send(&self, job: J) -> Result<(), J> {
        match &self.jobs {
            Some(tx) => tx.send(job).map_err(|e| e.0),
            None => Err(job),
        }
    }
}

impl<J> Drop for Worker<J> {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop once the queued jobs are done.
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("a store worker thread panicked");
            }
        }
    }
}
