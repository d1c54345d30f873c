//! The incremental path decides as the full reconcile does: one regression test for each way
//! it used not to, driven as a tenant would drive it (changes in the Graph simulator,
//! notifications posted to the real `serve`, the LMS checked against the directory).

use std::collections::HashSet;
use std::time::Duration;

use crate::common::serve::*;
use crate::common::{upn, ENTERPRISE};
use rostersync::app::Integration;
use rostersync::store::queue::Hint;
use rostersync::sync::reconcile::{RunOptions, RunOutcome};
use rostersync_sim::graph::{NotifyFaults, SimUser};
use rostersync_sim::scim::{ScimFaults, UserFault, UserFaultKind};

/// Users that are direct members of the main group only (not also in the nested one).
fn direct_only(s: &Served, n: usize) -> Vec<String> {
    let env = &s.env;
    let nested = env.graph.group(&env.fx.nested_group_id).unwrap();
    let main = env.graph.group(&env.fx.all_group_id).unwrap();
    main.members
        .iter()
        .filter(|m| {
            !nested.members.contains(m)
                && *m != &env.fx.nested_group_id
                && env.graph.user(m).is_some_and(|u| u.account_enabled)
        })
        .take(n)
        .cloned()
        .collect()
}

/// Watches the LMS every few milliseconds while `f` runs and returns the users it ever saw
/// inactive among `watched`.
async fn never_inactive<F: std::future::Future<Output = ()>>(
    s: &Served,
    watched: &[String],
    f: F,
) -> HashSet<String> {
    let done = std::cell::Cell::new(false);
    let mut seen = HashSet::new();
    let work = async {
        f.await;
        done.set(true);
    };
    let sample = async {
        while !done.get() {
            for id in watched {
                if active(&s.env, id) == Some(false) {
                    seen.insert(id.clone());
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::join!(work, sample);
    seen
}

/// A reconcile on serve's own store right now writes nothing to the LMS.
async fn reconcile_writes_nothing(s: &Served) {
    let i = Integration::build(&s.env.integration.cfg, &s.store).unwrap();
    let before = s.env.writes();
    let r = i.reconcile(RunOptions::default(), None).await;
    assert!(
        matches!(r.outcome, RunOutcome::Ok),
        "{:?} {:?}",
        r.error,
        r.failures
    );
    assert_eq!(
        s.env.writes() - before,
        0,
        "a reconcile after the incremental path wrote {:?}",
        r.changes
    );
}

/// A manager outside the groups who is hired into them becomes the manager of the reports
/// already in the LMS, in the same pass, without waiting for a reconcile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manager_hired_into_the_groups_becomes_the_manager_of_their_reports() {
    let s = start(40, "").await;
    let env = &s.env;
    let ceo = env.fx.ceo_id.clone();
    let reports: Vec<String> = env
        .member_ids()
        .into_iter()
        .filter(|id| env.graph.user(id).unwrap().manager_id.as_deref() == Some(ceo.as_str()))
        .collect();
    assert!(!reports.is_empty(), "the fixture's CEO manages members");
    for r in &reports {
        assert!(lms(env, r).unwrap()[ENTERPRISE].get("manager").is_none());
    }
    // Into the nested group: the membership round finds them; the reports follow.
    env.graph.add_member(&env.fx.nested_group_id, &ceo);
    let ceo_lms = || lms(env, &ceo).and_then(|u| u["id"].as_str().map(str::to_string));
    wait_for("the manager's reports linked", 5_000, || {
        let Some(t) = ceo_lms() else { return false };
        reports.iter().all(|r| {
            lms(env, r).unwrap()[ENTERPRISE]["manager"]["value"].as_str() == Some(t.as_str())
        })
    })
    .await;
    wait_for("queue drained", 5_000, || s.integ_store().queue_len() == 0).await;
    reconcile_writes_nothing(&s).await;

    // Leaving scope again: the reports lose the link, keep the manager's name and mail.
    env.graph.remove_member(&env.fx.nested_group_id, &ceo);
    wait_for("the links removed", 8_000, || {
        reports
            .iter()
            .all(|r| lms(env, r).unwrap()[ENTERPRISE].get("manager").is_none())
    })
    .await;
    let one = lms(env, &reports[0]).unwrap();
    assert!(one[rostersync::config::DEFAULT_CUSTOM_SCHEMA]["managerEmail"].is_string());
    wait_for("queue drained", 5_000, || s.integ_store().queue_len() == 0).await;
    reconcile_writes_nothing(&s).await;
    s.stop().await;
}

/// A manager deleted and then restored from the deleted items: while gone, the reports lose
/// the link (Graph no longer names a manager for them); restored, Graph gives the reports
/// their manager again but notifies only about the manager, and the reports follow at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reports_get_their_manager_back_when_it_is_restored() {
    let s = start(30, "").await;
    let env = &s.env;
    let boss = direct_only(&s, 1).remove(0);
    let reports = [
        new_user(1, Some(boss.clone())),
        new_user(2, Some(boss.clone())),
    ];
    for r in &reports {
        env.graph.upsert_user(r.clone());
    }
    env.graph.add_member(&env.fx.all_group_id, &reports[0].id);
    env.graph
        .add_member(&env.fx.nested_group_id, &reports[1].id);
    let custom = rostersync::config::DEFAULT_CUSTOM_SCHEMA;
    let boss_mail = env.graph.user(&boss).unwrap().mail;
    let linked = |to: Option<&str>| {
        reports.iter().all(|r| {
            lms(env, &r.id).is_some_and(|u| {
                u[ENTERPRISE]["manager"]["value"].as_str() == to
                    && (to.is_none() || u[custom]["managerEmail"].as_str() == boss_mail.as_deref())
            })
        })
    };
    let boss_lms = lms(env, &boss).unwrap()["id"].as_str().unwrap().to_string();
    wait_for("the hires linked to their manager", 5_000, || {
        linked(Some(&boss_lms))
    })
    .await;

    assert!(env.graph.soft_delete_user(&boss));
    wait_for(
        "the deleted manager deactivated and unlinked",
        15_000,
        || active(env, &boss) == Some(false) && linked(None),
    )
    .await;
    wait_for("queue drained", 5_000, || s.integ_store().queue_len() == 0).await;

    assert!(env.graph.restore_user(&boss));
    wait_for("the restored manager linked again", 8_000, || {
        active(env, &boss) == Some(true) && linked(Some(&boss_lms))
    })
    .await;
    wait_for("queue drained", 5_000, || s.integ_store().queue_len() == 0).await;
    reconcile_writes_nothing(&s).await;
    s.stop().await;
}

/// A user hired while their manager is in the deleted items is written with no manager (Graph
/// names none); when the manager is restored, Graph gives them their manager again but
/// notifies only about the manager, and no link of the store pointed from the hire to it:
/// the manager's direct reports, read when it is back, find the hire.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hire_made_while_the_manager_was_deleted_is_linked_when_it_is_restored() {
    let s = start(30, "").await;
    let env = &s.env;
    let boss = direct_only(&s, 1).remove(0);
    let boss_lms = lms(env, &boss).unwrap()["id"].as_str().unwrap().to_string();
    assert!(env.graph.soft_delete_user(&boss));
    wait_for("the deleted manager deactivated", 15_000, || {
        active(env, &boss) == Some(false)
    })
    .await;

    let hire = new_user(1, Some(boss.clone()));
    env.graph.upsert_user(hire.clone());
    env.graph.add_member(&env.fx.all_group_id, &hire.id);
    wait_for("the hire created with no manager", 8_000, || {
        lms(env, &hire.id).is_some_and(|u| u[ENTERPRISE]["manager"]["value"].is_null())
    })
    .await;
    wait_for("queue drained", 5_000, || s.integ_store().queue_len() == 0).await;

    assert!(env.graph.restore_user(&boss));
    wait_for("the hire linked to the restored manager", 8_000, || {
        active(env, &boss) == Some(true)
            && lms(env, &hire.id).is_some_and(|u| {
                u[ENTERPRISE]["manager"]["value"].as_str() == Some(boss_lms.as_str())
            })
    })
    .await;
    wait_for("queue drained", 5_000, || s.integ_store().queue_len() == 0).await;
    reconcile_writes_nothing(&s).await;
    s.stop().await;
}

/// A member soft-deleted while a reconcile lists the groups is dropped from the membership
/// mirror (listings hide soft-deleted users); restored, it comes back with no membership
/// change in group delta (which never hid it), so only its own notifications say anything:
/// Graph is asked whether it is a member rather than they are ignored as a stranger's. (The
/// race of differential seed 1362, where the restore came before the worker's look at the
/// dropped member, is that seed's to replay.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_restored_after_a_reconcile_listed_it_as_gone_is_synced_again() {
    let s = start(30, "").await;
    let env = &s.env;
    let hire = SimUser {
        account_enabled: false,
        ..new_user(1, None)
    };
    env.graph.upsert_user(hire.clone());
    env.graph.add_member(&env.fx.all_group_id, &hire.id);
    wait_for("queue drained", 8_000, || s.integ_store().queue_len() == 0).await;
    assert!(lms(env, &hire.id).is_none(), "disabled: not created");

    // Its notifications arrive only once it is back (no 404 is ever read).
    env.graph.pause_delivery(true);
    assert!(env.graph.soft_delete_user(&hire.id));
    // Lists the groups while the member is soft-deleted.
    let i = Integration::build(&s.env.integration.cfg, &s.store).unwrap();
    let r = i.reconcile(RunOptions::default(), None).await;
    assert!(matches!(r.outcome, RunOutcome::Ok), "{:?}", r.error);
    assert!(
        !s.integ_store()
            .is_direct_member(&env.fx.all_group_id, &hire.id)
            .unwrap(),
        "the listing hid the soft-deleted member"
    );
    assert!(env.graph.restore_user(&hire.id));
    env.graph
        .update_user(&hire.id, |u| u.account_enabled = true);
    env.graph.pause_delivery(false);
    wait_for("the restored, enabled member created", 8_000, || {
        active(env, &hire.id) == Some(true)
    })
    .await;
    wait_for("queue drained", 5_000, || s.integ_store().queue_len() == 0).await;
    reconcile_writes_nothing(&s).await;
    s.stop().await;
}

/// The reconcile learns managers from the users delta since its own last run, which shows
/// only what differs from then: a link the worker wrote in between, on a state that passed
/// (here a manager change undone while its notification waits), is read again from Graph by
/// the next reconcile rather than believed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_next_reconcile_reads_again_a_link_the_worker_wrote_on_a_passing_state() {
    let s = start(30, "").await;
    let env = &s.env;
    let bosses = direct_only(&s, 2);
    let lms_id = |id: &str| lms(env, id).unwrap()["id"].as_str().unwrap().to_string();
    let (first, second) = (lms_id(&bosses[0]), lms_id(&bosses[1]));
    let hire = new_user(1, Some(bosses[0].clone()));
    env.graph.upsert_user(hire.clone());
    env.graph.add_member(&env.fx.all_group_id, &hire.id);
    let manager_of = || {
        lms(env, &hire.id).and_then(|u| {
            u[ENTERPRISE]["manager"]["value"]
                .as_str()
                .map(str::to_string)
        })
    };
    wait_for("the hire linked", 8_000, || {
        manager_of() == Some(first.clone())
    })
    .await;
    wait_for("queue drained", 5_000, || s.integ_store().queue_len() == 0).await;
    // Settles the worker's doubt about the hire and starts a users delta from here.
    reconcile_writes_nothing(&s).await;

    env.graph
        .update_user(&hire.id, |u| u.manager_id = Some(bosses[1].clone()));
    wait_for("the hire moved to the second manager", 8_000, || {
        manager_of() == Some(second.clone())
    })
    .await;
    wait_for("queue drained", 5_000, || s.integ_store().queue_len() == 0).await;
    env.graph.pause_delivery(true);
    env.graph
        .update_user(&hire.id, |u| u.manager_id = Some(bosses[0].clone()));

    let i = Integration::build(&s.env.integration.cfg, &s.store).unwrap();
    let r = i.reconcile(RunOptions::default(), None).await;
    assert!(matches!(r.outcome, RunOutcome::Ok), "{:?}", r.error);
    assert_eq!(manager_of(), Some(first), "{:?}", r.changes);
    env.graph.pause_delivery(false);
    s.stop().await;
}

/// The membership mirror alone never deactivates: a user the reconcile created while their
/// membership notification was lost is a member by Graph's word, and stays active when their
/// next user notification arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_the_mirror_does_not_know_is_not_deactivated_by_the_next_user_hint() {
    let s = start(30, "").await;
    let env = &s.env;
    let hire = new_user(1, None);
    env.graph.set_notify_faults(NotifyFaults {
        drop_rate: 1.0,
        ..Default::default()
    });
    env.graph.upsert_user(hire.clone());
    env.graph.add_member(&env.fx.all_group_id, &hire.id);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let i = Integration::build(&env.integration.cfg, &s.store).unwrap();
    let r = i.reconcile(RunOptions::default(), None).await;
    assert_eq!(r.counts.created, 1, "{:?}", r.changes);
    env.graph.set_notify_faults(NotifyFaults::default());
    let watched = vec![hire.id.clone()];
    let seen = never_inactive(&s, &watched, async {
        env.graph
            .update_user(&hire.id, |u| u.job_title = Some("Still here".into()));
        wait_for("the title change", 5_000, || {
            title(env, &hire.id).as_deref() == Some("Still here")
        })
        .await;
    })
    .await;
    assert!(
        seen.is_empty(),
        "deactivated on the mirror's word: {seen:?}"
    );
    s.stop().await;
}

/// A single 404 (the user was soft-deleted and is restored a moment later) is weak evidence:
/// the user is only deactivated on a second 404 some time later.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_single_404_does_not_deactivate() {
    let s = start(30, "").await;
    let env = &s.env;
    let who = direct_only(&s, 1);
    let seen = never_inactive(&s, &who, async {
        env.graph.soft_delete_user(&who[0]);
        tokio::time::sleep(Duration::from_millis(150)).await;
        env.graph.restore_user(&who[0]);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        wait_for("queue drained", 5_000, || s.integ_store().queue_len() == 0).await;
    })
    .await;
    assert!(seen.is_empty(), "deactivated on one 404: {seen:?}");
    // A real deletion is still deactivated.
    env.graph.soft_delete_user(&who[0]);
    wait_for("the deleted user deactivated", 8_000, || {
        active(env, &who[0]) == Some(false)
    })
    .await;
    s.stop().await;
}

/// Departures confirmed together, one of them throttled (429, Retry-After 2 s) on its
/// confirming read: the others are written on their first answers, at once (not aged by the
/// throttled one's wait, nor read again), and the throttled user is read again after its
/// Retry-After and deactivated too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_throttled_confirmation_is_read_again_alone() {
    let s = start(30, "max_deactivations = 10").await;
    let env = &s.env;
    let who = direct_only(&s, 3);
    env.graph
        .throttle_path(&format!("users/{}/checkMemberGroups", who[0]), 1, 2);
    env.graph.record_user_reads(true);
    for id in &who {
        env.graph.remove_member(&env.fx.all_group_id, id);
    }
    wait_for("the two confirmed departures deactivated", 15_000, || {
        who[1..].iter().all(|id| active(env, id) == Some(false))
    })
    .await;
    assert_eq!(
        active(env, &who[0]),
        Some(true),
        "the others waited for the throttled confirmation"
    );
    wait_for("the throttled departure deactivated", 10_000, || {
        active(env, &who[0]) == Some(false)
    })
    .await;
    // Answered reads only (the throttled one's first is not among them), up to the throttled
    // user's confirmation (later notifications of the departed may ask again).
    let reads = env.graph.user_reads();
    let t0 = reads[0].at;
    let list: Vec<String> = reads
        .iter()
        .map(|r| format!("{:?} {} {}", r.at - t0, &r.user[..8], r.kind))
        .collect();
    let checks = |id: &str| -> Vec<std::time::Instant> {
        reads
            .iter()
            .filter(|r| r.user == id.to_lowercase() && r.kind == "checkMemberGroups")
            .map(|r| r.at)
            .collect()
    };
    let throttled = checks(&who[0])[0];
    for id in &who[1..] {
        let before: Vec<_> = checks(id).into_iter().filter(|t| *t < throttled).collect();
        assert_eq!(before.len(), 1, "{id} confirmed once: {list:#?}");
        assert!(
            throttled - before[0] >= Duration::from_secs(2),
            "Retry-After honoured: {list:#?}"
        );
    }
    s.stop().await;
}

/// Moving a user from direct to nested membership (removed, added 10 ms later) and back
/// never deactivates them, and a disable undone at once leaves them active in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moves_between_direct_and_nested_membership_never_deactivate() {
    let s = start(40, "").await;
    let env = &s.env;
    let who = direct_only(&s, 3);
    // How long each user really was out of the groups (the test's own thread may be late on a
    // busy machine): a deactivation inside a long gap would rest on Graph's true word.
    let gaps = std::cell::RefCell::new(Vec::new());
    let seen = never_inactive(&s, &who, async {
        for w in &who {
            let out = std::time::Instant::now();
            env.graph.remove_member(&env.fx.all_group_id, w);
            tokio::time::sleep(Duration::from_millis(10)).await;
            env.graph.add_member(&env.fx.nested_group_id, w);
            gaps.borrow_mut().push((w.clone(), out.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for w in &who {
            env.graph.add_member(&env.fx.all_group_id, w);
            env.graph.remove_member(&env.fx.nested_group_id, w);
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        wait_for("queue drained", 8_000, || s.integ_store().queue_len() == 0).await;
    })
    .await;
    let wrong: Vec<_> = gaps
        .borrow()
        .iter()
        .filter(|(w, gap)| seen.contains(w) && *gap < Duration::from_millis(60))
        .cloned()
        .collect();
    assert!(wrong.is_empty(), "deactivated while a member: {wrong:?}");
    // Disabled and enabled again within a moment: active in the end.
    env.graph
        .update_user(&who[0], |u| u.account_enabled = false);
    env.graph.update_user(&who[0], |u| u.account_enabled = true);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    wait_for("queue drained", 8_000, || s.integ_store().queue_len() == 0).await;
    assert_eq!(active(env, &who[0]), Some(true));
    reconcile_writes_nothing(&s).await;
    s.stop().await;
}

/// The guard's budget holds across batches: with max_deactivations = 25, five removals of 20
/// members a few seconds apart deactivate at most 25 (the first 20), hold the rest in the dead
/// letters with one alert, and `queue replay --allow-mass-deactivation` applies them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_guard_budget_holds_across_batches_and_restarts() {
    let s = start(300, "max_deactivations = 25").await;
    let env = &s.env;
    let leavers = direct_only(&s, 100);
    assert_eq!(leavers.len(), 100);
    for wave in leavers.chunks(20) {
        for l in wave {
            env.graph.remove_member(&env.fx.all_group_id, l);
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    wait_for("queue drained", 15_000, || s.integ_store().queue_len() == 0).await;
    let inactive = leavers
        .iter()
        .filter(|l| active(env, l) == Some(false))
        .count();
    assert!(inactive <= 25, "{inactive} deactivated past the budget");
    assert!(inactive >= 20, "the first wave fits the budget: {inactive}");
    let store = s.integ_store();
    let dead = store.dead_letters().unwrap();
    assert!(
        dead.iter()
            .filter(|(_, it)| it
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("guard")))
            .count()
            >= 100 - inactive,
        "held items wait in the dead letters: {dead:?}"
    );
    assert!(store
        .guard_trip(chrono::Duration::hours(24))
        .unwrap()
        .is_some());
    // The way out the alert names.
    store.clear_guard_trip().unwrap();
    store.replay(None, true).unwrap();
    s.env.integration.store.flush().unwrap();
    wait_for("the held deactivations applied", 15_000, || {
        leavers.iter().all(|l| active(env, l) == Some(false))
    })
    .await;
    s.stop().await;
}

/// One user whose LMS requests fail (an error status, a timeout, an oversized answer) counts
/// attempts and ends in the dead letters; everybody else's changes go on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_bad_user_ends_in_the_dead_letters_and_stalls_nobody() {
    let s = start_env(crate::common::EnvOptions {
        users: 30,
        // The LMS client gives up on a request after a second.
        tail: "timeout_secs = 1\n".into(),
        ..Default::default()
    })
    .await;
    let env = &s.env;
    let who = direct_only(&s, 4);
    let hire = new_user(3, None);
    env.scim.set_faults(ScimFaults {
        users: vec![
            UserFault {
                external_id: who[0].clone(),
                kind: UserFaultKind::Status(401),
            },
            UserFault {
                external_id: who[1].clone(),
                kind: UserFaultKind::Delay(Duration::from_secs(3)),
            },
            UserFault {
                external_id: hire.id.clone(),
                kind: UserFaultKind::Oversized,
            },
        ],
        ..Default::default()
    });
    for w in &who {
        env.graph
            .update_user(w, |u| u.job_title = Some("Renamed".into()));
    }
    env.graph.upsert_user(hire.clone());
    env.graph.add_member(&env.fx.all_group_id, &hire.id);
    wait_for("the good users changed", 5_000, || {
        who[2..]
            .iter()
            .all(|w| title(env, w).as_deref() == Some("Renamed"))
    })
    .await;
    let store = s.integ_store();
    let bad = [who[0].clone(), who[1].clone(), hire.id.clone()];
    wait_for("the bad users buried", 40_000, || {
        let dead = store.dead_letters().unwrap();
        bad.iter().all(|w| {
            dead.iter()
                .any(|(_, it)| matches!(&it.hint, Hint::User { user_id, .. } if user_id == w))
        })
    })
    .await;
    // Later changes of others still flow (at worst after one more slow attempt of a bad user,
    // cut off at the per-user deadline).
    env.graph
        .update_user(&who[3], |u| u.job_title = Some("Again".into()));
    wait_for("a later change", 15_000, || {
        title(env, &who[3]).as_deref() == Some("Again")
    })
    .await;
    s.stop().await;
}

/// A nested group taken out of the main group and put back brings its members back, also
/// when `serve` restarted while it was out (its subscription is made again).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nested_group_removed_and_added_back_brings_its_members_back() {
    let s = start(60, "max_deactivations = 50").await;
    let env = &s.env;
    let main = env.graph.group(&env.fx.all_group_id).unwrap();
    let nested = env.graph.group(&env.fx.nested_group_id).unwrap();
    let only_nested: Vec<String> = nested
        .members
        .iter()
        .filter(|m| !main.members.contains(m) && env.graph.user(m).is_some())
        .cloned()
        .collect();
    assert!(!only_nested.is_empty());
    env.graph
        .remove_member(&env.fx.all_group_id, &env.fx.nested_group_id);
    wait_for("nested-only members deactivated", 10_000, || {
        only_nested.iter().all(|m| active(env, m) == Some(false))
    })
    .await;
    env.graph
        .add_member(&env.fx.all_group_id, &env.fx.nested_group_id);
    wait_for("nested-only members back", 10_000, || {
        only_nested.iter().all(|m| active(env, m) == Some(true))
    })
    .await;

    // Again, with a restart while the group is out.
    env.graph
        .remove_member(&env.fx.all_group_id, &env.fx.nested_group_id);
    wait_for("nested-only members deactivated", 10_000, || {
        only_nested.iter().all(|m| active(env, m) == Some(false))
    })
    .await;
    let nested_sub = |env: &crate::common::TestEnv| {
        env.graph.subscriptions().iter().any(|x| {
            x.resource
                .to_ascii_lowercase()
                .contains(&env.fx.nested_group_id.to_ascii_lowercase())
        })
    };
    wait_for("the nested group's subscription deleted", 5_000, || {
        !nested_sub(env)
    })
    .await;
    let port = s.addr.port();
    let env = s.stop_keep_env().await;
    let s = relaunch_on(env, port).await;
    let env = &s.env;
    env.graph
        .add_member(&env.fx.all_group_id, &env.fx.nested_group_id);
    wait_for("nested-only members back after a restart", 10_000, || {
        only_nested.iter().all(|m| active(env, m) == Some(true))
    })
    .await;
    wait_for("its subscription made again", 5_000, || nested_sub(env)).await;
    // And changes inside it are seen again.
    env.graph
        .update_user(&only_nested[0], |u| u.job_title = Some("Seen".into()));
    wait_for("a change inside the nested group", 5_000, || {
        title(env, &only_nested[0]).as_deref() == Some("Seen")
    })
    .await;
    s.stop().await;
}

/// Changing the configured clientState makes the subscriptions again with the new one, so
/// notifications keep being accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_client_state_reaches_the_subscriptions() {
    let old = "client-state-one-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let new = "client-state-two-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    let s = start(20, &format!("client_state = {{ value = \"{old}\" }}")).await;
    let before: Vec<String> = s
        .env
        .graph
        .subscriptions()
        .into_iter()
        .map(|x| x.id)
        .collect();
    assert!(s
        .env
        .graph
        .subscriptions()
        .iter()
        .all(|x| x.client_state.as_deref() == Some(old)));
    let port = s.addr.port();
    let mut env = s.stop_keep_env().await;
    env.config_toml = env.config_toml.replace(old, new);
    let s = relaunch_on(env, port).await;
    let env = &s.env;
    wait_for(
        "subscriptions made again with the new clientState",
        5_000,
        || {
            let subs = env.graph.subscriptions();
            subs.len() >= 2
                && subs
                    .iter()
                    .all(|x| x.client_state.as_deref() == Some(new) && !before.contains(&x.id))
        },
    )
    .await;
    let someone = direct_only(&s, 1);
    env.graph
        .update_user(&someone[0], |u| u.job_title = Some("Rotated".into()));
    wait_for("a change after the rotation", 5_000, || {
        title(env, &someone[0]).as_deref() == Some("Rotated")
    })
    .await;
    s.stop().await;
}

/// Whatever the worker did, a reconcile right after agrees: an unchanged LMS.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_mix_of_changes_a_reconcile_writes_nothing() {
    let s = start(60, "").await;
    let env = &s.env;
    let who = direct_only(&s, 6);
    env.graph
        .update_user(&who[0], |u| u.department = Some("Moved Dept".into()));
    env.graph.update_user(&who[1], |u| {
        u.manager_id = Some(env.fx.ceo_id.clone());
    });
    env.graph
        .update_user(&who[2], |u| u.account_enabled = false);
    env.graph.remove_member(&env.fx.all_group_id, &who[3]);
    let hire = SimUser {
        manager_id: Some(who[4].clone()),
        ..new_user(7, None)
    };
    env.graph.upsert_user(hire.clone());
    env.graph.add_member(&env.fx.nested_group_id, &hire.id);
    env.graph.update_user(&who[5], |u| {
        u.user_principal_name = format!("renamed.{}", u.user_principal_name)
    });
    wait_for("everything applied", 10_000, || {
        lms(env, &hire.id).is_some()
            && active(env, &who[2]) == Some(false)
            && active(env, &who[3]) == Some(false)
            && s.integ_store().queue_len() == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.assert_lms_matches_tenant(upn);
    reconcile_writes_nothing(&s).await;
    s.stop().await;
}

/// A free port on 127.0.0.1 for a `serve` that is restarted (Graph's subscriptions point at
/// it, so every start must use the same one).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes the environment's config with `serve` listening on `port`.
fn write_config(env: &crate::common::TestEnv, port: u16) -> std::path::PathBuf {
    let path = env.dir.path().join("rostersync.toml");
    let text = env.config_toml.replacen(
        "[server]\n",
        &format!("[server]\nlisten = \"127.0.0.1:{port}\"\n"),
        1,
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Killed between the LMS write and the index write: the LMS took 29 deactivations, the index
/// never heard of them, and the users were added back while `serve` was down. The intents
/// stored before the writes are read back at the next start, so the users are reactivated
/// (before, the index said "active", nothing was changed, and they stayed locked out).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_between_the_lms_write_and_the_index_write_is_repaired_at_the_next_start() {
    let env = crate::common::spawn(crate::common::EnvOptions {
        users: 300,
        integration_extra: "max_deactivations = 50\nschedule = \"0 0 0 1 1 *\"".into(),
        ..Default::default()
    })
    .await;
    let port = free_port();
    let config = write_config(&env, port);
    let log = env.dir.path().join("serve.log");
    let mut first = spawn_serve(&config, &log).await;
    let members = env.member_ids().len();
    wait_logged("the first reconcile", 30_000, &log, || {
        env.graph.subscriptions().len() >= 2 && env.scim.user_count() >= members * 9 / 10
    })
    .await;
    // Let the first reconcile's records reach the disk.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let nested = env.graph.group(&env.fx.nested_group_id).unwrap();
    let leavers: Vec<String> = env
        .graph
        .group(&env.fx.all_group_id)
        .unwrap()
        .members
        .iter()
        .filter(|m| {
            !nested.members.contains(m) && env.graph.user(m).is_some_and(|u| u.account_enabled)
        })
        .take(30)
        .cloned()
        .collect();
    // One of them is slow in the LMS: the batch waits for it, with the others written.
    env.scim.set_faults(ScimFaults {
        users: vec![UserFault {
            external_id: leavers[29].clone(),
            kind: UserFaultKind::Delay(Duration::from_secs(20)),
        }],
        ..Default::default()
    });
    for l in &leavers {
        env.graph.remove_member(&env.fx.all_group_id, l);
    }
    let inactive = |env: &crate::common::TestEnv| {
        leavers
            .iter()
            .filter(|l| active(env, l) == Some(false))
            .count()
    };
    wait_logged("29 deactivations in the LMS", 20_000, &log, || {
        inactive(&env) >= 29
    })
    .await;
    first.proc.start_kill().unwrap(); // SIGKILL
    let _ = first.proc.wait().await;
    env.scim.set_faults(ScimFaults::default());
    for l in &leavers {
        env.graph.add_member(&env.fx.all_group_id, l);
    }
    let mut second = spawn_serve(&config, &log).await;
    wait_logged("every leaver active again", 30_000, &log, || {
        inactive(&env) == 0
    })
    .await;
    second.proc.start_kill().unwrap();
    let _ = second.proc.wait().await;
    assert!(
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("reading back LMS writes"),
        "the second start read the unconfirmed writes back"
    );
}

/// SIGKILLed again and again during start-up (while it makes its subscriptions), each time on
/// another port, `serve` leaves no subscription behind that it does not own: after a clean
/// start Graph holds exactly the ones it needs. (Graph refuses a duplicate subscription with
/// 409, which hides leaks; this Graph, like some emulators, makes duplicates.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kills_during_start_up_leave_no_subscription_behind() {
    let env = crate::common::spawn(crate::common::EnvOptions {
        users: 20,
        integration_extra: "schedule = \"0 0 0 1 1 *\"".into(),
        ..Default::default()
    })
    .await;
    env.graph.set_duplicate_subscriptions_conflict(false);
    let log = env.dir.path().join("serve.log");
    for k in 1..=5usize {
        let config = write_config(&env, free_port());
        let mut child = spawn_serve(&config, &log).await;
        // Killed at a different point each time: after the k-th subscription Graph made.
        let want = (k % 3) + 1;
        let started = std::time::Instant::now();
        while env.graph.subscriptions().len() < want && started.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        child.proc.start_kill().unwrap();
        let _ = child.proc.wait().await;
    }
    let config = write_config(&env, free_port());
    let mut last = spawn_serve(&config, &log).await;
    // users, the main group's members and the nested group's members.
    wait_logged(
        "exactly the subscriptions serve needs",
        20_000,
        &log,
        || env.graph.subscriptions().len() == 3,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let subs = env.graph.subscriptions();
    if subs.len() != 3 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("rostersync::serve"))
            .collect();
        panic!("{subs:#?}\n{}", lines.join("\n"));
    }
    last.proc.start_kill().unwrap();
    let _ = last.proc.wait().await;
    let store = rostersync::store::Store::open(&env.dir.path().join("data")).unwrap();
    let known: HashSet<String> = store
        .integration(&env.integration.cfg.name)
        .unwrap()
        .subscriptions()
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    for s in subs {
        assert!(known.contains(&s.id), "{} is not in the store", s.id);
    }
}

/// An expired delta link: the group is learnt afresh once (the mirror replaced only when that
/// worked, also while Graph throttles) and a full reconcile decides everyone; members are not
/// read one by one on top, and nobody is deactivated on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_delta_link_relearns_the_group_once_and_deactivates_nobody() {
    let s = start(60, "").await;
    let env = &s.env;
    let members = env.member_ids();
    let runs_before = s.runs();
    let hire = new_user(5, None);
    let seen = never_inactive(&s, &members, async {
        env.graph.expire_delta_tokens();
        // Graph throttles every request for a moment: the fresh round fails and is retried.
        env.graph.set_faults(rostersync_sim::graph::GraphFaults {
            throttle_rate: 1.0,
            retry_after_secs: 0,
            seed: 3,
        });
        env.graph.upsert_user(hire.clone());
        env.graph.add_member(&env.fx.all_group_id, &hire.id);
        tokio::time::sleep(Duration::from_millis(800)).await;
        env.graph
            .set_faults(rostersync_sim::graph::GraphFaults::default());
        let reads = env.graph.request_count("user");
        wait_for("the hire created by the reconcile", 15_000, || {
            lms(env, &hire.id).is_some() && s.runs() > runs_before
        })
        .await;
        wait_for("queue drained", 8_000, || s.integ_store().queue_len() == 0).await;
        let one_by_one = env.graph.request_count("user") - reads;
        assert!(
            one_by_one < (members.len() / 2) as u64,
            "{one_by_one} users read one by one after the expiry, besides the reconcile"
        );
    })
    .await;
    assert!(seen.is_empty(), "deactivated during the resync: {seen:?}");
    reconcile_writes_nothing(&s).await;
    s.stop().await;
}
