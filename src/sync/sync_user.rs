//! `sync-user`: one user, now, and why. Reads the user (by object id or UPN), its group
//! memberships and its manager from Graph, plans with the incremental worker's code
//! (`worker::decide`), passes the same guard, applies with reconcile's `apply_change`, and
//! returns the decision trace, which it also stores (except in a dry run).
//!
//! Scope comes from Graph itself (`memberOf`, `transitiveMemberOf`), not from the group tree
//! `serve` keeps, so the answer does not depend on whether `serve` ever ran.

use std::collections::BTreeSet;

use tracing::Instrument;

use super::plan::{self, Action};
use super::reconcile::{apply_change, ApplyError, Context, RunError};
use super::trace::{self, Match, OutOfScope, Outcome, Path, Scope, Source, Trace, Via};
use super::worker::{self, Decision, Failure};
use crate::graph::models::GraphGroup;
use crate::graph::GraphError;
use crate::store::StoreError;
use crate::target::Target;

#[derive(Debug, thiserror::Error)]
pub enum SyncUserError {
    #[error("no user {0:?} in Entra (Graph answered 404), and no object id, UPN or userName {0:?} in this integration's store")]
    NotFound(String),
    #[error(transparent)]
    Run(#[from] RunError),
}

impl From<GraphError> for SyncUserError {
    fn from(e: GraphError) -> Self {
        SyncUserError::Run(e.into())
    }
}

impl From<StoreError> for SyncUserError {
    fn from(e: StoreError) -> Self {
        SyncUserError::Run(e.into())
    }
}

/// Syncs one user now (`key`: Entra object id or UPN; a userName rostersync knows also works
/// for a user deleted in Entra). With `dry_run`, plans and returns the trace, applies and
/// stores nothing. A user the LMS refuses is `Ok` with a `failed` trace; errors are whole-run
/// problems (Graph, LMS unreachable, store) or an unknown user.
pub async fn sync_user<T: Target>(
    ctx: &Context<'_, T>,
    key: &str,
    dry_run: bool,
) -> Result<Trace, SyncUserError> {
    let key = key.trim();
    let span = tracing::info_span!("sync_user", integration = %ctx.cfg.name, run_id = "sync-user", user = %key, dry_run);
    async move {
        let t = run(ctx, key, dry_run).await?;
        tracing::info!(user = %t.entra_id, outcome = t.outcome.as_str(), "sync-user finished");
        Ok(t)
    }
    .instrument(span)
    .await
}

async fn run<T: Target>(
    ctx: &Context<'_, T>,
    key: &str,
    dry_run: bool,
) -> Result<Trace, SyncUserError> {
    let tg = worker::targeting(ctx).await?;
    let user = ctx.graph.user(key, &ctx.cfg.mapping.user_select()).await?;
    let entra_id = match &user {
        Some(u) => u.id.clone(),
        // Gone from Entra: the store may still know it (and it may need deactivating).
        None => ctx
            .store
            .resolve_user(key)?
            .ok_or_else(|| SyncUserError::NotFound(key.to_string()))?,
    };
    let via = match &user {
        Some(_) => membership(ctx, &entra_id).await?,
        None => Vec::new(),
    };
    let member = !via.is_empty();
    let existing = ctx.store.get_user(&entra_id)?.map(|mut e| {
        e.record.retain(|k, _| tg.managed.contains(k));
        e
    });
    // No follow-ups: a manager not in the LMS yet is not linked (the next run links it).
    let d = match worker::decide(
        ctx,
        &tg,
        &BTreeSet::new(),
        &entra_id,
        true,
        member,
        user.as_ref(),
        existing.as_ref(),
        &mut Vec::new(),
    )
    .await
    {
        Ok(d) => d,
        Err(Failure::Item(m)) => Decision {
            failure: Some(m),
            ..Decision::default()
        },
        Err(Failure::Fatal(e)) => return Err(e.into()),
    };

    let mut t = Trace::new(
        ctx.cfg.name.as_str(),
        Source::SyncUser,
        "sync-user",
        &entra_id,
    );
    t.dry_run = dry_run;
    let upn = user.as_ref().and_then(|u| u.string("userPrincipalName"));
    t.user(
        existing.as_ref().map(|e| e.user_name.as_str()),
        upn.as_deref(),
    )
    .scope(Scope::of(d.out, via));
    d.fill(&mut t, existing.as_ref());
    match (&d.change, &d.failure) {
        (_, Some(_)) => {}
        (None, None) => {
            if member && existing.is_none() && d.out == Some(OutOfScope::Disabled) {
                t.skipped(
                    "disabled in Entra (accountEnabled = false) and never in the LMS: not created",
                );
            }
        }
        (Some(_), None) if dry_run => {}
        (Some(c), None) => {
            let guard = match c.action {
                Action::Deactivate => plan::guard(
                    1,
                    ctx.store.active_count(),
                    ctx.cfg.max_deactivations,
                    false,
                ),
                _ => Ok(()),
            };
            match guard {
                Err(trip) => {
                    tracing::error!(%trip, "guard held the deactivation");
                    t.held(&trip.to_string());
                }
                Ok(()) => {
                    let span = tracing::info_span!("apply", user = %c.entra_id, action = c.action.as_str());
                    match apply_change(ctx, &tg.managed, c).instrument(span).await {
                        Ok(a) => {
                            ctx.store.put_users(&[(entra_id.clone(), a.entry)])?;
                            t.applied(c, &a.matched);
                        }
                        Err(ApplyError::User(m)) => {
                            tracing::warn!(reason = %m, "user failed to sync");
                            t.failed(&m, true);
                        }
                        Err(ApplyError::Fatal(e)) => return Err(e.into()),
                    }
                }
            }
        }
    }
    if let (Outcome::Unchanged, Some(e)) = (t.outcome, &existing) {
        t.matched = Match::Index {
            target_id: e.target_id.clone(),
        };
    }
    t.scrub(&trace::secrets_of(ctx.cfg));
    if !dry_run {
        ctx.store.put_traces(vec![t.clone()])?;
        ctx.store.flush()?;
    }
    Ok(t)
}

/// The configured groups the user is in, each directly or through which nested group, from
/// Graph: the user's direct groups (`memberOf`), all its groups (`transitiveMemberOf`), and for
/// a configured group reached only indirectly, that group's nested groups, to name the one of
/// the user's own groups that leads there.
async fn membership<T: Target>(
    ctx: &Context<'_, T>,
    user_id: &str,
) -> Result<Vec<Via>, GraphError> {
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
