//! Keeping each integration's Graph subscriptions alive: create (adopting or replacing
//! duplicates), renew before expiry, recreate when gone, delete what is no longer wanted.

use std::collections::BTreeSet;

use chrono::{Duration, Utc};
use url::Url;

use crate::app::Integration;
use crate::config::MAX_SUBSCRIPTION_MINUTES;
use crate::graph::subscriptions::{Created, NewSubscription};
use crate::graph::GraphError;
use crate::store::state::{SubscriptionRecord, Watch};
use crate::store::StoreError;

pub const CHANGE_TYPE: &str = "updated,deleted";

#[derive(Debug, thiserror::Error)]
pub enum SubsError {
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Other(String),
}

pub fn resource(w: &Watch) -> String {
    match w {
        Watch::Users => "/users".into(),
        Watch::Members { group_id } => format!("/groups/{group_id}/members"),
    }
}

pub fn notification_url(public: &Url, name: &str) -> String {
    format!(
        "{}/webhooks/graph/{name}",
        public.as_str().trim_end_matches('/')
    )
}

pub fn lifecycle_url(public: &Url, name: &str) -> String {
    format!(
        "{}/webhooks/lifecycle/{name}",
        public.as_str().trim_end_matches('/')
    )
}

/// What an integration watches: all users, and membership of every group in its tree.
pub fn wanted(integ: &Integration) -> Result<Vec<Watch>, StoreError> {
    let mut out = vec![Watch::Users];
    for g in integ.store.group_tree(&integ.cfg.groups)? {
        out.push(Watch::Members { group_id: g });
    }
    Ok(out)
}

fn expiry(integ: &Integration) -> chrono::DateTime<Utc> {
    let mins = integ.cfg.subscription_minutes;
    // At Graph's maximum, keep a minute of slack for clock skew and latency.
    let mins = if mins >= MAX_SUBSCRIPTION_MINUTES {
        mins - 1
    } else {
        mins
    };
    Utc::now() + Duration::minutes(i64::from(mins))
}

/// Creates one subscription; a 409 duplicate we know is adopted (renewed), one we do not
/// know (its clientState is not ours) is deleted and created again.
async fn create(
    integ: &Integration,
    public: &Url,
    client_state: &str,
    w: &Watch,
) -> Result<SubscriptionRecord, SubsError> {
    let name = integ.cfg.name.as_str();
    let res = resource(w);
    let (n, l) = (notification_url(public, name), lifecycle_url(public, name));
    for attempt in 0..2 {
        let req = NewSubscription {
            resource: &res,
            change_type: CHANGE_TYPE,
            notification_url: &n,
            lifecycle_url: &l,
            expires_at: expiry(integ),
            client_state,
        };
        match integ.graph.create_subscription(&req).await? {
            Created::New(s) => {
                tracing::info!(subscription = %s.id, resource = %res, expires = %s.expires_at, "subscription created");
                let rec = SubscriptionRecord {
                    id: s.id,
                    watch: w.clone(),
                    resource: res.clone(),
                    change_type: CHANGE_TYPE.into(),
                    expires_at: s.expires_at,
                    created_at: Utc::now(),
                    renewed_at: None,
                    last_error: None,
                };
                integ.store.put_subscription(&rec)?;
                return Ok(rec);
            }
            Created::Duplicate(id) => {
                let id = match id {
                    Some(id) => Some(id),
                    None => integ
                        .graph
                        .list_subscriptions()
                        .await?
                        .into_iter()
                        .find(|s| {
                            s.resource.eq_ignore_ascii_case(&res)
                                || s.resource
                                    .trim_start_matches('/')
                                    .eq_ignore_ascii_case(res.trim_start_matches('/'))
                        })
                        .map(|s| s.id),
                };
                let Some(id) = id else {
                    return Err(SubsError::Other(format!(
                        "Graph says a subscription for {res} exists but it cannot be found"
                    )));
                };
                if let Some(mut rec) = integ.store.subscription(&id)? {
                    if let Some(s) = integ.graph.renew_subscription(&id, expiry(integ)).await? {
                        tracing::info!(subscription = %id, resource = %res, "adopted our existing subscription");
                        rec.expires_at = s.expires_at;
                        rec.renewed_at = Some(Utc::now());
                        rec.watch = w.clone();
                        integ.store.put_subscription(&rec)?;
                        return Ok(rec);
                    }
                } else if attempt == 0 {
                    tracing::warn!(subscription = %id, resource = %res, "a subscription we have no record of (other clientState) exists; replacing it");
                    integ.graph.delete_subscription(&id).await?;
                }
            }
        }
    }
    Err(SubsError::Other(format!(
        "could not create a subscription for {res}"
    )))
}

/// Makes sure every wanted subscription exists and is not about to expire; deletes ours that
/// are no longer wanted. Returns true when a subscription had to be recreated (notifications
/// may have been missed: run a full reconcile).
pub async fn ensure(
    integ: &Integration,
    public: &Url,
    client_state: &str,
) -> Result<bool, SubsError> {
    let wanted = wanted(integ)?;
    let mut have = integ.store.subscriptions()?;
    let now = Utc::now();
    let renew_before = Duration::minutes(i64::from(integ.cfg.renew_before_minutes));
    let mut recreated = false;
    let mut errors = Vec::new();
    for w in &wanted {
        let existing = have.iter().position(|r| &r.watch == w);
        let result = match existing.map(|i| have.remove(i)) {
            Some(rec) if rec.expires_at > now + renew_before => Ok(()),
            Some(mut rec) if rec.expires_at > now => {
                match integ.graph.renew_subscription(&rec.id, expiry(integ)).await {
                    Ok(Some(s)) => {
                        tracing::info!(subscription = %rec.id, resource = %rec.resource, expires = %s.expires_at, "subscription renewed");
                        rec.expires_at = s.expires_at;
                        rec.renewed_at = Some(Utc::now());
                        rec.last_error = None;
                        integ.store.put_subscription(&rec).map_err(SubsError::from)
                    }
                    Ok(None) => {
                        tracing::warn!(subscription = %rec.id, "subscription is gone (404); creating it again");
                        integ.store.remove_subscription(&rec.id)?;
                        recreated = true;
                        create(integ, public, client_state, w).await.map(|_| ())
                    }
                    Err(e) => {
                        rec.last_error = Some(e.to_string());
                        integ.store.put_subscription(&rec)?;
                        Err(e.into())
                    }
                }
            }
            Some(rec) => {
                tracing::warn!(subscription = %rec.id, "subscription expired before renewal; creating it again");
                integ.store.remove_subscription(&rec.id)?;
                let _ = integ.graph.delete_subscription(&rec.id).await;
                recreated = true;
                create(integ, public, client_state, w).await.map(|_| ())
            }
            None => create(integ, public, client_state, w).await.map(|_| ()),
        };
        if let Err(e) = result {
            tracing::error!(resource = %resource(w), error = %e, "subscription could not be created or renewed");
            errors.push(format!("{}: {e}", resource(w)));
        }
    }
    // Ours but no longer wanted (a nested group left the tree).
    for rec in have {
        tracing::info!(subscription = %rec.id, resource = %rec.resource, "deleting a subscription no longer needed");
        let _ = integ.graph.delete_subscription(&rec.id).await;
        integ.store.remove_subscription(&rec.id)?;
    }
    if errors.is_empty() {
        Ok(recreated)
    } else {
        crate::alert::subscriptions_failed(&integ.cfg, &integ.store, &errors);
        Err(SubsError::Other(errors.join("; ")))
    }
}

/// Whether every wanted subscription is recorded and unexpired.
pub fn live(integ: &Integration) -> Result<Result<(), String>, StoreError> {
    let have = integ.store.subscriptions()?;
    let now = Utc::now();
    let mut missing = BTreeSet::new();
    for w in wanted(integ)? {
        if !have.iter().any(|r| r.watch == w && r.expires_at > now) {
            missing.insert(resource(&w));
        }
    }
    Ok(if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "no live subscription for {}",
            missing.into_iter().collect::<Vec<_>>().join(", ")
        ))
    })
}

/// Handles a lifecycle event for one of our subscriptions. Returns true when a full reconcile
/// should follow (notifications may have been lost).
pub async fn lifecycle(
    integ: &Integration,
    public: &Url,
    client_state: &str,
    event: &str,
    subscription_id: &str,
) -> Result<bool, SubsError> {
    let Some(mut rec) = integ.store.subscription(subscription_id)? else {
        return Ok(false);
    };
    match event {
        "reauthorizationRequired" => {
            // A renewal also reauthorizes (one call; never both within 10 minutes).
            match integ
                .graph
                .renew_subscription(&rec.id, expiry(integ))
                .await?
            {
                Some(s) => {
                    tracing::info!(subscription = %rec.id, "reauthorized (renewed) after reauthorizationRequired");
                    rec.expires_at = s.expires_at;
                    rec.renewed_at = Some(Utc::now());
                    integ.store.put_subscription(&rec)?;
                    // Notifications may have paused until now.
                    Ok(true)
                }
                None => {
                    integ.store.remove_subscription(&rec.id)?;
                    create(integ, public, client_state, &rec.watch).await?;
                    Ok(true)
                }
            }
        }
        "subscriptionRemoved" => {
            tracing::warn!(subscription = %rec.id, "Graph removed the subscription; creating it again");
            integ.store.remove_subscription(&rec.id)?;
            create(integ, public, client_state, &rec.watch).await?;
            Ok(true)
        }
        "missed" => Ok(true),
        other => {
            tracing::warn!(event = %other.chars().take(64).collect::<String>(), "unknown lifecycle event ignored");
            Ok(false)
        }
    }
}
