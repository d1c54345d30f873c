//! Decision traces: `sync-user` (one user, now, and why), the traces the reconcile and the
//! incremental worker record, and `explain`, against the simulators over real HTTP.

use crate::common::{rostersync, spawn, text, EnvOptions, TestEnv, SCIM_TOKEN};
use rostersync::store::queue::{Hint, QueueItem};
use rostersync::sync::plan::Action;
use rostersync::sync::reconcile::RunOutcome;
use rostersync::sync::sync_user::{sync_user, SyncUserError};
use rostersync::sync::trace::{
    explain, Answer, Match, OutOfScope, Outcome, Path as ViaPath, Source,
};
use rostersync::sync::worker::{self, WorkerSettings};
use rostersync_sim::graph::{SimUser, FIXTURE_CLIENT_SECRET};
use serde_json::{json, Value};

async fn env(users: usize) -> TestEnv {
    spawn(EnvOptions {
        users,
        ..Default::default()
    })
    .await
}

/// A new enabled user, shaped like an existing member, with a title of its own.
fn hire(env: &TestEnv, n: u32) -> SimUser {
    let template = env
        .member_ids()
        .into_iter()
        .filter_map(|id| env.graph.user(&id))
        .find(|u| u.account_enabled && u.id != env.fx.ceo_id)
        .expect("an enabled member");
    let upn = format!("trace.hire{n}@contoso-sim.onmicrosoft.com");
    let u = SimUser {
        id: format!("aaaaaaaa-0000-4000-8000-{n:012}"),
        user_principal_name: upn.clone(),
        mail: Some(upn),
        display_name: Some(format!("Trace Hire {n}")),
        job_title: Some(format!("Learning Engineer {n}")),
        ..template
    };
    env.graph.upsert_user(u.clone());
    u
}

/// Members of the nested group that are not direct members of the configured group.
fn nested_only(env: &TestEnv) -> Vec<String> {
    let direct = env.graph.group(&env.fx.all_group_id).unwrap().members;
    env.graph
        .transitive_user_ids(&env.fx.nested_group_id)
        .into_iter()
        .filter(|id| !direct.contains(id))
        .filter(|id| env.graph.user(id).is_some_and(|u| u.account_enabled))
        .collect()
}

fn config_file(env: &TestEnv) -> std::path::PathBuf {
    let p = env.dir.path().join("rostersync.toml");
    std::fs::write(&p, &env.config_toml).unwrap();
    p
}

fn no_secret(out: &str) {
    assert!(
        !out.contains(FIXTURE_CLIENT_SECRET),
        "client secret leaked: {out}"
    );
    assert!(!out.contains(SCIM_TOKEN), "SCIM token leaked: {out}");
}

#[tokio::test]
async fn sync_user_creates_a_new_direct_member_and_says_why() {
    let env = env(30).await;
    assert_eq!(env.reconcile().await.outcome, RunOutcome::Ok);
    let u = hire(&env, 1);
    env.graph.add_member(&env.fx.all_group_id, &u.id);

    let t = sync_user(&env.integration.context(), &u.id, false)
        .await
        .expect("sync-user");
    assert_eq!(t.outcome, Outcome::Created, "{}", t.render());
    assert_eq!((t.source, t.run.as_str()), (Source::SyncUser, "sync-user"));
    let via = &t.scope.via;
    assert!(t.scope.in_scope && via.len() == 1, "{:?}", t.scope);
    assert_eq!(via[0].group_id, env.fx.all_group_id);
    assert_eq!(via[0].group_name.as_deref(), Some("All Employees"));
    assert_eq!(via[0].path, ViaPath::Direct);
    let lms = env.lms_user(&u.id);
    let lms_id = lms["id"].as_str().unwrap().to_string();
    assert_eq!(
        t.matched,
        Match::Created {
            target_id: lms_id.clone()
        }
    );
    assert_eq!(t.plan.as_ref().map(|p| p.action), Some(Action::Create));
    let mapped = serde_json::to_value(&t.mapped).unwrap();
    assert_eq!(mapped["title"], "Learning Engineer 1");
    assert_eq!(mapped["userName"], u.user_principal_name.as_str());
    assert_eq!(t.answer, Some(Answer::Ok { target_id: lms_id }));
    assert_eq!(lms["title"], "Learning Engineer 1");

    let out = t.render();
    for want in [
        "in scope: direct member of \"All Employees\"",
        "match      not in the index → created LMS user",
        "title = \"Learning Engineer 1\"",
        "plan       create",
        "answer     ok, LMS user id",
        "outcome    created",
    ] {
        assert!(out.contains(want), "{want:?} missing in:\n{out}");
    }
    // Stored, and found by UPN as well as by id.
    let store = &env.integration.store;
    assert_eq!(store.trace(&u.id).unwrap().as_ref(), Some(&t));
    assert_eq!(
        store
            .trace_by_name(&u.user_principal_name)
            .unwrap()
            .as_ref(),
        Some(&t)
    );
    // Again: nothing to change, and the trace says so (sync-user always records).
    env.scim.reset_counts();
    let again = sync_user(&env.integration.context(), &u.user_principal_name, false)
        .await
        .unwrap();
    assert_eq!(again.outcome, Outcome::Unchanged, "{}", again.render());
    assert!(matches!(again.matched, Match::Index { .. }));
    assert_eq!(env.writes(), 0);
}

#[tokio::test]
async fn a_member_of_the_nested_group_is_in_scope_through_it() {
    let env = env(30).await;
    env.reconcile().await;
    let u = hire(&env, 2);
    env.graph.add_member(&env.fx.nested_group_id, &u.id);

    // The Graph client reads both membership lists by UPN.
    let graph = &env.integration.graph;
    let direct = graph
        .user_groups(&u.user_principal_name, false)
        .await
        .unwrap();
    let all = graph
        .user_groups(&u.user_principal_name, true)
        .await
        .unwrap();
    assert_eq!(
        direct.iter().map(|g| g.id.as_str()).collect::<Vec<_>>(),
        vec![env.fx.nested_group_id.as_str()]
    );
    assert!(all.iter().any(|g| g.id == env.fx.all_group_id) && all.len() == 2);

    let t = sync_user(&env.integration.context(), &u.user_principal_name, false)
        .await
        .unwrap();
    assert_eq!(t.outcome, Outcome::Created, "{}", t.render());
    assert_eq!(t.scope.via.len(), 1);
    assert_eq!(t.scope.via[0].group_id, env.fx.all_group_id);
    assert_eq!(
        t.scope.via[0].path,
        ViaPath::Nested {
            group_id: env.fx.nested_group_id.clone(),
            group_name: Some("Contractors".into())
        }
    );
    let out = t.render();
    assert!(
        out.contains("member of \"All Employees\" (")
            && out.contains("through nested group \"Contractors\""),
        "{out}"
    );
}

#[tokio::test]
async fn a_dry_run_prints_the_plan_and_applies_nothing() {
    let env = env(20).await;
    let cfg = config_file(&env);
    let u = hire(&env, 3);
    env.graph.add_member(&env.fx.all_group_id, &u.id);
    env.scim.reset_counts();
    let o = rostersync(&["sync-user", &u.user_principal_name, "--dry-run"], &cfg).await;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert_eq!(env.writes(), 0, "a dry run writes nothing to the LMS");
    assert!(env.scim.user_by_external_id(&u.id).is_none());
    for want in [
        "(dry run)",
        "direct member of \"All Employees\"",
        "not in the index → create",
        "plan       create",
        "title = \"Learning Engineer 3\"",
        "nothing sent (dry run)",
        "outcome    planned (dry run)",
    ] {
        assert!(out.contains(want), "{want:?} missing in:\n{out}");
    }
    no_secret(&out);
    // Nothing recorded either: explain knows nothing of the user.
    let o = rostersync(&["explain", &u.user_principal_name], &cfg).await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
}

#[tokio::test]
async fn explain_by_upn_says_a_disabled_user_is_inactive_because_of_account_enabled() {
    let env = env(30).await;
    let cfg = config_file(&env);
    let o = rostersync(&["reconcile"], &cfg).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let victim = env
        .member_ids()
        .into_iter()
        .filter_map(|id| env.graph.user(&id))
        .find(|u| u.account_enabled && u.id != env.fx.ceo_id)
        .unwrap();
    env.graph
        .update_user(&victim.id, |u| u.account_enabled = false);
    let o = rostersync(&["reconcile"], &cfg).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    let o = rostersync(
        &["explain", &victim.user_principal_name.to_uppercase()],
        &cfg,
    )
    .await;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    for want in [
        "now        inactive in the LMS",
        "why        inactive since",
        "disabled in Entra (accountEnabled = false)",
        "by reconcile",
        "no change since",
        "active: true → false",
    ] {
        assert!(out.contains(want), "{want:?} missing in:\n{out}");
    }
    no_secret(&out);

    // By object id, as JSON.
    let o = rostersync(&["explain", &victim.id, "--json"], &cfg).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v[0]["entra_id"], victim.id.as_str());
    assert_eq!(v[0]["index"]["active"], false);
    assert_eq!(v[0]["trace"]["outcome"], "deactivated");
    assert_eq!(v[0]["trace"]["scope"]["out"], "disabled");
    assert_eq!(v[0]["trace"]["source"], "reconcile");
}

#[tokio::test]
async fn a_user_removed_from_the_groups_is_explained_as_having_left_all_groups() {
    let env = env(30).await;
    env.reconcile().await;
    let store = &env.integration.store;
    let leaver = env.member_ids()[3].clone();
    let e = explain(store, &leaver).unwrap();
    let created = e.trace.expect("the reconcile traced the create");
    assert_eq!(created.outcome, Outcome::Created);
    assert_eq!(created.scope.via[0].path, ViaPath::Transitive);
    assert!(created
        .render()
        .contains("listed among the members of \"All Employees\""));

    env.graph.remove_member(&env.fx.all_group_id, &leaver);
    env.graph.remove_member(&env.fx.nested_group_id, &leaver);
    let r = env.reconcile().await;
    assert_eq!(r.counts.deactivated, 1);
    let e = explain(store, &leaver).unwrap();
    let t = e.trace.as_ref().unwrap();
    assert_eq!(t.outcome, Outcome::Deactivated);
    assert_eq!(t.scope.out, Some(OutOfScope::LeftAllGroups));
    assert!(!e.index.as_ref().unwrap().active);
    let out = rostersync::sync::trace::render_explanation(&e);
    assert!(
        out.contains("inactive since") && out.contains("left all groups"),
        "{out}"
    );
}

/// A first reconcile stores no trace per created user (the index entry refers to one shape per
/// run and group); `explain` still tells each one whole, and a later decision replaces it.
#[tokio::test]
async fn a_first_reconciles_creates_are_explained_from_their_index_entries() {
    let env = env(60).await;
    let r = env.reconcile().await;
    let store = &env.integration.store;
    assert!(r.counts.created >= 50, "{:?}", r.counts);
    assert_eq!(
        store.stored_trace_count() as u64,
        r.counts.skipped,
        "only the skipped members' traces are stored whole"
    );
    let mut explained = 0;
    for id in env.member_ids() {
        let e = explain(store, &id).unwrap();
        let Some(index) = &e.index else { continue };
        let t = e.trace.as_ref().expect("every created user has a trace");
        assert_eq!(t.outcome, Outcome::Created, "{id}");
        assert_eq!(
            (t.source, t.run.as_str()),
            (Source::Reconcile, r.run_id.as_str())
        );
        assert_eq!(t.entra_id, id);
        assert_eq!(t.user_name.as_deref(), Some(index.user_name.as_str()));
        let upn = env.graph.user(&id).unwrap().user_principal_name;
        assert_eq!(t.upn.as_deref(), Some(upn.as_str()));
        assert_eq!(
            t.matched,
            Match::Created {
                target_id: index.target_id.clone()
            }
        );
        assert_eq!(
            t.answer,
            Some(Answer::Ok {
                target_id: index.target_id.clone()
            })
        );
        assert_eq!(t.mapped.as_ref(), Some(&index.record));
        assert!(t.scope.in_scope);
        assert_eq!(t.scope.via[0].group_id, env.fx.all_group_id);
        assert!(t.at >= r.started_at && t.at <= r.finished_at);
        // Found by UPN too, and told in words.
        assert_eq!(explain(store, &upn).unwrap().trace.as_ref(), Some(t));
        let out = rostersync::sync::trace::render_explanation(&e);
        assert!(out.contains("created"), "{out}");
        explained += 1;
    }
    assert_eq!(explained as u64, r.counts.created);

    // A change of one of them is traced whole and told instead.
    let id = env
        .member_ids()
        .into_iter()
        .find(|id| explain(store, id).unwrap().index.is_some() && *id != env.fx.ceo_id)
        .unwrap();
    let mut u = env.graph.user(&id).unwrap();
    u.job_title = Some("Chief Explainer".into());
    env.graph.upsert_user(u);
    let again = env.reconcile().await;
    assert_eq!(again.counts.updated, 1);
    let t = explain(store, &id).unwrap().trace.unwrap();
    assert_eq!(
        (t.outcome, t.run.as_str()),
        (Outcome::Updated, again.run_id.as_str())
    );
}

#[tokio::test]
async fn a_no_change_reconcile_records_no_trace() {
    let env = env(60).await;
    env.reconcile().await;
    let store = &env.integration.store;
    let traced = store.trace_count();
    assert!(
        traced >= 55,
        "creates (and skipped disabled members) are traced: {traced}"
    );
    let latest = |s: &rostersync::store::IntegrationStore| {
        env.member_ids()
            .iter()
            .filter_map(|id| s.trace(id).unwrap())
            .map(|t| t.at)
            .max()
            .unwrap()
    };
    let before = latest(store);
    // A disabled member is never created; the trace says so (recorded once).
    let disabled = env
        .member_ids()
        .into_iter()
        .find(|id| env.graph.user(id).is_some_and(|u| !u.account_enabled))
        .expect("the fixture has disabled members");
    let e = explain(store, &disabled).unwrap();
    assert!(e.index.is_none());
    let t = e.trace.expect("skip traced");
    assert_eq!(t.outcome, Outcome::Skipped);
    assert_eq!(t.scope.out, Some(OutOfScope::Disabled));
    assert!(t.summary().starts_with("not in the LMS"), "{}", t.summary());
    let again = env.reconcile().await;
    assert_eq!(
        again.counts.unchanged + again.counts.skipped,
        again.counts.members
    );
    assert_eq!(store.trace_count(), traced);
    assert_eq!(latest(store), before, "no trace was rewritten");
}

#[tokio::test]
async fn a_user_the_lms_rejects_exits_2_with_the_lms_answer_in_the_trace() {
    let env = env(20).await;
    let cfg = config_file(&env);
    let u = hire(&env, 4);
    env.graph.add_member(&env.fx.all_group_id, &u.id);
    // Made by hand in the LMS for another identity: same userName, another externalId.
    env.scim
        .insert_user(
            json!({"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],
            "userName": u.user_principal_name, "externalId": "someone-else", "active": true}),
        )
        .unwrap();
    let o = rostersync(&["sync-user", &u.id], &cfg).await;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}");
    for want in [
        "answer     error:",
        "is taken in the LMS",
        "another identity",
        "outcome    failed",
    ] {
        assert!(out.contains(want), "{want:?} missing in:\n{out}");
    }
    no_secret(&out);
    let o = rostersync(&["sync-user", &u.id, "--json"], &cfg).await;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v[0]["outcome"], "failed");
    assert_eq!(v[0]["answer"]["result"], "error");
    // explain remembers it.
    let o = rostersync(&["explain", &u.user_principal_name], &cfg).await;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(
        out.contains("why        failed") && out.contains("another identity"),
        "{out}"
    );
    assert!(out.contains("now        not in the LMS"), "{out}");
}

#[tokio::test]
async fn explain_and_sync_user_say_plainly_when_nobody_is_known() {
    let env = env(10).await;
    let cfg = config_file(&env);
    let o = rostersync(&["explain", "nobody@contoso-sim.onmicrosoft.com"], &cfg).await;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("nothing is known about \"nobody@contoso-sim.onmicrosoft.com\""),
        "{out}"
    );
    let o = rostersync(&["sync-user", "nobody@contoso-sim.onmicrosoft.com"], &cfg).await;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("no user \"nobody@contoso-sim.onmicrosoft.com\" in Entra"),
        "{out}"
    );
    // The library says the same with a typed error.
    let r = sync_user(&env.integration.context(), "nobody@x.example", true).await;
    assert!(matches!(r, Err(SyncUserError::NotFound(_))));
}

#[tokio::test]
async fn the_incremental_worker_traces_the_direct_or_nested_group() {
    let env = env(60).await;
    env.reconcile().await;
    let ctx = env.integration.context();
    let tg = worker::targeting(&ctx).await.unwrap();
    worker::init_tree(&ctx).await.unwrap();
    let direct = env.graph.group(&env.fx.all_group_id).unwrap().members;
    let direct_member = direct
        .iter()
        .find(|id| {
            env.graph
                .user(id)
                .is_some_and(|u| u.account_enabled && u.id != env.fx.ceo_id)
        })
        .unwrap()
        .clone();
    let nested_member = nested_only(&env).remove(0);
    for id in [&direct_member, &nested_member] {
        env.graph
            .update_user(id, |u| u.job_title = Some("Promoted".into()));
    }
    let items: Vec<QueueItem> = [&direct_member, &nested_member]
        .iter()
        .map(|id| {
            QueueItem::new(Hint::User {
                user_id: id.to_string(),
                follow_up: true,
            })
        })
        .collect();
    let ids = env.integration.store.enqueue(&items).unwrap();
    let (out, result) = worker::process(
        &ctx,
        &tg,
        &WorkerSettings::default(),
        ids.into_iter().zip(items).collect(),
    )
    .await;
    result.unwrap();
    assert_eq!(out.changes.len(), 2, "{:?}", out.failed);

    let store = &env.integration.store;
    let t = store.trace(&direct_member).unwrap().unwrap();
    assert_eq!(
        (t.source, t.outcome),
        (Source::Incremental, Outcome::Updated)
    );
    assert_eq!(t.run, "incremental");
    assert_eq!(t.scope.via[0].path, ViaPath::Direct);
    assert_eq!(t.scope.via[0].group_name.as_deref(), Some("All Employees"));
    let p = t.plan.as_ref().unwrap();
    assert_eq!(p.changes.len(), 1);
    assert_eq!(p.changes[0].key, "title");
    assert!(t.summary().starts_with("updated") && t.summary().contains("title"));

    let t = store.trace(&nested_member).unwrap().unwrap();
    assert_eq!(t.outcome, Outcome::Updated);
    assert_eq!(t.scope.via[0].group_id, env.fx.all_group_id);
    assert!(
        matches!(&t.scope.via[0].path, ViaPath::Nested { group_id, .. } if *group_id == env.fx.nested_group_id),
        "{:?}",
        t.scope
    );
}
