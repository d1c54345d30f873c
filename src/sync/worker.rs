//! Incremental sync: turns queued hints into LMS changes.
//!
//! Notifications are hints, not truth. A membership hint runs the group's delta from the saved
//! delta link, keeps the membership mirror (direct members per group) and turns every member
//! it names into a user hint; a user hint re-reads the user (and manager) from Graph, and
//! `sync::decide` decides, exactly as for a full reconcile. A deactivation is written only on
//! Graph's fresh word (`checkMemberGroups` and the user read again just before, or a second
//! 404), after the one deactivation budget (`apply::guard_check`); its intent is stored first.
//! When a user's presence in the LMS changes (created, reactivated, deactivated, relinked),
//! the users it manages are decided again in the same pass, so their manager links follow.
//! Each batch handles a user at most once per round, and batches of one integration run one
//! after another, so one user never has two changes in flight. A full reconcile runs beside
//! the batches; `sync::gate` keeps the two from writing one user at once or out of order.
//!
//! Durability: derived user hints are queued before a delta link is advanced, and an item
//! leaves the queue only after its change was applied or it was moved to the dead letters.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{stream, StreamExt};
use tracing::Instrument;

use super::apply::{self, apply_change, graph_suspect, Applied, ApplyError};
use super::decide::{self, Decision, Facts, Membership, UserFact, Verdict};
use super::mapping::{Desired, MapFailure};
use super::plan::{self, Action, GuardTrip, ManagerRef, PlannedChange};
use super::reconcile::report::{Context, RunError};
use super::trace::{self, Match, OutOfScope, Path, Scope, Scrub, Source, Trace, Via};
use crate::graph::delta::{DeltaRound, MemberChange};
use crate::graph::models::{GraphGroup, GraphUser};
use crate::graph::{FreshRead, GraphError};
use crate::lms::Target;
use crate::retry::RetryPolicy;
use crate::store::intents::Intent;
use crate::store::queue::{Hint, QueueItem};
use crate::store::state::MemberKind;
use crate::store::{IndexEntry, StoreError};

/// A write the LMS kept throttling comes back after this long (not as an attempt).
const THROTTLED_WAIT_SECS: i64 = 5;

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
    /// A failed queue item's retries (attempts, backoff); they are kept in the store.
    pub retry: RetryPolicy,
    /// A deletion is believed on a second 404 at least this long after the first, and a
    /// departure from the groups is confirmed with Graph no sooner than this after it was
    /// first seen.
    pub gone_confirm_after: Duration,
    /// The longest one user's Graph reads, or one user's LMS write, may take (retries
    /// included) before it counts as that user's failed attempt: one slow user must not hold
    /// up everyone else's changes.
    pub user_deadline: Duration,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            concurrency: 8,
            retry: RetryPolicy::new(8, Duration::from_secs(2), Duration::from_secs(15 * 60)),
            gone_confirm_after: Duration::from_secs(5),
            user_deadline: Duration::from_secs(60),
        }
    }
}

impl WorkerSettings {
    /// `server.worker_concurrency` and `server.max_attempts`, the rest as by default.
    pub fn from_config(server: &crate::config::ServerConfig) -> WorkerSettings {
        WorkerSettings {
            concurrency: server.worker_concurrency,
            retry: RetryPolicy {
                max_attempts: server.max_attempts,
                ..WorkerSettings::default().retry
            },
            ..WorkerSettings::default()
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
    /// Why a full reconcile should follow now (a delta link expired), if it should.
    pub reconcile: Option<String>,
    /// Groups joined or left the tree: subscriptions must follow.
    pub tree_changed: bool,
    pub guard: Option<GuardTrip>,
    /// Why the worker acts on some configured groups no more (deleted or emptied in Entra),
    /// until a reconcile lists them again.
    pub stopped: Vec<String>,
}

/// Why an item (or a user) could not be handled.
pub(crate) enum Failure {
    /// This item failed: it counts as an attempt. `suspect`: the error may concern the whole
    /// integration (the batch probes Graph and the LMS before blaming the item).
    Item { message: String, suspect: bool },
    /// Must not be acted on until an operator looks (a deleted or emptied group): the item is
    /// held in the dead letters.
    Hold(String),
    /// The store failed: the batch stops.
    Fatal(RunError),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Fatal(e.into())
    }
}

impl From<GraphError> for Failure {
    fn from(e: GraphError) -> Self {
        Failure::Item {
            suspect: graph_suspect(&e),
            message: e.to_string(),
        }
    }
}

/// How one user ended in a batch.
#[derive(Clone, Debug)]
pub(crate) enum UserOutcome {
    Done,
    Failed {
        message: String,
        suspect: bool,
    },
    /// Not decided yet: look again at `until` (not an attempt).
    Wait {
        until: DateTime<Utc>,
        missing_since: Option<DateTime<Utc>>,
    },
    /// Held (the guard, a stopped group): to the dead letters with why.
    Held(String),
}

/// Where a user's membership comes from.
#[derive(Clone, Copy)]
pub(crate) enum ScopeSource<'t> {
    /// The membership mirror kept from group delta (the worker); `tree` is every group in it.
    Mirror(&'t BTreeSet<String>),
    /// Graph itself (`memberOf` / `transitiveMemberOf`: `sync-user`), read now.
    Graph,
}

/// One user to decide.
#[derive(Clone, Debug)]
pub(crate) struct UserTask {
    pub id: String,
    /// Derived by rostersync itself (a delta round's member, a manager's report): its
    /// manager-name changes do not fan out to its own reports.
    pub follow_up: bool,
    pub missing_since: Option<DateTime<Utc>>,
    pub allow_mass: bool,
}

impl UserTask {
    pub(crate) fn new(id: &str) -> UserTask {
        UserTask {
            id: id.to_string(),
            follow_up: false,
            missing_since: None,
            allow_mass: false,
        }
    }
}

/// How a set of users is synced.
#[derive(Clone, Copy)]
pub(crate) struct SyncOptions {
    pub concurrency: usize,
    pub source: Source,
    pub dry_run: bool,
    pub gone_confirm_after: Duration,
    /// Wait for a second read of a user that answered 404 here (`sync-user`), instead of
    /// answering `Wait` (the worker requeues the item).
    pub wait_inline: bool,
    /// Rounds of manager-link follow-ups in one call; what is left is returned.
    pub max_rounds: usize,
    /// Why departures ("left all groups") are held now: a configured group was deleted or
    /// emptied, and the worker acts on it no more than the reconcile would.
    pub hold_departures: Option<&'static str>,
    /// See [`WorkerSettings::user_deadline`].
    pub user_deadline: Duration,
    /// Follow-ups (users whose manager link follows) go to the queue, durably, instead of a
    /// further round in memory (the worker; `sync-user` has no queue).
    pub queue_follow_ups: bool,
}

impl SyncOptions {
    fn new(source: Source, concurrency: usize, gone_confirm_after: Duration) -> SyncOptions {
        SyncOptions {
            concurrency,
            source,
            dry_run: false,
            gone_confirm_after,
            wait_inline: false,
            max_rounds: 3,
            hold_departures: None,
            user_deadline: WorkerSettings::default().user_deadline,
            queue_follow_ups: false,
        }
    }
}

/// What syncing a set of users did.
#[derive(Default)]
pub(crate) struct Synced {
    pub outcomes: BTreeMap<String, UserOutcome>,
    /// The decision trace of each user of the first round (for `sync-user`).
    pub traces: BTreeMap<String, Trace>,
    pub changes: Vec<PlannedChange>,
    pub unchanged: usize,
    pub guard: Option<GuardTrip>,
    /// Follow-ups beyond `max_rounds` (the worker queues them).
    pub left_over: Vec<UserTask>,
}

/// What was gathered about one user.
struct Gathered {
    /// `None`: nothing to do, and no Graph call was made (someone else in the tenant).
    user: Option<Result<GraphUser, ()>>,
    mapped: Option<Result<Desired, MapFailure>>,
    membership: Membership,
    via: Vec<Via>,
    existing: Option<IndexEntry>,
    mref: ManagerRef,
    confirmed: bool,
}

impl Gathered {
    fn facts(&self) -> Option<Facts<'_>> {
        let user = match self.user.as_ref()? {
            Ok(u) => UserFact::Present {
                user: u,
                mapped: self
                    .mapped
                    .as_ref()
                    .map(|m| m.as_ref())
                    .unwrap_or(Err(&NO_MAPPING)),
            },
            Err(()) => UserFact::Gone { deleted: true },
        };
        Some(Facts {
            user,
            membership: self.membership,
            confirmed: self.confirmed,
            existing: self.existing.as_ref(),
            manager: &self.mref,
        })
    }

    fn upn(&self) -> Option<String> {
        match &self.user {
            Some(Ok(u)) => u.string("userPrincipalName"),
            _ => None,
        }
    }
}

static NO_MAPPING: MapFailure = MapFailure(String::new());

/// The manager link a user's record should carry: the manager's LMS id when the manager is in
/// the LMS and active, none otherwise.
fn manager_ref<T: Target>(
    ctx: &Context<'_, T>,
    tg: &Targeting,
    d: Option<&Desired>,
) -> Result<ManagerRef, StoreError> {
    match (
        d.and_then(|d| d.manager_entra_id.as_deref()),
        tg.link_manager,
    ) {
        (Some(mid), true) => Ok(match ctx.store.linkable_target(mid)? {
            Some(t) => ManagerRef::Known(t),
            None => ManagerRef::None,
        }),
        _ => Ok(ManagerRef::None),
    }
}

/// Maps a Graph user for this target (record cut to the managed keys).
fn map_user<T: Target>(
    ctx: &Context<'_, T>,
    tg: &Targeting,
    u: &GraphUser,
    manager: Option<&GraphUser>,
) -> Result<Desired, MapFailure> {
    ctx.cfg.mapping.apply(u, manager).map(|mut d| {
        d.record.retain(|k, _| tg.managed.contains(k));
        d
    })
}

/// The configured groups (and nested groups) a user is a direct member of, by the mirror.
fn mirror_via<T: Target>(
    ctx: &Context<'_, T>,
    tree: &BTreeSet<String>,
    user_id: &str,
) -> Result<Vec<Via>, StoreError> {
    let configured = ctx.cfg.groups.iter().filter(|g| tree.contains(*g));
    let nested = tree.iter().filter(|g| !ctx.cfg.groups.contains(g));
    for g in configured.chain(nested) {
        if ctx.store.is_direct_member(g, user_id)? {
            return Ok(vec![via_group(ctx, g)?]);
        }
    }
    Ok(Vec::new())
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
                    path: Path::Nested {
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
        path: Path::Direct,
    })
}

/// The configured groups the user is in, each directly or through which nested group, from
/// Graph: the user's direct groups (`memberOf`), all its groups (`transitiveMemberOf`), and for
/// a configured group reached only indirectly, that group's nested groups, to name the one of
/// the user's own groups that leads there.
async fn graph_via<T: Target>(ctx: &Context<'_, T>, user_id: &str) -> Result<Vec<Via>, GraphError> {
    let configured = |id: &str| {
        ctx.cfg
            .groups
            .iter()
            .find(|g| g.eq_ignore_ascii_case(id))
            .cloned()
    };
    let name = |g: &GraphGroup| (!g.display_name.is_empty()).then(|| g.display_name.clone());
    let direct = ctx.graph.user_groups(user_id, false).await?;
    let mut via: Vec<Via> = direct
        .iter()
        .filter_map(|g| {
            configured(&g.id).map(|id| Via {
                group_id: id,
                group_name: name(g),
                path: Path::Direct,
            })
        })
        .collect();
    for g in ctx.graph.user_groups(user_id, true).await? {
        let Some(id) = configured(&g.id) else {
            continue;
        };
        if via.iter().any(|v| v.group_id == id) {
            continue;
        }
        let nested = ctx.graph.nested_groups(&g.id).await?;
        let through = direct
            .iter()
            .find(|d| nested.iter().any(|n| n.id.eq_ignore_ascii_case(&d.id)));
        via.push(Via {
            group_id: id,
            group_name: name(&g),
            path: match through {
                Some(t) => Path::Nested {
                    group_id: t.id.clone(),
                    group_name: name(t),
                },
                None => Path::Transitive,
            },
        });
    }
    via.sort_by_key(|v| ctx.cfg.groups.iter().position(|g| *g == v.group_id));
    Ok(via)
}

/// Gathers the facts of one user: the index, the membership (mirror or Graph), the user and its
/// manager from Graph.
async fn gather<T: Target>(
    ctx: &Context<'_, T>,
    tg: &Targeting,
    src: ScopeSource<'_>,
    task: &UserTask,
) -> Result<Gathered, Failure> {
    let store = ctx.store;
    let existing = store.get_user(&task.id)?.map(|mut e| {
        e.record.retain(|k, _| tg.managed.contains(k));
        e
    });
    let nothing = |membership| Gathered {
        user: None,
        mapped: None,
        membership,
        via: Vec::new(),
        existing: None,
        mref: ManagerRef::None,
        confirmed: false,
    };
    let mut via = match src {
        ScopeSource::Mirror(tree) => mirror_via(ctx, tree, &task.id)?,
        ScopeSource::Graph => Vec::new(),
    };
    if let ScopeSource::Mirror(_) = src {
        if via.is_empty()
            && existing.is_none()
            && store.reports_of(&task.id)?.is_empty()
            && store.orphans_of(&task.id)?.is_empty()
            && !store.is_vanished(&task.id)?
        {
            // Someone else in the tenant: nothing to do, no Graph call.
            return Ok(nothing(Membership::NotMember));
        }
    }
    let mapping = &ctx.cfg.mapping;
    let Some(user) = ctx.graph.user(&task.id, &mapping.user_select()).await? else {
        return Ok(Gathered {
            user: Some(Err(())),
            existing,
            ..nothing(Membership::NotMember)
        });
    };
    let membership = match src {
        // The mirror does not know this user as a member, but the LMS does (inactive), or
        // Graph said the user was gone: the mirror may have missed a membership (a restored
        // user's come back unannounced; a soft-deleted member is hidden from the listings a
        // reconcile rebuilds the mirror from, but not from group delta, which so never
        // announces it again), so Graph says whether a reactivation or a create is due.
        // (Active users are confirmed before any deactivation anyway.)
        ScopeSource::Mirror(_)
            if via.is_empty()
                && (existing.as_ref().is_some_and(|e| !e.active())
                    || store.is_vanished(&task.id)?) =>
        {
            let groups = ctx.graph.member_groups(&user.id, &ctx.cfg.groups).await?;
            if groups.is_empty() {
                Membership::NotMember
            } else {
                via = transitive_via(ctx, &groups);
                Membership::Member
            }
        }
        ScopeSource::Mirror(_) if via.is_empty() => Membership::NotMember,
        ScopeSource::Mirror(_) => Membership::Member,
        ScopeSource::Graph => {
            via = graph_via(ctx, &user.id).await?;
            if via.is_empty() {
                Membership::NotMember
            } else {
                Membership::Member
            }
        }
    };
    let manager = match (mapping.manager_select(), &membership, &existing) {
        // A manager only matters for a record that is written.
        (Some(sel), Membership::Member, _) | (Some(sel), _, Some(_)) => {
            ctx.graph.manager(&user.id, &sel).await?
        }
        _ => None,
    };
    let mapped = map_user(ctx, tg, &user, manager.as_ref());
    let mref = manager_ref(ctx, tg, mapped.as_ref().ok())?;
    Ok(Gathered {
        user: Some(Ok(user)),
        mapped: Some(mapped),
        membership,
        via,
        existing,
        mref,
        confirmed: matches!(src, ScopeSource::Graph),
    })
}

/// The configured groups among `member_of` (Graph's `checkMemberGroups` answer), as scope.
fn transitive_via<T: Target>(ctx: &Context<'_, T>, member_of: &[String]) -> Vec<Via> {
    ctx.cfg
        .groups
        .iter()
        .filter(|c| member_of.iter().any(|m| m.eq_ignore_ascii_case(c)))
        .map(|c| Via {
            group_id: c.clone(),
            group_name: None,
            path: Path::Transitive,
        })
        .collect()
}

/// The facts of a user read again to confirm a deactivation.
fn refresh<T: Target>(
    ctx: &Context<'_, T>,
    tg: &Targeting,
    g: &Gathered,
    read: FreshRead,
) -> Result<Gathered, StoreError> {
    let member = !read.member_of.is_empty();
    let via = if member { g.via.clone() } else { Vec::new() };
    let Some(user) = read.user else {
        return Ok(Gathered {
            user: Some(Err(())),
            mapped: None,
            membership: Membership::NotMember,
            via,
            existing: g.existing.clone(),
            mref: ManagerRef::None,
            confirmed: true,
        });
    };
    let mapped = map_user(ctx, tg, &user, read.manager.as_ref());
    let mref = manager_ref(ctx, tg, mapped.as_ref().ok())?;
    let via = if member && via.is_empty() {
        // A member Graph knows of and the mirror does not (a lost membership hint).
        transitive_via(ctx, &read.member_of)
    } else {
        via
    };
    Ok(Gathered {
        user: Some(Ok(user)),
        mapped: Some(mapped),
        membership: if member {
            Membership::Member
        } else {
            Membership::NotMember
        },
        via,
        existing: g.existing.clone(),
        mref,
        confirmed: true,
    })
}

/// The trace of one decision.
fn trace_of<T: Target>(
    ctx: &Context<'_, T>,
    src: Source,
    id: &str,
    g: &Gathered,
    d: &Decision,
) -> Trace {
    let run = src.as_str();
    let mut t = Trace::new(ctx.cfg.name.as_str(), src, run, id);
    let upn = g.upn();
    t.user(
        g.existing.as_ref().map(|e| e.user_name.as_str()),
        upn.as_deref(),
    )
    .scope(Scope::of(d.out, g.via.clone()));
    if let Some(e) = &g.existing {
        t.matched = Match::Index {
            target_id: e.target_id.clone(),
        };
    }
    if let Some(m) = &d.mapped {
        t.mapped(m);
    }
    match &d.verdict {
        Verdict::Change(c) => {
            t.plan(c);
        }
        Verdict::Fail(f) => {
            t.failed(f, false);
        }
        Verdict::Skip => {
            t.skipped(
                "disabled in Entra (accountEnabled = false) and never in the LMS: not created",
            );
        }
        _ => {}
    }
    t
}

/// One user's state through a round.
struct Work {
    task: UserTask,
    gathered: Option<Gathered>,
    decision: Option<Decision>,
    outcome: Option<UserOutcome>,
    trace: Option<Trace>,
    /// When the confirming read a deactivation rests on was sent.
    confirmed_at: Option<std::time::Instant>,
}

/// Decides and applies a set of users (and, in further rounds, the users whose manager link
/// follows from what was applied). Store failures end it with an error.
pub(crate) async fn sync_users<T: Target>(
    ctx: &Context<'_, T>,
    tg: &Targeting,
    src: ScopeSource<'_>,
    tasks: Vec<UserTask>,
    opts: SyncOptions,
) -> Result<Synced, RunError> {
    let mut out = Synced::default();
    let mut round = tasks;
    let mut first = true;
    for _ in 0..opts.max_rounds.max(1) {
        if round.is_empty() {
            break;
        }
        let next = one_round(
            ctx,
            tg,
            src,
            std::mem::take(&mut round),
            opts,
            &mut out,
            first,
        )
        .await?;
        first = false;
        round = next;
    }
    out.left_over = round;
    Ok(out)
}

async fn one_round<T: Target>(
    ctx: &Context<'_, T>,
    tg: &Targeting,
    src: ScopeSource<'_>,
    tasks: Vec<UserTask>,
    opts: SyncOptions,
    out: &mut Synced,
    first: bool,
) -> Result<Vec<UserTask>, RunError> {
    let conc = opts.concurrency.max(1);
    // 0. The round's users are the worker's until their writes are stored: a reconcile running
    // beside it neither writes them meanwhile nor afterwards in this run (`sync::gate`); a
    // reconcile write of one of them in flight is waited for, so Graph is read after it.
    let _claim = ctx.gate.claim(tasks.iter().map(|t| t.id.clone())).await;
    // 1. Gather and decide, Graph reads concurrently.
    // Collected first: a lazily mapped iterator trips the compiler's Send check of the
    // spawned serve tasks.
    let calls: Vec<_> = tasks
        .into_iter()
        .map(|task| async move {
            let span = tracing::info_span!("user", user = %task.id);
            let r = tokio::time::timeout(
                opts.user_deadline,
                gather(ctx, tg, src, &task).instrument(span),
            )
            .await
            .unwrap_or_else(|_| {
                Err(Failure::Item {
                    message: format!(
                        "Graph did not answer for this user within {} s",
                        opts.user_deadline.as_secs()
                    ),
                    suspect: true,
                })
            });
            (task, r)
        })
        .collect();
    let gathered: Vec<(UserTask, Result<Gathered, Failure>)> =
        stream::iter(calls).buffer_unordered(conc).collect().await;
    let mut work: Vec<Work> = Vec::with_capacity(gathered.len());
    for (task, r) in gathered {
        let mut w = Work {
            task,
            gathered: None,
            decision: None,
            outcome: None,
            trace: None,
            confirmed_at: None,
        };
        match r {
            Ok(g) => {
                match g.facts() {
                    None => w.outcome = Some(UserOutcome::Done),
                    Some(f) => w.decision = Some(decide::decide(&w.task.id, &f, opts.dry_run)),
                }
                w.gathered = Some(g);
            }
            Err(Failure::Item { message, suspect }) => {
                w.outcome = Some(UserOutcome::Failed { message, suspect })
            }
            Err(Failure::Hold(m)) => w.outcome = Some(UserOutcome::Held(m)),
            Err(Failure::Fatal(e)) => return Err(e),
        }
        work.push(w);
    }

    // 2. Intents first (also of the deactivations still to be confirmed, so that nothing but
    // the fresh read stands between that read and the write), then Graph's fresh word for each
    // deactivation: read again, decide again.
    let intents = if opts.dry_run {
        None
    } else {
        let mut planned: Vec<Intent> = Vec::new();
        for w in &work {
            match w.decision.as_ref().map(|d| &d.verdict) {
                Some(Verdict::Change(c)) => planned.push(apply::intent_of(c)),
                Some(Verdict::Confirm) => {
                    if let Some(e) = w.gathered.as_ref().and_then(|g| g.existing.as_ref()) {
                        planned.push(Intent {
                            entra_id: w.task.id.clone(),
                            action: Action::Deactivate.as_str().to_string(),
                            target_id: Some(e.target_id.clone()),
                            user_name: e.user_name.clone(),
                        });
                    }
                }
                _ => {}
            }
        }
        apply::announce_intents(ctx, planned).await?
    };
    let mut trip = None;
    confirm(ctx, tg, &mut work, opts, &mut trip).await?;
    if trip.is_some() {
        out.guard = trip;
    }

    // 3. Traces of what was decided (changes and failures), then the writes.
    for w in &mut work {
        let (Some(g), Some(d)) = (&w.gathered, &w.decision) else {
            continue;
        };
        let worth = matches!(
            d.verdict,
            Verdict::Change(_) | Verdict::Fail(_) | Verdict::Skip
        ) || matches!(opts.source, Source::SyncUser);
        if worth {
            w.trace = Some(trace_of(ctx, opts.source, &w.task.id, g, d));
        }
        match &d.verdict {
            Verdict::Fail(m) => {
                w.outcome = Some(UserOutcome::Failed {
                    message: m.clone(),
                    suspect: false,
                })
            }
            Verdict::Confirm => {
                if w.outcome.is_none() {
                    w.outcome = Some(UserOutcome::Wait {
                        until: Utc::now() + chrono::Duration::seconds(5),
                        missing_since: w.task.missing_since,
                    })
                }
            }
            Verdict::Unchanged { .. } | Verdict::Skip => {
                out.unchanged += 1;
            }
            Verdict::Change(_) => {}
        }
    }
    let mut remember = Vec::new();
    let mut to_apply: Vec<usize> = Vec::new();
    for (i, w) in work.iter().enumerate() {
        match w.decision.as_ref().map(|d| &d.verdict) {
            Some(Verdict::Change(_)) if w.outcome.is_none() => to_apply.push(i),
            Some(Verdict::Unchanged {
                remember_manager: true,
            }) if !opts.dry_run => {
                if let (Some(g), Some(Ok(d))) = (
                    &w.gathered,
                    w.gathered.as_ref().and_then(|g| g.mapped.as_ref()),
                ) {
                    if let Some(mut full) = ctx.store.get_user(&w.task.id)? {
                        full.manager = d.manager_entra_id.clone();
                        let _ = g;
                        remember.push((w.task.id.clone(), full));
                    }
                }
            }
            _ => {}
        }
    }
    ctx.store.put_users(&remember)?;
    if opts.dry_run {
        for &i in &to_apply {
            if let Some(c) = work[i].decision.as_ref().and_then(Decision::change) {
                out.changes.push(c.clone());
            }
            work[i].outcome = Some(UserOutcome::Done);
        }
        return finish_round(ctx, &mut work, out, first, opts, Vec::new(), Vec::new());
    }
    let calls: Vec<_> = to_apply
        .iter()
        .filter_map(|&i| {
            let c = work[i].decision.as_ref().and_then(Decision::change)?;
            Some(async move {
                let span =
                    tracing::info_span!("apply", user = %c.entra_id, action = c.action.as_str());
                let r = tokio::time::timeout(
                    opts.user_deadline,
                    apply_change(ctx, &tg.managed, c).instrument(span),
                )
                .await
                .unwrap_or_else(|_| {
                    // It may still arrive: the intent stays and is read back.
                    if ctx.target.throttling() {
                        // Held up by the LMS's throttling, not by this user: no attempt.
                        return Err(ApplyError::Deferred {
                            message: format!(
                                "the LMS throttled; no answer for this user within {} s",
                                opts.user_deadline.as_secs()
                            ),
                            uncertain: true,
                        });
                    }
                    Err(ApplyError::User {
                        message: format!(
                            "the LMS did not answer for this user within {} s",
                            opts.user_deadline.as_secs()
                        ),
                        uncertain: true,
                        suspect: true,
                    })
                });
                (i, r)
            })
        })
        .collect();
    let results: Vec<(usize, Result<Applied, ApplyError>)> =
        stream::iter(calls).buffer_unordered(conc).collect().await;
    let mut entries = Vec::new();
    let mut uncertain = Vec::new();
    let mut deactivated: Vec<String> = Vec::new();
    let mut moved = Vec::new();
    // Users whose link the worker writes: the next reconcile reads their manager
    // (`IntegrationStore::doubt_managers`).
    let mut doubted = Vec::new();
    for (i, r) in results {
        let w = &mut work[i];
        let Some(c) = w.decision.as_ref().and_then(Decision::change).cloned() else {
            continue;
        };
        match r {
            Ok(a) => {
                tracing::info!(user = %c.entra_id, user_name = %c.user_name, action = c.action.as_str(), "applied");
                if let Some(t) = w.trace.as_mut() {
                    t.applied(&c, &a.matched);
                }
                let before = w.gathered.as_ref().and_then(|g| g.existing.as_ref());
                let mut probe = c.clone();
                probe.target_id = Some(a.entry.target_id.clone());
                if decide::changes_presence(&probe, before) {
                    moved.push(c.entra_id.clone());
                }
                if before.is_none_or(|b| b.manager != a.entry.manager) {
                    doubted.push(c.entra_id.clone());
                }
                // The budget counted the others when it let them through (`guard_confirmed`);
                // the ones an operator allowed were not checked.
                if c.action == Action::Deactivate && w.task.allow_mass {
                    deactivated.push(c.entra_id.clone());
                }
                entries.push((c.entra_id.clone(), a.entry));
                w.outcome = Some(UserOutcome::Done);
                out.changes.push(c);
            }
            Err(ApplyError::User {
                message,
                uncertain: unsure,
                suspect,
            }) => {
                tracing::warn!(user = %c.entra_id, error = %message, "user failed to sync");
                if let Some(t) = w.trace.as_mut() {
                    t.failed(&message, true);
                }
                if unsure {
                    uncertain.push(apply::intent_of(&c));
                }
                w.outcome = Some(UserOutcome::Failed { message, suspect });
            }
            Err(ApplyError::Deferred {
                message,
                uncertain: unsure,
            }) => {
                // The LMS throttles: not this user's failure and no attempt; the item comes
                // back once the LMS's pause is likely over.
                tracing::info!(user = %c.entra_id, error = %message, "write deferred: the LMS throttles");
                if let Some(t) = w.trace.as_mut() {
                    t.failed(&message, true);
                }
                if unsure {
                    uncertain.push(apply::intent_of(&c));
                }
                w.outcome = Some(UserOutcome::Wait {
                    until: Utc::now() + chrono::Duration::seconds(THROTTLED_WAIT_SECS),
                    missing_since: w.task.missing_since,
                });
            }
            Err(ApplyError::Fatal(e)) => return Err(e),
        }
    }
    ctx.store.doubt_managers(&doubted)?;
    ctx.store.put_users(&entries)?;
    ctx.store.record_deactivations(&deactivated)?;
    let (returned, reports) = returned_managers(ctx, &work, opts).await?;
    let mut next = finish_round(ctx, &mut work, out, first, opts, moved, reports)?;
    if opts.queue_follow_ups && !next.is_empty() {
        // Queued before the intents are settled: should the process die now, the users whose
        // manager link follows are still in the queue (or the intents are read back and their
        // reports queued at the next start).
        let hints: Vec<QueueItem> = std::mem::take(&mut next)
            .into_iter()
            .map(|t| QueueItem::follow_up(t.id))
            .collect();
        ctx.store.enqueue(&hints)?;
    }
    // Their reports are queued (or in `next`): nothing more to do for them.
    for id in returned {
        ctx.store.forget_vanished(&id)?;
    }
    if let Some(id) = intents {
        ctx.store.settle_intents(id, uncertain)?;
    }
    Ok(next)
}

/// The users read back this round after Graph had said they were gone (and now settled), and
/// the indexed users Graph now names as their direct reports: restored from the deleted items,
/// a manager is again the manager of its reports, and Graph notifies only about the manager.
/// The reverse
/// index and the orphans know the reports the store had linked; this read also finds a report
/// first written while the manager was gone (with no manager). A failed read is logged and
/// left to the next reconcile, which reads the manager of every user the worker linked.
async fn returned_managers<T: Target>(
    ctx: &Context<'_, T>,
    work: &[Work],
    opts: SyncOptions,
) -> Result<(Vec<String>, Vec<String>), RunError> {
    let mut returned = Vec::new();
    let mut reports = Vec::new();
    if opts.dry_run {
        return Ok((returned, reports));
    }
    for w in work {
        let read = w.gathered.as_ref().and_then(|g| g.user.as_ref());
        if !matches!(read, Some(Ok(_))) || !ctx.store.is_vanished(&w.task.id)? {
            continue;
        }
        let known = match w.gathered.as_ref().map(|g| &g.membership) {
            Some(Membership::NotMember) => true,
            _ => ctx.store.get_user(&w.task.id)?.is_some(),
        };
        match ctx.graph.direct_reports(&w.task.id).await {
            Ok(ids) => {
                for r in ids {
                    if ctx.store.get_user(&r)?.is_some() {
                        reports.push(r);
                    }
                }
            }
            Err(e) => tracing::warn!(
                user = %w.task.id,
                error = %e,
                "cannot list the direct reports of a user who is back; their links wait for the next reconcile"
            ),
        }
        // Forgotten once settled: a member the LMS now has, or a user Graph says is in none
        // of the groups (alive, so group delta announces a return). A member still not in
        // the LMS (disabled) stays, so that its next notification asks Graph again.
        if known {
            returned.push(w.task.id.clone());
        }
    }
    Ok((returned, reports))
}

/// Stores the round's traces, records its outcomes and returns the next round's users: the
/// reports of users whose presence changed, of managers notified directly (their name or
/// mail feeds their reports' records), and `returned_reports` (`returned_managers`).
fn finish_round<T: Target>(
    ctx: &Context<'_, T>,
    work: &mut [Work],
    out: &mut Synced,
    first: bool,
    opts: SyncOptions,
    moved: Vec<String>,
    returned_reports: Vec<String>,
) -> Result<Vec<UserTask>, RunError> {
    let secrets = ctx.cfg.redactor(Some(ctx.store));
    let mut store_traces = Vec::new();
    for w in work.iter_mut() {
        if let Some(mut t) = w.trace.take() {
            if let Some(UserOutcome::Held(why)) = &w.outcome {
                t.held(why);
            }
            t.dry_run = opts.dry_run;
            t.scrub(&secrets);
            if first {
                out.traces.insert(w.task.id.clone(), t.clone());
            }
            if t.outcome != trace::Outcome::Planned && !opts.dry_run {
                store_traces.push(t);
            }
        }
        if first {
            let o = w.outcome.clone().unwrap_or(UserOutcome::Done);
            out.outcomes.insert(w.task.id.clone(), o);
        }
    }
    if !store_traces.is_empty() {
        ctx.store.put_traces(store_traces)?;
    }
    if opts.dry_run {
        return Ok(Vec::new());
    }
    let manager_props = ctx
        .cfg
        .mapping
        .manager_select()
        .is_some_and(|s| s.len() > 1);
    let mut next: BTreeMap<String, UserTask> = BTreeMap::new();
    let mut fan_out: Vec<&str> = moved.iter().map(String::as_str).collect();
    if manager_props {
        // A manager notified directly (renamed, moved, deleted): the name and mail its
        // reports carry may have changed with it.
        fan_out.extend(work.iter().filter_map(|w| {
            let read = w.gathered.as_ref().and_then(|g| g.user.as_ref()).is_some();
            (!w.task.follow_up && read).then_some(w.task.id.as_str())
        }));
    }
    let mut again: Vec<String> = returned_reports;
    // Read once per round (a small tree, usually empty), not once per user read.
    let mut orphans = ctx.store.orphans()?;
    for w in work.iter() {
        match w.gathered.as_ref().and_then(|g| g.user.as_ref()) {
            // A manager gone from Graph takes its reports' link with it (they lose it below,
            // and the reverse index with it): remembered first, so that they are read again
            // should the manager come back (restored from the deleted items, which gives
            // them their manager again without a notification for them).
            Some(Err(())) => {
                if !opts.dry_run {
                    ctx.store.mark_vanished(&w.task.id)?;
                }
                let reports = ctx.store.reports_of(&w.task.id)?;
                if !reports.is_empty() {
                    ctx.store.mark_orphans(&w.task.id, &reports)?;
                }
            }
            Some(Ok(_)) => again.extend(orphans.remove(&w.task.id).unwrap_or_default()),
            None => {}
        }
    }
    for m in fan_out {
        again.extend(ctx.store.reports_of(m)?);
    }
    for r in again {
        next.entry(r.clone()).or_insert(UserTask {
            id: r,
            follow_up: true,
            missing_since: None,
            allow_mass: false,
        });
    }
    Ok(next.into_values().collect())
}

/// Reads again from Graph every user whose decision was "confirm first" and decides again.
/// The budget is checked before the reads (a mass event costs no reads); a user that answered
/// 404 is only believed gone on a second 404 `gone_confirm_after` after the first.
async fn confirm<T: Target>(
    ctx: &Context<'_, T>,
    tg: &Targeting,
    work: &mut [Work],
    opts: SyncOptions,
    tripped: &mut Option<GuardTrip>,
) -> Result<(), RunError> {
    let now = Utc::now();
    let after = chrono::Duration::from_std(opts.gone_confirm_after).unwrap_or_default();
    let mut candidates: Vec<usize> = Vec::new();
    let mut direct_ids: Vec<String> = Vec::new();
    for (i, w) in work.iter_mut().enumerate() {
        let Some(d) = &w.decision else { continue };
        if let (Some(why), Some(OutOfScope::LeftAllGroups | OutOfScope::Deleted)) =
            (opts.hold_departures, d.out)
        {
            if matches!(d.verdict, Verdict::Confirm) {
                w.outcome = Some(UserOutcome::Held(why.to_string()));
                continue;
            }
        }
        match &d.verdict {
            Verdict::Confirm => {
                let first_404 = matches!(
                    w.gathered.as_ref().and_then(|g| g.user.as_ref()),
                    Some(Err(()))
                );
                // A departure settles before Graph is asked: a move between groups (removed
                // from one, added to another a moment later) reaches the mirror as two
                // changes, and a read between them would deactivate a member.
                let departed = d.out == Some(OutOfScope::LeftAllGroups);
                let since = w.task.missing_since.unwrap_or(now);
                if (first_404 || departed) && now - since < after && !opts.wait_inline {
                    w.task.missing_since = Some(since);
                    w.outcome = Some(UserOutcome::Wait {
                        until: since + after,
                        missing_since: Some(since),
                    });
                    continue;
                }
                if first_404 {
                    w.task.missing_since = Some(since);
                }
                candidates.push(i);
            }
            Verdict::Change(c) if c.action == Action::Deactivate => {
                direct_ids.push(w.task.id.clone())
            }
            _ => {}
        }
    }
    if candidates.is_empty() && direct_ids.is_empty() {
        return Ok(());
    }
    let (allowed, normal): (Vec<usize>, Vec<usize>) = candidates
        .iter()
        .copied()
        .partition(|&i| work[i].task.allow_mass);
    if !opts.dry_run && !allowed.is_empty() {
        // Replayed with --allow-mass-deactivation: the operator allowed them.
        apply::guard_check(ctx, &[], true)?.ok();
    }
    // A mass event far past the budget (a deleted group, say) is held without a Graph read
    // for each of its users; anything short of that is confirmed first and counted after.
    let suspects: Vec<&str> = normal
        .iter()
        .map(|&i| work[i].task.id.as_str())
        .chain(direct_ids.iter().map(String::as_str))
        .collect();
    if !opts.dry_run && apply::clearly_past_budget(ctx, &suspects)? {
        let trip = apply::guard_check(ctx, &suspects, false)?.err();
        hold(ctx, work, &normal, opts, trip.as_ref());
        *tripped = trip;
        return guard_confirmed(ctx, work, opts, tripped);
    }
    let mut keep: Vec<usize> = allowed;
    keep.extend(normal);
    if keep.is_empty() {
        return guard_confirmed(ctx, work, opts, tripped);
    }
    if opts.wait_inline {
        let waits = keep.iter().any(|&i| {
            matches!(
                work[i].gathered.as_ref().and_then(|g| g.user.as_ref()),
                Some(Err(()))
            )
        });
        if waits {
            tokio::time::sleep(opts.gone_confirm_after).await;
        }
    }
    let mapping = &ctx.cfg.mapping;
    let manager_select = mapping.manager_select();
    // Answers that took long (a slow Graph, other users' reads) may be older than the
    // directory by the time they would be written: a deactivation is read again at once
    // (twice at most), then waits for a fresh read in a later batch rather than rest on them.
    // A throttled read waits for a later batch at once.
    let mut tries = 0;
    while !keep.is_empty() {
        let ids: Vec<String> = keep.iter().map(|&i| work[i].task.id.clone()).collect();
        let mut reads = match ctx
            .graph
            .fresh_reads(
                &ids,
                &mapping.user_select(),
                manager_select.as_deref(),
                &ctx.cfg.groups,
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                let suspect = graph_suspect(&e);
                for &i in &keep {
                    work[i].outcome = Some(UserOutcome::Failed {
                        message: format!("could not confirm with Graph: {e}"),
                        suspect,
                    });
                }
                // What was decided already (deactivations read earlier, or decided on facts
                // read just now) still passes the budget.
                break;
            }
        };
        let now = Utc::now();
        let mut again = Vec::new();
        for &i in &keep {
            let w = &mut work[i];
            let Some(g) = &w.gathered else { continue };
            match reads.remove(&w.task.id) {
                Some(Ok(read)) => {
                    let gone = read.user.is_none();
                    let asked = read.asked;
                    let age = asked.elapsed();
                    let stale = age > super::FRESH_READ_MAX_AGE;
                    let fresh = refresh(ctx, tg, g, read)?;
                    let since = w.task.missing_since.unwrap_or(now);
                    if gone && now - since < after {
                        // The first 404: believed only on a second one, later.
                        w.task.missing_since = Some(since);
                        w.outcome = Some(UserOutcome::Wait {
                            until: since + after,
                            missing_since: Some(since),
                        });
                        continue;
                    }
                    if let Some(f) = fresh.facts() {
                        let d = decide::decide(&w.task.id, &f, opts.dry_run);
                        let deactivates = matches!(&d.verdict, Verdict::Change(c) if c.action == Action::Deactivate);
                        if stale && deactivates && !opts.wait_inline {
                            tracing::debug!(
                                user = %w.task.id,
                                ?age,
                                tries,
                                "confirming read too old to deactivate on; reading again"
                            );
                            if tries < super::FRESH_READ_RETRIES {
                                again.push(i);
                            } else {
                                w.outcome = Some(UserOutcome::Wait {
                                    until: now + chrono::Duration::seconds(1),
                                    missing_since: w.task.missing_since,
                                });
                            }
                            continue;
                        }
                        if deactivates {
                            w.confirmed_at = Some(asked);
                        }
                        w.decision = Some(d);
                    }
                    w.gathered = Some(fresh);
                }
                // Throttled (or a passing 5xx): read again in a later batch (the pacer holds
                // Graph for the Retry-After), without counting an attempt; not in this one,
                // where the others' fresh answers would age while it waits.
                Some(Err(e)) if e.is_transient() && !opts.wait_inline => {
                    tracing::debug!(user = %w.task.id, error = %e, "confirming read throttled; reading again later");
                    w.outcome = Some(UserOutcome::Wait {
                        until: now + chrono::Duration::seconds(1),
                        missing_since: w.task.missing_since,
                    });
                }
                Some(Err(e)) => {
                    w.outcome = Some(UserOutcome::Failed {
                        message: format!("could not confirm with Graph: {e}"),
                        suspect: graph_suspect(&e),
                    })
                }
                None => {
                    w.outcome = Some(UserOutcome::Failed {
                        message: "Graph did not answer the confirming read".into(),
                        suspect: true,
                    })
                }
            }
        }
        keep = again;
        tries += 1;
    }
    // The rounds after the first (a stale answer read again, its send held by a pause for
    // another user's 429) age the answers decided before them: a deactivation whose answer is
    // past the bound by now waits for a fresh read in a later batch instead of being written.
    if !opts.wait_inline {
        let now = Utc::now();
        for w in work.iter_mut() {
            let late = w.outcome.is_none()
                && w.confirmed_at
                    .is_some_and(|t| t.elapsed() > super::FRESH_READ_MAX_AGE);
            if late {
                tracing::debug!(user = %w.task.id, "confirmation aged while others were read again; reading again later");
                w.outcome = Some(UserOutcome::Wait {
                    until: now,
                    missing_since: w.task.missing_since,
                });
            }
        }
    }
    guard_confirmed(ctx, work, opts, tripped)
}

/// The budget, over the deactivations about to be written (confirmed by Graph, or decided on
/// facts read just now); past it they are all held.
fn guard_confirmed<T: Target>(
    ctx: &Context<'_, T>,
    work: &mut [Work],
    opts: SyncOptions,
    tripped: &mut Option<GuardTrip>,
) -> Result<(), RunError> {
    if opts.dry_run || tripped.is_some() {
        return Ok(());
    }
    let deactivations: Vec<usize> = work
        .iter()
        .enumerate()
        .filter(|(_, w)| w.outcome.is_none() && !w.task.allow_mass)
        .filter(|(_, w)| {
            matches!(w.decision.as_ref().map(|d| &d.verdict), Some(Verdict::Change(c)) if c.action == Action::Deactivate)
        })
        .map(|(i, _)| i)
        .collect();
    if deactivations.is_empty() {
        return Ok(());
    }
    let who: Vec<&str> = deactivations
        .iter()
        .map(|&i| work[i].task.id.as_str())
        .collect();
    if let Err(trip) = apply::guard_check(ctx, &who, false)? {
        hold(ctx, work, &deactivations, opts, Some(&trip));
        *tripped = Some(trip);
    }
    Ok(())
}

/// Holds the deactivations of `which` (the guard stopped them), with their traces.
fn hold<T: Target>(
    ctx: &Context<'_, T>,
    work: &mut [Work],
    which: &[usize],
    opts: SyncOptions,
    trip: Option<&GuardTrip>,
) {
    let Some(trip) = trip else { return };
    tracing::error!(%trip, "guard: deactivations held");
    let why = format!("guard: {trip}");
    for &i in which {
        let w = &mut work[i];
        if w.trace.is_none() {
            if let (Some(g), Some(d)) = (&w.gathered, &w.decision) {
                w.trace = Some(trace_of(ctx, opts.source, &w.task.id, g, d));
            }
        }
        w.outcome = Some(UserOutcome::Held(why.clone()));
    }
}

/// Processes membership and user items (other kinds are the caller's). Items that succeed are
/// removed from the queue; failed ones are retried with exponential backoff and buried after
/// `max_attempts`; held ones (the guard, a deleted or emptied group) go to the dead letters at
/// once. Failures that may concern the whole integration (Graph or the LMS down, credentials
/// refused) are checked with a probe: if Graph or the LMS does not answer, no attempt is
/// counted and the probe's error is returned (the caller backs off). What the batch did comes
/// back also when it stopped early: its dead letters and guard trip are the caller's to alert
/// on (`alert::after_batch`; the sync raises no alert itself).
pub async fn process<T: Target>(
    ctx: &Context<'_, T>,
    tg: &Targeting,
    ws: &WorkerSettings,
    items: Vec<(u64, QueueItem)>,
) -> (BatchOutcome, Result<(), RunError>) {
    let mut out = BatchOutcome::default();
    let result = run_batch(ctx, tg, ws, items, &mut out).await;
    (out, result)
}

async fn run_batch<T: Target>(
    ctx: &Context<'_, T>,
    tg: &Targeting,
    ws: &WorkerSettings,
    items: Vec<(u64, QueueItem)>,
    out: &mut BatchOutcome,
) -> Result<(), RunError> {
    let mut done: Vec<u64> = Vec::new();
    let mut failed: Vec<(u64, QueueItem, String, bool)> = Vec::new();
    let mut held: Vec<(u64, QueueItem, String)> = Vec::new();
    let mut waiting: Vec<(u64, QueueItem, DateTime<Utc>)> = Vec::new();

    let mut groups: BTreeMap<String, Vec<(u64, QueueItem)>> = BTreeMap::new();
    let mut users: BTreeMap<String, (UserTask, Vec<(u64, QueueItem)>)> = BTreeMap::new();
    for (id, it) in items {
        match &it.hint {
            Hint::Membership { group_id } => groups
                .entry(group_id.to_ascii_lowercase())
                .or_default()
                .push((id, it)),
            Hint::User { user_id, follow_up } => {
                let key = user_id.to_ascii_lowercase();
                let e = users.entry(key.clone()).or_insert_with(|| {
                    (
                        UserTask {
                            id: key,
                            follow_up: true,
                            missing_since: None,
                            allow_mass: false,
                        },
                        Vec::new(),
                    )
                });
                e.0.follow_up &= *follow_up;
                e.0.allow_mass |= it.allow_mass_deactivation;
                e.0.missing_since = match (e.0.missing_since, it.missing_since) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                e.1.push((id, it));
            }
            _ => {}
        }
    }

    // 1. Membership: one delta round per distinct group.
    for (group_id, its) in groups {
        let span = tracing::info_span!("membership", group = %group_id);
        match membership(ctx, &group_id, out).instrument(span).await {
            Ok(()) => done.extend(its.iter().map(|(id, _)| *id)),
            Err(Failure::Item { message, suspect }) => {
                tracing::warn!(group = %group_id, error = %message, "membership hint failed");
                failed.extend(
                    its.into_iter()
                        .map(|(id, it)| (id, it, message.clone(), suspect)),
                );
            }
            Err(Failure::Hold(why)) => {
                tracing::error!(group = %group_id, %why, "membership change not applied");
                held.extend(its.into_iter().map(|(id, it)| (id, it, why.clone())));
            }
            Err(Failure::Fatal(e)) => {
                settle(ctx, ws, &done, failed, held, waiting, out)?;
                return Err(e);
            }
        }
    }

    // 2. Users, after the membership rounds (so the mirror includes what they learnt).
    if !users.is_empty() {
        let tree = ctx.store.group_tree(&ctx.cfg.groups)?;
        let stopped = stopped_groups(ctx)?;
        let tasks: Vec<UserTask> = users.values().map(|(t, _)| t.clone()).collect();
        let mut opts = SyncOptions::new(Source::Incremental, ws.concurrency, ws.gone_confirm_after);
        opts.user_deadline = ws.user_deadline;
        opts.queue_follow_ups = true;
        if !stopped.is_empty() {
            opts.hold_departures = Some(
                "a configured group was deleted or emptied in Entra: the worker deactivates nobody for leaving the groups until a reconcile lists the groups again",
            );
        }
        let synced = sync_users(ctx, tg, ScopeSource::Mirror(&tree), tasks, opts).await?;
        out.unchanged += synced.unchanged;
        out.changes.extend(synced.changes);
        if synced.guard.is_some() {
            out.guard = synced.guard;
        }
        if !synced.left_over.is_empty() {
            let follow: Vec<QueueItem> = synced
                .left_over
                .into_iter()
                .map(|t| QueueItem::follow_up(t.id))
                .collect();
            ctx.store.enqueue(&follow)?;
        }
        for (uid, (_, its)) in users {
            match synced.outcomes.get(&uid) {
                Some(UserOutcome::Done) | None => done.extend(its.iter().map(|(id, _)| *id)),
                Some(UserOutcome::Failed { message, suspect }) => {
                    out.failed.push((uid.clone(), message.clone()));
                    failed.extend(
                        its.into_iter()
                            .map(|(id, it)| (id, it, message.clone(), *suspect)),
                    );
                }
                Some(UserOutcome::Wait {
                    until,
                    missing_since,
                }) => {
                    for (id, mut it) in its {
                        it.missing_since = *missing_since;
                        waiting.push((id, it, *until));
                    }
                }
                Some(UserOutcome::Held(why)) => {
                    held.extend(its.into_iter().map(|(id, it)| (id, it, why.clone())));
                }
            }
        }
    }

    // 3. One user's failure, or everyone's? Ask Graph and the LMS.
    let mut global: Option<RunError> = None;
    let suspects = failed.iter().filter(|f| f.3).count();
    if suspects > 0 {
        if let Err(e) = apply::probe(ctx).await {
            tracing::error!(error = %e, "Graph or the LMS does not answer; the batch waits without counting attempts");
            global = Some(e);
        }
    }
    if global.is_some() {
        // Not the items' fault: back off without counting an attempt.
        let (suspects, own): (Vec<_>, Vec<_>) = failed.into_iter().partition(|f| f.3);
        failed = own;
        for (id, it, _, _) in suspects {
            waiting.push((id, it, Utc::now() + chrono::Duration::seconds(5)));
        }
    }
    out.stopped = stopped_groups(ctx)?;
    settle(ctx, ws, &done, failed, held, waiting, out)?;
    ctx.store.durable().await?;
    match global {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Configured groups the worker must not act on: kept in the store by the membership rounds
/// (a deleted or emptied group) until a reconcile lists the group again.
fn stopped_groups<T: Target>(ctx: &Context<'_, T>) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for g in &ctx.cfg.groups {
        if let Some(why) = ctx
            .store
            .get_meta::<String>(&format!("group_stopped/{g}"))?
        {
            out.push(why);
        }
    }
    Ok(out)
}

/// Removes finished items; reschedules or buries failed ones; buries held ones; puts waiting
/// ones back for later without counting an attempt.
fn settle<T: Target>(
    ctx: &Context<'_, T>,
    ws: &WorkerSettings,
    done: &[u64],
    failed: Vec<(u64, QueueItem, String, bool)>,
    held: Vec<(u64, QueueItem, String)>,
    waiting: Vec<(u64, QueueItem, DateTime<Utc>)>,
    out: &mut BatchOutcome,
) -> Result<(), StoreError> {
    ctx.store.dequeue(done)?;
    for (id, mut it, err, _) in failed {
        it.attempts += 1;
        it.last_error = Some(err);
        let age = (Utc::now() - it.received_at).to_std().unwrap_or_default();
        if let Some(delay) = ws.retry.after_failures(it.attempts, age) {
            it.not_before =
                Some(Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default());
            ctx.store.requeue(id, &it)?;
        } else {
            tracing::error!(item = id, hint = %it.hint.describe(), attempts = it.attempts, error = ?it.last_error, "giving up; moved to dead letters");
            ctx.store.bury(id, &it)?;
            out.buried += 1;
            out.dead_letters.push((id, it));
        }
    }
    for (id, mut it, why) in held {
        it.last_error = Some(why);
        ctx.store.bury(id, &it)?;
        out.buried += 1;
        out.dead_letters.push((id, it));
    }
    for (id, mut it, until) in waiting {
        it.not_before = Some(until);
        ctx.store.requeue(id, &it)?;
    }
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
    let configured = ctx
        .cfg
        .groups
        .iter()
        .any(|g| g.eq_ignore_ascii_case(group_id));
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
            if group_removed && configured {
                let why = format!(
                    "configured group {group_id} was deleted in Entra: the worker changes nothing for it (as the reconcile refuses to run). Restore the group or change `groups`; if everyone really left, run `reconcile --allow-mass-deactivation`"
                );
                store.put_meta(&format!("group_stopped/{group_id}"), &why)?;
                return Err(Failure::Hold(why));
            }
            if group_removed {
                tracing::warn!("nested group was deleted in Entra");
            }
            (changes, delta_link)
        }
        DeltaRound::Expired(why) => {
            // Relearn the group's direct members (the mirror is replaced only once the fresh
            // round succeeded) and let a full reconcile decide every user: one of the two, not
            // both, reads every member.
            tracing::warn!(%why, "delta link expired; learning the group afresh and scheduling a full reconcile");
            let (changes, link) = fresh_round(ctx, group_id).await?;
            let (added, _) = fold(&changes);
            let before = store.group_tree(&ctx.cfg.groups)?;
            store.replace_members(group_id, &added)?;
            store.put_delta_link(group_id, &link)?;
            let after = store.group_tree(&ctx.cfg.groups)?;
            if before != after {
                forget_detached(ctx, &before, &after)?;
                out.tree_changed = true;
            }
            out.reconcile = Some(format!("the delta link of group {group_id} expired"));
            return Ok(());
        }
    };
    let (added, removed) = fold(&changes);
    if configured {
        let now: BTreeSet<String> = store
            .direct_members(group_id)?
            .into_iter()
            .map(|(m, _)| m)
            .collect();
        let mut next = now.clone();
        for r in &removed {
            next.remove(r);
        }
        for (a, _) in &added {
            next.insert(a.clone());
        }
        if !now.is_empty() && next.is_empty() {
            let why = format!(
                "configured group {group_id} would have no members after this change ({} before): the worker changes nothing for it (as the reconcile refuses to). Check the group in Entra; if everyone really left, run `reconcile --allow-mass-deactivation`",
                now.len()
            );
            store.put_meta(&format!("group_stopped/{group_id}"), &why)?;
            return Err(Failure::Hold(why));
        }
    }
    let mut candidates: BTreeSet<String> = BTreeSet::new();
    let mut new_groups = Vec::new();
    for (m, kind) in &added {
        match kind {
            MemberKind::User => {
                candidates.insert(m.clone());
            }
            MemberKind::Group if !tree.contains(m) => {
                // A nested group joined (or came back): learn its members (and theirs) now.
                Box::pin(init_group(ctx, m, &mut candidates, &mut new_groups, 0)).await?;
            }
            _ => {}
        }
    }
    for m in &removed {
        candidates.insert(m.clone());
        // A nested group left: everyone below it may have lost membership.
        if tree.contains(m) {
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
    let hints: Vec<QueueItem> = candidates.into_iter().map(QueueItem::follow_up).collect();
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
    let after = store.group_tree(&ctx.cfg.groups)?;
    if after != tree || !new_groups.is_empty() {
        forget_detached(ctx, &tree, &after)?;
        out.tree_changed = true;
    }
    Ok(())
}

/// Groups that left the tree are forgotten (members and delta link), so that they are learnt
/// afresh, with their members looked at, if they come back.
fn forget_detached<T: Target>(
    ctx: &Context<'_, T>,
    before: &BTreeSet<String>,
    after: &BTreeSet<String>,
) -> Result<(), StoreError> {
    for g in before.difference(after) {
        tracing::info!(group = %g, "nested group left the tree; forgetting its members and delta link");
        ctx.store.forget_group(g)?;
    }
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
        DeltaRound::Expired(why) => Err(Failure::Item {
            message: format!("a fresh delta round of group {group_id} was refused: {why}"),
            suspect: false,
        }),
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
    if depth > 32 || new_groups.iter().any(|g| g == group_id) {
        return Ok(());
    }
    let (changes, link) = fresh_round(ctx, group_id).await?;
    let (added, _) = fold(&changes);
    ctx.store.replace_members(group_id, &added)?;
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
        if ctx.store.delta_link(g)?.is_some() {
            continue;
        }
        match init_group(ctx, g, &mut candidates, &mut new_groups, 0).await {
            Ok(()) => {}
            Err(Failure::Item { message, .. } | Failure::Hold(message)) => {
                return Err(RunError::Source(message))
            }
            Err(Failure::Fatal(e)) => return Err(e),
        }
    }
    ctx.store.durable().await?;
    Ok(new_groups)
}

/// What `sync-user` needs of the worker: one user, decided now with Graph's own answers for
/// its membership, applied, its reports' manager links following.
pub(crate) async fn sync_one<T: Target>(
    ctx: &Context<'_, T>,
    tg: &Targeting,
    user_id: &str,
    dry_run: bool,
) -> Result<Synced, RunError> {
    let opts = SyncOptions {
        dry_run,
        wait_inline: true,
        max_rounds: 4,
        ..SyncOptions::new(
            Source::SyncUser,
            ctx.cfg.target.concurrency.max(1),
            WorkerSettings::default().gone_confirm_after,
        )
    };
    sync_users(
        ctx,
        tg,
        ScopeSource::Graph,
        vec![UserTask::new(user_id)],
        opts,
    )
    .await
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

#[cfg(test)]
mod settings_tests {
    use super::*;

    #[test]
    fn server_settings_reach_the_worker() {
        let text = r#"
[server]
worker_concurrency = 3
max_attempts = 2
[[integration]]
name = "a"
tenant_id = "6f1d2c3b-4a5e-4f60-9a7b-8c9d0e1f2a3b"
client_id = "3e5a7c9b-1d2f-4a6b-8c0d-2e4f6a8b0c1d"
client_secret = { value = "secret-value" }
groups = ["0bc7d487-fd6f-41a0-8362-71ec81074f11"]
[integration.target]
kind = "scim"
url = "https://lms.example.com/scim/v2"
token = { value = "token-value" }
"#;
        let c = crate::config::Config::from_toml(text, std::path::Path::new(".")).unwrap();
        let ws = WorkerSettings::from_config(&c.server);
        assert_eq!((ws.concurrency, ws.retry.max_attempts), (3, 2));
    }
}
