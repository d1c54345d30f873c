//! Knowing each member's manager without reading it for every member at every reconcile.
//!
//! Reading `GET /users/{id}/manager` for every member (in `$batch`es) is what a reconcile
//! costs Graph above the member listing itself: about one resource unit per member, each time.
//! Instead, a reconcile normally takes each member's manager from what it last applied (the
//! index entry's manager), corrected by a `/users/delta?$select=…,manager` round since the last
//! run (`manager@delta` for changed managers, the selected properties for changed users), and
//! the managers' own properties (name, mail) from a small cache (`people`), itself kept current
//! by the same round. Only users the index does not know, managers the cache does not know, or
//! users whose manager disappeared are read one by one.
//!
//! The first run, a run whose delta link expired, a run after `verify_managers_every`, and
//! `reconcile --verify-managers` read every member's manager as before (a *verification* run)
//! and take a fresh delta link (`$deltatoken=latest`) before they list, so nothing that changes
//! during the run is missed by the next one. A dry run never advances the link.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use futures::{stream, StreamExt};

use crate::graph::delta::UsersRound;
use crate::graph::models::GraphUser;
use crate::graph::{GraphClient, GraphError, BATCH_LIMIT};
use crate::store::{IndexEntry, IntegrationStore, StoreError};

/// Meta key of the users delta link that tracks managers.
const LINK: &str = "users_delta_link";
/// Meta key: when every member's manager was last read from Graph.
const VERIFIED: &str = "managers_verified_at";
/// Meta key of an earlier version's list of users whose manager must be read at the next run:
/// still read once, now kept as doubts (`IntegrationStore::doubt_managers`).
const UNKNOWN: &str = "managers_unknown";

/// What is known of one user's manager before the page is read.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum ManagerFact {
    /// `None`: no manager.
    Known(Option<String>),
    /// Read it.
    Unknown,
}

/// How a run learns its members' managers.
#[derive(Clone, Debug)]
pub(crate) enum Mode {
    /// Every member's manager read from Graph.
    Verify,
    /// From the index, corrected by the users delta since the last run.
    Tracked {
        overlay: HashMap<String, ManagerFact>,
    },
}

/// This run's plan for managers, and what to record when it succeeds.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub mode: Mode,
    /// The users delta link to keep once the run succeeded (never by a dry run); `None` when
    /// Graph does not offer the users delta (every run then reads every manager).
    pub next_link: Option<String>,
    /// The doubts (`IntegrationStore::manager_doubts`) this run reads past, settled by
    /// [`finish`] for the users it settles.
    pub doubts: Vec<(String, sled::IVec)>,
}

/// Whether Graph refused the users delta as such (not a passing failure): the run then reads
/// every manager, as when nothing is tracked.
fn unsupported(e: &GraphError) -> bool {
    matches!(e, GraphError::Decode { .. }) || matches!(e.status(), Some(400 | 404 | 405 | 501))
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ManagersError {
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Decides how this run learns managers and runs the users delta round if it tracks them.
pub(crate) async fn prepare(
    graph: &GraphClient,
    store: &IntegrationStore,
    select: &[String],
    verify_requested: bool,
    verify_every: chrono::Duration,
) -> Result<Plan, ManagersError> {
    // Doubts raised before this point are settled by this run (if it reads those users).
    let doubts = store.manager_doubts()?;
    let pruned = store.prune_orphans(Utc::now())?;
    if pruned > 0 {
        tracing::info!(
            pruned,
            "reports remembered for a vanished manager longer than it can be restored are forgotten"
        );
    }
    let link: Option<String> = store.get_meta(LINK)?;
    let verified: Option<DateTime<Utc>> = store.get_meta(VERIFIED)?;
    let due = verified.is_none_or(|t| Utc::now() - t >= verify_every);
    if let (Some(link), false, false) = (link, verify_requested, due) {
        let round = match graph.users_delta(&link).await {
            Err(e) if unsupported(&e) => {
                tracing::warn!(error = %e, "the users delta is refused; reading every manager");
                UsersRound::Expired(e.to_string())
            }
            r => r?,
        };
        match round {
            UsersRound::Changes { users, delta_link } => {
                let carried: Vec<String> = store.get_meta(UNKNOWN)?.unwrap_or_default();
                let mut overlay: HashMap<String, ManagerFact> = carried
                    .into_iter()
                    .chain(doubts.iter().map(|(id, _)| id.clone()))
                    .map(|u| (u, ManagerFact::Unknown))
                    .collect();
                let mut changed_people = 0usize;
                let orphans = store.orphans()?;
                for u in users {
                    if u.removed.is_some() {
                        if store.is_person(&u.id)? {
                            store.remove_person(&u.id)?;
                        }
                        // Whoever it managed: read their manager again, and again should it
                        // come back (a soft delete, reason "changed": restored, it gives them
                        // their manager again, maybe with no `manager@delta` for them). Deleted
                        // for good, it cannot.
                        let reports = store.reports_of(&u.id)?;
                        if u.removed.as_deref() == Some("deleted") {
                            store.forget_orphans_of(&u.id)?;
                            store.forget_vanished(&u.id)?;
                        } else {
                            store.mark_vanished(&u.id)?;
                            if !reports.is_empty() {
                                store.mark_orphans(&u.id, &reports)?;
                            }
                        }
                        for r in reports {
                            overlay.insert(r, ManagerFact::Unknown);
                        }
                        overlay.insert(u.id, ManagerFact::Unknown);
                        continue;
                    }
                    for r in orphans.get(&u.id).into_iter().flatten() {
                        overlay.entry(r.clone()).or_insert(ManagerFact::Unknown);
                    }
                    if let Some(m) = u.manager {
                        overlay.insert(u.id.clone(), ManagerFact::Known(m));
                    }
                    if !u.props.is_empty() {
                        if let Some(mut p) = store.person(&u.id)? {
                            for k in select {
                                if let Some(v) = u.props.get(k) {
                                    p.insert(k.clone(), v.clone());
                                }
                            }
                            store.put_person(&u.id, &p)?;
                            changed_people += 1;
                        }
                    }
                }
                tracing::info!(
                    managers_changed = overlay.len(),
                    managers_renamed = changed_people,
                    "managers tracked by users delta"
                );
                return Ok(Plan {
                    mode: Mode::Tracked { overlay },
                    next_link: Some(delta_link),
                    doubts,
                });
            }
            UsersRound::Expired(why) => {
                tracing::warn!(%why, "the users delta link expired; reading every manager");
            }
        }
    }
    // Taken before the listing: what changes while this run reads is in the next round.
    let next_link = match graph.users_delta_latest(select).await {
        Ok(l) => Some(l),
        Err(e) if unsupported(&e) => {
            tracing::warn!(error = %e, "Graph offers no users delta; every run reads every manager");
            None
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Plan {
        mode: Mode::Verify,
        next_link,
        doubts,
    })
}

/// Records a successful run's plan: what the delta round told of every user's manager goes
/// into the index (also for users this run did not apply: failed ones, or users out of scope
/// who may come back), managers that disappeared are read at the next run by the users this
/// run did not settle (`settled`: listed and not failed), then the link (and, for a
/// verification run, when) is kept.
pub(crate) fn finish(
    store: &IntegrationStore,
    plan: &Plan,
    settled: impl Fn(&str) -> bool,
) -> Result<(), StoreError> {
    let mut unknown = Vec::new();
    if let Mode::Tracked { overlay } = &plan.mode {
        let mut entries = Vec::new();
        for (id, fact) in overlay {
            match fact {
                ManagerFact::Known(m) => {
                    if let Some(mut e) = store.get_user(id)? {
                        if &e.manager != m {
                            e.manager = m.clone();
                            entries.push((id.clone(), e));
                        }
                    }
                }
                ManagerFact::Unknown => {
                    if !settled(id) && store.get_user(id)?.is_some() {
                        unknown.push(id.clone());
                    }
                }
            }
        }
        store.put_users(&entries)?;
    }
    // The doubts this run read past: settled for the users it settled (or no longer indexed);
    // a doubt raised again during the run has a new stamp and stays.
    let mut settle = Vec::new();
    for (id, stamp) in &plan.doubts {
        if settled(id) || store.get_user(id)?.is_none() {
            settle.push((id.clone(), stamp.clone()));
        }
    }
    store.settle_doubts(&settle)?;
    store.doubt_managers(&unknown)?;
    store.remove_meta(UNKNOWN)?;
    match &plan.next_link {
        Some(l) => store.put_meta(LINK, l)?,
        None => store.remove_meta(LINK)?,
    }
    if matches!(plan.mode, Mode::Verify) {
        store.put_meta(VERIFIED, &Utc::now())?;
    }
    Ok(())
}

/// Where a run finds its members' managers.
pub(crate) struct Lookup<'a> {
    pub graph: &'a GraphClient,
    pub store: &'a IntegrationStore,
    pub mode: &'a Mode,
    /// The manager properties to read (`Mapping::manager_select`).
    pub select: &'a [String],
    /// Concurrent `$batch` requests.
    pub concurrency: usize,
}

impl Lookup<'_> {
    /// The managers of one page of members (`entries`: their raw index entries, same order):
    /// the manager's Graph object, `None` for no manager. `memo` keeps the managers read or
    /// looked up in this run.
    pub(crate) async fn page(
        &self,
        users: &[GraphUser],
        entries: &[Option<IndexEntry>],
        memo: &mut HashMap<String, Option<GraphUser>>,
    ) -> Result<HashMap<String, Option<GraphUser>>, ManagersError> {
        let Lookup {
            graph,
            store,
            mode,
            select,
            concurrency,
        } = *self;
        let mut out: HashMap<String, Option<GraphUser>> = HashMap::with_capacity(users.len());
        let mut read_each: Vec<String> = Vec::new();
        let mut of: Vec<(String, String)> = Vec::new();
        // A disabled member never synced is not created, whoever its manager: nothing to read.
        let needless = |u: &GraphUser, e: &Option<IndexEntry>| {
            e.is_none() && crate::sync::decide::account_disabled(u)
        };
        match mode {
            Mode::Verify => {
                for (u, e) in users.iter().zip(entries) {
                    if needless(u, e) {
                        out.insert(u.id.clone(), None);
                    } else {
                        read_each.push(u.id.clone());
                    }
                }
            }
            Mode::Tracked { overlay } => {
                for (u, e) in users.iter().zip(entries) {
                    if needless(u, e) {
                        out.insert(u.id.clone(), None);
                        continue;
                    }
                    let fact = match overlay.get(&u.id) {
                        Some(f) => f.clone(),
                        None => match e {
                            Some(e) => ManagerFact::Known(e.manager.clone()),
                            None => ManagerFact::Unknown,
                        },
                    };
                    match fact {
                        ManagerFact::Known(None) => {
                            out.insert(u.id.clone(), None);
                        }
                        ManagerFact::Known(Some(m)) => of.push((u.id.clone(), m)),
                        ManagerFact::Unknown => read_each.push(u.id.clone()),
                    }
                }
            }
        }
        // Managers known by id: from this run's memo, the cache, or one read each.
        let mut missing: Vec<String> = Vec::new();
        for (_, m) in &of {
            if memo.contains_key(m) || missing.contains(m) {
                continue;
            }
            match store.person(m)? {
                Some(props) => {
                    let mut v = props;
                    v.insert("id".into(), serde_json::Value::String(m.clone()));
                    let user = GraphUser::from_value(serde_json::Value::Object(v)).ok();
                    memo.insert(m.clone(), user);
                }
                None => missing.push(m.clone()),
            }
        }
        if !missing.is_empty() {
            let calls: Vec<_> = missing
                .chunks(BATCH_LIMIT)
                .map(|c| graph.users_by_id(c, select))
                .collect();
            let mut reads = stream::iter(calls).buffer_unordered(concurrency.max(1));
            while let Some(r) = reads.next().await {
                for (id, u) in r? {
                    if let Some(u) = &u {
                        store.put_person(&id, &u.props)?;
                    }
                    memo.insert(id, u);
                }
            }
        }
        for (u, m) in of {
            match memo.get(&m) {
                Some(Some(mu)) => {
                    out.insert(u, Some(mu.clone()));
                }
                // The manager is gone from Graph: ask who the manager is now.
                _ => read_each.push(u),
            }
        }
        if !read_each.is_empty() {
            let calls: Vec<_> = read_each
                .chunks(BATCH_LIMIT)
                .map(|c| graph.managers(c, select))
                .collect();
            let mut batches = stream::iter(calls).buffer_unordered(concurrency.max(1));
            while let Some(r) = batches.next().await {
                for (id, m) in r? {
                    if let Some(m) = &m {
                        if !memo.contains_key(&m.id) {
                            store.put_person(&m.id, &m.props)?;
                            memo.insert(m.id.clone(), Some(m.clone()));
                        }
                    }
                    out.insert(id, m);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{index_entry, store_a as store};

    fn entry(manager: Option<&str>) -> IndexEntry {
        index_entry("t", manager)
    }

    fn tracked(facts: &[(&str, ManagerFact)]) -> Plan {
        Plan {
            mode: Mode::Tracked {
                overlay: facts
                    .iter()
                    .map(|(id, f)| (id.to_string(), f.clone()))
                    .collect(),
            },
            next_link: Some("link".into()),
            doubts: Vec::new(),
        }
    }

    /// A manager to read is carried to the next run only for users this run did not settle
    /// (out of scope, or failed), not read again at every run.
    #[test]
    fn an_unknown_manager_is_carried_only_for_users_not_settled() {
        let (_s, a) = store();
        for id in ["listed", "unlisted", "failed"] {
            a.put_user(id, &entry(Some("m"))).unwrap();
        }
        let plan = tracked(&[
            ("listed", ManagerFact::Unknown),
            ("unlisted", ManagerFact::Unknown),
            ("failed", ManagerFact::Unknown),
            ("never-indexed", ManagerFact::Unknown),
        ]);
        finish(&a, &plan, |id| id == "listed").unwrap();
        let doubted = |a: &IntegrationStore| {
            let mut ids: Vec<String> = a
                .manager_doubts()
                .unwrap()
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            ids.sort();
            ids
        };
        assert_eq!(doubted(&a), ["failed", "unlisted"]);
        assert_eq!(a.get_meta::<String>(LINK).unwrap().as_deref(), Some("link"));

        let mut next = tracked(&[("unlisted", ManagerFact::Unknown)]);
        next.doubts = a.manager_doubts().unwrap();
        finish(&a, &next, |id| id == "unlisted").unwrap();
        assert_eq!(doubted(&a), ["failed"]);
    }

    /// A doubt raised by the worker while a run reads is not settled by that run.
    #[test]
    fn a_doubt_raised_during_a_run_outlives_it() {
        let (_s, a) = store();
        a.put_user("r", &entry(Some("m"))).unwrap();
        a.doubt_managers(&["r".into()]).unwrap();
        let mut plan = tracked(&[("r", ManagerFact::Unknown)]);
        plan.doubts = a.manager_doubts().unwrap();
        a.doubt_managers(&["r".into()]).unwrap(); // the worker wrote r's link meanwhile
        finish(&a, &plan, |_| true).unwrap();
        assert_eq!(a.manager_doubts().unwrap().len(), 1);
        plan.doubts = a.manager_doubts().unwrap();
        finish(&a, &plan, |_| true).unwrap();
        assert!(a.manager_doubts().unwrap().is_empty());
    }

    /// What the delta round knew of a manager reaches the index, settled or not.
    #[test]
    fn a_known_manager_reaches_the_index() {
        let (_s, a) = store();
        a.put_user("r", &entry(Some("old"))).unwrap();
        finish(
            &a,
            &tracked(&[("r", ManagerFact::Known(Some("new".into())))]),
            |_| false,
        )
        .unwrap();
        assert_eq!(
            a.get_user("r").unwrap().unwrap().manager.as_deref(),
            Some("new")
        );
        assert_eq!(a.reports_of("new").unwrap(), ["r"]);
        assert!(a.reports_of("old").unwrap().is_empty());
    }
}
