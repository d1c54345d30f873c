//! Who may write which user while the incremental worker and a full reconcile of the same
//! integration run side by side.
//!
//! The worker does not wait for a reconcile to finish: notifications keep reaching the LMS
//! while one lists the groups. The two never write one user at the same time, nor in the wrong
//! order, because every user write of either goes through this gate:
//!
//! * The worker **claims** the users of a round before it reads them from Graph and holds them
//!   until their writes and index entries are stored ([`UserGate::claim`]). A claim waits only
//!   for the reconcile's writes of those users that are in flight (one LMS request and its
//!   index entry), so the worker reads Graph after the reconcile's write and decides on top of
//!   it.
//! * The reconcile **asks** before each write ([`UserGate::try_write`]). A user the worker holds
//!   now, or has written since the reconcile started ([`RunTicket`]), is left to the worker:
//!   the reconcile's decision was made from a listing and an index entry that may be older than
//!   the worker's fresh read, and writing it would undo a newer change. The worker's word for
//!   that user is at least as fresh as the run's listing was when it began; a later change in
//!   Graph sends a notification of its own.
//! * Steps that concern the whole integration rather than one user (reading back unsettled
//!   intents, rebuilding the membership mirror and the group tree) are **exclusive**
//!   ([`UserGate::exclusive`]): the worker holds the same lock for each batch.
//!
//! The gate lives in memory: one process, one gate per integration. Separate processes (a CLI
//! `reconcile` beside `serve`) are not coordinated by it, as before.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Default)]
struct GateState {
    /// Counts worker releases; a reconcile remembers the value it started at.
    seq: u64,
    /// Reconciles running (0 or 1 in `serve`).
    runs: usize,
    /// Users the worker holds now.
    worker: HashMap<String, usize>,
    /// Users whose reconcile write (and index entry) is in flight.
    reconcile: HashMap<String, usize>,
    /// The `seq` at which the worker last released a user, while a reconcile runs.
    touched: HashMap<String, u64>,
    /// Users a reconcile left to the worker, since the gate was made.
    left: u64,
    /// Claims of the worker waiting for a reconcile write.
    waiting: usize,
}

/// One integration's gate (see the module documentation).
#[derive(Default)]
pub struct UserGate {
    state: Mutex<GateState>,
    released: Notify,
    exclusive: tokio::sync::Mutex<()>,
    /// Held while the deactivation budget is checked and spent (`apply::Budget::check`).
    budget: Mutex<()>,
}

impl UserGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One check of the deactivation budget at a time (the check and its count are one step).
    pub(crate) fn budget(&self) -> std::sync::MutexGuard<'_, ()> {
        self.budget.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lock of steps that concern the whole integration: held by each worker batch, and
    /// by the reconcile while it reads back intents and rebuilds the membership mirror.
    pub(crate) async fn exclusive(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.exclusive.lock().await
    }

    /// A reconcile starts: users the worker writes from now on are left to the worker.
    pub(crate) fn begin_run(&self) -> RunTicket<'_> {
        let mut s = self.lock();
        s.runs += 1;
        RunTicket {
            gate: self,
            epoch: s.seq,
        }
    }

    /// The worker takes `ids` (waits while a reconcile write of any of them is in flight).
    pub(crate) async fn claim(&self, ids: impl IntoIterator<Item = String>) -> Claim<'_> {
        let mut ids: Vec<String> = ids.into_iter().collect();
        ids.sort();
        ids.dedup();
        // Counted while this claim waits (also if it is given up meanwhile).
        let mut waiting: Option<Waiting<'_>> = None;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            {
                let mut s = self.lock();
                if !ids.iter().any(|id| s.reconcile.contains_key(id)) {
                    for id in &ids {
                        *s.worker.entry(id.clone()).or_insert(0) += 1;
                    }
                    if let Some(w) = waiting.take() {
                        w.done(&mut s);
                    }
                    return Claim { gate: self, ids };
                }
                if waiting.is_none() {
                    s.waiting += 1;
                    waiting = Some(Waiting { gate: self });
                }
            }
            released.await;
        }
    }

    /// Whether the worker waits for a reconcile write to be stored (the reconcile then hands
    /// its applied entries to the index writer without waiting for a full batch).
    pub(crate) fn worker_waiting(&self) -> bool {
        self.lock().waiting > 0
    }

    /// The reconcile that started at `epoch` wants to write `id`: `true` and it is held until
    /// [`UserGate::release_write`]; `false` when the worker holds it or wrote it since.
    pub(crate) fn try_write(&self, id: &str, epoch: u64) -> bool {
        let mut s = self.lock();
        if s.worker.contains_key(id) || s.touched.get(id).is_some_and(|t| *t > epoch) {
            s.left += 1;
            return false;
        }
        *s.reconcile.entry(id.to_string()).or_insert(0) += 1;
        true
    }

    /// The reconcile's write of `id` and its index entry are done (or failed).
    pub(crate) fn release_write(&self, id: &str) {
        {
            let mut s = self.lock();
            if let Some(n) = s.reconcile.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    s.reconcile.remove(id);
                }
            }
        }
        self.released.notify_waiters();
    }

    /// Whether the worker holds `id` or wrote it since `epoch` (for index-only updates).
    pub(crate) fn worker_has(&self, id: &str, epoch: u64) -> bool {
        let s = self.lock();
        s.worker.contains_key(id) || s.touched.get(id).is_some_and(|t| *t > epoch)
    }

    /// Users reconciles left to the worker since the gate was made.
    #[cfg(test)]
    pub(crate) fn left_to_worker(&self) -> u64 {
        self.lock().left
    }
}

/// A running reconcile's place in the gate; ending it releases whatever it still holds.
pub(crate) struct RunTicket<'g> {
    gate: &'g UserGate,
    epoch: u64,
}

impl RunTicket<'_> {
    /// What the worker released before the run began (see [`UserGate::try_write`]).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Users the worker holds now or wrote since the run began. The run decides them again
    /// through the worker once it is over: the worker may have decided them while the run's
    /// writes (a manager being created, its index entry not yet stored) were under way.
    pub(crate) fn worker_touched(&self) -> Vec<String> {
        let s = self.gate.lock();
        let mut ids: Vec<String> = s
            .touched
            .iter()
            .filter(|(_, t)| **t > self.epoch)
            .map(|(id, _)| id.clone())
            .chain(s.worker.keys().cloned())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

impl Drop for RunTicket<'_> {
    fn drop(&mut self) {
        {
            let mut s = self.gate.lock();
            s.runs = s.runs.saturating_sub(1);
            // A run that stopped on an error may still hold users.
            s.reconcile.clear();
            if s.runs == 0 {
                s.touched.clear();
            }
        }
        self.gate.released.notify_waiters();
    }
}

/// A claim waiting for a reconcile write (see [`UserGate::worker_waiting`]).
struct Waiting<'g> {
    gate: &'g UserGate,
}

impl Waiting<'_> {
    fn done(self, s: &mut GateState) {
        s.waiting = s.waiting.saturating_sub(1);
        std::mem::forget(self);
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        s.waiting = s.waiting.saturating_sub(1);
    }
}

/// Users the worker holds; released (and marked written) when dropped.
pub(crate) struct Claim<'g> {
    gate: &'g UserGate,
    ids: Vec<String>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        s.seq += 1;
        let seq = s.seq;
        let running = s.runs > 0;
        for id in std::mem::take(&mut self.ids) {
            if let Some(n) = s.worker.get_mut(&id) {
                *n -= 1;
                if *n == 0 {
                    s.worker.remove(&id);
                }
            }
            if running {
                s.touched.insert(id, seq);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn the_reconcile_leaves_users_the_worker_holds_or_wrote_during_the_run() {
        let gate = UserGate::default();
        let before = gate.claim(["a".to_string()]).await;
        drop(before);
        let run = gate.begin_run();
        assert!(
            gate.try_write("a", run.epoch()),
            "written before the run began"
        );
        gate.release_write("a");
        let claim = gate.claim(["b".to_string(), "c".to_string()]).await;
        assert!(!gate.try_write("b", run.epoch()), "held by the worker");
        drop(claim);
        assert!(
            !gate.try_write("c", run.epoch()),
            "written by the worker during the run"
        );
        assert!(gate.worker_has("c", run.epoch()));
        assert!(gate.try_write("d", run.epoch()));
        gate.release_write("d");
        assert_eq!(gate.left_to_worker(), 2);
        assert_eq!(run.worker_touched(), vec!["b".to_string(), "c".to_string()]);
        drop(run);
        let next = gate.begin_run();
        assert!(gate.try_write("c", next.epoch()), "a new run starts afresh");
    }

    #[tokio::test]
    async fn the_worker_waits_for_a_reconcile_write_in_flight_and_only_for_its_users() {
        let gate = Arc::new(UserGate::default());
        let run = gate.begin_run();
        assert!(gate.try_write("a", run.epoch()));
        let other = tokio::time::timeout(Duration::from_secs(1), gate.claim(["b".to_string()]))
            .await
            .expect("another user is not held up");
        drop(other);
        let g = Arc::clone(&gate);
        let waiter = tokio::spawn(async move {
            let _c = g.claim(["a".to_string()]).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "waits while the write is in flight");
        assert!(gate.worker_waiting());
        gate.release_write("a");
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("released")
            .unwrap();
        assert!(!gate.worker_waiting());
        // A claim given up while it waits is not counted as waiting any more.
        assert!(gate.try_write("c", run.epoch()));
        let given_up =
            tokio::time::timeout(Duration::from_millis(50), gate.claim(["c".to_string()])).await;
        assert!(given_up.is_err());
        assert!(!gate.worker_waiting());
        drop(run);
    }

    #[tokio::test]
    async fn an_ended_run_releases_what_it_still_held() {
        let gate = UserGate::default();
        let run = gate.begin_run();
        assert!(gate.try_write("a", run.epoch()));
        drop(run);
        tokio::time::timeout(Duration::from_secs(1), gate.claim(["a".to_string()]))
            .await
            .expect("not held after the run ended");
    }
}
