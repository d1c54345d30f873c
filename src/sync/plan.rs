//! Plan and guard: pure functions from (desired state, index) to changes.
//!
//! Architecture invariant: this module does no I/O. It decides create / update / deactivate /
//! reactivate per user and whether a run may deactivate as many users as it would.

use std::collections::BTreeSet;

use super::mapping::{
    is_active, AttrChange, AttrValue, Desired, Record, ACTIVE, EXTERNAL_ID, MANAGER, USER_NAME,
};
use crate::config::DeactivationLimit;
use crate::store::IndexEntry;

// The change vocabulary lives in `model`, where the store reads it too.
pub use crate::model::change::{Action, GuardTrip, PlannedChange};

/// What is known about a user's manager when the user is planned.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum ManagerRef {
    /// No manager, or manager linking disabled.
    None,
    /// The manager is in the target with this id.
    Known(String),
    /// The manager is not in the target yet (may be created later in this run): leave the
    /// attribute as it is now and settle it in the manager pass.
    Deferred,
}

/// The record keys rostersync manages for a mapping (others in the target are never touched).
pub(crate) fn managed_keys<'a>(
    rule_keys: impl Iterator<Item = &'a str>,
    link_manager: bool,
) -> BTreeSet<String> {
    let mut keys: BTreeSet<String> = rule_keys.map(str::to_string).collect();
    keys.extend([USER_NAME, EXTERNAL_ID, ACTIVE].map(str::to_string));
    if link_manager {
        keys.insert(MANAGER.to_string());
    }
    keys
}

/// Attribute-level difference between two records.
pub(crate) fn diff(old: &Record, new: &Record) -> Vec<AttrChange> {
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let (o, n) = (old.get(k), new.get(k));
            (o != n).then(|| AttrChange {
                key: k.clone(),
                old: o.cloned(),
                new: n.cloned(),
            })
        })
        .collect()
}

/// Completes a desired record against what the target holds now (`current`, restricted to the
/// managed keys): `keep` attributes and a deferred manager keep their current values.
pub(crate) fn desired_record(
    d: &Desired,
    manager: &ManagerRef,
    current: Option<&Record>,
) -> Record {
    let mut record = d.record.clone();
    for k in &d.keep {
        match current.and_then(|c| c.get(k)) {
            Some(v) => record.insert(k.clone(), v.clone()),
            None => record.remove(k),
        };
    }
    match manager {
        ManagerRef::Known(id) => {
            record.insert(MANAGER.into(), AttrValue::Str(id.clone()));
        }
        ManagerRef::None => {
            record.remove(MANAGER);
        }
        ManagerRef::Deferred => match current.and_then(|c| c.get(MANAGER)) {
            Some(v) => {
                record.insert(MANAGER.into(), v.clone());
            }
            None => {
                record.remove(MANAGER);
            }
        },
    }
    record
}

/// Plans one group member. `existing` is the user's index entry with its record already
/// restricted to the managed keys. Returns `None` when nothing changes.
#[cfg(test)]
pub(crate) fn plan_member(
    d: &Desired,
    existing: Option<&IndexEntry>,
    manager: &ManagerRef,
) -> Option<PlannedChange> {
    plan_member_with(d, existing, manager, true)
}

/// [`plan_member`]; `create_diff` = false leaves a create's `changes` empty (they repeat its
/// record, and only a plan that is shown uses them: a reconcile that applies drops them).
pub(crate) fn plan_member_with(
    d: &Desired,
    existing: Option<&IndexEntry>,
    manager: &ManagerRef,
    create_diff: bool,
) -> Option<PlannedChange> {
    let record = desired_record(d, manager, existing.map(|e| &e.record));
    match existing {
        None => {
            if !is_active(&record) {
                // A disabled member that was never provisioned is not created.
                return None;
            }
            let changes = if create_diff {
                record
                    .iter()
                    .map(|(k, v)| AttrChange {
                        key: k.clone(),
                        old: None,
                        new: Some(v.clone()),
                    })
                    .collect()
            } else {
                Vec::new()
            };
            Some(PlannedChange {
                action: Action::Create,
                entra_id: d.entra_id.clone(),
                user_name: d.user_name.clone(),
                target_id: None,
                changes,
                reason: None,
                record,
                manager: d.manager_entra_id.clone(),
                linked: existing.is_some_and(|e| e.linked),
            })
        }
        Some(e) => {
            let changes = diff(&e.record, &record);
            if changes.is_empty() {
                return None;
            }
            let (was, is) = (is_active(&e.record), is_active(&record));
            let (action, reason) = match (was, is) {
                (true, false) => (
                    Action::Deactivate,
                    Some("disabled in Entra (accountEnabled = false)".to_string()),
                ),
                (false, true) => (
                    Action::Reactivate,
                    Some("member again and enabled".to_string()),
                ),
                _ => (Action::Update, None),
            };
            Some(PlannedChange {
                action,
                entra_id: d.entra_id.clone(),
                user_name: d.user_name.clone(),
                target_id: Some(e.target_id.clone()),
                changes,
                reason,
                record,
                manager: d.manager_entra_id.clone(),
                linked: existing.is_some_and(|e| e.linked),
            })
        }
    }
}

/// Plans the deactivation of an indexed user that is no longer in any configured group.
pub(crate) fn plan_departure(entra_id: &str, e: &IndexEntry) -> Option<PlannedChange> {
    if !e.active() {
        return None;
    }
    let mut record = e.record.clone();
    record.insert(ACTIVE.into(), AttrValue::Bool(false));
    Some(PlannedChange {
        action: Action::Deactivate,
        entra_id: entra_id.to_string(),
        user_name: e.user_name.clone(),
        target_id: Some(e.target_id.clone()),
        changes: vec![AttrChange {
            key: ACTIVE.into(),
            old: Some(AttrValue::Bool(true)),
            new: Some(AttrValue::Bool(false)),
        }],
        reason: Some(
            "no longer a member of any configured group (removed, or deleted in Entra)".into(),
        ),
        record,
        manager: e.manager.clone(),
        linked: e.linked,
    })
}

/// The mass-deactivation guard over a rolling window. `used`: deactivations already written
/// in the window (by any path); `active_now`: users active in the index now; `tripped`: an
/// earlier trip still holds (nothing more is deactivated until it is cleared or expires).
pub(crate) fn guard(
    would_deactivate: u64,
    active_now: u64,
    used: u64,
    limit: DeactivationLimit,
    allow: bool,
    tripped: bool,
) -> Result<(), GuardTrip> {
    if allow || would_deactivate == 0 {
        return Ok(());
    }
    // The budget is a share of those active when the window began.
    let base = active_now.saturating_add(used);
    let allowed = limit.allowed(base);
    if !tripped && used.saturating_add(would_deactivate) <= allowed {
        return Ok(());
    }
    Err(GuardTrip {
        would_deactivate,
        allowed,
        active_before: base,
        limit: limit.to_string(),
        used,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn s(v: &str) -> AttrValue {
        AttrValue::Str(v.into())
    }

    fn desired(title: Option<&str>, enabled: bool) -> Desired {
        let mut record = Record::new();
        record.insert(USER_NAME.into(), s("ada@x"));
        record.insert(EXTERNAL_ID.into(), s("u1"));
        record.insert(ACTIVE.into(), AttrValue::Bool(enabled));
        if let Some(t) = title {
            record.insert("title".into(), s(t));
        }
        Desired {
            entra_id: "u1".into(),
            user_name: "ada@x".into(),
            record,
            manager_entra_id: Some("m1".into()),
            keep: BTreeSet::new(),
        }
    }

    fn entry(d: &Desired, manager: Option<&str>) -> IndexEntry {
        let mut record = d.record.clone();
        if let Some(m) = manager {
            record.insert(MANAGER.into(), s(m));
        }
        IndexEntry {
            target_id: "t1".into(),
            user_name: d.user_name.clone(),
            record,
            manager: d.manager_entra_id.clone(),
            linked: false,
            updated_at: Utc::now(),
            trace: None,
        }
    }

    #[test]
    fn new_member_is_created_and_unchanged_member_costs_nothing() {
        let d = desired(Some("Engineer"), true);
        let p = plan_member(&d, None, &ManagerRef::Known("tm".into())).unwrap();
        assert_eq!(p.action, Action::Create);
        assert_eq!(p.record[MANAGER], s("tm"));
        let e = entry(&d, Some("tm"));
        assert_eq!(
            plan_member(&d, Some(&e), &ManagerRef::Known("tm".into())),
            None
        );
        assert_eq!(
            plan_member(&desired(None, false), None, &ManagerRef::None),
            None,
            "disabled never-provisioned users are not created"
        );
    }

    #[test]
    fn only_changed_fields_are_updated() {
        let before = desired(Some("Engineer"), true);
        let e = entry(&before, Some("tm"));
        let p = plan_member(
            &desired(Some("Lead"), true),
            Some(&e),
            &ManagerRef::Known("tm".into()),
        )
        .unwrap();
        assert_eq!(p.action, Action::Update);
        assert_eq!(
            p.changes,
            vec![AttrChange {
                key: "title".into(),
                old: Some(s("Engineer")),
                new: Some(s("Lead"))
            }]
        );
        let p = plan_member(
            &desired(None, true),
            Some(&e),
            &ManagerRef::Known("tm".into()),
        )
        .unwrap();
        assert_eq!(
            p.changes[0].new, None,
            "an emptied source clears the attribute"
        );
    }

    #[test]
    fn disable_and_re_enable_are_deactivate_and_reactivate() {
        let d = desired(Some("E"), true);
        let e = entry(&d, None);
        let p = plan_member(&desired(Some("E"), false), Some(&e), &ManagerRef::None).unwrap();
        assert_eq!(p.action, Action::Deactivate);
        let mut gone = e.clone();
        gone.record.insert(ACTIVE.into(), AttrValue::Bool(false));
        let p = plan_member(&d, Some(&gone), &ManagerRef::None).unwrap();
        assert_eq!(p.action, Action::Reactivate);
        let p = plan_departure("u1", &e).unwrap();
        assert_eq!(p.action, Action::Deactivate);
        assert_eq!(p.changes.len(), 1);
        assert_eq!(
            plan_departure("u1", &gone),
            None,
            "already inactive users are left alone"
        );
    }

    #[test]
    fn keep_policy_and_deferred_manager_keep_current_values() {
        let mut d = desired(None, true);
        d.keep.insert("title".into());
        let mut e = entry(&desired(Some("Hand-set"), true), Some("old-mgr"));
        e.record.insert("title".into(), s("Hand-set"));
        assert_eq!(plan_member(&d, Some(&e), &ManagerRef::Deferred), None);
        let p = plan_member(&d, Some(&e), &ManagerRef::None).unwrap();
        assert_eq!(
            p.changes,
            vec![AttrChange {
                key: MANAGER.into(),
                old: Some(s("old-mgr")),
                new: None
            }]
        );
    }

    #[test]
    fn guard_counts_and_percentages() {
        let pct = DeactivationLimit::Percent(10.0);
        assert!(guard(10, 100, 0, pct, false, false).is_ok());
        let trip = guard(11, 100, 0, pct, false, false).unwrap_err();
        assert_eq!(trip.allowed, 10);
        assert!(trip.to_string().contains("--allow-mass-deactivation"));
        assert!(trip.to_string().contains("queue replay"));
        assert!(guard(11, 100, 0, pct, true, false).is_ok());
        assert!(guard(3, 5, 0, DeactivationLimit::Count(2), false, false).is_err());
    }

    #[test]
    fn the_guard_budget_holds_over_the_window() {
        let limit = DeactivationLimit::Count(25);
        // Five batches of 20, one after another: the second one trips.
        assert!(guard(20, 250, 0, limit, false, false).is_ok());
        let trip = guard(20, 230, 20, limit, false, false).unwrap_err();
        assert_eq!((trip.used, trip.allowed, trip.active_before), (20, 25, 250));
        assert!(trip.to_string().contains("already deactivated"), "{trip}");
        // Once tripped, even a batch within the budget is held.
        assert!(guard(3, 230, 20, limit, false, true).is_err());
        assert!(guard(3, 230, 20, limit, false, false).is_ok());
        // A percentage is of those active when the window began.
        let pct = DeactivationLimit::Percent(10.0);
        assert!(guard(10, 90, 10, pct, false, false).is_err());
        assert!(guard(5, 95, 5, pct, false, false).is_ok());
        assert!(
            guard(0, 0, 500, pct, false, true).is_ok(),
            "nothing to hold"
        );
    }
}
