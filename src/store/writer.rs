//! A reconcile's index and trace writes, on a thread of their own.
//!
//! A first reconcile writes one index entry and one manager link per user it creates (its
//! trace rides in the entry: `store::traces`): sled inserts that would hold up the LMS
//! requests, the Graph reader and, in `serve`, the webhook receiver if they ran on the async
//! workers. The writes are not urgent (the run's own lookups find applied users in memory
//! until they are written), so they are batched to this thread. The caller bounds how much may
//! wait for it, so the writer cannot fall behind without limit however busy the machine is.
//!
//! The thread once ran at a lower CPU priority (nice +10), when each create also stored a
//! trace of its own. Measured again once it did not (benches/reconcile.rs, 2 cores,
//! alternating): at normal priority the first reconcile of 100,000 members peaked 140-149 MiB
//! in five runs against 157-171 MiB (and 145-184 MiB in four more, against 150-168 MiB at +5),
//! at the same rate (B) and the same latency of live updates beside a
//! reconcile (benches/live_during_reconcile.rs). Why a slower writer costs memory was not
//! established (sled's superseded pages, freed only when every thread has moved on, are one
//! suspect); nothing was gained for it any more.

use tokio::sync::oneshot;

use super::thread::Worker;
use super::{IndexEntry, IntegrationStore, StoreError};
use crate::model::trace::Trace;

/// The Entra ids written, and whether the store took them.
pub(crate) type Written = (Vec<String>, Result<(), StoreError>);

struct Job {
    entries: Vec<(String, IndexEntry)>,
    traces: Vec<Trace>,
    done: oneshot::Sender<Written>,
}

/// Writes index entries, then their traces, in the order given. Dropping it waits until the
/// jobs already handed to it are written and the thread has let go of the store
/// (`store::thread::Worker`).
pub(crate) struct BackgroundWriter {
    mode: Mode,
}

enum Mode {
    Thread(Worker<Job>),
    /// The thread could not be started: each job is written by the caller, at once.
    Inline(Box<IntegrationStore>),
}

fn write_job(
    store: &IntegrationStore,
    mut entries: Vec<(String, IndexEntry)>,
    traces: Vec<Trace>,
) -> Written {
    let r = store.put_changes(&mut entries, traces);
    (entries.into_iter().map(|(id, _)| id).collect(), r)
}

impl BackgroundWriter {
    /// Starts the writer thread; when the system refuses one, writes on the caller's thread
    /// instead (slower, same result) and says so in the log.
    pub(crate) fn start(store: IntegrationStore) -> Self {
        let theirs = store.clone();
        let spawned = Worker::spawn(
            format!("{}-index-writer", store.name()),
            move |rx: std::sync::mpsc::Receiver<Job>| {
                while let Ok(job) = rx.recv() {
                    let written = write_job(&theirs, job.entries, job.traces);
                    // The run may have ended (failed) without waiting: nothing to tell then.
                    let _ = job.done.send(written);
                }
            },
        );
        match spawned {
            Ok(w) => BackgroundWriter {
                mode: Mode::Thread(w),
            },
            Err(e) => {
                tracing::warn!(
                    integration = %store.name(),
                    error = %e,
                    "cannot start the index writer thread; writing the index on the reconcile's own thread"
                );
                Self::inline(store)
            }
        }
    }

    /// Writes on the caller's thread (what `start` falls back to).
    pub(crate) fn inline(store: IntegrationStore) -> Self {
        BackgroundWriter {
            mode: Mode::Inline(Box::new(store)),
        }
    }

    /// Queues index entries and the traces that go with them (a trace relies on its entry).
    /// The answer comes when both are written; a closed channel means the thread died.
    pub(crate) fn write(
        &self,
        entries: Vec<(String, IndexEntry)>,
        traces: Vec<Trace>,
    ) -> oneshot::Receiver<Written> {
        let (done, answer) = oneshot::channel();
        match &self.mode {
            Mode::Thread(w) => {
                // A send fails only when the thread is gone: the job, and with it `done`, is
                // dropped and `answer` reports it (closed).
                let _ = w.send(Job {
                    entries,
                    traces,
                    done,
                });
            }
            Mode::Inline(store) => {
                let _ = done.send(write_job(store, entries, traces));
            }
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{index_entry as entry, store_a as store};

    #[tokio::test]
    async fn writes_entries_in_order_and_answers_with_their_ids() {
        let (_s, a) = store();
        let w = BackgroundWriter::start(a.clone());
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
        let (_s, a) = store();
        let w = BackgroundWriter::start(a.clone());
        let answers: Vec<_> = (0..20)
            .map(|i| {
                w.write(
                    vec![(format!("u{i}"), entry(&format!("t{i}"), None))],
                    vec![],
                )
            })
            .collect();
        // Dropping waits for the queued jobs: all are in the store as soon as it returns.
        drop(w);
        assert_eq!(a.get_user("u19").unwrap().unwrap().target_id, "t19");
        for a in answers {
            a.await.unwrap().1.unwrap();
        }
    }

    #[tokio::test]
    async fn the_inline_fallback_writes_before_answering() {
        let (_s, a) = store();
        let w = BackgroundWriter::inline(a.clone());
        let answer = w.write(vec![("u1".into(), entry("t1", Some("m1")))], vec![]);
        assert_eq!(a.get_user("u1").unwrap().unwrap().target_id, "t1");
        assert_eq!(a.reports_of("m1").unwrap(), vec!["u1".to_string()]);
        let (ids, r) = answer.await.unwrap();
        assert_eq!(ids, vec!["u1".to_string()]);
        r.unwrap();
    }
}
