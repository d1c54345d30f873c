//! Full reconcile against the simulated tenant and LMS over real HTTP on 127.0.0.1.

use crate::common::{spawn, upn, EnvOptions};
use std::time::Duration;

use rostersync::sync::plan::Action;
use rostersync::sync::reconcile::{RunOptions, RunOutcome};
use rostersync::sync::trace::Outcome;
use rostersync_sim::graph::{GraphFaults, Latency, SimGroup};
use rostersync_sim::scim::ScimFaults;
use serde_json::json;

fn some_enabled_members(env: &crate::common::TestEnv, n: usize) -> Vec<String> {
    env.member_ids()
        .into_iter()
        .filter(|id| {
            let u = env.graph.user(id).unwrap();
            u.account_enabled && u.id != env.fx.ceo_id
        })
        .take(n)
        .collect()
}

#[tokio::test]
async fn first_reconcile_makes_the_lms_equal_the_group_and_a_second_changes_nothing() {
    let env = spawn(EnvOptions::default()).await;
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?} {:?}", r.error, r.failures);
    assert!(r.counts.created > 250, "{:?}", r.counts);
    // The fixture has unicode names, an apostrophe in a UPN, a user without mail, a 200-char
    // title, nested members and a manager chain whose top is outside the group.
    env.assert_lms_matches_tenant(upn);
    let members = env.member_ids();
    let nested = env.graph.transitive_user_ids(&env.fx.nested_group_id);
    assert!(!nested.is_empty() && nested.iter().all(|n| members.contains(n)));
    assert!(env
        .scim
        .users()
        .iter()
        .any(|u| u["userName"].as_str().unwrap().contains('\'')));
    assert!(env.scim.users().iter().any(|u| u["title"]
        .as_str()
        .is_some_and(|t| t.chars().count() == 200)));

    // Managers created in the same run are created before their reports, so every manager link
    // is set in the report's own POST: no follow-up PATCH.
    assert_eq!(env.scim.request_count("PATCH"), 0);
    assert_eq!(env.scim.request_count("POST"), r.counts.created);

    env.scim.reset_counts();
    let again = env.reconcile().await;
    assert_eq!(again.outcome, RunOutcome::Ok);
    assert_eq!(
        (
            again.counts.created,
            again.counts.updated,
            again.counts.deactivated,
            again.counts.reactivated
        ),
        (0, 0, 0, 0),
        "{:?}",
        again.changes
    );
    assert_eq!(
        env.writes(),
        0,
        "an unchanged tenant costs no write in the LMS"
    );
}

#[tokio::test]
async fn each_kind_of_change_produces_exactly_the_expected_change() {
    let env = spawn(EnvOptions::default()).await;
    assert_eq!(env.reconcile().await.outcome, RunOutcome::Ok);
    let ids = some_enabled_members(&env, 3);
    let (promoted, leaver, disabled) = (&ids[0], &ids[1], &ids[2]);

    env.graph.update_user(promoted, |u| {
        u.job_title = Some("Chief Learning Officer".into())
    });
    let r = env.reconcile().await;
    assert_eq!(r.changes.len(), 1, "{:?}", r.changes);
    let change = r.changes.get(0).unwrap();
    assert_eq!(change.action, Action::Update);
    assert_eq!(change.entra_id, *promoted);
    assert_eq!(change.changes.len(), 1);
    assert_eq!(change.changes[0].key, "title");
    assert_eq!(env.lms_user(promoted)["title"], "Chief Learning Officer");

    // The enabled members a user manages: their manager link follows the manager.
    let reports_of = |m: &str| -> Vec<String> {
        let mut v: Vec<String> = env
            .member_ids()
            .into_iter()
            .filter(|id| {
                let u = env.graph.user(id).unwrap();
                u.account_enabled && u.manager_id.as_deref() == Some(m)
            })
            .collect();
        v.sort();
        v
    };
    // Only the deactivation, and the manager links of the user's reports.
    let check = |r: &rostersync::sync::reconcile::RunReport, action: Action, who: &[&String]| {
        let mut main: Vec<String> = r
            .changes
            .iter()
            .filter(|c| c.action == action)
            .map(|c| c.entra_id.clone())
            .collect();
        main.sort();
        let mut want: Vec<String> = who.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(main, want, "{:?}", r.changes);
        let mut links: Vec<String> = r
            .changes
            .iter()
            .filter(|c| c.action != action)
            .map(|c| {
                assert_eq!(c.action, Action::Update, "{c:?}");
                assert_eq!(c.changes.len(), 1, "{c:?}");
                assert_eq!(c.changes[0].key, "enterprise.manager", "{c:?}");
                c.entra_id.clone()
            })
            .collect();
        links.sort();
        let mut want_links: Vec<String> = who.iter().flat_map(|m| reports_of(m)).collect();
        want_links.sort();
        assert_eq!(links, want_links, "manager links of the reports");
    };

    // Direct members may also sit in the nested group; remove from both.
    env.graph.remove_member(&env.fx.all_group_id, leaver);
    env.graph.remove_member(&env.fx.nested_group_id, leaver);
    let r = env.reconcile().await;
    check(&r, Action::Deactivate, &[leaver]);
    assert_eq!(env.lms_user(leaver)["active"], false);

    env.graph
        .update_user(disabled, |u| u.account_enabled = false);
    let r = env.reconcile().await;
    check(&r, Action::Deactivate, &[disabled]);
    assert_eq!(env.lms_user(disabled)["active"], false);

    env.graph.add_member(&env.fx.all_group_id, leaver);
    env.graph
        .update_user(disabled, |u| u.account_enabled = true);
    let r = env.reconcile().await;
    check(&r, Action::Reactivate, &[leaver, disabled]);
    assert_eq!(env.lms_user(leaver)["active"], true);
    env.assert_lms_matches_tenant(upn);

    // A hard-deleted user is deactivated, never deleted in the LMS.
    env.graph.delete_user(promoted);
    let r = env.reconcile().await;
    assert!(r
        .changes
        .iter()
        .any(|c| c.action == Action::Deactivate && c.entra_id == *promoted));
    assert_eq!(env.lms_user(promoted)["active"], false);
    assert_eq!(env.scim.request_count("DELETE"), 0);
    env.assert_lms_matches_tenant(upn);
}

#[tokio::test]
async fn a_hire_into_the_nested_group_and_a_new_manager_are_linked_in_one_run() {
    let env = spawn(EnvOptions::default()).await;
    env.reconcile().await;
    let template = env.graph.user(&some_enabled_members(&env, 1)[0]).unwrap();
    let boss = rostersync_sim::graph::SimUser {
        id: "aaaaaaaa-0000-4000-8000-000000000001".into(),
        user_principal_name: "new.boss@contoso-sim.onmicrosoft.com".into(),
        mail: Some("new.boss@contoso-sim.onmicrosoft.com".into()),
        display_name: Some("New Boss".into()),
        manager_id: None,
        ..template.clone()
    };
    let hire = rostersync_sim::graph::SimUser {
        id: "aaaaaaaa-0000-4000-8000-000000000002".into(),
        user_principal_name: "new.hire@contoso-sim.onmicrosoft.com".into(),
        mail: Some("new.hire@contoso-sim.onmicrosoft.com".into()),
        manager_id: Some(boss.id.clone()),
        ..template
    };
    env.graph.upsert_user(boss.clone());
    env.graph.upsert_user(hire.clone());
    env.graph.add_member(&env.fx.nested_group_id, &hire.id);
    env.graph.add_member(&env.fx.all_group_id, &boss.id);
    let r = env.reconcile().await;
    assert_eq!(r.counts.created, 2, "{:?}", r.changes);
    let boss_target = env.lms_user(&boss.id)["id"].clone();
    let h = env.lms_user(&hire.id);
    assert_eq!(
        h[crate::common::ENTERPRISE]["manager"]["value"],
        boss_target
    );
    assert_eq!(
        h[rostersync::config::DEFAULT_CUSTOM_SCHEMA]["managerEmail"],
        "new.boss@contoso-sim.onmicrosoft.com"
    );
    assert_eq!(
        r.counts.updated, 0,
        "the manager link of a user created in this run is not an extra update"
    );
    env.assert_lms_matches_tenant(upn);
}

#[tokio::test]
async fn managers_and_reports_across_several_member_pages_are_linked_in_one_run() {
    // 2,500 users: three member pages of at most 999, with managers and reports spread over
    // them; the LMS writes of one page overlap with the next page's planning.
    let env = spawn(EnvOptions {
        users: 2_500,
        ..Default::default()
    })
    .await;
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?} {:?}", r.error, r.failures);
    assert!(r.counts.created > 2_000, "{:?}", r.counts);
    env.assert_lms_matches_tenant(upn);
    // A report listed before its manager's page gets the link by one PATCH at the end; every
    // other link is in the create.
    let patches = env.scim.request_count("PATCH");
    assert!(
        patches < r.counts.created / 2,
        "{patches} PATCHes for {} creates",
        r.counts.created
    );
    env.scim.reset_counts();
    let again = env.reconcile().await;
    assert_eq!(
        (again.counts.created, again.counts.updated, env.writes()),
        (0, 0, 0),
        "{:?}",
        again.changes
    );
}

#[tokio::test]
async fn a_manager_that_fails_to_sync_does_not_hold_back_its_reports() {
    let env = spawn(EnvOptions {
        users: 20,
        ..Default::default()
    })
    .await;
    let template = env.graph.user(&some_enabled_members(&env, 1)[0]).unwrap();
    let boss = rostersync_sim::graph::SimUser {
        id: "bbbbbbbb-0000-4000-8000-000000000001".into(),
        user_principal_name: "taken.boss@contoso-sim.onmicrosoft.com".into(),
        mail: Some("taken.boss@contoso-sim.onmicrosoft.com".into()),
        display_name: Some("Taken Boss".into()),
        manager_id: None,
        ..template.clone()
    };
    let report = rostersync_sim::graph::SimUser {
        id: "bbbbbbbb-0000-4000-8000-000000000002".into(),
        user_principal_name: "report.of.taken@contoso-sim.onmicrosoft.com".into(),
        mail: Some("report.of.taken@contoso-sim.onmicrosoft.com".into()),
        manager_id: Some(boss.id.clone()),
        ..template
    };
    env.graph.upsert_user(boss.clone());
    env.graph.upsert_user(report.clone());
    env.graph.add_member(&env.fx.all_group_id, &boss.id);
    env.graph.add_member(&env.fx.all_group_id, &report.id);
    // The boss's userName belongs to another identity in the LMS: its create fails.
    env.scim
        .insert_user(
            json!({"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],
            "userName": boss.user_principal_name, "externalId": "someone-else", "active": true}),
        )
        .unwrap();
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Partial, "{:?}", r.error);
    assert_eq!(
        r.failures
            .iter()
            .map(|f| f.entra_id.as_str())
            .collect::<Vec<_>>(),
        vec![boss.id.as_str()]
    );
    let l = env.lms_user(&report.id);
    assert_eq!(l["active"], true, "the report is created all the same");
    assert!(
        l[crate::common::ENTERPRISE]["manager"].is_null(),
        "no link to a manager that is not in the LMS: {l}"
    );
}

#[tokio::test]
async fn the_guard_stops_mass_deactivation_until_overridden() {
    let env = spawn(EnvOptions {
        users: 100,
        integration_extra: "max_deactivations = \"10%\"".into(),
        ..Default::default()
    })
    .await;
    env.reconcile().await;
    let victims = some_enabled_members(&env, 30);
    for v in &victims {
        env.graph.remove_member(&env.fx.all_group_id, v);
        env.graph.remove_member(&env.fx.nested_group_id, v);
    }
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::GuardTripped);
    let g = r.guard.as_ref().unwrap();
    assert_eq!(g.would_deactivate, 30);
    assert!(
        victims.iter().all(|v| env.lms_user(v)["active"] == true),
        "nothing deactivated"
    );
    assert_eq!(rostersync::output::exit_code(&[r]), 1);

    let r = env
        .run(RunOptions {
            allow_mass_deactivation: true,
            ..Default::default()
        })
        .await;
    assert_eq!(r.outcome, RunOutcome::Ok);
    assert_eq!(r.counts.deactivated, 30);
    assert!(victims.iter().all(|v| env.lms_user(v)["active"] == false));
}

#[tokio::test]
async fn an_emptied_or_missing_group_is_an_error_not_everyone_leaving() {
    let env = spawn(EnvOptions {
        users: 60,
        ..Default::default()
    })
    .await;
    env.reconcile().await;
    let active_before = env
        .scim
        .users()
        .iter()
        .filter(|u| u["active"] == true)
        .count();
    // Empty the group entirely.
    let group = env.graph.group(&env.fx.all_group_id).unwrap();
    for m in &group.members {
        env.graph.remove_member(&env.fx.all_group_id, m);
    }
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Failed);
    assert!(
        r.error.as_deref().unwrap().contains("no members"),
        "{:?}",
        r.error
    );
    assert_eq!(
        env.scim
            .users()
            .iter()
            .filter(|u| u["active"] == true)
            .count(),
        active_before
    );

    env.graph.delete_group(&env.fx.all_group_id);
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Failed);
    assert!(
        r.error.as_deref().unwrap().contains("does not exist"),
        "{:?}",
        r.error
    );
    assert_eq!(
        env.scim
            .users()
            .iter()
            .filter(|u| u["active"] == true)
            .count(),
        active_before
    );
}

#[tokio::test]
async fn twenty_percent_throttling_on_both_sides_still_converges() {
    let env = spawn(EnvOptions {
        users: 200,
        ..Default::default()
    })
    .await;
    env.graph.set_faults(GraphFaults {
        throttle_rate: 0.2,
        retry_after_secs: 0,
        seed: 11,
    });
    env.scim.set_faults(ScimFaults {
        rate_429: 0.2,
        retry_after_secs: 0,
        seed: 12,
        ..Default::default()
    });
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?} {:?}", r.error, r.failures);
    assert!(env.graph.request_count("throttled") > 0 && env.scim.request_count("429") > 0);
    env.assert_lms_matches_tenant(upn);
    let again = env.reconcile().await;
    assert_eq!(again.changes.len(), 0);
}

#[tokio::test]
async fn lost_create_responses_do_not_duplicate_users() {
    let env = spawn(EnvOptions {
        users: 80,
        ..Default::default()
    })
    .await;
    env.scim.set_faults(ScimFaults {
        rate_500_after_create: 0.3,
        seed: 5,
        ..Default::default()
    });
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?}", r.failures);
    let users = env.scim.users();
    let mut names: Vec<_> = users
        .iter()
        .map(|u| u["userName"].as_str().unwrap().to_lowercase())
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), users.len(), "no duplicate LMS users");
    env.assert_lms_matches_tenant(upn);
}

#[tokio::test]
async fn dry_run_applies_nothing_but_shows_the_plan() {
    let env = spawn(EnvOptions {
        users: 50,
        ..Default::default()
    })
    .await;
    let r = env
        .run(RunOptions {
            dry_run: true,
            ..Default::default()
        })
        .await;
    assert_eq!(r.outcome, RunOutcome::Ok);
    assert!(r.counts.created > 40);
    assert_eq!(r.changes.len() as u64, r.counts.created);
    assert_eq!(env.writes(), 0);
    assert!(env.scim.users().is_empty());
    env.reconcile().await;
    let id = some_enabled_members(&env, 1)[0].clone();
    env.graph
        .update_user(&id, |u| u.department = Some("Dry Run Dept".into()));
    let r = env
        .run(RunOptions {
            dry_run: true,
            ..Default::default()
        })
        .await;
    assert_eq!(r.changes.len(), 1);
    let text = rostersync::output::render_report(&r, 10);
    assert!(
        text.contains("enterprise.department") && text.contains("Dry Run Dept"),
        "{text}"
    );
    assert_ne!(
        env.lms_user(&id)[crate::common::ENTERPRISE]["department"],
        "Dry Run Dept"
    );
}

#[tokio::test]
async fn every_username_mode_works_and_a_missing_value_is_a_per_user_failure() {
    for (mode, pick) in [
        (
            "mail",
            (|u: &rostersync_sim::graph::SimUser| u.mail.clone()) as fn(&_) -> Option<String>,
        ),
        ("employeeId", |u| u.employee_id.clone()),
        ("id", |u| Some(u.id.clone())),
        ("userPrincipalName", upn),
    ] {
        let env = spawn(EnvOptions {
            users: 40,
            integration_extra: format!("username = \"{mode}\""),
            ..Default::default()
        })
        .await;
        let r = env.reconcile().await;
        env.assert_lms_matches_tenant(pick);
        let lacking: Vec<_> = env
            .member_ids()
            .into_iter()
            .filter(|id| {
                let u = env.graph.user(id).unwrap();
                u.account_enabled && pick(&u).is_none()
            })
            .collect();
        assert_eq!(r.failures.len(), lacking.len(), "{mode}: {:?}", r.failures);
        for f in &r.failures {
            assert!(f.reason.contains(mode), "{mode}: {}", f.reason);
        }
        if mode == "mail" || mode == "employeeId" {
            assert!(!lacking.is_empty(), "the fixture has a user without {mode}");
            assert_eq!(r.outcome, RunOutcome::Partial);
            assert_eq!(rostersync::output::exit_code(&[r]), 2);
        }
    }
}

#[tokio::test]
async fn existing_lms_users_are_linked_once_and_others_never_touched() {
    let env = spawn(EnvOptions {
        users: 30,
        ..Default::default()
    })
    .await;
    let member = env.graph.user(&some_enabled_members(&env, 1)[0]).unwrap();
    // Made by hand in the LMS: same userName (other case), no externalId.
    let linked_id = env
        .scim
        .insert_user(json!({"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],
            "userName": member.user_principal_name.to_uppercase(), "title": "set by hand", "active": true}))
        .unwrap();
    let stranger = env
        .scim
        .insert_user(
            json!({"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],
            "userName": "contractor@elsewhere.example", "active": true, "nickName": "hands off"}),
        )
        .unwrap();
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?}", r.failures);
    let l = env.lms_user(&member.id);
    assert_eq!(
        l["id"],
        linked_id.as_str(),
        "the existing user was adopted, not duplicated"
    );
    assert_eq!(l["title"].as_str(), member.job_title.as_deref());
    let s = env
        .scim
        .users()
        .into_iter()
        .find(|u| u["id"] == stranger.as_str())
        .unwrap();
    assert_eq!(
        (s["active"].clone(), s["nickName"].clone()),
        (json!(true), json!("hands off"))
    );
    // Removing everyone but the stranger's lookalikes never touches the stranger.
    env.graph.remove_member(&env.fx.all_group_id, &member.id);
    env.graph.remove_member(&env.fx.nested_group_id, &member.id);
    env.reconcile().await;
    let s = env
        .scim
        .users()
        .into_iter()
        .find(|u| u["id"] == stranger.as_str())
        .unwrap();
    assert_eq!(s["active"], true);
}

#[tokio::test]
async fn link_existing_false_reports_the_collision_and_leaves_the_user_alone() {
    let env = spawn(EnvOptions {
        users: 20,
        integration_extra: "link_existing = false".into(),
        ..Default::default()
    })
    .await;
    let member = env.graph.user(&some_enabled_members(&env, 1)[0]).unwrap();
    env.scim
        .insert_user(
            json!({"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],
            "userName": member.user_principal_name, "title": "set by hand", "active": true}),
        )
        .unwrap();
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Partial);
    assert_eq!(r.failures.len(), 1);
    assert!(
        r.failures[0].reason.contains("link_existing"),
        "{}",
        r.failures[0].reason
    );
    let l = env
        .scim
        .user_by_user_name(&member.user_principal_name)
        .unwrap();
    assert_eq!(l["title"], "set by hand");
}

#[tokio::test]
async fn empty_values_are_cleared_by_default_and_kept_when_configured() {
    let env = spawn(EnvOptions {
        users: 20,
        tail: "\n[integration.mapping]\nenterprise.department = { on_empty = \"keep\" }\n".into(),
        ..Default::default()
    })
    .await;
    env.reconcile().await;
    let id = some_enabled_members(&env, 1)[0].clone();
    let before = env.lms_user(&id);
    assert!(
        before["title"].is_string() && before[crate::common::ENTERPRISE]["department"].is_string()
    );
    env.graph.update_user(&id, |u| {
        u.job_title = None;
        u.department = None;
    });
    let r = env.reconcile().await;
    assert_eq!(r.changes.len(), 1);
    let after = env.lms_user(&id);
    assert!(after.get("title").is_none(), "title cleared: {after}");
    assert_eq!(
        after[crate::common::ENTERPRISE]["department"],
        before[crate::common::ENTERPRISE]["department"],
        "department kept"
    );
}

#[tokio::test]
async fn custom_attributes_are_not_sent_to_an_lms_that_does_not_declare_them() {
    let env = spawn(EnvOptions {
        users: 20,
        custom_extension: false,
        ..Default::default()
    })
    .await;
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?}", r.failures);
    assert!(env
        .scim
        .users()
        .iter()
        .all(|u| u.get(rostersync::config::DEFAULT_CUSTOM_SCHEMA).is_none()));
    let checks = env.integration.check().await;
    let mapping = checks
        .iter()
        .find(|c| c.what == "mapping")
        .expect("a mapping line");
    assert!(
        mapping.detail.contains("custom.officeLocation"),
        "{}",
        mapping.detail
    );
}

#[tokio::test]
async fn users_in_two_groups_are_synced_once() {
    let env = spawn(EnvOptions {
        users: 40,
        ..Default::default()
    })
    .await;
    // A second configured group overlapping the first.
    let ids = some_enabled_members(&env, 5);
    env.graph.add_group(SimGroup {
        id: "bbbbbbbb-0000-4000-8000-000000000009".into(),
        display_name: "Trainers".into(),
        members: ids.clone(),
    });
    let mut cfg = env.integration.cfg.clone();
    cfg.groups
        .push("bbbbbbbb-0000-4000-8000-000000000009".into());
    let two = rostersync::app::Integration::build(&cfg, &env.store).unwrap();
    let r = two.reconcile(RunOptions::default(), None).await;
    assert_eq!(r.outcome, RunOutcome::Ok);
    assert_eq!(r.groups.len(), 2);
    assert_eq!(r.counts.members as usize, env.member_ids().len());
    // Leaving one of two groups is not leaving.
    env.graph.remove_member(&env.fx.all_group_id, &ids[0]);
    env.graph.remove_member(&env.fx.nested_group_id, &ids[0]);
    let r = two.reconcile(RunOptions::default(), None).await;
    assert_eq!(r.counts.deactivated, 0);
    assert_eq!(env.lms_user(&ids[0])["active"], true);
}

#[tokio::test]
async fn a_deep_reconcile_repairs_changes_made_by_hand_in_the_lms() {
    let env = spawn(EnvOptions {
        users: 30,
        ..Default::default()
    })
    .await;
    env.reconcile().await;
    let ids = some_enabled_members(&env, 2);
    let (edited, deleted) = (env.lms_user(&ids[0]), env.lms_user(&ids[1]));
    let http = reqwest::Client::new();
    let r = http
        .patch(format!(
            "{}/Users/{}",
            env.scim.base_url(),
            edited["id"].as_str().unwrap()
        ))
        .bearer_auth(crate::common::SCIM_TOKEN)
        .header("Content-Type", "application/scim+json")
        .body(
            json!({"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations":[{"op":"replace","path":"title","value":"edited by hand"},
                          {"op":"replace","path":"active","value":false}]})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert!(env.scim.delete_user(deleted["id"].as_str().unwrap()));

    let plain = env.reconcile().await;
    assert_eq!(plain.changes.len(), 0, "a plain reconcile trusts the index");
    let deep = env
        .run(RunOptions {
            deep: true,
            ..Default::default()
        })
        .await;
    assert_eq!(deep.outcome, RunOutcome::Ok, "{:?}", deep.failures);
    let mut got: Vec<_> = deep
        .changes
        .iter()
        .filter(|c| c.action != Action::Update)
        .map(|c| (c.action, c.entra_id.clone()))
        .collect();
    got.sort();
    let mut want = vec![
        (Action::Reactivate, ids[0].clone()),
        (Action::Create, ids[1].clone()),
    ];
    want.sort();
    assert_eq!(got, want);
    // The re-created user has a new LMS id: its direct reports' manager links follow it.
    for c in deep.changes.iter().filter(|c| c.action == Action::Update) {
        assert_eq!(
            env.graph.user(&c.entra_id).unwrap().manager_id.as_deref(),
            Some(ids[1].as_str())
        );
        assert_eq!(c.changes.len(), 1);
        assert_eq!(c.changes[0].key, "enterprise.manager");
    }
    env.assert_lms_matches_tenant(upn);
    let again = env
        .run(RunOptions {
            deep: true,
            ..Default::default()
        })
        .await;
    assert_eq!(again.changes.len(), 0);
}

/// Delegates to the real SCIM target but answers 401 to creates after the first `ok` ones.
struct FailingAfter<'a> {
    inner: &'a rostersync::lms::scim::ScimTarget,
    ok: usize,
    calls: std::sync::atomic::AtomicUsize,
}

impl rostersync::lms::Target for FailingAfter<'_> {
    async fn discover(
        &self,
    ) -> Result<rostersync::lms::Capabilities, rostersync::lms::TargetError> {
        self.inner.discover().await
    }
    async fn find_by_external_id(
        &self,
        id: &str,
    ) -> Result<Option<rostersync::lms::TargetUser>, rostersync::lms::TargetError> {
        self.inner.find_by_external_id(id).await
    }
    async fn find_by_user_name(
        &self,
        n: &str,
    ) -> Result<Option<rostersync::lms::TargetUser>, rostersync::lms::TargetError> {
        self.inner.find_by_user_name(n).await
    }
    async fn create(
        &self,
        r: &rostersync::sync::mapping::Record,
    ) -> Result<Option<String>, rostersync::lms::TargetError> {
        if self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= self.ok {
            return Err(rostersync::lms::TargetError::Unauthorized);
        }
        self.inner.create(r).await
    }
    async fn update(
        &self,
        id: &str,
        c: &[rostersync::sync::mapping::AttrChange],
        r: &rostersync::sync::mapping::Record,
    ) -> Result<(), rostersync::lms::TargetError> {
        self.inner.update(id, c, r).await
    }
    async fn get(
        &self,
        id: &str,
    ) -> Result<Option<rostersync::lms::TargetUser>, rostersync::lms::TargetError> {
        self.inner.get(id).await
    }
    async fn list(
        &self,
        s: usize,
        c: usize,
    ) -> Result<(Vec<rostersync::lms::TargetUser>, usize), rostersync::lms::TargetError> {
        self.inner.list(s, c).await
    }
}

#[tokio::test]
async fn a_fatal_lms_error_mid_run_ends_the_run_instead_of_hanging() {
    // 5,000 members are six pages: the Graph reader is far ahead when the LMS fails.
    let env = spawn(EnvOptions {
        users: 5000,
        ..Default::default()
    })
    .await;
    let failing = FailingAfter {
        inner: &env.integration.target,
        ok: 100,
        calls: Default::default(),
    };
    let ctx = rostersync::sync::reconcile::Context {
        cfg: &env.integration.cfg,
        graph: &env.integration.graph,
        target: &failing,
        store: &env.integration.store,
        gate: &env.integration.gate,
    };
    let run = rostersync::sync::reconcile::reconcile(&ctx, RunOptions::default(), None);
    let (r, _) = tokio::time::timeout(std::time::Duration::from_secs(60), run)
        .await
        .expect("the run ends");
    assert_eq!(r.outcome, RunOutcome::Failed);
    assert!(r.error.as_deref().unwrap().contains("401"), "{:?}", r.error);
    assert_eq!(r.counts.deactivated, 0);
    // It stops after a fixed number of refused writes in a row (16), not one tied to the
    // concurrency ceiling (32); what was in flight then (at most the ceiling) is finished.
    assert!(
        r.counts.failed <= 16 + 32,
        "{} users failed before the run stopped",
        r.counts.failed
    );
}

#[tokio::test]
async fn a_manager_change_to_someone_outside_the_groups_removes_the_stale_link() {
    // Without the custom extension the manager link is the only manager attribute.
    let env = spawn(EnvOptions {
        users: 40,
        custom_extension: false,
        ..Default::default()
    })
    .await;
    env.reconcile().await;
    let id = env
        .member_ids()
        .into_iter()
        .find(|id| {
            let u = env.graph.user(id).unwrap();
            u.account_enabled && u.manager_id.as_deref().is_some_and(|m| m != env.fx.ceo_id)
        })
        .unwrap();
    assert!(env.lms_user(&id)[crate::common::ENTERPRISE]["manager"]["value"].is_string());
    let ceo = env.fx.ceo_id.clone();
    env.graph.update_user(&id, |u| u.manager_id = Some(ceo));
    let r = env.reconcile().await;
    assert_eq!(r.changes.len(), 1, "{:?}", r.changes);
    assert!(env.lms_user(&id)[crate::common::ENTERPRISE]
        .get("manager")
        .is_none());
    assert_eq!(env.reconcile().await.changes.len(), 0);
}

#[tokio::test]
async fn a_disabled_user_that_can_no_longer_be_mapped_is_still_deactivated() {
    let env = spawn(EnvOptions {
        users: 30,
        integration_extra: "username = \"mail\"".into(),
        ..Default::default()
    })
    .await;
    env.reconcile().await;
    let id = env
        .member_ids()
        .into_iter()
        .find(|id| {
            let u = env.graph.user(id).unwrap();
            u.account_enabled && u.mail.is_some()
        })
        .unwrap();
    // Offboarding: the account is disabled and the mailbox removed.
    env.graph.update_user(&id, |u| {
        u.account_enabled = false;
        u.mail = None;
    });
    let r = env.reconcile().await;
    assert!(
        r.changes
            .iter()
            .any(|c| c.action == Action::Deactivate && c.entra_id == id),
        "{:?}",
        r.changes
    );
    assert_eq!(env.lms_user(&id)["active"], false);
}

/// After the first run, a reconcile reads no manager one by one: managers come from the index,
/// corrected by a users delta round; a changed manager, a renamed manager (inside or outside
/// the groups) and a deleted one all reach the LMS as a run that read every manager would
/// write them (`--verify-managers` afterwards writes nothing).
#[tokio::test]
async fn managers_are_tracked_between_reconciles_and_agree_with_reading_them_all() {
    let env = spawn(EnvOptions {
        users: 120,
        ..Default::default()
    })
    .await;
    assert_eq!(env.reconcile().await.outcome, RunOutcome::Ok);
    let reads = || env.graph.request_count("manager");
    let before = reads();
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?}", r.error);
    assert_eq!(reads(), before, "a no-change run read managers one by one");
    assert_eq!(r.changes.len(), 0, "{:?}", r.changes);

    let ids = some_enabled_members(&env, 6);
    let outsider = env.fx.ceo_id.clone();
    // A report gets another manager; a member manager is renamed; the manager outside the
    // groups is renamed; a member manager is deleted.
    env.graph
        .update_user(&ids[0], |u| u.manager_id = Some(ids[1].clone()));
    let renamed_manager =
        env.member_ids()
            .into_iter()
            .find(|m| {
                *m != outsider
                    && env.member_ids().iter().any(|r| {
                        env.graph.user(r).unwrap().manager_id.as_deref() == Some(m.as_str())
                    })
            })
            .expect("a member who manages someone");
    env.graph.update_user(&renamed_manager, |u| {
        u.display_name = Some("Renamed Manager".into());
        u.mail = Some("renamed.manager@contoso.example".into())
    });
    env.graph.update_user(&outsider, |u| {
        u.mail = Some("ceo.renamed@contoso.example".into())
    });
    let doomed =
        env.member_ids()
            .into_iter()
            .find(|m| {
                *m != renamed_manager
                    && *m != ids[1]
                    && env.member_ids().iter().any(|r| {
                        env.graph.user(r).unwrap().manager_id.as_deref() == Some(m.as_str())
                    })
            })
            .expect("another member who manages someone");
    env.graph.delete_user(&doomed);
    let before = reads();
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?} {:?}", r.error, r.failures);
    assert!(
        reads() - before < 40,
        "{} managers read one by one for a handful of changes",
        reads() - before
    );
    env.assert_lms_matches_tenant(upn);
    let verify = env
        .run(RunOptions {
            verify_managers: true,
            ..Default::default()
        })
        .await;
    assert!(
        reads() - before >= 100,
        "--verify-managers reads every member's manager"
    );
    assert_eq!(verify.changes.len(), 0, "{:?}", verify.changes);
}

/// A manager deleted and then restored between reconciles: the reports lose the link and get
/// it back, and the runs after each read no manager one by one (a manager read once for a
/// user the run settled is not read again at every later run).
#[tokio::test]
async fn a_deleted_then_restored_manager_is_linked_again_and_costs_no_reads_after() {
    let env = spawn(EnvOptions {
        users: 120,
        ..Default::default()
    })
    .await;
    assert_eq!(env.reconcile().await.outcome, RunOutcome::Ok);
    let outsider = env.fx.ceo_id.clone();
    let manages = |m: &str| {
        env.member_ids()
            .iter()
            .any(|r| env.graph.user(r).unwrap().manager_id.as_deref() == Some(m))
    };
    let boss = env
        .member_ids()
        .into_iter()
        .find(|m| *m != outsider && manages(m))
        .expect("a member who manages someone");

    assert!(env.graph.soft_delete_user(&boss));
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?}", r.error);
    env.assert_lms_matches_tenant(upn);
    settled(&env, "the run after the deletion").await;

    assert!(env.graph.restore_user(&boss));
    assert!(
        manages(&boss),
        "restored, the manager has its reports again"
    );
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?}", r.error);
    env.assert_lms_matches_tenant(upn);
    settled(&env, "the run after the restore").await;
}

/// A reconcile that changes nothing and reads no manager one by one.
async fn settled(env: &crate::common::TestEnv, what: &str) {
    let before = env.graph.request_count("manager");
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Ok, "{what}: {:?}", r.error);
    assert_eq!(r.changes.len(), 0, "{what}: {:?}", r.changes);
    assert_eq!(
        env.graph.request_count("manager"),
        before,
        "{what}: managers read one by one again"
    );
}

/// A deactivation never rests on a confirming answer that took over a second (Graph slowed by
/// throttling, say): the user may have come back meanwhile. After three slow answers the
/// reconcile leaves the departure to the next run, and says so; the next run writes it.
#[tokio::test]
async fn a_departure_confirmed_only_slowly_is_left_to_the_next_run() {
    let env = spawn(EnvOptions {
        users: 20,
        ..Default::default()
    })
    .await;
    assert_eq!(env.reconcile().await.outcome, RunOutcome::Ok);
    let gone = some_enabled_members(&env, 1).remove(0);
    env.graph.remove_member(&env.fx.all_group_id, &gone);
    env.graph.remove_member(&env.fx.nested_group_id, &gone);
    env.graph.set_latency(Some(Latency {
        fixed: Duration::from_millis(1_100),
        jitter: Duration::ZERO,
        seed: 1,
    }));
    let r = env.reconcile().await;
    env.graph.set_latency(None);
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?}", r.error);
    assert!(r.changes.is_empty(), "{:?}", r.changes);
    assert_eq!(env.lms_user(&gone)["active"], true);
    assert!(
        r.notes.iter().any(|n| n.contains("left to the next run")),
        "{:?}",
        r.notes
    );
    let t = env
        .integration
        .store
        .trace(&gone)
        .unwrap()
        .expect("a trace");
    assert_eq!(t.outcome, Outcome::Skipped, "{t:?}");
    assert_eq!(
        env.integration.store.queue_len(),
        1,
        "handed to the incremental worker"
    );

    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?}", r.error);
    assert_eq!(env.lms_user(&gone)["active"], false);
}

/// Two departures confirmed together, one throttled (429, Retry-After 2 s): the other is
/// written on its answer at once (not held while the throttled one waits out its Retry-After,
/// which would write it on an answer two seconds old), and the throttled one is handed to the
/// incremental worker (a queued hint) rather than read again within the run.
#[tokio::test]
async fn a_throttled_confirmation_does_not_hold_the_others() {
    let env = spawn(EnvOptions {
        users: 20,
        integration_extra: "max_deactivations = 10".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(env.reconcile().await.outcome, RunOutcome::Ok);
    let gone = some_enabled_members(&env, 2);
    for id in &gone {
        env.graph.remove_member(&env.fx.all_group_id, id);
        env.graph.remove_member(&env.fx.nested_group_id, id);
    }
    env.graph
        .throttle_path(&format!("users/{}/checkMemberGroups", gone[0]), 1, 2);
    env.graph.record_user_reads(true);
    env.scim.record_writes(true);
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?}", r.error);
    assert_eq!(env.lms_user(&gone[1])["active"], false);
    assert_eq!(env.lms_user(&gone[0])["active"], true, "left to the worker");
    assert_eq!(
        env.integration.store.queue_len(),
        1,
        "handed to the incremental worker"
    );
    // The deactivation followed its confirming read closely.
    let read = env
        .graph
        .user_reads()
        .into_iter()
        .filter(|u| u.user == gone[1].to_lowercase() && u.kind == "checkMemberGroups")
        .map(|u| u.at)
        .max()
        .expect("a confirming read");
    let lms_id = env.lms_user(&gone[1])["id"].as_str().unwrap().to_string();
    let write = env
        .scim
        .writes()
        .into_iter()
        .filter(|w| w.id == lms_id && w.active_after == Some(false))
        .map(|w| w.at)
        .max()
        .expect("the deactivation");
    assert!(
        write.duration_since(read) < Duration::from_secs(1),
        "written {:?} after its confirming read",
        write.duration_since(read)
    );
}
