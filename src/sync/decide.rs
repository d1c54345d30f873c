//! The one decision: what the LMS should hold for one user, given what is known about them.
//!
//! The full reconcile, the incremental worker and `sync-user` each gather [`Facts`] their own
//! way (a page of the member listing, a notification and a Graph read, Graph's `memberOf`) and
//! then call [`decide`]; none of them decides anything itself. What differs between them is
//! only how good their facts are, and that is part of the facts:
//!
//! * **Membership** is `Member` or `NotMember` (when Graph cannot say, nothing is decided). A member comes
//!   from a listing, a delta round or Graph's answer; "not a member" from a complete listing,
//!   the worker's membership mirror, or `checkMemberGroups`.
//! * **Confirmed** facts were read from Graph just now, to confirm a deactivation: the user
//!   (`GET /users/{id}`, or its second 404 some seconds after the first), its manager and its
//!   transitive membership (`checkMemberGroups`). A deactivation is only ever decided on
//!   confirmed facts; on others the verdict is [`Verdict::Confirm`], and the caller reads again
//!   and decides again. So a local mirror can say whom to look at, never alone whom to
//!   deactivate, and a change undone while a batch ran is not written.
//!
//! Architecture invariant: this module does no I/O and keeps no state.

use super::mapping::{Desired, MapFailure, Record};
use super::plan::{self, Action, ManagerRef, PlannedChange};
use super::trace::OutOfScope;
use crate::graph::models::GraphUser;
use crate::store::IndexEntry;

/// What Graph says of the user.
#[derive(Clone, Copy, Debug)]
pub(crate) enum UserFact<'a> {
    /// Graph has the user; `mapped` is what the mapping made of it (and of its manager).
    Present {
        user: &'a GraphUser,
        mapped: Result<&'a Desired, &'a MapFailure>,
    },
    /// Graph does not have the user: `deleted` when a read answered 404 (deleted or
    /// soft-deleted), otherwise a complete listing of the groups did not list it.
    Gone { deleted: bool },
}

/// Whether the user is a member of a configured group (directly or through nested groups).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Membership {
    Member,
    NotMember,
}

/// Everything [`decide`] looks at.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Facts<'a> {
    pub user: UserFact<'a>,
    pub membership: Membership,
    /// `user` and `membership` were read from Graph just now to confirm a deactivation.
    pub confirmed: bool,
    /// The user's index entry (what rostersync last applied), record cut to the managed keys.
    pub existing: Option<&'a IndexEntry>,
    /// The manager's LMS id as far as it is known (see [`ManagerRef`]).
    pub manager: &'a ManagerRef,
}

/// What is to be done.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Verdict {
    /// The LMS is as it should be. `remember_manager`: the index should still learn the user's
    /// current manager (nothing to send; the index finds a manager's reports by it).
    Unchanged { remember_manager: bool },
    /// A disabled member that was never in the LMS: not created.
    Skip,
    /// The user cannot be mapped (a per-user failure).
    Fail(String),
    /// A deactivation would follow, but the facts are not Graph's fresh word: read the user
    /// and its membership again and decide again.
    Confirm,
    /// Write this change.
    Change(PlannedChange),
}

/// The decision with what its trace needs.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Decision {
    pub verdict: Verdict,
    /// Why the user is not (or no longer) in scope; `None` for an enabled member.
    pub out: Option<OutOfScope>,
    /// The mapped record (managed keys, manager link resolved), when the user was mapped.
    pub mapped: Option<Record>,
}

impl Decision {
    fn of(verdict: Verdict, out: Option<OutOfScope>) -> Decision {
        Decision {
            verdict,
            out,
            mapped: None,
        }
    }

    /// The change to write, if any.
    pub(crate) fn change(&self) -> Option<&PlannedChange> {
        match &self.verdict {
            Verdict::Change(c) => Some(c),
            _ => None,
        }
    }
}

/// Whether Graph says the account is disabled (`accountEnabled = false`).
pub(crate) fn account_disabled(u: &GraphUser) -> bool {
    u.props.get("accountEnabled").and_then(|v| v.as_bool()) == Some(false)
}

/// The wording of a deactivation, by its cause.
fn departure_reason(out: OutOfScope) -> &'static str {
    match out {
        OutOfScope::Disabled => "disabled in Entra (accountEnabled = false)",
        OutOfScope::Deleted => "deleted in Entra (or soft-deleted)",
        OutOfScope::LeftAllGroups | OutOfScope::NotMember => {
            "no longer a member of any configured group (removed, or deleted in Entra)"
        }
    }
}

/// A deactivation of `e` for `out`: written on confirmed facts, otherwise to be confirmed.
fn deactivate(f: &Facts<'_>, entra_id: &str, e: &IndexEntry, out: OutOfScope) -> Verdict {
    if !f.confirmed {
        return Verdict::Confirm;
    }
    match plan::plan_departure(entra_id, e) {
        Some(mut c) => {
            c.reason = Some(departure_reason(out).into());
            Verdict::Change(c)
        }
        None => Verdict::Unchanged {
            remember_manager: false,
        },
    }
}

/// Decides for one user (`entra_id`). `show_create`: a create lists every attribute as its
/// changes (only a plan that is shown needs them).
pub(crate) fn decide(entra_id: &str, f: &Facts<'_>, show_create: bool) -> Decision {
    let unchanged = Verdict::Unchanged {
        remember_manager: false,
    };
    match (f.user, f.membership) {
        (UserFact::Present { user, mapped }, Membership::Member) => {
            let disabled = account_disabled(user);
            let out = disabled.then_some(OutOfScope::Disabled);
            match mapped {
                Ok(d) => {
                    let record = plan::desired_record(d, f.manager, f.existing.map(|e| &e.record));
                    let change = plan::plan_member_with(d, f.existing, f.manager, show_create);
                    let verdict = match change {
                        None if f.existing.is_none() => Verdict::Skip,
                        None => Verdict::Unchanged {
                            remember_manager: f
                                .existing
                                .is_some_and(|e| e.manager != d.manager_entra_id),
                        },
                        Some(c) if c.action == Action::Deactivate && !f.confirmed => {
                            Verdict::Confirm
                        }
                        Some(mut c) => {
                            if c.action == Action::Deactivate {
                                c.reason = Some(departure_reason(OutOfScope::Disabled).into());
                            }
                            Verdict::Change(c)
                        }
                    };
                    Decision {
                        verdict,
                        out,
                        mapped: Some(record),
                    }
                }
                // A disabled account that can no longer be mapped (its mailbox removed at
                // offboarding, say) must still be deactivated.
                Err(fail) => match f.existing {
                    Some(e) if disabled && e.active() => {
                        Decision::of(deactivate(f, entra_id, e, OutOfScope::Disabled), out)
                    }
                    Some(_) if disabled => Decision::of(unchanged, out),
                    _ => Decision::of(Verdict::Fail(format!("cannot be mapped: {}", fail.0)), out),
                },
            }
        }
        (UserFact::Present { .. }, Membership::NotMember) => match f.existing {
            Some(e) if e.active() => Decision::of(
                deactivate(f, entra_id, e, OutOfScope::LeftAllGroups),
                Some(OutOfScope::LeftAllGroups),
            ),
            Some(_) => Decision::of(unchanged, Some(OutOfScope::LeftAllGroups)),
            None => Decision::of(unchanged, Some(OutOfScope::NotMember)),
        },
        (UserFact::Gone { deleted }, _) => {
            let out = if deleted {
                OutOfScope::Deleted
            } else {
                OutOfScope::LeftAllGroups
            };
            match f.existing {
                Some(e) if e.active() => Decision::of(deactivate(f, entra_id, e, out), Some(out)),
                Some(_) => Decision::of(unchanged, Some(out)),
                None => Decision::of(unchanged, Some(out)),
            }
        }
    }
}

/// Whether the verdict changes whether (or as whom) the user is in the LMS: a create, a
/// reactivation, a deactivation. The user's direct reports then need their manager link
/// looked at again.
pub(crate) fn changes_presence(c: &PlannedChange, before: Option<&IndexEntry>) -> bool {
    match c.action {
        Action::Create | Action::Reactivate | Action::Deactivate => true,
        Action::Update => before.is_some_and(|e| Some(&e.target_id) != c.target_id.as_ref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::mapping::{AttrValue, ACTIVE, EXTERNAL_ID, MANAGER, USER_NAME};
    use chrono::Utc;
    use serde_json::json;
    use std::collections::BTreeSet;

    fn user(enabled: bool) -> GraphUser {
        GraphUser::from_value(json!({"id": "u1", "userPrincipalName": "ada@x",
            "accountEnabled": enabled}))
        .unwrap()
    }

    fn desired(title: &str, enabled: bool, manager: Option<&str>) -> Desired {
        let mut record = Record::new();
        record.insert(USER_NAME.into(), AttrValue::Str("ada@x".into()));
        record.insert(EXTERNAL_ID.into(), AttrValue::Str("u1".into()));
        record.insert(ACTIVE.into(), AttrValue::Bool(enabled));
        record.insert("title".into(), AttrValue::Str(title.into()));
        Desired {
            entra_id: "u1".into(),
            user_name: "ada@x".into(),
            record,
            manager_entra_id: manager.map(str::to_string),
            keep: BTreeSet::new(),
        }
    }

    fn entry(title: &str, active: bool, manager: Option<&str>, link: Option<&str>) -> IndexEntry {
        let mut record = desired(title, active, manager).record;
        if let Some(l) = link {
            record.insert(MANAGER.into(), AttrValue::Str(l.into()));
        }
        IndexEntry {
            target_id: "t1".into(),
            user_name: "ada@x".into(),
            record,
            manager: manager.map(str::to_string),
            linked: false,
            updated_at: Utc::now(),
            trace: None,
        }
    }

    /// One row of the decision table.
    struct Row {
        name: &'static str,
        user: Option<(bool, Result<Desired, MapFailure>)>,
        deleted: bool,
        membership: Membership,
        confirmed: bool,
        existing: Option<IndexEntry>,
        manager: ManagerRef,
        want: Want,
        out: Option<OutOfScope>,
    }

    #[derive(Debug, PartialEq)]
    enum Want {
        Unchanged,
        Remember,
        Skip,
        Fail,
        Confirm,
        Act(Action),
    }

    fn run(r: &Row) -> Decision {
        let g = r.user.as_ref().map(|(en, _)| user(*en));
        let fact = match (&g, &r.user) {
            (Some(u), Some((_, m))) => UserFact::Present {
                user: u,
                mapped: m.as_ref(),
            },
            _ => UserFact::Gone { deleted: r.deleted },
        };
        decide(
            "u1",
            &Facts {
                user: fact,
                membership: r.membership,
                confirmed: r.confirmed,
                existing: r.existing.as_ref(),
                manager: &r.manager,
            },
            true,
        )
    }

    fn want_of(d: &Decision) -> Want {
        match &d.verdict {
            Verdict::Unchanged {
                remember_manager: false,
            } => Want::Unchanged,
            Verdict::Unchanged {
                remember_manager: true,
            } => Want::Remember,
            Verdict::Skip => Want::Skip,
            Verdict::Fail(_) => Want::Fail,
            Verdict::Confirm => Want::Confirm,
            Verdict::Change(c) => Want::Act(c.action),
        }
    }

    fn row(name: &'static str) -> Row {
        Row {
            name,
            user: Some((true, Ok(desired("Eng", true, None)))),
            deleted: false,
            membership: Membership::Member,
            confirmed: false,
            existing: None,
            manager: ManagerRef::None,
            want: Want::Act(Action::Create),
            out: None,
        }
    }

    #[test]
    fn decision_table() {
        use Want::*;
        let unmappable = || Err(MapFailure("has no mail".into()));
        let rows = vec![
            Row {
                want: Act(Action::Create),
                ..row("new enabled member is created")
            },
            Row {
                user: Some((false, Ok(desired("Eng", false, None)))),
                want: Skip,
                out: Some(OutOfScope::Disabled),
                ..row("disabled member never provisioned is skipped")
            },
            Row {
                existing: Some(entry("Eng", true, None, None)),
                want: Unchanged,
                ..row("unchanged member costs nothing")
            },
            Row {
                existing: Some(entry("Old", true, None, None)),
                want: Act(Action::Update),
                ..row("changed attribute is updated")
            },
            Row {
                existing: Some(entry("Eng", false, None, None)),
                want: Act(Action::Reactivate),
                ..row("member again is reactivated without confirmation")
            },
            Row {
                user: Some((false, Ok(desired("Eng", false, None)))),
                existing: Some(entry("Eng", true, None, None)),
                want: Confirm,
                out: Some(OutOfScope::Disabled),
                ..row("disabled member: deactivation waits for Graph's fresh word")
            },
            Row {
                user: Some((false, Ok(desired("Eng", false, None)))),
                existing: Some(entry("Eng", true, None, None)),
                confirmed: true,
                want: Act(Action::Deactivate),
                out: Some(OutOfScope::Disabled),
                ..row("disabled member, confirmed: deactivated")
            },
            Row {
                user: Some((false, unmappable())),
                existing: Some(entry("Eng", true, None, None)),
                confirmed: true,
                want: Act(Action::Deactivate),
                out: Some(OutOfScope::Disabled),
                ..row("disabled and unmappable, confirmed: still deactivated")
            },
            Row {
                user: Some((false, unmappable())),
                existing: Some(entry("Eng", true, None, None)),
                want: Confirm,
                out: Some(OutOfScope::Disabled),
                ..row("disabled and unmappable: confirmation first")
            },
            Row {
                user: Some((true, unmappable())),
                existing: Some(entry("Eng", true, None, None)),
                want: Fail,
                ..row("enabled and unmappable fails")
            },
            Row {
                user: Some((false, unmappable())),
                want: Fail,
                out: Some(OutOfScope::Disabled),
                ..row("disabled, unmappable, never provisioned fails (as it always did)")
            },
            Row {
                membership: Membership::NotMember,
                existing: Some(entry("Eng", true, None, None)),
                want: Confirm,
                out: Some(OutOfScope::LeftAllGroups),
                ..row("left per the mirror or the listing: not yet a deactivation")
            },
            Row {
                membership: Membership::NotMember,
                confirmed: true,
                existing: Some(entry("Eng", true, None, None)),
                want: Act(Action::Deactivate),
                out: Some(OutOfScope::LeftAllGroups),
                ..row("left, confirmed by checkMemberGroups: deactivated")
            },
            Row {
                membership: Membership::NotMember,
                confirmed: true,
                existing: Some(entry("Eng", false, None, None)),
                want: Unchanged,
                out: Some(OutOfScope::LeftAllGroups),
                ..row("left and already inactive: nothing")
            },
            Row {
                membership: Membership::NotMember,
                want: Unchanged,
                out: Some(OutOfScope::NotMember),
                ..row("someone else in the tenant: nothing")
            },
            Row {
                user: None,
                deleted: true,
                existing: Some(entry("Eng", true, None, None)),
                want: Confirm,
                out: Some(OutOfScope::Deleted),
                ..row("a single 404 is weak evidence")
            },
            Row {
                user: None,
                deleted: true,
                confirmed: true,
                existing: Some(entry("Eng", true, None, None)),
                want: Act(Action::Deactivate),
                out: Some(OutOfScope::Deleted),
                ..row("a second 404: deactivated")
            },
            Row {
                user: None,
                deleted: false,
                membership: Membership::NotMember,
                existing: Some(entry("Eng", true, None, None)),
                want: Confirm,
                out: Some(OutOfScope::LeftAllGroups),
                ..row("not listed by a complete reconcile: confirm before deactivating")
            },
            Row {
                user: None,
                deleted: true,
                confirmed: true,
                want: Unchanged,
                out: Some(OutOfScope::Deleted),
                ..row("deleted and never synced: nothing")
            },
            Row {
                user: Some((true, Ok(desired("Eng", true, Some("m1"))))),
                existing: Some(entry("Eng", true, Some("m1"), None)),
                manager: ManagerRef::Known("tm1".into()),
                want: Act(Action::Update),
                ..row("a manager who is now in the LMS gets linked")
            },
            Row {
                user: Some((true, Ok(desired("Eng", true, Some("m1"))))),
                existing: Some(entry("Eng", true, Some("m1"), Some("tm1"))),
                manager: ManagerRef::None,
                want: Act(Action::Update),
                ..row("a manager who left scope loses the link")
            },
            Row {
                user: Some((true, Ok(desired("Eng", true, Some("m1"))))),
                existing: Some(entry("Eng", true, Some("m1"), Some("tm1"))),
                manager: ManagerRef::Deferred,
                want: Unchanged,
                ..row("a manager not settled yet keeps the current link")
            },
            Row {
                user: Some((true, Ok(desired("Eng", true, Some("m2"))))),
                existing: Some(entry("Eng", true, Some("m1"), None)),
                manager: ManagerRef::None,
                want: Remember,
                ..row("a new manager outside the LMS: nothing to send, the index learns it")
            },
        ];
        for r in &rows {
            let d = run(r);
            assert_eq!(want_of(&d), r.want, "{}: {d:?}", r.name);
            assert_eq!(d.out, r.out, "{}: out", r.name);
        }
    }

    #[test]
    fn deactivation_reasons_name_the_cause() {
        let e = entry("Eng", true, None, None);
        let none = ManagerRef::None;
        let gone = decide(
            "u1",
            &Facts {
                user: UserFact::Gone { deleted: true },
                membership: Membership::NotMember,
                confirmed: true,
                existing: Some(&e),
                manager: &none,
            },
            false,
        );
        let c = gone.change().unwrap();
        assert!(c.reason.as_deref().unwrap().contains("deleted"), "{c:?}");
        assert_eq!(c.changes.len(), 1, "only active changes: {c:?}");
        let d = desired("Eng", false, None);
        let u = user(false);
        let disabled = decide(
            "u1",
            &Facts {
                user: UserFact::Present {
                    user: &u,
                    mapped: Ok(&d),
                },
                membership: Membership::Member,
                confirmed: true,
                existing: Some(&e),
                manager: &none,
            },
            false,
        );
        assert!(disabled
            .change()
            .unwrap()
            .reason
            .as_deref()
            .unwrap()
            .contains("accountEnabled"));
    }

    #[test]
    fn presence_changes_are_creates_reactivations_deactivations_and_relinks() {
        let e = entry("Eng", true, None, None);
        let mut c = plan::plan_departure("u1", &e).unwrap();
        assert!(changes_presence(&c, Some(&e)));
        c.action = Action::Update;
        assert!(!changes_presence(&c, Some(&e)));
        c.target_id = Some("t2".into());
        assert!(changes_presence(&c, Some(&e)), "a new LMS id is a relink");
    }
}
