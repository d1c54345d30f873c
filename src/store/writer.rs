//! A reconcile's index and trace writes, on a thread of their own at a lower CPU priority.
//!
//! A first reconcile writes one index entry, one manager link and one decision trace per user
//! it creates: several sled inserts of a kilobyte or so each, about as much CPU as the LMS
//! request itself. Done on the async workers (or on tokio's blocking pool at normal priority)
//! they compete with the LMS requests, the Graph reader and, in `serve`, the webhook receiver
//! for the same cores; measured on 2 cores, that cost a first reconcile about a fifth of its
//! rate. The writes are not urgent (the run's own lookups find applied users in memory until
//! they are written), so the writer thread runs at nice +[`NICE`] on Linux and takes the CPU
//! the request path leaves idle. The caller bounds how much may wait for it, so the writer
//! cannot fall behind without limit however busy the machine is.

use tokio::sync::oneshot;

use super::{IndexEntry, IntegrationStore, StoreError};
use crate::sync::trace::Trace;

/// How much lower than the rest of the process the writer thread runs (Linux only; elsewhere
/// the nice value is per process, and it is left alone).
pub const NICE: i32 = 10;

/// The Entra ids written, and whether the store took them.
pub type Written = (Vec<String>, Result<(), StoreError>);

struct Job {
    entries: Vec<(String, IndexEntry)>,
    traces: Vec<Trace>,
    done: oneshot::Sender<Written>,
}

/// Writes index entries, then their traces, in the order given. The thread ends when the
/// writer is dropped, after the jobs already handed to it.
pub struct BackgroundWriter {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl BackgroundWriter {
    pub fn start(store: IntegrationStore) -> Result<Self, StoreError> {
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(format!("{}-index-writer", store.name()))
            .spawn(move || {
                lower_priority();
                while let Ok(job) = rx.recv() {
                    let r = store
                        .put_users(&job.entries)
                        .and_then(|()| store.put_traces(job.traces));
                    let ids = job.entries.into_iter().map(|(id, _)| id).collect();
                    // The run may have ended (failed) without waiting: nothing to tell then.
                    let _ = job.done.send((ids, r));
                }
            })
            .map_err(|e| StoreError::Io(format!("cannot start the index writer thread: {e}")))?;
        Ok(BackgroundWriter { jobs })
    }

    /// Queues index entries and the traces that go with them (a trace relies on its entry).
    /// The answer comes when both are written; a closed channel means the thread died.
    pub fn write(
        &self,
        entries: Vec<(String, IndexEntry)>,
        traces: Vec<Trace>,
    ) -> oneshot::Receiver<Written> {
        let (done, answer) = oneshot::channel();
        // A send fails only when the thread is gone; `answer` then reports it (closed).
        let _ = self.jobs.send(Job {
            entries,
            traces,
            done,
        });
        answer
    }
}

#[cfg(target_os = "linux")]
fn lower_priority() {
    // On Linux the nice value belongs to the thread: this touches only the writer.
    let tid = rustix::thread::gettid();
    let now = rustix::process::getpriority_process(Some(tid)).unwrap_or(0);
    if let Err(e) = rustix::process::setpriority_process(Some(tid), now.saturating_add(NICE)) {
        tracing::debug!(error = %e, "could not lower the index writer's priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IntegrationName;
    use crate::store::Store;

    fn entry(target: &str, manager: Option<&str>) -> IndexEntry {
        IndexEntry {
            target_id: target.into(),
            user_name: format!("{target}@example.com"),
            record: Default::default(),
            manager: manager.map(str::to_string),
            linked: false,
            updated_at: chrono::Utc::now(),
        }
    }

    #[tokio::test]
    async fn writes_entries_in_order_and_answers_with_their_ids() {
        let s = Store::temporary().unwrap();
        let a = s
            .integration(&IntegrationName::parse("a").unwrap())
            .unwrap();
        let w = BackgroundWriter::start(a.clone()).unwrap();
        let first = w.write(vec![("u1".into(), entry("t1", Some("m1")))], vec![]);
        let second = w.write(
            vec![
                ("u2".into(), entry("t2", None)),
                ("u1".into(), entry("t1b", None)),
            ],
            vec![],
        );
        let (ids, r) = first.await.unwrap();
        assert_eq!(ids, vec!["u1".to_string()]);
        r.unwrap();
        let (ids, r) = second.await.unwrap();
        assert_eq!(ids, vec!["u2".to_string(), "u1".to_string()]);
        r.unwrap();
        // The later job won, and its manager change reached the reports index.
        assert_eq!(a.get_user("u1").unwrap().unwrap().target_id, "t1b");
        assert!(a.reports_of("m1").unwrap().is_empty());
    }

    #[tokio::test]
    async fn jobs_queued_before_the_writer_is_dropped_are_still_written() {
        let s = Store::temporary().unwrap();
        let a = s
            .integration(&IntegrationName::parse("a").unwrap())
            .unwrap();
        let w = BackgroundWriter::start(a.clone()).unwrap();
        let answers: Vec<_> = (0..20)
            .map(|i| {
                w.write(
                    vec![(format!("u{i}"), entry(&format!("t{i}"), None))],
                    vec![],
                )
            })
            .collect();
        drop(w);
        for a in answers {
            a.await.unwrap().1.unwrap();
        }
        assert_eq!(a.get_user("u19").unwrap().unwrap().target_id, "t19");
    }
}
