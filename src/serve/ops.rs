//! The operator commands `serve` runs for its admin API (`http::ops`), on its own open store
//! and with its own locks: `sync-user` one at a time with the worker's batches (the gate's
//! exclusive lock) and, beside a reconcile, kept apart from its writes of the same user by the
//! gate's claims (`sync::gate`); subscription commands under the subscription lock (never beside a renewal or
//! start-up), replays into the queue the worker drains, then a wake-up for it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use url::Url;

use super::{subs, subscriptions_checked, Live};
use crate::ops::queue::{self, ReplayDoc, ReplayRequest};
use crate::ops::subscriptions::{SubsAnswer, SubsCommand};
use crate::ops::{error_chain, ApiError, ErrorCode, Serving, SyncUserRequest};
use crate::store::queue::{Hint, QueueItem};
use crate::sync::sync_user::{sync_user, SyncUserError};
use crate::sync::trace::Trace;

/// How long `sync-user` waits for the worker's batch (seconds, usually) or a reconcile's
/// whole-integration step: then the operator is told to try again.
const RUN_LOCK_WAIT: Duration = Duration::from_secs(120);

pub(super) struct ServeOps {
    lives: Vec<Arc<Live>>,
    /// Known once the listener is bound (subscriptions made again point at it).
    public: OnceLock<Url>,
}

impl ServeOps {
    pub(super) fn new(lives: Vec<Arc<Live>>) -> ServeOps {
        ServeOps {
            lives,
            public: OnceLock::new(),
        }
    }

    pub(super) fn set_public(&self, public: Url) {
        let _ = self.public.set(public);
    }

    fn find(&self, integration: &str) -> Result<&Arc<Live>, ApiError> {
        self.lives
            .iter()
            .find(|l| l.integ.cfg.name.as_str() == integration)
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::UnknownIntegration,
                    format!(
                        "serve has no integration {:?}",
                        crate::text::clip(integration, 64)
                    ),
                )
            })
    }
}

/// A failure as the admin API reports it: the error and its sources, no secret.
fn failed(live: &Live, e: &dyn std::error::Error) -> ApiError {
    ApiError::new(ErrorCode::Failed, live.redactor.scrub(&error_chain(e)))
}

impl Serving for ServeOps {
    fn replay<'a>(
        &'a self,
        integration: &'a str,
        req: ReplayRequest,
    ) -> BoxFuture<'a, Result<ReplayDoc, ApiError>> {
        Box::pin(async move {
            let live = self.find(integration)?;
            let store = live.integ.store.clone();
            let _guard = live.replay_lock.lock().await;
            let doc = tokio::task::spawn_blocking(move || queue::replay(&store, &req))
                .await
                .map_err(|_| ApiError::new(ErrorCode::Failed, "the replay stopped"))?
                .map_err(|e| failed(live, &e))?;
            tracing::info!(
                integration,
                replayed = doc.replayed,
                "admin: dead letters queued again"
            );
            live.wake.notify_one();
            Ok(doc)
        })
    }

    fn subscriptions<'a>(
        &'a self,
        integration: &'a str,
        cmd: SubsCommand,
    ) -> BoxFuture<'a, Result<SubsAnswer, ApiError>> {
        Box::pin(async move {
            let live = self.find(integration)?;
            let _guard = live.subs_lock.lock().await;
            let answer = match cmd {
                SubsCommand::List => SubsAnswer::List(
                    subs::list(&live.integ)
                        .await
                        .map_err(|e| failed(live, &e))?,
                ),
                SubsCommand::Renew => {
                    let public = self.public.get().ok_or_else(|| {
                        ApiError::new(ErrorCode::Unavailable, "serve is still starting")
                    })?;
                    tracing::info!(integration, "admin: renewing every subscription now");
                    let (doc, recreated) = subs::renew_now(&live.integ, public, &live.client_state)
                        .await
                        .map_err(|e| failed(live, &e))?;
                    if recreated {
                        // As after any renewal that had to make one again.
                        live.integ
                            .store
                            .enqueue(&[QueueItem::new(Hint::Reconcile {
                                reason: "a subscription was recreated".into(),
                            })])
                            .map_err(|e| failed(live, &e))?;
                        live.wake.notify_one();
                    }
                    subscriptions_checked(live);
                    SubsAnswer::Renew(doc)
                }
                SubsCommand::Delete => {
                    tracing::info!(integration, "admin: deleting every subscription");
                    let mut doc = subs::delete_all(&live.integ).await;
                    if let Some(e) = &mut doc.error {
                        live.redactor.scrub_in_place(e);
                    }
                    subscriptions_checked(live);
                    SubsAnswer::Delete(doc)
                }
            };
            Ok(answer)
        })
    }

    fn sync_user<'a>(
        &'a self,
        integration: &'a str,
        req: SyncUserRequest,
    ) -> BoxFuture<'a, Result<Trace, ApiError>> {
        Box::pin(async move {
            let live = self.find(integration)?;
            if !live.started.load(Ordering::Acquire) {
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "integration {integration} has not finished starting (see /status); try again"
                    ),
                ));
            }
            // With the worker's batches one at a time; a reconcile running beside it keeps apart
            // from this user's writes through the gate's claims (`sync::gate`).
            let _run = tokio::time::timeout(RUN_LOCK_WAIT, live.integ.gate.exclusive())
                .await
                .map_err(|_| {
                    ApiError::new(
                        ErrorCode::Busy,
                        format!(
                            "integration {integration} stayed busy for {} s (the worker's batch or a reconcile's whole-integration step); try again later",
                            RUN_LOCK_WAIT.as_secs()
                        ),
                    )
                })?;
            let span = tracing::info_span!("sync_user", integration, user = %crate::text::clip(&req.user, 64));
            let r = tracing::Instrument::instrument(
                sync_user(&live.integ.context(), &req.user, req.dry_run),
                span,
            )
            .await;
            match r {
                Ok(t) => Ok(t),
                Err(e @ SyncUserError::NotFound(_)) => Err(ApiError::new(
                    ErrorCode::UserNotFound,
                    live.redactor.scrub(&e.to_string()),
                )),
                Err(e) => Err(failed(live, &e)),
            }
        })
    }
}
