//! Applying decisions to the LMS, for every path (reconcile, worker, `sync-user`): the write
//! itself (create with 409 adoption, update, deactivate), its intent stored before the LMS
//! sees it and settled after, the read-back of intents a crash left behind, the deactivation
//! budget, and telling a failure of one user from an LMS or a Graph that is down.
//!
//! It decides nothing: what to write comes from `sync::decide`.

use std::collections::{BTreeSet, HashMap};

use chrono::Utc;
use futures::{stream, StreamExt};

use super::gate::UserGate;
use super::mapping::{AttrValue, Record, EXTERNAL_ID, MANAGER};
use super::plan::{self, Action, GuardTrip, PlannedChange};
use super::reconcile::report::{Context, RunError};
use super::trace::Match;
use crate::config::DeactivationLimit;
use crate::graph::GraphError;
use crate::lms::{Created, Target, TargetError, TargetUser};
use crate::store::intents::{Intent, IntentId};
use crate::store::{IndexEntry, IntegrationStore, StoreError};

/// Why a change was not applied.
#[derive(Debug)]
pub(crate) enum ApplyError {
    /// This user failed. `uncertain`: the LMS may have taken the write all the same (no
    /// answer, a server error), so the write's intent stays until it is read back. `suspect`:
    /// the error may concern the whole LMS rather than this user (the caller probes).
    User {
        message: String,
        uncertain: bool,
        suspect: bool,
    },
    /// The LMS kept throttling this write past the time one write may wait: nothing was
    /// written; the user is deferred to the next run (or queue round), not failed, and no
    /// attempt is counted.
    Deferred {
        message: String,
        /// A request may have been under way when the wait was given up (its intent stays).
        uncertain: bool,
    },
    /// The run cannot go on (the store failed).
    Fatal(RunError),
}

impl ApplyError {
    pub(crate) fn user(message: String) -> ApplyError {
        ApplyError::User {
            message,
            uncertain: false,
            suspect: false,
        }
    }
}

impl From<StoreError> for ApplyError {
    fn from(e: StoreError) -> Self {
        ApplyError::Fatal(e.into())
    }
}

impl From<TargetError> for ApplyError {
    fn from(e: TargetError) -> Self {
        if matches!(e, TargetError::Throttled { .. }) {
            return ApplyError::Deferred {
                message: e.to_string(),
                uncertain: false,
            };
        }
        ApplyError::User {
            uncertain: e.outcome_unknown(),
            suspect: e.is_fatal(),
            message: e.to_string(),
        }
    }
}

/// A change the target took: the index entry to record and how the LMS user was found.
pub(crate) struct Applied {
    pub entry: IndexEntry,
    pub matched: Match,
}

/// Applies one planned change to the target; returns the index entry to record.
pub(crate) async fn apply_change<T: Target>(
    ctx: &Context<'_, T>,
    managed: &BTreeSet<String>,
    c: &PlannedChange,
) -> Result<Applied, ApplyError> {
    apply_change_linking(ctx, managed, c, None).await
}

/// [`apply_change`]; a create whose record has no manager yet because its manager's create is
/// on its way in this run (`manager`: the manager's Entra id) is linked to it in the same
/// request where the target can ([`Target::create_with_manager`]).
pub(crate) async fn apply_change_linking<T: Target>(
    ctx: &Context<'_, T>,
    managed: &BTreeSet<String>,
    c: &PlannedChange,
    manager: Option<&str>,
) -> Result<Applied, ApplyError> {
    let r = apply_one(ctx, managed, c, manager).await;
    crate::metrics::apply(ctx.cfg.name.as_str(), c.action.as_str(), r.is_ok());
    r
}

async fn apply_one<T: Target>(
    ctx: &Context<'_, T>,
    managed: &BTreeSet<String>,
    c: &PlannedChange,
    manager: Option<&str>,
) -> Result<Applied, ApplyError> {
    match c.action {
        Action::Create => create_or_link(ctx, managed, c, manager).await,
        _ => {
            let target_id = c.target_id.clone().unwrap_or_default();
            let indexed = || Applied {
                entry: index_entry(c, &target_id, c.linked),
                matched: Match::Index {
                    target_id: target_id.clone(),
                },
            };
            match ctx.target.update(&target_id, &c.changes, &c.record).await {
                Ok(()) => Ok(indexed()),
                Err(TargetError::NotFound(_)) if c.action == Action::Deactivate => {
                    // Deleted in the LMS by hand: nothing left to deactivate.
                    tracing::warn!("target user is gone; recording it as inactive");
                    Ok(indexed())
                }
                Err(TargetError::NotFound(_)) => {
                    tracing::warn!("target user was deleted in the LMS; creating it again");
                    create_or_link(ctx, managed, c, None).await
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}

pub(crate) fn index_entry(c: &PlannedChange, target_id: &str, linked: bool) -> IndexEntry {
    IndexEntry {
        target_id: target_id.to_string(),
        user_name: c.user_name.clone(),
        record: c.record.clone(),
        manager: c.manager.clone(),
        linked,
        updated_at: Utc::now(),
        trace: None,
    }
}

async fn create_or_link<T: Target>(
    ctx: &Context<'_, T>,
    managed: &BTreeSet<String>,
    c: &PlannedChange,
    manager: Option<&str>,
) -> Result<Applied, ApplyError> {
    // POST first: one request per new user. A 409 means the userName exists (made by hand,
    // by another tool, or by us before the index entry was written): adopt it then.
    let created = match manager {
        Some(m) => ctx.target.create_with_manager(&c.record, m).await?,
        None => Created::unlinked(ctx.target.create(&c.record).await?),
    };
    if let Some(id) = created.id {
        tracing::info!(target_id = %id, "created LMS user");
        let mut entry = index_entry(c, &id, false);
        if let Some(m) = created.manager {
            // Linked in its own create: the index holds what the LMS holds.
            entry.record.insert(MANAGER.into(), AttrValue::Str(m));
        }
        return Ok(Applied {
            entry,
            matched: Match::Created { target_id: id },
        });
    }
    let found = match ctx.target.find_by_user_name(&c.user_name).await? {
        Some(u) => Some((u, true)),
        None => (ctx.target.find_by_external_id(&c.entra_id).await?).map(|u| (u, false)),
    };
    let Some((u, by_user_name)) = found else {
        return Err(ApplyError::user(format!(
            "the LMS answered 409 (exists) to the create, but no user with userName {:?} or externalId {} can be found",
            c.user_name, c.entra_id
        )));
    };
    link(ctx, managed, c, u, by_user_name).await
}

fn external_id(u: &TargetUser) -> Option<&str> {
    match u.record.get(EXTERNAL_ID) {
        Some(AttrValue::Str(x)) if !x.is_empty() => Some(x.as_str()),
        _ => None,
    }
}

async fn link<T: Target>(
    ctx: &Context<'_, T>,
    managed: &BTreeSet<String>,
    c: &PlannedChange,
    u: TargetUser,
    by_user_name: bool,
) -> Result<Applied, ApplyError> {
    let external = external_id(&u);
    let ours = external == Some(c.entra_id.as_str());
    if let Some(other) = external.filter(|_| !ours) {
        return Err(ApplyError::user(format!(
            "userName {:?} is taken in the LMS by user {} with externalId {other:?} (another identity); not touching it",
            c.user_name, u.id
        )));
    }
    if !ours && !ctx.cfg.link_existing {
        return Err(ApplyError::user(format!(
            "an LMS user with userName {:?} already exists (id {}) and link_existing = false; link it by hand or set link_existing = true",
            c.user_name, u.id
        )));
    }
    let mut current = u.record.clone();
    current.retain(|k, _| managed.contains(k));
    let changes = plan::diff(&current, &c.record);
    if !changes.is_empty() {
        ctx.target.update(&u.id, &changes, &c.record).await?;
    }
    tracing::info!(target_id = %u.id, changed = changes.len(), "linked existing LMS user");
    let matched = if by_user_name {
        Match::UserName {
            target_id: u.id.clone(),
            adopted: !ours,
        }
    } else {
        Match::ExternalId {
            target_id: u.id.clone(),
        }
    };
    Ok(Applied {
        entry: index_entry(c, &u.id, !ours),
        matched,
    })
}

// ---- intents ----

/// The intent of a change, stored before the LMS sees it.
pub(crate) fn intent_of(c: &PlannedChange) -> Intent {
    Intent {
        entra_id: c.entra_id.clone(),
        action: c.action.as_str().to_string(),
        target_id: c.target_id.clone(),
        user_name: c.user_name.clone(),
    }
}

/// Stores intents and waits until they are durable. `None` for none.
pub(crate) async fn announce_intents<T: Target>(
    ctx: &Context<'_, T>,
    intents: Vec<Intent>,
) -> Result<Option<IntentId>, StoreError> {
    if intents.is_empty() {
        return Ok(None);
    }
    let id = ctx.store.record_intents(intents)?;
    ctx.store.durable().await?;
    Ok(Some(id))
}

/// What reading back the intents a crash (or an unanswered write) left behind found.
#[derive(Debug, Default)]
pub(crate) struct Settled {
    /// Users whose index entry now holds what the LMS holds.
    pub settled: Vec<String>,
    /// Users whose LMS state could not be read (their intent stays; a reconcile writes them
    /// in full).
    pub unsettled: Vec<String>,
    /// Settled users whose presence in the LMS (active, or their LMS id) differs from what
    /// the index said: their reports need their manager link looked at again.
    pub moved: Vec<String>,
}

/// How the LMS holds one intent's user now.
enum ReadBack {
    /// The LMS user, as the index should record it.
    Entry(IndexEntry),
    /// There is no such LMS user (a create that never arrived, or a user deleted by hand).
    Absent,
}

/// Reads back from the LMS every user a stored intent names and records what the LMS really
/// holds in the index, so that nothing trusts an entry whose last write was not confirmed.
/// Called at the start of `serve` and of every reconcile. An LMS that cannot be reached is an
/// error (nothing can be trusted then); a user that cannot be read stays pending.
pub(crate) async fn settle_intents<T: Target>(
    ctx: &Context<'_, T>,
    managed: &BTreeSet<String>,
) -> Result<Settled, RunError> {
    let pending = ctx.store.pending_intents()?;
    let mut out = Settled::default();
    if pending.is_empty() {
        return Ok(out);
    }
    let mut by_user: HashMap<String, Intent> = HashMap::new();
    let mut records: HashMap<IntentId, Vec<String>> = HashMap::new();
    for (id, i) in pending {
        records.entry(id).or_default().push(i.entra_id.clone());
        // A later record of the same user says more about what was sent last.
        by_user.insert(i.entra_id.clone(), i);
    }
    tracing::warn!(
        users = by_user.len(),
        "reading back LMS writes whose outcome was not recorded (the last process stopped while they were in flight)"
    );
    // Collected first: a lazily mapped iterator trips the Send check of serve's tasks.
    let calls: Vec<_> = by_user
        .into_values()
        .map(|i| async move {
            let r = read_back(ctx, managed, &i).await;
            (i, r)
        })
        .collect();
    let reads: Vec<(Intent, Result<ReadBack, TargetError>)> = stream::iter(calls)
        .buffer_unordered(ctx.cfg.target.concurrency.max(1))
        .collect()
        .await;
    let mut entries = Vec::new();
    let mut unsettled: HashMap<String, Intent> = HashMap::new();
    for (i, r) in reads {
        let before = ctx.store.get_user(&i.entra_id)?;
        match r {
            Ok(ReadBack::Entry(mut e)) => {
                if let Some(b) = &before {
                    e.manager = b.manager.clone();
                    e.linked = b.linked;
                }
                let moved = before
                    .as_ref()
                    .is_none_or(|b| b.target_id != e.target_id || b.active() != e.active());
                if moved {
                    out.moved.push(i.entra_id.clone());
                }
                tracing::info!(user = %i.entra_id, action = %i.action, active = e.active(), "settled from the LMS");
                entries.push((i.entra_id.clone(), e));
                out.settled.push(i.entra_id);
            }
            Ok(ReadBack::Absent) => {
                if before.is_some() && i.target_id.is_some() {
                    // The LMS user is gone: forget the link (a member is created again).
                    ctx.store.remove_user(&i.entra_id)?;
                    out.moved.push(i.entra_id.clone());
                }
                tracing::info!(user = %i.entra_id, action = %i.action, "settled: no such LMS user");
                out.settled.push(i.entra_id);
            }
            Err(e) if e.is_fatal() => {
                ctx.target.reachable().await?;
                tracing::warn!(user = %i.entra_id, error = %e, "cannot read back an LMS write; it stays pending");
                out.unsettled.push(i.entra_id.clone());
                unsettled.insert(i.entra_id.clone(), i);
            }
            Err(e) => {
                tracing::warn!(user = %i.entra_id, error = %e, "cannot read back an LMS write; it stays pending");
                out.unsettled.push(i.entra_id.clone());
                unsettled.insert(i.entra_id.clone(), i);
            }
        }
    }
    ctx.store.put_users(&entries)?;
    for (id, users) in records {
        let keep: Vec<Intent> = users.iter().filter_map(|u| unsettled.remove(u)).collect();
        ctx.store.settle_intents(id, keep)?;
    }
    ctx.store.durable().await?;
    Ok(out)
}

async fn read_back<T: Target>(
    ctx: &Context<'_, T>,
    managed: &BTreeSet<String>,
    i: &Intent,
) -> Result<ReadBack, TargetError> {
    let found = match &i.target_id {
        Some(t) => ctx.target.get(t).await?,
        None => match ctx.target.find_by_external_id(&i.entra_id).await? {
            Some(u) => Some(u),
            None => ctx
                .target
                .find_by_user_name(&i.user_name)
                .await?
                .filter(|u| external_id(u) == Some(i.entra_id.as_str())),
        },
    };
    Ok(match found {
        Some(u) => {
            let mut record: Record = u.record;
            record.retain(|k, _| managed.contains(k));
            ReadBack::Entry(IndexEntry {
                target_id: u.id,
                user_name: u.user_name,
                record,
                manager: None,
                linked: false,
                updated_at: Utc::now(),
                trace: None,
            })
        }
        None => ReadBack::Absent,
    })
}

// ---- the deactivation budget ----

/// One integration's deactivation budget: what the guard needs of a [`Context`].
pub(crate) struct Budget<'a> {
    store: &'a IntegrationStore,
    gate: &'a UserGate,
    limit: DeactivationLimit,
    window: chrono::Duration,
}

impl<'a> Budget<'a> {
    pub(crate) fn of<T: Target>(ctx: &Context<'a, T>) -> Budget<'a> {
        Budget {
            store: ctx.store,
            gate: ctx.gate,
            limit: ctx.cfg.max_deactivations,
            window: ctx.cfg.guard_window,
        }
    }

    /// Checks the deactivation of `users` against the budget over the guard window (all paths
    /// share it; a user already deactivated within the window costs nothing more). Passed, the
    /// users are counted at once, before they are written: the worker and a reconcile running
    /// side by side cannot both spend what is left (the check and the count are one step under
    /// the gate's budget lock; a write that then fails has spent its share, and its retry
    /// costs nothing more). On a trip the trip is stored (it holds further deactivations until
    /// it expires or an operator allows them); `allow` (`--allow-mass-deactivation`) clears it.
    pub(crate) fn check(
        &self,
        users: &[&str],
        allow: bool,
    ) -> Result<Result<(), GuardTrip>, StoreError> {
        let _one_at_a_time = self.gate.budget();
        if allow {
            self.store.clear_guard_trip()?;
        }
        let (r, tripped) = self.verdict(users, allow)?;
        match &r {
            Err(trip) if !tripped => self.store.put_guard_trip(trip)?,
            Err(_) => {}
            Ok(()) => {
                let owned: Vec<String> = users.iter().map(|u| u.to_string()).collect();
                self.store.record_deactivations(&owned)?;
            }
        }
        Ok(r)
    }

    /// The verdict without storing a trip or counting anyone (a dry run, a preview).
    pub(crate) fn preview(
        &self,
        users: &[&str],
        allow: bool,
    ) -> Result<Result<(), GuardTrip>, StoreError> {
        Ok(self.verdict(users, allow)?.0)
    }

    /// The verdict, and whether a stored trip holds already.
    fn verdict(
        &self,
        users: &[&str],
        allow: bool,
    ) -> Result<(Result<(), GuardTrip>, bool), StoreError> {
        let (used, would) = self.use_of(users)?;
        if would == 0 {
            return Ok((Ok(()), false));
        }
        // A trip under another limit (the operator raised it) no longer holds.
        let tripped = self
            .store
            .guard_trip(self.window)?
            .is_some_and(|t| t.trip.limit == self.limit.to_string());
        let r = plan::guard(
            would,
            self.store.active_count(),
            used,
            self.limit,
            allow,
            tripped,
        );
        Ok((r, tripped))
    }

    /// (users deactivated within the guard window, how many of `users` are not among them).
    fn use_of(&self, users: &[&str]) -> Result<(u64, u64), StoreError> {
        let since = Utc::now() - self.window;
        let done = self.store.deactivated_since(since)?;
        let new: std::collections::HashSet<&str> = users
            .iter()
            .copied()
            .filter(|u| !done.contains(*u))
            .collect();
        Ok((done.len() as u64, new.len() as u64))
    }

    /// Whether deactivating `users` is so far past what the budget has left (more than four
    /// times) that confirming each of them with Graph would only cost reads: a mass event.
    pub(crate) fn clearly_past(&self, users: &[&str]) -> Result<bool, StoreError> {
        let (used, would) = self.use_of(users)?;
        if would == 0 {
            return Ok(false);
        }
        let base = self.store.active_count().saturating_add(used);
        let left = self.limit.allowed(base).saturating_sub(used);
        Ok(would > left.max(1).saturating_mul(4))
    }
}

/// [`Budget::check`] of the context's integration.
pub(crate) fn guard_check<T: Target>(
    ctx: &Context<'_, T>,
    users: &[&str],
    allow: bool,
) -> Result<Result<(), GuardTrip>, StoreError> {
    Budget::of(ctx).check(users, allow)
}

/// [`Budget::preview`] of the context's integration.
pub(crate) fn guard_preview<T: Target>(
    ctx: &Context<'_, T>,
    users: &[&str],
    allow: bool,
) -> Result<Result<(), GuardTrip>, StoreError> {
    Budget::of(ctx).preview(users, allow)
}

/// [`Budget::clearly_past`] of the context's integration.
pub(crate) fn clearly_past_budget<T: Target>(
    ctx: &Context<'_, T>,
    users: &[&str],
) -> Result<bool, StoreError> {
    Budget::of(ctx).clearly_past(users)
}

// ---- one user or all of them? ----

/// Whether a Graph error may concern the whole integration (token refused, Graph unreachable,
/// every call refused) rather than one user.
pub(crate) fn graph_suspect(e: &GraphError) -> bool {
    match e {
        GraphError::Auth { .. } | GraphError::Transport { .. } | GraphError::Credential(_) => true,
        GraphError::Api { status, .. } => matches!(status, 401 | 403 | 429) || *status >= 500,
        _ => false,
    }
}

/// Asks Graph and the LMS whether they answer at all; `Err` names the one that does not. Used
/// when failures could be either one user's or everyone's: if both answer, they were the user's.
pub(crate) async fn probe<T: Target>(ctx: &Context<'_, T>) -> Result<(), RunError> {
    ctx.graph.token().await?;
    if let Some(g) = ctx.cfg.groups.first() {
        ctx.graph.group(g).await?;
    }
    ctx.target.reachable().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::store_a;

    fn budget<'a>(store: &'a IntegrationStore, gate: &'a UserGate, n: u64) -> Budget<'a> {
        Budget {
            store,
            gate,
            limit: DeactivationLimit::Count(n),
            window: chrono::Duration::hours(24),
        }
    }

    /// A passed check spends the budget at once, before anything is written; a user counted
    /// within the window costs nothing more.
    #[test]
    fn a_passed_check_spends_the_budget_before_the_writes() {
        let (_s, a) = store_a();
        let gate = UserGate::default();
        let b = budget(&a, &gate, 3);
        assert!(b.check(&["u1", "u2"], false).unwrap().is_ok());
        assert!(b.preview(&["u3"], false).unwrap().is_ok());
        assert!(b.check(&["u3"], false).unwrap().is_ok());
        assert!(b.check(&["u1"], false).unwrap().is_ok(), "counted once");
        let trip = b.check(&["u4"], false).unwrap().unwrap_err();
        assert_eq!((trip.used, trip.allowed), (3, 3));
        // The trip holds until allowed.
        assert!(
            b.check(&["u1"], false).unwrap().is_ok(),
            "nothing new to spend"
        );
        assert!(b.check(&["u5"], false).unwrap().is_err());
        assert!(b.check(&["u5"], true).unwrap().is_ok());
    }

    /// The worker and a reconcile checking at the same instant cannot both spend what is left.
    #[test]
    fn two_paths_at_once_never_spend_more_than_the_budget() {
        for _ in 0..50 {
            let (_s, a) = store_a();
            let gate = UserGate::default();
            let passed = std::sync::atomic::AtomicUsize::new(0);
            std::thread::scope(|s| {
                for side in ["worker", "reconcile"] {
                    let (a, gate, passed) = (&a, &gate, &passed);
                    s.spawn(move || {
                        let users = [format!("{side}-1"), format!("{side}-2")];
                        let users: Vec<&str> = users.iter().map(String::as_str).collect();
                        if budget(a, gate, 3).check(&users, false).unwrap().is_ok() {
                            passed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    });
                }
            });
            assert_eq!(passed.into_inner(), 1);
            let spent = a
                .deactivated_since(Utc::now() - chrono::Duration::hours(1))
                .unwrap();
            assert_eq!(spent.len(), 2, "{spent:?}");
        }
    }
}
