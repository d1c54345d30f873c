//! Keeping each integration's Graph subscriptions alive: create (adopting or replacing
//! duplicates), renew before expiry, recreate when gone, delete what is no longer wanted.

use std::collections::BTreeSet;

use chrono::{Duration, Utc};
use url::Url;

use crate::app::Integration;
use crate::config::MAX_SUBSCRIPTION_MINUTES;
use crate::graph::subscriptions::{self, Created, NewSubscription};
use crate::graph::GraphError;
use crate::ops::subscriptions::{AtGraph, DeleteDoc, Deleted, ListDoc, Listed, RenewDoc, Renewed};
use crate::store::state::{client_state_fingerprint, SubscriptionRecord, Watch};
use crate::store::StoreError;

pub(crate) const CHANGE_TYPE: &str = "updated,deleted";

#[derive(Debug, thiserror::Error)]
pub enum SubsError {
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Other(String),
}

pub(crate) fn resource(w: &Watch) -> String {
    match w {
        Watch::Users => subscriptions::USERS_RESOURCE.into(),
        Watch::Members { group_id } => subscriptions::group_members_resource(group_id),
    }
}

pub(crate) fn notification_url(public: &Url, name: &str) -> String {
    format!(
        "{}{}",
        public.as_str().trim_end_matches('/'),
        notification_path(name)
    )
}

/// The path every notification URL of this integration ends with, whatever `public_url` was.
fn notification_path(name: &str) -> String {
    format!("/webhooks/graph/{name}")
}

pub(crate) fn lifecycle_url(public: &Url, name: &str) -> String {
    format!(
        "{}/webhooks/lifecycle/{name}",
        public.as_str().trim_end_matches('/')
    )
}

/// What an integration watches: all users, and membership of every group in its tree.
pub(crate) fn wanted(integ: &Integration) -> Result<Vec<Watch>, StoreError> {
    let mut out = vec![Watch::Users];
    for g in integ.store.group_tree(&integ.cfg.groups)? {
        out.push(Watch::Members { group_id: g });
    }
    Ok(out)
}

/// Meta key: the maximum lifetime (minutes) Graph told us for this integration's resources.
const LEARNED_MAX: &str = "subscription_max_minutes";

/// The lifetime to ask for, in minutes: `subscription_minutes`, capped by a maximum Graph
/// reported in an earlier 400 ("can only be N minutes in the future").
fn lifetime_minutes(integ: &Integration) -> f64 {
    let configured = f64::from(integ.cfg.subscription_minutes);
    match integ.store.get_meta::<f64>(LEARNED_MAX) {
        Ok(Some(m)) if m > 0.0 => configured.min(m),
        _ => configured,
    }
}

fn expiry(integ: &Integration) -> chrono::DateTime<Utc> {
    let mins = lifetime_minutes(integ);
    // Slack for clock skew and latency: a minute at long lifetimes, 5 % at short ones.
    let slack = (mins * 0.05).min(1.0);
    let mins = if mins >= f64::from(MAX_SUBSCRIPTION_MINUTES) || mins < 45.0 {
        mins - slack
    } else {
        mins
    };
    Utc::now() + Duration::milliseconds((mins * 60_000.0) as i64)
}

/// Graph's 400 for a too-long lifetime: "Subscription expiration can only be N minutes in
/// the future." → N.
fn max_minutes_in(e: &GraphError) -> Option<f64> {
    let GraphError::Api {
        status: 400,
        message,
        ..
    } = e
    else {
        return None;
    };
    let rest = message.split("can only be ").nth(1)?;
    let mut words = rest.split_whitespace();
    let n: f64 = words.next()?.parse().ok()?;
    (words.next()?.starts_with("minute") && n > 0.0 && n.is_finite()).then_some(n)
}

/// Remembers the maximum lifetime an error names; true when the request is worth repeating.
fn learn_max(integ: &Integration, e: &GraphError) -> bool {
    let Some(max) = max_minutes_in(e) else {
        return false;
    };
    if lifetime_minutes(integ) <= max {
        return false;
    }
    tracing::warn!(
        max_minutes = max,
        asked = lifetime_minutes(integ),
        "Graph allows a shorter subscription lifetime than subscription_minutes; using its maximum"
    );
    integ.store.put_meta(LEARNED_MAX, &max).is_ok()
}

/// How long before expiry a subscription is renewed: `renew_before_minutes`, but at most half
/// the lifetime Graph granted it.
fn renew_before(integ: &Integration, rec: &SubscriptionRecord) -> Duration {
    let configured = Duration::minutes(i64::from(integ.cfg.renew_before_minutes));
    let granted = rec.expires_at - rec.renewed_at.unwrap_or(rec.created_at);
    if granted > Duration::zero() {
        configured.min(granted / 2)
    } else {
        configured
    }
}

/// How often the renewal check must run so no subscription lapses between checks.
pub(crate) fn check_interval(integ: &Integration) -> std::time::Duration {
    let before_mins = f64::from(integ.cfg.renew_before_minutes).min(lifetime_minutes(integ) / 2.0);
    std::time::Duration::from_secs_f64((before_mins * 60.0 / 4.0).max(1.0))
}

/// Renews a recorded subscription and stores its new expiry. `Ok(false)`: Graph says it is
/// gone (404).
async fn renew_record(
    integ: &Integration,
    rec: &mut SubscriptionRecord,
) -> Result<bool, SubsError> {
    // Graph may validate our endpoints during the call: answer its handshake meanwhile.
    let _handshake = integ.handshake.pending();
    let renewed = match integ.graph.renew_subscription(&rec.id, expiry(integ)).await {
        Err(e) if learn_max(integ, &e) => {
            integ.graph.renew_subscription(&rec.id, expiry(integ)).await
        }
        r => r,
    };
    match renewed {
        Ok(Some(s)) => {
            tracing::info!(subscription = %rec.id, resource = %rec.resource, expires = %s.expires_at, "subscription renewed");
            rec.expires_at = s.expires_at;
            rec.renewed_at = Some(Utc::now());
            rec.last_error = None;
            integ.store.put_subscription(rec)?;
            Ok(true)
        }
        Ok(None) => Ok(false),
        Err(e) => {
            rec.last_error = Some(e.to_string());
            integ.store.put_subscription(rec)?;
            Err(e.into())
        }
    }
}

/// Creates one subscription; a 409 duplicate we know is adopted (renewed), one we do not
/// know (its clientState is not ours) is deleted and created again.
async fn create(
    integ: &Integration,
    public: &Url,
    client_state: &str,
    w: &Watch,
) -> Result<SubscriptionRecord, SubsError> {
    // Graph validates our endpoints during the call: answer its handshake meanwhile.
    let _handshake = integ.handshake.pending();
    let name = integ.cfg.name.as_str();
    let res = resource(w);
    let (n, l) = (notification_url(public, name), lifecycle_url(public, name));
    // Recorded before Graph is asked: should this process die before it records what Graph
    // made, the next start knows the subscription (resource and address) is ours to delete.
    remember_pending(integ, &res, &n)?;
    for attempt in 0..2 {
        let req = NewSubscription {
            resource: &res,
            change_type: CHANGE_TYPE,
            notification_url: &n,
            lifecycle_url: &l,
            expires_at: expiry(integ),
            client_state,
        };
        let created = match integ.graph.create_subscription(&req).await {
            Err(e) if learn_max(integ, &e) => {
                let req = NewSubscription {
                    expires_at: expiry(integ),
                    ..req
                };
                integ.graph.create_subscription(&req).await
            }
            r => r,
        };
        match created? {
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
                    notification_url: n.clone(),
                    client_state_fp: Some(client_state_fingerprint(client_state)),
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
                    rec.watch = w.clone();
                    if renew_record(integ, &mut rec).await? {
                        tracing::info!(subscription = %id, resource = %res, "adopted our existing subscription");
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
pub(crate) async fn ensure(
    integ: &Integration,
    public: &Url,
    client_state: &str,
) -> Result<bool, SubsError> {
    let wanted = wanted(integ)?;
    let mut have = integ.store.subscriptions()?;
    let now = Utc::now();
    let mut recreated = false;
    let mut errors = Vec::new();
    let fp = client_state_fingerprint(client_state);
    for w in &wanted {
        let existing = have.iter().position(|r| &r.watch == w);
        let result = match existing.map(|i| have.remove(i)) {
            // The clientState was changed: Graph would keep sending the old one, which the
            // webhook refuses. Renewal cannot change it, so the subscription is made again.
            Some(rec) if rec.client_state_fp.as_ref().is_some_and(|f| *f != fp) => {
                tracing::warn!(subscription = %rec.id, resource = %rec.resource, "clientState changed; creating the subscription again with the new one");
                let _ = integ.graph.delete_subscription(&rec.id).await;
                integ.store.remove_subscription(&rec.id)?;
                recreated = true;
                create(integ, public, client_state, w).await.map(|_| ())
            }
            // public_url changed: Graph would keep posting to the old address. The lifecycle
            // URL cannot be changed by PATCH, so the subscription is made again.
            Some(rec)
                if !rec.notification_url.is_empty()
                    && rec.notification_url
                        != notification_url(public, integ.cfg.name.as_str()) =>
            {
                tracing::warn!(subscription = %rec.id, old = %rec.notification_url, "public_url changed; creating the subscription again at the new address");
                let _ = integ.graph.delete_subscription(&rec.id).await;
                integ.store.remove_subscription(&rec.id)?;
                recreated = true;
                create(integ, public, client_state, w).await.map(|_| ())
            }
            Some(mut rec) if rec.expires_at > now + renew_before(integ, &rec) => {
                if rec.client_state_fp.is_none() {
                    // Made before fingerprints were kept: taken to carry the current one.
                    rec.client_state_fp = Some(fp.clone());
                    integ.store.put_subscription(&rec)?;
                }
                Ok(())
            }
            Some(mut rec) if rec.expires_at > now => match renew_record(integ, &mut rec).await {
                Ok(true) => Ok(()),
                Ok(false) => {
                    tracing::warn!(subscription = %rec.id, "subscription is gone (404); creating it again");
                    integ.store.remove_subscription(&rec.id)?;
                    recreated = true;
                    create(integ, public, client_state, w).await.map(|_| ())
                }
                Err(e) => Err(e),
            },
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

/// Meta key: subscriptions asked of Graph and not recorded yet, `[(resource, notification
/// URL)]`.
const PENDING: &str = "subscriptions_pending";

fn remember_pending(integ: &Integration, resource: &str, url: &str) -> Result<(), StoreError> {
    let mut pending: Vec<(String, String)> = integ.store.get_meta(PENDING)?.unwrap_or_default();
    let entry = (resource.to_string(), url.to_string());
    if !pending.contains(&entry) {
        pending.push(entry);
        // Bounded: the newest are kept.
        let len = pending.len();
        if len > 200 {
            pending.drain(..len - 200);
        }
        integ.store.put_meta(PENDING, &pending)?;
        integ.store.flush()?;
    }
    Ok(())
}

/// At start-up: what Graph holds for this integration's notification URL is compared with the
/// store. A subscription at Graph that the store does not know (made by a process that died
/// before recording it) is deleted, so none is left that nobody renews or answers; a record
/// whose subscription is gone at Graph is dropped, so `ensure` makes it again. Returns true
/// when a recorded subscription was gone (notifications may have been missed).
pub(crate) async fn reconcile_with_graph(
    integ: &Integration,
    public: &Url,
) -> Result<bool, SubsError> {
    let ours = notification_url(public, integ.cfg.name.as_str());
    let norm = |a: &str| a.trim_end_matches('/').to_ascii_lowercase();
    let same_res = |a: &str, b: &str| {
        a.trim_start_matches('/')
            .eq_ignore_ascii_case(b.trim_start_matches('/'))
    };
    let pending: Vec<(String, String)> = integ.store.get_meta(PENDING)?.unwrap_or_default();
    let remote = integ.graph.list_subscriptions().await?;
    let have = integ.store.subscriptions()?;
    for s in &remote {
        if have.iter().any(|r| r.id == s.id) {
            continue;
        }
        let at_ours = norm(&s.notification_url) == norm(&ours);
        let asked_by_us = pending
            .iter()
            .any(|(res, url)| same_res(res, &s.resource) && norm(url) == norm(&s.notification_url));
        if at_ours || asked_by_us {
            tracing::warn!(subscription = %s.id, resource = %s.resource, "a subscription of ours that the store does not know (left by an interrupted start); deleting it");
            integ.graph.delete_subscription(&s.id).await?;
        }
    }
    integ.store.remove_meta(PENDING)?;
    let mut gone = false;
    for r in have {
        if !remote.iter().any(|s| s.id == r.id) {
            tracing::warn!(subscription = %r.id, resource = %r.resource, "a recorded subscription no longer exists at Graph; it is made again");
            integ.store.remove_subscription(&r.id)?;
            gone = true;
        }
    }
    Ok(gone)
}

/// Whether every wanted subscription is recorded and unexpired.
pub(crate) fn live(integ: &Integration) -> Result<Result<(), String>, StoreError> {
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
pub(crate) async fn lifecycle(
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
            if renew_record(integ, &mut rec).await? {
                tracing::info!(subscription = %rec.id, "reauthorized (renewed) after reauthorizationRequired");
            } else {
                integ.store.remove_subscription(&rec.id)?;
                create(integ, public, client_state, &rec.watch).await?;
            }
            // Notifications may have paused until now.
            Ok(true)
        }
        "subscriptionRemoved" => {
            tracing::warn!(subscription = %rec.id, "Graph removed the subscription; creating it again");
            integ.store.remove_subscription(&rec.id)?;
            // Normally gone already; if not, the duplicate would block the new one.
            let _ = integ.graph.delete_subscription(&rec.id).await;
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

/// `subscriptions list`: each recorded subscription with whether Graph still has it, then
/// those Graph holds at this integration's address that the store does not know.
pub async fn list(integ: &Integration) -> Result<ListDoc, SubsError> {
    let name = integ.cfg.name.as_str();
    let remote = integ.graph.list_subscriptions().await?;
    let mut out = Vec::new();
    for r in integ.store.subscriptions()? {
        let live = remote.iter().any(|s| s.id == r.id);
        out.push(Listed {
            id: r.id,
            resource: r.resource,
            expires_at: Some(r.expires_at),
            at_graph: if live {
                AtGraph::Live
            } else {
                AtGraph::NotFound
            },
        });
    }
    let ours = notification_path(name);
    for s in remote {
        if s.notification_url.ends_with(&ours) && integ.store.subscription(&s.id)?.is_none() {
            out.push(Listed {
                id: s.id,
                resource: s.resource,
                expires_at: None,
                at_graph: AtGraph::UnknownToStore,
            });
        }
    }
    Ok(ListDoc {
        integration: name.to_string(),
        subscriptions: out,
    })
}

/// `subscriptions renew`: renews every subscription now (recreating any that is gone), then
/// lists them. The bool: one had to be made again (notifications may have been missed).
pub async fn renew_now(
    integ: &Integration,
    public: &Url,
    client_state: &str,
) -> Result<(RenewDoc, bool), SubsError> {
    // Each one asked of Graph now (`ensure` alone renews only those close to their expiry,
    // judged by the lifetime last granted).
    let mut recreated = false;
    for mut r in integ.store.subscriptions()? {
        if !renew_record(integ, &mut r).await? {
            tracing::warn!(subscription = %r.id, "subscription is gone (404); creating it again");
            integ.store.remove_subscription(&r.id)?;
            recreated = true;
        }
    }
    // Then whatever is missing or no longer wanted, as every renewal check does.
    recreated |= ensure(integ, public, client_state).await?;
    let subscriptions = integ
        .store
        .subscriptions()?
        .into_iter()
        .map(|r| Renewed {
            id: r.id,
            resource: r.resource,
            expires_at: r.expires_at,
        })
        .collect();
    let doc = RenewDoc {
        integration: integ.cfg.name.to_string(),
        subscriptions,
    };
    Ok((doc, recreated))
}

/// `subscriptions delete`: deletes every recorded subscription at Graph and in the store, up
/// to the first failure (named in the document).
pub async fn delete_all(integ: &Integration) -> DeleteDoc {
    let mut doc = DeleteDoc {
        integration: integ.cfg.name.to_string(),
        deleted: Vec::new(),
        error: None,
    };
    let recs = match integ.store.subscriptions() {
        Ok(r) => r,
        Err(e) => {
            doc.error = Some(crate::ops::error_chain(&e));
            return doc;
        }
    };
    for r in recs {
        let step = async {
            let gone = integ.graph.delete_subscription(&r.id).await?;
            integ.store.remove_subscription(&r.id)?;
            Ok::<bool, SubsError>(gone)
        };
        match step.await {
            Ok(deleted) => doc.deleted.push(Deleted {
                id: r.id,
                resource: r.resource,
                deleted,
            }),
            Err(e) => {
                doc.error = Some(crate::ops::error_chain(&e));
                break;
            }
        }
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, message: &str) -> GraphError {
        GraphError::Api {
            method: "POST",
            path: "/subscriptions".into(),
            status,
            code: "ExtensionError".into(),
            message: message.into(),
            hint: String::new(),
        }
    }

    #[test]
    fn graph_maximum_lifetime_is_read_from_its_400() {
        let e = api(
            400,
            "Subscription expiration can only be 4230 minutes in the future.",
        );
        assert_eq!(max_minutes_in(&e), Some(4230.0));
        assert_eq!(
            max_minutes_in(&api(
                400,
                "Subscription expiration can only be 2.5 minutes in the future."
            )),
            Some(2.5)
        );
        // Other 400s, other statuses and nonsense numbers are not a maximum.
        assert_eq!(max_minutes_in(&api(400, "Invalid notificationUrl")), None);
        assert_eq!(
            max_minutes_in(&api(
                403,
                "Subscription expiration can only be 10 minutes in the future."
            )),
            None
        );
        assert_eq!(
            max_minutes_in(&api(
                400,
                "expiration can only be -3 minutes in the future."
            )),
            None
        );
        assert_eq!(
            max_minutes_in(&api(400, "expiration can only be 10 hours in the future.")),
            None
        );
    }
}
