//! `sync-user`: one user, now, and why. Reads the user (by object id or UPN), its group
//! memberships and its manager from Graph, decides with `sync::decide` as the reconcile and the
//! worker do, passes the shared deactivation budget, applies, lets the manager links of the
//! users it manages follow, and returns the decision trace, which it also stores (except in a
//! dry run).
//!
//! Scope comes from Graph itself (`memberOf`, `transitiveMemberOf`), not from the group tree
//! `serve` keeps, so the answer does not depend on whether `serve` ever ran.

use tracing::Instrument;

use super::reconcile::report::{Context, RunError};
use super::trace::{Match, Outcome, Source, Trace};
use super::worker::{self, UserOutcome};
use crate::graph::GraphError;
use crate::lms::Target;
use crate::store::StoreError;

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
    let entra_id = match ctx.graph.user(key, &["id".to_string()]).await? {
        Some(u) => u.id,
        // Gone from Entra: the store may still know it (and it may need deactivating).
        None => ctx
            .store
            .resolve_user(key)?
            .ok_or_else(|| SyncUserError::NotFound(key.to_string()))?,
    };
    let mut synced = worker::sync_one(ctx, &tg, &entra_id, dry_run).await?;
    let kept = synced.traces.remove(&entra_id);
    let made_here = kept.is_none();
    let mut t = kept.unwrap_or_else(|| {
        let mut t = Trace::new(
            ctx.cfg.name.as_str(),
            Source::SyncUser,
            "sync-user",
            &entra_id,
        );
        t.dry_run = dry_run;
        t
    });
    match synced.outcomes.get(&entra_id) {
        Some(UserOutcome::Failed { message, .. }) if t.outcome != Outcome::Failed => {
            t.failed(message, false);
        }
        Some(UserOutcome::Wait { .. }) if t.note.is_none() => {
            t.note = Some(
                "not decided now: Graph could not confirm the user's state; the next run decides"
                    .into(),
            );
        }
        _ => {}
    }
    if let (Outcome::Unchanged, Match::None) = (t.outcome, &t.matched) {
        if let Some(e) = ctx.store.get_user(&entra_id)? {
            t.matched = Match::Index {
                target_id: e.target_id,
            };
        }
    }
    if !dry_run {
        if made_here {
            ctx.store.put_traces(vec![t.clone()])?;
        }
        ctx.store.flush()?;
    }
    Ok(t)
}
