//! Incremental sync: turns queued hints into LMS changes.
//!
//! Notifications are hints, not truth. A membership hint runs the group's delta from the saved
//! delta link and turns every member it names into a user hint; a user hint re-reads the user
//! (and manager) from Graph and plans against the index exactly like a full reconcile, then the
//! same guard and the same apply code run. Each batch handles a user at most once, and batches
//! of one integration run one after another, so one user never has two changes in flight.
//!
//! Durability: derived user hints are queued before a delta link is advanced, and an item
//! leaves the queue only after its change was applied or it was moved to the dead letters.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::Utc;
use futures::{stream, StreamExt};
use tracing::Instrument;

use super::mapping::Record;
use super::plan::{self, Action, GuardTrip, ManagerRef, PlannedChange};
use super::reconcile::{apply_change, Applied, ApplyError, Context, RunError};
use super::trace::{self, Match, OutOfScope, Scope, Source, Trace, Via};
use crate::graph::delta::{DeltaRound, MemberChange};
use crate::graph::models::GraphUser;
use crate::graph::GraphError;
use crate::store::queue::{Hint, QueueItem};
use crate::store::state::MemberKind;
use crate::store::{IndexEntry, StoreError};
use crate::target::Target;

/// What the target accepts, from discovery (read once per worker start).
#[derive(Clone, Debug)]
pub struct Targeting {
    pub managed: BTreeSet<String>,
    pub link_manager: bool,
}

pub async fn targeting<T: Target>(ctx: &Context<'_, T>) -> Result<Targeting, RunError> {
    let caps = ctx.target.discover().await?;
    let link_manager = ctx.cfg.mapping.link_manager && caps.enterprise;
    let managed = plan::managed_keys(
        ctx.cfg.mapping.rules.iter().map(|r| r.key.as_str()),
        link_manager,
    )
    .into_iter()
    .filter(|k| caps.accepts(k))
    .collect();
    Ok(Targeting {
        managed,
        link_manager,
    })
}

#[derive(Clone, Debug)]
pub struct WorkerSettings {
    pub concurrency: usize,
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            concurrency: 8,
            max_attempts: 8,
            backoff_base: Duration::from_secs(2),
            backoff_cap: Duration::from_secs(15 * 60),
        }
    }
}

/// What one batch did.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    pub changes: Vec<PlannedChange>,
    pub unchanged: usize,
    /// Items that failed this time (retried later or buried).
    pub failed: Vec<(String, String)>,
    pub buried: usize,
    /// What was moved to the dead letters (for the alert).
    pub dead_letters: Vec<(u64, QueueItem)>,
    /// Groups whose delta link had expired: the caller should run a full reconcile.
    pub expired_groups: Vec<String>,
    /// Groups (nested) that joined the tree: they need subscriptions.
    pub new_groups: Vec<String>,
    pub guard: Option<GuardTrip>,
}

pub(crate) enum Failure {
    /// This item failed; retry it later.
    Item(String),
    /// The whole batch must stop (store, auth, LMS down).
    Fatal(RunError),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Fatal(e.into())
    }
}

impl From<GraphError> for Failure {
    fn from(e: GraphError) -> Self {
        match &e {
            GraphError::Auth { .. } => Failure::Fatal(e.into()),
            GraphError::Transport { .. } => Failure::Fatal(e.into()),
            GraphError::Api { status, .. } if *status == 401 || *status == 403 => {
                Failure::Fatal(e.into())
            }
            _ => Failure::Item(e.to_string()),
        }
    }
}

/// Processes membership and user items (other kinds are the caller's). Items that succeed are
/// removed from the queue; failed ones are retried with exponential backoff and buried after
/// `max_attempts`. A fatal error (store, Graph auth, LMS unreachable) leaves every item queued
/// with one more attempt counted, and is returned.
pub async fn process<T: Target>(
    ctx: &Context<'_, T>,
    tg: &Targeting,
    ws: &WorkerSettings,
    items: Vec<(u64, QueueItem)>,
) -> Result<BatchOutcome, RunError> {
    let mut out = BatchOutcome::default();
    let mut done: Vec<u64> = Vec::new();
    let mut failed: Vec<(u64, QueueItem, String)> = Vec::new();

    // 1. Membership: one delta round per distinct group.
    let mut groups: BTreeMap<String, Vec<(u64, QueueItem)>> = BTreeMap::new();
    let mut users: BTreeMap<String, (bool, Vec<(u64, QueueItem)>)> = BTreeMap::new();
    for (id, it) in items {
        match &it.hint {
            Hint::Membership { group_id } => groups
                .entry(group_id.to_ascii_lowercase())
                .or_default()
                .push((id, it)),
            Hint::User { user_id, follow_up } => {
                let e = users
                    .entry(user_id.to_ascii_lowercase())
                    .or_insert((true, Vec::new()));
                e.0 &= *follow_up;
                e.1.push((id, it));
            }
            _ => {}
        }
    }
    for (group_id, its) in groups {
        let span = tracing::info_span!("membership", group = %group_id);
        match membership(ctx, &group_id, &mut out).instrument(span).await {
            Ok(()) => done.extend(its.iter().map(|(id, _)| *id)),
            Err(Failure::Item(m)) => {
                tracing::warn!(group = %group_id, error = %m, "membership hint failed");
                failed.extend(its.into_iter().map(|(id, it)| (id, it, m.clone())));
            }
            Err(Failure::Fatal(e)) => {
                settle(ctx, ws, &done, failed, &mut out)?;
                return Err(e);
            }
        }
    }

    // 2. Users: plan each one (Graph reads run concurrently), then guard, then apply.
    // After the membership rounds above, so it includes groups they added.
    let tree = ctx.store.group_tree(&ctx.cfg.groups)?;
    let tree = &tree;
    let wanted: Vec<(String, bool)> = users.iter().map(|(u, (f, _))| (u.clone(), *f)).collect();
    let plans: Vec<(String, Result<UserPlan, Failure>)> =
        stream::iter(wanted.into_iter().map(|(uid, follow_up)| async move {
            let span = tracing::info_span!("user", user = %uid);
            let r = plan_user(ctx, tg, tree, &uid, follow_up)
                .instrument(span)
                .await;
            (uid, r)
        }))
        .buffer_unordered(ws.concurrency.max(1))
        .collect()
        .await;
    let mut to_apply: Vec<PlannedChange> = Vec::new();
    let mut follow_ups: Vec<QueueItem> = Vec::new();
    let mut fatal: Option<RunError> = None;
    let mut outcome_of: BTreeMap<String, Result<(), String>> = BTreeMap::new();
    // The decisions worth a trace (changes and failures), by user.
    let mut traces: BTreeMap<String, Trace> = BTreeMap::new();
    for (uid, r) in plans {
        match r {
            Ok(p) => {
                follow_ups.extend(p.follow_ups.into_iter().map(QueueItem::new));
                if let Some(t) = p.trace {
                    traces.insert(uid.clone(), t);
                }
                match (p.change, p.failure) {
                    (_, Some(m)) => {
                        outcome_of.insert(uid, Err(m));
                    }
                    (Some(c), None) => to_apply.push(c),
                    (None, None) => {
                        out.unchanged += 1;
                        outcome_of.insert(uid, Ok(()));
                    }
                }
            }
            Err(Failure::Item(m)) => {
                outcome_of.insert(uid, Err(m));
            }
            Err(Failure::Fatal(e)) => fatal = fatal.or(Some(e)),
        }
    }
    if let Some(e) = fatal {
        settle(ctx, ws, &done, failed, &mut out)?;
        return Err(e);
    }

    let deactivations = to_apply
        .iter()
        .filter(|c| c.action == Action::Deactivate)
        .count() as u64;
    if deactivations > 0 {
        let active_before = ctx.store.active_count();
        if let Err(trip) = plan::guard(
            deactivations,
            active_before,
            ctx.cfg.max_deactivations,
            false,
        ) {
            tracing::error!(%trip, "guard tripped in incremental sync; deactivations held as dead letters");
            let msg = format!("guard: {trip}");
            to_apply.retain(|c| {
                if c.action == Action::Deactivate {
                    outcome_of.insert(c.entra_id.clone(), Err(format!("HOLD {msg}")));
                    if let Some(t) = traces.get_mut(&c.entra_id) {
                        t.held(&msg);
                    }
                    false
                } else {
                    true
                }
            });
            out.guard = Some(trip);
        }
    }

    let results: Vec<(PlannedChange, Result<Applied, ApplyError>)> =
        stream::iter(to_apply.into_iter().map(|c| async move {
            let span = tracing::info_span!("apply", user = %c.entra_id, action = c.action.as_str());
            let r = apply_change(ctx, &tg.managed, &c).instrument(span).await;
            (c, r)
        }))
        .buffer_unordered(ws.concurrency.max(1))
        .collect()
        .await;
    let mut entries = Vec::new();
    for (c, r) in results {
        match r {
            Ok(a) => {
                tracing::info!(user = %c.entra_id, user_name = %c.user_name, action = c.action.as_str(), "applied");
                if let Some(t) = traces.get_mut(&c.entra_id) {
                    t.applied(&c, &a.matched);
                }
                entries.push((c.entra_id.clone(), a.entry));
                outcome_of.insert(c.entra_id.clone(), Ok(()));
                out.changes.push(c);
            }
            Err(ApplyError::User(m)) => {
                if let Some(t) = traces.get_mut(&c.entra_id) {
                    t.failed(&m, true);
                }
                outcome_of.insert(c.entra_id.clone(), Err(m));
            }
            Err(ApplyError::Fatal(e)) => {
                fatal = fatal.or(Some(e));
            }
        }
    }
    // Changes a fatal error left undecided (still `planned`) are not a decision.
    let secrets = trace::secrets_of(ctx.cfg);
    let traces: Vec<Trace> = traces
        .into_values()
        .filter(|t| t.outcome != trace::Outcome::Planned)
        .map(|mut t| {
            t.scrub(&secrets);
            t
        })
        .collect();
    ctx.store.put_changes(&entries, traces)?;
    if !follow_ups.is_empty() {
        ctx.store.enqueue(&follow_ups)?;
    }
    for (uid, (_, its)) in users {
        match outcome_of.remove(&uid) {
            Some(Ok(())) => done.extend(its.iter().map(|(id, _)| *id)),
            Some(Err(m)) if m.starts_with("HOLD ") => {
                for (id, mut it) in its {
                    it.last_error = Some(m.trim_start_matches("HOLD ").to_string());
                    ctx.store.bury(id, &it)?;
                    out.buried += 1;
                    out.dead_letters.push((id, it));
                }
            }
            Some(Err(m)) => {
                out.failed.push((uid.clone(), m.clone()));
                failed.extend(its.into_iter().map(|(id, it)| (id, it, m.clone())));
            }
            // Not decided (a fatal error stopped its apply): stays queued as it is.
            None => {}
        }
    }
    settle(ctx, ws, &done, failed, &mut out)?;
    ctx.store.durable().await?;
    match fatal {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Removes finished items; reschedules or buries failed ones.
fn settle<T: Target>(
    ctx: &Context<'_, T>,
    ws: &WorkerSettings,
    done: &[u64],
    failed: Vec<(u64, QueueItem, String)>,
    out: &mut BatchOutcome,
) -> Result<(), StoreError> {
    ctx.store.dequeue(done)?;
    for (id, mut it, err) in failed {
        it.attempts += 1;
        it.last_error = Some(err);
        if it.attempts >= ws.max_attempts {
            tracing::error!(item = id, hint = %it.hint.describe(), attempts = it.attempts, error = ?it.last_error, "giving up; moved to dead letters");
            ctx.store.bury(id, &it)?;
            out.buried += 1;
            out.dead_letters.push((id, it));
        } else {
            let exp = ws
                .backoff_base
                .saturating_mul(1u32 << (it.attempts - 1).min(20));
            let delay = exp.min(ws.backoff_cap);
            it.not_before =
                Some(Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default());
            ctx.store.requeue(id, &it)?;
        }
    }
    // Every path of `process` ends here, after the last burial.
    crate::alert::after_batch(ctx.cfg, ctx.store, &out.dead_letters, out.guard.as_ref());
    Ok(())
}

/// Runs one group's delta round and queues a user hint for every member it names.
async fn membership<T: Target>(
    ctx: &Context<'_, T>,
    group_id: &str,
    out: &mut BatchOutcome,
) -> Result<(), Failure> {
    let store = ctx.store;
    let tree = store.group_tree(&ctx.cfg.groups)?;
    if !tree.iter().any(|g| g.eq_ignore_ascii_case(group_id)) {
        tracing::debug!("group is not (or no longer) in this integration's tree; ignoring");
        return Ok(());
    }
    let mut candidates: BTreeSet<String> = BTreeSet::new();
    let start = match store.delta_link(group_id)? {
        Some(l) => l,
        None => ctx.graph.group_delta_url(group_id),
    };
    let (changes, link) = match ctx.graph.group_delta(group_id, &start).await? {
        DeltaRound::Changes {
            changes,
            group_removed,
            delta_link,
        } => {
            if group_removed {
                tracing::warn!("group was deleted in Entra");
            }
            (changes, delta_link)
        }
        DeltaRound::Expired(why) => {
            tracing::warn!(%why, "delta link expired; starting over and scheduling a full reconcile");
            out.expired_groups.push(group_id.to_string());
            for (m, _) in store.direct_members(group_id)? {
                candidates.insert(m);
            }
            store.clear_members(group_id)?;
            store.remove_delta_link(group_id)?;
            fresh_round(ctx, group_id).await?
        }
    };
    let (added, removed) = fold(&changes);
    for (m, kind) in &added {
        match kind {
            MemberKind::User => {
                candidates.insert(m.clone());
            }
            MemberKind::Group if !tree.contains(m) => {
                // A nested group joined: learn its members (and theirs) now.
                Box::pin(init_group(ctx, m, &mut candidates, &mut out.new_groups, 0)).await?;
            }
            _ => {}
        }
    }
    for m in &removed {
        candidates.insert(m.clone());
        // A nested group left: everyone below it may have lost membership.
        if store
            .direct_members(m)
            .map(|v| !v.is_empty())
            .unwrap_or(false)
        {
            for g in store.group_tree(std::slice::from_ref(m))? {
                for (u, k) in store.direct_members(&g)? {
                    if k == MemberKind::User {
                        candidates.insert(u);
                    }
                }
            }
        }
    }
    // Queue the users first, then advance the link: a crash in between repeats the round.
    let hints: Vec<QueueItem> = candidates
        .into_iter()
        .map(|u| {
            QueueItem::new(Hint::User {
                user_id: u,
                follow_up: true,
            })
        })
        .collect();
    tracing::info!(
        added = added.len(),
        removed = removed.len(),
        users = hints.len(),
        "membership delta"
    );
    store.enqueue(&hints)?;
    store.durable().await?;
    store.apply_members(group_id, &added, &removed)?;
    store.put_delta_link(group_id, &link)?;
    Ok(())
}

/// Folds a round's changes into the final adds and removes (later entries win).
fn fold(changes: &[MemberChange]) -> (Vec<(String, MemberKind)>, Vec<String>) {
    let mut last: BTreeMap<&str, &MemberChange> = BTreeMap::new();
    for c in changes {
        last.insert(c.member_id.as_str(), c);
    }
    let mut added = Vec::new();
    let mut removed = Vec::new();
    for (id, c) in last {
        if c.removed {
            removed.push(id.to_string());
        } else {
            added.push((id.to_string(), c.kind));
        }
    }
    (added, removed)
}

/// A delta round from scratch (the group's current direct members): changes and delta link.
async fn fresh_round<T: Target>(
    ctx: &Context<'_, T>,
    group_id: &str,
) -> Result<(Vec<MemberChange>, String), Failure> {
    let fresh = ctx.graph.group_delta_url(group_id);
    match ctx.graph.group_delta(group_id, &fresh).await? {
        DeltaRound::Changes {
            changes,
            delta_link,
            ..
        } => Ok((changes, delta_link)),
        DeltaRound::Expired(why) => Err(Failure::Item(format!(
            "a fresh delta round of group {group_id} was refused: {why}"
        ))),
    }
}

/// Takes a fresh delta round of a group that is new to the tree (and of the groups nested in
/// it), stores members and links, and adds every user member to `candidates`.
async fn init_group<T: Target>(
    ctx: &Context<'_, T>,
    group_id: &str,
    candidates: &mut BTreeSet<String>,
    new_groups: &mut Vec<String>,
    depth: usize,
) -> Result<(), Failure> {
    if depth > 32 || ctx.store.delta_link(group_id)?.is_some() {
        return Ok(());
    }
    let (changes, link) = fresh_round(ctx, group_id).await?;
    let (added, _) = fold(&changes);
    ctx.store.clear_members(group_id)?;
    ctx.store.apply_members(group_id, &added, &[])?;
    ctx.store.put_delta_link(group_id, &link)?;
    new_groups.push(group_id.to_string());
    for (m, kind) in &added {
        match kind {
            MemberKind::User => {
                candidates.insert(m.clone());
            }
            MemberKind::Group => {
                Box::pin(init_group(ctx, m, candidates, new_groups, depth + 1)).await?;
            }
            MemberKind::Other => {}
        }
    }
    Ok(())
}

/// Learns the membership tree of every configured group that has no delta link yet (first
/// start). Returns the groups initialised (they need subscriptions).
pub async fn init_tree<T: Target>(ctx: &Context<'_, T>) -> Result<Vec<String>, RunError> {
    let mut candidates = BTreeSet::new();
    let mut new_groups = Vec::new();
    for g in &ctx.cfg.groups {
        match init_group(ctx, g, &mut candidates, &mut new_groups, 0).await {
            Ok(()) => {}
            Err(Failure::Item(m)) => return Err(RunError::Source(m)),
            Err(Failure::Fatal(e)) => return Err(e),
        }
    }
    ctx.store.durable().await?;
    Ok(new_groups)
}

struct UserPlan {
    change: Option<PlannedChange>,
    follow_ups: Vec<Hint>,
    /// Why the user cannot be synced (a per-user failure, retried).
    failure: Option<String>,
    /// The decision's trace when it is worth keeping (a change or a failure).
    trace: Option<Trace>,
}

/// A group of the integration's tree the user is a direct member of (a configured group
/// first), `None` when the user is in none.
fn direct_group<T: Target>(
    ctx: &Context<'_, T>,
    tree: &BTreeSet<String>,
    user_id: &str,
) -> Result<Option<String>, StoreError> {
    let configured = ctx.cfg.groups.iter().filter(|g| tree.contains(*g));
    let nested = tree.iter().filter(|g| !ctx.cfg.groups.contains(g));
    for g in configured.chain(nested) {
        if ctx.store.is_direct_member(g, user_id)? {
            return Ok(Some(g.clone()));
        }
    }
    Ok(None)
}

/// Whether a user is a direct member of any group in the integration's tree.
fn in_scope<T: Target>(
    ctx: &Context<'_, T>,
    tree: &BTreeSet<String>,
    user_id: &str,
) -> Result<bool, StoreError> {
    Ok(direct_group(ctx, tree, user_id)?.is_some())
}

/// A direct membership in a group of the tree, as a trace's scope: the configured group, and
/// the nested group in between when there is one. Names come from the last reconcile.
fn via_group<T: Target>(ctx: &Context<'_, T>, group: &str) -> Result<Via, StoreError> {
    let name = |id: &str| -> Result<Option<String>, StoreError> {
        ctx.store.get_meta::<String>(&format!("group_name/{id}"))
    };
    if !ctx.cfg.groups.iter().any(|g| g == group) {
        for root in &ctx.cfg.groups {
            if ctx
                .store
                .group_tree(std::slice::from_ref(root))?
                .contains(group)
            {
                return Ok(Via {
                    group_id: root.clone(),
                    group_name: name(root)?,
                    path: trace::Path::Nested {
                        group_id: group.to_string(),
                        group_name: name(group)?,
                    },
                });
            }
        }
    }
    Ok(Via {
        group_id: group.to_string(),
        group_name: name(group)?,
        path: trace::Path::Direct,
    })
}

async fn plan_user<T: Target>(
    ctx: &Context<'_, T>,
    tg: &Targeting,
    tree: &BTreeSet<String>,
    user_id: &str,
    follow_up: bool,
) -> Result<UserPlan, Failure> {
    let store = ctx.store;
    let direct = direct_group(ctx, tree, user_id)?;
    let member = direct.is_some();
    let indexed = store.get_user(user_id)?;
    let reports = store.reports_of(user_id)?;
    if !member && indexed.is_none() && reports.is_empty() {
        // Someone else in the tenant: nothing to do, no Graph call.
        return Ok(UserPlan {
            change: None,
            follow_ups: Vec::new(),
            failure: None,
            trace: None,
        });
    }
    let mapping = &ctx.cfg.mapping;
    let user = ctx.graph.user(user_id, &mapping.user_select()).await?;
    let mut follow_ups: Vec<Hint> = Vec::new();
    // A manager's name or mail feeds its reports' records: re-plan them (once, not onwards).
    if !follow_up && user.is_some() {
        follow_ups.extend(reports.into_iter().map(|r| Hint::User {
            user_id: r,
            follow_up: true,
        }));
    }
    let existing = indexed.map(|mut e| {
        e.record.retain(|k, _| tg.managed.contains(k));
        e
    });
    let d = decide(
        ctx,
        tg,
        tree,
        user_id,
        follow_up,
        member,
        user.as_ref(),
        existing.as_ref(),
        &mut follow_ups,
    )
    .await?;
    let trace = if d.change.is_some() || d.failure.is_some() {
        let mut t = Trace::new(
            ctx.cfg.name.as_str(),
            Source::Incremental,
            "incremental",
            user_id,
        );
        let via = match &direct {
            Some(g) => vec![via_group(ctx, g)?],
            None => Vec::new(),
        };
        let upn = user.as_ref().and_then(|u| u.string("userPrincipalName"));
        t.user(
            existing.as_ref().map(|e| e.user_name.as_str()),
            upn.as_deref(),
        )
        .scope(Scope::of(d.out, via));
        d.fill(&mut t, existing.as_ref());
        Some(t)
    } else {
        None
    };
    Ok(UserPlan {
        change: d.change,
        follow_ups,
        failure: d.failure,
        trace,
    })
}

/// What one user's facts come to, with what its trace needs.
#[derive(Default)]
pub(crate) struct Decision {
    pub change: Option<PlannedChange>,
    /// The mapped record (managed keys, manager link resolved), when the user was mapped.
    pub mapped: Option<Record>,
    /// Why the user is not (or no longer) in scope; `None` for an enabled member.
    pub out: Option<OutOfScope>,
    /// Why the user cannot be mapped (a per-user failure).
    pub failure: Option<String>,
}

impl Decision {
    /// Writes the match, mapped values, plan and failure into a trace.
    pub(crate) fn fill(&self, t: &mut Trace, existing: Option<&IndexEntry>) {
        if let Some(e) = existing {
            t.matched = Match::Index {
                target_id: e.target_id.clone(),
            };
        }
        if let Some(m) = &self.mapped {
            t.mapped(m);
        }
        if let Some(c) = &self.change {
            t.plan(c);
        }
        if let Some(f) = &self.failure {
            t.failed(f, false);
        }
    }
}

/// Plans one user from its facts: membership, the user as Graph has it now (`None`: deleted)
/// and its index entry (record cut to the managed keys). Reads the manager from Graph. Shared
/// by the worker and `sync-user`; with `follow_up` false, a manager that is joining too is
/// queued in `follow_ups` (with the user after it) instead of linked now.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn decide<T: Target>(
    ctx: &Context<'_, T>,
    tg: &Targeting,
    tree: &BTreeSet<String>,
    user_id: &str,
    follow_up: bool,
    member: bool,
    user: Option<&GraphUser>,
    existing: Option<&IndexEntry>,
    follow_ups: &mut Vec<Hint>,
) -> Result<Decision, Failure> {
    let store = ctx.store;
    let mapping = &ctx.cfg.mapping;
    let mut d = Decision::default();
    match (member, user) {
        (true, Some(u)) => {
            let disabled = u.props.get("accountEnabled").and_then(|v| v.as_bool()) == Some(false);
            if disabled {
                d.out = Some(OutOfScope::Disabled);
            }
            let mgr = match mapping.manager_select() {
                Some(sel) => ctx.graph.manager(user_id, &sel).await?,
                None => None,
            };
            match mapping.apply(u, mgr.as_ref()) {
                Ok(mut des) => {
                    des.record.retain(|k, _| tg.managed.contains(k));
                    let mref = match (&des.manager_entra_id, tg.link_manager) {
                        (Some(mid), true) => match store.get_user(mid)? {
                            Some(me) => ManagerRef::Known(me.target_id),
                            None if !follow_up && in_scope(ctx, tree, mid)? => {
                                // The manager is joining too: sync it, then this user again.
                                follow_ups.push(Hint::User {
                                    user_id: mid.clone(),
                                    follow_up: true,
                                });
                                follow_ups.push(Hint::User {
                                    user_id: user_id.to_string(),
                                    follow_up: true,
                                });
                                ManagerRef::Deferred
                            }
                            None => ManagerRef::None,
                        },
                        _ => ManagerRef::None,
                    };
                    let current = existing.map(|e| &e.record);
                    d.mapped = Some(plan::desired_record(&des, &mref, current));
                    d.change = plan::plan_member(&des, existing, &mref);
                }
                Err(f) => match (existing, disabled) {
                    (Some(e), true) => {
                        d.change = plan::plan_departure(user_id, e).map(|mut c| {
                            c.reason = Some("disabled in Entra (accountEnabled = false)".into());
                            c
                        })
                    }
                    _ => d.failure = Some(format!("cannot be mapped: {}", f.0)),
                },
            }
        }
        (_, None) => {
            d.out = Some(OutOfScope::Deleted);
            d.change = existing.and_then(|e| {
                plan::plan_departure(user_id, e).map(|mut c| {
                    c.reason = Some("deleted in Entra (or soft-deleted)".into());
                    c
                })
            });
        }
        (false, Some(_)) => {
            d.out = Some(match existing {
                Some(_) => OutOfScope::LeftAllGroups,
                None => OutOfScope::NotMember,
            });
            d.change = existing.and_then(|e| plan::plan_departure(user_id, e));
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(id: &str, kind: MemberKind, removed: bool) -> MemberChange {
        MemberChange {
            member_id: id.into(),
            kind,
            removed,
        }
    }

    #[test]
    fn later_delta_entries_win() {
        let (a, r) = fold(&[
            ch("u1", MemberKind::User, false),
            ch("u2", MemberKind::User, false),
            ch("u1", MemberKind::User, true),
            ch("g1", MemberKind::Group, false),
            ch("u3", MemberKind::User, true),
            ch("u3", MemberKind::User, false),
        ]);
        assert_eq!(
            a,
            vec![
                ("g1".to_string(), MemberKind::Group),
                ("u2".to_string(), MemberKind::User),
                ("u3".to_string(), MemberKind::User)
            ]
        );
        assert_eq!(r, vec!["u1".to_string()]);
    }
}
