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
//! for a whole wave), so its create carries the manager link. Members are planned in chunks
//! whenever nothing else is ready, so sends and answers are never held up by planning. The
//! index entries and traces of applied changes are written in batches by a dedicated writer
//! thread at a lower priority (`store::writer`) while the LMS writes go on; a bounded backlog
//! keeps it from falling behind without limit, and the drive ends only once they are written.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use super::apply::{apply_change, intent_of, Applied, ApplyError};
use super::changes::Changes;
use super::decide::{self, Facts, Membership, UserFact, Verdict};
use super::mapping::{is_active, AttrValue, Desired, MapFailure, Mapping, Record, MANAGER};
use super::plan::{self, Action, GuardTrip, ManagerRef, PlannedChange};
use super::trace::{self, Match, OutOfScope, Pending, Scope, Source, Trace, Via};
use crate::config::IntegrationConfig;
use crate::graph::models::{GraphGroup, GraphUser};
use crate::graph::{GraphClient, GraphError};
use crate::store::intents::{Intent, IntentId};
use crate::store::writer::{BackgroundWriter, Written};
use crate::store::{new_run_id, IndexEntry, IntegrationStore, StoreError};
use crate::target::{Capabilities, Target, TargetError};

/// Everything one integration's sync needs.
pub struct Context<'a, T: Target> {
    pub cfg: &'a IntegrationConfig,
    /// Shared so the member reader can run as its own task, on another core.
    pub graph: &'a Arc<GraphClient>,
    pub target: &'a T,
    pub store: &'a IntegrationStore,
    /// Keeps the worker's and a reconcile's writes of one user apart (`sync::gate`).
    pub gate: &'a super::gate::UserGate,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    pub dry_run: bool,
    pub allow_mass_deactivation: bool,
    /// Also read every LMS user and repair drift made by hand (changed or deleted users).
    pub deep: bool,
    /// Read every member's manager from Graph instead of tracking managers with the users
    /// delta (`sync::managers`); also done every `verify_managers_every`.
    pub verify_managers: bool,
}

/// Progress events for a terminal display.
#[derive(Clone, Debug)]
pub enum Progress {
    PageRead { members: u64 },
    Applied { done: u64 },
}

pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    /// Everything planned was applied (or, in a dry run, planned).
    Ok,
    /// Some users failed; the rest was applied.
    Partial,
    /// The guard stopped the deactivations.
    GuardTripped,
    /// The run stopped on an error that concerns the whole integration.
    Failed,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub members: u64,
    pub created: u64,
    pub updated: u64,
    pub deactivated: u64,
    pub reactivated: u64,
    pub unchanged: u64,
    /// Disabled members that are not in the LMS (they are not created).
    #[serde(default)]
    pub skipped: u64,
    pub failed: u64,
    /// Users whose write the LMS kept throttling past `target.throttle_wait_secs`: nothing
    /// was written, the next run tries them again (not failures).
    #[serde(default)]
    pub deferred: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UserFailure {
    pub entra_id: String,
    pub user_name: Option<String>,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupSummary {
    pub id: String,
    pub name: String,
    pub members: u64,
}

/// The result of one run; the part without `changes` is kept in the run history.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunReport {
    pub run_id: String,
    pub integration: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub dry_run: bool,
    pub outcome: RunOutcome,
    pub counts: Counts,
    pub groups: Vec<GroupSummary>,
    pub failures: Vec<UserFailure>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard: Option<GuardTrip>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Planned (dry run) or applied changes; not kept in the run history.
    #[serde(default, skip_deserializing)]
    pub changes: Changes,
    #[serde(default)]
    pub notes: Vec<String>,
    /// The run found groups joining or leaving the tree of nested groups (`serve` makes the
    /// subscriptions follow).
    #[serde(skip)]
    pub tree_changed: bool,
}

/// Errors that stop a whole run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Source(String),
}

impl From<super::managers::ManagersError> for RunError {
    fn from(e: super::managers::ManagersError) -> Self {
        match e {
            super::managers::ManagersError::Graph(g) => RunError::Graph(g),
            super::managers::ManagersError::Store(s) => RunError::Store(s),
        }
    }
}

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
    "Graph's confirming answers took over a second three times (a deactivation never rests on an answer that old); handed to the incremental worker and the next run";

/// The LMS-write stream of a run (see the module comment).
#[derive(Default)]
struct Pipe {
    /// Pages read and mapped, not completely planned yet.
    pages: VecDeque<PageWork>,
    /// Planned changes not started yet, in planning order.
    ready: VecDeque<PlannedChange>,
    /// Users being created in this run whose create has not answered yet.
    pending: HashSet<String>,
    /// Members planned once the create of their manager (the key) has answered.
    waiting: HashMap<String, Vec<Waiter>>,
    /// Members whose manager (the key) has not been listed yet in this run: held while the
    /// listing goes on, so that a manager on a later page is created first and the member's
    /// create carries the link (instead of a PATCH at the end of the run).
    parked: HashMap<String, Vec<Waiter>>,
    /// The keys of `parked`, oldest first, and how many members are parked in all: past
    /// [`MAX_PARKED`] the oldest are planned without waiting.
    parked_order: VecDeque<String>,
    parked_count: usize,
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

/// At most this many members wait for a manager not listed yet (`Pipe::parked`).
const MAX_PARKED: usize = 4096;

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
/// write starts until the writer has caught up (it runs at a lower priority, see
/// `store::writer`).
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
/// up in `report.error` with `RunOutcome::Failed`.
pub async fn reconcile<T: Target>(
    ctx: &Context<'_, T>,
    opts: RunOptions,
    progress: Option<ProgressFn>,
) -> RunReport {
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
            // The run history decides whether `serve` reconciles at start: keep it durable.
            if let Err(e) = ctx.store.durable().await {
                tracing::error!(error = %e, "could not flush the run record");
            }
        }
        crate::alert::after_run(ctx.cfg, ctx.store, &report, result.err().as_ref());
        let c = &report.counts;
        tracing::info!(outcome = ?report.outcome, members = c.members, created = c.created, updated = c.updated,
            deactivated = c.deactivated, reactivated = c.reactivated, unchanged = c.unchanged, failed = c.failed,
            "reconcile finished");
        report
    }
    .instrument(span)
    .await
}

impl<T: Target> Run<'_, '_, T> {
    fn tick(&self, p: Progress) {
        if let Some(f) = &self.progress {
            f(&p);
        }
    }

    fn fail_user(&mut self, entra_id: &str, user_name: Option<&str>, reason: String) {
        tracing::warn!(user = entra_id, user_name, %reason, "user failed to sync");
        self.report.counts.failed += 1;
        self.report.failures.push(UserFailure {
            entra_id: entra_id.to_string(),
            user_name: user_name.map(str::to_string),
            reason,
        });
    }

    /// Keeps the trace of a planned change until it is applied (`u`: the Graph user it was
    /// mapped from; `group`: the configured group it was listed in; `mapped`: the change's
    /// record is what the mapping produced).
    fn trace_plan(
        &mut self,
        c: &PlannedChange,
        u: Option<&GraphUser>,
        group: Option<&GraphGroup>,
        out: Option<OutOfScope>,
        mapped: bool,
    ) {
        if !self.traces.enabled() {
            return;
        }
        let mut t = self.traces.start(&c.entra_id);
        let upn = u.and_then(|u| u.string("userPrincipalName"));
        t.user(None, upn.as_deref())
            .scope(Scope::of(out, group.map(listed_in).into_iter().collect()));
        t.plan(c);
        self.traces.wait(t, mapped);
    }

    /// A member that cannot be mapped: nothing to apply, so its trace is stored at once.
    fn trace_unmapped(
        &self,
        u: &GraphUser,
        group: &GraphGroup,
        disabled: bool,
        reason: &str,
    ) -> Result<(), StoreError> {
        if !self.traces.enabled() {
            return Ok(());
        }
        let indexed = self.ctx.store.get_user(&u.id)?;
        let mut t = self.traces.start(&u.id);
        let upn = u.string("userPrincipalName");
        let out = disabled.then_some(OutOfScope::Disabled);
        t.user(
            indexed.as_ref().map(|e| e.user_name.as_str()),
            upn.as_deref(),
        )
        .scope(Scope::of(out, vec![listed_in(group)]))
        .failed(reason, false);
        if let Some(e) = &indexed {
            t.matched = Match::Index {
                target_id: e.target_id.clone(),
            };
        }
        self.ctx.store.put_traces(vec![self.traces.finish(t)])
    }

    /// A disabled member that was never provisioned is not created. Recorded once rather than
    /// at every run: the first such trace stays, and its time says since when.
    fn trace_skipped(
        &self,
        d: &Desired,
        u: &GraphUser,
        group: &GraphGroup,
    ) -> Result<(), StoreError> {
        if !self.traces.enabled() || self.ctx.store.trace_is_skip(&d.entra_id)? {
            return Ok(());
        }
        let mut t = self.traces.start(&d.entra_id);
        let upn = u.string("userPrincipalName");
        t.user(Some(&d.user_name), upn.as_deref())
            .scope(Scope::of(
                Some(OutOfScope::Disabled),
                vec![listed_in(group)],
            ))
            .mapped(&d.record)
            .skipped(
                "disabled in Entra (accountEnabled = false) and never in the LMS: not created",
            );
        self.ctx.store.put_traces(vec![self.traces.finish(t)])
    }

    /// Deactivations the guard held back.
    fn trace_held(&mut self, held: &[PlannedChange], trip: &GuardTrip) -> Result<(), StoreError> {
        if !self.traces.enabled() {
            return Ok(());
        }
        let why = trip.to_string();
        let mut traces = Vec::with_capacity(held.len());
        for c in held {
            let mut t = self.traces.take(c);
            t.held(&why);
            traces.push(self.traces.finish(t));
        }
        self.ctx.store.put_traces(traces)
    }

    /// The trace of an applied change. A follow-up change of a user already changed in this
    /// run (`counted` = false: the manager link, once the manager exists) amends that trace.
    fn trace_applied(
        &mut self,
        c: &PlannedChange,
        matched: &Match,
        counted: bool,
    ) -> Result<Trace, StoreError> {
        if !counted {
            let stored = self.ctx.store.trace(&c.entra_id)?;
            if let Some(mut t) = stored.filter(|t| t.run == self.traces.run()) {
                t.amend(c, "manager link set once the manager was in the LMS");
                return Ok(self.traces.finish(t));
            }
        }
        let mut t = self.traces.take_applied(c);
        t.applied(c, matched);
        Ok(self.traces.finish(t))
    }

    /// The user's index entry with its record cut down to the managed keys.
    fn indexed(&self, entra_id: &str) -> Result<Option<IndexEntry>, StoreError> {
        lookup(self.ctx.store, &self.actual, &self.managed, entra_id)
    }

    /// Deep runs: reads every LMS user (startIndex/count paging) and notes where the LMS
    /// differs from the index, so the plan repairs it.
    /// Records what the LMS really holds when it differs from the index; true if it does.
    fn note_drift(&mut self, entra_id: String, e: IndexEntry, mut real: Record) -> bool {
        real.retain(|k, _| self.managed.contains(k));
        let mut known = e.record;
        known.retain(|k, _| self.managed.contains(k));
        // What the LMS does not keep as sent (it computes it) is not drift: taken as applied.
        for k in self.managed.iter().filter(|k| !self.caps.keeps(k)) {
            match known.get(k) {
                Some(v) => real.insert(k.clone(), v.clone()),
                None => real.remove(k),
            };
        }
        if real == known {
            return false;
        }
        tracing::info!(user = %entra_id, "LMS user differs from what was applied; repairing");
        self.actual.insert(entra_id, Some(real));
        true
    }

    async fn read_target_state(&mut self) -> Result<(), RunError> {
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

    async fn execute(&mut self) -> Result<(), RunError> {
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
        for r in store.users_where(|id| !seen.contains(id)) {
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

    /// The deactivations the listing suggests: the shared budget first, then Graph's fresh
    /// word for each (`checkMemberGroups` and the user read again), decided again, applied.
    async fn deactivate(&mut self) -> Result<(), RunError> {
        let candidates = std::mem::take(&mut self.candidates);
        if candidates.is_empty() {
            return Ok(());
        }
        let ctx = self.ctx;
        let n = candidates.len() as u64;
        let allow = self.opts.allow_mass_deactivation;
        let ids: Vec<String> = candidates
            .iter()
            .map(|c| c.change.entra_id.clone())
            .collect();
        let who: Vec<&str> = ids.iter().map(String::as_str).collect();
        // A dry run stores no trip and reads nothing more: it judges the candidates as planned.
        // A real run confirms each with Graph first and counts the confirmed, but a mass event
        // far past the budget is stopped without a read for each of its users.
        let verdict = if self.opts.dry_run {
            super::apply::guard_preview(ctx, &who, allow)?
        } else if !allow && super::apply::clearly_past_budget(ctx, &who)? {
            super::apply::guard_check(ctx, &who, allow)?
        } else {
            Ok(())
        };
        if let Err(trip) = verdict {
            let changes: Vec<PlannedChange> = candidates.into_iter().map(|c| c.change).collect();
            return self.held(changes, trip);
        }
        if allow {
            tracing::warn!(
                count = n,
                "mass-deactivation guard overridden by --allow-mass-deactivation"
            );
        }
        if self.opts.dry_run {
            // Shown as planned; a real run confirms each with Graph first.
            self.apply_all(candidates.into_iter().map(|c| c.change).collect(), true)
                .await?;
            return Ok(());
        }
        // Within the budget even if every candidate is confirmed: each chunk is written as
        // soon as Graph confirmed it (a change undone meanwhile is not written). Otherwise all
        // are confirmed first and the budget judges what Graph confirmed.
        let within = allow || super::apply::guard_preview(ctx, &who, false)?.is_ok();
        let chunk = (crate::graph::BATCH_LIMIT / 3).max(1);
        let mut confirmed: Vec<PlannedChange> = Vec::new();
        let mut rest = candidates;
        while !rest.is_empty() {
            let take = if within {
                chunk.min(rest.len())
            } else {
                rest.len()
            };
            let now: Vec<Candidate> = rest.drain(..take).collect();
            let decided = self.confirm_fresh(now).await?;
            if within {
                if let Err(trip) = self.apply_confirmed(decided, allow).await? {
                    // The worker spent the budget meanwhile: the rest is held unread.
                    let held: Vec<PlannedChange> = rest.drain(..).map(|c| c.change).collect();
                    if !held.is_empty() {
                        return self.held(held, trip);
                    }
                }
            } else {
                confirmed.extend(decided);
            }
        }
        if within {
            return Ok(());
        }
        // The budget, over what Graph confirmed.
        let ids: Vec<&str> = confirmed
            .iter()
            .filter(|c| c.action == Action::Deactivate)
            .map(|c| c.entra_id.as_str())
            .collect();
        if let Err(trip) = super::apply::guard_check(ctx, &ids, allow)? {
            let (held, rest): (Vec<PlannedChange>, Vec<PlannedChange>) = confirmed
                .into_iter()
                .partition(|c| c.action == Action::Deactivate);
            self.apply_all(rest, true).await?;
            return self.held(held, trip);
        }
        // A trip here was held and reported by `apply_confirmed`.
        let _ = self.apply_confirmed(confirmed, allow).await?;
        Ok(())
    }

    /// Applies what Graph confirmed, its deactivations first checked against the budget and
    /// counted in the guard's window by that check (`apply::Budget::check`; a worker running
    /// beside this run spends the same budget). A trip holds this chunk's deactivations and is
    /// returned.
    async fn apply_confirmed(
        &mut self,
        changes: Vec<PlannedChange>,
        allow: bool,
    ) -> Result<Result<(), GuardTrip>, RunError> {
        let ids: Vec<&str> = changes
            .iter()
            .filter(|c| c.action == Action::Deactivate)
            .map(|c| c.entra_id.as_str())
            .collect();
        if let Err(trip) = super::apply::guard_check(self.ctx, &ids, allow)? {
            let (held, rest): (Vec<PlannedChange>, Vec<PlannedChange>) = changes
                .into_iter()
                .partition(|c| c.action == Action::Deactivate);
            self.apply_all(rest, true).await?;
            self.held(held, trip.clone())?;
            return Ok(Err(trip));
        }
        self.apply_all(changes, true).await?;
        Ok(Ok(()))
    }

    /// Confirms the candidates with Graph; a deactivation whose confirming answer took over
    /// [`super::FRESH_READ_MAX_AGE`] is read again (twice at most), then left to the next run:
    /// it never rests on an answer older than the directory may be.
    async fn confirm_fresh(
        &mut self,
        candidates: Vec<Candidate>,
    ) -> Result<Vec<PlannedChange>, RunError> {
        let first_asked = chrono::Utc::now();
        let (mut apply, mut again) = self.confirm_candidates(candidates).await?;
        for _ in 0..super::FRESH_READ_RETRIES {
            if again.is_empty() {
                break;
            }
            let (more, slow) = self.confirm_candidates(again).await?;
            apply.extend(more);
            again = slow;
        }
        if !again.is_empty() {
            let n = again.len();
            // Handed to the incremental worker, which reads them again on its own (at once
            // in `serve`; at its next start otherwise), and to the next run. Graph said they
            // were gone when first asked: the worker's settling time counts from then.
            let hints: Vec<crate::store::queue::QueueItem> = again
                .iter()
                .map(|c| {
                    let mut it =
                        crate::store::queue::QueueItem::follow_up(c.change.entra_id.clone());
                    it.missing_since = Some(first_asked);
                    it
                })
                .collect();
            self.ctx.store.enqueue(&hints)?;
            for cand in again {
                let mut t = self.traces.take(&cand.change);
                t.skipped(SLOW_CONFIRMATION);
                self.pipe.traces.push(self.traces.finish(t));
            }
            tracing::warn!(
                count = n,
                "deactivations left to the next run: {SLOW_CONFIRMATION}"
            );
            self.report.notes.push(format!(
                "{n} deactivations were left to the next run: {SLOW_CONFIRMATION}"
            ));
        }
        Ok(apply)
    }

    /// Reads the candidates again from Graph (user, manager, `checkMemberGroups`) and decides
    /// again: what Graph confirms, or what it says is due instead (a withdrawn deactivation).
    /// The second list: deactivations confirmed by an answer that took too long to rest on.
    async fn confirm_candidates(
        &mut self,
        candidates: Vec<Candidate>,
    ) -> Result<(Vec<PlannedChange>, Vec<Candidate>), RunError> {
        let ctx = self.ctx;
        let cfg = ctx.cfg;
        let ids: Vec<String> = candidates
            .iter()
            .map(|c| c.change.entra_id.clone())
            .collect();
        let mapping = &cfg.mapping;
        let user_select = mapping.user_select();
        let manager_select = mapping.manager_select();
        // One `$batch` per user, a few at a time (`GraphClient::fresh_reads`).
        let mut reads = ctx
            .graph
            .fresh_reads(&ids, &user_select, manager_select.as_deref(), &cfg.groups)
            .await?;
        let mut slow = Vec::new();
        let mut apply = Vec::new();
        let mut withdrawn = 0u64;
        for cand in candidates {
            let id = cand.change.entra_id.clone();
            let read = match reads.remove(&id) {
                Some(Ok(r)) => r,
                Some(Err(e)) => {
                    let reason = format!(
                        "deactivation deferred to the next run: Graph could not confirm it ({e})"
                    );
                    let mut t = self.traces.take(&cand.change);
                    t.failed(&reason, false);
                    self.pipe.traces.push(self.traces.finish(t));
                    self.fail_user(&id, Some(&cand.change.user_name), reason);
                    continue;
                }
                None => continue,
            };
            // How old this user's answers are now, about to be decided and written.
            let stale = read.asked.elapsed() > super::FRESH_READ_MAX_AGE;
            let mapped = read
                .user
                .as_ref()
                .map(|u| self.map_fresh(u, read.manager.as_ref()));
            let mref = match mapped.as_ref().and_then(|m| m.as_ref().ok()) {
                Some(d) if self.link_manager => match d.manager_entra_id.as_deref() {
                    Some(mid) => match self.manager_target(mid)? {
                        Some(t) => ManagerRef::Known(t),
                        None => ManagerRef::None,
                    },
                    None => ManagerRef::None,
                },
                _ => ManagerRef::None,
            };
            let user = match (&read.user, &mapped) {
                (Some(u), Some(m)) => UserFact::Present {
                    user: u,
                    mapped: m.as_ref(),
                },
                _ => UserFact::Gone { deleted: true },
            };
            let facts = Facts {
                user,
                membership: if read.member_of.is_empty() {
                    Membership::NotMember
                } else {
                    Membership::Member
                },
                confirmed: true,
                existing: Some(&cand.existing),
                manager: &mref,
            };
            let d = decide::decide(&id, &facts, false);
            match d.verdict {
                Verdict::Change(c) if c.action == Action::Deactivate => {
                    if stale {
                        slow.push(cand);
                    } else {
                        apply.push(c);
                    }
                }
                other => {
                    withdrawn += 1;
                    tracing::info!(user = %id, now = ?other, "deactivation withdrawn: Graph says otherwise now");
                    // The planned trace gives way to what Graph says now.
                    let _ = self.traces.take(&cand.change);
                    if let Verdict::Change(c) = other {
                        apply.push(c);
                    }
                }
            }
        }
        if withdrawn > 0 {
            self.report.notes.push(format!(
                "{withdrawn} deactivations were withdrawn: Graph said the user is an enabled member again when asked just before"
            ));
        }
        Ok((apply, slow))
    }

    /// The guard stopped these deactivations: traced as held, reported, none applied.
    fn held(&mut self, changes: Vec<PlannedChange>, trip: GuardTrip) -> Result<(), RunError> {
        tracing::error!(
            would = trip.would_deactivate,
            allowed = trip.allowed,
            used = trip.used,
            "mass-deactivation guard tripped"
        );
        if self.opts.dry_run {
            self.report.changes.extend(changes);
        } else {
            self.trace_held(&changes, &trip)?;
        }
        self.report.guard = Some(trip);
        Ok(())
    }

    /// Maps a user read to confirm a deactivation (record cut to the managed keys).
    fn map_fresh(&self, u: &GraphUser, manager: Option<&GraphUser>) -> Result<Desired, MapFailure> {
        self.ctx.cfg.mapping.apply(u, manager).map(|mut d| {
            d.record.retain(|k, _| self.managed.contains(k));
            d
        })
    }

    /// Rebuilds the incremental worker's membership mirror (direct members of every group in
    /// the tree) from Graph, so that what a lost membership notification hid is healed. Only
    /// where `serve` keeps a mirror (a configured group has a delta link).
    async fn rebuild_mirror(&mut self) -> Result<(), RunError> {
        let store = self.ctx.store;
        let cfg = self.ctx.cfg;
        let mut has_mirror = false;
        for g in &cfg.groups {
            has_mirror |= store.delta_link(g)?.is_some();
        }
        if !has_mirror {
            return Ok(());
        }
        let before = store.group_tree(&cfg.groups)?;
        let mut todo: VecDeque<String> = cfg.groups.iter().cloned().collect();
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let mut listed: Vec<(String, Vec<(String, crate::store::state::MemberKind)>)> = Vec::new();
        while let Some(g) = todo.pop_front() {
            if !seen.insert(g.clone()) || seen.len() > 10_000 {
                continue;
            }
            let members = self.ctx.graph.direct_members(&g).await?;
            for (m, k) in &members {
                if *k == crate::store::state::MemberKind::Group && !seen.contains(m) {
                    todo.push_back(m.clone());
                }
            }
            listed.push((g, members));
        }
        // What the mirror said before, to find whom the rebuild changes: a change made while
        // this run listed (its notification already queued) must still reach those users.
        let mut old: HashMap<String, BTreeSet<String>> = HashMap::new();
        for g in before.iter().chain(listed.iter().map(|(g, _)| g)) {
            if !old.contains_key(g) {
                let users = store
                    .direct_members(g)?
                    .into_iter()
                    .filter(|(_, k)| *k == crate::store::state::MemberKind::User)
                    .map(|(m, _)| m)
                    .collect();
                old.insert(g.clone(), users);
            }
        }
        for (g, members) in &listed {
            store.replace_members(g, members)?;
        }
        let after = store.group_tree(&cfg.groups)?;
        let mut look: BTreeSet<String> = BTreeSet::new();
        for (g, members) in &listed {
            let now: BTreeSet<String> = members
                .iter()
                .filter(|(_, k)| *k == crate::store::state::MemberKind::User)
                .map(|(m, _)| m.clone())
                .collect();
            if let Some(was) = old.get(g) {
                look.extend(was.symmetric_difference(&now).cloned());
            }
        }
        for g in before.difference(&after) {
            look.extend(old.get(g).into_iter().flatten().cloned());
            store.forget_group(g)?;
        }
        if !look.is_empty() {
            tracing::info!(
                users = look.len(),
                "the membership mirror changed under this run; those users are looked at again"
            );
            let hints: Vec<crate::store::queue::QueueItem> = look
                .into_iter()
                .map(crate::store::queue::QueueItem::follow_up)
                .collect();
            store.enqueue(&hints)?;
        }
        if before != after {
            self.report.tree_changed = true;
            tracing::info!(
                before = before.len(),
                after = after.len(),
                "the group tree changed; subscriptions follow"
            );
        }
        for g in &cfg.groups {
            store.remove_meta(&format!("group_stopped/{g}"))?;
        }
        Ok(())
    }

    /// One message of the member reader.
    fn take_feed(&mut self, item: Feed, active_before: u64) -> Result<(), RunError> {
        match item {
            Feed::Page {
                users,
                malformed,
                group,
            } => {
                for m in malformed {
                    self.fail_user("?", None, format!("Graph returned a malformed member: {m}"));
                }
                self.report.counts.members += users.len() as u64;
                self.tick(Progress::PageRead {
                    members: self.report.counts.members,
                });
                self.begin_page(users, group)
            }
            Feed::GroupDone { group, count } => {
                self.check_group_size(&group.id, &group.display_name, count, active_before)?;
                self.report.groups.push(GroupSummary {
                    id: group.id.clone(),
                    name: group.display_name.clone(),
                    members: count,
                });
                Ok(())
            }
        }
    }

    /// The LMS id a manager link may point at now: the manager applied in this run (maybe not
    /// written yet) or indexed, and active in the LMS. `None` for a manager who is not in the
    /// LMS, or not active there (it left scope): its reports get no link (or lose it).
    fn manager_target(&mut self, entra_id: &str) -> Result<Option<String>, StoreError> {
        if self.pipe.deactivated.contains(entra_id) {
            return Ok(None);
        }
        if let Some(t) = self.pipe.unwritten.get(entra_id) {
            return Ok(Some(t.clone()));
        }
        if let Some(None) = self.actual.get(entra_id) {
            // Indexed, but gone from the LMS (a deep run found out): no link to it.
            return Ok(None);
        }
        if let Some(t) = self.pipe.managers.get(entra_id) {
            return Ok(Some(t.clone()));
        }
        // Found in the index, an LMS id stays what it is until the user is applied in this
        // run (which drops it here: the applied id is in `unwritten`, then in the index).
        let found = self.ctx.store.linkable_target(entra_id)?;
        if let Some(t) = &found {
            self.pipe.managers.insert(entra_id.to_string(), t.clone());
        }
        Ok(found)
    }

    /// Takes one page of mapped members: reports those that cannot be mapped, works out which
    /// members are created in this page and how deep each sits in a chain of such managers,
    /// and queues the page for planning (`plan_some`), which the drive does a few members at a
    /// time so that LMS answers keep being picked up while a page is planned.
    fn begin_page(
        &mut self,
        fresh: Vec<(GraphUser, Result<Mapped, MapFailure>)>,
        group: GraphGroup,
    ) -> Result<(), RunError> {
        let mut members: VecDeque<(Desired, Option<IndexEntry>, GraphUser)> =
            VecDeque::with_capacity(fresh.len());
        let mut unmapped = Vec::new();
        for (u, d) in fresh {
            match d {
                Ok((d, existing)) => members.push_back((d, existing, u)),
                Err(f) => {
                    if self.pipe.parked.contains_key(&u.id) {
                        unmapped.push(u.id.clone());
                    }
                    let name = u.string("userPrincipalName");
                    let existing = self.ctx.store.get_user(&u.id)?.map(|mut e| {
                        e.record.retain(|k, _| self.managed.contains(k));
                        e
                    });
                    let none = ManagerRef::None;
                    let facts = Facts {
                        user: UserFact::Present {
                            user: &u,
                            mapped: Err(&f),
                        },
                        membership: Membership::Member,
                        confirmed: false,
                        existing: existing.as_ref(),
                        manager: &none,
                    };
                    let d = decide::decide(&u.id, &facts, false);
                    match (d.verdict, existing) {
                        // A disabled account that can no longer be mapped (e.g. its mailbox
                        // was removed at offboarding) must still be deactivated.
                        (Verdict::Confirm, Some(e)) => {
                            if let Some(mut c) = plan::plan_departure(&u.id, &e) {
                                c.reason = Some(OutOfScope::Disabled.describe().to_string());
                                let out = Some(OutOfScope::Disabled);
                                self.trace_plan(&c, Some(&u), Some(&group), out, false);
                                self.candidates.push(Candidate {
                                    change: c,
                                    existing: e,
                                });
                            }
                        }
                        (Verdict::Fail(reason), _) => {
                            let disabled = d.out == Some(OutOfScope::Disabled);
                            self.trace_unmapped(&u, &group, disabled, &reason)?;
                            self.fail_user(&u.id, name.as_deref(), reason);
                        }
                        _ => self.report.counts.unchanged += 1,
                    }
                }
            }
        }
        for id in unmapped {
            self.unpark_for(&id, false)?;
        }
        let creating: HashSet<&str> = members
            .iter()
            .filter(|(d, e, _)| e.is_none() && is_active(&d.record))
            .map(|(d, _, _)| d.entra_id.as_str())
            .collect();
        let manager_of: HashMap<&str, &str> = members
            .iter()
            .filter_map(|(d, _, _)| Some((d.entra_id.as_str(), d.manager_entra_id.as_deref()?)))
            .collect();
        // Depth in the chain of managers created in this page (capped: cycles exist). A member
        // waits only for a manager of smaller depth, or one of an earlier page: no wait cycle.
        let depth = |id: &str| {
            let (mut n, mut cur) = (0usize, id);
            while let Some(m) = manager_of.get(cur) {
                if n >= 8 || !creating.contains(m) {
                    break;
                }
                n += 1;
                cur = m;
            }
            n
        };
        let depths: HashMap<String, usize> = members
            .iter()
            .filter(|(d, _, _)| {
                d.manager_entra_id.is_some() || creating.contains(d.entra_id.as_str())
            })
            .map(|(d, _, _)| (d.entra_id.clone(), depth(&d.entra_id)))
            .collect();
        if !self.opts.dry_run {
            self.pipe
                .pending
                .extend(creating.iter().map(|id| id.to_string()));
        }
        drop(manager_of);
        // Members parked for a manager listed in this page: they wait for its create, or are
        // planned now when it is not created.
        let listed: Vec<(String, bool)> = if self.pipe.parked.is_empty() {
            Vec::new()
        } else {
            members
                .iter()
                .map(|(d, _, _)| d.entra_id.as_str())
                .filter(|id| self.pipe.parked.contains_key(*id))
                .map(|id| (id.to_string(), creating.contains(id)))
                .collect()
        };
        drop(creating);
        for (id, creating) in listed {
            self.unpark_for(&id, creating)?;
        }
        self.pipe.pages.push_back(PageWork {
            group,
            members,
            depths,
        });
        Ok(())
    }

    /// Plans up to `n` members of the queued pages. Changes go to the write stream; a member
    /// whose manager is being created in this run waits for that create, so the manager link
    /// is set in the member's own request instead of by an extra PATCH at the end.
    fn plan_some(&mut self, n: usize) -> Result<(), RunError> {
        let Some(mut page) = self.pipe.pages.pop_front() else {
            return Ok(());
        };
        let waits = !self.opts.dry_run;
        for _ in 0..n {
            let Some((d, existing, u)) = page.members.pop_front() else {
                break;
            };
            let mref = match (&d.manager_entra_id, self.link_manager) {
                (Some(mid), true) => match self.manager_target(mid)? {
                    Some(t) => ManagerRef::Known(t),
                    None => {
                        let earlier = match page.depths.get(mid) {
                            Some(dm) => page.depths.get(&d.entra_id).is_some_and(|du| dm < du),
                            None => true,
                        };
                        let cycle = self.waits_in_cycle(&d.entra_id, mid);
                        if waits && earlier && !cycle && self.pipe.pending.contains(mid) {
                            self.pipe.waits_on.insert(d.entra_id.clone(), mid.clone());
                            self.pipe
                                .waiting
                                .entry(mid.clone())
                                .or_default()
                                .push(Waiter {
                                    desired: d,
                                    existing,
                                    user: u,
                                    group: page.group.clone(),
                                });
                            continue;
                        }
                        if waits
                            && self.pipe.listing
                            && !cycle
                            && !self.pipe.pending.contains(mid)
                            && self.pipe.pending.contains(&d.entra_id)
                        {
                            // Not listed yet: maybe on a later page. Created first, it is
                            // linked in this member's own write.
                            let mid = mid.clone();
                            self.park(
                                mid,
                                Waiter {
                                    desired: d,
                                    existing,
                                    user: u,
                                    group: page.group.clone(),
                                },
                            )?;
                            continue;
                        }
                        self.deferred
                            .push((d.entra_id.clone(), d.manager_entra_id.clone()));
                        ManagerRef::Deferred
                    }
                },
                _ => ManagerRef::None,
            };
            self.plan_one(&d, existing.as_ref(), &u, &page.group, mref)?;
        }
        if !page.members.is_empty() {
            self.pipe.pages.push_front(page);
        }
        Ok(())
    }

    /// Whether `member` waiting for `manager` would close a cycle of waits.
    fn waits_in_cycle(&self, member: &str, manager: &str) -> bool {
        let mut cur = manager;
        for _ in 0..64 {
            if cur == member {
                return true;
            }
            match self.pipe.waits_on.get(cur) {
                Some(next) => cur = next,
                None => return false,
            }
        }
        // A chain this long: do not wait.
        true
    }

    /// Holds a member until its manager is listed (or the listing ends).
    fn park(&mut self, manager: String, w: Waiter) -> Result<(), StoreError> {
        self.pipe
            .waits_on
            .insert(w.desired.entra_id.clone(), manager.clone());
        let list = self.pipe.parked.entry(manager.clone()).or_default();
        if list.is_empty() {
            self.pipe.parked_order.push_back(manager);
        }
        list.push(w);
        self.pipe.parked_count += 1;
        while self.pipe.parked_count > MAX_PARKED {
            let Some(oldest) = self.pipe.parked_order.pop_front() else {
                break;
            };
            self.unpark(&oldest)?;
        }
        Ok(())
    }

    /// The manager `entra_id` was listed in this page (`creating`: its create is queued) or
    /// the listing ended: the members parked for it wait for its create or are planned now.
    fn unpark_for(&mut self, entra_id: &str, creating: bool) -> Result<(), StoreError> {
        if !self.pipe.parked.contains_key(entra_id) {
            return Ok(());
        }
        if creating && self.pipe.pending.contains(entra_id) {
            let ws = self.pipe.parked.remove(entra_id).unwrap_or_default();
            self.pipe.parked_count = self.pipe.parked_count.saturating_sub(ws.len());
            self.pipe.parked_order.retain(|m| m != entra_id);
            self.pipe
                .waiting
                .entry(entra_id.to_string())
                .or_default()
                .extend(ws);
            return Ok(());
        }
        self.pipe.parked_order.retain(|m| m != entra_id);
        self.unpark(entra_id)
    }

    /// Plans the members parked for `manager` with what is known of it now.
    fn unpark(&mut self, manager: &str) -> Result<(), StoreError> {
        let ws = self.pipe.parked.remove(manager).unwrap_or_default();
        self.pipe.parked_count = self.pipe.parked_count.saturating_sub(ws.len());
        for w in ws {
            let target = self.manager_target(manager)?;
            self.plan_waiter(w, target)?;
        }
        Ok(())
    }

    /// Plans a member that waited for its manager: linked to it when it is in the target
    /// (`target`), else linked at the end of the run.
    fn plan_waiter(&mut self, w: Waiter, target: Option<String>) -> Result<(), StoreError> {
        self.pipe.waits_on.remove(&w.desired.entra_id);
        let mref = match target {
            Some(t) => ManagerRef::Known(t),
            None => {
                let d = &w.desired;
                self.deferred
                    .push((d.entra_id.clone(), d.manager_entra_id.clone()));
                ManagerRef::Deferred
            }
        };
        self.plan_one(&w.desired, w.existing.as_ref(), &w.user, &w.group, mref)
    }

    /// The listing ended: nobody waits for a manager who was not listed.
    fn unpark_all(&mut self) -> Result<(), StoreError> {
        self.pipe.listing = false;
        while let Some(m) = self.pipe.parked_order.pop_front() {
            self.unpark(&m)?;
        }
        Ok(())
    }

    /// Plans one mapped member with what is known of its manager.
    fn plan_one(
        &mut self,
        d: &Desired,
        existing: Option<&IndexEntry>,
        u: &GraphUser,
        group: &GraphGroup,
        mref: ManagerRef,
    ) -> Result<(), StoreError> {
        let mut queued_create = false;
        let facts = Facts {
            user: UserFact::Present {
                user: u,
                mapped: Ok(d),
            },
            membership: Membership::Member,
            confirmed: false,
            existing,
            manager: &mref,
        };
        // A create's diff lists its record again: only a dry run shows it.
        match decide::decide(&d.entra_id, &facts, self.opts.dry_run).verdict {
            Verdict::Skip => {
                self.report.counts.skipped += 1;
                self.trace_skipped(d, u, group)?;
            }
            Verdict::Unchanged { remember_manager } => {
                self.report.counts.unchanged += 1;
                if remember_manager {
                    self.remember
                        .push((d.entra_id.clone(), d.manager_entra_id.clone()));
                }
            }
            Verdict::Confirm => {
                // A disabled member: deactivated once Graph confirms it, after the listing.
                if let (Some(mut c), Some(e)) = (
                    plan::plan_member_with(d, existing, &mref, self.opts.dry_run),
                    existing,
                ) {
                    c.reason = Some(OutOfScope::Disabled.describe().to_string());
                    let out = Some(OutOfScope::Disabled);
                    self.trace_plan(&c, Some(u), Some(group), out, true);
                    self.candidates.push(Candidate {
                        change: c,
                        existing: e.clone(),
                    });
                }
            }
            Verdict::Fail(reason) | Verdict::Wait(reason) => {
                self.fail_user(&d.entra_id, Some(&d.user_name), reason);
            }
            Verdict::Change(c) => {
                let out = (!is_active(&c.record)).then_some(OutOfScope::Disabled);
                self.trace_plan(&c, Some(u), Some(group), out, true);
                if self.opts.dry_run {
                    self.count(c.action);
                    self.report.changes.push(&c);
                } else {
                    queued_create = c.action == Action::Create;
                    self.pipe.ready.push_back(c);
                }
            }
        }
        if !queued_create {
            // Not created after all: whoever waits for it gets the link at the end.
            self.resolve(&d.entra_id, None)?;
        }
        Ok(())
    }

    /// The create of `entra_id` answered (`target`: its LMS id, `None`: it failed or was not
    /// made): plans the members that waited for it as their manager.
    fn resolve(&mut self, entra_id: &str, target: Option<&str>) -> Result<(), StoreError> {
        if !self.pipe.pending.remove(entra_id) {
            return Ok(());
        }
        for w in self.pipe.waiting.remove(entra_id).unwrap_or_default() {
            self.plan_waiter(w, target.map(str::to_string))?;
        }
        Ok(())
    }

    /// A group that had members and now has none is an error, never "everyone left".
    fn check_group_size(
        &mut self,
        id: &str,
        name: &str,
        count: u64,
        active_before: u64,
    ) -> Result<(), RunError> {
        if count > 0 {
            return Ok(());
        }
        let before: Option<u64> = self.ctx.store.get_meta(&format!("group_count/{id}"))?;
        let suspicious =
            before.unwrap_or(0) > 0 || (self.ctx.cfg.groups.len() == 1 && active_before > 0);
        if suspicious && self.opts.allow_mass_deactivation {
            tracing::warn!(
                group = id,
                "group is empty; accepted because of --allow-mass-deactivation"
            );
        } else if suspicious {
            return Err(RunError::Source(format!(
                "group {name:?} ({id}) returned no members but had {} before; refusing to treat that as everyone leaving. Check the group in Entra and the app's GroupMember.Read.All permission; if it really is empty now, run once with --allow-mass-deactivation",
                before.unwrap_or(active_before)
            )));
        }
        self.report
            .notes
            .push(format!("group {name:?} ({id}) has no user members"));
        Ok(())
    }

    /// Applies `changes` with the target's bounded concurrency and records the results.
    /// `counted` is false for follow-up changes of users already counted in this run.
    async fn apply_all(
        &mut self,
        changes: Vec<PlannedChange>,
        counted: bool,
    ) -> Result<(), RunError> {
        // Nothing to send may still leave traces to write (a deactivation Graph could not
        // confirm, or left to the next run).
        if changes.is_empty() && self.pipe.traces.is_empty() && self.pipe.entries.is_empty() {
            return Ok(());
        }
        if self.opts.dry_run {
            if counted {
                for c in &changes {
                    self.count(c.action);
                }
                self.report.changes.extend(changes);
            }
            return Ok(());
        }
        self.pipe.ready.extend(changes);
        self.drive(None, counted).await
    }

    /// Runs the write stream until everything ready (and, with a member feed, everything the
    /// feed brings) is applied and its index entries and traces are written. Keeps the
    /// target's `concurrency` changes in flight; plans the next page when fewer than twice that
    /// many are left to start. Before changes are sent their intents are stored and made
    /// durable, a chunk at a time while earlier chunks are in flight (`store::intents`); a
    /// chunk's record is settled once its index entries are written. On an error nothing new
    /// is started, what is in flight is finished and recorded, and the first error is returned.
    async fn drive(
        &mut self,
        mut feed: Option<(&mut FeedRx, u64)>,
        counted: bool,
    ) -> Result<(), RunError> {
        let conc = self.ctx.cfg.target.concurrency.max(1);
        if feed.is_some() {
            self.pipe.listing = true;
        }
        let ctx = self.ctx;
        let store = ctx.store;
        let managed = Arc::new(self.managed.clone());
        let start = |c: PlannedChange, chunk: IntentId| {
            let managed = Arc::clone(&managed);
            async move {
                let span =
                    tracing::info_span!("apply", user = %c.entra_id, action = c.action.as_str());
                let r = apply_change(ctx, &managed, &c).instrument(span).await;
                (c, chunk, r)
            }
        };
        type Durable<'s, E = StoreError> =
            std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), E>> + Send + 's>>;
        let mut announcing: Option<(Vec<PlannedChange>, IntentId, Durable<'_>)> = None;
        let mut inflight = FuturesUnordered::new();
        let mut writing: Option<WriteJob> = None;
        // A failure that may be the LMS's, not the user's: does it answer at all? Asked beside
        // the writes in flight, which go on being driven meanwhile: the probe's own LMS
        // request waits for a place in the pacer's window that they hold.
        let mut probing: Option<Durable<'_, RunError>> = None;
        let mut error: Option<RunError> = None;
        loop {
            if error.is_none() && self.probe_due && probing.is_none() {
                self.probe_due = false;
                probing = Some(Box::pin(super::apply::probe(ctx)));
            }
            // No new write while the probe is out.
            if error.is_none() && probing.is_none() {
                let queued = self.pipe.armed.len();
                if announcing.is_none() && !self.pipe.ready.is_empty() && queued < 2 * conc {
                    let n = self.pipe.ready.len().min(INTENT_CHUNK);
                    let chunk: Vec<PlannedChange> = self.pipe.ready.drain(..n).collect();
                    match store.record_intents(chunk.iter().map(intent_of).collect()) {
                        Ok(id) => {
                            self.pipe.chunks.insert(
                                id,
                                Chunk {
                                    outstanding: chunk.len(),
                                    uncertain: Vec::new(),
                                },
                            );
                            announcing = Some((chunk, id, Box::pin(store.durable())));
                        }
                        Err(e) => {
                            error.get_or_insert(e.into());
                        }
                    }
                }
                // A writer that fell behind holds back new LMS writes (not their answers).
                let behind = writing.is_some()
                    && self.pipe.entries.len() + self.pipe.traces.len() >= MAX_UNWRITTEN;
                while inflight.len() < conc && !behind {
                    let Some((c, id)) = self.pipe.armed.pop_front() else {
                        break;
                    };
                    // Held until its index entry is written (or it failed).
                    if !ctx.gate.try_write(&c.entra_id, self.epoch) {
                        if let Err(e) = self.leave_to_worker(c, id) {
                            error.get_or_insert(e.into());
                        }
                        continue;
                    }
                    inflight.push(start(c, id));
                }
            }
            let buffered = self.pipe.entries.len() + self.pipe.traces.len();
            // The worker may be waiting for one of these users: no need to fill a batch first.
            if writing.is_none()
                && buffered > 0
                && (buffered >= WRITE_BATCH || inflight.is_empty() || ctx.gate.worker_waiting())
            {
                writing = Some(self.write_applied());
            }
            if feed.is_some() && error.is_some() {
                feed = None;
                self.pipe.listing = false;
            }
            let waiting = self.pipe.ready.len() + self.pipe.armed.len();
            let want_page = feed.is_some() && self.pipe.pages.is_empty() && waiting < 2 * conc;
            // Planning comes last: the changes just started are sent, and answers already in
            // are taken, before the next chunk of members is planned.
            let want_plan = error.is_none() && waiting < 2 * conc && !self.pipe.pages.is_empty();
            let event = tokio::select! {
                biased;
                Some(done) = inflight.next(), if !inflight.is_empty() => Event::Applied(done),
                a = async {
                    match announcing.as_mut() {
                        Some((_, _, f)) => f.await,
                        None => std::future::pending().await,
                    }
                }, if announcing.is_some() => Event::Announced(a),
                w = async {
                    match writing.as_mut() {
                        Some(h) => h.await,
                        None => std::future::pending().await,
                    }
                }, if writing.is_some() => Event::Written(w),
                p = async {
                    match probing.as_mut() {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                }, if probing.is_some() => Event::Probed(p),
                item = async {
                    match feed.as_mut() {
                        Some((rx, _)) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                }, if want_page => Event::Feed(item),
                () = std::future::ready(()), if want_plan => Event::Plan,
                else => break,
            };
            match event {
                Event::Applied((c, id, r)) => {
                    if let Err(e) = self.on_applied(c, id, r, counted) {
                        error.get_or_insert(e);
                    }
                }
                Event::Announced(r) => {
                    if let Some((chunk, id, _)) = announcing.take() {
                        match r {
                            Ok(()) => self.pipe.armed.extend(chunk.into_iter().map(|c| (c, id))),
                            // Not sent: the intents stay and are read back next time.
                            Err(e) => {
                                error.get_or_insert(e.into());
                            }
                        }
                    }
                }
                Event::Written(w) => {
                    writing = None;
                    match w {
                        Ok((keys, Ok(()))) => {
                            for k in keys {
                                ctx.gate.release_write(&k);
                                self.pipe.unwritten.remove(&k);
                                let id = self
                                    .pipe
                                    .chunk_of
                                    .get_mut(&k)
                                    .and_then(|v| (!v.is_empty()).then(|| v.remove(0)));
                                if self.pipe.chunk_of.get(&k).is_some_and(Vec::is_empty) {
                                    self.pipe.chunk_of.remove(&k);
                                }
                                if let Some(id) = id {
                                    if let Err(e) = self.chunk_done(id) {
                                        error.get_or_insert(e.into());
                                    }
                                }
                            }
                        }
                        Ok((_, Err(e))) => {
                            error.get_or_insert(e.into());
                        }
                        Err(_) => {
                            error.get_or_insert(RunError::Source(
                                "the index writer thread stopped".into(),
                            ));
                        }
                    }
                }
                Event::Probed(r) => {
                    probing = None;
                    if let Err(e) = r {
                        tracing::error!(error = %e, "the LMS or Graph does not answer; stopping the run");
                        error.get_or_insert(e);
                    }
                }
                Event::Plan => {
                    if let Err(e) = self.plan_some(PLAN_CHUNK) {
                        error.get_or_insert(e);
                    }
                }
                Event::Feed(None) => {
                    feed = None;
                    if let Err(e) = self.unpark_all() {
                        error.get_or_insert(e.into());
                    }
                }
                Event::Feed(Some(item)) => {
                    let active_before = feed.as_ref().map_or(0, |(_, n)| *n);
                    if let Err(e) = item.and_then(|i| self.take_feed(i, active_before)) {
                        error.get_or_insert(e);
                    }
                }
            }
        }
        self.tick(Progress::Applied { done: self.applied });
        if let Some(e) = error {
            return Err(e);
        }
        // Only reachable with a broken wait chain; those members then get the link at the end.
        let stuck: Vec<String> = self.pipe.pending.iter().cloned().collect();
        for id in stuck {
            self.resolve(&id, None)?;
        }
        if !self.pipe.ready.is_empty() || !self.pipe.armed.is_empty() {
            return Box::pin(self.drive(None, counted)).await;
        }
        Ok(())
    }

    /// A change of a user the incremental worker holds, or wrote during this run: not sent
    /// (the worker's read is fresher than this run's plan); its intent is settled as not
    /// written, and members waiting for it as their manager are linked at the end.
    fn leave_to_worker(&mut self, c: PlannedChange, chunk: IntentId) -> Result<(), StoreError> {
        tracing::info!(user = %c.entra_id, action = c.action.as_str(), "left to the incremental worker, which changed this user during the run");
        let _ = self.traces.take(&c);
        self.left += 1;
        self.chunk_done(chunk)?;
        self.resolve(&c.entra_id, None)
    }

    /// One change of an intent record is settled (written to the index, or failed): once all
    /// are, the record goes (or keeps only the changes whose outcome is unknown).
    fn chunk_done(&mut self, id: IntentId) -> Result<(), StoreError> {
        let Some(chunk) = self.pipe.chunks.get_mut(&id) else {
            return Ok(());
        };
        chunk.outstanding = chunk.outstanding.saturating_sub(1);
        if chunk.outstanding == 0 {
            if let Some(chunk) = self.pipe.chunks.remove(&id) {
                self.ctx.store.settle_intents(id, chunk.uncertain)?;
            }
        }
        Ok(())
    }

    /// Hands the applied changes' index entries and traces to the writer thread, in that
    /// order (a trace relies on its index entry).
    fn write_applied(&mut self) -> WriteJob {
        let store = self.ctx.store;
        let writer = self
            .writer
            .get_or_insert_with(|| BackgroundWriter::start(store.clone()));
        let entries = std::mem::replace(&mut self.pipe.entries, Vec::with_capacity(WRITE_BATCH));
        let traces = std::mem::replace(&mut self.pipe.traces, Vec::with_capacity(WRITE_BATCH));
        let job = writer.write(entries, traces);
        self.tick(Progress::Applied { done: self.applied });
        job
    }

    /// Records the LMS's answer to one change (`chunk`: its intent record).
    fn on_applied(
        &mut self,
        c: PlannedChange,
        chunk: IntentId,
        r: Result<Applied, ApplyError>,
        counted: bool,
    ) -> Result<(), RunError> {
        match r {
            Ok(applied) => {
                if self.traces.enabled() {
                    let t = self.trace_applied(&c, &applied.matched, counted)?;
                    self.pipe.traces.push(t);
                }
                // What was just applied is what the LMS holds now.
                self.actual.remove(&c.entra_id);
                let target = applied.entry.target_id.clone();
                self.pipe.managers.remove(&c.entra_id);
                if c.action == Action::Deactivate {
                    self.pipe.deactivated.insert(c.entra_id.clone());
                    self.pipe.unwritten.remove(&c.entra_id);
                } else {
                    self.pipe.deactivated.remove(&c.entra_id);
                    self.pipe
                        .unwritten
                        .insert(c.entra_id.clone(), target.clone());
                }
                self.pipe
                    .chunk_of
                    .entry(c.entra_id.clone())
                    .or_default()
                    .push(chunk);
                self.pipe.entries.push((c.entra_id.clone(), applied.entry));
                self.applied += 1;
                self.suspect_streak = 0;
                self.resolve(&c.entra_id, Some(&target))?;
                if counted {
                    self.count(c.action);
                    // A create's diff is its whole record: keep the report small.
                    let changes = if c.action == Action::Create {
                        Vec::new()
                    } else {
                        c.changes
                    };
                    self.report.changes.push(&PlannedChange {
                        record: Record::new(),
                        changes,
                        ..c
                    });
                }
                Ok(())
            }
            Err(ApplyError::User {
                message,
                uncertain,
                suspect,
            }) => {
                self.not_written(&c, chunk, &message, uncertain)?;
                self.probe_due |= suspect;
                if suspect {
                    self.suspect_streak += 1;
                }
                let stop = (suspect && self.suspect_streak >= SUSPECT_STREAK_STOP).then(|| {
                    RunError::Source(format!(
                        "the LMS refused {} writes in a row, the last with: {message}; stopping the run",
                        self.suspect_streak
                    ))
                });
                self.fail_user(&c.entra_id, Some(&c.user_name), message);
                self.resolve(&c.entra_id, None)?;
                match stop {
                    Some(e) => Err(e),
                    None => Ok(()),
                }
            }
            Err(ApplyError::Deferred { message, uncertain }) => {
                tracing::info!(user = %c.entra_id, user_name = %c.user_name, %message, "write deferred to the next run");
                self.not_written(&c, chunk, &message, uncertain)?;
                self.report.counts.deferred += 1;
                self.resolve(&c.entra_id, None)?;
                Ok(())
            }
            Err(ApplyError::Fatal(e)) => Err(e),
        }
    }

    /// A change the LMS did not take (failed or deferred): the gate lets the user go, its
    /// trace says why, and its intent is settled (kept when the write may still have landed).
    fn not_written(
        &mut self,
        c: &PlannedChange,
        chunk: IntentId,
        message: &str,
        uncertain: bool,
    ) -> Result<(), StoreError> {
        self.ctx.gate.release_write(&c.entra_id);
        if self.traces.enabled() {
            let mut t = self.traces.take(c);
            t.failed(message, true);
            let t = self.traces.finish(t);
            self.pipe.traces.push(t);
        }
        if uncertain {
            if let Some(ch) = self.pipe.chunks.get_mut(&chunk) {
                ch.uncertain.push(intent_of(c));
            }
        }
        self.chunk_done(chunk)
    }

    fn count(&mut self, a: Action) {
        let c = &mut self.report.counts;
        match a {
            Action::Create => c.created += 1,
            Action::Update => c.updated += 1,
            Action::Deactivate => c.deactivated += 1,
            Action::Reactivate => c.reactivated += 1,
        }
    }

    /// Links managers that were not in the target when their reports were planned (created
    /// later in this run), and clears links to managers that are not in the target at all.
    async fn settle_managers(
        &mut self,
        users: Vec<(String, Option<String>)>,
    ) -> Result<(), RunError> {
        let mut changes = Vec::new();
        let mut index_only = Vec::new();
        let mut pending_in_dry_run = 0;
        for (id, manager) in users {
            let Some(mut e) = self.indexed(&id)? else {
                // Only in a dry run (or after a failed create) is the user still unindexed.
                pending_in_dry_run += 1;
                continue;
            };
            let want = match &manager {
                Some(m) if self.link_manager => self.manager_target(m)?.map(AttrValue::Str),
                _ => None,
            };
            if e.record.get(MANAGER) == want.as_ref() {
                if e.manager != manager
                    && !self.opts.dry_run
                    && !self.ctx.gate.worker_has(&id, self.epoch)
                {
                    // Nothing to send, but remember who the manager is now.
                    if let Some(mut full) = self.ctx.store.get_user(&id)? {
                        full.manager = manager;
                        index_only.push((id, full));
                    }
                }
                continue;
            }
            e.manager = manager;
            let mut record = e.record.clone();
            match &want {
                Some(v) => record.insert(MANAGER.into(), v.clone()),
                None => record.remove(MANAGER),
            };
            changes.push(PlannedChange {
                action: Action::Update,
                entra_id: id.clone(),
                user_name: e.user_name.clone(),
                target_id: Some(e.target_id.clone()),
                changes: plan::diff(&e.record, &record),
                reason: Some("manager link".into()),
                record,
                manager: e.manager.clone(),
                linked: e.linked,
            });
        }
        if self.opts.dry_run && pending_in_dry_run > 0 {
            self.report.notes.push(format!(
                "{pending_in_dry_run} new users get their manager link at the end of the run, once their manager exists in the LMS"
            ));
        }
        self.ctx.store.put_users(&index_only)?;
        // A user created or updated earlier in this run is not counted a second time.
        let already: HashSet<String> = if changes.is_empty() {
            HashSet::new()
        } else {
            let these: HashSet<&str> = changes.iter().map(|c| c.entra_id.as_str()).collect();
            self.report
                .changes
                .entra_ids()
                .filter(|id| these.contains(id.as_str()))
                .collect()
        };
        let (again, fresh): (Vec<_>, Vec<_>) = changes
            .into_iter()
            .partition(|c| already.contains(c.entra_id.as_str()));
        self.apply_all(again, false).await?;
        let before = self.report.counts.updated;
        self.apply_all(fresh, true).await?;
        // Those were counted as unchanged when first planned.
        let moved = self.report.counts.updated - before;
        self.report.counts.unchanged = self.report.counts.unchanged.saturating_sub(moved);
        Ok(())
    }
}

/// The configured group a member was listed in, as a trace's scope.
fn listed_in(g: &GraphGroup) -> Via {
    Via {
        group_id: g.id.clone(),
        group_name: (!g.display_name.is_empty()).then(|| g.display_name.clone()),
        path: trace::Path::Transitive,
    }
}

/// Aborts the member reader task when the run ends early.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type FeedRx = tokio::sync::mpsc::Receiver<Result<Feed, RunError>>;

/// A member as mapped, with its index entry (record cut down to the managed keys).
type Mapped = (Desired, Option<IndexEntry>);

/// The user's index entry with its record cut down to the managed keys; in a deep run, with
/// what the LMS really holds (`actual`: `None` when the LMS user was deleted by hand).
fn lookup(
    store: &IntegrationStore,
    actual: &HashMap<String, Option<Record>>,
    managed: &BTreeSet<String>,
    entra_id: &str,
) -> Result<Option<IndexEntry>, StoreError> {
    Ok(cut(store.get_user(entra_id)?, actual, managed, entra_id))
}

/// [`lookup`] of an entry already read.
fn cut(
    entry: Option<IndexEntry>,
    actual: &HashMap<String, Option<Record>>,
    managed: &BTreeSet<String>,
    entra_id: &str,
) -> Option<IndexEntry> {
    let mut e = entry?;
    match actual.get(entra_id) {
        Some(None) => return None,
        Some(Some(r)) => e.record = r.clone(),
        None => {}
    }
    e.record.retain(|k, _| managed.contains(k));
    Some(e)
}

/// What the Graph reader hands to the planner.
enum Feed {
    /// Members not seen before in this run, with their managers.
    Page {
        /// Each user with its mapping (done by the reader, on its own task, so mapping the
        /// next page overlaps with applying this one).
        users: Vec<(GraphUser, Result<Mapped, MapFailure>)>,
        malformed: Vec<String>,
        /// The configured group being listed (for the decision traces).
        group: GraphGroup,
    },
    /// A group was listed completely.
    GroupDone { group: GraphGroup, count: u64 },
}

/// Reads every group's members page by page (and their managers) into `tx`. Returns the ids
/// of all members seen once every group was listed completely; on an error it sends the error
/// and returns it too.
/// What the member reader reads and how it maps what it read.
struct FeedSpec {
    groups: Vec<String>,
    user_select: Vec<String>,
    manager_select: Option<Vec<String>>,
    concurrency: usize,
    mapping: Mapping,
    /// Attributes the target accepts; others are dropped from mapped records.
    managed: BTreeSet<String>,
    /// Each mapped member's index entry is read by the reader too, off the planner's task.
    store: IntegrationStore,
    /// Deep runs: what the LMS really holds where it differs from the index.
    actual: HashMap<String, Option<Record>>,
    /// How managers are learnt (with `manager_select`).
    managers: Option<super::managers::Mode>,
}

async fn feed_members(
    graph: Arc<GraphClient>,
    spec: FeedSpec,
    tx: tokio::sync::mpsc::Sender<Result<Feed, RunError>>,
) -> Result<HashSet<String>, RunError> {
    let FeedSpec {
        groups,
        user_select,
        manager_select,
        concurrency,
        mapping,
        managed,
        store,
        actual,
        managers: manager_mode,
    } = spec;
    let mut seen: HashSet<String> = HashSet::new();
    // Managers read or looked up in this run (a manager has many reports).
    let mut memo = HashMap::new();
    let result: Result<bool, RunError> = async {
        for group_id in &groups {
            let group = graph.group(group_id).await?;
            let span = tracing::info_span!("group", group = %group.id, name = %group.display_name);
            let mut count = 0u64;
            let mut pages = 0u64;
            let mut next = Some(graph.transitive_users_url(group_id, &user_select));
            while let Some(url) = next.take() {
                let mut page = graph.user_page(&url).instrument(span.clone()).await?;
                pages += 1;
                // A peer that repeats a nextLink or never ends must not hold the run forever
                // (10 million members at 100 a page).
                if page.next.as_deref() == Some(url.as_str()) || pages > 100_000 {
                    return Err(RunError::Source(format!(
                        "Graph paging of group {group_id} does not end (page {pages} links to itself or the listing is implausibly long)"
                    )));
                }
                next = page.next.take();
                count += page.users.len() as u64;
                if page.lacks_properties() {
                    return Err(RunError::Source(
                        "Graph returns members without properties (no userPrincipalName): the app lacks User.Read.All; grant it and have an administrator consent".into(),
                    ));
                }
                let users: Vec<GraphUser> = page.users.into_iter().filter(|u| seen.insert(u.id.clone())).collect();
                let entries = users
                    .iter()
                    .map(|u| store.get_user(&u.id))
                    .collect::<Result<Vec<_>, _>>()?;
                let managers = match (&manager_select, &manager_mode) {
                    (Some(sel), Some(mode)) => {
                        let from = super::managers::Lookup { graph: &graph, store: &store, mode, select: sel, concurrency };
                        from.page(&users, &entries, &mut memo).instrument(span.clone()).await?
                    }
                    _ => HashMap::new(),
                };
                let mut mapped = Vec::with_capacity(users.len());
                for (u, entry) in users.into_iter().zip(entries) {
                    let mgr = managers.get(&u.id).and_then(|m| m.as_ref());
                    let d = match mapping.apply(&u, mgr) {
                        Ok(mut d) => {
                            d.record.retain(|k, _| managed.contains(k));
                            let existing = cut(entry, &actual, &managed, &u.id);
                            Ok((d, existing))
                        }
                        Err(f) => Err(f),
                    };
                    mapped.push((u, d));
                }
                let users = mapped;
                let msg = Feed::Page {
                    users,
                    malformed: page.malformed,
                    group: group.clone(),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return Ok(false);
                }
            }
            if tx.send(Ok(Feed::GroupDone { group, count })).await.is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    }
    .await;
    match result {
        Ok(true) => Ok(seen),
        Ok(false) => Err(RunError::Source("the member listing was abandoned".into())),
        Err(e) => {
            let msg = e.to_string();
            let _ = tx.send(Err(e)).await;
            Err(RunError::Source(msg))
        }
    }
}
