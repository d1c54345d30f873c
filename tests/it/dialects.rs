//! rostersync against every SCIM dialect the simulator reproduces (strict, replace-only, no
//! clearing at all, PUT-only, no filters, and a partial library with every quirk at once):
//! first sync, a no-change run and a no-change `--deep` run that write nothing, updates,
//! clears, manager hire and change, disable, leave, return, adoption and `sync-user`.

use std::collections::HashSet;

use crate::common::{spawn, EnvOptions, TestEnv, ENTERPRISE};
use rostersync::lms::dialect::{CaseRule, Clear, FilterAttr, PatchOp};
use rostersync::lms::probe::{ProbeReport, ProbeRow, RowStatus};
use rostersync::output::render_checks;
use rostersync::sync::reconcile::{RunOptions, RunOutcome, RunReport};
use rostersync::sync::sync_user::sync_user;
use rostersync::sync::trace::Outcome as TraceOutcome;
use rostersync_sim::graph::SimUser;
use rostersync_sim::scim::SimDialect;
use serde_json::{json, Value};

const CUSTOM: &str = rostersync::config::DEFAULT_CUSTOM_SCHEMA;

async fn env_for(d: &SimDialect, users: usize) -> TestEnv {
    spawn(EnvOptions {
        users,
        dialect: d.clone(),
        ..Default::default()
    })
    .await
}

fn enabled_members(env: &TestEnv) -> Vec<SimUser> {
    env.member_ids()
        .into_iter()
        .filter_map(|id| env.graph.user(&id))
        .filter(|u| u.account_enabled && u.id != env.fx.ceo_id)
        .collect()
}

/// The work e-mail as the LMS holds it: typed work, else the untyped primary or sole one.
fn work_mail(l: &Value) -> Option<String> {
    let items = l.get("emails")?.as_array()?;
    let typed = items.iter().find(|e| e["type"] == "work");
    let untyped = items
        .iter()
        .find(|e| e.get("type").is_none() && (items.len() == 1 || e["primary"] == true));
    typed
        .or(untyped)
        .and_then(|e| e["value"].as_str())
        .map(str::to_string)
}

/// Asserts the LMS holds what the tenant says, except (user, field) pairs in `stale` (a
/// dialect made changing them impossible) and a displayName the LMS computes itself.
fn assert_converged(env: &TestEnv, d: &SimDialect, stale: &HashSet<(String, &str)>) {
    let members = env.member_ids();
    let lms = env.lms_by_external_id();
    let ok = |id: &str, f: &str| !stale.contains(&(id.to_string(), f));
    for id in &members {
        let u = env.graph.user(id).expect("member");
        let Some(l) = lms.get(id) else {
            assert!(!u.account_enabled, "member {id} is missing in the LMS");
            continue;
        };
        assert_eq!(
            l["userName"].as_str().map(str::to_lowercase),
            Some(u.user_principal_name.to_lowercase()),
            "userName of {id}"
        );
        assert_eq!(l["active"], u.account_enabled, "active of {id}");
        if ok(id, "title") {
            // "" is no value (servers that clear with replace "" keep it).
            assert_eq!(
                l.get("title")
                    .and_then(|v| v.as_str())
                    .filter(|t| !t.is_empty()),
                u.job_title.as_deref(),
                "title of {id}"
            );
        }
        assert_eq!(
            l.pointer("/name/familyName").and_then(|v| v.as_str()),
            u.surname.as_deref(),
            "familyName of {id}"
        );
        if !d.computed_display_name {
            assert_eq!(
                l.get("displayName").and_then(|v| v.as_str()),
                u.display_name.as_deref(),
                "displayName of {id}"
            );
        }
        assert_eq!(work_mail(l), u.mail.clone(), "work e-mail of {id}");
        let ent = |k: &str| {
            l.get(ENTERPRISE)
                .and_then(|e| e.get(k))
                .and_then(|v| v.as_str())
        };
        assert_eq!(
            ent("department"),
            u.department.as_deref(),
            "department of {id}"
        );
        let manager = u.manager_id.as_ref().and_then(|m| env.graph.user(m));
        let want = manager
            .as_ref()
            .and_then(|m| lms.get(&m.id))
            .and_then(|m| m["id"].as_str());
        if ok(id, "manager") {
            assert_eq!(
                l.get(ENTERPRISE)
                    .and_then(|e| e.pointer("/manager/value"))
                    .and_then(|v| v.as_str()),
                want,
                "manager link of {id}"
            );
        }
        assert_eq!(
            l.get(CUSTOM)
                .and_then(|c| c.get("managerEmail"))
                .and_then(|v| v.as_str()),
            manager.as_ref().and_then(|m| m.mail.as_deref()),
            "managerEmail of {id}"
        );
    }
    for (ext, l) in &lms {
        if !members.contains(ext) {
            assert_eq!(l["active"], false, "non-member {ext} is still active");
        }
    }
}

fn ok(name: &str, r: &RunReport) {
    assert!(
        matches!(r.outcome, RunOutcome::Ok),
        "{name}: {:?} {:?} {:?}",
        r.outcome,
        r.error,
        r.failures
    );
}

/// Runs a reconcile and says how many writes (POST, PATCH, PUT, DELETE) it made.
async fn writes_of(env: &TestEnv, deep: bool) -> (RunReport, u64) {
    env.scim.reset_counts();
    let r = env
        .run(RunOptions {
            deep,
            ..Default::default()
        })
        .await;
    (r, env.writes())
}

/// `check --probe` against the simulator: prints its table, checks that no canary stays
/// active, and returns the report.
async fn probe(name: &str, env: &TestEnv) -> ProbeReport {
    let line = env.integration.probe(false).await;
    println!("{name}:\n{}", render_checks(std::slice::from_ref(&line)));
    let p = line
        .probe
        .clone()
        .unwrap_or_else(|| panic!("{name}: {}", line.detail));
    for u in env.scim.users() {
        if u["userName"]
            .as_str()
            .unwrap_or("")
            .to_lowercase()
            .starts_with("rostersync-probe-")
        {
            assert_eq!(u["active"], false, "{name}: a canary is left active: {u}");
        }
    }
    p
}

fn row<'a>(p: &'a ProbeReport, op: &str) -> &'a ProbeRow {
    p.rows
        .iter()
        .find(|r| r.operation.starts_with(op))
        .unwrap_or_else(|| panic!("no probe row {op:?} in {:#?}", p.rows))
}

async fn lifecycle(name: &str, d: SimDialect, probed: bool) {
    let env = env_for(&d, 24).await;
    if probed {
        let p = probe(name, &env).await;
        assert!(p.rows.len() > 20, "{name}: {:#?}", p.rows);
    }
    let members = enabled_members(&env);
    // Adoption: a user made by hand in the LMS with a member's userName (in another case,
    // where the LMS compares userNames case-insensitively or the probe found out that it
    // does not), without externalId.
    let adopted = members[0].clone();
    let hand_name = if d.case_sensitive_user_names && !probed {
        adopted.user_principal_name.clone()
    } else {
        adopted.user_principal_name.to_uppercase()
    };
    let hand_id = env
        .scim
        .insert_user(
            json!({"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],
            "userName": hand_name, "title": "set by hand", "active": true}),
        )
        .unwrap();

    // First sync: one POST per created user (plus the one answered 409 for the adopted user).
    env.scim.reset_counts();
    let r = env.reconcile().await;
    ok(name, &r);
    let posts = env.scim.request_count("POST");
    // A user adopted after a 409 counts as created; where userNames are unique
    // case-sensitively, the adoption is found before posting (no POST at all).
    assert!(
        posts + 1 >= r.counts.created && posts <= r.counts.created + 1,
        "{name}: {posts} POSTs for {} creates",
        r.counts.created
    );
    let first_writes = env.writes();
    let l = env.lms_user(&adopted.id);
    assert_eq!(l["id"], hand_id.as_str(), "{name}: adopted, not duplicated");
    assert_converged(&env, &d, &HashSet::new());
    println!("{name}: first sync notes: {:?}", r.notes);
    println!(
        "{name}: first sync: {} users created, {first_writes} writes ({posts} POST, {} PATCH, {} PUT, {} GET)",
        r.counts.created,
        env.scim.request_count("PATCH"),
        env.scim.request_count("PUT"),
        env.scim.request_count("GET")
    );

    // Nothing changed: no write, plain or deep.
    let (r, w) = writes_of(&env, false).await;
    ok(name, &r);
    assert_eq!(
        w, 0,
        "{name}: a no-change run writes nothing: {:?}",
        r.changes
    );
    let (r, w) = writes_of(&env, true).await;
    ok(name, &r);
    assert_eq!(
        w, 0,
        "{name}: a no-change --deep run writes nothing: {:?} {:?}",
        r.changes, r.notes
    );
    println!("{name}: no-change --deep: {w} writes");

    // Updates, clears, a manager change, a disable and a leaver, in one run.
    let with_manager: Vec<&SimUser> = members[1..]
        .iter()
        .filter(|u| {
            u.manager_id
                .as_deref()
                .is_some_and(|m| m != env.fx.ceo_id && m != adopted.id)
        })
        .collect();
    let (moved, orphaned) = (with_manager[0].id.clone(), with_manager[1].id.clone());
    let managers: Vec<String> = members
        .iter()
        .filter_map(|u| u.manager_id.clone())
        .collect();
    let rest: Vec<String> = members[1..]
        .iter()
        .map(|u| u.id.clone())
        .filter(|id| *id != moved && *id != orphaned && !managers.contains(id))
        .collect();
    let (promoted, cleared, disabled, leaver) = (
        rest[0].clone(),
        rest[1].clone(),
        rest[2].clone(),
        rest[3].clone(),
    );
    let old_manager = env.graph.user(&moved).unwrap().manager_id;
    let new_manager = members
        .iter()
        .map(|m| m.id.clone())
        .find(|m| managers.contains(m) && Some(m) != old_manager.as_ref() && *m != moved)
        .unwrap();
    env.graph
        .update_user(&promoted, |u| u.job_title = Some("Head of Learning".into()));
    env.graph.update_user(&cleared, |u| u.job_title = None);
    let nm = new_manager.clone();
    env.graph.update_user(&moved, |u| u.manager_id = Some(nm));
    let ceo = env.fx.ceo_id.clone();
    env.graph
        .update_user(&orphaned, |u| u.manager_id = Some(ceo));
    env.graph
        .update_user(&disabled, |u| u.account_enabled = false);
    env.graph.remove_member(&env.fx.all_group_id, &leaver);
    env.graph.remove_member(&env.fx.nested_group_id, &leaver);
    let r = env.reconcile().await;
    ok(name, &r);
    let mut stale: HashSet<(String, &str)> = HashSet::new();
    if d.refuse_null && d.refuse_empty && d.no_put {
        // Nothing can clear a value here: one warning per user and field, no failure.
        stale.insert((cleared.clone(), "title"));
        stale.insert((orphaned.clone(), "manager"));
        let cleared_name = env.graph.user(&cleared).unwrap().user_principal_name;
        let warned = r
            .notes
            .iter()
            .filter(|n| n.contains(&cleared_name) && n.contains("title"))
            .count();
        assert_eq!(
            warned, 1,
            "{name}: one warning for the title: {:?}",
            r.notes
        );
        assert!(env.lms_user(&cleared)["title"].is_string());
    } else {
        let title = env.lms_user(&cleared).get("title").cloned();
        assert!(
            title.is_none() || title == Some(json!("")),
            "{name}: title cleared: {title:?}"
        );
    }
    assert_eq!(
        env.lms_user(&promoted)["title"],
        "Head of Learning",
        "{name}"
    );
    assert_eq!(env.lms_user(&disabled)["active"], false, "{name}");
    assert_eq!(env.lms_user(&leaver)["active"], false, "{name}");
    assert_converged(&env, &d, &stale);
    let (r, w) = writes_of(&env, false).await;
    ok(name, &r);
    assert_eq!(w, 0, "{name}: settled after the changes: {:?}", r.changes);
    let (r, w) = writes_of(&env, true).await;
    ok(name, &r);
    assert_eq!(
        w, 0,
        "{name}: --deep settled after the changes: {:?}",
        r.changes
    );
    if !stale.is_empty() {
        assert!(
            r.notes.iter().any(|n| n.contains("title")),
            "{name}: --deep warns again, once per run: {:?}",
            r.notes
        );
    }

    // Return: re-enabled and re-added users are reactivated; a manager and a report hired.
    env.graph
        .update_user(&disabled, |u| u.account_enabled = true);
    env.graph.add_member(&env.fx.all_group_id, &leaver);
    let template = members[3].clone();
    let boss = SimUser {
        id: "aaaaaaaa-0000-4000-8000-00000000b055".into(),
        user_principal_name: "dialect.boss@contoso-sim.onmicrosoft.com".into(),
        mail: Some("dialect.boss@contoso-sim.onmicrosoft.com".into()),
        display_name: Some("Dialect Boss".into()),
        manager_id: None,
        ..template.clone()
    };
    let hire = SimUser {
        id: "aaaaaaaa-0000-4000-8000-00000000b056".into(),
        user_principal_name: "dialect.hire@contoso-sim.onmicrosoft.com".into(),
        mail: Some("dialect.hire@contoso-sim.onmicrosoft.com".into()),
        display_name: Some("Dialect Hire".into()),
        manager_id: Some(boss.id.clone()),
        ..template
    };
    env.graph.upsert_user(boss.clone());
    env.graph.upsert_user(hire.clone());
    env.graph.add_member(&env.fx.nested_group_id, &hire.id);
    env.graph.add_member(&env.fx.all_group_id, &boss.id);
    let r = env.reconcile().await;
    ok(name, &r);
    assert_eq!(r.counts.created, 2, "{name}: {:?}", r.changes);
    assert_eq!(r.counts.reactivated, 2, "{name}: {:?}", r.changes);
    assert_eq!(
        env.lms_user(&hire.id)[ENTERPRISE]["manager"]["value"],
        env.lms_user(&boss.id)["id"],
        "{name}: the hire's manager link"
    );
    assert_converged(&env, &d, &stale);

    // sync-user applies one change now.
    env.graph
        .update_user(&promoted, |u| u.department = Some("Dialects".into()));
    let t = sync_user(&env.integration.context(), &promoted, false)
        .await
        .expect("sync-user");
    assert_eq!(t.outcome, TraceOutcome::Updated, "{name}: {t:?}");
    assert_eq!(
        env.lms_user(&promoted)[ENTERPRISE]["department"],
        "Dialects",
        "{name}"
    );

    // And at the end, nothing left to write.
    let (r, w) = writes_of(&env, true).await;
    ok(name, &r);
    assert_eq!(w, 0, "{name}: {:?}", r.changes);
    assert_converged(&env, &d, &stale);
}

#[tokio::test]
async fn strict() {
    lifecycle("strict", SimDialect::strict(), false).await;
}

#[tokio::test]
async fn replace_only() {
    lifecycle("replace-only", SimDialect::replace_only(), false).await;
}

#[tokio::test]
async fn replace_needs_add() {
    lifecycle("replace-needs-add", SimDialect::replace_needs_add(), false).await;
}

#[tokio::test]
async fn no_clear() {
    lifecycle("no-clear", SimDialect::no_clear(), false).await;
}

#[tokio::test]
async fn put_only() {
    lifecycle("put-only", SimDialect::put_only(), false).await;
}

#[tokio::test]
async fn no_filter() {
    lifecycle("no-filter", SimDialect::no_filter(), false).await;
}

#[tokio::test]
async fn partial_library() {
    lifecycle("partial-library", SimDialect::partial_library(), false).await;
}

#[tokio::test]
async fn bare_errors() {
    lifecycle("bare-errors", SimDialect::bare_errors(), false).await;
}

/// The go-live flow on every dialect: `check --probe` first, then the lifecycle.
#[tokio::test]
async fn every_dialect_after_a_probe() {
    for (name, d) in SimDialect::all() {
        lifecycle(name, d, true).await;
    }
}

#[tokio::test]
async fn the_probe_learns_each_dialect() {
    for (name, d) in SimDialect::all() {
        let env = env_for(&d, 4).await;
        let p = probe(name, &env).await;
        let dialect = env.integration.target.dialect();
        let learned = env.integration.target.learned();
        assert!(learned.probed_at.is_some());
        match name {
            "strict" => {
                assert!(!p.failed(), "{name}: {:#?}", p.rows);
                assert_eq!(
                    dialect.patch_ops,
                    [PatchOp::Add, PatchOp::Replace, PatchOp::Remove].into()
                );
                assert_eq!(dialect.clear, Clear::Remove);
                assert_eq!(
                    dialect.filter,
                    [FilterAttr::UserName, FilterAttr::ExternalId].into()
                );
                assert!(dialect.not_kept.is_empty() && dialect.no_patch.is_empty());
                assert_eq!(row(&p, "clear title").status, RowStatus::Ok);
            }
            "replace-only" => {
                assert!(!p.failed(), "{name}: {:#?}", p.rows);
                assert_eq!(dialect.patch_ops, [PatchOp::Replace].into());
                assert_eq!(dialect.clear, Clear::Null);
                assert!(row(&p, "clear title").answer.contains("501"));
                assert!(row(&p, "clear title").action.contains("replace null"));
            }
            "replace-needs-add" => {
                assert!(!p.failed(), "{name}: {:#?}", p.rows);
                assert!(!dialect.replace_adds);
                let again = p
                    .rows
                    .iter()
                    .find(|r| r.operation.contains("again"))
                    .expect("a set-again row");
                assert!(again.action.contains("with add"), "{again:?}");
            }
            "no-clear" => {
                assert!(!p.failed(), "impossible clears are warnings: {:#?}", p.rows);
                assert_eq!(row(&p, "clear title").status, RowStatus::Warn);
                assert!(row(&p, "clear title").action.contains("never be cleared"));
                assert!(dialect.no_clear.contains("title"));
                assert!(!dialect.put);
            }
            "put-only" => {
                assert!(dialect.patch_ops.is_empty(), "{:?}", dialect.patch_ops);
                assert!(dialect.not_writable.is_empty() && dialect.no_clear.is_empty());
                assert!(dialect.put);
                assert!(row(&p, "change title").action.contains("PUT"));
            }
            "no-filter" => {
                assert!(dialect.filter.is_empty());
                assert!(row(&p, "find by externalId").action.contains("listing"));
            }
            "bare-errors" => {
                assert!(!p.failed(), "{name}: {:#?}", p.rows);
                assert_eq!(dialect.clear, Clear::Empty);
                // A list takes no "": cleared with PUT, while it is still set with PATCH.
                assert!(dialect.clear_by_put.contains("emails.work"));
                assert!(!dialect.no_patch.contains("emails.work"));
                assert!(
                    dialect.no_patch.contains("externalId"),
                    "{:?}",
                    dialect.no_patch
                );
            }
            "partial-library" => {
                assert_eq!(dialect.filter, [FilterAttr::UserName].into());
                assert_eq!(dialect.user_name_unique, CaseRule::CaseSensitive);
                assert!(!dialect.email_type);
                assert!(
                    dialect.not_kept.contains("displayName"),
                    "{:?}",
                    dialect.not_kept
                );
                assert!(
                    dialect.no_patch.contains("externalId"),
                    "{:?}",
                    dialect.no_patch
                );
                assert_eq!(dialect.clear, Clear::Null);
                assert!(row(&p, "adopt").action.contains("PUT"));
                assert!(
                    dialect.not_writable.is_empty(),
                    "{:?}",
                    dialect.not_writable
                );
                assert!(!p.failed(), "{:#?}", p.rows);
            }
            _ => unreachable!(),
        }
        // Stored: a new Integration over the same store starts from it.
        let again = rostersync::app::Integration::build(&env.integration.cfg, &env.store).unwrap();
        assert_eq!(
            *again.target.dialect(),
            *dialect,
            "{name}: the dialect was stored"
        );
    }
}

/// Creates whose answer is lost (the LMS created the user, then answered 500) are found
/// again on every dialect — by externalId, by userName checking externalId where the
/// externalId filter is blind, or in a fresh listing where nothing filters — and never
/// posted a second time.
#[tokio::test]
async fn lost_creates_are_found_and_never_posted_twice_on_every_dialect() {
    for (name, d) in SimDialect::all() {
        let env = env_for(&d, 30).await;
        env.scim.set_faults(rostersync_sim::scim::ScimFaults {
            rate_500_after_create: 0.3,
            seed: 9,
            ..Default::default()
        });
        env.scim.reset_counts();
        let r = env.reconcile().await;
        ok(name, &r);
        assert!(env.scim.request_count("500") > 0, "{name}: faults injected");
        assert_eq!(
            env.scim.request_count("POST"),
            r.counts.created,
            "{name}: one POST per user"
        );
        let mut names: Vec<String> = env
            .scim
            .users()
            .iter()
            .map(|u| u["userName"].as_str().unwrap().to_lowercase())
            .collect();
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n, "{name}: no duplicate LMS users");
        env.scim.set_faults(Default::default());
        assert_converged(&env, &d, &HashSet::new());
    }
}

/// A dialect pinned in config is used from the first request (nothing to learn) and is never
/// changed by what the server answers: a pin that contradicts the server fails the change,
/// with the server's answer, instead of being learned away.
#[tokio::test]
async fn a_pinned_dialect_is_used_as_is() {
    let env = spawn(EnvOptions {
        users: 16,
        dialect: SimDialect::replace_only(),
        target_extra:
            "dialect = { patch_ops = [\"replace\"], clear = \"null\", enterprise = false }".into(),
        ..Default::default()
    })
    .await;
    let r = env.reconcile().await;
    ok("pinned", &r);
    assert!(
        env.scim.users().iter().all(|u| u.get(ENTERPRISE).is_none()),
        "enterprise = false: no enterprise attribute sent"
    );
    let id = enabled_members(&env)[2].id.clone();
    env.graph.update_user(&id, |u| u.job_title = None);
    let r = env.reconcile().await;
    ok("pinned", &r);
    assert!(env.lms_user(&id).get("title").is_none());
    assert!(
        !r.notes.iter().any(|n| n.contains("learned")),
        "nothing to learn: {:?}",
        r.notes
    );
    let d = env.integration.target.dialect();
    assert_eq!(
        d.origin["patch_ops"],
        rostersync::lms::dialect::Origin::Config
    );

    // A pin the server contradicts: remove is pinned, the server answers 501 to it.
    let env = spawn(EnvOptions {
        users: 16,
        dialect: SimDialect::replace_only(),
        target_extra: "dialect = { clear = \"remove\" }".into(),
        ..Default::default()
    })
    .await;
    ok("pinned remove", &env.reconcile().await);
    let id = enabled_members(&env)[2].id.clone();
    env.graph.update_user(&id, |u| u.job_title = None);
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Partial, "{:?}", r.failures);
    assert!(r.failures[0].reason.contains("501"), "{:?}", r.failures);
    assert_eq!(env.integration.target.dialect().clear, Clear::Remove);
}

/// A 401 with an empty `text/html` body (no SCIM error at all) is still "the token is wrong",
/// and stops a run instead of failing each user.
#[tokio::test]
async fn an_empty_html_401_is_read_as_a_rejected_token() {
    let env = spawn(EnvOptions {
        users: 6,
        dialect: SimDialect::partial_library(),
        ..Default::default()
    })
    .await;
    let bad = env
        .config_toml
        .replace(crate::common::SCIM_TOKEN, "not-the-scim-token-4711");
    let config = rostersync::config::Config::from_toml(&bad, std::path::Path::new(".")).unwrap();
    let i = rostersync::app::Integration::build(&config.integrations[0], &env.store).unwrap();
    let lines = i.check().await;
    let lms = lines
        .iter()
        .find(|l| l.what == "LMS discovery")
        .expect("an LMS line");
    assert_eq!(lms.status, rostersync::app::CheckStatus::Fail);
    assert!(
        lms.detail.contains("401") && lms.detail.contains("target.token"),
        "{}",
        lms.detail
    );
    let r = i.reconcile(RunOptions::default(), None).await;
    assert_eq!(r.outcome, RunOutcome::Failed);
    assert!(
        r.error.as_deref().unwrap_or("").contains("401"),
        "{:?}",
        r.error
    );
    assert_eq!(env.scim.user_count(), 0);
}
