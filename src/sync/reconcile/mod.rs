//! Full reconcile: list every group's transitive user members, plan against the index, guard,
//! apply, then settle managers and record the run.
//!
//! Members are processed a page at a time (a page of at most 999 users and their managers is
//! all that is held of Graph's data); creates and updates are applied as pages arrive, while
//! deactivations wait until every group has been listed completely and the guard has passed.
//!
//! The LMS writes run as one continuous stream (`Run::drive`): `concurrency` changes stay in
//! flight across page boundaries, the next page is planned while the last one's writes finish,
//! and a user whose manager is being created in this run waits for that one create only (not
//! for a whole wave), so its create carries the manager link; where the target links a create
//! to a manager whose create is still on its way (SCIM bulk's `bulkId`), a new user waits only
//! until its manager's create is queued. Members are planned in chunks
//! whenever nothing else is ready, so sends and answers are never held up by planning. The
//! index entries and traces of applied changes are written in batches by a dedicated writer
//! thread (`store::writer`) while the LMS writes go on; a bounded backlog
//! keeps it from falling behind without limit, and the drive ends only once they are written.
//!
//! Files by role: this one holds the run and its pipeline (`Run::execute`); `feed` reads the
//! members on a task of their own, `members` takes and maps their pages, `planning` plans them
//! against the index, `writes` drives the LMS writes and records them, `departures` confirms,
//! guards and applies deactivations, `run_record` keeps traces and failures, `report` is what a
//! run returns.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use super::apply::{apply_change_linking, intent_of, Applied, ApplyError};
use super::changes::Changes;
use super::decide::{self, Facts, Membership, UserFact, Verdict};
use super::mapping::{is_active, AttrValue, Desired, MapFailure, Mapping, Record, MANAGER};
use super::plan::{self, Action, GuardTrip, ManagerRef, PlannedChange};
use super::trace::{self, Match, OutOfScope, Pending, Scope, Source, Trace, Via};
use crate::config::IntegrationConfig;
use crate::graph::models::{GraphGroup, GraphUser};
use crate::graph::{GraphClient, GraphError};
use crate::lms::{Capabilities, Target, TargetError};
use crate::store::intents::{Intent, IntentId};
use crate::store::writer::{BackgroundWriter, Written};
use crate::store::{new_run_id, IndexEntry, IntegrationStore, StoreError};

/// Everything one integration's sync needs.
mod departures;
mod feed;
mod members;
mod planning;
pub(crate) mod report;
mod run_record;
mod writes;

use feed::*;
pub use report::*;

struct Run<'a, 'c, T: Target> {
    ctx: &'a Context<'c, T>,
    opts: RunOptions,
    caps: Capabilities,
    managed: BTreeSet<String>,
    progress: Option<ProgressFn>,
    report: RunReport,
    applied: u64,
    /// Deep runs: what the LMS really holds for indexed users whose record differs from the
    /// index (`None`: deleted in the LMS). Consulted before the index.
    actual: HashMap<String, Option<Record>>,
    /// Decision traces of the changes planned and not yet applied (none in a dry run).
    traces: Pending,
    /// Whether `manager.value` is set (mapping asks for it and the target takes it).
    link_manager: bool,
    /// (user, the manager it should have) for users whose manager was not linkable (not in the
    /// LMS, or inactive) when they were planned: settled at the end of the run.
    deferred: Vec<(String, Option<String>)>,
    /// Deactivations the listing suggests; confirmed with Graph and applied once every group
    /// was listed and the guard passed.
    candidates: Vec<Candidate>,
    /// Unchanged users whose manager changed outside the LMS: the index learns the manager.
    remember: Vec<(String, Option<String>)>,
    pipe: Pipe,
    /// Started with the first write.
    writer: Option<BackgroundWriter>,
    /// A failure that may mean the LMS is down was seen: probe it before the next write.
    probe_due: bool,
    /// Writes failed in a row with errors that may concern the whole LMS (401, 5xx, no
    /// answer): past a few, the run stops even if reads still work (e.g. a read-only token).
    suspect_streak: usize,
    /// The run's place in the integration's gate (`sync::gate`): users the worker wrote
    /// after it are left to the worker.
    epoch: u64,
    /// Changes left to the worker (it held or wrote the user during the run).
    left: u64,
}

/// A deactivation the listing suggests (not listed, or a disabled member), to be confirmed.
struct Candidate {
    /// The deactivation as planned (shown by a dry run, held by the guard, applied when
    /// Graph confirms it).
    change: PlannedChange,
    /// The user's index entry, record cut to the managed keys.
    existing: IndexEntry,
}

/// Changes announced together: one intent record, settled once all of them are answered and
/// their index entries written.
struct Chunk {
    outstanding: usize,
    /// Intents of changes whose outcome is unknown (kept for the next read-back).
    uncertain: Vec<Intent>,
}

/// Index entries and traces are handed to the writer thread in batches of about this many.
const WRITE_BATCH: usize = 256;

/// Why a deactivation was left to the next run after its confirming reads kept coming slowly.
const SLOW_CONFIRMATION: &str =
    "Graph's confirming answers were older than 0.75 s, or throttled, three times (a deactivation never rests on an answer that old); handed to the incremental worker and the next run";

/// The LMS-write stream of a run (see the module comment).
#[derive(Default)]
struct Pipe {
    /// Pages read and mapped, not completely planned yet.
    pages: VecDeque<PageWork>,
    /// Planned changes not started yet, in planning order.
    ready: VecDeque<PlannedChange>,
    /// Users being created in this run whose create has not answered yet.
    pending: HashSet<String>,
    /// Of `pending`, those whose create is planned and not started yet (their reports' creates
    /// can go right behind them, linked in flight).
    planned: HashSet<String>,
    /// Creates to be linked in flight to their manager (the value) whose create is queued
    /// too (`Target::links_in_flight`), by Entra id.
    links: HashMap<String, String>,
    /// Members planned once the create of their manager (the key) has answered (or, for
    /// creates where the target links them in flight, once it is queued).
    waiting: HashMap<String, Vec<Waiter>>,
    /// How many members are in `waiting`.
    waiting_count: usize,
    /// Members whose manager (the key) has not been listed yet in this run: held while the
    /// listing goes on, so that a manager on a later page is created first and the member's
    /// create carries the link (instead of a PATCH at the end of the run).
    parked: HashMap<String, Vec<Waiter>>,
    /// The keys of `parked`, oldest first, and how many members are parked in all.
    parked_order: VecDeque<String>,
    parked_count: usize,
    /// How many members wait, directly or down a chain of waits, for a member being created
    /// (until its create answers) or for a manager not listed yet (a key of `parked`).
    behind: HashMap<String, usize>,
    /// How many members are held behind the keys of `parked` in all (parked ones and those
    /// waiting down a chain for them): past [`MAX_PARKED`] the oldest key is let go.
    held_parked: usize,
    /// Who waits for whom (waiting or parked): no member waits in a cycle.
    waits_on: HashMap<String, String>,
    /// The member listing is still being read.
    listing: bool,
    /// Applied, not yet written to the index: Entra id → LMS id (managers are looked up here
    /// first).
    unwritten: HashMap<String, String>,
    /// Managers found in the index in this run: Entra id → LMS id. A manager has many
    /// reports; this spares a store read for each (a few percent of a first reconcile's CPU).
    managers: HashMap<String, String>,
    /// Applied and waiting for the writer.
    entries: Vec<(String, IndexEntry)>,
    traces: Vec<Trace>,
    /// Deactivated in this run: no manager link may point at them.
    deactivated: HashSet<String>,
    /// Announced (their intents durable), not started yet.
    armed: VecDeque<(PlannedChange, IntentId)>,
    /// Intent records of this run, by id.
    chunks: HashMap<IntentId, Chunk>,
    /// Applied, waiting for the writer: the intent record of each (in order of application).
    chunk_of: HashMap<String, Vec<IntentId>>,
}

/// Changes announced in one intent record (one durable write before they are sent).
const INTENT_CHUNK: usize = 256;

/// Members of one page still to be planned (`Run::plan_some`).
struct PageWork {
    group: GraphGroup,
    members: VecDeque<(Desired, Option<IndexEntry>, GraphUser)>,
    /// Depth in the page's chain of managers being created, of members with a manager or
    /// being created themselves.
    depths: HashMap<String, usize>,
}

/// Members planned at a time between picking up LMS answers.
const PLAN_CHUNK: usize = 64;

/// At most this many members are held behind managers not listed yet (`Pipe::held_parked`).
const MAX_PARKED: usize = 4096;

/// The members parked for a manager not listed yet are let go once this many times their
/// number wait behind them: each then costs at most one PATCH at the end of the run (if the
/// manager turns up after all), against the whole chain below it waiting for the listing to
/// end. A first sync's extra requests stay under 1 / this.
const UNPARK_HELD: usize = 100;

/// While this many members or more wait (for a manager's create or listing), no new page is
/// read unless nothing else can move: memory stays bounded however the directory is ordered.
const MAX_HELD: usize = 4096;

/// Writes failed in a row with errors that may concern the whole LMS (401, 5xx, no answer,
/// each after its own retries) that stop the run even while the LMS still answers reads (a
/// read-only token, say). Not tied to `target.concurrency`: that is only the pacer's ceiling,
/// and a run should not write dozens of users into a refusing LMS before it gives up.
const SUSPECT_STREAK_STOP: usize = 16;

/// A member whose manager is being created in this run.
struct Waiter {
    desired: Desired,
    existing: Option<IndexEntry>,
    user: GraphUser,
    group: GraphGroup,
}

type WriteJob = tokio::sync::oneshot::Receiver<Written>;
type WriteResult = Result<Written, tokio::sync::oneshot::error::RecvError>;

/// At most this many applied entries and traces wait for the writer: past it, no new LMS
/// write starts until the writer has caught up (`store::writer`).
const MAX_UNWRITTEN: usize = 8 * WRITE_BATCH;

/// What woke the drive loop.
enum Event<A> {
    Applied(A),
    /// The intents of a chunk of changes are durable (or could not be made so).
    Announced(Result<(), StoreError>),
    Written(WriteResult),
    Feed(Option<Result<Feed, RunError>>),
    /// The probe of Graph and the LMS after a suspect failure answered.
    Probed(Result<(), RunError>),
    /// Nothing else is ready and members wait to be planned.
    Plan,
}

/// Runs a full reconcile of one integration. Never panics on bad input; whole-run errors end
/// up in `report.error` with `RunOutcome::Failed`, and are returned beside the report for the
/// caller's alerts (`alert::after_run`: the sync raises none itself).
pub async fn reconcile<T: Target>(
    ctx: &Context<'_, T>,
    opts: RunOptions,
    progress: Option<ProgressFn>,
) -> (RunReport, Option<RunError>) {
    let run_id = new_run_id();
    let span = tracing::info_span!("reconcile", integration = %ctx.cfg.name, run_id = %run_id, dry_run = opts.dry_run);
    async move {
        let started_at = Utc::now();
        let report = RunReport {
            run_id: run_id.clone(),
            integration: ctx.cfg.name.to_string(),
            started_at,
            finished_at: started_at,
            dry_run: opts.dry_run,
            outcome: RunOutcome::Ok,
            counts: Counts::default(),
            groups: Vec::new(),
            failures: Vec::new(),
            guard: None,
            error: None,
            changes: Changes::new(),
            notes: Vec::new(),
            tree_changed: false,
        };
        // From here on, users the incremental worker writes are left to it (`sync::gate`).
        let ticket = ctx.gate.begin_run();
        let mut run = Run {
            ctx,
            epoch: ticket.epoch(),
            left: 0,
            opts,
            caps: Capabilities::default(),
            managed: BTreeSet::new(),
            progress,
            report,
            applied: 0,
            actual: HashMap::new(),
            traces: Pending::new(ctx.cfg, ctx.store, Source::Reconcile, &run_id, !opts.dry_run),
            link_manager: false,
            deferred: Vec::new(),
            candidates: Vec::new(),
            remember: Vec::new(),
            pipe: Pipe::default(),
            writer: None,
            probe_due: false,
            suspect_streak: 0,
        };
        tracing::info!("reconcile started");
        let result = run.execute().await;
        if !opts.dry_run {
            // Whom the worker decided while this run wrote: decided again now that the run's
            // writes and index entries are all stored (a manager it created, for instance).
            let again: Vec<crate::store::queue::QueueItem> = ticket
                .worker_touched()
                .into_iter()
                .map(crate::store::queue::QueueItem::follow_up)
                .collect();
            if !again.is_empty() {
                tracing::info!(users = again.len(), "users the incremental worker changed during the run are decided again");
                if let Err(e) = ctx.store.enqueue(&again) {
                    tracing::error!(error = %e, "could not queue the users the worker changed during the run");
                }
            }
        }
        drop(ticket);
        if run.left > 0 {
            run.report.notes.push(format!(
                "{} users were being changed by the incremental worker during this run and were left to it",
                run.left
            ));
        }
        let mut report = run.report;
        report.finished_at = Utc::now();
        if let Err(e) = &result {
            tracing::error!(error = %e, "reconcile failed");
            report.error = Some(e.to_string());
            report.outcome = RunOutcome::Failed;
        } else if report.guard.is_some() {
            report.outcome = RunOutcome::GuardTripped;
        } else if !report.failures.is_empty() {
            report.outcome = RunOutcome::Partial;
        }
        if report.counts.deferred > 0 {
            report.notes.push(format!(
                "{} users deferred to the next run: the LMS kept throttling their writes past target.throttle_wait_secs",
                report.counts.deferred
            ));
        }
        if !opts.dry_run {
            // Without its changes, and without copying them (a first reconcile has one per
            // member).
            let changes = std::mem::take(&mut report.changes);
            let history = report.clone();
            report.changes = changes;
            if let Err(e) = ctx.store.put_run(&report.run_id, &history) {
                tracing::error!(error = %e, "could not record the run");
            }
            // A scan of the index when it prunes: off the async workers.
            let (store, run) = (ctx.store.clone(), report.run_id.clone());
            match tokio::task::spawn_blocking(move || store.prune_trace_shapes(&run)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::info!(shapes = n, "removed trace shapes no user refers to any more"),
                Ok(Err(e)) => tracing::warn!(error = %e, "could not prune the trace shapes"),
                Err(e) => tracing::warn!(error = %e, "the pruning of trace shapes stopped"),
            }
            // The run history decides whether `serve` reconciles at start: keep it durable.
            if let Err(e) = ctx.store.durable().await {
                tracing::error!(error = %e, "could not flush the run record");
            }
        }
        let c = &report.counts;
        tracing::info!(outcome = ?report.outcome, members = c.members, created = c.created, updated = c.updated,
            deactivated = c.deactivated, reactivated = c.reactivated, unchanged = c.unchanged, failed = c.failed,
            "reconcile finished");
        (report, result.err())
    }
    .instrument(span)
    .await
}

impl<T: Target> Run<'_, '_, T> {
    pub(super) async fn read_target_state(&mut self) -> Result<(), RunError> {
        let mut by_target: HashMap<String, (String, IndexEntry)> = HashMap::new();
        for r in self.ctx.store.users() {
            let (id, e) = r?;
            by_target.insert(e.target_id.clone(), (id, e));
        }
        const PAGE: usize = 100;
        let mut start = 1;
        let mut drifted = 0u64;
        // A server that misreports totalResults must not loop forever.
        for _ in 0..1_000_000 {
            let (users, total) = self.ctx.target.list(start, PAGE).await?;
            if users.is_empty() {
                break;
            }
            // Advance by what came back, not by `total`: servers misreport it (docs/scim.md).
            let _ = total;
            start += users.len();
            for u in users {
                if let Some((entra_id, e)) = by_target.remove(&u.id) {
                    drifted += u64::from(self.note_drift(entra_id, e, u.record));
                }
            }
        }
        // Not listed is not proof of deletion: ask for each one.
        let mut gone = 0u64;
        for (target_id, (entra_id, e)) in by_target {
            match self.ctx.target.get(&target_id).await? {
                Some(u) => drifted += u64::from(self.note_drift(entra_id, e, u.record)),
                None => {
                    tracing::info!(user = %entra_id, "LMS user was deleted by hand; it is created again if still a member");
                    gone += 1;
                    self.actual.insert(entra_id, None);
                }
            }
        }
        self.report.notes.push(format!(
            "deep: {drifted} LMS users changed by hand, {gone} deleted by hand"
        ));
        Ok(())
    }

    pub(super) async fn execute(&mut self) -> Result<(), RunError> {
        let cfg = self.ctx.cfg;
        self.caps = self.ctx.target.discover().await?;
        for n in &self.caps.notes {
            tracing::info!(note = %n, "target capabilities");
        }
        self.report.notes.extend(self.caps.notes.iter().cloned());
        self.link_manager = cfg.mapping.link_manager && self.caps.enterprise;
        self.managed = plan::managed_keys(
            cfg.mapping.rules.iter().map(|r| r.key.as_str()),
            self.link_manager,
        )
        .into_iter()
        .filter(|k| self.caps.accepts(k))
        .collect();

        // Nothing trusts an index entry whose last write was not confirmed: read those back.
        if self.opts.dry_run {
            for (_, i) in self.ctx.store.pending_intents()? {
                self.actual.insert(i.entra_id, Some(Record::new()));
            }
        } else {
            // Not while a worker batch is under way: its intents are its own until it ends.
            let _whole = self.ctx.gate.exclusive().await;
            let settled = super::apply::settle_intents(self.ctx, &self.managed).await?;
            if !settled.settled.is_empty() {
                self.report.notes.push(format!(
                    "{} LMS writes left unconfirmed by an earlier process were read back from the LMS",
                    settled.settled.len()
                ));
            }
            // Unreadable now: written in full, whatever the index says.
            for u in settled.unsettled {
                self.actual.insert(u, Some(Record::new()));
            }
        }

        if self.opts.deep {
            self.read_target_state().await?;
        }

        let active_before = self.ctx.store.active_count();
        // A first reconcile: no member has an index entry to look up, and nobody indexed can
        // have left (whatever the worker writes meanwhile is its own, from a fresh read, and
        // the gate keeps this run off it).
        let first = self.ctx.store.has_no_users();

        let user_select = cfg.mapping.user_select();
        let manager_select = cfg.mapping.manager_select();
        let manager_plan = match &manager_select {
            Some(sel) => Some(
                super::managers::prepare(
                    self.ctx.graph,
                    self.ctx.store,
                    sel,
                    self.opts.verify_managers,
                    cfg.verify_managers_every,
                )
                .await?,
            ),
            None => None,
        };
        if let Some(p) = &manager_plan {
            if matches!(p.mode, super::managers::Mode::Verify) {
                self.report
                    .notes
                    .push("every member's manager was read from Graph (a verification run)".into());
            }
        }

        // Graph reads run ahead of the LMS writes by up to two pages.
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let feed = tokio::spawn(
            feed_members(
                Arc::clone(self.ctx.graph),
                FeedSpec {
                    groups: cfg.groups.clone(),
                    user_select,
                    manager_select,
                    concurrency: cfg.graph_concurrency,
                    mapping: cfg.mapping.clone(),
                    managed: self.managed.clone(),
                    store: self.ctx.store.clone(),
                    actual: self.actual.clone(),
                    managers: manager_plan.as_ref().map(|p| p.mode.clone()),
                    index_empty: first,
                },
                tx,
            )
            .instrument(tracing::Span::current()),
        );
        // Dropping the handle does not stop the task; the abort guard does.
        let _feed_guard = AbortOnDrop(feed.abort_handle());
        // On an error the guard's drop stops the reader (and so does dropping the receiver).
        self.drive(Some((&mut rx, active_before)), true).await?;
        drop(rx);
        // The feed ends early only after sending an error, which `drive` returned above.
        let seen = feed
            .await
            .map_err(|e| RunError::Source(format!("the member reader stopped: {e}")))??;

        // Every group was listed completely: whoever is indexed but unseen may have left.
        let store = self.ctx.store;
        let none = ManagerRef::None;
        let unseen = (!first)
            .then(|| store.users_where(|id| !seen.contains(id)))
            .into_iter()
            .flatten();
        for r in unseen {
            let (id, mut e) = r?;
            e.record.retain(|k, _| self.managed.contains(k));
            let facts = Facts {
                user: UserFact::Gone { deleted: false },
                membership: Membership::NotMember,
                confirmed: false,
                existing: Some(&e),
                manager: &none,
            };
            if decide::decide(&id, &facts, false).verdict == Verdict::Confirm {
                if let Some(mut c) = plan::plan_departure(&id, &e) {
                    c.reason = Some(OutOfScope::LeftAllGroups.describe().to_string());
                    self.trace_plan(&c, None, None, Some(OutOfScope::LeftAllGroups), false);
                    self.candidates.push(Candidate {
                        change: c,
                        existing: e,
                    });
                }
            }
        }

        self.deactivate().await?;

        // Users whose manager left the LMS in this run lose the link.
        let mut deferred = std::mem::take(&mut self.deferred);
        for m in self.pipe.deactivated.clone() {
            for r in self.ctx.store.reports_of(&m)? {
                if let Some(e) = self.ctx.store.get_user(&r)? {
                    deferred.push((r, e.manager));
                }
            }
        }
        self.settle_managers(deferred).await?;
        // Fields the LMS could not take, and what was learned about it, in this run.
        self.report.notes.extend(self.ctx.target.notes());

        if !self.opts.dry_run {
            // The membership mirror and the group tree are the worker's too: rebuilt between
            // its batches.
            let _whole = self.ctx.gate.exclusive().await;
            let remember = std::mem::take(&mut self.remember);
            let mut entries = Vec::new();
            for (id, manager) in remember {
                if self.ctx.gate.worker_has(&id, self.epoch) {
                    continue;
                }
                if let Some(mut e) = self.ctx.store.get_user(&id)? {
                    e.manager = manager;
                    entries.push((id, e));
                }
            }
            self.ctx.store.put_users(&entries)?;
            for g in &self.report.groups {
                self.ctx
                    .store
                    .put_meta(&format!("group_count/{}", g.id), &g.members)?;
                // For the traces of the incremental worker, which knows groups by id only.
                self.ctx
                    .store
                    .put_meta(&format!("group_name/{}", g.id), &g.name)?;
            }
            self.rebuild_mirror().await?;
            if let Some(p) = &manager_plan {
                let failed: HashSet<&str> = self
                    .report
                    .failures
                    .iter()
                    .map(|f| f.entra_id.as_str())
                    .collect();
                super::managers::finish(self.ctx.store, p, |id| {
                    seen.contains(id) && !failed.contains(id)
                })?;
            }
            self.ctx.store.flush()?;
        }
        Ok(())
    }
}
